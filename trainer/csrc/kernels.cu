// The trainer's fused elementwise kernels (bf16 in and out, fp32 arithmetic). build.rs compiles this
// file with nvcc into a fatbin (sm_90 machine code + compute_90 PTX) that block.cpp embeds and loads
// through the CUDA driver API, so the binary needs no CUDA runtime of its own. Each kernel has an
// eager ATen twin in block.cpp with the same math; `bench --check` compares the two on a GPU.
//
// Layouts: rows are tokens (N = batch × seq), row-major, bf16. Heads are 128 wide.
//
// FP8 copies (--precision fp8): a kernel given `x8` also writes x8 = saturate(x·scale), rounded to
// nearest, in e4m3 (fmt 0) or e5m2 (fmt 1), of the bf16 value it writes to its bf16 output (so the
// copy is exactly what a cast of that output gives: the eager twins in ops.cpp do that), and raises
// `*amax` to the largest |x| it wrote (delayed scaling: the scale of the next micro-batch comes
// from it, see src/engine/fp8.rs). `scale` and `amax` are fp32 scalars on the device.

#include <cuda_bf16.h>
#include <cuda_fp8.h>
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

__device__ __forceinline__ __nv_fp8_interpretation_t f8_kind(int fmt) {
  return fmt ? __NV_E5M2 : __NV_E4M3;
}

// Two values scaled and saturated to fp8, a in the low byte.
__device__ __forceinline__ uint32_t f8x2(float a, float b, float s, int fmt) {
  return __nv_cvt_float2_to_fp8x2(make_float2(a * s, b * s), __NV_SATFINITE, f8_kind(fmt));
}

__device__ __forceinline__ uint32_t f8x4(const float* f, float s, int fmt) {
  return f8x2(f[0], f[1], s, fmt) | (f8x2(f[2], f[3], s, fmt) << 16);
}

__device__ __forceinline__ uint2 f8x8(const float f[8], float s, int fmt) {
  return make_uint2(f8x4(f, s, fmt), f8x4(f + 4, s, fmt));
}

__device__ __forceinline__ float abs_max8(const float f[8]) {
  float m = 0.f;
#pragma unroll
  for (int k = 0; k < 8; ++k) m = fmaxf(m, fabsf(f[k]));
  return m;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// *amax = max(*amax, m) for m >= 0: non-negative floats order like their bits as ints. Most calls
// find a larger value there already and skip the atomic.
__device__ __forceinline__ void commit_amax(float* amax, float m) {
  if (m > __ldcg(amax)) atomicMax(reinterpret_cast<int*>(amax), __float_as_int(m));
}

// The block's largest m into *amax; every thread of the block must call it.
__device__ __forceinline__ void block_commit_amax(float* amax, float m) {
  __shared__ float part[32];
  m = warp_max(m);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  if (lane == 0) part[warp] = m;
  __syncthreads();
  if (warp == 0) {
    m = warp_max(lane < static_cast<int>(blockDim.x >> 5) ? part[lane] : 0.f);
    if (lane == 0) commit_amax(amax, m);
  }
}

}  // namespace

// y = x · rsqrt(mean(x²) + eps) per row of `cols` (a multiple of 8); rstd[row] keeps the factor.
// One warp per row; the second pass re-reads the row from L1/L2. y8: optional FP8 copy of y.
extern "C" __global__ void charlm_rmsnorm_fwd(const bf16* __restrict__ x, bf16* __restrict__ y,
                                              float* __restrict__ rstd, int64_t rows, int cols,
                                              float eps, uint8_t* __restrict__ y8,
                                              const float* __restrict__ scale,
                                              float* __restrict__ amax, int fmt) {
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
  const float s8 = y8 ? *scale : 0.f;
  float m = 0.f;
  for (int i = lane; i < nvec; i += 32) {
    float f[8];
    unpack8(xr[i], f);
#pragma unroll
    for (int k = 0; k < 8; ++k) f[k] *= r;
    const uint4 out = pack8(f);
    yr[i] = out;
    if (y8) {
      unpack8(out, f);
      m = fmaxf(m, abs_max8(f));
      reinterpret_cast<uint2*>(y8 + row * cols)[i] = f8x8(f, s8, fmt);
    }
  }
  if (y8) {
    m = warp_max(m);
    if (lane == 0) commit_amax(amax, m);
  }
}

