//! The short-lived pods of `sample` and `export`: the trainer image with the training's checkpoint
//! claim mounted read-only, and what must hold before one is worth starting. Pure: the training,
//! worker 0 and the claim are read by the caller.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Affinity, Capabilities, Container, EmptyDirVolumeSource, NodeAffinity, NodeSelector,
    NodeSelectorRequirement, NodeSelectorTerm, PersistentVolumeClaim,
    PersistentVolumeClaimVolumeSource, Pod, PodSecurityContext, PodSpec, ResourceRequirements,
    SeccompProfile, SecurityContext, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::ObjectMeta;
use kube::{Resource, ResourceExt};

use charlm_api::names::{pvc_name, TRAINER_CONTAINER};
use charlm_api::CharLMTraining;

/// Where the claim is mounted: the same path as in worker 0, so the status' checkpoint paths
/// (`/checkpoints/step-…`) mean the same files here.
pub const CHECKPOINT_DIR: &str = "/checkpoints";
/// The user of the trainer image, who wrote the checkpoints.
const TRAINER_UID: i64 = 1000;
/// Labels of the helper pods. Not the operator's `charlm.dev/training`: it would take them for
/// workers of the training.
pub const HELPER_LABEL: &str = "charlm.dev/helper-of";
pub const APP_LABEL: &str = "app.kubernetes.io/name";
pub const APP: &str = "kubectl-charlm";

/// The checkpoint `sample` or `export` reads, known from the status before any pod starts.
#[derive(Debug, PartialEq)]
pub enum Wanted {
    /// `best/`, or the newest checkpoint while there is no best (what `charlm-trainer sample
    /// --checkpoint /checkpoints` picks).
    BestOrLatest,
    /// `best/` only.
    Best,
}

/// The claim's name if the status says a checkpoint of the wanted kind exists; otherwise what is
/// missing and what to do.
pub fn checkpoint_claim(training: &CharLMTraining, wanted: Wanted) -> Result<String, String> {
    let name = training.name_any();
    let st = training.status.clone().unwrap_or_default();
    let has_best = st.best_val_bpc.is_some();
    let has_any = has_best || st.latest_checkpoint.is_some();
    let ok = match wanted {
        Wanted::Best => has_best,
        Wanted::BestOrLatest => has_any,
    };
    if !ok {
        let phase = st.phase.map_or("no status yet", |p| p.as_str());
        return Err(if has_any {
            format!(
                "{name} has no best checkpoint yet (phase {phase}; newest checkpoint {}): best/ is \
                 written at the first validation (spec.evalEvery steps); wait for it (`kubectl \
                 charlm status {name}` shows `best`)",
                st.latest_checkpoint.as_deref().unwrap_or("?")
            )
        } else {
            format!(
                "{name} has no checkpoint yet (phase {phase}): the trainer writes one every \
                 spec.checkpoint.intervalMinutes and at each new best validation bpc; wait for \
                 one (`kubectl charlm status {name}` shows `checkpoint`)"
            )
        });
    }
    Ok(st.checkpoint_pvc.unwrap_or_else(|| pvc_name(&name)))
}

/// Refuses a claim that is gone or going.
pub fn claim_usable(
    training: &str,
    claim: &str,
    pvc: Option<&PersistentVolumeClaim>,
) -> Result<(), String> {
    let retain = "spec.checkpoint.retainOnDelete: true keeps it when a training is deleted";
    match pvc {
        None => Err(format!(
            "the checkpoint claim {claim} of {training} is gone: its checkpoints went with it and \
             there is nothing to read ({retain})"
        )),
        Some(p) if p.metadata.deletion_timestamp.is_some() => Err(format!(
            "the checkpoint claim {claim} of {training} is being deleted: its checkpoints are \
             going and cannot be read ({retain})"
        )),
        Some(_) => Ok(()),
    }
}

