//! The operator's own Prometheus metrics (the trainer exports the training's figures itself) and the
//! HTTP server for `/metrics`, `/healthz` and `/readyz`.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::crd::CharLMTrainingStatus;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PhaseLabel {
    pub phase: String,
}

/// Names one training. Not `namespace`: Prometheus keeps that label for the scraped target (the
/// operator's own namespace) and would rename ours.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TrainingLabels {
    pub training_namespace: String,
    pub training: String,
}

type FloatGauge = Gauge<f64, AtomicU64>;

/// What the status says of each training's spending, as gauges (the trainer cannot know them:
/// it sees neither the price nor the restarts of the gang).
#[derive(Default)]
pub struct TrainingGauges {
    pub gpu_hours: Family<TrainingLabels, FloatGauge>,
    pub estimated_cost: Family<TrainingLabels, FloatGauge>,
    pub restarts: Family<TrainingLabels, Gauge>,
}

pub struct Metrics {
    registry: Registry,
    pub reconciles: Family<ResultLabel, Counter>,
    pub reconcile_seconds: Histogram,
    pub gang_restarts: Family<ReasonLabel, Counter>,
    pub phase_changes: Family<PhaseLabel, Counter>,
    pub pods_created: Counter,
    pub pods_deleted: Counter,
    pub progress_polls: Family<ResultLabel, Counter>,
    pub leader: Gauge,
    pub trainings: TrainingGauges,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("charlm_operator");
        let reconciles = Family::<ResultLabel, Counter>::default();
        registry.register(
            "reconciliations",
            "Reconciliations of CharLMTraining resources, by result",
            reconciles.clone(),
        );
        let reconcile_seconds = Histogram::new(exponential_buckets(0.005, 2.0, 12));
        registry.register(
            "reconcile_duration_seconds",
            "Time spent in one reconciliation",
            reconcile_seconds.clone(),
        );
        let gang_restarts = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "gang_restarts",
            "Gang restarts of trainings, by reason",
            gang_restarts.clone(),
        );
        let phase_changes = Family::<PhaseLabel, Counter>::default();
        registry.register(
            "phase_transitions",
            "Trainings entering a phase",
            phase_changes.clone(),
        );
        let pods_created = Counter::default();
        registry.register(
            "worker_pods_created",
            "Worker pods created",
            pods_created.clone(),
        );
        let pods_deleted = Counter::default();
        registry.register(
            "worker_pods_deleted",
            "Worker pods deleted",
            pods_deleted.clone(),
        );
        let progress_polls = Family::<ResultLabel, Counter>::default();
        registry.register(
            "progress_polls",
            "Reads of worker 0's /progress, by result (ok, unreachable, bad_answer, refused: the \
             address is outside --progress-networks and nothing was sent)",
            progress_polls.clone(),
        );
        let leader = Gauge::default();
        registry.register(
            "leader",
            "1 while this replica holds the leader lease (or runs without election)",
            leader.clone(),
        );
        let trainings = TrainingGauges::default();
        registry.register(
            "training_gpu_hours",
            "GPU-hours a training has used (status.usage.gpuHours)",
            trainings.gpu_hours.clone(),
        );
        registry.register(
            "training_estimated_cost",
            "GPU-hours x the price per GPU-hour (status.usage.estimatedCost)",
            trainings.estimated_cost.clone(),
        );
        registry.register(
            "training_restarts",
            "Gang restarts of a training counted against maxRestarts (status.restarts)",
            trainings.restarts.clone(),
        );
        Metrics {
            registry,
            reconciles,
            reconcile_seconds,
            gang_restarts,
            phase_changes,
            pods_created,
            pods_deleted,
            progress_polls,
            leader,
            trainings,
        }
    }
}

impl Metrics {
    pub fn reconciled(&self, ok: bool, elapsed: Duration) {
        let result = if ok { "ok" } else { "error" }.to_string();
        self.reconciles.get_or_create(&ResultLabel { result }).inc();
        self.reconcile_seconds.observe(elapsed.as_secs_f64());
    }

