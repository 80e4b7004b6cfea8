//! The change index: one entry in a vault where a rotating keyturn records,
//! after every promote, which version of each credential is current, so that
//! followers (`mode = "follow"` on another host) learn of every change in
//! that vault with **one** cheap read per poll instead of one per credential.
//!
//! Opt-in per vault: `change_index = "keyturn/index"` on `[vaults.NAME]`, on
//! the rotating keyturn and on its followers alike.
//!
//! # The entry
//! A normal version of a normal secret (KV v2 path, AWS secret, Azure
//! secret) at the configured path, written through the same [`Vault`] calls
//! as any credential (`stage` then `promote`), so every vault supports it
//! without code of its own. Its value is JSON, never a secret value:
//! `{"keyturn_change_index": 1, "credentials": {"<credential path>": "<version ref>"}}`.
//! A follower polls the entry's [`Vault::current_mark`] (KV metadata,
//! `DescribeSecret`), reads the entry only when the mark moved, and reads the
//! values of the credentials whose refs changed and that it follows.
//!
//! # Writing it
//! [`IndexedVault`] is a decorator around the rotating keyturn's vault. Its
//! `promote` promotes, queues `{path: version}` for the index and returns:
//! the index write happens in the background, so a rotation's own delivery
//! does not wait for it. Its [`Vault::settle`] returns once the index holds
//! the version, and the engine calls it at the end of the deliver step: the
//! step is not recorded done before, so a crash between the promote and
//! the index write replays the deliver step, whose `settle` (on a new
//! decorator that knows nothing pending) records the version again: no
//! update is lost to a crash.
//!
//! Records are group-committed: one write carries every record queued
//! while the previous write was in flight, so a burst of promotes costs a
//! few writes, not one each, and an idle rotator writes nothing. The
//! decorator keeps its copy of the entry after the first read (this keyturn
//! is its one writer), so a write is a merge and a `stage` + `promote` of
//! the entry, without reading it again; after a failed write it reads the
//! entry again before the next one. Within one keyturn no update is lost to
//! concurrency either: writes are taken one at a time under one lock, and a
//! failed write puts its records back for the next one (a failed background
//! write is logged; the `settle` that then writes them gets the error, and
//! the engine retries its step). Two *rotating* keyturns must not share one
//! index path (each would overwrite the other's records); one rotator per
//! index is the layout this is for. Within one keyturn, a reload keeps the
//! decorator of a vault whose config is unchanged; a reload that changes
//! the vault's config makes a new one, which reads the entry afresh, and a
//! write of the old one still in flight then can be overwritten by the new
//! one's next write (the credential is listed again at its next rotation;
//! followers' safety-net sweep finds it before).
//!
//! The entry grows with the credentials rotated through it (~60 bytes
//! each); the entry of a credential no longer rotated stays (a follower
//! looks up only the paths it follows). AWS Secrets Manager holds at most 64 KiB per value (about 1,000
//! credentials), Azure Key Vault 25 KiB; KV v2 has no such small limit.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use super::{
    CurrentMark, Pending, Promote, Promoted, Select, StoredVersion, Vault, VaultItem, VersionRef,
};
use crate::model::{
    AgentId, CredentialId, CredentialKey, ErrorKind, PluginError, RotationId, SecretValue, Stage,
};

/// The format of the entry's JSON.
const FORMAT: u32 = 1;

/// The key the index entry is handled under (vaults use a key only in
/// messages and tags; the path is what places it).
static INDEX_KEY: LazyLock<CredentialKey> = LazyLock::new(|| {
    CredentialKey::new(
        AgentId::new("keyturn").expect("a valid id"),
        CredentialId::new("change-index").expect("a valid id"),
    )
});

/// The index entry at `path` as a vault item.
pub fn item(path: &str) -> VaultItem<'_> {
    VaultItem {
        key: &INDEX_KEY,
        path,
    }
}

/// The entry's JSON.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct IndexDoc {
    keyturn_change_index: u32,
    /// Credential path → the version ref promoted last.
    credentials: BTreeMap<String, VersionRef>,
}

/// Reads the index at `path`: credential path → current version ref.
/// `Ok(None)` when there is no index yet.
pub async fn read(
    vault: &dyn Vault,
    path: &str,
) -> Result<Option<BTreeMap<String, VersionRef>>, PluginError> {
    let Some(stored) = vault
        .read(item(path), Select::Stage(Stage::Current))
        .await?
    else {
        return Ok(None);
    };
    parse(vault, path, &stored).map(|d| Some(d.credentials))
}

