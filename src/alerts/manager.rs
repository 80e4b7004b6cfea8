//! The alert manager: [`Alerts`] takes the set of conditions firing now and
//! makes every alert sink agree with it, durably.
//!
//! **Level-triggered.** [`Alerts::reconcile`] compares the desired set with
//! the one it keeps: a new dedup key fires to every sink whose routing
//! filters match, a key still firing is re-sent at the interval its sink
//! needs (Alertmanager every minute; PagerDuty and webhooks never, one
//! trigger stays open until resolved), a key gone is resolved. It never
//! waits for the network: it writes the spool and wakes the sinks' workers.
//!
//! **Flapping.** A key that disappears is not resolved at once: it is held
//! for [`ManagerOptions::flap_hold`] (default 2 minutes, two Alertmanager
//! resend intervals). Back within the hold, nothing is sent at all: the
//! receivers never saw it end, so nothing can open a second incident. Only
//! a key still gone after the hold is resolved, with `endsAt` = when it
//! really went. A stable dedup key alone would not do: PagerDuty opens a
//! *new* incident for a trigger after a resolve, even with the same key.
//! The price is that a resolve reaches the on-call up to `flap_hold` late.
//!
//! **The spool** is a small SQLite database, `<dir>/spool.db` (0600 in a
//! 0700 directory; each change committed with `synchronous = FULL`): the
//! firing set and one row per sink and key, the delivery owed (fire or
//! resolve, pending or done, when last sent). So a `kill -9` loses
//! nothing: at the next start the manager knows what is firing (a key
//! still firing is not new, so it is not triggered again) and sends what
//! is still owed (a pending resolve goes out). Delivery is at least once: a
//! kill between a sink's answer and the commit sends that one request
//! again, which every receiver takes as the same alert (Alertmanager by
//! labels, PagerDuty by dedup key, a webhook by fingerprint).
//!
//! **Delivery.** One task per sink, so a sink that is down delays only its
//! own alerts. A failure that may pass (connection, timeout, 5xx, 429)
//! backs the whole sink off, exponentially with jitter from
//! `initial_backoff` to `max_backoff`, at least as long as a `Retry-After`
//! asks; the delivery stays pending for as long as it takes. A refusal
//! (other 4xx) gives that delivery up: audited as `alert.failed`. The
//! first delivered fire of a key to a sink is audited as `alert.fired`, a
//! delivered resolve as `alert.resolved` (re-sends are not audited).
//!
//! **Routing** is decided when a key fires (and for what is firing when a
//! sink is added); a resolve goes to the sinks the fire was meant for. A
//! sink that was down for the whole life of a condition still gets both:
//! the fire first, then the resolve, so the on-call learns it happened.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use rand::Rng;
use rusqlite::{Connection, params};
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{Alert, AlertSink, ConditionSource, Conditions, Route, Severity};
use crate::audit::{Actor, AuditEvent, Outcome};
use crate::model::{AgentId, CredentialId, ErrorKind, PluginError};
use crate::telemetry::Metrics;

/// How often the daemon's loop asks the condition source when nothing is
/// due sooner (a condition that changes on an event the source is not
/// poked for is seen within this).
pub const IDLE_EVALUATION: Duration = Duration::from_secs(5);

/// One configured alert sink: its `[alerts.NAME]`, the sink, its route.
pub struct NamedSink {
    pub name: String,
    pub sink: Arc<dyn AlertSink>,
    pub route: Route,
}

/// Where the manager writes its audit records (the daemon: `Engine::record`,
/// so the audit head is persisted).
#[async_trait]
pub trait AlertRecorder: Send + Sync {
    async fn record(&self, event: AuditEvent);
}

/// An [`AlertRecorder`] that keeps the records in memory, in order (for a
/// manager whose records are read back, as the tests do).
#[derive(Debug, Default)]
pub struct MemoryRecorder(Mutex<Vec<AuditEvent>>);

#[async_trait]
impl AlertRecorder for MemoryRecorder {
    async fn record(&self, event: AuditEvent) {
        self.0.lock().unwrap().push(event);
    }
}

impl MemoryRecorder {
    /// The records so far.
    pub fn records(&self) -> Vec<AuditEvent> {
        self.0.lock().unwrap().clone()
    }