    /// Sets a training's gauges from the status just written.
    pub fn training_status(&self, namespace: &str, name: &str, status: &CharLMTrainingStatus) {
        let labels = training_labels(namespace, name);
        let usage = status.usage.clone().unwrap_or_default();
        let t = &self.trainings;
        t.gpu_hours.get_or_create(&labels).set(usage.gpu_hours);
        t.estimated_cost
            .get_or_create(&labels)
            .set(usage.estimated_cost);
        t.restarts
            .get_or_create(&labels)
            .set(i64::from(status.restarts));
    }

    /// Drops a deleted training's series, so that they do not linger until the operator restarts.
    pub fn training_gone(&self, namespace: &str, name: &str) {
        let labels = training_labels(namespace, name);
        let t = &self.trainings;
        t.gpu_hours.remove(&labels);
        t.estimated_cost.remove(&labels);
        t.restarts.remove(&labels);
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}

fn training_labels(namespace: &str, name: &str) -> TrainingLabels {
    TrainingLabels {
        training_namespace: namespace.to_string(),
        training: name.to_string(),
    }
}

/// Shared between the controller and the HTTP server: is this replica ready to serve?
#[derive(Clone, Default)]
pub struct Health {
    ready: Arc<AtomicBool>,
}

impl Health {
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::SeqCst);
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
    }
}

#[derive(Clone)]
struct AppState {
    metrics: Arc<Metrics>,
    health: Health,
}

pub fn router(metrics: Arc<Metrics>, health: Health) -> Router {
    Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(ready_handler))
        .with_state(AppState { metrics, health })
}

async fn metrics_handler(State(state): State<AppState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.encode(),
    )
}

async fn ready_handler(State(state): State<AppState>) -> impl IntoResponse {
    if state.health.is_ready() {
        (StatusCode::OK, "ready")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready")
    }
}

/// Serves the router until the process ends.
pub async fn serve(addr: SocketAddr, router: Router) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {addr} (--metrics-addr): {e}"))?;
    tracing::info!(%addr, "serving /metrics, /healthz and /readyz");
    axum::serve(listener, router).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_encode_with_prefix() {
        let m = Metrics::default();
        m.reconciled(true, Duration::from_millis(20));
        m.reconciled(false, Duration::from_millis(20));
        m.gang_restarts
            .get_or_create(&ReasonLabel {
                reason: "WorkerFailed".into(),
            })
            .inc();
        let text = m.encode();
        assert!(
            text.contains(r#"charlm_operator_reconciliations_total{result="ok"} 1"#),
            "{text}"
        );
        assert!(text.contains(r#"charlm_operator_gang_restarts_total{reason="WorkerFailed"} 1"#));
        assert!(text.contains("charlm_operator_reconcile_duration_seconds_count 2"));
        assert!(text.ends_with("# EOF\n"));
    }

    #[test]
    fn training_gauges_follow_the_status_and_go_with_the_training() {
        let m = Metrics::default();
        let status = CharLMTrainingStatus {
            restarts: 2,
            usage: Some(crate::crd::UsageStatus {
                gpu_hours: 1.5,
                estimated_cost: 4.5,
                ..Default::default()
            }),
            ..Default::default()
        };
        m.training_status("team-a", "demo", &status);
        let text = m.encode();
        let labels = r#"{training_namespace="team-a",training="demo"}"#;
        for line in [
            format!("charlm_operator_training_gpu_hours{labels} 1.5\n"),
            format!("charlm_operator_training_estimated_cost{labels} 4.5\n"),
            format!("charlm_operator_training_restarts{labels} 2\n"),
        ] {
            assert!(text.contains(&line), "{line:?} missing from\n{text}");
        }
        m.training_gone("team-a", "demo");
        assert!(!m.encode().contains("demo"), "{}", m.encode());
    }

    #[tokio::test]
    async fn endpoints_answer() {
        let health = Health::default();
        let metrics = Arc::new(Metrics::default());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = router(metrics, health.clone());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        let http = reqwest::Client::new();
        let get = |path: &'static str| {
            let http = http.clone();
            async move {
                http.get(format!("http://{addr}{path}"))
                    .send()
                    .await
                    .unwrap()
            }
        };
        assert_eq!(get("/healthz").await.status(), 200);
        assert_eq!(get("/readyz").await.status(), 503);
        health.set_ready(true);
        assert_eq!(get("/readyz").await.status(), 200);
        let body = get("/metrics").await.text().await.unwrap();
        assert!(body.contains("charlm_operator_leader"));
    }
}
