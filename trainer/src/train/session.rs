//! One training session from its first step to its end: the loop of nanochat's base_train.py,
//! {micro-batches → optimizer step → report → evaluate → checkpoint}, until the budget is spent,
//! validation stops improving, or a signal asks to stop.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use tch::{Device, Kind, Tensor};

use super::checkpoint;
use super::consensus;
use super::plan::{Plan, Projection};
use super::progress::{self, SharedProgress};
use super::state::{manifest_for, RunState};
use crate::data::dataset::Dataset;
use crate::dist::{ProcessGroup, ReduceOp};
use crate::engine::{autobatch, memory, oom, Engine};
use crate::model::GptConfig;
use crate::sys::events::Events;
use crate::sys::tensorboard::EventWriter;
use crate::user_bail;
use charlm_contract::events::{self, Event};
use charlm_contract::{ProgressReport, StopReason};

mod evaluation;
mod report;

pub use evaluation::evaluate;

pub struct Session<'a> {
    pub plan: &'a Plan,
    pub data: &'a Dataset,
    pub pg: &'a ProcessGroup,
    pub device: Device,
    pub engine: Engine,
    /// Rank 0's, on every rank (see `consensus`).
    pub state: RunState,
    /// Whether rank 0 writes checkpoints (it has a checkpoint directory): rank 0's, on every rank,
    /// because every rank takes part in gathering a sharded optimizer's state for a save.
    pub checkpoints: bool,
    /// The newest checkpoint, for rank 0's progress report.
    pub last_checkpoint: Option<PathBuf>,
    pub shared: SharedProgress,
    pub stop: Arc<AtomicBool>,
    /// TensorBoard writer, on rank 0 when asked for.
    pub tensorboard: Option<EventWriter>,
    /// The JSON Lines stream on stdout (rank 0 writes it).
    pub events: Events,
}

