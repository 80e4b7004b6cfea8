//! The answers to the daemon's socket requests: status, rotate, ack,
//! tasks, decommission, the identity surface (the token exchange is in
//! `oauth.rs`).

use std::sync::Arc;
use std::time::Duration;

use crate::api::protocol::{
    AckResult, AgentLifecycle, ApiError, ApiErrorKind, DecommissionResult, RotateOutcome,
    RotateResult, Selector, StatusRow,
};
use crate::api::socket::{self, ControlHandler, PeerCred};
use crate::audit::{Actor, AuditEvent, Outcome};
use crate::model::{AgentId, CredentialKey};
use crate::revocation::{Decision, DecommissionError, Revocations};
use crate::rotation::{AckError, Engine};
use async_trait::async_trait;

/// Answers control-socket requests from the engine.
pub(super) struct Handler {
    pub(super) engine: Engine,
    pub(super) revocations: Revocations,
    pub(super) tasks: Arc<crate::tasks::manager::TaskManager>,
    /// The token service, when `[token_service]` and `listen` are
    /// configured (swapped on reload).
    pub(super) oauth: Arc<crate::oauth::service::Slot>,
    /// Socket exchanges are counted with the listener's token requests.
    pub(super) metrics: Arc<crate::telemetry::Metrics>,
    /// How many refusals each uid has had audited lately.
    pub(super) refusals: Arc<super::refusals::Refusals>,
}

impl Handler {
    /// Audits a refusal `ev` of `peer`, at most
    /// [`crate::api::refusals::AUDITED_PER_WINDOW`] per uid and event in each
    /// window; the rest are counted and summarized in one record when the
    /// window ends. True when this one was audited (log it then).
    /// An acknowledgement from an allowed peer that was not taken (a stale
    /// or unknown version, a credential not configured, a delivery still
    /// going on): audited as `ack.refused`, rate-limited like every refusal
    /// (an agent retrying in a loop does not bury the log), so that an
    /// agent stuck on an old version shows in the audit log and not only in
    /// its own logs.
    async fn ack_not_taken(
        &self,
        peer: PeerCred,
        key: &CredentialKey,
        version: u64,
        err: ApiError,
    ) -> ApiError {
        let mut ev = AuditEvent::new("ack.refused", peer.actor(), Outcome::Refused);
        ev.agent = Some(key.agent.clone());
        ev.credential = Some(key.credential.clone());
        ev.version = Some(version);
        ev.error = Some(err.message.clone());
        if self.record_refusal(peer, "ack.refused", ev).await {
            tracing::info!(uid = peer.uid, pid = peer.pid, credential = %key, version, error = %err.message, "ack not taken");
        }
        err
    }

    pub(super) async fn record_refusal(
        &self,
        peer: PeerCred,
        event: &'static str,
        ev: AuditEvent,
    ) -> bool {
        super::refusals::audit(&self.refusals, &self.engine, peer.uid, event, ev).await
    }

