//! Pods in the states kubelets put them in, for the decision's tests.

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
    pod.metadata.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
        k8s_openapi::jiff::Timestamp::from_second(1).unwrap(),
    ));
    pod
}
