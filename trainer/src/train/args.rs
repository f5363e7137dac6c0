//! The flags of `charlm-trainer train`; each has an environment variable of the same meaning
//! for containers (docs/contract.md); those the operator sets are named in `charlm_contract::env`.

use std::path::PathBuf;

use charlm_contract::{env, PROGRESS_PORT};
use serde::Serialize;

use crate::engine::autobatch::MicroBatch;

#[derive(clap::Args, Debug, Clone, Serialize)]
pub struct Args {
    /// A directory written by `charlm-trainer prepare`.
    #[arg(long, env = env::DATA)]
    pub data: PathBuf,
    /// Transformer layers; width is 64 × depth.
    #[arg(long, env = env::DEPTH, default_value_t = 12)]
    pub depth: i64,
    /// Sequences per forward/backward on one device, or `auto`: the largest power of two whose
    /// step fits in memory (accumulation keeps the total batch).
    #[arg(long, env = env::DEVICE_BATCH_SIZE, default_value = "auto")]
    pub device_batch_size: MicroBatch,
    /// Tokens per optimizer step over all ranks; gradient accumulation fills it.
    /// Default: one micro-batch per rank (no accumulation).
    #[arg(long, env = env::TOTAL_BATCH_SIZE)]
    pub total_batch_size: Option<i64>,
    #[arg(long, env = env::SEQ_LEN, default_value_t = 2048)]
    pub seq_len: i64,
    /// Time budget; the learning rate decays to zero over its last 20%.
    #[arg(long, env = env::HOURS)]
    pub hours: Option<f64>,
    /// Step limit; with --hours, whichever comes first ends training.
    #[arg(long, env = env::MAX_STEPS)]
    pub max_steps: Option<i64>,
    /// Where checkpoints live; training resumes from the newest good one found here.
    #[arg(long, env = env::CHECKPOINT_DIR)]
    pub checkpoint_dir: Option<PathBuf>,
    #[arg(long, env = env::CHECKPOINT_EVERY_MINUTES, default_value_t = 30.0)]
    pub checkpoint_every_minutes: f64,
    /// Rolling checkpoints kept (the best one is kept besides).
    #[arg(long, env = env::KEEP_CHECKPOINTS, default_value_t = 3)]
    pub keep_checkpoints: usize,
    /// Evaluate validation bits per character every N steps (0: only at the end).
    #[arg(long, env = env::EVAL_EVERY, default_value_t = 250)]
    pub eval_every: i64,
    /// Validation tokens per evaluation (at most the whole split).
    #[arg(long, env = "CHARLM_EVAL_TOKENS", default_value_t = 4 * 1024 * 1024)]
    pub eval_tokens: i64,
    #[arg(long, env = "CHARLM_LOG_EVERY", default_value_t = 1)]
    pub log_every: i64,
    #[arg(long, env = env::SEED, default_value_t = 42)]
    pub seed: u64,
    /// auto: CUDA when present (one GPU per local rank), else CPU.
    #[arg(long, env = env::DEVICE, default_value = "auto")]
    pub device: String,
    #[arg(long, env = "CHARLM_GRAD_CLIP", default_value_t = 1.0)]
    pub grad_clip: f64,
    #[arg(long, env = "CHARLM_MATRIX_LR", default_value_t = 0.02)]
    pub matrix_lr: f64,
    #[arg(long, env = "CHARLM_EMBEDDING_LR", default_value_t = 0.2)]
    pub embedding_lr: f64,
    #[arg(long, env = "CHARLM_UNEMBEDDING_LR", default_value_t = 0.004)]
    pub unembedding_lr: f64,
    /// Fraction of the budget over which the learning rate decays linearly to zero.
    #[arg(long, env = "CHARLM_WARMDOWN_RATIO", default_value_t = 0.2)]
    pub warmdown_ratio: f64,
    /// Port of /progress and /metrics on global rank 0 (0: off).
    #[arg(long, env = env::METRICS_PORT, default_value_t = PROGRESS_PORT)]
    pub metrics_port: u16,
    /// File that receives the final progress JSON on exit (Kubernetes: /dev/termination-log).
    #[arg(long, env = env::TERMINATION_LOG)]
    pub termination_log: Option<String>,
    /// Seconds a rank waits for the others (rendezvous and collectives) before failing.
    #[arg(long, env = "CHARLM_DIST_TIMEOUT", default_value_t = 600)]
    pub dist_timeout_s: u64,
    /// CPU threads per rank (default: cores / local ranks).
    #[arg(long, env = "CHARLM_THREADS")]
    pub threads: Option<i32>,
    /// Stop (as complete) after N evaluations in a row without a better validation bpc (0: never).
    #[arg(long, env = env::EARLY_STOP_PATIENCE, default_value_t = 0)]
    pub early_stop_patience: u32,
    /// Write TensorBoard event files (loss, bpc, tokens/s, MFU) into this directory.
    #[arg(long, env = env::TENSORBOARD_DIR)]
    pub tensorboard_dir: Option<PathBuf>,
    /// Speed and memory choices of the training step (--kernels, --recompute, --weight-cache,
    /// --attention, --keep-activations); `auto` picks by device and memory.
    /// (Boxed: it would make `Args` the one large variant of the command enum.)
    #[command(flatten)]
    pub engine: Box<crate::engine::EngineOptions>,
}
