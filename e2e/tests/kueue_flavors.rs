//! Kueue's ResourceFlavors reach the workers: two flavours, each of two fake nodes of its own
//! label and taint, and a ClusterQueue whose quota in each holds one 2-worker CPU gang. Each gang
//! lands only on the nodes of the flavour Kueue admitted it into (the flavour's node labels in the
//! workers' node selector, its toleration of the nodes' taint added), and a training admitted
//! again into the other flavour after its eviction (a suspend) runs there with none of the first
//! flavour's placement left. Kueue v0.17 runs as in tests/kueue.rs (its own binary, since two Kueue
//! managers must not run at once on one plane). Needs `e2e/controlplane/up` and
//! `e2e/controlplane/build`.

use std::collections::BTreeSet;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Patch, PatchParams, PostParams};
use kube::Api;
use serde_json::{json, Value};

use charlm_api::kueue::QUEUE_LABEL;
use charlm_api::Phase;
use charlm_e2e::cluster::{tool, TEST_LABEL};
use charlm_e2e::kueue::Kueue;
use charlm_e2e::specs::terminated;
use charlm_e2e::training_env::TestEnv;

const MINUTE: Duration = Duration::from_secs(60);
const POOL_LABEL: &str = "charlm.dev/e2e-flavor-pool";
const TAINT: &str = "charlm.dev/e2e-flavor";

/// The fake nodes of the test, deleted when it ends (passing or not): other tests count nodes.
struct Nodes(Vec<String>);

impl Drop for Nodes {
    fn drop(&mut self) {
        for n in &self.0 {
            let _ = tool("kubectl", &["delete", "node", n, "--wait=false"]);
        }
    }
}

/// Two kwok nodes per flavour, labelled `POOL_LABEL=<flavour>-<ns>` and tainted
/// `TAINT=<flavour>-<ns>:NoSchedule`, so that no other pod lands there.
async fn make_nodes(env: &TestEnv, flavors: &[&str]) -> Nodes {
    let api: Api<Node> = Api::all(env.admin.clone());
    let mut names = Vec::new();
    let suffix = env.ns.rsplit('-').next().unwrap().to_string();
    for flavor in flavors {
        for i in 0..2 {
            let name = format!("flv-{flavor}-{i}-{suffix}");
            let node: Node = serde_json::from_value(json!({
                "metadata": {
                    "name": name,
                    "annotations": {"kwok.x-k8s.io/node": "fake"},
                    "labels": {
                        "kubernetes.io/hostname": name, "kubernetes.io/os": "linux",
                        "kubernetes.io/arch": "amd64", "type": "kwok",
                        POOL_LABEL: format!("{flavor}-{}", env.ns), TEST_LABEL: env.ns,
                    }
                },
                "spec": {"taints": [{"key": TAINT, "value": format!("{flavor}-{}", env.ns), "effect": "NoSchedule"}]},
                "status": {
                    "capacity": {"cpu": "4", "memory": "8Gi", "pods": "110"},
                    "allocatable": {"cpu": "4", "memory": "8Gi", "pods": "110"}
                }
            }))
            .unwrap();
            api.create(&PostParams::default(), &node).await.unwrap();
            names.push(name);
        }
    }
    let nodes = Nodes(names);
    env.wait("the flavours' nodes to be Ready", MINUTE, || async {
        let mut ready = 0;
        for n in &nodes.0 {
            let node = api.get(n).await.map_err(|e| e.to_string())?;
            let is_ready = node
                .status
                .and_then(|s| s.conditions)
                .unwrap_or_default()
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True");
            ready += usize::from(is_ready);
        }
        if ready == nodes.0.len() {
            Ok(Some(()))
        } else {
            Err(format!("{ready} of {} Ready", nodes.0.len()))
        }
    })
    .await;
    nodes
}

