//! nanochat's GPT (November 2025), readable top to bottom: token embedding, RMSNorm without weights,
//! blocks of (rotary + QK-norm attention, ReLU² MLP), untied lm_head with a tanh logit softcap.
//!
//! Parameters are plain fp32 tensors; `forward` casts the matrices to the compute kind (bf16 on CUDA),
//! which is what autocast does in the reference and keeps fp32 master weights for the optimizers.
//!
//! Two ways to train it: `forward` is the straightforward autograd version (the reference, also
//! used for sampling and evaluation); `forward_blocks` runs each block as one node of csrc/block.cpp
//! with a hand-written backward, fused kernels and optional recomputation (see [`BlockRunner`]).

pub mod block;
mod config;

use tch::{Device, Kind, Tensor};

use config::HEAD_DIM;
pub use config::{GptConfig, ROPE_BASE};

/// Serializes tests that build two models and compare them: tch's random generator is global,
/// so tests running in parallel threads would interleave their draws.
#[cfg(test)]
pub(crate) static SEED_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
/// Logits are squashed into (-15, 15) by `15 * tanh(logits / 15)`.
const SOFTCAP: f64 = 15.0;

/// One transformer block's matrices, stored `[out, in]` like `nn.Linear`.
pub struct Block {
    pub c_q: Tensor,
    pub c_k: Tensor,
    pub c_v: Tensor,
    pub attn_proj: Tensor,
    pub c_fc: Tensor,
    pub mlp_proj: Tensor,
}

pub struct Gpt {
    pub config: GptConfig,
    pub wte: Tensor,
    pub blocks: Vec<Block>,
    pub lm_head: Tensor,
    /// `[depth]` fp32 scalars when `config.scalars`: the residual's and the embedding's share of
    /// each block's input.
    pub scalars: Option<(Tensor, Tensor)>,
}

/// Keys and values of earlier positions, for sampling one token at a time.
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
    pos: i64,
}

impl KvCache {
    pub fn new(depth: i64) -> Self {
        Self {
            layers: (0..depth).map(|_| None).collect(),
            pos: 0,
        }
    }

    pub fn len(&self) -> i64 {
        self.pos
    }

    pub fn is_empty(&self) -> bool {
        self.pos == 0
    }
}

/// How `forward_blocks` runs the blocks: the tensors each block reads and accumulates into (kept
/// by the engine), and per block whether it recomputes its activations in the backward pass.
pub struct BlockRunner {
    /// Fused CUDA kernels, or their eager ATen twins.
    pub fused: bool,
    /// cuDNN's attention instead of flash attention.
    pub cudnn: bool,
    /// Blocks keep relu(h)² for their backward instead of recomputing it.
    pub keep_act: bool,
    /// FP8 blocks (those with [`BlockViews::fp8`]) scale by each tensor's own amax in this
    /// micro-batch, instead of the amax recorded in earlier ones (src/engine/fp8.rs).
    pub f8_dynamic: bool,
    /// FP8 blocks compute their weight gradients in FP8 too.
    pub f8_wgrad: bool,
    pub blocks: Vec<BlockViews>,
}

/// One block's tensors that the engine keeps, besides the model's own fp32 matrices (the bridge
/// hands both to csrc/block.cpp in the order of [`block::TENSOR_NAMES`]).
pub struct BlockViews {
    /// `[3A, C]` compute-kind copy of q, k, v, when the engine keeps one.
    pub wqkv: Option<Tensor>,
    /// The other matrices in the compute kind (a cached copy) or the fp32 parameters themselves.
    pub wo: Tensor,
    pub wfc: Tensor,
    pub wp: Tensor,
    /// fp32 gradient accumulators: `[3A, C]` for q, k, v together, then the others.
    pub gqkv: Tensor,
    pub go: Tensor,
    pub gfc: Tensor,
    pub gp: Tensor,
    pub recompute: bool,
    /// The FP8 weights and scales when the block's products run in FP8.
    pub fp8: Option<block::Fp8Views>,
}

pub(crate) fn norm(x: &Tensor) -> Tensor {
    let last = *x.size().last().expect("norm of a scalar");
    x.rms_norm([last], None::<Tensor>, None)
}

