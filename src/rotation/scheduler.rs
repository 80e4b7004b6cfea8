//! The scheduler: one loop pops due timers and starts their jobs; arming
//! every credential's timers at start-up and reload, catch-up included.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};

use super::catalog::{Catalog, CredEntry};
use super::engine::{Engine, Inner};
use super::footprint::Footprint;
use super::step::{Step, Trigger};
use super::table::{Job, Keep, Table};
use crate::model::CredentialKey;
use crate::schedule::catch_up_times;
use crate::state::RotationRow;

impl Engine {
    /// Runs the scheduler until the engine is cancelled. `watchdog` is called
    /// at least every `watchdog_every` from this loop, so a stuck scheduler
    /// stops the pings and systemd restarts the daemon.
    pub async fn run_scheduler(
        &self,
        watchdog_every: Option<Duration>,
        mut watchdog: impl FnMut(),
    ) {
        let inner = &self.inner;
        let mut last_ping = Instant::now();
        if watchdog_every.is_some() {
            watchdog();
        }
        loop {
            inner.start_due(inner.now(), inner.global.available_permits());
            let next = inner.live().next_deadline();
            let mut sleep = match next {
                Some(t) => (t - inner.now()).to_std().unwrap_or(Duration::ZERO),
                None => Duration::from_secs(60),
            };
            // Wall clocks jump; never sleep long on one reading of it.
            sleep = sleep.min(Duration::from_secs(60));
            if let Some(every) = watchdog_every {
                sleep = sleep.min(every.saturating_sub(last_ping.elapsed()));
            }
            if inner.global.available_permits() == 0 && next.is_some_and(|t| t <= inner.now()) {
                // Saturated: wait for a rotation to finish (it wakes us).
                sleep = sleep.max(Duration::from_millis(1));
            }
            let (wall, mono) = (inner.now(), tokio::time::Instant::now());
            tokio::select! {
                _ = tokio::time::sleep(sleep) => {}
                _ = inner.wake.notified() => {}
                _ = inner.cancel.cancelled() => break,
            }
            let moved = inner.now() - wall;
            let jumped = moved.to_std().unwrap_or_default();
            let jumped = jumped.saturating_sub(mono.elapsed());
            if jumped >= CLOCK_JUMP {
                inner.spread_after_jump(jumped);
            }
            // Stepped back: `mono.elapsed()` passed while the wall clock
            // moved less (or back).
            let back =
                chrono::Duration::from_std(mono.elapsed()).unwrap_or(chrono::Duration::MAX) - moved;
            if let Ok(back) = back.to_std()
                && back >= CLOCK_JUMP
            {
                inner.shift_after_step_back(back);
            }
            if let Some(every) = watchdog_every
                && last_ping.elapsed() >= every
            {
                watchdog();
                last_ping = Instant::now();
            }
        }
    }
}

/// A forward step of the wall clock, beyond the time the scheduler waited,
/// that [`Inner::spread_after_jump`] takes for a resume from suspend or a
/// clock set right, not for drift.
const CLOCK_JUMP: Duration = Duration::from_secs(60);

impl Inner {
    /// The wall clock stepped `jumped` ahead while the scheduler waited (a
    /// VM resumed from suspend, NTP stepping a clock that was behind): the
    /// scheduled rotations that came due meanwhile would all start at once.
    /// Like rotations overdue after downtime, they are spread over
    /// `catch_up_spread`, most overdue first, when there are two or more.
    /// Retirements, manual and first rotations and parked retries keep
    /// their time.
    pub(super) fn spread_after_jump(&self, jumped: Duration) {
        let now = self.now();
        let spread = self.catalog().config.daemon.catch_up_spread;
        let mut live = self.live();
        // Earliest first: the most overdue first.
        let due = live.pop_due_limit(now, usize::MAX);
        let (scheduled, keep): (Vec<_>, Vec<_>) = due.into_iter().partition(|(key, job)| {
            *job == Job::Rotate
                && live.get(key).is_some_and(|l| {
                    l.running.is_none()
                        && l.parked.is_none()
                        && matches!(l.next_trigger, Some(Trigger::Schedule | Trigger::CatchUp))
                })
        });
        for (key, job) in keep {
            live.schedule(&key, job, now);
        }
        if scheduled.len() < 2 {
            for (key, job) in scheduled {
                live.schedule(&key, job, now);
            }
            return;
        }
        tracing::warn!(
            jumped = %humantime::format_duration(Duration::from_secs(jumped.as_secs())),
            due = scheduled.len(),
            "the wall clock stepped forward (a resume from suspend, or the clock set right): the scheduled rotations that came due meanwhile are spread over catch_up_spread",
        );
        let times = catch_up_times(now, scheduled.len(), spread);
        for ((key, job), at) in scheduled.into_iter().zip(times) {
            if let Some(l) = live.get_mut(&key) {
                l.next_trigger = Some(Trigger::CatchUp);
            }
            live.schedule(&key, job, at);
        }
    }

