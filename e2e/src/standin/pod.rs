//! One pod's life on the stand-in kubelet: an address and a hosts file, volumes, init containers in
//! order, then the containers, status reported at every step, and at the end the kubelet's part of
//! deletion (SIGTERM to every container, SIGKILL after the grace period, then the pod object
//! removed with grace 0).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Container, Pod};
use kube::api::{DeleteParams, Patch, PatchParams, Preconditions};
use kube::{Api, Client};
use tokio::sync::{mpsc, watch};

use super::hosts::{HostsBook, PodAddress};
use super::ips::IpPool;
use super::launch::{self, ContainerFiles, PodInputs};
use super::process::{self, Started};
use super::status::{Phase, PodStatusTracker, State, Terminated, Time};
use super::volumes::{self, NotReady, VolumeDirs};

/// What every pod worker shares.
pub struct Ctx {
    pub client: Client,
    pub state_dir: PathBuf,
    pub image_bin_dir: PathBuf,
    /// This binary, which runs each container's sandbox (`exec-container`).
    pub helper: PathBuf,
    pub api_server: Option<(String, u16)>,
    pub host_ip: String,
    pub node_cpu_millis: i64,
    pub node_memory_bytes: i64,
    pub ips: Mutex<IpPool>,
    pub hosts: Mutex<HostsBook>,
}

/// How a worker's pod ended for this runner.
enum End {
    /// deletionTimestamp set: stop the containers within the grace period, then remove the pod.
    Deleted { grace: Duration },
    /// The pod object is gone from the API server.
    Gone,
    /// The runner is stopping.
    Shutdown,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Init,
    Main,
}

enum Exit {
    Status(ExitStatus),
    StartError(String),
}

const TERMINATION_MESSAGE_MAX: usize = 4096;
const FALLBACK_LOG_LINES: usize = 80;
const FALLBACK_LOG_BYTES: usize = 2048;

pub async fn run(
    ctx: Arc<Ctx>,
    pod: Pod,
    updates: watch::Receiver<Option<Pod>>,
    shutdown: watch::Receiver<bool>,
) {
    let mut worker = Worker::new(ctx, pod, updates, shutdown);
    let end = worker.run().await;
    worker.finish(end).await;
}

struct Worker {
    ctx: Arc<Ctx>,
    pod: Pod,
    uid: String,
    namespace: String,
    name: String,
    dir: PathBuf,
    memory_dir: Option<PathBuf>,
    tracker: PodStatusTracker,
    inputs: PodInputs,
    restart_policy: String,
    updates: watch::Receiver<Option<Pod>>,
    shutdown: watch::Receiver<bool>,
    running: BTreeMap<(Kind, usize), (i32, Time)>,
    exits_tx: mpsc::UnboundedSender<(Kind, usize, Exit)>,
    exits: mpsc::UnboundedReceiver<(Kind, usize, Exit)>,
}

fn names(containers: &[Container]) -> Vec<(String, String)> {
    containers
        .iter()
        .map(|c| (c.name.clone(), c.image.clone().unwrap_or_default()))
        .collect()
}

impl Worker {
    fn new(
        ctx: Arc<Ctx>,
        pod: Pod,
        updates: watch::Receiver<Option<Pod>>,
        shutdown: watch::Receiver<bool>,
    ) -> Worker {
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        let namespace = pod.metadata.namespace.clone().unwrap_or_default();
        let name = pod.metadata.name.clone().unwrap_or_default();
        let spec = pod.spec.clone().unwrap_or_default();
        let dir = ctx
            .state_dir
            .join("pods")
            .join(format!("{namespace}_{name}_{uid}"));
        let memory_dir = Path::new("/dev/shm")
            .is_dir()
            .then(|| PathBuf::from("/dev/shm/standin-kubelet").join(&uid));
        let tracker = PodStatusTracker::new(
            &names(spec.init_containers.as_deref().unwrap_or_default()),
            &names(&spec.containers),
            &ctx.host_ip,
            Time::now(),
        );
        let mut hostname = spec.hostname.clone().unwrap_or_else(|| name.clone());
        hostname.truncate(63);
        let inputs = PodInputs {
            host_ip: ctx.host_ip.clone(),
            hostname,
            api_server: ctx.api_server.clone(),
            node_cpu_millis: ctx.node_cpu_millis,
            node_memory_bytes: ctx.node_memory_bytes,
            ..Default::default()
        };
        let (exits_tx, exits) = mpsc::unbounded_channel();
        Worker {
            restart_policy: spec.restart_policy.unwrap_or_else(|| "Always".into()),
            ctx,
            pod,
            uid,
            namespace,
            name,
            dir,
            memory_dir,
            tracker,
            inputs,
            updates,
            shutdown,
            running: BTreeMap::new(),
            exits_tx,
            exits,
        }
    }

