//! Kueue (sigs.k8s.io/kueue) as the gate of a training that names a LocalQueue with the label
//! `kueue.x-k8s.io/queue-name`. The operator is Kueue's integration for `CharLMTraining`, as
//! Kueue's own jobframework is for a Job: it makes one `Workload` per training (one pod set,
//! `workers`, of all its worker pods, so Kueue admits the gang whole or not at all), creates no pod
//! until Kueue admitted it, stops the workers when Kueue evicts it (preemption: the trainers save a
//! checkpoint on SIGTERM, as for `spec.suspend`), then gives the quota back so Kueue queues it again,
//! and marks the Workload finished when the training ends. Admitted, its workers run where the
//! admission's ResourceFlavors say (their node labels and tolerations, as Kueue's `PodSetInfo`
//! gives a Job's pods); a worker made after another admission gets that one's.
//! docs/operator.md, "Queueing with Kueue".
//!
//! Plain data and pure functions; `controller` reads and writes the objects.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Pod, PodSpec, Toleration};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::ResourceExt;
use serde_json::{json, Value};

use crate::conditions::{self, FALSE, TRUE};
use crate::crd::CharLMTraining;
use crate::resources::{common_labels, owner_reference};

pub use charlm_api::kueue::{
    priority_class_resource, resource_flavor_resource, workload_resource, GROUP,
    PRIORITY_CLASS_LABEL, QUEUE_LABEL, VERSION,
};
/// The Workload's one pod set: all the workers of an attempt.
pub const PODSET: &str = "workers";

/// The LocalQueue a training names, if it names one.
pub fn queue_name(t: &CharLMTraining) -> Option<String> {
    label(t, QUEUE_LABEL)
}

pub fn priority_class(t: &CharLMTraining) -> Option<String> {
    label(t, PRIORITY_CLASS_LABEL)
}

fn label(t: &CharLMTraining, key: &str) -> Option<String> {
    t.labels()
        .get(key)
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
}

/// `charlmtraining-<name>-<uid prefix>`: a training created anew under the same name gets a
/// Workload of its own, as Kueue's integrations name theirs by owner and uid.
pub fn workload_name(t: &CharLMTraining) -> String {
    let uid = t.uid().unwrap_or_default();
    let short: String = uid.chars().filter(|c| *c != '-').take(8).collect();
    let mut name = t.name_any();
    name.truncate(200);
    format!("charlmtraining-{name}-{short}")
}

/// Where Kueue stands on a training's Workload.
#[derive(Clone, Debug, PartialEq)]
pub enum State {
    /// There is no Workload, or none can be made: why.
    NoWorkload(String),
    /// Queued; Kueue's word on why it is not admitted yet (its `QuotaReserved` message).
    Pending(String),
    Admitted {
        cluster_queue: String,
    },
    /// Kueue took the admission back (`Evicted=True`: preempted, deactivated, ...). `reserved`: the
    /// quota is still held; the operator gives it back once the workers have stopped.
    Evicted {
        reason: String,
        message: String,
        reserved: bool,
    },
    Finished,
}

/// A queued training's LocalQueue and what Kueue says about its Workload.
#[derive(Clone, Debug, PartialEq)]
pub struct Gate {
    pub local_queue: String,
    pub state: State,
}

impl Gate {
    pub fn admitted(&self) -> bool {
        matches!(self.state, State::Admitted { .. })
    }
}

fn status_conditions(status: &Value) -> Vec<Condition> {
    serde_json::from_value(status["conditions"].clone()).unwrap_or_default()
}

fn is(conds: &[Condition], type_: &str) -> bool {
    conditions::is_true(conds, type_)
}

