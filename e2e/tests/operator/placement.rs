//! Where workers run and under which rights: the examples as the API server stores them, GPU workers on H100 nodes under the chart's RBAC, CPU workers on CPU nodes.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gpu_example_runs_on_h100_nodes_under_the_chart_rbac() {
    let mut env = TestEnv::new("gpu").await;
    let op = env.start_operator("operator-1").await;

    // The example reads .txt files from the claim `charlm-texts`, which the user provides; every
    // worker mounts it read-only, which the control plane's hostPath provisioner cannot offer, so
    // it gets a volume made for it.
    env.provide_read_only_claim("charlm-texts").await;

    let manifest = example("gpu-training.yaml");
    env.apply(&manifest.to_string()).await;
    let t = env.wait_phase("charlm-d24", Phase::Running, MINUTE).await;

    let status = t.status.clone().unwrap();
    assert_eq!((status.workers, status.running_workers), (2, 2));
    assert_eq!(
        status.checkpoint_pvc.as_deref(),
        Some("charlm-d24-checkpoints")
    );
    assert_eq!(status.observed_generation, t.metadata.generation);
    for (type_, want) in [
        ("PodsReady", "True"),
        ("Running", "True"),
        ("DatasetReady", "True"),
    ] {
        assert_eq!(condition(&t, type_).0, want, "{type_}");
    }
    assert_eq!(condition(&t, "Failed").0, "False");

    let nodes = nodes_by_name(&env).await;
    let pods = env.workers("charlm-d24").await;
    let names: Vec<String> = pods.iter().map(|p| p.name_any()).collect();
    assert_eq!(names, ["charlm-d24-worker-0", "charlm-d24-worker-1"]);
    let mut used_nodes = Vec::new();
    for (i, pod) in pods.iter().enumerate() {
        let spec = pod.spec.as_ref().unwrap();
        let node = spec.node_name.clone().expect("the pod is scheduled");
        assert!(
            is_h100(&nodes[&node]),
            "{} landed on {node}, not an H100 node",
            pod.name_any()
        );
        used_nodes.push(node);
        assert_eq!(spec.hostname.as_deref(), Some(pod.name_any().as_str()));
        assert_eq!(spec.subdomain.as_deref(), Some("charlm-d24-workers"));
        assert_eq!(spec.restart_policy.as_deref(), Some("Never"));
        assert_eq!(
            spec.security_context.as_ref().unwrap().run_as_non_root,
            Some(true)
        );

        let trainer = &spec.containers[0];
        let resources = trainer.resources.as_ref().unwrap();
        assert_eq!(resources.limits.as_ref().unwrap()["nvidia.com/gpu"].0, "8");
        assert_eq!(
            resources.requests.as_ref().unwrap()["nvidia.com/gpu"].0,
            "8"
        );
        assert_eq!(resources.requests.as_ref().unwrap()["memory"].0, "200Gi");
        assert_eq!(
            trainer.args.as_ref().unwrap().join(" "),
            "launch -- train",
            "the contract's command"
        );

        let env_vars = env_of(pod);
        assert_eq!(env_vars["NNODES"], "2");
        assert_eq!(env_vars["NODE_RANK"], i.to_string());
        assert_eq!(env_vars["NPROC_PER_NODE"], "8");
        assert_eq!(
            env_vars["MASTER_ADDR"],
            format!("charlm-d24-worker-0.charlm-d24-workers.{}.svc", env.ns)
        );
        assert_eq!(env_vars["MASTER_PORT"], "29500");
        assert_eq!(env_vars["CHARLM_DEPTH"], "24");
        assert_eq!(env_vars["CHARLM_HOURS"], "16");
        assert_eq!(env_vars["CHARLM_DEVICE_BATCH_SIZE"], "8");
        assert_eq!(env_vars["CHARLM_TOTAL_BATCH_SIZE"], "524288");
        assert_eq!(env_vars["CHARLM_DEVICE"], "cuda");
        assert_eq!(env_vars["CHARLM_CHECKPOINT_EVERY_MINUTES"], "30");

        let volumes = spec.volumes.as_ref().unwrap();
        let shm = volumes.iter().find(|v| v.name == "dshm").unwrap();
        assert_eq!(
            shm.empty_dir.as_ref().unwrap().medium.as_deref(),
            Some("Memory")
        );
        let claims: Vec<&str> = volumes
            .iter()
            .filter_map(|v| v.persistent_volume_claim.as_ref())
            .map(|c| c.claim_name.as_str())
            .collect();
        if i == 0 {
            assert_eq!(claims, ["charlm-d24-checkpoints", "charlm-texts"]);
        } else {
            assert_eq!(
                claims,
                ["charlm-texts"],
                "only worker 0 mounts the checkpoints"
            );
        }
        let prepare = &spec.init_containers.as_ref().unwrap()[0];
        assert_eq!(
            prepare.args.as_ref().unwrap().join(" "),
            "prepare --input /dataset/corpus --output /work/data"
        );
    }
    used_nodes.sort();
    used_nodes.dedup();
    assert_eq!(used_nodes.len(), 2, "one worker per node");

    let svc = env.services().get("charlm-d24-workers").await.unwrap();
    assert_eq!(svc.spec.unwrap().cluster_ip.as_deref(), Some("None"));

    let events = events_of(&env, "charlm-d24").await;
    assert!(
        events
            .iter()
            .any(|e| e.reason.as_deref() == Some("CreatedWorkers")),
        "events: {events:?}"
    );

    let table = tool("kubectl", &["get", "clt", "-n", &env.ns]).unwrap();
    let header: Vec<&str> = table.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(
        header,
        ["NAME", "PHASE", "DEPTH", "GPUS", "STEP", "LOSS", "ETA", "COST", "AGE"]
    );
    assert!(
        table.contains("charlm-d24   Running   24      16"),
        "{table}"
    );

    let (code, metrics) = env.operators[op].get("/metrics").await.unwrap();
    assert_eq!(code, 200);
    assert!(
        metrics.contains(r#"charlm_operator_reconciliations_total{result="ok"}"#),
        "{metrics}"
    );
    assert!(metrics.contains("charlm_operator_leader 1"), "{metrics}");
    let log = env.operators[op].log_text();
    assert!(
        !log.to_lowercase().contains("forbidden"),
        "RBAC denied something:\n{log}"
    );
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cpu_example_runs_on_cpu_nodes() {
    let mut env = TestEnv::new("cpu").await;
    env.start_operator("operator-1").await;
    let t = start_training(&env, &example("cpu-training.yaml")).await;
    assert_eq!(condition(&t, "PodsReady").0, "True");

    let nodes = nodes_by_name(&env).await;
    let pods = env.workers("charlm-cpu-demo").await;
    assert_eq!(pods.len(), 1);
    let spec = pods[0].spec.as_ref().unwrap();
    let node = spec.node_name.clone().unwrap();
    assert!(
        !is_h100(&nodes[&node]),
        "a CPU training landed on the GPU node {node}"
    );
    assert!(
        spec.node_selector.is_none()
            && spec
                .tolerations
                .iter()
                .flatten()
                .all(|t| t.key.as_deref() != Some("nvidia.com/gpu"))
    );
    let resources = spec.containers[0].resources.as_ref().unwrap();
    assert!(resources
        .limits
        .iter()
        .flatten()
        .all(|(k, _)| k != "nvidia.com/gpu"));
    let env_vars = env_of(&pods[0]);
    assert_eq!(env_vars["CHARLM_DEVICE"], "cpu");
    assert_eq!(env_vars["NPROC_PER_NODE"], "1");
    assert_eq!(env_vars["CHARLM_MAX_STEPS"], "200");
    let inits: Vec<String> = spec
        .init_containers
        .iter()
        .flatten()
        .map(|c| c.args.as_ref().unwrap().join(" "))
        .collect();
    assert_eq!(
        inits,
        [
            "generate --output /work/raw --chars 2000000 --seed 1",
            "prepare --input /work/raw --output /work/data"
        ]
    );
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_server_accepts_the_examples_as_written() {
    let env = TestEnv::new("examples").await;
    for file in ["gpu-training.yaml", "cpu-training.yaml", "budget-100.yaml"] {
        let v = example(file);
        let created = dry_run(&env, &v)
            .await
            .unwrap_or_else(|e| panic!("{file} is rejected: {e}"));
        assert_eq!(
            created.spec.depth,
            v["spec"]["depth"].as_i64().map(|d| d as i32)
        );
        assert_eq!(
            created.spec.preset.is_some(),
            v["spec"].get("preset").is_some()
        );
    }

    // `auto` and numbers are both micro-batches; auto needs only seqLen x workers to divide the
    // total batch; a preset alone is a whole spec.
    let accepted = [
        json!({"deviceBatchSize": "auto"}),
        json!({"deviceBatchSize": "auto", "seqLen": 256, "totalBatchSize": 256 * 3}),
        json!({"deviceBatchSize": 4, "seqLen": 256, "totalBatchSize": 1024 * 3}),
        json!({"preset": "budget-1000", "depth": 12, "gpus": 16, "deviceBatchSize": "auto"}),
    ];
    for extra in accepted {
        let mut manifest = small_cpu("accepted", 1);
        let spec = manifest["spec"].as_object_mut().unwrap();
        spec.remove("cpuWorkers");
        if extra.get("preset").is_some() {
            spec.remove("gpus");
        }
        spec.extend(extra.as_object().unwrap().clone());
        dry_run(&env, &manifest)
            .await
            .unwrap_or_else(|e| panic!("{manifest} is rejected: {e}"));
    }
    let preset_only = json!({
        "apiVersion": "charlm.dev/v1alpha1", "kind": "CharLMTraining",
        "metadata": {"name": "preset-only"},
        "spec": {"preset": "budget-1000", "dataset": {"synthetic": {}}}
    });
    let stored = env.apply(&preset_only.to_string()).await;
    assert_eq!(
        (stored.spec.depth, stored.spec.gpus, stored.spec.hours),
        (None, None, None),
        "the stored object stays as written"
    );
    env.finish().await;
}

/// What the API server makes of `manifest` (defaults, validation), without storing it.
async fn dry_run(env: &TestEnv, manifest: &Value) -> kube::Result<CharLMTraining> {
    let t: CharLMTraining = serde_json::from_value(manifest.clone()).unwrap();
    let params = PostParams {
        dry_run: true,
        ..Default::default()
    };
    env.trainings().create(&params, &t).await
}
