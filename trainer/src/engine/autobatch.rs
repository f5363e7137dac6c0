//! Choosing the micro-batch. `--device-batch-size auto` takes the largest power of two whose
//! training step fits in memory with headroom, and gradient accumulation makes up the rest of the
//! total batch, so the optimisation itself does not change with the GPU.
//!
//! On a GPU the check is a real probe: one forward, backward and optimizer step (learning rate 0)
//! at a candidate size, on a throwaway copy of the model with the run's engine options, reading
//! the caching allocator's peak; an out-of-memory error just means "too big". On a CPU (and to
//! test this logic without a GPU) the check is an analytic estimate against a memory limit: the
//! `CHARLM_MEMORY_LIMIT_GIB` variable, or half the machine's memory.

use std::fmt;
use std::str::FromStr;

use anyhow::Result;
use tch::{Device, Kind, Tensor};

use super::memory::{cpu_limit_bytes, estimate_bytes, HEADROOM};
use super::{oom, Engine, EngineOptions, LearningRates, Recompute};
use crate::dist::{DistEnv, ProcessGroup};
use crate::model::GptConfig;

/// The largest micro-batch tried.
const MAX_CANDIDATE: i64 = 256;

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum MicroBatch {
    Auto,
    Fixed(i64),
}

impl FromStr for MicroBatch {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            n => match n.parse::<i64>() {
                Ok(v) if v >= 1 => Ok(Self::Fixed(v)),
                _ => Err(format!(
                    "{n:?} is neither `auto` nor a positive number of sequences"
                )),
            },
        }
    }
}

impl fmt::Display for MicroBatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Auto => f.write_str("auto"),
            Self::Fixed(n) => write!(f, "{n}"),
        }
    }
}

/// Powers of two to try, largest first. With a total batch fixed, a candidate must divide the
/// sequences one rank processes per step, so that accumulation is a whole number of micro-batches.
pub fn candidates(per_rank_sequences: Option<i64>) -> Vec<i64> {
    let cap = per_rank_sequences
        .unwrap_or(MAX_CANDIDATE)
        .min(MAX_CANDIDATE);
    let mut out: Vec<i64> = (0..=8)
        .map(|p| 1i64 << p)
        .filter(|&b| b <= cap && per_rank_sequences.is_none_or(|n| n % b == 0))
        .collect();
    out.reverse();
    out
}

/// The largest of `candidates` (sorted largest first) that fits. Memory only grows with the
/// micro-batch, so "fits" is monotone and a binary search asks `fits` about log2(n) candidates
/// instead of each in turn: a GPU probe at depth 48 builds a 5 B-parameter model every time.
pub fn largest_fitting(
    candidates: &[i64],
    mut fits: impl FnMut(i64) -> Result<bool>,
) -> Result<Option<i64>> {
    // candidates[..lo] are known not to fit; candidates[hi..] are known to fit (or hi = len).
    let (mut lo, mut hi) = (0, candidates.len());
    while lo < hi {
        let mid = (lo + hi) / 2;
        if fits(candidates[mid])? {
            hi = mid;
        } else {
            lo = mid + 1;
        }
    }
    Ok(candidates.get(lo).copied())
}

/// The largest candidate whose training step fits on `device` with the run's engine `options`.
/// Recomputing activations buys memory with time, so on a GPU it is only a second resort: first
/// the largest micro-batch that fits without it; only when none does (depth 48 on one H100, say),
/// the largest that fits when every block recomputes — the engine's planner then recomputes as few
/// blocks as fit at that size.
pub fn choose(
    config: &GptConfig,
    candidates: &[i64],
    device: Device,
    options: &EngineOptions,
) -> Result<Option<i64>> {
    if !device.is_cuda() {
        let limit = cpu_limit_bytes();
        let Some(fits) = largest_fitting(candidates, |b| {
            Ok(estimate_bytes(config, b, Kind::Float) <= limit)
        })?
        else {
            return Ok(None);
        };
        return Ok(Some(quick_on_cpu(
            config,
            candidates,
            fits,
            tch::get_num_threads(),
        )));
    }
    if options.recompute != Recompute::Auto {
        return largest_fitting(candidates, |b| probe_gpu(config, b, device, options));
    }
    let without = EngineOptions {
        recompute: Recompute::Blocks(0),
        ..*options
    };
    if let Some(b) = largest_fitting(candidates, |b| probe_gpu(config, b, device, &without))? {
        return Ok(Some(b));
    }
    let every_block = EngineOptions {
        recompute: Recompute::Blocks(i64::MAX),
        ..*options
    };
    largest_fitting(candidates, |b| probe_gpu(config, b, device, &every_block))
}

/// Training FLOPs (forward and backward, [`GptConfig::flops_per_token`]) one CPU thread computes
/// per second: `bench` at depth 2 (the least efficient of the depths measured, so larger ones
/// come out shorter, not longer) on the 2-core development machine (docs/performance.md, "CPU").
pub const CPU_FLOPS_PER_THREAD: f64 = 25e9;

