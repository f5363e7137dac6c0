//! Helpers shared by the trainer's integration tests: run the real binary, make small datasets.
#![allow(dead_code)]

pub mod ranks;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Clears the variables a user's shell may hold that `run` and `launch` read besides their
/// CHARLM_ names (the seed's and torchrun's), so a test sees only what it sets.
pub fn without_seed_and_torchrun_variables(cmd: &mut Command) -> &mut Command {
    for name in [
        "WORLD_SIZE",
        "RANK",
        "DEPTH",
        "TRAINING_HOURS",
        "NPROC_PER_NODE",
        "DEVICE_BATCH_SIZE",
        "WANDB_RUN",
    ] {
        cmd.env_remove(name);
    }
    cmd
}

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
    let n = chars.to_string();
    let out = run(&[
        "generate",
        "--output",
        s(&raw),
        "--chars",
        &n,
        "--seed",
        "3",
    ]);
    assert!(out.status.success(), "generate: {}", stderr(&out));
    prepare(&raw, &data, "0.05", "0");
    data
}

/// 2 800 training characters, 20% held out: a depth-1 model (`tiny_train`) memorises them within
/// ~20 epochs (train bpc well below val bpc, val bpc rising), which the default early stop ends.
pub fn memorising_data(root: &Path) -> PathBuf {
    let (raw, data) = (root.join("raw"), root.join("data"));
    let out = run(&[
        "generate",
        "--output",
        s(&raw),
        "--chars",
        "3000",
        "--seed",
        "3",
    ]);
    assert!(out.status.success(), "generate: {}", stderr(&out));
    prepare(&raw, &data, "0.2", "0");
    data
}

/// `prepare --input raw --output data`, which must succeed.
pub fn prepare(raw: &Path, data: &Path, val_fraction: &str, seed: &str) {
    let out = run(&[
        "prepare",
        "--input",
        s(raw),
        "--output",
        s(data),
        "--val-fraction",
        val_fraction,
        "--seed",
        seed,
    ]);
    assert!(out.status.success(), "prepare: {}", stderr(&out));
}

/// `train` arguments for a tiny CPU model (depth 1, sequences of 32, 256 tokens a step, one
/// thread, no progress port, no evaluation); `extra` holds flag/value pairs that replace a
/// default or add to them.
pub fn tiny_train<'a>(data: &'a str, ckpt: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut pairs: Vec<(&str, &str)> = vec![
        ("--data", data),
        ("--depth", "1"),
        ("--seq-len", "32"),
        ("--device-batch-size", "4"),
        ("--total-batch-size", "256"),
        ("--device", "cpu"),
        ("--threads", "1"),
        ("--metrics-port", "0"),
        ("--checkpoint-dir", ckpt),
        ("--eval-every", "0"),
        ("--eval-tokens", "512"),
        ("--log-every", "1"),
    ];
    for kv in extra.chunks(2) {
        match pairs.iter_mut().find(|(k, _)| *k == kv[0]) {
            Some(pair) => pair.1 = kv[1],
            None => pairs.push((kv[0], kv[1])),
        }
    }
    std::iter::once("train")
        .chain(pairs.into_iter().flat_map(|(k, v)| [k, v]))
        .collect()
}

/// The JSON lines a command printed on stdout.
pub fn json_lines(out: &Output) -> Vec<serde_json::Value> {
    stdout(out)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}
