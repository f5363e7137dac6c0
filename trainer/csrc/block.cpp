// One transformer block of nanochat's GPT as a single autograd node with a hand-written backward:
// the forward saves only what the backward needs (or, with recomputation, only its input), weight
// gradients accumulate straight into fp32 buffers that the optimizer reads, and every elementwise
// step runs either as one fused CUDA kernel (csrc/kernels.cu, loaded through the driver API) or as
// its eager ATen twin with the same math. The Rust model (src/fused.rs) calls it once per block.
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
// Every rmsnorm computes in fp32 and rounds once, like ATen's rms_norm; so do the fused kernels.

#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/profiler_kineto.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <map>
#include <mutex>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#ifdef CHARLM_WITH_CUDA
#include <c10/core/DeviceGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda.h>
#include <dlfcn.h>

#include "charlm_kernels_fatbin.inc"  // kCharlmFatbin, kCharlmFatbinSize (0 when nvcc was absent)
#endif

#include "guarded.h"

namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// ATen's rms_norm default: the epsilon of float, the type it computes in for bf16 and fp32.
constexpr double kEps = 1.1920928955078125e-07;
constexpr int64_t kHead = 128;

using charlm::copy_message;
using charlm::guarded;

// ---------------------------------------------------------------------------------------------
// Fused kernels: the fatbin built from kernels.cu, loaded once per device with the driver API
// (dlopen of libcuda, which every CUDA machine has), launched on libtorch's current stream.
// ---------------------------------------------------------------------------------------------

enum KernelId {
  kRmsFwd,
  kRmsBwd,
  kRmsFwdReg,
  kRmsBwdReg,
  kRopeFwd,
  kRopeBwd,
  kRelu2Fwd,
  kRelu2Bwd,
  kRelu2BwdDh,
  kMuonMomentum,
  kNumKernels
};
const char* const kKernelNames[kNumKernels] = {
    "charlm_rmsnorm_fwd",   "charlm_rmsnorm_bwd",   "charlm_rmsnorm_fwd_row",
    "charlm_rmsnorm_bwd_row", "charlm_rope_norm_fwd", "charlm_rope_norm_bwd",
    "charlm_relu2_fwd",     "charlm_relu2_bwd",     "charlm_relu2_bwd_dh",
    "charlm_muon_momentum"};
// Widths that are a multiple of 256 (up to 8192) use the block-per-row norms, cols/8 threads.
bool row_norm(int cols) { return cols % 256 == 0 && cols <= 8192; }

#ifdef CHARLM_WITH_CUDA
struct Driver {
  CUresult (*ctx_get_current)(CUcontext*) = nullptr;
  CUresult (*ctx_set_current)(CUcontext) = nullptr;
  CUresult (*primary_ctx_retain)(CUcontext*, CUdevice) = nullptr;
  CUresult (*device_get)(CUdevice*, int) = nullptr;
  CUresult (*module_load_data)(CUmodule*, const void*) = nullptr;
  CUresult (*module_get_function)(CUfunction*, CUmodule, const char*) = nullptr;
  CUresult (*launch_kernel)(CUfunction, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned,
                            unsigned, CUstream, void**, void**) = nullptr;
  CUresult (*get_error_string)(CUresult, const char**) = nullptr;
  std::string error;  // why the driver could not be used, if it could not
};

template <typename T>
bool load_symbol(void* lib, const char* name, T& out) {
  out = reinterpret_cast<T>(dlsym(lib, name));
  return out != nullptr;
}

