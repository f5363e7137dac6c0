//! The reconciler's one decision: from what is observed (the training, its worker pods, whether its
//! dataset exists, rank 0's latest report) to what should be done (pods to create or delete) and the
//! status to write. No I/O happens here; `controller` gathers the facts and carries out the result.
//!
//! Gang semantics: the workers of an attempt start together and end together. Any worker that fails
//! (or stops before the budget is done, or disappears) ends the attempt: all its pods are deleted and,
//! after a backoff, a new attempt starts from the last checkpoint, up to `restartPolicy.maxRestarts`.
//! What a failure does depends on its reason (`failures`): by default the cluster's disruptions
//! restart without counting, bad input (exit code 2) and running out of memory fail the training at
//! once. Pods carry their attempt as a label, so a decision never depends on which of several
//! reconciles saw a pod first.

use std::collections::BTreeSet;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::ResourceExt;

use crate::conditions::{self, FALSE, TRUE, UNKNOWN};
use crate::crd::{
    condition as cond, CharLMTraining, CharLMTrainingStatus, EffectiveSettings, Phase,
    ProgressStatus,
};
use crate::crd::{FailureAction, FailureReason};
use crate::deadlines;
use crate::effective;
use crate::failures::{self, FailureRecord};
use crate::history;
use crate::kueue::{Gate, State as QueueState};
use crate::progress::{human_duration, TrainerReport};
use crate::resources::{pod_name, pvc_name};
use crate::usage;
use crate::volume::{self, Claim};
use crate::workers::{Waiting, Worker, WorkerState};
use charlm_budget as planner;
use charlm_contract::PAST_BEST_EVALUATIONS;

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
    pub progress: Option<TrainerReport>,
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

/// How a worker ended the attempt: the condition reason (`WorkerFailed`, `WorkerStopped`,
/// `WorkerLost`), the failure reason the rules act on, the pod, and one line on what happened.
struct Ending {
    kind: &'static str,
    reason: FailureReason,
    pod: String,
    /// The container that failed, when one did (`generate`, `prepare`, `trainer`).
    container: Option<String>,
    message: String,
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

        // A spec changed after a failure (e.g. a fixed dataset) gets a fresh attempt.
        if self.decision.status.phase == Some(Phase::Failed)
            && self.generation > self.decision.status.failed_generation
        {
            let st = self.st();
            st.attempt += 1;
            st.restarts = 0;
            st.failed_generation = None;
            st.completion_time = None;
            st.restart_after = None;
            st.launched_attempt = None;
            self.set(
                cond::FAILED,
                FALSE,
                "SpecChanged",
                "the spec changed after the failure; starting again",
            );
            self.phase(
                Phase::Pending,
                "the spec changed after the failure; starting again",
            );
        }

