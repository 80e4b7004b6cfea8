//! The alert sinks against real receivers: Alertmanager from the
//! distribution (`KEYTURN_TEST_ALERTMANAGER_URL`, started by
//! `scripts/services.sh`), read back through its own API; the PagerDuty
//! Events v2 contract stub (`tests/stubs/pagerduty_events_stub.py`, started
//! here); and a local webhook receiver that checks the signature with its
//! own HMAC. And the daemon's wiring: spool, metrics, reload, start-up
//! errors.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Child;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use hmac::{KeyInit, Mac};
use keyturn::alerts::alertmanager::{AlertmanagerConfig, AlertmanagerSink};
use keyturn::alerts::pagerduty::{PagerdutyConfig, PagerdutySink};
use keyturn::alerts::webhook::{AlertWebhookConfig, AlertWebhookSink};
use keyturn::alerts::{
    Alert, AlertSink, Alerts, Conditions, FiresAt, ManagerOptions, MemoryRecorder, NamedSink,
    Notice, Route, Severity, run_loop,
};
use serde_json::Value;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

const NEED_SERVICES: &str =
    "KEYTURN_TEST_ALERTMANAGER_URL is not set: run `. \"$(bash scripts/services.sh start)\"` first";

fn suffix() -> String {
    format!("{:08x}", rand::random::<u32>())
}

fn alert(name: &str, severity: Severity) -> Alert {
    Alert {
        name: name.into(),
        severity,
        agent: Some("invoice-bot".into()),
        credential: Some("db".into()),
        tenant: Some("billing".into()),
        tier: Some("high".into()),
        mode: None,
        summary: "revocation of invoice-bot is past its SLA".into(),
        description: "OpenBao does not answer; see keyturn status".into(),
        since: Utc::now() - chrono::Duration::minutes(5),
    }
}

fn firing(alerts: &[&Alert]) -> Conditions {
    Conditions {
        firing: alerts.iter().map(|a| (*a).clone()).collect(),
        next_change: None,
    }
}

struct Manager {
    alerts: Alerts,
    recorder: Arc<MemoryRecorder>,
    cancel: CancellationToken,
    tracker: TaskTracker,
}

impl Manager {
    fn open(dir: &Path, name: &str, sink: Arc<dyn AlertSink>) -> Manager {
        Manager::holding(dir, name, sink, Duration::ZERO)
    }

    /// A manager whose flap hold is `flap_hold`.
    fn holding(dir: &Path, name: &str, sink: Arc<dyn AlertSink>, flap_hold: Duration) -> Manager {
        let recorder = Arc::new(MemoryRecorder::default());
        let cancel = CancellationToken::new();
        let tracker = TaskTracker::new();
        let alerts = Alerts::open(
            dir,
            vec![NamedSink {
                name: name.into(),
                sink,
                route: Route::default(),
            }],
            recorder.clone(),
            None,
            ManagerOptions {
                flap_hold,
                initial_backoff: Duration::from_millis(100),
                max_backoff: Duration::from_millis(500),
            },
            cancel.clone(),
            tracker.clone(),
        )
        .unwrap();
        Manager {
            alerts,
            recorder,
            cancel,
            tracker,
        }
    }

    async fn stop(self) {
        self.cancel.cancel();
        self.tracker.close();
        self.tracker.wait().await;
    }
}

async fn until<T>(what: &str, timeout: Duration, mut f: impl AsyncFnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(t) = f().await {
            return t;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn client() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().build().unwrap()
}

async fn get_json(url: &str) -> Value {
    let text = client()
        .get(url)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{url}: {e}: {text}"))
}

async fn post_json(url: &str, body: Value) {
    let r = client()
        .post(url)
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{url}: {}", r.status());
}

fn key_file(dir: &Path, name: &str, value: &str) -> std::path::PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, format!("{value}\n")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    path
}

/// Every byte of the spool (database and WAL).
fn spool_bytes(dir: &Path) -> Vec<u8> {
    let mut all = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        all.extend(std::fs::read(entry.unwrap().path()).unwrap_or_default());
    }
    all
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|w| w == needle.as_bytes())
}

// --- Alertmanager --------------------------------------------------------

/// The alerts Alertmanager lists with `alertname = name`.
async fn am_alerts(base: &str, name: &str) -> Vec<Value> {
    let url = format!("{base}/api/v2/alerts");
    let all = get_json(&url).await;
    all.as_array()
        .unwrap()
        .iter()
        .filter(|a| a["labels"]["alertname"] == name)
        .cloned()
        .collect()
}

