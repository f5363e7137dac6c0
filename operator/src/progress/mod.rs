//! Rank 0's progress: the report the trainer writes, into the status (`report`), and the HTTP
//! poller that reads it while the training runs (`poll`).

mod poll;
mod report;

pub use poll::{Networks, PollError, ProgressClient, MAX_REPORT_BYTES};
pub use report::human_duration;
