//! The trainer's own report (docs/contract.md), `charlm_contract::ProgressReport`: the `/progress`
//! JSON of rank 0 while it runs, and the same object plus `complete` in its termination message
//! when it exits. The trainer speaks snake_case; the API speaks camelCase, so the report becomes a
//! `ProgressStatus` here, at the boundary.

use charlm_contract::ProgressReport;

use crate::crd::ProgressStatus;

/// The API's camelCase copy of a report. Destructured field by field, so that a field added to
/// the contract does not compile until the status says what becomes of it.
impl From<&ProgressReport> for ProgressStatus {
    fn from(report: &ProgressReport) -> Self {
        let ProgressReport {
            step,
            total_steps_estimate,
            tokens,
            epoch,
            train_loss,
            val_bpc,
            best_val_bpc,
            best_step,
            tokens_per_s,
            mfu,
            elapsed_s,
            eta_s,
            checkpoint,
            world_size,
            peak_memory_gib,
            tokens_per_epoch,
            complete,
            stop_reason,
            evals_since_best,
            saved_s: _,
            saved_gpu_hours,
            resumed_from,
            // Read by the reconciler (status.damagedCheckpoints, CheckpointDamaged).
            damaged_checkpoints: _,
            // Read by the reconciler for failure messages; not part of the status.
            error: _,
            // `launch`'s in-place restarts: not in the status yet (issue 35's operator part).
            in_place_restarts: _,
            last_restart_reason: _,
        } = report;
        let finite = |v: &Option<f64>| v.filter(|v| v.is_finite());
        ProgressStatus {
            step: *step,
            total_steps_estimate: *total_steps_estimate,
            tokens: i64::try_from(*tokens).unwrap_or(i64::MAX),
            epoch: *epoch,
            train_loss: finite(train_loss),
            val_bpc: finite(val_bpc),
            best_val_bpc: finite(best_val_bpc),
            best_step: *best_step,
            tokens_per_s: finite(tokens_per_s),
            mfu: finite(mfu),
            elapsed_s: *elapsed_s,
            eta_s: finite(eta_s),
            checkpoint: checkpoint.clone(),
            world_size: i64::try_from(*world_size).unwrap_or(i64::MAX),
            peak_memory_gib: finite(peak_memory_gib),
            tokens_per_epoch: tokens_per_epoch.map(|t| i64::try_from(t).unwrap_or(i64::MAX)),
            complete: *complete,
            stop_reason: stop_reason.clone(),
            evals_since_best: i64::from(*evals_since_best),
            saved_gpu_hours: finite(saved_gpu_hours),
            resumed_from: resumed_from.clone(),
            observed_time: None,
        }
    }
}

/// `3h05m`, `12m`, `40s`: the ETA column of `kubectl get clt`.
pub fn human_duration(seconds: f64) -> String {
    if !seconds.is_finite() || seconds < 0.0 {
        return "-".to_string();
    }
    let s = seconds.round() as u64;
    let (h, m) = (s / 3600, (s % 3600) / 60);
    if h >= 48 {
        format!("{}d{}h", h / 24, h % 24)
    } else if h > 0 {
        format!("{h}h{m:02}m")
    } else if m > 0 {
        format!("{m}m")
    } else {
        format!("{s}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_contract_example() {
        let text = r#"{"step": 1200, "total_steps_estimate": 9000, "tokens": 629145600, "epoch": 1.8,
 "train_loss": 0.92, "val_bpc": 1.31, "best_val_bpc": 1.30, "best_step": 1000,
 "tokens_per_s": 105000.0, "mfu": 0.53, "elapsed_s": 5990.0, "eta_s": 51600.0,
 "checkpoint": "/checkpoints/step-000001200", "world_size": 16, "peak_memory_gib": 61.2,
 "tokens_per_epoch": 343932928, "complete": false, "stop_reason": null}"#;
        let r = ProgressReport::parse(text).unwrap();
        assert_eq!(r.step, 1200);
        assert!(!r.complete);
        let s = ProgressStatus::from(&r);
        assert_eq!(s.tokens, 629145600);
        assert_eq!(s.val_bpc, Some(1.31));
        assert_eq!(s.checkpoint.as_deref(), Some("/checkpoints/step-000001200"));
        assert_eq!(s.world_size, 16);
        assert_eq!(s.tokens_per_epoch, Some(343932928));
        assert_eq!(s.stop_reason, None);
    }

    #[test]
    fn nulls_and_log_tails() {
        let r = ProgressReport::parse(r#"{"step":0,"train_loss":null,"complete":true}"#).unwrap();
        assert!(r.complete && r.train_loss.is_none());
        assert!(ProgressReport::parse("Traceback: something broke\n").is_none());
        assert!(ProgressReport::parse("{not json").is_none());
    }

    #[test]
    fn durations_read_well() {
        assert_eq!(human_duration(51600.0), "14h20m");
        assert_eq!(human_duration(600.0), "10m");
        assert_eq!(human_duration(42.0), "42s");
        assert_eq!(human_duration(3.0 * 86400.0 + 7200.0), "3d2h");
        assert_eq!(human_duration(f64::NAN), "-");
    }
}
