//! Training, resuming, interrupting, sampling and benchmarking through the real binary, on CPU.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{json_lines, prepare, run, s, stderr, stdout, synthetic_data, tiny_train};

fn manifest(dir: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).unwrap()).unwrap()
}

fn last_step_loss(out: &std::process::Output) -> f64 {
    json_lines(out)
        .iter()
        .rev()
        .find(|v| v["event"] == "step")
        .and_then(|v| v["train_loss"].as_f64())
        .expect("a step line")
}

#[test]
fn a_tiny_model_overfits_a_tiny_dataset() {
    let root = tempfile::tempdir().unwrap();
    let raw = root.path().join("raw");
    std::fs::create_dir(&raw).unwrap();
    // Twelve short documents, seen again and again: the model must memorise them.
    let docs: String = (0..12)
        .map(|i| format!("{}+{}\n{}\n\n", i * 7, i * 3, i * 10))
        .collect();
    std::fs::write(raw.join("a.txt"), docs.repeat(3)).unwrap();
    let data = root.path().join("data");
    prepare(&raw, &data, "0.3", "1");
    let ckpt = root.path().join("ckpt");
    let out = run(&tiny_train(
        s(&data),
        s(&ckpt),
        &[
            "--depth",
            "2",
            "--seq-len",
            "16",
            "--total-batch-size",
            "64",
            "--max-steps",
            "250",
            "--embedding-lr",
            "0.05",
            // nanochat-2025's learning rates: the 2026 recipe scales them by √(batch/2¹⁹), tiny
            // at 64 tokens a step (what this test checks is that the model can memorise).
            "--recipe",
            "nanochat-2025",
        ],
    ));
    assert!(out.status.success(), "{}", stderr(&out));
    let first = json_lines(&out)
        .iter()
        .find(|v| v["event"] == "step")
        .unwrap()["train_loss"]
        .as_f64()
        .unwrap();
    let last = last_step_loss(&out);
    assert!(first > 3.0, "starts near ln(32): {first}");
    assert!(
        last < 0.6,
        "a 12-document dataset is memorised: loss {first} → {last}"
    );
}

#[test]
fn resuming_is_exact() {
    // 12 steps in one run versus 6 + resume + 6: identical weights, optimizer state and loss.
    // The schedule is made step-independent (warmdown 0, and no weight decay, whose cosine follows
    // the budget) because the first half must stop at step 6 while the whole run plans 12;
    // everything else (weights, Muon momentum and its warm-up, AdamW moments and step count,
    // data position) comes from the checkpoint.
    let root = tempfile::tempdir().unwrap();
    let data = synthetic_data(root.path(), 60_000);
    let (a, b) = (root.path().join("a"), root.path().join("b"));
    let flags = |steps| {
        [
            "--max-steps",
            steps,
            "--warmdown-ratio",
            "0",
            "--weight-decay",
            "0",
        ]
    };
    let whole = run(&tiny_train(s(&data), s(&a), &flags("12")));
    assert!(whole.status.success(), "{}", stderr(&whole));
    let half = run(&tiny_train(s(&data), s(&b), &flags("6")));
    assert!(half.status.success(), "{}", stderr(&half));
    let rest = run(&tiny_train(s(&data), s(&b), &flags("12")));
    assert!(rest.status.success(), "{}", stderr(&rest));
    assert!(stderr(&rest).contains("resumed from"), "{}", stderr(&rest));
    assert_eq!(
        json_lines(&rest)
            .iter()
            .filter(|v| v["event"] == "step")
            .count(),
        6
    );
    assert_eq!(
        last_step_loss(&whole),
        last_step_loss(&rest),
        "bitwise equal final loss"
    );
    let (ma, mb) = (
        manifest(&a.join("step-000000012")),
        manifest(&b.join("step-000000012")),
    );
    assert_eq!(
        ma["files"], mb["files"],
        "weights and optimizer state are bitwise identical"
    );
    assert_eq!(ma["sequences_consumed"], mb["sequences_consumed"]);
}

#[test]
fn sigterm_saves_a_checkpoint_and_exits_zero_then_training_resumes() {
    let root = tempfile::tempdir().unwrap();
    let data = synthetic_data(root.path(), 60_000);
    let ckpt = root.path().join("ckpt");
    let term = root.path().join("termination.json");
    let mut child = Command::new(common::bin())
        .args(tiny_train(
            s(&data),
            s(&ckpt),
            &["--hours", "1", "--termination-log", s(&term)],
        ))
        .env_remove("WORLD_SIZE")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    // Wait until a few steps ran, then interrupt as Kubernetes does.
    let steps_seen = lines
        .by_ref()
        .map_while(Result::ok)
        .filter(|l| l.contains("\"event\":\"step\""))
        .take(3)
        .count();
    assert_eq!(steps_seen, 3);
    let sent = Instant::now();
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().unwrap();
    assert!(status.success(), "exit {status:?}");
    assert!(
        sent.elapsed() < Duration::from_secs(30),
        "exited within the grace period"
    );
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(&term).unwrap()).unwrap();
    assert_eq!(report["complete"], false);
    let step = report["step"].as_i64().unwrap();
    assert!(step >= 3, "{report}");
    assert!(ckpt
        .join(format!("step-{step:09}"))
        .join("manifest.json")
        .exists());

    let more = run(&tiny_train(
        s(&data),
        s(&ckpt),
        &["--max-steps", &(step + 2).to_string()],
    ));
    assert!(more.status.success(), "{}", stderr(&more));
    assert!(stderr(&more).contains(&format!(
        "resumed from {}",
        ckpt.join(format!("step-{step:09}")).display()
    )));
    let steps: Vec<i64> = json_lines(&more)
        .iter()
        .filter(|v| v["event"] == "step")
        .map(|v| v["step"].as_i64().unwrap())
        .collect();
    assert_eq!(steps, vec![step + 1, step + 2], "the step count continues");
}

