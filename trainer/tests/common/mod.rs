//! Helpers shared by the trainer's integration tests: run the real binary, make small datasets.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_charlm-trainer")
}

/// Runs the trainer with `args`; returns its output whatever the exit code.
pub fn run(args: &[&str]) -> Output {
    Command::new(bin())
        .args(args)
        .env_remove("WORLD_SIZE")
        .output()
        .expect("start charlm-trainer")
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// `generate` + `prepare` of `chars` synthetic characters under `root`; returns the data dir.
pub fn synthetic_data(root: &Path, chars: u64) -> PathBuf {
    let (raw, data) = (root.join("raw"), root.join("data"));
    let out = run(&[
        "generate",
        "--output",
        s(&raw),
        "--chars",
        &chars.to_string(),
        "--seed",
        "3",
    ]);
    assert!(out.status.success(), "generate: {}", stderr(&out));
    let out = run(&[
        "prepare",
        "--input",
        s(&raw),
        "--output",
        s(&data),
        "--val-fraction",
        "0.05",
    ]);
    assert!(out.status.success(), "prepare: {}", stderr(&out));
    data
}

/// The JSON lines a command printed on stdout.
pub fn json_lines(out: &Output) -> Vec<serde_json::Value> {
    stdout(out)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}
