//! `charlm-budget`, the budget planner (issue 18): for a dataset of U unique training tokens and a budget of
//! GPUs × hours, what each depth would do (tokens, epochs, cost), which depth is expected to reach
//! the lowest validation loss, and when its best model should arrive. Pure arithmetic, shared by
//! `charlm-trainer plan` and the operator's `status.plan`, so both say the same.
//!
//! Where its numbers come from:
//! - Throughput: model FLOPs per token (nanochat's 6·N + attention) over the H100/H200 MFU that
//!   `charlm-trainer bench` and `train` measured per depth (docs/performance.md), assuming GPUs
//!   scale linearly (NCCL data parallel; not measured beyond one GPU).
//! - Expected loss: the data-constrained scaling law of Muennighoff et al. 2023 ("Scaling
//!   Data-Constrained Language Models", arXiv 2305.16264): repeated tokens are worth less each
//!   epoch (R*_D = 15.4) and parameters beyond what the unique data supports are worth less
//!   (R*_N = 5.3), inside Chinchilla's L = E + A/N'^α + B/D'^β (Hoffmann et al. 2022). Those
//!   constants were fitted on subword text: the planner uses them to rank depths, not to predict
//!   a bits-per-character value.
//! - When the best arrives: the data-constrained benchmark (scripts/perf/data-constrained) found
//!   the best validation bpc after [`BEST_EPOCHS_MEASURED`] epochs at 1.9 and 15.5 parameters per
//!   character; early stop ends the run there.

use serde::{Deserialize, Serialize};

/// Depths the planner considers.
pub const DEPTHS: [i64; 10] = [4, 6, 8, 12, 16, 20, 24, 32, 40, 48];

/// Dense bf16 peak of an H100, the denominator of every MFU in docs/performance.md.
pub const PEAK_FLOPS: f64 = 989e12;

/// Epochs after which the benchmark's runs with the default recipe reached their best validation
/// bpc: 28.1 (budget-100 scaled, depth 6) and 16.8 (budget-1000 scaled, depth 8); the later one.
/// Beyond it a run only memorises (nanochat-2025 peaked at 9–13 epochs).
pub const BEST_EPOCHS_MEASURED: f64 = 28.0;

/// Above this many epochs a dataset is data-constrained: Muennighoff et al. find up to ~4 epochs
/// of repetition nearly as good as fresh data, and rapidly less after.
pub const DATA_CONSTRAINED_EPOCHS: f64 = 4.0;

const VOCAB: i64 = 32;
const HEAD_DIM: i64 = 128;
/// Chinchilla's fit (Hoffmann et al. 2022, approach 3).
const E: f64 = 1.69;
const A: f64 = 406.4;
const B: f64 = 410.7;
const ALPHA: f64 = 0.34;
const BETA: f64 = 0.28;
/// Muennighoff et al.'s decay constants for repeated data and excess parameters.
const R_STAR_D: f64 = 15.4;
const R_STAR_N: f64 = 5.3;
/// Relative loss difference below which two depths count as equally good.
const TIE: f64 = 0.002;
/// Chinchilla's compute-optimal tokens per parameter.
const TOKENS_PER_PARAM: f64 = 20.0;

/// Parameters of charlm's GPT at `depth` (width 64·depth, 128-wide heads, vocabulary 32, untied
/// embedding and lm_head): the trainer's `GptConfig::total_params`, which a trainer test checks.
pub fn params(depth: i64) -> i64 {
    let w = 64 * depth;
    let a = (w + HEAD_DIM - 1) / HEAD_DIM * HEAD_DIM;
    2 * VOCAB * w + depth * (4 * w * a + 8 * w * w)
}

/// nanochat's FLOPs per token at `depth` and sequence length `seq_len`.
pub fn flops_per_token(depth: i64, seq_len: i64) -> f64 {
    let w = 64 * depth;
    let heads = (w + HEAD_DIM - 1) / HEAD_DIM;
    6.0 * (params(depth) - VOCAB * w) as f64 + 12.0 * (depth * heads * HEAD_DIM * seq_len) as f64
}

