//! `charlm-trainer launch` supervising real processes: the workers are this test binary started
//! again (`--program`) with only the ignored `worker` test selected and a scenario in
//! CHARLM_LAUNCH_TEST_WORKER; one test uses the charlm-trainer binary itself as the worker.

use std::io::{BufRead, BufReader};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

const SCENARIO: &str = "CHARLM_LAUNCH_TEST_WORKER";

// ---------------------------------------------------------------------------------------------
// The worker side.

#[test]
#[ignore = "a worker of the other tests; they start it through `launch`"]
fn worker() {
    let scenario = std::env::var(SCENARIO).expect("started by the other tests of tests/launch.rs");
    let rank: usize = std::env::var("RANK").unwrap().parse().unwrap();
    match scenario.as_str() {
        "echo" => {
            let vars = [
                "RANK",
                "WORLD_SIZE",
                "LOCAL_RANK",
                "LOCAL_WORLD_SIZE",
                "NODE_RANK",
                "NNODES",
                "NPROC_PER_NODE",
                "MASTER_ADDR",
                "MASTER_PORT",
            ];
            let shown: Vec<String> = vars
                .iter()
                .map(|v| format!("{v}={}", std::env::var(v).unwrap()))
                .collect();
            println!("env {}", shown.join(" "));
            eprintln!("a line on stderr");
        }
        "fail-rank-1" => {
            if rank == 1 {
                eprintln!("rank 1 gives up");
                std::process::exit(3);
            }
            std::thread::sleep(Duration::from_secs(60));
            std::process::exit(9);
        }
        "stop-on-sigterm" | "ignore-sigterm" => {
            let stop = Arc::new(AtomicBool::new(false));
            signal_hook::flag::register(signal_hook::consts::SIGTERM, stop.clone()).unwrap();
            println!("ready");
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(60) {
                if stop.load(Ordering::Relaxed) && scenario == "stop-on-sigterm" {
                    println!("stopping after SIGTERM");
                    return;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            std::process::exit(9);
        }
        // Restart rounds: rank 1 fails in round 0 only, or in every round; the others wait to be
        // stopped (SIGTERM's default action ends them).
        "fail-rank-1-once" | "fail-rank-1-always" => {
            let round = std::env::var("TORCHELASTIC_RESTART_COUNT").unwrap_or_default();
            let agent = std::env::var("TORCHELASTIC_USE_AGENT_STORE").unwrap_or_default();
            println!("round {round} agent store {agent}");
            let first = round == "0";
            if rank == 1 && (first || scenario == "fail-rank-1-always") {
                eprintln!("rank 1 crashes in round {round}");
                std::process::exit(1);
            }
            if first || scenario == "fail-rank-1-always" {
                std::thread::sleep(Duration::from_secs(60));
                std::process::exit(9);
            }
        }
        other => panic!("unknown scenario {other}"),
    }
}

// ---------------------------------------------------------------------------------------------
// The test side.

fn launch(scenario: &str, options: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_charlm-trainer"));
    cmd.arg("launch")
        .args(options)
        .arg("--program")
        .arg(std::env::current_exe().unwrap())
        .args([
            "--",
            "worker",
            "--exact",
            "--ignored",
            "--nocapture",
            "--quiet",
        ])
        .env(SCENARIO, scenario)
        // The launcher must set these itself, whatever it inherited.
        .env_remove("RANK")
        .env_remove("WORLD_SIZE")
        .env_remove("NPROC_PER_NODE")
        .env_remove("NNODES")
        .env_remove("NODE_RANK")
        .env_remove("MASTER_ADDR")
        .env_remove("MASTER_PORT");
    cmd
}

fn run_with_limit(mut cmd: Command, limit: Duration) -> (Output, Duration) {
    let start = Instant::now();
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output().unwrap());
    });
    match rx.recv_timeout(limit) {
        Ok(out) => (out, start.elapsed()),
        Err(_) => {
            // SAFETY: kill(2) on our own child.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            panic!("launch still running after {limit:?}");
        }
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Every line of launch's stdout, each of which must be an event of the stream's schema.
fn events(stdout: &str) -> Vec<serde_json::Value> {
    stdout
        .lines()
        .map(|l| {
            let v: serde_json::Value =
                serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l:?}"));
            assert_eq!(v["schema"], 1, "{l}");
            assert!(v["event"].is_string(), "{l}");
            v
        })
        .collect()
}

