//! An in-memory [`StateStore`] with the SQLite store's semantics, for engine
//! tests: nothing is durable, and every call is answered at once on the
//! caller's thread (which a test under `tokio::time::pause()` needs). A
//! differential test below runs random write sequences through both stores
//! and compares everything they read back.

use std::collections::BTreeMap;
use std::sync::Mutex;

use super::{
    AckRow, AuditHead, CredentialRow, DecommissionRow, HISTORY_KEPT, RequestRow, Result,
    RevocationRow, RotationRow, Snapshot, StateError, StateStore, VersionRow, Write,
};
use crate::model::{AgentId, CredentialKey, RotationId, Stage, VersionNo};
use crate::rotation::Step;

#[derive(Debug, Default)]
pub struct MemoryStore {
    tables: Mutex<Tables>,
    /// Every write fails, as on a full volume (`set_full`).
    full: std::sync::atomic::AtomicBool,
}

#[derive(Debug, Clone, Default)]
struct Tables {
    credentials: BTreeMap<CredentialKey, CredentialRow>,
    rotations: BTreeMap<String, RotationRow>,
    versions: BTreeMap<(CredentialKey, VersionNo), VersionRow>,
    audit_head: Option<AuditHead>,
    acks: BTreeMap<(CredentialKey, String), AckRow>,
    last_acks: BTreeMap<(CredentialKey, String), AckRow>,
    decommissions: BTreeMap<AgentId, DecommissionRow>,
    revocations: BTreeMap<(AgentId, String), RevocationRow>,
    holdings: BTreeMap<CredentialKey, String>,
    requests: BTreeMap<CredentialKey, RequestRow>,
    floors: BTreeMap<CredentialKey, VersionNo>,
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }

    /// From now on every write fails (`true`) as the SQLite store's do on
    /// a full volume, or succeeds again (`false`).
    pub fn set_full(&self, full: bool) {
        self.full.store(full, std::sync::atomic::Ordering::SeqCst);
    }

    fn tables(&self) -> std::sync::MutexGuard<'_, Tables> {
        self.tables.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The SQLite store keeps integers in `i64`; so does this one, to fail alike.
fn fits(v: u64, what: &str) -> Result<()> {
    i64::try_from(v).map(|_| ()).map_err(|_| StateError::Db {
        path: "(memory)".into(),
        message: format!("{what} {v} does not fit in the database"),
    })
}

