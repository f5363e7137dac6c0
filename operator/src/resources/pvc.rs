use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    PersistentVolumeClaim, PersistentVolumeClaimSpec, VolumeResourceRequirements,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
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

/// The owner references `existing` should have so that it follows `checkpoint.retainOnDelete`
/// (`owned`: the training owns it); `None` when it already does. The claim's spec is never touched
/// after creation (Kubernetes forbids most changes to it), so this is all that is kept in shape.
pub fn pvc_owner_update(
    existing: &PersistentVolumeClaim,
    owner: &OwnerReference,
    owned: bool,
) -> Option<Vec<OwnerReference>> {
    let have = existing
        .metadata
        .owner_references
        .clone()
        .unwrap_or_default();
    let mut next: Vec<OwnerReference> = have
        .iter()
        .filter(|o| o.uid != owner.uid)
        .cloned()
        .collect();
    if owned {
        next.push(owner.clone());
    }
    let same = have.len() == next.len() && have.iter().all(|h| next.iter().any(|n| n.uid == h.uid));
    (!same).then_some(next)
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
    fn owner_references_follow_retain_on_delete() {
        let t = training(cpu_spec());
        let owner = crate::resources::owner_reference(&t);
        let owned = checkpoint_pvc(&t);
        let mut bare = owned.clone();
        bare.metadata.owner_references = None;
        assert_eq!(pvc_owner_update(&owned, &owner, true), None);
        assert_eq!(pvc_owner_update(&bare, &owner, false), None);
        assert_eq!(pvc_owner_update(&owned, &owner, false), Some(vec![]));
        assert_eq!(
            pvc_owner_update(&bare, &owner, true),
            Some(vec![owner.clone()])
        );
        // Someone else's reference is kept.
        let mut other = owner.clone();
        other.uid = "other".into();
        other.controller = None;
        bare.metadata.owner_references = Some(vec![other.clone()]);
        assert_eq!(
            pvc_owner_update(&bare, &owner, true),
            Some(vec![other, owner])
        );
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
