//! Training recipes: the optimizer settings and schedules of nanochat as of November 2025 (what
//! charlm trained with first) and the vocabulary-independent optimizer half of its July 2026
//! recipe (github.com/karpathy/nanochat at 92d63d4, scripts/base_train.py and nanochat/optim.py),
//! reimplemented here. `--recipe` picks one; flags that are given win over its values; checkpoints
//! record it. The 2026 model changes (per-layer residual and x0 scalars, smear, backout, QK
//! scale) are not in it yet: only its rotary base is (docs/training.md, "Recipes").

use serde::{Deserialize, Serialize};

use crate::engine::optim::Orthogonalizer;
use crate::engine::LearningRates;
use crate::model::GptConfig;

/// nanochat's reference batch (d12's optimum): the 2026 recipe scales its learning rates by
/// √(batch / this) and its weight decay with them.
const REFERENCE_BATCH: f64 = 524_288.0;

#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Recipe {
    /// nanochat, November 2025: linear warm-down to 0 over the last 20%, momentum 0.85 → 0.95,
    /// gradient clip 1, no weight decay, the quintic Newton–Schulz, rotary base 10 000.
    #[value(name = "nanochat-2025")]
    #[serde(rename = "nanochat-2025")]
    Nanochat2025,
    /// nanochat, July 2026 (optimizer half): 40 warm-up steps, warm-down over the last 65% to
    /// 5%, momentum 0.85 → 0.97 → 0.90, no clip, cautious weight decay with a cosine schedule,
    /// Polar Express, learning rates scaled by √(batch/2¹⁹), rotary base 100 000, per-layer
    /// scalars. The default: the data-constrained benchmark measured it best (docs/training.md).
    #[default]
    #[value(name = "nanochat-2026")]
    #[serde(rename = "nanochat-2026")]
    Nanochat2026,
}

impl Recipe {
    /// What a checkpoint that records no recipe was trained with.
    pub fn before_recipes() -> Self {
        Self::Nanochat2025
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Nanochat2025 => "nanochat-2025",
            Self::Nanochat2026 => "nanochat-2026",
        }
    }
}

/// What a recipe resolves to for one model and batch, after the flags' overrides.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Schedule {
    pub recipe: Recipe,
    pub lrs: LearningRates,
    /// Steps of linear learning-rate warm-up from 1/N to 1.
    pub warmup_steps: i64,
    /// Share of the budget over which the learning rate falls linearly to `final_lr_frac`.
    pub warmdown_ratio: f64,
    pub final_lr_frac: f64,
    /// Global gradient-norm clip (0: off).
    pub grad_clip: f64,
    /// Muon's cautious weight decay λ at the start; it follows a cosine to 0 over the budget
    /// when `cosine_decay`, else stays constant.
    pub weight_decay: f64,
    pub cosine_decay: bool,
    pub orthogonalizer: Orthogonalizer,
    pub rope_base: u32,
    /// The model's learned per-layer residual and x0 scalars.
    pub scalars: bool,
}

/// The flags that override a recipe's values (None: the recipe's).
#[derive(Clone, Copy, Debug, Default)]
pub struct Overrides {
    pub matrix_lr: Option<f64>,
    pub embedding_lr: Option<f64>,
    pub unembedding_lr: Option<f64>,
    pub warmdown_ratio: Option<f64>,
    pub grad_clip: Option<f64>,
    pub weight_decay: Option<f64>,
    /// Multiplies the recipe's weight decay (not an explicit `weight_decay`); None: 1.
    pub weight_decay_scale: Option<f64>,
}

/// The default `--weight-decay-scale`: three times nanochat 2026's λ gave the lowest best val bpc
/// at both scaled presets of the data-constrained benchmark (docs/performance.md).
pub const DEFAULT_WEIGHT_DECAY_SCALE: f64 = 3.0;