// Backward of the row norm given its output y and factor rstd, plus an optional residual gradient:
// dx = dres + rstd · (dy − y · mean(dy · y)). dx8: optional FP8 copy of dx.
extern "C" __global__ void charlm_rmsnorm_bwd(const bf16* __restrict__ dy,
                                              const bf16* __restrict__ y,
                                              const float* __restrict__ rstd,
                                              const bf16* __restrict__ dres, bf16* __restrict__ dx,
                                              int64_t rows, int cols, uint8_t* __restrict__ dx8,
                                              const float* __restrict__ scale,
                                              float* __restrict__ amax, int fmt) {
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
  const float s8 = dx8 ? *scale : 0.f;
  float m = 0.f;
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
    const uint4 out = pack8(a);
    dxr[i] = out;
    if (dx8) {
      unpack8(out, a);
      m = fmaxf(m, abs_max8(a));
      reinterpret_cast<uint2*>(dx8 + row * cols)[i] = f8x8(a, s8, fmt);
    }
  }
  if (dx8) {
    m = warp_max(m);
    if (lane == 0) commit_amax(amax, m);
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
// out8: optional FP8 copy of out.
extern "C" __global__ void charlm_rope_norm_bwd(
    const bf16* __restrict__ g_q, int64_t q_sb, int64_t q_st, int64_t q_sh,
    const bf16* __restrict__ g_k, int64_t k_sb, int64_t k_st, int64_t k_sh,
    const bf16* __restrict__ g_v, int64_t v_sb, int64_t v_st, int64_t v_sh,
    const bf16* __restrict__ z_buf, int64_t z_row_stride, const float* __restrict__ rstd,
    const bf16* __restrict__ cos_t, const bf16* __restrict__ sin_t, bf16* __restrict__ out,
    int64_t rows, int seq, int heads, uint8_t* __restrict__ out8,
    const float* __restrict__ scale, float* __restrict__ amax, int fmt) {
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
  const int64_t at = row * 3 * heads * kHead + static_cast<int64_t>(ph) * kHead;
  // part is uniform across a half-warp; every lane of the warp reaches both shuffles below.
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
  // v lanes contribute zeros to their own half only.
  dot = half_warp_sum(dot);
  float x1[4], x2[4];
  if (rotate) {
    const float mean = dot / kHead;
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const float gy1 = r * (g1[k] - z1[k] * mean), gy2 = r * (g2[k] - z2[k] * mean);
      x1[k] = gy1 * c[k] - gy2 * s[k];
      x2[k] = gy1 * s[k] + gy2 * c[k];
    }
  } else {
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      x1[k] = g1[k];
      x2[k] = g2[k];
    }
  }
  if (valid) {
    store4(out + at + 4 * sl, x1);
    store4(out + at + kHalf + 4 * sl, x2);
  }
  if (out8) {
    // The FP8 copy of the bf16 values just stored.
    float m = 0.f;
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      x1[k] = __bfloat162float(__float2bfloat16_rn(x1[k]));
      x2[k] = __bfloat162float(__float2bfloat16_rn(x2[k]));
      m = fmaxf(m, fmaxf(fabsf(x1[k]), fabsf(x2[k])));
    }
    if (valid) {
      const float s8 = *scale;
      *reinterpret_cast<uint32_t*>(out8 + at + 4 * sl) = f8x4(x1, s8, fmt);
      *reinterpret_cast<uint32_t*>(out8 + at + kHalf + 4 * sl) = f8x4(x2, s8, fmt);
    } else {
      m = 0.f;
    }
    m = warp_max(m);
    if ((threadIdx.x & 31) == 0) commit_amax(amax, m);
  }
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
                                                  int cols, float eps, uint8_t* __restrict__ y8,
                                                  const float* __restrict__ scale,
                                                  float* __restrict__ amax, int fmt) {
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
  const uint4 out = pack8(f);
  reinterpret_cast<uint4*>(y)[at] = out;
  if (y8) {
    unpack8(out, f);
    reinterpret_cast<uint2*>(y8)[at] = f8x8(f, *scale, fmt);
    block_commit_amax(amax, abs_max8(f));
  }
}

extern "C" __global__ void charlm_rmsnorm_bwd_row(const bf16* __restrict__ dy,
                                                  const bf16* __restrict__ y,
                                                  const float* __restrict__ rstd,
                                                  const bf16* __restrict__ dres,
                                                  bf16* __restrict__ dx, int64_t rows, int cols,
                                                  uint8_t* __restrict__ dx8,
                                                  const float* __restrict__ scale,
                                                  float* __restrict__ amax, int fmt) {
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
  const uint4 out = pack8(a);
  reinterpret_cast<uint4*>(dx)[at] = out;
  if (dx8) {
    unpack8(out, a);
    reinterpret_cast<uint2*>(dx8)[at] = f8x8(a, *scale, fmt);
    block_commit_amax(amax, abs_max8(a));
  }
}

