//! Smoke tests of the control plane of `e2e/controlplane/` itself, before any operator runs on it:
//! the six nodes, the real scheduler placing a GPU pod on an H100 node that kwok then runs, the
//! default StorageClass binding a claim, service-account tokens under RBAC and garbage
//! collection. Needs `e2e/controlplane/up` (either --cpu-nodes mode); the kubeconfig comes from
//! `CHARLM_KUBECONFIG`, else `${CHARLM_RUN:-.run}/controlplane/kubeconfig`; fails without it.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::authentication::v1::{SelfSubjectReview, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{
    ConfigMap, Namespace, Node, PersistentVolume, PersistentVolumeClaim, Pod, ServiceAccount,
};
use kube::api::{DeleteParams, ObjectMeta, PostParams};
use kube::config::{AuthInfo, KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config, ResourceExt};
use serde_json::json;

use charlm_e2e::cluster::{admin_client, create_namespace, require_kubeconfig, wait_for};

const H100: &str = "NVIDIA-H100-80GB-HBM3";

fn quantity(node: &Node, field: &str, resource: &str) -> Option<String> {
    let status = node.status.as_ref()?;
    let map = match field {
        "capacity" => status.capacity.as_ref()?,
        _ => status.allocatable.as_ref()?,
    };
    map.get(resource).map(|q| q.0.clone())
}

fn is_ready(node: &Node) -> bool {
    node.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .into_iter()
        .flatten()
        .any(|c| c.type_ == "Ready" && c.status == "True")
}

/// A client of the plane that authenticates with `token` instead of the admin certificate.
async fn token_client(token: &str) -> Client {
    let kubeconfig = Kubeconfig::read_from(require_kubeconfig()).unwrap();
    let mut config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .unwrap();
    config.auth_info = AuthInfo {
        token: Some(token.to_string().into()),
        ..Default::default()
    };
    Client::try_from(config).unwrap()
}

async fn delete_namespace(client: &Client, ns: &str) {
    let api: Api<Namespace> = Api::all(client.clone());
    let _ = api.delete(ns, &DeleteParams::default()).await;
}

