//! How ranks agree (`train::consensus`), on CPU ranks meeting at a TCPStore on loopback: rank 0's
//! decisions and state reach every rank bit for bit, and ranks whose run states differ fail at
//! once with an error that names the decision, the step and each rank's values, long before the
//! collective timeout (issue 28: a rank alone in a collective used to wait for it, for ever after
//! each restart). Ranks started with different settings are refused the same way.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{ensure, Result};
use charlm_trainer::dist::{DistEnv, GroupOptions, ProcessGroup};
use charlm_trainer::train::consensus;
use common::ranks::{free_port, run_ranks, SCENARIO};
use common::{s, stderr};
use tch::Device;

/// The collective timeout of these ranks: far above what the tests allow a failure to take.
const TIMEOUT_S: u64 = 60;

#[test]
#[ignore = "a rank of the other tests; they start it"]
fn worker() {
    let scenario =
        std::env::var(SCENARIO).expect("started by the other tests of tests/consensus.rs");
    tch::set_num_threads(1);
    let result = match scenario.as_str() {
        "decide" => agree_then_diverge(),
        other => panic!("unknown scenario {other}"),
    };
    if let Err(err) = result {
        eprintln!("error: {err:#}");
        std::process::exit(1);
    }
}

/// Rank 0's values and state reach every rank; then the last rank's run state differs and the
/// next decision must fail on every rank, at once.
fn agree_then_diverge() -> Result<()> {
    let env = DistEnv::from_env();
    let options = GroupOptions::new(Duration::from_secs(TIMEOUT_S));
    let pg = ProcessGroup::init_with(&env, Device::Cpu, &options)?;
    let (rank, world) = (pg.rank(), pg.world_size());
    let cpu = Device::Cpu;

    // Each rank proposes its own values (a signal only rank 1 saw, its own clock); all get rank 0's.
    let mine = [
        ("signal", f64::from(rank == 1)),
        ("clock", 10.0 + rank as f64),
    ];
    let got = consensus::decide(&pg, cpu, "stop", 5, "{\"step\":5}", &mine)?;
    ensure!(got == [0.0, 10.0], "rank {rank} got {got:?}");
    // Rank 0's state, whole, with floats that must not move by an ulp.
    let x = 1.0f64 / 3.0 + rank as f64;
    let shared: (f64, Option<(f64, i64)>, String) =
        consensus::from_rank0(&pg, cpu, &(x, Some((x * 1e-7, 42)), format!("rank {rank}")))?;
    ensure!(
        shared.0.to_bits() == (1.0f64 / 3.0).to_bits()
            && shared.1.map(|b| b.0.to_bits()) == Some((1.0f64 / 3.0 * 1e-7).to_bits())
            && shared.2 == "rank 0",
        "rank {rank} got {shared:?}"
    );

    // The last rank's state drifted (it never restored the best): the decision fails everywhere.
    let state = if rank == world - 1 {
        "{\"best\":null,\"step\":320}"
    } else {
        "{\"best\":[3.487,180],\"step\":320}"
    };
    let t0 = Instant::now();
    let improved = f64::from(rank == world - 1);
    let err = match consensus::decide(
        &pg,
        cpu,
        "save best/",
        320,
        state,
        &[("save best/", improved)],
    ) {
        Ok(v) => anyhow::bail!("rank {rank}: a diverged decision passed: {v:?}"),
        Err(e) => format!("{e:#}"),
    };
    println!(
        "rank {rank} failed after {:.3} s: {err}",
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}

#[test]
fn diverged_ranks_fail_at_once_naming_the_decision_the_step_and_each_rank() {
    let started = Instant::now();
    let out = run_ranks(
        "decide",
        &[0, 1, 2],
        3,
        TIMEOUT_S as f64,
        Duration::from_secs(TIMEOUT_S),
    );
    for (rank, r) in out.iter().enumerate() {
        let line = r.reported(rank, |l| {
            l.starts_with(&format!("rank {rank} failed after "))
        });
        for part in [
            "differ at step 320",
            "whether to save best/",
            "rank 0: save best/ 0, run state ",
            "rank 1: save best/ 0, run state ",
            "rank 2: save best/ 1, run state ",
            "docs/distributed.md",
        ] {
            assert!(
                line.contains(part),
                "rank {rank}: {part:?} missing in {line}"
            );
        }
        let took: f64 = line
            .split_whitespace()
            .nth(4)
            .and_then(|w| w.parse().ok())
            .unwrap();
        assert!(took < 5.0, "rank {rank} took {took} s to fail: {line}");
    }
    assert!(
        started.elapsed() < Duration::from_secs(TIMEOUT_S / 2),
        "a hang, not a prompt failure"
    );
}

#[test]
fn ranks_started_with_different_settings_are_refused_at_once() {
    let root = tempfile::tempdir().unwrap();
    let data = common::memorising_data(root.path());
    let port = free_port().to_string();
    let started = Instant::now();
    // Rank 1 evaluates every 10 steps, rank 0 every 20: its evaluations' all-reduces would wait
    // for rank 0 until the collective timeout.
    let children: Vec<_> = [(0, "20"), (1, "10")]
        .into_iter()
        .map(|(rank, every)| {
            let ckpt = root.path().join(format!("ckpt{rank}"));
            let mut args = common::tiny_train(s(&data), s(&ckpt), &["--eval-every", every]);
            args.extend_from_slice(&["--max-steps", "40", "--dist-timeout-s", "60"]);
            Command::new(common::bin())
                .args(&args)
                .env("RANK", rank.to_string())
                .env("WORLD_SIZE", "2")
                .env("LOCAL_RANK", "0")
                .env("MASTER_ADDR", "127.0.0.1")
                .env("MASTER_PORT", &port)
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for (rank, child) in children.into_iter().enumerate() {
        let out = child.wait_with_output().unwrap();
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "rank {rank}: {err}");
        assert!(
            err.contains("the ranks were started with different training settings")
                && err.contains("start every rank with the same flags")
                && err.contains(&format!("eval_every: {}", ["20", "10"][rank])),
            "rank {rank}: {err}"
        );
    }
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "took {:?}: a hang, not a prompt refusal",
        started.elapsed()
    );
}
