//! Case 1: the CPU example (shrunk), its live progress, its checkpoint and a sample from it; Pod Security `restricted`.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a cluster with the chart and images: e2e/kind.sh runs it"]
async fn cpu_example_shows_live_progress_and_succeeds_with_a_checkpoint_that_samples() {
    let _serial = SERIAL.lock().await;
    let case = Case::start("example").await;

    // The namespace's label is in force: a pod that asks for nothing is refused.
    let plain: Pod = serde_json::from_value(json!({
        "metadata": {"name": "plain"},
        "spec": {"containers": [{"name": "c", "image": trainer_image()}]}
    }))
    .unwrap();
    let refused = case
        .pods
        .create(&PostParams::default(), &plain)
        .await
        .expect_err("restricted admits a pod without a securityContext");
    assert!(
        refused
            .to_string()
            .contains("violates PodSecurity \"restricted:latest\""),
        "{refused}"
    );

    // The example's shape, shrunk: a small model and dataset, and a budget in time (54 s) long
    // enough that the operator's progress poll (every 25 s at most) meets a running trainer.
    let text = std::fs::read_to_string(repo_root().join("examples/cpu-training.yaml")).unwrap();
    let mut manifest: Value = serde_norway::from_str(&text).unwrap();
    let name = manifest["metadata"]["name"].as_str().unwrap().to_string();
    let spec = manifest["spec"].as_object_mut().unwrap();
    assert_eq!(spec["gpus"], json!(0), "the CPU example trains on CPUs");
    for (k, v) in [
        ("depth", json!(1)),
        ("seqLen", json!(64)),
        ("deviceBatchSize", json!(4)),
        ("totalBatchSize", json!(256)),
        ("hours", json!(0.015)),
        ("evalEvery", json!(500)),
        // It memorises 200 k characters: without this the default early stop, not the budget
        // this case asserts, would end it.
        ("earlyStop", json!({"patience": 0})),
    ] {
        spec.insert(k.into(), v);
    }
    spec.remove("maxSteps");
    spec["dataset"]["synthetic"]["chars"] = json!(200000);
    spec["checkpoint"]["intervalMinutes"] = json!(0.1);
    spec["resources"] = json!({"requests": {"cpu": "250m", "memory": "256Mi"}});
    spec.insert(
        "env".into(),
        json!([{"name": "CHARLM_THREADS", "value": "1"}]),
    );
    case.apply(&manifest).await;

    // Live progress: read from rank 0's /progress while it runs, not the final report.
    let live = case
        .until("live progress while Running", 4 * MINUTE, || async {
            let t = case.training(&name).await?;
            let s = t.status.clone().unwrap_or_default();
            match &s.progress {
                Some(p) if s.phase == Some(Phase::Running) && p.step > 0 && !p.complete => {
                    Ok(Some(s))
                }
                _ => Err(serde_json::to_string(&s).unwrap()),
            }
        })
        .await;
    let p = live.progress.clone().unwrap();
    let report = serde_json::to_string(&p).unwrap();
    assert_eq!(live.workers, 1, "{report}");
    assert_eq!(p.tokens, p.step * 256, "{report}");
    assert!(
        p.train_loss.is_some_and(|l| l.is_finite() && l > 0.0),
        "{report}"
    );
    assert!(p.tokens_per_s.is_some_and(|v| v > 0.0), "{report}");
    assert!(p.eta_s.is_some_and(|v| v > 0.0), "{report}");
    assert!(p.elapsed_s > 0.0 && p.epoch > 0.0, "{report}");
    assert_eq!(p.world_size, 1, "{report}");
    assert!(live.eta.is_some(), "an ETA in the status: {report}");

    let done = case.wait_phase(&name, Phase::Succeeded, 3 * MINUTE).await;
    let status = done.status.clone().unwrap();
    let last = status.progress.clone().expect("the final report");
    assert!(last.complete, "{last:?}");
    assert_eq!(last.stop_reason.as_deref(), Some("budget"), "{last:?}");
    assert!(
        last.step > p.step,
        "final {} after live {}",
        last.step,
        p.step
    );
    let bpc = status.final_val_bpc.expect("finalValBpc once Succeeded");
    assert!(bpc.is_finite() && bpc > 0.0 && bpc < 6.0, "val bpc {bpc}");
    let step_dir = format!("step-{:09}", last.step);
    assert_eq!(
        status.latest_checkpoint.as_deref(),
        Some(format!("/checkpoints/{step_dir}").as_str())
    );
    assert!(status.completion_time.is_some());
    assert_eq!(status.restarts, 0);

    // The checkpoint on the claim, complete, and good enough to sample from, in a pod of the
    // trainer image that mounts the claim read-only.
    let claim = status.checkpoint_pvc.clone().expect("status.checkpointPvc");
    let script = format!(
        "cat /data/COMPLETE.json && echo && echo ---- && test -f /data/{step_dir}/manifest.json && \
         charlm-trainer sample --checkpoint /data/{step_dir} --prompt 12+ --max-tokens 40 \
         --temperature 0 --device cpu"
    );
    let (phase, log) = case.run_script("sample", &claim, &script, true).await;
    assert_eq!(phase, "Succeeded", "{}", case.report(&log).await);
    let (complete, sample) = log.split_once("\n----\n").unwrap_or((&log, ""));
    let complete: Value = serde_json::from_str(complete)
        .unwrap_or_else(|e| panic!("COMPLETE.json is not JSON ({e}): {log}"));
    assert_eq!(complete["complete"], json!(true), "{log}");
    assert_eq!(complete["step"], json!(last.step), "{log}");
    assert!(
        sample.lines().any(|l| l.starts_with("12+")),
        "no sample: {log}"
    );
    case.finish().await;
}
