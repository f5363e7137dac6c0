//! The user's flows on a cluster whose pods run in real containers: the chart installed with the
//! operator running in-cluster, the trainer image on the node (issue 13). Nothing here reads the
//! node's disk or processes: every observation goes through the Kubernetes API (objects, pod logs)
//! and every action through it too (`kubectl exec` for the kill), so the same tests serve the
//! local plane's real node (`e2e/kind.sh --real-node`, which scripts/test runs) and a kind cluster
//! (`e2e/kind.sh`).
//!
//! 1. The CPU example (shrunk) shows live progress while `Running`, ends `Succeeded` with a
//!    complete checkpoint on its claim, and a pod of the trainer image samples from it; a pod
//!    that does not comply with Pod Security `restricted` is refused in the same namespace.
//! 2. A PVC dataset with a stray character ends `Failed`, the condition naming `path:line:column`,
//!    and the claim's files are byte for byte what they were.
//! 3. A PVC dataset the trainer's uid cannot read ends `Failed` naming the file and the fix.
//! 4. A PVC dataset folder with no `.txt` file ends `Failed` naming the folder and the fix; a
//!    checkpoint claim owned by root (0755) ends `Failed` naming the uid, gid and the fix.
//! 5. The trainer process killed mid-run: the gang restarts and resumes from the checkpoint.
//! 6. Two CPU pods meet through the headless Service's DNS names and complete.
//! 7. `spec.suspend` true: the SIGTERM saves a checkpoint and the status names it; false: the
//!    training resumes from it to `Succeeded`; deleting it removes its pods, Service and PVC.
//!
//! Every case's namespace enforces the Pod Security Standard `restricted`.
//!
//! Ignored by default: they need such a cluster. `e2e/kind.sh` runs them with `--ignored` after
//! `helm install`; `CHARLM_KUBECONFIG` names the cluster, `CHARLM_E2E_TRAINER_IMAGE` the trainer
//! image (default `charlm-trainer:e2e`). One at a time (`SERIAL`): the real node has 2 cores.
//! On any failure the message carries the training's status, the namespace's events, and the
//! logs of its pods and of the operator.

use std::collections::BTreeMap;
use std::future::Future;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Event, Namespace, PersistentVolumeClaim, Pod, Service};
use kube::api::{DeleteParams, ListParams, LogParams, Patch, PatchParams, PostParams};
use kube::{Api, Client, ResourceExt};
use serde_json::{json, Value};

use charlm_e2e::cluster::{
    admin_client, create_namespace, poll_until, repo_root, tool, CHART_NAMESPACE,
};
use charlm_operator::crd::{CharLMTraining, Phase};

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const MINUTE: Duration = Duration::from_secs(60);

fn trainer_image() -> String {
    std::env::var("CHARLM_E2E_TRAINER_IMAGE").unwrap_or_else(|_| "charlm-trainer:e2e".into())
}

/// One test's namespace and the APIs it uses.
struct Case {
    client: Client,
    ns: String,
    trainings: Api<CharLMTraining>,
    pods: Api<Pod>,
}

