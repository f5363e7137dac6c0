//! Issue 28, parts 2 and 3 and two bullets of part 4, on the local control plane's fake nodes:
//! the operator never adopts, changes or deletes an object it did not make (a claim, a Service, a
//! NetworkPolicy, a pod of a training's names); a deleted checkpoint claim is a loss it says, and
//! it starts over from step 0 on a new claim only on the user's word, even after a restart of its
//! own; a missing StorageClass is named and waited for without holding GPUs; a checkpoint set
//! aside as damaged at a resume is a condition and an Event. Needs `e2e/controlplane/up`.

use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod, Service};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::storage::v1::StorageClass;
use kube::api::{DeleteParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::{Api, ResourceExt};
use serde_json::{json, Value};

use charlm_api::{CharLMTraining, Phase};
use charlm_e2e::cluster::{self, tool};
use charlm_e2e::specs::{condition, events_of, small_gpu, terminated};
use charlm_e2e::training_env::TestEnv;

const MINUTE: Duration = Duration::from_secs(60);

fn message_of(t: &CharLMTraining, type_: &str) -> String {
    t.status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == type_))
        .map(|c| c.message.clone())
        .unwrap_or_default()
}

fn has_condition(t: &CharLMTraining, type_: &str, status: &str, reason: &str) -> bool {
    t.status.as_ref().is_some_and(|s| {
        s.conditions
            .iter()
            .any(|c| c.type_ == type_ && c.status == status && c.reason == reason)
    })
}

/// Whether the operator ever wrote to an object: server-side apply and its own creates record
/// its field manager.
fn touched_by_operator(meta: &ObjectMeta) -> bool {
    meta.managed_fields
        .iter()
        .flatten()
        .any(|m| m.manager.as_deref() == Some("charlm-operator"))
}

/// Waits for an Event of `reason` about `training` (Events are sent after the status is written)
/// and returns it; asserts it is a Warning.
async fn warning_event(
    env: &TestEnv,
    training: &str,
    reason: &str,
) -> k8s_openapi::api::events::v1::Event {
    let event = env
        .wait(
            &format!("a {reason} Event of {training}"),
            MINUTE,
            || async {
                let events = events_of(env, training).await;
                match events.iter().find(|e| e.reason.as_deref() == Some(reason)) {
                    Some(e) => Ok(Some(e.clone())),
                    None => Err(format!(
                        "{:?}",
                        events.iter().map(|e| &e.reason).collect::<Vec<_>>()
                    )),
                }
            },
        )
        .await;
    assert_eq!(event.type_.as_deref(), Some("Warning"), "{event:?}");
    event
}

