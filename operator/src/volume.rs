//! The checkpoint volume's one decision: from the claim the API server holds under
//! `<name>-checkpoints` (if any) and what the status remembers of it, whether the operator makes
//! a claim, whether new workers may start, what `CheckpointVolumeReady` says, and whether
//! checkpoints were lost. Pure; `controller` reads the claim and its StorageClass.
//!
//! Two promises: the operator never takes over, changes or deletes a claim it did not make
//! (`ownership`), and it never starts a training over from step 0 on a new, empty claim by itself
//! once it has seen checkpoints on one: a claim that is being deleted, gone, or replaced is a loss
//! it says, and only the annotation `charlm.dev/restart-from-scratch` set to the lost claim's uid
//! starts it over.

use k8s_openapi::api::core::v1::PersistentVolumeClaim;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::ResourceExt;

use crate::conditions::{FALSE, TRUE, UNKNOWN};
use crate::crd::{CharLMTraining, CharLMTrainingStatus, LostCheckpoints};
use crate::ownership::{conflict_message, earlier_message, ownership, Ownership};
use crate::resources::{pod_name, pvc_name, TRAINING_LABEL};

/// The annotation that starts a training whose checkpoints were lost over from step 0; its value
/// must be `status.lostCheckpoints.restartToken`.
pub const RESTART_FROM_SCRATCH: &str = "charlm.dev/restart-from-scratch";

/// What the API server holds under the checkpoint claim's name.
#[derive(Clone, Debug, PartialEq)]
pub enum Claim {
    Absent,
    Present(ClaimFacts),
}

#[derive(Clone, Debug, PartialEq)]
pub struct ClaimFacts {
    pub uid: String,
    pub ownership: Ownership,
    pub deleting_since: Option<Time>,
    /// `status.phase`: Pending, Bound or Lost.
    pub phase: Option<String>,
    pub volume: Option<String>,
    pub storage_class: Option<String>,
}

impl ClaimFacts {
    pub fn of(pvc: &PersistentVolumeClaim, training: &CharLMTraining) -> Self {
        let spec = pvc.spec.as_ref();
        ClaimFacts {
            uid: pvc.uid().unwrap_or_default(),
            ownership: ownership(&pvc.metadata, training),
            deleting_since: pvc.metadata.deletion_timestamp.clone(),
            phase: pvc.status.as_ref().and_then(|s| s.phase.clone()),
            volume: spec.and_then(|s| s.volume_name.clone()),
            storage_class: spec.and_then(|s| s.storage_class_name.clone()),
        }
    }

    pub fn bound(&self) -> bool {
        self.phase.as_deref() == Some("Bound")
    }
}

/// The StorageClass to look up: the one the claim names while it waits for a volume, or, with no
/// claim yet, the one the spec names (so that no worker is made for a claim that cannot be).
pub fn class_to_check(
    pvc: Option<&PersistentVolumeClaim>,
    training: &CharLMTraining,
) -> Option<String> {
    let class = match pvc {
        None => training.spec.checkpoint.storage_class_name.clone()?,
        Some(pvc) => {
            let bound = pvc.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Bound");
            if bound || pvc.metadata.deletion_timestamp.is_some() {
                return None;
            }
            pvc.spec.as_ref()?.storage_class_name.clone()?
        }
    };
    (!class.is_empty()).then_some(class)
}

/// What the reconciler does about the volume.
#[derive(Clone, Debug, PartialEq)]
pub struct Verdict {
    /// `CheckpointVolumeReady`: status, reason, message.
    pub condition: (&'static str, &'static str, String),
    /// Make the claim (after the decision, before any worker).
    pub create_claim: bool,
    /// Why no new workers may start (its reason is the condition's); `None`: they may.
    pub block: Option<String>,
    /// The claim's uid to remember in `status.checkpointPvcUid`.
    pub record_uid: Option<String>,
    /// Checkpoints lost just now, for `status.lostCheckpoints`.
    pub new_loss: Option<LostCheckpoints>,
    /// The user's word came: forget the lost checkpoints and start from step 0.
    pub start_over: bool,
}

impl Verdict {
    fn new(status: &'static str, reason: &'static str, message: String) -> Self {
        Verdict {
            condition: (status, reason, message),
            create_claim: false,
            block: None,
            record_uid: None,
            new_loss: None,
            start_over: false,
        }
    }

