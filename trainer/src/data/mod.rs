//! The data: the 17-character vocabulary, the prepared dataset's `format` (files and manifest),
//! its writer `prepare` (with the document `scanner`), the memory-mapped dataset that
//! training windows are read from, and the `order` they are read in.

pub mod dataset;
pub mod format;
pub mod order;
pub mod prepare;
mod scanner;
pub mod synthetic;
pub mod vocab;