    /// The records' event names (`alert.fired`, ...).
    pub fn events(&self) -> Vec<String> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .map(|e| e.event.clone())
            .collect()
    }
}

/// Tunables; the defaults are the daemon's.
#[derive(Debug, Clone, Copy)]
pub struct ManagerOptions {
    /// How long a key that disappeared is held before it is resolved.
    pub flap_hold: Duration,
    /// The first wait after a sink failed, doubled at each failure in a row...
    pub initial_backoff: Duration,
    /// ... up to this.
    pub max_backoff: Duration,
}

impl Default for ManagerOptions {
    fn default() -> Self {
        Self {
            flap_hold: Duration::from_secs(120),
            initial_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(300),
        }
    }
}

/// An alert that is firing, as [`Alerts::firing`] reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FiringAlert {
    pub alert: Alert,
    /// Set while the condition is gone but held (see the module doc).
    pub gone_since: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "snake_case")]
enum Action {
    Fire,
    Resolve { ended_at: DateTime<Utc> },
}

/// What one sink is owed for one key.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Delivery {
    action: Action,
    alert: Alert,
    /// Not delivered yet.
    pending: bool,
    /// When the last attempt ended that was not retried (delivered or given
    /// up): a re-send is due a resend interval after it.
    last_sent: Option<DateTime<Utc>>,
    /// Whether a fire of this key reached the sink.
    fired: bool,
    /// A resolve whose fire never reached the sink (it was down the whole
    /// time): the fire goes first, so the on-call still learns that the
    /// condition happened.
    #[serde(default)]
    owes_fire: bool,
    /// Changes whenever `action` or `pending` does, so a worker finishing a
    /// request knows whether the row moved on meanwhile.
    #[serde(skip)]
    generation: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Firing {
    alert: Alert,
    gone_at: Option<DateTime<Utc>>,
}

/// One change to the spool.
enum Op {
    PutFiring(String, Firing),
    DelFiring(String),
    PutDelivery(String, String, Delivery),
    DelDelivery(String, String),
}

struct State {
    firing: BTreeMap<String, Firing>,
    /// (sink, key) → what the sink is owed.
    deliveries: BTreeMap<(String, String), Delivery>,
    db: Connection,
    generation: u64,
}

impl State {
    fn next_generation(&mut self) -> u64 {
        self.generation += 1;
        self.generation
    }

    /// Commits `ops` in one transaction. A failure (a full disk) is logged:
    /// memory stays right, and the next change writes the rows again.
    fn commit(&mut self, ops: Vec<Op>) {
        if ops.is_empty() {
            return;
        }
        if let Err(e) = write(&mut self.db, &ops) {
            tracing::error!(error = %e, "alert spool: cannot write; deliveries continue from memory");
        }
    }
}

fn write(db: &mut Connection, ops: &[Op]) -> Result<(), String> {
    let tx = db.transaction().map_err(|e| e.to_string())?;
    for op in ops {
        let r = match op {
            Op::PutFiring(key, f) => tx.execute(
                "INSERT OR REPLACE INTO firing (key, body) VALUES (?1, ?2)",
                params![key, serde_json::to_string(f).map_err(|e| e.to_string())?],
            ),
            Op::DelFiring(key) => tx.execute("DELETE FROM firing WHERE key = ?1", params![key]),
            Op::PutDelivery(sink, key, d) => tx.execute(
                "INSERT OR REPLACE INTO delivery (sink, key, body) VALUES (?1, ?2, ?3)",
                params![
                    sink,
                    key,
                    serde_json::to_string(d).map_err(|e| e.to_string())?
                ],
            ),
            Op::DelDelivery(sink, key) => tx.execute(
                "DELETE FROM delivery WHERE sink = ?1 AND key = ?2",
                params![sink, key],
            ),
        };
        r.map_err(|e| e.to_string())?;
    }
    tx.commit().map_err(|e| e.to_string())
}

struct SinkSlot {
    named: NamedSink,
    wake: Notify,
    stop: CancellationToken,
}

struct Inner {
    state: Mutex<State>,
    sinks: Mutex<BTreeMap<String, Arc<SinkSlot>>>,
    recorder: Arc<dyn AlertRecorder>,
    metrics: Option<Arc<Metrics>>,
    opts: ManagerOptions,
    poke: Arc<Notify>,
    cancel: CancellationToken,
    tracker: TaskTracker,
}

