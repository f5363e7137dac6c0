//! End-to-end test support.

pub mod cluster;
pub mod kueue;
pub mod progress;
pub mod specs;
pub mod traffic;
pub mod training_env;