    /// The agent a task request is for: `as_agent` when the peer is
    /// privileged (audited as acting for it) or is that agent's own uid;
    /// else the one agent configured with the peer's uid.
    pub(super) fn task_caller(
        &self,
        peer: PeerCred,
        privileged: bool,
        as_agent: Option<&AgentId>,
    ) -> Result<crate::tasks::manager::Caller, ApiError> {
        let catalog = self.engine.catalog();
        let agents = &catalog.config.agents;
        let caller = |agent: &AgentId, described: String| crate::tasks::manager::Caller {
            agent: agent.to_string(),
            actor: peer.actor(),
            described,
        };
        if let Some(a) = as_agent {
            let cfg = agents.get(a);
            if cfg.is_some_and(|cfg| cfg.uid == Some(peer.uid)) {
                return Ok(caller(a, format!("uid={}", peer.uid)));
            }
            if privileged {
                if cfg.is_none() {
                    return Err(ApiError::not_found(format!(
                        "no agent \"{a}\" in the config (see `keyturn status`)"
                    )));
                }
                return Ok(caller(a, format!("uid={} as {a}", peer.uid)));
            }
            // The same answer whether the agent exists or not: a local
            // user does not learn the agents' names by asking.
            return Err(ApiError::forbidden(format!(
                "uid {} may not act for agent {a}: only the agent's own uid, root or the control socket's group may",
                peer.uid
            )));
        }
        let mine: Vec<&AgentId> = agents
            .iter()
            .filter(|(_, a)| a.uid == Some(peer.uid))
            .map(|(id, _)| id)
            .collect();
        match mine.as_slice() {
            [one] => Ok(caller(one, format!("uid={}", peer.uid))),
            [] => Err(ApiError::forbidden(format!(
                "uid {} is not the uid of any configured agent; an agent calls as itself (its `uid` in the config), an operator names one with `--as AGENT` (`as` in the request)",
                peer.uid
            ))),
            many => Err(ApiError::bad_request(format!(
                "uid {} is the uid of several agents ({}); name one with `--as AGENT` (`as` in the request)",
                peer.uid,
                many.iter()
                    .map(|a| a.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))),
        }
    }
}

impl Handler {
    /// The agent a task request with a JWT assertion is for (`crate::auth`):
    /// the assertion's, checked against the current and previous public
    /// keys of that agent's `auth_key`, its `jti` spent in the task store.
    /// Refused with `as` (one way to name the agent per request), and when
    /// the peer's uid is another agent's (that agent must not be able to
    /// act as this one by holding its token). The error goes with the
    /// agent to put in the refusal's audit record, when known.
    async fn assertion_caller(
        &self,
        peer: PeerCred,
        as_agent: Option<&AgentId>,
        token: &crate::api::protocol::WireSecret,
    ) -> Result<crate::tasks::manager::Caller, (ApiError, Option<AgentId>)> {
        use crate::auth::Verifier;
        if as_agent.is_some() {
            return Err((
                ApiError::bad_request(
                    "`as` and `assertion` together: an assertion already names its agent; send one of them",
                ),
                as_agent.cloned(),
            ));
        }
        let Some(token) = token.0.expose_str() else {
            return Err((ApiError::forbidden("the assertion is not UTF-8 text"), None));
        };
        let catalog = self.engine.catalog();
        let config = &catalog.config;
        let verifier = Verifier::new(config.daemon.assertion_audience.clone());
        let refused = |e: crate::auth::AssertionError, agent: Option<AgentId>| {
            (ApiError::forbidden(e.to_string()), agent)
        };
        let claimed = verifier
            .claimed_agent(token)
            .map_err(|e| refused(e, None))?;
        let Some((agent, cfg)) = AgentId::new(&claimed.agent)
            .ok()
            .and_then(|id| config.agents.get_key_value(&id))
        else {
            return Err((
                ApiError::forbidden(format!(
                    "the assertion's iss {:?} is not a configured agent",
                    claimed.agent.chars().take(64).collect::<String>()
                )),
                None,
            ));
        };
        let agent = agent.clone();
        let deny = |message: String| (ApiError::forbidden(message), Some(agent.clone()));
        if cfg.uid != Some(peer.uid)
            && let Some((other, _)) = config
                .agents
                .iter()
                .find(|(id, a)| **id != agent && a.uid == Some(peer.uid))
        {
            return Err(deny(format!(
                "uid {} is agent {other}'s: it may not present an assertion of agent {agent}",
                peer.uid
            )));
        }
        let keys = auth_keys(&self.engine, &self.revocations, &agent, cfg)
            .await
            .map_err(|e| match e {
                AuthKeysError::NoAuthKey(m) => deny(format!("{m} by assertion")),
                AuthKeysError::Decommissioned(m) => deny(m),
                AuthKeysError::Unreadable(m) => (ApiError::unavailable(m), Some(agent.clone())),
            })?;
        let verified = verifier
            .verify(token, &claimed, &keys, self.tasks.store())
            .map_err(|e| deny(e.to_string()))?;
        Ok(crate::tasks::manager::Caller {
            agent: agent.to_string(),
            actor: peer.actor(),
            described: format!(
                "assertion {agent} (key v{}, jti {}) from uid={}",
                verified.key_version,
                verified.jti.chars().take(64).collect::<String>(),
                peer.uid
            ),
        })
    }
}

/// Why an agent has no keys to check its assertions with.
pub(super) enum AuthKeysError {
    /// No `auth_key` in its config (the message says what to set).
    NoAuthKey(String),
    /// State cannot be read now.
    Unreadable(String),
    /// It is decommissioned (or being so, or the config declares it so):
    /// its keys are revoked, whatever state still holds of them.
    Decommissioned(String),
}

impl AuthKeysError {
    pub(super) fn message(self) -> String {
        match self {
            AuthKeysError::NoAuthKey(m)
            | AuthKeysError::Unreadable(m)
            | AuthKeysError::Decommissioned(m) => m,
        }
    }
}

/// The public keys `agent`'s assertions are checked against: the accepted
/// versions (current and previous) of its `auth_key` credential, from state;
/// none once a decommission of the agent is decided.
pub(super) async fn auth_keys(
    engine: &Engine,
    revocations: &crate::revocation::Revocations,
    agent: &AgentId,
    cfg: &crate::config::AgentConfig,
) -> Result<Vec<crate::auth::AgentKey>, AuthKeysError> {
    // A decommission the config dates in the future is not one yet.
    let declared = cfg
        .decommissioned
        .as_ref()
        .is_some_and(|d| d.in_effect(engine.now()));
    if declared || revocations.get(agent).is_some() {
        return Err(AuthKeysError::Decommissioned(format!(
            "agent {agent} is decommissioned: its keys are revoked"
        )));
    }
    let Some(auth_key) = cfg.auth_key.clone() else {
        return Err(AuthKeysError::NoAuthKey(format!(
            "agent {agent} has no `auth_key` in the config: set auth_key to one of its ed25519 credentials to let it authenticate"
        )));
    };
    let key = CredentialKey::new(agent.clone(), auth_key);
    let versions = engine
        .load(move |s| s.versions(&key))
        .await
        .map_err(|e| AuthKeysError::Unreadable(format!("cannot read the agent's keys: {e}")))?;
    Ok(crate::auth::AgentKey::accepted(&versions))
}

impl Handler {
    fn select(&self, selector: &Selector) -> Result<Vec<CredentialKey>, ApiError> {
        let catalog = self.engine.catalog();
        let mut keys: Vec<CredentialKey> = catalog
            .creds
            .keys()
            .filter(|k| match selector {
                Selector::All => true,
                Selector::Agent(a) => &k.agent == a,
                Selector::Credential(c) => *k == c,
            })
            .cloned()
            .collect();
        keys.sort();
        if keys.is_empty() {
            let what = match selector {
                Selector::All => "no credentials are configured".to_string(),
                Selector::Agent(a) => {
                    format!("no agent \"{a}\" in the config (see `keyturn status`)")
                }
                Selector::Credential(c) => {
                    format!("no credential {c} in the config (see `keyturn status`)")
                }
            };
            return Err(ApiError {
                kind: ApiErrorKind::NotFound,
                message: what,
            });
        }
        Ok(keys)
    }
}

#[async_trait]
impl ControlHandler for Handler {
    async fn status(&self) -> Vec<StatusRow> {
        let mut rows = self.engine.status();
        self.revocations.show_revoked(&mut rows);
        rows
    }

