//! `charlm-trainer prepare`: a directory of `.txt` files → `train.bin`, `val.bin` (u8 token ids)
//! and `manifest.json`, in one streaming pass at a few hundred MB/s.
//!
//! Documents are separated by one or more blank lines and stored as BOS + their characters
//! (trailing newline kept); the end of a file ends a document. Each document goes to the validation
//! split or not by a hash of (seed, document index), so the split streams and is reproducible. Any
//! byte outside the vocabulary stops everything with `path:line:column` and the fix; the output
//! directory is only replaced once the new one is complete.

use std::fs;
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::staging::StagingDir;
use crate::user_bail;
use crate::vocab::{self, BOS, VOCAB_SIZE};

pub const FORMAT: u32 = 1;
pub const TRAIN_FILE: &str = "train.bin";
pub const VAL_FILE: &str = "val.bin";
pub const MANIFEST_FILE: &str = "manifest.json";
const CHUNK: usize = 8 << 20;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// A directory searched recursively for `*.txt` files.
    #[arg(long)]
    pub input: PathBuf,
    /// The prepared dataset's directory (replaced only when the new one is complete).
    #[arg(long)]
    pub output: PathBuf,
    /// Share of documents held out for validation.
    #[arg(long, default_value_t = 0.01)]
    pub val_fraction: f64,
    /// Chooses which documents are held out.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct SplitCounts {
    pub characters: u64,
    pub documents: u64,
    /// Characters plus one BOS per document.
    pub tokens: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct SourceFile {
    /// Relative to --input.
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

pub fn run(args: Args) -> Result<()> {
    let start = std::time::Instant::now();
    let manifest = prepare(&args.input, &args.output, args.val_fraction, args.seed)?;
    let bytes: u64 = manifest.sources.iter().map(|s| s.bytes).sum();
    let secs = start.elapsed().as_secs_f64();
    eprintln!(
        "prepared {} files ({:.1} MB) in {secs:.2} s ({:.0} MB/s): train {} documents / {} tokens, \
         val {} documents / {} tokens → {}",
        manifest.sources.len(),
        bytes as f64 / 1e6,
        bytes as f64 / 1e6 / secs.max(1e-9),
        manifest.train.documents,
        manifest.train.tokens,
        manifest.val.documents,
        manifest.val.tokens,
        args.output.display()
    );
    Ok(())
}

/// Every `*.txt` under `dir`, sorted by path.
fn find_inputs(dir: &Path) -> Result<Vec<PathBuf>> {
    if !dir.is_dir() {
        user_bail!("--input {} is not a directory", dir.display());
    }
    let mut found = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(d) = pending.pop() {
        for entry in fs::read_dir(&d).with_context(|| format!("read {}", d.display()))? {
            let path = entry?.path();
            if path.is_dir() {
                pending.push(path);
            } else if path.extension().is_some_and(|e| e == "txt") {
                found.push(path);
            }
        }
    }
    found.sort();
    if found.is_empty() {
        user_bail!(
            "no .txt files under {}: put the dataset's text files there",
            dir.display()
        );
    }
    Ok(found)
}

/// Refuses to replace a directory that is not a prepared dataset: that could be the user's data.
fn check_output(output: &Path, input: &Path) -> Result<()> {
    if output.exists() {
        let is_empty = output.is_dir() && fs::read_dir(output)?.next().is_none();
        if !is_empty && !output.join(MANIFEST_FILE).exists() {
            user_bail!(
                "--output {} exists and is not a prepared dataset; choose a new directory",
                output.display()
            );
        }
    }
    let (o, i) = (output.canonicalize().ok(), input.canonicalize().ok());
    if o.is_some() && o == i {
        user_bail!("--output must not be the --input directory");
    }
    Ok(())
}

/// One split's output file and counts.
struct SplitWriter {
    out: BufWriter<fs::File>,
    counts: SplitCounts,
}

impl SplitWriter {
    fn create(path: &Path) -> Result<Self> {
        let file = fs::File::create(path).with_context(|| format!("create {}", path.display()))?;
        Ok(Self {
            out: BufWriter::with_capacity(4 << 20, file),
            counts: SplitCounts::default(),
        })
    }
}

/// Where the scanner is: inside a document or between them, and where in the current line.
struct Scanner {
    in_doc: bool,
    at_line_start: bool,
    line: u64,
    column: u64,
    doc_index: u64,
    to_val: bool,
}

pub fn prepare(input: &Path, output: &Path, val_fraction: f64, seed: u64) -> Result<Manifest> {
    if !(val_fraction > 0.0 && val_fraction < 1.0) {
        user_bail!("--val-fraction must be above 0 and below 1 (got {val_fraction})");
    }
    let files = find_inputs(input)?;
    check_output(output, input)?;
    let staging = StagingDir::new(output)?;
    let mut train = SplitWriter::create(&staging.path().join(TRAIN_FILE))?;
    let mut val = SplitWriter::create(&staging.path().join(VAL_FILE))?;
    let mut sources = Vec::with_capacity(files.len());
    let mut sc = Scanner {
        in_doc: false,
        at_line_start: true,
        line: 1,
        column: 1,
        doc_index: 0,
        to_val: false,
    };
    let mut buf = vec![0u8; CHUNK];
    let mut ids = Vec::with_capacity(CHUNK + CHUNK / 16);

    for path in &files {
        let rel = path
            .strip_prefix(input)
            .unwrap_or(path)
            .to_string_lossy()
            .into_owned();
        let mut file = fs::File::open(path).with_context(|| format!("open {}", path.display()))?;
        let mut hasher = Sha256::new();
        let mut offset = 0u64;
        (sc.line, sc.column, sc.at_line_start) = (1, 1, true);
        loop {
            let n = file
                .read(&mut buf)
                .with_context(|| format!("read {}", path.display()))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            for (i, &byte) in buf[..n].iter().enumerate() {
                let Some(id) = vocab::id_of(byte) else {
                    let shown = read_at(path, offset + i as u64)?;
                    user_bail!(
                        "{}:{}:{}: {} is not in the vocabulary (allowed: {}); remove or replace it",
                        path.display(),
                        sc.line,
                        sc.column,
                        vocab::describe_invalid(&shown),
                        vocab::ALLOWED
                    );
                };
                if byte == b'\n' {
                    if sc.at_line_start {
                        // A blank line ends the document, if one is open.
                        end_document(&mut sc, &mut ids, &mut train, &mut val)?;
                    } else {
                        ids.push(id);
                    }
                    (sc.line, sc.column, sc.at_line_start) = (sc.line + 1, 1, true);
                } else {
                    if !sc.in_doc {
                        start_document(
                            &mut sc,
                            &mut ids,
                            &mut train,
                            &mut val,
                            seed,
                            val_fraction,
                        )?;
                    }
                    ids.push(id);
                    sc.column += 1;
                    sc.at_line_start = false;
                }
            }
            offset += n as u64;
            flush_ids(&sc, &mut ids, &mut train, &mut val)?;
        }
        end_document(&mut sc, &mut ids, &mut train, &mut val)?;
        sources.push(SourceFile {
            path: rel,
            bytes: offset,
            sha256: format!("{:x}", hasher.finalize()),
        });
    }

    for (split, name, fix) in [
        (&train, "training", "add documents"),
        (
            &val,
            "validation",
            "raise --val-fraction or separate documents with blank lines",
        ),
    ] {
        if split.counts.documents == 0 {
            user_bail!(
                "the {name} split is empty ({} documents in all under {}): {fix}",
                sc.doc_index,
                input.display()
            );
        }
    }
    let manifest = Manifest {
        format: FORMAT,
        vocabulary: String::from_utf8_lossy(vocab::CHARS).into_owned(),
        bos_id: BOS,
        vocab_size: VOCAB_SIZE,
        train: finish(train)?,
        val: finish(val)?,
        val_fraction,
        seed,
        sources,
    };
    fs::write(
        staging.path().join(MANIFEST_FILE),
        serde_json::to_string_pretty(&manifest)? + "\n",
    )?;
    staging.commit()?;
    Ok(manifest)
}

fn start_document(
    sc: &mut Scanner,
    ids: &mut Vec<u8>,
    train: &mut SplitWriter,
    val: &mut SplitWriter,
    seed: u64,
    val_fraction: f64,
) -> Result<()> {
    flush_ids(sc, ids, train, val)?;
    sc.to_val = crate::rng::unit(seed, &[sc.doc_index]) < val_fraction;
    sc.in_doc = true;
    sc.doc_index += 1;
    ids.push(BOS);
    Ok(())
}

fn end_document(
    sc: &mut Scanner,
    ids: &mut Vec<u8>,
    train: &mut SplitWriter,
    val: &mut SplitWriter,
) -> Result<()> {
    if sc.in_doc {
        flush_ids(sc, ids, train, val)?;
        let split = if sc.to_val { val } else { train };
        split.counts.documents += 1;
        sc.in_doc = false;
    }
    Ok(())
}

/// Writes pending ids to the current document's split.
fn flush_ids(
    sc: &Scanner,
    ids: &mut Vec<u8>,
    train: &mut SplitWriter,
    val: &mut SplitWriter,
) -> Result<()> {
    if ids.is_empty() {
        return Ok(());
    }
    let split = if sc.to_val { val } else { train };
    let bos = ids.iter().filter(|&&t| t == BOS).count() as u64;
    split.counts.tokens += ids.len() as u64;
    split.counts.characters += ids.len() as u64 - bos;
    split.out.write_all(ids)?;
    ids.clear();
    Ok(())
}

fn finish(split: SplitWriter) -> Result<SplitCounts> {
    let file = split.out.into_inner().map_err(|e| e.into_error())?;
    file.sync_all()?;
    Ok(split.counts)
}

/// Up to 4 bytes at `offset`, to show a multi-byte character whole even across a chunk boundary.
fn read_at(path: &Path, offset: u64) -> Result<Vec<u8>> {
    let mut f = fs::File::open(path)?;
    f.seek(SeekFrom::Start(offset))?;
    let mut b = vec![0u8; 4];
    let n = f.read(&mut b)?;
    b.truncate(n);
    Ok(b)
}

/// Reads a prepared dataset's manifest; a missing or foreign one names the fix.
pub fn read_manifest(dir: &Path) -> Result<Manifest> {
    let path = dir.join(MANIFEST_FILE);
    let text = match fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) => user_bail!(
            "{}: {e}; run `charlm-trainer prepare --input <txt dir> --output {}` first",
            path.display(),
            dir.display()
        ),
    };
    let manifest: Manifest = match serde_json::from_str(&text) {
        Ok(m) => m,
        Err(e) => user_bail!(
            "{} is not a prepare manifest ({e}); prepare the data again",
            path.display()
        ),
    };
    if manifest.format != FORMAT || manifest.vocab_size != VOCAB_SIZE || manifest.bos_id != BOS {
        user_bail!(
            "{} was prepared by another version (format {}, vocab {}); prepare the data again",
            dir.display(),
            manifest.format,
            manifest.vocab_size
        );
    }
    Ok(manifest)
}
