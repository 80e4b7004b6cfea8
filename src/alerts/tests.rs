//! The alert manager against scripted sinks: routing, re-sending, flapping,
//! a sink down, restarts, Retry-After, give-ups and their audit records.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Instant;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::*;
use crate::model::ErrorKind;

/// What a scripted sink was asked, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Call {
    Fire(String),
    Resolve(String, DateTime<Utc>),
}

/// How a scripted sink answers.
#[derive(Debug, Clone)]
enum Answer {
    Ok,
    Fail(ErrorKind, Option<Duration>),
}

struct Scripted {
    kind: &'static str,
    resend: Option<Duration>,
    answer: Mutex<Answer>,
    /// Successful calls only: what reached the receiver.
    received: Mutex<Vec<(Instant, Call)>>,
    /// The alerts of the successful fires.
    fired: Mutex<Vec<Alert>>,
    attempts: AtomicU32,
}

impl Scripted {
    fn new(resend: Option<Duration>) -> Arc<Self> {
        Arc::new(Self {
            kind: "scripted",
            resend,
            answer: Mutex::new(Answer::Ok),
            received: Mutex::new(Vec::new()),
            fired: Mutex::new(Vec::new()),
            attempts: AtomicU32::new(0),
        })
    }
    fn answer(&self, a: Answer) {
        *self.answer.lock().unwrap() = a;
    }
    fn calls(&self) -> Vec<Call> {
        self.received
            .lock()
            .unwrap()
            .iter()
            .map(|(_, c)| c.clone())
            .collect()
    }
    fn reply(&self, call: Call) -> Result<(), PluginError> {
        self.attempts.fetch_add(1, Ordering::SeqCst);
        match self.answer.lock().unwrap().clone() {
            Answer::Ok => {
                self.received.lock().unwrap().push((Instant::now(), call));
                Ok(())
            }
            Answer::Fail(kind, after) => {
                Err(PluginError::new(kind, "scripted failure").with_retry_after(after))
            }
        }
    }
}

#[async_trait]
impl AlertSink for Scripted {
    fn describe(&self) -> String {
        "scripted".into()
    }
    fn kind(&self) -> &'static str {
        self.kind
    }
    fn resend_interval(&self) -> Option<Duration> {
        self.resend
    }
    async fn fire(&self, alert: &Alert) -> Result<(), PluginError> {
        self.reply(Call::Fire(alert.dedup_key()))?;
        self.fired.lock().unwrap().push(alert.clone());
        Ok(())
    }
    async fn resolve(&self, alert: &Alert, ended_at: DateTime<Utc>) -> Result<(), PluginError> {
        self.reply(Call::Resolve(alert.dedup_key(), ended_at))
    }
}

fn alert(name: &str, severity: Severity, tenant: &str) -> Alert {
    Alert {
        name: name.into(),
        severity,
        agent: Some("invoice-bot".into()),
        credential: Some("db".into()),
        tenant: Some(tenant.into()),
        tier: Some("high".into()),
        summary: format!("{name} on invoice-bot/db"),
        description: "what to do".into(),
        since: "2026-12-01T10:00:00Z".parse().unwrap(),
    }
}

/// The alert most tests raise: a critical SLA breach of tenant `billing`.
fn breach() -> Alert {
    alert(
        "KeyturnRevocationSlaBreached",
        Severity::Critical,
        "billing",
    )
}

fn firing(alerts: &[&Alert]) -> Conditions {
    Conditions {
        firing: alerts.iter().map(|a| (*a).clone()).collect(),
        next_change: None,
    }
}

fn named(name: &str, sink: &Arc<Scripted>, route: Route) -> NamedSink {
    NamedSink {
        name: name.into(),
        sink: sink.clone(),
        route,
    }
}

fn options(flap_hold: Duration) -> ManagerOptions {
    ManagerOptions {
        flap_hold,
        initial_backoff: Duration::from_millis(50),
        max_backoff: Duration::from_millis(200),
    }
}

struct Harness {
    alerts: Alerts,
    recorder: Arc<MemoryRecorder>,
    cancel: CancellationToken,
    tracker: TaskTracker,
}

impl Harness {
    fn open(dir: &Path, sinks: Vec<NamedSink>, opts: ManagerOptions) -> Harness {
        let recorder = Arc::new(MemoryRecorder::default());
        let cancel = CancellationToken::new();
        let tracker = TaskTracker::new();
        let alerts = Alerts::open(
            dir,
            sinks,
            recorder.clone(),
            None,
            opts,
            cancel.clone(),
            tracker.clone(),
        )
        .unwrap();
        Harness {
            alerts,
            recorder,
            cancel,
            tracker,
        }
    }

