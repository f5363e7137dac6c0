//! Leader election on a `coordination.k8s.io` Lease, so that of several replicas exactly one acts.
//!
//! The rules are client-go's: a lease is free when it has no holder, or when its record (holder and
//! renew time) has not changed for `leaseDurationSeconds` as measured by *our* clock since we first
//! saw that record, which makes clock skew between replicas harmless. Every write carries the
//! resourceVersion it read, so two candidates can never both win the same round. A leader that cannot
//! renew within the renew deadline stops acting: the caller exits and Kubernetes restarts it.

use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client};

#[derive(Clone, Debug)]
pub struct LeaseConfig {
    pub name: String,
    pub namespace: String,
    pub identity: String,
    /// How long a lease lasts without renewal before another replica may take it.
    pub lease_duration: Duration,
    /// Give up leadership when no renewal succeeded for this long (shorter than the duration).
    pub renew_deadline: Duration,
    /// Pause between attempts to acquire or renew.
    pub retry_period: Duration,
}

impl LeaseConfig {
    pub fn new(name: &str, namespace: &str, identity: &str, lease_duration: Duration) -> Self {
        LeaseConfig {
            name: name.to_string(),
            namespace: namespace.to_string(),
            identity: identity.to_string(),
            lease_duration,
            renew_deadline: lease_duration * 2 / 3,
            retry_period: (lease_duration / 5).max(Duration::from_millis(200)),
        }
    }
}

/// What a candidate should do about the lease it just read.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// No lease exists: create one naming us.
    Create,
    /// The lease is ours, unheld, or expired: write our name into it.
    Take,
    /// Someone else holds a live lease.
    Wait,
}

/// The last lease record seen and when we first saw it.
#[derive(Debug, Default)]
pub struct Observation {
    record: Option<(Option<String>, Option<MicroTime>)>,
    since: Option<Instant>,
}

