//! The trainer's stdout under `train` and `launch` (docs/contract.md, "The event stream"): JSON
//! Lines, one [`Line`] per line, each an object with the stream's `schema` version, the `event`
//! name and, on every line a worker writes or that is about one worker, its global `rank`. Human
//! lines go to stderr. Readers (the operator reads the `error` event of a log tail) skip lines
//! that do not parse: another program's output, or an event of a newer schema they do not know.

use serde::{Deserialize, Serialize};

use crate::ProgressReport;

/// Bumped when a field changes its meaning or disappears; new fields and events do not bump it.
pub const SCHEMA: u32 = 1;

/// One line of the stream.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Line {
    pub schema: u32,
    /// The worker (global rank) that wrote the line or that it is about; absent on `launch`'s
    /// line about the whole node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rank: Option<u64>,
    #[serde(flatten)]
    pub event: Event,
}

impl Line {
    pub fn new(rank: Option<u64>, event: Event) -> Self {
        Self {
            schema: SCHEMA,
            rank,
            event,
        }
    }

    /// Parses one line of the stream; `None` for anything else (human text, unknown events).
    pub fn parse(text: &str) -> Option<Self> {
        let text = text.trim();
        if !text.starts_with('{') {
            return None;
        }
        serde_json::from_str(text).ok()
    }
}

/// What happened, by its `event` name.
// One value per line of output, made and dropped at once: its size costs nothing, and boxing
// `End` would only make every producer and reader spell it.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// `train` is about to take its first step (rank 0).
    Start(Start),
    /// A logged optimizer step (rank 0, every `--log-every` steps and the first).
    Step(Step),
    /// A validation (rank 0).
    Eval(Eval),
    /// A checkpoint written (rank 0).
    Checkpoint(Checkpoint),
    /// `train` ended without error (rank 0), also when the checkpoint had already ended it.
    End(End),
    /// A command failed; written just before it exits with `exit_code`.
    Error(ErrorEvent),
    /// `launch` started this node's workers.
    Launch(Launch),
    /// A worker of `launch` ended.
    Exit(WorkerExit),
    /// A line a worker wrote on stdout that was not an event, wrapped by `launch`.
    Output(Output),
    /// `launch` starts every worker again in place after a failure (a new round).
    Restart(Restart),
    /// Rank 0 stops because a peer failed: whether it saved the last complete step, and why not.
    Salvage(Salvage),
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Start {
    /// The step training starts from: 0, or the resumed checkpoint's.
    pub step: i64,
    /// The checkpoint directory it resumed from.
    pub resumed_from: Option<String>,
    pub depth: i64,
    pub params: i64,
    pub seq_len: i64,
    /// Sequences per forward/backward on one device.
    pub device_batch_size: i64,
    /// Micro-batches per optimizer step on each rank.
    pub accum_steps: i64,
    /// Tokens per optimizer step over all ranks.
    pub total_batch_size: i64,
    pub world_size: u64,
    /// The device's name (`cpu`, or the GPU's).
    pub device: String,
    /// How gradients are averaged: `nccl`, `tcpstore` (CPU ranks) or `single` (one process).
    pub collectives: String,
    pub tokens_per_epoch: u64,
    pub max_steps: Option<i64>,
    pub hours: Option<f64>,
    /// The learning-rate multiplier of the first step (below 1 when it starts in the warmdown).
    pub lr_mult: f64,
}

/// The figures of `/progress` at this step, under the same names.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Step {
    pub step: i64,
    pub total_steps_estimate: Option<i64>,
    /// Share of the budget spent, 0..1 (the further of time and steps).
    pub progress: f64,
    /// Mean training loss of the step over all ranks, nats per token.
    pub train_loss: f64,
    /// Learning-rate multiplier of the step (1, then down to 0 over the warmdown).
    pub lr_mult: f64,
    pub tokens_per_s: f64,
    /// Model FLOPs utilisation (0..1), on GPUs only.
    pub mfu: Option<f64>,
    pub elapsed_s: f64,
    pub eta_s: Option<f64>,
    pub epoch: f64,
    pub tokens: u64,
    pub tokens_per_epoch: Option<u64>,
    pub peak_memory_gib: Option<f64>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Eval {
    pub step: i64,
    /// Validation bits per character.
    pub val_bpc: f64,
    /// The same measured on as many training windows: below `val_bpc` the model is memorising.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub train_bpc: Option<f64>,
    /// This evaluation is the best so far (then `best/` holds it).
    pub best: bool,
    pub best_val_bpc: f64,
    pub best_step: i64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Checkpoint {
    pub step: i64,
    pub path: String,
    /// `rolling` (`step-…`, pruned to `--keep-checkpoints`) or `best`.
    pub kind: String,
    /// Seconds the save took.
    pub seconds: f64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct End {
    /// The final report: what `/progress` and the termination log hold.
    pub progress: ProgressReport,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct ErrorEvent {
    /// What went wrong and the fix, as the `error:` line on stderr says it.
    pub message: String,
    /// 2: bad input or settings (a retry cannot help); 1: anything else.
    pub exit_code: i32,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Launch {
    pub node_rank: u64,
    pub nnodes: u64,
    pub nproc_per_node: u64,
    pub world_size: u64,
    /// Global ranks `first_rank .. first_rank + nproc_per_node` run on this node.
    pub first_rank: u64,
    pub master_addr: String,
    pub master_port: u16,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct WorkerExit {
    /// The exit code, when it exited by itself.
    pub exit_code: Option<i32>,
    /// The signal that ended it (`SIGKILL`, ...), otherwise.
    pub signal: Option<String>,
    /// `launch` killed it after its grace period.
    pub killed: bool,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Restart {
    /// The round that starts now: 1 for the first in-place restart.
    pub round: u64,
    /// `--max-restarts`: the last round there may be.
    pub max_restarts: u64,
    /// What ended the round before (`rank 1 on node 0: killed by SIGKILL`), and what rank 0
    /// saved before it stopped.
    pub reason: String,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Salvage {
    /// The last step every rank completed: what a checkpoint saved now holds.
    pub step: i64,
    /// A checkpoint of `step` exists now (saved now, or it was saved already).
    pub saved: bool,
    /// Its directory, when `saved`.
    pub path: Option<String>,
    /// The newest checkpoint's step otherwise: where the restart resumes.
    pub resumes_from: Option<i64>,
    /// What happened, for people: `saved step 12 before stopping` or why that was not possible.
    pub message: String,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Output {
    /// The line as the worker wrote it, without its newline.
    pub text: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_starts_with_schema_and_carries_event_and_rank_as_fields() {
        let line = Line::new(
            Some(3),
            Event::Error(ErrorEvent {
                message: "bad".into(),
                exit_code: 2,
            }),
        );
        let text = serde_json::to_string(&line).unwrap();
        assert_eq!(
            text,
            r#"{"schema":1,"rank":3,"event":"error","message":"bad","exit_code":2}"#
        );
        assert_eq!(Line::parse(&text), Some(line));
        let node = serde_json::to_value(Line::new(None, Event::Launch(Launch::default()))).unwrap();
        assert!(node.get("rank").is_none() && node["event"] == "launch");
    }

    #[test]
    fn other_lines_and_unknown_events_are_not_lines() {
        assert!(Line::parse("[rank 0] step 1").is_none());
        assert!(Line::parse(r#"{"schema":1,"event":"from_the_future"}"#).is_none());
        assert!(Line::parse(r#"{"elapsed_s": 1}"#).is_none());
    }
}
