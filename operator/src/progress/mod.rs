//! Rank 0's progress: the HTTP poller that reads its report while the training runs (`poll`); the
//! report's conversion into the status lives with the status, in the api crate (`charlm_api::status`).

mod poll;

pub use charlm_api::human_duration;
pub use poll::{Networks, PollError, ProgressClient, MAX_REPORT_BYTES};
