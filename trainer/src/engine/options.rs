//! The engine's speed and memory choices (flags of `train` and `bench`) and what `auto` resolved
//! them to for one micro-batch size.

use std::fmt;
use std::str::FromStr;

/// Which implementation trains the model.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kernels {
    /// Fused CUDA kernels where they can run (a Hopper GPU and a binary built with nvcc), else
    /// eager.
    Auto,
    /// The straightforward autograd model (`Gpt::forward`), as first written.
    Reference,
    /// The block path with eager ATen ops for each fused step (same math as the kernels).
    Eager,
    /// The block path with the CUDA kernels of csrc/kernels.cu.
    Fused,
}

/// How many blocks recompute their activations in the backward pass instead of keeping them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum Recompute {
    /// As few as fit the GPU's memory (none on CPU).
    Auto,
    /// The first N blocks (0 = none; values above the depth mean all).
    Blocks(i64),
}

impl FromStr for Recompute {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "off" | "none" => Ok(Self::Blocks(0)),
            "all" => Ok(Self::Blocks(i64::MAX)),
            n => n
                .parse::<i64>()
                .ok()
                .filter(|n| *n >= 0)
                .map(Self::Blocks)
                .ok_or_else(|| format!("`{s}` is not auto, off, all or a number of blocks")),
        }
    }
}

impl fmt::Display for Recompute {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Auto => write!(f, "auto"),
            Self::Blocks(i64::MAX) => write!(f, "all"),
            Self::Blocks(n) => write!(f, "{n}"),
        }
    }
}

/// The attention kernel of the block path on CUDA.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Attention {
    /// cuDNN's when a probe at the run's shape agrees with flash attention, else flash.
    Auto,
    /// FlashAttention-2 (what SDPA picks in the reference model).
    Flash,
    /// cuDNN's fused attention (faster on Hopper).
    Cudnn,
}

/// The number format of the blocks' matrix products.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// bf16 products with fp32 accumulation (fp32 on a CPU, which has no faster format).
    Bf16,
    /// FP8 products for the blocks' four matrices (q|k|v, attention output, MLP up and down):
    /// e4m3 inputs and weights forward, e5m2 gradients backward, one scale per tensor; needs a
    /// GPU with FP8 tensor cores (compute capability 8.9 or later: H100, H200, L4, …).
    Fp8,
}

impl Precision {
    pub fn name(self) -> &'static str {
        match self {
            Self::Bf16 => "bf16",
            Self::Fp8 => "fp8",
        }
    }
}

/// On, off, or decided by memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Toggle {
    Auto,
    On,
    Off,
}

/// The engine's speed and memory choices, as flags of `train` and `bench`.
#[derive(clap::Args, Clone, Copy, Debug, serde::Serialize)]
pub struct EngineOptions {
    /// auto | reference | eager | fused: the implementation of the training step.
    #[arg(long, value_enum, default_value = "auto")]
    pub kernels: Kernels,
    /// auto | off | all | N: blocks that recompute activations in backward (saves memory, costs
    /// about a third of those blocks' time). auto: the fewest that fit the GPU.
    #[arg(long, default_value = "auto")]
    pub recompute: Recompute,
    /// auto | on | off: keep a bf16 copy of the matrices, refreshed once per optimizer step,
    /// instead of casting the fp32 weights on every use. auto: on when it fits.
    #[arg(long, value_enum, default_value = "auto")]
    pub weight_cache: Toggle,
    /// auto | flash | cudnn: the block path's attention kernel on CUDA.
    #[arg(long, value_enum, default_value = "auto")]
    pub attention: Attention,
    /// auto | on | off: blocks keep relu(h)² for the backward (4·width bf16 values a token a
    /// block) instead of recomputing it there. auto: on when it fits without recomputation.
    #[arg(long, value_enum, default_value = "auto")]
    pub keep_activations: Toggle,
    /// auto | on | off: split Muon's momentum and Newton–Schulz work over the ranks
    /// (reduce-scatter of the gradients, each rank updates its share of the matrices, all-gather
    /// of the parameters). auto: on with more than one rank. on: also with one rank, where the
    /// collectives only copy (it runs the sharded path on a single GPU, to check it).
    #[arg(long, value_enum, default_value = "auto")]
    pub shard_optimizer: Toggle,
    /// bf16 | fp8: the precision of the blocks' matrix products (bf16 means fp32 on a CPU).
    /// fp8 runs q|k|v, the attention output and the MLP's two products in FP8 (e4m3 forward,
    /// e5m2 input gradients, tensorwise scales); the embedding, lm_head, attention, optimizer and
    /// fp32 master weights stay as in bf16, and so does evaluation. fp8 needs a GPU with FP8
    /// tensor cores (H100 or later); a CPU refuses it.
    #[arg(long, env = charlm_contract::env::PRECISION, value_enum, default_value = "bf16")]
    pub precision: Precision,
    /// bf16 | fp8: with --precision fp8, the precision of the weight gradients' products. bf16
    /// (the default) measured faster: FP8 ones need transposed copies of every operand
    /// (docs/performance.md).
    #[arg(
        long,
        env = "CHARLM_FP8_WEIGHT_GRADS",
        value_enum,
        default_value = "bf16"
    )]
    pub fp8_weight_grads: Precision,
}