#[tokio::test]
async fn alertmanager_shows_the_alert_with_its_labels_and_then_its_resolution() {
    let base = std::env::var("KEYTURN_TEST_ALERTMANAGER_URL").expect(NEED_SERVICES);
    let dir = tempfile::tempdir().unwrap();
    let sink = Arc::new(AlertmanagerSink::new(&AlertmanagerConfig::new(&base)).unwrap());
    let m = Manager::open(dir.path(), "am", sink);
    let name = format!("KeyturnTestBreach{}", suffix());
    let a = alert(&name, Severity::Critical);
    m.alerts.reconcile(Utc::now(), firing(&[&a]));
    let shown = until(
        "the alert in Alertmanager",
        Duration::from_secs(10),
        async || am_alerts(&base, &name).await.pop(),
    )
    .await;
    let labels = &shown["labels"];
    for (k, v) in [
        ("alertname", name.as_str()),
        ("agent", "invoice-bot"),
        ("credential", "db"),
        ("tenant", "billing"),
        ("tier", "high"),
        ("severity", "critical"),
        ("source", "keyturn"),
    ] {
        assert_eq!(labels[k], v, "label {k}: {shown}");
    }
    assert_eq!(labels.as_object().unwrap().len(), 7, "{shown}");
    assert_eq!(shown["annotations"]["summary"], a.summary.as_str());
    assert_eq!(shown["annotations"]["description"], a.description.as_str());
    assert_eq!(shown["status"]["state"], "active");
    let starts: DateTime<Utc> = shown["startsAt"].as_str().unwrap().parse().unwrap();
    assert_eq!(
        starts.timestamp(),
        a.since.timestamp(),
        "startsAt is when it began"
    );
    let ends: DateTime<Utc> = shown["endsAt"].as_str().unwrap().parse().unwrap();
    assert!(
        ends > Utc::now() + chrono::Duration::minutes(3),
        "endsAt is 4 resend intervals ahead: {ends}"
    );

    m.alerts.reconcile(Utc::now(), firing(&[]));
    until(
        "the alert resolved in Alertmanager",
        Duration::from_secs(10),
        async || am_alerts(&base, &name).await.is_empty().then_some(()),
    )
    .await;
    // Resolved alerts are not listed as active; the resolved one is still
    // known when asked for everything, with endsAt in the past.
    until("both audit records", Duration::from_secs(5), async || {
        (m.recorder.events() == ["alert.fired", "alert.resolved"]).then_some(())
    })
    .await;
    assert!(m.alerts.firing().is_empty());
    m.stop().await;
}

