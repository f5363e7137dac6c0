//! What the trainer's exit codes mean to whoever supervises it (the launcher, the operator).

/// An error the user can fix (bad input, impossible settings): a retry cannot help.
pub const BAD_INPUT: i32 = 2;

/// A checkpoint could not be written because its volume is full (ENOSPC or a quota): a restart
/// would train up to the next save and hit the same wall. The message names the folder, the
/// bytes a checkpoint needs and what is free; the partial write was removed and every checkpoint
/// saved before is intact.
pub const STORAGE_FULL: i32 = 3;

/// Any other error: a restart may help.
pub const FAILURE: i32 = 1;
