//! Progress, presets and cost: worker 0's report in the status and `kubectl get`, presets filling a spec, GPU-hours and cost.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn progress_of_worker_zero_reaches_the_status() {
    let mut env = TestEnv::new("progress").await;
    env.start_operator("operator-1").await;
    start_training(&env, &small_gpu("live", 1)).await;
    // kwok's pod addresses lead nowhere; point worker 0 at a stand-in for the trainer's endpoint
    // on the contract's port.
    env.serve_progress_as("live-worker-0", r#"{"step": 1200, "total_steps_estimate": 9000, "tokens": 629145600, "epoch": 1.8, "train_loss": 0.92, "val_bpc": 1.31, "best_val_bpc": 1.30, "best_step": 1000, "tokens_per_s": 105000.0, "mfu": 0.53, "elapsed_s": 5990.0, "eta_s": 51600.0, "checkpoint": "/checkpoints/step-000001200", "world_size": 1, "complete": false}"#)
        .await;
    // Polls come at most every 25 s, with a requeue every 30 s while running.
    let t = env
        .wait_training(
            "live",
            "progress in the status",
            Duration::from_secs(75),
            |t| {
                t.status
                    .as_ref()
                    .and_then(|s| s.progress.as_ref())
                    .is_some_and(|p| p.step == 1200)
            },
        )
        .await;
    let status = t.status.unwrap();
    let p = status.progress.unwrap();
    assert_eq!(p.tokens, 629145600);
    assert_eq!(
        (p.train_loss, p.val_bpc, p.mfu),
        (Some(0.92), Some(1.31), Some(0.53))
    );
    assert!(p.observed_time.is_some());
    assert_eq!(status.eta.as_deref(), Some("14h20m"));
    assert_eq!(
        status.latest_checkpoint.as_deref(),
        Some("/checkpoints/step-000001200")
    );
    let table = tool(
        "kubectl",
        &["get", "clt", "live", "-n", &env.ns, "--no-headers"],
    )
    .unwrap();
    let columns: Vec<&str> = table.split_whitespace().collect();
    assert_eq!(
        &columns[..7],
        ["live", "Running", "2", "1", "1200", "0.92", "14h20m"],
        "{table}"
    );
    env.finish().await;
}

/// The cells of a one-row `kubectl get` table by column name; empty cells stay empty (the
/// columns are aligned, so the header's offsets cut the row).
fn printed_row(table: &str) -> BTreeMap<String, String> {
    let mut lines = table.lines();
    let header = lines.next().unwrap();
    let row = lines
        .next()
        .unwrap_or_else(|| panic!("no row in {table:?}"));
    let starts: Vec<(usize, &str)> = header
        .match_indices(|c: char| !c.is_whitespace())
        .filter(|(i, _)| *i == 0 || header[..*i].ends_with(' '))
        .map(|(i, _)| (i, header[i..].split_whitespace().next().unwrap()))
        .collect();
    starts
        .iter()
        .enumerate()
        .map(|(k, (start, name))| {
            let end = starts.get(k + 1).map_or(row.len(), |(next, _)| *next);
            let cell = row.get(*start..end.min(row.len())).unwrap_or("");
            (name.to_string(), cell.trim().to_string())
        })
        .collect()
}

/// A running trainer container whose kubelet says it started at `started_at` (RFC 3339).
fn running_since(started_at: &str) -> Value {
    json!([{
        "name": "trainer", "image": "charlm-trainer:e2e", "imageID": "", "ready": true,
        "restartCount": 0, "started": true,
        "state": {"running": {"startedAt": started_at}}
    }])
}

