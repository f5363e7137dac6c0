use std::ffi::OsString;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

use charlm_contract::events::{ErrorEvent, Event};
use charlm_trainer::commands::{bench, generate_dataset, launch, plan, prepare, run, sample};
use charlm_trainer::sys::events::Events;
use charlm_trainer::sys::{error, flags};
use charlm_trainer::train;

/// Character-level GPT training on libtorch: prepare data, train, sample, benchmark.
///
/// Every flag can also be set by an environment variable of its name (`--depth` ↔
/// `CHARLM_DEPTH`; `launch`'s rendezvous flags read torchrun's names); a flag on the command line
/// wins. Bad input exits 2 with a message that names the flag or variable and the fix.
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
    // Boxed: it would make the enum as large as its one large variant.
    Train(Box<train::Args>),
    /// Start one worker process per GPU with torchrun's environment, and supervise them.
    Launch(launch::Args),
    /// Generate text from a checkpoint.
    Sample(sample::Args),
    /// What a budget of GPUs × hours buys on a prepared dataset: epochs per depth, the
    /// recommended depth and hours, the cost.
    Plan(plan::Args),
    /// Prepare, plan, train on every visible GPU with early stop, and sample from best/.
    Run(run::Args),
    /// Measure training speed on synthetic tokens (one `bench` event).
    Bench(bench::Args),
}

fn main() {
    let argv: Vec<OsString> = std::env::args_os().collect();
    // `--temperature -1` is a value to check, not an unknown flag.
    let cmd = Cli::command().mut_subcommands(|s| s.allow_negative_numbers(true));
    let cli = match cmd
        .clone()
        .try_get_matches_from(&argv)
        .and_then(|m| Cli::from_arg_matches(&m))
    {
        Ok(cli) => cli,
        Err(err) => match flags::explain(&cmd, &argv, &err) {
            Some(message) => {
                eprintln!("error: {message}");
                std::process::exit(charlm_contract::exit::BAD_INPUT);
            }
            None => err.exit(),
        },
    };
    let rank = std::env::var("RANK")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(0);
    let events = match &cli.command {
        Command::Train(a) => Events::new(a.log_format, Some(rank)),
        Command::Bench(a) => Events::new(a.log_format, Some(rank)),
        Command::Launch(a) => Events::new(a.log_format, None),
        _ => Events::off(),
    };
    let result = match cli.command {
        Command::Prepare(args) => prepare::run(args),
        Command::Generate(args) => generate_dataset::run(args),
        Command::Train(args) => train::run(*args),
        Command::Launch(args) => launch::run(args),
        Command::Sample(args) => sample::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Plan(args) => plan::run(args),
        Command::Run(args) => run::run(args),
    };
    if let Err(err) = result {
        // A reader that stopped reading (`sample ... | head -1`) is not a failure.
        if error::is_broken_pipe(&err) {
            std::process::exit(0);
        }
        let code = error::exit_code(&err);
        eprintln!("error: {err:#}");
        events.emit(Event::Error(ErrorEvent {
            message: format!("{err:#}"),
            exit_code: code,
        }));
        std::process::exit(code);
    }
}
