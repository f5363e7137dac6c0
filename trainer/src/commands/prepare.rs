//! `charlm-trainer prepare`: a directory of `*.txt` files into the format `train` reads.

use std::path::PathBuf;

use anyhow::Result;

use crate::data::prepare::prepare;
use crate::sys::flags;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// A directory searched recursively for `*.txt` files (names starting with `.` are skipped).
    #[arg(long)]
    pub input: PathBuf,
    /// The prepared dataset's directory: new, empty, or one that prepare wrote before (then it is
    /// replaced, only once the new one is complete). Not inside --input.
    #[arg(long)]
    pub output: PathBuf,
    /// Share of documents held out for validation, above 0 and below 1 (each document decided by
    /// a hash of --seed).
    #[arg(long, default_value_t = 0.01,
          value_parser = flags::open_fraction)]
    pub val_fraction: f64,
    /// Chooses which documents are held out, 0 or more.
    #[arg(long, default_value_t = 0, value_parser = flags::at_least(0u64))]
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
