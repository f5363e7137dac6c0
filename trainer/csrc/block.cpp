// One transformer block of nanochat's GPT as a single autograd node with a hand-written backward:
// the forward saves only what the backward needs (or, with recomputation, only its input), weight
// gradients accumulate straight into fp32 buffers that the optimizer reads, and every elementwise
// step runs either as one fused CUDA kernel (csrc/kernels.cu, loaded through the driver API) or as
// its eager ATen twin with the same math. The Rust model (src/model/block.rs) calls it once per block; the steps are
// in ops.cpp, attention in attention.cpp, the kernels' loader in driver.cpp.
//
// Block, for x of [N = batch·seq, C] and A = heads·128:
//   xn  = rmsnorm(x)                          (saved with its 1/rms)
//   qkv = xn · [Wq; Wk; Wv]ᵀ                  [N, 3A]
//   q, k = rmsnorm(rotary(q, k)) in place      (per 128-wide head; saved with 1/rms)
//   y   = causal attention(q, k, v)            [N, A] (flash attention on CUDA)
//   x1  = x + y · Woᵀ
//   xn2 = rmsnorm(x1)                         (saved with its 1/rms)
//   h   = xn2 · Wfcᵀ                          [N, 4C] (saved)
//   out = x1 + relu(h)² · Wpᵀ
// With nanochat 2026's per-layer scalars the block first makes its input xin = r[i]·x + x0s[i]·x0
// (mix.cpp), inside the first row norm's kernel, and returns the gradients of x, x0 and the two
// scalars from inside that norm's backward.
// Every rmsnorm computes in fp32 and rounds once, like ATen's rms_norm; so do the fused kernels.
//
// With FP8 weights (--precision fp8) the four products run as at::_scaled_mm on e4m3 copies of
// their inputs and weights, and the two products of each input gradient (xn2·Wfcᵀ's and so on) on
// e5m2 copies of the gradients; the kernels that produce those tensors write the copies (fp8.h).
// The weight gradients stay bf16 products into the fp32 buffers, unless `f8_wgrad` asks for FP8
// ones too (measured slower: docs/performance.md).

#include <torch/csrc/autograd/custom_function.h>

#include <atomic>
#include <optional>
#include <string>
#include <vector>

#ifdef CHARLM_WITH_CUDA
#include <c10/core/DeviceGuard.h>
#endif

#include "attention.h"
#include "driver.h"
#include "guarded.h"
#include "ops.h"

using namespace charlm;

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// The tensors of one block, in the order Rust hands them over (TENSOR_NAMES in
// src/model/block.rs; a test holds the two lists equal). wqkv may be undefined: then
// cat(wq, wk, wv). g* are the fp32 gradient accumulators; cos, sin are [seq, 64] in the compute
// kind.
// The FP8 precision adds e4m3 weights [out, in] (wqkv8 … wp8) and their transposes [in, out]
// (wqkv8t … wp8t), winv [4] (1/scale of each product's weight) and f8 [3, 8] (rows: scale, 1/scale,
// amax; columns: the slots of kSlotNames); all undefined in bf16.
#define CHARLM_BLOCK_TENSORS(X)                                                               \
  X(wqkv) X(wq) X(wk) X(wv) X(wo) X(wfc) X(wp) X(gqkv) X(go) X(gfc) X(gp) X(cos) X(sin)        \
  X(wqkv8) X(wo8) X(wfc8) X(wp8) X(wqkv8t) X(wo8t) X(wfc8t) X(wp8t) X(winv) X(f8)

struct Weights {
#define CHARLM_FIELD(name) Tensor name;
  CHARLM_BLOCK_TENSORS(CHARLM_FIELD)
#undef CHARLM_FIELD
};

const char* const kWeightNames[] = {
#define CHARLM_NAME(name) #name,
    CHARLM_BLOCK_TENSORS(CHARLM_NAME)
#undef CHARLM_NAME
};
constexpr int kNumWeights = sizeof(kWeightNames) / sizeof(kWeightNames[0]);

