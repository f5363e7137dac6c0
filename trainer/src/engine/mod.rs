//! The model with its two optimizers and the arithmetic of one optimization step: forward and
//! backward over micro-batches, gradient averaging across ranks, clipping, and the updates. Shared
//! by `train` (which adds data, schedule, evaluation and checkpoints) and `bench` (which times it).
//!
//! How the step runs is chosen by [`EngineOptions`]: the reference autograd model or the block
//! path (eager or fused kernels), a bf16 copy of the matrices refreshed once per optimizer step or
//! casts on every use, and per-block activation recomputation. `auto` picks by device and memory
//! on the first micro-batch, when the micro-batch size is known ([`resolve`]).

pub mod autobatch;
pub mod fp8;
pub mod memory;
pub mod oom;
pub mod optim;
pub mod options;
mod resolve;
pub mod verify;

use std::collections::BTreeMap;

use anyhow::{bail, Result};
use tch::{Device, Kind, Tensor};

use crate::dist::{ProcessGroup, ReduceOp};
use crate::model::{BlockRunner, Gpt, GptConfig};
use optim::{AdamW, Muon};
pub use options::{Attention, EngineOptions, Kernels, Precision, Recompute, Resolved, Toggle};

/// Ok when `device` can run FP8 products: a GPU of compute capability 8.9 or later (Ada, Hopper
/// and newer have FP8 tensor cores), or the CPU (ATen's reference FP8 product: for checks, not
/// speed; `train` and `bench` refuse it there first).
pub fn require_fp8(device: Device) -> Result<()> {
    if let Device::Cuda(_) = device {
        match crate::sys::cuda::capability(device) {
            Some(c) if c >= (8, 9) => {}
            Some((major, minor)) => crate::user_bail!(
                "--precision fp8 needs FP8 tensor cores (compute capability 8.9 or later, such as \
                 an H100); {} has {major}.{minor}: use --precision bf16",
                crate::sys::cuda::device_name(device)
            ),
            None => bail!("cannot read the compute capability of {device:?}"),
        }
    }
    Ok(())
}

/// What `train` and `bench` check before any work: FP8 products need a GPU that has them and the
/// block path. The CPU refuses them rather than emulating: ATen's FP8 product there is a
/// reference implementation, slower than the fp32 the CPU trains in, and would measure nothing.
pub fn check_precision(options: &EngineOptions, device: Device) -> Result<()> {
    if options.precision != Precision::Fp8 {
        return Ok(());
    }
    if !device.is_cuda() {
        crate::user_bail!(
            "--precision fp8 (CHARLM_PRECISION) needs a GPU with FP8 tensor cores (H100 or later); \
             on a CPU use --precision bf16 (a CPU computes in fp32 either way)"
        );
    }
    if options.kernels == Kernels::Reference {
        crate::user_bail!(
            "--precision fp8 runs on the block path, which --kernels reference does not use: use \
             --kernels auto, fused or eager"
        );
    }
    require_fp8(device)
}
/// A bf16 copy of every Muon matrix, stacked like Muon's gradients so blocks read views of it.
struct WeightCache {
    stacks: Vec<Tensor>,
    /// The fp32 weights changed since the last copy (optimizer step, load, broadcast).
    dirty: std::cell::Cell<bool>,
}

/// Learning rates at width 768; AdamW's are scaled by (width/768)^-0.5 as in nanochat.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LearningRates {
    pub matrix: f64,
    pub embedding: f64,
    pub unembedding: f64,
    /// AdamW's for the per-layer scalars (when the model has them), not width-scaled.
    #[serde(default = "default_scalar_lr")]
    pub scalar: f64,
}

fn default_scalar_lr() -> f64 {
    0.5
}

impl Default for LearningRates {
    fn default() -> Self {
        Self {
            matrix: 0.02,
            embedding: 0.2,
            unembedding: 0.004,
            scalar: default_scalar_lr(),
        }
    }
}

