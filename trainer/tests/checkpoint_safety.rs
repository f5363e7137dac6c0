//! A checkpoint folder belongs to one training of one dataset and one model (issue 29, items 6, 7,
//! 8 and 10), on the CPU with the real binary: another dataset or model is refused at start
//! (also a finished training's, whatever the budget), `--init-from` starts a new training from
//! a folder's weights, a second training on a folder is refused naming the first while a killed
//! one leaves no lock, rank 0's refusal ends every rank, the damaged-checkpoint warning says what
//! happens next, and the step line's total is the budget or a marked, steady estimate.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{json_lines, run, s, stderr, synthetic_data, tiny_train};

fn manifest(dir: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).unwrap()).unwrap()
}

/// A second prepared dataset beside `synthetic_data`'s, of other documents.
fn other_data(root: &Path) -> std::path::PathBuf {
    let (raw, data) = (root.join("raw2"), root.join("data2"));
    let out = run(&[
        "generate",
        "--output",
        s(&raw),
        "--chars",
        "30000",
        "--seed",
        "4",
    ]);
    assert!(out.status.success(), "generate: {}", stderr(&out));
    common::prepare(&raw, &data, "0.05", "0");
    data
}

#[test]
fn another_dataset_is_refused_and_init_from_starts_a_new_training_from_the_weights() {
    let root = tempfile::tempdir().unwrap();
    let data = synthetic_data(root.path(), 30_000);
    let data2 = other_data(root.path());
    let ckpt = root.path().join("ckpt");
    let flags = [
        "--recipe",
        "nanochat-2025",
        "--checkpoint-every-minutes",
        "0",
    ];
    // The 2025 recipe with learning rates of zero changes no weight: what --init-from loaded is
    // exactly what the new training saves.
    let frozen = [
        "--matrix-lr",
        "0",
        "--embedding-lr",
        "0",
        "--unembedding-lr",
        "0",
    ];
    let mut first = tiny_train(
        s(&data),
        s(&ckpt),
        &["--max-steps", "2", "--eval-every", "2"],
    );
    first.extend_from_slice(&flags);
    let out = run(&first);
    assert!(out.status.success(), "{}", stderr(&out));
    let recorded = manifest(&ckpt.join("step-000000002"));
    let digest = recorded["dataset"]["digest"].as_str().unwrap().to_string();
    assert_eq!(digest.len(), 64, "{recorded}");

    // The same folder on other data, with a raised budget: refused, naming both datasets and
    // both fixes; nothing in the folder changes.
    let mut again = tiny_train(
        s(&data2),
        s(&ckpt),
        &["--max-steps", "4", "--eval-every", "2"],
    );
    again.extend_from_slice(&flags);
    let out = run(&again);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let err = stderr(&out);
    let (a, b) = (data.canonicalize().unwrap(), data2.canonicalize().unwrap());
    assert!(
        err.contains("trained on another dataset")
            && err.contains(&format!(
                "{} (manifest sha256 {}",
                a.display(),
                &digest[..12]
            ))
            && err.contains(&b.display().to_string())
            && err.contains("--checkpoint-dir")
            && err.contains(&format!("--init-from {}", ckpt.display())),
        "{err}"
    );
    assert!(!ckpt.join("step-000000004").exists());

    // --init-from into a new folder: a new training from step 0 on the new data, with the
    // weights of the first one's best/, its own best/, and its provenance recorded.
    let ckpt2 = root.path().join("ckpt2");
    let mut init = tiny_train(
        s(&data2),
        s(&ckpt2),
        &["--max-steps", "2", "--eval-every", "2"],
    );
    init.extend_from_slice(&flags);
    init.extend_from_slice(&frozen);
    init.extend_from_slice(&["--init-from", s(&ckpt)]);
    let out = run(&init);
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("initialised from") && err.contains("start: step 0"),
        "{err}"
    );
    let start = json_lines(&out)
        .into_iter()
        .find(|v| v["event"] == "start")
        .unwrap();
    assert!(start["resumed_from"].is_null(), "{start}");
    let new = manifest(&ckpt2.join("step-000000002"));
    let source = manifest(&ckpt.join("best"));
    assert_eq!(
        new["files"]["model.safetensors"]["sha256"], source["files"]["model.safetensors"]["sha256"],
        "the weights are the source's"
    );
    assert_ne!(new["dataset"]["digest"], recorded["dataset"]["digest"]);
    assert_eq!(new["init_from"]["step"], source["step"], "{new}");
    assert_eq!(new["init_from"]["dataset"]["digest"], digest.as_str());
    let best = manifest(&ckpt2.join("best"));
    assert_eq!(
        best["dataset"], new["dataset"],
        "best/ is the new training's own"
    );

    // Run again (a restart): the folder's own training resumes, --init-from is not applied again.
    let mut restart = tiny_train(
        s(&data2),
        s(&ckpt2),
        &["--max-steps", "3", "--eval-every", "2"],
    );
    restart.extend_from_slice(&flags);
    restart.extend_from_slice(&["--init-from", s(&ckpt)]);
    let out = run(&restart);
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("resumed from") && err.contains("is not used"),
        "{err}"
    );

    // --init-from inside the folder it would train into is refused.
    let mut inside = tiny_train(s(&data2), s(&ckpt), &["--max-steps", "2"]);
    let own_best = ckpt.join("best");
    inside.extend_from_slice(&["--init-from", s(&own_best)]);
    let out = run(&inside);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("is inside the checkpoint folder"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn another_model_is_refused_at_start_even_when_the_training_is_over() {
    let root = tempfile::tempdir().unwrap();
    let data = synthetic_data(root.path(), 30_000);
    let ckpt = root.path().join("ckpt");
    let finished = |extra: &[&'static str]| {
        let mut a = tiny_train(s(&data), s(&ckpt), &["--max-steps", "2"]);
        a.extend_from_slice(extra);
        run(&a)
    };
    let out = finished(&[]);
    assert!(out.status.success(), "{}", stderr(&out));
    // The same flags: over, nothing to do (exit 0).
    let out = finished(&[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("already over"), "{}", stderr(&out));

    for (flags, names) in [
        (["--depth", "2"], "--depth 1 (this run: 2)"),
        (["--seq-len", "16"], "--seq-len 32 (this run: 16)"),
        (
            ["--recipe", "nanochat-2025"],
            "--recipe nanochat-2026 (this run: nanochat-2025)",
        ),
    ] {
        let out = run(&tiny_train(
            s(&data),
            s(&ckpt),
            &["--max-steps", "2", flags[0], flags[1]],
        ));
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{flags:?}: {err}");
        assert!(
            err.contains("holds another model") && err.contains(names),
            "{flags:?}: {err}"
        );
        assert!(!err.contains("already over"), "{err}");
        // Only another sequence length leaves weights that fit: --init-from is offered then.
        assert_eq!(
            err.contains("--init-from"),
            flags[0] == "--seq-len",
            "{err}"
        );
    }

    // A checkpoint of another vocabulary is refused too.
    let newest = ckpt.join("step-000000002/manifest.json");
    let mut m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&newest).unwrap()).unwrap();
    assert_eq!(m["vocabulary"], "0123456789+-HBL.\n", "{m}");
    m["vocabulary"] = "0123456789+-*/=.\n".into();
    std::fs::write(&newest, serde_json::to_vec(&m).unwrap()).unwrap();
    let out = finished(&[]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("vocabulary"), "{}", stderr(&out));
}

