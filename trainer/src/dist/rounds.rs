//! Restart rounds: the rendezvous of `launch` agents that outlives their workers.
//!
//! Node 0's `launch` hosts the job's TCPStore (its workers, rank 0 included, are clients), so a
//! worker that dies, rank 0 too, takes nothing with it. Every node's `launch` is also a client.
//! A round is one start of every node's workers:
//!
//! 1. each agent joins round `n` (`launch/round/<n>/joined`, a counter) and waits until all
//!    `nnodes` have;
//! 2. it starts its workers with `TORCHELASTIC_RESTART_COUNT=n`; their keys live under
//!    `round/<n>/` (a c10d PrefixStore), so a new round never reads an abandoned one's;
//! 3. the first agent that sees a local worker fail writes the round's abort record
//!    (`round/<n>/charlm/abort`, set only if absent: the first reason wins). Workers waiting in
//!    the store see it within [`super::store`]'s wait slice and stop ([`PeerFailed`]); agents
//!    poll it and stop their workers; every agent then joins round `n + 1`, unless the record says
//!    no retry can help or `n` was the last round `--max-restarts` allows.
//!
//! Node 0's agent deletes an abandoned round's keys once every agent has joined the next one (all
//! of that round's workers are gone by then).

use std::fmt;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use super::ffi::Store;
use super::DistEnv;

/// The key, under a round's worker prefix, that ends the round.
pub const ABORT_KEY: &str = "charlm/abort";
/// The key, under a round's worker prefix, where rank 0 says what it saved when the round ended
/// under it (`train::salvage`); launch passes it on to the next round.
pub const SALVAGE_KEY: &str = "charlm/salvage";

/// The prefix of round `n`'s worker keys.
pub fn worker_prefix(round: u64) -> String {
    format!("round/{round}")
}

/// `host:port`, with brackets around an IPv6 address.
pub fn endpoint(addr: &str, port: u16) -> String {
    if addr.contains(':') {
        format!("[{addr}]:{port}")
    } else {
        format!("{addr}:{port}")
    }
}

/// Why a round ended, as its first failing agent wrote it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Abort {
    /// What failed, for people: `rank 1 (node 0) was killed by SIGKILL`.
    pub reason: String,
    /// Whether another round may help (not after bad input, a stop signal, or the last round).
    pub retry: bool,
    /// The failed worker's exit code class for the pod: 2 (bad input) or 1.
    pub exit_code: i32,
}

/// A worker's collective ended because `launch` abandoned its round: a peer died.
#[derive(Debug)]
pub struct PeerFailed {
    pub round: u64,
    pub reason: String,
}

impl PeerFailed {
    /// From the abort record a worker read (a record it cannot parse is still a stop).
    pub fn from_record(round: u64, record: &[u8]) -> Self {
        let reason = serde_json::from_slice::<Abort>(record)
            .map(|a| a.reason)
            .unwrap_or_else(|_| String::from_utf8_lossy(record).into_owned());
        Self { round, reason }
    }
}

impl fmt::Display for PeerFailed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "launch abandoned restart round {}: {}",
            self.round, self.reason
        )
    }
}

impl std::error::Error for PeerFailed {}

/// Whether `err` (or anything in its chain) is a [`PeerFailed`].
pub fn peer_failed(err: &anyhow::Error) -> Option<&PeerFailed> {
    err.chain().find_map(|e| e.downcast_ref::<PeerFailed>())
}

/// An agent's handle on the rendezvous store.
pub struct Rendezvous {
    store: Store,
    node_rank: usize,
    nnodes: usize,
    endpoint: String,
}

impl Rendezvous {
    /// Node 0 hosts the store on `port` (all interfaces) and connects to it; every other node
    /// connects to `addr:port`, retrying until `timeout`.
    pub fn connect(
        addr: &str,
        port: u16,
        node_rank: usize,
        nnodes: usize,
        timeout: Duration,
    ) -> Result<Self> {
        let endpoint = endpoint(addr, port);
        let serve = node_rank == 0;
        let store = Store::connect(addr, port, serve, timeout, "").with_context(|| {
            if serve {
                format!(
                    "launch on node 0 could not host the rendezvous store on port {port} \
                     (--master-port, MASTER_PORT): is another job using it?"
                )
            } else {
                format!(
                    "launch on node {node_rank} could not reach the rendezvous store at {endpoint} \
                     (--master-addr:--master-port, MASTER_ADDR:MASTER_PORT) within {} s: is node \
                     0's launch running and is the address right?",
                    timeout.as_secs_f64()
                )
            }
        })?;
        Ok(Self {
            store,
            node_rank,
            nnodes,
            endpoint,
        })
    }

    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// Node 0 publishes `settings` (what every node must agree on: nodes, processes, restarts);
    /// every other node compares its own and refuses to start on a difference.
    pub fn agree(&self, settings: &str, timeout: Duration) -> Result<()> {
        const KEY: &str = "launch/settings";
        if self.node_rank == 0 {
            return self.store.set(KEY, settings.as_bytes());
        }
        if !self.store.wait_ready(&[KEY.to_string()], timeout)? {
            bail!(
                "node 0's launch at {} did not publish its settings within {} s",
                self.endpoint,
                timeout.as_secs_f64()
            );
        }
        let theirs = String::from_utf8_lossy(&self.store.get(KEY)?).into_owned();
        if theirs != settings {
            return Err(crate::sys::error::UserError(format!(
                "launch on node {} has {settings} but node 0's has {theirs}: every node must be \
                 started with the same --nnodes, --nproc-per-node and --max-restarts",
                self.node_rank
            ))
            .into());
        }
        Ok(())
    }

