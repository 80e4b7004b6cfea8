//! Follow mode: credentials another keyturn rotates (`mode = "follow"`).
//!
//! This keyturn never stages, promotes or retires a followed credential. It
//! watches the credential's (primary) vault for a new current version and
//! delivers it through the credential's sinks, with the same `delivery`
//! audit records as the deliver step of a rotation. One rotator, N
//! followers: replicas of one agent on several hosts share a credential.
//!
//! # One loop per vault and poll interval
//! Followed credentials are grouped by vault and `poll`; each group has one
//! loop that wakes every `poll` (±10 % jitter, so that followers started
//! together do not poll in step), and backs off exponentially (capped at
//! [`MAX_BACKOFF`]) while its vault fails. The loops are rebuilt from the
//! new catalog on reload and end on drain; what they know (the version each
//! credential was given) outlives a reload, and a restart finds it in state.
//!
//! A failed read of the vault is recorded on each credential it left
//! unchecked (the whole group when the change index cannot be read), as a
//! failed delivery is: its row counts the failure (`last_error` names the
//! vault, `failing_since` when it began), so `status` and the
//! `credentials{state}` gauge show it `failed`. It clears at the next read
//! that succeeds (see [`VaultFailed`]).
//!
//! # What one poll costs the vault
//! - With a change index on the vault (`change_index`, see
//!   [`crate::vaults::change_index`]): one metadata read of the index entry
//!   per poll, whatever the number of credentials; the index itself is read
//!   only when it changed, and a value only for a credential whose version
//!   changed. A credential the index lists as changed costs a metadata read
//!   and a value read.
//!
//!   As a safety net (a credential rotated by a keyturn that does not write
//!   the index, or by hand), the loop also reads credentials' own marks, in
//!   a round robin: **at most one** per poll, and no credential more often
//!   than once every [`SWEEP_POLLS`] polls (see [`sweep_pick`]). So the
//!   sweep adds at most one metadata read per poll whatever the number of
//!   credentials (and a value read only when a mark moved without the
//!   index saying so), and a change the index misses is delivered within
//!   `max(N, SWEEP_POLLS)` polls for N credentials: at `poll = "1s"` (±10 %
//!   jitter, longer while the vault fails), about 66 s for up to 60
//!   credentials and about 18 minutes for 1,000. A change the index records
//!   is delivered at the next poll.
//! - Without one: one metadata read per credential per poll
//!   ([`crate::vaults::Vault::current_mark`]: KV v2 metadata, AWS
//!   `DescribeSecret`, Azure's version list; the value itself on vaults
//!   without a cheaper call), and a read of the value when it changed.
//!
//! # Nudges
//! A follower with `[daemon] follow_nudge_key_file` accepts a signed
//! `POST /v1/follow/nudge` (see [`crate::api::http`]): the notice a
//! rotating keyturn's `webhook` sink sends. A nudge naming a followed
//! credential checks that credential at once ([`Engine::nudge`]: its
//! current version in the vault, the same check and delivery as a poll's;
//! not the change index, which the rotator writes after its sinks ran);
//! any other nudge wakes every follow loop for one early poll. At most one
//! nudge-triggered check per credential runs at a time: nudges arriving
//! meanwhile coalesce into one more check after it. A check (polled or
//! nudged) holds the credential's lock, so a version is never delivered
//! twice by a poll and a nudge racing. The poll goes on as before: a lost
//! nudge costs at most one poll interval.
//!
//! # Taking over
//! A followed credential switched to rotating here (its rotator's host is
//! gone; `mode` changed by a reload or a restart) may have a previous
//! version in the vault whose grace period the dead rotator never ended:
//! nothing here would retire it, since a promote retires only versions
//! older than the one the engine expects current. The promoted keyturn
//! adopts that pending retirement ([`Inner::adopt_takeover`]) at once (a
//! retire job armed for every such credential) and before its first
//! rotation, and retires that version when its grace ends, as the rotator
//! would have (at once if it ended already).
//!
//! # State
//! Each delivery records the version row (its vault ref) and the
//! credential row (`current_version`, `last_rotated_at`): after a restart a
//! version already delivered is not delivered again. Version numbers are
//! this keyturn's own (one more per version delivered); the rotation id in
//! the notice and the audit is the rotator's when the vault records it.
//!
//! # Layout
//! This file holds what the follow loops share, the nudges and the loop of
//! one vault; beside it, in `follow/`: `poll.rs` (one poll and the check
//! of one credential), `failure.rs` (vault failures on the rows),
//! `deliver.rs` (delivery, and restores of a followed credential's files),
//! `retire.rs` (grace ends and revocation) and `takeover.rs`.

