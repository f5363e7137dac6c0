//! Bad input on the real control plane (issue 12): every spec the API server can judge is
//! refused at `kubectl apply` with a message that names the field and the fix (and nothing else);
//! what only a pod or a claim reveals fails the training once, `Failed/InvalidSpec` with the API
//! server's own message, the field and an Event, and then stays put; the status describes what
//! runs; and a gang that cannot be placed lets go of what it holds. Needs `e2e/controlplane/up`.

use std::time::Duration;

use kube::api::{ListParams, Patch, PatchParams};
use serde_json::{json, Value};

use charlm_api::{CharLMTraining, Phase};
use charlm_e2e::cluster;
use charlm_e2e::specs::{
    assert_refused, condition, events_of, small_cpu, small_gpu, terminated, Mutation,
};
use charlm_e2e::training_env::TestEnv;

const MINUTE: Duration = Duration::from_secs(60);

/// The messages of rules that did not apply, or a field the API server could not name: noise
/// that hid the one message that mattered.
const NOISE: [&str; 3] = [
    "modulus by zero",
    "some validation rules were not checked",
    "<nil>",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_apply_refuses_what_a_pod_or_claim_would_refuse_and_names_the_fix() {
    let env = TestEnv::new("refused").await;
    let base = small_cpu("bad", 1);
    let cases: Vec<(&str, Mutation, &str)> = vec![
        (
            "an env entry without a name",
            Box::new(|v| v["spec"]["env"] = json!([{"name": "", "value": "x"}])),
            "spec.env: Required value: every spec.env entry needs a name",
        ),
        (
            "a reserved env name",
            Box::new(|v| v["spec"]["env"] = json!([{"name": "RANK", "value": "3"}])),
            "spec.env: Forbidden: spec.env must not set NNODES, NODE_RANK",
        ),
        (
            "the gang's address in env",
            Box::new(|v| v["spec"]["env"] = json!([{"name": "MASTER_ADDR", "value": "x"}])),
            "the operator sets them for the gang",
        ),
        (
            "a cpu request that is no quantity",
            Box::new(|v| v["spec"]["resources"] = json!({"requests": {"cpu": "abc"}})),
            "spec.resources: Invalid value: resources.requests and resources.limits must be quantities",
        ),
        (
            "a negative memory limit",
            Box::new(|v| v["spec"]["resources"] = json!({"limits": {"memory": "-1Gi"}})),
            "must be quantities of at least 0",
        ),
        (
            "a toleration operator Foo",
            Box::new(|v| v["spec"]["tolerations"] = json!([{"key": "a", "operator": "Foo"}])),
            "spec.tolerations: Invalid value: tolerations[].operator must be Exists or Equal",
        ),
        (
            "a toleration effect Sometimes",
            Box::new(|v| v["spec"]["tolerations"] = json!([{"key": "a", "effect": "Sometimes"}])),
            "tolerations[].effect must be NoSchedule, PreferNoSchedule or NoExecute",
        ),
        (
            "checkpoint.size abc",
            Box::new(|v| v["spec"]["checkpoint"]["size"] = json!("abc")),
            r#"spec.checkpoint.size: Invalid value: "abc": checkpoint.size must be a positive quantity"#,
        ),
        (
            "checkpoint.size -5Gi",
            Box::new(|v| v["spec"]["checkpoint"]["size"] = json!("-5Gi")),
            r#"spec.checkpoint.size: Invalid value: "-5Gi": checkpoint.size must be a positive quantity"#,
        ),
        (
            "gpusPerNode 0",
            Box::new(|v| v["spec"]["gpusPerNode"] = json!(0)),
            "spec.gpusPerNode: Invalid value: 0: gpusPerNode must be between 1 and 64",
        ),
        (
            "no dataset at all",
            Box::new(|v| {
                v["spec"].as_object_mut().unwrap().remove("dataset");
            }),
            "spec: Required value: spec.dataset is required: set one of dataset.pvc",
        ),
        (
            "a name with capitals",
            Box::new(|v| v["metadata"]["name"] = json!("Bad-Name")),
            "metadata.name: Invalid value: \"Bad-Name\": metadata.name must be at most 40 characters",
        ),
        // Once stored, a '/' made the operator's GET of the claim a subresource request (403).
        (
            "a claim name with a slash",
            Box::new(|v| v["spec"]["dataset"] = json!({"pvc": {"claimName": "texts/status"}})),
            "spec.dataset.pvc.claimName: Invalid value: \"texts/status\": dataset.pvc.claimName \
             must be the name of a PersistentVolumeClaim in the training's namespace",
        ),
        (
            "a ConfigMap name with capitals",
            Box::new(|v| v["spec"]["dataset"] = json!({"configMap": {"name": "My_Texts"}})),
            "spec.dataset.configMap.name: Invalid value: \"My_Texts\": dataset.configMap.name \
             must be the name of a ConfigMap",
        ),
        // Accepted, it failed only at the container's start ("argument list too long").
        (
            "an env value of 200 KB",
            Box::new(|v| v["spec"]["env"] = json!([{"name": "BIG", "value": "x".repeat(200_000)}])),
            "spec.env: Invalid value: each spec.env value must be at most 32000 characters: Linux \
             refuses to start the trainer with an environment string of 128 KiB or more",
        ),
        (
            "env values of 150 KB in all",
            Box::new(|v| {
                let big: Vec<Value> = (0..5)
                    .map(|i| json!({"name": format!("PART_{i}"), "value": "y".repeat(30_000)}))
                    .collect();
                v["spec"]["env"] = json!(big);
            }),
            "spec.env: Invalid value: the spec.env values must be at most 128000 characters in all",
        ),
    ];
    for (what, text) in assert_refused(&env, &base, &cases).await {
        for noise in NOISE {
            assert!(!text.contains(noise), "{what}: {noise:?} in {text:?}");
        }
    }

    // Fixed at creation: what defines the model, and the checkpoint volume's class either way.
    let mut stored = base.clone();
    stored["spec"]["seqLen"] = json!(64);
    cluster::apply_yaml(&env.admin, &env.ns, &stored.to_string())
        .await
        .unwrap();
    let changes: Vec<(&str, Mutation, &str)> = vec![
        (
            "depth",
            Box::new(|v| v["spec"]["depth"] = json!(3)),
            "spec: Forbidden: depth cannot change after creation: the checkpoints hold a model of the first shape",
        ),
        (
            "seqLen",
            Box::new(|v| v["spec"]["seqLen"] = json!(128)),
            "seqLen cannot change after creation",
        ),
        (
            "seqLen removed",
            Box::new(|v| {
                v["spec"].as_object_mut().unwrap().remove("seqLen");
            }),
            "seqLen cannot change after creation",
        ),
        (
            "a preset added",
            Box::new(|v| v["spec"]["preset"] = json!("budget-100")),
            "preset cannot change after creation",
        ),
        (
            "a storage class set where none was",
            Box::new(|v| v["spec"]["checkpoint"]["storageClassName"] = json!("other")),
            "spec.checkpoint: Forbidden: checkpoint.storageClassName cannot be set, unset or changed",
        ),
    ];
    assert_refused(&env, &stored, &changes).await;
    // And a class set at creation cannot be unset.
    let mut classed = small_cpu("classed", 1);
    classed["spec"]["checkpoint"]["storageClassName"] = json!("standard");
    cluster::apply_yaml(&env.admin, &env.ns, &classed.to_string())
        .await
        .unwrap();
    let api = env.trainings();
    let err = api
        .patch(
            "classed",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"checkpoint": {"storageClassName": null}}})),
        )
        .await
        .expect_err("unsetting storageClassName was accepted");
    assert!(
        err.to_string()
            .contains("checkpoint.storageClassName cannot be set, unset or changed"),
        "{err}"
    );
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_specs_are_rejected_with_their_messages() {
    let env = TestEnv::new("invalid").await;
    let base = small_cpu("bad", 1);
    let cases: Vec<(&str, Mutation, &str)> = vec![
        (
            "depth 0",
            Box::new(|v| v["spec"]["depth"] = json!(0)),
            "depth must be between 1 and 128",
        ),
        (
            "depth 129",
            Box::new(|v| v["spec"]["depth"] = json!(129)),
            "depth must be between 1 and 128",
        ),
        (
            "hours 0",
            Box::new(|v| v["spec"]["hours"] = json!(0)),
            "hours must be greater than 0",
        ),
        (
            "gpus 12 on 8-GPU nodes",
            Box::new(|v| {
                v["spec"]["gpus"] = json!(12);
                v["spec"].as_object_mut().unwrap().remove("cpuWorkers");
            }),
            "gpus must be a multiple of gpusPerNode",
        ),
        (
            "two dataset sources",
            Box::new(|v| v["spec"]["dataset"]["configMap"] = json!({"name": "texts"})),
            "set exactly one of dataset.pvc, dataset.configMap or dataset.synthetic",
        ),
        (
            "no dataset source",
            Box::new(|v| v["spec"]["dataset"] = json!({})),
            "set exactly one of dataset.pvc, dataset.configMap or dataset.synthetic",
        ),
        (
            "cpuWorkers with GPUs",
            Box::new(|v| v["spec"]["gpus"] = json!(8)),
            "cpuWorkers applies only to CPU training",
        ),
        (
            "no budget",
            Box::new(|v| {
                v["spec"].as_object_mut().unwrap().remove("maxSteps");
            }),
            "set spec.hours",
        ),
        (
            "indivisible batch",
            Box::new(|v| {
                v["spec"]["deviceBatchSize"] = json!(4);
                v["spec"]["seqLen"] = json!(256);
                v["spec"]["totalBatchSize"] = json!(1000);
            }),
            "totalBatchSize (tokens per optimizer step) must be a multiple",
        ),
        (
            "dataset path escaping the volume",
            Box::new(|v| {
                v["spec"]["dataset"] = json!({"pvc": {"claimName": "t", "path": "../etc"}})
            }),
            "dataset.pvc.path must be relative",
        ),
        (
            "an unknown preset",
            Box::new(|v| v["spec"]["preset"] = json!("budget-5")),
            r#"spec.preset: Unsupported value: "budget-5": supported values: "budget-100", "budget-1000""#,
        ),
        (
            "neither depth nor a preset",
            Box::new(|v| {
                v["spec"].as_object_mut().unwrap().remove("depth");
            }),
            "set spec.depth (layers, 1 to 128) or spec.preset",
        ),
        (
            "a micro-batch that is neither auto nor a number",
            Box::new(|v| v["spec"]["deviceBatchSize"] = json!("max")),
            "deviceBatchSize must be auto or a whole number between 1 and 4096",
        ),
        (
            "auto with a total batch that seqLen x workers does not divide",
            Box::new(|v| {
                v["spec"]["cpuWorkers"] = json!(3);
                v["spec"]["deviceBatchSize"] = json!("auto");
                v["spec"]["seqLen"] = json!(256);
                v["spec"]["totalBatchSize"] = json!(1024);
            }),
            "with deviceBatchSize auto (the default without a preset), of seqLen x workers",
        ),
        (
            "the preset's micro-batch not dividing the total batch",
            Box::new(|v| {
                let spec = v["spec"].as_object_mut().unwrap();
                for field in ["depth", "gpus", "cpuWorkers"] {
                    spec.remove(field);
                }
                v["spec"]["preset"] = json!("budget-100");
                v["spec"]["seqLen"] = json!(2048);
                v["spec"]["totalBatchSize"] = json!(4 * 2048 * 2);
            }),
            "totalBatchSize (tokens per optimizer step) must be a multiple",
        ),
        (
            "cpuWorkers with a GPU preset",
            Box::new(|v| {
                v["spec"].as_object_mut().unwrap().remove("gpus");
                v["spec"]["preset"] = json!("budget-1000");
            }),
            "cpuWorkers applies only to CPU training",
        ),
        (
            "seqLen 1, shorter than the trainer's shortest window",
            Box::new(|v| v["spec"]["seqLen"] = json!(1)),
            "seqLen must be between 2 and 65536 tokens (the trainer's --seq-len)",
        ),
        (
            "an early stop with a negative patience",
            Box::new(|v| v["spec"]["earlyStop"] = json!({"patience": -1})),
            "earlyStop.patience must be between 0 (off) and 100000",
        ),
        (
            "name too long for pod hostnames",
            Box::new(|v| {
                v["metadata"]["name"] = json!("a-name-that-is-much-too-long-for-worker-pods")
            }),
            "metadata.name must be at most 40 characters",
        ),
    ];
    assert_refused(&env, &base, &cases).await;
    // Nothing was stored.
    assert!(env
        .trainings()
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .is_empty());

    // The shortest sequence the trainer trains on is accepted (the CRD once refused below 8).
    let mut shortest = small_cpu("shortest", 1);
    shortest["spec"]["seqLen"] = json!(2);
    cluster::apply_yaml(&env.admin, &env.ns, &shortest.to_string())
        .await
        .expect("seqLen 2, the trainer's shortest, is accepted");

    // The checkpoint volume's size is fixed once created.
    cluster::apply_yaml(&env.admin, &env.ns, &base.to_string())
        .await
        .unwrap();
    let mut grown = base.clone();
    grown["spec"]["checkpoint"]["size"] = json!("5Gi");
    let err = cluster::apply_yaml(&env.admin, &env.ns, &grown.to_string())
        .await
        .expect_err("checkpoint.size changed after creation");
    assert!(
        err.to_string().contains("checkpoint.size cannot change"),
        "{err}"
    );
    env.finish().await;
}

