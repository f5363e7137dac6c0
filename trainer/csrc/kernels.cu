// The trainer's fused elementwise kernels (bf16 in and out, fp32 arithmetic). build.rs compiles this
// file with nvcc into a fatbin (sm_90 machine code + compute_90 PTX) that block.cpp embeds and loads
// through the CUDA driver API, so the binary needs no CUDA runtime of its own. Each kernel has an
// eager ATen twin in block.cpp with the same math; `bench --check` compares the two on a GPU.
//
// Layouts: rows are tokens (N = batch × seq), row-major, bf16. Heads are 128 wide.

#include <cuda_bf16.h>
#include <stdint.h>

typedef __nv_bfloat16 bf16;
typedef __nv_bfloat162 bf162;

namespace {

constexpr int kHead = 128;
constexpr int kHalf = kHead / 2;

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ void unpack8(const uint4& u, float f[8]) {
  const bf162* p = reinterpret_cast<const bf162*>(&u);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    float2 t = __bfloat1622float2(p[i]);
    f[2 * i] = t.x;
    f[2 * i + 1] = t.y;
  }
}

__device__ __forceinline__ uint4 pack8(const float f[8]) {
  uint4 u;
  bf162* p = reinterpret_cast<bf162*>(&u);
#pragma unroll
  for (int i = 0; i < 4; ++i) p[i] = __floats2bfloat162_rn(f[2 * i], f[2 * i + 1]);
  return u;
}

__device__ __forceinline__ int64_t global_warp() {
  return (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
}

}  // namespace

// y = x · rsqrt(mean(x²) + eps) per row of `cols` (a multiple of 8); rstd[row] keeps the factor.
// One warp per row; the second pass re-reads the row from L1/L2.
extern "C" __global__ void charlm_rmsnorm_fwd(const bf16* __restrict__ x, bf16* __restrict__ y,
                                              float* __restrict__ rstd, int64_t rows, int cols,
                                              float eps) {
  const int64_t row = global_warp();
  const int lane = threadIdx.x & 31;
  if (row >= rows) return;
  const uint4* xr = reinterpret_cast<const uint4*>(x + row * cols);
  uint4* yr = reinterpret_cast<uint4*>(y + row * cols);
  const int nvec = cols / 8;
  float ss = 0.f;
  for (int i = lane; i < nvec; i += 32) {
    float f[8];
    unpack8(xr[i], f);
#pragma unroll
    for (int k = 0; k < 8; ++k) ss += f[k] * f[k];
  }
  ss = warp_sum(ss);
  const float r = rsqrtf(ss / cols + eps);
  if (lane == 0) rstd[row] = r;
  for (int i = lane; i < nvec; i += 32) {
    float f[8];
    unpack8(xr[i], f);
#pragma unroll
    for (int k = 0; k < 8; ++k) f[k] *= r;
    yr[i] = pack8(f);
  }
}

// Backward of the row norm given its output y and factor rstd, plus an optional residual gradient:
// dx = dres + rstd · (dy − y · mean(dy · y)).
extern "C" __global__ void charlm_rmsnorm_bwd(const bf16* __restrict__ dy,
                                              const bf16* __restrict__ y,
                                              const float* __restrict__ rstd,
                                              const bf16* __restrict__ dres, bf16* __restrict__ dx,
                                              int64_t rows, int cols) {
  const int64_t row = global_warp();
  const int lane = threadIdx.x & 31;
  if (row >= rows) return;
  const uint4* dyr = reinterpret_cast<const uint4*>(dy + row * cols);
  const uint4* yr = reinterpret_cast<const uint4*>(y + row * cols);
  const uint4* rr = dres ? reinterpret_cast<const uint4*>(dres + row * cols) : nullptr;
  uint4* dxr = reinterpret_cast<uint4*>(dx + row * cols);
  const int nvec = cols / 8;
  float dot = 0.f;
  for (int i = lane; i < nvec; i += 32) {
    float a[8], b[8];
    unpack8(dyr[i], a);
    unpack8(yr[i], b);
#pragma unroll
    for (int k = 0; k < 8; ++k) dot += a[k] * b[k];
  }
  dot = warp_sum(dot);
  const float mean = dot / cols;
  const float r = rstd[row];
  for (int i = lane; i < nvec; i += 32) {
    float a[8], b[8], c[8];
    unpack8(dyr[i], a);
    unpack8(yr[i], b);
    if (rr) {
      unpack8(rr[i], c);
    } else {
#pragma unroll
      for (int k = 0; k < 8; ++k) c[k] = 0.f;
    }
#pragma unroll
    for (int k = 0; k < 8; ++k) a[k] = c[k] + r * (a[k] - b[k] * mean);
    dxr[i] = pack8(a);
  }
}

