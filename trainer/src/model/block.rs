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
        x0: *const CTensor,
        r: *const CTensor,
        x0s: *const CTensor,
        layer: i64,
        batch: i64,
        heads: i64,
        fused: c_int,
        recompute: c_int,
        cudnn: c_int,
        keep_act: c_int,
        f8_flags: c_int,
        out: *mut *mut CTensor,
    ) -> *mut c_char;
    fn charlm_fp8_weights(
        w: *const *const CTensor,
        out: *const *const CTensor,
        inv: *const CTensor,
        fused: c_int,
    ) -> *mut c_char;
    fn charlm_attention_probe(
        batch: i64,
        heads: i64,
        seq: i64,
        device: c_int,
        rel: *mut f64,
    ) -> *mut c_char;
    fn charlm_fused_status(device: c_int) -> *mut c_char;
    fn charlm_fused_op(
        op: c_int,
        inputs: *const *const CTensor,
        fused: c_int,
        p0: i64,
        p1: i64,
        f8_scale: *const CTensor,
        f8_fmt: c_int,
        out: *mut *mut CTensor,
        n_out: *mut c_int,
    ) -> *mut c_char;
}

fn ptr(t: Option<&Tensor>) -> *const CTensor {
    t.map_or(std::ptr::null(), |t| t.as_ptr().cast())
}

/// The tensors one block hands the bridge, in the order of csrc/block.cpp's
/// `CHARLM_BLOCK_TENSORS` (a test holds the two lists equal): the engine's views of one block
/// ([`BlockViews`]), the model's own q, k, v matrices, the `[seq, 64]` rotary tables, and with
/// FP8 products the e4m3 weights, their transposes, their inverse scales and the block's FP8
/// scales ([`Fp8Views`]).
pub const TENSOR_NAMES: [&str; 23] = [
    "wqkv", "wq", "wk", "wv", "wo", "wfc", "wp", "gqkv", "go", "gfc", "gp", "cos", "sin", "wqkv8",
    "wo8", "wfc8", "wp8", "wqkv8t", "wo8t", "wfc8t", "wp8t", "winv", "f8",
];

/// One block's FP8 tensors: e4m3 weights `[out, in]` of q|k|v, the attention output, MLP up and
/// down, their transposes `[in, out]`, the inverse weight scales `[4]`, and the activation and
/// gradient scales `[3, 8]` (scale, 1/scale, amax of each role; src/engine/fp8.rs).
pub struct Fp8Views {
    pub w8: [Tensor; 4],
    pub w8t: [Tensor; 4],
    pub winv: Tensor,
    pub scales: Tensor,
}

impl Fp8Views {
    pub fn shallow_clone(&self) -> Self {
        Self {
            w8: self.w8.each_ref().map(|t| t.shallow_clone()),
            w8t: self.w8t.each_ref().map(|t| t.shallow_clone()),
            winv: self.winv.shallow_clone(),
            scales: self.scales.shallow_clone(),
        }
    }
}

fn tensor_pointers(
    views: &BlockViews,
    own: &Block,
    cos: &Tensor,
    sin: &Tensor,
) -> [*const CTensor; TENSOR_NAMES.len()] {
    let f8 = views.fp8.as_ref();
    let w8 = |i: usize| f8.map(|f| &f.w8[i]);
    let w8t = |i: usize| f8.map(|f| &f.w8t[i]);
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
        ptr(w8(0)),
        ptr(w8(1)),
        ptr(w8(2)),
        ptr(w8(3)),
        ptr(w8t(0)),
        ptr(w8t(1)),
        ptr(w8t(2)),
        ptr(w8t(3)),
        ptr(f8.map(|f| &f.winv)),
        ptr(f8.map(|f| &f.scales)),
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
    /// With FP8 views: scale each tensor by its own amax (else by the recorded ones).
    pub f8_dynamic: bool,
    /// With FP8 views: the weight gradients' products in FP8 too.
    pub f8_wgrad: bool,
}

/// nanochat 2026's per-layer scalars as a block applies them to its input: `r[layer]·x +
/// x0s[layer]·x0`, with `r` and `x0s` the model's fp32 `[depth]` scalars and `x0` the `[N, C]`
/// normed embedding.
pub struct Scalars<'a> {
    pub x0: &'a Tensor,
    pub r: &'a Tensor,
    pub x0s: &'a Tensor,
    pub layer: usize,
}