fn pod(name: &str, gpus: Option<&str>, tolerate_gpu_taint: bool) -> Pod {
    let mut spec = json!({
        "containers": [{
            "name": "main",
            "image": "busybox",
            "command": ["sleep", "3600"],
            "resources": {}
        }],
        "restartPolicy": "Never",
        "terminationGracePeriodSeconds": 0
    });
    if let Some(n) = gpus {
        spec["containers"][0]["resources"] =
            json!({"limits": {"nvidia.com/gpu": n}, "requests": {"nvidia.com/gpu": n}});
    }
    if tolerate_gpu_taint {
        spec["tolerations"] =
            json!([{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]);
    }
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name},
        "spec": spec
    }))
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_h100_nodes_and_two_cpu_nodes_are_ready() {
    let client = admin_client().await;
    let nodes: Api<Node> = Api::all(client);
    let by_name: BTreeMap<String, Node> =
        wait_for("the six nodes to be Ready", Duration::from_secs(60), || {
            let nodes = nodes.clone();
            async move {
                let list = nodes
                    .list(&Default::default())
                    .await
                    .map_err(|e| e.to_string())?;
                let ready: Vec<String> = list
                    .items
                    .iter()
                    .filter(|n| is_ready(n))
                    .map(|n| n.name_any())
                    .collect();
                if ready.len() >= 6 {
                    Ok(Some(
                        list.items.into_iter().map(|n| (n.name_any(), n)).collect(),
                    ))
                } else {
                    Err(format!("ready: {ready:?}"))
                }
            }
        })
        .await;
    let names: Vec<&str> = by_name.keys().map(String::as_str).collect();
    assert_eq!(
        names,
        ["cpu-0", "cpu-1", "h100-0", "h100-1", "h100-2", "h100-3"]
    );
    for i in 0..4 {
        let node = &by_name[&format!("h100-{i}")];
        assert_eq!(node.labels()["nvidia.com/gpu.product"], H100);
        assert_eq!(node.labels()["charlm.dev/e2e-node"], "h100");
        for field in ["capacity", "allocatable"] {
            assert_eq!(
                quantity(node, field, "nvidia.com/gpu").as_deref(),
                Some("8")
            );
            assert_eq!(quantity(node, field, "cpu").as_deref(), Some("96"));
            assert_eq!(quantity(node, field, "pods").as_deref(), Some("110"));
        }
        let taints = node
            .spec
            .as_ref()
            .unwrap()
            .taints
            .clone()
            .unwrap_or_default();
        assert!(
            taints.iter().any(|t| t.key == "nvidia.com/gpu"
                && t.value.as_deref() == Some("present")
                && t.effect == "NoSchedule"),
            "h100-{i} lacks the nvidia.com/gpu taint: {taints:?}"
        );
    }
    for i in 0..2 {
        let node = &by_name[&format!("cpu-{i}")];
        assert_eq!(node.labels()["charlm.dev/e2e-node"], "cpu");
        assert!(!node.labels().contains_key("nvidia.com/gpu.product"));
        assert_eq!(quantity(node, "capacity", "nvidia.com/gpu"), None);
        let taints = node
            .spec
            .as_ref()
            .unwrap()
            .taints
            .clone()
            .unwrap_or_default();
        assert!(taints.is_empty(), "cpu-{i} has taints {taints:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_scheduler_puts_a_gpu_pod_on_an_h100_node_and_kwok_runs_it() {
    let client = admin_client().await;
    let ns = create_namespace(&client, "cp-gpu").await.unwrap();
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    pods.create(&PostParams::default(), &pod("gpu", Some("2"), true))
        .await
        .unwrap();
    // Without a toleration of the GPU taint no node fits: the taint and the resource both count.
    pods.create(
        &PostParams::default(),
        &pod("untolerated", Some("1"), false),
    )
    .await
    .unwrap();
    // More GPUs than any node has.
    pods.create(&PostParams::default(), &pod("too-big", Some("9"), true))
        .await
        .unwrap();

    let running = wait_for("pod gpu to run", Duration::from_secs(60), || {
        let pods = pods.clone();
        async move {
            let p = pods.get("gpu").await.map_err(|e| e.to_string())?;
            let phase = p.status.as_ref().and_then(|s| s.phase.clone());
            if phase.as_deref() == Some("Running") {
                Ok(Some(p))
            } else {
                Err(format!("phase {phase:?}"))
            }
        }
    })
    .await;
    let node = running.spec.as_ref().unwrap().node_name.clone().unwrap();
    assert!(node.starts_with("h100-"), "scheduled onto {node}");
    assert!(running.status.as_ref().unwrap().pod_ip.is_some());

    for name in ["untolerated", "too-big"] {
        let reason = wait_for(
            &format!("pod {name} to be reported unschedulable"),
            Duration::from_secs(60),
            || {
                let pods = pods.clone();
                async move {
                    let p = pods.get(name).await.map_err(|e| e.to_string())?;
                    let scheduled = p
                        .status
                        .as_ref()
                        .and_then(|s| s.conditions.as_ref())
                        .into_iter()
                        .flatten()
                        .find(|c| c.type_ == "PodScheduled")
                        .cloned();
                    match scheduled {
                        Some(c) if c.status == "False" => Ok(Some(c.message.unwrap_or_default())),
                        other => Err(format!("{other:?}")),
                    }
                }
            },
        )
        .await;
        let p = pods.get(name).await.unwrap();
        assert_eq!(p.spec.as_ref().unwrap().node_name, None);
        assert!(reason.contains("nvidia.com/gpu"), "{name}: {reason}");
    }
    delete_namespace(&client, &ns).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_of_the_default_class_binds_to_a_provisioned_directory() {
    let client = admin_client().await;
    let ns = create_namespace(&client, "cp-pvc").await.unwrap();
    let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), &ns);
    let claim: PersistentVolumeClaim = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "PersistentVolumeClaim",
        "metadata": {"name": "data"},
        "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}
    }))
    .unwrap();
    pvcs.create(&PostParams::default(), &claim).await.unwrap();

    let bound = wait_for("claim data to be Bound", Duration::from_secs(60), || {
        let pvcs = pvcs.clone();
        async move {
            let c = pvcs.get("data").await.map_err(|e| e.to_string())?;
            let phase = c.status.as_ref().and_then(|s| s.phase.clone());
            if phase.as_deref() == Some("Bound") {
                Ok(Some(c))
            } else {
                Err(format!("phase {phase:?}"))
            }
        }
    })
    .await;
    let spec = bound.spec.unwrap();
    assert_eq!(spec.storage_class_name.as_deref(), Some("standard"));
    let pv_name = spec.volume_name.unwrap();
    let pvs: Api<PersistentVolume> = Api::all(client.clone());
    let pv = pvs.get(&pv_name).await.unwrap();
    let dir = pv.spec.unwrap().host_path.unwrap().path;
    assert!(
        std::path::Path::new(&dir).is_dir(),
        "the provisioned directory {dir} does not exist"
    );

    // Reclaim policy Delete: the volume and its directory go with the claim.
    pvcs.delete("data", &DeleteParams::default()).await.unwrap();
    wait_for(
        "the volume and its directory to be deleted",
        Duration::from_secs(60),
        || {
            let pvs = pvs.clone();
            let pv_name = pv_name.clone();
            let dir = dir.clone();
            async move {
                let gone = pvs
                    .get_opt(&pv_name)
                    .await
                    .map_err(|e| e.to_string())?
                    .is_none();
                let dir_gone = !std::path::Path::new(&dir).exists();
                if gone && dir_gone {
                    Ok(Some(()))
                } else {
                    Err(format!("pv gone: {gone}, dir gone: {dir_gone}"))
                }
            }
        },
    )
    .await;
    delete_namespace(&client, &ns).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_account_tokens_and_garbage_collection_work() {
    let client = admin_client().await;
    let ns = create_namespace(&client, "cp-ctrl").await.unwrap();

    // The controller-manager creates each namespace's default ServiceAccount; TokenRequest needs
    // the API server's signing key.
    let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), &ns);
    wait_for(
        "the default ServiceAccount",
        Duration::from_secs(30),
        || {
            let sas = sas.clone();
            async move {
                match sas.get_opt("default").await {
                    Ok(Some(_)) => Ok(Some(())),
                    Ok(None) => Err("absent".into()),
                    Err(e) => Err(e.to_string()),
                }
            }
        },
    )
    .await;
    let request = TokenRequest {
        spec: TokenRequestSpec {
            audiences: vec![],
            expiration_seconds: Some(600),
            bound_object_ref: None,
        },
        ..Default::default()
    };
    let token = sas
        .create_token_request("default", &PostParams::default(), &request)
        .await
        .unwrap()
        .status
        .unwrap()
        .token;
    assert_eq!(token.split('.').count(), 3, "a JWT");

    // The API server accepts the token it signed, as the ServiceAccount; RBAC gives that bare
    // ServiceAccount nothing (listing nodes is forbidden), while the admin may.
    let sa_client = token_client(&token).await;
    let review = Api::<SelfSubjectReview>::all(sa_client.clone())
        .create(&PostParams::default(), &SelfSubjectReview::default())
        .await
        .expect("the ServiceAccount token authenticates");
    let user = review.status.and_then(|s| s.user_info).unwrap_or_default();
    assert_eq!(
        user.username.as_deref(),
        Some(format!("system:serviceaccount:{ns}:default").as_str())
    );
    match Api::<Node>::all(sa_client).list(&Default::default()).await {
        Err(kube::Error::Api(status)) => assert_eq!(status.code, 403, "{status:?}"),
        other => panic!("a bare ServiceAccount listed nodes (RBAC is off?): {other:?}"),
    }
    Api::<Node>::all(client.clone())
        .list(&Default::default())
        .await
        .expect("the admin lists nodes");

    // The owner's deletion takes the dependent with it (kube-controller-manager's GC).
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    let owner = cms
        .create(
            &PostParams::default(),
            &ConfigMap {
                metadata: ObjectMeta {
                    name: Some("owner".into()),
                    ..Default::default()
                },
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let dependent: ConfigMap = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "dependent", "ownerReferences": [{
            "apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": owner.uid().unwrap()
        }]}
    }))
    .unwrap();
    cms.create(&PostParams::default(), &dependent)
        .await
        .unwrap();
    cms.delete("owner", &DeleteParams::default()).await.unwrap();
    wait_for(
        "the dependent ConfigMap to be collected",
        Duration::from_secs(60),
        || {
            let cms = cms.clone();
            async move {
                match cms.get_opt("dependent").await {
                    Ok(None) => Ok(Some(())),
                    Ok(Some(_)) => Err("still there".into()),
                    Err(e) => Err(e.to_string()),
                }
            }
        },
    )
    .await;
    delete_namespace(&client, &ns).await;
}
