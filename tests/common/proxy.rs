//! An HTTP/1.1 fault proxy for the real-server tests: it sits on
//! `127.0.0.1:0` in front of one upstream (OpenBao or moto), forwards every
//! request, and injects the faults a test asks for at runtime:
//!
//! - [`Proxy::drop_response`]: the request reaches the upstream and its full
//!   response is read, then the client connection is closed without an
//!   answer — "the write was committed but the response was lost".
//! - [`Proxy::fail`]: the proxy answers a status (503, 429, ...) itself, with
//!   the error body that upstream would send, without forwarding.
//!
//! It also records every request it saw (method, path, `X-Amz-Target`, the
//! fault applied) so tests can count writes.
//!
//! HTTP is hyper's: a server connection per client (keep-alive, `Expect:
//! 100-continue`, framing) and, per request, a fresh upstream connection
//! with `Connection: close`, so no pooled upstream connection carries state
//! from one request (or one fault) to the next. Bodies are small and read
//! whole: a rule may match on the request body, and a dropped response must
//! be read to its end before the client connection is closed. The tests are
//! synchronous; the proxy runs on its own one-thread tokio runtime, which
//! is shut down (closing every connection) when the [`Proxy`] is dropped.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::sync::Notify;

/// What the upstream is, for the error bodies [`Proxy::fail`] answers with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavor {
    /// OpenBao / HashiCorp Vault: `{"errors": [...]}`.
    Bao,
    /// AWS JSON 1.1 (Secrets Manager): `{"__type": ..., "message": ...}`.
    Aws,
}

/// Which requests a rule applies to. Every field that is set must match.
#[derive(Debug, Clone, Default)]
pub struct Match {
    pub method: Option<String>,
    /// A substring of the request path (with its query).
    pub path: Option<String>,
    /// The exact `X-Amz-Target` header, e.g. `secretsmanager.PutSecretValue`.
    pub amz_target: Option<String>,
    /// A substring of the request body (AWS requests all go to `/`; the
    /// body tells them apart, e.g. `"AWSCURRENT"`).
    pub body: Option<String>,
}

impl Match {
    /// Every request.
    pub fn any() -> Match {
        Match::default()
    }

    /// An OpenBao request: `method` and a substring of its path.
    pub fn bao(method: &str, path_contains: &str) -> Match {
        Match {
            method: Some(method.to_owned()),
            path: Some(path_contains.to_owned()),
            ..Match::default()
        }
    }

    /// A Secrets Manager operation, e.g. `aws("PutSecretValue")`.
    pub fn aws(operation: &str) -> Match {
        Match {
            method: Some("POST".to_owned()),
            amz_target: Some(format!("secretsmanager.{operation}")),
            ..Match::default()
        }
    }

    /// Also requires `text` in the request body.
    pub fn with_body(mut self, text: &str) -> Match {
        self.body = Some(text.to_owned());
        self
    }

    pub fn matches(&self, r: &Seen) -> bool {
        self.method.as_ref().is_none_or(|m| *m == r.method)
            && self
                .path
                .as_ref()
                .is_none_or(|p| r.path.contains(p.as_str()))
            && self
                .amz_target
                .as_ref()
                .is_none_or(|t| r.amz_target.as_deref() == Some(t.as_str()))
            && self
                .body
                .as_ref()
                .is_none_or(|b| r.body.contains(b.as_str()))
    }
}

/// One request the proxy saw.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub amz_target: Option<String>,
    /// The request body as text (lossy). Tests own the secrets that pass
    /// through; this never leaves the test process.
    pub body: String,
    /// When the request arrived.
    pub at: std::time::Instant,
    /// `Some("drop")` or `Some("fail 503")` when a rule applied.
    pub fault: Option<String>,
}

impl Seen {
    /// The (method, path-prefix) a request is counted under: the AWS
    /// operation when there is one, else the first three path segments
    /// (`/v1/secret/data`).
    pub fn bucket(&self) -> (String, String) {
        let prefix = match &self.amz_target {
            Some(t) => t.clone(),
            None => {
                let path = self.path.split('?').next().unwrap_or("");
                path.split('/').take(4).collect::<Vec<_>>().join("/")
            }
        };
        (self.method.clone(), prefix)
    }
}

/// A rule's handle, for [`Proxy::hits`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RuleId(usize);

#[derive(Debug, Clone)]
enum Action {
    DropResponse,
    Fail {
        status: u16,
        retry_after: Option<Duration>,
    },
}

#[derive(Debug)]
struct Rule {
    matcher: Match,
    action: Action,
    remaining: usize,
    hits: usize,
    active: bool,
}

#[derive(Default)]
struct Shared {
    rules: Mutex<Vec<Rule>>,
    seen: Mutex<Vec<Seen>>,
}

