//! A training's life apart from failures: suspend, delete, a missing dataset, the active deadline and the TTL after finishing.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suspend_deletes_workers_and_keeps_the_checkpoint_volume() {
    let mut env = TestEnv::new("suspend").await;
    env.start_operator("operator-1").await;
    start_training(&env, &small_gpu("pausable", 2)).await;
    let pvc_uid = env.pvcs().get("pausable-checkpoints").await.unwrap().uid();

    let mut suspended = small_gpu("pausable", 2);
    suspended["spec"]["suspend"] = json!(true);
    env.apply(&suspended.to_string()).await;
    let t = env
        .wait_phase("pausable", Phase::Suspended, Duration::from_secs(30))
        .await;
    assert_eq!(
        condition(&t, "Suspended"),
        ("True".into(), "Suspended".into())
    );
    env.wait(
        "workers deleted while suspended",
        Duration::from_secs(30),
        || async {
            let n = env.workers("pausable").await.len();
            if n == 0 {
                Ok(Some(()))
            } else {
                Err(format!("{n} pods left"))
            }
        },
    )
    .await;
    let pvc = env.pvcs().get("pausable-checkpoints").await.unwrap();
    assert_eq!(
        pvc.uid(),
        pvc_uid,
        "the checkpoint volume survives a suspend"
    );
    assert!(pvc.metadata.deletion_timestamp.is_none());

    env.apply(&small_gpu("pausable", 2).to_string()).await;
    let t = env.wait_phase("pausable", Phase::Running, MINUTE).await;
    assert_eq!(
        condition(&t, "Suspended"),
        ("False".into(), "Resumed".into())
    );
    assert_eq!(
        t.status.as_ref().unwrap().restarts,
        0,
        "a resume is not a restart"
    );
    assert_eq!(env.workers("pausable").await.len(), 2);
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deletion_cleans_up_and_retain_on_delete_keeps_the_volume() {
    let mut env = TestEnv::new("delete").await;
    env.start_operator("operator-1").await;
    start_training(&env, &small_gpu("gone", 2)).await;
    let mut kept = small_gpu("kept", 1);
    kept["spec"]["checkpoint"]["retainOnDelete"] = json!(true);
    start_training(&env, &kept).await;

    for name in ["gone", "kept"] {
        env.trainings()
            .delete(name, &DeleteParams::default())
            .await
            .unwrap();
    }
    env.wait("both trainings deleted", MINUTE, || async {
        let left = env
            .trainings()
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .len();
        if left == 0 {
            Ok(Some(()))
        } else {
            Err(format!("{left} left"))
        }
    })
    .await;
    env.wait("workers and Services gone", MINUTE, || async {
        let pods = env
            .pods()
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .len();
        let svcs = env
            .services()
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .len();
        if pods == 0 && svcs == 0 {
            Ok(Some(()))
        } else {
            Err(format!("{pods} pods, {svcs} services"))
        }
    })
    .await;
    env.wait(
        "the unretained checkpoint volume deleted",
        MINUTE,
        || async {
            match env.pvcs().get_opt("gone-checkpoints").await {
                Ok(None) => Ok(Some(())),
                Ok(Some(p)) if p.metadata.deletion_timestamp.is_some() => Ok(Some(())),
                Ok(Some(_)) => Err("still there".into()),
                Err(e) => Err(e.to_string()),
            }
        },
    )
    .await;
    let retained = env.pvcs().get("kept-checkpoints").await.unwrap();
    assert!(
        retained.metadata.deletion_timestamp.is_none(),
        "retainOnDelete kept nothing"
    );
    assert!(
        retained.owner_references().is_empty(),
        "the garbage collector would take it"
    );
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_dataset_is_reported_and_then_picked_up() {
    let mut env = TestEnv::new("dataset").await;
    env.start_operator("operator-1").await;
    let mut manifest = small_gpu("fromcm", 1);
    manifest["spec"]["dataset"] = json!({"configMap": {"name": "texts"}});
    env.apply(&manifest.to_string()).await;
    let t = env
        .wait_training("fromcm", "DatasetNotFound", Duration::from_secs(30), |t| {
            t.status.as_ref().is_some_and(|s| {
                s.conditions
                    .iter()
                    .any(|c| c.type_ == "DatasetReady" && c.reason == "DatasetNotFound")
            })
        })
        .await;
    assert_eq!(phase(&t), Some(Phase::Pending));
    assert!(t
        .status
        .unwrap()
        .message
        .unwrap()
        .contains("ConfigMap texts (spec.dataset.configMap.name) does not exist"));
    assert!(env.workers("fromcm").await.is_empty());

    let cm = ConfigMap {
        metadata: ObjectMeta {
            name: Some("texts".into()),
            ..Default::default()
        },
        data: Some([("a.txt".to_string(), "1+1=2\n\n2+2=4\n".to_string())].into()),
        ..Default::default()
    };
    Api::<ConfigMap>::namespaced(env.admin.clone(), &env.ns)
        .create(&PostParams::default(), &cm)
        .await
        .unwrap();
    env.wait_phase("fromcm", Phase::Running, MINUTE).await;
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_active_deadline_fails_the_training_and_keeps_the_checkpoint_volume() {
    let mut env = TestEnv::new("deadline").await;
    env.start_operator("operator-1").await;
    let mut manifest = small_gpu("late", 2);
    manifest["spec"]["activeDeadlineSeconds"] = json!(20);
    start_training(&env, &manifest).await;
    let pvc_uid = env.pvcs().get("late-checkpoints").await.unwrap().uid();
    // As if rank 0 had reported a checkpoint (kwok's pods serve no /progress, and a deleted one
    // vanishes before any SIGTERM report could be written).
    env.trainings()
        .patch_status(
            "late",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(
                json!({"status": {"latestCheckpoint": "/checkpoints/step-000000042"}}),
            ),
        )
        .await
        .unwrap();

    let t = env.wait_phase("late", Phase::Failed, MINUTE).await;
    let created = t.metadata.creation_timestamp.clone().unwrap().0;
    let ended = t
        .status
        .as_ref()
        .unwrap()
        .completion_time
        .clone()
        .unwrap()
        .0;
    let took = ended.duration_since(created).as_secs();
    assert!((20..40).contains(&took), "failed {took}s after creation");
    assert_eq!(
        condition(&t, "Failed"),
        ("True".into(), "DeadlineExceeded".into())
    );
    let status = t.status.clone().unwrap();
    let message = status.message.unwrap();
    assert!(
        message.contains("activeDeadlineSeconds 20 exceeded")
            && message.contains("/checkpoints/step-000000042 (step 42)"),
        "{message}"
    );
    assert_eq!((status.restarts, status.attempt), (0, 0));
    assert_eq!(status.failures, Default::default());
    wait_workers_gone(&env, "late").await;
    let pvc = env.pvcs().get("late-checkpoints").await.unwrap();
    assert_eq!(
        pvc.uid(),
        pvc_uid,
        "the checkpoint volume survives the deadline"
    );
    assert!(pvc.metadata.deletion_timestamp.is_none());
    assert_event(
        &env,
        "late",
        "DeadlineExceeded",
        &["activeDeadlineSeconds 20"],
    )
    .await;
    // Failed stays failed: nothing is started again.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(env.workers("late").await.is_empty());
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ttl_after_finishing_deletes_the_training_and_retain_on_delete_keeps_the_volume() {
    let mut env = TestEnv::new("ttl").await;
    env.start_operator("operator-1").await;
    let mut done = small_gpu("done", 2);
    done["spec"]["ttlSecondsAfterFinished"] = json!(5);
    let mut failed = small_gpu("failed", 1);
    failed["spec"]["ttlSecondsAfterFinished"] = json!(5);
    failed["spec"]["checkpoint"]["retainOnDelete"] = json!(true);
    let mut kept = small_gpu("untimed", 1);
    kept["spec"]["checkpoint"]["retainOnDelete"] = json!(true);
    for m in [&done, &failed, &kept] {
        start_training(&env, m).await;
    }

    let report = r#"{"step": 100, "val_bpc": 1.2, "checkpoint": "/checkpoints/step-000000100", "complete": true}"#;
    env.set_pod_status(
        "done-worker-0",
        json!({"phase": "Succeeded", "containerStatuses": terminated("trainer", 0, "Completed", report)}),
    )
    .await;
    for name in ["failed-worker-0", "untimed-worker-0"] {
        env.set_pod_status(
            name,
            json!({"phase": "Failed", "containerStatuses": terminated("trainer", 2, "Error", "error: bad input")}),
        )
        .await;
    }
    let t = env
        .wait_phase("done", Phase::Succeeded, Duration::from_secs(30))
        .await;
    let completed = t.status.unwrap().completion_time.unwrap().0;
    env.wait_phase("failed", Phase::Failed, Duration::from_secs(30))
        .await;
    env.wait_phase("untimed", Phase::Failed, Duration::from_secs(30))
        .await;

    env.wait("the finished trainings deleted", MINUTE, || async {
        let mut left: Vec<String> = env
            .trainings()
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .iter()
            .map(|t| t.name_any())
            .collect();
        left.sort();
        if left == ["untimed"] {
            Ok(Some(()))
        } else {
            Err(format!("{left:?}"))
        }
    })
    .await;
    let gone_after = k8s_openapi::jiff::Timestamp::now()
        .duration_since(completed)
        .as_secs();
    assert!(gone_after >= 5, "deleted {gone_after}s after completion");
    wait_workers_gone(&env, "done").await;
    wait_workers_gone(&env, "failed").await;
    assert_eq!(env.workers("untimed").await.len(), 1, "no TTL: kept");
    env.wait(
        "the unretained checkpoint volume deleted",
        MINUTE,
        || async {
            match env.pvcs().get_opt("done-checkpoints").await {
                Ok(None) => Ok(Some(())),
                Ok(Some(p)) if p.metadata.deletion_timestamp.is_some() => Ok(Some(())),
                Ok(Some(_)) => Err("still there".into()),
                Err(e) => Err(e.to_string()),
            }
        },
    )
    .await;
    let retained = env.pvcs().get("failed-checkpoints").await.unwrap();
    assert!(retained.metadata.deletion_timestamp.is_none());
    assert!(
        retained.owner_references().is_empty(),
        "the garbage collector would take it"
    );
    assert_event(
        &env,
        "failed",
        "TTLExpired",
        &["ttlSecondsAfterFinished", "checkpoint volume is kept"],
    )
    .await;
    env.finish().await;
}