impl EngineOptions {
    /// Whether Muon is sharded over `world_size` ranks.
    pub fn shards_optimizer(&self, world_size: usize) -> bool {
        match self.shard_optimizer {
            Toggle::On => true,
            Toggle::Off => false,
            Toggle::Auto => world_size > 1,
        }
    }
}

impl Default for EngineOptions {
    fn default() -> Self {
        Self {
            kernels: Kernels::Auto,
            recompute: Recompute::Auto,
            weight_cache: Toggle::Auto,
            attention: Attention::Auto,
            keep_activations: Toggle::Auto,
            shard_optimizer: Toggle::Auto,
            precision: Precision::Bf16,
            fp8_weight_grads: Precision::Bf16,
        }
    }
}

/// What `auto` resolved to for one micro-batch size.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Resolved {
    pub kernels: Kernels,
    pub recompute_blocks: i64,
    pub weight_cache: bool,
    /// Muon's Newton–Schulz chunk, in fp32 gradient bytes (0: whole groups).
    pub muon_chunk_bytes: i64,
    /// The attention kernel (flash on the CPU means plain math).
    pub attention: Attention,
    /// Blocks keep relu(h)² for their backward.
    pub keep_activations: bool,
    /// The precision asked for.
    pub precision: Precision,
    /// The model's matrix products (four per block and lm_head) and how many of them run in
    /// FP8: all the blocks' with --precision fp8 at widths of 128 or more, else none.
    pub products: i64,
    pub fp8_products: i64,
    /// With FP8 products: whether their weight gradients are FP8 too.
    pub fp8_weight_grads: bool,
}

impl Resolved {
    /// Which products ran in FP8, in words: "fp8 96 of 97 products (…)" or "bf16".
    pub fn describe_precision(&self) -> String {
        match (self.precision, self.fp8_products) {
            (Precision::Bf16, _) => "bf16".into(),
            (Precision::Fp8, 0) => format!(
                "fp8 asked, 0 of {} products in FP8 (width below {}: bf16)",
                self.products,
                super::fp8::MIN_WIDTH
            ),
            (Precision::Fp8, n) => format!(
                "fp8 {n} of {} products (the blocks' q|k|v, attention output, MLP up and down; \
                 lm_head bf16; weight gradients {})",
                self.products,
                if self.fp8_weight_grads { "fp8" } else { "bf16" }
            ),
        }
    }
}

impl std::fmt::Display for Resolved {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:?} kernels, {:?} attention, recompute {}, weight cache {}, keep act {}, {}",
            self.kernels,
            self.attention,
            self.recompute_blocks,
            self.weight_cache,
            self.keep_activations,
            self.describe_precision()
        )
    }
}
