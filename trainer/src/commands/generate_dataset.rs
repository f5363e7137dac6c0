//! `charlm-trainer generate`: writes the synthetic dataset of [`crate::data::synthetic`].

use std::path::PathBuf;

use anyhow::Result;

use crate::data::synthetic::generate;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Directory to write `part-NNNN.txt` files into (replaced only once complete).
    #[arg(long)]
    pub output: PathBuf,
    /// Approximate total characters.
    #[arg(long, default_value_t = 10_000_000)]
    pub chars: u64,
    #[arg(long, default_value_t = 0)]
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
