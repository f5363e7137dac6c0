//! Failure and success rules: gang restarts, bad input, a complete report, and each failure reason's action.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_worker_restarts_the_gang() {
    let mut env = TestEnv::new("restart").await;
    env.start_operator("operator-1").await;
    let t = start_training(&env, &small_gpu("gang", 2)).await;
    assert_eq!(t.status.as_ref().unwrap().restarts, 0);
    let before: Vec<String> = env
        .workers("gang")
        .await
        .iter()
        .map(|p| p.uid().unwrap())
        .collect();

    env.set_pod_status(
        "gang-worker-1",
        json!({"phase": "Failed", "containerStatuses": terminated("trainer", 137, "Error", "killed")}),
    )
    .await;

    let t = env
        .wait_phase("gang", Phase::Restarting, Duration::from_secs(30))
        .await;
    let status = t.status.clone().unwrap();
    assert_eq!((status.restarts, status.attempt), (1, 1));
    assert_eq!(status.failures.error, 1);
    assert_eq!(
        condition(&t, "Restarting"),
        ("True".into(), "WorkerFailed".into())
    );
    let message = status.message.unwrap();
    assert!(
        message.contains("gang-worker-1: container trainer exited with code 137: killed"),
        "{message}"
    );
    assert!(message.contains("gang restart 1 of 2"), "{message}");

    let t = env.wait_phase("gang", Phase::Running, MINUTE).await;
    assert_eq!(
        condition(&t, "Restarting"),
        ("False".into(), "Recovered".into())
    );
    assert_eq!(t.status.as_ref().unwrap().restarts, 1);
    let pods = env.workers("gang").await;
    assert_eq!(pods.len(), 2);
    for pod in &pods {
        assert!(
            !before.contains(&pod.uid().unwrap()),
            "{} was not replaced",
            pod.name_any()
        );
        assert_eq!(pod.labels()["charlm.dev/attempt"], "1");
    }
    let events = events_of(&env, "gang").await;
    assert!(
        events
            .iter()
            .any(|e| e.reason.as_deref() == Some("WorkerFailed")
                && e.type_.as_deref() == Some("Warning")),
        "events: {events:?}"
    );
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_fails_at_once_and_restarts_run_out() {
    let mut env = TestEnv::new("fail").await;
    env.start_operator("operator-1").await;

    // Exit code 2 from prepare: the input is wrong, retrying cannot help.
    start_training(&env, &small_gpu("badinput", 1)).await;
    env.set_pod_status(
        "badinput-worker-0",
        json!({
            "phase": "Failed",
            "initContainerStatuses": terminated("prepare", 2, "Error", "error: /work/raw has no .txt files; check spec.dataset")
        }),
    )
    .await;
    let t = env
        .wait_phase("badinput", Phase::Failed, Duration::from_secs(30))
        .await;
    assert_eq!(
        condition(&t, "Failed"),
        ("True".into(), "InvalidInput".into())
    );
    let status = t.status.unwrap();
    assert_eq!(status.restarts, 0);
    assert!(status.message.unwrap().contains("has no .txt files"));
    assert_eq!(
        env.workers("badinput").await.len(),
        1,
        "the failed pod stays for its logs"
    );

    // Out of restarts: maxRestarts 0 fails on the first crash.
    let mut manifest = small_gpu("norestart", 1);
    manifest["spec"]["restartPolicy"]["maxRestarts"] = json!(0);
    start_training(&env, &manifest).await;
    env.set_pod_status(
        "norestart-worker-0",
        json!({"phase": "Failed", "containerStatuses": terminated("trainer", 1, "Error", "panicked at NCCL")}),
    )
    .await;
    let t = env
        .wait_phase("norestart", Phase::Failed, Duration::from_secs(30))
        .await;
    assert_eq!(
        condition(&t, "Failed"),
        ("True".into(), "RestartLimitExceeded".into())
    );
    assert!(t
        .status
        .unwrap()
        .message
        .unwrap()
        .contains("all 0 restarts used"));
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_complete_report_from_worker_zero_succeeds() {
    let mut env = TestEnv::new("succeed").await;
    env.start_operator("operator-1").await;
    start_training(&env, &small_gpu("done", 2)).await;
    let report = r#"{"step": 100, "tokens": 102400, "epoch": 3.1, "train_loss": 0.8, "val_bpc": 1.2345, "best_val_bpc": 1.2, "best_step": 90, "elapsed_s": 60.0, "eta_s": 0.0, "checkpoint": "/checkpoints/step-000000100", "world_size": 2, "complete": true}"#;
    env.set_pod_status(
        "done-worker-0",
        json!({"phase": "Succeeded", "containerStatuses": terminated("trainer", 0, "Completed", report)}),
    )
    .await;
    let t = env
        .wait_phase("done", Phase::Succeeded, Duration::from_secs(30))
        .await;
    let status = t.status.clone().unwrap();
    assert_eq!(status.final_val_bpc, Some(1.2345));
    assert_eq!(
        status.latest_checkpoint.as_deref(),
        Some("/checkpoints/step-000000100")
    );
    assert_eq!(status.progress.as_ref().unwrap().step, 100);
    assert!(status.completion_time.is_some());
    assert_eq!(
        condition(&t, "Succeeded"),
        ("True".into(), "BudgetDone".into())
    );
    // The still-running peer is released; worker 0 stays for its logs.
    env.wait(
        "worker 1 deleted after success",
        Duration::from_secs(30),
        || async {
            let names: Vec<String> = env
                .workers("done")
                .await
                .iter()
                .map(|p| p.name_any())
                .collect();
            if names == ["done-worker-0"] {
                Ok(Some(()))
            } else {
                Err(format!("{names:?}"))
            }
        },
    )
    .await;
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failure_rules_choose_what_each_reason_does() {
    let mut env = TestEnv::new("rules").await;
    env.start_operator("operator-1").await;

    // Refused at apply: a reason named twice, and a reason that does not exist.
    let base = small_gpu("refused", 1);
    let cases: Vec<(&str, Mutation, &str)> = vec![
        (
            "a reason named twice",
            Box::new(|m: &mut Value| {
                m["spec"]["restartPolicy"]["rules"] = json!([
                    {"reason": "Error", "action": "Fail"},
                    {"reason": "Error", "action": "Restart"}
                ])
            }),
            "restartPolicy.rules must name each reason at most once",
        ),
        (
            "an unknown reason",
            Box::new(|m: &mut Value| {
                m["spec"]["restartPolicy"]["rules"] =
                    json!([{"reason": "Crashed", "action": "Fail"}])
            }),
            "spec.restartPolicy.rules[0].reason: Invalid value: \"Crashed\": restartPolicy.rules[].reason \
             must be one of Evicted, Preempted, NodeLost, Deleted, OOMKilled, BadInput, StorageFull, Error",
        ),
        (
            "an unknown action",
            Box::new(|m: &mut Value| {
                m["spec"]["restartPolicy"]["rules"] =
                    json!([{"reason": "Error", "action": "Retry"}])
            }),
            "spec.restartPolicy.rules[0].action: Invalid value: \"Retry\": restartPolicy.rules[].action \
             must be one of Restart, RestartWithoutCounting, Fail",
        ),
    ];
    // Only the message that matters: an unknown value no longer stops the other rules with
    // "<nil>: ... some validation rules were not checked".
    for (what, text) in assert_refused(&env, &base, &cases).await {
        for noise in ["<nil>", "some validation rules were not checked"] {
            assert!(!text.contains(noise), "{what}: {noise:?} in {text:?}");
        }
    }

    let mut strict = small_gpu("strict", 1);
    strict["spec"]["restartPolicy"]["rules"] = json!([{"reason": "Error", "action": "Fail"}]);
    for manifest in [
        small_gpu("evict", 2),
        small_gpu("preempt", 1),
        small_gpu("oom", 1),
        strict,
    ] {
        start_training(&env, &manifest).await;
    }

    // The kubelet evicts worker 1 (its container killed), the scheduler preempts a worker (the
    // kubelet then ends it: Failed with the DisruptionTarget condition), the kernel OOM-kills a
    // trainer, and a trainer crashes under a rule that fails on any error.
    env.set_pod_status(
        "evict-worker-1",
        json!({
            "phase": "Failed", "reason": "Evicted",
            "message": "The node was low on resource: memory.",
            "containerStatuses": terminated("trainer", 137, "Error", "")
        }),
    )
    .await;
    env.set_pod_status(
        "preempt-worker-0",
        json!({
            "phase": "Failed",
            "conditions": [{"type": "DisruptionTarget", "status": "True", "reason": "PreemptionByScheduler",
                            "message": "preempted by a higher-priority pod"}],
            "containerStatuses": terminated("trainer", 137, "Error", "")
        }),
    )
    .await;
    env.set_pod_status(
        "oom-worker-0",
        json!({"phase": "Failed", "containerStatuses": terminated(
            "trainer", 137, "OOMKilled",
            "[rank 0] error: out of memory at micro-batch 16; micro-batch 8 fits: set deviceBatchSize: 8"
        )}),
    )
    .await;
    env.set_pod_status(
        "strict-worker-0",
        json!({"phase": "Failed", "containerStatuses": terminated("trainer", 1, "Error", "panicked at NCCL")}),
    )
    .await;

    // Evicted: restarted, not counted, counted by reason, and said in an Event.
    let t = env
        .wait_training("evict", "a second attempt", Duration::from_secs(30), |t| {
            t.status.as_ref().is_some_and(|s| s.attempt == 1)
        })
        .await;
    let status = t.status.clone().unwrap();
    assert_eq!(status.restarts, 0, "an eviction is not counted");
    assert_eq!((status.failures.evicted, status.failures.error), (1, 0));
    assert_event(
        &env,
        "evict",
        "Evicted",
        &["evict-worker-1", "RestartWithoutCounting"],
    )
    .await;
    let t = env.wait_phase("evict", Phase::Running, MINUTE).await;
    assert_eq!(t.status.as_ref().unwrap().restarts, 0);
    assert_eq!(env.workers("evict").await.len(), 2);

    let t = env
        .wait_training(
            "preempt",
            "a second attempt",
            Duration::from_secs(30),
            |t| t.status.as_ref().is_some_and(|s| s.attempt == 1),
        )
        .await;
    let status = t.status.unwrap();
    assert_eq!((status.restarts, status.failures.preempted), (0, 1));
    assert_event(
        &env,
        "preempt",
        "Preempted",
        &[
            "preempt-worker-0",
            "PreemptionByScheduler",
            "RestartWithoutCounting",
        ],
    )
    .await;

    // OOMKilled fails by default, with the trainer's line and the fix.
    let t = env
        .wait_phase("oom", Phase::Failed, Duration::from_secs(30))
        .await;
    assert_eq!(condition(&t, "Failed"), ("True".into(), "OOMKilled".into()));
    let status = t.status.unwrap();
    let message = status.message.unwrap();
    assert!(
        message.contains("micro-batch 8 fits") && message.contains("lower spec.deviceBatchSize"),
        "{message}"
    );
    assert_eq!((status.restarts, status.failures.oom_killed), (0, 1));
    assert_event(&env, "oom", "OOMKilled", &["oom-worker-0", "action Fail"]).await;

    // The user's rule fails an error at once, though restarts are left.
    let t = env
        .wait_phase("strict", Phase::Failed, Duration::from_secs(30))
        .await;
    assert_eq!(condition(&t, "Failed"), ("True".into(), "Error".into()));
    let status = t.status.unwrap();
    assert!(
        status
            .message
            .as_deref()
            .unwrap()
            .contains("restartPolicy.rules says Fail for Error"),
        "{:?}",
        status.message
    );
    assert_eq!((status.restarts, status.failures.error), (0, 1));
    env.finish().await;
}