    async fn rotate(
        &self,
        actor: Actor,
        selector: Selector,
        wait: bool,
    ) -> Result<Vec<RotateResult>, ApiError> {
        let keys = self.select(&selector)?;
        let catalog = self.engine.catalog();
        let followed = |k: &CredentialKey| {
            catalog
                .creds
                .get(k)
                .is_some_and(|e| e.policy.follow.is_some())
        };
        // Why each credential is not rotated here, if it is not.
        let not_here: Vec<Option<String>> = keys
            .iter()
            .map(|key| {
                if followed(key) {
                    Some("followed, rotated by another keyturn".to_owned())
                } else {
                    self.engine
                        .agent_label(&key.agent)
                        .map(|label| format!("the agent is {label}"))
                }
            })
            .collect();
        // Refused as a whole: one agent's credentials, and it is being
        // decommissioned; one credential, followed; none rotated here.
        let refusal = if let Some(label) =
            keys.first().and_then(|k| self.engine.agent_label(&k.agent))
            && keys.iter().all(|k| k.agent == keys[0].agent)
        {
            Some(ApiError::bad_request(format!(
                "agent {} is {label}: its credentials are not rotated any more (see `keyturn status`)",
                keys[0].agent
            )))
        } else if let [only] = keys.as_slice()
            && followed(only)
        {
            Some(ApiError::bad_request(format!(
                "{only} is followed (mode = \"follow\"), rotated by another keyturn: rotate it there"
            )))
        } else if not_here.iter().all(Option::is_some) {
            let why: std::collections::BTreeSet<&str> =
                not_here.iter().flatten().map(String::as_str).collect();
            Some(ApiError::bad_request(format!(
                "none of the {} selected credentials is rotated here ({}): see `keyturn status`",
                keys.len(),
                why.into_iter().collect::<Vec<_>>().join("; ")
            )))
        } else {
            None
        };
        // The request is audited before anything is done; a refusal as
        // refused.
        let outcome = if refusal.is_some() {
            Outcome::Refused
        } else {
            Outcome::Ok
        };
        let mut ev = AuditEvent::new("admin.rotate", actor, outcome);
        let skipped = not_here.iter().flatten().count();
        ev.detail = Some(format!(
            "{} credential(s) selected, {skipped} not rotated here, wait={wait}",
            keys.len()
        ));
        ev.error = refusal.as_ref().map(|e| e.message.clone());
        if let [only] = keys.as_slice() {
            ev.agent = Some(only.agent.clone());
            ev.credential = Some(only.credential.clone());
        } else if keys.iter().all(|k| k.agent == keys[0].agent) {
            ev.agent = Some(keys[0].agent.clone());
        }
        if let Err(e) = self.engine.record(ev).await {
            return Err(ApiError {
                kind: ApiErrorKind::Unavailable,
                message: format!("cannot write the audit record: {e}"),
            });
        }
        if let Some(refused) = refusal {
            return Err(refused);
        }
        let mut waiting = Vec::with_capacity(keys.len());
        let mut results = Vec::with_capacity(keys.len());
        for (key, why) in keys.into_iter().zip(not_here) {
            if let Some(why) = why {
                // Not rotated here: in a selection of several, not a failure.
                results.push(RotateResult {
                    agent: key.agent,
                    credential: key.credential,
                    rotation: None,
                    version: None,
                    outcome: RotateOutcome::Skipped,
                    error: Some(why),
                    note: None,
                });
                continue;
            }
            let running = self.engine.rotating(&key);
            let rx = self.engine.trigger(&key);
            waiting.push((key, rx, running));
        }
        for (key, rx, running) in waiting {
            let result = match rx {
                None => RotateResult {
                    agent: key.agent,
                    credential: key.credential,
                    rotation: None,
                    version: None,
                    outcome: RotateOutcome::Failed,
                    error: Some("removed from the config".into()),
                    note: None,
                },
                Some(_) if !wait => match running {
                    // Met by the rotation in flight: say so, not "started".
                    Some((rotation, version)) => RotateResult {
                        agent: key.agent,
                        credential: key.credential,
                        rotation: rotation.map(|r| r.to_string()),
                        version,
                        outcome: RotateOutcome::Joined,
                        error: None,
                        note: None,
                    },
                    None => RotateResult {
                        agent: key.agent,
                        credential: key.credential,
                        rotation: None,
                        version: None,
                        outcome: RotateOutcome::Started,
                        error: None,
                        note: None,
                    },
                },
                Some(rx) => match rx.await {
                    Ok(done) => RotateResult {
                        agent: key.agent,
                        credential: key.credential,
                        rotation: done.rotation.map(|r| r.to_string()),
                        version: done.version,
                        outcome: if done.error.is_none() {
                            RotateOutcome::Completed
                        } else {
                            RotateOutcome::Failed
                        },
                        error: done.error,
                        // Met by the rotation in flight, waited for: its
                        // outcome, and that it was not a new one.
                        note: running
                            .is_some()
                            .then(|| "joined the rotation already in flight".to_owned()),
                    },
                    Err(_) => RotateResult {
                        agent: key.agent,
                        credential: key.credential,
                        rotation: None,
                        version: None,
                        outcome: RotateOutcome::Failed,
                        error: Some("the daemon stopped before the rotation finished".into()),
                        note: None,
                    },
                },
            };
            results.push(result);
        }
        // A rotation completed while a delivery that does not hold it up
        // (a webhook) failed: it is retried in the background, and the
        // operator waiting is told, not left to find it in `status`.
        if results
            .iter()
            .any(|r| r.outcome == RotateOutcome::Completed)
        {
            let rows = self.engine.status();
            for r in results
                .iter_mut()
                .filter(|r| r.outcome == RotateOutcome::Completed)
            {
                let Some(row) = rows
                    .iter()
                    .find(|row| row.agent == r.agent && row.credential == r.credential)
                else {
                    continue;
                };
                let retrying: Vec<&str> = row
                    .awaiting_ack
                    .iter()
                    .filter_map(|c| c.strip_suffix(" (delivery retrying)"))
                    .collect();
                if !retrying.is_empty() {
                    let retried = format!(
                        "delivery to {} failed and is retried in the background (see `keyturn status`)",
                        retrying.join(", ")
                    );
                    r.note = Some(match r.note.take() {
                        Some(joined) => format!("{joined}; {retried}"),
                        None => retried,
                    });
                }
            }
        }
        // In the selection's order, the skipped among the others.
        results.sort_by(|a, b| (&a.agent, &a.credential).cmp(&(&b.agent, &b.credential)));
        Ok(results)
    }