/// Flavours `a-<ns>` and `b-<ns>` of those nodes, each with the toleration of their taint, and a
/// ClusterQueue with quota for one gang (2 x 500m CPU, 2 x 256Mi) in each, tried in that order.
fn queue_setup(ns: &str) -> String {
    let flavor = |f: &str| {
        format!(
            r#"apiVersion: kueue.x-k8s.io/v1beta2
kind: ResourceFlavor
metadata:
  name: {f}-{ns}
  labels: {{{TEST_LABEL}: {ns}}}
spec:
  nodeLabels:
    {POOL_LABEL}: {f}-{ns}
  tolerations:
  - {{key: {TAINT}, operator: Equal, value: {f}-{ns}, effect: NoSchedule}}
---
"#
        )
    };
    format!(
        r#"{}{}apiVersion: kueue.x-k8s.io/v1beta2
kind: ClusterQueue
metadata:
  name: pools-{ns}
  labels: {{{TEST_LABEL}: {ns}}}
spec:
  namespaceSelector:
    matchLabels:
      kubernetes.io/metadata.name: {ns}
  resourceGroups:
  - coveredResources: [cpu, memory]
    flavors:
    - name: a-{ns}
      resources:
      - {{name: cpu, nominalQuota: "1"}}
      - {{name: memory, nominalQuota: 512Mi}}
    - name: b-{ns}
      resources:
      - {{name: cpu, nominalQuota: "1"}}
      - {{name: memory, nominalQuota: 512Mi}}
---
apiVersion: kueue.x-k8s.io/v1beta2
kind: LocalQueue
metadata:
  name: team
  namespace: {ns}
spec:
  clusterQueue: pools-{ns}
"#,
        flavor("a"),
        flavor("b")
    )
}

/// A CPU training of two workers in LocalQueue `team`; its own spec selects and tolerates nothing.
fn queued(name: &str) -> Value {
    json!({
        "apiVersion": "charlm.dev/v1alpha1",
        "kind": "CharLMTraining",
        "metadata": {"name": name, "labels": {QUEUE_LABEL: "team"}},
        "spec": {
            "depth": 2, "gpus": 0, "cpuWorkers": 2, "maxSteps": 100,
            "dataset": {"synthetic": {"chars": 100000}},
            "checkpoint": {"size": "1Gi"},
            "restartPolicy": {"maxRestarts": 2, "backoffSeconds": 3},
            "resources": {"requests": {"cpu": "500m", "memory": "256Mi"}}
        }
    })
}

/// The flavour a training's Workload was admitted into.
async fn admitted_flavor(env: &TestEnv, training: &str) -> String {
    let out = tool(
        "kubectl",
        &[
            "get",
            "workloads.kueue.x-k8s.io",
            "-n",
            &env.ns,
            "-l",
            &format!("charlm.dev/training={training}"),
            "-o",
            "jsonpath={.items[0].status.admission.podSetAssignments[0].flavors.cpu}",
        ],
    )
    .unwrap();
    out.trim().to_string()
}