/// The step of the trainer's "resumed from … at step N" line in `log`.
fn resumed_at_step(log: &str) -> i64 {
    log.lines()
        .find_map(|l| {
            l.split_once(" at step ")?
                .1
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .expect("a resume line with its step")
}

impl Case {
    async fn start(test: &str) -> Case {
        let client = admin_client().await;
        let ns = create_namespace(&client, test).await.unwrap();
        // Every case runs where the API server enforces the Pod Security Standard `restricted`
        // (issue 19), so the real runtime proves what the pod spec claims: non-root, no
        // privilege, and a read-only root file system with only the operator's volumes writable.
        Api::<Namespace>::all(client.clone())
            .patch(
                &ns,
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"labels": {
                    "pod-security.kubernetes.io/enforce": "restricted",
                    "pod-security.kubernetes.io/enforce-version": "latest"
                }}})),
            )
            .await
            .unwrap_or_else(|e| panic!("labelling {ns} restricted: {e}"));
        Case {
            trainings: Api::namespaced(client.clone(), &ns),
            pods: Api::namespaced(client.clone(), &ns),
            client,
            ns,
        }
    }

    async fn apply(&self, manifest: &Value) {
        let name = manifest["metadata"]["name"].as_str().unwrap();
        let t: CharLMTraining = serde_json::from_value(manifest.clone()).unwrap();
        self.trainings
            .patch(
                name,
                &PatchParams::apply("charlm-e2e").force(),
                &Patch::Apply(&t),
            )
            .await
            .unwrap_or_else(|e| panic!("applying {name}: {e}"));
    }

    /// Polls `probe` every second until it answers; on timeout fails with the cluster's account.
    async fn until<T, F, Fut>(&self, what: &str, timeout: Duration, probe: F) -> T
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<Option<T>, String>>,
    {
        match poll_until(what, timeout, Duration::from_secs(1), probe).await {
            Ok(v) => v,
            Err(message) => panic!("{}", self.report(&message).await),
        }
    }

    async fn training(&self, name: &str) -> Result<CharLMTraining, String> {
        self.trainings.get(name).await.map_err(|e| e.to_string())
    }

    async fn wait_phase(&self, name: &str, want: Phase, timeout: Duration) -> CharLMTraining {
        self.until(&format!("{name} to be {want:?}"), timeout, || async {
            let t = self.training(name).await?;
            let phase = t.status.as_ref().and_then(|s| s.phase);
            match phase {
                Some(p) if p == want => Ok(Some(t)),
                Some(Phase::Failed | Phase::Succeeded) => Err(format!(
                    "ended otherwise: {}",
                    serde_json::to_string(&t.status).unwrap()
                )),
                _ => Err(serde_json::to_string(&t.status).unwrap()),
            }
        })
        .await
    }

    async fn workers(&self, training: &str) -> Vec<Pod> {
        let lp = ListParams::default().labels(&format!("charlm.dev/training={training}"));
        self.pods
            .list(&lp)
            .await
            .map(|l| l.items)
            .unwrap_or_default()
    }

    /// A pod of the trainer image that runs `script` as uid 1000 with `/data` on `claim`, and its log.
    async fn run_script(
        &self,
        pod: &str,
        claim: &str,
        script: &str,
        read_only: bool,
    ) -> (String, String) {
        let manifest = json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": pod},
            "spec": {
                "restartPolicy": "Never",
                "terminationGracePeriodSeconds": 1,
                "securityContext": {"runAsNonRoot": true, "runAsUser": 1000, "runAsGroup": 1000,
                                    "fsGroup": 1000, "seccompProfile": {"type": "RuntimeDefault"}},
                "containers": [{
                    "name": "main", "image": trainer_image(), "imagePullPolicy": "Never",
                    "command": ["sh", "-c", script],
                    "volumeMounts": [{"name": "data", "mountPath": "/data", "readOnly": read_only},
                                     {"name": "tmp", "mountPath": "/tmp"}],
                    "securityContext": {"allowPrivilegeEscalation": false, "readOnlyRootFilesystem": true,
                                        "capabilities": {"drop": ["ALL"]}}
                }],
                "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": claim}},
                            {"name": "tmp", "emptyDir": {}}]
            }
        });
        self.run_pod(pod, manifest).await
    }

    /// Creates the pod `manifest` describes and waits for it to finish: its phase and log.
    async fn run_pod(&self, pod: &str, manifest: serde_json::Value) -> (String, String) {
        self.pods
            .create(
                &PostParams::default(),
                &serde_json::from_value(manifest).unwrap(),
            )
            .await
            .unwrap_or_else(|e| panic!("creating pod {pod}: {e}"));
        let phase = self
            .until(&format!("pod {pod} to finish"), 3 * MINUTE, || async {
                let p = self.pods.get(pod).await.map_err(|e| e.to_string())?;
                match p.status.as_ref().and_then(|s| s.phase.clone()).as_deref() {
                    Some(done @ ("Succeeded" | "Failed")) => Ok(Some(done.to_string())),
                    _ => Err(format!("{:?}", p.status)),
                }
            })
            .await;
        let log = self
            .pods
            .logs(pod, &LogParams::default())
            .await
            .unwrap_or_default();
        (phase, log)
    }

    /// The `step-*` checkpoints on `claim`, oldest first, read by a pod of the trainer image.
    async fn checkpoints_on(&self, pod: &str, claim: &str) -> Vec<i64> {
        let (phase, log) = self.run_script(pod, claim, "ls /data", true).await;
        assert_eq!(phase, "Succeeded", "listing {claim}: {log}");
        // Gone at once, so that it holds the claim back from nothing (a deletion included).
        let _ = self
            .pods
            .delete(pod, &DeleteParams::default().grace_period(0))
            .await;
        let mut steps: Vec<i64> = log
            .lines()
            .filter_map(|l| l.trim().strip_prefix("step-")?.parse().ok())
            .collect();
        steps.sort_unstable();
        steps
    }

    async fn claim(&self, name: &str) {
        let pvc: PersistentVolumeClaim = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "metadata": {"name": name},
            "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "64Mi"}}}
        }))
        .unwrap();
        Api::<PersistentVolumeClaim>::namespaced(self.client.clone(), &self.ns)
            .create(&PostParams::default(), &pvc)
            .await
            .unwrap();
    }

    /// What a newcomer needs when a test fails: the message, then the trainings' status, the
    /// namespace's events, each pod's containers' logs and the operator's log.
    async fn report(&self, message: &str) -> String {
        let mut out = format!("{message}\n---- trainings in {} ----\n", self.ns);
        for t in self
            .trainings
            .list(&ListParams::default())
            .await
            .map(|l| l.items)
            .unwrap_or_default()
        {
            out += &format!(
                "{}: {}\n",
                t.name_any(),
                serde_json::to_string(&t.status).unwrap()
            );
        }
        out += "---- events ----\n";
        let events: Api<Event> = Api::namespaced(self.client.clone(), &self.ns);
        for e in events
            .list(&ListParams::default())
            .await
            .map(|l| l.items)
            .unwrap_or_default()
        {
            out += &format!(
                "{} {} {}: {}\n",
                e.involved_object.name.unwrap_or_default(),
                e.type_.unwrap_or_default(),
                e.reason.unwrap_or_default(),
                e.message.unwrap_or_default()
            );
        }
        let pods = self
            .pods
            .list(&ListParams::default())
            .await
            .map(|l| l.items)
            .unwrap_or_default();
        for p in pods {
            let containers = p
                .spec
                .iter()
                .flat_map(|s| s.init_containers.iter().flatten().chain(&s.containers))
                .map(|c| c.name.clone())
                .collect::<Vec<_>>();
            for c in containers {
                out += &format!("---- log of {}/{c} ----\n", p.name_any());
                out += &self.log_tail(&self.pods, &p.name_any(), Some(&c)).await;
            }
        }
        let operator: Api<Pod> = Api::namespaced(self.client.clone(), CHART_NAMESPACE);
        for p in operator
            .list(&ListParams::default())
            .await
            .map(|l| l.items)
            .unwrap_or_default()
        {
            out += &format!("---- operator log {} ----\n", p.name_any());
            out += &self.log_tail(&operator, &p.name_any(), None).await;
        }
        out
    }

    async fn log_tail(&self, pods: &Api<Pod>, pod: &str, container: Option<&str>) -> String {
        let lp = LogParams {
            container: container.map(str::to_string),
            tail_lines: Some(30),
            ..Default::default()
        };
        pods.logs(pod, &lp)
            .await
            .unwrap_or_else(|e| format!("(no log: {e})\n"))
    }

    async fn finish(self) {
        let namespaces: Api<Namespace> = Api::all(self.client.clone());
        let _ = namespaces.delete(&self.ns, &DeleteParams::default()).await;
    }
}

fn tiny(name: &str, workers: i32) -> Value {
    json!({
        "apiVersion": "charlm.dev/v1alpha1",
        "kind": "CharLMTraining",
        "metadata": {"name": name},
        "spec": {
            "depth": 1, "gpus": 0, "cpuWorkers": workers,
            "deviceBatchSize": 4, "seqLen": 64, "totalBatchSize": 256 * workers,
            "evalEvery": 400, "maxSteps": 300,
            // A depth-1 model memorises 200 k characters within the budgets of these cases, and
            // the default early stop would end them before the kill or suspend they test.
            "earlyStop": {"patience": 0},
            "dataset": {"synthetic": {"chars": 200000, "seed": 1}},
            "checkpoint": {"size": "256Mi", "intervalMinutes": 0.1, "keep": 2},
            "restartPolicy": {"maxRestarts": 2, "backoffSeconds": 1},
            "resources": {"requests": {"cpu": "250m", "memory": "256Mi"}},
            "env": [{"name": "CHARLM_THREADS", "value": "1"}]
        }
    })
}