impl Schedule {
    /// The recipe's schedule for `config` trained with `total_batch` tokens per step.
    pub fn new(recipe: Recipe, config: &GptConfig, total_batch: i64, o: &Overrides) -> Self {
        let base = match recipe {
            Recipe::Nanochat2025 => Self {
                recipe,
                lrs: LearningRates::default(),
                warmup_steps: 0,
                warmdown_ratio: 0.2,
                final_lr_frac: 0.0,
                grad_clip: 1.0,
                weight_decay: 0.0,
                cosine_decay: true,
                orthogonalizer: Orthogonalizer::Quintic,
                rope_base: 10_000,
                scalars: false,
            },
            Recipe::Nanochat2026 => {
                // η ∝ √(B/B_ref); λ keeps B/(η·λ·D) constant (arXiv 2405.13698), with the
                // training horizon D ∝ the scaling parameters (matrices + lm_head) as nanochat.
                let lr_scale = (total_batch as f64 / REFERENCE_BATCH).sqrt();
                let d12 = scaling_params(&GptConfig::new(12, config.seq_len));
                let wd = 0.28 * lr_scale * d12 / scaling_params(config);
                Self {
                    recipe,
                    lrs: LearningRates {
                        matrix: 0.02 * lr_scale,
                        embedding: 0.3 * lr_scale,
                        unembedding: 0.008 * lr_scale,
                        scalar: 0.5 * lr_scale,
                    },
                    warmup_steps: 40,
                    warmdown_ratio: 0.65,
                    final_lr_frac: 0.05,
                    grad_clip: 0.0,
                    weight_decay: wd,
                    cosine_decay: true,
                    orthogonalizer: Orthogonalizer::PolarExpress,
                    rope_base: 100_000,
                    scalars: true,
                }
            }
        };
        Self {
            lrs: LearningRates {
                matrix: o.matrix_lr.unwrap_or(base.lrs.matrix),
                embedding: o.embedding_lr.unwrap_or(base.lrs.embedding),
                unembedding: o.unembedding_lr.unwrap_or(base.lrs.unembedding),
                scalar: base.lrs.scalar,
            },
            warmdown_ratio: o.warmdown_ratio.unwrap_or(base.warmdown_ratio),
            grad_clip: o.grad_clip.unwrap_or(base.grad_clip),
            weight_decay: o
                .weight_decay
                .unwrap_or(base.weight_decay * o.weight_decay_scale.unwrap_or(1.0)),
            ..base
        }
    }

    /// Learning-rate multiplier at `step`, `progress` (0..1) into the budget.
    pub fn lr_multiplier(&self, step: i64, progress: f64) -> f64 {
        let warm = if self.warmup_steps > 0 && step < self.warmup_steps {
            (step + 1) as f64 / self.warmup_steps as f64
        } else {
            1.0
        };
        let w = self.warmdown_ratio;
        let down = if w <= 0.0 || progress < 1.0 - w {
            1.0
        } else {
            let left = ((1.0 - progress) / w).clamp(0.0, 1.0);
            left + (1.0 - left) * self.final_lr_frac
        };
        warm.min(down)
    }

    /// Muon's momentum at `step`, `progress` into the budget.
    pub fn muon_momentum(&self, step: i64, progress: f64) -> f64 {
        match self.recipe {
            Recipe::Nanochat2025 => crate::engine::optim::muon_momentum(step),
            Recipe::Nanochat2026 => {
                let start = 1.0 - self.warmdown_ratio;
                if self.warmdown_ratio > 0.0 && progress >= start {
                    let f = ((progress - start) / self.warmdown_ratio).min(1.0);
                    0.97 * (1.0 - f) + 0.90 * f
                } else {
                    let f = (step as f64 / 400.0).min(1.0);
                    0.85 * (1.0 - f) + 0.97 * f
                }
            }
        }
    }

    /// Muon's weight decay λ at `progress` into the budget.
    pub fn weight_decay(&self, progress: f64) -> f64 {
        if self.cosine_decay {
            self.weight_decay * 0.5 * (1.0 + (std::f64::consts::PI * progress.min(1.0)).cos())
        } else {
            self.weight_decay
        }
    }
}

