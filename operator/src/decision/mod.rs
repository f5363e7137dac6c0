//! The operator's one decision: from what is observed (the training, its worker pods, whether its
//! dataset exists, rank 0's latest report, the nodes of lost workers) to what should be done (pods
//! to create or delete) and the status to write. No I/O happens here; `controller` gathers the
//! facts and carries out the result.
//!
//! Gang semantics: the workers of an attempt start together and end together. Any worker that fails
//! (or stops before the budget is done, or disappears) ends the attempt: all its pods are deleted and,
//! after a backoff, a new attempt starts from the last checkpoint, up to `restartPolicy.maxRestarts`.
//! What a failure does depends on its reason (`failures`): by default the cluster's disruptions
//! restart without counting, bad input (exit code 2) and running out of memory fail the training at
//! once. Pods carry their attempt as a label, so a decision never depends on which of several
//! reconciles saw a pod first.
//!
//! `Decider::run` (here) takes the policies in order, each in its room with its tests beside it:
//! `spec` (which settings the attempt runs with, a changed or unrunnable spec), `volume` (the
//! checkpoint claim, someone else's objects), `clocks` (deadline, TTL), `queue` (suspend, Kueue),
//! `success`, `failure` (why an attempt ended) and `restart` (what that does), `startup` (creating
//! the gang, waiting for it, the startup timeout), `dataset` (DatasetReady), `progress` (rank 0's
//! report: progress, best, PastBest, the budget advice). `testing` builds what the tests observe.

mod clocks;
mod dataset;
mod failure;
mod progress;
mod queue;
mod restart;
mod spec;
mod startup;
mod success;
#[cfg(test)]
mod testing;
mod volume;

pub use restart::backoff;

use std::collections::BTreeSet;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;

use crate::conditions::{self, FALSE, TRUE, UNKNOWN};
use crate::crd::{condition as cond, CharLMTraining, CharLMTrainingStatus, Phase};
use crate::failures::FailureRecord;
use crate::kueue::Gate;
use crate::resources::pvc_name;
use crate::usage;
use crate::volume::Claim;
use crate::workers::{Worker, WorkerState};
use charlm_contract::ProgressReport;
use success::worker_report;

/// Longest wait between gang restarts, however many there were.
pub const MAX_BACKOFF: Duration = Duration::from_secs(600);
/// How often a running training is looked at again (and its progress read).
pub const RUNNING_REQUEUE: Duration = Duration::from_secs(30);
const STARTING_REQUEUE: Duration = Duration::from_secs(15);
const STOPPING_REQUEUE: Duration = Duration::from_secs(2);
const DATASET_REQUEUE: Duration = Duration::from_secs(30);
const RECHECK_MIN: Duration = Duration::from_secs(10);
/// Damaged checkpoints the status names at most.
const MAX_DAMAGED: usize = 16;

/// Whether the training's dataset source exists (a synthetic one always does).
#[derive(Clone, Debug, PartialEq)]
pub enum DatasetCheck {
    Available,
    /// The message names the missing object and how to provide it.
    Missing(String),
}

pub struct Observed<'a> {
    pub training: &'a CharLMTraining,
    /// Every pod labelled with the training's name, whatever its attempt.
    pub workers: Vec<Worker>,
    pub dataset: DatasetCheck,
    /// Rank 0's `/progress`, read just now if the training runs.
    pub progress: Option<ProgressReport>,
    pub now: Timestamp,
    /// The operator's price per GPU-hour, for `status.usage.estimatedCost`.
    pub price_per_gpu_hour: f64,
    /// The API server refused an object made from the spec (a pod, the claim): its message,
    /// with the spec field to fix. Retrying the same spec cannot help.
    pub rejection: Option<String>,
    /// Kueue's word, for a training that names a LocalQueue (`kueue`); `None`: not queued.
    pub queue: Option<Gate>,
    /// The checkpoint claim, and the objects of the training's names that are someone else's.
    pub objects: Objects,
}

