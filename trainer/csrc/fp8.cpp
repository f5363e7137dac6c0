// FP8 casts and products of fp8.h, and `charlm_fp8_weights`, which makes the e4m3 copies of one
// block's matrices once per optimizer step.
#include "fp8.h"

#include <cstdint>

#include <cmath>
#include <vector>

#include "driver.h"
#include "guarded.h"
#include "ops.h"

namespace charlm {

using at::Tensor;

namespace {
// nanochat's floor under an amax (an all-zero tensor then casts to zeros).
constexpr double kAmaxFloor = 1e-12;
}  // namespace

at::ScalarType f8_dtype(F8Format f) {
  return f == kE5M2 ? at::kFloat8_e5m2 : at::kFloat8_e4m3fn;
}

double f8_max(F8Format f) { return f == kE5M2 ? 57344.0 : 448.0; }

bool inline_f8(const Slot* s, bool fused) {
  return s != nullptr && s->defined() && fused && !s->dynamic;
}

F8Args f8_args(const Slot* s, bool fused, const Tensor& like, Tensor* out8) {
  F8Args a;
  if (!inline_f8(s, fused)) return a;
  *out8 = at::empty(like.sizes(), like.options().dtype(f8_dtype(s->fmt)));
  a.out = out8->data_ptr();
  a.scale = s->scale.data_ptr();
  a.amax = s->amax.data_ptr();
  a.fmt = s->fmt;
  return a;
}

void finish_f8(const Slot* s, bool fused, const Tensor& x, Tensor* out8) {
  if (s != nullptr && s->defined() && !inline_f8(s, fused)) *out8 = cast_f8(x, *s, fused);
}

Tensor cast_f8(const Tensor& x, const Slot& s, bool fused) {
  TORCH_CHECK(s.defined(), "cast_f8 without a slot");
  const double fmax = f8_max(s.fmt);
  if (s.dynamic) {
    // One reduction, no |x| temporary: the infinity norm is the amax.
    Tensor m = at::linalg_vector_norm(x, INFINITY, at::OptionalIntArrayRef{}, false, at::kFloat);
    s.amax.copy_(at::maximum(s.amax, m));
    s.scale.copy_(at::reciprocal(at::clamp_min(m, kAmaxFloor)) * fmax);
    s.inv.copy_(at::reciprocal(s.scale));
  }
  Tensor xc = x.contiguous();
  if (!fused) {
    if (!s.dynamic) {
      s.amax.copy_(at::maximum(s.amax, at::amax(at::abs(xc)).to(at::kFloat)));
    }
    return (xc.to(at::kFloat) * s.scale).clamp(-fmax, fmax).to(f8_dtype(s.fmt));
  }
  require_fusable(xc, "an FP8 cast's input");
  TORCH_CHECK(xc.numel() % 8 == 0 && aligned16(xc), "cast_f8: layout");
  Tensor out = at::empty(xc.sizes(), xc.options().dtype(f8_dtype(s.fmt)));
#ifdef CHARLM_WITH_CUDA
  const void* xp = xc.data_ptr();
  void* op = out.data_ptr();
  int64_t n8 = xc.numel() / 8;
  const void* sp = s.scale.data_ptr();
  // Dynamic scaling has counted the amax already.
  void* ap = s.dynamic ? nullptr : s.amax.data_ptr();
  int fmt = s.fmt;
  void* args[] = {&xp, &op, &n8, &sp, &ap, &fmt};
  launch(xc, kCastF8, n8, 256, args);
#endif
  return out;
}

namespace {

// cuBLASLt refuses (CUBLAS_STATUS_NOT_SUPPORTED) scale pointers that are not 16-byte aligned
// (pytorch/pytorch#159957), and the scales are 4-byte entries of the per-block state; a misaligned
// one is copied to a fresh, 256-byte aligned allocation (one 4-byte device copy).
Tensor aligned_scale(const Tensor& s) {
  return reinterpret_cast<uintptr_t>(s.data_ptr()) % 16 == 0 ? s : s.clone();
}

}  // namespace

Tensor scaled_mm(const Tensor& a8, const Tensor& inv_a, const Tensor& b8, const Tensor& inv_b,
                 at::ScalarType out, bool fast_accum) {
  return at::_scaled_mm(a8, b8.t(), aligned_scale(inv_a), aligned_scale(inv_b), {}, {}, out,
                        fast_accum);
}

}  // namespace charlm

