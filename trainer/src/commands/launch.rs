//! `charlm-trainer launch [options] -- train ...`: what torchrun does on one node. Starts one worker
//! process per GPU with torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE,
//! NODE_RANK, NNODES, NPROC_PER_NODE, MASTER_ADDR, MASTER_PORT), passes their stdout on as one
//! JSON Lines stream whose every line carries its worker's `rank` (docs/contract.md), prefixes their
//! human lines with `[rank N] `, forwards SIGTERM/SIGINT to them, and exits 0 only when every worker
//! exited 0.
//!
//! Node 0's launch hosts the job's TCPStore, so that it outlives the workers (`dist::rounds`).
//! When a worker fails, the others are stopped everywhere; with `--max-restarts N` every node's
//! launch then starts all its workers again, in place, from the newest checkpoint, up to N times.
//! After that (or with N = 0) the failing rank is named and launch fails: its exit code 2 ("bad
//! input, do not retry") is passed on as 2, 3 (a full checkpoint volume) as 3, any other failure
//! becomes 1; neither 2 nor 3 is retried in place.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};
use charlm_contract::{env, exit, RENDEZVOUS_PORT};
use signal_hook::consts::{SIGKILL, SIGTERM};
use signal_hook::iterator::Signals;

use charlm_contract::events::{self, Event, Line};

use crate::dist::rounds::{Abort, Rendezvous};
use crate::sys::children::{self, signal_name};
use crate::sys::error::{StorageFull, UserError};
use crate::sys::events::Events;
use crate::sys::flags::{self, LogFormat};
use crate::user_bail;

/// The workers' `--log-format`: what the launcher's resolved to.
const LOG_FORMAT_ENV: &str = "CHARLM_LOG_FORMAT";

/// How long the other workers get to exit after one of them failed, before SIGKILL, when they
/// cannot save anything (no `--max-restarts`, so no store of launch's to tell them).
const AFTER_FAILURE_GRACE: Duration = Duration::from_secs(5);
const POLL: Duration = Duration::from_millis(20);
/// How often the agent looks for another node's end of the round.
const ROUND_POLL: Duration = Duration::from_millis(50);

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
    /// This node's index, 0 to --nnodes - 1; node 0's launch hosts the rendezvous store.
    #[arg(long, default_value_t = 0, value_parser = flags::at_least(0usize),
          visible_alias = "node_rank")]
    pub node_rank: usize,
    /// Host of node 0, whose launch serves the TCPStore every worker meets at.
    #[arg(long, default_value = "127.0.0.1", visible_alias = "master_addr")]
    pub master_addr: String,
    /// TCP port of that store, 1 to 65535.
    #[arg(long, default_value_t = RENDEZVOUS_PORT,
          value_parser = flags::int(1u16, u16::MAX), visible_alias = "master_port")]
    pub master_port: u16,
    /// In-place restarts, 0 to 1000 (torchrun's --max-restarts): when a worker fails, every
    /// node's launch stops its workers and starts them all again from the newest checkpoint, up
    /// to this many times in all, before it fails. 0: the first failure ends launch. A worker's
    /// exit code 2 (bad input) is never retried.
    #[arg(long, default_value_t = 0, value_parser = flags::int(0u32, 1000),
          visible_alias = "max_restarts")]
    pub max_restarts: u32,
    /// Seconds each node's launch waits for every node at the start of each round (and, off node
    /// 0, for node 0's store), 1 or more.
    #[arg(long, default_value_t = 600, value_parser = flags::at_least(1u64))]
    pub join_timeout_s: u64,
    /// Seconds workers get to exit after a forwarded SIGTERM/SIGINT, or after a peer failed
    /// (time for rank 0 to save the last complete step), before they are killed, 0 or more.
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

/// What every round of this node's workers shares.
struct Node {
    program: PathBuf,
    worker_args: Vec<String>,
    nproc: usize,
    world: usize,
    first: usize,
    node_rank: usize,
    nnodes: usize,
    master_addr: String,
    master_port: u16,
    max_restarts: u64,
    grace: Duration,
    format: &'static str,
    json: bool,
}

