//! The engine's in-memory view of every credential: its live status and its
//! timers, behind one lock.
//!
//! Each credential key gets a dense index the first time it is seen; the
//! status entries are a `Vec` by that index and the timers are addressed by
//! `index * 2 + job`. At 100k credentials this keeps one hash map of keys
//! (the index) instead of one per view, and no per-timer copy of the key:
//! the view and its timers take about a third of the memory they took as
//! maps keyed by credential. Indexes are never reused: a credential removed
//! by a reload keeps its (reset) entry, so a rotation still running for it
//! and a credential added back later find a consistent slot.

use std::hash::BuildHasher;

use chrono::{DateTime, Utc};
use tokio::sync::oneshot;

use super::step::{Step, Trigger};
use crate::model::{CredentialKey, RotationId, VersionNo};
use crate::schedule::TimerHeap;
use crate::state::CredentialRow;
use crate::telemetry::CredentialState;

/// What a waiter on a rotation (`keyturn rotate --wait`) is told.
#[derive(Debug, Clone)]
pub struct RotateFinished {
    pub key: CredentialKey,
    pub rotation: Option<RotationId>,
    pub version: Option<VersionNo>,
    /// `None` on success; otherwise what went wrong (never a secret).
    pub error: Option<String>,
}

/// The jobs a credential runs, one at a time. `Rotate` and `Retire` have
/// timers; `Restore` (see `restore.rs`) is started by a reload and has none.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(super) enum Job {
    Rotate,
    Retire,
    Restore,
}

impl Job {
    fn slot(self, index: u32) -> u32 {
        debug_assert!(self != Job::Restore, "a restore has no timer");
        index * 2 + u32::from(self == Job::Retire)
    }
}

/// A rotation in progress, as status shows it.
#[derive(Debug, Clone)]
pub(super) struct Running {
    pub job: Job,
    pub rotation: Option<RotationId>,
    pub step: Step,
    /// The version the rotation makes, once its row is known.
    pub version: Option<VersionNo>,
    pub attempts: u32,
    pub last_error: Option<String>,
}

/// Where a parked rotation stopped.
#[derive(Debug, Clone)]
pub(super) struct Parked {
    pub rotation: Option<RotationId>,
    pub step: Option<Step>,
    /// The version the rotation makes.
    pub version: Option<VersionNo>,
    /// The consecutive failures its back-off was computed from: counted
    /// here too, because a failure the state could not record (a full
    /// disk, an unwritable audit log) leaves the row's count where it was.
    pub failures: u32,
}

impl CredLive {
    /// The version a rotation failing at its deliver step promoted: already
    /// current in the vault, though the credential's row names it only once
    /// delivered. Not while a delivery is merely under way: until it is
    /// done, status goes on naming the version the agents have, so that a
    /// version shown is one that was delivered or failed to be.
    pub fn promoted(&self) -> Option<VersionNo> {
        let running = self
            .shown_job()
            .filter(|r| r.job == Job::Rotate && r.last_error.is_some())
            .map(|r| (Some(r.step), r.version));
        let parked = self.parked.as_deref().map(|p| (p.step, p.version));
        match running.or(parked) {
            Some((Some(Step::Deliver), v)) => v,
            _ => None,
        }
    }

    /// When the credential's current value was made: its last delivered
    /// rotation, or for a first version promoted whose delivery keeps
    /// failing (current, though no rotation finished), when its delivery
    /// first failed, right after its promote. Black-box finding: such a
    /// version had no age on `/metrics` or `surface`, so the max-age
    /// alerts could never fire for it.
    pub fn made_at(&self) -> Option<DateTime<Utc>> {
        let row = self.row.as_ref()?;
        row.last_rotated_at
            .or_else(|| self.promoted().and(row.failing_since))
    }
}

/// A credential's summary row as the engine keeps it: [`CredentialRow`]
/// without the key (the table knows it) and with a boxed error.
#[derive(Debug, Clone, Default)]
pub(super) struct LiveRow {
    pub current_version: Option<VersionNo>,
    pub last_rotated_at: Option<DateTime<Utc>>,
    pub next_due: Option<DateTime<Utc>>,
    pub consecutive_failures: u32,
    /// When the first of `consecutive_failures` happened.
    pub failing_since: Option<DateTime<Utc>>,
    pub last_error: Option<Box<str>>,
}

