//! Job lifecycle: a manual trigger or a due timer becomes a tracked task
//! that runs a rotation (or a retirement), then records how it ended and
//! arms the credential's next timers.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use super::catalog::{CredEntry, VaultHandle};
use super::engine::{Inner, Stop, chrono_dur};
use super::step::{Step, Trigger};
use super::steps::{entry_retry, not_before};
use super::table::{Job, Parked, RotateFinished, Running};
use crate::config::RetryConfig;
use crate::model::CredentialKey;

/// Longest wait before a parked (failed) rotation is tried again.
const MAX_PARK_DELAY: Duration = Duration::from_secs(3600);

impl Inner {
    pub(super) fn trigger(
        self: Arc<Self>,
        key: &CredentialKey,
    ) -> Option<oneshot::Receiver<RotateFinished>> {
        self.trigger_as(key, Trigger::Manual)
    }

    /// [`Self::trigger`], recorded as `why` (a manual one, or a catch-up
    /// the daemon decided).
    pub(super) fn trigger_as(
        self: Arc<Self>,
        key: &CredentialKey,
        why: Trigger,
    ) -> Option<oneshot::Receiver<RotateFinished>> {
        let catalog = self.catalog();
        if catalog.creds.get(key)?.policy.follow.is_some() || self.is_retired(&key.agent) {
            // Rotated by another keyturn; the control API says so first.
            return None;
        }
        let (tx, rx) = oneshot::channel();
        let start = {
            let mut live = self.live();
            let l = live.entry(key);
            l.waiters.get_or_insert_default().push(tx);
            let running = l.running.as_ref().map(|r| r.job);
            // The rotation that runs for this trigger (now, or after the
            // retire or restore running) is a manual one; a running
            // rotation is joined as it is.
            if running != Some(Job::Rotate) && l.next_trigger != Some(Trigger::Initial) {
                l.next_trigger = Some(why);
            }
            match running {
                None => true,
                Some(Job::Rotate) => false,
                Some(_) => {
                    l.rotate_after_retire = true;
                    false
                }
            }
        };
        if start {
            self.live().cancel(key, Job::Rotate);
            // A task per trigger, waiting for a slot of the global limit.
            // (Queueing them as timers instead kept `rotate all` at 100k
            // credentials from parking 100k tasks — ~300 MB for the length
            // of the burst — but halved its rate in the 100k benchmark, for
            // reasons not yet understood; see BENCHMARKS.md.)
            self.spawn_job(key.clone(), Job::Rotate, None);
        }
        Some(rx)
    }

    /// Counts a finished job; when the engine is idle again, the burst is
    /// reported to the one place that decides when freed heap goes back to
    /// the OS ([`crate::memory`]).
    pub(super) fn after_job(self: &Arc<Self>) {
        self.finished_since_trim.fetch_add(1, Ordering::SeqCst);
        if self.in_flight.fetch_sub(1, Ordering::SeqCst) == 1 {
            let jobs = self.finished_since_trim.swap(0, Ordering::SeqCst);
            crate::memory::freed(crate::memory::Freed::Jobs(jobs));
        }
    }

