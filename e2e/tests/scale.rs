//! The operator under many trainings on the real control plane: 200 trainings (one fake H100 GPU
//! each, so 32 run and the rest wait for GPUs) are each reconciled into a phase quickly, and the
//! operator stays small. Needs `e2e/controlplane/up`.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use futures::StreamExt;
use kube::api::ListParams;
use kube::ResourceExt;

use charlm_e2e::specs::small_gpu;
use charlm_e2e::training_env::TestEnv;

const TRAININGS: usize = 200;
const RSS_LIMIT: u64 = 64 * 1024 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_trainings_get_a_phase_fast_and_the_operator_stays_under_64_mib() {
    let mut env = TestEnv::new("scale").await;
    let op = env.start_operator("operator-1").await;
    let started = Instant::now();
    let created: BTreeMap<String, Instant> = futures::stream::iter(0..TRAININGS)
        .map(|i| {
            let env = &env;
            async move {
                let name = format!("t{i:03}");
                let mut manifest = small_gpu(&name, 1);
                // Pods that wait for GPUs must not be released while the test looks at them.
                manifest["spec"]["startupTimeoutSeconds"] = 3600.into();
                env.apply(&manifest.to_string()).await;
                (name, Instant::now())
            }
        })
        .buffer_unordered(8)
        .collect()
        .await;
    let mut phased: BTreeMap<String, Duration> = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(240);
    while phased.len() < TRAININGS && Instant::now() < deadline {
        let list = env.trainings().list(&ListParams::default()).await.unwrap();
        let now = Instant::now();
        for t in list.items {
            let name = t.name_any();
            if t.status.as_ref().and_then(|s| s.phase).is_some() && !phased.contains_key(&name) {
                let latency = now.duration_since(created[&name]);
                phased.insert(name, latency);
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        phased.len(),
        TRAININGS,
        "trainings without a phase after 240 s\n{}",
        env.log_tails()
    );
    let mut latencies: Vec<Duration> = phased.values().copied().collect();
    latencies.sort();
    let p50 = latencies[TRAININGS / 2];
    let p99 = latencies[TRAININGS * 99 / 100];
    // Let the controller settle (statuses written, requeues done) before measuring memory.
    tokio::time::sleep(Duration::from_secs(10)).await;
    let rss = env.operators[op].rss_bytes().expect("the operator's VmRSS");
    eprintln!(
        "scale: {TRAININGS} trainings created in {:.1} s; create -> phase p50 {:.2} s, p99 {:.2} s; operator RSS {:.1} MiB",
        started.elapsed().as_secs_f64(),
        p50.as_secs_f64(),
        p99.as_secs_f64(),
        rss as f64 / (1024.0 * 1024.0)
    );
    assert!(
        rss < RSS_LIMIT,
        "operator RSS {rss} bytes with {TRAININGS} trainings (limit {RSS_LIMIT})"
    );
    // A bound that holds on a loaded 2-core machine; the figures above are what it measured.
    assert!(p99 < Duration::from_secs(30), "create -> phase p99 {p99:?}");
    env.finish().await;
}
