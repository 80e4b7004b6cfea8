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

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use super::issuers::{IssueRequest, Issued, Revoked, TaskAttribution, TaskIssuer};
use super::policy::{self, Policy, Refusal, TaskAsk};
use super::store::{ItemRow, ItemState, StoreError, TaskRow, TaskState, TaskStore};
use crate::audit::{Actor, AuditEvent, Outcome};
use crate::model::{AgentId, PluginError, SecretValue};
use crate::telemetry::TaskRevocation;

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
        "agent `{0}` is decommissioned (or no longer configured): it may not start tasks, and its tasks were ended"
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
            ended: tokio::sync::watch::Sender::new(0),
            wake: tokio::sync::Notify::new(),
            armed_until_ms: AtomicI64::new(i64::MAX),
            retry: Duration::from_secs(5),
            metrics: None,
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

    /// `agent` is decommissioned: it may not start tasks from now on (until
    /// the setup is rebuilt from a config and the stored decommissions),
    /// and its live tasks end at the next tick.
    pub fn retire_agent(&self, agent: &str) {
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

    /// Starts a task for `caller`'s agent.
    pub async fn start(&self, caller: &Caller, req: StartRequest) -> Result<Started, TaskError> {
        for (field, value) in [
            ("tenant", &req.tenant),
            ("use_case", &req.use_case),
            ("run_id", &req.run_id),
            ("initiator", &req.initiator),
            ("sensitivity", &req.sensitivity),
        ] {
            policy::label(value).map_err(|message| TaskError::Invalid { field, message })?;
        }
        let setup = self.setup();
        let task = TaskAttribution {
            task_id: new_task_id(),
            agent: caller.agent.clone(),
            tenant: req.tenant.clone(),
            use_case: req.use_case.clone(),
            run_id: req.run_id.clone(),
            initiator: req.initiator.clone(),
            sensitivity: req.sensitivity.clone(),
        };
        if !setup.agents.contains_key(&caller.agent) {
            // A retired agent still asking is what a security team wants
            // to see in the audit log (a forgotten or compromised process).
            let e = TaskError::AgentRetired(caller.agent.clone());
            self.refused(caller, &task, e.to_string()).await;
            return Err(e);
        }
        // Counted as running, so that the store's and the audit log's
        // group commits wait briefly for the writes of concurrent tasks.
        let _busy = crate::group_commit::Busy::enter();
        let now = self.clock.now();
        let ask = TaskAsk {
            agent: &caller.agent,
            tenant: &req.tenant,
            use_case: &req.use_case,
            sensitivity: &req.sensitivity,
            ttl: req.ttl,
        };
        let decision = match policy::decide(&setup.policies, &ask) {
            Ok(d) => d,
            Err(refusal) => {
                let why = format!("{}: {refusal}", refusal.code());
                self.refused(caller, &task, why).await;
                return Err(TaskError::Refused(refusal));
            }
        };
        let ttl = decision.ttl;
        let expires_at_ms = ms(now) + i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX / 2);
        // Every issuer's own refusals first, before anything is minted
        // anywhere: a refusal then leaves no other issuer's credential
        // behind (one that cannot be ended early would outlive the task).
        // Then those whose credential can be ended early are issued first.
        let mut grants = Vec::new();
        let mut refusal = None;
        for (name, grant) in &decision.level.grants {
            let Some(issuer) = setup.issuers.get(name) else {
                let error = PluginError::new(
                    crate::model::ErrorKind::Invalid,
                    format!("issuer `{name}` is not configured"),
                );
                refusal = Some((name, error));
                break;
            };
            let req = IssueRequest {
                task: &task,
                grant,
                ttl,
                expires_at: system_time(expires_at_ms),
            };
            grants.push((name, issuer, req));
        }
        grants.sort_by_key(|(name, issuer, _)| (!issuer.ends_early(), *name));
        // Where each issuer mints now, recorded with the task: its
        // credential is revoked and verified there only.
        let mut origins: BTreeMap<&str, Option<String>> = BTreeMap::new();
        for (name, issuer, req) in &grants {
            if refusal.is_some() {
                break;
            }
            match issuer.precheck(req).await {
                Ok(()) => match issuer.origin().await {
                    Ok(origin) => {
                        origins.insert(name.as_str(), origin);
                    }
                    Err(error) => refusal = Some((name, error)),
                },
                Err(error) => refusal = Some((name, error)),
            }
        }
        if let Some((issuer_name, error)) = refusal {
            let why = format!("issuer_refused: issuer `{issuer_name}`: {error}");
            self.refused(caller, &task, why).await;
            return Err(TaskError::Unissuable {
                issuer: issuer_name.clone(),
                error,
            });
        }
        let row = TaskRow {
            task: task.clone(),
            policy: decision.policy.name.clone(),
            started_by: caller.described.clone(),
            started_at_ms: ms(now),
            expires_at_ms,
            state: TaskState::Starting,
            ended_at_ms: None,
            end_reason: None,
            dir: setup
                .task_root
                .as_ref()
                .map(|root| root.join(&task.agent).join(&task.task_id)),
            ended_by: None,
            items: decision
                .level
                .grants
                .keys()
                .map(|issuer| ItemRow {
                    issuer: issuer.clone(),
                    handle: None,
                    state: ItemState::Issuing,
                    expires_at_ms: None,
                    last_error: None,
                    origin: origins.get(issuer.as_str()).cloned().flatten(),
                })
                .collect(),
        };
        // Marked as starting here before it is in the store: the loop never
        // takes a start in progress for an abandoned one.
        let mut in_flight = InFlight::enter(self, &task.task_id);
        // Persisted (as `starting`) before anything is issued: a crash from
        // here on leaves a record that is ended as a failed start, and its
        // credentials revoked, at restart.
        self.store.insert(&row).await?;
        let ev = self.event(
            "task.started",
            Outcome::Ok,
            Some(caller),
            &task,
            serde_json::json!({"policy": row.policy, "ttl_s": ttl.as_secs()}),
        );
        self.recorder.record(ev).await;

        let mut issued: BTreeMap<String, Issued> = BTreeMap::new();
        for (i, (issuer_name, issuer, req)) in grants.iter().enumerate() {
            let issuer_name = *issuer_name;
            match issuer.issue(req).await {
                Ok(cred) => {
                    let until = cred
                        .expires_at
                        .duration_since(UNIX_EPOCH)
                        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
                        .unwrap_or(expires_at_ms);
                    // Minted, not recorded yet: revoked by task id at restart.
                    crate::rotation::crash_point("task.start.after_mint");
                    self.store
                        .set_item(
                            &task.task_id,
                            issuer_name,
                            ItemState::Issued,
                            Some(&cred.handle),
                            Some(until),
                            None,
                        )
                        .await?;
                    let ev = self.event(
                        "task.issued",
                        Outcome::Ok,
                        Some(caller),
                        &task,
                        serde_json::json!({"issuer": issuer_name, "handle": cred.handle}),
                    );
                    self.recorder.record(ev).await;
                    self.count_issued(issuer_name, true);
                    issued.insert(issuer_name.clone(), cred);
                }
                Err(error) => {
                    let mut ev = self.event(
                        "task.issued",
                        Outcome::Failed,
                        Some(caller),
                        &task,
                        serde_json::json!({"issuer": issuer_name}),
                    );
                    ev.error = Some(error.to_string());
                    self.recorder.record(ev).await;
                    self.count_issued(issuer_name, false);
                    drop(issued);
                    // The issuers after this one were never called: nothing
                    // of theirs exists to wait for or revoke.
                    for (later, _, _) in &grants[i + 1..] {
                        self.store
                            .set_item(
                                &task.task_id,
                                later,
                                ItemState::Verified,
                                None,
                                None,
                                Some("never issued: the start failed before it"),
                            )
                            .await?;
                    }
                    in_flight.leave();
                    self.end_unstarted(&task.task_id, "start_failed").await;
                    return Err(TaskError::Issue {
                        task: task.task_id.clone(),
                        issuer: issuer_name.clone(),
                        error,
                    });
                }
            }
        }

        let owner = setup
            .agents
            .get(&caller.agent)
            .copied()
            .unwrap_or(AgentOwner {
                uid: None,
                gid: None,
            });
        let mut dir = None;
        let mut files: BTreeMap<String, PathBuf> = BTreeMap::new();
        if let Some(root) = &setup.task_root {
            match write_task_files(root, &task, owner, &issued) {
                Ok((d, f)) => {
                    dir = Some(d);
                    files = f;
                }
                Err(message) => {
                    drop(issued);
                    in_flight.leave();
                    self.end_unstarted(&task.task_id, "start_failed").await;
                    return Err(TaskError::Deliver {
                        task: task.task_id.clone(),
                        message,
                    });
                }
            }
        }
        // Every credential issued and delivered: the task is live.
        self.store
            .set_state(&task.task_id, TaskState::Live, None, None, ms(now))
            .await?;
        in_flight.leave();
        // Its TTL is the loop's business from now on (a pass that ran while
        // it started left it to its start, and is armed for later).
        self.wake_by(expires_at_ms);
        if !self.setup().agents.contains_key(&caller.agent) {
            // Decommissioned while it started: a decommission does not end
            // a start in progress, so it is ended here.
            drop(issued);
            self.end_unstarted(&task.task_id, "agent_retired").await;
            return Err(TaskError::AgentRetired(caller.agent.clone()));
        }
        let credentials = issued
            .into_iter()
            .map(|(name, c)| {
                let file = files.remove(&name);
                (
                    name,
                    Credential {
                        public: c.public,
                        secret: c.secret,
                        expires_at: c.expires_at,
                        file,
                    },
                )
            })
            .collect();
        let task = self
            .store
            .get(&task.task_id)?
            .ok_or_else(|| TaskError::NotFound(task.task_id.clone()))?;
        Ok(Started {
            task,
            credentials,
            dir,
        })
    }

    /// Ends `caller`'s task `id` now: revoked and verified before it returns
    /// when the systems answer; otherwise it stays `ending` and is retried.
    pub async fn end(&self, caller: &Caller, id: &str) -> Result<TaskRow, TaskError> {
        let row = self
            .store
            .get(id)?
            .ok_or_else(|| TaskError::NotFound(id.to_owned()))?;
        if row.task.agent != caller.agent {
            let mut ev = self.event(
                "task.end",
                Outcome::Refused,
                Some(caller),
                &row.task,
                serde_json::Value::Null,
            );
            ev.error = Some(format!("task {id} belongs to another agent"));
            ev.agent = AgentId::new(&caller.agent).ok();
            ev.tenant = None;
            self.recorder.record(ev).await;
            return Err(TaskError::NotYours(id.to_owned()));
        }
        // Who asked, with the peer's credentials, whatever happens next.
        let ev = self.event(
            "task.end",
            Outcome::Ok,
            Some(caller),
            &row.task,
            serde_json::json!({"state": name_of(&row.state)}),
        );
        self.recorder.record(ev).await;
        self.end_now(id, "end", Some(caller)).await;
        let row = self
            .store
            .get(id)?
            .ok_or_else(|| TaskError::NotFound(id.to_owned()))?;
        if row.state != TaskState::Ended {
            self.retry_soon();
        }
        Ok(row)
    }

    /// Ends task `id`, whose start did not complete, for `reason`; what
    /// is not revoked yet is retried after the retry interval.
    async fn end_unstarted(&self, id: &str, reason: &str) {
        self.end_now(id, reason, None).await;
        let ended = matches!(self.store.get(id), Ok(Some(t)) if t.state == TaskState::Ended);
        if !ended {
            self.retry_soon();
        }
    }

    /// A task ended outside the loop is not ended yet (a revocation
    /// failed): the loop must try it again after the retry interval, not
    /// at the time it was armed for (the task's TTL, maybe hours away).
    fn retry_soon(&self) {
        let retry_ms = i64::try_from(self.retry.as_millis()).unwrap_or(5_000);
        self.wake_by(ms(self.clock.now()).saturating_add(retry_ms));
    }

    /// The loop must pass at `at_ms` (ms since the epoch): woken now if it
    /// is armed for later, so that its next pass arms it for `at_ms`.
    fn wake_by(&self, at_ms: i64) {
        if at_ms < self.armed_until_ms.load(Ordering::SeqCst) {
            self.wake.notify_one();
        }
    }

    /// `caller`'s tasks (live and ending, then the `recent` last ended).
    pub fn list(&self, agent: Option<&str>, recent: usize) -> Result<Vec<TaskRow>, TaskError> {
        Ok(self.store.list(agent, recent)?)
    }

    /// Ends every live task of `agent` (decommission), now.
    pub async fn end_all_of(&self, agent: &str, reason: &str) -> Result<usize, TaskError> {
        let tasks = self.store.list(Some(agent), 0)?;
        for t in &tasks {
            self.end_now(&t.task.task_id, reason, None).await;
        }
        if !self.store.list(Some(agent), 0)?.is_empty() {
            self.retry_soon();
        }
        Ok(tasks.len())
    }

    /// Moves task `id` towards ended: marks it ending (the first reason
    /// and ender stay: `ender`, the caller who asked, else `keyturn`),
    /// revokes and verifies each item not done, and marks it ended when all
    /// are. Errors are recorded on the item and retried by `tick`. A task
    /// whose start runs now is left to that start.
    async fn end_now(&self, id: &str, reason: &str, ender: Option<&Caller>) {
        let _busy = crate::group_commit::Busy::enter();
        let lock = {
            let mut m = self.ending.lock().unwrap_or_else(|p| p.into_inner());
            m.entry(id.to_owned()).or_default().clone()
        };
        let _guard = lock.lock().await;
        let result = self.end_locked(id, reason, ender).await;
        drop(_guard);
        let mut m = self.ending.lock().unwrap_or_else(|p| p.into_inner());
        if Arc::strong_count(&lock) <= 2 {
            m.remove(id);
        }
        if let Err(e) = result {
            tracing::error!(task = id, "ending the task: {e}");
        }
    }

    async fn end_locked(
        &self,
        id: &str,
        reason: &str,
        ender: Option<&Caller>,
    ) -> Result<(), StoreError> {
        let Some(row) = self.store.get(id)? else {
            return Ok(());
        };
        if row.state == TaskState::Ended || self.is_starting(id) {
            return Ok(());
        }
        let now = self.clock.now();
        // A start that did not complete ends as such, whoever ends it.
        let reason = match row.state {
            TaskState::Starting => "start_failed",
            _ => row.end_reason.as_deref().unwrap_or(reason),
        };
        let by = row
            .ended_by
            .clone()
            .unwrap_or_else(|| ender.map_or_else(|| "keyturn".to_owned(), |c| c.described.clone()));
        if matches!(row.state, TaskState::Starting | TaskState::Live) {
            self.store
                .set_state(id, TaskState::Ending, Some(reason), Some(&by), ms(now))
                .await?;
        }
        // Every record of the end says why and who asked.
        let end = |name: &str, outcome: Outcome, extra: serde_json::Value| {
            let mut extra = match extra {
                serde_json::Value::Object(m) => m,
                _ => serde_json::Map::new(),
            };
            extra.insert("reason".into(), reason.into());
            extra.insert("ended_by".into(), by.as_str().into());
            self.event(name, outcome, ender, &row.task, extra.into())
        };
        let failed = |issuer: &str| {
            end(
                "task.revoke_failed",
                Outcome::Failed,
                serde_json::json!({"issuer": issuer}),
            )
        };
        let setup = self.setup();
        let mut all_done = true;
        for item in &row.items {
            if item.state.is_done(item.expires_at_ms, ms(now)) {
                continue;
            }
            let Some(issuer) = setup.issuers.get(&item.issuer) else {
                all_done = false;
                self.store
                    .item_error(
                        id,
                        &item.issuer,
                        "the issuer is no longer configured; add it back to revoke",
                    )
                    .await?;
                continue;
            };
            let mut state = item.state;
            if state == ItemState::Expiring {
                // Not past the expiry its system enforces yet.
                all_done = false;
                continue;
            }
            // Only the system that minted it can say it is revoked.
            if let Err(e) = moved(issuer.as_ref(), &item.issuer, item).await {
                all_done = false;
                self.revoke_failed(&row.task, &item.issuer, &e, failed(&item.issuer))
                    .await?;
                continue;
            }
            if matches!(state, ItemState::Issuing | ItemState::Issued) {
                match issuer.revoke(&row.task, item.handle.as_deref()).await {
                    Ok(Revoked::Now) => {
                        state = ItemState::Revoked;
                        self.store
                            .set_item(id, &item.issuer, state, None, None, None)
                            .await?;
                    }
                    Ok(Revoked::ExpiresAt(t)) => {
                        let t = DateTime::<Utc>::from(t);
                        state = ItemState::Expiring;
                        self.store
                            .set_item(
                                id,
                                &item.issuer,
                                state,
                                None,
                                Some(ms(t)),
                                Some("the system cannot end it early; it expires by itself"),
                            )
                            .await?;
                        // Not revoked: it keeps working until then.
                        let ev = end(
                            "task.expiring",
                            Outcome::Ok,
                            serde_json::json!({"issuer": item.issuer, "expires_at": t.to_rfc3339()}),
                        );
                        self.recorder.record(ev).await;
                        self.count_revocation(&item.issuer, TaskRevocation::Expires);
                        if ms(t) > ms(now) {
                            all_done = false;
                        }
                        continue;
                    }
                    Err(e) => {
                        all_done = false;
                        self.revoke_failed(
                            &row.task,
                            &item.issuer,
                            &e.to_string(),
                            failed(&item.issuer),
                        )
                        .await?;
                        continue;
                    }
                }
            }
            if state == ItemState::Revoked {
                match issuer
                    .verify_revoked(&row.task, item.handle.as_deref())
                    .await
                {
                    Ok(true) => {
                        // Asked again: the issuer may have moved while it
                        // looked (a postgres admin DSN file is read at
                        // every step).
                        if let Err(e) = moved(issuer.as_ref(), &item.issuer, item).await {
                            all_done = false;
                            self.revoke_failed(&row.task, &item.issuer, &e, failed(&item.issuer))
                                .await?;
                            continue;
                        }
                        self.store
                            .set_item(id, &item.issuer, ItemState::Verified, None, None, None)
                            .await?;
                        let ev = end(
                            "task.revoked",
                            Outcome::Ok,
                            serde_json::json!({"issuer": item.issuer, "verified": true}),
                        );
                        self.recorder.record(ev).await;
                        self.count_revocation(&item.issuer, TaskRevocation::Verified);
                    }
                    Ok(false) => {
                        all_done = false;
                        self.count_revocation(&item.issuer, TaskRevocation::Failed);
                        // Revoked but still accepted: revoke again next time.
                        self.store
                            .set_item(
                                id,
                                &item.issuer,
                                ItemState::Issued,
                                None,
                                None,
                                Some("revoked, but the system still accepts it"),
                            )
                            .await?;
                    }
                    Err(e) => {
                        all_done = false;
                        self.store
                            .item_error(id, &item.issuer, &e.to_string())
                            .await?;
                        self.count_revocation(&item.issuer, TaskRevocation::Failed);
                    }
                }
            }
        }
        if !all_done {
            return Ok(());
        }
        // Where its files were written, whatever `task_root` says now (a
        // task recorded before keyturn kept that: the current root).
        let dir = row.dir.clone().or_else(|| {
            setup
                .task_root
                .as_ref()
                .map(|root| root.join(&row.task.agent).join(&row.task.task_id))
        });
        if let Some(dir) = &dir
            && let Err(e) = remove_task_dir(dir, &row.task)
        {
            tracing::warn!(task = id, "removing the task's directory: {e}");
            return Ok(());
        }
        self.store
            .set_state(
                id,
                TaskState::Ended,
                Some(reason),
                Some(&by),
                ms(self.clock.now()),
            )
            .await?;
        let ev = end("task.ended", Outcome::Ok, serde_json::Value::Null);
        self.recorder.record(ev).await;
        self.ended.send_modify(|n| *n = n.wrapping_add(1));
        Ok(())
    }

    /// A revocation attempt of `issuer`'s credential of `task` failed with
    /// `error`: recorded on the item, audited, counted; retried later.
    async fn revoke_failed(
        &self,
        task: &TaskAttribution,
        issuer: &str,
        error: &str,
        mut ev: AuditEvent,
    ) -> Result<(), StoreError> {
        self.store.item_error(&task.task_id, issuer, error).await?;
        ev.error = Some(error.to_owned());
        self.recorder.record(ev).await;
        self.count_revocation(issuer, TaskRevocation::Failed);
        Ok(())
    }

    /// What would keep the credentials of tasks not ended from being
    /// revoked under `setup` (a new config): one line per credential whose
    /// issuer is gone or now reaches another system than the one that
    /// minted it. For the reload's warning and `keyturn check`.
    pub async fn stranded_by(&self, setup: &TaskSetup) -> Result<Vec<String>, TaskError> {
        Ok(stranded(
            &self.store.list(None, 0)?,
            &setup.issuers,
            ms(self.clock.now()),
        )
        .await)
    }

    /// One pass: ends every live task past its TTL, pushes every ending one
    /// forward. Returns how long until the next pass is due.
    pub async fn tick(&self) -> Result<Duration, TaskError> {
        let now = ms(self.clock.now());
        let open = self.store.list(None, 0)?;
        let setup = self.setup();
        let mut next: Option<i64> = None;
        let retry_ms = i64::try_from(self.retry.as_millis()).unwrap_or(5_000);
        for listed in open {
            let id = &listed.task.task_id;
            // Its start runs now: that start makes it live (and wakes the
            // loop for its TTL) or ends it.
            if self.is_starting(id) {
                continue;
            }
            // Read again, after the check above: the list is as it was
            // when the pass began, and a start may have completed since
            // (a task listed `starting` is live now, not a failed start).
            let Some(t) = self.store.get(id)? else {
                continue;
            };
            if t.state == TaskState::Ended {
                continue;
            }
            if t.state != TaskState::Live || t.expires_at_ms <= now {
                let ending_now = self
                    .ending
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .contains_key(&t.task.task_id);
                if ending_now {
                    // A caller is ending it now; look again after the
                    // retry interval in case that attempt fails.
                    let at = now + retry_ms;
                    next = Some(next.map_or(at, |n| n.min(at)));
                    continue;
                }
            }
            match t.state {
                // A start that never completed (a crash, or abandoned): its
                // caller holds nothing, and what was issued is revoked.
                TaskState::Starting => self.end_now(&t.task.task_id, "start_failed", None).await,
                // Left live half-issued by a keyturn without `starting`.
                TaskState::Live if t.items.iter().any(|i| i.state == ItemState::Issuing) => {
                    self.end_now(&t.task.task_id, "start_failed", None).await
                }
                // Decommissioned, or gone from the config: its tasks end.
                TaskState::Live if !setup.agents.contains_key(&t.task.agent) => {
                    self.end_now(&t.task.task_id, "agent_retired", None).await
                }
                TaskState::Live if t.expires_at_ms <= now => {
                    self.end_now(&t.task.task_id, "ttl", None).await
                }
                TaskState::Live => {
                    next = Some(next.map_or(t.expires_at_ms, |n| n.min(t.expires_at_ms)));
                    continue;
                }
                _ => self.end_now(&t.task.task_id, "end", None).await,
            }
            // Still not ended: again after the retry interval (or when an
            // item's own expiry passes, if sooner).
            if let Some(after) = self.store.get(&t.task.task_id)?
                && after.state != TaskState::Ended
            {
                let retry_at = now + retry_ms;
                let expiring = after
                    .items
                    .iter()
                    .filter(|i| i.state == ItemState::Expiring)
                    .filter_map(|i| i.expires_at_ms)
                    .filter(|&e| e > now)
                    .min()
                    .unwrap_or(retry_at);
                let at = retry_at.min(expiring.max(now + 1));
                next = Some(next.map_or(at, |n| n.min(at)));
            }
        }
        let now = ms(self.clock.now());
        Ok(match next {
            Some(at) => Duration::from_millis(u64::try_from(at - now).unwrap_or(0)),
            None => Duration::from_secs(3600),
        })
    }

    /// Runs [`tick`](Self::tick) until `cancel`, waking early when a task
    /// starts or the setup changes.
    pub async fn run(self: Arc<Self>, cancel: tokio_util::sync::CancellationToken) {
        loop {
            // While the tick runs every start wakes the loop again (a task
            // inserted after the tick listed the open ones would be missed).
            self.armed_until_ms.store(i64::MAX, Ordering::SeqCst);
            let wait = match self.tick().await {
                Ok(d) => d,
                Err(e) => {
                    tracing::error!("tasks: {e}");
                    self.retry
                }
            };
            let due = ms(self.clock.now())
                .saturating_add(i64::try_from(wait.as_millis()).unwrap_or(i64::MAX));
            self.armed_until_ms.store(due, Ordering::SeqCst);
            tokio::select! {
                () = cancel.cancelled() => return,
                () = tokio::time::sleep(wait) => {}
                () = self.wake.notified() => {}
            }
        }
    }
}