fn pvc_dataset(name: &str, claim: &str, path: &str) -> Value {
    let mut t = tiny(name, 1);
    t["spec"]["dataset"] = json!({"pvc": {"claimName": claim, "path": path}});
    t
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a cluster with the chart and images: e2e/kind.sh runs it"]
async fn cpu_example_shows_live_progress_and_succeeds_with_a_checkpoint_that_samples() {
    let _serial = SERIAL.lock().await;
    let case = Case::start("example").await;

    // The namespace's label is in force: a pod that asks for nothing is refused.
    let plain: Pod = serde_json::from_value(json!({
        "metadata": {"name": "plain"},
        "spec": {"containers": [{"name": "c", "image": trainer_image()}]}
    }))
    .unwrap();
    let refused = case
        .pods
        .create(&PostParams::default(), &plain)
        .await
        .expect_err("restricted admits a pod without a securityContext");
    assert!(
        refused
            .to_string()
            .contains("violates PodSecurity \"restricted:latest\""),
        "{refused}"
    );

    // The example's shape, shrunk: a small model and dataset, and a budget in time (54 s) long
    // enough that the operator's progress poll (every 25 s at most) meets a running trainer.
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
        ("hours", json!(0.015)),
        ("evalEvery", json!(500)),
        // It memorises 200 k characters: without this the default early stop, not the budget
        // this case asserts, would end it.
        ("earlyStop", json!({"patience": 0})),
    ] {
        spec.insert(k.into(), v);
    }
    spec.remove("maxSteps");
    spec["dataset"]["synthetic"]["chars"] = json!(200000);
    spec["checkpoint"]["intervalMinutes"] = json!(0.1);
    spec["resources"] = json!({"requests": {"cpu": "250m", "memory": "256Mi"}});
    spec.insert(
        "env".into(),
        json!([{"name": "CHARLM_THREADS", "value": "1"}]),
    );
    case.apply(&manifest).await;

    // Live progress: read from rank 0's /progress while it runs, not the final report.
    let live = case
        .until("live progress while Running", 4 * MINUTE, || async {
            let t = case.training(&name).await?;
            let s = t.status.clone().unwrap_or_default();
            match &s.progress {
                Some(p) if s.phase == Some(Phase::Running) && p.step > 0 && !p.complete => {
                    Ok(Some(s))
                }
                _ => Err(serde_json::to_string(&s).unwrap()),
            }
        })
        .await;
    let p = live.progress.clone().unwrap();
    let report = serde_json::to_string(&p).unwrap();
    assert_eq!(live.workers, 1, "{report}");
    assert_eq!(p.tokens, p.step * 256, "{report}");
    assert!(
        p.train_loss.is_some_and(|l| l.is_finite() && l > 0.0),
        "{report}"
    );
    assert!(p.tokens_per_s.is_some_and(|v| v > 0.0), "{report}");
    assert!(p.eta_s.is_some_and(|v| v > 0.0), "{report}");
    assert!(p.elapsed_s > 0.0 && p.epoch > 0.0, "{report}");
    assert_eq!(p.world_size, 1, "{report}");
    assert!(live.eta.is_some(), "an ETA in the status: {report}");

    let done = case.wait_phase(&name, Phase::Succeeded, 3 * MINUTE).await;
    let status = done.status.clone().unwrap();
    let last = status.progress.clone().expect("the final report");
    assert!(last.complete, "{last:?}");
    assert_eq!(last.stop_reason.as_deref(), Some("budget"), "{last:?}");
    assert!(
        last.step > p.step,
        "final {} after live {}",
        last.step,
        p.step
    );
    let bpc = status.final_val_bpc.expect("finalValBpc once Succeeded");
    assert!(bpc.is_finite() && bpc > 0.0 && bpc < 6.0, "val bpc {bpc}");
    let step_dir = format!("step-{:09}", last.step);
    assert_eq!(
        status.latest_checkpoint.as_deref(),
        Some(format!("/checkpoints/{step_dir}").as_str())
    );
    assert!(status.completion_time.is_some());
    assert_eq!(status.restarts, 0);

    // The checkpoint on the claim, complete, and good enough to sample from, in a pod of the
    // trainer image that mounts the claim read-only.
    let claim = status.checkpoint_pvc.clone().expect("status.checkpointPvc");
    let script = format!(
        "cat /data/COMPLETE.json && echo && echo ---- && test -f /data/{step_dir}/manifest.json && \
         charlm-trainer sample --checkpoint /data/{step_dir} --prompt 12+ --max-tokens 40 \
         --temperature 0 --device cpu"
    );
    let (phase, log) = case.run_script("sample", &claim, &script, true).await;
    assert_eq!(phase, "Succeeded", "{}", case.report(&log).await);
    let (complete, sample) = log.split_once("\n----\n").unwrap_or((&log, ""));
    let complete: Value = serde_json::from_str(complete)
        .unwrap_or_else(|e| panic!("COMPLETE.json is not JSON ({e}): {log}"));
    assert_eq!(complete["complete"], json!(true), "{log}");
    assert_eq!(complete["step"], json!(last.step), "{log}");
    assert!(
        sample.lines().any(|l| l.starts_with("12+")),
        "no sample: {log}"
    );
    case.finish().await;
}

/// Writes two files, `b.txt` with a stray `x` at line 3, column 5, and prints their checksums.
const WRITE_CORPUS: &str = "mkdir -p /data/corpus && cd /data/corpus && \
    printf '12+34\\n46\\n\\n7-3\\n4\\n\\n' >a.txt && printf '1+1\\n2\\n7.8Hx9\\n' >b.txt && \
    sha256sum a.txt b.txt";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a cluster with the chart and images: e2e/kind.sh runs it"]