// nanochat 2026's per-layer scalars fused into the block's first row norm: xin = a·x + b·x0 (a, b
// the layer's fp32 scalars on the device) rounded to bf16 and written, then the row norm of those
// bf16 values, as charlm_mix_fwd followed by charlm_rmsnorm_fwd_row computes it, in one pass.
extern "C" __global__ void charlm_mix_rmsnorm_fwd_row(
    const bf16* __restrict__ x, const bf16* __restrict__ x0, const float* __restrict__ lam,
    const float* __restrict__ lam0, bf16* __restrict__ xin, bf16* __restrict__ y,
    float* __restrict__ rstd, int64_t rows, int cols, float eps, uint8_t* __restrict__ y8,
    const float* __restrict__ scale, float* __restrict__ amax, int fmt) {
  const int64_t row = blockIdx.x;
  const int64_t at = row * (cols / 8) + threadIdx.x;
  const float a = *lam, b = *lam0;
  float f[8], f0[8];
  unpack8(reinterpret_cast<const uint4*>(x)[at], f);
  unpack8(reinterpret_cast<const uint4*>(x0)[at], f0);
#pragma unroll
  for (int k = 0; k < 8; ++k) f[k] = a * f[k] + b * f0[k];
  const uint4 mixed = pack8(f);
  reinterpret_cast<uint4*>(xin)[at] = mixed;
  unpack8(mixed, f);
  float ss = 0.f;
#pragma unroll
  for (int k = 0; k < 8; ++k) ss += f[k] * f[k];
  ss = block_sum(ss);
  const float r = rsqrtf(ss / cols + eps);
  if (threadIdx.x == 0) rstd[row] = r;
#pragma unroll
  for (int k = 0; k < 8; ++k) f[k] *= r;
  const uint4 out = pack8(f);
  reinterpret_cast<uint4*>(y)[at] = out;
  if (y8) {
    unpack8(out, f);
    reinterpret_cast<uint2*>(y8)[at] = f8x8(f, *scale, fmt);
    block_commit_amax(amax, abs_max8(f));
  }
}

// Backward of the block's first row norm (with the residual gradient dres) and then of the
// per-layer scalars, as charlm_rmsnorm_bwd_row followed by charlm_mix_bwd computes them: with g
// the bf16 gradient of xin, gx = a·g, gx0 = b·g, sums[0] += Σ g·x, sums[1] += Σ g·x0.
extern "C" __global__ void charlm_rmsnorm_mix_bwd_row(
    const bf16* __restrict__ dy, const bf16* __restrict__ y, const float* __restrict__ rstd,
    const bf16* __restrict__ dres, const bf16* __restrict__ x, const bf16* __restrict__ x0,
    const float* __restrict__ lam, const float* __restrict__ lam0, bf16* __restrict__ gx,
    bf16* __restrict__ gx0, float* __restrict__ sums, int64_t rows, int cols) {
  const int64_t row = blockIdx.x;
  const int64_t at = row * (cols / 8) + threadIdx.x;
  float g[8], b[8], c[8];
  unpack8(reinterpret_cast<const uint4*>(dy)[at], g);
  unpack8(reinterpret_cast<const uint4*>(y)[at], b);
  unpack8(reinterpret_cast<const uint4*>(dres)[at], c);
  const float r = rstd[row];
  float dot = 0.f;
#pragma unroll
  for (int k = 0; k < 8; ++k) dot += g[k] * b[k];
  dot = block_sum(dot);
  const float mean = dot / cols;
#pragma unroll
  for (int k = 0; k < 8; ++k) g[k] = c[k] + r * (g[k] - b[k] * mean);
  unpack8(pack8(g), g);
  const float la = *lam, lb = *lam0;
  float fx[8], f0[8];
  unpack8(reinterpret_cast<const uint4*>(x)[at], fx);
  unpack8(reinterpret_cast<const uint4*>(x0)[at], f0);
  float sx = 0.f, s0 = 0.f;
#pragma unroll
  for (int k = 0; k < 8; ++k) {
    sx += g[k] * fx[k];
    s0 += g[k] * f0[k];
    fx[k] = la * g[k];
    f0[k] = lb * g[k];
  }
  reinterpret_cast<uint4*>(gx)[at] = pack8(fx);
  reinterpret_cast<uint4*>(gx0)[at] = pack8(f0);
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

// a = relu(h)², 8 elements a thread (n is a multiple of 8). `a` may be NULL when only the FP8
// copy a8 is wanted.
extern "C" __global__ void charlm_relu2_fwd(const bf16* __restrict__ h, bf16* __restrict__ a,
                                            int64_t n8, uint8_t* __restrict__ a8,
                                            const float* __restrict__ scale,
                                            float* __restrict__ amax, int fmt) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  float m = 0.f;
  if (i < n8) {
    float f[8];
    unpack8(reinterpret_cast<const uint4*>(h)[i], f);
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      const float r = fmaxf(f[k], 0.f);
      f[k] = r * r;
    }
    const uint4 out = pack8(f);
    if (a) reinterpret_cast<uint4*>(a)[i] = out;
    if (a8) {
      unpack8(out, f);
      m = abs_max8(f);
      reinterpret_cast<uint2*>(a8)[i] = f8x8(f, *scale, fmt);
    }
  }
  if (a8) block_commit_amax(amax, m);
}

