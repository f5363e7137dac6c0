//! What a user writes: `CharLMTraining`'s spec (the model, the hardware, the budget, the dataset
//! and the policies) with its per-field bounds and cross-field CEL rules, and the small value types
//! only the spec uses.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Affinity, EnvVar, ResourceRequirements, Toleration};
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use crate::batch::DeviceBatchSize;
use crate::failure::RestartPolicySpec;
use crate::preset::{self, Preset};
use crate::rules;
use crate::status::CharLMTrainingStatus;
use crate::storage::{CheckpointSpec, DatasetSpec};

pub use crate::recipe::{Precision, Recipe};

/// One training run of a character-level GPT: the model size, the hardware, the budget and the
/// data. The operator turns it into worker pods, a headless Service and a checkpoint volume.
// The printer columns repeat `type_ = ...`, which clippy takes for duplicated attributes.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "charlm.dev",
    version = "v1alpha1",
    kind = "CharLMTraining",
    plural = "charlmtrainings",
    shortname = "clt",
    // `kubectl get charlm` lists the trainings, and `kubectl get training` those of every operator
    // that files its resources under it. Not `all`: `kubectl delete all --all` would delete the
    // trainings and, with them, their checkpoint volumes.
    category = "charlm",
    category = "training",
    namespaced,
    status = "CharLMTrainingStatus",
    doc = "A CharLMTraining trains one character-level GPT (nanochat's model) on GPUs or CPUs: \
           spec says the model size (depth), the hardware (gpus, gpusPerNode or cpuWorkers), the \
           budget (hours, maxSteps or a preset) and the dataset; the operator runs one worker pod \
           per node under a headless Service, keeps checkpoints on a PersistentVolumeClaim, \
           restarts the whole gang from the last checkpoint after a failure, and reports the \
           progress, the best validation bits per character and the GPU-hours in status.",
    printcolumn(
        name = "Phase",
        type_ = "string",
        json_path = ".status.phase",
        description = "Pending, Queued, Running, Restarting, Suspended, Succeeded or Failed"
    ),
    printcolumn(
        name = "Depth",
        type_ = "integer",
        json_path = ".status.effective.depth",
        description = "Transformer layers the workers run with (a preset's when the spec leaves it unset)"
    ),
    printcolumn(
        name = "GPUs",
        type_ = "integer",
        json_path = ".status.effective.gpus",
        description = "GPUs of all worker pods; 0 trains on CPUs"
    ),
    printcolumn(
        name = "Step",
        type_ = "integer",
        json_path = ".status.progress.step",
        description = "The optimizer step rank 0 last reported"
    ),
    printcolumn(
        name = "Loss",
        type_ = "number",
        json_path = ".status.progress.trainLoss",
        description = "The training loss (nats per token) rank 0 last reported"
    ),
    printcolumn(
        name = "ETA",
        type_ = "string",
        json_path = ".status.eta",
        description = "Time left of the budget, as rank 0 estimates it"
    ),
    printcolumn(
        name = "Cost",
        type_ = "number",
        json_path = ".status.usage.estimatedCost",
        description = "GPU-hours used times the operator's price per GPU-hour"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp",
        description = "Time since the training was created"
    ),
    printcolumn(
        name = "Restarts",
        type_ = "integer",
        json_path = ".status.restarts",
        priority = 1,
        description = "Gang restarts counted against restartPolicy.maxRestarts"
    ),
    printcolumn(
        name = "ValBPC",
        type_ = "number",
        json_path = ".status.progress.valBpc",
        priority = 1,
        description = "The latest validation bits per character"
    ),
    printcolumn(
        name = "BestBPC",
        type_ = "number",
        json_path = ".status.bestValBpc",
        priority = 1,
        description = "The best validation bits per character so far (its checkpoint is best/)"
    ),
    printcolumn(
        name = "Epoch",
        type_ = "number",
        json_path = ".status.progress.epoch",
        priority = 1,
        description = "Passes over the training split so far"
    ),
    printcolumn(
        name = "GPUHours",
        type_ = "number",
        json_path = ".status.usage.gpuHours",
        priority = 1,
        description = "GPUs times the hours all workers trained, over all attempts"
    ),
    printcolumn(
        name = "Preset",
        type_ = "string",
        json_path = ".spec.preset",
        priority = 1,
        description = "The budget preset the spec names, if any"
    )
)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = preset::rules::depth_required(),
    validation = preset::rules::gpus_required(),
    validation = preset::rules::budget_required(),
    validation = preset::rules::gpus_fill_nodes(),
    validation = preset::rules::cpu_workers_only_on_cpu(),
    validation = preset::rules::batch_divides(),
    validation = rules::dataset_given(),
    validation = rules::fixed_at_creation("depth", rules::MODEL_FIXED),
    validation = rules::fixed_at_creation("seqLen", rules::MODEL_FIXED),
    validation = rules::fixed_at_creation("preset", rules::MODEL_FIXED),
)]
pub struct CharLMTrainingSpec {
    /// A budget preset that fills depth, gpus, deviceBatchSize and hours where they are unset:
    /// `budget-100` (depth 24, 2 GPUs, micro-batch 8, 16 hours) or `budget-1000` (depth 48, 8 GPUs,
    /// micro-batch 4, 31 hours). Fields set in the spec win over the preset's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preset: Option<Preset>,

