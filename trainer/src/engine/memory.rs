//! The one memory model of a training step: bytes by part (state, weight cache, what each block
//! keeps, transients) for the block path, and the reference autograd path's activations beside
//! them; and the one share of a GPU's memory a step may fill, whether the figure is this estimate
//! (the engine's plan, the out-of-memory hint) or a probe's measured peak (`auto` micro-batch).

use tch::{Device, Kind};

use super::options::{EngineOptions, Recompute, Toggle};
use crate::model::GptConfig;

/// Share of the GPU's memory a step may fill: the rest is headroom for the CUDA context,
/// fragmentation, evaluation and the occasional longer-lived temporary.
pub const HEADROOM: f64 = 0.90;

/// Bytes the block path needs on the GPU, by part (estimates from tensor sizes; see
/// docs/performance.md for how they compare with measured peaks).
#[derive(Clone, Copy, Debug)]
pub struct MemoryEstimate {
    /// fp32 parameters, gradients and optimizer state.
    pub fixed: f64,
    /// The bf16 copy of the matrices.
    pub weight_cache: f64,
    /// Activations one block keeps for its backward, without and with recomputation.
    pub block_saved: f64,
    pub block_recompute: f64,
    /// What keeping relu(h)² adds to `block_saved`.
    pub block_activation: f64,
    /// One block's backward workspace, logits, Muon's chunk and allocator slack.
    pub transient: f64,
    /// The reference autograd path instead: values one block keeps per micro-batch (about 36 of
    /// the width per token, the 4×-wide MLP hidden included), in elements of the compute kind.
    pub reference_block_values: f64,
    /// Its fp32 logits, their softcapped copy and their gradient.
    pub reference_logits: f64,
}

impl MemoryEstimate {
    pub fn new(config: &GptConfig, micro_batch: i64, seq_len: i64) -> Self {
        let n = (micro_batch * seq_len) as f64;
        let (c, a) = (
            config.width() as f64,
            (config.heads() * config.head_dim()) as f64,
        );
        let matrices = (config.depth * config.block_params()) as f64;
        let embeddings = 2.0 * config.embedding_params() as f64;
        Self {
            fixed: 12.0 * matrices + 16.0 * embeddings,
            weight_cache: 2.0 * matrices,
            // xn, qkv, attention output, xn2 and the 4C-wide hidden, bf16.
            block_saved: 2.0 * n * (6.0 * c + 4.0 * a),
            block_recompute: 2.0 * n * c,
            block_activation: 2.0 * n * 4.0 * c,
            transient: 2.0 * n * (18.0 * c + 11.0 * a) + 2.5 * (1u64 << 30) as f64,
            reference_block_values: n * 36.0 * c,
            reference_logits: n * 4.0 * 3.0 * config.vocab_size as f64,
        }
    }

    /// The estimate for one of `ranks` ranks with Muon sharded: each matrix keeps its fp32
    /// weight and gradient buffer whole (4 + 4 bytes; the reduce-scatter averages in place) and
    /// 1/ranks of its momentum.
    pub fn sharded(mut self, config: &GptConfig, ranks: usize) -> Self {
        if ranks > 1 {
            let matrices = (config.depth * config.block_params()) as f64;
            self.fixed -= matrices * 4.0 * (1.0 - 1.0 / ranks as f64);
        }
        self
    }

    /// One line per part, in GiB, for the log and docs/performance.md's table.
    pub fn describe(&self, depth: i64, recompute: i64, cache: bool) -> String {
        let gib = |b: f64| b / (1u64 << 30) as f64;
        let r = recompute.clamp(0, depth) as f64;
        format!(
            "state {:.1} GiB + weight cache {:.1} + activations {:.1} + transients {:.1} = {:.1} GiB",
            gib(self.fixed),
            gib(if cache { self.weight_cache } else { 0.0 }),
            gib((depth as f64 - r) * self.block_saved + r * self.block_recompute),
            gib(self.transient),
            gib(self.total(depth, recompute, cache))
        )
    }

    /// The reference path's step with activations in `kind` (no cache, no recomputation).
    pub fn reference_total(&self, depth: i64, kind: Kind) -> f64 {
        let elt = kind.elt_size_in_bytes() as f64;
        self.fixed + depth as f64 * self.reference_block_values * elt + self.reference_logits
    }

