//! `prepare` and `generate` end to end: every class of bad input, the layout and split of good
//! input, reproducibility, and the safety of --output; one test runs the real binary.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use charlm_trainer::data::format::{self, Manifest};
use charlm_trainer::data::prepare;
use charlm_trainer::data::synthetic as generate;
use charlm_trainer::data::vocab;
use charlm_trainer::sys::error::exit_code;
use charlm_trainer::sys::rng::{self, STREAM_VAL_SPLIT};
use sha2::{Digest, Sha256};

const FIX: &str = "allowed: 0-9 + - H B L . and newline; remove or replace it";

fn write(root: &Path, rel: &str, content: impl AsRef<[u8]>) -> PathBuf {
    let path = root.join(rel);
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(&path, content).unwrap();
    path
}

/// Every file under `dir`, relative path → bytes.
fn snapshot(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(d) = pending.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                pending.push(p);
            } else {
                let rel = p.strip_prefix(dir).unwrap().to_string_lossy().into_owned();
                out.push((rel, fs::read(&p).unwrap()));
            }
        }
    }
    out.sort();
    out
}

fn names(dir: &Path) -> Vec<String> {
    let mut n: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    n.sort();
    n
}

/// The user error of a failed prepare, checked to exit with code 2.
fn user_error(result: anyhow::Result<Manifest>) -> String {
    let err = result.expect_err("prepare should fail");
    assert_eq!(exit_code(&err), 2, "not a user error: {err:#}");
    format!("{err:#}")
}

/// Splits a token stream into documents (each without its BOS).
fn documents(tokens: &[u8]) -> Vec<String> {
    assert!(
        tokens.is_empty() || tokens[0] == vocab::BOS,
        "starts with BOS"
    );
    tokens
        .split(|&t| t == vocab::BOS)
        .skip(1)
        .map(vocab::decode)
        .collect()
}

#[test]
fn every_byte_outside_the_vocabulary_is_reported_with_its_place_and_the_fix() {
    let cases: &[(&str, &[u8], u64, u64, &str)] = &[
        ("cr.txt", b"12+3\r\n15\n", 1, 5, "'\\r' (U+000D)"),
        ("lower.txt", b"1+1\n2\n\n3a\n", 4, 2, "'a'"),
        ("utf8.txt", "1\n22é\n".as_bytes(), 2, 3, "'é' (U+00E9)"),
        ("emoji.txt", "1\n\n\n7😀".as_bytes(), 4, 2, "'😀' (U+1F600)"),
        ("nul.txt", b"12\n\0\n", 2, 1, "'\\0' (U+0000)"),
        ("latin1.txt", b"1\n2\xff3\n", 2, 2, "byte 0xFF (not UTF-8)"),
        ("space.txt", b"1 + 1\n", 1, 2, "' ' (U+0020)"),
        ("tab.txt", b"1\n\t2\n", 2, 1, "'\\t' (U+0009)"),
        (
            "bom.txt",
            "\u{feff}1+1\n".as_bytes(),
            1,
            1,
            "'\\u{feff}' (U+FEFF)",
        ),
        ("nolf.txt", b"1\n2=", 2, 2, "'='"),
    ];
    let root = tempfile::tempdir().unwrap();
    for &(name, content, line, column, shown) in cases {
        let input = root.path().join(name.replace(".txt", ""));
        let path = write(&input, name, content);
        let out = root.path().join("out");
        let msg = user_error(prepare::prepare(&input, &out, 0.5, 0));
        let want = format!(
            "{}:{line}:{column}: {shown} is not in the vocabulary",
            path.display()
        );
        assert!(msg.starts_with(&want), "{name}: {msg}\nwant: {want}");
        assert!(msg.ends_with(FIX), "{name}: {msg}");
        assert!(!out.exists(), "{name}: nothing is left in --output");
        assert!(
            !names(root.path()).iter().any(|n| n.starts_with('.')),
            "no staging left"
        );
    }
    let msg = user_error(prepare::prepare(
        &root.path().join("cr"),
        &root.path().join("o"),
        0.5,
        0,
    ));
    assert!(msg.contains("Windows line endings"), "{msg}");
    let msg = user_error(prepare::prepare(
        &root.path().join("bom"),
        &root.path().join("o"),
        0.5,
        0,
    ));
    assert!(msg.contains("byte-order mark"), "{msg}");
}