    fn spec_containers(&self, kind: Kind) -> Vec<Container> {
        let spec = self.pod.spec.clone().unwrap_or_default();
        match kind {
            Kind::Init => spec.init_containers.unwrap_or_default(),
            Kind::Main => spec.containers,
        }
    }

    fn status_mut(&mut self, kind: Kind, i: usize) -> &mut super::status::ContainerStatus {
        match kind {
            Kind::Init => &mut self.tracker.init[i],
            Kind::Main => &mut self.tracker.containers[i],
        }
    }

    async fn run(&mut self) -> End {
        if let Err(e) = self.set_up() {
            return self.fail("StandinSetupError", &e).await;
        }
        tracing::info!(pod = %self.key(), ip = %self.inputs.pod_ip, "starting pod");
        self.patch().await;

        let dirs = VolumeDirs {
            pod_dir: self.dir.clone(),
            memory_dir: self.memory_dir.clone(),
            claims_dir: self.ctx.state_dir.join("claims"),
        };
        loop {
            match volumes::prepare(&self.ctx.client, &self.pod, &dirs, &mut self.inputs).await {
                Ok(()) => break,
                Err(NotReady::Wait(message)) => {
                    self.wait_all(Kind::Main, "ContainerCreating", &message);
                    self.patch().await;
                    if let Some(end) = self.pause(Duration::from_secs(2)).await {
                        return end;
                    }
                }
                Err(NotReady::Fatal(message)) => return self.fail("VolumeError", &message).await,
            }
        }
        volumes::env_sources(&self.ctx.client, &self.pod, &mut self.inputs).await;

        for i in 0..self.tracker.init.len() {
            let mut restarts = 0;
            loop {
                if let Err(end) = self.start(Kind::Init, i).await {
                    return end;
                }
                let code = match self.next_exit().await {
                    Ok((_, _, code)) => code,
                    Err(end) => return end,
                };
                if code == 0 {
                    break;
                }
                if self.restart_policy == "Never" {
                    self.tracker.final_phase = Some(Phase::Failed);
                    self.patch().await;
                    return self.after_terminal().await;
                }
                restarts += 1;
                if let Some(end) = self.pause(backoff(restarts)).await {
                    return end;
                }
                self.restarted(Kind::Init, i);
            }
        }

        for i in 0..self.tracker.containers.len() {
            if let Err(end) = self.start(Kind::Main, i).await {
                return end;
            }
        }
        self.patch().await;
        let mut restarts = 0;
        loop {
            let (kind, i, code) = match self.next_exit().await {
                Ok(exit) => exit,
                Err(end) => return end,
            };
            debug_assert_eq!(kind, Kind::Main);
            let restart = match self.restart_policy.as_str() {
                "Always" => true,
                "OnFailure" => code != 0,
                _ => false,
            };
            if restart {
                restarts += 1;
                self.patch().await;
                if let Some(end) = self.pause(backoff(restarts)).await {
                    return end;
                }
                self.restarted(kind, i);
                if let Err(end) = self.start(kind, i).await {
                    return end;
                }
            } else if self.running.is_empty() && self.tracker.finish_if_all_terminated().is_some() {
                self.patch().await;
                return self.after_terminal().await;
            }
            self.patch().await;
        }
    }

    fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// The pod's directory, address and hosts file.
    fn set_up(&mut self) -> Result<(), String> {
        let io = |p: &Path, e: std::io::Error| format!("{}: {e}", p.display());
        for d in [self.dir.join("logs"), self.dir.join("containers")] {
            std::fs::create_dir_all(&d).map_err(|e| io(&d, e))?;
        }
        let ip = self
            .ctx
            .ips
            .lock()
            .unwrap()
            .allocate(&self.uid)
            .ok_or("no free loopback address for the pod")?
            .to_string();
        self.inputs.pod_ip = ip.clone();
        self.tracker.sandbox_ready(&ip);
        let spec = self.pod.spec.clone().unwrap_or_default();
        self.ctx.hosts.lock().unwrap().set_pod(
            &self.uid,
            PodAddress {
                namespace: self.namespace.clone(),
                hostname: self.inputs.hostname.clone(),
                subdomain: spec.subdomain.filter(|s| !s.is_empty()),
                ip,
                ready: false,
                hosts_file: self.dir.join("hosts"),
            },
        );
        Ok(())
    }

