//! `charlm-trainer launch [options] -- train ...`: what torchrun does on one node. Starts one worker
//! process per GPU with torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE,
//! NODE_RANK, NNODES, NPROC_PER_NODE, MASTER_ADDR, MASTER_PORT), prefixes their output with their
//! rank, forwards SIGTERM/SIGINT to them, and exits 0 only when every worker exited 0. When a worker
//! fails, the others are stopped and the failing rank is named; its exit code 2 ("bad input, do
//! not retry") is passed on as 2, any other failure becomes 1.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};
use charlm_contract::{env, RENDEZVOUS_PORT};
use signal_hook::consts::{SIGINT, SIGKILL, SIGTERM};
use signal_hook::iterator::Signals;

use crate::sys::error::UserError;
use crate::user_bail;

/// How long the other workers get to exit after one of them failed, before SIGKILL.
const AFTER_FAILURE_GRACE: Duration = Duration::from_secs(5);
const POLL: Duration = Duration::from_millis(20);

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Worker processes on this node: a number, or `auto` (one per visible GPU; 1 without GPUs).
    #[arg(long, env = env::NPROC_PER_NODE, default_value = "auto")]
    pub nproc_per_node: String,
    /// Number of nodes (pods) in the job, each running one `launch`.
    #[arg(long, env = env::NNODES, default_value_t = 1)]
    pub nnodes: usize,
    /// This node's index, 0-based; node 0 hosts the rendezvous.
    #[arg(long, env = env::NODE_RANK, default_value_t = 0)]
    pub node_rank: usize,
    /// Host of node 0, where global rank 0 serves the TCPStore.
    #[arg(long, env = env::MASTER_ADDR, default_value = "127.0.0.1")]
    pub master_addr: String,
    /// TCP port of that store.
    #[arg(long, env = env::MASTER_PORT, default_value_t = RENDEZVOUS_PORT)]
    pub master_port: u16,
    /// Seconds workers get to exit after a forwarded SIGTERM/SIGINT before they are killed.
    #[arg(long, env = "CHARLM_LAUNCH_GRACE_S", default_value_t = 30)]
    pub grace_period_s: u64,
    /// Program to start instead of this charlm-trainer (for wrappers such as profilers, and tests).
    #[arg(long)]
    pub program: Option<PathBuf>,
    /// The workers' arguments, after `--`: e.g. `-- train --depth 4`.
    #[arg(last = true, required = true)]
    pub worker_args: Vec<String>,
}

