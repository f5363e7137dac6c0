//! `charlm-trainer train`: the training loop, in the spirit of nanochat's base_train.py.
//!
//! A run sets up ranks and the model, resumes from the newest good checkpoint, then a [`Session`]
//! repeats {micro-batches → optimizer step → report → evaluate → checkpoint} until the time budget
//! or step limit is spent, validation stops improving, or a SIGTERM arrives. Every decision that
//! guards a collective is rank 0's, broadcast (`consensus`): rank 0 decides when to stop, evaluate
//! and save and tells the others, and its run state is every rank's, so every rank takes the same
//! branch.

mod args;
pub mod checkpoint;
pub mod consensus;
mod endpoint;
mod lock;
mod plan;
pub mod progress;
pub mod recipe;
pub(crate) mod resume;
mod salvage;
mod session;
mod state;

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Result;
use charlm_contract::events::{self, Event};
use charlm_contract::ProgressReport;
use serde::{Deserialize, Serialize};
use tch::Device;

pub use args::Args;
pub use plan::{budget_fraction, Batch, Budget, Plan};
pub use recipe::{Recipe, Schedule};
pub use session::evaluate;

use crate::data::dataset::Dataset;
use crate::dist::{DistEnv, GroupOptions, ProcessGroup};
use crate::engine::autobatch::MicroBatch;
use crate::engine::memory::MemoryEstimate;
use crate::engine::Engine;
use crate::model::GptConfig;
use crate::sys::events::Events;
use crate::sys::figures::fmt_duration;
use crate::sys::tensorboard::EventWriter;
use progress::SharedProgress;
use session::Session;
use state::RunState;

/// H100 dense bf16 peak, the denominator of MFU (as in nanochat and our anchors).
pub const PEAK_FLOPS: f64 = 989e12;

pub fn run(args: Args) -> Result<()> {
    let env = DistEnv::from_env();
    let events = Events::new(args.log_format, Some(env.rank as u64));
    let device = args.device.resolve(env.local_rank)?;
    if device == Device::Cpu {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let per_rank = (cores / env.local_world_size.max(1)).max(1) as i32;
        tch::set_num_threads(args.threads.unwrap_or(per_rank));
    }
    crate::engine::check_precision(&args.engine, device)?;
    // Check the settings before anything slow starts (an `auto` micro-batch is settled later).
    let early_micro = match args.device_batch_size {
        MicroBatch::Fixed(n) => n,
        MicroBatch::Auto => 1,
    };
    let mut early = Plan::new(&args, env.world_size, early_micro)?;
    if let MicroBatch::Fixed(n) = args.device_batch_size {
        crate::engine::memory::check_fits(&GptConfig::new(args.depth, args.seq_len), n, device)?;
    }
    let data = Dataset::open(&args.data, args.seq_len, args.seed)?;
    early.dataset = Some(resume::dataset_id(&args.data, &data.manifest));
    let mut options = GroupOptions::new(Duration::from_secs(args.dist_timeout_s));
    // Under `launch` even a world of one goes through the real backend (NCCL on a GPU), so a
    // single-GPU run exercises the same code path as a multi-GPU one.
    options.connect_single = std::env::var_os("WORLD_SIZE").is_some();
    let pg = ProcessGroup::init_with(&env, device, &options)?;
    let is_main = pg.rank() == 0;
    same_settings_everywhere(&early, &args, &pg, device)?;
    // Rank 0 alone writes checkpoints, and claims the folder now, before any training a failed
    // save would throw away: writable, locked for this training's life, holding no other
    // training. Every rank learns the outcome, so none waits for a rank that left.
    let flags_model = GptConfig::new(args.depth, args.seq_len)
        .with_rope_base(early.schedule.rope_base)
        .with_scalars(early.schedule.scalars);
    let claimed = match is_main {
        true => resume::claim(&early, &flags_model),
        false => Ok(None),
    };
    let _folder_lock = consensus::rank0_outcome(&pg, device, claimed)?;

    let shared: SharedProgress = Arc::new(Mutex::new(ProgressReport {
        world_size: pg.world_size() as u64,
        in_place_restarts: env.restart,
        last_restart_reason: std::env::var(charlm_contract::env::RESTART_REASON).ok(),
        ..Default::default()
    }));
    if is_main && args.metrics_port != 0 {
        serve_progress(args.metrics_port, &shared);
    }
    if already_over(&early, &pg, device, &shared, &events)? {
        return Ok(());
    }

    let config = GptConfig::new(args.depth, args.seq_len);
    let micro = plan::resolve_micro_batch(&args, &config, &pg, device)?;
    let mut plan = Plan::new(&args, env.world_size, micro)?;
    plan.dataset = early.dataset.clone();
    let config = config
        .with_rope_base(plan.schedule.rope_base)
        .with_scalars(plan.schedule.scalars);
    let mut engine = Engine::with_options(
        config,
        device,
        plan.batch.seed,
        plan.schedule.lrs,
        *args.engine,
    );
    engine.muon.orthogonalizer = plan.schedule.orthogonalizer;
    let sharded = args.engine.shards_optimizer(pg.world_size());
    if sharded {
        engine.shard_optimizer(&pg)?;
    }
    if is_main {
        describe(
            &plan,
            &config,
            &data,
            &pg,
            device,
            sharded.then(|| engine.muon.shard().count),
        );
    }
    let start = start_state(&plan, &data, &pg, device, &mut engine)?;
    if is_main {
        // The report says where it resumed and what it set aside: the operator's only view of it.
        let mut p = shared.lock().expect("progress lock");
        p.resumed_from = start.resumed.as_ref().map(|d| d.display().to_string());
        p.damaged_checkpoints = start.set_aside.clone();
        drop(p);
        announce(
            &plan,
            &config,
            &data,
            &pg,
            device,
            &start.state,
            start.resumed.clone(),
            &events,
        );
    }
    let tensorboard = match (&args.tensorboard_dir, is_main) {
        (Some(dir), true) => match EventWriter::create(dir) {
            Ok(w) => Some(w),
            Err(e) => {
                eprintln!("warning: no TensorBoard events: {e:#}");
                None
            }
        },
        _ => None,
    };

    let stop = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGTERM, stop.clone())?;
    signal_hook::flag::register(signal_hook::consts::SIGINT, stop.clone())?;

    let mut session = Session {
        plan: &plan,
        data: &data,
        pg: &pg,
        device,
        engine,
        state: start.state,
        checkpoints: start.checkpoints,
        last_checkpoint: start.resumed,
        shared,
        stop,
        tensorboard,
        events,
    };
    let result = session.run();
    if let Err(err) = &result {
        match crate::dist::rounds::peer_failed(err) {
            // Not this rank's fault: rank 0 saves what it can; the error names the failed peer.
            Some(why) => session.salvage(why),
            None => eprintln!("rank {}: training failed: {err:#}", pg.rank()),
        }
    }
    result
}

