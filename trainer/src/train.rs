//! `charlm-trainer train`: the training loop, in the spirit of nanochat's base_train.py.
//!
//! One run: set up ranks and the model, resume from the newest good checkpoint, then repeat
//! { micro-batches → optimizer step → log / evaluate / checkpoint } until the time budget or the
//! step limit is spent or a SIGTERM arrives. Rank 0 decides when to stop, evaluate and save, and
//! tells the others, so every rank always takes the same branch.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde::Serialize;
use tch::{Device, Kind, Tensor};

use crate::checkpoint::{self, Manifest};
use crate::dataset::Dataset;
use crate::dist::{DistEnv, GroupOptions, ProcessGroup, ReduceOp};
use crate::engine::{Engine, LearningRates};
use crate::model::GptConfig;
use crate::optim::muon_momentum;
use crate::progress::{self, Progress, SharedProgress};
use crate::user_bail;

/// H100 dense bf16 peak, the denominator of MFU (as in nanochat and our anchors).
pub const PEAK_FLOPS: f64 = 989e12;

#[derive(clap::Args, Debug, Clone, Serialize)]
pub struct Args {
    /// A directory written by `charlm-trainer prepare`.
    #[arg(long, env = "CHARLM_DATA")]
    pub data: PathBuf,
    /// Transformer layers; width is 64 × depth.
    #[arg(long, env = "CHARLM_DEPTH", default_value_t = 12)]
    pub depth: i64,
    /// Sequences per forward/backward on one device.
    #[arg(long, env = "CHARLM_DEVICE_BATCH_SIZE", default_value_t = 8)]
    pub device_batch_size: i64,
    /// Tokens per optimizer step over all ranks; gradient accumulation fills it.
    /// Default: one micro-batch per rank (no accumulation).
    #[arg(long, env = "CHARLM_TOTAL_BATCH_SIZE")]
    pub total_batch_size: Option<i64>,
    #[arg(long, env = "CHARLM_SEQ_LEN", default_value_t = 2048)]
    pub seq_len: i64,
    /// Time budget; the learning rate decays to zero over its last 20%.
    #[arg(long, env = "CHARLM_HOURS")]
    pub hours: Option<f64>,
    /// Step limit; with --hours, whichever comes first ends training.
    #[arg(long, env = "CHARLM_MAX_STEPS")]
    pub max_steps: Option<i64>,
    /// Where checkpoints live; training resumes from the newest good one found here.
    #[arg(long, env = "CHARLM_CHECKPOINT_DIR")]
    pub checkpoint_dir: Option<PathBuf>,
    #[arg(long, env = "CHARLM_CHECKPOINT_EVERY_MINUTES", default_value_t = 30.0)]
    pub checkpoint_every_minutes: f64,
    /// Rolling checkpoints kept (the best one is kept besides).
    #[arg(long, env = "CHARLM_KEEP_CHECKPOINTS", default_value_t = 3)]
    pub keep_checkpoints: usize,
    /// Evaluate validation bits per character every N steps (0: only at the end).
    #[arg(long, env = "CHARLM_EVAL_EVERY", default_value_t = 250)]
    pub eval_every: i64,
    /// Validation tokens per evaluation (at most the whole split).
    #[arg(long, env = "CHARLM_EVAL_TOKENS", default_value_t = 4 * 1024 * 1024)]
    pub eval_tokens: i64,
    #[arg(long, env = "CHARLM_LOG_EVERY", default_value_t = 1)]
    pub log_every: i64,
    #[arg(long, env = "CHARLM_SEED", default_value_t = 42)]
    pub seed: u64,
    /// auto: CUDA when present (one GPU per local rank), else CPU.
    #[arg(long, env = "CHARLM_DEVICE", default_value = "auto")]
    pub device: String,
    #[arg(long, env = "CHARLM_GRAD_CLIP", default_value_t = 1.0)]
    pub grad_clip: f64,
    #[arg(long, env = "CHARLM_MATRIX_LR", default_value_t = 0.02)]
    pub matrix_lr: f64,
    #[arg(long, env = "CHARLM_EMBEDDING_LR", default_value_t = 0.2)]
    pub embedding_lr: f64,
    #[arg(long, env = "CHARLM_UNEMBEDDING_LR", default_value_t = 0.004)]
    pub unembedding_lr: f64,
    /// Fraction of the budget over which the learning rate decays linearly to zero.
    #[arg(long, env = "CHARLM_WARMDOWN_RATIO", default_value_t = 0.2)]
    pub warmdown_ratio: f64,
    /// Port of /progress and /metrics on global rank 0 (0: off).
    #[arg(long, env = "CHARLM_METRICS_PORT", default_value_t = 9090)]
    pub metrics_port: u16,
    /// File that receives the final progress JSON on exit (Kubernetes: /dev/termination-log).
    #[arg(long, env = "CHARLM_TERMINATION_LOG")]
    pub termination_log: Option<String>,
    /// Seconds a rank waits for the others (rendezvous and collectives) before failing.
    #[arg(long, env = "CHARLM_DIST_TIMEOUT", default_value_t = 600)]
    pub dist_timeout_s: u64,
    /// CPU threads per rank (default: cores / local ranks).
    #[arg(long, env = "CHARLM_THREADS")]
    pub threads: Option<i32>,
}

