//! The operator's reads of worker 0's `/progress` against a worker that answers badly on purpose
//! (issue 19): fake workers on 127.0.0.1 answer with an endless body, a 1 GiB one, endless
//! headers, or a trickle of one byte every 50 ms. Every read must end within the client's timeout
//! with an error, and the operator's memory must not grow with what the workers send.
//!
//! One test in its own process (this file), so the memory figures are this test's alone.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use charlm_operator::progress::{Networks, ProgressClient, MAX_REPORT_BYTES};

/// How a fake worker answers `GET /progress`.
#[derive(Clone, Copy, Debug)]
enum Answer {
    /// A valid report, for the baseline.
    Good,
    /// A chunked body that never ends.
    EndlessChunked,
    /// `Content-Length: 1 GiB`, and the bytes to go with it.
    HugeBody,
    /// Header lines that never end.
    EndlessHeaders,
    /// A body of 1,000 bytes, one every 50 ms: it would take 50 s.
    Trickle,
}

/// No fake worker writes more than this or for longer than this, whatever the client does.
const MAX_SENT: u64 = 1 << 30;
const MAX_SERVE: Duration = Duration::from_secs(20);
const CLIENT_TIMEOUT: Duration = Duration::from_secs(2);

/// Starts a fake worker that answers every connection with `answer`; counts the bytes it wrote.
async fn fake_worker(answer: Answer, sent: Arc<AtomicU64>) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                return;
            };
            let sent = sent.clone();
            tokio::spawn(async move {
                let mut request = [0u8; 2048];
                let _ = sock.read(&mut request).await;
                let _ = tokio::time::timeout(MAX_SERVE, respond(&mut sock, answer, &sent)).await;
            });
        }
    });
    port
}

/// Writes `bytes` unless the worker already sent `MAX_SENT`; false once the client is gone.
async fn send(sock: &mut tokio::net::TcpStream, bytes: &[u8], sent: &AtomicU64) -> bool {
    if sent.load(Ordering::Relaxed) > MAX_SENT || sock.write_all(bytes).await.is_err() {
        return false;
    }
    sent.fetch_add(bytes.len() as u64, Ordering::Relaxed);
    true
}

async fn respond(sock: &mut tokio::net::TcpStream, answer: Answer, sent: &AtomicU64) {
    match answer {
        Answer::Good => {
            let body = r#"{"step": 7, "complete": false}"#;
            let reply = format!(
                "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            send(sock, reply.as_bytes(), sent).await;
        }
        Answer::EndlessChunked => {
            if !send(
                sock,
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n",
                sent,
            )
            .await
            {
                return;
            }
            let chunk = format!("{:x}\r\n{}\r\n", 65536, "x".repeat(65536)).into_bytes();
            while send(sock, &chunk, sent).await {}
        }
        Answer::HugeBody => {
            let head = format!("HTTP/1.1 200 OK\r\ncontent-length: {MAX_SENT}\r\n\r\n");
            if !send(sock, head.as_bytes(), sent).await {
                return;
            }
            let block = vec![b'{'; 65536];
            while send(sock, &block, sent).await {}
        }
        Answer::EndlessHeaders => {
            if !send(sock, b"HTTP/1.1 200 OK\r\n", sent).await {
                return;
            }
            let line = format!("x-filler: {}\r\n", "y".repeat(1000)).into_bytes();
            while send(sock, &line, sent).await {}
        }
        Answer::Trickle => {
            if !send(
                sock,
                b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\n{",
                sent,
            )
            .await
            {
                return;
            }
            while send(sock, b" ", sent).await {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// This process's resident and peak resident memory, in bytes (`/proc/self/status`).
fn memory() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .unwrap_or_else(|| panic!("{name} in /proc/self/status"))
            * 1024
    };
    (field("VmRSS:"), field("VmHWM:"))
}

const MB: f64 = 1e6;
/// The operator may grow by this much while polling hostile workers (stated in docs/operator.md).
const RSS_BOUND: u64 = 20_000_000;
const PARALLEL: usize = 8;
const ROUNDS: usize = 3;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_workers_cost_the_poller_neither_memory_nor_time() {
    let client = ProgressClient::new(CLIENT_TIMEOUT, Networks::default()).unwrap();
    let good = fake_worker(Answer::Good, Arc::default()).await;
    // Warm up the client, its connection machinery and the allocator before the baseline.
    for _ in 0..PARALLEL {
        assert_eq!(
            client.fetch("127.0.0.1", good as i32).await.unwrap().step,
            7
        );
    }
    let (baseline, _) = memory();

    let mut figures = Vec::new();
    for answer in [
        Answer::EndlessChunked,
        Answer::HugeBody,
        Answer::EndlessHeaders,
        Answer::Trickle,
    ] {
        let sent = Arc::new(AtomicU64::new(0));
        let port = fake_worker(answer, sent.clone()).await as i32;
        let mut slowest = Duration::ZERO;
        let mut labels = Vec::new();
        for _ in 0..ROUNDS {
            let polls: Vec<_> = (0..PARALLEL)
                .map(|_| {
                    let client = client.clone();
                    tokio::spawn(async move {
                        let t = Instant::now();
                        let result = client.fetch("127.0.0.1", port).await;
                        (result, t.elapsed())
                    })
                })
                .collect();
            for poll in polls {
                let (result, took) = poll.await.unwrap();
                let err = result.expect_err("a hostile answer is never a report");
                labels.push(err.label());
                slowest = slowest.max(took);
            }
        }
        let (_, peak) = memory();
        let polls = ROUNDS * PARALLEL;
        let sent_mb = sent.load(Ordering::Relaxed) as f64 / MB;
        let mut kinds = labels.clone();
        kinds.dedup();
        eprintln!(
            "{answer:?}: {polls} polls, slowest {slowest:.2?}, the workers sent {sent_mb:.1} MB, \
             peak RSS +{:.1} MB, answers {kinds:?}",
            peak.saturating_sub(baseline) as f64 / MB
        );
        figures.push((answer, slowest, peak));
        assert!(
            slowest < CLIENT_TIMEOUT + Duration::from_secs(1),
            "{answer:?}: a poll took {slowest:?} with a {CLIENT_TIMEOUT:?} timeout"
        );
        match answer {
            // Cut off at MAX_REPORT_BYTES, long before the timeout.
            Answer::EndlessChunked | Answer::HugeBody => {
                assert!(labels.iter().all(|l| *l == "bad_answer"), "{labels:?}");
                assert!(slowest < Duration::from_secs(1), "{answer:?}: {slowest:?}");
            }
            // hyper refuses a response head over its buffer; the trickle meets the timeout.
            Answer::EndlessHeaders | Answer::Trickle => {
                assert!(labels.iter().all(|l| *l == "unreachable"), "{labels:?}");
            }
            Answer::Good => unreachable!(),
        }
    }
    let peak = figures.iter().map(|f| f.2).max().unwrap();
    assert!(
        peak.saturating_sub(baseline) < RSS_BOUND,
        "the poller grew from {:.1} MB to a peak of {:.1} MB (bound +{:.0} MB; \
         MAX_REPORT_BYTES = {MAX_REPORT_BYTES})",
        baseline as f64 / MB,
        peak as f64 / MB,
        RSS_BOUND as f64 / MB
    );
    // Still a good reader afterwards.
    assert_eq!(
        client.fetch("127.0.0.1", good as i32).await.unwrap().step,
        7
    );
}
