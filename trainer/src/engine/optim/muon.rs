//! Muon for the blocks' matrices: momentum, orthogonalized updates with cautious weight decay,
//! optionally sharded over the ranks (ZeRO-1), and its state as named tensors.

use std::collections::BTreeMap;

use anyhow::Result;
use tch::{Kind, Tensor};

use super::orthogonalize::{orthogonalize_fused_with, orthogonalize_with, Orthogonalizer};
use crate::dist::{ProcessGroup, ReduceOp};

/// Muon's momentum warms up from 0.85 to 0.95 over the first 300 steps.
pub fn muon_momentum(step: i64) -> f64 {
    let frac = (step as f64 / 300.0).min(1.0);
    (1.0 - frac) * 0.85 + frac * 0.95
}

/// Which of each group's matrices this rank updates when Muon is sharded over `count` ranks:
/// rank `index` owns `per = ⌈n / count⌉` consecutive ones from `index·per` (fewer, or none, at
/// the end), keeps momentum for them alone, and orthogonalizes only them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shard {
    pub index: usize,
    pub count: usize,
}

impl Shard {
    /// Unsharded: every rank updates every matrix.
    pub const WHOLE: Shard = Shard { index: 0, count: 1 };

    /// Matrices per rank for a group of `n`.
    pub fn per(self, n: i64) -> i64 {
        (n + self.count as i64 - 1) / self.count as i64
    }

    /// (first, how many) of a group of `n` that this rank owns.
    pub fn owned(self, n: i64) -> (i64, i64) {
        let per = self.per(n);
        let first = (self.index as i64 * per).min(n);
        (first, per.min(n - first))
    }
}

/// Matrices of one shape, updated together: one batched Newton–Schulz call per shape (or per chunk
/// of it) per step.
struct MuonGroup {
    params: Vec<Tensor>,
    names: Vec<String>,
    /// Nesterov momentum of the owned matrices, `[per, rows, cols]` fp32.
    momentum: Tensor,
    /// The members' gradients, `[per·count, rows, cols]` fp32 (zero rows pad a group that does not
    /// divide): each parameter's `.grad` is a view of its slice, so backward passes accumulate
    /// here and the step needs no stacking copy. Sharded, it is also where the updated matrices
    /// are gathered and where checkpointed momentum passes through, between steps.
    grads: Tensor,
    /// Sharded only: this rank's slice of `grads`, `[per, rows, cols]`, where the reduce-scatter
    /// leaves its averaged gradients and the step its updated matrices for the all-gather.
    reduced: Option<Tensor>,
}

impl MuonGroup {
    /// The averaged gradients of the owned matrices: the reduce-scatter's output when sharded.
    fn owned_grads(&self, shard: Shard) -> Tensor {
        let (first, len) = shard.owned(self.params.len() as i64);
        match &self.reduced {
            Some(r) => r.narrow(0, 0, len),
            None => self.grads.narrow(0, first, len),
        }
    }
}

pub struct Muon {
    pub lr: f64,
    pub ns_steps: usize,
    /// Most fp32 gradient bytes one Newton–Schulz batch takes (0: a whole group at once), which
    /// bounds the step's temporary memory; the arithmetic per matrix does not change.
    pub chunk_bytes: i64,
    /// [`orthogonalize_fused`](super::orthogonalize::orthogonalize_fused), one momentum pass and
    /// one fused update per matrix, instead of the first version.
    pub fused: bool,
    /// The momentum pass as a CUDA kernel (else its ATen twin).
    pub cuda_kernels: bool,
    /// The orthogonalizing iteration (the recipe's).
    pub orthogonalizer: Orthogonalizer,
    /// Cautious decoupled weight decay λ of the next step (the schedule sets it every step; 0:
    /// none): `p -= lr·λ·p` where the update moves `p` toward zero, as nanochat's 2026 Muon.
    pub weight_decay: f64,
    shard: Shard,
    groups: Vec<MuonGroup>,
    /// Parameter name → (group, index in the group).
    index: BTreeMap<String, (usize, i64)>,
}

