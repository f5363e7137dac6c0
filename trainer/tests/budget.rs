//! The best model for the budget (issue 18), on the CPU: the recipe switch and what checkpoints
//! record of it, early stop on by default with the saved-cost report, the planner's arithmetic
//! and its depth table (issue 29), and `run` end to end (prepare, plan, train, samples; run
//! again: reuse and nothing to redo).

mod common;

use charlm_budget as planner;
use common::{json_lines, run, s, stderr, synthetic_data, tiny_train};
use std::process::Command;

/// Learning rates of zero: the validation bpc never improves after its first measurement.
const FROZEN: [&str; 6] = [
    "--matrix-lr",
    "0",
    "--embedding-lr",
    "0",
    "--unembedding-lr",
    "0",
];

fn end_report(out: &std::process::Output) -> serde_json::Value {
    json_lines(out)
        .into_iter()
        .find(|v| v["event"] == "end")
        .unwrap_or_else(|| panic!("no end event: {}", stderr(out)))["progress"]
        .clone()
}

#[test]
fn the_recipe_is_chosen_recorded_and_kept_on_resume() {
    let root = tempfile::tempdir().unwrap();
    let data = synthetic_data(root.path(), 30_000);
    let ckpt = root.path().join("ckpt");
    let args = |recipe: &'static str, steps: &'static str| {
        let mut a = tiny_train(
            s(&data),
            s(&ckpt),
            &["--max-steps", steps, "--eval-every", "0"],
        );
        a.extend_from_slice(&["--recipe", recipe, "--checkpoint-every-minutes", "0"]);
        a
    };
    let out = run(&args("nanochat-2026", "3"));
    assert!(out.status.success(), "{}", stderr(&out));
    let step = ckpt.join("step-000000003/manifest.json");
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&step).unwrap()).unwrap();
    assert_eq!(manifest["settings"]["recipe"], "nanochat-2026");
    assert_eq!(manifest["model"]["rope_base"], 100_000);
    // The 2026 schedule warms up: the first step's multiplier is 1/40.
    let first = json_lines(&out)
        .into_iter()
        .find(|v| v["event"] == "step")
        .unwrap();
    assert!(
        (first["lr_mult"].as_f64().unwrap() - 0.025).abs() < 1e-9,
        "{first}"
    );
    // Resuming it with the other recipe is refused (bad input), naming both.
    let other = run(&args("nanochat-2025", "6"));
    assert_eq!(other.status.code(), Some(2), "{}", stderr(&other));
    let err = stderr(&other);
    assert!(
        err.contains("--recipe nanochat-2026") && err.contains("nanochat-2025"),
        "{err}"
    );
    // The same recipe resumes.
    let same = run(&args("nanochat-2026", "6"));
    assert!(same.status.success(), "{}", stderr(&same));
    assert!(stderr(&same).contains("resumed from"), "{}", stderr(&same));
}

fn evals(out: &std::process::Output) -> Vec<(i64, f64, f64)> {
    json_lines(out)
        .iter()
        .filter(|v| v["event"] == "eval")
        .map(|v| {
            let f = |k: &str| v[k].as_f64().unwrap_or_else(|| panic!("{k} in {v}"));
            (v["step"].as_i64().unwrap(), f("val_bpc"), f("train_bpc"))
        })
        .collect()
}

