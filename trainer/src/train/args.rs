//! The flags of `charlm-trainer train`; each has an environment variable of the same name
//! (`--depth` ↔ `CHARLM_DEPTH`, the rule of `sys::flags`) for containers; those the operator
//! sets are named in `charlm_contract::env`. Each value is checked here, while parsing
//! (`sys::flags`); what depends on several flags or on the world size is checked by `Plan::new`.

use std::path::PathBuf;

use charlm_contract::PROGRESS_PORT;
use serde::Serialize;

use super::recipe::{Overrides, Recipe, DEFAULT_WEIGHT_DECAY_SCALE};
use crate::engine::autobatch::MicroBatch;
use crate::sys::flags::{self, DeviceChoice, LogFormat};

/// Early stop is on by default: in the data-constrained benchmark (docs/training.md, "Early stop")
/// every run reached its best well before its budget ended. Counting only evaluations where the
/// model fits its training split at least [`MEMORISING_MARGIN`] better than the validation split,
/// a patience of 2 stopped each of 21 runs that had a best before their end (both recipes, both
/// scaled presets, two days) with its best in `best/`: 20 two evaluations after the best, one
/// three after (an evaluation between was 0.49% apart, not yet memorising). Counting every
/// evaluation, it stopped 2026-recipe runs in the noisy high-learning-rate phase, up to 37% above
/// their best; a margin of 0.4% or less stopped one run before its best.
pub const DEFAULT_PATIENCE: u32 = 2;

/// How much lower (relative) the training split's bpc must be than the validation split's for an
/// evaluation to count toward the patience: below the noise of the high-learning-rate phase
/// (train and val within 0.1-0.3% there), above it once the model memorises.
pub const MEMORISING_MARGIN: f64 = 0.005;

