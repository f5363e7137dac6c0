//! The one way out-of-memory is handled: libtorch reports it as a panic from tch, and the two
//! places that expect it (a probe asking "does this fit?", a training step that should name a
//! micro-batch that fits) catch it here, without the stack trace that would bury their answer.

use std::panic::{self, AssertUnwindSafe};
use std::sync::Arc;

/// libtorch ran out of memory inside [`catch`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutOfMemory;

/// Runs `f`; an out-of-memory panic becomes `Err(OutOfMemory)` and prints nothing. Any other
/// panic is reported by the usual hook and unwinds on.
pub fn catch<T>(f: impl FnOnce() -> T) -> Result<T, OutOfMemory> {
    let previous = Arc::new(panic::take_hook());
    let forward = previous.clone();
    panic::set_hook(Box::new(move |info| {
        if !is_out_of_memory(info.payload()) {
            forward(info);
        }
    }));
    let outcome = panic::catch_unwind(AssertUnwindSafe(f));
    // Dropping our hook drops its reference, so the one that was there before comes back as is.
    drop(panic::take_hook());
    if let Ok(hook) = Arc::try_unwrap(previous) {
        panic::set_hook(hook);
    }
    match outcome {
        Ok(value) => Ok(value),
        Err(payload) if is_out_of_memory(payload.as_ref()) => Err(OutOfMemory),
        Err(payload) => panic::resume_unwind(payload),
    }
}

fn is_out_of_memory(payload: &(dyn std::any::Any + Send)) -> bool {
    payload
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| payload.downcast_ref::<&str>().copied())
        .unwrap_or("")
        .contains("out of memory")
}
