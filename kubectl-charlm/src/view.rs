//! `kubectl charlm status NAME` as text: what the status says, one figure a line, then the loss
//! curve. Pure: the training and the time are given, so the output is tested as it is printed.

use jiff::Timestamp;

use charlm_api::human_duration;
use charlm_api::names::pvc_name;
use charlm_api::{CharLMTraining, CharLMTrainingStatus};
use kube::ResourceExt;

use crate::curve;

/// Columns and rows of the loss curve.
const CURVE_WIDTH: usize = 48;
const CURVE_ROWS: usize = 4;

pub fn render(training: &CharLMTraining, now: Timestamp) -> String {
    let name = training.name_any();
    let default = CharLMTrainingStatus::default();
    let st = training.status.as_ref().unwrap_or(&default);
    let mut out = Vec::new();
    let mut line = |key: &str, value: String| out.push(format!("{key:<11}{value}"));

    line(
        "training",
        format!(
            "{name} (namespace {})",
            training.namespace().unwrap_or_default()
        ),
    );
    let phase = st.phase.map_or("(no status yet)", |p| p.as_str());
    match &st.message {
        Some(m) if !m.is_empty() => line("phase", format!("{phase}: {m}")),
        _ => line("phase", phase.to_string()),
    }
    let progress = st.progress.as_ref();
    if let Some(p) = progress {
        line("progress", progress_line(p.step, p.total_steps_estimate));
        let mut figures = vec![];
        if let Some(l) = p.train_loss {
            figures.push(format!("loss {l:.4} nats"));
        }
        if let Some(v) = p.val_bpc {
            figures.push(format!("val {v:.4} bpc"));
        }
        figures.push(format!("epoch {:.2}", p.epoch));
        line("latest", figures.join(", "));
        let mut speed = vec![];
        if let Some(t) = p.tokens_per_s {
            speed.push(format!("{} tok/s", thousands(t.round() as i64)));
        }
        if let Some(m) = p.mfu {
            speed.push(format!("MFU {:.1}%", m * 100.0));
        }
        if let Some(g) = p.peak_memory_gib {
            speed.push(format!("peak GPU memory {g:.1} GiB"));
        }
        if !speed.is_empty() {
            line("speed", speed.join(", "));
        }
    } else {
        line("progress", "no report from the trainer yet".into());
    }
    match (st.best_val_bpc, st.best_step) {
        (Some(b), Some(s)) => line(
            "best",
            format!("{b:.4} bpc at step {} (best/)", thousands(s)),
        ),
        (Some(b), None) => line("best", format!("{b:.4} bpc (best/)")),
        _ => line("best", "no evaluation yet".into()),
    }
    line("eta", eta(st, now));
    line("cost", cost(st));
    let max = training.spec.restart_policy.max_restarts;
    line(
        "restarts",
        format!("{} of {max} (restartPolicy.maxRestarts)", st.restarts),
    );
    let claim = st.checkpoint_pvc.clone().unwrap_or_else(|| pvc_name(&name));
    let checkpoint = st
        .latest_checkpoint
        .clone()
        .unwrap_or_else(|| "none yet".to_string());
    line("checkpoint", format!("{checkpoint} (claim {claim})"));

    match curve::plot(&st.loss_history, CURVE_WIDTH, CURVE_ROWS) {
        Some(lines) => {
            out.push(String::new());
            out.push("training loss (nats per token)".to_string());
            out.extend(lines);
        }
        None if !st.loss_history.is_empty() => {
            out.push(String::new());
            out.push("training loss: one point so far; the curve needs two".to_string());
        }
        None => {}
    }
    out.push(String::new());
    out.join("\n")
}

/// `1,200 / 9,000 steps (13.3%)`; the total is the trainer's estimate under an hours budget.
fn progress_line(step: i64, total: Option<i64>) -> String {
    match total {
        Some(t) if t > 0 => format!(
            "step {} / {} ({:.1}%)",
            thousands(step),
            thousands(t),
            100.0 * step as f64 / t as f64
        ),
        _ => format!("step {}", thousands(step)),
    }
}

/// Time left now: the trainer's estimate less the time since the operator read it. A finished
/// training has none.
pub fn eta(st: &CharLMTrainingStatus, now: Timestamp) -> String {
    if st.phase.is_some_and(|p| p.is_terminal()) {
        return "none (the training has ended)".to_string();
    }
    let Some(p) = &st.progress else {
        return "unknown (no report yet)".to_string();
    };
    let Some(left) = p.eta_s else {
        return "unknown (the trainer gave none)".to_string();
    };
    let since = p
        .observed_time
        .as_ref()
        .map_or(0.0, |t| now.duration_since(t.0).as_secs_f64().max(0.0));
    format!("{} left", human_duration((left - since).max(0.0)))
}

/// `1.50 GPU-hours, cost 4.50 at 3 per GPU-hour (budget 48.00 GPU-hours, 144.00)`.
fn cost(st: &CharLMTrainingStatus) -> String {
    let Some(u) = &st.usage else {
        return "nothing used yet".to_string();
    };
    let mut s = format!(
        "{:.2} GPU-hours, cost {:.2} at {} per GPU-hour",
        u.gpu_hours, u.estimated_cost, u.price_per_gpu_hour
    );
    if let Some(budget) = st.effective.as_ref().and_then(|e| e.budget_gpu_hours()) {
        s.push_str(&format!(
            " (budget {budget:.2} GPU-hours, {:.2})",
            budget * u.price_per_gpu_hour
        ));
    }
    s
}

