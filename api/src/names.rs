//! The names of what the operator makes for a training, which clients (`kubectl charlm`, the
//! tests, a user's `kubectl logs`) find them by: pods, Service, claim, container and labels.

/// The trainer's container in every worker pod.
pub const TRAINER_CONTAINER: &str = "trainer";
/// Label on every object the operator creates for a training: its name.
pub const TRAINING_LABEL: &str = "charlm.dev/training";
/// Label of a worker pod: its index (= NODE_RANK).
pub const WORKER_INDEX_LABEL: &str = "charlm.dev/worker-index";
/// Label of a worker pod: the attempt it belongs to (status.attempt when it was created).
pub const ATTEMPT_LABEL: &str = "charlm.dev/attempt";

pub fn pod_name(training: &str, index: i32) -> String {
    format!("{training}-worker-{index}")
}

pub fn service_name(training: &str) -> String {
    format!("{training}-workers")
}

pub fn pvc_name(training: &str) -> String {
    format!("{training}-checkpoints")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_fit_the_contract() {
        assert_eq!(pod_name("demo", 3), "demo-worker-3");
        assert_eq!(service_name("demo"), "demo-workers");
        assert_eq!(pvc_name("demo"), "demo-checkpoints");
    }
}
