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
        "the receiver refuses it: retried in the background, less and less often (up to hourly), until it is fixed"
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
    pub acked: bool,
    /// Why its delivery, retried in the background, last failed (status
    /// shows it: the audit log alone would hide a receiver that refuses).
    pub failing: Option<String>,
}

impl Consumer {
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
        self.consumers.iter().filter(|c| !c.acked)
    }

    /// Whether some consumer had to ack and every one has.
    fn complete(&self) -> bool {
        !self.consumers.is_empty() && self.consumers.iter().all(|c| c.acked)
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
        for (i, sink) in entry.sinks.iter().enumerate() {
            let last = i + 1 == entry.sinks.len();
            let result = sink.deliver(notice, value).await;
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
                Err(e) => return Err(StepError::new(format!("sink {}", sink.describe()), e)),
            };
            consumers.push(Consumer {
                name: sink.describe(),
                how,
                acked: false,
                failing: failing.take(),
            });
        }
        let names: Vec<String> = consumers.iter().map(|c| c.name.clone()).collect();
        let had_rows = self.register_awaited(key, notice.version, consumers);
        let deadline = self.now() + chrono_dur(entry.cfg.grace);
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
    /// were recorded for the credential before.
    fn register_awaited(
        &self,
        key: &CredentialKey,
        version: VersionNo,
        mut consumers: Vec<Consumer>,
    ) -> bool {
        let mut map = self.awaited();
        let old = map.remove(key);
        let had = old.is_some();
        let old_outstanding = old.as_ref().map_or(0, |a| a.outstanding().count());
        if let Some(old) = old.filter(|o| o.version == version) {
            for c in &mut consumers {
                c.acked = old.consumers.iter().any(|o| o.name == c.name && o.acked);
            }
        }
        let outstanding = consumers.iter().filter(|c| !c.acked).count();
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
        had
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

    /// Waits, before a new rotation retires the previous version early, for
    /// the consumers of the current one (`rot` delivered it) to acknowledge
    /// it, but no longer than its grace deadline. With alternating users the
    /// new rotation's `set` re-uses the user of the version being retired, so
    /// retiring it under a consumer that has not moved would break it.
    pub(super) async fn wait_for_acks(&self, rot: &RotationRow) -> Result<(), super::engine::Stop> {
        let Some(deadline) = rot.retire_at else {
            return Ok(());
        };
        loop {
            let changed = self.ack_changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if self.is_retired(&rot.key.agent) {
                return Err(super::engine::Stop::Abandoned);
            }
            if !self.awaits_acks(&rot.key, rot.version) {
                return Ok(());
            }
            let left = (deadline - self.now()).to_std().unwrap_or(Duration::ZERO);
            if left.is_zero() {
                return Ok(());
            }
            tracing::info!(agent = %rot.key.agent, credential = %rot.key.credential, version = rot.version, "a new rotation waits for the current version's acknowledgements (at most until its grace deadline)");
            tokio::select! {
                _ = tokio::time::sleep(left) => return Ok(()),
                _ = &mut changed => {}
                _ = self.cancel.cancelled() => return Err(super::engine::Stop::Drained),
            }
        }
    }

    /// A rotation is about to wait for the consumers of the current version
    /// (`rot` delivered it) before it begins. If it was asked for (`keyturn
    /// rotate`), the request is stored first, so that a restart while it
    /// waits resumes it (waiting again, up to the same grace deadline)
    /// instead of dropping it; it is cleared when the rotation begins. A
    /// scheduled rotation needs nothing stored: its due time is.
    pub(super) async fn store_request_while_waiting(&self, rot: &RotationRow) {
        let key = &rot.key;
        let waits = rot.retire_at.is_some_and(|deadline| deadline > self.now())
            && self.awaits_acks(key, rot.version);
        let requested = self
            .live()
            .get(key)
            .is_some_and(|l| l.next_trigger == Some(Trigger::Manual) && !l.request_stored);
        if !waits || !requested {
            return;
        }
        let stored = self
            .persist(vec![Write::RotationRequested {
                key: key.clone(),
                at: self.now(),
            }])
            .await;
        match stored {
            Ok(()) => {
                if let Some(l) = self.live().get_mut(key) {
                    l.request_stored = true;
                }
            }
            Err(e) => {
                tracing::warn!(agent = %key.agent, credential = %key.credential, error = %e, "cannot store the rotation asked for while it waits for acknowledgements: a restart before it begins would drop it");
            }
        }
    }

    /// `consumer` (every awaited one when `None`) acknowledges `version` of
    /// `key`; `actor` did it. Persisted and audited; the last ack of a
    /// version moves the retirement of the previous one to now.
    pub(crate) async fn ack(
        &self,
        key: &CredentialKey,
        version: VersionNo,
        consumer: Option<&str>,
        actor: Actor,
    ) -> Result<AckOutcome, AckError> {
        self.ack_within(key, version, consumer, actor, Some(ACK_WAITS_FOR_DELIVERY))
            .await
    }

    /// [`Inner::ack`], waiting at most `limit` (`None`: as long as it
    /// takes) for a delivery of `version` under way to be recorded.
    async fn ack_within(
        &self,
        key: &CredentialKey,
        version: VersionNo,
        consumer: Option<&str>,
        actor: Actor,
        limit: Option<Duration>,
    ) -> Result<AckOutcome, AckError> {
        self.delivered(key, version, limit).await?;
        // An ack counts in memory only once it is audited and persisted: one
        // that cannot be recorded (a full state volume) is not applied, so
        // the ack again the agent is told to give is recorded, not "already
        // acknowledged".
        let _recording = self.recording_ack.lock().await;
        let now = self.now();
        let acknowledged: Vec<String> = {
            let map = self.awaited();
            let Some(a) = map.get(key) else {
                return Err(AckError::NothingAwaited { key: key.clone() });
            };
            if a.version != version {
                return Err(AckError::Stale {
                    key: key.clone(),
                    version,
                    awaited: a.version,
                });
            }
            a.outstanding()
                .filter(|c| c.acked_by(consumer))
                .map(|c| c.name.clone())
                .collect()
        };
        if acknowledged.is_empty() {
            let map = self.awaited();
            let a = map.get(key).filter(|a| a.version == version);
            return Ok(AckOutcome {
                acknowledged,
                awaiting: a
                    .iter()
                    .flat_map(|a| a.outstanding())
                    .map(|c| c.name.clone())
                    .collect(),
                retiring: a.is_some_and(|a| a.complete()),
            });
        }
        let entry = self
            .catalog()
            .creds
            .get(key)
            .cloned()
            .or_else(|| self.departed_entries().get(key).cloned());
        let mut writes: Vec<Write> = acknowledged
            .iter()
            .map(|c| Write::Acked {
                key: key.clone(),
                version,
                consumer: c.clone(),
                at: now,
            })
            .collect();
        let ack_event = |c: &str, outcome: Outcome| {
            let mut ev = AuditEvent::new("delivery.ack", actor.clone(), outcome);
            ev.agent = Some(key.agent.clone());
            ev.credential = Some(key.credential.clone());
            if let Some(e) = &entry {
                ev.tenant = Some(e.agent.tenant.clone());
                ev.owner = Some(e.agent.owner.clone());
            }
            ev.version = Some(version);
            ev.detail = Some(format!("consumer={c}"));
            ev
        };
        let mut audited = Vec::new();
        let mut failure = None;
        for c in &acknowledged {
            match self.append(ack_event(c, Outcome::Ok)).await {
                Ok(head) => {
                    writes.push(Write::AuditHead(head));
                    audited.push(c);
                }
                Err(e) => {
                    failure = Some(format!("audit: {}", e.message));
                    break;
                }
            }
        }
        if failure.is_none()
            && let Err(e) = self.persist(writes).await
        {
            failure = Some(format!("state: {}", e.message));
        }
        if let Some(why) = failure {
            // What the log already says was acknowledged is taken back: the
            // ack does not count, and the consumer is still awaited.
            for c in audited {
                let mut ev = ack_event(c, Outcome::Failed);
                ev.error = Some(format!(
                    "not recorded ({why}): it does not count; ack again"
                ));
                if let Err(e) = self.append(ev).await {
                    tracing::error!(error = %e.message, "auditing an acknowledgement that could not be recorded failed");
                }
            }
            return Err(AckError::Internal(why));
        }
        let (awaiting, complete) = {
            let mut map = self.awaited();
            let Some(a) = map.get_mut(key).filter(|a| a.version == version) else {
                // A newer version was delivered meanwhile.
                return Err(AckError::Stale {
                    key: key.clone(),
                    version,
                    awaited: map.get(key).map_or(version, |a| a.version),
                });
            };
            let mut now_acked = 0i64;
            for c in a.consumers.iter_mut() {
                if !c.acked && acknowledged.contains(&c.name) {
                    c.acked = true;
                    now_acked += 1;
                }
            }
            self.metrics.acks_awaiting(-now_acked);
            let awaiting: Vec<String> = a.outstanding().map(|c| c.name.clone()).collect();
            (awaiting, a.complete())
        };
        tracing::info!(agent = %key.agent, credential = %key.credential, version, consumers = %acknowledged.join(", "), actor = %actor, "acknowledged");
        self.ack_changed.notify_waiters();
        let retiring = complete && self.retire_now(key);
        Ok(AckOutcome {
            acknowledged,
            awaiting,
            retiring,
        })
    }

    /// Every consumer of the current version of `key` has acknowledged it:
    /// the retire timer, if the rotation is waiting for it, fires now.
    /// Returns whether the previous version is being retired.
    fn retire_now(&self, key: &CredentialKey) -> bool {
        let mut live = self.live();
        let mut retiring = false;
        if let Some(l) = live.get(key).filter(|l| l.retire_at.is_some()) {
            // After a first version the step retires nothing.
            retiring = l.retires_previous;
            live.schedule(key, Job::Retire, self.now());
        }
        drop(live);
        self.wake.notify_one();
        retiring
    }

    /// After a reload from `old` to `new`: a consumer awaited from a sink
    /// the reload removed is awaited no more (its delivery retries stop).
    /// One whose sink does not hold up the rotation (a webhook) and changed
    /// its `url` (the same position among the credential's such sinks, as
    /// many before as after) is now the sink at the new `url`, where its
    /// delivery is retried at once.
    pub(super) async fn rebind_awaited(self: &Arc<Self>, old: &Catalog, new: &Catalog) {
        let now = self.now();
        let mut writes = Vec::new();
        let mut moved = Vec::new();
        let mut done = Vec::new();
        {
            let mut map = self.awaited();
            for (key, a) in map.iter_mut() {
                let Some(entry) = new.creds.get(key) else {
                    continue;
                };
                let names: Vec<String> = entry.sinks.iter().map(|s| s.describe()).collect();
                if a.outstanding().all(|c| names.contains(&c.name)) {
                    continue;
                }
                let background = |e: &CredEntry| -> Vec<String> {
                    e.sinks
                        .iter()
                        .filter(|s| !s.holds_up_rotation())
                        .map(|s| s.describe())
                        .collect()
                };
                let before = old
                    .creds
                    .get(key)
                    .map(|e| background(e))
                    .unwrap_or_default();
                let after = background(entry);
                let known: Vec<String> = a.consumers.iter().map(|c| c.name.clone()).collect();
                let (mut dropped, mut renamed) = (0i64, Vec::new());
                a.consumers.retain_mut(|c| {
                    if c.acked || names.contains(&c.name) {
                        return true;
                    }
                    let successor = before
                        .iter()
                        .position(|n| *n == c.name)
                        .filter(|_| before.len() == after.len() && c.how == AckHow::Retrying)
                        .map(|i| &after[i])
                        .filter(|n| !before.contains(n) && !known.contains(n));
                    if let Some(n) = successor {
                        renamed.push(n.clone());
                        tracing::info!(agent = %key.agent, credential = %key.credential, version = a.version, from = %c.name, to = %n, "reload: the delivery retried in the background goes to the sink's new url");
                        c.name = n.clone();
                        c.failing = None;
                        true
                    } else {
                        tracing::warn!(agent = %key.agent, credential = %key.credential, version = a.version, consumer = %c.name, "reload: the consumer's sink left the config: it is not awaited any more");
                        dropped += 1;
                        false
                    }
                });
                self.metrics.acks_awaiting(-dropped);
                writes.push(Write::AwaitAcks {
                    key: key.clone(),
                    version: a.version,
                    consumers: a.consumers.iter().map(|c| c.name.clone()).collect(),
                });
                writes.extend(
                    a.consumers
                        .iter()
                        .filter(|c| c.acked)
                        .map(|c| Write::Acked {
                            key: key.clone(),
                            version: a.version,
                            consumer: c.name.clone(),
                            at: now,
                        }),
                );
                if !renamed.is_empty() {
                    moved.push((key.clone(), a.version, renamed));
                }
                if a.complete() {
                    done.push(key.clone());
                }
            }
        }
        if writes.is_empty() {
            return;
        }
        if let Err(e) = self.persist(writes).await {
            tracing::warn!(error = %e.message, "reload: cannot record the consumers awaited now; a restart works them out again from the config");
        }
        self.ack_changed.notify_waiters();
        for key in &done {
            self.retire_now(key);
        }
        if moved.is_empty() {
            return;
        }
        let rows = self
            .load(move |s| {
                let mut rows = Vec::new();
                for (key, version, renamed) in moved {
                    if let Some(rot) = s.latest_rotation(&key)?
                        && rot.version == version
                    {
                        rows.push((rot, renamed));
                    }
                }
                Ok(rows)
            })
            .await;
        match rows {
            Ok(rows) => {
                for (rot, renamed) in rows {
                    self.resume_deliveries_of(rot, Some(&renamed));
                }
            }
            Err(e) => {
                tracing::warn!(error = %e.message, "reload: cannot retry deliveries at a changed url: reading their rotations failed; the next rotation delivers there");
            }
        }
    }

    /// Rebuilds the awaited consumers from state at start-up. `retiring`:
    /// the versions whose previous version is still to be retired (their
    /// rotation is at its retire step); any other version's outstanding
    /// consumers are holdouts already.
    pub(super) fn restore_awaited(
        self: &Arc<Self>,
        rows: Vec<AckRow>,
        retiring: &HashMap<CredentialKey, VersionNo>,
    ) {
        let catalog = self.catalog();
        let mut map = self.awaited();
        let mut outstanding = 0i64;
        let mut watches = Vec::new();
        for row in rows {
            let sink = catalog.creds.get(&row.key).and_then(|e| {
                e.sinks
                    .iter()
                    .find(|s| s.describe() == row.consumer)
                    .cloned()
            });
            let acked = row.acked_at.is_some();
            if !acked && sink.is_none() && catalog.creds.contains_key(&row.key) {
                // Its sink left the config (or changed its `url`) while the
                // daemon was down: nothing delivers to it or awaits it any more.
                tracing::warn!(agent = %row.key.agent, credential = %row.key.credential, version = row.version, consumer = %row.consumer, "a consumer awaited before the restart is no longer in the config: it is not awaited any more");
                continue;
            }
            let mut how = AckHow::Explicit;
            if !acked && let Some(sink) = &sink {
                if !sink.holds_up_rotation() {
                    // Its delivery failed: retried (`resume_deliveries`),
                    // acknowledged by its own success only.
                    how = AckHow::Retrying;
                } else if let Some(w) = sink.ack_watch(&row.key, row.version) {
                    how = AckHow::Watched;
                    watches.push((row.key.clone(), row.version, row.consumer.clone(), w));
                }
            }
            outstanding += i64::from(!acked);
            let a = map.entry(row.key.clone()).or_insert_with(|| Awaited {
                version: row.version,
                consumers: Vec::new(),
                // A first version retires nothing: never holdouts.
                retired_with_holdouts: retiring.get(&row.key) != Some(&row.version)
                    && row.version > 1,
            });
            a.consumers.push(Consumer {
                name: row.consumer,
                how,
                acked,
                failing: None,
            });
        }
        drop(map);
        self.metrics.acks_awaiting(outstanding);
        for (key, version, name, w) in watches {
            self.clone().spawn_ack_watch(key, version, name, w);
        }
    }

    /// After a restart: the deliveries that were being retried in the
    /// background (to sinks that do not hold up the rotation) are retried
    /// again, with the value read back from the vault. `retiring`: the
    /// rotations at their retire step. A version whose grace period ended
    /// with holdouts (its rotation done) is still owed to them while it is
    /// current: its rotation is read from state.
    pub(super) fn resume_deliveries(self: &Arc<Self>, retiring: Vec<RotationRow>) {
        for rot in retiring {
            self.resume_deliveries_of(rot, None);
        }
        let holdouts: Vec<(CredentialKey, VersionNo)> = self
            .awaited()
            .iter()
            .filter(|(_, a)| a.retired_with_holdouts && a.outstanding().next().is_some())
            .map(|(k, a)| (k.clone(), a.version))
            .collect();
        if holdouts.is_empty() {
            return;
        }
        // Shown as retrying from the start (the rotation is read below).
        let catalog = self.catalog();
        for (key, version) in &holdouts {
            for s in catalog.creds.get(key).iter().flat_map(|e| e.sinks.iter()) {
                if !s.holds_up_rotation() && self.awaits_from(key, *version, &s.describe()) {
                    self.set_how(key, *version, &s.describe(), AckHow::Retrying);
                }
            }
        }
        let me = self.clone();
        self.tracker.spawn(async move {
            let rows = me
                .load(move |s| {
                    let mut rows = Vec::new();
                    for (key, version) in holdouts {
                        // A newer rotation under way delivers by itself.
                        if let Some(rot) = s.latest_rotation(&key)?
                            && rot.version == version
                            && rot.step == super::step::Step::Done
                        {
                            rows.push(rot);
                        }
                    }
                    Ok(rows)
                })
                .await;
            match rows {
                Ok(rows) => {
                    for rot in rows {
                        me.resume_deliveries_of(rot, None);
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot resume the deliveries owed to holdouts: reading their rotations failed");
                }
            }
        });
    }

    /// Retries again, in the background, each delivery of `rot`'s version
    /// still awaited from a sink that does not hold up the rotation (of
    /// those named in `only`, if given).
    fn resume_deliveries_of(self: &Arc<Self>, rot: RotationRow, only: Option<&[String]>) {
        let catalog = self.catalog();
        let Some(entry) = catalog.creds.get(&rot.key) else {
            return;
        };
        if self.is_retired(&rot.key.agent) {
            return;
        }
        // Past it the consumer is a holdout, still owed the version.
        let deadline = rot.retire_at.unwrap_or_else(|| self.now());
        let sinks: Vec<Arc<dyn Sink>> = entry
            .sinks
            .iter()
            .filter(|s| {
                !s.holds_up_rotation()
                    && only.is_none_or(|o| o.contains(&s.describe()))
                    && self.awaits_from(&rot.key, rot.version, &s.describe())
            })
            .cloned()
            .collect();
        if sinks.is_empty() {
            return;
        }
        for s in &sinks {
            self.set_how(&rot.key, rot.version, &s.describe(), AckHow::Retrying);
        }
        let (me, entry) = (self.clone(), entry.clone());
        self.tracker.spawn(async move {
            let value = match me.read_staged(&entry, &rot).await {
                Ok(v) => v,
                Err(e) => {
                    tracing::warn!(agent = %rot.key.agent, credential = %rot.key.credential, version = rot.version, error = %e.message(), "cannot resume the deliveries being retried: the version cannot be read back");
                    return;
                }
            };
            let next_due = me.cred_row(entry.key()).next_due;
            let notice = super::attempt::notice_for(&entry, &rot, &value, rot.updated_at, next_due);
            for sink in sinks {
                me.clone().spawn_delivery_retry(
                    rot.key.clone(),
                    sink,
                    notice.clone(),
                    value.clone(),
                    deadline,
                    None,
                );
            }
        });
    }

    /// Acknowledges for `name` when its sink's watch says so.
    fn spawn_ack_watch(
        self: Arc<Self>,
        key: CredentialKey,
        version: VersionNo,
        name: String,
        watch: crate::sinks::AckWatch,
    ) {
        let tracker = self.tracker.clone();
        tracker.spawn(async move {
            let result = tokio::select! {
                r = watch => r,
                _ = self.cancel.cancelled() => return,
            };
            match result {
                Ok(()) => {
                    // Stale: a newer version replaced it; a stopping
                    // daemon records nothing more.
                    if let Err(e) = self
                        .ack_within(&key, version, Some(&name), Actor::Daemon, None)
                        .await
                        && !matches!(e, AckError::Stale { .. } | AckError::NothingAwaited { .. })
                        && !self.cancel.is_cancelled()
                    {
                        tracing::warn!(agent = %key.agent, credential = %key.credential, version, consumer = %name, error = %e, "recording an acknowledgement failed");
                    }
                }
                // A watch of a version that was replaced ends so.
                Err(e) if !self.awaits_from(&key, version, &name) => {
                    tracing::debug!(agent = %key.agent, credential = %key.credential, version, consumer = %name, error = %e, "acknowledgement watch ended");
                }
                Err(e) => {
                    tracing::warn!(agent = %key.agent, credential = %key.credential, version, consumer = %name, error = %e, "watching for an acknowledgement failed; the consumer can still ack with `keyturn ack`");
                }
            }
        });
    }

    /// Retries a failed delivery to a sink that does not hold up the
    /// rotation, with the step back-off (capped, jittered, without an
    /// attempt limit), auditing each attempt, until it succeeds or the
    /// version is no longer awaited from it (a newer one was delivered).
    /// Past the grace deadline the consumer is a holdout and the retries go
    /// on: its successful delivery still counts as its (late) ack. A
    /// receiver that refuses the notice (an error retrying cannot cure, such
    /// as a 400 or a 401) is retried like a parked step instead: from the
    /// retry ceiling, doubling up to an hour. `first`: the error of the
    /// attempt before (none when resumed after a restart).
    fn spawn_delivery_retry(
        self: Arc<Self>,
        key: CredentialKey,
        sink: Arc<dyn Sink>,
        notice: Notice,
        value: SecretValue,
        deadline: DateTime<Utc>,
        first: Option<PluginError>,
    ) {
        let tracker = self.tracker.clone();
        tracker.spawn(async move {
            let retry = entry_retry(&self.catalog());
            let mut delays = ExponentialBuilder::default()
                .with_min_delay(retry.initial_delay)
                .with_max_delay(retry.max_delay)
                .without_max_times()
                .with_jitter()
                .build();
            let name = sink.describe();
            let version = notice.version;
            let mut attempt = 1u32;
            let mut past_deadline = false;
            let mut asked = first.as_ref().and_then(|e| e.retry_after);
            // Consecutive refusals.
            let mut refused = u32::from(first.is_some_and(|e| !e.kind.is_retryable()));
            loop {
                // A receiver's `Retry-After` (capped by the sink) is waited
                // out in full: the back-off is the least wait, not the most.
                let backoff = delays.next().unwrap_or(retry.max_delay);
                let delay = if refused > 0 {
                    park_delay(&retry, refused)
                } else {
                    backoff
                }
                .max(asked.take().unwrap_or_default());
                let left = (deadline - self.now()).to_std().unwrap_or(Duration::ZERO);
                // Past the grace deadline the consumer is a holdout; it is
                // still owed the version (a webhook may carry the value), so
                // the retries go on until it has it or a newer version is
                // delivered, at the capped back-off.
                if left.is_zero() && !past_deadline {
                    past_deadline = true;
                    tracing::warn!(agent = %key.agent, credential = %key.credential, version, sink = %name, "grace deadline passed: the consumer is a holdout; its delivery is still retried");
                }
                let wait = if left.is_zero() { delay } else { delay.min(left) };
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = self.cancel.cancelled() => return,
                }
                if !self.awaits_from(&key, version, &name) {
                    return;
                }
                let Some(entry) = self.catalog().creds.get(&key).cloned() else {
                    return;
                };
                // The sink as configured now (a reload may have changed its
                // settings); one that left the config is retried no more.
                let Some(sink) = entry.sinks.iter().find(|s| s.describe() == name).cloned()
                else {
                    return;
                };
                attempt += 1;
                let result = sink.deliver(&notice, &value).await;
                self.metrics.delivery(sink.kind(), result.is_ok());
                let (outcome, error) = match &result {
                    Ok(_) => (Outcome::Ok, None),
                    Err(e) => (Outcome::Failed, Some(format!("attempt {attempt}: {e}"))),
                };
                let head = self
                    .audit_delivery(&entry, &notice, outcome, name.clone(), error, true)
                    .await;
                match head {
                    Ok(h) => {
                        if let Err(e) = self.persist(vec![h]).await {
                            tracing::error!(error = %e, "recording a delivery attempt failed");
                        }
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "auditing a delivery attempt failed");
                    }
                }
                match result {
                    Ok(Delivered::Acknowledged) => {
                        let _ = self.ack(&key, version, Some(&name), Actor::Daemon).await;
                        return;
                    }
                    Ok(Delivered::Sent) => {
                        self.set_failing(&key, version, &name, None);
                        let watch = sink.ack_watch(&key, version);
                        self.set_how(
                            &key,
                            version,
                            &name,
                            if watch.is_some() {
                                AckHow::Watched
                            } else {
                                AckHow::Explicit
                            },
                        );
                        if let Some(w) = watch {
                            self.clone().spawn_ack_watch(key.clone(), version, name, w);
                        }
                        return;
                    }
                    Err(e) => {
                        asked = e.retry_after;
                        // Every kind is retried: a receiver that refuses now
                        // may be fixed later.
                        refused = if e.kind.is_retryable() {
                            0
                        } else {
                            refused.saturating_add(1)
                        };
                        self.set_failing(&key, version, &name, Some(retry_note(&e, attempt)));
                        tracing::warn!(agent = %key.agent, credential = %key.credential, version, sink = %name, attempt, error = %e, "delivery failed; retrying in the background");
                    }
                }
            }
        });
    }

    fn awaits_from(&self, key: &CredentialKey, version: VersionNo, name: &str) -> bool {
        self.awaited().get(key).is_some_and(|a| {
            a.version == version && a.consumers.iter().any(|c| c.name == name && !c.acked)
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

    fn set_how(&self, key: &CredentialKey, version: VersionNo, name: &str, how: AckHow) {
        if let Some(a) = self.awaited().get_mut(key).filter(|a| a.version == version)
            && let Some(c) = a.consumers.iter_mut().find(|c| c.name == name)
        {
            c.how = how;
        }
    }
}