    fn wait_all(&mut self, kind: Kind, reason: &str, message: &str) {
        let statuses = match kind {
            Kind::Init => &mut self.tracker.init,
            Kind::Main => &mut self.tracker.containers,
        };
        for c in statuses.iter_mut() {
            if matches!(c.state, State::Waiting { .. }) {
                c.state = State::Waiting {
                    reason: reason.into(),
                    message: Some(message.into()),
                };
            }
        }
    }

    fn restarted(&mut self, kind: Kind, i: usize) {
        let c = self.status_mut(kind, i);
        if let State::Terminated(t) = &c.state {
            c.last_state = Some(t.clone());
        }
        c.restart_count += 1;
    }

    /// Starts container `i`: resolves its launch (waiting while a referenced ConfigMap or Secret
    /// is missing, as CreateContainerConfigError), then runs it.
    async fn start(&mut self, kind: Kind, i: usize) -> Result<(), End> {
        let container = self.spec_containers(kind)[i].clone();
        let cdir = self.dir.join("containers").join(format!(
            "{}-{}",
            if kind == Kind::Init { "init" } else { "main" },
            container.name
        ));
        let files = ContainerFiles {
            root: cdir.join("root"),
            termination_log: cdir.join("termination-log"),
            hosts: self.dir.join("hosts"),
        };
        let launch = loop {
            match launch::launch(
                &self.pod,
                &container,
                &self.inputs,
                &files,
                &self.ctx.image_bin_dir,
            ) {
                Ok(l) => break l,
                Err(message) => {
                    self.status_mut(kind, i).state = State::Waiting {
                        reason: "CreateContainerConfigError".into(),
                        message: Some(message),
                    };
                    self.patch().await;
                    if let Some(end) = self.pause(Duration::from_secs(2)).await {
                        return Err(end);
                    }
                    volumes::env_sources(&self.ctx.client, &self.pod, &mut self.inputs).await;
                }
            }
        };
        let prepared = std::fs::create_dir_all(&files.root)
            .and_then(|()| std::fs::write(&files.termination_log, b""));
        for m in &launch.mounts {
            // A subPath that does not exist yet is made, as the kubelet does.
            if !m.source.exists() {
                let _ = std::fs::create_dir_all(&m.source);
            }
        }
        let log = self
            .dir
            .join("logs")
            .join(format!("{}.log", container.name));
        let started = match prepared {
            Ok(()) => {
                process::start(
                    &self.ctx.helper,
                    &launch,
                    &cdir.join("launch.json"),
                    &log,
                    &self.ctx.state_dir,
                )
                .await
            }
            Err(e) => Err(e),
        };
        let now = Time::now();
        let tx = self.exits_tx.clone();
        match started {
            Ok(Started::Running(mut process)) => {
                self.running.insert((kind, i), (process.pid(), now));
                self.status_mut(kind, i).state = State::Running { started_at: now };
                tokio::spawn(async move {
                    let exit = match process.wait().await {
                        Ok(status) => Exit::Status(status),
                        Err(e) => Exit::StartError(format!("waiting for the container: {e}")),
                    };
                    let _ = tx.send((kind, i, exit));
                });
                tracing::info!(pod = %self.key(), container = %container.name, "started");
            }
            Ok(Started::Failed(message)) => {
                self.running.insert((kind, i), (-1, now));
                let _ = tx.send((kind, i, Exit::StartError(message)));
            }
            Err(e) => {
                self.running.insert((kind, i), (-1, now));
                let _ = tx.send((kind, i, Exit::StartError(e.to_string())));
            }
        }
        if kind == Kind::Main && self.tracker.containers_ready() {
            self.ctx.hosts.lock().unwrap().set_ready(&self.uid, true);
        }
        self.patch().await;
        Ok(())
    }

    /// Waits for the next container to exit and records it; a deletion, the pod's disappearance
    /// or the runner's shutdown interrupts the wait.
    async fn next_exit(&mut self) -> Result<(Kind, usize, i32), End> {
        loop {
            tokio::select! {
                Some((kind, i, exit)) = self.exits.recv() => {
                    let code = self.record_exit(kind, i, exit);
                    self.patch().await;
                    return Ok((kind, i, code));
                }
                change = next_change(&mut self.updates, &mut self.shutdown) => {
                    if let Some(end) = self.apply(change) {
                        return Err(end);
                    }
                }
            }
        }
    }

