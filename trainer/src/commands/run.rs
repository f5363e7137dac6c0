//! `charlm-trainer run`: the whole workflow on one machine without Kubernetes, as the seed's
//! run.sh gave its users. It checks every setting (its own flags, their variables and the `train`
//! flags after `--`) before doing anything, prepares the texts into a folder of its own (reused
//! while the texts are unchanged), prints the plan for the budget, trains on every visible GPU
//! (or the CPU) through `launch` with early stop, and ends with samples from `best/`. Run again,
//! it resumes from the newest checkpoint (or, when the training is over, only samples).
//!
//! The base folder (`--base-dir`) is laid out as the seed's: `data/` holds the user's `.txt`
//! files (read, never written), `checkpoints/<model tag>/` the checkpoints (`d{depth}` unless
//! `--model-tag` names another, as nanochat's); run's prepared copy goes to `prepared/<digest>/`,
//! named by the texts' paths, sizes and SHA-256, so it can never collide with the texts and other
//! texts get a copy of their own. A checkpoint folder belongs to one training of one dataset and
//! one model: run refuses one that holds another's (other texts at the same depth), naming the
//! folder and `--model-tag`, before it starts the training — never a silent reuse or new folder.
//!
//! SIGTERM or Ctrl-C is passed on to `launch`, which passes it to the workers: they save a
//! checkpoint and exit, and so does `run`. `launch` dies with `run` even when `run` is SIGKILLed
//! (`sys::children`), and its workers with it.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result};
use serde::Serialize;
use sha2::{Digest, Sha256};
use signal_hook::consts::SIGTERM;
use signal_hook::iterator::Signals;

use super::plan::Hardware;
use super::sample;
use crate::data::format::{read_manifest, SourceFile, MANIFEST_FILE};
use crate::data::prepare::{prepare, sources};
use crate::engine::autobatch::MicroBatch;
use crate::model::GptConfig;
use crate::sys::children::{self, signal_name};
use crate::sys::error::{StorageFull, UserError};
use crate::sys::events::Events;
use crate::sys::flags::{self, Count, DeviceChoice, LogFormat};
use crate::train;
use crate::train::resume::{self, Remedy};
use crate::user_bail;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// A folder of `.txt` files (any depth; documents separated by a blank line); run only
    /// reads it. Unset: `<base-dir>/data`, the seed's layout.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Where run keeps its prepared copy of the texts (`prepared/<digest>/`), the checkpoints
    /// (`checkpoints/<model tag>/`) and, with WANDB_RUN set, TensorBoard files (`tensorboard/`).
    #[arg(long, default_value_os_t = default_base())]
    pub base_dir: PathBuf,
    /// The training's name: its checkpoints go to `<base-dir>/checkpoints/<tag>/`. Unset:
    /// `d<depth>`, as nanochat's --model-tag. A folder holds one training of one dataset and
    /// one model: other texts (or another model) at the same depth need a tag of their own.
    #[arg(long, value_parser = model_tag)]
    pub model_tag: Option<String>,
    /// Transformer layers, 1 to 128; the width is 64 × depth. Unset: the planner's
    /// recommendation.
    #[arg(long, value_parser = flags::depth)]
    pub depth: Option<i64>,
    /// Hours of training, above 0 (early stop may end it sooner).
    #[arg(long, default_value_t = 1.0, value_parser = flags::positive)]
    pub hours: f64,
    /// Worker processes, 1 or more, or `auto`: one per visible GPU, or one on the CPU.
    #[arg(long, default_value = "auto")]
    pub nproc_per_node: Count,
    /// Sequences per GPU per micro-step, 1 or more, or `auto`: the largest power of two that
    /// fits (`train --help` says more).
    #[arg(long, default_value = "auto")]
    pub device_batch_size: MicroBatch,
    /// Dollars per GPU-hour, 0 or more: the plan's cost and the summary's savings.
    #[arg(long, default_value_t = 3.0, value_parser = flags::non_negative,
          visible_alias = "price")]
    pub price_per_gpu_hour: f64,
    /// Samples generated from `best/` at the end, 0 or more (0: none).
    #[arg(long, default_value_t = 3, value_parser = flags::at_least(0usize))]
    pub samples: usize,
    /// Seconds the training gets to save a checkpoint and exit after SIGTERM/Ctrl-C, 0 or more,
    /// before it is killed.
    #[arg(long, default_value_t = 30, value_parser = flags::at_least(0u64))]
    pub grace_period_s: u64,
    /// auto (human in a terminal, else json), human (progress on stderr, the samples as text on
    /// stdout) or json (stdout is one JSON Lines stream: `plan`, the training's events, one
    /// `sample` event per sample; every human line on stderr).
    #[arg(long, value_enum, default_value = "auto")]
    pub log_format: LogFormat,
    /// More `train` flags, after `--` (e.g. `-- --eval-every 100 --recipe nanochat-2025`); those
    /// run sets itself (`--data`, `--depth`, `--hours`, `--device-batch-size`,
    /// `--checkpoint-dir`, `--price-per-gpu-hour`) go before `--`.
    #[arg(last = true)]
    pub train_args: Vec<String>,
}

