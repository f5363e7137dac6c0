//! What the operator writes: `CharLMTraining`'s status (phase, workers, restarts, progress, the
//! settings it runs with, the budget advice, the cost) and the ETA's duration format.

use charlm_contract::ProgressReport;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::batch::DeviceBatchSize;
use crate::failure::FailureCounts;
use crate::preset::Preset;
use crate::recipe::{Precision, Recipe};

/// Where a training stands; conditions carry the detail.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum Phase {
    /// Waiting for the dataset, the volume or the pods.
    Pending,
    /// All workers run.
    Running,
    /// A worker failed or stopped; all workers are being replaced.
    Restarting,
    /// `spec.suspend` is true: no workers, the checkpoint is kept.
    Suspended,
    /// Waiting for Kueue to admit it (label `kueue.x-k8s.io/queue-name`), or preempted by Kueue
    /// and queued again: no workers, the checkpoint is kept.
    Queued,
    /// The budget is done.
    Succeeded,
    /// Out of restarts, or bad input.
    Failed,
}

impl Phase {
    pub fn is_terminal(self) -> bool {
        matches!(self, Phase::Succeeded | Phase::Failed)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Pending => "Pending",
            Phase::Running => "Running",
            Phase::Restarting => "Restarting",
            Phase::Suspended => "Suspended",
            Phase::Queued => "Queued",
            Phase::Succeeded => "Succeeded",
            Phase::Failed => "Failed",
        }
    }
}

/// What the operator observed of a training: its phase and conditions, its workers, restarts and
/// failures, the checkpoint volume, rank 0's progress, the settings it runs with, and its cost.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CharLMTrainingStatus {
    /// Where the training stands: Pending, Queued, Running, Restarting, Suspended, Succeeded or
    /// Failed; `message` and the conditions say why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<Phase>,
    /// One line on why the training is in its phase.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// The latest observations of the training, one per type: DatasetReady, PodsReady, Running,
    /// Succeeded, Failed, Suspended, Restarting, Admitted (queued in Kueue), and the warnings
    /// DataConstrained and PastBest. Each change of one is also an Event.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// The generation of the spec this status was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Worker pods of the current attempt.
    #[serde(default)]
    pub workers: i32,
    /// Worker pods of the current attempt that run.
    #[serde(default)]
    pub running_workers: i32,
    /// Gang restarts so far (counted against restartPolicy.maxRestarts).
    #[serde(default)]
    pub restarts: i32,
    /// Failures that ended an attempt, by reason, over the training's life (counted or not).
    #[serde(default)]
    pub failures: FailureCounts,
    /// Increases each time a new set of worker pods is started after a failure or a fix of the
    /// spec; worker pods carry it as the `charlm.dev/attempt` label.
    #[serde(default)]
    pub attempt: i64,
    /// The attempt whose worker pods have all been created; a worker missing from it was lost.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub launched_attempt: Option<i64>,
    /// When the pods of the current attempt were created (the start of `startupTimeoutSeconds`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempt_start_time: Option<Time>,
    /// Attempts whose workers could not all be placed in time (not counted as restarts).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub startup_timeouts: i32,
    /// Generation of the spec whose failure ended the last attempt; a newer spec starts afresh.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed_generation: Option<i64>,
    /// Earliest time of the next gang start after a restart.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restart_after: Option<Time>,
    /// Name of the checkpoint PersistentVolumeClaim (`<name>-checkpoints`), mounted at
    /// /checkpoints in worker 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint_pvc: Option<String>,
    /// The uid of the checkpoint claim, recorded when the operator first saw it as its own: a
    /// claim of that name gone, being deleted or replaced by another means the checkpoints on it
    /// are lost, which the operator then says instead of starting from step 0 on a new claim.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint_pvc_uid: Option<String>,
    /// Checkpoints lost with their deleted claim: what the status named before. The training
    /// starts no new workers until the annotation `charlm.dev/restart-from-scratch` is set to
    /// `restartToken` (then it starts over from step 0 on a new claim), or it is deleted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lost_checkpoints: Option<LostCheckpoints>,
    /// Checkpoints the trainer found damaged at a resume and set aside as `<dir>.damaged`
    /// (paths on the checkpoint volume, oldest first, at most 16).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub damaged_checkpoints: Vec<String>,
    /// Path of the newest checkpoint inside the checkpoint volume's mount.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latest_checkpoint: Option<String>,
    /// What rank 0 of the trainer last reported (its /progress endpoint or its termination message).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<ProgressStatus>,
    /// The training loss at a few steps over the whole run (at most 32, thinned evenly as the
    /// run grows), for a loss curve without a metrics stack (`kubectl charlm status`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["step"]))]
    pub loss_history: Vec<LossPoint>,
    /// Human-readable time left, from progress.etaS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eta: Option<String>,
    /// When the workers of the first attempt were created.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<Time>,
    /// When the training ended (Succeeded or Failed); `ttlSecondsAfterFinished` counts from it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<Time>,
    /// Validation bits per character when the training succeeded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub final_val_bpc: Option<f64>,
    /// The best validation bits per character so far (its checkpoint is kept in `best/`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub best_val_bpc: Option<f64>,
    /// The step of `bestValBpc`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub best_step: Option<i64>,
    /// The settings the workers of the current attempt run with: the spec (with the preset's
    /// values where it leaves fields unset) as it was when the attempt started. A spec changed
    /// while they run shows here from the next start on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub effective: Option<EffectiveSettings>,
    /// GPU-hours used and what they cost.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<UsageStatus>,
    /// What the planner says of this budget on this dataset (`charlm-trainer plan`), once the
    /// trainer has reported the dataset's size.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan: Option<BudgetAdvice>,
}

