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
//! It speaks just enough HTTP/1.1 for the clients keyturn uses (reqwest under
//! vaultrs, hyper under the AWS SDK): requests and responses framed by
//! `Content-Length` or `chunked` (relayed byte for byte), `Expect:
//! 100-continue`, keep-alive towards the client. Each request gets a fresh
//! upstream connection with `Connection: close`, so an upstream response
//! without framing is read to EOF and relayed with `Connection: close`.
//! Blocking threads, one per client connection: the tests are synchronous and
//! the traffic is small.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

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
    stop: AtomicBool,
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

/// A running proxy; stops accepting when dropped.
pub struct Proxy {
    addr: std::net::SocketAddr,
    upstream: String,
    flavor: Flavor,
    shared: Arc<Shared>,
}

impl Proxy {
    /// Starts a proxy in front of `upstream_url` (`http://host:port`).
    pub fn start(upstream_url: &str, flavor: Flavor) -> Proxy {
        let upstream = upstream_url
            .strip_prefix("http://")
            .unwrap_or_else(|| panic!("proxy upstream {upstream_url:?} is not http://"))
            .trim_end_matches('/')
            .to_owned();
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the fault proxy");
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(Shared::default());
        {
            let shared = shared.clone();
            let upstream = upstream.clone();
            std::thread::spawn(move || {
                for conn in listener.incoming() {
                    if shared.stop.load(Ordering::SeqCst) {
                        return;
                    }
                    let Ok(conn) = conn else { continue };
                    let shared = shared.clone();
                    let upstream = upstream.clone();
                    std::thread::spawn(move || {
                        // A client that hangs up mid-request is not our problem.
                        let _ = serve(conn, &upstream, flavor, &shared);
                    });
                }
            });
        }
        Proxy {
            addr,
            upstream,
            flavor,
            shared,
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
        self.shared.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so it sees the flag.
        let _ = TcpStream::connect(self.addr);
    }
}

/// One HTTP message: its head (start line and headers, as text) and its
/// body bytes exactly as framed on the wire.
struct Message {
    start: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    /// The body ran to EOF (no Content-Length, not chunked).
    until_eof: bool,
}

impl Message {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn wants_close(&self) -> bool {
        self.header("connection")
            .is_some_and(|v| v.eq_ignore_ascii_case("close"))
    }

    /// The head with `Connection` replaced by `connection` and the headers
    /// named in `drop` left out.
    fn head(&self, connection: Option<&str>, drop: &[&str]) -> Vec<u8> {
        let mut out = format!("{}\r\n", self.start);
        for (n, v) in &self.headers {
            if n.eq_ignore_ascii_case("connection")
                || drop.iter().any(|d| n.eq_ignore_ascii_case(d))
            {
                continue;
            }
            out.push_str(&format!("{n}: {v}\r\n"));
        }
        if let Some(c) = connection {
            out.push_str(&format!("Connection: {c}\r\n"));
        }
        out.push_str("\r\n");
        out.into_bytes()
    }
}

fn line(r: &mut impl BufRead) -> std::io::Result<Option<String>> {
    let mut buf = Vec::new();
    if r.read_until(b'\n', &mut buf)? == 0 {
        return Ok(None);
    }
    while buf.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
        buf.pop();
    }
    Ok(Some(String::from_utf8_lossy(&buf).into_owned()))
}

fn bad(what: &str) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_owned())
}

/// Reads a start line and headers; `None` on a clean EOF before any byte.
/// A start line and its headers.
type Head = (String, Vec<(String, String)>);

fn read_head(r: &mut impl BufRead) -> std::io::Result<Option<Head>> {
    let Some(start) = line(r)? else {
        return Ok(None);
    };
    let mut headers = Vec::new();
    loop {
        let l = line(r)?.ok_or_else(|| bad("EOF inside the headers"))?;
        if l.is_empty() {
            break;
        }
        let (n, v) = l.split_once(':').ok_or_else(|| bad("malformed header"))?;
        headers.push((n.trim().to_owned(), v.trim().to_owned()));
    }
    Ok(Some((start, headers)))
}

/// Reads a body framed as the headers say. `no_body` for responses that
/// never have one; `eof_ok` for responses, whose body may run to EOF.
fn read_body(
    r: &mut impl BufRead,
    headers: &[(String, String)],
    no_body: bool,
    eof_ok: bool,
) -> std::io::Result<(Vec<u8>, bool)> {
    let get = |name: &str| {
        headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    };
    if no_body {
        return Ok((Vec::new(), false));
    }
    if get("transfer-encoding").is_some_and(|v| v.to_ascii_lowercase().contains("chunked")) {
        let mut raw = Vec::new();
        loop {
            let size_line = line(r)?.ok_or_else(|| bad("EOF inside a chunked body"))?;
            raw.extend_from_slice(size_line.as_bytes());
            raw.extend_from_slice(b"\r\n");
            let hex = size_line.split(';').next().unwrap_or("").trim();
            let size = usize::from_str_radix(hex, 16).map_err(|_| bad("bad chunk size"))?;
            if size == 0 {
                // Trailers, then the empty line.
                loop {
                    let t = line(r)?.ok_or_else(|| bad("EOF inside trailers"))?;
                    raw.extend_from_slice(t.as_bytes());
                    raw.extend_from_slice(b"\r\n");
                    if t.is_empty() {
                        return Ok((raw, false));
                    }
                }
            }
            let mut chunk = vec![0u8; size + 2];
            r.read_exact(&mut chunk)?;
            raw.extend_from_slice(&chunk);
        }
    }
    if let Some(len) = get("content-length") {
        let len: usize = len.parse().map_err(|_| bad("bad Content-Length"))?;
        let mut body = vec![0u8; len];
        r.read_exact(&mut body)?;
        return Ok((body, false));
    }
    if eof_ok {
        let mut body = Vec::new();
        r.read_to_end(&mut body)?;
        return Ok((body, true));
    }
    Ok((Vec::new(), false))
}

