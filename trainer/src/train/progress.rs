//! What a running training reports about itself (docs/contract.md): one `ProgressReport` (of
//! the contract crate), served as JSON on `/progress` and as Prometheus metrics on `/metrics` by
//! global rank 0 (`endpoint`), and written once to the termination log on exit. Reporting never
//! stops training: a port that is taken is a warning.

use std::sync::{Arc, Mutex};

use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

use charlm_contract::ProgressReport;

pub type SharedProgress = Arc<Mutex<ProgressReport>>;

/// The content type of `/metrics`: OpenMetrics text, which `prometheus-client` writes and
/// Prometheus reads (the same names, values and help as the older Prometheus text, plus `# EOF`).
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The report's figures as OpenMetrics text: one gauge per figure, named `charlm_<figure>`; a
/// figure the report does not have yet (no validation before the first evaluation) is left out.
pub fn to_prometheus(report: &ProgressReport) -> String {
    let mut registry = Registry::with_prefix("charlm");
    // prometheus-client ends each help text with a period.
    let mut count = |name: &str, help: &str, value: i64| {
        registry.register(name, help, ConstGauge::new(value));
    };
    let whole = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
    count("step", "Optimizer steps taken", report.step);
    count("tokens", "Training tokens seen", whole(report.tokens));
    count("world_size", "Worker processes", whole(report.world_size));
    count(
        "complete",
        "1 once the budget is spent",
        i64::from(report.complete),
    );
    let mut figure = |name: &str, help: &str, value: Option<f64>| {
        if let Some(v) = value {
            registry.register(name, help, ConstGauge::<f64>::new(v));
        }
    };
    figure(
        "epoch",
        "Passes over the training split",
        Some(report.epoch),
    );
    figure(
        "train_loss",
        "Training loss (nats per token)",
        report.train_loss,
    );
    figure("val_bpc", "Validation bits per character", report.val_bpc);
    figure(
        "best_val_bpc",
        "Best validation bits per character",
        report.best_val_bpc,
    );
    figure(
        "tokens_per_second",
        "Training throughput",
        report.tokens_per_s,
    );
    figure(
        "mfu",
        "Model FLOPs utilisation (0..1) over 989 TFLOP/s per GPU",
        report.mfu,
    );
    figure(
        "elapsed_seconds",
        "Training time spent, resumes included",
        Some(report.elapsed_s),
    );
    figure("eta_seconds", "Estimated training time left", report.eta_s);
    figure(
        "gpu_peak_memory_gib",
        "Peak GPU memory allocated",
        report.peak_memory_gib,
    );
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, &registry)
        .expect("writing to a String cannot fail");
    out
}

/// Writes the final state where a supervisor reads it (Kubernetes' termination message).
pub fn write_termination_log(path: &str, progress: &ProgressReport) {
    if let Err(e) = std::fs::write(path, serde_json::to_string(progress).unwrap_or_default()) {
        eprintln!("warning: could not write the termination log {path}: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_keep_their_names_and_leave_absent_figures_out() {
        let text = to_prometheus(&ProgressReport {
            step: 42,
            tokens: 1 << 20,
            val_bpc: Some(1.25),
            complete: true,
            world_size: 2,
            ..Default::default()
        });
        for line in [
            "# HELP charlm_step Optimizer steps taken.\n# TYPE charlm_step gauge\ncharlm_step 42\n",
            "charlm_tokens 1048576\n",
            "charlm_world_size 2\n",
            "charlm_complete 1\n",
            "# HELP charlm_val_bpc Validation bits per character.\n",
            "charlm_val_bpc 1.25\n",
            "charlm_epoch 0.0\n",
            "charlm_elapsed_seconds 0.0\n",
        ] {
            assert!(text.contains(line), "{line:?} missing from\n{text}");
        }
        assert!(
            !text.contains("charlm_train_loss"),
            "absent values are not exported"
        );
        assert!(text.ends_with("# EOF\n"), "{text}");
    }
}
