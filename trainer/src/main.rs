use std::ffi::OsString;

use charlm_contract::events::{ErrorEvent, Event};
use charlm_trainer::commands::{
    bench, generate_dataset, launch, parse, plan, prepare, run, sample, Command, Refusal,
};
use charlm_trainer::sys::error;
use charlm_trainer::sys::events::Events;
use charlm_trainer::train;

fn main() {
    let argv: Vec<OsString> = std::env::args_os().collect();
    let cli = match parse(&argv) {
        Ok(cli) => cli,
        Err(Refusal::Explained(message)) => {
            eprintln!("error: {message}");
            std::process::exit(charlm_contract::exit::BAD_INPUT);
        }
        Err(Refusal::Clap(err)) => err.exit(),
    };
    let rank = std::env::var("RANK")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(0);
    let events = match &cli.command {
        Command::Train(a) => Events::new(a.log_format, Some(rank)),
        Command::Bench(a) => Events::new(a.log_format, Some(rank)),
        Command::Launch(a) => Events::new(a.log_format, None),
        Command::Run(a) => Events::new(a.log_format, None),
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
        Command::Run(args) => run::run(*args),
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