fn default_base() -> PathBuf {
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."))
        .join(".cache/charlm-run")
}

/// `train` flags run passes itself: given again after `--` they would be given twice.
const OWN_TRAIN_FLAGS: [&str; 6] = [
    "data",
    "depth",
    "hours",
    "device-batch-size",
    "checkpoint-dir",
    "price-per-gpu-hour",
];

/// How `prepare` splits the texts (its defaults).
const VAL_FRACTION: f64 = 0.01;
const SPLIT_SEED: u64 = 0;

/// W&B's "off" value in nanochat's scripts.
const WANDB_OFF: &str = "dummy";

/// A refusal of the checkpoint folder names run's ways on, not `train`'s `--checkpoint-dir`.
const RUN_REMEDY: Remedy = Remedy {
    other_folder: "another --model-tag",
    init_from: "-- --init-from",
};

/// `--model-tag`: one folder name under `<base-dir>/checkpoints`.
fn model_tag(s: &str) -> Result<String, String> {
    let ok = !s.is_empty()
        && s != "."
        && s != ".."
        && !s.starts_with('.')
        && !s.contains(['/', '\\', '\0']);
    match ok {
        true => Ok(s.to_string()),
        false => Err(
            "use a folder name (no `/`, not starting with `.`), e.g. d8-shakespeare".to_string(),
        ),
    }
}

