//! charlm-trainer: data preparation, the GPT model, its optimizers, the training loop, checkpoints,
//! distributed launch, sampling and benchmarks. Knows nothing of Kubernetes.

pub mod autobatch;
pub mod bench;
pub mod checkpoint;
pub mod cuda;
pub mod dataset;
pub mod dist;
pub mod engine;
pub mod error;
pub mod fused;
pub mod generate;
pub mod launch;
pub mod model;
pub mod optim;
pub mod prepare;
pub mod progress;
pub mod rng;
pub mod sample;
pub mod staging;
pub mod tensorboard;
pub mod train;
pub mod verify;
pub mod vocab;
