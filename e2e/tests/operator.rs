//! The operator on the real control plane of `e2e/controlplane/` (kube-apiserver, etcd,
//! controller-manager, scheduler, kwok nodes): the chart installs, the operator binary runs under the
//! chart's ServiceAccount token (so its RBAC is proven enough), and every behaviour of issue 3 is
//! checked against what the API server actually holds. Needs `e2e/controlplane/up`; fails without it.
//! One binary, a module per subject; the helpers they share are here or in `charlm_e2e`.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Node, Pod, ResourceQuota};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::api::{DeleteParams, ListParams, ObjectMeta, PostParams};
use kube::{Api, ResourceExt};
use serde_json::{json, Value};

use charlm_api::{CharLMTraining, DeviceBatchSize, Phase};
use charlm_e2e::cluster::{self, repo_root, tool, CHART_NAMESPACE};
use charlm_e2e::specs::{
    assert_refused, condition, events_of, small_cpu, small_gpu, terminated, Mutation,
};
use charlm_e2e::training_env::TestEnv;

#[path = "operator/chart.rs"]
mod chart;
#[path = "operator/failures.rs"]
mod failures;
#[path = "operator/leader.rs"]
mod leader;
#[path = "operator/lifecycle.rs"]
mod lifecycle;
#[path = "operator/network_policy.rs"]
mod network_policy;
#[path = "operator/placement.rs"]
mod placement;
#[path = "operator/progress.rs"]
mod progress;

const MINUTE: Duration = Duration::from_secs(60);

fn example(file: &str) -> Value {
    let text = std::fs::read_to_string(repo_root().join("examples").join(file)).unwrap();
    serde_norway::from_str(&text).unwrap()
}

fn env_of(pod: &Pod) -> BTreeMap<String, String> {
    pod.spec.as_ref().unwrap().containers[0]
        .env
        .iter()
        .flatten()
        .filter_map(|e| Some((e.name.clone(), e.value.clone()?)))
        .collect()
}

fn phase(t: &CharLMTraining) -> Option<Phase> {
    t.status.as_ref().and_then(|s| s.phase)
}

async fn nodes_by_name(env: &TestEnv) -> BTreeMap<String, Node> {
    let nodes: Api<Node> = Api::all(env.admin.clone());
    nodes
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .map(|n| (n.name_any(), n))
        .collect()
}

fn is_h100(node: &Node) -> bool {
    node.labels()
        .get("nvidia.com/gpu.product")
        .map(String::as_str)
        == Some("NVIDIA-H100-80GB-HBM3")
}

/// Applies a training and waits until all its workers run. (The control plane's default
/// StorageClass provisions the checkpoint volume.)
async fn start_training(env: &TestEnv, manifest: &Value) -> CharLMTraining {
    let name = manifest["metadata"]["name"].as_str().unwrap();
    env.apply(&manifest.to_string()).await;
    env.wait_phase(name, Phase::Running, MINUTE).await
}

/// Waits until `name`'s workers are all gone.
async fn wait_workers_gone(env: &TestEnv, name: &str) {
    env.wait(&format!("{name}: workers gone"), MINUTE, || async {
        let n = env.workers(name).await.len();
        if n == 0 {
            Ok(Some(()))
        } else {
            Err(format!("{n} pods left"))
        }
    })
    .await;
}

/// Waits (30 s at most) for the Event of `reason` about `training` whose note contains every one
/// of `needles`: the recorder publishes it after the status patch the test saw.
async fn assert_event(env: &TestEnv, training: &str, reason: &str, needles: &[&str]) {
    env.wait(
        &format!("a {reason} event about {training} naming {needles:?}"),
        Duration::from_secs(30),
        || async {
            let events = events_of(env, training).await;
            let found = events.iter().any(|e| {
                e.reason.as_deref() == Some(reason)
                    && e.note
                        .as_deref()
                        .is_some_and(|n| needles.iter().all(|x| n.contains(x)))
            });
            if found {
                return Ok(Some(()));
            }
            let notes: Vec<(Option<&str>, Option<&str>)> = events
                .iter()
                .map(|e| (e.reason.as_deref(), e.note.as_deref()))
                .collect();
            Err(format!("{notes:?}"))
        },
    )
    .await;
}
