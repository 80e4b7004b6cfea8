//! The alert manager: [`Alerts`] takes the set of conditions firing now and
//! makes every alert sink agree with it, durably.
//!
//! **Level-triggered.** [`Alerts::reconcile`] compares the desired set
//! (one alert per condition and severity, by [`Alert::dedup_key`]) with
//! the one it keeps, then makes every sink's incidents agree with it
//! (`State::sync`). A sink holds one incident per condition, agent and
//! credential ([`Alert::incident_key`]), at the highest severity firing
//! that its routing filters pass: a new incident is fired, one still
//! firing is re-sent at the interval its sink needs (Alertmanager every
//! minute; PagerDuty and webhooks never, one trigger stays open until
//! resolved), one whose severity changed is fired again as an update of
//! the same incident (the [`Notice`] names the alert it replaces), one
//! gone is resolved. It never waits for the network: it writes the spool
//! and wakes the sinks' workers.
//!
//! **Flapping.** An alert that disappears is not dropped at once: it is
//! held for [`ManagerOptions::flap_hold`] (default 2 minutes, two
//! Alertmanager resend intervals), and counts as firing meanwhile. Back
//! within the hold, at whatever severity, nothing is sent at all: the
//! receivers never saw it end, so nothing can open a second incident. Only
//! an incident whose every alert is still gone after the hold is
//! resolved, with `endsAt` = when it really went; a severity that stays
//! gone as long gives the incident back to the lower one. A stable key
//! alone would not do: PagerDuty opens a *new* incident for a trigger
//! after a resolve, even with the same key. The price is that a resolve
//! reaches the on-call up to `flap_hold` late. A condition replaced by
//! another ([`Alert::replaces`]: expiring by expired) is resolved at once.
//!
//! **The spool** is a small SQLite database, `<dir>/spool.db` (0600 in a
//! 0700 directory; each change committed with `synchronous = FULL`): the
//! firing set and one row per sink and incident, the delivery owed (fire
//! or resolve, pending or done, when last sent, what the receiver
//! accepted, refused or not). So a `kill -9` loses nothing: at the next
//! start the manager knows what is firing (a key still firing is not new,
//! so it is not triggered again) and sends what is still owed (a pending
//! resolve goes out). Delivery is at least once: a kill between a sink's
//! answer and the commit sends that one request again, which every
//! receiver takes as the same alert (Alertmanager by labels, PagerDuty by
//! dedup key, a webhook by fingerprint). Rows spooled before incidents
//! were keyed per condition keep the severity-suffixed key their receiver
//! knows them by, until they resolve.
//!
//! **Delivery.** One task per sink, so a sink that is down delays only its
//! own alerts. A failure that may pass (connection, timeout, 5xx, 429)
//! backs the whole sink off, exponentially with jitter from
//! `initial_backoff` to `max_backoff`, at least as long as a `Retry-After`
//! asks; the delivery stays pending for as long as it takes. A refusal
//! (other 4xx) gives that delivery up: audited as `alert.failed` (once
//! per delivery), counted in `keyturn_alerts_refused` while owed, tried
//! again every `max_backoff` (or resend interval) and at once at a reload
//! ([`Alerts::set_sinks`]; not at a start, which evaluates first). A fire
//! the sink never accepted is dropped when its condition ends: sending it
//! then would page for an alert already over, and there is no incident to
//! resolve. The first delivered fire of an alert (a severity) to a sink
//! is audited as `alert.fired`, a delivered resolve as `alert.resolved`
//! (re-sends are not audited).
//!
//! **Routing** follows the severity: a sink is sent an incident while its
//! filters pass one of the condition's alerts, and its resolve once none
//! does (after the hold), so a sink that takes only `critical` gets the
//! page when the condition escalates and the resolve when it is back at
//! `warning`. A sink that was down (not refusing) for the whole life of a
//! condition still gets both: the fire first, then the resolve, so the
//! on-call learns it happened.
//!
//! **Layout.** This file holds the manager's types, its handle and the
//! reconcile; beside it, in `manager/`: `spool.rs` (the firing set and the
//! deliveries owed, in memory and in the spool) and `delivery.rs` (one task
//! per sink).

mod delivery;
mod spool;

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

use super::{Alert, AlertSink, ConditionSource, Conditions, Notice, Route, Severity};
use crate::audit::{Actor, AuditEvent, Outcome};
use crate::model::{AgentId, CredentialId, ErrorKind, PluginError};
use crate::telemetry::Metrics;

/// How often the daemon's loop asks the condition source when nothing is
/// due sooner (a condition that changes on an event the source is not
/// poked for is seen within this).
pub const IDLE_EVALUATION: Duration = Duration::from_secs(5);

/// Pokes are answered at most this often: every job's end pokes, and a
/// burst of 100k rotations must not become 100k evaluations, each of
/// which walks every credential when anything changed.
pub const POKE_GAP: Duration = Duration::from_millis(500);

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

