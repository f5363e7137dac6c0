//! Kueue, for real: its manager (`sigs.k8s.io/kueue/cmd/kueue`, pinned by
//! e2e/controlplane/tools/kueue and built by e2e/controlplane/build) runs as a process against the
//! control plane, with Kueue's own CRDs from the pinned module's source in the Go module cache.
//!
//! Its webhook server listens on 127.0.0.1 with a self-signed certificate (the manager does not
//! start without one; its metrics server uses the same one, see `Kueue::start`), but no webhook configuration points the API server at it: Kueue's webhooks
//! default and validate Kueue's objects and the jobs of its built-in integrations, and the objects
//! of these tests (ResourceFlavor, ClusterQueue, LocalQueue, WorkloadPriorityClass, and the
//! operator's Workloads) are written complete, as its defaulting would leave them. Registering them
//! would put a process that a test starts and stops in the path of every such write on the shared
//! plane. Metrics and health listen on 127.0.0.1 too; nothing else is served (the visibility API
//! server is turned off).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::cluster::{self, bin_dir, free_port, repo_root, tool};

/// The Kueue version e2e/controlplane/tools/kueue pins.
pub fn version() -> String {
    let go_mod = repo_root().join("e2e/controlplane/tools/kueue/go.mod");
    let text = std::fs::read_to_string(&go_mod).expect("tools/kueue/go.mod");
    text.lines()
        .map(str::split_whitespace)
        .find_map(
            |mut words| match (words.next(), words.next(), words.next()) {
                (Some("sigs.k8s.io/kueue"), Some(v), _)
                | (Some("require"), Some("sigs.k8s.io/kueue"), Some(v)) => Some(v.to_string()),
                _ => None,
            },
        )
        .expect("tools/kueue/go.mod requires sigs.k8s.io/kueue")
}

/// Kueue's CRDs in the module source that e2e/controlplane/build downloaded.
pub fn crd_dir() -> PathBuf {
    let cache = std::env::var_os("CHARLM_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/charlm"));
    cache
        .join("go/mod/sigs.k8s.io")
        .join(format!("kueue@{}", version()))
        .join("config/components/crd/bases")
}

/// Server-side applies Kueue's CRDs and waits until they are established.
pub fn install_crds() -> Result<()> {
    let dir = crd_dir();
    if !dir.is_dir() {
        bail!(
            "no Kueue CRDs in {}: run e2e/controlplane/build (it downloads the pinned module)",
            dir.display()
        );
    }
    tool(
        "kubectl",
        &[
            "apply",
            "--server-side",
            "--force-conflicts",
            "--field-manager=charlm-e2e",
            "-f",
            dir.to_str().unwrap(),
        ],
    )?;
    for crd in [
        "workloads",
        "clusterqueues",
        "localqueues",
        "resourceflavors",
        "workloadpriorityclasses",
    ] {
        // `kubectl wait` fails at once, instead of waiting, on a CRD so new that the API server
        // has not written its conditions yet; so it is tried again, 30 times at most.
        let name = format!("crd/{crd}.kueue.x-k8s.io");
        let mut tries = 0;
        while let Err(e) = tool(
            "kubectl",
            &[
                "wait",
                "--for=condition=Established",
                "--timeout=60s",
                &name,
            ],
        ) {
            tries += 1;
            if tries == 30 {
                return Err(e);
            }
            std::thread::sleep(Duration::from_secs(1));
        }
    }
    Ok(())
}

/// One Kueue manager process; killed when dropped.
pub struct Kueue {
    child: Child,
    pub log: PathBuf,
    pub health_port: u16,
}

