//! Placeholder.
pub const VOCAB_SIZE: usize = 32;
