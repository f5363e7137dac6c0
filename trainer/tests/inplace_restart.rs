//! Issue 35: a worker killed with SIGKILL mid-training, recovered in place by `launch
//! --max-restarts` against a full relaunch of `launch` (what a new gang does, minus the pods).
//! Real ranks on the CPU, real TCPStore on 127.0.0.1, the trainer binary itself as the worker.
//!
//! Measured in each case: seconds from the `kill -9` to the next logged step, and steps lost (the
//! last step logged before the kill minus the step the restart resumed from). In place, rank 0
//! saves the step every rank completed before it stops (the optimizer is not sharded, so it
//! holds all of it), so at most the step in flight is lost; the relaunch resumes from the last
//! periodic checkpoint. The figures are printed (run with --nocapture) for docs/distributed.md.

mod common;

use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::ranks::free_port;
use common::s;
use serde_json::Value;

/// Steps between the periodic checkpoint and the kill: what a restart from that checkpoint loses
/// (an average fault comes half a checkpoint interval after the last save).
const AFTER_SAVE: i64 = 10;

/// The longest any one wait of this test may take: a hang fails it, it does not stall the suite.
const WAIT: Duration = Duration::from_secs(90);

/// A running `launch`: its stdout events as they come, with when they came, and its stderr.
struct Launch {
    child: Child,
    events: Receiver<(Instant, Value)>,
    stderr: Arc<Mutex<String>>,
}