#[test]
fn early_stop_is_on_by_default_and_reports_what_it_saved() {
    let root = tempfile::tempdir().unwrap();
    let data = common::memorising_data(root.path());
    let ckpt = root.path().join("ckpt");
    let mut args = tiny_train(
        s(&data),
        s(&ckpt),
        &["--max-steps", "600", "--eval-every", "10"],
    );
    args.extend_from_slice(&["--price-per-gpu-hour", "2"]);
    let out = run(&args);
    assert!(out.status.success(), "{}", stderr(&out));
    let evals = evals(&out);
    let p = end_report(&out);
    assert_eq!(p["stop_reason"], "early_stop", "{p}");
    let (step, best_step) = (
        p["step"].as_i64().unwrap(),
        p["best_step"].as_i64().unwrap(),
    );
    assert!(step < 600, "{p}");
    // It stopped at an evaluation, the best is the lowest val bpc measured, and the evaluations
    // after it that counted (the default patience, 2) were worse while memorising.
    let last = *evals.last().unwrap();
    assert_eq!(last.0, step);
    let best = evals
        .iter()
        .cloned()
        .fold(last, |b, e| if e.1 < b.1 { e } else { b });
    assert_eq!(best.0, best_step, "{evals:?}");
    let after: Vec<_> = evals.iter().filter(|e| e.0 > best_step).collect();
    let memorising = after.iter().filter(|e| e.2 < e.1 * (1.0 - 0.005)).count();
    assert_eq!(memorising, 2, "{evals:?}");
    assert!(after.len() <= 3, "{evals:?}");
    assert!(
        last.2 < last.1 * 0.995,
        "stopped while not memorising: {last:?}"
    );
    // The rest of the budget at the run's mean step time, on one rank.
    let (saved, elapsed) = (
        p["saved_s"].as_f64().unwrap(),
        p["elapsed_s"].as_f64().unwrap(),
    );
    let left = (600 - step) as f64;
    assert!(
        (saved - left * elapsed / step as f64).abs() < 1e-6 * saved.max(1.0),
        "{p}"
    );
    assert!((p["saved_gpu_hours"].as_f64().unwrap() - saved / 3600.0).abs() < 1e-12);
    let err = stderr(&out);
    assert!(
        err.contains(&format!("stopped early at step {step}"))
            && err.contains("GPU-hours")
            && err.contains("at $2.00 per GPU-hour"),
        "{err}"
    );
    let kept: serde_json::Value =
        serde_json::from_slice(&std::fs::read(ckpt.join("best/manifest.json")).unwrap()).unwrap();
    assert_eq!(kept["step"].as_i64(), Some(best_step), "{kept}");

    // `--early-stop-patience 0` turns it off: the budget ends the run, with a warning once it
    // is past its best by more than 4 evaluations.
    let ckpt0 = root.path().join("ckpt0");
    let args = tiny_train(
        s(&data),
        s(&ckpt0),
        &[
            "--max-steps",
            "400",
            "--eval-every",
            "10",
            "--early-stop-patience",
            "0",
        ],
    );
    let out = run(&args);
    assert!(out.status.success(), "{}", stderr(&out));
    let p = end_report(&out);
    assert_eq!(
        (p["stop_reason"].as_str(), p["step"].as_i64()),
        (Some("budget"), Some(400))
    );
    assert!(p["saved_s"].is_null());
    assert!(p["evals_since_best"].as_i64().unwrap() > 4, "{p}");
    assert!(
        stderr(&out).contains("paying for a model no better than best/"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn early_stop_waits_while_the_model_is_not_memorising() {
    // Frozen learning rates: val bpc never improves after the first evaluation, but train and
    // val bpc stay equal, so the default early stop (which counts memorising evaluations only)
    // lets the budget end the run, past its best by 6 evaluations, and warns.
    let root = tempfile::tempdir().unwrap();
    let data = synthetic_data(root.path(), 40_000);
    let ckpt = root.path().join("ckpt");
    let mut args = tiny_train(
        s(&data),
        s(&ckpt),
        &["--max-steps", "14", "--eval-every", "2"],
    );
    args.extend_from_slice(&FROZEN);
    let out = run(&args);
    assert!(out.status.success(), "{}", stderr(&out));
    let p = end_report(&out);
    assert_eq!(
        (p["stop_reason"].as_str(), p["step"].as_i64()),
        (Some("budget"), Some(14))
    );
    assert_eq!(p["evals_since_best"], 6);
    let err = stderr(&out);
    assert!(
        err.contains("paying for a model no better than best/")
            && err.contains("0 of them memorising"),
        "{err}"
    );
}

#[test]
fn the_planner_prints_the_budgets_arithmetic() {
    let root = tempfile::tempdir().unwrap();
    let data = synthetic_data(root.path(), 20_000);
    let out = run(&[
        "plan",
        "--data",
        s(&data),
        "--gpus",
        "2",
        "--hours",
        "16",
        "--price",
        "3",
        "--depth",
        "24",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let line = json_lines(&out)
        .into_iter()
        .find(|v| v["event"] == "plan")
        .unwrap();
    let plan: planner::Plan = serde_json::from_value(line["plan"].clone()).unwrap();
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(data.join("manifest.json")).unwrap()).unwrap();
    let unique = manifest["train"]["tokens"].as_u64().unwrap();
    assert_eq!(plan.budget.unique_tokens, unique);
    assert_eq!(plan.budget_cost, 96.0);
    let d24 = plan.depths.iter().find(|d| d.depth == 24).unwrap();
    assert!((d24.epochs - d24.tokens / unique as f64).abs() < 1e-6);
    assert!((d24.tokens - planner::tokens_per_s(24, 2048) * 2.0 * 16.0 * 3600.0).abs() < 1.0);
    // 20 k characters for 16 hours is absurdly data-constrained: the smallest depth wins.
    assert_eq!(plan.recommended_depth, planner::DEPTHS[0]);
    assert!(line["data_constrained"]
        .as_str()
        .unwrap()
        .contains("depth 24"));
    // So data-constrained that every depth reaches the same expected loss: the plan says so.
    assert!(
        stderr(&out).contains("the law cannot rank these depths"),
        "{}",
        stderr(&out)
    );
    // Bad input names the flag.
    let bad = run(&["plan", "--data", s(&data), "--gpus", "0", "--hours", "1"]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(stderr(&bad).contains("--gpus"), "{}", stderr(&bad));
}

#[test]
fn plan_prints_the_seeds_depth_table_with_the_memory_auto_picks_per_gpu() {
    let root = tempfile::tempdir().unwrap();
    let data = synthetic_data(root.path(), 20_000);
    let out = run(&["plan", "--data", s(&data), "--gpus", "1"]);
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("80 GB") && err.contains("141 GB") && err.contains("docs/performance.md"),
        "{err}"
    );
    let line = json_lines(&out)
        .into_iter()
        .find(|v| v["event"] == "plan")
        .unwrap();
    let rows = line["memory"].as_array().unwrap();
    let depths: Vec<i64> = rows.iter().map(|r| r["depth"].as_i64().unwrap()).collect();
    assert_eq!(depths, [4, 6, 8, 12, 16, 20, 24, 32, 40, 48, 56, 64]);
    let row = |d: i64| rows.iter().find(|r| r["depth"] == d).unwrap();
    // Width 64 × depth: depth 48 holds 5.44 B parameters.
    assert_eq!(row(48)["params"].as_i64().unwrap(), planner::params(48));
    // The model picks what the probe picked on an H100 80GB (docs/performance.md, issue 8) and
    // estimates a peak at most 15% above the one measured there.
    for (depth, batch, measured_gib) in [(24, 32, 56.0), (32, 16, 62.5), (48, 1, 68.9)] {
        let h100 = &row(depth)["gpus"][0];
        assert_eq!(h100["micro_batch"], batch, "depth {depth}: {h100}");
        let gib = h100["peak_bytes"].as_f64().unwrap() / (1u64 << 30) as f64;
        assert!(
            (measured_gib..measured_gib * 1.15).contains(&gib),
            "depth {depth}: {gib:.1} GiB vs {measured_gib} measured"
        );
        assert!(
            err.contains(&format!("d{depth} {batch} → {measured_gib}")),
            "{err}"
        );
    }
    // The seed's 56 fits only the 141 GB GPU; 64 fits neither, and the table says so.
    assert!(row(56)["gpus"][0].is_null() && !row(56)["gpus"][1].is_null());
    assert!(row(64)["gpus"][0].is_null() && row(64)["gpus"][1].is_null());
    let d64 = err
        .lines()
        .find(|l| l.trim_start().starts_with("64 "))
        .unwrap();
    assert_eq!(d64.matches("does not fit").count(), 2, "{d64}");
    // Each fitting entry says whether it recomputes.
    for l in err.lines().filter(|l| l.contains("| ")) {
        assert!(
            l.contains("no")
                || l.contains(" of ")
                || l.contains("does not fit")
                || l.contains("recompute"),
            "{l}"
        );
    }
}

#[test]
fn plan_says_cpu_without_a_gpu_and_when_the_law_cannot_rank_the_depths() {
    let root = tempfile::tempdir().unwrap();
    // 2 800 training characters: every depth reaches the same expected loss on 1 GPU-hour.
    let data = common::memorising_data(root.path());
    let out = run(&["plan", "--data", s(&data), "--gpus", "1"]);
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("plan: 1 GPU ×"), "{err}");
    assert!(err.contains("the law cannot rank these depths"), "{err}");
    // No rank column to misread: the 10th-ranked depth is not "recommended".
    let recommended = err.lines().find(|l| l.contains("← recommended")).unwrap();
    assert!(recommended.contains(" - "), "{recommended}");
    let line = json_lines(&out)
        .into_iter()
        .find(|v| v["event"] == "plan")
        .unwrap();
    assert_eq!(line["law_ranks"], false);
    assert_eq!(line["plan"]["recommended_depth"], planner::DEPTHS[0]);
    // (A corpus large enough to tell depths apart is ranked: the planner's unit tests.)
    // Without a GPU, `auto` plans the CPU, at its speed and without a price.
    if !tch::Cuda::is_available() {
        let cpu = run(&["plan", "--data", s(&data)]);
        let err = stderr(&cpu);
        assert!(cpu.status.success(), "{err}");
        assert!(err.contains("plan: the CPU ("), "{err}");
        assert!(
            !err.contains("1 GPUs") && !err.contains("GPU-hours"),
            "{err}"
        );
        let line = json_lines(&cpu)
            .into_iter()
            .find(|v| v["event"] == "plan")
            .unwrap();
        assert_eq!(line["hardware"]["kind"], "cpu");
        assert_eq!(line["plan"]["budget_cost"], 0.0);
    }
}

#[test]
fn parameters_of_the_planner_are_the_models() {
    for depth in [1, 3, 6, 24, 48] {
        let c = charlm_trainer::model::GptConfig::new(depth, 2048);
        assert_eq!(planner::params(depth), c.total_params(), "depth {depth}");
        assert_eq!(planner::flops_per_token(depth, 2048), c.flops_per_token());
    }
}

#[test]
fn run_prepares_plans_trains_samples_and_resumes_on_the_cpu() {
    let root = tempfile::tempdir().unwrap();
    let texts = root.path().join("texts");
    std::fs::create_dir(&texts).unwrap();
    let doc: String = (0..400)
        .map(|i| format!("{i}+{i}\n{}\n\n", 2 * i))
        .collect();
    std::fs::write(texts.join("a.txt"), doc).unwrap();
    let base = root.path().join("cache");
    let go = || {
        Command::new(common::bin())
            .args([
                "run",
                "--data",
                s(&texts),
                "--base-dir",
                s(&base),
                "--samples",
                "2",
                "--",
            ])
            .args([
                "--seq-len",
                "32",
                "--total-batch-size",
                "256",
                "--max-steps",
                "6",
            ])
            .args([
                "--eval-every",
                "3",
                "--eval-tokens",
                "512",
                "--metrics-port",
                "0",
            ])
            .args(["--threads", "1", "--device", "cpu"])
            .env("DEPTH", "1")
            .env("DEVICE_BATCH_SIZE", "4")
            .env("TRAINING_HOURS", "0.5")
            .env("NPROC_PER_NODE", "1")
            .env("MASTER_PORT", "29731")
            .env_remove("WORLD_SIZE")
            .output()
            .unwrap()
    };
    let out = go();
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("run: prepared"), "{err}");
    assert!(err.contains("← recommended"), "{err}");
    assert!(err.contains("training depth 1 on "), "{err}");
    // The prepared copy lives apart from the texts, named by their digest.
    let prepared: Vec<_> = std::fs::read_dir(base.join("prepared"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(prepared.len(), 1);
    assert!(prepared[0].join("manifest.json").exists());
    assert!(
        base.join("checkpoints/d1/best/manifest.json").exists(),
        "{err}"
    );
    assert!(
        err.contains("sampling from") && err.contains("best"),
        "{err}"
    );
    // stdout is not a terminal here: the samples come as `sample` events.
    let samples = json_lines(&out)
        .into_iter()
        .filter(|v| v["event"] == "sample")
        .count();
    assert_eq!(samples, 2, "{}", common::stdout(&out));
    // Run again: the prepared copy is reused and the finished training is not repeated.
    let again = go();
    let err = stderr(&again);
    assert!(again.status.success(), "{err}");
    assert!(err.contains("run: reusing"), "{err}");
    assert!(err.contains("already over"), "{err}");
    // A changed source is prepared again.
    std::fs::write(texts.join("b.txt"), "1+1\n2\n").unwrap();
    let third = go();
    assert!(
        stderr(&third).contains("run: prepared"),
        "{}",
        stderr(&third)
    );
}