/// Starts a long training and returns it once its first step line came.
fn start_long(data: &Path, ckpt: &Path) -> std::process::Child {
    let args = tiny_train(s(data), s(ckpt), &["--max-steps", "1000000"]);
    let mut child = Command::new(common::bin())
        .args(&args)
        .env_remove("WORLD_SIZE")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        assert!(
            Instant::now() < deadline,
            "the first training did not start"
        );
        match lines.next() {
            Some(Ok(line)) if line.starts_with("step") => break,
            Some(_) => {}
            None => panic!("the first training ended: {:?}", child.wait()),
        }
    }
    // Keep reading so it never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    child
}

fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most buf.len() bytes into our buffer.
    assert_eq!(
        unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) },
        0
    );
    let end = buf.iter().position(|&b| b == 0).unwrap();
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

#[test]
fn a_second_training_on_a_folder_is_refused_and_a_killed_one_leaves_no_lock() {
    let root = tempfile::tempdir().unwrap();
    let data = synthetic_data(root.path(), 30_000);
    let ckpt = root.path().join("ckpt");
    let mut first = start_long(&data, &ckpt);
    let second = tiny_train(s(&data), s(&ckpt), &["--max-steps", "2"]);
    let out = run(&second);
    let err = stderr(&out);
    let alive = first.try_wait().unwrap().is_none();
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(first.id() as i32, libc::SIGKILL) };
    first.wait().unwrap();
    assert!(alive, "the first training ended early");
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("is in use by another training")
            && err.contains(&format!("pid {} on host {}", first.id(), hostname()))
            && err.contains(" since ")
            && err.contains("LOCK.json"),
        "{err}"
    );
    // The refused one wrote nothing; the lock died with the killed one.
    assert!(ckpt.join("LOCK.json").exists());
    let out = run(&second);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(ckpt.join("step-000000002").exists());
}