    /// Joins round `round` and waits until every node has, at most `timeout`; calls `stop`
    /// between polls and gives up when it returns true.
    pub fn join(
        &self,
        round: u64,
        timeout: Duration,
        mut stop: impl FnMut() -> bool,
    ) -> Result<()> {
        let key = format!("launch/round/{round}/joined");
        let deadline = Instant::now() + timeout;
        let mut joined = self.store.add(&key, 1)?;
        while joined < self.nnodes as i64 {
            if stop() {
                bail!("stopped while waiting for the other nodes to join round {round}");
            }
            if Instant::now() >= deadline {
                bail!(
                    "only {joined} of {} nodes joined restart round {round} at {} within {} s \
                     (--join-timeout-s): a node's launch is gone or stuck",
                    self.nnodes,
                    self.endpoint,
                    timeout.as_secs_f64()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
            joined = self.store.add(&key, 0)?;
        }
        Ok(())
    }

    /// Ends `round` with `abort` unless another agent ended it first; returns the record that
    /// stands.
    pub fn abandon(&self, round: u64, abort: &Abort) -> Result<Abort> {
        let record = serde_json::to_vec(abort)?;
        let now = self.store.set_if_absent(&abort_key(round), &record)?;
        Ok(serde_json::from_slice(&now).unwrap_or_else(|_| abort.clone()))
    }

    /// The record that ended `round`, if any.
    pub fn abandoned(&self, round: u64) -> Result<Option<Abort>> {
        let key = abort_key(round);
        if !self.store.check(&key)? {
            return Ok(None);
        }
        let record = self.store.get(&key)?;
        Ok(Some(serde_json::from_slice(&record).unwrap_or(Abort {
            reason: String::from_utf8_lossy(&record).into_owned(),
            retry: false,
            exit_code: charlm_contract::exit::FAILURE,
        })))
    }

    /// What rank 0 said it saved when `round` ended, if it said anything.
    pub fn salvaged(&self, round: u64) -> Result<Option<String>> {
        let key = format!("{}/{SALVAGE_KEY}", worker_prefix(round));
        if !self.store.check(&key)? {
            return Ok(None);
        }
        Ok(Some(
            String::from_utf8_lossy(&self.store.get(&key)?).into_owned(),
        ))
    }

    /// Deletes what `round`'s workers left in the store (an abandoned round leaves the keys of
    /// the collective it was in); returns how many keys went.
    pub fn forget(&self, round: u64) -> Result<usize> {
        let prefix = format!("{}/", worker_prefix(round));
        let mut gone = 0;
        for key in self.store.list_keys()? {
            if key.starts_with(&prefix) && self.store.delete(&key)? {
                gone += 1;
            }
        }
        Ok(gone)
    }

    /// Every key the store holds now (for tests and diagnostics).
    pub fn keys(&self) -> Result<Vec<String>> {
        self.store.list_keys()
    }
}

fn abort_key(round: u64) -> String {
    format!("{}/{ABORT_KEY}", worker_prefix(round))
}

/// On NCCL the host does not wait in the store: a rank whose peer died waits on the GPU, where
/// nothing can interrupt it short of the watchdog's timeout. A thread with its own connection to
/// `launch`'s store watches the round's abort key and ends the process when it appears, as
/// ProcessGroupNCCL's watchdog would after its timeout (`TORCH_NCCL_ASYNC_ERROR_HANDLING`). Such a
/// rank saves nothing: its stream may hold half of an optimizer step.
pub fn exit_when_abandoned(env: &DistEnv, timeout: Duration) -> Result<()> {
    let store = Store::connect(
        &env.master_addr,
        env.master_port,
        false,
        timeout,
        &worker_prefix(env.restart),
    )?;
    let (rank, round) = (env.rank, env.restart);
    std::thread::Builder::new()
        .name("abort-watch".into())
        .spawn(move || loop {
            match store.check(ABORT_KEY) {
                Ok(false) => std::thread::sleep(Duration::from_millis(100)),
                Ok(true) => {
                    let why = store
                        .get(ABORT_KEY)
                        .map(|r| PeerFailed::from_record(round, &r).to_string())
                        .unwrap_or_else(|e| format!("launch abandoned round {round} ({e:#})"));
                    eprintln!(
                        "rank {rank}: {why}; an NCCL rank cannot save a step in flight, exiting"
                    );
                    // SAFETY: ends the process at once, as the NCCL watchdog does; no destructor
                    // may wait on the stuck stream.
                    unsafe { libc::_exit(charlm_contract::exit::FAILURE) };
                }
                // The store went away: the job is ending (or node 0 is lost, which the
                // collectives report themselves).
                Err(_) => return,
            }
        })
        .context("starting the abort watch thread")?;
    Ok(())
}

impl super::ProcessGroup {
    /// Leaves `message` for `launch` under this round's [`SALVAGE_KEY`] (rank 0, when a peer's
    /// failure ended the round). Without `launch`'s store there is no one to tell: nothing.
    pub fn tell_launch(&self, message: &str) -> Result<()> {
        match &self.backend {
            super::Backend::Store(group) | super::Backend::Nccl { store: group, .. }
                if group.under_agent() =>
            {
                group.store().set(SALVAGE_KEY, message.as_bytes())
            }
            _ => Ok(()),
        }
    }
}