using namespace charlm;

extern "C" {

// One block's matrices to e4m3, each with the tensorwise scale 448 / amax (q, k and v share one:
// they are one product): w = q, k, v, o, fc, p (fp32 [out, in]); out = qkv8 [3A, C], o8, fc8, p8
// ([out, in]), then their transposes qkv8t [C, 3A], o8t, fc8t, p8t ([in, out]); inv [4] receives
// 1/scale of qkv, o, fc, p. fused: the CUDA kernel; else ATen ops (the CPU).
char* charlm_fp8_weights(const at::Tensor* const* w, const at::Tensor* const* out,
                         const at::Tensor* inv, int fused) {
  return guarded([&] {
    std::vector<Tensor> ws, os;
    for (int i = 0; i < 6; ++i) ws.push_back(arg(w, i));
    for (int i = 0; i < 8; ++i) os.push_back(arg(out, i));
    for (const Tensor& t : ws) {
      TORCH_CHECK(t.scalar_type() == at::kFloat && t.dim() == 2 && t.is_contiguous(),
                  "fp8 weights: the masters must be contiguous fp32 matrices");
    }
    for (const Tensor& t : os) {
      TORCH_CHECK(t.scalar_type() == at::kFloat8_e4m3fn && t.is_contiguous(),
                  "fp8 weights: outputs must be contiguous e4m3");
    }
    const int64_t a = ws[0].size(0);
    std::vector<Tensor> norms;
    for (const Tensor& t : ws) {
      norms.push_back(at::linalg_vector_norm(t, INFINITY, at::OptionalIntArrayRef{}, false));
    }
    Tensor am = at::stack(norms);
    Tensor a4 = at::cat({am.narrow(0, 0, 3).amax(0, true), am.narrow(0, 3, 3)});
    Tensor scale = at::reciprocal(at::clamp_min(a4, kAmaxFloor)) * f8_max(kE4M3);
    inv->copy_(at::reciprocal(scale));
    // (master, scale index, output, its first row, transposed output, its first column)
    struct Part {
      int w, s, o;
      int64_t offset;
    };
    const Part parts[6] = {{0, 0, 0, 0}, {1, 0, 0, a}, {2, 0, 0, 2 * a},
                           {3, 1, 1, 0}, {4, 2, 2, 0}, {5, 3, 3, 0}};
    for (const Part& p : parts) {
      const Tensor& src = ws[p.w];
      const int64_t rows = src.size(0), cols = src.size(1);
      Tensor o = os[p.o], ot = os[p.o + 4];
      TORCH_CHECK(o.size(1) == cols && ot.size(0) == cols && p.offset + rows <= o.size(0) &&
                      p.offset + rows <= ot.size(1),
                  "fp8 weights: shapes");
      if (!fused) {
        Tensor s = scale.select(0, p.s);
        Tensor q = (src * s).clamp(-f8_max(kE4M3), f8_max(kE4M3)).to(at::kFloat8_e4m3fn);
        o.narrow(0, p.offset, rows).copy_(q);
        ot.narrow(1, p.offset, rows).copy_(q.t());
        continue;
      }
      TORCH_CHECK(src.is_cuda(), "fused fp8 weights need CUDA tensors");
#ifdef CHARLM_WITH_CUDA
      const void* sp = src.data_ptr();
      int rows_i = static_cast<int>(rows), cols_i = static_cast<int>(cols);
      void* op = static_cast<uint8_t*>(o.data_ptr()) + p.offset * o.stride(0);
      int64_t o_stride = o.stride(0);
      void* otp = static_cast<uint8_t*>(ot.data_ptr()) + p.offset;
      int64_t ot_stride = ot.stride(0);
      const void* scp = scale.data_ptr<float>() + p.s;
      void* args[] = {&sp, &rows_i, &cols_i, &op, &o_stride, &otp, &ot_stride, &scp};
      const int64_t tiles = ((rows + 31) / 32) * ((cols + 31) / 32);
      launch(src, kWeightF8, tiles * 256, 256, args);
#endif
    }
  });
}

}  // extern "C"