/// Settings derived from the arguments and the world size, checked once.
#[derive(Clone, Debug, Serialize, serde::Deserialize, PartialEq)]
pub struct Plan {
    pub depth: i64,
    pub seq_len: i64,
    pub device_batch_size: i64,
    pub total_batch_size: i64,
    pub world_size: usize,
    pub accum_steps: i64,
    pub seed: u64,
}

impl Plan {
    pub fn new(args: &Args, world_size: usize) -> Result<Self> {
        if !(1..=128).contains(&args.depth) {
            user_bail!("--depth {} is out of range: use 1..128", args.depth);
        }
        if args.seq_len < 2 || args.device_batch_size < 1 {
            user_bail!("--seq-len must be at least 2 and --device-batch-size at least 1");
        }
        if args.hours.is_none() && args.max_steps.is_none() {
            user_bail!(
                "give a budget: --hours H (CHARLM_HOURS) or --max-steps N (CHARLM_MAX_STEPS)"
            );
        }
        if args.hours.is_some_and(|h| h.is_nan() || h <= 0.0) {
            user_bail!("--hours must be above 0");
        }
        let per_micro = args.device_batch_size * args.seq_len * world_size as i64;
        let total = args.total_batch_size.unwrap_or(per_micro);
        if total < per_micro || total % per_micro != 0 {
            user_bail!(
                "--total-batch-size {total} must be a multiple of device batch × seq len × ranks = \
                 {} × {} × {world_size} = {per_micro}; try {}",
                args.device_batch_size,
                args.seq_len,
                (total / per_micro).max(1) * per_micro
            );
        }
        Ok(Self {
            depth: args.depth,
            seq_len: args.seq_len,
            device_batch_size: args.device_batch_size,
            total_batch_size: total,
            world_size,
            accum_steps: total / per_micro,
            seed: args.seed,
        })
    }

    pub fn sequences_per_step(&self) -> u64 {
        (self.total_batch_size / self.seq_len) as u64
    }
}

/// Learning-rate multiplier: 1, then a linear decay to 0 over the last `warmdown` of the budget.
/// `progress` is the spent fraction of the budget (time or steps, whichever is further along).
pub fn lr_multiplier(progress: f64, warmdown: f64) -> f64 {
    if warmdown <= 0.0 || progress < 1.0 - warmdown {
        1.0
    } else {
        ((1.0 - progress) / warmdown).max(0.0)
    }
}

fn pick_device(choice: &str, local_rank: usize) -> Result<Device> {
    match choice {
        "cpu" => Ok(Device::Cpu),
        "cuda" if !tch::Cuda::is_available() => {
            user_bail!("--device cuda but no CUDA GPU is visible; use --device cpu or auto")
        }
        "cuda" | "auto" if tch::Cuda::is_available() => {
            let n = tch::Cuda::device_count() as usize;
            if local_rank >= n {
                user_bail!("local rank {local_rank} has no GPU: only {n} visible; start fewer processes per node");
            }
            Ok(Device::Cuda(local_rank))
        }
        "auto" => Ok(Device::Cpu),
        other => user_bail!("--device {other:?} is not one of auto, cpu, cuda"),
    }
}

