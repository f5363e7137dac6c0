//! The stand-in kubelet (`standin-kubelet`, test-only) on the real control plane: each test starts
//! its own runner for a node of its own (tainted, so no other test's pods land there), creates
//! pods that the real scheduler places on it, and checks what the processes did and what the API
//! server shows. Needs `e2e/controlplane/up` (either --cpu-nodes mode); fails without it.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{
    ConfigMap, Namespace, Node, PersistentVolume, PersistentVolumeClaim, Pod, Service,
};
use kube::api::{DeleteParams, PostParams};
use kube::{Api, Client};
use serde_json::{json, Value};

use charlm_e2e::cluster::{admin_client, create_namespace, run_dir, tool, wait_for};

const WAIT: Duration = Duration::from_secs(60);

/// One `standin-kubelet` process running one node; stopped (SIGTERM) and its node deleted on drop.
struct Runner {
    child: Child,
    node: String,
    dir: PathBuf,
    log: PathBuf,
}

impl Runner {
    async fn start(client: &Client, test: &str) -> Runner {
        let suffix = format!(
            "{test}-{:x}",
            std::process::id() as u64 * 1000 + rand_small()
        );
        let node = format!("standin-{suffix}");
        let dir = run_dir().join("standin-tests").join(&suffix);
        let images = dir.join("images");
        std::fs::create_dir_all(&images).unwrap();
        // A program that the image `example.com/fake-image:1` stands for.
        let program = images.join("fake-image");
        std::fs::write(
            &program,
            "#!/bin/sh\necho \"image-ran $*\" > /dev/termination-log\n",
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&program, std::fs::Permissions::from_mode(0o755)).unwrap();
        let log = dir.join("standin-kubelet.log");
        let out = std::fs::File::create(&log).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_standin-kubelet"))
            .arg(format!("--node={node}"))
            .arg(format!("--node-label=charlm.dev/standin-test={suffix}"))
            .arg(format!(
                "--node-taint=charlm.dev/standin-test={suffix}:NoSchedule"
            ))
            .arg("--cpu=4")
            .arg("--memory=8Gi")
            .arg(format!("--state-dir={}", dir.join("state").display()))
            .arg(format!("--image-bin-dir={}", images.display()))
            .env("KUBECONFIG", charlm_e2e::cluster::require_kubeconfig())
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("starting standin-kubelet");
        let runner = Runner {
            child,
            node,
            dir,
            log,
        };
        let nodes: Api<Node> = Api::all(client.clone());
        let name = runner.node.clone();
        wait_for(
            &format!("node {name} Ready (runner log: {})", runner.log.display()),
            WAIT,
            || {
                let nodes = nodes.clone();
                let name = name.clone();
                async move {
                    let n = nodes.get_opt(&name).await.map_err(|e| e.to_string())?;
                    let ready = n
                        .as_ref()
                        .and_then(|n| n.status.as_ref()?.conditions.clone())
                        .into_iter()
                        .flatten()
                        .any(|c| c.type_ == "Ready" && c.status == "True");
                    // The lifecycle controller lifts the not-ready taint new nodes get.
                    let untainted = n
                        .as_ref()
                        .and_then(|n| n.spec.as_ref()?.taints.clone())
                        .into_iter()
                        .flatten()
                        .all(|t| t.key != "node.kubernetes.io/not-ready");
                    Ok((ready && untainted).then_some(()))
                }
            },
        )
        .await;
        runner
    }

    /// A pod placed (by the scheduler) on this runner's node.
    fn pod(&self, name: &str, spec: Value) -> Pod {
        let suffix = self.node.trim_start_matches("standin-");
        let mut spec = spec;
        spec["nodeSelector"] = json!({"charlm.dev/standin-test": suffix});
        spec["tolerations"] = json!([{"key": "charlm.dev/standin-test", "operator": "Exists"}]);
        serde_json::from_value(json!({"metadata": {"name": name}, "spec": spec})).unwrap()
    }

    fn pod_dir(&self, ns: &str, pod: &Pod) -> PathBuf {
        let uid = pod.metadata.uid.clone().unwrap();
        let name = pod.metadata.name.clone().unwrap();
        self.dir
            .join("state/pods")
            .join(format!("{ns}_{name}_{uid}"))
    }

    /// SIGTERM and wait, as `down` stops it.
    fn stop(&mut self) -> std::process::ExitStatus {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(40);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        panic!(
            "standin-kubelet did not stop within 40 s of SIGTERM; log {}",
            self.log.display()
        );
    }
}

