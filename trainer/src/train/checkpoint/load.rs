//! Reading checkpoints back: each file checked against the manifest's size and sha256, a damaged
//! checkpoint renamed aside and the previous one used, and where to read weights from.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use charlm_contract::DamagedCheckpoint;
use tch::Tensor;

use super::format::{
    list, sha256_file, Manifest, BEST_DIR, COMPLETE_FILE, FORMAT, MANIFEST_FILE, MODEL_FILE,
    OPTIMIZER_FILE,
};
use crate::user_bail;

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

#[cfg(test)]
mod tests {
    use super::super::format::{step_dir_name, test_manifest as manifest, test_tensors as tensors};
    use super::super::save::save;
    use super::*;

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
}