__device__ __forceinline__ float half_warp_sum(float v) {
#pragma unroll
  for (int o = 8; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ void load4(const bf16* p, float f[4]) {
  const uint2 u = *reinterpret_cast<const uint2*>(p);
  const bf162* q = reinterpret_cast<const bf162*>(&u);
  const float2 a = __bfloat1622float2(q[0]), b = __bfloat1622float2(q[1]);
  f[0] = a.x;
  f[1] = a.y;
  f[2] = b.x;
  f[3] = b.y;
}

__device__ __forceinline__ void store4(bf16* p, const float f[4]) {
  uint2 u;
  bf162* q = reinterpret_cast<bf162*>(&u);
  q[0] = __floats2bfloat162_rn(f[0], f[1]);
  q[1] = __floats2bfloat162_rn(f[2], f[3]);
  *reinterpret_cast<uint2*>(p) = u;
}

// Rotary embedding then RMS norm of every 128-wide q and k head, in place in the [rows, 3·A]
// projection buffer (q at column 0, k at column A = heads·128, v after them, untouched).
// Rotation of the halves (x1, x2) by the position's angles: y1 = x1·cos + x2·sin,
// y2 = −x1·sin + x2·cos; cos/sin are [seq, 64] tables. rstd is [rows, 2·heads].
// Half a warp per head vector: lane l of 16 owns elements 4l..4l+3 of each half (8-byte accesses).
// Out-of-range half-warps still join the shuffles.
extern "C" __global__ void charlm_rope_norm_fwd(bf16* __restrict__ qkv, float* __restrict__ rstd,
                                                const bf16* __restrict__ cos_t,
                                                const bf16* __restrict__ sin_t, int64_t rows,
                                                int seq, int heads, int64_t row_stride,
                                                float eps) {
  const int64_t hw = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 4;
  const int sl = threadIdx.x & 15;
  const bool valid = hw < rows * 2 * heads;
  const int64_t w = valid ? hw : 0;
  const int64_t row = w / (2 * heads);
  const int ph = static_cast<int>(w % (2 * heads));
  const int t = static_cast<int>(row % seq);
  bf16* v = qkv + row * row_stride + static_cast<int64_t>(ph) * kHead;
  float x1[4], x2[4], c[4], s[4];
  load4(v + 4 * sl, x1);
  load4(v + kHalf + 4 * sl, x2);
  load4(cos_t + t * kHalf + 4 * sl, c);
  load4(sin_t + t * kHalf + 4 * sl, s);
  float y1[4], y2[4], ss = 0.f;
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    y1[k] = x1[k] * c[k] + x2[k] * s[k];
    y2[k] = -x1[k] * s[k] + x2[k] * c[k];
    ss += y1[k] * y1[k] + y2[k] * y2[k];
  }
  ss = half_warp_sum(ss);
  const float r = rsqrtf(ss / kHead + eps);
  if (!valid) return;
  if (sl == 0) rstd[row * 2 * heads + ph] = r;
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    y1[k] *= r;
    y2[k] *= r;
  }
  store4(v + 4 * sl, y1);
  store4(v + kHalf + 4 * sl, y2);
}