/// What one sink is owed for one incident: a condition, agent and
/// credential ([`Alert::incident_key`], the row's key; a row spooled before
/// incidents were keyed so keeps the [`Alert::dedup_key`] its receiver knows
/// it by).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Delivery {
    action: Action,
    /// The alert the sink should hold: of the condition's severities
    /// firing (held ones included), the highest its route passes.
    alert: Alert,
    /// Not delivered yet.
    pending: bool,
    /// When the last attempt ended that was not retried (delivered or given
    /// up): a re-send is due a resend interval after it.
    last_sent: Option<DateTime<Utc>>,
    /// The alert the receiver last accepted a fire of: what a change of
    /// severity replaces and a resolve ends. `None`: no fire reached it.
    #[serde(default)]
    sent: Option<Alert>,
    /// Spools written before `sent`: whether a fire reached the sink (read
    /// once, at load).
    #[serde(default, skip_serializing)]
    fired: bool,
    /// A resolve whose fire never reached the sink (it was down the whole
    /// time): the fire goes first, so the on-call still learns that the
    /// condition happened.
    #[serde(default)]
    owes_fire: bool,
    /// The sink refused the last attempt (a 4xx: given up). Tried again
    /// every [`ManagerOptions::max_backoff`] (or resend interval) and at a
    /// reload; a fire the sink never accepted is dropped, not sent, once
    /// its condition has ended.
    #[serde(default)]
    given_up: bool,
    /// Changes whenever `action` or `pending` does, so a worker finishing a
    /// request knows whether the row moved on meanwhile.
    #[serde(skip)]
    generation: u64,
}

impl Delivery {
    /// A fire owed now.
    fn fire(alert: Alert, generation: u64) -> Delivery {
        Delivery {
            action: Action::Fire,
            alert,
            pending: true,
            last_sent: None,
            sent: None,
            fired: false,
            owes_fire: false,
            given_up: false,
            generation,
        }
    }

    /// The alert the receiver holds when it differs (in labels) from the
    /// one it should: what a fire replaces.
    fn replaced(&self) -> Option<&Alert> {
        self.sent.as_ref().filter(|s| !s.same_labels(&self.alert))
    }

    /// Whether the receiver lacks `alert` (it holds none, or another
    /// severity): a fire is owed.
    fn lacks(&self, alert: &Alert) -> bool {
        self.sent.as_ref().is_none_or(|s| !s.same_labels(alert))
    }
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
    PutDelivery(String, String, Box<Delivery>),
    DelDelivery(String, String),
}

impl Op {
    /// Row `id` (sink, key) is now `d`.
    fn put_delivery(id: &(String, String), d: &Delivery) -> Op {
        Op::PutDelivery(id.0.clone(), id.1.clone(), Box::new(d.clone()))
    }
}

struct State {
    firing: BTreeMap<String, Firing>,
    /// (sink, key) → what the sink is owed.
    deliveries: BTreeMap<(String, String), Delivery>,
    db: Connection,
    generation: u64,
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
        spool::load(&mut state)
            .map_err(|e| spool_error(&format!("cannot read {}", path.display()), e))?;
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
        alerts.replace_sinks(sinks, false);
        Ok(alerts)
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.inner.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Replaces the sinks (start, reload). The spool is kept: what a sink
    /// still configured is owed stays owed, and what it refused is tried
    /// again now (the reload may have fixed it); a sink no longer
    /// configured is owed nothing; a new sink (or one whose route changed)
    /// is sent what is firing now that its route passes.
    pub fn set_sinks(&self, sinks: Vec<NamedSink>) {
        self.replace_sinks(sinks, true);
    }

