//! The training's clocks: `activeDeadlineSeconds` (the workers save a checkpoint and the training
//! fails) and `ttlSecondsAfterFinished` (a finished training is deleted).

use k8s_openapi::jiff::Timestamp;

use super::success::final_report;
use super::{Decider, STOPPING_REQUEUE};
use crate::conditions::FALSE;
use crate::crd::condition as cond;
use crate::deadlines;
use crate::failures;
use crate::usage;
use crate::workers::Worker;

impl Decider<'_> {
    /// When `activeDeadlineSeconds` falls, if the spec sets it.
    pub(super) fn deadline(&self) -> Option<Timestamp> {
        let t = self.o.training;
        let created = t.metadata.creation_timestamp.as_ref().map(|c| c.0);
        deadlines::active_deadline(created, t.spec.active_deadline_seconds)
    }

    pub(super) fn deadline_passed(&self) -> bool {
        self.deadline()
            .is_some_and(|at| deadlines::due(at, self.o.now))
    }

    /// Past the deadline: the workers are deleted, which makes them save a checkpoint on SIGTERM
    /// as for a suspend (their pods stay until the operator read that final report); once none
    /// runs, the training fails with `DeadlineExceeded`, naming the checkpoint. The checkpoint
    /// volume is never touched.
    pub(super) fn stop_for_deadline(&mut self, current: &[&Worker]) {
        if let Some(report) = final_report(current) {
            self.take_progress(&report);
        }
        let seconds = self
            .o
            .training
            .spec
            .active_deadline_seconds
            .unwrap_or_default();
        let deadline = self.deadline().map_or("?".into(), |d| d.to_string());
        if current.iter().any(|w| w.is_active()) {
            let now = self.o.now;
            usage::stop(self.usage(), None, now);
            self.delete(current, true);
            let msg = format!(
                "activeDeadlineSeconds ({seconds}s from creation, at {deadline}) passed: the \
                 workers save a final checkpoint and stop"
            );
            self.set(cond::RUNNING, FALSE, "DeadlineExceeded", msg.clone());
            self.st().message = Some(msg);
            self.decision.requeue = Some(STOPPING_REQUEUE);
            return;
        }
        let checkpoint = match self.decision.status.latest_checkpoint.as_deref() {
            Some(path) => match failures::checkpoint_step(path) {
                Some(step) => format!("the last checkpoint is {path} (step {step})"),
                None => format!("the last checkpoint is {path}"),
            },
            None => "no checkpoint was saved".to_string(),
        };
        let msg = format!(
            "activeDeadlineSeconds {seconds} exceeded (the deadline was {deadline}, {seconds}s \
             after the training was created): {checkpoint}, on the checkpoint volume; raise \
             spec.activeDeadlineSeconds to resume from it"
        );
        self.fail(current, "DeadlineExceeded", msg);
    }

    /// The next moment a clock of the training acts: the deadline of an unfinished training (a
    /// requeue no later than it), or the TTL of a finished one (its deletion once it passed).
    pub(super) fn clocks(&mut self) {
        let st = &self.decision.status;
        let now = self.o.now;
        let next = if st.phase.is_some_and(|p| p.is_terminal()) {
            let completed = st.completion_time.as_ref().map(|t| t.0);
            let ttl = self.o.training.spec.ttl_seconds_after_finished;
            let expiry = deadlines::ttl_expiry(completed, ttl);
            if expiry.is_some_and(|at| deadlines::due(at, now)) {
                self.decision.delete_training = true;
                return;
            }
            expiry
        } else {
            self.deadline().filter(|at| !deadlines::due(*at, now))
        };
        if let Some(at) = next {
            let wait = deadlines::wait_until(at, now);
            self.decision.requeue = Some(self.decision.requeue.map_or(wait, |r| r.min(wait)));
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::decision::testing::*;

    /// A GPU training created at 0 with a deadline of 60 s, whose two workers run.
    fn deadline_training() -> (CharLMTraining, Vec<Pod>) {
        let mut t = training(gpu_spec());
        t.spec.active_deadline_seconds = Some(60);
        t.metadata.creation_timestamp = Some(Time(at(0)));
        let t = with(t.clone(), &decide_at(&t, &[], 0));
        let pods = vec![
            running(pod(&t, 0, 0), "10.0.0.1"),
            running(pod(&t, 1, 0), "10.0.0.2"),
        ];
        let d = decide_at(&t, &pods, 5);
        (with(t, &d), pods)
    }

    #[test]
    fn a_deadline_wakes_the_operator_when_it_falls() {
        let (t, pods) = deadline_training();
        let d = decide_at(&t, &pods, 40);
        assert_eq!(d.status.phase, Some(Phase::Running));
        assert_eq!(d.requeue, Some(Duration::from_secs(21)));
        // Waiting for a restart counts too: the deadline is from creation.
        let d = decide_at(&t, &pods, 2);
        assert_eq!(d.requeue, Some(RUNNING_REQUEUE));
    }

    #[test]
    fn past_the_deadline_the_workers_checkpoint_and_the_training_fails() {
        let (t, pods) = deadline_training();
        let d = decide_at(&t, &pods, 60);
        assert_eq!(d.delete, ["demo-worker-0", "demo-worker-1"]);
        assert_ne!(
            d.status.phase,
            Some(Phase::Failed),
            "not before the checkpoint"
        );
        assert_eq!(condition(&d, c::RUNNING), ("False", "DeadlineExceeded"));
        assert_eq!(d.requeue, Some(STOPPING_REQUEUE));
        let t = with(t, &d);

        // Still stopping: nothing deleted twice, nothing restarted.
        let stopping: Vec<Pod> = pods.iter().cloned().map(deleting).collect();
        let d = decide_at(&t, &stopping, 62);
        assert!(d.delete.is_empty() && d.create.is_empty());
        assert_eq!((d.status.restarts, d.status.attempt), (0, 0));
        assert!(d.failure.is_none());

        // SIGTERM saved step 168; both trainers ended.
        let ended = vec![
            terminated(
                deleting(pods[0].clone()),
                TRAINER_CONTAINER,
                0,
                r#"{"step": 168, "checkpoint": "/checkpoints/step-000000168", "complete": false, "stop_reason": "signal"}"#,
            ),
            terminated(deleting(pods[1].clone()), TRAINER_CONTAINER, 0, "{}"),
        ];
        let d = decide_at(&t, &ended, 64);
        assert_eq!(d.status.phase, Some(Phase::Failed));
        assert_eq!(condition(&d, c::FAILED), ("True", "DeadlineExceeded"));
        let msg = message(&d);
        assert!(
            msg.contains("activeDeadlineSeconds 60 exceeded")
                && msg.contains("/checkpoints/step-000000168 (step 168)"),
            "{msg}"
        );
        assert_eq!(
            d.status.latest_checkpoint.as_deref(),
            Some("/checkpoints/step-000000168")
        );
        assert_eq!(
            d.status.failures,
            Default::default(),
            "a deadline is no failure of a worker"
        );
        assert_eq!(d.status.completion_time, Some(Time(at(64))));
        assert!(d.delete.is_empty());
    }

    #[test]
    fn a_deadline_passed_without_workers_fails_at_once_and_success_wins() {
        let (t, pods) = deadline_training();
        let mut suspended = t.clone();
        suspended.spec.suspend = Some(true);
        let d = decide_at(&suspended, &[], 100);
        assert_eq!(condition(&d, c::FAILED), ("True", "DeadlineExceeded"));
        assert!(
            message(&d).contains("no checkpoint was saved"),
            "{}",
            message(&d)
        );

        let done = vec![
            terminated(
                pod(&t, 0, 0),
                TRAINER_CONTAINER,
                0,
                r#"{"step": 100, "complete": true}"#,
            ),
            pods[1].clone(),
        ];
        let d = decide_at(&t, &done, 100);
        assert_eq!(d.status.phase, Some(Phase::Succeeded));
    }

    #[test]
    fn a_finished_training_is_deleted_once_its_ttl_passed() {
        let (t, mut pods) = running_gpu_training();
        let t = with_spec(t, |s| s["ttlSecondsAfterFinished"] = 100.into());
        pods[0] = terminated(
            pod(&t, 0, 0),
            TRAINER_CONTAINER,
            0,
            r#"{"step": 100, "complete": true}"#,
        );
        let d = decide_at(&t, &pods, 500);
        assert_eq!(d.status.phase, Some(Phase::Succeeded));
        assert!(!d.delete_training);
        assert_eq!(d.requeue, Some(Duration::from_secs(101)));
        let t = with(t, &d);
        let d = decide_at(&t, &pods[..1], 599);
        assert!(!d.delete_training);
        assert_eq!(d.requeue, Some(Duration::from_secs(2)));
        let d = decide_at(&t, &pods[..1], 600);
        assert!(d.delete_training);
        // A failure ends a training too.
        let mut failed = t.clone();
        let st = failed.status.as_mut().unwrap();
        (st.phase, st.failed_generation) = (Some(Phase::Failed), Some(1));
        assert!(decide_at(&failed, &[], 600).delete_training);
        // Without a TTL nothing is deleted.
        let mut kept = t;
        kept.spec.ttl_seconds_after_finished = None;
        let d = decide_at(&kept, &pods[..1], 10_000);
        assert!(!d.delete_training && d.requeue.is_none());
    }
}
