//! Rank 0's HTTP endpoint (`/progress`, `/metrics`, `/healthz`) on hyper and axum, the operator's
//! HTTP stack, hardened for a port that every pod of the cluster may reach.
//!
//! It runs on a single-threaded tokio runtime in a thread of its own, at a lower CPU priority than
//! the training threads: whatever a client does costs at most that one thread's time and the
//! memory the limits below allow, and never blocks a training step (the step only takes the
//! progress lock for a copy, as every reader does).
//!
//! Limits (docs/operator.md has the figures measured under abuse):
//! - a request head (request line + headers) of at most [`Limits::max_head_bytes`]; a longer one,
//!   such as a request line without end, is answered 431 and the connection closed, so a client
//!   never makes the server buffer more than that;
//! - [`Limits::max_headers`] headers;
//! - the whole head within [`Limits::head_timeout`] of the connection's start (slow clients and
//!   idle connections are closed), and the whole connection within [`Limits::connection_timeout`];
//! - at most [`Limits::max_connections`] connections at once; one more is closed at once;
//! - one request per connection (the readers poll every half minute: keep-alive buys nothing);
//! - request bodies are never read.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;

use super::progress::{to_prometheus, SharedProgress, OPENMETRICS_CONTENT_TYPE};
use charlm_contract::{ProgressReport, METRICS_PATH, PROGRESS_PATH};

/// What one client may cost the endpoint.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub max_connections: usize,
    pub max_head_bytes: usize,
    pub max_headers: usize,
    pub head_timeout: Duration,
    pub connection_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            // Each holds an 8 KiB head buffer and a task: 1,000 idle ones cost the trainer ~10 MB.
            max_connections: 1024,
            // hyper's smallest read buffer; a GET from curl, Prometheus or the operator is ~200 B.
            max_head_bytes: 8 * 1024,
            max_headers: 32,
            head_timeout: Duration::from_secs(2),
            connection_timeout: Duration::from_secs(5),
        }
    }
}

/// Serves the endpoint on `addr` from its own thread. Returns the bound address, or `None` (with a
/// warning) when the address cannot be bound or the thread cannot start: reporting never stops
/// training.
pub fn serve(addr: &str, progress: SharedProgress, limits: Limits) -> Option<SocketAddr> {
    let started = start(addr, progress, limits);
    if let Err(e) = &started {
        eprintln!("warning: progress endpoint not served on {addr}: {e}");
    }
    started.ok()
}

fn start(addr: &str, progress: SharedProgress, limits: Limits) -> std::io::Result<SocketAddr> {
    let addr = std::net::ToSocketAddrs::to_socket_addrs(addr)?
        .next()
        .ok_or_else(|| std::io::Error::other("the address resolves to nothing"))?;
    // Built here and moved into the thread: binding in the caller reports a taken port at once.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()?;
    let listener = runtime.block_on(async { listen(addr, limits.max_connections) })?;
    let bound = listener.local_addr()?;
    std::thread::Builder::new()
        .name("progress-endpoint".into())
        .spawn(move || {
            lower_priority();
            runtime.block_on(accept_loop(listener, progress, limits));
        })?;
    Ok(bound)
}

/// A listener whose backlog holds a connection per slot: a burst of connections waits for
/// `accept` instead of having its SYNs dropped (which a client sees as a 1 s retransmission).
fn listen(addr: SocketAddr, backlog: usize) -> std::io::Result<tokio::net::TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(u32::try_from(backlog).unwrap_or(u32::MAX))
}

/// The routes; anything else is 404, another method on them 405.
pub fn router(progress: SharedProgress) -> Router {
    Router::new()
        .route(PROGRESS_PATH, get(progress_json))
        .route(METRICS_PATH, get(metrics_text))
        .route("/healthz", get(|| async { "ok\n" }))
        .fallback(|| async { (StatusCode::NOT_FOUND, "try /progress or /metrics\n") })
        .with_state(progress)
}

fn snapshot(progress: &SharedProgress) -> ProgressReport {
    // A poisoned lock means a panicking training thread; its last report is still worth showing.
    match progress.lock() {
        Ok(p) => p.clone(),
        Err(poisoned) => poisoned.into_inner().clone(),
    }
}

async fn progress_json(State(progress): State<SharedProgress>) -> impl IntoResponse {
    let body = serde_json::to_string(&snapshot(&progress)).unwrap_or_default();
    ([(header::CONTENT_TYPE, "application/json")], body)
}

async fn metrics_text(State(progress): State<SharedProgress>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, OPENMETRICS_CONTENT_TYPE)],
        to_prometheus(&snapshot(&progress)),
    )
}

