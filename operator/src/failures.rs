//! Failure rules (`spec.restartPolicy.rules`), in the spirit of JobSet's failure policy: why a
//! worker ended its attempt (a `FailureReason`, read from what Kubernetes says of its pod), and what
//! the training does about it (a `FailureAction`). Pure functions of plain data; the reconciler
//! applies the action.

use crate::crd::{FailureAction, FailureReason, FailureRule};
use crate::resources::TRAINER_CONTAINER;
use crate::workers::{Worker, WorkerState};

/// The action without a rule: the cluster's disruptions are not the training's fault, so they
/// restart without using up restarts; bad input, running out of memory and a full checkpoint
/// volume repeat on every retry.
pub fn default_action(reason: FailureReason) -> FailureAction {
    match reason {
        FailureReason::Evicted
        | FailureReason::Preempted
        | FailureReason::NodeLost
        | FailureReason::Deleted => FailureAction::RestartWithoutCounting,
        FailureReason::OomKilled | FailureReason::BadInput | FailureReason::StorageFull => {
            FailureAction::Fail
        }
        FailureReason::Error => FailureAction::Restart,
    }
}

/// The user's rule for `reason`, if any.
pub fn rule_for(rules: &[FailureRule], reason: FailureReason) -> Option<FailureAction> {
    rules.iter().find(|r| r.reason == reason).map(|r| r.action)
}

/// The user's rule for `reason`, else its default.
pub fn action(rules: &[FailureRule], reason: FailureReason) -> FailureAction {
    rule_for(rules, reason).unwrap_or_else(|| default_action(reason))
}

/// Why `worker` ended: a disruption of its pod first (a SIGKILL's exit code, or a trainer that
/// saved a checkpoint on SIGTERM and exited 0, is only its consequence), then what its containers
/// said.
pub fn classify(worker: &Worker) -> FailureReason {
    if let Some(reason) = disruption(worker.disruption.as_deref(), worker.pod_reason.as_deref()) {
        return reason;
    }
    // Deleted without a word of who or why (`kubectl delete pod`): the user's or another
    // controller's decision, as an eviction is, not a fault of the training.
    if worker.deleted {
        return FailureReason::Deleted;
    }
    match &worker.state {
        WorkerState::Failed(f) if f.is_bad_input() => FailureReason::BadInput,
        WorkerState::Failed(f) if f.is_storage_full() => FailureReason::StorageFull,
        WorkerState::Failed(f) if f.reason.as_deref() == Some("OOMKilled") => {
            FailureReason::OomKilled
        }
        _ => FailureReason::Error,
    }
}

/// A disruption from the pod's `DisruptionTarget` condition reason and its status reason, as the
/// kubelet, the scheduler, the Eviction API, the taint manager and the pod GC write them.
fn disruption(target: Option<&str>, pod_reason: Option<&str>) -> Option<FailureReason> {
    if pod_reason == Some("Evicted") || target == Some("EvictionByEvictionAPI") {
        return Some(FailureReason::Evicted);
    }
    // The scheduler's `PreemptionByScheduler` (`PreemptionByKubeScheduler` before 1.27), Kueue's
    // own reasons, and the kubelet's `Preempting` for a critical pod.
    let preempted = target.is_some_and(|t| t.contains("Preempt") || t.contains("Kueue"))
        || pod_reason == Some("Preempting");
    if preempted {
        return Some(FailureReason::Preempted);
    }
    // The taint manager deletes pods of a NotReady or unreachable node, the pod GC those of a
    // deleted node; the kubelet terminates them for a node shutdown (its only
    // `TerminationByKubelet` that is not an eviction, which is caught above).
    let node_lost = matches!(
        target,
        Some("DeletionByTaintManager" | "DeletionByPodGC" | "TerminationByKubelet")
    ) || matches!(pod_reason, Some("NodeLost" | "NodeShutdown" | "Shutdown"));
    node_lost.then_some(FailureReason::NodeLost)
}

/// The failure that ended an attempt, as the Event about it tells it.
#[derive(Clone, Debug, PartialEq)]
pub struct FailureRecord {
    pub reason: FailureReason,
    pub action: FailureAction,
    /// The pod whose end decided the reason.
    pub pod: String,
    /// What happened to it.
    pub message: String,
    /// What the action did: "the training failed", "gang restart 2 of 3", ...
    pub outcome: String,
}

impl FailureRecord {
    /// The Event's note: the reason, the pod and the action taken.
    pub fn note(&self) -> String {
        format!(
            "{} of pod {}: {}; action {}: {}",
            self.reason.as_str(),
            self.pod,
            self.message,
            self.action.as_str(),
            self.outcome
        )
    }
}

