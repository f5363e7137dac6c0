//! What a failure does (its rule, or the default): restart the gang from the last checkpoint,
//! counted against `maxRestarts` with a doubling backoff or not, or fail the training.

use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::SignedDuration;

use super::dataset::is_preparation;
use super::failure::Ending;
use super::{Decider, MAX_BACKOFF, STOPPING_REQUEUE};
use crate::conditions::{FALSE, TRUE};
use crate::crd::{condition as cond, FailureAction, Phase};
use crate::failures::{self, FailureRecord};
use crate::workers::Worker;

impl Decider<'_> {
    /// Counts the failure and does what its rule (or the default) says.
    pub(super) fn handle_failure(&mut self, current: &[&Worker], e: Ending) {
        let policy = &self.o.training.spec.restart_policy;
        let by_rule = failures::rule_for(&policy.rules, e.reason);
        let action = by_rule.unwrap_or_else(|| failures::default_action(e.reason));
        let max = policy.max_restarts;
        *self.st().failures.of(e.reason) += 1;
        if e.container.as_deref().is_some_and(is_preparation) {
            self.set(
                cond::DATASET_READY,
                FALSE,
                "PreparationFailed",
                e.message.clone(),
            );
        }
        let outcome = match action {
            FailureAction::Fail => {
                let message = failures::fail_message(
                    e.reason,
                    &e.message,
                    by_rule.is_some(),
                    e.container.as_deref(),
                );
                self.fail(
                    current,
                    failures::failed_condition_reason(e.reason),
                    message,
                );
                "the training failed".to_string()
            }
            FailureAction::Restart if self.decision.status.restarts >= max => {
                self.fail(
                    current,
                    "RestartLimitExceeded",
                    format!(
                        "{}; all {max} restarts used (restartPolicy.maxRestarts)",
                        e.message
                    ),
                );
                format!("the training failed: all {max} restarts used")
            }
            FailureAction::Restart => self.restart(current, &e, true),
            FailureAction::RestartWithoutCounting => self.restart(current, &e, false),
        };
        self.decision.failure = Some(FailureRecord {
            reason: e.reason,
            action,
            pod: e.pod,
            message: e.message,
            outcome,
        });
    }

    pub(super) fn fail(&mut self, current: &[&Worker], reason: &str, message: String) {
        self.stop_usage(current);
        self.delete(current, true);
        // Nothing prepares the dataset any more: say whether it was.
        if self.dataset_unsettled() {
            if !current.is_empty() && current.iter().all(|w| w.dataset_prepared()) {
                self.say_dataset_prepared();
            } else {
                self.set(
                    cond::DATASET_READY,
                    FALSE,
                    "NotPrepared",
                    format!(
                        "the training failed ({reason}) before every worker prepared the dataset"
                    ),
                );
            }
        }
        let (now, generation) = (self.now.clone(), self.generation);
        let st = self.st();
        st.failed_generation = generation;
        st.completion_time = Some(now);
        st.restart_after = None;
        st.eta = None;
        self.set(cond::FAILED, TRUE, reason, message.clone());
        self.set(cond::RUNNING, FALSE, "Failed", "");
        self.set(cond::PODS_READY, FALSE, "Failed", "");
        self.set(cond::RESTARTING, FALSE, "Failed", "");
        self.phase(Phase::Failed, message);
    }

    /// Restarts the gang; `counted` against maxRestarts, with a backoff that doubles per
    /// restart, or not (a disruption of the cluster), after the base backoff. Returns what was
    /// done, for the failure's Event.
    pub(super) fn restart(&mut self, current: &[&Worker], e: &Ending, counted: bool) -> String {
        // The attempt's pods go now; the new attempt's pods come after the backoff.
        self.stop_usage(current);
        self.delete(current, false);
        let policy = &self.o.training.spec.restart_policy;
        let (max, base) = (policy.max_restarts, policy.backoff_seconds);
        let now = self.o.now;
        let st = self.st();
        if counted {
            st.restarts += 1;
        }
        st.attempt += 1;
        st.launched_attempt = None;
        st.running_workers = 0;
        let n = st.restarts;
        let backoff = backoff(base, if counted { n } else { 1 });
        st.restart_after = Some(Time(
            now + SignedDuration::try_from(backoff).unwrap_or(SignedDuration::ZERO),
        ));
        let outcome = if counted {
            format!(
                "gang restart {n} of {max} from the last checkpoint in {}s",
                backoff.as_secs()
            )
        } else {
            format!(
                "gang restart from the last checkpoint in {}s, not counted against maxRestarts \
                 ({} restarts without counting; {n} of {max} counted restarts used)",
                backoff.as_secs(),
                e.reason.as_str()
            )
        };
        let msg = format!("{}; {outcome}", e.message);
        self.dataset_waits("the workers of the next attempt prepare it once they start");
        self.set(cond::RESTARTING, TRUE, e.kind, msg.clone());
        self.set(cond::RUNNING, FALSE, "Restarting", "");
        self.set(cond::PODS_READY, FALSE, "Restarting", "");
        self.phase(Phase::Restarting, msg);
        self.decision.requeue = Some(backoff.max(STOPPING_REQUEUE));
        outcome
    }
}

