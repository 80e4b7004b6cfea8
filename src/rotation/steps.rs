//! The steps of one rotation, each persisted and audited, with one failure
//! path (retries with back-off, then parking) for every step and plug-in.
//! What one attempt of each step does at the plug-ins is in `attempt.rs`.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};

use super::attempt::delivered_row;
use super::catalog::{Catalog, CredEntry};
use super::engine::{Inner, Stop, chrono_dur};
use super::failpoint::crash_point;
use super::footprint::Footprint;
use super::step::{Step, Trigger};
use super::table::Job;
use crate::audit::Outcome;
use crate::config::RetryConfig;
use crate::model::{ErrorKind, PluginError, RotationId, SecretValue, Stage};
use crate::state::{RotationRow, Write};

/// A step failure with the plug-in context it happened in.
pub(crate) struct StepError {
    pub(super) context: String,
    pub(super) error: PluginError,
    /// The version this rotation staged is gone from the vault (see
    /// [`Inner::abandon`]).
    pub(super) staged_gone: bool,
}

impl StepError {
    pub(super) fn new(context: impl Into<String>, error: PluginError) -> Self {
        Self {
            context: context.into(),
            error,
            staged_gone: false,
        }
    }
    pub(super) fn message(&self) -> String {
        format!(
            "{}: {} ({})",
            self.context, self.error.message, self.error.kind
        )
    }
    /// The error with its context in the message.
    pub(super) fn plugin_error(self) -> PluginError {
        PluginError::new(
            self.error.kind,
            format!("{}: {}", self.context, self.error.message),
        )
    }
}

/// What one run of a rotation remembers between its steps, in memory only,
/// so the steps after create do not read back from the vault what this run
/// staged (`docs/vault-calls.md` counts the calls). A resumed rotation
/// starts with nothing remembered, and a failed attempt forgets it all:
/// then each step reads what the vault holds, as it must after a crash or
/// when the vault may have changed while the step was failing.
#[derive(Default)]
pub(super) struct RunMemory {
    /// The value this rotation staged, as the vault holds it.
    pub(super) staged: Option<SecretValue>,
    /// The create step has not been attempted in this run, and the
    /// rotation was begun by it (not resumed): its first `stage` is fresh.
    pub(super) fresh: bool,
}

impl RunMemory {
    /// For a rotation this run has just begun.
    pub(super) fn begun() -> Self {
        RunMemory {
            staged: None,
            fresh: true,
        }
    }

    fn forget(&mut self) {
        *self = RunMemory::default();
    }
}