/// The condition reason of a training that a failure of `reason` ends.
pub fn failed_condition_reason(reason: FailureReason) -> &'static str {
    match reason {
        // The reason the operator used before rules existed; kept for whoever waits on it.
        FailureReason::BadInput => "InvalidInput",
        other => other.as_str(),
    }
}

/// The message of a training that a failure of `container` (when one failed) ends, with the fix.
pub fn fail_message(
    reason: FailureReason,
    detail: &str,
    by_rule: bool,
    container: Option<&str>,
) -> String {
    if by_rule {
        return format!(
            "{detail}; restartPolicy.rules says Fail for {} (change the rule to restart instead)",
            reason.as_str()
        );
    }
    let preparation = container.filter(|c| *c != TRAINER_CONTAINER);
    match reason {
        // The data preparation holds no model: the micro-batch is not what filled its memory.
        FailureReason::OomKilled if preparation.is_some() => format!(
            "{detail}; the init container {} ran out of memory (OOMKilled) while it {}: raise the \
             memory limit in spec.resources.limits.memory (the init containers get the trainer's \
             resources, without GPUs); deviceBatchSize plays no part there",
            preparation.unwrap_or_default(),
            match preparation {
                Some("generate") => "generated the synthetic dataset",
                _ => "prepared the dataset",
            }
        ),
        // The trainer's own error line (in `detail`) names the micro-batch that fits, if it said.
        FailureReason::OomKilled => format!(
            "{detail}; the worker ran out of memory (OOMKilled): lower spec.deviceBatchSize (the \
             micro-batch; gradient accumulation keeps totalBatchSize) or raise the memory limit in \
             spec.resources"
        ),
        // The trainer's line names the folder, the bytes a checkpoint needs and what is free.
        FailureReason::StorageFull => format!(
            "{detail}; the checkpoint volume is full (StorageFull; the checkpoints saved before \
             are intact): make room on the checkpoint claim (expand it if its StorageClass allows \
             volume expansion, or delete what else it holds) or keep fewer checkpoints \
             (spec.checkpoint.keep) in a new training; a restartPolicy.rules entry {{reason: \
             StorageFull, action: Restart}} restarts instead of failing"
        ),
        _ => detail.to_string(),
    }
}

