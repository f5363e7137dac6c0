//! Checkpoints: one directory per save, `step-<9 digits>/{model,optimizer}.safetensors + manifest.json`,
//! written under a temporary name and renamed, so a crash mid-save never leaves a half checkpoint
//! that looks whole. The manifest records each file's size and sha256; a checkpoint that fails the
//! check is reported, renamed aside (never deleted) and the previous one is used. A save that
//! finds its volume full removes what it wrote and fails with [`StorageFull`] (exit 3), which
//! names the folder, the bytes a checkpoint needs and what is free.//!
//! [`format`] names the files and holds the manifest, [`save`] writes, [`load`] reads.

mod format;
mod load;
mod save;

pub use format::{
    list, step_dir_name, vocabulary, DatasetId, FileCheck, InitFrom, Manifest, BEST_DIR,
    COMPLETE_FILE,
};
pub use load::{
    load_dir, load_latest, load_manifest, load_model, read_complete, resolve_for_reading, Loaded,
};
pub use save::{check_writable, prune, save, write_complete};
