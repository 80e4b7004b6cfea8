//! The HTTP listener: `/metrics` (OpenMetrics text), `/healthz` (the process
//! is up and serving) and `/readyz` (the daemon finished start-up: state
//! opened, rotations resumed, timers armed — the daemon flips the flag).
//!
//! Without the token service it carries no secret: it is safe to expose to
//! a metrics scraper, though the default is a loopback address. With it, it
//! carries access tokens: keep it on loopback or behind TLS.
//!
//! With `[daemon] follow_nudge_key_file`, it also serves
//! `POST /v1/follow/nudge` ([`FollowNudge`]): a rotating keyturn's
//! `webhook` sink tells this follower that a credential has a new version,
//! so that it looks now instead of at its next poll. The request is
//! verified like any webhook ([`crate::sinks::webhook::verify`]: HMAC over
//! `timestamp.body`, [`NUDGE_TOLERANCE`]), its body is capped at
//! [`MAX_NUDGE_BODY`] and never logged, and it is trusted only to say
//! *which* credential to look at: the follower reads the version from its
//! own vault. Without the key file the route does not exist (404).
//!
//! With `[token_service]`, it also serves the token service ([`Routes`],
//! `crate::oauth::service`): `POST /oauth/token`, `/oauth/introspect`,
//! `/oauth/revoke`, `GET /.well-known/jwks.json` and
//! `/.well-known/oauth-authorization-server`. Those answers carry tokens:
//! never cached, never logged.
//!
//! Any local user can connect to it, so it must not let them use up the
//! daemon's file descriptors (the control socket and every delivery need
//! some). [`Limits`] bounds it: at most `max_connections` open at once (a
//! semaphore); a client has `header_read_timeout` to send each request's
//! head, which also closes a connection idle between requests (hyper's own
//! timer); and when every slot is taken, the oldest connection not serving
//! a request (idle, or still sending a request's head) is closed at once,
//! so a flood of idle or slow-header connections delays a scrape by one
//! eviction instead of shutting it out. A connection is protected only while
//! a request is being served ([`InService`]: from the end of its body, or of
//! its head when it has none, to the response's last byte), so stalled
//! bodies are evicted like stalled heads; when all are, the oldest is asked to finish its
//! request and close. An accept error (EMFILE) pauses the loop instead of
//! spinning on it.

use std::collections::BTreeMap;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use std::path::PathBuf;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, warn};

use crate::model::{AgentId, CredentialId, CredentialKey};
use crate::oauth::service::{Slot, TokenService};
use crate::sinks::webhook::{SIGNATURE_HEADER, read_key_file, verify};
use crate::telemetry::{Exposition, Metrics};

#[derive(Clone)]
struct AppState {
    metrics: Arc<Metrics>,
    ready: Arc<AtomicBool>,
    nudge: Option<Arc<FollowNudge>>,
    oauth: Option<Arc<Slot>>,
}

impl AppState {
    /// The token service now, if one is configured.
    fn oauth(&self) -> Option<Arc<TokenService>> {
        self.oauth.as_ref().and_then(|s| s.get())
    }
}

/// The optional routes: each exists only when configured.
#[derive(Clone, Default)]
pub struct Routes {
    /// `POST /v1/follow/nudge` (`[daemon] follow_nudge_key_file`).
    pub nudge: Option<Arc<FollowNudge>>,
    /// The token service's routes: `/oauth/token`, `/oauth/introspect`,
    /// `/oauth/revoke`, `/.well-known/jwks.json`,
    /// `/.well-known/oauth-authorization-server`, answered by the service
    /// in the slot (`[token_service]`, swapped on reload); 404 while the
    /// slot is empty.
    pub oauth: Option<Arc<Slot>>,
}

/// The client's address, for the audit of token requests.
#[derive(Clone, Copy)]
struct Peer(std::net::SocketAddr);

/// The path of follow nudges.
pub const NUDGE_PATH: &str = "/v1/follow/nudge";
/// The largest nudge body read (a webhook notice is well under 2 KiB).
pub const MAX_NUDGE_BODY: usize = 64 * 1024;
/// How far a nudge's signed timestamp may be from now (the webhook
/// receivers' tolerance): a captured nudge cannot be replayed later.
pub const NUDGE_TOLERANCE: Duration = Duration::from_secs(300);

