// nanochat 2026's per-layer scalars: before block i the residual stream becomes
// xin = r[i]·x + x0s[i]·x0 (x0 the normed embedding; r, x0s fp32 [depth] parameters). The block
// (block.cpp) applies them inside its first row norm and their backward inside that norm's
// backward, so the mix costs no pass of its own over the [N, C] stream where the block-per-row
// kernels run (widths that are a multiple of 256); elsewhere it is one fused kernel each way, or
// the eager twins with the same math.
#include <tuple>

#include "driver.h"
#include "ops.h"

namespace charlm {

namespace {

// One layer's entry of a [depth] fp32 vector, as a pointer for the kernels.
const float* entry(const Tensor& v, int64_t layer) { return v.data_ptr<float>() + layer; }

void check_fused(const Tensor& x, const Tensor& x0, const Tensor& r, const Tensor& x0s) {
  require_fusable(x, "the residual stream");
  TORCH_CHECK(x.is_contiguous() && x0.is_contiguous() && x.sizes() == x0.sizes() &&
                  x.numel() % 8 == 0 && aligned16(x) && aligned16(x0) &&
                  x0.scalar_type() == x.scalar_type(),
              "mix: layout");
  TORCH_CHECK(r.scalar_type() == at::kFloat && r.is_contiguous() && r.device() == x.device() &&
                  x0s.scalar_type() == at::kFloat && x0s.is_contiguous(),
              "mix: scalars must be fp32 on the stream's device");
}

// The fused norm+mix kernels: the block-per-row norms, bf16, contiguous rows.
bool fuse_with_norm(const Tensor& x, bool fused) {
  return fused && x.dim() == 2 && row_norm(static_cast<int>(x.size(1)));
}

}  // namespace

Tensor mix_fwd(const Tensor& x, const Tensor& x0, const Tensor& r, const Tensor& x0s,
               int64_t layer, bool fused) {
  TORCH_CHECK(layer >= 0 && layer < r.numel() && r.numel() == x0s.numel(), "mix: layer");
  if (!fused) {
    const auto kind = x.scalar_type();
    return x * r.select(0, layer).to(kind) + x0 * x0s.select(0, layer).to(kind);
  }
  check_fused(x, x0, r, x0s);
  Tensor y = at::empty_like(x);
#ifdef CHARLM_WITH_CUDA
  const void *xp = x.data_ptr(), *x0p = x0.data_ptr();
  void* yp = y.data_ptr();
  const float *rp = entry(r, layer), *sp = entry(x0s, layer);
  int64_t n8 = x.numel() / 8;
  void* args[] = {&xp, &x0p, &yp, &rp, &sp, &n8};
  launch(x, kMixFwd, n8, 256, args);
#endif
  return y;
}

std::tuple<Tensor, Tensor, Tensor> mix_bwd(const Tensor& g, const Tensor& x, const Tensor& x0,
                                           const Tensor& r, const Tensor& x0s, int64_t layer,
                                           bool fused) {
  if (!fused) {
    const auto kind = g.scalar_type();
    Tensor gx = g * r.select(0, layer).to(kind);
    Tensor gx0 = g * x0s.select(0, layer).to(kind);
    Tensor gf = g.to(at::kFloat);
    Tensor sums = at::stack({(gf * x.to(at::kFloat)).sum(), (gf * x0.to(at::kFloat)).sum()});
    return {gx, gx0, sums};
  }
  Tensor gc = g.contiguous();
  check_fused(gc, x, r, x0s);
  Tensor gx = at::empty_like(gc), gx0 = at::empty_like(gc);
  Tensor sums = at::zeros({2}, r.options());
#ifdef CHARLM_WITH_CUDA
  const void *gp = gc.data_ptr(), *xp = x.data_ptr(), *x0p = x0.data_ptr();
  void *gxp = gx.data_ptr(), *gx0p = gx0.data_ptr(), *sump = sums.data_ptr();
  const float *rp = entry(r, layer), *sp = entry(x0s, layer);
  int64_t n8 = gc.numel() / 8;
  void* args[] = {&gp, &xp, &x0p, &gxp, &gx0p, &rp, &sp, &sump, &n8};
  launch(gc, kMixBwd, n8, 256, args);
#endif
  return {gx, gx0, sums};
}

std::tuple<Tensor, Tensor, Tensor> mix_rmsnorm_fwd(const Tensor& x, const Tensor& x0,
                                                   const Tensor& r, const Tensor& x0s,
                                                   int64_t layer, bool fused, const Slot* f8,
                                                   Tensor* y8) {
  if (!fuse_with_norm(x, fused)) {
    Tensor xin = mix_fwd(x, x0, r, x0s, layer, fused);
    auto [y, rstd] = rmsnorm_fwd(xin, fused, f8, y8);
    return {xin, y, rstd};
  }
  TORCH_CHECK(layer >= 0 && layer < r.numel() && r.numel() == x0s.numel(), "mix: layer");
  check_fused(x, x0, r, x0s);
  const int64_t rows = x.size(0);
  int cols = static_cast<int>(x.size(1));
  Tensor xin = at::empty_like(x), y = at::empty_like(x);
  Tensor rstd = at::empty({rows}, x.options().dtype(at::kFloat));
  F8Args f = f8_args(f8, true, x, y8);
#ifdef CHARLM_WITH_CUDA
  const void *xp = x.data_ptr(), *x0p = x0.data_ptr();
  const float *rp = entry(r, layer), *sp = entry(x0s, layer);
  void *xinp = xin.data_ptr(), *yp = y.data_ptr(), *rsp = rstd.data_ptr();
  float eps = static_cast<float>(kEps);
  void* args[] = {&xp,  &x0p, &rp,   &sp,          &xinp,   &yp,     &rsp,  const_cast<int64_t*>(&rows),
                  &cols, &eps, &f.out, &f.scale, &f.amax, &f.fmt};
  launch(x, kMixRmsFwdReg, rows * (cols / 8), cols / 8, args);
#endif
  finish_f8(f8, true, y, y8);
  return {xin, y, rstd};
}

std::tuple<Tensor, Tensor, Tensor> rmsnorm_mix_bwd(const Tensor& dy, const Tensor& y,
                                                   const Tensor& rstd, const Tensor& dres,
                                                   const Tensor& x, const Tensor& x0,
                                                   const Tensor& r, const Tensor& x0s,
                                                   int64_t layer, bool fused) {
  if (!fuse_with_norm(dy, fused) || !dres.defined()) {
    Tensor g = rmsnorm_bwd(dy, y, rstd, dres, fused);
    return mix_bwd(g, x, x0, r, x0s, layer, fused);
  }
  Tensor dyc = dy.contiguous(), yc = y.contiguous(), rc = rstd.contiguous(),
         resc = dres.contiguous();
  check_fused(dyc, x, r, x0s);
  TORCH_CHECK(aligned16(yc) && aligned16(resc) && yc.sizes() == dyc.sizes() &&
                  resc.sizes() == dyc.sizes(),
              "rmsnorm+mix backward: layout");
  const int64_t rows = dyc.size(0);
  int cols = static_cast<int>(dyc.size(1));
  Tensor gx = at::empty_like(dyc), gx0 = at::empty_like(dyc);
  Tensor sums = at::zeros({2}, r.options());
#ifdef CHARLM_WITH_CUDA
  const void *a = dyc.data_ptr(), *b = yc.data_ptr(), *rr = rc.data_ptr(), *c = resc.data_ptr();
  const void *xp = x.data_ptr(), *x0p = x0.data_ptr();
  const float *rp = entry(r, layer), *sp = entry(x0s, layer);
  void *gxp = gx.data_ptr(), *gx0p = gx0.data_ptr(), *sump = sums.data_ptr();
  void* args[] = {&a,   &b,    &rr,   &c,    &xp,   &x0p, &rp,
                  &sp,  &gxp,  &gx0p, &sump, const_cast<int64_t*>(&rows), &cols};
  launch(dyc, kRmsMixBwdReg, rows * (cols / 8), cols / 8, args);
#endif
  return {gx, gx0, sums};
}

}  // namespace charlm