/// Measured model FLOPs utilisation by depth (docs/performance.md, one H100/H200, seq 2048):
/// d6 ~47% (train, 3.9 M tok/s), d12 51.7% (train), d24 56–59% (bench), d32 58% (bench), d48 44.7%
/// (bench, recomputing). Linear in between, flat outside.
pub fn mfu(depth: i64) -> f64 {
    const POINTS: [(f64, f64); 5] = [
        (6.0, 0.47),
        (12.0, 0.517),
        (24.0, 0.57),
        (32.0, 0.58),
        (48.0, 0.447),
    ];
    let d = depth as f64;
    if d <= POINTS[0].0 {
        return POINTS[0].1;
    }
    for pair in POINTS.windows(2) {
        let ((d0, m0), (d1, m1)) = (pair[0], pair[1]);
        if d <= d1 {
            return m0 + (m1 - m0) * (d - d0) / (d1 - d0);
        }
    }
    POINTS[POINTS.len() - 1].1
}

/// Training tokens per second on one GPU at `depth`.
pub fn tokens_per_s(depth: i64, seq_len: i64) -> f64 {
    mfu(depth) * PEAK_FLOPS / flops_per_token(depth, seq_len)
}

/// The budget and data a plan is for.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Budget {
    pub gpus: u32,
    pub hours: f64,
    pub price_per_gpu_hour: f64,
    /// Unique training tokens (the prepared train split).
    pub unique_tokens: u64,
    pub seq_len: i64,
}

/// What one depth would do with the budget.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DepthPlan {
    pub depth: i64,
    pub params: i64,
    pub tokens_per_s: f64,
    /// Tokens the whole budget trains.
    pub tokens: f64,
    pub epochs: f64,
    pub params_per_token: f64,
    /// Muennighoff/Chinchilla loss in nats per subword token: only for ranking depths.
    pub expected_loss: f64,
    /// Hours to the epoch where the benchmark's best arrived (at most the budget).
    pub hours_to_best: f64,
}

/// The whole plan: every depth, the recommended one, and its cost.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    pub budget: Budget,
    pub depths: Vec<DepthPlan>,
    /// The depth with the lowest expected loss.
    pub recommended_depth: i64,
    /// Hours after which the recommended depth's best model is expected (early stop ends there).
    pub recommended_hours: f64,
    /// Dollars of the whole budget and of the recommended hours.
    pub budget_cost: f64,
    pub recommended_cost: f64,
}

/// Training tokens per second at a depth, for the whole budget's hardware.
pub type Throughput<'a> = &'a dyn Fn(i64) -> f64;

/// One depth's figures for `budget` on H100s.
pub fn depth_plan(depth: i64, budget: &Budget) -> DepthPlan {
    depth_plan_with(depth, budget, &|d| gpu_tokens_per_s(d, budget))
}

/// The budget's GPUs together at `depth`.
fn gpu_tokens_per_s(depth: i64, budget: &Budget) -> f64 {
    tokens_per_s(depth, budget.seq_len) * f64::from(budget.gpus)
}

/// One depth's figures for `budget` on hardware training `throughput` tokens per second (a CPU,
/// say).
pub fn depth_plan_with(depth: i64, budget: &Budget, throughput: Throughput) -> DepthPlan {
    let n = params(depth) as f64;
    let tps = throughput(depth);
    let tokens = tps * budget.hours * 3600.0;
    let u = budget.unique_tokens.max(1) as f64;
    let epochs = tokens / u;
    let hours_to_best = if tps > 0.0 {
        (BEST_EPOCHS_MEASURED * u / tps / 3600.0).min(budget.hours)
    } else {
        0.0
    };
    DepthPlan {
        depth,
        params: params(depth),
        tokens_per_s: tps,
        tokens,
        epochs,
        params_per_token: n / u,
        expected_loss: expected_loss(n, tokens, u),
        hours_to_best,
    }
}