impl From<CredentialRow> for LiveRow {
    fn from(r: CredentialRow) -> Self {
        LiveRow {
            current_version: r.current_version,
            last_rotated_at: r.last_rotated_at,
            next_due: r.next_due,
            consecutive_failures: r.consecutive_failures,
            failing_since: r.failing_since,
            last_error: r.last_error.map(String::into_boxed_str),
        }
    }
}

impl LiveRow {
    pub fn to_row(&self, key: &CredentialKey) -> CredentialRow {
        CredentialRow {
            key: key.clone(),
            current_version: self.current_version,
            last_rotated_at: self.last_rotated_at,
            next_due: self.next_due,
            consecutive_failures: self.consecutive_failures,
            failing_since: self.failing_since,
            last_error: self.last_error.as_deref().map(String::from),
        }
    }
}

/// One per credential, so kept small: what only a running or parked rotation
/// needs, or a waiter, is boxed.
#[derive(Default)]
pub(super) struct CredLive {
    pub row: Option<LiveRow>,
    pub running: Option<Box<Running>>,
    /// The last attempt failed and the rotation is parked until its retry
    /// time. Keeps the step it failed at, so `status` can name it.
    pub parked: Option<Box<Parked>>,
    /// The previous version is retired at this time (delivery + grace).
    /// After a first version there is none: the retire step still runs
    /// then (holdout reports, pruning) but retires nothing.
    pub retire_at: Option<DateTime<Utc>>,
    /// The pending retire step has a previous version to retire: only then
    /// is the credential shown `retiring`.
    pub retires_previous: bool,
    /// Why the next rotation starts.
    pub next_trigger: Option<Trigger>,
    /// A rotation was asked for while the previous version was being
    /// retired (or a missing file restored); it starts as soon as that
    /// finishes.
    pub rotate_after_retire: bool,
    /// A `keyturn rotate` waiting for the current version's acks is stored
    /// in the state database (`Write::RotationRequested`), to be cleared
    /// when its rotation begins.
    pub request_stored: bool,
    /// A reload found a delivered file missing while another job ran; the
    /// file is restored when that job ends (see `restore.rs`).
    pub restore_after: bool,
    /// Consecutive failed restores of a missing file (its vault down or
    /// hung): each is tried again after a back-off, as a parked rotation is.
    pub restore_failures: u8,
    /// A followed credential whose rotator destroyed every version in the
    /// vault (a decommission there): its delivered files were removed and
    /// `status` shows it `revoked` (see `follow.rs`), until the vault holds
    /// a version again.
    pub follow_revoked: bool,
    /// `keyturn rotate --wait` callers of the coming or running rotation.
    /// Boxed: 8 bytes inline instead of a `Vec`'s 24, and almost every
    /// credential has no waiter.
    #[allow(clippy::box_collection)]
    pub waiters: Option<Box<Vec<oneshot::Sender<RotateFinished>>>>,
}

impl CredLive {
    /// The rotation or retire running now (a restore of missing files is
    /// not shown: it changes nothing but the files).
    pub fn shown_job(&self) -> Option<&Running> {
        self.running.as_deref().filter(|r| r.job != Job::Restore)
    }

    /// Arms (or clears) the pending retire step of the rotation that
    /// replaced `previous` (`None` after a first version).
    pub fn set_retire(&mut self, at: Option<DateTime<Utc>>, previous: Option<VersionNo>) {
        self.retire_at = at;
        self.retires_previous = previous.is_some();
    }

    pub fn state(&self) -> CredentialState {
        if self.shown_job().is_some() {
            CredentialState::Rotating
        } else if self.parked.is_some() {
            CredentialState::Failed
        } else if self.retire_at.is_some() && self.retires_previous {
            CredentialState::Retiring
        } else {
            CredentialState::Idle
        }
    }
}

#[derive(Default)]
pub(super) struct Table {
    /// Positions in `keys`, hashed by key: 4 bytes per credential where a
    /// map from key to position would hold a second copy of every key.
    index: hashbrown::HashTable<u32>,
    hasher: std::hash::RandomState,
    keys: Vec<CredentialKey>,
    live: Vec<CredLive>,
    timers: TimerHeap,
}

