//! The kube-runtime glue: watch trainings and their pods, gather the facts for `reconcile::decide`
//! from the API server, carry out its decision with server-side apply, write the status, and report
//! every transition as an Event. A finalizer runs the cleanup on deletion.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, PersistentVolumeClaim, Pod, Service};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::storage::v1::StorageClass;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use k8s_openapi::jiff::Timestamp;
use kube::api::DynamicObject;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType};
use kube::runtime::finalizer::{finalizer, Error as FinalizerError, Event as Finalizer};
use kube::runtime::{watcher, Controller};
use kube::{Api, Client, Resource, ResourceExt};
use serde_json::json;

use crate::conditions;
use crate::context::{publish, send};
pub use crate::context::{Context, Error, FIELD_MANAGER};
use crate::crd::{condition as cond, CharLMTraining, CharLMTrainingStatus};
use crate::kueue;
use crate::metrics::{PhaseLabel, ReasonLabel, ResultLabel};
use crate::ownership::{conflict_message, earlier_message, ownership, Ownership};
use crate::progress::PollError;
use crate::queueing::{admitted_placement, queue_gate, settle_workload};
use crate::reconcile::{decide, DatasetCheck, Decision, Objects, Observed};
use crate::resources::{
    checkpoint_pvc, network_policy_name, owner_reference, pod_name as worker_name, pvc_name,
    pvc_owner_update, service_name, worker_pod, workers_network_policy, workers_selector,
    workers_service, PROGRESS_PORT, REPORT_FINALIZER, TRAINING_LABEL,
};
use crate::volume::{class_to_check, Claim, ClaimFacts};
use crate::workers::{holds_report, observe, report_read, Worker, WorkerState};

pub const FINALIZER: &str = "charlm.dev/cleanup";
/// Shortest time between two reads of rank 0's progress.
pub const PROGRESS_INTERVAL: Duration = Duration::from_secs(25);

/// Checks that the CRD is installed, so a missing one is a clear error at start instead of a
/// watch that retries forever.
pub async fn check_crd(client: &Client, namespace: Option<&str>) -> anyhow::Result<()> {
    let api: Api<CharLMTraining> = match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    api.list(&ListParams::default().limit(1))
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "cannot list charlmtrainings.charlm.dev ({e}); install the CRD with \
             `kubectl apply -f crds/charlmtrainings.charlm.dev.yaml` (the Helm chart does it too) \
             and check the operator's RBAC"
            )
        })?;
    Ok(())
}

/// Is Kueue's Workload API (`kueue.x-k8s.io/v1beta2`) served? Asked once at start: without it the
/// operator watches no Workloads, and a training that names a queue says Kueue is missing.
pub async fn kueue_served(client: &Client) -> bool {
    match client
        .list_api_group_resources(&format!("{}/{}", kueue::GROUP, kueue::VERSION))
        .await
    {
        Ok(list) => list.resources.iter().any(|r| r.name == "workloads"),
        Err(e) => {
            tracing::info!(error = %e, "Kueue's Workload API is not served; trainings that name a queue will wait");
            false
        }
    }
}

/// Runs the controller until `shutdown` resolves, over all namespaces or only `namespace`.
pub async fn run(
    ctx: Arc<Context>,
    namespace: Option<String>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let client = ctx.client.clone();
    let (trainings, pods): (Api<CharLMTraining>, Api<Pod>) = match &namespace {
        Some(ns) => (
            Api::namespaced(client.clone(), ns),
            Api::namespaced(client, ns),
        ),
        None => (Api::all(client.clone()), Api::all(client)),
    };
    let mut controller = Controller::new(trainings, watcher::Config::default().any_semantic())
        .owns(pods, watcher::Config::default().labels(TRAINING_LABEL));
    if ctx.kueue {
        // Kueue's admissions and evictions wake the training that owns the Workload.
        let ar = kueue::workload_resource();
        let workloads: Api<DynamicObject> = match &namespace {
            Some(ns) => Api::namespaced_with(ctx.client.clone(), ns, &ar),
            None => Api::all_with(ctx.client.clone(), &ar),
        };
        controller = controller.owns_with(
            workloads,
            ar,
            watcher::Config::default().labels(TRAINING_LABEL),
        );
    }
    controller
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            if let Err(err) = result {
                tracing::debug!(error = %err, "reconcile request not completed");
            }
        })
        .await;
}

