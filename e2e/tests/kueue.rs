//! Queueing with Kueue, for real: Kueue's manager (built from the pinned module, e2e/src/kueue.rs)
//! runs against the control plane, and the operator, under the chart's RBAC, is the integration of
//! CharLMTraining. A ClusterQueue of 8 `nvidia.com/gpu` on the fake H100 nodes admits one 8-GPU
//! gang at a time, in order; a higher-priority training preempts the running one, whose checkpoint
//! and step survive; it resumes once the preemptor is done. Needs `e2e/controlplane/up` and
//! `e2e/controlplane/build` (which builds Kueue).

use std::time::Duration;

use kube::api::{ListParams, Patch, PatchParams};
use kube::{Api, ResourceExt};
use serde_json::{json, Value};

use charlm_api::kueue::{workload_resource, PRIORITY_CLASS_LABEL, QUEUE_LABEL};
use charlm_api::{CharLMTraining, Phase};
use charlm_e2e::cluster::{tool, TEST_LABEL};
use charlm_e2e::kueue::Kueue;
use charlm_e2e::specs::{condition, events_of, terminated};
use charlm_e2e::training_env::TestEnv;

const MINUTE: Duration = Duration::from_secs(60);

/// What a user writes once (README, "Queueing with Kueue"), with cluster-scoped names of this test.
fn queue_setup(ns: &str) -> String {
    format!(
        r#"apiVersion: kueue.x-k8s.io/v1beta2
kind: ResourceFlavor
metadata:
  name: h100-{ns}
  labels: {{{TEST_LABEL}: {ns}}}
spec:
  nodeLabels:
    nvidia.com/gpu.product: NVIDIA-H100-80GB-HBM3
---
apiVersion: kueue.x-k8s.io/v1beta2
kind: ClusterQueue
metadata:
  name: gpus-{ns}
  labels: {{{TEST_LABEL}: {ns}}}
spec:
  namespaceSelector:
    matchLabels:
      kubernetes.io/metadata.name: {ns}
  preemption:
    withinClusterQueue: LowerPriority
  resourceGroups:
  - coveredResources: [cpu, memory, nvidia.com/gpu]
    flavors:
    - name: h100-{ns}
      resources:
      - {{name: cpu, nominalQuota: "16"}}
      - {{name: memory, nominalQuota: 64Gi}}
      - {{name: nvidia.com/gpu, nominalQuota: "8"}}
---
apiVersion: kueue.x-k8s.io/v1beta2
kind: LocalQueue
metadata:
  name: team
  namespace: {ns}
spec:
  clusterQueue: gpus-{ns}
---
apiVersion: kueue.x-k8s.io/v1beta2
kind: WorkloadPriorityClass
metadata:
  name: urgent-{ns}
  labels: {{{TEST_LABEL}: {ns}}}
value: 1000
description: preempts routine trainings in its ClusterQueue
"#
    )
}

/// An 8-GPU training in LocalQueue `team`: `workers` pods of 8/`workers` GPUs each.
fn queued(name: &str, workers: i32, priority: Option<&str>) -> Value {
    let mut labels = json!({ QUEUE_LABEL: "team" });
    if let Some(p) = priority {
        labels[PRIORITY_CLASS_LABEL] = json!(p);
    }
    json!({
        "apiVersion": "charlm.dev/v1alpha1",
        "kind": "CharLMTraining",
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "depth": 2, "gpus": 8, "gpusPerNode": 8 / workers, "maxSteps": 100,
            "dataset": {"synthetic": {"chars": 100000}},
            "checkpoint": {"size": "1Gi"},
            "restartPolicy": {"maxRestarts": 2, "backoffSeconds": 3},
            "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}}
        }
    })
}

fn phase(t: &CharLMTraining) -> Option<Phase> {
    t.status.as_ref().and_then(|s| s.phase)
}

fn admitted_message(t: &CharLMTraining) -> String {
    t.status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Admitted"))
        .map(|c| c.message.clone())
        .unwrap_or_default()
}

/// The Kueue Workload of a training (the one the operator made, owned by it).
async fn workload_of(env: &TestEnv, training: &str) -> Value {
    let api: Api<kube::api::DynamicObject> =
        Api::namespaced_with(env.admin.clone(), &env.ns, &workload_resource());
    let list = api
        .list(&ListParams::default().labels(&format!("charlm.dev/training={training}")))
        .await
        .unwrap();
    assert_eq!(list.items.len(), 1, "one Workload per training");
    serde_json::to_value(&list.items[0]).unwrap()
}

async fn assert_waits_without_workers(env: &TestEnv, name: &str) {
    let t = env.trainings().get(name).await.unwrap();
    assert_eq!(phase(&t), Some(Phase::Queued), "{name}: {:?}", t.status);
    assert_eq!(condition(&t, "Admitted").0, "False");
    assert!(
        env.workers(name).await.is_empty(),
        "{name} has workers while queued"
    );
}

