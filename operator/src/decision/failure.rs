//! Why an attempt ended without success: each ended worker's reason (`failures::classify`), a
//! worker deleted or gone, a gang beside a lost node; the most specific reason is the gang's.

use std::collections::BTreeSet;

use kube::ResourceExt;

use super::Decider;
use crate::crd::{condition as cond, FailureReason};
use crate::failures;
use crate::resources::pod_name;
use crate::workers::{Worker, WorkerState};

/// How a worker ended the attempt: the condition reason (`WorkerFailed`, `WorkerStopped`,
/// `WorkerLost`), the failure reason the rules act on, the pod, and one line on what happened.
pub(super) struct Ending {
    pub(super) kind: &'static str,
    pub(super) reason: FailureReason,
    pub(super) pod: String,
    /// The container that failed, when one did (`generate`, `prepare`, `trainer`).
    pub(super) container: Option<String>,
    pub(super) message: String,
}

impl Decider<'_> {
    /// Why the current attempt has ended without success. When several workers ended, the most
    /// specific reason wins (`crd::ALL_REASONS`): the peers of a worker whose node was lost
    /// fail too, with a plain error.
    pub(super) fn failure(&self, current: &[&Worker], wanted: i32) -> Option<Ending> {
        let mut endings = Vec::new();
        let ending = |kind, w: &Worker, message: String| Ending {
            kind,
            reason: failures::classify(w),
            pod: w.name.clone(),
            container: match &w.state {
                WorkerState::Failed(f) => f.container.clone(),
                _ => None,
            },
            message: format!("{message}{}", disrupted_by(w)),
        };
        for w in current {
            if let WorkerState::Failed(f) = &w.state {
                endings.push(ending("WorkerFailed", w, f.describe(&w.name)));
            }
        }
        for w in current {
            if let WorkerState::Succeeded { report } = &w.state {
                if w.index == Some(0) && !report.as_ref().is_some_and(|r| r.complete) {
                    let message = format!(
                        "{}: the trainer stopped before its budget was done (complete: false)",
                        w.name
                    );
                    endings.push(ending("WorkerStopped", w, message));
                }
            }
        }
        let ran = self.is(cond::PODS_READY);
        let when = if ran {
            "while the training ran"
        } else {
            "before every worker ran (it was still starting)"
        };
        for w in current {
            if w.terminating && w.is_active() {
                endings.push(ending(
                    "WorkerLost",
                    w,
                    format!("{}: deleted {when}", w.name),
                ));
            }
        }
        // A worker missing after the whole gang was created has been deleted by someone else,
        // who also removed its finalizer; nothing is left to say why.
        if self.decision.status.launched_attempt == Some(self.decision.status.attempt) {
            let present: BTreeSet<i32> = current.iter().filter_map(|w| w.index).collect();
            if let Some(i) = (0..wanted).find(|i| !present.contains(i)) {
                let pod = pod_name(&self.o.training.name_any(), i);
                endings.push(Ending {
                    kind: "WorkerLost",
                    reason: FailureReason::Deleted,
                    message: format!("{pod}: disappeared {when} (deleted)"),
                    container: None,
                    pod,
                });
            }
        }
        // A gang that ended while one of its workers sits on a lost node ended because of the
        // node: its peers' collectives timed out waiting for it (its own pod still reads Running,
        // the last its kubelet wrote). A lost node alone ends nothing: the node may come back
        // before the collective's timeout.
        if !endings.is_empty() {
            for w in current {
                if let Some(why) = &w.node_lost {
                    endings.push(Ending {
                        kind: "WorkerLost",
                        reason: FailureReason::NodeLost,
                        pod: w.name.clone(),
                        container: None,
                        message: format!("{}: {why}", w.name),
                    });
                }
            }
        }
        // `min_by_key` keeps the first of equals: the order above.
        endings.into_iter().min_by_key(|e| e.reason)
    }
}

