//! Rank 0's report of a running training: served as JSON on `/progress` while it runs, and written
//! once to the termination log (and `COMPLETE.json`) when it ends. The trainer writes every field
//! (absent values as `null`); readers take a missing field as its default, so an older trainer's
//! report still parses.

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct ProgressReport {
    /// Optimizer steps taken.
    pub step: i64,
    #[serde(default)]
    pub total_steps_estimate: Option<i64>,
    /// Training tokens seen.
    #[serde(default)]
    pub tokens: u64,
    /// Passes over the training split.
    #[serde(default)]
    pub epoch: f64,
    #[serde(default)]
    pub train_loss: Option<f64>,
    #[serde(default)]
    pub val_bpc: Option<f64>,
    #[serde(default)]
    pub best_val_bpc: Option<f64>,
    #[serde(default)]
    pub best_step: Option<i64>,
    #[serde(default)]
    pub tokens_per_s: Option<f64>,
    /// Model FLOPs utilisation (0..1) on GPUs.
    #[serde(default)]
    pub mfu: Option<f64>,
    /// Training time spent, resumes included.
    #[serde(default)]
    pub elapsed_s: f64,
    #[serde(default)]
    pub eta_s: Option<f64>,
    /// The newest checkpoint's directory.
    #[serde(default)]
    pub checkpoint: Option<String>,
    /// Worker processes.
    #[serde(default)]
    pub world_size: u64,
    #[serde(default)]
    pub peak_memory_gib: Option<f64>,
    /// Training tokens in one pass over the training split.
    #[serde(default)]
    pub tokens_per_epoch: Option<u64>,
    /// The budget is spent or training stopped early: a restart has nothing to do.
    #[serde(default)]
    pub complete: bool,
    /// Why training ended, one of [`StopReason`]'s names (absent while it runs).
    #[serde(default)]
    pub stop_reason: Option<String>,
    /// Evaluations since the best one: past [`PAST_BEST_EVALUATIONS`] the training is paying
    /// for a model no better than `best/` (the operator's `PastBest` condition).
    #[serde(default)]
    pub evals_since_best: u32,
    /// Training seconds an early stop left unspent of the budget (null unless it stopped early).
    #[serde(default)]
    pub saved_s: Option<f64>,
    /// `saved_s` × ranks in hours: the GPU-hours saved on GPUs.
    #[serde(default)]
    pub saved_gpu_hours: Option<f64>,
    /// The checkpoint directory this run resumed from; null on a fresh start.
    #[serde(default)]
    pub resumed_from: Option<String>,
    /// Checkpoints this run's resume found damaged and set aside (renamed `<dir>.damaged`),
    /// newest first; `resumed_from` is the older one it used instead. Empty on a clean resume.
    #[serde(default)]
    pub damaged_checkpoints: Vec<DamagedCheckpoint>,
    /// In-place restarts of `launch` in this pod's life (its restart round; 0 in the first): the
    /// workers were started again after a worker failed, without a new pod.
    #[serde(default)]
    pub in_place_restarts: u64,
    /// What ended the round before (a worker that failed, and what rank 0 saved), in the last
    /// in-place restart.
    #[serde(default)]
    pub last_restart_reason: Option<String>,
    /// Why a failing trainer stopped, when it says so in its report (the trainer itself never
    /// writes it today; it is left out of the JSON when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// A checkpoint that failed its check (a file missing, truncated or not matching its sha256) when
/// a run looked for the newest good one, and was renamed so that no later save collides with it.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct DamagedCheckpoint {
    /// Where it was (`/checkpoints/step-000001200`).
    pub path: String,
    /// Where it is now (`/checkpoints/step-000001200.damaged`).
    pub set_aside_as: String,
    /// What failed its check.
    pub error: String,
}

impl ProgressReport {
    /// Parses a termination message or a `/progress` body; `None` when it is not a report (e.g. the
    /// log tail Kubernetes keeps when the trainer died before writing one).
    pub fn parse(text: &str) -> Option<Self> {
        let text = text.trim();
        if !text.starts_with('{') {
            return None;
        }
        serde_json::from_str(text).ok()
    }
}

/// Evaluations without a better validation bpc after which a training counts as running past its
/// best (the trainer warns, the operator sets `PastBest`). The default early stop ends a
/// memorising training sooner (two memorising evaluations past its best); this catches the ones
/// it does not end: patience 0, a longer patience, or a model getting worse without memorising.
pub const PAST_BEST_EVALUATIONS: u32 = 4;

/// Why a training ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// The hours or the step limit are spent: complete.
    Budget,
    /// `--early-stop-patience` evaluations without a better validation bpc: complete.
    EarlyStop,
    /// SIGTERM or SIGINT: a checkpoint is saved and the training resumes when started again.
    Signal,
}

impl StopReason {
    pub const ALL: [StopReason; 3] = [Self::Budget, Self::EarlyStop, Self::Signal];

    /// The name in [`ProgressReport::stop_reason`].
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Budget => "budget",
            Self::EarlyStop => "early_stop",
            Self::Signal => "signal",
        }
    }

    /// Whether the training is over (a signal only interrupts it).
    pub fn is_complete(self) -> bool {
        self != Self::Signal
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_trainer_writes_every_field_and_leaves_out_an_absent_error() {
        let json = serde_json::to_value(ProgressReport::default()).unwrap();
        let keys: Vec<&str> = json
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(keys.len(), 25, "{keys:?}");
        assert!(json["train_loss"].is_null() && !keys.contains(&"error"));
        assert!(json["resumed_from"].is_null());
        assert_eq!(json["damaged_checkpoints"], serde_json::json!([]));
        assert_eq!(json["in_place_restarts"], 0);
        assert!(json["last_restart_reason"].is_null());
    }

    #[test]
    fn a_report_with_only_a_step_parses_and_a_log_tail_does_not() {
        let r = ProgressReport::parse(r#" {"step": 3, "complete": true} "#).unwrap();
        assert_eq!((r.step, r.complete, r.world_size), (3, true, 0));
        assert!(ProgressReport::parse("Traceback: something broke").is_none());
        assert!(
            ProgressReport::parse(r#"{"complete": true}"#).is_none(),
            "step is required"
        );
    }

    #[test]
    fn stop_reasons_read_as_the_contract_spells_them() {
        let names: Vec<&str> = StopReason::ALL.iter().map(|r| r.as_str()).collect();
        assert_eq!(names, ["budget", "early_stop", "signal"]);
        assert!(StopReason::Budget.is_complete() && !StopReason::Signal.is_complete());
    }
}