pub struct Engine {
    pub model: Gpt,
    pub muon: Muon,
    pub adamw: AdamW,
    pub options: EngineOptions,
    /// Set on the first micro-batch (or when its size changes).
    resolved: Option<(i64, i64, Resolved)>,
    runner: Option<BlockRunner>,
    cache: Option<WeightCache>,
    /// An optimizer step began changing weights or optimizer state and has not finished: what
    /// the engine holds is neither the step before nor the step after (a collective failed
    /// half-way), so nothing may be saved from it.
    updating: bool,
    /// The FP8 weights and scales, when the blocks' products run in FP8.
    fp8: Option<fp8::Fp8State>,
}

impl Engine {
    pub fn new(config: GptConfig, device: Device, seed: u64, lr: LearningRates) -> Self {
        Self::with_options(config, device, seed, lr, EngineOptions::default())
    }

    pub fn with_options(
        config: GptConfig,
        device: Device,
        seed: u64,
        lr: LearningRates,
        options: EngineOptions,
    ) -> Self {
        let model = Gpt::new(config, device, seed);
        let scale = (config.width() as f64 / 768.0).powf(-0.5);
        let mut adam_params = vec![
            (
                "lm_head.weight".into(),
                model.lm_head.shallow_clone(),
                lr.unembedding * scale,
            ),
            (
                "transformer.wte.weight".into(),
                model.wte.shallow_clone(),
                lr.embedding * scale,
            ),
        ];
        if let Some((resid, x0)) = &model.scalars {
            adam_params.push(("resid_lambdas".into(), resid.shallow_clone(), lr.scalar));
            adam_params.push(("x0_lambdas".into(), x0.shallow_clone(), lr.scalar));
        }
        let adamw = AdamW::new(adam_params);
        let matrices = model
            .named_parameters()
            .into_iter()
            .filter(|(name, _)| name.starts_with("transformer.h."))
            .map(|(name, p)| (name, p.shallow_clone()))
            .collect();
        let muon = Muon::new(matrices, lr.matrix);
        Self {
            model,
            muon,
            adamw,
            options,
            resolved: None,
            runner: None,
            cache: None,
            updating: false,
            fp8: None,
        }
    }

    /// Whether the weights and optimizer state are those of a whole step (see `updating`).
    pub fn is_whole(&self) -> bool {
        !self.updating
    }

    /// Splits Muon's momentum and Newton–Schulz work over the ranks of `pg` (ZeRO-1 for the
    /// matrices; AdamW's few parameters stay replicated). Before the first micro-batch: the
    /// gradient buffers are re-made, padded to a multiple of the world size.
    pub fn shard_optimizer(&mut self, pg: &ProcessGroup) -> Result<()> {
        if self.resolved.is_some() {
            bail!("shard_optimizer after the first micro-batch");
        }
        let shard = optim::Shard {
            index: pg.rank(),
            count: pg.world_size(),
        };
        let matrices = self
            .model
            .named_parameters()
            .into_iter()
            .filter(|(name, _)| self.muon.locate(name).is_some())
            .map(|(name, p)| (name, p.shallow_clone()))
            .collect();
        let mut muon = Muon::sharded(matrices, self.muon.lr, shard);
        muon.ns_steps = self.muon.ns_steps;
        muon.orthogonalizer = self.muon.orthogonalizer;
        muon.weight_decay = self.muon.weight_decay;
        self.muon = muon;
        Ok(())
    }

    /// What the options resolved to (None before the first micro-batch).
    pub fn resolved(&self) -> Option<Resolved> {
        self.resolved.map(|(_, _, r)| r)
    }
    /// Copies the fp32 matrices into the bf16 cache when they changed since the last copy.
    fn refresh_cache(&self) {
        let Some(cache) = &self.cache else {
            return;
        };
        if !cache.dirty.replace(false) {
            return;
        }
        tch::no_grad(|| {
            for (name, p) in self.model.named_parameters() {
                if let Some((g, idx)) = self.muon.locate(&name) {
                    cache.stacks[g].get(idx).copy_(p);
                }
            }
        });
    }

    fn mark_weights_changed(&self) {
        if let Some(cache) = &self.cache {
            cache.dirty.set(true);
        }
        if let Some(fp8) = &self.fp8 {
            fp8.weights_changed();
        }
    }