const Driver& driver() {
  static Driver d = [] {
    Driver d;
    void* lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_GLOBAL);
    if (lib == nullptr) {
      d.error = std::string("cannot open libcuda.so.1: ") + dlerror();
      return d;
    }
    bool ok = load_symbol(lib, "cuCtxGetCurrent", d.ctx_get_current) &&
              load_symbol(lib, "cuCtxSetCurrent", d.ctx_set_current) &&
              load_symbol(lib, "cuDevicePrimaryCtxRetain", d.primary_ctx_retain) &&
              load_symbol(lib, "cuDeviceGet", d.device_get) &&
              load_symbol(lib, "cuModuleLoadData", d.module_load_data) &&
              load_symbol(lib, "cuModuleGetFunction", d.module_get_function) &&
              load_symbol(lib, "cuLaunchKernel", d.launch_kernel) &&
              load_symbol(lib, "cuGetErrorString", d.get_error_string);
    if (!ok) d.error = "libcuda.so.1 lacks a driver function the fused kernels need";
    return d;
  }();
  return d;
}

std::string cu_error(CUresult r) {
  const char* s = nullptr;
  if (driver().get_error_string != nullptr) driver().get_error_string(r, &s);
  return s != nullptr ? s : ("CUDA driver error " + std::to_string(static_cast<int>(r)));
}

struct Module {
  bool tried = false;
  std::string error;
  CUfunction fn[kNumKernels] = {};
};

// Loads the fatbin into the primary context of `device` (the one the CUDA runtime, and so
// libtorch, uses). Returns the functions, or throws with the reason they are unavailable.
const Module& module_for(int device) {
  static std::mutex mu;
  static std::map<int, Module> modules;
  std::lock_guard<std::mutex> lock(mu);
  Module& m = modules[device];
  if (m.tried) {
    TORCH_CHECK(m.error.empty(), m.error);
    return m;
  }
  m.tried = true;
  auto fail = [&](const std::string& why) {
    m.error = "fused kernels unavailable: " + why;
    TORCH_CHECK(false, m.error);
  };
  if (kCharlmFatbinSize == 0) fail("this binary was built without nvcc (see trainer/build.rs)");
  const Driver& d = driver();
  if (!d.error.empty()) fail(d.error);
  CUdevice dev;
  CUresult r = d.device_get(&dev, device);
  if (r != CUDA_SUCCESS) fail("cuDeviceGet: " + cu_error(r));
  CUcontext ctx = nullptr;
  d.ctx_get_current(&ctx);
  if (ctx == nullptr) {
    r = d.primary_ctx_retain(&ctx, dev);
    if (r != CUDA_SUCCESS) fail("cuDevicePrimaryCtxRetain: " + cu_error(r));
    d.ctx_set_current(ctx);
  }
  CUmodule mod;
  r = d.module_load_data(&mod, kCharlmFatbin);
  if (r != CUDA_SUCCESS) fail("cuModuleLoadData (the fatbin targets sm_90): " + cu_error(r));
  for (int i = 0; i < kNumKernels; ++i) {
    r = d.module_get_function(&m.fn[i], mod, kKernelNames[i]);
    if (r != CUDA_SUCCESS) fail(std::string("cuModuleGetFunction ") + kKernelNames[i] + ": " + cu_error(r));
  }
  return m;
}

void launch(const Tensor& on, KernelId k, int64_t threads_total, int block, void** args) {
  if (threads_total <= 0) return;
  const int device = on.get_device();
  const Module& m = module_for(device);
  const int64_t grid = (threads_total + block - 1) / block;
  TORCH_CHECK(grid < (int64_t{1} << 31), "fused kernel grid too large");
  CUstream stream = reinterpret_cast<CUstream>(c10::cuda::getCurrentCUDAStream(device).stream());
  CUresult r = driver().launch_kernel(m.fn[k], static_cast<unsigned>(grid), 1, 1, block, 1, 1, 0,
                                      stream, args, nullptr);
  TORCH_CHECK(r == CUDA_SUCCESS, "launching ", kKernelNames[k], ": ", cu_error(r));
}
#endif

void require_fusable(const Tensor& t, const char* what) {
  TORCH_CHECK(t.is_cuda() && t.scalar_type() == at::kBFloat16,
              "fused kernels need bf16 CUDA tensors; ", what, " is ", t.toString());
#ifndef CHARLM_WITH_CUDA
  TORCH_CHECK(false, "this binary was built without CUDA support for fused kernels");
#endif
}