impl Shared {
    fn rules(&self) -> std::sync::MutexGuard<'_, Vec<Rule>> {
        self.rules.lock().unwrap_or_else(PoisonError::into_inner)
    }
    fn seen(&self) -> std::sync::MutexGuard<'_, Vec<Seen>> {
        self.seen.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The action of the first active rule that matches and has requests
    /// left, consuming one of them.
    fn decide(&self, r: &Seen) -> Option<Action> {
        let mut rules = self.rules();
        let rule = rules
            .iter_mut()
            .find(|rule| rule.active && rule.remaining > 0 && rule.matcher.matches(r))?;
        rule.remaining -= 1;
        rule.hits += 1;
        Some(rule.action.clone())
    }
}

/// A running proxy; stops (and closes every connection) when dropped.
pub struct Proxy {
    addr: SocketAddr,
    upstream: String,
    flavor: Flavor,
    shared: Arc<Shared>,
    /// `None` only while dropping.
    runtime: Option<tokio::runtime::Runtime>,
}

impl Proxy {
    /// Starts a proxy in front of `upstream_url` (`http://host:port`).
    pub fn start(upstream_url: &str, flavor: Flavor) -> Proxy {
        let upstream = upstream_url
            .strip_prefix("http://")
            .unwrap_or_else(|| panic!("proxy upstream {upstream_url:?} is not http://"))
            .trim_end_matches('/')
            .to_owned();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("fault-proxy")
            .enable_all()
            .build()
            .expect("the fault proxy's runtime");
        // Bound before `start` returns, so the address is live at once.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind the fault proxy");
        let addr = listener.local_addr().unwrap();
        listener.set_nonblocking(true).unwrap();
        let shared = Arc::new(Shared::default());
        let upstream_for_loop = upstream.clone();
        let shared_for_loop = shared.clone();
        runtime.spawn(async move {
            let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
            let upstream: Arc<str> = upstream_for_loop.into();
            loop {
                let Ok((conn, _)) = listener.accept().await else {
                    continue;
                };
                tokio::spawn(serve(
                    conn,
                    upstream.clone(),
                    flavor,
                    shared_for_loop.clone(),
                ));
            }
        });
        Proxy {
            addr,
            upstream,
            flavor,
            shared,
            runtime: Some(runtime),
        }
    }

    /// `http://127.0.0.1:PORT`, for the client's address / endpoint_url.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn add(&self, matcher: Match, action: Action, n: usize) -> RuleId {
        let mut rules = self.shared.rules();
        rules.push(Rule {
            matcher,
            action,
            remaining: n,
            hits: 0,
            active: true,
        });
        RuleId(rules.len() - 1)
    }

    /// The next `n` matching requests are forwarded and committed upstream,
    /// but their responses are lost: the client connection is closed.
    pub fn drop_response(&self, matcher: Match, n: usize) -> RuleId {
        self.add(matcher, Action::DropResponse, n)
    }

    /// The next `n` matching requests are answered with `status` (and a
    /// `Retry-After` header if given) without reaching the upstream.
    pub fn fail(
        &self,
        matcher: Match,
        status: u16,
        n: usize,
        retry_after: Option<Duration>,
    ) -> RuleId {
        self.add(
            matcher,
            Action::Fail {
                status,
                retry_after,
            },
            n,
        )
    }

    /// Stops every rule (their hit counts stay readable).
    pub fn clear(&self) {
        for rule in self.shared.rules().iter_mut() {
            rule.active = false;
        }
    }

    /// How many requests rule `id` has faulted so far.
    pub fn hits(&self, id: RuleId) -> usize {
        self.shared.rules()[id.0].hits
    }

    /// Every request seen so far, in order.
    pub fn seen(&self) -> Vec<Seen> {
        self.shared.seen().clone()
    }

    /// How many requests seen so far match.
    pub fn count(&self, matcher: &Match) -> usize {
        self.shared
            .seen()
            .iter()
            .filter(|r| matcher.matches(r))
            .count()
    }

    /// Requests seen per (method, path prefix or AWS operation).
    pub fn counts(&self) -> BTreeMap<(String, String), usize> {
        let mut out = BTreeMap::new();
        for r in self.shared.seen().iter() {
            *out.entry(r.bucket()).or_insert(0) += 1;
        }
        out
    }

    pub fn upstream(&self) -> &str {
        &self.upstream
    }

    pub fn flavor(&self) -> Flavor {
        self.flavor
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        // Drops every task: the listener and each connection close.
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

type Body = Full<Bytes>;

/// Serves one client connection until it closes, or until a
/// [`Action::DropResponse`] rule asks for it to be closed unanswered.
async fn serve(
    conn: tokio::net::TcpStream,
    upstream: Arc<str>,
    flavor: Flavor,
    shared: Arc<Shared>,
) {
    let hang_up = Arc::new(Notify::new());
    let service = {
        let hang_up = hang_up.clone();
        hyper::service::service_fn(move |req| {
            let (upstream, shared, hang_up) = (upstream.clone(), shared.clone(), hang_up.clone());
            async move {
                match handle(req, &upstream, flavor, &shared).await {
                    Some(response) => Ok::<_, Infallible>(response),
                    None => {
                        // Dropping the connection future (below) closes the
                        // socket before hyper writes anything.
                        hang_up.notify_one();
                        std::future::pending().await
                    }
                }
            }
        })
    };
    let connection = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(120))
        .serve_connection(TokioIo::new(conn), service);
    // A client that hangs up mid-request is not our problem.
    tokio::select! {
        _ = connection => {}
        _ = hang_up.notified() => {}
    }
}