fn parse(vault: &dyn Vault, path: &str, stored: &StoredVersion) -> Result<IndexDoc, PluginError> {
    // Not a secret, but whatever is at the path is not quoted: if it is not
    // an index, it may be a value someone put there.
    serde_json::from_slice::<IndexDoc>(stored.value.expose()).map_err(|e| {
        PluginError::new(
            ErrorKind::Invalid,
            format!(
                "vault {:?}: change index {path}: not a keyturn change index (line {}, column {}); is `change_index` the path of another secret?",
                vault.describe(),
                e.line(),
                e.column()
            ),
        )
    })
}

/// What an [`IndexedVault`] knows, under one lock.
#[derive(Default)]
struct Book {
    /// Records waiting for the next write.
    /// `None`: the credential's entry goes (its versions were destroyed).
    queued: BTreeMap<String, Option<VersionRef>>,
    /// The entry as the vault holds it, from the first read and then from
    /// this keyturn's own writes; `None` before the first read and after a
    /// failed write (the entry is read again then).
    doc: Option<IndexDoc>,
    /// A background write was spawned and has not taken the queue yet.
    kicked: bool,
}

impl Book {
    fn holds(&self, path: &str, version: &VersionRef) -> bool {
        self.doc
            .as_ref()
            .is_some_and(|d| d.credentials.get(path) == Some(version))
    }
}

/// The part of an [`IndexedVault`] its background writes share.
struct Core {
    inner: Arc<dyn Vault>,
    path: String,
    book: Mutex<Book>,
    /// Held by the one write in flight.
    writing: tokio::sync::Mutex<()>,
    writes: AtomicU64,
}

impl Core {
    fn book(&self) -> std::sync::MutexGuard<'_, Book> {
        self.book.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Writes everything queued, once the write in flight (if any) is
    /// done; returns early if `until` is in the index by then.
    async fn flush(&self, until: Option<(&str, &VersionRef)>) -> Result<(), PluginError> {
        let _writing = self.writing.lock().await;
        let records = {
            let mut b = self.book();
            if until.is_some_and(|(p, v)| b.holds(p, v)) {
                // Queued again by a `settle` while the write that carried
                // it was in flight: nothing left to write for those.
                let Book { queued, doc, .. } = &mut *b;
                if let Some(doc) = doc {
                    queued.retain(|p, v| doc.credentials.get(p) != v.as_ref());
                }
                return Ok(());
            }
            b.kicked = false;
            std::mem::take(&mut b.queued)
        };
        // Empty: whatever was queued went with an earlier write, or a newer
        // version of the same credential replaced it.
        if records.is_empty() {
            return Ok(());
        }
        match self.write(&records).await {
            Ok(()) => Ok(()),
            Err(e) => {
                // Back for the next write, which reads the entry again
                // first (this one may have half happened); a newer record
                // of the same credential (queued meanwhile) wins.
                let mut b = self.book();
                b.doc = None;
                for (p, v) in records {
                    b.queued.entry(p).or_insert(v);
                }
                Err(e)
            }
        }
    }

    /// One merge-and-write of the entry (reading it first only when this
    /// keyturn has no copy of it). Called under `writing`.
    async fn write(
        &self,
        records: &BTreeMap<String, Option<VersionRef>>,
    ) -> Result<(), PluginError> {
        let at = item(&self.path);
        let known = self.book().doc.clone();
        let mut doc = match known {
            Some(doc) => doc,
            None => match self.inner.read(at, Select::Stage(Stage::Current)).await? {
                Some(stored) => parse(self.inner.as_ref(), &self.path, &stored)?,
                None => IndexDoc::default(),
            },
        };
        let changed = doc.keyturn_change_index != FORMAT
            || records
                .iter()
                .any(|(p, v)| doc.credentials.get(p) != v.as_ref());
        if changed {
            doc.keyturn_change_index = FORMAT;
            for (p, v) in records {
                match v {
                    Some(v) => doc.credentials.insert(p.clone(), v.clone()),
                    None => doc.credentials.remove(p),
                };
            }
            let text = serde_json::to_string(&doc)
                .map_err(|e| PluginError::new(ErrorKind::Fatal, format!("change index: {e}")))?;
            let value = SecretValue::from_string(text);
            let rotation = RotationId::generate();
            let version = self.inner.stage(at.pending(&rotation, &value)).await?;
            self.inner.promote(at, &version).await?;
            self.writes.fetch_add(1, Ordering::Relaxed);
        }
        self.book().doc = Some(doc);
        Ok(())
    }
}