pub fn run(args: Args) -> Result<()> {
    let events = Events::new(args.log_format, None);
    let texts = args
        .data
        .clone()
        .unwrap_or_else(|| args.base_dir.join("data"));
    let gpus = flags::visible_gpus();
    let nproc = match args.nproc_per_node {
        Count::N(n) => n,
        Count::Auto => gpus.max(1),
    };
    let hardware = if gpus > 0 {
        Hardware::Gpus { count: nproc }
    } else {
        Hardware::cpu()
    };

    // Everything is checked before anything is written or started.
    let settled = args.depth.unwrap_or(planner_smallest());
    let train_args = check_train_flags(
        &train_argv(&args, Path::new("PREPARED"), settled, Path::new("CKPT"))?,
        nproc,
    )?;
    if !texts.is_dir() {
        let what = if texts.exists() {
            "is not a folder"
        } else {
            "does not exist"
        };
        user_bail!(
            "the texts folder {} {what}: put the .txt files there (the seed's layout: \
             <base-dir>/data, with --base-dir or CHARLM_BASE_DIR) or give --data DIR",
            texts.display()
        );
    }
    let tensorboard = wandb(&args, &train_args);

    std::fs::create_dir_all(&args.base_dir)
        .with_context(|| format!("create the base folder {}", args.base_dir.display()))?;
    let data = prepared(&texts, &args.base_dir)?;
    let unique_tokens = read_manifest(&data)?.train.tokens;
    let plan = hardware.plan(
        args.hours,
        args.price_per_gpu_hour,
        unique_tokens,
        train_args.seq_len,
    );
    super::plan::print(hardware, &plan, args.depth, &events);
    let depth = args.depth.unwrap_or(plan.recommended_depth);
    if let MicroBatch::Fixed(b) = args.device_batch_size {
        let device = train_args.device.resolve(0)?;
        crate::engine::memory::check_fits(&GptConfig::new(depth, train_args.seq_len), b, device)?;
    }
    let tag = args
        .model_tag
        .clone()
        .unwrap_or_else(|| format!("d{depth}"));
    let checkpoints = args.base_dir.join("checkpoints").join(&tag);
    let mut argv = train_argv(&args, &data, depth, &checkpoints)?;
    check_folder(&argv, nproc, &data, depth, &checkpoints, &texts, &args)?;
    if let Some(dir) = &tensorboard {
        argv.push("--tensorboard-dir".into());
        argv.push(dir.into());
    }

    let processes = match hardware {
        Hardware::Gpus { count } => format!("{count} GPU{}", if count == 1 { "" } else { "s" }),
        Hardware::Cpu { .. } if nproc == 1 => "the CPU".into(),
        Hardware::Cpu { .. } => format!("the CPU ({nproc} processes)"),
    };
    eprintln!(
        "run: training depth {depth} on {processes} for up to {} h into {}",
        args.hours,
        checkpoints.display()
    );
    let mut signals = children::stop_signals()?;
    let ended = train(&args, nproc, &events, &argv, &mut signals)?;
    if let Some(sig) = ended.stopped_by {
        if ended.status.success() {
            eprintln!(
                "run: stopped by {}; the checkpoint in {} resumes when you run the same command \
                 again",
                signal_name(sig),
                checkpoints.display()
            );
            return Ok(());
        }
        anyhow::bail!(
            "the training did not stop cleanly after {} ({}); run the same command again to \
             resume from the newest checkpoint in {}",
            signal_name(sig),
            ended.status,
            checkpoints.display()
        );
    }
    if ended.status.code() == Some(charlm_contract::exit::BAD_INPUT) {
        return Err(UserError(format!(
            "the training refused its input or settings ({}): its message above names the fix",
            ended.status
        ))
        .into());
    }
    if ended.status.code() == Some(charlm_contract::exit::STORAGE_FULL) {
        // Running again as it is would train until the next save and hit the same wall.
        return Err(StorageFull(format!(
            "the checkpoint volume of {} is full ({}): its message above says how much a \
             checkpoint needs; make room there (or --base-dir elsewhere, or `-- \
             --keep-checkpoints` fewer), then run the same command again to resume from the \
             newest checkpoint, which is intact",
            checkpoints.display(),
            ended.status
        ))
        .into());
    }
    if !ended.status.success() {
        anyhow::bail!(
            "the training failed ({}); run the same command again to resume from the newest \
             checkpoint in {}",
            ended.status,
            checkpoints.display()
        );
    }
    if args.samples > 0 {
        samples(&checkpoints, args.samples, &events, &mut signals)?;
    }
    Ok(())
}

/// The depth checks run with when `--depth` is unset: any the planner may pick will do, since
/// none of the checks depends on it but the memory one, which runs again once it is known.
fn planner_smallest() -> i64 {
    charlm_budget::DEPTHS[0]
}

/// `charlm-trainer train …` as run starts it: its own settings, then the user's after `--`.
/// A flag run sets itself is refused when the user repeats it after `--`.
fn train_argv(args: &Args, data: &Path, depth: i64, checkpoints: &Path) -> Result<Vec<OsString>> {
    for given in &args.train_args {
        let name = given.trim_start_matches('-');
        let name = name.split('=').next().unwrap_or(name);
        if given.starts_with("--") && OWN_TRAIN_FLAGS.contains(&name) {
            user_bail!(
                "--{name} after `--` is a flag run sets itself: give it to run, before `--` \
                 (`charlm-trainer run --{name} …`){}",
                if name == "checkpoint-dir" || name == "data" {
                    "; run keeps checkpoints in <base-dir>/checkpoints/<--model-tag, default \
                     d<depth>> and reads the texts from --data"
                } else {
                    ""
                }
            );
        }
    }
    let mut argv: Vec<OsString> = ["charlm-trainer", "train", "--data"]
        .iter()
        .map(OsString::from)
        .collect();
    argv.push(data.into());
    for (flag, value) in [
        ("--depth", depth.to_string()),
        ("--hours", args.hours.to_string()),
        ("--device-batch-size", args.device_batch_size.to_string()),
        ("--price-per-gpu-hour", args.price_per_gpu_hour.to_string()),
    ] {
        argv.push(flag.into());
        argv.push(value.into());
    }
    argv.push("--checkpoint-dir".into());
    argv.push(checkpoints.into());
    argv.extend(args.train_args.iter().map(OsString::from));
    Ok(argv)
}

