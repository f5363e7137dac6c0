//! What the trainer's exit codes mean to whoever supervises it (the launcher, the operator).

/// An error the user can fix (bad input, impossible settings): a retry cannot help.
pub const BAD_INPUT: i32 = 2;

/// Any other error: a restart may help.
pub const FAILURE: i32 = 1;