    pub fn total(&self, depth: i64, recompute: i64, cache: bool) -> f64 {
        let r = recompute.clamp(0, depth) as f64;
        self.fixed
            + if cache { self.weight_cache } else { 0.0 }
            + (depth as f64 - r) * self.block_saved
            + r * self.block_recompute
            + self.transient
    }
}

/// Whether blocks can also keep relu(h)² within `total_bytes` (only without recomputation).
pub fn plan_keep_activations(
    config: &GptConfig,
    micro_batch: i64,
    seq_len: i64,
    total_bytes: f64,
    cache: bool,
    ranks: usize,
) -> bool {
    let est = MemoryEstimate::new(config, micro_batch, seq_len).sharded(config, ranks);
    est.total(config.depth, 0, cache) + config.depth as f64 * est.block_activation
        <= HEADROOM * total_bytes
}

/// Decides the weight cache and recomputation for `total_bytes` of GPU memory: the cache first
/// while everything fits (it saves a little time), then as few recomputed blocks as fit.
pub fn plan_memory(
    config: &GptConfig,
    micro_batch: i64,
    seq_len: i64,
    total_bytes: f64,
    options: &EngineOptions,
    ranks: usize,
) -> (bool, i64) {
    let est = MemoryEstimate::new(config, micro_batch, seq_len).sharded(config, ranks);
    let budget = HEADROOM * total_bytes;
    let depth = config.depth;
    let fits = |r: i64, cache: bool| est.total(depth, r, cache) <= budget;
    let least = |cache: bool| (0..=depth).find(|&r| fits(r, cache));
    match (options.weight_cache, options.recompute) {
        (Toggle::On, Recompute::Auto) => (true, least(true).unwrap_or(depth)),
        (Toggle::Off, Recompute::Auto) => (false, least(false).unwrap_or(depth)),
        (Toggle::Auto, Recompute::Auto) => match least(true) {
            Some(0) => (true, 0),
            _ => (false, least(false).unwrap_or(depth)),
        },
        (cache, Recompute::Blocks(r)) => {
            let r = r.min(depth);
            (
                cache == Toggle::On || (cache == Toggle::Auto && fits(r, true)),
                r,
            )
        }
    }
}

/// What `--device-batch-size auto` is expected to choose on a GPU, by this model instead of a
/// probe (the table `plan` prints for GPUs it does not have).
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct AutoChoice {
    pub micro_batch: i64,
    /// Blocks that recompute their activations in backward (0: none).
    pub recompute_blocks: i64,
    pub weight_cache: bool,
    pub keep_activations: bool,
    /// The step's estimated peak.
    pub peak_bytes: f64,
}

/// The choice `auto` makes on one GPU of `total_bytes` (one rank, Muon whole), as
/// `autobatch::choose` makes it with probes: the largest of `candidates` (largest first) whose
/// step fits without recomputation, else the largest that fits when every block recomputes; then
/// what [`plan_memory`] and [`plan_keep_activations`] decide at that size. `None`: nothing fits,
/// not even one sequence with every block recomputed.
pub fn expected_auto(
    config: &GptConfig,
    candidates: &[i64],
    total_bytes: f64,
) -> Option<AutoChoice> {
    let (depth, t) = (config.depth, config.seq_len);
    let budget = HEADROOM * total_bytes;
    let fits = |b: i64, r: i64| MemoryEstimate::new(config, b, t).total(depth, r, false) <= budget;
    let b = candidates
        .iter()
        .copied()
        .find(|&b| fits(b, 0))
        .or_else(|| candidates.iter().copied().find(|&b| fits(b, depth)))?;
    let auto = EngineOptions::default();
    let (cache, r) = plan_memory(config, b, t, total_bytes, &auto, 1);
    let est = MemoryEstimate::new(config, b, t);
    let keep = r == 0 && plan_keep_activations(config, b, t, total_bytes, cache, 1);
    let kept = if keep {
        depth as f64 * est.block_activation
    } else {
        0.0
    };
    Some(AutoChoice {
        micro_batch: b,
        recompute_blocks: r,
        weight_cache: cache,
        keep_activations: keep,
        peak_bytes: est.total(depth, r, cache) + kept,
    })
}

/// A rough upper estimate of the bytes one training step of the reference path needs at
/// micro-batch `b` with activations in `kind`: what the CPU's `auto` is held to.
pub fn estimate_bytes(config: &GptConfig, b: i64, kind: Kind) -> u64 {
    MemoryEstimate::new(config, b, config.seq_len).reference_total(config.depth, kind) as u64
}