/// A vault whose promotes are recorded in its change index (see the
/// module docs). Everything else goes to the vault unchanged.
pub struct IndexedVault {
    core: Arc<Core>,
}

impl IndexedVault {
    pub fn new(inner: Arc<dyn Vault>, path: impl Into<String>) -> Self {
        Self {
            core: Arc::new(Core {
                inner,
                path: path.into(),
                book: Mutex::new(Book::default()),
                writing: tokio::sync::Mutex::new(()),
                writes: AtomicU64::new(0),
            }),
        }
    }

    /// Index writes so far (tests, and the batching they check).
    pub fn writes(&self) -> u64 {
        self.core.writes.load(Ordering::Relaxed)
    }

    fn context(&self, mut e: PluginError) -> PluginError {
        if !e.message.contains("change index") {
            e.message = format!("change index {}: {}", self.core.path, e.message);
        }
        e
    }
}

impl IndexedVault {
    /// Queues the change index record of a promote and kicks off its write.
    fn queue(&self, item: VaultItem<'_>, version: &VersionRef) {
        let kick = {
            let mut b = self.core.book();
            b.queued.insert(item.path.to_owned(), Some(version.clone()));
            !std::mem::replace(&mut b.kicked, true)
        };
        if kick {
            let core = self.core.clone();
            tokio::spawn(async move {
                if let Err(e) = core.flush(None).await {
                    // Not lost: queued again, written by the next write or
                    // by the `settle` of the deliver step, which retries.
                    tracing::warn!(vault = %core.inner.describe(), index = %core.path, kind = %e.kind, error = %e.message, "change index: write failed; retried with the next one");
                }
            });
        }
    }
}

#[async_trait]
impl Vault for IndexedVault {
    fn describe(&self) -> &str {
        self.core.inner.describe()
    }

    async fn close(&self) {
        self.core.inner.close().await;
    }

    async fn stage(&self, new: Pending<'_>) -> Result<VersionRef, PluginError> {
        self.core.inner.stage(new).await
    }

    async fn read(
        &self,
        item: VaultItem<'_>,
        select: Select<'_>,
    ) -> Result<Option<StoredVersion>, PluginError> {
        self.core.inner.read(item, select).await
    }

    /// Promotes, queues the record and returns; a background write takes
    /// it (see [`Vault::settle`] for the wait).
    async fn promote(&self, item: VaultItem<'_>, version: &VersionRef) -> Result<(), PluginError> {
        self.core.inner.promote(item, version).await?;
        self.queue(item, version);
        Ok(())
    }

    /// Like `promote`: the inner vault's, then the record queued.
    fn promote_reads_current(&self) -> bool {
        self.core.inner.promote_reads_current()
    }

    async fn promote_from(&self, item: VaultItem<'_>, p: Promote<'_>) -> Promoted {
        let before = self.core.inner.promote_from(item, p).await?;
        self.queue(item, p.version);
        Ok(before)
    }

    /// Returns once the index holds `version` for `item`: at once when it
    /// does already, else after the write that carries it (queuing it
    /// first when this decorator does not know it: a deliver step replayed
    /// after a restart). Meant for the version promoted last: it replaces
    /// a record of the same credential still queued.
    async fn settle(&self, item: VaultItem<'_>, version: &VersionRef) -> Result<(), PluginError> {
        self.core.inner.settle(item, version).await?;
        {
            let mut b = self.core.book();
            if b.holds(item.path, version) {
                return Ok(());
            }
            b.queued.insert(item.path.to_owned(), Some(version.clone()));
        }
        self.core
            .flush(Some((item.path, version)))
            .await
            .map_err(|e| self.context(e))
    }

    async fn retire(&self, item: VaultItem<'_>, version: &VersionRef) -> Result<(), PluginError> {
        self.core.inner.retire(item, version).await
    }