/// How long one micro-batch may take on a CPU: long enough that the step's fixed costs are
/// small beside it, short enough that a step line comes every few seconds.
pub const CPU_MICRO_BATCH_SECONDS: f64 = 1.0;

/// On a CPU memory rarely binds and the largest micro-batch that fits makes steps of minutes:
/// the largest candidate up to `fits` whose micro-batch takes about
/// [`CPU_MICRO_BATCH_SECONDS`] on `threads` threads, else the smallest candidate.
pub fn quick_on_cpu(config: &GptConfig, candidates: &[i64], fits: i64, threads: i32) -> i64 {
    let budget = CPU_FLOPS_PER_THREAD * threads.max(1) as f64 * CPU_MICRO_BATCH_SECONDS;
    let flops = |b: i64| b as f64 * config.seq_len as f64 * config.flops_per_token();
    candidates
        .iter()
        .copied()
        .find(|&b| b <= fits && flops(b) <= budget)
        .unwrap_or_else(|| candidates.last().copied().unwrap_or(1).min(fits))
}

/// Runs one step at micro-batch `b` on a fresh model; false when it runs out of memory or peaks
/// above [`HEADROOM`] of the GPU.
fn probe_gpu(config: &GptConfig, b: i64, device: Device, options: &EngineOptions) -> Result<bool> {
    let total = crate::sys::cuda::total_memory(device).unwrap_or(u64::MAX) as f64;
    let pg = ProcessGroup::init(
        &DistEnv::single(),
        device,
        std::time::Duration::from_secs(60),
    )?;
    // Out-of-memory surfaces as a panic from tch; while probing it is an answer, not a crash.
    let outcome = oom::catch(|| -> Result<f64> {
        let lr = LearningRates::default();
        let mut engine = Engine::with_options(*config, device, 0, lr, *options);
        crate::sys::cuda::reset_peak_memory(device);
        let t = config.seq_len;
        let all = Tensor::randint(
            crate::data::vocab::BOS as i64,
            [b, t + 1],
            (Kind::Int64, device),
        );
        let _ = engine.micro_step(&all.narrow(1, 0, t), &all.narrow(1, 1, t), 1.0);
        engine.optimizer_step(&pg, 0.0, 0.95, 1.0)?;
        if let Device::Cuda(i) = device {
            tch::Cuda::synchronize(i as i64);
        }
        Ok(crate::sys::cuda::peak_memory_gib(device).unwrap_or(0.0) * (1u64 << 30) as f64)
    });
    crate::sys::cuda::empty_cache(device);
    match outcome {
        Ok(peak) => Ok(peak? <= HEADROOM * total),
        Err(oom::OutOfMemory) => Ok(false),
    }
}

/// A micro-batch below `b` that the estimate says fits in `limit` bytes, for error messages.
pub fn smaller_that_fits(config: &GptConfig, b: i64, limit: u64, kind: Kind) -> Option<i64> {
    candidates(None)
        .into_iter()
        .filter(|&c| c < b)
        .find(|&c| estimate_bytes(config, c, kind) <= limit)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn candidates_divide_the_per_rank_batch() {
        assert_eq!(candidates(Some(24)), vec![8, 4, 2, 1]);
        assert_eq!(candidates(Some(64)), vec![64, 32, 16, 8, 4, 2, 1]);
        assert_eq!(candidates(None)[0], MAX_CANDIDATE);
    }

    #[test]
    fn the_largest_fitting_candidate_is_found_with_few_probes() {
        let all = candidates(None);
        for limit in [0, 1, 2, 4, 16, 128, 256] {
            let mut asked = Vec::new();
            let chosen = largest_fitting(&all, |b| {
                asked.push(b);
                Ok(b <= limit)
            })
            .unwrap();
            assert_eq!(chosen, (limit > 0).then_some(limit), "limit {limit}");
            assert!(asked.len() <= 4, "limit {limit}: asked {asked:?}");
        }
        assert_eq!(largest_fitting(&[], |_| Ok(true)).unwrap(), None);
    }

    #[test]
    fn a_cpu_micro_batch_stays_short_but_is_never_empty() {
        let all = candidates(None);
        // Depth 12 at 2048 tokens: about 0.2 TFLOP a sequence, so one sequence per micro-batch.
        assert_eq!(quick_on_cpu(&GptConfig::new(12, 2048), &all, 256, 2), 1);
        // Depth 1 at 32 tokens is tiny: memory (here 16) is the limit.
        assert_eq!(quick_on_cpu(&GptConfig::new(1, 32), &all, 16, 2), 16);
        let d2 = GptConfig::new(2, 256);
        let on2 = quick_on_cpu(&d2, &all, 256, 2);
        assert!((1..256).contains(&on2), "{on2}");
        assert!(quick_on_cpu(&d2, &all, 256, 8) >= on2);
    }

    #[test]
    fn parses_auto_and_sizes() {
        assert_eq!("auto".parse::<MicroBatch>(), Ok(MicroBatch::Auto));
        assert_eq!("16".parse::<MicroBatch>(), Ok(MicroBatch::Fixed(16)));
        assert!("0".parse::<MicroBatch>().is_err() && "big".parse::<MicroBatch>().is_err());
    }
}
