//! What a run will do, decided from the flags before it starts: batch geometry, the budget, the
//! learning-rate schedule, evaluation and checkpoint cadence, and the micro-batch when it is `auto`.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Result;
use serde::{Deserialize, Serialize};
use tch::Device;

use super::consensus;
use super::recipe::Schedule;
use super::Args;
use crate::dist::ProcessGroup;
use crate::engine::autobatch::{self, MicroBatch};
use crate::model::GptConfig;
use crate::sys::flags;
use crate::user_bail;

/// The batch geometry, derived from the flags and the world size; checkpoints record it as their
/// `settings`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Batch {
    pub depth: i64,
    pub seq_len: i64,
    pub device_batch_size: i64,
    pub total_batch_size: i64,
    pub world_size: usize,
    pub accum_steps: i64,
    pub seed: u64,
    /// The training recipe (checkpoints from before it was recorded trained with nanochat-2025).
    #[serde(default = "super::recipe::Recipe::before_recipes")]
    pub recipe: super::recipe::Recipe,
}

impl Batch {
    pub fn sequences_per_step(&self) -> u64 {
        (self.total_batch_size / self.seq_len) as u64
    }
}

/// How long a training may run: hours and/or steps, whichever ends first.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Budget {
    pub seconds: Option<f64>,
    pub max_steps: Option<i64>,
}

impl Budget {
    pub fn from_args(args: &Args) -> Self {
        Self {
            seconds: args.hours.map(|h| h * 3600.0),
            max_steps: args.max_steps,
        }
    }

    /// How far along the budget is at `step` after `elapsed_s` of training.
    pub fn fraction(&self, step: i64, elapsed_s: f64) -> f64 {
        budget_fraction(step, elapsed_s, self.seconds, self.max_steps)
    }
}

/// Where a budget ends, as far as it is known: a step budget's last step exactly; a time budget's
/// only as an estimate from the pace (none before a pace is measured), its time left exactly.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Projection {
    pub total_steps: Option<i64>,
    /// Whether `total_steps` is the budget itself rather than a projection.
    pub exact: bool,
    pub eta_s: Option<f64>,
}

impl Projection {
    /// The total as the step line shows it: `/40`, `/~207` (an estimate), or nothing yet.
    pub fn shown(&self) -> String {
        match (self.total_steps, self.exact) {
            (Some(t), true) => format!("/{t}"),
            (Some(t), false) => format!("/~{t}"),
            (None, _) => String::new(),
        }
    }
}

impl Budget {
    /// The budget's end seen at `step` after `elapsed_s`, with `pace_s` seconds per step when
    /// measured.
    pub fn project(&self, step: i64, elapsed_s: f64, pace_s: Option<f64>) -> Projection {
        let pace_s = pace_s.filter(|p| *p > 0.0);
        let Some(seconds) = self.seconds else {
            return Projection {
                total_steps: self.max_steps,
                exact: self.max_steps.is_some(),
                eta_s: self
                    .max_steps
                    .zip(pace_s)
                    .map(|(m, p)| (m - step).max(0) as f64 * p),
            };
        };
        let left = (seconds - elapsed_s).max(0.0);
        let Some(pace) = pace_s else {
            return Projection {
                total_steps: None,
                exact: false,
                eta_s: Some(left),
            };
        };
        let by_time = step + (left / pace).round() as i64;
        Projection {
            total_steps: Some(self.max_steps.map_or(by_time, |m| by_time.min(m))),
            exact: false,
            eta_s: Some(
                self.max_steps
                    .map_or(left, |m| left.min((m - step).max(0) as f64 * pace)),
            ),
        }
    }
}

/// Everything a run does, resolved from the flags once and checked: the session reads this, never
/// the flags.
#[derive(Clone, Debug)]
pub struct Plan {
    pub batch: Batch,
    pub budget: Budget,
    /// The recipe resolved for this model and batch: learning rates, schedules, clip, decay.
    pub schedule: Schedule,
    /// Evaluate every N steps (0: only at the end), over up to `eval_tokens` tokens.
    pub eval_every: i64,
    pub eval_tokens: i64,
    /// Log every N steps (0: never).
    pub log_every: i64,
    pub checkpoint_every_s: f64,
    pub keep_checkpoints: usize,
    /// Evaluations without a better val bpc before stopping (0: never).
    pub early_stop_patience: u32,
    /// Dollars per GPU-hour (the saved-cost line of the summary).
    pub price_per_gpu_hour: f64,
    pub checkpoint_dir: Option<PathBuf>,
    pub termination_log: Option<String>,
    /// The prepared dataset (set once it is open); checkpoints record it.
    pub dataset: Option<super::checkpoint::DatasetId>,
    /// Weights that start a new training in a folder without checkpoints (`--init-from`).
    pub init_from: Option<PathBuf>,
}