/// A Unix time in seconds as Kubernetes writes times (RFC 3339).
fn at_second(second: i64) -> String {
    jiff::Timestamp::from_second(second).unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_preset_fills_the_spec_and_explicit_fields_win() {
    let mut env = TestEnv::new("preset").await;
    env.start_operator("operator-1").await;
    env.provide_read_only_claim("charlm-texts").await;

    // The example as the README shows it: budget-100 with early stop and TensorBoard.
    let manifest = example("budget-100.yaml");
    let applied = env.apply(&manifest.to_string()).await;
    assert_eq!(
        (applied.spec.depth, applied.spec.gpus),
        (None, None),
        "the object stays as written"
    );
    let t = env
        .wait_phase("charlm-budget-100", Phase::Running, MINUTE)
        .await;
    let status = t.status.clone().unwrap();
    let effective = status.effective.clone().unwrap();
    assert_eq!(
        (
            effective.depth,
            effective.gpus,
            effective.workers,
            effective.hours
        ),
        (24, 2, 1, Some(16.0))
    );
    assert_eq!(effective.device_batch_size, DeviceBatchSize::Fixed(8));
    assert_eq!(
        (effective.early_stop_patience, effective.tensorboard),
        (Some(8), true)
    );
    let usage = status.usage.clone().unwrap();
    assert_eq!(usage.price_per_gpu_hour, 3.0);

    let nodes = nodes_by_name(&env).await;
    let pods = env.workers("charlm-budget-100").await;
    assert_eq!(pods.len(), 1);
    let spec = pods[0].spec.as_ref().unwrap();
    assert!(is_h100(&nodes[spec.node_name.as_ref().unwrap()]));
    let limits = spec.containers[0]
        .resources
        .as_ref()
        .unwrap()
        .limits
        .clone()
        .unwrap();
    assert_eq!(limits["nvidia.com/gpu"].0, "2");
    let vars = env_of(&pods[0]);
    for (name, want) in [
        ("CHARLM_DEPTH", "24"),
        ("CHARLM_HOURS", "16"),
        ("CHARLM_DEVICE_BATCH_SIZE", "8"),
        ("NPROC_PER_NODE", "2"),
        ("NNODES", "1"),
        ("CHARLM_EARLY_STOP_PATIENCE", "8"),
        ("CHARLM_TENSORBOARD_DIR", "/checkpoints/tensorboard"),
    ] {
        assert_eq!(vars.get(name).map(String::as_str), Some(want), "{name}");
    }
    let annotations = pods[0].annotations();
    assert_eq!(annotations["prometheus.io/scrape"], "true");
    assert_eq!(annotations["prometheus.io/port"], "9090");
    let svc = env
        .services()
        .get("charlm-budget-100-workers")
        .await
        .unwrap();
    assert!(svc
        .spec
        .unwrap()
        .ports
        .unwrap()
        .iter()
        .any(|p| p.name.as_deref() == Some("metrics") && p.port == 9090));

    let table = tool(
        "kubectl",
        &[
            "get",
            "clt",
            "charlm-budget-100",
            "-n",
            &env.ns,
            "-o",
            "wide",
        ],
    )
    .unwrap();
    let cells = printed_row(&table);
    let column = |name: &str| cells[name].as_str();
    assert_eq!(
        (column("DEPTH"), column("GPUS"), column("PRESET")),
        ("24", "2", "budget-100"),
        "{table}"
    );

    // budget-1000 with an explicit depth: the depth is ours, the rest the preset's.
    let mut own = small_gpu("mine", 1);
    let spec = own["spec"].as_object_mut().unwrap();
    for field in ["gpus", "gpusPerNode", "maxSteps"] {
        spec.remove(field);
    }
    own["spec"]["preset"] = json!("budget-1000");
    own["spec"]["depth"] = json!(12);
    let t = start_training(&env, &own).await;
    let effective = t.status.unwrap().effective.unwrap();
    assert_eq!(
        (effective.depth, effective.gpus, effective.hours),
        (12, 8, Some(31.0))
    );
    let pods = env.workers("mine").await;
    let vars = env_of(&pods[0]);
    assert_eq!(
        (
            vars["CHARLM_DEPTH"].as_str(),
            vars["CHARLM_DEVICE_BATCH_SIZE"].as_str()
        ),
        ("12", "4")
    );
    assert_eq!(vars["NPROC_PER_NODE"], "8");
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_shows_the_best_validation_gpu_hours_and_cost() {
    let mut env = TestEnv::new("usage").await;
    env.options.extra_args = vec!["--price-per-gpu-hour=2.5".into()];
    env.start_operator("operator-1").await;
    // Two workers of one GPU each; their trainers started two hours ago, by their kubelets' word.
    start_training(&env, &small_gpu("costly", 2)).await;
    let start_second = jiff::Timestamp::now().as_second() - 7200;
    let started = at_second(start_second);
    for pod in ["costly-worker-0", "costly-worker-1"] {
        env.set_pod_status(pod, json!({"containerStatuses": running_since(&started)}))
            .await;
    }
    let t = env
        .wait_training(
            "costly",
            "two hours of 2 GPUs counted",
            Duration::from_secs(40),
            |t| {
                t.status
                    .as_ref()
                    .and_then(|s| s.usage.as_ref())
                    .is_some_and(|u| u.gpu_hours >= 4.0)
            },
        )
        .await;
    let usage = t.status.unwrap().usage.unwrap();
    assert!(usage.gpu_hours < 4.1, "{usage:?}");
    assert_eq!(usage.price_per_gpu_hour, 2.5);
    assert_eq!(
        usage.estimated_cost,
        (usage.gpu_hours * 2.5 * 100.0).round() / 100.0,
        "{usage:?}"
    );

    // Worker 0 stops early; its report carries the best validation and the epochs.
    let report = r#"{"step": 4000, "tokens": 4096000, "epoch": 3.5, "train_loss": 0.8, "val_bpc": 1.31, "best_val_bpc": 1.25, "best_step": 3000, "elapsed_s": 7200.0, "checkpoint": "/checkpoints/step-000004000", "world_size": 2, "tokens_per_epoch": 1170285, "complete": true, "stop_reason": "early_stop"}"#;
    let finished = at_second(start_second + 7200);
    env.set_pod_status(
        "costly-worker-0",
        json!({"phase": "Succeeded", "containerStatuses": [{
            "name": "trainer", "image": "charlm-trainer:e2e", "imageID": "", "ready": false,
            "restartCount": 0,
            "state": {"terminated": {"exitCode": 0, "reason": "Completed", "message": report,
                                     "startedAt": started, "finishedAt": finished}}
        }]}),
    )
    .await;
    let t = env
        .wait_phase("costly", Phase::Succeeded, Duration::from_secs(30))
        .await;
    assert_eq!(
        condition(&t, "Succeeded"),
        ("True".into(), "EarlyStopped".into())
    );
    let status = t.status.clone().unwrap();
    assert_eq!(
        (status.best_val_bpc, status.best_step),
        (Some(1.25), Some(3000))
    );
    let progress = status.progress.clone().unwrap();
    assert_eq!(
        (progress.epoch, progress.tokens_per_epoch),
        (3.5, Some(1170285))
    );
    assert_eq!(progress.stop_reason.as_deref(), Some("early_stop"));
    assert!(
        status
            .message
            .as_deref()
            .unwrap()
            .contains("best 1.2500 at step 3000"),
        "{:?}",
        status.message
    );
    // Ended: 2 GPUs from the trainers' start to worker 0's end, exactly two hours.
    let usage = status.usage.clone().unwrap();
    assert_eq!(
        (usage.gpu_hours, usage.estimated_cost),
        (4.0, 10.0),
        "{usage:?}"
    );
    assert!(usage.training_since.is_none());

    let table = tool(
        "kubectl",
        &["get", "clt", "costly", "-n", &env.ns, "-o", "wide"],
    )
    .unwrap();
    let cells = printed_row(&table);
    let column = |name: &str| cells[name].as_str();
    assert_eq!(
        (
            column("COST"),
            column("BESTBPC"),
            column("GPUHOURS"),
            column("EPOCH")
        ),
        ("10", "1.25", "4", "3.5"),
        "{table}"
    );

    // Later reconciles keep all of it.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let again = env.trainings().get("costly").await.unwrap().status.unwrap();
    assert_eq!(again.usage, status.usage);
    assert_eq!(again.best_val_bpc, Some(1.25));
    env.finish().await;
}
