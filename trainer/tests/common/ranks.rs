//! Ranks of a distributed test: the test binary started again once per rank, with only its
//! ignored `worker` test selected, the scenario in [`SCENARIO`] and torchrun's variables set, on
//! loopback.

use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// The variable naming the scenario a `worker` test runs.
pub const SCENARIO: &str = "CHARLM_DIST_TEST_WORKER";

pub struct Rank {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Rank {
    /// The first line of rank `i`'s output that `wanted` picks, once it is checked to have
    /// succeeded.
    pub fn reported(&self, i: usize, wanted: impl Fn(&str) -> bool) -> &str {
        assert!(
            self.status.success(),
            "rank {i} failed: {}\n{}\n{}",
            self.status,
            self.stdout,
            self.stderr
        );
        self.stdout
            .lines()
            .find(|l| wanted(l))
            .unwrap_or_else(|| panic!("rank {i} did not report:\n{}", self.stdout))
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Starts `ranks` of a world of `world` running `scenario`, and waits (at most `limit`) for all.
pub fn run_ranks(
    scenario: &str,
    ranks: &[usize],
    world: usize,
    timeout_s: f64,
    limit: Duration,
) -> Vec<Rank> {
    let port = free_port();
    let (tx, rx) = mpsc::channel();
    let mut pids = vec![];
    for &rank in ranks {
        let child = Command::new(std::env::current_exe().unwrap())
            .args(["worker", "--exact", "--ignored", "--nocapture", "--quiet"])
            .env(SCENARIO, scenario)
            .env("RANK", rank.to_string())
            .env("WORLD_SIZE", world.to_string())
            .env("LOCAL_RANK", rank.to_string())
            .env("LOCAL_WORLD_SIZE", world.to_string())
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", port.to_string())
            .env("TEST_TIMEOUT_S", timeout_s.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        pids.push(child.id());
        let tx = tx.clone();
        std::thread::spawn(move || {
            let out = child.wait_with_output().unwrap();
            let _ = tx.send((
                rank,
                Rank {
                    status: out.status,
                    stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
                    stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
                },
            ));
        });
    }
    let deadline = Instant::now() + limit;
    let mut done: Vec<(usize, Rank)> = vec![];
    while done.len() < ranks.len() {
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(r) => done.push(r),
            Err(_) => {
                for pid in &pids {
                    // SAFETY: kill(2) on our own children.
                    unsafe { libc::kill(*pid as i32, libc::SIGKILL) };
                }
                panic!("{scenario}: ranks still running after {limit:?}, a hang");
            }
        }
    }
    done.sort_by_key(|(r, _)| *r);
    done.into_iter().map(|(_, r)| r).collect()
}