impl Tables {
    fn apply(&mut self, w: &Write) -> Result<()> {
        match w {
            Write::Credential(c) => {
                if let Some(v) = c.current_version {
                    fits(v, "version number")?;
                }
                self.credentials.insert(c.key.clone(), c.clone());
            }
            Write::Rotation(r) => {
                fits(r.version, "version number")?;
                if let Some(seq) = r.start_record_after {
                    fits(seq, "audit seq")?;
                }
                self.rotations.insert(r.id.as_str().to_owned(), r.clone());
            }
            Write::Version(v) => {
                fits(v.version, "version number")?;
                self.versions.insert((v.key.clone(), v.version), v.clone());
            }
            Write::VersionStage {
                key,
                version,
                stage,
            } => {
                fits(*version, "version number")?;
                if let Some(v) = self.versions.get_mut(&(key.clone(), *version)) {
                    v.stage = *stage;
                }
            }
            Write::RetireOthers(r) => {
                for ((k, n), v) in self.versions.iter_mut() {
                    if *k == r.key && r.moves(*n, v.stage) {
                        v.stage = r.to;
                    }
                }
            }
            Write::AuditHead(h) => {
                fits(h.seq, "audit seq")?;
                // The head only ever moves forward.
                if self.audit_head.as_ref().is_none_or(|old| h.seq > old.seq) {
                    self.audit_head = Some(h.clone());
                }
            }
            Write::AwaitAcks {
                key,
                version,
                consumers,
            } => {
                fits(*version, "version number")?;
                self.acks.retain(|(k, _), _| k != key);
                for c in consumers {
                    self.acks.insert(
                        (key.clone(), c.clone()),
                        AckRow {
                            key: key.clone(),
                            version: *version,
                            consumer: c.clone(),
                            acked_at: None,
                        },
                    );
                }
            }
            Write::Acked {
                key,
                version,
                consumer,
                at,
            } => {
                if let Some(row) = self.acks.get_mut(&(key.clone(), consumer.clone()))
                    && row.version == *version
                {
                    row.acked_at = Some(*at);
                    let last = self
                        .last_acks
                        .entry((key.clone(), consumer.clone()))
                        .or_insert_with(|| row.clone());
                    if last.acked_at <= Some(*at) {
                        *last = row.clone();
                    }
                }
            }
            Write::Decommission(d) => {
                self.decommissions.insert(d.agent.clone(), d.clone());
            }
            Write::Revocation(r) => {
                self.revocations
                    .insert((r.agent.clone(), r.item.clone()), r.clone());
            }
            Write::Holding { key, footprint } => {
                self.holdings.insert(key.clone(), footprint.clone());
            }
            Write::RotationRequested { key, at } => {
                self.requests
                    .entry(key.clone())
                    .or_insert_with(|| RequestRow {
                        key: key.clone(),
                        requested_at: *at,
                    });
            }
            Write::RotationRequestDone(key) => {
                self.requests.remove(key);
            }
            Write::VersionFloor { key, version } => {
                let floor = self.floors.entry(key.clone()).or_default();
                *floor = (*floor).max(*version);
            }
            Write::ForgetCredential(key) => {
                self.requests.remove(key);
                self.holdings.remove(key);
                self.acks.retain(|(k, _), _| k != key);
                self.last_acks.retain(|(k, _), _| k != key);
                self.credentials.remove(key);
                self.rotations.retain(|_, r| r.key != *key);
                self.versions.retain(|(k, _), _| k != key);
            }
            Write::PruneHistory(key) => {
                let kept = HISTORY_KEPT as usize;
                // Newest first by version (the wall clock may step back).
                let mut done: Vec<(VersionNo, chrono::DateTime<chrono::Utc>, String)> = self
                    .rotations
                    .values()
                    .filter(|r| r.key == *key && r.step == Step::Done)
                    .map(|r| (r.version, r.started_at, r.id.as_str().to_owned()))
                    .collect();
                done.sort();
                for (_, _, id) in done.iter().rev().skip(kept) {
                    self.rotations.remove(id);
                }
                let mut retired: Vec<VersionNo> = self
                    .versions
                    .iter()
                    .filter(|((k, _), v)| k == key && v.stage == Stage::Retired)
                    .map(|((_, n), _)| *n)
                    .collect();
                retired.sort();
                for n in retired.iter().rev().skip(kept) {
                    self.versions.remove(&(key.clone(), *n));
                }
            }
        }
        Ok(())
    }
}