/// `base` seconds before the first restart, doubling for each further one, at most `MAX_BACKOFF`.
pub fn backoff(base_seconds: i32, restart: i32) -> Duration {
    let base = u64::try_from(base_seconds).unwrap_or(0);
    let factor = 1u64 << (restart.clamp(1, 20) - 1);
    Duration::from_secs(base.saturating_mul(factor)).min(MAX_BACKOFF)
}

#[cfg(test)]
mod tests {
    use super::backoff;
    use crate::decision::testing::*;

    #[test]
    fn a_failed_worker_restarts_the_whole_gang_after_a_backoff() {
        let (t, mut pods) = running_gpu_training();
        pods[1] = terminated(pod(&t, 1, 0), TRAINER_CONTAINER, 137, "killed");
        let d = decide_at(&t, &pods, 100);
        assert_eq!(d.status.phase, Some(Phase::Restarting));
        assert_eq!((d.status.restarts, d.status.attempt), (1, 1));
        assert_eq!(d.delete, ["demo-worker-0", "demo-worker-1"]);
        assert!(d.create.is_empty());
        assert_eq!(condition(&d, c::RESTARTING), ("True", "WorkerFailed"));
        assert_eq!(condition(&d, c::RUNNING).0, "False");
        let msg = d.status.message.clone().unwrap();
        assert!(
            msg.contains("demo-worker-1: container trainer exited with code 137"),
            "{msg}"
        );
        assert!(msg.contains("gang restart 1 of 3"), "{msg}");
        assert_eq!(d.status.restart_after, Some(Time(at(110))));
        let t = with(t, &d);

        // The old pods are still terminating: nothing new is created, nothing counted twice.
        let terminating: Vec<Pod> = pods.iter().cloned().map(deleting).collect();
        let d = decide_at(&t, &terminating, 111);
        assert!(d.create.is_empty() && d.delete.is_empty());
        assert_eq!((d.status.restarts, d.status.attempt), (1, 1));
        assert_eq!(d.status.phase, Some(Phase::Restarting));

        // Gone, but the backoff is not over yet; the status still says why it restarts.
        let d = decide_at(&t, &[], 105);
        assert!(d.create.is_empty());
        assert_eq!(d.requeue, Some(Duration::from_secs(6)));
        assert_eq!(d.status.message.as_deref(), Some(msg.as_str()));

        // Backoff over: a new attempt of all workers.
        let d = decide_at(&t, &[], 110);
        assert_eq!(d.create, [0, 1]);
        assert_eq!(d.status.phase, Some(Phase::Restarting));
        let t = with(t, &d);
        let pods = vec![
            running(pod(&t, 0, 1), "10.0.0.3"),
            running(pod(&t, 1, 1), "10.0.0.4"),
        ];
        let d = decide_at(&t, &pods, 120);
        assert_eq!(d.status.phase, Some(Phase::Running));
        assert_eq!(condition(&d, c::RESTARTING), ("False", "Recovered"));
        assert_eq!(d.status.restarts, 1);
    }

