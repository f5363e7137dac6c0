//! What every step that talks to the API server shares: the [`Context`] (client, event recorder,
//! settings, metrics), the [`Error`] they return, the field manager they apply as, and how they
//! publish Events. Its own module so that the controller and the Kueue glue (`queueing`) both use
//! it without importing each other.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::Client;

use crate::metrics::Metrics;
use crate::progress::{Networks, ProgressClient};
use crate::resources::{NetworkPolicySettings, PodSettings};

pub const FIELD_MANAGER: &str = "charlm-operator";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("finalizer: {0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),
    #[error("serialising {0}: {1}")]
    Serde(&'static str, #[source] serde_json::Error),
    /// A Kueue object the operator reads says what it cannot use (e.g. a ResourceFlavor's
    /// tolerations that do not parse).
    #[error("Kueue: {0}")]
    Kueue(String),
}

pub struct Context {
    pub client: Client,
    pub recorder: Recorder,
    pub settings: PodSettings,
    /// Who may reach each training's workers; `None`: no NetworkPolicy (`--network-policy=false`).
    pub network_policy: Option<NetworkPolicySettings>,
    pub metrics: Arc<Metrics>,
    pub progress: ProgressClient,
    /// Price of one GPU-hour, for the estimated cost in each training's status.
    pub price_per_gpu_hour: f64,
    /// Kueue's Workload API is served (`kueue_served`, at start): queued trainings get Workloads.
    pub kueue: bool,
    /// When each training's progress was last asked for ("namespace/name"), answered or not.
    pub(crate) last_poll: Mutex<HashMap<String, Instant>>,
}

impl Context {
    pub fn new(
        client: Client,
        identity: &str,
        settings: PodSettings,
        network_policy: Option<NetworkPolicySettings>,
        metrics: Arc<Metrics>,
        price_per_gpu_hour: f64,
        progress_networks: Networks,
    ) -> anyhow::Result<Self> {
        let reporter = Reporter {
            controller: FIELD_MANAGER.to_string(),
            instance: Some(identity.to_string()),
        };
        Ok(Context {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            settings,
            network_policy,
            metrics,
            progress: ProgressClient::new(Duration::from_secs(3), progress_networks)?,
            price_per_gpu_hour,
            kueue: false,
            last_poll: Mutex::default(),
        })
    }
}

pub(crate) async fn publish(
    ctx: &Context,
    reference: &k8s_openapi::api::core::v1::ObjectReference,
    type_: EventType,
    reason: &str,
    note: String,
) {
    let event = Event {
        type_,
        reason: reason.to_string(),
        note: Some(note),
        action: "Reconcile".to_string(),
        secondary: None,
    };
    send(ctx, reference, event).await;
}

/// Publishes `event` about `reference`, its note cut to what an Event holds; a refusal is logged,
/// never an error of the reconcile.
pub(crate) async fn send(
    ctx: &Context,
    reference: &k8s_openapi::api::core::v1::ObjectReference,
    mut event: Event,
) {
    event.note = event.note.map(truncate_note);
    if let Err(err) = ctx.recorder.publish(&event, reference).await {
        tracing::warn!(error = %err, reason = %event.reason, "could not publish an event");
    }
}

/// Events carry at most 1 kB of note.
fn truncate_note(note: String) -> String {
    if note.len() <= 1000 {
        return note;
    }
    let mut cut = 1000;
    while !note.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}...", &note[..cut])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_notes_are_cut_on_a_char_boundary() {
        let note = "é".repeat(800);
        let cut = truncate_note(note);
        assert!(cut.len() <= 1003 && cut.ends_with("..."));
        assert_eq!(truncate_note("short".into()), "short");
    }
}
