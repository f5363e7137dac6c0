//! `charlm-trainer run` as a user of the seed's run.sh meets it (issue 29), through the real binary
//! on the CPU: the seed's folder layout, every setting checked before any work, and SIGTERM or
//! SIGKILL to `run` stopping everything it started.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::{s, stderr};

/// A tiny CPU model's `train` flags (depth comes from `run`).
const TINY: [&str; 12] = [
    "--seq-len",
    "32",
    "--total-batch-size",
    "256",
    "--eval-tokens",
    "512",
    "--metrics-port",
    "0",
    "--threads",
    "1",
    "--device",
    "cpu",
];

/// Writes 400 small documents into `dir/a.txt` and 40 into `dir/more/b.txt`.
fn texts(dir: &Path) {
    std::fs::create_dir_all(dir.join("more")).unwrap();
    let docs = |n: usize| -> String { (0..n).map(|i| format!("{i}+{i}\n{}\n\n", 2 * i)).collect() };
    std::fs::write(dir.join("a.txt"), docs(400)).unwrap();
    std::fs::write(dir.join("more/b.txt"), docs(40)).unwrap();
}

/// `run` with `CHARLM_BASE_DIR=base`, the rendezvous on `port`, and none of the seed's or
/// torchrun's variables inherited.
fn run_cmd(base: &Path, port: u16) -> Command {
    let mut cmd = Command::new(common::bin());
    cmd.arg("run")
        .env("CHARLM_BASE_DIR", base)
        .env("MASTER_PORT", port.to_string())
        .stdin(Stdio::null());
    common::without_seed_and_torchrun_variables(&mut cmd);
    cmd
}

/// Every file under `dir` with its bytes.
fn listing(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(d) = pending.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                pending.push(p);
            } else {
                out.push((p.clone(), std::fs::read(&p).unwrap()));
            }
        }
    }
    out.sort();
    out
}

fn subdirs(dir: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|d| d.map(|e| e.unwrap().path()).collect())
        .unwrap_or_default();
    out.sort();
    out
}

#[test]
fn run_reads_the_seeds_layout_and_keeps_its_prepared_copy_apart() {
    let root = tempfile::tempdir().unwrap();
    let base = root.path().join("nanochat_experiment");
    texts(&base.join("data"));
    let before = listing(&base.join("data"));
    // No --data: the texts in $BASE/data, as the seed keeps them; CHARLM_<FLAG> names set run's
    // depth and hours.
    let out = run_cmd(&base, 29741)
        .args(["--samples", "0", "--"])
        .args(TINY)
        .args(["--max-steps", "3", "--eval-every", "0"])
        .env("CHARLM_DEPTH", "1")
        .env("CHARLM_HOURS", "0.5")
        .output()
        .unwrap();
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("run: training depth 1 on"), "{err}");
    assert!(err.contains("for up to 0.5 h"), "{err}");
    if !tch::Cuda::is_available() {
        assert!(err.contains("on the CPU"), "{err}");
        assert!(
            !err.contains("1 GPUs") && !err.contains("GPU-hours"),
            "{err}"
        );
    }
    // The texts are only read; the prepared copy lives apart, named by their digest.
    assert_eq!(listing(&base.join("data")), before, "the texts changed");
    let prepared = subdirs(&base.join("prepared"));
    assert_eq!(prepared.len(), 1, "{prepared:?}");
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(prepared[0].join("manifest.json")).unwrap()).unwrap();
    let sources: Vec<&str> = manifest["sources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["path"].as_str().unwrap())
        .collect();
    assert_eq!(sources, ["a.txt", "more/b.txt"]);
    assert!(
        subdirs(&base.join("checkpoints/d1"))
            .iter()
            .any(|p| p.ends_with("step-000000003")),
        "{err}"
    );
    // The same texts named explicitly: the same copy, reused.
    let again = run_cmd(&base, 29742)
        .args(["--data", s(&base.join("data")), "--samples", "0", "--"])
        .args(TINY)
        .args(["--max-steps", "3", "--eval-every", "0"])
        .env("DEPTH", "1")
        .output()
        .unwrap();
    let err = stderr(&again);
    assert!(again.status.success(), "{err}");
    assert!(
        err.contains(&format!("run: reusing {}", prepared[0].display())),
        "{err}"
    );
    // Other texts elsewhere get a copy of their own beside it.
    let other = root.path().join("other");
    std::fs::create_dir_all(&other).unwrap();
    let docs: String = (0..400).map(|i| format!("{i}-{i}\n0\n\n")).collect();
    std::fs::write(other.join("c.txt"), docs).unwrap();
    // (their own --model-tag: the depth-1 folder holds the first texts' training, below)
    let third = run_cmd(&base, 29743)
        .args(["--data", s(&other), "--samples", "0", "--depth", "1"])
        .args(["--model-tag", "d1-other", "--"])
        .args(TINY)
        .args(["--max-steps", "1", "--eval-every", "0"])
        .output()
        .unwrap();
    assert!(third.status.success(), "{}", stderr(&third));
    assert_eq!(subdirs(&base.join("prepared")).len(), 2);
    assert_eq!(listing(&base.join("data")), before, "the texts changed");
}

