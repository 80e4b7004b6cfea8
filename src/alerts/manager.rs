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
//! reaches the on-call up to `flap_hold` late.
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

impl State {
    fn next_generation(&mut self) -> u64 {
        self.generation += 1;
        self.generation
    }

    /// Makes the deliveries agree with the firing set: each sink holds one
    /// incident per condition, agent and credential, at the highest
    /// severity firing that its route passes (a held alert counts: no
    /// receiver saw it end). A new incident is fired; a change of severity
    /// is fired again, as an update of the same incident; an incident gone
    /// (its last alert `ended`, or no longer routed to the sink) is
    /// resolved. Returns whether a delivery became due.
    fn sync(
        &mut self,
        sinks: &[(String, Route)],
        now: DateTime<Utc>,
        ended: &[(Alert, DateTime<Utc>)],
        ops: &mut Vec<Op>,
    ) -> bool {
        // (sink, incident) → the alert it should hold, and whether one of
        // the incident's alerts is firing now (not only held).
        let mut view: BTreeMap<(String, String), (Alert, bool)> = BTreeMap::new();
        for f in self.firing.values() {
            for (sink, route) in sinks {
                if !route.matches(&f.alert) {
                    continue;
                }
                let live = f.gone_at.is_none();
                let entry = view
                    .entry((sink.clone(), f.alert.incident_key()))
                    .or_insert_with(|| (f.alert.clone(), live));
                if entry.0.severity < f.alert.severity {
                    entry.0 = f.alert.clone();
                }
                entry.1 |= live;
            }
        }
        let mut rows: BTreeMap<(String, String), Vec<String>> = BTreeMap::new();
        for ((sink, key), d) in &self.deliveries {
            rows.entry((sink.clone(), d.alert.incident_key()))
                .or_default()
                .push(key.clone());
        }
        let mut woken = false;
        for ((sink, incident), (alert, live)) in view {
            let keys = rows
                .remove(&(sink.clone(), incident.clone()))
                .unwrap_or_default();
            // The row that holds the incident: the one firing these labels,
            // else any firing, else a resolve not yet delivered (the
            // receiver may not have seen the end: the same incident).
            let row = |pick: &dyn Fn(&Delivery) -> bool| {
                keys.iter()
                    .position(|k| pick(&self.deliveries[&(sink.clone(), k.clone())]))
            };
            let primary = row(&|d| d.action == Action::Fire && d.alert.same_labels(&alert))
                .or_else(|| row(&|d| d.action == Action::Fire))
                .or(if keys.is_empty() { None } else { Some(0) });
            for (i, key) in keys.into_iter().enumerate() {
                let id = (sink.clone(), key);
                woken |= if Some(i) == primary {
                    self.hold(id, &alert, live, ops)
                } else {
                    // Two rows of one incident: spooled before incidents
                    // were keyed per condition.
                    self.end(id, now, ops)
                };
            }
            if primary.is_none() {
                let d = Delivery::fire(alert, self.next_generation());
                ops.push(Op::PutDelivery(
                    sink.clone(),
                    incident.clone(),
                    Box::new(d.clone()),
                ));
                self.deliveries.insert((sink, incident), d);
                woken = true;
            }
        }
        for ((sink, incident), keys) in rows {
            let route = sinks.iter().find(|(s, _)| *s == sink).map(|(_, r)| r);
            let ended_at = ended
                .iter()
                .filter(|(a, _)| a.incident_key() == incident && route.is_none_or(|r| r.matches(a)))
                .map(|(_, at)| *at)
                .max()
                .unwrap_or(now);
            for key in keys {
                woken |= self.end((sink.clone(), key), ended_at, ops);
            }
        }
        woken
    }

