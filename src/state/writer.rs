//! The state writer: one OS thread through which the engine reads and writes
//! the state store, group-committing the writes of concurrent rotations.
//!
//! Why: every rotation step persists its rotation row, and dozens of
//! rotations run at once. With a `spawn_blocking` per write, each write woke
//! a pool thread that then queued on the store's connection mutex behind the
//! others, and the daemon spent more CPU switching threads than in SQLite.
//! Here one thread owns the calls: it takes everything queued, runs the
//! reads, applies all the writes in one transaction (each caller's writes in
//! their own savepoint, see [`StateStore::apply_batch`]) and answers each
//! caller once the commit returned. Durability per caller is unchanged: a
//! caller is answered `Ok` only after the transaction holding its writes
//! committed, and its writes stay atomic (all or none).
//!
//! Reads run in arrival order before the batch's writes commit. That is
//! safe because each caller awaits its own calls one at a time: every write
//! a caller has been told about is committed before its next read is sent.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
#[cfg(test)]
use std::sync::mpsc;

use tokio::sync::oneshot;

use super::{Result, StateError, StateStore, Write};
use crate::group_commit::{Flow, GroupCommit};

/// Most callers' writes committed in one transaction; bounds the latency of
/// the first caller in a long queue.
const MAX_BATCH: usize = 1024;

type Read = Box<dyn FnOnce(&dyn StateStore) + Send>;
type Reply = oneshot::Sender<Result<()>>;

enum Msg {
    Apply(Vec<Write>, Reply),
    Read(Read),
    /// Tests: say the thread is held, then block it until the sender is
    /// dropped, so calls queue up.
    #[cfg(test)]
    Hold(mpsc::Sender<()>, mpsc::Receiver<()>),
}

/// A handle to the writer thread. The thread stops once the handle is
/// dropped and the calls queued before have been answered.
pub struct StateWriter {
    server: GroupCommit<Msg>,
}

impl std::fmt::Debug for StateWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StateWriter").finish_non_exhaustive()
    }
}

impl StateWriter {
    /// Starts the thread that serves `store`.
    pub fn start(store: Arc<dyn StateStore>) -> std::io::Result<StateWriter> {
        let server = GroupCommit::spawn("keyturn-state", MAX_BATCH, move |batch| {
            serve(store.as_ref(), batch)
        })?;
        Ok(StateWriter { server })
    }

    /// Serves `store` on the calling task, each call at once (engine tests
    /// under paused time, with an in-memory store).
    pub fn inline(store: Arc<dyn StateStore>) -> StateWriter {
        StateWriter {
            server: GroupCommit::inline(move |batch| serve(store.as_ref(), batch)),
        }
    }

    /// Applies `writes` in one transaction, durably (as
    /// [`StateStore::apply`]), possibly together with other callers' writes.
    pub async fn apply(&self, writes: Vec<Write>) -> Result<()> {
        if writes.is_empty() {
            return Ok(());
        }
        let (tx, rx) = oneshot::channel();
        self.server
            .submit(Msg::Apply(writes, tx))
            .map_err(|_| stopped())?;
        rx.await.map_err(|_| stopped())?
    }

    /// Runs `f` on the writer thread (a read; it must not block for long).
    pub async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&dyn StateStore) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let (tx, rx) = oneshot::channel();
        let job: Read = Box::new(move |store| {
            let _ = tx.send(f(store));
        });
        self.server.submit(Msg::Read(job)).map_err(|_| stopped())?;
        rx.await.map_err(|_| stopped())?
    }

    /// Returns once the thread is held, alone in its batch: every call sent
    /// after this queues for the next batch.
    #[cfg(test)]
    fn hold(&self) -> mpsc::Sender<()> {
        let (tx, rx) = mpsc::channel();
        let (held_tx, held_rx) = mpsc::channel();
        let _ = self.server.submit(Msg::Hold(held_tx, rx));
        held_rx.recv().expect("the writer holds");
        tx
    }
}

/// The answer when the thread is gone, or a call panicked inside the store.
fn stopped() -> StateError {
    StateError::Db {
        path: "(state writer)".into(),
        message: "the state writer stopped or a state call panicked".into(),
    }
}

