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

// Rotary embedding then RMS norm of every 128-wide q and k head, in place in the [rows, 3·A]
// projection buffer (q at column 0, k at column A = heads·128, v after them, untouched).
// Rotation of the halves (x1, x2) by the position's angles: y1 = x1·cos + x2·sin,
// y2 = −x1·sin + x2·cos; cos/sin are [seq, 64] tables. rstd is [rows, 2·heads].
// One warp per head vector; lane l owns pairs (2l, 2l+1) of each half.
extern "C" __global__ void charlm_rope_norm_fwd(bf16* __restrict__ qkv, float* __restrict__ rstd,
                                                const bf16* __restrict__ cos_t,
                                                const bf16* __restrict__ sin_t, int64_t rows,
                                                int seq, int heads, int64_t row_stride,
                                                float eps) {
  const int64_t w = global_warp();
  const int lane = threadIdx.x & 31;
  if (w >= rows * 2 * heads) return;
  const int64_t row = w / (2 * heads);
  const int ph = static_cast<int>(w % (2 * heads));
  const int t = static_cast<int>(row % seq);
  bf16* v = qkv + row * row_stride + static_cast<int64_t>(ph) * kHead;
  const float2 x1 = __bfloat1622float2(*reinterpret_cast<const bf162*>(v + 2 * lane));
  const float2 x2 = __bfloat1622float2(*reinterpret_cast<const bf162*>(v + kHalf + 2 * lane));
  const float2 c = __bfloat1622float2(*reinterpret_cast<const bf162*>(cos_t + t * kHalf + 2 * lane));
  const float2 s = __bfloat1622float2(*reinterpret_cast<const bf162*>(sin_t + t * kHalf + 2 * lane));
  const float y1a = x1.x * c.x + x2.x * s.x, y1b = x1.y * c.y + x2.y * s.y;
  const float y2a = -x1.x * s.x + x2.x * c.x, y2b = -x1.y * s.y + x2.y * c.y;
  const float ss = warp_sum(y1a * y1a + y1b * y1b + y2a * y2a + y2b * y2b);
  const float r = rsqrtf(ss / kHead + eps);
  if (lane == 0) rstd[row * 2 * heads + ph] = r;
  *reinterpret_cast<bf162*>(v + 2 * lane) = __floats2bfloat162_rn(y1a * r, y1b * r);
  *reinterpret_cast<bf162*>(v + kHalf + 2 * lane) = __floats2bfloat162_rn(y2a * r, y2b * r);
}

// Backward of charlm_rope_norm_fwd, and the gather of the three attention gradients into one
// contiguous [rows, 3·A] buffer for the projection's backward. The gradients g_q, g_k, g_v are
// [batch, seq, heads, 128] with element strides (sb, st, sh) each (whatever attention returned);
// z is the saved normalized q/k in the projection buffer. For q and k:
// gy = rstd · (g − z · mean(g · z)), then the inverse rotation: gx1 = gy1·cos − gy2·sin,
// gx2 = gy1·sin + gy2·cos. v's gradient is copied as is.
extern "C" __global__ void charlm_rope_norm_bwd(
    const bf16* __restrict__ g_q, int64_t q_sb, int64_t q_st, int64_t q_sh,
    const bf16* __restrict__ g_k, int64_t k_sb, int64_t k_st, int64_t k_sh,
    const bf16* __restrict__ g_v, int64_t v_sb, int64_t v_st, int64_t v_sh,
    const bf16* __restrict__ z_buf, int64_t z_row_stride, const float* __restrict__ rstd,
    const bf16* __restrict__ cos_t, const bf16* __restrict__ sin_t, bf16* __restrict__ out,
    int64_t rows, int seq, int heads) {
  const int64_t w = global_warp();
  const int lane = threadIdx.x & 31;
  if (w >= rows * 3 * heads) return;
  const int64_t row = w / (3 * heads);
  const int ph = static_cast<int>(w % (3 * heads));
  const int part = ph / heads;
  const int h = ph % heads;
  const int64_t b = row / seq;
  const int t = static_cast<int>(row % seq);
  bf16* o = out + row * 3 * heads * kHead + static_cast<int64_t>(ph) * kHead;
  if (part == 2) {
    const bf16* g = g_v + b * v_sb + t * v_st + h * v_sh;
    *reinterpret_cast<bf162*>(o + 2 * lane) = *reinterpret_cast<const bf162*>(g + 2 * lane);
    *reinterpret_cast<bf162*>(o + kHalf + 2 * lane) =
        *reinterpret_cast<const bf162*>(g + kHalf + 2 * lane);
    return;
  }
  const bf16* g = part == 0 ? g_q + b * q_sb + t * q_st + h * q_sh
                            : g_k + b * k_sb + t * k_st + h * k_sh;
  const bf16* z = z_buf + row * z_row_stride + static_cast<int64_t>(ph) * kHead;
  const float2 g1 = __bfloat1622float2(*reinterpret_cast<const bf162*>(g + 2 * lane));
  const float2 g2 = __bfloat1622float2(*reinterpret_cast<const bf162*>(g + kHalf + 2 * lane));
  const float2 z1 = __bfloat1622float2(*reinterpret_cast<const bf162*>(z + 2 * lane));
  const float2 z2 = __bfloat1622float2(*reinterpret_cast<const bf162*>(z + kHalf + 2 * lane));
  const float dot = warp_sum(g1.x * z1.x + g1.y * z1.y + g2.x * z2.x + g2.y * z2.y);
  const float mean = dot / kHead;
  const float r = rstd[row * 2 * heads + ph];
  const float gy1a = r * (g1.x - z1.x * mean), gy1b = r * (g1.y - z1.y * mean);
  const float gy2a = r * (g2.x - z2.x * mean), gy2b = r * (g2.y - z2.y * mean);
  const float2 c = __bfloat1622float2(*reinterpret_cast<const bf162*>(cos_t + t * kHalf + 2 * lane));
  const float2 s = __bfloat1622float2(*reinterpret_cast<const bf162*>(sin_t + t * kHalf + 2 * lane));
  *reinterpret_cast<bf162*>(o + 2 * lane) =
      __floats2bfloat162_rn(gy1a * c.x - gy2a * s.x, gy1b * c.y - gy2b * s.y);
  *reinterpret_cast<bf162*>(o + kHalf + 2 * lane) =
      __floats2bfloat162_rn(gy1a * s.x + gy2a * c.x, gy1b * s.y + gy2b * c.y);
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