/// Kueue's state from a Workload's `status` (JSON; `Value::Null` when it has none yet).
pub fn state(status: &Value) -> State {
    let conds = status_conditions(status);
    let reserved = is(&conds, "QuotaReserved") || !status["admission"].is_null();
    if is(&conds, "Finished") {
        return State::Finished;
    }
    if let Some(c) = conditions::get(&conds, "Evicted").filter(|c| c.status == TRUE) {
        return State::Evicted {
            reason: c.reason.clone(),
            message: c.message.clone(),
            reserved,
        };
    }
    if is(&conds, "Admitted") {
        let cluster_queue = status["admission"]["clusterQueue"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        return State::Admitted { cluster_queue };
    }
    let message = conditions::get(&conds, "QuotaReserved")
        .map(|c| c.message.clone())
        .filter(|m| !m.is_empty())
        .unwrap_or_else(|| "Kueue has not looked at it yet".to_string());
    State::Pending(message)
}

/// The Workload of a training: one pod set of `workers` pods shaped like `template` (a worker's
/// pod spec, so Kueue counts its GPUs, CPU and memory as the pods will request them), in
/// `local_queue`, with the priority of its WorkloadPriorityClass (name, value) if it names one.
/// Without Kueue's webhooks (e2e/src/kueue.rs says why) the priority value is ours to fill in, as
/// the webhook's defaulting would.
pub fn workload(
    t: &CharLMTraining,
    local_queue: &str,
    workers: i32,
    template: &PodSpec,
    priority: Option<(&str, i32)>,
    active: bool,
) -> Value {
    let mut spec = json!({
        "queueName": local_queue,
        "active": active,
        "podSets": [{
            "name": PODSET,
            "count": workers,
            "template": {"spec": template},
        }],
    });
    if let Some((name, value)) = priority {
        spec["priorityClassRef"] =
            json!({"group": GROUP, "kind": "WorkloadPriorityClass", "name": name});
        spec["priority"] = json!(value);
    }
    let labels: BTreeMap<String, String> = common_labels(&t.name_any());
    json!({
        "apiVersion": format!("{GROUP}/{VERSION}"),
        "kind": "Workload",
        "metadata": {
            "name": workload_name(t),
            "namespace": t.namespace(),
            "labels": labels,
            "ownerReferences": [owner_reference(t)],
        },
        "spec": spec,
    })
}

/// The ResourceFlavors Kueue assigned to the pod set `workers` in a Workload's `status`
/// (`admission.podSetAssignments[].flavors`, one per resource), each named once, sorted; none when
/// it is not admitted.
pub fn assigned_flavors(status: &Value) -> Vec<String> {
    let mut names: Vec<String> = status["admission"]["podSetAssignments"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|a| a["name"] == PODSET)
        .filter_map(|a| a["flavors"].as_object())
        .flat_map(|flavors| flavors.values())
        .filter_map(|f| f.as_str().map(str::to_string))
        .collect();
    names.sort();
    names.dedup();
    names
}

/// Where an admitted gang runs: what its flavours add to the workers' pods.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Placement {
    /// The flavours' `nodeLabels`, added to each worker's node selector.
    pub node_selector: BTreeMap<String, String>,
    /// The flavours' `tolerations`, added to each worker's.
    pub tolerations: Vec<Toleration>,
}

/// The placement of the ResourceFlavors' `spec`s (JSON), in the order given.
pub fn placement(flavor_specs: &[Value]) -> Result<Placement, String> {
    let mut p = Placement::default();
    for spec in flavor_specs {
        let labels: BTreeMap<String, String> =
            serde_json::from_value(spec["nodeLabels"].clone()).unwrap_or_default();
        p.node_selector.extend(labels);
        let tolerations: Vec<Toleration> = match &spec["tolerations"] {
            Value::Null => Vec::new(),
            t => serde_json::from_value(t.clone())
                .map_err(|e| format!("a ResourceFlavor's tolerations do not parse: {e}"))?,
        };
        for t in tolerations {
            if !p.tolerations.contains(&t) {
                p.tolerations.push(t);
            }
        }
    }
    Ok(p)
}