/// Everything the loop mutates besides the model.
struct RunState {
    /// Training windows per epoch, to express positions in epochs.
    train_windows: u64,
    step: i64,
    elapsed_s: f64,
    val_bpc: Option<f64>,
    best: Option<(f64, i64)>,
    last_checkpoint: Option<PathBuf>,
}

pub fn run(args: Args) -> Result<()> {
    let env = DistEnv::from_env();
    let device = pick_device(&args.device, env.local_rank)?;
    if device == Device::Cpu {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let threads = args
            .threads
            .unwrap_or((cores / env.local_world_size.max(1)).max(1) as i32);
        tch::set_num_threads(threads);
    }
    let plan = Plan::new(&args, env.world_size)?;
    let data = Dataset::open(&args.data, plan.seq_len, plan.seed)?;
    let mut options = GroupOptions::new(Duration::from_secs(args.dist_timeout_s));
    // Under `launch` even a world of one goes through the real backend (NCCL on a GPU), so a
    // single-GPU run exercises the same code path as a multi-GPU one.
    options.connect_single = std::env::var_os("WORLD_SIZE").is_some();
    let pg = ProcessGroup::init_with(&env, device, &options)?;
    let is_main = pg.rank() == 0;

    let shared: SharedProgress = Arc::new(Mutex::new(Progress {
        world_size: pg.world_size(),
        ..Default::default()
    }));
    if is_main && args.metrics_port != 0 {
        let host = std::env::var("POD_IP").unwrap_or_else(|_| "0.0.0.0".to_string());
        let host = if host.contains(':') {
            format!("[{host}]")
        } else {
            host
        };
        progress::serve(&format!("{host}:{}", args.metrics_port), shared.clone());
    }

    // A finished training stays finished: a restarted pod must not train past its budget.
    let done = if is_main {
        finished_summary(&args)?
    } else {
        None
    };
    if agree(&pg, device, &[f64::from(u8::from(done.is_some()))])?[0] > 0.0 {
        if let Some(summary) = done {
            println!("{}", serde_json::to_string(&summary)?);
            if let Ok(p) = serde_json::from_value::<Progress>(summary) {
                finish(&args, &shared, p);
            }
        }
        return Ok(());
    }

    let config = GptConfig::new(plan.depth, plan.seq_len);
    let lrs = LearningRates {
        matrix: args.matrix_lr,
        embedding: args.embedding_lr,
        unembedding: args.unembedding_lr,
    };
    let mut engine = Engine::new(config, device, plan.seed, lrs);
    if is_main {
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
            plan.total_batch_size,
            plan.world_size,
            plan.accum_steps,
            plan.device_batch_size,
            plan.seq_len,
            crate::cuda::device_name(device),
            pg.backend()
        );
    }

    let mut state = RunState {
        train_windows: data.train_windows(),
        step: 0,
        elapsed_s: 0.0,
        val_bpc: None,
        best: None,
        last_checkpoint: None,
    };
    let resumed = if is_main {
        restore(&args, &plan, &mut engine, &mut state)?
    } else {
        None
    };
    let header = agree(
        &pg,
        device,
        &[state.step as f64, state.elapsed_s, engine.adamw.step as f64],
    )?;
    state.step = header[0] as i64;
    state.elapsed_s = header[1];
    engine.adamw.step = header[2] as i64;
    engine.broadcast_from_rank0(&pg)?;
    if let Some(dir) = resumed {
        eprintln!(
            "resumed from {} at step {} ({:.0} s trained)",
            dir.display(),
            state.step,
            state.elapsed_s
        );
    }

    let stop = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGTERM, stop.clone())?;
    signal_hook::flag::register(signal_hook::consts::SIGINT, stop.clone())?;

    let result = train_loop(
        &args,
        &plan,
        &data,
        &pg,
        device,
        &mut engine,
        &mut state,
        &shared,
        &stop,
    );
    if let Err(err) = &result {
        eprintln!("rank {}: training failed: {err:#}", pg.rank());
    }
    result
}