/// Muennighoff et al.'s effective data and parameters inside Chinchilla's loss.
pub fn expected_loss(params: f64, tokens: f64, unique_tokens: f64) -> f64 {
    let u = unique_tokens.max(1.0);
    let repeats = (tokens / u - 1.0).max(0.0);
    let d_eff = u.min(tokens) + u * R_STAR_D * (1.0 - (-repeats / R_STAR_D).exp());
    let u_n = (u / TOKENS_PER_PARAM).min(params);
    let excess = (params / u_n - 1.0).max(0.0);
    let n_eff = u_n + u_n * R_STAR_N * (1.0 - (-excess / R_STAR_N).exp());
    E + A / n_eff.powf(ALPHA) + B / d_eff.max(1.0).powf(BETA)
}

/// Plans `budget` over [`DEPTHS`] on H100s.
pub fn plan(budget: &Budget) -> Plan {
    plan_with(budget, &|d| gpu_tokens_per_s(d, budget))
}

/// Plans `budget` over [`DEPTHS`] on hardware training `throughput` tokens per second.
pub fn plan_with(budget: &Budget, throughput: Throughput) -> Plan {
    let depths: Vec<DepthPlan> = DEPTHS
        .iter()
        .map(|&d| depth_plan_with(d, budget, throughput))
        .collect();
    // Past what the unique data supports, more parameters stop paying (the law saturates):
    // among the depths within TIE of the lowest loss, the smallest is as good and cheaper.
    let lowest = depths
        .iter()
        .map(|d| d.expected_loss)
        .fold(f64::INFINITY, f64::min);
    let best = depths
        .iter()
        .find(|d| d.expected_loss <= lowest * (1.0 + TIE))
        .expect("DEPTHS is not empty");
    let per_hour = f64::from(budget.gpus) * budget.price_per_gpu_hour;
    Plan {
        budget: *budget,
        recommended_depth: best.depth,
        recommended_hours: best.hours_to_best,
        budget_cost: budget.hours * per_hour,
        recommended_cost: best.hours_to_best * per_hour,
        depths,
    }
}

/// Whether the law tells the depths apart: false when every depth's expected loss is within
/// the tie margin of the lowest, as on a dataset so small that it, not the model, bounds the
/// loss at every depth (then any depth is expected to do as well, and the smallest is cheapest).
pub fn ranks_depths(plan: &Plan) -> bool {
    let (lo, hi) = plan
        .depths
        .iter()
        .map(|d| d.expected_loss)
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), l| {
            (lo.min(l), hi.max(l))
        });
    hi > lo * (1.0 + TIE)
}