    /// The wall clock stepped `back` while the scheduler waited (a clock
    /// that ran ahead set right): every timer, set in wall time, would come
    /// `back` late, so rotations and retirements stopped until the clock
    /// caught up (black-box finding: an hour of nothing, the previous
    /// version live past its grace). Each timer moves `back` earlier: it
    /// comes when it would have.
    pub(super) fn shift_after_step_back(&self, back: Duration) {
        let Ok(by) = chrono::Duration::from_std(back) else {
            return;
        };
        let catalog = self.catalog();
        let departed: Vec<CredentialKey> = self.departed_entries().keys().cloned().collect();
        let mut live = self.live();
        let mut moved = 0usize;
        for key in catalog.creds.keys().chain(departed.iter()) {
            for job in [Job::Rotate, Job::Retire] {
                if let Some(at) = live.deadline(key, job) {
                    live.schedule(key, job, at - by);
                    moved += 1;
                }
            }
            if let Some(l) = live.get_mut(key)
                && let Some(at) = l.retire_at
            {
                l.retire_at = Some(at - by);
            }
        }
        tracing::warn!(
            back = %humantime::format_duration(Duration::from_secs(back.as_secs())),
            timers = moved,
            "the wall clock stepped back (a clock that ran ahead set right): every rotation and retirement timer moves back with it",
        );
    }

    /// Starts the jobs due at `now`, at most `free` of them: the room the
    /// global limit had when it was read, a moment before. A manual trigger
    /// may have taken a slot since; then the job that finds no slot and
    /// every other one popped go back in the queue, due now (dropping them
    /// would lose their timers and leave their `rotate --wait` callers
    /// waiting).
    pub(super) fn start_due(self: &Arc<Self>, now: DateTime<Utc>, free: usize) {
        let mut due = self.live().pop_due_limit(now, free).into_iter();
        while let Some((key, job)) = due.next() {
            match self.global.clone().try_acquire_owned() {
                Ok(permit) => self.clone().spawn_job(key, job, Some(permit)),
                Err(_) => {
                    let mut live = self.live();
                    live.schedule(&key, job, now);
                    for (key, job) in due.by_ref() {
                        live.schedule(&key, job, now);
                    }
                }
            }
        }
    }