    /// Row `id` should hold `alert`; `live`: a condition's alert is firing
    /// now, not only held. Returns whether a fire became due.
    fn hold(&mut self, id: (String, String), alert: &Alert, live: bool, ops: &mut Vec<Op>) -> bool {
        let generation = self.next_generation();
        let d = self.deliveries.get_mut(&id).expect("a listed row");
        match d.action {
            Action::Fire if d.alert == *alert => return false,
            // New text only: re-sends carry it; nothing is sent now.
            Action::Fire if d.alert.same_labels(alert) => d.alert = alert.clone(),
            // Every alert of the condition is held: its severity changes
            // when it is back (or it resolves), not while it is gone.
            Action::Fire if !live => return false,
            // Another severity: the receiver is told, unless it already
            // holds this one (an update still owed was taken back).
            Action::Fire => {
                d.alert = alert.clone();
                d.pending = d.lacks(alert);
                d.generation = generation;
            }
            // Back before its resolve was delivered: the same incident.
            Action::Resolve { .. } => {
                d.action = Action::Fire;
                d.alert = alert.clone();
                d.owes_fire = false;
                d.given_up = false;
                d.pending = d.lacks(alert);
                d.generation = generation;
            }
        }
        ops.push(Op::put_delivery(&id, d));
        d.pending
    }

    /// Row `id`'s incident ended at `ended_at`. Returns whether a resolve
    /// became due.
    fn end(&mut self, id: (String, String), ended_at: DateTime<Utc>, ops: &mut Vec<Op>) -> bool {
        let generation = self.next_generation();
        let d = self.deliveries.get_mut(&id).expect("a listed row");
        if matches!(d.action, Action::Resolve { .. }) {
            return false;
        }
        if d.sent.is_none() && d.given_up {
            // The sink refused every fire of it: no incident is open there
            // to resolve, and a trigger now would page for an alert that
            // is already over.
            tracing::warn!(
                sink = %id.0, key = %id.1, severity = d.alert.severity.as_str(),
                "alert ended; its sink never accepted it (given up), so neither it nor a resolve is sent"
            );
            self.deliveries.remove(&id);
            ops.push(Op::DelDelivery(id.0, id.1));
            return false;
        }
        d.action = Action::Resolve { ended_at };
        d.owes_fire = d.sent.is_none();
        d.given_up = false;
        d.pending = true;
        d.generation = generation;
        ops.push(Op::put_delivery(&id, d));
        true
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
            if now < gone_at + hold {
                if newly {
                    ops.push(Op::PutFiring(key.clone(), state.firing[&key].clone()));
                }
                continue;
            }
            let f = state.firing.remove(&key).expect("listed above");
            tracing::info!(
                alert = %f.alert.name, agent = f.alert.agent.as_deref().unwrap_or("-"),
                credential = f.alert.credential.as_deref().unwrap_or("-"),
                "alert resolved: {}", f.alert.summary
            );
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
        let refused = state.deliveries.values().filter(|d| d.given_up).count();
        m.set_alerts_refused(refused as i64);
    }