    /// A manager in `dir` with one sink, `name`, on the default route and
    /// no flap hold.
    fn single(dir: &Path, name: &str, sink: &Arc<Scripted>) -> Harness {
        Harness::open(
            dir,
            vec![named(name, sink, Route::default())],
            options(Duration::ZERO),
        )
    }

    /// Stops the delivery tasks and drops the manager, as a `kill -9`
    /// would leave the spool (every change is committed when made).
    async fn kill(self) {
        self.cancel.cancel();
        self.tracker.close();
        self.tracker.wait().await;
    }
}

use std::path::Path;

/// Polls `cond` every 10 ms for up to 5 s.
async fn until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn alerts_go_to_the_sinks_their_routes_match_and_fire_once() {
    let dir = tempfile::tempdir().unwrap();
    let all = Scripted::new(None);
    let critical_only = Scripted::new(None);
    let other_tenant = Scripted::new(None);
    let h = Harness::open(
        dir.path(),
        vec![
            named("all", &all, Route::default()),
            named(
                "critical",
                &critical_only,
                Route {
                    severities: Some(vec![Severity::Critical]),
                    ..Route::default()
                },
            ),
            named(
                "other",
                &other_tenant,
                Route {
                    tenants: Some(vec!["payments".into()]),
                    tiers: Some(vec!["high".into()]),
                    ..Route::default()
                },
            ),
        ],
        options(Duration::ZERO),
    );
    let warn = alert("KeyturnRotationFailing", Severity::Warning, "billing");
    let crit = breach();
    let now = Utc::now();
    h.alerts.reconcile(now, firing(&[&warn, &crit]));
    until("both alerts at `all`", || all.calls().len() == 2).await;
    until("the critical one at `critical`", || {
        critical_only.calls().len() == 1
    })
    .await;
    // Evaluated again and again: still firing, nothing new is sent.
    for _ in 0..5 {
        h.alerts.reconcile(Utc::now(), firing(&[&warn, &crit]));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(all.calls().len(), 2, "{:?}", all.calls());
    assert_eq!(
        critical_only.calls(),
        vec![Call::Fire(crit.dedup_key())],
        "routed by severity"
    );
    assert!(other_tenant.calls().is_empty(), "routed by tenant");
    assert_eq!(h.alerts.firing().len(), 2);
    until("one alert.fired per delivered fire", || {
        h.recorder.events() == ["alert.fired"; 3]
    })
    .await;
    h.kill().await;
}

#[tokio::test]
async fn a_resend_sink_gets_the_firing_alert_again_at_its_interval() {
    let dir = tempfile::tempdir().unwrap();
    let am = Scripted::new(Some(Duration::from_millis(150)));
    let pd = Scripted::new(None);
    let h = Harness::open(
        dir.path(),
        vec![
            named("am", &am, Route::default()),
            named("pd", &pd, Route::default()),
        ],
        options(Duration::ZERO),
    );
    let a = alert("KeyturnRotationFailing", Severity::Warning, "billing");
    h.alerts.reconcile(Utc::now(), firing(&[&a]));
    until("three sends to am", || am.calls().len() >= 3).await;
    let times: Vec<Instant> = am
        .received
        .lock()
        .unwrap()
        .iter()
        .map(|(t, _)| *t)
        .collect();
    for w in times.windows(2) {
        assert!(
            w[1] - w[0] >= Duration::from_millis(140),
            "re-sent too early: {:?}",
            w[1] - w[0]
        );
    }
    assert_eq!(pd.calls().len(), 1, "pagerduty is never re-sent");
    assert_eq!(
        h.recorder.events(),
        vec!["alert.fired", "alert.fired"],
        "re-sends are not audited"
    );
    h.kill().await;
}

#[tokio::test]
async fn a_flap_within_the_hold_sends_nothing_and_a_real_end_resolves_once() {
    let dir = tempfile::tempdir().unwrap();
    let pd = Scripted::new(None);
    let h = Harness::open(
        dir.path(),
        vec![named("pd", &pd, Route::default())],
        options(Duration::from_millis(300)),
    );
    let a = alert("KeyturnRotationFailing", Severity::Warning, "billing");
    let t0 = Utc::now();
    h.alerts.reconcile(t0, firing(&[&a]));
    until("the fire", || pd.calls().len() == 1).await;
    // Gone, back, gone, back: all within the hold.
    for _ in 0..3 {
        h.alerts.reconcile(Utc::now(), firing(&[]));
        tokio::time::sleep(Duration::from_millis(20)).await;
        h.alerts.reconcile(Utc::now(), firing(&[&a]));
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(pd.calls(), vec![Call::Fire(a.dedup_key())], "no duplicate");
    // Gone for good: held, then resolved with the time it went.
    let gone = Utc::now();
    h.alerts.reconcile(gone, firing(&[]));
    assert_eq!(h.alerts.firing().len(), 1, "held");
    assert_eq!(h.alerts.firing()[0].gone_since, Some(gone));
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(pd.calls().len(), 1, "not resolved within the hold");
    let deadline = h.alerts.next_deadline().expect("a hold ends");
    assert_eq!(deadline, gone + chrono::Duration::milliseconds(300));
    tokio::time::sleep(Duration::from_millis(300)).await;
    h.alerts.reconcile(Utc::now(), firing(&[]));
    until("the resolve", || pd.calls().len() == 2).await;
    assert_eq!(pd.calls()[1], Call::Resolve(a.dedup_key(), gone));
    assert!(h.alerts.firing().is_empty());
    until("both audit records", || {
        h.recorder.events() == ["alert.fired", "alert.resolved"]
    })
    .await;
    h.kill().await;
}

#[tokio::test]
async fn a_sink_down_is_spooled_retried_and_never_blocks_the_others() {
    let dir = tempfile::tempdir().unwrap();
    let down = Scripted::new(None);
    let up = Scripted::new(None);
    down.answer(Answer::Fail(ErrorKind::Transient, None));
    let h = Harness::open(
        dir.path(),
        vec![
            named("down", &down, Route::default()),
            named("up", &up, Route::default()),
        ],
        options(Duration::ZERO),
    );
    let a = breach();
    h.alerts.reconcile(Utc::now(), firing(&[&a]));
    until("the fire at the sink that is up", || up.calls().len() == 1).await;
    until("retries at the sink that is down", || {
        down.attempts.load(Ordering::SeqCst) >= 3
    })
    .await;
    until("only the sink that is down owed", || {
        h.alerts.pending() == 1
    })
    .await;
    // Resolved while the sink is still down: the up one is resolved now.
    h.alerts.reconcile(Utc::now(), firing(&[]));
    until("the resolve at the sink that is up", || {
        up.calls().len() == 2
    })
    .await;
    down.answer(Answer::Ok);
    until("both transitions at the sink that came back", || {
        down.calls().len() == 2
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The fire never reached it: it goes first, so the on-call learns
    // the condition happened, then the resolve; each exactly once.
    assert!(
        matches!(down.calls().as_slice(), [Call::Fire(f), Call::Resolve(r, _)] if *f == a.dedup_key() && *r == a.dedup_key()),
        "{:?}",
        down.calls()
    );
    assert_eq!(h.alerts.pending(), 0);
    h.kill().await;
}

#[tokio::test]
async fn a_sink_back_up_gets_each_transition_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let sink = Scripted::new(None);
    sink.answer(Answer::Fail(ErrorKind::Transient, None));
    let h = Harness::single(dir.path(), "pd", &sink);
    let a = breach();
    h.alerts.reconcile(Utc::now(), firing(&[&a]));
    until("a few failed attempts", || {
        sink.attempts.load(Ordering::SeqCst) >= 2
    })
    .await;
    sink.answer(Answer::Ok);
    until("the fire", || sink.calls().len() == 1).await;
    for _ in 0..3 {
        h.alerts.reconcile(Utc::now(), firing(&[&a]));
    }
    h.alerts.reconcile(Utc::now(), firing(&[]));
    until("the resolve", || sink.calls().len() == 2).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        matches!(
            sink.calls().as_slice(),
            [Call::Fire(_), Call::Resolve(_, _)]
        ),
        "{:?}",
        sink.calls()
    );
    h.kill().await;
}

#[tokio::test]
async fn a_restart_neither_triggers_again_nor_forgets_an_owed_resolve() {
    let dir = tempfile::tempdir().unwrap();
    let a = breach();
    let b = alert("KeyturnRotationFailing", Severity::Warning, "billing");
    let pd = Scripted::new(None);
    {
        let h = Harness::single(dir.path(), "pd", &pd);
        h.alerts.reconcile(Utc::now(), firing(&[&a, &b]));
        until("both fires", || pd.calls().len() == 2).await;
        // The sink goes down; `b` ends; the process dies before the
        // resolve could be delivered.
        pd.answer(Answer::Fail(ErrorKind::Transient, None));
        h.alerts.reconcile(Utc::now(), firing(&[&a]));
        until("a failed resolve attempt", || {
            pd.attempts.load(Ordering::SeqCst) >= 3
        })
        .await;
        h.kill().await;
    }
    pd.answer(Answer::Ok);
    let h = Harness::single(dir.path(), "pd", &pd);
    assert_eq!(
        h.alerts
            .firing()
            .iter()
            .map(|f| f.alert.dedup_key())
            .collect::<Vec<_>>(),
        vec![a.dedup_key()],
        "the spool remembers what fires"
    );
    h.alerts.reconcile(Utc::now(), firing(&[&a]));
    until("the owed resolve", || pd.calls().len() == 3).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let calls = pd.calls();
    assert!(
        matches!(&calls[2], Call::Resolve(k, _) if *k == b.dedup_key()),
        "{calls:?}"
    );
    assert_eq!(
        calls
            .iter()
            .filter(|c| matches!(c, Call::Fire(k) if *k == a.dedup_key()))
            .count(),
        1,
        "no second trigger after the restart: {calls:?}"
    );
    h.kill().await;
}

#[tokio::test]
async fn retry_after_is_honoured() {
    let dir = tempfile::tempdir().unwrap();
    let sink = Scripted::new(None);
    sink.answer(Answer::Fail(
        ErrorKind::Throttled,
        Some(Duration::from_millis(700)),
    ));
    let h = Harness::single(dir.path(), "pd", &sink);
    let a = breach();
    let started = Instant::now();
    h.alerts.reconcile(Utc::now(), firing(&[&a]));
    until("the throttled attempt", || {
        sink.attempts.load(Ordering::SeqCst) == 1
    })
    .await;
    sink.answer(Answer::Ok);
    until("the fire", || sink.calls().len() == 1).await;
    let (at, _) = sink.received.lock().unwrap()[0].clone();
    // The backoff alone would retry within 50 ms.
    assert!(
        at - started >= Duration::from_millis(700),
        "retried after {:?}",
        at - started
    );
    h.kill().await;
}

#[tokio::test]
async fn a_refused_delivery_is_given_up_and_audited() {
    let dir = tempfile::tempdir().unwrap();
    let sink = Scripted::new(None);
    sink.answer(Answer::Fail(ErrorKind::Invalid, None));
    let h = Harness::single(dir.path(), "pd", &sink);
    let a = breach();
    h.alerts.reconcile(Utc::now(), firing(&[&a]));
    until("alert.failed", || {
        h.recorder.events() == vec!["alert.failed".to_owned()]
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(sink.attempts.load(Ordering::SeqCst), 1, "not retried");
    assert_eq!(h.alerts.pending(), 0);
    let ev = h.recorder.records()[0].clone();
    assert_eq!(ev.agent.as_ref().map(|a| a.as_str()), Some("invoice-bot"));
    assert_eq!(ev.error.as_deref(), Some("scripted failure"));
    assert!(
        ev.detail
            .as_deref()
            .unwrap()
            .contains("sink=pd alert=KeyturnRevocationSlaBreached"),
        "{ev:?}"
    );
    h.kill().await;
}

#[tokio::test]
async fn a_sink_added_on_reload_is_sent_what_fires_and_a_removed_one_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let first = Scripted::new(None);
    let second = Scripted::new(None);
    let h = Harness::single(dir.path(), "first", &first);
    let a = breach();
    h.alerts.reconcile(Utc::now(), firing(&[&a]));
    until("the fire at first", || first.calls().len() == 1).await;
    h.alerts
        .set_sinks(vec![named("second", &second, Route::default())]);
    until("the fire at second", || second.calls().len() == 1).await;
    h.alerts.reconcile(Utc::now(), firing(&[]));
    until("the resolve at second", || second.calls().len() == 2).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        first.calls().len(),
        1,
        "a removed sink is sent nothing more"
    );
    h.kill().await;
}

#[tokio::test]
async fn the_loop_delivers_a_deadline_within_a_fraction_of_a_second() {
    let dir = tempfile::tempdir().unwrap();
    let am = Scripted::new(Some(Duration::from_secs(60)));
    let h = Harness::single(dir.path(), "am", &am);
    let a = breach();
    let at = Utc::now() + chrono::Duration::milliseconds(1500);
    h.tracker.spawn(run_loop(
        h.alerts.clone(),
        Arc::new(FiresAt(at, a.clone())),
        h.cancel.clone(),
    ));
    until("the fire", || am.calls().len() == 1).await;
    // Measured when this poll (every 10 ms) saw it; the goal is 1 s.
    let late = Utc::now() - at;
    assert!(
        late < chrono::Duration::milliseconds(1000),
        "delivered {late} after the deadline"
    );
    assert!(
        late >= chrono::Duration::zero(),
        "fired before its deadline"
    );
    h.kill().await;
}

#[test]
fn backoff_doubles_is_capped_and_jittered() {
    let opts = options(Duration::ZERO);
    for failures in 1..40 {
        let d = manager::backoff_delay(&opts, failures);
        let full = (opts.initial_backoff * 2u32.pow((failures - 1).min(20))).min(opts.max_backoff);
        assert!(d <= full && d >= full / 2, "{failures}: {d:?} vs {full:?}");
    }
}

#[test]
fn a_route_passes_an_alert_when_every_filter_set_lists_its_value() {
    let a = alert("KeyturnRotationFailing", Severity::Warning, "billing");
    let no_tier = Alert {
        tier: None,
        ..a.clone()
    };
    let route = |severities: Option<Vec<Severity>>,
                 tiers: Option<Vec<&str>>,
                 tenants: Option<Vec<&str>>| Route {
        severities,
        tiers: tiers.map(|t| t.into_iter().map(String::from).collect()),
        tenants: tenants.map(|t| t.into_iter().map(String::from).collect()),
    };
    assert!(Route::default().matches(&a));
    assert!(Route::default().matches(&no_tier));
    assert!(route(Some(vec![Severity::Warning]), None, None).matches(&a));
    assert!(!route(Some(vec![Severity::Critical]), None, None).matches(&a));
    assert!(route(None, Some(vec!["low", "high"]), Some(vec!["billing"])).matches(&a));
    assert!(!route(None, Some(vec!["high"]), Some(vec!["payments"])).matches(&a));
    assert!(
        !route(None, Some(vec!["high"]), None).matches(&no_tier),
        "an alert without a tier passes no tier filter"
    );
}

#[test]
fn an_alert_webhook_needs_a_strong_private_key() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("hook.key");
    std::fs::write(&key, "too-short").unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let cfg = webhook::AlertWebhookConfig::new("https://alerts.example.com/k?token=t0k3n", &key);
    let e = webhook::AlertWebhookSink::new(&cfg, "hook").unwrap_err();
    assert!(e.message.contains("must be at least 32"), "{e}");
    std::fs::write(&key, "0123456789abcdef0123456789abcdef").unwrap();
    let sink = webhook::AlertWebhookSink::new(&cfg, "hook").unwrap();
    // The query (a token) is never shown.
    assert_eq!(
        sink.describe(),
        "alert-webhook:https://alerts.example.com/k"
    );
    assert!(!format!("{sink:?}").contains("t0k3n"));
}

#[tokio::test]
async fn new_text_for_a_firing_alert_is_re_sent_and_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let am = Scripted::new(Some(Duration::from_millis(100)));
    let a = alert("KeyturnRotationFailing", Severity::Warning, "billing");
    let worse = Alert {
        summary: "now 5 failures in a row".into(),
        since: Utc::now(),
        ..a.clone()
    };
    {
        let h = Harness::single(dir.path(), "am", &am);
        h.alerts.reconcile(Utc::now(), firing(&[&a]));
        until("the fire", || am.calls().len() == 1).await;
        h.alerts.reconcile(Utc::now(), firing(&[&worse]));
        let firing_now = h.alerts.firing();
        assert_eq!(firing_now[0].alert.summary, worse.summary);
        assert_eq!(firing_now[0].alert.since, a.since, "since is when it began");
        h.kill().await;
    }
    let h = Harness::single(dir.path(), "am", &am);
    // No reconcile: the re-send comes from the spool alone.
    let before = am.calls().len();
    until("a re-send after the restart", || am.calls().len() > before).await;
    let resent = am.fired.lock().unwrap().last().unwrap().clone();
    assert_eq!(resent.summary, worse.summary);
    assert_eq!(resent.since, a.since);
    h.kill().await;
}
