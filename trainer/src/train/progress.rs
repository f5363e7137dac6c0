//! What a running training reports about itself (docs/contract.md): one `ProgressReport` (of
//! the contract crate), served as JSON on `/progress` and as Prometheus text on `/metrics` by
//! global rank 0, and written once to the termination log on exit. Reporting never stops training: a port that is taken is a warning.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};

use charlm_contract::{ProgressReport, METRICS_PATH, PROGRESS_PATH};

pub type SharedProgress = Arc<Mutex<ProgressReport>>;

/// The report's figures in Prometheus' text exposition format.
pub fn to_prometheus(report: &ProgressReport) -> String {
    let mut out = String::new();
    let mut gauge = |name: &str, help: &str, value: Option<f64>| {
        if let Some(v) = value {
            out.push_str(&format!(
                "# HELP charlm_{name} {help}\n# TYPE charlm_{name} gauge\n"
            ));
            out.push_str(&format!("charlm_{name} {v}\n"));
        }
    };
    gauge("step", "Optimizer steps taken.", Some(report.step as f64));
    gauge(
        "tokens",
        "Training tokens seen.",
        Some(report.tokens as f64),
    );
    gauge(
        "epoch",
        "Passes over the training split.",
        Some(report.epoch),
    );
    gauge(
        "train_loss",
        "Training loss (nats per token).",
        report.train_loss,
    );
    gauge("val_bpc", "Validation bits per character.", report.val_bpc);
    gauge(
        "best_val_bpc",
        "Best validation bits per character.",
        report.best_val_bpc,
    );
    gauge(
        "tokens_per_second",
        "Training throughput.",
        report.tokens_per_s,
    );
    gauge(
        "mfu",
        "Model FLOPs utilisation (0..1) over 989 TFLOP/s per GPU.",
        report.mfu,
    );
    gauge(
        "elapsed_seconds",
        "Training time spent, resumes included.",
        Some(report.elapsed_s),
    );
    gauge("eta_seconds", "Estimated training time left.", report.eta_s);
    gauge(
        "gpu_peak_memory_gib",
        "Peak GPU memory allocated.",
        report.peak_memory_gib,
    );
    gauge(
        "world_size",
        "Worker processes.",
        Some(report.world_size as f64),
    );
    gauge(
        "complete",
        "1 once the budget is spent.",
        Some(u8::from(report.complete) as f64),
    );
    out
}

/// Serves `/progress` and `/metrics` on `addr` from a background thread. Returns the bound address,
/// or `None` (with a warning) when the address cannot be bound.
pub fn serve(addr: &str, progress: SharedProgress) -> Option<std::net::SocketAddr> {
    let listener = match TcpListener::bind(addr) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("warning: progress endpoint not served on {addr}: {e}");
            return None;
        }
    };
    let bound = listener.local_addr().ok();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let progress = progress.clone();
            let _ = handle(stream, &progress);
        }
    });
    bound
}

fn handle(stream: std::net::TcpStream, progress: &SharedProgress) -> std::io::Result<()> {
    stream.set_read_timeout(Some(std::time::Duration::from_secs(5)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    // Drain the headers so clients that wait for the request to be consumed don't stall.
    let mut line = String::new();
    while reader.read_line(&mut line)? > 2 {
        line.clear();
    }
    let path = request_line.split_whitespace().nth(1).unwrap_or("/");
    let snapshot = progress.lock().map(|p| p.clone()).unwrap_or_default();
    let (status, kind, body) = match path {
        PROGRESS_PATH => (
            "200 OK",
            "application/json",
            serde_json::to_string(&snapshot)?,
        ),
        METRICS_PATH => (
            "200 OK",
            "text/plain; version=0.0.4",
            to_prometheus(&snapshot),
        ),
        "/healthz" => ("200 OK", "text/plain", "ok\n".to_string()),
        _ => (
            "404 Not Found",
            "text/plain",
            "try /progress or /metrics\n".to_string(),
        ),
    };
    let mut stream = stream;
    write!(
        stream,
        "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

/// Writes the final state where a supervisor reads it (Kubernetes' termination message).
pub fn write_termination_log(path: &str, progress: &ProgressReport) {
    if let Err(e) = std::fs::write(path, serde_json::to_string(progress).unwrap_or_default()) {
        eprintln!("warning: could not write the termination log {path}: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn serves_progress_and_metrics() {
        let shared: SharedProgress = Arc::new(Mutex::new(ProgressReport {
            step: 42,
            val_bpc: Some(1.25),
            ..Default::default()
        }));
        let addr = serve("127.0.0.1:0", shared).expect("bind");
        let get = |path: &str| {
            let mut s = std::net::TcpStream::connect(addr).unwrap();
            write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
            let mut body = String::new();
            s.read_to_string(&mut body).unwrap();
            body
        };
        let progress = get("/progress");
        assert!(progress.starts_with("HTTP/1.1 200"), "{progress}");
        let json = progress.split("\r\n\r\n").nth(1).unwrap();
        let parsed: ProgressReport = serde_json::from_str(json).unwrap();
        assert_eq!((parsed.step, parsed.val_bpc), (42, Some(1.25)));
        let metrics = get("/metrics");
        assert!(metrics.contains("charlm_step 42\n"), "{metrics}");
        assert!(metrics.contains("charlm_val_bpc 1.25\n"), "{metrics}");
        assert!(
            !metrics.contains("charlm_train_loss"),
            "absent values are not exported"
        );
    }
}
