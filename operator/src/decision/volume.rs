//! The checkpoint claim in the decision: made before any worker, lost (never a silent restart
//! from step 0), started over on the user's word; and objects of the training's names that are
//! someone else's, which hold every worker back.

use std::time::Duration;

use super::{Decider, MAX_BACKOFF, RECHECK_MIN};
use crate::conditions::{self, FALSE};
use crate::crd::condition as cond;
use crate::volume;

impl Decider<'_> {
    /// The checkpoint claim: whether to make it, whether it is lost, and whether new workers may
    /// start on it (`volume::assess`).
    pub(super) fn checkpoint_volume(&mut self) {
        let v = volume::assess(
            self.o.training,
            &self.decision.status,
            &self.o.objects.claim,
            self.o.objects.class_missing,
            &self.now,
        );
        if v.start_over {
            self.start_over();
        }
        if let Some(lost) = v.new_loss {
            self.st().lost_checkpoints = Some(lost);
        }
        if let Some(uid) = v.record_uid {
            self.st().checkpoint_pvc_uid = Some(uid);
        }
        let (status, reason, message) = v.condition;
        self.set(cond::CHECKPOINT_VOLUME_READY, status, reason, message);
        self.decision.create_claim = v.create_claim;
        self.blocked = v
            .block
            .map(|msg| (cond::CHECKPOINT_VOLUME_READY, reason, msg));
        if self.blocked.is_none() && !self.o.objects.conflicts.is_empty() {
            let msg = self.o.objects.conflicts.join("; ");
            self.blocked = Some((cond::PODS_READY, "NameConflict", msg));
        }
    }

    /// The user's word after a loss: forget the lost checkpoints and what came from them; the
    /// next workers start from step 0 on a new claim.
    pub(super) fn start_over(&mut self) {
        let st = self.st();
        st.lost_checkpoints = None;
        st.checkpoint_pvc_uid = None;
        st.latest_checkpoint = None;
        st.best_val_bpc = None;
        st.best_step = None;
        st.progress = None;
        st.eta = None;
        st.loss_history.clear();
        st.damaged_checkpoints.clear();
        for type_ in [cond::PAST_BEST, cond::CHECKPOINT_DAMAGED] {
            if conditions::get(&self.decision.status.conditions, type_).is_some() {
                self.set(type_, FALSE, "StartedOver", "started over from step 0");
            }
        }
    }

    /// After a loss, reports still name checkpoints on the lost claim (worker 0 running on a
    /// claim being deleted, or its final report): they go into `lostCheckpoints`, not the status.
    pub(super) fn forget_lost(&mut self) {
        let st = &mut self.decision.status;
        let Some(lost) = st.lost_checkpoints.as_mut() else {
            return;
        };
        if let Some(latest) = st.latest_checkpoint.take() {
            lost.latest_checkpoint = Some(latest);
        }
        if let Some(best) = st.best_val_bpc.take() {
            lost.best_val_bpc = Some(best);
            lost.best_step = st.best_step;
        }
        st.best_step = None;
        if let Some(p) = st.progress.as_mut() {
            lost.step = Some(p.step).max(lost.step);
            p.checkpoint = None;
            p.best_val_bpc = None;
            p.best_step = None;
        }
    }

    /// When to look again at a training waiting on something the operator does not watch (a
    /// StorageClass, someone else's object): as long again as it has waited, from 10 s to 10 min.
    pub(super) fn recheck(&self, type_: &str) -> Duration {
        let since = conditions::get(&self.decision.status.conditions, type_)
            .map(|c| c.last_transition_time.0);
        let waited = since.map_or(0, |t| self.o.now.duration_since(t).as_secs().max(0));
        Duration::from_secs(
            waited.clamp(RECHECK_MIN.as_secs() as i64, MAX_BACKOFF.as_secs() as i64) as u64,
        )
    }
}

#[cfg(test)]
mod tests {
    use crate::decision::testing::*;

    #[test]
    fn a_new_training_has_its_claim_made_before_its_workers() {
        let t = training(gpu_spec());
        let d = decide_on(&t, &[], 0, no_claim(), None);
        assert!(d.create_claim);
        assert_eq!(d.create, [0, 1]);
        assert_eq!(d.status.checkpoint_pvc_uid, None, "remembered once seen");
    }

