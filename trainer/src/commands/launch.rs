//! `charlm-trainer launch [options] -- train ...`: what torchrun does on one node. Starts one worker
//! process per GPU with torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE,
//! NODE_RANK, NNODES, NPROC_PER_NODE, MASTER_ADDR, MASTER_PORT), passes their stdout on as one
//! JSON Lines stream whose every line carries its worker's `rank` (docs/contract.md), prefixes their
//! human lines with `[rank N] `, forwards SIGTERM/SIGINT to them, and exits 0 only when every worker
//! exited 0. When a worker
//! fails, the others are stopped and the failing rank is named; its exit code 2 ("bad input, do
//! not retry") is passed on as 2, any other failure becomes 1.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};
use charlm_contract::{env, RENDEZVOUS_PORT};
use signal_hook::consts::{SIGKILL, SIGTERM};
use signal_hook::iterator::Signals;

use charlm_contract::events::{self, Event, Line};

use crate::sys::children::{self, signal_name};
use crate::sys::error::UserError;
use crate::sys::events::Events;
use crate::sys::flags::{self, LogFormat};
use crate::user_bail;

/// The workers' `--log-format`: what the launcher's resolved to.
const LOG_FORMAT_ENV: &str = "CHARLM_LOG_FORMAT";

/// How long the other workers get to exit after one of them failed, before SIGKILL.
const AFTER_FAILURE_GRACE: Duration = Duration::from_secs(5);
const POLL: Duration = Duration::from_millis(20);

/// Launch's flags follow the `CHARLM_<FLAG>` rule; its rendezvous flags also read torchrun's
/// variables (`NPROC_PER_NODE`, `NNODES`, `NODE_RANK`, `MASTER_ADDR`, `MASTER_PORT`: what
/// torchrun, Kubeflow's PyTorchJob and the operator set; `sys::flags::ALIASES`) and take
/// torchrun's spellings as aliases (`--nproc_per_node`, ...).
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Worker processes on this node: 1 or more, or `auto` (one per visible GPU; 1 without GPUs).
    #[arg(long, default_value = "auto", value_parser = processes,
          visible_alias = "nproc_per_node")]
    pub nproc_per_node: String,
    /// Number of nodes (pods) in the job, 1 or more, each running one `launch`.
    #[arg(long, default_value_t = 1, value_parser = flags::at_least(1usize))]
    pub nnodes: usize,
    /// This node's index, 0 to --nnodes - 1; node 0 hosts the rendezvous.
    #[arg(long, default_value_t = 0, value_parser = flags::at_least(0usize),
          visible_alias = "node_rank")]
    pub node_rank: usize,
    /// Host of node 0, where global rank 0 serves the TCPStore.
    #[arg(long, default_value = "127.0.0.1", visible_alias = "master_addr")]
    pub master_addr: String,
    /// TCP port of that store, 1 to 65535.
    #[arg(long, default_value_t = RENDEZVOUS_PORT,
          value_parser = flags::int(1u16, u16::MAX), visible_alias = "master_port")]
    pub master_port: u16,
    /// Seconds workers get to exit after a forwarded SIGTERM/SIGINT before they are killed, 0 or
    /// more.
    #[arg(long, default_value_t = 30,
          value_parser = flags::at_least(0u64))]
    pub grace_period_s: u64,
    /// Program to start instead of this charlm-trainer (for wrappers such as profilers, and
    /// tests). Unset: this executable.
    #[arg(long)]
    pub program: Option<PathBuf>,
    /// auto (human in a terminal, else json), human (workers' lines prefixed `[rank N] `) or json
    /// (one JSON Lines stream on stdout, each line with its worker's `rank`; human lines on
    /// stderr). Passed on to the workers as CHARLM_LOG_FORMAT.
    #[arg(long, value_enum, default_value = "auto")]
    pub log_format: LogFormat,
    /// The workers' command, after `--`: e.g. `-- train --depth 4`.
    #[arg(last = true, required = true)]
    pub worker_args: Vec<String>,
}

/// `--nproc-per-node`: `auto` or a positive number.
fn processes(s: &str) -> Result<String, String> {
    if s.trim() == "auto" {
        return Ok("auto".into());
    }
    flags::at_least(1usize)(s).map(|n| n.to_string())
}