/// The answer to one request; `None` when the client must get none.
async fn handle(
    req: Request<Incoming>,
    upstream: &str,
    flavor: Flavor,
    shared: &Shared,
) -> Option<Response<Body>> {
    let (head, body) = req.into_parts();
    let Ok(body) = body.collect().await.map(|b| b.to_bytes()) else {
        // The client went away mid-body: nobody to answer.
        return None;
    };
    let mut seen = Seen {
        method: head.method.to_string(),
        path: head
            .uri
            .path_and_query()
            .map_or_else(|| head.uri.to_string(), |p| p.as_str().to_owned()),
        amz_target: head
            .headers
            .get("x-amz-target")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned),
        body: String::from_utf8_lossy(&body).into_owned(),
        at: std::time::Instant::now(),
        fault: None,
    };
    let action = shared.decide(&seen);
    seen.fault = match &action {
        None => None,
        Some(Action::DropResponse) => Some("drop".into()),
        Some(Action::Fail { status, .. }) => Some(format!("fail {status}")),
    };
    shared.seen().push(seen);

    if let Some(Action::Fail {
        status,
        retry_after,
    }) = action
    {
        return Some(fault_response(flavor, status, retry_after));
    }
    let response = match forward(upstream, head, body).await {
        Ok(r) => r,
        Err(e) => {
            let mut r = Response::new(Body::from(format!("fault proxy: upstream {upstream}: {e}")));
            *r.status_mut() = StatusCode::BAD_GATEWAY;
            let h = r.headers_mut();
            h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
            h.insert(header::CONNECTION, HeaderValue::from_static("close"));
            return Some(r);
        }
    };
    if matches!(action, Some(Action::DropResponse)) {
        // Committed upstream (its whole response read); the client never
        // hears about it.
        return None;
    }
    Some(response)
}

/// Headers that belong to one connection, not to the message (RFC 9110
/// 7.6.1), plus the framing hyper redoes for the whole body it sends.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    for name in [
        header::CONNECTION,
        header::EXPECT,
        header::PROXY_AUTHORIZATION,
        header::TE,
        header::TRAILER,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
        HeaderName::from_static("keep-alive"),
        HeaderName::from_static("proxy-connection"),
    ] {
        headers.remove(name);
    }
}

/// Sends the request on a fresh upstream connection and reads the full
/// response (hyper skips interim 1xx responses).
async fn forward(
    upstream: &str,
    mut head: hyper::http::request::Parts,
    body: Bytes,
) -> Result<Response<Body>, Box<dyn std::error::Error + Send + Sync>> {
    let exchange = async {
        let conn = tokio::net::TcpStream::connect(upstream).await?;
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake::<_, Body>(TokioIo::new(conn)).await?;
        tokio::spawn(connection);
        // A chunked request loses its Transfer-Encoding here; hyper sends
        // it with a Content-Length, the whole body being known.
        strip_hop_by_hop(&mut head.headers);
        head.headers
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
        let response = sender
            .send_request(Request::from_parts(head, Body::new(body)))
            .await?;
        let (mut head, body) = response.into_parts();
        let body = body.collect().await?.to_bytes();
        strip_hop_by_hop(&mut head.headers);
        Ok::<_, Box<dyn std::error::Error + Send + Sync>>(Response::from_parts(
            head,
            Body::new(body),
        ))
    };
    tokio::time::timeout(Duration::from_secs(60), exchange)
        .await
        .map_err(|_| "no complete response within 60 s")?
}

/// The error response the upstream itself would send for `status`.
fn fault_response(flavor: Flavor, status: u16, retry_after: Option<Duration>) -> Response<Body> {
    let (content_type, body) = match flavor {
        Flavor::Bao => {
            let text = match status {
                // What a sealed OpenBao answers.
                503 => "Vault is sealed",
                429 => "request path: rate limit quota exceeded",
                _ => "injected fault",
            };
            (
                "application/json",
                serde_json::json!({ "errors": [text] }).to_string(),
            )
        }
        Flavor::Aws => {
            let (kind, message) = match status {
                429 | 400 => ("ThrottlingException", "Rate exceeded"),
                503 => ("ServiceUnavailable", "Service is unavailable"),
                _ => ("InternalServiceError", "injected fault"),
            };
            (
                "application/x-amz-json-1.1",
                serde_json::json!({ "__type": kind, "message": message }).to_string(),
            )
        }
    };
    let mut response = Response::new(Body::from(body));
    *response.status_mut() =
        StatusCode::from_u16(status).unwrap_or_else(|_| panic!("fault status {status}"));
    let h = response.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    if flavor == Flavor::Aws {
        h.insert(
            "x-amzn-requestid",
            HeaderValue::from_static("00000000-0000-0000-0000-000000000000"),
        );
    }
    if let Some(d) = retry_after {
        h.insert(header::RETRY_AFTER, HeaderValue::from(d.as_secs().max(1)));
    }
    response
}