/// What a verified nudge pokes: the engine (`Engine::nudge`), a fake in tests.
pub trait NudgeTarget: Send + Sync {
    fn nudge(&self, key: &CredentialKey);
}

/// `POST /v1/follow/nudge`, enabled by `[daemon] follow_nudge_key_file`.
pub struct FollowNudge {
    /// Read at every nudge (the webhook sink's key file rules), so that a
    /// replaced key takes effect at once.
    pub key_file: PathBuf,
    pub target: Arc<dyn NudgeTarget>,
    /// Refused nudges logged (anyone who reaches the listener can send
    /// them): a few a minute, then how many more.
    refused: super::refusals::Refusals,
}

impl FollowNudge {
    pub fn new(key_file: PathBuf, target: Arc<dyn NudgeTarget>) -> Self {
        FollowNudge {
            key_file,
            target,
            refused: Default::default(),
        }
    }

    /// Logs a refused nudge, at most [`super::refusals::AUDITED_PER_WINDOW`]
    /// a window; when the window ends, one line says how many more.
    fn log_refused(self: &Arc<Self>, why: &str) {
        use super::refusals::{Verdict, WINDOW};
        const EVENT: &str = "follow.nudge";
        match self.refused.check(0, EVENT, std::time::Instant::now()) {
            Verdict::Record => warn!(reason = why, "follow nudge refused"),
            Verdict::Count { summary_at: None } => {}
            Verdict::Count {
                summary_at: Some(at),
            } => {
                let nudge = Arc::clone(self);
                tokio::spawn(async move {
                    tokio::time::sleep_until(at.into()).await;
                    let more = nudge.refused.take(0, EVENT);
                    warn!(
                        "follow nudge refused {more} more times in the last {}, not logged one by one",
                        humantime::format_duration(WINDOW)
                    );
                });
            }
        }
    }
}

/// The routes, without a listener (for embedding or tests).
pub fn router(metrics: Arc<Metrics>, ready: Arc<AtomicBool>, routes: Routes) -> Router {
    let Routes { nudge, oauth } = routes;
    let mut r = Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(ready_handler));
    if nudge.is_some() {
        r = r.route(
            NUDGE_PATH,
            post(nudge_handler).layer(DefaultBodyLimit::max(MAX_NUDGE_BODY)),
        );
    }
    if let Some(slot) = &oauth {
        if slot.get().is_some() {
            metrics.oauth_configured();
        }
        use crate::oauth::service as s;
        let limit = DefaultBodyLimit::max(crate::oauth::request::MAX_BODY_BYTES);
        // The three POST endpoints differ only in the call they make.
        for (path, which) in [
            (s::TOKEN_PATH, OauthPost::Token),
            (s::INTROSPECT_PATH, OauthPost::Introspect),
            (s::REVOKE_PATH, OauthPost::Revoke),
        ] {
            let handler =
                move |state, peer, headers, body| oauth_post(which, state, peer, headers, body);
            // Another method gets the OAuth error too, not axum's bare
            // 405, and is counted like any other refusal.
            let wrong = move |state| oauth_wrong_method(which, state);
            r = r.route(path, post(handler).fallback(wrong).layer(limit));
        }
        let only_get = oauth_get_only;
        r = r
            .route(s::JWKS_PATH, get(jwks_handler).fallback(only_get))
            .route(s::METADATA_PATH, get(metadata_handler).fallback(only_get))
            // An issuer of a final `/` and no path: authlib keeps the `/`
            // (see `metadata_at`), which the wildcard below does not match.
            .route(
                &format!("{}/", s::METADATA_PATH),
                get(metadata_handler).fallback(only_get),
            )
            .route(
                &format!("{}/:tenant/jwks.json", s::TENANTS_PATH),
                get(tenant_jwks_handler).fallback(only_get),
            )
            .route(
                &format!("{}/*path", s::METADATA_PATH),
                get(metadata_at_handler).fallback(only_get),
            );
    }
    r.with_state(AppState {
        metrics,
        ready,
        nudge,
        oauth,
    })
}

/// Counts the answer in `keyturn_oauth_requests_total`.
fn counted(
    metrics: &Metrics,
    endpoint: &'static str,
    reply: crate::oauth::service::Reply,
    challenge: HeaderValue,
) -> Response {
    let result = match &reply.body {
        Some(b) if reply.status >= 400 => b["error"].as_str().unwrap_or("other"),
        _ => "ok",
    };
    metrics.oauth_request(endpoint, result);
    oauth_response_with(reply, challenge)
}

