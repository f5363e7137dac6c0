//! The operator on the real control plane of `e2e/controlplane/` (kube-apiserver, etcd,
//! controller-manager, scheduler, kwok nodes): the chart installs, the operator binary runs under the
//! chart's ServiceAccount token (so its RBAC is proven enough), and every behaviour of issue 3 is
//! checked against what the API server actually holds. Needs `e2e/controlplane/up`; fails without it.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Node, Pod, ResourceQuota};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::api::{DeleteParams, ListParams, ObjectMeta, PostParams};
use kube::{Api, ResourceExt};
use serde_json::{json, Value};

use charlm_e2e::cluster::{self, repo_root, tool, CHART_NAMESPACE};
use charlm_e2e::specs::{
    assert_refused, condition, events_of, small_cpu, small_gpu, terminated, Mutation,
};
use charlm_e2e::training_env::TestEnv;
use charlm_operator::crd::{CharLMTraining, DeviceBatchSize, Phase};

const MINUTE: Duration = Duration::from_secs(60);

fn example(file: &str) -> Value {
    let text = std::fs::read_to_string(repo_root().join("examples").join(file)).unwrap();
    serde_yaml::from_str(&text).unwrap()
}

fn env_of(pod: &Pod) -> BTreeMap<String, String> {
    pod.spec.as_ref().unwrap().containers[0]
        .env
        .iter()
        .flatten()
        .filter_map(|e| Some((e.name.clone(), e.value.clone()?)))
        .collect()
}

fn phase(t: &CharLMTraining) -> Option<Phase> {
    t.status.as_ref().and_then(|s| s.phase)
}

async fn nodes_by_name(env: &TestEnv) -> BTreeMap<String, Node> {
    let nodes: Api<Node> = Api::all(env.admin.clone());
    nodes
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .map(|n| (n.name_any(), n))
        .collect()
}

fn is_h100(node: &Node) -> bool {
    node.labels()
        .get("nvidia.com/gpu.product")
        .map(String::as_str)
        == Some("NVIDIA-H100-80GB-HBM3")
}

