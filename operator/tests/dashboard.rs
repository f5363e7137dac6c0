//! The chart's Grafana dashboard queries only metrics that exist: every `charlm_operator_*` name in
//! its queries is one the operator's registry encodes, and every other `charlm_*` name one the
//! trainer's `to_prometheus` registers. A renamed metric fails here instead of leaving an empty
//! panel. (That the chart renders the dashboard: e2e/tests/dashboard.rs.)

use std::collections::BTreeSet;
use std::path::Path;

use charlm_operator::crd::CharLMTrainingStatus;
use charlm_operator::metrics::{Metrics, PhaseLabel, ReasonLabel, ResultLabel};

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap()
}

fn dashboard() -> serde_json::Value {
    let path = repo().join("charts/charlm-operator/dashboards/charlm.json");
    let text = std::fs::read_to_string(&path).unwrap();
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()))
}

/// Every PromQL text of the dashboard: the panels' `expr`s and the variables' queries.
fn queries(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(map) => {
            for (key, value) in map {
                match (key.as_str(), value) {
                    ("expr" | "definition", serde_json::Value::String(s)) => out.push(s.clone()),
                    ("query", serde_json::Value::String(s)) if s.contains("charlm") => {
                        out.push(s.clone())
                    }
                    _ => queries(value, out),
                }
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|i| queries(i, out)),
        _ => {}
    }
}

/// The metric names (`charlm_…`) a query reads.
fn names(query: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let bytes = query.as_bytes();
    let mut i = 0;
    while let Some(at) = query[i..].find("charlm_") {
        let start = i + at;
        let boundary =
            start == 0 || !(bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_');
        let end = start
            + query[start..]
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(query.len() - start);
        // `charlm_dev_training` is the PodMonitor's label of the training, not a metric.
        let name = &query[start..end];
        if boundary && name != "charlm_dev_training" {
            found.insert(name.to_string());
        }
        i = end;
    }
    found
}

/// The series names an OpenMetrics text's `# TYPE` lines declare (a counter's `_total`, a
/// histogram's `_bucket`, `_sum` and `_count`).
fn series(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("# TYPE ") else {
            continue;
        };
        let mut parts = rest.split_whitespace();
        let (name, kind) = (parts.next().unwrap(), parts.next().unwrap());
        let suffixes: &[&str] = match kind {
            "counter" => &["_total"],
            "histogram" => &["_bucket", "_sum", "_count"],
            _ => &[""],
        };
        for s in suffixes {
            out.insert(format!("{name}{s}"));
        }
    }
    out
}

/// The trainer's metric names, read from its source: the trainer crate links libtorch, which the
/// operator's tests do not build. `to_prometheus` registers each as `count("name", …)` or
/// `figure("name", …)` under the prefix `charlm`.
fn trainer_metrics() -> BTreeSet<String> {
    let path = repo().join("trainer/src/train/progress.rs");
    let source = std::fs::read_to_string(&path).unwrap();
    assert!(
        source.contains(r#"Registry::with_prefix("charlm")"#),
        "the trainer's metrics are no longer prefixed charlm_: update this test"
    );
    let mut out = BTreeSet::new();
    for call in ["count(", "figure("] {
        for piece in source.split(call).skip(1) {
            let piece = piece.trim_start();
            if let Some(rest) = piece.strip_prefix('"') {
                let name = &rest[..rest.find('"').unwrap()];
                out.insert(format!("charlm_{name}"));
            }
        }
    }
    out
}

/// The operator's registry with one series in every family: an empty family is not encoded.
fn every_operator_series() -> String {
    let m = Metrics::default();
    let label = |s: &str| s.to_string();
    m.reconciled(true, std::time::Duration::from_millis(1));
    m.gang_restarts
        .get_or_create(&ReasonLabel {
            reason: label("Error"),
        })
        .inc();
    m.phase_changes
        .get_or_create(&PhaseLabel {
            phase: label("Running"),
        })
        .inc();
    m.progress_polls
        .get_or_create(&ResultLabel {
            result: label("ok"),
        })
        .inc();
    m.training_status("ns", "t", &CharLMTrainingStatus::default());
    m.encode()
}

#[test]
fn every_metric_the_dashboard_reads_is_exported() {
    let mut texts = Vec::new();
    queries(&dashboard(), &mut texts);
    assert!(
        texts.len() >= 15,
        "the dashboard's queries were not found: {texts:?}"
    );
    let used: BTreeSet<String> = texts.iter().flat_map(|q| names(q)).collect();

    let operator = series(&every_operator_series());
    let trainer = trainer_metrics();
    // The reading of each side finds what it must, so that neither set is empty by mistake.
    assert!(
        operator.contains("charlm_operator_reconciliations_total"),
        "{operator:?}"
    );
    assert!(
        operator.contains("charlm_operator_training_estimated_cost"),
        "{operator:?}"
    );
    for name in [
        "charlm_step",
        "charlm_train_loss",
        "charlm_mfu",
        "charlm_gpu_peak_memory_gib",
    ] {
        assert!(trainer.contains(name), "{name} not found in {trainer:?}");
    }

    let unknown: Vec<&String> = used
        .iter()
        .filter(|n| {
            if n.starts_with("charlm_operator_") {
                !operator.contains(*n)
            } else {
                !trainer.contains(*n)
            }
        })
        .collect();
    assert!(
        unknown.is_empty(),
        "the dashboard reads metrics nobody exports: {unknown:?}\noperator: {operator:?}\ntrainer: {trainer:?}"
    );
    // The figures the issue asks for are all on it.
    for name in [
        "charlm_train_loss",
        "charlm_val_bpc",
        "charlm_tokens_per_second",
        "charlm_mfu",
        "charlm_gpu_peak_memory_gib",
        "charlm_operator_training_restarts",
        "charlm_operator_training_estimated_cost",
    ] {
        assert!(used.contains(name), "no panel reads {name}");
    }
}

#[test]
fn names_are_read_out_of_promql() {
    assert_eq!(
        names(
            r#"sum by (le) (rate(charlm_operator_reconcile_duration_seconds_bucket{x="charlm_dev_training"}[5m])) / charlm_step"#
        ),
        BTreeSet::from([
            "charlm_operator_reconcile_duration_seconds_bucket".to_string(),
            "charlm_step".to_string()
        ])
    );
    assert!(names("label_values(notcharlm_step, namespace)").is_empty());
}
