//! Failures and what they do: `spec.restartPolicy` (its rules by reason), the reasons and actions
//! with their names (the schema's and the messages' lists), and `status.failures`.

use kube::KubeSchema;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::rules;

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