async fn reconcile(training: Arc<CharLMTraining>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = Instant::now();
    let api: Api<CharLMTraining> = Api::namespaced(
        ctx.client.clone(),
        &training.namespace().unwrap_or_default(),
    );
    let result = finalizer(&api, FINALIZER, training, |event| async {
        match event {
            Finalizer::Apply(t) => apply(&t, &ctx).await,
            Finalizer::Cleanup(t) => cleanup(&t, &ctx).await,
        }
    })
    .await
    .or_else(|e| match e {
        // A second reconcile of a training whose deletion just completed: nothing left to do.
        FinalizerError::RemoveFinalizer(kube::Error::Api(s))
        | FinalizerError::AddFinalizer(kube::Error::Api(s))
            if s.code == 404 =>
        {
            Ok(Action::await_change())
        }
        e => Err(Error::Finalizer(Box::new(e))),
    });
    ctx.metrics.reconciled(result.is_ok(), started.elapsed());
    result
}

fn error_policy(training: Arc<CharLMTraining>, error: &Error, _ctx: Arc<Context>) -> Action {
    tracing::warn!(training = %training.name_any(), namespace = ?training.namespace(), %error, "reconcile failed; retrying");
    Action::requeue(Duration::from_secs(10))
}

async fn apply(cached: &CharLMTraining, ctx: &Context) -> Result<Action, Error> {
    let ns = cached.namespace().unwrap_or_default();
    let name = cached.name_any();
    let trainings: Api<CharLMTraining> = Api::namespaced(ctx.client.clone(), &ns);
    // Decide on the stored status, not the cache's: a status written by the previous reconcile
    // may not have reached the watch yet, and acting on an older one would repeat its actions.
    let Some(training) = trainings.get_opt(&name).await? else {
        return Ok(Action::await_change());
    };
    if training.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    // Objects of the training's names that someone else made are reported, never changed.
    let mut conflicts = Vec::new();
    let services: Api<Service> = Api::namespaced(ctx.client.clone(), &ns);
    let service = workers_service(&training);
    conflicts.extend(apply_owned(&services, &service, &training, "Service").await?);
    if let Some(settings) = &ctx.network_policy {
        let policies: Api<NetworkPolicy> = Api::namespaced(ctx.client.clone(), &ns);
        let policy = workers_network_policy(&training, settings);
        conflicts.extend(apply_owned(&policies, &policy, &training, "NetworkPolicy").await?);
    }

    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    let listed = pods
        .list(&ListParams::default().labels(&workers_selector(&name)))
        .await?;
    // Only the training's own pods are its workers: a pod of an earlier training of the same
    // name, or anyone's pod with its label, is neither counted nor deleted.
    let workers: Vec<Worker> = listed
        .items
        .iter()
        .filter(|pod| ownership(&pod.metadata, &training) == Ownership::Ours)
        .map(observe)
        .collect();

    let queue = match kueue::queue_name(&training) {
        Some(local_queue) => Some(queue_gate(&training, &local_queue, ctx).await?),
        None => None,
    };
    let dataset = check_dataset(&training, ctx).await?;
    let progress = poll_progress(&training, &workers, ctx).await;
    let (claim, class_missing) = observe_claim(&training, ctx).await?;
    let mut observed = Observed {
        training: &training,
        workers,
        dataset,
        progress,
        now: Timestamp::now(),
        price_per_gpu_hour: ctx.price_per_gpu_hour,
        rejection: None,
        queue,
        objects: Objects {
            claim,
            class_missing,
            conflicts,
        },
    };
    let mut decision = decide(&observed);
    keep_claim_owner(&training, &observed.objects.claim, &decision, ctx).await?;
    if decision.create_claim {
        match create_checkpoint_pvc(&training, ctx).await {
            Ok(true) => {}
            // Someone made one meanwhile: decide on what it is.
            Ok(false) => {
                (observed.objects.claim, observed.objects.class_missing) =
                    observe_claim(&training, ctx).await?;
                decision = decide(&observed);
            }
            Err(e) => {
                observed.rejection = Some(rejected(e, "the checkpoint PersistentVolumeClaim")?);
                decision = decide(&observed);
            }
        }
    }

    for pod_name in &decision.delete {
        match pods.delete(pod_name, &DeleteParams::default()).await {
            Ok(_) => {
                ctx.metrics.pods_deleted.inc();
            }
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => return Err(e.into()),
        }
    }
    // Someone else's pod under a worker's name stops the gang before any of it starts.
    let mut in_the_way = Vec::new();
    for &index in &decision.create {
        let pod_name = worker_name(&name, index);
        if let Some(pod) = pods.get_metadata_opt(&pod_name).await? {
            in_the_way.extend(not_ours(&pod.metadata, &training, "Pod", &pod_name));
        }
    }
    if !in_the_way.is_empty() {
        observed.objects.conflicts.extend(in_the_way);
        decision = decide(&observed);
    }
    // Workers are created only for a spec that resolved into effective settings; a queued
    // training's run where Kueue's admission put them.
    let placement = match &observed.queue {
        Some(gate) if gate.admitted() && !decision.create.is_empty() => {
            Some(admitted_placement(&training, ctx).await?)
        }
        _ => None,
    };
    if let Some(effective) = decision.status.effective.clone() {
        let pp = PostParams {
            field_manager: Some(FIELD_MANAGER.to_string()),
            ..Default::default()
        };
        for &index in &decision.create.clone() {
            let attempt = decision.status.attempt;
            let mut pod = worker_pod(&training, &effective, index, attempt, &ctx.settings);
            if let Some(placement) = &placement {
                kueue::apply_placement(&mut pod, placement);
            }
            // Create, never apply: an apply would take over a pod of that name made meanwhile
            // by someone else.
            match pods.create(&pp, &pod).await {
                Ok(_) => {
                    ctx.metrics.pods_created.inc();
                }
                // Made by an earlier look (ours) or just now by someone else (the next look says).
                Err(kube::Error::Api(e)) if e.code == 409 => {}
                Err(e) => {
                    // The gang fails as a whole; the workers already made go at the next look.
                    observed.rejection =
                        Some(rejected(e.into(), &format!("pod {}", pod.name_any()))?);
                    decision = decide(&observed);
                    break;
                }
            }
        }
    }

    write_status(&trainings, &name, &decision.status).await?;
    ctx.metrics.training_status(&ns, &name, &decision.status);
    report(&training, &decision, ctx).await;
    if let Some(gate) = &observed.queue {
        settle_workload(&training, gate, &decision, ctx).await?;
    }
    if decision.delete_training {
        expire(&trainings, &training, ctx).await?;
        return Ok(Action::await_change());
    }
    // Only now, with their final reports in the status, may ended pods go.
    let mut waiting_for_a_report = false;
    for pod in &listed.items {
        if report_read(pod, observed.now) {
            release(&pods, pod).await?;
        } else if pod.metadata.deletion_timestamp.is_some() && holds_report(pod) {
            waiting_for_a_report = true;
        }
    }
    let requeue = match (decision.requeue, waiting_for_a_report) {
        (Some(after), true) => Some(after.min(REPORT_RECHECK)),
        (None, true) => Some(REPORT_RECHECK),
        (after, false) => after,
    };
    Ok(match requeue {
        Some(after) => Action::requeue(after),
        None => Action::await_change(),
    })
}