    async fn task(
        &self,
        peer: PeerCred,
        privileged: bool,
        command: socket::TaskCommand,
    ) -> Result<crate::api::protocol::ResponseBody, ApiError> {
        use crate::api::protocol::{
            ResponseBody, TaskCredential, TaskStarted, TaskView, WireSecret,
        };
        use crate::tasks::manager::StartRequest;
        let (as_agent, assertion) = command.auth();
        let (as_agent, assertion) = (as_agent.cloned(), assertion.cloned());
        let by_assertion = assertion.is_some();
        let decided = match &assertion {
            Some(token) => self.assertion_caller(peer, as_agent.as_ref(), token).await,
            None => self
                .task_caller(peer, privileged, as_agent.as_ref())
                .map_err(|e| (e, as_agent.clone())),
        };
        let caller = match decided {
            Ok(c) => c,
            Err((e, agent)) => {
                // The reason only: the token itself never reaches the log.
                let mut ev = AuditEvent::new("task.refused", peer.actor(), Outcome::Refused);
                ev.agent = agent;
                ev.error = Some(e.message.clone());
                if by_assertion {
                    ev.detail = Some("authenticated by assertion".into());
                }
                self.record_refusal(peer, "task.refused", ev).await;
                return Err(e);
            }
        };
        let api_error = task_api_error;
        match command {
            socket::TaskCommand::Start { task, .. } => {
                let started = self
                    .tasks
                    .start(
                        &caller,
                        StartRequest {
                            tenant: task.tenant,
                            use_case: task.use_case,
                            run_id: task.run_id,
                            initiator: task.initiator,
                            sensitivity: task.sensitivity,
                            ttl: task.ttl_seconds.map(Duration::from_secs),
                        },
                    )
                    .await
                    .map_err(api_error)?;
                // With a task directory the secrets are in its files only.
                let in_files = started.dir.is_some();
                Ok(ResponseBody::TaskStarted(Box::new(TaskStarted {
                    task: TaskView::of(&started.task),
                    dir: started.dir.map(|d| d.display().to_string()),
                    credentials: started
                        .credentials
                        .into_iter()
                        .map(|(name, c)| {
                            (
                                name,
                                TaskCredential {
                                    public: c.public,
                                    secret: if in_files {
                                        Default::default()
                                    } else {
                                        c.secret
                                            .into_iter()
                                            .map(|(k, v)| (k, WireSecret(v)))
                                            .collect()
                                    },
                                    expires_at: c.expires_at.into(),
                                    file: c.file.map(|f| f.display().to_string()),
                                },
                            )
                        })
                        .collect(),
                })))
            }
            socket::TaskCommand::End { task, .. } => {
                let row = self.tasks.end(&caller, &task).await.map_err(api_error)?;
                Ok(ResponseBody::TaskEnded(Box::new(TaskView::of(&row))))
            }
            socket::TaskCommand::List { .. } => {
                let rows = self
                    .tasks
                    .list(Some(&caller.agent), 20)
                    .map_err(api_error)?;
                Ok(ResponseBody::Tasks(rows.iter().map(TaskView::of).collect()))
            }
        }
    }

