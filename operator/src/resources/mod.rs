//! Pure functions from a `CharLMTraining` to the objects that run it. Nothing here talks to the API
//! server, so every field of every object is checked by unit tests.

mod env;
mod network_policy;
mod pod;
mod pvc;
mod service;

pub use network_policy::{
    network_policy_name, parse_labels, workers_network_policy, NetworkPolicySettings,
};
pub use pod::{worker_pod, PodSettings};
pub use pvc::{checkpoint_pvc, pvc_owner_update};
pub use service::workers_service;

/// Where the pods keep their files (the trainer's environment names them too).
const WORK_DIR: &str = "/work";
const CHECKPOINT_DIR: &str = "/checkpoints";
const TERMINATION_LOG: &str = "/dev/termination-log";
/// TensorBoard event files, on the checkpoint volume so they outlive the pods.
pub const TENSORBOARD_DIR: &str = "/checkpoints/tensorboard";

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::{Resource, ResourceExt};

use crate::crd::CharLMTraining;

pub use charlm_api::names::{
    pod_name, pvc_name, service_name, ATTEMPT_LABEL, TRAINER_CONTAINER, TRAINING_LABEL,
    WORKER_INDEX_LABEL,
};
/// The rendezvous port of the trainer's TCPStore on worker 0 (MASTER_PORT).
pub const RENDEZVOUS_PORT: i32 = charlm_contract::RENDEZVOUS_PORT as i32;
/// The trainer's progress and metrics port (CHARLM_METRICS_PORT).
pub const PROGRESS_PORT: i32 = charlm_contract::PROGRESS_PORT as i32;
/// On every worker pod: a pod being deleted stays until the operator has read its final status
/// (the SIGTERM checkpoint of a suspend, a failure's message), as the Job controller's tracking
/// finalizer does; a kubelet otherwise removes it a moment after writing that status.
pub const REPORT_FINALIZER: &str = "charlm.dev/final-report";

/// Name of that port on the pods and the headless Service, for PodMonitors and ServiceMonitors.
pub const METRICS_PORT_NAME: &str = "metrics";

/// DNS name of worker 0 through the headless Service (the contract's MASTER_ADDR).
pub fn master_addr(training: &str, namespace: &str) -> String {
    format!(
        "{}.{}.{namespace}.svc",
        pod_name(training, 0),
        service_name(training)
    )
}

/// The labels shared by every object of a training; selecting on `TRAINING_LABEL` finds them all.
pub fn common_labels(training: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (
            "app.kubernetes.io/name".to_string(),
            "charlm-trainer".to_string(),
        ),
        (
            "app.kubernetes.io/instance".to_string(),
            training.to_string(),
        ),
        (
            "app.kubernetes.io/managed-by".to_string(),
            "charlm-operator".to_string(),
        ),
        (TRAINING_LABEL.to_string(), training.to_string()),
    ])
}

/// The label selector of a training's worker pods.
pub fn workers_selector(training: &str) -> String {
    format!("{TRAINING_LABEL}={training}")
}

/// The controller reference that makes the training own (and garbage-collect) an object.
pub fn owner_reference(training: &CharLMTraining) -> OwnerReference {
    training
        .controller_owner_ref(&())
        .expect("a training read from the API server has a name and uid")
}

/// The namespace of a training read from the API server.
pub fn namespace_of(training: &CharLMTraining) -> String {
    training
        .namespace()
        .unwrap_or_else(|| "default".to_string())
}

#[cfg(test)]
pub(crate) mod testing {
    use std::collections::BTreeMap;

    use k8s_openapi::api::core::v1::Pod;
    use kube::api::ObjectMeta;

    use super::{worker_pod, PodSettings};
    use crate::crd::{CharLMTraining, CharLMTrainingSpec};

    /// A training as the API server would return it: defaults applied, name, namespace and uid set.
    pub fn training(spec: serde_json::Value) -> CharLMTraining {
        let spec: CharLMTrainingSpec = serde_json::from_value(spec).expect("a valid test spec");
        let mut t = CharLMTraining::new("demo", spec);
        t.metadata = ObjectMeta {
            name: Some("demo".into()),
            namespace: Some("team-a".into()),
            uid: Some("0c5f6f8e-1111-2222-3333-444455556666".into()),
            generation: Some(1),
            ..Default::default()
        };
        t
    }

    pub fn gpu_spec() -> serde_json::Value {
        serde_json::json!({
            "depth": 24, "gpus": 16, "hours": 2.0,
            "dataset": {"pvc": {"claimName": "texts", "path": "corpus/v1"}}
        })
    }

    pub fn cpu_spec() -> serde_json::Value {
        serde_json::json!({
            "depth": 2, "gpus": 0, "maxSteps": 50,
            "dataset": {"synthetic": {"chars": 20000, "seed": 7}}
        })
    }

    pub fn pod_of(t: &CharLMTraining, index: i32, attempt: i64) -> Pod {
        let effective = crate::effective::resolve(&t.spec).unwrap();
        worker_pod(t, &effective, index, attempt, &settings())
    }

    pub fn settings() -> PodSettings {
        PodSettings {
            default_image: "charlm-trainer:test".into(),
            image_pull_policy: Some("IfNotPresent".into()),
        }
    }

    pub fn env_of(pod: &Pod) -> BTreeMap<String, String> {
        let c = &pod.spec.as_ref().unwrap().containers[0];
        c.env
            .iter()
            .flatten()
            .map(|e| {
                let v = e.value.clone().unwrap_or_else(|| {
                    format!(
                        "from:{}",
                        e.value_from
                            .as_ref()
                            .unwrap()
                            .field_ref
                            .as_ref()
                            .unwrap()
                            .field_path
                    )
                });
                (e.name.clone(), v)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn master_addr_names_worker_0_through_the_service() {
        assert_eq!(
            master_addr("demo", "ns"),
            "demo-worker-0.demo-workers.ns.svc"
        );
    }

    #[test]
    fn owner_reference_is_a_controller_reference() {
        let t = testing::training(testing::cpu_spec());
        let owner = owner_reference(&t);
        assert_eq!(owner.kind, "CharLMTraining");
        assert_eq!(owner.api_version, "charlm.dev/v1alpha1");
        assert_eq!(owner.controller, Some(true));
        assert_eq!(owner.uid, t.metadata.uid.unwrap());
    }
}