/// The handle on the alert manager (cheap to clone).
#[derive(Clone)]
pub struct Alerts {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Alerts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Alerts").finish_non_exhaustive()
    }
}

fn spool_error(what: &str, e: impl std::fmt::Display) -> PluginError {
    PluginError::new(ErrorKind::Fatal, format!("alert spool: {what}: {e}"))
}

impl Alerts {
    /// Opens (or creates) the spool in `dir` and starts one delivery task
    /// per sink on `tracker`, all stopping when `cancel` is.
    pub fn open(
        dir: &Path,
        sinks: Vec<NamedSink>,
        recorder: Arc<dyn AlertRecorder>,
        metrics: Option<Arc<Metrics>>,
        opts: ManagerOptions,
        cancel: CancellationToken,
        tracker: TaskTracker,
    ) -> Result<Alerts, PluginError> {
        let path = dir.join("spool.db");
        crate::private_file::create_parent(&path)
            .map_err(|e| spool_error(&format!("cannot create {}", dir.display()), e))?;
        // Created here so it is 0600 from the first byte, whatever the umask.
        crate::private_file::open_options()
            .read(true)
            .write(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| spool_error(&format!("cannot create {}", path.display()), e))?;
        let db = Connection::open(&path)
            .map_err(|e| spool_error(&format!("cannot open {}", path.display()), e))?;
        db.execute_batch(
            "PRAGMA journal_mode = WAL;
             PRAGMA synchronous = FULL;
             CREATE TABLE IF NOT EXISTS firing (key TEXT PRIMARY KEY, body TEXT NOT NULL);
             CREATE TABLE IF NOT EXISTS delivery (
                 sink TEXT NOT NULL, key TEXT NOT NULL, body TEXT NOT NULL,
                 PRIMARY KEY (sink, key));",
        )
        .map_err(|e| spool_error("cannot set up", e))?;
        let mut state = State {
            firing: BTreeMap::new(),
            deliveries: BTreeMap::new(),
            db,
            generation: 0,
        };
        load(&mut state).map_err(|e| spool_error(&format!("cannot read {}", path.display()), e))?;
        let alerts = Alerts {
            inner: Arc::new(Inner {
                state: Mutex::new(state),
                sinks: Mutex::new(BTreeMap::new()),
                recorder,
                metrics,
                opts,
                poke: Arc::new(Notify::new()),
                cancel,
                tracker,
            }),
        };
        alerts.set_sinks(sinks);
        Ok(alerts)
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.inner.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Replaces the sinks (start, reload). The spool is kept: what a sink
    /// still configured is owed stays owed; a sink no longer configured is
    /// owed nothing; a new sink is sent what is firing now (if its route
    /// matches).
    pub fn set_sinks(&self, sinks: Vec<NamedSink>) {
        let mut slots = self.inner.sinks.lock().unwrap_or_else(|p| p.into_inner());
        for old in slots.values() {
            old.stop.cancel();
        }
        slots.clear();
        {
            let mut state = self.state();
            let mut ops = Vec::new();
            let names: Vec<&str> = sinks.iter().map(|s| s.name.as_str()).collect();
            let dropped: Vec<(String, String)> = state
                .deliveries
                .keys()
                .filter(|(sink, _)| !names.contains(&sink.as_str()))
                .cloned()
                .collect();
            for (sink, key) in dropped {
                tracing::info!(sink = %sink, key = %key, "alert sink no longer configured: its spooled delivery is dropped");
                state.deliveries.remove(&(sink.clone(), key.clone()));
                ops.push(Op::DelDelivery(sink, key));
            }
            let firing: Vec<(String, Alert)> = state
                .firing
                .iter()
                .map(|(k, f)| (k.clone(), f.alert.clone()))
                .collect();
            for s in &sinks {
                for (key, alert) in &firing {
                    let id = (s.name.clone(), key.clone());
                    if s.route.matches(alert) && !state.deliveries.contains_key(&id) {
                        let generation = state.next_generation();
                        let d = Delivery {
                            action: Action::Fire,
                            alert: alert.clone(),
                            pending: true,
                            last_sent: None,
                            fired: false,
                            owes_fire: false,
                            generation,
                        };
                        ops.push(Op::PutDelivery(id.0.clone(), id.1.clone(), d.clone()));
                        state.deliveries.insert(id, d);
                    }
                }
            }
            state.commit(ops);
            self.gauges(&state);
        }
        for named in sinks {
            if let Some(m) = &self.inner.metrics {
                m.alert_sink_configured(&named.name);
            }
            let slot = Arc::new(SinkSlot {
                named,
                wake: Notify::new(),
                stop: self.inner.cancel.child_token(),
            });
            slots.insert(slot.named.name.clone(), slot.clone());
            let this = self.clone();
            self.inner
                .tracker
                .spawn(async move { this.run_sink(slot).await });
        }
    }

    /// Makes the sinks agree with `conditions`, the set firing at `now`.
    /// Writes the spool and wakes the delivery tasks; never waits for the
    /// network.
    pub fn reconcile(&self, now: DateTime<Utc>, conditions: Conditions) {
        let slots: Vec<Arc<SinkSlot>> = self
            .inner
            .sinks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect();
        let hold =
            chrono::Duration::from_std(self.inner.opts.flap_hold).unwrap_or(chrono::Duration::MAX);
        let mut desired: BTreeMap<String, Alert> = BTreeMap::new();
        for alert in conditions.firing {
            desired.entry(alert.dedup_key()).or_insert(alert);
        }
        let mut guard = self.state();
        let state: &mut State = &mut guard;
        let mut ops = Vec::new();
        let mut woken = false;
        for (key, alert) in &desired {
            match state.firing.get_mut(key) {
                None => {
                    let f = Firing {
                        alert: alert.clone(),
                        gone_at: None,
                    };
                    ops.push(Op::PutFiring(key.clone(), f.clone()));
                    state.firing.insert(key.clone(), f);
                    for slot in &slots {
                        if !slot.named.route.matches(alert) {
                            continue;
                        }
                        let id = (slot.named.name.clone(), key.clone());
                        let generation = state.next_generation();
                        // A resolve not yet sent is replaced: the receiver
                        // never saw the end, so this is the same incident.
                        let fired = state.deliveries.get(&id).is_some_and(|d| d.fired);
                        let d = Delivery {
                            action: Action::Fire,
                            alert: alert.clone(),
                            pending: true,
                            last_sent: None,
                            fired,
                            owes_fire: false,
                            generation,
                        };
                        ops.push(Op::PutDelivery(id.0.clone(), id.1.clone(), d.clone()));
                        state.deliveries.insert(id, d);
                        woken = true;
                    }
                }
                Some(f) => {
                    let mut changed = f.gone_at.take().is_some();
                    // The first `since` stays: it is when the condition began.
                    let updated = Alert {
                        since: f.alert.since,
                        ..alert.clone()
                    };
                    if updated != f.alert {
                        f.alert = updated.clone();
                        changed = true;
                        // Re-sends carry the new text; nothing is sent now.
                        for ((sink, k), d) in state
                            .deliveries
                            .iter_mut()
                            .filter(|((_, k), d)| k == key && d.action == Action::Fire)
                        {
                            d.alert = updated.clone();
                            ops.push(Op::PutDelivery(sink.clone(), k.clone(), d.clone()));
                        }
                    }
                    if changed {
                        let f = state.firing[key].clone();
                        ops.push(Op::PutFiring(key.clone(), f));
                    }
                }
            }
        }
        let gone: Vec<String> = state
            .firing
            .keys()
            .filter(|k| !desired.contains_key(*k))
            .cloned()
            .collect();
        for key in gone {
            let (gone_at, newly) = {
                let f = state.firing.get_mut(&key).expect("listed above");
                let newly = f.gone_at.is_none();
                (*f.gone_at.get_or_insert(now), newly)
            };
            if now < gone_at + hold {
                if newly {
                    ops.push(Op::PutFiring(key.clone(), state.firing[&key].clone()));
                }
                continue;
            }
            state.firing.remove(&key);
            ops.push(Op::DelFiring(key.clone()));
            let owed: Vec<(String, String)> = state
                .deliveries
                .keys()
                .filter(|(_, k)| *k == key)
                .cloned()
                .collect();
            for id in owed {
                let generation = state.next_generation();
                let d = state.deliveries.get_mut(&id).expect("listed above");
                d.action = Action::Resolve { ended_at: gone_at };
                d.owes_fire = !d.fired;
                d.pending = true;
                d.generation = generation;
                ops.push(Op::PutDelivery(id.0.clone(), id.1.clone(), d.clone()));
                woken = true;
            }
        }
        state.commit(ops);
        self.gauges(state);
        drop(guard);
        if woken {
            for slot in &slots {
                slot.wake.notify_one();
            }
        }
    }

    /// What is firing now (held ones too), by dedup key.
    pub fn firing(&self) -> Vec<FiringAlert> {
        self.state()
            .firing
            .values()
            .map(|f| FiringAlert {
                alert: f.alert.clone(),
                gone_since: f.gone_at,
            })
            .collect()
    }

    /// Deliveries spooled and not yet delivered.
    pub fn pending(&self) -> usize {
        self.state()
            .deliveries
            .values()
            .filter(|d| d.pending)
            .count()
    }

    /// When a held key's hold ends (the loop reconciles then).
    pub fn next_deadline(&self) -> Option<DateTime<Utc>> {
        let hold = chrono::Duration::from_std(self.inner.opts.flap_hold).ok()?;
        self.state()
            .firing
            .values()
            .filter_map(|f| f.gone_at.map(|t| t + hold))
            .min()
    }

    /// Asks the loop ([`run_loop`]) to evaluate the conditions now (the
    /// engine calls it when a condition may have changed).
    pub fn poke(&self) {
        self.inner.poke.notify_one();
    }

    /// The [`Notify`] behind [`Alerts::poke`], for code that holds no `Alerts`.
    pub fn poke_handle(&self) -> Arc<Notify> {
        self.inner.poke.clone()
    }

    fn gauges(&self, state: &State) {
        let Some(m) = &self.inner.metrics else { return };
        for severity in [Severity::Warning, Severity::Critical] {
            let n = state
                .firing
                .values()
                .filter(|f| f.alert.severity == severity)
                .count();
            m.set_alerts_firing(severity.as_str(), n as i64);
        }
        let depth = state.deliveries.values().filter(|d| d.pending).count();
        m.set_alert_spool_depth(depth as i64);
    }

    /// What `sink` should send now, and when it next has something due.
    fn due(
        &self,
        sink: &str,
        now: DateTime<Utc>,
        resend: Option<Duration>,
    ) -> (Vec<(String, Delivery)>, Option<DateTime<Utc>>) {
        let resend = resend.and_then(|r| chrono::Duration::from_std(r).ok());
        let state = self.state();
        let mut due = Vec::new();
        let mut next: Option<DateTime<Utc>> = None;
        let from = (sink.to_owned(), String::new());
        for ((s, key), d) in state.deliveries.range(from..) {
            if s != sink {
                break;
            }
            if d.pending {
                due.push((key.clone(), d.clone()));
                continue;
            }
            if let (Action::Fire, Some(every), Some(last)) = (d.action, resend, d.last_sent) {
                let at = last + every;
                if at <= now {
                    due.push((key.clone(), d.clone()));
                } else {
                    next = Some(next.map_or(at, |n| n.min(at)));
                }
            }
        }
        (due, next)
    }

    /// One sink's delivery task.
    async fn run_sink(self, slot: Arc<SinkSlot>) {
        let name = slot.named.name.clone();
        let sink = slot.named.sink.clone();
        let resend = sink.resend_interval();
        let mut failures: u32 = 0;
        loop {
            let now = Utc::now();
            let (due, next) = self.due(&name, now, resend);
            if due.is_empty() {
                let wait = next
                    .and_then(|t| (t - now).to_std().ok())
                    .unwrap_or(Duration::from_secs(3600));
                tokio::select! {
                    _ = slot.wake.notified() => {}
                    _ = tokio::time::sleep(wait) => {}
                    _ = slot.stop.cancelled() => return,
                }
                continue;
            }
            let mut backoff = None;
            for (key, d) in due {
                // The fire a resolve still owes goes first (the next round
                // sends the resolve).
                let what = match d.action {
                    Action::Resolve { .. } if d.owes_fire => Action::Fire,
                    a => a,
                };
                let attempt = async {
                    match what {
                        Action::Fire => sink.fire(&d.alert).await,
                        Action::Resolve { ended_at } => sink.resolve(&d.alert, ended_at).await,
                    }
                };
                let result = tokio::select! {
                    r = attempt => r,
                    _ = slot.stop.cancelled() => return,
                };
                match result {
                    Ok(()) => {
                        failures = 0;
                        self.delivered(&name, &key, &d, what).await;
                    }
                    Err(e) if e.kind.is_retryable() => {
                        failures = failures.saturating_add(1);
                        let wait = backoff_delay(&self.inner.opts, failures)
                            .max(e.retry_after.unwrap_or_default());
                        tracing::warn!(
                            sink = %name, key = %key, error = %e.message,
                            retry_in = %humantime::format_duration(wait),
                            "alert delivery failed; retrying"
                        );
                        if let Some(m) = &self.inner.metrics {
                            m.alert_delivery(&name, "retry");
                        }
                        backoff = Some(wait);
                        break;
                    }
                    Err(e) => self.gave_up(&name, &key, &d, what, &e).await,
                }
            }
            if let Some(wait) = backoff {
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = slot.stop.cancelled() => return,
                }
            }
        }
    }

