//! What a worker pod says about itself, read from its labels and status into plain data, so the
//! reconciler decides on facts instead of digging through `PodStatus`.

use charlm_contract::events::{Event, Line};
use k8s_openapi::api::core::v1::{ContainerStatus, Pod};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::ResourceExt;

use crate::progress::TrainerReport;
use crate::resources::{ATTEMPT_LABEL, REPORT_FINALIZER, TRAINER_CONTAINER, WORKER_INDEX_LABEL};

#[derive(Clone, Debug, PartialEq)]
pub struct Worker {
    pub name: String,
    /// `charlm.dev/worker-index`; `None` on a pod without it (not ours to keep).
    pub index: Option<i32>,
    /// `charlm.dev/attempt`; `None` on a pod without it.
    pub attempt: Option<i64>,
    /// Being deleted.
    pub terminating: bool,
    pub pod_ip: Option<String>,
    /// When the trainer container started, as the kubelet reports it.
    pub trainer_started: Option<Timestamp>,
    /// When the trainer container ended.
    pub trainer_finished: Option<Timestamp>,
    /// The reason of the pod's `DisruptionTarget` condition while it is True: who is taking the
    /// pod away (`PreemptionByScheduler`, `EvictionByEvictionAPI`, `DeletionByTaintManager`, ...).
    pub disruption: Option<String>,
    /// The pod's `status.reason` (`Evicted`, `NodeLost`, `Preempting`, ...).
    pub pod_reason: Option<String>,
    /// Taken away by a plain DELETE (`kubectl delete pod`, another controller): being deleted,
    /// and no container had failed before the deletion was asked for. Whatever its containers do
    /// after it (a trainer saving a checkpoint on SIGTERM and exiting) is the deletion's
    /// consequence. Who deleted it, when Kubernetes says, is in `disruption`.
    pub deleted: bool,
    pub state: WorkerState,
}

#[derive(Clone, Debug, PartialEq)]
pub enum WorkerState {
    /// Not running yet: unscheduled, pulling, or in its init containers.
    Pending {
        /// The scheduler's reason when it cannot place the pod.
        unschedulable: Option<String>,
        /// The init containers (generate, prepare) have started but not all finished.
        preparing: bool,
        /// Bound to a node (placed), even if not started yet (e.g. pulling its image).
        scheduled: bool,
        /// A container the kubelet cannot start, and why (an image it cannot pull, a Secret that
        /// does not exist); `None` while the containers start as they should.
        waiting: Option<Waiting>,
        /// Every init container has ended well: the dataset is prepared in this pod.
        prepared: bool,
    },
    Running,
    /// The trainer exited 0.
    Succeeded {
        report: Option<TrainerReport>,
    },
    /// A container failed, or the pod was evicted or lost.
    Failed(Failure),
}

/// A container the kubelet keeps waiting, in the kubelet's words.
#[derive(Clone, Debug, PartialEq)]
pub struct Waiting {
    pub container: String,
    /// `ErrImagePull`, `ImagePullBackOff`, `InvalidImageName`, `CreateContainerConfigError`, ...
    pub reason: String,
    pub message: Option<String>,
}

/// Waiting reasons of containers that start as they should: being created (pulling the image
/// included), or after the init containers.
const STARTING: [&str; 2] = ["ContainerCreating", "PodInitializing"];

/// Waiting reasons no retry can end: the image's name cannot be parsed, whatever the registry
/// holds. The others (an image that cannot be pulled yet, a Secret or ConfigMap that does not
/// exist yet) can end when someone fixes the cluster, so the kubelet retries them.
const TERMINAL: [&str; 1] = ["InvalidImageName"];

impl Waiting {
    /// No retry can help: the spec (or the operator's default image) must change.
    pub fn is_terminal(&self) -> bool {
        TERMINAL.contains(&self.reason.as_str())
    }

    /// One line: the pod, the container, the kubelet's reason and message.
    pub fn describe(&self, pod: &str) -> String {
        let mut out = format!(
            "{pod}: container {} cannot start: {}",
            self.container, self.reason
        );
        if let Some(m) = self.message.as_deref().filter(|m| !m.trim().is_empty()) {
            out.push_str(": ");
            out.push_str(&truncate(m.trim(), 400));
        }
        out
    }
}

