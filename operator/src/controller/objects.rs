//! Writing what the decision asks for: the checkpoint claim and its owner, the Service and
//! NetworkPolicy (never someone else's of the same name), the status; and the API server's
//! refusals turned into a message naming the spec field to fix.

pub use crate::context::{Context, Error, FIELD_MANAGER};
use crate::crd::{CharLMTraining, CharLMTrainingStatus};
use crate::decision::Decision;
use crate::ownership::{conflict_message, earlier_message, ownership, Ownership};
use crate::resources::{checkpoint_pvc, owner_reference, pvc_name, pvc_owner_update};
use crate::volume::Claim;
use k8s_openapi::api::core::v1::PersistentVolumeClaim;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::{Api, Resource, ResourceExt};
use serde_json::json;

/// An error of the API server that retrying the same spec cannot fix, as the message of an
/// `InvalidSpec` failure: the object made from the spec is invalid (400, 422) or refused by
/// admission (403, e.g. a priorityClassName that does not exist). RBAC refusals, quota, conflicts
/// and passing faults are returned as errors, to be retried.
pub(super) fn rejected(err: Error, object: &str) -> Result<String, Error> {
    let Error::Kube(kube::Error::Api(api)) = &err else {
        return Err(err);
    };
    let rbac = api.message.contains("cannot create resource")
        || api.message.contains("cannot patch resource");
    let spec_fault = matches!(api.code, 400 | 422)
        || (api.code == 403 && !rbac && !api.message.contains("exceeded quota"));
    if !spec_fault {
        return Err(err);
    }
    Ok(format!(
        "the API server rejected {object}: {}; fix {} and apply the training again",
        api.message.trim_end_matches('.'),
        spec_field(object, &api.message)
    ))
}

/// The spec field an API server message about an object made from it points at.
pub(super) fn spec_field(object: &str, message: &str) -> &'static str {
    let m = message.to_ascii_lowercase();
    if object.contains("PersistentVolumeClaim") {
        return if m.contains("storageclass") {
            "spec.checkpoint.storageClassName"
        } else {
            "spec.checkpoint.size"
        };
    }
    [
        ("env", "spec.env"),
        ("toleration", "spec.tolerations"),
        ("priorityclass", "spec.priorityClassName"),
        ("priority", "spec.priorityClassName"),
        ("resources", "spec.resources"),
        ("nodeselector", "spec.nodeSelector"),
        ("affinity", "spec.affinity"),
        ("image", "spec.image"),
    ]
    .iter()
    .find(|(needle, _)| m.contains(needle))
    .map_or("the spec", |(_, field)| field)
}