/// nanochat's "scaling parameters": the blocks' matrices and lm_head.
fn scaling_params(config: &GptConfig) -> f64 {
    (config.depth * config.block_params() + config.embedding_params()) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schedule(recipe: Recipe, o: Overrides) -> Schedule {
        Schedule::new(recipe, &GptConfig::new(12, 2048), 524_288, &o)
    }

    #[test]
    fn the_2025_recipe_is_what_charlm_trained_with_before() {
        let s = schedule(Recipe::Nanochat2025, Overrides::default());
        assert_eq!(s.lrs.matrix, 0.02);
        assert_eq!(
            (s.grad_clip, s.weight_decay, s.rope_base),
            (1.0, 0.0, 10_000)
        );
        assert_eq!(s.lr_multiplier(0, 0.0), 1.0);
        assert_eq!(s.lr_multiplier(500, 0.5), 1.0);
        assert!((s.lr_multiplier(900, 0.9) - 0.5).abs() < 1e-12);
        assert_eq!(s.lr_multiplier(1000, 1.0), 0.0);
        assert!((s.muon_momentum(150, 0.95) - 0.90).abs() < 1e-12);
        assert!((s.muon_momentum(1000, 0.1) - 0.95).abs() < 1e-12);
    }

    #[test]
    fn the_2026_recipe_warms_up_decays_to_five_percent_and_turns_momentum_down() {
        let s = schedule(Recipe::Nanochat2026, Overrides::default());
        // d12 at the reference batch: nanochat's values unscaled.
        assert!((s.lrs.embedding - 0.3).abs() < 1e-12);
        assert!((s.weight_decay - 0.28).abs() < 1e-12);
        assert_eq!(
            (s.grad_clip, s.rope_base, s.warmup_steps),
            (0.0, 100_000, 40)
        );
        assert!((s.lr_multiplier(0, 0.0) - 1.0 / 40.0).abs() < 1e-12);
        assert_eq!(s.lr_multiplier(39, 0.01), 1.0);
        assert_eq!(s.lr_multiplier(500, 0.35), 1.0);
        assert!((s.lr_multiplier(5000, 1.0) - 0.05).abs() < 1e-12);
        assert!((s.lr_multiplier(5000, 0.675) - 0.525).abs() < 1e-12);
        assert!((s.muon_momentum(200, 0.1) - 0.91).abs() < 1e-12);
        assert!((s.muon_momentum(5000, 0.3) - 0.97).abs() < 1e-12);
        assert!((s.muon_momentum(5000, 1.0) - 0.90).abs() < 1e-12);
        assert!((s.weight_decay(0.5) - 0.14).abs() < 1e-12);
        assert!(s.weight_decay(1.0).abs() < 1e-12);
    }

    #[test]
    fn the_2026_recipe_scales_with_batch_and_model_and_flags_win() {
        let small = Schedule::new(
            Recipe::Nanochat2026,
            &GptConfig::new(6, 2048),
            131_072,
            &Overrides::default(),
        );
        assert!((small.lrs.matrix - 0.01).abs() < 1e-12);
        // Half the learning rate, ~8× fewer scaling parameters than d12.
        let ratio =
            scaling_params(&GptConfig::new(12, 2048)) / scaling_params(&GptConfig::new(6, 2048));
        assert!((small.weight_decay - 0.28 * 0.5 * ratio).abs() < 1e-12);
        let o = Overrides {
            weight_decay: Some(0.0),
            grad_clip: Some(0.5),
            ..Default::default()
        };
        let s = schedule(Recipe::Nanochat2026, o);
        assert_eq!((s.weight_decay, s.grad_clip), (0.0, 0.5));
        let scaled = Overrides {
            weight_decay_scale: Some(3.0),
            ..Default::default()
        };
        let s = schedule(Recipe::Nanochat2026, scaled);
        assert!((s.weight_decay - 0.84).abs() < 1e-12);
        assert_eq!(Recipe::default(), Recipe::Nanochat2026);
    }
}
