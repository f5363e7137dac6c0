//! The step line: rank 0's progress report, its human line, its `step` event and TensorBoard
//! scalars.

use charlm_contract::events::{self, Event};
use charlm_contract::ProgressReport;

use super::super::PEAK_FLOPS;
use super::Session;
use crate::sys::events::Events;
use crate::sys::figures::{fmt_duration, grouped};

impl Session<'_> {
    pub(super) fn report_step(&mut self, loss: f64, lr_mult: f64, step_s: f64) {
        if !self.is_main() {
            return;
        }
        let tokens_per_s = self.plan.batch.total_batch_size as f64 / step_s;
        let config = self.engine.model.config;
        let mfu = self.device.is_cuda().then(|| {
            config.flops_per_token() * tokens_per_s / (PEAK_FLOPS * self.pg.world_size() as f64)
        });
        let snapshot = {
            let mut p = self.shared.lock().expect("progress lock");
            p.train_loss = Some(loss);
            p.tokens_per_s = Some(tokens_per_s);
            p.mfu = mfu;
            p.peak_memory_gib = crate::sys::cuda::peak_memory_gib(self.device);
            self.fill_progress(&mut p);
            p.clone()
        };
        let every = self.plan.log_every;
        if every > 0 && (snapshot.step % every == 0 || snapshot.step == 1) {
            let progress = self
                .plan
                .budget
                .fraction(self.state.step, self.state.elapsed_s);
            let total = self.projection().shown();
            log_step(&snapshot, &total, lr_mult, progress, &self.events);
            let mut scalars = vec![("train/loss", loss), ("train/lr_multiplier", lr_mult)];
            scalars.push(("perf/tokens_per_second", tokens_per_s));
            scalars.extend(mfu.map(|m| ("perf/mfu", m)));
            scalars.push(("train/epoch", snapshot.epoch));
            self.tensorboard_scalars(snapshot.step, &scalars);
        }
    }
}

/// The step's human line (units, share of the budget, time left) and its `step` event; `total`
/// is what is known of the last step (`/40`, `/~207` for an estimate, or nothing yet).
fn log_step(p: &ProgressReport, total: &str, lr_mult: f64, progress: f64, events: &Events) {
    let mfu = p
        .mfu
        .map_or(String::new(), |m| format!(" | mfu {:.1}%", m * 100.0));
    let loss = p.train_loss.unwrap_or(f64::NAN);
    let tokens_per_s = p.tokens_per_s.unwrap_or(0.0);
    eprintln!(
        "step {:>6}{total} {:>5.1}% | loss {loss:.4} nats | lr ×{lr_mult:.2} | {} tok/s{mfu} | \
         epoch {:.2} | {} elapsed, {} left",
        p.step,
        (progress * 100.0).min(100.0),
        grouped(tokens_per_s.max(0.0).round_ties_even() as u64),
        p.epoch,
        fmt_duration(p.elapsed_s),
        p.eta_s.map_or("?".to_string(), fmt_duration),
    );
    events.emit(Event::Step(events::Step {
        step: p.step,
        total_steps_estimate: p.total_steps_estimate,
        progress: progress.min(1.0),
        train_loss: loss,
        lr_mult,
        tokens_per_s,
        mfu: p.mfu,
        elapsed_s: p.elapsed_s,
        eta_s: p.eta_s,
        epoch: p.epoch,
        tokens: p.tokens,
        tokens_per_epoch: p.tokens_per_epoch,
        peak_memory_gib: p.peak_memory_gib,
    }));
}