Weights unpack(const std::vector<Tensor>& ws) {
  TORCH_CHECK(ws.size() == kNumWeights, "block: expected ", kNumWeights, " tensors");
  Weights w;
  size_t i = 0;
#define CHARLM_UNPACK(name) w.name = ws[i++];
  CHARLM_BLOCK_TENSORS(CHARLM_UNPACK)
#undef CHARLM_UNPACK
  return w;
}

struct Spec {
  int64_t batch = 0, heads = 0;
  bool fused = false, recompute = false;
  bool cudnn = false;     // cuDNN's attention instead of flash attention (CUDA only)
  bool keep_act = false;  // keep relu(h)² for the backward instead of recomputing it
  bool f8_dynamic = false;  // FP8 scales from each tensor's own amax (else the recorded ones)
  bool f8_wgrad = false;    // FP8 weight gradients too
};

// The FP8 roles, in the column order of the f8 tensor: the e4m3 inputs of the four products,
// then the e5m2 gradients that the four input-gradient products read.
enum SlotId { kXn, kY, kXn2, kAct, kDout, kDh, kDx1, kDqkv, kNumSlots };

Slot slot(const Weights& w, SlotId i, const Spec& s) {
  Slot out;
  out.scale = w.f8.select(0, 0).select(0, i);
  out.inv = w.f8.select(0, 1).select(0, i);
  out.amax = w.f8.select(0, 2).select(0, i);
  out.fmt = i < kDout ? kE4M3 : kE5M2;
  out.dynamic = s.f8_dynamic;
  return out;
}

// The inverse scale of product j's weight (0 qkv, 1 attention output, 2 MLP up, 3 MLP down).
Tensor winv(const Weights& w, int j) { return w.winv.select(0, j); }

Tensor as_kind(const Tensor& w, at::ScalarType kind) {
  return w.scalar_type() == kind ? w : w.to(kind);
}

Tensor qkv_weight(const Weights& w, at::ScalarType kind) {
  if (w.wqkv.defined()) return as_kind(w.wqkv, kind);
  return at::cat({as_kind(w.wq, kind), as_kind(w.wk, kind), as_kind(w.wv, kind)}, 0);
}

// g += a·b with fp32 accumulation: cuBLAS writes the bf16 product's fp32 result straight into g
// (addmm with out_dtype) where ATen supports it, else through a bf16 product.
void accumulate(Tensor& g, const Tensor& a, const Tensor& b) {
  if (g.scalar_type() == a.scalar_type()) {
    g.addmm_(a, b);
    return;
  }
  static std::atomic<bool> out_dtype_ok{true};
  if (out_dtype_ok.load()) {
    try {
      at::addmm_out(g, g, a, b, g.scalar_type(), 1, 1);
      return;
    } catch (const c10::Error&) {
      out_dtype_ok.store(false);
    }
  }
  g.add_(at::mm(a, b));
}

struct Saved {
  Tensor x;  // the input before the per-layer scalars, when there are some
  Tensor xn, rstd1, qkv, rstd_qk, y, xn2, rstd2, h;
  Tensor act;  // relu(h)², when kept
  Attention attn;
};

// The per-layer scalars of nanochat 2026 for this block (all undefined without them).
struct Mix {
  Tensor x0, r, x0s;  // the normed embedding [N, C]; the fp32 [depth] scalars
  int64_t layer = 0;
  bool defined() const { return r.defined(); }
};

// The gradients a block's backward returns: its input's, and with the scalars x0's and the
// layer's two sums [Σ g·x, Σ g·x0].
struct Grads {
  Tensor dx, dx0, sums;
};

// The block's input (after the scalars, if any) and its row norm into sv.xn, sv.rstd1, with the
// norm's FP8 copy when f8 is given.
Tensor block_input(const Tensor& x, const Mix& m, const Spec& s, Saved& sv, const Slot* f8,
                   Tensor* xn8) {
  if (!m.defined()) {
    std::tie(sv.xn, sv.rstd1) = rmsnorm_fwd(x, s.fused, f8, xn8);
    return x;
  }
  sv.x = x;
  auto [xin, xn, rstd] = mix_rmsnorm_fwd(x, m.x0, m.r, m.x0s, m.layer, s.fused, f8, xn8);
  sv.xn = xn;
  sv.rstd1 = rstd;
  return xin;
}