    #[test]
    fn backoff_doubles_up_to_a_cap() {
        assert_eq!(backoff(10, 1), Duration::from_secs(10));
        assert_eq!(backoff(10, 3), Duration::from_secs(40));
        assert_eq!(backoff(10, 30), MAX_BACKOFF);
        assert_eq!(backoff(0, 2), Duration::ZERO);
    }

    #[test]
    fn out_of_restarts_fails_with_the_reason() {
        let mut spec = gpu_spec();
        spec["restartPolicy"] = serde_json::json!({"maxRestarts": 1, "backoffSeconds": 0});
        let t = training(spec);
        let mut status = CharLMTrainingStatus {
            restarts: 1,
            attempt: 1,
            ..Default::default()
        };
        status.launched_attempt = Some(1);
        let mut t = t;
        t.status = Some(status);
        let pods = vec![
            running(pod(&t, 0, 1), "10.0.0.1"),
            terminated(pod(&t, 1, 1), TRAINER_CONTAINER, 1, "panic: NCCL timeout"),
        ];
        let d = decide_at(&t, &pods, 0);
        assert_eq!(d.status.phase, Some(Phase::Failed));
        assert_eq!(condition(&d, c::FAILED), ("True", "RestartLimitExceeded"));
        assert_eq!(
            d.delete,
            ["demo-worker-0"],
            "the running peer is freed, the failed pod kept"
        );
        let msg = d.status.message.unwrap();
        assert!(
            msg.contains("NCCL timeout") && msg.contains("all 1 restarts used"),
            "{msg}"
        );
        assert_eq!(d.status.failed_generation, Some(1));
    }

    #[test]
    fn bad_input_fails_at_once() {
        let t = training(cpu_spec());
        let t = with(t.clone(), &decide_at(&t, &[], 0));
        let pods = vec![terminated(
            pod(&t, 0, 0),
            "prepare",
            2,
            "error: no .txt files in /work/raw",
        )];
        let d = decide_at(&t, &pods, 3);
        assert_eq!(d.status.phase, Some(Phase::Failed));
        assert_eq!(condition(&d, c::FAILED), ("True", "InvalidInput"));
        assert_eq!(d.status.restarts, 0);
        assert!(d.delete.is_empty() && d.create.is_empty());
        let t = with(t, &d);

        // Failed stays failed while the spec is unchanged...
        let d2 = decide_at(&t, &pods, 10);
        assert_eq!(d2.status.phase, Some(Phase::Failed));
        assert!(d2.create.is_empty());

        // ...and a new generation starts a fresh attempt, replacing the failed pod.
        let mut t = t;
        t.metadata.generation = Some(2);
        let d3 = decide_at(&t, &pods, 20);
        assert_eq!(d3.status.attempt, 1);
        assert_eq!(condition(&d3, c::FAILED), ("False", "SpecChanged"));
        assert_eq!(d3.delete, ["demo-worker-0"]);
        assert!(d3.create.is_empty(), "waits for the old pod to go");
        let d4 = decide_at(&with(t, &d3), &[], 21);
        assert_eq!(d4.create, [0]);
    }

    #[test]
    fn an_incomplete_exit_restarts() {
        let (t, mut pods) = running_gpu_training();
        pods[0] = terminated(
            pod(&t, 0, 0),
            TRAINER_CONTAINER,
            0,
            r#"{"step": 300, "checkpoint": "/checkpoints/step-000000300", "complete": false}"#,
        );
        let d = decide_at(&t, &pods, 50);
        assert_eq!(d.status.phase, Some(Phase::Restarting));
        assert_eq!(condition(&d, c::RESTARTING), ("True", "WorkerStopped"));
        assert_eq!(d.status.progress.as_ref().unwrap().step, 300);
        assert_eq!(
            d.status.latest_checkpoint.as_deref(),
            Some("/checkpoints/step-000000300")
        );
    }