/// `Err` with what to do when `issuer` (configured as `name`) no longer
/// reaches the system recorded as `item`'s origin: a credential another
/// system does not know of is not revoked there, so keyturn neither revokes
/// nor verifies it until the issuer points back. Items recorded without an
/// origin are not checked.
async fn moved(issuer: &dyn TaskIssuer, name: &str, item: &ItemRow) -> Result<(), String> {
    let Some(minted_at) = &item.origin else {
        return Ok(());
    };
    let now = match issuer.origin().await {
        Ok(Some(now)) if &now == minted_at => return Ok(()),
        Ok(Some(now)) => format!("now reaches {now}"),
        Ok(None) => "now names no system it reaches (another issuer type?)".to_owned(),
        Err(e) => format!("cannot say which system it reaches now ({e})"),
    };
    Err(format!(
        "issued at {minted_at}, but issuer `{name}` {now}: keyturn revokes and verifies a \
         credential only at the system that minted it (one unknown elsewhere is not revoked). \
         Point [issuers.{name}] back at {minted_at} until the tasks it issued there have ended, \
         then move it; or end the tasks before moving an issuer"
    ))
}

/// One line per credential of `tasks` (those not ended) that `issuers`
/// cannot revoke: its issuer is gone, or now reaches another system than
/// the one that minted it ([`moved`]).
pub async fn stranded(
    tasks: &[TaskRow],
    issuers: &BTreeMap<String, Arc<dyn TaskIssuer>>,
    now_ms: i64,
) -> Vec<String> {
    let mut out = Vec::new();
    for t in tasks.iter().filter(|t| t.state != TaskState::Ended) {
        for item in &t.items {
            if item.state.is_done(item.expires_at_ms, now_ms) {
                continue;
            }
            let problem = match issuers.get(&item.issuer) {
                None => Some(format!(
                    "issuer `{}` is no longer configured; add it back to revoke",
                    item.issuer
                )),
                Some(issuer) => moved(issuer.as_ref(), &item.issuer, item).await.err(),
            };
            if let Some(problem) = problem {
                out.push(format!(
                    "task {} of agent {} ({}): {problem}",
                    t.task.task_id,
                    t.task.agent,
                    serde_json::to_value(t.state)
                        .ok()
                        .and_then(|v| v.as_str().map(str::to_owned))
                        .unwrap_or_default()
                ));
            }
        }
    }
    out
}

