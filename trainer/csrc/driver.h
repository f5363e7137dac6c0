// The fused CUDA kernels of kernels.cu as the C++ sees them: their ids, and a launch on libtorch's
// current stream through the CUDA driver API (driver.cpp loads the embedded fatbin once per device).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace charlm {

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
  kMixFwd,
  kMixBwd,
  kCastF8,
  kWeightF8,
  kMixRmsFwdReg,
  kRmsMixBwdReg,
  kNumKernels
};
extern const char* const kKernelNames[kNumKernels];
// Widths that are a multiple of 256 (up to 8192) use the block-per-row norms, cols/8 threads.
inline bool row_norm(int cols) { return cols % 256 == 0 && cols <= 8192; }

#ifdef CHARLM_WITH_CUDA
// Loads the fatbin into `device`'s primary context, or throws with why the kernels are unavailable.
void require_kernels(int device);
// Launches kernel `k` with `threads_total` threads in blocks of `block` on `on`'s device.
void launch(const at::Tensor& on, KernelId k, int64_t threads_total, int block, void** args);
#endif

// Throws unless `t` is a bf16 CUDA tensor and this binary has CUDA.
void require_fusable(const at::Tensor& t, const char* what);
bool aligned16(const at::Tensor& t);

}  // namespace charlm
