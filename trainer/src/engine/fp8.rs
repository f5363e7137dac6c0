//! The engine's FP8 state (`--precision fp8`): e4m3 copies of the blocks' matrices, made once per
//! optimizer step, and the scales of the activations and gradients the blocks' products read.
//!
//! Scaling is tensorwise, as nanochat's FP8 layer: a tensor is multiplied by `max / amax` before
//! the saturating cast (max: 448 for e4m3, 57344 for e5m2). nanochat takes each tensor's own
//! amax, which is a reduction over the tensor before its cast; under torch.compile that pass can
//! fuse into the producer, here it could not without a second read of every tensor. So after the
//! first [`DYNAMIC_STEPS`] optimizer steps (which scale like nanochat, tensor by tensor) the
//! scales are *delayed*: the kernel that produces a tensor writes its FP8 copy in the same pass
//! with a scale from the amax of the last [`HISTORY`] micro-batches, times a margin of
//! [`MARGIN`], and records the amax of what it wrote for the micro-batches to come (Transformer
//! Engine's recipe). A value above the scaled range saturates (clips to ±max) instead of
//! overflowing, and raises the next micro-batch's range. Weights are always scaled by their own
//! amax, once per optimizer step. The first steps scale dynamically because the zero-initialised
//! output projections make some gradients exactly zero at step 0, so no history could say what
//! step 1 will bring.

use std::cell::Cell;

use anyhow::Result;
use tch::{Device, Kind, Tensor};

use crate::model::block::{self, Fp8Views};
use crate::model::{Gpt, GptConfig};

/// The tensor roles of a block with their own scale: the e4m3 inputs of q|k|v, the attention
/// output, MLP up and MLP down, then the e5m2 gradients of those products' outputs (csrc/block.cpp's
/// `SlotId`).
pub const SLOTS: i64 = 8;
/// Micro-batches whose amax sets a delayed scale.
pub const HISTORY: i64 = 16;
/// The delayed scale leaves this factor of headroom above the recorded amax.
pub const MARGIN: f64 = 2.0;
/// Optimizer steps, from the start of a run or a resume, whose micro-batches scale by each
/// tensor's own amax.
pub const DYNAMIC_STEPS: u64 = 2;
/// FP8 products pay only on wide enough matrices (nanochat converts layers whose smaller side is
/// at least 128; every charlm width is a multiple of 64).
pub const MIN_WIDTH: i64 = 128;

/// Whether a model of this shape runs its blocks' products in FP8.
pub fn eligible(config: &GptConfig) -> bool {
    config.width() >= MIN_WIDTH
}

pub struct Fp8State {
    /// Per block: weights, transposes, inverse weight scales and the block's `[3, SLOTS]` view
    /// of `scales`.
    pub views: Vec<Fp8Views>,
    /// `[depth, 3, SLOTS]` fp32: scale, 1/scale and this micro-batch's amax of each role.
    scales: Tensor,
    /// `[depth, SLOTS, HISTORY]` fp32: amax of earlier micro-batches (a ring).
    history: Tensor,
    /// `[SLOTS]` fp32: the largest finite value of each role's format.
    fmax: Tensor,
    micro_batches: u64,
    optimizer_steps: u64,
    weights_dirty: Cell<bool>,
    /// Scale from the history from the next micro-batch on, whatever the step (for checks).
    delayed_now: bool,
}

impl Fp8State {
    pub fn new(config: &GptConfig, device: Device) -> Self {
        let (c, a, depth) = (
            config.width(),
            config.heads() * config.head_dim(),
            config.depth,
        );
        let e4m3 = (Kind::Float8e4m3fn, device);
        let f32 = (Kind::Float, device);
        let scales = Tensor::ones([depth, 3, SLOTS], f32);
        let _ = scales.select(1, 2).zero_();
        let winv = Tensor::ones([depth, 4], f32);
        // [out, in] of q|k|v, attention output, MLP up, MLP down.
        let shapes = [[3 * a, c], [c, a], [4 * c, c], [c, 4 * c]];
        let views = (0..depth)
            .map(|i| Fp8Views {
                w8: shapes.map(|s| Tensor::empty(s, e4m3)),
                w8t: shapes.map(|[o, i]| Tensor::empty([i, o], e4m3)),
                winv: winv.get(i),
                scales: scales.get(i),
            })
            .collect();
        let fmax: Vec<f32> = (0..SLOTS)
            .map(|i| if i < SLOTS / 2 { 448.0 } else { 57344.0 })
            .collect();
        Self {
            views,
            scales,
            history: Tensor::zeros([depth, SLOTS, HISTORY], f32),
            fmax: Tensor::from_slice(&fmax).to_device(device),
            micro_batches: 0,
            optimizer_steps: 0,
            weights_dirty: Cell::new(true),
            delayed_now: false,
        }
    }

