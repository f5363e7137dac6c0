//! Test support for the operator on the real control plane of `e2e/controlplane/`: clients, the
//! Helm chart, a fresh namespace per test, the operator binary running as the chart's
//! ServiceAccount, pre-bound volumes, and patient waiting with clear failures.

use std::fs::File;
use std::future::Future;
use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{
    HostPathVolumeSource, Namespace, ObjectReference, PersistentVolume, PersistentVolumeClaim,
    PersistentVolumeSpec, ServiceAccount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kube::api::{DeleteParams, ListParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config, ResourceExt};

/// Namespace and release name of the chart in the tests.
pub const CHART_NAMESPACE: &str = "charlm-system";
pub const CHART_RELEASE: &str = "charlm-operator";
/// The ServiceAccount the chart creates (the release's full name).
pub const CHART_SERVICE_ACCOUNT: &str = "charlm-operator";
/// Label on every cluster-scoped object a test creates, naming its namespace, for cleanup.
pub const TEST_LABEL: &str = "charlm.dev/e2e-namespace";

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("e2e/ lives in the repository")
        .to_path_buf()
}

/// `${CHARLM_RUN:-<repo>/.run}`: where the control plane keeps its state.
pub fn run_dir() -> PathBuf {
    std::env::var_os("CHARLM_RUN")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join(".run"))
}

/// `CHARLM_KUBECONFIG`, else the control plane's admin kubeconfig.
pub fn kubeconfig_path() -> PathBuf {
    std::env::var_os("CHARLM_KUBECONFIG")
        .map(PathBuf::from)
        .unwrap_or_else(|| run_dir().join("controlplane/kubeconfig"))
}

/// Fails (never skips) when no control plane is up.
pub fn require_kubeconfig() -> PathBuf {
    let path = kubeconfig_path();
    assert!(
        path.is_file(),
        "no kubeconfig at {}: run e2e/controlplane/up first (or set CHARLM_KUBECONFIG)",
        path.display()
    );
    path
}

pub async fn client_from(path: &Path) -> Result<Client> {
    let kubeconfig = Kubeconfig::read_from(path)
        .with_context(|| format!("reading kubeconfig {}", path.display()))?;
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await?;
    Ok(Client::try_from(config)?)
}

pub async fn admin_client() -> Client {
    let path = require_kubeconfig();
    let client = client_from(&path)
        .await
        .expect("a client from the admin kubeconfig");
    client.apiserver_version().await.unwrap_or_else(|e| {
        panic!(
            "the API server of {} does not answer ({e}): run e2e/controlplane/up",
            path.display()
        )
    });
    client
}

/// Directory with `helm` and `kubectl` (printed by `e2e/controlplane/bin-dir`).
pub fn bin_dir() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let script = repo_root().join("e2e/controlplane/bin-dir");
        let out = Command::new(&script)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
        assert!(
            out.status.success(),
            "{} failed: {}",
            script.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
    })
    .clone()
}