impl Inner {
    /// Runs (or resumes) one rotation up to and including delivery.
    pub(super) async fn rotate(&self, entry: &CredEntry) -> Result<RotationRow, Stop> {
        let key = entry.key().clone();
        if self.is_retired(&key.agent) {
            return Err(Stop::Abandoned);
        }
        let k = key.clone();
        let latest = self
            .load(move |s| s.latest_rotation(&k))
            .await
            .map_err(|e| Stop::Failed(format!("{key}: {e}"), None))?;
        let mut run = RunMemory::default();
        // The state writes of steps recorded later (see `records_later`).
        let mut carried = Vec::new();
        let mut rot = match latest {
            Some(mut r) if r.step < Step::Retire => {
                tracing::info!(agent = %key.agent, credential = %key.credential, rotation = %r.id, step = %r.step, "resuming rotation");
                if let Some(after) = r.start_record_after.take() {
                    self.record_start_if_missing(entry, &r, after, &mut carried)
                        .await?;
                }
                r
            }
            mut latest => {
                // Black-box finding: 1,000 rotations asked for by `rotate
                // all` were still begun (new versions, files written) after
                // a reload removed their credentials while they waited for
                // a slot. One in flight finishes with its entry; one not
                // begun is not begun.
                if !self.catalog().creds.contains_key(&key) {
                    return Err(Stop::Removed);
                }
                // Promoted from following: the retirement its rotator owed
                // comes first, like a pending retire step of its own.
                if latest.as_ref().is_none_or(|r| r.step != Step::Retire)
                    && let Some(adopted) = self
                        .adopt_takeover(entry, latest.as_ref())
                        .await
                        .map_err(|e| Stop::Failed(format!("{key}: {}", e.message), e.retry_after))?
                {
                    latest = Some(adopted);
                }
                if let Some(prev) = latest.as_mut().filter(|r| r.step == Step::Retire) {
                    // A new version is coming: the one before the current
                    // must go now rather than at the end of its grace, but
                    // not before the current one's consumers have it (or
                    // its grace deadline passed). A first version has no
                    // version before it: nothing to wait for.
                    self.store_request_while_waiting(prev).await;
                    if prev.previous_vault_version.is_some() {
                        self.wait_for_acks(prev).await?;
                    }
                    self.run_step(entry, prev, &mut RunMemory::default(), Some(&mut carried))
                        .await?;
                    if let Some(l) = self.live().get_mut(&key) {
                        l.set_retire(None, None);
                    }
                    self.live().cancel(&key, Job::Retire);
                }
                run = RunMemory::begun();
                self.begin(entry, latest.as_ref(), &mut carried).await?
            }
        };
        self.set_running(&key, &rot);
        while rot.step < Step::Retire {
            // Stopping: a rotation stops between steps, unless its value is
            // applied at the target already (`set` done) or is the vaults'
            // current one (promoted). Then it is carried through to
            // delivery within the drain, so that the target or the vaults'
            // readers and the agents do not disagree for as long as the
            // daemon is down.
            let applied =
                (entry.target.is_some() && rot.step > Step::Set) || rot.step > Step::Promote;
            if self.cancel.is_cancelled() && !applied {
                // The steps done are recorded before the daemon stops.
                self.record_carried(entry, Some(&rot), &mut carried).await;
                return Err(Stop::Drained);
            }
            let ran = if self.is_retired(&key.agent) {
                Err(Stop::Abandoned)
            } else {
                self.run_step(entry, &mut rot, &mut run, Some(&mut carried))
                    .await
            };
            if let Err(Stop::Abandoned) = ran {
                self.record_carried(entry, Some(&rot), &mut carried).await;
                self.abandon_for_good(entry, &mut rot, "the agent is decommissioned")
                    .await;
            }
            ran?;
        }
        Ok(rot)
    }

    /// Records the steps whose records were carried (see `records_later`)
    /// when the rotation stops between steps: the carried writes, the
    /// rotation row where it is now, and the audit head once the records
    /// written unsynced are durable. A failure leaves the state at the last
    /// recorded step, which the next start replays.
    /// (The carried writes end with the rotation row after the last carried
    /// step; `rot`, if given, is where the rotation is now.)
    async fn record_carried(
        &self,
        entry: &CredEntry,
        rot: Option<&RotationRow>,
        carried: &mut Vec<Write>,
    ) {
        if carried.is_empty() {
            return;
        }
        let mut writes = std::mem::take(carried);
        writes.extend(rot.map(|r| Write::Rotation(r.clone())));
        let recorded = async {
            let head = self
                .audit
                .sync()
                .await
                .map_err(|e| PluginError::new(ErrorKind::Transient, e.to_string()))?;
            writes.push(Write::AuditHead(head));
            self.persist(writes).await
        }
        .await;
        if let Err(e) = recorded {
            tracing::error!(agent = %entry.key().agent, credential = %entry.key().credential, error = %e, "could not record the steps done; the next start replays them");
        }
    }