/// The scheme of a request's `Authorization` header, if it has one (`?`
/// for a value that names none).
fn authorization_scheme(headers: &HeaderMap) -> Option<String> {
    let v = headers.get(header::AUTHORIZATION)?;
    let scheme = v
        .to_str()
        .ok()
        .and_then(|v| v.split_whitespace().next())
        .filter(|s| {
            s.len() <= 32
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
        });
    Some(scheme.unwrap_or("?").to_owned())
}

/// The `WWW-Authenticate` of a 401 (RFC 6749 5.2): the scheme the client
/// tried in its `Authorization` header, or, when it authenticated in the
/// body (private_key_jwt has no HTTP scheme), `private_key_jwt`; the realm
/// the issuer.
fn challenge(scheme: Option<&str>, issuer: &str) -> HeaderValue {
    let scheme = scheme.filter(|s| *s != "?").unwrap_or("private_key_jwt");
    let realm = issuer.replace(['"', '\\'], "");
    HeaderValue::from_str(&format!("{scheme} realm=\"{realm}\""))
        .or_else(|_| HeaderValue::from_str(scheme))
        .unwrap_or_else(|_| HeaderValue::from_static("private_key_jwt"))
}

/// A token-service answer as HTTP: JSON, never cached (RFC 6749 5.1,
/// RFC 8693 2.2), `WWW-Authenticate` with a 401.
fn oauth_response(reply: crate::oauth::service::Reply) -> Response {
    oauth_response_with(reply, HeaderValue::from_static("private_key_jwt"))
}

/// [`oauth_response`] with `challenge` as the 401's `WWW-Authenticate`.
fn oauth_response_with(reply: crate::oauth::service::Reply, challenge: HeaderValue) -> Response {
    let status = StatusCode::from_u16(reply.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut headers = HeaderMap::new();
    headers.insert(header::CACHE_CONTROL, "no-store".parse().expect("static"));
    headers.insert(header::PRAGMA, "no-cache".parse().expect("static"));
    if status == StatusCode::UNAUTHORIZED {
        headers.insert(header::WWW_AUTHENTICATE, challenge);
    }
    match reply.body {
        Some(body) => {
            headers.insert(
                header::CONTENT_TYPE,
                "application/json".parse().expect("static"),
            );
            (status, headers, body.to_string()).into_response()
        }
        None => (status, headers).into_response(),
    }
}

/// 404 on a token-service path while the token service is not configured,
/// never cached either: a cached 404 would outlive the reload that turns
/// the service on.
fn oauth_off() -> Response {
    let mut r = StatusCode::NOT_FOUND.into_response();
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

/// An `invalid_request` answer with `status`, as the token service words
/// its own (JSON, `no-store`).
fn invalid_request(status: u16, description: &str) -> Response {
    oauth_response(crate::oauth::service::Reply {
        status,
        body: Some(serde_json::json!({
            "error": "invalid_request",
            "error_description": description,
        })),
    })
}

/// RFC 6749 3.2 and RFC 7662/7009: the body is a form.
fn form_content_type(headers: &HeaderMap) -> Option<Response> {
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let mime = ct.split(';').next().unwrap_or("").trim();
    if mime.eq_ignore_ascii_case("application/x-www-form-urlencoded") {
        return None;
    }
    Some(invalid_request(
        400,
        "send the parameters as application/x-www-form-urlencoded",
    ))
}

/// A method other than POST on a token-service endpoint: 405 with `Allow`,
/// worded as the service's other errors (404 while it is not configured).
async fn oauth_wrong_method(which: OauthPost, State(state): State<AppState>) -> Response {
    if state.oauth().is_some() {
        state.metrics.oauth_request(which.name(), "invalid_request");
    }
    method_not_allowed(&state, "POST", "use POST with a form body")
}

/// A method other than GET on the JWKS or metadata: as
/// [`oauth_wrong_method`], `Allow: GET`.
async fn oauth_get_only(State(state): State<AppState>) -> Response {
    method_not_allowed(&state, "GET", "use GET")
}

fn method_not_allowed(state: &AppState, allow: &'static str, description: &str) -> Response {
    if state.oauth().is_none() {
        return oauth_off();
    }
    let mut r = invalid_request(405, description);
    r.headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static(allow));
    r
}

/// The token service's POST endpoints.
#[derive(Clone, Copy)]
enum OauthPost {
    Token,
    Introspect,
    Revoke,
}

impl OauthPost {
    /// The `endpoint` label of `keyturn_oauth_requests_total`.
    fn name(self) -> &'static str {
        match self {
            OauthPost::Token => "token",
            OauthPost::Introspect => "introspect",
            OauthPost::Revoke => "revoke",
        }
    }
}

