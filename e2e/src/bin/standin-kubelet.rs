//! `standin-kubelet`: a test-only stand-in for the kubelet that runs the pods bound to its nodes as
//! local processes (see `charlm_e2e::standin`). Started by `e2e/controlplane/up --cpu-nodes=runner`
//! for the CPU nodes, or by a test for nodes of its own. SIGTERM or SIGINT stops it and every
//! container it started.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{bail, Context as _, Result};
use clap::{Parser, Subcommand};
use k8s_openapi::api::core::v1::Taint;

use charlm_e2e::standin::{kubelet, node, sandbox};

#[derive(Parser)]
#[command(
    name = "standin-kubelet",
    about = "Test-only stand-in for the kubelet: runs the pods bound to its nodes as local processes",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// Admin kubeconfig of the control plane.
    #[arg(long, env = "KUBECONFIG")]
    kubeconfig: Option<PathBuf>,
    /// A node to run (repeat for several); registered if it does not exist.
    #[arg(long = "node")]
    nodes: Vec<String>,
    /// Where pods' directories, logs and claim data live.
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Directory of the programs that container images stand for (`charlm-trainer:tag` runs
    /// `<dir>/charlm-trainer`).
    #[arg(long)]
    image_bin_dir: Option<PathBuf>,
    /// Label of registered nodes, KEY=VALUE (repeat); default charlm.dev/e2e-node=cpu.
    #[arg(long = "node-label")]
    node_labels: Vec<String>,
    /// Taint of registered nodes, KEY=VALUE:EFFECT (repeat); default none.
    #[arg(long = "node-taint")]
    node_taints: Vec<String>,
    /// CPU capacity of each node (default: this machine's CPUs).
    #[arg(long)]
    cpu: Option<String>,
    /// Memory capacity of each node (default: this machine's memory).
    #[arg(long)]
    memory: Option<String>,
    /// Pod capacity of each node.
    #[arg(long, default_value = "110")]
    pods: String,
    /// The nodes' InternalIP, which is also every pod's hostIP.
    #[arg(long, default_value = "127.0.0.1")]
    node_address: String,
}

#[derive(Subcommand)]
enum Command {
    /// Internal: set up one container's sandbox from LAUNCH (JSON) and exec its program.
    #[command(hide = true)]
    ExecContainer { launch: PathBuf },
}

fn main() {
    let cli = Cli::parse();
    if let Some(Command::ExecContainer { launch }) = &cli.command {
        sandbox::close_status_fd_on_exec();
        let message = match std::fs::read(launch)
            .map_err(|e| e.to_string())
            .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
        {
            Ok(l) => sandbox::exec(&l),
            Err(e) => format!("reading {}: {e}", launch.display()),
        };
        sandbox::report_start_failure(&message);
        std::process::exit(sandbox::START_ERROR_EXIT);
    }
    tracing_subscriber::fmt()
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,kube=warn".into()),
        )
        .init();
    let runtime = tokio::runtime::Runtime::new().expect("a tokio runtime");
    if let Err(e) = runtime.block_on(serve(cli)) {
        eprintln!("standin-kubelet: {e:#}");
        std::process::exit(1);
    }
}

async fn serve(cli: Cli) -> Result<()> {
    let kubeconfig = cli
        .kubeconfig
        .context("--kubeconfig (or KUBECONFIG) is required")?;
    let state_dir = cli.state_dir.context("--state-dir is required")?;
    let image_bin_dir = cli
        .image_bin_dir
        .context("--image-bin-dir is required")?
        .canonicalize()
        .context("--image-bin-dir must exist")?;
    if cli.nodes.is_empty() {
        bail!("give at least one --node");
    }
    let labels = if cli.node_labels.is_empty() {
        vec!["charlm.dev/e2e-node=cpu".to_string()]
    } else {
        cli.node_labels
    };
    let labels: BTreeMap<String, String> = labels
        .iter()
        .map(|l| {
            l.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .with_context(|| format!("--node-label {l:?} is not KEY=VALUE"))
        })
        .collect::<Result<_>>()?;
    let taints: Vec<Taint> = cli
        .node_taints
        .iter()
        .map(|t| {
            parse_taint(t).with_context(|| format!("--node-taint {t:?} is not KEY=VALUE:EFFECT"))
        })
        .collect::<Result<_>>()?;
    let (machine_cpu, machine_memory) = node::machine_capacity();
    let capacity: BTreeMap<String, String> = [
        ("cpu", cli.cpu.unwrap_or(machine_cpu)),
        ("memory", cli.memory.unwrap_or(machine_memory)),
        ("pods", cli.pods),
        ("ephemeral-storage", "100Gi".to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let nodes = cli
        .nodes
        .iter()
        .map(|name| node::NodeConfig {
            name: name.clone(),
            labels: labels.clone(),
            taints: taints.clone(),
            capacity: capacity.clone(),
            address: cli.node_address.clone(),
        })
        .collect();

    let (stop, shutdown) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
        let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        tracing::info!("signal received; stopping");
        let _ = stop.send(true);
    });
    kubelet::run(
        kubelet::Config {
            kubeconfig,
            nodes,
            state_dir,
            image_bin_dir,
            helper: std::env::current_exe()?,
        },
        shutdown,
    )
    .await
}

fn parse_taint(s: &str) -> Option<Taint> {
    let (kv, effect) = s.rsplit_once(':')?;
    let (key, value) = match kv.split_once('=') {
        Some((k, v)) => (k, Some(v.to_string())),
        None => (kv, None),
    };
    Some(Taint {
        key: key.to_string(),
        value,
        effect: effect.to_string(),
        time_added: None,
    })
}