/// Asserts for `window` that the training has no worker pods and `claim` does not exist.
async fn assert_nothing_made_for(env: &TestEnv, training: &str, claim: &str, window: Duration) {
    let until = Instant::now() + window;
    while Instant::now() < until {
        let pods = env.workers(training).await;
        assert!(
            pods.is_empty(),
            "{training}: worker pods {:?} were made\n{}",
            pods.iter().map(|p| p.name_any()).collect::<Vec<_>>(),
            env.log_tails()
        );
        let made = env.pvcs().get_opt(claim).await.unwrap();
        assert!(
            made.is_none(),
            "{training}: a claim {claim} was made: {:?}\n{}",
            made.map(|c| c.metadata),
            env.log_tails()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

async fn user_claim(env: &TestEnv, name: &str) -> PersistentVolumeClaim {
    let claim: PersistentVolumeClaim = serde_json::from_value(json!({
        "metadata": {"name": name, "labels": {"app": "texts"}},
        "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}
    }))
    .unwrap();
    env.pvcs()
        .create(&PostParams::default(), &claim)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn objects_of_a_trainings_names_that_the_operator_did_not_make_are_left_alone() {
    let mut env = TestEnv::new("not-ours").await;
    env.start_operator("operator-1").await;

    // A user's claim that happens to have the name of training a23's checkpoint claim.
    user_claim(&env, "a23-checkpoints").await;
    // As the dataset of a23, it is refused at apply, naming the field, the claim and the fix.
    let mut reads_it = small_gpu("a23", 1);
    reads_it["spec"]["dataset"] = json!({"pvc": {"claimName": "a23-checkpoints"}});
    let refused = cluster::apply_yaml(&env.admin, &env.ns, &reads_it.to_string())
        .await
        .expect_err("a dataset claim named like the checkpoint claim was accepted")
        .to_string();
    for needle in [
        "spec.dataset.pvc.claimName: Forbidden",
        "dataset.pvc.claimName a23-checkpoints is the name of the checkpoint claim",
        "give the dataset claim or the training another name",
    ] {
        assert!(refused.contains(needle), "{needle:?} in {refused}");
    }
    assert!(!refused.contains("<nil>"), "{refused}");

    // A training a23 with another dataset: the claim is someone else's, so a conflict.
    env.apply(&small_gpu("a23", 1).to_string()).await;
    let t = env
        .wait_training("a23", "ClaimConflict", MINUTE, |t| {
            has_condition(t, "CheckpointVolumeReady", "False", "ClaimConflict")
        })
        .await;
    let msg = message_of(&t, "CheckpointVolumeReady");
    for needle in [
        "PersistentVolumeClaim a23-checkpoints already exists and is not this training's",
        "the operator leaves it untouched and starts no workers",
        "delete training a23 and create it under another name",
    ] {
        assert!(msg.contains(needle), "{needle:?} in {msg}");
    }
    assert_eq!(
        condition(&t, "PodsReady"),
        ("False".into(), "ClaimConflict".into())
    );
    assert_eq!(t.status.as_ref().unwrap().phase, Some(Phase::Pending));
    warning_event(&env, "a23", "ClaimConflict").await;

    // A user's Service, NetworkPolicy and pod under the names of trainings b7, n5 and p3.
    let services = env.services();
    let web: Service = serde_json::from_value(json!({
        "metadata": {"name": "b7-workers", "labels": {"app": "web"}},
        "spec": {"selector": {"app": "web"}, "ports": [{"port": 80}]}
    }))
    .unwrap();
    services.create(&PostParams::default(), &web).await.unwrap();
    let policies: Api<NetworkPolicy> = Api::namespaced(env.admin.clone(), &env.ns);
    let deny: NetworkPolicy = serde_json::from_value(json!({
        "metadata": {"name": "n5-workers"},
        "spec": {"podSelector": {"matchLabels": {"app": "db"}}, "policyTypes": ["Ingress"]}
    }))
    .unwrap();
    policies
        .create(&PostParams::default(), &deny)
        .await
        .unwrap();
    let own_pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": "p3-worker-0", "labels": {"app": "mine"}},
        "spec": {"containers": [{"name": "c", "image": "busybox"}],
                 "nodeSelector": {"no-such-node": "true"}}
    }))
    .unwrap();
    env.pods()
        .create(&PostParams::default(), &own_pod)
        .await
        .unwrap();
    for (name, object) in [
        ("b7", "Service b7-workers"),
        ("n5", "NetworkPolicy n5-workers"),
        ("p3", "Pod p3-worker-0"),
    ] {
        env.apply(&small_gpu(name, 1).to_string()).await;
        let t = env
            .wait_training(name, "NameConflict", MINUTE, |t| {
                has_condition(t, "PodsReady", "False", "NameConflict")
            })
            .await;
        let msg = message_of(&t, "PodsReady");
        assert!(
            msg.contains(&format!(
                "{object} already exists and is not this training's"
            )),
            "{name}: {msg}"
        );
    }
    // Nothing was made for them, and nothing of the user's was changed: no owner reference, no
    // field written by the operator, the Service still selects the user's pods.
    for name in ["a23", "b7", "n5"] {
        assert!(env.workers(name).await.is_empty(), "{name} has workers");
    }
    let p3_pods: Vec<String> = env
        .workers("p3")
        .await
        .iter()
        .map(|p| p.name_any())
        .collect();
    assert!(
        p3_pods.is_empty(),
        "p3's label went onto a pod: {p3_pods:?}"
    );
    // `with_service`: the user's Service is still there (later b7-workers is b7's own).
    let (env_, services_, policies_) = (&env, &services, &policies);
    let check_untouched = move |with_service: bool| async move {
        let (env, services, policies) = (env_, services_, policies_);
        let claim = env.pvcs().get("a23-checkpoints").await.unwrap();
        let policy = policies.get("n5-workers").await.unwrap();
        let pod = env.pods().get("p3-worker-0").await.unwrap();
        let mut objects = vec![
            ("claim", claim.metadata.clone()),
            ("NetworkPolicy", policy.metadata.clone()),
            ("pod", pod.metadata.clone()),
        ];
        if with_service {
            let svc = services.get("b7-workers").await.unwrap();
            assert_eq!(
                svc.spec.clone().unwrap().selector.unwrap(),
                [("app".to_string(), "web".to_string())].into()
            );
            objects.push(("Service", svc.metadata));
        }
        for (what, meta) in &objects {
            assert!(
                meta.owner_references.as_ref().is_none_or(|o| o.is_empty()),
                "the user's {what} got an owner: {meta:?}"
            );
            assert!(
                !touched_by_operator(meta),
                "the operator wrote to the user's {what}: {meta:?}"
            );
            assert!(
                meta.deletion_timestamp.is_none(),
                "the user's {what} is being deleted"
            );
        }
        assert_eq!(pod.labels().get("app").map(String::as_str), Some("mine"));
        assert!(!pod.labels().contains_key("charlm.dev/training"));
    };
    check_untouched(true).await;

    // Once the user's Service is gone, b7 goes on by itself (the operator looks again).
    services
        .delete("b7-workers", &DeleteParams::default())
        .await
        .unwrap();
    // Looked at again as long as it has waited (from 10 s, at most 10 min): well within this.
    env.wait_phase("b7", Phase::Running, Duration::from_secs(150))
        .await;
    let made = services.get("b7-workers").await.unwrap();
    assert!(made
        .owner_references()
        .iter()
        .any(|o| o.kind == "CharLMTraining"));

    // Deleting the trainings deletes none of the user's objects.
    for name in ["a23", "n5", "p3"] {
        env.trainings()
            .delete(name, &DeleteParams::default())
            .await
            .unwrap();
    }
    env.wait("the three trainings gone", MINUTE, || async {
        let mut left = vec![];
        for name in ["a23", "n5", "p3"] {
            if env.trainings().get_opt(name).await.unwrap().is_some() {
                left.push(name);
            }
        }
        if left.is_empty() {
            Ok(Some(()))
        } else {
            Err(format!("{left:?} left"))
        }
    })
    .await;
    // The garbage collector would act within moments on anything it thought owned.
    tokio::time::sleep(Duration::from_secs(3)).await;
    check_untouched(false).await;
    // The user's pod goes before the namespace (kwok never runs it; no finalizer holds it).
    let _ = env
        .pods()
        .delete("p3-worker-0", &DeleteParams::default())
        .await;
    env.finish().await;
}

/// The name of the annotation and its value, from the status.
fn restart_word(t: &CharLMTraining) -> String {
    t.status
        .as_ref()
        .and_then(|s| s.lost_checkpoints.as_ref())
        .map(|l| l.restart_token.clone())
        .expect("a loss with a token")
}

async fn annotate(env: &TestEnv, training: &str, value: &str) {
    env.trainings()
        .patch(
            training,
            &PatchParams::default(),
            &Patch::Merge(
                json!({"metadata": {"annotations": {"charlm.dev/restart-from-scratch": value}}}),
            ),
        )
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_checkpoint_claim_is_a_loss_and_only_the_users_word_starts_over() {
    let mut env = TestEnv::new("lost").await;
    env.start_operator("operator-1").await;
    env.apply(&small_gpu("keep", 1).to_string()).await;
    env.wait_phase("keep", Phase::Running, MINUTE).await;
    let claim_uid = env
        .pvcs()
        .get("keep-checkpoints")
        .await
        .unwrap()
        .uid()
        .unwrap();
    env.wait_training("keep", "the claim remembered", MINUTE, |t| {
        t.status.as_ref().unwrap().checkpoint_pvc_uid.as_deref() == Some(claim_uid.as_str())
    })
    .await;

    // `kubectl delete pvc` while worker 0 runs: the claim waits for it (pvc-protection), the
    // gang trains on, and the status says the checkpoints are being lost and how to save them.
    let deleted = tool(
        "kubectl",
        &[
            "-n",
            &env.ns,
            "delete",
            "pvc",
            "keep-checkpoints",
            "--wait=false",
        ],
    )
    .unwrap();
    assert!(deleted.contains("deleted"), "{deleted}");
    let t = env
        .wait_training("keep", "CheckpointsLost", MINUTE, |t| {
            has_condition(t, "CheckpointVolumeReady", "False", "CheckpointsLost")
        })
        .await;
    let msg = message_of(&t, "CheckpointVolumeReady");
    for needle in [
        "the checkpoint claim keep-checkpoints is being deleted",
        "kubectl cp -c trainer",
        "its checkpoints are lost",
        &format!("charlm.dev/restart-from-scratch={claim_uid}"),
    ] {
        assert!(msg.contains(needle), "{needle:?} in {msg}");
    }
    let st = t.status.clone().unwrap();
    assert_eq!(st.phase, Some(Phase::Running), "the gang trains on");
    let lost = st.lost_checkpoints.unwrap();
    assert_eq!(lost.claim_uid.as_deref(), Some(claim_uid.as_str()));
    assert_eq!(env.workers("keep").await.len(), 1);

    // Worker 0 fails, its last report naming a checkpoint on the claim: the gang restarts, and
    // the claim goes with the pod.
    let report = r#"{"step": 400, "checkpoint": "/checkpoints/step-000000400", "best_val_bpc": 1.5, "best_step": 300, "complete": false}"#;
    env.set_pod_status(
        "keep-worker-0",
        json!({"phase": "Failed", "containerStatuses": terminated("trainer", 1, "Error", report)}),
    )
    .await;
    env.wait("worker 0 and the claim gone", MINUTE, || async {
        let pods = env.workers("keep").await.len();
        let claim = env.pvcs().get_opt("keep-checkpoints").await.unwrap();
        match (pods, claim) {
            (0, None) => Ok(Some(())),
            (n, c) => Err(format!("{n} pods, claim {:?}", c.map(|c| c.uid()))),
        }
    })
    .await;
    // Past the restart's backoff (3 s): no new, empty claim, no workers from step 0.
    assert_nothing_made_for(&env, "keep", "keep-checkpoints", Duration::from_secs(15)).await;
    let t = env.trainings().get("keep").await.unwrap();
    let st = t.status.clone().unwrap();
    assert_eq!(
        condition(&t, "PodsReady"),
        ("False".into(), "CheckpointsLost".into())
    );
    assert!(st
        .message
        .as_deref()
        .unwrap()
        .contains("its checkpoints are lost"));
    assert_eq!(
        st.latest_checkpoint, None,
        "the status names no lost checkpoint"
    );
    assert_eq!((st.best_val_bpc, st.best_step), (None, None));
    let lost = st.lost_checkpoints.clone().unwrap();
    assert_eq!(
        lost.latest_checkpoint.as_deref(),
        Some("/checkpoints/step-000000400")
    );
    assert_eq!((lost.best_val_bpc, lost.best_step), (Some(1.5), Some(300)));
    warning_event(&env, "keep", "CheckpointsLost").await;

    // A word that is not this loss's does nothing.
    annotate(&env, "keep", "yes").await;
    assert_nothing_made_for(&env, "keep", "keep-checkpoints", Duration::from_secs(5)).await;

    // The word: a new claim, and workers from step 0.
    let word = restart_word(&t);
    assert_eq!(word, claim_uid);
    annotate(&env, "keep", &word).await;
    let t = env.wait_phase("keep", Phase::Running, MINUTE).await;
    let new = env.pvcs().get("keep-checkpoints").await.unwrap();
    assert_ne!(new.uid().unwrap(), claim_uid);
    let st = t.status.unwrap();
    assert!(st.lost_checkpoints.is_none() && st.progress.is_none());
    env.wait_training("keep", "the new claim ready", MINUTE, |t| {
        has_condition(t, "CheckpointVolumeReady", "True", "Bound")
    })
    .await;
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operator_remembers_a_checkpoint_claim_across_its_own_restart() {
    let mut env = TestEnv::new("memory").await;
    let first = env.start_operator("operator-1").await;
    env.apply(&small_gpu("memo", 1).to_string()).await;
    env.wait_phase("memo", Phase::Running, MINUTE).await;
    env.wait_training("memo", "the claim remembered", MINUTE, |t| {
        t.status.as_ref().unwrap().checkpoint_pvc_uid.is_some()
    })
    .await;

    // While no operator runs, the worker and the claim go.
    env.operators[first].terminate();
    let pods = env.pods();
    pods.patch(
        "memo-worker-0",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"finalizers": null}})),
    )
    .await
    .unwrap();
    pods.delete("memo-worker-0", &DeleteParams::default())
        .await
        .unwrap();
    let _ = env
        .pvcs()
        .delete("memo-checkpoints", &DeleteParams::default())
        .await
        .unwrap();
    env.wait("worker and claim gone", MINUTE, || async {
        let pods = env.workers("memo").await.len();
        let claim = env.pvcs().get_opt("memo-checkpoints").await.unwrap();
        if pods == 0 && claim.is_none() {
            Ok(Some(()))
        } else {
            Err(format!("{pods} pods, claim there: {}", claim.is_some()))
        }
    })
    .await;

    // A new operator knows from the status that there were checkpoints.
    env.start_operator("operator-2").await;
    let t = env
        .wait_training("memo", "CheckpointsLost", MINUTE, |t| {
            has_condition(t, "CheckpointVolumeReady", "False", "CheckpointsLost")
        })
        .await;
    assert!(message_of(&t, "CheckpointVolumeReady").contains("was deleted"));
    assert_nothing_made_for(&env, "memo", "memo-checkpoints", Duration::from_secs(10)).await;
    env.finish().await;
}