// The end of the backward: the first norm's backward plus the residual gradient dx1, then the
// scalars' backward.
Grads block_input_backward(const Tensor& dxn, const Tensor& dx1, const Mix& m, const Spec& s,
                           Saved& sv) {
  if (!m.defined()) return {rmsnorm_bwd(dxn, sv.xn, sv.rstd1, dx1, s.fused)};
  auto [gx, gx0, sums] = rmsnorm_mix_bwd(dxn, sv.xn, sv.rstd1, dx1, sv.x, m.x0, m.r, m.x0s,
                                         m.layer, s.fused);
  return {gx, gx0, sums};
}


Tensor block_forward_f8(const Tensor& x, const Weights& w, const Mix& m, const Spec& s,
                        Saved& sv);
Grads block_backward_f8(const Tensor& dout, Weights& w, const Mix& m, const Spec& s, Saved& sv);

Tensor block_forward(const Tensor& x_in, const Weights& w, const Mix& m, const Spec& s,
                     Saved& sv) {
  if (w.f8.defined()) return block_forward_f8(x_in, w, m, s, sv);
  const auto kind = x_in.scalar_type();
  const int64_t n = x_in.size(0), a = s.heads * kHead, seq = n / s.batch;
  const Tensor x = block_input(x_in, m, s, sv, nullptr, nullptr);
  sv.qkv = at::mm(sv.xn, qkv_weight(w, kind).t());
  sv.rstd_qk = rope_norm_fwd_(sv.qkv, w.cos, w.sin, seq, s.heads, s.fused);
  Tensor q4 = view4(sv.qkv.narrow(1, 0, a), s.batch, s.heads);
  Tensor k4 = view4(sv.qkv.narrow(1, a, a), s.batch, s.heads);
  Tensor v4 = view4(sv.qkv.narrow(1, 2 * a, a), s.batch, s.heads);
  sv.attn = attn_fwd(q4, k4, v4, s.cudnn);
  sv.y = sv.attn.y4.transpose(1, 2).reshape({n, a});
  sv.attn.y4 = Tensor();  // rebuilt from y when needed, so only one copy is kept
  Tensor x1 = at::addmm(x, sv.y, as_kind(w.wo, kind).t());
  std::tie(sv.xn2, sv.rstd2) = rmsnorm_fwd(x1, s.fused);
  sv.h = at::mm(sv.xn2, as_kind(w.wfc, kind).t());
  Tensor act = relu2_fwd(sv.h, s.fused);
  if (s.keep_act) sv.act = act;
  // x1 is this function's own temporary (the backward keeps xn2, not x1), so the second
  // residual accumulates into it in place: no copy of x1 into a new output first.
  x1.addmm_(act, as_kind(w.wp, kind).t());
  return x1;
}

Grads block_backward(const Tensor& dout, Weights& w, const Mix& m, const Spec& s, Saved& sv) {
  if (w.f8.defined()) return block_backward_f8(dout, w, m, s, sv);
  const auto kind = dout.scalar_type();
  const int64_t n = dout.size(0), a = s.heads * kHead, seq = n / s.batch;
  // MLP: out = x1 + relu(h)²·Wpᵀ, h = xn2·Wfcᵀ.
  Tensor da = at::mm(dout, as_kind(w.wp, kind));
  auto [act, dh] = relu2_bwd(sv.h, da, s.fused, !sv.act.defined());
  if (sv.act.defined()) act = std::move(sv.act);
  da = Tensor();
  sv.h = Tensor();
  accumulate(w.gp, dout.t(), act);
  act = Tensor();
  accumulate(w.gfc, dh.t(), sv.xn2);
  Tensor dxn2 = at::mm(dh, as_kind(w.wfc, kind));
  dh = Tensor();
  Tensor dx1 = rmsnorm_bwd(dxn2, sv.xn2, sv.rstd2, dout, s.fused);
  dxn2 = Tensor();
  sv.xn2 = Tensor();
  // Attention: x1 = x + y·Woᵀ.
  accumulate(w.go, dx1.t(), sv.y);
  Tensor dy = at::mm(dx1, as_kind(w.wo, kind));
  sv.attn.y4 = view4(sv.y, s.batch, s.heads);
  Tensor q4 = view4(sv.qkv.narrow(1, 0, a), s.batch, s.heads);
  Tensor k4 = view4(sv.qkv.narrow(1, a, a), s.batch, s.heads);
  Tensor v4 = view4(sv.qkv.narrow(1, 2 * a, a), s.batch, s.heads);
  auto [dq4, dk4, dv4] = attn_bwd(view4(dy, s.batch, s.heads), q4, k4, v4, sv.attn, s.cudnn);
  dy = Tensor();
  sv.attn = Attention();
  sv.y = Tensor();
  Tensor dqkv =
      rope_norm_bwd(dq4, dk4, dv4, sv.qkv, sv.rstd_qk, w.cos, w.sin, seq, s.heads, s.fused);
  dq4 = dk4 = dv4 = Tensor();
  sv.qkv = Tensor();
  accumulate(w.gqkv, dqkv.t(), sv.xn);
  Tensor dxn = at::mm(dqkv, qkv_weight(w, kind));
  dqkv = Tensor();
  return block_input_backward(dxn, dx1, m, s, sv);
}