impl Drop for Runner {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = Command::new("kill")
                .args(["-TERM", &self.child.id().to_string()])
                .status();
            let deadline = Instant::now() + Duration::from_secs(40);
            while Instant::now() < deadline && matches!(self.child.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = self.child.kill();
        }
        let _ = tool("kubectl", &["delete", "node", &self.node, "--wait=false"]);
    }
}

fn rand_small() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos() as u64
        % 1000
}

async fn delete_namespace(client: &Client, ns: &str) {
    let api: Api<Namespace> = Api::all(client.clone());
    let _ = api.delete(ns, &DeleteParams::default()).await;
}

/// Deletes the test's namespace and waits until the runner has stopped and removed its pods.
async fn finish(client: &Client, ns: &str, runner: Runner) {
    delete_namespace(client, ns).await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    wait_for(
        &format!(
            "the pods of {ns} to be removed (runner log: {})",
            runner.log.display()
        ),
        WAIT,
        || {
            let pods = pods.clone();
            async move {
                let left = pods
                    .list(&Default::default())
                    .await
                    .map_err(|e| e.to_string())?;
                if left.items.is_empty() {
                    Ok(Some(()))
                } else {
                    Err(format!("{} pods left", left.items.len()))
                }
            }
        },
    )
    .await;
    drop(runner);
}

async fn create(client: &Client, ns: &str, pod: &Pod) -> Pod {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    pods.create(&PostParams::default(), pod)
        .await
        .expect("creating the pod")
}

/// Waits until the pod satisfies `done`, failing with the last status seen.
async fn wait_pod(
    client: &Client,
    ns: &str,
    name: &str,
    runner: &Runner,
    what: &str,
    done: impl Fn(&Pod) -> bool,
) -> Pod {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let done = &done;
    wait_for(
        &format!("pod {name}: {what} (runner log: {})", runner.log.display()),
        WAIT,
        || {
            let pods = pods.clone();
            async move {
                let p = pods.get(name).await.map_err(|e| e.to_string())?;
                if done(&p) {
                    Ok(Some(p))
                } else {
                    Err(format!("{:?}", p.status))
                }
            }
        },
    )
    .await
}

fn phase(p: &Pod) -> &str {
    p.status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .unwrap_or("")
}

fn terminated(p: &Pod, init: bool, i: usize) -> Value {
    let s = p.status.as_ref().unwrap();
    let list = if init {
        s.init_container_statuses.as_ref()
    } else {
        s.container_statuses.as_ref()
    };
    serde_json::to_value(&list.unwrap()[i].state).unwrap()["terminated"].clone()
}

/// Processes whose command line contains `token`.
fn processes_with(token: &str) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| String::from_utf8_lossy(&c).contains(token))
                .unwrap_or(false)
        })
        .collect()
}

async fn wait_gone(client: &Client, ns: &str, name: &str, runner: &Runner) {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    wait_for(
        &format!(
            "pod {name} to be removed (runner log: {})",
            runner.log.display()
        ),
        WAIT,
        || {
            let pods = pods.clone();
            async move {
                match pods.get_opt(name).await.map_err(|e| e.to_string())? {
                    None => Ok(Some(())),
                    Some(p) => Err(format!("still there: {:?}", p.status.and_then(|s| s.phase))),
                }
            }
        },
    )
    .await
}

