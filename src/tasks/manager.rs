//! The task manager: starts a task (policy decision, persisted record,
//! issuance at each issuer the level grants, the credentials in a per-task
//! directory), ends it on request, at its TTL or when its start failed
//! (revoke at each issuer, verify, remove the directory), and resumes all of
//! that after a restart from the [`TaskStore`].
//!
//! Every decision is audited with the whole attribution chain: `task.refused`
//! (with the reason's code), `task.started`, `task.issued` (per issuer, with
//! the handle), `task.end` (a caller's request, the caller as actor),
//! `task.revoked` / `task.expiring` (cannot be ended early) /
//! `task.revoke_failed` (per issuer), `task.ended`; the end records with
//! the reason and who ended it. Never a credential.
//!
//! A task is `starting` until its start completes; one found so that no
//! start of this process runs (a crash, an abandoned request) is ended as
//! a failed start.
//!
//! Ending is retried until every item is verified revoked (or past the
//! expiry its system enforces by itself): [`TaskManager::tick`] ends what is
//! due and pushes what is ending forward, and returns when it wants to run
//! again; [`TaskManager::run`] loops on it.
//!
//! # Layout
//! - `manager.rs`: the types callers see, the manager's state, its audit
//!   records and the views of open tasks (the identity surface, `/metrics`);
//! - `manager/start.rs`: starting a task;
//! - `manager/end.rs`: ending one (revoke, verify, remove its directory),
//!   and what keeps a credential from being revoked ([`stranded`]);
//! - `manager/run.rs`: the loop that ends what is due and retries what is
//!   ending;
//! - `manager/task_dir.rs`: the per-task directory and the credential
//!   files in it.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use super::issuers::{IssueError, IssueRequest, Issued, Revoked, TaskAttribution, TaskIssuer};
use super::policy::{self, Policy, Refusal, TaskAsk};
use super::store::{ItemRow, ItemState, StoreError, TaskRow, TaskState, TaskStore};
use crate::audit::{Actor, AuditEvent, Outcome};
use crate::model::{AgentId, PluginError, SecretValue};
use crate::telemetry::TaskRevocation;

mod end;
mod run;
mod start;
mod task_dir;

pub use end::stranded;
use task_dir::{remove_task_dir, write_task_files};

/// Where the audit records go (the daemon appends them and keeps the head).
#[async_trait]
pub trait TaskRecorder: Send + Sync {
    async fn record(&self, event: AuditEvent);
}

/// Who is asking, as authenticated by the API (never taken from the request).
#[derive(Debug, Clone)]
pub struct Caller {
    /// The agent the caller acts as.
    pub agent: String,
    /// For the audit record.
    pub actor: Actor,
    /// e.g. `uid=1001`, `uid=0 as invoice-bot`, `jwt invoice-bot`.
    pub described: String,
}

/// A task start as asked (the agent is the caller's).
#[derive(Debug, Clone, Default)]
pub struct StartRequest {
    pub tenant: String,
    pub use_case: String,
    pub run_id: String,
    pub initiator: String,
    pub sensitivity: String,
    pub ttl: Option<Duration>,
}

/// The agent a task belongs to: who owns its directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AgentOwner {
    pub uid: Option<u32>,
    pub gid: Option<u32>,
}

/// What the manager works with; replaced whole on reload.
#[derive(Clone, Default)]
pub struct TaskSetup {
    pub policies: BTreeMap<String, Policy>,
    pub issuers: BTreeMap<String, Arc<dyn TaskIssuer>>,
    pub agents: BTreeMap<String, AgentOwner>,
    /// Per-task directories go under `<task_root>/<agent>/<task id>/`;
    /// `None`: credentials are only returned to the caller.
    pub task_root: Option<PathBuf>,
}

/// One issuer's credential of a started task, for the caller.
#[derive(Debug)]
pub struct Credential {
    pub public: BTreeMap<String, String>,
    pub secret: BTreeMap<String, SecretValue>,
    pub expires_at: SystemTime,
    /// Where it was written, when a task root is configured.
    pub file: Option<PathBuf>,
}

