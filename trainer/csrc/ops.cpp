// The block's elementwise steps (ops.h), fused or eager, and `charlm_fused_op`, which runs one of
// them on its own for the checks of `bench --check` and the tests.
#include "ops.h"

#include <vector>

#include "driver.h"
#include "guarded.h"

namespace charlm {

using at::Tensor;


// (y, rstd) for rows of x [N, C].
std::pair<Tensor, Tensor> rmsnorm_fwd(const Tensor& x, bool fused, const Slot* f8, Tensor* y8) {
  if (!fused) {
    Tensor xf = x.to(at::kFloat);
    Tensor r = at::rsqrt(xf.square().mean({-1}, true) + kEps);
    Tensor y = (xf * r).to(x.scalar_type());
    finish_f8(f8, false, y, y8);
    return {y, r.squeeze(-1)};
  }
  require_fusable(x, "rmsnorm input");
  Tensor xc = x.contiguous();
  const int64_t rows = xc.size(0);
  int cols = static_cast<int>(xc.size(1));
  TORCH_CHECK(cols % 8 == 0 && aligned16(xc), "rmsnorm: width must be a multiple of 8");
  Tensor y = at::empty_like(xc);
  Tensor rstd = at::empty({rows}, xc.options().dtype(at::kFloat));
  F8Args f = f8_args(f8, true, xc, y8);
#ifdef CHARLM_WITH_CUDA
  const void* xp = xc.data_ptr();
  void* yp = y.data_ptr();
  void* rp = rstd.data_ptr();
  float eps = static_cast<float>(kEps);
  void* args[] = {&xp, &yp, &rp, const_cast<int64_t*>(&rows), &cols, &eps,
                  &f.out, &f.scale, &f.amax, &f.fmt};
  if (row_norm(cols)) {
    launch(xc, kRmsFwdReg, rows * (cols / 8), cols / 8, args);
  } else {
    launch(xc, kRmsFwd, rows * 32, 128, args);
  }
#endif
  finish_f8(f8, true, y, y8);
  return {y, rstd};
}

// dres + backward of the row norm, from its output y and factor rstd.
Tensor rmsnorm_bwd(const Tensor& dy, const Tensor& y, const Tensor& rstd, const Tensor& dres,
                   bool fused, const Slot* f8, Tensor* dx8) {
  if (!fused) {
    Tensor dyf = dy.to(at::kFloat), yf = y.to(at::kFloat);
    Tensor mean = (dyf * yf).mean({-1}, true);
    Tensor dx = rstd.unsqueeze(-1) * (dyf - yf * mean);
    if (dres.defined()) dx = dres.to(at::kFloat) + dx;
    dx = dx.to(dy.scalar_type());
    finish_f8(f8, false, dx, dx8);
    return dx;
  }
  require_fusable(dy, "rmsnorm gradient");
  Tensor dyc = dy.contiguous(), yc = y.contiguous(), rc = rstd.contiguous();
  Tensor resc = dres.defined() ? dres.contiguous() : Tensor();
  const int64_t rows = dyc.size(0);
  int cols = static_cast<int>(dyc.size(1));
  TORCH_CHECK(cols % 8 == 0 && aligned16(dyc) && aligned16(yc) && (!resc.defined() || aligned16(resc)),
              "rmsnorm backward: width must be a multiple of 8");
  Tensor dx = at::empty_like(dyc);
  F8Args f = f8_args(f8, true, dyc, dx8);
#ifdef CHARLM_WITH_CUDA
  const void* a = dyc.data_ptr();
  const void* b = yc.data_ptr();
  const void* r = rc.data_ptr();
  const void* c = resc.defined() ? resc.data_ptr() : nullptr;
  void* o = dx.data_ptr();
  void* args[] = {&a, &b, &r, &c, &o, const_cast<int64_t*>(&rows), &cols,
                  &f.out, &f.scale, &f.amax, &f.fmt};
  if (row_norm(cols)) {
    launch(dyc, kRmsBwdReg, rows * (cols / 8), cols / 8, args);
  } else {
    launch(dyc, kRmsBwd, rows * 32, 128, args);
  }
#endif
  finish_f8(f8, true, dx, dx8);
  return dx;
}

// Rotary + per-head rmsnorm of the q and k parts of qkv [N, 3A], in place; returns rstd [N, 2H].
Tensor rope_norm_fwd_(Tensor& qkv, const Tensor& cos, const Tensor& sin, int64_t seq,
                      int64_t heads, bool fused) {
  const int64_t n = qkv.size(0), a = heads * kHead;
  if (!fused) {
    Tensor qk = qkv.narrow(1, 0, 2 * a).view({n / seq, seq, 2 * heads, kHead});
    Tensor f = qk.to(at::kFloat);
    Tensor x1 = f.narrow(-1, 0, kHead / 2), x2 = f.narrow(-1, kHead / 2, kHead / 2);
    Tensor c = cos.to(at::kFloat).view({1, seq, 1, kHead / 2});
    Tensor s = sin.to(at::kFloat).view({1, seq, 1, kHead / 2});
    Tensor y = at::cat({x1 * c + x2 * s, -x1 * s + x2 * c}, -1);
    Tensor r = at::rsqrt(y.square().mean({-1}, true) + kEps);
    qk.copy_((y * r).to(qkv.scalar_type()));
    return r.view({n, 2 * heads});
  }
  require_fusable(qkv, "qkv");
  TORCH_CHECK(qkv.is_contiguous() && cos.is_contiguous() && sin.is_contiguous() &&
                  cos.scalar_type() == at::kBFloat16 && sin.scalar_type() == at::kBFloat16,
              "rope_norm: qkv and the tables must be contiguous bf16");
  TORCH_CHECK(cos.size(0) >= seq && cos.size(1) == kHead / 2, "rope_norm: table shape");
  Tensor rstd = at::empty({n, 2 * heads}, qkv.options().dtype(at::kFloat));
#ifdef CHARLM_WITH_CUDA
  void* q = qkv.data_ptr();
  void* r = rstd.data_ptr();
  const void* c = cos.data_ptr();
  const void* s = sin.data_ptr();
  int seq_i = static_cast<int>(seq), heads_i = static_cast<int>(heads);
  int64_t row_stride = qkv.stride(0);
  float eps = static_cast<float>(kEps);
  void* args[] = {&q, &r, &c, &s, const_cast<int64_t*>(&n), &seq_i, &heads_i, &row_stride, &eps};
  launch(qkv, kRopeFwd, n * 2 * heads * 16, 128, args);
#endif
  return rstd;
}

// Backward of rope_norm_fwd_ for q and k, plus v's gradient, gathered into [N, 3A]. dq4, dk4, dv4
// are [B, H, T, 128] (any strides with a contiguous last dim); qkv holds the saved normalized q, k.
Tensor rope_norm_bwd(const Tensor& dq4, const Tensor& dk4, const Tensor& dv4, const Tensor& qkv,
                     const Tensor& rstd, const Tensor& cos, const Tensor& sin, int64_t seq,
                     int64_t heads, bool fused, const Slot* f8, Tensor* out8) {
  const int64_t n = qkv.size(0), a = heads * kHead, b = n / seq;
  if (!fused) {
    Tensor g = at::cat({dq4.transpose(1, 2), dk4.transpose(1, 2)}, 2).to(at::kFloat);
    Tensor z = qkv.narrow(1, 0, 2 * a).view({b, seq, 2 * heads, kHead}).to(at::kFloat);
    Tensor r = rstd.view({b, seq, 2 * heads, 1});
    Tensor gy = r * (g - z * (g * z).mean({-1}, true));
    Tensor g1 = gy.narrow(-1, 0, kHead / 2), g2 = gy.narrow(-1, kHead / 2, kHead / 2);
    Tensor c = cos.to(at::kFloat).view({1, seq, 1, kHead / 2});
    Tensor s = sin.to(at::kFloat).view({1, seq, 1, kHead / 2});
    Tensor gx = at::cat({g1 * c - g2 * s, g1 * s + g2 * c}, -1).to(qkv.scalar_type());
    Tensor out = at::cat({gx.reshape({n, 2 * a}), dv4.transpose(1, 2).reshape({n, a})}, 1);
    finish_f8(f8, false, out, out8);
    return out;
  }
  require_fusable(qkv, "qkv");
  // The kernel reads 4 elements (8 bytes) at a time.
  auto prep = [](const Tensor& t) {
    bool ok = t.stride(3) == 1 && t.stride(0) % 4 == 0 && t.stride(1) % 4 == 0 &&
              t.stride(2) % 4 == 0 && reinterpret_cast<uintptr_t>(t.data_ptr()) % 8 == 0;
    return ok ? t : t.contiguous();
  };
  Tensor gq = prep(dq4), gk = prep(dk4), gv = prep(dv4);
  TORCH_CHECK(qkv.stride(1) == 1 && qkv.stride(0) % 4 == 0, "rope_norm backward: qkv layout");
  Tensor out = at::empty({n, 3 * a}, qkv.options());
  Tensor rc = rstd.contiguous();
  F8Args f = f8_args(f8, true, out, out8);
#ifdef CHARLM_WITH_CUDA
  const void* pq = gq.data_ptr();
  const void* pk = gk.data_ptr();
  const void* pv = gv.data_ptr();
  // [B, H, T, D] strides, passed as (batch, time, head).
  int64_t qs[3] = {gq.stride(0), gq.stride(2), gq.stride(1)};
  int64_t ks[3] = {gk.stride(0), gk.stride(2), gk.stride(1)};
  int64_t vs[3] = {gv.stride(0), gv.stride(2), gv.stride(1)};
  const void* pz = qkv.data_ptr();
  int64_t z_stride = qkv.stride(0);
  const void* pr = rc.data_ptr();
  const void* pc = cos.data_ptr();
  const void* ps = sin.data_ptr();
  void* po = out.data_ptr();
  int seq_i = static_cast<int>(seq), heads_i = static_cast<int>(heads);
  void* args[] = {&pq, &qs[0], &qs[1], &qs[2], &pk, &ks[0], &ks[1], &ks[2], &pv, &vs[0], &vs[1],
                  &vs[2], &pz, &z_stride, &pr, &pc, &ps, &po, const_cast<int64_t*>(&n), &seq_i,
                  &heads_i, &f.out, &f.scale, &f.amax, &f.fmt};
  launch(qkv, kRopeBwd, n * 3 * heads * 16, 128, args);
#endif
  finish_f8(f8, true, out, out8);
  return out;
}

Tensor relu2_fwd(const Tensor& h, bool fused, bool want_a, const Slot* f8, Tensor* a8) {
  if (!fused) {
    Tensor r = h.to(at::kFloat).clamp_min(0);
    Tensor a = (r * r).to(h.scalar_type());
    finish_f8(f8, false, a, a8);
    return want_a ? a : Tensor();
  }
  require_fusable(h, "mlp hidden");
  TORCH_CHECK(h.is_contiguous() && h.numel() % 8 == 0 && aligned16(h), "relu2: layout");
  F8Args f = f8_args(f8, true, h, a8);
  // Without an inline copy the bf16 values are needed for the cast that follows.
  Tensor a = want_a || f.out == nullptr ? at::empty_like(h) : Tensor();
#ifdef CHARLM_WITH_CUDA
  const void* hp = h.data_ptr();
  void* ap = a.defined() ? a.data_ptr() : nullptr;
  int64_t n8 = h.numel() / 8;
  void* args[] = {&hp, &ap, &n8, &f.out, &f.scale, &f.amax, &f.fmt};
  launch(h, kRelu2Fwd, n8, 256, args);
#endif
  finish_f8(f8, true, a, a8);
  return want_a ? a : Tensor();
}

// (a = relu(h)², dh = 2·da·h where h > 0); the fused kernel writes dh over da. Without
// `need_a` (the forward kept a) only dh is computed and a is undefined.
std::pair<Tensor, Tensor> relu2_bwd(const Tensor& h, Tensor da, bool fused, bool need_a,
                                    const Slot* f8, Tensor* dh8) {
  if (!fused) {
    Tensor hf = h.to(at::kFloat);
    Tensor a;
    if (need_a) {
      Tensor r = hf.clamp_min(0);
      a = (r * r).to(h.scalar_type());
    }
    Tensor dh = at::where(hf > 0, 2 * da.to(at::kFloat) * hf, 0.0).to(h.scalar_type());
    finish_f8(f8, false, dh, dh8);
    return {a, dh};
  }
  require_fusable(h, "mlp hidden");
  TORCH_CHECK(h.is_contiguous() && h.numel() % 8 == 0 && aligned16(h), "relu2 backward: layout");
  da = da.contiguous();
  TORCH_CHECK(da.sizes() == h.sizes() && aligned16(da), "relu2 backward: gradient layout");
  Tensor a = need_a ? at::empty_like(h) : Tensor();
  F8Args f = f8_args(f8, true, h, dh8);
#ifdef CHARLM_WITH_CUDA
  const void* hp = h.data_ptr();
  void* dp = da.data_ptr();
  int64_t n8 = h.numel() / 8;
  if (need_a) {
    void* ap = a.data_ptr();
    void* args[] = {&hp, &dp, &ap, &n8, &f.out, &f.scale, &f.amax, &f.fmt};
    launch(h, kRelu2Bwd, n8, 256, args);
  } else {
    void* args[] = {&hp, &dp, &n8, &f.out, &f.scale, &f.amax, &f.fmt};
    launch(h, kRelu2BwdDh, n8, 256, args);
  }
#endif
  finish_f8(f8, true, da, dh8);
  return {a, da};
}

}  // namespace charlm