/// Waits for both workers of `training` to be scheduled; checks that they sit on `flavor`'s nodes
/// and carry its placement and none of `other`'s.
async fn assert_on_flavor(env: &TestEnv, training: &str, flavor: &str, other: &str) {
    let pods: Vec<Pod> = env
        .wait(
            &format!("both workers of {training} scheduled"),
            MINUTE,
            || async {
                let pods = env.workers(training).await;
                let placed = pods
                    .iter()
                    .filter(|p| p.spec.as_ref().and_then(|s| s.node_name.as_ref()).is_some())
                    .count();
                if pods.len() == 2 && placed == 2 {
                    Ok(Some(pods))
                } else {
                    let why: Vec<String> = pods
                        .iter()
                        .map(|p| {
                            let conds = p
                                .status
                                .as_ref()
                                .and_then(|s| s.conditions.clone())
                                .unwrap_or_default();
                            format!(
                                "{:?}: node {:?}, {:?}",
                                p.metadata.name,
                                p.spec.as_ref().and_then(|s| s.node_name.clone()),
                                conds.iter().map(|c| c.message.clone()).collect::<Vec<_>>()
                            )
                        })
                        .collect();
                    Err(format!("{} pods: {why:?}", pods.len()))
                }
            },
        )
        .await;
    let pool = format!("{flavor}-{}", env.ns);
    let other_pool = format!("{other}-{}", env.ns);
    let mut nodes = BTreeSet::new();
    for pod in &pods {
        let spec = pod.spec.as_ref().unwrap();
        let node = spec.node_name.clone().unwrap();
        assert!(
            node.starts_with(&format!("flv-{flavor}-")),
            "{training}'s {:?} runs on {node}, not on a node of flavour {pool}",
            pod.metadata.name
        );
        nodes.insert(node);
        let selector = spec.node_selector.clone().unwrap_or_default();
        assert_eq!(selector.get(POOL_LABEL), Some(&pool), "{selector:?}");
        assert_ne!(selector.get(POOL_LABEL), Some(&other_pool));
        // The API server adds its own (not-ready, unreachable); of the flavours', only this one's.
        let tolerations = spec.tolerations.clone().unwrap_or_default();
        let flavors: Vec<Option<&str>> = tolerations
            .iter()
            .filter(|t| t.key.as_deref() == Some(TAINT))
            .map(|t| t.value.as_deref())
            .collect();
        assert_eq!(
            flavors,
            [Some(pool.as_str())],
            "{training}: the flavour tolerations should be {pool}'s alone: {tolerations:?}"
        );
    }
    eprintln!("{training} admitted into {pool}: workers on {nodes:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admitted_gang_runs_on_its_flavors_nodes_only_and_moves_with_a_new_admission() {
    let mut env = TestEnv::new("kueue-flavors").await;
    let nodes = make_nodes(&env, &["a", "b"]).await;
    let mut kueue = Kueue::start(&env.dir.join("kueue")).await;
    let ns = env.ns.clone();
    let setup = env.dir.join("queue-setup.yaml");
    std::fs::write(&setup, queue_setup(&ns)).unwrap();
    tool("kubectl", &["apply", "-f", setup.to_str().unwrap()]).expect("the queue setup");
    env.start_operator("operator-1").await;
    let (a, b) = (format!("a-{ns}"), format!("b-{ns}"));

    // The first gang fills flavour a, the second goes to b; each runs on its flavour's nodes.
    env.apply(&queued("first").to_string()).await;
    env.wait_phase("first", Phase::Running, MINUTE).await;
    assert_eq!(admitted_flavor(&env, "first").await, a);
    assert_on_flavor(&env, "first", "a", "b").await;
    env.apply(&queued("second").to_string()).await;
    env.wait_phase("second", Phase::Running, MINUTE).await;
    assert_eq!(admitted_flavor(&env, "second").await, b);
    assert_on_flavor(&env, "second", "b", "a").await;

    // Suspended, the first is evicted and its workers go; a third takes flavour a meanwhile.
    env.trainings()
        .patch(
            "first",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"suspend": true}})),
        )
        .await
        .unwrap();
    env.wait_phase("first", Phase::Suspended, MINUTE).await;
    env.wait("the first's workers gone", MINUTE, || async {
        match env.workers("first").await.len() {
            0 => Ok(Some(())),
            n => Err(format!("{n} left")),
        }
    })
    .await;
    env.apply(&queued("third").to_string()).await;
    env.wait_phase("third", Phase::Running, MINUTE).await;
    assert_eq!(admitted_flavor(&env, "third").await, a);
    assert_on_flavor(&env, "third", "a", "b").await;

    // The second succeeds (flavour b frees up); the first, resumed, can only be admitted into b,
    // and its new workers carry b's placement and nothing of a's.
    let report = r#"{"step": 100, "val_bpc": 1.2, "checkpoint": "/checkpoints/step-000000100", "complete": true}"#;
    env.set_pod_status(
        "second-worker-0",
        json!({"phase": "Succeeded", "containerStatuses": terminated("trainer", 0, "Completed", report)}),
    )
    .await;
    env.wait_phase("second", Phase::Succeeded, MINUTE).await;
    env.trainings()
        .patch(
            "first",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"suspend": false}})),
        )
        .await
        .unwrap();
    env.wait_phase("first", Phase::Running, MINUTE).await;
    assert_eq!(admitted_flavor(&env, "first").await, b);
    assert_on_flavor(&env, "first", "b", "a").await;

    env.finish().await;
    kueue.delete_test_objects(&["clusterqueue", "resourceflavor"], &ns);
    kueue.stop();
    drop(nodes);
}