/// Rank 0's values, seen by every rank: the way ranks agree on what to do next.
fn agree(pg: &ProcessGroup, device: Device, values: &[f64]) -> Result<Vec<f64>> {
    if pg.world_size() == 1 {
        return Ok(values.to_vec());
    }
    let t = Tensor::from_slice(values).to_device(device);
    pg.broadcast(std::slice::from_ref(&t), 0)?;
    Ok(Vec::<f64>::try_from(&t.to_device(Device::Cpu))?)
}

/// The summary of a training whose newest checkpoint already spent the *current* budget: a
/// restarted pod must not train past its budget, while a raised budget continues the training.
fn finished_summary(args: &Args) -> Result<Option<serde_json::Value>> {
    let Some(root) = &args.checkpoint_dir else {
        return Ok(None);
    };
    let Some((_, newest)) = checkpoint::list(root)?.into_iter().next() else {
        return Ok(None);
    };
    let Ok(m) = checkpoint::load_manifest(&newest) else {
        return Ok(None);
    };
    let budget_s = args.hours.map(|h| h * 3600.0);
    if budget_fraction(m.step, m.elapsed_s, budget_s, args.max_steps) < 1.0 {
        return Ok(None);
    }
    eprintln!(
        "training in {} already spent this budget (step {}, {:.0} s); nothing to do",
        root.display(),
        m.step,
        m.elapsed_s
    );
    match checkpoint::read_complete(root)? {
        Some(summary) if summary.get("step").and_then(|s| s.as_i64()) == Some(m.step) => {
            Ok(Some(summary))
        }
        _ => {
            let best = checkpoint::load_manifest(&root.join(checkpoint::BEST_DIR)).ok();
            let p = Progress {
                step: m.step,
                total_steps_estimate: Some(m.step),
                epoch: m.epoch,
                val_bpc: m.val_bpc,
                best_val_bpc: best.as_ref().and_then(|b| b.val_bpc),
                best_step: best.map(|b| b.step),
                elapsed_s: m.elapsed_s,
                eta_s: Some(0.0),
                checkpoint: Some(newest.display().to_string()),
                world_size: m.world_size,
                complete: true,
                ..Default::default()
            };
            Ok(Some(serde_json::to_value(p)?))
        }
    }
}

/// Loads the newest good checkpoint into the engine (rank 0); returns its directory.
fn restore(
    args: &Args,
    plan: &Plan,
    engine: &mut Engine,
    state: &mut RunState,
) -> Result<Option<PathBuf>> {
    let Some(root) = &args.checkpoint_dir else {
        eprintln!("warning: no --checkpoint-dir: this run cannot be resumed");
        return Ok(None);
    };
    let Some(loaded) = checkpoint::load_latest(root)? else {
        return Ok(None);
    };
    let m = &loaded.manifest;
    if m.model != engine.model.config {
        user_bail!(
            "{} holds a depth-{} model with seq len {}, but this run asks for depth {} with seq len {}: \
             use another --checkpoint-dir, or the same settings",
            loaded.dir.display(),
            m.model.depth,
            m.model.seq_len,
            plan.depth,
            plan.seq_len
        );
    }
    if let Ok(old) = serde_json::from_value::<Plan>(m.settings.clone()) {
        if old.total_batch_size != plan.total_batch_size || old.seed != plan.seed {
            eprintln!(
                "warning: resuming with total batch {} seed {} (checkpoint: {} / {}); the data order changes",
                plan.total_batch_size, plan.seed, old.total_batch_size, old.seed
            );
        }
    }
    engine.load(&loaded.model, &loaded.optimizer, m.adamw_step)?;
    state.step = m.step;
    state.elapsed_s = m.elapsed_s;
    state.val_bpc = m.val_bpc;
    if let Ok(best) = checkpoint::load_manifest(&root.join(checkpoint::BEST_DIR)) {
        state.best = best.val_bpc.map(|v| (v, best.step));
    }
    state.last_checkpoint = Some(loaded.dir.clone());
    Ok(Some(loaded.dir))
}

