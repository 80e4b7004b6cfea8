//! Starting a task: the policy's decision, every issuer's own refusals,
//! the record persisted as `starting` before anything is issued, issuance
//! at each issuer the level grants, and the credential files; and
//! [`InFlight`], which marks a start as running in this process.

use super::*;

impl TaskManager {
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
        if !setup.agents.contains_key(&caller.agent) || self.starts_blocked(&caller.agent) {
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
        // What each issuer can name before it mints, recorded with the
        // task: a lost answer or a crash after the mint leaves revoke that.
        let before: BTreeMap<&str, String> = grants
            .iter()
            .filter_map(|(name, issuer, req)| {
                Some((name.as_str(), issuer.handle_before_issue(req)?))
            })
            .collect();
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
                    handle: before.get(issuer.as_str()).cloned(),
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
        // A decommission decided since the check above: stored now, this
        // task is one its `tasks` item waits for if it began before the
        // decision; after it, nothing is issued (black-box finding: tasks
        // raced past a decision were issued credentials after it, and the
        // item was recorded revoked before they existed).
        if self.starts_blocked(&caller.agent) {
            let all = grants.iter().map(|(name, _, _)| name.as_str());
            self.never_issued(&task.task_id, all, "the agent is being decommissioned")
                .await?;
            // Ending for the decommission, not as a failed start (the
            // reason a task still `starting` would be given).
            self.store
                .set_state(
                    &task.task_id,
                    TaskState::Ending,
                    Some("decommission"),
                    Some("keyturn"),
                    ms(self.clock.now()),
                )
                .await?;
            in_flight.leave();
            self.end_unstarted(&task.task_id, "decommission").await;
            let e = TaskError::AgentRetired(caller.agent.clone());
            return Err(e);
        }

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
                Err(IssueError {
                    error,
                    nothing_left,
                }) => {
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
                    // The issuer says its refused mint left nothing (the
                    // system refused it, or what it made is revoked): no
                    // credential to wait for, and the task ends at once.
                    if nothing_left {
                        let this = std::iter::once(issuer_name.as_str());
                        self.never_issued(&task.task_id, this, "the issue failed and left nothing")
                            .await?;
                    }
                    // The issuers after this one were never called: nothing
                    // of theirs exists to wait for or revoke.
                    let later = grants[i + 1..].iter().map(|(name, _, _)| name.as_str());
                    self.never_issued(&task.task_id, later, "the start failed before it")
                        .await?;
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
        let decommissioned = self.starts_blocked(&caller.agent);
        if decommissioned || !self.setup().agents.contains_key(&caller.agent) {
            // Decommissioned (or taken out of the config) while it started:
            // a decommission does not end a start in progress, so it is
            // ended here.
            drop(issued);
            let reason = if decommissioned {
                "decommission"
            } else {
                "agent_retired"
            };
            self.end_unstarted(&task.task_id, reason).await;
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

    /// Records the items of `issuers` of task `id` as done: nothing was
    /// issued there (`why`), so nothing is to revoke.
    async fn never_issued<'a>(
        &self,
        id: &str,
        issuers: impl Iterator<Item = &'a str>,
        why: &str,
    ) -> Result<(), TaskError> {
        let note = format!("never issued: {why}");
        for issuer in issuers {
            self.store
                .set_item(id, issuer, ItemState::Verified, None, None, Some(&note))
                .await?;
        }
        Ok(())
    }

    /// Whether task `id`'s start runs in this process now.
    pub(super) fn is_starting(&self, id: &str) -> bool {
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

/// 24 lowercase hex digits: unique, and safe in a role name, an STS session
/// name, a file name and a URL.
fn new_task_id() -> String {
    hex::encode(rand::random::<[u8; 12]>())
}
