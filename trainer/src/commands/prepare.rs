//! `charlm-trainer prepare`: a directory of `*.txt` files into the format `train` reads.

use std::path::PathBuf;

use anyhow::Result;

use crate::data::prepare::prepare;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// A directory searched recursively for `*.txt` files.
    #[arg(long)]
    pub input: PathBuf,
    /// The prepared dataset's directory (replaced only when the new one is complete).
    #[arg(long)]
    pub output: PathBuf,
    /// Share of documents held out for validation (each document decided by a hash of --seed).
    #[arg(long, default_value_t = 0.01)]
    pub val_fraction: f64,
    /// Chooses which documents are held out.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

pub fn run(args: Args) -> Result<()> {
    let start = std::time::Instant::now();
    let manifest = prepare(&args.input, &args.output, args.val_fraction, args.seed)?;
    let bytes: u64 = manifest.sources.iter().map(|s| s.bytes).sum();
    let secs = start.elapsed().as_secs_f64();
    eprintln!(
        "prepared {} files ({:.1} MB) in {secs:.2} s ({:.0} MB/s): train {} documents / {} tokens, \
         val {} documents / {} tokens → {}",
        manifest.sources.len(),
        bytes as f64 / 1e6,
        bytes as f64 / 1e6 / secs.max(1e-9),
        manifest.train.documents,
        manifest.train.tokens,
        manifest.val.documents,
        manifest.val.tokens,
        args.output.display()
    );
    Ok(())
}
