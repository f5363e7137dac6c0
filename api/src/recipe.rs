//! The trainer's choices a spec names and the status repeats: the optimizer recipe and the
//! matrix products' precision (a file of their own, so spec and status both import them).

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A training recipe of the trainer (`--recipe`).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum Recipe {
    /// nanochat's November 2025 optimizer settings.
    #[serde(rename = "nanochat-2025")]
    Nanochat2025,
    /// nanochat's July 2026 optimizer settings (warm-up, long warm-down, cautious weight decay).
    #[serde(rename = "nanochat-2026")]
    Nanochat2026,
}

impl Recipe {
    /// The trainer's name for it (`CHARLM_RECIPE`).
    pub fn name(self) -> &'static str {
        match self {
            Recipe::Nanochat2025 => "nanochat-2025",
            Recipe::Nanochat2026 => "nanochat-2026",
        }
    }
}

/// The precision of the trainer's matrix products (`--precision`).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum Precision {
    /// bf16 products with fp32 accumulation.
    #[serde(rename = "bf16")]
    Bf16,
    /// FP8 products for the blocks' four matrices (e4m3 forward, e5m2 gradients).
    #[serde(rename = "fp8")]
    Fp8,
}

impl Precision {
    /// The trainer's name for it (`CHARLM_PRECISION`).
    pub fn name(self) -> &'static str {
        match self {
            Precision::Bf16 => "bf16",
            Precision::Fp8 => "fp8",
        }
    }
}
