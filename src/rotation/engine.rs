//! The engine: runs rotations step by step, persisting and auditing each one,
//! and keeps the in-memory view that `status` and the scheduler read.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, AtomicUsize};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::{Notify, Semaphore, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::catalog::{Catalog, CredEntry};
use super::clock::{Clock, SystemClock};
use super::step::{Step, Trigger};
use super::table::{CredLive, Job, LiveRow, RotateFinished, Table};
use crate::api::StatusRow;
use crate::api::protocol::ShownStage;
use crate::audit::{Actor, AuditEvent, AuditLog, Outcome};
use crate::model::{CredentialKey, ErrorKind, PluginError, RotationId, VersionNo};
use crate::state::{
    AuditHead, CredentialRow, RotationRow, StateError, StateStore, StateWriter, Write,
};
use crate::telemetry::{CredentialState, Metrics};

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    State(#[from] StateError),
    #[error("cannot start the state writer thread: {0}")]
    Thread(#[from] std::io::Error),
}

/// A cheap handle; clones share one engine.
#[derive(Clone)]
pub struct Engine {
    pub(super) inner: Arc<Inner>,
}

pub(super) struct Inner {
    /// The engine itself, for the tasks it spawns from `&self` (ack
    /// watches, background delivery retries).
    pub(super) me: std::sync::Weak<Inner>,
    /// The consumers awaited for the last delivered version of each
    /// credential (see `acks.rs`).
    pub(super) acks: Mutex<HashMap<CredentialKey, super::acks::Awaited>>,
    /// The version of each credential whose delivery is under way: from
    /// its first sink until the consumers it awaits are persisted, across
    /// the retries of a delivery that failed (see `acks.rs`).
    pub(super) delivering: Mutex<HashMap<CredentialKey, VersionNo>>,
    /// Notified on every acknowledgement, and when a delivery's awaited
    /// consumers are persisted.
    pub(super) ack_changed: Notify,
    /// Held while an acknowledgement is audited and persisted: it counts
    /// in memory only once it is, and a concurrent ack of the same
    /// consumer waits for that instead of being told it already counts.
    pub(super) recording_ack: tokio::sync::Mutex<()>,
    pub(super) clock: Arc<dyn Clock>,
    pub(super) catalog: RwLock<Arc<Catalog>>,
    pub(super) state: Arc<dyn StateStore>,
    /// Every read and write of a rotation goes through this one thread,
    /// which group-commits the writes of concurrent rotations.
    pub(super) writer: StateWriter,
    pub(super) audit: AuditLog,
    pub(super) metrics: Arc<Metrics>,
    pub(super) global: Arc<Semaphore>,
    /// Live status and timers of every credential.
    pub(super) table: Mutex<Table>,
    /// Credentials that left the config while their previous version awaited
    /// retirement: the entry to retire it with, until that is done.
    pub(super) departed: Mutex<HashMap<CredentialKey, Arc<CredEntry>>>,
    /// The vault paths, files and roles jobs hold while they run: a
    /// departed credential's job and a new one's on the same place take
    /// turns (`places.rs`).
    pub(super) places: super::places::PlaceLocks,
    /// Credentials state remembers that the config no longer names, with
    /// the version that stays current until their agent is decommissioned
    /// and when it was made (for `keyturn surface` and the metrics).
    pub(super) unconfigured: Mutex<std::collections::BTreeMap<CredentialKey, super::Unconfigured>>,
    /// File sinks a reload added (their paths, per credential), to be
    /// given the current version by the next restore job even when a file
    /// is at the path already: one left from before (a sink removed and put
    /// back, a credential renamed back) holds an older version or another
    /// credential's value (see `restore.rs`).
    pub(super) added_files: Mutex<HashMap<CredentialKey, Vec<std::path::PathBuf>>>,
    /// The versions of credentials a state database restored from a backup
    /// did not know (`Write::VersionFloor`): new ones are numbered above.
    /// Usually empty.
    pub(super) version_floors: Mutex<HashMap<CredentialKey, VersionNo>>,
    /// At start, the rotations that were parked when the daemon stopped,
    /// and when their next attempt was due: resumed then, not at once
    /// (black-box finding: every restart ran the failing step again at
    /// once, counting one more failure and doubling the back-off). Taken
    /// by the first scheduling.
    pub(super) resume_not_before: Mutex<HashMap<CredentialKey, DateTime<Utc>>>,
    /// Jobs running now, and jobs finished since the engine was last idle.
    pub(super) in_flight: AtomicUsize,
    pub(super) finished_since_trim: AtomicUsize,
    /// Moves on every write that may change which versions of a credential
    /// are accepted (a version staged, promoted, retired, forgotten) and on
    /// every reload: see [`Engine::versions_generation`].
    pub(super) versions_generation: AtomicU64,
    /// Moves whenever a lock of the live table or of the awaited acks is
    /// released ([`Changing`]) and when an agent is retired: while it
    /// stays put, the alert loop's health pass reuses its last answer
    /// (`health.rs`), so an idle daemon does not walk every credential.
    pub(super) changes: AtomicU64,
    pub(super) health_cache: Mutex<Option<super::health::HealthCache>>,
    pub(super) wake: Notify,
    /// Agents being (or already) decommissioned, with the label `status`
    /// shows for their credentials: none of their credentials is rotated,
    /// retired or followed any more (see `retired.rs`).
    pub(super) retired: RwLock<HashMap<crate::model::AgentId, &'static str>>,
    /// Told whenever a rotation ends (an alert condition may have changed):
    /// the daemon's alert loop, once it is set.
    pub(super) alert_poke: std::sync::OnceLock<Arc<Notify>>,
    /// Woken when an agent is retired, so its rotations waiting out a
    /// back-off stop at once.
    pub(super) agent_stopped: Notify,
    /// Tells the follow loops (`follow.rs`) that the catalog changed.
    pub(super) follow_reload: Notify,
    /// What the follow loops and follow nudges share (`follow.rs`).
    pub(super) follow: super::follow::Shared,
    pub(super) cancel: CancellationToken,
    pub(super) tracker: TaskTracker,
}

/// Why a rotation stopped before finishing.
pub(super) enum Stop {
    /// Failed after its retries; parked and retried later, but not before
    /// the `Retry-After` of the last error if it had one (the last attempt's
    /// has no in-step delay left to honour it).
    Failed(String, Option<Duration>),
    /// The daemon is stopping; state is persisted and it resumes at next start.
    Drained,
    /// The agent was decommissioned: the rotation was recorded as abandoned
    /// and is never resumed.
    Abandoned,
    /// A reload removed the credential before the rotation began (it was
    /// asked for, or due, and waited for a slot): nothing was begun, and
    /// nothing is.
    Removed,
}

pub(super) fn chrono_dur(d: Duration) -> chrono::Duration {
    chrono::Duration::from_std(d).unwrap_or(chrono::Duration::MAX)
}

/// What an engine is made of, besides its clock and its state writer.
pub struct EngineParts {
    pub catalog: Catalog,
    pub state: Arc<dyn StateStore>,
    pub audit: AuditLog,
    pub metrics: Arc<Metrics>,
    pub cancel: CancellationToken,
    pub tracker: TaskTracker,
}

impl Engine {
    /// The daemon's engine: the system clock, state writes on a writer thread.
    pub fn new(parts: EngineParts) -> Result<Engine, EngineError> {
        let writer = StateWriter::start(parts.state.clone())?;
        Ok(Self::assemble(parts, writer, Arc::new(SystemClock)))
    }

    /// An engine on `clock` whose state calls are served on the calling task
    /// (no writer thread): for engine tests under `tokio::time::pause()`,
    /// with an in-memory store, an inline audit log and in-memory plug-ins,
    /// so that nothing the engine awaits runs on another thread and the
    /// paused clock moves only when every task waits for a timer.
    pub fn with_clock_inline(parts: EngineParts, clock: Arc<dyn Clock>) -> Engine {
        let writer = StateWriter::inline(parts.state.clone());
        Self::assemble(parts, writer, clock)
    }

    /// [`Engine::with_clock_inline`] on `clock` (a [`TokioClock`]),
    /// with fresh metrics, cancel token and task tracker (returned for the
    /// test to stop the engine and to spawn its scheduler).
    #[cfg(test)]
    pub(crate) fn paused_for_test(
        catalog: Catalog,
        state: Arc<dyn StateStore>,
        audit: AuditLog,
        clock: super::TokioClock,
    ) -> (Engine, CancellationToken, TaskTracker) {
        let (cancel, tracker) = (CancellationToken::new(), TaskTracker::new());
        let parts = EngineParts {
            catalog,
            state,
            audit,
            metrics: Arc::new(Metrics::new()),
            cancel: cancel.clone(),
            tracker: tracker.clone(),
        };
        (
            Self::with_clock_inline(parts, Arc::new(clock)),
            cancel,
            tracker,
        )
    }

    fn assemble(parts: EngineParts, writer: StateWriter, clock: Arc<dyn Clock>) -> Engine {
        let EngineParts {
            catalog,
            state,
            audit,
            metrics,
            cancel,
            tracker,
        } = parts;
        let global = Arc::new(Semaphore::new(
            catalog.config.daemon.max_concurrent_rotations.max(1),
        ));
        Engine {
            inner: Arc::new_cyclic(|me| Inner {
                me: me.clone(),
                acks: Mutex::new(HashMap::new()),
                delivering: Mutex::new(HashMap::new()),
                ack_changed: Notify::new(),
                recording_ack: tokio::sync::Mutex::new(()),
                clock,
                catalog: RwLock::new(Arc::new(catalog)),
                state,
                writer,
                audit,
                metrics,
                global,
                table: Mutex::new(Table::default()),
                departed: Mutex::new(HashMap::new()),
                places: Default::default(),
                unconfigured: Mutex::default(),
                added_files: Mutex::default(),
                version_floors: Mutex::default(),
                resume_not_before: Mutex::default(),
                in_flight: AtomicUsize::new(0),
                finished_since_trim: AtomicUsize::new(0),
                versions_generation: AtomicU64::new(0),
                changes: AtomicU64::new(0),
                health_cache: Mutex::new(None),
                wake: Notify::new(),
                follow_reload: Notify::new(),
                follow: Default::default(),
                retired: RwLock::new(HashMap::new()),
                agent_stopped: Notify::new(),
                alert_poke: std::sync::OnceLock::new(),
                cancel,
                tracker,
            }),
        }
    }

    pub fn catalog(&self) -> Arc<Catalog> {
        self.inner.catalog()
    }

    pub fn audit(&self) -> &AuditLog {
        &self.inner.audit
    }

    /// Appends a record that belongs to no rotation step (the daemon's
    /// start, stop and reloads, admin requests, refused peers) and stores the
    /// new head in the state database before returning: cutting any record
    /// off the end of the log must be detectable, and only the stored head
    /// can tell. (Step records store it with the step's own writes.)
    pub async fn record(&self, ev: AuditEvent) -> Result<AuditHead, PluginError> {
        let head = self.inner.append(ev).await?;
        self.inner
            .persist(vec![Write::AuditHead(head.clone())])
            .await?;
        Ok(head)
    }

    pub fn state(&self) -> &Arc<dyn StateStore> {
        &self.inner.state
    }

    /// Loads persisted state and arms a timer for every credential:
    /// unfinished rotations resume now, credentials without a version get
    /// their first one now, overdue ones are spread over the catch-up window,
    /// the rest wait for their next due time.
    pub async fn start(&self) -> Result<(), EngineError> {
        // Read on the caller (the daemon's main thread, at start-up), not on
        // the state thread: at 100k credentials the snapshot is tens of MB
        // of small rows, freed below, and only the main arena gives a freed
        // top back to `malloc_trim` (see `crate::memory`); on the state
        // thread's arena ~25 MB stayed resident. Nothing else uses the
        // state yet.
        let mut snapshot = self.inner.state.snapshot()?;
        let floors: HashMap<CredentialKey, VersionNo> =
            self.inner.state.version_floors()?.into_iter().collect();
        let catalog = self.catalog();
        // Acks first: a rotation waiting to retire whose consumers have all
        // acknowledged retires now.
        let retiring: HashMap<CredentialKey, u64> = snapshot
            .unfinished
            .iter()
            .filter(|r| r.step == Step::Retire)
            .map(|r| (r.key.clone(), r.version))
            .collect();
        self.inner
            .restore_awaited(std::mem::take(&mut snapshot.acks), &retiring);
        self.inner.resume_deliveries(
            snapshot
                .unfinished
                .iter()
                .filter(|r| r.step == Step::Retire)
                .cloned()
                .collect(),
        );
        for rot in &mut snapshot.unfinished {
            if rot.step == Step::Retire {
                rot.retire_at = self.inner.retire_time(&rot.key, rot.version, rot.retire_at);
            }
        }
        // Rotations to resume before their retire step (usually none).
        let mut resume = HashSet::new();
        // Unpromoted rotations of credentials no longer configured.
        let mut departed = Vec::new();
        // Stored rotate requests that will never begin.
        let mut forgotten = Vec::new();
        // Rotations of a restored state that a later version superseded.
        let mut superseded = Vec::new();
        {
            let mut live = self.inner.live();
            live.reserve_total(catalog.creds.len());
            // Keys are interned from the catalog first, so the table shares
            // the catalog's id strings instead of holding the state's copies.
            // State rows of credentials no longer configured are left out.
            for key in catalog.creds.keys() {
                live.entry(key);
            }
            let mut failing = Vec::new();
            let mut unconfigured = self.inner.unconfigured();
            for row in snapshot.credentials {
                if let Some(l) = live.get_mut(&row.key) {
                    if row.consecutive_failures > 0 {
                        failing.push(row.key.clone());
                    }
                    l.row = Some(row.into());
                } else if let Some(version) = row.current_version {
                    unconfigured.insert(
                        row.key,
                        super::Unconfigured {
                            version,
                            made: row.last_rotated_at,
                        },
                    );
                }
            }
            drop(unconfigured);
            // A failing credential with no rotation to resume had its last
            // one abandoned (its staged version vanished; `steps.rs`): the
            // fresh rotation that follows is tried now, as a parked one is,
            // not at the credential's next due time.
            let unfinished: HashSet<&CredentialKey> =
                snapshot.unfinished.iter().map(|r| &r.key).collect();
            for key in failing {
                let rotated_here = catalog
                    .creds
                    .get(&key)
                    .is_some_and(|e| e.policy.follow.is_none());
                if rotated_here && !unfinished.contains(&key) {
                    live.entry(&key).next_trigger = Some(Trigger::Schedule);
                    resume.insert(key);
                }
            }
            drop(unfinished);
            for rot in snapshot.unfinished {
                if !catalog.creds.contains_key(&rot.key) {
                    // Left the config while the daemon was down: a
                    // retirement that was due is still owed; a rotation
                    // not promoted yet is undone (`settle_departed`).
                    match rot.step {
                        Step::Retire => self.inner.adopt_departed(&mut live, &catalog, &rot),
                        Step::Create | Step::Set | Step::Test => departed.push(rot),
                        _ => {
                            tracing::error!(agent = %rot.key.agent, credential = %rot.key.credential, rotation = %rot.id, step = %rot.step, version = rot.version, "left the config in the middle of a rotation already promoted in the vault: it is delivered to no agent; add the credential back to finish it")
                        }
                    }
                    continue;
                }
                // The audit log names a later version than this rotation's
                // (the state was restored, or lost its last writes): it was
                // finished long ago, and resuming it would make an older
                // value current again over the vault's newer one.
                if floors.get(&rot.key).is_some_and(|f| rot.version < *f) {
                    superseded.push(rot);
                    continue;
                }
                // Parked (its last attempt failed, the failure counted):
                // its next attempt keeps the back-off it was given.
                let failures = live
                    .get(&rot.key)
                    .and_then(|l| l.row.as_ref())
                    .map_or(0, |r| r.consecutive_failures);
                if rot.last_error.is_some() && failures > 0 {
                    let delay =
                        super::jobs::park_delay(&super::steps::entry_retry(&catalog), failures);
                    let at = rot.updated_at + chrono_dur(delay);
                    if at > self.inner.now() {
                        // Shown as parked (`failed`, its step) meanwhile.
                        live.entry(&rot.key).parked = Some(Box::new(super::table::Parked {
                            rotation: Some(rot.id.clone()),
                            step: Some(rot.step),
                            version: Some(rot.version),
                            failures,
                        }));
                        self.inner
                            .resume_not_before
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .insert(rot.key.clone(), at);
                    }
                }
                self.inner.adopt_unfinished(&mut live, rot, &mut resume);
            }
            // A `keyturn rotate` that was waiting for the current version's
            // acks when the daemon stopped goes on now: it waits again, up
            // to the same grace deadline, then begins. One whose credential
            // left the config (or is followed now) is forgotten: it would
            // rotate the credential the day it came back.
            for req in snapshot.requests {
                let rotated_here = catalog
                    .creds
                    .get(&req.key)
                    .is_some_and(|e| e.policy.follow.is_none());
                let Some(l) = live.get_mut(&req.key).filter(|_| rotated_here) else {
                    tracing::info!(agent = %req.key.agent, credential = %req.key.credential, requested_at = %req.requested_at, "forgetting the rotation asked for before the restart: the credential is not rotated here any more");
                    forgotten.push(Write::RotationRequestDone(req.key));
                    continue;
                };
                l.request_stored = true;
                if !resume.contains(&req.key) {
                    tracing::info!(agent = %req.key.agent, credential = %req.key.credential, requested_at = %req.requested_at, "resuming the rotation asked for before the restart (after the current version's acknowledgements, if it awaits any)");
                    l.next_trigger = Some(Trigger::Manual);
                    resume.insert(req.key);
                }
            }
        }
        // Nothing else writes yet (see the snapshot above). Harmless until
        // the credential comes back: a failure only warns, and the next
        // start tries again.
        if !forgotten.is_empty()
            && let Err(e) = self.inner.state.apply(&forgotten)
        {
            tracing::warn!(error = %e, "cannot forget the rotations asked for of credentials no longer rotated here; retried at the next start");
        }
        for mut rot in superseded {
            let floor = floors.get(&rot.key).copied().unwrap_or_default();
            if let Some(entry) = catalog.creds.get(&rot.key) {
                let why = format!(
                    "the audit log records version {floor}, made after it: the state database was \
                     restored from an older backup or lost its last writes"
                );
                tracing::warn!(agent = %rot.key.agent, credential = %rot.key.credential, rotation = %rot.id, version = rot.version, "not resuming a rotation of the restored state: {why}");
                self.inner.abandon_for_good(entry, &mut rot, &why).await;
            }
        }
        *self
            .inner
            .version_floors
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = floors;
        self.inner.schedule_all(&resume, true);
        self.inner.settle_all_departed(departed, &catalog);
        // A credential followed before this start (a follower records no
        // due time) may have a retirement to take over (`follow.rs`).
        let followed_before = self.inner.keys_where(&catalog, |l| {
            l.and_then(|l| l.row.as_ref())
                .is_some_and(|r| r.current_version.is_some() && r.next_due.is_none())
        });
        self.inner.arm_takeovers(followed_before);
        Ok(())
    }

    /// Swaps in a new catalog (after a reload) and re-arms every timer from
    /// the new schedules. Rotations in flight finish with the entry they
    /// started with. A credential the engine holds no state for (new, or
    /// added back) is picked up from the state database, so one that comes
    /// back is not rotated as if it had never been; one that left keeps only
    /// the retirement of its previous version, if that is pending. A
    /// delivered file that is missing (a file sink the reload added, say)
    /// gets the current version again.
    pub async fn reload(&self, catalog: Catalog) {
        let catalog = Arc::new(catalog);
        let fresh = self.inner.keys_where(&catalog, |l| {
            l.is_none_or(|l| l.row.is_none() && l.running.is_none())
        });
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
        // An agent's `auth_key` may name another credential now.
        self.inner.versions_changed();
        for key in catalog.creds.keys().filter(|k| !old.creds.contains_key(k)) {
            if let Some(label) = self.inner.retired_label(&key.agent) {
                tracing::warn!(agent = %key.agent, credential = %key.credential, "added to an agent that is {label}: it is never rotated or delivered (a decommission is for good; give the credential to another agent)");
            }
        }
        // A `decommissioned` table taken out does not undo the decommission
        // (black-box finding: the reload said nothing).
        let mut told = HashSet::new();
        for entry in catalog.creds.values() {
            let key = entry.key();
            let undone = entry.agent.decommissioned.is_none()
                && old
                    .creds
                    .get(key)
                    .is_some_and(|o| o.agent.decommissioned.is_some());
            if undone
                && told.insert(key.agent.clone())
                && let Some(label) = self.inner.retired_label(&key.agent)
            {
                tracing::warn!(agent = %key.agent, "reload: the agent's `decommissioned` table was taken out, but it is {label}: a decommission is for good, it is never rotated or delivered again (give the agent another name to start it afresh)");
            }
        }
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
            let mut unconfigured = self.inner.unconfigured();
            unconfigured.retain(|k, _| !catalog.creds.contains_key(k));
            for key in old.creds.keys().filter(|k| !catalog.creds.contains_key(k)) {
                if let Some(row) = live.get(key).and_then(|l| l.row.as_ref())
                    && let Some(version) = row.current_version
                {
                    let made = row.last_rotated_at;
                    unconfigured.insert(key.clone(), super::Unconfigured { version, made });
                }
            }
            drop(unconfigured);
            self.inner.forget_departed(&mut live, &old, &catalog);
        }
        self.inner.schedule_all(&resume, false);
        // Followed until this reload: a retirement to take over (`follow.rs`).
        self.inner.arm_takeovers(
            catalog
                .creds
                .values()
                .filter(|e| {
                    e.policy.follow.is_none()
                        && old
                            .creds
                            .get(e.key())
                            .is_some_and(|o| o.policy.follow.is_some())
                })
                .map(|e| e.key().clone()),
        );
        self.inner.wake.notify_one();
        self.inner.follow_reload.notify_one();
        // Consumers of sinks the reload removed or re-pointed (`acks.rs`).
        self.inner.rebind_awaited(&old, &catalog).await;
        // A file sink the reload added has no file yet, or an old one
        // (`restore.rs`).
        self.inner.note_added_files(&old, &catalog);
        self.inner.restore_after_reload(catalog);
    }

    /// Starts (or joins) a rotation of `key` now. Returns `None` if the
    /// credential is not in the config.
    pub fn trigger(&self, key: &CredentialKey) -> Option<oneshot::Receiver<RotateFinished>> {
        self.inner.clone().trigger(key)
    }

    /// Rotates `key` now, as a catch-up: the audit log records versions
    /// made after the state's current one (a state database restored
    /// from an older backup), so the value the state and the vault hold
    /// as current was superseded. `false`: not rotated here (not in the
    /// config, followed, or its agent decommissioned).
    pub fn rotate_superseded(&self, key: &CredentialKey) -> bool {
        self.inner
            .clone()
            .trigger_as(key, super::step::Trigger::CatchUp)
            .is_some()
    }

    /// The rotation running for `key` now, if one is: its id and the
    /// version it makes, once it has begun. A trigger joins it.
    pub fn rotating(&self, key: &CredentialKey) -> Option<(Option<RotationId>, Option<u64>)> {
        let live = self.inner.live();
        let running = live.get(key)?.running.as_ref()?;
        // Before it begins, a rotation retires the version before the
        // current one: what it runs then is the previous rotation's row,
        // whose id and version are not this rotation's (black-box finding:
        // "it makes version 5" of a rotation that made 6).
        let begun = running.step < Step::Retire;
        (running.job == Job::Rotate).then(|| {
            if begun {
                (running.rotation.clone(), running.version)
            } else {
                (None, None)
            }
        })
    }

    /// `keyturn ack`: every consumer awaiting an acknowledgement of
    /// `version` of `key` has it now (see `rotation/acks.rs`).
    pub async fn ack(
        &self,
        key: &CredentialKey,
        version: u64,
        actor: Actor,
    ) -> Result<super::AckOutcome, super::AckError> {
        self.inner.ack(key, version, None, actor).await
    }

    /// The status of every configured credential, in a stable order.
    pub fn status(&self) -> Vec<StatusRow> {
        self.inner.status()
    }

    /// `(key, age, seconds until due)` for every credential, for the metrics
    /// scrape. Not for a decommissioned (or decommissioning) agent's: they
    /// are not rotated any more, and an age that grows past `max_age` or a
    /// due time long past would set off the rotation alerts.
    pub fn credential_times(&self) -> Vec<(CredentialKey, Option<f64>, Option<f64>)> {
        let now = self.inner.now();
        let live = self.inner.live();
        let catalog = self.inner.catalog();
        let mut out: Vec<_> = catalog
            .creds
            .keys()
            // Nor a followed credential its rotator destroyed.
            .filter(|key| {
                !self.inner.is_retired(&key.agent)
                    && !live.get(key).is_some_and(|l| l.follow_revoked)
            })
            .map(|key| {
                let row = live.get(key).and_then(|l| l.row.as_ref());
                let age = live
                    .get(key)
                    .and_then(super::table::CredLive::made_at)
                    // Never below zero: a rotation stamped by a clock that
                    // ran ahead and was set back is new, not from the future.
                    .map(|t| ((now - t).num_milliseconds().max(0)) as f64 / 1000.0);
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

    /// The version `key`'s state names current, from memory (cheap: the
    /// token service checks it on every request to notice a rotation of
    /// its signing key at once).
    pub fn current_version(&self, key: &CredentialKey) -> Option<VersionNo> {
        let live = self.inner.live();
        live.get(key)
            .and_then(|l| l.row.as_ref())
            .and_then(|r| r.current_version)
    }

    /// The value of `version`, read where it was made: the config may have
    /// moved the credential to another `vault` or `path` since, and a
    /// version stays where it was made until the next rotation makes one at
    /// the new place (black-box finding: the token service looked for its
    /// signing key in the new vault and answered `server_error` until a
    /// manual rotation).
    pub async fn version_value(
        &self,
        version: &crate::state::VersionRow,
    ) -> Result<crate::model::SecretValue, String> {
        use crate::vaults::{Select, VaultItem, VaultRefs};
        let key = &version.key;
        let Some(entry) = self.inner.catalog().creds.get(key).cloned() else {
            return Err(format!("{key} is not configured"));
        };
        let id = version.rotation.clone();
        let made_by = self
            .inner
            .load(move |s| s.rotation(&id))
            .await
            .map_err(|e| {
                format!(
                    "cannot read the rotation that made version {} of {key}: {}",
                    version.version, e.message
                )
            })?;
        let place = self.inner.place_of(
            &entry,
            made_by.as_ref().and_then(|r| r.footprint.as_deref()),
        );
        // A bare ref is the primary's where the version was made.
        let primary = place.vaults.first().unwrap_or(&entry.vaults[0]);
        let refs = VaultRefs::decode(&version.vault_version, primary.vault.describe());
        let Some((vault, wanted)) = place
            .vaults
            .iter()
            .find_map(|h| Some((h, refs.get(h.vault.describe())?)))
        else {
            let names: Vec<&str> = place
                .vaults
                .iter()
                .map(|h| h.config.name.as_str())
                .collect();
            return Err(format!(
                "version {} of {key} is held in no configured vault (made at {} in {})",
                version.version,
                place.path,
                if names.is_empty() {
                    "a vault no longer configured".to_owned()
                } else {
                    names.join(", ")
                }
            ));
        };
        let name = &vault.config.name;
        let item = VaultItem {
            key,
            path: &place.path,
        };
        match vault.vault.read(item, Select::Version(wanted)).await {
            Ok(Some(v)) => Ok(v.value),
            Ok(None) => Err(format!(
                "version {} of {key} is not in vault {name} at {}",
                version.version, place.path
            )),
            Err(e) => Err(format!(
                "reading version {} of {key} in vault {name}: {}",
                version.version, e.message
            )),
        }
    }

    /// A number that moves whenever the versions state accepts of any
    /// credential may have changed (a rotation promoted or retired one, a
    /// decommission or a follower changed them, a reload named other
    /// credentials), once the change is committed. Whoever caches what it
    /// read of versions (the token service, agents' keys) reads this first
    /// and reads the versions again when it moved: a key retired stops
    /// working as soon as the retirement is done, not a cache age later.
    pub fn versions_generation(&self) -> u64 {
        self.inner
            .versions_generation
            .load(std::sync::atomic::Ordering::Acquire)
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
        for entry in catalog.creds.values() {
            // A decommissioned (or decommissioning) agent's credentials are
            // not rotated any more: not idle, nor anything else here
            // (`keyturn_agents{state}` counts their agents).
            if self.inner.retired_label(&entry.key().agent).is_some() {
                continue;
            }
            let state = shown_state(entry, live.get(entry.key()));
            if let Some(c) = counts.iter_mut().find(|(n, _)| *n == state) {
                c.1 += 1;
            }
        }
        counts
    }
}

/// A credential's state as `status` and the `credentials{state}` gauge show
/// it. A followed credential runs no rotation, so it is `failed` while its
/// row counts failures: its vault's polls fail, or its delivery does (see
/// `follow.rs`); the first success clears them.
fn shown_state(entry: &CredEntry, l: Option<&CredLive>) -> CredentialState {
    let state = l.map_or(CredentialState::Idle, CredLive::state);
    let failing = l
        .and_then(|l| l.row.as_ref())
        .is_some_and(|r| r.consecutive_failures > 0);
    if state == CredentialState::Idle && failing && entry.policy.follow.is_some() {
        CredentialState::Failed
    } else {
        state
    }
}

impl Inner {
    /// The engine's time, at millisecond precision everywhere, so that what
    /// is persisted compares equal to what is kept in memory.
    pub(super) fn now(&self) -> DateTime<Utc> {
        let now = self.clock.now();
        DateTime::from_timestamp_millis(now.timestamp_millis()).unwrap_or(now)
    }

    pub(super) fn catalog(&self) -> Arc<Catalog> {
        self.catalog
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub(super) fn live(&self) -> Changing<'_, Table> {
        Changing {
            guard: self.table.lock().unwrap_or_else(|p| p.into_inner()),
            changes: &self.changes,
        }
    }

    /// The keys of `catalog`'s credentials whose live state (`None`: the
    /// engine holds none) passes `keep`, in key order.
    fn keys_where(
        &self,
        catalog: &Catalog,
        keep: impl Fn(Option<&CredLive>) -> bool,
    ) -> Vec<CredentialKey> {
        let live = self.live();
        catalog
            .creds
            .keys()
            .filter(|k| keep(live.get(k)))
            .cloned()
            .collect()
    }

    pub(super) fn unconfigured(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::BTreeMap<CredentialKey, super::Unconfigured>>
    {
        self.unconfigured.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn departed_entries(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<CredentialKey, Arc<CredEntry>>> {
        self.departed.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn status(&self) -> Vec<StatusRow> {
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
                let running = l.and_then(CredLive::shown_job);
                let state = shown_state(entry, l).as_str();
                // Once promoted, the new version is current in the vault,
                // also while its delivery fails.
                let version = l
                    .and_then(CredLive::promoted)
                    .or_else(|| row.and_then(|r| r.current_version));
                // A followed credential has no due time: it moves when its
                // rotator rotates it.
                let follow = entry.policy.follow.is_some();
                // Its rotator destroyed it (see `follow.rs`).
                let revoked = follow && l.is_some_and(|l| l.follow_revoked);
                let retired = self.retired_label(&key.agent);
                let state = if let Some(label) = retired {
                    label
                } else if revoked && state == "idle" {
                    "revoked"
                } else if follow && state == "idle" && version.is_none() {
                    // Nothing delivered yet: its vault holds no current
                    // version (the rotator has not made one, or the path
                    // is not the rotator's).
                    "follow:waiting"
                } else if follow && state == "idle" {
                    "follow"
                } else {
                    state
                };
                let (awaited, holdouts) = self.awaited_labels(key);
                let (awaiting_ack, holdouts) = if holdouts {
                    (Vec::new(), awaited)
                } else {
                    (awaited, Vec::new())
                };
                // A rotation not begun, waiting for the current version's
                // acks before it retires the version before (black-box
                // finding: it showed `rotating:create` for up to `grace`).
                let waits_for_acks = running
                    .is_some_and(|r| r.job == Job::Rotate && r.rotation.is_none())
                    && !awaiting_ack.is_empty();
                StatusRow {
                    awaiting_ack,
                    holdouts,
                    agent: key.agent.clone(),
                    credential: key.credential.clone(),
                    vault: entry.vault_label(),
                    version,
                    stage: version.map(|_| {
                        if revoked {
                            ShownStage::Revoked
                        } else {
                            ShownStage::Current
                        }
                    }),
                    last_rotated: row.and_then(|r| r.last_rotated_at),
                    next_due: live
                        .deadline(key, Job::Rotate)
                        .or_else(|| row.and_then(|r| r.next_due))
                        // Nothing is due for a decommissioned agent.
                        .filter(|_| !follow && retired.is_none()),
                    state: state.to_owned(),
                    // A parked rotation shows where it stopped.
                    step: if waits_for_acks {
                        Some("awaiting_ack".to_owned())
                    } else {
                        running
                            .map(|r| r.step)
                            .or_else(|| l.and_then(|l| l.parked.as_ref()?.step))
                            .map(|s| s.to_string())
                    },
                    rotation: running
                        .and_then(|r| r.rotation.as_ref())
                        .or_else(|| l.and_then(|l| l.parked.as_ref()?.rotation.as_ref()))
                        .map(RotationId::to_string),
                    last_error: running
                        .and_then(|r| r.last_error.clone())
                        .or_else(|| row.and_then(|r| r.last_error.as_deref().map(String::from)))
                        // A delivery retried in the background fails no step.
                        .or_else(|| self.delivery_failure(key)),
                }
            })
            .collect()
    }

    pub(super) fn cred_row(&self, key: &CredentialKey) -> CredentialRow {
        self.live()
            .get(key)
            .and_then(|l| l.row.as_ref())
            .map_or_else(|| LiveRow::default().to_row(key), |r| r.to_row(key))
    }

    pub(super) fn set_running(&self, key: &CredentialKey, rot: &RotationRow) {
        if let Some(r) = self.live().get_mut(key).and_then(|l| l.running.as_mut()) {
            r.rotation = Some(rot.id.clone());
            r.step = rot.step;
            r.version = Some(rot.version);
            r.attempts = rot.attempts;
            r.last_error = rot.last_error.clone();
        }
    }

    /// Commits `writes`. An audit head among them is stored only once the
    /// log holds it on disk (records may have been appended unsynced): a
    /// stored head the disk lacks would read as truncation after a power cut.
    pub(super) async fn persist(&self, writes: Vec<Write>) -> Result<(), PluginError> {
        let synced = self.audit.synced_seq();
        if writes
            .iter()
            .any(|w| matches!(w, Write::AuditHead(h) if h.seq > synced))
        {
            self.audit
                .sync()
                .await
                .map_err(|e| PluginError::new(ErrorKind::Transient, e.to_string()))?;
        }
        let awaiting: Vec<(CredentialKey, VersionNo)> = writes
            .iter()
            .filter_map(|w| match w {
                Write::AwaitAcks { key, version, .. } => Some((key.clone(), *version)),
                _ => None,
            })
            .collect();
        let restages = writes.iter().any(|w| {
            matches!(
                w,
                Write::Version(_)
                    | Write::VersionStage { .. }
                    | Write::RetireOthers(_)
                    | Write::ForgetCredential(_)
            )
        });
        let applied = self.writer.apply(writes).await;
        // After the commit (and on an error too, which may follow one):
        // whoever reads the generation and then the versions sees them new.
        if restages {
            self.versions_changed();
        }
        applied.map_err(|e| PluginError::new(ErrorKind::Transient, e.to_string()))?;
        for (key, version) in awaiting {
            self.delivery_recorded(&key, version);
        }
        Ok(())
    }

    pub(super) fn versions_changed(&self) {
        self.versions_generation
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
    }

    pub(super) async fn load<T: Send + 'static>(
        &self,
        f: impl FnOnce(&dyn StateStore) -> Result<T, StateError> + Send + 'static,
    ) -> Result<T, PluginError> {
        self.writer
            .read(f)
            .await
            .map_err(|e| PluginError::new(ErrorKind::Transient, e.to_string()))
    }

    /// Appends `ev` (see [`Self::audit_event`]); returns the write that
    /// records the new head in state.
    pub(super) async fn audit(&self, ev: AuditEvent) -> Result<Write, PluginError> {
        Ok(Write::AuditHead(self.append(ev).await?))
    }

    /// The audit record of `event` for `entry` (and `rot` if given).
    pub(super) fn audit_event(
        &self,
        entry: &CredEntry,
        rot: Option<&RotationRow>,
        event: &str,
        outcome: Outcome,
        detail: Option<String>,
        error: Option<String>,
    ) -> AuditEvent {
        let mut ev = AuditEvent::new(event, Actor::Daemon, outcome);
        ev.agent = Some(entry.key().agent.clone());
        ev.credential = Some(entry.key().credential.clone());
        ev.tenant = Some(entry.agent.tenant.clone());
        ev.owner = Some(entry.agent.owner.clone());
        ev.rotation = rot.map(|r| r.id.clone());
        ev.version = rot.map(|r| r.version);
        ev.detail = detail;
        ev.error = error;
        ev
    }

    /// Appends one record (durable when this returns) and counts it.
    pub(super) async fn append(&self, ev: AuditEvent) -> Result<AuditHead, PluginError> {
        self.counted(self.audit.append(ev).await)
    }

    /// Appends one record without waiting for the fsync (see
    /// [`AuditLog::append_unsynced`]); a head it returns reaches the state
    /// only through [`Inner::persist`], which makes it durable first.
    pub(super) async fn append_unsynced(&self, ev: AuditEvent) -> Result<AuditHead, PluginError> {
        self.counted(self.audit.append_unsynced(ev).await)
    }

    fn counted(
        &self,
        appended: Result<AuditHead, crate::audit::AuditError>,
    ) -> Result<AuditHead, PluginError> {
        let head = appended.map_err(|e| {
            self.metrics.audit_append_failed();
            PluginError::new(ErrorKind::Transient, e.to_string())
        })?;
        self.metrics.audit_records(1);
        Ok(head)
    }
}

/// A lock of live state that counts, when it is released, as a possible
/// change ([`Inner::changes`]). The count moves while the lock is still
/// held, after whatever the holder changed: a reader that saw the count
/// before taking the lock sees those changes or a count that moved.
pub(super) struct Changing<'a, T> {
    pub(super) guard: std::sync::MutexGuard<'a, T>,
    pub(super) changes: &'a AtomicU64,
}

impl<T> std::ops::Deref for Changing<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.guard
    }
}

impl<T> std::ops::DerefMut for Changing<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        &mut self.guard
    }
}

impl<T> Drop for Changing<'_, T> {
    fn drop(&mut self) {
        self.changes
            .fetch_add(1, std::sync::atomic::Ordering::Release);
    }
}