pub fn run(args: Args) -> Result<()> {
    let nproc = processes_per_node(&args.nproc_per_node)?;
    let events = Events::new(args.log_format, None);
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
    let node = Node {
        program,
        worker_args: args.worker_args.clone(),
        nproc,
        world: args.nnodes * nproc,
        first: args.node_rank * nproc,
        node_rank: args.node_rank,
        nnodes: args.nnodes,
        master_addr: args.master_addr.clone(),
        master_port: args.master_port,
        max_restarts: u64::from(args.max_restarts),
        grace: Duration::from_secs(args.grace_period_s),
        format: if events.is_on() { "json" } else { "human" },
        json: events.is_on(),
    };

    // Registered before the first worker starts, so that no signal is lost in between.
    let mut signals = children::stop_signals()?;
    note(&format!(
        "starting ranks {}-{} of {} (node {} of {}), rendezvous at {}:{}{}",
        node.first,
        node.first + nproc - 1,
        node.world,
        args.node_rank,
        args.nnodes,
        args.master_addr,
        args.master_port,
        if node.max_restarts > 0 {
            format!(", up to {} in-place restart(s)", node.max_restarts)
        } else {
            String::new()
        }
    ));

    events.emit(Event::Launch(events::Launch {
        node_rank: args.node_rank as u64,
        nnodes: args.nnodes as u64,
        nproc_per_node: nproc as u64,
        world_size: node.world as u64,
        first_rank: node.first as u64,
        master_addr: args.master_addr.clone(),
        master_port: args.master_port,
    }));

    // Without restarts nothing needs a store that outlives the workers: rank 0 hosts it, as
    // torchrun's static rendezvous does, and nodes do not wait for each other.
    let join_timeout = Duration::from_secs(args.join_timeout_s);
    let rdzv = if node.max_restarts > 0 {
        let rdzv = Rendezvous::connect(
            &args.master_addr,
            args.master_port,
            args.node_rank,
            args.nnodes,
            join_timeout,
        )?;
        rdzv.agree(
            &format!(
                "--nnodes {} --nproc-per-node {nproc} --max-restarts {}",
                args.nnodes, node.max_restarts
            ),
            join_timeout,
        )?;
        Some(rdzv)
    } else {
        None
    };

    let mut reason: Option<String> = None;
    for round in 0..=node.max_restarts {
        if let Some(rdzv) = &rdzv {
            let mut stopped = false;
            rdzv.join(round, join_timeout, || {
                stopped |= signals.pending().next().is_some();
                stopped
            })?;
        }
        if let (Some(rdzv), true) = (&rdzv, round > 0 && node.node_rank == 0) {
            // Every node joined, so every worker of the round before is gone.
            match rdzv.forget(round - 1) {
                Ok(n) if n > 0 => note(&format!(
                    "deleted {n} key(s) round {} left in the store",
                    round - 1
                )),
                Ok(_) => {}
                Err(e) => note(&format!("could not clean round {}: {e:#}", round - 1)),
            }
        }
        let mut workers = start_workers(&node, rdzv.is_some(), round, reason.as_deref())?;
        let end = supervise(&mut workers, &mut signals, &node, rdzv.as_ref(), round)?;
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
        let abort = match end {
            RoundEnd::Done => return Ok(()),
            RoundEnd::Failed(failure) => return Err(failure.into_error()),
            RoundEnd::Restart(abort) => abort,
        };
        // What rank 0 said about saving the last complete step goes into the reason the next
        // round's rank 0 reports. Node 0's launch outlived its rank 0, so the note is there now
        // if rank 0 wrote one; elsewhere rank 0 may still be saving.
        let rdzv = rdzv.as_ref().expect("a restart needs the rendezvous");
        let saved = rdzv
            .salvaged(round)
            .unwrap_or_else(|e| Some(format!("({e:#})")));
        let why = match saved {
            Some(s) => format!("{}; {s}", abort.reason),
            None if node.node_rank == 0 => format!(
                "{}; no rank saved the last complete step (only rank 0 saves, and it failed, or \
                 was an NCCL rank, which cannot): the restart resumes from the newest checkpoint",
                abort.reason
            ),
            None => abort.reason.clone(),
        };
        note(&format!(
            "restarting every worker in place, round {} of at most {}: {why}",
            round + 1,
            node.max_restarts
        ));
        events.emit(Event::Restart(events::Restart {
            round: round + 1,
            max_restarts: node.max_restarts,
            reason: why.clone(),
        }));
        reason = Some(why);
    }
    unreachable!("the last round either ends launch or is not retried")
}