/// `1234567` → `1,234,567`.
fn thousands(n: i64) -> String {
    let digits = n.unsigned_abs().to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    if n < 0 {
        format!("-{out}")
    } else {
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn training(status: serde_json::Value) -> CharLMTraining {
        serde_json::from_value(json!({
            "apiVersion": "charlm.dev/v1alpha1", "kind": "CharLMTraining",
            "metadata": {"name": "demo", "namespace": "team-a"},
            "spec": {"depth": 4, "gpus": 2, "hours": 8.0, "dataset": {"synthetic": {}}},
            "status": status,
        }))
        .unwrap()
    }

    fn at(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    #[test]
    fn a_running_training_shows_every_figure_and_the_curve() {
        let t = training(json!({
            "phase": "Running", "message": "all 1 workers train", "restarts": 1,
            "checkpointPvc": "demo-checkpoints",
            "latestCheckpoint": "/checkpoints/step-000001200",
            "bestValBpc": 1.2345, "bestStep": 1000,
            "progress": {
                "step": 1200, "totalStepsEstimate": 9000, "trainLoss": 0.92, "valBpc": 1.3,
                "epoch": 0.5, "tokensPerS": 12345.4, "mfu": 0.412, "peakMemoryGib": 61.3,
                "etaS": 3600.0, "observedTime": "2026-12-03T10:00:00Z"
            },
            "usage": {"gpuHours": 1.5, "estimatedCost": 4.5, "pricePerGpuHour": 3.0},
            "effective": {"depth": 4, "gpus": 2, "gpusPerNode": 8, "workers": 1,
                          "hours": 8.0, "deviceBatchSize": "auto"},
            "lossHistory": [{"step": 10, "loss": 3.0}, {"step": 1200, "loss": 0.92}]
        }));
        let text = render(&t, at("2026-12-03T10:20:00Z"));
        let expected = [
            "training   demo (namespace team-a)",
            "phase      Running: all 1 workers train",
            "progress   step 1,200 / 9,000 (13.3%)",
            "latest     loss 0.9200 nats, val 1.3000 bpc, epoch 0.50",
            "speed      12,345 tok/s, MFU 41.2%, peak GPU memory 61.3 GiB",
            "best       1.2345 bpc at step 1,000 (best/)",
            "eta        40m left",
            "cost       1.50 GPU-hours, cost 4.50 at 3 per GPU-hour (budget 16.00 GPU-hours, 48.00)",
            "restarts   1 of 3 (restartPolicy.maxRestarts)",
            "checkpoint /checkpoints/step-000001200 (claim demo-checkpoints)",
            "",
            "training loss (nats per token)",
        ];
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[..expected.len()], expected, "{text}");
        let curve = &lines[expected.len()..];
        assert_eq!(curve.len(), CURVE_ROWS + 1, "{text}");
        assert!(curve[0].starts_with(" 3.0000 ┤█"), "{text}");
        assert!(curve[CURVE_ROWS - 1].starts_with(" 0.9200 ┤"), "{text}");
        assert!(curve[CURVE_ROWS].trim_end().ends_with("1200"), "{text}");
    }

    #[test]
    fn a_new_training_says_what_it_lacks() {
        let text = render(
            &training(json!({"phase": "Pending"})),
            at("2026-12-03T10:00:00Z"),
        );
        for want in [
            "phase      Pending",
            "progress   no report from the trainer yet",
            "best       no evaluation yet",
            "eta        unknown (no report yet)",
            "cost       nothing used yet",
            "checkpoint none yet (claim demo-checkpoints)",
        ] {
            assert!(
                text.lines().any(|l| l == want),
                "{want:?} missing from\n{text}"
            );
        }
        assert!(!text.contains("training loss"), "{text}");
    }

    #[test]
    fn eta_counts_down_from_the_report_and_ends_with_the_training() {
        let mut st: CharLMTrainingStatus = serde_json::from_value(json!({
            "phase": "Running",
            "progress": {"step": 1, "etaS": 600.0, "observedTime": "2026-12-03T10:00:00Z"}
        }))
        .unwrap();
        assert_eq!(eta(&st, at("2026-12-03T10:00:00Z")), "10m left");
        assert_eq!(eta(&st, at("2026-12-03T10:04:00Z")), "6m left");
        assert_eq!(
            eta(&st, at("2026-12-03T11:00:00Z")),
            "0s left",
            "never negative"
        );
        st.phase = Some(charlm_api::Phase::Succeeded);
        assert_eq!(
            eta(&st, at("2026-12-03T10:00:00Z")),
            "none (the training has ended)"
        );
    }

    #[test]
    fn thousands_are_grouped() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1000), "1,000");
        assert_eq!(thousands(1234567), "1,234,567");
        assert_eq!(thousands(-1234), "-1,234");
    }
}
