//! Resuming on another number of CPU ranks from a checkpoint past its best (issue 28): the first
//! evaluation after the resume is worse than the checkpoint's best, so no rank may save `best/`
//! (whose sharded optimizer state every rank gathers). A rank that did not restore the best would
//! enter that gather alone and the others would wait for it until the collective timeout, for
//! ever after each restart. Every resume here must finish, and every rank must end with the same
//! stop step, the same best and the same run state.
//!
//! One checkpoint chain keeps this cheap: a 1-rank run trained past its best, resumed on 2 ranks
//! (whose checkpoint is then resumed on 3 and on 1). The six resumes cover 1→2, 2→3 and 2→1 each
//! with the sharded optimizer on and off and with early stop on and off, and every pairing of
//! those two settings once.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Instant;

use common::ranks::free_port;
use common::{s, stderr};

/// `launch --nproc-per-node n -- train` of a depth-1 model on the memorising data set, evaluated
/// every 20 steps; 384 tokens a step divide into micro-batches of 2 × 32 on 1, 2 or 3 ranks.
/// The collective timeout is short: a hang fails the test in seconds, not in 10 minutes.
fn launch(n: usize, data: &Path, ckpt: &Path, extra: &[&str]) -> Output {
    let (n, port) = (n.to_string(), free_port().to_string());
    let mut args = vec![
        "launch",
        "--nproc-per-node",
        &n,
        "--master-port",
        &port,
        "--",
    ];
    let settings = [
        ["--device-batch-size", "2", "--total-batch-size", "384"].as_slice(),
        &[
            "--eval-every",
            "20",
            "--log-every",
            "1000",
            "--dist-timeout-s",
            "10",
        ],
        extra,
    ]
    .concat();
    let train = common::tiny_train(s(data), s(ckpt), &settings);
    args.extend(train);
    let started = Instant::now();
    let out = Command::new(common::bin())
        .args(&args)
        .env_remove("WORLD_SIZE")
        .output()
        .unwrap();
    eprintln!(
        "{} rank(s) {extra:?}: {:.1} s",
        n,
        started.elapsed().as_secs_f64()
    );
    assert!(
        out.status.success(),
        "{n} rank(s) {extra:?} failed:\n{}",
        stderr(&out)
    );
    out
}

/// Rank 0's events of one kind.
fn events(out: &Output, kind: &str) -> Vec<serde_json::Value> {
    common::json_lines(out)
        .into_iter()
        .filter(|v| v["event"] == kind && v["rank"] == 0)
        .collect()
}

/// What one rank says it ended with.
#[derive(Debug, PartialEq)]
struct Ending {
    step: i64,
    reason: String,
    best: String,
    best_step: i64,
    state: String,
}

/// Each rank's `rank R of W: stopped at step …` line (stderr, under `launch` prefixed with
/// `[rank R] `), in rank order.
fn endings(out: &Output, world: usize) -> Vec<Ending> {
    let err = stderr(out);
    (0..world)
        .map(|rank| {
            let prefix = format!("[rank {rank}] rank {rank} of {world}: stopped at step ");
            let line = err
                .lines()
                .find_map(|l| l.strip_prefix(&prefix))
                .unwrap_or_else(|| panic!("rank {rank} did not say where it stopped:\n{err}"));
            // "320 (early_stop); best val bpc 3.4829 at step 200; run state 0123456789abcdef"
            let words: Vec<&str> = line
                .split(|c: char| c.is_whitespace() || "();".contains(c))
                .filter(|w| !w.is_empty())
                .collect();
            match words.as_slice() {
                [step, reason, "best", "val", "bpc", best, "at", "step", best_step, "run", "state", state] => {
                    Ending {
                        step: step.parse().unwrap(),
                        reason: reason.to_string(),
                        best: best.to_string(),
                        best_step: best_step.parse().unwrap(),
                        state: state.to_string(),
                    }
                }
                _ => panic!("rank {rank}: unexpected line {line:?}"),
            }
        })
        .collect()
}

/// A copy of checkpoint directory `from` for one resume.
fn copy_of(from: &Path, to: PathBuf) -> PathBuf {
    let out = Command::new("cp")
        .args(["-a", s(from), s(&to)])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    to
}

/// One resume: its world size, settings, and where it must stop and why.
struct Case {
    from: usize,
    to: usize,
    shard: &'static str,
    /// `--early-stop-patience`: 0 is off.
    patience: u32,
    max_steps: i64,
    stop_step: i64,
    reason: &'static str,
}

