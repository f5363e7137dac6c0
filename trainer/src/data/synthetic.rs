//! The synthetic dataset of `charlm-trainer generate`, in the training format, for demos and tests.
//!
//! Each document is a worksheet of 1–8 exercises; an exercise is a question line and an answer
//! line, and documents are separated by one blank line. Kinds of exercise (their meaning is
//! consistent, so a model can learn it):
//! - `123+456` → `579`, `-12-7` → `-19` (integer sums and differences, up to 4 digits)
//! - `1.5+2.25` → `3.75`, `0.5-2.25` → `-1.75` (decimals; the answer has as many decimals as the
//!   longer operand)
//! - `B101+B11` → `B1000` (binary numbers carry a `B` prefix)
//! - `H64` → `32` (`H`: halve an even number)
//! - `L90210` → `5` (`L`: count the digits)
//!
//! Loss falls fast on the format and more slowly on the arithmetic: a good demo of learning. The
//! text is a pure function of `--seed` (its own RNG stream) and `--chars`.

use std::io::{BufWriter, Write};
use std::path::Path;

use anyhow::{Context, Result};

use crate::sys::rng::{Rng, STREAM_GENERATE};
use crate::sys::staging::{write_error, StagingDir};
use crate::user_bail;

/// Files are cut at this size so large datasets come as several files, like real ones.
const MAX_FILE_CHARS: u64 = 64 << 20;

/// Writes about `chars` characters of worksheets into `output`; returns the exact count.
pub fn generate(output: &Path, chars: u64, seed: u64) -> Result<u64> {
    if chars == 0 {
        user_bail!("--chars must be above 0");
    }
    if output.exists() && !is_generated(output)? {
        user_bail!(
            "--output {} exists and was not written by `generate`; choose a new directory",
            output.display()
        );
    }
    let fail = |e: anyhow::Error| write_error("--output", output, e);
    let staging = StagingDir::new(output).map_err(fail)?;
    let total = write_parts(staging.path(), chars, seed).map_err(fail)?;
    staging.commit().map_err(fail)?;
    Ok(total)
}

/// The worksheets' `part-NNNN.txt` files in `dir`; returns the characters written.
fn write_parts(dir: &Path, chars: u64, seed: u64) -> Result<u64> {
    let mut rng = Rng::stream(seed, &[STREAM_GENERATE]);
    let (mut total, mut part) = (0u64, 0u32);
    while total < chars {
        let path = dir.join(format!("part-{part:04}.txt"));
        let file =
            std::fs::File::create(&path).with_context(|| format!("create {}", path.display()))?;
        let mut out = BufWriter::new(file);
        let mut in_file = 0u64;
        let mut doc = String::new();
        while total < chars && in_file < MAX_FILE_CHARS {
            doc.clear();
            worksheet(&mut rng, &mut doc);
            if in_file > 0 {
                out.write_all(b"\n")?;
                in_file += 1;
                total += 1;
            }
            out.write_all(doc.as_bytes())?;
            in_file += doc.len() as u64;
            total += doc.len() as u64;
        }
        out.into_inner().map_err(|e| e.into_error())?.sync_all()?;
        part += 1;
    }
    Ok(total)
}

fn is_generated(dir: &Path) -> Result<bool> {
    for entry in std::fs::read_dir(dir)? {
        let name = entry?.file_name();
        let name = name.to_string_lossy();
        if !(name.starts_with("part-") && name.ends_with(".txt")) {
            return Ok(false);
        }
    }
    Ok(true)
}

/// One document: 1–8 exercises, each a question line and an answer line.
fn worksheet(rng: &mut Rng, doc: &mut String) {
    for _ in 0..rng.range(1, 8) {
        let (question, answer) = exercise(rng);
        doc.push_str(&question);
        doc.push('\n');
        doc.push_str(&answer);
        doc.push('\n');
    }
}

fn number(rng: &mut Rng, max_digits: i64) -> i64 {
    let digits = rng.range(1, max_digits) as u32;
    rng.range(0, 10i64.pow(digits) - 1)
}

fn signed(rng: &mut Rng, max_digits: i64) -> i64 {
    let n = number(rng, max_digits);
    if rng.below(4) == 0 {
        -n
    } else {
        n
    }
}