/// Rotary embedding on `[B, T, H, D]`: rotate the two halves of each head by position-dependent angles.
pub(crate) fn apply_rotary(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Tensor {
    let d = x.size()[3] / 2;
    let x1 = x.narrow(3, 0, d);
    let x2 = x.narrow(3, d, d);
    let y1 = &x1 * cos + &x2 * sin;
    let y2 = -(&x1 * sin) + &x2 * cos;
    Tensor::cat(&[y1, y2], 3)
}

/// cos and sin tables `[1, T, 1, D/2]` for positions `start..start+len`, in `kind`.
pub(crate) fn rotary_tables(
    start: i64,
    len: i64,
    base: u32,
    device: Device,
    kind: Kind,
) -> (Tensor, Tensor) {
    let channels = Tensor::arange_start_step(0, HEAD_DIM, 2, (Kind::Float, device));
    let inv_freq = (channels / HEAD_DIM as f64 * f64::from(base).ln())
        .exp()
        .reciprocal();
    let t = Tensor::arange_start(start, start + len, (Kind::Float, device));
    let freqs = t.outer(&inv_freq);
    let shape = [1, len, 1, HEAD_DIM / 2];
    (
        freqs.cos().to_kind(kind).view(shape),
        freqs.sin().to_kind(kind).view(shape),
    )
}

impl Gpt {
    /// A freshly initialised model, as nanochat's `init_weights`: normal matrices with
    /// std = 1/sqrt(fan_in)·min(1, sqrt(fan_out/fan_in)), a unit-normal embedding, and zeros for
    /// lm_head and both output projections so every block starts as the identity.
    pub fn new(config: GptConfig, device: Device, seed: u64) -> Self {
        tch::manual_seed(seed as i64);
        let (w, a) = (config.width(), config.attn_dim());
        let linear = |out: i64, inp: i64| {
            let std = (1.0 / (inp as f64).sqrt()) * (out as f64 / inp as f64).sqrt().min(1.0);
            (Tensor::randn([out, inp], (Kind::Float, Device::Cpu)) * std).to_device(device)
        };
        let zeros = |out: i64, inp: i64| Tensor::zeros([out, inp], (Kind::Float, device));
        let wte =
            Tensor::randn([config.vocab_size, w], (Kind::Float, Device::Cpu)).to_device(device);
        let blocks = (0..config.depth)
            .map(|_| Block {
                c_q: linear(a, w),
                c_k: linear(a, w),
                c_v: linear(a, w),
                attn_proj: zeros(w, a),
                c_fc: linear(4 * w, w),
                mlp_proj: zeros(w, 4 * w),
            })
            .collect();
        // nanochat 2026's init: residual 1.15 → 1.05 and embedding 0.20 → 0.05 from the first
        // layer to the last (no random draws, so the other weights stay as they were).
        let scalars = config.scalars.then(|| {
            let n = config.depth;
            let frac = |i: i64| i as f64 / (n - 1).max(1) as f64;
            let resid: Vec<f32> = (0..n).map(|i| (1.15 - 0.10 * frac(i)) as f32).collect();
            let x0: Vec<f32> = (0..n).map(|i| (0.20 - 0.15 * frac(i)) as f32).collect();
            (
                Tensor::from_slice(&resid).to_device(device),
                Tensor::from_slice(&x0).to_device(device),
            )
        });
        let model = Self {
            config,
            wte,
            blocks,
            lm_head: zeros(config.vocab_size, w),
            scalars,
        };
        for (_, p) in model.named_parameters() {
            let _ = p.set_requires_grad(true);
        }
        model
    }

    /// Every parameter with nanochat's state-dict name, in a fixed order.
    pub fn named_parameters(&self) -> Vec<(String, &Tensor)> {
        let mut out = vec![("transformer.wte.weight".to_string(), &self.wte)];
        for (i, b) in self.blocks.iter().enumerate() {
            let p = |n: &str| format!("transformer.h.{i}.{n}.weight");
            out.push((p("attn.c_q"), &b.c_q));
            out.push((p("attn.c_k"), &b.c_k));
            out.push((p("attn.c_v"), &b.c_v));
            out.push((p("attn.c_proj"), &b.attn_proj));
            out.push((p("mlp.c_fc"), &b.c_fc));
            out.push((p("mlp.c_proj"), &b.mlp_proj));
        }
        out.push(("lm_head.weight".to_string(), &self.lm_head));
        if let Some((resid, x0)) = &self.scalars {
            out.push(("resid_lambdas".to_string(), resid));
            out.push(("x0_lambdas".to_string(), x0));
        }
        out
    }

    /// Block `layer`'s input: `x` itself, or with the scalars `resid[layer]·x + x0[layer]·x0`.
    fn block_input(&self, x: Tensor, x0: &Tensor, layer: usize, kind: Kind) -> Tensor {
        match &self.scalars {
            None => x,
            Some((resid, lx0)) => {
                let i = layer as i64;
                x * resid.get(i).to_kind(kind) + x0 * lx0.get(i).to_kind(kind)
            }
        }
    }

    /// Copies weights (by nanochat's names) into this model, checking names and shapes.
    pub fn load_weights(
        &mut self,
        weights: &std::collections::BTreeMap<String, Tensor>,
    ) -> anyhow::Result<()> {
        tch::no_grad(|| {
            for (name, p) in self.named_parameters() {
                let t = weights
                    .get(&name)
                    .ok_or_else(|| anyhow::anyhow!("checkpoint lacks the weight {name}"))?;
                if t.size() != p.size() {
                    anyhow::bail!("{name} has shape {:?}, the model {:?}", t.size(), p.size());
                }
                p.shallow_clone().copy_(t);
            }
            Ok(())
        })
    }

    pub fn device(&self) -> Device {
        self.wte.device()
    }

    /// bf16 on CUDA, as nanochat's autocast; fp32 elsewhere.
    pub fn compute_kind(&self) -> Kind {
        if self.device().is_cuda() {
            Kind::BFloat16
        } else {
            Kind::Float
        }
    }

    /// The normed token embeddings of `idx` in the compute precision `kind`.
    fn embed(&self, idx: &Tensor, kind: Kind) -> Tensor {
        norm(&Tensor::embedding(
            &self.wte.to_kind(kind),
            idx,
            -1,
            false,
            false,
        ))
    }

    /// Logits `[B, T, vocab]` in fp32 for token ids `[B, T]`, optionally continuing a KV cache.
    // `x = x + …` stays out of place: autograd saved `x` for the backward of `norm(&x)`.
    #[allow(clippy::assign_op_pattern)]
    pub fn forward(&self, idx: &Tensor, mut cache: Option<&mut KvCache>) -> Tensor {
        let kind = self.compute_kind();
        let (b, t) = idx.size2().expect("idx must be [B, T]");
        let start = cache.as_ref().map_or(0, |c| c.pos);
        let (cos, sin) = rotary_tables(start, t, self.config.rope_base, idx.device(), kind);
        let (h, d) = (self.config.heads(), HEAD_DIM);
        let mut x = self.embed(idx, kind);
        let x0 = x.shallow_clone();
        for (layer, blk) in self.blocks.iter().enumerate() {
            x = self.block_input(x, &x0, layer, kind);
            let xn = norm(&x);
            let q = xn.matmul(&blk.c_q.to_kind(kind).tr()).view([b, t, h, d]);
            let k = xn.matmul(&blk.c_k.to_kind(kind).tr()).view([b, t, h, d]);
            let v = xn.matmul(&blk.c_v.to_kind(kind).tr()).view([b, t, h, d]);
            let q = norm(&apply_rotary(&q, &cos, &sin)).transpose(1, 2);
            let k = norm(&apply_rotary(&k, &cos, &sin)).transpose(1, 2);
            let v = v.transpose(1, 2);
            let (k, v, causal) = match cache.as_deref_mut() {
                None => (k, v, true),
                Some(c) => {
                    let (k, v) = match c.layers[layer].take() {
                        None => (k, v),
                        Some((pk, pv)) => (Tensor::cat(&[pk, k], 2), Tensor::cat(&[pv, v], 2)),
                    };
                    c.layers[layer] = Some((k.shallow_clone(), v.shallow_clone()));
                    // A prompt attends causally; a single new token attends to everything cached.
                    (k, v, t > 1)
                }
            };
            let y = Tensor::scaled_dot_product_attention(
                &q,
                &k,
                &v,
                None::<Tensor>,
                0.0,
                causal,
                None,
                false,
            );
            let y = y.transpose(1, 2).contiguous().view([b, t, h * d]);
            x = x + y.matmul(&blk.attn_proj.to_kind(kind).tr());
            let hidden = norm(&x)
                .matmul(&blk.c_fc.to_kind(kind).tr())
                .relu()
                .square();
            x = x + hidden.matmul(&blk.mlp_proj.to_kind(kind).tr());
        }
        if let Some(c) = cache {
            c.pos += t;
        }
        let logits = norm(&x)
            .matmul(&self.lm_head.to_kind(kind).tr())
            .to_kind(Kind::Float);
        (logits / SOFTCAP).tanh() * SOFTCAP
    }

    /// Logits like [`Gpt::forward`] (no cache) with the blocks run by csrc/block.cpp.
    pub fn forward_blocks(&self, idx: &Tensor, runner: &BlockRunner) -> anyhow::Result<Tensor> {
        let kind = self.compute_kind();
        let (b, t) = idx.size2().expect("idx must be [B, T]");
        let (cos, sin) = rotary_tables(0, t, self.config.rope_base, idx.device(), kind);
        let (cos, sin) = (cos.view([t, HEAD_DIM / 2]), sin.view([t, HEAD_DIM / 2]));
        let c = self.config.width();
        let mut x = self.embed(idx, kind).view([b * t, c]);
        let x0 = x.shallow_clone();
        for (layer, (blk, v)) in self.blocks.iter().zip(&runner.blocks).enumerate() {
            let scalars = self.scalars.as_ref().map(|(r, x0s)| block::Scalars {
                x0: &x0,
                r,
                x0s,
                layer,
            });
            let mode = block::BlockMode {
                fused: runner.fused,
                recompute: v.recompute,
                cudnn: runner.cudnn,
                keep_act: runner.keep_act,
                f8_dynamic: runner.f8_dynamic,
                f8_wgrad: runner.f8_wgrad,
            };
            x = block::block(
                &x,
                v,
                blk,
                (&cos, &sin),
                scalars,
                b,
                self.config.heads(),
                mode,
            )?;
        }
        let logits = norm(&x)
            .matmul(&self.lm_head.to_kind(kind).tr())
            .to_kind(Kind::Float)
            .view([b, t, self.config.vocab_size]);
        Ok((logits / SOFTCAP).tanh() * SOFTCAP)
    }

    /// Mean cross-entropy over targets that are not `ignore` (nats), as nanochat's training loss.
    pub fn loss(&self, idx: &Tensor, targets: &Tensor) -> Tensor {
        self.loss_with(idx, targets, tch::Reduction::Mean, -1)
    }

    /// Cross-entropy with a chosen reduction; targets equal to `ignore_index` do not count.
    pub fn loss_with(
        &self,
        idx: &Tensor,
        targets: &Tensor,
        reduction: tch::Reduction,
        ignore_index: i64,
    ) -> Tensor {
        let logits = self.forward(idx, None);
        cross_entropy(&logits, targets, reduction, ignore_index)
    }

    /// [`Gpt::loss`] through [`Gpt::forward_blocks`].
    pub fn loss_blocks(
        &self,
        idx: &Tensor,
        targets: &Tensor,
        runner: &BlockRunner,
    ) -> anyhow::Result<Tensor> {
        let logits = self.forward_blocks(idx, runner)?;
        Ok(cross_entropy(&logits, targets, tch::Reduction::Mean, -1))
    }
}

fn cross_entropy(
    logits: &Tensor,
    targets: &Tensor,
    reduction: tch::Reduction,
    ignore_index: i64,
) -> Tensor {
    let v = *logits.size().last().expect("logits");
    logits.view([-1, v]).cross_entropy_loss(
        &targets.reshape([-1]),
        None::<Tensor>,
        reduction,
        ignore_index,
        0.0,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cached_decoding_matches_full_forward() {
        let _seed = SEED_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        let model = Gpt::new(GptConfig::new(2, 32), Device::Cpu, 7);
        // Perturb the zero-initialised projections so attention actually mixes positions.
        tch::no_grad(|| {
            for (_, p) in model.named_parameters() {
                let _ = p.shallow_clone().g_add_(&(p.randn_like() * 0.02));
            }
        });
        let idx = Tensor::from_slice(&[17i64, 1, 2, 10, 3, 16, 4, 5]).view([1, 8]);
        let full = tch::no_grad(|| model.forward(&idx, None));
        let mut cache = KvCache::new(2);
        let prompt = tch::no_grad(|| model.forward(&idx.narrow(1, 0, 5), Some(&mut cache)));
        let mut steps = vec![prompt];
        for i in 5..8 {
            steps.push(tch::no_grad(|| {
                model.forward(&idx.narrow(1, i, 1), Some(&mut cache))
            }));
        }
        let cached = Tensor::cat(&steps, 1);
        let diff = (full - cached).abs().max().double_value(&[]);
        assert!(diff < 1e-4, "cached decoding differs by {diff}");
    }
}