bool aligned16(const Tensor& t) {
  return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
}

// ---------------------------------------------------------------------------------------------
// The elementwise steps, each fused or eager with the same math.
// ---------------------------------------------------------------------------------------------

// (y, rstd) for rows of x [N, C].
std::pair<Tensor, Tensor> rmsnorm_fwd(const Tensor& x, bool fused) {
  if (!fused) {
    Tensor xf = x.to(at::kFloat);
    Tensor r = at::rsqrt(xf.square().mean({-1}, true) + kEps);
    return {(xf * r).to(x.scalar_type()), r.squeeze(-1)};
  }
  require_fusable(x, "rmsnorm input");
  Tensor xc = x.contiguous();
  const int64_t rows = xc.size(0);
  int cols = static_cast<int>(xc.size(1));
  TORCH_CHECK(cols % 8 == 0 && aligned16(xc), "rmsnorm: width must be a multiple of 8");
  Tensor y = at::empty_like(xc);
  Tensor rstd = at::empty({rows}, xc.options().dtype(at::kFloat));
#ifdef CHARLM_WITH_CUDA
  const void* xp = xc.data_ptr();
  void* yp = y.data_ptr();
  void* rp = rstd.data_ptr();
  float eps = static_cast<float>(kEps);
  void* args[] = {&xp, &yp, &rp, const_cast<int64_t*>(&rows), &cols, &eps};
  if (row_norm(cols)) {
    launch(xc, kRmsFwdReg, rows * (cols / 8), cols / 8, args);
  } else {
    launch(xc, kRmsFwd, rows * 32, 128, args);
  }
#endif
  return {y, rstd};
}

// dres + backward of the row norm, from its output y and factor rstd.
Tensor rmsnorm_bwd(const Tensor& dy, const Tensor& y, const Tensor& rstd, const Tensor& dres,
                   bool fused) {
  if (!fused) {
    Tensor dyf = dy.to(at::kFloat), yf = y.to(at::kFloat);
    Tensor mean = (dyf * yf).mean({-1}, true);
    Tensor dx = rstd.unsqueeze(-1) * (dyf - yf * mean);
    if (dres.defined()) dx = dres.to(at::kFloat) + dx;
    return dx.to(dy.scalar_type());
  }
  require_fusable(dy, "rmsnorm gradient");
  Tensor dyc = dy.contiguous(), yc = y.contiguous(), rc = rstd.contiguous();
  Tensor resc = dres.defined() ? dres.contiguous() : Tensor();
  const int64_t rows = dyc.size(0);
  int cols = static_cast<int>(dyc.size(1));
  TORCH_CHECK(cols % 8 == 0 && aligned16(dyc) && aligned16(yc) && (!resc.defined() || aligned16(resc)),
              "rmsnorm backward: width must be a multiple of 8");
  Tensor dx = at::empty_like(dyc);
#ifdef CHARLM_WITH_CUDA
  const void* a = dyc.data_ptr();
  const void* b = yc.data_ptr();
  const void* r = rc.data_ptr();
  const void* c = resc.defined() ? resc.data_ptr() : nullptr;
  void* o = dx.data_ptr();
  void* args[] = {&a, &b, &r, &c, &o, const_cast<int64_t*>(&rows), &cols};
  if (row_norm(cols)) {
    launch(dyc, kRmsBwdReg, rows * (cols / 8), cols / 8, args);
  } else {
    launch(dyc, kRmsBwd, rows * 32, 128, args);
  }
#endif
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
                     int64_t heads, bool fused) {
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
    return at::cat({gx.reshape({n, 2 * a}), dv4.transpose(1, 2).reshape({n, a})}, 1);
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
                  &heads_i};
  launch(qkv, kRopeBwd, n * 3 * heads * 16, 128, args);