    /// `what` of `sent` reached sink `name`.
    async fn delivered(&self, name: &str, key: &str, sent: &Delivery, what: Action) {
        let now = Utc::now();
        let mut first_fire = false;
        {
            let mut state = self.state();
            let id = (name.to_owned(), key.to_owned());
            let mut ops = Vec::new();
            if let Some(d) = state.deliveries.get_mut(&id) {
                let unchanged = d.generation == sent.generation;
                match what {
                    Action::Fire => {
                        first_fire = !d.fired;
                        d.fired = true;
                        d.owes_fire = false;
                        // A resolve that owed its fire stays pending.
                        if unchanged && d.action == Action::Fire {
                            d.pending = false;
                            d.last_sent = Some(now);
                        }
                        ops.push(Op::PutDelivery(id.0.clone(), id.1.clone(), d.clone()));
                    }
                    Action::Resolve { .. } if unchanged => {
                        state.deliveries.remove(&id);
                        ops.push(Op::DelDelivery(id.0, id.1));
                    }
                    // Fired again while the resolve was on its way: the
                    // new fire stays owed.
                    Action::Resolve { .. } => {}
                }
            }
            state.commit(ops);
            self.gauges(&state);
        }
        if let Some(m) = &self.inner.metrics {
            m.alert_delivery(name, "ok");
        }
        let event = match what {
            Action::Fire if first_fire => "alert.fired",
            Action::Fire => return,
            Action::Resolve { .. } => "alert.resolved",
        };
        tracing::info!(sink = %name, key = %key, severity = sent.alert.severity.as_str(), "{event}");
        self.inner
            .recorder
            .record(audit_event(event, Outcome::Ok, name, &sent.alert, None))
            .await;
    }

