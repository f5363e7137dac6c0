//! `status.lossHistory`: a few points of the training loss over the whole run, for a curve in a
//! terminal (`kubectl charlm status`). The status is read and written on every reconcile, so the
//! list stays small: when it is full every second point goes, and the curve keeps its start at a
//! coarser grain instead of forgetting it.

use crate::crd::LossPoint;

/// Points kept at most (a few hundred bytes of status).
pub const MAX_POINTS: usize = 32;

/// Adds the loss the trainer reported at `step`. A step at or before the last one (a restart
/// from an older checkpoint) replaces the points it makes stale, so the curve shows the run that
/// goes on. Non-finite losses are not points.
pub fn record(history: &mut Vec<LossPoint>, step: i64, loss: f64) {
    if !loss.is_finite() {
        return;
    }
    history.retain(|p| p.step < step);
    if history.len() >= MAX_POINTS {
        // Keeps the first point and every second one after it; the newest is appended below.
        let mut i = 0;
        history.retain(|_| {
            i += 1;
            i % 2 == 1
        });
    }
    history.push(LossPoint { step, loss });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn steps(h: &[LossPoint]) -> Vec<i64> {
        h.iter().map(|p| p.step).collect()
    }

    #[test]
    fn points_are_appended_in_step_order() {
        let mut h = Vec::new();
        record(&mut h, 10, 3.0);
        record(&mut h, 20, 2.5);
        record(&mut h, 20, 2.4);
        assert_eq!(steps(&h), [10, 20]);
        assert_eq!(h[1].loss, 2.4, "the same step again is the newer report");
    }

    #[test]
    fn a_restart_from_an_older_checkpoint_drops_the_lost_steps() {
        let mut h = Vec::new();
        for s in [10, 20, 30, 40] {
            record(&mut h, s, 1.0);
        }
        record(&mut h, 25, 0.9);
        assert_eq!(steps(&h), [10, 20, 25]);
    }

    #[test]
    fn a_full_history_halves_and_keeps_the_start() {
        let mut h = Vec::new();
        for s in 1..=1000 {
            record(&mut h, s, 1.0 / s as f64);
            assert!(h.len() <= MAX_POINTS, "{} points", h.len());
        }
        assert_eq!(h[0].step, 1, "the start of the curve stays");
        assert_eq!(h.last().unwrap().step, 1000, "the newest point is there");
        assert!(h.windows(2).all(|w| w[0].step < w[1].step));
        assert!(h.len() > MAX_POINTS / 2);
    }

    #[test]
    fn non_finite_losses_are_skipped() {
        let mut h = Vec::new();
        record(&mut h, 1, f64::NAN);
        record(&mut h, 2, f64::INFINITY);
        assert!(h.is_empty());
    }
}