// Backward of charlm_rope_norm_fwd, and the gather of the three attention gradients into one
// contiguous [rows, 3·A] buffer for the projection's backward. The gradients g_q, g_k, g_v are
// [batch, seq, heads, 128] with element strides (sb, st, sh) each (whatever attention returned,
// multiples of 4); z is the saved normalized q/k in the projection buffer. For q and k:
// gy = rstd · (g − z · mean(g · z)), then the inverse rotation: gx1 = gy1·cos − gy2·sin,
// gx2 = gy1·sin + gy2·cos. v's gradient is copied as is. Half a warp per head vector.
extern "C" __global__ void charlm_rope_norm_bwd(
    const bf16* __restrict__ g_q, int64_t q_sb, int64_t q_st, int64_t q_sh,
    const bf16* __restrict__ g_k, int64_t k_sb, int64_t k_st, int64_t k_sh,
    const bf16* __restrict__ g_v, int64_t v_sb, int64_t v_st, int64_t v_sh,
    const bf16* __restrict__ z_buf, int64_t z_row_stride, const float* __restrict__ rstd,
    const bf16* __restrict__ cos_t, const bf16* __restrict__ sin_t, bf16* __restrict__ out,
    int64_t rows, int seq, int heads) {
  const int64_t hw = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 4;
  const int sl = threadIdx.x & 15;
  const bool valid = hw < rows * 3 * heads;
  const int64_t w = valid ? hw : 0;
  const int64_t row = w / (3 * heads);
  const int ph = static_cast<int>(w % (3 * heads));
  const int part = ph / heads;
  const int h = ph % heads;
  const int64_t b = row / seq;
  const int t = static_cast<int>(row % seq);
  bf16* o = out + row * 3 * heads * kHead + static_cast<int64_t>(ph) * kHead;
  // part is uniform across a half-warp, and both halves of a warp reach the shuffle below
  // unless both are v (then neither does).
  const bf16* g = part == 0   ? g_q + b * q_sb + t * q_st + h * q_sh
                  : part == 1 ? g_k + b * k_sb + t * k_st + h * k_sh
                              : g_v + b * v_sb + t * v_st + h * v_sh;
  float g1[4], g2[4];
  load4(g + 4 * sl, g1);
  load4(g + kHalf + 4 * sl, g2);
  const bool rotate = part < 2;
  float z1[4] = {0.f, 0.f, 0.f, 0.f}, z2[4] = {0.f, 0.f, 0.f, 0.f};
  float c[4] = {1.f, 1.f, 1.f, 1.f}, s[4] = {0.f, 0.f, 0.f, 0.f};
  float r = 1.f;
  if (rotate) {
    const bf16* z = z_buf + row * z_row_stride + static_cast<int64_t>(ph) * kHead;
    load4(z + 4 * sl, z1);
    load4(z + kHalf + 4 * sl, z2);
    load4(cos_t + t * kHalf + 4 * sl, c);
    load4(sin_t + t * kHalf + 4 * sl, s);
    r = rstd[row * 2 * heads + ph];
  }
  float dot = 0.f;
#pragma unroll
  for (int k = 0; k < 4; ++k) dot += g1[k] * z1[k] + g2[k] * z2[k];
  // Every lane of the warp takes part (v lanes contribute zeros to their own half only).
  dot = half_warp_sum(dot);
  if (!valid) return;
  if (!rotate) {
    store4(o + 4 * sl, g1);
    store4(o + kHalf + 4 * sl, g2);
    return;
  }
  const float mean = dot / kHead;
  float x1[4], x2[4];
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    const float gy1 = r * (g1[k] - z1[k] * mean), gy2 = r * (g2[k] - z2[k] * mean);
    x1[k] = gy1 * c[k] - gy2 * s[k];
    x2[k] = gy1 * s[k] + gy2 * c[k];
  }
  store4(o + 4 * sl, x1);
  store4(o + kHalf + 4 * sl, x2);
}

// The same two row norms with one block per row and 8 elements per thread (blockDim = cols/8,
// so cols is a multiple of 256): every input is read once, into registers, and many rows are in
// flight per multiprocessor.
__device__ __forceinline__ float block_sum(float v) {
  __shared__ float part[32];
  v = warp_sum(v);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  if (lane == 0) part[warp] = v;
  __syncthreads();
  return warp_sum(lane < static_cast<int>(blockDim.x >> 5) ? part[lane] : 0.f);
}