    /// [`Alerts::set_sinks`]; `retry_refused`: what the sinks refused is
    /// due now (a reload), not at its next try (a start: the conditions
    /// are not evaluated yet, and one may have ended while keyturn was
    /// down).
    fn replace_sinks(&self, sinks: Vec<NamedSink>, retry_refused: bool) {
        let mut slots = self.inner.sinks.lock().unwrap_or_else(|p| p.into_inner());
        for old in slots.values() {
            old.stop.cancel();
        }
        slots.clear();
        {
            let mut guard = self.state();
            let state: &mut State = &mut guard;
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
            let refused: Vec<(String, String)> = state
                .deliveries
                .iter()
                .filter(|(_, d)| retry_refused && d.given_up && !d.pending)
                .map(|(id, _)| id.clone())
                .collect();
            for id in refused {
                let generation = state.next_generation();
                let d = state.deliveries.get_mut(&id).expect("listed above");
                d.pending = true;
                d.generation = generation;
                ops.push(Op::put_delivery(&id, d));
            }
            let routes: Vec<(String, Route)> = sinks
                .iter()
                .map(|s| (s.name.clone(), s.route.clone()))
                .collect();
            state.sync(&routes, Utc::now(), &[], &mut ops);
            state.commit(ops);
            self.gauges(state);
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
        for (key, alert) in &desired {
            match state.firing.get_mut(key) {
                None => {
                    log_fired(alert);
                    let f = Firing {
                        alert: alert.clone(),
                        gone_at: None,
                    };
                    ops.push(Op::PutFiring(key.clone(), f.clone()));
                    state.firing.insert(key.clone(), f);
                }
                Some(f) => {
                    let mut changed = f.gone_at.take().is_some();
                    // The first `since` stays: it is when the condition
                    // began. New text reaches the deliveries in `sync`.
                    let updated = Alert {
                        since: f.alert.since,
                        ..alert.clone()
                    };
                    if updated != f.alert {
                        f.alert = updated;
                        changed = true;
                    }
                    if changed {
                        ops.push(Op::PutFiring(key.clone(), f.clone()));
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
        let mut ended = Vec::new();
        for key in gone {
            let (gone_at, newly) = {
                let f = state.firing.get_mut(&key).expect("listed above");
                let newly = f.gone_at.is_none();
                (*f.gone_at.get_or_insert(now), newly)
            };
            // Replaced by another condition now firing (expiring by
            // expired): nothing to hold, it cannot come back without the
            // replacement ending first.
            let replaced = {
                let gone = &state.firing[&key].alert;
                desired.values().any(|a| {
                    a.replaces() == Some(gone.name.as_str())
                        && a.agent == gone.agent
                        && a.credential == gone.credential
                })
            };
            if now < gone_at + hold && !replaced {
                if newly {
                    ops.push(Op::PutFiring(key.clone(), state.firing[&key].clone()));
                }
                continue;
            }
            let f = state.firing.remove(&key).expect("listed above");
            let incident = f.alert.incident_key();
            if desired.values().any(|a| a.incident_key() == incident) {
                // The condition goes on at another severity: not resolved.
                tracing::info!(
                    alert = %f.alert.name, agent = f.alert.agent.as_deref().unwrap_or("-"),
                    credential = f.alert.credential.as_deref().unwrap_or("-"),
                    severity = f.alert.severity.as_str(),
                    "alert no longer at this severity; it fires at another: {}", f.alert.summary
                );
            } else {
                tracing::info!(
                    alert = %f.alert.name, agent = f.alert.agent.as_deref().unwrap_or("-"),
                    credential = f.alert.credential.as_deref().unwrap_or("-"),
                    "alert resolved: {}", f.alert.summary
                );
            }
            ops.push(Op::DelFiring(key));
            ended.push((f.alert, gone_at));
        }
        let routes: Vec<(String, Route)> = slots
            .iter()
            .map(|s| (s.named.name.clone(), s.named.route.clone()))
            .collect();
        let woken = state.sync(&routes, now, &ended, &mut ops);
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
        // A condition counts once, at the highest severity it holds (as
        // its receivers see it): a severity held after an escalation is
        // not counted beside the one that replaced it.
        let mut incidents: BTreeMap<String, Severity> = BTreeMap::new();
        for f in state.firing.values() {
            let at = incidents
                .entry(f.alert.incident_key())
                .or_insert(f.alert.severity);
            *at = (*at).max(f.alert.severity);
        }
        for severity in [Severity::Warning, Severity::Critical] {
            let n = incidents.values().filter(|s| **s == severity).count();
            m.set_alerts_firing(severity.as_str(), n as i64);
        }
        let depth = state.deliveries.values().filter(|d| d.pending).count();
        m.set_alert_spool_depth(depth as i64);
        let refused = state.deliveries.values().filter(|d| d.given_up).count();
        m.set_alerts_refused(refused as i64);
    }
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

/// Logs an alert that starts firing at its severity: a critical one at
/// ERROR, which the docs promise means "keyturn needs attention", so a host
/// with no alert sink and no scraper (one watching its journal) hears of it.
fn log_fired(a: &Alert) {
    let (agent, credential) = (
        a.agent.as_deref().unwrap_or("-"),
        a.credential.as_deref().unwrap_or("-"),
    );
    match a.severity {
        Severity::Critical => {
            tracing::error!(alert = %a.name, agent, credential, "alert firing: {}", a.summary)
        }
        Severity::Warning => {
            tracing::warn!(alert = %a.name, agent, credential, "alert firing: {}", a.summary)
        }
    }
}

/// The daemon's alert loop: asks `source` for the conditions and
/// reconciles, again when the source said they may next change, when a
/// held key's hold ends, when poked ([`Alerts::poke`]; at most every
/// [`POKE_GAP`]), and at least every [`IDLE_EVALUATION`]. Returns when
/// `cancel` is cancelled.
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
        let evaluated = tokio::time::Instant::now();
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = poke.notified() => {
                tokio::select! {
                    _ = tokio::time::sleep_until(evaluated + POKE_GAP) => {}
                    _ = cancel.cancelled() => return,
                }
            }
            _ = cancel.cancelled() => return,
        }
    }
}