async fn a_stray_character_on_the_pvc_fails_naming_its_place_and_leaves_the_files() {
    let _serial = SERIAL.lock().await;
    let case = Case::start("pvc-bad-file").await;
    case.claim("texts").await;
    let (phase, before) = case
        .run_script("writer", "texts", WRITE_CORPUS, false)
        .await;
    assert_eq!(phase, "Succeeded", "{}", case.report(&before).await);

    case.apply(&pvc_dataset("stray", "texts", "corpus")).await;
    let failed = case.wait_phase("stray", Phase::Failed, 3 * MINUTE).await;
    let message = failed
        .status
        .as_ref()
        .and_then(|s| s.message.clone())
        .unwrap_or_default();
    assert!(
        message.contains("b.txt:3:5"),
        "{}",
        case.report(&format!("the failure does not name b.txt:3:5: {message}"))
            .await
    );
    assert!(case.workers("stray").await.iter().all(|p| {
        // No new attempt after bad input: the one pod ran its prepare step and stopped.
        p.labels().get("charlm.dev/attempt").map(String::as_str) == Some("0")
    }));

    let (phase, after) = case
        .run_script(
            "reader",
            "texts",
            "cd /data/corpus && sha256sum a.txt b.txt && ls",
            true,
        )
        .await;
    assert_eq!(phase, "Succeeded", "{after}");
    for line in before.lines() {
        assert!(
            after.contains(line),
            "the claim's files changed: before\n{before}\nafter\n{after}"
        );
    }
    eprintln!("failed as expected: {message}");
    case.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a cluster with the chart and images: e2e/kind.sh runs it"]
async fn a_dataset_the_trainer_cannot_read_fails_naming_the_file_and_the_fix() {
    let _serial = SERIAL.lock().await;
    let case = Case::start("pvc-unreadable").await;
    case.claim("texts").await;
    let script = format!("{WRITE_CORPUS} && chmod 000 b.txt");
    let (phase, log) = case.run_script("writer", "texts", &script, false).await;
    assert_eq!(phase, "Succeeded", "{log}");

    case.apply(&pvc_dataset("locked", "texts", "corpus")).await;
    let failed = case.wait_phase("locked", Phase::Failed, 3 * MINUTE).await;
    let message = failed
        .status
        .as_ref()
        .and_then(|s| s.message.clone())
        .unwrap_or_default();
    assert!(
        message.contains("b.txt") && message.contains("1000"),
        "{}",
        case.report(&format!(
            "the failure should name the unreadable file and uid 1000 (the fix): {message}"
        ))
        .await
    );
    eprintln!("failed as expected: {message}");
    case.finish().await;
}

/// A PVC dataset folder that holds no `.txt` file (here a stray `notes.md`): `Failed` at the
/// prepare step, naming the folder and what to put there, without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a cluster with the chart and images: e2e/kind.sh runs it"]
async fn a_dataset_folder_without_text_files_fails_naming_the_folder_and_the_fix() {
    let _serial = SERIAL.lock().await;
    let case = Case::start("pvc-empty").await;
    case.claim("texts").await;
    let script = "mkdir -p /data/corpus && echo 'to do' >/data/corpus/notes.md";
    let (phase, log) = case.run_script("writer", "texts", script, false).await;
    assert_eq!(phase, "Succeeded", "{log}");

    case.apply(&pvc_dataset("empty", "texts", "corpus")).await;
    let failed = case.wait_phase("empty", Phase::Failed, 3 * MINUTE).await;
    let status = failed.status.clone().unwrap_or_default();
    let message = status.message.clone().unwrap_or_default();
    let report = case.report(&message).await;
    assert!(
        message.contains("no .txt files under /dataset/corpus")
            && message.contains("put the dataset's text files there"),
        "the failure should name the folder and the fix: {report}"
    );
    assert_eq!(status.restarts, 0, "bad input is not retried: {report}");
    eprintln!("failed as expected: {message}");
    case.finish().await;
}

/// A checkpoint claim that arrives owned by root, mode 0755 (storage whose driver does not apply
/// the pod's fsGroup, here a hostPath volume the kubelet creates): the trainer finds it before it
/// trains, and the training fails once, naming the directory, the uid and gid, and the fix.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a cluster with the chart and images: e2e/kind.sh runs it"]
async fn a_checkpoint_claim_of_another_owner_fails_naming_the_uid_and_the_fix() {
    let _serial = SERIAL.lock().await;
    let case = Case::start("claim-owner").await;
    let name = "owner";
    // A volume bound in advance to the claim the operator will make (`<name>-checkpoints`), of a
    // class no provisioner serves; under /tmp/hostpath_pv/ so that the plane's `down` (and the
    // controller-manager's hostPath deleter) remove its directory.
    let class = format!("{}-root-owned", case.ns);
    let pv_name = format!("{}-checkpoints", case.ns);
    let pv: k8s_openapi::api::core::v1::PersistentVolume = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "PersistentVolume",
        "metadata": {"name": pv_name},
        "spec": {
            "capacity": {"storage": "256Mi"},
            "accessModes": ["ReadWriteOnce"],
            "persistentVolumeReclaimPolicy": "Delete",
            "storageClassName": class,
            "hostPath": {"path": format!("/tmp/hostpath_pv/{pv_name}"), "type": "DirectoryOrCreate"},
            "claimRef": {"namespace": case.ns, "name": format!("{name}-checkpoints")}
        }
    }))
    .unwrap();
    let pvs: Api<k8s_openapi::api::core::v1::PersistentVolume> = Api::all(case.client.clone());
    pvs.create(&PostParams::default(), &pv)
        .await
        .unwrap_or_else(|e| panic!("creating PersistentVolume {pv_name}: {e}"));
    let mut manifest = tiny(name, 1);
    manifest["spec"]["checkpoint"]["storageClassName"] = json!(class);
    case.apply(&manifest).await;
    let failed = case.wait_phase(name, Phase::Failed, 4 * MINUTE).await;
    let status = failed.status.clone().unwrap();
    let message = status.message.clone().unwrap_or_default();
    let report = case.report(&message).await;
    for want in [
        "--checkpoint-dir /checkpoints",
        "cannot be written",
        "uid 1000, gid 1000",
        "owned by uid 1000, or group-writable for gid 1000",
    ] {
        assert!(
            message.contains(want),
            "no {want:?} in the message: {report}"
        );
    }
    let failed_condition = status
        .conditions
        .iter()
        .find(|c| c.type_ == "Failed")
        .unwrap_or_else(|| panic!("no Failed condition: {report}"));
    assert_eq!(failed_condition.reason, "InvalidInput", "{report}");
    assert_eq!(status.restarts, 0, "bad input is not retried: {report}");
    case.trainings
        .delete(name, &DeleteParams::default())
        .await
        .unwrap();
    case.finish().await;
    let _ = pvs.delete(&pv_name, &DeleteParams::default()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a cluster with the chart and images: e2e/kind.sh runs it"]
async fn a_killed_trainer_restarts_the_gang_which_resumes_from_its_checkpoint() {
    let _serial = SERIAL.lock().await;
    let case = Case::start("kill").await;
    let name = "resume";
    let mut manifest = tiny(name, 1);
    manifest["spec"]["maxSteps"] = json!(100000);
    manifest["spec"]["hours"] = json!(0.012);
    case.apply(&manifest).await;
    case.wait_phase(name, Phase::Running, 3 * MINUTE).await;
    let saved = case
        .until("a checkpoint mid-run", 2 * MINUTE, || async {
            let t = case.training(name).await?;
            let s = t.status.clone().unwrap_or_default();
            match (s.latest_checkpoint, s.progress) {
                (Some(c), Some(p)) if !p.complete => Ok(Some((c, p.step))),
                (_, p) => Err(format!("checkpoint not yet; progress {p:?}")),
            }
        })
        .await;
    let pod = case
        .workers(name)
        .await
        .pop()
        .expect("a worker pod")
        .name_any();
    // The rank's `charlm-trainer train` process (pid 1 is `launch`, which signals from inside the
    // container cannot kill): SIGKILL, as a crash or the OOM killer would.
    let kill = "for d in /proc/[0-9]*; do tr '\\0' ' ' <$d/cmdline 2>/dev/null | \
                grep -q '^[^ ]*charlm-trainer train' && kill -KILL ${d#/proc/} && echo killed ${d#/proc/}; \
                done; true";
    let out = tool(
        "kubectl",
        &[
            "exec", "-n", &case.ns, &pod, "-c", "trainer", "--", "sh", "-c", kill,
        ],
    )
    .unwrap_or_else(|e| panic!("kubectl exec: {e}"));
    assert!(
        out.contains("killed"),
        "no trainer process found in {pod}: {out}"
    );
    let resumed = case
        .until("Running again in attempt 1", 3 * MINUTE, || async {
            let t = case.training(name).await?;
            let s = t.status.clone().unwrap_or_default();
            if s.attempt == 1 && s.phase == Some(Phase::Running) {
                Ok(Some(t))
            } else {
                Err(serde_json::to_string(&s).unwrap())
            }
        })
        .await;
    assert_eq!(resumed.status.as_ref().unwrap().restarts, 1);
    let log = case
        .until("attempt 1 to log its resume", 2 * MINUTE, || async {
            let pods = case.workers(name).await;
            let Some(p) = pods
                .iter()
                .find(|p| p.labels().get("charlm.dev/attempt").map(String::as_str) == Some("1"))
            else {
                return Err("no attempt-1 pod".into());
            };
            let lp = LogParams {
                container: Some("trainer".into()),
                ..Default::default()
            };
            let log = case
                .pods
                .logs(&p.name_any(), &lp)
                .await
                .map_err(|e| e.to_string())?;
            Ok(log.contains("resumed from ").then_some(log))
        })
        .await;
    let at = resumed_at_step(&log);
    assert!(
        at > 0,
        "attempt 1 starts from a checkpoint, not from step 0: {log}"
    );
    let done = case.wait_phase(name, Phase::Succeeded, 3 * MINUTE).await;
    let last = done.status.unwrap().progress.unwrap();
    assert!(last.complete && last.step > at, "{last:?}");
    eprintln!(
        "checkpoint {} (seen at step {}), resumed at step {at}, finished at step {}",
        saved.0, saved.1, last.step
    );
    case.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a cluster with the chart and images: e2e/kind.sh runs it"]
async fn two_cpu_pods_meet_through_the_headless_service_dns_and_complete() {
    let _serial = SERIAL.lock().await;
    let case = Case::start("pair").await;
    let name = "pair";
    case.apply(&tiny(name, 2)).await;
    // Addresses are read while the pods run: a finished pod's IP may already be released and
    // cleared from its status, which once made this test see one address of two.
    let seen = std::sync::Mutex::new(std::collections::BTreeMap::<String, String>::new());
    let done = case
        .until(&format!("{name} to succeed"), 5 * MINUTE, || async {
            for p in case.workers(name).await {
                if let Some(ip) = p.status.as_ref().and_then(|s| s.pod_ip.clone()) {
                    seen.lock().unwrap().insert(p.name_any(), ip);
                }
            }
            let t = case.training(name).await?;
            match t.status.as_ref().and_then(|s| s.phase) {
                Some(Phase::Succeeded) => Ok(Some(t)),
                Some(Phase::Failed) => Err(format!(
                    "ended otherwise: {}",
                    serde_json::to_string(&t.status).unwrap()
                )),
                _ => Err(serde_json::to_string(&t.status).unwrap()),
            }
        })
        .await;
    let status = done.status.clone().unwrap();
    let p = status.progress.clone().unwrap();
    assert_eq!((p.world_size, p.step), (2, 300), "{p:?}");
    let pods = case.workers(name).await;
    let ips: Vec<String> = seen.into_inner().unwrap().into_values().collect();
    assert!(
        ips.len() == 2 && ips[0] != ips[1],
        "two pods with their own addresses: {ips:?}"
    );
    let master = format!("{name}-worker-0.{name}-workers.{}.svc", case.ns);
    let worker1 = pods
        .iter()
        .find(|p| p.name_any().ends_with("-worker-1"))
        .unwrap();
    let lp = LogParams {
        container: Some("trainer".into()),
        ..Default::default()
    };
    let log1 = case
        .pods
        .logs(&worker1.name_any(), &lp)
        .await
        .unwrap_or_default();
    assert!(
        log1.contains(&format!("rendezvous at {master}:")),
        "worker 1 met rank 0 by its DNS name {master}:\n{log1}"
    );
    case.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a cluster with the chart and images: e2e/kind.sh runs it"]
async fn suspend_names_its_checkpoint_resume_finishes_and_delete_removes_everything() {
    let _serial = SERIAL.lock().await;
    let case = Case::start("suspend").await;
    let name = "pause";
    let mut manifest = tiny(name, 1);
    manifest["spec"]["maxSteps"] = json!(100000);
    manifest["spec"]["hours"] = json!(0.012);
    case.apply(&manifest).await;
    case.wait_phase(name, Phase::Running, 3 * MINUTE).await;
    case.until("a first checkpoint", 2 * MINUTE, || async {
        let s = case.training(name).await?.status.unwrap_or_default();
        match s.latest_checkpoint {
            Some(c) => Ok(Some(c)),
            None => Err(format!("no checkpoint yet; progress {:?}", s.progress)),
        }
    })
    .await;
    let api = case.trainings.clone();
    let suspend = |on: bool| {
        let api = api.clone();
        async move {
            api.patch(
                name,
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"suspend": on}})),
            )
            .await
            .unwrap();
        }
    };
    suspend(true).await;
    case.wait_phase(name, Phase::Suspended, 2 * MINUTE).await;
    case.until("the workers to be gone", 2 * MINUTE, || async {
        match case.workers(name).await.len() {
            0 => Ok(Some(())),
            n => Err(format!("{n} pods")),
        }
    })
    .await;
    // Suspend's SIGTERM saved a checkpoint: the status names that one, the newest on the claim.
    let status = case
        .training(name)
        .await
        .unwrap()
        .status
        .unwrap_or_default();
    let pvc = status.checkpoint_pvc.clone().expect("status.checkpointPvc");
    let newest = *case
        .checkpoints_on("list", &pvc)
        .await
        .last()
        .expect("checkpoints on the claim");
    assert_eq!(
        status.latest_checkpoint,
        Some(format!("/checkpoints/step-{newest:09}")),
        "the status names the newest checkpoint on the claim (the SIGTERM's)"
    );
    suspend(false).await;
    let done = case.wait_phase(name, Phase::Succeeded, 4 * MINUTE).await;
    let last = done.status.unwrap().progress.unwrap();
    assert!(last.complete && last.step > newest, "{last:?}");

    case.trainings
        .delete(name, &DeleteParams::default())
        .await
        .unwrap();
    let services: Api<Service> = Api::namespaced(case.client.clone(), &case.ns);
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(case.client.clone(), &case.ns);
    case.until("pods, Service and claim to go", 2 * MINUTE, || async {
        let pods = case.workers(name).await.len();
        let svcs = services
            .list(&ListParams::default())
            .await
            .map(|l| l.items.len())
            .unwrap_or(0);
        let claim = claims.get_opt(&pvc).await.ok().flatten().is_some();
        if pods == 0 && svcs == 0 && !claim {
            Ok(Some(()))
        } else {
            Err(format!("{pods} pods, {svcs} services, claim left: {claim}"))
        }
    })
    .await;
    case.finish().await;
}

