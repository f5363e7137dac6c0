// The block's elementwise steps, each as one fused CUDA kernel (kernels.cu) or as its eager ATen
// twin with the same math, chosen by `fused`. Every rmsnorm computes in fp32 and rounds once, like
// ATen's rms_norm; so do the fused kernels.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <utility>

namespace charlm {

// ATen's rms_norm default: the epsilon of float, the type it computes in for bf16 and fp32.
constexpr double kEps = 1.1920928955078125e-07;
constexpr int64_t kHead = 128;

using at::Tensor;

// (y, rstd) for rows of x [N, C].
std::pair<Tensor, Tensor> rmsnorm_fwd(const Tensor& x, bool fused);

// dres + backward of the row norm, from its output y and factor rstd.
Tensor rmsnorm_bwd(const Tensor& dy, const Tensor& y, const Tensor& rstd, const Tensor& dres,
                   bool fused);

// Rotary + per-head rmsnorm of the q and k parts of qkv [N, 3A], in place; returns rstd [N, 2H].
Tensor rope_norm_fwd_(Tensor& qkv, const Tensor& cos, const Tensor& sin, int64_t seq,
                      int64_t heads, bool fused);

// Backward of rope_norm_fwd_ for q and k, plus v's gradient, gathered into [N, 3A]. dq4, dk4, dv4
// are [B, H, T, 128] (any strides with a contiguous last dim); qkv holds the saved normalized q, k.
Tensor rope_norm_bwd(const Tensor& dq4, const Tensor& dk4, const Tensor& dv4, const Tensor& qkv,
                     const Tensor& rstd, const Tensor& cos, const Tensor& sin, int64_t seq,
                     int64_t heads, bool fused);

Tensor relu2_fwd(const Tensor& h, bool fused);

// (a = relu(h)², dh = 2·da·h where h > 0); the fused kernel writes dh over da. Without
// `need_a` (the forward kept a) only dh is computed and a is undefined.
std::pair<Tensor, Tensor> relu2_bwd(const Tensor& h, Tensor da, bool fused, bool need_a = true);

// The tensor behind a pointer Rust handed over (NULL: undefined), detached from autograd.
inline Tensor arg(const at::Tensor* const* t, int i) {
  return t[i] == nullptr ? Tensor() : t[i]->detach();
}

}  // namespace charlm