/// The first container (init containers first, in their order) that the kubelet holds back for a
/// reason other than starting as it should.
fn waiting_container(init: &[ContainerStatus], main: &[ContainerStatus]) -> Option<Waiting> {
    init.iter().chain(main).find_map(|s| {
        let w = s.state.as_ref()?.waiting.as_ref()?;
        let reason = w.reason.as_deref().filter(|r| !r.is_empty())?;
        (!STARTING.contains(&reason)).then(|| Waiting {
            container: s.name.clone(),
            reason: reason.to_string(),
            message: w.message.clone(),
        })
    })
}

#[derive(Clone, Debug, PartialEq)]
pub struct Failure {
    /// The container that failed (`trainer`, `prepare`, `generate`), if Kubernetes says.
    pub container: Option<String>,
    pub exit_code: Option<i32>,
    /// Kubernetes' reason: `Error`, `OOMKilled`, `Evicted`, ...
    pub reason: Option<String>,
    /// The termination message: the trainer's report, or the tail of its log.
    pub message: Option<String>,
    pub report: Option<TrainerReport>,
}

/// The trainer's "bad input" exit code (docs/contract.md): retrying cannot help.
pub const EXIT_BAD_INPUT: i32 = charlm_contract::exit::BAD_INPUT;

impl Failure {
    pub fn is_bad_input(&self) -> bool {
        self.exit_code == Some(EXIT_BAD_INPUT)
    }

    /// The trainer's exit code 3: a checkpoint did not fit on the checkpoint volume.
    pub fn is_storage_full(&self) -> bool {
        self.exit_code == Some(charlm_contract::exit::STORAGE_FULL)
    }

    /// One line for a condition message: which container, how it ended, and why.
    pub fn describe(&self, pod: &str) -> String {
        let mut out = match (&self.container, self.exit_code) {
            (Some(c), Some(code)) => format!("{pod}: container {c} exited with code {code}"),
            (Some(c), None) => format!("{pod}: container {c} failed"),
            (None, _) => format!("{pod} failed"),
        };
        if let Some(reason) = self.reason.as_deref().filter(|r| *r != "Error") {
            out.push_str(&format!(" ({reason})"));
        }
        let detail = match &self.report {
            Some(r) => r
                .error
                .clone()
                .or_else(|| Some(format!("last report at step {}", r.step))),
            None => self.message.as_deref().and_then(error_line),
        };
        if let Some(detail) = detail {
            out.push_str(": ");
            out.push_str(&truncate(&detail, 400));
        }
        out
    }
}

impl Worker {
    pub fn is_active(&self) -> bool {
        matches!(
            self.state,
            WorkerState::Pending { .. } | WorkerState::Running
        )
    }

    /// Its init containers have prepared the dataset: the trainer runs or ran, or is about to.
    pub fn dataset_prepared(&self) -> bool {
        match &self.state {
            WorkerState::Pending { prepared, .. } => *prepared,
            WorkerState::Running | WorkerState::Succeeded { .. } => true,
            WorkerState::Failed(f) => f.container.as_deref() == Some(TRAINER_CONTAINER),
        }
    }

    /// Has begun its work (past scheduling): a later absence of a peer means it was lost.
    pub fn has_started(&self) -> bool {
        match &self.state {
            WorkerState::Pending { preparing, .. } => *preparing,
            _ => true,
        }
    }
}

/// When the deletion of `pod` was asked for: its deletion timestamp less its grace period.
fn deletion_requested(pod: &Pod) -> Option<Timestamp> {
    let at = pod.metadata.deletion_timestamp.as_ref()?.0;
    let grace = pod.metadata.deletion_grace_period_seconds.unwrap_or(0);
    Some(at - SignedDuration::from_secs(grace))
}

/// Did a container fail before `requested`? Then the pod failed on its own, and the deletion
/// came after (someone cleaning up).
fn failed_before(statuses: &[ContainerStatus], requested: Timestamp) -> bool {
    statuses.iter().any(|s| {
        s.state
            .as_ref()
            .and_then(|st| st.terminated.as_ref())
            .is_some_and(|t| {
                t.exit_code != 0 && t.finished_at.as_ref().is_some_and(|f| f.0 < requested)
            })
    })
}