/// Runs `case` on a copy of `ckpt` (which ended at `resumed_at`, best `best` at `best_step`) and
/// checks that every rank ended alike, where expected, with the checkpoint's best.
fn resume(
    case: &Case,
    data: &Path,
    ckpt: &Path,
    resumed_at: i64,
    best: (f64, i64),
) -> (PathBuf, Output) {
    let name = format!(
        "{}to{}-shard-{}-patience-{}",
        case.from, case.to, case.shard, case.patience
    );
    let dir = copy_of(ckpt, ckpt.with_file_name(&name));
    let (patience, max_steps) = (case.patience.to_string(), case.max_steps.to_string());
    let out = launch(
        case.to,
        data,
        &dir,
        &[
            "--shard-optimizer",
            case.shard,
            "--early-stop-patience",
            &patience,
            "--max-steps",
            &max_steps,
        ],
    );
    let err = stderr(&out);
    assert!(
        err.contains(&format!("step-{resumed_at:09}")),
        "{name}: {err}"
    );
    // The first evaluation after the resume is worse than the checkpoint's best.
    let evals = events(&out, "eval");
    let first = evals
        .first()
        .unwrap_or_else(|| panic!("{name}: no evaluation: {err}"));
    assert!(
        first["val_bpc"].as_f64().unwrap() > best.0 && first["best"] == false,
        "{name}: the first evaluation is not worse than the best {best:?}: {first}"
    );
    // Rank 0's summary: stopped where expected, with the checkpoint's best.
    let end = &events(&out, "end")[0]["progress"];
    assert_eq!(
        (
            end["step"].as_i64(),
            end["stop_reason"].as_str(),
            end["best_val_bpc"].as_f64(),
            end["best_step"].as_i64()
        ),
        (
            Some(case.stop_step),
            Some(case.reason),
            Some(best.0),
            Some(best.1)
        ),
        "{name}: {end}"
    );
    // Every rank ended alike.
    if case.to > 1 {
        let ends = endings(&out, case.to);
        for (rank, e) in ends.iter().enumerate() {
            assert_eq!(
                (e.step, e.reason.as_str(), e.best_step),
                (case.stop_step, case.reason, best.1),
                "{name}, rank {rank}: {e:?}"
            );
            assert_eq!(e, &ends[0], "{name}: rank {rank} ended unlike rank 0");
        }
    }
    (dir, out)
}

#[test]
fn resumes_on_other_rank_counts_past_the_best_finish_alike_on_every_rank() {
    let root = tempfile::tempdir().unwrap();
    let data = common::memorising_data(root.path());
    // 1 rank, early stop off, until well past the best: the last evaluations are worse and the
    // model memorises.
    let base = root.path().join("base");
    let out = launch(
        1,
        &data,
        &base,
        &["--max-steps", "300", "--early-stop-patience", "0"],
    );
    let end = &events(&out, "end")[0]["progress"];
    let best = (
        end["best_val_bpc"].as_f64().unwrap(),
        end["best_step"].as_i64().unwrap(),
    );
    assert!(best.1 <= 260, "the base run must end past its best: {end}");
    // Each evaluation after the best was memorising (train bpc below val bpc by more than the
    // margin): early stop counted them all.
    let memorising = events(&out, "eval")
        .iter()
        .filter(|e| e["step"].as_i64().unwrap() > best.1)
        .filter(|e| e["train_bpc"].as_f64().unwrap() < e["val_bpc"].as_f64().unwrap() * 0.995)
        .count() as u32;
    assert_eq!(end["evals_since_best"], memorising, "{end}");

    // 1 → 2, sharded, early stop off: the run goes on to its budget (this checkpoint, written by
    // 2 ranks, is where the 2 → 3 and 2 → 1 resumes start).
    let off = |from, to, shard, max_steps| Case {
        from,
        to,
        shard,
        patience: 0,
        max_steps,
        stop_step: max_steps,
        reason: "budget",
    };
    // Early stop on, with a patience one above the memorising evaluations the checkpoint counts:
    // the first evaluation after the resume (memorising too) ends the run.
    let on = |from, to, shard, patience, at| Case {
        from,
        to,
        shard,
        patience,
        max_steps: 1000,
        stop_step: at,
        reason: "early_stop",
    };
    let (two, _) = resume(&off(1, 2, "on", 340), &data, &base, 300, best);
    resume(
        &on(1, 2, "off", memorising + 1, 320),
        &data,
        &base,
        300,
        best,
    );
    // The 2-rank checkpoint at 340 counts two more memorising evaluations.
    let counted = memorising + 2;
    resume(&on(2, 3, "on", counted + 1, 360), &data, &two, 340, best);
    resume(&off(2, 3, "off", 380), &data, &two, 340, best);
    resume(&off(2, 1, "on", 380), &data, &two, 340, best);
    resume(&on(2, 1, "off", counted + 1, 360), &data, &two, 340, best);
}