/// Two ranks started directly (no launcher to stop the other): rank 0's refusal at start ends
/// rank 1 too, at once rather than after the collectives' timeout.
#[test]
fn rank_0_refusing_the_folder_ends_every_rank() {
    let root = tempfile::tempdir().unwrap();
    let data = synthetic_data(root.path(), 30_000);
    let data2 = other_data(root.path());
    let ckpt = root.path().join("ckpt");
    let out = run(&tiny_train(s(&data), s(&ckpt), &["--max-steps", "2"]));
    assert!(out.status.success(), "{}", stderr(&out));
    let port = common::ranks::free_port().to_string();
    let args = tiny_train(
        s(&data2),
        s(&ckpt),
        &[
            "--max-steps",
            "4",
            "--dist-timeout-s",
            "600",
            "--device-batch-size",
            "2",
        ],
    );
    let t0 = Instant::now();
    let ranks: Vec<_> = (0..2)
        .map(|rank| {
            Command::new(common::bin())
                .args(&args)
                .env("RANK", rank.to_string())
                .env("WORLD_SIZE", "2")
                .env("LOCAL_RANK", rank.to_string())
                .env("LOCAL_WORLD_SIZE", "2")
                .env("MASTER_ADDR", "127.0.0.1")
                .env("MASTER_PORT", &port)
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut outs = vec![];
    for mut child in ranks {
        while child.try_wait().unwrap().is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("a rank still waits after 120 s: rank 0's refusal did not reach it");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        outs.push(child.wait_with_output().unwrap());
    }
    let took = t0.elapsed();
    for (rank, out) in outs.iter().enumerate() {
        assert_eq!(out.status.code(), Some(2), "rank {rank}: {}", stderr(out));
    }
    assert!(
        stderr(&outs[0]).contains("another dataset"),
        "{}",
        stderr(&outs[0])
    );
    assert!(
        stderr(&outs[1]).contains("rank 0 stopped this training at its start"),
        "{}",
        stderr(&outs[1])
    );
    assert!(took < Duration::from_secs(60), "{took:?}");

    // Under `launch` the refusal is its exit code 2 too.
    let mut launched = vec!["launch", "--nproc-per-node", "2", "--master-port"];
    let port = common::ranks::free_port().to_string();
    launched.push(&port);
    launched.push("--");
    launched.extend_from_slice(&args);
    let out = run(&launched);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("another dataset"), "{}", stderr(&out));
}

#[test]
fn the_damaged_warning_says_what_happens_next() {
    let root = tempfile::tempdir().unwrap();
    let data = synthetic_data(root.path(), 30_000);
    let ckpt = root.path().join("ckpt");
    let out = run(&tiny_train(
        s(&data),
        s(&ckpt),
        &["--max-steps", "2", "--checkpoint-every-minutes", "0"],
    ));
    assert!(out.status.success(), "{}", stderr(&out));
    let damage = |step: &str| {
        let f = ckpt.join(step).join("model.safetensors");
        let len = std::fs::metadata(&f).unwrap().len();
        let file = std::fs::OpenOptions::new().write(true).open(&f).unwrap();
        file.set_len(len - 3).unwrap();
    };
    // The newest damaged: the earlier one is named and used.
    damage("step-000000002");
    let out = run(&tiny_train(s(&data), s(&ckpt), &["--max-steps", "3"]));
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("step-000000002 is damaged")
            && err.contains(&format!(
                "trying the earlier {}",
                ckpt.join("step-000000001").display()
            ))
            && err.contains("resumed from"),
        "{err}"
    );
    // The only one damaged: no claim of a previous one.
    std::fs::remove_dir_all(ckpt.join("step-000000003")).unwrap();
    damage("step-000000001");
    let out = run(&tiny_train(s(&data), s(&ckpt), &["--max-steps", "3"]));
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("no earlier checkpoint to fall back on") && !err.contains("previous one"),
        "{err}"
    );
}