    /// Arms the timers of every credential in the catalog.
    pub(super) fn schedule_all(&self, resume: &HashSet<CredentialKey>, at_start: bool) {
        let catalog = self.catalog();
        let now = self.now();
        let mut live = self.live();
        live.reserve_total(catalog.creds.len());
        let mut overdue: Vec<(DateTime<Utc>, CredentialKey)> = Vec::new();
        let not_before = std::mem::take(
            &mut *self
                .resume_not_before
                .lock()
                .unwrap_or_else(|p| p.into_inner()),
        );
        // In key order (the catalog's).
        for entry in catalog.creds.values() {
            let key = entry.key();
            // A decommission the config declares in effect is acted on
            // right after (`crate::revocation`): nothing is made for it.
            let declared = entry
                .agent
                .decommissioned
                .as_ref()
                .is_some_and(|d| d.in_effect(now));
            if entry.policy.follow.is_some() || self.is_retired(&key.agent) || declared {
                // Rotated by another keyturn (see `follow.rs`), or
                // decommissioned (`retired.rs`): no timers. But a
                // credential rotated here until this config followed it
                // still owes the retirement of the version before its
                // last one here (black-box finding: it stayed `retiring`
                // for good, that version never destroyed).
                let owed =
                    entry.policy.follow.is_some() && !self.is_retired(&key.agent) && !declared;
                let retire_at = live.entry(key).retire_at.filter(|_| owed);
                live.cancel(key, Job::Rotate);
                match retire_at {
                    Some(at) => live.schedule(key, Job::Retire, at),
                    None => live.cancel(key, Job::Retire),
                }
                continue;
            }
            // A catch-up slot this credential still waits for (see below).
            let catch_up_slot = live.deadline(key, Job::Rotate);
            // A parked retirement's next attempt (see below).
            let retire_armed = live.deadline(key, Job::Retire);
            let l = live.entry(key);
            let catch_up_slot = catch_up_slot.filter(|_| l.next_trigger == Some(Trigger::CatchUp));
            // A clock that ran ahead stamped the last rotation in the
            // future, and its retirement more than `grace` from now
            // (black-box finding): that retirement comes `grace` from now
            // at the latest. (Only then: a `grace` shortened by a reload
            // does not retire early what its notice promised.)
            let ahead = l
                .row
                .as_ref()
                .and_then(|r| r.last_rotated_at)
                .is_some_and(|t| t > now);
            let latest = chrono::Duration::from_std(entry.policy.grace)
                .ok()
                .and_then(|g| now.checked_add_signed(g));
            let retire_at = match (l.retire_at, latest) {
                (Some(at), Some(latest)) if ahead => Some(at.min(latest)),
                (at, _) => at,
            };
            l.retire_at = retire_at;
            // Black-box finding: a reload re-armed a parked retirement at
            // its grace deadline, long past, so every reload ran the
            // failing step again at once and doubled its back-off (an hour
            // within minutes). It keeps its next attempt.
            // So does a restart (`Inner::resume_not_before`).
            let retire_armed = retire_armed.or_else(|| not_before.get(key).copied());
            let retire_at = match (retire_at, retire_armed) {
                (Some(at), Some(armed)) if !ahead && l.parked.is_some() => Some(at.max(armed)),
                (at, _) => at,
            };
            // The rotate timer: `Some(Some(at))` sets it, `Some(None)`
            // cancels it, `None` leaves it as it is.
            let rotate = if l.running.is_some() {
                None
            } else {
                let last = l.row.as_ref().and_then(|r| r.last_rotated_at);
                let has_version = l.row.as_ref().and_then(|r| r.current_version).is_some();
                if resume.contains(key) {
                    Some(Some(not_before.get(key).map_or(now, |at| (*at).max(now))))
                } else if !has_version || last.is_none() {
                    l.next_trigger = Some(Trigger::Initial);
                    Some(Some(now))
                } else if l.parked.is_some() && !at_start {
                    // Keep the retry time it already has.
                    None
                } else {
                    // A last rotation in the future was stamped by a
                    // clock that ran ahead: counted from now, not from
                    // then (nothing rotated until the clock caught up).
                    let last = last.expect("checked above").min(now);
                    // The first version is number 1 (`begin`).
                    let first = l.row.as_ref().and_then(|r| r.current_version) == Some(1);
                    match entry.policy.schedule.next_due(last, entry.offset(), first) {
                        Some(due) if due <= now && at_start => {
                            overdue.push((due, key.clone()));
                            None
                        }
                        // A reload during the catch-up window: a credential
                        // still overdue keeps the slot it was given (its
                        // schedule may have changed), so the rest of the
                        // window is not rotated all at once.
                        Some(due) if due <= now && catch_up_slot.is_some() => None,
                        Some(due) => {
                            l.next_trigger = Some(Trigger::Schedule);
                            Some(Some(due.max(now)))
                        }
                        None => Some(None),
                    }
                }
            };
            if let Some(at) = retire_at {
                live.schedule(key, Job::Retire, at);
            }
            match rotate {
                Some(Some(at)) => live.schedule(key, Job::Rotate, at),
                Some(None) => live.cancel(key, Job::Rotate),
                None => {}
            }
        }
        // Most overdue first, spread over the catch-up window.
        overdue.sort();
        let times = catch_up_times(now, overdue.len(), catalog.config.daemon.catch_up_spread);
        for ((_, key), at) in overdue.into_iter().zip(times) {
            if let Some(l) = live.get_mut(&key) {
                l.next_trigger = Some(Trigger::CatchUp);
            }
            live.schedule(&key, Job::Rotate, at);
        }
    }

    /// Takes an unfinished rotation of a configured credential from state:
    /// one waiting for its retire step gets its retire time, any other one
    /// resumes now.
    pub(super) fn adopt_unfinished(
        &self,
        live: &mut Table,
        rot: RotationRow,
        resume: &mut HashSet<CredentialKey>,
    ) {
        let l = live.entry(&rot.key);
        if rot.step == Step::Retire {
            l.set_retire(
                Some(rot.retire_at.unwrap_or_else(|| self.now())),
                rot.previous_version,
            );
        } else {
            l.next_trigger = Some(rot.trigger);
            resume.insert(rot.key);
        }
    }

