//! Cases that need two worker nodes (kind's cluster of e2e/kind-config.yaml): a gang over the pod network, the NetworkPolicy enforced, a lost node.

use super::*;

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
        let manifest = script_pod(pod, ["bash", "-c", script], None);
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
    let status = done.status.unwrap();
    // The gang's end beside the stopped node is a lost node, not a crash counted against
    // maxRestarts (its kubelet's Lease went silent before the survivor's collective timed out).
    assert!(
        status.failures.node_lost >= 1 && status.failures.error == 0 && status.restarts == 0,
        "failures {:?}, counted restarts {}",
        status.failures,
        status.restarts
    );
    let last = status.progress.unwrap();
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
