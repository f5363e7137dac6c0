//! The facts a decision needs that the API server holds besides the training and its pods: the
//! nodes of ended workers, the checkpoint claim and its StorageClass, the dataset's source, rank
//! 0's progress.

use super::PROGRESS_INTERVAL;
pub use crate::context::{Context, Error};
use crate::crd::CharLMTraining;
use crate::decision::DatasetCheck;
use crate::metrics::ResultLabel;
use crate::nodes::{self, NODE_LEASE_NAMESPACE};
use crate::progress::PollError;
use crate::resources::{pvc_name, PROGRESS_PORT};
use crate::volume::{class_to_check, Claim, ClaimFacts};
use crate::workers::{Worker, WorkerState};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Node, PersistentVolumeClaim};
use k8s_openapi::api::storage::v1::StorageClass;
use k8s_openapi::jiff::Timestamp;
use kube::{Api, ResourceExt};
use std::time::Instant;

/// Whether the nodes of the workers are lost (`nodes::lost`), read only while a worker has ended
/// or is being deleted: a gang that trains needs no look at its nodes, and one that failed or waits
/// for a pod to go must say whether a lost node is why. A Node or Lease that cannot be read (no
/// RBAC for it, an API error) says nothing: the worker is judged by its pod alone, as before.
pub(super) async fn judge_nodes(workers: &mut [Worker], ctx: &Context) {
    let ended = |w: &Worker| w.terminating || !w.is_active();
    if !workers.iter().any(ended) {
        return;
    }
    let names: std::collections::BTreeSet<String> =
        workers.iter().filter_map(|w| w.node.clone()).collect();
    let nodes: Api<Node> = Api::all(ctx.client.clone());
    let leases: Api<Lease> = Api::namespaced(ctx.client.clone(), NODE_LEASE_NAMESPACE);
    let now = Timestamp::now();
    for name in names {
        let node = match nodes.get_opt(&name).await {
            Ok(node) => node,
            Err(error) => {
                tracing::debug!(node = %name, %error, "node not read");
                continue;
            }
        };
        let lease = leases.get_opt(&name).await.unwrap_or_else(|error| {
            tracing::debug!(node = %name, %error, "node lease not read");
            None
        });
        let lost = nodes::lost(&name, node.as_ref(), lease.as_ref(), now);
        for w in workers
            .iter_mut()
            .filter(|w| w.node.as_ref() == Some(&name))
        {
            w.node_lost = lost.clone();
        }
    }
}

/// What is under the checkpoint claim's name, and whether the StorageClass it waits for (or, with
/// no claim yet, the spec names) is missing.
pub(super) async fn observe_claim(
    training: &CharLMTraining,
    ctx: &Context,
) -> Result<(Claim, bool), Error> {
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
pub(super) async fn storage_class_missing(ctx: &Context, class: &str) -> bool {
    let classes: Api<StorageClass> = Api::all(ctx.client.clone());
    match classes.get_metadata_opt(class).await {
        Ok(found) => found.is_none(),
        Err(e) => {
            tracing::debug!(class, error = %e, "cannot look up the StorageClass");
            false
        }
    }
}

/// Does the dataset's source object exist? Missing ones block pod creation with a message.
pub(super) async fn check_dataset(
    training: &CharLMTraining,
    ctx: &Context,
) -> Result<DatasetCheck, Error> {
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
pub(super) async fn poll_progress(
    training: &CharLMTraining,
    workers: &[Worker],
    ctx: &Context,
) -> Option<charlm_contract::ProgressReport> {
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

pub(super) fn poll_key(training: &CharLMTraining) -> String {
    format!(
        "{}/{}",
        training.namespace().unwrap_or_default(),
        training.name_any()
    )
}