    /// Records the start of a new rotation: its row first, then its
    /// `rotation.start` audit record, so that the log never names a rotation
    /// the state database does not have (a restart would begin another one
    /// for the same version, and the first would never end). A crash between
    /// the two leaves the row with `start_record_after` set: the rotation is
    /// resumed under its id and its record appended then
    /// ([`Inner::record_start_if_missing`]).
    /// `latest` is the credential's newest (finished) rotation, if any: it
    /// created the current version, so it knows its number and vault id.
    /// `carried`: the writes of a step recorded with this one (the retire
    /// of the version before the current), committed with the row once
    /// their records are durable. It is left holding the head after the
    /// start record, written unsynced: the next recorded step makes it
    /// durable and stores it (see [`records_later`]).
    pub(super) async fn begin(
        &self,
        entry: &CredEntry,
        latest: Option<&RotationRow>,
        carried: &mut Vec<Write>,
    ) -> Result<RotationRow, Stop> {
        let key = entry.key();
        let cred = self.cred_row(key);
        let trigger = self
            .live()
            .get(key)
            .and_then(|l| l.next_trigger)
            .unwrap_or(Trigger::Schedule);
        let newest = latest.map_or(0, |r| r.version);
        let previous_vault_version = match latest {
            Some(r) if Some(r.version) == cred.current_version => r.vault_version.clone(),
            // No rotation history for the current version (rows forgotten,
            // state restored): look the version up.
            _ => match cred.current_version {
                None => None,
                Some(cv) => {
                    let k = key.clone();
                    self.load(move |s| s.versions(&k))
                        .await
                        .map_err(|e| Stop::Failed(format!("{key}: {e}"), None))?
                        .into_iter()
                        .find(|v| v.version == cv)
                        .map(|v| v.vault_version)
                }
            },
        };
        // A new version has the other parity than the current one: the
        // roles of `alternating_users` go by it, and after an abandoned
        // version the next number would land on the current value's role
        // and end it at once, without its grace.
        // Above any version the audit log named that a restored state did
        // not know: a number is never given to two values.
        let floor = self
            .version_floors
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(key)
            .copied()
            .unwrap_or(0);
        let mut version = newest.max(cred.current_version.unwrap_or(0)).max(floor) + 1;
        if let Some(current) = cred.current_version
            && (version - current).is_multiple_of(2)
        {
            version += 1;
        }
        let t = self.now();
        let mut rot = RotationRow {
            id: RotationId::generate(),
            key: key.clone(),
            step: Step::Create,
            trigger,
            version,
            vault_version: None,
            previous_version: cred.current_version,
            previous_vault_version,
            started_at: t,
            updated_at: t,
            retire_at: None,
            attempts: 0,
            last_error: None,
            footprint: Some(Footprint::of(entry).to_json()),
            // Any record appended from now on comes after this seq.
            start_record_after: Some(self.audit.head().seq),
        };
        let failed = |e: PluginError| Stop::Failed(format!("{key}: {}", e.message), None);
        let mut writes = std::mem::take(carried);
        if !writes.is_empty() {
            // The carried steps' records (written unsynced) are durable
            // before their writes are.
            let head = self
                .audit
                .sync()
                .await
                .map_err(|e| failed(PluginError::new(ErrorKind::Transient, e.to_string())))?;
            writes.push(Write::AuditHead(head));
        }
        writes.push(Write::Rotation(rot.clone()));
        // A stored `keyturn rotate` request is met by this rotation.
        let requested = self.live().get(key).is_some_and(|l| l.request_stored);
        if requested {
            writes.push(Write::RotationRequestDone(key.clone()));
        }
        self.persist(writes).await.map_err(failed)?;
        if requested && let Some(l) = self.live().get_mut(key) {
            l.request_stored = false;
        }
        crash_point("rotation.start.after_row");
        let head = self
            .append_unsynced(self.start_event(entry, &rot))
            .await
            .map_err(|e| Stop::Failed(format!("{key}: audit: {}", e.message), None))?;
        rot.start_record_after = None;
        carried.push(Write::AuditHead(head));
        crash_point("rotation.after_start");
        Ok(rot)
    }

    /// The `rotation.start` record of `rot`.
    pub(super) fn start_event(
        &self,
        entry: &CredEntry,
        rot: &RotationRow,
    ) -> crate::audit::AuditEvent {
        self.audit_event(
            entry,
            Some(rot),
            "rotation.start",
            Outcome::Ok,
            Some(format!("trigger={}", rot.trigger.as_str())),
            None,
        )
    }