/// The checks `train`'s rank 0 makes of its checkpoint folder at start (the dataset, the model,
/// `--init-from` outside it), made before the training starts so that a refusal names run's
/// flags: other texts at the same depth would otherwise resume the first texts' training, and
/// `best/` compare val bpc of two validation splits (issue 29, item 6).
fn check_folder(
    argv: &[OsString],
    nproc: u32,
    data: &Path,
    depth: i64,
    checkpoints: &Path,
    texts: &Path,
    args: &Args,
) -> Result<()> {
    let train_args = check_train_flags(argv, nproc)?;
    let schedule = train::Plan::new(&train_args, nproc as usize, 1)?.schedule;
    let model = GptConfig::new(depth, train_args.seq_len)
        .with_rope_base(schedule.rope_base)
        .with_scalars(schedule.scalars);
    let dataset = resume::dataset_id(data, &read_manifest(data)?);
    resume::check_folder(
        checkpoints,
        train_args.init_from.as_deref(),
        &model,
        train_args.recipe,
        &dataset,
        RUN_REMEDY,
    )
    .map_err(|e| {
        let Some(UserError(message)) = e.downcast_ref::<UserError>() else {
            return e;
        };
        let name = texts
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let example = match (&args.model_tag, name.is_empty()) {
            (None, false) => format!(", e.g. --model-tag d{depth}-{name}"),
            _ => String::new(),
        };
        UserError(format!(
            "{message}. (run prepared the texts in {} into {}, and keeps a training in \
             {}/<tag>: --model-tag TAG or CHARLM_MODEL_TAG, d<depth> when unset{example})",
            texts.display(),
            data.display(),
            args.base_dir.join("checkpoints").display()
        ))
        .into()
    })
}

/// Parses `argv` as `train` would, with the environment, and runs the checks `train` runs before
/// its first slow step; a refusal names the flag after `--` or the variable the user set.
fn check_train_flags(argv: &[OsString], nproc: u32) -> Result<train::Args> {
    let args = match super::parse(argv) {
        Ok(super::Cli {
            command: super::Command::Train(args),
        }) => *args,
        Ok(_) => unreachable!("the command line names train"),
        Err(refusal) => {
            let message = refusal.message();
            let origin = if message.starts_with("--") || message.contains("'--") {
                "after `--`, "
            } else {
                ""
            };
            return Err(UserError(format!("{origin}{message}")).into());
        }
    };
    let early_micro = match args.device_batch_size {
        MicroBatch::Fixed(n) => n,
        MicroBatch::Auto => 1,
    };
    train::Plan::new(&args, nproc as usize, early_micro)?;
    if args.device != DeviceChoice::Auto {
        args.device.resolve(0)?;
    }
    Ok(args)
}

/// WANDB_RUN is how the seed's users ask for a dashboard: say once that W&B is not built in, and
/// turn on what is: TensorBoard files (under the base folder, unless `--tensorboard-dir` was
/// given) beside the `/metrics` endpoint. Returns the TensorBoard folder run adds.
fn wandb(args: &Args, train_args: &train::Args) -> Option<PathBuf> {
    let name = std::env::var("WANDB_RUN").ok()?;
    if name.is_empty() || name == WANDB_OFF {
        return None;
    }
    let safe: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    let (dir, added) = match &train_args.tensorboard_dir {
        Some(dir) => (dir.clone(), None),
        None => {
            let dir = args.base_dir.join("tensorboard").join(safe);
            (dir.clone(), Some(dir))
        }
    };
    let metrics = match train_args.metrics_port {
        0 => "its /metrics endpoint is off (--metrics-port 0)".to_string(),
        port => format!(
            "rank 0 serves Prometheus metrics at http://localhost:{port}/metrics (and JSON at \
             /progress)"
        ),
    };
    eprintln!(
        "run: WANDB_RUN={name} is set, but Weights & Biases is not built into charlm: this run \
         writes TensorBoard event files to {} (`tensorboard --logdir {}`) and {metrics}",
        dir.display(),
        dir.display()
    );
    added
}