/// The manifest of checkpoint `dir`.
fn checkpoint_manifest(dir: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).unwrap()).unwrap()
}

/// Issue 29, item 6 through `run`: `run --data raw` then `run --data raw2` at the same depth is
/// refused (exit 2, before the training starts, nothing in the folder touched), naming the folder,
/// both datasets and run's ways on: `--model-tag` (a folder of its own) or `-- --init-from` (a
/// new training from those weights). Both work.
#[test]
fn other_texts_at_the_same_depth_are_refused_naming_the_folder_and_model_tag() {
    let root = tempfile::tempdir().unwrap();
    let base = root.path().join("base");
    let raw = root.path().join("raw");
    texts(&raw);
    let raw2 = root.path().join("raw2");
    std::fs::create_dir_all(&raw2).unwrap();
    let docs: String = (0..400).map(|i| format!("{i}-{i}\n0\n\n")).collect();
    std::fs::write(raw2.join("c.txt"), docs).unwrap();
    let steps = ["--max-steps", "2", "--eval-every", "2"];

    let first = run_cmd(&base, 29751)
        .args(["--data", s(&raw), "--depth", "1", "--samples", "0", "--"])
        .args(TINY)
        .args(steps)
        .output()
        .unwrap();
    assert!(first.status.success(), "{}", stderr(&first));
    let d1 = base.join("checkpoints/d1");
    let before = listing(&d1);
    assert!(d1.join("step-000000002").is_dir());

    // Other texts, same depth, a budget that would train on: refused before the training starts.
    let out = run_cmd(&base, 29752)
        .args(["--data", s(&raw2), "--depth", "1", "--samples", "0", "--"])
        .args(TINY)
        .args(["--max-steps", "4", "--eval-every", "2"])
        .output()
        .unwrap();
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    let prepared = |texts: &Path| -> PathBuf {
        // run's copy of `texts`, the dataset the checkpoints record
        let dirs = subdirs(&base.join("prepared"));
        dirs.into_iter()
            .find(|d| {
                let m = checkpoint_manifest(d);
                m["sources"][0]["path"]
                    == if texts == raw.as_path() {
                        "a.txt"
                    } else {
                        "c.txt"
                    }
            })
            .unwrap()
            .canonicalize()
            .unwrap()
    };
    assert!(
        err.contains(&d1.display().to_string())
            && err.contains("trained on another dataset")
            && err.contains(&prepared(&raw).display().to_string())
            && err.contains(&prepared(&raw2).display().to_string())
            && err.contains("Give this training another --model-tag")
            && err.contains(&format!("-- --init-from {}", d1.display()))
            && err.contains(&format!("run prepared the texts in {}", raw2.display()))
            && err.contains("e.g. --model-tag d1-raw2"),
        "{err}"
    );
    assert!(
        !err.contains("--checkpoint-dir"),
        "a flag run refuses: {err}"
    );
    assert!(!err.contains("run: training depth"), "{err}");
    assert!(!err.contains("run the same command again"), "{err}");
    assert_eq!(listing(&d1), before, "the first training's folder changed");
    assert_eq!(
        subdirs(&base.join("checkpoints")),
        std::slice::from_ref(&d1),
        "a silent new folder"
    );

    // The fix it names: a tag of its own (here by its variable) trains apart.
    let out = run_cmd(&base, 29753)
        .args(["--data", s(&raw2), "--depth", "1", "--samples", "0", "--"])
        .args(TINY)
        .args(steps)
        .env("CHARLM_MODEL_TAG", "d1-raw2")
        .output()
        .unwrap();
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("checkpoints/d1-raw2"), "{err}");
    let own = checkpoint_manifest(&base.join("checkpoints/d1-raw2/step-000000002"));
    let theirs = checkpoint_manifest(&d1.join("step-000000002"));
    assert_ne!(own["dataset"]["digest"], theirs["dataset"]["digest"]);
    assert_eq!(listing(&d1), before, "the first training's folder changed");

    // The other fix: a new training from the first one's weights, in a folder of its own.
    let out = run_cmd(&base, 29754)
        .args(["--data", s(&raw2), "--depth", "1", "--samples", "0"])
        .args(["--model-tag", "d1-raw2-from-raw", "--"])
        .args(TINY)
        .args(steps)
        .args(["--init-from", s(&d1)])
        .output()
        .unwrap();
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    let new = checkpoint_manifest(&base.join("checkpoints/d1-raw2-from-raw/step-000000002"));
    assert_eq!(new["init_from"]["dataset"], theirs["dataset"], "{new}");
    assert_eq!(new["dataset"], own["dataset"], "{new}");

    // --init-from inside the folder it would train into: refused naming --model-tag.
    let out = run_cmd(&base, 29755)
        .args(["--data", s(&raw), "--depth", "1", "--samples", "0", "--"])
        .args(TINY)
        .args(steps)
        .args(["--init-from", s(&d1)])
        .output()
        .unwrap();
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("is inside the checkpoint folder") && err.contains("--model-tag"),
        "{err}"
    );

    // A tag is one folder name, checked before anything is prepared.
    let fresh = root.path().join("fresh");
    for bad in ["../d1", "a/b", ".hidden", ""] {
        let out = run_cmd(&fresh, 29756)
            .args(["--data", s(&raw), "--model-tag", bad])
            .output()
            .unwrap();
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{bad:?}: {err}");
        assert!(err.contains("--model-tag"), "{bad:?}: {err}");
        assert!(!fresh.exists(), "{bad:?}: {err}");
    }
}

