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
use sha2::{Digest, Sha256};

use super::format::{
    written_by_prepare, Manifest, SourceFile, FORMAT, MANIFEST_FILE, TRAIN_FILE, VAL_FILE,
};
use super::scanner::{Scanner, Split};
use crate::data::vocab::{self, BOS, INVALID, TABLE, VOCAB_SIZE};
use crate::sys::error::UserError;
use crate::sys::rng::{Units, STREAM_VAL_SPLIT};
use crate::sys::staging::{write_error, StagingDir};
use crate::user_bail;

/// Every file `prepare` writes; an existing `--output` holding anything else is not replaced.
const OUTPUT_FILES: [&str; 3] = [TRAIN_FILE, VAL_FILE, MANIFEST_FILE];
/// Input is read in chunks this size: small enough that hashing and translating a chunk find it
/// still in L2 cache, large enough that system calls cost nothing.
const CHUNK: usize = 256 << 10;

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
}
