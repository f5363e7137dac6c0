//! What `auto` becomes on the first micro-batch (or when its size changes): kernels, FP8, the
//! memory plan (bf16 weight cache, recomputation, kept activations), attention and Muon's chunks;
//! and the views each block reads and accumulates into.

use anyhow::{bail, Result};
use tch::{Device, Kind, Tensor};

use super::memory::{plan_keep_activations, plan_memory};
use super::options::{Attention, EngineOptions, Kernels, Precision, Recompute, Resolved, Toggle};
use super::{fp8, require_fp8, Engine, WeightCache};
use crate::model::{BlockRunner, BlockViews};

/// cuDNN and flash attention may differ by bf16 rounding, not more.
const ATTENTION_PROBE_TOLERANCE: f64 = 2e-2;

impl Engine {
    /// Resolves `auto` for micro-batches of `[b, t]` and builds the block views.
    pub fn prepare(&mut self, b: i64, t: i64) -> Result<Resolved> {
        if let Some((rb, rt, r)) = self.resolved {
            if (rb, rt) == (b, t) {
                return Ok(r);
            }
        }
        let device = self.model.device();
        let config = self.model.config;
        let kernels = match self.options.kernels {
            Kernels::Auto => match device {
                Device::Cuda(i) if crate::model::block::status(i).is_ok() => Kernels::Fused,
                _ => Kernels::Eager,
            },
            Kernels::Fused => match device {
                Device::Cuda(i) => {
                    crate::model::block::status(i)?;
                    Kernels::Fused
                }
                _ => bail!("--kernels fused needs a CUDA GPU; use eager or auto on the CPU"),
            },
            k => k,
        };
        let fp8 = match self.options.precision {
            Precision::Bf16 => false,
            Precision::Fp8 => {
                if kernels == Kernels::Reference {
                    bail!(
                        "--precision fp8 runs on the block path, which --kernels reference does not \
                         use: use --kernels auto, fused or eager"
                    );
                }
                require_fp8(device)?;
                fp8::eligible(&config)
            }
        };
        // FP8 products always keep their e4m3 weights: as many bytes as the bf16 cache.
        let plan_options = EngineOptions {
            weight_cache: if fp8 {
                Toggle::On
            } else {
                self.options.weight_cache
            },
            ..self.options
        };
        let (weight_cache, recompute_blocks) = match (kernels, device) {
            (Kernels::Reference, _) => (false, 0),
            (_, Device::Cuda(_)) => {
                let total = crate::sys::cuda::total_memory(device).unwrap_or(0) as f64;
                plan_memory(&config, b, t, total, &plan_options, self.muon.shard().count)
            }
            // The CPU computes in fp32: the parameters are already the compute kind.
            _ => match self.options.recompute {
                Recompute::Auto => (false, 0),
                Recompute::Blocks(r) => (false, r.min(config.depth)),
            },
        };
        let keep_activations = match (kernels, self.options.keep_activations) {
            (Kernels::Reference, _) | (_, Toggle::Off) => false,
            (_, Toggle::On) => true,
            (_, Toggle::Auto) => match device {
                Device::Cuda(_) if recompute_blocks == 0 => {
                    let total = crate::sys::cuda::total_memory(device).unwrap_or(0) as f64;
                    let ranks = self.muon.shard().count;
                    plan_keep_activations(&config, b, t, total, weight_cache, ranks)
                }
                _ => false,
            },
        };
        let attention = match (kernels, device, self.options.attention) {
            (Kernels::Reference, _, _) | (_, Device::Cpu, _) => Attention::Flash,
            (_, Device::Cuda(i), Attention::Auto) => {
                match crate::model::block::attention_probe(1, config.heads(), t, i) {
                    Ok(rel) if rel <= ATTENTION_PROBE_TOLERANCE => Attention::Cudnn,
                    Ok(rel) => {
                        eprintln!("attention: cuDNN differs from flash attention by {rel:.2e}; using flash");
                        Attention::Flash
                    }
                    Err(e) => {
                        eprintln!("attention: cuDNN unavailable ({e:#}); using flash");
                        Attention::Flash
                    }
                }
            }
            (_, _, a) => a,
        };
        let muon_chunk_bytes = if kernels == Kernels::Reference {
            0
        } else if recompute_blocks > 0 || !weight_cache {
            512 << 20
        } else {
            2 << 30
        };
        let fp8_products = if fp8 { 4 * config.depth } else { 0 };
        let resolved = Resolved {
            kernels,
            recompute_blocks,
            weight_cache,
            muon_chunk_bytes,
            attention,
            keep_activations,
            precision: self.options.precision,
            products: 4 * config.depth + 1,
            fp8_products,
            fp8_weight_grads: fp8 && self.options.fp8_weight_grads == Precision::Fp8,
        };
        self.muon.fused = kernels != Kernels::Reference;
        self.muon.cuda_kernels = kernels == Kernels::Fused;
        self.muon.chunk_bytes = muon_chunk_bytes;
        self.fp8 = fp8.then(|| fp8::Fp8State::new(&config, device));
        // The bf16 copy only where bf16 products read it.
        self.cache = (weight_cache && !fp8).then(|| WeightCache {
            stacks: self
                .muon
                .grads()
                .iter()
                .map(|g| g.zeros_like().to_kind(Kind::BFloat16))
                .collect(),
            dirty: std::cell::Cell::new(true),
        });
        self.runner = (kernels != Kernels::Reference)
            .then(|| self.block_runner(&resolved))
            .transpose()?;
        self.resolved = Some((b, t, resolved));
        Ok(resolved)
    }

