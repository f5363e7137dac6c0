//! Reading a prepared dataset for training: both splits memory-mapped, checked once at open. Plain
//! buffers only; the training loop turns them into tensors.
//!
//! The training stream is cut into windows of `seq_len + 1` tokens at stride `seq_len` (a window's
//! last token is the next one's first: inputs and targets both cover the stream); epoch `e` visits
//! every window once in a permutation drawn from `(seed, e)`. Sequence number `i`, a counter over
//! the whole run, is window `perm_e[i % windows]` of epoch `e = i / windows`. The data is thus a
//! pure function of (seed, sequence number): a resumed run sees exactly what an uninterrupted one
//! would, and ranks split a step's sequences without talking to each other ([`rank_sequences`],
//! in [`super::order`]).
//!
//! Validation reads `val.bin` in order, in the same windows, without shuffling; the tokens after the
//! last whole window (fewer than `seq_len`) are not evaluated, and a validation split shorter than
//! one window is an error at open.

use std::ops::Range;
use std::path::Path;
use std::sync::Mutex;

use anyhow::{Context, Result};
use memmap2::Mmap;

use crate::data::format::{self, Manifest};
use crate::data::order::permutation;
use crate::data::vocab::BOS;
use crate::user_bail;

// Where the training loop has always found it.
pub use crate::data::order::rank_sequences;

pub struct Dataset {
    pub manifest: Manifest,
    train: Mmap,
    val: Mmap,
    seq_len: usize,
    seed: u64,
    train_windows: u64,
    /// The permutations of the last two epochs used: a step may straddle an epoch boundary.
    perms: Mutex<Vec<(u64, Vec<u32>)>>,
}

/// Sizes of a dataset as the training loop sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Counts {
    pub train_tokens: u64,
    pub val_tokens: u64,
    pub train_chars: u64,
    pub val_chars: u64,
    /// Training sequences per epoch.
    pub train_windows: u64,
    pub val_windows: u64,
}

fn map_split(dir: &Path, file: &str, want_tokens: u64) -> Result<Mmap> {
    let path = dir.join(file);
    let f = match std::fs::File::open(&path) {
        Ok(f) => f,
        Err(e) => user_bail!(
            "{}: {e}; the dataset is incomplete: run `charlm-trainer prepare` again",
            path.display()
        ),
    };
    let len = f.metadata()?.len();
    if len != want_tokens {
        user_bail!(
            "{} has {len} tokens but its manifest says {want_tokens}: the dataset is damaged; \
             run `charlm-trainer prepare` again",
            path.display()
        );
    }
    // SAFETY: prepared files are written once and never modified in place (prepare replaces the
    // whole directory), so the mapping stays valid for our lifetime.
    let map = unsafe { Mmap::map(&f) }.with_context(|| format!("map {}", path.display()))?;
    // A max-reduction vectorises: checking 350 MB costs a fraction of a second, once.
    if map.iter().fold(0u8, |a, &t| a.max(t)) > BOS {
        let pos = map.iter().position(|&t| t > BOS).unwrap_or(0);
        user_bail!(
            "{} holds token id {} at offset {pos}, which prepare never writes: the dataset is \
             damaged; run `charlm-trainer prepare` again",
            path.display(),
            map[pos]
        );
    }
    Ok(map)
}

/// Why `--data dir` is not a prepared dataset, and the commands that make one from what it is.
fn not_a_dataset(dir: &Path) -> anyhow::Error {
    let shown = dir.display();
    let message = if !dir.exists() {
        format!(
            "--data {shown} (CHARLM_DATA) does not exist: give the directory that `charlm-trainer \
             prepare --input <dir of .txt files> --output <dir>` wrote"
        )
    } else if !dir.is_dir() {
        format!(
            "--data {shown} (CHARLM_DATA) is a file: give the directory that `charlm-trainer \
             prepare` wrote"
        )
    } else if holds_txt(dir) {
        // A sibling: `prepare` refuses an --output inside its --input or holding other files.
        let prepared = match (dir.file_name(), dir.parent()) {
            (Some(name), Some(parent)) => {
                parent.join(format!("{}-prepared", name.to_string_lossy()))
            }
            _ => {
                let real = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
                let name = real
                    .file_name()
                    .map_or("data".into(), |n| n.to_string_lossy());
                real.with_file_name(format!("{name}-prepared"))
            }
        };
        let prepared = prepared.display();
        format!(
            "--data {shown} (CHARLM_DATA) holds raw .txt files, not a prepared dataset: prepare \
             them into a new directory with `charlm-trainer prepare --input {shown} --output \
             {prepared}`, then train with `--data {prepared}`"
        )
    } else if std::fs::read_dir(dir).is_ok_and(|mut d| d.next().is_none()) {
        format!(
            "--data {shown} (CHARLM_DATA) is empty: write a dataset into it with `charlm-trainer \
             prepare --input <dir of .txt files> --output {shown}`"
        )
    } else {
        format!(
            "--data {shown} (CHARLM_DATA) is not a prepared dataset (it has no {}): make one \
             with `charlm-trainer prepare --input <dir of .txt files> --output <new dir>` and \
             give that directory as --data",
            format::MANIFEST_FILE
        )
    };
    anyhow::Error::new(crate::sys::error::UserError(message))
}

