//! The I/O half of the Kueue integration (`kueue` holds the pure half): finds or makes the Workload
//! of a training that names a LocalQueue, reads Kueue's word on it for `reconcile::decide`, and
//! afterwards gives an evicted Workload's quota back or marks it finished.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{DeleteParams, DynamicObject, Patch, PatchParams, PostParams};
use kube::runtime::events::EventType;
use kube::{Api, Resource, ResourceExt};
use serde_json::{json, Value};

use crate::context::{publish, Context, Error, FIELD_MANAGER};
use crate::crd::{CharLMTraining, Phase};
use crate::effective;
use crate::kueue::{self, Gate, State};
use crate::ownership::{ownership, Ownership};
use crate::reconcile::Decision;
use crate::resources::worker_pod;

fn workloads(ctx: &Context, training: &CharLMTraining) -> Api<DynamicObject> {
    let ns = training.namespace().unwrap_or_default();
    Api::namespaced_with(ctx.client.clone(), &ns, &kueue::workload_resource())
}

/// Kueue's word on the training's Workload; makes the Workload first if there is none (and
/// replaces one whose gang no longer matches the spec, while it holds no quota).
pub async fn queue_gate(
    training: &CharLMTraining,
    local_queue: &str,
    ctx: &Context,
) -> Result<Gate, Error> {
    let gate = |state| Gate {
        local_queue: local_queue.to_string(),
        state,
    };
    if !ctx.kueue {
        return Ok(gate(State::NoWorkload(
            "Kueue's Workload API (kueue.x-k8s.io/v1beta2) was not served when the operator \
             started; install Kueue, then restart the operator"
                .into(),
        )));
    }
    let api = workloads(ctx, training);
    let name = kueue::workload_name(training);
    let ended = training
        .status
        .as_ref()
        .and_then(|s| s.phase)
        .is_some_and(|p| p.is_terminal());
    let existing = api.get_opt(&name).await?;
    if ended {
        return Ok(gate(match &existing {
            Some(w) => kueue::state(&w.data["status"]),
            None => State::NoWorkload("the training has ended".into()),
        }));
    }
    let desired = match desired_workload(training, local_queue, ctx).await? {
        Ok(d) => d,
        Err(why) => {
            return Ok(gate(match &existing {
                Some(w) => kueue::state(&w.data["status"]),
                None => State::NoWorkload(why),
            }))
        }
    };
    if let Some(w) = existing {
        // Someone else's Workload under this training's Workload name is neither changed nor
        // deleted; the training waits and says so.
        if ownership(&w.metadata, training) != Ownership::Ours {
            return Ok(gate(State::NoWorkload(format!(
                "Workload {name} exists but is not this training's (it has no owner reference \
                 to it): the operator leaves it untouched; delete it if it is not needed"
            ))));
        }
        let state = kueue::state(&w.data["status"]);
        let holds_quota = matches!(
            state,
            State::Admitted { .. } | State::Evicted { reserved: true, .. }
        );
        let as_json = serde_json::to_value(&w).map_err(|e| Error::Serde("workload", e))?;
        if holds_quota || kueue::same_shape(&as_json, &desired) {
            // `spec.suspend` deactivates the Workload: Kueue evicts it and frees its quota.
            let active = !training.spec.suspended();
            if w.data["spec"]["active"].as_bool() != Some(active) {
                let patch = json!({"spec": {"active": active}});
                api.patch(&name, &PatchParams::default(), &Patch::Merge(patch))
                    .await?;
            }
            return Ok(gate(state));
        }
        // The gang changed while queued: a Workload's pod sets cannot change, so a new one.
        match api.delete(&name, &DeleteParams::default()).await {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => return Err(e.into()),
        }
        return Ok(gate(State::NoWorkload(
            "the spec changed; its Workload is made anew".into(),
        )));
    }
    let object: DynamicObject =
        serde_json::from_value(desired).map_err(|e| Error::Serde("workload", e))?;
    let pp = PostParams {
        field_manager: Some(FIELD_MANAGER.to_string()),
        ..Default::default()
    };
    match api.create(&pp, &object).await {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 409 => {}
        Err(e) => return Err(e.into()),
    }
    Ok(gate(State::Pending(format!(
        "created Workload {name}; Kueue has not looked at it yet"
    ))))
}

