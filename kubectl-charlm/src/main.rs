//! `kubectl charlm`: a kubectl plugin (kubectl runs `kubectl-charlm` from PATH) to see and use
//! CharLMTrainings. Modules: `cli` (flags), `connect` (kubeconfig), `view` and `curve` (the status
//! as text), `helper` (the short-lived pods of sample and export), `commands` (the API calls).

mod cli;
mod commands;
mod connect;
mod curve;
mod helper;
mod view;

use clap::Parser;

use cli::{Cli, Command};
use commands::{Ctx, SampleArgs};

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    if let Err(e) = run(cli).await {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let (client, ns) = connect::connect(&cli.connection).await?;
    let ctx = Ctx { client, ns };
    match cli.command {
        Command::Status { name } => commands::status(&ctx, &name).await,
        Command::Logs {
            name,
            follow,
            tail,
            previous,
        } => commands::logs(&ctx, &name, follow, tail, previous).await,
        Command::Sample {
            name,
            prompt,
            max_tokens,
            temperature,
            seed,
            helper,
        } => {
            let args = SampleArgs {
                prompt: &prompt,
                max_tokens,
                temperature,
                seed,
            };
            commands::sample(&ctx, &name, args, &helper).await
        }
        Command::Export { name, to, helper } => commands::export(&ctx, &name, &to, &helper).await,
    }
}
