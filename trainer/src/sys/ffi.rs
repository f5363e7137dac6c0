//! The C++ bridges' (csrc/) one convention for errors and owned buffers: every exported function
//! returns NULL on success or a malloc'd, NUL-terminated message (csrc/guarded.h), and anything
//! else it hands over is malloc'd too. Rust takes ownership here and frees with the allocator that
//! made it.

use std::ffi::{c_char, c_void, CStr};

use anyhow::{anyhow, Result};

extern "C" {
    fn charlm_free(p: *mut c_void);
}

/// Turns a bridge call's return value into a Result, freeing the message.
pub(crate) fn check(message: *mut c_char) -> Result<()> {
    if message.is_null() {
        return Ok(());
    }
    // SAFETY: a non-NULL return is a NUL-terminated malloc'd string whose ownership passes to us.
    Err(anyhow!(unsafe { take_string(message) }))
}

/// Copies a malloc'd C string the bridge handed over and frees it.
///
/// # Safety
/// `p` is a non-NULL, NUL-terminated string from malloc that nothing else frees.
pub(crate) unsafe fn take_string(p: *mut c_char) -> String {
    // SAFETY: as the caller promises.
    let text = unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned();
    // SAFETY: freed once, by the allocator that made it.
    unsafe { free(p.cast()) };
    text
}

/// Frees a buffer the bridge handed over.
///
/// # Safety
/// `p` came from malloc in the bridge and is freed only here.
pub(crate) unsafe fn free(p: *mut c_void) {
    // SAFETY: as the caller promises.
    unsafe { charlm_free(p) }
}
