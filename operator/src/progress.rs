//! The trainer's own reports (docs/contract.md): the `/progress` JSON of rank 0 while it runs, and
//! the same object plus `complete` in its termination message when it exits. The trainer speaks
//! snake_case; the API speaks camelCase, so the wire type here is converted at the boundary.

use std::time::Duration;

use crate::crd::ProgressStatus;

/// One report of rank 0, exactly as the trainer writes it: the contract crate's type.
pub use charlm_contract::ProgressReport as TrainerReport;

/// The API's camelCase copy of a report. Destructured field by field, so that a field added to
/// the contract does not compile until the status says what becomes of it.
impl From<&TrainerReport> for ProgressStatus {
    fn from(report: &TrainerReport) -> Self {
        let TrainerReport {
            step,
            total_steps_estimate,
            tokens,
            epoch,
            train_loss,
            val_bpc,
            best_val_bpc,
            best_step,
            tokens_per_s,
            mfu,
            elapsed_s,
            eta_s,
            checkpoint,
            world_size,
            peak_memory_gib,
            tokens_per_epoch,
            complete,
            stop_reason,
            // Read by the reconciler for failure messages; not part of the status.
            error: _,
        } = report;
        let finite = |v: &Option<f64>| v.filter(|v| v.is_finite());
        ProgressStatus {
            step: *step,
            total_steps_estimate: *total_steps_estimate,
            tokens: i64::try_from(*tokens).unwrap_or(i64::MAX),
            epoch: *epoch,
            train_loss: finite(train_loss),
            val_bpc: finite(val_bpc),
            best_val_bpc: finite(best_val_bpc),
            best_step: *best_step,
            tokens_per_s: finite(tokens_per_s),
            mfu: finite(mfu),
            elapsed_s: *elapsed_s,
            eta_s: finite(eta_s),
            checkpoint: checkpoint.clone(),
            world_size: i64::try_from(*world_size).unwrap_or(i64::MAX),
            peak_memory_gib: finite(peak_memory_gib),
            tokens_per_epoch: tokens_per_epoch.map(|t| i64::try_from(t).unwrap_or(i64::MAX)),
            complete: *complete,
            stop_reason: stop_reason.clone(),
            observed_time: None,
        }
    }
}

/// `3h05m`, `12m`, `40s`: the ETA column of `kubectl get clt`.
pub fn human_duration(seconds: f64) -> String {
    if !seconds.is_finite() || seconds < 0.0 {
        return "-".to_string();
    }
    let s = seconds.round() as u64;
    let (h, m) = (s / 3600, (s % 3600) / 60);
    if h >= 48 {
        format!("{}d{}h", h / 24, h % 24)
    } else if h > 0 {
        format!("{h}h{m:02}m")
    } else if m > 0 {
        format!("{m}m")
    } else {
        format!("{s}s")
    }
}

/// Reads rank 0's `/progress`. Any failure is `None`: progress is informative, never a reason to
/// fail a reconcile.
#[derive(Clone)]
pub struct ProgressClient {
    http: reqwest::Client,
}

impl ProgressClient {
    pub fn new(timeout: Duration) -> anyhow::Result<Self> {
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            .no_proxy()
            .build()?;
        Ok(Self { http })
    }

    pub async fn fetch(&self, pod_ip: &str, port: i32) -> Option<TrainerReport> {
        let host = if pod_ip.contains(':') {
            format!("[{pod_ip}]")
        } else {
            pod_ip.to_string()
        };
        let url = format!("http://{host}:{port}/progress");
        let response = match self.http.get(&url).send().await {
            Ok(r) if r.status().is_success() => r,
            Ok(r) => {
                tracing::debug!(%url, status = %r.status(), "progress endpoint answered with an error");
                return None;
            }
            Err(err) => {
                tracing::debug!(%url, error = %err, "progress endpoint unreachable");
                return None;
            }
        };
        let body = response.text().await.ok()?;
        TrainerReport::parse(&body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_contract_example() {
        let text = r#"{"step": 1200, "total_steps_estimate": 9000, "tokens": 629145600, "epoch": 1.8,
 "train_loss": 0.92, "val_bpc": 1.31, "best_val_bpc": 1.30, "best_step": 1000,
 "tokens_per_s": 105000.0, "mfu": 0.53, "elapsed_s": 5990.0, "eta_s": 51600.0,
 "checkpoint": "/checkpoints/step-000001200", "world_size": 16, "peak_memory_gib": 61.2,
 "tokens_per_epoch": 343932928, "complete": false, "stop_reason": null}"#;
        let r = TrainerReport::parse(text).unwrap();
        assert_eq!(r.step, 1200);
        assert!(!r.complete);
        let s = ProgressStatus::from(&r);
        assert_eq!(s.tokens, 629145600);
        assert_eq!(s.val_bpc, Some(1.31));
        assert_eq!(s.checkpoint.as_deref(), Some("/checkpoints/step-000001200"));
        assert_eq!(s.world_size, 16);
        assert_eq!(s.tokens_per_epoch, Some(343932928));
        assert_eq!(s.stop_reason, None);
    }

    #[test]
    fn nulls_and_log_tails() {
        let r = TrainerReport::parse(r#"{"step":0,"train_loss":null,"complete":true}"#).unwrap();
        assert!(r.complete && r.train_loss.is_none());
        assert!(TrainerReport::parse("Traceback: something broke\n").is_none());
        assert!(TrainerReport::parse("{not json").is_none());
    }

    #[test]
    fn durations_read_well() {
        assert_eq!(human_duration(51600.0), "14h20m");
        assert_eq!(human_duration(600.0), "10m");
        assert_eq!(human_duration(42.0), "42s");
        assert_eq!(human_duration(3.0 * 86400.0 + 7200.0), "3d2h");
        assert_eq!(human_duration(f64::NAN), "-");
    }

    #[tokio::test]
    async fn fetch_reads_a_live_endpoint_and_tolerates_a_dead_one() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port() as i32;
        tokio::spawn(async move {
            let (mut sock, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 1024];
            let n = sock.read(&mut buf).await.unwrap();
            assert!(String::from_utf8_lossy(&buf[..n]).starts_with("GET /progress "));
            let body = r#"{"step": 7, "complete": false}"#;
            let reply = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            sock.write_all(reply.as_bytes()).await.unwrap();
        });
        let client = ProgressClient::new(Duration::from_secs(2)).unwrap();
        let report = client.fetch("127.0.0.1", port).await.unwrap();
        assert_eq!(report.step, 7);
        // Nothing listens on the same port any more.
        assert!(client.fetch("127.0.0.1", port).await.is_none());
    }
}
