//! `kubectl charlm` against the local control plane: the binary as a user runs it, with the admin
//! kubeconfig, on trainings whose status the test writes (no operator runs, so nothing rewrites
//! it). Fake nodes run no containers, so what is checked here is what needs none: the status view
//! and every refusal (no checkpoint yet, claim gone, no image, worker 0 gone), and that a helper
//! pod that never finishes is deleted at its timeout. Sampling and exporting on a real node:
//! e2e/tests/in_cluster.rs.
//!
//! Nothing here reaches a kubelet (no log or exec of a fake pod): the plugin talks to the API
//! server on 127.0.0.1 only, and the operator of the live case reads a stand-in /progress there.

use std::process::Output;
use std::time::Duration;

use kube::api::{ListParams, Patch, PatchParams};
use serde_json::{json, Value};

use charlm_e2e::cluster::{self, kubeconfig_path, plugin_binary};
use charlm_e2e::specs::{small_cpu, small_gpu};
use charlm_e2e::training_env::TestEnv;

/// Runs the plugin against the test namespace; `KUBECONFIG` names the plane, as for kubectl.
async fn plugin(env: &TestEnv, args: &[&str]) -> Output {
    let mut cmd = tokio::process::Command::new(plugin_binary());
    cmd.env("KUBECONFIG", kubeconfig_path())
        .args(["-n", &env.ns])
        .args(args)
        .kill_on_drop(true);
    tokio::time::timeout(Duration::from_secs(120), cmd.output())
        .await
        .expect("the plugin ends within 2 minutes")
        .expect("the plugin runs")
}

fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs the plugin and expects it to fail with `message` on stderr.
async fn refused(env: &TestEnv, args: &[&str], message: &str) -> String {
    let out = plugin(env, args).await;
    let (stdout, stderr) = text(&out);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{args:?}: stdout {stdout}\nstderr {stderr}"
    );
    assert!(
        stderr.contains(message),
        "{args:?}: expected {message:?} in\n{stderr}"
    );
    stderr
}

