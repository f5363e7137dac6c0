//! The NetworkPolicy of a training's workers: who may open connections to them.
//!
//! - From the training's own worker pods: every port. The rendezvous port (29500, c10d's TCPStore)
//!   is one of them, and NCCL and Gloo open their own connections between workers on ports the
//!   kernel picks, so a rule for 29500 alone would break every multi-node training.
//! - From the operator's pods and from the namespaces named for Prometheus: the metrics port
//!   (9090: `/progress` and `/metrics`) only.
//! - Nothing else: no other pod of the cluster reaches the workers.
//!
//! It takes effect where the cluster's network plugin enforces NetworkPolicies (Calico, Cilium,
//! ...); on one that does not it is an object that does nothing (docs/operator.md).

use std::collections::BTreeMap;

use k8s_openapi::api::networking::v1::{
    NetworkPolicy, NetworkPolicyIngressRule, NetworkPolicyPeer, NetworkPolicyPort,
    NetworkPolicySpec,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, LabelSelectorRequirement};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::ObjectMeta;
use kube::ResourceExt;

use super::{common_labels, namespace_of, owner_reference, PROGRESS_PORT, TRAINING_LABEL};
use crate::crd::CharLMTraining;

/// The label every namespace carries with its own name (set by the API server since 1.21).
const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

/// Who besides the workers may reach them, operator-wide (`--network-policy*` flags).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetworkPolicySettings {
    /// The operator's own namespace (`POD_NAMESPACE`).
    pub operator_namespace: String,
    /// Labels that select the operator's pods in that namespace.
    pub operator_labels: BTreeMap<String, String>,
    /// Namespaces whose pods may read the metrics port: where Prometheus runs.
    pub metrics_namespaces: Vec<String>,
}

pub fn network_policy_name(training: &str) -> String {
    format!("{training}-workers")
}

pub fn workers_network_policy(
    training: &CharLMTraining,
    settings: &NetworkPolicySettings,
) -> NetworkPolicy {
    let name = training.name_any();
    let workers = LabelSelector {
        match_labels: Some(BTreeMap::from([(TRAINING_LABEL.to_string(), name.clone())])),
        match_expressions: None,
    };
    let metrics_port = vec![NetworkPolicyPort {
        port: Some(IntOrString::Int(PROGRESS_PORT)),
        protocol: Some("TCP".to_string()),
        end_port: None,
    }];
    let operator = NetworkPolicyPeer {
        namespace_selector: Some(LabelSelector {
            match_labels: Some(BTreeMap::from([(
                NAMESPACE_NAME_LABEL.to_string(),
                settings.operator_namespace.clone(),
            )])),
            match_expressions: None,
        }),
        pod_selector: Some(LabelSelector {
            match_labels: Some(settings.operator_labels.clone()),
            match_expressions: None,
        }),
        ip_block: None,
    };
    let mut ingress = vec![
        NetworkPolicyIngressRule {
            from: Some(vec![NetworkPolicyPeer {
                pod_selector: Some(workers.clone()),
                ..Default::default()
            }]),
            ports: None,
        },
        NetworkPolicyIngressRule {
            from: Some(vec![operator]),
            ports: Some(metrics_port.clone()),
        },
    ];
    if !settings.metrics_namespaces.is_empty() {
        ingress.push(NetworkPolicyIngressRule {
            from: Some(vec![NetworkPolicyPeer {
                namespace_selector: Some(LabelSelector {
                    match_labels: None,
                    match_expressions: Some(vec![LabelSelectorRequirement {
                        key: NAMESPACE_NAME_LABEL.to_string(),
                        operator: "In".to_string(),
                        values: Some(settings.metrics_namespaces.clone()),
                    }]),
                }),
                ..Default::default()
            }]),
            ports: Some(metrics_port),
        });
    }
    NetworkPolicy {
        metadata: ObjectMeta {
            name: Some(network_policy_name(&name)),
            namespace: Some(namespace_of(training)),
            labels: Some(common_labels(&name)),
            owner_references: Some(vec![owner_reference(training)]),
            ..Default::default()
        },
        spec: Some(NetworkPolicySpec {
            pod_selector: Some(workers),
            policy_types: Some(vec!["Ingress".to_string()]),
            ingress: Some(ingress),
            egress: None,
        }),
    }
}

