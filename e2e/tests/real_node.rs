//! Smoke test of the real node (`e2e/controlplane/up --cpu-nodes=real`): a kubelet on containerd,
//! runc and CNI bridge networking runs a pod from a local image (`local/debian:bookworm`, made by
//! `e2e/images/build --bases` and loaded with `e2e/controlplane/real-node load`) in a real
//! container: as uid 1000 with fsGroup, its own network namespace and address on the node's
//! bridge, an emptyDir it can write, its exit code in the status, and its log through the kubelet.
//!
//! Ignored by default (the default plane has no real node); run with
//! `cargo test -p charlm-e2e --test real_node -- --ignored` on a plane started with
//! `--cpu-nodes=real`.

use std::process::Command;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{LogParams, PostParams};
use kube::Api;
use serde_json::json;

use charlm_e2e::cluster::{admin_client, create_namespace, repo_root, run_dir, wait_for};

const IMAGE: &str = "local/debian:bookworm";

fn require_real_node() {
    let options_file = run_dir().join("controlplane/options");
    let options = std::fs::read_to_string(&options_file).unwrap_or_default();
    assert!(
        options.lines().any(|l| l == "cpu_nodes=real"),
        "the plane in {} was not started with a real node: run e2e/controlplane/down, then \
         e2e/controlplane/up --cpu-nodes=real",
        options_file.display()
    );
    let out = Command::new(repo_root().join("e2e/controlplane/real-node"))
        .args(["load", IMAGE])
        .output()
        .expect("running e2e/controlplane/real-node load");
    assert!(
        out.status.success(),
        "real-node load {IMAGE} failed (make it with e2e/images/build --bases): {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn pod(name: &str, script: &str) -> Pod {
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name},
        "spec": {
            "nodeSelector": {"kubernetes.io/hostname": "cpu-0"},
            "restartPolicy": "Never",
            "terminationGracePeriodSeconds": 1,
            "securityContext": {"runAsNonRoot": true, "runAsUser": 1000, "runAsGroup": 1000, "fsGroup": 1000},
            "containers": [{
                "name": "main",
                "image": IMAGE,
                "imagePullPolicy": "Never",
                "command": ["sh", "-c", script],
                "volumeMounts": [{"name": "work", "mountPath": "/work"}],
                "securityContext": {"allowPrivilegeEscalation": false, "readOnlyRootFilesystem": true,
                                    "capabilities": {"drop": ["ALL"]}}
            }],
            "volumes": [{"name": "work", "emptyDir": {}}]
        }
    }))
    .unwrap()
}

async fn finished(pods: &Api<Pod>, name: &str) -> Pod {
    wait_for(
        &format!("pod {name} to finish"),
        Duration::from_secs(120),
        || {
            let pods = pods.clone();
            let name = name.to_string();
            async move {
                let p = pods.get(&name).await.map_err(|e| e.to_string())?;
                let phase = p.status.as_ref().and_then(|s| s.phase.clone());
                match phase.as_deref() {
                    Some("Succeeded" | "Failed") => Ok(Some(p)),
                    _ => Err(format!("{:?}", p.status)),
                }
            }
        },
    )
    .await
}

#[tokio::test]
#[ignore = "needs e2e/controlplane/up --cpu-nodes=real; run with --ignored"]
async fn a_pod_runs_in_a_real_container_on_the_real_node() {
    require_real_node();
    let client = admin_client().await;
    let nodes: Api<Node> = Api::all(client.clone());
    let node = nodes.get("cpu-0").await.expect("node cpu-0");
    let runtime = node.status.as_ref().unwrap().node_info.as_ref().unwrap();
    assert!(
        runtime
            .container_runtime_version
            .starts_with("containerd://"),
        "cpu-0 is not run by containerd: {}",
        runtime.container_runtime_version
    );
    let ns = create_namespace(&client, "real-node").await.unwrap();
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);

    let script = "echo uid=$(id -u) gid=$(id -g); echo data >/work/file && stat -c 'owner=%u:%g' /work/file; \
                  (touch /root-fs-write 2>/dev/null && echo rootfs=writable) || echo rootfs=read-only; \
                  echo hostname=$(hostname)";
    pods.create(&PostParams::default(), &pod("hello", script))
        .await
        .unwrap();
    let p = finished(&pods, "hello").await;
    let status = p.status.as_ref().unwrap();
    let log = pods
        .logs("hello", &LogParams::default())
        .await
        .expect("the pod's log, through the kubelet");
    assert_eq!(
        status.phase.as_deref(),
        Some("Succeeded"),
        "status {status:?}, log {log}"
    );
    for line in [
        "uid=1000 gid=1000",
        "owner=1000:1000",
        "rootfs=read-only",
        "hostname=hello",
    ] {
        assert!(log.contains(line), "no `{line}` in the pod's log:\n{log}");
    }
    let ip = status.pod_ip.clone().unwrap_or_default();
    assert!(
        ip.starts_with("10.89."),
        "the pod's address {ip} is not on the node's bridge"
    );

    // A failing container: its exit code reaches the status.
    pods.create(&PostParams::default(), &pod("fails", "exit 3"))
        .await
        .unwrap();
    let p = finished(&pods, "fails").await;
    let terminated = p
        .status
        .as_ref()
        .unwrap()
        .container_statuses
        .as_ref()
        .unwrap()[0]
        .state
        .as_ref()
        .unwrap()
        .terminated
        .clone()
        .expect("terminated state");
    assert_eq!(terminated.exit_code, 3, "{terminated:?}");

    let namespaces: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client);
    let _ = namespaces.delete(&ns, &Default::default()).await;
}
