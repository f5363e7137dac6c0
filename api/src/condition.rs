//! The condition types of a training (`status.conditions[].type`).

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
