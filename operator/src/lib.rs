//! The `charlm-operator`: turns `CharLMTraining` resources into trainer pods, a rendezvous Service and
//! a checkpoint volume, and keeps them in shape. Modules: `crd` (the schema), `preset` and
//! `effective` (what a spec runs with), `resources` (spec → objects), `ownership` (whose an object is), `volume` (the checkpoint claim), `failures` (failure rules), `reconcile` (the decision),
//! `history` (the loss curve of the status), `usage` (GPU-hours and cost), `kueue` and `queueing`
//! (admission by Kueue), `context` (what the API-facing steps share), `controller` (the kube-runtime glue), `leader`, `metrics`.

pub mod conditions;
pub mod context;
pub mod controller;
pub mod crd;
pub mod deadlines;
pub mod effective;
pub mod failures;
pub mod history;
pub mod kueue;
pub mod leader;
pub mod metrics;
pub mod ownership;
pub mod progress;
pub mod queueing;
pub mod reconcile;
pub mod resources;
pub mod usage;
pub mod volume;
pub mod workers;