    fn blocking(mut self) -> Self {
        self.block = Some(self.condition.2.clone());
        self
    }
}

/// `class_missing`: the StorageClass of `class_to_check` does not exist.
pub fn assess(
    training: &CharLMTraining,
    status: &CharLMTrainingStatus,
    claim: &Claim,
    class_missing: bool,
    now: &Time,
) -> Verdict {
    let name = training.name_any();
    let claim_name = pvc_name(&name);
    let ended = status.phase.is_some_and(|p| p.is_terminal());
    let facts = match claim {
        Claim::Present(f) => Some(f),
        Claim::Absent => None,
    };

    if let Some(lost) = &status.lost_checkpoints {
        return after_loss(training, lost, facts, class_missing, ended);
    }

    // The operator saw checkpoints on a claim (its uid is recorded; or, from before that record
    // existed, the status names a checkpoint) and that claim is going or gone: a loss.
    let known = status.checkpoint_pvc_uid.as_deref();
    let had_checkpoints = known.is_some() || status.latest_checkpoint.is_some();
    let lose = |how: String, uid: Option<&str>| {
        let lost = LostCheckpoints {
            claim_name: claim_name.clone(),
            claim_uid: uid.map(str::to_string),
            detected_time: now.clone(),
            latest_checkpoint: status.latest_checkpoint.clone(),
            best_val_bpc: status.best_val_bpc,
            best_step: status.best_step,
            step: status.progress.as_ref().map(|p| p.step),
            restart_token: uid.map_or_else(|| claim_name.clone(), str::to_string),
        };
        let mut v = Verdict::new(FALSE, "CheckpointsLost", String::new());
        v.condition.2 = lost_message(training, &lost, &how, ended);
        v.new_loss = Some(lost);
        v.blocking()
    };

    let Some(f) = facts else {
        if had_checkpoints {
            return lose(
                format!("the checkpoint claim {claim_name} was deleted"),
                known,
            );
        }
        if ended {
            return Verdict::new(
                UNKNOWN,
                "NoClaim",
                format!(
                    "no checkpoint claim {claim_name}; the training has ended, so none is made"
                ),
            );
        }
        // Made even for a missing class, so that it is provisioned once the class exists.
        let mut v = match &training.spec.checkpoint.storage_class_name {
            Some(class) if class_missing => class_not_found(class, &claim_name),
            _ => Verdict::new(
                UNKNOWN,
                "Creating",
                format!("creating the checkpoint claim {claim_name}"),
            ),
        };
        v.create_claim = true;
        return v;
    };

    let mine = matches!(f.ownership, Ownership::Ours | Ownership::Retained);
    if let Some(since) = &f.deleting_since {
        if mine && had_checkpoints && known.is_none_or(|k| k == f.uid) {
            let how = going(training, &claim_name, since);
            return lose(how, Some(&f.uid));
        }
        if had_checkpoints {
            return lose(
                format!("the checkpoint claim {claim_name} was deleted"),
                known,
            );
        }
        return Verdict::new(
            FALSE,
            "WaitingForClaim",
            format!(
                "PersistentVolumeClaim {claim_name} is being deleted (since {}); a new checkpoint \
                 claim of that name is made once it is gone",
                since.0
            ),
        )
        .blocking();
    }

    match &f.ownership {
        Ownership::Ours | Ownership::Retained => {
            if let Some(k) = known.filter(|k| *k != f.uid) {
                return lose(
                    format!(
                        "the checkpoint claim {claim_name} (uid {k}) was deleted, and another claim \
                         of that name (uid {}, empty as far as the operator knows) took its place",
                        f.uid
                    ),
                    Some(k),
                );
            }
            ready(f, &claim_name, known.is_none(), class_missing)
        }
        Ownership::EarlierTraining(uid) if !had_checkpoints => Verdict::new(
            FALSE,
            "WaitingForClaim",
            earlier_message("PersistentVolumeClaim", &claim_name, uid),
        )
        .blocking(),
        Ownership::Foreign(whose) if !had_checkpoints => Verdict::new(
            FALSE,
            "ClaimConflict",
            format!(
                "{}; to hand it to this training on purpose (it then resumes from the checkpoints \
                 on it, and deletes the claim with the training unless checkpoint.retainOnDelete), \
                 label it app.kubernetes.io/managed-by=charlm-operator and {TRAINING_LABEL}={name}",
                conflict_message("PersistentVolumeClaim", &claim_name, whose, &name)
            ),
        )
        .blocking(),
        Ownership::EarlierTraining(_) | Ownership::Foreign(_) => lose(
            format!(
                "the checkpoint claim {claim_name} was deleted, and a claim of that name that is \
                 not this training's (uid {}) took its place",
                f.uid
            ),
            known,
        ),
    }
}