pub fn run(args: Args) -> Result<()> {
    let nproc = processes_per_node(&args.nproc_per_node)?;
    if args.nnodes == 0 {
        user_bail!("--nnodes (NNODES) must be at least 1");
    }
    if args.node_rank >= args.nnodes {
        user_bail!(
            "--node-rank {} (NODE_RANK) must be below --nnodes {} (NNODES)",
            args.node_rank,
            args.nnodes
        );
    }
    if args.master_port == 0 {
        user_bail!("--master-port (MASTER_PORT) must be a TCP port, 1-65535");
    }
    let program = match &args.program {
        Some(p) => p.clone(),
        None => {
            std::env::current_exe().context("cannot find this executable to start its workers")?
        }
    };
    let world = args.nnodes * nproc;
    let first = args.node_rank * nproc;

    // Registered before the first worker starts, so that no signal is lost in between.
    let mut signals = Signals::new([SIGTERM, SIGINT]).context("installing signal handlers")?;
    note(&format!(
        "starting ranks {first}-{} of {world} (node {} of {}), rendezvous at {}:{}",
        first + nproc - 1,
        args.node_rank,
        args.nnodes,
        args.master_addr,
        args.master_port
    ));

    let mut workers: Vec<Worker> = Vec::with_capacity(nproc);
    for local in 0..nproc {
        let rank = first + local;
        let env = [
            (env::RANK, rank.to_string()),
            (env::WORLD_SIZE, world.to_string()),
            (env::LOCAL_RANK, local.to_string()),
            (env::LOCAL_WORLD_SIZE, nproc.to_string()),
            (env::NODE_RANK, args.node_rank.to_string()),
            (env::NNODES, args.nnodes.to_string()),
            (env::NPROC_PER_NODE, nproc.to_string()),
            (env::MASTER_ADDR, args.master_addr.clone()),
            (env::MASTER_PORT, args.master_port.to_string()),
        ];
        match Worker::start(&program, &args.worker_args, rank, &env) {
            Ok(w) => workers.push(w),
            Err(err) => {
                stop_all(&mut workers, SIGKILL);
                for w in &mut workers {
                    let _ = w.child.wait();
                }
                return Err(err);
            }
        }
    }

    let outcome = supervise(
        &mut workers,
        &mut signals,
        Duration::from_secs(args.grace_period_s),
    )?;
    for w in &mut workers {
        w.join_output();
    }
    let summary: Vec<String> = workers
        .iter()
        .map(|w| format!("rank {}: {}", w.rank, describe(w.status)))
        .collect();
    note(&summary.join(", "));
    match outcome {
        None => Ok(()),
        Some(Failure {
            rank,
            status,
            killed,
        }) => {
            let what = if killed {
                format!(
                    "rank {rank} did not exit in time and was killed ({})",
                    describe(Some(status))
                )
            } else {
                format!("rank {rank} failed: {}", describe(Some(status)))
            };
            if status.code() == Some(2) {
                Err(UserError(format!(
                    "{what} (bad input or settings: see its message above)"
                ))
                .into())
            } else {
                Err(anyhow!(what))
            }
        }
    }
}

/// `auto` is one process per visible CUDA GPU, or 1 on a machine without any.
fn processes_per_node(value: &str) -> Result<usize> {
    if value.trim() == "auto" {
        return Ok(usize::try_from(tch::Cuda::device_count())
            .unwrap_or(0)
            .max(1));
    }
    match value.trim().parse::<usize>() {
        Ok(n) if n >= 1 => Ok(n),
        _ => user_bail!(
            "--nproc-per-node (NPROC_PER_NODE) is {value:?}: use a positive number or `auto`"
        ),
    }
}

struct Failure {
    rank: usize,
    status: ExitStatus,
    /// Killed by the launcher because it outlived its grace period.
    killed: bool,
}

/// Waits for every worker; returns the first failure, if any.
fn supervise(
    workers: &mut [Worker],
    signals: &mut Signals,
    grace: Duration,
) -> Result<Option<Failure>> {
    let mut failure: Option<Failure> = None;
    // When the workers still running get SIGKILL: set by a signal or a failure.
    let mut deadline: Option<Instant> = None;
    let mut killed = false;
    loop {
        for sig in signals.pending() {
            let live = workers.iter().filter(|w| w.status.is_none()).count();
            note(&format!(
                "got {}, passing it to {live} running workers",
                signal_name(sig)
            ));
            stop_all(workers, sig);
            let end = Instant::now() + grace;
            deadline = Some(deadline.map_or(end, |d| d.min(end)));
        }
        let mut newly_failed = false;
        for w in workers.iter_mut().filter(|w| w.status.is_none()) {
            let Some(status) = w
                .child
                .try_wait()
                .with_context(|| format!("waiting for rank {}", w.rank))?
            else {
                continue;
            };
            w.status = Some(status);
            if !status.success() && failure.is_none() {
                note(&format!(
                    "rank {} failed ({}); stopping the other workers",
                    w.rank,
                    describe(Some(status))
                ));
                let by_us = killed && status.signal() == Some(SIGKILL);
                failure = Some(Failure {
                    rank: w.rank,
                    status,
                    killed: by_us,
                });
                newly_failed = true;
            }
        }
        if workers.iter().all(|w| w.status.is_some()) {
            return Ok(failure);
        }
        if newly_failed && !killed {
            stop_all(workers, SIGTERM);
            let end = Instant::now() + AFTER_FAILURE_GRACE;
            deadline = Some(deadline.map_or(end, |d| d.min(end)));
        }
        if deadline.is_some_and(|d| Instant::now() >= d) && !killed {
            let live: Vec<String> = workers
                .iter()
                .filter(|w| w.status.is_none())
                .map(|w| w.rank.to_string())
                .collect();
            note(&format!(
                "grace period over; killing rank(s) {}",
                live.join(", ")
            ));
            stop_all(workers, SIGKILL);
            killed = true;
        }
        std::thread::sleep(POLL);
    }
}