/// What the API server holds under the names of the training's objects besides its pods' states.
#[derive(Clone, Debug, PartialEq)]
pub struct Objects {
    /// What is under the checkpoint claim's name (`volume`).
    pub claim: Claim,
    /// The StorageClass the claim waits for (or the spec names, before there is a claim) does
    /// not exist (`volume::class_to_check`).
    pub class_missing: bool,
    /// Objects of the training's names (its Service, NetworkPolicy, a worker pod's) that are not
    /// its own (`ownership`), each as a message naming it and the fix: no workers start while
    /// any is there, and the operator changes nothing on them.
    pub conflicts: Vec<String>,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Decision {
    /// The complete status to write. Its `effective` settings shape the workers to create.
    pub status: CharLMTrainingStatus,
    /// Worker indices to create, for attempt `status.attempt`.
    pub create: Vec<i32>,
    /// Names of pods to delete.
    pub delete: Vec<String>,
    pub requeue: Option<Duration>,
    /// The failure that ended the attempt in this decision, for its Event.
    pub failure: Option<FailureRecord>,
    /// `ttlSecondsAfterFinished` has passed: delete the training (its finalizer cleans up).
    pub delete_training: bool,
    /// Kueue evicted the Workload and no worker runs any more: give its quota back (as Kueue's
    /// jobframework does once an evicted job stopped), so Kueue queues it again.
    pub release_quota: bool,
    /// Make the checkpoint claim (before any worker).
    pub create_claim: bool,
    /// Warning Events that no condition's transition carries: (reason, note).
    pub warnings: Vec<(String, String)>,
}

pub fn decide(o: &Observed) -> Decision {
    let mut d = Decider::new(o);
    d.run();
    d.forget_lost();
    d.clocks();
    let usage = d.decision.status.usage.get_or_insert_with(Default::default);
    usage::refresh(usage, o.now, o.price_per_gpu_hour);
    d.decision
}

struct Decider<'a> {
    o: &'a Observed<'a>,
    now: Time,
    generation: Option<i64>,
    decision: Decision,
    /// Why no new workers may start: (the condition that says so, its reason, the message).
    blocked: Option<(&'static str, &'static str, String)>,
}

impl<'a> Decider<'a> {
    fn new(o: &'a Observed<'a>) -> Self {
        let t = o.training;
        let mut status = t.status.clone().unwrap_or_default();
        status.observed_generation = t.metadata.generation;
        status.checkpoint_pvc = Some(pvc_name(&t.name_any()));
        Decider {
            o,
            now: Time(o.now),
            generation: t.metadata.generation,
            decision: Decision {
                status,
                ..Default::default()
            },
            blocked: None,
        }
    }

    fn st(&mut self) -> &mut CharLMTrainingStatus {
        &mut self.decision.status
    }

    fn set(&mut self, type_: &str, status: &str, reason: &str, message: impl Into<String>) {
        let (generation, now) = (self.generation, self.now.clone());
        conditions::set(
            &mut self.decision.status.conditions,
            type_,
            status,
            reason,
            message,
            generation,
            &now,
        );
    }

    fn phase(&mut self, phase: Phase, message: impl Into<String>) {
        self.st().phase = Some(phase);
        self.st().message = Some(message.into());
    }

    fn is(&self, type_: &str) -> bool {
        conditions::is_true(&self.decision.status.conditions, type_)
    }

    fn usage(&mut self) -> &mut crate::crd::UsageStatus {
        self.decision
            .status
            .usage
            .get_or_insert_with(Default::default)
    }

    /// The gang stopped training (now, or when its first trainer ended).
    fn stop_usage(&mut self, current: &[&Worker]) {
        let (ended, now) = (usage::gang_ended(current), self.o.now);
        usage::stop(self.usage(), ended, now);
    }

    fn delete(&mut self, workers: &[&Worker], active_only: bool) {
        for w in workers {
            if !w.terminating && (!active_only || w.is_active()) {
                self.decision.delete.push(w.name.clone());
            }
        }
    }

    /// Every condition exists from the first reconcile on, so `kubectl wait` has something to read.
    fn initial_conditions(&mut self) {
        let initial = [
            (cond::DATASET_READY, UNKNOWN, "Pending"),
            (cond::PODS_READY, FALSE, "Pending"),
            (cond::RUNNING, FALSE, "Pending"),
            (cond::SUCCEEDED, FALSE, "Pending"),
            (cond::FAILED, FALSE, "Pending"),
            (cond::SUSPENDED, FALSE, "Pending"),
            (cond::RESTARTING, FALSE, "Pending"),
            (cond::CHECKPOINT_VOLUME_READY, UNKNOWN, "Pending"),
        ];
        for (type_, status, reason) in initial {
            if conditions::get(&self.decision.status.conditions, type_).is_none() {
                self.set(type_, status, reason, "");
            }
        }
        if self.decision.status.phase.is_none() {
            self.phase(
                Phase::Pending,
                "waiting for the first reconcile to create the workers",
            );
        }
    }

