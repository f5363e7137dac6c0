//! `charlm-operator run` runs the controller; `charlm-operator crd` prints the CRD it serves.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use tokio::sync::watch;

use charlm_operator::controller::{self, Context};
use charlm_operator::crd::crd_yaml;
use charlm_operator::leader::{LeaderElector, LeaseConfig};
use charlm_operator::metrics::{self, Health, Metrics};
use charlm_operator::progress::Networks;
use charlm_operator::resources::{parse_labels, NetworkPolicySettings, PodSettings};

#[derive(Parser)]
#[command(
    name = "charlm-operator",
    version,
    about = "Kubernetes operator for CharLMTraining resources"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the controller (kubeconfig from KUBECONFIG, ~/.kube/config, or the pod's service account).
    Run(Box<RunArgs>),
    /// Print the CustomResourceDefinition as YAML.
    Crd,
}

#[derive(clap::Args)]
struct RunArgs {
    /// Address of the /metrics, /healthz and /readyz endpoints.
    #[arg(long, env = "CHARLM_METRICS_ADDR", default_value = "0.0.0.0:8080")]
    metrics_addr: SocketAddr,
    /// Trainer image for trainings that set no spec.image.
    #[arg(
        long,
        env = "CHARLM_TRAINER_IMAGE",
        default_value = "charlm-trainer:latest"
    )]
    trainer_image: String,
    /// imagePullPolicy of the trainer containers (Always, IfNotPresent, Never); Kubernetes' default when unset.
    #[arg(long, env = "CHARLM_TRAINER_IMAGE_PULL_POLICY")]
    trainer_image_pull_policy: Option<String>,
    /// Act only while holding the leader lease (for more than one replica).
    #[arg(long, env = "CHARLM_LEADER_ELECT", default_value_t = true, action = clap::ArgAction::Set)]
    leader_elect: bool,
    #[arg(long, env = "CHARLM_LEASE_NAME", default_value = "charlm-operator")]
    lease_name: String,
    /// The operator's own namespace: its lease lives there, and the NetworkPolicies admit its pods there.
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    lease_namespace: String,
    #[arg(long, env = "CHARLM_LEASE_DURATION_SECONDS", default_value_t = 15)]
    lease_duration_seconds: u64,
    /// Name of this replica in the lease and in events; the pod name in a cluster.
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// Watch only this namespace instead of all (the ClusterRole still grants all).
    #[arg(long, env = "CHARLM_WATCH_NAMESPACE")]
    watch_namespace: Option<String>,
    /// Price of one GPU-hour (any currency) for the estimated cost in each training's status.
    #[arg(long, env = "CHARLM_PRICE_PER_GPU_HOUR", default_value_t = 3.0, value_parser = parse_price)]
    price_per_gpu_hour: f64,
    /// Networks whose pod addresses the operator may dial for worker 0's /progress (CIDRs,
    /// comma-separated); empty: any. Pods elsewhere run unobserved (no progress in the status).
    #[arg(long, env = "CHARLM_PROGRESS_NETWORKS", value_delimiter = ',', value_parser = parse_network)]
    progress_networks: Vec<String>,
    /// Create a NetworkPolicy per training that admits connections to its workers only from its
    /// own workers, and to their metrics port also from the operator and the namespaces of
    /// --network-policy-metrics-namespaces (docs/operator.md).
    #[arg(long, env = "CHARLM_NETWORK_POLICY", default_value_t = true, action = clap::ArgAction::Set)]
    network_policy: bool,
    /// Labels of the operator's own pods (in POD_NAMESPACE), which the policies admit to the
    /// metrics port (key=value, comma-separated).
    #[arg(
        long,
        env = "CHARLM_NETWORK_POLICY_OPERATOR_LABELS",
        default_value = "app.kubernetes.io/name=charlm-operator",
        value_parser = parse_operator_labels
    )]
    network_policy_operator_labels: String,
    /// Namespaces whose pods (Prometheus) the policies admit to the trainers' metrics port
    /// (comma-separated); empty: none but the operator.
    #[arg(
        long,
        env = "CHARLM_NETWORK_POLICY_METRICS_NAMESPACES",
        value_delimiter = ','
    )]
    network_policy_metrics_namespaces: Vec<String>,
    /// Log as JSON lines instead of text.
    #[arg(long, env = "CHARLM_LOG_JSON", default_value_t = false, action = clap::ArgAction::Set)]
    log_json: bool,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Crd => print_crd(),
        Command::Run(args) => {
            init_tracing(args.log_json);
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?
                .block_on(run(*args))
        }
    }
}

