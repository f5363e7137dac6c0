//! The bridge to csrc/block.cpp: one autograd node per transformer block with a hand-written
//! backward, its elementwise steps as fused CUDA kernels (csrc/kernels.cu) or their eager ATen
//! twins (csrc/ops.cpp), and the attention probe that `auto` asks.

use std::ffi::c_void;
use std::os::raw::{c_char, c_int};

use anyhow::Result;
use tch::Tensor;

use super::{Block, BlockViews};
use crate::sys::ffi::check;

/// A tch tensor handle as the bridge sees it: an `at::Tensor*` (torch-sys's `C_tensor`).
type CTensor = c_void;

extern "C" {
    fn charlm_block_apply(
        x: *const CTensor,
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
    fn charlm_fused_status(device: c_int) -> *mut c_char;
    fn charlm_mix_apply(
        x: *const CTensor,
        x0: *const CTensor,
        r: *const CTensor,
        x0s: *const CTensor,
        layer: i64,
        fused: c_int,
        out: *mut *mut CTensor,
    ) -> *mut c_char;
    fn charlm_fused_op(
        op: c_int,
        inputs: *const *const CTensor,
        fused: c_int,
        p0: i64,
        p1: i64,
        out: *mut *mut CTensor,
    ) -> *mut c_char;
}

fn ptr(t: Option<&Tensor>) -> *const CTensor {
    t.map_or(std::ptr::null(), |t| t.as_ptr().cast())
}

/// The tensors one block hands the bridge, in the order of csrc/block.cpp's
/// `CHARLM_BLOCK_TENSORS` (a test holds the two lists equal): the engine's views of one block
/// ([`BlockViews`]), the model's own q, k, v matrices, and the `[seq, 64]` rotary tables.
pub const TENSOR_NAMES: [&str; 13] = [
    "wqkv", "wq", "wk", "wv", "wo", "wfc", "wp", "gqkv", "go", "gfc", "gp", "cos", "sin",
];

fn tensor_pointers(
    views: &BlockViews,
    own: &Block,
    cos: &Tensor,
    sin: &Tensor,
) -> [*const CTensor; TENSOR_NAMES.len()] {
    [
        ptr(views.wqkv.as_ref()),
        ptr(Some(&own.c_q)),
        ptr(Some(&own.c_k)),
        ptr(Some(&own.c_v)),
        ptr(Some(&views.wo)),
        ptr(Some(&views.wfc)),
        ptr(Some(&views.wp)),
        ptr(Some(&views.gqkv)),
        ptr(Some(&views.go)),
        ptr(Some(&views.gfc)),
        ptr(Some(&views.gp)),
        ptr(Some(cos)),
        ptr(Some(sin)),
    ]
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
    views: &BlockViews,
    own: &Block,
    rotary: (&Tensor, &Tensor),
    batch: i64,
    heads: i64,
    mode: BlockMode,
) -> Result<Tensor> {
    let tensors = tensor_pointers(views, own, rotary.0, rotary.1);
    let mut out: *mut CTensor = std::ptr::null_mut();
    // SAFETY: x and every tensor are live (or NULL where allowed) for the call's duration; on
    // success `out` is a new `at::Tensor*` whose ownership passes to the returned Tensor.
    check(unsafe {
        charlm_block_apply(
            ptr(Some(x)),
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

/// nanochat 2026's per-layer scalars before block `layer`: `r[layer]·x + x0s[layer]·x0` as one
/// autograd node (csrc/mix.cpp), with fused kernels or their eager twins; `r` and `x0s` are the
/// model's fp32 `[depth]` scalars, `x` and `x0` the `[N, C]` stream and the normed embedding.
pub fn mix(
    x: &Tensor,
    x0: &Tensor,
    r: &Tensor,
    x0s: &Tensor,
    layer: usize,
    fused: bool,
) -> Result<Tensor> {
    let mut out: *mut CTensor = std::ptr::null_mut();
    // SAFETY: the four tensors are live for the call's duration; on success `out` is a new
    // `at::Tensor*` whose ownership passes to the returned Tensor.
    check(unsafe {
        charlm_mix_apply(
            ptr(Some(x)),
            ptr(Some(x0)),
            ptr(Some(r)),
            ptr(Some(x0s)),
            layer as i64,
            fused as c_int,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::ffi;

    extern "C" {
        fn charlm_block_tensor_names() -> *mut std::ffi::c_char;
    }

    #[test]
    fn rust_and_cpp_name_the_block_tensors_alike() {
        // SAFETY: the bridge returns a malloc'd comma-separated list and gives up ownership.
        let names = unsafe { ffi::take_string(charlm_block_tensor_names()) };
        assert_eq!(names.split(',').collect::<Vec<_>>(), TENSOR_NAMES);
    }
}
