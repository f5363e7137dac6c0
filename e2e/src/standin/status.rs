//! A pod's status as the stand-in kubelet reports it: container states, the pod phase that follows
//! from them and the restart policy, and conditions with stable transition times. Pure: the
//! worker changes it and sends [`PodStatusTracker::patch`] to the API server.

use std::collections::BTreeMap;

use serde_json::{json, Value};

/// Seconds since the epoch, rendered as RFC 3339 like the API server's timestamps.
pub type Time = jiff::Timestamp;

fn ts(t: Time) -> String {
    t.strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
}

#[derive(Clone, Debug, PartialEq)]
pub enum State {
    Waiting {
        reason: String,
        message: Option<String>,
    },
    Running {
        started_at: Time,
    },
    Terminated(Terminated),
}

#[derive(Clone, Debug, PartialEq)]
pub struct Terminated {
    pub exit_code: i32,
    pub signal: Option<i32>,
    pub reason: String,
    pub message: Option<String>,
    pub started_at: Option<Time>,
    pub finished_at: Time,
}

#[derive(Clone, Debug)]
pub struct ContainerStatus {
    pub name: String,
    pub image: String,
    pub state: State,
    pub last_state: Option<Terminated>,
    pub restart_count: i32,
}

impl ContainerStatus {
    fn new(name: &str, image: &str, reason: &str) -> ContainerStatus {
        ContainerStatus {
            name: name.to_string(),
            image: image.to_string(),
            state: State::Waiting {
                reason: reason.to_string(),
                message: None,
            },
            last_state: None,
            restart_count: 0,
        }
    }

    fn running(&self) -> bool {
        matches!(self.state, State::Running { .. })
    }

    fn terminated(&self) -> Option<&Terminated> {
        match &self.state {
            State::Terminated(t) => Some(t),
            _ => None,
        }
    }

    fn to_json(&self, init: bool) -> Value {
        let state = |s: &State| match s {
            State::Waiting { reason, message } => {
                json!({"waiting": {"reason": reason, "message": message}})
            }
            State::Running { started_at } => json!({"running": {"startedAt": ts(*started_at)}}),
            State::Terminated(t) => json!({"terminated": terminated_json(t)}),
        };
        let ready = self.running() || (init && self.terminated().is_some_and(|t| t.exit_code == 0));
        json!({
            "name": self.name,
            "image": self.image,
            "imageID": "",
            "containerID": format!("standin://{}", self.name),
            "state": state(&self.state),
            "lastState": self.last_state.as_ref().map_or(json!({}), |t| json!({"terminated": terminated_json(t)})),
            "ready": ready,
            "started": self.running(),
            "restartCount": self.restart_count,
        })
    }
}

fn terminated_json(t: &Terminated) -> Value {
    json!({
        "exitCode": t.exit_code,
        "signal": t.signal,
        "reason": t.reason,
        "message": t.message,
        "startedAt": t.started_at.map(ts),
        "finishedAt": ts(t.finished_at),
    })
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Phase {
    Pending,
    Running,
    Succeeded,
    Failed,
}

impl Phase {
    pub fn as_str(&self) -> &'static str {
        match self {
            Phase::Pending => "Pending",
            Phase::Running => "Running",
            Phase::Succeeded => "Succeeded",
            Phase::Failed => "Failed",
        }
    }

    pub fn is_terminal(&self) -> bool {
        matches!(self, Phase::Succeeded | Phase::Failed)
    }
}

pub struct PodStatusTracker {
    pub init: Vec<ContainerStatus>,
    pub containers: Vec<ContainerStatus>,
    pub pod_ip: Option<String>,
    pub host_ip: String,
    pub start_time: Time,
    /// Set once the pod has finished for good (or failed before its containers could run).
    pub final_phase: Option<Phase>,
    pub reason: Option<String>,
    pub message: Option<String>,
    sandbox_ready: bool,
    transitions: BTreeMap<&'static str, (bool, Time)>,
}

impl PodStatusTracker {
    /// `containers`/`init`: (name, image) in spec order.
    pub fn new(
        init: &[(String, String)],
        containers: &[(String, String)],
        host_ip: &str,
        now: Time,
    ) -> PodStatusTracker {
        let first_wait = if init.is_empty() {
            "ContainerCreating"
        } else {
            "PodInitializing"
        };
        PodStatusTracker {
            init: init
                .iter()
                .map(|(n, i)| ContainerStatus::new(n, i, "PodInitializing"))
                .collect(),
            containers: containers
                .iter()
                .map(|(n, i)| ContainerStatus::new(n, i, first_wait))
                .collect(),
            pod_ip: None,
            host_ip: host_ip.to_string(),
            start_time: now,
            final_phase: None,
            reason: None,
            message: None,
            sandbox_ready: false,
            transitions: BTreeMap::new(),
        }
    }

    pub fn sandbox_ready(&mut self, pod_ip: &str) {
        self.pod_ip = Some(pod_ip.to_string());
        self.sandbox_ready = true;
    }

    pub fn initialized(&self) -> bool {
        self.init
            .iter()
            .all(|c| c.terminated().is_some_and(|t| t.exit_code == 0))
    }

    pub fn containers_ready(&self) -> bool {
        self.containers.iter().all(ContainerStatus::running)
    }

    pub fn phase(&self) -> Phase {
        if let Some(p) = &self.final_phase {
            return p.clone();
        }
        if self
            .containers
            .iter()
            .any(|c| c.running() || c.terminated().is_some())
        {
            Phase::Running
        } else {
            Phase::Pending
        }
    }

