//! The prepared dataset on disk: `train.bin` and `val.bin` (one u8 token id per character, BOS
//! before each document) and `manifest.json` (vocabulary, counts, split settings and the sources
//! with their SHA-256), which `prepare` writes and `train`, `plan` and `run` read.

use std::fs;
use std::path::Path;

use anyhow::Result;
use serde::{Deserialize, Serialize};

use crate::data::vocab::{self, BOS, VOCAB_SIZE};
use crate::user_bail;

/// Bumped whenever the meaning of the files changes; `Dataset::open` refuses other formats.
pub const FORMAT: u32 = 1;
pub const TRAIN_FILE: &str = "train.bin";
pub const VAL_FILE: &str = "val.bin";
pub const MANIFEST_FILE: &str = "manifest.json";

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct SplitCounts {
    /// Vocabulary characters, newlines included.
    pub characters: u64,
    pub documents: u64,
    /// The file's length: characters plus one BOS per document.
    pub tokens: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct SourceFile {
    /// Relative to --input, `/`-separated.
    pub path: String,
    pub bytes: u64,
    pub sha256: String,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Manifest {
    pub format: u32,
    /// The characters of ids 0.., as a string.
    pub vocabulary: String,
    pub bos_id: u8,
    pub vocab_size: usize,
    pub train: SplitCounts,
    pub val: SplitCounts,
    pub val_fraction: f64,
    pub seed: u64,
    pub sources: Vec<SourceFile>,
}

/// Whether `dir`'s manifest is one `prepare` writes (of any format version) and its splits have
/// the sizes it records; otherwise why not.
pub(super) fn written_by_prepare(dir: &Path) -> std::result::Result<(), String> {
    let text = fs::read_to_string(dir.join(MANIFEST_FILE))
        .map_err(|_| format!("no readable {MANIFEST_FILE}"))?;
    let m: serde_json::Value =
        serde_json::from_str(&text).map_err(|_| format!("its {MANIFEST_FILE} is not JSON"))?;
    if m.get("format").is_none() || m.get("vocabulary").is_none() {
        return Err(format!("its {MANIFEST_FILE} is not a prepare manifest"));
    }
    for (file, split) in [(TRAIN_FILE, "train"), (VAL_FILE, "val")] {
        let want = m[split]["tokens"].as_u64();
        let have = fs::metadata(dir.join(file)).ok().map(|md| md.len());
        if have.is_some() && have != want {
            return Err(format!("{file} is not the size its manifest records"));
        }
    }
    Ok(())
}

/// Reads a prepared dataset's manifest; a missing or foreign one names the fix.
pub fn read_manifest(dir: &Path) -> Result<Manifest> {
    let path = dir.join(MANIFEST_FILE);
    let text = match fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) => user_bail!(
            "{}: {e}; run `charlm-trainer prepare --input <dir of .txt files> --output {}` first",
            path.display(),
            dir.display()
        ),
    };
    let manifest: Manifest = match serde_json::from_str(&text) {
        Ok(m) => m,
        Err(e) => user_bail!(
            "{} is not a prepare manifest ({e}); run `charlm-trainer prepare` again",
            path.display()
        ),
    };
    if manifest.format != FORMAT
        || manifest.vocab_size != VOCAB_SIZE
        || manifest.bos_id != BOS
        || manifest.vocabulary.as_bytes() != vocab::CHARS
    {
        user_bail!(
            "{} was prepared by another version (format {}, vocabulary {:?}, this trainer reads \
             format {FORMAT}); run `charlm-trainer prepare` again",
            dir.display(),
            manifest.format,
            manifest.vocabulary
        );
    }
    Ok(manifest)
}