impl TaskManager {
    /// Whether task `id`'s start runs in this process now.
    fn is_starting(&self, id: &str) -> bool {
        self.starting
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(id)
    }
}

/// A task's start in progress, in [`TaskManager::starting`] until it
/// leaves (the start completed, or failed and ends the task itself) or is
/// dropped (the start was abandoned half-way: the loop then ends the task
/// as a failed start).
struct InFlight<'a> {
    manager: &'a TaskManager,
    id: String,
    left: bool,
}

impl<'a> InFlight<'a> {
    fn enter(manager: &'a TaskManager, id: &str) -> Self {
        manager
            .starting
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id.to_owned());
        InFlight {
            manager,
            id: id.to_owned(),
            left: false,
        }
    }

    fn leave(&mut self) {
        if !self.left {
            self.left = true;
            self.manager
                .starting
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&self.id);
        }
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        if !self.left {
            self.leave();
            self.manager.wake.notify_one();
        }
    }
}

/// The snake_case name serde gives a state (`live`, `issuing`, ...).
fn name_of(state: &impl serde::Serialize) -> String {
    serde_json::to_value(state)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}

/// 24 lowercase hex digits: unique, and safe in a role name, an STS session
/// name, a file name and a URL.
fn new_task_id() -> String {
    hex::encode(rand::random::<[u8; 12]>())
}

