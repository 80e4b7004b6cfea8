//! Decommissioned agents, as the engine sees them: none of their
//! credentials is rotated, retired or followed any more. A rotation in
//! flight stops before its next step (or at once if it waits out a
//! back-off) and is recorded as abandoned; timers are cancelled; waiters of
//! `rotate --wait` are told. What the agent holds is then revoked by
//! [`crate::revocation`], which drives this through the [`Engine`] methods
//! below.

use std::sync::Arc;
use std::time::Duration;

use super::catalog::CredEntry;
use super::engine::{Engine, Inner};
use super::table::{Job, RotateFinished};
use crate::audit::Outcome;
use crate::model::{AgentId, CredentialKey, PluginError};
use crate::state::{RotationRow, StateError, StateStore, Write};

impl Inner {
    pub(super) fn is_retired(&self, agent: &AgentId) -> bool {
        // Cheap when nothing is decommissioned (the usual case): one read lock.
        let retired = self.retired.read().unwrap_or_else(|p| p.into_inner());
        !retired.is_empty() && retired.contains_key(agent)
    }

    pub(super) fn retired_label(&self, agent: &AgentId) -> Option<&'static str> {
        let retired = self.retired.read().unwrap_or_else(|p| p.into_inner());
        retired.get(agent).copied()
    }

    /// Tells every `rotate --wait` caller of `key` that nothing will run.
    pub(super) fn finish_waiters(&self, key: &CredentialKey, why: &str) {
        let waiters = self
            .live()
            .get_mut(key)
            .and_then(|l| l.waiters.take())
            .map(|w| *w)
            .unwrap_or_default();
        for w in waiters {
            let _ = w.send(RotateFinished {
                key: key.clone(),
                rotation: None,
                version: None,
                error: Some(format!("{key}: {why}")),
            });
        }
    }

    /// Records `rot` as abandoned: finished (never resumed), with the reason
    /// as its error, audited. Its staged version, if any, goes with the
    /// rest of the credential when the revocation destroys it. The step
    /// error it left on the credential is no longer shown: the credential
    /// is being revoked, and an old step error under it reads like a
    /// revocation problem.
    pub(super) async fn abandon_for_good(
        &self,
        entry: &CredEntry,
        rot: &mut RotationRow,
        why: &str,
    ) {
        let key = entry.key();
        rot.last_error = Some(format!("abandoned at step {}: {why}", rot.step));
        rot.step = super::Step::Done;
        rot.updated_at = self.now();
        let mut cred = self.cred_row(key);
        cred.last_error = None;
        let recorded = async {
            let head = self
                .audit(self.audit_event(
                    entry,
                    Some(rot),
                    "rotation.abandoned",
                    Outcome::Failed,
                    None,
                    Some(why.to_owned()),
                ))
                .await?;
            self.persist(vec![
                Write::Rotation(rot.clone()),
                Write::Credential(cred.clone()),
                head,
            ])
            .await
        }
        .await;
        match recorded {
            Ok(()) => {
                if let Some(l) = self.live().get_mut(key) {
                    l.parked = None;
                    l.row = Some(cred.into());
                }
                tracing::info!(agent = %entry.key().agent, credential = %entry.key().credential, rotation = %rot.id, "rotation abandoned: {why}")
            }
            Err(e) => {
                tracing::error!(agent = %entry.key().agent, credential = %entry.key().credential, rotation = %rot.id, error = %e, "could not record an abandoned rotation; it is abandoned again at the next start")
            }
        }
    }
}

/// A credential's live times, for `keyturn surface`.
#[derive(Debug, Clone, Default)]
pub struct SurfaceFacts {
    pub current_version: Option<crate::model::VersionNo>,
    pub last_rotated: Option<chrono::DateTime<chrono::Utc>>,
    pub next_due: Option<chrono::DateTime<chrono::Utc>>,
    /// The previous version is live until then (its grace period).
    pub previous_until: Option<chrono::DateTime<chrono::Utc>>,
    pub consecutive_failures: u32,
    /// Its agent is being decommissioned: nothing rotates or retires any
    /// more, and what it holds is live until its revocation is verified.
    pub stopped: bool,
    /// Stopped with a previous version not retired yet (its retirement was
    /// cancelled by the decision: the revocation ends it).
    pub previous_unretired: bool,
}