    /// Number of transformer layers; the width is 64 x depth. Required unless a preset gives it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 1 && self <= 128").message("depth must be between 1 and 128"))]
    pub depth: Option<i32>,

    /// Total GPUs across all worker pods; 0 trains on CPUs (for laptops and tests). Required unless
    /// a preset gives it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 0 && self <= 4096").message("gpus must be between 0 and 4096 (0 trains on CPUs)"))]
    pub gpus: Option<i32>,

    /// GPUs of one node; a training with more GPUs than this gets one worker pod per node.
    #[serde(default = "default_gpus_per_node")]
    #[x_kube(validation = Rule::new("self >= 1 && self <= 64").message("gpusPerNode must be between 1 and 64"))]
    pub gpus_per_node: i32,

    /// Worker pods of a CPU training (gpus: 0), one process each. Default 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 1 && self <= 64").message("cpuWorkers must be between 1 and 64"))]
    pub cpu_workers: Option<i32>,

    /// Training budget in wall-clock hours of training (resumes included).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self > 0.0 && self <= 10000.0").message("hours must be greater than 0 (and at most 10000)"))]
    pub hours: Option<f64>,

    /// Stop after this many optimizer steps, even if hours remain.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 1").message("maxSteps must be at least 1"))]
    pub max_steps: Option<i64>,

    /// Sequences per GPU per micro-step, or `auto` (the default, unless a preset gives one): the
    /// trainer probes the GPU for the largest power of two that fits, and gradient accumulation
    /// keeps totalBatchSize.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("type(self) == int ? (self >= 1 && self <= 4096) : self == 'auto'").message("deviceBatchSize must be auto or a whole number between 1 and 4096"))]
    pub device_batch_size: Option<DeviceBatchSize>,

    /// Tokens per optimizer step across all workers; unset lets the trainer choose.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 1").message("totalBatchSize must be at least 1"))]
    pub total_batch_size: Option<i64>,

    /// Context length in characters; unset lets the trainer choose.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = rules::seq_len())]
    pub seq_len: Option<i32>,

    /// Evaluate on the validation split every this many steps; unset lets the trainer choose.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 1").message("evalEvery must be at least 1"))]
    pub eval_every: Option<i64>,

    /// Random seed of the initialisation and data order; unset lets the trainer choose.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 0").message("seed must not be negative"))]
    pub seed: Option<i64>,

    /// Stop early, as complete, when the validation bits per character stop improving. Unset,
    /// the trainer's default (2 evaluations without a better one while the model memorises);
    /// `patience: 0` turns it off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub early_stop: Option<EarlyStopSpec>,

    /// The optimizer settings and schedules the trainer uses (`nanochat-2025` or
    /// `nanochat-2026`); unset lets the trainer choose (docs/training.md, "Recipes").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recipe: Option<Recipe>,

    /// Number format of the blocks' matrix products (`bf16` or `fp8`; fp8 needs GPUs with FP8
    /// tensor cores, H100 or later, and a CPU training refuses it); unset lets the trainer choose
    /// (docs/training.md, "Precision").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub precision: Option<Precision>,

