//! Where a run starts: the newest good checkpoint (rank 0 reads it, then everyone gets rank 0's
//! state), or nothing when the checkpoint already spent the budget.

use std::path::PathBuf;

use anyhow::Result;

use charlm_contract::{ProgressReport, StopReason};

use super::checkpoint;
use super::plan::{schedule_change, Batch, Plan, ScheduleInputs};
use super::state::RunState;
use crate::engine::Engine;
use crate::user_bail;

/// The summary of a training that is already over: its newest checkpoint spent the *current*
/// budget (a raised budget continues training), or it stopped early at that checkpoint. A
/// restarted pod must not train past its end.
pub fn finished_summary(plan: &Plan) -> Result<Option<ProgressReport>> {
    let Some(root) = &plan.checkpoint_dir else {
        return Ok(None);
    };
    let Some((_, newest)) = checkpoint::list(root)?.into_iter().next() else {
        return Ok(None);
    };
    let Ok(m) = checkpoint::load_manifest(&newest) else {
        return Ok(None);
    };
    let recorded = checkpoint::read_complete(root)?
        .and_then(|v| serde_json::from_value::<ProgressReport>(v).ok())
        .filter(|p| p.step == m.step);
    let spent = plan.budget.fraction(m.step, m.elapsed_s) >= 1.0;
    let stopped_early = recorded
        .as_ref()
        .is_some_and(|p| p.stop_reason.as_deref() == Some(StopReason::EarlyStop.as_str()));
    if !spent && !stopped_early {
        return Ok(None);
    }
    eprintln!(
        "training in {} is already over (step {}, {:.0} s trained{}); nothing to do",
        root.display(),
        m.step,
        m.elapsed_s,
        if stopped_early { ", stopped early" } else { "" }
    );
    if let Some(p) = recorded {
        return Ok(Some(p));
    }
    let best = checkpoint::load_manifest(&root.join(checkpoint::BEST_DIR)).ok();
    Ok(Some(ProgressReport {
        step: m.step,
        total_steps_estimate: Some(m.step),
        epoch: m.epoch,
        val_bpc: m.val_bpc,
        best_val_bpc: best.as_ref().and_then(|b| b.val_bpc),
        best_step: best.map(|b| b.step),
        elapsed_s: m.elapsed_s,
        eta_s: Some(0.0),
        checkpoint: Some(newest.display().to_string()),
        world_size: m.world_size as u64,
        complete: true,
        stop_reason: Some(StopReason::Budget.as_str().to_string()),
        ..Default::default()
    }))
}

/// Loads the newest good checkpoint into the engine and state (rank 0, which then sends the
/// state to the others); returns its directory.
/// Damaged checkpoints it passed over on the way land in `set_aside`.
pub fn restore(
    plan: &Plan,
    engine: &mut Engine,
    state: &mut RunState,
    set_aside: &mut Vec<charlm_contract::DamagedCheckpoint>,
) -> Result<Option<PathBuf>> {
    let Some(root) = &plan.checkpoint_dir else {
        eprintln!("warning: no --checkpoint-dir: this run cannot be resumed");
        return Ok(None);
    };
    let Some(loaded) = checkpoint::load_latest(root)? else {
        return Ok(None);
    };
    let m = &loaded.manifest;
    if let Ok(old) = serde_json::from_value::<Batch>(m.settings.clone()) {
        if old.recipe != plan.batch.recipe {
            user_bail!(
                "{} was trained with --recipe {}, but this run asks for {}: use another \
                 --checkpoint-dir, or the same recipe",
                loaded.dir.display(),
                old.recipe.name(),
                plan.batch.recipe.name()
            );
        }
    }
    if m.model != engine.model.config {
        user_bail!(
            "{} holds a depth-{} model with seq len {}, but this run asks for depth {} with seq \
             len {}: use another --checkpoint-dir, or the same settings",
            loaded.dir.display(),
            m.model.depth,
            m.model.seq_len,
            plan.batch.depth,
            plan.batch.seq_len
        );
    }
    if let Ok(old) = serde_json::from_value::<ScheduleInputs>(m.settings.clone()) {
        let new = plan.schedule_inputs();
        if let Some(note) = schedule_change(&old, &new, &plan.schedule, m.step, m.elapsed_s) {
            eprintln!("note: {note}");
        }
    }
    if let Ok(old) = serde_json::from_value::<Batch>(m.settings.clone()) {
        if old.total_batch_size != plan.batch.total_batch_size || old.seed != plan.batch.seed {
            eprintln!(
                "warning: resuming with total batch {} and seed {} (the checkpoint had {} and {}): \
                 the data order changes",
                plan.batch.total_batch_size, plan.batch.seed, old.total_batch_size, old.seed
            );
        }
    }
    engine.load(&loaded.model, &loaded.optimizer, m.adamw_step)?;
    state.step = m.step;
    state.elapsed_s = m.elapsed_s;
    state.val_bpc = m.val_bpc;
    state.evals_since_best = m.evals_since_best;
    state.overfit_evals = m.overfit_evals;
    if let Ok(best) = checkpoint::load_manifest(&root.join(checkpoint::BEST_DIR)) {
        state.best = best.val_bpc.map(|v| (v, best.step));
    }
    *set_aside = loaded.set_aside;
    Ok(Some(loaded.dir))
}
