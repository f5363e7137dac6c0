//! `charlm-trainer generate`: writes the synthetic dataset of [`crate::data::synthetic`].

use std::path::PathBuf;

use anyhow::Result;

use crate::data::synthetic::generate;
use crate::sys::flags;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Directory to write `part-NNNN.txt` files into (replaced only once complete).
    #[arg(long)]
    pub output: PathBuf,
    /// Approximate total characters, 1 or more.
    #[arg(long, default_value_t = 10_000_000,
          value_parser = flags::at_least(1u64))]
    pub chars: u64,
    /// Seed of the worksheets, 0 or more.
    #[arg(long, default_value_t = 0, value_parser = flags::at_least(0u64))]
    pub seed: u64,
}

pub fn run(args: Args) -> Result<()> {
    let written = generate(&args.output, args.chars, args.seed)?;
    eprintln!(
        "wrote {written} characters of synthetic data to {}",
        args.output.display()
    );
    Ok(())
}