/// What a deleted checkpoint claim held (`status.lostCheckpoints`), as the status named it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LostCheckpoints {
    /// The claim's name and uid (the uid unless the claim went before the operator recorded it).
    pub claim_name: String,
    /// The lost claim's uid, when the operator had recorded it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claim_uid: Option<String>,
    /// When the operator saw the claim being deleted or gone.
    pub detected_time: Time,
    /// The newest checkpoint, the best validation bpc and its step, and the step the training
    /// had reached, on the lost claim.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latest_checkpoint: Option<String>,
    /// The best validation bpc on the lost claim.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub best_val_bpc: Option<f64>,
    /// The step of that best validation bpc.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub best_step: Option<i64>,
    /// The step the training had reached when the claim was lost.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<i64>,
    /// The value of the annotation `charlm.dev/restart-from-scratch` that starts the training over
    /// from step 0 on a new, empty claim: the lost claim's uid (its name when no uid was
    /// recorded), so a value left on the training never approves a later loss.
    pub restart_token: String,
}

/// The planner's verdict on the effective depth, GPUs and hours for the dataset's size.
// `status.plan` to users (the field keeps its name); in Rust the budget planner's advice, not one
// of the other things called a plan (the trainer's batch plan, `charlm-trainer plan`).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BudgetAdvice {
    /// Epochs the effective depth trains in the whole budget.
    pub epochs: f64,
    /// The depth with the lowest expected validation loss for this budget and data.
    pub recommended_depth: i64,
    /// Hours after which that depth's best model is expected.
    pub recommended_hours: f64,
    /// Hours after which the effective depth's best model is expected.
    pub hours_to_best: f64,
    /// Cost of the whole budget at the operator's price per GPU-hour.
    pub budget_cost: f64,
    /// Cost of the recommended hours at the recommended depth, at the same price.
    pub recommended_cost: f64,
    /// Unique training tokens the plan is for.
    pub unique_tokens: i64,
}

/// The settings a training runs with (`status.effective`): explicit spec fields, else the
/// preset's, else the defaults.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EffectiveSettings {
    /// The preset that filled the fields the spec leaves unset, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preset: Option<Preset>,
    /// Transformer layers.
    pub depth: i32,
    /// GPUs of all worker pods; 0 trains on CPUs.
    pub gpus: i32,
    /// GPUs of one node (and of one worker pod, when gpus fills several nodes).
    pub gpus_per_node: i32,
    /// Worker pods: one per node with GPUs, `cpuWorkers` on CPU.
    pub workers: i32,
    /// The budget in hours, if the training has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hours: Option<f64>,
    /// The budget in optimizer steps, if the training has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_steps: Option<i64>,
    /// Sequences per GPU per micro-step, or `auto` (the trainer picks the largest that fits).
    pub device_batch_size: DeviceBatchSize,
    /// Evaluations without a better validation bpc before an early stop; unset: the trainer's
    /// default; 0: never.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub early_stop_patience: Option<i32>,
    /// Whether the trainer writes TensorBoard event files to /checkpoints/tensorboard.
    #[serde(default)]
    pub tensorboard: bool,
    /// Tokens per optimizer step across all workers; unset: the trainer's choice.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_batch_size: Option<i64>,
    /// Context length in characters; unset: the trainer's default (2048).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq_len: Option<i32>,
    /// Steps between evaluations; unset: the trainer's choice.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval_every: Option<i64>,
    /// Random seed; unset: the trainer's choice.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<i64>,
    /// The optimizer recipe; unset: the trainer's default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recipe: Option<Recipe>,
    /// The matrix products' number format; unset: the trainer's default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub precision: Option<Precision>,
    /// Minutes between checkpoints; unset: the trainer's choice.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint_interval_minutes: Option<f64>,
    /// Rolling checkpoints kept; unset: the trainer's choice.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_checkpoints: Option<i32>,
    /// The generation of the spec these settings come from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<i64>,
}

