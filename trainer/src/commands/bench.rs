//! `charlm-trainer bench`: the training step's speed on synthetic tokens, as one JSON line with the
//! fields of docs/performance.md and the reference anchors (tokens/s, MFU, step time, peak memory).
//! `--profile` adds GPU time per kernel; `--check` and `--curve` verify the fast path instead of
//! timing it (see src/engine/verify.rs).

use std::time::Instant;

use anyhow::Result;
use serde::Serialize;
use tch::{Device, Kind, Tensor};

use crate::dist::{DistEnv, ProcessGroup};
use crate::engine::{
    Attention, Engine, EngineOptions, Kernels, LearningRates, Recompute, Resolved, Toggle,
};
use crate::model::GptConfig;
use crate::sys::cuda;
use crate::train::PEAK_FLOPS;
use crate::user_bail;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[arg(long, default_value_t = 12)]
    pub depth: i64,
    #[arg(long, default_value_t = 8)]
    pub device_batch_size: i64,
    /// Micro-batches per optimizer step.
    #[arg(long, default_value_t = 1)]
    pub accum: i64,
    /// Timed optimizer steps, after the warm-up ones.
    #[arg(long, default_value_t = 10)]
    pub steps: i64,
    #[arg(long, default_value_t = 3)]
    pub warmup: i64,
    #[arg(long, default_value_t = 2048)]
    pub seq_len: i64,
    #[arg(long, default_value = "auto")]
    pub device: String,
    #[command(flatten)]
    pub engine: EngineOptions,
    /// Print GPU time per kernel over the timed steps (libtorch's Kineto profiler).
    #[arg(long)]
    pub profile: bool,
    /// Instead of timing: compare each fused kernel with its eager twin, and the block path's loss
    /// and gradients with the reference model's, at this size; fails beyond bf16 tolerances.
    #[arg(long)]
    pub check: bool,
    /// Instead of timing: train --steps steps (micro-batch × accum, constant learning rate) on
    /// generated worksheets twice from the same seed, the reference model and then these options,
    /// and compare the loss curves.
    #[arg(long)]
    pub curve: bool,
    /// With --curve: fail when any 10-step mean differs by more than this (nats).
    #[arg(long, default_value_t = 0.05)]
    pub curve_tolerance: f64,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub device: String,
    pub depth: i64,
    pub device_batch_size: i64,
    pub accum: i64,
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
    if args.steps < 1 || args.depth < 1 || args.device_batch_size < 1 || args.accum < 1 {
        user_bail!("--steps, --depth, --device-batch-size and --accum must be at least 1");
    }
    let device = match args.device.as_str() {
        "cpu" => Device::Cpu,
        "cuda" | "auto" if tch::Cuda::is_available() => Device::Cuda(0),
        "cuda" => user_bail!("--device cuda but no CUDA GPU is visible"),
        _ => Device::Cpu,
    };
    if args.check {
        return check(&args, device);
    }
    if args.curve {
        return curve(&args, device);
    }
    let report = measure(&args, device)?;
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
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}