/// Starts this node's workers of `round`.
fn start_workers(
    node: &Node,
    agent_store: bool,
    round: u64,
    reason: Option<&str>,
) -> Result<Vec<Worker>> {
    let mut workers: Vec<Worker> = Vec::with_capacity(node.nproc);
    for local in 0..node.nproc {
        let rank = node.first + local;
        let mut vars = vec![
            (env::RANK, rank.to_string()),
            (env::WORLD_SIZE, node.world.to_string()),
            (env::LOCAL_RANK, local.to_string()),
            (env::LOCAL_WORLD_SIZE, node.nproc.to_string()),
            (env::NODE_RANK, node.node_rank.to_string()),
            (env::NNODES, node.nnodes.to_string()),
            (env::NPROC_PER_NODE, node.nproc.to_string()),
            (env::MASTER_ADDR, node.master_addr.clone()),
            (env::MASTER_PORT, node.master_port.to_string()),
            (LOG_FORMAT_ENV, node.format.to_string()),
        ];
        if agent_store {
            vars.extend([
                (env::USE_AGENT_STORE, "True".to_string()),
                (env::RESTART_COUNT, round.to_string()),
                (
                    env::TORCHELASTIC_MAX_RESTARTS,
                    node.max_restarts.to_string(),
                ),
            ]);
        }
        if let Some(reason) = reason {
            vars.push((env::RESTART_REASON, reason.to_string()));
        }
        match Worker::start(node, rank, &vars) {
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
    Ok(workers)
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

/// How a round of this node's workers ended.
enum RoundEnd {
    /// Every worker exited 0.
    Done,
    /// A worker failed (here or on another node) and another round may help.
    Restart(Abort),
    /// A failure no further round may mend.
    Failed(Failure),
}

/// Why launch fails, as its error says it.
struct Failure {
    message: String,
    /// The pod's exit code: a worker's 2 (bad input) or 3 (a full checkpoint volume) passed
    /// on, 1 for anything else.
    code: i32,
}

impl Failure {
    /// A local worker's failure; `by_us` when launch killed it after its grace period.
    fn of(rank: usize, status: ExitStatus, by_us: bool) -> Self {
        let message = if by_us {
            format!(
                "rank {rank} did not exit in time and was killed ({})",
                describe(Some(status))
            )
        } else {
            format!("rank {rank} failed: {}", describe(Some(status)))
        };
        let code = match status.code() {
            Some(c @ (exit::BAD_INPUT | exit::STORAGE_FULL)) => c,
            _ => exit::FAILURE,
        };
        Self { message, code }
    }

    /// Bad input and a full volume fail the same way in every round: no restart mends them.
    fn retryable(&self) -> bool {
        self.code == exit::FAILURE
    }

    fn into_error(self) -> anyhow::Error {
        match self.code {
            exit::BAD_INPUT => UserError(format!(
                "{} (bad input or settings: see its message above)",
                self.message
            ))
            .into(),
            exit::STORAGE_FULL => StorageFull(format!(
                "{} (its checkpoint volume is full: see its message above)",
                self.message
            ))
            .into(),
            _ => anyhow!(self.message),
        }
    }
}

/// Waits for every worker of `round`, stopping them all when one fails here or another node's
/// launch ends the round; says whether another round follows.
fn supervise(
    workers: &mut [Worker],
    signals: &mut Signals,
    node: &Node,
    rdzv: Option<&Rendezvous>,
    round: u64,
) -> Result<RoundEnd> {
    // The first local failure, and the record that ended the round (ours or another node's).
    let mut failure: Option<Failure> = None;
    let mut abort: Option<Abort> = None;
    // A stop signal came: no further round, whatever happens.
    let mut stopping = false;
    // The store went away (node 0's launch ended or its pod is lost).
    let mut store_lost: Option<String> = None;
    // When the workers still running get SIGKILL: set by a signal or a failure.
    let mut deadline: Option<Instant> = None;
    let mut killed = false;
    let mut next_poll = Instant::now();
    let last_round = round >= node.max_restarts;
    loop {
        for sig in signals.pending() {
            let live = workers.iter().filter(|w| w.status.is_none()).count();
            note(&format!(
                "got {}, passing it to {live} running workers",
                signal_name(sig)
            ));
            stop_all(workers, sig);
            stopping = true;
            let end = Instant::now() + node.grace;
            deadline = Some(deadline.map_or(end, |d| d.min(end)));
        }
        let mut newly_ended = false;
        for w in workers.iter_mut().filter(|w| w.status.is_none()) {
            let Some(status) = w
                .child
                .try_wait()
                .with_context(|| format!("waiting for rank {}", w.rank))?
            else {
                continue;
            };
            w.status = Some(status);
            // Once the round is over, the others' exits (a failed collective) are its echo.
            if status.success() || abort.is_some() || failure.is_some() {
                continue;
            }
            note(&format!(
                "rank {} failed ({}); stopping the other workers",
                w.rank,
                describe(Some(status))
            ));
            let by_us = killed && status.signal() == Some(SIGKILL);
            let local = Failure::of(w.rank, status, by_us);
            let mine = Abort {
                reason: format!(
                    "rank {} on node {}: {}",
                    w.rank,
                    node.node_rank,
                    describe(Some(status))
                ),
                retry: !stopping && local.retryable() && !last_round,
                exit_code: local.code,
            };
            let standing = match rdzv.map(|r| r.abandon(round, &mine)) {
                None => mine.clone(),
                Some(Ok(first)) => first,
                Some(Err(e)) => {
                    store_lost.get_or_insert(format!("{e:#}"));
                    mine.clone()
                }
            };
            // Another node's failure came first: this one is likely its echo.
            if standing == mine {
                failure = Some(local);
            }
            abort = Some(standing);
            newly_ended = true;
        }
        if workers.iter().all(|w| w.status.is_some()) {
            break;
        }
        let poll = rdzv.filter(|_| abort.is_none() && store_lost.is_none());
        if let Some(rdzv) = poll.filter(|_| Instant::now() >= next_poll) {
            next_poll = Instant::now() + ROUND_POLL;
            match rdzv.abandoned(round) {
                Ok(Some(theirs)) => {
                    note(&format!(
                        "round {round} ended elsewhere ({}); stopping this node's workers",
                        theirs.reason
                    ));
                    abort = Some(theirs);
                    newly_ended = true;
                }
                Ok(None) => {}
                Err(e) => {
                    // Node 0's launch ended (the job is finishing) or its pod is gone: only a
                    // worker that fails now makes this a failure.
                    note(&format!(
                        "the rendezvous store at {} is gone ({e:#}): node 0's launch ended or \
                         its pod is lost, so no in-place restart is possible from now on",
                        rdzv.endpoint()
                    ));
                    store_lost = Some(format!("{e:#}"));
                }
            }
        }
        if newly_ended && !killed {
            stop_all(workers, SIGTERM);
            // Under launch's store the survivors see the round end and rank 0 saves the last
            // complete step; without it they are stuck in a collective, and waiting helps none.
            let grace = if rdzv.is_some() {
                node.grace
            } else {
                AFTER_FAILURE_GRACE
            };
            let end = Instant::now() + grace;
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
    let Some(abort) = abort else {
        return Ok(match failure {
            Some(f) => RoundEnd::Failed(f),
            None => RoundEnd::Done,
        });
    };
    if abort.retry && !stopping && store_lost.is_none() && !last_round {
        return Ok(RoundEnd::Restart(abort));
    }
    let mut failure = failure.unwrap_or_else(|| Failure {
        message: format!("round {round} ended on another node: {}", abort.reason),
        code: abort.exit_code,
    });
    if node.max_restarts > 0 && last_round && failure.retryable() && !stopping {
        failure.message += &format!(
            " (all {} in-place restart(s) used: --max-restarts, CHARLM_MAX_RESTARTS)",
            node.max_restarts
        );
    }
    Ok(RoundEnd::Failed(failure))
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
    fn start(node: &Node, rank: usize, env: &[(&str, String)]) -> Result<Self> {
        let mut cmd = Command::new(&node.program);
        cmd.args(&node.worker_args)
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // A worker that lost its launcher has no one to report to: it dies with it.
        children::tie_to_parent(&mut cmd, SIGKILL);
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting rank {rank}: {}", node.program.display()))?;
        let stdout = child.stdout.take().expect("piped stdout");
        let stderr = child.stderr.take().expect("piped stderr");
        let stdout_as = if node.json {
            Stream::Events
        } else {
            Stream::Stdout
        };
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
