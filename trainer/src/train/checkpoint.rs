//! Checkpoints: one directory per save, `step-<9 digits>/{model,optimizer}.safetensors + manifest.json`,
//! written under a temporary name and renamed, so a crash mid-save never leaves a half checkpoint
//! that looks whole. The manifest records each file's size and sha256; a checkpoint that fails the
//! check is reported, renamed aside (never deleted) and the previous one is used. A save that
//! finds its volume full removes what it wrote and fails with [`StorageFull`] (exit 3), which
//! names the folder, the bytes a checkpoint needs and what is free.

use std::collections::BTreeMap;
use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use charlm_contract::DamagedCheckpoint;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tch::Tensor;

use crate::sys::disk::{self, fmt_bytes, fmt_size};
use crate::sys::error::{is_out_of_space, StorageFull};
use crate::sys::figures::grouped;
use crate::sys::staging::{fsync, StagingDir};
use crate::user_bail;

const FORMAT: u32 = 1;
const MODEL_FILE: &str = "model.safetensors";
const OPTIMIZER_FILE: &str = "optimizer.safetensors";
const MANIFEST_FILE: &str = "manifest.json";
pub const BEST_DIR: &str = "best";
pub const COMPLETE_FILE: &str = "COMPLETE.json";

/// Everything besides tensors that a resume needs, plus what a reader wants to know.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Manifest {
    pub format: u32,
    pub step: i64,
    pub model: crate::model::GptConfig,
    /// The training settings that shaped this state (batch sizes, seed, schedule).
    pub settings: serde_json::Value,
    /// Sequences of the training stream consumed so far: the data position.
    pub sequences_consumed: u64,
    pub epoch: f64,
    /// Data order and initialisation are pure functions of this seed; no other RNG state exists.
    pub seed: u64,
    pub elapsed_s: f64,
    pub val_bpc: Option<f64>,
    /// Evaluations since the best and, of them, the memorising ones: early stop's counts, kept
    /// across a resume (absent in older checkpoints: 0).
    #[serde(default)]
    pub evals_since_best: u32,
    #[serde(default)]
    pub overfit_evals: u32,
    pub world_size: usize,
    pub adamw_step: i64,
    pub files: BTreeMap<String, FileCheck>,
    /// The prepared dataset this training reads (absent in checkpoints from before it was
    /// recorded): a checkpoint folder belongs to one dataset, since `best/` compares val bpc
    /// measured on its validation split.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dataset: Option<DatasetId>,
    /// The characters of token ids 0.. (absent before it was recorded: the one vocabulary there
    /// was then, which is today's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vocabulary: Option<String>,
    /// The checkpoint whose weights started this training (`--init-from`), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init_from: Option<InitFrom>,
}

/// Which prepared dataset a training reads: the digest of its manifest (which records every
/// source's sha256, the split and the counts, so equal digests mean byte-identical data), and
/// where it was, for messages.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct DatasetId {
    pub digest: String,
    pub path: String,
    pub train_characters: u64,
    pub val_characters: u64,
}

impl DatasetId {
    /// "data (manifest sha256 1a2b3c4d5e6f, 50,000 + 500 characters)".
    pub fn describe(&self) -> String {
        format!(
            "{} (manifest sha256 {}, {} training + {} validation characters)",
            self.path,
            &self.digest[..self.digest.len().min(12)],
            self.train_characters,
            self.val_characters
        )
    }
}

/// Where a training's first weights came from.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct InitFrom {
    pub path: String,
    pub step: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dataset: Option<DatasetId>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct FileCheck {
    pub bytes: u64,
    pub sha256: String,
}

/// A checkpoint read back from disk, verified.
pub struct Loaded {
    pub dir: PathBuf,
    pub manifest: Manifest,
    pub model: BTreeMap<String, Tensor>,
    pub optimizer: BTreeMap<String, Tensor>,
    /// Newer checkpoints that failed their check and were set aside before this one was found
    /// (`load_latest`), for the progress report: a damaged checkpoint is not only a log line.
    pub set_aside: Vec<DamagedCheckpoint>,
}

pub fn step_dir_name(step: i64) -> String {
    format!("step-{step:09}")
}

fn sha256_file(path: &Path) -> Result<(u64, String)> {
    let mut file = fs::File::open(path).with_context(|| format!("open {}", path.display()))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut bytes = 0u64;
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        bytes += n as u64;
    }
    Ok((bytes, format!("{:x}", hasher.finalize())))
}

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

