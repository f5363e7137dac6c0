// nanochat 2026's per-layer scalars as one autograd node: before block i the residual stream
// becomes y = r[i]·x + x0s[i]·x0 (x0 the normed embedding; r, x0s fp32 [depth] parameters). As
// three ATen ops under autograd it costs about ten passes over the [N, C] stream per layer
// (multiplies, the add, and in the backward the products and sums for each operand); here it is
// one fused kernel forward and one backward (kernels.cu), or their eager twins with the same math.
#include <torch/csrc/autograd/custom_function.h>

#include "driver.h"
#include "guarded.h"
#include "ops.h"

using namespace charlm;

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// One layer's entry of a [depth] fp32 vector, as a pointer for the kernels.
const float* entry(const Tensor& v, int64_t layer) { return v.data_ptr<float>() + layer; }

void check_fused(const Tensor& x, const Tensor& x0, const Tensor& r) {
  require_fusable(x, "the residual stream");
  TORCH_CHECK(x.is_contiguous() && x0.is_contiguous() && x.sizes() == x0.sizes() &&
                  x.numel() % 8 == 0 && aligned16(x) && aligned16(x0) &&
                  x0.scalar_type() == x.scalar_type(),
              "mix: layout");
  TORCH_CHECK(r.scalar_type() == at::kFloat && r.is_contiguous() && r.device() == x.device(),
              "mix: scalars must be fp32 on the stream's device");
}

struct MixFunction : public torch::autograd::Function<MixFunction> {
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& x0, const Tensor& r,
                        const Tensor& x0s, int64_t layer, bool fused) {
    ctx->save_for_backward({x, x0, r, x0s});
    ctx->saved_data["layer"] = layer;
    ctx->saved_data["fused"] = fused;
    if (!fused) {
      const auto kind = x.scalar_type();
      return x * r.select(0, layer).to(kind) + x0 * x0s.select(0, layer).to(kind);
    }
    check_fused(x, x0, r);
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

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto saved = ctx->get_saved_variables();
    const Tensor &x = saved[0], &x0 = saved[1], &r = saved[2], &x0s = saved[3];
    const int64_t layer = ctx->saved_data.at("layer").toInt();
    const bool fused = ctx->saved_data.at("fused").toBool();
    Tensor g = grads[0].contiguous();
    Tensor gx, gx0, sums;
    if (!fused) {
      const auto kind = g.scalar_type();
      gx = g * r.select(0, layer).to(kind);
      gx0 = g * x0s.select(0, layer).to(kind);
      Tensor gf = g.to(at::kFloat);
      sums = at::stack({(gf * x.to(at::kFloat)).sum(), (gf * x0.to(at::kFloat)).sum()});
    } else {
      check_fused(g, x, r);
      gx = at::empty_like(g);
      gx0 = at::empty_like(g);
      sums = at::zeros({2}, r.options());
#ifdef CHARLM_WITH_CUDA
      const void *gp = g.data_ptr(), *xp = x.data_ptr(), *x0p = x0.data_ptr();
      void *gxp = gx.data_ptr(), *gx0p = gx0.data_ptr(), *sump = sums.data_ptr();
      const float *rp = entry(r, layer), *sp = entry(x0s, layer);
      int64_t n8 = g.numel() / 8;
      void* args[] = {&gp, &xp, &x0p, &gxp, &gx0p, &rp, &sp, &sump, &n8};
      launch(g, kMixBwd, n8, 256, args);
#endif
    }
    Tensor dr = at::zeros_like(r), ds = at::zeros_like(x0s);
    dr.select(0, layer).copy_(sums.select(0, 0));
    ds.select(0, layer).copy_(sums.select(0, 1));
    return {gx, gx0, dr, ds, Tensor(), Tensor()};
  }
};

}  // namespace

extern "C" {

// y = r[layer]·x + x0s[layer]·x0 with autograd (fused kernels or their eager twins).
char* charlm_mix_apply(const at::Tensor* x, const at::Tensor* x0, const at::Tensor* r,
                       const at::Tensor* x0s, int64_t layer, int fused, at::Tensor** out) {
  return guarded([&] {
    TORCH_CHECK(layer >= 0 && layer < r->numel() && r->numel() == x0s->numel(), "mix: layer");
    *out = new at::Tensor(MixFunction::apply(*x, *x0, *r, *x0s, layer, fused != 0));
  });
}

}  // extern "C"