impl Launch {
    /// `launch --nproc-per-node 2 [--max-restarts n] -- train` of a tiny CPU model: a periodic
    /// checkpoint every 6 s, up to 100 000 steps (the test stops it long before).
    fn start(data: &Path, ckpt: &Path, max_restarts: u32) -> Self {
        let port = free_port().to_string();
        let restarts = max_restarts.to_string();
        let mut args = vec![
            "launch",
            "--nproc-per-node",
            "2",
            "--master-port",
            &port,
            "--max-restarts",
            &restarts,
            "--grace-period-s",
            "20",
            "--log-format",
            "json",
            "--",
        ];
        let train = common::tiny_train(
            s(data),
            s(ckpt),
            &[
                "--max-steps",
                "100000",
                "--checkpoint-every-minutes",
                "0.1",
                "--shard-optimizer",
                "off",
                "--dist-timeout-s",
                "20",
            ],
        );
        args.extend(train);
        let mut cmd = Command::new(common::bin());
        common::without_seed_and_torchrun_variables(&mut cmd);
        let mut child = cmd
            .args(&args)
            .env_remove("CHARLM_MAX_RESTARTS")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start launch");
        let (tx, events) = mpsc::channel();
        let stdout = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Ok(v) = serde_json::from_str::<Value>(&line) {
                    if tx.send((Instant::now(), v)).is_err() {
                        return;
                    }
                }
            }
        });
        let stderr = Arc::new(Mutex::new(String::new()));
        let mut from = child.stderr.take().unwrap();
        let to = stderr.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = from.read(&mut buf) {
                if n == 0 {
                    return;
                }
                to.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        Self {
            child,
            events,
            stderr,
        }
    }

    fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// The next event `wanted` picks (others are passed to `seen`), at most [`WAIT`] away.
    fn until(
        &mut self,
        what: &str,
        mut wanted: impl FnMut(&Value) -> bool,
        mut seen: impl FnMut(&Value),
    ) -> (Instant, Value) {
        let deadline = Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.events.recv_timeout(left) {
                Ok((at, v)) if wanted(&v) => return (at, v),
                Ok((_, v)) => seen(&v),
                Err(_) => {
                    let _ = self.child.kill();
                    panic!("no {what} within {WAIT:?}:\n{}", self.stderr());
                }
            }
        }
    }

    /// The pid of the worker of global rank `rank` (launch's child with RANK=rank).
    fn worker(&self, rank: usize) -> i32 {
        let pid = self.child.id();
        let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
            .expect("read launch's children");
        for child in children.split_whitespace() {
            let environ = std::fs::read(format!("/proc/{child}/environ")).unwrap_or_default();
            if environ
                .split(|&b| b == 0)
                .any(|kv| kv == format!("RANK={rank}").as_bytes())
            {
                return child.parse().unwrap();
            }
        }
        panic!("launch {pid} has no worker of rank {rank}: {children}");
    }

    /// SIGTERM (a checkpoint and exit 0), then its exit status and stderr, at most [`WAIT`]
    /// away.
    fn stop(mut self) -> (ExitStatus, String) {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let status = self.wait();
        (status, self.stderr())
    }

    fn wait(&mut self) -> ExitStatus {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                panic!("launch did not exit within {WAIT:?}:\n{}", self.stderr());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn is(v: &Value, event: &str) -> bool {
    v["event"] == event && v["rank"] == 0
}

/// What one fault cost.
#[derive(Debug)]
struct Fault {
    /// From the SIGKILL to the next step event.
    seconds: f64,
    /// The last step logged before the kill.
    last: i64,
    /// The step training started again from.
    resumed: i64,
}

impl Fault {
    fn lost(&self) -> i64 {
        self.last - self.resumed
    }
}

/// Waits for a periodic checkpoint at or past step `at_least`, then for [`AFTER_SAVE`] more steps,
/// kills rank `rank` with SIGKILL, and returns when and the last step logged before.
fn kill_after(launch: &mut Launch, at_least: i64, rank: usize) -> (Instant, i64) {
    let mut saved: Option<i64> = None;
    let mut last = 0;
    launch.until(
        "a step to kill at",
        |v| {
            if is(v, "step") {
                last = v["step"].as_i64().unwrap();
            }
            if is(v, "checkpoint") && v["step"].as_i64().unwrap() >= at_least {
                saved = Some(v["step"].as_i64().unwrap());
            }
            saved.is_some_and(|at| last >= at + AFTER_SAVE)
        },
        |_| {},
    );
    let pid = launch.worker(rank);
    let killed = Instant::now();
    // SAFETY: kill(2) on a grandchild of this test.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    (killed, last)
}

/// After a kill: the `start` of the next training (its resumed step) and its first step event;
/// `last` grows with every step event logged on the way (those the kill overtook).
fn next_step(
    launch: &mut Launch,
    killed: Instant,
    mut last: i64,
    mut seen: impl FnMut(&Value),
) -> Fault {
    let (_, start) = launch.until(
        "the restarted training's start",
        |v| is(v, "start"),
        |v| {
            if is(v, "step") {
                last = last.max(v["step"].as_i64().unwrap());
            }
            seen(v);
        },
    );
    let resumed = start["step"].as_i64().unwrap();
    let (at, _) = launch.until("a step after the restart", |v| is(v, "step"), |_| {});
    Fault {
        seconds: at.duration_since(killed).as_secs_f64(),
        last,
        resumed,
    }
}

#[test]
fn in_place_restart_beats_a_relaunch_and_loses_at_most_one_step() {
    let tmp = tempfile::tempdir().unwrap();
    let data = common::synthetic_data(tmp.path(), 20_000);

    // In place: rank 1 killed, then (round 1) rank 0 killed, whose store launch holds.
    let ckpt = tmp.path().join("in-place");
    let mut launch = Launch::start(&data, &ckpt, 2);
    let (killed, last) = kill_after(&mut launch, 1, 1);
    let mut restart = None;
    let mut salvage = None;
    let mut restarted = None;
    let in_place = next_step(&mut launch, killed, last, |v| {
        if v["event"] == "restart" {
            restart = Some(v.clone());
            restarted = Some(killed.elapsed().as_secs_f64());
        }
        if is(v, "salvage") {
            salvage = Some(v.clone());
        }
    });
    let stderr = launch.stderr();
    let restart = restart.unwrap_or_else(|| panic!("no restart event:\n{stderr}"));
    let salvage = salvage.unwrap_or_else(|| panic!("rank 0 said nothing of saving:\n{stderr}"));
    assert_eq!(restart["round"], 1, "{restart}");
    let reason = restart["reason"].as_str().unwrap();
    assert!(
        reason.starts_with("rank 1 on node 0: killed by SIGKILL; "),
        "{reason}"
    );
    assert_eq!(salvage["saved"], true, "{salvage}\n{stderr}");
    assert!(
        in_place.lost() <= 1,
        "in place lost {} steps: {in_place:?}\n{salvage}",
        in_place.lost()
    );

    // Rank 0 killed: the store is launch's, so the survivor and the next round still meet.
    let (killed0, last0) = kill_after(&mut launch, in_place.resumed + 1, 0);
    let mut reason0 = None;
    let rank0 = next_step(&mut launch, killed0, last0, |v| {
        if v["event"] == "restart" {
            reason0 = v["reason"].as_str().map(str::to_string);
        }
    });
    let reason0 = reason0.expect("a second restart event");
    assert!(
        reason0.starts_with("rank 0 on node 0: killed by SIGKILL; no rank saved"),
        "{reason0}"
    );
    let (status, stderr) = launch.stop();
    assert!(status.success(), "{status}\n{stderr}");

    // A full relaunch: launch without restarts ends with the kill; a new one starts at once.
    let ckpt = tmp.path().join("relaunch");
    let mut first = Launch::start(&data, &ckpt, 0);
    let (killed, last) = kill_after(&mut first, 1, 1);
    let status = first.wait();
    assert_eq!(status.code(), Some(1), "{}", first.stderr());
    let mut last = last;
    while let Ok((_, v)) = first.events.try_recv() {
        if is(&v, "step") {
            last = last.max(v["step"].as_i64().unwrap());
        }
    }
    let mut second = Launch::start(&data, &ckpt, 0);
    let relaunch = next_step(&mut second, killed, last, |_| {});
    let (status, stderr) = second.stop();
    assert!(status.success(), "{status}\n{stderr}");

    eprintln!(
        "kill -9 of rank 1 → next step: in place {:.2} s (the new round began after {:.2} s), \
         {} step(s) lost \
         (step {} → resumed at {}); relaunch {:.2} s, {} step(s) lost (step {} → resumed at {}); \
         kill -9 of rank 0 in place {:.2} s, {} step(s) lost",
        in_place.seconds,
        restarted.unwrap_or(f64::NAN),
        in_place.lost(),
        in_place.last,
        in_place.resumed,
        relaunch.seconds,
        relaunch.lost(),
        relaunch.last,
        relaunch.resumed,
        rank0.seconds,
        rank0.lost(),
    );
    assert!(
        in_place.seconds < relaunch.seconds,
        "in place {in_place:?} was not faster than a relaunch {relaunch:?}"
    );
    // Without the salvage both lose what came after the periodic checkpoint.
    assert!(relaunch.lost() >= AFTER_SAVE, "{relaunch:?}");
    assert!(rank0.lost() >= AFTER_SAVE, "{rank0:?}");
}
