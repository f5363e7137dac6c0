//! The `CharLMTraining` resource: the one source of truth for the CRD schema. Every rule the API
//! server can check on its own lives here as a CEL rule with a message that names the fix, so a bad
//! spec is rejected at `kubectl apply` instead of turning into a failed pod an hour later.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Affinity, EnvVar, ResourceRequirements, Toleration};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, CustomResourceExt, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::preset;
pub use crate::preset::Preset;
use crate::rules;

pub const GROUP: &str = "charlm.dev";
pub const VERSION: &str = "v1alpha1";
pub const KIND: &str = "CharLMTraining";

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
    #[x_kube(validation = Rule::new("self >= 8 && self <= 65536").message("seqLen must be between 8 and 65536"))]
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

fn is_zero(n: &i32) -> bool {
    *n == 0
}

fn default_gpus_per_node() -> i32 {
    8
}

/// Sequences per GPU per micro-step: a number, or `auto` for the largest power of two that fits.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DeviceBatchSize {
    #[default]
    Auto,
    Fixed(i32),
}

impl std::fmt::Display for DeviceBatchSize {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeviceBatchSize::Auto => f.write_str("auto"),
            DeviceBatchSize::Fixed(n) => write!(f, "{n}"),
        }
    }
}

impl Serialize for DeviceBatchSize {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            DeviceBatchSize::Auto => s.serialize_str("auto"),
            DeviceBatchSize::Fixed(n) => s.serialize_i32(*n),
        }
    }
}

impl<'de> Deserialize<'de> for DeviceBatchSize {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Number(i64),
            Text(String),
        }
        let bad = || {
            serde::de::Error::custom(
                "deviceBatchSize must be auto or a whole number from 1 to 4096",
            )
        };
        match Raw::deserialize(d)? {
            Raw::Number(n) => i32::try_from(n)
                .ok()
                .filter(|n| *n >= 1)
                .map(DeviceBatchSize::Fixed)
                .ok_or_else(bad),
            Raw::Text(t) if t.trim().eq_ignore_ascii_case("auto") => Ok(DeviceBatchSize::Auto),
            Raw::Text(t) => t
                .trim()
                .parse::<i32>()
                .ok()
                .filter(|n| *n >= 1)
                .map(DeviceBatchSize::Fixed)
                .ok_or_else(bad),
        }
    }
}

impl JsonSchema for DeviceBatchSize {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "DeviceBatchSize".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "description": "A number of sequences, or `auto`.",
            "x-kubernetes-int-or-string": true,
        })
    }
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

/// A training recipe of the trainer (`--recipe`).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum Recipe {
    /// nanochat's November 2025 optimizer settings.
    #[serde(rename = "nanochat-2025")]
    Nanochat2025,
    /// nanochat's July 2026 optimizer settings (warm-up, long warm-down, cautious weight decay).
    #[serde(rename = "nanochat-2026")]
    Nanochat2026,
}

impl Recipe {
    /// The trainer's name for it (`CHARLM_RECIPE`).
    pub fn name(self) -> &'static str {
        match self {
            Recipe::Nanochat2025 => "nanochat-2025",
            Recipe::Nanochat2026 => "nanochat-2026",
        }
    }
}

/// The precision of the trainer's matrix products (`--precision`).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum Precision {
    /// bf16 products with fp32 accumulation.
    #[serde(rename = "bf16")]
    Bf16,
    /// FP8 products for the blocks' four matrices (e4m3 forward, e5m2 gradients).
    #[serde(rename = "fp8")]
    Fp8,
}

impl Precision {
    /// The trainer's name for it (`CHARLM_PRECISION`).
    pub fn name(self) -> &'static str {
        match self {
            Precision::Bf16 => "bf16",
            Precision::Fp8 => "fp8",
        }
    }
}

/// The training text: `.txt` files, documents separated by a blank line.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("(has(self.pvc) ? 1 : 0) + (has(self.configMap) ? 1 : 0) + (has(self.synthetic) ? 1 : 0) == 1")
    .message("set exactly one of dataset.pvc, dataset.configMap or dataset.synthetic"))]
