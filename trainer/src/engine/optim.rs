//! The two optimizers of nanochat: Muon for the blocks' matrices and AdamW for the embedding and
//! lm_head. Both update fp32 parameters in place and keep their state as named tensors so that a
//! checkpoint restores them exactly.

use std::collections::BTreeMap;

use anyhow::Result;
use tch::{Kind, Tensor};

use crate::dist::{ProcessGroup, ReduceOp};

/// Quintic Newton–Schulz coefficients tuned by Keller Jordan for Muon.
const NS_COEFFS: (f64, f64, f64) = (3.4445, -4.7750, 2.0315);

/// Polar Express coefficients, one triple per iteration (Amsel et al. 2025, arXiv 2505.16932,
/// computed for 5 iterations with safety factor 2e-2), as nanochat's 2026 Muon uses them.
const POLAR_EXPRESS: [(f64, f64, f64); 5] = [
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
];

/// The polynomial iteration Muon orthogonalizes with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Orthogonalizer {
    /// Keller Jordan's quintic, the same triple every step, input scaled to unit norm.
    #[default]
    Quintic,
    /// Polar Express: a triple per step, input scaled to 1/1.01 of unit norm (its safety margin).
    PolarExpress,
}

impl Orthogonalizer {
    fn coeffs(self, step: usize) -> (f64, f64, f64) {
        match self {
            Self::Quintic => NS_COEFFS,
            Self::PolarExpress => POLAR_EXPRESS[step.min(POLAR_EXPRESS.len() - 1)],
        }
    }

    fn norm_factor(self) -> f64 {
        match self {
            Self::Quintic => 1.0,
            Self::PolarExpress => 1.01,
        }
    }
}

/// Muon's momentum warms up from 0.85 to 0.95 over the first 300 steps.
pub fn muon_momentum(step: i64) -> f64 {
    let frac = (step as f64 / 300.0).min(1.0);
    (1.0 - frac) * 0.85 + frac * 0.95
}

/// Approximate U·Vᵀ of `g = U·S·Vᵀ` for a batch `[n, rows, cols]` by 5 quintic iterations in bf16.
/// Works on the wide orientation (rows ≤ cols) so `X·Xᵀ` is the small Gram matrix.
// `x = x / …` stays out of place: for a bf16 `g`, `to_kind` returns `g` itself.
#[allow(clippy::assign_op_pattern)]
pub fn orthogonalize(g: &Tensor, steps: usize) -> Tensor {
    orthogonalize_with(g, steps, Orthogonalizer::Quintic)
}

/// [`orthogonalize`] with the iteration `method`.
#[allow(clippy::assign_op_pattern)]
pub fn orthogonalize_with(g: &Tensor, steps: usize, method: Orthogonalizer) -> Tensor {
    let size = g.size();
    let tall = size[size.len() - 2] > size[size.len() - 1];
    let mut x = g.to_kind(Kind::BFloat16);
    if tall {
        x = x.transpose(-2, -1);
    }
    let norm = x
        .to_kind(Kind::Float)
        .square()
        .sum_dim_intlist(&[-2i64, -1][..], true, Kind::Float)
        .sqrt();
    x = x / (norm * method.norm_factor() + 1e-7).to_kind(Kind::BFloat16);
    for step in 0..steps {
        let (a, b, c) = method.coeffs(step);
        let gram = x.matmul(&x.transpose(-2, -1));
        let poly = &gram * b + gram.matmul(&gram) * c;
        x = &x * a + poly.matmul(&x);
    }
    if tall {
        x = x.transpose(-2, -1);
    }
    x
}

/// [`orthogonalize`] with each polynomial step as two fused matrix products (cuBLAS's
/// `β·C + α·A·B`): the same iteration, with one bf16 rounding per product instead of one per
/// elementwise operation. A tall matrix is not transposed: its Gram matrix is `XᵀX` and the
/// update `a·X + X·P` (P is symmetric), the transpose of the wide iteration, so every operand
/// stays contiguous.
pub fn orthogonalize_fused(g: &Tensor, steps: usize) -> Tensor {
    orthogonalize_fused_with(g, steps, Orthogonalizer::Quintic)
}

