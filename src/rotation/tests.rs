//! Engine tests with a scripted vault decorator: the real local vault, SQLite
//! state and audit log, with failures injected in front of the vault so the
//! engine's one failure path (retry, backoff, park, resume) is exercised.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::Step;
use super::{Catalog, CredEntry, Engine, VaultHandle};
use crate::audit::{AuditLog, verify_file};
use crate::model::{
    AgentId, CredentialId, CredentialKey, ErrorKind, PluginError, RotationId, SecretValue,
};
use crate::state::{SqliteStore, StateStore};
use crate::telemetry::Metrics;
use crate::vaults::local::{LocalKey, LocalVault};
use crate::vaults::{Select, StoredVersion, Vault, VaultItem, VersionRef};

/// Fails the next `failures` calls to `stage` with `kind` (and
/// `retry_after`), then delegates.
struct FlakyVault {
    inner: LocalVault,
    failures: AtomicU32,
    kind: ErrorKind,
    retry_after: Option<Duration>,
    stage_calls: AtomicU32,
    /// When each `stage` call came.
    stage_times: Mutex<Vec<Instant>>,
}

#[async_trait]
impl Vault for FlakyVault {
    fn name(&self) -> &str {
        self.inner.name()
    }
    async fn stage(
        &self,
        item: VaultItem<'_>,
        rotation: &RotationId,
        value: &SecretValue,
    ) -> Result<VersionRef, PluginError> {
        self.stage_calls.fetch_add(1, Ordering::SeqCst);
        self.stage_times.lock().unwrap().push(Instant::now());
        let left = self.failures.load(Ordering::SeqCst);
        if left > 0 {
            self.failures.store(left - 1, Ordering::SeqCst);
            return Err(PluginError::new(self.kind, "vault unavailable (injected)")
                .with_retry_after(self.retry_after));
        }
        self.inner.stage(item, rotation, value).await
    }
    async fn read(
        &self,
        item: VaultItem<'_>,
        select: Select<'_>,
    ) -> Result<Option<StoredVersion>, PluginError> {
        self.inner.read(item, select).await
    }
    async fn promote(&self, item: VaultItem<'_>, version: &VersionRef) -> Result<(), PluginError> {
        self.inner.promote(item, version).await
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
}

struct Rig {
    dir: tempfile::TempDir,
    engine: Engine,
    vault: Arc<FlakyVault>,
    state: Arc<dyn StateStore>,
    cancel: CancellationToken,
    tracker: TaskTracker,
}

fn key() -> CredentialKey {
    CredentialKey::new(
        AgentId::new("bot").unwrap(),
        CredentialId::new("db").unwrap(),
    )
}

async fn rig(failures: u32, kind: ErrorKind) -> Rig {
    rig_with(failures, kind, None).await
}

async fn rig_with(failures: u32, kind: ErrorKind, retry_after: Option<Duration>) -> Rig {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display();
    let text = format!(
        r#"[daemon]
state_dir = "{d}/state"
socket = "{d}/control.sock"
delivery_roots = ["{d}/agents"]
retry = {{ initial_delay = "10ms", max_delay = "40ms", max_attempts = 3 }}
[vaults.local]
type = "local"
[agents.bot]
owner = "alice@example.com"
tenant = "acme"
tier = "high"
[agents.bot.credentials.db]
vault = "local"
generate = {{ kind = "password", length = 20 }}
every = "1h"
grace = "1h"
deliver = [{{ type = "file", path = "{d}/agents/bot/db" }}]
"#
    );
    let config = crate::config::load_str(&dir.path().join("k.toml"), &text).expect("valid config");
    let mut catalog = Catalog::build(config, None).expect("catalog");
    let vault = Arc::new(FlakyVault {
        inner: LocalVault::open("local", &dir.path().join("vault"), LocalKey::generate()).unwrap(),
        failures: AtomicU32::new(failures),
        kind,
        retry_after,
        stage_calls: AtomicU32::new(0),
        stage_times: Mutex::new(Vec::new()),
    });
    let shared = &catalog.vaults["local"];
    let handle = Arc::new(VaultHandle {
        vault: vault.clone(),
        limit: shared.limit.clone(),
        config: shared.config.clone(),
    });
    let old = catalog.creds.remove(&key()).unwrap();
    let entry = CredEntry {
        agent: old.agent.clone(),
        cfg: old.cfg.clone(),
        vaults: vec![handle].into(),
        target: old.target.clone(),
        sinks: old.sinks.clone(),
        offset: old.offset,
    };
    catalog.creds.insert(Arc::new(entry));
    let state: Arc<dyn StateStore> =
        Arc::new(SqliteStore::open(&dir.path().join("state.db")).unwrap());
    let audit = AuditLog::open(&dir.path().join("audit.log"), None).unwrap();
    let cancel = CancellationToken::new();
    let tracker = TaskTracker::new();
    let engine = Engine::new(
        catalog,
        state.clone(),
        audit,
        Arc::new(Metrics::new()),
        cancel.clone(),
        tracker.clone(),
    )
    .unwrap();
    Rig {
        dir,
        engine,
        vault,
        state,
        cancel,
        tracker,
    }
}

impl Rig {
    fn delivered(&self) -> Option<String> {
        std::fs::read_to_string(self.dir.path().join("agents/bot/db")).ok()
    }
    fn audit_text(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("audit.log")).unwrap()
    }
    async fn shutdown(self) {
        self.cancel.cancel();
        self.tracker.close();
        self.tracker.wait().await;
        self.engine.audit().close().await;
        let head = self.state.audit_head().unwrap();
        verify_file(&self.dir.path().join("audit.log"), head.as_ref()).expect("audit chain intact");
    }
}