    /// `what` of `sent` was refused by sink `name` in a way retrying will
    /// not change.
    async fn gave_up(&self, name: &str, key: &str, sent: &Delivery, what: Action, e: &PluginError) {
        let now = Utc::now();
        {
            let mut state = self.state();
            let id = (name.to_owned(), key.to_owned());
            let mut ops = Vec::new();
            if let Some(d) = state.deliveries.get_mut(&id)
                && d.generation == sent.generation
            {
                match d.action {
                    // Tried again at the next re-send, if the sink re-sends.
                    Action::Fire => {
                        d.pending = false;
                        d.last_sent = Some(now);
                        ops.push(Op::PutDelivery(id.0.clone(), id.1.clone(), d.clone()));
                    }
                    Action::Resolve { .. } => {
                        state.deliveries.remove(&id);
                        ops.push(Op::DelDelivery(id.0, id.1));
                    }
                }
            }
            state.commit(ops);
            self.gauges(&state);
        }
        if let Some(m) = &self.inner.metrics {
            m.alert_delivery(name, "gave_up");
        }
        tracing::error!(sink = %name, key = %key, error = %e.message, "alert delivery refused; given up");
        let mut event = audit_event("alert.failed", Outcome::Failed, name, &sent.alert, None);
        event.error = Some(e.message.clone());
        event.detail = Some(format!(
            "{} action={}",
            event.detail.unwrap_or_default(),
            match what {
                Action::Fire => "fire",
                Action::Resolve { .. } => "resolve",
            }
        ));
        self.inner.recorder.record(event).await;
    }
}