#[allow(clippy::too_many_arguments)]
fn train_loop(
    args: &Args,
    plan: &Plan,
    data: &Dataset,
    pg: &ProcessGroup,
    device: Device,
    engine: &mut Engine,
    state: &mut RunState,
    shared: &SharedProgress,
    stop: &AtomicBool,
) -> Result<()> {
    let is_main = pg.rank() == 0;
    let config = engine.model.config;
    let budget_s = args.hours.map(|h| h * 3600.0);
    let tokens_per_step = plan.total_batch_size as f64;
    let windows = data.train_windows();
    let run_start = Instant::now();
    let elapsed_at_start = state.elapsed_s;
    let mut last_save = Instant::now();
    let mut step_times: Vec<f64> = Vec::new();
    let mut loss_acc = Tensor::zeros([], (Kind::Float, device));

    loop {
        // Budget and schedule, as rank 0 sees them.
        let progress_frac = budget_fraction(state.step, state.elapsed_s, budget_s, args.max_steps);
        let out_of_budget = progress_frac >= 1.0;
        let interrupted = stop.load(Ordering::Relaxed);
        let control = agree(
            pg,
            device,
            &[
                f64::from(u8::from(out_of_budget)),
                f64::from(u8::from(interrupted)),
                state.elapsed_s,
            ],
        )?;
        state.elapsed_s = control[2];
        if control[0] > 0.0 || control[1] > 0.0 {
            let complete = control[0] > 0.0;
            // A final evaluation, unless the last step already had one.
            if complete && state.val_bpc.is_none()
                || complete && args.eval_every > 0 && state.step % args.eval_every != 0
            {
                evaluate_and_track(args, plan, data, pg, engine, state, shared)?;
            }
            if is_main {
                save_checkpoint(args, plan, engine, state)?;
                let mut p = shared.lock().unwrap().clone();
                fill_progress(
                    &mut p,
                    state,
                    plan,
                    windows,
                    None,
                    None,
                    budget_s,
                    args.max_steps,
                );
                p.complete = complete;
                if complete {
                    if let Some(dir) = &args.checkpoint_dir {
                        checkpoint::write_complete(dir, &serde_json::to_value(&p)?)?;
                    }
                    eprintln!(
                        "training complete at step {}: val bpc {:?}",
                        state.step, state.val_bpc
                    );
                } else {
                    eprintln!(
                        "stopped by signal at step {}; checkpoint saved, exiting",
                        state.step
                    );
                }
                println!(
                    "{}",
                    serde_json::to_string(&serde_json::json!({"event": "end", "progress": p}))?
                );
                finish(args, shared, p);
            }
            return Ok(());
        }

        let t0 = Instant::now();
        let lr_mult = lr_multiplier(progress_frac, args.warmdown_ratio);
        let momentum = muon_momentum(state.step);
        let _ = loss_acc.zero_();
        for micro in 0..plan.accum_steps {
            let (x, y) = train_batch(data, plan, state.step, micro, pg.rank(), device);
            let loss = engine.micro_step(&x, &y, 1.0 / plan.accum_steps as f64);
            loss_acc += loss;
        }
        engine.optimizer_step(pg, lr_mult, momentum, args.grad_clip)?;
        state.step += 1;
        // The logged loss is the global batch's, whatever the number of ranks.
        pg.all_reduce(std::slice::from_ref(&loss_acc), ReduceOp::Avg)?;
        // One host synchronisation per step: the loss value, which also makes the timing honest.
        let train_loss = loss_acc.double_value(&[]) / plan.accum_steps as f64;
        if !train_loss.is_finite() {
            anyhow::bail!(
                "training diverged at step {}: loss {train_loss}",
                state.step
            );
        }
        let dt = t0.elapsed().as_secs_f64();
        state.elapsed_s = elapsed_at_start + run_start.elapsed().as_secs_f64();
        step_times.push(dt);
        if step_times.len() > 20 {
            step_times.remove(0);
        }
        let mean_dt = step_times.iter().sum::<f64>() / step_times.len() as f64;
        let tok_s = tokens_per_step / mean_dt;
        let mfu = device
            .is_cuda()
            .then(|| config.flops_per_token() * tok_s / (PEAK_FLOPS * pg.world_size() as f64));

        if is_main {
            let mut p = shared.lock().unwrap();
            p.train_loss = Some(train_loss);
            p.tokens_per_s = Some(tok_s);
            p.mfu = mfu;
            p.peak_memory_gib = crate::cuda::peak_memory_gib(device);
            fill_progress(
                &mut p,
                state,
                plan,
                windows,
                Some(mean_dt),
                Some(lr_mult),
                budget_s,
                args.max_steps,
            );
            if args.log_every > 0 && (state.step % args.log_every == 0 || state.step == 1) {
                log_step(&p, lr_mult, budget_s, args.max_steps);
            }
        }

        if args.eval_every > 0 && state.step % args.eval_every == 0 {
            evaluate_and_track(args, plan, data, pg, engine, state, shared)?;
        }
        let save_due = last_save.elapsed().as_secs_f64() >= args.checkpoint_every_minutes * 60.0;
        if agree(pg, device, &[f64::from(u8::from(save_due))])?[0] > 0.0 {
            if is_main {
                save_checkpoint(args, plan, engine, state)?;
                shared.lock().unwrap().checkpoint = state
                    .last_checkpoint
                    .as_ref()
                    .map(|p| p.display().to_string());
            }
            last_save = Instant::now();
        }
    }
}