#[test]
fn a_damaged_newest_checkpoint_is_reported_and_the_previous_one_used() {
    let root = tempfile::tempdir().unwrap();
    let data = synthetic_data(root.path(), 60_000);
    let ckpt = root.path().join("ckpt");
    for steps in ["3", "5"] {
        let out = run(&tiny_train(s(&data), s(&ckpt), &["--max-steps", steps]));
        assert!(out.status.success(), "{}", stderr(&out));
    }
    let model = ckpt.join("step-000000005/model.safetensors");
    let len = std::fs::metadata(&model).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&model)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    let term = root.path().join("termination.json");
    let out = run(&tiny_train(
        s(&data),
        s(&ckpt),
        &["--max-steps", "6", "--termination-log", s(&term)],
    ));
    assert!(out.status.success(), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("step-000000005 is damaged") && err.contains("truncated"),
        "{err}"
    );
    // The report (termination log and /progress) says it too, for the operator.
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(&term).unwrap()).unwrap();
    assert_eq!(
        report["resumed_from"],
        ckpt.join("step-000000003").display().to_string(),
        "{report}"
    );
    let damaged = report["damaged_checkpoints"].as_array().expect("a list");
    assert_eq!(damaged.len(), 1, "{report}");
    assert_eq!(
        damaged[0]["path"],
        ckpt.join("step-000000005").display().to_string()
    );
    assert_eq!(
        damaged[0]["set_aside_as"],
        ckpt.join("step-000000005.damaged").display().to_string()
    );
    assert!(
        damaged[0]["error"].as_str().unwrap().contains("truncated"),
        "{report}"
    );
    assert!(
        err.contains("resumed from") && err.contains("step-000000003"),
        "{err}"
    );
    assert!(
        ckpt.join("step-000000005.damaged").exists(),
        "kept aside for inspection"
    );
    assert!(ckpt.join("step-000000006").exists());
}

#[test]
fn sampling_prints_only_vocabulary_characters() {
    let root = tempfile::tempdir().unwrap();
    let data = synthetic_data(root.path(), 60_000);
    let ckpt = root.path().join("ckpt");
    let out = run(&tiny_train(s(&data), s(&ckpt), &["--max-steps", "20"]));
    assert!(out.status.success(), "{}", stderr(&out));
    for prompt in ["", "12+3", "H4\n", "B1"] {
        let out = run(&[
            "sample",
            "--checkpoint",
            s(&ckpt),
            "--prompt",
            prompt,
            "--max-tokens",
            "64",
            "--device",
            "cpu",
            "--seed",
            "3",
            "--num-samples",
            "2",
            "--top-k",
            "8",
        ]);
        assert!(out.status.success(), "{}", stderr(&out));
        let text = stdout(&out);
        assert!(text.starts_with(prompt));
        for c in text.chars() {
            assert!("0123456789+-HBL.\n".contains(c), "{c:?} in {text:?}");
        }
    }
    let greedy = |seed: &str| {
        stdout(&run(&[
            "sample",
            "--checkpoint",
            s(&ckpt),
            "--prompt",
            "7",
            "--temperature",
            "0",
            "--seed",
            seed,
            "--device",
            "cpu",
        ]))
    };
    assert_eq!(greedy("1"), greedy("2"), "temperature 0 is deterministic");
    let bad = run(&[
        "sample",
        "--checkpoint",
        s(&ckpt),
        "--prompt",
        "1+x",
        "--device",
        "cpu",
    ]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(
        stderr(&bad).contains("'x' at character 3"),
        "{}",
        stderr(&bad)
    );
    let missing = run(&[
        "sample",
        "--checkpoint",
        s(&root.path().join("nope")),
        "--device",
        "cpu",
    ]);
    assert_eq!(missing.status.code(), Some(2), "{}", stderr(&missing));
}

#[test]
fn bench_prints_one_json_line_with_the_anchor_fields() {
    let out = run(&[
        "bench",
        "--depth",
        "1",
        "--device-batch-size",
        "2",
        "--seq-len",
        "32",
        "--steps",
        "2",
        "--warmup",
        "1",
        "--accum",
        "2",
        "--device",
        "cpu",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 1, "{lines:?}");
    let v: serde_json::Value = serde_json::from_str(lines[0]).unwrap();
    for field in ["tokens_per_s", "mfu", "step_ms", "params"] {
        assert!(v[field].as_f64().is_some_and(|x| x > 0.0), "{field} in {v}");
    }
    assert!(v["peak_gib"].is_null(), "no GPU, no peak: {v}");
    assert_eq!(v["device"], "cpu");
    assert_eq!(v["params"], 2 * 32 * 64 + 4 * 64 * 128 + 8 * 64 * 64);
}

#[test]
fn impossible_settings_fail_with_the_fix() {
    let root = tempfile::tempdir().unwrap();
    let data = synthetic_data(root.path(), 20_000);
    let ckpt = root.path().join("ckpt");
    let out = run(&tiny_train(
        s(&data),
        s(&ckpt),
        &["--max-steps", "2", "--total-batch-size", "100"],
    ));
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("try 128"), "{}", stderr(&out));
    let out = run(&tiny_train(s(&data), s(&ckpt), &[]));
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("--hours"), "{}", stderr(&out));
    let out = run(&tiny_train(
        s(&data),
        s(&ckpt),
        &[
            "--max-steps",
            "1",
            "--seq-len",
            "100000",
            "--total-batch-size",
            "400000",
        ],
    ));
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("--seq-len"), "{}", stderr(&out));
}