#endif
  return out;
}

Tensor relu2_fwd(const Tensor& h, bool fused) {
  if (!fused) {
    Tensor r = h.to(at::kFloat).clamp_min(0);
    return (r * r).to(h.scalar_type());
  }
  require_fusable(h, "mlp hidden");
  TORCH_CHECK(h.is_contiguous() && h.numel() % 8 == 0 && aligned16(h), "relu2: layout");
  Tensor a = at::empty_like(h);
#ifdef CHARLM_WITH_CUDA
  const void* hp = h.data_ptr();
  void* ap = a.data_ptr();
  int64_t n8 = h.numel() / 8;
  void* args[] = {&hp, &ap, &n8};
  launch(h, kRelu2Fwd, n8, 256, args);
#endif
  return a;
}

// (a = relu(h)², dh = 2·da·h where h > 0); the fused kernel writes dh over da. Without
// `need_a` (the forward kept a) only dh is computed and a is undefined.
std::pair<Tensor, Tensor> relu2_bwd(const Tensor& h, Tensor da, bool fused, bool need_a = true) {
  if (!fused) {
    Tensor hf = h.to(at::kFloat);
    Tensor a;
    if (need_a) {
      Tensor r = hf.clamp_min(0);
      a = (r * r).to(h.scalar_type());
    }
    Tensor dh = at::where(hf > 0, 2 * da.to(at::kFloat) * hf, 0.0).to(h.scalar_type());
    return {a, dh};
  }
  require_fusable(h, "mlp hidden");
  TORCH_CHECK(h.is_contiguous() && h.numel() % 8 == 0 && aligned16(h), "relu2 backward: layout");
  da = da.contiguous();
  TORCH_CHECK(da.sizes() == h.sizes() && aligned16(da), "relu2 backward: gradient layout");
  Tensor a = need_a ? at::empty_like(h) : Tensor();
#ifdef CHARLM_WITH_CUDA
  const void* hp = h.data_ptr();
  void* dp = da.data_ptr();
  int64_t n8 = h.numel() / 8;
  if (need_a) {
    void* ap = a.data_ptr();
    void* args[] = {&hp, &dp, &ap, &n8};
    launch(h, kRelu2Bwd, n8, 256, args);
  } else {
    void* args[] = {&hp, &dp, &n8};
    launch(h, kRelu2BwdDh, n8, 256, args);
  }
#endif
  return {a, da};
}

// ---------------------------------------------------------------------------------------------
// Attention: flash attention on CUDA (the same kernels SDPA picks), plain math on the CPU.
// ---------------------------------------------------------------------------------------------

struct Attention {
  Tensor y4;  // [B, H, T, D]
  Tensor lse, cum_q, cum_k, seed, offset;
  int64_t max_q = 0, max_k = 0;
};

Tensor cpu_probs(const Tensor& q4, const Tensor& k4) {
  const int64_t t = q4.size(2);
  const double scale = 1.0 / std::sqrt(static_cast<double>(q4.size(3)));
  Tensor s = at::matmul(q4, k4.transpose(-2, -1)) * scale;
  Tensor mask = at::ones({t, t}, q4.options().dtype(at::kBool)).triu(1);
  return at::softmax(s.masked_fill(mask, -std::numeric_limits<double>::infinity()), -1);
}

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

// ---------------------------------------------------------------------------------------------
// The block.
// ---------------------------------------------------------------------------------------------

struct Weights {
  Tensor wqkv, wq, wk, wv, wo, wfc, wp;  // wqkv may be undefined: then cat(wq, wk, wv)
  Tensor gqkv, go, gfc, gp;              // fp32 gradient accumulators
  Tensor cos, sin;                       // [seq, 64] in the compute kind
};