    #[test]
    fn a_checkpoint_claim_deleted_mid_run_never_restarts_from_step_zero_by_itself() {
        let (t, pods) = running_gpu_training();
        let report = r#"{"step": 420, "checkpoint": "/checkpoints/step-000000400", "best_val_bpc": 1.25, "best_step": 300, "complete": false}"#;
        let d = decide_on(&t, &pods, 40, claim_bound(), Some(report));
        assert_eq!(d.status.checkpoint_pvc_uid.as_deref(), Some("claim-1"));
        let t = with(t, &d);

        // `kubectl delete pvc`: the claim waits for worker 0 (pvc-protection), and the gang
        // trains on; the status no longer names what is on it as if it would stay.
        let going = claim(|f| f.deleting_since = Some(Time(at(50))));
        let d = decide_on(&t, &pods, 60, going.clone(), Some(report));
        assert!(d.delete.is_empty() && d.create.is_empty() && !d.create_claim);
        assert_eq!(d.status.phase, Some(Phase::Running));
        assert_eq!(
            condition(&d, c::CHECKPOINT_VOLUME_READY),
            ("False", "CheckpointsLost")
        );
        let lost = d.status.lost_checkpoints.clone().unwrap();
        assert_eq!(
            lost.latest_checkpoint.as_deref(),
            Some("/checkpoints/step-000000400")
        );
        assert_eq!((lost.best_val_bpc, lost.best_step), (Some(1.25), Some(300)));
        assert_eq!(lost.restart_token, "claim-1");
        let st = &d.status;
        assert_eq!(
            (st.latest_checkpoint.as_ref(), st.best_val_bpc, st.best_step),
            (None, None, None)
        );
        assert_eq!(st.progress.as_ref().unwrap().checkpoint, None);
        let t = with(t, &d);

        // A worker fails: the gang restarts...
        let mut failed = pods.clone();
        failed[1] = terminated(pod(&t, 1, 0), TRAINER_CONTAINER, 1, "crash");
        let d = decide_on(&t, &failed, 70, going, None);
        assert_eq!(d.status.phase, Some(Phase::Restarting));
        let t = with(t, &d);
        // ... but once the claim is gone, no empty claim and no workers from step 0.
        for now in [200, 5_000] {
            let d = decide_on(&t, &[], now, no_claim(), None);
            assert!(!d.create_claim && d.create.is_empty(), "at {now}");
            assert_eq!(condition(&d, c::PODS_READY), ("False", "CheckpointsLost"));
            let msg = d.status.message.clone().unwrap();
            assert!(msg.contains("its checkpoints are lost"), "{msg}");
            assert!(
                msg.contains("charlm.dev/restart-from-scratch=claim-1"),
                "{msg}"
            );
            assert!(d.requeue.is_some_and(|r| r <= MAX_BACKOFF));
        }

        // The user's word for this loss: a new claim and workers, from step 0.
        let mut t = t;
        t.metadata.annotations = Some(
            [(
                volume::RESTART_FROM_SCRATCH.to_string(),
                "claim-1".to_string(),
            )]
            .into(),
        );
        let d = decide_on(&t, &[], 300, no_claim(), None);
        assert!(d.create_claim);
        assert_eq!(d.create, [0, 1]);
        let st = &d.status;
        assert!(st.lost_checkpoints.is_none() && st.checkpoint_pvc_uid.is_none());
        assert!(st.progress.is_none() && st.loss_history.is_empty());
        assert_eq!(
            condition(&d, c::CHECKPOINT_VOLUME_READY),
            ("Unknown", "StartingOver")
        );
        // The new claim is remembered; the word left on the training approves nothing more.
        let t = with(t, &d);
        let new = claim(|f| f.uid = "claim-2".into());
        let d = decide_on(&t, &[], 301, new, None);
        assert_eq!(d.status.checkpoint_pvc_uid.as_deref(), Some("claim-2"));
        let t = with(t, &d);
        let d = decide_on(&t, &[], 400, no_claim(), None);
        assert!(!d.create_claim && d.create.is_empty());
        assert_eq!(d.status.lost_checkpoints.unwrap().restart_token, "claim-2");
    }

    #[test]
    fn someone_elses_objects_block_the_workers_and_are_named() {
        let t = training(gpu_spec());
        let foreign = claim(|f| {
            f.ownership = crate::ownership::Ownership::Foreign("no owner reference".into())
        });
        let d = decide_on(&t, &[], 0, foreign, None);
        assert!(d.create.is_empty() && !d.create_claim);
        assert_eq!(condition(&d, c::PODS_READY), ("False", "ClaimConflict"));
        assert!(d.status.checkpoint_pvc_uid.is_none());

        let mut objects = claim_bound();
        objects
            .conflicts
            .push("Service demo-workers already exists and is not this training's".into());
        let d = decide_on(&t, &[], 0, objects.clone(), None);
        assert!(d.create.is_empty());
        assert_eq!(condition(&d, c::PODS_READY), ("False", "NameConflict"));
        assert!(d
            .status
            .message
            .clone()
            .unwrap()
            .contains("Service demo-workers"));
        assert_eq!(d.requeue, Some(RECHECK_MIN));
        // Looked at again as long as it has waited, at most every 10 minutes.
        let t = with(t, &d);
        assert_eq!(
            decide_on(&t, &[], 100, objects.clone(), None).requeue,
            Some(Duration::from_secs(100))
        );
        assert_eq!(
            decide_on(&t, &[], 5_000, objects, None).requeue,
            Some(MAX_BACKOFF)
        );
        // Gone: the workers start.
        let d = decide_on(&t, &[], 5_001, claim_bound(), None);
        assert_eq!(d.create, [0, 1]);
    }

    #[test]
    fn a_missing_storage_class_holds_no_gpus_and_backs_off() {
        let t = training(gpu_spec());
        let mut missing = claim(|f| {
            f.phase = Some("Pending".into());
            f.storage_class = Some("fast-ssd".into());
        });
        missing.class_missing = true;
        let d = decide_on(&t, &[], 0, missing.clone(), None);
        assert!(d.create.is_empty());
        assert_eq!(
            condition(&d, c::CHECKPOINT_VOLUME_READY),
            ("False", "StorageClassNotFound")
        );
        assert!(d
            .status
            .message
            .clone()
            .unwrap()
            .contains("StorageClass fast-ssd"));
        let t = with(t, &d);
        assert_eq!(
            decide_on(&t, &[], 45, missing, None).requeue,
            Some(Duration::from_secs(45))
        );
    }
}