/// Adds a placement to a worker pod, as Kueue's `podset.Merge` does for a Job's pod template: the
/// flavours' labels join the pod's node selector and their tolerations the pod's. Kueue assigns
/// a pod set only flavours whose labels its node selector does not contradict (the template it
/// judged is the same pod), so a label already there with another value cannot come from
/// Kueue's choice; the flavour's value is taken then, since the quota is the flavour's.
pub fn apply_placement(pod: &mut Pod, placement: &Placement) {
    if placement == &Placement::default() {
        return;
    }
    let spec = pod.spec.get_or_insert_with(Default::default);
    if !placement.node_selector.is_empty() {
        spec.node_selector
            .get_or_insert_with(Default::default)
            .extend(placement.node_selector.clone());
    }
    if !placement.tolerations.is_empty() {
        let tolerations = spec.tolerations.get_or_insert_with(Vec::new);
        for t in &placement.tolerations {
            if !tolerations.contains(t) {
                tolerations.push(t.clone());
            }
        }
    }
}

/// Does a Workload still describe the gang the training would start (count and pod requests)?
/// Pod sets cannot change, so a training whose shape changed gets a new one while it is not
/// admitted.
pub fn same_shape(existing: &Value, desired: &Value) -> bool {
    let shape = |w: &Value| {
        let ps = &w["spec"]["podSets"][0];
        let requests: Vec<Value> = ps["template"]["spec"]["containers"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|c| c["resources"].clone())
            .collect();
        (
            ps["count"].clone(),
            requests,
            w["spec"]["priority"].clone(),
            w["spec"]["queueName"].clone(),
        )
    };
    shape(existing) == shape(desired)
}

/// What Kueue's jobframework writes once an evicted job has stopped (`workload.
/// UnsetQuotaReservationWithCondition` with `SetRequeuedCondition`): no admission, `QuotaReserved`
/// False (reason Pending), `Admitted` False (NoReservation) and `Requeued` (True after a
/// preemption or node failures), so that Kueue queues the Workload again. A JSON merge patch of
/// `status`; the caller adds the resourceVersion it was computed from.
pub fn requeue_status(
    status: &Value,
    reason: &str,
    message: &str,
    generation: Option<i64>,
    now: &Time,
) -> Value {
    let mut conds = status_conditions(status);
    let requeued = if matches!(reason, "Preempted" | "NodeFailures") {
        TRUE
    } else {
        FALSE
    };
    conditions::set(
        &mut conds, "Requeued", requeued, reason, message, generation, now,
    );
    conditions::set(
        &mut conds,
        "QuotaReserved",
        FALSE,
        "Pending",
        message,
        generation,
        now,
    );
    if conditions::get(&conds, "Admitted").is_some() {
        conditions::set(
            &mut conds,
            "Admitted",
            FALSE,
            "NoReservation",
            "The workload has no reservation",
            generation,
            now,
        );
    }
    json!({"admission": null, "conditions": conds})
}