/// The step of a checkpoint directory (`step-<9 digits>`, docs/contract.md).
pub fn checkpoint_step(path: &str) -> Option<i64> {
    let dir = path.trim_end_matches('/').rsplit('/').next()?;
    dir.strip_prefix("step-")?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::ALL_REASONS;
    use crate::resources::testing::{cpu_spec, training};
    use crate::resources::TRAINER_CONTAINER;
    use crate::workers::observe;
    use crate::workers::testing::{disrupted, killed, pod, running, terminated, with_pod_reason};
    #[test]
    fn each_reason_is_read_from_the_pod() {
        let t = training(cpu_spec());
        let crash = || terminated(pod(&t, 0, 0), TRAINER_CONTAINER, 137, "killed");
        let cases = [
            (with_pod_reason(crash(), "Evicted"), FailureReason::Evicted),
            (
                disrupted(crash(), "EvictionByEvictionAPI"),
                FailureReason::Evicted,
            ),
            (
                disrupted(running(pod(&t, 0, 0), "10.0.0.1"), "PreemptionByScheduler"),
                FailureReason::Preempted,
            ),
            (
                with_pod_reason(crash(), "Preempting"),
                FailureReason::Preempted,
            ),
            (
                disrupted(crash(), "DeletionByTaintManager"),
                FailureReason::NodeLost,
            ),
            (
                disrupted(crash(), "DeletionByPodGC"),
                FailureReason::NodeLost,
            ),
            (
                with_pod_reason(crash(), "NodeLost"),
                FailureReason::NodeLost,
            ),
            (
                terminated(pod(&t, 0, 0), "prepare", 2, "error: no .txt files"),
                FailureReason::BadInput,
            ),
            (
                terminated(
                    pod(&t, 0, 0),
                    TRAINER_CONTAINER,
                    3,
                    "error: the checkpoint volume is full",
                ),
                FailureReason::StorageFull,
            ),
            (crash(), FailureReason::Error),
        ];
        for (p, want) in cases {
            assert_eq!(classify(&observe(&p)), want, "{:?}", p.status);
        }
        let oom = killed(pod(&t, 0, 0), 137, "OOMKilled", "Killed");
        assert_eq!(classify(&observe(&oom)), FailureReason::OomKilled);
        // Evicted for memory pressure: the kubelet's eviction is the cause, not the OOM.
        assert_eq!(
            classify(&observe(&with_pod_reason(oom, "Evicted"))),
            FailureReason::Evicted
        );
        // A False DisruptionTarget (the disruption was called off) is no disruption.
        let mut off = disrupted(crash(), "PreemptionByScheduler");
        off.status.as_mut().unwrap().conditions.as_mut().unwrap()[0].status = "False".into();
        assert_eq!(classify(&observe(&off)), FailureReason::Error);
    }

    #[test]
    fn defaults_restart_disruptions_uncounted_and_fail_what_repeats() {
        use FailureAction::*;
        let got: Vec<FailureAction> = ALL_REASONS.iter().map(|r| action(&[], *r)).collect();
        assert_eq!(
            got,
            [
                RestartWithoutCounting,
                RestartWithoutCounting,
                RestartWithoutCounting,
                RestartWithoutCounting,
                Fail,
                Fail,
                Fail,
                Restart
            ]
        );
    }

    #[test]
    fn a_rule_overrides_only_the_reason_it_names() {
        let rules = [
            FailureRule {
                reason: FailureReason::Error,
                action: FailureAction::Fail,
            },
            FailureRule {
                reason: FailureReason::OomKilled,
                action: FailureAction::Restart,
            },
        ];
        assert_eq!(action(&rules, FailureReason::Error), FailureAction::Fail);
        assert_eq!(
            action(&rules, FailureReason::OomKilled),
            FailureAction::Restart
        );
        assert_eq!(
            action(&rules, FailureReason::Evicted),
            FailureAction::RestartWithoutCounting
        );
        assert_eq!(action(&rules, FailureReason::BadInput), FailureAction::Fail);
        assert_eq!(rule_for(&rules, FailureReason::Evicted), None);
    }

    #[test]
    fn an_oom_message_keeps_the_trainers_line_and_names_the_fix() {
        let m = fail_message(
            FailureReason::OomKilled,
            "t-worker-0: container trainer exited with code 137 (OOMKilled): rank 0: out of memory at micro-batch 16; micro-batch 8 fits",
            false,
            Some("trainer"),
        );
        assert!(m.contains("micro-batch 8 fits"), "{m}");
        assert!(m.contains("lower spec.deviceBatchSize"), "{m}");
        let m = fail_message(FailureReason::Error, "boom", true, None);
        assert!(m.contains("restartPolicy.rules says Fail for Error"), "{m}");
        assert_eq!(
            fail_message(FailureReason::BadInput, "bad", false, None),
            "bad"
        );
        // An init container's OOM: its name and its memory, not the micro-batch.
        let m = fail_message(
            FailureReason::OomKilled,
            "t-worker-0: container generate exited with code 137 (OOMKilled): Killed",
            false,
            Some("generate"),
        );
        assert!(
            m.contains("the init container generate ran out of memory")
                && m.contains("raise the memory limit in spec.resources.limits.memory")
                && !m.contains("lower spec.deviceBatchSize"),
            "{m}"
        );
        let m = fail_message(
            FailureReason::StorageFull,
            "t-worker-0: container trainer exited with code 3: the checkpoint volume is full: writing /checkpoints/step-000000040 needs about 1.2 GiB, and /checkpoints has 12.0 MiB free",
            false,
            None,
        );
        assert!(
            m.contains("needs about 1.2 GiB") && m.contains("12.0 MiB free"),
            "{m}"
        );
        assert!(
            m.contains("spec.checkpoint.keep")
                && m.contains("reason: StorageFull, action: Restart"),
            "{m}"
        );
        assert_eq!(
            failed_condition_reason(FailureReason::StorageFull),
            "StorageFull"
        );
    }

    #[test]
    fn the_step_of_a_checkpoint_comes_from_its_directory() {
        assert_eq!(checkpoint_step("/checkpoints/step-000000168"), Some(168));
        assert_eq!(checkpoint_step("/checkpoints/step-000000168/"), Some(168));
        assert_eq!(checkpoint_step("/checkpoints/best"), None);
    }

    #[test]
    fn reasons_serialise_as_the_rules_name_them() {
        let names: Vec<String> = ALL_REASONS
            .iter()
            .map(|r| {
                serde_json::to_value(r)
                    .unwrap()
                    .as_str()
                    .unwrap()
                    .to_string()
            })
            .collect();
        let own: Vec<&str> = ALL_REASONS.iter().map(|r| r.as_str()).collect();
        assert_eq!(names, own);
        let sorted = {
            let mut s = ALL_REASONS;
            s.sort();
            s
        };
        assert_eq!(sorted, ALL_REASONS, "precedence is the declaration order");
    }
}