impl Table {
    /// Makes room for `total` credentials in all (start-up knows the count;
    /// exact sizing saves the slack of doubling at 100k entries).
    pub fn reserve_total(&mut self, total: usize) {
        let more = total.saturating_sub(self.keys.len());
        let (keys, hasher) = (&self.keys, &self.hasher);
        self.index
            .reserve(more, |i| hasher.hash_one(&keys[*i as usize]));
        self.keys.reserve_exact(more);
        self.live.reserve_exact(more);
        self.timers.reserve_slots(2 * total);
    }

    fn index_of(&self, key: &CredentialKey) -> Option<u32> {
        let keys = &self.keys;
        self.index
            .find(self.hasher.hash_one(key), |i| keys[*i as usize] == *key)
            .copied()
    }

    fn intern(&mut self, key: &CredentialKey) -> u32 {
        if let Some(i) = self.index_of(key) {
            return i;
        }
        let i = u32::try_from(self.keys.len())
            .ok()
            .filter(|i| *i < u32::MAX / 2)
            .expect("fewer than 2^31 credentials");
        let (keys, hasher) = (&self.keys, &self.hasher);
        self.index.insert_unique(hasher.hash_one(key), i, |j| {
            hasher.hash_one(&keys[*j as usize])
        });
        self.keys.push(key.clone());
        self.live.push(CredLive::default());
        i
    }

    pub fn get(&self, key: &CredentialKey) -> Option<&CredLive> {
        self.index_of(key).map(|i| &self.live[i as usize])
    }

    pub fn get_mut(&mut self, key: &CredentialKey) -> Option<&mut CredLive> {
        self.index_of(key).map(|i| &mut self.live[i as usize])
    }

    /// The entry of `key`, created empty if new.
    pub fn entry(&mut self, key: &CredentialKey) -> &mut CredLive {
        let i = self.intern(key);
        &mut self.live[i as usize]
    }

    /// Sets (or moves) `key`'s `job` timer.
    pub fn schedule(&mut self, key: &CredentialKey, job: Job, at: DateTime<Utc>) {
        let i = self.intern(key);
        self.timers.schedule(job.slot(i), at);
    }

    pub fn cancel(&mut self, key: &CredentialKey, job: Job) {
        if let Some(i) = self.index_of(key) {
            self.timers.cancel(job.slot(i));
        }
    }

    pub fn deadline(&self, key: &CredentialKey, job: Job) -> Option<DateTime<Utc>> {
        self.index_of(key)
            .and_then(|i| self.timers.deadline(job.slot(i)))
    }

    pub fn next_deadline(&mut self) -> Option<DateTime<Utc>> {
        self.timers.next_deadline()
    }

    /// Removes and returns at most `max` timers due at `now`, earliest first.
    pub fn pop_due_limit(&mut self, now: DateTime<Utc>, max: usize) -> Vec<(CredentialKey, Job)> {
        self.timers
            .pop_due_limit(now, max)
            .into_iter()
            .map(|slot| {
                let job = if slot % 2 == 0 {
                    Job::Rotate
                } else {
                    Job::Retire
                };
                (self.keys[(slot / 2) as usize].clone(), job)
            })
            .collect()
    }

    /// Resets what `keep` says to drop of every credential's entry and
    /// timers (its index stays reserved; see the module doc).
    pub fn retain(&mut self, mut keep: impl FnMut(&CredentialKey, &CredLive) -> Keep) {
        for (i, key) in self.keys.iter().enumerate() {
            let l = &mut self.live[i];
            match keep(key, l) {
                Keep::All => {}
                Keep::Retire => {
                    *l = CredLive {
                        retire_at: l.retire_at,
                        retires_previous: l.retires_previous,
                        ..CredLive::default()
                    };
                    self.timers.cancel(Job::Rotate.slot(i as u32));
                }
                Keep::Nothing => {
                    *l = CredLive::default();
                    self.timers.cancel(Job::Rotate.slot(i as u32));
                    self.timers.cancel(Job::Retire.slot(i as u32));
                }
            }
        }
    }
}