/// Where the workers of an admitted training run: the node labels and tolerations of the
/// ResourceFlavors its Workload's admission assigns (read now, so a worker made after a new
/// admission gets that one's). A flavour that cannot be read fails the reconcile, which is
/// retried: a worker placed without it could run outside the quota Kueue admitted it into.
pub async fn admitted_placement(
    training: &CharLMTraining,
    ctx: &Context,
) -> Result<kueue::Placement, Error> {
    let api = workloads(ctx, training);
    let Some(w) = api.get_opt(&kueue::workload_name(training)).await? else {
        return Ok(kueue::Placement::default());
    };
    let flavors: Api<DynamicObject> =
        Api::all_with(ctx.client.clone(), &kueue::resource_flavor_resource());
    let mut specs = Vec::new();
    for name in kueue::assigned_flavors(&w.data["status"]) {
        specs.push(flavors.get(&name).await?.data["spec"].clone());
    }
    kueue::placement(&specs).map_err(Error::Kueue)
}

/// The Workload the training should have, or why none can be made yet.
async fn desired_workload(
    training: &CharLMTraining,
    local_queue: &str,
    ctx: &Context,
) -> Result<Result<Value, String>, Error> {
    let status = training.status.clone().unwrap_or_default();
    let effective = match effective::resolve(&training.spec) {
        Ok(e) => e,
        Err(why) => match status.effective {
            Some(e) => e,
            None => return Ok(Err(why)),
        },
    };
    let priority = match kueue::priority_class(training) {
        None => None,
        Some(class) => {
            let classes: Api<DynamicObject> =
                Api::all_with(ctx.client.clone(), &kueue::priority_class_resource());
            match classes.get_opt(&class).await? {
                Some(pc) => {
                    let value = pc.data["value"].as_i64().unwrap_or(0) as i32;
                    Some((class, value))
                }
                None => {
                    return Ok(Err(format!(
                        "WorkloadPriorityClass {class} (label {}) does not exist",
                        kueue::PRIORITY_CLASS_LABEL
                    )))
                }
            }
        }
    };
    let pod = worker_pod(training, &effective, 0, status.attempt, &ctx.settings);
    let template = pod.spec.unwrap_or_default();
    Ok(Ok(kueue::workload(
        training,
        local_queue,
        effective.workers,
        &template,
        priority.as_ref().map(|(n, v)| (n.as_str(), *v)),
        !training.spec.suspended(),
    )))
}

/// After the decision: an evicted Workload whose workers have stopped gets its quota back; the
/// Workload of a training that ended is finished, so Kueue frees its quota.
pub async fn settle_workload(
    training: &CharLMTraining,
    gate: &Gate,
    decision: &Decision,
    ctx: &Context,
) -> Result<(), Error> {
    let phase = decision.status.phase;
    let finish = phase.is_some_and(|p| p.is_terminal())
        && !matches!(gate.state, State::Finished | State::NoWorkload(_));
    if !decision.release_quota && !finish {
        return Ok(());
    }
    let api = workloads(ctx, training);
    let name = kueue::workload_name(training);
    let Some(w) = api.get_opt(&name).await? else {
        return Ok(());
    };
    if ownership(&w.metadata, training) != Ownership::Ours {
        return Ok(());
    }
    let status = &w.data["status"];
    let now = Time(Timestamp::now());
    let generation = w.metadata.generation;
    let (patch, note) = if finish {
        let message = decision.status.message.clone().unwrap_or_default();
        let succeeded = phase == Some(Phase::Succeeded);
        (
            kueue::finished_status(status, succeeded, &message, generation, &now),
            format!("marked Workload {name} finished; Kueue frees its quota"),
        )
    } else {
        let State::Evicted {
            reason, message, ..
        } = kueue::state(status)
        else {
            return Ok(());
        };
        (
            kueue::requeue_status(status, &reason, &message, generation, &now),
            format!(
                "the workers stopped after Kueue evicted Workload {name} ({reason}); gave its quota \
                 back, so Kueue queues it again in LocalQueue {}",
                gate.local_queue
            ),
        )
    };
    // Computed from this resourceVersion: a Workload Kueue changed meanwhile is read again at the
    // next reconcile (its change wakes the training), not overwritten.
    let body = json!({
        "metadata": {"resourceVersion": w.resource_version()},
        "status": patch,
    });
    match api
        .patch_status(&name, &PatchParams::default(), &Patch::Merge(body))
        .await
    {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 409 || e.code == 404 => return Ok(()),
        Err(e) => return Err(e.into()),
    }
    let reason = if finish {
        "WorkloadFinished"
    } else {
        "QuotaReleased"
    };
    publish(
        ctx,
        &training.object_ref(&()),
        EventType::Normal,
        reason,
        note,
    )
    .await;
    Ok(())
}
