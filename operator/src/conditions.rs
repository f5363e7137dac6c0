//! Kubernetes-style conditions: one entry per type, whose `lastTransitionTime` moves only when its
//! status does, so `kubectl wait --for=condition=...` and humans both read them right.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

pub const TRUE: &str = "True";
pub const FALSE: &str = "False";
pub const UNKNOWN: &str = "Unknown";

/// Sets condition `type_`, keeping its transition time unless its status changes.
pub fn set(
    conditions: &mut Vec<Condition>,
    type_: &str,
    status: &str,
    reason: &str,
    message: impl Into<String>,
    generation: Option<i64>,
    now: &Time,
) {
    let message = message.into();
    match conditions.iter_mut().find(|c| c.type_ == type_) {
        Some(c) => {
            if c.status != status {
                c.last_transition_time = now.clone();
            }
            c.status = status.to_string();
            c.reason = reason.to_string();
            c.message = message;
            c.observed_generation = generation;
        }
        None => conditions.push(Condition {
            type_: type_.to_string(),
            status: status.to_string(),
            reason: reason.to_string(),
            message,
            observed_generation: generation,
            last_transition_time: now.clone(),
        }),
    }
}

pub fn get<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

pub fn is_true(conditions: &[Condition], type_: &str) -> bool {
    get(conditions, type_).is_some_and(|c| c.status == TRUE)
}

/// Reasons of conditions that say something the user must fix or know (someone else's object in
/// the way, a missing StorageClass, lost checkpoints): their Events are Warnings.
pub const WARNING_REASONS: [&str; 4] = [
    "ClaimConflict",
    "NameConflict",
    "StorageClassNotFound",
    "CheckpointsLost",
];

/// Whether the Event of a condition's transition is a Warning: a failure, a gang restart, a
/// damaged checkpoint, or one of `WARNING_REASONS`.
pub fn is_warning(c: &Condition) -> bool {
    let alarming = ["Failed", "Restarting", "CheckpointDamaged"];
    (c.status == TRUE && alarming.contains(&c.type_.as_str()))
        || WARNING_REASONS.contains(&c.reason.as_str())
}

/// Conditions whose status or reason differs between two lists (or that appear as True, or as a
/// warning: a conflict or missing StorageClass found on the first look is never a flip): the
/// transitions the operator reports as events.
pub fn transitions<'a>(before: &[Condition], after: &'a [Condition]) -> Vec<&'a Condition> {
    after
        .iter()
        .filter(|c| match get(before, &c.type_) {
            Some(old) => old.status != c.status || old.reason != c.reason,
            None => c.status == TRUE || is_warning(c),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::jiff::Timestamp;

    fn t(s: i64) -> Time {
        Time(Timestamp::from_second(s).unwrap())
    }

    #[test]
    fn transition_time_moves_only_with_status() {
        let mut cs = Vec::new();
        set(&mut cs, "Running", FALSE, "Starting", "", Some(1), &t(10));
        set(
            &mut cs,
            "Running",
            FALSE,
            "Starting",
            "again",
            Some(2),
            &t(20),
        );
        assert_eq!(cs[0].last_transition_time, t(10));
        assert_eq!(cs[0].observed_generation, Some(2));
        set(
            &mut cs,
            "Running",
            TRUE,
            "AllWorkersRunning",
            "",
            Some(2),
            &t(30),
        );
        assert_eq!(cs[0].last_transition_time, t(30));
        assert_eq!(cs.len(), 1);
        assert!(is_true(&cs, "Running"));
    }

    #[test]
    fn transitions_report_flips_new_true_conditions_and_new_warnings() {
        let mut before = Vec::new();
        set(&mut before, "A", FALSE, "r", "", None, &t(1));
        set(&mut before, "D", FALSE, "Starting", "", None, &t(1));
        set(&mut before, "E", FALSE, "Same", "old message", None, &t(1));
        let mut after = before.clone();
        set(&mut after, "A", TRUE, "r", "", None, &t(2));
        set(&mut after, "B", FALSE, "r", "", None, &t(2));
        set(&mut after, "C", TRUE, "r", "", None, &t(2));
        set(&mut after, "D", FALSE, "Unschedulable", "", None, &t(2));
        set(&mut after, "E", FALSE, "Same", "new message", None, &t(2));
        // A conflict found on the first look is a Warning Event, though it is no flip.
        set(&mut after, "F", FALSE, "ClaimConflict", "", None, &t(2));
        let types: Vec<&str> = transitions(&before, &after)
            .iter()
            .map(|c| c.type_.as_str())
            .collect();
        assert_eq!(types, ["A", "D", "C", "F"]);
    }
}
