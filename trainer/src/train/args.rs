//! The flags of `charlm-trainer train`; each has an environment variable of the same name
//! (`--depth` ↔ `CHARLM_DEPTH`, the rule of `sys::flags`) for containers; those the operator
//! sets are named in `charlm_contract::env`. Each value is checked here, while parsing
//! (`sys::flags`); what depends on several flags or on the world size is checked by `Plan::new`.

use std::path::PathBuf;

use charlm_contract::{env, PROGRESS_PORT};
use serde::Serialize;

use crate::engine::autobatch::MicroBatch;
use crate::sys::flags::{self, DeviceChoice, LogFormat};

#[derive(clap::Args, Debug, Clone, Serialize)]
pub struct Args {
    /// A directory written by `charlm-trainer prepare` (train.bin, val.bin, manifest.json).
    #[arg(long, env = env::DATA)]
    pub data: PathBuf,
    /// Transformer layers, 1 to 128; the width is 64 × depth, heads are 128 wide.
    #[arg(long, env = env::DEPTH, default_value_t = 12, value_parser = flags::depth)]
    pub depth: i64,
    /// Sequences per forward/backward on one device (1 or more), or `auto`: the largest power of
    /// two whose step fits in memory (on a CPU, also one whose micro-batch stays about a second);
    /// accumulation keeps --total-batch-size.
    #[arg(long, env = env::DEVICE_BATCH_SIZE, default_value = "auto")]
    pub device_batch_size: MicroBatch,
    /// Tokens per optimizer step over all ranks, a multiple of device batch × seq len × ranks;
    /// gradient accumulation fills it. Unset: one micro-batch per rank (no accumulation).
    #[arg(long, env = env::TOTAL_BATCH_SIZE, value_parser = flags::at_least(1i64))]
    pub total_batch_size: Option<i64>,
    /// Tokens per training sequence, 2 to 65536 (nanochat's --max-seq-len).
    #[arg(long, env = env::SEQ_LEN, default_value_t = 2048, value_parser = flags::seq_len,
          visible_alias = "max-seq-len")]
    pub seq_len: i64,
    /// Time budget in hours (above 0); the learning rate decays to zero over its last
    /// --warmdown-ratio. A budget is required: --hours, --max-steps, or both. Unset: the steps
    /// alone end training.
    #[arg(long, env = env::HOURS, value_parser = flags::positive)]
    pub hours: Option<f64>,
    /// Step limit, 1 or more (nanochat's --num-iterations); with --hours, whichever comes first
    /// ends training. Raised after a run ended, training continues and the schedule is that of
    /// the new budget (the start line says what the learning rate does). Unset: the hours alone
    /// end training.
    #[arg(long, env = env::MAX_STEPS, value_parser = flags::at_least(1i64),
          visible_alias = "num-iterations")]
    pub max_steps: Option<i64>,
    /// Where checkpoints live (created if missing; must be writable); training resumes from the
    /// newest good one found here. Unset: no checkpoints, and no resume.
    #[arg(long, env = env::CHECKPOINT_DIR)]
    pub checkpoint_dir: Option<PathBuf>,
    /// Minutes between rolling checkpoints, 0 or more (0: after every step); one is also saved
    /// at the end and on SIGTERM/Ctrl-C.
    #[arg(long, env = env::CHECKPOINT_EVERY_MINUTES, default_value_t = 30.0,
          value_parser = flags::non_negative)]
    pub checkpoint_every_minutes: f64,
    /// Rolling checkpoints kept, 1 or more (`best/` is kept besides).
    #[arg(long, env = env::KEEP_CHECKPOINTS, default_value_t = 3,
          value_parser = flags::at_least(1usize))]
    pub keep_checkpoints: usize,
    /// Evaluate validation bits per character every N steps; 0: only at the end.
    #[arg(long, env = env::EVAL_EVERY, default_value_t = 250, value_parser = flags::at_least(0i64))]
    pub eval_every: i64,
    /// Validation tokens per evaluation, 1 or more (at most the whole split is used).
    #[arg(long, env = "CHARLM_EVAL_TOKENS", default_value_t = 4 * 1024 * 1024,
          value_parser = flags::at_least(1i64))]
    pub eval_tokens: i64,
    /// A step line every N steps (and at step 1), 1 or more.
    #[arg(long, env = "CHARLM_LOG_EVERY", default_value_t = 1, value_parser = flags::at_least(1i64))]
    pub log_every: i64,
    /// Seed of the initialisation and the data order, 0 or more.
    #[arg(long, env = env::SEED, default_value_t = 42, value_parser = flags::at_least(0u64))]
    pub seed: u64,
    /// Where to train: auto (CUDA when present, one GPU per local rank, else CPU), cpu or cuda.
    #[arg(long, env = env::DEVICE, value_enum, default_value = "auto")]
    pub device: DeviceChoice,
    /// Global gradient-norm clip, 0 or more; 0: off.
    #[arg(long, env = "CHARLM_GRAD_CLIP", default_value_t = 1.0, value_parser = flags::non_negative)]
    pub grad_clip: f64,
    /// Muon's learning rate for the blocks' matrices, 0 or more (0 freezes them).
    #[arg(long, env = "CHARLM_MATRIX_LR", default_value_t = 0.02,
          value_parser = flags::non_negative)]
    pub matrix_lr: f64,
    /// AdamW's learning rate for the token embedding, 0 or more (0 freezes it).
    #[arg(long, env = "CHARLM_EMBEDDING_LR", default_value_t = 0.2,
          value_parser = flags::non_negative)]
    pub embedding_lr: f64,
    /// AdamW's learning rate for the output projection, 0 or more (0 freezes it).
    #[arg(long, env = "CHARLM_UNEMBEDDING_LR", default_value_t = 0.004,
          value_parser = flags::non_negative)]
    pub unembedding_lr: f64,
    /// Share of the budget, 0 to 1, over which the learning rate decays linearly to zero; 0: a
    /// constant learning rate.
    #[arg(long, env = "CHARLM_WARMDOWN_RATIO", default_value_t = 0.2, value_parser = flags::fraction)]
    pub warmdown_ratio: f64,
    /// Port of /progress and /metrics on global rank 0, 1 to 65535; 0: off.
    #[arg(long, env = env::METRICS_PORT, default_value_t = PROGRESS_PORT,
          value_parser = flags::int(0u16, u16::MAX))]
    pub metrics_port: u16,
    /// File that receives the final progress JSON on exit (Kubernetes: /dev/termination-log).
    /// Unset: none.
    #[arg(long, env = env::TERMINATION_LOG)]
    pub termination_log: Option<String>,
    /// Seconds a rank waits for the others (rendezvous and collectives) before failing, 1 or
    /// more.
    #[arg(long, env = "CHARLM_DIST_TIMEOUT_S", default_value_t = 600,
          value_parser = flags::at_least(1u64))]
    pub dist_timeout_s: u64,
    /// CPU threads per rank, 1 or more. Unset: the cores divided by the local ranks.
    #[arg(long, env = "CHARLM_THREADS", value_parser = flags::at_least(1i32))]
    pub threads: Option<i32>,
    /// Stop (as complete) after N evaluations in a row without a better validation bpc; 0:
    /// never.
    #[arg(long, env = env::EARLY_STOP_PATIENCE, default_value_t = 0,
          value_parser = flags::at_least(0u32))]
    pub early_stop_patience: u32,
    /// Write TensorBoard event files (loss, bpc, tokens/s, MFU) into this directory. Unset:
    /// none.
    #[arg(long, env = env::TENSORBOARD_DIR)]
    pub tensorboard_dir: Option<PathBuf>,
    /// auto (human in a terminal, else json), human (human lines on stderr only) or json (the
    /// JSON Lines event stream of docs/contract.md on stdout, human lines on stderr).
    #[arg(long, env = "CHARLM_LOG_FORMAT", value_enum, default_value = "auto")]
    pub log_format: LogFormat,
    /// Speed and memory choices of the training step (--kernels, --recompute, --weight-cache,
    /// --attention, --keep-activations); `auto` picks by device and memory.
    /// (Boxed: it would make `Args` the one large variant of the command enum.)
    #[command(flatten)]
    pub engine: Box<crate::engine::EngineOptions>,
}
