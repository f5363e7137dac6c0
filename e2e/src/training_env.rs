//! One operator test's world: its namespace, the operator process(es) running under the chart's
//! ServiceAccount and watching only that namespace, and typed access to what the operator made.
//! Cleaned up at the end of a test, passing or failing; the operators' logs stay on disk.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod, Service};
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client, ResourceExt};

use charlm_api::{CharLMTraining, Phase};

use crate::cluster::{
    self, admin_client, create_namespace, install_chart, run_dir, service_account_kubeconfig,
    Operator, OperatorOptions,
};

pub struct TestEnv {
    pub admin: Client,
    pub ns: String,
    pub dir: PathBuf,
    pub options: OperatorOptions,
    pub operators: Vec<Operator>,
    /// Set by a test that points a pod at an address the operators must refuse.
    pub expect_refused_polls: bool,
    finished: bool,
}

impl TestEnv {
    /// A fresh namespace with the chart installed; no operator runs yet.
    pub async fn new(test: &str) -> TestEnv {
        let admin = admin_client().await;
        tokio::task::spawn_blocking(install_chart).await.unwrap();
        let ns = create_namespace(&admin, test)
            .await
            .expect("a test namespace");
        let dir = run_dir().join("e2e").join(&ns);
        let kubeconfig = service_account_kubeconfig(&admin, &dir)
            .await
            .expect("a kubeconfig for the chart's ServiceAccount");
        let options = OperatorOptions {
            kubeconfig,
            namespace: ns.clone(),
            lease_name: format!("charlm-{ns}"),
            lease_duration_seconds: 4,
            identity: "operator-1".into(),
            log_dir: dir.clone(),
            extra_args: vec![],
        };
        TestEnv {
            admin,
            ns,
            dir,
            options,
            operators: vec![],
            expect_refused_polls: false,
            finished: false,
        }
    }

    /// Starts an operator process named `identity` and waits until it answers /readyz.
    pub async fn start_operator(&mut self, identity: &str) -> usize {
        let mut options = self.options.clone();
        options.identity = identity.to_string();
        let op = Operator::start(&options);
        self.operators.push(op);
        let i = self.operators.len() - 1;
        let port = self.operators[i].metrics_port;
        cluster::wait_for(
            &format!("operator {identity} to answer /readyz on port {port}"),
            Duration::from_secs(30),
            || {
                let op = &self.operators[i];
                async move {
                    match op.get("/readyz").await {
                        Ok((200, _)) => Ok(Some(())),
                        Ok((code, body)) => Err(format!("{code} {body}")),
                        Err(e) => Err(e.to_string()),
                    }
                }
            },
        )
        .await;
        i
    }

    pub fn trainings(&self) -> Api<CharLMTraining> {
        Api::namespaced(self.admin.clone(), &self.ns)
    }

    pub fn pods(&self) -> Api<Pod> {
        Api::namespaced(self.admin.clone(), &self.ns)
    }

    pub fn pvcs(&self) -> Api<PersistentVolumeClaim> {
        Api::namespaced(self.admin.clone(), &self.ns)
    }

    /// A ReadOnlyMany claim `name` with a volume made for it, as a user's dataset claim: the
    /// control plane's hostPath provisioner cannot offer that access mode.
    pub async fn provide_read_only_claim(&self, name: &str) {
        let claim: PersistentVolumeClaim = serde_json::from_value(serde_json::json!({
            "metadata": {"name": name},
            "spec": {
                "accessModes": ["ReadOnlyMany"], "storageClassName": "",
                "resources": {"requests": {"storage": "1Gi"}}
            }
        }))
        .unwrap();
        self.pvcs()
            .create(&PostParams::default(), &claim)
            .await
            .unwrap();
        cluster::provide_volume(&self.admin, &self.ns, name)
            .await
            .unwrap();
    }

    pub fn services(&self) -> Api<Service> {
        Api::namespaced(self.admin.clone(), &self.ns)
    }

    /// Applies a manifest (an example file or a variant of one) into the test namespace.
    pub async fn apply(&self, yaml: &str) -> CharLMTraining {
        let v = cluster::apply_yaml(&self.admin, &self.ns, yaml)
            .await
            .unwrap_or_else(|e| panic!("applying a training: {e}"));
        serde_json::from_value(v).unwrap()
    }

