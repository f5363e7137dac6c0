//! Failures that used to reach no status (issue 28, part 4): containers the kubelet cannot start
//! (an image it cannot pull, an image name it cannot parse, a Secret that does not exist), an
//! init container out of memory, a worker pod deleted by hand, and DatasetReady while nothing
//! prepares the dataset. Each is said in the training's conditions and Events within seconds.
//! The tests play the kubelet of these pods (`specs::kubelet_played_by_test`): kwok's fake nodes
//! start no container. Needs `e2e/controlplane/up`.

use std::time::{Duration, Instant};

use k8s_openapi::api::events::v1::Event;
use kube::api::{DeleteParams, Patch, PatchParams};
use kube::ResourceExt;
use serde_json::{json, Value};

use charlm_api::{CharLMTraining, Phase};
use charlm_e2e::specs::{
    condition, container_state, ended, events_of, kubelet_played_by_test, small_cpu,
    trainer_running, waiting,
};
use charlm_e2e::training_env::TestEnv;

const MINUTE: Duration = Duration::from_secs(60);
/// "Within seconds": from the kubelet's status to the training's condition.
const SAY_IT_WITHIN: Duration = Duration::from_secs(10);

/// The pod's status as a kubelet writes it while the pod waits (phase Pending).
fn pending(init: &[Value], trainer: Value) -> Value {
    json!({"phase": "Pending", "initContainerStatuses": init, "containerStatuses": [trainer]})
}

fn pod_initializing(container: &str) -> Value {
    container_state(container, waiting("PodInitializing", ""))
}

/// The condition of `type_`: (status, reason, message).
fn condition_of(t: &CharLMTraining, type_: &str) -> (String, String, String) {
    let c = t
        .status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == type_))
        .unwrap_or_else(|| panic!("no condition {type_} in {:?}", t.status));
    (c.status.clone(), c.reason.clone(), c.message.clone())
}

