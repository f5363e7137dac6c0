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

/// A tmpfs of this test's own on the node's host (the node is this machine), made with mount(8)
/// and unmounted when dropped: the volume a full disk needs, which the local-path provisioner
/// cannot give (it ignores a claim's size).
struct HostTmpfs(std::path::PathBuf);

impl HostTmpfs {
    fn mount(dir: &std::path::Path, bytes: u64) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        let opts = format!("size={bytes},mode=0777");
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &opts, "tmpfs"])
            .arg(dir)
            .status()
            .expect("mount(8)");
        assert!(status.success(), "mount -t tmpfs at {}", dir.display());
        HostTmpfs(dir.to_path_buf())
    }

    /// Bytes in use and in all.
    fn usage(&self) -> (u64, u64) {
        let out = Command::new("df")
            .args(["-B1", "--output=used,size"])
            .arg(&self.0)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        let nums: Vec<u64> = text
            .lines()
            .nth(1)
            .unwrap_or_default()
            .split_whitespace()
            .filter_map(|n| n.parse().ok())
            .collect();
        (nums[0], nums[1])
    }

    /// Shrinks the filesystem to what it holds plus `room` bytes.
    fn shrink_to_room(&self, room: u64) -> bool {
        let (used, _) = self.usage();
        let opts = format!("remount,size={}", used + room);
        Command::new("mount")
            .args(["-o", &opts])
            .arg(&self.0)
            .status()
            .is_ok_and(|s| s.success())
    }
}

