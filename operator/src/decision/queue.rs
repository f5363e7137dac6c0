//! Suspend and Kueue: the workers go (saving a checkpoint on SIGTERM) while `spec.suspend` is
//! true or Kueue has not admitted the training, and its quota goes back once none runs.

use super::success::{final_report, worker_report};
use super::{Decider, DATASET_REQUEUE, STOPPING_REQUEUE};
use crate::conditions::{FALSE, TRUE};
use crate::crd::{condition as cond, Phase};
use crate::kueue::{Gate, State as QueueState};
use crate::usage;
use crate::workers::Worker;

impl Decider<'_> {
    pub(super) fn suspend(&mut self, current: &[&Worker]) {
        // The workers save a checkpoint on SIGTERM and say so in their termination message.
        if let Some(report) = current.iter().find_map(|w| worker_report(w)) {
            self.take_progress(&report);
        }
        let now = self.o.now;
        usage::stop(self.usage(), None, now);
        self.delete(current, false);
        self.st().launched_attempt = None;
        self.st().running_workers = 0;
        let msg = "spec.suspend is true: the workers are deleted and the checkpoint volume is kept";
        self.set(cond::SUSPENDED, TRUE, "Suspended", msg);
        self.set(cond::RUNNING, FALSE, "Suspended", msg);
        self.set(cond::PODS_READY, FALSE, "Suspended", msg);
        self.phase(Phase::Suspended, msg);
        self.decision.requeue = (!current.is_empty()).then_some(STOPPING_REQUEUE);
        // A queued training's Workload is deactivated while suspended; Kueue evicts it, and its
        // quota goes back once the workers have stopped.
        let evicted = self
            .o
            .queue
            .as_ref()
            .is_some_and(|g| matches!(g.state, QueueState::Evicted { reserved: true, .. }));
        if evicted && !self.o.workers.iter().any(|w| w.is_active()) {
            self.decision.release_quota = true;
        }
    }

    /// Kueue's admission gates the workers of a queued training. Admitted: on as usual. Not (yet,
    /// or no longer): no workers. Evicted (preempted): the workers are deleted, as for a suspend,
    /// so the trainers save a checkpoint on SIGTERM; once none runs, the quota goes back to Kueue,
    /// which queues the training again; readmitted, new workers resume from the checkpoint.
    pub(super) fn admitted(&mut self, gate: &Gate, current: &[&Worker]) -> bool {
        let lq = &gate.local_queue;
        let (reason, msg) = match &gate.state {
            QueueState::Admitted { cluster_queue } => {
                let msg = format!("admitted by Kueue in ClusterQueue {cluster_queue} (LocalQueue {lq})");
                self.set(cond::ADMITTED, TRUE, "Admitted", msg);
                return true;
            }
            QueueState::Pending(why) => (
                "Pending",
                format!("waiting for quota in LocalQueue {lq}: {why}"),
            ),
            QueueState::NoWorkload(why) => ("NoWorkload", format!("not queued in LocalQueue {lq}: {why}")),
            QueueState::Evicted {
                reason, message, ..
            } => (
                reason.as_str(),
                format!(
                    "evicted by Kueue ({reason}: {message}); the workers save a checkpoint and stop, \
                     and the training waits in LocalQueue {lq} to be admitted again"
                ),
            ),
            QueueState::Finished => (
                "Finished",
                "its Workload is finished; delete and create the training to queue it again".to_string(),
            ),
        };
        if let Some(report) = final_report(current) {
            self.take_progress(&report);
        }
        let now = self.o.now;
        usage::stop(self.usage(), None, now);
        self.delete(current, false);
        self.st().launched_attempt = None;
        self.st().running_workers = 0;
        self.set(cond::ADMITTED, FALSE, reason, msg.clone());
        self.set(cond::RUNNING, FALSE, "Queued", msg.clone());
        self.set(cond::PODS_READY, FALSE, "Queued", msg.clone());
        self.phase(Phase::Queued, msg);
        // As Kueue's jobframework, the quota goes back only once no pod holds its resources.
        let stopping = self.o.workers.iter().any(|w| w.is_active());
        if stopping {
            self.decision.requeue = Some(STOPPING_REQUEUE);
        } else if matches!(gate.state, QueueState::Evicted { reserved: true, .. }) {
            self.decision.release_quota = true;
        } else if matches!(gate.state, QueueState::NoWorkload(_)) {
            // Nothing watched wakes it (a WorkloadPriorityClass created later): look again.
            self.decision.requeue = Some(DATASET_REQUEUE);
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use crate::decision::testing::*;

    #[test]
    fn suspend_deletes_workers_and_resume_recreates_them() {
        let (mut t, pods) = running_gpu_training();
        t.spec.suspend = Some(true);
        let d = decide_at(&t, &pods, 50);
        assert_eq!(d.status.phase, Some(Phase::Suspended));
        assert_eq!(d.delete, ["demo-worker-0", "demo-worker-1"]);
        assert_eq!(condition(&d, c::SUSPENDED), ("True", "Suspended"));
        assert_eq!(d.status.restarts, 0);
        let mut t = with(t, &d);
        let d = decide_at(&t, &[], 60);
        assert!(d.create.is_empty() && d.delete.is_empty());
        assert_eq!(d.requeue, None);

        t.spec.suspend = Some(false);
        let d = decide_at(&t, &[], 70);
        assert_eq!(d.create, [0, 1]);
        assert_eq!(condition(&d, c::SUSPENDED), ("False", "Resumed"));
        assert_eq!((d.status.restarts, d.status.attempt), (0, 0));
    }

    #[test]
    fn a_queued_training_creates_no_workers_until_kueue_admits_it() {
        let t = training(gpu_spec());
        let pending = QueueState::Pending("insufficient unused quota for nvidia.com/gpu".into());
        let d = decide_queued(&t, &[], 0, pending);
        assert!(d.create.is_empty());
        assert_eq!(d.status.phase, Some(Phase::Queued));
        assert_eq!(condition(&d, c::ADMITTED), ("False", "Pending"));
        assert!(
            message(&d)
                .contains("waiting for quota in LocalQueue team-a: insufficient unused quota"),
            "{}",
            message(&d)
        );
        assert!(!d.release_quota);
        assert_eq!(d.requeue, None, "Kueue's changes to the Workload wake it");
        let missing = QueueState::NoWorkload("WorkloadPriorityClass urgent does not exist".into());
        let d2 = decide_queued(&t, &[], 0, missing);
        assert_eq!(condition(&d2, c::ADMITTED), ("False", "NoWorkload"));
        assert_eq!(d2.requeue, Some(DATASET_REQUEUE));
        let t = with(t, &d);
        let d = decide_queued(&t, &[], 5, admitted());
        assert_eq!(d.create, [0, 1]);
        assert_eq!(condition(&d, c::ADMITTED), ("True", "Admitted"));
        assert!(conditions::get(&d.status.conditions, c::ADMITTED)
            .unwrap()
            .message
            .contains("ClusterQueue gpus"),);
        assert_eq!(d.status.phase, Some(Phase::Pending));
    }

    #[test]
    fn a_preempted_training_checkpoints_gives_the_quota_back_and_resumes_when_readmitted() {
        let t = training(gpu_spec());
        let t = with(t.clone(), &decide_queued(&t, &[], 0, admitted()));
        let pods = vec![
            running(pod(&t, 0, 0), "10.0.0.1"),
            running(pod(&t, 1, 0), "10.0.0.2"),
        ];
        let t = with(t.clone(), &decide_queued(&t, &pods, 5, admitted()));
        assert_eq!(t.status.as_ref().unwrap().phase, Some(Phase::Running));

        // Kueue preempts it: the workers go (SIGTERM), the quota is still held meanwhile.
        let d = decide_queued(&t, &pods, 50, preempted(true));
        assert_eq!(d.delete, ["demo-worker-0", "demo-worker-1"]);
        assert_eq!(d.status.phase, Some(Phase::Queued));
        assert_eq!(condition(&d, c::ADMITTED), ("False", "Preempted"));
        assert_eq!(condition(&d, c::RUNNING), ("False", "Queued"));
        assert!(!d.release_quota, "not while the trainers still run");
        assert_eq!(d.requeue, Some(STOPPING_REQUEUE));
        let t = with(t, &d);

        // Rank 0 saved a checkpoint on SIGTERM and said so.
        let stopping = vec![
            terminated(
                deleting(pods[0].clone()),
                TRAINER_CONTAINER,
                0,
                r#"{"step": 168, "checkpoint": "/checkpoints/step-000000168", "complete": false, "stop_reason": "signal"}"#,
            ),
            deleting(pods[1].clone()),
        ];
        let d = decide_queued(&t, &stopping, 52, preempted(true));
        assert_eq!(
            d.status.latest_checkpoint.as_deref(),
            Some("/checkpoints/step-000000168")
        );
        assert!(!d.release_quota, "worker 1 still runs");
        assert!(d.delete.is_empty(), "nothing deleted twice");
        let t = with(t, &d);

        // All stopped: the quota goes back to Kueue, once.
        let d = decide_queued(&t, &[], 54, preempted(true));
        assert!(d.release_quota && d.create.is_empty());
        let t = with(t, &d);
        let d = decide_queued(&t, &[], 56, preempted(false));
        assert!(!d.release_quota && d.create.is_empty());
        assert_eq!(d.status.phase, Some(Phase::Queued));
        let t = with(t, &d);

        // Readmitted: the same attempt starts again from the checkpoint, no restart counted.
        let d = decide_queued(&t, &[], 90, admitted());
        assert_eq!(d.create, [0, 1]);
        assert_eq!((d.status.attempt, d.status.restarts), (0, 0));
        assert_eq!(
            d.status.latest_checkpoint.as_deref(),
            Some("/checkpoints/step-000000168")
        );
        assert_eq!(d.status.progress.as_ref().unwrap().step, 168);
    }

    #[test]
    fn a_suspended_queued_training_gives_its_quota_back_once_stopped() {
        let (t, pods) = running_gpu_training();
        let mut t = t;
        t.spec.suspend = Some(true);
        let deactivated = QueueState::Evicted {
            reason: "Deactivated".into(),
            message: "The workload is deactivated".into(),
            reserved: true,
        };
        let d = decide_queued(&t, &pods, 60, deactivated.clone());
        assert_eq!(d.status.phase, Some(Phase::Suspended));
        assert!(!d.release_quota);
        let d = decide_queued(&t, &[], 62, deactivated);
        assert!(d.release_quota);
    }

    #[test]
    fn suspend_records_the_checkpoint_of_the_sigterm() {
        let (t, pods) = running_gpu_training();
        let mut t = t;
        t.spec.suspend = Some(true);
        let stopped = vec![
            terminated(
                deleting(pods[0].clone()),
                TRAINER_CONTAINER,
                0,
                r#"{"step": 168, "checkpoint": "/checkpoints/step-000000168", "complete": false, "stop_reason": "signal"}"#,
            ),
            deleting(pods[1].clone()),
        ];
        let d = decide_at(&t, &stopped, 60);
        assert_eq!(d.status.phase, Some(Phase::Suspended));
        assert_eq!(
            d.status.latest_checkpoint.as_deref(),
            Some("/checkpoints/step-000000168")
        );
    }
}
