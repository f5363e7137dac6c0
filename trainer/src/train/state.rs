//! What a session changes besides the model as it runs, and the manifest of a checkpoint taken
//! from it.

use std::path::PathBuf;

use super::checkpoint::{InitFrom, Manifest};
use super::plan::Plan;
use crate::engine::Engine;

/// Steps a session takes (past its first) before its pace projects where a time budget ends.
pub const PACE_STEPS: i64 = 5;

/// What the loop mutates besides the model.
pub struct RunState {
    /// Training windows per epoch, to express positions in epochs.
    pub train_windows: u64,
    pub step: i64,
    /// Training time so far, earlier sessions included.
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
    pub last_checkpoint: Option<PathBuf>,
    /// The checkpoint whose weights started this training (`--init-from`), kept in every
    /// checkpoint's manifest.
    pub init_from: Option<InitFrom>,
    /// Step and training time at the end of this session's first step, from which its pace is
    /// measured (evaluations and saves included, so that projections of the budget hold).
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
            last_checkpoint: None,
            init_from: None,
            pace_anchor: None,
        }
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
        world_size: batch.world_size,
        adamw_step: engine.adamw.step,
        files: Default::default(),
        dataset: plan.dataset.clone(),
        vocabulary: Some(super::resume::vocabulary()),
        init_from: state.init_from.clone(),
    }
}