// ---- Cases that need two worker nodes (kind's cluster of e2e/kind-config.yaml) ----------------

/// The nodes pods can run on: Ready, without a NoSchedule taint (kind's control plane keeps one in
/// a cluster with workers). Fails naming the need when there are fewer than `n`.
async fn worker_nodes(case: &Case, n: usize) -> Vec<String> {
    let nodes: Api<k8s_openapi::api::core::v1::Node> = Api::all(case.client.clone());
    let list = nodes.list(&ListParams::default()).await.unwrap().items;
    let workers: Vec<String> = list
        .iter()
        .filter(|node| {
            let spec = node.spec.clone().unwrap_or_default();
            let tainted = spec
                .taints
                .unwrap_or_default()
                .iter()
                .any(|t| t.effect == "NoSchedule" || t.effect == "NoExecute");
            let ready = node
                .status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
            ready && !tainted && !spec.unschedulable.unwrap_or(false)
        })
        .map(|node| node.name_any())
        .collect();
    assert!(
        workers.len() >= n,
        "this case needs {n} schedulable worker nodes (e2e/kind.sh's cluster has 2); found {workers:?}"
    );
    workers
}

/// One worker pod per node: a required anti-affinity among the training's own pods, as a user
/// spreads a gang (`spec.affinity`).
fn spread(manifest: &mut Value) {
    let name = manifest["metadata"]["name"].as_str().unwrap().to_string();
    manifest["spec"]["affinity"] = json!({"podAntiAffinity": {
        "requiredDuringSchedulingIgnoredDuringExecution": [{
            "labelSelector": {"matchLabels": {"charlm.dev/training": name}},
            "topologyKey": "kubernetes.io/hostname"
        }]
    }});
}

