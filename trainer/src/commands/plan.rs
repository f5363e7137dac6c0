//! `charlm-trainer plan`: what a budget of GPUs × hours buys on a prepared dataset: per depth the
//! tokens, epochs and expected loss rank, the recommended depth and hours (early stop ends the run
//! at its best), and the cost; then the seed's depth table: per depth the parameters and the
//! memory one GPU needs at the micro-batch `auto` would pick on an 80 GB and a 141 GB GPU. The
//! budget's arithmetic is the `charlm-budget` crate's planner, which the operator's `status.plan` uses
//! too; the memory is `engine::memory`'s model, the one the trainer plans its steps with.

use std::path::PathBuf;

use anyhow::Result;
use charlm_budget::{self as planner, Budget, Plan};
use serde::Serialize;

use crate::data::format::read_manifest;
use crate::engine::autobatch::{self, CPU_FLOPS_PER_THREAD};
use crate::engine::memory::{expected_auto, AutoChoice};
use crate::model::GptConfig;
use crate::sys::events::Events;
use crate::sys::flags::{self, Count, LogFormat};

#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// A directory written by `charlm-trainer prepare` (its manifest gives the dataset's size).
    #[arg(long)]
    pub data: PathBuf,
    /// GPUs the training runs on, 1 or more, or `auto`: those visible here, or this machine's CPU
    /// when there are none (planned at the CPU's speed, without a price).
    #[arg(long, default_value = "auto")]
    pub gpus: Count,
    /// Hours of the budget (above 0).
    #[arg(long, default_value_t = 1.0, value_parser = flags::positive)]
    pub hours: f64,
    /// Dollars per GPU-hour, 0 or more.
    #[arg(long, default_value_t = 3.0, value_parser = flags::non_negative,
          visible_alias = "price")]
    pub price_per_gpu_hour: f64,
    /// Tokens per training sequence, 2 to 65536.
    #[arg(long, default_value_t = 2048, value_parser = flags::seq_len)]
    pub seq_len: i64,
    /// Also judge this depth, 1 to 128 (e.g. a preset's): its epochs and the DataConstrained
    /// warning. Unset: the recommended depth only.
    #[arg(long, value_parser = flags::depth)]
    pub depth: Option<i64>,
}

/// What a plan is for: GPUs (H100s, at the measured MFU) or this machine's CPU.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
#[serde(rename_all = "lowercase", tag = "kind")]
pub enum Hardware {
    Gpus { count: u32 },
    Cpu { threads: u32 },
}

impl Hardware {
    /// `--gpus`/`--nproc-per-node` on this machine.
    pub fn here(count: Count) -> Self {
        match (count, flags::visible_gpus()) {
            (Count::N(n), gpus) if gpus > 0 => Self::Gpus { count: n },
            (Count::Auto, gpus) if gpus > 0 => Self::Gpus { count: gpus },
            (Count::Auto, _) => Self::cpu(),
            // `plan --gpus 8` on a laptop plans for the GPUs it names.
            (Count::N(n), _) => Self::Gpus { count: n },
        }
    }

    pub fn cpu() -> Self {
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get()) as u32;
        Self::Cpu { threads }
    }

    /// "1 GPU", "8 GPUs", "the CPU (2 threads)".
    pub fn describe(&self) -> String {
        match *self {
            Self::Gpus { count: 1 } => "1 GPU".into(),
            Self::Gpus { count } => format!("{count} GPUs"),
            Self::Cpu { threads } => format!(
                "the CPU ({threads} thread{})",
                if threads == 1 { "" } else { "s" }
            ),
        }
    }

    /// Training tokens per second at `depth`: the GPUs' at the MFU measured per depth, or the
    /// CPU's at the FLOPs per thread `auto` plans CPU micro-batches with.
    pub fn tokens_per_s(&self, depth: i64, seq_len: i64) -> f64 {
        match *self {
            Self::Gpus { count } => planner::tokens_per_s(depth, seq_len) * f64::from(count),
            Self::Cpu { threads } => {
                CPU_FLOPS_PER_THREAD * f64::from(threads) / planner::flops_per_token(depth, seq_len)
            }
        }
    }

    /// The plan for `hours` on `unique_tokens` at `seq_len`.
    pub fn plan(&self, hours: f64, price: f64, unique_tokens: u64, seq_len: i64) -> Plan {
        let (gpus, price) = match *self {
            Self::Gpus { count } => (count, price),
            // CPU hours are not GPU-hours: no price.
            Self::Cpu { .. } => (1, 0.0),
        };
        let budget = Budget {
            gpus,
            hours,
            price_per_gpu_hour: price,
            unique_tokens,
            seq_len,
        };
        planner::plan_with(&budget, &|d| self.tokens_per_s(d, seq_len))
    }
}

