//! The subcommands against the API server. Each reads what it needs, checks it with `helper`'s
//! rules before starting anything, and leaves nothing behind: a helper pod is deleted on every
//! path out, and carries a deadline and an owner in case this process is killed.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _, Result};
use futures::{AsyncBufReadExt, TryStreamExt};
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod};
use kube::api::{AttachParams, DeleteParams, LogParams, PostParams};
use kube::{Api, Client, ResourceExt};
use tokio::io::AsyncWriteExt;

use charlm_api::names::{pod_name, TRAINER_CONTAINER};
use charlm_api::CharLMTraining;

use crate::cli::HelperPod;
use crate::helper::{self, Job, Wanted, CHECKPOINT_DIR};
use crate::view;

/// How often a helper pod is looked at while it starts or runs.
const POLL: Duration = Duration::from_secs(1);

pub struct Ctx {
    pub client: Client,
    pub ns: String,
}

impl Ctx {
    fn trainings(&self) -> Api<CharLMTraining> {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    fn pods(&self) -> Api<Pod> {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    async fn training(&self, name: &str) -> Result<CharLMTraining> {
        self.trainings()
            .get_opt(name)
            .await
            .with_context(|| format!("cannot read charlmtrainings.charlm.dev/{name} in namespace {}", self.ns))?
            .ok_or_else(|| {
                anyhow!(
                    "no CharLMTraining {name} in namespace {}: `kubectl get clt -n {}` lists them (-n picks another namespace)",
                    self.ns,
                    self.ns
                )
            })
    }

    async fn worker0(&self, training: &str) -> Result<Option<Pod>> {
        let name = pod_name(training, 0);
        self.pods()
            .get_opt(&name)
            .await
            .with_context(|| format!("cannot read pod {name}"))
    }

    /// The claim of the wanted checkpoint, checked to exist, and the image to read it with.
    async fn checkpoint(
        &self,
        training: &CharLMTraining,
        wanted: Wanted,
        image_flag: Option<&str>,
    ) -> Result<(String, String, Option<Pod>)> {
        let name = training.name_any();
        let claim = helper::checkpoint_claim(training, wanted).map_err(|e| anyhow!(e))?;
        let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(self.client.clone(), &self.ns);
        let pvc = pvcs
            .get_opt(&claim)
            .await
            .with_context(|| format!("cannot read persistentvolumeclaim {claim}"))?;
        helper::claim_usable(&name, &claim, pvc.as_ref()).map_err(|e| anyhow!(e))?;
        let worker0 = self.worker0(&name).await?;
        let image = helper::trainer_image(image_flag, training, worker0.as_ref())
            .map_err(|e| anyhow!(e))?;
        Ok((claim, image, worker0))
    }
}

pub async fn status(ctx: &Ctx, name: &str) -> Result<()> {
    let training = ctx.training(name).await?;
    print!("{}", view::render(&training, jiff::Timestamp::now()));
    Ok(())
}

pub async fn logs(
    ctx: &Ctx,
    name: &str,
    follow: bool,
    tail: Option<i64>,
    previous: bool,
) -> Result<()> {
    let training = ctx.training(name).await?;
    let pod = pod_name(name, 0);
    if ctx.worker0(name).await?.is_none() {
        let phase = training.status.and_then(|s| s.phase);
        if phase.is_some_and(|p| p.is_terminal()) {
            bail!(
                "worker 0 of {name} ({pod}) is gone: the operator deletes a training's pods once \
                 it has read their final report (the figures are in `kubectl charlm status \
                 {name}`; with spec.tensorboard, TensorBoard's event files are on its claim)"
            );
        }
        bail!(
            "worker 0 of {name} ({pod}) does not exist now (phase {}): the operator creates it \
             when the training starts or restarts; `kubectl charlm status {name}` says what it \
             waits for",
            phase.map_or("unknown", |p| p.as_str())
        );
    }
    let lp = LogParams {
        container: Some(TRAINER_CONTAINER.to_string()),
        follow,
        tail_lines: tail,
        previous,
        ..Default::default()
    };
    let what = || format!("cannot read the log of container {TRAINER_CONTAINER} of pod {pod}");
    let mut lines = ctx
        .pods()
        .log_stream(&pod, &lp)
        .await
        .with_context(what)?
        .lines();
    let mut out = tokio::io::stdout();
    while let Some(line) = lines.try_next().await.with_context(what)? {
        out.write_all(line.as_bytes()).await?;
        out.write_all(b"\n").await?;
    }
    out.flush().await?;
    Ok(())
}

pub struct SampleArgs<'a> {
    pub prompt: &'a str,
    pub max_tokens: u32,
    pub temperature: f64,
    pub seed: u64,
}

pub async fn sample(ctx: &Ctx, name: &str, args: SampleArgs<'_>, hp: &HelperPod) -> Result<()> {
    let training = ctx.training(name).await?;
    let (claim, image, worker0) = ctx
        .checkpoint(&training, Wanted::BestOrLatest, hp.image.as_deref())
        .await?;
    let job = Job {
        kind: "sample",
        image,
        command: helper::sample_command(args.prompt, args.max_tokens, args.temperature, args.seed),
        deadline_seconds: hp.timeout as i64,
    };
    let spec = helper::pod(&training, &claim, job, worker0.as_ref());
    let pod = Running::create(ctx, &spec).await?;
    // The log only of a pod that ended: one still starting has none yet.
    let ended = match pod.wait(ctx, hp.timeout, Until::Ended).await {
        Ok(phase) => pod.log(ctx).await.map(|log| (phase, log)),
        Err(e) => Err(e),
    };
    pod.delete(ctx).await;
    let (phase, log) = ended?;
    if phase != "Succeeded" {
        bail!("the sample pod {} ended {phase}; its log:\n{log}", pod.name);
    }
    print!("{log}");
    Ok(())
}

pub async fn export(ctx: &Ctx, name: &str, to: &Path, hp: &HelperPod) -> Result<()> {
    let training = ctx.training(name).await?;
    let target = to.join("best");
    if target.exists() {
        bail!(
            "{} exists: remove it or pick another --to",
            target.display()
        );
    }
    let (claim, image, worker0) = ctx
        .checkpoint(&training, Wanted::Best, hp.image.as_deref())
        .await?;
    std::fs::create_dir_all(to)
        .with_context(|| format!("cannot create {} (--to)", to.display()))?;
    // The pod only holds the mount; the copy is `tar` through exec, as `kubectl cp` does, because
    // a container log is rotated by the kubelet and would cut a checkpoint of gigabytes short.
    let job = Job {
        kind: "export",
        image,
        command: vec!["sleep".into(), hp.timeout.to_string()],
        deadline_seconds: hp.timeout as i64,
    };
    let spec = helper::pod(&training, &claim, job, worker0.as_ref());
    let pod = Running::create(ctx, &spec).await?;
    let copied = match pod.wait(ctx, hp.timeout, Until::Running).await {
        Ok(phase) if phase == "Running" => copy_best(ctx, &pod.name, to).await,
        Ok(phase) => Err(anyhow!(
            "the export pod {} ended {phase} before the copy: `kubectl describe pod` while it runs \
             shows why (--image must be the trainer image, which has sleep and tar)",
            pod.name
        )),
        Err(e) => Err(e),
    };
    pod.delete(ctx).await;
    if let Err(e) = copied {
        // A partial copy would pass for a checkpoint.
        let _ = std::fs::remove_dir_all(&target);
        return Err(e);
    }
    let (files, bytes) = count(&target)?;
    let st = training.status.unwrap_or_default();
    println!(
        "copied best/ of {name} ({}val bpc {}) to {}: {files} files, {bytes} bytes",
        st.best_step
            .map_or(String::new(), |s| format!("step {s}, ")),
        st.best_val_bpc.map_or("?".into(), |b| format!("{b:.4}")),
        target.display()
    );
    Ok(())
}

/// Streams `tar -c best` from the pod into `tar -x` here.
async fn copy_best(ctx: &Ctx, pod: &str, to: &Path) -> Result<()> {
    let ap = AttachParams::default()
        .container("export")
        .stdin(false)
        .stdout(true)
        .stderr(true);
    let mut remote = ctx
        .pods()
        .exec(pod, ["tar", "-C", CHECKPOINT_DIR, "-cf", "-", "best"], &ap)
        .await
        .with_context(|| {
            format!("cannot exec tar in pod {pod} (needs RBAC create on pods/exec)")
        })?;
    let mut stdout = remote.stdout().context("no stdout from the exec")?;
    let mut stderr = remote.stderr().context("no stderr from the exec")?;
    let status = remote.take_status().context("no status from the exec")?;
    let mut local = tokio::process::Command::new("tar")
        .arg("-x")
        .arg("-f")
        .arg("-")
        .arg("-C")
        .arg(to)
        .stdin(Stdio::piped())
        .spawn()
        .context("cannot run tar here (it unpacks the copy)")?;
    let mut stdin = local.stdin.take().expect("piped");
    let errors = tokio::spawn(async move {
        let mut text = Vec::new();
        let _ = tokio::io::copy(&mut stderr, &mut text).await;
        String::from_utf8_lossy(&text).into_owned()
    });
    let copied = tokio::io::copy(&mut stdout, &mut stdin).await;
    drop(stdin);
    let unpacked = local.wait().await.context("waiting for tar here")?;
    let remote_status = status.await;
    let remote_errors = errors.await.unwrap_or_default();
    let _ = remote.join().await;
    copied.context("the copy stream broke")?;
    if let Some(s) = remote_status.filter(|s| s.status.as_deref() != Some("Success")) {
        bail!(
            "tar in pod {pod} failed: {} {}",
            s.message.unwrap_or_default(),
            remote_errors.trim()
        );
    }
    if !unpacked.success() {
        bail!("tar here could not unpack the copy ({unpacked})");
    }
    Ok(())
}

/// Files and bytes under `dir`.
fn count(dir: &Path) -> Result<(u64, u64)> {
    let (mut files, mut bytes) = (0, 0);
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let entry = entry?;
        let meta = entry.metadata()?;
        if meta.is_dir() {
            let (f, b) = count(&entry.path())?;
            files += f;
            bytes += b;
        } else {
            files += 1;
            bytes += meta.len();
        }
    }
    Ok((files, bytes))
}

