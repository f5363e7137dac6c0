//! Data-parallel process groups over libtorch's c10d, reached through csrc/c10d_bridge.cpp.
//!
//! Every rank meets the others at a c10d `TCPStore` at MASTER_ADDR:MASTER_PORT, hosted by node 0's
//! `launch` (rounds.rs: it outlives the workers, so that they can be restarted in place) or, for
//! ranks started by something else, by rank 0. On GPUs the collectives are `ProcessGroupNCCL`'s;
//! on CPUs they go through the store itself (store.rs), since the PyPI wheel cannot build gloo. A
//! world of one needs neither: its collectives are no-ops. docs/distributed.md tells the whole
//! story.

mod env;
mod ffi;
pub mod rounds;
mod store;

use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use tch::{Device, Kind, Tensor};

pub use env::DistEnv;
pub use rounds::PeerFailed;
use store::StoreGroup;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReduceOp {
    Sum,
    /// The sum divided by the world size; floating-point tensors only.
    Avg,
}

/// How long to wait, and whether a world of one still builds the real machinery.
#[derive(Clone, Debug)]
pub struct GroupOptions {
    /// For all ranks to reach the store (rank 0 included): a rank that never arrives fails the rest.
    pub rendezvous_timeout: Duration,
    /// For one collective: a peer that died or hangs fails the others after this long.
    pub collective_timeout: Duration,
    /// Build the store (and NCCL on a GPU) even for a world of one: for checks of the machinery.
    pub connect_single: bool,
    /// The CPU collective splits values larger than this over several store keys. The TCPStore's
    /// libuv server drops a client that sends a value over 8 MiB (seen with torch 2.11: 8 MiB
    /// passes, 16 MiB resets the connection), hence the 4 MiB default.
    pub store_message_bytes: usize,
}

impl GroupOptions {
    pub fn new(timeout: Duration) -> Self {
        Self {
            rendezvous_timeout: timeout,
            collective_timeout: timeout,
            connect_single: false,
            store_message_bytes: 4 << 20,
        }
    }
}

enum Backend {
    Single,
    Store(StoreGroup),
    // Field order is drop order: the NCCL group shuts down before the store it rendezvoused on.
    Nccl { nccl: ffi::Nccl, store: StoreGroup },
}

/// The ranks of one training job, and their collectives. All ranks must call the same collectives
/// in the same order with tensors of the same shapes and kinds.
pub struct ProcessGroup {
    rank: usize,
    world_size: usize,
    device: Device,
    backend: Backend,
}

/// A collective in flight; [`Pending::wait`] ends it. For NCCL the wait orders the current CUDA
/// stream after the collective without blocking the host; the CPU and single-rank collectives
/// complete before the handle is returned.
#[must_use = "wait() on it before the tensors are used"]
pub struct Pending {
    work: Option<ffi::NcclWork>,
    what: &'static str,
    rank: usize,
}

impl Pending {
    fn done(what: &'static str, rank: usize) -> Self {
        Self {
            work: None,
            what,
            rank,
        }
    }

    pub fn wait(mut self) -> Result<()> {
        match self.work.take() {
            Some(work) => work
                .wait()
                .with_context(|| format!("rank {}: NCCL {} failed", self.rank, self.what)),
            None => Ok(()),
        }
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        // Never leave the stream unordered with a collective that still writes into its tensors.
        if let Some(work) = self.work.take() {
            if let Err(err) = work.wait() {
                eprintln!("rank {}: NCCL {} failed: {err:#}", self.rank, self.what);
            }
        }
    }
}

impl ProcessGroup {
    /// The group of `env` on `device`, with `timeout` for the rendezvous and for each collective.
    pub fn init(env: &DistEnv, device: Device, timeout: Duration) -> Result<Self> {
        Self::init_with(env, device, &GroupOptions::new(timeout))
    }

