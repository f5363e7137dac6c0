//! The chart's Grafana dashboard: `grafana.dashboard.enabled` renders one ConfigMap that carries
//! the sidecar's label and the dashboard as valid JSON, byte for byte the chart's file; off (the
//! default) renders none. Offline (`helm template`); the metric names it queries are checked
//! against the code in operator/tests/dashboard.rs.

use serde_json::Value;

use charlm_e2e::cluster::{repo_root, tool};

fn render(extra: &[&str]) -> Vec<Value> {
    let chart = repo_root().join("charts/charlm-operator");
    let args = [
        &[
            "template",
            "t",
            chart.to_str().unwrap(),
            "--kube-version",
            "1.35.0",
            "-n",
            "charlm-system",
        ][..],
        extra,
    ]
    .concat();
    let rendered = tool("helm", &args).unwrap();
    rendered
        .split("\n---")
        .filter_map(|d| serde_norway::from_str::<Value>(d).ok())
        .filter(|d| d.is_object())
        .collect()
}

fn dashboards(docs: &[Value]) -> Vec<&Value> {
    docs.iter()
        .filter(|d| {
            d["kind"] == "ConfigMap" && d["metadata"]["name"] == "t-charlm-operator-dashboard"
        })
        .collect()
}

#[test]
fn the_dashboard_configmap_renders_only_when_asked() {
    let off = render(&[]);
    assert!(!off.is_empty(), "the chart renders");
    assert!(
        !off.iter().any(|d| d["kind"] == "ConfigMap"),
        "no ConfigMap unless grafana.dashboard.enabled"
    );

    let on = render(&["--set", "grafana.dashboard.enabled=true"]);
    let found = dashboards(&on);
    assert_eq!(found.len(), 1, "one dashboard ConfigMap");
    let cm = found[0];
    assert_eq!(cm["metadata"]["namespace"], "charlm-system");
    assert_eq!(
        cm["metadata"]["labels"]["grafana_dashboard"], "1",
        "the sidecar's default label"
    );
    let text = cm["data"]["charlm.json"]
        .as_str()
        .expect("data.charlm.json");
    let json: Value = serde_json::from_str(text).expect("the dashboard is valid JSON");
    let file =
        std::fs::read_to_string(repo_root().join("charts/charlm-operator/dashboards/charlm.json"))
            .unwrap();
    assert_eq!(
        json,
        serde_json::from_str::<Value>(&file).unwrap(),
        "the chart's file, unchanged"
    );
    assert_eq!(json["uid"], "charlm-trainings");
    assert!(json["panels"].as_array().unwrap().len() >= 10);
    assert!(
        text.contains("{{charlm_dev_training}}"),
        "Grafana's legends are not taken for Helm's templates"
    );

    let custom = render(&[
        "--set",
        "grafana.dashboard.enabled=true",
        "--set",
        "grafana.dashboard.label=team/dashboards",
        "--set",
        "grafana.dashboard.labelValue=charlm",
        "--set",
        "grafana.dashboard.namespace=monitoring",
        "--set",
        "grafana.dashboard.annotations.grafana_folder=charlm",
    ]);
    let cm = dashboards(&custom)[0];
    assert_eq!(cm["metadata"]["labels"]["team/dashboards"], "charlm");
    assert!(cm["metadata"]["labels"].get("grafana_dashboard").is_none());
    assert_eq!(cm["metadata"]["namespace"], "monitoring");
    assert_eq!(cm["metadata"]["annotations"]["grafana_folder"], "charlm");

    let lint = tool(
        "helm",
        &[
            "lint",
            "--strict",
            repo_root().join("charts/charlm-operator").to_str().unwrap(),
            "--set",
            "grafana.dashboard.enabled=true",
        ],
    )
    .expect("helm lint --strict is clean with the dashboard");
    assert!(lint.contains("0 chart(s) failed"), "{lint}");
}
