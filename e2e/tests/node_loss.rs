//! A lost node (issue 34): a gang whose worker sits on a node that stops answering ends as
//! `NodeLost` (a disruption, not a counted `Error`), and while the lost node holds the old pod
//! `Terminating` the training says so in PodsReady, naming the pod and the node; once the node is
//! back the gang starts again. The nodes here are the test's own (not kwok's): the test plays
//! their kubelets, renewing their Leases in `kube-node-lease` and removing the pods deleted on
//! them, and for the lost one stops both and writes what the node controller would (Ready
//! Unknown, the `unreachable` taint). Needs `e2e/controlplane/up`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client, ResourceExt};
use serde_json::json;

use charlm_api::{CharLMTraining, Phase};
use charlm_e2e::specs::{
    container_state, ended, kubelet_played_by_test, small_cpu, trainer_running,
};
use charlm_e2e::training_env::TestEnv;

const MINUTE: Duration = Duration::from_secs(60);
const LEASE_NAMESPACE: &str = "kube-node-lease";
const NODE_LABEL: &str = "charlm.dev/e2e-node";

/// A node of the test's: its kubelet, while alive, renews the node's Lease and removes the pods
/// deleted on it (as a kubelet does once their containers stopped).
struct FakeNode {
    name: String,
    alive: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
    client: Client,
}

impl FakeNode {
    async fn start(client: &Client, name: &str, label: &str, namespace: &str) -> FakeNode {
        let nodes: Api<Node> = Api::all(client.clone());
        let node: Node = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name, "labels": {NODE_LABEL: label, "kubernetes.io/hostname": name}},
        }))
        .unwrap();
        nodes.create(&PostParams::default(), &node).await.unwrap();
        let capacity = json!({"cpu": "16", "memory": "64Gi", "pods": "110"});
        nodes
            .patch_status(
                name,
                &PatchParams::default(),
                &Patch::Merge(json!({"status": {
                    "capacity": capacity, "allocatable": capacity,
                    "conditions": [ready("True", "KubeletReady", "kubelet is posting ready status")],
                }})),
            )
            .await
            .unwrap();
        let leases: Api<Lease> = Api::namespaced(client.clone(), LEASE_NAMESPACE);
        let lease = Lease {
            metadata: kube::api::ObjectMeta {
                name: Some(name.to_string()),
                ..Default::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(name.to_string()),
                lease_duration_seconds: Some(40),
                renew_time: Some(MicroTime(Timestamp::now())),
                ..Default::default()
            }),
        };
        leases.create(&PostParams::default(), &lease).await.unwrap();
        let alive = Arc::new(AtomicBool::new(true));
        let task = tokio::spawn(kubelet(
            client.clone(),
            name.to_string(),
            namespace.to_string(),
            alive.clone(),
        ));
        FakeNode {
            name: name.to_string(),
            alive,
            task,
            client: client.clone(),
        }
    }

    /// The node stops answering, and the node controller says so: Ready Unknown, the
    /// `unreachable` taint.
    async fn lose(&self) {
        self.alive.store(false, Ordering::SeqCst);
        let unreachable =
            |effect| json!({"key": "node.kubernetes.io/unreachable", "effect": effect});
        self.mark(
            ready(
                "Unknown",
                "NodeStatusUnknown",
                "Kubelet stopped posting node status.",
            ),
            json!([unreachable("NoExecute"), unreachable("NoSchedule")]),
        )
        .await;
    }

    /// The node's kubelet answers again: Ready, no taint, and the pods deleted meanwhile go.
    async fn come_back(&self) {
        self.mark(
            ready("True", "KubeletReady", "kubelet is posting ready status"),
            serde_json::Value::Null,
        )
        .await;
        self.alive.store(true, Ordering::SeqCst);
    }

    /// Writes the node's Ready condition and its taints.
    async fn mark(&self, ready: serde_json::Value, taints: serde_json::Value) {
        let nodes: Api<Node> = Api::all(self.client.clone());
        let params = PatchParams::default();
        let status = json!({"status": {"conditions": [ready]}});
        nodes
            .patch_status(&self.name, &params, &Patch::Merge(status))
            .await
            .unwrap();
        let spec = json!({"spec": {"taints": taints}});
        nodes
            .patch(&self.name, &params, &Patch::Merge(spec))
            .await
            .unwrap();
    }
}

impl Drop for FakeNode {
    fn drop(&mut self) {
        self.task.abort();
        let kubectl = charlm_e2e::cluster::bin_dir().join("kubectl");
        for args in [
            vec!["delete", "node", &self.name, "--wait=false"],
            vec![
                "-n",
                LEASE_NAMESPACE,
                "delete",
                "lease",
                &self.name,
                "--wait=false",
            ],
        ] {
            let _ = std::process::Command::new(&kubectl)
                .env("KUBECONFIG", charlm_e2e::cluster::kubeconfig_path())
                .args(args)
                .output();
        }
    }
}