    /// Worker pods of a training, sorted by name.
    pub async fn workers(&self, training: &str) -> Vec<Pod> {
        let mut pods = self
            .pods()
            .list(&ListParams::default().labels(&format!("charlm.dev/training={training}")))
            .await
            .unwrap()
            .items;
        pods.sort_by_key(|p| p.name_any());
        pods
    }

    /// Waits (a minute at most) until `training` has `n` worker pods of attempt `attempt`, not being
    /// deleted and all bound to a node (the scheduler's part, which kwok leaves alone), and returns
    /// each one's name and node.
    pub async fn bound_workers(
        &self,
        training: &str,
        n: usize,
        attempt: i64,
    ) -> Vec<(String, String)> {
        self.wait(
            &format!("{n} bound workers of {training}, attempt {attempt}"),
            Duration::from_secs(60),
            || async {
                let pods = self.workers(training).await;
                let bound: Vec<(String, String)> = pods
                    .iter()
                    .filter(|p| {
                        p.labels().get("charlm.dev/attempt") == Some(&attempt.to_string())
                            && p.metadata.deletion_timestamp.is_none()
                    })
                    .filter_map(|p| Some((p.name_any(), p.spec.as_ref()?.node_name.clone()?)))
                    .collect();
                if bound.len() == n {
                    Ok(Some(bound))
                } else {
                    Err(format!("{} pods, {} bound", pods.len(), bound.len()))
                }
            },
        )
        .await
    }

    /// Waits until `check` accepts the training; on timeout the failure shows its status and the
    /// operators' logs.
    pub async fn wait_training<F>(
        &self,
        name: &str,
        what: &str,
        timeout: Duration,
        check: F,
    ) -> CharLMTraining
    where
        F: Fn(&CharLMTraining) -> bool,
    {
        let api = self.trainings();
        let check = &check;
        self.wait(&format!("{name}: {what}"), timeout, || {
            let api = api.clone();
            async move {
                match api.get_opt(name).await {
                    Ok(Some(t)) if check(&t) => Ok(Some(t)),
                    Ok(Some(t)) => Err(serde_json::to_string(&t.status).unwrap()),
                    Ok(None) => Err("the training does not exist".into()),
                    Err(e) => Err(e.to_string()),
                }
            }
        })
        .await
    }

    pub async fn wait_phase(&self, name: &str, phase: Phase, timeout: Duration) -> CharLMTraining {
        self.wait_training(name, &format!("phase {phase:?}"), timeout, |t| {
            t.status.as_ref().and_then(|s| s.phase) == Some(phase)
        })
        .await
    }

    /// `cluster::wait_for` that adds the operators' log tails to a timeout.
    pub async fn wait<T, F, Fut>(&self, what: &str, timeout: Duration, probe: F) -> T
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<Option<T>, String>>,
    {
        let waiting = std::panic::AssertUnwindSafe(cluster::wait_for(what, timeout, probe));
        match futures::FutureExt::catch_unwind(waiting).await {
            Ok(v) => v,
            Err(panic) => {
                eprintln!("{}", self.log_tails());
                std::panic::resume_unwind(panic)
            }
        }
    }

    /// The last lines of every operator's log, for failure messages.
    pub fn log_tails(&self) -> String {
        let mut out = String::new();
        for op in &self.operators {
            let text = op.log_text();
            let lines: Vec<&str> = text.lines().collect();
            let tail = &lines[lines.len().saturating_sub(40)..];
            out.push_str(&format!(
                "--- last lines of {} ({}):\n{}\n",
                op.identity,
                op.log.display(),
                tail.join("\n")
            ));
        }
        out
    }

    /// Patches a pod's status through the status subresource, as a kubelet would report it.
    /// Worker `pod` answers `body` on `/progress`: a stand-in for the trainer's endpoint on
    /// 127.0.0.1 at the contract's port (9090), and the pod's address set to it, since kwok's
    /// pod addresses lead nowhere.
    pub async fn serve_progress_as(&self, pod: &str, body: &'static str) {
        crate::progress::serve_progress(9090, body).await;
        self.set_pod_status(
            pod,
            serde_json::json!({"podIP": "127.0.0.1", "podIPs": [{"ip": "127.0.0.1"}]}),
        )
        .await;
    }