/// Defect F4, on Alertmanager: the escalation left the warning to expire
/// and a flap fired it again. Now the request that fires the critical
/// ends the warning (`severity` is a label), and a flap sends nothing: one
/// alert per condition, at its current severity.
#[tokio::test]
async fn alertmanager_holds_one_alert_per_condition_at_its_current_severity() {
    let base = std::env::var("KEYTURN_TEST_ALERTMANAGER_URL").expect(NEED_SERVICES);
    let dir = tempfile::tempdir().unwrap();
    let sink = Arc::new(AlertmanagerSink::new(&AlertmanagerConfig::new(&base)).unwrap());
    let hold = Duration::from_millis(500);
    let m = Manager::holding(dir.path(), "am", sink, hold);
    let name = format!("KeyturnTestFailing{}", suffix());
    let (warn, crit) = (
        alert(&name, Severity::Warning),
        alert(&name, Severity::Critical),
    );
    let severities = async || {
        let mut s: Vec<String> = am_alerts(&base, &name)
            .await
            .iter()
            .map(|a| {
                a["labels"]["severity"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned()
            })
            .collect();
        s.sort();
        s
    };
    m.alerts.reconcile(Utc::now(), firing(&[&warn]));
    until("the warning", Duration::from_secs(10), async || {
        (severities().await == ["warning"]).then_some(())
    })
    .await;
    m.alerts.reconcile(Utc::now(), firing(&[&crit]));
    until("the critical alone", Duration::from_secs(10), async || {
        (severities().await == ["critical"]).then_some(())
    })
    .await;
    until("two fires delivered", Duration::from_secs(5), async || {
        (m.recorder.events() == ["alert.fired", "alert.fired"]).then_some(())
    })
    .await;
    // A flap within the hold, back at warning first: nothing is sent.
    for now in [&[][..], &[&warn], &[&crit]] {
        m.alerts.reconcile(Utc::now(), firing(now));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(hold).await;
    m.alerts.reconcile(Utc::now(), firing(&[&crit]));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(severities().await, ["critical"]);
    assert_eq!(m.recorder.events(), ["alert.fired", "alert.fired"]);
    m.alerts.reconcile(Utc::now(), firing(&[]));
    tokio::time::sleep(hold).await;
    m.alerts.reconcile(Utc::now(), firing(&[]));
    until("the resolution", Duration::from_secs(10), async || {
        severities().await.is_empty().then_some(())
    })
    .await;
    m.stop().await;
}

#[tokio::test]
async fn an_alertmanager_down_gets_the_spooled_alert_when_it_returns() {
    let base = std::env::var("KEYTURN_TEST_ALERTMANAGER_URL").expect(NEED_SERVICES);
    // A local port that forwards to Alertmanager only once "up".
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let front = format!("http://{}", listener.local_addr().unwrap());
    let up = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let target = base.trim_start_matches("http://").to_owned();
    {
        let up = up.clone();
        tokio::spawn(async move {
            loop {
                let (mut conn, _) = listener.accept().await.unwrap();
                if !up.load(std::sync::atomic::Ordering::SeqCst) {
                    drop(conn); // connection reset: "down"
                    continue;
                }
                let target = target.clone();
                tokio::spawn(async move {
                    if let Ok(mut back) = tokio::net::TcpStream::connect(&target).await {
                        let _ = tokio::io::copy_bidirectional(&mut conn, &mut back).await;
                    }
                });
            }
        });
    }
    let dir = tempfile::tempdir().unwrap();
    let sink = Arc::new(AlertmanagerSink::new(&AlertmanagerConfig::new(&front)).unwrap());
    let m = Manager::open(dir.path(), "am", sink);
    let name = format!("KeyturnTestSpooled{}", suffix());
    let a = alert(&name, Severity::Warning);
    m.alerts.reconcile(Utc::now(), firing(&[&a]));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(m.alerts.pending(), 1, "spooled while Alertmanager is down");
    assert!(am_alerts(&base, &name).await.is_empty());
    up.store(true, std::sync::atomic::Ordering::SeqCst);
    let shown = until("the spooled alert", Duration::from_secs(10), async || {
        am_alerts(&base, &name).await.pop()
    })
    .await;
    assert_eq!(shown["labels"]["severity"], "warning");
    // Alertmanager may list it a moment before its answer reaches keyturn.
    until("the spool emptied", Duration::from_secs(5), async || {
        (m.alerts.pending() == 0).then_some(())
    })
    .await;
    m.alerts.reconcile(Utc::now(), firing(&[]));
    until("the resolution", Duration::from_secs(10), async || {
        am_alerts(&base, &name).await.is_empty().then_some(())
    })
    .await;
    m.stop().await;
}

// --- PagerDuty -------------------------------------------------------------

struct Stub {
    child: Child,
    base: String,
}

impl Stub {
    fn start() -> Stub {
        let (child, base) = common::start_pagerduty_stub();
        Stub { child, base }
    }

    async fn events(&self) -> Vec<Value> {
        get_json(&format!("{}/control/events", self.base))
            .await
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["event"].clone())
            .collect()
    }

    async fn rejected(&self) -> Value {
        get_json(&format!("{}/control/rejected", self.base)).await
    }

    async fn fail(&self, status: u16, count: u32, retry_after: Option<u32>) {
        post_json(
            &format!("{}/control/fail", self.base),
            serde_json::json!({"status": status, "count": count, "retry_after": retry_after}),
        )
        .await;
    }

    /// A manager in `dir/spool` with one sink, `pd`, to this stub, holding
    /// for `flap_hold`.
    fn manager(&self, dir: &Path, flap_hold: Duration) -> Manager {
        Manager::holding(&dir.join("spool"), "pd", self.sink(dir, PD_KEY), flap_hold)
    }

    fn sink(&self, dir: &Path, key: &str) -> Arc<PagerdutySink> {
        let cfg = PagerdutyConfig {
            url: Some(format!("{}/v2/enqueue", self.base)),
            ..PagerdutyConfig::new(key_file(dir, "pd.key", key))
        };
        Arc::new(PagerdutySink::new(&cfg).unwrap())
    }
}

impl Drop for Stub {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A routing key that is a canary: it must show nowhere but in the request.
const PD_KEY: &str = "canaryPDkey0123456789abcdefABCDE";

#[tokio::test]
async fn pagerduty_gets_a_trigger_and_a_resolve_with_one_dedup_key_checked_field_by_field() {
    assert_eq!(PD_KEY.len(), 32);
    let stub = Stub::start();
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    let m = Manager::open(&spool, "pd", stub.sink(dir.path(), PD_KEY));
    let a = alert("KeyturnRevocationSlaBreached", Severity::Critical);
    m.alerts.reconcile(Utc::now(), firing(&[&a]));
    let events = until("the trigger", Duration::from_secs(10), async || {
        let e = stub.events().await;
        (!e.is_empty()).then_some(e)
    })
    .await;
    let t = &events[0];
    assert_eq!(t["routing_key"], PD_KEY);
    assert_eq!(t["event_action"], "trigger");
    // One incident per condition, agent and credential: no severity in it.
    assert_eq!(t["dedup_key"], a.incident_key().as_str());
    assert_eq!(
        t["dedup_key"],
        "keyturn/KeyturnRevocationSlaBreached/invoice-bot/db"
    );
    let p = &t["payload"];
    assert_eq!(p["summary"], a.summary.as_str());
    assert_eq!(p["source"], "keyturn");
    assert_eq!(p["severity"], "critical");
    assert_eq!(p["component"], "invoice-bot");
    assert_eq!(p["group"], "billing");
    assert_eq!(p["class"], "KeyturnRevocationSlaBreached");
    let d = &p["custom_details"];
    assert_eq!(d["agent"], "invoice-bot");
    assert_eq!(d["credential"], "db");
    assert_eq!(d["tenant"], "billing");
    assert_eq!(d["tier"], "high");
    assert_eq!(d["description"], a.description.as_str());
    // Evaluated again: a trigger is not re-sent.
    for _ in 0..3 {
        m.alerts.reconcile(Utc::now(), firing(&[&a]));
    }
    m.alerts.reconcile(Utc::now(), firing(&[]));
    let events = until("the resolve", Duration::from_secs(10), async || {
        let e = stub.events().await;
        (e.len() >= 2).then_some(e)
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        stub.events().await.len(),
        2,
        "exactly one trigger and one resolve"
    );
    let r = &events[1];
    assert_eq!(r["event_action"], "resolve");
    assert_eq!(r["dedup_key"], a.incident_key().as_str());
    assert_eq!(r["routing_key"], PD_KEY);
    assert_eq!(stub.rejected().await, serde_json::json!([]));
    assert_eq!(m.recorder.events(), vec!["alert.fired", "alert.resolved"]);
    // The key is in the requests only: not in the audit records or the spool.
    assert!(!format!("{:?}", m.recorder.records()).contains(PD_KEY));
    m.stop().await;
    assert!(
        !contains(&spool_bytes(&spool), PD_KEY),
        "the spool holds the routing key"
    );
}

#[tokio::test]
async fn pagerduty_429_waits_for_retry_after_and_5xx_is_retried_without_duplicates() {
    let stub = Stub::start();
    let dir = tempfile::tempdir().unwrap();
    let m = stub.manager(dir.path(), Duration::ZERO);
    stub.fail(429, 1, Some(2)).await;
    let a = alert("KeyturnRevocationSlaBreached", Severity::Critical);
    let started = Instant::now();
    m.alerts.reconcile(Utc::now(), firing(&[&a]));
    until(
        "the trigger after the 429",
        Duration::from_secs(10),
        async || (stub.events().await.len() == 1).then_some(()),
    )
    .await;
    // The backoff alone would have retried within 100 ms.
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "Retry-After: 2 not honoured: {:?}",
        started.elapsed()
    );
    stub.fail(500, 3, None).await;
    let b = alert("KeyturnRotationFailing", Severity::Warning);
    m.alerts.reconcile(Utc::now(), firing(&[&a, &b]));
    let events = until(
        "the trigger after three 500s",
        Duration::from_secs(15),
        async || {
            let e = stub.events().await;
            (e.len() == 2).then_some(e)
        },
    )
    .await;
    assert_eq!(events[1]["dedup_key"], b.incident_key().as_str());
    assert_eq!(events[1]["payload"]["severity"], "warning");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        stub.events().await.len(),
        2,
        "no duplicate after the retries"
    );
    m.stop().await;
}

#[tokio::test]
async fn a_restart_sends_the_owed_resolve_to_pagerduty_and_no_second_trigger() {
    let stub = Stub::start();
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    let a = alert("KeyturnRevocationSlaBreached", Severity::Critical);
    {
        let m = Manager::open(&spool, "pd", stub.sink(dir.path(), PD_KEY));
        m.alerts.reconcile(Utc::now(), firing(&[&a]));
        until("the trigger", Duration::from_secs(10), async || {
            (stub.events().await.len() == 1).then_some(())
        })
        .await;
        stub.fail(503, 1000, None).await;
        m.alerts.reconcile(Utc::now(), firing(&[]));
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(m.alerts.pending(), 1, "the resolve is owed");
        m.stop().await;
    }
    post_json(
        &format!("{}/control/fail", stub.base),
        serde_json::json!({"status": 503, "count": 0}),
    )
    .await;
    let m = Manager::open(&spool, "pd", stub.sink(dir.path(), PD_KEY));
    let events = until("the owed resolve", Duration::from_secs(10), async || {
        let e = stub.events().await;
        (e.len() == 2).then_some(e)
    })
    .await;
    assert_eq!(events[1]["event_action"], "resolve");
    assert_eq!(events[1]["dedup_key"], a.incident_key().as_str());
    m.alerts.reconcile(Utc::now(), firing(&[]));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(stub.events().await.len(), 2);
    m.stop().await;
}

/// `(event_action, dedup_key, payload.severity)` of every event accepted.
async fn pd_actions(stub: &Stub) -> Vec<(String, String, String)> {
    let field = |e: &Value, f: &str| e[f].as_str().unwrap_or_default().to_owned();
    stub.events()
        .await
        .iter()
        .map(|e| {
            let severity = e["payload"]["severity"].as_str().unwrap_or_default();
            (
                field(e, "event_action"),
                field(e, "dedup_key"),
                severity.to_owned(),
            )
        })
        .collect()
}

/// Defect F4: a rotation-failing condition that escalated and then
/// flapped sent PagerDuty a second trigger for its warning (a new
/// incident, since the warning's key had been resolved) while the
/// critical stayed open. Now the condition is one incident: the
/// escalation updates it, the flap sends nothing, the end resolves it.
#[tokio::test]
async fn pagerduty_keeps_one_incident_through_an_escalation_and_a_flap() {
    let stub = Stub::start();
    let dir = tempfile::tempdir().unwrap();
    let hold = Duration::from_millis(600);
    let m = stub.manager(dir.path(), hold);
    let warn = alert("KeyturnRotationFailing", Severity::Warning);
    let crit = alert("KeyturnRotationFailing", Severity::Critical);
    let key = "keyturn/KeyturnRotationFailing/invoice-bot/db";
    let settle = async |n: usize| {
        until("the events", Duration::from_secs(10), async || {
            (stub.events().await.len() >= n).then_some(())
        })
        .await;
    };
    m.alerts.reconcile(Utc::now(), firing(&[&warn]));
    settle(1).await;
    m.alerts.reconcile(Utc::now(), firing(&[&crit]));
    settle(2).await;
    // The warning's hold ends; then a success and failures again, within
    // the hold: warning, then critical once more.
    tokio::time::sleep(hold + Duration::from_millis(100)).await;
    for now in [&[&crit][..], &[], &[&warn], &[&crit]] {
        m.alerts.reconcile(Utc::now(), firing(now));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(hold).await;
    m.alerts.reconcile(Utc::now(), firing(&[&crit]));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let t = |action: &str, severity: &str| (action.into(), key.into(), severity.into());
    assert_eq!(
        pd_actions(&stub).await,
        vec![t("trigger", "warning"), t("trigger", "critical")],
        "one incident, updated by the escalation; nothing for the flap"
    );
    // The condition ends for good.
    m.alerts.reconcile(Utc::now(), firing(&[]));
    tokio::time::sleep(hold).await;
    m.alerts.reconcile(Utc::now(), firing(&[]));
    settle(3).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        pd_actions(&stub).await,
        vec![
            t("trigger", "warning"),
            t("trigger", "critical"),
            t("resolve", "")
        ]
    );
    m.stop().await;
}

/// Defect F9: a trigger PagerDuty refused (400) was sent after all, with
/// its resolve 7 ms behind, when the condition ended: a new incident, and
/// a page, for an alert already over. Now nothing is sent for it.
#[tokio::test]
async fn a_trigger_pagerduty_refused_is_not_sent_when_the_condition_ends() {
    let stub = Stub::start();
    let dir = tempfile::tempdir().unwrap();
    let m = stub.manager(dir.path(), Duration::ZERO);
    stub.fail(400, 1, None).await;
    let a = alert("KeyturnRotationFailing", Severity::Warning);
    m.alerts.reconcile(Utc::now(), firing(&[&a]));
    until("the refusal", Duration::from_secs(10), async || {
        (m.recorder.events() == ["alert.failed"]).then_some(())
    })
    .await;
    // PagerDuty accepts again; the condition ends before a retry.
    m.alerts.reconcile(Utc::now(), firing(&[]));
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(
        pd_actions(&stub).await,
        vec![],
        "nothing for an alert already over"
    );
    assert_eq!(m.alerts.pending(), 0);
    assert_eq!(m.recorder.events(), ["alert.failed"]);
    m.stop().await;
}

// --- webhook ---------------------------------------------------------------

/// What the webhook receiver got: the signature header and the body.
type Received = Arc<Mutex<Vec<(String, Vec<u8>)>>>;

async fn receiver() -> (String, Received) {
    let got: Received = Arc::default();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post({
            let got = got.clone();
            move |headers: axum::http::HeaderMap, body: axum::body::Bytes| {
                let got = got.clone();
                async move {
                    let sig = headers
                        .get("keyturn-signature")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or_default()
                        .to_owned();
                    got.lock().unwrap().push((sig, body.to_vec()));
                    axum::http::StatusCode::OK
                }
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, got)
}

/// The receiver's own check: HMAC-SHA256(key, "<t>.<body>") in hex.
fn verify(key: &[u8], header: &str, body: &[u8]) {
    let mut t = None;
    let mut v1 = None;
    for part in header.split(',') {
        match part.split_once('=') {
            Some(("t", x)) => t = Some(x.to_owned()),
            Some(("v1", x)) => v1 = Some(x.to_owned()),
            _ => {}
        }
    }
    let (t, v1) = (t.expect("t="), v1.expect("v1="));
    let age = Utc::now().timestamp() - t.parse::<i64>().unwrap();
    assert!((0..60).contains(&age), "timestamp {t} is {age}s old");
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(key).unwrap();
    mac.update(format!("{t}.").as_bytes());
    mac.update(body);
    assert_eq!(hex::encode(mac.finalize().into_bytes()), v1, "signature");
}

#[tokio::test]
async fn the_webhook_gets_signed_alertmanager_version_4_payloads() {
    let (url, got) = receiver().await;
    let dir = tempfile::tempdir().unwrap();
    let key = "canary-alert-hook-key-0123456789abcdef";
    let sink = Arc::new(
        AlertWebhookSink::new(
            &AlertWebhookConfig::new(&url, key_file(dir.path(), "hook.key", key)),
            "oncall-hook",
        )
        .unwrap(),
    );
    let m = Manager::open(&dir.path().join("spool"), "oncall-hook", sink);
    let a = alert("KeyturnRevocationSlaWarning", Severity::Warning);
    m.alerts.reconcile(Utc::now(), firing(&[&a]));
    until(
        "the firing notification",
        Duration::from_secs(10),
        async || (got.lock().unwrap().len() == 1).then_some(()),
    )
    .await;
    let ended = Utc::now();
    m.alerts.reconcile(ended, firing(&[]));
    until(
        "the resolved notification",
        Duration::from_secs(10),
        async || (got.lock().unwrap().len() == 2).then_some(()),
    )
    .await;
    let got = got.lock().unwrap().clone();
    let mut fingerprints = Vec::new();
    for ((sig, body), status) in got.iter().zip(["firing", "resolved"]) {
        verify(key.as_bytes(), sig, body);
        let p: Value = serde_json::from_slice(body).unwrap();
        assert_eq!(p["version"], "4");
        assert_eq!(p["status"], status);
        assert_eq!(p["receiver"], "oncall-hook");
        assert_eq!(p["truncatedAlerts"], 0);
        assert_eq!(p["groupLabels"]["alertname"], "KeyturnRevocationSlaWarning");
        assert_eq!(p["commonLabels"]["severity"], "warning");
        assert_eq!(p["commonAnnotations"]["summary"], a.summary.as_str());
        assert!(
            p["groupKey"]
                .as_str()
                .unwrap()
                .contains("KeyturnRevocationSlaWarning")
        );
        assert!(p["externalURL"].is_string());
        let alerts = p["alerts"].as_array().unwrap();
        assert_eq!(alerts.len(), 1);
        let x = &alerts[0];
        assert_eq!(x["status"], status);
        for (k, v) in [
            ("alertname", "KeyturnRevocationSlaWarning"),
            ("agent", "invoice-bot"),
            ("credential", "db"),
            ("tenant", "billing"),
            ("tier", "high"),
            ("severity", "warning"),
            ("source", "keyturn"),
        ] {
            assert_eq!(x["labels"][k], v, "{k}");
        }
        assert_eq!(x["annotations"]["description"], a.description.as_str());
        let starts: DateTime<Utc> = x["startsAt"].as_str().unwrap().parse().unwrap();
        assert_eq!(starts, a.since);
        let ends: DateTime<Utc> = x["endsAt"].as_str().unwrap().parse().unwrap();
        if status == "firing" {
            assert_eq!(x["endsAt"], "0001-01-01T00:00:00Z");
        } else {
            assert_eq!(ends, ended);
        }
        assert!(x["generatorURL"].is_string());
        fingerprints.push(x["fingerprint"].as_str().unwrap().to_owned());
        assert!(!String::from_utf8_lossy(body).contains(key));
    }
    assert_eq!(
        fingerprints[0], fingerprints[1],
        "one fingerprint per condition"
    );
    assert_eq!(fingerprints[0].len(), 16);
    m.stop().await;
}

// --- the deadline, end to end -----------------------------------------------

/// The issue's goal: a breach visible in Alertmanager's API within 1 s of
/// its deadline (the loop wakes at `next_change`; nothing polls).
#[tokio::test]
async fn a_deadline_is_visible_in_alertmanager_within_a_second() {
    let base = std::env::var("KEYTURN_TEST_ALERTMANAGER_URL").expect(NEED_SERVICES);
    let dir = tempfile::tempdir().unwrap();
    let sink = Arc::new(AlertmanagerSink::new(&AlertmanagerConfig::new(&base)).unwrap());
    let m = Manager::open(dir.path(), "am", sink);
    let name = format!("KeyturnTestDeadline{}", suffix());
    let deadline = Utc::now() + chrono::Duration::seconds(2);
    m.tracker.spawn(run_loop(
        m.alerts.clone(),
        Arc::new(FiresAt(deadline, alert(&name, Severity::Critical))),
        m.cancel.clone(),
    ));
    until(
        "the breach in Alertmanager",
        Duration::from_secs(10),
        async || am_alerts(&base, &name).await.pop(),
    )
    .await;
    let seen = Utc::now() - deadline;
    assert!(
        seen < chrono::Duration::seconds(1),
        "visible {seen} after the deadline"
    );
    assert!(
        seen >= chrono::Duration::zero(),
        "fired before its deadline"
    );
    m.stop().await;
}

// --- the daemon ----------------------------------------------------------

const BOT: &str = r#"
[agents.bot]
owner = "alice@example.com"
tenant = "acme"
tier = "high"

[agents.bot.credentials.db]
vault = "local"
generate = { kind = "password", length = 40 }
every = "1h"
deliver = [{ type = "file", path = "{root}/bot/db" }]

[alerts.am]
type = "alertmanager"
url = "http://127.0.0.1:9"
"#;

#[test]
fn the_daemon_keeps_a_private_spool_exports_alert_metrics_and_refuses_a_bad_sink() {
    use std::os::unix::fs::MetadataExt;
    let port = common::free_port();
    let env = common::Env::with_daemon(BOT, &format!("listen = \"127.0.0.1:{port}\""));
    let daemon = env.spawn(&[("KEYTURN_LOG", "info")]);
    daemon.wait_ready();
    let spool = env.state_dir().join("alerts");
    assert_eq!(std::fs::metadata(&spool).unwrap().mode() & 0o777, 0o700);
    assert_eq!(
        std::fs::metadata(spool.join("spool.db")).unwrap().mode() & 0o777,
        0o600
    );
    let text = common::http_get(port, "/metrics");
    for needle in [
        "keyturn_alerts_firing{severity=\"critical\"} 0",
        "keyturn_alerts_firing{severity=\"warning\"} 0",
        "keyturn_alert_spool_depth 0",
    ] {
        assert!(text.contains(needle), "metrics lack {needle}:\n{text}");
    }
    // A sink whose key file is missing: the reload is refused, the old
    // sinks stay.
    env.write_credentials(&format!(
        "{BOT}\n[alerts.pd]\ntype = \"pagerduty\"\nrouting_key_file = \"{{dir}}/no-such.key\"\n"
    ));
    daemon.reload();
    let log = daemon.log_text();
    assert!(
        log.contains("reload failed") && log.contains("alerts.pd: "),
        "{log}"
    );
    daemon.stop();

    // At start-up the same sink stops the daemon, saying which one.
    let mut daemon = env.spawn(&[("KEYTURN_LOG", "info")]);
    let status = daemon
        .wait_exit(Duration::from_secs(30))
        .expect("the daemon exits");
    assert_eq!(status.code(), Some(64), "a config error");
    let log = daemon.log_text();
    assert!(
        log.contains("alerts.pd: ") && log.contains("no-such.key"),
        "{log}"
    );
}

// --- answers -----------------------------------------------------------------

/// A receiver answering `/<status>/api/v2/alerts` with that status (a 3xx
/// points at `/followed`, which counts the requests that reach it).
async fn answering() -> (String, Arc<std::sync::atomic::AtomicU32>) {
    use axum::http::{HeaderMap, HeaderValue, StatusCode};
    let followed = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let app = axum::Router::new()
        .route(
            "/:status/api/v2/alerts",
            axum::routing::post(
                |axum::extract::Path(status): axum::extract::Path<u16>| async move {
                    let mut h = HeaderMap::new();
                    h.insert("retry-after", HeaderValue::from_static("7"));
                    h.insert("location", HeaderValue::from_static("/followed"));
                    (
                        StatusCode::from_u16(status).unwrap(),
                        h,
                        "a body that must never be read or logged: canary-body",
                    )
                },
            ),
        )
        .route(
            "/followed",
            axum::routing::post({
                let followed = followed.clone();
                move || {
                    followed.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    async { StatusCode::OK }
                }
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (base, followed)
}

#[tokio::test]
async fn answers_map_to_error_kinds_redirects_are_not_followed_and_bodies_not_read() {
    use keyturn::model::ErrorKind;
    let (base, followed) = answering().await;
    let a = alert("KeyturnRevocationSlaBreached", Severity::Critical);
    let key = a.incident_key();
    let a = Notice::new(&key, &a);
    let sink = |status: u16| {
        AlertmanagerSink::new(&AlertmanagerConfig::new(format!("{base}/{status}"))).unwrap()
    };
    assert!(sink(200).fire(&a).await.is_ok());
    assert!(sink(202).resolve(&a, Utc::now()).await.is_ok());
    for (status, kind) in [
        (302, ErrorKind::Invalid),
        (307, ErrorKind::Invalid),
        (400, ErrorKind::Invalid),
        (404, ErrorKind::Invalid),
        (401, ErrorKind::Unauthorized),
        (403, ErrorKind::Unauthorized),
        (408, ErrorKind::Transient),
        (429, ErrorKind::Throttled),
        (500, ErrorKind::Transient),
        (503, ErrorKind::Transient),
    ] {
        let e = sink(status).fire(&a).await.unwrap_err();
        assert_eq!(e.kind, kind, "{status}: {e}");
        assert!(e.message.contains(&status.to_string()), "{e}");
        assert!(!e.message.contains("canary-body"), "{e}");
        if matches!(status, 429 | 503) {
            assert_eq!(e.retry_after, Some(Duration::from_secs(7)), "{status}");
        }
    }
    assert_eq!(
        followed.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "a redirect was followed"
    );
}

#[tokio::test]
async fn garbage_and_silence_from_a_receiver_are_transient_errors() {
    use keyturn::model::ErrorKind;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // One server that answers garbage, one that never answers.
    let garbage = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let garbage_url = format!("http://{}", garbage.local_addr().unwrap());
    tokio::spawn(async move {
        loop {
            let (mut c, _) = garbage.accept().await.unwrap();
            let mut buf = [0u8; 4096];
            let _ = c.read(&mut buf).await;
            let _ = c.write_all(b"\x00\xffNOT HTTP AT ALL\r\n\r\n").await;
        }
    });
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_url = format!("http://{}", silent.local_addr().unwrap());
    tokio::spawn(async move {
        let mut held = Vec::new();
        loop {
            let (c, _) = silent.accept().await.unwrap();
            held.push(c);
        }
    });
    let a = alert("KeyturnRevocationSlaBreached", Severity::Critical);
    let key = a.incident_key();
    let a = Notice::new(&key, &a);
    let e = AlertmanagerSink::new(&AlertmanagerConfig::new(&garbage_url))
        .unwrap()
        .fire(&a)
        .await
        .unwrap_err();
    assert_eq!(e.kind, ErrorKind::Transient, "{e}");
    let cfg = AlertmanagerConfig {
        timeout: Some("300ms".into()),
        ..AlertmanagerConfig::new(&silent_url)
    };
    let started = Instant::now();
    let e = AlertmanagerSink::new(&cfg)
        .unwrap()
        .fire(&a)
        .await
        .unwrap_err();
    assert_eq!(e.kind, ErrorKind::Transient, "{e}");
    assert!(e.message.contains("no answer within 300ms"), "{e}");
    assert!(started.elapsed() < Duration::from_secs(5));
}
