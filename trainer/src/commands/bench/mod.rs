//! `charlm-trainer bench`: the training step's speed on synthetic tokens, as one JSON line with the
//! fields of docs/performance.md and the reference anchors (tokens/s, MFU, step time, peak memory).
//! `--profile` adds GPU time per kernel; `--check` and `--curve` verify the fast path instead of
//! timing it ([`check`]).

mod check;

use std::time::Instant;

use anyhow::Result;
use serde::Serialize;
use tch::{Device, Kind, Tensor};

use clap::builder::BoolishValueParser;

use crate::dist::{DistEnv, ProcessGroup};
use crate::engine::autobatch::{self, MicroBatch};
use crate::engine::{memory, oom, Engine, EngineOptions, Resolved};
use crate::model::GptConfig;
use crate::sys::cuda;
use crate::sys::events::Events;
use crate::sys::flags::{self, DeviceChoice, LogFormat};
use crate::train::recipe::{Overrides, Recipe, Schedule};
use crate::train::PEAK_FLOPS;
use crate::user_bail;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Transformer layers, 1 to 128; the width is 64 × depth.
    #[arg(long, default_value_t = 12, value_parser = flags::depth)]
    pub depth: i64,
    /// Sequences per forward/backward (1 or more), or `auto`: the largest power of two whose step
    /// fits, as for `train` (on a CPU, also one whose micro-batch stays about a second).
    #[arg(long, default_value = "8")]
    pub device_batch_size: MicroBatch,
    /// Tokens per optimizer step, a multiple of device batch × seq len; accumulation fills it
    /// (as `train`'s). Unset: --accum micro-batches.
    #[arg(long, value_parser = flags::at_least(1i64))]
    pub total_batch_size: Option<i64>,
    /// Micro-batches per optimizer step, 1 or more. Unset: what --total-batch-size needs, else 1.
    #[arg(long, value_parser = flags::at_least(1i64))]
    pub accum: Option<i64>,
    /// Timed optimizer steps after the warm-up ones, 1 or more.
    #[arg(long, default_value_t = 10, value_parser = flags::at_least(1i64))]
    pub steps: i64,
    /// Untimed optimizer steps first (kernels load, allocator settles), 0 or more.
    #[arg(long, default_value_t = 3, value_parser = flags::at_least(0i64))]
    pub warmup: i64,
    /// Tokens per sequence, 2 to 65536.
    #[arg(long, default_value_t = 2048, value_parser = flags::seq_len)]
    pub seq_len: i64,
    /// Where to measure: auto (CUDA when present, else CPU), cpu or cuda.
    #[arg(long, value_enum, default_value = "auto")]
    pub device: DeviceChoice,
    #[command(flatten)]
    pub engine: EngineOptions,
    /// The training recipe whose optimizer step is timed (its orthogonalizer, clip and weight
    /// decay at the start of its schedule).
    #[arg(long, value_enum, default_value_t = Recipe::default())]
    pub recipe: Recipe,
    /// Print GPU time per kernel over the timed steps (libtorch's Kineto profiler).
    #[arg(long, value_parser = BoolishValueParser::new())]
    pub profile: bool,
    /// Instead of timing: compare each fused kernel with its eager twin, and the block path's loss
    /// and gradients with the reference model's, at this size; fails beyond bf16 tolerances.
    #[arg(long, value_parser = BoolishValueParser::new())]
    pub check: bool,
    /// Instead of timing: train --steps steps (micro-batch × accum, constant learning rate) on
    /// generated worksheets twice from the same seed, the reference model and then these options,
    /// and compare the loss curves.
    #[arg(long, value_parser = BoolishValueParser::new())]
    pub curve: bool,
    /// With --curve: fail when any 10-step mean differs by more than this (nats, above 0).
    #[arg(long, default_value_t = 0.05,
          value_parser = flags::positive)]
    pub curve_tolerance: f64,
    /// auto (human in a terminal, else json), human (the human line on stderr only) or json (also
    /// the `bench` event of docs/contract.md on stdout).
    #[arg(long, value_enum, default_value = "auto")]
    pub log_format: LogFormat,
}

/// The micro-batch and accumulation a bench runs with, from the flags.
#[derive(Clone, Copy, Debug)]
pub struct Geometry {
    pub b: i64,
    pub accum: i64,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub device: String,
    pub depth: i64,
    pub device_batch_size: i64,
    pub accum: i64,
    pub total_batch_size: i64,
    pub seq_len: i64,
    pub steps: i64,
    pub params: i64,
    pub tokens_per_s: f64,
    pub mfu: f64,
    pub step_ms: f64,
    pub peak_gib: Option<f64>,
    /// What the engine options resolved to.
    #[serde(flatten)]
    pub engine: Resolved,
}