fn class_not_found(class: &str, claim_name: &str) -> Verdict {
    Verdict::new(
        FALSE,
        "StorageClassNotFound",
        format!(
            "StorageClass {class} of the checkpoint claim {claim_name} does not exist, so no volume \
             can be made for it, and no workers start (they could not be placed): create \
             StorageClass {class}, or delete this training and create it with \
             spec.checkpoint.storageClassName set to an existing class (kubectl get storageclass) \
             or left out for the default; the operator looks again at a growing interval, at most \
             every 10 minutes"
        ),
    )
    .blocking()
}

/// A claim of this training's, not being deleted: ready, provisioning, or without a class.
fn ready(f: &ClaimFacts, claim_name: &str, record: bool, class_missing: bool) -> Verdict {
    let class = f
        .storage_class
        .as_deref()
        .unwrap_or("the cluster's default");
    let mut v = if class_missing {
        class_not_found(class, claim_name)
    } else if f.bound() {
        Verdict::new(
            TRUE,
            "Bound",
            format!(
                "checkpoint claim {claim_name} is bound to volume {}",
                f.volume.as_deref().unwrap_or("?")
            ),
        )
    } else {
        Verdict::new(
            UNKNOWN,
            "Provisioning",
            format!(
                "checkpoint claim {claim_name} is {} and waits for a volume of StorageClass \
                 {class} (a WaitForFirstConsumer class binds it once worker 0 is placed)",
                f.phase.as_deref().unwrap_or("Pending")
            ),
        )
    };
    if record {
        v.record_uid = Some(f.uid.clone());
    }
    v
}

/// Once a loss is recorded: wait for the user's word, then start over on a new claim.
fn after_loss(
    training: &CharLMTraining,
    lost: &LostCheckpoints,
    facts: Option<&ClaimFacts>,
    class_missing: bool,
    ended: bool,
) -> Verdict {
    let name = training.name_any();
    let claim_name = &lost.claim_name;
    let word = training
        .annotations()
        .get(RESTART_FROM_SCRATCH)
        .map(|w| w.trim());
    let still_going = facts.is_some_and(|f| f.deleting_since.is_some());
    if ended || word != Some(lost.restart_token.as_str()) {
        let how = match facts {
            Some(f) if f.deleting_since.is_some() && Some(&f.uid) == lost.claim_uid.as_ref() => {
                going(training, claim_name, f.deleting_since.as_ref().unwrap())
            }
            _ => format!("the checkpoint claim {claim_name} was deleted"),
        };
        return Verdict::new(
            FALSE,
            "CheckpointsLost",
            lost_message(training, lost, &how, ended),
        )
        .blocking();
    }
    let started_over = format!(
        "starting over from step 0, as {RESTART_FROM_SCRATCH}={} asks (the lost checkpoints were \
         {})",
        lost.restart_token,
        what_was_lost(lost)
    );
    match facts {
        None => {
            let mut v = match &training.spec.checkpoint.storage_class_name {
                Some(class) if class_missing => class_not_found(class, claim_name),
                _ => Verdict::new(
                    UNKNOWN,
                    "StartingOver",
                    format!("{started_over}: creating a new, empty checkpoint claim {claim_name}"),
                ),
            };
            v.create_claim = true;
            v.start_over = true;
            v
        }
        Some(_) if still_going => Verdict::new(
            FALSE,
            "WaitingForClaim",
            format!(
                "{started_over}: waiting until the deleted claim {claim_name} is gone (it goes \
                 once no pod uses it)"
            ),
        )
        .blocking(),
        Some(f) => match &f.ownership {
            Ownership::Ours | Ownership::Retained => {
                let mut v = ready(f, claim_name, true, class_missing);
                v.start_over = true;
                v
            }
            Ownership::EarlierTraining(uid) => Verdict::new(
                FALSE,
                "WaitingForClaim",
                earlier_message("PersistentVolumeClaim", claim_name, uid),
            )
            .blocking(),
            Ownership::Foreign(whose) => Verdict::new(
                FALSE,
                "ClaimConflict",
                format!(
                    "{started_over}, but {}",
                    conflict_message("PersistentVolumeClaim", claim_name, whose, &name)
                ),
            )
            .blocking(),
        },
    }
}

