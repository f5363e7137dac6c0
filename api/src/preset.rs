//! Budget presets: named sets of depth, GPUs, micro-batch and hours that fill what a spec leaves
//! unset. This table is the only place their values live: `effective::resolve` fills a spec from
//! it, and the CRD's cross-field CEL rules are written from it (`rules`), so the API server checks
//! a training with a preset exactly as the operator will run it.

use kube::core::Rule;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A budget preset: `budget-100` (depth 24, 2 GPUs, micro-batch 8, 16 hours) or `budget-1000`
/// (depth 48, 8 GPUs, micro-batch 4, 31 hours). It fills depth, gpus, deviceBatchSize and hours
/// where the spec leaves them unset. (The values live in `preset.rs`.) On a ~350 M-character
/// corpus both train 30+ epochs: `status.plan` and `DataConstrained` say so (docs/training.md).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum Preset {
    /// Depth 24, 2 GPUs, micro-batch 8, 16 hours.
    #[serde(rename = "budget-100")]
    Budget100,
    /// Depth 48, 8 GPUs, micro-batch 4, 31 hours.
    #[serde(rename = "budget-1000")]
    Budget1000,
}

/// What a preset gives a training.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PresetValues {
    pub depth: i32,
    pub gpus: i32,
    /// Sequences per GPU per micro-step.
    pub device_batch_size: i32,
    pub hours: f64,
}

impl Preset {
    pub const ALL: [Preset; 2] = [Preset::Budget100, Preset::Budget1000];

    /// The name users write in `spec.preset`.
    pub fn name(self) -> &'static str {
        match self {
            Preset::Budget100 => "budget-100",
            Preset::Budget1000 => "budget-1000",
        }
    }

    pub fn values(self) -> PresetValues {
        match self {
            // About 32 GPU-hours: ~$100 at $3 per GPU-hour.
            Preset::Budget100 => PresetValues {
                depth: 24,
                gpus: 2,
                device_batch_size: 8,
                hours: 16.0,
            },
            // About 250 GPU-hours.
            Preset::Budget1000 => PresetValues {
                depth: 48,
                gpus: 8,
                device_batch_size: 4,
                hours: 31.0,
            },
        }
    }
}

/// The spec's CEL rules that depend on what a preset fills in.
pub mod rules {
    use super::*;

    /// CEL for the value the operator uses: the spec's field `field` when set, else the preset's
    /// value (`value`), else `fallback` when there is no preset.
    fn effective(field: &str, value: impl Fn(PresetValues) -> String, fallback: &str) -> String {
        format!(
            "(has(self.{field}) ? self.{field} : {})",
            from_preset(value, fallback)
        )
    }

    /// CEL for the preset's value, or `fallback` without a preset.
    fn from_preset(value: impl Fn(PresetValues) -> String, fallback: &str) -> String {
        Preset::ALL
            .iter()
            .rev()
            .fold(fallback.to_string(), |rest, p| {
                format!(
                    "((has(self.preset) && self.preset == '{}') ? {} : {rest})",
                    p.name(),
                    value(p.values())
                )
            })
    }

    /// Total GPUs (0 when neither the spec nor a preset says; another rule demands one of them).
    fn gpus() -> String {
        effective("gpus", |v| v.gpus.to_string(), "0")
    }

    /// Worker processes: GPUs, or CPU worker pods when there are none.
    fn workers() -> String {
        let g = gpus();
        format!("({g} > 0 ? {g} : (has(self.cpuWorkers) ? self.cpuWorkers : 1))")
    }

    /// The micro-batch that must divide the total batch: the fixed one, or 1 for `auto` (the trainer
    /// then picks a power of two that divides it).
    fn micro_batch() -> String {
        format!(
            "(has(self.deviceBatchSize) ? (type(self.deviceBatchSize) == int ? self.deviceBatchSize : 1) : {})",
            from_preset(|v| v.device_batch_size.to_string(), "1")
        )
    }

    pub fn depth_required() -> Rule {
        Rule::new("has(self.depth) || has(self.preset)").message(
            "set spec.depth (layers, 1 to 128) or spec.preset (budget-100 or budget-1000), which gives one",
        )
    }

    pub fn gpus_required() -> Rule {
        Rule::new("has(self.gpus) || has(self.preset)").message(
            "set spec.gpus (0 trains on CPUs) or spec.preset (budget-100 or budget-1000), which gives them",
        )
    }

    pub fn budget_required() -> Rule {
        Rule::new("has(self.hours) || has(self.maxSteps) || has(self.preset)").message(
            "set spec.hours (the training budget in hours), spec.maxSteps, or spec.preset, which gives hours",
        )
    }

    pub fn gpus_fill_nodes() -> Rule {
        let g = gpus();
        Rule::new(format!(
            "self.gpusPerNode < 1 || {g} <= self.gpusPerNode || {g} % self.gpusPerNode == 0"
        ))
        .message(
            "gpus must be a multiple of gpusPerNode when above it (e.g. 8, 16 or 32 with gpusPerNode 8), counting a preset's GPUs when gpus is unset: each worker pod takes a whole node",
        )
    }

    pub fn cpu_workers_only_on_cpu() -> Rule {
        Rule::new(format!("!has(self.cpuWorkers) || {} == 0", gpus())).message(
            "cpuWorkers applies only to CPU training (gpus: 0); with GPUs (set or from the preset) the number of worker pods is gpus / gpusPerNode",
        )
    }

    pub fn batch_divides() -> Rule {
        let per_step = format!("({} * self.seqLen * {})", micro_batch(), workers());
        Rule::new(format!(
            "!has(self.totalBatchSize) || !has(self.seqLen) || {per_step} <= 0 || self.totalBatchSize % {per_step} == 0"
        ))
        .message(
            "totalBatchSize (tokens per optimizer step) must be a multiple of deviceBatchSize x seqLen x the number of workers (gpus, or cpuWorkers when gpus is 0), counting the preset's values for unset fields; with deviceBatchSize auto (the default without a preset), of seqLen x workers",
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_match_the_issue() {
        let b100 = Preset::Budget100.values();
        assert_eq!(
            (b100.depth, b100.gpus, b100.device_batch_size, b100.hours),
            (24, 2, 8, 16.0)
        );
        let b1000 = Preset::Budget1000.values();
        assert_eq!(
            (
                b1000.depth,
                b1000.gpus,
                b1000.device_batch_size,
                b1000.hours
            ),
            (48, 8, 4, 31.0)
        );
    }

    #[test]
    fn names_round_trip_through_serde() {
        for p in Preset::ALL {
            let v = serde_json::to_value(p).unwrap();
            assert_eq!(v, p.name());
            assert_eq!(serde_json::from_value::<Preset>(v).unwrap(), p);
        }
        assert!(serde_json::from_value::<Preset>("budget-5".into()).is_err());
    }

    #[test]
    fn rules_read_the_preset_table() {
        let rule = rules::gpus_fill_nodes().rule;
        assert!(
            rule.contains("self.preset == 'budget-100') ? 2 :"),
            "{rule}"
        );
        assert!(
            rule.contains("self.preset == 'budget-1000') ? 8 : 0"),
            "{rule}"
        );
        let batch = rules::batch_divides().rule;
        assert!(
            batch.contains("type(self.deviceBatchSize) == int"),
            "{batch}"
        );
        assert!(batch.contains("'budget-100') ? 8 :"), "{batch}");
    }
}