impl Plan {
    /// Checks the settings for `world_size` ranks with micro-batch `micro` (already resolved).
    pub fn new(args: &Args, world_size: usize, micro: i64) -> Result<Self> {
        // Each flag's own range is checked while parsing (train/args.rs); these stay for
        // callers that build `Args` by hand, and for what depends on several flags.
        if !(1..=flags::MAX_DEPTH).contains(&args.depth) {
            user_bail!(
                "--depth {} (CHARLM_DEPTH) is out of range: use 1 to {}",
                args.depth,
                flags::MAX_DEPTH
            );
        }
        if args.seq_len < 2 || micro < 1 {
            user_bail!("--seq-len must be at least 2 and --device-batch-size at least 1");
        }
        if args.hours.is_none() && args.max_steps.is_none() {
            user_bail!(
                "give a budget: --hours H (CHARLM_HOURS) or --max-steps N (CHARLM_MAX_STEPS, \
                 nanochat's --num-iterations)"
            );
        }
        if args.hours.is_some_and(|h| h.is_nan() || h <= 0.0) {
            user_bail!("--hours (CHARLM_HOURS) must be above 0");
        }
        let per_micro = micro * args.seq_len * world_size as i64;
        let total = args.total_batch_size.unwrap_or(per_micro);
        if total < per_micro || total % per_micro != 0 {
            user_bail!(
                "--total-batch-size {total} (CHARLM_TOTAL_BATCH_SIZE) must be a multiple of device \
                 batch × seq len × ranks = {micro} × {} × {world_size} = {per_micro}; try {}",
                args.seq_len,
                (total / per_micro).max(1) * per_micro
            );
        }
        for (name, v) in [
            ("--warmdown-ratio", args.warmdown_ratio),
            ("--grad-clip", args.grad_clip),
            ("--weight-decay", args.weight_decay),
            ("--weight-decay-scale", Some(args.weight_decay_scale)),
        ] {
            if v.is_some_and(|v| v.is_nan() || v < 0.0 || (name == "--warmdown-ratio" && v > 1.0)) {
                user_bail!("{name} must be at least 0 (and --warmdown-ratio at most 1)");
            }
        }
        let batch = Batch {
            depth: args.depth,
            seq_len: args.seq_len,
            device_batch_size: micro,
            total_batch_size: total,
            world_size,
            accum_steps: total / per_micro,
            seed: args.seed,
            recipe: args.recipe,
        };
        Ok(Self {
            batch,
            budget: Budget::from_args(args),
            schedule: Schedule::new(
                args.recipe,
                &GptConfig::new(args.depth, args.seq_len),
                total,
                &args.overrides(),
            ),
            eval_every: args.eval_every,
            eval_tokens: args.eval_tokens,
            log_every: args.log_every,
            checkpoint_every_s: args.checkpoint_every_minutes * 60.0,
            keep_checkpoints: args.keep_checkpoints,
            early_stop_patience: args.early_stop_patience,
            price_per_gpu_hour: args.price_per_gpu_hour,
            checkpoint_dir: args.checkpoint_dir.clone(),
            termination_log: args.termination_log.clone(),
            dataset: None,
            init_from: args.init_from.clone(),
        })
    }
}

/// The schedule's inputs, recorded in each checkpoint's `settings` beside the [`Batch`], so that
/// a resume with another budget can say what that does to the learning rate. (The recipe, the
/// other input, is in the [`Batch`].)
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq)]
pub struct ScheduleInputs {
    pub max_steps: Option<i64>,
    pub hours: Option<f64>,
    pub warmdown_ratio: f64,
}

impl Plan {
    pub fn schedule_inputs(&self) -> ScheduleInputs {
        ScheduleInputs {
            max_steps: self.budget.max_steps,
            hours: self.budget.seconds.map(|s| s / 3600.0),
            warmdown_ratio: self.schedule.warmdown_ratio,
        }
    }

    /// A checkpoint's `settings`: the batch geometry and the schedule, in one object.
    pub fn settings(&self) -> serde_json::Value {
        let mut v = serde_json::to_value(&self.batch).unwrap_or_default();
        if let (Some(map), Ok(serde_json::Value::Object(s))) = (
            v.as_object_mut(),
            serde_json::to_value(self.schedule_inputs()),
        ) {
            map.extend(s);
        }
        v
    }
}

