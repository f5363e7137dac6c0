//! The `charlm-operator`: turns `CharLMTraining` resources into trainer pods, a rendezvous Service and
//! a checkpoint volume, and keeps them in shape. Modules: `crd` (the schema), `resources` (spec →
//! objects), `reconcile` (the decision), `controller` (the kube-runtime glue), `leader`, `metrics`.

pub mod conditions;
pub mod controller;
pub mod crd;
pub mod leader;
pub mod metrics;
pub mod progress;
pub mod reconcile;
pub mod resources;
pub mod workers;