impl Session<'_> {
    fn is_main(&self) -> bool {
        self.pg.rank() == 0
    }

    /// Rank 0's values for a decision that guards a collective; every rank's run state is
    /// compared on the way (`consensus::decide`).
    fn decide(&self, decision: &str, values: &[(&str, f64)]) -> Result<Vec<f64>> {
        consensus::decide(
            self.pg,
            self.device,
            decision,
            self.state.step,
            &self.state.shared_json(),
            values,
        )
    }

    fn decide_flag(&self, decision: &str, flag: bool) -> Result<bool> {
        Ok(self.decide(decision, &[(decision, yes(flag))])?[0] > 0.0)
    }

    pub fn run(&mut self) -> Result<()> {
        let started = Instant::now();
        let elapsed_before = self.state.elapsed_s;
        let mut last_save = (Instant::now(), self.state.step);
        let mut step_times = VecDeque::with_capacity(20);
        loop {
            let next = self.next(last_save)?;
            if let Some(reason) = next.stop {
                return self.finish(reason);
            }
            if next.save {
                self.save()?;
                last_save = (Instant::now(), self.state.step);
            }
            // From rank 0's clock, which every rank holds now: the same schedule on every rank.
            let progress = self
                .plan
                .budget
                .fraction(self.state.step, self.state.elapsed_s);
            let schedule = &self.plan.schedule;
            let lr_mult = schedule.lr_multiplier(self.state.step, progress);
            let momentum = schedule.muon_momentum(self.state.step, progress);
            self.engine.muon.weight_decay = schedule.weight_decay(progress);
            let t0 = Instant::now();
            let loss = self.train_step(lr_mult, momentum)?;
            // What `auto` chose is a GPU matter (on a CPU the block path is plain eager ATen).
            if step_times.is_empty() && self.is_main() && self.device.is_cuda() {
                if let Some(resolved) = self.engine.resolved() {
                    eprintln!("engine: {resolved}");
                }
            }
            self.state.elapsed_s = elapsed_before + started.elapsed().as_secs_f64();
            // The pace is measured from the end of the session's first step (its warm-up aside).
            if self.state.pace_anchor.is_none() {
                self.state.pace_anchor = Some((self.state.step, self.state.elapsed_s));
            }
            if step_times.len() == 20 {
                step_times.pop_front();
            }
            step_times.push_back(t0.elapsed().as_secs_f64());
            let step_s = step_times.iter().sum::<f64>() / step_times.len() as f64;
            self.report_step(loss, lr_mult, step_s);
            if next.evaluate {
                self.evaluate()?;
            }
        }
    }

    /// Rank 0's verdict, once a step, on what comes next: stop now, save the step just taken (its
    /// timer; `last_save` is when and at which step it last saved), evaluate after the coming
    /// step. Each branch holds collectives (the optimizer-state gather, the evaluation sums).
    /// Every rank also adopts rank 0's clock.
    fn next(&mut self, last_save: (Instant, i64)) -> Result<Next> {
        let progress = self
            .plan
            .budget
            .fraction(self.state.step, self.state.elapsed_s);
        let patience = self.plan.early_stop_patience;
        let save_due = self.checkpoints
            && last_save.1 != self.state.step
            && last_save.0.elapsed().as_secs_f64() >= self.plan.checkpoint_every_s;
        let every = self.plan.eval_every;
        let values = [
            ("budget spent", yes(progress >= 1.0)),
            (
                "early stop",
                yes(patience > 0 && self.state.overfit_evals >= patience),
            ),
            ("signal", yes(self.stop.load(Ordering::Relaxed))),
            ("save", yes(save_due)),
            (
                "evaluate",
                yes(every > 0 && (self.state.step + 1) % every == 0),
            ),
            ("clock", self.state.elapsed_s),
        ];
        let agreed = self.decide("stop, save or evaluate", &values)?;
        self.state.elapsed_s = agreed[5];
        let reasons = [
            StopReason::Budget,
            StopReason::EarlyStop,
            StopReason::Signal,
        ];
        let stop = reasons
            .into_iter()
            .zip(&agreed)
            .find(|(_, v)| **v > 0.0)
            .map(|(r, _)| r);
        Ok(Next {
            stop,
            // A stop saves anyway.
            save: stop.is_none() && agreed[3] > 0.0,
            evaluate: agreed[4] > 0.0,
        })
    }

    /// One optimizer step over the whole global batch; returns its mean loss over all ranks.
    fn train_step(&mut self, lr_mult: f64, momentum: f64) -> Result<f64> {
        let (plan, data, pg, device) = (self.plan, self.data, self.pg, self.device);
        let step = self.state.step;
        let grad_clip = self.plan.schedule.grad_clip;
        let engine = &mut self.engine;
        let mut loss_sum = Tensor::zeros([], (Kind::Float, device));
        explain_out_of_memory(plan, device, || {
            for micro in 0..plan.batch.accum_steps {
                let (x, y) = train_batch(data, plan, step, micro, pg.rank(), device);
                loss_sum += engine.micro_step(&x, &y, 1.0 / plan.batch.accum_steps as f64);
            }
            engine.optimizer_step(pg, lr_mult, momentum, grad_clip)
        })?;
        self.state.step += 1;
        pg.all_reduce(std::slice::from_ref(&loss_sum), ReduceOp::Avg)?;
        // One host synchronisation per step: the loss value, which also makes the timing honest.
        let loss = loss_sum.double_value(&[]) / plan.batch.accum_steps as f64;
        if !loss.is_finite() {
            anyhow::bail!("training diverged at step {}: loss {loss}", self.state.step);
        }
        Ok(loss)
    }

    /// Rank 0's checkpoint directory (it saves only with one).
    fn checkpoint_root(&self) -> Result<PathBuf> {
        self.plan
            .checkpoint_dir
            .clone()
            .context("rank 0 decided to save a checkpoint without a --checkpoint-dir")
    }

    /// A rolling checkpoint (every rank gathers, rank 0 writes), then pruning to
    /// `--keep-checkpoints`. Called where rank 0 decided to save.
    fn save(&mut self) -> Result<()> {
        let t0 = Instant::now();
        let optimizer = self.engine.optimizer_state(self.pg, self.is_main())?;
        if !self.is_main() {
            return Ok(());
        }
        let root = self.checkpoint_root()?;
        let manifest = manifest_for(self.plan, &self.engine, &self.state);
        let name = checkpoint::step_dir_name(self.state.step);
        let model = self.engine.model_state();
        let dir = checkpoint::save(&root, &name, manifest, &model, &optimizer)
            .with_context(|| format!("save a checkpoint in {}", root.display()))?;
        checkpoint::prune(&root, self.plan.keep_checkpoints)?;
        let seconds = t0.elapsed().as_secs_f64();
        eprintln!("checkpoint {} saved in {seconds:.1} s", dir.display());
        self.events.emit(Event::Checkpoint(events::Checkpoint {
            step: self.state.step,
            path: dir.display().to_string(),
            kind: "rolling".into(),
            seconds,
        }));
        self.shared.lock().expect("progress lock").checkpoint = Some(dir.display().to_string());
        self.last_checkpoint = Some(dir);
        Ok(())
    }

    /// Ends the session: a last evaluation when complete, a checkpoint, the summary.
    fn finish(&mut self, reason: StopReason) -> Result<()> {
        let unmeasured = self.state.val_step != Some(self.state.step);
        if self.decide_flag("evaluate at the end", reason.is_complete() && unmeasured)? {
            self.evaluate()?;
        }
        if self.decide_flag("save a last checkpoint", self.checkpoints)? {
            self.save()?;
        }
        if self.pg.world_size() > 1 {
            // What this rank ended with: the same line on every rank, or a bug.
            let best = self.state.best.map_or("no evaluation".into(), |(b, s)| {
                format!("best val bpc {b:.4} at step {s}")
            });
            eprintln!(
                "rank {} of {}: stopped at step {} ({}); {best}; run state {:016x}",
                self.pg.rank(),
                self.pg.world_size(),
                self.state.step,
                reason.as_str(),
                consensus::digest(self.state.shared_json().as_bytes())
            );
        }
        if !self.is_main() {
            return Ok(());
        }
        let mut p = self.shared.lock().expect("progress lock").clone();
        self.fill_progress(&mut p);
        p.complete = reason.is_complete();
        p.stop_reason = Some(reason.as_str().to_string());
        if reason == StopReason::EarlyStop {
            let saved = saved_seconds(
                self.plan.budget.seconds,
                self.plan.budget.max_steps,
                p.step,
                p.elapsed_s,
            );
            p.saved_s = Some(saved);
            p.saved_gpu_hours = Some(saved / 3600.0 * p.world_size as f64);
        }
        if p.complete {
            p.eta_s = Some(0.0);
            p.total_steps_estimate = Some(p.step);
            if let Some(dir) = &self.plan.checkpoint_dir {
                checkpoint::write_complete(dir, &serde_json::to_value(&p)?)?;
            }
        }
        match reason {
            StopReason::Budget => eprintln!("training complete at step {}", p.step),
            StopReason::EarlyStop => {
                let hours = p.saved_gpu_hours.unwrap_or(0.0);
                let price = self.plan.price_per_gpu_hour;
                eprintln!(
                    "stopped early at step {}: {} evaluations without a better val bpc while the \
                     model fit its training data better (best {:.4} at step {}, in best/); saved {:.0} s of the budget = {hours:.3} GPU-hours \
                     (${:.2} at ${price:.2} per GPU-hour)",
                    p.step,
                    self.plan.early_stop_patience,
                    p.best_val_bpc.unwrap_or(f64::NAN),
                    p.best_step.unwrap_or(0),
                    p.saved_s.unwrap_or(0.0),
                    hours * price
                )
            }
            StopReason::Signal => {
                eprintln!(
                    "stopped by a signal at step {}; checkpoint saved, exiting",
                    p.step
                )
            }
        }
        self.events.emit(Event::End(events::End {
            progress: p.clone(),
        }));
        if let Some(path) = &self.plan.termination_log {
            progress::write_termination_log(path, &p);
        }
        Ok(())
    }

    /// Where the budget ends, in steps and seconds, from this session's pace so far.
    fn projection(&self) -> Projection {
        self.plan
            .budget
            .project(self.state.step, self.state.elapsed_s, self.state.pace())
    }

    fn fill_progress(&self, p: &mut ProgressReport) {
        let (state, plan) = (&self.state, self.plan);
        p.step = state.step;
        p.tokens = state.step as u64 * plan.batch.total_batch_size as u64;
        p.tokens_per_epoch = Some(state.train_windows * plan.batch.seq_len as u64);
        p.epoch = (state.step as u64 * plan.batch.sequences_per_step()) as f64
            / state.train_windows.max(1) as f64;
        p.elapsed_s = state.elapsed_s;
        p.val_bpc = state.val_bpc;
        p.best_val_bpc = state.best.map(|b| b.0);
        p.best_step = state.best.map(|b| b.1);
        p.evals_since_best = state.evals_since_best;
        p.checkpoint = self
            .last_checkpoint
            .as_ref()
            .map(|d| d.display().to_string());
        let projection = self.projection();
        p.eta_s = projection.eta_s;
        p.total_steps_estimate = projection.total_steps;
    }

    fn tensorboard_scalars(&mut self, step: i64, values: &[(&str, f64)]) {
        if let Some(writer) = &mut self.tensorboard {
            if let Err(e) = writer.scalars(step, values) {
                eprintln!("warning: TensorBoard events are no longer written: {e:#}");
                self.tensorboard = None;
            }
        }
    }
}