pub struct DatasetSpec {
    /// A directory of .txt files on an existing PersistentVolumeClaim (mounted read-only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pvc: Option<PvcDataset>,
    /// A ConfigMap whose keys are .txt files (small datasets).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_map: Option<ConfigMapDataset>,
    /// A generated dataset for demos and tests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub synthetic: Option<SyntheticDataset>,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PvcDataset {
    /// Name of the PersistentVolumeClaim in the training's namespace.
    #[schemars(length(min = 1, max = 253))]
    #[x_kube(validation = rules::object_name("dataset.pvc.claimName", "PersistentVolumeClaim", "charlm-texts"))]
    pub claim_name: String,
    /// Directory of the .txt files, relative to the root of the volume.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    #[x_kube(validation = Rule::new("!self.startsWith('/') && !self.contains('..')").message("dataset.pvc.path must be relative to the root of the volume, without '..'"))]
    pub path: Option<String>,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ConfigMapDataset {
    /// Name of the ConfigMap in the training's namespace.
    #[schemars(length(min = 1, max = 253))]
    #[x_kube(validation = rules::object_name("dataset.configMap.name", "ConfigMap", "charlm-texts"))]
    pub name: String,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SyntheticDataset {
    /// Characters of text to generate.
    #[serde(default = "default_synthetic_chars")]
    #[x_kube(validation = Rule::new("self >= 1000 && self <= 2000000000").message("dataset.synthetic.chars must be between 1000 and 2000000000"))]
    pub chars: i64,
    /// Seed of the generator.
    #[serde(default)]
    #[x_kube(validation = Rule::new("self >= 0").message("dataset.synthetic.seed must not be negative"))]
    pub seed: i64,
}

fn default_synthetic_chars() -> i64 {
    1_000_000
}

impl Default for SyntheticDataset {
    fn default() -> Self {
        Self {
            chars: default_synthetic_chars(),
            seed: 0,
        }
    }
}

/// The checkpoint PersistentVolumeClaim, mounted at /checkpoints in worker 0.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = rules::storage_class_fixed())]
pub struct CheckpointSpec {
    /// StorageClass of the checkpoint volume; the cluster default when unset. Fixed at creation
    /// (set, unset or changed alike).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_class_name: Option<String>,
    /// Size of the checkpoint volume. Fixed at creation.
    #[serde(default = "default_checkpoint_size")]
    #[x_kube(
        validation = rules::checkpoint_size(),
        validation = Rule::new("self == oldSelf").message("checkpoint.size cannot change: the checkpoint volume already exists")
    )]
    pub size: Quantity,
    /// Minutes between checkpoints; unset lets the trainer choose.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self > 0.0").message("checkpoint.intervalMinutes must be greater than 0"))]
    pub interval_minutes: Option<f64>,
    /// Rolling checkpoints kept (the best one is kept apart); unset lets the trainer choose.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 1").message("checkpoint.keep must be at least 1"))]
    pub keep: Option<i32>,
    /// Keep the checkpoint volume when the training is deleted.
    #[serde(default)]
    pub retain_on_delete: bool,
}

fn default_checkpoint_size() -> Quantity {
    Quantity("10Gi".to_string())
}

impl Default for CheckpointSpec {
    fn default() -> Self {
        Self {
            storage_class_name: None,
            size: default_checkpoint_size(),
            interval_minutes: None,
            keep: None,
            retain_on_delete: false,
        }
    }
}

/// Gang restarts after a worker fails: all workers are replaced and resume from the last checkpoint.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RestartPolicySpec {
    /// Gang restarts before the training is marked Failed.
    #[serde(default = "default_max_restarts")]
    #[x_kube(validation = Rule::new("self >= 0 && self <= 1000").message("restartPolicy.maxRestarts must be between 0 and 1000"))]
    pub max_restarts: i32,
    /// Wait before the first restart; doubled for each further one, up to 10 minutes.
    #[serde(default = "default_backoff_seconds")]
    #[x_kube(validation = Rule::new("self >= 0 && self <= 3600").message("restartPolicy.backoffSeconds must be between 0 and 3600"))]
    pub backoff_seconds: i32,
    /// What a failure of each reason does; a rule overrides the default of the one reason it
    /// names. Reasons (defaults): Evicted, Preempted, NodeLost, Deleted (RestartWithoutCounting:
    /// from the last checkpoint, not counted against maxRestarts); OOMKilled (Fail: lower
    /// deviceBatchSize, or raise the memory of the container that ran out); BadInput, the
    /// trainer's exit code 2 (Fail); StorageFull, its exit code 3: a checkpoint did not fit on the
    /// checkpoint volume (Fail: a restart would hit the same wall at its next save); Error, any
    /// other failure (Restart, counted).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 7))]
    #[x_kube(validation = rules::failure_reasons_unique(&reason_names()))]
    pub rules: Vec<FailureRule>,
}

