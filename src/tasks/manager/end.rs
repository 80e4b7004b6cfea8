//! Ending a task: on a caller's request, at its TTL, when its start
//! failed or its agent is retired. Each credential is revoked and verified
//! at the system that minted it (never elsewhere: see [`moved`]), then the
//! task's directory is removed and the task is recorded as ended.

use super::*;

impl TaskManager {
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
        // Who asked, with the peer's credentials, whatever happens next:
        // recorded once the end is stored (black-box finding: recorded
        // first, a kill -9 before the store left a live task whose end the
        // audit log said was accepted).
        let ev = self.event(
            "task.end",
            Outcome::Ok,
            Some(caller),
            &row.task,
            serde_json::json!({"state": name_of(&row.state)}),
        );
        self.end_now_announced(id, "end", Some(caller), Some(ev))
            .await;
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
    pub(super) async fn end_unstarted(&self, id: &str, reason: &str) {
        self.end_now(id, reason, None).await;
        let ended = matches!(self.store.get(id), Ok(Some(t)) if t.state == TaskState::Ended);
        if !ended {
            self.retry_soon();
        }
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
    pub(super) async fn end_now(&self, id: &str, reason: &str, ender: Option<&Caller>) {
        self.end_now_announced(id, reason, ender, None).await
    }

    /// [`end_now`](Self::end_now), recording `announce` once the task is
    /// stored as ending (or found ended, or left to its start).
    async fn end_now_announced(
        &self,
        id: &str,
        reason: &str,
        ender: Option<&Caller>,
        mut announce: Option<AuditEvent>,
    ) {
        let _busy = crate::group_commit::Busy::enter();
        let lock = {
            let mut m = self.ending.lock().unwrap_or_else(|p| p.into_inner());
            m.entry(id.to_owned()).or_default().clone()
        };
        let _guard = lock.lock().await;
        let result = self.end_locked(id, reason, ender, &mut announce).await;
        drop(_guard);
        // Not recorded above (the store failed): the request still was.
        if let Some(ev) = announce {
            self.recorder.record(ev).await;
        }
        let mut m = self.ending.lock().unwrap_or_else(|p| p.into_inner());
        if Arc::strong_count(&lock) <= 2 {
            m.remove(id);
            drop(m);
            // Its end is recorded (`task.ended`) by now: a decommission
            // waiting for it, which does not count a task still in
            // `ending` (see [`TaskManager::end_in_progress`]), looks again.
            self.ended.send_modify(|n| *n = n.wrapping_add(1));
        } else {
            drop(m);
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
        announce: &mut Option<AuditEvent>,
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
        if let Some(ev) = announce.take() {
            self.recorder.record(ev).await;
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
            let mut state = item.state;
            if state == ItemState::Expiring {
                // Not past the expiry its system enforces yet (no issuer
                // is needed for that: nothing can end it earlier).
                all_done = false;
                continue;
            }
            let Some(issuer) = setup.issuers.get(&item.issuer) else {
                all_done = false;
                self.revoke_failed(
                    &row.task,
                    &item.issuer,
                    "the issuer is no longer configured; add it back to revoke",
                    failed(&item.issuer),
                )
                .await?;
                continue;
            };
            // Only the system that minted it can say it is revoked.
            if let Err(e) = moved(issuer.as_ref(), &item.issuer, item).await {
                // Black-box finding: a mint cut off by a crash (never
                // answered, so never given to the agent), then the issuer
                // pointed elsewhere, left the task `ending` and its agent's
                // decommission pending for good. Whatever that mint made
                // was issued to expire at the task's expiry: once that has
                // passed, nothing of it works, wherever the issuer points.
                if state == ItemState::Issuing && row.expires_at_ms <= ms(now) {
                    let expired = row.expires_at_ms;
                    let ev = end(
                        "task.expiring",
                        Outcome::Ok,
                        serde_json::json!({
                            "issuer": item.issuer,
                            "expires_at": DateTime::<Utc>::from(system_time(expired)).to_rfc3339(),
                            "note": "its mint never answered and the issuer reaches another system now; anything it made expired at the task's expiry",
                        }),
                    );
                    self.recorder.record(ev).await;
                    self.store
                        .set_item(
                            id,
                            &item.issuer,
                            ItemState::Expiring,
                            None,
                            Some(expired),
                            Some("its mint never answered; anything it made expired at the task's expiry (the issuer reaches another system now)"),
                        )
                        .await?;
                    self.count_revocation(&item.issuer, TaskRevocation::Expires);
                    continue;
                }
                all_done = false;
                self.revoke_failed(&row.task, &item.issuer, &e, failed(&item.issuer))
                    .await?;
                continue;
            }
            // What the revocation left at the system (see `Revoked::Left`).
            let mut left = None;
            if matches!(state, ItemState::Issuing | ItemState::Issued) {
                match issuer
                    .revoke(
                        &row.task,
                        item.handle.as_deref(),
                        system_time(row.expires_at_ms),
                    )
                    .await
                {
                    Ok(Revoked::Now) => {
                        state = ItemState::Revoked;
                        self.store
                            .set_item(id, &item.issuer, state, None, None, None)
                            .await?;
                    }
                    Ok(Revoked::Left(note)) => {
                        tracing::warn!(task = id, issuer = %item.issuer, "task credential revoked, but something of it is left at its system: {note}");
                        state = ItemState::Revoked;
                        self.store
                            .set_item(id, &item.issuer, state, None, None, Some(&note))
                            .await?;
                        left = Some(note);
                    }
                    Ok(Revoked::ExpiresAt(t)) => {
                        let t = DateTime::<Utc>::from(t);
                        state = ItemState::Expiring;
                        // Not revoked: it keeps working until then.
                        // Recorded before it is stored (as `task.revoked`).
                        let ev = end(
                            "task.expiring",
                            Outcome::Ok,
                            serde_json::json!({"issuer": item.issuer, "expires_at": t.to_rfc3339()}),
                        );
                        self.recorder.record(ev).await;
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
                        // Recorded before it is stored as verified: a kill
                        // -9 between the two verifies and records it again
                        // at the next start, rather than never (black-box
                        // finding: a gap in the audit log).
                        let mut detail =
                            serde_json::json!({"issuer": item.issuer, "verified": true});
                        if let Some(note) = &left {
                            detail["left"] = note.as_str().into();
                        }
                        let ev = end("task.revoked", Outcome::Ok, detail);
                        self.recorder.record(ev).await;
                        self.store
                            .set_item(
                                id,
                                &item.issuer,
                                ItemState::Verified,
                                None,
                                None,
                                left.as_deref(),
                            )
                            .await?;
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
        if let Ok(agent) = crate::model::AgentId::new(&row.task.agent) {
            for item in &row.items {
                self.quiet
                    .done(&agent, &format!("task {id}/{}", item.issuer));
            }
        }
        let ev = end("task.ended", Outcome::Ok, serde_json::Value::Null);
        self.recorder.record(ev).await;
        self.ended.send_modify(|n| *n = n.wrapping_add(1));
        Ok(())
    }

    /// A revocation attempt of `issuer`'s credential of `task` failed with
    /// `error`: recorded on the item, counted; retried later. Audited and
    /// logged when it is the item's first failure or its error changed,
    /// else once an hour with the count of the attempts in between (one
    /// record per attempt, every few seconds while a server is down,
    /// buried the audit log).
    async fn revoke_failed(
        &self,
        task: &TaskAttribution,
        issuer: &str,
        error: &str,
        mut ev: AuditEvent,
    ) -> Result<(), StoreError> {
        use crate::revocation::quiet::Verdict;
        self.store.item_error(&task.task_id, issuer, error).await?;
        self.count_revocation(issuer, TaskRevocation::Failed);
        let item = format!("task {}/{issuer}", task.task_id);
        let verdict = match crate::model::AgentId::new(&task.agent) {
            Ok(agent) => self.quiet.failed(&agent, &item, error, self.clock.now()),
            Err(_) => Verdict::Audit(None),
        };
        let Verdict::Audit(skipped) = verdict else {
            tracing::debug!(task = %task.task_id, agent = %task.agent, issuer, error, "task credential not revoked yet; retrying");
            return Ok(());
        };
        tracing::warn!(task = %task.task_id, agent = %task.agent, issuer, error, "task credential not revoked yet; retrying until its system answers");
        ev.error = Some(match skipped {
            None => error.to_owned(),
            Some(n) => format!(
                "{error} ({n} failed attempt(s) since the last record, not recorded one by one)"
            ),
        });
        self.recorder.record(ev).await;
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
            // Expiring: nothing revokes it earlier, with or without its issuer.
            if item.state.is_done(item.expires_at_ms, now_ms) || item.state == ItemState::Expiring {
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
