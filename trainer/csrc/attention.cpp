// Causal attention (attention.h), and `charlm_attention_probe`, which `auto` asks whether cuDNN's
// agrees with flash attention at the run's shape.
#include "attention.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "guarded.h"
#include "ops.h"

namespace charlm {

using at::Tensor;

namespace {

// cuDNN's and flash's forwards both begin their outputs with these eight, which their backwards take.
template <typename Outputs>
Attention from_outputs(const Outputs& r) {
  Attention a;
  a.y4 = std::get<0>(r);
  a.lse = std::get<1>(r);
  a.cum_q = std::get<2>(r);
  a.cum_k = std::get<3>(r);
  a.max_q = std::get<4>(r).expect_int();
  a.max_k = std::get<5>(r).expect_int();
  a.seed = std::get<6>(r);
  a.offset = std::get<7>(r);
  return a;
}

}  // namespace

Tensor view4(const Tensor& t2, int64_t batch, int64_t heads) {
  // [N, H·D] (row stride free) → [B, H, T, D] without copying.
  return t2.view({batch, t2.size(0) / batch, heads, kHead}).transpose(1, 2);
}

Tensor cpu_probs(const Tensor& q4, const Tensor& k4) {
  const int64_t t = q4.size(2);
  const double scale = 1.0 / std::sqrt(static_cast<double>(q4.size(3)));
  Tensor s = at::matmul(q4, k4.transpose(-2, -1)) * scale;
  Tensor mask = at::ones({t, t}, q4.options().dtype(at::kBool)).triu(1);
  return at::softmax(s.masked_fill(mask, -std::numeric_limits<double>::infinity()), -1);
}

Attention attn_fwd(const Tensor& q4, const Tensor& k4, const Tensor& v4, bool cudnn) {
  Attention a;
  if (q4.is_cuda() && cudnn) {
    auto r = at::_scaled_dot_product_cudnn_attention(q4, k4, v4, std::nullopt,
                                                     /*compute_log_sumexp=*/true, 0.0,
                                                     /*is_causal=*/true,
                                                     /*return_debug_mask=*/false);
    a = from_outputs(r);
  } else if (q4.is_cuda()) {
    auto r = at::_scaled_dot_product_flash_attention(q4, k4, v4, 0.0, /*is_causal=*/true,
                                                     /*return_debug_mask=*/false);
    a = from_outputs(r);
  } else {
    a.y4 = at::matmul(cpu_probs(q4, k4), v4);
  }
  return a;
}

std::tuple<Tensor, Tensor, Tensor> attn_bwd(const Tensor& dy4, const Tensor& q4, const Tensor& k4,
                                            const Tensor& v4, const Attention& a, bool cudnn) {
  if (q4.is_cuda() && cudnn) {
    return at::_scaled_dot_product_cudnn_attention_backward(
        dy4, q4, k4, v4, a.y4, a.lse, a.seed, a.offset, /*attn_bias=*/Tensor(), a.cum_q, a.cum_k,
        a.max_q, a.max_k, 0.0, true);
  }
  if (q4.is_cuda()) {
    return at::_scaled_dot_product_flash_attention_backward(
        dy4, q4, k4, v4, a.y4, a.lse, a.cum_q, a.cum_k, a.max_q, a.max_k, 0.0, true, a.seed,
        a.offset);
  }
  const double scale = 1.0 / std::sqrt(static_cast<double>(q4.size(3)));
  Tensor p = cpu_probs(q4, k4);
  Tensor dp = at::matmul(dy4, v4.transpose(-2, -1));
  Tensor ds = p * (dp - (dp * p).sum({-1}, true));
  return {at::matmul(ds, k4) * scale, at::matmul(ds.transpose(-2, -1), q4) * scale,
          at::matmul(p.transpose(-2, -1), dy4)};
}

}  // namespace charlm

using namespace charlm;

extern "C" {


// Runs causal attention forward and backward with flash attention and with cuDNN on random bf16
// data laid out as the block lays it out ([B, T, 3, H, 128] storage), and writes the largest
// relative difference of the output and the three gradients into *rel.
char* charlm_attention_probe(int64_t batch, int64_t heads, int64_t seq, int device, double* rel) {
  return guarded([&] {
    auto opts = at::TensorOptions().dtype(at::kBFloat16).device(at::kCUDA, device);
    const int64_t a = heads * kHead;
    Tensor qkv = at::randn({batch * seq, 3 * a}, opts);
    Tensor q4 = view4(qkv.narrow(1, 0, a), batch, heads);
    Tensor k4 = view4(qkv.narrow(1, a, a), batch, heads);
    Tensor v4 = view4(qkv.narrow(1, 2 * a, a), batch, heads);
    Tensor dy = at::randn({batch * seq, a}, opts);
    auto run = [&](bool cudnn) {
      Attention att = attn_fwd(q4, k4, v4, cudnn);
      Tensor y = att.y4.transpose(1, 2).reshape({batch * seq, a});
      att.y4 = view4(y, batch, heads);
      auto [dq, dk, dv] = attn_bwd(view4(dy, batch, heads), q4, k4, v4, att, cudnn);
      return std::vector<Tensor>{y, dq, dk, dv};
    };
    auto f = run(false);
    auto c = run(true);
    double worst = 0;
    for (size_t i = 0; i < f.size(); ++i) {
      Tensor d = (c[i].to(at::kFloat) - f[i].to(at::kFloat)).norm();
      Tensor r = d / f[i].to(at::kFloat).norm();
      double v = r.item<double>();
      worst = std::isfinite(v) ? std::max(worst, v) : INFINITY;
    }
    *rel = worst;
  });
}

}  // extern "C"
