//! The engine: runs rotations step by step, persisting and auditing each one,
//! and keeps the in-memory view that `status` and the scheduler read.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use backon::{BackoffBuilder, ExponentialBuilder};
use chrono::{DateTime, Utc};
use tokio::sync::{Notify, Semaphore, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::catalog::{Catalog, CredEntry, VaultHandle};
use super::failpoint::crash_point;
use super::footprint::Footprint;
use super::step::{Step, Trigger};
use super::table::{CredLive, Job, Keep, LiveRow, Parked, RotateFinished, Running, Table};
use crate::audit::{Actor, AuditEvent, AuditLog, Outcome};
use crate::config::RetryConfig;
use crate::generators;
use crate::model::{
    CredentialKey, ErrorKind, PluginError, RotationId, SecretValue, Stage, VersionNo,
};
use crate::schedule::catch_up_times;
use crate::sinks::Notice;
use crate::state::{
    CredentialRow, RotationRow, StateError, StateStore, StateWriter, VersionRow, Write,
};
use crate::targets::Target;
use crate::telemetry::{CredentialState, Metrics};
use crate::vaults::{Select, Vault, VaultItem, VaultRefs, VersionRef};

/// A burst of at least this many jobs ends with the heap trimmed...
const TRIM_AFTER_JOBS: usize = 64;
/// ...and fewer jobs at most this often.
const TRIM_AT_MOST_EVERY: Duration = Duration::from_secs(60);

/// Longest wait before a parked (failed) rotation is tried again.
const MAX_PARK_DELAY: Duration = Duration::from_secs(3600);

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    State(#[from] StateError),
    #[error("cannot start the state writer thread: {0}")]
    Thread(#[from] std::io::Error),
}

/// One credential's line in `status`.
#[derive(Debug, Clone)]
pub struct CredStatus {
    pub key: CredentialKey,
    pub vault: String,
    pub version: Option<VersionNo>,
    pub stage: Option<Stage>,
    pub last_rotated: Option<DateTime<Utc>>,
    pub next_due: Option<DateTime<Utc>>,
    pub state: &'static str,
    pub step: Option<Step>,
    pub rotation: Option<RotationId>,
    pub last_error: Option<String>,
}

/// A cheap handle; clones share one engine.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

struct Inner {
    catalog: RwLock<Arc<Catalog>>,
    state: Arc<dyn StateStore>,
    /// Every read and write of a rotation goes through this one thread,
    /// which group-commits the writes of concurrent rotations.
    writer: StateWriter,
    audit: AuditLog,
    metrics: Arc<Metrics>,
    global: Arc<Semaphore>,
    /// Live status and timers of every credential.
    table: Mutex<Table>,
    /// Credentials that left the config while their previous version awaited
    /// retirement: the entry to retire it with, until that is done.
    departed: Mutex<HashMap<CredentialKey, Arc<CredEntry>>>,
    /// Jobs running now, and jobs finished since the heap was last trimmed.
    in_flight: AtomicUsize,
    finished_since_trim: AtomicUsize,
    /// A delayed trim is armed (see `after_job`), and when the last one ran.
    trim_pending: AtomicBool,
    last_trim: Mutex<Instant>,
    wake: Notify,
    cancel: CancellationToken,
    tracker: TaskTracker,
}

/// Why a rotation stopped before finishing.
enum Stop {
    /// Failed after its retries; parked and retried later, but not before
    /// the `Retry-After` of the last error if it had one (the last attempt's
    /// has no in-step delay left to honour it).
    Failed(String, Option<Duration>),
    /// The daemon is stopping; state is persisted and it resumes at next start.
    Drained,
}

/// A step failure with the plug-in context it happened in.
struct StepError {
    context: String,
    error: PluginError,
}

impl StepError {
    fn new(context: impl Into<String>, error: PluginError) -> Self {
        Self {
            context: context.into(),
            error,
        }
    }
    fn message(&self) -> String {
        format!(
            "{}: {} ({})",
            self.context, self.error.message, self.error.kind
        )
    }
}

fn now() -> DateTime<Utc> {
    // Millisecond precision everywhere, so what is persisted compares equal
    // to what is kept in memory.
    DateTime::from_timestamp_millis(Utc::now().timestamp_millis())
        .expect("current time is representable")
}

fn chrono_dur(d: Duration) -> chrono::Duration {
    chrono::Duration::from_std(d).unwrap_or(chrono::Duration::MAX)
}

impl Engine {
    pub fn new(
        catalog: Catalog,
        state: Arc<dyn StateStore>,
        audit: AuditLog,
        metrics: Arc<Metrics>,
        cancel: CancellationToken,
        tracker: TaskTracker,
    ) -> Result<Engine, EngineError> {
        let writer = StateWriter::start(state.clone())?;
        let global = Arc::new(Semaphore::new(
            catalog.config.daemon.max_concurrent_rotations.max(1),
        ));
        Ok(Engine {
            inner: Arc::new(Inner {
                catalog: RwLock::new(Arc::new(catalog)),
                state,
                writer,
                audit,
                metrics,
                global,
                table: Mutex::new(Table::default()),
                departed: Mutex::new(HashMap::new()),
                in_flight: AtomicUsize::new(0),
                finished_since_trim: AtomicUsize::new(0),
                trim_pending: AtomicBool::new(false),
                last_trim: Mutex::new(Instant::now()),
                wake: Notify::new(),
                cancel,
                tracker,
            }),
        })
    }

    pub fn catalog(&self) -> Arc<Catalog> {
        self.inner.catalog()
    }

    pub fn audit(&self) -> &AuditLog {
        &self.inner.audit
    }

    pub fn state(&self) -> &Arc<dyn StateStore> {
        &self.inner.state
    }

    /// Loads persisted state and arms a timer for every credential:
    /// unfinished rotations resume now, credentials without a version get
    /// their first one now, overdue ones are spread over the catch-up window,
    /// the rest wait for their next due time.
    pub async fn start(&self) -> Result<(), EngineError> {
        let state = self.inner.state.clone();
        let snapshot = tokio::task::spawn_blocking(move || state.snapshot())
            .await
            .expect("snapshot task panicked")?;
        let catalog = self.catalog();
        // Rotations to resume before their retire step (usually none).
        let mut resume = HashSet::new();
        {
            let mut live = self.inner.live();
            live.reserve_total(catalog.creds.len());
            // Keys are interned from the catalog first, so the table shares
            // the catalog's id strings instead of holding the state's copies.
            // State rows of credentials no longer configured are left out.
            for key in catalog.creds.keys() {
                live.entry(key);
            }
            for row in snapshot.credentials {
                if let Some(l) = live.get_mut(&row.key) {
                    l.row = Some(row.into());
                }
            }
            for rot in snapshot.unfinished {
                if !catalog.creds.contains_key(&rot.key) {
                    // Left the config while the daemon was down: only a
                    // retirement that was due is still owed.
                    if rot.step == Step::Retire {
                        self.inner.adopt_departed(&mut live, &catalog, &rot);
                    }
                    continue;
                }
                self.inner.adopt_unfinished(&mut live, rot, &mut resume);
            }
        }
        self.inner.schedule_all(&resume, true);
        Ok(())
    }

    /// Swaps in a new catalog (after a reload) and re-arms every timer from
    /// the new schedules. Rotations in flight finish with the entry they
    /// started with. A credential the engine holds no state for (new, or
    /// added back) is picked up from the state database, so one that comes
    /// back is not rotated as if it had never been; one that left keeps only
    /// the retirement of its previous version, if that is pending.
    pub async fn reload(&self, catalog: Catalog) {
        let catalog = Arc::new(catalog);
        let fresh: Vec<CredentialKey> = {
            let live = self.inner.live();
            catalog
                .creds
                .keys()
                .filter(|k| {
                    live.get(k)
                        .is_none_or(|l| l.row.is_none() && l.running.is_none())
                })
                .cloned()
                .collect()
        };
        let stored = if fresh.is_empty() {
            Ok(Vec::new())
        } else {
            self.inner
                .load(move |s| {
                    fresh
                        .into_iter()
                        .map(|k| {
                            let row = s.credential(&k)?;
                            let rot = s.latest_rotation(&k)?.filter(|r| r.step != Step::Done);
                            Ok((k, row, rot))
                        })
                        .collect::<Result<Vec<_>, StateError>>()
                })
                .await
        };
        let stored = stored.unwrap_or_else(|e| {
            // The credentials then start as if new; say why.
            tracing::error!(error = %e.message, "reload: cannot read the state of added credentials");
            Vec::new()
        });
        let old = std::mem::replace(
            &mut *self
                .inner
                .catalog
                .write()
                .unwrap_or_else(|p| p.into_inner()),
            catalog.clone(),
        );
        let mut resume = HashSet::new();
        {
            let mut live = self.inner.live();
            for (key, row, rot) in stored {
                let l = live.entry(&key);
                // A rotation may have begun since the rows were read.
                if l.row.is_some() || l.running.is_some() {
                    continue;
                }
                l.row = row.map(Into::into);
                if let Some(rot) = rot {
                    self.inner.adopt_unfinished(&mut live, rot, &mut resume);
                }
            }
            self.inner.forget_departed(&mut live, &old, &catalog);
        }
        self.inner.schedule_all(&resume, false);
        self.inner.wake.notify_one();
    }

    /// Starts (or joins) a rotation of `key` now. Returns `None` if the
    /// credential is not in the config.
    pub fn trigger(&self, key: &CredentialKey) -> Option<oneshot::Receiver<RotateFinished>> {
        self.inner.clone().trigger(key)
    }

    /// The status of every configured credential, in a stable order.
    pub fn status(&self) -> Vec<CredStatus> {
        self.inner.status()
    }

    /// `(key, age, seconds until due)` for every credential, for the metrics scrape.
    pub fn credential_times(&self) -> Vec<(CredentialKey, Option<f64>, Option<f64>)> {
        let now = Utc::now();
        let live = self.inner.live();
        let catalog = self.inner.catalog();
        let mut out: Vec<_> = catalog
            .creds
            .keys()
            .map(|key| {
                let row = live.get(key).and_then(|l| l.row.as_ref());
                let age = row
                    .and_then(|r| r.last_rotated_at)
                    .map(|t| (now - t).num_milliseconds() as f64 / 1000.0);
                let due = live
                    .deadline(key, Job::Rotate)
                    .or_else(|| row.and_then(|r| r.next_due))
                    .map(|t| (t - now).num_milliseconds() as f64 / 1000.0);
                (key.clone(), age, due)
            })
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// Runs the scheduler until the engine is cancelled. `watchdog` is called
    /// at least every `watchdog_every` from this loop, so a stuck scheduler
    /// stops the pings and systemd restarts the daemon.
    pub async fn run_scheduler(
        &self,
        watchdog_every: Option<Duration>,
        mut watchdog: impl FnMut(),
    ) {
        let inner = &self.inner;
        let mut last_ping = Instant::now();
        if watchdog_every.is_some() {
            watchdog();
        }
        loop {
            let now = Utc::now();
            let free = inner.global.available_permits();
            let mut due = inner.live().pop_due_limit(now, free).into_iter();
            while let Some((key, job)) = due.next() {
                match inner.global.clone().try_acquire_owned() {
                    Ok(permit) => inner.clone().spawn_job(key, job, Some(permit)),
                    Err(_) => {
                        // A triggered task took a slot since `free` was read: this
                        // job and every other one popped go back in the
                        // queue (dropping them would lose their timers and
                        // leave their `rotate --wait` callers waiting).
                        let mut live = inner.live();
                        live.schedule(&key, job, now);
                        for (key, job) in due.by_ref() {
                            live.schedule(&key, job, now);
                        }
                    }
                }
            }
            let next = inner.live().next_deadline();
            let mut sleep = match next {
                Some(t) => (t - Utc::now()).to_std().unwrap_or(Duration::ZERO),
                None => Duration::from_secs(60),
            };
            // Wall clocks jump; never sleep long on one reading of it.
            sleep = sleep.min(Duration::from_secs(60));
            if let Some(every) = watchdog_every {
                sleep = sleep.min(every.saturating_sub(last_ping.elapsed()));
            }
            if inner.global.available_permits() == 0 && next.is_some_and(|t| t <= Utc::now()) {
                // Saturated: wait for a rotation to finish (it wakes us).
                sleep = sleep.max(Duration::from_millis(1));
            }
            tokio::select! {
                _ = tokio::time::sleep(sleep) => {}
                _ = inner.wake.notified() => {}
                _ = inner.cancel.cancelled() => break,
            }
            if let Some(every) = watchdog_every
                && last_ping.elapsed() >= every
            {
                watchdog();
                last_ping = Instant::now();
            }
        }
    }

    /// Counts of credentials by state, for the `credentials{state}` gauge.
    pub fn state_counts(&self) -> [(CredentialState, usize); 4] {
        let mut counts = [
            (CredentialState::Idle, 0),
            (CredentialState::Rotating, 0),
            (CredentialState::Retiring, 0),
            (CredentialState::Failed, 0),
        ];
        // Called on every metrics scrape: count from the live map directly
        // rather than building (and sorting) a status row per credential.
        let catalog = self.inner.catalog();
        let live = self.inner.live();
        for key in catalog.creds.keys() {
            let state = live.get(key).map_or(CredentialState::Idle, CredLive::state);
            if let Some(c) = counts.iter_mut().find(|(n, _)| *n == state) {
                c.1 += 1;
            }
        }
        counts
    }
}

impl Inner {
    fn catalog(&self) -> Arc<Catalog> {
        self.catalog
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn live(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Arms the timers of every credential in the catalog.
    fn schedule_all(&self, resume: &HashSet<CredentialKey>, at_start: bool) {
        let catalog = self.catalog();
        let now = now();
        let mut live = self.live();
        live.reserve_total(catalog.creds.len());
        let mut overdue: Vec<(DateTime<Utc>, CredentialKey)> = Vec::new();
        // In key order (the catalog's).
        for entry in catalog.creds.values() {
            let key = entry.key();
            let l = live.entry(key);
            let retire_at = l.retire_at;
            // The rotate timer: `Some(Some(at))` sets it, `Some(None)`
            // cancels it, `None` leaves it as it is.
            let rotate = if l.running.is_some() {
                None
            } else {
                let last = l.row.as_ref().and_then(|r| r.last_rotated_at);
                let has_version = l.row.as_ref().and_then(|r| r.current_version).is_some();
                if resume.contains(key) {
                    Some(Some(now))
                } else if !has_version || last.is_none() {
                    l.next_trigger = Some(Trigger::Initial);
                    Some(Some(now))
                } else if l.parked.is_some() && !at_start {
                    // Keep the retry time it already has.
                    None
                } else {
                    let last = last.expect("checked above");
                    match entry.cfg.schedule.next_due(last, entry.offset) {
                        Some(due) if due <= now && at_start => {
                            overdue.push((due, key.clone()));
                            None
                        }
                        Some(due) => {
                            l.next_trigger = Some(Trigger::Schedule);
                            Some(Some(due.max(now)))
                        }
                        None => Some(None),
                    }
                }
            };
            if let Some(at) = retire_at {
                live.schedule(key, Job::Retire, at);
            }
            match rotate {
                Some(Some(at)) => live.schedule(key, Job::Rotate, at),
                Some(None) => live.cancel(key, Job::Rotate),
                None => {}
            }
        }
        // Most overdue first, spread over the catch-up window.
        overdue.sort();
        let times = catch_up_times(now, overdue.len(), catalog.config.daemon.catch_up_spread);
        for ((_, key), at) in overdue.into_iter().zip(times) {
            if let Some(l) = live.get_mut(&key) {
                l.next_trigger = Some(Trigger::CatchUp);
            }
            live.schedule(&key, Job::Rotate, at);
        }
    }

    /// Takes an unfinished rotation of a configured credential from state:
    /// one waiting for its retire step gets its retire time, any other one
    /// resumes now.
    fn adopt_unfinished(
        &self,
        live: &mut Table,
        rot: RotationRow,
        resume: &mut HashSet<CredentialKey>,
    ) {
        let l = live.entry(&rot.key);
        if rot.step == Step::Retire {
            l.retire_at = Some(rot.retire_at.unwrap_or_else(now));
        } else {
            l.next_trigger = Some(rot.trigger);
            resume.insert(rot.key);
        }
    }

    /// Arms the pending retirement of a credential that is not configured,
    /// with an entry rebuilt from its rotation's footprint.
    fn adopt_departed(&self, live: &mut Table, catalog: &Catalog, rot: &RotationRow) {
        let key = &rot.key;
        let entry = rot
            .footprint
            .as_deref()
            .ok_or_else(|| "its rotation predates footprints".to_owned())
            .and_then(Footprint::parse)
            .and_then(|fp| CredEntry::departed(key, &fp, catalog));
        match entry {
            Ok(entry) => {
                let at = rot.retire_at.unwrap_or_else(now);
                tracing::info!(agent = %key.agent, credential = %key.credential, version = ?rot.previous_version, retire_at = %at, "not in the config any more: its previous version is still retired when its grace period ends");
                self.departed_entries().insert(key.clone(), Arc::new(entry));
                live.entry(key).retire_at = Some(at);
                live.schedule(key, Job::Retire, at);
            }
            Err(why) => {
                tracing::error!(agent = %key.agent, credential = %key.credential, version = ?rot.previous_version, rotation = %rot.id, "not in the config any more and its previous version cannot be retired ({why}); add the credential back to retire it, or retire version {:?} by hand", rot.previous_version);
            }
        }
    }

    /// After a reload: credentials that left the config keep only a pending
    /// retirement (retired with the entry they had), the rest of their live
    /// state goes; those that came back are retired with their new entry.
    fn forget_departed(&self, live: &mut Table, old: &Catalog, new: &Catalog) {
        let mut departed = self.departed_entries();
        departed.retain(|k, _| !new.creds.contains_key(k));
        live.retain(|k, l| {
            if new.creds.contains_key(k) || l.running.is_some() {
                // A rotation running for a removed credential finishes with
                // its entry, and hands its retirement over (run_rotation).
                return Keep::All;
            }
            if l.retire_at.is_none() {
                return Keep::Nothing;
            }
            if let Some(entry) = old.creds.get(k) {
                tracing::info!(agent = %k.agent, credential = %k.credential, retire_at = ?l.retire_at, "removed from the config: its previous version is still retired when its grace period ends");
                departed.insert(k.clone(), entry.clone());
            }
            if departed.contains_key(k) {
                Keep::Retire
            } else {
                Keep::Nothing
            }
        });
    }

    fn departed_entries(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<CredentialKey, Arc<CredEntry>>> {
        self.departed.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn trigger(self: Arc<Self>, key: &CredentialKey) -> Option<oneshot::Receiver<RotateFinished>> {
        let catalog = self.catalog();
        catalog.creds.get(key)?;
        let (tx, rx) = oneshot::channel();
        let start = {
            let mut live = self.live();
            let l = live.entry(key);
            l.waiters.get_or_insert_default().push(tx);
            if let Some(running) = &l.running {
                // Join the running rotation; a running retire starts one
                // when it ends.
                if running.job == Job::Retire {
                    l.rotate_after_retire = true;
                }
                false
            } else {
                if l.next_trigger != Some(Trigger::Initial) {
                    l.next_trigger = Some(Trigger::Manual);
                }
                true
            }
        };
        if start {
            self.live().cancel(key, Job::Rotate);
            // A task per trigger, waiting for a slot of the global limit.
            // (Queueing them as timers instead kept `rotate all` at 100k
            // credentials from parking 100k tasks — ~300 MB for the length
            // of the burst — but halved its rate in the 100k benchmark, for
            // reasons not yet understood; see BENCHMARKS.md.)
            self.spawn_job(key.clone(), Job::Rotate, None);
        }
        Some(rx)
    }

    /// Counts a finished job. When the engine has been idle for a second
    /// after a burst of at least [`TRIM_AFTER_JOBS`] jobs (or after any jobs,
    /// once a minute at most), the heap the burst used goes back to the OS:
    /// at 100k rotations that is tens of MB that would otherwise stay
    /// resident. The delay keeps a steady trickle of rotations from trimming
    /// after each one.
    fn after_job(self: &Arc<Self>) {
        self.finished_since_trim.fetch_add(1, Ordering::SeqCst);
        let idle = self.in_flight.fetch_sub(1, Ordering::SeqCst) == 1;
        if !idle || self.trim_pending.swap(true, Ordering::SeqCst) {
            return;
        }
        let inner = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(1)).await;
            inner.trim_pending.store(false, Ordering::SeqCst);
            if inner.in_flight.load(Ordering::SeqCst) != 0 {
                return; // a new burst; its end arms this again
            }
            let done = inner.finished_since_trim.load(Ordering::SeqCst);
            let mut last = inner.last_trim.lock().unwrap_or_else(|p| p.into_inner());
            if done >= TRIM_AFTER_JOBS || (done > 0 && last.elapsed() >= TRIM_AT_MOST_EVERY) {
                inner.finished_since_trim.store(0, Ordering::SeqCst);
                *last = Instant::now();
                drop(last);
                tokio::task::spawn_blocking(crate::memory::release_freed_memory);
            }
        });
    }

    /// Marks the credential busy and runs the job in a tracked task.
    fn spawn_job(
        self: Arc<Self>,
        key: CredentialKey,
        job: Job,
        permit: Option<tokio::sync::OwnedSemaphorePermit>,
    ) {
        let catalog = self.catalog();
        let entry = match catalog.creds.get(&key) {
            Some(e) => e.clone(),
            // Not configured: only a pending retirement may still run.
            None if job == Job::Retire => match self.departed_entries().get(&key) {
                Some(e) => e.clone(),
                None => return,
            },
            None => return,
        };
        {
            let mut live = self.live();
            let l = live.entry(&key);
            if let Some(running) = &l.running {
                // A rotation that is already running reschedules itself when
                // it ends and retires the previous version first; a retire
                // in progress hands over to the rotation when it ends.
                if job == Job::Rotate && running.job == Job::Retire {
                    l.rotate_after_retire = true;
                }
                return;
            }
            l.running = Some(Box::new(Running {
                job,
                rotation: None,
                step: if job == Job::Retire {
                    Step::Retire
                } else {
                    Step::Create
                },
                attempts: 0,
                last_error: None,
            }));
        }
        let tracker = self.tracker.clone();
        tracker.spawn(async move {
            let permit = match permit {
                Some(p) => p,
                None => match self.global.clone().acquire_owned().await {
                    Ok(p) => p,
                    Err(_) => return,
                },
            };
            self.in_flight.fetch_add(1, Ordering::SeqCst);
            match job {
                Job::Rotate => self.clone().run_rotation(entry).await,
                Job::Retire => self.clone().run_retire(entry).await,
            }
            drop(permit);
            self.wake.notify_one();
            self.after_job();
        });
    }

    fn status(&self) -> Vec<CredStatus> {
        let catalog = self.catalog();
        let live = self.live();
        // In key order (the catalog's).
        catalog
            .creds
            .values()
            .map(|entry| {
                let key = entry.key();
                let l = live.get(key);
                let row = l.and_then(|l| l.row.as_ref());
                let running = l.and_then(|l| l.running.as_ref());
                let state = l.map_or(CredentialState::Idle, CredLive::state).as_str();
                let version = row.and_then(|r| r.current_version);
                CredStatus {
                    key: key.clone(),
                    vault: entry.vault_label(),
                    version,
                    stage: version.map(|_| Stage::Current),
                    last_rotated: row.and_then(|r| r.last_rotated_at),
                    next_due: live
                        .deadline(key, Job::Rotate)
                        .or_else(|| row.and_then(|r| r.next_due)),
                    state,
                    // A parked rotation shows where it stopped.
                    step: running
                        .map(|r| r.step)
                        .or_else(|| l.and_then(|l| l.parked.as_ref()?.step)),
                    rotation: running
                        .and_then(|r| r.rotation.clone())
                        .or_else(|| l.and_then(|l| l.parked.as_ref()?.rotation.clone())),
                    last_error: running
                        .and_then(|r| r.last_error.clone())
                        .or_else(|| row.and_then(|r| r.last_error.as_deref().map(String::from))),
                }
            })
            .collect()
    }

    fn cred_row(&self, key: &CredentialKey) -> CredentialRow {
        self.live()
            .get(key)
            .and_then(|l| l.row.as_ref())
            .map_or_else(|| LiveRow::default().to_row(key), |r| r.to_row(key))
    }

    fn set_running(&self, key: &CredentialKey, rot: &RotationRow) {
        if let Some(r) = self.live().get_mut(key).and_then(|l| l.running.as_mut()) {
            r.rotation = Some(rot.id.clone());
            r.step = rot.step;
            r.attempts = rot.attempts;
            r.last_error = rot.last_error.clone();
        }
    }

    async fn persist(&self, writes: Vec<Write>) -> Result<(), PluginError> {
        self.writer
            .apply(writes)
            .await
            .map_err(|e| PluginError::new(ErrorKind::Transient, e.to_string()))
    }

    async fn load<T: Send + 'static>(
        &self,
        f: impl FnOnce(&dyn StateStore) -> Result<T, StateError> + Send + 'static,
    ) -> Result<T, PluginError> {
        self.writer
            .read(f)
            .await
            .map_err(|e| PluginError::new(ErrorKind::Transient, e.to_string()))
    }

    /// Appends an audit record for `entry` (and `rot` if given); returns the
    /// write that records the new head in state.
    async fn audit(
        &self,
        entry: &CredEntry,
        rot: Option<&RotationRow>,
        event: &str,
        outcome: Outcome,
        detail: Option<String>,
        error: Option<String>,
    ) -> Result<Write, PluginError> {
        let mut ev = AuditEvent::new(event, Actor::Daemon, outcome);
        ev.agent = Some(entry.key().agent.clone());
        ev.credential = Some(entry.key().credential.clone());
        ev.tenant = Some(entry.agent.tenant.clone());
        ev.owner = Some(entry.agent.owner.clone());
        ev.rotation = rot.map(|r| r.id.clone());
        ev.version = rot.map(|r| r.version);
        ev.detail = detail;
        ev.error = error;
        let head = self
            .audit
            .append(ev)
            .await
            .map_err(|e| PluginError::new(ErrorKind::Transient, e.to_string()))?;
        self.metrics.audit_records(1);
        Ok(Write::AuditHead(head))
    }

    async fn run_rotation(self: Arc<Self>, entry: Arc<CredEntry>) {
        let key = entry.key().clone();
        let started = Instant::now();
        let _vault_permits = vault_permits(&entry).await;
        let result = self.rotate(&entry).await;
        let now = now();
        let reschedule = {
            let mut live = self.live();
            let l = live.entry(&key);
            let last_run = l.running.take();
            let waiters = l.waiters.take().map(|w| *w).unwrap_or_default();
            let (finished, reschedule) = match result {
                Ok(rot) => {
                    l.parked = None;
                    l.retire_at = rot.retire_at;
                    let row = l.row.clone();
                    let next = row.as_ref().and_then(|r| r.next_due);
                    l.next_trigger = Some(Trigger::Schedule);
                    self.metrics.rotation_finished(true, started.elapsed());
                    tracing::info!(agent = %key.agent, credential = %key.credential, version = rot.version, rotation = %rot.id, "rotated");
                    (
                        RotateFinished {
                            key: key.clone(),
                            rotation: Some(rot.id),
                            version: Some(rot.version),
                            error: None,
                        },
                        vec![(Job::Rotate, next), (Job::Retire, rot.retire_at)],
                    )
                }
                Err(Stop::Failed(msg, retry_after)) => {
                    l.parked = Some(Box::new(Parked {
                        rotation: last_run.as_ref().and_then(|r| r.rotation.clone()),
                        step: last_run.as_ref().map(|r| r.step),
                    }));
                    let failures = l.row.as_ref().map_or(1, |r| r.consecutive_failures.max(1));
                    let delay = not_before(
                        park_delay(&entry_retry(&self.catalog()), failures),
                        retry_after,
                    );
                    self.metrics.rotation_finished(false, started.elapsed());
                    tracing::warn!(agent = %key.agent, credential = %key.credential, error = %msg, retry_in = %humantime::format_duration(delay), "rotation failed; parked");
                    (
                        RotateFinished {
                            key: key.clone(),
                            rotation: None,
                            version: None,
                            error: Some(msg),
                        },
                        vec![(Job::Rotate, Some(now + chrono_dur(delay)))],
                    )
                }
                Err(Stop::Drained) => (
                    RotateFinished {
                        key: key.clone(),
                        rotation: None,
                        version: None,
                        error: Some(
                            "the daemon is stopping; the rotation resumes at its next start".into(),
                        ),
                    },
                    vec![],
                ),
            };
            for w in waiters {
                let _ = w.send(finished.clone());
            }
            reschedule
        };
        let configured = self.catalog().creds.contains_key(&key);
        if !configured && self.live().get(&key).is_some_and(|l| l.retire_at.is_some()) {
            // Removed by a reload while it ran: the retirement it set up
            // still happens, with this entry.
            self.departed_entries().insert(key.clone(), entry.clone());
        }
        let mut live = self.live();
        for (job, at) in reschedule {
            if let Some(at) = at
                && (configured || job == Job::Retire)
            {
                live.schedule(&key, job, at);
            }
        }
    }

    async fn run_retire(self: Arc<Self>, entry: Arc<CredEntry>) {
        let key = entry.key().clone();
        let _vault_permits = vault_permits(&entry).await;
        let k = key.clone();
        let result = match self.load(move |s| s.latest_rotation(&k)).await {
            Ok(Some(mut rot)) if rot.step == Step::Retire => self.run_step(&entry, &mut rot).await,
            Ok(_) => Ok(()),
            Err(e) => Err(Stop::Failed(e.to_string(), None)),
        };
        let rotate_next = {
            let mut live = self.live();
            let l = live.entry(&key);
            l.running = None;
            let mut retry_at = None;
            match result {
                Ok(()) => {
                    l.retire_at = None;
                    if let Some(row) = l.row.as_mut() {
                        row.last_error = None;
                        row.consecutive_failures = 0;
                    }
                    if !self.catalog().creds.contains_key(&key) {
                        self.departed_entries().remove(&key);
                    }
                }
                Err(Stop::Failed(msg, retry_after)) => {
                    // The row shows the error (the step's failure path set
                    // it) until a retry succeeds.
                    let delay = not_before(entry_retry(&self.catalog()).max_delay, retry_after);
                    tracing::warn!(agent = %key.agent, credential = %key.credential, error = %msg, "retiring the previous version failed; will retry");
                    retry_at = Some(now() + chrono_dur(delay));
                }
                Err(Stop::Drained) => {}
            }
            let rotate_next =
                std::mem::take(&mut l.rotate_after_retire) && !self.cancel.is_cancelled();
            if let Some(at) = retry_at {
                live.schedule(&key, Job::Retire, at);
            }
            rotate_next
        };
        if rotate_next {
            self.spawn_job(key, Job::Rotate, None);
        }
    }

    /// Runs (or resumes) one rotation up to and including delivery.
    async fn rotate(&self, entry: &CredEntry) -> Result<RotationRow, Stop> {
        let key = entry.key().clone();
        let k = key.clone();
        let latest = self
            .load(move |s| s.latest_rotation(&k))
            .await
            .map_err(|e| Stop::Failed(format!("{key}: {e}"), None))?;
        let mut rot = match latest {
            Some(r) if r.step < Step::Retire => {
                tracing::info!(agent = %key.agent, credential = %key.credential, rotation = %r.id, step = %r.step, "resuming rotation");
                r
            }
            mut latest => {
                if let Some(prev) = latest.as_mut().filter(|r| r.step == Step::Retire) {
                    // A new version is coming: the one before the current
                    // must go now rather than at the end of its grace.
                    self.run_step(entry, prev).await?;
                    if let Some(l) = self.live().get_mut(&key) {
                        l.retire_at = None;
                    }
                    self.live().cancel(&key, Job::Retire);
                }
                self.begin(entry, latest.as_ref()).await?
            }
        };
        self.set_running(&key, &rot);
        while rot.step < Step::Retire {
            if self.cancel.is_cancelled() {
                return Err(Stop::Drained);
            }
            self.run_step(entry, &mut rot).await?;
        }
        Ok(rot)
    }

    /// Records the start of a new rotation.
    /// `latest` is the credential's newest (finished) rotation, if any: it
    /// created the current version, so it knows its number and vault id.
    async fn begin(
        &self,
        entry: &CredEntry,
        latest: Option<&RotationRow>,
    ) -> Result<RotationRow, Stop> {
        let key = entry.key();
        let cred = self.cred_row(key);
        let trigger = self
            .live()
            .get(key)
            .and_then(|l| l.next_trigger)
            .unwrap_or(Trigger::Schedule);
        let newest = latest.map_or(0, |r| r.version);
        let previous_vault_version = match latest {
            Some(r) if Some(r.version) == cred.current_version => r.vault_version.clone(),
            // No rotation history for the current version (rows forgotten,
            // state restored): look the version up.
            _ => match cred.current_version {
                None => None,
                Some(cv) => {
                    let k = key.clone();
                    self.load(move |s| s.versions(&k))
                        .await
                        .map_err(|e| Stop::Failed(format!("{key}: {e}"), None))?
                        .into_iter()
                        .find(|v| v.version == cv)
                        .map(|v| v.vault_version)
                }
            },
        };
        let t = now();
        let rot = RotationRow {
            id: RotationId::generate(),
            key: key.clone(),
            step: Step::Create,
            trigger,
            version: newest.max(cred.current_version.unwrap_or(0)) + 1,
            vault_version: None,
            previous_version: cred.current_version,
            previous_vault_version,
            started_at: t,
            updated_at: t,
            retire_at: None,
            attempts: 0,
            last_error: None,
            footprint: Some(Footprint::of(entry).to_json()),
        };
        let head = self
            .audit(
                entry,
                Some(&rot),
                "rotation.start",
                Outcome::Ok,
                Some(format!("trigger={}", trigger.as_str())),
                None,
            )
            .await
            .map_err(|e| Stop::Failed(format!("{key}: audit: {}", e.message), None))?;
        self.persist(vec![Write::Rotation(rot.clone()), head])
            .await
            .map_err(|e| Stop::Failed(format!("{key}: {}", e.message), None))?;
        crash_point("rotation.after_start");
        Ok(rot)
    }

    /// Runs `rot.step` with retries; on success the step's effects, the
    /// audit record and the advanced rotation row are all durable.
    async fn run_step(&self, entry: &CredEntry, rot: &mut RotationRow) -> Result<(), Stop> {
        let mut delays = step_backoff(entry_retry(&self.catalog()));
        let step = rot.step;
        loop {
            crash_point(before(step));
            let attempt = self.attempt_step(entry, rot).await;
            let error = match attempt {
                Ok(mut writes) => {
                    crash_point(after(step));
                    let mut next = rot.clone();
                    next.step = next_step(step, entry);
                    next.attempts = 0;
                    next.last_error = None;
                    next.updated_at = now();
                    if step == Step::Deliver {
                        next.retire_at = Some(next.updated_at + chrono_dur(entry.cfg.grace));
                    }
                    let persisted = async {
                        let head = self
                            .audit(
                                entry,
                                Some(&next),
                                &format!("rotation.{step}"),
                                Outcome::Ok,
                                None,
                                None,
                            )
                            .await?;
                        writes.push(Write::Rotation(next.clone()));
                        writes.push(head);
                        self.persist(writes).await
                    }
                    .await;
                    match persisted {
                        Ok(()) => {
                            *rot = next;
                            self.apply_effects_in_memory(entry, rot);
                            self.set_running(entry.key(), rot);
                            return Ok(());
                        }
                        Err(e) => StepError::new("recording the step", e),
                    }
                }
                Err(e) => e,
            };
            // One failure path for every step and plug-in.
            let msg = error.message();
            self.metrics.step_failed(step.as_str());
            rot.attempts += 1;
            rot.last_error = Some(format!("step {step}: {msg}"));
            rot.updated_at = now();
            tracing::warn!(agent = %entry.key().agent, credential = %entry.key().credential, rotation = %rot.id, step = %step, attempt = rot.attempts, kind = %error.error.kind, error = %msg, "step failed");
            let mut cred = self.cred_row(entry.key());
            cred.last_error = rot.last_error.clone();
            let retryable = error.error.kind.is_retryable();
            let delay = if retryable {
                delays.next().map(|d| honour_retry_after(d, &error.error))
            } else {
                None
            };
            if delay.is_none() {
                cred.consecutive_failures += 1;
            }
            self.set_running(entry.key(), rot);
            let recorded = async {
                let head = self
                    .audit(
                        entry,
                        Some(rot),
                        &format!("rotation.{step}"),
                        Outcome::Failed,
                        None,
                        Some(msg.clone()),
                    )
                    .await?;
                self.persist(vec![
                    Write::Rotation(rot.clone()),
                    Write::Credential(cred.clone()),
                    head,
                ])
                .await
            }
            .await;
            if let Err(e) = recorded {
                tracing::error!(agent = %entry.key().agent, credential = %entry.key().credential, error = %e, "could not record a step failure");
            }
            if let Some(l) = self.live().get_mut(entry.key()) {
                l.row = Some(cred.into());
            }
            let Some(delay) = delay else {
                return Err(Stop::Failed(
                    format!("{}: step {step}: {msg}", entry.key()),
                    error.error.retry_after,
                ));
            };
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = self.cancel.cancelled() => return Err(Stop::Drained),
            }
        }
    }

    /// Keeps the in-memory credential row in step with what was persisted.
    fn apply_effects_in_memory(&self, entry: &CredEntry, rot: &RotationRow) {
        if rot.step == Step::Retire
            && let Some(l) = self.live().get_mut(entry.key())
        {
            l.row = Some(delivered_row(entry, rot).into());
        }
    }

    /// One attempt of one step. Returns the state writes that record its effect.
    async fn attempt_step(
        &self,
        entry: &CredEntry,
        rot: &mut RotationRow,
    ) -> Result<Vec<Write>, StepError> {
        let key = entry.key();
        let item = VaultItem {
            key,
            path: &entry.cfg.vault_path(),
        };
        match rot.step {
            Step::Create => {
                let generated = generators::generate(&entry.cfg.generate).map_err(|e| {
                    StepError::new(
                        "generator",
                        PluginError::new(ErrorKind::Invalid, e.to_string()),
                    )
                })?;
                let primary = &entry.primary().vault;
                let vref = primary
                    .stage(item, &rot.id, &generated.value)
                    .await
                    .map_err(|e| vault_error(primary.name(), e))?;
                drop(generated);
                crash_point("rotation.create.after_primary_stage");
                // Read back what the vault holds: after a replay it is the
                // value staged the first time, not the one generated now.
                // The other vaults get that value, so a replay that finds
                // some of them already staged cannot make them disagree.
                let stored = read_from(primary.as_ref(), item, &vref).await?;
                let mut refs = VaultRefs(vec![(primary.name().to_owned(), vref)]);
                for other in &entry.vaults[1..] {
                    let v = &other.vault;
                    let r = v
                        .stage(item, &rot.id, &stored)
                        .await
                        .map_err(|e| vault_error(v.name(), e))?;
                    refs.0.push((v.name().to_owned(), r));
                }
                let public =
                    generators::public_part(generators::kind_of(&entry.cfg.generate), &stored);
                let encoded = refs.encode();
                rot.vault_version = Some(encoded.clone());
                Ok(vec![Write::Version(VersionRow {
                    key: key.clone(),
                    version: rot.version,
                    rotation: rot.id.clone(),
                    stage: Stage::Pending,
                    vault_version: encoded,
                    created_at: now(),
                    public,
                })])
            }
            Step::Set | Step::Test => {
                // Without a target these steps are skipped (`next_step`);
                // one reached anyway (a rotation resumed after the target
                // was removed from the config) has nothing to do.
                let Some(target) = &entry.target else {
                    return Ok(vec![]);
                };
                let value = self.read_staged(entry, rot).await?;
                let r = if rot.step == Step::Set {
                    target.set(key, rot.version, &value).await
                } else {
                    target.test(key, rot.version, &value).await
                };
                r.map_err(|e| target_error(target.as_ref(), e))?;
                Ok(vec![])
            }
            Step::Promote => {
                self.check_current_before_promote(entry, rot).await?;
                // Every vault already holds the value (create staged it in
                // all); promote each. Promote is idempotent, so after a
                // failure in one vault the retry re-promotes the others as
                // no-ops and the vaults converge on the same current version.
                for (i, h) in entry.vaults.iter().enumerate() {
                    if i == 1 {
                        crash_point("rotation.promote.after_first_vault");
                    }
                    let vref = staged_in(entry, rot, h)?;
                    h.vault
                        .promote(item, &vref)
                        .await
                        .map_err(|e| vault_error(h.vault.name(), e))?;
                }
                let mut writes = vec![Write::VersionStage {
                    key: key.clone(),
                    version: rot.version,
                    stage: Stage::Current,
                }];
                let mut keep = vec![rot.version];
                if let Some(prev) = rot.previous_version {
                    writes.push(Write::VersionStage {
                        key: key.clone(),
                        version: prev,
                        stage: Stage::Previous,
                    });
                    keep.push(prev);
                }
                // Anything older still marked current or previous was
                // retired in the vault by this promote.
                writes.push(Write::RetireOthers {
                    key: key.clone(),
                    except: keep,
                    from: vec![Stage::Current, Stage::Previous],
                    to: Stage::Retired,
                });
                Ok(writes)
            }
            Step::Deliver => {
                let value = self.read_staged(entry, rot).await?;
                let kind = generators::kind_of(&entry.cfg.generate);
                let public = generators::public_part(kind, &value);
                let row = delivered_row(entry, rot);
                let notice = Notice {
                    key: key.clone(),
                    tenant: entry.agent.tenant.clone(),
                    owner: entry.agent.owner.clone(),
                    version: rot.version,
                    rotation: rot.id.clone(),
                    rotated_at: now(),
                    expires_hint: row.next_due.map(|d| d + chrono_dur(entry.cfg.grace)),
                    kind,
                    public,
                    login: entry.target.as_ref().and_then(|t| t.login_for(rot.version)),
                };
                for sink in &entry.sinks {
                    let result = sink.deliver(&notice, &value).await;
                    self.metrics.delivery("file", result.is_ok());
                    let (outcome, error) = match &result {
                        Ok(_) => (Outcome::Ok, None),
                        Err(e) => (Outcome::Failed, Some(e.to_string())),
                    };
                    // The audit head is persisted later, with the step (or
                    // with the failure record of a failed attempt).
                    self.audit(
                        entry,
                        Some(rot),
                        "delivery",
                        outcome,
                        Some(sink.describe()),
                        error,
                    )
                    .await
                    .map_err(|e| StepError::new("audit", e))?;
                    result.map_err(|e| StepError::new(format!("sink {}", sink.describe()), e))?;
                }
                Ok(vec![Write::Credential(row)])
            }
            Step::Retire => self.retire_previous(entry, rot).await,
            Step::Done => Ok(vec![]),
        }
    }

    /// The retire step: the grace period of the previous version is over
    /// (or a newer rotation is starting), so it goes from every vault that
    /// holds it and stops working at the target.
    async fn retire_previous(
        &self,
        entry: &CredEntry,
        rot: &RotationRow,
    ) -> Result<Vec<Write>, StepError> {
        let mut writes = vec![Write::PruneHistory(entry.key().clone())];
        let Some(prev) = &rot.previous_vault_version else {
            return Ok(writes);
        };
        let item = VaultItem {
            key: entry.key(),
            path: &entry.cfg.vault_path(),
        };
        let refs = VaultRefs::decode(prev, entry.primary().vault.name());
        for h in entry.vaults.iter() {
            // A vault added to the credential since the previous version
            // was made does not hold it.
            let Some(vref) = refs.get(h.vault.name()) else {
                continue;
            };
            h.vault
                .retire(item, vref)
                .await
                .map_err(|e| vault_error(h.vault.name(), e))?;
        }
        if let Some(previous) = rot.previous_version {
            // The target stops accepting the previous value too (alternating
            // users: its role's password is cleared).
            if let Some(target) = &entry.target {
                target
                    .retire(entry.key(), previous)
                    .await
                    .map_err(|e| target_error(target.as_ref(), e))?;
            }
            writes.push(Write::VersionStage {
                key: entry.key().clone(),
                version: previous,
                stage: Stage::Retired,
            });
        }
        // Failed attempts of this step were shown on the credential's row;
        // that is over now.
        let row = self.cred_row(entry.key());
        if row.last_error.is_some() || row.consecutive_failures > 0 {
            writes.push(Write::Credential(CredentialRow {
                last_error: None,
                consecutive_failures: 0,
                ..row
            }));
        }
        Ok(writes)
    }

    /// The value this rotation staged, read from the primary vault.
    async fn read_staged(
        &self,
        entry: &CredEntry,
        rot: &RotationRow,
    ) -> Result<SecretValue, StepError> {
        let item = VaultItem {
            key: entry.key(),
            path: &entry.cfg.vault_path(),
        };
        let primary = entry.primary();
        let vref = staged_in(entry, rot, primary)?;
        read_from(primary.vault.as_ref(), item, &vref).await
    }

    /// Before promote: is the version keyturn knows as current still current
    /// in every vault? If someone deleted or overwrote it out of band, the
    /// promote goes ahead (it makes the vault serve a working value again,
    /// which is better than leaving it broken until an operator acts), but
    /// that vault no longer holds the previous value agents may still use
    /// during the grace period. Nothing else would notice, so it is said
    /// loudly: a warning and an audit record per vault. Costs one read per
    /// vault per rotation.
    async fn check_current_before_promote(
        &self,
        entry: &CredEntry,
        rot: &RotationRow,
    ) -> Result<(), StepError> {
        let (Some(prev), Some(prev_version)) = (&rot.previous_vault_version, rot.previous_version)
        else {
            return Ok(());
        };
        let item = VaultItem {
            key: entry.key(),
            path: &entry.cfg.vault_path(),
        };
        let refs = VaultRefs::decode(prev, entry.primary().vault.name());
        for h in &entry.vaults {
            let Some(prev_ref) = refs.get(h.vault.name()) else {
                continue;
            };
            let new_ref = staged_in(entry, rot, h)?;
            let current = h
                .vault
                .read(item, Select::Stage(Stage::Current))
                .await
                .map_err(|e| vault_error(h.vault.name(), e))?
                .map(|v| v.version);
            // The new ref: a replay after this vault was already promoted.
            if current.as_ref() == Some(prev_ref) || current.as_ref() == Some(&new_ref) {
                continue;
            }
            let now_there = match &current {
                Some(r) => format!("its current version is {r}, which keyturn did not write"),
                None => "it has no current version".to_owned(),
            };
            let msg = format!(
                "step promote: vault {:?}: version {prev_version} ({prev_ref}) of {}, the current version before this rotation, is gone: {now_there} (deleted or overwritten out of band). Promoting version {} makes it current again, but this vault no longer holds the previous value",
                h.vault.name(),
                entry.cfg.vault_path(),
                rot.version,
            );
            tracing::warn!(agent = %entry.key().agent, credential = %entry.key().credential, vault = %h.vault.name(), version = prev_version, rotation = %rot.id, "{msg}");
            // The head is persisted with the step, like delivery records.
            self.audit(
                entry,
                Some(rot),
                "vault.current_gone",
                Outcome::Failed,
                Some(h.vault.name().to_owned()),
                Some(msg),
            )
            .await
            .map_err(|e| StepError::new("audit", e))?;
        }
        Ok(())
    }
}

/// The credential row after `rot` is delivered.
fn delivered_row(entry: &CredEntry, rot: &RotationRow) -> CredentialRow {
    let at = rot.updated_at;
    CredentialRow {
        key: entry.key().clone(),
        current_version: Some(rot.version),
        last_rotated_at: Some(at),
        next_due: entry.cfg.schedule.next_due(at, entry.offset),
        consecutive_failures: 0,
        last_error: None,
    }
}

/// The version `rot` staged in vault `h`.
fn staged_in(
    entry: &CredEntry,
    rot: &RotationRow,
    h: &VaultHandle,
) -> Result<VersionRef, StepError> {
    let missing = |what: String| StepError::new("state", PluginError::new(ErrorKind::Fatal, what));
    let text = rot.vault_version.as_deref().ok_or_else(|| {
        missing(format!(
            "rotation {} reached {} without a staged version",
            rot.id, rot.step
        ))
    })?;
    VaultRefs::decode(text, entry.primary().vault.name())
        .get(h.vault.name())
        .cloned()
        .ok_or_else(|| {
            missing(format!(
                "rotation {} has no version in vault {:?} (the credential's vault list changed while it ran); trigger a new rotation",
                rot.id,
                h.vault.name()
            ))
        })
}

/// Targets start their messages with their own description
/// (`command:/path`, `postgres:role`); say it once, not twice.
fn target_error(target: &dyn Target, mut e: PluginError) -> StepError {
    let described = target.describe();
    if let Some(rest) = e.message.strip_prefix(&format!("{described}: ")) {
        e.message = rest.to_owned();
    }
    StepError::new(format!("target {described}"), e)
}

fn vault_error(name: &str, e: PluginError) -> StepError {
    StepError::new(format!("vault {name:?}"), e)
}

/// Reads one version back; a version that is gone is an error.
async fn read_from(
    vault: &dyn Vault,
    item: VaultItem<'_>,
    vref: &VersionRef,
) -> Result<SecretValue, StepError> {
    match vault.read(item, Select::Version(vref)).await {
        Ok(Some(v)) => Ok(v.value),
        Ok(None) => Err(vault_error(
            vault.name(),
            PluginError::new(
                ErrorKind::NotFound,
                format!(
                    "version {vref} of {} is gone from the vault (deleted out of band?); the rotation cannot go on without the value it staged",
                    item.path
                ),
            ),
        )),
        Err(e) => Err(vault_error(vault.name(), e)),
    }
}

/// One permit of each of the credential's vaults, taken in name order so that
/// two credentials sharing vaults cannot each hold one and wait for the other.
async fn vault_permits(entry: &CredEntry) -> Vec<tokio::sync::OwnedSemaphorePermit> {
    let mut handles: Vec<&Arc<VaultHandle>> = entry.vaults.iter().collect();
    handles.sort_by(|a, b| a.config.name.cmp(&b.config.name));
    let mut permits = Vec::with_capacity(handles.len());
    for h in handles {
        if let Ok(p) = h.limit.clone().acquire_owned().await {
            permits.push(p);
        }
    }
    permits
}

/// The step after `step` for this credential: `set` and `test` are skipped
/// without a target (each step costs an audit record and a state commit,
/// both fsynced).
fn next_step(step: Step, entry: &CredEntry) -> Step {
    let mut next = step.next();
    while matches!(next, Step::Set | Step::Test) && entry.target.is_none() {
        next = next.next();
    }
    next
}

/// The server's `Retry-After` wins over a shorter back-off delay. Capped so
/// a hostile or broken header cannot park a step for days.
fn honour_retry_after(backoff: Duration, e: &PluginError) -> Duration {
    not_before(backoff, e.retry_after)
}

/// `delay`, lengthened to a server's `Retry-After` (capped at 5 min).
fn not_before(delay: Duration, retry_after: Option<Duration>) -> Duration {
    const MAX_RETRY_AFTER: Duration = Duration::from_secs(300);
    match retry_after {
        Some(after) => delay.max(after.min(MAX_RETRY_AFTER)),
        None => delay,
    }
}

/// The delays between attempts of one step: capped exponential with jitter,
/// `max_attempts - 1` of them.
fn step_backoff(retry: RetryConfig) -> impl Iterator<Item = Duration> {
    ExponentialBuilder::default()
        .with_min_delay(retry.initial_delay)
        .with_max_delay(retry.max_delay)
        .with_max_times(retry.max_attempts.saturating_sub(1) as usize)
        .with_jitter()
        .build()
}

fn entry_retry(catalog: &Catalog) -> RetryConfig {
    catalog.config.daemon.retry
}

/// How long a parked rotation waits: the retry ceiling doubled per
/// consecutive failure, capped at an hour.
fn park_delay(retry: &RetryConfig, failures: u32) -> Duration {
    let factor = 1u32 << failures.saturating_sub(1).min(10);
    (retry.max_delay * factor).min(MAX_PARK_DELAY)
}

fn before(step: Step) -> &'static str {
    match step {
        Step::Create => "rotation.before_create",
        Step::Set => "rotation.before_set",
        Step::Test => "rotation.before_test",
        Step::Promote => "rotation.before_promote",
        Step::Deliver => "rotation.before_deliver",
        Step::Retire | Step::Done => "rotation.before_retire",
    }
}

fn after(step: Step) -> &'static str {
    match step {
        Step::Create => "rotation.after_create",
        Step::Set => "rotation.after_set",
        Step::Test => "rotation.after_test",
        Step::Promote => "rotation.after_promote",
        Step::Deliver => "rotation.after_deliver",
        Step::Retire | Step::Done => "rotation.after_retire",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn park_delay_doubles_and_caps() {
        let r = RetryConfig {
            initial_delay: Duration::from_secs(1),
            max_delay: Duration::from_secs(60),
            max_attempts: 3,
        };
        assert_eq!(park_delay(&r, 1), Duration::from_secs(60));
        assert_eq!(park_delay(&r, 2), Duration::from_secs(120));
        assert_eq!(park_delay(&r, 30), MAX_PARK_DELAY);
    }
}

#[cfg(test)]
mod retry_after_tests {
    use super::*;

    #[test]
    fn a_servers_retry_after_lengthens_a_shorter_backoff_but_is_capped() {
        let throttled = |after: Option<u64>| {
            PluginError::new(ErrorKind::Throttled, "429")
                .with_retry_after(after.map(Duration::from_secs))
        };
        let backoff = Duration::from_millis(500);
        assert_eq!(honour_retry_after(backoff, &throttled(None)), backoff);
        assert_eq!(
            honour_retry_after(backoff, &throttled(Some(7))),
            Duration::from_secs(7)
        );
        assert_eq!(
            honour_retry_after(Duration::from_secs(30), &throttled(Some(7))),
            Duration::from_secs(30),
            "a longer back-off is kept"
        );
        assert_eq!(
            honour_retry_after(backoff, &throttled(Some(86_400))),
            Duration::from_secs(300),
            "capped"
        );
    }
}