pub fn run(args: Args) -> Result<()> {
    let nproc = processes_per_node(&args.nproc_per_node)?;
    let events = Events::new(args.log_format, None);
    let format = if events.is_on() { "json" } else { "human" };
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
    let mut signals = children::stop_signals()?;
    note(&format!(
        "starting ranks {first}-{} of {world} (node {} of {}), rendezvous at {}:{}",
        first + nproc - 1,
        args.node_rank,
        args.nnodes,
        args.master_addr,
        args.master_port
    ));

    events.emit(Event::Launch(events::Launch {
        node_rank: args.node_rank as u64,
        nnodes: args.nnodes as u64,
        nproc_per_node: nproc as u64,
        world_size: world as u64,
        first_rank: first as u64,
        master_addr: args.master_addr.clone(),
        master_port: args.master_port,
    }));

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
            (LOG_FORMAT_ENV, format.to_string()),
        ];
        match Worker::start(&program, &args.worker_args, rank, &env, events.is_on()) {
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
        let status = w.status;
        events.emit_as(
            Some(w.rank as u64),
            Event::Exit(events::WorkerExit {
                exit_code: status.and_then(|s| s.code()),
                signal: status.and_then(|s| s.signal()).map(signal_name),
                killed: w.killed,
            }),
        );
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
            for w in workers.iter_mut().filter(|w| w.status.is_none()) {
                w.killed = true;
            }
            killed = true;
        }
        std::thread::sleep(POLL);
    }
}

/// Sends `sig` to the process group of every worker not yet reaped.
fn stop_all(workers: &mut [Worker], sig: i32) {
    for w in workers.iter().filter(|w| w.status.is_none()) {
        children::signal_group(&w.child, sig);
    }
}

/// The launcher's own messages, on stderr; a closed stderr must not stop the supervision.
fn note(message: &str) {
    let _ = writeln!(std::io::stderr(), "launch: {message}");
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
    /// Killed by the launcher after its grace period.
    killed: bool,
    output: Vec<JoinHandle<()>>,
}

impl Worker {
    fn start(
        program: &PathBuf,
        args: &[String],
        rank: usize,
        env: &[(&str, String)],
        json: bool,
    ) -> Result<Self> {
        let mut cmd = Command::new(program);
        cmd.args(args)
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // A worker that lost its launcher has no one to report to: it dies with it.
        children::tie_to_parent(&mut cmd, SIGKILL);
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting rank {rank}: {}", program.display()))?;
        let stdout = child.stdout.take().expect("piped stdout");
        let stderr = child.stderr.take().expect("piped stderr");
        let stdout_as = if json { Stream::Events } else { Stream::Stdout };
        let output = vec![
            forward(stdout, rank, stdout_as),
            forward(stderr, rank, Stream::Stderr),
        ];
        Ok(Self {
            rank,
            child,
            status: None,
            killed: false,
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
    /// Human lines, prefixed `[rank N] `.
    Stdout,
    Stderr,
    /// The worker's event stream, passed on as events of the launcher's (see [`as_event`]).
    Events,
}

/// Copies `from` line by line to the launcher's stdout or stderr: human lines prefixed with
/// `[rank N] `, event lines as [`as_event`] makes them.
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
                    if line.last() == Some(&b'\n') {
                        line.pop();
                    }
                    let mut record = match to {
                        Stream::Events => as_event(&line, rank),
                        _ => [prefix.as_bytes(), &line].concat(),
                    };
                    record.push(b'\n');
                    // One locked write per line keeps lines whole; a closed terminal must not stop
                    // the draining, or the worker would block on a full pipe.
                    let _ = match to {
                        Stream::Stdout | Stream::Events => {
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

/// A worker's stdout line as a line of the launcher's stream: an event line as it is (with the
/// worker's `rank` added when it lacks one), anything else wrapped in an `output` event, so that
/// every line of stdout is an event.
fn as_event(line: &[u8], rank: usize) -> Vec<u8> {
    let parsed: Option<serde_json::Map<String, serde_json::Value>> =
        serde_json::from_slice(line).ok();
    match parsed {
        Some(map) if map.contains_key("schema") && map.contains_key("event") => {
            if map.contains_key("rank") {
                return line.to_vec();
            }
            let mut with_rank = map;
            with_rank.insert("rank".into(), (rank as u64).into());
            serde_json::to_vec(&with_rank).unwrap_or_else(|_| line.to_vec())
        }
        _ => {
            let text = String::from_utf8_lossy(line).into_owned();
            let event = Line::new(Some(rank as u64), Event::Output(events::Output { text }));
            serde_json::to_vec(&event).unwrap_or_default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_forwarded_line_is_an_event_with_its_rank() {
        let own = br#"{"schema":1,"rank":3,"event":"step","step":1}"#;
        assert_eq!(as_event(own, 3), own.to_vec());
        let without: serde_json::Value =
            serde_json::from_slice(&as_event(br#"{"schema":1,"event":"eval"}"#, 2)).unwrap();
        assert_eq!(without["rank"], 2);
        for text in ["plain text", r#"{"no":"schema"}"#, ""] {
            let line =
                Line::parse(std::str::from_utf8(&as_event(text.as_bytes(), 1)).unwrap()).unwrap();
            assert_eq!(line.rank, Some(1));
            assert_eq!(
                line.event,
                Event::Output(events::Output { text: text.into() })
            );
        }
    }
}