/// One rule of `restartPolicy.rules`: the action for failures of one reason.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FailureRule {
    /// The reason of failures this rule acts on: Evicted, Preempted, NodeLost, OOMKilled,
    /// BadInput or Error.
    pub reason: FailureReason,
    /// What such a failure does: Restart (counted against maxRestarts), RestartWithoutCounting
    /// or Fail.
    pub action: FailureAction,
}

/// Why a worker ended its attempt, as the operator reads it from the pod.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, JsonSchema,
)]
pub enum FailureReason {
    /// The kubelet or the Eviction API evicted the pod (node pressure, a drain). Default:
    /// RestartWithoutCounting.
    Evicted,
    /// The pod was deleted to make room for another (the scheduler's preemption, a critical pod,
    /// Kueue). Default: RestartWithoutCounting.
    Preempted,
    /// Its node went away or stopped answering and the node lifecycle deleted the pod. Default:
    /// RestartWithoutCounting.
    NodeLost,
    /// The pod was deleted by someone other than the operator without a disruption condition
    /// (`kubectl delete pod`; its trainer saves a checkpoint on SIGTERM), or vanished. Default:
    /// RestartWithoutCounting.
    Deleted,
    /// A container ran out of memory. Default: Fail (lower deviceBatchSize).
    #[serde(rename = "OOMKilled")]
    OomKilled,
    /// The trainer exited with code 2: the input or settings are wrong. Default: Fail.
    BadInput,
    /// The trainer exited with code 3: a checkpoint did not fit on the checkpoint volume (its
    /// message names the bytes needed and free; nothing saved before was damaged). Default: Fail,
    /// since a restart trains until the next save and hits the same wall.
    StorageFull,
    /// Any other failure (a crash, a stop before the budget, a pod deleted by hand). Default:
    /// Restart.
    Error,
}

/// What a failure does to the training.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum FailureAction {
    /// Restart the gang from the last checkpoint, counted against maxRestarts.
    Restart,
    /// Restart the gang from the last checkpoint without counting against maxRestarts.
    RestartWithoutCounting,
    /// Fail the training at once.
    Fail,
}

/// Every reason, in the order of precedence: when several workers of a gang ended, the earliest
/// reason is the gang's (a peer that lost its node makes the others fail with a plain error).
pub const ALL_REASONS: [FailureReason; 8] = [
    FailureReason::Evicted,
    FailureReason::Preempted,
    FailureReason::NodeLost,
    FailureReason::Deleted,
    FailureReason::OomKilled,
    FailureReason::BadInput,
    FailureReason::StorageFull,
    FailureReason::Error,
];

impl FailureReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FailureReason::Evicted => "Evicted",
            FailureReason::Preempted => "Preempted",
            FailureReason::NodeLost => "NodeLost",
            FailureReason::Deleted => "Deleted",
            FailureReason::OomKilled => "OOMKilled",
            FailureReason::BadInput => "BadInput",
            FailureReason::StorageFull => "StorageFull",
            FailureReason::Error => "Error",
        }
    }
}

/// Every action, in the order the schema lists them.
pub const ALL_ACTIONS: [FailureAction; 3] = [
    FailureAction::Restart,
    FailureAction::RestartWithoutCounting,
    FailureAction::Fail,
];

impl FailureAction {
    pub fn as_str(self) -> &'static str {
        match self {
            FailureAction::Restart => "Restart",
            FailureAction::RestartWithoutCounting => "RestartWithoutCounting",
            FailureAction::Fail => "Fail",
        }
    }
}

/// The names of [`ALL_REASONS`], as the schema and the messages list them.
pub fn reason_names() -> Vec<&'static str> {
    ALL_REASONS.iter().map(|r| r.as_str()).collect()
}

/// The names of [`ALL_ACTIONS`].
pub fn action_names() -> Vec<&'static str> {
    ALL_ACTIONS.iter().map(|a| a.as_str()).collect()
}

fn default_max_restarts() -> i32 {
    3
}

fn default_backoff_seconds() -> i32 {
    10
}

impl Default for RestartPolicySpec {
    fn default() -> Self {
        Self {
            max_restarts: default_max_restarts(),
            backoff_seconds: default_backoff_seconds(),
            rules: Vec::new(),
        }
    }
}

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

