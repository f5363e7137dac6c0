//! Starting a gang: the missing workers are created once the previous attempt's pods are gone,
//! the backoff is over and the dataset exists; until all run, PodsReady says why not (the
//! scheduler's or the kubelet's words, a lost node holding an old pod); a gang not started within
//! `startupTimeoutSeconds` lets go of what it holds.

use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::SignedDuration;

use super::dataset::WAITING_FOR_WORKERS;
use super::{
    DatasetCheck, Decider, DATASET_REQUEUE, RUNNING_REQUEUE, STARTING_REQUEUE, STOPPING_REQUEUE,
};
use crate::conditions::{self, FALSE, TRUE, UNKNOWN};
use crate::crd::{condition as cond, EffectiveSettings, Phase};
use crate::usage;
use crate::workers::{Waiting, Worker, WorkerState};

impl Decider<'_> {
    /// Creates the missing workers of the current attempt, once the previous attempt's pods are gone,
    /// the backoff is over and the dataset exists.
    pub(super) fn start(&mut self, current: &[&Worker], stale: &[&Worker], missing: Vec<i32>) {
        let restarting = self.is(cond::RESTARTING);
        let waiting_phase = if restarting {
            Phase::Restarting
        } else {
            Phase::Pending
        };
        // Nothing that cannot work (no volume, someone else's object in the way) holds GPUs.
        if let Some((type_, reason, msg)) = self.blocked.clone() {
            self.set(cond::PODS_READY, FALSE, reason, msg.clone());
            self.phase(waiting_phase, msg);
            self.decision.requeue = Some(self.recheck(type_));
            return;
        }
        if let Some(after) = self.decision.status.restart_after.clone() {
            if after.0 > self.o.now {
                let wait = after.0.duration_since(self.o.now).unsigned_abs();
                // The restart's own message (why, and when) stays until the workers start, and so
                // does a startup timeout's (in PodsReady).
                let why = conditions::get(&self.decision.status.conditions, cond::PODS_READY)
                    .filter(|c| c.reason == "StartupTimeout")
                    .map(|c| c.message.clone());
                let msg = match why {
                    Some(why) => why,
                    None => {
                        let msg = format!("waiting until {} before the gang restart", after.0);
                        self.set(cond::PODS_READY, FALSE, waiting_phase.as_str(), msg.clone());
                        msg
                    }
                };
                self.wait_phase(waiting_phase, msg);
                self.decision.requeue = Some(Duration::from_secs(wait.as_secs() + 1));
                return;
            }
        }
        if !stale.is_empty() {
            let (reason, msg) = stale_workers(stale, waiting_phase);
            self.set(cond::PODS_READY, FALSE, reason, msg.clone());
            self.wait_phase(waiting_phase, msg);
            self.decision.requeue = Some(STOPPING_REQUEUE);
            return;
        }
        if current.is_empty() {
            if let DatasetCheck::Missing(msg) = &self.o.dataset {
                self.set(cond::DATASET_READY, FALSE, "DatasetNotFound", msg.clone());
                self.phase(waiting_phase, msg.clone());
                self.decision.requeue = Some(DATASET_REQUEUE);
                return;
            }
        }
        // A gang being completed is not training; a training figure left open would run on.
        let now = self.o.now;
        usage::stop(self.usage(), None, now);
        let n = self.decision.status.workers;
        let msg = format!("creating {} of {n} workers", missing.len());
        self.decision.create = missing;
        let (attempt, now) = (self.decision.status.attempt, self.now.clone());
        let st = self.st();
        if st.launched_attempt != Some(attempt) || st.attempt_start_time.is_none() {
            st.attempt_start_time = Some(now);
        }
        st.launched_attempt = Some(attempt);
        st.restart_after = None;
        if !self.is(cond::DATASET_READY) {
            self.set(
                cond::DATASET_READY,
                UNKNOWN,
                WAITING_FOR_WORKERS,
                "not prepared yet: the workers prepare it once they start",
            );
        }
        self.set(cond::PODS_READY, FALSE, "Creating", msg.clone());
        self.phase(waiting_phase, msg);
        self.decision.requeue = Some(STARTING_REQUEUE);
    }

    /// Enters a waiting phase; during a restart the message that says why is kept.
    pub(super) fn wait_phase(&mut self, phase: Phase, message: String) {
        if phase == Phase::Restarting && self.decision.status.phase == Some(Phase::Restarting) {
            return;
        }
        self.phase(phase, message);
    }

    /// All workers of the attempt exist: are they running yet?
    pub(super) fn observe_gang(&mut self, current: &[&Worker], effective: &EffectiveSettings) {
        let n = current.len();
        let running = current
            .iter()
            .filter(|w| w.state == WorkerState::Running)
            .count();
        // Workers other than 0 may finish a moment before worker 0 writes the final report.
        let settled = current.iter().all(|w| {
            w.state == WorkerState::Running
                || (w.index != Some(0) && matches!(w.state, WorkerState::Succeeded { .. }))
        });
        if settled {
            let msg = format!("{running}/{n} workers running");
            self.say_dataset_prepared();
            self.set(cond::PODS_READY, TRUE, "AllWorkersRunning", msg.clone());
            self.set(cond::RUNNING, TRUE, "Training", msg.clone());
            if self.is(cond::RESTARTING) {
                let restarts = self.decision.status.restarts;
                self.set(
                    cond::RESTARTING,
                    FALSE,
                    "Recovered",
                    format!("all workers run again after {restarts} restart(s)"),
                );
            }
            let now = self.now.clone();
            self.st().start_time.get_or_insert(now);
            let (started, gpus, now) = (usage::gang_started(current), effective.gpus, self.o.now);
            usage::start(self.usage(), started, gpus, now);
            if let Some(report) = &self.o.progress {
                self.take_progress(report);
            }
            let msg = match &self.decision.status.progress {
                Some(p) => format!(
                    "training: step {} of ~{}",
                    p.step,
                    p.total_steps_estimate.map_or("?".into(), |t| t.to_string())
                ),
                None => "training".to_string(),
            };
            self.phase(Phase::Running, msg);
            self.decision.requeue = Some(RUNNING_REQUEUE);
            return;
        }

        if let Some((w, waiting)) = current.iter().find_map(|w| match &w.state {
            WorkerState::Pending {
                waiting: Some(x), ..
            } if x.is_terminal() => Some((w, x)),
            _ => None,
        }) {
            self.cannot_start(current, &w.name, waiting);
            return;
        }
        if self.startup_timed_out(current) {
            return;
        }
        let unschedulable = current.iter().find_map(|w| match &w.state {
            WorkerState::Pending {
                unschedulable: Some(why),
                ..
            } => Some(format!("{}: {why}", w.name)),
            _ => None,
        });
        let waiting = current.iter().find_map(|w| match &w.state {
            WorkerState::Pending {
                waiting: Some(x), ..
            } => Some((x.reason.clone(), x.describe(&w.name))),
            _ => None,
        });
        let preparing = current
            .iter()
            .filter(|w| {
                matches!(
                    w.state,
                    WorkerState::Pending {
                        preparing: true,
                        ..
                    }
                )
            })
            .count();
        let (reason, msg) = if let Some(why) = unschedulable {
            ("Unschedulable".to_string(), why)
        } else if let Some((reason, why)) = waiting {
            let timeout = self.startup_timeout();
            (
                condition_reason(&reason),
                format!(
                    "{why}; the kubelet retries it, and the workers are released if they have not \
                     all started {timeout}s after they were created (startupTimeoutSeconds)"
                ),
            )
        } else if preparing > 0 {
            (
                "Initializing".to_string(),
                format!("{preparing}/{n} workers prepare the dataset"),
            )
        } else {
            (
                "Starting".to_string(),
                format!("{running}/{n} workers running"),
            )
        };
        let prepared = current.iter().filter(|w| w.dataset_prepared()).count();
        if preparing > 0 {
            self.set(
                cond::DATASET_READY,
                UNKNOWN,
                "Preparing",
                format!("{preparing}/{n} workers prepare the dataset"),
            );
        } else if prepared == n {
            self.say_dataset_prepared();
        } else {
            self.dataset_waits(&format!(
                "{prepared}/{n} workers prepared it and none is preparing it ({msg})"
            ));
        }
        self.set(cond::PODS_READY, FALSE, &reason, msg.clone());
        self.set(cond::RUNNING, FALSE, &reason, msg.clone());
        let phase = if self.is(cond::RESTARTING) {
            Phase::Restarting
        } else {
            Phase::Pending
        };
        self.phase(phase, msg);
        self.decision.requeue = Some(STARTING_REQUEUE);
    }

    /// A worker's container can never start (its image's name cannot be parsed): no retry can
    /// help, so the training fails once, naming the field to fix, as for a spec the API server
    /// refused; a changed spec starts again.
    pub(super) fn cannot_start(&mut self, current: &[&Worker], pod: &str, waiting: &Waiting) {
        let field = if self.o.training.spec.image.is_some() {
            "spec.image"
        } else {
            "the operator's default trainer image (chart value trainerImage), or set spec.image,"
        };
        let message = format!(
            "{}; no retry can help: fix {field} and apply the training again",
            waiting.describe(pod)
        );
        let reason = condition_reason(&waiting.reason);
        self.fail(current, &reason, message);
    }

    pub(super) fn startup_timeout(&self) -> i32 {
        self.o
            .training
            .spec
            .startup_timeout_seconds
            .unwrap_or(crate::crd::DEFAULT_STARTUP_TIMEOUT_SECONDS)
    }

    /// A gang that is not all placed `startupTimeoutSeconds` after its pods were created holds
    /// GPUs that train nothing: its workers go, and after the backoff a new attempt tries again.
    /// Not a failure of the training, so `restarts` stays; `startupTimeouts` counts it.
    pub(super) fn startup_timed_out(&mut self, current: &[&Worker]) -> bool {
        let spec = &self.o.training.spec;
        let timeout = self.startup_timeout();
        let Some(started) = self.decision.status.attempt_start_time.clone() else {
            return false;
        };
        if self.o.now.duration_since(started.0) < SignedDuration::from_secs(i64::from(timeout)) {
            return false;
        }
        // Not placed, or placed but with containers that never started (an image that cannot
        // be pulled, a Secret that does not exist). A worker that prepares the dataset works.
        let mut unplaced = 0;
        let stuck: Vec<String> = current
            .iter()
            .filter_map(|w| {
                let why = match &w.state {
                    WorkerState::Pending {
                        unschedulable: Some(why),
                        ..
                    } => why.clone(),
                    WorkerState::Pending {
                        scheduled: false, ..
                    } => "not scheduled yet".to_string(),
                    WorkerState::Pending {
                        waiting: Some(x), ..
                    } => return Some(x.describe(&w.name)),
                    WorkerState::Pending {
                        preparing: false, ..
                    } => return Some(format!("{}: its containers have not started", w.name)),
                    _ => return None,
                };
                unplaced += 1;
                Some(format!("{} ({why})", w.name))
            })
            .collect();
        if stuck.is_empty() {
            return false;
        }
        self.stop_usage(current);
        self.delete(current, false);
        let base = spec.restart_policy.backoff_seconds;
        let backoff = Duration::from_secs(u64::try_from(base).unwrap_or(0));
        let (now, placed) = (self.o.now, current.len() - unplaced);
        let st = self.st();
        st.attempt += 1;
        st.startup_timeouts += 1;
        st.launched_attempt = None;
        st.attempt_start_time = None;
        st.running_workers = 0;
        st.restart_after = Some(Time(
            now + SignedDuration::try_from(backoff).unwrap_or(SignedDuration::ZERO),
        ));
        let what = if unplaced == stuck.len() {
            "was placed"
        } else {
            "was placed and started"
        };
        let msg = format!(
            "not every worker {what} within {timeout}s (startupTimeoutSeconds): {}; \
             released the {placed} placed worker(s) and trying again in {}s (not counted as a restart)",
            stuck.join("; "),
            backoff.as_secs()
        );
        self.dataset_waits("no attempt has started every worker yet (see PodsReady)");
        self.set(cond::PODS_READY, FALSE, "StartupTimeout", msg.clone());
        self.set(cond::RUNNING, FALSE, "StartupTimeout", msg.clone());
        self.phase(Phase::Pending, msg);
        self.decision.requeue = Some(backoff.max(STOPPING_REQUEUE));
        true
    }
}