fn add_env(manifest: &mut Value, name: &str, value: &str) {
    manifest["spec"]["env"]
        .as_array_mut()
        .unwrap()
        .push(json!({"name": name, "value": value}));
}

impl Case {
    /// A container's log of a training's worker `index` (its newest attempt's pod).
    async fn worker_log(&self, training: &str, index: usize) -> String {
        let pod = format!("{training}-worker-{index}");
        let lp = LogParams {
            container: Some("trainer".into()),
            ..Default::default()
        };
        self.pods.logs(&pod, &lp).await.unwrap_or_default()
    }

    /// (step, train loss) of rank 0's `step` events in worker 0's log.
    async fn step_losses(&self, training: &str) -> Vec<(i64, f64)> {
        self.worker_log(training, 0)
            .await
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l.trim()).ok())
            .filter(|v| v["event"] == "step" && v["rank"] == 0)
            .filter_map(|v| Some((v["step"].as_i64()?, v["train_loss"].as_f64()?)))
            .collect()
    }

    /// The node each of a training's pods runs on, by pod name.
    async fn placement(&self, training: &str) -> BTreeMap<String, String> {
        self.workers(training)
            .await
            .iter()
            .filter_map(|p| Some((p.name_any(), p.spec.as_ref()?.node_name.clone()?)))
            .collect()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a cluster with two worker nodes, the chart and images: e2e/kind.sh runs it"]
async fn a_gang_on_two_nodes_trains_over_the_pod_network_like_one_worker_with_its_batch() {
    let _serial = SERIAL.lock().await;
    let case = Case::start("two-nodes").await;
    worker_nodes(&case, 2).await;
    let steps = 30;
    // 2 workers × 1 micro-batch of 4 × 64 tokens, against 1 worker × 2 accumulated: the same
    // global batch of 512 tokens, the same data and seed.
    let mut gang = tiny("gang", 2);
    spread(&mut gang);
    let mut solo = tiny("solo", 1);
    solo["spec"]["totalBatchSize"] = json!(512);
    for t in [&mut gang, &mut solo] {
        t["spec"]["maxSteps"] = json!(steps);
        add_env(t, "CHARLM_LOG_EVERY", "1");
    }
    case.apply(&gang).await;
    let done = case.wait_phase("gang", Phase::Succeeded, 5 * MINUTE).await;
    let p = done.status.clone().unwrap().progress.unwrap();
    assert_eq!((p.world_size, p.step), (2, steps), "{p:?}");
    let placed = case.placement("gang").await;
    let nodes: std::collections::BTreeSet<&String> = placed.values().collect();
    assert!(
        placed.len() == 2 && nodes.len() == 2,
        "{}",
        case.report(&format!("one pod per node: {placed:?}")).await
    );
    let master = format!("gang-worker-0.gang-workers.{}.svc:", case.ns);
    let log1 = case.worker_log("gang", 1).await;
    assert!(
        log1.contains(&format!("rendezvous at {master}")),
        "worker 1 met rank 0 by its DNS name {master}\n{log1}"
    );

    case.apply(&solo).await;
    case.wait_phase("solo", Phase::Succeeded, 5 * MINUTE).await;
    let (two, one) = (
        case.step_losses("gang").await,
        case.step_losses("solo").await,
    );
    assert_eq!(
        two.iter().map(|x| x.0).collect::<Vec<_>>(),
        one.iter().map(|x| x.0).collect::<Vec<_>>(),
        "both log every step"
    );
    assert_eq!(two.len(), steps as usize, "{two:?}");
    // The tolerance of the trainer's CPU data-parallel test (trainer/tests/data_parallel.rs): the
    // same arithmetic up to the order of float sums.
    for ((step, x), (_, y)) in one.iter().zip(&two) {
        assert!(
            ((x - y) / x).abs() < 1e-4,
            "step {step}: 1 worker {x} vs 2 workers on two nodes {y}"
        );
    }
    eprintln!(
        "two nodes {nodes:?}: losses {:?} .. {:?}",
        two.first(),
        two.last()
    );
    case.finish().await;
}

impl Case {
    /// A pod of the trainer image in this namespace that runs `script` as uid 1000 (no volumes
    /// but a /tmp), and its phase and log.
    async fn run_plain(&self, pod: &str, script: &str) -> (String, String) {
        let manifest = json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": pod},
            "spec": {
                "restartPolicy": "Never",
                "terminationGracePeriodSeconds": 1,
                "securityContext": {"runAsNonRoot": true, "runAsUser": 1000, "runAsGroup": 1000,
                                    "seccompProfile": {"type": "RuntimeDefault"}},
                "containers": [{
                    "name": "main", "image": trainer_image(), "imagePullPolicy": "Never",
                    "command": ["bash", "-c", script],
                    "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
                    "securityContext": {"allowPrivilegeEscalation": false, "readOnlyRootFilesystem": true,
                                        "capabilities": {"drop": ["ALL"]}}
                }],
                "volumes": [{"name": "tmp", "emptyDir": {}}]
            }
        });
        self.run_pod(pod, manifest).await
    }

    /// The training's latest reported step, once it is past `after`.
    async fn progress_past(&self, name: &str, after: i64) -> i64 {
        self.until(
            &format!("{name}'s progress past step {after}"),
            2 * MINUTE,
            || async {
                let s = self.training(name).await?.status.unwrap_or_default();
                match s.progress {
                    Some(p) if p.step > after && !p.complete => Ok(Some(p.step)),
                    p => Err(format!("{:?} {p:?}", s.phase)),
                }
            },
        )
        .await
    }
}