impl Muon {
    pub fn new(params: Vec<(String, Tensor)>, lr: f64) -> Self {
        Self::sharded(params, lr, Shard::WHOLE)
    }

    /// Muon whose state and Newton–Schulz work are split over ranks as `shard` says.
    pub fn sharded(params: Vec<(String, Tensor)>, lr: f64, shard: Shard) -> Self {
        let mut by_shape: BTreeMap<Vec<i64>, Vec<(String, Tensor)>> = BTreeMap::new();
        for (name, p) in params {
            by_shape.entry(p.size()).or_default().push((name, p));
        }
        let mut index = BTreeMap::new();
        let groups = by_shape
            .into_iter()
            .enumerate()
            .map(|(g, (shape, members))| {
                let per = shard.per(members.len() as i64);
                let stacked = |rows: i64| {
                    let mut full = vec![rows];
                    full.extend(&shape);
                    Tensor::zeros(full.as_slice(), (Kind::Float, members[0].1.device()))
                };
                let momentum = stacked(per);
                let grads = stacked(per * shard.count as i64);
                // The reduce-scatter writes this rank's averaged slice over its own summands
                // (NCCL and the CPU collective both allow it in place): no second buffer.
                let reduced =
                    (shard.count > 1).then(|| grads.narrow(0, shard.index as i64 * per, per));
                for (i, (name, p)) in members.iter().enumerate() {
                    super::ops::set_grad(p, &grads.get(i as i64))
                        .expect("assigning a gradient buffer");
                    index.insert(name.clone(), (g, i as i64));
                }
                let (names, params) = members.into_iter().unzip();
                MuonGroup {
                    params,
                    names,
                    momentum,
                    grads,
                    reduced,
                }
            })
            .collect();
        Self {
            lr,
            ns_steps: 5,
            chunk_bytes: 0,
            fused: false,
            cuda_kernels: false,
            orthogonalizer: Orthogonalizer::Quintic,
            weight_decay: 0.0,
            shard,
            groups,
            index,
        }
    }

    pub fn shard(&self) -> Shard {
        self.shard
    }

    /// Where the parameter `name` lives: (group, index in the group), the group indexing
    /// [`Muon::grads`].
    pub fn locate(&self, name: &str) -> Option<(usize, i64)> {
        self.index.get(name).copied()
    }

    /// The stacked gradient buffers, one per shape.
    pub fn grads(&self) -> Vec<Tensor> {
        self.groups
            .iter()
            .map(|g| g.grads.shallow_clone())
            .collect()
    }

    pub fn zero_grads(&mut self) {
        for g in &mut self.groups {
            let _ = g.grads.zero_();
        }
    }

    /// One update with learning-rate multiplier `lr_mult` and momentum `beta`. The gradients are
    /// consumed (overwritten by their Nesterov blend in the first version). `clip` scales the
    /// gradients first (the fused path only; the first version expects them scaled already).
    pub fn step(&mut self, lr_mult: f64, beta: f64, clip: Option<&Tensor>) {
        let _guard = tch::no_grad_guard();
        let shard = self.shard;
        for group in &mut self.groups {
            let (first, n) = shard.owned(group.params.len() as i64);
            let size = group.params[0].size();
            let per = if self.chunk_bytes > 0 {
                (self.chunk_bytes / (4 * size[0] * size[1])).clamp(1, n.max(1))
            } else {
                n
            };
            let aspect = (size[0] as f64 / size[1] as f64).max(1.0).sqrt();
            let grads = group.owned_grads(shard);
            let mut start = 0;
            while start < n {
                let k = per.min(n - start);
                let mut g = grads.narrow(0, start, k);
                let mut m = group.momentum.narrow(0, start, k);
                let scale = -self.lr * lr_mult * aspect;
                let decay = -scale * self.weight_decay;
                let param = |i: i64| &group.params[(first + start + i) as usize];
                if self.fused {
                    let x = super::ops::muon_momentum(&g, &m, clip, beta, self.cuda_kernels)
                        .expect("Muon momentum");
                    let update = orthogonalize_fused_with(&x, self.ns_steps, self.orthogonalizer);
                    for i in 0..k {
                        let p = param(i);
                        cautious_decay(p, &update.get(i), decay);
                        super::ops::add_scaled(p, &update.get(i), scale).expect("Muon update");
                    }
                } else {
                    let _ = m.lerp_(&g, 1.0 - beta);
                    let _ = g.lerp_(&m, beta);
                    let update = orthogonalize_with(&g, self.ns_steps, self.orthogonalizer)
                        .to_kind(Kind::Float);
                    for i in 0..k {
                        let p = param(i);
                        cautious_decay(p, &update.get(i), decay);
                        let _ = p.shallow_clone().g_add_(&(update.get(i) * scale));
                    }
                }
                start += k;
            }
        }
    }

