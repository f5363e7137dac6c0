//! The two optimizers of nanochat: Muon for the blocks' matrices and AdamW for the embedding and
//! lm_head. Both update fp32 parameters in place and keep their state as named tensors so that a
//! checkpoint restores them exactly.
//!
//! [`orthogonalize`] holds the Newton–Schulz iterations Muon's update goes through, [`ops`] the
//! steps that run in C++.

pub mod adamw;
pub mod muon;
pub(crate) mod ops;
pub mod orthogonalize;

pub use adamw::AdamW;
pub use muon::{muon_momentum, Muon, Shard};
pub use orthogonalize::Orthogonalizer;