    /// The phase once every container has terminated under `restartPolicy: Never` (or a final
    /// exit under OnFailure): Succeeded if all exited 0.
    pub fn finish_if_all_terminated(&mut self) -> Option<Phase> {
        let all: Option<Vec<&Terminated>> = self
            .containers
            .iter()
            .map(ContainerStatus::terminated)
            .collect();
        let all = all?;
        let phase = if all.iter().all(|t| t.exit_code == 0) {
            Phase::Succeeded
        } else {
            Phase::Failed
        };
        self.final_phase = Some(phase.clone());
        Some(phase)
    }

    fn condition(&mut self, kind: &'static str, status: bool, now: Time) -> Value {
        let entry = self.transitions.entry(kind).or_insert((status, now));
        if entry.0 != status {
            *entry = (status, now);
        }
        json!({
            "type": kind,
            "status": if status { "True" } else { "False" },
            "lastTransitionTime": ts(entry.1),
        })
    }

    /// A JSON merge patch of the pod with the whole status this runner owns. Lists are replaced
    /// whole by a merge patch, so the scheduler's PodScheduled condition is carried over.
    pub fn patch(&mut self, scheduled: Option<&Value>, now: Time) -> Value {
        let phase = self.phase();
        let ready = self.containers_ready() && !phase.is_terminal();
        let initialized = self.initialized();
        let sandbox = self.sandbox_ready && !phase.is_terminal();
        let mut conditions = vec![
            self.condition("PodReadyToStartContainers", sandbox, now),
            self.condition("Initialized", initialized, now),
            self.condition("ContainersReady", ready, now),
            self.condition("Ready", ready, now),
        ];
        if let Some(s) = scheduled {
            conditions.push(s.clone());
        }
        let ips = |ip: &Option<String>| ip.iter().map(|ip| json!({"ip": ip})).collect::<Vec<_>>();
        json!({"status": {
            "phase": phase.as_str(),
            "reason": self.reason,
            "message": self.message,
            "hostIP": self.host_ip,
            "hostIPs": ips(&Some(self.host_ip.clone())),
            "podIP": self.pod_ip,
            "podIPs": ips(&self.pod_ip),
            "startTime": ts(self.start_time),
            "conditions": conditions,
            "initContainerStatuses": self.init.iter().map(|c| c.to_json(true)).collect::<Vec<_>>(),
            "containerStatuses": self.containers.iter().map(|c| c.to_json(false)).collect::<Vec<_>>(),
        }})
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: i64) -> Time {
        Time::from_second(1_700_000_000 + s).unwrap()
    }

    fn tracker() -> PodStatusTracker {
        PodStatusTracker::new(
            &[("prepare".into(), "img".into())],
            &[("main".into(), "img".into()), ("side".into(), "img".into())],
            "127.0.0.1",
            t(0),
        )
    }

    fn exit(code: i32) -> State {
        State::Terminated(Terminated {
            exit_code: code,
            signal: None,
            reason: if code == 0 { "Completed" } else { "Error" }.into(),
            message: None,
            started_at: Some(t(1)),
            finished_at: t(2),
        })
    }

    #[test]
    fn phases_follow_containers() {
        let mut s = tracker();
        assert_eq!(s.phase(), Phase::Pending);
        assert!(!s.initialized());
        s.init[0].state = exit(0);
        assert!(s.initialized());
        s.containers[0].state = State::Running { started_at: t(3) };
        assert_eq!(s.phase(), Phase::Running);
        assert!(!s.containers_ready());
        s.containers[1].state = State::Running { started_at: t(3) };
        assert!(s.containers_ready());
        s.containers[0].state = exit(0);
        assert_eq!(s.finish_if_all_terminated(), None);
        s.containers[1].state = exit(3);
        assert_eq!(s.finish_if_all_terminated(), Some(Phase::Failed));
        assert_eq!(s.phase(), Phase::Failed);
    }

    #[test]
    fn patch_keeps_transition_times_until_a_condition_flips() {
        let mut s = tracker();
        s.sandbox_ready("127.0.0.9");
        let scheduled = json!({"type": "PodScheduled", "status": "True"});
        let p1 = s.patch(Some(&scheduled), t(10));
        assert_eq!(p1["status"]["podIP"], "127.0.0.9");
        assert_eq!(p1["status"]["podIPs"][0]["ip"], "127.0.0.9");
        let ready_time = |p: &Value| {
            p["status"]["conditions"]
                .as_array()
                .unwrap()
                .iter()
                .find(|c| c["type"] == "Ready")
                .unwrap()["lastTransitionTime"]
                .clone()
        };
        let p2 = s.patch(Some(&scheduled), t(20));
        assert_eq!(ready_time(&p1), ready_time(&p2));
        s.init[0].state = exit(0);
        for c in &mut s.containers {
            c.state = State::Running { started_at: t(21) };
        }
        let p3 = s.patch(Some(&scheduled), t(30));
        assert_eq!(ready_time(&p3), json!(ts(t(30))));
        assert_eq!(p3["status"]["phase"], "Running");
        assert!(p3["status"]["conditions"]
            .as_array()
            .unwrap()
            .contains(&scheduled));
        assert_eq!(
            p3["status"]["initContainerStatuses"][0]["state"]["terminated"]["exitCode"],
            0
        );
        assert_eq!(p3["status"]["containerStatuses"][1]["ready"], true);
    }
}
