//! The trainer's own reports (docs/contract.md): the `/progress` JSON of rank 0 while it runs, and
//! the same object plus `complete` in its termination message when it exits. The trainer speaks
//! snake_case; the API speaks camelCase, so the wire type here is converted at the boundary.

use std::time::Duration;

/// One report of rank 0, exactly as the trainer writes it: the contract crate's type.
pub use charlm_contract::ProgressReport as TrainerReport;

pub use charlm_api::human_duration;

/// The networks the operator may dial for progress; empty means any. A training's pod IP comes
/// from whatever runs its node, and a fake node (kwok) hands out addresses that lead nowhere or to
/// somebody else's host: a cluster whose pods live in known ranges (and every test plane, which
/// allows only loopback) names them, and the operator dials nothing else.
#[derive(Clone, Debug, Default)]
pub struct Networks(Vec<ipnet::IpNet>);

impl Networks {
    /// `10.0.0.0/8,fd00::/8`; a bare address is one host.
    pub fn parse(list: &[String]) -> Result<Networks, String> {
        let mut nets = Vec::new();
        for item in list.iter().flat_map(|l| l.split(',')) {
            let item = item.trim();
            if item.is_empty() {
                continue;
            }
            let net = item
                .parse::<ipnet::IpNet>()
                .or_else(|_| item.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
                .map_err(|_| {
                    format!(
                        "{item:?} is not a network: give CIDRs such as 10.244.0.0/16 or 127.0.0.0/8 \
                         (--progress-networks / CHARLM_PROGRESS_NETWORKS)"
                    )
                })?;
            nets.push(net);
        }
        Ok(Networks(nets))
    }

    pub fn allows(&self, ip: std::net::IpAddr) -> bool {
        self.0.is_empty() || self.0.iter().any(|n| n.contains(&ip))
    }
}

impl std::fmt::Display for Networks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.0.is_empty() {
            return f.write_str("any");
        }
        let list: Vec<String> = self.0.iter().map(|n| n.to_string()).collect();
        f.write_str(&list.join(","))
    }
}

/// Why a read of `/progress` gave no report. None of these fails a reconcile: progress is
/// informative.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PollError {
    /// The pod's address is outside `--progress-networks`: nothing was sent.
    Refused(String),
    /// Not a usable address, no answer, or an error status.
    Unreachable(String),
    /// An answer that is not a report, or one larger than `MAX_REPORT_BYTES`.
    BadAnswer(String),
}

impl PollError {
    /// The `result` label of `charlm_operator_progress_polls_total`.
    pub fn label(&self) -> &'static str {
        match self {
            PollError::Refused(_) => "refused",
            PollError::Unreachable(_) => "unreachable",
            PollError::BadAnswer(_) => "bad_answer",
        }
    }
}

/// A report is a few hundred bytes; a worker that answers with more is broken or hostile, and the
/// operator must not grow with it.
pub const MAX_REPORT_BYTES: usize = 64 * 1024;

/// Reads rank 0's `/progress`, only from allowed networks and never more than
/// `MAX_REPORT_BYTES` of it.
#[derive(Clone)]
pub struct ProgressClient {
    http: reqwest::Client,
    networks: Networks,
}

impl ProgressClient {
    pub fn new(timeout: Duration, networks: Networks) -> anyhow::Result<Self> {
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        Ok(Self { http, networks })
    }