/// Runs one block on `x` (`[N, C]`, contiguous; with `scalars`, the block's input is made of it
/// and x0 first) and records its backward; the weight gradients are added to the `g*` buffers
/// during the backward pass, those of x, x0 and the scalars go to autograd.
#[allow(clippy::too_many_arguments)]
pub fn block(
    x: &Tensor,
    views: &BlockViews,
    own: &Block,
    rotary: (&Tensor, &Tensor),
    scalars: Option<Scalars>,
    batch: i64,
    heads: i64,
    mode: BlockMode,
) -> Result<Tensor> {
    let tensors = tensor_pointers(views, own, rotary.0, rotary.1);
    let sc = scalars.as_ref();
    let mut out: *mut CTensor = std::ptr::null_mut();
    // SAFETY: x and every tensor are live (or NULL where allowed) for the call's duration; on
    // success `out` is a new `at::Tensor*` whose ownership passes to the returned Tensor.
    check(unsafe {
        charlm_block_apply(
            ptr(Some(x)),
            tensors.as_ptr(),
            ptr(sc.map(|s| s.x0)),
            ptr(sc.map(|s| s.r)),
            ptr(sc.map(|s| s.x0s)),
            sc.map_or(0, |s| s.layer as i64),
            batch,
            heads,
            mode.fused as c_int,
            mode.recompute as c_int,
            mode.cudnn as c_int,
            mode.keep_act as c_int,
            mode.f8_dynamic as c_int | (mode.f8_wgrad as c_int) << 1,
            &mut out,
        )
    })?;
    Ok(unsafe { Tensor::from_ptr(out.cast()) })
}

/// One block's fp32 matrices `own` to e4m3 with tensorwise scales (q, k and v share one) into
/// `fp8`'s weights and transposes, their inverse scales into `fp8.winv`; `fused`: by the CUDA
/// kernel, else ATen ops.
pub fn fp8_weights(own: &Block, fp8: &Fp8Views, fused: bool) -> Result<()> {
    let w = [
        &own.c_q,
        &own.c_k,
        &own.c_v,
        &own.attn_proj,
        &own.c_fc,
        &own.mlp_proj,
    ]
    .map(|t| ptr(Some(t)));
    let out: Vec<*const CTensor> = fp8
        .w8
        .iter()
        .chain(&fp8.w8t)
        .map(|t| ptr(Some(t)))
        .collect();
    // SAFETY: every tensor is live for the call; the bridge writes into `out` and `winv` only.
    check(unsafe {
        charlm_fp8_weights(
            w.as_ptr(),
            out.as_ptr(),
            ptr(Some(&fp8.winv)),
            fused as c_int,
        )
    })
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
    /// The FP8 cast on its own (needs a scale).
    CastF8,
}

/// Runs `op` on `inputs` (None for an optional input) with the fused kernel or its eager twin.
pub fn op(
    op: Op,
    inputs: &[Option<&Tensor>],
    fused: bool,
    p0: i64,
    p1: i64,
) -> Result<Vec<Tensor>> {
    op_f8(op, inputs, fused, p0, p1, None)
}

/// [`op`], also writing the FP8 copy of the output a matrix product reads, with `f8`'s scale (a
/// 0-dim fp32 tensor) and format (e5m2 when true, else e4m3): the outputs are followed by that copy
/// as fp32 (its unscaled fp8 values) and its amax.
pub fn op_f8(
    op: Op,
    inputs: &[Option<&Tensor>],
    fused: bool,
    p0: i64,
    p1: i64,
    f8: Option<(&Tensor, bool)>,
) -> Result<Vec<Tensor>> {
    let ptrs: Vec<*const CTensor> = inputs.iter().map(|t| ptr(*t)).collect();
    let mut out = [std::ptr::null_mut::<CTensor>(); 4];
    let mut n_out: c_int = 0;
    // SAFETY: inputs live for the call; outputs are new tensors owned by the caller.
    check(unsafe {
        charlm_fused_op(
            op as c_int,
            ptrs.as_ptr(),
            fused as c_int,
            p0,
            p1,
            ptr(f8.map(|(s, _)| s)),
            f8.is_some_and(|(_, e5m2)| e5m2) as c_int,
            out.as_mut_ptr(),
            &mut n_out,
        )
    })?;
    Ok(out[..n_out as usize]
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