/// How a claim is going while it is being deleted, with what can still be saved from it.
fn going(training: &CharLMTraining, claim_name: &str, since: &Time) -> String {
    let ns = training.namespace().unwrap_or_default();
    let pod = pod_name(&training.name_any(), 0);
    format!(
        "the checkpoint claim {claim_name} is being deleted (since {}) and goes once no pod uses \
         it; while worker 0 runs it still mounts it at /checkpoints, so copy out what you need now \
         (kubectl cp -c trainer {ns}/{pod}:/checkpoints/best ./best)",
        since.0
    )
}

fn what_was_lost(lost: &LostCheckpoints) -> String {
    let latest = lost.latest_checkpoint.as_deref().unwrap_or("none named");
    let best = match (lost.best_val_bpc, lost.best_step) {
        (Some(b), Some(s)) => format!("best {b:.4} bpc at step {s}"),
        (Some(b), None) => format!("best {b:.4} bpc"),
        _ => "no best yet".into(),
    };
    let step = lost
        .step
        .map_or(String::new(), |s| format!(", reached step {s}"));
    format!("newest {latest}, {best}{step}")
}

fn lost_message(
    training: &CharLMTraining,
    lost: &LostCheckpoints,
    how: &str,
    ended: bool,
) -> String {
    let name = training.name_any();
    let ns = training.namespace().unwrap_or_default();
    let what = what_was_lost(lost);
    if ended {
        return format!(
            "{how}: the checkpoints of this ended training are lost with it ({what}; \
             status.lostCheckpoints keeps what they were)"
        );
    }
    format!(
        "{how}: its checkpoints are lost ({what}; status.lostCheckpoints keeps what they were). \
         The operator does not start from step 0 by itself, so no new workers start: to train \
         again from step 0 on a new, empty claim, run `kubectl annotate charlmtraining {name} -n \
         {ns} --overwrite {RESTART_FROM_SCRATCH}={}`; otherwise delete the training",
        lost.restart_token
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{Phase, ProgressStatus};
    use crate::resources::testing::{cpu_spec, training};
    use k8s_openapi::jiff::Timestamp;

    fn now() -> Time {
        Time(Timestamp::from_second(1_700_000_000).unwrap())
    }

    fn facts(uid: &str, ownership: Ownership) -> ClaimFacts {
        ClaimFacts {
            uid: uid.into(),
            ownership,
            deleting_since: None,
            phase: Some("Bound".into()),
            volume: Some("pv-1".into()),
            storage_class: Some("standard".into()),
        }
    }

    /// A status that has seen claim `uid` and a checkpoint on it.
    fn seen(uid: &str) -> CharLMTrainingStatus {
        CharLMTrainingStatus {
            phase: Some(Phase::Running),
            checkpoint_pvc_uid: Some(uid.into()),
            latest_checkpoint: Some("/checkpoints/step-000000400".into()),
            best_val_bpc: Some(1.25),
            best_step: Some(300),
            progress: Some(ProgressStatus {
                step: 420,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn a_new_training_makes_its_claim_and_remembers_it_once_seen() {
        let t = training(cpu_spec());
        let v = assess(&t, &Default::default(), &Claim::Absent, false, &now());
        assert!(v.create_claim && v.block.is_none() && v.new_loss.is_none());
        let v = assess(
            &t,
            &Default::default(),
            &Claim::Present(facts("c1", Ownership::Ours)),
            false,
            &now(),
        );
        assert_eq!((v.condition.0, v.condition.1), (TRUE, "Bound"));
        assert_eq!(v.record_uid.as_deref(), Some("c1"));
        assert!(!v.create_claim && v.block.is_none());
        // A retained claim of an earlier training of this name is resumed from, as before.
        let v = assess(
            &t,
            &Default::default(),
            &Claim::Present(facts("r1", Ownership::Retained)),
            false,
            &now(),
        );
        assert_eq!(v.record_uid.as_deref(), Some("r1"));
        assert!(v.block.is_none());
    }

    #[test]
    fn someone_elses_claim_of_the_name_is_a_conflict_and_left_alone() {
        let t = training(cpu_spec());
        let whose = "it has no owner reference to training demo".to_string();
        let v = assess(
            &t,
            &Default::default(),
            &Claim::Present(facts("u1", Ownership::Foreign(whose))),
            false,
            &now(),
        );
        assert_eq!((v.condition.0, v.condition.1), (FALSE, "ClaimConflict"));
        let msg = v.block.clone().unwrap();
        for needle in [
            "PersistentVolumeClaim demo-checkpoints already exists",
            "leaves it untouched",
            "delete training demo and create it under another name",
            "charlm.dev/training=demo",
        ] {
            assert!(msg.contains(needle), "{needle:?} in {msg}");
        }
        assert!(!v.create_claim && v.record_uid.is_none());
    }

    #[test]
    fn a_missing_storage_class_blocks_the_workers_and_names_the_class() {
        let mut t = training(cpu_spec());
        t.spec.checkpoint.storage_class_name = Some("fast-ssd".into());
        // No claim yet: it is made (to be provisioned once the class exists), no workers.
        let v = assess(&t, &Default::default(), &Claim::Absent, true, &now());
        assert!(v.create_claim);
        assert_eq!(
            (v.condition.0, v.condition.1),
            (FALSE, "StorageClassNotFound")
        );
        assert!(v.block.unwrap().contains("StorageClass fast-ssd"));
        let mut f = facts("c1", Ownership::Ours);
        f.phase = Some("Pending".into());
        f.storage_class = Some("fast-ssd".into());
        let v = assess(
            &t,
            &Default::default(),
            &Claim::Present(f.clone()),
            true,
            &now(),
        );
        assert_eq!(
            (v.condition.0, v.condition.1),
            (FALSE, "StorageClassNotFound")
        );
        assert!(v.block.unwrap().contains("StorageClass fast-ssd"));
        let v = assess(&t, &Default::default(), &Claim::Present(f), false, &now());
        assert_eq!((v.condition.0, v.condition.1), (UNKNOWN, "Provisioning"));
        assert!(
            v.block.is_none(),
            "a claim waiting for its volume does not block"
        );
    }

    #[test]
    fn the_class_looked_up_is_the_claims_while_it_waits_or_the_specs_before_it_exists() {
        let mut t = training(cpu_spec());
        assert_eq!(class_to_check(None, &t), None, "the default class");
        t.spec.checkpoint.storage_class_name = Some("fast-ssd".into());
        assert_eq!(class_to_check(None, &t).as_deref(), Some("fast-ssd"));
        let mut pvc = crate::resources::checkpoint_pvc(&t);
        pvc.spec.as_mut().unwrap().storage_class_name = Some("standard".into());
        assert_eq!(class_to_check(Some(&pvc), &t).as_deref(), Some("standard"));
        pvc.status = Some(k8s_openapi::api::core::v1::PersistentVolumeClaimStatus {
            phase: Some("Bound".into()),
            ..Default::default()
        });
        assert_eq!(
            class_to_check(Some(&pvc), &t),
            None,
            "bound: nothing to wait for"
        );
    }

    #[test]
    fn a_claim_gone_after_checkpoints_is_a_loss_and_no_new_claim() {
        let t = training(cpu_spec());
        let v = assess(&t, &seen("c1"), &Claim::Absent, false, &now());
        assert!(!v.create_claim, "no empty claim in place of the lost one");
        assert_eq!((v.condition.0, v.condition.1), (FALSE, "CheckpointsLost"));
        let lost = v.new_loss.clone().unwrap();
        assert_eq!(lost.claim_uid.as_deref(), Some("c1"));
        assert_eq!(lost.restart_token, "c1");
        assert_eq!(
            lost.latest_checkpoint.as_deref(),
            Some("/checkpoints/step-000000400")
        );
        assert_eq!(
            (lost.best_val_bpc, lost.best_step, lost.step),
            (Some(1.25), Some(300), Some(420))
        );
        let msg = v.block.unwrap();
        assert!(
            msg.contains("kubectl annotate charlmtraining demo -n team-a --overwrite charlm.dev/restart-from-scratch=c1"),
            "{msg}"
        );
        // From before the uid was recorded: a checkpoint in the status is proof enough.
        let mut legacy = seen("c1");
        legacy.checkpoint_pvc_uid = None;
        let v = assess(&t, &legacy, &Claim::Absent, false, &now());
        assert_eq!(v.new_loss.unwrap().restart_token, "demo-checkpoints");
    }

    #[test]
    fn a_claim_being_deleted_is_a_loss_that_says_how_to_save_what_is_left() {
        let t = training(cpu_spec());
        let mut f = facts("c1", Ownership::Ours);
        f.deleting_since = Some(now());
        let v = assess(&t, &seen("c1"), &Claim::Present(f.clone()), false, &now());
        assert_eq!(v.condition.1, "CheckpointsLost");
        let msg = v.block.unwrap();
        assert!(msg.contains("is being deleted"), "{msg}");
        assert!(
            msg.contains("kubectl cp -c trainer team-a/demo-worker-0:/checkpoints/best ./best"),
            "{msg}"
        );
        // Before anything was seen on it, it is only a claim to wait for.
        let v = assess(&t, &Default::default(), &Claim::Present(f), false, &now());
        assert_eq!(v.condition.1, "WaitingForClaim");
        assert!(v.new_loss.is_none() && !v.create_claim);
    }

    #[test]
    fn a_replaced_claim_is_a_loss_too() {
        let t = training(cpu_spec());
        for ownership in [Ownership::Ours, Ownership::Foreign("someone's".into())] {
            let v = assess(
                &t,
                &seen("c1"),
                &Claim::Present(facts("c2", ownership)),
                false,
                &now(),
            );
            assert_eq!(v.condition.1, "CheckpointsLost");
            assert_eq!(v.new_loss.unwrap().restart_token, "c1");
            assert!(v.record_uid.is_none(), "the replacement is not remembered");
        }
    }

    /// The status after a loss of claim c1.
    fn after_loss_of_c1(t: &CharLMTraining) -> CharLMTrainingStatus {
        let v = assess(t, &seen("c1"), &Claim::Absent, false, &now());
        CharLMTrainingStatus {
            phase: Some(Phase::Restarting),
            lost_checkpoints: v.new_loss,
            ..Default::default()
        }
    }

    #[test]
    fn only_the_word_for_this_loss_starts_over() {
        let mut t = training(cpu_spec());
        let st = after_loss_of_c1(&t);
        for word in [None, Some("true"), Some("c0")] {
            if let Some(w) = word {
                t.metadata.annotations =
                    Some([(RESTART_FROM_SCRATCH.to_string(), w.to_string())].into());
            }
            let v = assess(&t, &st, &Claim::Absent, false, &now());
            assert!(!v.create_claim && !v.start_over, "{word:?}");
            assert_eq!(v.condition.1, "CheckpointsLost");
        }
        t.metadata.annotations =
            Some([(RESTART_FROM_SCRATCH.to_string(), "c1".to_string())].into());
        let v = assess(&t, &st, &Claim::Absent, false, &now());
        assert!(v.create_claim && v.start_over && v.block.is_none());
        assert_eq!(v.condition.1, "StartingOver");
        // The claim made for it is then remembered.
        let v = assess(
            &t,
            &st,
            &Claim::Present(facts("c2", Ownership::Ours)),
            false,
            &now(),
        );
        assert!(v.start_over && v.block.is_none());
        assert_eq!(v.record_uid.as_deref(), Some("c2"));
        // A claim still going is waited for; someone else's is a conflict.
        let mut going = facts("c1", Ownership::Ours);
        going.deleting_since = Some(now());
        let v = assess(&t, &st, &Claim::Present(going), false, &now());
        assert!(!v.start_over && v.block.is_some() && !v.create_claim);
        let v = assess(
            &t,
            &st,
            &Claim::Present(facts("x", Ownership::Foreign("someone's".into()))),
            false,
            &now(),
        );
        assert_eq!(v.condition.1, "ClaimConflict");
        assert!(!v.start_over);
    }

    #[test]
    fn an_ended_training_makes_no_claim_and_records_a_loss() {
        let t = training(cpu_spec());
        let ended = CharLMTrainingStatus {
            phase: Some(Phase::Succeeded),
            ..Default::default()
        };
        let v = assess(&t, &ended, &Claim::Absent, false, &now());
        assert!(!v.create_claim);
        let mut st = seen("c1");
        st.phase = Some(Phase::Succeeded);
        let v = assess(&t, &st, &Claim::Absent, false, &now());
        assert!(!v.create_claim);
        assert!(v.new_loss.is_some());
        assert!(!v.condition.2.contains("annotate"), "{}", v.condition.2);
    }
}