// The forward with FP8 products: the same steps and the same saved tensors as block_forward.
Tensor block_forward_f8(const Tensor& x_in, const Weights& w, const Mix& m, const Spec& s,
                        Saved& sv) {
  const auto kind = x_in.scalar_type();
  const int64_t n = x_in.size(0), a = s.heads * kHead, seq = n / s.batch;
  const Slot s_xn = slot(w, kXn, s), s_y = slot(w, kY, s), s_xn2 = slot(w, kXn2, s),
             s_act = slot(w, kAct, s);
  Tensor x8;
  const Tensor x = block_input(x_in, m, s, sv, &s_xn, &x8);
  sv.qkv = scaled_mm(x8, s_xn.inv, w.wqkv8, winv(w, 0), kind, true);
  sv.rstd_qk = rope_norm_fwd_(sv.qkv, w.cos, w.sin, seq, s.heads, s.fused);
  Tensor q4 = view4(sv.qkv.narrow(1, 0, a), s.batch, s.heads);
  Tensor k4 = view4(sv.qkv.narrow(1, a, a), s.batch, s.heads);
  Tensor v4 = view4(sv.qkv.narrow(1, 2 * a, a), s.batch, s.heads);
  sv.attn = attn_fwd(q4, k4, v4, s.cudnn);
  sv.y = sv.attn.y4.transpose(1, 2).reshape({n, a});
  sv.attn.y4 = Tensor();
  x8 = cast_f8(sv.y, s_y, s.fused);
  Tensor x1 = scaled_mm(x8, s_y.inv, w.wo8, winv(w, 1), kind, true);
  x1.add_(x);
  std::tie(sv.xn2, sv.rstd2) = rmsnorm_fwd(x1, s.fused, &s_xn2, &x8);
  sv.h = scaled_mm(x8, s_xn2.inv, w.wfc8, winv(w, 2), kind, true);
  Tensor act = relu2_fwd(sv.h, s.fused, s.keep_act, &s_act, &x8);
  if (s.keep_act) sv.act = act;
  x1.add_(scaled_mm(x8, s_act.inv, w.wp8, winv(w, 3), kind, true));
  return x1;
}

// g += gradᵀ·input for the FP8 weight gradients: the saved bf16 input is cast again with the
// scale its forward used (so the same e4m3 values), and both operands are transposed, since
// cuBLASLt's FP8 products take only row-major × column-major operands.
void accumulate_f8(Tensor& g, const Tensor& grad8, const Tensor& grad_inv, const Tensor& input,
                   Slot in, bool fused) {
  in.dynamic = false;
  Tensor in8 = cast_f8(input, in, fused);
  g.add_(scaled_mm(grad8.t().contiguous(), grad_inv, in8.t().contiguous(), in.inv, g.scalar_type(),
                   false));
}