pub fn run(args: Args) -> Result<()> {
    let events = Events::new(args.log_format, Some(0));
    let device = args.device.resolve(0)?;
    crate::engine::check_precision(&args.engine, device)?;
    let g = geometry(&args, device)?;
    memory::check_fits(&GptConfig::new(args.depth, args.seq_len), g.b, device)?;
    if args.check {
        return check::check(&args, g, device, &events);
    }
    if args.curve {
        return check::curve(&args, g, device, &events);
    }
    let report = match oom::catch(|| measure(&args, g, device)) {
        Ok(report) => report?,
        Err(oom::OutOfMemory) => user_bail!(
            "out of memory at depth {} with a micro-batch of {} sequences of {} tokens: use a \
             smaller --device-batch-size, or auto",
            args.depth,
            g.b,
            args.seq_len
        ),
    };
    eprintln!(
        "bench: depth {} batch {}×{} on {} ({}): {:.0} tok/s, MFU {:.1}%, {:.1} ms/step, peak {} GiB",
        report.depth,
        report.device_batch_size,
        report.accum,
        report.device,
        report.engine,
        report.tokens_per_s,
        report.mfu * 100.0,
        report.step_ms,
        report
            .peak_gib
            .map_or("n/a".to_string(), |g| format!("{g:.1}"))
    );
    events.emit_other("bench", &report);
    Ok(())
}

/// The micro-batch (`auto` probes, as `train` does) and the accumulation that --total-batch-size
/// or --accum ask for; they must agree when both are given.
fn geometry(args: &Args, device: Device) -> Result<Geometry> {
    let t = args.seq_len;
    let sequences = match args.total_batch_size {
        Some(total) if total % t != 0 => user_bail!(
            "--total-batch-size {total} must be a multiple of --seq-len {t}; try {}",
            (total / t).max(1) * t
        ),
        Some(total) => Some(total / t),
        None => None,
    };
    let b = match args.device_batch_size {
        MicroBatch::Fixed(b) => b,
        MicroBatch::Auto => {
            let config = GptConfig::new(args.depth, t);
            let candidates = autobatch::candidates(sequences);
            match autobatch::choose(&config, &candidates, device, &args.engine)? {
                Some(b) => {
                    eprintln!("micro-batch auto: {b} sequences");
                    b
                }
                None => user_bail!(
                    "depth {} with seq len {t} does not fit in memory even with a micro-batch of \
                     1 sequence: use a smaller --depth or --seq-len",
                    args.depth
                ),
            }
        }
    };
    let accum = match (sequences, args.accum) {
        (Some(n), _) if n % b != 0 => user_bail!(
            "--total-batch-size {} must be a multiple of device batch × seq len = {b} × {t} = {}",
            n * t,
            b * t
        ),
        (Some(n), Some(a)) if a != n / b => user_bail!(
            "--accum {a} disagrees with --total-batch-size {} = {} micro-batches of {b} × {t}: \
             give one of them",
            n * t,
            n / b
        ),
        (Some(n), _) => n / b,
        (None, a) => a.unwrap_or(1),
    };
    Ok(Geometry { b, accum })
}

pub fn measure(args: &Args, g: Geometry, device: Device) -> Result<Report> {
    let config = GptConfig::new(args.depth, args.seq_len);
    let pg = ProcessGroup::init(
        &DistEnv::single(),
        device,
        std::time::Duration::from_secs(60),
    )?;
    let tokens = g.b * g.accum * args.seq_len;
    let schedule = Schedule::new(args.recipe, &config, tokens, &Overrides::default());
    let config = config
        .with_rope_base(schedule.rope_base)
        .with_scalars(schedule.scalars);
    let mut engine = Engine::with_options(config, device, 0, schedule.lrs, args.engine);
    engine.muon.orthogonalizer = schedule.orthogonalizer;
    engine.muon.weight_decay = schedule.weight_decay(0.0);
    let (b, t) = (g.b, args.seq_len);
    let vocab = crate::data::vocab::BOS as i64 + 1;
    // Fresh random tokens per micro-batch, generated on the device so the host is not the bottleneck.
    let batch = || Tensor::randint(vocab, [b, t + 1], (Kind::Int64, device));
    let sync = || {
        if let Device::Cuda(i) = device {
            tch::Cuda::synchronize(i as i64);
        }
    };
    let mut step = |i: i64| -> Result<()> {
        for _ in 0..g.accum {
            let all = batch();
            let _ = engine.micro_step(
                &all.narrow(1, 0, t),
                &all.narrow(1, 1, t),
                1.0 / g.accum as f64,
            );
        }
        let momentum = schedule.muon_momentum(i, 0.0);
        engine.optimizer_step(&pg, 1.0, momentum, schedule.grad_clip)
    };
    for i in 0..args.warmup {
        step(i)?;
    }
    sync();
    cuda::reset_peak_memory(device);
    if args.profile {
        crate::sys::profiler::start()?;
    }
    let t0 = Instant::now();
    for i in 0..args.steps {
        step(args.warmup + i)?;
    }
    sync();
    let seconds = t0.elapsed().as_secs_f64();
    if args.profile {
        eprintln!(
            "profile of {} steps ({:.1} ms wall):\n{}",
            args.steps,
            seconds * 1000.0,
            crate::sys::profiler::stop(45)?
        );
    }
    let resolved = engine
        .resolved()
        .ok_or_else(|| anyhow::anyhow!("no micro-batch ran"))?;
    let tokens = (b * t * g.accum * args.steps) as f64;
    let tokens_per_s = tokens / seconds;
    Ok(Report {
        device: cuda::device_name(device),
        depth: args.depth,
        device_batch_size: b,
        accum: g.accum,
        total_batch_size: b * t * g.accum,
        seq_len: t,
        steps: args.steps,
        params: config.total_params(),
        tokens_per_s,
        mfu: config.flops_per_token() * tokens_per_s / PEAK_FLOPS,
        step_ms: seconds * 1000.0 / args.steps as f64,
        peak_gib: cuda::peak_memory_gib(device),
        engine: resolved,
    })
}
