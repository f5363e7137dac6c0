use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    PersistentVolumeClaim, PersistentVolumeClaimSpec, VolumeResourceRequirements,
};
use kube::api::ObjectMeta;
use kube::ResourceExt;

use super::{common_labels, namespace_of, owner_reference, pvc_name};
use crate::crd::CharLMTraining;

/// The checkpoint volume. It is owned by the training (and goes with it) unless
/// `checkpoint.retainOnDelete`, in which case it has no owner and outlives the training.
pub fn checkpoint_pvc(training: &CharLMTraining) -> PersistentVolumeClaim {
    let name = training.name_any();
    let checkpoint = &training.spec.checkpoint;
    let owner_references = if checkpoint.retain_on_delete {
        None
    } else {
        Some(vec![owner_reference(training)])
    };
    PersistentVolumeClaim {
        metadata: ObjectMeta {
            name: Some(pvc_name(&name)),
            namespace: Some(namespace_of(training)),
            labels: Some(common_labels(&name)),
            owner_references,
            ..Default::default()
        },
        spec: Some(PersistentVolumeClaimSpec {
            access_modes: Some(vec!["ReadWriteOnce".to_string()]),
            storage_class_name: checkpoint.storage_class_name.clone(),
            resources: Some(VolumeResourceRequirements {
                requests: Some(BTreeMap::from([(
                    "storage".to_string(),
                    checkpoint.size.clone(),
                )])),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::testing::{cpu_spec, training};

    #[test]
    fn pvc_has_size_class_and_owner() {
        let mut spec = cpu_spec();
        spec["checkpoint"] = serde_json::json!({"size": "3Gi", "storageClassName": "fast"});
        let pvc = checkpoint_pvc(&training(spec));
        assert_eq!(pvc.metadata.name.as_deref(), Some("demo-checkpoints"));
        assert_eq!(pvc.metadata.namespace.as_deref(), Some("team-a"));
        let s = pvc.spec.unwrap();
        assert_eq!(s.storage_class_name.as_deref(), Some("fast"));
        assert_eq!(s.resources.unwrap().requests.unwrap()["storage"].0, "3Gi");
        assert_eq!(pvc.metadata.owner_references.unwrap().len(), 1);
    }

    #[test]
    fn retained_pvc_has_no_owner() {
        let mut spec = cpu_spec();
        spec["checkpoint"] = serde_json::json!({"retainOnDelete": true});
        let pvc = checkpoint_pvc(&training(spec));
        assert!(pvc.metadata.owner_references.is_none());
        let s = pvc.spec.unwrap();
        assert_eq!(s.storage_class_name, None);
        assert_eq!(s.resources.unwrap().requests.unwrap()["storage"].0, "10Gi");
    }
}
