// Causal attention for the block: flash attention or cuDNN's on CUDA (the kernels SDPA picks),
// plain math on the CPU; the forward's outputs are what the backward takes.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <tuple>

namespace charlm {

struct Attention {
  at::Tensor y4;  // [B, H, T, D]
  at::Tensor lse, cum_q, cum_k, seed, offset;
  int64_t max_q = 0, max_k = 0;
};

// [N, H·D] (row stride free) → [B, H, T, D] without copying.
at::Tensor view4(const at::Tensor& t2, int64_t batch, int64_t heads);

at::Tensor cpu_probs(const at::Tensor& q4, const at::Tensor& k4);
Attention attn_fwd(const at::Tensor& q4, const at::Tensor& k4, const at::Tensor& v4, bool cudnn);
std::tuple<at::Tensor, at::Tensor, at::Tensor> attn_bwd(const at::Tensor& dy4, const at::Tensor& q4,
                                                        const at::Tensor& k4, const at::Tensor& v4,
                                                        const Attention& a, bool cudnn);

}  // namespace charlm