#[derive(clap::Args, Debug, Clone, Serialize)]
pub struct Args {
    /// A directory written by `charlm-trainer prepare` (train.bin, val.bin, manifest.json).
    #[arg(long)]
    pub data: PathBuf,
    /// Transformer layers, 1 to 128; the width is 64 × depth, heads are 128 wide.
    #[arg(long, default_value_t = 12, value_parser = flags::depth)]
    pub depth: i64,
    /// Sequences per forward/backward on one device (1 or more), or `auto`: the largest power of
    /// two whose step fits in memory (on a CPU, also one whose micro-batch stays about a second);
    /// accumulation keeps --total-batch-size.
    #[arg(long, default_value = "auto")]
    pub device_batch_size: MicroBatch,
    /// Tokens per optimizer step over all ranks, a multiple of device batch × seq len × ranks;
    /// gradient accumulation fills it. Unset: one micro-batch per rank (no accumulation).
    #[arg(long, value_parser = flags::at_least(1i64))]
    pub total_batch_size: Option<i64>,
    /// Tokens per training sequence, 2 to 65536 (nanochat's --max-seq-len).
    #[arg(long, default_value_t = 2048, value_parser = flags::seq_len,
          visible_alias = "max-seq-len")]
    pub seq_len: i64,
    /// Time budget in hours (above 0); the learning rate decays to zero over its last
    /// --warmdown-ratio. A budget is required: --hours, --max-steps, or both. Unset: the steps
    /// alone end training.
    #[arg(long, value_parser = flags::positive)]
    pub hours: Option<f64>,
    /// Step limit, 1 or more (nanochat's --num-iterations); with --hours, whichever comes first
    /// ends training. Raised after a run ended, training continues and the schedule is that of
    /// the new budget (the start line says what the learning rate does). Unset: the hours alone
    /// end training.
    #[arg(long, value_parser = flags::at_least(1i64),
          visible_alias = "num-iterations")]
    pub max_steps: Option<i64>,
    /// Where checkpoints live (created if missing; must be writable); training resumes from the
    /// newest good one found here. Unset: no checkpoints, and no resume.
    #[arg(long)]
    pub checkpoint_dir: Option<PathBuf>,
    /// Start a new training from the weights of this checkpoint (a `step-…` or `best`
    /// directory, or a checkpoint folder: its best/, else its newest): step 0, a fresh optimizer,
    /// schedule and best/, on any dataset and sequence length, into a --checkpoint-dir of its own.
    /// Used only while --checkpoint-dir holds no checkpoint; after that the run resumes its own.
    /// Unset: a new training starts from random weights.
    #[arg(long, env = "CHARLM_INIT_FROM")]
    pub init_from: Option<PathBuf>,
    /// Minutes between rolling checkpoints, 0 or more (0: after every step); one is also saved
    /// at the end and on SIGTERM/Ctrl-C.
    #[arg(long, default_value_t = 30.0,
          value_parser = flags::non_negative)]
    pub checkpoint_every_minutes: f64,
    /// Rolling checkpoints kept, 1 or more (`best/` is kept besides).
    #[arg(long, default_value_t = 3,
          value_parser = flags::at_least(1usize))]
    pub keep_checkpoints: usize,
    /// Evaluate validation bits per character every N steps; 0: only at the end.
    #[arg(long, default_value_t = 250, value_parser = flags::at_least(0i64))]
    pub eval_every: i64,
    /// Validation tokens per evaluation, 1 or more (at most the whole split is used).
    #[arg(long, default_value_t = 4 * 1024 * 1024,
          value_parser = flags::at_least(1i64))]
    pub eval_tokens: i64,
    /// A step line every N steps (and at step 1), 1 or more.
    #[arg(long, default_value_t = 1, value_parser = flags::at_least(1i64))]
    pub log_every: i64,
    /// Seed of the initialisation and the data order, 0 or more.
    #[arg(long, default_value_t = 42, value_parser = flags::at_least(0u64))]
    pub seed: u64,
    /// Where to train: auto (CUDA when present, one GPU per local rank, else CPU), cpu or cuda.
    #[arg(long, value_enum, default_value = "auto")]
    pub device: DeviceChoice,
    /// The optimizer settings and schedules: nanochat-2025 or nanochat-2026 (docs/training.md,
    /// "Recipes"); the flags below, when given, win over the recipe's values.
    #[arg(long, value_enum, default_value_t = Recipe::default())]
    pub recipe: Recipe,
    /// Global gradient-norm clip, 0 or more; 0: off. Unset: the recipe's (2025: 1, 2026: off).
    #[arg(long, value_parser = flags::non_negative)]
    pub grad_clip: Option<f64>,
    /// Muon's learning rate for the blocks' matrices, 0 or more (0 freezes them). Unset: the
    /// recipe's.
    #[arg(long, value_parser = flags::non_negative)]
    pub matrix_lr: Option<f64>,
    /// AdamW's learning rate for the token embedding, 0 or more (0 freezes it). Unset: the
    /// recipe's.
    #[arg(long, value_parser = flags::non_negative)]
    pub embedding_lr: Option<f64>,
    /// AdamW's learning rate for the output projection, 0 or more (0 freezes it). Unset: the
    /// recipe's.
    #[arg(long, value_parser = flags::non_negative)]
    pub unembedding_lr: Option<f64>,
    /// Share of the budget, 0 to 1, over which the learning rate decays linearly (2025: to 0
    /// over 0.2; 2026: to 5% over 0.65); 0: a constant learning rate. Unset: the recipe's.
    #[arg(long, value_parser = flags::fraction)]
    pub warmdown_ratio: Option<f64>,
    /// Muon's cautious weight decay λ at the start (cosine to 0 over the budget), 0 or more.
    /// Unset: the recipe's (2025: 0; 2026: 0.28 scaled by batch and model size) times
    /// --weight-decay-scale.
    #[arg(long, value_parser = flags::non_negative)]
    pub weight_decay: Option<f64>,
    /// Multiplies the recipe's weight decay (unless --weight-decay is given), 0 or more: 3
    /// measured best for 30+ epochs over the data (docs/training.md).
    #[arg(long, default_value_t = DEFAULT_WEIGHT_DECAY_SCALE,
          value_parser = flags::non_negative)]
    pub weight_decay_scale: f64,
    /// Port of /progress and /metrics on global rank 0, 1 to 65535; 0: off.
    #[arg(long, default_value_t = PROGRESS_PORT,
          value_parser = flags::int(0u16, u16::MAX))]
    pub metrics_port: u16,
    /// File that receives the final progress JSON on exit (Kubernetes: /dev/termination-log).
    /// Unset: none.
    #[arg(long)]
    pub termination_log: Option<String>,
    /// Seconds a rank waits for the others (rendezvous and collectives) before failing, 1 or
    /// more.
    #[arg(long, default_value_t = 600,
          value_parser = flags::at_least(1u64))]
    pub dist_timeout_s: u64,
    /// CPU threads per rank, 1 or more. Unset: the cores divided by the local ranks.
    #[arg(long, value_parser = flags::at_least(1i32))]
    pub threads: Option<i32>,
    /// Stop (as complete) after N evaluations without a better validation bpc while the model
    /// memorises (its training split's bpc at least 0.5% below the validation split's); 0:
    /// never. The delivered model is `best/` either way; the default is justified in
    /// docs/training.md.
    #[arg(long, default_value_t = DEFAULT_PATIENCE,
          value_parser = flags::at_least(0u32))]
    pub early_stop_patience: u32,
    /// Dollars per GPU-hour, 0 or more, for the cost an early stop saved in the final summary.
    #[arg(long, default_value_t = 3.0,
          value_parser = flags::non_negative)]
    pub price_per_gpu_hour: f64,
    /// Write TensorBoard event files (loss, bpc, tokens/s, MFU) into this directory. Unset:
    /// none.
    #[arg(long)]
    pub tensorboard_dir: Option<PathBuf>,
    /// auto (human in a terminal, else json), human (human lines on stderr only) or json (the
    /// JSON Lines event stream of docs/contract.md on stdout, human lines on stderr).
    #[arg(long, value_enum, default_value = "auto")]
    pub log_format: LogFormat,
    /// Speed and memory choices of the training step (--kernels, --recompute, --weight-cache,
    /// --attention, --keep-activations); `auto` picks by device and memory.
    /// (Boxed: it would make `Args` the one large variant of the command enum.)
    #[command(flatten)]
    pub engine: Box<crate::engine::EngineOptions>,
}

impl Args {
    /// The recipe values the flags override.
    pub fn overrides(&self) -> Overrides {
        Overrides {
            matrix_lr: self.matrix_lr,
            embedding_lr: self.embedding_lr,
            unembedding_lr: self.unembedding_lr,
            warmdown_ratio: self.warmdown_ratio,
            grad_clip: self.grad_clip,
            weight_decay: self.weight_decay,
            weight_decay_scale: Some(self.weight_decay_scale),
        }
    }
}