impl EffectiveSettings {
    /// GPUs of each worker pod (0 on CPU).
    pub fn gpus_per_worker(&self) -> i32 {
        if self.gpus == 0 {
            0
        } else {
            self.gpus / self.workers.max(1)
        }
    }

    /// GPU-hours the budget allows (`gpus x hours`), when it is in hours.
    pub fn budget_gpu_hours(&self) -> Option<f64> {
        self.hours.map(|h| h * f64::from(self.gpus))
    }
}

/// GPU-hours used: GPUs x the wall time during which all the workers of an attempt ran the
/// trainer (from the start of the last worker's trainer container to the end of the first one),
/// summed over attempts. Preparing data, waiting for nodes and restart backoffs are not counted.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct UsageStatus {
    /// GPU-hours so far (while training, updated about every minute).
    pub gpu_hours: f64,
    /// gpuHours x pricePerGpuHour, rounded to cents.
    pub estimated_cost: f64,
    /// The operator's price per GPU-hour (chart value `pricePerGpuHour`).
    pub price_per_gpu_hour: f64,
    /// GPU-seconds of the attempts that have ended.
    #[serde(default)]
    pub ended_attempts_gpu_seconds: i64,
    /// When all workers of the current attempt were training; unset while they are not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub training_since: Option<Time>,
    /// GPUs of the attempt that is training.
    #[serde(default)]
    pub training_gpus: i32,
}

/// One point of `status.lossHistory`: the training loss (nats per token) rank 0 reported at a step.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, JsonSchema)]
pub struct LossPoint {
    /// The optimizer step of the report.
    pub step: i64,
    /// The training loss at that step, in nats per token.
    pub loss: f64,
}

/// The trainer's progress report (docs/contract.md), in the API's camelCase.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ProgressStatus {
    /// Optimizer steps done.
    pub step: i64,
    /// Steps the whole budget is expected to take, at the current speed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_steps_estimate: Option<i64>,
    /// Training tokens seen so far, over all workers.
    #[serde(default)]
    pub tokens: i64,
    /// Passes over the training split so far (fractional).
    #[serde(default)]
    pub epoch: f64,
    /// The latest training loss, in nats per token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub train_loss: Option<f64>,
    /// The latest validation bits per character.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub val_bpc: Option<f64>,
    /// The best validation bits per character of the run (its checkpoint is `best/`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub best_val_bpc: Option<f64>,
    /// The step of `bestValBpc`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub best_step: Option<i64>,
    /// Training tokens per second over all workers, recently.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens_per_s: Option<f64>,
    /// Model FLOPs utilisation: the share of the GPUs' peak bf16 FLOPs the model's arithmetic
    /// uses (0 to 1); unset on CPUs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mfu: Option<f64>,
    /// Seconds of training so far, over all attempts (the budget's clock).
    #[serde(default)]
    pub elapsed_s: f64,
    /// Seconds of the budget left, as the trainer estimates them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eta_s: Option<f64>,
    /// Path of the newest checkpoint the trainer wrote (under /checkpoints).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<String>,
    /// Trainer processes of the gang (GPUs, or CPU workers).
    #[serde(default)]
    pub world_size: i64,
    /// Peak GPU memory of rank 0, in GiB; unset on CPUs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peak_memory_gib: Option<f64>,
    /// Training tokens in one pass over the training split.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens_per_epoch: Option<i64>,
    /// True once the trainer has ended its budget (or stopped early) and written its last
    /// checkpoint.
    #[serde(default)]
    pub complete: bool,
    /// Why the trainer exited: `budget`, `early_stop` or `signal`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_reason: Option<String>,
    /// Evaluations since the best validation bpc (`PastBest` beyond 4).
    #[serde(default)]
    pub evals_since_best: i64,
    /// GPU-hours of the budget an early stop left unspent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub saved_gpu_hours: Option<f64>,
    /// The checkpoint the running attempt resumed from (unset on a fresh start).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resumed_from: Option<String>,
    /// When the operator read this report.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_time: Option<Time>,
}

/// The API's camelCase copy of the trainer's report (the contract's snake_case type). Destructured field by field, so that a field added to
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

pub(crate) fn is_zero(n: &i32) -> bool {
    *n == 0
}

/// `3h05m`, `12m`, `40s`: the ETA column of `kubectl get clt` (`status.eta`).
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

    #[test]
    fn progress_round_trips_in_camel_case() {
        let p = ProgressStatus {
            step: 3,
            train_loss: Some(1.5),
            tokens_per_s: Some(10.0),
            ..Default::default()
        };
        let v = serde_json::to_value(&p).unwrap();
        assert_eq!(v["trainLoss"], 1.5);
        assert_eq!(v["tokensPerS"], 10.0);
        assert!(v.get("valBpc").is_none());
    }
}