Grads block_backward_f8(const Tensor& dout, Weights& w, const Mix& m, const Spec& s, Saved& sv) {
  const auto kind = dout.scalar_type();
  const int64_t n = dout.size(0), a = s.heads * kHead, seq = n / s.batch;
  const Slot s_dout = slot(w, kDout, s), s_dh = slot(w, kDh, s), s_dx1 = slot(w, kDx1, s),
             s_dqkv = slot(w, kDqkv, s);
  // MLP: out = x1 + relu(h)²·Wpᵀ, h = xn2·Wfcᵀ.
  Tensor g8 = cast_f8(dout, s_dout, s.fused);
  Tensor da = scaled_mm(g8, s_dout.inv, w.wp8t, winv(w, 3), kind, false);
  Tensor dh8;
  auto [act, dh] = relu2_bwd(sv.h, da, s.fused, !sv.act.defined(), &s_dh, &dh8);
  if (sv.act.defined()) act = std::move(sv.act);
  da = Tensor();
  sv.h = Tensor();
  if (s.f8_wgrad) {
    accumulate_f8(w.gp, g8, s_dout.inv, act, slot(w, kAct, s), s.fused);
    accumulate_f8(w.gfc, dh8, s_dh.inv, sv.xn2, slot(w, kXn2, s), s.fused);
  } else {
    accumulate(w.gp, dout.t(), act);
    accumulate(w.gfc, dh.t(), sv.xn2);
  }
  act = Tensor();
  g8 = Tensor();
  dh = Tensor();
  Tensor dxn2 = scaled_mm(dh8, s_dh.inv, w.wfc8t, winv(w, 2), kind, false);
  dh8 = Tensor();
  Tensor dx18;
  Tensor dx1 = rmsnorm_bwd(dxn2, sv.xn2, sv.rstd2, dout, s.fused, &s_dx1, &dx18);
  dxn2 = Tensor();
  sv.xn2 = Tensor();
  // Attention: x1 = x + y·Woᵀ.
  if (s.f8_wgrad) {
    accumulate_f8(w.go, dx18, s_dx1.inv, sv.y, slot(w, kY, s), s.fused);
  } else {
    accumulate(w.go, dx1.t(), sv.y);
  }
  Tensor dy = scaled_mm(dx18, s_dx1.inv, w.wo8t, winv(w, 1), kind, false);
  dx18 = Tensor();
  sv.attn.y4 = view4(sv.y, s.batch, s.heads);
  Tensor q4 = view4(sv.qkv.narrow(1, 0, a), s.batch, s.heads);
  Tensor k4 = view4(sv.qkv.narrow(1, a, a), s.batch, s.heads);
  Tensor v4 = view4(sv.qkv.narrow(1, 2 * a, a), s.batch, s.heads);
  auto [dq4, dk4, dv4] = attn_bwd(view4(dy, s.batch, s.heads), q4, k4, v4, sv.attn, s.cudnn);
  dy = Tensor();
  sv.attn = Attention();
  sv.y = Tensor();
  Tensor dqkv8;
  Tensor dqkv = rope_norm_bwd(dq4, dk4, dv4, sv.qkv, sv.rstd_qk, w.cos, w.sin, seq, s.heads,
                              s.fused, &s_dqkv, &dqkv8);
  dq4 = dk4 = dv4 = Tensor();
  sv.qkv = Tensor();
  if (s.f8_wgrad) {
    accumulate_f8(w.gqkv, dqkv8, s_dqkv.inv, sv.xn, slot(w, kXn, s), s.fused);
  } else {
    accumulate(w.gqkv, dqkv.t(), sv.xn);
  }
  dqkv = Tensor();
  Tensor dxn = scaled_mm(dqkv8, s_dqkv.inv, w.wqkv8t, winv(w, 0), kind, false);
  dqkv8 = Tensor();
  return block_input_backward(dxn, dx1, m, s, sv);
}


