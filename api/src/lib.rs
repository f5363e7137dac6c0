//! `charlm-api`: the `CharLMTraining` resource as clients see it, the one source of truth for the
//! CRD schema. The operator, `kubectl charlm` and the end-to-end tests build against it, so a
//! field, a condition or an object name is spelled once. Every rule the API server can check on
//! its own lives here as a CEL rule with a message that names the fix, so a bad spec is rejected at
//! `kubectl apply` instead of turning into a failed pod an hour later.
//!
//! Rooms: `spec` (what a user writes), `batch` (`deviceBatchSize`'s value), `storage` (dataset and checkpoint volume), `failure`
//! (restart policy, failure reasons and their counts), `status` (what the operator writes),
//! `condition` (condition types), `preset` (budget presets and their CEL rules), `recipe` (the
//! optimizer recipe and precision that spec and status share), `rules` (the other
//! CEL rules), `schema` (the CRD and its YAML), `names` (objects and labels the operator makes),
//! `kueue` (the Kueue labels and objects a training is queued through).

pub mod batch;
pub mod condition;
pub mod failure;
pub mod kueue;
pub mod names;
pub mod preset;
pub mod recipe;
pub mod rules;
pub mod schema;
pub mod spec;
pub mod status;
pub mod storage;

pub use batch::DeviceBatchSize;
pub use failure::{
    action_names, reason_names, FailureAction, FailureCounts, FailureReason, FailureRule,
    RestartPolicySpec, ALL_ACTIONS, ALL_REASONS,
};
pub use preset::Preset;
pub use schema::{crd, crd_yaml};
pub use spec::{
    CharLMTraining, CharLMTrainingSpec, EarlyStopSpec, Precision, Recipe,
    DEFAULT_STARTUP_TIMEOUT_SECONDS,
};
pub use status::{
    human_duration, BudgetAdvice, CharLMTrainingStatus, EffectiveSettings, LossPoint,
    LostCheckpoints, Phase, ProgressStatus, UsageStatus,
};
pub use storage::{CheckpointSpec, ConfigMapDataset, DatasetSpec, PvcDataset, SyntheticDataset};

pub const GROUP: &str = "charlm.dev";
pub const VERSION: &str = "v1alpha1";
pub const KIND: &str = "CharLMTraining";