/// Prints the CRD; a reader that stops early (`charlm-operator crd | head -1`) is not an error.
fn print_crd() -> anyhow::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out
        .write_all(crd_yaml().as_bytes())
        .and_then(|()| out.flush())
    {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(()),
    }
}

fn init_tracing(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| "info,kube=warn".into());
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    let identity = args.identity.clone().unwrap_or_else(default_identity);
    let client = kube::Client::try_default()
        .await
        .context("no Kubernetes client configuration (set KUBECONFIG or run in a pod)")?;
    let metrics = Arc::new(Metrics::default());
    let health = Health::default();
    let server = tokio::spawn(metrics::serve(
        args.metrics_addr,
        metrics::router(metrics.clone(), health.clone()),
    ));

    controller::check_crd(&client, args.watch_namespace.as_deref()).await?;
    // A standby replica is healthy and ready: it is waiting, as it should.
    health.set_ready(true);

    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::spawn(async move {
        shutdown_signal().await;
        tracing::info!("shutting down");
        let _ = stop_tx.send(true);
    });

    let elector = args.leader_elect.then(|| {
        LeaderElector::new(
            client.clone(),
            LeaseConfig::new(
                &args.lease_name,
                &args.lease_namespace,
                &identity,
                Duration::from_secs(args.lease_duration_seconds.max(2)),
            ),
        )
    });
    if let Some(elector) = &elector {
        tokio::select! {
            _ = elector.acquire() => {}
            _ = stopped(stop_rx.clone()) => return Ok(()),
            result = server => return Err(server_ended(result)),
        }
    }
    metrics.leader.set(1);

    let settings = PodSettings {
        default_image: args.trainer_image.clone(),
        image_pull_policy: args.trainer_image_pull_policy.clone(),
    };
    let network_policy = args.network_policy.then(|| NetworkPolicySettings {
        operator_namespace: args.lease_namespace.clone(),
        operator_labels: parse_labels(&args.network_policy_operator_labels)
            .expect("checked when the flags were parsed"),
        metrics_namespaces: args
            .network_policy_metrics_namespaces
            .iter()
            .map(|n| n.trim().to_string())
            .filter(|n| !n.is_empty())
            .collect(),
    });
    let kueue = controller::kueue_served(&client).await;
    let mut ctx = Context::new(
        client,
        &identity,
        settings,
        network_policy,
        metrics.clone(),
        args.price_per_gpu_hour,
        Networks::parse(&args.progress_networks).map_err(anyhow::Error::msg)?,
    )?;
    ctx.kueue = kueue;
    let ctx = Arc::new(ctx);
    tracing::info!(%identity, kueue, "controller starting");
    let controller = controller::run(ctx, args.watch_namespace.clone(), stopped(stop_rx));
    match &elector {
        Some(elector) => {
            tokio::select! {
                _ = controller => {}
                lost = elector.hold() => {
                    // Another replica may act from now on; so must we not, from this very moment.
                    metrics.leader.set(0);
                    return Err(anyhow::anyhow!(lost));
                }
            }
            elector.release().await;
        }
        None => controller.await,
    }
    Ok(())
}

fn server_ended(result: Result<anyhow::Result<()>, tokio::task::JoinError>) -> anyhow::Error {
    match result {
        Ok(Err(e)) => e,
        Ok(Ok(())) => anyhow::anyhow!("the metrics server stopped"),
        Err(e) => anyhow::anyhow!("the metrics server panicked: {e}"),
    }
}

async fn stopped(mut rx: watch::Receiver<bool>) {
    let _ = rx.wait_for(|stop| *stop).await;
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing a SIGTERM handler");
    tokio::select! {
        _ = ctrl_c => {}
        _ = term.recv() => {}
    }
}

fn parse_price(text: &str) -> Result<f64, String> {
    match text.trim().trim_start_matches('$').parse::<f64>() {
        Ok(v) if v.is_finite() && v >= 0.0 => Ok(v),
        _ => Err(format!(
            "{text:?} is not a price: give a number of at least 0, e.g. 3 or 2.49"
        )),
    }
}

fn parse_operator_labels(text: &str) -> Result<String, String> {
    parse_labels(text).map(|_| text.to_string())
}

fn parse_network(text: &str) -> Result<String, String> {
    Networks::parse(&[text.to_string()]).map(|_| text.trim().to_string())
}

/// Host name and process id: unique per process, so two local replicas never share a lease identity.
fn default_identity() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "charlm-operator".to_string());
    format!("{host}-{}", std::process::id())
}
