//! The HTTP listener: `/metrics` (OpenMetrics text), `/healthz` (the process
//! is up and serving) and `/readyz` (the daemon finished start-up: state
//! opened, rotations resumed, timers armed — the daemon flips the flag).
//!
//! It serves nothing else and carries no secret: it is safe to expose to a
//! metrics scraper, though the default is a loopback address.
//!
//! Any local user can connect to it, so it must not let them use up the
//! daemon's file descriptors (the control socket and every delivery need
//! some). [`Limits`] bounds it: at most `max_connections` open at once (a
//! semaphore); a client has `header_read_timeout` to send each request's
//! head, which also closes a connection idle between requests (hyper's own
//! timer); and when every slot is taken, the oldest connection is asked to
//! finish its request and close, so a flood of idle connections delays a
//! scrape by one eviction instead of shutting it out. An accept error
//! (EMFILE) pauses the loop instead of spinning on it.

use std::collections::BTreeMap;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, warn};

use crate::telemetry::Metrics;

/// The content type of the OpenMetrics text format that prometheus-client writes.
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Clone)]
struct AppState {
    metrics: Arc<Metrics>,
    ready: Arc<AtomicBool>,
}

/// The routes, without a listener (for embedding or tests).
pub fn router(metrics: Arc<Metrics>, ready: Arc<AtomicBool>) -> Router {
    Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(ready_handler))
        .with_state(AppState { metrics, ready })
}

async fn metrics_handler(State(state): State<AppState>) -> Response {
    // With 100k credentials the per-credential collector writes 200k lines;
    // do that off the async workers so a scrape never stalls the socket API.
    let metrics = Arc::clone(&state.metrics);
    match tokio::task::spawn_blocking(move || metrics.encode()).await {
        Ok(body) => ([(header::CONTENT_TYPE, OPENMETRICS_CONTENT_TYPE)], body).into_response(),
        Err(e) => {
            error!(error = %e, "encoding metrics panicked");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                "encoding metrics failed\n",
            )
                .into_response()
        }
    }
}

async fn ready_handler(State(state): State<AppState>) -> Response {
    if state.ready.load(Ordering::Acquire) {
        (StatusCode::OK, "ready").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready").into_response()
    }
}

/// The most connections open at once, whatever the descriptor limit (a few
/// scrapers and health checks need a handful).
pub const MAX_CONNECTIONS: usize = 64;
/// How long a client has to send a request's head, and how long a
/// connection may sit idle between requests.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// How long an evicted connection (or one open at shutdown) may take to
/// finish the response it is writing before it is dropped.
const FINISH_TIMEOUT: Duration = Duration::from_secs(10);

/// How much of the daemon the listener may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_connections: usize,
    pub header_read_timeout: Duration,
}

impl Limits {
    /// The limits for a process allowed `nofile` descriptors: at most an
    /// eighth of them, so that the rest stay for the control socket, the
    /// state database and deliveries.
    pub fn for_nofile(nofile: u64) -> Limits {
        let share = usize::try_from(nofile / 8).unwrap_or(usize::MAX);
        Limits {
            max_connections: share.clamp(1, MAX_CONNECTIONS),
            header_read_timeout: HEADER_READ_TIMEOUT,
        }
    }
}

/// The open connections by age, each with the token that asks it to close.
#[derive(Default)]
struct Open {
    next_id: u64,
    by_age: BTreeMap<u64, CancellationToken>,
}

impl Open {
    fn add(&mut self, token: CancellationToken) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        self.by_age.insert(id, token);
        id
    }
    /// Asks the oldest connection to finish and close.
    fn evict_oldest(&mut self) {
        if let Some((_, token)) = self.by_age.pop_first() {
            token.cancel();
        }
    }
}

