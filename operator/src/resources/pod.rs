use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMapVolumeSource, Container, ContainerPort, EmptyDirVolumeSource,
    PersistentVolumeClaimVolumeSource, Pod, PodSecurityContext, PodSpec, ResourceRequirements,
    SeccompProfile, SecurityContext, Toleration, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kube::api::ObjectMeta;
use kube::ResourceExt;

use super::env::trainer_env;
use super::{
    common_labels, namespace_of, owner_reference, pod_name, pvc_name, service_name, ATTEMPT_LABEL,
    CHECKPOINT_DIR, METRICS_PORT_NAME, PROGRESS_PORT, RENDEZVOUS_PORT, REPORT_FINALIZER,
    TERMINATION_LOG, WORKER_INDEX_LABEL, WORK_DIR,
};
use crate::crd::{CharLMTraining, DatasetSpec, EffectiveSettings};
use charlm_contract::METRICS_PATH;

use charlm_api::names::TRAINER_CONTAINER;
pub const GPU_RESOURCE: &str = "nvidia.com/gpu";
pub const GPU_PRODUCT_LABEL: &str = "nvidia.com/gpu.product";
pub const H100_PRODUCT: &str = "NVIDIA-H100-80GB-HBM3";
/// The user of the trainer image (Dockerfile); pods run as it, never as root.
const TRAINER_UID: i64 = 1000;
/// Time for rank 0 to write a checkpoint after SIGTERM (suspend, restart, delete).
const TERMINATION_GRACE_SECONDS: i64 = 300;
const DATASET_DIR: &str = "/dataset";

/// Operator-wide settings that shape every worker pod.
#[derive(Clone, Debug)]
pub struct PodSettings {
    /// Trainer image for trainings without `spec.image`.
    pub default_image: String,
    pub image_pull_policy: Option<String>,
}