    /// The fp32 weights changed (optimizer step, load, broadcast): re-make the copies before the
    /// next micro-batch.
    pub fn weights_changed(&self) {
        self.weights_dirty.set(true);
    }

    pub fn optimizer_stepped(&mut self) {
        self.optimizer_steps += 1;
        self.weights_changed();
    }

    /// Makes the e4m3 weights if the masters changed since the last time.
    pub fn refresh_weights(&self, model: &Gpt, fused: bool) -> Result<()> {
        if !self.weights_dirty.replace(false) {
            return Ok(());
        }
        tch::no_grad(|| {
            for (own, views) in model.blocks.iter().zip(&self.views) {
                block::fp8_weights(own, views, fused)?;
            }
            Ok(())
        })
    }

    /// From the next micro-batch on, scale from the recorded amax even in the first steps (checks
    /// compare the steady state's numerics after one dynamic micro-batch).
    pub fn delay_from_now(&mut self) {
        self.delayed_now = true;
    }

    /// Before a micro-batch: files the last one's amax in the history and sets this one's
    /// scales. Returns whether this micro-batch scales dynamically (by each tensor's own amax).
    pub fn begin_micro_batch(&mut self) -> bool {
        let _guard = tch::no_grad_guard();
        let amax = self.scales.select(1, 2);
        if self.micro_batches > 0 {
            let at = ((self.micro_batches - 1) % HISTORY as u64) as i64;
            self.history.select(2, at).copy_(&amax);
            let _ = amax.shallow_clone().zero_();
        }
        self.micro_batches += 1;
        let dynamic = !self.delayed_now && self.optimizer_steps < DYNAMIC_STEPS;
        if !dynamic {
            let scale = delayed_scale(&self.history, &self.fmax);
            self.scales.select(1, 0).copy_(&scale);
            self.scales.select(1, 1).copy_(&scale.reciprocal());
        }
        dynamic
    }
}

/// max / (MARGIN · the largest recorded amax) per block and role; a role that was all zeros so far
/// gets nanochat's floor (its zeros cast to zeros).
pub fn delayed_scale(history: &Tensor, fmax: &Tensor) -> Tensor {
    let amax = history.amax([-1].as_slice(), false);
    fmax / (amax * MARGIN).clamp_min(1e-12)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delayed_scales_leave_the_margin_above_the_largest_recorded_amax() {
        // One block, two roles (e4m3, e5m2), a history of three micro-batches.
        let history = Tensor::from_slice(&[1.0f32, 4.0, 2.0, 0.0, 0.0, 0.0]).view([1, 2, 3]);
        let fmax = Tensor::from_slice(&[448.0f32, 57344.0]);
        let s = delayed_scale(&history, &fmax);
        let got: Vec<f32> = Vec::try_from(s.view([-1])).unwrap();
        assert_eq!(got[0], 448.0 / (4.0 * MARGIN as f32));
        // An all-zero role: a finite scale, so its zeros cast to zeros.
        assert!(got[1].is_finite() && got[1] > 0.0, "{got:?}");
    }

    #[test]
    fn the_first_steps_scale_dynamically_then_from_the_history() {
        let config = GptConfig::new(2, 16);
        let mut st = Fp8State::new(&config, Device::Cpu);
        let mut modes = Vec::new();
        for step in 0..4 {
            for micro in 0..2 {
                modes.push(st.begin_micro_batch());
                // What the casts of this micro-batch recorded.
                let amax = (step * 2 + micro + 1) as f64;
                let _ = st.scales.select(1, 2).fill_(amax);
            }
            st.optimizer_stepped();
        }
        assert_eq!(
            modes,
            [true, true, true, true, false, false, false, false],
            "dynamic for {DYNAMIC_STEPS} optimizer steps"
        );
        // The last micro-batch's scales came from the largest amax filed before it (7).
        let scale = st.scales.double_value(&[1, 0, 0]);
        assert!((scale - 448.0 / (7.0 * MARGIN)).abs() < 1e-3, "{scale}");
        let inv = st.scales.double_value(&[1, 1, 5]);
        assert!((inv - 7.0 * MARGIN / 57344.0).abs() < 1e-9, "{inv}");
    }
}