/// Writes each issuer's credential as `<root>/<agent>/<task id>/<issuer>.json`
/// (the directory 0700 and the files 0400, owned by the agent; `<agent>`
/// 0750 root-owned with the agent's group, so the agent cannot plant
/// anything in it). Returns the directory and each file.
fn write_task_files(
    root: &Path,
    task: &TaskAttribution,
    owner: AgentOwner,
    issued: &BTreeMap<String, Issued>,
) -> Result<(PathBuf, BTreeMap<String, PathBuf>), String> {
    use std::io::Write;
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
    let agent_dir = root.join(&task.agent);
    crate::private_file::create_shared_dir(&agent_dir, 0o750, owner.gid)
        .map_err(|e| format!("{}: {e}", agent_dir.display()))?;
    let meta = std::fs::symlink_metadata(&agent_dir)
        .map_err(|e| format!("{}: {e}", agent_dir.display()))?;
    if !meta.is_dir()
        || std::os::unix::fs::MetadataExt::uid(&meta) != nix::unistd::geteuid().as_raw()
    {
        return Err(format!(
            "{} is not a directory owned by keyturn's user; remove it and keyturn recreates it",
            agent_dir.display()
        ));
    }
    let dir = agent_dir.join(&task.task_id);
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&dir)
        .map_err(|e| format!("{}: {e}", dir.display()))?;
    let chown = |p: &Path| -> Result<(), String> {
        if owner.uid.is_some() || owner.gid.is_some() {
            std::os::unix::fs::lchown(p, owner.uid, owner.gid)
                .map_err(|e| format!("{}: {e}", p.display()))?;
        }
        Ok(())
    };
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
        .map_err(|e| e.to_string())?;
    chown(&dir)?;
    let mut files = BTreeMap::new();
    for (issuer, cred) in issued {
        let path = dir.join(format!("{issuer}.json"));
        let mut doc = serde_json::Map::new();
        for (k, v) in &cred.public {
            doc.insert(k.clone(), v.clone().into());
        }
        doc.insert("task".into(), task.task_id.clone().into());
        doc.insert(
            "expires_at".into(),
            DateTime::<Utc>::from(cred.expires_at).to_rfc3339().into(),
        );
        for (k, v) in &cred.secret {
            let s = v
                .expose_str()
                .ok_or_else(|| format!("{issuer}: field {k} is not UTF-8"))?;
            doc.insert(k.clone(), s.into());
        }
        let bytes = zeroize::Zeroizing::new(serde_json::to_vec(&doc).map_err(|e| e.to_string())?);
        // Clear the map's copies of the secrets too.
        for v in doc.values_mut() {
            if let serde_json::Value::String(s) = v {
                zeroize::Zeroize::zeroize(s);
            }
        }
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o400)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        if owner.uid.is_some() || owner.gid.is_some() {
            std::os::unix::fs::fchown(&f, owner.uid, owner.gid)
                .map_err(|e| format!("{}: {e}", path.display()))?;
        }
        f.write_all(&bytes)
            .and_then(|()| f.sync_all())
            .map_err(|e| format!("{}: {e}", path.display()))?;
        files.insert(issuer.clone(), path);
    }
    if let Ok(d) = std::fs::File::open(&dir) {
        let _ = d.sync_all();
    }
    Ok((dir, files))
}

