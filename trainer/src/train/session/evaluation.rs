//! Evaluation: validation (and training) bits per character, the best so far saved to `best/`,
//! and the early-stop count.

use std::time::Instant;

use anyhow::{Context, Result};
use tch::{Device, Kind, Tensor};

use super::super::checkpoint;
use super::super::consensus::from_rank0;
use super::super::plan::Plan;
use super::super::state::manifest_for;
use super::Session;
use crate::data::dataset::{Dataset, Split};
use crate::dist::{ProcessGroup, ReduceOp};
use crate::engine::Engine;
use crate::user_bail;
use charlm_contract::events::{self, Event};

impl Session<'_> {
    /// Validation bits per character, the best so far (saved to `best/`), and early-stop counting.
    pub(super) fn evaluate(&mut self) -> Result<()> {
        let bpc = evaluate(self.plan, self.data, self.pg, &self.engine, Split::Val)?;
        // The same measurement on training windows: a model that fits them clearly better than
        // the held-out ones is memorising, and only then is a worse val bpc a sign to stop (in
        // the noisy high-learning-rate phase val bpc rises and falls again while train ≈ val).
        let train_bpc = evaluate(self.plan, self.data, self.pg, &self.engine, Split::Train)?;
        let step = self.state.step;
        // Rank 0 records the evaluation (best, early-stop counts) and every rank takes its state.
        // The sums above are all-reduced, so the others would count the same; but a rank that
        // counts on its own is one restore, one rounding or one new field away from entering the
        // gather below alone (issue 28).
        let mut improved = false;
        if self.is_main() {
            improved = self.state.record_eval(bpc, train_bpc);
        }
        (self.state, improved) = from_rank0(self.pg, self.device, &(self.state.clone(), improved))?;
        // A sharded optimizer's state is gathered by every rank; rank 0 writes it.
        let optimizer = match self.decide_flag("save best/", improved && self.checkpoints)? {
            true => Some(self.engine.optimizer_state(self.pg, self.is_main())?),
            false => None,
        };
        if !self.is_main() {
            return Ok(());
        }
        if let Some(optimizer) = optimizer {
            let root = self.checkpoint_root()?;
            let t0 = Instant::now();
            let manifest = manifest_for(self.plan, &self.engine, &self.state);
            let model = self.engine.model_state();
            let dir = checkpoint::save(&root, checkpoint::BEST_DIR, manifest, &model, &optimizer)
                .context("save the best checkpoint")?;
            self.events.emit(Event::Checkpoint(events::Checkpoint {
                step,
                path: dir.display().to_string(),
                kind: "best".into(),
                seconds: t0.elapsed().as_secs_f64(),
            }));
        }
        {
            let mut p = self.shared.lock().expect("progress lock");
            self.fill_progress(&mut p);
        }
        let past = charlm_contract::PAST_BEST_EVALUATIONS;
        if self.state.evals_since_best > past {
            let (best, at) = self.state.best.unwrap();
            // Early stop counts only the memorising evaluations; saying how many there were
            // tells an off (patience 0) stop from a model that is worse but not memorising.
            eprintln!(
                "warning: {} evaluations since the best val bpc {best:.4} at step {at}, {} of \
                 them memorising: this training is paying for a model no better than best/ \
                 (--early-stop-patience {}; 0 is off)",
                self.state.evals_since_best,
                self.state.overfit_evals,
                self.plan.early_stop_patience
            );
        }
        let note = if improved {
            " (best)".to_string()
        } else {
            format!(
                " (best {:.4} bpc at step {})",
                self.state.best.unwrap().0,
                self.state.best.unwrap().1
            )
        };
        eprintln!("step {step:>6} | val {bpc:.4} bpc, train {train_bpc:.4} bpc{note}");
        let (best_val_bpc, best_step) = self.state.best.unwrap_or((bpc, step));
        self.events.emit(Event::Eval(events::Eval {
            step,
            val_bpc: bpc,
            train_bpc: Some(train_bpc),
            best: improved,
            best_val_bpc,
            best_step,
        }));
        self.tensorboard_scalars(step, &[("val/bpc", bpc), ("train/bpc", train_bpc)]);
        Ok(())
    }
}

/// Bits per character of `split` over up to `--eval-tokens` tokens (and no more windows than the
/// validation split has, so that both splits are measured alike), summed over ranks. Targets
/// that are BOS are not characters and don't count.
pub fn evaluate(
    plan: &Plan,
    data: &Dataset,
    pg: &ProcessGroup,
    engine: &Engine,
    split: Split,
) -> Result<f64> {
    let device = engine.model.device();
    let (b, t) = (plan.batch.device_batch_size, plan.batch.seq_len);
    let windows = data
        .windows(split)
        .min(data.val_windows())
        .min((plan.eval_tokens / t).max(1) as u64);
    let mut sums = Tensor::zeros([2], (Kind::Double, device));
    let mut buf = vec![0i64; (b * (t + 1)) as usize];
    let world = pg.world_size() as u64;
    let mut first = pg.rank() as u64 * b as u64;
    let bos = crate::data::vocab::BOS as i64;
    tch::no_grad(|| {
        while first < windows {
            let n = (windows - first).min(b as u64) as i64;
            let seqs: Vec<u64> = (first..first + n as u64).collect();
            let buf = &mut buf[..(n * (t + 1)) as usize];
            data.fill_windows(split, &seqs, buf);
            let all = Tensor::from_slice(buf).view([n, t + 1]).to_device(device);
            let (x, y) = (all.narrow(1, 0, t), all.narrow(1, 1, t));
            let y = y.masked_fill(&y.eq(bos), -1);
            let nats = engine.model.loss_with(&x, &y, tch::Reduction::Sum, -1);
            let count = y.ne(-1).sum(Kind::Double);
            sums += Tensor::stack(&[nats.to_kind(Kind::Double), count], 0);
            first += world * b as u64;
        }
    });
    pg.all_reduce(std::slice::from_ref(&sums), ReduceOp::Sum)?;
    let v = Vec::<f64>::try_from(&sums.to_device(Device::Cpu))?;
    if v[1] == 0.0 {
        user_bail!(
            "the validation split has no characters to evaluate; prepare with a larger \
             --val-fraction"
        );
    }
    Ok(v[0] / v[1] / std::f64::consts::LN_2)
}
