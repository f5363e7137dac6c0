//! Errors the user can fix (bad input, impossible settings) exit with code 2 so that a supervisor
//! (the launcher, the operator) knows a retry cannot help; a full checkpoint volume exits 3 (a
//! restart would hit the same wall at the next save); every other error exits 1.

use std::fmt;

/// An error caused by the user's input or settings. Its message names the place and the fix.
#[derive(Debug)]
pub struct UserError(pub String);

impl fmt::Display for UserError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UserError {}

/// Returns early with a [`UserError`] built like `format!`.
#[macro_export]
macro_rules! user_bail {
    ($($arg:tt)*) => {
        return Err(anyhow::Error::new($crate::sys::error::UserError(format!($($arg)*))))
    };
}

/// A checkpoint that did not fit on its volume. Its message names the folder, the bytes a
/// checkpoint needs and what is free.
#[derive(Debug)]
pub struct StorageFull(pub String);

impl fmt::Display for StorageFull {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for StorageFull {}

/// The process exit code for an error: 3 for a full checkpoint volume, 2 when the user can fix
/// it, 1 otherwise.
pub fn exit_code(err: &anyhow::Error) -> i32 {
    if err.chain().any(|e| e.is::<StorageFull>()) {
        charlm_contract::exit::STORAGE_FULL
    } else if err.chain().any(|e| e.is::<UserError>()) {
        charlm_contract::exit::BAD_INPUT
    } else {
        charlm_contract::exit::FAILURE
    }
}

/// The kind of the first I/O error in `err`'s chain, also one that libtorch's bindings wrap
/// (neither `TchError::Io` nor its safetensors error shows it as a source).
pub fn io_kind(err: &anyhow::Error) -> Option<std::io::ErrorKind> {
    use safetensors::SafeTensorError;
    use tch::TchError;
    err.chain().find_map(|e| {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            return Some(io.kind());
        }
        match e.downcast_ref::<TchError>()? {
            TchError::Io(io)
            | TchError::SafeTensorError {
                err: SafeTensorError::IoError(io),
                ..
            } => Some(io.kind()),
            _ => None,
        }
    })
}

/// Whether `err` is a write that found no room: a full filesystem (ENOSPC) or a quota (EDQUOT).
pub fn is_out_of_space(err: &anyhow::Error) -> bool {
    matches!(
        io_kind(err),
        Some(std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded)
    )
}

/// Whether `err` is a write to a pipe whose reader is gone.
pub fn is_broken_pipe(err: &anyhow::Error) -> bool {
    err.chain().any(|e| {
        e.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}