/// The body, or why it could not be read (over the body limit).
type OauthBody = Result<Bytes, axum::extract::rejection::BytesRejection>;

/// A form POST to the token service: 404 when it is not configured, 400
/// for another content type, 413 for a body over the limit (both
/// `invalid_request`), else the service's answer; each counted.
async fn oauth_post(
    which: OauthPost,
    State(state): State<AppState>,
    axum::Extension(Peer(peer)): axum::Extension<Peer>,
    headers: HeaderMap,
    body: OauthBody,
) -> Response {
    let Some(oauth) = state.oauth() else {
        return oauth_off();
    };
    let name = which.name();
    if let Some(r) = form_content_type(&headers) {
        state.metrics.oauth_request(name, "invalid_request");
        return r;
    }
    let body = match body {
        Ok(body) => body,
        Err(rejection) => {
            state.metrics.oauth_request(name, "invalid_request");
            let status = rejection.status().as_u16();
            let description = if status == 413 {
                format!(
                    "the body is over {} bytes",
                    crate::oauth::request::MAX_BODY_BYTES
                )
            } else {
                "cannot read the body".to_owned()
            };
            return invalid_request(status, &description);
        }
    };
    let peer = peer.to_string();
    let scheme = authorization_scheme(&headers);
    let scheme = scheme.as_deref();
    let reply = match which {
        OauthPost::Token => oauth.token(&body, &peer, scheme).await,
        OauthPost::Introspect => oauth.introspect(&body, scheme).await,
        OauthPost::Revoke => oauth.revoke(&body, &peer, scheme).await,
    };
    counted(
        &state.metrics,
        name,
        reply,
        challenge(scheme, oauth.issuer()),
    )
}

async fn jwks_handler(State(state): State<AppState>) -> Response {
    match state.oauth() {
        Some(oauth) => oauth_response(oauth.jwks(None).await),
        None => oauth_off(),
    }
}

async fn metadata_handler(State(state): State<AppState>) -> Response {
    match state.oauth() {
        Some(oauth) => oauth_response(oauth.metadata(None)),
        None => oauth_off(),
    }
}

/// A tenant's own JWKS (`[token_service.tenants.NAME]`).
async fn tenant_jwks_handler(
    State(state): State<AppState>,
    axum::extract::Path(tenant): axum::extract::Path<String>,
) -> Response {
    match state.oauth() {
        Some(oauth) => oauth_response(oauth.jwks(Some(&tenant)).await),
        None => oauth_off(),
    }
}

/// The metadata of an issuer with a path (RFC 8414 3.1: the issuer's path
/// after the well-known suffix): the service's own, or a tenant's.
async fn metadata_at_handler(
    State(state): State<AppState>,
    axum::extract::Path(path): axum::extract::Path<String>,
) -> Response {
    match state.oauth() {
        Some(oauth) => oauth_response(oauth.metadata_at(&path)),
        None => oauth_off(),
    }
}

/// The only part of the notice a nudge is trusted for: which credential.
#[derive(serde::Deserialize)]
struct NudgeBody {
    agent: String,
    credential: String,
}

