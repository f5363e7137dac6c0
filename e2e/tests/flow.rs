//! The flow a user sees, on the local control plane with real trainer processes (issue 5): the
//! chart installed, the operator binary running under the chart's ServiceAccount, CharLMTrainings
//! applied, and their pods run by the stand-in kubelet on `cpu-0`/`cpu-1` as `charlm-trainer`
//! processes (the image `charlm-trainer:e2e` stands for the plane's image bin dir's program).
//!
//! 1. The CPU example (with smaller settings) shows live progress from rank 0 in its status, then
//!    `Succeeded` with its final val bpc; the checkpoint is on the claim's volume and samples.
//! 2. A killed trainer process ends the attempt; the operator restarts the gang, which resumes from
//!    the checkpoint (the step count continues) and succeeds.
//! 3. A 2-pod CPU training meets through the headless Service's name and completes with world
//!    size 2.
//!
//! The tests run one at a time (`SERIAL`): they share the machine's cores, and a multi-pod
//! training's TCPStore binds port 29500 on all addresses, which two trainings cannot share. Needs
//! `e2e/controlplane/up --cpu-nodes=runner` (scripts/test starts it); fails without it.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{PersistentVolume, Pod};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, ResourceExt};
use serde_json::{json, Value};

use charlm_e2e::cluster::{repo_root, run_dir};
use charlm_e2e::training_env::TestEnv;
use charlm_operator::crd::{CharLMTraining, Phase};

/// One scenario at a time, across the tests of this file.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const MINUTE: Duration = Duration::from_secs(60);
/// Lines of each log shown when a test fails.
const TAIL: usize = 25;

/// What the plane's `up` recorded: who runs the CPU nodes, and where the images' programs are.
struct Plane {
    image_bin_dir: PathBuf,
    /// The stand-in kubelet's state folder: pod folders with their logs, and the marker its
    /// processes carry.
    runner_state: PathBuf,
}

fn plane() -> Plane {
    let options_file = run_dir().join("controlplane/options");
    let options = std::fs::read_to_string(&options_file).unwrap_or_else(|e| {
        panic!(
            "cannot read {} ({e}): run e2e/controlplane/up --cpu-nodes=runner first",
            options_file.display()
        )
    });
    let option = |key: &str| {
        options
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{key}=")))
            .map(str::to_string)
    };
    assert_eq!(
        option("cpu_nodes").as_deref(),
        Some("runner"),
        "the flow tests need the stand-in kubelet to run the CPU nodes' pods: the plane in {} was \
         started without it; run e2e/controlplane/down, then e2e/controlplane/up --cpu-nodes=runner",
        options_file.display()
    );
    let image_bin_dir = PathBuf::from(option("image_bin_dir").unwrap_or_default());
    let trainer = image_bin_dir.join("charlm-trainer");
    assert!(
        trainer.is_file(),
        "{} does not exist: the pods of the image charlm-trainer:e2e run it; build it with \
         `cargo build --release -p charlm-trainer`",
        trainer.display()
    );
    let runner_state = run_dir().join("standin-kubelet");
    Plane {
        image_bin_dir,
        runner_state: runner_state.canonicalize().unwrap_or(runner_state),
    }
}

/// One scenario: its namespace and operator (from `TestEnv`), the plane, and failure reports
/// that carry the training's status, the operator's log and the pods' logs.
struct Flow {
    env: TestEnv,
    plane: Plane,
    // Dropped last: the next scenario starts only after this one's cleanup.
    _serial: tokio::sync::MutexGuard<'static, ()>,
}

enum Seen<T> {
    Done(T),
    /// Not yet; what was seen.
    Waiting(String),
    /// Cannot happen any more; why.
    Broken(String),
}

impl Flow {
    async fn start(test: &str) -> Flow {
        let serial = SERIAL.lock().await;
        let plane = plane();
        let mut env = TestEnv::new(test).await;
        env.start_operator("operator-1").await;
        let flow = Flow {
            env,
            plane,
            _serial: serial,
        };
        flow.cpu_nodes_free().await;
        flow
    }

    /// Trainings of an earlier failed test may still be stopping; they would take the CPU.
    async fn cpu_nodes_free(&self) {
        let pods: Api<Pod> = Api::all(self.env.admin.clone());
        self.until("no training pods left on cpu-0/cpu-1", MINUTE, || {
            let pods = pods.clone();
            async move {
                let list = match pods
                    .list(&kube::api::ListParams::default().labels("charlm.dev/training"))
                    .await
                {
                    Ok(l) => l,
                    Err(e) => return Seen::Waiting(e.to_string()),
                };
                let busy: Vec<String> = list
                    .items
                    .iter()
                    .filter(|p| {
                        let node = p.spec.as_ref().and_then(|s| s.node_name.as_deref());
                        let phase = p.status.as_ref().and_then(|s| s.phase.as_deref());
                        matches!(node, Some("cpu-0" | "cpu-1"))
                            && !matches!(phase, Some("Succeeded" | "Failed"))
                    })
                    .map(|p| format!("{}/{}", p.namespace().unwrap_or_default(), p.name_any()))
                    .collect();
                if busy.is_empty() {
                    Seen::Done(())
                } else {
                    Seen::Waiting(format!("still there: {busy:?}"))
                }
            }
        })
        .await
    }