impl Kueue {
    /// Installs the CRDs, writes a configuration and a serving certificate under `dir`, starts the
    /// manager with the admin kubeconfig and waits (at most 90 s) until it is ready.
    pub async fn start(dir: &Path) -> Kueue {
        install_crds().expect("Kueue's CRDs");
        let _ = tool("kubectl", &["create", "namespace", "kueue-system"]);
        std::fs::create_dir_all(dir.join("certs")).unwrap();
        self_signed_certificate(&dir.join("certs")).expect("a serving certificate for Kueue");
        let (health_port, metrics_port, webhook_port) = (free_port(), free_port(), free_port());
        let config = dir.join("kueue-config.yaml");
        std::fs::write(
            &config,
            format!(
                r#"apiVersion: config.kueue.x-k8s.io/v1beta2
kind: Configuration
namespace: kueue-system
health:
  healthProbeBindAddress: 127.0.0.1:{health_port}
metrics:
  bindAddress: 127.0.0.1:{metrics_port}
webhook:
  host: 127.0.0.1
  port: {webhook_port}
  certDir: {certs}
leaderElection:
  leaderElect: false
internalCertManagement:
  enable: false
manageJobsWithoutQueueName: false
integrations:
  frameworks: ["batch/job"]
  # The operator is the integration of CharLMTraining: it makes and follows the Workloads.
  externalFrameworks: ["CharLMTraining.v1alpha1.charlm.dev"]
featureGates:
  VisibilityOnDemand: false
"#,
                certs = dir.join("certs").display()
            ),
        )
        .unwrap();
        let log = dir.join("kueue.log");
        let out = File::create(&log).unwrap();
        let err = out.try_clone().unwrap();
        let binary = bin_dir().join("kueue");
        assert!(
            binary.is_file(),
            "no {}: run e2e/controlplane/build",
            binary.display()
        );
        // With its internal certificate management off, Kueue v0.17's manager reads its metrics
        // certificate from the fixed path /etc/kueue/metrics/certs (cmd/kueue/main.go), where its
        // Deployment mounts a Secret. Rather than write into this machine's /etc, it runs in a
        // mount namespace of its own whose /etc is an empty tmpfs holding just that certificate
        // (it needs nothing else there: the kubeconfig names 127.0.0.1 and carries its CA). The
        // shell execs Kueue, so the child's pid is Kueue's. Internal certificate management is no
        // way out: it waits until it has injected its CA into conversion webhooks that the
        // published CRDs do not declare.
        let script = r#"mount -t tmpfs tmpfs /etc && mkdir -p /etc/kueue/metrics/certs &&
            cp "$0/tls.crt" "$0/tls.key" /etc/kueue/metrics/certs/ && exec "$1" --config="$2" --zap-log-level="$3""#;
        let child = Command::new("unshare")
            .args([
                "--mount",
                "--propagation",
                "private",
                "--",
                "sh",
                "-c",
                script,
            ])
            .arg(dir.join("certs"))
            .arg(&binary)
            .arg(&config)
            .arg(std::env::var("CHARLM_KUEUE_LOG_LEVEL").unwrap_or_else(|_| "2".into()))
            .env("KUBECONFIG", cluster::kubeconfig_path())
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .expect("starting kueue (under unshare, which needs root or CAP_SYS_ADMIN)");
        let mut kueue = Kueue {
            child,
            log,
            health_port,
        };
        let url = format!("http://127.0.0.1:{health_port}/readyz");
        let started = Instant::now();
        loop {
            if let Ok(Some(status)) = kueue.child.try_wait() {
                panic!(
                    "kueue exited ({status}) before it was ready:\n{}",
                    kueue.log_tail()
                );
            }
            match reqwest::get(&url).await {
                Ok(r) if r.status().is_success() => break,
                _ => {}
            }
            if started.elapsed() > Duration::from_secs(90) {
                panic!("kueue not ready after 90 s:\n{}", kueue.log_tail());
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        kueue
    }

    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        format!(
            "--- last lines of {}:\n{}",
            self.log.display(),
            lines[lines.len().saturating_sub(40)..].join("\n")
        )
    }

    /// Deletes the cluster-scoped Kueue objects of `kinds` that a test labelled with its
    /// namespace, while Kueue still runs (it takes its finalizers off them once no Workload uses
    /// them).
    pub fn delete_test_objects(&self, kinds: &[&str], namespace: &str) {
        for kind in kinds {
            tool(
                "kubectl",
                &[
                    "delete",
                    kind,
                    "-l",
                    &format!("{}={namespace}", cluster::TEST_LABEL),
                    "--timeout=60s",
                ],
            )
            .unwrap_or_else(|e| panic!("deleting the test's {kind}: {e}\n{}", self.log_tail()));
        }
    }

    /// SIGTERM, then SIGKILL after 20 s.
    pub fn stop(&mut self) {
        cluster::terminate(&mut self.child);
    }
}

impl Drop for Kueue {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// tls.crt and tls.key for 127.0.0.1, where controller-runtime's webhook server looks for them.
fn self_signed_certificate(dir: &Path) -> Result<()> {
    let out = Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
        ])
        .args([
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
        ])
        .arg("-keyout")
        .arg(dir.join("tls.key"))
        .arg("-out")
        .arg(dir.join("tls.crt"))
        .output()
        .context("running openssl")?;
    if !out.status.success() {
        bail!("openssl failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}