// Backward of relu² when the forward kept a: dh = 2·da·h where h > 0, else 0, in place.
extern "C" __global__ void charlm_relu2_bwd_dh(const bf16* __restrict__ h,
                                               bf16* __restrict__ da_dh, int64_t n8,
                                               uint8_t* __restrict__ dh8,
                                               const float* __restrict__ scale,
                                               float* __restrict__ amax, int fmt) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  float m = 0.f;
  if (i < n8) {
    float f[8], g[8];
    unpack8(reinterpret_cast<const uint4*>(h)[i], f);
    unpack8(reinterpret_cast<const uint4*>(da_dh)[i], g);
#pragma unroll
    for (int k = 0; k < 8; ++k) g[k] = f[k] > 0.f ? 2.f * g[k] * f[k] : 0.f;
    const uint4 out = pack8(g);
    reinterpret_cast<uint4*>(da_dh)[i] = out;
    if (dh8) {
      unpack8(out, g);
      m = abs_max8(g);
      reinterpret_cast<uint2*>(dh8)[i] = f8x8(g, *scale, fmt);
    }
  }
  if (dh8) block_commit_amax(amax, m);
}

// Backward of relu²: recomputes a = relu(h)² (the down projection's weight gradient needs it) and
// turns the incoming gradient into dh = 2·da·h where h > 0, else 0, in place.
extern "C" __global__ void charlm_relu2_bwd(const bf16* __restrict__ h, bf16* __restrict__ da_dh,
                                            bf16* __restrict__ a, int64_t n8,
                                            uint8_t* __restrict__ dh8,
                                            const float* __restrict__ scale,
                                            float* __restrict__ amax, int fmt) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  float m = 0.f;
  if (i < n8) {
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
    const uint4 out = pack8(g);
    reinterpret_cast<uint4*>(da_dh)[i] = out;
    if (dh8) {
      unpack8(out, g);
      m = abs_max8(g);
      reinterpret_cast<uint2*>(dh8)[i] = f8x8(g, *scale, fmt);
    }
  }
  if (dh8) block_commit_amax(amax, m);
}

// The FP8 copy of a bf16 tensor of n8·8 elements (for tensors no fused kernel of ours writes:
// the attention output and the block's incoming gradient). amax may be NULL.
extern "C" __global__ void charlm_cast_f8(const bf16* __restrict__ x, uint8_t* __restrict__ x8,
                                          int64_t n8, const float* __restrict__ scale,
                                          float* __restrict__ amax, int fmt) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  float m = 0.f;
  if (i < n8) {
    float f[8];
    unpack8(reinterpret_cast<const uint4*>(x)[i], f);
    m = abs_max8(f);
    reinterpret_cast<uint2*>(x8)[i] = f8x8(f, *scale, fmt);
  }
  if (amax) block_commit_amax(amax, m);
}

// An fp32 matrix w [rows, cols] (contiguous) to e4m3 with *scale, written twice: as is, row r at
// out + r·out_stride, and transposed, column c at out_t + c·out_t_stride (the layouts cuBLASLt's
// FP8 products need for the forward and for the input gradient). One 32×32 tile per block of
// 256 threads, transposed through shared memory.
extern "C" __global__ void charlm_weight_f8(const float* __restrict__ w, int rows, int cols,
                                            uint8_t* __restrict__ out, int64_t out_stride,
                                            uint8_t* __restrict__ out_t, int64_t out_t_stride,
                                            const float* __restrict__ scale) {
  __shared__ uint8_t tile[32][33];
  const int tiles_x = (cols + 31) / 32;
  const int r0 = (blockIdx.x / tiles_x) * 32, c0 = (blockIdx.x % tiles_x) * 32;
  const int tx = threadIdx.x & 31, ty = threadIdx.x >> 5;
  const float s = *scale;
#pragma unroll
  for (int j = 0; j < 32; j += 8) {
    const int r = r0 + ty + j, c = c0 + tx;
    uint8_t v = 0;
    if (r < rows && c < cols) {
      v = __nv_cvt_float_to_fp8(w[static_cast<int64_t>(r) * cols + c] * s, __NV_SATFINITE,
                                 __NV_E4M3);
      out[static_cast<int64_t>(r) * out_stride + c] = v;
    }
    tile[ty + j][tx] = v;
  }
  __syncthreads();
#pragma unroll
  for (int j = 0; j < 32; j += 8) {
    const int c = c0 + ty + j, r = r0 + tx;
    if (r < rows && c < cols) out_t[static_cast<int64_t>(c) * out_t_stride + r] = tile[tx][ty + j];
  }
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