/// Serves until `cancel`, then stops accepting and lets open requests
/// finish (each within a bound).
pub async fn serve_http(
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
    ready: Arc<AtomicBool>,
    cancel: CancellationToken,
    limits: Limits,
) -> io::Result<()> {
    if let Ok(addr) = listener.local_addr() {
        info!(
            listen = %addr,
            max_connections = limits.max_connections,
            "HTTP listener serving /metrics /healthz /readyz"
        );
    }
    let service = TowerToHyperService::new(router(metrics, ready));
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let open = Arc::new(Mutex::new(Open::default()));
    let connections = TaskTracker::new();
    loop {
        let accepted = tokio::select! {
            biased;
            _ = cancel.cancelled() => break,
            r = listener.accept() => r,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                // EMFILE and friends: pause instead of spinning on the error.
                warn!(error = %e, "accepting an HTTP connection failed");
                tokio::select! {
                    _ = cancel.cancelled() => break,
                    _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                }
                continue;
            }
        };
        let slot = match Arc::clone(&slots).try_acquire_owned() {
            Ok(slot) => slot,
            Err(_) => {
                debug!("HTTP connections at the limit; closing the oldest");
                open.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .evict_oldest();
                tokio::select! {
                    _ = cancel.cancelled() => break,
                    slot = Arc::clone(&slots).acquire_owned() => match slot {
                        Ok(slot) => slot,
                        Err(_) => break, // never closed
                    },
                }
            }
        };
        let token = cancel.child_token();
        let id = open
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .add(token.clone());
        let service = service.clone();
        let open = Arc::clone(&open);
        connections.spawn(async move {
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_read_timeout);
            let conn = builder.serve_connection(TokioIo::new(stream), service);
            tokio::pin!(conn);
            let served = tokio::select! {
                r = conn.as_mut() => r,
                _ = token.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    tokio::time::timeout(FINISH_TIMEOUT, conn.as_mut())
                        .await
                        .unwrap_or(Ok(()))
                }
            };
            if let Err(e) = served {
                debug!(error = %e, "HTTP connection ended with an error");
            }
            open.lock()
                .unwrap_or_else(|p| p.into_inner())
                .by_age
                .remove(&id);
            drop(slot);
        });
    }
    connections.close();
    connections.wait().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;
    use crate::telemetry::CredentialTimes;

    /// A minimal HTTP/1.1 GET; returns (status, headers, body).
    async fn get(addr: std::net::SocketAddr, path: &str) -> (u16, String, String) {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let req = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await.unwrap();
        let mut raw = String::new();
        s.read_to_string(&mut raw).await.unwrap();
        let (head, body) = raw.split_once("\r\n\r\n").unwrap();
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap();
        (status, head.to_ascii_lowercase(), body.to_owned())
    }

    #[tokio::test]
    async fn endpoints_answer_and_shut_down_on_cancel() {
        let metrics = Arc::new(Metrics::new());
        metrics.set_credential_times_provider(Arc::new(|| {
            vec![CredentialTimes {
                agent: "invoice-bot".into(),
                credential: "db".into(),
                age_seconds: Some(60.0),
                next_due_seconds: Some(3600.0),
            }]
        }));
        let ready = Arc::new(AtomicBool::new(false));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let cancel = CancellationToken::new();
        let server = tokio::spawn(serve_http(
            listener,
            Arc::clone(&metrics),
            Arc::clone(&ready),
            cancel.clone(),
            Limits::for_nofile(1024),
        ));

        let (status, _, body) = get(addr, "/healthz").await;
        assert_eq!((status, body.as_str()), (200, "ok"));

        let (status, _, body) = get(addr, "/readyz").await;
        assert_eq!((status, body.as_str()), (503, "not ready"));
        ready.store(true, Ordering::Release);
        let (status, _, body) = get(addr, "/readyz").await;
        assert_eq!((status, body.as_str()), (200, "ready"));

        let (status, head, body) = get(addr, "/metrics").await;
        assert_eq!(status, 200);
        assert!(
            head.contains(
                "content-type: application/openmetrics-text; version=1.0.0; charset=utf-8"
            ),
            "{head}"
        );
        assert!(
            body.contains("keyturn_rotations_total{result=\"ok\"} 0"),
            "{body}"
        );
        assert!(
            body.contains(
                "keyturn_credential_age_seconds{agent=\"invoice-bot\",credential=\"db\"} 60.0"
            ),
            "{body}"
        );
        assert!(
            body.contains(
                "keyturn_credential_next_due_seconds{agent=\"invoice-bot\",credential=\"db\"} 3600.0"
            ),
            "{body}"
        );
        assert!(body.ends_with("# EOF\n"));

        let (status, _, _) = get(addr, "/nope").await;
        assert_eq!(status, 404);

        stop(cancel, server).await;
        assert!(tokio::net::TcpStream::connect(addr).await.is_err());
    }

    fn start(
        limits: Limits,
    ) -> (
        std::net::SocketAddr,
        CancellationToken,
        tokio::task::JoinHandle<io::Result<()>>,
    ) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let listener = tokio::net::TcpListener::from_std(listener).unwrap();
        let cancel = CancellationToken::new();
        let server = tokio::spawn(serve_http(
            listener,
            Arc::new(Metrics::new()),
            Arc::new(AtomicBool::new(true)),
            cancel.clone(),
            limits,
        ));
        (addr, cancel, server)
    }

    /// Cancels the server and checks that it returns promptly: idle
    /// connections close at once.
    async fn stop(cancel: CancellationToken, server: tokio::task::JoinHandle<io::Result<()>>) {
        cancel.cancel();
        let result = tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .expect("serve_http must return after cancel")
            .unwrap();
        assert!(result.is_ok(), "{result:?}");
    }

    /// Reads until the server closes the connection; panics if it does not
    /// within `within`.
    async fn closed_within(s: &mut tokio::net::TcpStream, within: Duration) {
        let mut buf = [0u8; 1024];
        tokio::time::timeout(within, async {
            loop {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        })
        .await
        .expect("the server must close the connection");
    }

    #[test]
    fn limits_keep_most_descriptors_in_reserve() {
        assert_eq!(Limits::for_nofile(1 << 20).max_connections, MAX_CONNECTIONS);
        assert_eq!(Limits::for_nofile(1024).max_connections, 64);
        assert_eq!(Limits::for_nofile(256).max_connections, 32);
        assert_eq!(Limits::for_nofile(4).max_connections, 1);
        assert_eq!(
            Limits::for_nofile(0).header_read_timeout,
            HEADER_READ_TIMEOUT
        );
    }

    #[tokio::test]
    async fn a_flood_of_idle_connections_does_not_shut_out_a_scrape() {
        let (addr, cancel, server) = start(Limits {
            max_connections: 4,
            header_read_timeout: Duration::from_secs(60),
        });
        let mut idle = Vec::new();
        for _ in 0..40 {
            idle.push(tokio::net::TcpStream::connect(addr).await.unwrap());
        }
        let (status, _, body) =
            tokio::time::timeout(Duration::from_secs(10), get(addr, "/healthz"))
                .await
                .expect("/healthz must answer while idle connections fill every slot");
        assert_eq!((status, body.as_str()), (200, "ok"));
        // The oldest idle connections were closed to make room.
        closed_within(&mut idle[0], Duration::from_secs(5)).await;
        stop(cancel, server).await;
    }

    #[tokio::test]
    async fn slow_and_idle_clients_are_cut_off_after_the_header_timeout() {
        let timeout = Duration::from_millis(300);
        let (addr, cancel, server) = start(Limits {
            max_connections: 8,
            header_read_timeout: timeout,
        });
        let started = std::time::Instant::now();
        // Connected, never sends a byte.
        let mut silent = tokio::net::TcpStream::connect(addr).await.unwrap();
        // Slowloris: a header line every 100 ms, never the blank line.
        let mut slow = tokio::net::TcpStream::connect(addr).await.unwrap();
        slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
            .await
            .unwrap();
        let trickle = async {
            for i in 0..100 {
                tokio::time::sleep(Duration::from_millis(100)).await;
                if slow
                    .write_all(format!("X-{i}: y\r\n").as_bytes())
                    .await
                    .is_err()
                {
                    return;
                }
            }
            panic!("the slow header was never cut off");
        };
        tokio::time::timeout(Duration::from_secs(5), trickle)
            .await
            .expect("the slow header must be cut off");
        closed_within(&mut silent, Duration::from_secs(5)).await;
        assert!(started.elapsed() >= timeout, "{:?}", started.elapsed());

        // Idle after a kept-alive request: closed too.
        let mut kept = tokio::net::TcpStream::connect(addr).await.unwrap();
        kept.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 256];
        let n = kept.read(&mut buf).await.unwrap();
        assert!(
            buf[..n].starts_with(b"HTTP/1.1 200"),
            "{:?}",
            String::from_utf8_lossy(&buf[..n])
        );
        closed_within(&mut kept, Duration::from_secs(5)).await;
        stop(cancel, server).await;
    }
}
