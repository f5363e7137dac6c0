//! What a decision tells: an Event for each condition's change (a Warning for what is wrong),
//! the failure that ended an attempt, and the metrics of the outcome.

use crate::conditions;
pub use crate::context::Context;
use crate::context::{publish, send};
use crate::crd::{condition as cond, CharLMTraining};
use crate::decision::Decision;
use crate::metrics::{PhaseLabel, ReasonLabel};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::runtime::events::{Event, EventType};
use kube::{Resource, ResourceExt};

/// Publishes an Event for every condition that changed and for pods created or deleted, and counts
/// the transitions. Events are informative: a failure to publish one is logged, not retried.
pub(super) async fn report(training: &CharLMTraining, decision: &Decision, ctx: &Context) {
    let reference = training.object_ref(&());
    let before: Vec<Condition> = training
        .status
        .as_ref()
        .map(|s| s.conditions.clone())
        .unwrap_or_default();
    let mut events = Vec::new();
    for c in conditions::transitions(&before, &decision.status.conditions) {
        // The pod-state warnings (reconcile's) and the volume ones (conditions').
        let warning = crate::decision::warns(c) || conditions::is_warning(c);
        let note = if c.message.is_empty() {
            format!("{} is {}", c.type_, c.status)
        } else {
            format!("{} is {}: {}", c.type_, c.status, c.message)
        };
        events.push((
            if warning {
                EventType::Warning
            } else {
                EventType::Normal
            },
            c.reason.clone(),
            note,
        ));
        if warning && c.type_ == cond::RESTARTING && c.status == conditions::TRUE {
            ctx.metrics
                .gang_restarts
                .get_or_create(&ReasonLabel {
                    reason: c.reason.clone(),
                })
                .inc();
        }
    }
    let old_phase = training.status.as_ref().and_then(|s| s.phase);
    if let Some(phase) = decision.status.phase.filter(|p| Some(*p) != old_phase) {
        ctx.metrics
            .phase_changes
            .get_or_create(&PhaseLabel {
                phase: phase.as_str().to_string(),
            })
            .inc();
        tracing::info!(training = %training.name_any(), namespace = ?training.namespace(),
            phase = phase.as_str(), message = ?decision.status.message, "phase changed");
    }
    if !decision.create.is_empty() {
        events.push((
            EventType::Normal,
            "CreatedWorkers".to_string(),
            format!(
                "created worker pods {:?} of attempt {}",
                decision.create, decision.status.attempt
            ),
        ));
    }
    if !decision.delete.is_empty() {
        events.push((
            EventType::Normal,
            "DeletedWorkers".to_string(),
            format!("deleted worker pods {}", decision.delete.join(", ")),
        ));
    }
    for (reason, note) in &decision.warnings {
        events.push((EventType::Warning, reason.clone(), note.clone()));
    }
    for (type_, reason, note) in events {
        publish(ctx, &reference, type_, &reason, note).await;
    }
    if let Some(failure) = &decision.failure {
        publish_failure(ctx, training, &reference, failure).await;
    }
}

/// The Event of a failure: its reason, the action taken, and the pod as the related object. The
/// recorder folds Events of one key (type, reason, action, related) into a series, so without the
/// action and the pod one failure would only count up the `Failed` condition's Event of the same
/// reason (`OOMKilled`), and another worker's failure would count up the first one's.
pub(super) async fn publish_failure(
    ctx: &Context,
    training: &CharLMTraining,
    reference: &k8s_openapi::api::core::v1::ObjectReference,
    failure: &crate::failures::FailureRecord,
) {
    let pod = k8s_openapi::api::core::v1::ObjectReference {
        api_version: Some("v1".into()),
        kind: Some("Pod".into()),
        name: Some(failure.pod.clone()),
        namespace: training.namespace(),
        ..Default::default()
    };
    let event = Event {
        type_: EventType::Warning,
        reason: failure.reason.as_str().to_string(),
        note: Some(failure.note()),
        action: failure.action.as_str().to_string(),
        secondary: Some(pod),
    };
    send(ctx, reference, event).await;
}
