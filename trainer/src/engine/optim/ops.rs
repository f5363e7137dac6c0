//! The optimizers' steps that run in C++ (csrc/extras.cpp): Muon's momentum as one kernel, an
//! in-place scaled add, and handing autograd a gradient buffer of ours.

use std::ffi::c_void;
use std::os::raw::{c_char, c_int};

use anyhow::Result;
use tch::Tensor;

use crate::sys::ffi::check;

/// A tch tensor handle as the bridge sees it: an `at::Tensor*` (torch-sys's `C_tensor`).
type CTensor = c_void;

extern "C" {
    fn charlm_muon_momentum(
        g: *const CTensor,
        m: *mut CTensor,
        coef: *const CTensor,
        beta: f64,
        fused: c_int,
        out: *mut *mut CTensor,
    ) -> *mut c_char;
    fn charlm_add_scaled(dst: *mut CTensor, src: *const CTensor, alpha: f64) -> *mut c_char;
    fn charlm_set_grad(param: *mut CTensor, grad: *const CTensor) -> *mut c_char;
}

fn ptr(t: Option<&Tensor>) -> *const CTensor {
    t.map_or(std::ptr::null(), |t| t.as_ptr().cast())
}

/// Muon's momentum step: `m ← lerp(m, coef·g, 1 − β)` in place, and returns
/// `bf16(lerp(coef·g, m, β))`, one CUDA kernel when `fused`, else ATen's lerps.
pub fn muon_momentum(
    g: &Tensor,
    m: &Tensor,
    coef: Option<&Tensor>,
    beta: f64,
    fused: bool,
) -> Result<Tensor> {
    let mut out: *mut CTensor = std::ptr::null_mut();
    // SAFETY: live tensors; m is updated in place through its storage; out is a new tensor.
    check(unsafe {
        charlm_muon_momentum(
            ptr(Some(g)),
            m.as_ptr() as *mut CTensor,
            ptr(coef),
            beta,
            fused as c_int,
            &mut out,
        )
    })?;
    Ok(unsafe { Tensor::from_ptr(out.cast()) })
}

/// `dst += alpha · src` in `dst`'s type, in place.
pub fn add_scaled(dst: &Tensor, src: &Tensor, alpha: f64) -> Result<()> {
    // SAFETY: both tensors are live; the bridge adds in place into dst's storage.
    check(unsafe { charlm_add_scaled(dst.as_ptr() as *mut CTensor, ptr(Some(src)), alpha) })
}

/// Makes `grad` the `.grad` of `param`: autograd then accumulates into that storage in place.
pub fn set_grad(param: &Tensor, grad: &Tensor) -> Result<()> {
    // SAFETY: both are live tensors; the bridge only assigns the gradient handle.
    check(unsafe { charlm_set_grad(param.as_ptr() as *mut CTensor, ptr(Some(grad))) })
}
