//! A stand-in for the kubelet, for tests only: no Docker engine exists on the project's machines,
//! so the e2e control plane's CPU nodes can be run by this instead of kwok, and then their pods
//! really run, as local processes. It registers its nodes and keeps them Ready (Lease and status),
//! watches the pods bound to them, and for each pod: gives it a loopback address of its own
//! (127.0.0.N, reported as podIP), a hosts file that resolves pods behind headless Services,
//! directories for its volumes (a claim's directory outlives the pod), runs its init containers
//! in order and then its containers (command, args, env with the downward API, workingDir) in a
//! private mount namespace where the volumes appear at their container paths, reports
//! Pending → Running → Succeeded/Failed with exit codes and termination messages, and on deletion
//! sends SIGTERM, then SIGKILL after the grace period, and removes the pod.
//!
//! What it is not: a container runtime. Images are not pulled: an image stands for a program of
//! that name in `--image-bin-dir`; processes run as root on the host's network and file system
//! (only the mounts differ), with no resource limits, probes, `kubectl logs`/`exec`, or service
//! IPs. Logs are files under the state directory (`pods/<ns>_<name>_<uid>/logs/<container>.log`).

pub mod hosts;
pub mod ips;
pub mod kubelet;
pub mod launch;
pub mod node;
pub mod pod;
pub mod process;
pub mod quantity;
pub mod sandbox;
pub mod status;
pub mod volumes;