    /// What `sink` should send now, and when it next has something due: a
    /// firing alert's re-send (at `resend`), a refused delivery's next try
    /// (at `resend`, else `max_backoff`).
    fn due(
        &self,
        sink: &str,
        now: DateTime<Utc>,
        resend: Option<Duration>,
    ) -> (Vec<(String, Delivery)>, Option<DateTime<Utc>>) {
        let every = |d: &Delivery| {
            let every = if d.given_up {
                Some(resend.unwrap_or(self.inner.opts.max_backoff))
            } else if d.action == Action::Fire {
                resend
            } else {
                None
            };
            every.and_then(|r| chrono::Duration::from_std(r).ok())
        };
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
            if let (Some(every), Some(last)) = (every(d), d.last_sent) {
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
                        Action::Fire => {
                            let notice = Notice {
                                key: &key,
                                alert: &d.alert,
                                replaces: d.replaced(),
                            };
                            sink.fire(&notice).await
                        }
                        // The alert the receiver holds is the one it ends.
                        Action::Resolve { ended_at } => {
                            let notice = Notice {
                                key: &key,
                                alert: d.sent.as_ref().unwrap_or(&d.alert),
                                replaces: None,
                            };
                            sink.resolve(&notice, ended_at).await
                        }
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
        let mut new_fire = false;
        {
            let mut guard = self.state();
            let state: &mut State = &mut guard;
            let id = (name.to_owned(), key.to_owned());
            let mut ops = Vec::new();
            let generation = state.next_generation();
            if let Some(d) = state.deliveries.get_mut(&id) {
                let unchanged = d.generation == sent.generation;
                match what {
                    Action::Fire => {
                        new_fire = d.lacks(&sent.alert);
                        d.sent = Some(sent.alert.clone());
                        d.owes_fire = false;
                        d.given_up = false;
                        // A resolve that owed its fire stays pending.
                        if d.action == Action::Fire {
                            if unchanged {
                                d.pending = false;
                                d.last_sent = Some(now);
                            } else if d.lacks(&d.alert.clone()) {
                                // The severity changed meanwhile (or back).
                                d.pending = true;
                                d.generation = generation;
                            }
                        }
                        ops.push(Op::put_delivery(&id, d));
                    }
                    Action::Resolve { .. } if unchanged => {
                        state.deliveries.remove(&id);
                        ops.push(Op::DelDelivery(id.0, id.1));
                    }
                    // Fired again while the resolve was on its way: the
                    // receiver saw the end, so the fire is owed.
                    Action::Resolve { .. } => {
                        if d.action == Action::Fire {
                            d.sent = None;
                            d.pending = true;
                            d.generation = generation;
                            ops.push(Op::put_delivery(&id, d));
                        }
                    }
                }
            }
            state.commit(ops);
            self.gauges(state);
        }
        if let Some(m) = &self.inner.metrics {
            m.alert_delivery(name, "ok");
        }
        let event = match what {
            Action::Fire if new_fire => "alert.fired",
            Action::Fire => return,
            Action::Resolve { .. } => "alert.resolved",
        };
        let alert = match what {
            Action::Fire => &sent.alert,
            Action::Resolve { .. } => sent.sent.as_ref().unwrap_or(&sent.alert),
        };
        tracing::info!(sink = %name, key = %key, severity = alert.severity.as_str(), "{event}");
        self.inner
            .recorder
            .record(audit_event(event, Outcome::Ok, name, alert, None))
            .await;
    }

    /// `what` of `sent` was refused by sink `name` in a way retrying soon
    /// will not change: given up, and tried again only every
    /// `max_backoff` (or resend interval) and at a reload. Audited when
    /// the row is first refused.
    async fn gave_up(&self, name: &str, key: &str, sent: &Delivery, what: Action, e: &PluginError) {
        let now = Utc::now();
        let mut first = false;
        let mut dropped = false;
        {
            let mut state = self.state();
            let id = (name.to_owned(), key.to_owned());
            let mut ops = Vec::new();
            if let Some(d) = state.deliveries.get_mut(&id) {
                let same_action = matches!(
                    (what, d.action),
                    (Action::Fire, Action::Fire) | (Action::Resolve { .. }, Action::Resolve { .. })
                );
                if what == Action::Fire && !same_action && d.sent.is_none() {
                    // The fire a resolve owed: the sink never accepted the
                    // alert and it is over, so nothing is owed any more.
                    dropped = true;
                    state.deliveries.remove(&id);
                    ops.push(Op::DelDelivery(id.0, id.1));
                } else if same_action {
                    first = !d.given_up;
                    d.given_up = true;
                    if d.generation == sent.generation {
                        d.pending = false;
                        d.last_sent = Some(now);
                    }
                    ops.push(Op::put_delivery(&id, d));
                }
            }
            state.commit(ops);
            self.gauges(&state);
        }
        if let Some(m) = &self.inner.metrics {
            m.alert_delivery(name, "gave_up");
        }
        let action = match what {
            Action::Fire => "fire",
            Action::Resolve { .. } => "resolve",
        };
        if dropped {
            tracing::error!(sink = %name, key = %key, action, error = %e.message, "alert delivery refused; given up: the alert has ended, so nothing more is sent");
        } else {
            tracing::error!(sink = %name, key = %key, action, error = %e.message, "alert delivery refused; given up: tried again every few minutes and at a reload");
        }
        if !first && !dropped {
            return;
        }
        let mut event = audit_event("alert.failed", Outcome::Failed, name, &sent.alert, None);
        event.error = Some(e.message.clone());
        event.detail = Some(format!(
            "{} action={action}",
            event.detail.unwrap_or_default(),
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
    for d in deliveries.values_mut() {
        // Rows of spools written before `sent` and `given_up`.
        if d.fired && d.sent.is_none() {
            d.sent = Some(d.alert.clone());
        }
        if d.sent.is_none() && !d.pending && d.last_sent.is_some() && d.action == Action::Fire {
            d.given_up = true;
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