    async fn ack(
        &self,
        peer: PeerCred,
        key: CredentialKey,
        version: u64,
    ) -> Result<AckResult, ApiError> {
        let catalog = self.engine.catalog();
        let agent_uid = catalog.config.agents.get(&key.agent).and_then(|a| a.uid);
        let allowed = peer.uid == 0
            || peer.uid == nix::unistd::geteuid().as_raw()
            || agent_uid == Some(peer.uid);
        if !allowed {
            // Said the same whether or not the agent exists: a peer that may
            // not ack learns nothing about the config.
            let reason = format!(
                "uid {} may not acknowledge {key}: only root, the daemon's user and the agent's configured uid may",
                peer.uid
            );
            let mut ev = AuditEvent::new("ack.refused", peer.actor(), Outcome::Refused);
            ev.agent = Some(key.agent.clone());
            ev.credential = Some(key.credential.clone());
            ev.version = Some(version);
            ev.error = Some(reason.clone());
            if self.record_refusal(peer, "ack.refused", ev).await {
                tracing::warn!(uid = peer.uid, pid = peer.pid, credential = %key, version, "refused ack");
            }
            return Err(ApiError::forbidden(reason));
        }
        if !catalog.creds.contains_key(&key) {
            let err = ApiError::not_found(format!(
                "no credential {key} in the config (see `keyturn status`)"
            ));
            return Err(self.ack_not_taken(peer, &key, version, err).await);
        }
        let err = match self.engine.ack(&key, version, peer.actor()).await {
            Ok(done) => {
                return Ok(AckResult {
                    agent: key.agent,
                    credential: key.credential,
                    version,
                    acknowledged: done.acknowledged,
                    awaiting: done.awaiting,
                    retiring: done.retiring,
                });
            }
            Err(e @ (AckError::Stale { .. } | AckError::NothingAwaited { .. })) => {
                ApiError::stale(e.to_string())
            }
            Err(e @ AckError::Delivering { .. }) => ApiError::unavailable(e.to_string()),
            Err(AckError::Internal(m)) => {
                ApiError::unavailable(format!("cannot record the acknowledgement: {m}"))
            }
        };
        Err(self.ack_not_taken(peer, &key, version, err).await)
    }