    /// Sharded: averages the gradients over ranks, each rank receiving its own matrices' in
    /// `reduced` (the unsharded step all-reduces [`Muon::grads`] instead).
    pub fn reduce_grads(&self, pg: &ProcessGroup) -> Result<()> {
        for group in &self.groups {
            if let Some(reduced) = &group.reduced {
                pg.reduce_scatter(&group.grads, reduced, ReduceOp::Avg)?;
            }
        }
        Ok(())
    }

    /// Sum of squares of the averaged gradients this rank holds (all of them unsharded, its own
    /// matrices' sharded), for the global norm.
    pub fn owned_grad_square_norm(&self) -> Tensor {
        let parts: Vec<Tensor> = self
            .groups
            .iter()
            .map(|g| g.owned_grads(self.shard).square().sum(Kind::Float))
            .collect();
        Tensor::stack(&parts, 0).sum(Kind::Float)
    }

    /// Scales the averaged gradients this rank holds by `coef` (clipping, on the reference path).
    pub fn scale_owned_grads(&self, coef: &Tensor) {
        let _guard = tch::no_grad_guard();
        for g in &self.groups {
            let _ = g.owned_grads(self.shard).g_mul_(coef);
        }
    }

    /// Sharded: after each rank updated its matrices, every rank receives all of them (gathered
    /// through the free gradient buffer, which the step then clears).
    pub fn gather_params(&self, pg: &ProcessGroup) -> Result<()> {
        let _guard = tch::no_grad_guard();
        for group in &self.groups {
            let Some(reduced) = &group.reduced else {
                continue;
            };
            let (first, n) = self.shard.owned(group.params.len() as i64);
            for i in 0..n {
                reduced.get(i).copy_(&group.params[(first + i) as usize]);
            }
            pg.all_gather(reduced, &group.grads)?;
            for (i, p) in group.params.iter().enumerate() {
                let i = i as i64;
                if !(first..first + n).contains(&i) {
                    p.shallow_clone().copy_(&group.grads.get(i));
                }
            }
        }
        Ok(())
    }

    /// The momentum of every matrix by name, whole: sharded, gathered from all ranks (every rank
    /// must call it, between steps) and copied to the host on `keep` ranks (the one that writes
    /// the checkpoint); unsharded, views of this rank's own state.
    pub fn state(&self, pg: &ProcessGroup, keep: bool) -> Result<Vec<(String, Tensor)>> {
        let _guard = tch::no_grad_guard();
        let mut out = Vec::new();
        for group in &self.groups {
            if group.reduced.is_none() {
                for (i, name) in group.names.iter().enumerate() {
                    out.push((
                        format!("muon.momentum.{name}"),
                        group.momentum.get(i as i64),
                    ));
                }
                continue;
            }
            Self::ensure_free(group)?;
            pg.all_gather(&group.momentum, &group.grads)?;
            if keep {
                for (i, name) in group.names.iter().enumerate() {
                    out.push((
                        format!("muon.momentum.{name}"),
                        // A copy even on the CPU: the buffer is cleared below.
                        group.grads.get(i as i64).to_device_(
                            tch::Device::Cpu,
                            Kind::Float,
                            false,
                            true,
                        ),
                    ));
                }
            }
            let _ = group.grads.shallow_clone().zero_();
        }
        Ok(out)
    }