/// The GPUs of the memory table: a name and the bytes CUDA reports as their memory.
pub const TABLE_GPUS: [(&str, u64); 2] = [("80 GB", 81_559 << 20), ("141 GB", 143_771 << 20)];

/// The depths of the memory table: the planner's and the seed's 56 and 64.
pub const TABLE_DEPTHS: [i64; 12] = [4, 6, 8, 12, 16, 20, 24, 32, 40, 48, 56, 64];

/// nanochat's tokens per optimizer step, which caps the micro-batch `auto` may pick per GPU.
pub const TABLE_TOTAL_BATCH: i64 = 524_288;

/// `auto`'s choice per measured point of docs/performance.md (H100 80GB, seq 2048, total batch
/// 524,288, 2026-11-25): depth, micro-batch, peak GiB. The table prints them beside the model.
pub const MEASURED_AUTO: [(i64, i64, f64); 3] = [(24, 32, 56.0), (32, 16, 62.5), (48, 1, 68.9)];

/// One row of the memory table.
#[derive(Clone, Debug, Serialize)]
pub struct MemoryRow {
    pub depth: i64,
    pub params: i64,
    /// Per GPU of [`TABLE_GPUS`], in order: what `auto` is expected to pick, or `None` when
    /// nothing fits one GPU.
    pub gpus: Vec<Option<AutoChoice>>,
}

/// The memory table for `gpus` GPUs sharing [`TABLE_TOTAL_BATCH`] at `seq_len`.
pub fn memory_table(seq_len: i64, gpus: u32) -> Vec<MemoryRow> {
    let per_gpu = TABLE_TOTAL_BATCH / (seq_len * i64::from(gpus.max(1)));
    let candidates = autobatch::candidates(Some(per_gpu.max(1)));
    TABLE_DEPTHS
        .iter()
        .map(|&depth| {
            let config = GptConfig::new(depth, seq_len);
            MemoryRow {
                depth,
                params: config.total_params(),
                gpus: TABLE_GPUS
                    .iter()
                    .map(|&(_, bytes)| expected_auto(&config, &candidates, bytes as f64))
                    .collect(),
            }
        })
        .collect()
}

/// The plan for `args` on the dataset in `args.data`.
pub fn make(args: &Args) -> Result<(Hardware, Plan)> {
    let manifest = read_manifest(&args.data)?;
    let hardware = Hardware::here(args.gpus);
    let plan = hardware.plan(
        args.hours,
        args.price_per_gpu_hour,
        manifest.train.tokens,
        args.seq_len,
    );
    Ok((hardware, plan))
}

/// Hours as a person reads them: "1.50 h", "12 min", "40 s".
fn hours(h: f64) -> String {
    if h >= 0.1 {
        format!("{h:.2} h")
    } else if h * 60.0 >= 1.0 {
        format!("{:.0} min", h * 60.0)
    } else {
        format!("{:.0} s", (h * 3600.0).ceil())
    }
}

fn dollars(d: f64) -> String {
    if d > 0.0 && d < 0.01 {
        "<$0.01".into()
    } else {
        format!("${d:.2}")
    }
}