/// The text a worker of `rank` wrote on stdout, as launch wrapped it in `output` events.
fn output_of(events: &[serde_json::Value], rank: u64) -> Vec<String> {
    events
        .iter()
        .filter(|v| v["event"] == "output" && v["rank"] == rank)
        .map(|v| v["text"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn workers_get_torchrun_env_and_their_output_their_rank() {
    let cmd = launch(
        "echo",
        &[
            "--nproc-per-node",
            "3",
            "--nnodes",
            "2",
            "--node-rank",
            "1",
            "--master-addr",
            "node0",
            "--master-port",
            "29611",
        ],
    );
    let (out, _) = run_with_limit(cmd, Duration::from_secs(60));
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "{}\n{stdout}\n{stderr}", out.status);
    // stdout is one JSON Lines stream: launch's own events and every worker line with its rank.
    let all = events(&stdout);
    assert_eq!(all[0]["event"], "launch", "{stdout}");
    assert_eq!(
        (
            &all[0]["world_size"],
            &all[0]["first_rank"],
            &all[0]["nproc_per_node"]
        ),
        (&6.into(), &3.into(), &3.into())
    );
    for local in 0..3u64 {
        let rank = 3 + local;
        let line = format!(
            "env RANK={rank} WORLD_SIZE=6 LOCAL_RANK={local} LOCAL_WORLD_SIZE=3 NODE_RANK=1 NNODES=2 \
             NPROC_PER_NODE=3 MASTER_ADDR=node0 MASTER_PORT=29611"
        );
        assert!(output_of(&all, rank).contains(&line), "{stdout}");
        assert!(
            all.iter()
                .any(|v| v["event"] == "exit" && v["rank"] == rank && v["exit_code"] == 0),
            "{stdout}"
        );
        assert!(
            stderr
                .lines()
                .any(|l| l == format!("[rank {rank}] a line on stderr")),
            "{stderr}"
        );
    }
}

#[test]
fn human_format_prefixes_each_workers_lines_with_its_rank() {
    let (out, _) = run_with_limit(
        launch("echo", &["--nproc-per-node", "2", "--log-format", "human"]),
        Duration::from_secs(60),
    );
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(stdout.lines().all(|l| l.starts_with("[rank ")), "{stdout}");
    for rank in 0..2 {
        assert!(
            stdout
                .lines()
                .any(|l| l.starts_with(&format!("[rank {rank}] env RANK={rank} "))),
            "{stdout}"
        );
    }
}

#[test]
fn auto_is_one_worker_per_gpu_or_one_without() {
    let (out, _) = run_with_limit(
        launch("echo", &["--nproc-per-node", "auto"]),
        Duration::from_secs(60),
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let expected = (tch::Cuda::device_count() as usize).max(1);
    let stdout = text(&out.stdout);
    let all = events(&stdout);
    assert_eq!(
        all.iter()
            .filter(
                |v| v["event"] == "output" && v["text"].as_str().unwrap().starts_with("env RANK=")
            )
            .count(),
        expected,
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!("WORLD_SIZE={expected} ")),
        "{stdout}"
    );
}

#[test]
fn a_failing_worker_stops_the_others_and_names_its_rank() {
    let (out, took) = run_with_limit(
        launch("fail-rank-1", &["--nproc-per-node", "2"]),
        Duration::from_secs(60),
    );
    let stderr = text(&out.stderr);
    // The worker gives up with exit code 3, the trainer's "checkpoint volume full": launch
    // passes that code on (as it does 2, bad input), so the operator can name the reason.
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert!(
        stderr.contains("error: rank 1 failed: exit status 3"),
        "{stderr}"
    );
    assert!(stderr.contains("[rank 1] rank 1 gives up"), "{stderr}");
    assert!(
        stderr.contains("rank 0: killed by SIGTERM"),
        "rank 0 was not stopped: {stderr}"
    );
    let all = events(&text(&out.stdout));
    assert!(
        all.iter()
            .any(|v| v["event"] == "exit" && v["rank"] == 0 && v["signal"] == "SIGTERM"),
        "{all:?}"
    );
    let error = all.last().unwrap();
    assert_eq!(
        (&error["event"], &error["exit_code"]),
        (&"error".into(), &3.into()),
        "launch's last line is its error: {all:?}"
    );
    assert!(
        error.get("rank").is_none() && error["message"].as_str().unwrap().contains("rank 1 failed")
    );
    assert!(
        took < Duration::from_secs(20),
        "took {took:?}: rank 0 sleeps 60 s unless stopped"
    );
}

#[test]
fn a_worker_user_error_exits_2() {
    // The real trainer as worker, with a subcommand it does not know: clap exits 2 on each rank.
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_charlm-trainer"));
    cmd.args([
        "launch",
        "--nproc-per-node",
        "2",
        "--master-port",
        "29612",
        "--",
        "no-such-command",
    ]);
    let (out, _) = run_with_limit(cmd, Duration::from_secs(60));
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("failed: exit status 2 (bad input or settings"),
        "{stderr}"
    );
    assert!(
        stderr.contains("] error: unrecognized subcommand"),
        "{stderr}"
    );
}

#[test]
fn bad_launch_options_are_user_errors() {
    for (options, wanted) in [
        (&["--nproc-per-node", "0"][..], "--nproc-per-node"),
        (&["--nnodes", "2", "--node-rank", "2"][..], "--node-rank 2"),
    ] {
        let (out, _) = run_with_limit(launch("echo", options), Duration::from_secs(30));
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{options:?}: {stderr}");
        assert!(stderr.contains(wanted), "{options:?}: {stderr}");
    }
}

/// Starts `launch`, waits until `workers` said "ready", sends it SIGTERM, and returns its output.
fn sigterm_when_ready(
    scenario: &str,
    workers: usize,
    options: &[&str],
    limit: Duration,
) -> (Output, Duration) {
    let nproc = workers.to_string();
    let mut all = vec!["--nproc-per-node", nproc.as_str()];
    all.extend_from_slice(options);
    let mut child = launch(scenario, &all)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id() as i32;
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut lines = vec![];
        for line in BufReader::new(stdout).lines() {
            let line = line.unwrap();
            if line.contains(r#""text":"ready""#) {
                let _ = tx.send(());
            }
            lines.push(line);
        }
        lines
    });
    for _ in 0..workers {
        if rx.recv_timeout(Duration::from_secs(30)).is_err() {
            // SAFETY: kill(2) on our own child.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            panic!("workers did not start");
        }
    }
    let start = Instant::now();
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output().unwrap());
    });
    let Ok(mut out) = rx.recv_timeout(limit) else {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        panic!("launch still running {limit:?} after SIGTERM");
    };
    let took = start.elapsed();
    out.stdout = reader.join().unwrap().join("\n").into_bytes();
    (out, took)
}