/// `bash` lines that try a TCP connection to each `host:port` for 5 s and print `open host:port`
/// or `closed host:port`.
fn probe_script(targets: &[String]) -> String {
    targets
        .iter()
        .map(|t| {
            let (host, port) = t.rsplit_once(':').unwrap();
            format!(
                "if timeout 5 bash -c 'exec 3<>/dev/tcp/{host}/{port}'; then echo open {t}; \
                 else echo closed {t}; fi"
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// The per-training NetworkPolicy, enforced by the cluster's network plugin (kube-router on the
/// offline kind node image; kindnetd on kind's own): a pod of another namespace reaches neither
/// rank 0's metrics port nor its rendezvous port, while the operator's poller still reads rank 0's
/// progress and the gang's ranks, on two nodes, still reach each other and finish.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a cluster with two worker nodes and NetworkPolicy enforcement: e2e/kind.sh runs it"]
async fn the_network_policy_shuts_other_namespaces_out_of_rank_0_but_not_the_operator_or_the_gang()
{
    let _serial = SERIAL.lock().await;
    let case = Case::start("netpol").await;
    worker_nodes(&case, 2).await;
    let name = "guarded";
    let mut gang = tiny(name, 2);
    spread(&mut gang);
    gang["spec"]["maxSteps"] = json!(100000);
    gang["spec"]["hours"] = json!(0.03);
    case.apply(&gang).await;
    case.wait_phase(name, Phase::Running, 3 * MINUTE).await;
    let seen = case.progress_past(name, 0).await;
    let policies: Api<k8s_openapi::api::networking::v1::NetworkPolicy> =
        Api::namespaced(case.client.clone(), &case.ns);
    policies
        .get(&format!("{name}-workers"))
        .await
        .unwrap_or_else(|e| panic!("the training's NetworkPolicy {name}-workers: {e}"));
    let rank0 = case
        .pods
        .get(&format!("{name}-worker-0"))
        .await
        .unwrap()
        .status
        .and_then(|s| s.pod_ip)
        .expect("rank 0's pod address");

    let other = Case::start("netpol-other").await;
    // kube-dns's Service: the probe's own networking works (a connection that no policy stops).
    let targets = [
        format!("{rank0}:9090"),
        format!("{rank0}:29500"),
        "10.96.0.10:53".to_string(),
    ];
    let (phase, log) = other.run_plain("probe", &probe_script(&targets)).await;
    assert_eq!(phase, "Succeeded", "{log}");
    let report = case
        .report(&format!("probe from {}:\n{log}", other.ns))
        .await;
    assert!(
        log.contains("open 10.96.0.10:53"),
        "the probe reached nothing at all: {report}"
    );
    for port in [9090, 29500] {
        assert!(
            log.contains(&format!("closed {rank0}:{port}")),
            "another namespace reached rank 0's port {port}: {report}"
        );
    }
    // The operator's poller still reads /progress through the policy, and the ranks finish.
    case.progress_past(name, seen).await;
    let done = case.wait_phase(name, Phase::Succeeded, 4 * MINUTE).await;
    assert_eq!(done.status.unwrap().progress.unwrap().world_size, 2);
    other.finish().await;
    case.finish().await;
}

/// `docker start|stop` of a kind node's container (its name is the node's).
fn docker_node(action: &str, node: &str) {
    let out = std::process::Command::new("docker")
        .args([action, node])
        .output()
        .unwrap_or_else(|e| panic!("docker {action} {node}: {e}"));
    assert!(
        out.status.success(),
        "docker {action} {node}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A node lost mid-run, as `docker stop` of a kind worker's container loses it: the gang (one rank
/// per node, rank 0's checkpoints on its own node's local volume) cannot run on what is left, so
/// it waits, and its status says why; once the node is back it resumes from its checkpoint, having
/// lost no more than a checkpoint interval of steps, and finishes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs e2e/kind.sh's kind cluster (CHARLM_KIND_CLUSTER): it stops and starts a node"]
async fn a_lost_node_stops_the_gang_saying_why_and_it_resumes_from_its_checkpoint_when_back() {
    let _serial = SERIAL.lock().await;
    let cluster = std::env::var("CHARLM_KIND_CLUSTER").expect(
        "CHARLM_KIND_CLUSTER: the kind cluster whose node this case stops (e2e/kind.sh sets it)",
    );
    let case = Case::start("node-loss").await;
    worker_nodes(&case, 2).await;
    let name = "survivor";
    let interval_s = 6.0;
    let mut gang = tiny(name, 2);
    spread(&mut gang);
    gang["spec"]["maxSteps"] = json!(100000);
    gang["spec"]["hours"] = json!(0.04);
    gang["spec"]["checkpoint"]["intervalMinutes"] = json!(interval_s / 60.0);
    gang["spec"]["restartPolicy"]["maxRestarts"] = json!(5);
    // The rank left alone notices its peer's silence within this, not c10d's default 10 minutes.
    add_env(&mut gang, "CHARLM_DIST_TIMEOUT_S", "30");
    case.apply(&gang).await;
    case.wait_phase(name, Phase::Running, 3 * MINUTE).await;
    let (checkpoint, seen, rate) = case
        .until("a checkpoint and progress", 2 * MINUTE, || async {
            let s = case.training(name).await?.status.unwrap_or_default();
            match (s.latest_checkpoint, s.progress) {
                (Some(c), Some(p)) if !p.complete && p.tokens_per_s.is_some() => {
                    Ok(Some((c, p.step, p.tokens_per_s.unwrap() / 512.0)))
                }
                (c, p) => Err(format!("checkpoint {c:?}, progress {p:?}")),
            }
        })
        .await;
    // The node to lose: one of the gang's, not the operator's (whose Deployment would be evicted
    // from a lost node only after its 5-minute toleration, and nothing would be reconciled until).
    let operator_nodes: Vec<String> = Api::<Pod>::namespaced(case.client.clone(), CHART_NAMESPACE)
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .iter()
        .filter_map(|p| p.spec.as_ref()?.node_name.clone())
        .collect();
    let placed = case.placement(name).await;
    let (victim, lost) = placed
        .iter()
        .find(|(_, node)| !operator_nodes.contains(node))
        .map(|(pod, node)| (pod.clone(), node.clone()))
        .unwrap_or_else(|| panic!("every worker shares a node with the operator: {placed:?}, operator on {operator_nodes:?}"));
    assert!(
        lost.starts_with(&format!("{cluster}-")),
        "{lost} is not a node of kind cluster {cluster}"
    );
    eprintln!("stopping {lost} ({victim}) at step {seen}, checkpoint {checkpoint}");
    docker_node("stop", &lost);
    // Whatever happens, the node comes back before the case ends.
    struct Restart(String);
    impl Drop for Restart {
        fn drop(&mut self) {
            let _ = std::process::Command::new("docker")
                .args(["start", &self.0])
                .output();
        }
    }
    let restart = Restart(lost.clone());

    // The gang stops; with one node left it cannot be placed again, and the status says why.
    let why = case
        .until("the gang to wait, saying why", 4 * MINUTE, || async {
            let s = case.training(name).await?.status.unwrap_or_default();
            // PodsReady False with a message: which worker cannot run, and why (the scheduler's
            // account, or the pod the lost node still holds).
            let waiting = s
                .conditions
                .iter()
                .find(|c| c.type_ == "PodsReady" && c.status == "False" && !c.message.is_empty());
            match (s.phase, waiting) {
                (Some(Phase::Pending | Phase::Restarting), Some(c)) if s.attempt >= 1 => Ok(Some(
                    format!("{:?} {}: {}", s.phase.unwrap(), c.reason, c.message),
                )),
                _ => Err(serde_json::to_string(&s).unwrap()),
            }
        })
        .await;
    eprintln!("waiting: {why}");

    docker_node("start", &lost);
    drop(restart);
    let log = case
        .until(
            "the gang's resume from its checkpoint",
            5 * MINUTE,
            || async {
                let s = case.training(name).await?.status.unwrap_or_default();
                if s.phase == Some(Phase::Failed) {
                    return Err(format!("failed: {}", serde_json::to_string(&s).unwrap()));
                }
                let log = case.worker_log(name, 0).await;
                Ok(log.contains("resumed from ").then_some(log))
            },
        )
        .await;
    let at = resumed_at_step(&log);
    let saved: i64 = checkpoint
        .rsplit("step-")
        .next()
        .and_then(|s| s.parse().ok())
        .unwrap();
    assert!(
        at >= saved,
        "resumed at step {at}, before the checkpoint {checkpoint} seen earlier"
    );
    // Steps done in one checkpoint interval at the rate seen (twice, for the poll's lag).
    let interval_steps = (2.0 * rate * interval_s).ceil() as i64 + 1;
    assert!(
        seen - at <= interval_steps,
        "resumed at step {at}, {} steps before the {seen} seen running: more than a checkpoint \
         interval ({interval_steps} steps at {rate:.1} steps/s)",
        seen - at
    );
    let done = case.wait_phase(name, Phase::Succeeded, 5 * MINUTE).await;
    let last = done.status.unwrap().progress.unwrap();
    assert!(
        last.complete && last.step > at && last.world_size == 2,
        "{last:?}"
    );
    eprintln!(
        "lost {lost} at step {seen} ({checkpoint}); waited: {why}; resumed at {at}; done at {}",
        last.step
    );
    case.finish().await;
}

// Issue 33: Kueue's preemption of a running training, and `kubectl charlm` logs -f, sample and
// export against one (a file of its own beside this one; cargo does not take it for a target).
#[path = "in_cluster/queue_and_plugin.rs"]
mod queue_and_plugin;