/// Runs `helm` or `kubectl` from the control plane's bin dir against the admin kubeconfig.
pub fn tool(name: &str, args: &[&str]) -> Result<String> {
    let path = bin_dir().join(name);
    let out = Command::new(&path)
        .args(args)
        .env("KUBECONFIG", kubeconfig_path())
        .env("HELM_CACHE_HOME", run_dir().join("helm/cache"))
        .env("HELM_CONFIG_HOME", run_dir().join("helm/config"))
        .env("HELM_DATA_HOME", run_dir().join("helm/data"))
        .output()
        .with_context(|| format!("running {}", path.display()))?;
    if !out.status.success() {
        bail!(
            "`{name} {}` failed: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `helm upgrade --install` of `chart` as the tests' release, with no operator pod (the tests
/// run their own operator).
pub fn helm_upgrade(chart: &Path) -> Result<String> {
    tool(
        "helm",
        &[
            "upgrade",
            "--install",
            CHART_RELEASE,
            chart.to_str().unwrap(),
            "--namespace",
            CHART_NAMESPACE,
            "--create-namespace",
            "--set",
            "replicaCount=0",
            "--wait",
            "--timeout",
            "2m",
        ],
    )
}

/// `helm upgrade --install` of the chart with no operator replica (the tests run the binary
/// themselves), once per test process. The chart renders the CRD, so the upgrade keeps a
/// long-lived control plane's CRD current.
pub fn install_chart() {
    static DONE: OnceLock<()> = OnceLock::new();
    DONE.get_or_init(|| {
        adopt_crd();
        helm_upgrade(&repo_root().join("charts/charlm-operator"))
            .expect("helm install of charts/charlm-operator");
        tool(
            "kubectl",
            &[
                "wait",
                "--for=condition=Established",
                "--timeout=60s",
                "crd/charlmtrainings.charlm.dev",
            ],
        )
        .expect("the CRD becomes established");
    });
}

/// A plane whose CRD came from elsewhere (the chart's crds/ folder of 0.1.0, a `kubectl apply`)
/// hands it to the release, as the chart's README tells users upgrading to do: Helm refuses to
/// take over an object without its ownership label and annotations.
fn adopt_crd() {
    let crd = "crd/charlmtrainings.charlm.dev";
    if tool("kubectl", &["get", crd, "-o", "name"]).is_err() {
        return;
    }
    tool(
        "kubectl",
        &[
            "label",
            crd,
            "app.kubernetes.io/managed-by=Helm",
            "--overwrite",
        ],
    )
    .expect("labelling the CRD for Helm");
    tool(
        "kubectl",
        &[
            "annotate",
            crd,
            "--overwrite",
            &format!("meta.helm.sh/release-name={CHART_RELEASE}"),
            &format!("meta.helm.sh/release-namespace={CHART_NAMESPACE}"),
        ],
    )
    .expect("annotating the CRD for Helm");
}

/// A kubeconfig that authenticates as the chart's ServiceAccount with a fresh bound token, so
/// whatever the operator does with it is exactly what the chart's RBAC allows.
pub async fn service_account_kubeconfig(admin: &Client, dir: &Path) -> Result<PathBuf> {
    token_kubeconfig(admin, CHART_NAMESPACE, CHART_SERVICE_ACCOUNT, dir).await
}

/// A kubeconfig (`dir/<name>-kubeconfig`) that authenticates as ServiceAccount `namespace/name`
/// with a fresh bound token: what it may do is what RBAC grants that account.
pub async fn token_kubeconfig(
    admin: &Client,
    namespace: &str,
    name: &str,
    dir: &Path,
) -> Result<PathBuf> {
    let sas: Api<ServiceAccount> = Api::namespaced(admin.clone(), namespace);
    let request = TokenRequest {
        spec: TokenRequestSpec {
            audiences: vec![],
            expiration_seconds: Some(3600),
            bound_object_ref: None,
        },
        ..Default::default()
    };
    let token = sas
        .create_token_request(name, &PostParams::default(), &request)
        .await
        .with_context(|| format!("TokenRequest for ServiceAccount {namespace}/{name}"))?
        .status
        .context("TokenRequest without a status")?
        .token;

    let admin_config = Kubeconfig::read_from(kubeconfig_path())?;
    let context_name = admin_config
        .current_context
        .clone()
        .context("the admin kubeconfig has no current-context")?;
    let context = admin_config
        .contexts
        .iter()
        .find(|c| c.name == context_name)
        .and_then(|c| c.context.clone())
        .context("the current context is missing")?;
    let cluster = admin_config
        .clusters
        .iter()
        .find(|c| c.name == context.cluster)
        .and_then(|c| c.cluster.clone())
        .context("the current cluster is missing")?;
    let ca_data = match (
        &cluster.certificate_authority_data,
        &cluster.certificate_authority,
    ) {
        (Some(data), _) => data.clone(),
        (None, Some(file)) => {
            use base64::Engine as _;
            base64::engine::general_purpose::STANDARD.encode(std::fs::read(file)?)
        }
        (None, None) => bail!("the admin kubeconfig names no certificate authority"),
    };
    let kubeconfig = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "e2e", "cluster": {
            "server": cluster.server,
            "certificate-authority-data": ca_data,
        }}],
        "users": [{"name": name, "user": {"token": token}}],
        "contexts": [{"name": name, "context": {"cluster": "e2e", "user": name}}],
        "current-context": name,
    });
    std::fs::create_dir_all(dir)?;
    let file = if name == CHART_SERVICE_ACCOUNT {
        "operator-kubeconfig".to_string()
    } else {
        format!("{name}-kubeconfig")
    };
    let path = dir.join(file);
    std::fs::write(&path, serde_norway::to_string(&kubeconfig)?)?;
    Ok(path)
}