pub fn observe(pod: &Pod) -> Worker {
    let labels = pod.labels();
    let status = pod.status.clone().unwrap_or_default();
    let phase = status.phase.as_deref().unwrap_or("Pending");
    let init_statuses = status.init_container_statuses.clone().unwrap_or_default();
    let statuses = status.container_statuses.clone().unwrap_or_default();
    let trainer = statuses.iter().find(|s| s.name == TRAINER_CONTAINER);
    let report = trainer
        .and_then(terminated_message)
        .and_then(TrainerReport::parse);

    // A kubelet reports a container's end before the pod's phase (and a deleted pod may vanish
    // before the phase follows): the trainer's own end decides first.
    let trainer_exit = trainer
        .and_then(|c| c.state.as_ref())
        .and_then(|s| s.terminated.as_ref())
        .map(|t| t.exit_code);
    let phase = match (phase, trainer_exit) {
        ("Running", Some(0)) => "Succeeded",
        ("Running", Some(_)) => "Failed",
        (phase, _) => phase,
    };
    let state = match phase {
        "Running" => WorkerState::Running,
        "Succeeded" => WorkerState::Succeeded { report },
        "Failed" => WorkerState::Failed(failure(&status, &init_statuses, &statuses, report)),
        _ => {
            // A failed init container of a `restartPolicy: Never` pod fails the pod; kubelets set
            // the phase a moment later, so the container status decides first.
            if let Some(f) = failed_container(&init_statuses) {
                WorkerState::Failed(f)
            } else {
                let unschedulable = status
                    .conditions
                    .iter()
                    .flatten()
                    .find(|c| {
                        c.type_ == "PodScheduled"
                            && c.status == "False"
                            && c.reason.as_deref() == Some("Unschedulable")
                    })
                    .map(|c| c.message.clone().unwrap_or_else(|| "unschedulable".into()));
                let waiting = waiting_container(&init_statuses, &statuses);
                // Preparing: an init container runs, or one has ended and the next is on its
                // way; not once they all ended (the trainer starts) or while one cannot start.
                let state_of = |s: &ContainerStatus| s.state.clone().unwrap_or_default();
                let init_running = init_statuses.iter().any(|s| state_of(s).running.is_some());
                let init_ended = init_statuses
                    .iter()
                    .filter(|s| state_of(s).terminated.is_some())
                    .count();
                let init_total = pod
                    .spec
                    .as_ref()
                    .and_then(|s| s.init_containers.as_ref())
                    .map_or(init_statuses.len(), Vec::len);
                let preparing = init_running
                    || (waiting.is_none() && init_ended > 0 && init_ended < init_total);
                let prepared = init_ended == init_total;
                let scheduled = pod.spec.as_ref().is_some_and(|s| s.node_name.is_some())
                    || status
                        .conditions
                        .iter()
                        .flatten()
                        .any(|c| c.type_ == "PodScheduled" && c.status == "True");
                WorkerState::Pending {
                    unschedulable,
                    preparing,
                    scheduled,
                    waiting,
                    prepared,
                }
            }
        }
    };
    let deleted = deletion_requested(pod).is_some_and(|requested| {
        !failed_before(&init_statuses, requested) && !failed_before(&statuses, requested)
    });

    Worker {
        name: pod.name_any(),
        index: labels.get(WORKER_INDEX_LABEL).and_then(|v| v.parse().ok()),
        attempt: labels.get(ATTEMPT_LABEL).and_then(|v| v.parse().ok()),
        terminating: pod.metadata.deletion_timestamp.is_some(),
        pod_ip: status.pod_ip.clone(),
        trainer_started: trainer.and_then(started_at),
        trainer_finished: trainer.and_then(finished_at),
        disruption: disruption_target(&status),
        pod_reason: status.reason.clone(),
        deleted,
        state,
    }
}

/// The reason of a True `DisruptionTarget` condition (Kueue's older `TerminationTarget` alike).
fn disruption_target(status: &k8s_openapi::api::core::v1::PodStatus) -> Option<String> {
    status
        .conditions
        .iter()
        .flatten()
        .find(|c| {
            matches!(c.type_.as_str(), "DisruptionTarget" | "TerminationTarget")
                && c.status == "True"
        })
        .map(|c| c.reason.clone().unwrap_or_default())
}