async fn wait_workers(env: &TestEnv, name: &str, n: usize) {
    env.wait(&format!("{n} workers of {name}"), MINUTE, || async {
        let pods = env.workers(name).await;
        if pods.len() == n {
            Ok(Some(()))
        } else {
            Err(format!("{} pods", pods.len()))
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kueue_admits_one_gang_at_a_time_and_a_preempted_training_resumes_from_its_checkpoint() {
    let mut env = TestEnv::new("kueue").await;
    let mut kueue = Kueue::start(&env.dir.join("kueue")).await;
    let ns = env.ns.clone();
    let setup = env.dir.join("queue-setup.yaml");
    std::fs::write(&setup, queue_setup(&ns)).unwrap();
    tool("kubectl", &["apply", "-f", setup.to_str().unwrap()]).expect("the queue setup");
    // Kueue's CRDs are there before the operator starts: it watches Workloads.
    env.start_operator("operator-1").await;
    let cq = format!("gpus-{ns}");

    // The first gang (2 workers x 4 GPUs) is admitted whole and runs.
    env.apply(&queued("first", 2, None).to_string()).await;
    let t = env.wait_phase("first", Phase::Running, MINUTE).await;
    assert_eq!(
        condition(&t, "Admitted"),
        ("True".into(), "Admitted".into())
    );
    assert!(
        admitted_message(&t).contains(&cq),
        "{}",
        admitted_message(&t)
    );
    assert_eq!(env.workers("first").await.len(), 2);
    let wl = workload_of(&env, "first").await;
    assert_eq!(wl["spec"]["queueName"], "team");
    assert_eq!(wl["spec"]["podSets"][0]["name"], "workers");
    assert_eq!(wl["spec"]["podSets"][0]["count"], 2);
    assert_eq!(
        wl["spec"]["podSets"][0]["template"]["spec"]["containers"][0]["resources"]["requests"]
            ["nvidia.com/gpu"],
        "4"
    );
    assert_eq!(wl["status"]["admission"]["clusterQueue"], cq.as_str());
    assert_eq!(wl["metadata"]["ownerReferences"][0]["name"], "first");
    let pvc_uid = env.pvcs().get("first-checkpoints").await.unwrap().uid();
    // As if rank 0 had reported a checkpoint at step 42 (kwok's pods serve no /progress, and a
    // deleted one vanishes before any SIGTERM report could be written).
    env.trainings()
        .patch_status(
            "first",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {
                "latestCheckpoint": "/checkpoints/step-000000042",
                "progress": {"step": 42, "checkpoint": "/checkpoints/step-000000042"}
            }})),
        )
        .await
        .unwrap();
    env.wait_training("first", "the checkpoint in the status", MINUTE, |t| {
        t.status
            .as_ref()
            .and_then(|s| s.latest_checkpoint.as_deref())
            == Some("/checkpoints/step-000000042")
    })
    .await;

    // The second 8-GPU training waits for quota, without pods, and says so.
    env.apply(&queued("second", 1, None).to_string()).await;
    let t = env
        .wait_training("second", "waiting for quota", MINUTE, |t| {
            admitted_message(t).contains("nvidia.com/gpu")
        })
        .await;
    assert_eq!(phase(&t), Some(Phase::Queued));
    assert_eq!(
        condition(&t, "Admitted"),
        ("False".into(), "Pending".into())
    );
    let msg = admitted_message(&t);
    assert!(
        msg.contains("waiting for quota in LocalQueue team"),
        "{msg}"
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_waits_without_workers(&env, "second").await;
    let table = tool(
        "kubectl",
        &["get", "clt", "second", "-n", &ns, "--no-headers"],
    )
    .unwrap();
    assert_eq!(
        table.split_whitespace().take(2).collect::<Vec<_>>(),
        ["second", "Queued"],
        "{table}"
    );

    // A higher-priority training preempts the first: its workers stop, the quota goes back to
    // Kueue, and the preemptor runs; the second still waits.
    env.apply(&queued("urgent", 1, Some(&format!("urgent-{ns}"))).to_string())
        .await;
    let t = env
        .wait_training("first", "preempted by Kueue", MINUTE, |t| {
            t.status
                .as_ref()
                .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Admitted"))
                .is_some_and(|c| c.reason == "Preempted")
        })
        .await;
    assert_eq!(phase(&t), Some(Phase::Queued));
    assert!(
        admitted_message(&t).contains("the workers save a checkpoint and stop"),
        "{}",
        admitted_message(&t)
    );
    env.wait_phase("urgent", Phase::Running, MINUTE).await;
    assert_eq!(
        workload_of(&env, "urgent").await["spec"]["priority"],
        1000,
        "the WorkloadPriorityClass's value"
    );
    assert!(env.workers("first").await.is_empty());
    assert_waits_without_workers(&env, "second").await;
    let first = env.trainings().get("first").await.unwrap();
    let status = first.status.clone().unwrap();
    assert_eq!(
        status.latest_checkpoint.as_deref(),
        Some("/checkpoints/step-000000042")
    );
    assert_eq!(status.progress.as_ref().unwrap().step, 42);
    let released = events_of(&env, "first").await;
    assert!(
        released
            .iter()
            .any(|e| e.reason.as_deref() == Some("QuotaReleased")),
        "no QuotaReleased event: {:?}",
        released
            .iter()
            .map(|e| e.reason.clone())
            .collect::<Vec<_>>()
    );
    let wl = workload_of(&env, "first").await;
    assert!(wl["status"]["admission"].is_null(), "{}", wl["status"]);

    // The preemptor finishes (its Workload is marked finished, which frees its quota): Kueue
    // admits one of the two waiting 8-GPU gangs, never both. Which one is Kueue's ordering: runs
    // of this test have seen both (the preempted first, created earlier, or the second).
    let report = r#"{"step": 100, "val_bpc": 1.2, "checkpoint": "/checkpoints/step-000000100", "complete": true}"#;
    env.set_pod_status(
        "urgent-worker-0",
        json!({"phase": "Succeeded", "containerStatuses": terminated("trainer", 0, "Completed", report)}),
    )
    .await;
    env.wait_phase("urgent", Phase::Succeeded, MINUTE).await;
    let urgent_wl = workload_of(&env, "urgent").await;
    let finished = urgent_wl["status"]["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .any(|c| c["type"] == "Finished" && c["status"] == "True");
    assert!(finished, "{}", urgent_wl["status"]);
    let next = env
        .wait("one of the waiting trainings admitted", MINUTE, || async {
            let mut running = Vec::new();
            for name in ["first", "second"] {
                let t = env.trainings().get(name).await.map_err(|e| e.to_string())?;
                if phase(&t) == Some(Phase::Running) {
                    running.push(name);
                }
            }
            match running.as_slice() {
                [one] => Ok(Some(one.to_string())),
                [] => Err("neither runs yet".into()),
                both => panic!("both 8-GPU gangs run at once: {both:?}"),
            }
        })
        .await;
    eprintln!("after the preemptor, Kueue admitted {next} next");
    let other = if next == "first" { "second" } else { "first" };
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_waits_without_workers(&env, other).await;
    if next == "second" {
        // The second is done; then the first is admitted again.
        wait_workers(&env, "second", 1).await;
        env.set_pod_status(
            "second-worker-0",
            json!({"phase": "Succeeded", "containerStatuses": terminated("trainer", 0, "Completed", report)}),
        )
        .await;
        env.wait_phase("second", Phase::Succeeded, MINUTE).await;
    }

    // Readmitted, the first's new workers resume from the kept checkpoint volume and step.
    let t = env.wait_phase("first", Phase::Running, MINUTE).await;
    wait_workers(&env, "first", 2).await;
    let status = t.status.clone().unwrap();
    assert_eq!(
        status.latest_checkpoint.as_deref(),
        Some("/checkpoints/step-000000042"),
        "the checkpoint survives the preemption"
    );
    assert_eq!(status.progress.as_ref().unwrap().step, 42);
    assert_eq!(status.restarts, 0, "a preemption is not a restart");
    assert_eq!(
        condition(&t, "Admitted"),
        ("True".into(), "Admitted".into())
    );
    assert_eq!(
        env.pvcs().get("first-checkpoints").await.unwrap().uid(),
        pvc_uid,
        "the same checkpoint volume"
    );
    let worker0 = env.pods().get("first-worker-0").await.unwrap();
    let claims: Vec<String> = worker0
        .spec
        .unwrap()
        .volumes
        .unwrap_or_default()
        .iter()
        .filter_map(|v| {
            v.persistent_volume_claim
                .as_ref()
                .map(|c| c.claim_name.clone())
        })
        .collect();
    assert_eq!(claims, ["first-checkpoints"], "rank 0 resumes from it");
    if next == "first" {
        // Then the second waits until the first is done.
        assert_waits_without_workers(&env, "second").await;
        env.set_pod_status(
            "first-worker-0",
            json!({"phase": "Succeeded", "containerStatuses": terminated("trainer", 0, "Completed", report)}),
        )
        .await;
        env.wait_phase("first", Phase::Succeeded, MINUTE).await;
        env.wait_phase("second", Phase::Running, MINUTE).await;
        wait_workers(&env, "second", 1).await;
    }

    env.finish().await;
    kueue.delete_test_objects(
        &["clusterqueue", "resourceflavor", "workloadpriorityclass"],
        &ns,
    );
    kueue.stop();
}