/// The `DataConstrained` warning for training `depth` on `budget`, if its epochs exceed
/// [`DATA_CONSTRAINED_EPOCHS`]: what it means and what to do.
pub fn data_constrained_warning(depth: i64, budget: &Budget) -> Option<String> {
    let d = depth_plan(depth, budget);
    if d.epochs <= DATA_CONSTRAINED_EPOCHS {
        return None;
    }
    let p = plan(budget);
    Some(format!(
        "depth {depth} for {:.1} h on {} GPUs trains {:.1} epochs over {} unique tokens ({:.2} \
         parameters per token): repeated data is worth less each epoch (Muennighoff et al. 2023), \
         so the best model is expected after ~{:.1} h and early stop should end the run there; \
         the planner recommends depth {} ({:.1} h, ${:.0} of ${:.0})",
        budget.hours,
        budget.gpus,
        d.epochs,
        budget.unique_tokens,
        d.params_per_token,
        d.hours_to_best,
        p.recommended_depth,
        p.recommended_hours,
        p.recommended_cost,
        p.budget_cost
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budget(gpus: u32, hours: f64, unique: u64) -> Budget {
        Budget {
            gpus,
            hours,
            price_per_gpu_hour: 3.0,
            unique_tokens: unique,
            seq_len: 2048,
        }
    }

    #[test]
    fn parameters_and_flops_follow_the_depth() {
        // Depth 6: width 384, 3 heads, 12·384² per block.
        assert_eq!(params(6), 2 * 32 * 384 + 6 * 12 * 384 * 384);
        // Depth 24: ~680 M, the budget-100 figure of the issue.
        assert!(
            (params(24) as f64 / 1e6 - 679.6).abs() < 1.0,
            "{}",
            params(24)
        );
        let f = flops_per_token(24, 2048);
        assert!(
            (f - (6.0 * (params(24) - 32 * 1536) as f64 + 12.0 * 24.0 * 1536.0 * 2048.0)).abs()
                < 1.0
        );
    }

    #[test]
    fn throughput_matches_the_measured_anchors() {
        // docs/performance.md: d24 ~111-118 k tok/s, d6 ~3.9 M tok/s on one GPU.
        let d24 = tokens_per_s(24, 2048);
        assert!((105e3..125e3).contains(&d24), "{d24}");
        let d6 = tokens_per_s(6, 2048);
        assert!((3.5e6..4.5e6).contains(&d6), "{d6}");
        assert_eq!(mfu(1), 0.47);
        assert!((mfu(28) - 0.575).abs() < 1e-9);
    }

    #[test]
    fn epochs_cost_and_hours_to_best_are_the_budgets_arithmetic() {
        let b = budget(2, 16.0, 350_000_000);
        let d = depth_plan(24, &b);
        assert!((d.tokens - d.tokens_per_s * 16.0 * 3600.0).abs() < 1.0);
        assert!((d.epochs - d.tokens / 350e6).abs() < 1e-9);
        // budget-100: ~37 epochs (the figure) and the best well inside the 16 hours.
        assert!((30.0..45.0).contains(&d.epochs), "{}", d.epochs);
        assert!((d.hours_to_best - 16.0 * BEST_EPOCHS_MEASURED / d.epochs).abs() < 1e-6);
        let p = plan(&b);
        assert_eq!(p.budget_cost, 96.0);
        assert!((p.recommended_cost - p.recommended_hours * 6.0).abs() < 1e-9);
    }

    #[test]
    fn more_data_makes_a_deeper_model_worth_it_and_repeats_are_worth_less() {
        let small = plan(&budget(2, 16.0, 35_000_000)).recommended_depth;
        let large = plan(&budget(2, 16.0, 3_500_000_000)).recommended_depth;
        assert!(small < large, "{small} vs {large}");
        // Four epochs are nearly as good as fresh data, forty are not.
        let fresh = expected_loss(2e7, 4e9, 4e9);
        let four = expected_loss(2e7, 4e9, 1e9);
        let forty = expected_loss(2e7, 4e9, 1e8);
        assert!(
            four - fresh < 0.02 && forty - fresh > 0.1,
            "{fresh} {four} {forty}"
        );
    }

    #[test]
    fn a_dataset_too_small_for_any_depth_cannot_rank_them() {
        // 2 800 tokens: every depth has far more parameters than the data supports and sees it
        // thousands of times, so the law gives them all the same loss.
        let tiny = plan(&budget(1, 1.0, 2_800));
        assert!(!ranks_depths(&tiny));
        assert!(ranks_depths(&plan(&budget(2, 16.0, 350_000_000))));
        // A CPU's throughput plans the same way.
        let cpu = plan_with(&budget(1, 1.0, 350_000_000), &|d| {
            50e9 / flops_per_token(d, 2048)
        });
        assert!(cpu.depths[0].tokens < plan(&budget(1, 1.0, 350_000_000)).depths[0].tokens);
    }

    #[test]
    fn the_warning_names_the_epochs_and_the_recommendation() {
        let b = budget(2, 16.0, 350_000_000);
        let w = data_constrained_warning(24, &b).unwrap();
        assert!(
            w.contains("depth 24") && w.contains("epochs") && w.contains("recommends"),
            "{w}"
        );
        assert!(data_constrained_warning(24, &budget(2, 0.5, 350_000_000)).is_none());
    }
}