    /// Forward and backward of one micro-batch; gradients accumulate scaled by `scale`
    /// (1/accumulation steps). Returns the unscaled loss, still on the device.
    ///
    /// Panics on libtorch errors, as tch does (out-of-memory probing relies on that).
    pub fn micro_step(&mut self, x: &Tensor, y: &Tensor, scale: f64) -> Tensor {
        let (b, t) = x.size2().expect("x must be [B, T]");
        let resolved = self.prepare(b, t).unwrap_or_else(|e| panic!("{e:#}"));
        self.refresh_cache();
        if let Some(fp8) = &mut self.fp8 {
            fp8.refresh_weights(&self.model, resolved.kernels == Kernels::Fused)
                .unwrap_or_else(|e| panic!("{e:#}"));
            let dynamic = fp8.begin_micro_batch();
            if let Some(runner) = &mut self.runner {
                runner.f8_dynamic = dynamic;
            }
        }
        let loss = match &self.runner {
            None => self.model.loss(x, y),
            Some(runner) => self
                .model
                .loss_blocks(x, y, runner)
                .unwrap_or_else(|e| panic!("{e:#}")),
        };
        (&loss * scale).backward();
        loss.detach()
    }

    /// With FP8 products: from the next micro-batch on, scale from the amax recorded so far (the
    /// steady state) even within the first steps. For checks.
    pub fn fp8_delay_from_now(&mut self) {
        if let Some(fp8) = &mut self.fp8 {
            fp8.delay_from_now();
        }
    }

    /// Clears every gradient (the next micro-batch starts a new accumulation).
    pub fn zero_grads(&mut self) {
        self.muon.zero_grads();
        for mut p in self.adamw.params() {
            p.zero_grad();
        }
    }

    /// Every gradient buffer: Muon's stacked ones, then the embedding's and lm_head's.
    fn grad_buffers(&self) -> Vec<Tensor> {
        let mut grads = self.muon.grads();
        grads.extend(self.adamw.params().map(|p| p.grad()));
        grads
    }

    /// Averages gradients over ranks, clips their global norm to `grad_clip` (0 = off) without a
    /// host synchronisation, applies both optimizers and clears the gradients.
    pub fn optimizer_step(
        &mut self,
        pg: &ProcessGroup,
        lr_mult: f64,
        momentum: f64,
        grad_clip: f64,
    ) -> Result<()> {
        let grads = self.grad_buffers();
        if grads.iter().any(|g| !g.defined()) {
            bail!("optimizer step before any backward pass");
        }
        let shard = self.muon.shard();
        let sharded = shard.count > 1;
        if sharded && (shard.count, shard.index) != (pg.world_size(), pg.rank()) {
            bail!(
                "Muon is sharded as rank {} of {} but the group is rank {} of {}",
                shard.index,
                shard.count,
                pg.rank(),
                pg.world_size()
            );
        }
        let fused = self.muon.fused;
        let mut clip = None;
        if sharded {
            let adam: Vec<Tensor> = self.adamw.params().map(|p| p.grad()).collect();
            pg.all_reduce(&adam, ReduceOp::Avg)?;
            self.muon.reduce_grads(pg)?;
            if grad_clip > 0.0 {
                clip = Some(self.sharded_clip(pg, &adam, grad_clip)?);
            }
        } else {
            pg.all_reduce(&grads, ReduceOp::Avg)?;
        }
        if grad_clip > 0.0 && !sharded {
            tch::no_grad(|| {
                // The fast path reads each buffer once (a norm); the reference squares first.
                let total = if fused {
                    let norms: Vec<Tensor> = grads
                        .iter()
                        .map(|g| {
                            let all: Vec<i64> = (0..g.dim() as i64).collect();
                            g.norm_scalaropt_dim_dtype(2.0, all.as_slice(), false, Kind::Float)
                        })
                        .collect();
                    Tensor::stack(&norms, 0).square().sum(Kind::Float).sqrt()
                } else {
                    let norms: Vec<Tensor> =
                        grads.iter().map(|g| g.square().sum(Kind::Float)).collect();
                    Tensor::stack(&norms, 0).sum(Kind::Float).sqrt()
                };
                let coef = (total + 1e-6)
                    .reciprocal()
                    .g_mul_scalar(grad_clip)
                    .clamp_max(1.0);
                // The fast path folds the factor into Muon's momentum pass; AdamW's gradients
                // (and all of the reference's) are scaled here.
                let muon_grads = self.muon.grads().len();
                for (i, g) in grads.iter().enumerate() {
                    if !(fused && i < muon_grads) {
                        let _ = g.shallow_clone().g_mul_(&coef);
                    }
                }
                clip = Some(coef);
            });
        }
        self.updating = true;
        self.muon
            .step(lr_mult, momentum, if fused { clip.as_ref() } else { None });
        self.adamw.step(lr_mult);
        if sharded {
            self.muon.gather_params(pg)?;
        }
        self.updating = false;
        self.zero_grads();
        self.mark_weights_changed();
        if let Some(fp8) = &mut self.fp8 {
            fp8.optimizer_stepped();
        }
        Ok(())
    }

