//! Whether the node a worker sits on is lost: what Kubernetes says of it (its `Ready` condition,
//! the node controller's taints, its absence) and, before the node controller says anything, its
//! kubelet's silence (the node's Lease in `kube-node-lease` no longer renewed). Pure: the
//! controller reads the Node and the Lease, this judges them.
//!
//! Why the Lease: a node that stops (power, network) takes the node controller
//! `node-monitor-grace-period` (50 s) to be marked `Unknown`, and its peers' collective times out
//! before that (30 s in the kind case); read then, the node still looks `Ready`. The kubelet renews
//! its Lease every quarter of `leaseDurationSeconds` (10 s of 40), so a Lease older than half its
//! duration means two renewals missed.

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::jiff::Timestamp;

/// The node controller's taints for a node that stopped reporting, or reports not ready.
pub const LOST_TAINTS: [&str; 2] = [
    "node.kubernetes.io/unreachable",
    "node.kubernetes.io/not-ready",
];

/// The namespace of the kubelets' node Leases.
pub const NODE_LEASE_NAMESPACE: &str = "kube-node-lease";

/// Why node `name` is lost, or `None` while nothing says so. `node`: `None` when the API server
/// has no such node (deleted); `lease`: `None` when there is none to judge (or it could not be
/// read), which says nothing.
pub fn lost(
    name: &str,
    node: Option<&Node>,
    lease: Option<&Lease>,
    now: Timestamp,
) -> Option<String> {
    let Some(node) = node else {
        return Some(format!("node {name} is gone (deleted)"));
    };
    let status = node.status.as_ref();
    let ready = status
        .and_then(|s| s.conditions.as_ref())
        .and_then(|cs| cs.iter().find(|c| c.type_ == "Ready"));
    if let Some(c) = ready.filter(|c| c.status != "True") {
        let since = c
            .last_transition_time
            .as_ref()
            .map_or(String::new(), |t| format!(" since {}", t.0));
        let why = [c.reason.as_deref(), c.message.as_deref()]
            .into_iter()
            .flatten()
            .filter(|s| !s.is_empty())
            .collect::<Vec<_>>()
            .join(": ");
        let state = if c.status == "Unknown" {
            "unreachable"
        } else {
            "not ready"
        };
        return Some(format!(
            "node {name} is {state} (Ready {}{since}{})",
            c.status,
            if why.is_empty() {
                String::new()
            } else {
                format!(": {why}")
            }
        ));
    }
    let taint = node
        .spec
        .as_ref()
        .and_then(|s| s.taints.as_ref())
        .and_then(|ts| ts.iter().find(|t| LOST_TAINTS.contains(&t.key.as_str())));
    if let Some(t) = taint {
        return Some(format!("node {name} has the taint {}:{}", t.key, t.effect));
    }
    let spec = lease?.spec.as_ref()?;
    let (renewed, duration) = (spec.renew_time.as_ref()?.0, spec.lease_duration_seconds?);
    let silent = now.duration_since(renewed).as_secs();
    (silent > i64::from(duration.max(2)) / 2).then(|| {
        format!(
            "node {name} is unreachable (its kubelet has not renewed its Lease for {silent}s; \
             leaseDurationSeconds {duration})"
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::coordination::v1::LeaseSpec;
    use k8s_openapi::api::core::v1::{NodeCondition, NodeSpec, NodeStatus, Taint};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, Time};

    fn at(s: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + s).unwrap()
    }

    fn node(ready: &str, taints: &[&str]) -> Node {
        Node {
            spec: Some(NodeSpec {
                taints: Some(
                    taints
                        .iter()
                        .map(|k| Taint {
                            key: k.to_string(),
                            effect: "NoExecute".into(),
                            ..Default::default()
                        })
                        .collect(),
                ),
                ..Default::default()
            }),
            status: Some(NodeStatus {
                conditions: Some(vec![NodeCondition {
                    type_: "Ready".into(),
                    status: ready.into(),
                    reason: Some("NodeStatusUnknown".into()),
                    message: Some("Kubelet stopped posting node status.".into()),
                    last_transition_time: Some(Time(at(0))),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn lease(renewed: i64) -> Lease {
        Lease {
            spec: Some(LeaseSpec {
                renew_time: Some(MicroTime(at(renewed))),
                lease_duration_seconds: Some(40),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn a_ready_node_that_renews_its_lease_is_not_lost() {
        let n = node("True", &[]);
        assert_eq!(lost("w", Some(&n), Some(&lease(95)), at(100)), None);
        // Two renewals may be late (10 s each); no Lease says nothing.
        assert_eq!(lost("w", Some(&n), Some(&lease(80)), at(100)), None);
        assert_eq!(lost("w", Some(&n), None, at(100)), None);
    }

    #[test]
    fn the_node_controllers_word_or_the_kubelets_silence_make_it_lost() {
        let unknown = lost("w", Some(&node("Unknown", &[])), None, at(100)).unwrap();
        assert!(
            unknown.contains("node w is unreachable (Ready Unknown since")
                && unknown.contains("Kubelet stopped posting node status."),
            "{unknown}"
        );
        let not_ready = lost("w", Some(&node("False", &[])), None, at(100)).unwrap();
        assert!(not_ready.starts_with("node w is not ready"), "{not_ready}");
        let tainted = node("True", &["node.kubernetes.io/unreachable"]);
        assert_eq!(
            lost("w", Some(&tainted), None, at(100)).as_deref(),
            Some("node w has the taint node.kubernetes.io/unreachable:NoExecute")
        );
        assert_eq!(
            lost("w", None, None, at(100)).as_deref(),
            Some("node w is gone (deleted)")
        );
        // Still Ready for the node controller, but its kubelet missed two renewals.
        let silent = lost("w", Some(&node("True", &[])), Some(&lease(70)), at(100)).unwrap();
        assert!(
            silent.contains("has not renewed its Lease for 30s"),
            "{silent}"
        );
    }
}