    /// `rot` is resumed, and its `rotation.start` record was not known to be
    /// in the audit log (the daemon was killed between writing the row and
    /// appending the record, or the append failed): appends it unless it is
    /// there (after seq `after`), so that the log has it exactly once. The
    /// head after it is left in `carried`, for the next recorded step.
    async fn record_start_if_missing(
        &self,
        entry: &CredEntry,
        rot: &RotationRow,
        after: u64,
        carried: &mut Vec<Write>,
    ) -> Result<(), Stop> {
        let key = entry.key();
        let log = self.audit.clone();
        let id = rot.id.clone();
        let found = tokio::task::spawn_blocking(move || {
            log.find_after(after, |r| {
                r.event.event == "rotation.start" && r.event.rotation.as_ref() == Some(&id)
            })
        })
        .await;
        match found {
            Ok(Ok(true)) => return Ok(()),
            Ok(Ok(false)) => {
                tracing::info!(agent = %key.agent, credential = %key.credential, rotation = %rot.id, "the start of this rotation is not in the audit log (the daemon stopped before it was recorded, or the append failed): recording it now");
            }
            // Better twice than never.
            Ok(Err(e)) => {
                tracing::warn!(agent = %key.agent, credential = %key.credential, rotation = %rot.id, error = %e, "cannot read the audit log to tell whether the start of this rotation was recorded: recording it");
            }
            Err(e) => {
                tracing::warn!(agent = %key.agent, credential = %key.credential, rotation = %rot.id, error = %e, "cannot tell whether the start of this rotation was recorded: recording it");
            }
        }
        let head = self
            .append_unsynced(self.start_event(entry, rot))
            .await
            .map_err(|e| Stop::Failed(format!("{key}: audit: {}", e.message), None))?;
        carried.push(Write::AuditHead(head));
        Ok(())
    }