/// A credential the config no longer names (removed, or its agent
/// orphaned), with the version that stays current until its agent is
/// decommissioned.
#[derive(Debug, Clone)]
pub struct Unconfigured {
    pub version: crate::model::VersionNo,
    /// When that version was made.
    pub made: Option<chrono::DateTime<chrono::Utc>>,
}

impl SurfaceFacts {
    /// Its live versions and their credential-seconds outstanding at `now`
    /// (the definitions of `crate::surface`): the current version until the
    /// next rotation plus `grace` (a followed one has no due time), and the
    /// previous one until its grace period ends.
    pub fn live(
        &self,
        grace: std::time::Duration,
        follow: bool,
        now: chrono::DateTime<chrono::Utc>,
    ) -> (usize, u64) {
        if self.current_version.is_none() {
            return (0, 0);
        }
        if self.stopped {
            // Live until the revocation is verified, when no one can say:
            // counted, with no end to count seconds to.
            return (1 + usize::from(self.previous_unretired), 0);
        }
        let secs = |d: chrono::Duration| u64::try_from(d.num_seconds()).unwrap_or(0);
        let grace = chrono::Duration::from_std(grace).unwrap_or_default();
        let (mut versions, mut outstanding) = (1, 0);
        if let Some(n) = self.next_due.filter(|_| !follow) {
            outstanding += secs(n + grace - now);
        }
        if let Some(until) = self.previous_until.filter(|u| *u > now) {
            versions += 1;
            outstanding += secs(until - now);
        }
        (versions, outstanding)
    }
}

impl Engine {
    /// Stops every rotation of `agent` for good (the decommission decision)
    /// and returns once none of its jobs runs any more. `status` shows its
    /// credentials as `label`.
    pub async fn stop_agent(&self, agent: &AgentId, label: &'static str) {
        self.retire_agent(agent, label);
        self.agent_idle(agent).await;
    }

    /// The first half of [`Engine::stop_agent`], which waits for nothing:
    /// no rotation of `agent` starts from now on, one waiting out a back-off
    /// is woken and abandons, one running a step abandons after it.
    pub fn retire_agent(&self, agent: &AgentId, label: &'static str) {
        let inner = &self.inner;
        inner
            .retired
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(agent.clone(), label);
        inner
            .changes
            .fetch_add(1, std::sync::atomic::Ordering::Release);
        let keys = self.keys_of(agent);
        {
            let mut live = inner.live();
            for key in &keys {
                live.cancel(key, Job::Rotate);
                live.cancel(key, Job::Retire);
                if let Some(l) = live.get_mut(key) {
                    // A previous version whose retirement is cancelled
                    // stays live until the revocation (`surface`).
                    l.retires_previous &= l.retire_at.is_some();
                    l.retire_at = None;
                    l.rotate_after_retire = false;
                    l.restore_after = false;
                }
            }
        }
        for key in &keys {
            inner.finish_waiters(key, "the agent is decommissioned");
        }
        inner.agent_stopped.notify_waiters();
        inner.ack_changed.notify_waiters();
        inner.follow_reload.notify_one();
    }

