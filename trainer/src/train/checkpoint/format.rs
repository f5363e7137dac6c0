//! The checkpoint folder's format: directory and file names, the manifest, the rolling
//! checkpoints' listing, and the file digests both the writer and the reader take.

use std::collections::BTreeMap;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub(super) const FORMAT: u32 = 1;
pub(super) const MODEL_FILE: &str = "model.safetensors";
pub(super) const OPTIMIZER_FILE: &str = "optimizer.safetensors";
pub(super) const MANIFEST_FILE: &str = "manifest.json";
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

pub fn step_dir_name(step: i64) -> String {
    format!("step-{step:09}")
}

pub(super) fn sha256_file(path: &Path) -> Result<(u64, String)> {
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

/// The vocabulary checkpoints record: the characters of token ids 0...
pub fn vocabulary() -> String {
    String::from_utf8_lossy(crate::data::vocab::CHARS).into_owned()
}

/// A manifest of `step` for a one-layer model, and small tensors: what the tests save.
#[cfg(test)]
pub(super) fn test_manifest(step: i64) -> Manifest {
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

#[cfg(test)]
pub(super) fn test_tensors(v: f32) -> Vec<(String, tch::Tensor)> {
    vec![("w".to_string(), tch::Tensor::from_slice(&[v, v + 1.0]))]
}
