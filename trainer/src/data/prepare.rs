//! `charlm-trainer prepare`: a directory of `.txt` files → `train.bin`, `val.bin` (u8 token ids)
//! and `manifest.json`, in one streaming pass at a few hundred MB/s in constant memory.
//!
//! The format:
//! - Inputs are every `*.txt` file under `--input`, recursively, in path order. Hidden entries
//!   (names starting with `.`) are skipped: they are editors' and Kubernetes' bookkeeping (a
//!   ConfigMap volume holds each file twice, once under `..data/`).
//! - Documents are separated by one or more blank lines; the end of a file ends a document. Each is
//!   stored as BOS + its characters including the newline that ends its last line; a file whose last
//!   line lacks that newline gets it, so every document ends the same way.
//! - Each document goes to the validation split when `rng::unit(seed, &[STREAM_VAL_SPLIT, index])`
//!   is below `--val-fraction`, `index` counting documents over all files: the decision needs no
//!   look-ahead and the same input and seed always give the same split.
//! - Any byte outside the vocabulary stops everything with `path:line:column`, the character
//!   escaped, and the fix. The output is written into a hidden sibling directory and renamed into
//!   place once complete, so an error leaves `--output` as it was: absent, or the previous dataset.

use std::fs;
use std::io::{ErrorKind, Read, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::data::vocab::{self, BOS, INVALID, NEWLINE, TABLE, VOCAB_SIZE};
use crate::sys::error::UserError;
use crate::sys::rng::{Units, STREAM_VAL_SPLIT};
use crate::sys::staging::{write_error, StagingDir};
use crate::user_bail;

/// Bumped whenever the meaning of the files changes; `Dataset::open` refuses other formats.
pub const FORMAT: u32 = 1;
pub const TRAIN_FILE: &str = "train.bin";
pub const VAL_FILE: &str = "val.bin";
pub const MANIFEST_FILE: &str = "manifest.json";
/// Every file `prepare` writes; an existing `--output` holding anything else is not replaced.
const OUTPUT_FILES: [&str; 3] = [TRAIN_FILE, VAL_FILE, MANIFEST_FILE];
/// Input is read in chunks this size: small enough that hashing and translating a chunk find it
/// still in L2 cache, large enough that system calls cost nothing.
const CHUNK: usize = 256 << 10;
/// Each split's output buffer; written out when the next chunk might not fit.
const OUT_BUFFER: usize = 4 << 20;

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

pub fn prepare(input: &Path, output: &Path, val_fraction: f64, seed: u64) -> Result<Manifest> {
    if !(val_fraction > 0.0 && val_fraction < 1.0) {
        user_bail!(
            "--val-fraction must be above 0 and below 1 (got {val_fraction}); the default is 0.01"
        );
    }
    let files = find_inputs(input)?;
    check_output(output, input)?;
    let out_err = |e: anyhow::Error| write_error("--output", output, e);
    let staging = StagingDir::new(output).map_err(out_err)?;
    let mut scanner = Scanner {
        splits: [
            Split::create(&staging.path().join(TRAIN_FILE)).map_err(out_err)?,
            Split::create(&staging.path().join(VAL_FILE)).map_err(out_err)?,
        ],
        current: 0,
        gap: true,
        prev_newline: true,
        documents: 0,
        split_units: Units::new(seed, &[STREAM_VAL_SPLIT]),
        val_fraction,
    };
    let mut chunk = vec![0u8; CHUNK];
    let mut sources = Vec::with_capacity(files.len());
    for (path, rel) in &files {
        let mut file = fs::File::open(path).map_err(|e| input_error(path, e))?;
        let mut hasher = Sha256::new();
        let mut offset = 0u64;
        loop {
            let n = read_full(&mut file, &mut chunk).map_err(|e| input_error(path, e))?;
            if n == 0 {
                break;
            }
            hasher.update(&chunk[..n]);
            if scanner.scan(&chunk[..n]).map_err(out_err)? & 0x80 != 0 {
                let at = chunk[..n]
                    .iter()
                    .position(|&b| TABLE[b as usize] == INVALID);
                return Err(invalid_byte(path, offset + at.unwrap_or(0) as u64));
            }
            offset += n as u64;
        }
        scanner.end_file().map_err(out_err)?;
        sources.push(SourceFile {
            path: rel.clone(),
            bytes: offset,
            sha256: format!("{:x}", hasher.finalize()),
        });
    }

    let documents = scanner.documents;
    let [train, val] = scanner.splits;
    let (train, val) = (
        train.finish().map_err(out_err)?,
        val.finish().map_err(out_err)?,
    );
    if documents == 0 {
        user_bail!(
            "the .txt files under {} hold no documents (they are empty or only blank lines): add text",
            input.display()
        );
    }
    if val.documents == 0 {
        user_bail!(
            "no document went to the validation split ({documents} documents, --val-fraction \
             {val_fraction}): raise --val-fraction, or add documents (separate them with a blank line)"
        );
    }
    if train.documents == 0 {
        user_bail!(
            "every document went to the validation split ({documents} documents, --val-fraction \
             {val_fraction}): lower --val-fraction, or add documents (separate them with a blank line)"
        );
    }
    let manifest = Manifest {
        format: FORMAT,
        vocabulary: String::from_utf8_lossy(vocab::CHARS).into_owned(),
        bos_id: BOS,
        vocab_size: VOCAB_SIZE,
        train,
        val,
        val_fraction,
        seed,
        sources,
    };
    let path = staging.path().join(MANIFEST_FILE);
    let text = serde_json::to_string_pretty(&manifest)? + "\n";
    fs::File::create(&path)
        .and_then(|mut f| f.write_all(text.as_bytes()).and_then(|()| f.sync_all()))
        .map_err(|e| out_err(e.into()))?;
    staging.commit().map_err(out_err)?;
    Ok(manifest)
}

/// Every `*.txt` under `dir` with its `/`-separated path relative to `dir`, sorted by path.
fn find_inputs(dir: &Path) -> Result<Vec<(PathBuf, String)>> {
    if !dir.is_dir() {
        let what = if dir.exists() {
            "is not a directory"
        } else {
            "does not exist"
        };
        user_bail!(
            "--input {} {what}: give the directory that holds the .txt files",
            dir.display()
        );
    }
    let mut found = Vec::new();
    let mut visited = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(d) = pending.pop() {
        // A link back up the tree must not make the walk endless.
        let real = d
            .canonicalize()
            .with_context(|| format!("resolve {}", d.display()))?;
        if visited.contains(&real) {
            continue;
        }
        visited.push(real);
        for entry in fs::read_dir(&d).map_err(|e| input_error(&d, e))? {
            let entry = entry.with_context(|| format!("read {}", d.display()))?;
            if entry.file_name().to_string_lossy().starts_with('.') {
                continue;
            }
            let path = entry.path();
            // `metadata` follows links: a linked file or directory counts as what it points to.
            let meta = match fs::metadata(&path) {
                Ok(m) => m,
                Err(e) => user_bail!("{}: {e}; fix or remove it", path.display()),
            };
            if meta.is_dir() {
                pending.push(path);
            } else if meta.is_file() && path.extension().is_some_and(|e| e == "txt") {
                found.push(path);
            }
        }
    }
    if found.is_empty() {
        user_bail!(
            "no .txt files under {}: put the dataset's text files there (any depth; names \
             starting with '.' are skipped)",
            dir.display()
        );
    }
    found.sort();
    Ok(found
        .into_iter()
        .map(|path| {
            let rel = path.strip_prefix(dir).unwrap_or(&path);
            let rel = rel
                .components()
                .map(|c| c.as_os_str().to_string_lossy())
                .collect::<Vec<_>>()
                .join("/");
            (path, rel)
        })
        .collect())
}

/// Refuses to replace a directory unless `prepare`'s own manifest proves that `prepare` wrote
/// everything in it (an empty directory holds nothing to lose): anything else could be the
/// user's data, a lone `train.bin` included.
fn check_output(output: &Path, input: &Path) -> Result<()> {
    if output.exists() {
        if !output.is_dir() {
            user_bail!("--output {} is a file; give a directory", output.display());
        }
        let mut names = Vec::new();
        let entries = match fs::read_dir(output) {
            Ok(e) => e,
            Err(e) => user_bail!(
                "--output {} cannot be read: {e}; give a directory this user may read and write",
                output.display()
            ),
        };
        for entry in entries {
            names.push(entry?.file_name().to_string_lossy().into_owned());
        }
        names.sort();
        if let Some(foreign) = names.iter().find(|n| !OUTPUT_FILES.contains(&n.as_str())) {
            user_bail!(
                "--output {} holds {foreign}, which prepare did not write; to keep it safe nothing \
                 is replaced: give a new or empty directory",
                output.display()
            );
        }
        if !names.is_empty() {
            if let Err(why) = written_by_prepare(output) {
                user_bail!(
                    "--output {} holds {} but {why}, so prepare cannot tell that it wrote them; to \
                     keep them safe nothing is replaced: give a new or empty directory, or remove \
                     them yourself",
                    output.display(),
                    names.join(", ")
                );
            }
        }
    }
    if let (Ok(o), Ok(i)) = (output.canonicalize(), input.canonicalize()) {
        if i.starts_with(&o) {
            user_bail!(
                "--output {} contains --input; give a directory outside it",
                output.display()
            );
        }
    }
    Ok(())
}

/// Whether `dir`'s manifest is one `prepare` writes (of any format version) and its splits have
/// the sizes it records; otherwise why not.
fn written_by_prepare(dir: &Path) -> std::result::Result<(), String> {
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

/// A filesystem error while reading an input file: the input is at fault when it cannot be read.
fn input_error(path: &Path, e: std::io::Error) -> anyhow::Error {
    match e.kind() {
        // The fix depends on who this process is: a container's uid and gid are rarely the ones
        // that wrote the files.
        ErrorKind::PermissionDenied => {
            // SAFETY: getuid and getgid cannot fail and touch no memory.
            let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
            anyhow::Error::new(UserError(format!(
                "{}: permission denied for uid {uid} (gid {gid}): make it readable by that user \
                 or group (e.g. chmod a+r, or chgrp {gid} and chmod g+r; directories also need +x)",
                path.display()
            )))
        }
        kind => {
            let message = format!(
                "cannot read {}: {e}; make it readable or remove it",
                path.display()
            );
            if kind == ErrorKind::NotFound {
                anyhow::Error::new(UserError(message))
            } else {
                anyhow::anyhow!(message)
            }
        }
    }
}

/// Reads until `buf` is full or the file ends, so chunks have one size whatever the reads return.
fn read_full(file: &mut fs::File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match file.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// One split's output file, its buffer and counts.
struct Split {
    file: fs::File,
    path: PathBuf,
    buf: Vec<u8>,
    len: usize,
    tokens: u64,
    documents: u64,
}

impl Split {
    fn create(path: &Path) -> Result<Self> {
        let file = fs::File::create(path).with_context(|| format!("create {}", path.display()))?;
        Ok(Self {
            file,
            path: path.to_path_buf(),
            buf: vec![0; OUT_BUFFER],
            len: 0,
            tokens: 0,
            documents: 0,
        })
    }

    /// Makes sure `n` more tokens fit in the buffer.
    fn reserve(&mut self, n: usize) -> Result<()> {
        debug_assert!(n <= self.buf.len());
        if self.len + n > self.buf.len() {
            self.flush()?;
        }
        Ok(())
    }

    fn push(&mut self, id: u8) {
        self.buf[self.len] = id;
        self.len += 1;
        self.tokens += 1;
    }

    fn flush(&mut self) -> Result<()> {
        self.file
            .write_all(&self.buf[..self.len])
            .with_context(|| format!("write {}", self.path.display()))?;
        self.len = 0;
        Ok(())
    }

    fn finish(mut self) -> Result<SplitCounts> {
        self.flush()?;
        self.file
            .sync_all()
            .with_context(|| format!("sync {}", self.path.display()))?;
        Ok(SplitCounts {
            characters: self.tokens - self.documents,
            documents: self.documents,
            tokens: self.tokens,
        })
    }
}

/// The document structure across chunks and files.
struct Scanner {
    /// Train (0) and validation (1).
    splits: [Split; 2],
    /// The split of the open document.
    current: usize,
    /// Between documents: at the start of a file or after a blank line, before the next text.
    gap: bool,
    /// The last byte was a newline (or the file just started), so a newline now is a blank line.
    prev_newline: bool,
    /// Documents started so far, over all files: the next one's index.
    documents: u64,
    /// Document `i` goes to validation when `split_units.at(i) < val_fraction`.
    split_units: Units,
    val_fraction: f64,
}

impl Scanner {
    /// Translates a chunk into the splits. Returns the OR of all ids seen: its high bit is set
    /// when the chunk holds a byte outside the vocabulary (the caller then finds it), so the hot
    /// loop carries no error branch.
    fn scan(&mut self, chunk: &[u8]) -> Result<u8> {
        // A chunk yields at most one token per byte plus a BOS per document, and each document
        // but the first needs at least three bytes (text, newline, blank line).
        let worst = chunk.len() + chunk.len() / 3 + 2;
        for split in &mut self.splits {
            split.reserve(worst)?;
        }
        let mut seen = 0u8;
        let mut i = 0;
        while i < chunk.len() {
            if self.gap {
                match chunk[i..].iter().position(|&b| b != b'\n') {
                    Some(k) => i += k,
                    None => break,
                }
                self.start_document();
            }
            let split = &mut self.splits[self.current];
            let (used, ended) = copy_document(
                &chunk[i..],
                &mut split.buf[split.len..],
                &mut self.prev_newline,
                &mut seen,
            );
            let written = if ended { used - 1 } else { used };
            split.len += written;
            split.tokens += written as u64;
            i += used;
            if ended {
                self.gap = true;
            }
        }
        Ok(seen)
    }

    fn start_document(&mut self) {
        let to_val = self.split_units.at(self.documents) < self.val_fraction;
        self.current = to_val as usize;
        self.documents += 1;
        let split = &mut self.splits[self.current];
        split.push(BOS);
        split.documents += 1;
        self.gap = false;
        self.prev_newline = false;
    }

    /// A file's end ends its document, whose last line gets a newline if it lacks one.
    fn end_file(&mut self) -> Result<()> {
        if !self.gap {
            if !self.prev_newline {
                let split = &mut self.splits[self.current];
                split.reserve(1)?;
                split.push(NEWLINE);
            }
            self.gap = true;
        }
        self.prev_newline = true;
        Ok(())
    }
}

/// Copies a document's ids from `src` to `dst` until a blank line ends it or `src` ends. Returns
/// the bytes consumed and whether the document ended (then the last byte consumed is the blank
/// line's newline, which is not copied). Inside a document ids map one to one onto bytes, so the
/// loop is a table lookup, an OR and a store per byte with one rarely taken branch.
#[inline]
fn copy_document(
    src: &[u8],
    dst: &mut [u8],
    prev_newline: &mut bool,
    seen: &mut u8,
) -> (usize, bool) {
    assert!(dst.len() >= src.len(), "output buffer too small");
    let mut prev = *prev_newline;
    let mut acc = *seen;
    for (k, (&byte, out)) in src.iter().zip(dst.iter_mut()).enumerate() {
        let id = TABLE[byte as usize];
        acc |= id;
        let newline = id == NEWLINE;
        if newline & prev {
            *prev_newline = true;
            *seen = acc;
            return (k + 1, true);
        }
        *out = id;
        prev = newline;
    }
    *prev_newline = prev;
    *seen = acc;
    (src.len(), false)
}

/// The error for the invalid byte at `offset` of `path`, located as `line:column` (columns count
/// characters: every byte before the first invalid one is one ASCII character).
fn invalid_byte(path: &Path, offset: u64) -> anyhow::Error {
    match locate(path, offset) {
        Ok((line, column, here)) => {
            let hint = match here.first() {
                Some(b'\r') => {
                    " (Windows line endings: convert the file to \\n endings, e.g. with dos2unix)"
                }
                Some(0xEF) if offset == 0 && here.starts_with(&[0xEF, 0xBB, 0xBF]) => {
                    " (a byte-order mark: save the file as UTF-8 without BOM)"
                }
                Some(b'h' | b'b' | b'l') => " (the letters are uppercase: H, B, L)",
                _ => "",
            };
            anyhow::Error::new(UserError(format!(
                "{}:{line}:{column}: {} is not in the vocabulary{hint}; allowed: {}; remove or replace it",
                path.display(),
                vocab::describe_invalid(&here),
                vocab::ALLOWED
            )))
        }
        Err(e) => e.context(format!(
            "{} has a byte outside the vocabulary at offset {offset}",
            path.display()
        )),
    }
}

/// The line and column of byte `offset` of `path`, and up to 4 bytes from there.
fn locate(path: &Path, offset: u64) -> Result<(u64, u64, Vec<u8>)> {
    let mut file = fs::File::open(path).with_context(|| format!("open {}", path.display()))?;
    let (mut line, mut line_start, mut pos) = (1u64, 0u64, 0u64);
    let mut buf = vec![0u8; CHUNK];
    while pos < offset {
        let want = (offset - pos).min(CHUNK as u64) as usize;
        let n = read_full(&mut file, &mut buf[..want])?;
        if n == 0 {
            break;
        }
        for (i, _) in buf[..n].iter().enumerate().filter(|(_, &b)| b == b'\n') {
            line += 1;
            line_start = pos + i as u64 + 1;
        }
        pos += n as u64;
    }
    let mut here = vec![0u8; 4];
    let n = read_full(&mut file, &mut here)?;
    here.truncate(n);
    Ok((line, offset - line_start + 1, here))
}

/// The `*.txt` files under `input` as a manifest records them (path, size, SHA-256), read once
/// without preparing anything: what tells whether a prepared copy is of these files.
pub fn sources(input: &Path) -> Result<Vec<SourceFile>> {
    let mut chunk = vec![0u8; CHUNK];
    let mut out = Vec::new();
    for (path, rel) in find_inputs(input)? {
        let mut file = fs::File::open(&path).map_err(|e| input_error(&path, e))?;
        let mut hasher = Sha256::new();
        let mut bytes = 0u64;
        loop {
            let n = read_full(&mut file, &mut chunk).map_err(|e| input_error(&path, e))?;
            if n == 0 {
                break;
            }
            hasher.update(&chunk[..n]);
            bytes += n as u64;
        }
        out.push(SourceFile {
            path: rel,
            bytes,
            sha256: format!("{:x}", hasher.finalize()),
        });
    }
    Ok(out)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unreadable_input_is_the_users_to_fix_and_names_who_must_read_it() {
        let path = Path::new("/dataset/corpus/b.txt");
        let denied = input_error(path, std::io::Error::from(ErrorKind::PermissionDenied));
        assert_eq!(crate::sys::error::exit_code(&denied), 2);
        // SAFETY: as in `input_error`.
        let uid = unsafe { libc::getuid() };
        let text = denied.to_string();
        assert!(
            text.starts_with("/dataset/corpus/b.txt: permission denied for uid "),
            "{text}"
        );
        assert!(
            text.contains(&format!("uid {uid} ")) && text.contains("chmod"),
            "{text}"
        );
        // Other failures (a disk error) stay ordinary errors, still naming the file.
        let other = input_error(path, std::io::Error::other("I/O error"));
        assert_eq!(crate::sys::error::exit_code(&other), 1);
        assert!(other
            .to_string()
            .starts_with("cannot read /dataset/corpus/b.txt: I/O error"));
    }

    /// Runs the scanner over `text` cut into pieces of `piece` bytes, as files or chunks would.
    fn scan_pieces(texts: &[&str], piece: usize) -> (Vec<u8>, Vec<u8>, u64) {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Scanner {
            splits: [
                Split::create(&dir.path().join("t")).unwrap(),
                Split::create(&dir.path().join("v")).unwrap(),
            ],
            current: 0,
            gap: true,
            prev_newline: true,
            documents: 0,
            split_units: Units::new(0, &[STREAM_VAL_SPLIT]),
            val_fraction: 0.0,
        };
        for text in texts {
            for chunk in text.as_bytes().chunks(piece) {
                assert_eq!(s.scan(chunk).unwrap() & 0x80, 0);
            }
            s.end_file().unwrap();
        }
        let docs = s.documents;
        let [t, v] = s.splits;
        t.finish().unwrap();
        v.finish().unwrap();
        (
            fs::read(dir.path().join("t")).unwrap(),
            fs::read(dir.path().join("v")).unwrap(),
            docs,
        )
    }

    fn ids(text: &str) -> Vec<u8> {
        text.bytes()
            .map(|b| if b == b'^' { BOS } else { TABLE[b as usize] })
            .collect()
    }

    #[test]
    fn documents_are_split_on_blank_lines_whatever_the_chunking() {
        let cases: &[(&[&str], &str, u64)] = &[
            (&["1+1\n2\n\n3\n"], "^1+1\n2\n^3\n", 2),
            (&["\n\n1\n\n\n\n2\n\n\n"], "^1\n^2\n", 2),
            (&["1\n2", "3\n\n"], "^1\n2\n^3\n", 2),
            (&["", "\n\n", "5"], "^5\n", 1),
            (&["1\n", "2\n"], "^1\n^2\n", 2),
        ];
        for &(texts, want, docs) in cases {
            for piece in [1, 2, 3, 7, 1000] {
                let (train, val, n) = scan_pieces(texts, piece);
                assert_eq!(train, ids(want), "{texts:?} in pieces of {piece}");
                assert!(val.is_empty());
                assert_eq!(n, docs);
            }
        }
    }

    #[test]
    fn invalid_bytes_set_the_high_bit() {
        let mut seen = 0;
        let mut dst = [0u8; 8];
        let mut prev = false;
        copy_document(b"12\r\n", &mut dst, &mut prev, &mut seen);
        assert_ne!(seen & 0x80, 0);
        let mut seen = 0;
        copy_document(b"12+B\n", &mut dst, &mut prev, &mut seen);
        assert_eq!(seen & 0x80, 0);
    }
}