/// Whether `dir` holds `*.txt` files within a few levels (what `prepare --input` reads); the look
/// is bounded, a huge tree is not walked.
fn holds_txt(dir: &Path) -> bool {
    let mut pending = vec![(dir.to_path_buf(), 0)];
    let mut seen = 0;
    while let Some((d, depth)) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for entry in entries.flatten() {
            seen += 1;
            if seen > 10_000 {
                return false;
            }
            let path = entry.path();
            if entry.file_name().to_string_lossy().starts_with('.') {
                continue;
            }
            if path.extension().is_some_and(|e| e == "txt") && path.is_file() {
                return true;
            }
            if depth < 3 && path.is_dir() {
                pending.push((path, depth + 1));
            }
        }
    }
    false
}

impl Dataset {
    /// Opens the prepared dataset in `dir` for sequences of `seq_len` tokens, shuffled by `seed`.
    pub fn open(dir: &Path, seq_len: i64, seed: u64) -> Result<Self> {
        if seq_len < 1 {
            user_bail!("--seq-len must be at least 1 (got {seq_len})");
        }
        if !dir.join(format::MANIFEST_FILE).is_file() {
            return Err(not_a_dataset(dir));
        }
        let manifest = format::read_manifest(dir)?;
        let train = map_split(dir, format::TRAIN_FILE, manifest.train.tokens)?;
        let val = map_split(dir, format::VAL_FILE, manifest.val.tokens)?;
        let seq_len = seq_len as usize;
        for (name, map, fix) in [
            ("training", &train, "add data"),
            ("validation", &val, "prepare with a larger --val-fraction"),
        ] {
            if map.len() <= seq_len {
                user_bail!(
                    "the {name} split of {} has {} tokens, fewer than one sequence of {seq_len} + 1: \
                     use a smaller --seq-len, or {fix}",
                    dir.display(),
                    map.len(),
                );
            }
        }
        let train_windows = ((train.len() - 1) / seq_len) as u64;
        if train_windows > u32::MAX as u64 {
            user_bail!(
                "{train_windows} training sequences per epoch are more than this trainer indexes \
                 (2^32): use a larger --seq-len"
            );
        }
        Ok(Self {
            manifest,
            train,
            val,
            seq_len,
            seed,
            train_windows,
            perms: Mutex::new(Vec::new()),
        })
    }

    pub fn seq_len(&self) -> usize {
        self.seq_len
    }

    /// Training windows per epoch.
    pub fn train_windows(&self) -> u64 {
        self.train_windows
    }

    pub fn val_windows(&self) -> u64 {
        ((self.val.len() - 1) / self.seq_len) as u64
    }

    pub fn counts(&self) -> Counts {
        Counts {
            train_tokens: self.train.len() as u64,
            val_tokens: self.val.len() as u64,
            train_chars: self.manifest.train.characters,
            val_chars: self.manifest.val.characters,
            train_windows: self.train_windows,
            val_windows: self.val_windows(),
        }
    }

    /// The epoch sequence number `sequence` belongs to.
    pub fn epoch_of(&self, sequence: u64) -> u64 {
        sequence / self.train_windows
    }

    /// The training window that sequence number `sequence` reads.
    pub fn window(&self, sequence: u64) -> u64 {
        let (epoch, i) = (
            sequence / self.train_windows,
            (sequence % self.train_windows) as usize,
        );
        let mut perms = self.perms.lock().expect("permutation cache poisoned");
        if let Some((_, p)) = perms.iter().find(|(e, _)| *e == epoch) {
            return p[i] as u64;
        }
        let p = permutation(self.seed, epoch, self.train_windows);
        let w = p[i] as u64;
        if perms.len() == 2 {
            perms.remove(0);
        }
        perms.push((epoch, p));
        w
    }

