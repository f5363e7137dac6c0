//! Rendezvous and the CPU collective, both over c10d's TCPStore (the PyPI wheel has no gloo
//! headers, so ProcessGroupGloo cannot be built from it).
//!
//! All-reduce is a reduce-scatter followed by an all-gather (each also a collective of its own, for
//! the sharded optimizer), with the store (a server thread in `launch` on node 0, or in rank 0)
//! as the switchboard: the flattened buffer is cut into `world` chunks; rank `r` posts chunk
//! `c` for its owner `c`, sums the chunks it owns in rank order (so the result does not depend on
//! who arrived first), posts the sum, and reads everyone else's. Every key names its collective's
//! sequence number, so a fast rank cannot read a slow rank's previous values.
//!
//! Keys are deleted once read. Rank 0 owns the clean-up of what several ranks read, after every
//! other rank has said, with a final fire-and-forget `set`, that it is done. So rank 0 is always the
//! last to touch the store in a collective, and may exit as soon as its last collective returns
//! without pulling the server from under a peer that is still reading.
//!
//! Under `launch`'s store a wait is cut into short slices, and between them the rank looks for
//! the round's abort key (rounds.rs): a peer that died is then noticed in a fraction of a second,
//! not after the collective timeout.

use std::cell::Cell;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tch::{Kind, Tensor};

use super::ffi::Store;
use super::rounds::{self, PeerFailed};
use super::{DistEnv, GroupOptions, ReduceOp};
use crate::sys::error::UserError;

/// How long one slice of a wait lasts under `launch`'s store: the most a rank waits on for a
/// peer that is already gone.
const WAIT_SLICE: Duration = Duration::from_millis(100);

/// A group of ranks whose collectives go through one TCPStore.
pub struct StoreGroup {
    store: Store,
    rank: usize,
    world: usize,
    /// MASTER_ADDR:MASTER_PORT, for error messages.
    endpoint: String,
    timeout: Duration,
    /// Values larger than this are split over several keys, to keep each store message modest.
    part_bytes: usize,
    seq: Cell<u64>,
    /// Under `launch`'s store: the restart round, whose abort key ends every wait.
    round: Option<u64>,
}

impl StoreGroup {
    /// Connects to (rank 0 without `launch`'s store: hosts) the store and waits until every rank
    /// has arrived, all within the rendezvous timeout; later waits give up after the collective
    /// timeout.
    pub fn rendezvous(env: &DistEnv, options: &GroupOptions) -> Result<Self> {
        let (addr, port, rank, world) = (
            env.master_addr.as_str(),
            env.master_port,
            env.rank,
            env.world_size,
        );
        let (rendezvous, collective) = (options.rendezvous_timeout, options.collective_timeout);
        let endpoint = rounds::endpoint(addr, port);
        let deadline = Instant::now() + rendezvous;
        let serve = rank == 0 && !env.agent_store;
        let prefix = if env.agent_store {
            rounds::worker_prefix(env.restart)
        } else {
            String::new()
        };
        let store = Store::connect(addr, port, serve, rendezvous, &prefix).with_context(|| {
            if serve {
                format!("rank 0 could not host the TCPStore on port {port} (MASTER_PORT): is another job using it?")
            } else {
                let host = if env.agent_store { "launch on node 0" } else { "rank 0" };
                format!(
                    "rank {rank} could not reach the TCPStore at {endpoint} (MASTER_ADDR:MASTER_PORT) within \
                     the rendezvous timeout of {}: is {host} running and is the address right?",
                    secs(rendezvous)
                )
            }
        })?;
        let group = Self {
            store,
            rank,
            world,
            endpoint,
            timeout: collective,
            part_bytes: options.store_message_bytes.max(1),
            seq: Cell::new(0),
            round: env.agent_store.then_some(env.restart),
        };
        group.arrive(rendezvous, deadline)?;
        group.store.set_timeout(collective)?;
        Ok(group)
    }

