//! Small trainings and kubelet-style statuses that the operator tests on the fake nodes share.

use k8s_openapi::api::events::v1::Event;
use kube::api::ListParams;
use kube::Api;
use serde_json::{json, Value};

use charlm_api::CharLMTraining;

use crate::cluster;
use crate::training_env::TestEnv;

/// A small training of `workers` pods of one GPU each, for behaviour tests. It lands on the kwok
/// H100 nodes, whose pods only ever do what the API says: the tests play the kubelet by writing pod
/// statuses, and no real process races them.
pub fn small_gpu(name: &str, workers: i32) -> Value {
    json!({
        "apiVersion": "charlm.dev/v1alpha1",
        "kind": "CharLMTraining",
        "metadata": {"name": name},
        "spec": {
            "depth": 2, "gpus": workers, "gpusPerNode": 1, "maxSteps": 100,
            "dataset": {"synthetic": {"chars": 100000}},
            "checkpoint": {"size": "1Gi"},
            "restartPolicy": {"maxRestarts": 2, "backoffSeconds": 3},
            "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}}
        }
    })
}

/// A small CPU training of `workers` pods, as a base for invalid variants.
pub fn small_cpu(name: &str, workers: i32) -> Value {
    json!({
        "apiVersion": "charlm.dev/v1alpha1",
        "kind": "CharLMTraining",
        "metadata": {"name": name},
        "spec": {
            "depth": 2, "gpus": 0, "cpuWorkers": workers, "maxSteps": 100,
            "dataset": {"synthetic": {"chars": 100000}},
            "checkpoint": {"size": "1Gi"},
            "restartPolicy": {"maxRestarts": 2, "backoffSeconds": 3},
            "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}}
        }
    })
}

/// A condition's (status, reason); panics when the training has none of that type.
pub fn condition(t: &CharLMTraining, type_: &str) -> (String, String) {
    let c = t
        .status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == type_))
        .unwrap_or_else(|| panic!("no condition {type_} in {:?}", t.status));
    (c.status.clone(), c.reason.clone())
}

/// Events about one training in the test's namespace.
pub async fn events_of(env: &TestEnv, training: &str) -> Vec<Event> {
    let events: Api<Event> = Api::namespaced(env.admin.clone(), &env.ns);
    events
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(training))
        .collect()
}

/// A terminated container, as a kubelet reports it.
pub fn terminated(container: &str, code: i32, reason: &str, message: &str) -> Value {
    json!([{
        "name": container, "image": "charlm-trainer:e2e", "imageID": "", "ready": false,
        "restartCount": 0,
        "state": {"terminated": {"exitCode": code, "reason": reason, "message": message}}
    }])
}

/// A change that makes a valid manifest invalid (or edits a stored one).
pub type Mutation = Box<dyn Fn(&mut Value)>;

/// Applies `base` changed by each case's mutation: the API server must refuse every one with an
/// error containing the case's message. Returns (case, error text) for further checks.
pub async fn assert_refused(
    env: &TestEnv,
    base: &Value,
    cases: &[(&str, Mutation, &str)],
) -> Vec<(String, String)> {
    let mut refused = Vec::new();
    for (what, mutate, message) in cases {
        let mut manifest = base.clone();
        mutate(&mut manifest);
        let text = cluster::apply_yaml(&env.admin, &env.ns, &manifest.to_string())
            .await
            .expect_err(&format!("the API server accepted {what}"))
            .to_string();
        assert!(
            text.contains(message),
            "{what}: expected {message:?} in {text:?}"
        );
        refused.push((what.to_string(), text));
    }
    refused
}

/// The toleration that hands a training's pods to the test: kwok never starts them and removes
/// them on deletion only once none of their containers runs (`kwok-stages.yaml`), so the test
/// writes every state a kubelet would (a container it cannot start, the end of a trainer that
/// saved a checkpoint on SIGTERM). No node has the taint, so scheduling is unchanged.
pub const KUBELET_PLAYED_BY_TEST: &str = "charlm.dev/e2e-kubelet";

/// `manifest` with its pods left to the test to play the kubelet of (CPU trainings: the
/// toleration replaces the GPU one a GPU training would get by default).
pub fn kubelet_played_by_test(mut manifest: Value) -> Value {
    manifest["spec"]["tolerations"] =
        json!([{"key": KUBELET_PLAYED_BY_TEST, "operator": "Exists"}]);
    manifest
}

/// A container's status in the kubelet's words: `running`, `waiting` (reason and message) or
/// `terminated` (exit code, reason, message), as one entry of `containerStatuses`.
pub fn container_state(container: &str, state: Value) -> Value {
    let ready = state.get("running").is_some();
    json!({
        "name": container, "image": "charlm-trainer:e2e", "imageID": "", "ready": ready,
        "restartCount": 0, "started": ready, "state": state
    })
}

/// The pod as a kubelet writes it once the init containers ended and the trainer runs.
pub fn trainer_running() -> Value {
    json!({
        "phase": "Running",
        "initContainerStatuses": [
            container_state("generate", ended(0, "Completed", "")),
            container_state("prepare", ended(0, "Completed", "")),
        ],
        "containerStatuses": [container_state("trainer", running())]
    })
}

pub fn waiting(reason: &str, message: &str) -> Value {
    json!({"waiting": {"reason": reason, "message": message}})
}

pub fn running() -> Value {
    json!({"running": {"startedAt": now()}})
}

pub fn ended(code: i32, reason: &str, message: &str) -> Value {
    json!({"terminated": {"exitCode": code, "reason": reason, "message": message,
                           "startedAt": now(), "finishedAt": now()}})
}

/// Now, to the second, as the API's timestamps are.
fn now() -> String {
    let now = jiff::Timestamp::now().as_second();
    jiff::Timestamp::from_second(now)
        .expect("now is a timestamp")
        .to_string()
}
