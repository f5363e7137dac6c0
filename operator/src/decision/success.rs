//! Success: worker 0 exited 0 and says its budget is done (or it stopped early); the reports the
//! workers left in their termination messages.

use super::Decider;
use crate::conditions::{FALSE, TRUE};
use crate::crd::{condition as cond, Phase};
use crate::workers::{Worker, WorkerState};
use charlm_contract::ProgressReport;

impl Decider<'_> {
    /// Worker 0 exited 0 and says the budget is done.
    pub(super) fn success(&self, current: &[&Worker]) -> Option<ProgressReport> {
        current.iter().find_map(|w| match &w.state {
            WorkerState::Succeeded { report: Some(r) } if w.index == Some(0) && r.complete => {
                Some(r.clone())
            }
            _ => None,
        })
    }

    pub(super) fn succeed(&mut self, current: &[&Worker], report: ProgressReport) {
        self.stop_usage(current);
        self.delete(current, true);
        self.take_progress(&report);
        let now = self.now.clone();
        let st = self.st();
        st.final_val_bpc = report.val_bpc.or(report.best_val_bpc);
        st.completion_time = Some(now);
        st.eta = None;
        st.restart_after = None;
        let bpc = report
            .val_bpc
            .map(|v| format!("{v:.4}"))
            .unwrap_or_else(|| "not measured".into());
        let best = match (st.best_val_bpc, st.best_step) {
            (Some(v), Some(step)) => format!("; best {v:.4} at step {step} (checkpoint best/)"),
            (Some(v), None) => format!("; best {v:.4}"),
            _ => String::new(),
        };
        let early = report.stop_reason.as_deref() == Some("early_stop");
        let msg = format!(
            "training complete at step {}{}; validation bits per character {bpc}{best}; checkpoint {}",
            report.step,
            if early { " (early stop)" } else { "" },
            report.checkpoint.as_deref().unwrap_or("none")
        );
        let reason = if early { "EarlyStopped" } else { "BudgetDone" };
        self.set(cond::SUCCEEDED, TRUE, reason, msg.clone());
        self.set(cond::RUNNING, FALSE, "Succeeded", "");
        self.set(cond::PODS_READY, FALSE, "Completed", "");
        self.set(cond::RESTARTING, FALSE, "Succeeded", "");
        self.phase(Phase::Succeeded, msg);
    }
}

/// Worker 0's final report (it holds the checkpoint), else any worker's.
pub(super) fn final_report(current: &[&Worker]) -> Option<ProgressReport> {
    let first = current
        .iter()
        .filter(|w| w.index == Some(0))
        .find_map(|w| worker_report(w));
    first.or_else(|| current.iter().find_map(|w| worker_report(w)))
}

pub(super) fn worker_report(w: &Worker) -> Option<ProgressReport> {
    match &w.state {
        WorkerState::Succeeded { report } => report.clone(),
        WorkerState::Failed(f) => f.report.clone(),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use crate::decision::testing::*;

    #[test]
    fn worker_zero_complete_means_succeeded() {
        let (t, mut pods) = running_gpu_training();
        pods[0] = terminated(
            pod(&t, 0, 0),
            TRAINER_CONTAINER,
            0,
            r#"{"step": 9000, "val_bpc": 1.2345, "checkpoint": "/checkpoints/step-000009000", "complete": true}"#,
        );
        let d = decide_at(&t, &pods, 500);
        assert_eq!(d.status.phase, Some(Phase::Succeeded));
        assert_eq!(condition(&d, c::SUCCEEDED), ("True", "BudgetDone"));
        assert_eq!(d.status.final_val_bpc, Some(1.2345));
        assert_eq!(
            d.status.latest_checkpoint.as_deref(),
            Some("/checkpoints/step-000009000")
        );
        assert_eq!(d.status.completion_time, Some(Time(at(500))));
        assert_eq!(d.delete, ["demo-worker-1"]);
        // Terminal: later reconciles change nothing.
        let t = with(t, &d);
        let d2 = decide_at(&t, &pods[..1], 600);
        assert_eq!(d2.status.phase, Some(Phase::Succeeded));
        assert!(d2.create.is_empty() && d2.delete.is_empty());
        assert_eq!(d2.requeue, None);
    }

    #[test]
    fn an_early_stop_is_a_success_that_says_so() {
        let (t, mut pods) = running_gpu_training();
        pods[0] = terminated(
            pod(&t, 0, 0),
            TRAINER_CONTAINER,
            0,
            r#"{"step": 4000, "val_bpc": 1.3, "complete": true, "stop_reason": "early_stop"}"#,
        );
        let d = decide_at(&t, &pods, 500);
        assert_eq!(d.status.phase, Some(Phase::Succeeded));
        assert_eq!(condition(&d, c::SUCCEEDED), ("True", "EarlyStopped"));
        assert!(d.status.message.unwrap().contains("(early stop)"));
        assert_eq!(
            d.status.progress.unwrap().stop_reason.as_deref(),
            Some("early_stop")
        );
    }

    #[test]
    fn a_gang_cut_short_by_a_crash_is_completed_not_restarted() {
        // The operator created worker 0 and died before worker 1 and before writing the status.
        let t = training(gpu_spec());
        let pods = vec![running(pod(&t, 0, 0), "10.0.0.1")];
        let d = decide_at(&t, &pods, 0);
        assert_eq!(d.create, [1]);
        assert_eq!(d.status.restarts, 0);
    }

    #[test]
    fn the_best_validation_and_epochs_survive_an_early_stop() {
        let (t, pods) = running_gpu_training();
        let d = look(&t, &pods, 40)
            .report(Some(
                r#"{"step": 3000, "val_bpc": 1.25, "best_val_bpc": 1.2, "best_step": 2500, "epoch": 2.5, "tokens_per_epoch": 343932928, "complete": false}"#,
            ))
            .decide();
        assert_eq!(
            (d.status.best_val_bpc, d.status.best_step),
            (Some(1.2), Some(2500))
        );
        let t = with(t, &d);
        let mut pods = pods;
        pods[0] = terminated(
            pod(&t, 0, 0),
            TRAINER_CONTAINER,
            0,
            r#"{"step": 4000, "val_bpc": 1.26, "best_val_bpc": 1.2, "best_step": 2500, "epoch": 3.3, "tokens_per_epoch": 343932928, "complete": true, "stop_reason": "early_stop"}"#,
        );
        let d = decide_at(&t, &pods, 500);
        assert_eq!(condition(&d, c::SUCCEEDED), ("True", "EarlyStopped"));
        let st = &d.status;
        assert_eq!((st.best_val_bpc, st.best_step), (Some(1.2), Some(2500)));
        let p = st.progress.as_ref().unwrap();
        assert_eq!((p.epoch, p.tokens_per_epoch), (3.3, Some(343932928)));
        let msg = st.message.as_deref().unwrap();
        assert!(
            msg.contains("(early stop)") && msg.contains("best 1.2000 at step 2500"),
            "{msg}"
        );
        // A report without a best keeps the one known.
        let t = with(t, &d);
        assert_eq!(decide_at(&t, &pods, 600).status.best_val_bpc, Some(1.2));
    }
}
