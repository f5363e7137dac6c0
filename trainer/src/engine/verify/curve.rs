//! Loss curves of a fixed-seed training run on the synthetic worksheets, and how two differ.

use anyhow::Result;
use serde::Serialize;
use tch::{Device, Kind, Tensor};

use crate::dist::{DistEnv, ProcessGroup};
use crate::engine::{Engine, EngineOptions, LearningRates};
use crate::model::GptConfig;

/// Per-step training losses of a fixed-seed run: `steps` optimizer steps of `accum` micro-batches
/// of `batch` windows drawn (by a fixed seed) from `tokens`, constant learning rate. With
/// `perturb` > 0 every initial weight is scaled by (1 + perturb·N(0, 1)): a run that differs from
/// the unperturbed one only by rounding-sized noise, to measure how far such noise alone carries
/// a curve.
#[allow(clippy::too_many_arguments)]
pub fn loss_curve(
    config: GptConfig,
    tokens: &Tensor,
    batch: i64,
    accum: i64,
    steps: i64,
    device: Device,
    options: EngineOptions,
    perturb: f64,
) -> Result<Vec<f64>> {
    let pg = ProcessGroup::init(
        &DistEnv::single(),
        device,
        std::time::Duration::from_secs(60),
    )?;
    let mut engine = Engine::with_options(config, device, 42, LearningRates::default(), options);
    if perturb > 0.0 {
        tch::manual_seed(99);
        tch::no_grad(|| {
            for (_, p) in engine.model.named_parameters() {
                let noise = Tensor::randn(p.size(), (Kind::Float, Device::Cpu)).to_device(device);
                let _ = p.shallow_clone().g_mul_(&(noise * perturb + 1.0));
            }
        });
    }
    let t = config.seq_len;
    let windows = tokens.size()[0] - t - 1;
    let offsets = Tensor::arange(t + 1, (Kind::Int64, Device::Cpu));
    let mut rng = crate::sys::rng::Rng::new(1234);
    let mut losses = Vec::with_capacity(steps as usize);
    for step in 0..steps {
        let mut sum = Tensor::zeros([], (Kind::Float, device));
        for _ in 0..accum {
            let starts: Vec<i64> = (0..batch)
                .map(|_| rng.below(windows as u64) as i64)
                .collect();
            let idx = Tensor::from_slice(&starts).view([batch, 1]) + offsets.view([1, t + 1]);
            let all = tokens.index_select(0, &idx.view([-1])).view([batch, t + 1]);
            let all = all.to_device(device);
            sum += engine.micro_step(
                &all.narrow(1, 0, t),
                &all.narrow(1, 1, t),
                1.0 / accum as f64,
            );
        }
        engine.optimizer_step(&pg, 1.0, crate::engine::optim::muon_momentum(step), 1.0)?;
        losses.push(sum.double_value(&[]) / accum as f64);
    }
    Ok(losses)
}

/// `chars` characters of the synthetic worksheets of `generate`, as token ids (int64, CPU).
pub fn synthetic_tokens(chars: u64, seed: u64) -> Result<Tensor> {
    let dir = std::env::temp_dir().join(format!("charlm-verify-{}-{seed}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    crate::data::synthetic::generate(&dir, chars, seed)?;
    let mut files: Vec<_> = std::fs::read_dir(&dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "txt"))
        .collect();
    files.sort();
    let mut text = Vec::new();
    for f in files {
        text.extend(std::fs::read(&f)?);
    }
    let _ = std::fs::remove_dir_all(&dir);
    let ids = crate::data::vocab::encode(&text)
        .map_err(|at| anyhow::anyhow!("generated text has an invalid byte at {at}"))?;
    let ids: Vec<i64> = ids.into_iter().map(i64::from).collect();
    Ok(Tensor::from_slice(&ids))
}

/// How two loss curves differ: the largest and mean absolute per-step difference, and the same
/// over 10-step means (which average out step-to-step noise).
#[derive(Debug, Clone, Serialize)]
pub struct CurveDiff {
    pub max_abs: f64,
    pub mean_abs: f64,
    pub max_abs_10: f64,
    pub final_ref: f64,
    pub final_got: f64,
}

pub fn curve_diff(got: &[f64], reference: &[f64]) -> CurveDiff {
    let d: Vec<f64> = got
        .iter()
        .zip(reference)
        .map(|(a, b)| (a - b).abs())
        .collect();
    let means = |v: &[f64]| -> Vec<f64> {
        v.chunks(10)
            .map(|c| c.iter().sum::<f64>() / c.len() as f64)
            .collect()
    };
    let (mg, mr) = (means(got), means(reference));
    let tail = |v: &[f64]| {
        let k = v.len().min(10);
        v[v.len() - k..].iter().sum::<f64>() / k.max(1) as f64
    };
    CurveDiff {
        max_abs: d.iter().cloned().fold(0.0, f64::max),
        mean_abs: d.iter().sum::<f64>() / d.len().max(1) as f64,
        max_abs_10: mg
            .iter()
            .zip(&mr)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max),
        final_ref: tail(reference),
        final_got: tail(got),
    }
}

#[cfg(test)]
mod tests {
    use super::super::{fast, lock};
    use super::*;
    use crate::engine::{Kernels, Recompute};

    #[test]
    fn optimized_loss_curve_matches_the_reference_on_the_cpu() {
        let _seed = lock();
        let config = GptConfig::new(1, 32);
        let tokens = synthetic_tokens(200_000, 1).unwrap();
        let run = |options, perturb| {
            loss_curve(config, &tokens, 4, 1, 200, Device::Cpu, options, perturb).unwrap()
        };
        let reference = EngineOptions {
            kernels: Kernels::Reference,
            ..EngineOptions::default()
        };
        let want = run(reference, 0.0);
        let noise = curve_diff(&run(reference, 1e-6), &want);
        let got = curve_diff(&run(fast(Kernels::Eager, Recompute::Blocks(1)), 0.0), &want);
        eprintln!("noise {noise:?}\noptimized {got:?}");
        // The model learns (the curve is not flat), and the optimized run stays within
        // rounding-noise distance of the reference.
        assert!(got.final_ref < want[0] - 0.5, "{want:?}");
        assert!(got.max_abs_10 < 0.02, "{got:?} (noise alone: {noise:?})");
    }
}
