//! What a session changes besides the model as it runs, and the manifest of a checkpoint taken
//! from it.

use std::path::PathBuf;

use super::checkpoint::Manifest;
use super::plan::Plan;
use crate::engine::Engine;

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
    /// Damaged checkpoints the resume set aside (rank 0's, for its report; no rank decides
    /// anything on it).
    pub set_aside: Vec<charlm_contract::DamagedCheckpoint>,
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
            set_aside: Vec::new(),
        }
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
    }
}
