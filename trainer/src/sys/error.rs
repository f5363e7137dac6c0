//! Errors the user can fix (bad input, impossible settings) exit with code 2 so that a supervisor
//! (the launcher, the operator) knows a retry cannot help; every other error exits 1.

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

/// The process exit code for an error: 2 when the user can fix it, 1 otherwise.
pub fn exit_code(err: &anyhow::Error) -> i32 {
    if err.chain().any(|e| e.is::<UserError>()) {
        charlm_contract::exit::BAD_INPUT
    } else {
        charlm_contract::exit::FAILURE
    }
}

/// Whether `err` is a write to a pipe whose reader is gone.
pub fn is_broken_pipe(err: &anyhow::Error) -> bool {
    err.chain().any(|e| {
        e.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}