mod deliver;
mod failure;
mod poll;
mod retire;
mod takeover;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use rand::Rng;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::catalog::{CredEntry, VaultHandle};
use super::engine::{Engine, Inner};
use super::footprint::Footprint;
use super::step::{Step, Trigger};
use crate::audit::Outcome;
use crate::generators;
use crate::model::{CredentialKey, PluginError, RotationId, Stage};
use crate::sinks::Notice;
use crate::state::{CredentialRow, Restage, RotationRow, VersionRow, Write};
use crate::vaults::{
    CurrentMark, Select, StoredVersion, VaultItem, VaultRefs, VersionRef, change_index,
};

/// The longest wait between polls of a failing vault.
pub(super) const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// With a change index, no credential is checked directly (the safety-net
/// sweep) more often than once per this many polls.
pub(super) const SWEEP_POLLS: usize = 60;
/// The shortest time between the starts of two polls of one loop when
/// nudges (for credentials it does not know by name) wake it early.
pub(super) const MIN_EARLY_GAP: Duration = Duration::from_millis(250);

/// The credential (an index into a group of `n`) that poll number `polls`
/// checks by its own mark in the safety-net sweep, if any: one every
/// `SWEEP_POLLS / n` polls when there are fewer than [`SWEEP_POLLS`]
/// credentials, one every poll otherwise, in turn. Each credential is
/// checked once in every `max(n, SWEEP_POLLS)` consecutive polls (at most).
pub(super) fn sweep_pick(polls: usize, n: usize) -> Option<usize> {
    if n == 0 {
        return None;
    }
    let stride = (SWEEP_POLLS / n).max(1);
    polls.is_multiple_of(stride).then(|| (polls / stride) % n)
}

/// What the follower knows of one followed credential.
#[derive(Debug, Clone, Default)]
struct Seen {
    /// Loaded from state (the version last delivered).
    loaded: bool,
    delivered: Option<VersionRef>,
    /// The credential's current mark when it was last checked (fallback
    /// polling without an index).
    mark: Option<CurrentMark>,
    /// Its row records a failure to read its vault (see [`VaultFailed`]).
    vault_failed: Option<VaultFailed>,
    /// Listed in the change index when the index was last read: a
    /// credential that leaves the index (its rotator destroyed it) is
    /// checked at once.
    listed: bool,
    /// Its rotator destroyed it (see [`Inner::follow_revoke`]); mirrors
    /// the live table's `follow_revoked`, which `status` reads.
    revoked: bool,
    /// When the grace period of the version delivered before the current
    /// one ends: what a sink kept of it for readers mid-read (a bundle's
    /// previous private key) goes then, as on the rotator.
    retire_at: Option<DateTime<Utc>>,
    /// Warned that its vault holds no current version yet (see
    /// [`Inner::warn_never_written`]).
    warned_empty: bool,
}

/// What clears the vault failure a followed credential's row records: the
/// failure is shown (status, the `failed` state) until a read of the vault
/// that would have failed the same way succeeds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum VaultFailed {
    /// The poll of its vault as a whole failed (the change index), or the
    /// row came from state with a failure recorded before a restart: the
    /// next poll of its group that reads the index (or, without one, gets
    /// to the credentials) clears it, as does a read of its own.
    Poll,
    /// A read of its own mark or value failed: only the next successful
    /// read of its own clears it.
    Own,
}

type Memory = Arc<Mutex<HashMap<CredentialKey, Seen>>>;

/// What the follow loops and the nudges share (one per engine): what the
/// follower knows, outliving reloads.
#[derive(Default)]
pub(super) struct Shared {
    memory: Memory,
    /// One lock per followed credential, held by each check: a poll and a
    /// nudge never deliver the same version twice.
    checking: Mutex<HashMap<CredentialKey, Arc<tokio::sync::Mutex<()>>>>,
    /// Credentials with a nudge-triggered check running; `true`: another
    /// nudge came meanwhile, check once more after it.
    nudged: Mutex<HashMap<CredentialKey, bool>>,
    /// Wakes every follow loop for an early poll.
    early: tokio::sync::Notify,
}

/// What a restore of a followed credential's missing files does (see
/// [`Inner::follow_restore`]).
pub(super) enum FollowRestore {
    /// Restore this value, the one delivered, under its version number.
    Same(StoredVersion),
    /// Done (a newer version delivered to every sink: this many files), or
    /// nothing to restore.
    Handled(usize),
}