    fn arrive(&self, rendezvous: Duration, deadline: Instant) -> Result<()> {
        let (rank, world) = (self.rank, self.world);
        if self.store.add(&format!("charlm/rank/{rank}"), 1)? > 1 {
            return Err(UserError(format!(
                "two processes claim RANK={rank} at {}: every rank of WORLD_SIZE={world} must be started once",
                self.endpoint
            ))
            .into());
        }
        if rank == 0 {
            self.store
                .set("charlm/world_size", world.to_string().as_bytes())?;
        } else {
            self.wait_until(&["charlm/world_size".to_string()], deadline, rendezvous)?;
            let theirs =
                String::from_utf8_lossy(&self.store.get("charlm/world_size")?).into_owned();
            if theirs != world.to_string() {
                return Err(UserError(format!(
                    "rank {rank} has WORLD_SIZE={world} but rank 0 at {} has WORLD_SIZE={theirs}",
                    self.endpoint
                ))
                .into());
            }
        }
        // Counted by polling, so that every rank knows how many had arrived even when rank 0 gives
        // up first and takes the store with it.
        let mut arrived = self.store.add("charlm/arrived", 1)?;
        while arrived < world as i64 {
            let missing = |arrived: i64| {
                format!(
                    "rank {rank}: only {arrived} of {world} ranks reached the rendezvous at {} within {}; the \
                     others never started, crashed, or use another MASTER_ADDR/MASTER_PORT",
                    self.endpoint,
                    secs(rendezvous)
                )
            };
            if Instant::now() >= deadline {
                bail!(missing(arrived));
            }
            self.abandoned()?;
            std::thread::sleep(Duration::from_millis(20));
            arrived = self
                .store
                .add("charlm/arrived", 0)
                .with_context(|| missing(arrived))?;
        }
        // Rank 0 may not leave (taking the store along) before everyone has seen the count.
        self.finish("charlm/rendezvous", |_| Ok(()))
    }

    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// Fails with [`PeerFailed`] once `launch` has abandoned this round (a worker died).
    fn abandoned(&self) -> Result<()> {
        if self.round.is_none() || !self.store.check(rounds::ABORT_KEY)? {
            return Ok(());
        }
        let record = self.store.get(rounds::ABORT_KEY)?;
        Err(PeerFailed::from_record(self.round.unwrap_or(0), &record).into())
    }

    /// Waits until every key exists, at most the collective timeout.
    fn wait_for(&self, keys: &[String]) -> Result<()> {
        self.wait_until(keys, Instant::now() + self.timeout, self.timeout)
    }