/// A started task.
#[derive(Debug)]
pub struct Started {
    pub task: TaskRow,
    /// Issuer name → its credential.
    pub credentials: BTreeMap<String, Credential>,
    pub dir: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum TaskError {
    #[error("refused: {0}")]
    Refused(Refusal),
    #[error("invalid {field}: {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
    #[error(
        "agent `{0}` is decommissioned (or no longer configured): it may not start tasks, and its tasks are ended (`keyturn status` shows how far their revocation is)"
    )]
    AgentRetired(String),
    #[error("no task `{0}`")]
    NotFound(String),
    /// Another agent's task: said like an unknown one, so that ids of other
    /// agents' tasks cannot be probed.
    #[error("no task `{0}`")]
    NotYours(String),
    #[error(
        "task {task}: issuer `{issuer}`: {error}; the task was ended and what was issued is being revoked"
    )]
    Issue {
        task: String,
        issuer: String,
        error: PluginError,
    },
    /// An issuer refused the request without calling its system (a TTL it
    /// cannot mint, a grant it cannot use): nothing was issued anywhere.
    #[error("issuer `{issuer}` refuses this task, and nothing was issued: {error}")]
    Unissuable { issuer: String, error: PluginError },
    #[error("task {task}: its credentials could not be written: {message}; the task was ended")]
    Deliver { task: String, message: String },
    #[error(transparent)]
    Store(#[from] StoreError),
}

pub struct TaskManager {
    store: TaskStore,
    setup: RwLock<Arc<TaskSetup>>,
    recorder: Arc<dyn TaskRecorder>,
    clock: Arc<dyn crate::rotation::Clock>,
    /// One lock per task being ended, so that an `end` racing the TTL (or
    /// two ends) revoke once.
    ending: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// The tasks whose start runs in this process now. A task `starting`
    /// in the store and not here never reached its caller (a crash, or a
    /// start abandoned half-way): it is ended as a failed start.
    starting: Mutex<HashSet<String>>,
    /// Agents whose decommission is being decided or was: no task of
    /// theirs starts any more. Set before the decision is stored, and
    /// checked by a start once its task is stored, so that a start either
    /// is refused or is stored before the decision (and its decommission's
    /// `tasks` item waits for it).
    blocked: Mutex<HashSet<String>>,
    /// Bumped each time a task is ended (every credential revoked and
    /// verified): a decommission waiting for an agent's tasks looks again.
    ended: tokio::sync::watch::Sender<u64>,
    wake: tokio::sync::Notify,
    /// When the run loop's next tick is due (ms since the epoch), or
    /// `i64::MAX` while a tick runs: a task that goes live wakes the loop
    /// only if it expires before that, so that a start does not cost a
    /// pass over every open task.
    armed_until_ms: AtomicI64,
    /// How long a failed revocation waits before the next attempt.
    pub retry: Duration,
    /// Where issuances and revocations are counted (the daemon's).
    metrics: Option<Arc<crate::telemetry::Metrics>>,
    /// Which failed revocation attempts are audited (the first, a changed
    /// error, then one an hour with the count), as a decommission's are.
    quiet: crate::revocation::quiet::Quiet,
}

/// Milliseconds since the epoch.
fn ms(t: DateTime<Utc>) -> i64 {
    t.timestamp_millis()
}

fn system_time(ms: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).unwrap_or(0))
}

impl TaskManager {
    pub fn new(
        store: TaskStore,
        setup: TaskSetup,
        recorder: Arc<dyn TaskRecorder>,
        clock: Arc<dyn crate::rotation::Clock>,
    ) -> TaskManager {
        TaskManager {
            store,
            setup: RwLock::new(Arc::new(setup)),
            recorder,
            clock,
            ending: Mutex::new(HashMap::new()),
            starting: Mutex::new(HashSet::new()),
            blocked: Mutex::new(HashSet::new()),
            ended: tokio::sync::watch::Sender::new(0),
            wake: tokio::sync::Notify::new(),
            armed_until_ms: AtomicI64::new(i64::MAX),
            retry: Duration::from_secs(5),
            metrics: None,
            quiet: Default::default(),
        }
    }

