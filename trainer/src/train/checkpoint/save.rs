//! Writing checkpoints: atomically (staged, then renamed), pruning the rolling ones, the
//! training's COMPLETE record, and what a full volume is told as ([`StorageFull`], exit 3).

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use tch::Tensor;

use super::format::{
    list, sha256_file, FileCheck, Manifest, BEST_DIR, COMPLETE_FILE, FORMAT, MANIFEST_FILE,
    MODEL_FILE, OPTIMIZER_FILE,
};
use crate::sys::disk::{self, fmt_bytes, fmt_size};
use crate::sys::error::{is_out_of_space, StorageFull};
use crate::sys::figures::grouped;
use crate::sys::staging::{fsync, StagingDir};
use crate::user_bail;

fn write_tensors(path: &Path, tensors: &[(String, Tensor)]) -> Result<()> {
    let cpu: Vec<(String, Tensor)> = tensors
        .iter()
        .map(|(n, t)| {
            (
                n.clone(),
                t.detach().to_device(tch::Device::Cpu).contiguous(),
            )
        })
        .collect();
    Tensor::write_safetensors(&cpu, path).with_context(|| format!("write {}", path.display()))?;
    fsync(path)
}

/// Writes a checkpoint into `root/<name>` atomically and returns its path. An older directory of
/// the same name (a re-save of the same step, or `best/`) is replaced only once the new one is whole.
/// A full volume is a [`StorageFull`] error, raised after the partial write was removed.
pub fn save(
    root: &Path,
    name: &str,
    manifest: Manifest,
    model: &[(String, Tensor)],
    optimizer: &[(String, Tensor)],
) -> Result<PathBuf> {
    write_checkpoint(root, name, manifest, model, optimizer).map_err(|e| {
        if !is_out_of_space(&e) {
            return e;
        }
        let needs = Needs::Checkpoint {
            model: tensor_bytes(model),
            optimizer: tensor_bytes(optimizer),
        };
        anyhow::Error::new(storage_full(root, &root.join(name), needs, &e))
    })
}

fn write_checkpoint(
    root: &Path,
    name: &str,
    mut manifest: Manifest,
    model: &[(String, Tensor)],
    optimizer: &[(String, Tensor)],
) -> Result<PathBuf> {
    // Dropped unwritten on an error: the partial directory is removed before the caller looks.
    let staging = StagingDir::new(&root.join(name))?;
    write_tensors(&staging.path().join(MODEL_FILE), model)?;
    write_tensors(&staging.path().join(OPTIMIZER_FILE), optimizer)?;
    manifest.format = FORMAT;
    manifest.files.clear();
    for file in [MODEL_FILE, OPTIMIZER_FILE] {
        let (bytes, sha256) = sha256_file(&staging.path().join(file))?;
        manifest
            .files
            .insert(file.to_string(), FileCheck { bytes, sha256 });
    }
    let mut f = fs::File::create(staging.path().join(MANIFEST_FILE))?;
    f.write_all(serde_json::to_string_pretty(&manifest)?.as_bytes())?;
    f.sync_all()?;
    staging.commit()
}

/// The bytes of tensors' data as safetensors stores them (its small header aside).
fn tensor_bytes(tensors: &[(String, Tensor)]) -> u64 {
    tensors
        .iter()
        .map(|(_, t)| (t.numel() * t.kind().elt_size_in_bytes()) as u64)
        .sum()
}

/// What a full volume means for this training: the folder, what the write needs, what is free
/// (measured after the partial write was removed) and what the folder already holds.
fn storage_full(root: &Path, dest: &Path, needs: Needs, e: &anyhow::Error) -> StorageFull {
    let space = disk::space(root);
    let free = space.map_or("an unknown amount".into(), |s| fmt_bytes(s.free));
    let total = space.map_or(String::new(), |s| format!(" of {}", fmt_size(s.total)));
    let held = list(root).map_or(0, |l| l.len());
    let best = if root.join(BEST_DIR).join(MANIFEST_FILE).exists() {
        " and best/"
    } else {
        ""
    };
    let why = crate::sys::error::io_kind(e).map_or_else(String::new, |k| format!(" ({k})"));
    let needs = match needs {
        Needs::Checkpoint { model, optimizer } => format!(
            "{} ({} bytes: {} of weights, {} of optimizer state)",
            fmt_size(model + optimizer),
            grouped(model + optimizer),
            fmt_size(model),
            fmt_size(optimizer)
        ),
        Needs::File(bytes) => fmt_bytes(bytes),
    };
    StorageFull(format!(
        "the checkpoint volume is full{why}: writing {} needs about {needs}, and {} has {free} \
         free{total}; it holds {held} rolling checkpoint(s){best}. The partial write was removed \
         and the checkpoints saved before are intact. Make room for the rolling checkpoints kept \
         (--keep-checkpoints), best/ and one being written: free space on the volume, give it \
         more (the operator's spec.checkpoint.size), keep fewer checkpoints, or give another \
         --checkpoint-dir",
        dest.display(),
        root.display(),
    ))
}