    /// Runs `rot.step` with retries; on success the step's effects, the
    /// audit record and the advanced rotation row are all durable, except
    /// for a step whose record is carried (`carried` given and
    /// [`records_later`]): its audit record is written unsynced and its
    /// writes are left in `carried`, for the next recorded step (or a
    /// failure record) to commit with its own.
    pub(super) async fn run_step(
        &self,
        entry: &CredEntry,
        rot: &mut RotationRow,
        run: &mut RunMemory,
        mut carried: Option<&mut Vec<Write>>,
    ) -> Result<(), Stop> {
        let mut delays = step_backoff(entry_retry(&self.catalog()));
        let step = rot.step;
        let later = carried.is_some() && records_later(step, entry);
        loop {
            crash_point(before(step));
            let attempt = {
                let attempt = self.attempt_step(entry, rot, run);
                tokio::pin!(attempt);
                match carried.as_deref_mut().filter(|c| !c.is_empty()) {
                    // A step that takes long does not keep the records
                    // carried into it unanchored: after `CARRY_LIMIT` they
                    // are recorded on their own, as without the carry.
                    Some(carried) => tokio::select! {
                        r = &mut attempt => r,
                        _ = tokio::time::sleep(CARRY_LIMIT) => {
                            self.record_carried(entry, None, carried).await;
                            attempt.await
                        }
                    },
                    None => attempt.await,
                }
            };
            let error = match attempt {
                Ok(mut writes) => {
                    crash_point(after(step));
                    let mut next = rot.clone();
                    next.step = next_step(step, entry);
                    next.attempts = 0;
                    next.last_error = None;
                    next.updated_at = self.now();
                    if step == Step::Deliver {
                        next.retire_at = Some(next.updated_at + chrono_dur(entry.policy.grace));
                        // The row stored is the one kept in memory (black-box
                        // finding: after a retried deliver step the stored
                        // `last_rotated` was a failed attempt's, and a restart
                        // moved the schedule earlier).
                        for w in &mut writes {
                            if let Write::Credential(row) = w {
                                *row = delivered_row(entry, &next);
                            }
                        }
                    }
                    let persisted = async {
                        let ev = self.audit_event(
                            entry,
                            Some(&next),
                            &format!("rotation.{step}"),
                            Outcome::Ok,
                            step_detail(step, rot),
                            None,
                        );
                        if later && let Some(carried) = carried.as_deref_mut() {
                            // Its head is stored with the next record's.
                            self.append_unsynced(ev).await?;
                            carried.append(&mut writes);
                            carried.push(Write::Rotation(next.clone()));
                            return Ok(());
                        }
                        let head = Write::AuditHead(self.append(ev).await?);
                        let mut all = carried
                            .as_deref_mut()
                            .map(std::mem::take)
                            .unwrap_or_default();
                        all.append(&mut writes);
                        all.push(Write::Rotation(next.clone()));
                        all.push(head);
                        self.persist(all).await
                    }
                    .await;
                    match persisted {
                        Ok(()) => {
                            *rot = next;
                            self.apply_effects_in_memory(entry, rot);
                            self.set_running(entry.key(), rot);
                            return Ok(());
                        }
                        Err(e) => StepError::new("recording the step", e),
                    }
                }
                Err(e) => e,
            };
            // One failure path for every step and plug-in.
            run.forget();
            let msg = error.message();
            self.metrics.step_failed(step.as_str());
            if error.staged_gone && matches!(step, Step::Set | Step::Test | Step::Promote) {
                let carried = carried
                    .as_deref_mut()
                    .map(std::mem::take)
                    .unwrap_or_default();
                return Err(self.abandon(entry, rot, &msg, carried).await);
            }
            rot.attempts += 1;
            rot.last_error = Some(format!("step {step}: {msg}"));
            rot.updated_at = self.now();
            tracing::warn!(agent = %entry.key().agent, credential = %entry.key().credential, rotation = %rot.id, step = %step, attempt = rot.attempts, kind = %error.error.kind, error = %msg, "step failed");
            let mut cred = self.cred_row(entry.key());
            cred.last_error = rot.last_error.clone();
            let retryable = error.error.kind.is_retryable();
            let delay = if retryable {
                delays.next().map(|d| honour_retry_after(d, &error.error))
            } else {
                None
            };
            if delay.is_none() {
                cred.count_failure(rot.updated_at);
            }
            self.set_running(entry.key(), rot);
            let recorded = async {
                let head = self
                    .audit(self.audit_event(
                        entry,
                        Some(rot),
                        &format!("rotation.{step}"),
                        Outcome::Failed,
                        step_detail(step, rot),
                        Some(msg.clone()),
                    ))
                    .await?;
                // The steps carried so far are recorded with the failure.
                let mut writes = carried
                    .as_deref_mut()
                    .map(std::mem::take)
                    .unwrap_or_default();
                writes.extend([
                    Write::Rotation(rot.clone()),
                    Write::Credential(cred.clone()),
                    head,
                ]);
                self.persist(writes).await
            }
            .await;
            if let Err(e) = recorded {
                tracing::error!(agent = %entry.key().agent, credential = %entry.key().credential, error = %e, "could not record a step failure");
            }
            if let Some(l) = self.live().get_mut(entry.key()) {
                l.row = Some(cred.into());
            }
            let Some(delay) = delay else {
                return Err(Stop::Failed(
                    format!("{}: step {step}: {msg}", entry.key()),
                    error.error.retry_after,
                ));
            };
            let until = tokio::time::Instant::now() + delay;
            loop {
                let stopped = self.agent_stopped.notified();
                // Retired while the step ran (before this waiter existed):
                // no back-off, no further attempt.
                if self.is_retired(&entry.key().agent) {
                    return Err(Stop::Abandoned);
                }
                tokio::select! {
                    _ = tokio::time::sleep_until(until) => break,
                    _ = self.cancel.cancelled() => return Err(Stop::Drained),
                    _ = stopped => {}
                }
                if self.is_retired(&entry.key().agent) {
                    return Err(Stop::Abandoned);
                }
            }
        }
    }

