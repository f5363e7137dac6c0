//! The network: the chart's NetworkPolicy settings, each training's own NetworkPolicy, and no dial off the machine.

use super::*;

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
