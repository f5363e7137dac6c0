//! What the trainer does for its user (issue 8): an automatic micro-batch under a memory limit,
//! the best checkpoint kept apart, early stopping, epochs in the logs, TensorBoard event files.

mod common;

use charlm_trainer::engine::memory::estimate_bytes;
use charlm_trainer::model::GptConfig;
use common::{json_lines, run, s, stderr, synthetic_data, tiny_train};
use std::process::Command;
use tch::Kind;

#[test]
fn auto_micro_batch_fits_an_injected_memory_limit_and_keeps_the_total_batch() {
    let root = tempfile::tempdir().unwrap();
    let data = synthetic_data(root.path(), 40_000);
    let config = GptConfig::new(1, 32);
    let gib = |bytes: u64| bytes as f64 / (1u64 << 30) as f64;
    // 256 tokens per step at seq len 32 is 8 sequences: candidates 8, 4, 2, 1.
    for want in [8i64, 4, 2, 1] {
        let fits = estimate_bytes(&config, want, Kind::Float);
        let next = estimate_bytes(&config, want * 2, Kind::Float);
        let limit = gib((fits + next) / 2);
        let ckpt = root.path().join(format!("c{want}"));
        let out = Command::new(common::bin())
            .args(tiny_train(
                s(&data),
                s(&ckpt),
                &[
                    "--device-batch-size",
                    "auto",
                    "--max-steps",
                    "2",
                    "--eval-every",
                    "0",
                ],
            ))
            .env("CHARLM_MEMORY_LIMIT_GIB", format!("{limit}"))
            .output()
            .unwrap();
        let err = stderr(&out);
        assert!(out.status.success(), "{err}");
        assert!(
            err.contains(&format!("micro-batch auto: {want} sequences")),
            "{err}"
        );
        let accum = 8 / want;
        assert!(
            err.contains(&format!(
                "256 tokens/step = 1 ranks × {accum} accum × {want} seqs"
            )),
            "{err}"
        );
    }
    let too_small = gib(estimate_bytes(&config, 1, Kind::Float) / 2);
    let out = Command::new(common::bin())
        .args(tiny_train(
            s(&data),
            s(&root.path().join("none")),
            &["--device-batch-size", "auto", "--max-steps", "1"],
        ))
        .env("CHARLM_MEMORY_LIMIT_GIB", format!("{too_small}"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("does not fit in memory even with a micro-batch of 1"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn the_best_checkpoint_survives_pruning_and_holds_the_best_bpc() {
    let root = tempfile::tempdir().unwrap();
    let data = synthetic_data(root.path(), 60_000);
    let ckpt = root.path().join("ckpt");
    let out = run(&tiny_train(
        s(&data),
        s(&ckpt),
        &[
            "--device-batch-size",
            "8",
            "--max-steps",
            "12",
            "--eval-every",
            "3",
            "--checkpoint-every-minutes",
            "0",
            "--keep-checkpoints",
            "1",
        ],
    ));
    assert!(out.status.success(), "{}", stderr(&out));
    let evals: Vec<(i64, f64)> = json_lines(&out)
        .iter()
        .filter(|v| v["event"] == "eval")
        .map(|v| (v["step"].as_i64().unwrap(), v["val_bpc"].as_f64().unwrap()))
        .collect();
    assert_eq!(
        evals.iter().map(|e| e.0).collect::<Vec<_>>(),
        vec![3, 6, 9, 12]
    );
    let best = evals
        .iter()
        .cloned()
        .fold((0, f64::INFINITY), |a, b| if b.1 < a.1 { b } else { a });
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(ckpt.join("best/manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["step"], best.0);
    assert_eq!(manifest["val_bpc"].as_f64().unwrap(), best.1);
    let rolling: Vec<String> = std::fs::read_dir(&ckpt)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("step-"))
        .collect();
    assert_eq!(
        rolling,
        vec!["step-000000012"],
        "one rolling checkpoint kept, best/ besides"
    );
    let end = json_lines(&out)
        .into_iter()
        .find(|v| v["event"] == "end")
        .unwrap();
    assert_eq!(end["progress"]["best_val_bpc"].as_f64().unwrap(), best.1);
    assert_eq!(end["progress"]["best_step"], best.0);
    // Epochs in the logs: tokens per epoch and a fractional epoch that grows.
    let steps: Vec<serde_json::Value> = json_lines(&out)
        .into_iter()
        .filter(|v| v["event"] == "step")
        .collect();
    let per_epoch = steps[0]["tokens_per_epoch"].as_u64().unwrap();
    assert!(per_epoch > 10_000, "{per_epoch}");
    let epoch = steps[11]["epoch"].as_f64().unwrap();
    assert!(
        (epoch - 12.0 * 256.0 / per_epoch as f64).abs() < 0.01,
        "epoch {epoch}"
    );
}

#[test]
fn early_stop_ends_a_training_that_no_longer_improves_and_it_stays_ended() {
    let root = tempfile::tempdir().unwrap();
    let data = common::memorising_data(root.path());
    let ckpt = root.path().join("ckpt");
    let mut args = tiny_train(
        s(&data),
        s(&ckpt),
        &["--max-steps", "600", "--eval-every", "10"],
    );
    let term = root.path().join("term.json");
    args.extend_from_slice(&["--termination-log", s(&term)]);
    let out = run(&args);
    assert!(out.status.success(), "{}", stderr(&out));
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(&term).unwrap()).unwrap();
    assert_eq!(report["complete"], true);
    assert_eq!(report["stop_reason"], "early_stop");
    let step = report["step"].as_i64().unwrap();
    assert!(
        step < 600 && report["best_step"].as_i64().unwrap() < step,
        "{report}"
    );
    // Started again (a restarted pod), it does not train on.
    let again = run(&args);
    assert!(again.status.success(), "{}", stderr(&again));
    assert!(
        stderr(&again).contains("already over"),
        "{}",
        stderr(&again)
    );
    assert_eq!(
        json_lines(&again)
            .iter()
            .filter(|v| v["event"] == "step")
            .count(),
        0
    );
}

#[test]
fn tensorboard_reads_the_event_files() {
    let root = tempfile::tempdir().unwrap();
    let data = synthetic_data(root.path(), 40_000);
    let tb = root.path().join("tb");
    let out = run(&tiny_train(
        s(&data),
        s(&root.path().join("ckpt")),
        &[
            "--device-batch-size",
            "8",
            "--max-steps",
            "4",
            "--eval-every",
            "2",
            "--tensorboard-dir",
            s(&tb),
        ],
    ));
    assert!(out.status.success(), "{}", stderr(&out));
    // TensorBoard's own reader (installed by scripts/setup) parses what we wrote.
    let script = r#"
import sys, glob
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
seen = {}
for path in glob.glob(sys.argv[1] + "/events.out.tfevents.*"):
    for event in EventFileLoader(path).Load():
        for v in event.summary.value:
            value = v.simple_value if v.HasField("simple_value") else v.tensor.float_val[0]
            seen.setdefault(v.tag, []).append((event.step, round(value, 4)))
for tag in sorted(seen):
    print(tag, seen[tag])
"#;
    let python =
        std::env::var("CHARLM_VENV").map_or("python3".to_string(), |v| format!("{v}/bin/python"));
    let read = Command::new(&python)
        .args(["-c", script, s(&tb)])
        .output()
        .expect("python (run scripts/setup)");
    let text = String::from_utf8_lossy(&read.stdout).into_owned();
    assert!(
        read.status.success(),
        "TensorBoard could not read the events (run scripts/setup): {}",
        stderr(&read)
    );
    let losses: Vec<f64> = json_lines(&out)
        .iter()
        .filter(|v| v["event"] == "step")
        .map(|v| v["train_loss"].as_f64().unwrap())
        .collect();
    let line = text
        .lines()
        .find(|l| l.starts_with("train/loss "))
        .unwrap_or_else(|| panic!("{text}"));
    for (i, loss) in losses.iter().enumerate() {
        assert!(
            line.contains(&format!("({}, {})", i + 1, (loss * 1e4).round() / 1e4)),
            "{line} vs {losses:?}"
        );
    }
    assert!(
        text.lines().any(|l| l.starts_with("val/bpc [(2, ")),
        "{text}"
    );
    assert!(text.contains("perf/tokens_per_second"), "{text}");
}