    /// The version this rotation staged is gone from the vault before it
    /// was promoted (deleted out of band while the rotation was parked):
    /// no retry can bring the value back, and a new one must not be
    /// generated under the same rotation id (it may already be applied at
    /// the target). The rotation is recorded as abandoned: its row is done
    /// with the reason, its pending version retired in state, a
    /// `rotation.abandoned` audit record says why, and the failure counts
    /// like any other. The credential's next attempt then begins a fresh
    /// rotation (new id, new value, a later version number). All of it is
    /// one commit: a crash before it replays the failing step, which finds
    /// the version gone again and abandons again.
    pub(super) async fn abandon(
        &self,
        entry: &CredEntry,
        rot: &mut RotationRow,
        why: &str,
        mut carried: Vec<Write>,
    ) -> Stop {
        let step = rot.step;
        let key = entry.key();
        let now = self.now();
        // Said like any step failure (`step STEP: ...`), so `rotate --wait`
        // and status read the same.
        let reason = format!(
            "step {step}: rotation {} abandoned: {why}; the next attempt starts a new rotation",
            rot.id
        );
        tracing::warn!(agent = %key.agent, credential = %key.credential, rotation = %rot.id, step = %step, version = rot.version, "{reason}");
        // What the version may have set at the target stops working there
        // (alternating users: its role's password is cleared, unless the
        // role holds another version by now): its value is in no vault and
        // no agent has it. Best effort: the fresh rotation sets a new value
        // on that role anyway (see `begin`).
        if let Some(target) = &entry.target
            && let Err(e) = target.retire(key, rot.version).await
        {
            tracing::warn!(agent = %key.agent, credential = %key.credential, rotation = %rot.id, version = rot.version, error = %e.message, "could not retire the abandoned version at the target; the next rotation replaces it");
        }
        let mut done = rot.clone();
        done.step = Step::Done;
        done.attempts += 1;
        done.last_error = Some(reason.clone());
        done.updated_at = now;
        let mut cred = self.cred_row(key);
        cred.last_error = Some(reason.clone());
        cred.count_failure(now);
        carried.push(Write::Credential(cred.clone()));
        let recorded = self
            .record_abandoned(entry, &done, step, why, carried)
            .await;
        match recorded {
            Ok(()) => {
                *rot = done;
                // Status shows the step it was abandoned at, not `done`.
                self.set_running(
                    key,
                    &RotationRow {
                        step,
                        ..rot.clone()
                    },
                );
            }
            Err(e) => {
                tracing::error!(agent = %key.agent, credential = %key.credential, rotation = %rot.id, error = %e, "could not record the abandoned rotation; the next attempt finds its version gone again");
            }
        }
        if let Some(l) = self.live().get_mut(key) {
            l.row = Some(cred.into());
        }
        Stop::Failed(format!("{key}: {reason}"), None)
    }

    /// Records `done`, a rotation abandoned at `step` for `why`: its
    /// `rotation.abandoned` record, then in one commit with `writes` its
    /// row and its version retired in state.
    async fn record_abandoned(
        &self,
        entry: &CredEntry,
        done: &RotationRow,
        step: Step,
        why: &str,
        mut writes: Vec<Write>,
    ) -> Result<(), PluginError> {
        let head = self
            .audit(self.audit_event(
                entry,
                Some(done),
                "rotation.abandoned",
                Outcome::Failed,
                Some(format!("step={step}")),
                Some(why.to_owned()),
            ))
            .await?;
        writes.extend([
            Write::Rotation(done.clone()),
            Write::VersionStage {
                key: entry.key().clone(),
                version: done.version,
                stage: Stage::Retired,
            },
            head,
        ]);
        self.persist(writes).await
    }