/// Who took the pod away, when Kubernetes says (its `DisruptionTarget` or status reason).
pub(super) fn disrupted_by(w: &Worker) -> String {
    match (&w.disruption, &w.pod_reason) {
        (Some(d), _) if !d.is_empty() => format!(" (DisruptionTarget: {d})"),
        // A failure without a container's status already names the pod's reason.
        (_, Some(r)) if !matches!(&w.state, WorkerState::Failed(f) if f.container.is_none()) => {
            format!(" (pod {r})")
        }
        _ => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use crate::decision::testing::*;

    #[test]
    fn a_deleted_or_vanished_worker_restarts_the_gang() {
        let (t, pods) = running_gpu_training();
        let d = decide_at(&t, &[pods[0].clone()], 50);
        assert_eq!(condition(&d, c::RESTARTING), ("True", "WorkerLost"));
        assert!(d
            .status
            .message
            .unwrap()
            .contains("demo-worker-1: disappeared"));

        let d = decide_at(&t, &[pods[0].clone(), deleting(pods[1].clone())], 50);
        assert_eq!(condition(&d, c::RESTARTING), ("True", "WorkerLost"));
    }

    #[test]
    fn a_worker_deleted_by_hand_restarts_the_gang_without_counting() {
        let (t, pods) = running_gpu_training();
        // `kubectl delete pod demo-worker-0`: the pod is terminating, its trainer saves a
        // checkpoint on SIGTERM.
        let mut gone = pods.clone();
        gone[0] = deleting(pods[0].clone());
        let d = decide_at(&t, &gone, 100);
        assert_eq!(d.status.phase, Some(Phase::Restarting));
        assert_eq!((d.status.restarts, d.status.failures.deleted), (0, 1));
        assert_eq!(d.status.failures.error, 0);
        let f = d.failure.clone().unwrap();
        assert_eq!(
            (f.reason, f.action),
            (
                FailureReason::Deleted,
                FailureAction::RestartWithoutCounting
            )
        );
        assert!(
            f.note().contains("not counted against maxRestarts"),
            "{}",
            f.note()
        );
        // Seen only after the trainer ended with its SIGTERM report: the same.
        gone[0] = terminated(
            deleting(pods[0].clone()),
            TRAINER_CONTAINER,
            0,
            r#"{"step": 168, "checkpoint": "/checkpoints/step-000000168", "complete": false, "stop_reason": "signal"}"#,
        );
        let d = decide_at(&t, &gone, 100);
        assert_eq!((d.status.restarts, d.status.failures.deleted), (0, 1));
        assert_eq!(
            d.status.latest_checkpoint.as_deref(),
            Some("/checkpoints/step-000000168")
        );
        // A pod that vanished (deleted, its finalizer removed) too.
        let d = decide_at(&t, &pods[1..], 100);
        assert_eq!((d.status.restarts, d.status.failures.deleted), (0, 1));
        // A rule can count it.
        let strict = with_spec(t, |s| {
            s["restartPolicy"]["rules"] =
                serde_json::json!([{"reason": "Deleted", "action": "Restart"}])
        });
        let d = decide_at(&strict, &gone, 100);
        assert_eq!((d.status.restarts, d.status.failures.deleted), (1, 1));
    }

    #[test]
    fn an_evicted_worker_restarts_the_gang_without_counting() {
        let (t, mut pods) = running_gpu_training();
        pods[1] = with_pod_reason(killed(pod(&t, 1, 0), 137, "Error", "Killed"), "Evicted");
        let d = decide_at(&t, &pods, 100);
        assert_eq!(d.status.phase, Some(Phase::Restarting));
        assert_eq!((d.status.restarts, d.status.attempt), (0, 1));
        assert_eq!(d.status.failures.evicted, 1);
        assert_eq!(d.status.failures.error, 0);
        assert_eq!(d.delete, ["demo-worker-0", "demo-worker-1"]);
        assert_eq!(condition(&d, c::RESTARTING), ("True", "WorkerFailed"));
        // The base backoff, whatever came before.
        assert_eq!(d.status.restart_after, Some(Time(at(110))));
        let f = d.failure.clone().unwrap();
        assert_eq!(
            (f.reason, f.action, f.pod.as_str()),
            (
                FailureReason::Evicted,
                FailureAction::RestartWithoutCounting,
                "demo-worker-1"
            )
        );
        let note = f.note();
        assert!(
            note.starts_with("Evicted of pod demo-worker-1: ")
                && note.contains("(pod Evicted)")
                && note.contains("action RestartWithoutCounting")
                && note.contains("not counted against maxRestarts"),
            "{note}"
        );
        // The count is kept through the next attempt and not counted again.
        let t = with(t, &d);
        let d = decide_at(&t, &[], 111);
        assert_eq!(d.create, [0, 1]);
        assert_eq!((d.status.failures.evicted, d.status.restarts), (1, 0));
        assert!(d.failure.is_none());
    }

    #[test]
    fn the_most_specific_reason_of_a_gang_wins() {
        // Worker 1 is preempted; worker 0's trainer then fails for want of its peer.
        let (t, mut pods) = running_gpu_training();
        pods[0] = terminated(pod(&t, 0, 0), TRAINER_CONTAINER, 1, "NCCL: peer lost");
        pods[1] = deleting(disrupted(pods[1].clone(), "PreemptionByScheduler"));
        let d = decide_at(&t, &pods, 100);
        let f = d.failure.clone().unwrap();
        assert_eq!(
            (f.reason, f.pod.as_str()),
            (FailureReason::Preempted, "demo-worker-1")
        );
        assert!(
            f.message
                .contains("(DisruptionTarget: PreemptionByScheduler)"),
            "{}",
            f.message
        );
        assert_eq!((d.status.restarts, d.status.failures.preempted), (0, 1));
        assert_eq!(condition(&d, c::RESTARTING), ("True", "WorkerLost"));
    }

    #[test]
    fn a_lost_node_restarts_without_counting() {
        let (t, mut pods) = running_gpu_training();
        pods[1] = deleting(disrupted(pods[1].clone(), "DeletionByTaintManager"));
        let d = decide_at(&t, &pods, 100);
        assert_eq!(d.status.phase, Some(Phase::Restarting));
        assert_eq!((d.status.restarts, d.status.failures.node_lost), (0, 1));
    }

    #[test]
    fn a_worker_lost_before_the_gang_ran_says_so() {
        let t = training(gpu_spec());
        let d = decide_at(&t, &[], 0);
        let t = with(t, &d);
        let pods = vec![running(pod(&t, 0, 0), "10.0.0.1")];
        let d = decide_at(&t, &pods, 5);
        let msg = &conditions::get(&d.status.conditions, c::RESTARTING)
            .unwrap()
            .message;
        assert!(
            msg.contains("demo-worker-1: disappeared before every worker ran"),
            "{msg}"
        );
    }

    /// What the decision sees when the controller found worker 1's node lost.
    fn observed(t: &CharLMTraining, workers: Vec<Worker>, now: i64) -> Observed<'_> {
        Observed {
            workers,
            ..look(t, &[], now).observed
        }
    }

    /// The workers of `pods`, worker 1's node lost (as the controller finds it).
    fn on_lost_node(pods: &[Pod]) -> Vec<Worker> {
        pods.iter()
            .map(|p| {
                let mut w = observe(p);
                if w.index == Some(1) {
                    w.node = Some("h100-1".into());
                    w.node_lost = Some(LOST.into());
                }
                w
            })
            .collect()
    }

    const LOST: &str = "node h100-1 is unreachable (its kubelet has not renewed its Lease for \
                        34s; leaseDurationSeconds 40)";

    #[test]
    fn a_gang_that_fails_beside_a_lost_node_is_node_lost_and_names_the_pod_the_node_holds() {
        let (t, pods) = running_gpu_training();
        // Worker 1's node stopped: its pod still reads Running; worker 0's collective timed out.
        let timed_out = vec![
            terminated(
                pods[0].clone(),
                TRAINER_CONTAINER,
                1,
                "[rank 0] error: collective allreduce timed out after 30s",
            ),
            pods[1].clone(),
        ];
        // Without the node's word it is the training's own error, counted.
        let d = decide_at(&t, &timed_out, 10);
        assert_eq!((d.status.failures.error, d.status.restarts), (1, 1));

        let d = decide(&observed(&t, on_lost_node(&timed_out), 10));
        let failure = d.failure.clone().unwrap();
        assert_eq!(failure.reason, FailureReason::NodeLost);
        assert!(failure.message.contains(LOST), "{}", failure.message);
        let st = &d.status;
        assert_eq!(
            (
                st.failures.node_lost,
                st.failures.error,
                st.restarts,
                st.attempt
            ),
            (1, 0, 0, 1)
        );
        assert_eq!(condition(&d, c::RESTARTING), ("True", "WorkerLost"));
        assert!(d.delete.contains(&pods[1].name_any()));

        // During the backoff, PodsReady says what it waits for.
        let t = with(t, &d);
        let stale = vec![deleting(pods[1].clone())];
        let d = decide(&observed(&t, on_lost_node(&stale), 11));
        assert_eq!(condition(&d, c::PODS_READY), ("False", "Restarting"));
        let ready = conditions::get(&d.status.conditions, c::PODS_READY).unwrap();
        assert!(
            ready.message.starts_with("waiting until"),
            "{}",
            ready.message
        );

        // After it, the old pod the lost node holds is named, with the node and the way out.
        let d = decide(&observed(&t, on_lost_node(&stale), 700));
        assert_eq!(d.status.phase, Some(Phase::Restarting));
        assert!(d.create.is_empty());
        assert_eq!(condition(&d, c::PODS_READY), ("False", "NodeLost"));
        let ready = conditions::get(&d.status.conditions, c::PODS_READY).unwrap();
        let pod = pods[1].name_any();
        for needle in [
            format!("{pod} is still terminating on node h100-1: {LOST}"),
            "kubectl delete node h100-1".to_string(),
        ] {
            assert!(
                ready.message.contains(&needle),
                "{needle:?} in {}",
                ready.message
            );
        }
        assert!(
            warns(ready),
            "a lost node is something wrong: a Warning Event"
        );

        // A plain old pod still going: named, as expected.
        let d = decide_at(&t, &stale, 700);
        assert_eq!(condition(&d, c::PODS_READY), ("False", "Restarting"));
        let ready = conditions::get(&d.status.conditions, c::PODS_READY).unwrap();
        assert_eq!(
            ready.message,
            format!("waiting for the previous workers to stop: {pod}")
        );
    }
}