    fn ns(&self) -> &str {
        &self.env.ns
    }

    /// Polls `probe` until it is done; panics with the diagnostics when it is broken or when
    /// `timeout` passes.
    async fn until<T, F, Fut>(&self, what: &str, timeout: Duration, mut probe: F) -> T
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Seen<T>>,
    {
        let start = Instant::now();
        loop {
            let last = match probe().await {
                Seen::Done(v) => return v,
                Seen::Waiting(seen) => seen,
                Seen::Broken(why) => panic!("{}", self.report(&format!("{what}: {why}")).await),
            };
            if start.elapsed() > timeout {
                let message = format!(
                    "timed out after {timeout:?} waiting for {what}; last observed: {last}"
                );
                panic!("{}", self.report(&message).await);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Waits until `check` accepts the training; a training that failed, or that reached a phase
    /// from which `check` can no longer hold (`Succeeded` for a running check), breaks the wait.
    async fn wait_training<F>(
        &self,
        name: &str,
        what: &str,
        timeout: Duration,
        check: F,
    ) -> CharLMTraining
    where
        F: Fn(&CharLMTraining) -> bool,
    {
        let api = self.env.trainings();
        let check = &check;
        self.until(&format!("training {name}: {what}"), timeout, || {
            let api = api.clone();
            async move {
                match api.get_opt(name).await {
                    Ok(Some(t)) if check(&t) => Seen::Done(t),
                    Ok(Some(t)) => {
                        let status = serde_json::to_string(&t.status).unwrap();
                        match phase(&t) {
                            Some(p) if p.is_terminal() => {
                                Seen::Broken(format!("it ended {p:?} instead; status: {status}"))
                            }
                            _ => Seen::Waiting(status),
                        }
                    }
                    Ok(None) => Seen::Waiting("the training does not exist".into()),
                    Err(e) => Seen::Waiting(e.to_string()),
                }
            }
        })
        .await
    }

    async fn wait_phase(&self, name: &str, want: Phase, timeout: Duration) -> CharLMTraining {
        self.wait_training(name, &format!("phase {want:?}"), timeout, |t| {
            phase(t) == Some(want)
        })
        .await
    }

    /// A failure's message with what explains it: the operator's and the pods' log tails, and
    /// the pods as the API server has them.
    async fn report(&self, message: &str) -> String {
        let mut report = format!("{message}\n\n{}", self.env.log_tails());
        report.push_str(&self.pod_log_tails());
        let pods: Vec<String> = self
            .env
            .pods()
            .list(&Default::default())
            .await
            .map(|l| {
                l.items
                    .iter()
                    .map(|p| {
                        let s = p.status.clone().unwrap_or_default();
                        format!(
                            "{} on {:?}: {:?} {:?}",
                            p.name_any(),
                            p.spec.as_ref().and_then(|s| s.node_name.clone()),
                            s.phase,
                            s.message
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        report.push_str(&format!("--- pods of {} now: {pods:#?}\n", self.ns()));
        report
    }

    /// The runner's folder of a pod (it keeps its logs after the pod is gone).
    fn pod_dir(&self, pod: &Pod) -> PathBuf {
        self.plane.runner_state.join("pods").join(format!(
            "{}_{}_{}",
            self.ns(),
            pod.name_any(),
            pod.uid().unwrap_or_default()
        ))
    }

    fn trainer_log(&self, pod: &Pod) -> String {
        let path = self.pod_dir(pod).join("logs/trainer.log");
        std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("reading the trainer's log {}: {e}", path.display()))
    }

    /// The last lines of every container log of this namespace's pods, past and present.
    fn pod_log_tails(&self) -> String {
        let mut out = String::new();
        let prefix = format!("{}_", self.ns());
        let Ok(entries) = std::fs::read_dir(self.plane.runner_state.join("pods")) else {
            return format!(
                "--- no pod folders in {}\n",
                self.plane.runner_state.display()
            );
        };
        let mut dirs: Vec<PathBuf> = entries
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
            .map(|e| e.path())
            .collect();
        dirs.sort();
        for dir in dirs {
            let Ok(logs) = std::fs::read_dir(dir.join("logs")) else {
                continue;
            };
            let mut logs: Vec<PathBuf> = logs.flatten().map(|e| e.path()).collect();
            logs.sort();
            for log in logs {
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                let lines: Vec<&str> = text.lines().collect();
                out.push_str(&format!(
                    "--- last lines of {}:\n{}\n",
                    log.display(),
                    lines[lines.len().saturating_sub(TAIL)..].join("\n")
                ));
            }
        }
        out
    }

    /// The host folder behind the training's checkpoint claim (the PV's hostPath, which the
    /// stand-in kubelet mounts at /checkpoints).
    async fn checkpoint_dir(&self, training: &str) -> PathBuf {
        let claim = format!("{training}-checkpoints");
        let pvcs = self.env.pvcs();
        let pvs: Api<PersistentVolume> = Api::all(self.env.admin.clone());
        self.until(
            &format!("claim {claim} bound to a hostPath volume"),
            MINUTE,
            || {
                let (pvcs, pvs, claim) = (pvcs.clone(), pvs.clone(), claim.clone());
                async move {
                    let volume = match pvcs.get_opt(&claim).await {
                        Ok(Some(c)) => c.spec.and_then(|s| s.volume_name),
                        Ok(None) => return Seen::Waiting("no claim yet".into()),
                        Err(e) => return Seen::Waiting(e.to_string()),
                    };
                    let Some(volume) = volume else {
                        return Seen::Waiting("not bound".into());
                    };
                    match pvs.get_opt(&volume).await {
                        Ok(Some(pv)) => match pv.spec.and_then(|s| s.host_path) {
                            Some(h) => Seen::Done(PathBuf::from(h.path)),
                            None => Seen::Broken(format!("volume {volume} is not a hostPath")),
                        },
                        Ok(None) => Seen::Waiting(format!("volume {volume} not found")),
                        Err(e) => Seen::Waiting(e.to_string()),
                    }
                }
            },
        )
        .await
    }

    /// The only pod of `training` that is worker `index` of `attempt`.
    async fn worker(&self, training: &str, index: usize, attempt: i64) -> Pod {
        let pods = self.env.workers(training).await;
        let found: Vec<Pod> = pods
            .into_iter()
            .filter(|p| {
                let l = p.labels();
                l.get("charlm.dev/worker-index") == Some(&index.to_string())
                    && l.get("charlm.dev/attempt") == Some(&attempt.to_string())
            })
            .collect();
        match found.as_slice() {
            [pod] => pod.clone(),
            _ => {
                let message = format!(
                    "expected one pod for worker {index} of attempt {attempt} of {training}, found {}",
                    found.len()
                );
                panic!("{}", self.report(&message).await)
            }
        }
    }
}

fn phase(t: &CharLMTraining) -> Option<Phase> {
    t.status.as_ref().and_then(|s| s.phase)
}

fn condition(t: &CharLMTraining, type_: &str) -> (String, String) {
    t.status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == type_))
        .map(|c| (c.status.clone(), c.reason.clone()))
        .unwrap_or_else(|| panic!("no condition {type_} in {:?}", t.status))
}

/// Every (phase, attempt) a training goes through, from a watch, so short phases are not missed.
struct PhaseLog {
    seen: Arc<Mutex<Vec<(String, i64, String)>>>,
    task: tokio::task::JoinHandle<()>,
}

impl PhaseLog {
    fn start(api: Api<CharLMTraining>, name: &str) -> PhaseLog {
        let seen: Arc<Mutex<Vec<(String, i64, String)>>> = Arc::default();
        let record = seen.clone();
        let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
        let task = tokio::spawn(async move {
            let mut events = watcher(api, config)
                .default_backoff()
                .applied_objects()
                .boxed();
            while let Some(event) = events.next().await {
                let Ok(t) = event else { continue };
                let Some(status) = t.status else { continue };
                let Some(p) = status.phase else { continue };
                let entry = (
                    p.as_str().to_string(),
                    status.attempt,
                    status.message.unwrap_or_default(),
                );
                let mut seen = record.lock().unwrap();
                if seen.last().map(|(p, a, _)| (p, a)) != Some((&entry.0, &entry.1)) {
                    seen.push(entry);
                }
            }
        });
        PhaseLog { seen, task }
    }

    /// "Phase/attempt" in the order seen.
    fn phases(&self) -> Vec<String> {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .map(|(p, a, _)| format!("{p}/{a}"))
            .collect()
    }

    fn message_of(&self, phase: &str) -> Option<String> {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .find(|(p, _, _)| p == phase)
            .map(|(_, _, m)| m.clone())
    }
}

impl Drop for PhaseLog {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Whether `want` occurs in `seen` in order (other entries may come between).
fn in_order(seen: &[String], want: &[&str]) -> bool {
    let mut rest = seen.iter();
    want.iter().all(|w| rest.any(|s| s == w))
}

/// A tiny CPU training: depth 1, 64-character sequences, 256 tokens a step per worker, a
/// 200 000-character synthetic dataset, a checkpoint every 6 s. One thread per rank: the model
/// gains nothing from more, and OpenMP threads oversubscribing 2 shared cores slow it down 2x.
fn tiny_cpu(name: &str, workers: i32) -> Value {
    json!({
        "apiVersion": "charlm.dev/v1alpha1",
        "kind": "CharLMTraining",
        "metadata": {"name": name},
        "spec": {
            "depth": 1, "gpus": 0, "cpuWorkers": workers,
            "deviceBatchSize": 4, "seqLen": 64, "totalBatchSize": 256 * workers,
            "evalEvery": 400,
            "dataset": {"synthetic": {"chars": 200000, "seed": 1}},
            "checkpoint": {"size": "1Gi", "intervalMinutes": 0.1, "keep": 2},
            "restartPolicy": {"maxRestarts": 2, "backoffSeconds": 1},
            "resources": {"requests": {"cpu": "100m", "memory": "256Mi"}},
            "env": [{"name": "CHARLM_THREADS", "value": "1"}]
        }
    })
}

/// `step-000000042` → 42.
fn checkpoint_step(name: &str) -> Option<i64> {
    name.strip_prefix("step-")?.parse().ok()
}

/// Steps of the rolling checkpoints in a checkpoint folder, ascending.
fn checkpoints_in(dir: &Path) -> Vec<i64> {
    let mut steps: Vec<i64> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| checkpoint_step(&e.file_name().to_string_lossy()))
        .collect();
    steps.sort();
    steps
}

/// Checks a checkpoint folder against its manifest: the step and the size of every file.
fn assert_checkpoint_complete(dir: &Path, step: i64) {
    let manifest_path = dir.join("manifest.json");
    let text = std::fs::read_to_string(&manifest_path)
        .unwrap_or_else(|e| panic!("no manifest {}: {e}", manifest_path.display()));
    let manifest: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(manifest["step"], json!(step), "{}", manifest_path.display());
    let files = manifest["files"]
        .as_object()
        .expect("the manifest lists files");
    for want in ["model.safetensors", "optimizer.safetensors"] {
        let bytes = files[want]["bytes"].as_u64().expect("a size per file");
        let path = dir.join(want);
        let len = std::fs::metadata(&path)
            .unwrap_or_else(|e| panic!("{} is missing: {e}", path.display()))
            .len();
        assert_eq!(
            len,
            bytes,
            "{} has the size its manifest says",
            path.display()
        );
    }
}

/// The start and the end of a trainer's log (its middle is one line per step).
fn excerpt(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    if lines.len() <= 2 * TAIL {
        return log.to_string();
    }
    format!(
        "{}\n[... {} lines ...]\n{}",
        lines[..TAIL].join("\n"),
        lines.len() - 2 * TAIL,
        lines[lines.len() - TAIL..].join("\n")
    )
}

/// The steps of the trainer's per-step log lines ("step    123/456 | loss ..."), in order.
fn logged_steps(log: &str) -> Vec<i64> {
    log.lines()
        .filter_map(|l| {
            let rest = l.split_once("step ")?.1.trim_start();
            let (n, _) = rest.split_once('/')?;
            n.parse().ok()
        })
        .collect()
}

/// The pid of rank `rank`'s worker process in pod `pod` (started by `charlm-trainer launch`),
/// found by the marker the plane's stand-in kubelet puts on its processes, the pod's hostname and
/// the launcher's RANK.
fn worker_pid(runner_state: &Path, pod: &str, rank: usize) -> Option<i32> {
    let marker = format!(
        "{}={}",
        charlm_e2e::standin::sandbox::MARKER_ENV,
        runner_state.display()
    );
    let want = [
        marker.as_str(),
        &format!("HOSTNAME={pod}"),
        &format!("RANK={rank}"),
    ];
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        if args.get(1) != Some(&&b"train"[..]) {
            continue;
        }
        let Ok(environ) = std::fs::read(entry.path().join("environ")) else {
            continue;
        };
        let vars: Vec<&[u8]> = environ.split(|b| *b == 0).collect();
        if want.iter().all(|w| vars.contains(&w.as_bytes())) {
            return Some(pid);
        }
    }
    None
}

fn process_alive(pid: i32) -> bool {
    // A killed process stays a zombie until its parent reaps it; it is gone for our purpose.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            !s.rsplit_once(')')
                .is_some_and(|(_, r)| r.trim_start().starts_with('Z'))
        })
        .unwrap_or(false)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cpu_example_shows_live_progress_and_succeeds_with_a_checkpoint() {
    let flow = Flow::start("flow-example").await;
    // The example itself takes minutes on a CPU (depth 2, 1024 tokens a step); this copy keeps its
    // shape and shrinks the model and the data, with a 45 s budget in hours, so that the operator's
    // progress poll (at most every 25 s, with a 30 s requeue) meets a running trainer.
    let text = std::fs::read_to_string(repo_root().join("examples/cpu-training.yaml")).unwrap();
    let mut manifest: Value = serde_yaml::from_str(&text).unwrap();
    let name = manifest["metadata"]["name"].as_str().unwrap().to_string();
    let spec = manifest["spec"].as_object_mut().unwrap();
    assert_eq!(spec["gpus"], json!(0), "the CPU example trains on CPUs");
    for (k, v) in [
        ("depth", json!(1)),
        ("seqLen", json!(64)),
        ("deviceBatchSize", json!(4)),
        ("totalBatchSize", json!(256)),
        ("hours", json!(0.0125)),
        ("evalEvery", json!(500)),
    ] {
        spec.insert(k.into(), v);
    }
    spec.remove("maxSteps");
    spec["dataset"]["synthetic"]["chars"] = json!(200000);
    spec["checkpoint"]["intervalMinutes"] = json!(0.1);
    spec["resources"] = json!({"requests": {"cpu": "100m", "memory": "256Mi"}});
    spec.insert(
        "env".into(),
        json!([{"name": "CHARLM_THREADS", "value": "1"}]),
    );
    flow.env.apply(&manifest.to_string()).await;

    let running = flow.wait_phase(&name, Phase::Running, MINUTE).await;
    let pod = flow.worker(&name, 0, 0).await;
    let node = pod.spec.as_ref().and_then(|s| s.node_name.clone());
    assert!(
        matches!(node.as_deref(), Some("cpu-0" | "cpu-1")),
        "worker 0 runs on {node:?}, not a CPU node"
    );
    assert_eq!(running.status.as_ref().unwrap().workers, 1);

    // Live progress: read from rank 0's /progress while it runs, not the final report.
    let live = flow
        .wait_training(
            &name,
            "live progress while Running",
            Duration::from_secs(90),
            |t| {
                phase(t) == Some(Phase::Running)
                    && t.status
                        .as_ref()
                        .and_then(|s| s.progress.as_ref())
                        .is_some_and(|p| p.step > 0 && !p.complete)
            },
        )
        .await;
    let status = live.status.clone().unwrap();
    let p = status.progress.clone().unwrap();
    let report = serde_json::to_string(&p).unwrap();
    assert_eq!(p.tokens, p.step * 256, "{report}");
    assert!(
        p.train_loss.is_some_and(|l| l.is_finite() && l > 0.0),
        "{report}"
    );
    assert!(p.tokens_per_s.is_some_and(|v| v > 0.0), "{report}");
    assert!(p.eta_s.is_some_and(|v| v > 0.0), "{report}");
    assert!(p.elapsed_s > 0.0 && p.epoch > 0.0, "{report}");
    assert_eq!(p.world_size, 1, "{report}");
    assert!(p.observed_time.is_some(), "{report}");
    assert!(status.eta.is_some(), "an ETA in the status: {report}");

    let done = flow
        .wait_phase(&name, Phase::Succeeded, Duration::from_secs(120))
        .await;
    let status = done.status.clone().unwrap();
    let last = status.progress.clone().expect("the final report");
    assert!(last.complete, "{last:?}");
    assert_eq!(last.stop_reason.as_deref(), Some("budget"));
    assert!(
        last.step > p.step,
        "the final step {} comes after the live one {}",
        last.step,
        p.step
    );
    let bpc = status.final_val_bpc.expect("finalValBpc once Succeeded");
    assert!(bpc.is_finite() && bpc > 0.0 && bpc < 6.0, "val bpc {bpc}");
    let checkpoint = format!("/checkpoints/step-{:09}", last.step);
    assert_eq!(
        status.latest_checkpoint.as_deref(),
        Some(checkpoint.as_str())
    );
    assert_eq!(
        condition(&done, "Succeeded"),
        ("True".into(), "BudgetDone".into())
    );
    assert!(status.completion_time.is_some());
    assert_eq!(status.restarts, 0);

    // The checkpoint on the claim's volume, complete, and good enough to sample from.
    let dir = flow.checkpoint_dir(&name).await;
    let step_dir = dir.join(format!("step-{:09}", last.step));
    assert_checkpoint_complete(&step_dir, last.step);
    let complete: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("COMPLETE.json")).unwrap()).unwrap();
    assert_eq!(complete["complete"], json!(true));
    assert_eq!(complete["step"], json!(last.step));
    let sample = std::process::Command::new(flow.plane.image_bin_dir.join("charlm-trainer"))
        .args([
            "sample",
            "--device",
            "cpu",
            "--max-tokens",
            "40",
            "--prompt",
            "12+",
        ])
        .arg("--checkpoint")
        .arg(&step_dir)
        .output()
        .unwrap();
    assert!(
        sample.status.success() && !sample.stdout.is_empty(),
        "sampling from {} failed: {}{}",
        step_dir.display(),
        String::from_utf8_lossy(&sample.stdout),
        String::from_utf8_lossy(&sample.stderr)
    );

    let log = flow.trainer_log(&flow.worker(&name, 0, 0).await);
    assert!(
        log.contains(&format!("training complete at step {}", last.step)),
        "{}",
        excerpt(&log)
    );
    flow.env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_trainer_restarts_the_gang_which_resumes_from_the_checkpoint() {
    let flow = Flow::start("flow-resume").await;
    let name = "resume";
    // A budget in time, not steps: the kill comes after the first checkpoint (6 s) however fast
    // this machine is, and the resumed attempt trains the rest of the 22 s.
    let mut manifest = tiny_cpu(name, 1);
    manifest["spec"]["hours"] = json!(0.006);
    let phases = PhaseLog::start(flow.env.trainings(), name);
    flow.env.apply(&manifest.to_string()).await;
    flow.wait_phase(name, Phase::Running, MINUTE).await;
    let first = flow.worker(name, 0, 0).await;

    // Mid-run, once a checkpoint exists (every 6 s).
    let dir = flow.checkpoint_dir(name).await;
    let api = flow.env.trainings();
    let saved = flow
        .until(
            &format!("a checkpoint in {} mid-run", dir.display()),
            MINUTE,
            || {
                let (api, dir) = (api.clone(), dir.clone());
                async move {
                    match api.get_opt(name).await {
                        Ok(Some(t)) if phase(&t) != Some(Phase::Running) => {
                            return Seen::Broken(format!(
                                "the training left Running before a checkpoint: {}",
                                serde_json::to_string(&t.status).unwrap()
                            ))
                        }
                        Err(e) => return Seen::Waiting(e.to_string()),
                        _ => {}
                    }
                    match checkpoints_in(&dir).last() {
                        Some(&step) => Seen::Done(step),
                        None => Seen::Waiting("no step-* folder yet".into()),
                    }
                }
            },
        )
        .await;

    // The trainer process (rank 0 under `charlm-trainer launch`), not the pod object.
    let pid = match worker_pid(&flow.plane.runner_state, &first.name_any(), 0) {
        Some(pid) => pid,
        None => {
            let message = format!(
                "no `charlm-trainer train` process with RANK=0 of pod {} under {}",
                first.name_any(),
                flow.plane.runner_state.display()
            );
            panic!("{}", flow.report(&message).await)
        }
    };
    // SAFETY: a signal to the trainer process found above.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0, "kill {pid}");
    let killed_at = Instant::now();
    flow.until(
        "the trainer process to die",
        Duration::from_secs(10),
        || async {
            if process_alive(pid) {
                Seen::Waiting(format!("{pid} alive"))
            } else {
                Seen::Done(())
            }
        },
    )
    .await;

    let resumed = flow
        .wait_training(
            name,
            "Running again in attempt 1",
            Duration::from_secs(90),
            |t| phase(t) == Some(Phase::Running) && t.status.as_ref().unwrap().attempt == 1,
        )
        .await;
    let restarted_in = killed_at.elapsed();
    let status = resumed.status.clone().unwrap();
    assert_eq!(status.restarts, 1, "one gang restart");
    assert_eq!(
        condition(&resumed, "Restarting"),
        ("False".into(), "Recovered".into())
    );
    let seen = phases.phases();
    assert!(
        in_order(&seen, &["Running/0", "Restarting/1", "Running/1"]),
        "phases seen: {seen:?}"
    );
    let why = phases.message_of("Restarting").unwrap_or_default();
    assert!(
        why.contains(first.name_any().as_str()) && why.contains("exited with code 1"),
        "the restart names the failed worker and its exit: {why}"
    );

    let done = flow
        .wait_phase(name, Phase::Succeeded, Duration::from_secs(120))
        .await;
    let status = done.status.clone().unwrap();
    let last = status.progress.clone().unwrap();
    assert!(last.complete, "{last:?}");
    assert_eq!(
        status.latest_checkpoint,
        Some(format!("/checkpoints/step-{:09}", last.step))
    );
    assert!(status.final_val_bpc.is_some());
    let seen = phases.phases();
    assert!(
        in_order(
            &seen,
            &["Running/0", "Restarting/1", "Running/1", "Succeeded/1"]
        ),
        "phases seen: {seen:?}"
    );

    // The step count continues: attempt 1 starts from the checkpoint, not from step 1.
    let before = logged_steps(&flow.trainer_log(&first));
    let killed_step = *before.last().expect("attempt 0 logged steps");
    let second = flow.worker(name, 0, 1).await;
    let log = flow.trainer_log(&second);
    let (from, at) = log
        .lines()
        .find_map(|l| {
            let rest = l.split_once("resumed from ")?.1;
            let (dir, rest) = rest.split_once(" at step ")?;
            let step: i64 = rest.split_whitespace().next()?.parse().ok()?;
            Some((dir.to_string(), step))
        })
        .unwrap_or_else(|| {
            panic!(
                "attempt 1 did not resume from a checkpoint; its log:\n{}",
                excerpt(&log)
            )
        });
    assert_eq!(from, format!("/checkpoints/step-{at:09}"));
    assert!(
        at >= saved && at <= killed_step,
        "resumed at step {at}: the checkpoint seen before the kill was {saved}, the kill came at \
         step {killed_step}"
    );
    let after = logged_steps(&log);
    assert_eq!(
        after.first(),
        Some(&(at + 1)),
        "attempt 1's first step follows the checkpoint's"
    );
    assert_eq!(after.last(), Some(&last.step));
    assert!(
        last.step > killed_step,
        "attempt 1 trained on: {} steps in all",
        last.step
    );
    eprintln!(
        "checkpoint at step {saved}, killed at step {killed_step}, running again {restarted_in:?} \
         after the kill, resumed at step {at}, finished at {}; phases {seen:?}",
        last.step
    );
    flow.env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_cpu_pods_meet_through_the_service_name_and_complete() {
    let flow = Flow::start("flow-pair").await;
    let name = "pair";
    let port = 29500;
    // A training of another test or plane would make rank 0's store fail; say so plainly.
    flow.until(
        &format!("port {port} free for the TCPStore"),
        Duration::from_secs(30),
        || async {
            match std::net::TcpListener::bind(("0.0.0.0", port)) {
                Ok(_) => Seen::Done(()),
                Err(e) => Seen::Waiting(format!("{e}: another training (another plane?) holds it")),
            }
        },
    )
    .await;
    let mut manifest = tiny_cpu(name, 2);
    manifest["spec"]["maxSteps"] = json!(300);
    flow.env.apply(&manifest.to_string()).await;

    let running = flow.wait_phase(name, Phase::Running, MINUTE).await;
    assert_eq!(running.status.as_ref().unwrap().workers, 2);
    let pods = [flow.worker(name, 0, 0).await, flow.worker(name, 1, 0).await];
    let nodes: BTreeMap<String, Option<String>> = pods
        .iter()
        .map(|p| {
            (
                p.name_any(),
                p.spec.as_ref().and_then(|s| s.node_name.clone()),
            )
        })
        .collect();
    for node in nodes.values() {
        assert!(
            matches!(node.as_deref(), Some("cpu-0" | "cpu-1")),
            "nodes: {nodes:?}"
        );
    }

    let done = flow
        .wait_phase(name, Phase::Succeeded, Duration::from_secs(120))
        .await;
    let status = done.status.clone().unwrap();
    let p = status.progress.clone().unwrap();
    assert_eq!(p.world_size, 2, "{p:?}");
    assert_eq!(p.step, 300);
    assert_eq!(p.tokens, 300 * 512);
    assert!(status.final_val_bpc.is_some());
    assert_eq!(status.restarts, 0);

    // Worker 1 found rank 0 by the name the headless Service gives worker 0 (MASTER_ADDR), and
    // trained to the end with it.
    let master = format!("{name}-worker-0.{name}-workers.{}.svc", flow.ns());
    let log1 = flow.trainer_log(&pods[1]);
    assert!(
        log1.contains(&format!(
            "starting ranks 1-1 of 2 (node 1 of 2), rendezvous at {master}:{port}"
        )),
        "{}",
        excerpt(&log1)
    );
    assert!(
        log1.contains("launch: rank 1: exit status 0"),
        "worker 1 did not finish cleanly:\n{}",
        excerpt(&log1)
    );
    let log0 = flow.trainer_log(&pods[0]);
    assert!(
        log0.contains("batch: 512 tokens/step = 2 ranks"),
        "{}",
        excerpt(&log0)
    );
    eprintln!("pods on {nodes:?}");
    flow.env.finish().await;
}

/// Suspend sends the trainer SIGTERM, which saves a checkpoint: the status names that one (not the
/// one before), and resuming continues from it to the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suspend_names_the_checkpoint_the_sigterm_saved_and_resume_continues() {
    let flow = Flow::start("flow-suspend").await;
    let name = "pause";
    let mut manifest = tiny_cpu(name, 1);
    manifest["spec"]["hours"] = json!(0.006);
    flow.env.apply(&manifest.to_string()).await;
    flow.wait_phase(name, Phase::Running, MINUTE).await;
    let dir = flow.checkpoint_dir(name).await;
    let dir_probe = dir.clone();
    flow.until("a first checkpoint", MINUTE, || {
        let dir = dir_probe.clone();
        async move {
            match checkpoints_in(&dir).last() {
                Some(&step) => Seen::Done(step),
                None => Seen::Waiting("no step-* folder yet".into()),
            }
        }
    })
    .await;
    let api = flow.env.trainings();
    let suspend = |on: bool| {
        let api = api.clone();
        async move {
            api.patch(
                name,
                &kube::api::PatchParams::default(),
                &kube::api::Patch::Merge(json!({"spec": {"suspend": on}})),
            )
            .await
            .unwrap();
        }
    };
    suspend(true).await;
    flow.wait_phase(name, Phase::Suspended, MINUTE).await;
    flow.until("the workers to be gone", MINUTE, || async {
        match flow.env.workers(name).await.len() {
            0 => Seen::Done(()),
            n => Seen::Waiting(format!("{n} pods")),
        }
    })
    .await;
    let newest = *checkpoints_in(&dir)
        .last()
        .expect("checkpoints on the claim");
    let t = api.get(name).await.unwrap();
    assert_eq!(
        t.status.as_ref().unwrap().latest_checkpoint,
        Some(format!("/checkpoints/step-{newest:09}")),
        "the status names the newest checkpoint on the claim (the SIGTERM's)"
    );
    suspend(false).await;
    let done = flow
        .wait_phase(name, Phase::Succeeded, Duration::from_secs(120))
        .await;
    let last = done.status.unwrap().progress.unwrap();
    assert!(last.complete && last.step > newest, "{last:?}");
    flow.env.finish().await;
}

/// The worker pods pass the Pod Security Standard `restricted` (issue 19): in a namespace whose
/// label makes the API server's PodSecurity admission enforce it, a pod that does not comply is
/// refused, and a training runs to `Succeeded`, every object of it admitted. (The stand-in kubelet
/// runs its processes as root whatever the pod says; the admission is the API server's and real.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_training_succeeds_in_a_namespace_that_enforces_restricted() {
    let flow = Flow::start("flow-restricted").await;
    let namespaces: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(flow.env.admin.clone());
    namespaces
        .patch(
            flow.ns(),
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(json!({"metadata": {"labels": {
                "pod-security.kubernetes.io/enforce": "restricted",
                "pod-security.kubernetes.io/enforce-version": "latest"
            }}})),
        )
        .await
        .unwrap();

    // The label is in force: a pod that asks for nothing is refused.
    let plain: Pod = serde_json::from_value(json!({
        "metadata": {"name": "plain"},
        "spec": {"containers": [{"name": "c", "image": "charlm-trainer:e2e"}]}
    }))
    .unwrap();
    let refused = flow
        .env
        .pods()
        .create(&Default::default(), &plain)
        .await
        .expect_err("restricted admits a pod without a securityContext");
    assert!(
        refused
            .to_string()
            .contains("violates PodSecurity \"restricted:latest\""),
        "{refused}"
    );

    let name = "fenced";
    let mut manifest = tiny_cpu(name, 1);
    manifest["spec"]["maxSteps"] = json!(60);
    flow.env.apply(&manifest.to_string()).await;
    let done = flow
        .wait_phase(name, Phase::Succeeded, Duration::from_secs(150))
        .await;
    let last = done.status.unwrap().progress.unwrap();
    assert!(last.complete && last.step == 60, "{last:?}");

    let pod = flow.worker(name, 0, 0).await;
    let spec = pod.spec.unwrap();
    assert_eq!(spec.automount_service_account_token, Some(false));
    assert!(
        spec.volumes
            .iter()
            .flatten()
            .all(|v| v.projected.is_none() && v.secret.is_none()),
        "no ServiceAccount token volume: {:?}",
        spec.volumes
    );
    for c in spec
        .containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
    {
        let sc = c.security_context.as_ref().unwrap();
        assert_eq!(sc.read_only_root_filesystem, Some(true), "{}", c.name);
    }
    flow.env.finish().await;
}