    /// Writes training sequences (each `seq_len + 1` tokens, inputs then the last target) for the
    /// given sequence numbers, one after another.
    pub fn fill_train(&self, sequences: &[u64], out: &mut [i64]) {
        let n = self.seq_len + 1;
        assert_eq!(out.len(), sequences.len() * n, "buffer size");
        for (dst, &s) in out.chunks_exact_mut(n).zip(sequences) {
            let start = self.window(s) as usize * self.seq_len;
            for (d, &t) in dst.iter_mut().zip(&self.train[start..start + n]) {
                *d = t as i64;
            }
        }
    }

    /// Writes validation windows `windows` (indices below [`Self::val_windows`], in order).
    pub fn fill_val(&self, windows: &[u64], out: &mut [i64]) {
        self.fill_windows(Split::Val, windows, out)
    }

    /// Writes windows `windows` of `split` as stored (for training windows: not in the epoch's
    /// shuffled order), each `seq_len + 1` tokens.
    pub fn fill_windows(&self, split: Split, windows: &[u64], out: &mut [i64]) {
        let n = self.seq_len + 1;
        assert_eq!(out.len(), windows.len() * n, "buffer size");
        let tokens: &[u8] = match split {
            Split::Train => &self.train,
            Split::Val => &self.val,
        };
        for (dst, &w) in out.chunks_exact_mut(n).zip(windows) {
            let start = w as usize * self.seq_len;
            for (d, &t) in dst.iter_mut().zip(&tokens[start..start + n]) {
                *d = t as i64;
            }
        }
    }

    /// Windows of `split` that can be evaluated.
    pub fn windows(&self, split: Split) -> u64 {
        match split {
            Split::Train => self.train_windows,
            Split::Val => self.val_windows(),
        }
    }

    /// The validation windows in order, `batch` at a time (the last batch may be shorter).
    pub fn val_batches(&self, batch: u64) -> impl Iterator<Item = Range<u64>> {
        assert!(batch > 0, "batch of 0");
        let windows = self.val_windows();
        (0..windows.div_ceil(batch)).map(move |b| b * batch..((b + 1) * batch).min(windows))
    }

    /// Targets of validation windows `windows` that are characters (not BOS): the denominator of
    /// bits per character.
    pub fn val_target_chars(&self, windows: Range<u64>) -> u64 {
        windows
            .map(|w| {
                let start = w as usize * self.seq_len;
                let targets = &self.val[start + 1..start + self.seq_len + 1];
                targets.iter().filter(|&&t| t != BOS).count() as u64
            })
            .sum()
    }
}

