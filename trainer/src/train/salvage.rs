//! What rank 0 does when a peer died mid-step and `launch` abandoned the round: save the last
//! step every rank completed, when it can, so that the restart (in place, or the operator's new
//! gang) repeats at most the step that was in flight, not everything since the last periodic
//! checkpoint. No collective is possible any more, so only what rank 0 holds whole can be saved:
//!
//! - the weights are whole on every rank between steps, and so is AdamW's state;
//! - Muon's momentum is whole on rank 0 only when the optimizer is not sharded
//!   (`--shard-optimizer off`); sharded, each rank holds its share and a dead rank's is gone;
//! - a failure half-way through an optimizer update (a sharded step's all-gather) leaves weights
//!   that belong to no step.
//!
//! Rank 0 says which case it was in a `salvage` event and on stderr; `launch` passes the sentence
//! on to the next round, whose rank 0 reports it as `last_restart_reason`.

use std::time::Instant;

use anyhow::{Context, Result};
use charlm_contract::events::{self, Event};

use super::checkpoint;
use super::session::Session;
use super::state::manifest_for;
use crate::dist::PeerFailed;

impl Session<'_> {
    /// Rank 0's answer to a peer's failure: save the last complete step if it can, and say what
    /// it did. Other ranks do nothing.
    pub fn salvage(&mut self, why: &PeerFailed) {
        if self.pg.rank() != 0 {
            eprintln!(
                "rank {}: {why}; stopping (rank 0 saves what can be saved)",
                self.pg.rank()
            );
            return;
        }
        let step = self.state.step;
        let t0 = Instant::now();
        let outcome = match self.salvage_checkpoint() {
            Ok(outcome) => outcome,
            Err(err) => Outcome::Refused(format!("saving it failed: {err:#}")),
        };
        let newest = self
            .plan
            .checkpoint_dir
            .as_deref()
            .and_then(|root| checkpoint::list(root).ok())
            .and_then(|all| all.first().map(|(s, _)| *s));
        let (saved, path, message) = match outcome {
            Outcome::Saved(dir) => (
                true,
                Some(dir.display().to_string()),
                format!(
                    "rank 0 saved step {step} before stopping ({:.1} s)",
                    t0.elapsed().as_secs_f64()
                ),
            ),
            Outcome::Already(dir) => (
                true,
                Some(dir.display().to_string()),
                format!("step {step} was saved already"),
            ),
            Outcome::Refused(reason) => (
                false,
                None,
                format!(
                    "rank 0 could not save step {step}: {reason}; the restart resumes from {}",
                    newest.map_or("the start".to_string(), |s| format!("step {s}"))
                ),
            ),
        };
        eprintln!("rank 0: {why}; {message}");
        if let Err(err) = self.pg.tell_launch(&message) {
            eprintln!("rank 0: could not tell launch what it saved: {err:#}");
        }
        self.events.emit(Event::Salvage(events::Salvage {
            step,
            saved,
            path,
            resumes_from: if saved { Some(step) } else { newest },
            message,
        }));
    }

    fn salvage_checkpoint(&mut self) -> Result<Outcome> {
        let step = self.state.step;
        let Some(root) = self.plan.checkpoint_dir.clone() else {
            return Ok(Outcome::Refused("there is no --checkpoint-dir".into()));
        };
        if step == 0 {
            return Ok(Outcome::Refused("no step was complete yet".into()));
        }
        let name = checkpoint::step_dir_name(step);
        if let Some((_, dir)) = checkpoint::list(&root)?
            .into_iter()
            .find(|(s, _)| *s == step)
        {
            return Ok(Outcome::Already(dir));
        }
        if !self.engine.is_whole() {
            return Ok(Outcome::Refused(format!(
                "the failure came half-way through step {}'s optimizer update",
                step + 1
            )));
        }
        let shards = self.engine.muon.shard().count;
        if shards > 1 {
            return Ok(Outcome::Refused(format!(
                "Muon's momentum is sharded over {shards} ranks and the others' shares are out of \
                 reach (--shard-optimizer off keeps it whole on rank 0, for more memory)"
            )));
        }
        let t0 = Instant::now();
        // Unsharded, gathering the optimizer state is a local copy: no collective.
        let optimizer = self.engine.optimizer_state(self.pg, true)?;
        let manifest = manifest_for(self.plan, &self.engine, &self.state);
        let model = self.engine.model_state();
        let dir = checkpoint::save(&root, &name, manifest, &model, &optimizer)
            .with_context(|| format!("save a checkpoint in {}", root.display()))?;
        checkpoint::prune(&root, self.plan.keep_checkpoints)?;
        self.events.emit(Event::Checkpoint(events::Checkpoint {
            step,
            path: dir.display().to_string(),
            kind: "rolling".into(),
            seconds: t0.elapsed().as_secs_f64(),
        }));
        Ok(Outcome::Saved(dir))
    }
}

enum Outcome {
    Saved(std::path::PathBuf),
    Already(std::path::PathBuf),
    Refused(String),
}
