//! `charlm-trainer run --data DIR`: the whole workflow on one GPU box without Kubernetes, as the
//! seed's run.sh gave its users. It prepares the text folder into the cache folder (reusing the
//! prepared copy when its sources are unchanged), prints the plan for the budget, trains on every
//! visible GPU through `launch` with early stop, and ends with samples from `best/`. Run again,
//! it resumes from the newest checkpoint (or, when the training is over, only samples).
//!
//! Layout of the cache folder: `data/` (the prepared dataset), `checkpoints/d{depth}/`.
//! The seed's knobs are honoured as environment variables: NPROC_PER_NODE (read by `launch`),
//! DEPTH, DEVICE_BATCH_SIZE and TRAINING_HOURS.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result};
use charlm_contract::planner;

use crate::data::prepare::{is_up_to_date, prepare, read_manifest};
use crate::sys::error::UserError;
use crate::user_bail;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// A folder of `.txt` files (documents separated by a blank line).
    #[arg(long)]
    pub data: PathBuf,
    /// Where the prepared data and the checkpoints live.
    #[arg(long, env = "CHARLM_BASE_DIR", default_value_os_t = default_base())]
    pub base_dir: PathBuf,
    /// Transformer layers. Default: the planner's recommendation.
    #[arg(long, env = "DEPTH")]
    pub depth: Option<i64>,
    /// Hours of training (early stop may end it sooner).
    #[arg(long, env = "TRAINING_HOURS", default_value_t = 1.0)]
    pub hours: f64,
    /// Sequences per GPU per micro-step, or `auto`.
    #[arg(long, env = "DEVICE_BATCH_SIZE", default_value = "auto")]
    pub device_batch_size: String,
    /// Dollars per GPU-hour, for the plan's cost.
    #[arg(long, env = "CHARLM_PRICE_PER_GPU_HOUR", default_value_t = 3.0)]
    pub price: f64,
    /// Samples printed from `best/` at the end (0: none).
    #[arg(long, default_value_t = 3)]
    pub samples: usize,
    /// More `train` flags, after `--` (e.g. `-- --eval-every 100 --recipe nanochat-2025`).
    #[arg(last = true)]
    pub train_args: Vec<String>,
}

fn default_base() -> PathBuf {
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."))
        .join(".cache/charlm-run")
}

/// Worker processes: NPROC_PER_NODE when set, else one per visible GPU (at least one).
fn processes() -> Result<(usize, bool)> {
    let gpus = if tch::Cuda::is_available() {
        tch::Cuda::device_count() as usize
    } else {
        0
    };
    match std::env::var(charlm_contract::env::NPROC_PER_NODE) {
        Ok(v) if v != "auto" => match v.parse::<usize>() {
            Ok(n) if n >= 1 => Ok((n, gpus > 0)),
            _ => user_bail!("NPROC_PER_NODE={v:?} is not a number of processes (1 or more)"),
        },
        _ => Ok((gpus.max(1), gpus > 0)),
    }
}

pub fn run(args: Args) -> Result<()> {
    if args.hours.is_nan() || args.hours <= 0.0 {
        user_bail!("--hours (TRAINING_HOURS) must be above 0");
    }
    let data = args.base_dir.join("data");
    std::fs::create_dir_all(&args.base_dir)
        .with_context(|| format!("create the cache folder {}", args.base_dir.display()))?;
    if is_up_to_date(&args.data, &data)? {
        eprintln!(
            "run: reusing {} (its sources in {} are unchanged)",
            data.display(),
            args.data.display()
        );
    } else {
        let m = prepare(&args.data, &data, 0.01, 0)?;
        eprintln!(
            "run: prepared {} → {} ({} training tokens)",
            args.data.display(),
            data.display(),
            m.train.tokens
        );
    }
    let (nproc, on_gpus) = processes()?;
    let budget = planner::Budget {
        gpus: nproc as u32,
        hours: args.hours,
        price_per_gpu_hour: args.price,
        unique_tokens: read_manifest(&data)?.train.tokens,
        seq_len: 2048,
    };
    let plan = planner::plan(&budget);
    super::plan::print(&plan, args.depth);
    if !on_gpus {
        eprintln!("run: no GPU visible: the plan's figures are for GPUs; training on the CPU");
    }
    let depth = args.depth.unwrap_or(plan.recommended_depth);
    let checkpoints = args.base_dir.join("checkpoints").join(format!("d{depth}"));
    let exe = std::env::current_exe().context("cannot find this executable")?;
    let mut train = Command::new(&exe);
    train
        .arg("launch")
        .arg("--nproc-per-node")
        .arg(nproc.to_string())
        .arg("--")
        .arg("train")
        .arg("--data")
        .arg(&data)
        .arg("--depth")
        .arg(depth.to_string())
        .arg("--hours")
        .arg(args.hours.to_string())
        .arg("--device-batch-size")
        .arg(&args.device_batch_size)
        .arg("--checkpoint-dir")
        .arg(&checkpoints)
        .args(&args.train_args);
    eprintln!(
        "run: training depth {depth} on {nproc} {} for up to {} h into {}",
        if on_gpus { "GPUs" } else { "CPU process(es)" },
        args.hours,
        checkpoints.display()
    );
    let status = train.status().context("start the training")?;
    if !status.success() {
        // Exit 2 from launch means bad input: say so with the same code; else run again resumes.
        let msg =
            format!("the training failed ({status}); run again to resume from its checkpoint");
        if status.code() == Some(charlm_contract::exit::BAD_INPUT) {
            return Err(anyhow::Error::new(UserError(msg)));
        }
        anyhow::bail!(msg);
    }
    if args.samples > 0 {
        sample(&exe, &checkpoints, args.samples)?;
    }
    Ok(())
}

/// Samples from `best/` (the delivered model) with `sample`.
fn sample(exe: &Path, checkpoints: &Path, n: usize) -> Result<()> {
    let best = checkpoints.join(crate::train::checkpoint::BEST_DIR);
    let dir = if best.is_dir() {
        best
    } else {
        checkpoints.to_path_buf()
    };
    eprintln!("run: {n} samples from {}", dir.display());
    let status = Command::new(exe)
        .args(["sample", "--max-tokens", "200", "--temperature", "0.8"])
        .arg("--num-samples")
        .arg(n.to_string())
        .arg("--checkpoint")
        .arg(&dir)
        .status()
        .context("start sample")?;
    if !status.success() {
        anyhow::bail!("sample failed ({status})");
    }
    Ok(())
}