#[tokio::test]
async fn transient_failures_are_retried_within_the_rotation() {
    let rig = rig(2, ErrorKind::Transient).await;
    let done = rig.engine.trigger(&key()).unwrap().await.unwrap();
    assert_eq!(done.error, None);
    assert_eq!(done.version, Some(1));
    assert_eq!(
        rig.vault.stage_calls.load(Ordering::SeqCst),
        3,
        "two failures, then success"
    );
    assert_eq!(rig.delivered().map(|v| v.len()), Some(20));
    let audit = rig.audit_text();
    assert_eq!(audit.matches("\"event\":\"rotation.create\",\"actor\":{\"type\":\"daemon\"},\"outcome\":\"failed\"").count(), 2, "{audit}");
    let rows = rig.state.versions(&key()).unwrap();
    assert_eq!(rows.len(), 1, "exactly one version despite the retries");
    rig.shutdown().await;
}

#[tokio::test]
async fn exhausted_retries_park_the_rotation_and_status_names_the_step_then_it_completes() {
    // 3 attempts per run: the first run fails, the parked retry succeeds.
    let rig = rig(3, ErrorKind::Throttled).await;
    let sched = {
        let e = rig.engine.clone();
        tokio::spawn(async move { e.run_scheduler(None, || {}).await })
    };
    let first = rig.engine.trigger(&key()).unwrap().await.unwrap();
    let err = first.error.expect("the rotation fails after 3 attempts");
    assert!(
        err.contains("bot/db") && err.contains("step create") && err.contains("vault \"local\""),
        "{err}"
    );
    let status = rig.engine.status();
    assert_eq!(status[0].state, "failed");
    assert_eq!(
        status[0].step,
        Some(Step::Create),
        "a parked rotation shows the step it failed at"
    );
    assert!(status[0].rotation.is_some(), "{:?}", status[0]);
    assert!(
        status[0]
            .last_error
            .as_deref()
            .unwrap_or("")
            .contains("step create"),
        "{:?}",
        status[0]
    );
    assert!(rig.delivered().is_none());

    // The parked rotation is retried by the scheduler (park delay = 40ms) and completes.
    let mut waited = 0;
    while rig.engine.status()[0].version.is_none() {
        tokio::time::sleep(Duration::from_millis(20)).await;
        waited += 1;
        assert!(
            waited < 250,
            "the parked rotation was never retried: {:?}",
            rig.engine.status()
        );
    }
    let s = &rig.engine.status()[0];
    assert_eq!(s.version, Some(1));
    assert_eq!(s.last_error, None, "a success clears the error");
    assert!(rig.delivered().is_some());
    // The retry resumed the same rotation: one rotation id, one version.
    assert_eq!(rig.state.versions(&key()).unwrap().len(), 1);
    sched.abort();
    rig.shutdown().await;
}

#[tokio::test]
async fn a_non_retryable_error_parks_at_once() {
    let rig = rig(1, ErrorKind::Unauthorized).await;
    let done = rig.engine.trigger(&key()).unwrap().await.unwrap();
    assert!(done.error.unwrap().contains("unauthorized"));
    assert_eq!(
        rig.vault.stage_calls.load(Ordering::SeqCst),
        1,
        "no retry of an unauthorized call"
    );
    // A manual retry resumes the same rotation and succeeds.
    let again = rig.engine.trigger(&key()).unwrap().await.unwrap();
    assert_eq!(again.error, None);
    assert_eq!(again.version, Some(1));
    rig.shutdown().await;
}

#[tokio::test]
async fn concurrent_triggers_join_one_rotation() {
    let rig = rig(0, ErrorKind::Transient).await;
    let a = rig.engine.trigger(&key()).unwrap();
    let b = rig.engine.trigger(&key()).unwrap();
    let (a, b) = (a.await.unwrap(), b.await.unwrap());
    assert_eq!(a.rotation, b.rotation);
    assert_eq!(rig.vault.stage_calls.load(Ordering::SeqCst), 1);
    let next = rig.engine.trigger(&key()).unwrap().await.unwrap();
    assert_eq!(next.version, Some(2));
    rig.shutdown().await;
}

#[tokio::test]
async fn retry_after_is_honoured_by_the_in_step_retries_and_by_the_parked_retry() {
    // 3 attempts per run and a park delay of 40 ms: the first run fails
    // three times, the parked retry succeeds. Every wait, the one before the
    // parked retry included, must be at least the vault's Retry-After.
    const AFTER: Duration = Duration::from_millis(300);
    let rig = rig_with(3, ErrorKind::Throttled, Some(AFTER)).await;
    let sched = {
        let e = rig.engine.clone();
        tokio::spawn(async move { e.run_scheduler(None, || {}).await })
    };
    let first = rig.engine.trigger(&key()).unwrap().await.unwrap();
    assert!(first.error.is_some(), "parked after 3 throttled attempts");
    let mut waited = 0;
    while rig.engine.status()[0].version.is_none() {
        tokio::time::sleep(Duration::from_millis(20)).await;
        waited += 1;
        assert!(waited < 250, "never retried: {:?}", rig.engine.status());
    }
    let times = rig.vault.stage_times.lock().unwrap().clone();
    assert_eq!(times.len(), 4, "3 throttled attempts, then success");
    for (i, w) in times.windows(2).enumerate() {
        let gap = w[1] - w[0];
        assert!(
            gap >= AFTER,
            "attempt {} came {gap:?} after a throttled one (Retry-After {AFTER:?})",
            i + 2
        );
    }
    sched.abort();
    rig.shutdown().await;
}
