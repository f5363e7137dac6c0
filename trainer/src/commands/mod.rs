//! One module per subcommand of `charlm-trainer` (`train` is the `train` folder itself): each holds
//! the command's flags and its `run`, and leaves the work to the folders below. This file holds
//! the command line they make together, which `main` and `run` (for the `train` flags it passes
//! on) parse alike.

pub mod bench;
pub mod generate_dataset;
pub mod launch;
pub mod plan;
pub mod prepare;
pub mod run;
pub mod sample;

use std::ffi::OsString;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

use crate::sys::flags;
use crate::train;

/// Character-level GPT training on libtorch: prepare data, train, sample, benchmark.
///
/// Every flag can also be set by an environment variable of its name (`--depth` ↔
/// `CHARLM_DEPTH`; `run` also reads the seed's `DEPTH`, `TRAINING_HOURS`, `NPROC_PER_NODE` and
/// `DEVICE_BATCH_SIZE`, `launch` torchrun's rendezvous names); a flag on the command line wins.
/// Bad input exits 2 with a message that names the flag or variable and the fix.
#[derive(Parser)]
#[command(name = "charlm-trainer", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Turn a directory of .txt files into train.bin, val.bin and manifest.json.
    Prepare(prepare::Args),
    /// Write a synthetic dataset of .txt files (for demos and tests).
    Generate(generate_dataset::Args),
    /// Train (or resume) a model on a prepared dataset.
    // Boxed: it would make the enum as large as its one large variant.
    Train(Box<train::Args>),
    /// Start one worker process per GPU with torchrun's environment, and supervise them.
    Launch(launch::Args),
    /// Generate text from a checkpoint.
    Sample(sample::Args),
    /// What a budget of GPUs × hours buys on a prepared dataset: epochs per depth, the
    /// recommended depth and hours, the cost, and the memory each depth needs.
    Plan(plan::Args),
    /// The seed's run.sh: prepare, plan, train on every visible GPU with early stop, and sample
    /// from best/.
    Run(Box<run::Args>),
    /// Measure training speed on synthetic tokens (one `bench` event).
    Bench(bench::Args),
}

/// The whole command line: every flag with its `CHARLM_<FLAG>` variable
/// ([`flags::name_variables`]), negative numbers taken as values to check (`--temperature -1`),
/// not as unknown flags.
pub fn cli() -> clap::Command {
    flags::name_variables(Cli::command().mut_subcommands(|s| s.allow_negative_numbers(true)))
}

/// Why a command line was refused.
pub enum Refusal {
    /// A message that names what the user typed or set, for exit 2.
    Explained(String),
    /// clap's own (help, version, and errors its message says well).
    Clap(clap::Error),
}

impl Refusal {
    /// The message's first line, without clap's `error: ` and usage.
    pub fn message(&self) -> String {
        match self {
            Self::Explained(m) => m.clone(),
            Self::Clap(e) => {
                let text = e.render().to_string();
                let first = text.lines().next().unwrap_or_default();
                first.trim_start_matches("error: ").to_string()
            }
        }
    }
}

/// Parses `argv` (the program's name first) with the variables of [`cli`] and their aliases.
pub fn parse(argv: &[OsString]) -> Result<Cli, Refusal> {
    let cmd = flags::resolve_aliases(cli(), argv).map_err(Refusal::Explained)?;
    cmd.clone()
        .try_get_matches_from(argv)
        .and_then(|m| Cli::from_arg_matches(&m))
        .map_err(|err| match flags::explain(&cmd, argv, &err) {
            Some(message) => Refusal::Explained(message),
            None => Refusal::Clap(err),
        })
}
