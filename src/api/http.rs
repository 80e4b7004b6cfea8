//! The HTTP listener: `/metrics` (OpenMetrics text), `/healthz` (the process
//! is up and serving) and `/readyz` (the daemon finished start-up: state
//! opened, rotations resumed, timers armed — the daemon flips the flag).
//!
//! It serves nothing else and carries no secret: it is safe to expose to a
//! metrics scraper, though the default is a loopback address.

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

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

/// Serves until `cancel`, then stops accepting and lets open requests finish.
pub async fn serve_http(
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
    ready: Arc<AtomicBool>,
    cancel: CancellationToken,
) -> io::Result<()> {
    if let Ok(addr) = listener.local_addr() {
        info!(listen = %addr, "HTTP listener serving /metrics /healthz /readyz");
    }
    axum::serve(listener, router(metrics, ready))
        .with_graceful_shutdown(cancel.cancelled_owned())
        .await
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

        cancel.cancel();
        let result = tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .expect("serve_http must return after cancel")
            .unwrap();
        assert!(result.is_ok(), "{result:?}");
        assert!(tokio::net::TcpStream::connect(addr).await.is_err());
    }
}