fn exercise(rng: &mut Rng) -> (String, String) {
    match rng.below(10) {
        0..=4 => {
            let (a, b) = (signed(rng, 4), number(rng, 4));
            if rng.below(2) == 0 {
                (format!("{a}+{b}"), (a + b).to_string())
            } else {
                (format!("{a}-{b}"), (a - b).to_string())
            }
        }
        5 | 6 => {
            let (da, db) = (rng.range(1, 2) as usize, rng.range(1, 2) as usize);
            let places = da.max(db);
            let (a, b) = (number(rng, 3), number(rng, 3));
            // Both operands in units of 10^-places.
            let (sa, sb) = (
                a * 10i64.pow((places - da) as u32),
                b * 10i64.pow((places - db) as u32),
            );
            if rng.below(3) == 0 {
                let q = format!("{}-{}", decimal(a, da), decimal(b, db));
                (q, decimal(sa - sb, places))
            } else {
                let q = format!("{}+{}", decimal(a, da), decimal(b, db));
                (q, decimal(sa + sb, places))
            }
        }
        7 => {
            let (a, b) = (rng.range(0, 255), rng.range(0, 255));
            (format!("B{a:b}+B{b:b}"), format!("B{:b}", a + b))
        }
        8 => {
            let n = number(rng, 5) * 2;
            (format!("H{n}"), (n / 2).to_string())
        }
        _ => {
            let n = number(rng, 8);
            (format!("L{n}"), n.to_string().len().to_string())
        }
    }
}

/// `value / 10^places` written with exactly `places` decimals.
fn decimal(value: i64, places: usize) -> String {
    let p = 10i64.pow(places as u32);
    let sign = if value < 0 { "-" } else { "" };
    let v = value.abs();
    format!("{sign}{}.{:0places$}", v / p, v % p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exercises_are_correct_and_in_the_vocabulary() {
        let mut rng = Rng::new(5);
        for _ in 0..2000 {
            let (q, a) = exercise(&mut rng);
            for c in q.bytes().chain(a.bytes()) {
                assert!(
                    crate::data::vocab::id_of(c).is_some() && c != b'\n',
                    "{q:?} {a:?}"
                );
            }
            if let Some(n) = q.strip_prefix('H') {
                assert_eq!(n.parse::<i64>().unwrap() / 2, a.parse::<i64>().unwrap());
            } else if let Some(n) = q.strip_prefix('L') {
                assert_eq!(n.len().to_string(), a);
            } else if let Some(bin) = q.strip_prefix('B') {
                let (x, y) = bin.split_once("+B").unwrap();
                let sum = i64::from_str_radix(x, 2).unwrap() + i64::from_str_radix(y, 2).unwrap();
                assert_eq!(format!("B{sum:b}"), a);
            } else if q.contains('.') {
                let i = q.find(['+', '-']).unwrap();
                let (x, y) = (
                    q[..i].parse::<f64>().unwrap(),
                    q[i + 1..].parse::<f64>().unwrap(),
                );
                let want = if &q[i..=i] == "+" { x + y } else { x - y };
                let places = q
                    .split(['+', '-'])
                    .map(|n| n.len() - n.find('.').unwrap() - 1);
                assert_eq!(
                    a.len() - a.find('.').unwrap() - 1,
                    places.max().unwrap(),
                    "{q} = {a}"
                );
                assert!((a.parse::<f64>().unwrap() - want).abs() < 1e-9, "{q} = {a}");
            } else {
                let i = q[1..].find(['+', '-']).unwrap() + 1;
                let (x, y) = (
                    q[..i].parse::<i64>().unwrap(),
                    q[i + 1..].parse::<i64>().unwrap(),
                );
                let want = if &q[i..=i] == "+" { x + y } else { x - y };
                assert_eq!(a, want.to_string(), "{q}");
            }
        }
    }

    #[test]
    fn deterministic_and_sized() {
        let root = tempfile::tempdir().unwrap();
        let (a, b) = (root.path().join("a"), root.path().join("b"));
        let n = generate(&a, 50_000, 9).unwrap();
        generate(&b, 50_000, 9).unwrap();
        assert!((50_000..50_100).contains(&n), "{n}");
        let read = |d: &Path| std::fs::read(d.join("part-0000.txt")).unwrap();
        assert_eq!(read(&a), read(&b));
        assert_eq!(read(&a).len() as u64, n);
        assert!(
            String::from_utf8(read(&a)).unwrap().contains("\n\n"),
            "blank lines between documents"
        );
        assert!(generate(&root.path().join("c"), 50_000, 10).is_ok());
        assert_ne!(read(&a), read(&root.path().join("c")));
    }
}
