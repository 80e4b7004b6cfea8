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
//! [`IndexedVault`] is a decorator around the rotating keyturn's vault: its
//! `promote` promotes, then records `{path: version}` and returns only once
//! the index holds it. So a crash between the two replays the promote step
//! (a no-op in the vault) and records again: no update is lost to a crash.
//! Records are group-committed: one write carries every record that arrived
//! while the previous write was in flight, so a burst of promotes costs a
//! few writes, not one each, and an idle rotator writes nothing. Within one
//! keyturn no update is lost to concurrency either: a write is a
//! read-merge-write under one lock, and a failed write puts its records back
//! for the next one (the caller whose write failed gets the error, and the
//! engine retries its promote). Two *rotating* keyturns must not share one
//! index path (their writes could interleave between read and write); one
//! rotator per index is the layout this is for.
//!
//! The entry grows with the credentials rotated through it (~60 bytes
//! each). AWS Secrets Manager holds at most 64 KiB per value (about 1,000
//! credentials), Azure Key Vault 25 KiB; KV v2 has no such small limit.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use super::{CurrentMark, Pending, Select, StoredVersion, Vault, VaultItem, VersionRef};
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
#[derive(Debug, Default, Serialize, Deserialize)]
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

/// Records waiting for the next write.
struct Queued {
    records: BTreeMap<String, VersionRef>,
    /// The number of the write that will take `records` (from 1).
    batch: u64,
}

/// A vault whose promotes are recorded in its change index (see the
/// module docs). Everything else goes to the vault unchanged.
pub struct IndexedVault {
    inner: Arc<dyn Vault>,
    path: String,
    queued: Mutex<Queued>,
    /// Held by the one write in flight; holds the number of the last batch
    /// written.
    writing: tokio::sync::Mutex<u64>,
    writes: AtomicU64,
}

impl IndexedVault {
    pub fn new(inner: Arc<dyn Vault>, path: impl Into<String>) -> Self {
        Self {
            inner,
            path: path.into(),
            queued: Mutex::new(Queued {
                records: BTreeMap::new(),
                batch: 1,
            }),
            writing: tokio::sync::Mutex::new(0),
            writes: AtomicU64::new(0),
        }
    }

    /// Index writes so far (tests, and the batching they check).
    pub fn writes(&self) -> u64 {
        self.writes.load(Ordering::Relaxed)
    }

    fn queued(&self) -> std::sync::MutexGuard<'_, Queued> {
        self.queued.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records `path` → `version` and returns once the index holds it.
    pub async fn record(&self, path: &str, version: &VersionRef) -> Result<(), PluginError> {
        let mine = {
            let mut q = self.queued();
            q.records.insert(path.to_owned(), version.clone());
            q.batch
        };
        let mut written = self.writing.lock().await;
        // Batches are taken in order under this lock, so a write that took
        // ours has finished: it either succeeded, or put ours back.
        if *written >= mine {
            return Ok(());
        }
        let (records, batch) = {
            let mut q = self.queued();
            let batch = q.batch;
            q.batch += 1;
            (std::mem::take(&mut q.records), batch)
        };
        match self.write(&records).await {
            Ok(()) => {
                *written = batch;
                Ok(())
            }
            Err(e) => {
                // Back for the next write; a newer record of the same
                // credential (queued meanwhile) wins.
                let mut q = self.queued();
                for (p, v) in records {
                    q.records.entry(p).or_insert(v);
                }
                Err(e)
            }
        }
    }