/// Decides on a lease read at `now` (our monotonic clock). Pure, so the rules are unit-tested.
pub fn evaluate(
    lease: Option<&Lease>,
    identity: &str,
    default_duration: Duration,
    seen: &mut Observation,
    now: Instant,
) -> Verdict {
    let Some(lease) = lease else {
        return Verdict::Create;
    };
    let spec = lease.spec.clone().unwrap_or_default();
    let holder = spec.holder_identity.clone().filter(|h| !h.is_empty());
    match holder.as_deref() {
        None => return Verdict::Take,
        Some(h) if h == identity => return Verdict::Take,
        _ => {}
    }
    let record = (holder, spec.renew_time.clone());
    if seen.record.as_ref() != Some(&record) {
        seen.record = Some(record);
        seen.since = Some(now);
    }
    let duration = spec
        .lease_duration_seconds
        .and_then(|s| u64::try_from(s).ok())
        .map(Duration::from_secs)
        .unwrap_or(default_duration);
    let since = seen.since.unwrap_or(now);
    if now.duration_since(since) >= duration {
        Verdict::Take
    } else {
        Verdict::Wait
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LeaderError {
    #[error("lost the leader lease {0}: another replica took it or the API server was unreachable for the renew deadline")]
    Lost(String),
}

pub struct LeaderElector {
    api: Api<Lease>,
    config: LeaseConfig,
}

impl LeaderElector {
    pub fn new(client: Client, config: LeaseConfig) -> Self {
        LeaderElector {
            api: Api::namespaced(client, &config.namespace),
            config,
        }
    }

    fn lease_name(&self) -> String {
        format!("{}/{}", self.config.namespace, self.config.name)
    }

    /// Blocks until this replica holds the lease.
    pub async fn acquire(&self) {
        let mut seen = Observation::default();
        let mut waiting_logged = false;
        loop {
            match self.try_acquire(&mut seen).await {
                Ok(true) => {
                    tracing::info!(lease = %self.lease_name(), identity = %self.config.identity, "acquired leadership");
                    return;
                }
                Ok(false) => {
                    if !waiting_logged {
                        tracing::info!(lease = %self.lease_name(), "another replica leads; standing by");
                        waiting_logged = true;
                    }
                }
                Err(err) => {
                    tracing::warn!(lease = %self.lease_name(), error = %err, "could not read or write the leader lease")
                }
            }
            tokio::time::sleep(self.config.retry_period).await;
        }
    }

    async fn try_acquire(&self, seen: &mut Observation) -> Result<bool, kube::Error> {
        let current = self.api.get_opt(&self.config.name).await?;
        match evaluate(
            current.as_ref(),
            &self.config.identity,
            self.config.lease_duration,
            seen,
            Instant::now(),
        ) {
            Verdict::Wait => Ok(false),
            Verdict::Create => {
                let lease = self.lease(None, 0);
                match self.api.create(&PostParams::default(), &lease).await {
                    Ok(_) => Ok(true),
                    Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
                    Err(e) => Err(e),
                }
            }
            Verdict::Take => {
                let current = current.expect("Take is only decided on an existing lease");
                self.write(current, true).await
            }
        }
    }

    /// Renews the lease until it is lost; returns only then. The caller must stop acting.
    pub async fn hold(&self) -> LeaderError {
        let mut last_renew = Instant::now();
        loop {
            tokio::time::sleep(self.config.retry_period).await;
            let renewed = match self.api.get_opt(&self.config.name).await {
                Ok(Some(lease)) => {
                    let holder = lease.spec.as_ref().and_then(|s| s.holder_identity.clone());
                    if holder.as_deref() != Some(self.config.identity.as_str()) {
                        return LeaderError::Lost(self.lease_name());
                    }
                    self.write(lease, false).await.unwrap_or(false)
                }
                Ok(None) => false,
                Err(err) => {
                    tracing::warn!(error = %err, "renewing the leader lease failed");
                    false
                }
            };
            if renewed {
                last_renew = Instant::now();
            } else if last_renew.elapsed() >= self.config.renew_deadline {
                return LeaderError::Lost(self.lease_name());
            }
        }
    }

    /// Gives the lease up so a standby replica takes over at once instead of after it expires.
    pub async fn release(&self) {
        if let Ok(Some(mut lease)) = self.api.get_opt(&self.config.name).await {
            let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
            if spec.holder_identity.as_deref() == Some(self.config.identity.as_str()) {
                spec.holder_identity = None;
                spec.lease_duration_seconds = Some(1);
                spec.renew_time = Some(MicroTime(Timestamp::now()));
                match self
                    .api
                    .replace(&self.config.name, &PostParams::default(), &lease)
                    .await
                {
                    Ok(_) => tracing::info!(lease = %self.lease_name(), "released leadership"),
                    Err(err) => tracing::warn!(error = %err, "could not release the leader lease"),
                }
            }
        }
    }

    /// Writes our name and a fresh renew time into `lease`, guarded by its resourceVersion.
    async fn write(&self, mut lease: Lease, acquiring: bool) -> Result<bool, kube::Error> {
        let previous = lease.spec.clone().unwrap_or_default();
        let ours = previous.holder_identity.as_deref() == Some(self.config.identity.as_str());
        let transitions = previous.lease_transitions.unwrap_or(0) + i32::from(!ours);
        let mut fresh = self.lease(lease.metadata.resource_version.clone(), transitions);
        if ours && !acquiring {
            fresh.spec.as_mut().unwrap().acquire_time = previous.acquire_time;
        }
        lease.spec = fresh.spec;
        match self
            .api
            .replace(&self.config.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
            Err(e) => Err(e),
        }
    }

    fn lease(&self, resource_version: Option<String>, transitions: i32) -> Lease {
        let now = MicroTime(Timestamp::now());
        Lease {
            metadata: ObjectMeta {
                name: Some(self.config.name.clone()),
                namespace: Some(self.config.namespace.clone()),
                resource_version,
                ..Default::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(self.config.identity.clone()),
                lease_duration_seconds: Some(
                    i32::try_from(self.config.lease_duration.as_secs().max(1)).unwrap_or(i32::MAX),
                ),
                acquire_time: Some(now.clone()),
                renew_time: Some(now),
                lease_transitions: Some(transitions),
                ..Default::default()
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(holder: Option<&str>, renew_s: i64, duration_s: i32) -> Lease {
        Lease {
            metadata: ObjectMeta::default(),
            spec: Some(LeaseSpec {
                holder_identity: holder.map(str::to_string),
                renew_time: Some(MicroTime(Timestamp::from_second(renew_s).unwrap())),
                lease_duration_seconds: Some(duration_s),
                ..Default::default()
            }),
        }
    }

    const D: Duration = Duration::from_secs(15);

    #[test]
    fn no_lease_is_created_and_own_or_empty_lease_taken() {
        let mut seen = Observation::default();
        let t = Instant::now();
        assert_eq!(evaluate(None, "me", D, &mut seen, t), Verdict::Create);
        let mine = lease(Some("me"), 1, 15);
        assert_eq!(evaluate(Some(&mine), "me", D, &mut seen, t), Verdict::Take);
        let empty = lease(None, 1, 15);
        assert_eq!(evaluate(Some(&empty), "me", D, &mut seen, t), Verdict::Take);
        let blank = lease(Some(""), 1, 15);
        assert_eq!(evaluate(Some(&blank), "me", D, &mut seen, t), Verdict::Take);
    }

    #[test]
    fn a_live_lease_expires_only_after_its_duration_on_our_clock() {
        let mut seen = Observation::default();
        let t0 = Instant::now();
        let other = lease(Some("other"), 100, 10);
        assert_eq!(
            evaluate(Some(&other), "me", D, &mut seen, t0),
            Verdict::Wait
        );
        let t9 = t0 + Duration::from_secs(9);
        assert_eq!(
            evaluate(Some(&other), "me", D, &mut seen, t9),
            Verdict::Wait
        );
        // The holder renews: the clock starts again.
        let renewed = lease(Some("other"), 108, 10);
        assert_eq!(
            evaluate(Some(&renewed), "me", D, &mut seen, t9),
            Verdict::Wait
        );
        let t18 = t0 + Duration::from_secs(18);
        assert_eq!(
            evaluate(Some(&renewed), "me", D, &mut seen, t18),
            Verdict::Wait
        );
        let t19 = t0 + Duration::from_secs(19);
        assert_eq!(
            evaluate(Some(&renewed), "me", D, &mut seen, t19),
            Verdict::Take
        );
    }

    #[test]
    fn timestamps_from_a_skewed_clock_do_not_matter() {
        // A renew time far in the past (skewed holder clock) is still live until it stops changing.
        let mut seen = Observation::default();
        let t0 = Instant::now();
        let skewed = lease(Some("other"), 1, 10);
        assert_eq!(
            evaluate(Some(&skewed), "me", D, &mut seen, t0),
            Verdict::Wait
        );
    }
}
