//! charlm-trainer: data preparation, the GPT model, its optimizers, the training loop, checkpoints,
//! distributed launch, sampling and benchmarks. Knows nothing of Kubernetes.

pub mod vocab;