/// The human step lines of a run.
fn step_lines(err: &str) -> Vec<&str> {
    err.lines()
        .filter(|l| l.starts_with("step") && l.contains('%'))
        .collect()
}

#[test]
fn the_step_total_is_the_budget_or_a_marked_estimate() {
    let root = tempfile::tempdir().unwrap();
    let data = synthetic_data(root.path(), 30_000);
    // A step budget: its total, exact, on every line.
    let out = run(&tiny_train(
        s(&data),
        s(&root.path().join("a")),
        &["--max-steps", "8"],
    ));
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    let lines = step_lines(&err);
    assert_eq!(lines.len(), 8, "{err}");
    assert!(
        lines.iter().all(|l| l.contains("/8 ") && !l.contains('~')),
        "{err}"
    );
    // A time budget: nothing claimed before the pace is measured, then `~N`.
    let out = run(&tiny_train(
        s(&data),
        s(&root.path().join("b")),
        &["--hours", "0.0015"],
    ));
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    let lines = step_lines(&err);
    assert!(lines.len() > 8, "{err}");
    assert!(lines[0].starts_with("step      1 "), "{}", lines[0]);
    assert!(lines[7..].iter().all(|l| l.contains("/~")), "{err}");
    let steps = json_lines(&out);
    let first = steps.iter().find(|v| v["event"] == "step").unwrap();
    assert!(first["total_steps_estimate"].is_null(), "{first}");
}

/// The projected total of a time budget holds steady while evaluations take most of the time:
/// it is measured over the session, evaluations included, not from the last steps' compute.
#[test]
fn the_projected_total_holds_steady_when_evaluations_take_time() {
    let root = tempfile::tempdir().unwrap();
    let data = synthetic_data(root.path(), 120_000);
    // Each evaluation reads the whole validation split (~190 windows) and as many training
    // windows, ~20 steps' worth of work, every 4 steps.
    let out = run(&tiny_train(
        s(&data),
        s(&root.path().join("ckpt")),
        &[
            "--hours",
            "0.004",
            "--eval-every",
            "4",
            "--eval-tokens",
            "100000",
            // The budget, not a memorising model, must end it: that is the total projected.
            "--early-stop-patience",
            "0",
        ],
    ));
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    let events = json_lines(&out);
    let end = events.iter().find(|v| v["event"] == "end").unwrap();
    let last = end["progress"]["step"].as_i64().unwrap();
    assert!(last >= 12, "too few steps to judge: {last}");
    let estimates: Vec<(i64, i64)> = events
        .iter()
        .filter(|v| v["event"] == "step")
        .filter_map(|v| Some((v["step"].as_i64()?, v["total_steps_estimate"].as_i64()?)))
        .collect();
    let judged: Vec<_> = estimates.iter().filter(|(s, _)| *s >= last / 4).collect();
    assert!(judged.len() as i64 >= last / 2, "{estimates:?}");
    for (step, total) in judged {
        let off = (*total - last).abs() as f64 / last as f64;
        assert!(
            off <= 0.35,
            "at step {step} the total was projected as {total}, the run ended at {last}: \
             {estimates:?}"
        );
    }
}