/// Waits (30 s at most: the recorder publishes after the status patch) for an Event about
/// `training` of `type_` and `reason` whose note contains `needle`.
async fn wait_event(env: &TestEnv, training: &str, type_: &str, reason: &str, needle: &str) {
    env.wait(
        &format!("a {type_} event {reason} about {training} naming {needle:?}"),
        Duration::from_secs(30),
        || async {
            let events: Vec<Event> = events_of(env, training).await;
            let found = events.iter().any(|e| {
                e.type_.as_deref() == Some(type_)
                    && e.reason.as_deref() == Some(reason)
                    && e.note.as_deref().is_some_and(|n| n.contains(needle))
            });
            if found {
                Ok(Some(()))
            } else {
                let seen: Vec<_> = events
                    .iter()
                    .map(|e| (e.type_.clone(), e.reason.clone(), e.note.clone()))
                    .collect();
                Err(format!("{seen:?}"))
            }
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containers_that_cannot_start_say_why_at_once_and_count_for_the_startup_timeout() {
    let mut env = TestEnv::new("nostart").await;
    env.start_operator("operator-1").await;

    let mut pull = kubelet_played_by_test(small_cpu("pull", 1));
    pull["spec"]["image"] = json!("127.0.0.1:1/charlm/trainer:missing");
    pull["spec"]["startupTimeoutSeconds"] = json!(20);
    let mut badname = kubelet_played_by_test(small_cpu("badname", 1));
    badname["spec"]["image"] = json!("Charlm/Trainer:e2e");
    let mut nosecret = kubelet_played_by_test(small_cpu("nosecret", 1));
    nosecret["spec"]["env"] = json!([{"name": "WANDB_API_KEY",
        "valueFrom": {"secretKeyRef": {"name": "wandb", "key": "key"}}}]);
    // Placed nowhere: nothing prepares its dataset.
    let mut nowhere = small_cpu("nowhere", 1);
    nowhere["spec"]["nodeSelector"] = json!({"charlm.dev/e2e-node": "none-such"});
    for manifest in [&pull, &badname, &nosecret, &nowhere] {
        env.apply(&manifest.to_string()).await;
    }
    for name in ["pull", "badname", "nosecret"] {
        env.bound_workers(name, 1, 0).await;
    }

    // The kubelet cannot pull the image: its first init container waits.
    let pull_error = "failed to pull and unpack image \"127.0.0.1:1/charlm/trainer:missing\": \
                      failed to resolve reference: dial tcp 127.0.0.1:1: connect: connection refused";
    let said = Instant::now();
    env.set_pod_status(
        "pull-worker-0",
        pending(
            &[
                container_state("generate", waiting("ErrImagePull", pull_error)),
                pod_initializing("prepare"),
            ],
            pod_initializing("trainer"),
        ),
    )
    .await;
    let t = env
        .wait_training("pull", "PodsReady=False/ErrImagePull", SAY_IT_WITHIN, |t| {
            condition(t, "PodsReady").1 == "ErrImagePull"
        })
        .await;
    eprintln!("ErrImagePull reached the status in {:?}", said.elapsed());
    let message = t.status.as_ref().unwrap().message.clone().unwrap();
    assert!(
        message.contains("pull-worker-0: container generate cannot start: ErrImagePull")
            && message.contains("connection refused")
            && message.contains("20s after they were created (startupTimeoutSeconds)"),
        "{message}"
    );
    assert_eq!(
        condition(&t, "Running"),
        ("False".into(), "ErrImagePull".into())
    );
    let (status, reason, dataset) = condition_of(&t, "DatasetReady");
    assert_eq!(
        (status.as_str(), reason.as_str()),
        ("Unknown", "WaitingForWorkers")
    );
    assert!(!dataset.contains("prepare the dataset"), "{dataset}");
    wait_event(
        &env,
        "pull",
        "Warning",
        "ErrImagePull",
        "connection refused",
    )
    .await;
    // Its back-off, in the kubelet's words too.
    env.set_pod_status(
        "pull-worker-0",
        pending(
            &[
                container_state(
                    "generate",
                    waiting(
                        "ImagePullBackOff",
                        "Back-off pulling image \"127.0.0.1:1/charlm/trainer:missing\"",
                    ),
                ),
                pod_initializing("prepare"),
            ],
            pod_initializing("trainer"),
        ),
    )
    .await;
    env.wait_training(
        "pull",
        "PodsReady=False/ImagePullBackOff",
        SAY_IT_WITHIN,
        |t| condition(t, "PodsReady").1 == "ImagePullBackOff",
    )
    .await;

    // A name the runtime cannot parse: no retry helps, the training fails at once.
    let parse_error = "Failed to apply default image tag \"Charlm/Trainer:e2e\": couldn't parse \
                       image name \"Charlm/Trainer:e2e\": invalid reference format: repository \
                       name (Charlm/Trainer) must be lowercase";
    env.set_pod_status(
        "badname-worker-0",
        pending(
            &[
                container_state("generate", waiting("InvalidImageName", parse_error)),
                pod_initializing("prepare"),
            ],
            pod_initializing("trainer"),
        ),
    )
    .await;
    let t = env
        .wait_phase("badname", Phase::Failed, SAY_IT_WITHIN)
        .await;
    assert_eq!(
        condition(&t, "Failed"),
        ("True".into(), "InvalidImageName".into())
    );
    let status = t.status.clone().unwrap();
    let message = status.message.clone().unwrap();
    assert!(
        message.contains("must be lowercase") && message.contains("fix spec.image"),
        "{message}"
    );
    assert_eq!((status.restarts, status.startup_timeouts), (0, 0));
    assert_eq!(
        condition(&t, "DatasetReady"),
        ("False".into(), "NotPrepared".into())
    );
    wait_event(
        &env,
        "badname",
        "Warning",
        "InvalidImageName",
        "fix spec.image",
    )
    .await;

    // A Secret that does not exist holds the trainer back after the dataset was prepared.
    env.set_pod_status(
        "nosecret-worker-0",
        pending(
            &[
                container_state("generate", ended(0, "Completed", "")),
                container_state("prepare", ended(0, "Completed", "")),
            ],
            container_state(
                "trainer",
                waiting("CreateContainerConfigError", "secret \"wandb\" not found"),
            ),
        ),
    )
    .await;
    let t = env
        .wait_training(
            "nosecret",
            "PodsReady=False/CreateContainerConfigError",
            SAY_IT_WITHIN,
            |t| condition(t, "PodsReady").1 == "CreateContainerConfigError",
        )
        .await;
    let message = t.status.as_ref().unwrap().message.clone().unwrap();
    assert!(
        message.contains(
            "nosecret-worker-0: container trainer cannot start: CreateContainerConfigError: \
             secret \"wandb\" not found"
        ),
        "{message}"
    );
    assert_eq!(
        condition(&t, "DatasetReady"),
        ("True".into(), "Prepared".into())
    );
    wait_event(
        &env,
        "nosecret",
        "Warning",
        "CreateContainerConfigError",
        "secret \"wandb\" not found",
    )
    .await;

    // Unplaced: DatasetReady does not claim that anyone prepares it.
    let t = env
        .wait_training("nowhere", "PodsReady=False/Unschedulable", MINUTE, |t| {
            condition(t, "PodsReady").1 == "Unschedulable"
        })
        .await;
    let (status, reason, message) = condition_of(&t, "DatasetReady");
    assert_eq!(
        (status.as_str(), reason.as_str()),
        ("Unknown", "WaitingForWorkers")
    );
    assert!(message.contains("0/1 workers prepared it"), "{message}");

    // The startup timeout counts the worker whose container never started: released, not
    // counted as a restart, and said with the kubelet's reason.
    let t = env
        .wait_training("pull", "a startup timeout", MINUTE, |t| {
            t.status.as_ref().is_some_and(|s| s.startup_timeouts >= 1)
        })
        .await;
    let status = t.status.clone().unwrap();
    assert_eq!(status.restarts, 0);
    assert_eq!(
        condition(&t, "PodsReady"),
        ("False".into(), "StartupTimeout".into())
    );
    let message = status.message.unwrap();
    assert!(
        message.contains("not every worker was placed and started within 20s")
            && message.contains("pull-worker-0: container generate cannot start: ImagePullBackOff")
            && message.contains("not counted as a restart"),
        "{message}"
    );
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_init_container_out_of_memory_names_itself_and_its_memory() {
    let mut env = TestEnv::new("initoom").await;
    env.start_operator("operator-1").await;
    env.apply(&kubelet_played_by_test(small_cpu("genoom", 1)).to_string())
        .await;
    env.bound_workers("genoom", 1, 0).await;
    env.set_pod_status(
        "genoom-worker-0",
        json!({
            "phase": "Failed",
            "initContainerStatuses": [
                container_state("generate", ended(137, "OOMKilled", "")),
                pod_initializing("prepare"),
            ],
            "containerStatuses": [pod_initializing("trainer")]
        }),
    )
    .await;
    let t = env.wait_phase("genoom", Phase::Failed, SAY_IT_WITHIN).await;
    assert_eq!(condition(&t, "Failed"), ("True".into(), "OOMKilled".into()));
    let message = t.status.clone().unwrap().message.unwrap();
    assert!(
        message.contains("container generate exited with code 137 (OOMKilled)")
            && message.contains("the init container generate ran out of memory")
            && message.contains("raise the memory limit in spec.resources.limits.memory")
            && !message.contains("lower spec.deviceBatchSize"),
        "{message}"
    );
    let (status, reason, dataset) = condition_of(&t, "DatasetReady");
    assert_eq!(
        (status.as_str(), reason.as_str()),
        ("False", "PreparationFailed")
    );
    assert!(dataset.contains("container generate"), "{dataset}");
    env.finish().await;
}

/// `kubectl delete pod` of a running worker: its trainer saves a checkpoint on SIGTERM, and the
/// gang restarts from it without spending a restart (maxRestarts 0 here, so a counted one would
/// fail the training).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_deleted_by_hand_restarts_the_gang_without_counting() {
    let mut env = TestEnv::new("byhand").await;
    env.start_operator("operator-1").await;
    let mut manifest = kubelet_played_by_test(small_cpu("byhand", 2));
    manifest["spec"]["restartPolicy"] = json!({"maxRestarts": 0, "backoffSeconds": 2});
    env.apply(&manifest.to_string()).await;
    for (pod, _) in env.bound_workers("byhand", 2, 0).await {
        env.set_pod_status(&pod, trainer_running()).await;
    }
    env.wait_phase("byhand", Phase::Running, MINUTE).await;

    // A graceful delete: the pod stays, terminating, while its trainer stops.
    env.pods()
        .delete("byhand-worker-0", &DeleteParams::default())
        .await
        .unwrap();
    let t = env
        .wait_training("byhand", "a second attempt", SAY_IT_WITHIN, |t| {
            t.status.as_ref().is_some_and(|s| s.attempt == 1)
        })
        .await;
    let status = t.status.clone().unwrap();
    assert_eq!(status.phase, Some(Phase::Restarting), "{status:?}");
    assert_eq!((status.restarts, status.failures.deleted), (0, 1));
    assert_eq!(status.failures.error, 0);
    let (_, reason, message) = condition_of(&t, "Restarting");
    assert_eq!(reason, "WorkerLost");
    assert!(
        message.contains("byhand-worker-0: deleted while the training ran")
            && message.contains("not counted against maxRestarts"),
        "{message}"
    );
    wait_event(
        &env,
        "byhand",
        "Warning",
        "Deleted",
        "RestartWithoutCounting",
    )
    .await;

    // The trainer saved a checkpoint on SIGTERM and exited 0; worker 1, deleted by the operator,
    // stopped too. Then the next attempt runs, still without a restart counted.
    let report = r#"{"step": 42, "checkpoint": "/checkpoints/step-000000042", "complete": false, "stop_reason": "signal"}"#;
    let mut stopped = trainer_running();
    stopped["containerStatuses"] =
        json!([container_state("trainer", ended(0, "Completed", report))]);
    env.set_pod_status("byhand-worker-0", stopped.clone()).await;
    stopped["containerStatuses"] = json!([container_state("trainer", ended(0, "Completed", ""))]);
    env.set_pod_status("byhand-worker-1", stopped).await;
    for (pod, _) in env.bound_workers("byhand", 2, 1).await {
        env.set_pod_status(&pod, trainer_running()).await;
    }
    let t = env.wait_phase("byhand", Phase::Running, MINUTE).await;
    let status = t.status.unwrap();
    assert_eq!((status.restarts, status.attempt), (0, 1));
    stop_played_training(&env, "byhand").await;
    env.finish().await;
}

/// Deletes a training whose pods the test plays and ends their trainers, as a kubelet would
/// after the SIGTERM, so that no pod stays terminating after the test.
async fn stop_played_training(env: &TestEnv, name: &str) {
    env.trainings()
        .delete(name, &DeleteParams::default())
        .await
        .unwrap();
    env.wait(&format!("{name}: gone"), MINUTE, || async {
        let pods = env.workers(name).await;
        for p in &pods {
            if p.metadata.deletion_timestamp.is_some() {
                let mut stopped = trainer_running();
                stopped["containerStatuses"] =
                    json!([container_state("trainer", ended(0, "Completed", ""))]);
                // The pod may be gone meanwhile: that is the point.
                let _ = env
                    .pods()
                    .patch_status(
                        &p.name_any(),
                        &PatchParams::default(),
                        &Patch::Merge(json!({ "status": stopped })),
                    )
                    .await;
            }
        }
        let training = env
            .trainings()
            .get_opt(name)
            .await
            .map_err(|e| e.to_string())?;
        match (pods.len(), training) {
            (0, None) => Ok(Some(())),
            (n, t) => Err(format!("{n} pods left, training there: {}", t.is_some())),
        }
    })
    .await;
}
