//! GPU-hours and their estimated cost (`status.usage`).
//!
//! The measure: for each attempt, GPUs x the wall time during which all its workers ran the
//! trainer, from the start of the last worker's trainer container to the end of the first one (the
//! kubelet's timestamps; the operator's clock where a pod has none), summed over attempts. The
//! ended attempts' GPU-seconds are kept in the status, so the figure survives restarts of the
//! operator and of the gang.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;

use crate::crd::UsageStatus;
use crate::workers::Worker;

/// While training, the figure counts whole minutes: a status write wakes the controller again, and
/// the reconcile that follows must find nothing new to write.
const LIVE_STEP_SECONDS: i64 = 60;

/// When every worker of the gang had its trainer running: the latest start, if all are known.
pub fn gang_started(workers: &[&Worker]) -> Option<Timestamp> {
    if workers.is_empty() {
        return None;
    }
    workers
        .iter()
        .map(|w| w.trainer_started)
        .collect::<Option<Vec<_>>>()?
        .into_iter()
        .max()
}

/// When the first trainer of the gang ended, if any has.
pub fn gang_ended(workers: &[&Worker]) -> Option<Timestamp> {
    workers.iter().filter_map(|w| w.trainer_finished).min()
}

/// The gang trains since `started` (or, without pod timestamps, since it was first seen training).
pub fn start(usage: &mut UsageStatus, started: Option<Timestamp>, gpus: i32, now: Timestamp) {
    match (&usage.training_since, started) {
        (_, Some(started)) => usage.training_since = Some(Time(started.min(now))),
        (None, None) => usage.training_since = Some(Time(now)),
        (Some(_), None) => {}
    }
    if usage.training_gpus == 0 {
        usage.training_gpus = gpus;
    }
}

/// The gang stopped training at `ended` (clamped to `now`): its GPU-seconds join the ended ones.
pub fn stop(usage: &mut UsageStatus, ended: Option<Timestamp>, now: Timestamp) {
    if let Some(since) = usage.training_since.take() {
        let end = ended.unwrap_or(now).min(now);
        let seconds = end.duration_since(since.0).as_secs().max(0);
        usage.ended_attempts_gpu_seconds += seconds * i64::from(usage.training_gpus);
    }
    usage.training_gpus = 0;
}

/// Recomputes the figures at `now` with the operator's price.
pub fn refresh(usage: &mut UsageStatus, now: Timestamp, price_per_gpu_hour: f64) {
    let live = usage.training_since.as_ref().map_or(0, |since| {
        let seconds = now.duration_since(since.0).as_secs().max(0);
        seconds / LIVE_STEP_SECONDS * LIVE_STEP_SECONDS * i64::from(usage.training_gpus)
    });
    let (gpu_hours, cost) = priced(usage.ended_attempts_gpu_seconds + live, price_per_gpu_hour);
    usage.gpu_hours = gpu_hours;
    usage.estimated_cost = cost;
    usage.price_per_gpu_hour = price_per_gpu_hour;
}

/// GPU-seconds as (GPU-hours to three decimals, cost to cents).
pub fn priced(gpu_seconds: i64, price_per_gpu_hour: f64) -> (f64, f64) {
    let hours = gpu_seconds as f64 / 3600.0;
    let round = |v: f64, places: i32| {
        let f = 10f64.powi(places);
        (v * f).round() / f
    };
    (round(hours, 3), round(hours * price_per_gpu_hour, 2))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workers::WorkerState;

    fn at(s: i64) -> Timestamp {
        Timestamp::from_second(1_700_000_000 + s).unwrap()
    }

    fn worker(started: Option<i64>, finished: Option<i64>) -> Worker {
        Worker {
            name: "w".into(),
            index: Some(0),
            attempt: Some(0),
            terminating: false,
            pod_ip: None,
            trainer_started: started.map(at),
            trainer_finished: finished.map(at),
            disruption: None,
            pod_reason: None,
            deleted: false,
            state: WorkerState::Running,
        }
    }

    #[test]
    fn cost_is_gpu_hours_times_the_price() {
        assert_eq!(priced(2 * 16 * 3600, 3.0), (32.0, 96.0));
        assert_eq!(priced(8 * 31 * 3600, 3.0), (248.0, 744.0));
        assert_eq!(priced(180, 3.0), (0.05, 0.15));
        assert_eq!(priced(0, 2.5), (0.0, 0.0));
    }

    #[test]
    fn the_gang_trains_from_its_last_start_to_its_first_end() {
        let (a, b) = (worker(Some(10), None), worker(Some(25), Some(100)));
        assert_eq!(gang_started(&[&a, &b]), Some(at(25)));
        assert_eq!(gang_ended(&[&a, &b]), Some(at(100)));
        let unknown = worker(None, None);
        assert_eq!(gang_started(&[&a, &unknown]), None);
        assert_eq!(gang_started(&[]), None);
    }

    #[test]
    fn attempts_add_up_and_live_time_counts_whole_minutes() {
        let mut u = UsageStatus::default();
        start(&mut u, Some(at(0)), 8, at(5));
        refresh(&mut u, at(3599), 3.0);
        // 59 whole minutes of 8 GPUs.
        assert_eq!(u.gpu_hours, 7.867);
        refresh(&mut u, at(3600), 3.0);
        assert_eq!((u.gpu_hours, u.estimated_cost), (8.0, 24.0));
        // The first attempt ends at its trainer's exact end, not when the operator noticed.
        stop(&mut u, Some(at(1800)), at(4000));
        assert_eq!(u.ended_attempts_gpu_seconds, 8 * 1800);
        assert!(u.training_since.is_none());
        // A second attempt on 16 GPUs, seen training by the operator without pod timestamps.
        start(&mut u, None, 16, at(5000));
        start(&mut u, None, 16, at(5030));
        assert_eq!(
            u.training_since,
            Some(Time(at(5000))),
            "the first sighting stays"
        );
        stop(&mut u, None, at(5000 + 900));
        refresh(&mut u, at(6000), 3.0);
        assert_eq!(u.ended_attempts_gpu_seconds, 8 * 1800 + 16 * 900);
        assert_eq!(
            (u.gpu_hours, u.estimated_cost, u.price_per_gpu_hour),
            (8.0, 24.0, 3.0)
        );
        // Stopping twice counts nothing twice; an end before the start counts nothing.
        stop(&mut u, None, at(7000));
        start(&mut u, Some(at(8000)), 1, at(8000));
        stop(&mut u, Some(at(7000)), at(9000));
        assert_eq!(u.ended_attempts_gpu_seconds, 8 * 1800 + 16 * 900);
    }

    #[test]
    fn a_clock_ahead_of_the_operator_counts_from_now() {
        let mut u = UsageStatus::default();
        start(&mut u, Some(at(100)), 2, at(50));
        assert_eq!(u.training_since, Some(Time(at(50))));
    }
}