#[test]
fn places_are_exact_deep_in_big_files_and_in_later_files() {
    let root = tempfile::tempdir().unwrap();
    let input = root.path().join("in");
    // Lines of 7 bytes; 'é' straddles every plausible chunk boundary (its first byte at 2^18 - 1).
    let line = b"123+45\n";
    let start = (1 << 18) - 1;
    let mut text: Vec<u8> = line.iter().copied().cycle().take(start).collect();
    let (want_line, want_col) = (start as u64 / 7 + 1, start as u64 % 7 + 1);
    text.extend_from_slice("é\n".as_bytes());
    text.extend(line.iter().cycle().take(1 << 20));
    write(&input, "a.txt", b"1\n\n2\n");
    let big = write(&input, "sub/deeper/b.txt", &text);
    let msg = user_error(prepare::prepare(&input, &root.path().join("out"), 0.5, 0));
    let want = format!(
        "{}:{want_line}:{want_col}: 'é' (U+00E9) is not in the vocabulary",
        big.display()
    );
    assert!(msg.starts_with(&want), "{msg}\nwant: {want}");

    // A bad byte after many clean chunks, in the last file.
    let mut text: Vec<u8> = line.iter().copied().cycle().take(7 * 300_000).collect();
    text.extend_from_slice(b"12\r\n");
    fs::write(&big, &text).unwrap();
    let msg = user_error(prepare::prepare(&input, &root.path().join("out"), 0.5, 0));
    assert!(
        msg.starts_with(&format!("{}:300001:3: '\\r'", big.display())),
        "{msg}"
    );
}

#[test]
fn missing_or_empty_input_and_empty_splits_name_the_fix() {
    let root = tempfile::tempdir().unwrap();
    let out = root.path().join("out");
    let msg = user_error(prepare::prepare(&root.path().join("nope"), &out, 0.5, 0));
    assert!(msg.contains("does not exist"), "{msg}");

    let input = root.path().join("in");
    fs::create_dir(&input).unwrap();
    let msg = user_error(prepare::prepare(&input, &out, 0.5, 0));
    assert!(
        msg.contains("no .txt files under") && msg.contains("put the"),
        "{msg}"
    );
    write(&input, "notes.md", "1\n");
    write(&input, ".hidden.txt", "1\n");
    write(&input, ".git/x.txt", "1\n");
    let msg = user_error(prepare::prepare(&input, &out, 0.5, 0));
    assert!(msg.contains("no .txt files under"), "{msg}");

    write(&input, "empty.txt", "");
    write(&input, "blank.txt", "\n\n\n");
    let msg = user_error(prepare::prepare(&input, &out, 0.5, 0));
    assert!(
        msg.contains("hold no documents") && msg.contains("add text"),
        "{msg}"
    );

    write(&input, "one.txt", "1+1\n2\n");
    let msg = user_error(prepare::prepare(&input, &out, 0.01, 0));
    assert!(
        msg.contains("no document went to the validation split"),
        "{msg}"
    );
    assert!(msg.contains("raise --val-fraction"), "{msg}");
    let msg = user_error(prepare::prepare(&input, &out, 0.99, 0));
    assert!(
        msg.contains("every document went to the validation split"),
        "{msg}"
    );
    for bad in [0.0, 1.0, -0.5, f64::NAN] {
        let msg = user_error(prepare::prepare(&input, &out, bad, 0));
        assert!(msg.contains("--val-fraction must be"), "{msg}");
    }
    assert!(!out.exists());
    assert_eq!(names(root.path()), ["in"], "nothing left beside the output");
}