    async fn decommission(
        &self,
        actor: Actor,
        agent: AgentId,
        reason: String,
        by: Option<String>,
    ) -> Result<DecommissionResult, ApiError> {
        if let Some(problem) = crate::revocation::reason_problem(&reason, by.as_deref()) {
            return Err(ApiError::bad_request(problem));
        }
        let decision = Decision {
            agent: agent.clone(),
            reason: reason.trim().to_owned(),
            by: by.map(|b| b.trim().to_owned()).filter(|b| !b.is_empty()),
            actor,
            source: "command",
            decided_at: None,
        };
        // Once the decision is stored, no new task starts and the live ones
        // are ended, at once rather than when the decommission's `tasks`
        // item comes to them (black-box finding: ended before it, a kill -9
        // in between left the agent active with its tasks ended).
        // No task starts from here on; a start racing this is stored
        // before the decision or refused (`TaskManager::block_starts`).
        self.tasks.block_starts(agent.as_str());
        let decided = self.revocations.decide(decision).await;
        if decided.is_err() {
            self.tasks.unblock_starts(agent.as_str());
        }
        match decided {
            Ok((already, _)) => {
                self.tasks.retire_agent(agent.as_str());
                if let Err(e) = self.tasks.end_all_of(agent.as_str(), "decommission").await {
                    tracing::error!(agent = %agent, "ending the agent's tasks: {e}");
                }
                let row = self
                    .revocations
                    .lifecycle()
                    .into_iter()
                    .find(|l| l.agent == agent)
                    .ok_or_else(|| ApiError::internal("the decommission vanished"))?;
                Ok(DecommissionResult {
                    already,
                    agent: row,
                })
            }
            Err(DecommissionError::NotFound(m)) => Err(ApiError::not_found(m)),
            Err(DecommissionError::Unavailable(m)) => Err(ApiError::unavailable(m)),
        }
    }