/// `ttlSecondsAfterFinished` has passed: the training is deleted, as a Job's TTL deletes the Job;
/// the finalizer's cleanup then removes its pods, Service and NetworkPolicy, and its checkpoint
/// volume unless `checkpoint.retainOnDelete`.
async fn expire(
    trainings: &Api<CharLMTraining>,
    training: &CharLMTraining,
    ctx: &Context,
) -> Result<(), Error> {
    let ttl = training.spec.ttl_seconds_after_finished.unwrap_or_default();
    let kept = if training.spec.checkpoint.retain_on_delete {
        "the checkpoint volume is kept (checkpoint.retainOnDelete)"
    } else {
        "the checkpoint volume goes with it (set checkpoint.retainOnDelete to keep it)"
    };
    publish(
        ctx,
        &training.object_ref(&()),
        EventType::Normal,
        "TTLExpired",
        format!("deleting the training {ttl}s after it finished (ttlSecondsAfterFinished); {kept}"),
    )
    .await;
    // Preconditioned on the uid: a training created anew under the same name is not ours to end.
    let dp = DeleteParams {
        preconditions: training.uid().map(|uid| kube::api::Preconditions {
            uid: Some(uid),
            resource_version: None,
        }),
        ..Default::default()
    };
    match trainings.delete(&training.name_any(), &dp).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// How often a pod being deleted is looked at while its node has not reported its end.
const REPORT_RECHECK: Duration = Duration::from_secs(10);

/// Drops `REPORT_FINALIZER` from a pod (keeping any other finalizer).
///
/// The patch carries the resourceVersion it was computed from, so it never drops a finalizer
/// someone added meanwhile; a pod that changed under it (a real kubelet writes status while the
/// pod stops, right after a delete) is read again and the patch retried, a few times, so that the
/// finalizer cannot stay behind and hold the pod, and the claim it mounts, forever.
async fn release(pods: &Api<Pod>, pod: &Pod) -> Result<(), Error> {
    let mut current = pod.clone();
    for _ in 0..RELEASE_TRIES {
        let rest: Vec<&String> = current
            .metadata
            .finalizers
            .iter()
            .flatten()
            .filter(|f| *f != REPORT_FINALIZER)
            .collect();
        let patch = json!({"metadata": {"finalizers": rest, "resourceVersion": current.resource_version()}});
        match pods
            .patch(
                &current.name_any(),
                &PatchParams::default(),
                &Patch::Merge(patch),
            )
            .await
        {
            Ok(_) => return Ok(()),
            Err(kube::Error::Api(e)) if e.code == 404 => return Ok(()),
            Err(kube::Error::Api(e)) if e.code == 409 => {
                match pods.get_opt(&current.name_any()).await? {
                    Some(fresh) if holds_report(&fresh) => current = fresh,
                    _ => return Ok(()),
                }
            }
            Err(e) => return Err(e.into()),
        }
    }
    // Still contended: the next reconcile (the pod's own update wakes it) tries again.
    Ok(())
}

/// Conflicts tolerated by one `release` before it leaves the pod to the next reconcile.
const RELEASE_TRIES: usize = 5;

/// An error of the API server that retrying the same spec cannot fix, as the message of an
/// `InvalidSpec` failure: the object made from the spec is invalid (400, 422) or refused by
/// admission (403, e.g. a priorityClassName that does not exist). RBAC refusals, quota, conflicts
/// and passing faults are returned as errors, to be retried.
fn rejected(err: Error, object: &str) -> Result<String, Error> {
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
fn spec_field(object: &str, message: &str) -> &'static str {
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

/// What is under the checkpoint claim's name, and whether the StorageClass it waits for (or, with
/// no claim yet, the spec names) is missing.
async fn observe_claim(training: &CharLMTraining, ctx: &Context) -> Result<(Claim, bool), Error> {
    let ns = training.namespace().unwrap_or_default();
    let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), &ns);
    let pvc = pvcs.get_opt(&pvc_name(&training.name_any())).await?;
    let class_missing = match class_to_check(pvc.as_ref(), training) {
        Some(class) => storage_class_missing(ctx, &class).await,
        None => false,
    };
    let claim = match &pvc {
        Some(pvc) => Claim::Present(ClaimFacts::of(pvc, training)),
        None => Claim::Absent,
    };
    Ok((claim, class_missing))
}