/// Serves one client connection until it closes.
fn serve(
    client: TcpStream,
    upstream: &str,
    flavor: Flavor,
    shared: &Shared,
) -> std::io::Result<()> {
    client.set_read_timeout(Some(Duration::from_secs(120)))?;
    let mut out = client.try_clone()?;
    let mut reader = BufReader::new(client);
    loop {
        let Some((start, headers)) = read_head(&mut reader)? else {
            return Ok(());
        };
        let expects_continue = headers.iter().any(|(n, v)| {
            n.eq_ignore_ascii_case("expect") && v.eq_ignore_ascii_case("100-continue")
        });
        if expects_continue {
            out.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")?;
        }
        let (body, _) = read_body(&mut reader, &headers, false, false)?;
        let req = Message {
            start,
            headers,
            body,
            until_eof: false,
        };
        let mut parts = req.start.split_whitespace();
        let mut seen = Seen {
            method: parts.next().unwrap_or("").to_owned(),
            path: parts.next().unwrap_or("").to_owned(),
            amz_target: req.header("x-amz-target").map(str::to_owned),
            body: String::from_utf8_lossy(&req.body).into_owned(),
            at: std::time::Instant::now(),
            fault: None,
        };
        let action = shared.decide(&seen);
        seen.fault = match &action {
            None => None,
            Some(Action::DropResponse) => Some("drop".into()),
            Some(Action::Fail { status, .. }) => Some(format!("fail {status}")),
        };
        let close_after = req.wants_close();
        shared.seen().push(seen);

        if let Some(Action::Fail {
            status,
            retry_after,
        }) = action
        {
            out.write_all(&fault_response(flavor, status, retry_after, close_after))?;
            if close_after {
                let _ = out.shutdown(Shutdown::Both);
                return Ok(());
            }
            continue;
        }

        let response = match forward(upstream, &req) {
            Ok(r) => r,
            Err(e) => {
                let body = format!("fault proxy: upstream {upstream}: {e}");
                let head = format!(
                    "HTTP/1.1 502 Bad Gateway\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                out.write_all(head.as_bytes())?;
                out.write_all(body.as_bytes())?;
                let _ = out.shutdown(Shutdown::Both);
                return Ok(());
            }
        };
        if matches!(action, Some(Action::DropResponse)) {
            // Committed upstream; the client never hears about it.
            let _ = out.shutdown(Shutdown::Both);
            return Ok(());
        }
        let close = close_after || response.until_eof;
        let connection = if close { "close" } else { "keep-alive" };
        out.write_all(&response.head(Some(connection), &[]))?;
        out.write_all(&response.body)?;
        out.flush()?;
        if close {
            let _ = out.shutdown(Shutdown::Both);
            return Ok(());
        }
    }
}

/// Sends `req` on a fresh upstream connection and reads the full response
/// (skipping interim 1xx responses).
fn forward(upstream: &str, req: &Message) -> std::io::Result<Message> {
    let conn = TcpStream::connect(upstream)?;
    conn.set_read_timeout(Some(Duration::from_secs(60)))?;
    let mut w = conn.try_clone()?;
    // The body was already read (and 100 Continue answered) by the proxy.
    w.write_all(&req.head(Some("close"), &["expect"]))?;
    w.write_all(&req.body)?;
    w.flush()?;
    let mut r = BufReader::new(conn);
    let head_request = req.start.starts_with("HEAD ");
    loop {
        let (start, headers) = read_head(&mut r)?.ok_or_else(|| bad("upstream closed"))?;
        let status: u16 = start
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| bad("bad status line"))?;
        if (100..200).contains(&status) {
            continue;
        }
        let no_body = head_request || status == 204 || status == 304;
        let (body, until_eof) = read_body(&mut r, &headers, no_body, true)?;
        return Ok(Message {
            start,
            headers,
            body,
            until_eof,
        });
    }
}

/// The error response the upstream itself would send for `status`.
fn fault_response(
    flavor: Flavor,
    status: u16,
    retry_after: Option<Duration>,
    close: bool,
) -> Vec<u8> {
    let reason = match status {
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Error",
    };
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
    let mut head = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n",
        body.len()
    );
    if flavor == Flavor::Aws {
        head.push_str("x-amzn-RequestId: 00000000-0000-0000-0000-000000000000\r\n");
    }
    if let Some(d) = retry_after {
        head.push_str(&format!("Retry-After: {}\r\n", d.as_secs().max(1)));
    }
    head.push_str(if close {
        "Connection: close\r\n"
    } else {
        "Connection: keep-alive\r\n"
    });
    head.push_str("\r\n");
    let mut out = head.into_bytes();
    out.extend_from_slice(body.as_bytes());
    out
}