/// The plan as the lines `plan` and `run` print (stderr), then one `plan` event on `events`.
pub fn print(hardware: Hardware, plan: &Plan, depth: Option<i64>, events: &Events) {
    let b = &plan.budget;
    let gpu = matches!(hardware, Hardware::Gpus { .. });
    if gpu {
        eprintln!(
            "plan: {} × {:.2} h = {:.1} GPU-hours ({} at {}/GPU-hour) on {} unique training tokens",
            hardware.describe(),
            b.hours,
            f64::from(b.gpus) * b.hours,
            dollars(plan.budget_cost),
            dollars(b.price_per_gpu_hour),
            b.unique_tokens
        );
    } else {
        eprintln!(
            "plan: {} × {:.2} h on {} unique training tokens (no GPU visible: planned at \
             {:.0} GFLOP/s per thread; `--gpus N` plans for N H100s)",
            hardware.describe(),
            b.hours,
            b.unique_tokens,
            CPU_FLOPS_PER_THREAD / 1e9
        );
    }
    let ranks = planner::ranks_depths(plan);
    eprintln!("  depth   params     tok/s   epochs  params/token  loss rank  hours to best");
    let mut ranked: Vec<_> = plan.depths.iter().collect();
    ranked.sort_by(|a, b| a.expected_loss.total_cmp(&b.expected_loss));
    for d in &plan.depths {
        let rank = match ranked.iter().position(|r| r.depth == d.depth) {
            Some(i) if ranks => (i + 1).to_string(),
            _ => "-".into(),
        };
        let mark = if d.depth == plan.recommended_depth {
            "  ← recommended"
        } else {
            ""
        };
        eprintln!(
            "  {:>5} {:>7.1}M {:>9.0} {:>8.1} {:>13.3} {:>10} {:>14}{mark}",
            d.depth,
            d.params as f64 / 1e6,
            d.tokens_per_s,
            d.epochs,
            d.params_per_token,
            rank,
            hours(d.hours_to_best)
        );
    }
    let cost = if gpu {
        format!(
            " ({} of the {} budget)",
            dollars(plan.recommended_cost),
            dollars(plan.budget_cost)
        )
    } else {
        String::new()
    };
    if ranks {
        eprintln!(
            "recommended: depth {} for {}{cost}; early stop ends the run at its best, expected \
             after ~{} epochs as the data-constrained benchmark measured",
            plan.recommended_depth,
            hours(plan.recommended_hours),
            planner::BEST_EPOCHS_MEASURED
        );
    } else {
        eprintln!(
            "the law cannot rank these depths: on {} unique tokens every depth is expected to \
             reach the same loss (the data, not the model, bounds it), so the smallest, depth {}, \
             is recommended as the cheapest; its best is expected after {}{cost}. More text \
             would let a deeper model pay.",
            b.unique_tokens,
            plan.recommended_depth,
            hours(plan.recommended_hours)
        );
    }
    let warning = depth.and_then(|d| {
        let warning = if gpu {
            planner::data_constrained_warning(d, b)
        } else {
            None
        };
        match &warning {
            Some(w) => eprintln!("DataConstrained: {w}"),
            None => eprintln!(
                "depth {d}: {:.1} epochs{}",
                planner::depth_plan_with(d, b, &|d| hardware.tokens_per_s(d, b.seq_len)).epochs,
                if gpu { ", not data-constrained" } else { "" }
            ),
        }
        warning
    });
    let gpus_in_table = match hardware {
        Hardware::Gpus { count } => count,
        Hardware::Cpu { .. } => 1,
    };
    let table = memory_table(b.seq_len, gpus_in_table);
    print_memory(&table, b.seq_len, gpus_in_table);
    #[derive(Serialize)]
    struct PlanEvent<'a> {
        hardware: Hardware,
        plan: &'a Plan,
        law_ranks: bool,
        data_constrained: Option<String>,
        memory: Vec<MemoryRow>,
    }
    events.emit_other(
        "plan",
        &PlanEvent {
            hardware,
            plan,
            law_ranks: ranks,
            data_constrained: warning,
            memory: table,
        },
    );
}

/// The seed's depth table: parameters, and per GPU size the micro-batch, peak and recomputation.
fn print_memory(rows: &[MemoryRow], seq_len: i64, gpus: u32) {
    let measured: Vec<String> = MEASURED_AUTO
        .iter()
        .map(|(d, b, gib)| format!("d{d} {b} → {gib} GiB"))
        .collect();
    eprintln!(
        "memory per GPU at `--device-batch-size auto` (engine/memory.rs's estimate; seq {seq_len}, \
         {} tokens a step over {gpus} GPU{}; measured on an H100 80GB, docs/performance.md: {}):",
        TABLE_TOTAL_BATCH,
        if gpus == 1 { "" } else { "s" },
        measured.join(", ")
    );
    let mut head = String::from("  depth   params");
    for (name, _) in TABLE_GPUS {
        head += &format!(" | {name:>6}: batch  peak GiB  recompute");
    }
    eprintln!("{head}");
    for row in rows {
        let params = if row.params >= 1_000_000_000 {
            format!("{:.2}B", row.params as f64 / 1e9)
        } else {
            format!("{:.1}M", row.params as f64 / 1e6)
        };
        let mut line = format!("  {:>5} {params:>8}", row.depth);
        for choice in &row.gpus {
            line += &match choice {
                Some(c) => format!(
                    " | {:>13} {:>9.1}  {:>9}",
                    c.micro_batch,
                    c.peak_bytes / (1u64 << 30) as f64,
                    match c.recompute_blocks {
                        0 => "no".to_string(),
                        r => format!("{r} of {}", row.depth),
                    }
                ),
                None => format!(" | {:>33}", "does not fit"),
            };
        }
        eprintln!("{line}");
    }
}

pub fn run(args: Args) -> Result<()> {
    let (hardware, plan) = make(&args)?;
    print(
        hardware,
        &plan,
        args.depth,
        &Events::new(LogFormat::Json, None),
    );
    Ok(())
}