/// Whether StorageClass `class` is known not to exist. An error (RBAC without `get` on
/// storageclasses, a passing fault) says nothing: the training is not held up for it.
async fn storage_class_missing(ctx: &Context, class: &str) -> bool {
    let classes: Api<StorageClass> = Api::all(ctx.client.clone());
    match classes.get_metadata_opt(class).await {
        Ok(found) => found.is_none(),
        Err(e) => {
            tracing::debug!(class, error = %e, "cannot look up the StorageClass");
            false
        }
    }
}

/// Creates the checkpoint claim; `false` when one of that name appeared meanwhile. Afterwards
/// only its owner references follow `retainOnDelete` (`keep_claim_owner`): server-side apply would
/// fight the fields Kubernetes fills in on creation, such as the default StorageClass, which
/// cannot change later.
async fn create_checkpoint_pvc(training: &CharLMTraining, ctx: &Context) -> Result<bool, Error> {
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
async fn keep_claim_owner(
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
fn not_ours(
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
async fn apply_owned<K>(
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
async fn delete_own<K>(api: &Api<K>, name: &str, training: &CharLMTraining) -> Result<(), Error>
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

async fn write_status(
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

/// Does the dataset's source object exist? Missing ones block pod creation with a message.
async fn check_dataset(training: &CharLMTraining, ctx: &Context) -> Result<DatasetCheck, Error> {
    let ns = training.namespace().unwrap_or_default();
    let dataset = &training.spec.dataset;
    if let Some(pvc) = &dataset.pvc {
        let api: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), &ns);
        if api.get_opt(&pvc.claim_name).await?.is_none() {
            return Ok(DatasetCheck::Missing(format!(
                "PersistentVolumeClaim {} (spec.dataset.pvc.claimName) does not exist in namespace {ns}; \
                 create it with the .txt files, or fix the name",
                pvc.claim_name
            )));
        }
    } else if let Some(cm) = &dataset.config_map {
        let api: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), &ns);
        if api.get_metadata_opt(&cm.name).await?.is_none() {
            return Ok(DatasetCheck::Missing(format!(
                "ConfigMap {} (spec.dataset.configMap.name) does not exist in namespace {ns}; \
                 create it (kubectl create configmap {} --from-file=<dir of .txt files>), or fix the name",
                cm.name, cm.name
            )));
        }
    }
    Ok(DatasetCheck::Available)
}

/// Reads rank 0's `/progress` while worker 0 of the current attempt runs, at most once per
/// `PROGRESS_INTERVAL` per training. The limit matters: the status write that records a report
/// wakes the controller again, and that reconcile must find nothing new to write; and an
/// unreachable endpoint must not slow every reconcile down by its timeout.
async fn poll_progress(
    training: &CharLMTraining,
    workers: &[Worker],
    ctx: &Context,
) -> Option<crate::progress::TrainerReport> {
    let attempt = training.status.as_ref().map_or(0, |s| s.attempt);
    let worker0 = workers.iter().find(|w| {
        w.index == Some(0)
            && w.attempt == Some(attempt)
            && !w.terminating
            && w.state == WorkerState::Running
    })?;
    let ip = worker0.pod_ip.as_deref()?;
    let key = poll_key(training);
    {
        let mut last = ctx
            .last_poll
            .lock()
            .expect("the poll map is never poisoned");
        let now = Instant::now();
        if last
            .get(&key)
            .is_some_and(|t| now.duration_since(*t) < PROGRESS_INTERVAL)
        {
            return None;
        }
        last.insert(key, now);
    }
    let polled = ctx.progress.fetch(ip, PROGRESS_PORT).await;
    let result = match &polled {
        Ok(_) => "ok",
        Err(e) => e.label(),
    };
    ctx.metrics
        .progress_polls
        .get_or_create(&ResultLabel {
            result: result.to_string(),
        })
        .inc();
    match polled {
        Ok(report) => Some(report),
        Err(PollError::Refused(why)) => {
            tracing::warn!(training = %poll_key(training), %why, "progress not read: the worker's address is not allowed");
            None
        }
        Err(e) => {
            tracing::debug!(training = %poll_key(training), error = ?e, "progress not read");
            None
        }
    }
}

fn poll_key(training: &CharLMTraining) -> String {
    format!(
        "{}/{}",
        training.namespace().unwrap_or_default(),
        training.name_any()
    )
}

/// Publishes an Event for every condition that changed and for pods created or deleted, and counts
/// the transitions. Events are informative: a failure to publish one is logged, not retried.
async fn report(training: &CharLMTraining, decision: &Decision, ctx: &Context) {
    let reference = training.object_ref(&());
    let before: Vec<Condition> = training
        .status
        .as_ref()
        .map(|s| s.conditions.clone())
        .unwrap_or_default();
    let mut events = Vec::new();
    for c in conditions::transitions(&before, &decision.status.conditions) {
        // The pod-state warnings (reconcile's) and the volume ones (conditions').
        let warning = crate::reconcile::warns(c) || conditions::is_warning(c);
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
async fn publish_failure(
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

/// Deletion: remove the workers, the Service and the NetworkPolicy; keep the checkpoint volume if asked to, else
/// delete it. Idempotent: it may run several times, or after an `apply` that never finished.
async fn cleanup(training: &CharLMTraining, ctx: &Context) -> Result<Action, Error> {
    let ns = training.namespace().unwrap_or_default();
    let name = training.name_any();
    ctx.metrics.training_gone(&ns, &name);
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    let uid = training.uid();
    for pod in pods
        .list(&ListParams::default().labels(&workers_selector(&name)))
        .await?
        .items
    {
        let owned = pod
            .owner_references()
            .iter()
            .any(|o| Some(&o.uid) == uid.as_ref());
        let mut pod = pod;
        if owned && pod.metadata.deletion_timestamp.is_none() {
            match pods.delete(&pod.name_any(), &DeleteParams::default()).await {
                // Held by the finalizer: the delete changed the pod's resourceVersion, so the
                // release must start from the object it returned, or its patch is refused
                // (409) and the pod, and the claim it mounts, stay forever.
                Ok(either::Either::Left(deleting)) => pod = deleting,
                Ok(either::Either::Right(_)) => continue,
                Err(kube::Error::Api(e)) if e.code == 404 => continue,
                Err(e) => return Err(e.into()),
            }
        }
        // The training is going: there is no status left to report into.
        if holds_report(&pod) {
            release(&pods, &pod).await?;
        }
    }
    let services: Api<Service> = Api::namespaced(ctx.client.clone(), &ns);
    delete_own(&services, &service_name(&name), training).await?;
    if ctx.network_policy.is_some() {
        let policies: Api<NetworkPolicy> = Api::namespaced(ctx.client.clone(), &ns);
        delete_own(&policies, &network_policy_name(&name), training).await?;
    }

    let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), &ns);
    let pvc = pvc_name(&name);
    let reference = training.object_ref(&());
    if training.spec.checkpoint.retain_on_delete {
        let existing = pvcs.get_opt(&pvc).await?.filter(|p| {
            matches!(
                ownership(&p.metadata, training),
                Ownership::Ours | Ownership::Retained
            )
        });
        if let Some(existing) = existing {
            // Drop our owner reference so the garbage collector leaves the volume alone.
            let owners: Vec<_> = existing
                .owner_references()
                .iter()
                .filter(|o| Some(&o.uid) != uid.as_ref())
                .cloned()
                .collect();
            if owners.len() != existing.owner_references().len() {
                let patch = json!({"metadata": {"ownerReferences": owners}});
                pvcs.patch(&pvc, &PatchParams::default(), &Patch::Merge(patch))
                    .await?;
            }
            publish(
                ctx,
                &reference,
                EventType::Normal,
                "CheckpointRetained",
                format!("kept PersistentVolumeClaim {pvc} (checkpoint.retainOnDelete)"),
            )
            .await;
        }
    } else {
        delete_own(&pvcs, &pvc, training).await?;
    }
    ctx.last_poll
        .lock()
        .expect("the poll map is never poisoned")
        .remove(&poll_key(training));
    tracing::info!(training = %name, namespace = %ns, "cleaned up after deletion");
    Ok(Action::await_change())
}