extern "C" __global__ void charlm_rmsnorm_fwd_row(const bf16* __restrict__ x,
                                                  bf16* __restrict__ y,
                                                  float* __restrict__ rstd, int64_t rows,
                                                  int cols, float eps) {
  const int64_t row = blockIdx.x;
  const int64_t at = row * (cols / 8) + threadIdx.x;
  float f[8];
  unpack8(reinterpret_cast<const uint4*>(x)[at], f);
  float ss = 0.f;
#pragma unroll
  for (int k = 0; k < 8; ++k) ss += f[k] * f[k];
  ss = block_sum(ss);
  const float r = rsqrtf(ss / cols + eps);
  if (threadIdx.x == 0) rstd[row] = r;
#pragma unroll
  for (int k = 0; k < 8; ++k) f[k] *= r;
  reinterpret_cast<uint4*>(y)[at] = pack8(f);
}

extern "C" __global__ void charlm_rmsnorm_bwd_row(const bf16* __restrict__ dy,
                                                  const bf16* __restrict__ y,
                                                  const float* __restrict__ rstd,
                                                  const bf16* __restrict__ dres,
                                                  bf16* __restrict__ dx, int64_t rows, int cols) {
  const int64_t row = blockIdx.x;
  const int64_t at = row * (cols / 8) + threadIdx.x;
  float a[8], b[8], c[8];
  unpack8(reinterpret_cast<const uint4*>(dy)[at], a);
  unpack8(reinterpret_cast<const uint4*>(y)[at], b);
  if (dres) {
    unpack8(reinterpret_cast<const uint4*>(dres)[at], c);
  } else {
#pragma unroll
    for (int k = 0; k < 8; ++k) c[k] = 0.f;
  }
  const float r = rstd[row];
  float dot = 0.f;
#pragma unroll
  for (int k = 0; k < 8; ++k) dot += a[k] * b[k];
  dot = block_sum(dot);
  const float mean = dot / cols;
#pragma unroll
  for (int k = 0; k < 8; ++k) a[k] = c[k] + r * (a[k] - b[k] * mean);
  reinterpret_cast<uint4*>(dx)[at] = pack8(a);
}

// a = relu(h)², 8 elements a thread (n is a multiple of 8).
extern "C" __global__ void charlm_relu2_fwd(const bf16* __restrict__ h, bf16* __restrict__ a,
                                            int64_t n8) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n8) return;
  float f[8];
  unpack8(reinterpret_cast<const uint4*>(h)[i], f);
#pragma unroll
  for (int k = 0; k < 8; ++k) {
    const float r = fmaxf(f[k], 0.f);
    f[k] = r * r;
  }
  reinterpret_cast<uint4*>(a)[i] = pack8(f);
}

// Backward of relu² when the forward kept a: dh = 2·da·h where h > 0, else 0, in place.
extern "C" __global__ void charlm_relu2_bwd_dh(const bf16* __restrict__ h,
                                               bf16* __restrict__ da_dh, int64_t n8) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n8) return;
  float f[8], g[8];
  unpack8(reinterpret_cast<const uint4*>(h)[i], f);
  unpack8(reinterpret_cast<const uint4*>(da_dh)[i], g);
#pragma unroll
  for (int k = 0; k < 8; ++k) g[k] = f[k] > 0.f ? 2.f * g[k] * f[k] : 0.f;
  reinterpret_cast<uint4*>(da_dh)[i] = pack8(g);
}

// Backward of relu²: recomputes a = relu(h)² (the down projection's weight gradient needs it) and
// turns the incoming gradient into dh = 2·da·h where h > 0, else 0, in place.
extern "C" __global__ void charlm_relu2_bwd(const bf16* __restrict__ h, bf16* __restrict__ da_dh,
                                            bf16* __restrict__ a, int64_t n8) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n8) return;
  float f[8], g[8];
  unpack8(reinterpret_cast<const uint4*>(h)[i], f);
  unpack8(reinterpret_cast<const uint4*>(da_dh)[i], g);
#pragma unroll
  for (int k = 0; k < 8; ++k) {
    const float r = fmaxf(f[k], 0.f);
    g[k] = f[k] > 0.f ? 2.f * g[k] * f[k] : 0.f;
    f[k] = r * r;
  }
  reinterpret_cast<uint4*>(a)[i] = pack8(f);
  reinterpret_cast<uint4*>(da_dh)[i] = pack8(g);
}

