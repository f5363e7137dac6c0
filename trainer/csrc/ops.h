// The block's elementwise steps, each as one fused CUDA kernel (kernels.cu) or as its eager ATen
// twin with the same math, chosen by `fused`. Every rmsnorm computes in fp32 and rounds once, like
// ATen's rms_norm; so do the fused kernels.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <tuple>
#include <utility>

#include "fp8.h"

namespace charlm {

// ATen's rms_norm default: the epsilon of float, the type it computes in for bf16 and fp32.
constexpr double kEps = 1.1920928955078125e-07;
constexpr int64_t kHead = 128;

using at::Tensor;

// Each step that produces a tensor a matrix product reads can also write its FP8 copy: given a
// defined slot `f8`, *out8 receives it (in the same kernel with delayed scaling, else by
// cast_f8 after the step).

// (y, rstd) for rows of x [N, C].
std::pair<Tensor, Tensor> rmsnorm_fwd(const Tensor& x, bool fused, const Slot* f8 = nullptr,
                                      Tensor* y8 = nullptr);

// dres + backward of the row norm, from its output y and factor rstd.
Tensor rmsnorm_bwd(const Tensor& dy, const Tensor& y, const Tensor& rstd, const Tensor& dres,
                   bool fused, const Slot* f8 = nullptr, Tensor* dx8 = nullptr);

// Rotary + per-head rmsnorm of the q and k parts of qkv [N, 3A], in place; returns rstd [N, 2H].
Tensor rope_norm_fwd_(Tensor& qkv, const Tensor& cos, const Tensor& sin, int64_t seq,
                      int64_t heads, bool fused);

// Backward of rope_norm_fwd_ for q and k, plus v's gradient, gathered into [N, 3A]. dq4, dk4, dv4
// are [B, H, T, 128] (any strides with a contiguous last dim); qkv holds the saved normalized q, k.
Tensor rope_norm_bwd(const Tensor& dq4, const Tensor& dk4, const Tensor& dv4, const Tensor& qkv,
                     const Tensor& rstd, const Tensor& cos, const Tensor& sin, int64_t seq,
                     int64_t heads, bool fused, const Slot* f8 = nullptr,
                     Tensor* out8 = nullptr);

// relu(h)²; without `want_a` only the FP8 copy is wanted and the result may be undefined.
Tensor relu2_fwd(const Tensor& h, bool fused, bool want_a = true, const Slot* f8 = nullptr,
                 Tensor* a8 = nullptr);

// (a = relu(h)², dh = 2·da·h where h > 0); the fused kernel writes dh over da. Without
// `need_a` (the forward kept a) only dh is computed and a is undefined. f8/dh8: dh's FP8 copy.
std::pair<Tensor, Tensor> relu2_bwd(const Tensor& h, Tensor da, bool fused, bool need_a = true,
                                    const Slot* f8 = nullptr, Tensor* dh8 = nullptr);

// nanochat 2026's per-layer scalars before block `layer` (mix.cpp): xin = r[layer]·x +
// x0s[layer]·x0, with r and x0s fp32 [depth] on the stream's device.
Tensor mix_fwd(const Tensor& x, const Tensor& x0, const Tensor& r, const Tensor& x0s,
               int64_t layer, bool fused);

// Its backward for xin's gradient g: (gx, gx0, [Σ g·x, Σ g·x0] fp32).
std::tuple<Tensor, Tensor, Tensor> mix_bwd(const Tensor& g, const Tensor& x, const Tensor& x0,
                                           const Tensor& r, const Tensor& x0s, int64_t layer,
                                           bool fused);

// The mix then the row norm of xin (one kernel where the block-per-row norm runs): (xin, y, rstd).
std::tuple<Tensor, Tensor, Tensor> mix_rmsnorm_fwd(const Tensor& x, const Tensor& x0,
                                                   const Tensor& r, const Tensor& x0s,
                                                   int64_t layer, bool fused,
                                                   const Slot* f8 = nullptr,
                                                   Tensor* y8 = nullptr);

// The row norm's backward with dres, then the mix's: (gx, gx0, sums) as mix_bwd.
std::tuple<Tensor, Tensor, Tensor> rmsnorm_mix_bwd(const Tensor& dy, const Tensor& y,
                                                   const Tensor& rstd, const Tensor& dres,
                                                   const Tensor& x, const Tensor& x0,
                                                   const Tensor& r, const Tensor& x0s,
                                                   int64_t layer, bool fused);

// The tensor behind a pointer Rust handed over (NULL: undefined), detached from autograd.
inline Tensor arg(const at::Tensor* const* t, int i) {
  return t[i] == nullptr ? Tensor() : t[i]->detach();
}

}  // namespace charlm
