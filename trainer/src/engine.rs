//! The model with its two optimizers and the arithmetic of one optimization step: forward and
//! backward over micro-batches, gradient averaging across ranks, clipping, and the updates. Shared
//! by `train` (which adds data, schedule, evaluation and checkpoints) and `bench` (which times it).

use std::collections::BTreeMap;

use anyhow::Result;
use tch::{Device, Kind, Tensor};

use crate::dist::{ProcessGroup, ReduceOp};
use crate::model::{Gpt, GptConfig};
use crate::optim::{AdamW, Muon};

/// Learning rates at width 768; AdamW's are scaled by (width/768)^-0.5 as in nanochat.
#[derive(Clone, Copy, Debug, serde::Serialize, serde::Deserialize)]
pub struct LearningRates {
    pub matrix: f64,
    pub embedding: f64,
    pub unembedding: f64,
}

impl Default for LearningRates {
    fn default() -> Self {
        Self {
            matrix: 0.02,
            embedding: 0.2,
            unembedding: 0.004,
        }
    }
}

pub struct Engine {
    pub model: Gpt,
    pub muon: Muon,
    pub adamw: AdamW,
}

impl Engine {
    pub fn new(config: GptConfig, device: Device, seed: u64, lr: LearningRates) -> Self {
        let model = Gpt::new(config, device, seed);
        let scale = (config.width() as f64 / 768.0).powf(-0.5);
        let adamw = AdamW::new(vec![
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
        ]);
        let matrices = model
            .named_parameters()
            .into_iter()
            .filter(|(name, _)| name.starts_with("transformer.h."))
            .map(|(name, p)| (name, p.shallow_clone()))
            .collect();
        let muon = Muon::new(matrices, lr.matrix);
        Self { model, muon, adamw }
    }

    pub fn parameters(&self) -> Vec<Tensor> {
        self.model
            .named_parameters()
            .into_iter()
            .map(|(_, p)| p.shallow_clone())
            .collect()
    }

    /// Forward and backward of one micro-batch; gradients accumulate scaled by `scale`
    /// (1/accumulation steps). Returns the unscaled loss, still on the device.
    pub fn micro_step(&self, x: &Tensor, y: &Tensor, scale: f64) -> Tensor {
        let loss = self.model.loss(x, y);
        (&loss * scale).backward();
        loss.detach()
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
        let params = self.parameters();
        let grads: Vec<Tensor> = params.iter().map(|p| p.grad()).collect();
        pg.all_reduce(&grads, ReduceOp::Avg)?;
        if grad_clip > 0.0 {
            tch::no_grad(|| {
                let norms: Vec<Tensor> =
                    grads.iter().map(|g| g.square().sum(Kind::Float)).collect();
                let total = Tensor::stack(&norms, 0).sum(Kind::Float).sqrt();
                let coef = (total + 1e-6)
                    .reciprocal()
                    .g_mul_scalar(grad_clip)
                    .clamp_max(1.0);
                for g in &grads {
                    let _ = g.shallow_clone().g_mul_(&coef);
                }
            });
        }
        self.muon.step(lr_mult, momentum);
        self.adamw.step(lr_mult);
        for mut p in params {
            p.zero_grad();
        }
        Ok(())
    }

    /// Model weights by nanochat's names.
    pub fn model_state(&self) -> Vec<(String, Tensor)> {
        self.model
            .named_parameters()
            .into_iter()
            .map(|(n, p)| (n, p.shallow_clone()))
            .collect()
    }

    pub fn optimizer_state(&self) -> Vec<(String, Tensor)> {
        let mut out = self.muon.state();
        out.extend(self.adamw.state());
        out
    }

    /// Copies weights and optimizer state from a checkpoint.
    pub fn load(
        &mut self,
        model: &BTreeMap<String, Tensor>,
        optimizer: &BTreeMap<String, Tensor>,
        adamw_step: i64,
    ) -> Result<()> {
        self.model.load_weights(model)?;
        self.muon.load_state(optimizer)?;
        self.adamw.load_state(optimizer, adamw_step)
    }

    /// Makes every rank hold rank 0's weights and optimizer state.
    pub fn broadcast_from_rank0(&self, pg: &ProcessGroup) -> Result<()> {
        if pg.world_size() == 1 {
            return Ok(());
        }
        let mut tensors: Vec<Tensor> = self.model_state().into_iter().map(|(_, t)| t).collect();
        tensors.extend(self.optimizer_state().into_iter().map(|(_, t)| t));
        tch::no_grad(|| pg.broadcast(&tensors, 0))
    }
}