#[tokio::test]
async fn a_failing_container_reports_its_exit_code_and_termination_message() {
    let client = admin_client().await;
    let ns = create_namespace(&client, "standin-fail").await.unwrap();
    let runner = Runner::start(&client, "fail").await;
    let cm: ConfigMap = serde_json::from_value(json!({
        "metadata": {"name": "settings"}, "data": {"mode": "fast", "file.txt": "from-a-file"}
    }))
    .unwrap();
    Api::<ConfigMap>::namespaced(client.clone(), &ns)
        .create(&PostParams::default(), &cm)
        .await
        .unwrap();
    let script = "echo hi > /work/x; \
        echo \"$(pwd) $NS $NAME $MODE $(cat /etc/settings/file.txt)\" > /dev/termination-log; exit 3";
    let pod = runner.pod(
        "fail",
        json!({
            "restartPolicy": "Never",
            "containers": [{"name": "main", "image": "busybox", "workingDir": "/work/sub",
                "command": ["sh", "-c", script],
                "env": [
                    {"name": "NS", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
                    {"name": "NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                    {"name": "MODE", "valueFrom": {"configMapKeyRef": {"name": "settings", "key": "mode"}}}
                ],
                "volumeMounts": [{"name": "work", "mountPath": "/work"},
                                 {"name": "settings", "mountPath": "/etc/settings"}]}],
            "volumes": [{"name": "work", "emptyDir": {}},
                        {"name": "settings", "configMap": {"name": "settings"}}]
        }),
    );
    let created = create(&client, &ns, &pod).await;
    let p = wait_pod(&client, &ns, "fail", &runner, "Failed", |p| {
        phase(p) == "Failed"
    })
    .await;
    let t = terminated(&p, false, 0);
    assert_eq!(t["exitCode"], 3, "{t}");
    assert_eq!(t["reason"], "Error");
    assert_eq!(
        t["message"],
        format!("/work/sub {ns} fail fast from-a-file\n")
    );
    // The emptyDir is this runner's directory for the pod until the pod is deleted.
    let x = runner.pod_dir(&ns, &created).join("volumes/work/x");
    assert_eq!(std::fs::read_to_string(&x).unwrap(), "hi\n");
    assert!(
        !Path::new("/work/x").exists(),
        "the container's /work is its volume, not this machine's /work"
    );

    // An image without a command runs the program of the image's name from --image-bin-dir.
    let pod = runner.pod(
        "image",
        json!({"restartPolicy": "Never",
               "containers": [{"name": "main", "image": "example.com/fake-image:1", "args": ["a", "b"]}]}),
    );
    create(&client, &ns, &pod).await;
    let p = wait_pod(&client, &ns, "image", &runner, "Succeeded", |p| {
        phase(p) == "Succeeded"
    })
    .await;
    assert_eq!(terminated(&p, false, 0)["message"], "image-ran a b\n");

    // A program that exists nowhere is a start error, not a hang.
    let pod = runner.pod(
        "missing",
        json!({"restartPolicy": "Never",
               "containers": [{"name": "main", "image": "x", "command": ["no-such-program-anywhere"]}]}),
    );
    create(&client, &ns, &pod).await;
    let p = wait_pod(&client, &ns, "missing", &runner, "Failed", |p| {
        phase(p) == "Failed"
    })
    .await;
    let t = terminated(&p, false, 0);
    assert_eq!(t["reason"], "StartError", "{t}");
    assert!(t["message"].as_str().unwrap().contains("not found"), "{t}");
    finish(&client, &ns, runner).await;
}

#[tokio::test]
async fn a_running_pod_has_an_address_and_deleting_it_stops_its_processes() {
    let client = admin_client().await;
    let ns = create_namespace(&client, "standin-delete").await.unwrap();
    let runner = Runner::start(&client, "delete").await;
    let token = format!("standin-sleeper-{}", std::process::id());
    let pvc: PersistentVolumeClaim = serde_json::from_value(json!({
        "metadata": {"name": "marks"},
        "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}
    }))
    .unwrap();
    Api::<PersistentVolumeClaim>::namespaced(client.clone(), &ns)
        .create(&PostParams::default(), &pvc)
        .await
        .unwrap();
    let pod = runner.pod(
        "sleeper",
        json!({
            "terminationGracePeriodSeconds": 3,
            "containers": [
                {"name": "polite", "image": "busybox",
                 "command": ["sh", "-c", format!("trap 'echo got-term > /marks/term; exit 0' TERM; while :; do sleep 0.1; done # {token}-polite")],
                 "volumeMounts": [{"name": "marks", "mountPath": "/marks"}]},
                {"name": "stubborn", "image": "busybox",
                 "command": ["sh", "-c", format!("trap '' TERM; while :; do sleep 0.1; done # {token}-stubborn")]}
            ],
            "volumes": [{"name": "marks", "persistentVolumeClaim": {"claimName": "marks"}}]
        }),
    );
    create(&client, &ns, &pod).await;
    let p = wait_pod(&client, &ns, "sleeper", &runner, "Running and Ready", |p| {
        phase(p) == "Running"
            && p.status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .into_iter()
                .flatten()
                .any(|c| c.type_ == "Ready" && c.status == "True")
    })
    .await;
    let ip = p.status.as_ref().unwrap().pod_ip.clone().unwrap();
    assert!(ip.starts_with("127.") && ip != "127.0.0.1", "pod IP {ip}");
    assert_eq!(
        p.status.as_ref().unwrap().pod_ips.as_ref().unwrap()[0].ip,
        ip
    );
    assert_eq!(processes_with(&format!("{token}-polite")).len(), 1);
    assert_eq!(processes_with(&format!("{token}-stubborn")).len(), 1);

    let started = Instant::now();
    Api::<Pod>::namespaced(client.clone(), &ns)
        .delete("sleeper", &DeleteParams::default())
        .await
        .unwrap();
    wait_gone(&client, &ns, "sleeper", &runner).await;
    let took = started.elapsed();
    assert!(
        took >= Duration::from_secs(3),
        "the TERM-ignoring container was killed before the 3 s grace period ({took:?})"
    );
    assert!(
        processes_with(&token).is_empty(),
        "processes outlived their pod"
    );
    // The polite container saw SIGTERM and wrote to the claim.
    let claim = Api::<PersistentVolumeClaim>::namespaced(client.clone(), &ns)
        .get("marks")
        .await
        .unwrap();
    let pv = Api::<PersistentVolume>::all(client.clone())
        .get(claim.spec.unwrap().volume_name.as_deref().unwrap())
        .await
        .unwrap();
    let dir = PathBuf::from(pv.spec.unwrap().host_path.unwrap().path);
    assert_eq!(
        std::fs::read_to_string(dir.join("term")).unwrap(),
        "got-term\n"
    );
    finish(&client, &ns, runner).await;
}

#[tokio::test]
async fn init_containers_run_in_order_before_the_containers() {
    let client = admin_client().await;
    let ns = create_namespace(&client, "standin-init").await.unwrap();
    let runner = Runner::start(&client, "init").await;
    let step = |s: &str| {
        json!({"name": format!("step-{s}"), "image": "busybox",
               "command": ["sh", "-c", format!("echo {s} >> /work/order")],
               "volumeMounts": [{"name": "work", "mountPath": "/work"}]})
    };
    let pod = runner.pod(
        "ordered",
        json!({
            "restartPolicy": "Never",
            "initContainers": [step("1"), step("2")],
            "containers": [{"name": "main", "image": "busybox",
                "command": ["sh", "-c", "echo main >> /work/order; cat /work/order > /dev/termination-log"],
                "volumeMounts": [{"name": "work", "mountPath": "/work"}]}],
            "volumes": [{"name": "work", "emptyDir": {}}]
        }),
    );
    create(&client, &ns, &pod).await;
    let p = wait_pod(&client, &ns, "ordered", &runner, "Succeeded", |p| {
        phase(p) == "Succeeded"
    })
    .await;
    assert_eq!(terminated(&p, false, 0)["message"], "1\n2\nmain\n");
    for i in 0..2 {
        assert_eq!(terminated(&p, true, i)["exitCode"], 0);
    }

    // A failing init container fails the pod (restartPolicy Never); the container never starts.
    let pod = runner.pod(
        "init-fails",
        json!({
            "restartPolicy": "Never",
            "initContainers": [{"name": "bad", "image": "busybox", "command": ["sh", "-c", "exit 5"]}],
            "containers": [{"name": "main", "image": "busybox", "command": ["sh", "-c", "exit 0"]}]
        }),
    );
    create(&client, &ns, &pod).await;
    let p = wait_pod(&client, &ns, "init-fails", &runner, "Failed", |p| {
        phase(p) == "Failed"
    })
    .await;
    assert_eq!(terminated(&p, true, 0)["exitCode"], 5);
    let main = &p
        .status
        .as_ref()
        .unwrap()
        .container_statuses
        .as_ref()
        .unwrap()[0];
    assert!(
        main.state.as_ref().unwrap().waiting.is_some(),
        "the container ran: {main:?}"
    );
    finish(&client, &ns, runner).await;
}

#[tokio::test]
async fn a_claims_data_outlives_the_pod_that_wrote_it() {
    let client = admin_client().await;
    let ns = create_namespace(&client, "standin-claim").await.unwrap();
    let runner = Runner::start(&client, "claim").await;
    let pvc: PersistentVolumeClaim = serde_json::from_value(json!({
        "metadata": {"name": "data"},
        "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}
    }))
    .unwrap();
    Api::<PersistentVolumeClaim>::namespaced(client.clone(), &ns)
        .create(&PostParams::default(), &pvc)
        .await
        .unwrap();
    let with_claim = |name: &str, script: &str| {
        runner.pod(
            name,
            json!({
                "restartPolicy": "Never",
                "containers": [{"name": "main", "image": "busybox", "command": ["sh", "-c", script],
                    "volumeMounts": [{"name": "data", "mountPath": "/checkpoints"}]}],
                "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": "data"}}]
            }),
        )
    };
    create(
        &client,
        &ns,
        &with_claim("writer", "echo step-42 > /checkpoints/latest"),
    )
    .await;
    wait_pod(&client, &ns, "writer", &runner, "Succeeded", |p| {
        phase(p) == "Succeeded"
    })
    .await;
    Api::<Pod>::namespaced(client.clone(), &ns)
        .delete("writer", &DeleteParams::default())
        .await
        .unwrap();
    wait_gone(&client, &ns, "writer", &runner).await;

    create(
        &client,
        &ns,
        &with_claim("reader", "cat /checkpoints/latest > /dev/termination-log"),
    )
    .await;
    let p = wait_pod(&client, &ns, "reader", &runner, "Succeeded", |p| {
        phase(p) == "Succeeded"
    })
    .await;
    assert_eq!(terminated(&p, false, 0)["message"], "step-42\n");
    finish(&client, &ns, runner).await;
}