    /// Write TensorBoard event files to the checkpoint volume (`/checkpoints/tensorboard`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tensorboard: Option<bool>,

    /// Where the training text comes from: exactly one source. (Not `required` in the schema:
    /// a missing one defaults to `{}`, which the dataset's own rule explains in one message.)
    #[serde(default)]
    pub dataset: DatasetSpec,

    /// Trainer image; the operator's default (chart value `trainerImage`) when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 1024))]
    pub image: Option<String>,

    /// Resources of the trainer container. `nvidia.com/gpu` is always set from `gpus`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = rules::resource_quantities())]
    pub resources: Option<ResourceRequirements>,

    /// Replaces the default node selector (H100 nodes when gpus > 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<BTreeMap<String, String>>,

    /// Replaces the default tolerations (the `nvidia.com/gpu` taint when gpus > 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(
        validation = rules::toleration_operators(),
        validation = rules::toleration_effects(),
        validation = rules::toleration_exists_without_value()
    )]
    pub tolerations: Option<Vec<Toleration>>,

    /// Affinity of the worker pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<Affinity>,

    /// The checkpoint volume and how often it is written.
    #[serde(default)]
    pub checkpoint: CheckpointSpec,

    /// How failures are retried.
    #[serde(default)]
    pub restart_policy: RestartPolicySpec,

    /// True deletes the worker pods and keeps the checkpoint; false resumes from it. Kueue sets it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub suspend: Option<bool>,

    /// Extra environment of the trainer container. The operator's own variables (the gang's
    /// rendezvous and what the spec's fields set) are reserved.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(
        validation = rules::env_names(),
        validation = rules::env_not_reserved(),
        validation = rules::env_value_size(),
        validation = rules::env_total_size()
    )]
    // Keyed by name, as a container's env is: server-side apply merges entries by name.
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    pub env: Option<Vec<EnvVar>>,

    /// PriorityClass of the worker pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority_class_name: Option<String>,

    /// Seconds from the training's creation (waiting, restarts and suspension included) after
    /// which the operator stops the workers, letting them save a checkpoint, and fails the
    /// training with `DeadlineExceeded`. Unset: no deadline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 1").message("activeDeadlineSeconds must be at least 1 (seconds from the training's creation); remove it for no deadline"))]
    pub active_deadline_seconds: Option<i64>,

    /// Seconds after the training ended (Succeeded or Failed) after which the operator deletes
    /// the training, like a Job's TTL; its pods and Service go with it, and the checkpoint volume
    /// too unless `checkpoint.retainOnDelete`. Unset: kept until deleted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 0").message("ttlSecondsAfterFinished must not be negative (0 deletes the training as soon as it ends)"))]
    pub ttl_seconds_after_finished: Option<i64>,

    /// Seconds the workers of an attempt may take to be placed on nodes and started (default
    /// 600): a worker not placed, or placed with containers that have not started (an image that
    /// cannot be pulled, a missing Secret), counts; one preparing the dataset does not. A gang not
    /// all started by then releases the workers it holds (GPUs that train nothing) and tries again
    /// after restartPolicy.backoffSeconds, without counting against maxRestarts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 1 && self <= 604800").message("startupTimeoutSeconds must be between 1 and 604800 (a week)"))]
    pub startup_timeout_seconds: Option<i32>,
}

/// How long a gang may wait to be placed when the spec does not say.
pub const DEFAULT_STARTUP_TIMEOUT_SECONDS: i32 = 600;

fn default_gpus_per_node() -> i32 {
    8
}

/// Ends training as complete once the validation bits per character stop improving.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct EarlyStopSpec {
    /// Evaluations without a better validation bpc, since the best, that came while the model
    /// memorises (its training bpc at least 0.5% below the validation bpc), before the training
    /// stops (the best checkpoint is kept in `best/`); 0 never stops early.
    #[x_kube(validation = Rule::new("self >= 0 && self <= 100000").message("earlyStop.patience must be between 0 (off) and 100000 evaluations"))]
    pub patience: i32,
}

impl CharLMTrainingSpec {
    pub fn suspended(&self) -> bool {
        self.suspend.unwrap_or(false)
    }
}