/// Serves `/progress` and `/metrics` on the pod's IP (all interfaces outside a pod).
fn serve_progress(port: u16, shared: &SharedProgress) {
    let host = std::env::var(charlm_contract::env::POD_IP).unwrap_or_else(|_| "0.0.0.0".into());
    let host = if host.contains(':') {
        format!("[{host}]")
    } else {
        host
    };
    endpoint::serve(
        &format!("{host}:{port}"),
        shared.clone(),
        endpoint::Limits::default(),
    );
}

/// Ranks started with other settings would run other collectives (another batch geometry, the
/// optimizer sharded or not, another evaluation cadence) and wait for each other until the
/// collective timeout: every rank must be started with rank 0's. Only where rank 0 alone writes
/// (the checkpoint volume is mounted in pod 0 only) may differ.
fn same_settings_everywhere(
    plan: &Plan,
    args: &Args,
    pg: &ProcessGroup,
    device: Device,
) -> Result<()> {
    let mut alike = plan.clone();
    alike.checkpoint_dir = None;
    alike.termination_log = None;
    let text = format!("{alike:?} {:?}", args.engine);
    let digests = consensus::digests(pg, device, &text)?;
    if digests.iter().all(|&d| d == digests[0]) {
        return Ok(());
    }
    let each: Vec<String> = digests
        .iter()
        .enumerate()
        .map(|(rank, d)| format!("rank {rank}: {d:016x}"))
        .collect();
    crate::user_bail!(
        "rank {} of {}: the ranks were started with different training settings (digests {}): \
         start every rank with the same flags and CHARLM_* variables. This rank's: {text}",
        pg.rank(),
        pg.world_size(),
        each.join(", ")
    )
}

/// Whether the newest checkpoint already ended this training (rank 0 looks, every rank agrees);
/// if so, rank 0 reports its summary as a finished run would.
fn already_over(
    plan: &Plan,
    pg: &ProcessGroup,
    device: Device,
    shared: &SharedProgress,
    events: &Events,
) -> Result<bool> {
    let done = if pg.rank() == 0 {
        resume::finished_summary(plan)?
    } else {
        None
    };
    if !consensus::agree_flag(pg, device, done.is_some())? {
        return Ok(false);
    }
    if let Some(summary) = done {
        *shared.lock().expect("progress lock") = summary.clone();
        events.emit(Event::End(events::End {
            progress: summary.clone(),
        }));
        if let Some(path) = &plan.termination_log {
            progress::write_termination_log(path, &summary);
        }
    }
    Ok(true)
}