/// `key=value,key=value` (the `--network-policy-operator-labels` flag).
pub fn parse_labels(text: &str) -> Result<BTreeMap<String, String>, String> {
    let mut labels = BTreeMap::new();
    for item in text.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        match item.split_once('=') {
            Some((k, v)) if !k.trim().is_empty() => {
                labels.insert(k.trim().to_string(), v.trim().to_string());
            }
            _ => {
                return Err(format!(
                    "{item:?} is not a label: give key=value pairs separated by commas, e.g. \
                     app.kubernetes.io/name=charlm-operator (--network-policy-operator-labels)"
                ))
            }
        }
    }
    if labels.is_empty() {
        return Err(
            "no labels: the policy must select the operator's pods, e.g. \
             app.kubernetes.io/name=charlm-operator (--network-policy-operator-labels)"
                .to_string(),
        );
    }
    Ok(labels)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::testing::{gpu_spec, training};

    fn settings(metrics: &[&str]) -> NetworkPolicySettings {
        NetworkPolicySettings {
            operator_namespace: "charlm-system".into(),
            operator_labels: parse_labels("app.kubernetes.io/name=charlm-operator").unwrap(),
            metrics_namespaces: metrics.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn only_the_workers_the_operator_and_prometheus_get_in() {
        let t = training(gpu_spec());
        let policy = workers_network_policy(&t, &settings(&["monitoring", "prom"]));
        assert_eq!(policy.metadata.name.as_deref(), Some("demo-workers"));
        assert_eq!(policy.metadata.namespace.as_deref(), Some("team-a"));
        let owner = &policy.metadata.owner_references.as_ref().unwrap()[0];
        assert_eq!(
            (owner.kind.as_str(), owner.controller),
            ("CharLMTraining", Some(true))
        );
        let spec = policy.spec.unwrap();
        let workers = serde_json::json!({"matchLabels": {"charlm.dev/training": "demo"}});
        assert_eq!(serde_json::to_value(&spec.pod_selector).unwrap(), workers);
        assert_eq!(
            spec.policy_types.as_deref(),
            Some(&["Ingress".to_string()][..])
        );
        assert!(
            spec.egress.is_none(),
            "egress stays open (API server, DNS, storage)"
        );
        let rules = serde_json::to_value(spec.ingress.unwrap()).unwrap();
        assert_eq!(
            rules,
            serde_json::json!([
                {"from": [{"podSelector": workers}]},
                {"from": [{
                    "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "charlm-system"}},
                    "podSelector": {"matchLabels": {"app.kubernetes.io/name": "charlm-operator"}}
                 }],
                 "ports": [{"port": 9090, "protocol": "TCP"}]},
                {"from": [{"namespaceSelector": {"matchExpressions": [
                    {"key": "kubernetes.io/metadata.name", "operator": "In", "values": ["monitoring", "prom"]}
                 ]}}],
                 "ports": [{"port": 9090, "protocol": "TCP"}]}
            ])
        );
    }

    #[test]
    fn without_prometheus_namespaces_only_the_operator_reads_metrics() {
        let policy = workers_network_policy(&training(gpu_spec()), &settings(&[]));
        let rules = policy.spec.unwrap().ingress.unwrap();
        assert_eq!(rules.len(), 2);
    }

    #[test]
    fn labels_parse_or_say_how() {
        let l = parse_labels("a=b, c/d=e").unwrap();
        assert_eq!(l["a"], "b");
        assert_eq!(l["c/d"], "e");
        let err = parse_labels("a").unwrap_err();
        assert!(err.contains("key=value") && err.contains("--network-policy-operator-labels"));
        assert!(parse_labels(" , ").is_err());
    }
}
