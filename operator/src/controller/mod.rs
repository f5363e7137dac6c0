//! The kube-runtime glue: watch trainings and their pods, gather the facts for `decision::decide`
//! from the API server, carry out its decision with server-side apply, write the status, and report
//! every transition as an Event. A finalizer runs the cleanup on deletion.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod, Service};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::jiff::Timestamp;
use kube::api::DynamicObject;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::runtime::finalizer::{finalizer, Error as FinalizerError, Event as Finalizer};
use kube::runtime::{watcher, Controller};
use kube::{Api, Client, Resource, ResourceExt};
use serde_json::json;

use crate::context::publish;
pub use crate::context::{Context, Error, FIELD_MANAGER};

mod events;
mod facts;
mod objects;

use crate::crd::CharLMTraining;
use crate::decision::{decide, Objects, Observed};
use crate::kueue;
use crate::ownership::{ownership, Ownership};
use crate::queueing::{admitted_placement, queue_gate, settle_workload};
use crate::resources::{
    network_policy_name, pod_name as worker_name, pvc_name, service_name, worker_pod,
    workers_network_policy, workers_selector, workers_service, REPORT_FINALIZER, TRAINING_LABEL,
};
use crate::workers::{holds_report, observe, report_read, Worker};
use events::report;
use facts::{check_dataset, judge_nodes, observe_claim, poll_key, poll_progress};
use objects::{
    apply_owned, create_checkpoint_pvc, delete_own, keep_claim_owner, not_ours, rejected,
    write_status,
};

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
    let mut workers: Vec<Worker> = listed
        .items
        .iter()
        .filter(|pod| ownership(&pod.metadata, &training) == Ownership::Ours)
        .map(observe)
        .collect();
    judge_nodes(&mut workers, ctx).await;

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