/// Deletes a cluster-scoped StorageClass when dropped, passing or failing.
struct ClassGuard(String);

impl Drop for ClassGuard {
    fn drop(&mut self) {
        let _ = std::process::Command::new(cluster::bin_dir().join("kubectl"))
            .env("KUBECONFIG", cluster::kubeconfig_path())
            .args(["delete", "storageclass", &self.0, "--ignore-not-found"])
            .output();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_storage_class_is_named_and_waited_for_without_workers() {
    let mut env = TestEnv::new("noclass").await;
    env.start_operator("operator-1").await;
    let class = format!("{}-fast", env.ns);
    let _guard = ClassGuard(class.clone());
    let mut manifest = small_gpu("sc", 1);
    manifest["spec"]["checkpoint"]["storageClassName"] = json!(class);
    env.apply(&manifest.to_string()).await;
    let t = env
        .wait_training("sc", "StorageClassNotFound", MINUTE, |t| {
            has_condition(t, "CheckpointVolumeReady", "False", "StorageClassNotFound")
        })
        .await;
    let msg = message_of(&t, "CheckpointVolumeReady");
    for needle in [
        format!("StorageClass {class} of the checkpoint claim sc-checkpoints does not exist"),
        format!("create StorageClass {class}"),
        "spec.checkpoint.storageClassName".to_string(),
    ] {
        assert!(msg.contains(&needle), "{needle:?} in {msg}");
    }
    assert_eq!(
        condition(&t, "PodsReady"),
        ("False".into(), "StorageClassNotFound".into())
    );
    warning_event(&env, "sc", "StorageClassNotFound").await;
    // No GPU is held by workers that could never be placed.
    let until = Instant::now() + Duration::from_secs(12);
    while Instant::now() < until {
        assert!(env.workers("sc").await.is_empty(), "workers were made");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // The class appears (the plane's own provisioner): the training goes on by itself.
    let sc: StorageClass = serde_json::from_value(json!({
        "metadata": {"name": class},
        "provisioner": "kubernetes.io/host-path",
        "reclaimPolicy": "Delete",
        "volumeBindingMode": "Immediate"
    }))
    .unwrap();
    Api::<StorageClass>::all(env.admin.clone())
        .create(&PostParams::default(), &sc)
        .await
        .unwrap();
    env.wait_phase("sc", Phase::Running, Duration::from_secs(120))
        .await;
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkpoint_set_aside_as_damaged_at_resume_is_a_condition_and_an_event() {
    let mut env = TestEnv::new("damaged").await;
    env.start_operator("operator-1").await;
    env.apply(&small_gpu("dmg", 1).to_string()).await;
    env.wait_phase("dmg", Phase::Running, MINUTE).await;
    // The run resumed from step 100 after setting step 200 aside, then finished: its report
    // (the termination log, as /progress said while it ran) says so.
    let report: Value = json!({
        "step": 300, "complete": true, "stop_reason": "budget",
        "checkpoint": "/checkpoints/step-000000300",
        "resumed_from": "/checkpoints/step-000000100",
        "damaged_checkpoints": [{
            "path": "/checkpoints/step-000000200",
            "set_aside_as": "/checkpoints/step-000000200.damaged",
            "error": "/checkpoints/step-000000200/model.safetensors is truncated (1024 of 4096 bytes)"
        }]
    });
    env.set_pod_status(
        "dmg-worker-0",
        json!({"phase": "Succeeded",
               "containerStatuses": terminated("trainer", 0, "Completed", &report.to_string())}),
    )
    .await;
    let t = env
        .wait_training("dmg", "CheckpointDamaged", MINUTE, |t| {
            has_condition(t, "CheckpointDamaged", "True", "CheckpointDamaged")
        })
        .await;
    let msg = message_of(&t, "CheckpointDamaged");
    for needle in [
        "checkpoint /checkpoints/step-000000200 failed its check",
        "is truncated",
        "set aside as /checkpoints/step-000000200.damaged",
        "resumed from /checkpoints/step-000000100 instead",
    ] {
        assert!(msg.contains(needle), "{needle:?} in {msg}");
    }
    let st = t.status.clone().unwrap();
    assert_eq!(st.damaged_checkpoints, ["/checkpoints/step-000000200"]);
    assert_eq!(
        st.progress.unwrap().resumed_from.as_deref(),
        Some("/checkpoints/step-000000100")
    );
    let event = warning_event(&env, "dmg", "CheckpointDamaged").await;
    assert!(event
        .note
        .as_deref()
        .is_some_and(|n| n.contains("step-000000200") && n.contains("step-000000100")));
    // `kubectl describe` shows it.
    let described = tool("kubectl", &["-n", &env.ns, "describe", "clt", "dmg"]).unwrap();
    assert!(described.contains("CheckpointDamaged"), "{described}");
    env.finish().await;
}
