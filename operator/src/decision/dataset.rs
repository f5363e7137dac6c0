//! DatasetReady: what is true of the dataset the workers' init containers prepare.

use super::Decider;
use crate::conditions::{self, TRUE, UNKNOWN};
use crate::crd::condition as cond;

impl Decider<'_> {
    /// DatasetReady still says what is not known yet (Unknown): it is not settled by a success or
    /// a failure of the preparation, nor found missing.
    pub(super) fn dataset_unsettled(&self) -> bool {
        conditions::get(&self.decision.status.conditions, cond::DATASET_READY)
            .is_none_or(|c| c.status == UNKNOWN)
    }

    /// No worker prepares the dataset now: DatasetReady says so (and why), unless it is settled.
    pub(super) fn say_dataset_prepared(&mut self) {
        self.set(
            cond::DATASET_READY,
            TRUE,
            "Prepared",
            "every worker prepared the dataset",
        );
    }

    pub(super) fn dataset_waits(&mut self, why: &str) {
        if self.dataset_unsettled() {
            self.set(
                cond::DATASET_READY,
                UNKNOWN,
                WAITING_FOR_WORKERS,
                format!("not prepared yet: {why}"),
            );
        }
    }
}

/// DatasetReady's reason while no worker prepares the dataset yet.
pub(super) const WAITING_FOR_WORKERS: &str = "WaitingForWorkers";

/// The init containers that generate and prepare the dataset.
pub(super) fn is_preparation(container: &str) -> bool {
    container != crate::resources::TRAINER_CONTAINER
}

#[cfg(test)]
mod tests {
    use crate::decision::testing::*;

    #[test]
    fn a_missing_dataset_blocks_creation_with_a_message() {
        let t = training(gpu_spec());
        let d = decide(&Observed {
            dataset: DatasetCheck::Missing(
                "PersistentVolumeClaim texts (spec.dataset.pvc.claimName) not found in namespace team-a".into(),
            ),
            ..look(&t, &[], 0).observed
        });
        assert!(d.create.is_empty());
        assert_eq!(d.status.phase, Some(Phase::Pending));
        assert_eq!(
            condition(&d, c::DATASET_READY),
            ("False", "DatasetNotFound")
        );
        assert!(d.status.message.unwrap().contains("claimName"));
        assert_eq!(d.requeue, Some(DATASET_REQUEUE));
    }

    #[test]
    fn dataset_ready_says_preparing_only_while_a_worker_prepares() {
        let t = starting_gpu_training();
        let pods = vec![
            unschedulable(pod(&t, 0, 0), "0/6 nodes are available"),
            pod(&t, 1, 0),
        ];
        let d = decide_at(&t, &pods, 5);
        assert_eq!(
            condition(&d, c::DATASET_READY),
            ("Unknown", "WaitingForWorkers")
        );
        let dataset = conditions::get(&d.status.conditions, c::DATASET_READY).unwrap();
        assert!(
            dataset.message.contains("0/2 workers prepared it")
                && dataset.message.contains("0/6 nodes are available"),
            "{}",
            dataset.message
        );
        // A spec the API server refuses fails the training: nothing was prepared.
        let d = decide_with(&with(t, &d), &pods, 6, Some("no PriorityClass"));
        assert_eq!(condition(&d, c::DATASET_READY), ("False", "NotPrepared"));
        assert!(conditions::get(&d.status.conditions, c::DATASET_READY)
            .unwrap()
            .message
            .contains("failed (InvalidSpec)"));
    }

    #[test]
    fn a_failed_preparation_is_what_dataset_ready_says() {
        // A synthetic dataset: `generate` writes it before `prepare` reads it.
        let t = training(cpu_spec());
        let t = with(t.clone(), &decide_at(&t, &[], 0));
        let pods = vec![killed_init(pod(&t, 0, 0), "generate", 137, "OOMKilled")];
        let d = decide_at(&t, &pods, 5);
        assert_eq!(condition(&d, c::FAILED), ("True", "OOMKilled"));
        assert_eq!(
            condition(&d, c::DATASET_READY),
            ("False", "PreparationFailed")
        );
        let msg = message(&d);
        assert!(
            msg.contains("the init container generate ran out of memory")
                && msg.contains("spec.resources.limits.memory")
                && !msg.contains("deviceBatchSize (the micro-batch"),
            "{msg}"
        );
    }
}