impl Drop for HostTmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// Issue 29, items 7 and 9, on the real node with the operator: a training's checkpoint volume
/// (a PersistentVolume bound to its claim, a hostPath on a tmpfs of 16 MiB) is locked by its
/// trainer — a second `train` in the pod exits 2 naming the holder — and when the volume is
/// shrunk to its contents plus 64 KiB, the next checkpoint finds it full: the trainer exits 3
/// with a message naming the folder, the bytes a checkpoint needs and what is free; the operator
/// fails the training as `StorageFull` with that message, without a restart into the same wall;
/// and the checkpoints on the volume are whole (each file's sha256 is its manifest's), with no
/// partial write left.
///
/// Needs the trainer image `charlm-trainer:e2e` loaded into the node
/// (`e2e/images/build --binaries DIR` and `e2e/controlplane/real-node load charlm-trainer:e2e`)
/// and root on this machine (mount).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs e2e/controlplane/up --cpu-nodes=real and the trainer image; run with --ignored"]
async fn a_full_checkpoint_volume_fails_the_training_as_storage_full_and_keeps_its_checkpoints() {
    use charlm_api::Phase;
    use charlm_e2e::cluster::{run_dir, tool};
    use charlm_e2e::training_env::TestEnv;
    use k8s_openapi::api::core::v1::PersistentVolume;
    use kube::api::DeleteParams;
    use kube::ResourceExt;

    let options =
        std::fs::read_to_string(run_dir().join("controlplane/options")).unwrap_or_default();
    assert!(
        options.lines().any(|l| l == "cpu_nodes=real"),
        "the plane was not started with a real node (e2e/controlplane/up --cpu-nodes=real)"
    );
    let mut env = TestEnv::new("full-volume").await;
    // The operator reads no progress from the node's bridge here (only loopback is allowed to
    // it); what this test needs is in the pods' status.
    env.expect_refused_polls = true;
    env.start_operator("operator-1").await;
    let name = "full";
    let dir = run_dir()
        .join("e2e-volumes")
        .join(format!("{}-tmpfs", env.ns));
    let volume = HostTmpfs::mount(&dir, 16 << 20);
    let class = format!("{}-tmpfs", env.ns);
    let pv_name = format!("{}-checkpoints", env.ns);
    let pv: PersistentVolume = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "PersistentVolume",
        "metadata": {"name": pv_name, "labels": {"charlm.dev/e2e-namespace": env.ns}},
        "spec": {
            "capacity": {"storage": "16Mi"},
            "accessModes": ["ReadWriteOnce"],
            "persistentVolumeReclaimPolicy": "Retain",
            "storageClassName": class,
            "hostPath": {"path": dir.to_string_lossy(), "type": "Directory"},
            "claimRef": {"namespace": env.ns, "name": format!("{name}-checkpoints")}
        }
    }))
    .unwrap();
    let pvs: Api<PersistentVolume> = Api::all(env.admin.clone());
    pvs.create(&PostParams::default(), &pv).await.unwrap();
    let training = format!(
        "apiVersion: charlm.dev/v1alpha1
kind: CharLMTraining
metadata: {{name: {name}}}
spec:
  depth: 1
  gpus: 0
  cpuWorkers: 1
  deviceBatchSize: 4
  seqLen: 64
  totalBatchSize: 256
  evalEvery: 400
  maxSteps: 1000000
  hours: 0.05
  earlyStop: {{patience: 0}}
  dataset: {{synthetic: {{chars: 200000, seed: 1}}}}
  checkpoint: {{size: 16Mi, storageClassName: {class}, intervalMinutes: 0.1, keep: 2}}
  restartPolicy: {{maxRestarts: 2, backoffSeconds: 1}}
  resources: {{requests: {{cpu: 250m, memory: 256Mi}}}}
  env: [{{name: CHARLM_THREADS, value: \"1\"}}]
"
    );
    env.apply(&training).await;
    let first = env
        .wait_training(name, "a first checkpoint", Duration::from_secs(240), |t| {
            t.status
                .as_ref()
                .is_some_and(|s| s.latest_checkpoint.is_some())
        })
        .await;
    let first = first.status.unwrap().latest_checkpoint.unwrap();
    let pod = env
        .workers(name)
        .await
        .pop()
        .expect("a worker pod")
        .name_any();

    // A second trainer on the same claim, in the same pod (its environment is the training's):
    // refused while the first holds the lock, naming it.
    let second = tool(
        "kubectl",
        &[
            "exec",
            "-n",
            &env.ns,
            &pod,
            "-c",
            "trainer",
            "--",
            "charlm-trainer",
            "train",
            "--metrics-port",
            "0",
            "--max-steps",
            "1",
            "--log-format",
            "human",
        ],
    );
    let err = format!("{second:?}");
    assert!(
        err.contains("exit code 2")
            && err.contains("is in use by another training")
            && err.contains(&format!("on host {pod} since"))
            && err.contains("/checkpoints/LOCK.json"),
        "a second trainer on the claim was not refused: {err}\n{}",
        env.log_tails()
    );

    // Shrink the volume until a checkpoint no longer fits (again if a save was in flight).
    let failed = env
        .wait_training(name, "Failed", Duration::from_secs(150), |t| {
            let failed = t
                .status
                .as_ref()
                .is_some_and(|s| s.phase == Some(Phase::Failed));
            if !failed {
                volume.shrink_to_room(64 << 10);
            }
            failed
        })
        .await;
    let status = failed.status.clone().unwrap();
    let message = status.message.clone().unwrap_or_default();
    let failed_condition = status
        .conditions
        .iter()
        .find(|c| c.type_ == "Failed")
        .unwrap_or_else(|| panic!("no Failed condition: {status:?}"));
    assert_eq!(failed_condition.reason, "StorageFull", "{status:?}");
    for want in [
        "exited with code 3",
        "the checkpoint volume is full",
        "writing /checkpoints/",
        "needs about",
        "and /checkpoints has",
        "free",
        "spec.checkpoint.keep",
    ] {
        assert!(message.contains(want), "no {want:?} in {message}");
    }
    assert_eq!(
        status.restarts, 0,
        "restarted into the same wall: {status:?}"
    );
    assert_eq!(status.failures.storage_full, 1, "{status:?}");

    // What the volume holds is whole: every checkpoint's files match their manifest, and no
    // staging folder is left.
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let file = path.file_name().unwrap().to_string_lossy().into_owned();
        assert!(!file.contains(".tmp-"), "a partial write was left: {file}");
        let Ok(text) = std::fs::read_to_string(path.join("manifest.json")) else {
            continue;
        };
        let manifest: serde_json::Value = serde_json::from_str(&text).unwrap();
        for (f, check) in manifest["files"].as_object().unwrap() {
            let out = Command::new("sha256sum")
                .arg(path.join(f))
                .output()
                .unwrap();
            let sum = String::from_utf8_lossy(&out.stdout);
            assert_eq!(
                sum.split_whitespace().next(),
                check["sha256"].as_str(),
                "{file}/{f} is damaged"
            );
        }
        checked += 1;
    }
    assert!(
        checked >= 1,
        "no checkpoint on the volume (first was {first})"
    );
    eprintln!("failed as expected: {message}");

    env.trainings()
        .delete(name, &DeleteParams::default())
        .await
        .unwrap();
    env.finish().await;
    let _ = pvs.delete(&pv_name, &DeleteParams::default()).await;
    drop(volume);
}