impl ScheduleInputs {
    fn budget(&self) -> Budget {
        Budget {
            seconds: self.hours.map(|h| h * 3600.0),
            max_steps: self.max_steps,
        }
    }

    fn describe(&self) -> String {
        let mut parts = Vec::new();
        if let Some(m) = self.max_steps {
            parts.push(format!("--max-steps {m}"));
        }
        if let Some(h) = self.hours {
            parts.push(format!("--hours {h}"));
        }
        parts.push(format!("--warmdown-ratio {}", self.warmdown_ratio));
        parts.join(" ")
    }
}

/// What a resume at `step` (after `elapsed_s` of training) under `new` does to the learning rate
/// of `recipe` when the checkpoint was trained under `old`: `None` when the schedule is the same.
/// The schedule is a function of the budget, so a raised budget moves the warmdown later and the
/// multiplier back up, possibly to 1 after it had decayed to nearly its end.
pub fn schedule_change(
    old: &ScheduleInputs,
    new: &ScheduleInputs,
    recipe: &Schedule,
    step: i64,
    elapsed_s: f64,
) -> Option<String> {
    if old == new {
        return None;
    }
    let multiplier = |s: &ScheduleInputs| {
        let under = Schedule {
            warmdown_ratio: s.warmdown_ratio,
            ..*recipe
        };
        under.lr_multiplier(step, s.budget().fraction(step, elapsed_s))
    };
    let (before, now) = (multiplier(old), multiplier(new));
    let decay = 1.0 - new.warmdown_ratio;
    let mut from = Vec::new();
    if let Some(m) = new.max_steps {
        from.push(format!("step {}", (decay * m as f64).ceil() as i64));
    }
    if let Some(h) = new.hours {
        from.push(format!("{:.2} h of training", decay * h));
    }
    Some(format!(
        "the schedule follows the budget, which changed from {} to {}: at step {step} the \
         learning-rate multiplier is {now:.2} (it was {before:.2} under the old budget); it is 1 \
         until {} and then decays linearly to {} at the end",
        old.describe(),
        new.describe(),
        from.join(" or "),
        recipe.final_lr_frac
    ))
}

/// How far along the budget is: the larger of the time and step fractions.
pub fn budget_fraction(
    step: i64,
    elapsed_s: f64,
    budget_s: Option<f64>,
    max_steps: Option<i64>,
) -> f64 {
    let by_time = budget_s.map_or(0.0, |b| elapsed_s / b);
    let by_steps = max_steps.map_or(0.0, |m| step as f64 / m.max(1) as f64);
    by_time.max(by_steps)
}