#[derive(Clone, Copy, PartialEq)]
enum Until {
    Running,
    Ended,
}

/// A helper pod this process created.
struct Running {
    name: String,
}

impl Running {
    async fn create(ctx: &Ctx, spec: &Pod) -> Result<Running> {
        let pod = ctx
            .pods()
            .create(&PostParams::default(), spec)
            .await
            .context("cannot create the helper pod (needs RBAC create on pods)")?;
        Ok(Running {
            name: pod.name_any(),
        })
    }

    /// Waits, at most `timeout` seconds, for the pod to run or to end; returns its phase.
    async fn wait(&self, ctx: &Ctx, timeout: u64, until: Until) -> Result<String> {
        let start = Instant::now();
        let limit = Duration::from_secs(timeout);
        let mut last = String::from("not seen yet");
        // Bounded by count as well as by time: one look per POLL.
        for _ in 0..=timeout.max(1) {
            if let Some(pod) = ctx.pods().get_opt(&self.name).await? {
                let phase = pod
                    .status
                    .as_ref()
                    .and_then(|s| s.phase.clone())
                    .unwrap_or_default();
                match phase.as_str() {
                    "Succeeded" | "Failed" => return Ok(phase),
                    "Running" if until == Until::Running => return Ok(phase),
                    _ => last = waiting_reason(&pod).unwrap_or(phase),
                }
            } else {
                bail!("the helper pod {} disappeared", self.name);
            }
            if start.elapsed() >= limit {
                break;
            }
            tokio::time::sleep(POLL).await;
        }
        bail!(
            "the helper pod {} did not {} within {timeout}s (--timeout); last seen: {last}",
            self.name,
            if until == Until::Running {
                "start"
            } else {
                "finish"
            }
        )
    }

