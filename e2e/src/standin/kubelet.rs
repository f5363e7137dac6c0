//! The stand-in kubelet's main loop: keeps its nodes alive, watches the pods bound to them (one
//! watch per node, `spec.nodeName=<node>`, as a kubelet does) and the Services (for pod names),
//! and gives every pod a worker ([`super::pod`]).

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context as _, Result};
use futures::StreamExt as _;
use k8s_openapi::api::core::v1::{Pod, Service};
use kube::api::{DeleteParams, Patch, PatchParams};
use kube::config::Kubeconfig;
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt as _;
use kube::{Api, Client, ResourceExt as _};
use serde_json::json;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::hosts::HostsBook;
use super::ips::IpPool;
use super::node::{self, NodeConfig};
use super::pod::{self, Ctx};
use super::process;
use super::quantity;

pub struct Config {
    pub kubeconfig: PathBuf,
    pub nodes: Vec<NodeConfig>,
    pub state_dir: PathBuf,
    pub image_bin_dir: PathBuf,
    /// This binary (runs each container's sandbox).
    pub helper: PathBuf,
}

struct Tracked {
    node: String,
    updates: watch::Sender<Option<Pod>>,
    task: JoinHandle<()>,
}

/// Runs until `shutdown` turns true, then stops every container and returns.
pub async fn run(config: Config, shutdown: watch::Receiver<bool>) -> Result<()> {
    let client = crate::cluster::client_from(&config.kubeconfig).await?;
    std::fs::create_dir_all(&config.state_dir)
        .with_context(|| format!("creating {}", config.state_dir.display()))?;
    let state_dir = config.state_dir.canonicalize()?;
    let leftovers = process::kill_leftovers(&state_dir);
    if leftovers > 0 {
        tracing::warn!("killed {leftovers} processes left by an earlier stand-in kubelet");
    }
    for n in &config.nodes {
        node::register(&client, n).await?;
    }
    let first = config.nodes.first().context("no --node given")?;
    let cpu = first.capacity.get("cpu").map(String::as_str).unwrap_or("1");
    let memory = first
        .capacity
        .get("memory")
        .map(String::as_str)
        .unwrap_or("1Gi");
    let base_hosts = std::fs::read_to_string("/etc/hosts").unwrap_or_default();
    let ctx = Arc::new(Ctx {
        client: client.clone(),
        state_dir: state_dir.clone(),
        image_bin_dir: config.image_bin_dir.clone(),
        helper: config.helper.clone(),
        api_server: api_address(&config.kubeconfig),
        host_ip: first.address.clone(),
        node_cpu_millis: quantity::milli(cpu).map_err(anyhow::Error::msg)?,
        node_memory_bytes: quantity::milli(memory).map_err(anyhow::Error::msg)? / 1000,
        ips: Mutex::new(IpPool::default()),
        hosts: Mutex::new(HostsBook::new(base_hosts)),
    });

    let heartbeats = tokio::spawn(keep_nodes_alive(
        client.clone(),
        config.nodes.clone(),
        shutdown.clone(),
    ));
    let services = tokio::spawn(watch_services(ctx.clone()));

    let streams = config.nodes.iter().map(|n| {
        let name = n.name.clone();
        let pods: Api<Pod> = Api::all(client.clone());
        watcher::watcher(
            pods,
            watcher::Config::default().fields(&format!("spec.nodeName={name}")),
        )
        .default_backoff()
        .map(move |e| (name.clone(), e))
        .boxed()
    });
    let mut events = futures::stream::select_all(streams);
    let mut tracked: BTreeMap<String, Tracked> = BTreeMap::new();
    let mut done: HashSet<String> = HashSet::new();
    let mut listing: BTreeMap<String, HashSet<String>> = BTreeMap::new();
    let mut stop = shutdown.clone();
    tracing::info!(
        nodes = ?config.nodes.iter().map(|n| &n.name).collect::<Vec<_>>(),
        "stand-in kubelet running"
    );
    loop {
        tokio::select! {
            Some((node, event)) = events.next() => match event {
                Ok(Event::Init) => { listing.insert(node, HashSet::new()); }
                Ok(Event::InitApply(p)) => {
                    listing.entry(node.clone()).or_default().insert(p.uid().unwrap_or_default());
                    on_pod(&ctx, &node, p, &mut tracked, &mut done, &shutdown);
                }
                Ok(Event::InitDone) => {
                    // Pods deleted while the watch was down: their workers learn they are gone.
                    let seen = listing.remove(&node).unwrap_or_default();
                    for (uid, t) in &tracked {
                        if t.node == node && !seen.contains(uid) {
                            t.updates.send_replace(None);
                        }
                    }
                }
                Ok(Event::Apply(p)) => on_pod(&ctx, &node, p, &mut tracked, &mut done, &shutdown),
                Ok(Event::Delete(p)) => {
                    if let Some(t) = tracked.get(&p.uid().unwrap_or_default()) {
                        t.updates.send_replace(None);
                    }
                }
                Err(e) => tracing::warn!(node, "pod watch: {e}"),
            },
            _ = stop.changed() => break,
        }
        tracked.retain(|_, t| !t.task.is_finished());
    }
    tracing::info!("stopping: ending {} pods' containers", tracked.len());
    for (_, t) in tracked {
        if tokio::time::timeout(Duration::from_secs(30), t.task)
            .await
            .is_err()
        {
            tracing::warn!("a pod worker did not stop within 30 s");
        }
    }
    heartbeats.abort();
    services.abort();
    Ok(())
}

