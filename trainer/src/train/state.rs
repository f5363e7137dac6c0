//! What a session changes besides the model as it runs, and the manifest of a checkpoint taken
//! from it.

use serde::{Deserialize, Serialize};

use super::checkpoint::{InitFrom, Manifest};
use super::plan::Plan;
use crate::engine::Engine;

/// Steps a session takes (past its first) before its pace projects where a time budget ends.
pub const PACE_STEPS: i64 = 5;

/// What the loop mutates besides the model. Every rank holds rank 0's: it is sent whole at start
/// and after each evaluation (`consensus::from_rank0`), and each decision that guards a
/// collective compares its digest over the ranks ([`RunState::shared_json`]). A field added here
/// travels and is checked without more code.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunState {
    /// Training windows per epoch, to express positions in epochs.
    pub train_windows: u64,
    pub step: i64,
    /// Training time so far, earlier sessions included. Each rank advances its own between
    /// decisions; each decision hands every rank rank 0's.
    pub elapsed_s: f64,
    pub val_bpc: Option<f64>,
    /// The step `val_bpc` was measured at.
    pub val_step: Option<i64>,
    /// Best validation bpc and its step.
    pub best: Option<(f64, i64)>,
    /// Evaluations since the best one.
    pub evals_since_best: u32,
    /// Of those, the ones where the model fit the training split better than the validation
    /// split (memorising): what early stopping counts.
    pub overfit_evals: u32,
    /// The checkpoint whose weights started this training (`--init-from`), kept in every
    /// checkpoint's manifest.
    pub init_from: Option<InitFrom>,
    /// Step and training time at the end of this session's first step, from which its pace is
    /// measured (evaluations and saves included, so that projections of the budget hold). Each
    /// rank's own clock: left out of the shared digest, as `elapsed_s` is.
    pub pace_anchor: Option<(i64, f64)>,
}

impl RunState {
    pub fn new(train_windows: u64) -> Self {
        Self {
            train_windows,
            step: 0,
            elapsed_s: 0.0,
            val_bpc: None,
            val_step: None,
            best: None,
            evals_since_best: 0,
            overfit_evals: 0,
            init_from: None,
            pace_anchor: None,
        }
    }

    /// Records an evaluation at the current step; returns whether it is a new best.
    pub fn record_eval(&mut self, val_bpc: f64, train_bpc: f64) -> bool {
        let step = self.step;
        self.val_bpc = Some(val_bpc);
        self.val_step = Some(step);
        let improved = self.best.is_none_or(|(best, _)| val_bpc < best);
        if improved {
            self.best = Some((val_bpc, step));
            self.evals_since_best = 0;
            self.overfit_evals = 0;
        } else {
            self.evals_since_best += 1;
            if train_bpc < val_bpc * (1.0 - super::args::MEMORISING_MARGIN) {
                self.overfit_evals += 1;
            }
        }
        improved
    }

    /// The state every rank must hold alike, as JSON: all of it but the clock, which each rank
    /// advances on its own between two decisions.
    pub fn shared_json(&self) -> String {
        let mut v = serde_json::to_value(self).expect("a run state is plain data");
        if let Some(map) = v.as_object_mut() {
            map.remove("elapsed_s");
            map.remove("pace_anchor");
        }
        v.to_string()
    }

    /// Seconds of training time per step in this session, once it has taken [`PACE_STEPS`]
    /// steps past its first: a mean over the whole session, which settles instead of jumping
    /// with each slow or fast step.
    pub fn pace(&self) -> Option<f64> {
        let (step, elapsed) = self.pace_anchor?;
        let steps = self.step - step;
        (steps >= PACE_STEPS && self.elapsed_s > elapsed)
            .then(|| (self.elapsed_s - elapsed) / steps as f64)
    }
}

/// The manifest of a checkpoint taken now.
pub fn manifest_for(plan: &Plan, engine: &Engine, state: &RunState) -> Manifest {
    let batch = &plan.batch;
    let consumed = state.step as u64 * batch.sequences_per_step();
    Manifest {
        format: 0,
        step: state.step,
        model: engine.model.config,
        settings: plan.settings(),
        sequences_consumed: consumed,
        epoch: consumed as f64 / state.train_windows.max(1) as f64,
        seed: batch.seed,
        elapsed_s: state.elapsed_s,
        val_bpc: state.val_bpc,
        evals_since_best: state.evals_since_best,
        overfit_evals: state.overfit_evals,
        world_size: batch.world_size,
        adamw_step: engine.adamw.step,
        files: Default::default(),
        dataset: plan.dataset.clone(),
        vocabulary: Some(super::checkpoint::vocabulary()),
        init_from: state.init_from.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shared_part_is_all_but_the_clock() {
        let mut a = RunState::new(10);
        a.step = 7;
        a.record_eval(2.5, 2.0);
        let mut b = a.clone();
        b.elapsed_s = 99.0;
        assert_eq!(a.shared_json(), b.shared_json());
        b.record_eval(2.6, 2.0);
        assert_ne!(a.shared_json(), b.shared_json());
        assert!(
            a.shared_json().contains("\"best\":[2.5,7]"),
            "{}",
            a.shared_json()
        );
    }

    #[test]
    fn an_evaluation_counts_toward_early_stop_only_while_memorising() {
        let mut s = RunState::new(10);
        assert!(s.record_eval(3.0, 3.0));
        s.step = 1;
        assert!(!s.record_eval(3.1, 3.09));
        assert_eq!((s.evals_since_best, s.overfit_evals), (1, 0));
        s.step = 2;
        assert!(!s.record_eval(3.2, 2.0));
        assert_eq!((s.evals_since_best, s.overfit_evals), (2, 1));
        s.step = 3;
        assert!(s.record_eval(2.9, 2.0));
        assert_eq!(
            (s.best, s.evals_since_best, s.overfit_evals),
            (Some((2.9, 3)), 0, 0)
        );
    }
}
