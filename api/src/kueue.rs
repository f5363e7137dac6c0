//! The Kueue (sigs.k8s.io/kueue) names a training is queued through: the labels a user sets on a
//! `CharLMTraining`, and the Kueue objects the operator makes and reads (docs/operator.md,
//! "Queueing with Kueue").

use kube::core::ApiResource;

/// The label Kueue's integrations read: the LocalQueue (in the training's namespace) to queue in.
pub const QUEUE_LABEL: &str = "kueue.x-k8s.io/queue-name";
/// The label naming a `WorkloadPriorityClass` (cluster-scoped), as for Kueue's own integrations.
pub const PRIORITY_CLASS_LABEL: &str = "kueue.x-k8s.io/priority-class";
pub const GROUP: &str = "kueue.x-k8s.io";
/// The version Kueue v0.17 stores (v1beta1 is still served, but converted only by its webhook).
pub const VERSION: &str = "v1beta2";

pub fn workload_resource() -> ApiResource {
    resource("Workload", "workloads")
}

pub fn priority_class_resource() -> ApiResource {
    resource("WorkloadPriorityClass", "workloadpriorityclasses")
}

pub fn resource_flavor_resource() -> ApiResource {
    resource("ResourceFlavor", "resourceflavors")
}

fn resource(kind: &str, plural: &str) -> ApiResource {
    ApiResource {
        group: GROUP.into(),
        version: VERSION.into(),
        api_version: format!("{GROUP}/{VERSION}"),
        kind: kind.into(),
        plural: plural.into(),
    }
}