#[test]
fn every_setting_is_checked_before_anything_is_prepared() {
    let root = tempfile::tempdir().unwrap();
    let base = root.path().join("base");
    texts(&base.join("data"));
    // (environment, arguments, what the message must name)
    type Case<'a> = (&'a [(&'a str, &'a str)], &'a [&'a str], &'a [&'a str]);
    let cases: &[Case] = &[
        // The seed's names: the message names what the user set.
        (
            &[("DEPTH", "0")],
            &[],
            &["DEPTH=\"0\"", "--depth", "use 1 to 128"],
        ),
        (&[("TRAINING_HOURS", "0")], &[], &["TRAINING_HOURS=\"0\""]),
        (
            &[("DEVICE_BATCH_SIZE", "none")],
            &[],
            &["DEVICE_BATCH_SIZE=\"none\""],
        ),
        (&[("NPROC_PER_NODE", "0")], &[], &["NPROC_PER_NODE=\"0\""]),
        // run's own flags and their CHARLM_ names.
        (&[], &["--depth", "200"], &["--depth 200"]),
        (
            &[("CHARLM_SAMPLES", "many")],
            &[],
            &["CHARLM_SAMPLES=\"many\""],
        ),
        (&[], &["--price", "-1"], &["--price-per-gpu-hour -1"]),
        // The train flags after `--`, from the command line or their variables.
        (
            &[],
            &["--", "--eval-every", "-1"],
            &["after `--`", "--eval-every -1"],
        ),
        (&[], &["--", "--recipe", "banana"], &["--recipe banana"]),
        (
            &[],
            &["--", "--eval-every", "5", "--eval-every", "6"],
            &["after `--`", "--eval-every", "multiple times"],
        ),
        (
            &[],
            &["--", "--depth", "3"],
            &["--depth after `--`", "before `--`"],
        ),
        (&[], &["--", "--bogus"], &["after `--`", "--bogus"]),
        (
            &[("CHARLM_EVAL_TOKENS", "0")],
            &[],
            &["CHARLM_EVAL_TOKENS=\"0\""],
        ),
        (
            &[],
            &["--", "--seq-len", "32", "--total-batch-size", "100"],
            &["--total-batch-size 100", "multiple"],
        ),
    ];
    for (env, args, wanted) in cases {
        let mut cmd = run_cmd(&base, 29744);
        cmd.args(*args);
        for (k, v) in *env {
            cmd.env(k, v);
        }
        let out = cmd.output().unwrap();
        let err = stderr(&out);
        let what = format!("{env:?} {args:?}: {err}");
        assert_eq!(out.status.code(), Some(2), "{what}");
        assert!(err.starts_with("error: "), "{what}");
        for w in *wanted {
            assert!(err.contains(w), "missing {w:?}: {what}");
        }
        assert!(!err.contains("resume") && !err.contains("plan:"), "{what}");
        assert!(!err.contains("panicked"), "{what}");
        for made in ["prepared", "checkpoints"] {
            assert!(!base.join(made).exists(), "{made} exists after {what}");
        }
    }
}

