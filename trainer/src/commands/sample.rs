//! `charlm-trainer sample`: generate text from a checkpoint with a KV cache. Output holds only
//! vocabulary characters; a document ends when the model predicts the next BOS.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Result;
use tch::{Kind, Tensor};

use crate::data::vocab;
use crate::model::{Gpt, KvCache};
use crate::sys::flags::{self, DeviceChoice};
use crate::train::checkpoint;
use crate::user_bail;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// A checkpoint directory (`step-…` or `best`), or a checkpoint root: then its `best/` if
    /// present, else its newest good checkpoint.
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// Text to continue; only vocabulary characters (`0-9 + - H B L .` and newline). Empty: start
    /// a new document.
    #[arg(long, default_value = "")]
    pub prompt: String,
    /// Most characters to generate per sample, 1 or more (a sample also ends where the model
    /// ends its document).
    #[arg(long, default_value_t = 256,
          value_parser = flags::at_least(1i64))]
    pub max_tokens: i64,
    /// Softmax temperature, 0 or more; 0 picks the most likely character every time.
    #[arg(long, default_value_t = 1.0,
          value_parser = flags::non_negative)]
    pub temperature: f64,
    /// Sample only from the K most likely characters, 1 to 18 (18, the vocabulary and BOS,
    /// keeps all). Unset: all.
    #[arg(long, value_parser = flags::int(1i64, TOKENS))]
    pub top_k: Option<i64>,
    /// Seed of the first sample (sample i uses seed + i), 0 or more.
    #[arg(long, default_value_t = 0, value_parser = flags::at_least(0u64))]
    pub seed: u64,
    /// Samples to generate, 1 or more (separated by a blank line).
    #[arg(long, default_value_t = 1,
          value_parser = flags::at_least(1usize))]
    pub num_samples: usize,
    /// Where to compute: auto (CUDA when present, else CPU), cpu or cuda.
    #[arg(long, value_enum, default_value = "auto")]
    pub device: DeviceChoice,
}

/// Tokens a sample can produce: the vocabulary's characters and BOS.
const TOKENS: i64 = vocab::BOS as i64 + 1;

pub fn run(args: Args) -> Result<()> {
    let mut out = std::io::stdout().lock();
    each_sample(&args, |_, _, text| {
        writeln!(out, "{text}")?;
        if args.num_samples > 1 {
            writeln!(out)?;
        }
        Ok(())
    })?;
    Ok(())
}

/// The checkpoint samples come from.
#[derive(Clone, Debug)]
pub struct Source {
    pub dir: PathBuf,
    pub step: i64,
}

/// Generates `args.num_samples` samples and hands each to `each` as it comes: the checkpoint,
/// the sample's index, and its text (the prompt and what the model wrote after it).
pub fn each_sample(
    args: &Args,
    mut each: impl FnMut(&Source, usize, &str) -> Result<()>,
) -> Result<Source> {
    if args.temperature < 0.0 || args.temperature.is_nan() {
        user_bail!("--temperature must be 0 or more");
    }
    let prompt = vocab::encode_prompt(&args.prompt)?;
    let device = args.device.resolve(0)?;
    let dir = checkpoint::resolve_for_reading(&args.checkpoint)?;
    let loaded = checkpoint::load_model(&dir)?;
    let mut model = Gpt::new(loaded.manifest.model, device, 0);
    model.load_weights(&loaded.model)?;
    let source = Source {
        dir,
        step: loaded.manifest.step,
    };
    eprintln!(
        "sampling from {} (step {})",
        source.dir.display(),
        source.step
    );
    for i in 0..args.num_samples {
        let text = generate(&model, &prompt, args, args.seed + i as u64);
        each(&source, i, &format!("{}{}", args.prompt, text))?;
    }
    Ok(source)
}

/// Continues `prompt` (token ids, without BOS) and returns the new characters.
pub fn generate(model: &Gpt, prompt: &[i64], args: &Args, seed: u64) -> String {
    tch::manual_seed(seed as i64);
    let device = model.device();
    let mut ids = vec![vocab::BOS as i64];
    ids.extend_from_slice(prompt);
    let mut cache = KvCache::new(model.config.depth);
    let mut input = Tensor::from_slice(&ids).view([1, -1]).to_device(device);
    let mut new_ids = Vec::new();
    // Padding ids are never targets; masking them keeps every output a vocabulary character.
    let mut mask = vec![0f32; model.config.vocab_size as usize];
    for m in mask.iter_mut().skip(vocab::BOS as usize + 1) {
        *m = f32::NEG_INFINITY;
    }
    let mask = Tensor::from_slice(&mask).to_device(device);
    tch::no_grad(|| {
        for _ in 0..args.max_tokens {
            let logits = model.forward(&input, Some(&mut cache));
            let last = logits.select(1, -1).squeeze_dim(0).to_kind(Kind::Float) + &mask;
            let next = pick(&last, args.temperature, args.top_k);
            if next == vocab::BOS as i64 {
                break;
            }
            new_ids.push(next);
            input = Tensor::from_slice(&[next]).view([1, 1]).to_device(device);
        }
    });
    vocab::decode(&new_ids.iter().map(|&i| i as u8).collect::<Vec<_>>())
}

fn pick(logits: &Tensor, temperature: f64, top_k: Option<i64>) -> i64 {
    if temperature == 0.0 {
        return logits.argmax(0, false).int64_value(&[]);
    }
    let mut logits = logits / temperature;
    if let Some(k) = top_k.filter(|&k| k > 0 && k < logits.size()[0]) {
        let (top, _) = logits.topk(k, 0, true, true);
        let threshold = top.get(k - 1);
        logits = logits.masked_fill(&logits.lt_tensor(&threshold), f64::NEG_INFINITY);
    }
    logits
        .softmax(0, Kind::Float)
        .multinomial(1, false)
        .int64_value(&[0])
}