    pub fn init_with(env: &DistEnv, device: Device, options: &GroupOptions) -> Result<Self> {
        env.check()?;
        let (rank, world_size) = (env.rank, env.world_size);
        let backend = if world_size == 1 && !options.connect_single {
            Backend::Single
        } else {
            let cuda = match device {
                Device::Cpu => None,
                Device::Cuda(i) => Some(i),
                other => bail!("distributed training runs on CPU or CUDA devices, not {other:?}"),
            };
            if cuda.is_some() && !ffi::have_nccl() {
                bail!("this charlm-trainer was built against a libtorch without NCCL: it cannot train on several GPUs");
            }
            let store = StoreGroup::rendezvous(env, options)?;
            match cuda {
                None => Backend::Store(store),
                Some(i) => {
                    if env.agent_store {
                        rounds::exit_when_abandoned(env, options.collective_timeout)?;
                    }
                    let nccl =
                        ffi::Nccl::new(store.store(), "nccl", rank, world_size, i, options.collective_timeout)
                            .with_context(|| {
                                format!(
                                    "rank {rank}: NCCL could not connect on cuda:{i} (rendezvous at {}, timeout {} s)",
                                    store.endpoint(),
                                    options.collective_timeout.as_secs_f64()
                                )
                            })?;
                    Backend::Nccl { nccl, store }
                }
            }
        };
        Ok(Self {
            rank,
            world_size,
            device,
            backend,
        })
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn world_size(&self) -> usize {
        self.world_size
    }

    pub fn device(&self) -> Device {
        self.device
    }

    /// "single", "tcpstore" (the CPU collective) or "nccl".
    pub fn backend(&self) -> &'static str {
        match self.backend {
            Backend::Single => "single",
            Backend::Store(_) => "tcpstore",
            Backend::Nccl { .. } => "nccl",
        }
    }

    /// Sums (or averages) each tensor over all ranks, in place.
    pub fn all_reduce(&self, tensors: &[Tensor], op: ReduceOp) -> Result<()> {
        self.all_reduce_async(tensors, op)?.wait()
    }

    /// Starts [`ProcessGroup::all_reduce`]; on NCCL the host returns at once, so it can queue
    /// other work while the reduction runs.
    pub fn all_reduce_async(&self, tensors: &[Tensor], op: ReduceOp) -> Result<Pending> {
        self.check_tensors("all_reduce", tensors)?;
        if op == ReduceOp::Avg {
            if let Some(t) = tensors.iter().find(|t| !is_float(t.kind())) {
                bail!(
                    "all_reduce Avg needs floating-point tensors, got {:?}",
                    t.kind()
                );
            }
        }
        if tensors.is_empty() {
            return Ok(Pending::done("all_reduce", self.rank));
        }
        match &self.backend {
            Backend::Single => Ok(Pending::done("all_reduce", self.rank)),
            Backend::Store(group) => {
                group.all_reduce(tensors, op)?;
                Ok(Pending::done("all_reduce", self.rank))
            }
            Backend::Nccl { nccl, store } => {
                let work = nccl
                    .all_reduce(tensors, op == ReduceOp::Avg)
                    .with_context(|| self.nccl_failed("all_reduce", store))?;
                Ok(Pending {
                    work: Some(work),
                    what: "all_reduce",
                    rank: self.rank,
                })
            }
        }
    }

    /// Copies `root`'s tensors into every other rank's, in place.
    pub fn broadcast(&self, tensors: &[Tensor], root: usize) -> Result<()> {
        if root >= self.world_size {
            bail!(
                "broadcast from rank {root} in a world of {}",
                self.world_size
            );
        }
        self.check_tensors("broadcast", tensors)?;
        if tensors.is_empty() {
            return Ok(());
        }
        match &self.backend {
            Backend::Single => Ok(()),
            Backend::Store(group) => group.broadcast(tensors, root),
            Backend::Nccl { nccl, store } => nccl
                .broadcast(tensors, root)
                .and_then(ffi::NcclWork::wait)
                .with_context(|| self.nccl_failed("broadcast", store)),
        }
    }

