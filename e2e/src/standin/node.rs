//! The nodes the stand-in kubelet runs: registered if absent, then kept alive like a kubelet does
//! (a Lease in `kube-node-lease` renewed every 10 s, node status with a Ready condition), so the
//! node lifecycle controller keeps them Ready and untainted.

use std::collections::BTreeMap;

use anyhow::{Context as _, Result};
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::{Node, NodeSpec, Taint};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, OwnerReference};
use kube::api::{ObjectMeta, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::json;

/// The annotation that marks nodes run by this stand-in (kwok manages only its own annotation).
pub const ANNOTATION: &str = "charlm.dev/standin-kubelet";
pub const FIELD_MANAGER: &str = "standin-kubelet";
pub const LEASE_SECONDS: i32 = 40;

#[derive(Clone, Debug)]
pub struct NodeConfig {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub taints: Vec<Taint>,
    /// Capacity (= allocatable): cpu, memory, pods, ephemeral-storage.
    pub capacity: BTreeMap<String, String>,
    pub address: String,
}

/// Creates the node if it does not exist yet (labels, taints, our annotation); an existing node
/// is taken over as it is.
pub async fn register(client: &Client, node: &NodeConfig) -> Result<()> {
    let nodes: Api<Node> = Api::all(client.clone());
    if nodes.get_opt(&node.name).await?.is_none() {
        let mut labels = node.labels.clone();
        for (k, v) in [
            ("kubernetes.io/hostname", node.name.as_str()),
            ("kubernetes.io/os", "linux"),
            ("kubernetes.io/arch", std::env::consts::ARCH),
            ("type", "standin-kubelet"),
        ] {
            labels.entry(k.to_string()).or_insert_with(|| v.to_string());
        }
        let object = Node {
            metadata: ObjectMeta {
                name: Some(node.name.clone()),
                labels: Some(labels),
                annotations: Some([(ANNOTATION.to_string(), "true".to_string())].into()),
                ..Default::default()
            },
            spec: Some(NodeSpec {
                taints: (!node.taints.is_empty()).then(|| node.taints.clone()),
                ..Default::default()
            }),
            status: None,
        };
        match nodes.create(&PostParams::default(), &object).await {
            Ok(_) => tracing::info!(node = %node.name, "registered node"),
            Err(kube::Error::Api(e)) if e.code == 409 => {}
            Err(e) => return Err(e).with_context(|| format!("registering node {}", node.name)),
        }
    }
    heartbeat(client, node).await
}

/// One heartbeat: the node's status and its Lease.
pub async fn heartbeat(client: &Client, node: &NodeConfig) -> Result<()> {
    let nodes: Api<Node> = Api::all(client.clone());
    let now = super::status::Time::now()
        .strftime("%Y-%m-%dT%H:%M:%SZ")
        .to_string();
    let condition = |kind: &str, status: &str, reason: &str, message: &str| {
        json!({"type": kind, "status": status, "reason": reason, "message": message,
               "lastHeartbeatTime": now, "lastTransitionTime": now})
    };
    let status = json!({"status": {
        "capacity": node.capacity,
        "allocatable": node.capacity,
        "conditions": [
            condition("MemoryPressure", "False", "KubeletHasSufficientMemory", "not checked by the stand-in kubelet"),
            condition("DiskPressure", "False", "KubeletHasNoDiskPressure", "not checked by the stand-in kubelet"),
            condition("PIDPressure", "False", "KubeletHasSufficientPID", "not checked by the stand-in kubelet"),
            condition("Ready", "True", "KubeletReady", "the stand-in kubelet (test-only) is running"),
        ],
        "addresses": [
            {"type": "InternalIP", "address": node.address},
            {"type": "Hostname", "address": node.name},
        ],
        "nodeInfo": {
            "architecture": std::env::consts::ARCH, "operatingSystem": "linux",
            "kubeletVersion": concat!("standin-kubelet-", env!("CARGO_PKG_VERSION")),
            "kubeProxyVersion": "", "containerRuntimeVersion": "standin://local-processes",
            "kernelVersion": "", "osImage": "", "machineID": "", "systemUUID": "", "bootID": "",
        },
        "daemonEndpoints": {"kubeletEndpoint": {"Port": 0}},
    }});
    let current = nodes.get(&node.name).await?;
    // lastTransitionTime moves only when a condition's status changes.
    let mut status = status;
    if let Some(old) = current.status.as_ref().and_then(|s| s.conditions.as_ref()) {
        for c in status["status"]["conditions"].as_array_mut().unwrap() {
            if let Some(prev) = old
                .iter()
                .find(|o| o.type_ == c["type"] && o.status == c["status"])
            {
                if let Some(t) = &prev.last_transition_time {
                    c["lastTransitionTime"] = serde_json::to_value(t)?;
                }
            }
        }
    }
    nodes
        .patch_status(&node.name, &PatchParams::default(), &Patch::Merge(&status))
        .await
        .with_context(|| format!("status of node {}", node.name))?;

    let leases: Api<Lease> = Api::namespaced(client.clone(), "kube-node-lease");
    let lease = Lease {
        metadata: ObjectMeta {
            name: Some(node.name.clone()),
            namespace: Some("kube-node-lease".into()),
            owner_references: Some(vec![OwnerReference {
                api_version: "v1".into(),
                kind: "Node".into(),
                name: node.name.clone(),
                uid: current.metadata.uid.clone().unwrap_or_default(),
                ..Default::default()
            }]),
            ..Default::default()
        },
        spec: Some(LeaseSpec {
            holder_identity: Some(node.name.clone()),
            lease_duration_seconds: Some(LEASE_SECONDS),
            renew_time: Some(MicroTime(super::status::Time::now())),
            ..Default::default()
        }),
    };
    leases
        .patch(
            &node.name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&lease),
        )
        .await
        .with_context(|| format!("lease of node {}", node.name))?;
    Ok(())
}

/// This machine's CPUs and memory, as a kubelet reports its node's capacity.
pub fn machine_capacity() -> (String, String) {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mem_kib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .unwrap_or(1 << 20);
    (cpus.to_string(), format!("{mem_kib}Ki"))
}
