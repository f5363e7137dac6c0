//! The offline chart: `helm lint` and `helm template` accept the chart's values and refuse unsafe ones.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chart_lints_and_refuses_unsafe_values() {
    cluster::require_kubeconfig();
    let chart = repo_root().join("charts/charlm-operator");
    let chart = chart.to_str().unwrap();
    let lint = tool("helm", &["lint", "--strict", chart]).expect("helm lint --strict is clean");
    assert!(lint.contains("0 chart(s) failed"), "{lint}");
    // Offline rendering needs a Kubernetes version for the chart's kubeVersion constraint.
    let template = |sets: &[&str]| {
        let mut args = vec!["template", "t", chart, "--kube-version", "1.35.0"];
        args.extend(sets.iter().flat_map(|s| ["--set", s]));
        tool("helm", &args)
    };
    let rendered = template(&["replicaCount=2"]).unwrap();
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
        .filter_map(|d| serde_norway::from_str::<Value>(d).ok())
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
    let err = template(&["replicaCount=2", "leaderElection.enabled=false"])
        .expect_err("two replicas without leader election must not render");
    assert!(
        err.to_string()
            .contains("needs leaderElection.enabled=true"),
        "{err}"
    );
}