/// Rolling checkpoints in `root`, newest first.
pub fn list(root: &Path) -> Result<Vec<(i64, PathBuf)>> {
    let mut out = Vec::new();
    if !root.exists() {
        return Ok(out);
    }
    for entry in fs::read_dir(root).with_context(|| format!("read {}", root.display()))? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(step) = name.to_str().and_then(|n| n.strip_prefix("step-")) else {
            continue;
        };
        if let Ok(step) = step.parse::<i64>() {
            out.push((step, entry.path()));
        }
    }
    out.sort_by_key(|c| std::cmp::Reverse(c.0));
    Ok(out)
}

/// Deletes all but the newest `keep` rolling checkpoints; `best/` is not among them.
pub fn prune(root: &Path, keep: usize) -> Result<()> {
    for (_, dir) in list(root)?.into_iter().skip(keep.max(1)) {
        fs::remove_dir_all(&dir).with_context(|| format!("remove {}", dir.display()))?;
    }
    Ok(())
}

/// Reads a checkpoint's manifest without touching its tensors.
pub fn load_manifest(dir: &Path) -> Result<Manifest> {
    let path = dir.join(MANIFEST_FILE);
    let text = fs::read_to_string(&path).with_context(|| format!("read {}", path.display()))?;
    let manifest: Manifest =
        serde_json::from_str(&text).with_context(|| format!("parse {}", path.display()))?;
    if manifest.format != FORMAT {
        anyhow::bail!(
            "format {} (this trainer reads format {FORMAT})",
            manifest.format
        );
    }
    Ok(manifest)
}

fn verify(dir: &Path, manifest: &Manifest, file: &str) -> Result<()> {
    let want = manifest
        .files
        .get(file)
        .with_context(|| format!("manifest lacks {file}"))?;
    let (bytes, sha256) = sha256_file(&dir.join(file))?;
    if bytes != want.bytes {
        anyhow::bail!(
            "{file} has {bytes} bytes, the manifest says {} (truncated?)",
            want.bytes
        );
    }
    if sha256 != want.sha256 {
        anyhow::bail!("{file} fails its sha256 check (corrupted)");
    }
    Ok(())
}

fn read_verified(dir: &Path, manifest: &Manifest, file: &str) -> Result<BTreeMap<String, Tensor>> {
    verify(dir, manifest, file)?;
    let path = dir.join(file);
    let tensors =
        Tensor::read_safetensors(&path).with_context(|| format!("read {}", path.display()))?;
    Ok(tensors.into_iter().collect())
}

/// Reads and verifies one checkpoint directory, optimizer state included (for resuming).
pub fn load_dir(dir: &Path) -> Result<Loaded> {
    let manifest = load_manifest(dir)?;
    let model = read_verified(dir, &manifest, MODEL_FILE)?;
    let optimizer = read_verified(dir, &manifest, OPTIMIZER_FILE)?;
    Ok(Loaded {
        dir: dir.to_path_buf(),
        manifest,
        model,
        optimizer,
        set_aside: Vec::new(),
    })
}

/// Reads and verifies the weights alone (for sampling).
pub fn load_model(dir: &Path) -> Result<Loaded> {
    let manifest = load_manifest(dir).map_err(|e| {
        anyhow::Error::new(crate::sys::error::UserError(format!(
            "{} is not a readable checkpoint ({e:#}): pass a `step-…` or `best` directory, or the \
             checkpoint root",
            dir.display()
        )))
    })?;
    let model = read_verified(dir, &manifest, MODEL_FILE)
        .map_err(|e| crate::sys::error::UserError(format!("{}: {e:#}", dir.display())))?;
    Ok(Loaded {
        dir: dir.to_path_buf(),
        manifest,
        model,
        optimizer: BTreeMap::new(),
        set_aside: Vec::new(),
    })
}

/// A directory to read weights from: the directory itself if it is a checkpoint, else the root's
/// `best/`, else its newest rolling checkpoint.
pub fn resolve_for_reading(path: &Path) -> Result<PathBuf> {
    if path.join(MANIFEST_FILE).exists() {
        return Ok(path.to_path_buf());
    }
    if path.join(BEST_DIR).join(MANIFEST_FILE).exists() {
        return Ok(path.join(BEST_DIR));
    }
    match list(path)?.into_iter().next() {
        Some((_, dir)) => Ok(dir),
        None => user_bail!(
            "{} holds no checkpoint (no manifest.json, no best/, no step-* directory)",
            path.display()
        ),
    }
}

