//! GPU facts from libtorch's CUDA side (see csrc/cuda_info.cpp): the device's name and the caching
//! allocator's peak, for benchmarks and progress reports. On CPU they say so instead of guessing.

use tch::{Device, Tensor};

extern "C" {
    fn charlm_cuda_device_name(device: i32, buf: *mut std::os::raw::c_char, len: i32) -> i32;
    fn charlm_cuda_peak_allocated(device: i32) -> i64;
    fn charlm_cuda_reset_peak(device: i32) -> i32;
    fn charlm_cuda_total_memory(device: i32) -> i64;
    fn charlm_cuda_capability(device: i32) -> i32;
    fn charlm_cuda_empty_cache() -> i32;
    fn charlm_pin_memory(tensor: *const std::ffi::c_void) -> *mut std::ffi::c_void;
}

pub fn device_name(device: Device) -> String {
    match device {
        Device::Cuda(i) => {
            let mut buf = [0 as std::os::raw::c_char; 256];
            // SAFETY: the buffer outlives the call and its length is passed along.
            let rc =
                unsafe { charlm_cuda_device_name(i as i32, buf.as_mut_ptr(), buf.len() as i32) };
            if rc != 0 {
                return format!("cuda:{i}");
            }
            // SAFETY: snprintf wrote a NUL-terminated string into `buf`.
            unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) }
                .to_string_lossy()
                .into_owned()
        }
        other => format!("{other:?}").to_lowercase(),
    }
}

/// Peak memory the caching allocator handed out since the last reset, in GiB (None on CPU).
pub fn peak_memory_gib(device: Device) -> Option<f64> {
    match device {
        Device::Cuda(i) => {
            // SAFETY: a plain query; returns -1 on any failure.
            let bytes = unsafe { charlm_cuda_peak_allocated(i as i32) };
            (bytes >= 0).then(|| bytes as f64 / (1u64 << 30) as f64)
        }
        _ => None,
    }
}

pub fn reset_peak_memory(device: Device) {
    if let Device::Cuda(i) = device {
        // SAFETY: a plain allocator call; failures are ignored (the peak is then just higher).
        unsafe { charlm_cuda_reset_peak(i as i32) };
    }
}

/// The GPU's memory in bytes (None on CPU).
pub fn total_memory(device: Device) -> Option<u64> {
    match device {
        Device::Cuda(i) => {
            // SAFETY: a plain query; returns -1 on any failure.
            let bytes = unsafe { charlm_cuda_total_memory(i as i32) };
            (bytes > 0).then_some(bytes as u64)
        }
        _ => None,
    }
}

/// The GPU's compute capability as (major, minor); None on CPU or when the query fails.
pub fn capability(device: Device) -> Option<(i32, i32)> {
    match device {
        Device::Cuda(i) => {
            // SAFETY: a plain query; returns -1 on any failure.
            let c = unsafe { charlm_cuda_capability(i as i32) };
            (c >= 0).then_some((c / 10, c % 10))
        }
        _ => None,
    }
}

/// Releases the caching allocator's free blocks (after an out-of-memory probe).
pub fn empty_cache(device: Device) {
    if device.is_cuda() {
        // SAFETY: a plain allocator call.
        unsafe { charlm_cuda_empty_cache() };
    }
}

/// A copy of host tensor `t` in pinned memory, so that its copy to the GPU can overlap with the
/// GPU's work; `t` itself when pinning fails (the copy is then merely synchronous).
pub fn pinned(t: &Tensor) -> Tensor {
    // SAFETY: a tch tensor handle is an `at::Tensor*`; the bridge only reads through it and
    // returns a new heap handle (or null), whose ownership passes to the returned Tensor.
    let out = unsafe { charlm_pin_memory(t.as_ptr().cast()) };
    if out.is_null() {
        return t.shallow_clone();
    }
    unsafe { Tensor::from_ptr(out.cast()) }
}