#[test]
fn documents_split_on_blank_lines_and_go_whole_to_one_split() {
    let root = tempfile::tempdir().unwrap();
    let input = root.path().join("in");
    write(&input, "b.txt", "\n\n1+1\n2\n\n\n\n3-1\n2\n\nH4\n2"); // leading blanks, 3 blank lines, no final newline
    write(&input, "a/z.txt", "L123\n3\n\n");
    write(&input, "a/deeper/y.txt", "B1+B1\nB10\n");
    write(&input, "c.txt", "\n");
    write(&input, "c.md", "ignored\n");
    // Sorted by path: a/deeper/y.txt, a/z.txt, b.txt, c.txt.
    let want_docs = [
        "B1+B1\nB10\n",
        "L123\n3\n",
        "1+1\n2\n",
        "3-1\n2\n",
        "H4\n2\n",
    ];
    let out = root.path().join("out");
    let (f, seed) = (0.4, 3);
    let m = prepare::prepare(&input, &out, f, seed).unwrap();

    let is_val: Vec<bool> = (0..want_docs.len() as u64)
        .map(|i| rng::unit(seed, &[STREAM_VAL_SPLIT, i]) < f)
        .collect();
    assert!(
        is_val.contains(&true) && is_val.contains(&false),
        "seed picks both splits"
    );
    let pick = |val: bool| -> Vec<String> {
        want_docs
            .iter()
            .zip(&is_val)
            .filter(|(_, &v)| v == val)
            .map(|(d, _)| d.to_string())
            .collect()
    };
    let train = fs::read(out.join("train.bin")).unwrap();
    let val = fs::read(out.join("val.bin")).unwrap();
    assert_eq!(documents(&train), pick(false));
    assert_eq!(documents(&val), pick(true));

    let chars = |docs: &[String]| docs.iter().map(|d| d.len() as u64).sum::<u64>();
    assert_eq!(m.train.documents, pick(false).len() as u64);
    assert_eq!(m.train.characters, chars(&pick(false)));
    assert_eq!(m.train.tokens, train.len() as u64);
    assert_eq!(m.val.tokens, m.val.characters + m.val.documents);
    assert_eq!(m.val.tokens, val.len() as u64);
    assert_eq!(
        (m.val_fraction, m.seed, m.format),
        (f, seed, format::FORMAT)
    );
    assert_eq!((m.bos_id, m.vocab_size), (17, 32));
    assert_eq!(m.vocabulary, "0123456789+-HBL.\n");

    let paths: Vec<&str> = m.sources.iter().map(|s| s.path.as_str()).collect();
    assert_eq!(paths, ["a/deeper/y.txt", "a/z.txt", "b.txt", "c.txt"]);
    for s in &m.sources {
        let bytes = fs::read(input.join(&s.path)).unwrap();
        assert_eq!(s.bytes, bytes.len() as u64);
        assert_eq!(s.sha256, format!("{:x}", Sha256::digest(&bytes)));
    }
    let on_disk: Manifest =
        serde_json::from_str(&fs::read_to_string(out.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(on_disk, m);
    assert_eq!(format::read_manifest(&out).unwrap(), m);
    assert_eq!(names(&out), ["manifest.json", "train.bin", "val.bin"]);
}

#[test]
fn same_input_same_bytes_and_the_seed_alone_picks_the_split() {
    let root = tempfile::tempdir().unwrap();
    let input = root.path().join("in");
    let text: String = (0..3000)
        .map(|i| format!("{i}+{i}\n{}\n\n", 2 * i))
        .collect();
    write(&input, "x/part.txt", &text);
    write(&input, "y.txt", &text[..text.len() / 2]);
    let run = |out: &str, seed| {
        prepare::prepare(&input, &root.path().join(out), 0.1, seed).unwrap();
        snapshot(&root.path().join(out))
    };
    let first = run("a", 7);
    assert_eq!(run("b", 7), first, "byte-identical in another directory");
    assert_eq!(run("a", 7), first, "and when replacing itself");
    let other = run("c", 8);
    assert_ne!(other, first, "another seed, another split");

    let m = format::read_manifest(&root.path().join("a")).unwrap();
    let all = m.train.documents + m.val.documents;
    assert!(all > 4000, "{all}");
    assert!(
        (all * 8 / 100..=all * 12 / 100).contains(&m.val.documents),
        "about 10%: {} of {all}",
        m.val.documents
    );
    // Whole documents, and together the two splits hold every document exactly once.
    let mut seen: Vec<String> = ["train.bin", "val.bin"]
        .iter()
        .flat_map(|f| documents(&fs::read(root.path().join("a").join(f)).unwrap()))
        .collect();
    seen.sort();
    let mut want: Vec<String> = text
        .split("\n\n")
        .chain(text[..text.len() / 2].split("\n\n"))
        .filter(|d| !d.is_empty())
        .map(|d| format!("{}\n", d.trim_end_matches('\n')))
        .collect();
    assert_eq!(want.len() as u64, all);
    want.sort();
    assert_eq!(seen, want);
}

#[test]
fn errors_never_touch_a_good_output_and_foreign_directories_are_refused() {
    let root = tempfile::tempdir().unwrap();
    let input = root.path().join("in");
    let text: String = (0..200).map(|i| format!("{i}\n\n")).collect();
    write(&input, "a.txt", &text);
    let out = root.path().join("out");
    prepare::prepare(&input, &out, 0.2, 0).unwrap();
    let good = snapshot(&out);

    write(&input, "b.txt", "1\n2\r\n");
    let msg = user_error(prepare::prepare(&input, &out, 0.2, 0));
    assert!(msg.contains("b.txt:2:2"), "{msg}");
    assert_eq!(snapshot(&out), good, "the old dataset is untouched");
    assert_eq!(
        names(root.path()),
        ["in", "out"],
        "no staging directory left"
    );

    // A good run replaces it, leaving nothing beside it.
    write(&input, "b.txt", "1\n2\n");
    prepare::prepare(&input, &out, 0.2, 0).unwrap();
    assert_ne!(snapshot(&out), good);
    assert_eq!(names(root.path()), ["in", "out"]);

    let foreign = root.path().join("mine");
    write(&foreign, "thesis.tex", "precious");
    let msg = user_error(prepare::prepare(&input, &foreign, 0.2, 0));
    assert!(
        msg.contains("thesis.tex, which prepare did not write"),
        "{msg}"
    );
    assert_eq!(
        snapshot(&foreign),
        [("thesis.tex".to_string(), b"precious".to_vec())]
    );

    let msg = user_error(prepare::prepare(&input, root.path(), 0.2, 0));
    assert!(msg.contains("which prepare did not write") || msg.contains("contains --input"));
    let empty = root.path().join("empty");
    fs::create_dir(&empty).unwrap();
    prepare::prepare(&input, &empty, 0.2, 0).unwrap();
}

#[cfg(unix)]
#[test]
fn links_are_followed_once_and_hidden_entries_skipped() {
    let root = tempfile::tempdir().unwrap();
    let input = root.path().join("in");
    // A ConfigMap volume: visible links into a hidden timestamped directory.
    let text: String = (0..20).map(|i| format!("{i}\n\n")).collect();
    write(&input, "..2026_01_01/a.txt", &text);
    std::os::unix::fs::symlink("..2026_01_01", input.join("..data")).unwrap();
    std::os::unix::fs::symlink("..data/a.txt", input.join("a.txt")).unwrap();
    std::os::unix::fs::symlink(&input, input.join("loop")).unwrap();
    let m = prepare::prepare(&input, &root.path().join("out"), 0.5, 1).unwrap();
    let paths: Vec<&str> = m.sources.iter().map(|s| s.path.as_str()).collect();
    assert_eq!(paths, ["a.txt"], "{paths:?}");
    assert_eq!(m.train.documents + m.val.documents, 20, "read once");
}

#[test]
fn generated_data_is_deterministic_vocabulary_only_and_prepares_cleanly() {
    let root = tempfile::tempdir().unwrap();
    let (a, b, c) = (
        root.path().join("a"),
        root.path().join("b"),
        root.path().join("c"),
    );
    let n = generate::generate(&a, 300_000, 4).unwrap();
    generate::generate(&b, 300_000, 4).unwrap();
    generate::generate(&c, 300_000, 5).unwrap();
    assert!((300_000..300_400).contains(&n), "{n}");
    let files = snapshot(&a);
    assert_eq!(files, snapshot(&b));
    assert_ne!(files, snapshot(&c));
    let total: usize = files.iter().map(|(_, f)| f.len()).sum();
    assert_eq!(total as u64, n);
    for (name, bytes) in &files {
        assert!(
            name.starts_with("part-") && name.ends_with(".txt"),
            "{name}"
        );
        assert!(vocab::encode(bytes).is_ok(), "{name} is vocabulary only");
        let text = std::str::from_utf8(bytes).unwrap();
        assert!(text.ends_with('\n') && !text.ends_with("\n\n") && !text.starts_with('\n'));
        assert!(!text.contains("\n\n\n"), "one blank line between documents");
    }
    let text = std::str::from_utf8(&files[0].1).unwrap();
    for kind in ["H", "B", "L", ".", "+", "-"] {
        assert!(text.contains(kind), "exercises use {kind}");
    }

    // Every character survives prepare; blank lines become BOS.
    let m = prepare::prepare(&a, &root.path().join("data"), 0.05, 0).unwrap();
    let docs = m.train.documents + m.val.documents;
    assert_eq!(m.train.characters + m.val.characters, n - (docs - 1));

    // A directory that `generate` did not write is not replaced.
    let msg = user_error(generate::generate(&root.path().join("data"), 100, 1).map(|_| m));
    assert!(msg.contains("was not written by `generate`"), "{msg}");
}

#[test]
fn the_binary_exits_2_with_the_message_on_bad_input_and_0_on_good() {
    let bin = env!("CARGO_BIN_EXE_charlm-trainer");
    let root = tempfile::tempdir().unwrap();
    let input = root.path().join("in");
    let bad = write(&input, "sub/bad.txt", "1+1\n2\n\n3+3\r\n6\n");
    let out = root.path().join("out");
    let run = |args: &[&str]| Command::new(bin).args(args).output().unwrap();
    let (i, o) = (input.to_str().unwrap(), out.to_str().unwrap());

    let res = run(&["prepare", "--input", i, "--output", o]);
    let stderr = String::from_utf8_lossy(&res.stderr);
    assert_eq!(res.status.code(), Some(2), "{stderr}");
    let want = format!(
        "error: {}:4:4: '\\r' (U+000D) is not in the vocabulary",
        bad.display()
    );
    assert!(stderr.starts_with(&want), "{stderr}\nwant: {want}");
    assert!(stderr.trim_end().ends_with(FIX), "{stderr}");
    assert!(!out.exists());

    let raw = root.path().join("raw");
    let res = run(&[
        "generate",
        "--output",
        raw.to_str().unwrap(),
        "--chars",
        "20000",
        "--seed",
        "2",
    ]);
    assert_eq!(
        res.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&res.stderr)
    );
    let res = run(&[
        "prepare",
        "--input",
        raw.to_str().unwrap(),
        "--output",
        o,
        "--val-fraction",
        "0.1",
        "--seed",
        "5",
    ]);
    let stderr = String::from_utf8_lossy(&res.stderr);
    assert_eq!(res.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("prepared 1 files"), "{stderr}");
    let m = format::read_manifest(&out).unwrap();
    assert_eq!((m.val_fraction, m.seed), (0.1, 5));

    let res = run(&[
        "prepare",
        "--input",
        i,
        "--output",
        o,
        "--val-fraction",
        "2",
    ]);
    assert_eq!(res.status.code(), Some(2));
    assert_eq!(
        format::read_manifest(&out).unwrap(),
        m,
        "the good output survives"
    );
}