/// The operator's reconciliations that ended in an error (and were retried), so far.
async fn failed_reconciles(env: &TestEnv) -> u64 {
    let (_, text) = env.operators[0].get("/metrics").await.unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(r#"charlm_operator_reconciliations_total{result="error"} "#))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn objects_the_api_server_refuses_fail_the_training_once_with_its_message() {
    let mut env = TestEnv::new("rejected").await;
    env.start_operator("operator-1").await;
    let cases: Vec<(&str, Mutation, &str, &str)> = vec![
        (
            "nopriority",
            Box::new(|v| v["spec"]["priorityClassName"] = json!("no-such-class")),
            "no PriorityClass with name no-such-class was found",
            "spec.priorityClassName",
        ),
        (
            "overlimit",
            Box::new(|v| {
                v["spec"]["resources"] = json!({"requests": {"cpu": "2"}, "limits": {"cpu": "1"}})
            }),
            "must be less than or equal to cpu limit",
            "spec.resources",
        ),
        (
            "badclass",
            Box::new(|v| v["spec"]["checkpoint"]["storageClassName"] = json!("Bad_Class")),
            "PersistentVolumeClaim",
            "spec.checkpoint.storageClassName",
        ),
    ];
    for (name, mutate, api_says, field) in &cases {
        let mut manifest = small_gpu(name, 1);
        mutate(&mut manifest);
        env.apply(&manifest.to_string()).await;
        let t = env.wait_phase(name, Phase::Failed, MINUTE).await;
        assert_eq!(
            condition(&t, "Failed"),
            ("True".into(), "InvalidSpec".into()),
            "{name}"
        );
        let message = t.status.as_ref().unwrap().message.clone().unwrap();
        assert!(
            message.contains("the API server rejected")
                && message.contains(api_says)
                && message.contains(&format!("fix {field}")),
            "{name}: {message}"
        );
        let events = events_of(&env, name).await;
        assert!(
            events
                .iter()
                .any(|e| e.reason.as_deref() == Some("InvalidSpec")
                    && e.note.as_deref().is_some_and(|n| n.contains(api_says))),
            "{name}: no InvalidSpec event naming the cause: {events:?}"
        );
    }
    // Failed for good: no retry every few seconds, no object sent again, no status rewritten.
    let versions = |ts: Vec<CharLMTraining>| -> Vec<Option<String>> {
        ts.into_iter()
            .map(|t| t.metadata.resource_version)
            .collect()
    };
    let list = || async {
        env.trainings()
            .list(&Default::default())
            .await
            .unwrap()
            .items
    };
    // The status of a failed training settles in one or two writes (the failure, then the
    // settings and the claim's condition from the next reconcile, which a loaded machine delays by
    // seconds); what must not happen is a rewrite every few seconds after that, so the 15 s watch
    // starts once two reads 3 s apart agree (at most a minute).
    let mut before_objects = list().await;
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_secs(3)).await;
        let now = list().await;
        let settled = versions(now.clone()) == versions(before_objects.clone());
        before_objects = now;
        if settled {
            break;
        }
    }
    let was = versions(before_objects.clone());
    let before = failed_reconciles(&env).await;
    tokio::time::sleep(Duration::from_secs(15)).await;
    let after_objects = list().await;
    assert_eq!(
        versions(after_objects.clone()),
        was,
        "a failed training's status kept changing; before: {}\nafter: {}",
        serde_json::to_string(&before_objects).unwrap(),
        serde_json::to_string(&after_objects).unwrap()
    );
    assert_eq!(
        failed_reconciles(&env).await,
        before,
        "the operator kept retrying"
    );
    assert!(env.workers("nopriority").await.is_empty());

    // A fixed spec starts again.
    env.trainings()
        .patch(
            "nopriority",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"priorityClassName": null}})),
        )
        .await
        .unwrap();
    env.wait_phase("nopriority", Phase::Running, MINUTE).await;
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_says_what_runs_and_what_went_wrong() {
    let mut env = TestEnv::new("truth").await;
    env.start_operator("operator-1").await;

    // A spec edited while the workers run: status.effective stays with the running attempt,
    // and the next start takes the edit.
    env.apply(&small_gpu("edited", 1).to_string()).await;
    env.wait_phase("edited", Phase::Running, MINUTE).await;
    let api = env.trainings();
    let patch = |spec: Value| {
        let api = api.clone();
        async move {
            api.patch(
                "edited",
                &PatchParams::default(),
                &Patch::Merge(json!({ "spec": spec })),
            )
            .await
            .unwrap()
        }
    };
    patch(json!({"maxSteps": 500})).await;
    let t = env
        .wait_training("edited", "the edit observed", MINUTE, |t| {
            t.status.as_ref().and_then(|s| s.observed_generation) == Some(2)
        })
        .await;
    let e = t.status.unwrap().effective.unwrap();
    assert_eq!((e.max_steps, e.generation), (Some(100), Some(1)));
    patch(json!({"suspend": true})).await;
    env.wait_phase("edited", Phase::Suspended, MINUTE).await;
    patch(json!({"suspend": false})).await;
    let t = env.wait_phase("edited", Phase::Running, MINUTE).await;
    let e = t.status.unwrap().effective.unwrap();
    assert_eq!((e.max_steps, e.generation), (Some(500), Some(4)));

    // A worker that never ran is not said to have vanished "while the training ran".
    let mut stuck = small_gpu("stuck", 2);
    stuck["spec"]["nodeSelector"] = json!({"charlm.dev/e2e-node": "none-such"});
    env.apply(&stuck.to_string()).await;
    env.wait("both workers created", MINUTE, || async {
        match env.workers("stuck").await.len() {
            2 => Ok(Some(())),
            n => Err(format!("{n} pods")),
        }
    })
    .await;
    // Nothing prepares the dataset of workers that wait to be placed.
    let t = env
        .wait_training("stuck", "PodsReady=False/Unschedulable", MINUTE, |t| {
            condition(t, "PodsReady").1 == "Unschedulable"
        })
        .await;
    assert_eq!(
        condition(&t, "DatasetReady"),
        ("Unknown".into(), "WaitingForWorkers".into())
    );
    // Deleted by hand: a gang restart, not counted (a disruption, as an eviction is).
    env.pods()
        .delete("stuck-worker-1", &Default::default())
        .await
        .unwrap();
    let t = env
        .wait_training("stuck", "a restart", MINUTE, |t| {
            t.status
                .as_ref()
                .is_some_and(|s| s.attempt == 1 && s.failures.deleted == 1)
        })
        .await;
    assert_eq!(t.status.as_ref().unwrap().restarts, 0);
    let restarting = t
        .status
        .unwrap()
        .conditions
        .into_iter()
        .find(|c| c.type_ == "Restarting");
    let message = restarting.map(|c| c.message).unwrap_or_default();
    assert!(
        message.contains("stuck-worker-1")
            && message.contains("before every worker ran")
            && !message.contains("while the training ran"),
        "{message}"
    );

    // Bad input: the trainer's own error, not launch's pointer to it. The log tail as today's
    // `launch -- train` writes it (stdout's events and stderr's human lines interleaved).
    env.apply(&small_gpu("tooshort", 1).to_string()).await;
    env.wait_phase("tooshort", Phase::Running, MINUTE).await;
    let tail = r#"launch: starting ranks 0-0 of 1 (node 0 of 1), rendezvous at 127.0.0.1:29500
{"schema":1,"event":"launch","node_rank":0,"nnodes":1,"nproc_per_node":1,"world_size":1,"first_rank":0,"master_addr":"127.0.0.1","master_port":29500}
[rank 0] error: the validation split of 1518 tokens is shorter than seqLen 2048; lower spec.seqLen or give more text
{"schema":1,"rank":0,"event":"error","message":"the validation split of 1518 tokens is shorter than seqLen 2048; lower spec.seqLen or give more text","exit_code":2}
launch: rank 0 failed (exit status 2); stopping the other workers
{"schema":1,"rank":0,"event":"exit","exit_code":2,"signal":null,"killed":false}
launch: rank 0: exit status 2
error: rank 0 failed: exit status 2 (bad input or settings: see its message above)
{"schema":1,"event":"error","message":"rank 0 failed: exit status 2 (bad input or settings: see its message above)","exit_code":2}"#;
    env.set_pod_status(
        "tooshort-worker-0",
        json!({"phase": "Failed", "containerStatuses": terminated("trainer", 2, "Error", tail)}),
    )
    .await;
    let t = env.wait_phase("tooshort", Phase::Failed, MINUTE).await;
    assert_eq!(condition(&t, "Failed").1, "InvalidInput");
    // The trainer ran, so the dataset was prepared; the status does not leave it "Preparing".
    assert_eq!(
        condition(&t, "DatasetReady"),
        ("True".into(), "Prepared".into())
    );
    let message = t.status.unwrap().message.unwrap();
    assert!(
        message.contains("rank 0: the validation split of 1518 tokens is shorter than seqLen 2048"),
        "{message}"
    );
    env.finish().await;
}

