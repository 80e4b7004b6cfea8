//! Acknowledgements and cut-over: which consumers of a delivered version
//! must acknowledge it, the deliveries retried in the background, and when
//! the previous version may be retired.
//!
//! A delivery that returns [`Delivered::Acknowledged`] (a file in place, a
//! webhook's 2xx, an exec that exited 0) counts as acknowledged at once. One
//! that returns [`Delivered::Sent`] makes its consumer *awaited*, acknowledged
//! by `keyturn ack` or by the sink's own watch ([`Sink::ack_watch`], a file
//! opened after delivery). A failed delivery to a sink that does not hold up
//! the rotation ([`Sink::holds_up_rotation`]) makes its consumer awaited
//! too, and is retried here until it succeeds.
//!
//! The previous version is retired when every awaited consumer has
//! acknowledged, or at the grace deadline, whichever is first; those still
//! awaited then are *holdouts* (audited as `delivery.holdout`, counted in
//! `keyturn_ack_holdouts_total`, listed by `status`). A credential none of
//! whose consumers is awaited keeps its whole grace period, as before.
//!
//! The awaited consumers are persisted (`Write::AwaitAcks`, with the deliver
//! step's own writes: no commit of their own) and every ack is persisted as
//! it arrives, so a restart keeps them and never retires early.
//!
//! A consumer may ack a version the moment it sees it, before its delivery
//! is over (a file is in place before its signal is sent, before the
//! delivery is audited and its consumers persisted). Such an ack waits for
//! the delivery to be recorded, then counts: it is never refused as stale,
//! and never recorded before the consumers it acknowledges are.
//!
//! This file holds the consumers awaited and the deliveries that make them;
//! beside it, in `acks/`: `ack.rs` (acks arriving, and rotations waiting
//! for them), `resume.rs` (across a reload or a restart) and
//! `background.rs` (ack watches and background delivery retries).

mod ack;
mod background;
mod resume;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use chrono::{DateTime, Utc};

use super::catalog::{Catalog, CredEntry};
use super::engine::{Inner, chrono_dur};
use super::jobs::park_delay;
use super::step::Trigger;
use super::steps::{StepError, entry_retry};
use super::table::Job;
use crate::audit::{Actor, AuditEvent, Outcome};
use crate::model::{CredentialKey, PluginError, SecretValue, VersionNo};
use crate::sinks::{Delivered, Notice, Sink};
use crate::state::{AckRow, RotationRow, Write};

/// A background delivery's failure, as status shows it.
fn retry_note(e: &PluginError, attempt: u32) -> String {
    let why = if e.kind.is_retryable() {
        "retried in the background"
    } else {
        "it will fail the same way until that is fixed: retried in the background, less and less often (up to hourly)"
    };
    format!("delivery attempt {attempt}: {e}; {why}")
}

/// How a consumer acknowledges, shown after its name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum AckHow {
    /// By `keyturn ack`.
    Explicit,
    /// By its sink's watch (a file opened after delivery).
    Watched,
    /// Its delivery failed and is being retried.
    Retrying,
}

impl AckHow {
    fn as_str(self) -> &'static str {
        match self {
            AckHow::Explicit => "ack=explicit",
            AckHow::Watched => "ack=open",
            AckHow::Retrying => "delivery retrying",
        }
    }
}

/// One consumer that must acknowledge a version.
#[derive(Debug, Clone)]
pub(super) struct Consumer {
    /// The sink's description: the consumer's name, in state and audit.
    pub name: String,
    pub how: AckHow,
    /// When it acknowledged the version (`None`: not yet). Kept as it was
    /// recorded: what `surface` shows as the consumer's last use.
    pub acked_at: Option<DateTime<Utc>>,
    /// Why its delivery, retried in the background, last failed (status
    /// shows it: the audit log alone would hide a receiver that refuses).
    pub failing: Option<String>,
    /// Counts the watches of its acknowledgement replaced: a watch started
    /// at another count acknowledges nothing (see
    /// [`Inner::replace_ack_watch`]).
    pub watch: u64,
}