/// What a nudge did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Nudged {
    /// A check of the followed credential started.
    Check,
    /// A check of it was already running: one more follows it.
    Coalesced,
    /// Not a credential this keyturn follows: every follow loop polls early.
    Poll,
}

fn lock_map<K, V>(m: &Mutex<HashMap<K, V>>) -> std::sync::MutexGuard<'_, HashMap<K, V>> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The followed credentials of one vault and poll interval.
type Group = (Arc<VaultHandle>, Vec<Arc<CredEntry>>);

fn lock(m: &Memory) -> std::sync::MutexGuard<'_, HashMap<CredentialKey, Seen>> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Counts a failed check of a followed credential in its `row` at `now`,
/// paced like the failures of a rotation: the first at once, and each next
/// one only once the run of failures has lasted as long as a failing
/// rotation would have waited for its next attempt by then (the parked
/// delays: `retry.max_delay`, doubled per failure, at most an hour). A
/// follower checks every `poll` (backing off to [`MAX_BACKOFF`]), far more
/// often than a parked rotation is retried: counted per check, a 15-second
/// vault outage reached `failures_warning = 2`. Paced, `failures_warning`
/// and `failures_critical` mean the same outage on a follower as on its
/// rotator, whatever `poll` is. The checks in between keep the count (and
/// record their error).
pub(super) fn count_check_failure(
    row: &mut CredentialRow,
    now: DateTime<Utc>,
    retry: &crate::config::RetryConfig,
) {
    let n = row.consecutive_failures;
    let Some(since) = row.failing_since.filter(|_| n > 0) else {
        row.count_failure(now);
        return;
    };
    // Past a few dozen failures every wait is the cap: bounded work.
    let waited: Duration = (1..=n.min(64))
        .map(|k| super::jobs::park_delay(retry, k))
        .sum::<Duration>()
        + super::jobs::park_delay(retry, 64) * n.saturating_sub(64);
    let due = chrono::Duration::from_std(waited)
        .ok()
        .and_then(|w| since.checked_add_signed(w));
    if due.is_some_and(|due| now >= due) {
        row.count_failure(now);
    }
}

/// The wait before the next poll: `poll` ±10 %, doubled per consecutive
/// failed poll up to [`MAX_BACKOFF`] (or `poll`, if that is longer).
pub(super) fn next_delay(poll: Duration, failures: u32) -> Duration {
    let base = if failures == 0 {
        poll
    } else {
        let factor = 1u32 << failures.min(16);
        poll.saturating_mul(factor).min(MAX_BACKOFF.max(poll))
    };
    let jitter = rand::thread_rng().gen_range(0.9..=1.1);
    base.mul_f64(jitter)
}

impl Engine {
    /// Follows every followed credential until the engine is cancelled;
    /// rebuilt from the catalog at each reload. A no-op loop (waiting for a
    /// reload) when nothing is followed.
    pub async fn run_followers(&self) {
        self.inner.clone().run_followers().await
    }

    /// A signed nudge named `key` (see the module's "Nudges"): checks it
    /// now if this keyturn follows it, else polls every followed vault
    /// early. Returns at once; the check runs in the background.
    pub fn nudge(&self, key: &CredentialKey) -> Nudged {
        self.inner.clone().nudge(key)
    }
}

impl crate::api::http::NudgeTarget for Engine {
    fn nudge(&self, key: &CredentialKey) {
        let how = Engine::nudge(self, key);
        tracing::debug!(agent = %key.agent, credential = %key.credential, ?how, "follow: nudged");
    }
}

impl Inner {
    fn nudge(self: Arc<Self>, key: &CredentialKey) -> Nudged {
        let entry = self
            .catalog()
            .creds
            .get(key)
            .filter(|e| e.policy.follow.is_some() && !self.is_retired(&key.agent))
            .cloned();
        let Some(entry) = entry else {
            self.follow.early.notify_waiters();
            return Nudged::Poll;
        };
        {
            let mut nudged = lock_map(&self.follow.nudged);
            if let Some(again) = nudged.get_mut(key) {
                *again = true;
                return Nudged::Coalesced;
            }
            nudged.insert(key.clone(), false);
        }
        let me = self.clone();
        self.tracker.spawn(async move {
            let key = entry.key();
            let memory = me.follow.memory.clone();
            loop {
                if me.cancel.is_cancelled() {
                    lock_map(&me.follow.nudged).remove(key);
                    return;
                }
                let checked = match me.load_delivered(std::slice::from_ref(&entry), &memory).await {
                    Ok(()) => me.follow_check(&entry, &memory).await,
                    Err(e) => Err(e),
                };
                if let Err(e) = checked {
                    // The poll retries it.
                    tracing::warn!(agent = %key.agent, credential = %key.credential, error = %e, "follow: nudged check failed; retried at the next poll");
                }
                let mut nudged = lock_map(&me.follow.nudged);
                if nudged.get(key) == Some(&true) {
                    nudged.insert(key.clone(), false);
                } else {
                    nudged.remove(key);
                    return;
                }
            }
        });
        Nudged::Check
    }