/// The condition types of a training.
pub mod condition {
    pub const DATASET_READY: &str = "DatasetReady";
    pub const PODS_READY: &str = "PodsReady";
    pub const RUNNING: &str = "Running";
    pub const SUCCEEDED: &str = "Succeeded";
    pub const FAILED: &str = "Failed";
    pub const SUSPENDED: &str = "Suspended";
    pub const RESTARTING: &str = "Restarting";
    /// The budget trains many epochs over the data (a warning, from the planner).
    pub const DATA_CONSTRAINED: &str = "DataConstrained";
    /// The training runs past its best validation bpc by more than 4 evaluations.
    pub const PAST_BEST: &str = "PastBest";
    /// Kueue admitted the training's Workload (only on a training that names a LocalQueue).
    pub const ADMITTED: &str = "Admitted";
    /// The checkpoint claim is the operator's and usable (True), being provisioned (Unknown), or
    /// cannot be used (False): someone else's claim holds its name, its StorageClass does not
    /// exist, or it was deleted and its checkpoints are lost.
    pub const CHECKPOINT_VOLUME_READY: &str = "CheckpointVolumeReady";
    /// A checkpoint failed its check at a resume and was set aside; the trainer resumed from an
    /// older one (a warning, set from the trainer's report).
    pub const CHECKPOINT_DAMAGED: &str = "CheckpointDamaged";
    pub const ALL: [&str; 12] = [
        DATASET_READY,
        PODS_READY,
        RUNNING,
        SUCCEEDED,
        FAILED,
        SUSPENDED,
        RESTARTING,
        DATA_CONSTRAINED,
        PAST_BEST,
        ADMITTED,
        CHECKPOINT_VOLUME_READY,
        CHECKPOINT_DAMAGED,
    ];
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
    pub plan: Option<PlanStatus>,
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

/// Failures by reason (`status.failures`); the keys are the reasons of `restartPolicy.rules`.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
pub struct FailureCounts {
    /// Attempts ended by an eviction (node pressure, a drain, the Eviction API).
    #[serde(rename = "Evicted", default)]
    pub evicted: i32,
    /// Attempts ended by a preemption (the scheduler's, a critical pod's, Kueue's).
    #[serde(rename = "Preempted", default)]
    pub preempted: i32,
    /// Attempts ended because a worker's node went away or stopped answering.
    #[serde(rename = "NodeLost", default)]
    pub node_lost: i32,
    /// Attempts ended because a worker pod was deleted without an eviction or a preemption
    /// (`kubectl delete pod`, another controller): restarted without counting.
    #[serde(rename = "Deleted", default)]
    pub deleted: i32,
    /// Attempts ended because a container ran out of memory.
    #[serde(rename = "OOMKilled", default)]
    pub oom_killed: i32,
    /// Attempts ended by the trainer's exit code 2: wrong input or settings.
    #[serde(rename = "BadInput", default)]
    pub bad_input: i32,
    /// Attempts ended by the trainer's exit code 3: a checkpoint did not fit on its volume.
    #[serde(rename = "StorageFull", default)]
    pub storage_full: i32,
    /// Attempts ended by any other failure.
    #[serde(rename = "Error", default)]
    pub error: i32,
}

impl FailureCounts {
    pub fn of(&mut self, reason: FailureReason) -> &mut i32 {
        match reason {
            FailureReason::Evicted => &mut self.evicted,
            FailureReason::Preempted => &mut self.preempted,
            FailureReason::NodeLost => &mut self.node_lost,
            FailureReason::Deleted => &mut self.deleted,
            FailureReason::OomKilled => &mut self.oom_killed,
            FailureReason::BadInput => &mut self.bad_input,
            FailureReason::StorageFull => &mut self.storage_full,
            FailureReason::Error => &mut self.error,
        }
    }
}

/// The planner's verdict on the effective depth, GPUs and hours for the dataset's size.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PlanStatus {
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

/// The CRD the API server gets: the derived one, completed by `rules::complete_schema`.
pub fn crd(
) -> k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition {
    let mut crd = serde_json::to_value(CharLMTraining::crd()).expect("the CRD serialises");
    for version in crd["spec"]["versions"].as_array_mut().into_iter().flatten() {
        rules::complete_schema(
            &mut version["schema"]["openAPIV3Schema"],
            &reason_names(),
            &action_names(),
        );
    }
    serde_json::from_value(crd).expect("the completed CRD is still a CRD")
}

/// The CRD as YAML, exactly as `charlm-operator crd` prints it and `crds/` stores it.
pub fn crd_yaml() -> String {
    let crd = crd();
    let body = serde_yaml::to_string(&crd).expect("the CRD serialises to YAML");
    format!(
        "# Generated by `charlm-operator crd` from operator/src/crd.rs; do not edit.\n\
         # Regenerate: cargo run -p charlm-operator -- crd > crds/charlmtrainings.charlm.dev.yaml\n{body}"
    )
}

impl CharLMTrainingSpec {
    pub fn suspended(&self) -> bool {
        self.suspend.unwrap_or(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec_json() -> serde_json::Value {
        serde_json::json!({
            "depth": 4, "gpus": 16, "hours": 1.5,
            "dataset": {"synthetic": {"chars": 5000}}
        })
    }

    #[test]
    fn defaults_fill_a_minimal_spec() {
        let spec: CharLMTrainingSpec = serde_json::from_value(spec_json()).unwrap();
        assert_eq!(spec.gpus_per_node, 8);
        assert_eq!(spec.checkpoint.size.0, "10Gi");
        assert_eq!(spec.restart_policy, RestartPolicySpec::default());
        assert_eq!(spec.dataset.synthetic.as_ref().unwrap().seed, 0);
        assert_eq!(
            (spec.depth, spec.gpus, spec.preset),
            (Some(4), Some(16), None)
        );
        assert_eq!(
            spec.device_batch_size, None,
            "no default: a preset may fill it"
        );
    }

    #[test]
    fn a_spec_round_trips_as_written() {
        let v = serde_json::json!({
            "preset": "budget-100", "deviceBatchSize": "auto", "earlyStop": {"patience": 3},
            "tensorboard": true, "dataset": {"synthetic": {"chars": 5000}}
        });
        let spec: CharLMTrainingSpec = serde_json::from_value(v).unwrap();
        assert_eq!(spec.preset, Some(Preset::Budget100));
        assert_eq!(spec.device_batch_size, Some(DeviceBatchSize::Auto));
        let back = serde_json::to_value(&spec).unwrap();
        assert_eq!(back["preset"], "budget-100");
        assert_eq!(back["deviceBatchSize"], "auto");
        assert_eq!(back["earlyStop"]["patience"], 3);
        assert!(back.get("depth").is_none() && back.get("gpus").is_none());
    }

    #[test]
    fn crd_carries_names_columns_and_rules() {
        let crd = serde_json::to_value(crd()).unwrap();
        assert_eq!(crd["metadata"]["name"], "charlmtrainings.charlm.dev");
        assert_eq!(crd["spec"]["names"]["shortNames"][0], "clt");
        let version = &crd["spec"]["versions"][0];
        assert!(version["subresources"]["status"].is_object());
        let columns: Vec<&str> = version["additionalPrinterColumns"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap())
            .collect();
        assert_eq!(
            columns,
            [
                "Phase", "Depth", "GPUs", "Step", "Loss", "ETA", "Cost", "Age", "Restarts",
                "ValBPC", "BestBPC", "Epoch", "GPUHours", "Preset"
            ]
        );
        let spec = &version["schema"]["openAPIV3Schema"]["properties"]["spec"];
        let rules = spec["x-kubernetes-validations"].as_array().unwrap();
        assert_eq!(rules.len(), 10);
        let name =
            &version["schema"]["openAPIV3Schema"]["properties"]["metadata"]["properties"]["name"];
        assert!(name["x-kubernetes-validations"][0]["message"]
            .as_str()
            .unwrap()
            .starts_with("metadata.name must be at most 40"));
        assert!(rules.iter().all(|r| r["message"].is_string()));
        let depth_rule = &spec["properties"]["depth"]["x-kubernetes-validations"][0];
        assert_eq!(depth_rule["message"], "depth must be between 1 and 128");
        let dataset = &spec["properties"]["dataset"];
        assert!(dataset["x-kubernetes-validations"][0]["message"]
            .as_str()
            .unwrap()
            .contains("exactly one"));
        assert_eq!(spec["properties"]["gpusPerNode"]["default"], 8);
        let batch = &spec["properties"]["deviceBatchSize"];
        assert_eq!(batch["x-kubernetes-int-or-string"], true);
        assert!(batch.get("default").is_none());
        assert_eq!(
            spec["properties"]["preset"]["enum"],
            serde_json::json!(["budget-100", "budget-1000"])
        );
        let required: Vec<&str> = spec["required"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|v| v.as_str().unwrap())
            .collect();
        assert!(
            required.is_empty(),
            "depth and gpus may come from a preset, and a missing dataset is explained by its rule: {required:?}"
        );
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