/// 202 once verified and handed over; 401 for a missing, malformed, stale
/// or wrong signature; 400 for a body that names no credential; 413 (the
/// body limit) for an oversized one; 500 when the key file cannot be read.
/// The body is never logged.
async fn nudge_handler(State(state): State<AppState>, headers: HeaderMap, body: Bytes) -> Response {
    let Some(nudge) = state.nudge else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let path = nudge.key_file.clone();
    let key = match tokio::task::spawn_blocking(move || read_key_file(&path)).await {
        Ok(Ok(key)) => key,
        Ok(Err(e)) => {
            error!(error = %e, "follow nudge: cannot read the nudge key");
            return StatusCode::INTERNAL_SERVER_ERROR.into_response();
        }
        Err(e) => {
            error!(error = %e, "follow nudge: reading the nudge key panicked");
            return StatusCode::INTERNAL_SERVER_ERROR.into_response();
        }
    };
    let Some(signature) = headers.get(SIGNATURE_HEADER).and_then(|h| h.to_str().ok()) else {
        nudge.log_refused(&format!("no {SIGNATURE_HEADER} header"));
        return StatusCode::UNAUTHORIZED.into_response();
    };
    let now = chrono::Utc::now().timestamp();
    if let Err(why) = verify(key.expose(), signature, &body, now, NUDGE_TOLERANCE) {
        nudge.log_refused(&format!("bad signature: {why}"));
        return StatusCode::UNAUTHORIZED.into_response();
    }
    drop(key);
    let named = serde_json::from_slice::<NudgeBody>(&body)
        .ok()
        .and_then(|b| {
            Some(CredentialKey::new(
                AgentId::new(&b.agent).ok()?,
                CredentialId::new(&b.credential).ok()?,
            ))
        });
    let Some(cred) = named else {
        nudge.log_refused("the body names no AGENT/CREDENTIAL");
        return (
            StatusCode::BAD_REQUEST,
            "expected a keyturn webhook notice naming agent and credential\n",
        )
            .into_response();
    };
    nudge.target.nudge(&cred);
    StatusCode::ACCEPTED.into_response()
}