/// The processes whose command line holds `marker` (a test's own temporary folder): what `run`
/// started for this test. Zombies have an empty command line and are not counted.
fn processes_holding(marker: &str) -> Vec<(u32, String)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if pid == std::process::id() {
            continue;
        }
        let Ok(raw) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&raw).replace('\0', " ");
        if cmdline.contains(marker) {
            out.push((pid, cmdline));
        }
    }
    out
}

/// Kills whatever a failed test left behind.
struct Reaper(String);

impl Drop for Reaper {
    fn drop(&mut self) {
        for (pid, _) in processes_holding(&self.0) {
            // SAFETY: kill(2) on a process this test started (its command line holds our folder).
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
    }
}

/// Starts a long training under `run` and returns it once rank 0 logged a step.
fn training(base: &Path, port: u16) -> Child {
    let mut child = run_cmd(base, port)
        .args(["--base-dir", s(base), "--depth", "1", "--samples", "0"])
        .args(["--grace-period-s", "20", "--"])
        .args(TINY)
        .args(["--max-steps", "1000000", "--eval-every", "0"])
        .args(["--checkpoint-every-minutes", "600"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = mpsc::channel();
    let lines = BufReader::new(child.stderr.take().unwrap());
    std::thread::spawn(move || {
        for line in lines.lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut seen = Vec::new();
    while Instant::now() < deadline {
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(line) if line.contains("[rank 0] step ") => return child,
            Ok(line) => seen.push(line),
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("no step within 120 s:\n{}", seen.join("\n"));
}

/// Waits up to `limit` for no process of `marker` to be left; returns those left.
fn left_after(marker: &str, limit: Duration) -> Vec<(u32, String)> {
    let deadline = Instant::now() + limit;
    loop {
        let left = processes_holding(marker);
        if left.is_empty() || Instant::now() >= deadline {
            return left;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn newest_step(checkpoints: &Path) -> Option<u64> {
    subdirs(checkpoints)
        .iter()
        .filter_map(|p| p.file_name()?.to_str()?.strip_prefix("step-")?.parse().ok())
        .max()
}

fn wait_with_limit(child: &mut Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

#[test]
fn sigterm_and_sigkill_to_run_leave_no_process_of_the_training() {
    let root = tempfile::tempdir().unwrap();
    let marker = s(root.path()).to_string();
    let _reaper = Reaper(marker.clone());
    let base = root.path().join("base");
    texts(&base.join("data"));
    let checkpoints = base.join("checkpoints/d1");

    // SIGTERM: passed down to the worker, which saves a checkpoint; then everyone exits.
    let mut run = training(&base, 29745);
    assert!(
        processes_holding(&marker).len() >= 3,
        "run, launch and the worker: {:?}",
        processes_holding(&marker)
    );
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(run.id() as i32, libc::SIGTERM) };
    let status = wait_with_limit(&mut run, Duration::from_secs(60));
    assert!(
        status.is_some_and(|s| s.success()),
        "run after SIGTERM: {status:?}; left: {:?}",
        processes_holding(&marker)
    );
    let left = left_after(&marker, Duration::from_secs(10));
    assert!(left.is_empty(), "left after SIGTERM: {left:?}");
    let first = newest_step(&checkpoints).expect("a checkpoint saved on SIGTERM");

    // SIGKILL: run cannot pass anything on, but launch gets SIGTERM from the kernel and stops
    // its worker, which saves again.
    let mut run = training(&base, 29746);
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(run.id() as i32, libc::SIGKILL) };
    run.wait().unwrap();
    let left = left_after(&marker, Duration::from_secs(60));
    assert!(left.is_empty(), "left after SIGKILL of run: {left:?}");
    let second = newest_step(&checkpoints).unwrap();
    assert!(
        second > first,
        "no checkpoint after SIGKILL: {first} then {second}"
    );
}
