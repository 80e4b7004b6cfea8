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
            .filter(|e| e.cfg.follow.is_some() && !self.is_retired(&key.agent))
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
                if let Some(poll) = e.cfg.follow
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

    /// One poll of one vault: finds the followed credentials whose current
    /// version may have changed and checks (and delivers) each.
    async fn follow_once(&self, p: &mut Poller, memory: &Memory) -> Result<(), PluginError> {
        self.load_delivered(&p.entries, memory).await?;
        let mut new_index_mark = None;
        let index_read = match self.poll_index(p, &mut new_index_mark).await {
            Ok(read) => read,
            Err(e) => {
                // Every credential of the group missed this poll.
                self.vault_failed_all(&p.entries, &e, memory).await;
                return Err(e);
            }
        };
        let vault = p.handle.vault.clone();
        let polls = p.polls;
        p.polls += 1;
        let mut check: Vec<(usize, Option<CurrentMark>)> = Vec::new();
        let mut first_error = None;
        // Credentials to check by their own mark (metadata, no value).
        let mut by_mark: Vec<usize> = Vec::new();
        // Credentials whose own mark says nothing is current any more.
        let mut gone: Vec<usize> = Vec::new();
        match index_read {
            Some(changed) => {
                let first = p.index_mark.is_none();
                let sweep = sweep_pick(polls, p.entries.len());
                let mut seen = lock(memory);
                for (i, e) in p.entries.iter().enumerate() {
                    let listed = changed
                        .as_ref()
                        .map(|m| m.get(&*e.cfg.vault_path()).cloned());
                    let s = seen.entry(e.key().clone()).or_default();
                    let due = match listed {
                        // (After a revocation a vault may hand out the
                        // refs of the destroyed versions again: KV v2
                        // numbers from 1 after its metadata is deleted.)
                        Some(Some(r)) => {
                            s.listed = true;
                            s.revoked || Some(&r) != s.delivered.as_ref()
                        }
                        // Not in the index: rotated before it existed, or
                        // by a keyturn that does not write it; or it left
                        // the index, which its rotator's decommission does
                        // once it destroyed every version.
                        Some(None) => {
                            let left = std::mem::take(&mut s.listed);
                            first || (left && s.delivered.is_some() && !s.revoked)
                        }
                        None => false,
                    };
                    if due {
                        check.push((i, None));
                    } else if sweep == Some(i) {
                        by_mark.push(i);
                    }
                }
            }
            None => by_mark.extend(0..p.entries.len()),
        }
        for i in by_mark {
            let e = &p.entries[i];
            let item = VaultItem {
                key: e.key(),
                path: &e.cfg.vault_path(),
            };
            let marked = vault.current_mark(item).await;
            self.note_own_read(e, marked.as_ref().err(), memory).await;
            match marked {
                Ok(mark) => {
                    let mut seen = lock(memory);
                    let s = seen.entry(e.key().clone()).or_default();
                    if mark.is_none() {
                        s.mark = None;
                        // Nothing is current where a version was delivered:
                        // its rotator may have destroyed the credential.
                        if s.delivered.is_some() && !s.revoked {
                            gone.push(i);
                        }
                    } else if mark != s.mark {
                        check.push((i, mark));
                    }
                }
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        for (i, mark) in check {
            let entry = p.entries[i].clone();
            let mark = match mark {
                Some(m) => Some(m),
                // Listed by the index: its mark too, read before the value,
                // so that the safety-net sweep need not read the value again.
                None => {
                    let item = VaultItem {
                        key: entry.key(),
                        path: &entry.cfg.vault_path(),
                    };
                    let marked = vault.current_mark(item).await;
                    self.note_own_read(&entry, marked.as_ref().err(), memory)
                        .await;
                    match marked {
                        Ok(m) => m,
                        Err(e) => {
                            first_error.get_or_insert(e);
                            continue;
                        }
                    }
                }
            };
            let checked = self.follow_check(&entry, memory).await;
            if checked.is_ok() && mark.is_some() {
                // Checked at this mark (or later): not again until it moves.
                lock(memory).entry(entry.key().clone()).or_default().mark = mark;
            }
            if let Err(e) = checked {
                tracing::warn!(agent = %entry.key().agent, credential = %entry.key().credential, error = %e, "follow: delivery failed; retried at the next poll");
                first_error.get_or_insert(e);
            }
        }
        for i in gone {
            let entry = &p.entries[i];
            if let Err(e) = self.follow_check(entry, memory).await {
                tracing::warn!(agent = %entry.key().agent, credential = %entry.key().credential, error = %e, "follow: checking a credential with no current version failed; retried at the next poll");
                first_error.get_or_insert(e);
            }
        }
        // The vault answered the poll: what only a failed poll recorded is
        // over (a credential that failed on its own reads since is not).
        self.vault_recovered_all(&p.entries, memory).await;
        match first_error {
            // The index is taken as read only when everything it listed
            // was delivered; otherwise the next poll reads it again.
            None => {
                if new_index_mark.is_some() {
                    p.index_mark = new_index_mark;
                }
                Ok(())
            }
            Some(e) => Err(e),
        }
    }

    /// The part of a poll that reads for the whole group: the change
    /// index's mark, and the index itself when the mark moved
    /// (`new_index_mark`). `None`: no index (yet), poll each credential;
    /// `Some(None)`: the index is unchanged.
    async fn poll_index(
        &self,
        p: &Poller,
        new_index_mark: &mut Option<CurrentMark>,
    ) -> Result<Option<Option<BTreeMap<String, VersionRef>>>, PluginError> {
        let Some(path) = &p.index else {
            return Ok(None);
        };
        let vault = p.handle.vault.as_ref();
        let mark = vault.current_mark(change_index::item(path)).await?;
        Ok(if mark.is_some() && mark == p.index_mark {
            Some(None)
        } else if mark.is_some() {
            let map = change_index::read(vault, path).await?;
            *new_index_mark = mark;
            Some(map)
        } else {
            None
        })
    }

    /// The version each credential was last given, from state, once.
    async fn load_delivered(
        &self,
        entries: &[Arc<CredEntry>],
        memory: &Memory,
    ) -> Result<(), PluginError> {
        let todo: Vec<(CredentialKey, String, Duration)> = {
            let seen = lock(memory);
            entries
                .iter()
                .filter(|e| !seen.get(e.key()).is_some_and(|s| s.loaded))
                .map(|e| {
                    (
                        e.key().clone(),
                        e.primary().config.name.clone(),
                        e.cfg.grace,
                    )
                })
                .collect()
        };
        if todo.is_empty() {
            return Ok(());
        }
        let found = self
            .load(move |s| {
                let mut out = Vec::with_capacity(todo.len());
                for (key, primary, grace) in todo {
                    let row = s.credential(&key)?;
                    let failing = row.as_ref().is_some_and(|r| r.consecutive_failures > 0);
                    let delivered_at = row.as_ref().and_then(|r| r.last_rotated_at);
                    let current = row.and_then(|r| r.current_version);
                    let versions = match current {
                        None => Vec::new(),
                        Some(_) => s.versions(&key)?,
                    };
                    let cur = versions.iter().find(|v| Some(v.version) == current);
                    let vref = cur.and_then(|v| {
                        VaultRefs::decode(&v.vault_version, &primary)
                            .get(&primary)
                            .cloned()
                    });
                    // The version delivered last, retired: revoked by its
                    // rotator (see `follow_revoke`).
                    let revoked = cur.is_some_and(|v| v.stage == Stage::Retired);
                    // A previous version still in its grace period.
                    let retire_at = versions
                        .iter()
                        .any(|v| v.stage == Stage::Previous)
                        .then_some(delivered_at)
                        .flatten()
                        .map(|at| at + chrono::Duration::from_std(grace).unwrap_or_default());
                    out.push((key, vref, failing, revoked, retire_at));
                }
                Ok(out)
            })
            .await?;
        {
            let mut live = self.live();
            for (key, _, _, revoked, _) in &found {
                if let Some(l) = live.get_mut(key) {
                    l.follow_revoked = *revoked;
                }
            }
        }
        let mut seen = lock(memory);
        for (key, vref, failing, revoked, retire_at) in found {
            let s = seen.entry(key).or_default();
            s.loaded = true;
            s.delivered = vref;
            s.revoked = revoked;
            s.retire_at = retire_at.filter(|_| !revoked);
            // A failure recorded before a restart: the first poll that
            // reaches the vault clears it (or records it again).
            if failing {
                s.vault_failed.get_or_insert(VaultFailed::Poll);
            }
        }
        Ok(())
    }

    /// The lock a check of the followed credential `key` holds while it
    /// reads and delivers (a restore of its files holds it too).
    pub(super) fn follow_lock(&self, key: &CredentialKey) -> Arc<tokio::sync::Mutex<()>> {
        lock_map(&self.follow.checking)
            .entry(key.clone())
            .or_default()
            .clone()
    }

    /// Reads the credential's current version and delivers it unless it
    /// was delivered already.
    async fn follow_check(&self, entry: &CredEntry, memory: &Memory) -> Result<(), PluginError> {
        let _checking = self.follow_lock(entry.key()).lock_owned().await;
        let vault = &entry.primary().vault;
        let path = entry.cfg.vault_path();
        let item = VaultItem {
            key: entry.key(),
            path: &path,
        };
        let read = vault.read(item, Select::Stage(Stage::Current)).await;
        let stored = match read {
            Ok(stored) => stored,
            Err(e) => {
                let w = self.vault_failed(entry, &e, VaultFailed::Own, memory);
                self.persist_follow(vec![w]).await;
                return Err(e);
            }
        };
        let delivered = lock(memory)
            .get(entry.key())
            .and_then(|s| s.delivered.clone());
        let revoked = lock(memory).get(entry.key()).is_some_and(|s| s.revoked);
        match stored {
            // The delivery records the outcome in the row either way.
            // Anything current after a revocation is the credential made
            // anew (its refs may be the destroyed versions' again).
            Some(stored) if revoked || delivered.as_ref() != Some(&stored.version) => {
                self.follow_deliver(entry, stored, memory).await
            }
            None if let Some(delivered) = delivered.filter(|_| !revoked) => {
                self.follow_gone(entry, &delivered, memory).await
            }
            _ => {
                let w = self.vault_recovered(entry.key(), None, memory);
                self.persist_follow(w.into_iter().collect()).await;
                Ok(())
            }
        }
    }

    /// Records in the row of the followed credential `entry` that a read of
    /// its vault failed with `e` (the caller holds its follow lock): shown
    /// as its last error, and counted as a failure, until a read succeeds.
    /// Returns the row's write.
    fn vault_failed(
        &self,
        entry: &CredEntry,
        e: &PluginError,
        why: VaultFailed,
        memory: &Memory,
    ) -> Write {
        let key = entry.key();
        let name = &entry.primary().config.name;
        // Vault plug-ins' errors mostly name their vault already.
        let error = if e.message.starts_with(&format!("vault {name}")) {
            format!("follow: {}", e.message)
        } else {
            format!("follow: vault {name}: {}", e.message)
        };
        let mut row = CredentialRow {
            last_error: Some(error),
            ..self.cred_row(key)
        };
        row.count_failure(self.now());
        if let Some(l) = self.live().get_mut(key) {
            l.row = Some(row.clone().into());
        }
        lock(memory).entry(key.clone()).or_default().vault_failed = Some(why);
        Write::Credential(row)
    }

    /// Clears the vault failure `key`'s row records, if any (and, with
    /// `only`, if it is of that kind); the caller holds its follow lock.
    fn vault_recovered(
        &self,
        key: &CredentialKey,
        only: Option<VaultFailed>,
        memory: &Memory,
    ) -> Option<Write> {
        {
            let mut seen = lock(memory);
            let s = seen.get_mut(key)?;
            if s.vault_failed.is_none() || only.is_some_and(|o| s.vault_failed != Some(o)) {
                return None;
            }
            s.vault_failed = None;
        }
        let row = CredentialRow {
            consecutive_failures: 0,
            failing_since: None,
            last_error: None,
            ..self.cred_row(key)
        };
        if let Some(l) = self.live().get_mut(key) {
            l.row = Some(row.clone().into());
        }
        tracing::info!(agent = %key.agent, credential = %key.credential, "follow: the vault answers again");
        Some(Write::Credential(row))
    }

    /// Records a failed (`Some`) or successful read of `entry`'s own mark.
    async fn note_own_read(
        &self,
        entry: &CredEntry,
        failed: Option<&PluginError>,
        memory: &Memory,
    ) {
        let key = entry.key();
        let flagged = lock(memory)
            .get(key)
            .is_some_and(|s| s.vault_failed.is_some());
        if failed.is_none() && !flagged {
            return;
        }
        let _checking = self.follow_lock(key).lock_owned().await;
        let w = match failed {
            Some(e) => Some(self.vault_failed(entry, e, VaultFailed::Own, memory)),
            None => self.vault_recovered(key, None, memory),
        };
        self.persist_follow(w.into_iter().collect()).await;
    }

    /// A poll of the group `entries` failed with `e` before reaching any
    /// credential of its own: each records it.
    async fn vault_failed_all(&self, entries: &[Arc<CredEntry>], e: &PluginError, memory: &Memory) {
        let mut writes = Vec::with_capacity(entries.len());
        for entry in entries {
            let _checking = self.follow_lock(entry.key()).lock_owned().await;
            writes.push(self.vault_failed(entry, e, VaultFailed::Poll, memory));
        }
        self.persist_follow(writes).await;
    }

    /// A poll of the group `entries` reached the vault: clears what only
    /// failed polls recorded.
    async fn vault_recovered_all(&self, entries: &[Arc<CredEntry>], memory: &Memory) {
        let flagged: Vec<&Arc<CredEntry>> = {
            let seen = lock(memory);
            entries
                .iter()
                .filter(|e| {
                    seen.get(e.key())
                        .is_some_and(|s| s.vault_failed == Some(VaultFailed::Poll))
                })
                .collect()
        };
        let mut writes = Vec::new();
        for entry in flagged {
            let _checking = self.follow_lock(entry.key()).lock_owned().await;
            writes.extend(self.vault_recovered(entry.key(), Some(VaultFailed::Poll), memory));
        }
        self.persist_follow(writes).await;
    }

    /// Stores follow failures and recoveries (already in the live view);
    /// a failure to store them is logged, and the next poll writes again.
    async fn persist_follow(&self, writes: Vec<Write>) {
        if writes.is_empty() {
            return;
        }
        if let Err(e) = self.persist(writes).await {
            tracing::warn!(error = %e, "follow: could not record a vault failure or recovery in state");
        }
    }

    /// What a restore of `entry`'s missing files (see `restore.rs`) does
    /// for a followed credential whose current version here is `version`:
    /// version and value stay paired. When the vault's current version is
    /// still the one delivered as `version`, that value is restored under
    /// that number ([`FollowRestore::Same`]). When the vault moved on while
    /// nothing watched (the follower was down), its current version is
    /// delivered once, as a new version, to every sink, as a poll would.
    /// When it holds no current version (its rotator destroyed the
    /// credential, or is making its first one), nothing is restored: the
    /// follow loop's check decides. The caller holds the follow lock, or
    /// runs before the follow loops do.
    pub(super) async fn follow_restore(
        &self,
        entry: &CredEntry,
        version: crate::model::VersionNo,
    ) -> Result<FollowRestore, PluginError> {
        let key = entry.key().clone();
        let row = self
            .load(move |s| Ok(s.versions(&key)?.into_iter().find(|v| v.version == version)))
            .await?;
        let primary = &entry.primary().config.name;
        let delivered = row.as_ref().and_then(|v| {
            VaultRefs::decode(&v.vault_version, primary)
                .get(primary)
                .cloned()
        });
        let key = entry.key();
        if row.as_ref().is_some_and(|v| v.stage == Stage::Retired) {
            tracing::info!(agent = %key.agent, credential = %key.credential, version, "a delivered file is missing; not restored: its version was revoked (its rotator destroyed the credential)");
            return Ok(FollowRestore::Handled(0));
        }
        let path = entry.cfg.vault_path();
        let item = VaultItem { key, path: &path };
        let current = entry
            .primary()
            .vault
            .read(item, Select::Stage(Stage::Current))
            .await?;
        match current {
            Some(mut stored) if Some(&stored.version) == delivered.as_ref() => {
                if let Some(row) = row {
                    stored.rotation = Some(row.rotation);
                }
                Ok(FollowRestore::Same(stored))
            }
            Some(stored) => {
                tracing::info!(agent = %key.agent, credential = %key.credential, version, vault_version = %stored.version, "a delivered file is missing and the vault holds a newer version: delivering that one");
                let memory = self.follow.memory.clone();
                self.follow_deliver(entry, stored, &memory).await?;
                Ok(FollowRestore::Handled(
                    entry
                        .sinks
                        .iter()
                        .filter(|s| s.delivered_path().is_some())
                        .count(),
                ))
            }
            None => {
                tracing::info!(agent = %key.agent, credential = %key.credential, version, "a delivered file is missing and the vault holds no current version; the follow loop checks whether its rotator destroyed the credential");
                Ok(FollowRestore::Handled(0))
            }
        }
    }

    /// `entry`'s vault holds no current version though `delivered` was
    /// delivered (the caller holds its follow lock). When that version is
    /// gone too, every version is: its rotator destroyed the credential,
    /// which only a decommission there does, and what was delivered here
    /// is taken back ([`Self::follow_revoke`]). A version still there
    /// (nothing current for a moment) is left to the next check.
    async fn follow_gone(
        &self,
        entry: &CredEntry,
        delivered: &VersionRef,
        memory: &Memory,
    ) -> Result<(), PluginError> {
        let path = entry.cfg.vault_path();
        let item = VaultItem {
            key: entry.key(),
            path: &path,
        };
        let read = entry
            .primary()
            .vault
            .read(item, Select::Version(delivered))
            .await;
        match read {
            Err(e) => {
                let w = self.vault_failed(entry, &e, VaultFailed::Own, memory);
                self.persist_follow(vec![w]).await;
                Err(e)
            }
            Ok(Some(_)) => {
                let w = self.vault_recovered(entry.key(), None, memory);
                self.persist_follow(w.into_iter().collect()).await;
                Ok(())
            }
            Ok(None) => self.follow_revoke(entry, memory).await,
        }
    }

    /// The rotator destroyed every version of `entry` (a decommission
    /// there; the caller holds its follow lock): the value the agents here
    /// hold is revoked. Every file (or bundle) delivered is removed, the
    /// acks awaited are forgotten, the versions recorded are retired, and
    /// `status` shows the credential `revoked`, audited as `follow.revoked`.
    /// A file that cannot be removed fails the check (shown on the row,
    /// retried by the next one). A version the vault holds later (the
    /// credential made anew there) is delivered as usual and ends this.
    async fn follow_revoke(&self, entry: &CredEntry, memory: &Memory) -> Result<(), PluginError> {
        let key = entry.key();
        let name = &entry.primary().config.name;
        let path = entry.cfg.vault_path();
        let mut removed = Vec::new();
        let mut failed = None;
        for sink in entry.sinks.iter().filter(|s| s.delivered_path().is_some()) {
            match sink.retract(key).await {
                Ok(()) => removed.push(sink.describe()),
                Err(e) => {
                    failed.get_or_insert_with(|| {
                        PluginError::new(e.kind, format!("sink {}: {}", sink.describe(), e.message))
                    });
                }
            }
        }
        let before = self.cred_row(key);
        let why = format!(
            "vault {name} holds no version of {path} any more: its rotator destroyed the credential (decommissioned there)"
        );
        let detail = if removed.is_empty() {
            format!("{why}; no delivered file to remove")
        } else {
            format!("{why}; removed {}", removed.join(", "))
        };
        let mut ev = self.audit_event(
            entry,
            None,
            "follow.revoked",
            if failed.is_none() {
                Outcome::Ok
            } else {
                Outcome::Failed
            },
            Some(detail),
            failed.as_ref().map(|e| e.message.clone()),
        );
        ev.version = before.current_version;
        let head = self.audit(ev).await?;
        if let Some(e) = failed {
            let mut row = CredentialRow {
                last_error: Some(format!("follow: revoking: {}", e.message)),
                ..before
            };
            row.count_failure(self.now());
            if let Some(l) = self.live().get_mut(key) {
                l.row = Some(row.clone().into());
            }
            lock(memory).entry(key.clone()).or_default().vault_failed = Some(VaultFailed::Own);
            self.persist(vec![head, Write::Credential(row)]).await?;
            return Err(e);
        }
        self.awaited().remove(key);
        self.forget_delivery(key);
        let row = CredentialRow {
            consecutive_failures: 0,
            failing_since: None,
            last_error: None,
            ..before
        };
        self.persist(vec![
            head,
            Write::AwaitAcks {
                key: key.clone(),
                version: 0,
                consumers: Vec::new(),
            },
            // The version delivered last stays the row's current one, its
            // stage retired: how state remembers the revocation.
            Write::RetireOthers(Restage {
                key: key.clone(),
                except: Vec::new(),
                from: vec![Stage::Current, Stage::Previous],
                to: Stage::Retired,
            }),
            Write::Credential(row.clone()),
        ])
        .await?;
        self.ack_changed.notify_waiters();
        if let Some(l) = self.live().get_mut(key) {
            l.row = Some(row.into());
            l.follow_revoked = true;
        }
        {
            let mut seen = lock(memory);
            let s = seen.entry(key.clone()).or_default();
            s.revoked = true;
            s.vault_failed = None;
            s.retire_at = None;
        }
        tracing::warn!(agent = %key.agent, credential = %key.credential, vault = %name, path = %path, files = removed.len(), "follow: the rotator destroyed the credential (decommissioned there): the delivered files are removed, and status shows it revoked");
        Ok(())
    }

    /// Ends the grace period of the version delivered before the current
    /// one, for each of `entries` whose grace is over: what a sink kept of
    /// it (a bundle's previous directory and private key) is removed, and
    /// its version is recorded retired, as the rotator's retire step does
    /// at the same time (a follower retires nothing in the vault). A
    /// failure is logged and tried again at the next poll.
    async fn follow_retire_due(&self, entries: &[Arc<CredEntry>], memory: &Memory) {
        let now = self.now();
        let due: Vec<&Arc<CredEntry>> = {
            let seen = lock(memory);
            entries
                .iter()
                .filter(|e| {
                    seen.get(e.key())
                        .and_then(|s| s.retire_at)
                        .is_some_and(|at| at <= now)
                })
                .collect()
        };
        for entry in due {
            let key = entry.key();
            let _checking = self.follow_lock(key).lock_owned().await;
            // A delivery or a revocation meanwhile decided anew.
            if lock(memory)
                .get(key)
                .and_then(|s| s.retire_at)
                .is_none_or(|at| at > now)
            {
                continue;
            }
            let mut failed = None;
            for sink in entry.sinks.iter() {
                if let Err(e) = sink.retire_previous(key).await {
                    failed.get_or_insert((sink.describe(), e));
                }
            }
            if let Some((sink, e)) = failed {
                tracing::warn!(agent = %key.agent, credential = %key.credential, sink = %sink, error = %e, "follow: removing what a sink kept of the previous version failed; retried at the next poll");
                continue;
            }
            let Some(current) = self.cred_row(key).current_version else {
                continue;
            };
            let retired = self
                .persist(vec![Write::RetireOthers(Restage {
                    key: key.clone(),
                    except: vec![current],
                    from: vec![Stage::Previous],
                    to: Stage::Retired,
                })])
                .await;
            match retired {
                Ok(()) => {
                    if let Some(s) = lock(memory).get_mut(key) {
                        s.retire_at = None;
                    }
                    tracing::debug!(agent = %key.agent, credential = %key.credential, "follow: the previous version's grace period ended");
                }
                Err(e) => {
                    tracing::warn!(agent = %key.agent, credential = %key.credential, error = %e, "follow: recording the end of the previous version's grace failed; retried at the next poll")
                }
            }
        }
    }

    /// Arms a retire job now for each of `keys` that is rotated here, has
    /// a version and nothing pending: it may have been followed until now
    /// (see "Taking over"), which the job finds out from state (one read;
    /// a vault read only when the current version was not made here).
    pub(super) fn arm_takeovers(&self, keys: impl IntoIterator<Item = CredentialKey>) {
        let now = self.now();
        let catalog = self.catalog();
        let mut live = self.live();
        for key in keys {
            let rotated_here = catalog
                .creds
                .get(&key)
                .is_some_and(|e| e.cfg.follow.is_none());
            if !rotated_here || self.is_retired(&key.agent) {
                continue;
            }
            let Some(l) = live.get(&key) else {
                continue;
            };
            let has_version = l.row.as_ref().is_some_and(|r| r.current_version.is_some());
            if has_version && l.retire_at.is_none() && l.running.is_none() {
                live.schedule(&key, super::table::Job::Retire, now);
            }
        }
    }

    /// Takes over what a rotator that died mid-grace owed (see "Taking
    /// over" in the module docs): `entry` is rotated here now, and its
    /// current version was delivered here by following, not made by a
    /// rotation here (`latest`, this keyturn's last rotation of it, is older
    /// or absent). When the vault still holds a previous version, this
    /// records the retire step its rotator would have run as one of this
    /// keyturn's rotations (the rotator's rotation id, the current version,
    /// the vault's previous version), due when that version's grace ends,
    /// counted from this keyturn's delivery of the current one; audited as
    /// `rotation.takeover`. The retire job, or the next rotation (which
    /// retires first), runs it. `None`: nothing to take over.
    pub(super) async fn adopt_takeover(
        &self,
        entry: &CredEntry,
        latest: Option<&RotationRow>,
    ) -> Result<Option<RotationRow>, PluginError> {
        let key = entry.key();
        if entry.cfg.follow.is_some() {
            return Ok(None);
        }
        let row = self.cred_row(key);
        let Some(current) = row.current_version else {
            return Ok(None);
        };
        if latest.is_some_and(|r| r.version >= current) {
            return Ok(None);
        }
        let k = key.clone();
        let versions = self.load(move |s| s.versions(&k)).await?;
        // A version revoked by its rotator has nothing left to retire.
        let Some(cur) = versions
            .iter()
            .find(|v| v.version == current && v.stage != Stage::Retired)
        else {
            return Ok(None);
        };
        let primary = entry.primary();
        let name = &primary.config.name;
        let ref_of = |v: &VersionRow| VaultRefs::decode(&v.vault_version, name).get(name).cloned();
        let Some(cur_ref) = ref_of(cur) else {
            return Ok(None);
        };
        let path = entry.cfg.vault_path();
        let item = VaultItem { key, path: &path };
        let Some(prev) = primary
            .vault
            .read(item, Select::Stage(Stage::Previous))
            .await?
            .filter(|p| p.version != cur_ref)
        else {
            return Ok(None);
        };
        let previous_version = versions
            .iter()
            .find(|v| v.version < current && ref_of(v).as_ref() == Some(&prev.version))
            .map(|v| v.version);
        let now = self.now();
        let delivered = row.last_rotated_at.unwrap_or(now);
        let retire_at = delivered + chrono::Duration::from_std(entry.cfg.grace).unwrap_or_default();
        let rot = RotationRow {
            id: cur.rotation.clone(),
            key: key.clone(),
            step: Step::Retire,
            trigger: Trigger::Schedule,
            version: current,
            // Keyed as a rotation records them (by the vault's own name).
            vault_version: Some(
                VaultRefs(vec![(primary.vault.describe().to_owned(), cur_ref)]).encode(),
            ),
            previous_version,
            previous_vault_version: Some(
                VaultRefs(vec![(
                    primary.vault.describe().to_owned(),
                    prev.version.clone(),
                )])
                .encode(),
            ),
            started_at: delivered,
            updated_at: now,
            retire_at: Some(retire_at),
            attempts: 0,
            last_error: None,
            footprint: Some(Footprint::of(entry).to_json()),
            start_record_after: None,
        };
        let head = self
            .audit(self.audit_event(
                entry,
                Some(&rot),
                "rotation.takeover",
                Outcome::Ok,
                Some(format!(
                    "followed until now: the previous version {} in vault {name}, left by its rotator, is retired at {retire_at} when its grace ends",
                    prev.version
                )),
                None,
            ))
            .await?;
        self.persist(vec![Write::Rotation(rot.clone()), head])
            .await?;
        tracing::info!(agent = %key.agent, credential = %key.credential, vault_version = %prev.version, retire_at = %retire_at, "took over from its rotator: the previous version it left in the vault is retired when its grace ends");
        Ok(Some(rot))
    }

    /// Delivers `stored` through every sink of `entry`, audited like the
    /// deliver step, and records it in state.
    async fn follow_deliver(
        &self,
        entry: &CredEntry,
        stored: StoredVersion,
        memory: &Memory,
    ) -> Result<(), PluginError> {
        let key = entry.key();
        let before = self.cred_row(key);
        let version = before.current_version.unwrap_or(0) + 1;
        let revoked = lock(memory).get(key).is_some_and(|s| s.revoked);
        let rotation = stored.rotation.clone().unwrap_or_else(RotationId::generate);
        let kind = generators::kind_of(&entry.cfg.generate);
        let value = stored.value;
        let now = self.now();
        let notice = Notice {
            key: key.clone(),
            tenant: entry.agent.tenant.clone(),
            owner: entry.agent.owner.clone(),
            version,
            rotation: rotation.clone(),
            rotated_at: now,
            expires_hint: None,
            kind,
            public: generators::public_part(kind, &value),
            login: None,
            // A revoked version is not a previous one: nothing of it works.
            previous_version: before.current_version.filter(|_| !revoked),
            grace_until: before
                .current_version
                .filter(|_| !revoked)
                .map(|_| now + chrono::Duration::from_std(entry.cfg.grace).unwrap_or_default()),
            file: entry
                .sinks
                .iter()
                .find_map(|s| s.delivered_path())
                .map(Into::into),
        };
        // Audited like the deliver step; the consumers that must ack are
        // awaited the same way (a follower retires nothing, so they are
        // reported, never waited for).
        let (mut writes, failed) = match self.deliver_to_sinks(entry, &notice, &value).await {
            Ok(w) => (w, None),
            Err(e) => (Vec::new(), Some(e.plugin_error())),
        };
        let row = match &failed {
            None => {
                writes.push(Write::Version(VersionRow {
                    key: key.clone(),
                    version,
                    rotation,
                    stage: Stage::Current,
                    vault_version: VaultRefs(vec![(
                        entry.primary().config.name.clone(),
                        stored.version.clone(),
                    )])
                    .encode(),
                    created_at: now,
                    public: notice.public.clone(),
                }));
                // The version delivered before is in its grace period (a
                // revoked one is not: nothing of it works any more).
                let previous = before.current_version.filter(|_| !revoked);
                writes.push(Write::RetireOthers(Restage {
                    key: key.clone(),
                    except: [version].into_iter().chain(previous).collect(),
                    from: vec![Stage::Current, Stage::Previous],
                    to: Stage::Retired,
                }));
                if let Some(previous) = previous {
                    writes.push(Write::VersionStage {
                        key: key.clone(),
                        version: previous,
                        stage: Stage::Previous,
                    });
                }
                writes.push(Write::PruneHistory(key.clone()));
                writes.push(Write::Holding {
                    key: key.clone(),
                    footprint: super::footprint::Footprint::holding(entry).to_json(),
                });
                CredentialRow {
                    key: key.clone(),
                    current_version: Some(version),
                    last_rotated_at: Some(now),
                    next_due: None,
                    consecutive_failures: 0,
                    failing_since: None,
                    last_error: None,
                }
            }
            Some(e) => {
                let mut row = CredentialRow {
                    last_error: Some(format!("follow: {}", e.message)),
                    ..before
                };
                row.count_failure(now);
                row
            }
        };
        writes.push(Write::Credential(row.clone()));
        self.persist(writes).await?;
        if let Some(l) = self.live().get_mut(key) {
            l.row = Some(row.into());
            l.follow_revoked &= failed.is_some();
        }
        // The row now records this delivery, not a vault failure.
        if let Some(s) = lock(memory).get_mut(key) {
            s.vault_failed = None;
        }
        match failed {
            None => {
                tracing::info!(agent = %key.agent, credential = %key.credential, version, vault_version = %stored.version, "follow: delivered a new version");
                let mut seen = lock(memory);
                let s = seen.entry(key.clone()).or_default();
                s.delivered = Some(stored.version);
                s.revoked = false;
                s.retire_at = notice.grace_until.filter(|_| !revoked);
                Ok(())
            }
            Some(e) => Err(e),
        }
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