/// The trainer image: `--image`, else worker 0's, else `spec.image`; the operator's default
/// image is its own flag, which the plugin cannot see.
pub fn trainer_image(
    flag: Option<&str>,
    training: &CharLMTraining,
    worker0: Option<&Pod>,
) -> Result<String, String> {
    let from_pod = worker0
        .and_then(|p| p.spec.as_ref())
        .and_then(|s| s.containers.iter().find(|c| c.name == TRAINER_CONTAINER))
        .and_then(|c| c.image.clone());
    flag.map(str::to_string)
        .or(from_pod)
        .or_else(|| training.spec.image.clone())
        .ok_or_else(|| {
            format!(
                "cannot tell the trainer image of {}: it has no worker pod left and no spec.image; \
                 pass --image (the chart's trainerImage, e.g. charlm-trainer:0.1.0)",
                training.name_any()
            )
        })
}

/// What the helper pod does.
pub struct Job {
    /// `sample` or `export`: the container's name and part of the pod's.
    pub kind: &'static str,
    pub image: String,
    pub command: Vec<String>,
    /// The pod's `activeDeadlineSeconds`: a plugin killed midway leaves nothing running longer.
    pub deadline_seconds: i64,
}

/// The helper pod of `job` for `training`, reading `claim`. Owned by the training, so that it goes
/// with it; on worker 0's node when that pod holds the claim (a ReadWriteOnce volume attaches to
/// one node only), with worker 0's tolerations to be allowed there.
pub fn pod(training: &CharLMTraining, claim: &str, job: Job, worker0: Option<&Pod>) -> Pod {
    let name = training.name_any();
    let node = worker0
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .and_then(|p| p.spec.as_ref())
        .and_then(|s| s.node_name.clone());
    let tolerations = worker0
        .and_then(|p| p.spec.as_ref())
        .and_then(|s| s.tolerations.clone());
    let affinity = node.map(|node| Affinity {
        node_affinity: Some(NodeAffinity {
            required_during_scheduling_ignored_during_execution: Some(NodeSelector {
                node_selector_terms: vec![NodeSelectorTerm {
                    match_fields: Some(vec![NodeSelectorRequirement {
                        key: "metadata.name".into(),
                        operator: "In".into(),
                        values: Some(vec![node]),
                    }]),
                    ..Default::default()
                }],
            }),
            ..Default::default()
        }),
        ..Default::default()
    });
    let labels = BTreeMap::from([
        (APP_LABEL.to_string(), APP.to_string()),
        (
            "app.kubernetes.io/component".to_string(),
            job.kind.to_string(),
        ),
        (HELPER_LABEL.to_string(), name.clone()),
    ]);
    let quantity = |q: &str| Quantity(q.to_string());
    let container = Container {
        name: job.kind.to_string(),
        image: Some(job.image),
        command: Some(job.command),
        resources: Some(ResourceRequirements {
            requests: Some(BTreeMap::from([
                ("cpu".to_string(), quantity("500m")),
                ("memory".to_string(), quantity("512Mi")),
            ])),
            ..Default::default()
        }),
        volume_mounts: Some(vec![
            VolumeMount {
                name: "checkpoints".into(),
                mount_path: CHECKPOINT_DIR.into(),
                read_only: Some(true),
                ..Default::default()
            },
            VolumeMount {
                name: "tmp".into(),
                mount_path: "/tmp".into(),
                ..Default::default()
            },
        ]),
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            run_as_non_root: Some(true),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".into()]),
                add: None,
            }),
            ..Default::default()
        }),
        ..Default::default()
    };
    Pod {
        metadata: ObjectMeta {
            generate_name: Some(format!("{name}-{}-", job.kind)),
            namespace: training.namespace(),
            labels: Some(labels),
            owner_references: owner(training).map(|o| vec![o]),
            ..Default::default()
        },
        spec: Some(PodSpec {
            restart_policy: Some("Never".into()),
            active_deadline_seconds: Some(job.deadline_seconds),
            automount_service_account_token: Some(false),
            enable_service_links: Some(false),
            termination_grace_period_seconds: Some(1),
            affinity,
            tolerations,
            // No fsGroup: the volume is read-only and its files are already the trainer user's.
            security_context: Some(PodSecurityContext {
                run_as_non_root: Some(true),
                run_as_user: Some(TRAINER_UID),
                run_as_group: Some(TRAINER_UID),
                seccomp_profile: Some(SeccompProfile {
                    type_: "RuntimeDefault".into(),
                    localhost_profile: None,
                }),
                ..Default::default()
            }),
            containers: vec![container],
            volumes: Some(vec![
                Volume {
                    name: "checkpoints".into(),
                    persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                        claim_name: claim.to_string(),
                        read_only: Some(true),
                    }),
                    ..Default::default()
                },
                Volume {
                    name: "tmp".into(),
                    empty_dir: Some(EmptyDirVolumeSource::default()),
                    ..Default::default()
                },
            ]),
            ..Default::default()
        }),
        status: None,
    }
}