    /// Sleeps, unless the pod is deleted or gone or the runner stops first.
    async fn pause(&mut self, d: Duration) -> Option<End> {
        let deadline = tokio::time::Instant::now() + d;
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => return None,
                change = next_change(&mut self.updates, &mut self.shutdown) => {
                    if let Some(end) = self.apply(change) {
                        return Some(end);
                    }
                }
            }
        }
    }

    /// Resolves when the pod changes (None: nothing that ends it) or the runner stops.
    async fn interruption(&mut self) -> Option<End> {
        let change = next_change(&mut self.updates, &mut self.shutdown).await;
        self.apply(change)
    }

    fn apply(&mut self, change: Change) -> Option<End> {
        match change {
            Change::Shutdown => Some(End::Shutdown),
            Change::Pod(None) => Some(End::Gone),
            Change::Pod(Some(pod)) => {
                let deleting = pod.metadata.deletion_timestamp.is_some();
                let grace = pod
                    .metadata
                    .deletion_grace_period_seconds
                    .or(pod
                        .spec
                        .as_ref()
                        .and_then(|s| s.termination_grace_period_seconds))
                    .unwrap_or(30)
                    .max(0) as u64;
                let pod = *pod;
                self.pod.metadata = pod.metadata;
                self.pod.status = pod.status;
                deleting.then(|| End::Deleted {
                    grace: Duration::from_secs(grace),
                })
            }
        }
    }

    fn record_exit(&mut self, kind: Kind, i: usize, exit: Exit) -> i32 {
        let started_at = self.running.remove(&(kind, i)).map(|(_, t)| t);
        let container = self.spec_containers(kind)[i].clone();
        let cdir_name = format!(
            "{}-{}",
            if kind == Kind::Init { "init" } else { "main" },
            container.name
        );
        let message_file = self
            .dir
            .join("containers")
            .join(cdir_name)
            .join("termination-log");
        let log = self
            .dir
            .join("logs")
            .join(format!("{}.log", container.name));
        let (code, signal, reason, mut message) = match exit {
            Exit::Status(s) => {
                use std::os::unix::process::ExitStatusExt as _;
                let code = s.code().unwrap_or_else(|| 128 + s.signal().unwrap_or(0));
                let reason = if code == 0 { "Completed" } else { "Error" };
                (
                    code,
                    s.signal(),
                    reason.to_string(),
                    read_message(&message_file),
                )
            }
            Exit::StartError(m) => (
                process_start_exit_code(),
                None,
                "StartError".to_string(),
                Some(m),
            ),
        };
        if message.is_none()
            && code != 0
            && container.termination_message_policy.as_deref() == Some("FallbackToLogsOnError")
        {
            message = log_tail(&log);
        }
        tracing::info!(pod = %self.key(), container = %container.name, code, "exited");
        self.status_mut(kind, i).state = State::Terminated(Terminated {
            exit_code: code,
            signal,
            reason,
            message,
            started_at,
            finished_at: Time::now(),
        });
        if kind == Kind::Main {
            self.ctx.hosts.lock().unwrap().set_ready(&self.uid, false);
        }
        code
    }

    async fn fail(&mut self, reason: &str, message: &str) -> End {
        tracing::warn!(pod = %self.key(), reason, message, "pod failed");
        self.tracker.final_phase = Some(Phase::Failed);
        self.tracker.reason = Some(reason.into());
        self.tracker.message = Some(message.into());
        self.patch().await;
        self.after_terminal().await
    }

    /// A finished pod keeps its status; its address and names go. Waits for its deletion.
    async fn after_terminal(&mut self) -> End {
        tracing::info!(pod = %self.key(), phase = self.tracker.phase().as_str(), "pod finished");
        self.release_address();
        loop {
            if let Some(end) = self.interruption().await {
                return end;
            }
        }
    }

    fn release_address(&self) {
        self.ctx.hosts.lock().unwrap().remove_pod(&self.uid);
        self.ctx.ips.lock().unwrap().release(&self.uid);
    }

    async fn finish(&mut self, end: End) {
        let grace = match &end {
            End::Deleted { grace } => *grace,
            End::Gone => Duration::from_secs(2),
            End::Shutdown => Duration::from_secs(5),
        };
        self.stop_all(grace).await;
        self.release_address();
        if let End::Deleted { .. } = end {
            self.patch().await;
            let pods: Api<Pod> = Api::namespaced(self.ctx.client.clone(), &self.namespace);
            let dp = DeleteParams {
                grace_period_seconds: Some(0),
                preconditions: Some(Preconditions {
                    uid: Some(self.uid.clone()),
                    resource_version: None,
                }),
                ..Default::default()
            };
            match pods.delete(&self.name, &dp).await {
                Ok(_) => tracing::info!(pod = %self.key(), "deleted"),
                Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => {}
                Err(e) => tracing::warn!(pod = %self.key(), "deleting: {e}"),
            }
        }
        // emptyDirs and written files go with the pod's processes (when the runner stops, the
        // pod cannot continue either); logs stay for whoever looks into a test afterwards.
        let _ = std::fs::remove_dir_all(self.dir.join("volumes"));
        if let Some(m) = &self.memory_dir {
            let _ = std::fs::remove_dir_all(m);
        }
    }

    /// SIGTERM to every running container, SIGKILL to those still running after `grace`.
    async fn stop_all(&mut self, grace: Duration) {
        if self.running.is_empty() {
            return;
        }
        for (pid, _) in self.running.values() {
            process::signal_group(*pid, libc::SIGTERM);
        }
        let deadline = tokio::time::Instant::now() + grace;
        let mut killed = false;
        while !self.running.is_empty() {
            tokio::select! {
                Some((kind, i, exit)) = self.exits.recv() => { self.record_exit(kind, i, exit); }
                _ = tokio::time::sleep_until(deadline), if !killed => {
                    for (pid, _) in self.running.values() {
                        process::signal_group(*pid, libc::SIGKILL);
                    }
                    killed = true;
                }
                _ = tokio::time::sleep(Duration::from_secs(10)), if killed => {
                    tracing::warn!(pod = %self.key(), "containers still running 10 s after SIGKILL");
                    return;
                }
            }
        }
    }

    async fn patch(&mut self) {
        let scheduled = self
            .pod
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .and_then(|cs| cs.iter().find(|c| c.type_ == "PodScheduled"))
            .and_then(|c| serde_json::to_value(c).ok());
        let body = self.tracker.patch(scheduled.as_ref(), Time::now());
        let pods: Api<Pod> = Api::namespaced(self.ctx.client.clone(), &self.namespace);
        if let Err(e) = pods
            .patch_status(&self.name, &PatchParams::default(), &Patch::Merge(&body))
            .await
        {
            tracing::debug!(pod = %self.key(), "status update: {e}");
        }
    }
}

