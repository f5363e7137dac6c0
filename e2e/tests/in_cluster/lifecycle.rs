//! Cases 5 to 7: a killed trainer's gang resumes, two CPU pods meet through the Service's DNS, suspend, resume and delete.

use super::*;

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