/// Applies a training and waits until all its workers run. (The control plane's default
/// StorageClass provisions the checkpoint volume.)
async fn start_training(env: &TestEnv, manifest: &Value) -> CharLMTraining {
    let name = manifest["metadata"]["name"].as_str().unwrap();
    env.apply(&manifest.to_string()).await;
    env.wait_phase(name, Phase::Running, MINUTE).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chart_lints_and_refuses_unsafe_values() {
    cluster::require_kubeconfig();
    let chart = repo_root().join("charts/charlm-operator");
    let chart = chart.to_str().unwrap();
    let lint = tool("helm", &["lint", "--strict", chart]).expect("helm lint --strict is clean");
    assert!(lint.contains("0 chart(s) failed"), "{lint}");
    // Offline rendering needs a Kubernetes version for the chart's kubeVersion constraint.
    let rendered = tool(
        "helm",
        &[
            "template",
            "t",
            chart,
            "--kube-version",
            "1.35.0",
            "--set",
            "replicaCount=2",
        ],
    )
    .unwrap();
    assert!(rendered.contains("--leader-elect=true"));
    assert!(rendered.contains("kind: ClusterRole"));
    assert!(
        rendered.contains("--price-per-gpu-hour=3"),
        "the default price"
    );
    assert!(
        !rendered.contains("monitoring.coreos.com"),
        "no Prometheus Operator objects unless asked for"
    );

    // With the Prometheus Operator's monitors: still lint-clean, and they select the right things.
    let monitors = [
        "--set",
        "metrics.serviceMonitor.enabled=true",
        "--set",
        "trainerMetrics.podMonitor.enabled=true",
        "--set",
        "metrics.serviceMonitor.labels.release=prometheus",
        "--set",
        "pricePerGpuHour=2.5",
    ];
    let lint = tool(
        "helm",
        &[&["lint", "--strict", chart][..], &monitors[..]].concat(),
    )
    .expect("helm lint --strict is clean with the monitors");
    assert!(lint.contains("0 chart(s) failed"), "{lint}");
    let rendered = tool(
        "helm",
        &[
            &["template", "t", chart, "--kube-version", "1.35.0"][..],
            &monitors[..],
        ]
        .concat(),
    )
    .unwrap();
    let docs: Vec<Value> = rendered
        .split("\n---")
        .filter_map(|d| serde_yaml::from_str::<Value>(d).ok())
        .filter(|d| d.is_object())
        .collect();
    let kind = |k: &str| {
        docs.iter()
            .find(|d| d["kind"] == k)
            .unwrap_or_else(|| panic!("no {k} rendered"))
    };
    let sm = kind("ServiceMonitor");
    assert_eq!(sm["apiVersion"], "monitoring.coreos.com/v1");
    assert_eq!(sm["metadata"]["labels"]["release"], "prometheus");
    assert_eq!(sm["spec"]["endpoints"][0]["port"], "http-metrics");
    let svc = kind("Service");
    assert_eq!(
        sm["spec"]["selector"]["matchLabels"], svc["spec"]["selector"],
        "the ServiceMonitor selects the metrics Service"
    );
    let pm = kind("PodMonitor");
    assert_eq!(pm["spec"]["namespaceSelector"]["any"], true);
    assert_eq!(
        pm["spec"]["selector"]["matchLabels"],
        json!({"app.kubernetes.io/managed-by": "charlm-operator", "charlm.dev/worker-index": "0"})
    );
    assert_eq!(pm["spec"]["podMetricsEndpoints"][0]["port"], "metrics");
    assert!(rendered.contains("--price-per-gpu-hour=2.5"));
    let err = tool(
        "helm",
        &[
            "template",
            "t",
            chart,
            "--kube-version",
            "1.35.0",
            "--set",
            "replicaCount=2",
            "--set",
            "leaderElection.enabled=false",
        ],
    )
    .expect_err("two replicas without leader election must not render");
    assert!(
        err.to_string()
            .contains("needs leaderElection.enabled=true"),
        "{err}"
    );
}

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

/// The chart's NetworkPolicy settings reach the operator's flags and its RBAC, and turn off whole.
#[test]
fn chart_passes_the_network_policy_settings() {
    cluster::require_kubeconfig();
    let chart = repo_root().join("charts/charlm-operator");
    let chart = chart.to_str().unwrap();
    let render = |sets: &[&str]| {
        let mut args = vec!["template", "t", chart, "--kube-version", "1.35.0"];
        for s in sets {
            args.extend(["--set", s]);
        }
        tool("helm", &args).unwrap()
    };
    let on = render(&["networkPolicy.metricsNamespaces={monitoring,prom}"]);
    assert!(on.contains("- --network-policy=true"), "{on}");
    assert!(
        on.contains(
            "- --network-policy-operator-labels=app.kubernetes.io/name=charlm-operator,app.kubernetes.io/instance=t\n"
        ),
        "{on}"
    );
    assert!(on.contains("- --network-policy-metrics-namespaces=monitoring,prom\n"));
    assert!(on.contains("resources: [\"networkpolicies\"]"), "{on}");
    let off = render(&["networkPolicy.enabled=false"]);
    assert!(off.contains("- --network-policy=false"));
    assert!(!off.contains("networkpolicies") && !off.contains("--network-policy-operator-labels"));
    let lint = tool(
        "helm",
        &[
            "lint",
            "--strict",
            chart,
            "--set",
            "networkPolicy.enabled=false",
        ],
    )
    .unwrap();
    assert!(lint.contains("0 chart(s) failed"), "{lint}");
}

/// Each training gets a NetworkPolicy of its own, owned by it and deleted with it, that admits
/// its own workers (every port: rendezvous and NCCL), and to the metrics port the operator's pods
/// as the installed chart labels them and the namespaces named for Prometheus. The plane has no
/// network plugin that enforces policies, so this checks the objects the API server holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_training_is_fenced_by_a_network_policy_of_its_own() {
    let mut env = TestEnv::new("netpol").await;
    // The operator runs with the flags of the installed chart's Deployment (0 replicas here).
    let deployments: Api<Deployment> = Api::namespaced(env.admin.clone(), CHART_NAMESPACE);
    let deployment = deployments.get("charlm-operator").await.unwrap();
    let template = deployment.spec.unwrap().template;
    let pod_labels = template.metadata.unwrap().labels.unwrap();
    let flags: Vec<String> = template.spec.unwrap().containers[0]
        .args
        .clone()
        .unwrap()
        .into_iter()
        .filter(|a| a.starts_with("--network-policy"))
        .collect();
    assert!(
        flags.contains(&"--network-policy=true".to_string()),
        "{flags:?}"
    );
    env.options.extra_args = flags;
    env.options
        .extra_args
        .push("--network-policy-metrics-namespaces=monitoring".into());
    env.start_operator("operator-1").await;
    let training = start_training(&env, &small_gpu("fenced", 2)).await;

    let policies: Api<NetworkPolicy> = Api::namespaced(env.admin.clone(), &env.ns);
    let policy = policies.get("fenced-workers").await.unwrap();
    let owner = &policy.owner_references()[0];
    assert_eq!(Some(&owner.uid), training.metadata.uid.as_ref());
    assert_eq!(owner.controller, Some(true));
    let spec = serde_json::to_value(policy.spec.unwrap()).unwrap();
    assert_eq!(spec["policyTypes"], json!(["Ingress"]));
    let workers = json!({"matchLabels": {"charlm.dev/training": "fenced"}});
    assert_eq!(spec["podSelector"], workers);
    // The selector finds exactly the training's two workers.
    let selected = env
        .pods()
        .list(&ListParams::default().labels("charlm.dev/training=fenced"))
        .await
        .unwrap();
    assert_eq!(selected.items.len(), 2);
    let rules = spec["ingress"].as_array().unwrap();
    assert_eq!(rules.len(), 3, "{spec}");
    assert_eq!(rules[0], json!({"from": [{"podSelector": workers}]}));
    let metrics_port = json!([{"port": 9090, "protocol": "TCP"}]);
    let operator = &rules[1]["from"][0];
    assert_eq!(
        operator["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"],
        CHART_NAMESPACE
    );
    let selects_operator = operator["podSelector"]["matchLabels"]
        .as_object()
        .unwrap()
        .iter()
        .all(|(k, v)| pod_labels.get(k).map(String::as_str) == v.as_str());
    assert!(
        selects_operator,
        "{operator} vs the chart's pods {pod_labels:?}"
    );
    assert_eq!(rules[1]["ports"], metrics_port);
    assert_eq!(
        rules[2]["from"][0]["namespaceSelector"]["matchExpressions"],
        json!([{"key": "kubernetes.io/metadata.name", "operator": "In", "values": ["monitoring"]}])
    );
    assert_eq!(rules[2]["ports"], metrics_port);
    // The namespace label the policy relies on is set by the API server.
    let namespaces: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(env.admin.clone());
    let ns = namespaces.get(CHART_NAMESPACE).await.unwrap();
    assert_eq!(ns.labels()["kubernetes.io/metadata.name"], CHART_NAMESPACE);

    env.trainings()
        .delete("fenced", &DeleteParams::default())
        .await
        .unwrap();
    env.wait(
        "the NetworkPolicy deleted with its training",
        MINUTE,
        || async {
            match policies.get_opt("fenced-workers").await {
                Ok(None) => Ok(Some(())),
                Ok(Some(_)) => Err("still there".into()),
                Err(e) => Err(e.to_string()),
            }
        },
    )
    .await;
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
async fn killing_the_operator_mid_reconcile_creates_no_duplicates() {
    let mut env = TestEnv::new("crash").await;

    // A quota of two pods stops the first reconcile after two of four workers, for certain.
    let quota: ResourceQuota = serde_json::from_value(json!({
        "metadata": {"name": "two-pods"},
        "spec": {"hard": {"pods": "2"}}
    }))
    .unwrap();
    let quotas: Api<ResourceQuota> = Api::namespaced(env.admin.clone(), &env.ns);
    quotas.create(&PostParams::default(), &quota).await.unwrap();
    env.wait(
        "the quota to be counted",
        Duration::from_secs(30),
        || async {
            let q = quotas.get("two-pods").await.map_err(|e| e.to_string())?;
            if q.status.and_then(|s| s.hard).is_some() {
                Ok(Some(()))
            } else {
                Err("no status".into())
            }
        },
    )
    .await;

    let first = env.start_operator("operator-1").await;
    env.apply(&small_gpu("crashy", 4).to_string()).await;
    env.wait(
        "two workers created, the third refused",
        Duration::from_secs(30),
        || async {
            let n = env.workers("crashy").await.len();
            if n == 2 && env.operators[first].log_contains("exceeded quota") {
                Ok(Some(()))
            } else {
                Err(format!("{n} pods"))
            }
        },
    )
    .await;
    env.operators[first].kill();
    quotas
        .delete("two-pods", &DeleteParams::default())
        .await
        .unwrap();

    // Later replicas die at arbitrary moments; each must take over the lease from a dead holder.
    // Ten kills in all, at moments spread over a reconcile's life.
    for (i, delay_ms) in [0u64, 150, 600, 20, 300, 900, 60, 450, 1200]
        .into_iter()
        .enumerate()
    {
        let k = env.start_operator(&format!("operator-{}", i + 2)).await;
        env.wait(
            "the new replica to lead",
            Duration::from_secs(30),
            || async {
                if env.operators[k].log_contains("acquired leadership") {
                    Ok(Some(()))
                } else {
                    Err("standing by".into())
                }
            },
        )
        .await;
        tokio::time::sleep(Duration::from_millis(delay_ms)).await;
        env.operators[k].kill();
    }
    env.start_operator("operator-last").await;
    let t = env.wait_phase("crashy", Phase::Running, MINUTE).await;
    let status = t.status.clone().unwrap();
    assert_eq!(
        (status.restarts, status.attempt),
        (0, 0),
        "a crash of the operator is not a restart"
    );

    let pods = env.workers("crashy").await;
    let names: Vec<String> = pods.iter().map(|p| p.name_any()).collect();
    assert_eq!(
        names,
        [
            "crashy-worker-0",
            "crashy-worker-1",
            "crashy-worker-2",
            "crashy-worker-3"
        ]
    );
    assert!(pods.iter().all(|p| p.labels()["charlm.dev/attempt"] == "0"));
    let uids: Vec<String> = pods.iter().map(|p| p.uid().unwrap()).collect();
    let pvcs = env.pvcs().list(&ListParams::default()).await.unwrap().items;
    assert_eq!(pvcs.len(), 1);
    assert_eq!(
        env.services()
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .len(),
        1
    );

    // Settled: nothing is recreated behind our back.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let later: Vec<String> = env
        .workers("crashy")
        .await
        .iter()
        .map(|p| p.uid().unwrap())
        .collect();
    assert_eq!(uids, later);
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_leader_acts_and_a_standby_takes_over() {
    let mut env = TestEnv::new("leader").await;
    let a = env.start_operator("replica-a").await;
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> =
        Api::namespaced(env.admin.clone(), CHART_NAMESPACE);
    let lease_name = env.options.lease_name.clone();
    let holder = || async {
        leases
            .get_opt(&lease_name)
            .await
            .ok()
            .flatten()
            .and_then(|l| l.spec?.holder_identity)
    };
    env.wait("replica-a to lead", Duration::from_secs(30), || async {
        match holder().await.as_deref() {
            Some("replica-a") => Ok(Some(())),
            other => Err(format!("holder {other:?}")),
        }
    })
    .await;
    let b = env.start_operator("replica-b").await;
    start_training(&env, &small_gpu("first", 1)).await;
    assert!(env.operators[a].log_contains("controller starting"));
    assert!(env.operators[b].log_contains("standing by"));
    assert!(
        !env.operators[b].log_contains("controller starting"),
        "the standby acted"
    );
    let (_, metrics_b) = env.operators[b].get("/metrics").await.unwrap();
    assert!(
        metrics_b.contains("charlm_operator_leader 0"),
        "{metrics_b}"
    );

    env.operators[a].kill();
    env.wait(
        "replica-b to take over",
        Duration::from_secs(30),
        || async {
            match holder().await.as_deref() {
                Some("replica-b") => Ok(Some(())),
                other => Err(format!("holder {other:?}")),
            }
        },
    )
    .await;
    start_training(&env, &small_gpu("second", 1)).await;
    assert!(env.operators[b].log_contains("controller starting"));

    // A graceful stop hands the lease over at once.
    env.operators[b].terminate();
    env.wait(
        "the lease released on SIGTERM",
        Duration::from_secs(10),
        || async {
            match holder().await {
                None => Ok(Some(())),
                other => Err(format!("holder {other:?}")),
            }
        },
    )
    .await;
    env.start_operator("replica-c").await;
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_server_accepts_the_examples_as_written() {
    let env = TestEnv::new("examples").await;
    for file in ["gpu-training.yaml", "cpu-training.yaml", "budget-100.yaml"] {
        let v = example(file);
        let trainings: Api<CharLMTraining> = env.trainings();
        let t: CharLMTraining = serde_json::from_value(v.clone()).unwrap();
        let created = trainings
            .create(
                &PostParams {
                    dry_run: true,
                    ..Default::default()
                },
                &t,
            )
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
        let t: CharLMTraining = serde_json::from_value(manifest.clone()).unwrap();
        env.trainings()
            .create(
                &PostParams {
                    dry_run: true,
                    ..Default::default()
                },
                &t,
            )
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

/// Serves `body` as rank 0's `/progress` on 127.0.0.1:`port` until the test ends.
async fn serve_progress(port: u16, body: &'static str) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .unwrap_or_else(|e| panic!("cannot listen on 127.0.0.1:{port} for a fake /progress: {e}"));
    tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                return;
            };
            let mut buf = [0u8; 2048];
            let _ = sock.read(&mut buf).await;
            let reply = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = sock.write_all(reply.as_bytes()).await;
        }
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn progress_of_worker_zero_reaches_the_status() {
    let mut env = TestEnv::new("progress").await;
    env.start_operator("operator-1").await;
    start_training(&env, &small_gpu("live", 1)).await;
    // kwok's pod addresses lead nowhere; point worker 0 at a stand-in for the trainer's endpoint
    // on the contract's port.
    serve_progress(
        9090,
        r#"{"step": 1200, "total_steps_estimate": 9000, "tokens": 629145600, "epoch": 1.8, "train_loss": 0.92, "val_bpc": 1.31, "best_val_bpc": 1.30, "best_step": 1000, "tokens_per_s": 105000.0, "mfu": 0.53, "elapsed_s": 5990.0, "eta_s": 51600.0, "checkpoint": "/checkpoints/step-000001200", "world_size": 1, "complete": false}"#,
    )
    .await;
    env.set_pod_status(
        "live-worker-0",
        json!({"podIP": "127.0.0.1", "podIPs": [{"ip": "127.0.0.1"}]}),
    )
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

/// The suite's network rule on the fake GPU nodes: their pods get loopback addresses (kwok's
/// --cidr), the operator reads worker 0's progress there (nothing listens, so the read is
/// `unreachable`), and a pod address off loopback is refused before anything is sent. Every
/// operator of every test is also watched in the kernel's socket tables (`TestEnv::finish`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fake_pods_live_on_loopback_and_nothing_is_dialled_off_the_machine() {
    let mut env = TestEnv::new("traffic").await;
    let op = env.start_operator("operator-1").await;
    start_training(&env, &small_gpu("fake", 1)).await;
    let pod = env.pods().get("fake-worker-0").await.unwrap();
    let ip: std::net::IpAddr = pod
        .status
        .as_ref()
        .and_then(|s| s.pod_ip.as_deref())
        .expect("kwok gives the running pod an address")
        .parse()
        .unwrap();
    assert!(
        ip.is_loopback() && ip != std::net::Ipv4Addr::LOCALHOST,
        "a fake pod's address must be loopback (not 127.0.0.1, where real services listen): {ip}"
    );
    env.wait("a progress read of the fake pod", 2 * MINUTE, || {
        let op = &env.operators[op];
        async move {
            match op.progress_polls("unreachable").await {
                0 => Err("no read yet".to_string()),
                _ => Ok(Some(())),
            }
        }
    })
    .await;
    // A pod that reports an address elsewhere (as a fake node of another plane would) is never
    // dialled: the read is refused and counted.
    env.expect_refused_polls = true;
    env.set_pod_status(
        "fake-worker-0",
        json!({"podIP": "10.244.0.7", "podIPs": [{"ip": "10.244.0.7"}]}),
    )
    .await;
    env.wait("the off-loopback address to be refused", 2 * MINUTE, || {
        let op = &env.operators[op];
        async move {
            match op.progress_polls("refused").await {
                0 => Err("not refused yet".to_string()),
                _ => Ok(Some(())),
            }
        }
    })
    .await;
    assert!(env.operators[op].log_contains("is outside --progress-networks"));
    assert_eq!(env.operators[op].off_machine_peers(), Vec::<String>::new());
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

/// Waits until `name`'s workers are all gone.
async fn wait_workers_gone(env: &TestEnv, name: &str) {
    env.wait(&format!("{name}: workers gone"), MINUTE, || async {
        let n = env.workers(name).await.len();
        if n == 0 {
            Ok(Some(()))
        } else {
            Err(format!("{n} pods left"))
        }
    })
    .await;
}

/// Waits (30 s at most) for the Event of `reason` about `training` whose note contains every one
/// of `needles`: the recorder publishes it after the status patch the test saw.
async fn assert_event(env: &TestEnv, training: &str, reason: &str, needles: &[&str]) {
    env.wait(
        &format!("a {reason} event about {training} naming {needles:?}"),
        Duration::from_secs(30),
        || async {
            let events = events_of(env, training).await;
            let found = events.iter().any(|e| {
                e.reason.as_deref() == Some(reason)
                    && e.note
                        .as_deref()
                        .is_some_and(|n| needles.iter().all(|x| n.contains(x)))
            });
            if found {
                return Ok(Some(()));
            }
            let notes: Vec<(Option<&str>, Option<&str>)> = events
                .iter()
                .map(|e| (e.reason.as_deref(), e.note.as_deref()))
                .collect();
            Err(format!("{notes:?}"))
        },
    )
    .await;
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
