//! What the rest of the trainer stands on and that knows nothing of models: CUDA queries, staging
//! directories, the random streams, user errors and exit codes, the room left on a disk, figures as people read them, the flags'
//! shared checks and naming rule, the JSON Lines event stream, the C++ bridge's error helper, the
//! TensorBoard event writer, and child processes tied to their parent.

pub mod children;
pub mod cuda;
pub mod disk;
pub mod error;
pub mod events;
pub mod ffi;
pub mod figures;
pub mod flags;
pub mod profiler;
pub mod rng;
pub mod staging;
pub mod tensorboard;
