// FP8 matrix products for the block (--precision fp8): tensorwise scales, e4m3 for activations and
// weights, e5m2 for gradients, products through libtorch's at::_scaled_mm (cuBLASLt on Hopper).
//
// A `Slot` is one tensor role of one block (say, "the input of the MLP's up projection"): the
// scale its values are multiplied by before the saturating cast, the inverse that _scaled_mm
// multiplies the product by, and the largest |value| cast so far in this micro-batch. With delayed
// scaling the scale comes from earlier micro-batches' amax (src/engine/fp8.rs rolls it), so the
// kernel that produces a tensor also writes its FP8 copy in the same pass; with dynamic scaling
// (the first steps of a run, and every eager twin of a dynamic cast) the scale is this tensor's
// own amax, nanochat's tensorwise recipe, which costs a reduction over the tensor first.
#pragma once

#include <ATen/ATen.h>

namespace charlm {

enum F8Format : int { kE4M3 = 0, kE5M2 = 1 };

at::ScalarType f8_dtype(F8Format f);
double f8_max(F8Format f);

struct Slot {
  at::Tensor scale, inv, amax;  // 0-dim fp32 views on the device of the tensors cast
  F8Format fmt = kE4M3;
  bool dynamic = false;
  bool defined() const { return scale.defined(); }
};

// The kernel arguments of an optional FP8 output (all NULL: none).
struct F8Args {
  void* out = nullptr;
  const void* scale = nullptr;
  void* amax = nullptr;
  int fmt = 0;
};

// Whether a fused kernel writes the FP8 copy of its output itself: only with delayed scaling, when
// the scale is known before the output is.
bool inline_f8(const Slot* s, bool fused);

// For a fused kernel whose output looks like `like`: allocates *out8 and returns the kernel's FP8
// arguments when it writes the copy inline, else NULL arguments.
F8Args f8_args(const Slot* s, bool fused, const at::Tensor& like, at::Tensor* out8);

// After an op whose output is x: when the copy was not written inline, casts it now.
void finish_f8(const Slot* s, bool fused, const at::Tensor& x, at::Tensor* out8);

// The FP8 copy of x (contiguous) in s's format, s.amax raised to max |x|. Dynamic: s.scale and
// s.inv are set from x's own amax first. fused: one kernel (bf16 CUDA x); else ATen ops.
at::Tensor cast_f8(const at::Tensor& x, const Slot& s, bool fused);

// (a8 · b8ᵀ) · inv_a · inv_b in `out` precision; a8 [M, K] and b8 [N, K] row-major, so that b8ᵀ is
// the column-major operand cuBLASLt's FP8 products need.
at::Tensor scaled_mm(const at::Tensor& a8, const at::Tensor& inv_a, const at::Tensor& b8,
                     const at::Tensor& inv_b, at::ScalarType out, bool fast_accum);

}  // namespace charlm