    /// Marks the credential busy and runs the job in a tracked task.
    pub(super) fn spawn_job(
        self: Arc<Self>,
        key: CredentialKey,
        job: Job,
        permit: Option<tokio::sync::OwnedSemaphorePermit>,
    ) {
        if self.is_retired(&key.agent) {
            // Decommissioned: nothing of it runs any more; what is waiting
            // is told so.
            self.finish_waiters(&key, "the agent is decommissioned");
            return;
        }
        let catalog = self.catalog();
        let entry = match catalog.creds.get(&key) {
            Some(e) => e.clone(),
            // Not configured: only a pending retirement may still run.
            None if job == Job::Retire => match self.departed_entries().get(&key) {
                Some(e) => e.clone(),
                None => return,
            },
            None => return,
        };
        {
            let mut live = self.live();
            let l = live.entry(&key);
            if let Some(running) = &l.running {
                // A rotation that is already running reschedules itself when
                // it ends and retires the previous version first; a retire
                // (or restore) in progress hands over to the rotation when
                // it ends. A restore asked for meanwhile runs after the job:
                // a rotation started before a reload delivers only to the
                // sinks it started with.
                match job {
                    Job::Rotate if running.job != Job::Rotate => l.rotate_after_retire = true,
                    Job::Restore => l.restore_after = true,
                    _ => {}
                }
                return;
            }
            // A rotation due by its schedule while the retirement before it
            // is parked waits for that retirement's next attempt (it would
            // begin by running the same failing step: two attempts, two
            // failures counted); the retirement hands over to it when it
            // ends. One asked for by `keyturn rotate` runs now.
            let retire_parked = l
                .parked
                .as_ref()
                .is_some_and(|p| p.step == Some(Step::Retire));
            if job == Job::Rotate
                && retire_parked
                && !matches!(l.next_trigger, Some(Trigger::Manual | Trigger::Initial))
                && live.deadline(&key, Job::Retire).is_some()
            {
                live.entry(&key).rotate_after_retire = true;
                return;
            }
            let l = live.entry(&key);
            l.running = Some(Box::new(Running {
                job,
                rotation: None,
                step: match job {
                    Job::Rotate => Step::Create,
                    Job::Retire => Step::Retire,
                    Job::Restore => Step::Deliver,
                },
                version: None,
                attempts: 0,
                last_error: None,
            }));
        }
        let tracker = self.tracker.clone();
        tracker.spawn(async move {
            let permit = match permit {
                Some(p) => p,
                None => match self.global.clone().acquire_owned().await {
                    Ok(p) => p,
                    Err(_) => return,
                },
            };
            self.in_flight.fetch_add(1, Ordering::SeqCst);
            // Uncontended except across a reload (a credential renamed
            // while its rotation runs): `places.rs`.
            let places = self.places.hold(&entry).await;
            // Lets the fsyncing writers wait briefly for this job's records.
            let busy = crate::group_commit::Busy::enter();
            match job {
                Job::Rotate => self.clone().run_rotation(entry).await,
                Job::Retire => self.clone().run_retire(entry).await,
                Job::Restore => self.clone().run_restore(entry).await,
            }
            drop(busy);
            drop(places);
            drop(permit);
            self.wake.notify_one();
            if let Some(poke) = self.alert_poke.get() {
                poke.notify_one();
            }
            self.after_job();
        });
    }

    pub(super) async fn run_rotation(self: Arc<Self>, entry: Arc<CredEntry>) {
        let key = entry.key().clone();
        let started = Instant::now();
        let _vault_permits = vault_permits(&entry).await;
        let result = self.rotate(&entry).await;
        let now = self.now();
        // A reload during the rotation may have changed the schedule.
        let reloaded = self
            .catalog()
            .creds
            .get(&key)
            .filter(|e| !Arc::ptr_eq(e, &entry))
            .cloned();
        let reschedule = {
            let mut live = self.live();
            let l = live.entry(&key);
            let last_run = l.running.take();
            let waiters = l.waiters.take().map(|w| *w).unwrap_or_default();
            let (finished, reschedule) = match result {
                Ok(rot) => {
                    l.parked = None;
                    l.set_retire(rot.retire_at, rot.previous_version);
                    // The next one is due by the schedule configured now:
                    // a period shortened by a reload during the rotation
                    // counts from this rotation, not one old period later.
                    if let Some(now_entry) = &reloaded
                        && let Some(row) = l.row.as_mut()
                        && let Some(at) = row.last_rotated_at
                    {
                        row.next_due = now_entry.policy.schedule.next_due(
                            at,
                            now_entry.offset(),
                            rot.previous_version.is_none(),
                        );
                    }
                    let row = l.row.clone();
                    let next = row.as_ref().and_then(|r| r.next_due);
                    l.next_trigger = Some(Trigger::Schedule);
                    self.metrics.rotation_finished(true, started.elapsed());
                    tracing::info!(agent = %key.agent, credential = %key.credential, version = rot.version, rotation = %rot.id, "rotated");
                    (
                        RotateFinished {
                            key: key.clone(),
                            rotation: Some(rot.id),
                            version: Some(rot.version),
                            error: None,
                        },
                        vec![
                            (Job::Rotate, next),
                            (
                                Job::Retire,
                                self.retire_time(&key, rot.version, rot.retire_at),
                            ),
                        ],
                    )
                }
                Err(Stop::Failed(msg, retry_after)) => {
                    let failures = failures_now(l);
                    l.parked = Some(Box::new(Parked {
                        rotation: last_run.as_ref().and_then(|r| r.rotation.clone()),
                        step: last_run.as_ref().map(|r| r.step),
                        version: last_run.as_ref().and_then(|r| r.version),
                        failures,
                    }));
                    // A failure outside every step (the rotation could not
                    // even be recorded as begun: a full disk, a moved audit
                    // log) set no error on the row: status shows this one.
                    if let Some(row) = l.row.as_mut()
                        && row.last_error.is_none()
                    {
                        let prefix = format!("{key}: ");
                        row.last_error = Some(msg.strip_prefix(&prefix).unwrap_or(&msg).into());
                    }
                    let delay = not_before(
                        park_delay(&entry_retry(&self.catalog()), failures),
                        retry_after,
                    );
                    self.metrics.rotation_finished(false, started.elapsed());
                    tracing::warn!(agent = %key.agent, credential = %key.credential, error = %msg, retry_in = %humantime::format_duration(delay), "rotation failed; parked");
                    // The parked rotation's id and version, as status
                    // shows them (black-box finding: `rotate --wait --json`
                    // named neither).
                    let parked = l.parked.as_deref();
                    (
                        RotateFinished {
                            key: key.clone(),
                            rotation: parked.and_then(|p| p.rotation.clone()),
                            version: parked.and_then(|p| p.version),
                            error: Some(msg),
                        },
                        vec![(Job::Rotate, Some(now + chrono_dur(delay)))],
                    )
                }
                Err(Stop::Drained) => (
                    RotateFinished {
                        key: key.clone(),
                        rotation: None,
                        version: None,
                        error: Some(
                            "the daemon is stopping; the rotation resumes at its next start".into(),
                        ),
                    },
                    vec![],
                ),
                Err(Stop::Removed) => {
                    tracing::info!(agent = %key.agent, credential = %key.credential, "a rotation not begun yet is dropped: a reload removed the credential from the config");
                    (
                        RotateFinished {
                            key: key.clone(),
                            rotation: None,
                            version: None,
                            error: Some(
                                "not rotated: a reload removed it from the config before the rotation began"
                                    .into(),
                            ),
                        },
                        vec![],
                    )
                }
                Err(Stop::Abandoned) => (
                    RotateFinished {
                        key: key.clone(),
                        rotation: None,
                        version: None,
                        error: Some(
                            "abandoned: the agent is decommissioned (its credentials are being revoked)"
                                .into(),
                        ),
                    },
                    vec![],
                ),
            };
            for w in waiters {
                let _ = w.send(finished.clone());
            }
            reschedule
        };
        let configured = self.catalog().creds.contains_key(&key);
        if !configured && self.live().get(&key).is_some_and(|l| l.retire_at.is_some()) {
            // Removed by a reload while it ran: the retirement it set up
            // still happens, with this entry.
            self.departed_entries().insert(key.clone(), entry.clone());
        }
        let restore = {
            let mut live = self.live();
            for (job, at) in reschedule {
                if let Some(at) = at
                    && (configured || job == Job::Retire)
                {
                    live.schedule(&key, job, at);
                }
            }
            live.get_mut(&key)
                .is_some_and(|l| std::mem::take(&mut l.restore_after))
        };
        if restore && configured && !self.cancel.is_cancelled() {
            self.spawn_job(key, Job::Restore, None);
        }
    }