/// The micro-batch to train with: the fixed one, or for `auto` the largest that fits on every
/// rank (each probes its own device; the smallest answer wins).
pub fn resolve_micro_batch(
    args: &Args,
    config: &GptConfig,
    pg: &ProcessGroup,
    device: Device,
) -> Result<i64> {
    if let MicroBatch::Fixed(n) = args.device_batch_size {
        return Ok(n);
    }
    let per_rank_tokens = args.seq_len * pg.world_size() as i64;
    let per_rank = match args.total_batch_size {
        Some(total) if total % per_rank_tokens != 0 => user_bail!(
            "--total-batch-size {total} (CHARLM_TOTAL_BATCH_SIZE) must be a multiple of seq len × \
             ranks = {per_rank_tokens}; try {}",
            (total / per_rank_tokens).max(1) * per_rank_tokens
        ),
        Some(total) => Some(total / per_rank_tokens),
        None => None,
    };
    let t0 = Instant::now();
    let candidates = autobatch::candidates(per_rank);
    let chosen = autobatch::choose(config, &candidates, device, &args.engine)?;
    let least = consensus::min_over_ranks(pg, device, chosen.map_or(0.0, |b| b as f64))?;
    if least < 1.0 {
        let limit = if device.is_cuda() {
            ""
        } else {
            " (CPU limit: CHARLM_MEMORY_LIMIT_GIB, or half the RAM)"
        };
        user_bail!(
            "depth {} with seq len {} does not fit in memory even with a micro-batch of 1 \
             sequence{limit}: use a smaller --depth or --seq-len, or more memory",
            config.depth,
            config.seq_len
        );
    }
    if pg.rank() == 0 {
        eprintln!(
            "micro-batch auto: {} sequences per device (chosen in {:.1} s on {})",
            least as i64,
            t0.elapsed().as_secs_f64(),
            crate::sys::cuda::device_name(device)
        );
    }
    Ok(least as i64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[test]
    fn a_projection_shows_what_is_known_and_marks_estimates() {
        let steps = Budget {
            seconds: None,
            max_steps: Some(40),
        };
        let p = steps.project(10, 5.0, None);
        assert_eq!((p.shown(), p.eta_s), ("/40".to_string(), None));
        assert_eq!(steps.project(10, 5.0, Some(0.5)).eta_s, Some(15.0));
        let hours = Budget {
            seconds: Some(100.0),
            max_steps: None,
        };
        // No pace yet: the time left is known, the last step is not.
        let p = hours.project(1, 2.0, None);
        assert_eq!((p.shown(), p.eta_s), (String::new(), Some(98.0)));
        let p = hours.project(20, 40.0, Some(2.0));
        assert_eq!((p.shown(), p.eta_s), ("/~50".to_string(), Some(60.0)));
        // Both: the steps cap the estimate, whichever ends first sets the time left.
        let both = Budget {
            seconds: Some(100.0),
            max_steps: Some(30),
        };
        let p = both.project(20, 40.0, Some(2.0));
        assert_eq!((p.shown(), p.eta_s), ("/~30".to_string(), Some(20.0)));
    }

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        a: Args,
    }

    fn args(extra: &[&str]) -> Args {
        let base = ["t", "--data", "x", "--max-steps", "1", "--seq-len", "8"];
        Cli::parse_from(base.iter().chain(extra)).a
    }

    #[test]
    fn budget_takes_the_further_of_time_and_steps() {
        assert_eq!(budget_fraction(50, 10.0, Some(100.0), Some(100)), 0.5);
        assert_eq!(budget_fraction(10, 90.0, Some(100.0), Some(100)), 0.9);
        assert_eq!(budget_fraction(10, 90.0, None, Some(100)), 0.1);
    }

    #[test]
    fn a_raised_budget_explains_the_learning_rate_it_gives() {
        let old = ScheduleInputs {
            max_steps: Some(100),
            hours: None,
            warmdown_ratio: 0.2,
        };
        let new = ScheduleInputs {
            max_steps: Some(200),
            ..old
        };
        let plan = Plan::new(&args(&["--recipe", "nanochat-2025"]), 1, 2).unwrap();
        let recipe = &plan.schedule;
        assert_eq!(schedule_change(&old, &old, recipe, 100, 5.0), None);
        let note = schedule_change(&old, &new, recipe, 100, 5.0).unwrap();
        assert!(
            note.contains("from --max-steps 100 --warmdown-ratio 0.2 to --max-steps 200"),
            "{note}"
        );
        assert!(
            note.contains("multiplier is 1.00 (it was 0.00 under the old budget)"),
            "{note}"
        );
        assert!(note.contains("1 until step 160"), "{note}");
    }

    #[test]
    fn settings_hold_the_batch_and_the_schedule() {
        let plan = Plan::new(&args(&[]), 1, 2).unwrap();
        let v = plan.settings();
        assert_eq!(v["max_steps"], 1);
        assert_eq!(
            serde_json::from_value::<Batch>(v.clone()).unwrap(),
            plan.batch
        );
        assert_eq!(
            serde_json::from_value::<ScheduleInputs>(v).unwrap(),
            plan.schedule_inputs()
        );
    }

    #[test]
    fn plan_rejects_a_total_batch_that_does_not_divide() {
        let err = Plan::new(&args(&["--total-batch-size", "40"]), 1, 2).unwrap_err();
        assert_eq!(crate::sys::error::exit_code(&err), 2);
        assert!(format!("{err}").contains("try 32"), "{err}");
        let plan = Plan::new(&args(&["--total-batch-size", "64"]), 2, 2).unwrap();
        assert_eq!(plan.batch.accum_steps, 2);
    }

    #[test]
    fn auto_keeps_the_total_batch_and_fills_it_with_accumulation() {
        // On CPU `auto` is held to CHARLM_MEMORY_LIMIT_GIB (or half the RAM): a tiny model fits
        // at the largest candidate dividing the per-rank batch.
        let a = args(&["--total-batch-size", "256", "--device-batch-size", "auto"]);
        let pg = ProcessGroup::init(
            &crate::dist::DistEnv::single(),
            Device::Cpu,
            std::time::Duration::from_secs(5),
        )
        .unwrap();
        let micro = resolve_micro_batch(&a, &GptConfig::new(1, 8), &pg, Device::Cpu).unwrap();
        assert_eq!(micro, 32);
        let plan = Plan::new(&a, 1, micro).unwrap();
        assert_eq!(
            (plan.batch.accum_steps, plan.batch.total_batch_size),
            (1, 256)
        );
    }
}