    /// Destroys, then takes the credential out of the index, so that its
    /// followers learn at their next poll that it is gone (they remove
    /// what they delivered). A failed index write does not fail the
    /// destroy, which is done: it is logged, and the record goes with the
    /// next write (followers' safety-net sweep finds the credential gone
    /// meanwhile).
    async fn destroy(&self, item: VaultItem<'_>) -> Result<(), PluginError> {
        self.core.inner.destroy(item).await?;
        {
            let mut b = self.core.book();
            if b.doc
                .as_ref()
                .is_some_and(|d| !d.credentials.contains_key(item.path))
            {
                return Ok(());
            }
            b.queued.insert(item.path.to_owned(), None);
        }
        if let Err(e) = self.core.flush(None).await {
            tracing::warn!(vault = %self.core.inner.describe(), index = %self.core.path, credential = %item.key, error = %e.message, "change index: removing a destroyed credential failed; retried with the next write");
        }
        Ok(())
    }

    async fn check(&self) -> Result<(), PluginError> {
        self.core.inner.check().await
    }

    async fn gone(&self, item: VaultItem<'_>, delivered: &VersionRef) -> Result<bool, PluginError> {
        self.core.inner.gone(item, delivered).await
    }

    async fn current_mark(&self, item: VaultItem<'_>) -> Result<Option<CurrentMark>, PluginError> {
        self.core.inner.current_mark(item).await
    }
}

/// For tests: a vault whose change index (at `index`) has its writes
/// slowed down by `slow` (so promotes pile up behind one), a count of index `stage`s
/// to fail, an optional gate that index `stage`s wait at, and a count of
/// index reads.
#[cfg(test)]
pub(crate) struct IndexGate {
    pub(crate) inner: Arc<dyn Vault>,
    pub(crate) index: &'static str,
    pub(crate) slow: std::time::Duration,
    pub(crate) fail: std::sync::atomic::AtomicUsize,
    pub(crate) hold: Mutex<Option<Arc<tokio::sync::Notify>>>,
    pub(crate) index_reads: std::sync::atomic::AtomicUsize,
}

#[cfg(test)]
impl IndexGate {
    /// `inner` with its index at `index`, failing the next `fail` index
    /// `stage`s, not slowed down.
    pub(crate) fn new(inner: Arc<dyn Vault>, index: &'static str, fail: usize) -> IndexGate {
        IndexGate {
            inner,
            index,
            slow: std::time::Duration::ZERO,
            fail: fail.into(),
            hold: Mutex::new(None),
            index_reads: 0.into(),
        }
    }
}

#[cfg(test)]
#[async_trait]
impl Vault for IndexGate {
    fn describe(&self) -> &str {
        self.inner.describe()
    }
    async fn stage(&self, new: Pending<'_>) -> Result<VersionRef, PluginError> {
        if new.item.path == self.index {
            let hold = self.hold.lock().unwrap().clone();
            if let Some(gate) = hold {
                gate.notified().await;
            }
            tokio::time::sleep(self.slow).await;
            let failing = self
                .fail
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
            if failing.is_ok() {
                return Err(PluginError::new(
                    ErrorKind::Transient,
                    "index down (injected)",
                ));
            }
        }
        self.inner.stage(new).await
    }
    async fn read(
        &self,
        item: VaultItem<'_>,
        select: Select<'_>,
    ) -> Result<Option<StoredVersion>, PluginError> {
        if item.path == self.index {
            self.index_reads.fetch_add(1, Ordering::SeqCst);
        }
        self.inner.read(item, select).await
    }
    async fn promote(&self, item: VaultItem<'_>, v: &VersionRef) -> Result<(), PluginError> {
        self.inner.promote(item, v).await
    }
    async fn retire(&self, item: VaultItem<'_>, v: &VersionRef) -> Result<(), PluginError> {
        self.inner.retire(item, v).await
    }
    async fn destroy(&self, item: VaultItem<'_>) -> Result<(), PluginError> {
        self.inner.destroy(item).await
    }
    async fn check(&self) -> Result<(), PluginError> {
        Ok(())
    }
    async fn gone(&self, item: VaultItem<'_>, delivered: &VersionRef) -> Result<bool, PluginError> {
        self.inner.gone(item, delivered).await
    }