    fn run(&mut self) {
        self.initial_conditions();
        let o = self.o;
        let spec = &o.training.spec;

        self.spec_changed_after_failure();
        let Some(effective) = self.settings() else {
            return;
        };
        self.st().workers = effective.workers;
        self.st().effective = Some(effective.clone());
        self.checkpoint_volume();

        let attempt = self.decision.status.attempt;
        let wanted = effective.workers;
        let (current, stale): (Vec<&Worker>, Vec<&Worker>) = o.workers.iter().partition(|w| {
            w.attempt == Some(attempt) && w.index.is_some_and(|i| (0..wanted).contains(&i))
        });
        self.delete(&stale, false);
        self.st().running_workers = current
            .iter()
            .filter(|w| w.state == WorkerState::Running)
            .count() as i32;

        if let Some(phase) = self.decision.status.phase.filter(|p| p.is_terminal()) {
            // Finished trainings keep their ended pods for `kubectl logs` and free the rest.
            self.delete(&current, true);
            self.set(cond::RUNNING, FALSE, phase.as_str(), "");
            return;
        }

        if self.deadline_passed() {
            match self.success(&current) {
                Some(report) => self.succeed(&current, report),
                None => self.stop_for_deadline(&current),
            }
            return;
        }
        if spec.suspended() {
            self.suspend(&current);
            return;
        }
        if let Some(gate) = &o.queue {
            if !self.admitted(gate, &current) {
                return;
            }
        }
        if self.is(cond::SUSPENDED) {
            self.set(
                cond::SUSPENDED,
                FALSE,
                "Resumed",
                "spec.suspend is false: the workers start again from the last checkpoint",
            );
        }

        if let Some(report) = self.success(&current) {
            self.succeed(&current, report);
            return;
        }
        if let Some(ending) = self.failure(&current, wanted) {
            if let Some(report) = current.iter().find_map(|w| worker_report(w)) {
                self.take_progress(&report);
            }
            self.handle_failure(&current, ending);
            return;
        }

        let present: BTreeSet<i32> = current.iter().filter_map(|w| w.index).collect();
        let missing: Vec<i32> = (0..wanted).filter(|i| !present.contains(i)).collect();
        if !missing.is_empty() {
            self.start(&current, &stale, missing);
            return;
        }
        self.observe_gang(&current, &effective);
    }
}

/// PodsReady's reasons while the workers come and go as they should; any other (Unschedulable,
/// StartupTimeout, a kubelet's reason such as ImagePullBackOff) says something is wrong.
const PODS_READY_AS_EXPECTED: [&str; 10] = [
    "Pending",
    "Creating",
    "Initializing",
    "Starting",
    "AllWorkersRunning",
    "Restarting",
    "Suspended",
    "Queued",
    "Completed",
    "Failed",
];