/// How far along the budget is: the larger of the time and step fractions.
fn budget_fraction(
    step: i64,
    elapsed_s: f64,
    budget_s: Option<f64>,
    max_steps: Option<i64>,
) -> f64 {
    let by_time = budget_s.map_or(0.0, |b| elapsed_s / b);
    let by_steps = max_steps.map_or(0.0, |m| step as f64 / m.max(1) as f64);
    by_time.max(by_steps)
}

/// One micro-batch of this rank: inputs and targets `[B, T]` on the device.
fn train_batch(
    data: &Dataset,
    plan: &Plan,
    step: i64,
    micro: i64,
    rank: usize,
    device: Device,
) -> (Tensor, Tensor) {
    let (b, t) = (plan.device_batch_size, plan.seq_len);
    let seqs = crate::dataset::rank_sequences(
        step as u64,
        plan.sequences_per_step(),
        micro as u64,
        plan.world_size as u64,
        rank as u64,
        b as u64,
    );
    let mut buf = vec![0i64; (b * (t + 1)) as usize];
    data.fill_train(&seqs, &mut buf);
    let all = Tensor::from_slice(&buf).view([b, t + 1]);
    let all = if device.is_cuda() {
        all.pin_memory(device)
            .to_device_(device, Kind::Int64, true, false)
    } else {
        all
    };
    (all.narrow(1, 0, t), all.narrow(1, 1, t))
}

/// Validation bits per character over up to `--eval-tokens` tokens, averaged over ranks.
/// Targets that are BOS are not characters and don't count.
pub fn evaluate(
    args: &Args,
    plan: &Plan,
    data: &Dataset,
    pg: &ProcessGroup,
    engine: &Engine,
) -> Result<f64> {
    let device = engine.model.device();
    let (b, t) = (plan.device_batch_size, plan.seq_len);
    let windows = data
        .val_windows()
        .min(((args.eval_tokens / t).max(1)) as u64);
    let mut sums = Tensor::zeros([2], (Kind::Double, device));
    let mut buf = vec![0i64; (b * (t + 1)) as usize];
    let world = pg.world_size() as u64;
    let mut first = pg.rank() as u64 * b as u64;
    tch::no_grad(|| -> Result<()> {
        while first < windows {
            let n = (windows - first).min(b as u64) as i64;
            let seqs: Vec<u64> = (first..first + n as u64).collect();
            data.fill_val(&seqs, &mut buf[..(n * (t + 1)) as usize]);
            let all = Tensor::from_slice(&buf[..(n * (t + 1)) as usize])
                .view([n, t + 1])
                .to_device(device);
            let x = all.narrow(1, 0, t);
            let y = all.narrow(1, 1, t);
            let bos = crate::vocab::BOS as i64;
            let y = y.masked_fill(&y.eq(bos), -1);
            let nats = engine
                .model
                .loss_with(&x, &y, tch::Reduction::Sum, -1)
                .to_kind(Kind::Double);
            let count = y.ne(-1).sum(Kind::Double);
            sums += Tensor::stack(&[nats, count], 0);
            first += world * b as u64;
        }
        Ok(())
    })?;
    pg.all_reduce(std::slice::from_ref(&sums), ReduceOp::Sum)?;
    let v = Vec::<f64>::try_from(&sums.to_device(Device::Cpu))?;
    if v[1] == 0.0 {
        user_bail!("the validation split has no characters to evaluate; prepare with a larger --val-fraction");
    }
    Ok(v[0] / v[1] / std::f64::consts::LN_2)
}