/// A pod whose container a dead node will never report stopped is let go this long after its
/// deletion was due.
pub const REPORT_WAIT_SECONDS: i64 = 30;

/// May the operator drop `REPORT_FINALIZER` from this pod? Once it is being deleted and its
/// trainer no longer runs (its final status, read in this reconcile, is in the training's status),
/// or when its node has not said so `REPORT_WAIT_SECONDS` after the deletion was due.
pub fn report_read(pod: &Pod, now: Timestamp) -> bool {
    let Some(deleted) = pod.metadata.deletion_timestamp.as_ref() else {
        return false;
    };
    let trainer_running = pod
        .status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .into_iter()
        .flatten()
        .any(|c| {
            c.name == TRAINER_CONTAINER && c.state.as_ref().is_some_and(|s| s.running.is_some())
        });
    let overdue = now.as_second() >= deleted.0.as_second() + REPORT_WAIT_SECONDS;
    holds_report(pod) && (!trainer_running || overdue)
}

/// Carries `REPORT_FINALIZER`.
pub fn holds_report(pod: &Pod) -> bool {
    pod.metadata
        .finalizers
        .iter()
        .flatten()
        .any(|f| f == REPORT_FINALIZER)
}

fn started_at(s: &ContainerStatus) -> Option<Timestamp> {
    let state = s.state.as_ref()?;
    let running = state.running.as_ref().and_then(|r| r.started_at.as_ref());
    let ended = state
        .terminated
        .as_ref()
        .and_then(|t| t.started_at.as_ref());
    running.or(ended).map(|t| t.0)
}

fn finished_at(s: &ContainerStatus) -> Option<Timestamp> {
    s.state
        .as_ref()?
        .terminated
        .as_ref()?
        .finished_at
        .as_ref()
        .map(|t| t.0)
}

fn failure(
    status: &k8s_openapi::api::core::v1::PodStatus,
    init: &[ContainerStatus],
    main: &[ContainerStatus],
    report: Option<TrainerReport>,
) -> Failure {
    if let Some(f) = failed_container(init) {
        return f;
    }
    if let Some(mut f) = failed_container(main) {
        f.report = report;
        return f;
    }
    // No container explains it: evicted, deleted node, or a status written by hand.
    Failure {
        container: None,
        exit_code: None,
        reason: status.reason.clone(),
        message: status.message.clone(),
        report,
    }
}

fn failed_container(statuses: &[ContainerStatus]) -> Option<Failure> {
    statuses.iter().find_map(|s| {
        let t = s.state.as_ref()?.terminated.as_ref()?;
        (t.exit_code != 0).then(|| Failure {
            container: Some(s.name.clone()),
            exit_code: Some(t.exit_code),
            reason: t.reason.clone(),
            message: t.message.clone(),
            report: None,
        })
    })
}

fn terminated_message(s: &ContainerStatus) -> Option<&str> {
    s.state.as_ref()?.terminated.as_ref()?.message.as_deref()
}

/// The line of a log tail that says what went wrong: a worker's `error` event of the trainer's
/// JSON Lines stream (docs/contract.md), or its human `error:` line (under `launch`, `[rank N]
/// error: ...`, as older trainers wrote it), before `launch`'s summary of it, which only points
/// back at it; else the last line.
fn error_line(text: &str) -> Option<String> {
    let events: Vec<(Option<u64>, String)> = text
        .lines()
        .filter_map(Line::parse)
        .filter_map(|l| match l.event {
            Event::Error(e) => Some((l.rank, e.message)),
            _ => None,
        })
        .collect();
    let worker = events.iter().find(|(rank, _)| rank.is_some());
    if let Some((rank, message)) = worker.or_else(|| events.last()) {
        return Some(match rank {
            Some(r) => format!("rank {r}: {message}"),
            None => message.clone(),
        });
    }
    let errors: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("error:") || (l.starts_with("[rank ") && l.contains("] error:")))
        .collect();
    errors
        .iter()
        .find(|l| l.starts_with("[rank "))
        .or_else(|| errors.last())
        .map(|l| l.to_string())
        .or_else(|| last_line(text))
}