/// A namespace of one test, named after it with a random suffix.
pub async fn create_namespace(client: &Client, test: &str) -> Result<String> {
    let name = format!("e2e-{}-{:06x}", test, rand_suffix() & 0xff_ffff);
    let api: Api<Namespace> = Api::all(client.clone());
    let ns = Namespace {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            labels: Some([("charlm.dev/e2e".to_string(), "true".to_string())].into()),
            ..Default::default()
        },
        ..Default::default()
    };
    api.create(&PostParams::default(), &ns).await?;
    Ok(name)
}

fn rand_suffix() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos(),
    );
    h.finish()
}

/// A PersistentVolume bound in advance to `namespace/claim`, for claims the control plane's
/// hostPath provisioner cannot serve (e.g. ReadOnlyMany ones, with `storageClassName: ""`); the
/// scheduler places a pod only once its claims are bound.
pub async fn provide_volume(client: &Client, namespace: &str, claim: &str) -> Result<()> {
    let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), namespace);
    let pvc = pvcs.get(claim).await?;
    let spec = pvc.spec.clone().unwrap_or_default();
    let size = spec
        .resources
        .as_ref()
        .and_then(|r| r.requests.as_ref())
        .and_then(|r| r.get("storage").cloned())
        .unwrap_or_else(|| Quantity("1Gi".into()));
    let name = format!("{namespace}-{claim}");
    let dir = run_dir().join("e2e-volumes").join(&name);
    std::fs::create_dir_all(&dir)?;
    let pv = PersistentVolume {
        metadata: ObjectMeta {
            name: Some(name),
            labels: Some([(TEST_LABEL.to_string(), namespace.to_string())].into()),
            ..Default::default()
        },
        spec: Some(PersistentVolumeSpec {
            capacity: Some([("storage".to_string(), size)].into()),
            access_modes: spec.access_modes.clone(),
            storage_class_name: spec.storage_class_name.clone(),
            persistent_volume_reclaim_policy: Some("Retain".into()),
            host_path: Some(HostPathVolumeSource {
                path: dir.to_string_lossy().into_owned(),
                type_: None,
            }),
            claim_ref: Some(ObjectReference {
                namespace: Some(namespace.to_string()),
                name: Some(claim.to_string()),
                uid: pvc.metadata.uid.clone(),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    };
    let pvs: Api<PersistentVolume> = Api::all(client.clone());
    pvs.create(&PostParams::default(), &pv).await?;
    Ok(())
}

/// Deletes the PersistentVolumes a test made.
pub async fn delete_volumes(client: &Client, namespace: &str) -> Result<()> {
    let pvs: Api<PersistentVolume> = Api::all(client.clone());
    let lp = ListParams::default().labels(&format!("{TEST_LABEL}={namespace}"));
    for pv in pvs.list(&lp).await? {
        let _ = pvs.delete(&pv.name_any(), &DeleteParams::default()).await;
    }
    Ok(())
}

/// Polls `probe` until it returns `Some`, or fails after `timeout` naming `what` and the last
/// observation.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Option<T>, String>>,
{
    poll_until(what, timeout, Duration::from_millis(250), probe)
        .await
        .unwrap_or_else(|message| panic!("{message}"))
}

/// Polls `probe` every `interval` until it returns `Some`; after `timeout`, the error names
/// `what` and the last observation (the `Err` the probe gave), for the caller to report.
pub async fn poll_until<T, F, Fut>(
    what: &str,
    timeout: Duration,
    interval: Duration,
    mut probe: F,
) -> std::result::Result<T, String>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Option<T>, String>>,
{
    let start = Instant::now();
    let mut last = String::from("nothing observed yet");
    loop {
        match probe().await {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(observed) => last = observed,
        }
        if start.elapsed() > timeout {
            return Err(format!(
                "timed out after {timeout:?} waiting for {what}; last observed: {last}"
            ));
        }
        tokio::time::sleep(interval).await;
    }
}

/// Server-side applies a YAML document (e.g. an example) into `namespace` as the admin.
pub async fn apply_yaml(client: &Client, namespace: &str, yaml: &str) -> Result<serde_json::Value> {
    let value: serde_json::Value = serde_norway::from_str(yaml)?;
    let name = value["metadata"]["name"]
        .as_str()
        .context("a manifest without metadata.name")?
        .to_string();
    let api: Api<charlm_api::CharLMTraining> = Api::namespaced(client.clone(), namespace);
    let applied = api
        .patch(
            &name,
            &PatchParams::apply("charlm-e2e"),
            &Patch::Apply(&value),
        )
        .await?;
    Ok(serde_json::to_value(applied)?)
}

/// The operator binary: `CHARLM_OPERATOR_BIN` if set, else built from this checkout.
pub fn operator_binary() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| workspace_binary("CHARLM_OPERATOR_BIN", "charlm-operator"))
        .clone()
}

/// The `kubectl-charlm` binary: `CHARLM_PLUGIN_BIN` if set, else built from this checkout.
pub fn plugin_binary() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| workspace_binary("CHARLM_PLUGIN_BIN", "kubectl-charlm"))
        .clone()
}

