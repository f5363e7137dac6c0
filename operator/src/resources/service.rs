use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use kube::api::ObjectMeta;
use kube::ResourceExt;

use super::{
    common_labels, namespace_of, owner_reference, service_name, METRICS_PORT_NAME, PROGRESS_PORT,
    RENDEZVOUS_PORT, TRAINING_LABEL,
};
use crate::crd::CharLMTraining;

/// The headless Service that gives each worker a DNS name (`<pod>.<service>.<ns>.svc`). It publishes
/// pods before they are ready because rendezvous happens before anything could be "ready".
pub fn workers_service(training: &CharLMTraining) -> Service {
    let name = training.name_any();
    let port = |name: &str, port: i32| ServicePort {
        name: Some(name.to_string()),
        port,
        protocol: Some("TCP".to_string()),
        ..Default::default()
    };
    Service {
        metadata: ObjectMeta {
            name: Some(service_name(&name)),
            namespace: Some(namespace_of(training)),
            labels: Some(common_labels(&name)),
            owner_references: Some(vec![owner_reference(training)]),
            ..Default::default()
        },
        spec: Some(ServiceSpec {
            cluster_ip: Some("None".to_string()),
            publish_not_ready_addresses: Some(true),
            selector: Some([(TRAINING_LABEL.to_string(), name.clone())].into()),
            ports: Some(vec![
                port("rendezvous", RENDEZVOUS_PORT),
                port(METRICS_PORT_NAME, PROGRESS_PORT),
            ]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::testing::{gpu_spec, training};

    #[test]
    fn service_is_headless_and_selects_the_workers() {
        let svc = workers_service(&training(gpu_spec()));
        assert_eq!(svc.metadata.name.as_deref(), Some("demo-workers"));
        let spec = svc.spec.unwrap();
        assert_eq!(spec.cluster_ip.as_deref(), Some("None"));
        assert_eq!(spec.publish_not_ready_addresses, Some(true));
        assert_eq!(spec.selector.unwrap()[TRAINING_LABEL], "demo");
        let ports: Vec<(String, i32)> = spec
            .ports
            .unwrap()
            .into_iter()
            .map(|p| (p.name.unwrap(), p.port))
            .collect();
        assert_eq!(
            ports,
            [
                ("rendezvous".to_string(), 29500),
                ("metrics".to_string(), 9090)
            ]
        );
    }
}