    /// A rotation of a credential that left the config while the daemon
    /// was down, stopped before its value was promoted: its sinks went
    /// with the credential, so no agent will ever get that value, and a
    /// target that took it (`single_user`: the only password) would lock
    /// the agents out for good. What it may have set at the target is
    /// undone: a role of its own (`alternating_users`) is cleared; a target
    /// that holds one value gets the current version's value back, which
    /// the agents hold. Then it is recorded as abandoned (its row done, its
    /// version retired in state, a `rotation.abandoned` record). If any of
    /// it fails, the rotation stays as it is and the next start tries again.
    /// Not for an agent being decommissioned: its revocation ends it all.
    pub(super) async fn settle_departed(
        &self,
        entry: &CredEntry,
        rot: RotationRow,
        current: Option<crate::model::VersionNo>,
    ) {
        let key = entry.key();
        let step = rot.step;
        // An agent decommissioned (or declared so) is its revocation's to
        // handle: putting a value back at its target would undo it.
        let agent = key.agent.clone();
        let decided = self
            .load(move |s| Ok(s.decommissions()?.iter().any(|d| d.agent == agent)))
            .await;
        let declared = self
            .catalog()
            .config
            .agents
            .get(&key.agent)
            .and_then(|a| a.decommissioned.as_ref())
            .is_some_and(|d| d.in_effect(self.now()));
        match decided {
            Ok(false) if !declared && !self.is_retired(&key.agent) => {}
            Ok(_) => return,
            Err(e) => {
                tracing::error!(agent = %key.agent, credential = %key.credential, rotation = %rot.id, error = %e.message, "cannot read the decommissions to settle a rotation of a credential that left the config; tried again at the next start");
                return;
            }
        }
        let undone: Result<(), PluginError> = async {
            // Even at `create`: a step's record may be carried into the
            // next one's (`records_later`), so `set` may have run.
            let Some(target) = &entry.target else {
                return Ok(());
            };
            // A login of its own (the other role of `alternating_users`):
            // cleared. The login the current value uses (`single_user`'s
            // one role, a hook): the current value goes back. (Asking only
            // whether the target names logins sent `single_user` to a
            // `retire` that does nothing there, and the agents stayed
            // locked out: black-box finding.)
            let Some(current) = current else {
                return target.retire(key, rot.version).await;
            };
            if target.login_for(rot.version) != target.login_for(current) {
                return target.retire(key, rot.version).await;
            }
            let path = entry.vault_path();
            let item = crate::vaults::VaultItem { key, path: &path };
            let stored = entry
                .primary()
                .vault
                .read(item, crate::vaults::Select::Stage(Stage::Current))
                .await?
                .ok_or_else(|| {
                    PluginError::new(
                        ErrorKind::NotFound,
                        format!(
                            "vault {} holds no current version at {path}",
                            entry.primary().vault.describe()
                        ),
                    )
                })?;
            target.set(key, current, &stored.value).await?;
            target.test(key, current, &stored.value).await
        }
        .await;
        if let Err(e) = undone {
            tracing::error!(agent = %key.agent, credential = %key.credential, rotation = %rot.id, step = %step, version = rot.version, error = %e.message, "left the config in the middle of a rotation whose value may be set at the target, and it cannot be undone there; tried again at the next start (or add the credential back: the rotation resumes)");
            return;
        }
        let why = "the credential left the config before the rotation was promoted; what it set at the target was undone";
        let mut done = rot.clone();
        done.step = Step::Done;
        done.last_error = Some(format!("abandoned at step {step}: {why}"));
        done.updated_at = self.now();
        let recorded = self
            .record_abandoned(entry, &done, step, why, Vec::new())
            .await;
        match recorded {
            Ok(()) => {
                tracing::warn!(agent = %key.agent, credential = %key.credential, rotation = %rot.id, step = %step, version = rot.version, "rotation abandoned: {why}")
            }
            Err(e) => {
                tracing::error!(agent = %key.agent, credential = %key.credential, rotation = %rot.id, error = %e, "could not record the abandoned rotation of a credential that left the config; the next start abandons it again")
            }
        }
    }

    /// Keeps the in-memory credential row in step with what was persisted.
    pub(super) fn apply_effects_in_memory(&self, entry: &CredEntry, rot: &RotationRow) {
        if rot.step == Step::Retire
            && let Some(l) = self.live().get_mut(entry.key())
        {
            l.row = Some(delivered_row(entry, rot).into());
        }
    }
}

/// How long records carried into a step (see [`records_later`]) wait for
/// it to end before they are recorded on their own: a step held open (a
/// slow target, a hanging hook) must not leave the end of the audit log
/// unanchored in the state, where cutting it off would go unnoticed.
const CARRY_LIMIT: Duration = Duration::from_millis(200);

/// Whether the record of `step` (its audit record and state writes) may wait
/// for the next step's, so that both cost one fsync of the audit log: the
/// next step records it, or a crash before that replays `step` and then the
/// next, each idempotent per rotation id, which is the replay a crash inside
/// the next step already causes. The record is never held past a vault
/// write that the replayed step would then follow in the wrong order:
/// `create` waits only for `set`/`test` (not for `promote`, after which a
/// replayed `create` would stage again), `set` for `test`, `promote` for
/// `deliver`, and a `retire` for the `start` of the next rotation. The
/// `start` record itself waits for the next recorded step too (it is
/// appended after the rotation's row is committed; see [`Inner::begin`]).
/// Invariant 2 does not rest on these records: the vault makes the staged
/// value durable itself before `create` returns.
pub(super) fn records_later(step: Step, entry: &CredEntry) -> bool {
    match step {
        Step::Create => matches!(next_step(step, entry), Step::Set | Step::Test),
        Step::Set | Step::Promote | Step::Retire => true,
        Step::Test | Step::Deliver | Step::Done => false,
    }
}