/// One batch: reads run in arrival order, then every caller's writes are
/// applied together, each caller's in its own savepoint.
fn serve(store: &dyn StateStore, batch: &mut Vec<Msg>) -> Flow {
    let mut applies: Vec<(Vec<Write>, Reply)> = Vec::new();
    for msg in batch.drain(..) {
        match msg {
            Msg::Apply(writes, reply) => applies.push((writes, reply)),
            // A panicking read drops its reply: the caller gets an error
            // and the thread keeps serving the others.
            Msg::Read(f) => {
                let _ = catch_unwind(AssertUnwindSafe(move || f(store)));
            }
            #[cfg(test)]
            Msg::Hold(held, release) => {
                let _ = held.send(());
                let _ = release.recv();
            }
        }
    }
    if applies.is_empty() {
        return Flow::Continue;
    }
    let groups: Vec<&[Write]> = applies.iter().map(|(w, _)| w.as_slice()).collect();
    let results = catch_unwind(AssertUnwindSafe(|| store.apply_batch(&groups)));
    drop(groups);
    match results {
        Ok(results) if results.len() == applies.len() => {
            for ((_, reply), result) in applies.into_iter().zip(results) {
                let _ = reply.send(result);
            }
        }
        // A panic (the transaction rolled back as it unwound) or a store
        // that did not answer for every group: nobody is told `Ok`.
        _ => {
            for (_, reply) in applies {
                let _ = reply.send(Err(stopped()));
            }
        }
    }
    Flow::Continue
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use chrono::DateTime;

    use super::*;
    use crate::model::{AgentId, CredentialId, CredentialKey, RotationId, Stage};
    use crate::state::{
        AuditHead, CredentialRow, RotationRow, Snapshot, SqliteStore, Step, Trigger, VersionRow,
    };

    fn key(i: usize) -> CredentialKey {
        CredentialKey::new(
            AgentId::new("agent").unwrap(),
            CredentialId::new(format!("cred{i}")).unwrap(),
        )
    }

    fn cred(k: &CredentialKey, version: u64) -> Write {
        Write::Credential(CredentialRow {
            key: k.clone(),
            current_version: Some(version),
            last_rotated_at: DateTime::from_timestamp_millis(1_700_000_000_000),
            next_due: None,
            consecutive_failures: 0,
            failing_since: None,
            last_error: None,
        })
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_applies_all_land_and_reads_see_them() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn StateStore> =
            Arc::new(SqliteStore::open(&dir.path().join("state.db")).unwrap());
        let writer = Arc::new(StateWriter::start(store.clone()).unwrap());
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..200 {
            let writer = writer.clone();
            tasks.spawn(async move {
                let k = key(i);
                writer.apply(vec![cred(&k, i as u64 + 1)]).await.unwrap();
                // Read-your-writes through the same thread.
                let row = writer.read(move |s| s.credential(&k)).await.unwrap();
                assert_eq!(row.unwrap().current_version, Some(i as u64 + 1));
            });
        }
        while let Some(r) = tasks.join_next().await {
            r.unwrap();
        }
        let snap = store.snapshot().unwrap();
        assert_eq!(snap.credentials.len(), 200);
    }

    /// Records how many groups each batch had; fails groups holding a
    /// credential whose version is 0.
    struct Counting {
        inner: SqliteStore,
        batches: Mutex<Vec<usize>>,
        calls: AtomicUsize,
    }

    impl StateStore for Counting {
        fn apply(&self, writes: &[Write]) -> Result<()> {
            self.inner.apply(writes)
        }
        fn apply_batch(&self, groups: &[&[Write]]) -> Vec<Result<()>> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            self.batches.lock().unwrap().push(groups.len());
            let bad = |g: &&[Write]| {
                g.iter()
                    .any(|w| matches!(w, Write::Credential(c) if c.current_version == Some(0)))
            };
            if groups.iter().any(bad) {
                // Apply the good ones through the real batch, fail the bad.
                let good: Vec<&[Write]> = groups.iter().filter(|g| !bad(g)).copied().collect();
                let mut done = self.inner.apply_batch(&good).into_iter();
                return groups
                    .iter()
                    .map(|g| {
                        if bad(g) {
                            Err(StateError::Db {
                                path: "test".into(),
                                message: "refused version 0".into(),
                            })
                        } else {
                            done.next().unwrap()
                        }
                    })
                    .collect();
            }
            self.inner.apply_batch(groups)
        }
        fn snapshot(&self) -> Result<Snapshot> {
            self.inner.snapshot()
        }
        fn version_floors(&self) -> Result<Vec<(CredentialKey, crate::model::VersionNo)>> {
            self.inner.version_floors()
        }
        fn last_acks(&self) -> Result<Vec<crate::state::AckRow>> {
            self.inner.last_acks()
        }
        fn credential(&self, key: &CredentialKey) -> Result<Option<CredentialRow>> {
            self.inner.credential(key)
        }
        fn rotation(&self, id: &RotationId) -> Result<Option<RotationRow>> {
            self.inner.rotation(id)
        }
        fn decommissions(&self) -> Result<Vec<crate::state::DecommissionRow>> {
            self.inner.decommissions()
        }
        fn revocations(
            &self,
            agent: &crate::model::AgentId,
        ) -> Result<Vec<crate::state::RevocationRow>> {
            self.inner.revocations(agent)
        }
        fn holdings(&self, agent: &crate::model::AgentId) -> Result<Vec<(CredentialKey, String)>> {
            self.inner.holdings(agent)
        }
        fn agents(&self) -> Result<Vec<crate::model::AgentId>> {
            self.inner.agents()
        }
        fn latest_rotation(&self, key: &CredentialKey) -> Result<Option<RotationRow>> {
            self.inner.latest_rotation(key)
        }
        fn versions(&self, key: &CredentialKey) -> Result<Vec<VersionRow>> {
            self.inner.versions(key)
        }
        fn audit_head(&self) -> Result<Option<AuditHead>> {
            self.inner.audit_head()
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn queued_applies_share_one_batch_and_an_error_reaches_only_its_caller() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Counting {
            inner: SqliteStore::open(&dir.path().join("state.db")).unwrap(),
            batches: Mutex::new(Vec::new()),
            calls: AtomicUsize::new(0),
        });
        let writer = Arc::new(StateWriter::start(store.clone()).unwrap());
        let release = writer.hold();
        // Each call is polled once, which queues it, while the thread is
        // held: all ten are queued before it takes its next batch (a sleep
        // instead was not always enough on a loaded machine).
        let mut calls: Vec<_> = (0..10)
            .map(|i| {
                // Caller 3 sends a write the store refuses.
                let version = if i == 3 { 0 } else { 7 };
                Box::pin(writer.apply(vec![cred(&key(i), version)]))
            })
            .collect();
        for call in &mut calls {
            assert!(futures::poll!(call.as_mut()).is_pending(), "queued");
        }
        drop(release);
        let results = futures::future::join_all(calls).await;
        for (i, r) in results.iter().enumerate() {
            if i == 3 {
                let e = r.as_ref().unwrap_err();
                assert!(e.to_string().contains("refused version 0"), "{e}");
            } else {
                assert!(r.is_ok(), "caller {i}: {r:?}");
            }
        }
        assert_eq!(*store.batches.lock().unwrap(), vec![10], "one batch");
        let snap = store.snapshot().unwrap();
        assert_eq!(snap.credentials.len(), 9, "all but the refused one");
        assert!(snap.credentials.iter().all(|c| c.key != key(3)));
    }

    #[test]
    fn sqlite_batch_rolls_back_only_the_failing_group() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("state.db")).unwrap();
        let k = key(1);
        let rot = RotationRow {
            id: RotationId::generate(),
            key: k.clone(),
            step: Step::Create,
            trigger: Trigger::Manual,
            version: 1,
            vault_version: None,
            previous_version: None,
            previous_vault_version: None,
            started_at: DateTime::from_timestamp_millis(1).unwrap(),
            updated_at: DateTime::from_timestamp_millis(1).unwrap(),
            retire_at: None,
            attempts: 0,
            last_error: None,
            footprint: None,
            start_record_after: None,
        };
        // A version too large for SQLite's INTEGER fails on write, after
        // the group's first write went in: that write must be undone.
        let bad_version = Write::Version(VersionRow {
            key: k.clone(),
            version: u64::MAX,
            rotation: rot.id.clone(),
            stage: Stage::Pending,
            vault_version: "v".into(),
            created_at: DateTime::from_timestamp_millis(1).unwrap(),
            public: None,
        });
        let good = [cred(&key(2), 1)];
        let bad = [Write::Rotation(rot.clone()), bad_version];
        let also_good = [cred(&key(3), 1)];
        let results = store.apply_batch(&[&good, &bad, &also_good]);
        assert!(results[0].is_ok());
        assert!(results[1].is_err());
        assert!(results[2].is_ok());
        assert_eq!(store.rotation(&rot.id).unwrap(), None, "rolled back");
        assert!(store.credential(&key(2)).unwrap().is_some());
        assert!(store.credential(&key(3)).unwrap().is_some());
    }
}