/// What rank 0 decided comes next.
struct Next {
    stop: Option<StopReason>,
    save: bool,
    evaluate: bool,
}

/// A yes or no as a decision's value.
fn yes(flag: bool) -> f64 {
    f64::from(u8::from(flag))
}

/// Training seconds the budget still held when a run stopped at `step` after `elapsed_s`: the time
/// left, or for a step budget the steps left at the run's mean step time (the smaller of the two
/// when both are set).
pub fn saved_seconds(
    budget_s: Option<f64>,
    max_steps: Option<i64>,
    step: i64,
    elapsed_s: f64,
) -> f64 {
    let by_time = budget_s.map(|b| (b - elapsed_s).max(0.0));
    let by_steps = max_steps
        .filter(|_| step > 0)
        .map(|m| (m - step).max(0) as f64 * elapsed_s / step as f64);
    match (by_time, by_steps) {
        (Some(a), Some(b)) => a.min(b),
        (a, b) => a.or(b).unwrap_or(0.0),
    }
}

/// Runs one training step; libtorch's out-of-memory panic becomes an error that names a
/// micro-batch expected to fit (and `auto`), instead of a stack trace.
fn explain_out_of_memory(
    plan: &Plan,
    device: Device,
    step: impl FnOnce() -> Result<()>,
) -> Result<()> {
    let oom::OutOfMemory = match oom::catch(step) {
        Ok(result) => return result,
        Err(out_of_memory) => out_of_memory,
    };
    let config = GptConfig::new(plan.batch.depth, plan.batch.seq_len);
    let b = plan.batch.device_batch_size;
    let fits =
        autobatch::smaller_that_fits(&config, b, memory::limit_bytes(device), Kind::BFloat16);
    let hint = fits.map_or(String::new(), |f| {
        format!("--device-batch-size {f} (estimated to fit) or ")
    });
    user_bail!(
        "out of memory with a micro-batch of {b} sequences of {} tokens at depth {}: use \
         {hint}--device-batch-size auto; the total batch stays the same",
        plan.batch.seq_len,
        plan.batch.depth
    )
}

/// One micro-batch of this rank: inputs and targets `[B, T]` on the device.
fn train_batch(
    data: &Dataset,
    plan: &Plan,
    step: i64,
    micro: i64,
    rank: usize,
    device: Device,
) -> (Tensor, Tensor) {
    let (b, t) = (plan.batch.device_batch_size, plan.batch.seq_len);
    let seqs = crate::data::dataset::rank_sequences(
        step as u64,
        plan.batch.sequences_per_step(),
        micro as u64,
        plan.batch.world_size as u64,
        rank as u64,
        b as u64,
    );
    let mut buf = vec![0i64; (b * (t + 1)) as usize];
    data.fill_train(&seqs, &mut buf);
    let all = Tensor::from_slice(&buf).view([b, t + 1]);
    // Pinned memory lets the copy overlap with the GPU's work instead of waiting for it.
    let all = if device.is_cuda() {
        crate::sys::cuda::pinned(&all).to_device_(device, Kind::Int64, true, false)
    } else {
        all
    };
    (all.narrow(1, 0, t), all.narrow(1, 1, t))
}
