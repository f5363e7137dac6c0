//! What the rest of the trainer stands on and that knows nothing of models: CUDA queries, staging
//! directories, the random streams, user errors and exit codes, the C++ bridge's error helper, and
//! the TensorBoard event writer.

pub mod cuda;
pub mod error;
pub mod ffi;
pub mod profiler;
pub mod rng;
pub mod staging;
pub mod tensorboard;