/// The binary `package` of this workspace (named as its package): the file `variable` names if
/// set (scripts/test sets both to what its one `cargo test --no-run` built), else built from this
/// checkout with the profile of the running test executable (`cargo test --release` leaves it in
/// target/release; a no-op when it is up to date), once per test process. The e2e crate does not
/// depend on the operator or the plugin: it runs them as a user would.
fn workspace_binary(variable: &str, package: &str) -> PathBuf {
    if let Some(bin) = std::env::var_os(variable) {
        let bin = PathBuf::from(bin);
        assert!(bin.is_file(), "{variable}={} is not a file", bin.display());
        return bin;
    }
    // Test executables live in <target>/<profile dir>/deps.
    let exe = std::env::current_exe().expect("the test executable's path");
    let profile_dir = exe
        .ancestors()
        .nth(2)
        .expect("a test executable inside a target directory");
    let target = profile_dir
        .parent()
        .expect("a target directory")
        .to_path_buf();
    let release = profile_dir.file_name().is_some_and(|n| n == "release");
    let profile = if release { "release" } else { "test" };
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo)
        .args(["build", "--quiet", "--profile", profile, "-p", package])
        .args(["--bin", package])
        .env("CARGO_TARGET_DIR", &target)
        .current_dir(repo_root())
        .status()
        .unwrap_or_else(|e| panic!("running cargo build for {package}: {e}"));
    assert!(status.success(), "cargo build -p {package} failed");
    profile_dir.join(package)
}