#[test]
fn sigterm_reaches_the_workers_and_launch_exits_0_when_they_do() {
    let (out, _) = sigterm_when_ready("stop-on-sigterm", 2, &[], Duration::from_secs(30));
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "{}\n{stdout}\n{stderr}", out.status);
    let all = events(&stdout);
    for rank in 0..2 {
        let said = output_of(&all, rank);
        for line in ["ready", "stopping after SIGTERM"] {
            assert!(said.iter().any(|l| l == line), "rank {rank}: {stdout}");
        }
    }
    assert!(
        stderr.contains("launch: got SIGTERM, passing it to 2 running workers"),
        "{stderr}"
    );
}

#[test]
fn workers_that_ignore_sigterm_are_killed_after_the_grace_period() {
    let (out, took) = sigterm_when_ready(
        "ignore-sigterm",
        2,
        &["--grace-period-s", "1"],
        Duration::from_secs(30),
    );
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("did not exit in time and was killed (killed by SIGKILL)"),
        "{stderr}"
    );
    let all = events(&text(&out.stdout));
    let killed: Vec<_> = all
        .iter()
        .filter(|v| v["event"] == "exit" && v["killed"] == true && v["signal"] == "SIGKILL")
        .collect();
    assert_eq!(killed.len(), 2, "{all:?}");
    assert!(
        took < Duration::from_secs(15),
        "took {took:?} with a 1 s grace period"
    );
}