/// Creates the checkpoint claim; `false` when one of that name appeared meanwhile. Afterwards
/// only its owner references follow `retainOnDelete` (`keep_claim_owner`): server-side apply would
/// fight the fields Kubernetes fills in on creation, such as the default StorageClass, which
/// cannot change later.
pub(super) async fn create_checkpoint_pvc(
    training: &CharLMTraining,
    ctx: &Context,
) -> Result<bool, Error> {
    let ns = training.namespace().unwrap_or_default();
    let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), &ns);
    let pp = PostParams {
        field_manager: Some(FIELD_MANAGER.to_string()),
        ..Default::default()
    };
    match pvcs.create(&pp, &checkpoint_pvc(training)).await {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// The claim the decision recognised as this training's follows `retainOnDelete`: owned (and
/// deleted with the training) or not. Nothing is changed on any other claim.
pub(super) async fn keep_claim_owner(
    training: &CharLMTraining,
    claim: &Claim,
    decision: &Decision,
    ctx: &Context,
) -> Result<(), Error> {
    let Claim::Present(facts) = claim else {
        return Ok(());
    };
    let st = &decision.status;
    let recognised = st.lost_checkpoints.is_none()
        && facts.deleting_since.is_none()
        && matches!(facts.ownership, Ownership::Ours | Ownership::Retained)
        && st.checkpoint_pvc_uid.as_deref() == Some(facts.uid.as_str());
    if !recognised {
        return Ok(());
    }
    let ns = training.namespace().unwrap_or_default();
    let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), &ns);
    let name = pvc_name(&training.name_any());
    let Some(existing) = pvcs.get_opt(&name).await? else {
        return Ok(());
    };
    let owned = !training.spec.checkpoint.retain_on_delete;
    if let Some(owners) = pvc_owner_update(&existing, &owner_reference(training), owned) {
        // Preconditioned on the uid and version it was computed from: a claim replaced or
        // changed meanwhile is looked at again at the next reconcile.
        let patch = json!({"metadata": {
            "ownerReferences": owners,
            "uid": facts.uid,
            "resourceVersion": existing.resource_version(),
        }});
        match pvcs
            .patch(&name, &PatchParams::default(), &Patch::Merge(patch))
            .await
        {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 409 || e.code == 404 => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Why an object under one of the training's names is not the training's to change, if it is not.
pub(super) fn not_ours(
    meta: &kube::api::ObjectMeta,
    training: &CharLMTraining,
    kind: &str,
    name: &str,
) -> Option<String> {
    let training_name = training.name_any();
    match ownership(meta, training) {
        Ownership::Ours => None,
        Ownership::EarlierTraining(uid) => Some(earlier_message(kind, name, &uid)),
        Ownership::Retained => Some(conflict_message(
            kind,
            name,
            "it carries the operator's labels but no owner reference, as one left behind by an \
             earlier training of this name",
            &training_name,
        )),
        Ownership::Foreign(whose) => Some(conflict_message(kind, name, &whose, &training_name)),
    }
}

/// Keeps `desired` in shape with server-side apply when it is absent or the training's own; an
/// object of someone else's under its name is left untouched and returned as a conflict.
pub(super) async fn apply_owned<K>(
    api: &Api<K>,
    desired: &K,
    training: &CharLMTraining,
    kind: &str,
) -> Result<Option<String>, Error>
where
    K: Resource<DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + serde::Serialize
        + std::fmt::Debug,
{
    let name = desired.name_any();
    let existing = match api.get_metadata_opt(&name).await? {
        Some(existing) => existing,
        None => {
            let pp = PostParams {
                field_manager: Some(FIELD_MANAGER.to_string()),
                ..Default::default()
            };
            match api.create(&pp, desired).await {
                Ok(_) => return Ok(None),
                Err(kube::Error::Api(e)) if e.code == 409 => {
                    match api.get_metadata_opt(&name).await? {
                        Some(existing) => existing,
                        None => return Ok(None),
                    }
                }
                Err(e) => return Err(e.into()),
            }
        }
    };
    if let Some(conflict) = not_ours(&existing.metadata, training, kind, &name) {
        return Ok(Some(conflict));
    }
    api.patch(
        &name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(desired),
    )
    .await?;
    Ok(None)
}

/// Deletes the training's own object `name`, preconditioned on its uid; anyone else's is left.
pub(super) async fn delete_own<K>(
    api: &Api<K>,
    name: &str,
    training: &CharLMTraining,
) -> Result<(), Error>
where
    K: Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let Some(existing) = api.get_metadata_opt(name).await? else {
        return Ok(());
    };
    if ownership(&existing.metadata, training) != Ownership::Ours {
        return Ok(());
    }
    let dp = DeleteParams {
        preconditions: Some(kube::api::Preconditions {
            uid: existing.metadata.uid.clone(),
            resource_version: None,
        }),
        ..Default::default()
    };
    match api.delete(name, &dp).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

pub(super) async fn write_status(
    api: &Api<CharLMTraining>,
    name: &str,
    status: &CharLMTrainingStatus,
) -> Result<(), Error> {
    let status = serde_json::to_value(status).map_err(|e| Error::Serde("status", e))?;
    let patch = json!({
        "apiVersion": CharLMTraining::api_version(&()),
        "kind": CharLMTraining::kind(&()),
        "status": status,
    });
    api.patch_status(
        name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(patch),
    )
    .await?;
    Ok(())
}
