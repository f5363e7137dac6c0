//! The environment of a trainer pod. The operator sets these; the trainer reads each as the
//! default of its flag of the same meaning (`CHARLM_DEPTH` ↔ `--depth`), and `launch` reads
//! torchrun's names.

/// Worker pods (nodes) of the training.
pub const NNODES: &str = "NNODES";
/// This pod's index among them.
pub const NODE_RANK: &str = "NODE_RANK";
/// Worker processes on this pod (one per GPU).
pub const NPROC_PER_NODE: &str = "NPROC_PER_NODE";
/// Rank 0's host, where the others rendezvous.
pub const MASTER_ADDR: &str = "MASTER_ADDR";
/// Rank 0's rendezvous port.
pub const MASTER_PORT: &str = "MASTER_PORT";
/// The pod's IP: rank 0 serves its progress there.
pub const POD_IP: &str = "POD_IP";

/// What `launch` sets for each worker process, as torchrun does.
pub const RANK: &str = "RANK";
pub const WORLD_SIZE: &str = "WORLD_SIZE";
pub const LOCAL_RANK: &str = "LOCAL_RANK";
pub const LOCAL_WORLD_SIZE: &str = "LOCAL_WORLD_SIZE";

/// In-place restarts `launch` may make (`--max-restarts`): when a worker dies, every node's
/// `launch` stops its workers and starts them again from the newest checkpoint, this many times,
/// before it fails the pod. Default 0 (off); the operator does not set it yet, so `spec.env`
/// may.
pub const MAX_RESTARTS: &str = "CHARLM_MAX_RESTARTS";
/// What `launch` sets for each worker about its restart round, under torchrun's names: the
/// round (0 for the first start), the most there may be, and that `launch` hosts the TCPStore
/// (workers connect to it as clients, rank 0 included).
pub const RESTART_COUNT: &str = "TORCHELASTIC_RESTART_COUNT";
pub const TORCHELASTIC_MAX_RESTARTS: &str = "TORCHELASTIC_MAX_RESTARTS";
pub const USE_AGENT_STORE: &str = "TORCHELASTIC_USE_AGENT_STORE";
/// Why the previous round ended (absent in round 0): rank 0 reports it as
/// `last_restart_reason`.
pub const RESTART_REASON: &str = "CHARLM_RESTART_REASON";

pub const DATA: &str = "CHARLM_DATA";
pub const DEPTH: &str = "CHARLM_DEPTH";
pub const DEVICE_BATCH_SIZE: &str = "CHARLM_DEVICE_BATCH_SIZE";
pub const DEVICE: &str = "CHARLM_DEVICE";
pub const CHECKPOINT_DIR: &str = "CHARLM_CHECKPOINT_DIR";
pub const METRICS_PORT: &str = "CHARLM_METRICS_PORT";
pub const TERMINATION_LOG: &str = "CHARLM_TERMINATION_LOG";
pub const HOURS: &str = "CHARLM_HOURS";
pub const MAX_STEPS: &str = "CHARLM_MAX_STEPS";
pub const TOTAL_BATCH_SIZE: &str = "CHARLM_TOTAL_BATCH_SIZE";
pub const SEQ_LEN: &str = "CHARLM_SEQ_LEN";
pub const EVAL_EVERY: &str = "CHARLM_EVAL_EVERY";
pub const SEED: &str = "CHARLM_SEED";
pub const CHECKPOINT_EVERY_MINUTES: &str = "CHARLM_CHECKPOINT_EVERY_MINUTES";
pub const KEEP_CHECKPOINTS: &str = "CHARLM_KEEP_CHECKPOINTS";
pub const EARLY_STOP_PATIENCE: &str = "CHARLM_EARLY_STOP_PATIENCE";
pub const TENSORBOARD_DIR: &str = "CHARLM_TENSORBOARD_DIR";
/// The training recipe (`--recipe`).
pub const RECIPE: &str = "CHARLM_RECIPE";
/// The precision of the blocks' matrix products (`--precision`: `bf16` or `fp8`).
pub const PRECISION: &str = "CHARLM_PRECISION";

/// Names a training's own `spec.env` may not set (the CRD refuses them at apply): the gang's
/// (pods and processes, and torchrun's names that scripts read), and what the operator sets from
/// the spec's fields or relies on for the trainer's outputs. A user's value would silently break
/// the gang or make the status lie. The operator's tests hold this list against what it sets.
pub const RESERVED: [&str; 33] = [
    NNODES,
    NODE_RANK,
    NPROC_PER_NODE,
    MASTER_ADDR,
    MASTER_PORT,
    POD_IP,
    RANK,
    WORLD_SIZE,
    LOCAL_RANK,
    LOCAL_WORLD_SIZE,
    "GROUP_RANK",
    "GROUP_WORLD_SIZE",
    "ROLE_RANK",
    "ROLE_WORLD_SIZE",
    "TORCHELASTIC_RUN_ID",
    DATA,
    DEPTH,
    DEVICE_BATCH_SIZE,
    CHECKPOINT_DIR,
    METRICS_PORT,
    TERMINATION_LOG,
    HOURS,
    MAX_STEPS,
    TOTAL_BATCH_SIZE,
    SEQ_LEN,
    EVAL_EVERY,
    SEED,
    CHECKPOINT_EVERY_MINUTES,
    KEEP_CHECKPOINTS,
    EARLY_STOP_PATIENCE,
    TENSORBOARD_DIR,
    RECIPE,
    PRECISION,
];

/// What the operator sets that `spec.env` may replace: nothing in the status depends on it.
pub const OVERRIDABLE: [&str; 1] = [DEVICE];