fn on_pod(
    ctx: &Arc<Ctx>,
    node: &str,
    pod: Pod,
    tracked: &mut BTreeMap<String, Tracked>,
    done: &mut HashSet<String>,
    shutdown: &watch::Receiver<bool>,
) {
    let uid = pod.uid().unwrap_or_default();
    if let Some(t) = tracked.get(&uid) {
        t.updates.send_replace(Some(pod));
        return;
    }
    let deleting = pod.metadata.deletion_timestamp.is_some();
    let status = pod.status.clone().unwrap_or_default();
    let phase = status.phase.clone().unwrap_or_default();
    let started_before = status
        .container_statuses
        .iter()
        .chain(status.init_container_statuses.iter())
        .flatten()
        .any(|c| {
            c.state
                .as_ref()
                .is_some_and(|s| s.running.is_some() || s.terminated.is_some())
        });
    let terminal = phase == "Succeeded" || phase == "Failed";
    if done.contains(&uid) || terminal || started_before || deleting {
        // Not ours to run (again): a finished pod, or one whose processes an earlier runner
        // started and took with it. Deleting it is still the kubelet's job.
        let client = ctx.client.clone();
        tokio::spawn(async move {
            if deleting {
                delete_now(&client, &pod).await;
            } else if !terminal {
                mark_lost(&client, &pod).await;
            }
        });
        return;
    }
    done.insert(uid.clone());
    let (tx, rx) = watch::channel(Some(pod.clone()));
    let task = tokio::spawn(pod::run(ctx.clone(), pod, rx, shutdown.clone()));
    tracked.insert(
        uid,
        Tracked {
            node: node.to_string(),
            updates: tx,
            task,
        },
    );
}

async fn delete_now(client: &Client, pod: &Pod) {
    let api: Api<Pod> = Api::namespaced(client.clone(), &pod.namespace().unwrap_or_default());
    let dp = DeleteParams {
        grace_period_seconds: Some(0),
        preconditions: Some(kube::api::Preconditions {
            uid: pod.uid(),
            resource_version: None,
        }),
        ..Default::default()
    };
    let _ = api.delete(&pod.name_any(), &dp).await;
}

async fn mark_lost(client: &Client, pod: &Pod) {
    let api: Api<Pod> = Api::namespaced(client.clone(), &pod.namespace().unwrap_or_default());
    let body = json!({"status": {
        "phase": "Failed",
        "reason": "ContainersLost",
        "message": "the stand-in kubelet that ran this pod's processes stopped; they are gone",
    }});
    tracing::warn!(pod = %pod.name_any(), "pod's processes were lost with an earlier runner; marking it Failed");
    let _ = api
        .patch_status(
            &pod.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&body),
        )
        .await;
}

async fn keep_nodes_alive(
    client: Client,
    nodes: Vec<NodeConfig>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(10)) => {}
            _ = shutdown.changed() => return,
        }
        for n in &nodes {
            if let Err(e) = node::heartbeat(&client, n).await {
                tracing::warn!(node = %n.name, "heartbeat: {e:#}");
            }
        }
    }
}

async fn watch_services(ctx: Arc<Ctx>) {
    let api: Api<Service> = Api::all(ctx.client.clone());
    let mut events = watcher::watcher(api, watcher::Config::default())
        .default_backoff()
        .boxed();
    while let Some(event) = events.next().await {
        let (svc, present) = match event {
            Ok(Event::Apply(s)) | Ok(Event::InitApply(s)) => (s, true),
            Ok(Event::Delete(s)) => (s, false),
            Ok(_) => continue,
            Err(e) => {
                tracing::warn!("service watch: {e}");
                continue;
            }
        };
        let spec = svc.spec.clone().unwrap_or_default();
        let headless = present && spec.cluster_ip.as_deref() == Some("None");
        ctx.hosts.lock().unwrap().set_service(
            &svc.namespace().unwrap_or_default(),
            &svc.name_any(),
            headless.then_some(spec.publish_not_ready_addresses.unwrap_or(false)),
        );
    }
}

/// The API server's address from the kubeconfig, for KUBERNETES_SERVICE_HOST/PORT.
fn api_address(kubeconfig: &Path) -> Option<(String, u16)> {
    let config = Kubeconfig::read_from(kubeconfig).ok()?;
    let context = config.current_context.as_ref()?;
    let cluster_name = &config
        .contexts
        .iter()
        .find(|c| &c.name == context)?
        .context
        .as_ref()?
        .cluster;
    let server = config
        .clusters
        .iter()
        .find(|c| &c.name == cluster_name)?
        .cluster
        .as_ref()?
        .server
        .clone()?;
    let authority = server.strip_prefix("https://")?.split('/').next()?;
    let (host, port) = authority.rsplit_once(':')?;
    Some((
        host.trim_matches(['[', ']']).to_string(),
        port.parse().ok()?,
    ))
}