    /// The clipping factor when Muon is sharded: the global norm sums each rank's share of the
    /// matrices' squared norms (an all-reduce of one number) and the replicated AdamW gradients'.
    /// AdamW's gradients (and Muon's on the reference path) are scaled here, as unsharded.
    fn sharded_clip(&self, pg: &ProcessGroup, adam: &[Tensor], grad_clip: f64) -> Result<Tensor> {
        let _guard = tch::no_grad_guard();
        let muon_sq = self.muon.owned_grad_square_norm().reshape([1]);
        pg.all_reduce(&[muon_sq.shallow_clone()], ReduceOp::Sum)?;
        let adam_sq: Vec<Tensor> = adam.iter().map(|g| g.square().sum(Kind::Float)).collect();
        let total = (muon_sq.sum(Kind::Float) + Tensor::stack(&adam_sq, 0).sum(Kind::Float)).sqrt();
        let coef = (total + 1e-6)
            .reciprocal()
            .g_mul_scalar(grad_clip)
            .clamp_max(1.0);
        for g in adam {
            let _ = g.shallow_clone().g_mul_(&coef);
        }
        if !self.muon.fused {
            self.muon.scale_owned_grads(&coef);
        }
        Ok(coef)
    }

    /// Model weights by nanochat's names.
    pub fn model_state(&self) -> Vec<(String, Tensor)> {
        self.model
            .named_parameters()
            .into_iter()
            .map(|(n, p)| (n, p.shallow_clone()))
            .collect()
    }

    /// Both optimizers' state by name, whole whatever the sharding: every rank must call it
    /// (between steps) when Muon is sharded; the tensors are complete on `keep` ranks.
    pub fn optimizer_state(&self, pg: &ProcessGroup, keep: bool) -> Result<Vec<(String, Tensor)>> {
        let mut out = self.muon.state(pg, keep)?;
        out.extend(self.adamw.state());
        Ok(out)
    }

    /// Copies weights and optimizer state from a checkpoint.
    pub fn load(
        &mut self,
        model: &BTreeMap<String, Tensor>,
        optimizer: &BTreeMap<String, Tensor>,
        adamw_step: i64,
    ) -> Result<()> {
        self.mark_weights_changed();
        self.model.load_weights(model)?;
        self.muon.load_state(optimizer)?;
        self.adamw.load_state(optimizer, adamw_step)
    }

    /// Takes a checkpoint's weights alone (`--init-from`): the optimizer starts fresh.
    pub fn load_weights(&mut self, model: &BTreeMap<String, Tensor>) -> Result<()> {
        self.mark_weights_changed();
        self.model.load_weights(model)
    }

    /// Makes every rank hold rank 0's weights and optimizer state (sharded: its own share of
    /// Muon's, from what rank 0 loaded or its zeros).
    pub fn broadcast_from_rank0(&self, pg: &ProcessGroup) -> Result<()> {
        self.mark_weights_changed();
        if self.muon.shard().count > 1 {
            self.muon.scatter_staged(pg, 0)?;
        }
        if pg.world_size() == 1 {
            return Ok(());
        }
        let mut tensors: Vec<Tensor> = self.model_state().into_iter().map(|(_, t)| t).collect();
        tensors.extend(self.adamw.state().into_iter().map(|(_, t)| t));
        if self.muon.shard().count == 1 {
            tensors.extend(self.muon.state(pg, true)?.into_iter().map(|(_, t)| t));
        }
        tch::no_grad(|| pg.broadcast(&tensors, 0))
    }
}