    /// The second half of [`Engine::stop_agent`]: returns once no job of
    /// `agent` (retired by [`Engine::retire_agent`]) runs any more.
    pub async fn agent_idle(&self, agent: &AgentId) {
        let inner = &self.inner;
        let keys = self.keys_of(agent);
        // A step in flight finishes (a plug-in call is not cut in half);
        // the rotation stops right after it.
        loop {
            let running = {
                let live = inner.live();
                keys.iter()
                    .any(|k| live.get(k).is_some_and(|l| l.running.is_some()))
            };
            if inner.cancel.is_cancelled() {
                return;
            }
            if !running {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.abandon_unfinished(&keys).await;
        self.drop_requests(&keys).await;
    }

    /// Records as abandoned the rotations of `keys` left unfinished and not
    /// running (parked after their retries, or cut off by a stop): they
    /// never resume now. Called once none of them runs. One stopped
    /// mid-step was recorded by its run already (its row is done).
    async fn abandon_unfinished(&self, keys: &[CredentialKey]) {
        for key in keys {
            let entry = self
                .catalog()
                .creds
                .get(key)
                .cloned()
                .or_else(|| self.inner.departed_entries().get(key).cloned());
            let Some(entry) = entry else {
                continue;
            };
            let k = key.clone();
            match self.inner.load(move |s| s.latest_rotation(&k)).await {
                Ok(Some(mut rot)) if rot.step < super::Step::Retire => {
                    self.inner
                        .abandon_for_good(&entry, &mut rot, "the agent is decommissioned")
                        .await;
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::error!(agent = %key.agent, credential = %key.credential, error = %e.message, "cannot read the rotation of a decommissioned agent's credential; it is abandoned at the next start");
                }
            }
        }
    }

    /// Forgets the stored `keyturn rotate` requests of `keys` (one waited
    /// for acks when its agent was decommissioned): they will never begin,
    /// and a request left in state would rotate the credential if it ever
    /// came back. Called once none of them runs, so none stores one again.
    async fn drop_requests(&self, keys: &[CredentialKey]) {
        let dropped: Vec<Write> = {
            let mut live = self.inner.live();
            keys.iter()
                .filter(|k| {
                    live.get_mut(k)
                        .is_some_and(|l| std::mem::take(&mut l.request_stored))
                })
                .map(|k| Write::RotationRequestDone(k.clone()))
                .collect()
        };
        if dropped.is_empty() {
            return;
        }
        if let Err(e) = self.inner.persist(dropped).await {
            // Dropped again by the next start (the agent is stopped then too).
            tracing::warn!(error = %e.message, "cannot forget the rotations asked for of a decommissioned agent; retried at the next start");
        }
    }

    /// Pokes `alerts` whenever a rotation ends, so a failure (or the success
    /// that resolves it) reaches the alert loop at once.
    pub fn set_alert_poke(&self, alerts: Arc<tokio::sync::Notify>) {
        let _ = self.inner.alert_poke.set(alerts);
    }

    /// `decommissioning` or `decommissioned` for an agent whose rotations
    /// were stopped; `None` for an active one.
    pub fn agent_label(&self, agent: &AgentId) -> Option<&'static str> {
        self.inner.retired_label(agent)
    }

    /// What `keyturn surface` needs of every configured credential, in key
    /// order: the entry and its live times.
    pub fn surface_facts(&self) -> Vec<(Arc<CredEntry>, SurfaceFacts)> {
        let catalog = self.catalog();
        let live = self.inner.live();
        let now = self.now();
        catalog
            .creds
            .values()
            .map(|e| {
                let stopped = self.inner.retired_label(&e.key().agent).is_some();
                (e.clone(), facts_of(e, &live, now, stopped))
            })
            .collect()
    }

    /// The credentials the config no longer names whose current version
    /// still works (their agent is not decommissioned), in key order.
    pub fn unconfigured_live(&self) -> Vec<(CredentialKey, Unconfigured)> {
        let live = self.inner.live();
        self.inner
            .unconfigured()
            .iter()
            .filter(|(k, _)| self.inner.retired_label(&k.agent) != Some("decommissioned"))
            .map(|(k, u)| {
                let mut u = u.clone();
                // A rotation running when the credential left the config
                // finishes with the version it made.
                if let Some(row) = live.get(k).and_then(|l| l.row.as_ref())
                    && let Some(version) = row.current_version
                {
                    u = Unconfigured {
                        version,
                        made: row.last_rotated_at,
                    };
                }
                (k.clone(), u)
            })
            .collect()
    }

    /// `(live versions, credential-seconds outstanding)` over every
    /// credential (see `crate::surface`), without allocating: read at every
    /// metrics scrape. One the config no longer names counts as a live
    /// version with no end to count seconds to.
    pub fn live_totals(&self, now: chrono::DateTime<chrono::Utc>) -> (u64, u64) {
        let catalog = self.catalog();
        let live = self.inner.live();
        let (mut versions, mut outstanding) = (0, 0);
        for e in catalog.creds.values() {
            let label = self.inner.retired_label(&e.key().agent);
            if label == Some("decommissioned") {
                continue;
            }
            let (v, o) = facts_of(e, &live, now, label.is_some()).live(
                e.policy.grace,
                e.policy.follow.is_some(),
                now,
            );
            versions += v as u64;
            outstanding += o;
        }
        drop(live);
        versions += self
            .inner
            .unconfigured()
            .keys()
            .filter(|k| self.inner.retired_label(&k.agent) != Some("decommissioned"))
            .count() as u64;
        (versions, outstanding)
    }

    /// Changes the label `status` shows for a stopped agent's credentials.
    pub fn set_agent_label(&self, agent: &AgentId, label: &'static str) {
        if let Some(l) = self
            .inner
            .retired
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .get_mut(agent)
        {
            *l = label;
        }
    }

    /// The configured credentials of `agent`, in key order.
    pub fn entries_of(&self, agent: &AgentId) -> Vec<Arc<CredEntry>> {
        self.catalog()
            .creds
            .values()
            .filter(|e| e.key().agent == *agent)
            .cloned()
            .collect()
    }

    /// Every credential of `agent` the engine has seen (configured now, or
    /// earlier in this run).
    fn keys_of(&self, agent: &AgentId) -> Vec<CredentialKey> {
        let mut keys: Vec<CredentialKey> = self
            .entries_of(agent)
            .iter()
            .map(|e| e.key().clone())
            .collect();
        keys.extend(
            self.inner
                .departed_entries()
                .keys()
                .filter(|k| k.agent == *agent)
                .cloned(),
        );
        keys.sort();
        keys.dedup();
        keys
    }

    /// Forgets the consumers awaited for `key` (in memory and in state).
    pub async fn clear_acks(&self, key: &CredentialKey) -> Result<(), PluginError> {
        self.inner.drop_awaited(key);
        self.inner.forget_delivery(key);
        self.inner
            .persist(vec![Write::AwaitAcks {
                key: key.clone(),
                version: 0,
                consumers: Vec::new(),
            }])
            .await?;
        self.inner.ack_changed.notify_waiters();
        Ok(())
    }

    /// Durable state writes, one transaction (through the engine's writer).
    pub async fn persist(&self, writes: Vec<Write>) -> Result<(), PluginError> {
        self.inner.persist(writes).await
    }

    /// A read of the state database (through the engine's writer).
    pub async fn load<T: Send + 'static>(
        &self,
        f: impl FnOnce(&dyn StateStore) -> Result<T, StateError> + Send + 'static,
    ) -> Result<T, PluginError> {
        self.inner.load(f).await
    }

