//! The GPT's shape, derived from the depth alone: widths, heads, parameter counts and FLOPs.

pub(super) const HEAD_DIM: i64 = 128;
/// Rotary base of nanochat (November 2025); the 2026 recipe uses 100 000.
pub const ROPE_BASE: u32 = 10_000;

fn default_rope_base() -> u32 {
    ROPE_BASE
}

/// The architecture, derived from the depth alone (nanochat's "aspect ratio 64").
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct GptConfig {
    pub depth: i64,
    pub vocab_size: i64,
    /// Longest sequence the rotary table covers during training.
    pub seq_len: i64,
    /// Base of the rotary angles (checkpoints from before it was recorded used 10 000).
    #[serde(default = "default_rope_base")]
    pub rope_base: u32,
    /// nanochat 2026's learned per-layer scalars: before block i the residual stream becomes
    /// `resid[i]·x + x0[i]·x0`, with x0 the normed embedding.
    #[serde(default)]
    pub scalars: bool,
}

impl GptConfig {
    pub fn new(depth: i64, seq_len: i64) -> Self {
        Self {
            depth,
            vocab_size: crate::data::vocab::VOCAB_SIZE as i64,
            seq_len,
            rope_base: ROPE_BASE,
            scalars: false,
        }
    }

    /// The same architecture with (or without) the per-layer scalars.
    pub fn with_scalars(self, scalars: bool) -> Self {
        Self { scalars, ..self }
    }

    /// The same architecture with another rotary base.
    pub fn with_rope_base(self, rope_base: u32) -> Self {
        Self { rope_base, ..self }
    }

    pub fn width(&self) -> i64 {
        64 * self.depth
    }

    /// ceil(width / 128): every head is 128 wide, so an odd depth gets a slightly wider attention.
    pub fn heads(&self) -> i64 {
        (self.width() + HEAD_DIM - 1) / HEAD_DIM
    }

    pub fn head_dim(&self) -> i64 {
        HEAD_DIM
    }

    pub(super) fn attn_dim(&self) -> i64 {
        self.heads() * HEAD_DIM
    }

    /// Parameters of one block: q, k, v, the attention output and the two MLP matrices.
    pub fn block_params(&self) -> i64 {
        let (w, a) = (self.width(), self.attn_dim());
        4 * w * a + 8 * w * w
    }

    pub fn embedding_params(&self) -> i64 {
        self.vocab_size * self.width()
    }

    pub fn total_params(&self) -> i64 {
        2 * self.embedding_params() + self.depth * self.block_params()
    }

    /// nanochat's estimate: 6 FLOPs per matmul parameter (forward + backward) plus attention's
    /// 12·layers·heads·head_dim·seq_len; the embedding lookup is free.
    pub fn flops_per_token(&self) -> f64 {
        let matmul = (self.total_params() - self.embedding_params()) as f64;
        6.0 * matmul + 12.0 * (self.depth * self.heads() * HEAD_DIM * self.seq_len) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_follow_depth() {
        let c = GptConfig::new(24, 2048);
        assert_eq!((c.width(), c.heads()), (1536, 12));
        assert_eq!(c.block_params(), 12 * 1536 * 1536);
        // Width 64 still gets one full 128-wide head.
        assert_eq!(GptConfig::new(1, 64).heads(), 1);
        assert_eq!(GptConfig::new(3, 64).heads(), 2);
    }
}