/// One of the two parts `prepare` wrote.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Split {
    Train,
    Val,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dataset(text: &str, seq_len: i64, seed: u64) -> (tempfile::TempDir, Dataset) {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir(root.path().join("raw")).unwrap();
        std::fs::write(root.path().join("raw/a.txt"), text).unwrap();
        crate::data::prepare::prepare(&root.path().join("raw"), &root.path().join("data"), 0.3, 0)
            .unwrap();
        let d = Dataset::open(&root.path().join("data"), seq_len, seed).unwrap();
        (root, d)
    }

    fn sums(n: i64) -> String {
        (0..n).map(|i| format!("{i}+1\n{}\n\n", i + 1)).collect()
    }

    #[test]
    fn each_epoch_visits_every_window_once_in_its_own_order() {
        let (_root, d) = dataset(&sums(200), 8, 1);
        let w = d.train_windows();
        assert!(w > 50, "{w}");
        let epoch = |e: u64| -> Vec<u64> { (0..w).map(|i| d.window(e * w + i)).collect() };
        for e in 0..3 {
            let mut seen = epoch(e);
            seen.sort();
            assert_eq!(seen, (0..w).collect::<Vec<_>>());
            assert_eq!(d.epoch_of(e * w), e);
            assert_eq!(d.epoch_of(e * w + w - 1), e);
        }
        assert_ne!(epoch(0), epoch(1), "epochs are shuffled differently");
        assert_eq!(epoch(0), epoch(0), "and the same epoch the same way");
        // Out-of-order access (another rank, a resume) gives the same windows.
        let later = d.window(5 * w + 3);
        let (_r2, fresh) = dataset(&sums(200), 8, 1);
        assert_eq!(fresh.window(5 * w + 3), later);
        assert_eq!(fresh.window(2), epoch(0)[2]);
        let (_r3, other) = dataset(&sums(200), 8, 2);
        let other_order: Vec<u64> = (0..w).map(|i| other.window(i)).collect();
        assert_ne!(other_order, epoch(0), "the seed changes the order");
    }

    #[test]
    fn windows_overlap_by_one_token_and_cover_the_stream() {
        let (_root, d) = dataset(&sums(50), 8, 1);
        let w = d.train_windows();
        assert_eq!(w, (d.counts().train_tokens - 1) / 8);
        let mut buf = vec![0i64; w as usize * 9];
        let seqs: Vec<u64> = (0..w).collect();
        d.fill_train(&seqs, &mut buf);
        for (s, seq) in buf.chunks(9).enumerate() {
            let start = d.window(s as u64) as usize * 8;
            let expect: Vec<i64> = d.train[start..start + 9]
                .iter()
                .map(|&t| t as i64)
                .collect();
            assert_eq!(seq, &expect[..]);
        }
        // In window order, targets (tokens 1..) tile the stream without gaps or repeats.
        let mut targets = Vec::new();
        for win in 0..w {
            let start = win as usize * 8;
            targets.extend_from_slice(&d.train[start + 1..start + 9]);
        }
        assert_eq!(targets, d.train[1..1 + 8 * w as usize]);
    }

    #[test]
    fn validation_batches_are_in_order_and_count_characters() {
        let (_root, d) = dataset(&sums(300), 16, 1);
        let vw = d.val_windows();
        assert!(vw >= 3, "{vw}");
        let batches: Vec<Range<u64>> = d.val_batches(2).collect();
        assert_eq!(batches.first(), Some(&(0..2)));
        let flat: Vec<u64> = batches.iter().flat_map(|r| r.clone()).collect();
        assert_eq!(flat, (0..vw).collect::<Vec<_>>());
        let mut buf = vec![0i64; vw as usize * 17];
        d.fill_val(&flat, &mut buf);
        let want: u64 = buf
            .chunks(17)
            .map(|w| w[1..].iter().filter(|&&t| t != BOS as i64).count() as u64)
            .sum();
        let got: u64 = batches.into_iter().map(|r| d.val_target_chars(r)).sum();
        assert_eq!(got, want);
        assert!(got > 0 && got < vw * 16, "BOS targets are excluded: {got}");
        let c = d.counts();
        assert_eq!(c.val_windows, vw);
        assert_eq!(c.val_tokens, d.manifest.val.tokens);
        assert_eq!(
            c.train_chars + c.val_chars,
            c.train_tokens + c.val_tokens - 300
        );
    }

    #[test]
    fn damaged_missing_or_too_short_data_names_the_fix() {
        let (root, _d) = dataset(&sums(50), 4, 0);
        let data = root.path().join("data");
        let open_err = |seq_len| {
            let err = Dataset::open(&data, seq_len, 0).err().expect("an error");
            assert_eq!(crate::sys::error::exit_code(&err), 2, "{err}");
            err.to_string()
        };
        let err = open_err(100_000);
        assert!(
            err.contains("fewer than one sequence") && err.contains("--seq-len"),
            "{err}"
        );
        assert!(open_err(0).contains("--seq-len must be at least 1"));

        let train = data.join("train.bin");
        let good = std::fs::read(&train).unwrap();
        let mut bytes = good.clone();
        bytes[3] = 25;
        std::fs::write(&train, &bytes).unwrap();
        let err = open_err(4);
        assert!(
            err.contains("token id 25 at offset 3") && err.contains("prepare"),
            "{err}"
        );

        std::fs::OpenOptions::new()
            .write(true)
            .open(&train)
            .unwrap()
            .set_len(3)
            .unwrap();
        let err = open_err(4);
        assert!(
            err.contains("train.bin has 3 tokens but its manifest says"),
            "{err}"
        );
        assert!(err.contains("charlm-trainer prepare"), "{err}");

        std::fs::remove_file(data.join("val.bin")).unwrap();
        std::fs::write(&train, &good).unwrap();
        let err = open_err(4);
        assert!(err.contains("val.bin") && err.contains("prepare"), "{err}");

        let manifest = data.join("manifest.json");
        let text = std::fs::read_to_string(&manifest).unwrap();
        std::fs::write(&manifest, text.replace("\"format\": 1", "\"format\": 99")).unwrap();
        let err = open_err(4);
        assert!(
            err.contains("format 99") && err.contains("prepare"),
            "{err}"
        );

        let err = Dataset::open(&root.path().join("nope"), 4, 0)
            .err()
            .unwrap();
        assert_eq!(crate::sys::error::exit_code(&err), 2);
        assert!(err.to_string().contains("charlm-trainer prepare"), "{err}");
    }
}