/// `--progress-networks` of the operators the tests start: the networks `traffic` allows.
fn progress_networks() -> String {
    crate::traffic::allowed_networks()
        .iter()
        .map(|n| n.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

/// SIGTERM `child` and wait for it, then SIGKILL after 20 s: the graceful stop of a process a
/// test started (an operator, Kueue's manager).
pub fn terminate(child: &mut std::process::Child) {
    if let Ok(Some(_)) = child.try_wait() {
        return;
    }
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .stderr(Stdio::null())
        .status();
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = child.kill();
    let _ = child.wait();
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free local port")
}

/// One `charlm-operator run` process; killed (SIGKILL) when dropped.
/// Its sockets are watched for peers off this machine from start to end (`traffic`).
pub struct Operator {
    child: Child,
    pub identity: String,
    pub log: PathBuf,
    pub metrics_port: u16,
    traffic: crate::traffic::TrafficWatch,
}

#[derive(Clone, Debug)]
pub struct OperatorOptions {
    pub kubeconfig: PathBuf,
    pub namespace: String,
    pub lease_name: String,
    pub lease_duration_seconds: u64,
    pub identity: String,
    pub log_dir: PathBuf,
    pub extra_args: Vec<String>,
}

impl Operator {
    pub fn start(options: &OperatorOptions) -> Operator {
        std::fs::create_dir_all(&options.log_dir).unwrap();
        let log = options
            .log_dir
            .join(format!("operator-{}.log", options.identity));
        let out = File::create(&log).unwrap();
        let err = out.try_clone().unwrap();
        let metrics_port = free_port();
        let child = Command::new(operator_binary())
            .arg("run")
            .arg(format!("--metrics-addr=127.0.0.1:{metrics_port}"))
            .arg(format!("--watch-namespace={}", options.namespace))
            .arg("--trainer-image=charlm-trainer:e2e")
            .arg("--leader-elect=true")
            .arg(format!("--lease-name={}", options.lease_name))
            .arg(format!("--lease-namespace={CHART_NAMESPACE}"))
            .arg(format!(
                "--lease-duration-seconds={}",
                options.lease_duration_seconds
            ))
            .arg(format!("--identity={}", options.identity))
            // The plane's fake pods live on loopback (kwok's --cidr, 127.244.0.0/16): the
            // operator is told so and dials nothing else; the watch below checks that it does not.
            .arg(format!("--progress-networks={}", progress_networks()))
            .args(&options.extra_args)
            .env("KUBECONFIG", &options.kubeconfig)
            .env("RUST_LOG", "info,charlm_operator=debug,kube=warn")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .expect("starting charlm-operator");
        let traffic =
            crate::traffic::TrafficWatch::start(child.id(), crate::traffic::allowed_networks());
        Operator {
            child,
            identity: options.identity.clone(),
            log,
            metrics_port,
            traffic,
        }
    }

    /// Resident memory of the process (VmRSS), in bytes.
    pub fn rss_bytes(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).ok()?;
        let kib: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))?
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()?;
        Some(kib * 1024)
    }

    /// Peers outside loopback (and the run's own networks) that the operator had a socket to.
    pub fn off_machine_peers(&self) -> Vec<String> {
        self.traffic.seen()
    }

    /// `charlm_operator_progress_polls_total` for one `result` (`ok`, `unreachable`, `bad_answer`,
    /// `refused`: the pod's address was outside `--progress-networks`, so nothing was sent); 0 when
    /// the operator cannot be asked.
    pub async fn progress_polls(&self, result: &str) -> u64 {
        let Ok((200, text)) = self.get("/metrics").await else {
            return 0;
        };
        let prefix = format!(r#"charlm_operator_progress_polls_total{{result="{result}"}} "#);
        text.lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    }

    /// SIGKILL: no chance to release the lease or finish a reconcile.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM and wait: the graceful path, which releases the lease.
    pub fn terminate(&mut self) {
        terminate(&mut self.child);
    }

    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn log_contains(&self, needle: &str) -> bool {
        let Ok(f) = File::open(&self.log) else {
            return false;
        };
        BufReader::new(f)
            .lines()
            .map_while(|l| l.ok())
            .any(|l| l.contains(needle))
    }

    pub async fn get(&self, path: &str) -> Result<(u16, String)> {
        let url = format!("http://127.0.0.1:{}{path}", self.metrics_port);
        let response = reqwest::get(&url).await?;
        let status = response.status().as_u16();
        Ok((status, response.text().await?))
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        self.kill();
    }
}