    /// Waits until every key exists or `deadline` (`limit` from the start, for the message).
    /// Under `launch`'s store the wait is cut into slices, between which an abandoned round
    /// ends it at once.
    fn wait_until(&self, keys: &[String], deadline: Instant, limit: Duration) -> Result<()> {
        if self.round.is_none() {
            let left = deadline.saturating_duration_since(Instant::now());
            return self.store.wait(keys, left.max(Duration::from_millis(1)));
        }
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if self.store.wait_ready(keys, left.min(WAIT_SLICE))? {
                return Ok(());
            }
            self.abandoned()?;
            if Instant::now() >= deadline {
                bail!(
                    "waited {} for {} key(s) ({}...)",
                    secs(limit),
                    keys.len(),
                    keys.first().map_or("", String::as_str)
                );
            }
        }
    }

    /// Waits for `key` (see [`Self::wait_for`]) and returns its value.
    fn get(&self, key: &str) -> Result<Vec<u8>> {
        self.wait_for(&[key.to_string()])?;
        self.store.get(key)
    }

    /// Whether the store is `launch`'s, whose rounds may end under this group.
    pub fn under_agent(&self) -> bool {
        self.round.is_some()
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    fn next(&self, what: &str) -> String {
        let seq = self.seq.get();
        self.seq.set(seq + 1);
        format!("charlm/{what}/{seq}")
    }

    /// Adds the rank and the remedy to an error from inside a collective.
    fn failed<T>(&self, what: &str, result: Result<T>) -> Result<T> {
        result.with_context(|| {
            format!(
                "rank {} of {}: {what} through the TCPStore at {} failed (collective timeout {}); a peer rank \
                 is dead, hung or was never started",
                self.rank,
                self.world,
                self.endpoint,
                secs(self.timeout)
            )
        })
    }

    /// In-place all-reduce of CPU tensors (the caller checked devices, kinds and contiguity).
    pub fn all_reduce(&self, tensors: &[Tensor], op: ReduceOp) -> Result<()> {
        for (kind, members) in by_kind(tensors) {
            let flat = flatten(tensors, &members);
            let prefix = self.next("all_reduce");
            let reduced =
                self.failed("all_reduce", self.all_reduce_flat(&prefix, &flat, kind, op))?;
            unflatten(&reduced, tensors, &members);
        }
        Ok(())
    }

    fn all_reduce_flat(
        &self,
        prefix: &str,
        flat: &Tensor,
        kind: Kind,
        op: ReduceOp,
    ) -> Result<Tensor> {
        let n = flat.numel();
        let world = self.world;
        let bounds = move |c: usize| (n * c / world, n * (c + 1) / world);
        let mine = self.reduce_scatter_flat(prefix, flat, kind, op, &bounds)?;
        let full = self.all_gather_flat(prefix, &mine, kind, &bounds)?;
        Ok(full)
    }

    /// Reduce-scatter of a CPU tensor cut into `world` equal slices along dim 0: `output` (one
    /// slice's shape) receives the sum or average of every rank's slice `rank`.
    pub fn reduce_scatter(&self, input: &Tensor, output: &Tensor, op: ReduceOp) -> Result<()> {
        let prefix = self.next("reduce_scatter");
        let (flat, kind) = (input.reshape([-1]), input.kind());
        let per = output.numel();
        let bounds = move |c: usize| (per * c, per * (c + 1));
        let result = (|| {
            let mine = self.reduce_scatter_flat(&prefix, &flat, kind, op, &bounds)?;
            self.finish(&prefix, |_| Ok(()))?;
            Ok(mine)
        })();
        let mine = self.failed("reduce_scatter", result)?;
        tch::no_grad(|| {
            output
                .shallow_clone()
                .copy_(&mine.view(output.size().as_slice()))
        });
        Ok(())
    }

    /// All-gather of CPU tensors: every rank's `input` lands, in rank order, as the equal slices
    /// along dim 0 of `output`.
    pub fn all_gather(&self, input: &Tensor, output: &Tensor) -> Result<()> {
        let prefix = self.next("all_gather");
        let (kind, per) = (input.kind(), input.numel());
        let bounds = move |c: usize| (per * c, per * (c + 1));
        let full = self.failed(
            "all_gather",
            self.all_gather_flat(&prefix, &input.reshape([-1]), kind, &bounds),
        )?;
        tch::no_grad(|| {
            output
                .shallow_clone()
                .copy_(&full.view(output.size().as_slice()))
        });
        Ok(())
    }

    /// Posts every chunk of `flat` (cut by `bounds`) to its owner and returns this rank's chunk
    /// summed over ranks in rank order, so the result does not depend on who arrived first.
    fn reduce_scatter_flat(
        &self,
        prefix: &str,
        flat: &Tensor,
        kind: Kind,
        op: ReduceOp,
        bounds: &dyn Fn(usize) -> (usize, usize),
    ) -> Result<Tensor> {
        let (rank, world) = (self.rank, self.world);
        let chunk = |c: usize| {
            let (a, b) = bounds(c);
            flat.narrow(0, a as i64, (b - a) as i64)
        };
        let size = kind.elt_size_in_bytes();
        let input = |to: usize, from: usize| format!("{prefix}/in/{to}/{from}");
        for c in (0..world).filter(|&c| c != rank) {
            self.put(&input(c, rank), &bytes(&chunk(c)))?;
        }
        let (a, b) = bounds(rank);
        let mine = (b - a) as i64;
        // Half and bfloat16 are summed in float32, then rounded once.
        let acc_kind = if matches!(kind, Kind::Half | Kind::BFloat16) {
            Kind::Float
        } else {
            kind
        };
        let mut acc = Tensor::zeros([mine], (acc_kind, tch::Device::Cpu));
        for q in 0..world {
            let part = if q == rank {
                chunk(rank)
            } else {
                let key = input(rank, q);
                let data = self.take(&key, (b - a) * size)?;
                Tensor::from_data_size(&data, &[mine], kind)
            };
            acc += part.to_kind(acc_kind);
        }
        if op == ReduceOp::Avg {
            acc /= world as f64;
        }
        Ok(acc.to_kind(kind))
    }

    /// Posts this rank's chunk `mine` and reads everyone else's (sized by `bounds`), ending the
    /// collective: rank 0 deletes the posted chunks once every rank has read them.
    fn all_gather_flat(
        &self,
        prefix: &str,
        mine: &Tensor,
        kind: Kind,
        bounds: &dyn Fn(usize) -> (usize, usize),
    ) -> Result<Tensor> {
        let (rank, world) = (self.rank, self.world);
        let size = kind.elt_size_in_bytes();
        let output = |owner: usize| format!("{prefix}/out/{owner}");
        self.put(&output(rank), &bytes(mine))?;
        let mut pieces = Vec::with_capacity(world);
        for c in 0..world {
            if c == rank {
                pieces.push(mine.shallow_clone());
            } else {
                let (a, b) = bounds(c);
                let data = self.read(&output(c), (b - a) * size)?;
                pieces.push(Tensor::from_data_size(&data, &[(b - a) as i64], kind));
            }
        }
        self.finish(prefix, |g| {
            (0..world).try_for_each(|c| g.remove(&output(c), bounds(c).1 - bounds(c).0, size))
        })?;
        Ok(Tensor::cat(&pieces, 0))
    }

    /// In-place broadcast of CPU tensors from `root`.
    pub fn broadcast(&self, tensors: &[Tensor], root: usize) -> Result<()> {
        let prefix = self.next("broadcast");
        let key = format!("{prefix}/data");
        let total: usize = tensors
            .iter()
            .map(|t| t.numel() * t.kind().elt_size_in_bytes())
            .sum();
        let result = (|| {
            if self.rank == root {
                let mut blob = Vec::with_capacity(total);
                for t in tensors {
                    blob.extend_from_slice(&bytes(t));
                }
                self.put(&key, &blob)?;
            } else {
                let blob = self.read(&key, total)?;
                let mut at = 0;
                for t in tensors {
                    let len = t.numel() * t.kind().elt_size_in_bytes();
                    let src = Tensor::from_data_size(&blob[at..at + len], &t.size(), t.kind());
                    tch::no_grad(|| t.shallow_clone().copy_(&src));
                    at += len;
                }
            }
            self.finish(&prefix, |g| g.remove(&key, total, 1))
        })();
        self.failed("broadcast", result)
    }

    /// Returns once every rank has called it.
    pub fn barrier(&self) -> Result<()> {
        let prefix = self.next("barrier");
        let result = (|| {
            let arrived = |r: usize| format!("{prefix}/arrived/{r}");
            let go = format!("{prefix}/go");
            if self.rank == 0 {
                let others: Vec<String> = (1..self.world).map(arrived).collect();
                self.wait_for(&others)?;
                self.store.set(&go, b"")?;
                for key in others {
                    self.store.delete(&key)?;
                }
            } else {
                self.store.set(&arrived(self.rank), b"")?;
                self.get(&go)?;
            }
            self.finish(&prefix, |g| g.store.delete(&go).map(drop))
        })();
        self.failed("barrier", result)
    }

    /// The end of every collective: other ranks report that they are done; rank 0 waits for them
    /// and then runs `cleanup` (deleting what they all read).
    fn finish(&self, prefix: &str, cleanup: impl FnOnce(&Self) -> Result<()>) -> Result<()> {
        let done = |r: usize| format!("{prefix}/done/{r}");
        if self.rank != 0 {
            // A set has no reply: after it this rank needs nothing more from the server.
            return self.store.set(&done(self.rank), b"");
        }
        let others: Vec<String> = (1..self.world).map(done).collect();
        self.wait_for(&others)?;
        for key in &others {
            self.store.delete(key)?;
        }
        cleanup(self)
    }

    fn parts(&self, len: usize) -> usize {
        len.div_ceil(self.part_bytes).max(1)
    }

    fn put(&self, key: &str, data: &[u8]) -> Result<()> {
        if data.len() <= self.part_bytes {
            return self.store.set(key, data);
        }
        for (i, part) in data.chunks(self.part_bytes).enumerate() {
            self.store.set(&format!("{key}#{i}"), part)?;
        }
        Ok(())
    }

    /// Reads a value of `len` bytes written by `put`.
    fn read(&self, key: &str, len: usize) -> Result<Vec<u8>> {
        let data = if len <= self.part_bytes {
            self.get(key)?
        } else {
            let mut data = Vec::with_capacity(len);
            for i in 0..self.parts(len) {
                data.extend_from_slice(&self.get(&format!("{key}#{i}"))?);
            }
            data
        };
        if data.len() != len {
            bail!("{key} holds {} bytes where this rank expected {len}: the ranks passed different tensors", data.len());
        }
        Ok(data)
    }

    /// Reads and deletes a value that only this rank reads.
    fn take(&self, key: &str, len: usize) -> Result<Vec<u8>> {
        let data = self.read(key, len)?;
        self.remove(key, len, 1)?;
        Ok(data)
    }

    fn remove(&self, key: &str, elements: usize, size: usize) -> Result<()> {
        let len = elements * size;
        if len <= self.part_bytes {
            self.store.delete(key)?;
        } else {
            for i in 0..self.parts(len) {
                self.store.delete(&format!("{key}#{i}"))?;
            }
        }
        Ok(())
    }
}

