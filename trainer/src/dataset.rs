//! Reading a prepared dataset for training: both splits memory-mapped, checked once at open.
//!
//! The training stream is cut into windows of `seq_len + 1` tokens at stride `seq_len`; epoch `e`
//! visits every window once in a permutation drawn from `(seed, e)`. Sequence number `i`, a counter
//! over the whole run, is window `perm_e[i % windows]` of epoch `e = i / windows`. The data is thus
//! a pure function of (seed, sequence number): a resumed run sees exactly what an uninterrupted one
//! would, and ranks split a step's sequences without talking to each other.

use std::path::Path;
use std::sync::Mutex;

use anyhow::{Context, Result};
use memmap2::Mmap;

use crate::prepare::{self, Manifest};
use crate::rng::Rng;
use crate::user_bail;
use crate::vocab::VOCAB_SIZE;

/// Stream id of the epoch permutations in [`Rng::stream`].
const EPOCH_STREAM: u64 = 0xE90C;

pub struct Dataset {
    pub manifest: Manifest,
    train: Mmap,
    val: Mmap,
    seq_len: usize,
    seed: u64,
    /// The last two epochs' permutations: a step may straddle an epoch boundary.
    perms: Mutex<Vec<(u64, Vec<u32>)>>,
}

fn map_split(dir: &Path, file: &str, want_tokens: u64) -> Result<Mmap> {
    let path = dir.join(file);
    let f = match std::fs::File::open(&path) {
        Ok(f) => f,
        Err(e) => user_bail!("{}: {e}; prepare the data again", path.display()),
    };
    let len = f.metadata()?.len();
    if len != want_tokens {
        user_bail!(
            "{} has {len} tokens but its manifest says {want_tokens}: the dataset is damaged; \
             prepare it again",
            path.display()
        );
    }
    if len == 0 {
        user_bail!("{} is empty; prepare a larger dataset", path.display());
    }
    // SAFETY: prepared files are written once and never modified in place (prepare replaces the
    // whole directory), so the mapping stays valid for our lifetime.
    let map = unsafe { Mmap::map(&f) }.with_context(|| format!("map {}", path.display()))?;
    if let Some(pos) = map.iter().position(|&t| t as usize >= VOCAB_SIZE) {
        user_bail!(
            "{} holds token id {} at offset {pos}, outside the vocabulary: prepare the data again",
            path.display(),
            map[pos]
        );
    }
    Ok(map)
}

impl Dataset {
    pub fn open(dir: &Path, seq_len: i64, seed: u64) -> Result<Self> {
        let manifest = prepare::read_manifest(dir)?;
        let train = map_split(dir, prepare::TRAIN_FILE, manifest.train.tokens)?;
        let val = map_split(dir, prepare::VAL_FILE, manifest.val.tokens)?;
        let seq_len = seq_len as usize;
        for (name, map) in [("training", &train), ("validation", &val)] {
            if map.len() <= seq_len {
                user_bail!(
                    "the {name} split of {} has {} tokens, fewer than one sequence of {} + 1: \
                     use a smaller --seq-len, or more data (or a larger --val-fraction)",
                    dir.display(),
                    map.len(),
                    seq_len
                );
            }
        }
        Ok(Self {
            manifest,
            train,
            val,
            seq_len,
            seed,
            perms: Mutex::new(Vec::new()),
        })
    }

    /// Training windows per epoch.
    pub fn train_windows(&self) -> u64 {
        ((self.train.len() - 1) / self.seq_len) as u64
    }

    pub fn val_windows(&self) -> u64 {
        ((self.val.len() - 1) / self.seq_len) as u64
    }

    fn window_of(&self, sequence: u64) -> usize {
        let windows = self.train_windows();
        let (epoch, i) = (sequence / windows, (sequence % windows) as usize);
        let mut perms = self.perms.lock().expect("permutation cache poisoned");
        if let Some((_, p)) = perms.iter().find(|(e, _)| *e == epoch) {
            return p[i] as usize;
        }
        let mut p: Vec<u32> = (0..windows as u32).collect();
        Rng::stream(self.seed, &[EPOCH_STREAM, epoch]).shuffle(&mut p);
        let w = p[i] as usize;
        if perms.len() == 2 {
            perms.remove(0);
        }
        perms.push((epoch, p));
        w
    }

