//! The webhook sink's tests: real receivers on loopback (an axum server in
//! the test, and the reference receiver `examples/webhook_receiver.py` as a
//! subprocess), the address guard with injected DNS answers, and the
//! value kept out of everything but the body it was asked into.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use chrono::TimeZone;
use tokio::io::{AsyncBufReadExt, BufReader};

use super::*;
use crate::model::{RotationId, ValueKind};
use crate::test_support::{capture_logs, key, secret};

const KEY: &str = "0123456789abcdef0123456789abcdef-test-key";
const CANARY: &str = "canary-Zq7Lw3-webhook-secret";

fn notice() -> Notice {
    Notice {
        key: key("hook-bot", "db"),
        tenant: "acme".into(),
        owner: "alice@example.com".into(),
        version: 8,
        previous_version: Some(7),
        rotation: RotationId::parse(&format!("{:032x}", 8)).unwrap(),
        rotated_at: Utc.with_ymd_and_hms(2026, 1, 2, 3, 4, 5).unwrap(),
        expires_hint: None,
        kind: ValueKind::Password,
        public: None,
        login: Some("hook_bot_b".into()),
        grace_until: Some(Utc.with_ymd_and_hms(2026, 1, 2, 3, 19, 5).unwrap()),
        file: Some("/run/keyturn/agents/hook-bot/db".into()),
    }
}

fn key_file(dir: &Path) -> PathBuf {
    let p = dir.join("hook.key");
    std::fs::write(&p, format!("{KEY}\n")).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    p
}

fn ctx() -> SinkContext<'static> {
    SinkContext {
        delivery_roots: &[],
        uid: None,
        gid: None,
        former_uid: None,
        reader: None,
    }
}

fn sink(cfg: WebhookConfig, lookup: Option<Arc<dyn Lookup>>) -> WebhookSink {
    WebhookSink::new(cfg, &ctx(), lookup).unwrap()
}

/// What a test receiver got.
#[derive(Clone)]
struct Got {
    headers: HeaderMap,
    body: Bytes,
}

/// A receiver on 127.0.0.1 answering `status` with `headers` (and
/// `Connection: close`, so every delivery resolves the name afresh).
struct Receiver {
    addr: SocketAddr,
    got: Arc<Mutex<Vec<Got>>>,
}

