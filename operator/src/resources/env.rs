//! The trainer's environment in a worker pod: the contract's variables (docs/contract.md) from the
//! settings the attempt runs with, then the user's `spec.env`, which wins over any of the same name.

use k8s_openapi::api::core::v1::{EnvVar, EnvVarSource, ObjectFieldSelector};

use super::{
    master_addr, CHECKPOINT_DIR, PROGRESS_PORT, RENDEZVOUS_PORT, TENSORBOARD_DIR, TERMINATION_LOG,
    WORK_DIR,
};
use crate::crd::{CharLMTraining, EffectiveSettings};
use charlm_contract::env;

/// The contract's environment (docs/contract.md); `spec.env` wins over any variable of the same name.
pub(super) fn trainer_env(
    training: &CharLMTraining,
    effective: &EffectiveSettings,
    name: &str,
    namespace: &str,
    index: i32,
) -> Vec<EnvVar> {
    let gpus = effective.gpus_per_worker();
    let mut env = vec![
        value(env::NNODES, effective.workers),
        value(env::NODE_RANK, index),
        value(env::NPROC_PER_NODE, if gpus > 0 { gpus } else { 1 }),
        value(env::MASTER_ADDR, master_addr(name, namespace)),
        value(env::MASTER_PORT, RENDEZVOUS_PORT),
        EnvVar {
            name: env::POD_IP.to_string(),
            value: None,
            value_from: Some(EnvVarSource {
                field_ref: Some(ObjectFieldSelector {
                    field_path: "status.podIP".to_string(),
                    api_version: None,
                }),
                ..Default::default()
            }),
        },
        value(env::DATA, format!("{WORK_DIR}/data")),
        value(env::DEPTH, effective.depth),
        value(env::DEVICE_BATCH_SIZE, effective.device_batch_size),
        value(env::DEVICE, if gpus > 0 { "cuda" } else { "cpu" }),
        value(env::CHECKPOINT_DIR, CHECKPOINT_DIR),
        value(env::METRICS_PORT, PROGRESS_PORT),
        value(env::TERMINATION_LOG, TERMINATION_LOG),
    ];
    let optional = [
        (env::HOURS, effective.hours.map(|v| v.to_string())),
        (env::MAX_STEPS, effective.max_steps.map(|v| v.to_string())),
        (
            env::TOTAL_BATCH_SIZE,
            effective.total_batch_size.map(|v| v.to_string()),
        ),
        (env::SEQ_LEN, effective.seq_len.map(|v| v.to_string())),
        (env::EVAL_EVERY, effective.eval_every.map(|v| v.to_string())),
        (env::SEED, effective.seed.map(|v| v.to_string())),
        (
            env::CHECKPOINT_EVERY_MINUTES,
            effective.checkpoint_interval_minutes.map(|v| v.to_string()),
        ),
        (
            env::KEEP_CHECKPOINTS,
            effective.keep_checkpoints.map(|v| v.to_string()),
        ),
        (
            env::EARLY_STOP_PATIENCE,
            effective.early_stop_patience.map(|v| v.to_string()),
        ),
        (
            env::TENSORBOARD_DIR,
            effective.tensorboard.then(|| TENSORBOARD_DIR.to_string()),
        ),
        (env::RECIPE, effective.recipe.map(|r| r.name().to_string())),
        (
            env::PRECISION,
            effective.precision.map(|p| p.name().to_string()),
        ),
    ];
    env.extend(
        optional
            .into_iter()
            .filter_map(|(name, v)| v.map(|v| value(name, v))),
    );
    // The user's variables are the pod's, not trainer settings: the live spec's.
    for user in training.spec.env.iter().flatten() {
        match env.iter_mut().find(|e| e.name == user.name) {
            Some(existing) => *existing = user.clone(),
            None => env.push(user.clone()),
        }
    }
    env
}