    fn block_runner(&self, r: &Resolved) -> Result<BlockRunner> {
        let config = self.model.config;
        let (c, a) = (config.width(), config.heads() * config.head_dim());
        let grads = self.muon.grads();
        let mut blocks = Vec::new();
        for (i, blk) in self.model.blocks.iter().enumerate() {
            let locate = |n: &str| {
                let name = format!("transformer.h.{i}.{n}.weight");
                self.muon
                    .locate(&name)
                    .ok_or_else(|| anyhow::anyhow!("{name} is not a Muon matrix"))
            };
            let (gq, iq) = locate("attn.c_q")?;
            if locate("attn.c_k")? != (gq, iq + 1) || locate("attn.c_v")? != (gq, iq + 2) {
                bail!("block {i}: q, k and v are not adjacent in one Muon group");
            }
            // The compute-kind copy when cached, else the fp32 parameter (cast on use).
            let weight = |n: &str, own: &Tensor| -> Result<Tensor> {
                let (g, idx) = locate(n)?;
                Ok(match &self.cache {
                    Some(cache) => cache.stacks[g].get(idx),
                    None => own.shallow_clone(),
                })
            };
            let grad = |n: &str| -> Result<Tensor> {
                let (g, idx) = locate(n)?;
                Ok(grads[g].get(idx))
            };
            blocks.push(BlockViews {
                wqkv: self
                    .cache
                    .as_ref()
                    .map(|cache| cache.stacks[gq].narrow(0, iq, 3).view([3 * a, c])),
                wo: weight("attn.c_proj", &blk.attn_proj)?,
                wfc: weight("mlp.c_fc", &blk.c_fc)?,
                wp: weight("mlp.c_proj", &blk.mlp_proj)?,
                gqkv: grads[gq].narrow(0, iq, 3).view([3 * a, c]),
                go: grad("attn.c_proj")?,
                gfc: grad("mlp.c_fc")?,
                gp: grad("mlp.c_proj")?,
                recompute: (i as i64) < r.recompute_blocks,
                fp8: self.fp8.as_ref().map(|f| f.views[i].shallow_clone()),
            });
        }
        Ok(BlockRunner {
            fused: r.kernels == Kernels::Fused,
            cudnn: r.attention == Attention::Cudnn,
            keep_act: r.keep_activations,
            f8_dynamic: false,
            f8_wgrad: r.fp8_weight_grads,
            blocks,
        })
    }
}