async fn metrics_handler(State(state): State<AppState>, headers: HeaderMap) -> Response {
    let as_ = Exposition::from_accept(headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()));
    // With 100k credentials the per-credential collector writes 200k lines;
    // do that off the async workers so a scrape never stalls the socket API.
    let metrics = Arc::clone(&state.metrics);
    match tokio::task::spawn_blocking(move || metrics.encode_as(as_)).await {
        Ok(body) => ([(header::CONTENT_TYPE, as_.content_type())], body).into_response(),
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

/// How many requests a connection is serving: from the service's call to
/// the drop of the response's body (hyper drops it once written).
type Serving = Arc<AtomicUsize>;

/// Counts one request as served until dropped.
struct InService(Serving);

impl InService {
    fn new(serving: &Serving) -> InService {
        serving.fetch_add(1, Ordering::AcqRel);
        InService(Arc::clone(serving))
    }
}

impl Drop for InService {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Where a request's [`InService`] is kept until its response takes it.
type Started = Arc<Mutex<Option<InService>>>;

/// Counts `started`'s request as served, once.
fn start_serving(started: &Started, serving: &Serving) {
    let mut started = started.lock().unwrap_or_else(|p| p.into_inner());
    if started.is_none() {
        *started = Some(InService::new(serving));
    }
}

/// What a [`Watched`] body does besides forwarding the body it wraps: it
/// lives as long as the body, and is told when the body has ended.
trait BodyWatch: Send + Unpin + 'static {
    fn ended(&mut self) {}
}

/// On a response body: keeps its request counted as served until hyper has
/// written (and dropped) it.
impl BodyWatch for Option<InService> {}

/// On a request body: counts its request as served from its end on. A
/// client that stalls while sending a body is as evictable as one still
/// sending its head, so stalled bodies cannot hold every slot.
struct ServedFromEnd {
    serving: Serving,
    started: Started,
}

impl BodyWatch for ServedFromEnd {
    fn ended(&mut self) {
        start_serving(&self.started, &self.serving);
    }
}

/// A body forwarded as it is, with a [`BodyWatch`] attached.
struct Watched<W> {
    inner: axum::body::Body,
    watch: W,
}

impl<W: BodyWatch> axum::body::HttpBody for Watched<W> {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, axum::Error>>> {
        let this = self.get_mut();
        let polled = std::pin::Pin::new(&mut this.inner).poll_frame(cx);
        if matches!(polled, std::task::Poll::Ready(None)) || this.inner.is_end_stream() {
            this.watch.ended();
        }
        polled
    }
    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }
    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// Marks the connection's requests as served while they are: from the end
/// of the request's body (its head, when it has none) to the response's
/// last byte.
async fn count_serving(
    serving: Serving,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    use axum::body::HttpBody;
    let started = Started::default();
    let request = if request.body().is_end_stream() {
        start_serving(&started, &serving);
        request
    } else {
        request.map(|inner| {
            axum::body::Body::new(Watched {
                inner,
                watch: ServedFromEnd {
                    serving: Arc::clone(&serving),
                    started: Arc::clone(&started),
                },
            })
        })
    };
    let response = next.run(request).await;
    // A handler that answered without reading the body.
    start_serving(&started, &serving);
    let guard = started.lock().unwrap_or_else(|p| p.into_inner()).take();
    response.map(|inner| {
        axum::body::Body::new(Watched {
            inner,
            watch: guard,
        })
    })
}

/// The open connections by age, each with the token that asks it to close
/// and the count of requests it is serving.
#[derive(Default)]
struct Open {
    next_id: u64,
    by_age: BTreeMap<u64, (CancellationToken, Serving)>,
}

impl Open {
    fn add(&mut self, token: CancellationToken, serving: Serving) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        self.by_age.insert(id, (token, serving));
        id
    }
    /// Closes the oldest connection not serving a request (idle, or still
    /// sending a head); when every one is, asks the oldest to finish and
    /// close.
    fn evict_oldest(&mut self) {
        let idle = self
            .by_age
            .iter()
            .find(|(_, (_, serving))| serving.load(Ordering::Acquire) == 0)
            .map(|(id, _)| *id);
        let evicted = match idle {
            Some(id) => self.by_age.remove(&id),
            None => self.by_age.pop_first().map(|(_, c)| c),
        };
        if let Some((token, _)) = evicted {
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
    routes: Routes,
) -> io::Result<()> {
    if let Ok(addr) = listener.local_addr() {
        // The slot is there whether or not `[token_service]` is configured
        // (a reload may fill or empty it); the routes answer 404 while empty.
        let token_service = routes.oauth.as_ref().is_some_and(|s| s.get().is_some());
        info!(
            listen = %addr,
            max_connections = limits.max_connections,
            follow_nudge = routes.nudge.is_some(),
            token_service,
            "HTTP listener serving /metrics /healthz /readyz{}{}",
            if routes.nudge.is_some() { ", POST /v1/follow/nudge" } else { "" },
            if token_service { ", the token service's routes (/oauth/*, /.well-known/*)" } else { "" },
        );
    }
    let app = router(metrics, ready, routes);
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let open = Arc::new(Mutex::new(Open::default()));
    let connections = TaskTracker::new();
    loop {
        let accepted = tokio::select! {
            biased;
            _ = cancel.cancelled() => break,
            r = listener.accept() => r,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
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
        let serving = Serving::default();
        let id = open
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .add(token.clone(), Arc::clone(&serving));
        let counted = Arc::clone(&serving);
        let service =
            TowerToHyperService::new(app.clone().layer(axum::Extension(Peer(peer))).layer(
                axum::middleware::from_fn(move |req, next| {
                    count_serving(Arc::clone(&counted), req, next)
                }),
            ));
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
                    if serving.load(Ordering::Acquire) == 0 {
                        // Not serving a request (idle, or a head not
                        // finished): closed now, so a slow header cannot
                        // hold its slot.
                        Ok(())
                    } else {
                        conn.as_mut().graceful_shutdown();
                        tokio::time::timeout(FINISH_TIMEOUT, conn.as_mut())
                            .await
                            .unwrap_or(Ok(()))
                    }
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
        get_with(addr, path, "").await
    }

    async fn get_with(
        addr: std::net::SocketAddr,
        path: &str,
        headers: &str,
    ) -> (u16, String, String) {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let req =
            format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n{headers}Connection: close\r\n\r\n");
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
                max_age_seconds: None,
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
            Routes::default(),
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
            head.contains("content-type: text/plain; version=0.0.4; charset=utf-8"),
            "{head}"
        );
        assert!(
            body.contains("# TYPE keyturn_rotations_total counter") && !body.contains("# EOF"),
            "{body}"
        );
        let (status, head, open) = get_with(
            addr,
            "/metrics",
            "Accept: application/openmetrics-text; version=1.0.0\r\n",
        )
        .await;
        assert_eq!(status, 200);
        assert!(
            head.contains(
                "content-type: application/openmetrics-text; version=1.0.0; charset=utf-8"
            ),
            "{head}"
        );
        assert!(open.ends_with("# EOF\n"), "{open}");
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
            Routes::default(),
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

    use crate::test_support::closed_within;

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

    /// Slowloris against the cap: connections that sent part of a head (one
    /// of them still trickling header lines) are evicted like idle ones, so
    /// a scrape gets in at once, not after the header timeout.
    #[tokio::test]
    async fn unfinished_heads_do_not_shut_out_a_scrape() {
        let (addr, cancel, server) = start(Limits {
            max_connections: 4,
            header_read_timeout: Duration::from_secs(60),
        });
        let mut partial = Vec::new();
        for _ in 0..10 {
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
                .await
                .unwrap();
            partial.push(s);
        }
        let trickler = partial.last_mut().unwrap();
        trickler.write_all(b"X-1: y\r\n").await.unwrap();
        for _ in 0..3 {
            let (status, _, body) =
                tokio::time::timeout(Duration::from_secs(5), get(addr, "/healthz"))
                    .await
                    .expect("/healthz must answer while unfinished heads fill every slot");
            assert_eq!((status, body.as_str()), (200, "ok"));
        }
        closed_within(&mut partial[0], Duration::from_secs(5)).await;
        stop(cancel, server).await;
    }

    /// Defect: a request whose body stalled counted as served, so 64 of
    /// them (head sent, `Content-Length: 60000`, 2 bytes of body) held
    /// every slot, and a scrape waited for the oldest one's finish timeout
    /// (10 s). A stalled body is evicted like a stalled head; a request
    /// whose body is in is still served to the end.
    #[tokio::test]
    async fn stalled_request_bodies_do_not_shut_out_a_scrape() {
        let dir = tempfile::tempdir().unwrap();
        let (addr, recorder, cancel, server) = start_nudged_with(
            &dir,
            Limits {
                max_connections: 4,
                header_read_timeout: Duration::from_secs(60),
            },
        );
        let mut stalled = Vec::new();
        for _ in 0..10 {
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            s.write_all(
                format!(
                    "POST {NUDGE_PATH} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 60000\r\n\r\n{{}}"
                )
                .as_bytes(),
            )
            .await
            .unwrap();
            stalled.push(s);
        }
        for _ in 0..3 {
            let started = std::time::Instant::now();
            let (status, _, body) =
                tokio::time::timeout(Duration::from_secs(5), get(addr, "/healthz"))
                    .await
                    .expect("/healthz must answer while stalled bodies fill every slot");
            assert_eq!((status, body.as_str()), (200, "ok"));
            assert!(
                started.elapsed() < Duration::from_secs(2),
                "waited {:?} for a slot",
                started.elapsed()
            );
        }
        closed_within(&mut stalled[0], Duration::from_secs(5)).await;
        // A whole (signed) nudge is still served.
        let body = notice("bot", "db");
        let sig = crate::sinks::webhook::sign(NUDGE_KEY, now(), &body);
        assert_eq!(post_nudge(addr, &body, Some(sig)).await, 202);
        assert_eq!(recorder.0.lock().unwrap().len(), 1);
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

    /// Records what it was nudged for.
    #[derive(Default)]
    struct Recorder(Mutex<Vec<CredentialKey>>);

    impl NudgeTarget for Recorder {
        fn nudge(&self, key: &CredentialKey) {
            self.0.lock().unwrap().push(key.clone());
        }
    }

    const NUDGE_KEY: &[u8] = b"0123456789abcdef0123456789abcdef-nudge";

    fn start_nudged(
        dir: &tempfile::TempDir,
    ) -> (
        std::net::SocketAddr,
        Arc<Recorder>,
        CancellationToken,
        tokio::task::JoinHandle<io::Result<()>>,
    ) {
        start_nudged_with(dir, Limits::for_nofile(1024))
    }

    fn start_nudged_with(
        dir: &tempfile::TempDir,
        limits: Limits,
    ) -> (
        std::net::SocketAddr,
        Arc<Recorder>,
        CancellationToken,
        tokio::task::JoinHandle<io::Result<()>>,
    ) {
        use std::os::unix::fs::PermissionsExt;
        let key_file = dir.path().join("nudge.key");
        std::fs::write(&key_file, NUDGE_KEY).unwrap();
        std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600)).unwrap();
        let recorder = Arc::new(Recorder::default());
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let cancel = CancellationToken::new();
        let server = tokio::spawn(serve_http(
            tokio::net::TcpListener::from_std(listener).unwrap(),
            Arc::new(Metrics::new()),
            Arc::new(AtomicBool::new(true)),
            cancel.clone(),
            limits,
            Routes {
                nudge: Some(Arc::new(FollowNudge::new(key_file, recorder.clone()))),
                ..Routes::default()
            },
        ));
        (addr, recorder, cancel, server)
    }

    /// POSTs `body` to the nudge path with `signature` (if any); the status.
    async fn post_nudge(addr: std::net::SocketAddr, body: &[u8], signature: Option<String>) -> u16 {
        let client = reqwest::Client::builder().no_proxy().build().unwrap();
        let mut req = client
            .post(format!("http://{addr}{NUDGE_PATH}"))
            .header("Content-Type", "application/json")
            .header("Idempotency-Key", "rot-1")
            .body(body.to_vec());
        if let Some(sig) = signature {
            req = req.header(SIGNATURE_HEADER, sig);
        }
        req.send().await.unwrap().status().as_u16()
    }

    fn notice(agent: &str, credential: &str) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({
            "agent": agent, "credential": credential, "tenant": "acme",
            "version": 7, "previous_version": 6, "rotation": "rot-1",
            "rotated_at": "2026-12-03T19:00:00Z", "grace_until": null,
            "file": null, "login": null, "kind": "password",
        }))
        .unwrap()
    }

    fn now() -> i64 {
        chrono::Utc::now().timestamp()
    }

    #[tokio::test]
    async fn a_nudge_signed_like_a_webhook_pokes_the_engine_for_that_credential() {
        let dir = tempfile::tempdir().unwrap();
        let (addr, recorder, cancel, server) = start_nudged(&dir);
        let body = notice("bot", "db");
        let sig = crate::sinks::webhook::sign(NUDGE_KEY, now(), &body);
        assert_eq!(post_nudge(addr, &body, Some(sig)).await, 202);
        let poked = recorder.0.lock().unwrap().clone();
        assert_eq!(poked.len(), 1, "{poked:?}");
        assert_eq!(poked[0].agent.as_str(), "bot");
        assert_eq!(poked[0].credential.as_str(), "db");
        // A GET on the path is not a nudge.
        let (status, _, _) = get(addr, NUDGE_PATH).await;
        assert_eq!(status, 405);
        assert_eq!(recorder.0.lock().unwrap().len(), 1);
        stop(cancel, server).await;
    }

    #[tokio::test]
    async fn nudges_with_a_bad_missing_or_stale_signature_are_refused_and_poke_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let (addr, recorder, cancel, server) = start_nudged(&dir);
        let body = notice("bot", "db");
        let wrong_key = b"another-key-of-enough-length-0123456789";
        let cases: Vec<(&str, Option<String>, Vec<u8>)> = vec![
            ("missing", None, body.clone()),
            ("malformed", Some("v1=zz".into()), body.clone()),
            (
                "wrong key",
                Some(crate::sinks::webhook::sign(wrong_key, now(), &body)),
                body.clone(),
            ),
            (
                "stale (10 minutes old)",
                Some(crate::sinks::webhook::sign(NUDGE_KEY, now() - 600, &body)),
                body.clone(),
            ),
            (
                "tampered body",
                Some(crate::sinks::webhook::sign(NUDGE_KEY, now(), &body)),
                notice("bot", "other"),
            ),
        ];
        for (what, sig, sent) in cases {
            assert_eq!(post_nudge(addr, &sent, sig).await, 401, "{what}");
        }
        assert!(recorder.0.lock().unwrap().is_empty());
        stop(cancel, server).await;
    }

    #[tokio::test]
    async fn an_oversized_or_nameless_nudge_is_refused_and_pokes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let (addr, recorder, cancel, server) = start_nudged(&dir);
        let big = vec![b' '; MAX_NUDGE_BODY + 1];
        let sig = crate::sinks::webhook::sign(NUDGE_KEY, now(), &big);
        assert_eq!(post_nudge(addr, &big, Some(sig)).await, 413);
        // Signed, but naming no valid credential.
        for body in [
            b"{\"agent\":\"bot\"}".to_vec(),
            b"not json".to_vec(),
            notice("../etc", "db"),
        ] {
            let sig = crate::sinks::webhook::sign(NUDGE_KEY, now(), &body);
            assert_eq!(post_nudge(addr, &body, Some(sig)).await, 400);
        }
        assert!(recorder.0.lock().unwrap().is_empty());
        stop(cancel, server).await;
    }

    #[tokio::test]
    async fn without_a_nudge_key_there_is_no_nudge_route() {
        let (addr, cancel, server) = start(Limits::for_nofile(1024));
        let body = notice("bot", "db");
        let sig = crate::sinks::webhook::sign(NUDGE_KEY, now(), &body);
        assert_eq!(post_nudge(addr, &body, Some(sig)).await, 404);
        stop(cancel, server).await;
    }
}