/// A plain (not controller) owner reference: the operator alone controls the training's objects.
fn owner(training: &CharLMTraining) -> Option<OwnerReference> {
    let mut o = training.controller_owner_ref(&())?;
    o.controller = None;
    o.block_owner_deletion = None;
    Some(o)
}

/// `charlm-trainer sample` on the claim, on the CPU: a pod without a GPU request may still see
/// the node's GPUs through the image's environment, and those belong to the training.
pub fn sample_command(prompt: &str, max_tokens: u32, temperature: f64, seed: u64) -> Vec<String> {
    [
        "charlm-trainer",
        "sample",
        "--checkpoint",
        CHECKPOINT_DIR,
        "--device",
        "cpu",
        "--prompt",
        prompt,
        "--max-tokens",
        &max_tokens.to_string(),
        "--temperature",
        &temperature.to_string(),
        "--seed",
        &seed.to_string(),
    ]
    .map(str::to_string)
    .to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn training(status: serde_json::Value) -> CharLMTraining {
        serde_json::from_value(json!({
            "apiVersion": "charlm.dev/v1alpha1", "kind": "CharLMTraining",
            "metadata": {"name": "demo", "namespace": "team-a", "uid": "u-1"},
            "spec": {"depth": 4, "gpus": 0, "maxSteps": 10, "dataset": {"synthetic": {}}},
            "status": status,
        }))
        .unwrap()
    }

    #[test]
    fn no_checkpoint_yet_says_so_and_what_to_wait_for() {
        let t = training(json!({"phase": "Running"}));
        let err = checkpoint_claim(&t, Wanted::BestOrLatest).unwrap_err();
        assert!(
            err.starts_with("demo has no checkpoint yet (phase Running)"),
            "{err}"
        );
        assert!(err.contains("kubectl charlm status demo"), "{err}");
        let err = checkpoint_claim(&t, Wanted::Best).unwrap_err();
        assert!(err.starts_with("demo has no checkpoint yet"), "{err}");
    }

    #[test]
    fn a_latest_checkpoint_serves_sample_but_not_export_of_best() {
        let t = training(json!({
            "phase": "Running", "latestCheckpoint": "/checkpoints/step-000000020",
            "checkpointPvc": "demo-checkpoints"
        }));
        assert_eq!(
            checkpoint_claim(&t, Wanted::BestOrLatest).unwrap(),
            "demo-checkpoints"
        );
        let err = checkpoint_claim(&t, Wanted::Best).unwrap_err();
        assert!(err.starts_with("demo has no best checkpoint yet"), "{err}");
        assert!(err.contains("step-000000020"), "{err}");
        let t = training(json!({"bestValBpc": 2.5}));
        assert_eq!(
            checkpoint_claim(&t, Wanted::Best).unwrap(),
            "demo-checkpoints",
            "the claim's name without a status field is the operator's"
        );
    }

    #[test]
    fn a_claim_gone_or_going_is_refused() {
        let err = claim_usable("demo", "demo-checkpoints", None).unwrap_err();
        assert!(
            err.starts_with("the checkpoint claim demo-checkpoints of demo is gone"),
            "{err}"
        );
        let going: PersistentVolumeClaim = serde_json::from_value(json!({
            "metadata": {"name": "demo-checkpoints", "deletionTimestamp": "2026-12-03T10:00:00Z"}
        }))
        .unwrap();
        let err = claim_usable("demo", "demo-checkpoints", Some(&going)).unwrap_err();
        assert!(err.contains("is being deleted"), "{err}");
        let fine = PersistentVolumeClaim::default();
        assert!(claim_usable("demo", "demo-checkpoints", Some(&fine)).is_ok());
    }

    fn worker0() -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": "demo-worker-0"},
            "spec": {
                "nodeName": "gpu-7",
                "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
                "containers": [
                    {"name": "sidecar", "image": "other:1"},
                    {"name": "trainer", "image": "registry/charlm-trainer:abc"}
                ]
            }
        }))
        .unwrap()
    }

    #[test]
    fn the_image_comes_from_the_flag_then_worker_0_then_the_spec() {
        let mut t = training(json!({}));
        let w = worker0();
        assert_eq!(
            trainer_image(Some("mine:1"), &t, Some(&w)).unwrap(),
            "mine:1"
        );
        assert_eq!(
            trainer_image(None, &t, Some(&w)).unwrap(),
            "registry/charlm-trainer:abc"
        );
        let err = trainer_image(None, &t, None).unwrap_err();
        assert!(err.contains("pass --image"), "{err}");
        t.spec.image = Some("spec:2".into());
        assert_eq!(trainer_image(None, &t, None).unwrap(), "spec:2");
    }

    #[test]
    fn the_helper_pod_reads_the_claim_on_worker_0s_node_and_goes_with_the_training() {
        let t = training(json!({}));
        let w = worker0();
        let job = Job {
            kind: "sample",
            image: "img:1".into(),
            command: sample_command("12+3", 40, 0.5, 7),
            deadline_seconds: 300,
        };
        let p = serde_json::to_value(pod(&t, "demo-checkpoints", job, Some(&w))).unwrap();
        assert_eq!(p["metadata"]["generateName"], "demo-sample-");
        assert_eq!(p["metadata"]["namespace"], "team-a");
        assert_eq!(p["metadata"]["labels"][HELPER_LABEL], "demo");
        assert!(
            p["metadata"]["labels"].get("charlm.dev/training").is_none(),
            "the operator must not count it among the workers"
        );
        let owner = &p["metadata"]["ownerReferences"][0];
        assert_eq!(
            (&owner["kind"], &owner["uid"]),
            (&json!("CharLMTraining"), &json!("u-1"))
        );
        assert!(owner.get("controller").is_none());
        let spec = &p["spec"];
        assert_eq!(spec["activeDeadlineSeconds"], 300);
        assert_eq!(spec["restartPolicy"], "Never");
        assert_eq!(
            spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
                ["nodeSelectorTerms"][0]["matchFields"][0]["values"][0],
            "gpu-7"
        );
        assert_eq!(spec["tolerations"][0]["key"], "nvidia.com/gpu");
        assert_eq!(
            spec["volumes"][0]["persistentVolumeClaim"]["claimName"],
            "demo-checkpoints"
        );
        assert_eq!(
            spec["volumes"][0]["persistentVolumeClaim"]["readOnly"],
            true
        );
        let c = &spec["containers"][0];
        assert_eq!(c["image"], "img:1");
        assert_eq!(c["volumeMounts"][0]["mountPath"], "/checkpoints");
        assert_eq!(c["volumeMounts"][0]["readOnly"], true);
        assert_eq!(
            c["command"],
            json!([
                "charlm-trainer",
                "sample",
                "--checkpoint",
                "/checkpoints",
                "--device",
                "cpu",
                "--prompt",
                "12+3",
                "--max-tokens",
                "40",
                "--temperature",
                "0.5",
                "--seed",
                "7"
            ])
        );
        let free = serde_json::to_value(pod(
            &t,
            "c",
            Job {
                kind: "export",
                image: "i".into(),
                command: vec![],
                deadline_seconds: 1,
            },
            None,
        ))
        .unwrap();
        assert!(
            free["spec"].get("affinity").is_none(),
            "without worker 0 it goes anywhere"
        );
    }
}