/// [`orthogonalize_fused`] with the iteration `method`.
pub fn orthogonalize_fused_with(g: &Tensor, steps: usize, method: Orthogonalizer) -> Tensor {
    let size = g.size();
    let tall = size[size.len() - 2] > size[size.len() - 1];
    let mut x = g.to_kind(Kind::BFloat16).contiguous();
    let norm = x.norm_scalaropt_dim_dtype(2.0, &[-2i64, -1][..], true, Kind::Float);
    x /= (norm * method.norm_factor() + 1e-7).to_kind(Kind::BFloat16);
    for step in 0..steps {
        let (a, b, c) = method.coeffs(step);
        if tall {
            let gram = x.transpose(-2, -1).matmul(&x);
            let poly = gram.baddbmm(&gram, &gram, b, c);
            x = x.baddbmm(&x, &poly, a, 1.0);
        } else {
            let gram = x.matmul(&x.transpose(-2, -1));
            let poly = gram.baddbmm(&gram, &gram, b, c);
            x = x.baddbmm(&poly, &x, a, 1.0);
        }
    }
    x
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
    /// [`orthogonalize_fused`], one momentum pass and one fused update per matrix, instead of
    /// the first version.
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
                    super::optim_ops::set_grad(p, &grads.get(i as i64))
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
                    let x = super::optim_ops::muon_momentum(&g, &m, clip, beta, self.cuda_kernels)
                        .expect("Muon momentum");
                    let update = orthogonalize_fused_with(&x, self.ns_steps, self.orthogonalizer);
                    for i in 0..k {
                        let p = param(i);
                        cautious_decay(p, &update.get(i), decay);
                        super::optim_ops::add_scaled(p, &update.get(i), scale)
                            .expect("Muon update");
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

/// Adam's two moments for one parameter.
struct AdamSlot {
    name: String,
    param: Tensor,
    lr: f64,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
}

/// AdamW (betas 0.8/0.95, eps 1e-10, no weight decay) with a learning rate per parameter.
pub struct AdamW {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Steps taken, for the bias corrections.
    pub step: i64,
    slots: Vec<AdamSlot>,
}

impl AdamW {
    pub fn new(params: Vec<(String, Tensor, f64)>) -> Self {
        let slots = params
            .into_iter()
            .map(|(name, param, lr)| AdamSlot {
                exp_avg: param.zeros_like(),
                exp_avg_sq: param.zeros_like(),
                name,
                param,
                lr,
            })
            .collect();
        Self {
            beta1: 0.8,
            beta2: 0.95,
            eps: 1e-10,
            step: 0,
            slots,
        }
    }

    /// The parameters it updates.
    pub fn params(&self) -> impl Iterator<Item = Tensor> + '_ {
        self.slots.iter().map(|s| s.param.shallow_clone())
    }

    pub fn step(&mut self, lr_mult: f64) {
        let _guard = tch::no_grad_guard();
        self.step += 1;
        let bc1 = 1.0 - self.beta1.powi(self.step as i32);
        let bc2 = 1.0 - self.beta2.powi(self.step as i32);
        for s in &mut self.slots {
            let g = s.param.grad();
            let _ = s.exp_avg.lerp_(&g, 1.0 - self.beta1);
            let _ = s.exp_avg_sq.g_mul_scalar_(self.beta2);
            let _ = s.exp_avg_sq.addcmul_(&g, &g.g_mul_scalar(1.0 - self.beta2));
            let denom = s.exp_avg_sq.sqrt() / bc2.sqrt() + self.eps;
            let step_size = s.lr * lr_mult / bc1;
            let _ = s
                .param
                .shallow_clone()
                .addcdiv_(&(&s.exp_avg * -step_size), &denom);
        }
    }

    pub fn state(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        for s in &self.slots {
            out.push((
                format!("adamw.exp_avg.{}", s.name),
                s.exp_avg.shallow_clone(),
            ));
            out.push((
                format!("adamw.exp_avg_sq.{}", s.name),
                s.exp_avg_sq.shallow_clone(),
            ));
        }
        out
    }

    pub fn load_state(
        &mut self,
        state: &BTreeMap<String, Tensor>,
        step: i64,
    ) -> anyhow::Result<()> {
        let _guard = tch::no_grad_guard();
        for s in &mut self.slots {
            for (prefix, dst) in [
                ("exp_avg", &mut s.exp_avg),
                ("exp_avg_sq", &mut s.exp_avg_sq),
            ] {
                let key = format!("adamw.{prefix}.{}", s.name);
                let t = state
                    .get(&key)
                    .ok_or_else(|| anyhow::anyhow!("missing {key}"))?;
                dst.copy_(t);
            }
        }
        self.step = step;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newton_schulz_gives_near_orthogonal_rows() {
        let _seed = crate::model::SEED_LOCK
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        tch::manual_seed(0);
        for shape in [[2i64, 16, 48], [1, 48, 16]] {
            let g = Tensor::randn(shape, (Kind::Float, tch::Device::Cpu));
            let x = orthogonalize(&g, 5).to_kind(Kind::Float);
            // Muon's quintic lands singular values in roughly [0.7, 1.2], not exactly 1.
            let (_, s, _) = x.svd(true, false);
            let (lo, hi) = (s.min().double_value(&[]), s.max().double_value(&[]));
            assert!(
                lo > 0.5 && hi < 1.3,
                "singular values in [{lo}, {hi}] for {shape:?}"
            );
        }
    }

    /// The same quintic iteration in float64: what both bf16 versions approximate.
    fn newton_schulz_f64(g: &Tensor, steps: usize) -> Tensor {
        let (a, b, c) = NS_COEFFS;
        let size = g.size();
        let tall = size[size.len() - 2] > size[size.len() - 1];
        let mut x = g.to_kind(Kind::Double);
        if tall {
            x = x.transpose(-2, -1);
        }
        let norm = x
            .square()
            .sum_dim_intlist(&[-2i64, -1][..], true, Kind::Double)
            .sqrt();
        x = &x / (norm + 1e-7);
        for _ in 0..steps {
            let gram = x.matmul(&x.transpose(-2, -1));
            let poly = &gram * b + gram.matmul(&gram) * c;
            x = &x * a + poly.matmul(&x);
        }
        if tall {
            x = x.transpose(-2, -1);
        }
        x
    }

    #[test]
    fn fused_newton_schulz_is_as_close_to_exact_as_the_first_version() {
        let _seed = crate::model::SEED_LOCK
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        tch::manual_seed(1);
        for shape in [[3i64, 64, 192], [2, 192, 64], [4, 128, 128]] {
            let g = Tensor::randn(shape, (Kind::Float, tch::Device::Cpu));
            let exact = newton_schulz_f64(&g, 5);
            let rel = |x: Tensor| {
                (x.to_kind(Kind::Double) - &exact).norm().double_value(&[])
                    / exact.norm().double_value(&[])
            };
            let (first, fused) = (rel(orthogonalize(&g, 5)), rel(orthogonalize_fused(&g, 5)));
            eprintln!("{shape:?}: first version {first:.3e}, fused {fused:.3e} from float64");
            // Both carry bf16 rounding noise; the fused one rounds less often.
            assert!(
                fused < 0.1 && fused < 1.5 * first,
                "{shape:?}: {fused} vs {first}"
            );
        }
    }

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
    fn polar_express_orthogonalizes_at_least_as_well_as_the_quintic() {
        let _seed = crate::model::SEED_LOCK
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        tch::manual_seed(2);
        let g = Tensor::randn([2, 32, 96], (Kind::Float, tch::Device::Cpu));
        let spread = |x: Tensor| {
            let (_, s, _) = x.to_kind(Kind::Float).svd(true, false);
            (s.min().double_value(&[]), s.max().double_value(&[]))
        };
        let (lo, hi) = spread(orthogonalize_with(&g, 5, Orthogonalizer::PolarExpress));
        assert!(
            lo > 0.6 && hi < 1.25,
            "Polar Express: singular values in [{lo}, {hi}]"
        );
        let fused = orthogonalize_fused_with(&g, 5, Orthogonalizer::PolarExpress);
        let first = orthogonalize_with(&g, 5, Orthogonalizer::PolarExpress);
        let rel = (fused.to_kind(Kind::Float) - first.to_kind(Kind::Float))
            .norm()
            .double_value(&[])
            / first.to_kind(Kind::Float).norm().double_value(&[]);
        assert!(rel < 0.05, "fused vs first version: {rel}");
    }

    #[test]
    fn momentum_warms_up_over_300_steps() {
        assert!((muon_momentum(0) - 0.85).abs() < 1e-12);
        assert!((muon_momentum(150) - 0.90).abs() < 1e-12);
        assert!((muon_momentum(1000) - 0.95).abs() < 1e-12);
    }

    #[test]
    fn adamw_matches_the_closed_form_first_step() {
        let _seed = crate::model::SEED_LOCK
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        // After one step Adam moves each weight by lr·sign(g) (up to eps).
        let p = Tensor::from_slice(&[1.0f32, -2.0, 3.0]).set_requires_grad(true);
        (&p * Tensor::from_slice(&[0.5f32, -0.25, 2.0]))
            .sum(Kind::Float)
            .backward();
        let mut opt = AdamW::new(vec![("p".into(), p.shallow_clone(), 0.1)]);
        opt.step(1.0);
        let got: Vec<f32> = Vec::try_from(&p.detach()).unwrap();
        let want = [0.9f32, -1.9, 2.9];
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 1e-5, "{got:?} != {want:?}");
        }
    }
}