    async fn log(&self, ctx: &Ctx) -> Result<String> {
        ctx.pods()
            .logs(&self.name, &LogParams::default())
            .await
            .with_context(|| format!("cannot read the log of pod {}", self.name))
    }

    async fn delete(&self, ctx: &Ctx) {
        let dp = DeleteParams {
            grace_period_seconds: Some(0),
            ..Default::default()
        };
        if let Err(e) = ctx.pods().delete(&self.name, &dp).await {
            eprintln!(
                "warning: could not delete the helper pod {}: {e}",
                self.name
            );
        }
    }
}

/// Why a pod is not running yet: a scheduling failure or a waiting container's reason.
fn waiting_reason(pod: &Pod) -> Option<String> {
    let status = pod.status.as_ref()?;
    let waiting = status
        .container_statuses
        .iter()
        .flatten()
        .filter_map(|c| c.state.as_ref()?.waiting.as_ref())
        .map(|w| {
            format!(
                "{} {}",
                w.reason.clone().unwrap_or_default(),
                w.message.clone().unwrap_or_default()
            )
        })
        .next();
    let unscheduled = status
        .conditions
        .iter()
        .flatten()
        .find(|c| c.type_ == "PodScheduled" && c.status == "False")
        .map(|c| c.message.clone().unwrap_or_default());
    waiting.or(unscheduled).map(|s| s.trim().to_string())
}