/// Worker pod `index` of `training`, for the given attempt, with the training's effective settings
/// (`effective::resolve`). Worker 0 hosts the rendezvous store, reports progress and metrics, and
/// alone mounts the checkpoint volume (docs/contract.md).
pub fn worker_pod(
    training: &CharLMTraining,
    effective: &EffectiveSettings,
    index: i32,
    attempt: i64,
    settings: &PodSettings,
) -> Pod {
    let name = training.name_any();
    let namespace = namespace_of(training);
    let spec = &training.spec;
    let gpus = effective.gpus_per_worker();

    let mut labels = common_labels(&name);
    labels.insert(WORKER_INDEX_LABEL.to_string(), index.to_string());
    labels.insert(ATTEMPT_LABEL.to_string(), attempt.to_string());

    let image = spec
        .image
        .clone()
        .unwrap_or_else(|| settings.default_image.clone());
    let trainer_resources = trainer_resources(spec.resources.clone(), gpus);
    let prep_resources = without_gpus(&trainer_resources);
    let restricted = restricted_security_context();

    // The root file system is read-only; these are the places a container writes besides the
    // checkpoint volume: the prepared data, NCCL's shared memory, and /tmp for the libraries.
    let mut volumes = vec![
        empty_dir("work", None),
        empty_dir("dshm", Some("Memory")),
        empty_dir("tmp", None),
    ];
    let mut mounts = vec![
        mount("work", WORK_DIR, false),
        mount("dshm", "/dev/shm", false),
        mount("tmp", "/tmp", false),
    ];
    if index == 0 {
        volumes.push(Volume {
            name: "checkpoints".to_string(),
            persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                claim_name: pvc_name(&name),
                read_only: None,
            }),
            ..Default::default()
        });
        mounts.push(mount("checkpoints", CHECKPOINT_DIR, false));
    }

    let (dataset_volume, input_dir, generate) = dataset_input(&spec.dataset);
    let mut prep_mounts = vec![mount("work", WORK_DIR, false), mount("tmp", "/tmp", false)];
    if let Some(volume) = dataset_volume {
        volumes.push(volume);
        prep_mounts.push(mount("dataset", DATASET_DIR, true));
    }
    let init_container = |name: &str, args: Vec<String>| Container {
        name: name.to_string(),
        image: Some(image.clone()),
        image_pull_policy: settings.image_pull_policy.clone(),
        command: Some(vec!["charlm-trainer".to_string()]),
        args: Some(args),
        resources: Some(prep_resources.clone()),
        volume_mounts: Some(prep_mounts.clone()),
        security_context: Some(restricted.clone()),
        termination_message_policy: Some("FallbackToLogsOnError".to_string()),
        ..Default::default()
    };
    let mut init_containers = Vec::new();
    if let Some((chars, seed)) = generate {
        init_containers.push(init_container(
            "generate",
            strings(&[
                "generate",
                "--output",
                &format!("{WORK_DIR}/raw"),
                "--chars",
                &chars.to_string(),
                "--seed",
                &seed.to_string(),
            ]),
        ));
    }
    init_containers.push(init_container(
        "prepare",
        strings(&[
            "prepare",
            "--input",
            &input_dir,
            "--output",
            &format!("{WORK_DIR}/data"),
        ]),
    ));

    let trainer = Container {
        name: TRAINER_CONTAINER.to_string(),
        image: Some(image.clone()),
        image_pull_policy: settings.image_pull_policy.clone(),
        command: Some(vec!["charlm-trainer".to_string()]),
        args: Some(strings(&["launch", "--", "train"])),
        env: Some(trainer_env(training, effective, &name, &namespace, index)),
        ports: Some(vec![
            container_port("rendezvous", RENDEZVOUS_PORT),
            container_port(METRICS_PORT_NAME, PROGRESS_PORT),
        ]),
        resources: Some(trainer_resources),
        volume_mounts: Some(mounts),
        security_context: Some(restricted),
        termination_message_path: Some(TERMINATION_LOG.to_string()),
        // The trainer writes its final report there; a crash without one still leaves the log tail.
        termination_message_policy: Some("FallbackToLogsOnError".to_string()),
        ..Default::default()
    };

    Pod {
        metadata: ObjectMeta {
            name: Some(pod_name(&name, index)),
            namespace: Some(namespace),
            labels: Some(labels),
            annotations: (index == 0).then(scrape_annotations),
            owner_references: Some(vec![owner_reference(training)]),
            finalizers: Some(vec![REPORT_FINALIZER.to_string()]),
            ..Default::default()
        },
        spec: Some(PodSpec {
            hostname: Some(pod_name(&name, index)),
            subdomain: Some(service_name(&name)),
            restart_policy: Some("Never".to_string()),
            enable_service_links: Some(false),
            // The trainer never talks to the API server: no token to steal from a worker.
            automount_service_account_token: Some(false),
            termination_grace_period_seconds: Some(TERMINATION_GRACE_SECONDS),
            priority_class_name: spec.priority_class_name.clone(),
            node_selector: node_selector(training, effective),
            tolerations: tolerations(training, effective),
            affinity: spec.affinity.clone(),
            security_context: Some(PodSecurityContext {
                run_as_non_root: Some(true),
                run_as_user: Some(TRAINER_UID),
                run_as_group: Some(TRAINER_UID),
                fs_group: Some(TRAINER_UID),
                seccomp_profile: Some(SeccompProfile {
                    type_: "RuntimeDefault".to_string(),
                    localhost_profile: None,
                }),
                ..Default::default()
            }),
            init_containers: Some(init_containers),
            containers: vec![trainer],
            volumes: Some(volumes),
            ..Default::default()
        }),
        status: None,
    }
}

/// The dataset volume (if any), the directory `prepare` reads, and the (chars, seed) of a
/// synthetic dataset that `generate` writes first.
fn dataset_input(dataset: &DatasetSpec) -> (Option<Volume>, String, Option<(i64, i64)>) {
    if let Some(pvc) = &dataset.pvc {
        let volume = Volume {
            name: "dataset".to_string(),
            persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                claim_name: pvc.claim_name.clone(),
                read_only: Some(true),
            }),
            ..Default::default()
        };
        let path = pvc.path.as_deref().unwrap_or("").trim_matches('/');
        let dir = if path.is_empty() {
            DATASET_DIR.to_string()
        } else {
            format!("{DATASET_DIR}/{path}")
        };
        (Some(volume), dir, None)
    } else if let Some(cm) = &dataset.config_map {
        let volume = Volume {
            name: "dataset".to_string(),
            config_map: Some(ConfigMapVolumeSource {
                name: cm.name.clone(),
                ..Default::default()
            }),
            ..Default::default()
        };
        (Some(volume), DATASET_DIR.to_string(), None)
    } else {
        // The schema demands exactly one source, so this is `synthetic` (or its defaults).
        let synthetic = dataset.synthetic.clone().unwrap_or_default();
        (
            None,
            format!("{WORK_DIR}/raw"),
            Some((synthetic.chars, synthetic.seed)),
        )
    }
}