impl Receiver {
    async fn start(status: StatusCode, headers: Vec<(&'static str, String)>) -> Receiver {
        Self::start_slow(status, headers, Duration::ZERO).await
    }

    async fn start_slow(
        status: StatusCode,
        headers: Vec<(&'static str, String)>,
        delay: Duration,
    ) -> Receiver {
        type St = (
            Arc<Mutex<Vec<Got>>>,
            StatusCode,
            Vec<(&'static str, String)>,
            Duration,
        );
        async fn handle(
            State((got, status, extra, delay)): State<St>,
            headers: HeaderMap,
            body: Bytes,
        ) -> axum::response::Response {
            got.lock().unwrap().push(Got { headers, body });
            tokio::time::sleep(delay).await;
            let mut r = (status, "the receiver's own words, never logged").into_response();
            for (k, v) in extra {
                r.headers_mut().insert(k, v.parse().unwrap());
            }
            r.headers_mut()
                .insert("connection", HeaderValue::from_static("close"));
            r
        }
        let got = Arc::new(Mutex::new(Vec::new()));
        let app =
            axum::Router::new()
                .fallback(handle)
                .with_state((got.clone(), status, headers, delay));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Receiver { addr, got }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    fn got(&self) -> Vec<Got> {
        self.got.lock().unwrap().clone()
    }
}

/// Scripted DNS: the answers for successive lookups (the last repeats).
struct Scripted {
    answers: Vec<Vec<IpAddr>>,
    calls: AtomicUsize,
}

impl Scripted {
    fn new(answers: Vec<Vec<IpAddr>>) -> Arc<Scripted> {
        Arc::new(Scripted {
            answers,
            calls: AtomicUsize::new(0),
        })
    }
    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

#[async_trait]
impl Lookup for Scripted {
    async fn lookup(&self, _host: &str) -> std::io::Result<Vec<IpAddr>> {
        let n = self.calls.fetch_add(1, Ordering::SeqCst);
        Ok(self.answers[n.min(self.answers.len() - 1)].clone())
    }
}

const LOCAL: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
const METADATA: IpAddr = IpAddr::V4(Ipv4Addr::new(169, 254, 169, 254));

fn open() -> Policy {
    Policy {
        allow_private: false,
        loopback_only: false,
    }
}

#[test]
fn the_guard_refuses_link_local_metadata_and_private_and_unwraps_ipv4_in_ipv6() {
    use guard::Refusal::*;
    let cases: &[(&str, Result<(), guard::Refusal>)] = &[
        ("127.0.0.1", Ok(())),
        ("127.3.4.5", Ok(())),
        ("::1", Ok(())),
        ("93.184.216.34", Ok(())),
        ("2606:4700::1111", Ok(())),
        ("169.254.169.254", Err(Metadata)),
        ("100.100.100.200", Err(Metadata)),
        ("fd00:ec2::254", Err(Metadata)),
        ("168.63.129.16", Err(Metadata)),
        ("192.0.0.192", Err(Metadata)),
        ("169.254.1.1", Err(LinkLocal)),
        ("fe80::1", Err(LinkLocal)),
        ("febf::1", Err(LinkLocal)),
        ("0.0.0.0", Err(Unspecified)),
        ("0.1.2.3", Err(Unspecified)),
        ("::", Err(Unspecified)),
        ("224.0.0.1", Err(Multicast)),
        ("ff02::1", Err(Multicast)),
        ("255.255.255.255", Err(Broadcast)),
        ("240.0.0.1", Err(Reserved)),
        ("10.1.2.3", Err(Private)),
        ("172.16.0.1", Err(Private)),
        ("172.31.255.254", Err(Private)),
        ("192.168.1.1", Err(Private)),
        ("100.64.0.1", Err(Private)),
        ("fc00::1", Err(Private)),
        ("fd12:3456::1", Err(Private)),
        // IPv4 carried in IPv6 is judged as IPv4.
        ("::ffff:169.254.169.254", Err(Metadata)),
        ("::ffff:127.0.0.1", Ok(())),
        ("::ffff:10.0.0.1", Err(Private)),
        ("::169.254.169.254", Err(Metadata)),
        ("64:ff9b::a9fe:a9fe", Err(Metadata)),
        ("64:ff9b::10.0.0.1", Err(Private)),
        ("2002:a9fe:a9fe::1", Err(Metadata)),
        // Outside the ranges.
        ("172.32.0.1", Ok(())),
        ("100.128.0.1", Ok(())),
    ];
    for (ip, want) in cases {
        let got = guard::check(ip.parse().unwrap(), open());
        assert_eq!(got, *want, "{ip}");
    }
    let private = Policy {
        allow_private: true,
        loopback_only: false,
    };
    for ip in [
        "10.1.2.3",
        "192.168.1.1",
        "100.64.0.1",
        "fd12::1",
        "::ffff:10.0.0.1",
    ] {
        assert_eq!(guard::check(ip.parse().unwrap(), private), Ok(()), "{ip}");
    }
    // Metadata and link-local stay refused with allow_private.
    for ip in [
        "169.254.169.254",
        "100.100.100.200",
        "fd00:ec2::254",
        "fe80::1",
    ] {
        assert!(guard::check(ip.parse().unwrap(), private).is_err(), "{ip}");
    }
    let loopback_only = Policy {
        allow_private: true,
        loopback_only: true,
    };
    assert_eq!(guard::check(LOCAL, loopback_only), Ok(()));
    assert_eq!(guard::check("::1".parse().unwrap(), loopback_only), Ok(()));
    assert_eq!(
        guard::check("10.0.0.1".parse().unwrap(), loopback_only),
        Err(NotLoopback)
    );
}

#[test]
fn a_signature_verifies_and_a_tampered_body_or_an_old_timestamp_does_not() {
    let body = br#"{"agent":"a","version":2}"#;
    let t = 1_767_000_000;
    let header = sign(KEY.as_bytes(), t, body);
    assert!(header.starts_with(&format!("t={t},v1=")), "{header}");
    assert_eq!(header.len(), format!("t={t},v1=").len() + 64);
    let five_min = Duration::from_secs(300);
    assert_eq!(
        verify(KEY.as_bytes(), &header, body, t + 10, five_min),
        Ok(())
    );
    assert_eq!(
        verify(
            KEY.as_bytes(),
            &header,
            br#"{"agent":"a","version":3}"#,
            t,
            five_min
        ),
        Err(BadSignature::Mismatch)
    );
    assert_eq!(
        verify(
            b"another key of thirty-two bytes!!",
            &header,
            body,
            t,
            five_min
        ),
        Err(BadSignature::Mismatch)
    );
    assert_eq!(
        verify(KEY.as_bytes(), &header, body, t + 301, five_min),
        Err(BadSignature::Stale)
    );
    // The timestamp is signed: moving it forward breaks the signature.
    let moved = header.replace(&format!("t={t}"), &format!("t={}", t + 400));
    assert_eq!(
        verify(KEY.as_bytes(), &moved, body, t + 400, five_min),
        Err(BadSignature::Mismatch)
    );
    assert_eq!(
        verify(KEY.as_bytes(), "v1=00", body, t, five_min),
        Err(BadSignature::Malformed)
    );
}

#[tokio::test]
async fn a_delivery_is_one_signed_post_with_the_notice() {
    let dir = tempfile::tempdir().unwrap();
    let r = Receiver::start(StatusCode::NO_CONTENT, vec![]).await;
    let s = sink(
        WebhookConfig::new(r.url("/rotated?token=query-secret"), key_file(dir.path())),
        None,
    );
    assert_eq!(
        s.describe(),
        format!("webhook:http://127.0.0.1:{}/rotated", r.addr.port())
    );
    assert_eq!(s.kind(), "webhook");
    let before = Utc::now().timestamp();
    let out = s.deliver(&notice(), &secret(CANARY)).await.unwrap();
    assert_eq!(out, Delivered::Acknowledged);

    let got = r.got();
    assert_eq!(got.len(), 1);
    let h = &got[0].headers;
    assert_eq!(h["content-type"], "application/json");
    assert_eq!(h["idempotency-key"], "00000000000000000000000000000008");
    assert_eq!(
        h["user-agent"],
        concat!("keyturn/", env!("CARGO_PKG_VERSION"))
    );
    let sig = h["keyturn-signature"].to_str().unwrap();
    let now = Utc::now().timestamp();
    verify(
        KEY.as_bytes(),
        sig,
        &got[0].body,
        now,
        Duration::from_secs(300),
    )
    .unwrap();
    let t: i64 = sig[2..sig.find(',').unwrap()].parse().unwrap();
    assert!((before..=now).contains(&t), "{t} not in {before}..={now}");

    let body: serde_json::Value = serde_json::from_slice(&got[0].body).unwrap();
    assert_eq!(
        body,
        serde_json::json!({
            "agent": "hook-bot",
            "credential": "db",
            "tenant": "acme",
            "version": 8,
            "previous_version": 7,
            "rotation": "00000000000000000000000000000008",
            "rotated_at": "2026-01-02T03:04:05Z",
            "grace_until": "2026-01-02T03:19:05Z",
            "file": "/run/keyturn/agents/hook-bot/db",
            "login": "hook_bot_b",
            "kind": "password",
        })
    );
    assert!(!String::from_utf8_lossy(&got[0].body).contains(CANARY));
}

/// The reference receiver (`examples/webhook_receiver.py`), as a subprocess.
struct PyReceiver {
    child: tokio::process::Child,
    lines: tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
    port: u16,
}

impl PyReceiver {
    async fn start(key_file: &Path) -> PyReceiver {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/webhook_receiver.py");
        let mut child = tokio::process::Command::new("python3")
            .arg(script)
            .arg("--key-file")
            .arg(key_file)
            .args(["--port", "0"])
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("python3 runs");
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let first = Self::next(&mut lines).await;
        let port = first["listening"].as_u64().expect("a port") as u16;
        PyReceiver { child, lines, port }
    }

    async fn next(
        lines: &mut tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
    ) -> serde_json::Value {
        let line = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
            .await
            .expect("the receiver answers")
            .unwrap()
            .expect("a line");
        serde_json::from_str(&line).unwrap()
    }

    async fn line(&mut self) -> serde_json::Value {
        Self::next(&mut self.lines).await
    }
}

#[tokio::test]
async fn the_reference_receiver_verifies_a_delivery_and_refuses_tampering_and_replays() {
    let dir = tempfile::tempdir().unwrap();
    let kf = key_file(dir.path());
    let mut py = PyReceiver::start(&kf).await;
    let url = format!("http://127.0.0.1:{}/rotated", py.port);
    let s = sink(WebhookConfig::new(&url, &kf), None);
    assert_eq!(
        s.deliver(&notice(), &secret(CANARY)).await.unwrap(),
        Delivered::Acknowledged
    );
    let line = py.line().await;
    assert_eq!(line["verified"], true, "{line}");
    assert_eq!(line["idempotency_key"], "00000000000000000000000000000008");
    assert_eq!(line["file"], "/run/keyturn/agents/hook-bot/db");
    assert_eq!(line["has_value"], false);

    // Requests made by hand: a good one, a tampered body, an old timestamp.
    let client = reqwest::Client::new();
    let post = |body: &'static [u8], sig: String| {
        client
            .post(&url)
            .header(SIGNATURE_HEADER, sig)
            .header("Idempotency-Key", "x")
            .body(body)
            .send()
    };
    let body: &[u8] = br#"{"agent":"a","credential":"c","version":1,"rotation":"r","file":null}"#;
    let now = Utc::now().timestamp();
    let good = post(body, sign(KEY.as_bytes(), now, body)).await.unwrap();
    assert_eq!(good.status(), 204);
    assert_eq!(py.line().await["verified"], true);

    let tampered = post(
        br#"{"agent":"a","credential":"c","version":2,"rotation":"r","file":null}"#,
        sign(KEY.as_bytes(), now, body),
    )
    .await
    .unwrap();
    assert_eq!(tampered.status(), 400);
    let line = py.line().await;
    assert_eq!(line["verified"], false);
    assert_eq!(line["reason"], "signature mismatch");

    let old = now - 6 * 60;
    let stale = post(body, sign(KEY.as_bytes(), old, body)).await.unwrap();
    assert_eq!(stale.status(), 400);
    let line = py.line().await;
    assert_eq!(line["verified"], false);
    assert!(
        line["reason"]
            .as_str()
            .unwrap()
            .starts_with("timestamp outside"),
        "{line}"
    );
    py.child.kill().await.unwrap();
}

#[tokio::test]
async fn urls_to_the_metadata_service_are_refused_at_build_and_check() {
    let dir = tempfile::tempdir().unwrap();
    let kf = key_file(dir.path());
    for url in [
        "http://169.254.169.254/latest/meta-data/",
        "http://[::ffff:169.254.169.254]/latest/meta-data/",
        "http://[::ffff:a9fe:a9fe]/",
        "http://[fd00:ec2::254]/",
        "http://100.100.100.200/",
        "http://[fe80::1]/",
        "http://10.0.0.5/hook",
    ] {
        let err = WebhookSink::new(WebhookConfig::new(url, &kf), &ctx(), None)
            .err()
            .unwrap_or_else(|| panic!("{url} was accepted"));
        assert_eq!(err.kind, ErrorKind::Invalid, "{url}");
        assert!(
            err.message.contains("invalid webhook URL: its address"),
            "{url}: {err}"
        );
    }
    // A private literal is fine once allowed.
    let mut cfg = WebhookConfig::new("http://10.0.0.5/hook", &kf);
    cfg.allow_private = true;
    assert!(WebhookSink::new(cfg, &ctx(), None).is_ok());
}

#[tokio::test]
async fn a_name_that_resolves_to_the_metadata_service_is_refused_without_connecting() {
    let dir = tempfile::tempdir().unwrap();
    let dns = Scripted::new(vec![vec![METADATA]]);
    let s = sink(
        WebhookConfig::new("http://hook.example.test/rotated", key_file(dir.path())),
        Some(dns.clone()),
    );
    let started = Instant::now();
    let err = s.deliver(&notice(), &secret(CANARY)).await.unwrap_err();
    assert_eq!(err.kind, ErrorKind::Invalid, "{err}");
    assert!(
        err.message.contains("refusing to connect")
            && err
                .message
                .contains("169.254.169.254 (a cloud metadata service address)"),
        "{err}"
    );
    assert_eq!(dns.calls(), 1);
    // Refused, not tried: a connection to 169.254.169.254 would have had
    // to time out here (no route) or hang up.
    assert!(started.elapsed() < Duration::from_secs(2));
}

#[tokio::test]
async fn a_name_resolving_to_a_private_address_is_refused_unless_allowed() {
    let dir = tempfile::tempdir().unwrap();
    let dns = Scripted::new(vec![vec!["192.168.7.7".parse().unwrap()]]);
    let s = sink(
        WebhookConfig::new("http://hook.example.test/", key_file(dir.path())),
        Some(dns),
    );
    let err = s.deliver(&notice(), &secret(CANARY)).await.unwrap_err();
    assert_eq!(err.kind, ErrorKind::Invalid);
    assert!(err.message.contains("192.168.7.7 (private"), "{err}");

    // Allowed: the receiver's private address is used (here loopback
    // stands in: a name answering a refused and an allowed address is
    // sent to the allowed one only).
    let r = Receiver::start(StatusCode::OK, vec![]).await;
    let dns = Scripted::new(vec![vec![METADATA, LOCAL]]);
    let s = sink(
        WebhookConfig::new(
            format!("http://hook.example.test:{}/", r.addr.port()),
            key_file(dir.path()),
        ),
        Some(dns),
    );
    let started = Instant::now();
    assert_eq!(
        s.deliver(&notice(), &secret(CANARY)).await.unwrap(),
        Delivered::Acknowledged
    );
    assert_eq!(r.got().len(), 1);
    assert!(started.elapsed() < Duration::from_secs(2));
}

#[tokio::test]
async fn a_rebinding_name_is_pinned_to_the_checked_address_then_refused() {
    let dir = tempfile::tempdir().unwrap();
    let r = Receiver::start(StatusCode::OK, vec![]).await;
    // First answer: loopback (checked, allowed). Second: the metadata service.
    let dns = Scripted::new(vec![vec![LOCAL], vec![METADATA]]);
    let s = sink(
        WebhookConfig::new(
            format!("http://rebind.example.test:{}/hook", r.addr.port()),
            key_file(dir.path()),
        ),
        Some(dns.clone()),
    );
    assert_eq!(
        s.deliver(&notice(), &secret(CANARY)).await.unwrap(),
        Delivered::Acknowledged
    );
    // One lookup for one request: the connection went to the answer that
    // was checked, with no second lookup in between.
    assert_eq!(dns.calls(), 1);
    assert_eq!(r.got().len(), 1);
    // The receiver closed the connection, so the next delivery resolves
    // again, gets the metadata address, and refuses it.
    let err = s.deliver(&notice(), &secret(CANARY)).await.unwrap_err();
    assert_eq!(err.kind, ErrorKind::Invalid, "{err}");
    assert!(err.message.contains("169.254.169.254"), "{err}");
    assert_eq!(dns.calls(), 2);
    assert_eq!(r.got().len(), 1);
}

#[tokio::test]
async fn a_redirect_is_never_followed() {
    let dir = tempfile::tempdir().unwrap();
    let kf = key_file(dir.path());
    // Another receiver the redirect points at: it must see nothing.
    let elsewhere = Receiver::start(StatusCode::OK, vec![]).await;
    for location in [
        "http://169.254.169.254/latest/meta-data/".to_owned(),
        elsewhere.url("/stolen"),
    ] {
        let r = Receiver::start(StatusCode::FOUND, vec![("location", location.clone())]).await;
        let s = sink(WebhookConfig::new(r.url("/hook"), &kf), None);
        let started = Instant::now();
        let err = s.deliver(&notice(), &secret(CANARY)).await.unwrap_err();
        assert_eq!(err.kind, ErrorKind::Invalid, "{err}");
        assert!(
            err.message.contains("302 Found")
                && err.message.contains("redirects are never followed"),
            "{err}"
        );
        assert!(!err.message.contains(&location), "{err}");
        assert_eq!(r.got().len(), 1);
        assert!(started.elapsed() < Duration::from_secs(2), "{location}");
    }
    assert!(elsewhere.got().is_empty());
}

#[tokio::test]
async fn include_value_needs_https_or_loopback_and_the_value_goes_nowhere_else() {
    let dir = tempfile::tempdir().unwrap();
    let kf = key_file(dir.path());
    let with_value = |url: &str| {
        let mut c = WebhookConfig::new(url, &kf);
        c.include_value = true;
        c
    };
    for url in ["http://hooks.example.com/k", "http://93.184.216.34/k"] {
        let err = WebhookSink::new(with_value(url), &ctx(), None)
            .err()
            .unwrap();
        assert!(
            err.message
                .contains("`include_value = true` sends the value"),
            "{err}"
        );
    }
    for url in [
        "https://hooks.example.com/k",
        "http://localhost:1/k",
        "http://[::1]:1/k",
    ] {
        assert!(
            WebhookSink::new(with_value(url), &ctx(), None).is_ok(),
            "{url}"
        );
    }
    // "localhost" over http is checked at send too: it must resolve to loopback.
    let mut cfg = with_value("http://localhost:9/k");
    cfg.allow_private = true;
    let dns = Scripted::new(vec![vec!["10.9.9.9".parse().unwrap()]]);
    let err = sink(cfg, Some(dns))
        .deliver(&notice(), &secret(CANARY))
        .await
        .unwrap_err();
    assert!(err.message.contains("not loopback"), "{err}");

    let (_guard, logs) = capture_logs();
    let r = Receiver::start(StatusCode::OK, vec![]).await;
    let s = sink(with_value(&r.url("/k")), None);
    s.deliver(&notice(), &secret(CANARY)).await.unwrap();
    let body: serde_json::Value = serde_json::from_slice(&r.got()[0].body).unwrap();
    assert_eq!(body["value"], CANARY);

    // A receiver that is down: the error says so, without the value.
    let down = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let s = sink(with_value(&format!("http://{down}/k?token=t0ken")), None);
    let err = s.deliver(&notice(), &secret(CANARY)).await.unwrap_err();
    for text in [err.to_string(), s.describe(), format!("{err:?}")] {
        assert!(!text.contains(CANARY), "{text}");
        assert!(!text.contains("t0ken"), "{text}");
    }
    let logs = String::from_utf8(logs.lock().unwrap().clone()).unwrap();
    assert!(
        !logs.is_empty(),
        "the capture saw nothing: capturing the wrong thing?"
    );
    assert!(!logs.contains(CANARY), "{logs}");
    assert!(!logs.contains("never logged"), "{logs}");
}

#[tokio::test]
async fn a_receiver_that_is_down_is_a_quick_transient_failure() {
    let dir = tempfile::tempdir().unwrap();
    let down = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let s = sink(
        WebhookConfig::new(format!("http://{down}/hook"), key_file(dir.path())),
        None,
    );
    let started = Instant::now();
    let err = s.deliver(&notice(), &secret(CANARY)).await.unwrap_err();
    assert_eq!(err.kind, ErrorKind::Transient, "{err}");
    assert!(
        err.message.contains("cannot connect to the receiver"),
        "{err}"
    );
    assert!(started.elapsed() < Duration::from_secs(2));
}

#[tokio::test]
async fn a_slow_receiver_times_out_as_transient() {
    let dir = tempfile::tempdir().unwrap();
    let r = Receiver::start_slow(StatusCode::OK, vec![], Duration::from_secs(10)).await;
    let mut cfg = WebhookConfig::new(r.url("/slow"), key_file(dir.path()));
    cfg.timeout = Some("300ms".into());
    let s = sink(cfg, None);
    let started = Instant::now();
    let err = s.deliver(&notice(), &secret(CANARY)).await.unwrap_err();
    assert_eq!(err.kind, ErrorKind::Transient, "{err}");
    assert!(err.message.contains("no answer within 300ms"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(3));
}

#[tokio::test]
async fn statuses_map_to_kinds_and_retry_after_is_kept() {
    let dir = tempfile::tempdir().unwrap();
    let kf = key_file(dir.path());
    let cases = [
        (
            StatusCode::INTERNAL_SERVER_ERROR,
            None,
            ErrorKind::Transient,
            None,
        ),
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Some("3"),
            ErrorKind::Transient,
            Some(3),
        ),
        (
            StatusCode::TOO_MANY_REQUESTS,
            Some("7"),
            ErrorKind::Throttled,
            Some(7),
        ),
        (
            StatusCode::TOO_MANY_REQUESTS,
            Some("86400"),
            ErrorKind::Throttled,
            Some(300),
        ),
        (
            StatusCode::UNAUTHORIZED,
            None,
            ErrorKind::Unauthorized,
            None,
        ),
        (StatusCode::FORBIDDEN, None, ErrorKind::Unauthorized, None),
        (StatusCode::BAD_REQUEST, None, ErrorKind::Invalid, None),
        (StatusCode::NOT_FOUND, None, ErrorKind::Invalid, None),
    ];
    for (status, after, kind, secs) in cases {
        let headers = after
            .map(|a| vec![("retry-after", a.to_owned())])
            .unwrap_or_default();
        let r = Receiver::start(status, headers).await;
        let s = sink(WebhookConfig::new(r.url("/"), &kf), None);
        let err = s.deliver(&notice(), &secret(CANARY)).await.unwrap_err();
        assert_eq!(err.kind, kind, "{status}: {err}");
        assert_eq!(err.retry_after, secs.map(Duration::from_secs), "{status}");
        assert!(err.message.contains(&status.to_string()), "{err}");
        // The response body is never read into the error.
        assert!(!err.message.contains("never logged"), "{err}");
    }
    let ok = Receiver::start(StatusCode::ACCEPTED, vec![]).await;
    let s = sink(WebhookConfig::new(ok.url("/"), &kf), None);
    assert_eq!(
        s.deliver(&notice(), &secret(CANARY)).await.unwrap(),
        Delivered::Acknowledged
    );
}

#[tokio::test]
async fn the_key_file_must_be_private_and_long_enough() {
    let dir = tempfile::tempdir().unwrap();
    let kf = key_file(dir.path());
    let s = sink(WebhookConfig::new("http://127.0.0.1:9/", &kf), None);
    s.preflight().await.unwrap();

    std::fs::set_permissions(&kf, std::fs::Permissions::from_mode(0o640)).unwrap();
    let err = s.preflight().await.unwrap_err();
    assert_eq!(err.kind, ErrorKind::Invalid);
    assert!(err.message.contains("mode 0640"), "{err}");

    std::fs::write(&kf, "short-key\n").unwrap();
    std::fs::set_permissions(&kf, std::fs::Permissions::from_mode(0o400)).unwrap();
    let err = s.preflight().await.unwrap_err();
    assert!(err.message.contains("holds 9 bytes"), "{err}");
    assert!(!err.message.contains("short-key"), "{err}");
    // A delivery fails the same way, before any request.
    let err = s.deliver(&notice(), &secret(CANARY)).await.unwrap_err();
    assert!(err.message.contains("holds 9 bytes"), "{err}");

    let link = dir.path().join("link.key");
    std::os::unix::fs::symlink(&kf, &link).unwrap();
    let s = sink(WebhookConfig::new("http://127.0.0.1:9/", &link), None);
    assert!(s.preflight().await.unwrap_err().message.contains("symlink"));

    let s = sink(
        WebhookConfig::new("http://127.0.0.1:9/", dir.path().join("missing.key")),
        None,
    );
    assert_eq!(s.preflight().await.unwrap_err().kind, ErrorKind::NotFound);
}

/// A credential's current value, as the catalog's reader would return it.
#[derive(Debug)]
struct Fixed(&'static str);

#[async_trait]
impl CurrentValue for Fixed {
    async fn current(&self) -> Result<SecretValue, PluginError> {
        Ok(secret(self.0))
    }
}

/// A key credential just rotated: its current value, and the previous one
/// in its grace.
#[derive(Debug)]
struct Rotated(&'static str, &'static str);

#[async_trait]
impl CurrentValue for Rotated {
    async fn current(&self) -> Result<SecretValue, PluginError> {
        Ok(secret(self.0))
    }

    async fn previous(&self) -> Result<Option<SecretValue>, PluginError> {
        Ok(Some(secret(self.1)))
    }
}

/// Defect (black-box): when the key credential and the announced one
/// rotated together, the notice was signed with the key's new value before
/// the key's own file reached the receiver, which refused it (400) and
/// the notice waited for the retry ceiling. While the key's previous value
/// is in its grace, the notice carries a second `v1` made with it: a
/// receiver with either key verifies it.
#[tokio::test]
async fn a_notice_verifies_with_the_key_credentials_new_and_previous_value() {
    let r = Receiver::start(StatusCode::OK, vec![]).await;
    let (new, old) = (
        "the-new-value-of-hook-key-32+bytes-long",
        "the-old-value-of-hook-key-32+bytes-long",
    );
    let reader: Arc<dyn CurrentValue> = Arc::new(Rotated(new, old));
    let ctx = SinkContext {
        reader: Some(&reader),
        ..ctx()
    };
    let cfg = WebhookConfig {
        url: r.url("/"),
        secret_file: None,
        secret_credential: Some("hook-bot/hook-key".into()),
        include_value: false,
        allow_private: false,
        timeout: None,
    };
    let s = WebhookSink::new(cfg, &ctx, None).unwrap();
    s.deliver(&notice(), &secret(CANARY)).await.unwrap();
    let got = &r.got()[0];
    let sig = got.headers["keyturn-signature"].to_str().unwrap();
    assert_eq!(sig.matches("v1=").count(), 2, "{sig}");
    let now = Utc::now().timestamp();
    for key in [new, old] {
        verify(key.as_bytes(), sig, &got.body, now, Duration::from_secs(60))
            .unwrap_or_else(|e| panic!("{key}: {e}"));
    }
    assert_eq!(
        verify(KEY.as_bytes(), sig, &got.body, now, Duration::from_secs(60)),
        Err(BadSignature::Mismatch)
    );
}

#[tokio::test]
async fn secret_credential_signs_with_that_credentials_current_value() {
    let r = Receiver::start(StatusCode::OK, vec![]).await;
    let cfg = |url: String| WebhookConfig {
        url,
        secret_file: None,
        secret_credential: Some("hook-bot/hook-key".into()),
        include_value: false,
        allow_private: false,
        timeout: None,
    };
    assert_eq!(
        cfg(String::new()).reads_credential(),
        Some(key("hook-bot", "hook-key"))
    );
    // Without a reader (the credential is not configured) it is not built.
    let err = WebhookSink::new(cfg(r.url("/")), &ctx(), None)
        .err()
        .unwrap();
    assert!(
        err.message
            .contains("hook-bot/hook-key is not a configured credential"),
        "{err}"
    );

    let current = "the-current-value-of-hook-key-32+bytes";
    let reader: Arc<dyn CurrentValue> = Arc::new(Fixed(current));
    let ctx = SinkContext {
        reader: Some(&reader),
        ..ctx()
    };
    let s = WebhookSink::new(cfg(r.url("/")), &ctx, None).unwrap();
    s.deliver(&notice(), &secret(CANARY)).await.unwrap();
    let got = &r.got()[0];
    let sig = got.headers["keyturn-signature"].to_str().unwrap();
    let now = Utc::now().timestamp();
    verify(
        current.as_bytes(),
        sig,
        &got.body,
        now,
        Duration::from_secs(60),
    )
    .unwrap();
    assert_eq!(
        verify(KEY.as_bytes(), sig, &got.body, now, Duration::from_secs(60)),
        Err(BadSignature::Mismatch)
    );

    let short: Arc<dyn CurrentValue> = Arc::new(Fixed("short"));
    let ctx = SinkContext {
        reader: Some(&short),
        ..ctx
    };
    let s = WebhookSink::new(cfg(r.url("/")), &ctx, None).unwrap();
    let err = s.deliver(&notice(), &secret(CANARY)).await.unwrap_err();
    assert!(err.message.contains("is 5 bytes long"), "{err}");
    assert_eq!(r.got().len(), 1);
}

#[test]
fn describe_never_shows_the_query_or_credentials() {
    let url = Url::parse("https://hooks.example.com:8443/a/b?token=abc#frag").unwrap();
    assert_eq!(
        describe_url(&url),
        "webhook:https://hooks.example.com:8443/a/b"
    );
    let url = Url::parse("http://[::1]/x").unwrap();
    assert_eq!(describe_url(&url), "webhook:http://[::1]/x");
    let _ = Ipv6Addr::LOCALHOST;
}
