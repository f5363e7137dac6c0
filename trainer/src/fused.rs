//! The C++ side of the fast model path (csrc/block.cpp): one autograd node per transformer block
//! with a hand-written backward, its elementwise steps as fused CUDA kernels (csrc/kernels.cu) or
//! their eager ATen twins, plus a kernel-level profiler for `bench --profile`.

use std::ffi::c_void;
use std::ffi::CStr;
use std::os::raw::{c_char, c_int};

use anyhow::{bail, Result};
use tch::Tensor;

/// A tch tensor handle as the bridge sees it: an `at::Tensor*` (torch-sys's `C_tensor`).
type CTensor = c_void;

extern "C" {
    fn charlm_block_apply(
        tensors: *const *const CTensor,
        batch: i64,
        heads: i64,
        fused: c_int,
        recompute: c_int,
        out: *mut *mut CTensor,
    ) -> *mut c_char;
    fn charlm_set_grad(param: *mut CTensor, grad: *const CTensor) -> *mut c_char;
    fn charlm_fused_status(device: c_int) -> *mut c_char;
    fn charlm_fused_op(
        op: c_int,
        inputs: *const *const CTensor,
        fused: c_int,
        p0: i64,
        p1: i64,
        out: *mut *mut CTensor,
    ) -> *mut c_char;
    fn charlm_profiler_start() -> *mut c_char;
    fn charlm_profiler_stop(top: c_int, report: *mut *mut c_char) -> *mut c_char;
    fn charlm_free(p: *mut c_void);
}

/// Turns a C++ error message (NULL = success) into a Result, freeing it.
fn check(message: *mut c_char) -> Result<()> {
    if message.is_null() {
        return Ok(());
    }
    // SAFETY: the bridge returns a NUL-terminated malloc'd string and gives up ownership.
    let text = unsafe { CStr::from_ptr(message) }
        .to_string_lossy()
        .into_owned();
    unsafe { charlm_free(message.cast()) };
    bail!("{text}")
}

fn ptr(t: Option<&Tensor>) -> *const CTensor {
    t.map_or(std::ptr::null(), |t| t.as_ptr().cast())
}

/// The weights one block reads and the fp32 gradient buffers it accumulates into.
pub struct BlockTensors<'a> {
    /// `[3A, C]` q, k, v weights in the compute kind, if cached; else `wq`, `wk`, `wv` are
    /// concatenated (and cast) on each use.
    pub wqkv: Option<&'a Tensor>,
    pub wq: &'a Tensor,
    pub wk: &'a Tensor,
    pub wv: &'a Tensor,
    pub wo: &'a Tensor,
    pub wfc: &'a Tensor,
    pub wp: &'a Tensor,
    pub gqkv: &'a Tensor,
    pub go: &'a Tensor,
    pub gfc: &'a Tensor,
    pub gp: &'a Tensor,
    /// `[seq, 64]` rotary tables in the compute kind.
    pub cos: &'a Tensor,
    pub sin: &'a Tensor,
}

/// Runs one block on `x` (`[N, C]`, contiguous) and records its backward; the weight gradients
/// are added to the `g*` buffers during the backward pass.
pub fn block(
    x: &Tensor,
    w: &BlockTensors,
    batch: i64,
    heads: i64,
    fused: bool,
    recompute: bool,
) -> Result<Tensor> {
    let tensors = [
        ptr(Some(x)),
        ptr(w.wqkv),
        ptr(Some(w.wq)),
        ptr(Some(w.wk)),
        ptr(Some(w.wv)),
        ptr(Some(w.wo)),
        ptr(Some(w.wfc)),
        ptr(Some(w.wp)),
        ptr(Some(w.gqkv)),
        ptr(Some(w.go)),
        ptr(Some(w.gfc)),
        ptr(Some(w.gp)),
        ptr(Some(w.cos)),
        ptr(Some(w.sin)),
    ];
    let mut out: *mut CTensor = std::ptr::null_mut();
    // SAFETY: every pointer is a live tensor (or NULL where allowed) for the call's duration; on
    // success `out` is a new `at::Tensor*` whose ownership passes to the returned Tensor.
    check(unsafe {
        charlm_block_apply(
            tensors.as_ptr(),
            batch,
            heads,
            fused as c_int,
            recompute as c_int,
            &mut out,
        )
    })?;
    Ok(unsafe { Tensor::from_ptr(out.cast()) })
}

/// Makes `grad` the `.grad` of `param`: autograd then accumulates into that storage in place.
pub fn set_grad(param: &Tensor, grad: &Tensor) -> Result<()> {
    // SAFETY: both are live tensors; the bridge only assigns the gradient handle.
    check(unsafe { charlm_set_grad(param.as_ptr() as *mut CTensor, ptr(Some(grad))) })
}

/// Ok when the fused CUDA kernels can run on CUDA device `index`, else why not.
pub fn status(index: usize) -> Result<()> {
    check(unsafe { charlm_fused_status(index as c_int) })
}

/// The elementwise steps, one at a time, for checks (see `charlm_fused_op`).
#[derive(Clone, Copy, Debug)]
pub enum Op {
    RmsNormFwd,
    RmsNormBwd,
    RopeNormFwd,
    RopeNormBwd,
    Relu2Fwd,
    Relu2Bwd,
}

impl Op {
    fn outputs(self) -> usize {
        match self {
            Op::RmsNormFwd | Op::RopeNormFwd | Op::Relu2Bwd => 2,
            _ => 1,
        }
    }
}

/// Runs `op` on `inputs` (None for an optional input) with the fused kernel or its eager twin.
pub fn op(
    op: Op,
    inputs: &[Option<&Tensor>],
    fused: bool,
    p0: i64,
    p1: i64,
) -> Result<Vec<Tensor>> {
    let ptrs: Vec<*const CTensor> = inputs.iter().map(|t| ptr(*t)).collect();
    let mut out = [std::ptr::null_mut::<CTensor>(); 2];
    // SAFETY: inputs live for the call; outputs are new tensors owned by the caller.
    check(unsafe {
        charlm_fused_op(
            op as c_int,
            ptrs.as_ptr(),
            fused as c_int,
            p0,
            p1,
            out.as_mut_ptr(),
        )
    })?;
    Ok(out[..op.outputs()]
        .iter()
        .map(|p| unsafe { Tensor::from_ptr(p.cast()) })
        .collect())
}

/// Starts libtorch's (Kineto) profiler for CPU ops and CUDA kernels.
pub fn profiler_start() -> Result<()> {
    check(unsafe { charlm_profiler_start() })
}

/// Stops the profiler; returns a table of GPU time per kernel name, the `top` largest.
pub fn profiler_stop(top: usize) -> Result<String> {
    let mut report: *mut c_char = std::ptr::null_mut();
    check(unsafe { charlm_profiler_stop(top as c_int, &mut report) })?;
    if report.is_null() {
        return Ok(String::new());
    }
    let text = unsafe { CStr::from_ptr(report) }
        .to_string_lossy()
        .into_owned();
    unsafe { charlm_free(report.cast()) };
    Ok(text)
}