fn secs(d: Duration) -> String {
    format!("{} s", d.as_secs_f64())
}

/// Indices of the tensors of each kind, kinds in order of first appearance (the same on every rank).
fn by_kind(tensors: &[Tensor]) -> Vec<(Kind, Vec<usize>)> {
    let mut groups: Vec<(Kind, Vec<usize>)> = Vec::new();
    for (i, t) in tensors.iter().enumerate() {
        let kind = t.kind();
        match groups.iter_mut().find(|(k, _)| *k == kind) {
            Some((_, members)) => members.push(i),
            None => groups.push((kind, vec![i])),
        }
    }
    groups
}

fn flatten(tensors: &[Tensor], members: &[usize]) -> Tensor {
    let views: Vec<Tensor> = members.iter().map(|&i| tensors[i].reshape([-1])).collect();
    Tensor::cat(&views, 0)
}

fn unflatten(flat: &Tensor, tensors: &[Tensor], members: &[usize]) {
    let mut at = 0i64;
    for &i in members {
        let t = &tensors[i];
        let n = t.numel() as i64;
        // Collectives are not part of autograd: copying into a leaf that requires grad is fine here.
        tch::no_grad(|| {
            t.shallow_clone()
                .copy_(&flat.narrow(0, at, n).view(t.size().as_slice()))
        });
        at += n;
    }
}

fn bytes(t: &Tensor) -> Vec<u8> {
    let t = t.contiguous();
    let n = t.numel();
    let mut out = vec![0u8; n * t.kind().elt_size_in_bytes()];
    t.copy_data_u8(&mut out, n);
    out
}