/// Is this condition's change a Warning Event (`kubectl describe` lists those as what is wrong)?
pub fn warns(c: &k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition) -> bool {
    match c.type_.as_str() {
        cond::FAILED | cond::RESTARTING => c.status == TRUE,
        cond::PODS_READY => {
            c.status == FALSE && !PODS_READY_AS_EXPECTED.contains(&c.reason.as_str())
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::testing::*;

    #[test]
    fn a_new_training_creates_all_workers() {
        let t = training(gpu_spec());
        let d = decide_at(&t, &[], 0);
        assert_eq!(d.create, [0, 1]);
        assert!(d.delete.is_empty());
        assert_eq!(d.status.phase, Some(Phase::Pending));
        assert_eq!(d.status.workers, 2);
        assert_eq!(d.status.launched_attempt, Some(0));
        assert_eq!(d.status.checkpoint_pvc.as_deref(), Some("demo-checkpoints"));
        assert_eq!(d.status.observed_generation, Some(1));
        assert_eq!(d.status.conditions.len(), 8);
        assert_eq!(
            condition(&d, c::CHECKPOINT_VOLUME_READY),
            ("True", "Bound"),
            "its claim is there and bound"
        );
        assert_eq!(d.status.checkpoint_pvc_uid.as_deref(), Some("claim-1"));
        assert_eq!(condition(&d, c::PODS_READY), ("False", "Creating"));
    }

    #[test]
    fn running_gang_reports_running_and_progress() {
        let (t, pods) = running_gpu_training();
        let d = look(&t, &pods, 40)
            .report(Some(
                r#"{"step": 1200, "total_steps_estimate": 9000, "train_loss": 0.92, "eta_s": 51600.0, "checkpoint": "/checkpoints/step-000001200", "complete": false}"#,
            ))
            .decide();
        assert!(d.create.is_empty() && d.delete.is_empty());
        assert_eq!(d.status.phase, Some(Phase::Running));
        assert_eq!(d.status.running_workers, 2);
        assert_eq!(condition(&d, c::RUNNING), ("True", "Training"));
        assert_eq!(condition(&d, c::PODS_READY), ("True", "AllWorkersRunning"));
        assert_eq!(condition(&d, c::DATASET_READY), ("True", "Prepared"));
        let p = d.status.progress.as_ref().unwrap();
        assert_eq!(p.step, 1200);
        assert_eq!(
            d.status.loss_history,
            [crate::crd::LossPoint {
                step: 1200,
                loss: 0.92
            }],
            "the reported loss is a point of the curve"
        );
        assert_eq!(d.status.eta.as_deref(), Some("14h20m"));
        assert_eq!(
            d.status.latest_checkpoint.as_deref(),
            Some("/checkpoints/step-000001200")
        );
        assert_eq!(d.status.start_time, Some(Time(at(5))));
        assert_eq!(d.requeue, Some(RUNNING_REQUEUE));
    }

    #[test]
    fn pods_of_other_attempts_or_shapes_are_removed_first() {
        let t = training(cpu_spec());
        let mut t2 = t.clone();
        t2.status = Some(CharLMTrainingStatus {
            attempt: 2,
            ..Default::default()
        });
        // A leftover of attempt 1 and a pod of index 5 that the spec no longer has.
        let pods = vec![pod(&t, 0, 1), pod(&t, 5, 2)];
        let d = decide_at(&t2, &pods, 0);
        assert_eq!(d.delete, ["demo-worker-0", "demo-worker-5"]);
        assert!(d.create.is_empty());
    }

    #[test]
    fn gpu_hours_count_the_time_the_whole_gang_trained() {
        let t = training(gpu_spec());
        let t = with(t.clone(), &decide_at(&t, &[], 0));
        // Worker 1's trainer starts 20 s after worker 0's: the gang trains from then on.
        let pods = vec![
            stamped(running(pod(&t, 0, 0), "10.0.0.1"), 100, None),
            stamped(running(pod(&t, 1, 0), "10.0.0.2"), 120, None),
        ];
        let d = decide_at(&t, &pods, 130);
        let u = d.status.usage.clone().unwrap();
        assert_eq!(u.training_since, Some(Time(at(120))));
        assert_eq!(
            (u.training_gpus, u.gpu_hours, u.estimated_cost),
            (16, 0.0, 0.0)
        );
        let t = with(t, &d);

        // An hour later: 16 GPU-hours at $3.
        let d = decide_at(&t, &pods, 120 + 3600 + 30);
        let u = d.status.usage.clone().unwrap();
        assert_eq!(
            (u.gpu_hours, u.estimated_cost, u.price_per_gpu_hour),
            (16.0, 48.0, 3.0)
        );
        let t = with(t, &d);

        // Worker 1 crashes 2 hours in; the gang is restarted, and those 2 hours are kept.
        let mut ended = pods.clone();
        ended[1] = stamped(
            terminated(pod(&t, 1, 0), TRAINER_CONTAINER, 1, "crash"),
            120,
            Some(120 + 7200),
        );
        let d = decide_at(&t, &ended, 120 + 7200 + 40);
        assert_eq!(d.status.phase, Some(Phase::Restarting));
        let u = d.status.usage.clone().unwrap();
        assert_eq!(u.ended_attempts_gpu_seconds, 16 * 7200);
        assert!(u.training_since.is_none());
        assert_eq!((u.gpu_hours, u.estimated_cost), (32.0, 96.0));
        // Waiting for the backoff costs nothing.
        let t = with(t, &d);
        let d = decide_at(&t, &[], 120 + 7200 + 45);
        assert_eq!(d.status.usage.unwrap().gpu_hours, 32.0);
    }

    #[test]
    fn a_preset_training_gets_its_workers_and_shows_its_settings() {
        let t = training(serde_json::json!({
            "preset": "budget-100", "dataset": {"synthetic": {}}
        }));
        let d = decide_at(&t, &[], 0);
        assert_eq!(d.create, [0]);
        assert_eq!(d.status.workers, 1);
        let e = d.status.effective.unwrap();
        assert_eq!((e.depth, e.gpus, e.hours), (24, 2, Some(16.0)));
        assert_eq!(e.device_batch_size, crate::crd::DeviceBatchSize::Fixed(8));
        let u = d.status.usage.unwrap();
        assert_eq!((u.gpu_hours, u.estimated_cost), (0.0, 0.0));
    }
}