    pub async fn fetch(&self, pod_ip: &str, port: i32) -> Result<TrainerReport, PollError> {
        let ip: std::net::IpAddr = pod_ip
            .parse()
            .map_err(|_| PollError::Unreachable(format!("{pod_ip:?} is not an IP address")))?;
        if !self.networks.allows(ip) {
            return Err(PollError::Refused(format!(
                "{ip} is outside --progress-networks ({})",
                self.networks
            )));
        }
        let url = format!(
            "http://{}/progress",
            std::net::SocketAddr::new(ip, port as u16)
        );
        let mut response = match self.http.get(&url).send().await {
            Ok(r) if r.status().is_success() => r,
            Ok(r) => return Err(PollError::Unreachable(format!("{url}: {}", r.status()))),
            Err(err) => return Err(PollError::Unreachable(format!("{url}: {err}"))),
        };
        // A declared length over the bound is refused before a byte of the body is read; an
        // undeclared one (chunked, or until close) is counted as it comes.
        if let Some(len) = response.content_length() {
            if len > MAX_REPORT_BYTES as u64 {
                return Err(PollError::BadAnswer(format!(
                    "{url}: a body of {len} bytes, more than {MAX_REPORT_BYTES}"
                )));
            }
        }
        let mut body = Vec::new();
        loop {
            match response.chunk().await {
                Ok(Some(chunk)) => {
                    if body.len() + chunk.len() > MAX_REPORT_BYTES {
                        return Err(PollError::BadAnswer(format!(
                            "{url}: more than {MAX_REPORT_BYTES} bytes"
                        )));
                    }
                    body.extend_from_slice(&chunk);
                }
                Ok(None) => break,
                Err(err) => return Err(PollError::Unreachable(format!("{url}: {err}"))),
            }
        }
        TrainerReport::parse(&String::from_utf8_lossy(&body))
            .ok_or_else(|| PollError::BadAnswer(format!("{url}: not a progress report")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::ProgressStatus;

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
        let client = ProgressClient::new(Duration::from_secs(2), Networks::default()).unwrap();
        let report = client.fetch("127.0.0.1", port).await.unwrap();
        assert_eq!(report.step, 7);
        // Nothing listens on the same port any more.
        assert_eq!(
            client.fetch("127.0.0.1", port).await.unwrap_err().label(),
            "unreachable"
        );
    }

    #[test]
    fn networks_parse_and_contain() {
        let any = Networks::parse(&[]).unwrap();
        assert!(any.allows("10.244.0.5".parse().unwrap()));
        assert_eq!(any.to_string(), "any");
        let nets = Networks::parse(&["127.0.0.0/8, ::1".into(), "10.1.2.3".into()]).unwrap();
        assert!(nets.allows("127.244.0.9".parse().unwrap()));
        assert!(nets.allows("::1".parse().unwrap()));
        assert!(nets.allows("10.1.2.3".parse().unwrap()));
        assert!(!nets.allows("10.1.2.4".parse().unwrap()));
        assert!(!nets.allows("10.244.0.5".parse().unwrap()));
        assert_eq!(nets.to_string(), "127.0.0.0/8,::1/128,10.1.2.3/32");
        let err = Networks::parse(&["10.0.0.0/33".into()]).unwrap_err();
        assert!(
            err.contains("10.0.0.0/33") && err.contains("--progress-networks"),
            "{err}"
        );
    }

    /// The address is checked before anything is sent: a refused pod costs no connection, which is
    /// what keeps a test plane's fake pod addresses from ever being dialled.
    #[tokio::test]
    async fn fetch_never_dials_outside_the_allowed_networks() {
        let listener = std::net::TcpListener::bind("127.0.0.2:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port() as i32;
        let only_one = Networks::parse(&["127.0.0.1/32".into()]).unwrap();
        let client = ProgressClient::new(Duration::from_secs(2), only_one).unwrap();
        let err = client.fetch("127.0.0.2", port).await.unwrap_err();
        assert_eq!(err.label(), "refused", "{err:?}");
        assert!(
            matches!(listener.accept(), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
            "a refused address was dialled"
        );
        assert_eq!(
            client.fetch("not-an-ip", port).await.unwrap_err().label(),
            "unreachable"
        );
    }

    #[tokio::test]
    async fn an_oversized_answer_is_cut_off() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port() as i32;
        tokio::spawn(async move {
            let (mut sock, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 1024];
            let _ = sock.read(&mut buf).await;
            // A chunked body that never ends, bounded here so the test stops by itself.
            let _ = sock
                .write_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
                .await;
            let chunk = format!("{:x}\r\n{}\r\n", 8192, "x".repeat(8192));
            for _ in 0..1024 {
                if sock.write_all(chunk.as_bytes()).await.is_err() {
                    return;
                }
            }
        });
        let client = ProgressClient::new(Duration::from_secs(5), Networks::default()).unwrap();
        let err = client.fetch("127.0.0.1", port).await.unwrap_err();
        assert_eq!(err.label(), "bad_answer", "{err:?}");
    }
}