/// A gang that cannot be placed whole holds GPUs that train nothing: after
/// startupTimeoutSeconds it lets go, says which workers could not be placed and why, and tries
/// again after the backoff without spending a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_placed_gang_lets_go_after_its_startup_timeout() {
    let mut env = TestEnv::new("halfplaced").await;
    env.start_operator("operator-1").await;
    // Two workers of 8 GPUs, both bound to one 8-GPU node: one fits at most.
    let mut manifest = small_gpu("half", 16);
    manifest["spec"]["gpusPerNode"] = json!(8);
    manifest["spec"]["nodeSelector"] = json!({"kubernetes.io/hostname": "h100-3"});
    manifest["spec"]["startupTimeoutSeconds"] = json!(5);
    manifest["spec"]["restartPolicy"]["backoffSeconds"] = json!(8);
    env.apply(&manifest.to_string()).await;
    let t = env
        .wait_training("half", "a startup timeout", MINUTE, |t| {
            t.status.as_ref().is_some_and(|s| s.startup_timeouts >= 1)
                && condition(t, "PodsReady").1 == "StartupTimeout"
        })
        .await;
    let status = t.status.clone().unwrap();
    assert_eq!(status.restarts, 0, "a startup timeout is not a failure");
    assert_eq!(
        condition(&t, "PodsReady"),
        ("False".into(), "StartupTimeout".into())
    );
    let message = status.message.unwrap();
    assert!(
        message.contains("not every worker was placed within 5s")
            && message.contains("Insufficient nvidia.com/gpu")
            && message.contains("not counted as a restart"),
        "{message}"
    );
    // The recorder publishes the Event after the status patch seen above.
    env.wait(
        "a StartupTimeout event",
        Duration::from_secs(30),
        || async {
            let events = events_of(&env, "half").await;
            if events
                .iter()
                .any(|e| e.reason.as_deref() == Some("StartupTimeout"))
            {
                Ok(Some(()))
            } else {
                Err(format!("{events:?}"))
            }
        },
    )
    .await;
    // The next attempt comes after the backoff, and times out again the same way.
    env.wait_training("half", "a second attempt", MINUTE, |t| {
        t.status
            .as_ref()
            .is_some_and(|s| s.startup_timeouts >= 2 && s.restarts == 0)
    })
    .await;
    env.finish().await;
}