/// What [`Table::retain`] keeps of a credential.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Keep {
    All,
    /// Only the pending retirement of its previous version (and its timer):
    /// the credential left the config during its grace period.
    Retire,
    Nothing,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::{at_secs as t, key};

    #[test]
    fn a_credential_entry_stays_small() {
        // 100k of these: the daemon's memory goal is 1 KiB per credential.
        assert!(
            std::mem::size_of::<CredLive>() <= 120,
            "{}",
            std::mem::size_of::<CredLive>()
        );
    }

    #[test]
    fn live_rows_round_trip_to_state_rows() {
        let k = key("a", "x");
        let row = crate::test_support::credential_row(&k);
        assert_eq!(LiveRow::from(row.clone()).to_row(&k), row);
    }

    #[test]
    fn timers_of_different_jobs_and_keys_are_independent() {
        let mut t_ = Table::default();
        let (a, b) = (key("a", "x"), key("b", "x"));
        t_.schedule(&a, Job::Rotate, t(10));
        t_.schedule(&a, Job::Retire, t(5));
        t_.schedule(&b, Job::Rotate, t(7));
        assert_eq!(t_.deadline(&a, Job::Rotate), Some(t(10)));
        assert_eq!(t_.deadline(&b, Job::Retire), None);
        t_.cancel(&a, Job::Rotate);
        assert_eq!(
            t_.pop_due_limit(t(100), 10),
            vec![(a.clone(), Job::Retire), (b.clone(), Job::Rotate)]
        );
        assert_eq!(t_.next_deadline(), None);
    }

    #[test]
    fn retain_resets_entries_and_their_timers_but_keeps_the_others() {
        let mut t_ = Table::default();
        let (a, b) = (key("a", "x"), key("b", "y"));
        t_.entry(&a).rotate_after_retire = true;
        t_.entry(&b).rotate_after_retire = true;
        t_.schedule(&a, Job::Rotate, t(1));
        t_.schedule(&b, Job::Rotate, t(2));
        t_.retain(|k, _| if *k == b { Keep::All } else { Keep::Nothing });
        assert!(!t_.get(&a).unwrap().rotate_after_retire);
        assert!(t_.get(&b).unwrap().rotate_after_retire);
        assert_eq!(t_.deadline(&a, Job::Rotate), None);
        assert_eq!(t_.pop_due_limit(t(100), 10), vec![(b.clone(), Job::Rotate)]);
        // Seen again (added back by a reload): same slot, fresh state.
        t_.schedule(&a, Job::Rotate, t(3));
        assert_eq!(t_.pop_due_limit(t(100), 10), vec![(a, Job::Rotate)]);
        assert_eq!(t_.get(&key("c", "z")).map(|l| l.state()), None);
    }

    #[test]
    fn retain_can_keep_only_a_pending_retirement() {
        let mut t_ = Table::default();
        let a = key("a", "x");
        t_.entry(&a).retire_at = Some(t(5));
        t_.entry(&a).rotate_after_retire = true;
        t_.schedule(&a, Job::Rotate, t(1));
        t_.schedule(&a, Job::Retire, t(5));
        t_.retain(|_, _| Keep::Retire);
        let l = t_.get(&a).unwrap();
        assert_eq!(l.retire_at, Some(t(5)));
        assert!(!l.rotate_after_retire);
        assert_eq!(t_.deadline(&a, Job::Rotate), None);
        assert_eq!(t_.pop_due_limit(t(100), 10), vec![(a, Job::Retire)]);
    }
}

/// Model-based property test of the engine's timers through the table, with
/// the operations the engine makes: schedule, cancel, a manual trigger
/// (cancel the rotate timer, reschedule when the rotation ends), pops of due
/// jobs under a concurrency limit, and a reload's `retain`. The reference is
/// a `BTreeMap` from (credential, job) to deadline: every (credential, job)
/// has at most one timer, and due jobs come out in the reference's order.
#[cfg(test)]
mod model_tests {
    use std::collections::BTreeMap;

    use proptest::prelude::*;

    use super::*;
    use crate::model::{AgentId, CredentialId};
    use crate::test_support::at_ms as t;

    const KEYS: usize = 12;

    #[derive(Debug, Clone)]
    enum Op {
        Schedule(usize, bool, i64),
        Cancel(usize, bool),
        /// A manual rotation: the rotate timer is cancelled now; when the
        /// rotation ends (`ends` ms later) the next one is scheduled.
        Trigger(usize, i64),
        Pop(i64, usize),
        /// A reload: for each credential, two bits of `mask` say whether to
        /// keep everything, only its retirement, or nothing.
        Retain(u32),
    }