fn evaluate_and_track(
    args: &Args,
    plan: &Plan,
    data: &Dataset,
    pg: &ProcessGroup,
    engine: &Engine,
    state: &mut RunState,
    shared: &SharedProgress,
) -> Result<()> {
    let bpc = evaluate(args, plan, data, pg, engine)?;
    state.val_bpc = Some(bpc);
    if pg.rank() != 0 {
        return Ok(());
    }
    let improved = state.best.is_none_or(|(best, _)| bpc < best);
    if improved {
        state.best = Some((bpc, state.step));
        if let Some(root) = &args.checkpoint_dir {
            let manifest = manifest_for(plan, engine, state);
            checkpoint::save(
                root,
                checkpoint::BEST_DIR,
                manifest,
                &engine.model_state(),
                &engine.optimizer_state(),
            )
            .context("save the best checkpoint")?;
        }
    }
    let mut p = shared.lock().unwrap();
    p.val_bpc = Some(bpc);
    p.best_val_bpc = state.best.map(|b| b.0);
    p.best_step = state.best.map(|b| b.1);
    eprintln!(
        "step {:>6} | val bpc {bpc:.4}{}",
        state.step,
        if improved { " (best)" } else { "" }
    );
    println!(
        "{}",
        serde_json::json!({"event": "eval", "step": state.step, "val_bpc": bpc, "best": improved})
    );
    Ok(())
}

fn manifest_for(plan: &Plan, engine: &Engine, state: &RunState) -> Manifest {
    let consumed = state.step as u64 * plan.sequences_per_step();
    Manifest {
        format: 0,
        step: state.step,
        model: engine.model.config,
        settings: serde_json::to_value(plan).unwrap_or_default(),
        sequences_consumed: consumed,
        epoch: consumed as f64 / state.train_windows.max(1) as f64,
        seed: plan.seed,
        elapsed_s: state.elapsed_s,
        val_bpc: state.val_bpc,
        world_size: plan.world_size,
        adamw_step: engine.adamw.step,
        files: Default::default(),
    }
}