async fn training_with_status(env: &TestEnv, name: &str, status: Value) {
    env.apply(&small_cpu(name, 1).to_string()).await;
    env.trainings()
        .patch_status(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({ "status": status })),
        )
        .await
        .unwrap_or_else(|e| panic!("patching the status of {name}: {e}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_shows_progress_cost_and_the_loss_curve() {
    let env = TestEnv::new("plugin-status").await;
    training_with_status(
        &env,
        "curve",
        json!({
            "phase": "Running", "message": "all 1 workers train", "restarts": 1,
            "checkpointPvc": "curve-checkpoints",
            "latestCheckpoint": "/checkpoints/step-000000080",
            "bestValBpc": 2.1234, "bestStep": 60,
            "progress": {
                "step": 80, "totalStepsEstimate": 100, "trainLoss": 1.25, "valBpc": 2.2,
                "epoch": 0.25, "tokensPerS": 4743.0, "etaS": 51.0,
                "observedTime": jiff::Timestamp::now().to_string()
            },
            "usage": {"gpuHours": 0.0, "estimatedCost": 0.0, "pricePerGpuHour": 3.0},
            "lossHistory": [
                {"step": 10, "loss": 2.9}, {"step": 20, "loss": 2.4}, {"step": 40, "loss": 1.8},
                {"step": 60, "loss": 1.4}, {"step": 80, "loss": 1.25}
            ]
        }),
    )
    .await;
    let out = plugin(&env, &["status", "curve"]).await;
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    eprintln!("kubectl charlm status curve:\n{stdout}");
    for want in [
        format!("training   curve (namespace {})", env.ns),
        "phase      Running: all 1 workers train".to_string(),
        "progress   step 80 / 100 (80.0%)".to_string(),
        "latest     loss 1.2500 nats, val 2.2000 bpc, epoch 0.25".to_string(),
        "speed      4,743 tok/s".to_string(),
        "best       2.1234 bpc at step 60 (best/)".to_string(),
        "restarts   1 of 2 (restartPolicy.maxRestarts)".to_string(),
        "checkpoint /checkpoints/step-000000080 (claim curve-checkpoints)".to_string(),
        "training loss (nats per token)".to_string(),
    ] {
        assert!(
            stdout.lines().any(|l| l == want),
            "{want:?} missing from\n{stdout}"
        );
    }
    let eta = stdout.lines().find(|l| l.starts_with("eta")).unwrap();
    assert!(eta.ends_with("s left") && !eta.contains("unknown"), "{eta}");
    assert!(
        stdout.contains(" 2.9000 ┤█"),
        "the curve starts at the first loss:\n{stdout}"
    );
    assert!(
        stdout.contains(" 1.2500 ┤"),
        "and ends at the last:\n{stdout}"
    );
    assert!(stdout.contains("step 10"), "{stdout}");

    // kubectl itself finds it on PATH and runs it as `kubectl charlm`.
    let dir = plugin_binary().parent().unwrap().to_path_buf();
    let path = std::env::join_paths(std::iter::once(dir).chain(std::env::split_paths(
        &std::env::var_os("PATH").unwrap_or_default(),
    )))
    .unwrap();
    let out = tokio::process::Command::new(cluster::bin_dir().join("kubectl"))
        .env("KUBECONFIG", kubeconfig_path())
        .env("PATH", path)
        .args(["charlm", "-n", &env.ns, "status", "curve"])
        .output()
        .await
        .unwrap();
    let (via_kubectl, stderr) = text(&out);
    assert!(out.status.success(), "kubectl charlm: {stderr}");
    assert!(
        via_kubectl.contains("best       2.1234 bpc at step 60"),
        "{via_kubectl}"
    );

    // The context's namespace is the default, as in kubectl: without -n the training is not found.
    let mut cmd = tokio::process::Command::new(plugin_binary());
    let out = cmd
        .env("KUBECONFIG", kubeconfig_path())
        .args(["status", "curve"])
        .output()
        .await
        .unwrap();
    let (_, stderr) = text(&out);
    assert!(
        stderr.contains("no CharLMTraining curve in namespace default"),
        "{stderr}"
    );
    refused(
        &env,
        &["status", "nothere"],
        &format!("no CharLMTraining nothere in namespace {}", env.ns),
    )
    .await;
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sample_export_and_logs_say_what_is_missing() {
    let env = TestEnv::new("plugin-missing").await;

    // A training that has written nothing yet.
    training_with_status(&env, "fresh", json!({"phase": "Pending"})).await;
    for args in [
        &["sample", "fresh", "--prompt", "12+3"][..],
        &[
            "export",
            "fresh",
            "--to",
            env.dir.join("out").to_str().unwrap(),
        ][..],
    ] {
        refused(&env, args, "fresh has no checkpoint yet (phase Pending)").await;
    }
    refused(
        &env,
        &["logs", "fresh"],
        "worker 0 of fresh (fresh-worker-0) does not exist now (phase Pending)",
    )
    .await;

    // A checkpoint but no evaluation yet: sample reads the newest, export wants best/.
    training_with_status(
        &env,
        "early",
        json!({"phase": "Running", "latestCheckpoint": "/checkpoints/step-000000010"}),
    )
    .await;
    refused(
        &env,
        &[
            "export",
            "early",
            "--to",
            env.dir.join("out").to_str().unwrap(),
        ],
        "early has no best checkpoint yet",
    )
    .await;
    refused(
        &env,
        &["sample", "early"],
        "the checkpoint claim early-checkpoints of early is gone",
    )
    .await;

    // A best checkpoint whose claim was deleted.
    training_with_status(
        &env,
        "gone",
        json!({"phase": "Succeeded", "bestValBpc": 2.0, "bestStep": 100,
               "checkpointPvc": "gone-checkpoints"}),
    )
    .await;
    refused(
        &env,
        &["logs", "gone"],
        "worker 0 of gone (gone-worker-0) is gone: the operator deletes",
    )
    .await;
    for args in [
        &["sample", "gone", "--prompt", "1"][..],
        &[
            "export",
            "gone",
            "--to",
            env.dir.join("out").to_str().unwrap(),
        ][..],
    ] {
        refused(
            &env,
            args,
            "the checkpoint claim gone-checkpoints of gone is gone",
        )
        .await;
    }
    assert!(!env.dir.join("out/best").exists(), "nothing was written");

    // The claim is there but nothing tells the image: no worker pod, no spec.image.
    env.provide_read_only_claim("kept-checkpoints").await;
    training_with_status(
        &env,
        "kept",
        json!({"phase": "Succeeded", "bestValBpc": 2.0, "checkpointPvc": "kept-checkpoints"}),
    )
    .await;
    refused(
        &env,
        &["sample", "kept"],
        "cannot tell the trainer image of kept",
    )
    .await;

    // With an image, a helper pod starts; on a fake node it never finishes, and at the timeout it
    // is deleted and the error says what it waited for.
    let stderr = refused(
        &env,
        &[
            "sample",
            "kept",
            "--image",
            "charlm-trainer:e2e",
            "--timeout",
            "5",
        ],
        "did not finish within 5s (--timeout)",
    )
    .await;
    assert!(stderr.contains("the helper pod kept-sample-"), "{stderr}");
    env.wait(
        "the sample pod to be deleted",
        Duration::from_secs(60),
        || {
            let pods = env.pods();
            async move {
                let left = pods
                    .list(&ListParams::default().labels("charlm.dev/helper-of=kept"))
                    .await
                    .map_err(|e| e.to_string())?;
                match left.items.len() {
                    0 => Ok(Some(())),
                    n => Err(format!("{n} helper pods left")),
                }
            }
        },
    )
    .await;
    env.finish().await;
}

/// With the operator: a report of worker 0 becomes a point of `status.lossHistory`, which the
/// plugin shows; the operator's per-training gauges carry the training and go with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_report_reaches_the_loss_history_and_the_training_gauges() {
    let mut env = TestEnv::new("plugin-live").await;
    let op = env.start_operator("operator-1").await;
    env.apply(&small_gpu("live", 1).to_string()).await;
    env.wait_phase("live", charlm_api::Phase::Running, Duration::from_secs(60))
        .await;
    env.serve_progress_as("live-worker-0", r#"{"step": 40, "total_steps_estimate": 100, "tokens": 10240, "epoch": 0.1, "train_loss": 1.75, "elapsed_s": 30.0, "eta_s": 45.0, "world_size": 1, "complete": false}"#)
        .await;
    // Polls come at most every 25 s, with a requeue every 30 s while running.
    let t = env
        .wait_training(
            "live",
            "a point of the loss curve",
            Duration::from_secs(75),
            |t| {
                t.status
                    .as_ref()
                    .is_some_and(|s| !s.loss_history.is_empty())
            },
        )
        .await;
    let history = t.status.unwrap().loss_history;
    assert_eq!(
        (history[0].step, history[0].loss),
        (40, 1.75),
        "{history:?}"
    );

    let out = plugin(&env, &["status", "live"]).await;
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    for want in [
        "progress   step 40 / 100 (40.0%)",
        "latest     loss 1.7500 nats, epoch 0.10",
        "training loss: one point so far; the curve needs two",
    ] {
        assert!(
            stdout.lines().any(|l| l == want),
            "{want:?} missing from\n{stdout}"
        );
    }

    let labels = format!(r#"{{training_namespace="{}",training="live"}}"#, env.ns);
    let (code, metrics) = env.operators[op].get("/metrics").await.unwrap();
    assert_eq!(code, 200);
    for name in [
        "charlm_operator_training_restarts",
        "charlm_operator_training_gpu_hours",
        "charlm_operator_training_estimated_cost",
    ] {
        assert!(
            metrics.contains(&format!("{name}{labels} ")),
            "{name}{labels} missing from\n{metrics}"
        );
    }
    assert!(
        metrics.contains(&format!("charlm_operator_training_restarts{labels} 0\n")),
        "{metrics}"
    );

    env.trainings()
        .delete("live", &Default::default())
        .await
        .unwrap();
    let operator = &env.operators[op];
    env.wait(
        "the training's gauges to go",
        Duration::from_secs(60),
        || async {
            let (_, metrics) = operator.get("/metrics").await.map_err(|e| e.to_string())?;
            if metrics.contains(r#"training="live""#) {
                Err("still exported".to_string())
            } else {
                Ok(Some(()))
            }
        },
    )
    .await;
    env.finish().await;
}