    pub async fn set_pod_status(&self, pod: &str, status: serde_json::Value) {
        self.pods()
            .patch_status(
                pod,
                &PatchParams::default(),
                &Patch::Merge(serde_json::json!({ "status": status })),
            )
            .await
            .unwrap_or_else(|e| panic!("patching the status of pod {pod}: {e}"));
    }

    /// The suite's network rule, checked for every operator of every test: no socket to a peer
    /// off this machine (seen in the kernel's tables), and no progress read refused for an
    /// address outside loopback, which would mean a pod got one (a fake node's CIDR, say).
    pub async fn assert_traffic_stayed_on_machine(&self) {
        for op in &self.operators {
            let peers = op.off_machine_peers();
            assert!(
                peers.is_empty(),
                "operator {} had sockets to peers off this machine: {peers:?}\n{}",
                op.identity,
                self.log_tails()
            );
            if !self.expect_refused_polls {
                let refused = op.progress_polls("refused").await;
                assert_eq!(
                    refused,
                    0,
                    "operator {} was asked to read progress from an address off loopback {refused} \
                     time(s) (see 'progress not read' in its log)\n{}",
                    op.identity,
                    self.log_tails()
                );
            }
        }
    }

    /// Deletes every training (the operator's finalizer cleans up), stops the operators, and removes
    /// the namespace and the test's volumes.
    pub async fn finish(mut self) {
        let api = self.trainings();
        for t in api.list(&ListParams::default()).await.unwrap() {
            let _ = api.delete(&t.name_any(), &DeleteParams::default()).await;
        }
        let list_api = api.clone();
        self.wait(
            "all trainings to be deleted",
            Duration::from_secs(180),
            || {
                let api = list_api.clone();
                async move {
                    match api.list(&ListParams::default()).await {
                        Ok(l) if l.items.is_empty() => Ok(Some(())),
                        Ok(l) => Err(format!("{} left", l.items.len())),
                        Err(e) => Err(e.to_string()),
                    }
                }
            },
        )
        .await;
        self.assert_traffic_stayed_on_machine().await;
        for op in &mut self.operators {
            op.terminate();
        }
        cluster::delete_volumes(&self.admin, &self.ns)
            .await
            .unwrap();
        let namespaces: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(self.admin.clone());
        let _ = namespaces.delete(&self.ns, &DeleteParams::default()).await;
        self.finished = true;
    }
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        for op in &mut self.operators {
            op.kill();
        }
        // A failed test still frees what it held (GPUs of the fake nodes above all), or the next
        // tests would fail for want of them. Without an operator the finalizers would hold the
        // namespace forever, so they go first.
        let kubectl = cluster::bin_dir().join("kubectl");
        let run = |args: &[&str]| {
            let _ = Command::new(&kubectl)
                .env("KUBECONFIG", cluster::kubeconfig_path())
                .args(args)
                .output();
        };
        run(&[
            "-n",
            &self.ns,
            "patch",
            "charlmtrainings",
            "--all",
            "--type=merge",
            "-p",
            r#"{"metadata":{"finalizers":null}}"#,
        ]);
        // Worker pods wait for the operator to read their final status; no operator runs now.
        let pods = Command::new(&kubectl)
            .env("KUBECONFIG", cluster::kubeconfig_path())
            .args(["-n", &self.ns, "get", "pods", "-o", "name"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
            .unwrap_or_default();
        for pod in pods.lines().filter(|l| !l.is_empty()) {
            run(&[
                "-n",
                &self.ns,
                "patch",
                pod,
                "--type=merge",
                "-p",
                r#"{"metadata":{"finalizers":null}}"#,
            ]);
        }
        run(&["delete", "namespace", &self.ns, "--wait=false"]);
        let selector = format!("{}={}", cluster::TEST_LABEL, self.ns);
        run(&["delete", "pv", "-l", &selector, "--wait=false"]);
        eprintln!(
            "test namespace {} deleted after the failure; operator logs in {}",
            self.ns,
            self.dir.display()
        );
    }
}