fn last_line(text: &str) -> Option<String> {
    text.lines()
        .rev()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .map(str::to_string)
}

fn truncate(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_string()
    } else {
        let cut: String = s.chars().take(max).collect();
        format!("{cut}...")
    }
}

#[cfg(test)]
pub(crate) mod testing {
    //! Pods in the states kubelets put them in, for the reconciler's tests.
    use k8s_openapi::api::core::v1::{
        ContainerState, ContainerStateRunning, ContainerStateTerminated, ContainerStateWaiting,
        ContainerStatus, Pod, PodCondition, PodStatus,
    };

    use super::*;
    use crate::crd::CharLMTraining;
    use crate::resources::{worker_pod, PodSettings};

    pub fn settings() -> PodSettings {
        PodSettings {
            default_image: "charlm-trainer:test".into(),
            image_pull_policy: None,
        }
    }

    pub fn pod(t: &CharLMTraining, index: i32, attempt: i64) -> Pod {
        let effective = crate::effective::resolve(&t.spec).expect("a valid test spec");
        worker_pod(t, &effective, index, attempt, &settings())
    }

    pub fn running(mut pod: Pod, ip: &str) -> Pod {
        pod.status = Some(PodStatus {
            phase: Some("Running".into()),
            pod_ip: Some(ip.into()),
            container_statuses: Some(vec![ContainerStatus {
                name: TRAINER_CONTAINER.into(),
                state: Some(ContainerState {
                    running: Some(ContainerStateRunning::default()),
                    ..Default::default()
                }),
                ..Default::default()
            }]),
            ..Default::default()
        });
        pod
    }

