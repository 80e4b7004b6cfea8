//! The loop: [`TaskManager::tick`] ends the tasks that are due and pushes
//! those ending forward, from the store alone (so a restart resumes where
//! the last process left off); [`TaskManager::run`] repeats it, woken early
//! when a start or an end outside the loop needs it sooner.

use super::*;

impl TaskManager {
    /// A task ended outside the loop is not ended yet (a revocation
    /// failed): the loop must try it again after the retry interval, not
    /// at the time it was armed for (the task's TTL, maybe hours away).
    pub(super) fn retry_soon(&self) {
        let retry_ms = i64::try_from(self.retry.as_millis()).unwrap_or(5_000);
        self.wake_by(ms(self.clock.now()).saturating_add(retry_ms));
    }

    /// The loop must pass at `at_ms` (ms since the epoch): woken now if it
    /// is armed for later, so that its next pass arms it for `at_ms`.
    pub(super) fn wake_by(&self, at_ms: i64) {
        if at_ms < self.armed_until_ms.load(Ordering::SeqCst) {
            self.wake.notify_one();
        }
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
                    let reason = if self.starts_blocked(&t.task.agent) {
                        "decommission"
                    } else {
                        "agent_retired"
                    };
                    self.end_now(&t.task.task_id, reason, None).await
                }
                TaskState::Live if t.expires_at_ms <= now => {
                    self.end_now(&t.task.task_id, "ttl", None).await
                }
                // A reload narrowed its policy: a task the policy would
                // refuse now ends now, one that outlives its level's
                // `max_ttl` now ends when that has passed since its start.
                TaskState::Live => match policy_end(&setup.policies, &t) {
                    Some(at) if at <= now => {
                        tracing::warn!(task = %t.task.task_id, agent = %t.task.agent, "the policy no longer allows this task (changed by a reload): it ends now");
                        self.end_now(&t.task.task_id, "policy_changed", None).await
                    }
                    end => {
                        let at = end.map_or(t.expires_at_ms, |e| e.min(t.expires_at_ms));
                        next = Some(next.map_or(at, |n| n.min(at)));
                        continue;
                    }
                },
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

/// When the policies as configured now end live task `t`: at once
/// (`i64::MIN`) when they would not start it (its agent, tenant, use case
/// or sensitivity is not allowed any more, or its level no longer grants
/// an issuer it holds a credential of), when its level's `max_ttl` has
/// passed since its start if that is before its own end, else `None`.
fn policy_end(
    policies: &std::collections::BTreeMap<String, policy::Policy>,
    t: &TaskRow,
) -> Option<i64> {
    let ask = policy::TaskAsk {
        agent: &t.task.agent,
        tenant: &t.task.tenant,
        use_case: &t.task.use_case,
        sensitivity: &t.task.sensitivity,
        ttl: None,
    };
    let Ok(decision) = policy::decide(policies, &ask) else {
        return Some(i64::MIN);
    };
    if t.items
        .iter()
        .any(|i| !decision.level.grants.contains_key(&i.issuer))
    {
        return Some(i64::MIN);
    }
    let max = i64::try_from(decision.level.max_ttl.as_millis()).unwrap_or(i64::MAX / 2);
    let end = t.started_at_ms.saturating_add(max);
    (end < t.expires_at_ms).then_some(end)
}