    /// Arms the pending retirement of a credential that is not configured,
    /// with an entry rebuilt from its rotation's footprint.
    pub(super) fn adopt_departed(&self, live: &mut Table, catalog: &Catalog, rot: &RotationRow) {
        let key = &rot.key;
        let entry = rot
            .footprint
            .as_deref()
            .ok_or_else(|| "its rotation predates footprints".to_owned())
            .and_then(Footprint::parse)
            .and_then(|fp| CredEntry::departed(key, &fp, catalog));
        match entry {
            Ok(entry) => {
                let at = rot.retire_at.unwrap_or_else(|| self.now());
                tracing::info!(agent = %key.agent, credential = %key.credential, version = ?rot.previous_version, retire_at = %at, "not in the config any more: its previous version is still retired when its grace period ends");
                self.departed_entries().insert(key.clone(), Arc::new(entry));
                live.entry(key).set_retire(Some(at), rot.previous_version);
                live.schedule(key, Job::Retire, at);
            }
            Err(why) => {
                tracing::error!(agent = %key.agent, credential = %key.credential, version = ?rot.previous_version, rotation = %rot.id, "not in the config any more and its previous version cannot be retired ({why}); add the credential back to retire it, or retire {} by hand", rot.previous_version.map_or("its previous version".to_string(), |v| format!("version {v}")));
            }
        }
    }

    /// Undoes, in the background, the rotations of credentials that left
    /// the config before they were promoted (see [`Inner::settle_departed`]),
    /// each with an entry rebuilt from its footprint.
    pub(super) fn settle_all_departed(
        self: &Arc<Self>,
        rotations: Vec<RotationRow>,
        catalog: &Catalog,
    ) {
        let mut work = Vec::with_capacity(rotations.len());
        for rot in rotations {
            let entry = rot
                .footprint
                .as_deref()
                .ok_or_else(|| "its rotation predates footprints".to_owned())
                .and_then(Footprint::parse)
                .and_then(|fp| CredEntry::departed(&rot.key, &fp, catalog));
            match entry {
                Ok(entry) => {
                    let current = self.unconfigured().get(&rot.key).map(|u| u.version);
                    // Taken now, before any job starts: a credential
                    // renamed to this one's place rotates after the undo.
                    let held = self.places.hold_now(&entry);
                    work.push((entry, rot, current, held));
                }
                Err(why) => {
                    tracing::error!(agent = %rot.key.agent, credential = %rot.key.credential, rotation = %rot.id, step = %rot.step, version = rot.version, "left the config in the middle of a rotation whose value may be set at the target, and it cannot be undone ({why}); add the credential back: the rotation resumes")
                }
            }
        }
        if work.is_empty() {
            return;
        }
        let inner = self.clone();
        self.tracker.spawn(async move {
            for (entry, rot, current, held) in work {
                let _held = match held {
                    Some(h) => h,
                    None => inner.places.hold(&entry).await,
                };
                inner.settle_departed(&entry, rot, current).await;
            }
        });
    }

    /// After a reload: credentials that left the config keep only a pending
    /// retirement (retired with the entry they had), the rest of their live
    /// state goes; those that came back are retired with their new entry.
    pub(super) fn forget_departed(&self, live: &mut Table, old: &Catalog, new: &Catalog) {
        let mut departed = self.departed_entries();
        departed.retain(|k, _| !new.creds.contains_key(k));
        live.retain(|k, l| {
            if new.creds.contains_key(k) || l.running.is_some() {
                // A rotation running for a removed credential finishes with
                // its entry, and hands its retirement over (run_rotation).
                return Keep::All;
            }
            if l.retire_at.is_none() {
                return Keep::Nothing;
            }
            if let Some(entry) = old.creds.get(k)
                && let Some(at) = l.retire_at
            {
                // (Black-box finding: it named a previous version that a
                // credential at its first version does not have, and
                // printed the time as `Some(...)`.)
                tracing::info!(agent = %k.agent, credential = %k.credential, retire_at = %at, "removed from the config: its pending retire step still runs when its grace period ends (a previous version, if any, is retired then)");
                departed.insert(k.clone(), entry.clone());
            }
            if departed.contains_key(k) {
                Keep::Retire
            } else {
                Keep::Nothing
            }
        });
    }
}
