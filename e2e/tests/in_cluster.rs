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
//! Every case's namespace enforces the Pod Security Standard `restricted`. One binary (`--test
//! in_cluster`), the cases in modules by subject; what they share (`Case`, the specs) is here.
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

use charlm_api::{CharLMTraining, Phase};
use charlm_e2e::cluster::{
    admin_client, create_namespace, poll_until, repo_root, tool, CHART_NAMESPACE,
};

#[path = "in_cluster/datasets.rs"]
mod datasets;
#[path = "in_cluster/example.rs"]
mod example;
#[path = "in_cluster/lifecycle.rs"]
mod lifecycle;
// Issue 33: Kueue's preemption of a running training, and `kubectl charlm` logs -f, sample and
// export against one.
#[path = "in_cluster/queue_and_plugin.rs"]
mod queue_and_plugin;
#[path = "in_cluster/two_nodes.rs"]
mod two_nodes;

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
        let manifest = script_pod(pod, ["sh", "-c", script], Some((claim, read_only)));
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

/// A pod of the trainer image that runs `command` as uid 1000 under Pod Security `restricted`,
/// with a /tmp and, given `data` (a claim, read-only or not), `/data` on that claim (its files of
/// group 1000).
fn script_pod(pod: &str, command: [&str; 3], data: Option<(&str, bool)>) -> Value {
    let mut security = json!({"runAsNonRoot": true, "runAsUser": 1000, "runAsGroup": 1000,
                              "seccompProfile": {"type": "RuntimeDefault"}});
    let mut mounts = vec![json!({"name": "tmp", "mountPath": "/tmp"})];
    let mut volumes = vec![json!({"name": "tmp", "emptyDir": {}})];
    if let Some((claim, read_only)) = data {
        security["fsGroup"] = json!(1000);
        mounts.insert(
            0,
            json!({"name": "data", "mountPath": "/data", "readOnly": read_only}),
        );
        volumes.insert(
            0,
            json!({"name": "data", "persistentVolumeClaim": {"claimName": claim}}),
        );
    }
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": pod},
        "spec": {
            "restartPolicy": "Never",
            "terminationGracePeriodSeconds": 1,
            "securityContext": security,
            "containers": [{
                "name": "main", "image": trainer_image(), "imagePullPolicy": "Never",
                "command": command,
                "volumeMounts": mounts,
                "securityContext": {"allowPrivilegeEscalation": false, "readOnlyRootFilesystem": true,
                                    "capabilities": {"drop": ["ALL"]}}
            }],
            "volumes": volumes
        }
    })
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