    pub fn terminated(mut pod: Pod, container: &str, code: i32, message: &str) -> Pod {
        let status = ContainerStatus {
            name: container.into(),
            state: Some(ContainerState {
                terminated: Some(ContainerStateTerminated {
                    exit_code: code,
                    reason: Some(if code == 0 { "Completed" } else { "Error" }.into()),
                    message: Some(message.into()),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let init = container != TRAINER_CONTAINER;
        pod.status = Some(PodStatus {
            phase: Some(if code == 0 { "Succeeded" } else { "Failed" }.into()),
            init_container_statuses: init.then(|| vec![status.clone()]),
            container_statuses: (!init).then(|| vec![status]),
            ..Default::default()
        });
        pod
    }

    pub fn unschedulable(mut pod: Pod, message: &str) -> Pod {
        pod.status = Some(PodStatus {
            phase: Some("Pending".into()),
            conditions: Some(vec![PodCondition {
                type_: "PodScheduled".into(),
                status: "False".into(),
                reason: Some("Unschedulable".into()),
                message: Some(message.into()),
                ..Default::default()
            }]),
            ..Default::default()
        });
        pod
    }

    /// The pod with a True `DisruptionTarget` condition of `reason`, as the scheduler, the
    /// Eviction API or the taint manager add it before they delete the pod.
    pub fn disrupted(mut pod: Pod, reason: &str) -> Pod {
        let status = pod.status.get_or_insert_with(Default::default);
        status
            .conditions
            .get_or_insert_with(Vec::new)
            .push(PodCondition {
                type_: "DisruptionTarget".into(),
                status: "True".into(),
                reason: Some(reason.into()),
                ..Default::default()
            });
        pod
    }

    /// The pod with `status.reason` set (`Evicted`, `NodeLost`, ...).
    pub fn with_pod_reason(mut pod: Pod, reason: &str) -> Pod {
        pod.status.get_or_insert_with(Default::default).reason = Some(reason.into());
        pod
    }

    /// The trainer container ended with `reason` (e.g. `OOMKilled`) and `code`.
    pub fn killed(pod: Pod, code: i32, reason: &str, message: &str) -> Pod {
        let mut pod = terminated(pod, TRAINER_CONTAINER, code, message);
        let status = pod.status.as_mut().expect("terminated sets a status");
        for c in status.container_statuses.iter_mut().flatten() {
            if let Some(t) = c.state.as_mut().and_then(|s| s.terminated.as_mut()) {
                t.reason = Some(reason.into());
            }
        }
        pod
    }

    /// Placed on a node, with `container` held back by the kubelet for `reason`: an init
    /// container waits before any has run; the trainer waits after the init containers ended.
    pub fn waiting(mut pod: Pod, container: &str, reason: &str, message: &str) -> Pod {
        let state = |waiting: bool| ContainerState {
            waiting: waiting.then(|| ContainerStateWaiting {
                reason: Some(reason.into()),
                message: Some(message.into()),
            }),
            terminated: (!waiting).then(|| ContainerStateTerminated {
                exit_code: 0,
                reason: Some("Completed".into()),
                ..Default::default()
            }),
            ..Default::default()
        };
        let spec = pod.spec.clone().unwrap_or_default();
        let init = spec.init_containers.unwrap_or_default();
        let init_waits = container != TRAINER_CONTAINER;
        assert!(
            !init_waits || init.iter().any(|c| c.name == container),
            "the pod has no init container {container}"
        );
        let init_statuses = init
            .iter()
            .map(|c| ContainerStatus {
                name: c.name.clone(),
                state: Some(if init_waits {
                    if c.name == container {
                        state(true)
                    } else {
                        ContainerState::default()
                    }
                } else {
                    state(false)
                }),
                ..Default::default()
            })
            .collect();
        let trainer_state = if init_waits {
            ContainerState {
                waiting: Some(ContainerStateWaiting {
                    reason: Some("PodInitializing".into()),
                    message: None,
                }),
                ..Default::default()
            }
        } else {
            state(true)
        };
        pod.spec.as_mut().unwrap().node_name = Some("node-1".into());
        pod.status = Some(PodStatus {
            phase: Some("Pending".into()),
            init_container_statuses: Some(init_statuses),
            container_statuses: Some(vec![ContainerStatus {
                name: TRAINER_CONTAINER.into(),
                state: Some(trainer_state),
                ..Default::default()
            }]),
            ..Default::default()
        });
        pod
    }

    /// Init container `container` ended with `code` and `reason` (e.g. 137, `OOMKilled`).
    pub fn killed_init(pod: Pod, container: &str, code: i32, reason: &str) -> Pod {
        let mut pod = terminated(pod, container, code, "Killed");
        let status = pod.status.as_mut().expect("terminated sets a status");
        for c in status.init_container_statuses.iter_mut().flatten() {
            if let Some(t) = c.state.as_mut().and_then(|s| s.terminated.as_mut()) {
                t.reason = Some(reason.into());
            }
        }
        pod
    }

    pub fn deleting(mut pod: Pod) -> Pod {
        pod.metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                k8s_openapi::jiff::Timestamp::from_second(1).unwrap(),
            ));
        pod
    }
}

#[cfg(test)]
mod tests {
    use super::testing::*;
    use super::*;
    use crate::resources::testing::{cpu_spec, training};

    #[test]
    fn reads_labels_and_running_state() {
        let t = training(cpu_spec());
        let w = observe(&running(pod(&t, 0, 3), "10.0.0.5"));
        assert_eq!((w.index, w.attempt), (Some(0), Some(3)));
        assert_eq!(w.state, WorkerState::Running);
        assert_eq!(w.pod_ip.as_deref(), Some("10.0.0.5"));
        assert!(!w.terminating);
    }

    #[test]
    fn a_fresh_pod_is_pending() {
        let t = training(cpu_spec());
        let w = observe(&pod(&t, 1, 0));
        assert_eq!(
            w.state,
            WorkerState::Pending {
                unschedulable: None,
                preparing: false,
                scheduled: false,
                waiting: None,
                prepared: false,
            }
        );
        assert!(!w.has_started());
        let w = observe(&unschedulable(pod(&t, 1, 0), "0/6 nodes are available"));
        assert!(
            matches!(w.state, WorkerState::Pending { unschedulable: Some(m), .. } if m.contains("0/6"))
        );
    }

    #[test]
    fn failures_explain_themselves() {
        let t = training(cpu_spec());
        let w = observe(&terminated(
            pod(&t, 1, 0),
            "prepare",
            2,
            "loading\nerror: /dataset has no .txt files; put the text there\n",
        ));
        let WorkerState::Failed(f) = w.state else {
            panic!("expected a failure")
        };
        assert!(f.is_bad_input());
        assert_eq!(
            f.describe("demo-worker-1"),
            "demo-worker-1: container prepare exited with code 2: error: /dataset has no .txt files; put the text there"
        );

        let w = observe(&terminated(
            pod(&t, 0, 0),
            TRAINER_CONTAINER,
            137,
            r#"{"step": 40, "complete": false}"#,
        ));
        let WorkerState::Failed(f) = w.state else {
            panic!("expected a failure")
        };
        assert!(!f.is_bad_input());
        assert_eq!(f.report.as_ref().unwrap().step, 40);
        assert_eq!(
            f.describe("demo-worker-0"),
            "demo-worker-0: container trainer exited with code 137: last report at step 40"
        );
    }

    #[test]
    fn a_container_the_kubelet_holds_back_is_named_with_its_reason() {
        let t = training(cpu_spec());
        let pull = waiting(
            pod(&t, 0, 0),
            "generate",
            "ImagePullBackOff",
            "Back-off pulling image \"registry.invalid/charlm:1\"",
        );
        let WorkerState::Pending {
            waiting: Some(w),
            preparing,
            prepared,
            scheduled,
            ..
        } = observe(&pull).state
        else {
            panic!("expected a waiting container")
        };
        assert!((scheduled, preparing, prepared) == (true, false, false));
        assert!(!w.is_terminal());
        assert_eq!(
            w.describe("demo-worker-0"),
            "demo-worker-0: container generate cannot start: ImagePullBackOff: Back-off pulling \
             image \"registry.invalid/charlm:1\""
        );
        // A missing Secret holds the trainer back after the dataset was prepared.
        let secret = waiting(
            pod(&t, 0, 0),
            TRAINER_CONTAINER,
            "CreateContainerConfigError",
            "secret \"wandb\" not found",
        );
        let w = observe(&secret);
        assert!(w.dataset_prepared());
        assert!(matches!(
            w.state,
            WorkerState::Pending { waiting: Some(ref x), preparing: false, .. }
                if x.container == TRAINER_CONTAINER && x.reason == "CreateContainerConfigError"
        ));
        let bad = waiting(pod(&t, 0, 0), "generate", "InvalidImageName", "x");
        assert!(matches!(
            observe(&bad).state,
            WorkerState::Pending { waiting: Some(ref x), .. } if x.is_terminal()
        ));
        // Being created (pulling) is no problem.
        let creating = waiting(pod(&t, 0, 0), "generate", "PodInitializing", "");
        assert!(matches!(
            observe(&creating).state,
            WorkerState::Pending { waiting: None, .. }
        ));
    }

    #[test]
    fn a_pod_deleted_while_it_works_is_taken_away_one_failed_before_is_not() {
        use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
        let t = training(cpu_spec());
        let at = |s: i64| Timestamp::from_second(1_700_000_000 + s).unwrap();
        let mut p = running(pod(&t, 0, 0), "10.0.0.1");
        assert!(!observe(&p).deleted);
        // `kubectl delete pod` at 100 with the pod's 300 s grace period.
        p.metadata.deletion_timestamp = Some(Time(at(400)));
        p.metadata.deletion_grace_period_seconds = Some(300);
        assert!(observe(&p).deleted);
        // The trainer saved a checkpoint on SIGTERM and exited 0 at 130: the deletion's doing.
        let mut ended = terminated(
            p.clone(),
            TRAINER_CONTAINER,
            0,
            r#"{"step": 7, "complete": false, "stop_reason": "signal"}"#,
        );
        let finished = |pod: &mut Pod, s: i64| {
            for c in pod
                .status
                .as_mut()
                .unwrap()
                .container_statuses
                .iter_mut()
                .flatten()
            {
                c.state
                    .as_mut()
                    .unwrap()
                    .terminated
                    .as_mut()
                    .unwrap()
                    .finished_at = Some(Time(at(s)));
            }
        };
        finished(&mut ended, 130);
        assert!(observe(&ended).deleted);
        // A trainer that crashed at 50, before anyone deleted its pod, failed on its own.
        let mut crashed = terminated(p, TRAINER_CONTAINER, 1, "panic");
        finished(&mut crashed, 50);
        assert!(!observe(&crashed).deleted);
    }

    #[test]
    fn success_carries_the_report() {
        let t = training(cpu_spec());
        let w = observe(&terminated(
            pod(&t, 0, 0),
            TRAINER_CONTAINER,
            0,
            r#"{"step": 50, "val_bpc": 1.2, "complete": true}"#,
        ));
        let WorkerState::Succeeded { report: Some(r) } = w.state else {
            panic!("expected success with a report")
        };
        assert!(r.complete);
    }

    #[test]
    fn evicted_pod_without_containers_is_a_failure() {
        let t = training(cpu_spec());
        let mut p = pod(&t, 0, 0);
        p.status = Some(k8s_openapi::api::core::v1::PodStatus {
            phase: Some("Failed".into()),
            reason: Some("Evicted".into()),
            message: Some("The node was low on resource: memory.".into()),
            ..Default::default()
        });
        let WorkerState::Failed(f) = observe(&p).state else {
            panic!("expected a failure")
        };
        assert_eq!(
            f.describe("demo-worker-0"),
            "demo-worker-0 failed (Evicted): The node was low on resource: memory."
        );
    }

    #[test]
    fn the_trainers_own_error_line_explains_a_failure() {
        let tail = "[rank 0] step 0 ...\n[rank 0] error: the validation split of 1518 tokens is shorter than seqLen 2048; lower --seq-len\nlaunch: rank 0: exit code 2\nerror: rank 0 failed: exit code 2 (bad input or settings: see its message above)\n";
        let f = Failure {
            container: Some("trainer".into()),
            exit_code: Some(2),
            reason: Some("Error".into()),
            message: Some(tail.into()),
            report: None,
        };
        let text = f.describe("t-worker-0");
        assert!(
            text.contains("the validation split of 1518 tokens is shorter than seqLen 2048"),
            "{text}"
        );
        let plain = Failure {
            message: Some("loading\nerror: no .txt files in /data\n".into()),
            ..f.clone()
        };
        assert!(plain
            .describe("p")
            .ends_with("error: no .txt files in /data"));
        // Today's trainer: JSON Lines on stdout, human lines on stderr, both in the log tail;
        // the worker's own `error` event wins over launch's summary.
        let stream = r#"{"schema":1,"rank":0,"event":"step","step":3}
[rank 0] error: the validation split is too short; lower --seq-len
{"schema":1,"rank":1,"event":"error","message":"the validation split is too short; lower --seq-len","exit_code":2}
launch: rank 1 failed (exit status 2); stopping the other workers
{"schema":1,"rank":1,"event":"exit","exit_code":2,"signal":null,"killed":false}
error: rank 1 failed: exit status 2 (bad input or settings: see its message above)
{"schema":1,"event":"error","message":"rank 1 failed: exit status 2","exit_code":2}
"#;
        let new = Failure {
            message: Some(stream.into()),
            ..f.clone()
        };
        assert_eq!(
            new.describe("t-worker-0"),
            "t-worker-0: container trainer exited with code 2: rank 1: the validation split is \
             too short; lower --seq-len"
        );
        let no_error = Failure {
            message: Some("Killed\n".into()),
            ..f
        };
        assert!(no_error.describe("p").ends_with(": Killed"));
    }

    #[test]
    fn a_deleted_pod_is_let_go_once_its_trainer_ended_or_its_node_is_silent() {
        use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
        let t = crate::resources::testing::training(crate::resources::testing::cpu_spec());
        let at = |s: i64| Timestamp::from_second(1_700_000_000 + s).unwrap();
        let mut p = running(pod(&t, 0, 0), "10.0.0.1");
        p.metadata.finalizers = Some(vec![REPORT_FINALIZER.into()]);
        assert!(!report_read(&p, at(0)), "not being deleted");
        p.metadata.deletion_timestamp = Some(Time(at(0)));
        assert!(!report_read(&p, at(5)), "its trainer still runs");
        assert!(
            report_read(&p, at(REPORT_WAIT_SECONDS)),
            "the node never said"
        );
        let mut ended = terminated(p.clone(), TRAINER_CONTAINER, 0, "{}");
        ended.metadata.deletion_timestamp = Some(Time(at(0)));
        assert!(report_read(&ended, at(1)));
        ended.metadata.finalizers = None;
        assert!(!report_read(&ended, at(1)), "nothing to drop");
    }
}
