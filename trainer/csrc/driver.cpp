// Loads the fatbin built from kernels.cu once per device with the driver API (dlopen of libcuda,
// which every CUDA machine has, so the binary links no CUDA runtime of its own) and launches its
// kernels on libtorch's current stream.
#include "driver.h"

#include <c10/util/Exception.h>

#include <cstdint>
#include <map>
#include <mutex>
#include <string>

#ifdef CHARLM_WITH_CUDA
#include <c10/cuda/CUDAStream.h>
#include <cuda.h>
#include <dlfcn.h>

#include "charlm_kernels_fatbin.inc"  // kCharlmFatbin, kCharlmFatbinSize (0 when nvcc was absent)
#endif

namespace charlm {

using at::Tensor;

const char* const kKernelNames[kNumKernels] = {
    "charlm_rmsnorm_fwd",   "charlm_rmsnorm_bwd",   "charlm_rmsnorm_fwd_row",
    "charlm_rmsnorm_bwd_row", "charlm_rope_norm_fwd", "charlm_rope_norm_bwd",
    "charlm_relu2_fwd",     "charlm_relu2_bwd",     "charlm_relu2_bwd_dh",
    "charlm_muon_momentum", "charlm_mix_fwd",       "charlm_mix_bwd",
    "charlm_cast_f8",       "charlm_weight_f8",     "charlm_mix_rmsnorm_fwd_row",
    "charlm_rmsnorm_mix_bwd_row"};

#ifdef CHARLM_WITH_CUDA
namespace {

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

}  // namespace

void require_kernels(int device) { module_for(device); }

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

}  // namespace charlm
