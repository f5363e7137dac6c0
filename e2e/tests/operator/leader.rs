//! Leader election: a killed operator leaves no duplicates, only the leader acts, a standby takes over.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_operator_mid_reconcile_creates_no_duplicates() {
    let mut env = TestEnv::new("crash").await;

    // A quota of two pods stops the first reconcile after two of four workers, for certain.
    let quota: ResourceQuota = serde_json::from_value(json!({
        "metadata": {"name": "two-pods"},
        "spec": {"hard": {"pods": "2"}}
    }))
    .unwrap();
    let quotas: Api<ResourceQuota> = Api::namespaced(env.admin.clone(), &env.ns);
    quotas.create(&PostParams::default(), &quota).await.unwrap();
    env.wait(
        "the quota to be counted",
        Duration::from_secs(30),
        || async {
            let q = quotas.get("two-pods").await.map_err(|e| e.to_string())?;
            if q.status.and_then(|s| s.hard).is_some() {
                Ok(Some(()))
            } else {
                Err("no status".into())
            }
        },
    )
    .await;

    let first = env.start_operator("operator-1").await;
    env.apply(&small_gpu("crashy", 4).to_string()).await;
    env.wait(
        "two workers created, the third refused",
        Duration::from_secs(30),
        || async {
            let n = env.workers("crashy").await.len();
            if n == 2 && env.operators[first].log_contains("exceeded quota") {
                Ok(Some(()))
            } else {
                Err(format!("{n} pods"))
            }
        },
    )
    .await;
    env.operators[first].kill();
    quotas
        .delete("two-pods", &DeleteParams::default())
        .await
        .unwrap();

    // Later replicas die at arbitrary moments; each must take over the lease from a dead holder.
    // Ten kills in all, at moments spread over a reconcile's life.
    for (i, delay_ms) in [0u64, 150, 600, 20, 300, 900, 60, 450, 1200]
        .into_iter()
        .enumerate()
    {
        let k = env.start_operator(&format!("operator-{}", i + 2)).await;
        env.wait(
            "the new replica to lead",
            Duration::from_secs(30),
            || async {
                if env.operators[k].log_contains("acquired leadership") {
                    Ok(Some(()))
                } else {
                    Err("standing by".into())
                }
            },
        )
        .await;
        tokio::time::sleep(Duration::from_millis(delay_ms)).await;
        env.operators[k].kill();
    }
    env.start_operator("operator-last").await;
    let t = env.wait_phase("crashy", Phase::Running, MINUTE).await;
    let status = t.status.clone().unwrap();
    assert_eq!(
        (status.restarts, status.attempt),
        (0, 0),
        "a crash of the operator is not a restart"
    );

    let pods = env.workers("crashy").await;
    let names: Vec<String> = pods.iter().map(|p| p.name_any()).collect();
    assert_eq!(
        names,
        [
            "crashy-worker-0",
            "crashy-worker-1",
            "crashy-worker-2",
            "crashy-worker-3"
        ]
    );
    assert!(pods.iter().all(|p| p.labels()["charlm.dev/attempt"] == "0"));
    let uids: Vec<String> = pods.iter().map(|p| p.uid().unwrap()).collect();
    let pvcs = env.pvcs().list(&ListParams::default()).await.unwrap().items;
    assert_eq!(pvcs.len(), 1);
    assert_eq!(
        env.services()
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .len(),
        1
    );

    // Settled: nothing is recreated behind our back.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let later: Vec<String> = env
        .workers("crashy")
        .await
        .iter()
        .map(|p| p.uid().unwrap())
        .collect();
    assert_eq!(uids, later);
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_leader_acts_and_a_standby_takes_over() {
    let mut env = TestEnv::new("leader").await;
    let a = env.start_operator("replica-a").await;
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> =
        Api::namespaced(env.admin.clone(), CHART_NAMESPACE);
    let lease_name = env.options.lease_name.clone();
    let holder = || async {
        leases
            .get_opt(&lease_name)
            .await
            .ok()
            .flatten()
            .and_then(|l| l.spec?.holder_identity)
    };
    env.wait("replica-a to lead", Duration::from_secs(30), || async {
        match holder().await.as_deref() {
            Some("replica-a") => Ok(Some(())),
            other => Err(format!("holder {other:?}")),
        }
    })
    .await;
    let b = env.start_operator("replica-b").await;
    start_training(&env, &small_gpu("first", 1)).await;
    assert!(env.operators[a].log_contains("controller starting"));
    assert!(env.operators[b].log_contains("standing by"));
    assert!(
        !env.operators[b].log_contains("controller starting"),
        "the standby acted"
    );
    let (_, metrics_b) = env.operators[b].get("/metrics").await.unwrap();
    assert!(
        metrics_b.contains("charlm_operator_leader 0"),
        "{metrics_b}"
    );

    env.operators[a].kill();
    env.wait(
        "replica-b to take over",
        Duration::from_secs(30),
        || async {
            match holder().await.as_deref() {
                Some("replica-b") => Ok(Some(())),
                other => Err(format!("holder {other:?}")),
            }
        },
    )
    .await;
    start_training(&env, &small_gpu("second", 1)).await;
    assert!(env.operators[b].log_contains("controller starting"));

    // A graceful stop hands the lease over at once.
    env.operators[b].terminate();
    env.wait(
        "the lease released on SIGTERM",
        Duration::from_secs(10),
        || async {
            match holder().await {
                None => Ok(Some(())),
                other => Err(format!("holder {other:?}")),
            }
        },
    )
    .await;
    env.start_operator("replica-c").await;
    env.finish().await;
}