#[tokio::test]
async fn pods_find_each_other_by_their_headless_service_names() {
    let client = admin_client().await;
    let ns = create_namespace(&client, "standin-dns").await.unwrap();
    let runner = Runner::start(&client, "dns").await;
    let svc: Service = serde_json::from_value(json!({
        "metadata": {"name": "group"},
        "spec": {"clusterIP": "None", "selector": {"app": "group"}, "publishNotReadyAddresses": true}
    }))
    .unwrap();
    Api::<Service>::namespaced(client.clone(), &ns)
        .create(&PostParams::default(), &svc)
        .await
        .unwrap();
    let member = |name: &str, script: String| {
        let mut pod = runner.pod(
            name,
            json!({
                "restartPolicy": "Never",
                "hostname": name, "subdomain": "group",
                "containers": [{"name": "main", "image": "busybox", "command": ["sh", "-c", script],
                    "env": [{"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}]}]
            }),
        );
        pod.metadata.labels = Some([("app".to_string(), "group".to_string())].into());
        pod
    };
    create(&client, &ns, &member("m-0", "sleep 60".into())).await;
    let m0 = wait_pod(&client, &ns, "m-0", &runner, "Running", |p| {
        phase(p) == "Running"
    })
    .await;
    let m0_ip = m0.status.unwrap().pod_ip.unwrap();
    // The trainer's MASTER_ADDR form, and the full one, resolved by the process itself.
    let script = format!(
        "for i in $(seq 100); do a=$(getent hosts m-0.group.{ns}.svc | cut -d' ' -f1); \
         [ -n \"$a\" ] && break; sleep 0.2; done; \
         b=$(getent hosts m-0.group.{ns}.svc.cluster.local | cut -d' ' -f1); \
         echo \"$a $b $POD_IP $(hostname)\" > /dev/termination-log"
    );
    create(&client, &ns, &member("m-1", script)).await;
    let m1 = wait_pod(&client, &ns, "m-1", &runner, "Succeeded", |p| {
        phase(p) == "Succeeded"
    })
    .await;
    let m1_ip = m1.status.as_ref().unwrap().pod_ip.clone().unwrap();
    assert_ne!(m0_ip, m1_ip);
    assert_eq!(
        terminated(&m1, false, 0)["message"],
        format!("{m0_ip} {m0_ip} {m1_ip} m-1\n")
    );
    let hosts = std::fs::read_to_string("/etc/hosts").unwrap();
    assert!(
        !hosts.contains("m-0.group"),
        "this machine's /etc/hosts was changed"
    );
    finish(&client, &ns, runner).await;
}

#[tokio::test]
async fn stopping_the_runner_stops_its_containers() {
    let client = admin_client().await;
    let ns = create_namespace(&client, "standin-stop").await.unwrap();
    let mut runner = Runner::start(&client, "stop").await;
    let token = format!("standin-stop-{}", std::process::id());
    let pod = runner.pod(
        "sleeper",
        json!({"containers": [{"name": "main", "image": "busybox",
            "command": ["sh", "-c", format!("trap '' TERM; while :; do sleep 0.1; done # {token}")]}],
            "terminationGracePeriodSeconds": 2}),
    );
    create(&client, &ns, &pod).await;
    wait_pod(&client, &ns, "sleeper", &runner, "Running", |p| {
        phase(p) == "Running"
    })
    .await;
    assert_eq!(processes_with(&token).len(), 1);
    let status = runner.stop();
    assert!(status.success(), "standin-kubelet exited with {status}");
    assert!(
        processes_with(&token).is_empty(),
        "a container outlived its runner"
    );
    delete_namespace(&client, &ns).await;
}