struct BlockFunction : public torch::autograd::Function<BlockFunction> {
  // x0, r and x0s (the per-layer scalars; nullopt without them) are inputs autograd tracks; the
  // weights in ws are not: their gradients go to the g* buffers.
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const std::vector<Tensor>& ws,
                        const std::optional<Tensor>& x0, const std::optional<Tensor>& r,
                        const std::optional<Tensor>& x0s, int64_t layer,
                        int64_t batch, int64_t heads, bool fused, bool recompute, bool cudnn,
                        bool keep_act, bool f8_dynamic, bool f8_wgrad) {
    Weights w = unpack(ws);
    Mix m;
    if (r.has_value()) m = Mix{*x0, *r, *x0s, layer};
    // Recomputation recomputes the activation anyway; keeping it would only cost memory.
    Spec s{batch, heads, fused, recompute, cudnn, keep_act && !recompute, f8_dynamic, f8_wgrad};
    Saved sv;
    Tensor out = block_forward(x, w, m, s, sv);
    auto& d = ctx->saved_data;
    d["has_mix"] = m.defined();
    if (m.defined()) {
      d["x0"] = m.x0;
      d["r"] = m.r;
      d["x0s"] = m.x0s;
      d["layer"] = layer;
    }
    for (size_t i = 0; i < ws.size(); ++i) {
      d[kWeightNames[i]] = ws[i];
      d[std::string("has_") + kWeightNames[i]] = ws[i].defined();
    }
    d["batch"] = batch;
    d["heads"] = heads;
    d["fused"] = fused;
    d["recompute"] = recompute;
    d["cudnn"] = cudnn;
    d["keep_act"] = s.keep_act;
    d["f8_dynamic"] = s.f8_dynamic;
    d["f8_wgrad"] = s.f8_wgrad;
    if (recompute || m.defined()) d["x"] = x;
    if (!recompute) {
      d["xn"] = sv.xn;
      d["rstd1"] = sv.rstd1;
      d["qkv"] = sv.qkv;
      d["rstd_qk"] = sv.rstd_qk;
      d["y"] = sv.y;
      d["xn2"] = sv.xn2;
      d["rstd2"] = sv.rstd2;
      d["h"] = sv.h;
      if (sv.act.defined()) d["act"] = sv.act;
      if (sv.attn.lse.defined()) {
        d["lse"] = sv.attn.lse;
        d["max_q"] = sv.attn.max_q;
        d["max_k"] = sv.attn.max_k;
        d["has_cum"] = sv.attn.cum_q.defined();
        if (sv.attn.cum_q.defined()) {
          d["cum_q"] = sv.attn.cum_q;
          d["cum_k"] = sv.attn.cum_k;
        }
        d["seed"] = sv.attn.seed;
        d["offset"] = sv.attn.offset;
      }
    }
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto& d = ctx->saved_data;
    std::vector<Tensor> ws;
    for (const char* name : kWeightNames) {
      ws.push_back(d.at(std::string("has_") + name).toBool() ? d.at(name).toTensor() : Tensor());
    }
    Weights w = unpack(ws);
    Mix m;
    if (d.at("has_mix").toBool()) {
      m = Mix{d.at("x0").toTensor(), d.at("r").toTensor(), d.at("x0s").toTensor(),
              d.at("layer").toInt()};
    }
    Spec s{d.at("batch").toInt(),      d.at("heads").toInt(),         d.at("fused").toBool(),
           d.at("recompute").toBool(), d.at("cudnn").toBool(),        d.at("keep_act").toBool(),
           d.at("f8_dynamic").toBool(), d.at("f8_wgrad").toBool()};
    Saved sv;
    if (s.recompute) {
      Tensor x = d.at("x").toTensor();
      d.clear();
      block_forward(x, w, m, s, sv);
    } else {
      if (m.defined()) sv.x = d.at("x").toTensor();
      sv.xn = d.at("xn").toTensor();
      sv.rstd1 = d.at("rstd1").toTensor();
      sv.qkv = d.at("qkv").toTensor();
      sv.rstd_qk = d.at("rstd_qk").toTensor();
      sv.y = d.at("y").toTensor();
      sv.xn2 = d.at("xn2").toTensor();
      sv.rstd2 = d.at("rstd2").toTensor();
      sv.h = d.at("h").toTensor();
      if (d.count("act")) sv.act = d.at("act").toTensor();
      if (d.count("lse")) {
        sv.attn.lse = d.at("lse").toTensor();
        sv.attn.max_q = d.at("max_q").toInt();
        sv.attn.max_k = d.at("max_k").toInt();
        if (d.at("has_cum").toBool()) {
          sv.attn.cum_q = d.at("cum_q").toTensor();
          sv.attn.cum_k = d.at("cum_k").toTensor();
        }
        sv.attn.seed = d.at("seed").toTensor();
        sv.attn.offset = d.at("offset").toTensor();
      }
      // Drop the context's references so each activation is freed as soon as it is used.
      d.clear();
    }
    Grads g = block_backward(grads[0].contiguous(), w, m, s, sv);
    variable_list out(15);
    out[0] = g.dx;
    if (m.defined()) {
      out[2] = g.dx0;
      out[3] = at::zeros_like(m.r);
      out[4] = at::zeros_like(m.x0s);
      out[3].select(0, m.layer).copy_(g.sums.select(0, 0));
      out[4].select(0, m.layer).copy_(g.sums.select(0, 1));
    }
    return out;
  }
};

}  // namespace