/// The model, batch and data lines of rank 0's log.
fn describe(
    plan: &Plan,
    config: &GptConfig,
    data: &Dataset,
    pg: &ProcessGroup,
    device: Device,
    shards: Option<usize>,
) {
    let batch = &plan.batch;
    eprintln!(
        "model: depth {} width {} heads {} | {} parameters ({} in matrices) | {:.3e} FLOPs/token",
        config.depth,
        config.width(),
        config.heads(),
        config.total_params(),
        config.total_params() - 2 * config.embedding_params(),
        config.flops_per_token()
    );
    eprintln!(
        "batch: {} tokens/step = {} ranks × {} accum × {} seqs × {} tokens | {} | collectives: {}",
        batch.total_batch_size,
        batch.world_size,
        batch.accum_steps,
        batch.device_batch_size,
        batch.seq_len,
        crate::sys::cuda::device_name(device),
        pg.backend()
    );
    eprintln!(
        "data: {} tokens per epoch ({} sequences of {})",
        data.train_windows() * batch.seq_len as u64,
        data.train_windows(),
        batch.seq_len
    );
    let est = MemoryEstimate::new(config, batch.device_batch_size, batch.seq_len);
    let gib = |b: f64| b / (1u64 << 30) as f64;
    if let Some(shards) = shards {
        eprintln!(
            "optimizer: Muon sharded over {shards} rank(s), AdamW replicated: weights, gradients and \
             optimizer state {:.2} GiB per rank (unsharded {:.2} GiB)",
            gib(est.sharded(config, shards).fixed),
            gib(est.fixed)
        );
    } else {
        eprintln!(
            "optimizer: Muon and AdamW on every rank: weights, gradients and optimizer state \
             {:.2} GiB per rank",
            gib(est.fixed)
        );
    }
}

/// Where a session starts, as rank 0 has it: every rank gets all of it.
#[derive(Serialize, Deserialize)]
struct Start {
    /// The whole run state (best, early-stop counts, clock, ...), not a chosen few fields: one
    /// rank without the best once entered the `best/` gather alone and hung the gang (issue 28).
    state: RunState,
    adamw_step: i64,
    /// Whether rank 0 writes checkpoints.
    checkpoints: bool,
    /// The checkpoint resumed from.
    resumed: Option<PathBuf>,
    /// Damaged checkpoints the resume set aside (for rank 0's report; no rank decides on it).
    set_aside: Vec<charlm_contract::DamagedCheckpoint>,
}

/// Where the session starts: rank 0 restores the newest good checkpoint, then every rank takes
/// rank 0's run state and weights.
fn start_state(
    plan: &Plan,
    data: &Dataset,
    pg: &ProcessGroup,
    device: Device,
    engine: &mut Engine,
) -> Result<Start> {
    let mut start = Start {
        state: RunState::new(data.train_windows()),
        adamw_step: engine.adamw.step,
        checkpoints: plan.checkpoint_dir.is_some(),
        resumed: None,
        set_aside: Vec::new(),
    };
    if pg.rank() == 0 {
        start.resumed = resume::restore(plan, engine, &mut start.state, &mut start.set_aside)?;
        start.adamw_step = engine.adamw.step;
    }
    let start: Start = consensus::from_rank0(pg, device, &start)?;
    engine.adamw.step = start.adamw_step;
    engine.broadcast_from_rank0(pg)?;
    if let (Some(dir), 0) = (&start.resumed, pg.rank()) {
        eprintln!(
            "resumed from {} at step {} ({} trained)",
            dir.display(),
            start.state.step,
            fmt_duration(start.state.elapsed_s)
        );
    }
    Ok(start)
}

/// Rank 0's `start` event and line: where training starts and what its budget and first
/// learning-rate multiplier are.
#[allow(clippy::too_many_arguments)]
fn announce(
    plan: &Plan,
    config: &GptConfig,
    data: &Dataset,
    pg: &ProcessGroup,
    device: Device,
    state: &RunState,
    resumed: Option<PathBuf>,
    events: &Events,
) {
    let batch = &plan.batch;
    let lr_mult = plan.schedule.lr_multiplier(
        state.step,
        plan.budget.fraction(state.step, state.elapsed_s),
    );
    let budget = match (plan.budget.max_steps, plan.budget.seconds) {
        (Some(m), Some(s)) => format!(
            "{m} steps or {} of training, whichever ends first",
            fmt_duration(s)
        ),
        (Some(m), None) => format!("{m} steps"),
        (None, Some(s)) => format!("{} of training", fmt_duration(s)),
        (None, None) => "none".into(),
    };
    eprintln!(
        "start: step {} | budget {budget} | lr ×{lr_mult:.2}",
        state.step
    );
    events.emit(Event::Start(events::Start {
        step: state.step,
        resumed_from: resumed.map(|d| d.display().to_string()),
        depth: config.depth,
        params: config.total_params(),
        seq_len: batch.seq_len,
        device_batch_size: batch.device_batch_size,
        accum_steps: batch.accum_steps,
        total_batch_size: batch.total_batch_size,
        world_size: pg.world_size() as u64,
        device: crate::sys::cuda::device_name(device),
        collectives: pg.backend().to_string(),
        tokens_per_epoch: data.train_windows() * batch.seq_len as u64,
        max_steps: plan.budget.max_steps,
        hours: plan.budget.seconds.map(|s| s / 3600.0),
        lr_mult,
    }));
}
