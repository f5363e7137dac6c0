//! End-to-end test support.

pub mod cluster;
pub mod training_env;