extern "C" {

// x, then the block's tensors in CHARLM_BLOCK_TENSORS order (wqkv and the FP8 ones may be NULL),
// then nanochat 2026's per-layer scalars: the normed embedding x0 and the fp32 [depth] vectors r
// and x0s, whose entries `layer` make the block's input r·x + x0s·x0 (all NULL: none).
// f8_flags: bit 0 dynamic FP8 scaling, bit 1 FP8 weight gradients (with the FP8 tensors only).
char* charlm_block_apply(const at::Tensor* x_in, const at::Tensor* const* tensors,
                         const at::Tensor* x0, const at::Tensor* r, const at::Tensor* x0s,
                         int64_t layer, int64_t batch, int64_t heads, int fused, int recompute,
                         int cudnn, int keep_act, int f8_flags, at::Tensor** out) {
  return guarded([&] {
    Tensor x = *x_in;
    std::vector<Tensor> ws;
    for (int i = 0; i < kNumWeights; ++i) ws.push_back(arg(tensors, i));
    TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "block input must be a contiguous [N, C]");
    TORCH_CHECK(x.size(0) % batch == 0, "block: rows not divisible by the batch");
    const Tensor& f8 = ws[kNumWeights - 1];
    TORCH_CHECK(!f8.defined() || (f8.scalar_type() == at::kFloat && f8.size(0) == 3 &&
                                  f8.size(1) == kNumSlots),
                "block: the FP8 state must be fp32 [3, ", int(kNumSlots), "]");
    const bool mix = r != nullptr;
    TORCH_CHECK(!mix || (x0 != nullptr && x0s != nullptr && layer >= 0 && layer < r->numel() &&
                         x0s->numel() == r->numel()),
                "block: the per-layer scalars need x0, r and x0s, and a layer within them");
    using Opt = std::optional<Tensor>;
    Tensor y = BlockFunction::apply(x, ws, mix ? Opt(*x0) : Opt(), mix ? Opt(*r) : Opt(),
                                    mix ? Opt(*x0s) : Opt(), layer, batch, heads, fused != 0,
                                    recompute != 0, cudnn != 0, keep_act != 0,
                                    (f8_flags & 1) != 0, (f8_flags & 2) != 0);
    *out = new at::Tensor(std::move(y));
  });
}

// The names of CHARLM_BLOCK_TENSORS, comma-separated, malloc'd.
char* charlm_block_tensor_names() {
  std::string names;
  for (const char* name : kWeightNames) names += (names.empty() ? "" : ",") + std::string(name);
  return copy_message(names);
}


// NULL when the fused kernels can run on `device`, else why not.
char* charlm_fused_status(int device) {
  return guarded([&] {
#ifdef CHARLM_WITH_CUDA
    // The generic guard: c10/cuda/CUDAGuard.h would pull CUDA runtime calls into this file.
    c10::DeviceGuard guard(c10::Device(c10::kCUDA, static_cast<c10::DeviceIndex>(device)));
    require_kernels(device);
#else
    (void)device;
    TORCH_CHECK(false, "this binary was built without CUDA support for fused kernels");
#endif
  });
}

}  // extern "C"