/// The newest checkpoint in `root` that passes its checks. Damaged ones are reported and renamed
/// to `<name>.damaged` so that new saves of the same step cannot collide with them. Checkpoints
/// that all fail are an error: starting over silently would throw away the training.
pub fn load_latest(root: &Path) -> Result<Option<Loaded>> {
    let candidates = list(root)?;
    if candidates.is_empty() {
        return Ok(None);
    }
    let mut failures = Vec::new();
    let mut set_aside = Vec::new();
    for (i, (_, dir)) in candidates.iter().enumerate() {
        match load_dir(dir) {
            Ok(mut loaded) => {
                loaded.set_aside = set_aside;
                return Ok(Some(loaded));
            }
            Err(err) => {
                // Say what happens next as it is: an earlier one is tried, or none is left.
                let next = match candidates.get(i + 1) {
                    Some((_, earlier)) => format!("trying the earlier {}", earlier.display()),
                    None => "there is no earlier checkpoint to fall back on".to_string(),
                };
                eprintln!(
                    "warning: checkpoint {} is damaged ({err:#}); {next}",
                    dir.display()
                );
                let aside = dir.with_extension("damaged");
                if let Err(e) = fs::rename(dir, &aside) {
                    eprintln!("warning: could not move {} aside: {e}", dir.display());
                }
                set_aside.push(DamagedCheckpoint {
                    path: dir.display().to_string(),
                    set_aside_as: aside.display().to_string(),
                    error: format!("{err:#}"),
                });
                failures.push(format!("{}: {err:#}", dir.display()));
            }
        }
    }
    user_bail!(
        "no usable checkpoint in {}: every one fails its check ({}). They were renamed to \
         *.damaged; move them out of the directory to start training from scratch",
        root.display(),
        failures.join("; ")
    )
}

/// Whether training in `root` already finished (the budget was spent).
pub fn read_complete(root: &Path) -> Result<Option<serde_json::Value>> {
    let path = root.join(COMPLETE_FILE);
    if !path.exists() {
        return Ok(None);
    }
    let text = fs::read_to_string(&path)?;
    Ok(Some(
        serde_json::from_str(&text).with_context(|| format!("parse {}", path.display()))?,
    ))
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

/// The vocabulary checkpoints record: the characters of token ids 0...
pub fn vocabulary() -> String {
    String::from_utf8_lossy(crate::data::vocab::CHARS).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(step: i64) -> Manifest {
        Manifest {
            format: FORMAT,
            step,
            model: crate::model::GptConfig::new(1, 8),
            settings: serde_json::json!({}),
            sequences_consumed: 0,
            epoch: 0.0,
            seed: 0,
            elapsed_s: 0.0,
            val_bpc: None,
            evals_since_best: 0,
            overfit_evals: 0,
            world_size: 1,
            adamw_step: step,
            files: BTreeMap::new(),
            dataset: None,
            vocabulary: None,
            init_from: None,
        }
    }

    fn tensors(v: f32) -> Vec<(String, Tensor)> {
        vec![("w".to_string(), Tensor::from_slice(&[v, v + 1.0]))]
    }

    #[test]
    fn truncated_newest_falls_back_to_previous_and_is_kept_aside() {
        let root = tempfile::tempdir().unwrap();
        save(
            root.path(),
            &step_dir_name(10),
            manifest(10),
            &tensors(1.0),
            &tensors(2.0),
        )
        .unwrap();
        let newest = save(
            root.path(),
            &step_dir_name(20),
            manifest(20),
            &tensors(3.0),
            &tensors(4.0),
        )
        .unwrap();
        let model = newest.join(MODEL_FILE);
        let len = fs::metadata(&model).unwrap().len();
        fs::OpenOptions::new()
            .write(true)
            .open(&model)
            .unwrap()
            .set_len(len - 3)
            .unwrap();

        let loaded = load_latest(root.path()).unwrap().unwrap();
        assert_eq!(loaded.manifest.step, 10);
        assert_eq!(loaded.model["w"].double_value(&[0]), 1.0);
        assert!(root.path().join("step-000000020.damaged").exists());
        // ... and it is said where the operator reads it, with the one used instead.
        assert_eq!(loaded.set_aside.len(), 1);
        let d = &loaded.set_aside[0];
        assert_eq!(d.path, newest.display().to_string());
        assert!(d.set_aside_as.ends_with("step-000000020.damaged"), "{d:?}");
        assert!(d.error.contains(MODEL_FILE), "{d:?}");
    }

    #[test]
    fn all_damaged_is_an_error_not_a_fresh_start() {
        let root = tempfile::tempdir().unwrap();
        let dir = save(
            root.path(),
            &step_dir_name(5),
            manifest(5),
            &tensors(1.0),
            &tensors(2.0),
        )
        .unwrap();
        fs::write(dir.join(OPTIMIZER_FILE), b"garbage").unwrap();
        let err = load_latest(root.path()).err().expect("must fail");
        assert_eq!(crate::sys::error::exit_code(&err), 2, "{err:#}");
    }

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