/// What a restart-round worker of `rank` said about its round (the test harness's lines aside).
fn rounds_of(events: &[serde_json::Value], rank: u64) -> Vec<String> {
    output_of(events, rank)
        .into_iter()
        .filter(|l| l.starts_with("round "))
        .collect()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn a_failed_worker_restarts_every_nodes_workers_in_place() {
    // Two nodes of one worker each, on loopback: rank 1 (node 1) fails in round 0; node 0's
    // launch, which hosts the store, must stop rank 0 and both must start round 1 together.
    let port = free_port().to_string();
    let node = |rank: &str| {
        let mut cmd = launch(
            "fail-rank-1-once",
            &[
                "--nnodes",
                "2",
                "--node-rank",
                rank,
                "--master-port",
                &port,
                "--max-restarts",
                "1",
                "--join-timeout-s",
                "30",
            ],
        );
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        cmd
    };
    let node1 = std::thread::spawn({
        let cmd = node("1");
        move || run_with_limit(cmd, Duration::from_secs(60))
    });
    let (out0, took) = run_with_limit(node("0"), Duration::from_secs(60));
    let (out1, _) = node1.join().unwrap();
    let (stdout0, stderr0) = (text(&out0.stdout), text(&out0.stderr));
    let stderr1 = text(&out1.stderr);
    assert!(
        out0.status.success(),
        "node 0: {stderr0}\nnode 1: {stderr1}"
    );
    assert!(
        out1.status.success(),
        "node 1: {stderr1}\nnode 0: {stderr0}"
    );
    let all = events(&stdout0);
    // Rank 0 may be stopped in round 0 before it says anything: rank 1 fails at once.
    assert_eq!(
        rounds_of(&all, 0).last().map(String::as_str),
        Some("round 1 agent store True"),
        "{stdout0}"
    );
    let restart = all
        .iter()
        .find(|v| v["event"] == "restart")
        .expect(&stdout0);
    assert_eq!(
        (&restart["round"], &restart["max_restarts"]),
        (&1.into(), &1.into())
    );
    let reason = restart["reason"].as_str().unwrap();
    assert!(
        reason.starts_with("rank 1 on node 1: exit status 1"),
        "{reason}"
    );
    // No trainer here: no rank 0 to save anything, and node 0's launch says so.
    assert!(
        reason.contains("no rank saved the last complete step"),
        "{reason}"
    );
    assert!(
        stderr0.contains("round 0 ended elsewhere (rank 1 on node 1: exit status 1)"),
        "{stderr0}"
    );
    assert!(
        took < Duration::from_secs(30),
        "took {took:?}: rank 0 sleeps 60 s unless stopped"
    );
}

#[test]
fn in_place_restarts_run_out_into_a_failure() {
    let port = free_port().to_string();
    let (out, took) = run_with_limit(
        launch(
            "fail-rank-1-always",
            &[
                "--nproc-per-node",
                "2",
                "--master-port",
                &port,
                "--max-restarts",
                "2",
            ],
        ),
        Duration::from_secs(60),
    );
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(
            "error: rank 1 failed: exit status 1 (all 2 in-place restart(s) used: \
             --max-restarts, CHARLM_MAX_RESTARTS)"
        ),
        "{stderr}"
    );
    let all = events(&text(&out.stdout));
    let rounds: Vec<_> = all
        .iter()
        .filter(|v| v["event"] == "restart")
        .map(|v| v["round"].as_u64().unwrap())
        .collect();
    assert_eq!(rounds, [1, 2], "{all:?}");
    assert_eq!(
        rounds_of(&all, 1),
        [
            "round 0 agent store True",
            "round 1 agent store True",
            "round 2 agent store True"
        ]
    );
    assert!(took < Duration::from_secs(30), "took {took:?}");
}

#[test]
fn bad_input_is_not_restarted_in_place() {
    // clap exits 2 on each rank: the same input fails the same way in every round.
    let port = free_port().to_string();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_charlm-trainer"));
    cmd.args([
        "launch",
        "--nproc-per-node",
        "2",
        "--master-port",
        &port,
        "--max-restarts",
        "3",
        "--",
        "no-such-command",
    ]);
    let (out, _) = run_with_limit(cmd, Duration::from_secs(60));
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(!stderr.contains("restarting every worker"), "{stderr}");
}
