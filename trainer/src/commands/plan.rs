//! `charlm-trainer plan`: what a budget of GPUs × hours buys on a prepared dataset: per depth the
//! tokens, epochs and expected loss rank, the recommended depth and hours (early stop ends the run
//! at its best), and the cost. The arithmetic is `charlm_contract::planner`, which the operator's
//! `status.plan` uses too.

use std::path::{Path, PathBuf};

use anyhow::Result;
use charlm_contract::planner::{self, Budget, Plan};

use crate::data::prepare::read_manifest;
use crate::sys::flags;
use crate::user_bail;

#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// A directory written by `charlm-trainer prepare` (its manifest gives the dataset's size).
    #[arg(long, env = charlm_contract::env::DATA)]
    pub data: PathBuf,
    /// GPUs the training runs on, 1 or more.
    #[arg(long, env = "CHARLM_GPUS", default_value_t = 1, value_parser = flags::at_least(1u32))]
    pub gpus: u32,
    /// Hours of the budget (above 0).
    #[arg(long, env = "CHARLM_HOURS", default_value_t = 1.0, value_parser = flags::positive)]
    pub hours: f64,
    /// Dollars per GPU-hour, 0 or more.
    #[arg(long, env = "CHARLM_PRICE", default_value_t = 3.0, value_parser = flags::non_negative)]
    pub price: f64,
    /// Tokens per training sequence, 2 to 65536.
    #[arg(long, env = "CHARLM_SEQ_LEN", default_value_t = 2048, value_parser = flags::seq_len)]
    pub seq_len: i64,
    /// Also judge this depth, 1 to 128 (e.g. a preset's): its epochs and the DataConstrained
    /// warning. Unset: the recommended depth only.
    #[arg(long, env = "CHARLM_DEPTH", value_parser = flags::depth)]
    pub depth: Option<i64>,
}

/// The plan for `args` on the dataset in `args.data`.
pub fn make(args: &Args) -> Result<Plan> {
    if args.gpus < 1
        || args.hours.is_nan()
        || args.hours <= 0.0
        || args.price.is_nan()
        || args.price < 0.0
    {
        user_bail!("--gpus must be at least 1, --hours above 0 and --price at least 0");
    }
    Ok(planner::plan(&budget(args, &args.data)?))
}

fn budget(args: &Args, data: &Path) -> Result<Budget> {
    let manifest = read_manifest(data)?;
    Ok(Budget {
        gpus: args.gpus,
        hours: args.hours,
        price_per_gpu_hour: args.price,
        unique_tokens: manifest.train.tokens,
        seq_len: args.seq_len,
    })
}

/// The plan as the lines `plan` and `run` print (stderr), then one JSON line (stdout).
pub fn print(plan: &Plan, depth: Option<i64>) {
    let b = &plan.budget;
    eprintln!(
        "plan: {} GPUs × {:.2} h = {:.1} GPU-hours (${:.2} at ${:.2}/GPU-hour) on {} unique training tokens",
        b.gpus,
        b.hours,
        f64::from(b.gpus) * b.hours,
        plan.budget_cost,
        b.price_per_gpu_hour,
        b.unique_tokens
    );
    eprintln!("  depth   params     tok/s   epochs  params/token  loss rank  hours to best");
    let mut ranked: Vec<_> = plan.depths.iter().collect();
    ranked.sort_by(|a, b| a.expected_loss.total_cmp(&b.expected_loss));
    for d in &plan.depths {
        let rank = ranked.iter().position(|r| r.depth == d.depth).unwrap_or(0) + 1;
        let mark = if d.depth == plan.recommended_depth {
            "  ← recommended"
        } else {
            ""
        };
        eprintln!(
            "  {:>5} {:>7.1}M {:>9.0} {:>8.1} {:>13.3} {:>10} {:>14.2}{mark}",
            d.depth,
            d.params as f64 / 1e6,
            d.tokens_per_s,
            d.epochs,
            d.params_per_token,
            rank,
            d.hours_to_best
        );
    }
    eprintln!(
        "recommended: depth {} for {:.2} h (${:.2} of the ${:.2} budget; early stop ends the run \
         at its best, expected after ~{} epochs as the data-constrained benchmark measured)",
        plan.recommended_depth,
        plan.recommended_hours,
        plan.recommended_cost,
        plan.budget_cost,
        planner::BEST_EPOCHS_MEASURED
    );
    if let Some(depth) = depth {
        match planner::data_constrained_warning(depth, b) {
            Some(w) => eprintln!("DataConstrained: {w}"),
            None => eprintln!(
                "depth {depth}: {:.1} epochs, not data-constrained",
                planner::depth_plan(depth, b).epochs
            ),
        }
    }
    println!(
        "{}",
        serde_json::json!({"event": "plan", "plan": plan,
            "data_constrained": depth.and_then(|d| planner::data_constrained_warning(d, b))})
    );
}

pub fn run(args: Args) -> Result<()> {
    let plan = make(&args)?;
    print(&plan, args.depth);
    Ok(())
}