fn load(state: &mut State) -> rusqlite::Result<()> {
    let mut firing = BTreeMap::new();
    let mut deliveries = BTreeMap::new();
    {
        let mut q = state.db.prepare("SELECT key, body FROM firing")?;
        let rows = q.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?;
        for row in rows {
            let (key, body) = row?;
            match serde_json::from_str::<Firing>(&body) {
                Ok(f) => {
                    firing.insert(key, f);
                }
                Err(e) => {
                    tracing::error!(key = %key, error = %e, "alert spool: unreadable row skipped")
                }
            }
        }
        let mut q = state.db.prepare("SELECT sink, key, body FROM delivery")?;
        let rows = q.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
            ))
        })?;
        for row in rows {
            let (sink, key, body) = row?;
            match serde_json::from_str::<Delivery>(&body) {
                Ok(d) => {
                    deliveries.insert((sink, key), d);
                }
                Err(e) => {
                    tracing::error!(key = %key, error = %e, "alert spool: unreadable row skipped")
                }
            }
        }
    }
    state.firing = firing;
    state.deliveries = deliveries;
    Ok(())
}

fn audit_event(
    event: &str,
    outcome: Outcome,
    sink: &str,
    alert: &Alert,
    error: Option<String>,
) -> AuditEvent {
    let mut ev = AuditEvent::new(event, Actor::Daemon, outcome);
    ev.agent = alert.agent.as_deref().and_then(|a| AgentId::new(a).ok());
    ev.credential = alert
        .credential
        .as_deref()
        .and_then(|c| CredentialId::new(c).ok());
    ev.tenant = alert.tenant.clone();
    ev.detail = Some(format!(
        "sink={sink} alert={} severity={} key={}",
        alert.name,
        alert.severity.as_str(),
        alert.dedup_key()
    ));
    ev.error = error;
    ev
}

