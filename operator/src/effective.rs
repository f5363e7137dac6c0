//! The settings a training runs with: its spec, with the preset's values where the spec leaves
//! fields unset, and the defaults after that. A pure function of the spec, so the stored object
//! stays exactly as the user wrote it while `status.effective` shows what the workers get.
//!
//! The only road from spec to pod: the pods' trainer settings (`resources::env`) and every status
//! figure computed from them (the budget advice's sequence length) read the attempt's effective
//! settings, never the live spec, so a spec edited during an attempt shapes only the next one.
//!
//! The CRD's CEL rules check the same things at `kubectl apply`; the checks here are the safety
//! net for objects the API server stored before those rules existed.

use crate::crd::{CharLMTrainingSpec, DeviceBatchSize, EffectiveSettings};

/// Resolves a spec; the error names the field and the fix.
pub fn resolve(spec: &CharLMTrainingSpec) -> Result<EffectiveSettings, String> {
    let preset = spec.preset.map(|p| p.values());
    let depth = spec.depth.or(preset.map(|p| p.depth)).ok_or(
        "spec.depth is unset and no spec.preset gives one: set spec.depth (1 to 128) or spec.preset (budget-100 or budget-1000)",
    )?;
    let gpus = spec.gpus.or(preset.map(|p| p.gpus)).ok_or(
        "spec.gpus is unset and no spec.preset gives them: set spec.gpus (0 trains on CPUs) or spec.preset (budget-100 or budget-1000)",
    )?;
    let hours = spec.hours.or(preset.map(|p| p.hours));
    if hours.is_none() && spec.max_steps.is_none() {
        return Err(
            "no budget: set spec.hours, spec.maxSteps, or spec.preset (which gives hours)".into(),
        );
    }
    let device_batch_size = spec
        .device_batch_size
        .or(preset.map(|p| DeviceBatchSize::Fixed(p.device_batch_size)))
        .unwrap_or_default();

    let per_node = spec.gpus_per_node.max(1);
    if gpus > per_node && gpus % per_node != 0 {
        return Err(format!(
            "{gpus} GPUs{} are not a multiple of gpusPerNode {per_node}: set spec.gpus to a multiple of it, or spec.gpusPerNode",
            if spec.gpus.is_none() { " (from the preset)" } else { "" }
        ));
    }
    if gpus > 0 && spec.cpu_workers.is_some() {
        return Err(format!(
            "spec.cpuWorkers applies only to CPU training, but the training has {gpus} GPUs: remove cpuWorkers or set gpus: 0"
        ));
    }
    let workers = if gpus == 0 {
        spec.cpu_workers.unwrap_or(1).max(1)
    } else if gpus <= per_node {
        1
    } else {
        gpus / per_node
    };

    if let (Some(total), Some(seq_len)) = (spec.total_batch_size, spec.seq_len) {
        let ranks = if gpus > 0 { gpus } else { workers };
        let micro = match device_batch_size {
            DeviceBatchSize::Fixed(n) => n,
            DeviceBatchSize::Auto => 1,
        };
        let per_step = i64::from(micro) * i64::from(seq_len) * i64::from(ranks);
        if per_step > 0 && total % per_step != 0 {
            return Err(format!(
                "spec.totalBatchSize {total} is not a multiple of deviceBatchSize ({device_batch_size}) x seqLen ({seq_len}) x {ranks} workers = {per_step}: choose a multiple of {per_step}"
            ));
        }
    }

    Ok(EffectiveSettings {
        preset: spec.preset,
        depth,
        gpus,
        gpus_per_node: per_node,
        workers,
        hours,
        max_steps: spec.max_steps,
        device_batch_size,
        early_stop_patience: spec.early_stop.as_ref().map(|e| e.patience),
        tensorboard: spec.tensorboard.unwrap_or(false),
        total_batch_size: spec.total_batch_size,
        seq_len: spec.seq_len,
        eval_every: spec.eval_every,
        seed: spec.seed,
        recipe: spec.recipe,
        precision: spec.precision,
        checkpoint_interval_minutes: spec.checkpoint.interval_minutes,
        keep_checkpoints: spec.checkpoint.keep,
        generation: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::Preset;
    use serde_json::json;

    fn spec(v: serde_json::Value) -> CharLMTrainingSpec {
        let mut base = json!({"dataset": {"synthetic": {}}});
        base.as_object_mut()
            .unwrap()
            .extend(v.as_object().unwrap().clone());
        serde_json::from_value(base).unwrap()
    }

    #[test]
    fn a_preset_fills_every_unset_field() {
        let e = resolve(&spec(json!({"preset": "budget-100"}))).unwrap();
        assert_eq!(e.preset, Some(Preset::Budget100));
        assert_eq!((e.depth, e.gpus, e.workers), (24, 2, 1));
        assert_eq!(e.device_batch_size, DeviceBatchSize::Fixed(8));
        assert_eq!(e.hours, Some(16.0));
        assert_eq!(e.gpus_per_worker(), 2);
        assert_eq!(e.budget_gpu_hours(), Some(32.0));

        let e = resolve(&spec(json!({"preset": "budget-1000"}))).unwrap();
        assert_eq!((e.depth, e.gpus, e.workers), (48, 8, 1));
        assert_eq!(e.device_batch_size, DeviceBatchSize::Fixed(4));
        assert_eq!(e.hours, Some(31.0));
        assert_eq!(e.budget_gpu_hours(), Some(248.0));
    }

    #[test]
    fn explicit_fields_win_over_the_preset() {
        let e = resolve(&spec(json!({
            "preset": "budget-1000", "depth": 32, "gpus": 16, "hours": 2.5,
            "deviceBatchSize": "auto", "maxSteps": 1000
        })))
        .unwrap();
        assert_eq!((e.depth, e.gpus, e.workers), (32, 16, 2));
        assert_eq!(e.device_batch_size, DeviceBatchSize::Auto);
        assert_eq!((e.hours, e.max_steps), (Some(2.5), Some(1000)));
        // A CPU run of a preset's model size.
        let e = resolve(&spec(
            json!({"preset": "budget-100", "gpus": 0, "cpuWorkers": 2}),
        ))
        .unwrap();
        assert_eq!(
            (e.depth, e.gpus, e.workers, e.gpus_per_worker()),
            (24, 0, 2, 0)
        );
        assert_eq!(e.device_batch_size, DeviceBatchSize::Fixed(8));
    }

    #[test]
    fn without_a_preset_the_micro_batch_is_auto() {
        let e = resolve(&spec(json!({"depth": 4, "gpus": 0, "maxSteps": 10}))).unwrap();
        assert_eq!(e.device_batch_size, DeviceBatchSize::Auto);
        assert_eq!((e.hours, e.workers, e.early_stop_patience), (None, 1, None));
        assert!(!e.tensorboard);
        let e = resolve(&spec(json!({
            "depth": 4, "gpus": 0, "maxSteps": 10, "deviceBatchSize": 16,
            "earlyStop": {"patience": 5}, "tensorboard": true
        })))
        .unwrap();
        assert_eq!(e.device_batch_size, DeviceBatchSize::Fixed(16));
        assert_eq!(e.early_stop_patience, Some(5));
        assert!(e.tensorboard);
    }

    #[test]
    fn missing_or_inconsistent_fields_name_the_fix() {
        let err = resolve(&spec(json!({"gpus": 0, "hours": 1}))).unwrap_err();
        assert!(err.contains("spec.depth is unset"), "{err}");
        let err = resolve(&spec(json!({"depth": 2, "hours": 1}))).unwrap_err();
        assert!(err.contains("spec.gpus is unset"), "{err}");
        let err = resolve(&spec(json!({"depth": 2, "gpus": 0}))).unwrap_err();
        assert!(err.contains("no budget"), "{err}");
        let err = resolve(&spec(json!({"preset": "budget-1000", "gpusPerNode": 3}))).unwrap_err();
        assert!(
            err.contains("8 GPUs (from the preset) are not a multiple of gpusPerNode 3"),
            "{err}"
        );
        let err = resolve(&spec(json!({"preset": "budget-100", "cpuWorkers": 2}))).unwrap_err();
        assert!(err.contains("cpuWorkers applies only to CPU"), "{err}");
    }

    #[test]
    fn the_total_batch_must_divide_into_micro_batches() {
        // budget-100: micro-batch 8 on 2 GPUs.
        let ok =
            json!({"preset": "budget-100", "seqLen": 2048, "totalBatchSize": 8 * 2048 * 2 * 4});
        assert!(resolve(&spec(ok)).is_ok());
        let bad = json!({"preset": "budget-100", "seqLen": 2048, "totalBatchSize": 4 * 2048 * 2});
        let err = resolve(&spec(bad)).unwrap_err();
        assert!(err.contains("a multiple of 32768"), "{err}");
        // auto: only seqLen x workers must divide it.
        let auto = json!({"preset": "budget-100", "deviceBatchSize": "auto", "seqLen": 2048, "totalBatchSize": 3 * 2048 * 2});
        assert!(resolve(&spec(auto)).is_ok());
        let cpu = json!({"depth": 2, "gpus": 0, "cpuWorkers": 3, "maxSteps": 5, "seqLen": 100, "totalBatchSize": 500});
        let err = resolve(&spec(cpu)).unwrap_err();
        assert!(err.contains("3 workers = 300"), "{err}");
    }

    #[test]
    fn device_batch_size_reads_numbers_and_auto() {
        let parse = |v: serde_json::Value| serde_json::from_value::<DeviceBatchSize>(v);
        assert_eq!(parse(json!(8)).unwrap(), DeviceBatchSize::Fixed(8));
        assert_eq!(parse(json!("auto")).unwrap(), DeviceBatchSize::Auto);
        assert_eq!(parse(json!("16")).unwrap(), DeviceBatchSize::Fixed(16));
        assert!(parse(json!(0)).is_err());
        assert!(parse(json!("big")).is_err());
        assert_eq!(
            serde_json::to_value(DeviceBatchSize::Auto).unwrap(),
            json!("auto")
        );
        assert_eq!(
            serde_json::to_value(DeviceBatchSize::Fixed(4)).unwrap(),
            json!(4)
        );
    }
}