/// The memory limit the CPU estimate is held to, in bytes: `CHARLM_MEMORY_LIMIT_GIB`, or half
/// the machine's memory.
pub fn cpu_limit_bytes() -> u64 {
    if let Some(gib) = std::env::var("CHARLM_MEMORY_LIMIT_GIB")
        .ok()
        .and_then(|v| v.parse::<f64>().ok())
    {
        return (gib * (1u64 << 30) as f64) as u64;
    }
    let total_kib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .map(str::to_owned)
        })
        .and_then(|l| {
            l.split_whitespace()
                .nth(1)
                .and_then(|v| v.parse::<u64>().ok())
        })
        .unwrap_or(8 << 20);
    total_kib * 1024 / 2
}

/// Refuses a fixed micro-batch `b` that cannot fit before anything is allocated (a model of depth
/// 128 on a laptop would otherwise take all its memory until the kernel kills it): on a CPU the
/// step's estimate against the CPU limit, on a GPU the parameters and optimizer state alone
/// against its memory (a step that then runs out is explained where it happens).
pub fn check_fits(config: &GptConfig, b: i64, device: Device) -> anyhow::Result<()> {
    let gib = |bytes: f64| bytes / (1u64 << 30) as f64;
    let (need, limit, what) = match crate::sys::cuda::total_memory(device) {
        None => (
            estimate_bytes(config, b, Kind::Float) as f64,
            cpu_limit_bytes() as f64,
            "the CPU limit (CHARLM_MEMORY_LIMIT_GIB, or half the RAM)",
        ),
        Some(total) => (
            MemoryEstimate::new(config, b, config.seq_len).fixed,
            HEADROOM * total as f64,
            "the GPU's memory",
        ),
    };
    if need > limit {
        crate::user_bail!(
            "depth {} with a micro-batch of {b} sequences of {} tokens needs about {:.1} GiB, above \
             {what} of {:.1} GiB: use a smaller --depth, --device-batch-size or --seq-len",
            config.depth,
            config.seq_len,
            gib(need),
            gib(limit)
        );
    }
    Ok(())
}

/// The bytes a step may use on `device`: [`HEADROOM`] of a GPU, or the CPU limit.
pub fn limit_bytes(device: Device) -> u64 {
    crate::sys::cuda::total_memory(device)
        .map_or_else(cpu_limit_bytes, |m| (m as f64 * HEADROOM) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The per-rank table of docs/performance.md: `cargo test --release -p charlm-trainer --lib
    /// per_rank_memory -- --nocapture` prints it.
    #[test]
    fn per_rank_memory_model_shards_only_muons_momentum() {
        for (depth, micro) in [(24, 8), (48, 4)] {
            let config = GptConfig::new(depth, 2048);
            let whole = MemoryEstimate::new(&config, micro, 2048);
            let matrices = (depth * config.block_params()) as f64;
            for ranks in [1, 2, 8] {
                let est = MemoryEstimate::new(&config, micro, 2048).sharded(&config, ranks);
                println!(
                    "depth {depth}, micro-batch {micro}, {ranks} rank(s): {}",
                    est.describe(depth, 0, true)
                );
                // Weights and the gradient buffer stay whole; momentum is split.
                let saved = whole.fixed - est.fixed;
                let want = matrices * 4.0 * (1.0 - 1.0 / ranks as f64);
                assert!(
                    (saved - want).abs() < 1.0,
                    "{depth} on {ranks}: {saved} vs {want}"
                );
                assert_eq!(est.block_saved, whole.block_saved);
            }
        }
    }

    #[test]
    fn the_estimate_grows_with_batch_and_depth() {
        let d24 = GptConfig::new(24, 2048);
        let a = estimate_bytes(&d24, 8, Kind::BFloat16);
        assert!(a < estimate_bytes(&d24, 16, Kind::BFloat16));
        assert!(a < estimate_bytes(&GptConfig::new(32, 2048), 8, Kind::BFloat16));
        // In the range seen on an H100 (29.9 GiB measured at d24, micro-batch 8).
        let gib = a as f64 / (1u64 << 30) as f64;
        assert!((15.0..60.0).contains(&gib), "{gib}");
    }
}