struct Spec {
  int64_t batch = 0, heads = 0;
  bool fused = false, recompute = false;
  bool cudnn = false;     // cuDNN's attention instead of flash attention (CUDA only)
  bool keep_act = false;  // keep relu(h)² for the backward instead of recomputing it
};

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
  Tensor xn, rstd1, qkv, rstd_qk, y, xn2, rstd2, h;
  Tensor act;  // relu(h)², when kept
  Attention attn;
};

Tensor view4(const Tensor& t2, int64_t batch, int64_t heads) {
  // [N, H·D] (row stride free) → [B, H, T, D] without copying.
  return t2.view({batch, t2.size(0) / batch, heads, kHead}).transpose(1, 2);
}

Tensor block_forward(const Tensor& x, const Weights& w, const Spec& s, Saved& sv) {
  const auto kind = x.scalar_type();
  const int64_t n = x.size(0), a = s.heads * kHead, seq = n / s.batch;
  std::tie(sv.xn, sv.rstd1) = rmsnorm_fwd(x, s.fused);
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

Tensor block_backward(const Tensor& dout, Weights& w, const Spec& s, Saved& sv) {
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
  return rmsnorm_bwd(dxn, sv.xn, sv.rstd1, dx1, s.fused);
}

const char* const kWeightNames[] = {"wqkv", "wq", "wk", "wv", "wo", "wfc", "wp",
                                    "gqkv", "go", "gfc", "gp", "cos", "sin"};

struct BlockFunction : public torch::autograd::Function<BlockFunction> {
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const std::vector<Tensor>& ws,
                        int64_t batch, int64_t heads, bool fused, bool recompute, bool cudnn,
                        bool keep_act) {
    Weights w = unpack(ws);
    // Recomputation recomputes the activation anyway; keeping it would only cost memory.
    Spec s{batch, heads, fused, recompute, cudnn, keep_act && !recompute};
    Saved sv;
    Tensor out = block_forward(x, w, s, sv);
    auto& d = ctx->saved_data;
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
    if (recompute) {
      d["x"] = x;
    } else {
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
    Spec s{d.at("batch").toInt(), d.at("heads").toInt(), d.at("fused").toBool(),
           d.at("recompute").toBool(), d.at("cudnn").toBool(), d.at("keep_act").toBool()};
    Saved sv;
    if (s.recompute) {
      Tensor x = d.at("x").toTensor();
      d.clear();
      block_forward(x, w, s, sv);
    } else {
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
    Tensor dx = block_backward(grads[0].contiguous(), w, s, sv);
    variable_list out(8);
    out[0] = dx;
    return out;
  }

  static Weights unpack(const std::vector<Tensor>& ws) {
    TORCH_CHECK(ws.size() == 13, "block: expected 13 weight tensors");
    Weights w;
    w.wqkv = ws[0];
    w.wq = ws[1];
    w.wk = ws[2];
    w.wv = ws[3];
    w.wo = ws[4];
    w.wfc = ws[5];
    w.wp = ws[6];
    w.gqkv = ws[7];
    w.go = ws[8];
    w.gfc = ws[9];
    w.gp = ws[10];
    w.cos = ws[11];
    w.sin = ws[12];
    return w;
  }
};

Tensor arg(const at::Tensor* const* t, int i) {
  return t[i] == nullptr ? Tensor() : t[i]->detach();
}

// ---------------------------------------------------------------------------------------------
// Profiler: GPU time per kernel name over a region, as text.
// ---------------------------------------------------------------------------------------------

std::set<torch::profiler::impl::ActivityType> profiler_activities() {
  return {torch::profiler::impl::ActivityType::CPU, torch::profiler::impl::ActivityType::CUDA};
}

}  // namespace

extern "C" {

// tensors: x, wqkv|NULL, wq, wk, wv, wo, wfc, wp, gqkv, go, gfc, gp, cos, sin.
char* charlm_block_apply(const at::Tensor* const* tensors, int64_t batch, int64_t heads,
                         int fused, int recompute, int cudnn, int keep_act,
                         at::Tensor** out) {
  return guarded([&] {
    Tensor x = *tensors[0];
    std::vector<Tensor> ws;
    for (int i = 1; i <= 13; ++i) ws.push_back(arg(tensors, i));
    TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "block input must be a contiguous [N, C]");
    TORCH_CHECK(x.size(0) % batch == 0, "block: rows not divisible by the batch");
    Tensor y =
        BlockFunction::apply(x, ws, batch, heads, fused != 0, recompute != 0, cudnn != 0,
                             keep_act != 0);
    *out = new at::Tensor(std::move(y));
  });
}

// Makes `grad` the .grad of `param`, so autograd accumulates into it in place.
char* charlm_set_grad(at::Tensor* param, const at::Tensor* grad) {
  return guarded([&] { param->mutable_grad() = *grad; });
}

// NULL when the fused kernels can run on `device`, else why not.
char* charlm_fused_status(int device) {
  return guarded([&] {
#ifdef CHARLM_WITH_CUDA
    // The generic guard: c10/cuda/CUDAGuard.h would pull CUDA runtime calls into this file.
    c10::DeviceGuard guard(c10::Device(c10::kCUDA, static_cast<c10::DeviceIndex>(device)));
    module_for(device);
#else
    (void)device;
    TORCH_CHECK(false, "this binary was built without CUDA support for fused kernels");
#endif
  });
}

// One elementwise step on its own, fused or eager, for checks:
// 0 rmsnorm_fwd(x) -> y, rstd          1 rmsnorm_bwd(dy, y, rstd, dres|NULL) -> dx
// 2 rope_norm_fwd(qkv, cos, sin) -> qkv', rstd   (p0 = seq, p1 = heads; qkv is not modified)
// 3 rope_norm_bwd(dq4, dk4, dv4, qkv, rstd, cos, sin) -> dqkv     (p0 = seq, p1 = heads)
// 4 relu2_fwd(h) -> a                  5 relu2_bwd(h, da) -> a, dh   (da is not modified)
// 6 relu2_bwd without a (h, da) -> dh
char* charlm_fused_op(int op, const at::Tensor* const* in, int fused, int64_t p0, int64_t p1,
                      at::Tensor** out) {
  return guarded([&] {
    const bool f = fused != 0;
    auto t = [&](int i) { return arg(in, i); };
    std::vector<Tensor> r;
    switch (op) {
      case 0: {
        auto [y, rs] = rmsnorm_fwd(t(0), f);
        r = {y, rs};
        break;
      }
      case 1:
        r = {rmsnorm_bwd(t(0), t(1), t(2), t(3), f)};
        break;
      case 2: {
        Tensor qkv = t(0).clone();
        Tensor rs = rope_norm_fwd_(qkv, t(1), t(2), p0, p1, f);
        r = {qkv, rs};
        break;
      }
      case 3:
        r = {rope_norm_bwd(t(0), t(1), t(2), t(3), t(4), t(5), t(6), p0, p1, f)};
        break;
      case 4:
        r = {relu2_fwd(t(0), f)};
        break;
      case 5: {
        auto [a, dh] = relu2_bwd(t(0), t(1).clone(), f);
        r = {a, dh};
        break;
      }
      case 6: {
        auto [a, dh] = relu2_bwd(t(0), t(1).clone(), f, false);
        r = {dh};
        break;
      }
      default:
        TORCH_CHECK(false, "unknown op ", op);
    }
    for (size_t i = 0; i < r.size(); ++i) out[i] = new at::Tensor(std::move(r[i]));
  });
}

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

// Muon's momentum step for fp32 gradients g and momentum m of one shape (m updated in place;
// coef, a 0-dim fp32 clipping factor, may be NULL): returns bf16 lerp(coef·g, m, beta).
char* charlm_muon_momentum(const at::Tensor* g, at::Tensor* m, const at::Tensor* coef,
                           double beta, int fused, at::Tensor** out) {
  return guarded([&] {
    Tensor gs = coef != nullptr ? *g * *coef : *g;
    if (fused == 0) {
      m->lerp_(gs, 1.0 - beta);
      *out = new at::Tensor(gs.lerp(*m, beta).to(at::kBFloat16));
      return;
    }
    TORCH_CHECK(g->is_cuda() && g->scalar_type() == at::kFloat && m->scalar_type() == at::kFloat &&
                    g->is_contiguous() && m->is_contiguous() && g->numel() % 4 == 0 &&
                    aligned16(*g) && aligned16(*m) && g->sizes() == m->sizes(),
                "muon momentum: contiguous fp32 CUDA tensors of one shape");
    Tensor x = at::empty(g->sizes(), g->options().dtype(at::kBFloat16));
#ifdef CHARLM_WITH_CUDA
    const void* gp = g->data_ptr();
    void* mp = m->data_ptr();
    void* xp = x.data_ptr();
    Tensor c = coef != nullptr ? coef->to(at::kFloat).contiguous() : Tensor();
    const void* cp = c.defined() ? c.data_ptr() : nullptr;
    int64_t n4 = g->numel() / 4;
    float b = static_cast<float>(beta);
    void* args[] = {&gp, &mp, &xp, &cp, &n4, &b};
    launch(*g, kMuonMomentum, n4, 256, args);
#endif
    *out = new at::Tensor(std::move(x));
  });
}

// dst += alpha · src, in dst's type (the optimizers' fp32 update from a bf16 direction).
char* charlm_add_scaled(at::Tensor* dst, const at::Tensor* src, double alpha) {
  return guarded([&] { dst->add_(*src, alpha); });
}

char* charlm_profiler_start() {
  return guarded([&] {
    using namespace torch::profiler::impl;
    ProfilerConfig config(ProfilerState::KINETO);
    torch::autograd::profiler::prepareProfiler(config, profiler_activities());
    torch::autograd::profiler::enableProfiler(config, profiler_activities());
  });
}

// Stops the profiler and writes a table of GPU time per kernel (the top `top` names) into a
// malloc'd string at *report.
char* charlm_profiler_stop(int top, char** report) {
  return guarded([&] {
    auto result = torch::autograd::profiler::disableProfiler();
    std::map<std::string, std::pair<double, int64_t>> by_name;
    double total_us = 0;
    uint64_t first = UINT64_MAX, last = 0;
    for (const auto& e : result->events()) {
      if (e.deviceType() != c10::DeviceType::CUDA) continue;
      const double us = e.durationNs() / 1000.0;
      auto& slot = by_name[e.name()];
      slot.first += us;
      slot.second += 1;
      total_us += us;
      first = std::min<uint64_t>(first, e.startNs());
      last = std::max<uint64_t>(last, e.endNs());
    }
    std::vector<std::pair<std::string, std::pair<double, int64_t>>> rows(by_name.begin(),
                                                                        by_name.end());
    std::sort(rows.begin(), rows.end(),
              [](const auto& a, const auto& b) { return a.second.first > b.second.first; });
    std::ostringstream os;
    const double span_us = last > first ? (last - first) / 1000.0 : 0.0;
    char line[512];
    std::snprintf(line, sizeof line, "GPU busy %.1f ms over a span of %.1f ms, %zu kernel names\n",
                  total_us / 1000.0, span_us / 1000.0, rows.size());
    os << line;
    for (size_t i = 0; i < rows.size() && static_cast<int>(i) < top; ++i) {
      std::string name = rows[i].first.substr(0, 110);
      std::snprintf(line, sizeof line, "%9.2f ms %5.1f%% %7lld  %s\n", rows[i].second.first / 1000.0,
                    100.0 * rows[i].second.first / std::max(total_us, 1e-9),
                    static_cast<long long>(rows[i].second.second), name.c_str());
      os << line;
    }
    *report = copy_message(os.str());
  });
}

}  // extern "C"
