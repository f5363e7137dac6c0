//! The decision's tests share these: one builder of what a decision sees (`look`), the trainings
//! most tests start from, and the fixtures of pods as a kubelet reports them.

pub use super::*;
pub use crate::conditions;
pub use crate::crd::condition as c;
pub use crate::crd::{CharLMTraining, FailureAction, FailureReason, Phase};
pub use crate::kueue::{Gate, State as QueueState};
pub use crate::resources::testing::{cpu_spec, gpu_spec, training};
pub use crate::resources::TRAINER_CONTAINER;
pub use crate::volume::{self, Claim};
pub use crate::workers::testing::{
    deleting, disrupted, killed, killed_init, pod, running, terminated, unschedulable, waiting,
    with_pod_reason,
};
pub use crate::workers::{observe, Worker};
pub use charlm_contract::ProgressReport;
pub use k8s_openapi::api::core::v1::Pod;
pub use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
pub use k8s_openapi::jiff::Timestamp;
pub use kube::ResourceExt;

pub fn at(s: i64) -> Timestamp {
    Timestamp::from_second(1_700_000_000 + s).unwrap()
}

/// The one builder of what a decision sees: `training` with `pods` at `now`, its dataset
/// there, its own claim bound, no report, no queue; each method changes one of these.
pub struct Look<'a> {
    pub observed: Observed<'a>,
}

pub fn look<'a>(t: &'a CharLMTraining, pods: &[Pod], now: i64) -> Look<'a> {
    Look {
        observed: Observed {
            training: t,
            workers: pods.iter().map(observe).collect(),
            dataset: DatasetCheck::Available,
            progress: None,
            now: at(now),
            price_per_gpu_hour: 3.0,
            rejection: None,
            queue: None,
            objects: claim_bound(),
        },
    }
}

impl Look<'_> {
    /// The API server refused an object made from the spec.
    pub fn rejection(mut self, rejection: Option<&str>) -> Self {
        self.observed.rejection = rejection.map(str::to_string);
        self
    }

    /// Queued in LocalQueue `team-a`, in Kueue's `state`.
    pub fn queue(mut self, state: QueueState) -> Self {
        self.observed.queue = Some(Gate {
            local_queue: "team-a".into(),
            state,
        });
        self
    }

    pub fn objects(mut self, objects: Objects) -> Self {
        self.observed.objects = objects;
        self
    }

    /// Rank 0's `/progress`, read just now.
    pub fn report(mut self, report: Option<&str>) -> Self {
        self.observed.progress = report.and_then(ProgressReport::parse);
        self
    }

    pub fn decide(&self) -> Decision {
        decide(&self.observed)
    }
}

pub fn decide_at(t: &CharLMTraining, pods: &[Pod], now: i64) -> Decision {
    look(t, pods, now).decide()
}

pub fn decide_with(
    t: &CharLMTraining,
    pods: &[Pod],
    now: i64,
    rejection: Option<&str>,
) -> Decision {
    look(t, pods, now).rejection(rejection).decide()
}

/// The training's own checkpoint claim, bound: what most tests run with.
pub fn claim_bound() -> Objects {
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
pub fn with(mut t: CharLMTraining, d: &Decision) -> CharLMTraining {
    t.status = Some(d.status.clone());
    t
}

pub fn condition<'a>(d: &'a Decision, type_: &str) -> (&'a str, &'a str) {
    let c = conditions::get(&d.status.conditions, type_).unwrap();
    (c.status.as_str(), c.reason.as_str())
}

/// A GPU training of two workers whose pods both run.
pub fn running_gpu_training() -> (CharLMTraining, Vec<Pod>) {
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

/// A GPU training of two workers created at 0 (startupTimeoutSeconds 600).
pub fn starting_gpu_training() -> CharLMTraining {
    let t = training(gpu_spec());
    with(t.clone(), &decide_at(&t, &[], 0))
}

pub fn with_spec(
    mut t: CharLMTraining,
    change: impl FnOnce(&mut serde_json::Value),
) -> CharLMTraining {
    let mut spec = serde_json::to_value(&t.spec).unwrap();
    change(&mut spec);
    t.spec = serde_json::from_value(spec).unwrap();
    t
}

pub fn message(d: &Decision) -> String {
    d.status.message.clone().unwrap_or_default()
}

pub fn decide_queued(t: &CharLMTraining, pods: &[Pod], now: i64, state: QueueState) -> Decision {
    look(t, pods, now).queue(state).decide()
}

pub fn admitted() -> QueueState {
    QueueState::Admitted {
        cluster_queue: "gpus".into(),
    }
}

pub fn preempted(reserved: bool) -> QueueState {
    QueueState::Evicted {
        reason: "Preempted".into(),
        message: "Preempted to accommodate a workload due to prioritization".into(),
        reserved,
    }
}

/// `decide` with the given claim, conflicts and report.
pub fn decide_on(
    t: &CharLMTraining,
    pods: &[Pod],
    now: i64,
    objects: Objects,
    report: Option<&str>,
) -> Decision {
    look(t, pods, now).objects(objects).report(report).decide()
}

pub fn claim(edit: impl FnOnce(&mut volume::ClaimFacts)) -> Objects {
    let mut o = claim_bound();
    if let Claim::Present(f) = &mut o.claim {
        edit(f);
    }
    o
}

pub fn no_claim() -> Objects {
    Objects {
        claim: Claim::Absent,
        class_missing: false,
        conflicts: vec![],
    }
}

pub fn observe_report(t: &CharLMTraining, pods: &[Pod], report: &str, now: i64) -> Decision {
    look(t, pods, now).report(Some(report)).decide()
}

/// The pod with its trainer container started (running) or started and ended (terminated)
/// at the given seconds, as a kubelet stamps them.
pub fn stamped(mut pod: Pod, started: i64, finished: Option<i64>) -> Pod {
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
