//! Issue 33 on a cluster whose pods really run (part of the in-cluster suite, `in_cluster.rs`):
//!
//! 8. Kueue preempts a running CPU training: its worker gets SIGTERM and writes a checkpoint,
//!    and once admitted again the training resumes at that checkpoint's step. Kueue v0.17's
//!    manager runs as a process on this machine against the cluster's API server
//!    (`charlm_e2e::kueue`, as in tests/kueue.rs), so kind and the local plane's real node alike.
//! 9. `kubectl charlm` against a training that trains: `logs -f` follows worker 0 while it runs
//!    and ends with it, `sample` prints text sampled from `best/`, `export` copies `best/` out
//!    whole (every file's sha256 equal to the one on the claim).

use std::collections::BTreeMap;
use std::process::Stdio;
use std::time::Instant;

use tokio::io::{AsyncBufReadExt, BufReader};

use charlm_api::kueue::{PRIORITY_CLASS_LABEL, QUEUE_LABEL};
use charlm_e2e::cluster::{kubeconfig_path, plugin_binary, run_dir, TEST_LABEL};
use charlm_e2e::kueue::{self, Kueue};

use super::*;

/// The deployment `e2e/kind.sh` installs (release charlm-operator).
const OPERATOR_DEPLOYMENT: &str = "charlm-operator";

/// Kueue's CRDs and its manager; the in-cluster operator restarted if it started before them
/// (it asks once, at start, whether Kueue's API is served).
async fn start_kueue(case: &Case) -> Kueue {
    let dir = run_dir().join("e2e").join(&case.ns).join("kueue");
    let kueue = Kueue::start(&dir).await;
    let crd_created = tool(
        "kubectl",
        &[
            "get",
            "crd",
            "workloads.kueue.x-k8s.io",
            "-o",
            "jsonpath={.metadata.creationTimestamp}",
        ],
    )
    .unwrap();
    let started = tool(
        "kubectl",
        &[
            "get",
            "pods",
            "-n",
            CHART_NAMESPACE,
            "-l",
            "app.kubernetes.io/name=charlm-operator",
            "-o",
            "jsonpath={.items[*].status.startTime}",
        ],
    )
    .unwrap();
    // RFC 3339 times of one zone compare as text.
    let stale = started.split_whitespace().any(|t| t <= crd_created.trim());
    if stale {
        let deployment = format!("deployment/{OPERATOR_DEPLOYMENT}");
        tool(
            "kubectl",
            &["rollout", "restart", &deployment, "-n", CHART_NAMESPACE],
        )
        .unwrap();
        tool(
            "kubectl",
            &[
                "rollout",
                "status",
                &deployment,
                "-n",
                CHART_NAMESPACE,
                "--timeout=180s",
            ],
        )
        .unwrap_or_else(|e| panic!("the operator did not come back after its restart: {e}"));
    }
    let _ = kueue::version(); // the pinned version, for the log line below
    eprintln!("Kueue {} runs against the cluster", kueue::version());
    kueue
}

/// One flavour without labels, a ClusterQueue whose CPU quota holds one training at a time and
/// preempts lower priorities, a LocalQueue `team` and a WorkloadPriorityClass `urgent-<ns>`.
fn queue_setup(ns: &str) -> String {
    format!(
        r#"apiVersion: kueue.x-k8s.io/v1beta2
kind: ResourceFlavor
metadata:
  name: node-{ns}
  labels: {{{TEST_LABEL}: {ns}}}
---
apiVersion: kueue.x-k8s.io/v1beta2
kind: ClusterQueue
metadata:
  name: cpu-{ns}
  labels: {{{TEST_LABEL}: {ns}}}
spec:
  namespaceSelector:
    matchLabels:
      kubernetes.io/metadata.name: {ns}
  preemption:
    withinClusterQueue: LowerPriority
  resourceGroups:
  - coveredResources: [cpu, memory]
    flavors:
    - name: node-{ns}
      resources:
      - {{name: cpu, nominalQuota: 300m}}
      - {{name: memory, nominalQuota: 1Gi}}
---
apiVersion: kueue.x-k8s.io/v1beta2
kind: LocalQueue
metadata:
  name: team
  namespace: {ns}
spec:
  clusterQueue: cpu-{ns}
---
apiVersion: kueue.x-k8s.io/v1beta2
kind: WorkloadPriorityClass
metadata:
  name: urgent-{ns}
  labels: {{{TEST_LABEL}: {ns}}}
value: 1000
"#
    )
}