/// The wait after `failures` failures in a row: `initial × 2^(failures-1)`
/// capped at `max`, then drawn in its upper half (jitter, so sinks failing
/// together do not retry in step).
pub(super) fn backoff_delay(opts: &ManagerOptions, failures: u32) -> Duration {
    let exp = opts
        .initial_backoff
        .saturating_mul(1u32 << failures.saturating_sub(1).min(20));
    let capped = exp.min(opts.max_backoff);
    capped.mul_f64(rand::thread_rng().gen_range(0.5..=1.0))
}

/// A source with no conditions: the daemon's until the engine's is plugged in.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoConditions;

impl ConditionSource for NoConditions {
    fn conditions(&self, _now: DateTime<Utc>) -> Conditions {
        Conditions::default()
    }
}

/// A source of one alert that fires from a deadline on, and before it says
/// when in `next_change` (how a deadline reaches the loop without polling).
#[derive(Debug, Clone)]
pub struct FiresAt(pub DateTime<Utc>, pub Alert);

impl ConditionSource for FiresAt {
    fn conditions(&self, now: DateTime<Utc>) -> Conditions {
        if now >= self.0 {
            Conditions {
                firing: vec![self.1.clone()],
                next_change: None,
            }
        } else {
            Conditions {
                firing: vec![],
                next_change: Some(self.0),
            }
        }
    }
}

/// The daemon's alert loop: asks `source` for the conditions and
/// reconciles, again when the source said they may next change, when a
/// held key's hold ends, when poked ([`Alerts::poke`]), and at least every
/// [`IDLE_EVALUATION`]. Returns when `cancel` is cancelled.
pub async fn run_loop(alerts: Alerts, source: Arc<dyn ConditionSource>, cancel: CancellationToken) {
    let poke = alerts.poke_handle();
    loop {
        let now = Utc::now();
        let conditions = source.conditions(now);
        let next_change = conditions.next_change;
        alerts.reconcile(now, conditions);
        let mut wait = IDLE_EVALUATION;
        let after = Utc::now();
        for at in [next_change, alerts.next_deadline()].into_iter().flatten() {
            // A deadline already past (a source that says "now" again)
            // is looked at shortly, not in a busy loop.
            let until = (at - after).to_std().unwrap_or(Duration::from_millis(100));
            wait = wait.min(until);
        }
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = poke.notified() => {}
            _ = cancel.cancelled() => return,
        }
    }
}