impl Consumer {
    pub fn acked(&self) -> bool {
        self.acked_at.is_some()
    }

    /// Whether an ack for `consumer` (`None`: `keyturn ack`, from the
    /// agent) acknowledges this one. `keyturn ack` is for the consumers
    /// that ack by themselves (`ack = "explicit"` or `"open"` file sinks):
    /// a delivery being retried is acknowledged by its own success only,
    /// never by someone else's ack.
    fn acked_by(&self, consumer: Option<&str>) -> bool {
        match consumer {
            Some(name) => name == self.name,
            None => self.how != AckHow::Retrying,
        }
    }

    /// `file:/run/keyturn/a/db (ack=open)`, as status shows it.
    pub fn label(&self) -> String {
        format!("{} ({})", self.name, self.how.as_str())
    }
}

/// The consumers that must acknowledge the last delivered version of one
/// credential.
#[derive(Debug, Clone)]
pub(super) struct Awaited {
    pub version: VersionNo,
    pub consumers: Vec<Consumer>,
    /// The previous version was retired with some of them still awaited.
    pub retired_with_holdouts: bool,
}

impl Awaited {
    pub(super) fn outstanding(&self) -> impl Iterator<Item = &Consumer> {
        self.consumers.iter().filter(|c| !c.acked())
    }

    /// Whether some consumer had to ack and every one has: the previous
    /// version may retire before its grace ends. A consumer awaited only
    /// because its delivery was retried (a webhook, a follower's nudge)
    /// counts only beside one that acks by itself: its delivery's success
    /// says nothing of the agents' moving to the new value (black-box
    /// finding: one failed nudge, retried, retired the previous version
    /// at once, where a nudge that worked the first time kept the grace).
    fn complete(&self) -> bool {
        self.consumers.iter().any(|c| c.how != AckHow::Retrying)
            && self.consumers.iter().all(Consumer::acked)
    }
}

/// What an ack did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AckOutcome {
    /// Consumers this ack acknowledged (empty: all had already).
    pub acknowledged: Vec<String>,
    /// Consumers of the version still awaited.
    pub awaiting: Vec<String>,
    /// Whether the previous version is now retired or being retired.
    pub retiring: bool,
}

/// Why an ack was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AckError {
    #[error("{key}: no consumer awaits an acknowledgement of any version")]
    NothingAwaited { key: CredentialKey },
    #[error(
        "{key}: version {version} is not the one awaiting acknowledgements (version {awaited} is)"
    )]
    Stale {
        key: CredentialKey,
        version: VersionNo,
        awaited: VersionNo,
    },
    #[error(
        "{key}: version {version} is still being delivered after {waited:?}; ack it again in a moment"
    )]
    Delivering {
        key: CredentialKey,
        version: VersionNo,
        waited: Duration,
    },
    #[error("{0}")]
    Internal(String),
}

/// How long `keyturn ack` of a version whose delivery is under way waits
/// for it to be recorded (sinks that hold up the rotation have their own
/// timeouts, well under this).
const ACK_WAITS_FOR_DELIVERY: Duration = Duration::from_secs(30);