    async fn agents(&self) -> Vec<AgentLifecycle> {
        self.revocations.lifecycle()
    }

    async fn token_exchange(
        &self,
        peer: PeerCred,
        privileged: bool,
        as_agent: Option<AgentId>,
        args: crate::api::protocol::TokenExchangeArgs,
    ) -> Result<crate::api::protocol::ResponseBody, ApiError> {
        self.exchange_token(peer, privileged, as_agent, args).await
    }

    async fn tasks(&self) -> Result<Vec<crate::api::protocol::TaskView>, ApiError> {
        let rows = self
            .tasks
            .list(None, 0)
            .map_err(|e| ApiError::unavailable(e.to_string()))?;
        Ok(rows
            .iter()
            .map(crate::api::protocol::TaskView::of)
            .collect())
    }

    async fn surface(&self, unused_after: Duration) -> Result<crate::surface::Surface, ApiError> {
        let (awaited, last) = self
            .engine
            .load(|s| Ok((s.snapshot()?.acks, s.last_acks()?)))
            .await
            .map_err(|e| ApiError::unavailable(format!("cannot read state: {e}")))?;
        let acks = crate::surface::acks(awaited, last);
        let facts = self.engine.surface_facts();
        let lifecycle = self.revocations.lifecycle();
        let catalog = self.engine.catalog();
        let mut surface = crate::surface::build(
            &facts,
            catalog.config.agents.values(),
            &lifecycle,
            &acks,
            unused_after,
            self.engine.now(),
        );
        crate::surface::add_unconfigured(&mut surface, self.engine.unconfigured_live(), &acks);
        let tasks = self
            .tasks
            .surface_tasks()
            .map_err(|e| ApiError::unavailable(e.to_string()))?;
        crate::surface::add_tasks(&mut surface, tasks, &|agent| {
            AgentId::new(agent)
                .ok()
                .and_then(|id| catalog.config.agents.get(&id))
                .map(|a| crate::surface::AgentInfo {
                    owner: a.owner.clone(),
                    tenant: a.tenant.clone(),
                    tier: a.tier.clone(),
                })
                .unwrap_or_default()
        });
        Ok(surface)
    }

    async fn refused(&self, peer: PeerCred, reason: String) -> bool {
        let mut ev = AuditEvent::new("admin.refused", peer.actor(), Outcome::Refused);
        ev.error = Some(reason);
        // Rate-limited like every refusal: a user in the socket's group (or
        // one the admin loosened its mode for) connecting in a loop does
        // not bury the log nor fill its volume (black-box finding).
        self.record_refusal(peer, "admin.refused", ev).await
    }
}

/// What a task command's error answers: a refusal (of the policy, or of an
/// issuer that cannot mint what was asked, such as a TTL under the STS
/// minimum, before calling its system) is `forbidden` (exit 77), as the
/// README says of every refusal of a task start.
pub(super) fn task_api_error(e: crate::tasks::manager::TaskError) -> ApiError {
    use crate::tasks::manager::TaskError;
    match e {
        TaskError::Refused(r) => ApiError::forbidden(r.to_string()),
        TaskError::AgentRetired(_) | TaskError::Unissuable { .. } => {
            ApiError::forbidden(e.to_string())
        }
        TaskError::Invalid { .. } => ApiError::bad_request(e.to_string()),
        TaskError::NotFound(_) | TaskError::NotYours(_) => ApiError::not_found(e.to_string()),
        TaskError::Issue { .. } | TaskError::Deliver { .. } => ApiError::failed(e.to_string()),
        TaskError::Store(_) => ApiError::internal(e.to_string()),
    }
}