/// PodsReady while the previous attempt's pods are still there: which, and why they stay. A pod
/// on a lost node stays `Terminating` until its kubelet confirms the end (the node comes back) or
/// the node is deleted: never forced away, since its trainer may still run and write checkpoints
/// on the shared volume (StatefulSet's rule for the same reason).
pub(super) fn stale_workers(stale: &[&Worker], waiting: Phase) -> (&'static str, String) {
    let on_lost: Vec<String> = stale
        .iter()
        .filter_map(|w| {
            let (node, why) = (w.node.as_deref()?, w.node_lost.as_deref()?);
            Some(format!(
                "{} is still terminating on node {node}: {why}; Kubernetes removes it once the \
                 node is back, or deleted (`kubectl delete node {node}` if it will not return)",
                w.name
            ))
        })
        .collect();
    if !on_lost.is_empty() {
        return (
            "NodeLost",
            format!(
                "waiting for the previous workers to stop: {}",
                on_lost.join("; ")
            ),
        );
    }
    let names: Vec<&str> = stale.iter().map(|w| w.name.as_str()).collect();
    (
        waiting.as_str(),
        format!(
            "waiting for the previous workers to stop: {}",
            names.join(", ")
        ),
    )
}

/// A kubelet's reason as a condition reason (CamelCase letters and digits; the API's pattern
/// for `metav1.Condition`), so an odd runtime's reason cannot make the status invalid.
pub(super) fn condition_reason(reason: &str) -> String {
    let clean: String = reason
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .collect();
    match clean.chars().next() {
        Some(c) if c.is_ascii_alphabetic() => clean,
        _ => "ContainerNotStarted".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use crate::decision::testing::*;

    #[test]
    fn unschedulable_workers_say_why() {
        let t = training(gpu_spec());
        let t = with(t.clone(), &decide_at(&t, &[], 0));
        let pods = vec![
            unschedulable(
                pod(&t, 0, 0),
                "0/6 nodes are available: 6 Insufficient nvidia.com/gpu.",
            ),
            pod(&t, 1, 0),
        ];
        let d = decide_at(&t, &pods, 5);
        assert_eq!(d.status.phase, Some(Phase::Pending));
        assert_eq!(condition(&d, c::PODS_READY), ("False", "Unschedulable"));
        assert!(d
            .status
            .message
            .unwrap()
            .contains("Insufficient nvidia.com/gpu"));
        assert!(d.create.is_empty() && d.delete.is_empty());
    }

    #[test]
    fn a_container_that_cannot_start_is_said_at_once_and_ends_at_the_startup_timeout() {
        let t = starting_gpu_training();
        let pull = "Back-off pulling image \"registry.invalid/charlm:1\": not found";
        let pods = vec![
            waiting(pod(&t, 0, 0), "prepare", "ImagePullBackOff", pull),
            running(pod(&t, 1, 0), "10.0.0.2"),
        ];
        let d = decide_at(&t, &pods, 5);
        assert_eq!(d.status.phase, Some(Phase::Pending));
        assert_eq!(condition(&d, c::PODS_READY), ("False", "ImagePullBackOff"));
        assert_eq!(condition(&d, c::RUNNING), ("False", "ImagePullBackOff"));
        let msg = message(&d);
        assert!(
            msg.starts_with("demo-worker-0: container prepare cannot start: ImagePullBackOff: ")
                && msg.contains(pull)
                && msg.contains("600s after they were created (startupTimeoutSeconds)"),
            "{msg}"
        );
        let pods_ready = conditions::get(&d.status.conditions, c::PODS_READY).unwrap();
        assert!(warns(pods_ready), "a Warning event for kubectl describe");
        // Nobody prepares the dataset: it does not say so.
        assert_eq!(
            condition(&d, c::DATASET_READY),
            ("Unknown", "WaitingForWorkers")
        );
        assert!(d.create.is_empty() && d.delete.is_empty());
        let t = with(t, &d);

        // The startup timeout counts it, as it counts unplaced workers: both go, not counted.
        let d = decide_at(&t, &pods, 600);
        assert_eq!((d.status.startup_timeouts, d.status.restarts), (1, 0));
        assert_eq!(d.status.attempt, 1);
        assert_eq!(d.delete, ["demo-worker-0", "demo-worker-1"]);
        assert_eq!(condition(&d, c::PODS_READY), ("False", "StartupTimeout"));
        let msg = message(&d);
        assert!(
            msg.contains("not every worker was placed and started within 600s")
                && msg.contains("demo-worker-0: container prepare cannot start: ImagePullBackOff")
                && msg.contains("released the 2 placed worker(s)"),
            "{msg}"
        );
    }

    #[test]
    fn a_missing_secret_holds_the_trainer_back_after_the_dataset_was_prepared() {
        let t = starting_gpu_training();
        let pods = vec![
            waiting(
                pod(&t, 0, 0),
                TRAINER_CONTAINER,
                "CreateContainerConfigError",
                "secret \"wandb\" not found",
            ),
            running(pod(&t, 1, 0), "10.0.0.2"),
        ];
        let d = decide_at(&t, &pods, 5);
        assert_eq!(
            condition(&d, c::PODS_READY),
            ("False", "CreateContainerConfigError")
        );
        assert!(message(&d).contains("container trainer cannot start: CreateContainerConfigError: secret \"wandb\" not found"));
        assert_eq!(condition(&d, c::DATASET_READY), ("True", "Prepared"));
        // Still waiting a moment before the timeout; then released like the rest.
        let t = with(t, &d);
        assert_eq!(decide_at(&t, &pods, 599).status.startup_timeouts, 0);
        assert_eq!(decide_at(&t, &pods, 601).status.startup_timeouts, 1);
    }

    #[test]
    fn an_image_name_that_cannot_be_parsed_fails_at_once_naming_the_field() {
        let t = starting_gpu_training();
        let t = with_spec(t, |s| s["image"] = "Charlm/Trainer:1".into());
        let pods = vec![
            waiting(
                pod(&t, 0, 0),
                "prepare",
                "InvalidImageName",
                "Failed to apply default image tag \"Charlm/Trainer:1\": couldn't parse image name",
            ),
            running(pod(&t, 1, 0), "10.0.0.2"),
        ];
        let d = decide_at(&t, &pods, 5);
        assert_eq!(d.status.phase, Some(Phase::Failed));
        assert_eq!(condition(&d, c::FAILED), ("True", "InvalidImageName"));
        let msg = message(&d);
        assert!(
            msg.contains("couldn't parse image name") && msg.contains("fix spec.image"),
            "{msg}"
        );
        assert_eq!((d.status.restarts, d.status.startup_timeouts), (0, 0));
        assert_eq!(d.status.failed_generation, Some(1));
        // Neither will ever train: both are freed (the waiting one has no log to keep).
        assert_eq!(d.delete, ["demo-worker-0", "demo-worker-1"]);
        assert_eq!(condition(&d, c::DATASET_READY), ("False", "NotPrepared"));
    }

    #[test]
    fn a_gang_not_placed_in_time_lets_go_without_counting_a_restart() {
        let mut spec = gpu_spec();
        spec["startupTimeoutSeconds"] = 60.into();
        let t = training(spec);
        let d = decide_at(&t, &[], 0);
        let t = with(t, &d);
        let pods = vec![
            running(pod(&t, 0, 0), "10.0.0.1"),
            unschedulable(
                pod(&t, 1, 0),
                "0/4 nodes are available: 4 Insufficient nvidia.com/gpu",
            ),
        ];
        let d = decide_at(&t, &pods, 30);
        assert_eq!(condition(&d, c::PODS_READY), ("False", "Unschedulable"));
        assert!(d.delete.is_empty());
        let t = with(t, &d);
        let d = decide_at(&t, &pods, 61);
        assert_eq!(condition(&d, c::PODS_READY), ("False", "StartupTimeout"));
        let msg = &conditions::get(&d.status.conditions, c::PODS_READY)
            .unwrap()
            .message;
        assert!(
            msg.contains("demo-worker-1 (0/4 nodes are available: 4 Insufficient nvidia.com/gpu)"),
            "{msg}"
        );
        assert_eq!(d.delete.len(), 2, "the placed worker is released too");
        assert_eq!(
            (
                d.status.restarts,
                d.status.startup_timeouts,
                d.status.attempt
            ),
            (0, 1, 1)
        );
        assert_eq!(d.status.phase, Some(Phase::Pending));
        // After the backoff, a fresh attempt.
        let t = with(t, &d);
        let d = decide_at(&t, &[], 61 + 11);
        assert_eq!(d.create, [0, 1]);
        assert_eq!(d.status.launched_attempt, Some(1));
    }
}