impl StateStore for MemoryStore {
    /// All or nothing: the writes go to a copy that replaces the tables only
    /// if every one of them succeeded.
    fn apply(&self, writes: &[Write]) -> Result<()> {
        if self.full.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(StateError::Db {
                path: "(memory)".into(),
                message: "database or disk is full (injected)".into(),
            });
        }
        let mut tables = self.tables();
        let mut next = tables.clone();
        for w in writes {
            next.apply(w)?;
        }
        *tables = next;
        Ok(())
    }

    fn snapshot(&self) -> Result<Snapshot> {
        let t = self.tables();
        Ok(Snapshot {
            credentials: t.credentials.values().cloned().collect(),
            unfinished: t
                .rotations
                .values()
                .filter(|r| r.step != Step::Done)
                .cloned()
                .collect(),
            acks: t.acks.values().cloned().collect(),
            requests: t.requests.values().cloned().collect(),
        })
    }

    fn last_acks(&self) -> Result<Vec<AckRow>> {
        Ok(self.tables().last_acks.values().cloned().collect())
    }

    fn version_floors(&self) -> Result<Vec<(CredentialKey, VersionNo)>> {
        Ok(self
            .tables()
            .floors
            .iter()
            .map(|(k, v)| (k.clone(), *v))
            .collect())
    }

    fn credential(&self, key: &CredentialKey) -> Result<Option<CredentialRow>> {
        Ok(self.tables().credentials.get(key).cloned())
    }

    fn rotation(&self, id: &RotationId) -> Result<Option<RotationRow>> {
        Ok(self.tables().rotations.get(id.as_str()).cloned())
    }

    fn latest_rotation(&self, key: &CredentialKey) -> Result<Option<RotationRow>> {
        Ok(self
            .tables()
            .rotations
            .values()
            .filter(|r| r.key == *key)
            .max_by_key(|r| (r.version, r.started_at, r.id.as_str().to_owned()))
            .cloned())
    }

    fn versions(&self, key: &CredentialKey) -> Result<Vec<VersionRow>> {
        Ok(self
            .tables()
            .versions
            .iter()
            .filter(|((k, _), _)| k == key)
            .map(|(_, v)| v.clone())
            .collect())
    }

    fn audit_head(&self) -> Result<Option<AuditHead>> {
        Ok(self.tables().audit_head.clone())
    }

    fn decommissions(&self) -> Result<Vec<DecommissionRow>> {
        Ok(self.tables().decommissions.values().cloned().collect())
    }

    fn revocations(&self, agent: &AgentId) -> Result<Vec<RevocationRow>> {
        Ok(self
            .tables()
            .revocations
            .iter()
            .filter(|((a, _), _)| a == agent)
            .map(|(_, r)| r.clone())
            .collect())
    }

    fn holdings(&self, agent: &AgentId) -> Result<Vec<(CredentialKey, String)>> {
        Ok(self
            .tables()
            .holdings
            .iter()
            .filter(|(k, _)| k.agent == *agent)
            .map(|(k, f)| (k.clone(), f.clone()))
            .collect())
    }

    fn agents(&self) -> Result<Vec<AgentId>> {
        let t = self.tables();
        let mut agents: Vec<AgentId> = t
            .credentials
            .keys()
            .chain(t.holdings.keys())
            .map(|k| k.agent.clone())
            .collect();
        agents.sort();
        agents.dedup();
        Ok(agents)
    }
}

/// Random write sequences through the SQLite store and this one: what each
/// reads back must be the same.
#[cfg(test)]
mod differential_tests {
    use proptest::prelude::*;

    use super::*;
    use crate::model::{AgentId, CredentialId};
    use crate::rotation::Trigger;
    use crate::state::Restage;
    use crate::state::SqliteStore;
    use crate::test_support::at_ms as at;

    fn key(i: u8) -> CredentialKey {
        CredentialKey::new(
            AgentId::new(format!("a{}", i % 2)).unwrap(),
            CredentialId::new(format!("c{i}")).unwrap(),
        )
    }

    fn rid(i: u8) -> RotationId {
        RotationId::parse(&format!("{:032x}", u128::from(i) + 1)).unwrap()
    }

    fn stage(i: u8) -> Stage {
        [
            Stage::Pending,
            Stage::Current,
            Stage::Previous,
            Stage::Retired,
        ][usize::from(i % 4)]
    }