enum Change {
    Pod(Option<Box<Pod>>),
    Shutdown,
}

async fn next_change(
    updates: &mut watch::Receiver<Option<Pod>>,
    shutdown: &mut watch::Receiver<bool>,
) -> Change {
    tokio::select! {
        changed = updates.changed() => Change::Pod(if changed.is_ok() {
            updates.borrow_and_update().clone().map(Box::new)
        } else {
            None
        }),
        _ = shutdown.changed() => Change::Shutdown,
    }
}

fn process_start_exit_code() -> i32 {
    super::sandbox::START_ERROR_EXIT
}

/// Restart back-off: 1 s, 2 s, 4 s, then 8 s (the kubelet's is 10 s doubling up to 5 min; tests
/// cannot wait that long).
fn backoff(restarts: u32) -> Duration {
    Duration::from_secs(1u64 << restarts.saturating_sub(1).min(3))
}

fn read_message(path: &Path) -> Option<String> {
    let bytes = std::fs::read(path).ok()?;
    let bytes = &bytes[..bytes.len().min(TERMINATION_MESSAGE_MAX)];
    let s = String::from_utf8_lossy(bytes).into_owned();
    (!s.is_empty()).then_some(s)
}

/// The end of a container's log, as FallbackToLogsOnError reports it.
fn log_tail(path: &Path) -> Option<String> {
    let text = std::fs::read(path).ok()?;
    let text = String::from_utf8_lossy(&text);
    let lines: Vec<&str> = text.lines().collect();
    let tail = lines[lines.len().saturating_sub(FALLBACK_LOG_LINES)..].join("\n");
    let start = tail.len().saturating_sub(FALLBACK_LOG_BYTES);
    let start = (start..=tail.len())
        .find(|i| tail.is_char_boundary(*i))
        .unwrap_or(tail.len());
    let tail = tail[start..].to_string();
    (!tail.is_empty()).then_some(tail)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_eight_seconds() {
        let secs: Vec<u64> = (1..=6).map(|r| backoff(r).as_secs()).collect();
        assert_eq!(secs, [1, 2, 4, 8, 8, 8]);
    }

    #[test]
    fn log_tail_keeps_the_last_lines_within_the_byte_limit() {
        let path = std::env::temp_dir().join(format!("standin-log-{}", std::process::id()));
        let text: String = (0..200).map(|i| format!("line {i}\n")).collect();
        std::fs::write(&path, text).unwrap();
        let tail = log_tail(&path).unwrap();
        assert!(tail.ends_with("line 199"));
        assert!(!tail.contains("line 119\n"), "only the last 80 lines");
        assert!(tail.len() <= FALLBACK_LOG_BYTES);
        std::fs::remove_file(&path).unwrap();
        assert_eq!(log_tail(&path), None);
    }
}