fn ready(status: &str, reason: &str, message: &str) -> serde_json::Value {
    let now = Timestamp::from_second(Timestamp::now().as_second()).unwrap();
    json!({"type": "Ready", "status": status, "reason": reason, "message": message,
           "lastHeartbeatTime": now.to_string(), "lastTransitionTime": now.to_string()})
}

/// What the test keeps of a kubelet: the Lease renewed every 2 s, and pods deleted on its node
/// removed (their containers are the test's to say, and have stopped by then).
async fn kubelet(client: Client, node: String, namespace: String, alive: Arc<AtomicBool>) {
    let leases: Api<Lease> = Api::namespaced(client.clone(), LEASE_NAMESPACE);
    let pods: Api<Pod> = Api::namespaced(client, &namespace);
    let on_node = ListParams::default().fields(&format!("spec.nodeName={node}"));
    loop {
        if alive.load(Ordering::SeqCst) {
            let spec = LeaseSpec {
                renew_time: Some(MicroTime(Timestamp::now())),
                ..Default::default()
            };
            let _ = leases
                .patch(
                    &node,
                    &PatchParams::default(),
                    &Patch::Merge(json!({"spec": spec})),
                )
                .await;
            for pod in pods
                .list(&on_node)
                .await
                .map(|l| l.items)
                .unwrap_or_default()
            {
                if pod.metadata.deletion_timestamp.is_some() {
                    let _ = pods
                        .delete(&pod.name_any(), &DeleteParams::default().grace_period(0))
                        .await;
                }
            }
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

fn pods_ready(t: &CharLMTraining) -> (String, String, String) {
    let c = t
        .status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == "PodsReady"))
        .expect("a PodsReady condition");
    (c.status.clone(), c.reason.clone(), c.message.clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gang_on_a_lost_node_ends_as_node_lost_says_which_pod_the_node_holds_and_resumes_when_back(
) {
    let mut env = TestEnv::new("nodeloss").await;
    let label = env.ns.clone();
    let a = FakeNode::start(&env.admin, &format!("{label}-a"), &label, &env.ns).await;
    let b = FakeNode::start(&env.admin, &format!("{label}-b"), &label, &env.ns).await;
    env.start_operator("operator-1").await;

    let name = "gang";
    let mut gang = kubelet_played_by_test(small_cpu(name, 2));
    gang["spec"]["nodeSelector"] = json!({NODE_LABEL: label});
    gang["spec"]["restartPolicy"] = json!({"maxRestarts": 3, "backoffSeconds": 1});
    env.apply(&gang.to_string()).await;
    let placed = env.bound_workers(name, 2, 0).await;
    for (pod, _) in &placed {
        env.set_pod_status(pod, trainer_running()).await;
    }
    env.wait_phase(name, Phase::Running, MINUTE).await;

    // Worker 1's node stops; its peer's collective times out (here at once: the test writes it)
    // while the node controller has already marked the node (in the kind case it does so ~20 s
    // later; the operator then reads the node's silent Lease instead).
    let (victim, lost) = placed
        .iter()
        .find(|(pod, _)| pod.ends_with("-1"))
        .cloned()
        .unwrap();
    assert!(lost == b.name || lost == a.name, "{placed:?}");
    let lost_node = if lost == b.name { &b } else { &a };
    lost_node.lose().await;
    let survivor = format!("{name}-worker-0");
    let timeout = "[rank 0] error: collective allreduce timed out after 30s waiting for rank 1";
    env.set_pod_status(
        &survivor,
        json!({"phase": "Failed", "containerStatuses": [
            container_state("trainer", ended(1, "Error", timeout))]}),
    )
    .await;

    // Counted as the node's loss, not the training's error; the new attempt waits for the old
    // pod the lost node holds, and says so.
    let waiting = env
        .wait_training(
            name,
            "a NodeLost restart waiting for the lost node's pod, saying so",
            MINUTE,
            |t| {
                let s = t.status.clone().unwrap_or_default();
                let (status, reason, message) = pods_ready(t);
                s.failures.node_lost == 1
                    && s.phase == Some(Phase::Restarting)
                    && status == "False"
                    && reason == "NodeLost"
                    && message.contains(&victim)
                    && message.contains(&lost)
            },
        )
        .await;
    let s = waiting.status.clone().unwrap();
    assert_eq!(
        (s.failures.error, s.restarts, s.attempt),
        (0, 0, 1),
        "a lost node is a disruption: not an Error, not a counted restart: {s:?}"
    );
    let (_, _, message) = pods_ready(&waiting);
    assert!(
        message.contains("is still terminating on node")
            && message.contains("Kubelet stopped posting node status."),
        "{message}"
    );

    // The node is back: its kubelet removes the old pod, and the gang starts again.
    lost_node.come_back().await;
    let placed = env.bound_workers(name, 2, 1).await;
    for (pod, _) in &placed {
        env.set_pod_status(pod, trainer_running()).await;
    }
    let back = env.wait_phase(name, Phase::Running, MINUTE).await;
    let s = back.status.unwrap();
    assert_eq!(
        (s.failures.node_lost, s.failures.error, s.restarts),
        (1, 0, 0),
        "{s:?}"
    );
    env.finish().await;
    drop((a, b));
}
