//! What rank 0's report says, into the status: progress, the best checkpoint, the loss curve,
//! checkpoints set aside as damaged, `PastBest`, and the budget advice (`status.plan`,
//! `DataConstrained`).

use super::{Decider, MAX_DAMAGED};
use crate::conditions::{self, FALSE, TRUE};
use crate::crd::{condition as cond, ProgressStatus};
use crate::history;
use crate::progress::human_duration;
use charlm_budget as planner;
use charlm_contract::ProgressReport;
use charlm_contract::PAST_BEST_EVALUATIONS;

/// The trainer's `--seq-len` when the settings leave it unset.
const DEFAULT_SEQ_LEN: i64 = 2048;

impl Decider<'_> {
    pub(super) fn take_progress(&mut self, report: &ProgressReport) {
        let mut progress = ProgressStatus::from(report);
        progress.observed_time = Some(self.now.clone());
        let st = self.st();
        st.eta = progress.eta_s.map(human_duration);
        if progress.checkpoint.is_some() {
            st.latest_checkpoint = progress.checkpoint.clone();
        }
        // A report without a best (e.g. before the first evaluation of an attempt) keeps the last one.
        if let Some(best) = progress.best_val_bpc {
            st.best_val_bpc = Some(best);
            st.best_step = progress.best_step;
        }
        if let Some(loss) = progress.train_loss {
            history::record(&mut st.loss_history, progress.step, loss);
        }
        let (epb, tokens_per_epoch) = (progress.evals_since_best, progress.tokens_per_epoch);
        st.progress = Some(progress);
        self.past_best(epb);
        self.advise_budget(tokens_per_epoch);
        self.damaged(report);
    }

    /// `CheckpointDamaged` and a Warning Event for each checkpoint a resume set aside that the
    /// status does not name yet (a report is read many times).
    pub(super) fn damaged(&mut self, report: &ProgressReport) {
        let attempt = self.decision.status.attempt;
        let instead = report.resumed_from.as_deref().map_or_else(
            || "nothing: it started from step 0".to_string(),
            |d| format!("{d} instead"),
        );
        for d in &report.damaged_checkpoints {
            if self.decision.status.damaged_checkpoints.contains(&d.path) {
                continue;
            }
            let list = &mut self.decision.status.damaged_checkpoints;
            list.push(d.path.clone());
            let excess = list.len().saturating_sub(MAX_DAMAGED);
            list.drain(..excess);
            let msg = format!(
                "checkpoint {} failed its check when attempt {attempt} resumed ({}) and was set \
                 aside as {}; the trainer resumed from {instead}",
                d.path, d.error, d.set_aside_as
            );
            if self.is(cond::CHECKPOINT_DAMAGED) {
                // The condition's transition already told of an earlier one.
                self.decision
                    .warnings
                    .push(("CheckpointDamaged".to_string(), msg.clone()));
            }
            self.set(cond::CHECKPOINT_DAMAGED, TRUE, "CheckpointDamaged", msg);
        }
    }

    /// `PastBest`: True while the trainer reports more evaluations since its best than
    /// [`PAST_BEST_EVALUATIONS`] (early stop off, a longer patience, or a model worse without
    /// memorising, which early stop does not count).
    pub(super) fn past_best(&mut self, evals_since_best: i64) {
        let past = i64::from(PAST_BEST_EVALUATIONS);
        if evals_since_best > past {
            let (bpc, step) = (self.st().best_val_bpc, self.st().best_step);
            let msg = format!(
                "{evals_since_best} evaluations since the best validation bpc ({} at step {}): the \
                 GPUs are paying for a model no better than best/; set earlyStop.patience (it \
                 counts only evaluations where the model memorises) or delete the training",
                bpc.map_or("?".into(), |b| format!("{b:.4}")),
                step.map_or("?".into(), |s| s.to_string())
            );
            self.set(cond::PAST_BEST, TRUE, "PastBest", msg);
        } else if conditions::get(&self.decision.status.conditions, cond::PAST_BEST).is_some() {
            self.set(cond::PAST_BEST, FALSE, "Improving", "");
        }
    }

    /// `status.plan` and `DataConstrained` from the dataset's size (the trainer's tokens per
    /// epoch) and the effective depth, GPUs and hours.
    pub(super) fn advise_budget(&mut self, tokens_per_epoch: Option<i64>) {
        let price = self.o.price_per_gpu_hour;
        let Some(effective) = self.st().effective.clone() else {
            return;
        };
        let (Some(unique), Some(hours)) = (tokens_per_epoch, effective.hours) else {
            return;
        };
        if effective.gpus < 1 || unique < 1 {
            return;
        }
        let budget = planner::Budget {
            gpus: effective.gpus as u32,
            hours,
            price_per_gpu_hour: price,
            unique_tokens: unique as u64,
            seq_len: effective.seq_len.map_or(DEFAULT_SEQ_LEN, i64::from),
        };
        let plan = planner::plan(&budget);
        let own = planner::depth_plan(i64::from(effective.depth), &budget);
        self.st().plan = Some(crate::crd::BudgetAdvice {
            epochs: own.epochs,
            recommended_depth: plan.recommended_depth,
            recommended_hours: plan.recommended_hours,
            hours_to_best: own.hours_to_best,
            budget_cost: plan.budget_cost,
            recommended_cost: plan.recommended_cost,
            unique_tokens: unique,
        });
        match planner::data_constrained_warning(i64::from(effective.depth), &budget) {
            Some(msg) => self.set(cond::DATA_CONSTRAINED, TRUE, "ManyEpochs", msg),
            None => self.set(
                cond::DATA_CONSTRAINED,
                FALSE,
                "FewEpochs",
                format!("{:.1} epochs over the data", own.epochs),
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::planner;
    use crate::decision::testing::*;

    #[test]
    fn the_plan_and_data_constrained_come_from_the_reported_dataset_size() {
        // Depth 24 on 16 GPUs for 2 hours over 344 M tokens: ~38 epochs.
        let (t, pods) = running_gpu_training();
        let d = observe_report(
            &t,
            &pods,
            r#"{"step": 30, "tokens_per_epoch": 343932928, "complete": false}"#,
            40,
        );
        let plan = d.status.plan.clone().unwrap();
        assert!((30.0..45.0).contains(&plan.epochs), "{plan:?}");
        assert_eq!(plan.budget_cost, 16.0 * 2.0 * 3.0);
        assert!(plan.recommended_hours <= 2.0 && plan.recommended_cost <= plan.budget_cost);
        assert_eq!(condition(&d, c::DATA_CONSTRAINED), ("True", "ManyEpochs"));
        let msg = &conditions::get(&d.status.conditions, c::DATA_CONSTRAINED)
            .unwrap()
            .message;
        assert!(
            msg.contains("epochs") && msg.contains("recommends depth"),
            "{msg}"
        );
        // Ten times the data: about four epochs, not constrained.
        let d = observe_report(
            &with(t, &d),
            &pods,
            r#"{"step": 30, "tokens_per_epoch": 3439329280, "complete": false}"#,
            50,
        );
        assert_eq!(condition(&d, c::DATA_CONSTRAINED), ("False", "FewEpochs"));
    }

    #[test]
    fn the_budget_advice_uses_the_attempts_sequence_length() {
        // Issue 32: the advice assumed 2048 whatever seqLen said. At 512, attention is a smaller
        // share of each token's FLOPs, so more tokens go through in the budget: more epochs.
        let advice = |seq_len: Option<i32>| {
            let mut spec = gpu_spec();
            if let Some(n) = seq_len {
                spec["seqLen"] = serde_json::json!(n);
            }
            let t = training(spec);
            let t = with(t.clone(), &decide_at(&t, &[], 0));
            let pods = vec![
                running(pod(&t, 0, 0), "10.0.0.1"),
                running(pod(&t, 1, 0), "10.0.0.2"),
            ];
            let t = with(t.clone(), &decide_at(&t, &pods, 5));
            let report = r#"{"step": 30, "tokens_per_epoch": 343932928, "complete": false}"#;
            observe_report(&t, &pods, report, 40).status.plan.unwrap()
        };
        let budget = |seq_len| planner::Budget {
            gpus: 16,
            hours: 2.0,
            price_per_gpu_hour: 3.0,
            unique_tokens: 343932928,
            seq_len,
        };
        let (short, default) = (advice(Some(512)), advice(None));
        assert_eq!(short.epochs, planner::depth_plan(24, &budget(512)).epochs);
        assert_eq!(
            default.epochs,
            planner::depth_plan(24, &budget(2048)).epochs
        );
        assert!(short.epochs > default.epochs, "{short:?} vs {default:?}");
        assert_eq!(
            short.recommended_depth,
            planner::plan(&budget(512)).recommended_depth
        );
    }

    #[test]
    fn running_past_the_best_by_more_than_four_evaluations_warns_until_it_improves() {
        let (t, pods) = running_gpu_training();
        let four = r#"{"step": 30, "best_val_bpc": 1.2, "best_step": 10, "evals_since_best": 4}"#;
        let d = observe_report(&t, &pods, four, 40);
        assert!(conditions::get(&d.status.conditions, c::PAST_BEST).is_none());
        let five = r#"{"step": 40, "best_val_bpc": 1.2, "best_step": 10, "evals_since_best": 5}"#;
        let t = with(t, &d);
        let d = observe_report(&t, &pods, five, 50);
        assert_eq!(condition(&d, c::PAST_BEST), ("True", "PastBest"));
        let msg = &conditions::get(&d.status.conditions, c::PAST_BEST)
            .unwrap()
            .message;
        assert!(
            msg.contains("1.2000 at step 10") && msg.contains("earlyStop.patience"),
            "{msg}"
        );
        assert_eq!(d.status.progress.as_ref().unwrap().evals_since_best, 5);
        let better = r#"{"step": 50, "best_val_bpc": 1.1, "best_step": 50, "evals_since_best": 0}"#;
        let d = observe_report(&with(t, &d), &pods, better, 60);
        assert_eq!(condition(&d, c::PAST_BEST), ("False", "Improving"));
    }

    #[test]
    fn a_damaged_checkpoint_at_resume_is_a_condition_and_an_event() {
        let (t, pods) = running_gpu_training();
        let report = |paths: &[&str]| {
            let damaged: Vec<serde_json::Value> = paths
                .iter()
                .map(|p| serde_json::json!({"path": p, "set_aside_as": format!("{p}.damaged"), "error": "model.safetensors: sha256 mismatch"}))
                .collect();
            serde_json::json!({"step": 200, "resumed_from": "/checkpoints/step-000000100", "damaged_checkpoints": damaged}).to_string()
        };
        let first = report(&["/checkpoints/step-000000200"]);
        let d = decide_on(&t, &pods, 40, claim_bound(), Some(&first));
        assert_eq!(
            condition(&d, c::CHECKPOINT_DAMAGED),
            ("True", "CheckpointDamaged")
        );
        let msg = &conditions::get(&d.status.conditions, c::CHECKPOINT_DAMAGED)
            .unwrap()
            .message;
        for needle in [
            "checkpoint /checkpoints/step-000000200 failed its check",
            "sha256 mismatch",
            "set aside as /checkpoints/step-000000200.damaged",
            "resumed from /checkpoints/step-000000100 instead",
        ] {
            assert!(msg.contains(needle), "{needle:?} in {msg}");
        }
        assert_eq!(
            d.status.damaged_checkpoints,
            ["/checkpoints/step-000000200"]
        );
        assert!(
            d.warnings.is_empty(),
            "the condition's transition is the Event"
        );
        assert!(conditions::is_warning(
            conditions::get(&d.status.conditions, c::CHECKPOINT_DAMAGED).unwrap()
        ));
        assert_eq!(
            d.status.progress.as_ref().unwrap().resumed_from.as_deref(),
            Some("/checkpoints/step-000000100")
        );
        // Read again: nothing new. A later one: its own Event.
        let t = with(t, &d);
        let d = decide_on(&t, &pods, 80, claim_bound(), Some(&first));
        assert!(d.warnings.is_empty());
        let t = with(t, &d);
        let later = report(&["/checkpoints/step-000000300"]);
        let d = decide_on(&t, &pods, 120, claim_bound(), Some(&later));
        assert_eq!(d.warnings.len(), 1);
        assert!(d.warnings[0].1.contains("step-000000300"));
        assert_eq!(d.status.damaged_checkpoints.len(), 2);
    }
}