fn save_checkpoint(args: &Args, plan: &Plan, engine: &Engine, state: &mut RunState) -> Result<()> {
    let Some(root) = &args.checkpoint_dir else {
        return Ok(());
    };
    let t0 = Instant::now();
    let manifest = manifest_for(plan, engine, state);
    let dir = checkpoint::save(
        root,
        &checkpoint::step_dir_name(state.step),
        manifest,
        &engine.model_state(),
        &engine.optimizer_state(),
    )
    .with_context(|| format!("save a checkpoint in {}", root.display()))?;
    checkpoint::prune(root, args.keep_checkpoints)?;
    eprintln!(
        "checkpoint {} saved in {:.1} s",
        dir.display(),
        t0.elapsed().as_secs_f64()
    );
    state.last_checkpoint = Some(dir);
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn fill_progress(
    p: &mut Progress,
    state: &RunState,
    plan: &Plan,
    windows: u64,
    step_s: Option<f64>,
    _lr_mult: Option<f64>,
    budget_s: Option<f64>,
    max_steps: Option<i64>,
) {
    p.step = state.step;
    p.tokens = state.step as u64 * plan.total_batch_size as u64;
    p.epoch = (state.step as u64 * plan.sequences_per_step()) as f64 / windows.max(1) as f64;
    p.elapsed_s = state.elapsed_s;
    p.val_bpc = state.val_bpc;
    p.best_val_bpc = state.best.map(|b| b.0);
    p.best_step = state.best.map(|b| b.1);
    p.checkpoint = state
        .last_checkpoint
        .as_ref()
        .map(|d| d.display().to_string());
    let by_time = budget_s.map(|b| (b - state.elapsed_s).max(0.0));
    let by_steps = match (max_steps, step_s) {
        (Some(m), Some(dt)) => Some((m - state.step).max(0) as f64 * dt),
        _ => None,
    };
    p.eta_s = match (by_time, by_steps) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    p.total_steps_estimate = match (p.eta_s, step_s) {
        (Some(eta), Some(dt)) if dt > 0.0 => Some(state.step + (eta / dt).round() as i64),
        _ => max_steps,
    };
}

fn log_step(p: &Progress, lr_mult: f64, _budget_s: Option<f64>, _max_steps: Option<i64>) {
    let total = p
        .total_steps_estimate
        .map_or("?".to_string(), |t| t.to_string());
    let mfu = p
        .mfu
        .map_or(String::new(), |m| format!(" | mfu {:.1}%", m * 100.0));
    eprintln!(
        "step {:>6}/{total} | loss {:.4} | lrm {lr_mult:.2} | {:.0} tok/s{mfu} | epoch {:.2} | elapsed {} | eta {}",
        p.step,
        p.train_loss.unwrap_or(f64::NAN),
        p.tokens_per_s.unwrap_or(0.0),
        p.epoch,
        fmt_duration(p.elapsed_s),
        p.eta_s.map_or("?".to_string(), fmt_duration),
    );
    println!(
        "{}",
        serde_json::json!({
            "event": "step", "step": p.step, "loss": p.train_loss, "lr_mult": lr_mult,
            "tokens_per_s": p.tokens_per_s, "mfu": p.mfu, "elapsed_s": p.elapsed_s,
            "eta_s": p.eta_s, "epoch": p.epoch, "tokens": p.tokens,
        })
    );
}

fn fmt_duration(s: f64) -> String {
    let s = s.max(0.0) as u64;
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
    }
}

/// Final bookkeeping shared by every way of ending: the termination log for the supervisor.
fn finish(args: &Args, _shared: &SharedProgress, p: Progress) {
    if let Some(path) = &args.termination_log {
        progress::write_termination_log(path, &p);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmdown_is_linear_over_the_last_fifth() {
        assert_eq!(lr_multiplier(0.5, 0.2), 1.0);
        assert!((lr_multiplier(0.9, 0.2) - 0.5).abs() < 1e-12);
        assert_eq!(lr_multiplier(1.0, 0.2), 0.0);
    }

    #[test]
    fn budget_takes_the_further_of_time_and_steps() {
        assert_eq!(budget_fraction(50, 10.0, Some(100.0), Some(100)), 0.5);
        assert_eq!(budget_fraction(10, 90.0, Some(100.0), Some(100)), 0.9);
        assert_eq!(budget_fraction(10, 90.0, None, Some(100)), 0.1);
    }

    #[test]
    fn plan_rejects_a_total_batch_that_does_not_divide() {
        use clap::Parser;
        #[derive(Parser)]
        struct T {
            #[command(flatten)]
            a: Args,
        }
        let args = T::parse_from([
            "t",
            "--data",
            "x",
            "--max-steps",
            "1",
            "--seq-len",
            "8",
            "--device-batch-size",
            "2",
            "--total-batch-size",
            "40",
        ])
        .a;
        let err = Plan::new(&args, 1).unwrap_err();
        assert_eq!(crate::error::exit_code(&err), 2);
        assert!(format!("{err}").contains("try 32"), "{err}");
        let args = T::parse_from([
            "t",
            "--data",
            "x",
            "--max-steps",
            "1",
            "--seq-len",
            "8",
            "--device-batch-size",
            "2",
            "--total-batch-size",
            "64",
        ])
        .a;
        assert_eq!(Plan::new(&args, 2).unwrap().accum_steps, 2);
    }
}
