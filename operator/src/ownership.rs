//! Whose an object is. The operator takes over, changes or deletes only what it made for this
//! training (an owner reference to the training's uid), so an object of someone else's that
//! happens to carry one of its names (`<name>-checkpoints`, `<name>-workers`, `<name>-worker-0`)
//! is a conflict it reports and leaves alone. Pure: `controller` reads the objects.

use kube::api::ObjectMeta;
use kube::ResourceExt;

use crate::crd::{CharLMTraining, GROUP, KIND};
use crate::resources::TRAINING_LABEL;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ownership {
    /// An owner reference names this training (by uid): the operator made it for this training.
    Ours,
    /// No owner at all, with the labels the operator puts on a checkpoint claim of a training of
    /// this name: a claim kept by `checkpoint.retainOnDelete` for a new training of the same
    /// name to resume from (or one a user handed over by labelling it so).
    Retained,
    /// Controlled by an earlier training of the same name (another uid), which is going: the
    /// garbage collector or that training's cleanup removes it.
    EarlierTraining(String),
    /// Anything else: someone else's. Says whose, for the message.
    Foreign(String),
}

/// Labels on every object the operator makes, and the one it checks for a retained claim.
const MANAGED_BY: (&str, &str) = ("app.kubernetes.io/managed-by", "charlm-operator");

pub fn ownership(meta: &ObjectMeta, training: &CharLMTraining) -> Ownership {
    let uid = training.metadata.uid.as_deref();
    let owners = meta.owner_references.as_deref().unwrap_or_default();
    if owners.iter().any(|o| Some(o.uid.as_str()) == uid) {
        return Ownership::Ours;
    }
    let name = training.name_any();
    let ours_kind = |o: &k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference| {
        o.kind == KIND && o.api_version.starts_with(&format!("{GROUP}/"))
    };
    if let Some(o) = owners
        .iter()
        .find(|o| o.controller == Some(true) && ours_kind(o) && o.name == name)
    {
        return Ownership::EarlierTraining(o.uid.clone());
    }
    if let Some(o) = owners.iter().find(|o| o.controller == Some(true)) {
        return Ownership::Foreign(format!("it is controlled by {} {}", o.kind, o.name));
    }
    let labels = meta.labels.as_ref();
    let label = |k: &str| labels.and_then(|l| l.get(k)).map(String::as_str);
    if owners.is_empty()
        && label(MANAGED_BY.0) == Some(MANAGED_BY.1)
        && label(TRAINING_LABEL) == Some(name.as_str())
    {
        return Ownership::Retained;
    }
    Ownership::Foreign(format!(
        "it has no owner reference to training {name}, so the operator did not make it for this \
         training"
    ))
}

/// The message of an object that is not the training's: names it, whose it is, what the operator
/// does (nothing to it) and the fix.
pub fn conflict_message(kind: &str, name: &str, whose: &str, training: &str) -> String {
    format!(
        "{kind} {name} already exists and is not this training's ({whose}): the operator leaves it \
         untouched and starts no workers; delete it if it is not needed, or delete training \
         {training} and create it under another name"
    )
}

/// The message while an earlier training's object of the same name is still going.
pub fn earlier_message(kind: &str, name: &str, uid: &str) -> String {
    format!(
        "{kind} {name} belongs to an earlier training of the same name (uid {uid}) and goes with \
         it; waiting until it is gone (if it stays, delete it)"
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::testing::{cpu_spec, training};
    use crate::resources::{common_labels, owner_reference};

    fn meta(
        owners: Vec<k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference>,
    ) -> ObjectMeta {
        ObjectMeta {
            owner_references: Some(owners),
            ..Default::default()
        }
    }

    #[test]
    fn only_an_owner_reference_to_this_training_makes_an_object_ours() {
        let t = training(cpu_spec());
        let mine = owner_reference(&t);
        assert_eq!(ownership(&meta(vec![mine.clone()]), &t), Ownership::Ours);

        let mut earlier = mine.clone();
        earlier.uid = "earlier".into();
        assert_eq!(
            ownership(&meta(vec![earlier.clone()]), &t),
            Ownership::EarlierTraining("earlier".into())
        );

        let mut other_training = earlier.clone();
        other_training.name = "other".into();
        assert!(matches!(
            ownership(&meta(vec![other_training]), &t),
            Ownership::Foreign(w) if w.contains("CharLMTraining other")
        ));

        // A user's claim, with or without labels of its own: not ours.
        let mut bare = ObjectMeta::default();
        assert!(
            matches!(ownership(&bare, &t), Ownership::Foreign(w) if w.contains("no owner reference"))
        );
        bare.labels = Some([("app".to_string(), "texts".to_string())].into());
        assert!(matches!(ownership(&bare, &t), Ownership::Foreign(_)));

        // The labels the operator puts on its objects, and no owner: a retained claim.
        let mut retained = ObjectMeta {
            labels: Some(common_labels("demo")),
            ..Default::default()
        };
        assert_eq!(ownership(&retained, &t), Ownership::Retained);
        // ... of a training of another name: not.
        retained.labels = Some(common_labels("other"));
        assert!(matches!(ownership(&retained, &t), Ownership::Foreign(_)));
        // Labels do not outweigh someone else's controller.
        let mut controlled = meta(vec![
            k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference {
                api_version: "apps/v1".into(),
                kind: "StatefulSet".into(),
                name: "db".into(),
                uid: "x".into(),
                controller: Some(true),
                ..Default::default()
            },
        ]);
        controlled.labels = Some(common_labels("demo"));
        assert!(matches!(
            ownership(&controlled, &t),
            Ownership::Foreign(w) if w.contains("StatefulSet db")
        ));
    }
}