/// What a write that found no room needed.
enum Needs {
    Checkpoint { model: u64, optimizer: u64 },
    File(u64),
}

/// Makes sure checkpoints can be written to `root` (created if missing), before any training
/// that a failed first save would throw away. A failure is the user's to fix: exit 2.
pub fn check_writable(root: &Path) -> Result<()> {
    let probe = root.join(format!(".write-test-{}", std::process::id()));
    let outcome = fs::create_dir_all(root)
        .and_then(|()| fs::write(&probe, b"charlm"))
        .and_then(|()| fs::remove_file(&probe));
    if let Err(e) = outcome {
        let _ = fs::remove_file(&probe);
        if matches!(
            e.kind(),
            std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded
        ) {
            let free = disk::space(root).map_or("no".into(), |s| fmt_bytes(s.free));
            return Err(anyhow::Error::new(StorageFull(format!(
                "--checkpoint-dir {} (CHARLM_CHECKPOINT_DIR) is full ({e}; {free} free): free \
                 space on its volume, give it more (the operator's spec.checkpoint.size), or give \
                 another --checkpoint-dir",
                root.display()
            ))));
        }
        // SAFETY: getuid and getgid have no preconditions and cannot fail.
        let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
        // The ids are the fix: a volume that arrives owned by another user (one whose driver does
        // not apply a pod's fsGroup) is made writable by chown to the uid or by its group.
        user_bail!(
            "--checkpoint-dir {} (CHARLM_CHECKPOINT_DIR) cannot be written: {e}; make it a \
             directory this user (uid {uid}, gid {gid}) may write (owned by uid {uid}, or \
             group-writable for gid {gid}), or give another --checkpoint-dir",
            root.display()
        );
    }
    Ok(())
}

/// Deletes all but the newest `keep` rolling checkpoints; `best/` is not among them.
pub fn prune(root: &Path, keep: usize) -> Result<()> {
    for (_, dir) in list(root)?.into_iter().skip(keep.max(1)) {
        fs::remove_dir_all(&dir).with_context(|| format!("remove {}", dir.display()))?;
    }
    Ok(())
}

pub fn write_complete(root: &Path, summary: &serde_json::Value) -> Result<()> {
    let tmp = root.join(format!(".{COMPLETE_FILE}.tmp"));
    let text = serde_json::to_string_pretty(summary)?;
    let written = fs::File::create(&tmp)
        .and_then(|mut f| f.write_all(text.as_bytes()).and_then(|()| f.sync_all()))
        .and_then(|()| fs::rename(&tmp, root.join(COMPLETE_FILE)));
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        let e =
            anyhow::Error::new(e).context(format!("write {}", root.join(COMPLETE_FILE).display()));
        if is_out_of_space(&e) {
            let needs = Needs::File(text.len() as u64);
            let full = storage_full(root, &root.join(COMPLETE_FILE), needs, &e);
            return Err(anyhow::Error::new(full));
        }
        return Err(e);
    }
    fsync(root)
}

#[cfg(test)]
mod tests {
    use super::super::format::{test_manifest as manifest, test_tensors as tensors};
    use super::*;
    use crate::train::checkpoint::format::step_dir_name;

    #[test]
    fn prune_keeps_newest() {
        let root = tempfile::tempdir().unwrap();
        for step in [1, 2, 3, 4] {
            save(
                root.path(),
                &step_dir_name(step),
                manifest(step),
                &tensors(0.0),
                &tensors(0.0),
            )
            .unwrap();
        }
        prune(root.path(), 2).unwrap();
        let steps: Vec<i64> = list(root.path())
            .unwrap()
            .into_iter()
            .map(|(s, _)| s)
            .collect();
        assert_eq!(steps, vec![4, 3]);
    }
}