/// The step after `step` for this credential: `set` and `test` are skipped
/// without a target (each step costs an audit record and a state commit).
pub(super) fn next_step(step: Step, entry: &CredEntry) -> Step {
    let mut next = step.next();
    while matches!(next, Step::Set | Step::Test) && entry.target.is_none() {
        next = next.next();
    }
    next
}

/// The server's `Retry-After` wins over a shorter back-off delay. Capped so
/// a hostile or broken header cannot park a step for days.
pub(super) fn honour_retry_after(backoff: Duration, e: &PluginError) -> Duration {
    not_before(backoff, e.retry_after)
}

/// `delay`, lengthened to a server's `Retry-After` (capped at 5 min).
pub(super) fn not_before(delay: Duration, retry_after: Option<Duration>) -> Duration {
    const MAX_RETRY_AFTER: Duration = Duration::from_secs(300);
    match retry_after {
        Some(after) => delay.max(after.min(MAX_RETRY_AFTER)),
        None => delay,
    }
}

/// The delays between attempts of one step: capped exponential with jitter,
/// `max_attempts - 1` of them.
pub(super) fn step_backoff(retry: RetryConfig) -> impl Iterator<Item = Duration> {
    ExponentialBuilder::default()
        .with_min_delay(retry.initial_delay)
        .with_max_delay(retry.max_delay)
        .with_max_times(retry.max_attempts.saturating_sub(1) as usize)
        .with_jitter()
        .build()
}

pub(super) fn entry_retry(catalog: &Catalog) -> RetryConfig {
    catalog.config.daemon.retry
}

pub(super) fn before(step: Step) -> &'static str {
    match step {
        Step::Create => "rotation.before_create",
        Step::Set => "rotation.before_set",
        Step::Test => "rotation.before_test",
        Step::Promote => "rotation.before_promote",
        Step::Deliver => "rotation.before_deliver",
        Step::Retire | Step::Done => "rotation.before_retire",
    }
}

pub(super) fn after(step: Step) -> &'static str {
    match step {
        Step::Create => "rotation.after_create",
        Step::Set => "rotation.after_set",
        Step::Test => "rotation.after_test",
        Step::Promote => "rotation.after_promote",
        Step::Deliver => "rotation.after_deliver",
        Step::Retire | Step::Done => "rotation.after_retire",
    }
}

/// What a step's audit record adds to the rotation's own fields: the
/// retire step names the version it retires (the record's `version` is the
/// rotation's, the new one).
fn step_detail(step: Step, rot: &RotationRow) -> Option<String> {
    match (step, rot.previous_version) {
        (Step::Retire, Some(v)) => Some(format!("retires version {v}")),
        // The step still ran (holdout reports, pruning) but retired nothing.
        (Step::Retire, None) => Some("no previous version".to_owned()),
        _ => None,
    }
}

#[cfg(test)]
mod retry_after_tests {
    use super::*;

    #[test]
    fn a_servers_retry_after_lengthens_a_shorter_backoff_but_is_capped() {
        let throttled = |after: Option<u64>| {
            PluginError::new(ErrorKind::Throttled, "429")
                .with_retry_after(after.map(Duration::from_secs))
        };
        let backoff = Duration::from_millis(500);
        assert_eq!(honour_retry_after(backoff, &throttled(None)), backoff);
        assert_eq!(
            honour_retry_after(backoff, &throttled(Some(7))),
            Duration::from_secs(7)
        );
        assert_eq!(
            honour_retry_after(Duration::from_secs(30), &throttled(Some(7))),
            Duration::from_secs(30),
            "a longer back-off is kept"
        );
        assert_eq!(
            honour_retry_after(backoff, &throttled(Some(86_400))),
            Duration::from_secs(300),
            "capped"
        );
    }
}