using namespace charlm;

extern "C" {


// One elementwise step on its own, fused or eager, for checks:
// 0 rmsnorm_fwd(x) -> y, rstd          1 rmsnorm_bwd(dy, y, rstd, dres|NULL) -> dx
// 2 rope_norm_fwd(qkv, cos, sin) -> qkv', rstd   (p0 = seq, p1 = heads; qkv is not modified)
// 3 rope_norm_bwd(dq4, dk4, dv4, qkv, rstd, cos, sin) -> dqkv     (p0 = seq, p1 = heads)
// 4 relu2_fwd(h) -> a                  5 relu2_bwd(h, da) -> a, dh   (da is not modified)
// 6 relu2_bwd without a (h, da) -> dh  7 cast_f8(x) (needs f8_scale) -> nothing but the copy
// With `f8_scale` (a 0-dim fp32 tensor; NULL: none) the step also writes the FP8 copy of the
// output that a matrix product reads (ops 0, 1, 3, 4, 5, 6, 7) in format f8_fmt with delayed
// scaling, and two more outputs follow: that copy as fp32 (unscaled fp8 values) and its amax.
// *n_out receives the number of outputs (at most 4).
char* charlm_fused_op(int op, const at::Tensor* const* in, int fused, int64_t p0, int64_t p1,
                      const at::Tensor* f8_scale, int f8_fmt, at::Tensor** out, int* n_out) {
  return guarded([&] {
    const bool f = fused != 0;
    auto t = [&](int i) { return arg(in, i); };
    Slot slot;
    const Slot* s = nullptr;
    if (f8_scale != nullptr) {
      slot.scale = f8_scale->detach().clone();
      slot.inv = at::reciprocal(slot.scale);
      slot.amax = at::zeros_like(slot.scale);
      slot.fmt = f8_fmt == 1 ? kE5M2 : kE4M3;
      s = &slot;
    }
    Tensor x8;
    std::vector<Tensor> r;
    switch (op) {
      case 0: {
        auto [y, rs] = rmsnorm_fwd(t(0), f, s, &x8);
        r = {y, rs};
        break;
      }
      case 1:
        r = {rmsnorm_bwd(t(0), t(1), t(2), t(3), f, s, &x8)};
        break;
      case 2: {
        Tensor qkv = t(0).clone();
        Tensor rs = rope_norm_fwd_(qkv, t(1), t(2), p0, p1, f);
        r = {qkv, rs};
        break;
      }
      case 3:
        r = {rope_norm_bwd(t(0), t(1), t(2), t(3), t(4), t(5), t(6), p0, p1, f, s, &x8)};
        break;
      case 4: {
        // With a copy, only the copy: the fp8 forward's way when relu² is not kept.
        Tensor a = relu2_fwd(t(0), f, s == nullptr, s, &x8);
        if (a.defined()) r = {a};
        break;
      }
      case 5: {
        auto [a, dh] = relu2_bwd(t(0), t(1).clone(), f, true, s, &x8);
        r = {a, dh};
        break;
      }
      case 6: {
        auto [a, dh] = relu2_bwd(t(0), t(1).clone(), f, false, s, &x8);
        r = {dh};
        break;
      }
      case 7:
        TORCH_CHECK(s != nullptr, "op 7 (cast_f8) needs a scale");
        x8 = cast_f8(t(0), slot, f);
        break;
      default:
        TORCH_CHECK(false, "unknown op ", op);
    }
    if (s != nullptr) {
      TORCH_CHECK(x8.defined(), "op ", op, " has no FP8 copy");
      r.push_back(x8.to(at::kFloat));
      r.push_back(slot.amax);
    }
    TORCH_CHECK(r.size() <= 4, "too many outputs");
    for (size_t i = 0; i < r.size(); ++i) out[i] = new at::Tensor(std::move(r[i]));
    *n_out = static_cast<int>(r.size());
  });
}

}  // extern "C"
