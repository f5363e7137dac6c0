use clap::{Parser, Subcommand};

use charlm_trainer::commands::{bench, generate_dataset, launch, prepare, sample};
use charlm_trainer::{sys::error, train};

/// Character-level GPT training on libtorch: prepare data, train, sample, benchmark.
#[derive(Parser)]
#[command(name = "charlm-trainer", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Turn a directory of .txt files into train.bin, val.bin and manifest.json.
    Prepare(prepare::Args),
    /// Write a synthetic dataset of .txt files (for demos and tests).
    Generate(generate_dataset::Args),
    /// Train (or resume) a model on a prepared dataset.
    Train(train::Args),
    /// Start one worker process per GPU with torchrun's environment, and supervise them.
    Launch(launch::Args),
    /// Generate text from a checkpoint.
    Sample(sample::Args),
    /// Measure training speed on synthetic tokens and print one JSON line.
    Bench(bench::Args),
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Prepare(args) => prepare::run(args),
        Command::Generate(args) => generate_dataset::run(args),
        Command::Train(args) => train::run(args),
        Command::Launch(args) => launch::run(args),
        Command::Sample(args) => sample::run(args),
        Command::Bench(args) => bench::run(args),
    };
    if let Err(err) = result {
        eprintln!("error: {err:#}");
        std::process::exit(error::exit_code(&err));
    }
}
