//! The `charlm-operator`: turns `CharLMTraining` resources into trainer pods, a rendezvous Service and
//! a checkpoint volume, and keeps them in shape. Its modules, by job:
//!
//! - The API: `crd` (the schema: spec, status, condition and reason names), `preset` (budget
//!   presets), `rules` (the CRD's CEL rules).
//! - What a spec runs with: `effective` (spec + preset + defaults → the effective settings).
//! - Facts, read into plain data: `workers` (a pod → a worker's state), `nodes` (is a worker's node
//!   lost?), `ownership` (whose an object is), `progress` (rank 0's report: into the status, and
//!   its HTTP poller).
//! - The decision, pure: `decision` (observed facts → pods to create or delete and the status; a
//!   room per policy), with `failures` (why a worker ended and what its rule says), `volume` (the
//!   checkpoint claim), `kueue` (Kueue's word as a gate), `deadlines` (the deadline and TTL
//!   clocks), `conditions`, `history` (the loss curve), `usage` (GPU-hours and cost).
//! - Objects from the spec: `resources` (pods, their environment, Service, NetworkPolicy, claim).
//! - I/O: `controller` (the kube-runtime glue: gathers the facts, carries out the decision, tells
//!   it in Events), `queueing` (Kueue's Workload), `context` (what the API-facing steps share),
//!   `leader` (leader election), `metrics` (the operator's own metrics and health endpoints).

pub mod conditions;
pub mod context;
pub mod controller;
pub mod crd;
pub mod deadlines;
pub mod decision;
pub mod effective;
pub mod failures;
pub mod history;
pub mod kueue;
pub mod leader;
pub mod metrics;
pub mod nodes;
pub mod ownership;
pub mod progress;
pub mod queueing;
pub mod resources;
pub mod usage;
pub mod volume;
pub mod workers;