    /// Writes training sequences (each `seq_len + 1` tokens) for the given sequence numbers.
    pub fn fill_train(&self, sequences: &[u64], out: &mut [i64]) {
        let n = self.seq_len + 1;
        assert_eq!(out.len(), sequences.len() * n, "buffer size");
        for (dst, &s) in out.chunks_exact_mut(n).zip(sequences) {
            let start = self.window_of(s) * self.seq_len;
            for (d, &t) in dst.iter_mut().zip(&self.train[start..start + n]) {
                *d = t as i64;
            }
        }
    }

    /// Writes validation windows `windows` (in order, no shuffle).
    pub fn fill_val(&self, windows: &[u64], out: &mut [i64]) {
        let n = self.seq_len + 1;
        assert_eq!(out.len(), windows.len() * n, "buffer size");
        for (dst, &w) in out.chunks_exact_mut(n).zip(windows) {
            let start = w as usize * self.seq_len;
            for (d, &t) in dst.iter_mut().zip(&self.val[start..start + n]) {
                *d = t as i64;
            }
        }
    }
}

/// The sequence numbers rank `rank` of `world` reads in micro-step `micro` of optimizer step `step`:
/// step `s` owns sequences `[s·G, (s+1)·G)` and each (micro-step, rank) takes the next `batch` of
/// them, so the union over ranks and micro-steps is the same whatever the world size.
pub fn rank_sequences(
    step: u64,
    per_step: u64,
    micro: u64,
    world: u64,
    rank: u64,
    batch: u64,
) -> Vec<u64> {
    let first = step * per_step + (micro * world + rank) * batch;
    (first..first + batch).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dataset(text: &str, seq_len: i64) -> (tempfile::TempDir, Dataset) {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir(root.path().join("raw")).unwrap();
        std::fs::write(root.path().join("raw/a.txt"), text).unwrap();
        prepare::prepare(&root.path().join("raw"), &root.path().join("data"), 0.3, 0).unwrap();
        let d = Dataset::open(&root.path().join("data"), seq_len, 1).unwrap();
        (root, d)
    }

    #[test]
    fn each_epoch_visits_every_window_once() {
        let text: String = (0..200).map(|i| format!("{i}+1\n{}\n\n", i + 1)).collect();
        let (_root, d) = dataset(&text, 8);
        let w = d.train_windows();
        for epoch in 0..3 {
            let mut seen: Vec<usize> = (0..w).map(|i| d.window_of(epoch * w + i)).collect();
            seen.sort();
            assert_eq!(seen, (0..w as usize).collect::<Vec<_>>());
        }
        let first: Vec<usize> = (0..w).map(|i| d.window_of(i)).collect();
        let second: Vec<usize> = (0..w).map(|i| d.window_of(w + i)).collect();
        assert_ne!(first, second, "epochs are shuffled differently");
    }

    #[test]
    fn targets_are_inputs_shifted_by_one() {
        let text: String = (0..50).map(|i| format!("{i}-3\n{}\n\n", i - 3)).collect();
        let (_root, d) = dataset(&text, 8);
        let mut buf = vec![0i64; 2 * 9];
        d.fill_train(&[0, 1], &mut buf);
        for (s, seq) in buf.chunks(9).enumerate() {
            let w = d.window_of(s as u64);
            let expect: Vec<i64> = d.train[w * 8..w * 8 + 9]
                .iter()
                .map(|&t| t as i64)
                .collect();
            assert_eq!(seq, &expect[..]);
        }
    }

    #[test]
    fn shards_cover_the_global_batch_for_any_world_size() {
        let (per_step, batch) = (24u64, 2u64);
        for world in [1u64, 2, 3, 4, 6, 12] {
            let accum = per_step / (world * batch);
            let mut all: Vec<u64> = (0..accum)
                .flat_map(|m| {
                    (0..world).flat_map(move |r| rank_sequences(5, per_step, m, world, r, batch))
                })
                .collect();
            all.sort();
            assert_eq!(all, (120..144).collect::<Vec<_>>(), "world {world}");
        }
    }

    #[test]
    fn damaged_or_missing_files_name_the_fix() {
        let text: String = (0..50).map(|i| format!("{i}\n\n")).collect();
        let (root, _d) = dataset(&text, 4);
        let data = root.path().join("data");
        let f = std::fs::OpenOptions::new()
            .append(true)
            .open(data.join("train.bin"))
            .unwrap();
        f.set_len(3).unwrap();
        let err = Dataset::open(&data, 4, 0).err().unwrap();
        assert!(err.to_string().contains("prepare it again"), "{err}");
        let err = Dataset::open(&root.path().join("nope"), 4, 0)
            .err()
            .unwrap();
        assert_eq!(crate::error::exit_code(&err), 2);
        assert!(err.to_string().contains("charlm-trainer prepare"), "{err}");
    }
}