// nanochat 2026's per-layer scalars before a block: y = r·x + x0s·x0, 8 elements a thread, with
// r and x0s fp32 on the device (one layer's entries of the model's scalar vectors).
extern "C" __global__ void charlm_mix_fwd(const bf16* __restrict__ x, const bf16* __restrict__ x0,
                                          bf16* __restrict__ y, const float* __restrict__ r,
                                          const float* __restrict__ x0s, int64_t n8) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n8) return;
  const float a = *r, b = *x0s;
  float f[8], f0[8];
  unpack8(reinterpret_cast<const uint4*>(x)[i], f);
  unpack8(reinterpret_cast<const uint4*>(x0)[i], f0);
#pragma unroll
  for (int k = 0; k < 8; ++k) f[k] = a * f[k] + b * f0[k];
  reinterpret_cast<uint4*>(y)[i] = pack8(f);
}

// Its backward in one pass: gx = r·g, gx0 = x0s·g, and sums[0] += Σ g·x, sums[1] += Σ g·x0 (the
// scalars' gradients; one atomic pair per block of 256 threads).
extern "C" __global__ void charlm_mix_bwd(const bf16* __restrict__ g, const bf16* __restrict__ x,
                                          const bf16* __restrict__ x0, bf16* __restrict__ gx,
                                          bf16* __restrict__ gx0, const float* __restrict__ r,
                                          const float* __restrict__ x0s, float* __restrict__ sums,
                                          int64_t n8) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  float sx = 0.f, s0 = 0.f;
  if (i < n8) {
    const float a = *r, b = *x0s;
    float fg[8], fx[8], f0[8];
    unpack8(reinterpret_cast<const uint4*>(g)[i], fg);
    unpack8(reinterpret_cast<const uint4*>(x)[i], fx);
    unpack8(reinterpret_cast<const uint4*>(x0)[i], f0);
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      sx += fg[k] * fx[k];
      s0 += fg[k] * f0[k];
      fx[k] = a * fg[k];
      f0[k] = b * fg[k];
    }
    reinterpret_cast<uint4*>(gx)[i] = pack8(fx);
    reinterpret_cast<uint4*>(gx0)[i] = pack8(f0);
  }
  __shared__ float part[2][32];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  sx = warp_sum(sx);
  s0 = warp_sum(s0);
  if (lane == 0) {
    part[0][warp] = sx;
    part[1][warp] = s0;
  }
  __syncthreads();
  if (warp == 0) {
    const int warps = blockDim.x >> 5;
    sx = warp_sum(lane < warps ? part[0][lane] : 0.f);
    s0 = warp_sum(lane < warps ? part[1][lane] : 0.f);
    if (lane == 0) {
      atomicAdd(&sums[0], sx);
      atomicAdd(&sums[1], s0);
    }
  }
}

// Muon's Nesterov momentum in one pass, 4 elements a thread (n is a multiple of 4):
// g' = coef·g (the gradient clipping factor, when given), m ← lerp(m, g', 1 − β),
// x = bf16(lerp(g', m, β)), the Newton–Schulz input. The lerps are ATen's formulas for those
// weights (1 − β < 0.5 ≤ β): a + w·(b − a), and b − (b − a)·(1 − w).
extern "C" __global__ void charlm_muon_momentum(const float* __restrict__ g, float* __restrict__ m,
                                                bf16* __restrict__ x,
                                                const float* __restrict__ coef, int64_t n4,
                                                float beta) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n4) return;
  const float c = coef ? *coef : 1.f;
  float4 gv = reinterpret_cast<const float4*>(g)[i];
  float4 mv = reinterpret_cast<float4*>(m)[i];
  float gs[4] = {gv.x * c, gv.y * c, gv.z * c, gv.w * c};
  float ms[4] = {mv.x, mv.y, mv.z, mv.w};
  const float w = 1.f - beta;
  float out[4];
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    ms[k] = ms[k] + w * (gs[k] - ms[k]);
    out[k] = ms[k] - (ms[k] - gs[k]) * (1.f - beta);
  }
  reinterpret_cast<float4*>(m)[i] = make_float4(ms[0], ms[1], ms[2], ms[3]);
  bf162* xo = reinterpret_cast<bf162*>(x + 4 * i);
  xo[0] = __floats2bfloat162_rn(out[0], out[1]);
  xo[1] = __floats2bfloat162_rn(out[2], out[3]);
}
