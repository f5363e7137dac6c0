//! libtorch's (Kineto) profiler over a region, for `bench --profile` (csrc/extras.cpp).

use std::ffi::c_char;
use std::os::raw::c_int;

use anyhow::Result;

use super::ffi::{check, take_string};

extern "C" {
    fn charlm_profiler_start() -> *mut c_char;
    fn charlm_profiler_stop(top: c_int, report: *mut *mut c_char) -> *mut c_char;
}

/// Starts the profiler for CPU ops and CUDA kernels.
pub fn start() -> Result<()> {
    check(unsafe { charlm_profiler_start() })
}

/// Stops the profiler; returns a table of GPU time per kernel name, the `top` largest.
pub fn stop(top: usize) -> Result<String> {
    let mut report: *mut c_char = std::ptr::null_mut();
    check(unsafe { charlm_profiler_stop(top as c_int, &mut report) })?;
    if report.is_null() {
        return Ok(String::new());
    }
    // SAFETY: a non-NULL report is a malloc'd string whose ownership passes to us.
    Ok(unsafe { take_string(report) })
}
