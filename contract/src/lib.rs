//! The contract between `charlm-operator` and `charlm-trainer` (docs/contract.md), as code both
//! crates build against: what the operator sets in a trainer pod's environment, where the trainer
//! serves its progress, what that report holds, the JSON Lines events it writes on stdout, and
//! what its exit codes mean. Plain data only (no
//! Kubernetes, no torch), so that a field added on one side is a compile error on the other.

pub mod env;
pub mod events;
pub mod exit;
mod report;

pub use report::{DamagedCheckpoint, ProgressReport, StopReason, PAST_BEST_EVALUATIONS};

/// The port of rank 0's `/progress` and `/metrics` (the trainer's `--metrics-port` default, the
/// pod's port named `metrics`).
pub const PROGRESS_PORT: u16 = 9090;

/// The rendezvous port of rank 0 (c10d's TCPStore; torchrun's default `MASTER_PORT`).
pub const RENDEZVOUS_PORT: u16 = 29500;

/// The shortest and longest sequence the trainer accepts (`--seq-len`, `spec.seqLen`): a window
/// of 2 tokens is the least that holds an input and its next token.
pub const MIN_SEQ_LEN: i64 = 2;
pub const MAX_SEQ_LEN: i64 = 1 << 16;

/// The progress report as JSON.
pub const PROGRESS_PATH: &str = "/progress";

/// The same figures in Prometheus' text format.
pub const METRICS_PATH: &str = "/metrics";
