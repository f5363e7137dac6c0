//! Checks that the fast training path computes what the straightforward one does: each fused
//! kernel against its eager twin, each eager twin against the plain formula (autograd for the
//! backward) in [`ops`]; whole-model losses and gradients and the optimizer step against the
//! reference model in [`models`]; loss curves of a fixed-seed training run in [`curve`].
//! `bench --check` and `bench --curve` run them at full size on a GPU; the tests run them small
//! on the CPU.

pub mod curve;
pub mod models;
pub mod ops;

use serde::Serialize;
use tch::{Kind, Tensor};

use crate::engine::{EngineOptions, Kernels, Recompute, Toggle};

/// How far `got` is from `want`: ‖got − want‖ / ‖want‖ and the largest absolute difference.
#[derive(Debug, Clone, Serialize)]
pub struct Diff {
    pub what: String,
    pub rel: f64,
    pub max_abs: f64,
}

pub fn diff(what: impl Into<String>, got: &Tensor, want: &Tensor) -> Diff {
    let (g, w) = (got.to_kind(Kind::Double), want.to_kind(Kind::Double));
    let d = &g - &w;
    let den = w.norm().double_value(&[]);
    let num = d.norm().double_value(&[]);
    Diff {
        what: what.into(),
        rel: if den > 0.0 { num / den } else { num },
        max_abs: d.abs().max().double_value(&[]),
    }
}

/// The options of the fast path in a given mode.
pub fn fast(kernels: Kernels, recompute: Recompute) -> EngineOptions {
    EngineOptions {
        kernels,
        recompute,
        weight_cache: Toggle::Auto,
        ..EngineOptions::default()
    }
}

/// Serializes the tests that seed tch's global generator.
#[cfg(test)]
fn lock() -> std::sync::MutexGuard<'static, ()> {
    crate::model::SEED_LOCK
        .lock()
        .unwrap_or_else(|e| e.into_inner())
}