    /// Changes each time a task has ended (all its credentials revoked and
    /// verified at their systems).
    pub fn ended_changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.ended.subscribe()
    }

    /// The task store, also the ledger of spent assertion ids
    /// (`crate::auth`).
    pub fn store(&self) -> &TaskStore {
        &self.store
    }

    /// Counts issuances and revocations in `metrics` (`task_starts`,
    /// `task_revocations`), next to their audit records.
    pub fn with_metrics(mut self, metrics: Arc<crate::telemetry::Metrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    fn count_issued(&self, issuer: &str, ok: bool) {
        if let Some(m) = &self.metrics {
            m.task_issued(issuer, ok);
        }
    }

    fn count_revocation(&self, issuer: &str, result: crate::telemetry::TaskRevocation) {
        if let Some(m) = &self.metrics {
            m.task_revocation(issuer, result);
        }
    }

    /// Every task not ended, with its credentials that may still work, for
    /// the identity surface: `(agent, task)`. Each credential is named by
    /// its issuer's [`TaskIssuer::object`] (the handle as is when the
    /// issuer is no longer configured).
    pub fn surface_tasks(&self) -> Result<Vec<(String, crate::surface::SurfaceTask)>, TaskError> {
        let now = ms(self.clock.now());
        let setup = self.setup();
        let time = |ms: i64| DateTime::<Utc>::from_timestamp_millis(ms).unwrap_or_default();
        let mut out = Vec::new();
        for t in self.store.list(None, 0)? {
            if t.state == TaskState::Ended {
                continue;
            }
            let credentials = t
                .items
                .iter()
                .filter(|i| !i.state.is_done(i.expires_at_ms, now))
                .map(|i| crate::surface::SurfaceTaskCredential {
                    issuer: i.issuer.clone(),
                    object: match setup.issuers.get(&i.issuer) {
                        Some(issuer) => issuer.object(&t.task, i.handle.as_deref()),
                        None => i.handle.clone().unwrap_or_else(|| "not recorded".into()),
                    },
                    expires_at: time(i.expires_at_ms.unwrap_or(t.expires_at_ms)),
                    state: name_of(&i.state),
                })
                .collect();
            out.push((
                t.task.agent.clone(),
                crate::surface::SurfaceTask {
                    task: t.task.task_id.clone(),
                    tenant: t.task.tenant.clone(),
                    use_case: t.task.use_case.clone(),
                    sensitivity: t.task.sensitivity.clone(),
                    state: name_of(&t.state),
                    expires_at: time(t.expires_at_ms),
                    credentials,
                },
            ));
        }
        Ok(out)
    }

    /// The task figures `/metrics` exports, from the store: per agent and
    /// issuer, the credentials of tasks not ended that may still work; and
    /// the tasks past their TTL whose credentials are not all revoked.
    pub fn figures(&self) -> Result<crate::telemetry::TaskFigures, TaskError> {
        let now = ms(self.clock.now());
        let mut active: BTreeMap<(String, String), i64> = BTreeMap::new();
        let mut overdue = 0;
        for t in self.store.list(None, 0)? {
            if t.state == TaskState::Ended {
                continue;
            }
            let mut open = 0;
            for i in t
                .items
                .iter()
                .filter(|i| !i.state.is_done(i.expires_at_ms, now))
            {
                open += 1;
                *active
                    .entry((t.task.agent.clone(), i.issuer.clone()))
                    .or_default() += 1;
            }
            if t.expires_at_ms <= now && open > 0 {
                overdue += 1;
            }
        }
        Ok(crate::telemetry::TaskFigures {
            active: active
                .into_iter()
                .map(|((agent, issuer), n)| (agent, issuer, n))
                .collect(),
            revocation_overdue: overdue,
        })
    }

    /// The config changed: new policies and issuers apply to new tasks; a
    /// live task keeps its TTL and is revoked through the issuer of its
    /// name (one that was removed is retried until it is back).
    pub fn set_setup(&self, setup: TaskSetup) {
        *self.setup.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(setup);
        self.wake.notify_one();
    }

    fn setup(&self) -> Arc<TaskSetup> {
        self.setup.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// `agent`'s decommission is about to be decided: no task of its
    /// starts from now on. Called before the decision is stored (see
    /// [`TaskManager::blocked`]); [`TaskManager::unblock_starts`] if it
    /// could not be.
    pub fn block_starts(&self, agent: &str) {
        self.blocked
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(agent.to_owned());
    }

    /// The decommission [`TaskManager::block_starts`] was for was not
    /// decided (an unknown agent, the state unavailable).
    pub fn unblock_starts(&self, agent: &str) {
        self.blocked
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(agent);
    }

    pub(super) fn starts_blocked(&self, agent: &str) -> bool {
        self.blocked
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(agent)
    }

    /// `agent` is decommissioned: it may not start tasks from now on (a
    /// decommission is for good: the block outlives any rebuilt setup),
    /// and its live tasks end at the next tick.
    pub fn retire_agent(&self, agent: &str) {
        self.block_starts(agent);
        {
            let mut setup = self.setup.write().unwrap_or_else(|p| p.into_inner());
            if setup.agents.contains_key(agent) {
                let mut next = TaskSetup::clone(&setup);
                next.agents.remove(agent);
                *setup = Arc::new(next);
            }
        }
        self.wake.notify_one();
    }

    /// A task's audit record: the caller as actor (else the daemon), and
    /// in `detail` the task's whole attribution, `by` (the caller as
    /// authenticated), then `extra`'s fields.
    fn event(
        &self,
        name: &str,
        outcome: Outcome,
        caller: Option<&Caller>,
        task: &TaskAttribution,
        extra: serde_json::Value,
    ) -> AuditEvent {
        let mut ev = AuditEvent::new(
            name,
            caller.map_or(Actor::Daemon, |c| c.actor.clone()),
            outcome,
        );
        ev.agent = AgentId::new(&task.agent).ok();
        ev.tenant = Some(task.tenant.clone());
        let mut detail = serde_json::json!({
            "task": task.task_id,
            "use_case": task.use_case,
            "run_id": task.run_id,
            "initiator": task.initiator,
            "sensitivity": task.sensitivity,
            "by": caller.map(|c| c.described.as_str()),
        });
        if let (Some(d), serde_json::Value::Object(extra)) = (detail.as_object_mut(), extra) {
            d.extend(extra);
        }
        ev.detail = Some(detail.to_string());
        ev
    }

    /// Audits `caller`'s `task` as refused, for `error`.
    async fn refused(&self, caller: &Caller, task: &TaskAttribution, error: String) {
        let mut ev = self.event(
            "task.refused",
            Outcome::Refused,
            Some(caller),
            task,
            serde_json::Value::Null,
        );
        ev.error = Some(error);
        self.recorder.record(ev).await;
    }

    /// `caller`'s tasks (live and ending, then the `recent` last ended).
    /// Whether an end of task `id` runs now: stored ended, perhaps, but
    /// its `task.ended` record not written yet. A decommission's `tasks`
    /// item waits for it (found in a CI run: the item's
    /// `revocation.revoked` record came before the task's `task.ended`).
    pub(crate) fn end_in_progress(&self, id: &str) -> bool {
        self.ending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(id)
    }

    pub fn list(&self, agent: Option<&str>, recent: usize) -> Result<Vec<TaskRow>, TaskError> {
        Ok(self.store.list(agent, recent)?)
    }
}

/// The snake_case name serde gives a state (`live`, `issuing`, ...).
fn name_of(state: &impl serde::Serialize) -> String {
    serde_json::to_value(state)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests;