    fn job(retire: bool) -> Job {
        if retire { Job::Retire } else { Job::Rotate }
    }

    fn op() -> impl Strategy<Value = Op> {
        let k = 0..KEYS;
        prop_oneof![
            5 => (k.clone(), any::<bool>(), 0..100i64).prop_map(|(k, r, at)| Op::Schedule(k, r, at)),
            1 => (k.clone(), any::<bool>()).prop_map(|(k, r)| Op::Cancel(k, r)),
            2 => (k, 0..100i64).prop_map(|(k, at)| Op::Trigger(k, at)),
            3 => (0..110i64, 0..8usize).prop_map(|(now, max)| Op::Pop(now, max)),
            1 => any::<u32>().prop_map(Op::Retain),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 1000, ..ProptestConfig::default() })]

        #[test]
        fn timers_behave_like_one_deadline_per_credential_and_job(
            ops in proptest::collection::vec(op(), 1..150)
        ) {
            let keys: Vec<CredentialKey> = (0..KEYS)
                .map(|i| CredentialKey::new(
                    AgentId::new(format!("a{}", i % 3)).unwrap(),
                    CredentialId::new(format!("c{i}")).unwrap(),
                ))
                .collect();
            let mut table = Table::default();
            // Interned in index order, so ties pop in (index, job) order.
            for k in &keys {
                table.entry(k);
            }
            let mut model: BTreeMap<(usize, Job), i64> = BTreeMap::new();
            // Manual rotations in flight: their end schedules the next rotation.
            let mut ending: Vec<(usize, i64)> = Vec::new();
            for op in ops {
                match op {
                    Op::Schedule(k, r, at) => {
                        table.schedule(&keys[k], job(r), t(at));
                        model.insert((k, job(r)), at);
                    }
                    Op::Cancel(k, r) => {
                        table.cancel(&keys[k], job(r));
                        model.remove(&(k, job(r)));
                    }
                    Op::Trigger(k, next) => {
                        table.cancel(&keys[k], Job::Rotate);
                        model.remove(&(k, Job::Rotate));
                        ending.push((k, next));
                    }
                    Op::Pop(now, max) => {
                        // Rotations that ended by now reschedule themselves.
                        for (k, next) in std::mem::take(&mut ending) {
                            table.schedule(&keys[k], Job::Rotate, t(next));
                            model.insert((k, Job::Rotate), next);
                        }
                        let got = table.pop_due_limit(t(now), max);
                        let mut due: Vec<(i64, usize, Job)> = model
                            .iter()
                            .filter(|(_, at)| **at <= now)
                            .map(|((k, j), at)| (*at, *k, *j))
                            .collect();
                        due.sort();
                        due.truncate(max);
                        let want: Vec<(CredentialKey, Job)> = due
                            .iter()
                            .map(|(_, k, j)| (keys[*k].clone(), *j))
                            .collect();
                        for (_, k, j) in &due {
                            model.remove(&(*k, *j));
                        }
                        prop_assert_eq!(got, want);
                    }
                    Op::Retain(mask) => {
                        let keep = |i: usize| match (mask >> (2 * i)) & 3 {
                            0 => Keep::Nothing,
                            1 => Keep::Retire,
                            _ => Keep::All,
                        };
                        table.retain(|key, _| keep(keys.iter().position(|k| k == key).unwrap()));
                        model.retain(|(k, j), _| match keep(*k) {
                            Keep::All => true,
                            Keep::Retire => *j == Job::Retire,
                            Keep::Nothing => false,
                        });
                        ending.retain(|(k, _)| keep(*k) == Keep::All);
                    }
                }
                for (i, k) in keys.iter().enumerate() {
                    for j in [Job::Rotate, Job::Retire] {
                        prop_assert_eq!(
                            table.deadline(k, j),
                            model.get(&(i, j)).map(|at| t(*at)),
                            "{} {:?}", k, j
                        );
                    }
                }
                prop_assert_eq!(table.next_deadline(), model.values().min().map(|at| t(*at)));
            }
        }
    }
}