    /// Restores momentum saved by [`Muon::state`] (from any world size: it is saved whole).
    /// Sharded, it is staged in the gradient buffers for [`Muon::scatter_staged`] to hand out.
    pub fn load_state(&mut self, state: &BTreeMap<String, Tensor>) -> anyhow::Result<()> {
        let _guard = tch::no_grad_guard();
        for group in &mut self.groups {
            let dst = match group.reduced {
                Some(_) => &group.grads,
                None => &group.momentum,
            };
            for (i, name) in group.names.iter().enumerate() {
                let key = format!("muon.momentum.{name}");
                let t = state
                    .get(&key)
                    .ok_or_else(|| anyhow::anyhow!("missing {key}"))?;
                dst.get(i as i64).copy_(t);
            }
        }
        Ok(())
    }

    /// Sharded: every rank takes its matrices' momentum from what `root` staged (a checkpoint's,
    /// or zeros), then clears the staging gradient buffers.
    pub fn scatter_staged(&self, pg: &ProcessGroup, root: usize) -> Result<()> {
        let _guard = tch::no_grad_guard();
        for group in &self.groups {
            if group.reduced.is_none() {
                continue;
            }
            pg.broadcast(&[group.grads.shallow_clone()], root)?;
            let (first, n) = self.shard.owned(group.params.len() as i64);
            group
                .momentum
                .narrow(0, 0, n)
                .copy_(&group.grads.narrow(0, first, n));
            let _ = group.grads.shallow_clone().zero_();
        }
        Ok(())
    }

    /// The gradient buffer may carry gathered state only between steps, when it holds zeros.
    fn ensure_free(group: &MuonGroup) -> Result<()> {
        let busy = group.grads.abs().max().double_value(&[]) != 0.0;
        if busy {
            anyhow::bail!(
                "Muon's gradient buffers hold gradients: the sharded state can be gathered only \
                 between optimizer steps"
            );
        }
        Ok(())
    }
}

/// Cautious weight decay (Chen et al. 2025, arXiv 2510.12402): `p -= decay·p` only where the
/// update `p -= lr·update` also moves `p` toward zero (`update·p ≥ 0`), before the update itself.
fn cautious_decay(p: &Tensor, update: &Tensor, decay: f64) {
    if decay == 0.0 {
        return;
    }
    let mask = update.to_kind(Kind::Float).g_mul(p).ge(0.0);
    let _ = p
        .shallow_clone()
        .g_sub_(&(p * mask.to_kind(Kind::Float) * decay));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cautious_decay_shrinks_only_weights_the_update_moves_toward_zero() {
        // p -= lr·update: for p = 1 an update of +1 moves it toward 0 (decayed); for p = -1 an
        // update of +1 moves it away (kept); for p = 2 an update of -1 moves it away (kept).
        let p = Tensor::from_slice(&[1.0f32, -1.0, 2.0, 0.5]);
        let update = Tensor::from_slice(&[1.0f32, 1.0, -1.0, 0.0]);
        cautious_decay(&p, &update, 0.1);
        let got: Vec<f32> = Vec::try_from(&p).unwrap();
        assert_eq!(got, [0.9f32, -1.0, 2.0, 0.45]);
    }

    #[test]
    fn momentum_warms_up_over_300_steps() {
        assert!((muon_momentum(0) - 0.85).abs() < 1e-12);
        assert!((muon_momentum(150) - 0.90).abs() < 1e-12);
        assert!((muon_momentum(1000) - 0.95).abs() < 1e-12);
    }
}
