//! The document scanner of `prepare`: input bytes, chunk by chunk and file by file, into BOS +
//! ids of each document, each document in the split its index draws, buffered into the splits'
//! files.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use super::format::SplitCounts;
use crate::data::vocab::{BOS, NEWLINE, TABLE};
use crate::sys::rng::Units;

/// Each split's output buffer; written out when the next chunk might not fit.
const OUT_BUFFER: usize = 4 << 20;

/// One split's output file, its buffer and counts.
pub(super) struct Split {
    file: fs::File,
    path: PathBuf,
    buf: Vec<u8>,
    len: usize,
    tokens: u64,
    documents: u64,
}

impl Split {
    pub(super) fn create(path: &Path) -> Result<Self> {
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

    pub(super) fn finish(mut self) -> Result<SplitCounts> {
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
pub(super) struct Scanner {
    /// Train (0) and validation (1).
    pub(super) splits: [Split; 2],
    /// The split of the open document.
    pub(super) current: usize,
    /// Between documents: at the start of a file or after a blank line, before the next text.
    pub(super) gap: bool,
    /// The last byte was a newline (or the file just started), so a newline now is a blank line.
    pub(super) prev_newline: bool,
    /// Documents started so far, over all files: the next one's index.
    pub(super) documents: u64,
    /// Document `i` goes to validation when `split_units.at(i) < val_fraction`.
    pub(super) split_units: Units,
    pub(super) val_fraction: f64,
}

impl Scanner {
    /// Translates a chunk into the splits. Returns the OR of all ids seen: its high bit is set
    /// when the chunk holds a byte outside the vocabulary (the caller then finds it), so the hot
    /// loop carries no error branch.
    pub(super) fn scan(&mut self, chunk: &[u8]) -> Result<u8> {
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
    pub(super) fn end_file(&mut self) -> Result<()> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::rng::STREAM_VAL_SPLIT;

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