    /// Appends `ev` to the audit log (durable when this returns) and gives
    /// the write that records the new head, to persist with what it records.
    pub async fn audit_write(&self, ev: crate::audit::AuditEvent) -> Result<Write, PluginError> {
        Ok(Write::AuditHead(self.inner.append(ev).await?))
    }

    /// The engine's clock, at millisecond precision.
    pub fn now(&self) -> chrono::DateTime<chrono::Utc> {
        self.inner.now()
    }

    /// The engine's cancellation (the daemon is stopping).
    pub fn cancelled(&self) -> &tokio_util::sync::CancellationToken {
        &self.inner.cancel
    }

    /// Where the engine's background tasks are tracked (drained at stop).
    pub fn tracker(&self) -> &tokio_util::task::TaskTracker {
        &self.inner.tracker
    }
}

/// One credential's live times. A version promoted whose delivery fails is
/// current (the vault serves it), and the version before it is still live:
/// its retirement comes a grace period after the delivery at the soonest.
fn facts_of(
    e: &CredEntry,
    live: &super::table::Table,
    now: chrono::DateTime<chrono::Utc>,
    stopped: bool,
) -> SurfaceFacts {
    let l = live.get(e.key());
    let row = l.and_then(|l| l.row.as_ref());
    let promoted = l.and_then(super::table::CredLive::promoted);
    let delivered = row.and_then(|r| r.current_version);
    let grace = chrono::Duration::from_std(e.policy.grace).unwrap_or_default();
    SurfaceFacts {
        current_version: promoted.or(delivered),
        last_rotated: l.and_then(super::table::CredLive::made_at),
        // No rotation comes for a stopped agent.
        next_due: live
            .deadline(e.key(), Job::Rotate)
            .or_else(|| row.and_then(|r| r.next_due))
            .filter(|_| !stopped),
        previous_until: if promoted.is_some() {
            delivered.map(|_| now + grace)
        } else {
            // A retirement pending after a first version has no previous
            // version.
            l.filter(|l| l.retires_previous).and_then(|l| l.retire_at)
        },
        consecutive_failures: row.map_or(0, |r| r.consecutive_failures),
        stopped,
        previous_unretired: stopped && l.is_some_and(|l| l.retires_previous),
    }
}
