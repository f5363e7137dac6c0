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
        cudnn: c_int,
        keep_act: c_int,
        out: *mut *mut CTensor,
    ) -> *mut c_char;
    fn charlm_attention_probe(
        batch: i64,
        heads: i64,
        seq: i64,
        device: c_int,
        rel: *mut f64,
    ) -> *mut c_char;
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

/// How one block runs: fused kernels or eager twins, recomputation, the attention kernel.
#[derive(Clone, Copy, Debug)]
pub struct BlockMode {
    pub fused: bool,
    pub recompute: bool,
    /// cuDNN's fused attention instead of flash attention (CUDA only).
    pub cudnn: bool,
    /// Keep relu(h)² for the backward (more memory) instead of recomputing it there.
    pub keep_act: bool,
}

/// Runs one block on `x` (`[N, C]`, contiguous) and records its backward; the weight gradients
/// are added to the `g*` buffers during the backward pass.
pub fn block(
    x: &Tensor,
    w: &BlockTensors,
    batch: i64,
    heads: i64,
    mode: BlockMode,
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
            mode.fused as c_int,
            mode.recompute as c_int,
            mode.cudnn as c_int,
            mode.keep_act as c_int,
            &mut out,
        )
    })?;
    Ok(unsafe { Tensor::from_ptr(out.cast()) })
}

/// Causal attention forward + backward with cuDNN vs flash attention on random data of this
/// shape on CUDA device `index`: the largest relative difference of output and gradients.
pub fn attention_probe(batch: i64, heads: i64, seq: i64, index: usize) -> Result<f64> {
    let mut rel = f64::NAN;
    check(unsafe { charlm_attention_probe(batch, heads, seq, index as c_int, &mut rel) })?;
    Ok(rel)
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
    Relu2BwdDh,
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
