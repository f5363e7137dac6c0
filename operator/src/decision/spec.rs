//! Spec changes: which settings the attempt runs with (a running attempt keeps the settings it
//! started with; a changed spec shapes the next), a fresh attempt for a spec changed after a
//! failure, and a spec the operator cannot run.

use super::Decider;
use crate::conditions::FALSE;
use crate::crd::{condition as cond, EffectiveSettings, Phase};
use crate::effective;
use crate::workers::Worker;

impl Decider<'_> {
    /// A spec changed after a failure (e.g. a fixed dataset) gets a fresh attempt.
    pub(super) fn spec_changed_after_failure(&mut self) {
        if self.decision.status.phase != Some(Phase::Failed)
            || self.generation <= self.decision.status.failed_generation
        {
            return;
        }
        let st = self.st();
        st.attempt += 1;
        st.restarts = 0;
        st.failed_generation = None;
        st.completion_time = None;
        st.restart_after = None;
        st.launched_attempt = None;
        let msg = "the spec changed after the failure; starting again";
        self.set(cond::FAILED, FALSE, "SpecChanged", msg);
        self.phase(Phase::Pending, msg);
    }

    /// The settings the attempt runs with: those it was launched with while it runs (a changed
    /// spec shapes the next attempt: docs/operator.md, "Spec changes while running"), else the
    /// spec's now. `None`: the spec cannot run (the training failed, saying why).
    pub(super) fn settings(&mut self) -> Option<EffectiveSettings> {
        let o = self.o;
        let mut resolved = match effective::resolve(&o.training.spec) {
            Ok(e) => e,
            Err(message) => {
                self.invalid_spec(message);
                return None;
            }
        };
        if let Some(message) = &o.rejection {
            self.invalid_spec(message.clone());
            return None;
        }
        resolved.generation = self.generation;
        let st = &self.decision.status;
        let launched =
            st.launched_attempt == Some(st.attempt) || st.phase.is_some_and(|p| p.is_terminal());
        Some(match st.effective.clone() {
            Some(recorded) if launched => recorded,
            _ => resolved,
        })
    }

    /// A spec the operator cannot run (one the API server stored before its rules said so): fail
    /// with the fix, once per generation; a new generation is looked at afresh.
    pub(super) fn invalid_spec(&mut self, message: String) {
        self.st().effective = None;
        if self.decision.status.phase == Some(Phase::Failed) {
            return;
        }
        let all: Vec<&Worker> = self.o.workers.iter().collect();
        self.fail(&all, "InvalidSpec", message);
    }
}

#[cfg(test)]
mod tests {
    use crate::decision::testing::*;

    #[test]
    fn a_spec_the_operator_cannot_run_fails_with_the_fix() {
        // Stored before the schema's rules demanded a depth.
        let mut t = training(cpu_spec());
        t.spec.depth = None;
        let d = decide_at(&t, &[], 0);
        assert!(d.create.is_empty());
        assert_eq!(d.status.phase, Some(Phase::Failed));
        assert_eq!(condition(&d, c::FAILED), ("True", "InvalidSpec"));
        assert!(d
            .status
            .message
            .as_deref()
            .unwrap()
            .contains("set spec.depth"));
        assert!(d.status.effective.is_none());

        // The fix, a new generation, starts the training.
        let mut t = with(t, &d);
        t.spec.depth = Some(2);
        t.metadata.generation = Some(2);
        let d = decide_at(&t, &[], 5);
        assert_eq!(d.create, [0]);
        assert_eq!(d.status.effective.unwrap().depth, 2);
    }

    #[test]
    fn a_rejected_object_fails_the_spec_once_and_a_new_spec_starts_again() {
        let t = training(gpu_spec());
        let d = decide_with(
            &t,
            &[],
            0,
            Some("the API server rejected pod demo-worker-0: bad"),
        );
        assert_eq!(d.status.phase, Some(Phase::Failed));
        assert_eq!(condition(&d, c::FAILED), ("True", "InvalidSpec"));
        assert!(d.create.is_empty());
        assert_eq!(d.status.failed_generation, Some(1));
        let mut t = with(t, &d);
        t.metadata.generation = Some(2);
        let d = decide_at(&t, &[], 5);
        assert_eq!(d.status.phase, Some(Phase::Pending));
        assert_eq!(d.create, [0, 1]);
    }

    /// `status.effective` is what the running pods were made from; a spec changed meanwhile
    /// shapes the next attempt.
    #[test]
    fn effective_settings_follow_the_attempt_not_the_edited_spec() {
        let (mut t, pods) = running_gpu_training();
        t.spec.hours = Some(9.0);
        t.metadata.generation = Some(2);
        let d = decide_at(&t, &pods, 40);
        let e = d.status.effective.clone().unwrap();
        assert_eq!((e.hours, e.generation), (Some(2.0), Some(1)));
        // The gang restarts (a worker failed): the new attempt takes the new spec.
        let t = with(t, &d);
        let failed = vec![
            terminated(pods[0].clone(), TRAINER_CONTAINER, 1, "boom"),
            pods[1].clone(),
        ];
        let d = decide_at(&t, &failed, 50);
        let t = with(t, &d);
        let d = decide_at(&t, &[], 200);
        assert_eq!(d.create, [0, 1]);
        let e = d.status.effective.unwrap();
        assert_eq!((e.hours, e.generation), (Some(9.0), Some(2)));
    }

    #[test]
    fn a_spec_edited_during_an_attempt_keeps_the_attempts_trainer_settings() {
        // Issue 32: every setting the pods get comes from `status.effective`, which keeps the
        // attempt's: the sequence length of a gang made within the attempt stays 512.
        let mut spec = gpu_spec();
        spec["seqLen"] = serde_json::json!(512);
        let t = training(spec);
        let d = decide_at(&t, &[], 0);
        assert_eq!(d.create, [0, 1]);
        let mut t = with(t, &d);
        t.spec.seq_len = Some(1024);
        t.metadata.generation = Some(2);
        let pods = vec![pod(&t, 0, 0), pod(&t, 1, 0)];
        let d = decide_at(&t, &pods, 5);
        let e = d.status.effective.clone().unwrap();
        assert_eq!((e.seq_len, e.generation), (Some(512), Some(1)));
        // The next attempt takes the edit.
        let t = with(t, &d);
        let failed = vec![
            terminated(pods[0].clone(), TRAINER_CONTAINER, 1, "boom"),
            pods[1].clone(),
        ];
        let t = with(t.clone(), &decide_at(&t, &failed, 10));
        let e = decide_at(&t, &[], 200).status.effective.unwrap();
        assert_eq!((e.seq_len, e.generation), (Some(1024), Some(2)));
    }
}
