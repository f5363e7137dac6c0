//! Where a training's text comes from (`spec.dataset`) and where its checkpoints go
//! (`spec.checkpoint`).

use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kube::KubeSchema;
use serde::{Deserialize, Serialize};

use crate::rules;

/// The training text: `.txt` files, documents separated by a blank line.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("(has(self.pvc) ? 1 : 0) + (has(self.configMap) ? 1 : 0) + (has(self.synthetic) ? 1 : 0) == 1")
    .message("set exactly one of dataset.pvc, dataset.configMap or dataset.synthetic"))]
pub struct DatasetSpec {
    /// A directory of .txt files on an existing PersistentVolumeClaim (mounted read-only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pvc: Option<PvcDataset>,
    /// A ConfigMap whose keys are .txt files (small datasets).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_map: Option<ConfigMapDataset>,
    /// A generated dataset for demos and tests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub synthetic: Option<SyntheticDataset>,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PvcDataset {
    /// Name of the PersistentVolumeClaim in the training's namespace.
    #[schemars(length(min = 1, max = 253))]
    #[x_kube(validation = rules::object_name("dataset.pvc.claimName", "PersistentVolumeClaim", "charlm-texts"))]
    pub claim_name: String,
    /// Directory of the .txt files, relative to the root of the volume.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    #[x_kube(validation = Rule::new("!self.startsWith('/') && !self.contains('..')").message("dataset.pvc.path must be relative to the root of the volume, without '..'"))]
    pub path: Option<String>,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ConfigMapDataset {
    /// Name of the ConfigMap in the training's namespace.
    #[schemars(length(min = 1, max = 253))]
    #[x_kube(validation = rules::object_name("dataset.configMap.name", "ConfigMap", "charlm-texts"))]
    pub name: String,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SyntheticDataset {
    /// Characters of text to generate.
    #[serde(default = "default_synthetic_chars")]
    #[x_kube(validation = Rule::new("self >= 1000 && self <= 2000000000").message("dataset.synthetic.chars must be between 1000 and 2000000000"))]
    pub chars: i64,
    /// Seed of the generator.
    #[serde(default)]
    #[x_kube(validation = Rule::new("self >= 0").message("dataset.synthetic.seed must not be negative"))]
    pub seed: i64,
}

fn default_synthetic_chars() -> i64 {
    1_000_000
}

impl Default for SyntheticDataset {
    fn default() -> Self {
        Self {
            chars: default_synthetic_chars(),
            seed: 0,
        }
    }
}

/// The checkpoint PersistentVolumeClaim, mounted at /checkpoints in worker 0.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = rules::storage_class_fixed())]
pub struct CheckpointSpec {
    /// StorageClass of the checkpoint volume; the cluster default when unset. Fixed at creation
    /// (set, unset or changed alike).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_class_name: Option<String>,
    /// Size of the checkpoint volume. Fixed at creation.
    #[serde(default = "default_checkpoint_size")]
    #[x_kube(
        validation = rules::checkpoint_size(),
        validation = Rule::new("self == oldSelf").message("checkpoint.size cannot change: the checkpoint volume already exists")
    )]
    pub size: Quantity,
    /// Minutes between checkpoints; unset lets the trainer choose.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self > 0.0").message("checkpoint.intervalMinutes must be greater than 0"))]
    pub interval_minutes: Option<f64>,
    /// Rolling checkpoints kept (the best one is kept apart); unset lets the trainer choose.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 1").message("checkpoint.keep must be at least 1"))]
    pub keep: Option<i32>,
    /// Keep the checkpoint volume when the training is deleted.
    #[serde(default)]
    pub retain_on_delete: bool,
}

fn default_checkpoint_size() -> Quantity {
    Quantity("10Gi".to_string())
}

impl Default for CheckpointSpec {
    fn default() -> Self {
        Self {
            storage_class_name: None,
            size: default_checkpoint_size(),
            interval_minutes: None,
            keep: None,
            retain_on_delete: false,
        }
    }
}