/// The prepared copy of the `.txt` files in `texts`: `<base>/prepared/<digest>`, reused when it
/// holds exactly these files, else prepared now.
fn prepared(texts: &Path, base: &Path) -> Result<PathBuf> {
    let found = match sources(texts) {
        Ok(found) => found,
        Err(e) if texts.join(MANIFEST_FILE).is_file() => user_bail!(
            "{} holds a dataset `prepare` wrote, not .txt files: run reads the texts themselves \
             (and keeps its own prepared copy under {}); give --data the folder of .txt files \
             ({e:#})",
            texts.display(),
            base.join("prepared").display()
        ),
        Err(e) => return Err(e),
    };
    #[derive(Serialize)]
    struct Identity<'a> {
        sources: &'a [SourceFile],
        val_fraction: f64,
        seed: u64,
    }
    let identity = serde_json::to_vec(&Identity {
        sources: &found,
        val_fraction: VAL_FRACTION,
        seed: SPLIT_SEED,
    })?;
    let digest = format!("{:x}", Sha256::digest(&identity));
    let dir = base.join("prepared").join(&digest[..16]);
    if read_manifest(&dir).is_ok_and(|m| m.sources == found) {
        eprintln!(
            "run: reusing {} (the texts in {} are unchanged)",
            dir.display(),
            texts.display()
        );
        return Ok(dir);
    }
    let m = prepare(texts, &dir, VAL_FRACTION, SPLIT_SEED)?;
    eprintln!(
        "run: prepared {} → {} ({} training tokens)",
        texts.display(),
        dir.display(),
        m.train.tokens
    );
    Ok(dir)
}

/// Starts `launch -- train …` and waits for it, passing SIGTERM/SIGINT on.
fn train(
    args: &Args,
    nproc: u32,
    events: &Events,
    train_argv: &[OsString],
    signals: &mut Signals,
) -> Result<children::Ended> {
    let exe = std::env::current_exe().context("cannot find this executable")?;
    let mut cmd = Command::new(exe);
    cmd.arg("launch")
        .arg("--nproc-per-node")
        .arg(nproc.to_string())
        .arg("--grace-period-s")
        .arg(args.grace_period_s.to_string())
        .arg("--log-format")
        .arg(if events.is_on() { "json" } else { "human" })
        .arg("--")
        .args(&train_argv[1..])
        .stdin(Stdio::null());
    // launch stops its workers gently when run dies, even by SIGKILL: they save a checkpoint.
    children::tie_to_parent(&mut cmd, SIGTERM);
    let mut child = cmd.spawn().context("start the training (launch)")?;
    // launch kills what is left after its own grace period; this is for a launch that hangs.
    let grace = Duration::from_secs(args.grace_period_s + 15);
    children::wait_forwarding(&mut child, signals, grace, |m| eprintln!("run: {m}"))
}

/// Samples from `best/` (the delivered model): `sample` events on a JSON stdout (and the text on
/// stderr), else the text on stdout. A stop signal ends it between samples.
fn samples(checkpoints: &Path, n: usize, events: &Events, signals: &mut Signals) -> Result<()> {
    let args = sample::Args {
        checkpoint: checkpoints.to_path_buf(),
        prompt: String::new(),
        max_tokens: 200,
        temperature: 0.8,
        top_k: None,
        seed: 0,
        num_samples: n,
        device: DeviceChoice::Auto,
    };
    #[derive(Serialize)]
    struct SampleEvent<'a> {
        checkpoint: String,
        step: i64,
        index: usize,
        text: &'a str,
    }
    let stop = std::cell::Cell::new(false);
    let result = sample::each_sample(&args, |source, index, text| {
        if stop.get() || signals.pending().next().is_some() {
            stop.set(true);
            return Ok(());
        }
        if events.is_on() {
            eprintln!("run: sample {}:\n{text}", index + 1);
            events.emit_other(
                "sample",
                &SampleEvent {
                    checkpoint: source.dir.display().to_string(),
                    step: source.step,
                    index,
                    text,
                },
            );
        } else {
            println!("{text}\n");
        }
        Ok(())
    });
    result.map(|_| ())
}