pub fn measure(args: &Args, device: Device) -> Result<Report> {
    let config = GptConfig::new(args.depth, args.seq_len);
    let pg = ProcessGroup::init(
        &DistEnv::single(),
        device,
        std::time::Duration::from_secs(60),
    )?;
    let mut engine = Engine::with_options(config, device, 0, LearningRates::default(), args.engine);
    let (b, t) = (args.device_batch_size, args.seq_len);
    let vocab = crate::data::vocab::BOS as i64 + 1;
    // Fresh random tokens per micro-batch, generated on the device so the host is not the bottleneck.
    let batch = || Tensor::randint(vocab, [b, t + 1], (Kind::Int64, device));
    let sync = || {
        if let Device::Cuda(i) = device {
            tch::Cuda::synchronize(i as i64);
        }
    };
    let mut step = |i: i64| -> Result<()> {
        for _ in 0..args.accum {
            let all = batch();
            let _ = engine.micro_step(
                &all.narrow(1, 0, t),
                &all.narrow(1, 1, t),
                1.0 / args.accum as f64,
            );
        }
        engine.optimizer_step(&pg, 1.0, crate::engine::optim::muon_momentum(i), 1.0)
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
    let tokens = (b * t * args.accum * args.steps) as f64;
    let tokens_per_s = tokens / seconds;
    Ok(Report {
        device: cuda::device_name(device),
        depth: args.depth,
        device_batch_size: b,
        accum: args.accum,
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

/// Tolerances of `--check` with bf16 compute (fp32 on the CPU is checked far tighter by the tests):
/// a fused kernel and its eager twin differ only by rounding order before the final bf16 rounding;
/// the block path and the reference model differ by where intermediates are rounded to bf16.
const KERNEL_TOLERANCE: f64 = 1e-2;
const MODEL_TOLERANCE: f64 = 5e-2;

fn check(args: &Args, device: Device) -> Result<()> {
    let config = GptConfig::new(args.depth, args.seq_len);
    let mut failed = Vec::new();
    let mut show = |d: &crate::engine::verify::Diff, tol: f64| {
        // NaN fails too.
        let bad = d.rel.is_nan() || d.rel > tol;
        println!(
            "{:<62} rel {:.3e}  max abs {:.3e}  {}",
            d.what,
            d.rel,
            d.max_abs,
            if bad { "FAIL" } else { "ok" }
        );
        if bad {
            failed.push(d.what.clone());
        }
    };
    let shape = crate::engine::verify::OpShape {
        b: args.device_batch_size,
        t: args.seq_len,
        heads: config.heads(),
        c: config.width(),
    };
    let kind = if device.is_cuda() {
        Kind::BFloat16
    } else {
        Kind::Float
    };
    tch::manual_seed(1);
    println!("eager twins vs formulas ({kind:?}):");
    for d in crate::engine::verify::eager_vs_formula(shape, kind, device)? {
        show(&d, MODEL_TOLERANCE);
    }
    let mut candidates = vec![
        (
            "eager",
            crate::engine::verify::fast(Kernels::Eager, Recompute::Blocks(0)),
        ),
        (
            "eager+recompute",
            crate::engine::verify::fast(Kernels::Eager, Recompute::Blocks(i64::MAX)),
        ),
    ];
    if device.is_cuda() {
        println!("fused kernels vs eager twins:");
        for d in crate::engine::verify::fused_vs_eager(shape, device)? {
            show(&d, KERNEL_TOLERANCE);
        }
        let fused = crate::engine::verify::fast(Kernels::Fused, Recompute::Blocks(0));
        candidates.push(("fused (auto options)", fused));
        candidates.push((
            "fused, flash attention",
            EngineOptions {
                attention: Attention::Flash,
                ..fused
            },
        ));
        candidates.push((
            "fused, activations recomputed",
            EngineOptions {
                keep_activations: Toggle::Off,
                ..fused
            },
        ));
        candidates.push((
            "fused+recompute",
            crate::engine::verify::fast(Kernels::Fused, Recompute::Blocks(i64::MAX)),
        ));
        candidates.push((
            "fused, no weight cache",
            EngineOptions {
                weight_cache: Toggle::Off,
                ..fused
            },
        ));
    }
    println!(
        "block path vs reference model (depth {}, {}×{} tokens):",
        args.depth, args.device_batch_size, args.seq_len
    );
    for d in crate::engine::verify::models_vs_reference(
        config,
        args.device_batch_size,
        device,
        &candidates,
    ) {
        show(&d, MODEL_TOLERANCE);
    }
    if !failed.is_empty() {
        anyhow::bail!("check failed: {}", failed.join(", "));
    }
    println!("check passed");
    Ok(())
}

fn curve(args: &Args, device: Device) -> Result<()> {
    let config = GptConfig::new(args.depth, args.seq_len);
    let tokens_needed = (args.steps * args.accum * args.device_batch_size * args.seq_len) as u64;
    // Enough text that windows rarely repeat, at most 64 M characters.
    let tokens =
        crate::engine::verify::synthetic_tokens(tokens_needed.clamp(1 << 20, 64 << 20), 1)?;
    let run = |options: EngineOptions, perturb: f64| {
        let t0 = Instant::now();
        let losses = crate::engine::verify::loss_curve(
            config,
            &tokens,
            args.device_batch_size,
            args.accum,
            args.steps,
            device,
            options,
            perturb,
        );
        (losses, t0.elapsed().as_secs_f64())
    };
    let reference = EngineOptions {
        kernels: Kernels::Reference,
        ..EngineOptions::default()
    };
    let (want, want_s) = run(reference, 0.0);
    let (got, got_s) = run(args.engine, 0.0);
    // The reference again from weights nudged by one part in a million: how far rounding noise
    // alone moves the curve.
    let (noise, _) = run(reference, 1e-6);
    let (want, got, noise) = (want?, got?, noise?);
    let d = crate::engine::verify::curve_diff(&got, &want);
    let n = crate::engine::verify::curve_diff(&noise, &want);
    println!(
        "{}",
        serde_json::json!({
            "depth": args.depth, "device_batch_size": args.device_batch_size,
            "accum": args.accum, "seq_len": args.seq_len, "steps": args.steps,
            "device": cuda::device_name(device), "options": args.engine,
            "reference_s": want_s, "optimized_s": got_s, "diff": d, "noise_diff": n,
            "reference": want, "optimized": got, "reference_perturbed": noise,
        })
    );
    eprintln!(
        "curve: {} steps, reference {:.4} → optimized {:.4} over the last 10; |Δ| max {:.4}, mean {:.4}, 10-step means max {:.4} (tolerance {}); reference vs itself nudged 1e-6: max {:.4}, mean {:.4}, 10-step means max {:.4}",
        args.steps, d.final_ref, d.final_got, d.max_abs, d.mean_abs, d.max_abs_10, args.curve_tolerance,
        n.max_abs, n.mean_abs, n.max_abs_10
    );
    if d.max_abs_10.is_nan() || d.max_abs_10 > args.curve_tolerance {
        anyhow::bail!(
            "loss curves differ by {:.4} nats in a 10-step mean, above {}",
            d.max_abs_10,
            args.curve_tolerance
        );
    }
    Ok(())
}
