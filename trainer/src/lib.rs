//! charlm-trainer: data preparation, the GPT model, its optimizers, the training loop, checkpoints,
//! distributed launch, sampling and benchmarks. Knows nothing of Kubernetes; what it shares with the
//! operator (the progress report, environment names, ports, exit codes) is `charlm-contract`.
//!
//! The folders, each depending only on those listed after it:
//! `commands` (one module per subcommand but `train`) → `train` (plan, session, checkpoints,
//! resume, progress) → `engine` (options, the memory model, optimizers, the step, the micro-batch
//! probe, verification) → `model` (the reference GPT and the C++ block bridge) → `dist`
//! (process groups) → `data` (vocabulary, the prepared format and its writer `prepare`, the
//! dataset reader and its order) → `sys` (CUDA queries, staging directories, random streams,
//! errors, the FFI error helper, TensorBoard).

pub mod commands;
pub mod data;
pub mod dist;
pub mod engine;
pub mod model;
pub mod sys;
pub mod train;