        let mut resolved = match effective::resolve(spec) {
            Ok(e) => e,
            Err(message) => {
                self.invalid_spec(message);
                return;
            }
        };
        if let Some(message) = &o.rejection {
            self.invalid_spec(message.clone());
            return;
        }
        resolved.generation = self.generation;
        // The running attempt keeps the settings it was started with; a changed spec shapes the
        // next attempt (docs/operator.md, "Spec changes while running").
        let st = &self.decision.status;
        let launched =
            st.launched_attempt == Some(st.attempt) || st.phase.is_some_and(|p| p.is_terminal());
        let effective = match st.effective.clone() {
            Some(recorded) if launched => recorded,
            _ => resolved,
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

    /// A spec the operator cannot run (one the API server stored before its rules said so): fail
    /// with the fix, once per generation; a new generation is looked at afresh.
    fn invalid_spec(&mut self, message: String) {
        self.st().effective = None;
        if self.decision.status.phase == Some(Phase::Failed) {
            return;
        }
        let all: Vec<&Worker> = self.o.workers.iter().collect();
        self.fail(&all, "InvalidSpec", message);
    }

    fn suspend(&mut self, current: &[&Worker]) {
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
    fn admitted(&mut self, gate: &Gate, current: &[&Worker]) -> bool {
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

    /// Worker 0 exited 0 and says the budget is done.
    fn success(&self, current: &[&Worker]) -> Option<TrainerReport> {
        current.iter().find_map(|w| match &w.state {
            WorkerState::Succeeded { report: Some(r) } if w.index == Some(0) && r.complete => {
                Some(r.clone())
            }
            _ => None,
        })
    }

    /// Why the current attempt has ended without success. When several workers ended, the most
    /// specific reason wins (`crd::ALL_REASONS`): the peers of a worker whose node was lost
    /// fail too, with a plain error.
    fn failure(&self, current: &[&Worker], wanted: i32) -> Option<Ending> {
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
        // `min_by_key` keeps the first of equals: the order above.
        endings.into_iter().min_by_key(|e| e.reason)
    }

    /// Counts the failure and does what its rule (or the default) says.
    fn handle_failure(&mut self, current: &[&Worker], e: Ending) {
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

    fn succeed(&mut self, current: &[&Worker], report: TrainerReport) {
        self.stop_usage(current);
        self.delete(current, true);
        self.take_progress(&report);
        let now = self.now.clone();
        let st = self.st();
        st.final_val_bpc = report.val_bpc.or(report.best_val_bpc);
        st.completion_time = Some(now);
        st.eta = None;
        st.restart_after = None;
        let bpc = report
            .val_bpc
            .map(|v| format!("{v:.4}"))
            .unwrap_or_else(|| "not measured".into());
        let best = match (st.best_val_bpc, st.best_step) {
            (Some(v), Some(step)) => format!("; best {v:.4} at step {step} (checkpoint best/)"),
            (Some(v), None) => format!("; best {v:.4}"),
            _ => String::new(),
        };
        let early = report.stop_reason.as_deref() == Some("early_stop");
        let msg = format!(
            "training complete at step {}{}; validation bits per character {bpc}{best}; checkpoint {}",
            report.step,
            if early { " (early stop)" } else { "" },
            report.checkpoint.as_deref().unwrap_or("none")
        );
        let reason = if early { "EarlyStopped" } else { "BudgetDone" };
        self.set(cond::SUCCEEDED, TRUE, reason, msg.clone());
        self.set(cond::RUNNING, FALSE, "Succeeded", "");
        self.set(cond::PODS_READY, FALSE, "Completed", "");
        self.set(cond::RESTARTING, FALSE, "Succeeded", "");
        self.phase(Phase::Succeeded, msg);
    }

    fn fail(&mut self, current: &[&Worker], reason: &str, message: String) {
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
    fn restart(&mut self, current: &[&Worker], e: &Ending, counted: bool) -> String {
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

    /// When `activeDeadlineSeconds` falls, if the spec sets it.
    fn deadline(&self) -> Option<Timestamp> {
        let t = self.o.training;
        let created = t.metadata.creation_timestamp.as_ref().map(|c| c.0);
        deadlines::active_deadline(created, t.spec.active_deadline_seconds)
    }

    fn deadline_passed(&self) -> bool {
        self.deadline()
            .is_some_and(|at| deadlines::due(at, self.o.now))
    }

    /// Past the deadline: the workers are deleted, which makes them save a checkpoint on SIGTERM
    /// as for a suspend (their pods stay until the operator read that final report); once none
    /// runs, the training fails with `DeadlineExceeded`, naming the checkpoint. The checkpoint
    /// volume is never touched.
    fn stop_for_deadline(&mut self, current: &[&Worker]) {
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
    fn clocks(&mut self) {
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

    /// Creates the missing workers of the current attempt, once the previous attempt's pods are gone,
    /// the backoff is over and the dataset exists.
    fn start(&mut self, current: &[&Worker], stale: &[&Worker], missing: Vec<i32>) {
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
                    None => format!("waiting until {} before the gang restart", after.0),
                };
                self.wait_phase(waiting_phase, msg);
                self.decision.requeue = Some(Duration::from_secs(wait.as_secs() + 1));
                return;
            }
        }
        if !stale.is_empty() {
            self.wait_phase(
                waiting_phase,
                "waiting for the previous workers to stop".into(),
            );
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
    fn wait_phase(&mut self, phase: Phase, message: String) {
        if phase == Phase::Restarting && self.decision.status.phase == Some(Phase::Restarting) {
            return;
        }
        self.phase(phase, message);
    }

    /// All workers of the attempt exist: are they running yet?
    fn observe_gang(&mut self, current: &[&Worker], effective: &EffectiveSettings) {
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
    fn cannot_start(&mut self, current: &[&Worker], pod: &str, waiting: &Waiting) {
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

    fn startup_timeout(&self) -> i32 {
        self.o
            .training
            .spec
            .startup_timeout_seconds
            .unwrap_or(crate::crd::DEFAULT_STARTUP_TIMEOUT_SECONDS)
    }

    /// DatasetReady still says what is not known yet (Unknown): it is not settled by a success or
    /// a failure of the preparation, nor found missing.
    fn dataset_unsettled(&self) -> bool {
        conditions::get(&self.decision.status.conditions, cond::DATASET_READY)
            .is_none_or(|c| c.status == UNKNOWN)
    }

    /// No worker prepares the dataset now: DatasetReady says so (and why), unless it is settled.
    fn say_dataset_prepared(&mut self) {
        self.set(
            cond::DATASET_READY,
            TRUE,
            "Prepared",
            "every worker prepared the dataset",
        );
    }

    fn dataset_waits(&mut self, why: &str) {
        if self.dataset_unsettled() {
            self.set(
                cond::DATASET_READY,
                UNKNOWN,
                WAITING_FOR_WORKERS,
                format!("not prepared yet: {why}"),
            );
        }
    }

    /// A gang that is not all placed `startupTimeoutSeconds` after its pods were created holds
    /// GPUs that train nothing: its workers go, and after the backoff a new attempt tries again.
    /// Not a failure of the training, so `restarts` stays; `startupTimeouts` counts it.
    fn startup_timed_out(&mut self, current: &[&Worker]) -> bool {
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

    fn take_progress(&mut self, report: &TrainerReport) {
        let mut progress = ProgressStatus::from(report);
        progress.observed_time = Some(self.now.clone());
        let st = self.st();
        st.eta = progress.eta_s.map(human_duration);
        if progress.checkpoint.is_some() {
            st.latest_checkpoint = progress.checkpoint.clone();
        }
        // A report without a best (e.g. before the first evaluation of an attempt) keeps the last one.
        if let Some(best) = progress.best_val_bpc {
            st.best_val_bpc = Some(best);
            st.best_step = progress.best_step;
        }
        if let Some(loss) = progress.train_loss {
            history::record(&mut st.loss_history, progress.step, loss);
        }
        let (epb, tokens_per_epoch) = (progress.evals_since_best, progress.tokens_per_epoch);
        st.progress = Some(progress);
        self.past_best(epb);
        self.plan(tokens_per_epoch);
        self.damaged(report);
    }

    /// `CheckpointDamaged` and a Warning Event for each checkpoint a resume set aside that the
    /// status does not name yet (a report is read many times).
    fn damaged(&mut self, report: &TrainerReport) {
        let attempt = self.decision.status.attempt;
        let instead = report.resumed_from.as_deref().map_or_else(
            || "nothing: it started from step 0".to_string(),
            |d| format!("{d} instead"),
        );
        for d in &report.damaged_checkpoints {
            if self.decision.status.damaged_checkpoints.contains(&d.path) {
                continue;
            }
            let list = &mut self.decision.status.damaged_checkpoints;
            list.push(d.path.clone());
            let excess = list.len().saturating_sub(MAX_DAMAGED);
            list.drain(..excess);
            let msg = format!(
                "checkpoint {} failed its check when attempt {attempt} resumed ({}) and was set \
                 aside as {}; the trainer resumed from {instead}",
                d.path, d.error, d.set_aside_as
            );
            if self.is(cond::CHECKPOINT_DAMAGED) {
                // The condition's transition already told of an earlier one.
                self.decision
                    .warnings
                    .push(("CheckpointDamaged".to_string(), msg.clone()));
            }
            self.set(cond::CHECKPOINT_DAMAGED, TRUE, "CheckpointDamaged", msg);
        }
    }

    /// The checkpoint claim: whether to make it, whether it is lost, and whether new workers may
    /// start on it (`volume::assess`).
    fn checkpoint_volume(&mut self) {
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
    fn start_over(&mut self) {
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
    fn forget_lost(&mut self) {
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
    fn recheck(&self, type_: &str) -> Duration {
        let since = conditions::get(&self.decision.status.conditions, type_)
            .map(|c| c.last_transition_time.0);
        let waited = since.map_or(0, |t| self.o.now.duration_since(t).as_secs().max(0));
        Duration::from_secs(
            waited.clamp(RECHECK_MIN.as_secs() as i64, MAX_BACKOFF.as_secs() as i64) as u64,
        )
    }

    /// `PastBest`: True while the trainer reports more evaluations since its best than
    /// [`PAST_BEST_EVALUATIONS`] (early stop off, a longer patience, or a model worse without
    /// memorising, which early stop does not count).
    fn past_best(&mut self, evals_since_best: i64) {
        let past = i64::from(PAST_BEST_EVALUATIONS);
        if evals_since_best > past {
            let (bpc, step) = (self.st().best_val_bpc, self.st().best_step);
            let msg = format!(
                "{evals_since_best} evaluations since the best validation bpc ({} at step {}): the \
                 GPUs are paying for a model no better than best/; set earlyStop.patience (it \
                 counts only evaluations where the model memorises) or delete the training",
                bpc.map_or("?".into(), |b| format!("{b:.4}")),
                step.map_or("?".into(), |s| s.to_string())
            );
            self.set(cond::PAST_BEST, TRUE, "PastBest", msg);
        } else if conditions::get(&self.decision.status.conditions, cond::PAST_BEST).is_some() {
            self.set(cond::PAST_BEST, FALSE, "Improving", "");
        }
    }

    /// `status.plan` and `DataConstrained` from the dataset's size (the trainer's tokens per
    /// epoch) and the effective depth, GPUs and hours.
    fn plan(&mut self, tokens_per_epoch: Option<i64>) {
        let price = self.o.price_per_gpu_hour;
        let Some(effective) = self.st().effective.clone() else {
            return;
        };
        let (Some(unique), Some(hours)) = (tokens_per_epoch, effective.hours) else {
            return;
        };
        if effective.gpus < 1 || unique < 1 {
            return;
        }
        let budget = planner::Budget {
            gpus: effective.gpus as u32,
            hours,
            price_per_gpu_hour: price,
            unique_tokens: unique as u64,
            seq_len: 2048,
        };
        let plan = planner::plan(&budget);
        let own = planner::depth_plan(i64::from(effective.depth), &budget);
        self.st().plan = Some(crate::crd::BudgetAdvice {
            epochs: own.epochs,
            recommended_depth: plan.recommended_depth,
            recommended_hours: plan.recommended_hours,
            hours_to_best: own.hours_to_best,
            budget_cost: plan.budget_cost,
            recommended_cost: plan.recommended_cost,
            unique_tokens: unique,
        });
        match planner::data_constrained_warning(i64::from(effective.depth), &budget) {
            Some(msg) => self.set(cond::DATA_CONSTRAINED, TRUE, "ManyEpochs", msg),
            None => self.set(
                cond::DATA_CONSTRAINED,
                FALSE,
                "FewEpochs",
                format!("{:.1} epochs over the data", own.epochs),
            ),
        }
    }
}

/// Worker 0's final report (it holds the checkpoint), else any worker's.
fn final_report(current: &[&Worker]) -> Option<TrainerReport> {
    let first = current
        .iter()
        .filter(|w| w.index == Some(0))
        .find_map(|w| worker_report(w));
    first.or_else(|| current.iter().find_map(|w| worker_report(w)))
}

/// Who took the pod away, when Kubernetes says (its `DisruptionTarget` or status reason).
fn disrupted_by(w: &Worker) -> String {
    match (&w.disruption, &w.pod_reason) {
        (Some(d), _) if !d.is_empty() => format!(" (DisruptionTarget: {d})"),
        // A failure without a container's status already names the pod's reason.
        (_, Some(r)) if !matches!(&w.state, WorkerState::Failed(f) if f.container.is_none()) => {
            format!(" (pod {r})")
        }
        _ => String::new(),
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

/// DatasetReady's reason while no worker prepares the dataset yet.
const WAITING_FOR_WORKERS: &str = "WaitingForWorkers";

/// The init containers that generate and prepare the dataset.
fn is_preparation(container: &str) -> bool {
    container != crate::resources::TRAINER_CONTAINER
}

/// A kubelet's reason as a condition reason (CamelCase letters and digits; the API's pattern
/// for `metav1.Condition`), so an odd runtime's reason cannot make the status invalid.
fn condition_reason(reason: &str) -> String {
    let clean: String = reason
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .collect();
    match clean.chars().next() {
        Some(c) if c.is_ascii_alphabetic() => clean,
        _ => "ContainerNotStarted".to_string(),
    }
}

fn worker_report(w: &Worker) -> Option<TrainerReport> {
    match &w.state {
        WorkerState::Succeeded { report } => report.clone(),
        WorkerState::Failed(f) => f.report.clone(),
        _ => None,
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
    use super::*;
    use crate::crd::condition as c;
    use crate::kueue::{Gate, State as QueueState};
    use crate::resources::testing::{cpu_spec, gpu_spec, training};
    use crate::resources::TRAINER_CONTAINER;
    use crate::workers::observe;
    use crate::workers::testing::{
        deleting, disrupted, killed, killed_init, pod, running, terminated, unschedulable, waiting,
        with_pod_reason,
    };
    use k8s_openapi::api::core::v1::Pod;

    fn at(s: i64) -> Timestamp {
        Timestamp::from_second(1_700_000_000 + s).unwrap()
    }

    fn decide_at(t: &CharLMTraining, pods: &[Pod], now: i64) -> Decision {
        decide_with(t, pods, now, None)
    }

    /// With `rejection`: the API server refused an object made from the spec.
    fn decide_with(
        t: &CharLMTraining,
        pods: &[Pod],
        now: i64,
        rejection: Option<&str>,
    ) -> Decision {
        decide(&Observed {
            training: t,
            workers: pods.iter().map(observe).collect(),
            dataset: DatasetCheck::Available,
            progress: None,
            now: at(now),
            price_per_gpu_hour: 3.0,
            rejection: rejection.map(str::to_string),
            queue: None,
            objects: claim_bound(),
        })
    }

    /// The training's own checkpoint claim, bound: what most tests run with.
    fn claim_bound() -> Objects {
        Objects {
            claim: Claim::Present(volume::ClaimFacts {
                uid: "claim-1".into(),
                ownership: crate::ownership::Ownership::Ours,
                deleting_since: None,
                phase: Some("Bound".into()),
                volume: Some("pv-1".into()),
                storage_class: Some("standard".into()),
            }),
            class_missing: false,
            conflicts: vec![],
        }
    }

    /// The training after its status was written.
    fn with(mut t: CharLMTraining, d: &Decision) -> CharLMTraining {
        t.status = Some(d.status.clone());
        t
    }

    fn condition<'a>(d: &'a Decision, type_: &str) -> (&'a str, &'a str) {
        let c = conditions::get(&d.status.conditions, type_).unwrap();
        (c.status.as_str(), c.reason.as_str())
    }

    /// A GPU training of two workers whose pods both run.
    fn running_gpu_training() -> (CharLMTraining, Vec<Pod>) {
        let t = training(gpu_spec());
        let d = decide_at(&t, &[], 0);
        let t = with(t, &d);
        let pods = vec![
            running(pod(&t, 0, 0), "10.0.0.1"),
            running(pod(&t, 1, 0), "10.0.0.2"),
        ];
        let d = decide_at(&t, &pods, 5);
        (with(t, &d), pods)
    }

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
        let d = decide(&Observed {
            training: &t,
            workers: pods.iter().map(observe).collect(),
            dataset: DatasetCheck::Available,
            progress: TrainerReport::parse(
                r#"{"step": 1200, "total_steps_estimate": 9000, "train_loss": 0.92, "eta_s": 51600.0, "checkpoint": "/checkpoints/step-000001200", "complete": false}"#,
            ),
            now: at(40),
            price_per_gpu_hour: 3.0,
            rejection: None,
            queue: None,
            objects: claim_bound(),
        });
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
    fn worker_zero_complete_means_succeeded() {
        let (t, mut pods) = running_gpu_training();
        pods[0] = terminated(
            pod(&t, 0, 0),
            TRAINER_CONTAINER,
            0,
            r#"{"step": 9000, "val_bpc": 1.2345, "checkpoint": "/checkpoints/step-000009000", "complete": true}"#,
        );
        let d = decide_at(&t, &pods, 500);
        assert_eq!(d.status.phase, Some(Phase::Succeeded));
        assert_eq!(condition(&d, c::SUCCEEDED), ("True", "BudgetDone"));
        assert_eq!(d.status.final_val_bpc, Some(1.2345));
        assert_eq!(
            d.status.latest_checkpoint.as_deref(),
            Some("/checkpoints/step-000009000")
        );
        assert_eq!(d.status.completion_time, Some(Time(at(500))));
        assert_eq!(d.delete, ["demo-worker-1"]);
        // Terminal: later reconciles change nothing.
        let t = with(t, &d);
        let d2 = decide_at(&t, &pods[..1], 600);
        assert_eq!(d2.status.phase, Some(Phase::Succeeded));
        assert!(d2.create.is_empty() && d2.delete.is_empty());
        assert_eq!(d2.requeue, None);
    }

    #[test]
    fn an_early_stop_is_a_success_that_says_so() {
        let (t, mut pods) = running_gpu_training();
        pods[0] = terminated(
            pod(&t, 0, 0),
            TRAINER_CONTAINER,
            0,
            r#"{"step": 4000, "val_bpc": 1.3, "complete": true, "stop_reason": "early_stop"}"#,
        );
        let d = decide_at(&t, &pods, 500);
        assert_eq!(d.status.phase, Some(Phase::Succeeded));
        assert_eq!(condition(&d, c::SUCCEEDED), ("True", "EarlyStopped"));
        assert!(d.status.message.unwrap().contains("(early stop)"));
        assert_eq!(
            d.status.progress.unwrap().stop_reason.as_deref(),
            Some("early_stop")
        );
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
    fn a_gang_cut_short_by_a_crash_is_completed_not_restarted() {
        // The operator created worker 0 and died before worker 1 and before writing the status.
        let t = training(gpu_spec());
        let pods = vec![running(pod(&t, 0, 0), "10.0.0.1")];
        let d = decide_at(&t, &pods, 0);
        assert_eq!(d.create, [1]);
        assert_eq!(d.status.restarts, 0);
    }

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
    fn a_missing_dataset_blocks_creation_with_a_message() {
        let t = training(gpu_spec());
        let d = decide(&Observed {
            training: &t,
            workers: vec![],
            dataset: DatasetCheck::Missing(
                "PersistentVolumeClaim texts (spec.dataset.pvc.claimName) not found in namespace team-a".into(),
            ),
            progress: None,
            now: at(0),
            price_per_gpu_hour: 3.0,
            rejection: None,
            queue: None,
            objects: claim_bound(),
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

    /// A GPU training of two workers created at 0 (startupTimeoutSeconds 600).
    fn starting_gpu_training() -> CharLMTraining {
        let t = training(gpu_spec());
        with(t.clone(), &decide_at(&t, &[], 0))
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

    /// The pod with its trainer container started (running) or started and ended (terminated)
    /// at the given seconds, as a kubelet stamps them.
    fn stamped(mut pod: Pod, started: i64, finished: Option<i64>) -> Pod {
        let status = pod.status.as_mut().unwrap();
        for c in status.container_statuses.iter_mut().flatten() {
            let state = c.state.as_mut().unwrap();
            if let Some(r) = state.running.as_mut() {
                r.started_at = Some(Time(at(started)));
            }
            if let Some(t) = state.terminated.as_mut() {
                t.started_at = Some(Time(at(started)));
                t.finished_at = finished.map(|f| Time(at(f)));
            }
        }
        pod
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

    fn observe_report(t: &CharLMTraining, pods: &[Pod], report: &str, now: i64) -> Decision {
        decide(&Observed {
            training: t,
            workers: pods.iter().map(observe).collect(),
            dataset: DatasetCheck::Available,
            progress: TrainerReport::parse(report),
            now: at(now),
            price_per_gpu_hour: 3.0,
            rejection: None,
            queue: None,
            objects: claim_bound(),
        })
    }

    #[test]
    fn the_plan_and_data_constrained_come_from_the_reported_dataset_size() {
        // Depth 24 on 16 GPUs for 2 hours over 344 M tokens: ~38 epochs.
        let (t, pods) = running_gpu_training();
        let d = observe_report(
            &t,
            &pods,
            r#"{"step": 30, "tokens_per_epoch": 343932928, "complete": false}"#,
            40,
        );
        let plan = d.status.plan.clone().unwrap();
        assert!((30.0..45.0).contains(&plan.epochs), "{plan:?}");
        assert_eq!(plan.budget_cost, 16.0 * 2.0 * 3.0);
        assert!(plan.recommended_hours <= 2.0 && plan.recommended_cost <= plan.budget_cost);
        assert_eq!(condition(&d, c::DATA_CONSTRAINED), ("True", "ManyEpochs"));
        let msg = &conditions::get(&d.status.conditions, c::DATA_CONSTRAINED)
            .unwrap()
            .message;
        assert!(
            msg.contains("epochs") && msg.contains("recommends depth"),
            "{msg}"
        );
        // Ten times the data: about four epochs, not constrained.
        let d = observe_report(
            &with(t, &d),
            &pods,
            r#"{"step": 30, "tokens_per_epoch": 3439329280, "complete": false}"#,
            50,
        );
        assert_eq!(condition(&d, c::DATA_CONSTRAINED), ("False", "FewEpochs"));
    }

    #[test]
    fn running_past_the_best_by_more_than_four_evaluations_warns_until_it_improves() {
        let (t, pods) = running_gpu_training();
        let four = r#"{"step": 30, "best_val_bpc": 1.2, "best_step": 10, "evals_since_best": 4}"#;
        let d = observe_report(&t, &pods, four, 40);
        assert!(conditions::get(&d.status.conditions, c::PAST_BEST).is_none());
        let five = r#"{"step": 40, "best_val_bpc": 1.2, "best_step": 10, "evals_since_best": 5}"#;
        let t = with(t, &d);
        let d = observe_report(&t, &pods, five, 50);
        assert_eq!(condition(&d, c::PAST_BEST), ("True", "PastBest"));
        let msg = &conditions::get(&d.status.conditions, c::PAST_BEST)
            .unwrap()
            .message;
        assert!(
            msg.contains("1.2000 at step 10") && msg.contains("earlyStop.patience"),
            "{msg}"
        );
        assert_eq!(d.status.progress.as_ref().unwrap().evals_since_best, 5);
        let better = r#"{"step": 50, "best_val_bpc": 1.1, "best_step": 50, "evals_since_best": 0}"#;
        let d = observe_report(&with(t, &d), &pods, better, 60);
        assert_eq!(condition(&d, c::PAST_BEST), ("False", "Improving"));
    }

    #[test]
    fn the_best_validation_and_epochs_survive_an_early_stop() {
        let (t, pods) = running_gpu_training();
        let d = decide(&Observed {
            training: &t,
            workers: pods.iter().map(observe).collect(),
            dataset: DatasetCheck::Available,
            progress: TrainerReport::parse(
                r#"{"step": 3000, "val_bpc": 1.25, "best_val_bpc": 1.2, "best_step": 2500, "epoch": 2.5, "tokens_per_epoch": 343932928, "complete": false}"#,
            ),
            now: at(40),
            price_per_gpu_hour: 3.0,
            rejection: None,
            queue: None,
            objects: claim_bound(),
        });
        assert_eq!(
            (d.status.best_val_bpc, d.status.best_step),
            (Some(1.2), Some(2500))
        );
        let t = with(t, &d);
        let mut pods = pods;
        pods[0] = terminated(
            pod(&t, 0, 0),
            TRAINER_CONTAINER,
            0,
            r#"{"step": 4000, "val_bpc": 1.26, "best_val_bpc": 1.2, "best_step": 2500, "epoch": 3.3, "tokens_per_epoch": 343932928, "complete": true, "stop_reason": "early_stop"}"#,
        );
        let d = decide_at(&t, &pods, 500);
        assert_eq!(condition(&d, c::SUCCEEDED), ("True", "EarlyStopped"));
        let st = &d.status;
        assert_eq!((st.best_val_bpc, st.best_step), (Some(1.2), Some(2500)));
        let p = st.progress.as_ref().unwrap();
        assert_eq!((p.epoch, p.tokens_per_epoch), (3.3, Some(343932928)));
        let msg = st.message.as_deref().unwrap();
        assert!(
            msg.contains("(early stop)") && msg.contains("best 1.2000 at step 2500"),
            "{msg}"
        );
        // A report without a best keeps the one known.
        let t = with(t, &d);
        assert_eq!(decide_at(&t, &pods, 600).status.best_val_bpc, Some(1.2));
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

    #[test]
    fn a_spec_the_operator_cannot_run_fails_with_the_fix() {
        // Stored before the schema's rules demanded a depth.
        let mut t = training(cpu_spec());
        t.spec.depth = None;
        let d = decide_at(&t, &[], 0);
        assert!(d.create.is_empty());
        assert_eq!(d.status.phase, Some(Phase::Failed));
        assert_eq!(condition(&d, c::FAILED), ("True", "InvalidSpec"));
        assert!(d
            .status
            .message
            .as_deref()
            .unwrap()
            .contains("set spec.depth"));
        assert!(d.status.effective.is_none());

        // The fix, a new generation, starts the training.
        let mut t = with(t, &d);
        t.spec.depth = Some(2);
        t.metadata.generation = Some(2);
        let d = decide_at(&t, &[], 5);
        assert_eq!(d.create, [0]);
        assert_eq!(d.status.effective.unwrap().depth, 2);
    }

    #[test]
    fn a_rejected_object_fails_the_spec_once_and_a_new_spec_starts_again() {
        let t = training(gpu_spec());
        let d = decide_with(
            &t,
            &[],
            0,
            Some("the API server rejected pod demo-worker-0: bad"),
        );
        assert_eq!(d.status.phase, Some(Phase::Failed));
        assert_eq!(condition(&d, c::FAILED), ("True", "InvalidSpec"));
        assert!(d.create.is_empty());
        assert_eq!(d.status.failed_generation, Some(1));
        let mut t = with(t, &d);
        t.metadata.generation = Some(2);
        let d = decide_at(&t, &[], 5);
        assert_eq!(d.status.phase, Some(Phase::Pending));
        assert_eq!(d.create, [0, 1]);
    }

    /// `status.effective` is what the running pods were made from; a spec changed meanwhile
    /// shapes the next attempt.
    #[test]
    fn effective_settings_follow_the_attempt_not_the_edited_spec() {
        let (mut t, pods) = running_gpu_training();
        t.spec.hours = Some(9.0);
        t.metadata.generation = Some(2);
        let d = decide_at(&t, &pods, 40);
        let e = d.status.effective.clone().unwrap();
        assert_eq!((e.hours, e.generation), (Some(2.0), Some(1)));
        // The gang restarts (a worker failed): the new attempt takes the new spec.
        let t = with(t, &d);
        let failed = vec![
            terminated(pods[0].clone(), TRAINER_CONTAINER, 1, "boom"),
            pods[1].clone(),
        ];
        let d = decide_at(&t, &failed, 50);
        let t = with(t, &d);
        let d = decide_at(&t, &[], 200);
        assert_eq!(d.create, [0, 1]);
        let e = d.status.effective.unwrap();
        assert_eq!((e.hours, e.generation), (Some(9.0), Some(2)));
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

    fn decide_queued(t: &CharLMTraining, pods: &[Pod], now: i64, state: QueueState) -> Decision {
        decide(&Observed {
            training: t,
            workers: pods.iter().map(observe).collect(),
            dataset: DatasetCheck::Available,
            progress: None,
            now: at(now),
            price_per_gpu_hour: 3.0,
            rejection: None,
            queue: Some(Gate {
                local_queue: "team-a".into(),
                state,
            }),
            objects: claim_bound(),
        })
    }

    fn admitted() -> QueueState {
        QueueState::Admitted {
            cluster_queue: "gpus".into(),
        }
    }

    fn preempted(reserved: bool) -> QueueState {
        QueueState::Evicted {
            reason: "Preempted".into(),
            message: "Preempted to accommodate a workload due to prioritization".into(),
            reserved,
        }
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

    fn with_spec(
        mut t: CharLMTraining,
        change: impl FnOnce(&mut serde_json::Value),
    ) -> CharLMTraining {
        let mut spec = serde_json::to_value(&t.spec).unwrap();
        change(&mut spec);
        t.spec = serde_json::from_value(spec).unwrap();
        t
    }

    fn message(d: &Decision) -> String {
        d.status.message.clone().unwrap_or_default()
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

    /// `decide` with the given claim, conflicts and report.
    fn decide_on(
        t: &CharLMTraining,
        pods: &[Pod],
        now: i64,
        objects: Objects,
        report: Option<&str>,
    ) -> Decision {
        decide(&Observed {
            training: t,
            workers: pods.iter().map(observe).collect(),
            dataset: DatasetCheck::Available,
            progress: report.and_then(TrainerReport::parse),
            now: at(now),
            price_per_gpu_hour: 3.0,
            rejection: None,
            queue: None,
            objects,
        })
    }

    fn claim(edit: impl FnOnce(&mut volume::ClaimFacts)) -> Objects {
        let mut o = claim_bound();
        if let Claim::Present(f) = &mut o.claim {
            edit(f);
        }
        o
    }

    fn no_claim() -> Objects {
        Objects {
            claim: Claim::Absent,
            class_missing: false,
            conflicts: vec![],
        }
    }

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

    #[test]
    fn a_damaged_checkpoint_at_resume_is_a_condition_and_an_event() {
        let (t, pods) = running_gpu_training();
        let report = |paths: &[&str]| {
            let damaged: Vec<serde_json::Value> = paths
                .iter()
                .map(|p| serde_json::json!({"path": p, "set_aside_as": format!("{p}.damaged"), "error": "model.safetensors: sha256 mismatch"}))
                .collect();
            serde_json::json!({"step": 200, "resumed_from": "/checkpoints/step-000000100", "damaged_checkpoints": damaged}).to_string()
        };
        let first = report(&["/checkpoints/step-000000200"]);
        let d = decide_on(&t, &pods, 40, claim_bound(), Some(&first));
        assert_eq!(
            condition(&d, c::CHECKPOINT_DAMAGED),
            ("True", "CheckpointDamaged")
        );
        let msg = &conditions::get(&d.status.conditions, c::CHECKPOINT_DAMAGED)
            .unwrap()
            .message;
        for needle in [
            "checkpoint /checkpoints/step-000000200 failed its check",
            "sha256 mismatch",
            "set aside as /checkpoints/step-000000200.damaged",
            "resumed from /checkpoints/step-000000100 instead",
        ] {
            assert!(msg.contains(needle), "{needle:?} in {msg}");
        }
        assert_eq!(
            d.status.damaged_checkpoints,
            ["/checkpoints/step-000000200"]
        );
        assert!(
            d.warnings.is_empty(),
            "the condition's transition is the Event"
        );
        assert!(conditions::is_warning(
            conditions::get(&d.status.conditions, c::CHECKPOINT_DAMAGED).unwrap()
        ));
        assert_eq!(
            d.status.progress.as_ref().unwrap().resumed_from.as_deref(),
            Some("/checkpoints/step-000000100")
        );
        // Read again: nothing new. A later one: its own Event.
        let t = with(t, &d);
        let d = decide_on(&t, &pods, 80, claim_bound(), Some(&first));
        assert!(d.warnings.is_empty());
        let t = with(t, &d);
        let later = report(&["/checkpoints/step-000000300"]);
        let d = decide_on(&t, &pods, 120, claim_bound(), Some(&later));
        assert_eq!(d.warnings.len(), 1);
        assert!(d.warnings[0].1.contains("step-000000300"));
        assert_eq!(d.status.damaged_checkpoints.len(), 2);
    }
}
