//! The command line: kubectl's connection flags, then one subcommand per thing a user does with a
//! training.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// See and use CharLMTrainings: progress, the trainer's log, samples from the best checkpoint,
/// and a copy of it. Run as `kubectl charlm ...` once the binary is on PATH.
#[derive(Parser, Debug)]
#[command(name = "kubectl-charlm", bin_name = "kubectl charlm", version)]
pub struct Cli {
    #[command(flatten)]
    pub connection: Connection,
    #[command(subcommand)]
    pub command: Command,
}

/// Which cluster and namespace, resolved as kubectl resolves them.
#[derive(Args, Debug, Clone)]
pub struct Connection {
    /// The kubeconfig file; default `$KUBECONFIG`, else `~/.kube/config`, else the in-cluster
    /// service account.
    #[arg(long, global = true)]
    pub kubeconfig: Option<PathBuf>,
    /// The kubeconfig context; default its current context.
    #[arg(long, global = true)]
    pub context: Option<String>,
    /// The namespace of the training; default the context's namespace, else `default`.
    #[arg(short = 'n', long, global = true)]
    pub namespace: Option<String>,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Phase, step and share of the budget, best validation bpc, time left, GPU-hours and cost,
    /// restarts, and the training loss as a curve.
    Status { name: String },
    /// Worker 0's trainer log (rank 0's human lines and the JSON event stream).
    Logs {
        name: String,
        /// Keep streaming the log as it grows.
        #[arg(short, long)]
        follow: bool,
        /// Lines from the end only.
        #[arg(long)]
        tail: Option<i64>,
        /// The log of the previous container, after a restart of the pod's container.
        #[arg(short, long)]
        previous: bool,
    },
    /// Continue a prompt with the training's best checkpoint (the newest one while there is no
    /// best): a short-lived pod of the trainer image runs `charlm-trainer sample` on the claim.
    Sample {
        name: String,
        /// Text to continue: vocabulary characters only (`0-9 + - H B L .` and newline).
        #[arg(long, default_value = "")]
        prompt: String,
        /// Most characters to generate.
        #[arg(long, default_value_t = 256)]
        max_tokens: u32,
        /// Softmax temperature; 0 picks the most likely character every time.
        #[arg(long, default_value_t = 1.0)]
        temperature: f64,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        #[command(flatten)]
        helper: HelperPod,
    },
    /// Copy the best checkpoint (`best/`) out of the claim into DIR/best.
    Export {
        name: String,
        /// The local directory to copy `best/` into (created if missing; DIR/best must not exist).
        #[arg(long)]
        to: PathBuf,
        #[command(flatten)]
        helper: HelperPod,
    },
}

/// Settings of the short-lived pod of `sample` and `export`.
#[derive(Args, Debug, Clone)]
pub struct HelperPod {
    /// The trainer image; default worker 0's, else the training's spec.image.
    #[arg(long)]
    pub image: Option<String>,
    /// Seconds the pod may take, from its creation to its end (its image pulled, the copy or the
    /// sample done); it is deleted then.
    #[arg(long, default_value_t = 600)]
    pub timeout: u64,
}