impl Inner {
    pub(super) fn awaited(&self) -> super::engine::Changing<'_, HashMap<CredentialKey, Awaited>> {
        super::engine::Changing {
            guard: self.acks.lock().unwrap_or_else(|p| p.into_inner()),
            changes: &self.changes,
        }
    }

    /// Delivers `value` to every sink of `entry` (the deliver step, and
    /// follow mode), auditing each delivery. Returns the writes that persist
    /// the consumers now awaited; the caller persists them with its own.
    /// A failed delivery to a sink that holds up the rotation is the step's
    /// error; one to a sink that does not is retried in the background.
    pub(crate) async fn deliver_to_sinks(
        &self,
        entry: &CredEntry,
        notice: &Notice,
        value: &SecretValue,
    ) -> Result<Vec<Write>, StepError> {
        let key = entry.key();
        self.delivering_now().insert(key.clone(), notice.version);
        let result = self.deliver_each(entry, notice, value).await;
        // With consumers to persist, the delivery is over when they are
        // (`Inner::persist`); with none, now. A failed one is not over: it
        // is retried with its step (the file may be in place already, and
        // its consumer acking it).
        if let Ok(w) = &result
            && !w.iter().any(|w| matches!(w, Write::AwaitAcks { .. }))
        {
            self.delivery_recorded(key, notice.version);
        }
        result
    }

    fn delivering_now(&self) -> std::sync::MutexGuard<'_, HashMap<CredentialKey, VersionNo>> {
        self.delivering.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The delivery of `version` of `key` is over: its awaited consumers
    /// (if any) are persisted, so acks of it may be recorded.
    pub(super) fn delivery_recorded(&self, key: &CredentialKey, version: VersionNo) {
        let mut delivering = self.delivering_now();
        if delivering.get(key) == Some(&version) {
            delivering.remove(key);
            drop(delivering);
            self.ack_changed.notify_waiters();
        }
    }

    /// A delivery of `key` under way will never be recorded (the credential
    /// is being retracted): acks of it wait no more.
    pub(super) fn forget_delivery(&self, key: &CredentialKey) {
        if self.delivering_now().remove(key).is_some() {
            self.ack_changed.notify_waiters();
        }
    }

    /// Waits, at most `limit`, until `version` of `key` is not being
    /// delivered.
    async fn delivered(
        &self,
        key: &CredentialKey,
        version: VersionNo,
        limit: Option<Duration>,
    ) -> Result<(), AckError> {
        let started = tokio::time::Instant::now();
        let refused = || AckError::Delivering {
            key: key.clone(),
            version,
            waited: started.elapsed(),
        };
        loop {
            let changed = self.ack_changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if self.delivering_now().get(key) != Some(&version) {
                return Ok(());
            }
            let timeout = async {
                match limit {
                    Some(l) => tokio::time::sleep_until(started + l).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = timeout => return Err(refused()),
                _ = self.cancel.cancelled() => {
                    return Err(AckError::Internal(
                        "the daemon is stopping; ack again once it is back".into(),
                    ));
                }
                _ = &mut changed => {}
            }
        }
    }

    async fn deliver_each(
        &self,
        entry: &CredEntry,
        notice: &Notice,
        value: &SecretValue,
    ) -> Result<Vec<Write>, StepError> {
        let key = entry.key();
        let mut consumers = Vec::new();
        let mut watches = Vec::new();
        let mut retries = Vec::new();
        let mut head = None;
        let mut failing = None;
        // In the config's order, but consecutive sinks that do not hold up
        // the rotation (webhooks: one per follower) side by side: each
        // one's first attempt may take its whole `timeout` (a receiver that
        // never answers), and one after another they held the rotation up
        // for the sum (black-box finding).
        let sinks = &entry.sinks;
        let mut delivered = Vec::with_capacity(sinks.len());
        let mut next = 0;
        let mut failed = false;
        while next < sinks.len() {
            // After a failure that fails the step, the files after it are
            // still written (black-box finding: one sink refused, by a
            // symlink planted at its path, left the agent's other files at
            // the old version until an operator acted); nothing that tells
            // the agent of the version (a signal, an exec, a webhook) runs
            // until every file is in place.
            if failed {
                if sinks[next].delivered_path().is_some() {
                    delivered.push((next, sinks[next].deliver(notice, value).await));
                }
                next += 1;
                continue;
            }
            let mut end = next + 1;
            if !sinks[next].holds_up_rotation() {
                while end < sinks.len() && !sinks[end].holds_up_rotation() {
                    end += 1;
                }
            }
            let run = &sinks[next..end];
            if run.len() == 1 {
                delivered.push((next, run[0].deliver(notice, value).await));
            } else {
                let results =
                    futures::future::join_all(run.iter().map(|s| s.deliver(notice, value))).await;
                delivered.extend((next..end).zip(results));
            }
            next = end;
            failed = delivered
                .last()
                .is_some_and(|(i, r)| r.is_err() && sinks[*i].holds_up_rotation());
        }
        let mut step_failed = None;
        for (i, result) in delivered {
            let sink = &sinks[i];
            let last = i + 1 == sinks.len();
            self.metrics.delivery(sink.kind(), result.is_ok());
            let deferred = result.is_err() && !sink.holds_up_rotation();
            let (outcome, error) = match &result {
                Ok(_) => (Outcome::Ok, None),
                Err(e) if deferred => (
                    Outcome::Failed,
                    Some(format!(
                        "{e}; retried in the background, the rotation goes on"
                    )),
                ),
                Err(e) => (Outcome::Failed, Some(e.to_string())),
            };
            // The audit head is persisted with the caller's writes (or with
            // the failure record of a failed attempt).
            head = Some(
                self.audit_delivery(entry, notice, outcome, sink.describe(), error, last)
                    .await
                    .map_err(|e| StepError::new("audit", e))?,
            );
            if step_failed.is_some() {
                continue;
            }
            let how = match result {
                Ok(Delivered::Acknowledged) => continue,
                Ok(Delivered::Sent) => match sink.ack_watch(key, notice.version) {
                    Some(w) => {
                        watches.push((sink.describe(), w));
                        AckHow::Watched
                    }
                    None => AckHow::Explicit,
                },
                Err(e) if deferred => {
                    failing = Some(retry_note(&e, 1));
                    retries.push((sink.clone(), Some(e)));
                    AckHow::Retrying
                }
                Err(e) => {
                    step_failed = Some(StepError::new(format!("sink {}", sink.describe()), e));
                    continue;
                }
            };
            consumers.push(Consumer {
                name: sink.describe(),
                how,
                acked_at: None,
                failing: failing.take(),
                watch: 0,
            });
        }
        if let Some(e) = step_failed {
            return Err(e);
        }
        let names: Vec<String> = consumers.iter().map(|c| c.name.clone()).collect();
        let (had_rows, kept) = self.register_awaited(key, notice.version, consumers);
        let deadline = self.now() + chrono_dur(entry.policy.grace);
        if let Some(me) = self.me.upgrade() {
            for (name, watch) in watches {
                me.clone()
                    .spawn_ack_watch(key.clone(), notice.version, name, watch);
            }
            for (sink, first) in retries {
                me.clone().spawn_delivery_retry(
                    key.clone(),
                    sink,
                    notice.clone(),
                    value.clone(),
                    deadline,
                    first,
                );
            }
        }
        let mut writes: Vec<Write> = head.into_iter().collect();
        // Nothing awaited now or before: no row to write (the common case).
        if !names.is_empty() || had_rows {
            writes.push(Write::AwaitAcks {
                key: key.clone(),
                version: notice.version,
                consumers: names,
            });
            // The acks a retried delivery of this version kept, at the
            // times they were given.
            writes.extend(kept.into_iter().map(|(consumer, at)| Write::Acked {
                key: key.clone(),
                version: notice.version,
                consumer,
                at,
            }));
        }
        Ok(writes)
    }

    /// A `delivery` record of `notice`'s version to the sink `consumer`;
    /// returns the write that records the new head.
    async fn audit_delivery(
        &self,
        entry: &CredEntry,
        notice: &Notice,
        outcome: Outcome,
        consumer: String,
        error: Option<String>,
        last: bool,
    ) -> Result<Write, crate::model::PluginError> {
        let mut ev = AuditEvent::new("delivery", Actor::Daemon, outcome);
        ev.agent = Some(entry.key().agent.clone());
        ev.credential = Some(entry.key().credential.clone());
        ev.tenant = Some(entry.agent.tenant.clone());
        ev.owner = Some(entry.agent.owner.clone());
        ev.rotation = Some(notice.rotation.clone());
        ev.version = Some(notice.version);
        ev.detail = Some(consumer);
        // The last sink's delivery is made durable with the record that
        // follows it at once (its head reaches the state only through
        // `persist`, which makes it durable first); one followed by another
        // sink's delivery (which may take long) or a failure, at once.
        let head = if error.is_none() && last {
            self.append_unsynced(ev).await?
        } else {
            ev.error = error;
            self.append(ev).await?
        };
        Ok(Write::AuditHead(head))
    }

    /// Records the consumers awaited for `version`, keeping the acks of a
    /// delivery of the same version that was retried. Returns whether any
    /// were recorded for the credential before, and the acks kept (the
    /// consumer and when it acked).
    fn register_awaited(
        &self,
        key: &CredentialKey,
        version: VersionNo,
        mut consumers: Vec<Consumer>,
    ) -> (bool, Vec<(String, DateTime<Utc>)>) {
        let mut map = self.awaited();
        let old = map.remove(key);
        let had = old.is_some();
        let old_outstanding = old.as_ref().map_or(0, |a| a.outstanding().count());
        let mut kept = Vec::new();
        if let Some(old) = old.filter(|o| o.version == version) {
            for c in &mut consumers {
                c.acked_at = old
                    .consumers
                    .iter()
                    .find(|o| o.name == c.name)
                    .and_then(|o| o.acked_at);
                if let Some(at) = c.acked_at {
                    kept.push((c.name.clone(), at));
                }
            }
        }
        let outstanding = consumers.iter().filter(|c| !c.acked()).count();
        self.metrics
            .acks_awaiting(outstanding as i64 - old_outstanding as i64);
        if !consumers.is_empty() {
            map.insert(
                key.clone(),
                Awaited {
                    version,
                    consumers,
                    retired_with_holdouts: false,
                },
            );
        }
        (had, kept)
    }

    /// Stops awaiting `key`'s consumers (the credential was revoked: a
    /// decommission, or its rotator's on a follower), taking them off
    /// `keyturn_acks_awaiting` too. Black-box finding: a plain removal
    /// left the gauge counting them until the next restart.
    pub(super) fn drop_awaited(&self, key: &CredentialKey) {
        if let Some(a) = self.awaited().remove(key) {
            self.metrics
                .acks_awaiting(-(a.outstanding().count() as i64));
        }
    }

    /// Whether `version` of `key` still has consumers to hear from.
    pub(super) fn awaits_acks(&self, key: &CredentialKey, version: VersionNo) -> bool {
        self.awaited()
            .get(key)
            .is_some_and(|a| a.version == version && a.outstanding().next().is_some())
    }

    /// When the previous version of a rotation that delivered `version` is
    /// retired: now if every consumer that had to ack has, else `grace_end`.
    pub(super) fn retire_time(
        &self,
        key: &CredentialKey,
        version: VersionNo,
        grace_end: Option<DateTime<Utc>>,
    ) -> Option<DateTime<Utc>> {
        let done = self
            .awaited()
            .get(key)
            .is_some_and(|a| a.version == version && a.complete());
        match grace_end {
            Some(end) if done => Some(end.min(self.now())),
            other => other,
        }
    }

    /// The consumers still awaited for the current version of `key`, and
    /// whether they are holdouts (the previous version was retired without
    /// their ack), for status.
    pub(super) fn awaited_labels(&self, key: &CredentialKey) -> (Vec<String>, bool) {
        match self.awaited().get(key) {
            Some(a) => (
                a.outstanding().map(Consumer::label).collect(),
                a.retired_with_holdouts,
            ),
            None => (Vec::new(), false),
        }
    }

    /// Before the retire step of the rotation that delivered `version`: the
    /// consumers still awaited are holdouts. Returns the audit write naming
    /// them (persisted with the step), once per version.
    pub(super) async fn report_holdouts(
        &self,
        entry: &CredEntry,
        rot: &RotationRow,
    ) -> Result<Option<Write>, StepError> {
        let labels: Vec<String> = {
            let mut map = self.awaited();
            let Some(a) = map
                .get_mut(entry.key())
                .filter(|a| a.version == rot.version && !a.retired_with_holdouts)
            else {
                return Ok(None);
            };
            let labels: Vec<String> = a.outstanding().map(Consumer::label).collect();
            if labels.is_empty() {
                return Ok(None);
            }
            a.retired_with_holdouts = true;
            labels
        };
        self.metrics.ack_holdouts(labels.len() as u64);
        tracing::warn!(agent = %entry.key().agent, credential = %entry.key().credential, version = rot.version, holdouts = %labels.join(", "), "grace period over: the previous version is retired although some consumers have not acknowledged the current one");
        let head = self
            .audit(self.audit_event(
                entry,
                Some(rot),
                "delivery.holdout",
                Outcome::Failed,
                Some(format!("holdouts: {}", labels.join(", "))),
                Some("not acknowledged by the grace deadline".to_owned()),
            ))
            .await
            .map_err(|e| StepError::new("audit", e))?;
        Ok(Some(head))
    }

    fn awaits_from(&self, key: &CredentialKey, version: VersionNo, name: &str) -> bool {
        self.awaited().get(key).is_some_and(|a| {
            a.version == version && a.consumers.iter().any(|c| c.name == name && !c.acked())
        })
    }

    fn set_failing(
        &self,
        key: &CredentialKey,
        version: VersionNo,
        name: &str,
        failing: Option<String>,
    ) {
        if let Some(a) = self.awaited().get_mut(key).filter(|a| a.version == version)
            && let Some(c) = a.consumers.iter_mut().find(|c| c.name == name)
        {
            c.failing = failing;
        }
    }

    /// Why a delivery of `key`'s awaited version, retried in the
    /// background, last failed (the first such consumer's), for status.
    pub(super) fn delivery_failure(&self, key: &CredentialKey) -> Option<String> {
        let awaited = self.awaited();
        awaited
            .get(key)?
            .outstanding()
            .find_map(|c| c.failing.clone())
    }

    /// The count of replaced watches of consumer `name` of `version`
    /// (`None`: not awaited).
    pub(super) fn watch_count(
        &self,
        key: &CredentialKey,
        version: VersionNo,
        name: &str,
    ) -> Option<u64> {
        self.awaited()
            .get(key)
            .filter(|a| a.version == version)
            .and_then(|a| a.consumers.iter().find(|c| c.name == name && !c.acked()))
            .map(|c| c.watch)
    }

    /// Before `sink` delivers `version` again (a reload changed it, or its
    /// file went missing): ends the watch of its acknowledgement, if one
    /// runs. Its own open of the file, to see what it holds, would
    /// otherwise count as the consumer's (black-box finding: a reload that
    /// changed an `ack = "open"` sink's mode recorded an ack nobody gave).
    /// Returns whether a watch was ended; then [`Self::rewatch`] starts the
    /// one of the new delivery.
    pub(in crate::rotation) fn replace_ack_watch(
        &self,
        key: &CredentialKey,
        version: VersionNo,
        sink: &dyn Sink,
    ) -> bool {
        let name = sink.describe();
        let mut awaited = self.awaited();
        let Some(c) = awaited
            .get_mut(key)
            .filter(|a| a.version == version)
            .and_then(|a| {
                a.consumers
                    .iter_mut()
                    .find(|c| c.name == name && !c.acked() && c.how == AckHow::Watched)
            })
        else {
            return false;
        };
        c.watch += 1;
        true
    }

    /// After [`Self::replace_ack_watch`] and the sink's delivery: watches
    /// for the acknowledgement of that delivery, which knows its own opens.
    pub(in crate::rotation) fn rewatch(
        &self,
        key: &CredentialKey,
        version: VersionNo,
        sink: &dyn Sink,
    ) {
        let Some(me) = self.me.upgrade() else {
            return;
        };
        match sink.ack_watch(key, version) {
            Some(w) => me.spawn_ack_watch(key.clone(), version, sink.describe(), w),
            None => self.set_how(key, version, &sink.describe(), AckHow::Explicit),
        }
    }

    fn set_how(&self, key: &CredentialKey, version: VersionNo, name: &str, how: AckHow) {
        if let Some(a) = self.awaited().get_mut(key).filter(|a| a.version == version)
            && let Some(c) = a.consumers.iter_mut().find(|c| c.name == name)
        {
            c.how = how;
        }
    }
}
