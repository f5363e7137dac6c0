//! The two clocks of a training: `activeDeadlineSeconds`, from its creation (waiting, restarts and
//! suspension included, so a deadline bounds the whole wall time a user waits), and
//! `ttlSecondsAfterFinished`, from its completion. Pure arithmetic on timestamps; the reconciler
//! passes its `now`.

use std::time::Duration;

use k8s_openapi::jiff::{SignedDuration, Timestamp};

/// When the training's active deadline falls: its creation plus the seconds.
pub fn active_deadline(created: Option<Timestamp>, seconds: Option<i64>) -> Option<Timestamp> {
    after(created?, seconds?)
}

/// When a finished training is to be deleted: its completion plus the TTL.
pub fn ttl_expiry(completed: Option<Timestamp>, seconds: Option<i64>) -> Option<Timestamp> {
    after(completed?, seconds?)
}

fn after(start: Timestamp, seconds: i64) -> Option<Timestamp> {
    start
        .checked_add(SignedDuration::from_secs(seconds.max(0)))
        .ok()
}

pub fn due(at: Timestamp, now: Timestamp) -> bool {
    now >= at
}

/// How long to wait so that the next look falls just after `at` (whole seconds, rounded up).
pub fn wait_until(at: Timestamp, now: Timestamp) -> Duration {
    let left = at.duration_since(now);
    let secs = left.as_secs() + i64::from(left.subsec_nanos() > 0);
    Duration::from_secs(u64::try_from(secs).unwrap_or(0) + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: i64) -> Timestamp {
        Timestamp::from_second(1_700_000_000 + s).unwrap()
    }

    #[test]
    fn the_deadline_counts_from_creation() {
        let deadline = active_deadline(Some(at(0)), Some(30)).unwrap();
        assert_eq!(deadline, at(30));
        assert!(!due(deadline, at(29)));
        assert!(due(deadline, at(30)));
        assert_eq!(active_deadline(Some(at(0)), None), None);
        assert_eq!(active_deadline(None, Some(30)), None);
    }

    #[test]
    fn the_ttl_counts_from_completion_and_zero_is_at_once() {
        assert_eq!(ttl_expiry(Some(at(100)), Some(60)), Some(at(160)));
        assert!(due(ttl_expiry(Some(at(100)), Some(0)).unwrap(), at(100)));
        assert_eq!(ttl_expiry(None, Some(60)), None);
    }

    #[test]
    fn the_wait_lands_after_the_moment() {
        assert_eq!(wait_until(at(30), at(0)), Duration::from_secs(31));
        let half = at(0).checked_add(SignedDuration::from_millis(500)).unwrap();
        assert_eq!(wait_until(at(30), half), Duration::from_secs(31));
        assert_eq!(wait_until(at(0), at(5)), Duration::from_secs(1));
    }
}
