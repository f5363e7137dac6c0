//! The data: the 17-character vocabulary, `prepare`'s on-disk format (writer and manifest reader),
//! and the memory-mapped dataset that training windows are read from.

pub mod dataset;
pub mod prepare;
pub mod synthetic;
pub mod vocab;