async fn accept_loop(listener: tokio::net::TcpListener, progress: SharedProgress, limits: Limits) {
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    let service = TowerToHyperService::new(router(progress));
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            // Out of file descriptors or memory: let the timeouts free some, without spinning.
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            // Full: closing at once keeps the backlog moving, so that a well-behaved reader gets
            // a slot as soon as an abusive connection times out.
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let service = service.clone();
        tokio::spawn(async move {
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.head_timeout)
                .max_buf_size(limits.max_head_bytes)
                .max_header_size(limits.max_head_bytes)
                .max_headers(limits.max_headers)
                .keep_alive(false)
                .serve_connection(TokioIo::new(stream), service);
            // Errors are the client's (bad request, reset, timeout): nothing to report.
            let _ = tokio::time::timeout(limits.connection_timeout, connection).await;
            drop(slot);
        });
    }
}

/// Nice 10 for this thread only (Linux threads have their own nice value), so that under CPU
/// contention the training threads come first.
fn lower_priority() {
    // SAFETY: gettid and setpriority take plain integers and touch no memory of ours.
    unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        libc::setpriority(libc::PRIO_PROCESS, tid, 10);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::sync::Mutex;

    fn start(limits: Limits) -> SocketAddr {
        let shared: SharedProgress = Arc::new(Mutex::new(ProgressReport {
            step: 42,
            val_bpc: Some(1.25),
            ..Default::default()
        }));
        serve("127.0.0.1:0", shared, limits).expect("bind")
    }

    fn exchange(addr: SocketAddr, request: &[u8]) -> String {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(request).unwrap();
        let mut answer = String::new();
        let _ = s.read_to_string(&mut answer);
        answer
    }

    fn get(addr: SocketAddr, path: &str) -> String {
        exchange(
            addr,
            format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes(),
        )
    }

    #[test]
    fn serves_progress_and_metrics() {
        let addr = start(Limits::default());
        let progress = get(addr, "/progress");
        assert!(progress.starts_with("HTTP/1.1 200"), "{progress}");
        assert!(progress.contains("application/json"), "{progress}");
        let json = progress.split("\r\n\r\n").nth(1).unwrap();
        let parsed: ProgressReport = serde_json::from_str(json).unwrap();
        assert_eq!((parsed.step, parsed.val_bpc), (42, Some(1.25)));
        let metrics = get(addr, "/metrics");
        assert!(metrics.contains("charlm_step 42\n"), "{metrics}");
        assert!(metrics.contains("charlm_val_bpc 1.25\n"), "{metrics}");
        assert!(get(addr, "/healthz").ends_with("\r\n\r\nok\n"));
        assert!(get(addr, "/nope").starts_with("HTTP/1.1 404"));
        let post = exchange(
            addr,
            b"POST /progress HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc",
        );
        assert!(post.starts_with("HTTP/1.1 405"), "{post}");
    }

    #[test]
    fn a_head_over_the_limit_is_refused() {
        let addr = start(Limits::default());
        let long = format!("GET /{} HTTP/1.1\r\nHost: x\r\n\r\n", "a".repeat(9000));
        let answer = exchange(addr, long.as_bytes());
        assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");
        let many: String = (0..40).map(|i| format!("X-{i}: y\r\n")).collect();
        let answer = exchange(
            addr,
            format!("GET /progress HTTP/1.1\r\n{many}\r\n").as_bytes(),
        );
        assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");
        assert!(get(addr, "/progress").starts_with("HTTP/1.1 200"));
    }

    #[test]
    fn a_silent_connection_is_closed_after_the_head_timeout() {
        let limits = Limits {
            head_timeout: Duration::from_millis(300),
            ..Limits::default()
        };
        let addr = start(limits);
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let t = std::time::Instant::now();
        let mut buf = Vec::new();
        let _ = s.read_to_end(&mut buf);
        assert!(
            t.elapsed() < Duration::from_secs(3),
            "closed after {:?}",
            t.elapsed()
        );
    }

    #[test]
    fn connections_over_the_cap_are_closed_and_the_rest_served() {
        let limits = Limits {
            max_connections: 4,
            head_timeout: Duration::from_secs(30),
            connection_timeout: Duration::from_secs(30),
            ..Limits::default()
        };
        let addr = start(limits);
        let idle: Vec<_> = (0..4)
            .map(|_| std::net::TcpStream::connect(addr).unwrap())
            .collect();
        // Let the server take the four slots before the fifth arrives.
        std::thread::sleep(Duration::from_millis(200));
        let mut fifth = std::net::TcpStream::connect(addr).unwrap();
        fifth
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut buf = Vec::new();
        let closed = fifth.read_to_end(&mut buf);
        assert!(
            matches!(closed, Ok(0)) || closed.is_err(),
            "the fifth connection was served: {buf:?}"
        );
        drop(idle);
        std::thread::sleep(Duration::from_millis(200));
        assert!(get(addr, "/progress").starts_with("HTTP/1.1 200"));
    }
}