    #[test]
    fn out_of_memory_fails_by_default_and_says_to_lower_the_micro_batch() {
        let (t, mut pods) = running_gpu_training();
        pods[0] = killed(
            pod(&t, 0, 0),
            137,
            "OOMKilled",
            "[rank 0] error: out of memory at micro-batch 16: micro-batch 8 fits; set deviceBatchSize: 8\n",
        );
        let d = decide_at(&t, &pods, 100);
        assert_eq!(d.status.phase, Some(Phase::Failed));
        assert_eq!(condition(&d, c::FAILED), ("True", "OOMKilled"));
        let msg = message(&d);
        assert!(msg.contains("micro-batch 8 fits"), "{msg}");
        assert!(msg.contains("lower spec.deviceBatchSize"), "{msg}");
        assert_eq!((d.status.restarts, d.status.failures.oom_killed), (0, 1));
        assert_eq!(d.delete, ["demo-worker-1"], "the running peer is freed");
        assert_eq!(d.failure.unwrap().action, FailureAction::Fail);
    }

    #[test]
    fn a_users_rules_override_the_defaults_they_name() {
        let (t, mut pods) = running_gpu_training();
        let t = with_spec(t, |s| {
            s["restartPolicy"]["rules"] = serde_json::json!([
                {"reason": "Error", "action": "Fail"},
                {"reason": "OOMKilled", "action": "Restart"},
                {"reason": "Evicted", "action": "Restart"}
            ])
        });
        let crash = terminated(pod(&t, 1, 0), TRAINER_CONTAINER, 1, "panic: boom");
        pods[1] = crash;
        let d = decide_at(&t, &pods, 100);
        assert_eq!(d.status.phase, Some(Phase::Failed));
        assert_eq!(condition(&d, c::FAILED), ("True", "Error"));
        assert!(
            message(&d).contains("restartPolicy.rules says Fail for Error"),
            "{}",
            message(&d)
        );
        assert_eq!(d.status.failures.error, 1);

        pods[1] = killed(pod(&t, 1, 0), 137, "OOMKilled", "Killed");
        let d = decide_at(&t, &pods, 100);
        assert_eq!(d.status.phase, Some(Phase::Restarting));
        assert_eq!((d.status.restarts, d.status.failures.oom_killed), (1, 1));

        pods[1] = with_pod_reason(killed(pod(&t, 1, 0), 137, "Error", "Killed"), "Evicted");
        let d = decide_at(&t, &pods, 100);
        assert_eq!((d.status.restarts, d.status.failures.evicted), (1, 1));
        // Unnamed reasons keep their defaults: bad input still fails.
        pods[1] = terminated(pod(&t, 1, 0), TRAINER_CONTAINER, 2, "error: bad");
        let d = decide_at(&t, &pods, 100);
        assert_eq!(condition(&d, c::FAILED), ("True", "InvalidInput"));
    }

    #[test]
    fn counted_restarts_still_run_out() {
        let (t, mut pods) = running_gpu_training();
        let mut t = with_spec(t, |s| s["restartPolicy"]["maxRestarts"] = 0.into());
        t.status.as_mut().unwrap().failures.evicted = 4;
        pods[1] = terminated(pod(&t, 1, 0), TRAINER_CONTAINER, 1, "boom");
        let d = decide_at(&t, &pods, 100);
        assert_eq!(condition(&d, c::FAILED), ("True", "RestartLimitExceeded"));
        assert_eq!((d.status.failures.error, d.status.failures.evicted), (1, 4));
        assert!(d.failure.unwrap().outcome.contains("all 0 restarts used"));
    }
}