    /// `input` is `world_size` equal slices along dim 0; this rank's `output` (one slice) receives
    /// the sum or average over ranks of slice `rank`. Blocks until done (NCCL: orders the stream).
    pub fn reduce_scatter(&self, input: &Tensor, output: &Tensor, op: ReduceOp) -> Result<()> {
        self.check_sliced("reduce_scatter", input, output)?;
        if op == ReduceOp::Avg && !is_float(input.kind()) {
            bail!(
                "reduce_scatter Avg needs a floating-point tensor, got {:?}",
                input.kind()
            );
        }
        match &self.backend {
            Backend::Single => {
                copy_into(input, output);
                Ok(())
            }
            Backend::Store(group) => group.reduce_scatter(input, output, op),
            Backend::Nccl { nccl, store } => nccl
                .reduce_scatter(input, output, op == ReduceOp::Avg)
                .and_then(ffi::NcclWork::wait)
                .with_context(|| self.nccl_failed("reduce_scatter", store)),
        }
    }

    /// Every rank's `input` lands, in rank order, as the `world_size` equal slices along dim 0 of
    /// `output`.
    pub fn all_gather(&self, input: &Tensor, output: &Tensor) -> Result<()> {
        self.check_sliced("all_gather", output, input)?;
        match &self.backend {
            Backend::Single => {
                copy_into(input, output);
                Ok(())
            }
            Backend::Store(group) => group.all_gather(input, output),
            Backend::Nccl { nccl, store } => nccl
                .all_gather(input, output)
                .and_then(ffi::NcclWork::wait)
                .with_context(|| self.nccl_failed("all_gather", store)),
        }
    }

    /// `whole` must hold `world_size` slices the shape of `slice`, both on this group's device,
    /// contiguous and of one kind.
    fn check_sliced(&self, what: &str, whole: &Tensor, slice: &Tensor) -> Result<()> {
        self.check_tensors(what, &[whole.shallow_clone(), slice.shallow_clone()])?;
        let mut want = slice.size();
        if want.is_empty() {
            bail!("{what}: a slice must have a leading dimension, got a scalar");
        }
        want[0] *= self.world_size as i64;
        if whole.size() != want || whole.kind() != slice.kind() {
            bail!(
                "{what}: the whole tensor is {:?} {:?}, not {} slices of {:?} {:?}",
                whole.size(),
                whole.kind(),
                self.world_size,
                slice.size(),
                slice.kind()
            );
        }
        Ok(())
    }

    /// Returns once every rank has called it. It synchronises hosts (through the store, for NCCL
    /// too), not CUDA streams.
    pub fn barrier(&self) -> Result<()> {
        match &self.backend {
            Backend::Single => Ok(()),
            Backend::Store(group) | Backend::Nccl { store: group, .. } => group.barrier(),
        }
    }

    /// How many keys the store holds now (None without a store). Between collectives that is a
    /// constant: the CPU collective deletes what it wrote.
    pub fn store_keys(&self) -> Result<Option<usize>> {
        match &self.backend {
            Backend::Single => Ok(None),
            Backend::Store(group) | Backend::Nccl { store: group, .. } => {
                Ok(Some(group.store().num_keys()?))
            }
        }
    }

    fn nccl_failed(&self, what: &str, store: &StoreGroup) -> String {
        format!(
            "rank {} of {}: NCCL {what} failed (rendezvous at {})",
            self.rank,
            self.world_size,
            store.endpoint()
        )
    }

    fn check_tensors(&self, what: &str, tensors: &[Tensor]) -> Result<()> {
        for (i, t) in tensors.iter().enumerate() {
            if !t.defined() {
                bail!("{what}: tensor {i} is undefined (a parameter that got no gradient?)");
            }
            let device = t.device();
            if device != self.device {
                return Err(anyhow!(
                    "{what}: tensor {i} is on {device:?} but the process group is on {:?}",
                    self.device
                ));
            }
            if !t.is_contiguous() {
                bail!(
                    "{what}: tensor {i} (shape {:?}) is not contiguous",
                    t.size()
                );
            }
        }
        Ok(())
    }
}

fn is_float(kind: Kind) -> bool {
    matches!(
        kind,
        Kind::Half | Kind::BFloat16 | Kind::Float | Kind::Double
    )
}

/// A world of one: the reduce-scatter's and the all-gather's result is the input itself, in the
/// output's shape.
fn copy_into(input: &Tensor, output: &Tensor) {
    tch::no_grad(|| {
        output
            .shallow_clone()
            .copy_(&input.view(output.size().as_slice()))
    });
}