/// Removes a task's directory `dir` (as recorded with the task) and the
/// files keyturn wrote in it. The path comes from keyturn's state: it must
/// be `<some root>/<agent>/<task id>` with the agent's directory keyturn's
/// own (as [`write_task_files`] made it), so that an altered store cannot
/// make keyturn remove anything else.
fn remove_task_dir(dir: &Path, task: &TaskAttribution) -> Result<(), String> {
    let agent_dir = dir
        .parent()
        .filter(|_| dir.is_absolute() && dir.file_name() == Some(task.task_id.as_ref()))
        .filter(|a| a.file_name() == Some(task.agent.as_ref()))
        .ok_or_else(|| {
            format!(
                "{} is not <task_root>/{}/{}: not removed",
                dir.display(),
                task.agent,
                task.task_id
            )
        })?;
    let not_found = |e: &std::io::Error| e.kind() == std::io::ErrorKind::NotFound;
    match std::fs::symlink_metadata(agent_dir) {
        Err(e) if not_found(&e) => return Ok(()),
        Err(e) => return Err(format!("{}: {e}", agent_dir.display())),
        Ok(m)
            if !m.is_dir()
                || std::os::unix::fs::MetadataExt::uid(&m) != nix::unistd::geteuid().as_raw() =>
        {
            return Err(format!(
                "{} is not a directory owned by keyturn's user: {} not removed",
                agent_dir.display(),
                dir.display()
            ));
        }
        Ok(_) => {}
    }
    match std::fs::symlink_metadata(dir) {
        Err(e) if not_found(&e) => return Ok(()),
        Err(e) => return Err(format!("{}: {e}", dir.display())),
        Ok(m) if !m.is_dir() => return Err(format!("{} is not a directory", dir.display())),
        Ok(_) => {}
    }
    std::fs::remove_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))
}

#[cfg(test)]
mod tests;