    async fn current_mark(&self, item: VaultItem<'_>) -> Result<Option<CurrentMark>, PluginError> {
        self.inner.current_mark(item).await
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::sync::Notify;

    use super::*;
    use crate::vaults::VaultPlugin;
    use crate::vaults::toy::ToyConfig;

    const INDEX: &str = "keyturn/index";

    fn indexed() -> (Arc<IndexedVault>, Arc<IndexGate>) {
        let gate = Arc::new(IndexGate {
            slow: Duration::from_millis(20),
            ..IndexGate::new(ToyConfig::default().open("toy").unwrap(), INDEX, 0)
        });
        (Arc::new(IndexedVault::new(gate.clone(), INDEX)), gate)
    }

    fn key(n: usize) -> CredentialKey {
        crate::test_support::key("bot", &format!("c{n}"))
    }

    fn cred_path(n: usize) -> String {
        format!("agents/bot/c{n}")
    }

    /// Stages and promotes a value of credential `n` through `v` (the
    /// rotation's create and promote steps).
    async fn promote(v: &dyn Vault, n: usize) -> Result<VersionRef, PluginError> {
        let key = key(n);
        let path = cred_path(n);
        let item = VaultItem {
            key: &key,
            path: &path,
        };
        let rotation = RotationId::generate();
        let value = SecretValue::from_string(format!("kt-canary-{n}"));
        let version = v.stage(item.pending(&rotation, &value)).await?;
        v.promote(item, &version).await?;
        Ok(version)
    }

    async fn settle(v: &dyn Vault, n: usize, version: &VersionRef) -> Result<(), PluginError> {
        let key = key(n);
        let path = cred_path(n);
        v.settle(
            VaultItem {
                key: &key,
                path: &path,
            },
            version,
        )
        .await
    }

    /// Promotes and settles, as a rotation does (settle at the end of its
    /// deliver step).
    async fn rotate(v: &dyn Vault, n: usize) -> Result<VersionRef, PluginError> {
        let version = promote(v, n).await?;
        settle(v, n, &version).await?;
        Ok(version)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_promotes_lose_no_update_and_share_index_writes() {
        let (v, gate) = indexed();
        let tasks: Vec<_> = (0..40)
            .map(|n| {
                let v = v.clone();
                tokio::spawn(async move { (n, rotate(v.as_ref(), n).await.unwrap()) })
            })
            .collect();
        let mut promoted = BTreeMap::new();
        for t in tasks {
            let (n, version) = t.await.unwrap();
            promoted.insert(cred_path(n), version);
        }
        let listed = read(v.as_ref(), INDEX).await.unwrap().expect("an index");
        assert_eq!(
            listed, promoted,
            "every promote is in the index, with its version"
        );
        assert!(
            v.writes() < 10,
            "40 concurrent promotes took {} index writes; they should share a few",
            v.writes()
        );
        // The decorator read the entry once (its first write), then kept
        // its copy; the other read is the check just above.
        assert_eq!(gate.index_reads.load(Ordering::SeqCst), 2);
        // No secret value in the index.
        let raw = v
            .read(item(INDEX), Select::Stage(Stage::Current))
            .await
            .unwrap()
            .unwrap();
        let text = String::from_utf8(raw.value.expose().to_vec()).unwrap();
        assert!(!text.contains("kt-canary"), "{text}");
        assert!(text.contains("\"keyturn_change_index\":1"), "{text}");
    }

    /// The index write is off the promote's path: `promote` returns while
    /// the write is held up, and `settle` returns only once it is done.
    #[tokio::test]
    async fn promote_returns_before_the_index_write_and_settle_waits_for_it() {
        let (v, gate) = indexed();
        let release = Arc::new(Notify::new());
        *gate.hold.lock().unwrap() = Some(release.clone());
        let version = tokio::time::timeout(Duration::from_secs(5), promote(v.as_ref(), 0))
            .await
            .expect("promote waited for the index write")
            .unwrap();
        assert_eq!(
            read(gate.as_ref(), INDEX).await.unwrap(),
            None,
            "the index was written before the gate opened"
        );
        let settling = {
            let (v, version) = (v.clone(), version.clone());
            tokio::spawn(async move { settle(v.as_ref(), 0, &version).await })
        };
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(
            !settling.is_finished(),
            "settle returned before the index held the version"
        );
        release.notify_one();
        tokio::time::timeout(Duration::from_secs(5), settling)
            .await
            .expect("settle never returned")
            .unwrap()
            .unwrap();
        let listed = read(gate.as_ref(), INDEX).await.unwrap().unwrap();
        assert_eq!(listed.get(&cred_path(0)), Some(&version));
        assert_eq!(v.writes(), 1, "the background write and settle shared one");
    }

    /// After a restart nothing is pending in the (new) decorator: `settle`
    /// of a version promoted before the crash records it; `settle` of a
    /// version the index holds already writes nothing.
    #[tokio::test]
    async fn settle_after_a_restart_records_a_version_the_decorator_never_saw() {
        let (v, gate) = indexed();
        let first = rotate(v.as_ref(), 0).await.unwrap();
        // Promoted, then the process died before the index write.
        let lost = promote(gate.as_ref(), 1).await.unwrap();
        drop(v);
        let restarted = IndexedVault::new(gate.clone(), INDEX);
        settle(&restarted, 1, &lost).await.unwrap();
        let listed = read(gate.as_ref(), INDEX).await.unwrap().unwrap();
        assert_eq!(listed.get(&cred_path(1)), Some(&lost), "{listed:?}");
        assert_eq!(listed.get(&cred_path(0)), Some(&first), "{listed:?}");
        assert_eq!(restarted.writes(), 1);
        // A replayed deliver step whose version is in the index already:
        // one read, no write.
        let again = IndexedVault::new(gate.clone(), INDEX);
        let reads = gate.index_reads.load(Ordering::SeqCst);
        settle(&again, 0, &first).await.unwrap();
        assert_eq!(again.writes(), 0, "rewrote an index that held the version");
        assert_eq!(gate.index_reads.load(Ordering::SeqCst), reads + 1);
    }

    #[tokio::test]
    async fn a_failed_index_write_fails_settle_and_its_records_go_with_the_next_write() {
        let (v, gate) = indexed();
        let first = rotate(v.as_ref(), 0).await.unwrap();
        assert_eq!(gate.index_reads.load(Ordering::SeqCst), 1);
        // Down for the background write and for settle's own.
        gate.fail.store(2, Ordering::SeqCst);
        let lost = promote(v.as_ref(), 1)
            .await
            .expect("promote does not wait for the index");
        let e = settle(v.as_ref(), 1, &lost).await.unwrap_err();
        assert_eq!(e.kind, ErrorKind::Transient);
        assert!(e.message.contains("change index"), "{}", e.message);
        // The other of the two writes (the background one) fails too.
        tokio::time::timeout(Duration::from_secs(5), async {
            while gate.fail.load(Ordering::SeqCst) > 0 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("only one index write was tried");
        // c1 is promoted in the vault but not yet in the index.
        let listed = read(gate.as_ref(), INDEX).await.unwrap().unwrap();
        assert_eq!(listed.len(), 1, "{listed:?}");
        // The next write (another credential's) carries it, after reading
        // the entry again (a failed write may have half happened).
        let reads = gate.index_reads.load(Ordering::SeqCst);
        let third = rotate(v.as_ref(), 2).await.unwrap();
        assert_eq!(gate.index_reads.load(Ordering::SeqCst), reads + 1);
        let listed = read(gate.as_ref(), INDEX).await.unwrap().unwrap();
        assert_eq!(listed.get(&cred_path(0)), Some(&first));
        assert_eq!(listed.get(&cred_path(1)), Some(&lost));
        assert_eq!(listed.get(&cred_path(2)), Some(&third));
        // The engine's retry of c1's deliver step settles at once.
        let writes = v.writes();
        settle(v.as_ref(), 1, &lost).await.unwrap();
        assert_eq!(v.writes(), writes);
        // The newest version of a credential wins.
        let newer = rotate(v.as_ref(), 0).await.unwrap();
        let listed = read(gate.as_ref(), INDEX).await.unwrap().unwrap();
        assert_eq!(listed.get(&cred_path(0)), Some(&newer));
    }

    #[tokio::test]
    async fn something_else_at_the_index_path_is_an_invalid_error_without_its_content() {
        let (v, gate) = indexed();
        let k = key(9);
        let at = VaultItem {
            key: &k,
            path: INDEX,
        };
        let rotation = RotationId::generate();
        let value = SecretValue::from_string("kt-canary-not-an-index".into());
        let version = gate.stage(at.pending(&rotation, &value)).await.unwrap();
        gate.promote(at, &version).await.unwrap();
        let e = read(v.as_ref(), INDEX).await.unwrap_err();
        assert_eq!(e.kind, ErrorKind::Invalid);
        assert!(!e.message.contains("kt-canary"), "{}", e.message);
        assert!(
            e.message.contains("not a keyturn change index"),
            "{}",
            e.message
        );
        // And a rotation's settle says so too (its promote went ahead).
        let promoted = promote(v.as_ref(), 0).await.unwrap();
        let e = settle(v.as_ref(), 0, &promoted).await.unwrap_err();
        assert_eq!(e.kind, ErrorKind::Invalid);
        assert!(!e.message.contains("kt-canary"), "{}", e.message);
    }
}