    async fn run_followers(self: Arc<Self>) {
        let memory: Memory = self.follow.memory.clone();
        loop {
            let catalog = self.catalog();
            let mut groups: BTreeMap<(String, Duration), Group> = BTreeMap::new();
            for e in catalog.creds.values() {
                if let Some(poll) = e.policy.follow
                    && !self.is_retired(&e.key().agent)
                {
                    let h = e.vaults[0].clone();
                    groups
                        .entry((h.config.name.clone(), poll))
                        .or_insert_with(|| (h, Vec::new()))
                        .1
                        .push(e.clone());
                }
            }
            drop(catalog);
            let round = self.cancel.child_token();
            let tasks = TaskTracker::new();
            for ((_, poll), (handle, entries)) in groups {
                tasks.spawn(self.clone().follow_vault(
                    handle,
                    entries,
                    poll,
                    memory.clone(),
                    round.clone(),
                ));
            }
            tasks.close();
            tokio::select! {
                _ = self.follow_reload.notified() => {
                    round.cancel();
                    tasks.wait().await;
                }
                _ = self.cancel.cancelled() => {
                    tasks.wait().await;
                    return;
                }
            }
        }
    }

    /// The loop of one vault (and poll interval).
    async fn follow_vault(
        self: Arc<Self>,
        handle: Arc<VaultHandle>,
        entries: Vec<Arc<CredEntry>>,
        poll: Duration,
        memory: Memory,
        cancel: CancellationToken,
    ) {
        let index = handle
            .config
            .spec
            .plugin()
            .change_index()
            .map(str::to_owned);
        let mut poller = Poller {
            handle,
            entries,
            index,
            index_mark: None,
            polls: 0,
        };
        let mut failures = 0u32;
        loop {
            // A poll in flight is finished, not dropped (drain and reload
            // wait for it, within the drain timeout): a delivery is not cut
            // between its sinks and its record in state.
            let started = tokio::time::Instant::now();
            self.follow_retire_due(&poller.entries, &memory).await;
            let polled = self.follow_once(&mut poller, &memory).await;
            match polled {
                Ok(()) => failures = 0,
                Err(e) => {
                    failures = failures.saturating_add(1);
                    tracing::warn!(vault = %poller.handle.config.name, failures, error = %e, "follow: poll failed; backing off");
                }
            }
            // Woken early for a grace period that ends before the next poll.
            let delay = match next_retire(&poller.entries, &memory) {
                Some(at) => {
                    next_delay(poll, failures).min((at - self.now()).to_std().unwrap_or_default())
                }
                None => next_delay(poll, failures),
            };
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                // A nudge for a credential no loop knows by name: poll now,
                // but a flood of them no more often than MIN_EARLY_GAP.
                _ = self.follow.early.notified() => {
                    let wait = MIN_EARLY_GAP.saturating_sub(started.elapsed());
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = cancel.cancelled() => return,
                    }
                }
                _ = cancel.cancelled() => return,
            }
        }
    }

    /// The lock a check of the followed credential `key` holds while it
    /// reads and delivers (a restore of its files holds it too).
    pub(super) fn follow_lock(&self, key: &CredentialKey) -> Arc<tokio::sync::Mutex<()>> {
        lock_map(&self.follow.checking)
            .entry(key.clone())
            .or_default()
            .clone()
    }
}

/// The earliest end of a previous version's grace among `entries`.
fn next_retire(entries: &[Arc<CredEntry>], memory: &Memory) -> Option<DateTime<Utc>> {
    let seen = lock(memory);
    entries
        .iter()
        .filter_map(|e| seen.get(e.key())?.retire_at)
        .min()
}

/// One follow loop's view of its vault.
struct Poller {
    handle: Arc<VaultHandle>,
    entries: Vec<Arc<CredEntry>>,
    /// The vault's `change_index` path.
    index: Option<String>,
    /// The index's mark when it was last read and fully delivered.
    index_mark: Option<CurrentMark>,
    polls: usize,
}