    fn write() -> impl Strategy<Value = Write> {
        let k = 0u8..3;
        prop_oneof![
            (k.clone(), 0u64..5, 0u32..3).prop_map(|(k, v, f)| Write::Credential(CredentialRow {
                key: key(k),
                current_version: (v > 0).then_some(v),
                last_rotated_at: Some(at(i64::from(f))),
                next_due: None,
                consecutive_failures: f,
                failing_since: (f > 0).then(|| at(100)),
                last_error: (f > 1).then(|| "vault down".into()),
            })),
            // Two rotations of a credential never start in the same
            // millisecond (SQLite would pick either), so times follow ids.
            (k.clone(), 0u8..6, 0u8..7, 1u64..8).prop_map(|(k, id, step, v)| {
                let t = i64::from(id * 3 + k);
                Write::Rotation(RotationRow {
                    id: rid(id * 3 + k),
                    key: key(k),
                    step: Step::ALL[usize::from(step)],
                    trigger: Trigger::Schedule,
                    version: v,
                    vault_version: Some(format!("r{v}")),
                    previous_version: v.checked_sub(1).filter(|p| *p > 0),
                    previous_vault_version: None,
                    started_at: at(t),
                    updated_at: at(t + 1),
                    retire_at: None,
                    attempts: 0,
                    last_error: None,
                    footprint: Some("{}".into()),
                    start_record_after: (step % 2 == 0).then_some(u64::from(id)),
                })
            }),
            (k.clone(), 1u64..12, 0u8..4).prop_map(|(k, v, s)| Write::Version(VersionRow {
                key: key(k),
                version: v,
                rotation: rid(v as u8),
                stage: stage(s),
                vault_version: format!("r{v}"),
                created_at: at(v as i64),
                public: None,
            })),
            (k.clone(), 1u64..12, 0u8..4).prop_map(|(k, v, s)| Write::VersionStage {
                key: key(k),
                version: v,
                stage: stage(s),
            }),
            (k.clone(), 1u64..12).prop_map(|(k, v)| Write::RetireOthers(Restage {
                key: key(k),
                except: vec![v, v + 1],
                from: vec![Stage::Current, Stage::Previous],
                to: Stage::Retired,
            })),
            (0u64..6).prop_map(|seq| Write::AuditHead(AuditHead {
                seq,
                hash: format!("h{seq}"),
            })),
            k.clone().prop_map(|k| Write::PruneHistory(key(k))),
            (k.clone(), 1u64..4, 0usize..3).prop_map(|(k, v, n)| Write::AwaitAcks {
                key: key(k),
                version: v,
                consumers: (0..n).map(|i| format!("file:/c{i}")).collect(),
            }),
            (k.clone(), 1u64..4, 0u8..3, 0i64..5).prop_map(|(k, v, c, s)| Write::Acked {
                key: key(k),
                version: v,
                consumer: format!("file:/c{c}"),
                at: chrono::DateTime::from_timestamp(1_700_000_000 + s, 0).unwrap(),
            }),
            (k.clone(), 0i64..5).prop_map(|(k, s)| Write::RotationRequested {
                key: key(k),
                at: chrono::DateTime::from_timestamp(1_700_000_000 + s, 0).unwrap(),
            }),
            k.clone().prop_map(|k| Write::RotationRequestDone(key(k))),
            k.prop_map(|k| Write::ForgetCredential(key(k))),
        ]
    }

    fn reads(s: &dyn StateStore) -> String {
        let mut snap = s.snapshot().unwrap();
        snap.credentials.sort_by(|a, b| a.key.cmp(&b.key));
        snap.unfinished
            .sort_by(|a, b| a.id.as_str().cmp(b.id.as_str()));
        let mut out = format!(
            "{snap:?}\n{:?}\n{:?}\n",
            s.audit_head().unwrap(),
            s.last_acks().unwrap()
        );
        for k in 0..3 {
            let k = key(k);
            out += &format!(
                "{:?}\n{:?}\n{:?}\n",
                s.credential(&k).unwrap(),
                s.latest_rotation(&k).unwrap().map(|r| r.id),
                s.versions(&k).unwrap()
            );
        }
        for id in 0..20 {
            out += &format!("{:?}\n", s.rotation(&rid(id)).unwrap().map(|r| r.step));
        }
        out
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

        #[test]
        fn reads_back_what_sqlite_reads_back(
            groups in proptest::collection::vec(proptest::collection::vec(write(), 1..6), 1..25)
        ) {
            let dir = tempfile::tempdir().unwrap();
            let sqlite = SqliteStore::open(&dir.path().join("state.db")).unwrap();
            let memory = MemoryStore::new();
            for g in &groups {
                prop_assert_eq!(sqlite.apply(g).is_ok(), memory.apply(g).is_ok());
                prop_assert_eq!(reads(&sqlite), reads(&memory));
            }
        }
    }
}