/// Prometheus' conventional annotations: rank 0 (in worker 0) alone serves the trainer's `/metrics`.
fn scrape_annotations() -> BTreeMap<String, String> {
    BTreeMap::from([
        ("prometheus.io/scrape".to_string(), "true".to_string()),
        ("prometheus.io/port".to_string(), PROGRESS_PORT.to_string()),
        ("prometheus.io/path".to_string(), METRICS_PATH.to_string()),
    ])
}

/// The user's resources with the GPU count forced from `gpus`; modest CPU defaults on CPU.
fn trainer_resources(user: Option<ResourceRequirements>, gpus: i32) -> ResourceRequirements {
    let mut resources = user.unwrap_or_default();
    if gpus > 0 {
        let count = Quantity(gpus.to_string());
        for map in [&mut resources.limits, &mut resources.requests] {
            map.get_or_insert_with(BTreeMap::new)
                .insert(GPU_RESOURCE.to_string(), count.clone());
        }
    } else {
        for map in [&mut resources.limits, &mut resources.requests] {
            if let Some(m) = map.as_mut() {
                m.remove(GPU_RESOURCE);
            }
        }
        let requests = resources.requests.get_or_insert_with(BTreeMap::new);
        requests
            .entry("cpu".to_string())
            .or_insert_with(|| Quantity("1".to_string()));
        requests
            .entry("memory".to_string())
            .or_insert_with(|| Quantity("2Gi".to_string()));
    }
    resources
}

/// Data preparation needs no GPU: its resources are the trainer's without them.
fn without_gpus(resources: &ResourceRequirements) -> ResourceRequirements {
    let mut r = resources.clone();
    for map in [&mut r.limits, &mut r.requests].into_iter().flatten() {
        map.remove(GPU_RESOURCE);
    }
    r
}

fn node_selector(
    training: &CharLMTraining,
    effective: &EffectiveSettings,
) -> Option<BTreeMap<String, String>> {
    match (&training.spec.node_selector, effective.gpus > 0) {
        (Some(user), _) => Some(user.clone()),
        (None, true) => Some(BTreeMap::from([(
            GPU_PRODUCT_LABEL.to_string(),
            H100_PRODUCT.to_string(),
        )])),
        (None, false) => None,
    }
}

fn tolerations(
    training: &CharLMTraining,
    effective: &EffectiveSettings,
) -> Option<Vec<Toleration>> {
    match (&training.spec.tolerations, effective.gpus > 0) {
        (Some(user), _) => Some(user.clone()),
        (None, true) => Some(vec![Toleration {
            key: Some(GPU_RESOURCE.to_string()),
            operator: Some("Exists".to_string()),
            effect: Some("NoSchedule".to_string()),
            ..Default::default()
        }]),
        (None, false) => None,
    }
}

/// Every container's: what the Pod Security Standard `restricted` asks (with the pod's runAsNonRoot,
/// uid 1000 and seccomp RuntimeDefault), and a read-only root file system.
fn restricted_security_context() -> SecurityContext {
    SecurityContext {
        allow_privilege_escalation: Some(false),
        read_only_root_filesystem: Some(true),
        run_as_non_root: Some(true),
        capabilities: Some(Capabilities {
            drop: Some(vec!["ALL".to_string()]),
            add: None,
        }),
        ..Default::default()
    }
}

fn empty_dir(name: &str, medium: Option<&str>) -> Volume {
    Volume {
        name: name.to_string(),
        empty_dir: Some(EmptyDirVolumeSource {
            medium: medium.map(str::to_string),
            size_limit: None,
        }),
        ..Default::default()
    }
}

fn mount(name: &str, path: &str, read_only: bool) -> VolumeMount {
    VolumeMount {
        name: name.to_string(),
        mount_path: path.to_string(),
        read_only: read_only.then_some(true),
        ..Default::default()
    }
}