/// Sends `sig` to the process group of every worker not yet reaped (a reaped worker's id may
/// belong to someone else by now; an unreaped one's cannot).
fn stop_all(workers: &mut [Worker], sig: i32) {
    for w in workers.iter().filter(|w| w.status.is_none()) {
        // SAFETY: kill(2) with a process group id we own; failure (already gone) is harmless.
        unsafe { libc::kill(-(w.child.id() as libc::pid_t), sig) };
    }
}

/// The launcher's own messages, on stderr; a closed stderr must not stop the supervision.
fn note(message: &str) {
    let _ = writeln!(std::io::stderr(), "launch: {message}");
}

fn signal_name(sig: i32) -> String {
    signal_hook::low_level::signal_name(sig).map_or_else(|| format!("signal {sig}"), str::to_string)
}

fn describe(status: Option<ExitStatus>) -> String {
    match status {
        None => "still running".into(),
        Some(s) => match (s.code(), s.signal()) {
            (Some(code), _) => format!("exit status {code}"),
            (None, Some(sig)) => format!("killed by {}", signal_name(sig)),
            _ => format!("{s}"),
        },
    }
}

struct Worker {
    rank: usize,
    child: Child,
    status: Option<ExitStatus>,
    output: Vec<JoinHandle<()>>,
}

impl Worker {
    fn start(
        program: &PathBuf,
        args: &[String],
        rank: usize,
        env: &[(&str, String)],
    ) -> Result<Self> {
        let mut cmd = Command::new(program);
        cmd.args(args)
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Its own process group: a terminal's Ctrl-C reaches the launcher only, which forwards
            // it once, and a signal reaches whatever the worker itself started.
            .process_group(0);
        // SAFETY: prctl is async-signal-safe, as required between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                // Workers die with the launcher even when it is SIGKILLed and cannot stop them.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting rank {rank}: {}", program.display()))?;
        let stdout = child.stdout.take().expect("piped stdout");
        let stderr = child.stderr.take().expect("piped stderr");
        let output = vec![
            forward(stdout, rank, Stream::Stdout),
            forward(stderr, rank, Stream::Stderr),
        ];
        Ok(Self {
            rank,
            child,
            status: None,
            output,
        })
    }

    fn join_output(&mut self) {
        for handle in self.output.drain(..) {
            let _ = handle.join();
        }
    }
}

#[derive(Clone, Copy)]
enum Stream {
    Stdout,
    Stderr,
}

/// Copies `from` line by line to the launcher's `to`, each line prefixed with `[rank N] `.
fn forward(from: impl Read + Send + 'static, rank: usize, to: Stream) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut reader = BufReader::new(from);
        let prefix = format!("[rank {rank}] ");
        let mut line = Vec::new();
        loop {
            line.clear();
            match reader.read_until(b'\n', &mut line) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    if line.last() != Some(&b'\n') {
                        line.push(b'\n');
                    }
                    let mut record = Vec::with_capacity(prefix.len() + line.len());
                    record.extend_from_slice(prefix.as_bytes());
                    record.extend_from_slice(&line);
                    // One locked write per line keeps lines whole; a closed terminal must not stop
                    // the draining, or the worker would block on a full pipe.
                    let _ = match to {
                        Stream::Stdout => {
                            let mut out = std::io::stdout().lock();
                            out.write_all(&record).and_then(|()| out.flush())
                        }
                        Stream::Stderr => std::io::stderr().lock().write_all(&record),
                    };
                }
            }
        }
    })
}
