//! `charlm-trainer bench`: the training step's speed on synthetic tokens, as one JSON line with the
//! fields of docs/performance.md and the reference anchors (tokens/s, MFU, step time, peak memory).

use std::time::Instant;

use anyhow::Result;
use serde::Serialize;
use tch::{Device, Kind, Tensor};

use crate::dist::{DistEnv, ProcessGroup};
use crate::engine::{Engine, LearningRates};
use crate::model::GptConfig;
use crate::train::PEAK_FLOPS;
use crate::{cuda, user_bail};

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
    let report = measure(&args, device)?;
    eprintln!(
        "bench: depth {} batch {}×{} on {}: {:.0} tok/s, MFU {:.1}%, {:.1} ms/step, peak {} GiB",
        report.depth,
        report.device_batch_size,
        report.accum,
        report.device,
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
    let mut engine = Engine::new(config, device, 0, LearningRates::default());
    let (b, t) = (args.device_batch_size, args.seq_len);
    let vocab = crate::vocab::BOS as i64 + 1;
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
        engine.optimizer_step(&pg, 1.0, crate::optim::muon_momentum(i), 1.0)
    };
    for i in 0..args.warmup {
        step(i)?;
    }
    sync();
    cuda::reset_peak_memory(device);
    let t0 = Instant::now();
    for i in 0..args.steps {
        step(args.warmup + i)?;
    }
    sync();
    let seconds = t0.elapsed().as_secs_f64();
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
    })
}