fn container_port(name: &str, port: i32) -> ContainerPort {
    ContainerPort {
        name: Some(name.to_string()),
        container_port: port,
        protocol: Some("TCP".to_string()),
        ..Default::default()
    }
}

fn strings(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| s.to_string()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::testing::{cpu_spec, env_of, gpu_spec, pod_of, training};

    #[test]
    fn gpu_worker_follows_the_contract() {
        let t = training(gpu_spec());
        let pod = pod_of(&t, 1, 4);
        assert_eq!(pod.metadata.name.as_deref(), Some("demo-worker-1"));
        let labels = pod.metadata.labels.as_ref().unwrap();
        assert_eq!(labels[WORKER_INDEX_LABEL], "1");
        assert_eq!(labels[ATTEMPT_LABEL], "4");
        let spec = pod.spec.as_ref().unwrap();
        assert_eq!(spec.hostname.as_deref(), Some("demo-worker-1"));
        assert_eq!(spec.subdomain.as_deref(), Some("demo-workers"));
        assert_eq!(spec.restart_policy.as_deref(), Some("Never"));
        assert_eq!(
            spec.node_selector.as_ref().unwrap()[GPU_PRODUCT_LABEL],
            H100_PRODUCT
        );
        let tol = &spec.tolerations.as_ref().unwrap()[0];
        assert_eq!(
            (tol.key.as_deref(), tol.operator.as_deref()),
            (Some(GPU_RESOURCE), Some("Exists"))
        );

        let c = &spec.containers[0];
        assert_eq!(c.name, TRAINER_CONTAINER);
        assert_eq!(c.image.as_deref(), Some("charlm-trainer:test"));
        assert_eq!(
            c.args.as_ref().unwrap().join(" "),
            "launch -- train",
            "the contract's trainer command"
        );
        let r = c.resources.as_ref().unwrap();
        assert_eq!(r.limits.as_ref().unwrap()[GPU_RESOURCE].0, "8");
        assert_eq!(r.requests.as_ref().unwrap()[GPU_RESOURCE].0, "8");

        let env = env_of(&pod);
        assert_eq!(env["NNODES"], "2");
        assert_eq!(env["NODE_RANK"], "1");
        assert_eq!(env["NPROC_PER_NODE"], "8");
        assert_eq!(env["MASTER_ADDR"], "demo-worker-0.demo-workers.team-a.svc");
        assert_eq!(env["MASTER_PORT"], "29500");
        assert_eq!(env["POD_IP"], "from:status.podIP");
        assert_eq!(env["CHARLM_DATA"], "/work/data");
        assert_eq!(env["CHARLM_DEPTH"], "24");
        assert_eq!(env["CHARLM_HOURS"], "2");
        assert_eq!(env["CHARLM_DEVICE"], "cuda");
        assert_eq!(env["CHARLM_CHECKPOINT_DIR"], "/checkpoints");
        assert_eq!(env["CHARLM_TERMINATION_LOG"], "/dev/termination-log");
        assert_eq!(
            env["CHARLM_DEVICE_BATCH_SIZE"], "auto",
            "the trainer probes the GPU"
        );
        assert!(!env.contains_key("CHARLM_EARLY_STOP_PATIENCE"));
        assert!(!env.contains_key("CHARLM_TENSORBOARD_DIR"));
        assert!(
            pod.metadata.annotations.is_none(),
            "only worker 0 serves /metrics"
        );

        // Only worker 0 mounts the checkpoint volume.
        let mounts: Vec<&str> = c
            .volume_mounts
            .iter()
            .flatten()
            .map(|m| m.mount_path.as_str())
            .collect();
        assert_eq!(mounts, ["/work", "/dev/shm", "/tmp"]);
        let shm = spec
            .volumes
            .iter()
            .flatten()
            .find(|v| v.name == "dshm")
            .unwrap();
        assert_eq!(
            shm.empty_dir.as_ref().unwrap().medium.as_deref(),
            Some("Memory")
        );
    }

    #[test]
    fn worker_zero_mounts_checkpoints_and_prepares_from_the_pvc() {
        let pod = pod_of(&training(gpu_spec()), 0, 0);
        let spec = pod.spec.unwrap();
        let c = &spec.containers[0];
        assert!(c
            .volume_mounts
            .iter()
            .flatten()
            .any(|m| m.mount_path == "/checkpoints"));
        let claims: Vec<&str> = spec
            .volumes
            .iter()
            .flatten()
            .filter_map(|v| v.persistent_volume_claim.as_ref())
            .map(|p| p.claim_name.as_str())
            .collect();
        assert_eq!(claims, ["demo-checkpoints", "texts"]);
        let inits = spec.init_containers.unwrap();
        assert_eq!(inits.len(), 1);
        assert_eq!(
            inits[0].args.as_ref().unwrap().join(" "),
            "prepare --input /dataset/corpus/v1 --output /work/data"
        );
        // Preparation gets no GPU.
        let r = inits[0].resources.as_ref().unwrap();
        assert!(!r.limits.as_ref().unwrap().contains_key(GPU_RESOURCE));
        let dataset_mount = inits[0]
            .volume_mounts
            .iter()
            .flatten()
            .find(|m| m.name == "dataset")
            .unwrap();
        assert_eq!(dataset_mount.read_only, Some(true));
    }

    #[test]
    fn cpu_worker_generates_data_and_has_no_gpu_placement() {
        let pod = pod_of(&training(cpu_spec()), 0, 0);
        let env = env_of(&pod);
        assert_eq!(env["CHARLM_DEVICE"], "cpu");
        assert_eq!(env["NPROC_PER_NODE"], "1");
        assert_eq!(env["NNODES"], "1");
        assert_eq!(env["CHARLM_MAX_STEPS"], "50");
        assert!(!env.contains_key("CHARLM_HOURS"));
        let spec = pod.spec.unwrap();
        assert!(spec.node_selector.is_none());
        assert!(spec.tolerations.is_none());
        let r = spec.containers[0].resources.as_ref().unwrap();
        assert!(r.limits.is_none());
        assert_eq!(r.requests.as_ref().unwrap()["cpu"].0, "1");
        let inits = spec.init_containers.unwrap();
        let args: Vec<String> = inits
            .iter()
            .map(|c| c.args.as_ref().unwrap().join(" "))
            .collect();
        assert_eq!(
            args,
            [
                "generate --output /work/raw --chars 20000 --seed 7",
                "prepare --input /work/raw --output /work/data"
            ]
        );
    }

    /// What the Pod Security Standard `restricted` checks, field by field, on every container; and
    /// what we add: no ServiceAccount token, a read-only root with explicit writable volumes.
    #[test]
    fn pods_pass_the_restricted_profile_with_a_read_only_root() {
        for (spec, index) in [(cpu_spec(), 0), (gpu_spec(), 0), (gpu_spec(), 1)] {
            let pod = pod_of(&training(spec), index, 0);
            let spec = pod.spec.unwrap();
            assert_eq!(spec.automount_service_account_token, Some(false));
            let psc = spec.security_context.unwrap();
            assert_eq!(psc.run_as_non_root, Some(true));
            assert_eq!(psc.run_as_user, Some(1000));
            assert_eq!(
                psc.seccomp_profile.map(|p| p.type_).as_deref(),
                Some("RuntimeDefault")
            );
            let allowed = ["emptyDir", "persistentVolumeClaim", "configMap"];
            for v in spec.volumes.iter().flatten() {
                let kind = serde_json::to_value(v).unwrap();
                assert!(
                    allowed.iter().any(|k| kind.get(k).is_some()),
                    "volume {} is of a type restricted refuses",
                    v.name
                );
            }
            for c in spec
                .containers
                .iter()
                .chain(spec.init_containers.iter().flatten())
            {
                let sc = c.security_context.as_ref().unwrap();
                assert_eq!(sc.allow_privilege_escalation, Some(false), "{}", c.name);
                assert_eq!(sc.read_only_root_filesystem, Some(true), "{}", c.name);
                assert_eq!(sc.privileged, None, "{}", c.name);
                let caps = sc.capabilities.as_ref().unwrap();
                assert_eq!(caps.drop.as_deref(), Some(&["ALL".to_string()][..]));
                assert_eq!(caps.add, None);
                assert!(c.ports.iter().flatten().all(|p| p.host_port.is_none()));
                let tmp = c
                    .volume_mounts
                    .iter()
                    .flatten()
                    .find(|m| m.mount_path == "/tmp");
                assert!(
                    tmp.is_some_and(|m| m.read_only.is_none()),
                    "{}: a writable /tmp",
                    c.name
                );
            }
        }
    }

    #[test]
    fn user_overrides_win() {
        let mut spec = gpu_spec();
        spec["gpus"] = 4.into();
        spec["nodeSelector"] = serde_json::json!({"pool": "a100"});
        spec["tolerations"] = serde_json::json!([]);
        spec["env"] = serde_json::json!([{"name": "CHARLM_DEVICE", "value": "auto"}, {"name": "NCCL_DEBUG", "value": "INFO"}]);
        spec["resources"] =
            serde_json::json!({"limits": {"nvidia.com/gpu": "1", "memory": "100Gi"}});
        spec["image"] = "registry.example/trainer:v2".into();
        spec["priorityClassName"] = "high".into();
        spec["dataset"] = serde_json::json!({"configMap": {"name": "tiny"}});
        let pod = pod_of(&training(spec), 0, 0);
        let env = env_of(&pod);
        assert_eq!(env["CHARLM_DEVICE"], "auto");
        assert_eq!(env["NCCL_DEBUG"], "INFO");
        assert_eq!(env["NPROC_PER_NODE"], "4");
        let p = pod.spec.unwrap();
        assert_eq!(p.node_selector.unwrap()["pool"], "a100");
        assert_eq!(p.tolerations.unwrap().len(), 0);
        assert_eq!(p.priority_class_name.as_deref(), Some("high"));
        let c = &p.containers[0];
        assert_eq!(c.image.as_deref(), Some("registry.example/trainer:v2"));
        let limits = c.resources.as_ref().unwrap().limits.clone().unwrap();
        assert_eq!(limits[GPU_RESOURCE].0, "4", "gpus wins over resources");
        assert_eq!(limits["memory"].0, "100Gi");
        let cm = p
            .volumes
            .unwrap()
            .into_iter()
            .find(|v| v.name == "dataset")
            .unwrap();
        assert_eq!(cm.config_map.unwrap().name, "tiny");
    }

    #[test]
    fn a_preset_shapes_the_pods() {
        let mut spec = gpu_spec();
        let obj = spec.as_object_mut().unwrap();
        for field in ["depth", "gpus", "hours"] {
            obj.remove(field);
        }
        spec["preset"] = "budget-1000".into();
        let pod = pod_of(&training(spec.clone()), 0, 0);
        let env = env_of(&pod);
        assert_eq!(env["CHARLM_DEPTH"], "48");
        assert_eq!(env["CHARLM_HOURS"], "31");
        assert_eq!(env["CHARLM_DEVICE_BATCH_SIZE"], "4");
        assert_eq!(
            (env["NNODES"].as_str(), env["NPROC_PER_NODE"].as_str()),
            ("1", "8")
        );
        let limits = pod.spec.as_ref().unwrap().containers[0]
            .resources
            .as_ref()
            .unwrap()
            .limits
            .clone()
            .unwrap();
        assert_eq!(limits[GPU_RESOURCE].0, "8");
        assert_eq!(
            pod.spec.unwrap().node_selector.unwrap()[GPU_PRODUCT_LABEL],
            H100_PRODUCT
        );

        // Explicit fields win.
        spec["depth"] = 12.into();
        spec["deviceBatchSize"] = "auto".into();
        let env = env_of(&pod_of(&training(spec), 0, 0));
        assert_eq!(env["CHARLM_DEPTH"], "12");
        assert_eq!(env["CHARLM_DEVICE_BATCH_SIZE"], "auto");
        assert_eq!(env["CHARLM_HOURS"], "31");
    }

    #[test]
    fn worker_zero_invites_prometheus_to_scrape_its_metrics() {
        let pod = pod_of(&training(gpu_spec()), 0, 0);
        let annotations = pod.metadata.annotations.clone().unwrap();
        assert_eq!(annotations["prometheus.io/scrape"], "true");
        assert_eq!(annotations["prometheus.io/port"], "9090");
        assert_eq!(annotations["prometheus.io/path"], "/metrics");
        let ports = pod.spec.unwrap().containers[0].ports.clone().unwrap();
        assert!(ports
            .iter()
            .any(|p| p.name.as_deref() == Some("metrics") && p.container_port == 9090));
    }
}