pub(super) fn value(name: &str, v: impl ToString) -> EnvVar {
    EnvVar {
        name: name.to_string(),
        value: Some(v.to_string()),
        value_from: None,
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{env_of, pod_of, settings};
    use crate::resources::testing::{cpu_spec, gpu_spec, training};
    use charlm_contract::env;

    /// Every variable the operator sets is either reserved (the CRD refuses it in spec.env) or
    /// named as one a user may replace: a new variable cannot be forgotten in the rule.
    #[test]
    fn every_operator_variable_is_reserved_or_overridable() {
        let mut spec = gpu_spec();
        spec["gpus"] = 4.into();
        spec["hours"] = 2.0.into();
        spec["maxSteps"] = 10.into();
        spec["totalBatchSize"] = 8192.into();
        spec["seqLen"] = 256.into();
        spec["evalEvery"] = 5.into();
        spec["seed"] = 1.into();
        spec["earlyStop"] = serde_json::json!({"patience": 3});
        spec["tensorboard"] = true.into();
        spec["checkpoint"] = serde_json::json!({"intervalMinutes": 5.0, "keep": 2});
        let pod = pod_of(&training(spec), 1, 0);
        let names: Vec<String> = pod.spec.unwrap().containers[0]
            .env
            .iter()
            .flatten()
            .map(|e| e.name.clone())
            .collect();
        assert!(names.len() >= 20, "{names:?}");
        for name in &names {
            assert!(
                env::RESERVED.contains(&name.as_str()) || env::OVERRIDABLE.contains(&name.as_str()),
                "{name} is set by the operator but neither reserved nor overridable"
            );
        }
    }

    #[test]
    fn early_stop_and_tensorboard_reach_the_trainer() {
        let mut spec = cpu_spec();
        spec["earlyStop"] = serde_json::json!({"patience": 4});
        spec["tensorboard"] = true.into();
        spec["deviceBatchSize"] = 16.into();
        let env = env_of(&pod_of(&training(spec), 0, 0));
        assert_eq!(env["CHARLM_EARLY_STOP_PATIENCE"], "4");
        assert_eq!(env["CHARLM_TENSORBOARD_DIR"], "/checkpoints/tensorboard");
        assert_eq!(env["CHARLM_DEVICE_BATCH_SIZE"], "16");
        assert!(
            !env.contains_key("CHARLM_RECIPE"),
            "unset: the trainer's default"
        );
        assert!(
            !env.contains_key("CHARLM_PRECISION"),
            "unset: the trainer's default"
        );
    }

    #[test]
    fn the_recipe_and_a_disabled_early_stop_reach_the_trainer() {
        let mut spec = cpu_spec();
        spec["recipe"] = "nanochat-2025".into();
        spec["earlyStop"] = serde_json::json!({"patience": 0});
        let env = env_of(&pod_of(&training(spec), 0, 0));
        assert_eq!(env["CHARLM_RECIPE"], "nanochat-2025");
        assert_eq!(env["CHARLM_EARLY_STOP_PATIENCE"], "0");
    }

    #[test]
    fn the_attempts_settings_reach_the_trainer_not_the_spec_edited_since() {
        // Issue 32: the sequence length, batch, cadence, seed and recipe came from the live spec,
        // so a gang made after an edit mixed the attempt's settings with the new spec's.
        let started = training(serde_json::json!({
            "depth": 2, "gpus": 0, "maxSteps": 50, "seqLen": 512, "totalBatchSize": 4096,
            "evalEvery": 25, "seed": 7, "recipe": "nanochat-2025", "precision": "bf16",
            "checkpoint": {"intervalMinutes": 5.0, "keep": 3},
            "dataset": {"synthetic": {"chars": 20000}}
        }));
        let attempt = crate::effective::resolve(&started.spec).unwrap();
        let mut edited = started.clone();
        edited.spec.seq_len = Some(1024);
        edited.spec.total_batch_size = Some(8192);
        edited.spec.eval_every = Some(50);
        edited.spec.seed = Some(8);
        edited.spec.recipe = None;
        edited.spec.precision = None;
        edited.spec.checkpoint.interval_minutes = Some(10.0);
        edited.spec.checkpoint.keep = Some(5);
        let pod = crate::resources::worker_pod(&edited, &attempt, 0, 0, &settings());
        let env = env_of(&pod);
        for (name, value) in [
            (env::SEQ_LEN, "512"),
            (env::TOTAL_BATCH_SIZE, "4096"),
            (env::EVAL_EVERY, "25"),
            (env::SEED, "7"),
            (env::RECIPE, "nanochat-2025"),
            (env::PRECISION, "bf16"),
            (env::CHECKPOINT_EVERY_MINUTES, "5"),
            (env::KEEP_CHECKPOINTS, "3"),
        ] {
            assert_eq!(env.get(name).map(String::as_str), Some(value), "{name}");
        }
    }

    #[test]
    fn the_precision_reaches_the_trainer() {
        let mut spec = gpu_spec();
        spec["precision"] = "fp8".into();
        let env = env_of(&pod_of(&training(spec), 0, 0));
        assert_eq!(env["CHARLM_PRECISION"], "fp8");
    }
}