    /// One read-merge-write of the entry.
    async fn write(&self, records: &BTreeMap<String, VersionRef>) -> Result<(), PluginError> {
        let at = item(&self.path);
        let mut doc = match self.inner.read(at, Select::Stage(Stage::Current)).await? {
            Some(stored) => parse(self.inner.as_ref(), &self.path, &stored)?,
            None => IndexDoc::default(),
        };
        doc.keyturn_change_index = FORMAT;
        doc.credentials
            .extend(records.iter().map(|(p, v)| (p.clone(), v.clone())));
        let text = serde_json::to_string(&doc)
            .map_err(|e| PluginError::new(ErrorKind::Fatal, format!("change index: {e}")))?;
        let value = SecretValue::from_string(text);
        let rotation = RotationId::generate();
        let version = self.inner.stage(at.pending(&rotation, &value)).await?;
        self.inner.promote(at, &version).await?;
        self.writes.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

#[async_trait]
impl Vault for IndexedVault {
    fn describe(&self) -> &str {
        self.inner.describe()
    }

    async fn stage(&self, new: Pending<'_>) -> Result<VersionRef, PluginError> {
        self.inner.stage(new).await
    }

    async fn read(
        &self,
        item: VaultItem<'_>,
        select: Select<'_>,
    ) -> Result<Option<StoredVersion>, PluginError> {
        self.inner.read(item, select).await
    }

    async fn promote(&self, item: VaultItem<'_>, version: &VersionRef) -> Result<(), PluginError> {
        self.inner.promote(item, version).await?;
        self.record(item.path, version).await.map_err(|mut e| {
            e.message = format!("recording the promote in the change index: {}", e.message);
            e
        })
    }

    async fn retire(&self, item: VaultItem<'_>, version: &VersionRef) -> Result<(), PluginError> {
        self.inner.retire(item, version).await
    }

    async fn destroy(&self, item: VaultItem<'_>) -> Result<(), PluginError> {
        self.inner.destroy(item).await
    }

    async fn check(&self) -> Result<(), PluginError> {
        self.inner.check().await
    }

    async fn current_mark(&self, item: VaultItem<'_>) -> Result<Option<CurrentMark>, PluginError> {
        self.inner.current_mark(item).await
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicBool;
    use std::time::Duration;

    use super::*;
    use crate::vaults::VaultPlugin;
    use crate::vaults::toy::ToyConfig;

    /// The toy vault, with index writes slowed down (so promotes pile up
    /// behind one) and a switch that makes the next index `stage` fail.
    struct Slow {
        inner: Arc<dyn Vault>,
        fail_next: AtomicBool,
    }

    #[async_trait]
    impl Vault for Slow {
        fn describe(&self) -> &str {
            self.inner.describe()
        }
        async fn stage(&self, new: Pending<'_>) -> Result<VersionRef, PluginError> {
            if new.item.path == INDEX {
                tokio::time::sleep(Duration::from_millis(20)).await;
                if self.fail_next.swap(false, Ordering::SeqCst) {
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
    }

    const INDEX: &str = "keyturn/index";

    fn indexed() -> (Arc<IndexedVault>, Arc<Slow>) {
        let slow = Arc::new(Slow {
            inner: ToyConfig::default().open("toy").unwrap(),
            fail_next: AtomicBool::new(false),
        });
        (Arc::new(IndexedVault::new(slow.clone(), INDEX)), slow)
    }

    fn key(n: usize) -> CredentialKey {
        crate::test_support::key("bot", &format!("c{n}"))
    }

    /// Stages and promotes a value of credential `n` through `v`.
    async fn rotate(v: &IndexedVault, n: usize) -> Result<VersionRef, PluginError> {
        let key = key(n);
        let path = format!("agents/bot/c{n}");
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

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_promotes_lose_no_update_and_share_index_writes() {
        let (v, _) = indexed();
        let tasks: Vec<_> = (0..40)
            .map(|n| {
                let v = v.clone();
                tokio::spawn(async move { (n, rotate(&v, n).await.unwrap()) })
            })
            .collect();
        let mut promoted = BTreeMap::new();
        for t in tasks {
            let (n, version) = t.await.unwrap();
            promoted.insert(format!("agents/bot/c{n}"), version);
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

    #[tokio::test]
    async fn a_failed_index_write_fails_its_promote_and_its_records_go_with_the_next_write() {
        let (v, slow) = indexed();
        let first = rotate(&v, 0).await.unwrap();
        slow.fail_next.store(true, Ordering::SeqCst);
        let e = rotate(&v, 1).await.unwrap_err();
        assert_eq!(e.kind, ErrorKind::Transient);
        assert!(e.message.contains("change index"), "{}", e.message);
        // c1 is promoted in the vault but not yet in the index.
        let listed = read(v.as_ref(), INDEX).await.unwrap().unwrap();
        assert_eq!(listed.len(), 1, "{listed:?}");
        // The next write (another credential's promote) carries it.
        let third = rotate(&v, 2).await.unwrap();
        let listed = read(v.as_ref(), INDEX).await.unwrap().unwrap();
        assert_eq!(listed.get("agents/bot/c0"), Some(&first));
        assert!(listed.contains_key("agents/bot/c1"), "{listed:?}");
        assert_eq!(listed.get("agents/bot/c2"), Some(&third));
        // The newest version of a credential wins.
        let newer = rotate(&v, 0).await.unwrap();
        let listed = read(v.as_ref(), INDEX).await.unwrap().unwrap();
        assert_eq!(listed.get("agents/bot/c0"), Some(&newer));
    }

    #[tokio::test]
    async fn something_else_at_the_index_path_is_an_invalid_error_without_its_content() {
        let (v, slow) = indexed();
        let k = key(9);
        let at = VaultItem {
            key: &k,
            path: INDEX,
        };
        let rotation = RotationId::generate();
        let value = SecretValue::from_string("kt-canary-not-an-index".into());
        let version = slow.stage(at.pending(&rotation, &value)).await.unwrap();
        slow.promote(at, &version).await.unwrap();
        let e = read(v.as_ref(), INDEX).await.unwrap_err();
        assert_eq!(e.kind, ErrorKind::Invalid);
        assert!(!e.message.contains("kt-canary"), "{}", e.message);
        assert!(
            e.message.contains("not a keyturn change index"),
            "{}",
            e.message
        );
    }
}