    pub(super) async fn run_retire(self: Arc<Self>, entry: Arc<CredEntry>) {
        let key = entry.key().clone();
        if self.is_retired(&key.agent) {
            // The revocation destroys every version; nothing to retire.
            if let Some(l) = self.live().get_mut(&key) {
                l.running = None;
                l.retire_at = None;
            }
            return;
        }
        let _vault_permits = vault_permits(&entry).await;
        let k = key.clone();
        let mut retiring = None;
        // A retirement taken over from a rotator (see `follow.rs`), due
        // later: armed rather than run.
        let mut armed = None;
        // `adopted`: taken over just now (a retire step of this host's own
        // runs when asked: at its grace's end, or early once all acked).
        let latest = match self.load(move |s| s.latest_rotation(&k)).await {
            Ok(Some(rot)) if rot.step == Step::Retire => Ok((Some(rot), false)),
            Ok(latest) => self
                .adopt_takeover(&entry, latest.as_ref())
                .await
                .map(|adopted| (adopted, true))
                .map_err(|e| Stop::Failed(e.to_string(), e.retry_after)),
            Err(e) => Err(Stop::Failed(e.to_string(), None)),
        };
        let result = match latest {
            Ok((Some(rot), true)) if rot.retire_at.is_some_and(|at| at > self.now()) => {
                armed = rot.retire_at.map(|at| (at, rot.previous_version));
                Ok(())
            }
            Ok((Some(mut rot), _)) => {
                retiring = Some(rot.id.clone());
                let mut run = super::steps::RunMemory::default();
                self.run_step(&entry, &mut rot, &mut run, None).await
            }
            Ok((None, _)) => Ok(()),
            Err(e) => Err(e),
        };
        let retire_failed = matches!(result, Err(Stop::Failed(..)));
        let next = {
            let mut live = self.live();
            let l = live.entry(&key);
            l.running = None;
            let mut retry_at = None;
            match result {
                Ok(()) if let Some((at, previous)) = armed => {
                    l.set_retire(Some(at), previous);
                    retry_at = Some(at);
                }
                Ok(()) => {
                    l.set_retire(None, None);
                    l.parked = None;
                    if let Some(row) = l.row.as_mut() {
                        row.last_error = None;
                        row.consecutive_failures = 0;
                        row.failing_since = None;
                    }
                    if !self.catalog().creds.contains_key(&key) {
                        self.departed_entries().remove(&key);
                    }
                }
                Err(Stop::Failed(msg, retry_after)) => {
                    // Parked after its retries, like any failed step: the
                    // row shows the error (the step's failure path set it)
                    // and status the step until a retry succeeds; the
                    // retries wait longer each time, up to an hour.
                    let failures = failures_now(l);
                    l.parked = Some(Box::new(Parked {
                        rotation: retiring,
                        step: Some(Step::Retire),
                        version: None,
                        failures,
                    }));
                    let delay = not_before(
                        park_delay(&entry_retry(&self.catalog()), failures),
                        retry_after,
                    );
                    tracing::warn!(agent = %key.agent, credential = %key.credential, error = %msg, retry_in = %humantime::format_duration(delay), "retiring the previous version failed; parked");
                    retry_at = Some(self.now() + chrono_dur(delay));
                }
                Err(Stop::Drained) | Err(Stop::Abandoned) | Err(Stop::Removed) => {}
            }
            let mut rotate_next =
                std::mem::take(&mut l.rotate_after_retire) && !self.cancel.is_cancelled();
            // A rotation that fell due by its schedule while the retirement
            // failed waits for the retirement's next attempt (it would
            // begin by running the same failing step again at once: two
            // attempts, two failures counted, after a restart: black-box
            // finding); one asked for by `keyturn rotate` runs now, and
            // says how it went.
            if rotate_next && retire_failed && l.next_trigger != Some(Trigger::Manual) {
                l.rotate_after_retire = true;
                rotate_next = false;
            }
            let restore_next = std::mem::take(&mut l.restore_after) && !self.cancel.is_cancelled();
            if let Some(at) = retry_at {
                live.schedule(&key, Job::Retire, at);
            }
            // A rotation delivers to every sink the credential has now.
            if rotate_next {
                Some(Job::Rotate)
            } else if restore_next && self.catalog().creds.contains_key(&key) {
                Some(Job::Restore)
            } else {
                None
            }
        };
        if let Some(job) = next {
            self.spawn_job(key, job, None);
        }
    }
}