fn step_of(checkpoint: &str) -> i64 {
    checkpoint
        .rsplit("step-")
        .next()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not a step-N checkpoint: {checkpoint}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a cluster with the chart and images: e2e/kind.sh runs it"]
async fn kueue_preempts_a_running_training_which_checkpoints_and_resumes_at_that_step() {
    let _serial = SERIAL.lock().await;
    let case = Case::start("kueue-preempt").await;
    let ns = case.ns.clone();
    let mut kueue = start_kueue(&case).await;
    let setup = run_dir().join("e2e").join(&ns).join("queue-setup.yaml");
    std::fs::write(&setup, queue_setup(&ns)).unwrap();
    tool("kubectl", &["apply", "-f", setup.to_str().unwrap()]).expect("the queue setup");

    // A routine training, long enough to be running when the urgent one comes.
    let mut routine = tiny("routine", 1);
    routine["metadata"]["labels"] = json!({ QUEUE_LABEL: "team" });
    routine["spec"]["maxSteps"] = json!(100000);
    routine["spec"]["hours"] = json!(0.05);
    routine["spec"]["checkpoint"]["intervalMinutes"] = json!(10);
    case.apply(&routine).await;
    case.wait_phase("routine", Phase::Running, 3 * MINUTE).await;
    let before = case
        .until("routine to train 30 steps", 3 * MINUTE, || async {
            let s = case.training("routine").await?.status.unwrap_or_default();
            match s.progress {
                Some(p) if p.step >= 30 => Ok(Some(p)),
                p => Err(format!("progress {p:?}")),
            }
        })
        .await;

    // The urgent one: Kueue evicts the routine one to make room.
    let mut urgent = tiny("urgent", 1);
    urgent["metadata"]["labels"] =
        json!({ QUEUE_LABEL: "team", PRIORITY_CLASS_LABEL: format!("urgent-{ns}") });
    urgent["spec"]["maxSteps"] = json!(40);
    let preempted_at = Instant::now();
    case.apply(&urgent).await;
    let queued = case
        .until(
            "routine to be preempted and stopped",
            3 * MINUTE,
            || async {
                let t = case.training("routine").await?;
                let s = t.status.clone().unwrap_or_default();
                let preempted = s
                    .conditions
                    .iter()
                    .any(|c| c.type_ == "Admitted" && c.reason == "Preempted");
                let gone = case.workers("routine").await.is_empty();
                if preempted && gone && s.phase == Some(Phase::Queued) {
                    Ok(Some(s))
                } else {
                    Err(format!("preempted {preempted}, workers gone {gone}: {s:?}"))
                }
            },
        )
        .await;
    // The SIGTERM report: rank 0 stopped for the signal and saved a checkpoint at its last step.
    let report = queued.progress.clone().expect("the final report");
    assert_eq!(report.stop_reason.as_deref(), Some("signal"), "{report:?}");
    let checkpoint = queued
        .latest_checkpoint
        .clone()
        .expect("status.latestCheckpoint");
    let saved_step = step_of(&checkpoint);
    assert!(
        saved_step > before.step,
        "{checkpoint} is older than step {}",
        before.step
    );
    assert_eq!(
        saved_step, report.step,
        "the checkpoint is of the step it stopped at"
    );
    let pvc = queued.checkpoint_pvc.clone().unwrap();
    let manifest = case
        .run_script(
            "manifest",
            &pvc,
            &format!("cat /data/step-{saved_step:09}/manifest.json"),
            true,
        )
        .await;
    let _ = case
        .pods
        .delete("manifest", &DeleteParams::default().grace_period(0))
        .await;
    assert_eq!(
        manifest.0, "Succeeded",
        "reading the checkpoint: {}",
        manifest.1
    );
    let saved: Value = serde_json::from_str(manifest.1.trim()).unwrap_or_else(|e| {
        panic!(
            "the checkpoint's manifest.json does not parse ({e}): {}",
            manifest.1
        )
    });
    assert_eq!(saved["step"], saved_step);
    let lost_training_s = report.elapsed_s - saved["elapsed_s"].as_f64().unwrap();

    // The urgent one finishes; the routine one is admitted again and resumes at that step.
    case.wait_phase("urgent", Phase::Succeeded, 4 * MINUTE)
        .await;
    let resumed = case.wait_phase("routine", Phase::Running, 3 * MINUTE).await;
    let back_after = preempted_at.elapsed();
    let log = case
        .until("the resumed worker's log", 3 * MINUTE, || async {
            let lp = LogParams {
                container: Some("trainer".into()),
                ..Default::default()
            };
            let log = case
                .pods
                .logs("routine-worker-0", &lp)
                .await
                .map_err(|e| e.to_string())?;
            Ok(log.contains("resumed from ").then_some(log))
        })
        .await;
    let line = log
        .lines()
        .find(|l| l.contains("resumed from "))
        .unwrap()
        .to_string();
    let resumed_at: i64 = line
        .split_once(" at step ")
        .and_then(|(_, rest)| rest.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no step in {line:?}"));
    assert!(
        line.contains(&format!("/checkpoints/step-{saved_step:09}")),
        "{line}"
    );
    assert_eq!(resumed_at, saved_step, "{line}");
    let status = resumed.status.unwrap_or_default();
    assert_eq!(status.restarts, 0, "a preemption is no restart");
    assert_eq!(
        status.failures.preempted, 0,
        "Kueue's eviction is no failure"
    );
    let after = case
        .until(
            "routine to train past its checkpoint",
            3 * MINUTE,
            || async {
                let s = case.training("routine").await?.status.unwrap_or_default();
                match s.progress {
                    Some(p) if p.step > saved_step && p.stop_reason.is_none() => Ok(Some(p)),
                    p => Err(format!("progress {p:?}")),
                }
            },
        )
        .await;
    eprintln!(
        "preempted by Kueue: the SIGTERM checkpoint is of step {saved_step} (last report before \
         the preemption: step {}; training time {:.1} s, in the checkpoint {:.1} s, so {:.1} s of \
         training lost); readmitted, the worker resumed at step {resumed_at} ({line:?}) \
         {:.0} s after the urgent training was applied, and trains on (step {}, {:.1} s of \
         training)",
        before.step,
        report.elapsed_s,
        saved["elapsed_s"].as_f64().unwrap(),
        lost_training_s,
        back_after.as_secs_f64(),
        after.step,
        after.elapsed_s
    );
    assert!(
        lost_training_s.abs() < 1.0,
        "{lost_training_s} s of training lost"
    );

    case.trainings
        .delete("routine", &DeleteParams::default())
        .await
        .unwrap();
    case.until("routine to be deleted", 2 * MINUTE, || async {
        match case.trainings.get_opt("routine").await {
            Ok(None) => Ok(Some(())),
            other => Err(format!("{:?}", other.map(|t| t.map(|t| t.status)))),
        }
    })
    .await;
    case.finish().await;
    kueue.delete_test_objects(
        &["clusterqueue", "resourceflavor", "workloadpriorityclass"],
        &ns,
    );
    kueue.stop();
}

/// `sha256sum`'s lines (`<hash>  <file>`) as file → hash.
fn sums(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter_map(|l| {
            let (hash, file) = l.split_once("  ")?;
            Some((
                file.trim().trim_start_matches("./").to_string(),
                hash.to_string(),
            ))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a cluster with the chart and images: e2e/kind.sh runs it"]
async fn kubectl_charlm_follows_logs_samples_from_best_and_exports_it_whole() {
    let _serial = SERIAL.lock().await;
    let case = Case::start("plugin-live").await;
    let name = "live";
    let mut manifest = tiny(name, 1);
    // Long enough (about 30 s) that `logs -f` starts while it steps: 200 steps of this model
    // took under two seconds, and the stream then only replayed a finished log.
    manifest["spec"]["maxSteps"] = json!(1_000_000);
    manifest["spec"]["hours"] = json!(0.008);
    manifest["spec"]["evalEvery"] = json!(200);
    case.apply(&manifest).await;
    case.wait_phase(name, Phase::Running, 3 * MINUTE).await;

    // `logs -f` while it trains: lines arrive while the training runs, and the stream ends when
    // the trainer does, with its last lines.
    let mut follow = tokio::process::Command::new(plugin_binary())
        .env("KUBECONFIG", kubeconfig_path())
        .args(["-n", &case.ns, "logs", name, "-f"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("kubectl-charlm logs -f");
    let mut lines = BufReader::new(follow.stdout.take().unwrap()).lines();
    let mut seen = Vec::new();
    let mut phase_at_first_step = None;
    let deadline = Instant::now() + 5 * MINUTE;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let next = tokio::time::timeout(left, lines.next_line()).await;
        match next {
            Err(_) => panic!(
                "{}",
                case.report(&format!(
                    "logs -f did not end with the trainer within 5 minutes; {} lines",
                    seen.len()
                ))
                .await
            ),
            Ok(Ok(Some(line))) => {
                if phase_at_first_step.is_none() && line.contains("\"event\":\"step\"") {
                    let t = case.training(name).await.unwrap();
                    phase_at_first_step = Some(t.status.and_then(|s| s.phase));
                }
                seen.push(line);
            }
            Ok(Ok(None)) => break,
            Ok(Err(e)) => panic!("reading logs -f: {e}"),
        }
    }
    let status = follow.wait().await.unwrap();
    let mut stderr = String::new();
    use tokio::io::AsyncReadExt;
    follow
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .await
        .unwrap();
    assert!(status.success(), "logs -f exited {status}: {stderr}");
    assert_eq!(
        phase_at_first_step,
        Some(Some(Phase::Running)),
        "the first step came while the training ran"
    );
    let steps: Vec<&String> = seen
        .iter()
        .filter(|l| l.contains("\"event\":\"step\""))
        .collect();
    assert!(steps.len() >= 2, "step events followed: {seen:?}");
    assert!(
        seen.iter().any(|l| l.contains("\"event\":\"end\"")),
        "the stream runs to the trainer's end: {:?}",
        &seen[seen.len().saturating_sub(5)..]
    );
    let done = case.wait_phase(name, Phase::Succeeded, 3 * MINUTE).await;
    let st = done.status.unwrap();
    let best_step = st.best_step.expect("status.bestStep");

    // `sample` prints text sampled from best/.
    let out = tokio::time::timeout(
        5 * MINUTE,
        tokio::process::Command::new(plugin_binary())
            .env("KUBECONFIG", kubeconfig_path())
            .args([
                "-n",
                &case.ns,
                "sample",
                name,
                "--prompt",
                "12+34",
                "--max-tokens",
                "24",
                "--temperature",
                "0",
            ])
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("sample ends within 5 minutes")
    .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "sample failed: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("sampling from /checkpoints/best")
            && text.contains(&format!("(step {best_step})")),
        "{text}"
    );
    // The prompt, then what the model wrote after it (a newline ends a document here, so the
    // continuation may start on the next line).
    let (_, continuation) = text
        .split_once("12+34")
        .unwrap_or_else(|| panic!("no sample in {text:?}"));
    let sampled = format!("12+34{}", continuation.trim_end());
    assert!(
        continuation.chars().any(|c| c.is_ascii_digit()),
        "the model wrote nothing after its prompt: {text:?}"
    );

    // `export` copies best/ whole: the same files, byte for byte, as on the claim.
    let to = run_dir().join("e2e").join(&case.ns).join("export");
    let _ = std::fs::remove_dir_all(&to);
    let out = tokio::time::timeout(
        5 * MINUTE,
        tokio::process::Command::new(plugin_binary())
            .env("KUBECONFIG", kubeconfig_path())
            .args(["-n", &case.ns, "export", name, "--to", to.to_str().unwrap()])
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("export ends within 5 minutes")
    .unwrap();
    assert!(
        out.status.success(),
        "export failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let local = std::process::Command::new("sh")
        .arg("-c")
        .arg("cd \"$0\" && find . -type f | sort | xargs sha256sum")
        .arg(to.join("best"))
        .output()
        .unwrap();
    assert!(local.status.success());
    let local = sums(&String::from_utf8_lossy(&local.stdout));
    let pvc = st.checkpoint_pvc.clone().unwrap();
    let (phase, remote) = case
        .run_script(
            "best-sums",
            &pvc,
            "cd /data/best && find . -type f | sort | xargs sha256sum",
            true,
        )
        .await;
    assert_eq!(phase, "Succeeded", "{remote}");
    let remote = sums(&remote);
    assert!(
        remote.len() >= 3 && remote.contains_key("manifest.json"),
        "best/ on the claim: {remote:?}"
    );
    assert_eq!(local, remote, "the exported best/ differs from the claim's");
    eprintln!(
        "kubectl charlm: logs -f followed {} lines ({} step events) to the end; sample: {sampled:?}; \
         export: {} files of best/ (step {best_step}), sha256 equal to the claim's",
        seen.len(),
        steps.len(),
        local.len()
    );
    case.finish().await;
}