/// `Finished=True` (reason Succeeded or Failed), as Kueue's `workload.Finish`: Kueue frees the
/// quota of a finished Workload.
pub fn finished_status(
    status: &Value,
    succeeded: bool,
    message: &str,
    generation: Option<i64>,
    now: &Time,
) -> Value {
    let mut conds = status_conditions(status);
    let reason = if succeeded { "Succeeded" } else { "Failed" };
    conditions::set(
        &mut conds, "Finished", TRUE, reason, message, generation, now,
    );
    json!({"conditions": conds})
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::testing::{cpu_spec, gpu_spec, training};
    use k8s_openapi::jiff::Timestamp;

    fn now() -> Time {
        Time(Timestamp::from_second(1_700_000_000).unwrap())
    }

    fn cond(type_: &str, status: &str, reason: &str, message: &str) -> Value {
        json!({"type": type_, "status": status, "reason": reason, "message": message,
               "lastTransitionTime": "2023-11-14T22:13:20Z"})
    }

    #[test]
    fn a_new_workload_is_pending() {
        assert_eq!(
            state(&Value::Null),
            State::Pending("Kueue has not looked at it yet".into())
        );
        let status = json!({"conditions": [cond("QuotaReserved", "False", "Pending",
            "couldn't assign flavors to pod set workers: insufficient unused quota for nvidia.com/gpu in flavor h100, 8 more needed")]});
        match state(&status) {
            State::Pending(m) => assert!(m.contains("insufficient unused quota"), "{m}"),
            s => panic!("{s:?}"),
        }
    }

    #[test]
    fn admission_names_the_cluster_queue() {
        let status = json!({
            "admission": {"clusterQueue": "gpus", "podSetAssignments": []},
            "conditions": [cond("QuotaReserved", "True", "QuotaReserved", ""), cond("Admitted", "True", "Admitted", "")]
        });
        assert_eq!(
            state(&status),
            State::Admitted {
                cluster_queue: "gpus".into()
            }
        );
    }

    #[test]
    fn an_eviction_holds_the_quota_until_it_is_given_back() {
        let status = json!({
            "admission": {"clusterQueue": "gpus", "podSetAssignments": []},
            "conditions": [
                cond("QuotaReserved", "True", "QuotaReserved", ""),
                cond("Admitted", "True", "Admitted", ""),
                cond("Evicted", "True", "Preempted", "Preempted to accommodate a workload (UID: x) due to prioritization in the ClusterQueue"),
            ]
        });
        let State::Evicted {
            reason, reserved, ..
        } = state(&status)
        else {
            panic!("{:?}", state(&status));
        };
        assert_eq!((reason.as_str(), reserved), ("Preempted", true));

        let patch = requeue_status(&status, "Preempted", "preempted", Some(1), &now());
        assert!(patch["admission"].is_null());
        let conds: Vec<Condition> = serde_json::from_value(patch["conditions"].clone()).unwrap();
        let get = |t: &str| {
            let c = conditions::get(&conds, t).unwrap();
            (c.status.as_str(), c.reason.as_str())
        };
        assert_eq!(get("QuotaReserved"), ("False", "Pending"));
        assert_eq!(get("Admitted"), ("False", "NoReservation"));
        assert_eq!(get("Requeued"), ("True", "Preempted"));
        assert_eq!(
            get("Evicted"),
            ("True", "Preempted"),
            "Kueue clears it on readmission"
        );
        // Once given back, the training waits without holding quota.
        let mut after = status.clone();
        after["admission"] = Value::Null;
        after["conditions"] = patch["conditions"].clone();
        assert!(matches!(
            state(&after),
            State::Evicted {
                reserved: false,
                ..
            }
        ));
        // A deactivation is no reason to be requeued.
        let patch = requeue_status(&status, "Deactivated", "", Some(1), &now());
        let conds: Vec<Condition> = serde_json::from_value(patch["conditions"].clone()).unwrap();
        assert_eq!(conditions::get(&conds, "Requeued").unwrap().status, "False");
    }

    #[test]
    fn a_finished_workload_is_finished_whatever_else_it_says() {
        let status = json!({"conditions": [cond("Admitted", "True", "Admitted", "")]});
        let patch = finished_status(&status, true, "training complete", Some(1), &now());
        assert_eq!(state(&patch), State::Finished);
        let conds: Vec<Condition> = serde_json::from_value(patch["conditions"].clone()).unwrap();
        assert_eq!(
            conditions::get(&conds, "Finished").unwrap().reason,
            "Succeeded"
        );
    }

    #[test]
    fn the_admitted_flavours_place_the_workers() {
        let status = json!({"admission": {"clusterQueue": "cq", "podSetAssignments": [
            {"name": "workers", "count": 2, "flavors": {"cpu": "spot", "memory": "spot", "nvidia.com/gpu": "h100"}},
            {"name": "other", "flavors": {"cpu": "elsewhere"}}
        ]}});
        assert_eq!(assigned_flavors(&status), ["h100", "spot"]);
        assert!(assigned_flavors(&json!({"admission": null})).is_empty());
        assert!(assigned_flavors(&Value::Null).is_empty());

        let toleration = json!({"key": "spot", "operator": "Exists", "effect": "NoSchedule"});
        let p = placement(&[
            json!({"nodeLabels": {"pool": "h100", "zone": "a"}}),
            json!({"nodeLabels": {"pool": "spot"}, "tolerations": [toleration.clone(), toleration]}),
        ])
        .unwrap();
        assert_eq!(
            p.node_selector,
            BTreeMap::from([
                ("pool".to_string(), "spot".to_string()),
                ("zone".to_string(), "a".to_string())
            ])
        );
        assert_eq!(p.tolerations.len(), 1, "each toleration once");
        assert!(placement(&[json!({"tolerations": "no"})]).is_err());

        // Added to what the pod selects and tolerates already; an empty placement changes nothing.
        let mut t = training(gpu_spec());
        t.spec.node_selector = Some(BTreeMap::from([("pool".into(), "h100".into())]));
        let effective = crate::effective::resolve(&t.spec).unwrap();
        let settings = crate::resources::PodSettings {
            default_image: "charlm-trainer:test".into(),
            image_pull_policy: None,
        };
        let pod = crate::resources::worker_pod(&t, &effective, 0, 0, &settings);
        let mut same = pod.clone();
        apply_placement(&mut same, &Placement::default());
        assert_eq!(same, pod);
        let mut placed = pod.clone();
        apply_placement(&mut placed, &p);
        let spec = placed.spec.unwrap();
        assert_eq!(spec.node_selector, Some(p.node_selector.clone()));
        let before = pod.spec.unwrap().tolerations.unwrap_or_default();
        let after = spec.tolerations.unwrap();
        assert_eq!(after.len(), before.len() + 1);
        assert_eq!(after.last(), p.tolerations.first());
        // A CPU pod without a selector or tolerations gets the flavour's.
        let cpu = training(cpu_spec());
        let effective = crate::effective::resolve(&cpu.spec).unwrap();
        let mut pod = crate::resources::worker_pod(&cpu, &effective, 1, 0, &settings);
        assert!(pod.spec.as_ref().unwrap().node_selector.is_none());
        apply_placement(&mut pod, &p);
        let spec = pod.spec.unwrap();
        assert_eq!(spec.node_selector.unwrap()["zone"], "a");
        assert_eq!(spec.tolerations.unwrap(), p.tolerations);
    }

    #[test]
    fn the_workload_is_one_gang_of_all_workers_owned_by_the_training() {
        let mut t = training(gpu_spec());
        t.metadata.labels = Some(BTreeMap::from([
            (QUEUE_LABEL.to_string(), "team-a".to_string()),
            (PRIORITY_CLASS_LABEL.to_string(), "urgent".to_string()),
        ]));
        assert_eq!(queue_name(&t).as_deref(), Some("team-a"));
        assert_eq!(priority_class(&t).as_deref(), Some("urgent"));
        let template: PodSpec = serde_json::from_value(json!({"containers": [{"name": "trainer",
            "resources": {"requests": {"nvidia.com/gpu": "4"}, "limits": {"nvidia.com/gpu": "4"}}}]}))
        .unwrap();
        let w = workload(&t, "team-a", 2, &template, Some(("urgent", 1000)), true);
        assert_eq!(w["metadata"]["name"], workload_name(&t));
        assert!(workload_name(&t).starts_with("charlmtraining-demo-"));
        assert_eq!(
            w["metadata"]["ownerReferences"][0]["kind"],
            "CharLMTraining"
        );
        assert_eq!(w["metadata"]["ownerReferences"][0]["controller"], true);
        let ps = &w["spec"]["podSets"];
        assert_eq!(ps.as_array().unwrap().len(), 1);
        assert_eq!(
            (ps[0]["name"].as_str(), ps[0]["count"].as_i64()),
            (Some("workers"), Some(2))
        );
        assert_eq!(
            ps[0]["template"]["spec"]["containers"][0]["resources"]["requests"]["nvidia.com/gpu"],
            "4"
        );
        assert_eq!(w["spec"]["queueName"], "team-a");
        assert_eq!(w["spec"]["priority"], 1000);
        assert_eq!(
            w["spec"]["priorityClassRef"]["kind"],
            "WorkloadPriorityClass"
        );
        assert!(same_shape(&w, &w));
        let bigger = workload(&t, "team-a", 3, &template, Some(("urgent", 1000)), true);
        assert!(!same_shape(&w, &bigger));
        let plain = workload(&t, "team-a", 2, &template, None, true);
        assert!(plain["spec"].get("priorityClassRef").is_none());
    }
}