/// One permit of each of the credential's vaults, taken in name order so that
/// two credentials sharing vaults cannot each hold one and wait for the other.
pub(super) async fn vault_permits(entry: &CredEntry) -> Vec<tokio::sync::OwnedSemaphorePermit> {
    let mut handles: Vec<&Arc<VaultHandle>> = entry.vaults.iter().collect();
    handles.sort_by(|a, b| a.config.name.cmp(&b.config.name));
    let mut permits = Vec::with_capacity(handles.len());
    for h in handles {
        if let Ok(p) = h.limit.clone().acquire_owned().await {
            permits.push(p);
        }
    }
    permits
}

/// The consecutive failures of a credential whose job just failed, for its
/// back-off: the row's count, or one more than the park before counted
/// when the row's did not move (black-box finding: with the state disk
/// full no failure was recorded, and every credential was retried every
/// `max_delay` for as long as the disk stayed full, flooding the log).
fn failures_now(l: &super::table::CredLive) -> u32 {
    let recorded = l.row.as_ref().map_or(0, |r| r.consecutive_failures);
    let parked = l.parked.as_ref().map_or(0, |p| p.failures);
    recorded.max(parked.saturating_add(1)).max(1)
}

/// How long a parked rotation waits: the retry ceiling doubled per
/// consecutive failure, capped at an hour.
pub(super) fn park_delay(retry: &RetryConfig, failures: u32) -> Duration {
    let factor = 1u32 << failures.saturating_sub(1).min(10);
    (retry.max_delay * factor).min(MAX_PARK_DELAY)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn park_delay_doubles_and_caps() {
        let r = RetryConfig {
            initial_delay: Duration::from_secs(1),
            max_delay: Duration::from_secs(60),
            max_attempts: 3,
        };
        assert_eq!(park_delay(&r, 1), Duration::from_secs(60));
        assert_eq!(park_delay(&r, 2), Duration::from_secs(120));
        assert_eq!(park_delay(&r, 30), MAX_PARK_DELAY);
    }
}
