// Device facts libtorch has but tch does not expose: the GPU's name and the caching allocator's
// peak, which `bench` and the progress endpoint report. Compiled only into CUDA-capable builds
// (every build from the PyPI wheel); the functions return -1 when no GPU is present.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAFunctions.h>

#include <cstdint>
#include <cstdio>

extern "C" {

int charlm_cuda_device_name(int device, char* buf, int len) {
  try {
    if (device < 0 || device >= static_cast<int>(c10::cuda::device_count())) return -1;
    const cudaDeviceProp* prop = at::cuda::getDeviceProperties(static_cast<c10::DeviceIndex>(device));
    std::snprintf(buf, static_cast<size_t>(len), "%s", prop->name);
    return 0;
  } catch (...) {
    return -1;
  }
}

int64_t charlm_cuda_peak_allocated(int device) {
  try {
    auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats(static_cast<c10::DeviceIndex>(device));
    return stats.allocated_bytes[0].peak;  // index 0: aggregate over pool types
  } catch (...) {
    return -1;
  }
}

int charlm_cuda_reset_peak(int device) {
  try {
    c10::cuda::CUDACachingAllocator::resetPeakStats(static_cast<c10::DeviceIndex>(device));
    return 0;
  } catch (...) {
    return -1;
  }
}

int64_t charlm_cuda_total_memory(int device) {
  try {
    if (device < 0 || device >= static_cast<int>(c10::cuda::device_count())) return -1;
    return static_cast<int64_t>(
        at::cuda::getDeviceProperties(static_cast<c10::DeviceIndex>(device))->totalGlobalMem);
  } catch (...) {
    return -1;
  }
}

// The compute capability as major·10 + minor (90 on Hopper), or -1.
int charlm_cuda_capability(int device) {
  try {
    if (device < 0 || device >= static_cast<int>(c10::cuda::device_count())) return -1;
    const cudaDeviceProp* prop = at::cuda::getDeviceProperties(static_cast<c10::DeviceIndex>(device));
    return prop->major * 10 + prop->minor;
  } catch (...) {
    return -1;
  }
}

// Returns cached blocks to the driver, so that after an out-of-memory probe the next, smaller
// attempt starts from a clean slate.
int charlm_cuda_empty_cache() {
  try {
    c10::cuda::CUDACachingAllocator::emptyCache();
    return 0;
  } catch (...) {
    return -1;
  }
}

// A pinned copy of a host tensor, as a new `at::Tensor*` (tch's `C_tensor`), or null on failure.
// tch's own pin_memory always names the device, which libtorch 2.11 deprecates with a warning
// printed on every call, i.e. on every micro-batch.
void* charlm_pin_memory(const void* tensor) {
  try {
    return new at::Tensor(static_cast<const at::Tensor*>(tensor)->pin_memory());
  } catch (...) {
    return nullptr;
  }
}

}  // extern "C"
