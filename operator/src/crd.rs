//! The `CharLMTraining` API (crate `charlm-api`, api/src) under the name the operator's modules
//! import it by.

pub use charlm_api::*;
