//! Engine tests under paused time: deterministic and fast.
//!
//! The engine runs on a [`TokioClock`] under `tokio::time::pause()`, with
//! its state in a [`MemoryStore`] served inline, an inline audit log, an
//! in-memory vault with scripted faults and an in-memory sink. Nothing it
//! awaits runs on another thread, so virtual time moves only when every task
//! waits for a timer: a six-hour schedule takes milliseconds, and every
//! timestamp below is exact.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{Catalog, CredEntry, Engine, RotateFinished, Step, TokioClock, VaultHandle};
use crate::api::StatusRow;
use crate::audit::{AuditLog, verify_file};
use crate::model::{
    CredentialKey, ErrorKind, PluginError, RotationId, SecretValue, Stage, VersionNo,
};
use crate::sinks::{Delivered, Notice, Sink};
use crate::state::{CredentialRow, MemoryStore, StateStore, Write};
use crate::vaults::{CurrentMark, Pending, Select, StoredVersion, Vault, VaultItem, VersionRef};

// ---------------------------------------------------------------------------
// In-memory plug-ins
// ---------------------------------------------------------------------------

struct Version {
    n: u64,
    rotation: RotationId,
    stage: Stage,
    value: Option<Vec<u8>>,
}

/// A vault in memory with the contract's semantics (stage idempotent per
/// rotation, promote moves current → previous → retired, retire only a
/// previous), scripted faults and slow operations, and a log of every call
/// with its (virtual) time.
#[derive(Default)]
struct MemVault {
    paths: Mutex<HashMap<String, Vec<Version>>>,
    faults: Mutex<VecDeque<(&'static str, PluginError)>>,
    slow: Mutex<HashMap<&'static str, Duration>>,
    calls: Mutex<Vec<(&'static str, String, Instant)>>,
}

impl MemVault {
    /// The next `n` calls of `op` fail with `kind` (and `retry_after`).
    fn fail(&self, op: &'static str, n: usize, kind: ErrorKind, retry_after: Option<Duration>) {
        let mut f = self.faults.lock().unwrap();
        for _ in 0..n {
            f.push_back((
                op,
                PluginError::new(kind, format!("{op} refused (injected)"))
                    .with_retry_after(retry_after),
            ));
        }
    }

    fn slow(&self, op: &'static str, d: Duration) {
        self.slow.lock().unwrap().insert(op, d);
    }

    /// When each call of `op` came, for `path` (any path when `None`).
    fn times(&self, op: &str, path: Option<&str>) -> Vec<Instant> {
        self.calls
            .lock()
            .unwrap()
            .iter()
            .filter(|(o, p, _)| *o == op && path.is_none_or(|want| p == want))
            .map(|(_, _, t)| *t)
            .collect()
    }

    fn stages(&self, path: &str) -> Vec<(u64, Stage)> {
        self.paths
            .lock()
            .unwrap()
            .get(path)
            .map(|vs| vs.iter().map(|v| (v.n, v.stage)).collect())
            .unwrap_or_default()
    }

    /// Deletes every version at `path`, as someone could out of band.
    fn delete_all(&self, path: &str) {
        self.paths.lock().unwrap().remove(path);
    }

    /// Deletes `path`'s pending version, as someone could out of band.
    fn delete_pending(&self, path: &str) {
        self.paths
            .lock()
            .unwrap()
            .get_mut(path)
            .unwrap()
            .retain(|v| v.stage != Stage::Pending);
    }

    async fn enter(&self, op: &'static str, path: &str) -> Result<(), PluginError> {
        self.calls
            .lock()
            .unwrap()
            .push((op, path.to_owned(), Instant::now()));
        let delay = self.slow.lock().unwrap().get(op).copied();
        if let Some(d) = delay {
            tokio::time::sleep(d).await;
        }
        let mut faults = self.faults.lock().unwrap();
        if faults.front().is_some_and(|(o, _)| *o == op) {
            return Err(faults.pop_front().expect("checked").1);
        }
        Ok(())
    }
}

fn parse(r: &VersionRef) -> u64 {
    r.0.parse().expect("a version number")
}

#[async_trait]
impl Vault for MemVault {
    fn describe(&self) -> &str {
        "mem"
    }

    async fn stage(&self, new: Pending<'_>) -> Result<VersionRef, PluginError> {
        self.enter("stage", new.item.path).await?;
        let mut paths = self.paths.lock().unwrap();
        let vs = paths.entry(new.item.path.to_owned()).or_default();
        if let Some(v) = vs.iter().find(|v| v.rotation == *new.rotation) {
            return Ok(VersionRef(v.n.to_string()));
        }
        for v in vs.iter_mut().filter(|v| v.stage == Stage::Pending) {
            v.stage = Stage::Retired;
            v.value = None;
        }
        let n = vs.len() as u64 + 1;
        vs.push(Version {
            n,
            rotation: new.rotation.clone(),
            stage: Stage::Pending,
            value: Some(new.value.expose().to_vec()),
        });
        Ok(VersionRef(n.to_string()))
    }

    async fn read(
        &self,
        item: VaultItem<'_>,
        select: Select<'_>,
    ) -> Result<Option<StoredVersion>, PluginError> {
        self.enter("read", item.path).await?;
        let paths = self.paths.lock().unwrap();
        let found = paths.get(item.path).and_then(|vs| {
            vs.iter().find(|v| match select {
                Select::Stage(s) => v.stage == s,
                Select::Version(r) => v.n == parse(r),
            })
        });
        Ok(found.and_then(|v| {
            v.value.as_ref().map(|value| StoredVersion {
                version: VersionRef(v.n.to_string()),
                rotation: Some(v.rotation.clone()),
                stage: v.stage,
                value: SecretValue::new(value.clone()),
            })
        }))
    }

    async fn promote(&self, item: VaultItem<'_>, version: &VersionRef) -> Result<(), PluginError> {
        self.enter("promote", item.path).await?;
        let n = parse(version);
        let mut paths = self.paths.lock().unwrap();
        let vs = paths.entry(item.path.to_owned()).or_default();
        match vs.iter().find(|v| v.n == n).map(|v| v.stage) {
            Some(Stage::Current) => return Ok(()),
            Some(Stage::Pending | Stage::Previous) => {}
            other => {
                return Err(PluginError::new(
                    ErrorKind::Conflict,
                    format!("version {n} is {other:?}"),
                ));
            }
        }
        for v in vs.iter_mut() {
            match v.stage {
                Stage::Previous => {
                    v.stage = Stage::Retired;
                    v.value = None;
                }
                Stage::Current => v.stage = Stage::Previous,
                _ => {}
            }
        }
        vs.iter_mut().find(|v| v.n == n).expect("found").stage = Stage::Current;
        Ok(())
    }

    async fn retire(&self, item: VaultItem<'_>, version: &VersionRef) -> Result<(), PluginError> {
        self.enter("retire", item.path).await?;
        let n = parse(version);
        let mut paths = self.paths.lock().unwrap();
        let Some(v) = paths
            .get_mut(item.path)
            .and_then(|vs| vs.iter_mut().find(|v| v.n == n))
        else {
            return Ok(());
        };
        match v.stage {
            Stage::Previous => {
                v.stage = Stage::Retired;
                v.value = None;
                Ok(())
            }
            Stage::Retired => Ok(()),
            s => Err(PluginError::new(
                ErrorKind::Invalid,
                format!("version {n} is {s:?}"),
            )),
        }
    }

    async fn destroy(&self, item: VaultItem<'_>) -> Result<(), PluginError> {
        self.enter("destroy", item.path).await?;
        self.paths.lock().unwrap().remove(item.path);
        Ok(())
    }

    async fn check(&self) -> Result<(), PluginError> {
        Ok(())
    }

    /// The current version's number; a call of its own (`mark`), so tests
    /// tell metadata polls from value reads.
    async fn current_mark(&self, item: VaultItem<'_>) -> Result<Option<CurrentMark>, PluginError> {
        self.enter("mark", item.path).await?;
        let paths = self.paths.lock().unwrap();
        Ok(paths.get(item.path).and_then(|vs| {
            vs.iter()
                .find(|v| v.stage == Stage::Current)
                .map(|v| CurrentMark(v.n.to_string()))
        }))
    }
}

/// One delivery: credential, version, value, when.
type Delivery = (String, VersionNo, Vec<u8>, Instant);

/// Records every delivery.
#[derive(Default)]
struct MemSink {
    delivered: Mutex<Vec<Delivery>>,
}

impl MemSink {
    fn versions(&self, cred: &str) -> Vec<VersionNo> {
        self.delivered
            .lock()
            .unwrap()
            .iter()
            .filter(|(c, ..)| c == cred)
            .map(|(_, v, ..)| *v)
            .collect()
    }

    fn count(&self) -> usize {
        self.delivered.lock().unwrap().len()
    }

    fn values(&self, cred: &str) -> Vec<(VersionNo, Vec<u8>)> {
        self.delivered
            .lock()
            .unwrap()
            .iter()
            .filter(|(c, ..)| c == cred)
            .map(|(_, v, value, _)| (*v, value.clone()))
            .collect()
    }
}

#[async_trait]
impl Sink for MemSink {
    fn kind(&self) -> &'static str {
        "mem"
    }

    fn describe(&self) -> String {
        "mem".into()
    }
    async fn deliver(
        &self,
        notice: &Notice,
        value: &SecretValue,
    ) -> Result<Delivered, PluginError> {
        self.delivered.lock().unwrap().push((
            notice.key.credential.to_string(),
            notice.version,
            value.expose().to_vec(),
            Instant::now(),
        ));
        Ok(Delivered::Acknowledged)
    }
    async fn retract(&self, _: &CredentialKey) -> Result<(), PluginError> {
        Ok(())
    }
    async fn preflight(&self) -> Result<(), PluginError> {
        Ok(())
    }
}

// ---------------------------------------------------------------------------
// The rig
// ---------------------------------------------------------------------------

fn t0() -> DateTime<Utc> {
    DateTime::from_timestamp(1_798_761_600, 0).unwrap() // 2027-01-01T00:00:00Z
}

fn key(cred: &str) -> CredentialKey {
    crate::test_support::key("bot", cred)
}

fn path(cred: &str) -> String {
    format!("agents/bot/{cred}")
}

/// `n` credentials `c0..`, each `every` with `jitter` and `grace`, and the
/// retry settings the tests rely on: 1 s doubling to 4 s, 4 attempts.
fn config_text(dir: &std::path::Path, n: usize, schedule: &str, extra_daemon: &str) -> String {
    let d = dir.display();
    // A followed credential's vault is one another keyturn writes (a local
    // vault is refused there); the rig's own vault stands in for either.
    let vault_type = if schedule.contains("follow") {
        "toy"
    } else {
        "local"
    };
    let mut text = format!(
        r#"[daemon]
state_dir = "{d}/state"
socket = "{d}/control.sock"
delivery_roots = ["{d}/agents"]
retry = {{ initial_delay = "1s", max_delay = "4s", max_attempts = 4 }}
catch_up_spread = "10m"
{extra_daemon}
[vaults.local]
type = "{vault_type}"
{agent}"#,
        agent = crate::test_support::agent_table("bot")
    );
    for i in 0..n {
        text.push_str(&format!(
            "[agents.bot.credentials.c{i}]\nvault = \"local\"\ngenerate = {{ kind = \"password\", length = 20 }}\n{schedule}\ndeliver = [{{ type = \"file\", path = \"{d}/agents/bot/c{i}\" }}]\n"
        ));
    }
    text
}

struct Rig {
    dir: tempfile::TempDir,
    engine: Engine,
    vault: Arc<MemVault>,
    sink: Arc<MemSink>,
    store: Arc<MemoryStore>,
    cancel: CancellationToken,
    tracker: TaskTracker,
    start: Instant,
    /// The engine's wall clock (to step it).
    clock: TokioClock,
}

/// Builds the catalog from `text`, with every credential kept in `vault` and
/// delivered to `sink`, then to `extra`.
fn catalog_with(
    dir: &std::path::Path,
    text: &str,
    vault: &Arc<MemVault>,
    sink: &Arc<MemSink>,
    extra: &[Arc<dyn Sink>],
) -> Catalog {
    let config = crate::config::load_str(&dir.join("k.toml"), text).expect("valid config");
    let mut catalog = Catalog::build(config, None).expect("catalog");
    let shared = catalog.vaults["local"].clone();
    let handle = Arc::new(VaultHandle {
        vault: vault.clone(),
        limit: shared.limit.clone(),
        config: shared.config.clone(),
    });
    catalog.vaults.insert("local".into(), handle.clone());
    let keys: Vec<CredentialKey> = catalog.creds.keys().cloned().collect();
    for k in keys {
        let old = catalog.creds.remove(&k).unwrap();
        let sink: Arc<dyn Sink> = sink.clone();
        let mut sinks = vec![sink];
        sinks.extend(extra.iter().cloned());
        catalog.creds.insert(Arc::new(CredEntry {
            agent: old.agent.clone(),
            key: old.key.clone(),
            path: old.path.clone(),
            policy: old.policy.clone(),
            vaults: vec![handle.clone()].into(),
            target: old.target.clone(),
            sinks: sinks.into(),
        }));
    }
    catalog
}

impl Rig {
    /// One credential, `c0`, due every six hours.
    async fn single() -> Rig {
        Rig::new(1, "every = \"6h\"").await
    }

    /// Triggers `c0` and waits for its rotation to end.
    async fn rotate_c0(&self) -> RotateFinished {
        self.engine.trigger(&key("c0")).unwrap().await.unwrap()
    }

    /// The stage recorded of `c0`'s version `v`.
    fn stage_of(&self, v: VersionNo) -> Option<Stage> {
        self.store
            .versions(&key("c0"))
            .unwrap()
            .into_iter()
            .find(|r| r.version == v)
            .map(|r| r.stage)
    }

    async fn new(n: usize, schedule: &str) -> Rig {
        Self::with(
            n,
            schedule,
            "",
            Arc::new(MemoryStore::new()),
            Arc::default(),
        )
        .await
    }

    async fn with(
        n: usize,
        schedule: &str,
        extra_daemon: &str,
        store: Arc<MemoryStore>,
        vault: Arc<MemVault>,
    ) -> Rig {
        Self::in_dir(
            tempfile::tempdir().unwrap(),
            n,
            schedule,
            extra_daemon,
            store,
            vault,
        )
    }

    /// Stops this engine and starts another on the same state, vault and
    /// audit log: a daemon restart.
    async fn restart(self, n: usize, schedule: &str) -> Rig {
        let (store, vault) = (self.store.clone(), self.vault.clone());
        let dir = self.shutdown().await;
        Self::in_dir(dir, n, schedule, "", store, vault)
    }

    fn in_dir(
        dir: tempfile::TempDir,
        n: usize,
        schedule: &str,
        extra_daemon: &str,
        store: Arc<MemoryStore>,
        vault: Arc<MemVault>,
    ) -> Rig {
        Self::in_dir_with(dir, n, schedule, extra_daemon, store, vault, &[])
    }

    /// [`Rig::in_dir`], every credential also delivered to `extra`.
    fn in_dir_with(
        dir: tempfile::TempDir,
        n: usize,
        schedule: &str,
        extra_daemon: &str,
        store: Arc<MemoryStore>,
        vault: Arc<MemVault>,
        extra: &[Arc<dyn Sink>],
    ) -> Rig {
        let text = config_text(dir.path(), n, schedule, extra_daemon);
        Self::from_text(dir, &text, store, vault, extra)
    }

    /// [`Rig::in_dir_with`] with the config `text`.
    fn from_text(
        dir: tempfile::TempDir,
        text: &str,
        store: Arc<MemoryStore>,
        vault: Arc<MemVault>,
        extra: &[Arc<dyn Sink>],
    ) -> Rig {
        let sink = Arc::new(MemSink::default());
        let catalog = catalog_with(dir.path(), text, &vault, &sink, extra);
        Self::assemble(dir, catalog, store, vault, sink)
    }

    /// The engine of `catalog` on `store`, its audit log in `dir` (going on
    /// from the head `store` holds), under a paused clock.
    fn assemble(
        dir: tempfile::TempDir,
        catalog: Catalog,
        store: Arc<MemoryStore>,
        vault: Arc<MemVault>,
        sink: Arc<MemSink>,
    ) -> Rig {
        let head = store.audit_head().unwrap();
        let audit = AuditLog::open_inline(&dir.path().join("audit.log"), head.as_ref()).unwrap();
        let clock = TokioClock::starting_at(t0());
        let (engine, cancel, tracker) =
            Engine::paused_for_test(catalog, store.clone(), audit, clock.clone());
        Rig {
            dir,
            engine,
            clock,
            vault,
            sink,
            store,
            cancel,
            tracker,
            start: Instant::now(),
        }
    }

    /// Loads state, arms the timers and runs the scheduler.
    async fn run(&self) {
        self.engine.start().await.unwrap();
        let e = self.engine.clone();
        self.tracker
            .spawn(async move { e.run_scheduler(None, || {}).await });
    }

    /// Virtual time since the rig was made.
    fn at(&self, t: Instant) -> Duration {
        t.duration_since(self.start)
    }

    fn status(&self, cred: &str) -> StatusRow {
        let key = key(cred);
        self.engine
            .status()
            .into_iter()
            .find(|s| s.agent == key.agent && s.credential == key.credential)
            .unwrap()
    }

    /// [`Rig::new`], running, once the first version is delivered.
    async fn started(n: usize, schedule: &str) -> Rig {
        let rig = Self::new(n, schedule).await;
        rig.run().await;
        rig.first_version().await;
        rig
    }

    /// Waits (in virtual time, at most a second) until the sink has the
    /// first version.
    async fn first_version(&self) {
        self.until(Duration::from_secs(1), "first version", |r| {
            r.sink.count() == 1
        })
        .await;
    }

    /// Waits (in virtual time) until `f` holds; panics after `limit`.
    async fn until(&self, limit: Duration, what: &str, f: impl Fn(&Rig) -> bool) {
        let deadline = Instant::now() + limit;
        while !f(self) {
            assert!(
                Instant::now() < deadline,
                "{what}: not after {limit:?}; status {:?}",
                self.engine.status()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Stops the engine and checks the audit chain; gives back the
    /// directory (for a restart).
    async fn shutdown(self) -> tempfile::TempDir {
        self.cancel.cancel();
        self.tracker.close();
        self.tracker.wait().await;
        self.engine.audit().close().await;
        let head = self.store.audit_head().unwrap();
        verify_file(&self.dir.path().join("audit.log"), head.as_ref()).expect("audit chain intact");
        self.dir
    }
}

const HOUR: Duration = Duration::from_secs(3600);

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

/// The whole life of a credential: its first version at once, a rotation
/// exactly when due, the previous version retired exactly when its grace
/// ends — six hours of schedule in milliseconds.
#[tokio::test(start_paused = true)]
async fn a_credential_rotates_on_schedule_and_its_previous_version_retires_after_grace() {
    let rig = Rig::started(1, "every = \"6h\"\ngrace = \"1h\"").await;
    let delivered_at = rig.sink.delivered.lock().unwrap()[0].3;
    assert_eq!(
        rig.at(delivered_at),
        Duration::ZERO,
        "the first version at once"
    );
    tokio::time::sleep(14 * HOUR).await;
    let stages = rig.vault.times("stage", None);
    let stage_at: Vec<Duration> = stages.iter().map(|t| rig.at(*t)).collect();
    assert_eq!(stage_at, vec![Duration::ZERO, 6 * HOUR, 12 * HOUR]);
    let retires: Vec<Duration> = rig
        .vault
        .times("retire", None)
        .iter()
        .map(|t| rig.at(*t))
        .collect();
    assert_eq!(
        retires,
        vec![7 * HOUR, 13 * HOUR],
        "one hour of grace after each delivery"
    );
    assert_eq!(rig.sink.versions("c0"), vec![1, 2, 3]);
    assert_eq!(
        rig.vault.stages(&path("c0")),
        vec![
            (1, Stage::Retired),
            (2, Stage::Retired),
            (3, Stage::Current)
        ]
    );
    let s = rig.status("c0");
    assert_eq!((s.version, s.state.as_str()), (Some(3), "idle"));
    assert_eq!(
        s.next_due,
        Some(t0() + chrono::Duration::hours(18)),
        "due six hours after the last delivery"
    );
    rig.shutdown().await;
}

/// A transient failure is retried inside the rotation with capped
/// exponential back-off and jitter: delays drawn in [1 s, 2 s), then
/// [2 s, 4 s). tokio's timers round a deadline up to the next millisecond,
/// so a draw just under 2 s fires at 2 s exactly: the upper bounds are
/// inclusive.
#[tokio::test(start_paused = true)]
async fn transient_failures_are_retried_with_backoff_within_the_rotation() {
    let rig = Rig::single().await;
    rig.vault.fail("stage", 2, ErrorKind::Transient, None);
    let done = rig.rotate_c0().await;
    assert_eq!((done.error, done.version), (None, Some(1)));
    let t = rig.vault.times("stage", None);
    assert_eq!(t.len(), 3, "two failures, then success");
    let (d1, d2) = (t[1] - t[0], t[2] - t[1]);
    assert!(
        d1 >= Duration::from_secs(1) && d1 <= Duration::from_secs(2),
        "{d1:?}"
    );
    assert!(
        d2 >= Duration::from_secs(2) && d2 <= Duration::from_secs(4),
        "{d2:?}"
    );
    let versions = rig.store.versions(&key("c0")).unwrap();
    assert_eq!(versions.len(), 1, "exactly one version despite the retries");
    let audit = std::fs::read_to_string(rig.dir.path().join("audit.log")).unwrap();
    assert_eq!(
        audit
            .lines()
            .filter(|l| l.contains("\"event\":\"rotation.create\"")
                && l.contains("\"outcome\":\"failed\""))
            .count(),
        2
    );
    rig.shutdown().await;
}

/// The engine keeps the value it staged for the steps after create
/// (docs/vault-calls.md): a rotation it begins reads nothing back. A failed
/// attempt forgets it, so the steps after it read what the vault holds.
#[tokio::test(start_paused = true)]
async fn a_begun_rotation_reads_nothing_back_and_a_failed_attempt_reads_again() {
    let rig = Rig::single().await;
    let done = rig.rotate_c0().await;
    assert_eq!((done.error, done.version), (None, Some(1)));
    assert_eq!(
        rig.vault.times("read", None).len(),
        0,
        "the first rotation reads nothing: the stage was fresh, deliver uses the value staged"
    );
    assert_eq!(rig.vault.times("stage", None).len(), 1);

    rig.vault.fail("promote", 1, ErrorKind::Transient, None);
    let done = rig.rotate_c0().await;
    assert_eq!((done.error, done.version), (None, Some(2)));
    // promote_from's read of the current version (the engine's check), the
    // failed promote's look for the staged version, the retry's check, and
    // deliver reading the staged value again: the failure made it forget.
    assert_eq!(rig.vault.times("read", None).len(), 4);
    assert_eq!(rig.vault.times("promote", None).len(), 3, "one, then two");
    rig.shutdown().await;
}

/// After its retries a rotation is parked: status names the step and the
/// error; the scheduler tries again after the park delay (the retry ceiling,
/// doubled per consecutive failure), and the same rotation then completes.
#[tokio::test(start_paused = true)]
async fn exhausted_retries_park_the_rotation_with_a_doubling_delay_then_it_completes() {
    let rig = Rig::single().await;
    // Two runs of 4 attempts fail; the third run's first attempt succeeds.
    rig.vault.fail("stage", 8, ErrorKind::Throttled, None);
    rig.run().await;
    rig.until(Duration::from_secs(30), "parked once", |r| {
        r.status("c0").state == "failed"
    })
    .await;
    let s = rig.status("c0");
    assert_eq!(
        s.step.as_deref(),
        Some("create"),
        "a parked rotation shows its step"
    );
    assert!(s.rotation.is_some());
    let err = s.last_error.unwrap_or_default();
    assert!(
        err.contains("step create") && err.contains("throttled"),
        "{err}"
    );
    rig.until(Duration::from_secs(120), "delivered", |r| {
        r.sink.count() == 1
    })
    .await;
    let t = rig.vault.times("stage", None);
    assert_eq!(t.len(), 9);
    // Parked after attempt 4 and after attempt 8: 4 s, then 8 s.
    assert!(t[4] - t[3] >= Duration::from_secs(4) && t[4] - t[3] < Duration::from_secs(5));
    assert!(t[8] - t[7] >= Duration::from_secs(8) && t[8] - t[7] < Duration::from_secs(9));
    let s = rig.status("c0");
    assert_eq!((s.version, s.last_error.as_deref()), (Some(1), None));
    let rotations: Vec<RotationId> = rig
        .store
        .snapshot()
        .unwrap()
        .unfinished
        .into_iter()
        .map(|r| r.id)
        .collect();
    assert!(
        rotations.len() <= 1,
        "one rotation throughout: {rotations:?}"
    );
    assert_eq!(rig.store.versions(&key("c0")).unwrap().len(), 1);
    rig.shutdown().await;
}

/// Black-box finding: with the audit log made immutable (`chattr +i`),
/// rotations failed, and once the file was writable again they still did
/// ("an earlier fsync failed ... restart keyturn"). The failures alert,
/// and the rotation goes through once the log can be written.
#[tokio::test(start_paused = true)]
async fn rotations_fail_and_alert_while_the_audit_log_cannot_be_written_then_go_on() {
    let rig = Rig::started(1, "every = \"6h\"").await;
    crate::test_support::assert_root("chattr +i");
    let log = rig.dir.path().join("audit.log");
    crate::test_support::chattr("+i", &log);
    let done = rig.rotate_c0().await;
    let err = done.error.expect("the rotation cannot be recorded");
    assert!(err.contains("cannot write"), "{err}");
    // Each parked run counts: the alert fires (the rig warns at 2).
    rig.until(Duration::from_secs(120), "a rotation-failure alert", |r| {
        let now = super::clock::Clock::now(&r.clock);
        r.engine
            .health_conditions(now)
            .firing
            .iter()
            .any(|a| a.name == super::health::ROTATION_FAILING)
    })
    .await;
    crate::test_support::chattr("-i", &log);
    rig.until(
        Duration::from_secs(120),
        "rotated once the log is back",
        |r| r.status("c0").version == Some(2),
    )
    .await;
    rig.shutdown().await;
}

/// Defect: a retire step that kept failing was retried every `max_delay`
/// forever and never parked, while status said `retiring` long after the
/// grace ended. It is parked like any failed step: status shows `failed`
/// at step `retire` with the error, each retry waits twice as long as the
/// one before, and a success clears it.
#[tokio::test(start_paused = true)]
async fn a_failing_retire_is_parked_with_a_doubling_delay_then_it_completes() {
    let rig = Rig::started(1, "every = \"6h\"\ngrace = \"1m\"").await;
    rig.vault.fail("retire", 3, ErrorKind::Unauthorized, None);
    let done = rig.rotate_c0().await;
    assert_eq!((done.error, done.version), (None, Some(2)));
    rig.until(Duration::from_secs(120), "the retire parked", |r| {
        r.status("c0").state == "failed"
    })
    .await;
    let s = rig.status("c0");
    assert_eq!(s.step.as_deref(), Some("retire"), "{s:?}");
    assert!(s.rotation.is_some(), "{s:?}");
    let err = s.last_error.unwrap_or_default();
    assert!(
        err.contains("step retire") && err.contains("unauthorized"),
        "{err}"
    );
    rig.until(Duration::from_secs(600), "retired at last", |r| {
        r.status("c0").state == "idle"
    })
    .await;
    let t = rig.vault.times("retire", None);
    assert_eq!(t.len(), 4, "three failures, then the retire");
    // Parked 4 s (the retry ceiling), then 8 s, then 16 s.
    for (i, secs) in [(1, 4), (2, 8), (3, 16)] {
        let gap = t[i] - t[i - 1];
        assert!(
            gap >= Duration::from_secs(secs) && gap < Duration::from_secs(secs + 1),
            "retry {i} after {gap:?}"
        );
    }
    let s = rig.status("c0");
    assert_eq!((s.version, s.last_error.as_deref()), (Some(2), None));
    assert_eq!(
        rig.vault.stages(&path("c0")),
        vec![(1, Stage::Retired), (2, Stage::Current)]
    );
    rig.shutdown().await;
}

/// Black-box finding: a restart resumed a parked rotation at once, before
/// its retry time: one more failure counted, the back-off doubled, and an
/// escalation sooner, at every restart. It resumes when its next attempt
/// was due, shown `failed` at its step meanwhile.
#[tokio::test(start_paused = true)]
async fn a_restart_keeps_a_parked_rotations_next_attempt() {
    let rig = Rig::single().await;
    rig.vault.fail("stage", 100, ErrorKind::Unauthorized, None);
    rig.run().await;
    rig.until(Duration::from_secs(30), "parked", |r| {
        r.status("c0").state == "failed"
    })
    .await;
    let attempts = rig.vault.times("stage", None).len();
    let rig = rig.restart(1, "every = \"6h\"").await;
    rig.run().await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        rig.vault.times("stage", None).len(),
        attempts,
        "no attempt at the restart"
    );
    let s = rig.status("c0");
    assert_eq!(
        (s.state.as_str(), s.step.as_deref()),
        ("failed", Some("create")),
        "{s:?}"
    );
    rig.until(Duration::from_secs(60), "tried again", |r| {
        r.vault.times("stage", None).len() > attempts
    })
    .await;
    rig.shutdown().await;
}

/// Black-box finding: every reload (SIGHUP) and every restart ran a parked
/// retirement's failing step again at once and doubled its back-off, which
/// reached its hour cap within minutes. Both keep the next attempt.
#[tokio::test(start_paused = true)]
async fn a_reload_keeps_a_parked_retirements_next_attempt() {
    let rig = Rig::started(1, "every = \"6h\"\ngrace = \"1m\"").await;
    rig.vault.fail("retire", 100, ErrorKind::Unauthorized, None);
    let done = rig.rotate_c0().await;
    assert_eq!((done.error, done.version), (None, Some(2)));
    rig.until(Duration::from_secs(120), "the retire parked", |r| {
        r.status("c0").state == "failed"
    })
    .await;
    let before = rig.vault.times("retire", None).len();
    let reload = || {
        let text = config_text(rig.dir.path(), 1, "every = \"6h\"\ngrace = \"1m\"", "");
        catalog_with(rig.dir.path(), &text, &rig.vault, &rig.sink, &[])
    };
    for _ in 0..3 {
        rig.engine.reload(reload()).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        rig.vault.times("retire", None).len(),
        before,
        "no attempt made by the reloads"
    );
    // Nor by a restart: shown failed at its step until the next attempt.
    let rig = rig.restart(1, "every = \"6h\"\ngrace = \"1m\"").await;
    rig.run().await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        rig.vault.times("retire", None).len(),
        before,
        "no attempt made by the restart"
    );
    let s = rig.status("c0");
    assert_eq!(
        (s.state.as_str(), s.step.as_deref()),
        ("failed", Some("retire")),
        "{s:?}"
    );
    rig.shutdown().await;
}

/// Black-box finding: a rotation that fell due by its schedule while the
/// retirement before it was parked began by running that failing step
/// again at once (after a restart, right after the retirement's own
/// attempt): two attempts, two failures counted, the back-off jumping.
/// It waits for the retirement's next attempt, which hands over to it.
#[tokio::test(start_paused = true)]
async fn a_rotation_due_while_its_retirement_is_parked_waits_for_the_retirement() {
    let rig = Rig::started(1, "every = \"1m\"\ngrace = \"10s\"").await;
    rig.vault.fail("retire", 5, ErrorKind::Unauthorized, None);
    let done = rig.rotate_c0().await;
    assert_eq!((done.error, done.version), (None, Some(2)));
    rig.until(Duration::from_secs(400), "version 3", |r| {
        r.status("c0").version == Some(3)
    })
    .await;
    let t = rig.vault.times("retire", None);
    // Five failures, parked 4 s (the retry ceiling), 8, 16, 32, 64 s, then
    // the retirement; no other attempt between (the rotation due at one
    // minute waited).
    let gaps: Vec<u64> = t.windows(2).map(|w| (w[1] - w[0]).as_secs()).collect();
    assert_eq!(&gaps[..5], [4, 8, 16, 32, 64], "{gaps:?}");
    let creates = rig.vault.times("stage", None);
    assert!(
        creates.last().unwrap() >= &t[5],
        "version 3 was made before the retirement succeeded: retire {:?} stage {:?}",
        t.iter().map(|x| rig.at(*x)).collect::<Vec<_>>(),
        creates.iter().map(|x| rig.at(*x)).collect::<Vec<_>>()
    );
    rig.shutdown().await;
}

/// Defect: a credential the config moved to another `path` had its
/// previous version "retired" at the new path, where it never was: the old
/// path kept it current for good while the audit log said it was retired.
/// The retire goes where that version was made (there it is the last, so
/// the old path is emptied), and the move is not taken for a version
/// deleted out of band. A move during a grace period retires the version
/// before at the old path too, where both were made.
#[tokio::test(start_paused = true)]
async fn a_moved_credentials_previous_version_is_retired_where_it_was_made() {
    let rig = Rig::started(1, "every = \"6h\"\ngrace = \"1m\"").await;
    assert_eq!(rig.rotate_c0().await.version, Some(2));
    // Edited while the daemon was down, in version 2's grace period: the
    // credential moves.
    let moved = "every = \"6h\"\ngrace = \"1m\"\npath = \"moved/c0\"";
    let rig = rig.restart(1, moved).await;
    rig.run().await;
    tokio::time::sleep(Duration::from_secs(120)).await;
    assert_eq!(
        rig.vault.stages(&path("c0")),
        vec![(1, Stage::Retired), (2, Stage::Current)],
        "version 1 retired where both were made"
    );
    let done = rig.rotate_c0().await;
    assert_eq!((done.error, done.version), (None, Some(3)));
    tokio::time::sleep(Duration::from_secs(120)).await;
    assert_eq!(
        rig.vault.stages(&path("c0")),
        vec![],
        "the old path, where version 2 was the last, is emptied"
    );
    assert_eq!(rig.vault.stages("moved/c0"), vec![(1, Stage::Current)]);
    let s = rig.status("c0");
    assert_eq!((s.version, s.state.as_str()), (Some(3), "idle"));
    let dir = rig.shutdown().await;
    let audit = std::fs::read_to_string(dir.path().join("audit.log")).unwrap();
    assert!(!audit.contains("vault.current_gone"), "{audit}");
}

/// Defect (black-box): a second rotator on the same path (a failover whose
/// old rotator came back), or a manual delete, showed only as a WARN line.
/// The promote still goes ahead, and now also counts it on /metrics
/// (`keyturn_vault_overwrites_total`, which the shipped rules alert on),
/// beside its `vault.current_gone` audit record.
#[tokio::test(start_paused = true)]
async fn a_current_version_gone_out_of_band_is_counted_on_the_metrics() {
    let rig = Rig::started(1, "every = \"6h\"\ngrace = \"1m\"").await;
    assert_eq!(rig.rotate_c0().await.version, Some(2));
    let count = |rig: &Rig| {
        rig.engine
            .inner
            .metrics
            .encode()
            .lines()
            .find_map(|l| l.strip_prefix("keyturn_vault_overwrites_total "))
            .map(|v| v.trim().parse::<u64>().unwrap())
    };
    assert_eq!(count(&rig), Some(0));
    rig.vault.delete_all(&path("c0"));
    let done = rig.rotate_c0().await;
    assert_eq!((done.error, done.version), (None, Some(3)));
    assert_eq!(count(&rig), Some(1));
    // An ordinary rotation after it counts nothing.
    assert_eq!(rig.rotate_c0().await.version, Some(4));
    assert_eq!(count(&rig), Some(1));
    let dir = rig.shutdown().await;
    let audit = std::fs::read_to_string(dir.path().join("audit.log")).unwrap();
    assert_eq!(audit.matches("vault.current_gone").count(), 1, "{audit}");
}

#[tokio::test(start_paused = true)]
async fn a_non_retryable_error_parks_at_once_and_a_manual_retry_resumes() {
    let rig = Rig::single().await;
    rig.vault.fail("stage", 1, ErrorKind::Unauthorized, None);
    let done = rig.rotate_c0().await;
    assert!(done.error.unwrap().contains("unauthorized"));
    assert_eq!(rig.vault.times("stage", None).len(), 1, "no retry");
    let again = rig.rotate_c0().await;
    assert_eq!((again.error, again.version), (None, Some(1)));
    rig.shutdown().await;
}

/// A server's `Retry-After` lengthens every wait shorter than it: the
/// in-step back-off and the wait before the parked rotation's retry.
#[tokio::test(start_paused = true)]
async fn retry_after_is_honoured_by_the_in_step_retries_and_by_the_parked_retry() {
    const AFTER: Duration = Duration::from_secs(7);
    let rig = Rig::single().await;
    rig.vault
        .fail("stage", 4, ErrorKind::Throttled, Some(AFTER));
    rig.run().await;
    rig.until(Duration::from_secs(300), "delivered", |r| {
        r.sink.count() == 1
    })
    .await;
    let t = rig.vault.times("stage", None);
    assert_eq!(t.len(), 5, "4 throttled attempts, then success");
    for w in t.windows(2) {
        assert!(
            w[1] - w[0] >= AFTER,
            "{:?} after a throttled attempt",
            w[1] - w[0]
        );
    }
    rig.shutdown().await;
}

/// A step whose replay is harmless is recorded with the next one: a
/// rotation after the first appends its six records (the previous
/// rotation's retire, start, create, promote, the delivery, deliver) with
/// three fsyncs of the audit log, and the state ends holding the log's head.
#[tokio::test(start_paused = true)]
async fn a_rotation_records_its_six_records_with_three_audit_fsyncs() {
    let rig = Rig::single().await;
    assert_eq!(rig.rotate_c0().await.error, None);
    let audit = rig.engine.audit().clone();
    let (fsyncs, seq) = (audit.fsync_count(), audit.head().seq);
    let done = rig.rotate_c0().await;
    assert_eq!((done.error, done.version), (None, Some(2)));
    assert_eq!(audit.fsync_count() - fsyncs, 3, "fsyncs for one rotation");
    let events: Vec<String> = std::fs::read_to_string(rig.dir.path().join("audit.log"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|r| r["seq"].as_u64().unwrap() > seq)
        .map(|r| r["event"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        events,
        [
            "rotation.retire",
            "rotation.start",
            "rotation.create",
            "rotation.promote",
            "delivery",
            "rotation.deliver"
        ]
    );
    assert_eq!(audit.synced_seq(), audit.head().seq, "all of it durable");
    assert_eq!(rig.store.audit_head().unwrap(), Some(audit.head()));
    // What the carried steps wrote reached the state with them.
    let rot = rig.store.latest_rotation(&key("c0")).unwrap().unwrap();
    assert_eq!((rot.version, rot.step), (2, Step::Retire));
    let stages: Vec<(u64, Stage)> = rig
        .store
        .versions(&key("c0"))
        .unwrap()
        .into_iter()
        .map(|v| (v.version, v.stage))
        .collect();
    assert!(stages.contains(&(2, Stage::Current)), "{stages:?}");
    assert!(stages.contains(&(1, Stage::Previous)), "{stages:?}");
    rig.shutdown().await;
}

/// The `rotation.start` records of rotation `id` in the rig's audit log, and
/// the rotation ids that started version `version` of `c0`.
fn starts_in_log(dir: &std::path::Path, id: &RotationId, version: u64) -> (usize, Vec<String>) {
    let records: Vec<serde_json::Value> = std::fs::read_to_string(dir.join("audit.log"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .filter(|r: &serde_json::Value| r["event"] == "rotation.start")
        .collect();
    let of_id = records
        .iter()
        .filter(|r| r["rotation"] == id.as_str())
        .count();
    let of_version = records
        .iter()
        .filter(|r| r["credential"] == "c0" && r["version"] == version)
        .map(|r| r["rotation"].as_str().unwrap().to_owned())
        .collect();
    (of_id, of_version)
}

/// Begins a rotation of `c0` whose `rotation.start` record cannot be
/// appended (the audit log is closed), then restarts: the rotation's row was
/// written first, so it is the one that resumes, under its id.
async fn start_left_unrecorded() -> (Rig, RotationId) {
    const SCHEDULE: &str = "every = \"6h\"\ngrace = \"1m\"";
    let rig = Rig::new(1, SCHEDULE).await;
    rig.run().await;
    assert_eq!(rig.rotate_c0().await.version, Some(1));
    // Past the grace: the retire step is done, nothing is carried.
    tokio::time::sleep(Duration::from_secs(120)).await;
    rig.engine.audit().close().await;
    let failed = rig.rotate_c0().await;
    assert!(failed.error.is_some(), "{failed:?}");
    let stuck = rig
        .store
        .latest_rotation(&key("c0"))
        .unwrap()
        .expect("the rotation's row is written before its start record");
    assert_eq!((stuck.step, stuck.version), (Step::Create, 2));
    assert!(stuck.start_record_after.is_some(), "{stuck:?}");
    (rig.restart(1, SCHEDULE).await, stuck.id)
}

/// Defect: the `rotation.start` record was appended (and fsynced) before the
/// rotation's row was committed, so `kill -9` in between left the log
/// naming a rotation the state never had; it never ended, and after the
/// restart another rotation made its version. Now the row comes first; a
/// rotation resumed without its start record appends it, once, and makes
/// the version under its own id.
#[tokio::test(start_paused = true)]
async fn a_rotation_resumed_before_its_start_was_recorded_records_it_once() {
    let (rig, stuck) = start_left_unrecorded().await;
    rig.run().await;
    rig.until(Duration::from_secs(10), "version 2", |r| {
        r.sink.versions("c0").contains(&2)
    })
    .await;
    let done = rig.store.latest_rotation(&key("c0")).unwrap().unwrap();
    assert_eq!((done.id.clone(), done.version), (stuck.clone(), 2));
    assert_eq!(done.start_record_after, None, "cleared once recorded");
    let dir = rig.shutdown().await;
    let (of_id, of_version) = starts_in_log(dir.path(), &stuck, 2);
    assert_eq!(of_id, 1, "its start recorded once");
    assert_eq!(
        of_version,
        [stuck.to_string()],
        "no other rotation of version 2"
    );
}

/// The same, with the start record in the log already (killed after the
/// record, before the next write of the row): not recorded twice.
#[tokio::test(start_paused = true)]
async fn a_resumed_rotation_whose_start_was_recorded_is_not_recorded_again() {
    let (rig, stuck) = start_left_unrecorded().await;
    let row = rig.store.latest_rotation(&key("c0")).unwrap().unwrap();
    let catalog = rig.engine.catalog();
    let entry = catalog.creds.get(&key("c0")).unwrap();
    let ev = rig.engine.inner.start_event(entry, &row);
    rig.engine.record(ev).await.unwrap();
    rig.run().await;
    rig.until(Duration::from_secs(10), "version 2", |r| {
        r.sink.versions("c0").contains(&2)
    })
    .await;
    let dir = rig.shutdown().await;
    let (of_id, of_version) = starts_in_log(dir.path(), &stuck, 2);
    assert_eq!(of_id, 1, "its start recorded once");
    assert_eq!(of_version, [stuck.to_string()]);
}

/// An audit record that cannot be appended fails its step (no rotation goes
/// unrecorded) and is counted, so an alert can say why rotations stopped.
#[tokio::test(start_paused = true)]
async fn a_failed_audit_append_fails_the_rotation_and_is_counted() {
    let rig = Rig::single().await;
    let failures = |rig: &Rig| {
        rig.engine
            .inner
            .metrics
            .encode()
            .lines()
            .find_map(|l| l.strip_prefix("keyturn_audit_append_failures_total "))
            .map(str::to_owned)
    };
    assert_eq!(rig.rotate_c0().await.error, None);
    assert_eq!(failures(&rig).as_deref(), Some("0"));
    rig.engine.audit().close().await;
    let done = rig.rotate_c0().await;
    assert!(done.error.is_some(), "{done:?}");
    let n: u64 = failures(&rig).unwrap().parse().unwrap();
    assert!(n >= 1, "every failed append counts: {n}");
    rig.cancel.cancel();
    rig.tracker.close();
    rig.tracker.wait().await;
}

#[tokio::test(start_paused = true)]
async fn concurrent_triggers_join_one_rotation() {
    let rig = Rig::single().await;
    rig.vault.slow("stage", Duration::from_secs(2));
    let a = rig.engine.trigger(&key("c0")).unwrap();
    let b = rig.engine.trigger(&key("c0")).unwrap();
    let (a, b) = (a.await.unwrap(), b.await.unwrap());
    assert_eq!(a.rotation, b.rotation);
    assert_eq!(rig.vault.times("stage", None).len(), 1);
    let next = rig.rotate_c0().await;
    assert_eq!(next.version, Some(2));
    rig.shutdown().await;
}

/// A manual trigger while the previous version is being retired starts a
/// rotation right after the retire, audited as manual (it was labelled with
/// the schedule's trigger, which made a manual rotation look like a second
/// schedule).
#[tokio::test(start_paused = true)]
async fn a_trigger_during_a_retire_starts_a_manual_rotation_after_it() {
    let rig = Rig::new(1, "every = \"6h\"\ngrace = \"1m\"").await;
    rig.run().await;
    assert_eq!(rig.rotate_c0().await.version, Some(1));
    assert_eq!(rig.rotate_c0().await.version, Some(2));
    rig.vault.slow("retire", Duration::from_secs(10));
    rig.until(Duration::from_secs(120), "the retire running", |r| {
        r.status("c0").state == "rotating"
    })
    .await;
    let done = rig.rotate_c0().await;
    assert_eq!((done.error, done.version), (None, Some(3)));
    let dir = rig.shutdown().await;
    let audit = std::fs::read_to_string(dir.path().join("audit.log")).unwrap();
    let triggers: Vec<String> = audit
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|r| r["event"] == "rotation.start")
        .map(|r| r["detail"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        triggers,
        ["trigger=initial", "trigger=manual", "trigger=manual"],
        "{audit}"
    );
}

/// A store whose `n` credentials `c0..` were last rotated `ago + i * step`
/// before `t0` (`c{n-1}` the longest ago), each at version 1.
fn overdue_store(n: usize, ago: chrono::Duration, step: chrono::Duration) -> Arc<MemoryStore> {
    let store = Arc::new(MemoryStore::new());
    let rows: Vec<Write> = (0..n)
        .map(|i| {
            Write::Credential(CredentialRow {
                key: key(&format!("c{i}")),
                current_version: Some(1),
                last_rotated_at: Some(t0() - ago - step * i as i32),
                next_due: None,
                consecutive_failures: 0,
                failing_since: None,
                last_error: None,
            })
        })
        .collect();
    store.apply(&rows).unwrap();
    store
}

/// The first rotations of the `n` credentials after `since` came one at a
/// time, most overdue (`c{n-1}`) first, the last 5 to 10 minutes after
/// `since` (the catch-up window).
fn assert_spread(rig: &Rig, n: usize, since: Instant) {
    let mut starts: Vec<(Duration, String)> = (0..n)
        .map(|i| {
            let c = format!("c{i}");
            let at = rig.vault.times("stage", Some(&path(&c)))[0];
            (at.duration_since(since), c)
        })
        .collect();
    starts.sort();
    let order: Vec<&str> = starts.iter().map(|(_, c)| c.as_str()).collect();
    let want: Vec<String> = (0..n).rev().map(|i| format!("c{i}")).collect();
    assert_eq!(order, want, "most overdue first");
    assert!(
        starts.windows(2).all(|w| w[1].0 > w[0].0),
        "one at a time: {starts:?}"
    );
    let last = starts.last().unwrap().0;
    assert!(
        last >= Duration::from_secs(5 * 60) && last <= Duration::from_secs(10 * 60),
        "spread over the 10 min window: {starts:?}"
    );
}

/// Rotations overdue after downtime are spread over `catch_up_spread` (most
/// overdue first), not fired at once.
#[tokio::test(start_paused = true)]
async fn overdue_rotations_after_downtime_are_spread_over_the_catch_up_window() {
    const N: usize = 6;
    // Every credential was last rotated 2-7 h ago on a 1 h schedule.
    let store = overdue_store(N, chrono::Duration::hours(2), chrono::Duration::hours(1));
    let rig = Rig::with(N, "every = \"1h\"", "", store, Arc::default()).await;
    rig.run().await;
    rig.until(Duration::from_secs(700), "all caught up", |r| {
        r.sink.count() == N
    })
    .await;
    assert_spread(&rig, N, rig.start);
    rig.shutdown().await;
}

/// Defect: a forward step of the wall clock (a VM resumed from suspend,
/// NTP setting right a clock that was behind) made every scheduled rotation
/// that came due during the step start at once. They are spread over
/// `catch_up_spread`, most overdue first, as after downtime; a step with
/// one rotation due, or none, changes nothing.
#[tokio::test(start_paused = true)]
async fn a_forward_step_of_the_wall_clock_spreads_the_rotations_that_came_due() {
    const N: usize = 6;
    // Last rotated 50-55 min ago on a 1 h schedule: c5 due first.
    let store = overdue_store(
        N,
        chrono::Duration::minutes(50),
        chrono::Duration::minutes(1),
    );
    let rig = Rig::with(N, "every = \"1h\"", "", store, Arc::default()).await;
    rig.run().await;
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert_eq!(rig.sink.count(), 0, "nothing due yet");
    rig.clock.step_forward(Duration::from_secs(3 * 3600));
    let stepped = Instant::now();
    rig.until(Duration::from_secs(900), "all rotated", |r| {
        r.sink.count() == N
    })
    .await;
    assert_spread(&rig, N, stepped);
    let dir = rig.shutdown().await;
    let audit = std::fs::read_to_string(dir.path().join("audit.log")).unwrap();
    let catch_up = audit
        .lines()
        .filter(|l| l.contains("\"rotation.start\"") && l.contains("trigger=catch_up"))
        .count();
    assert_eq!(catch_up, N, "{audit}");
}

/// Black-box finding: after the wall clock stepped back an hour (a clock
/// that ran ahead set right), nothing rotated and the previous version was
/// not retired until the clock caught up. The timers move back with it;
/// and at a start, a last rotation stamped in the future counts from now.
#[tokio::test(start_paused = true)]
async fn a_backward_step_of_the_wall_clock_leaves_the_timers_where_they_were_due() {
    let rig = Rig::started(1, "every = \"2m\"\ngrace = \"30s\"").await;
    assert_eq!(rig.rotate_c0().await.version, Some(2));
    let rotated = Instant::now();
    rig.clock.step_back(Duration::from_secs(3600));
    rig.until(Duration::from_secs(60), "version 1 retired", |r| {
        r.vault.stages(&path("c0"))[0].1 == Stage::Retired
    })
    .await;
    assert!(
        rotated.elapsed() < Duration::from_secs(40),
        "{:?}",
        rotated.elapsed()
    );
    rig.until(Duration::from_secs(150), "version 3 by the schedule", |r| {
        r.status("c0").version == Some(3)
    })
    .await;
    assert!(
        rotated.elapsed() < Duration::from_secs(135),
        "{:?}",
        rotated.elapsed()
    );
    // Restarted with a clock behind the time version 3 was stamped with
    // (the restarted rig's clock begins at the first one's start again):
    // the next rotation counts from now, not from that future time.
    let rig = rig.restart(1, "every = \"2m\"\ngrace = \"30s\"").await;
    rig.clock.step_back(Duration::from_secs(3600));
    rig.run().await;
    let started = Instant::now();
    // Black-box finding: the age metric of a rotation stamped ahead of
    // the clock read about -3600 s. It is never below zero.
    let ages = rig.engine.credential_times();
    assert!(
        ages.iter().all(|(_, age, _)| age.is_some_and(|a| a >= 0.0)),
        "{ages:?}"
    );
    // Version 2, in its grace when the first rig stopped, retires within
    // the grace from now, not from the future its retirement was set for.
    rig.until(Duration::from_secs(60), "version 2 retired", |r| {
        r.vault.stages(&path("c0"))[1].1 == Stage::Retired
    })
    .await;
    assert!(
        started.elapsed() <= Duration::from_secs(31),
        "{:?}",
        started.elapsed()
    );
    rig.until(Duration::from_secs(200), "version 4 by the schedule", |r| {
        r.status("c0").version == Some(4)
    })
    .await;
    assert!(
        started.elapsed() < Duration::from_secs(130),
        "{:?}",
        started.elapsed()
    );
    rig.shutdown().await;
}

/// Defect: a reload (SIGHUP) during the catch-up window re-armed every
/// credential still waiting for its slot as due now, so they all rotated at
/// once and stayed in lockstep. A reload keeps the slots: with the config
/// unchanged, and with a changed schedule under which they are still
/// overdue.
#[tokio::test(start_paused = true)]
async fn a_reload_during_the_catch_up_window_keeps_the_pending_slots() {
    const N: usize = 6;
    let store = overdue_store(N, chrono::Duration::hours(3), chrono::Duration::hours(1));
    let rig = Rig::with(N, "every = \"1h\"", "", store, Arc::default()).await;
    rig.run().await;
    // Slots every 100 s over the 10 min window: c5 now, then c4 .. c0.
    let reload = |schedule: &str| {
        let text = config_text(rig.dir.path(), N, schedule, "");
        catalog_with(rig.dir.path(), &text, &rig.vault, &rig.sink, &[])
    };
    tokio::time::sleep(Duration::from_secs(150)).await;
    assert_eq!(rig.sink.count(), 2, "c5 and c4 rotated before the reload");
    rig.engine.reload(reload("every = \"1h\"")).await;
    tokio::time::sleep(Duration::from_secs(100)).await;
    // A changed schedule under which every credential is still overdue.
    rig.engine.reload(reload("every = \"2h\"")).await;
    rig.until(Duration::from_secs(700), "all caught up", |r| {
        r.sink.count() == N
    })
    .await;
    let mut starts: Vec<(Duration, String)> = (0..N)
        .map(|i| {
            let c = format!("c{i}");
            (rig.at(rig.vault.times("stage", Some(&path(&c)))[0]), c)
        })
        .collect();
    starts.sort();
    let secs: Vec<u64> = starts.iter().map(|(d, _)| d.as_secs()).collect();
    assert_eq!(
        secs,
        vec![0, 100, 200, 300, 400, 500],
        "the slots of the catch-up window survive both reloads: {starts:?}"
    );
    let order: Vec<&str> = starts.iter().map(|(_, c)| c.as_str()).collect();
    assert_eq!(order, vec!["c5", "c4", "c3", "c2", "c1", "c0"]);
    for i in 0..N {
        let rot = rig
            .store
            .latest_rotation(&key(&format!("c{i}")))
            .unwrap()
            .unwrap();
        assert_eq!(rot.trigger, super::Trigger::CatchUp, "c{i}");
    }
    rig.shutdown().await;
}

/// Defect: a reload that changed `every` while the credential was rotating
/// scheduled its next rotation by the old period (a period shortened after
/// a compromise was ignored for one more old-length period). The next due
/// time follows the schedule configured when the rotation ends.
#[tokio::test(start_paused = true)]
async fn a_schedule_changed_during_a_rotation_sets_its_next_due_time() {
    let rig = Rig::single().await;
    rig.run().await;
    rig.until(Duration::from_secs(1), "the first version", |r| {
        r.sink.count() == 1
    })
    .await;
    // The next rotation backs off at promote (1 s): it is in flight.
    rig.vault.fail("promote", 1, ErrorKind::Transient, None);
    let done = rig.engine.trigger(&key("c0")).unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(rig.status("c0").rotation.is_some(), "rotating");
    let text = config_text(rig.dir.path(), 1, "every = \"1h\"", "");
    rig.engine
        .reload(catalog_with(
            rig.dir.path(),
            &text,
            &rig.vault,
            &rig.sink,
            &[],
        ))
        .await;
    let finished = done.await.unwrap();
    assert_eq!((finished.error, finished.version), (None, Some(2)));
    let s = rig.status("c0");
    let last = s.last_rotated.unwrap();
    assert_eq!(
        s.next_due,
        Some(last + chrono::Duration::hours(1)),
        "the period configured now, not the 6 h one: {s:?}"
    );
    // And the timer agrees: it rotates an hour later.
    tokio::time::sleep(Duration::from_secs(3600 + 60)).await;
    assert_eq!(rig.sink.versions("c0"), vec![1, 2, 3]);
    rig.shutdown().await;
}

/// Jitter is a stable offset per credential: the same after a restart, and
/// a credential is never due later than its interval (it fires `offset`
/// early).
#[tokio::test(start_paused = true)]
async fn jitter_is_a_stable_per_credential_offset_across_restarts() {
    let schedule = "every = \"6h\"\njitter = \"1h\"";
    let first = Rig::new(3, schedule).await;
    first.run().await;
    first
        .until(Duration::from_secs(1), "first versions", |r| {
            r.sink.count() == 3
        })
        .await;
    let due: Vec<_> = (0..3)
        .map(|i| first.status(&format!("c{i}")).next_due.unwrap())
        .collect();
    for d in &due {
        let early = t0() + chrono::Duration::hours(6) - *d;
        assert!(
            early >= chrono::Duration::zero() && early < chrono::Duration::hours(1),
            "fires within the jitter before the interval ends: {early}"
        );
    }
    assert!(
        due[0] != due[1] || due[1] != due[2],
        "credentials do not fire in lockstep"
    );
    let second = first.restart(3, schedule).await;
    second.run().await;
    let again: Vec<_> = (0..3)
        .map(|i| second.status(&format!("c{i}")).next_due.unwrap())
        .collect();
    assert_eq!(again, due, "the same offsets after a restart");
    second.shutdown().await;
}

/// Defect: an interval schedule took the jitter offset off every period,
/// so `every = "6h"` with `jitter = "5h"` rotated as often as every hour.
/// Only the first version's next due time is early; then rotations are
/// `every` apart, and the offsets the first ones got keep them apart.
#[tokio::test(start_paused = true)]
async fn an_interval_schedule_is_not_shortened_by_its_jitter() {
    let schedule = "every = \"6h\"\njitter = \"5h\"";
    let rig = Rig::new(3, schedule).await;
    rig.run().await;
    rig.until(Duration::from_secs(1), "first versions", |r| {
        r.sink.count() == 3
    })
    .await;
    let first: Vec<_> = (0..3)
        .map(|i| rig.status(&format!("c{i}")).next_due.unwrap())
        .collect();
    rig.until(Duration::from_secs(13 * 3600), "third versions", |r| {
        (0..3).all(|i| r.status(&format!("c{i}")).version >= Some(3))
    })
    .await;
    for (i, first_due) in first.iter().enumerate() {
        let s = rig.status(&format!("c{i}"));
        assert_eq!(s.version, Some(3), "c{i}: one rotation per 6 h");
        let last = s.last_rotated.unwrap();
        assert_eq!(
            s.next_due.unwrap() - last,
            chrono::Duration::hours(6),
            "c{i}"
        );
        // Version 3 came one period after version 2, which came at the
        // first (early) due time.
        let late = last - (*first_due + chrono::Duration::hours(6));
        assert!(
            late >= chrono::Duration::zero() && late < chrono::Duration::seconds(5),
            "c{i}: version 3 at {last}, due {first_due} + 6h"
        );
    }
    rig.shutdown().await;
}

/// The race fixed in the scheduler: the room in the global limit is read,
/// due jobs are popped, and a manual trigger has taken a slot in between.
/// The jobs that find no slot go back in the queue, due now: none is lost,
/// and every credential still rotates.
#[tokio::test(start_paused = true)]
async fn jobs_popped_when_a_trigger_took_their_slot_go_back_in_the_queue() {
    const N: usize = 4;
    let rig = Rig::with(
        N,
        "every = \"6h\"",
        "max_concurrent_rotations = 1",
        Arc::new(MemoryStore::new()),
        Arc::default(),
    )
    .await;
    rig.vault.slow("stage", Duration::from_secs(1));
    rig.engine.start().await.unwrap(); // every credential due now (no version)
    // A manual rotation holds the only slot...
    let manual = rig.engine.trigger(&key("c0")).unwrap();
    tokio::task::yield_now().await;
    assert_eq!(rig.engine.inner.global.available_permits(), 0);
    // ...while the scheduler acts on a stale reading of one free slot.
    rig.engine.inner.start_due(rig.engine.inner.now(), 1);
    let queued = N - 1;
    let armed = (1..N)
        .filter(|i| {
            rig.engine
                .inner
                .live()
                .deadline(&key(&format!("c{i}")), super::table::Job::Rotate)
                .is_some()
        })
        .count();
    assert_eq!(armed, queued, "every popped job is back in the queue");
    assert_eq!(manual.await.unwrap().version, Some(1));
    let e = rig.engine.clone();
    rig.tracker
        .spawn(async move { e.run_scheduler(None, || {}).await });
    rig.until(Duration::from_secs(60), "all rotated", |r| {
        r.sink.count() == N
    })
    .await;
    for i in 0..N {
        assert_eq!(rig.sink.versions(&format!("c{i}")), vec![1]);
    }
    rig.shutdown().await;
}

/// Black-box finding: after `rotate all` and a reload that removed most of
/// the credentials, the rotations still waiting for a slot were begun
/// anyway (new versions made and delivered for credentials no longer
/// configured). One not begun when its credential leaves is not begun; its
/// waiter is told why. The one in flight finishes.
#[tokio::test(start_paused = true)]
async fn a_rotation_waiting_for_a_slot_is_dropped_when_a_reload_removes_its_credential() {
    let rig = Rig::with(
        3,
        "every = \"6h\"",
        "max_concurrent_rotations = 1",
        Arc::new(MemoryStore::new()),
        Arc::default(),
    )
    .await;
    rig.vault.slow("stage", Duration::from_secs(1));
    rig.engine.start().await.unwrap();
    let waiters: Vec<_> = (0..3)
        .map(|i| rig.engine.trigger(&key(&format!("c{i}"))).unwrap())
        .collect();
    tokio::task::yield_now().await;
    // Only c0 is left in the config.
    let text = config_text(
        rig.dir.path(),
        1,
        "every = \"6h\"",
        "max_concurrent_rotations = 1",
    );
    rig.engine
        .reload(catalog_with(
            rig.dir.path(),
            &text,
            &rig.vault,
            &rig.sink,
            &[],
        ))
        .await;
    let mut told = Vec::new();
    for w in waiters {
        told.push(w.await.unwrap());
    }
    assert_eq!((told[0].version, told[0].error.as_deref()), (Some(1), None));
    for t in &told[1..] {
        assert!(
            t.error
                .as_deref()
                .is_some_and(|e| e.contains("removed it from the config")),
            "{t:?}"
        );
        assert_eq!(t.version, None);
    }
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(rig.sink.versions("c0"), vec![1]);
    assert!(rig.sink.versions("c1").is_empty() && rig.sink.versions("c2").is_empty());
    assert!(
        rig.store.latest_rotation(&key("c1")).unwrap().is_none(),
        "nothing begun"
    );
    rig.shutdown().await;
}

/// On shutdown the step in flight finishes and is persisted; the rotation
/// then resumes at the next start, as the same rotation with one version.
#[tokio::test(start_paused = true)]
async fn shutdown_drains_the_step_in_flight_and_the_rotation_resumes() {
    let rig = Rig::single().await;
    let (store, vault) = (rig.store.clone(), rig.vault.clone());
    vault.slow("stage", Duration::from_secs(5));
    let waiter = rig.engine.trigger(&key("c0")).unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    rig.cancel.cancel();
    let told = waiter.await.unwrap();
    assert!(told.error.unwrap().contains("stopping"));
    let cut = store.latest_rotation(&key("c0")).unwrap().unwrap();
    assert_eq!(cut.step, Step::Promote, "create finished and was recorded");
    assert!(rig.sink.count() == 0);
    vault.slow("stage", Duration::ZERO);
    let again = rig.restart(1, "every = \"6h\"").await;
    again.run().await;
    again
        .until(Duration::from_secs(10), "delivered", |r| {
            r.sink.count() == 1
        })
        .await;
    let done = store.latest_rotation(&key("c0")).unwrap().unwrap();
    assert_eq!(done.id, cut.id, "the same rotation resumed");
    assert_eq!(
        vault.times("stage", None).len(),
        1,
        "create was not run again"
    );
    assert_eq!(vault.stages(&path("c0")), vec![(1, Stage::Current)]);
    again.shutdown().await;
}

/// Black-box finding: `rotate` joining a rotation that was still retiring
/// the version before the current one said "it makes version 5" of a
/// rotation that made 6: what ran then was the previous rotation's row.
/// What a joiner is told is the new rotation's version, or none yet.
#[tokio::test(start_paused = true)]
async fn a_rotation_retiring_the_version_before_is_not_reported_as_that_version() {
    let rig = Rig::single().await;
    rig.run().await;
    assert_eq!(rig.rotate_c0().await.version, Some(1));
    let second = rig.rotate_c0().await;
    assert_eq!(second.version, Some(2));
    // The job has retired version 1 for the next rotation, which has not
    // begun yet: the row it ran is the second rotation's.
    let previous = rig.store.latest_rotation(&key("c0")).unwrap().unwrap();
    let as_running = |step: Step, version: u64| {
        rig.engine.inner.live().entry(&key("c0")).running = Some(Box::new(super::table::Running {
            job: super::table::Job::Rotate,
            rotation: Some(previous.id.clone()),
            step,
            version: Some(version),
            attempts: 0,
            last_error: None,
        }));
    };
    as_running(Step::Done, 2);
    assert_eq!(rig.engine.rotating(&key("c0")), Some((None, None)));
    as_running(Step::Retire, 2);
    assert_eq!(rig.engine.rotating(&key("c0")), Some((None, None)));
    // Begun: its own row.
    as_running(Step::Create, 3);
    assert_eq!(
        rig.engine.rotating(&key("c0")),
        Some((Some(previous.id.clone()), Some(3)))
    );
    rig.engine.inner.live().entry(&key("c0")).running = None;
    // And through a real rotation, slowed at its create step.
    rig.vault.slow("stage", Duration::from_secs(2));
    let third = rig.engine.trigger(&key("c0")).unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(rig.engine.rotating(&key("c0")).and_then(|r| r.1), Some(3));
    assert_eq!(third.await.unwrap().version, Some(3));
    rig.shutdown().await;
}

/// Black-box finding: a stop that came while a rotation without a target
/// was promoting left the vault's current version undelivered until the
/// next start (`interrupted:deliver`): the vault's readers had the new
/// value, the agents the old one. A promoted version is carried through
/// to delivery within the drain, as one already set at its target is.
#[tokio::test(start_paused = true)]
async fn a_stop_during_promote_still_delivers_the_promoted_version() {
    let rig = Rig::single().await;
    let (store, vault) = (rig.store.clone(), rig.vault.clone());
    vault.slow("promote", Duration::from_secs(5));
    let waiter = rig.engine.trigger(&key("c0")).unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    rig.cancel.cancel();
    let told = waiter.await.unwrap();
    assert_eq!(told.error, None, "{told:?}");
    assert_eq!(rig.sink.versions("c0"), vec![1]);
    let done = store.latest_rotation(&key("c0")).unwrap().unwrap();
    assert!(done.step > Step::Deliver, "{:?}", done.step);
    rig.shutdown().await;
}

// ---------------------------------------------------------------------------
// Follow mode
// ---------------------------------------------------------------------------

const FOLLOW: &str = "mode = \"follow\"\npoll = \"1s\"";
const INDEX: &str = "keyturn/index";

/// What the rotating keyturn does to the vault: a new current version of
/// `cred` with `value` (through `via`, which may be the index decorator).
async fn rotate_elsewhere(via: &dyn Vault, cred: &str, value: &str) {
    let key = key(cred);
    let path = path(cred);
    let item = VaultItem {
        key: &key,
        path: &path,
    };
    let rotation = RotationId::generate();
    let value = SecretValue::from_string(value.to_owned());
    let v = via.stage(item.pending(&rotation, &value)).await.unwrap();
    via.promote(item, &v).await.unwrap();
    // As the rotator's deliver step does (a change index is written in
    // the background until then).
    via.settle(item, &v).await.unwrap();
}

impl Rig {
    /// Loads state and runs the follow loops (and the scheduler, which
    /// must leave followed credentials alone).
    async fn run_following(&self) {
        self.run().await;
        let e = self.engine.clone();
        self.tracker.spawn(async move { e.run_followers().await });
    }

    fn calls(&self, op: &str, path: &str) -> usize {
        self.vault.times(op, Some(path)).len()
    }

    /// The keyturn elsewhere that rotates what this rig follows: the same
    /// vault, through the change index.
    fn rotator(&self) -> crate::vaults::change_index::IndexedVault {
        crate::vaults::change_index::IndexedVault::new(self.vault.clone(), INDEX)
    }

    /// A rig of `n` followed credentials whose vault has a change index.
    fn following_with_index(n: usize) -> Rig {
        Self::with_index(n, FOLLOW, |v| v)
    }

    /// A rig of `n` credentials (`schedule`) whose vault has a change
    /// index; the catalog's vault is `wrap(the MemVault)`.
    fn with_index(
        n: usize,
        schedule: &str,
        wrap: impl Fn(Arc<dyn Vault>) -> Arc<dyn Vault>,
    ) -> Rig {
        Self::with_index_in(tempfile::tempdir().unwrap(), n, schedule, wrap, &[])
    }

    /// [`Rig::with_index`] in `dir`, every credential also delivered to
    /// `extra`.
    fn with_index_in(
        dir: tempfile::TempDir,
        n: usize,
        schedule: &str,
        wrap: impl Fn(Arc<dyn Vault>) -> Arc<dyn Vault>,
        extra: &[Arc<dyn Sink>],
    ) -> Rig {
        let (vault, sink) = (Arc::<MemVault>::default(), Arc::new(MemSink::default()));
        let store = Arc::new(MemoryStore::new());
        let text = config_text(dir.path(), n, schedule, "")
            .replace(
                "[vaults.local]\ntype = \"local\"\n",
                "[vaults.local]\ntype = \"toy\"\n",
            )
            .replace(
                "[vaults.local]\ntype = \"toy\"\n",
                &format!("[vaults.local]\ntype = \"toy\"\nchange_index = \"{INDEX}\"\n"),
            );
        let mut catalog = catalog_with(dir.path(), &text, &vault, &sink, extra);
        let shared = catalog.vaults["local"].clone();
        assert_eq!(shared.config.spec.plugin().change_index(), Some(INDEX));
        let handle = Arc::new(VaultHandle {
            vault: wrap(shared.vault.clone()),
            limit: shared.limit.clone(),
            config: shared.config.clone(),
        });
        catalog.vaults.insert("local".into(), handle.clone());
        let entries: Vec<Arc<CredEntry>> = catalog.creds.values().cloned().collect();
        for old in entries {
            catalog.creds.insert(Arc::new(CredEntry {
                agent: old.agent.clone(),
                key: old.key.clone(),
                path: old.path.clone(),
                policy: old.policy.clone(),
                vaults: vec![handle.clone()].into(),
                target: old.target.clone(),
                sinks: old.sinks.clone(),
            }));
        }
        Self::assemble(dir, catalog, store, vault, sink)
    }
}

/// With a change index, a follower of three credentials polls only the
/// index's mark; it reads the index only when it changed, and the value
/// only of the credential that changed. The rotating side's index writes
/// come from the decorator the catalog puts around its vault.
#[tokio::test(start_paused = true)]
async fn a_follower_polls_the_index_and_reads_only_what_changed() {
    let rig = Rig::following_with_index(3);
    let rotator = rig.rotator();
    rotate_elsewhere(&rotator, "c0", "kt-canary-c0-one").await;
    rotate_elsewhere(&rotator, "c1", "kt-canary-c1-one").await;
    rig.run_following().await;
    rig.until(Duration::from_secs(5), "first deliveries", |r| {
        r.sink.count() == 2
    })
    .await;
    assert_eq!(
        rig.sink.values("c0"),
        vec![(1, b"kt-canary-c0-one".to_vec())]
    );
    assert_eq!(
        rig.sink.values("c1"),
        vec![(1, b"kt-canary-c1-one".to_vec())]
    );
    // The first polls sweep each credential once; then it is quiet.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let marks = rig.calls("mark", INDEX);
    let index_reads = rig.calls("read", INDEX);
    let reads: Vec<usize> = ["c0", "c1", "c2"]
        .iter()
        .map(|c| rig.calls("read", &path(c)))
        .collect();
    let cred_marks: usize = ["c0", "c1", "c2"]
        .iter()
        .map(|c| rig.calls("mark", &path(c)))
        .sum();
    tokio::time::sleep(Duration::from_secs(10)).await;
    let polls = rig.calls("mark", INDEX) - marks;
    assert!(
        (8..=12).contains(&polls),
        "{polls} index polls in 10 s at poll = 1s"
    );
    assert_eq!(
        rig.calls("read", INDEX),
        index_reads,
        "the index was read though unchanged"
    );
    let now: Vec<usize> = ["c0", "c1", "c2"]
        .iter()
        .map(|c| rig.calls("read", &path(c)))
        .collect();
    assert_eq!(now, reads, "values were read though nothing changed");
    let cred_marks_now: usize = ["c0", "c1", "c2"]
        .iter()
        .map(|c| rig.calls("mark", &path(c)))
        .sum();
    assert_eq!(
        cred_marks_now, cred_marks,
        "credentials were polled one by one"
    );
    assert_eq!(rig.sink.count(), 2, "nothing new was delivered");

    // One rotation elsewhere: one index read, one value read of c1 only.
    rotate_elsewhere(&rotator, "c1", "kt-canary-c1-two").await;
    // (Counted after the rotator's index write, which settle waited for.)
    let index_reads = rig.calls("read", INDEX);
    rig.until(Duration::from_secs(3), "c1's second version", |r| {
        r.sink.versions("c1").len() == 2
    })
    .await;
    assert_eq!(rig.sink.values("c1")[1], (2, b"kt-canary-c1-two".to_vec()));
    assert_eq!(rig.calls("read", INDEX), index_reads + 1);
    let after: Vec<usize> = ["c0", "c1", "c2"]
        .iter()
        .map(|c| rig.calls("read", &path(c)))
        .collect();
    assert_eq!(after, vec![reads[0], reads[1] + 1, reads[2]]);
    // The safety net: each credential's own mark is read about once a
    // minute, and its value is not read again unless the mark moved.
    let marks_before: Vec<usize> = ["c0", "c1", "c2"]
        .iter()
        .map(|c| rig.calls("mark", &path(c)))
        .collect();
    let reads_before: Vec<usize> = ["c0", "c1", "c2"]
        .iter()
        .map(|c| rig.calls("read", &path(c)))
        .collect();
    tokio::time::sleep(Duration::from_secs(70)).await;
    for (i, c) in ["c0", "c1", "c2"].iter().enumerate() {
        let swept = rig.calls("mark", &path(c)) - marks_before[i];
        assert!((1..=2).contains(&swept), "{c}: {swept} mark reads in 70 s");
    }
    let reads_after: Vec<usize> = ["c0", "c1", "c2"]
        .iter()
        .map(|c| rig.calls("read", &path(c)))
        .collect();
    assert_eq!(reads_after, reads_before, "the sweep read values");
    let s = rig.status("c1");
    assert_eq!(
        (s.state.as_str(), s.version, s.next_due),
        ("follow", Some(2), None)
    );
    assert!(
        rig.engine.trigger(&key("c1")).is_none(),
        "a followed credential was rotated"
    );
    assert!(rig.calls("stage", &path("c2")) == 0, "the follower staged");
    rig.shutdown().await;
}

/// With a change index, the safety-net sweep of a follower of many
/// credentials reads about one credential's mark per poll, not a share of
/// all of them.
#[tokio::test(start_paused = true)]
async fn a_follower_of_many_credentials_sweeps_about_one_mark_per_poll() {
    const N: usize = 100;
    let rig = Rig::following_with_index(N);
    let rotator = rig.rotator();
    rotate_elsewhere(&rotator, "c0", "kt-canary-c0-one").await;
    rig.run_following().await;
    rig.until(Duration::from_secs(5), "first delivery", |r| {
        r.sink.count() == 1
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let marks = |r: &Rig| -> usize {
        (0..N)
            .map(|i| r.calls("mark", &path(&format!("c{i}"))))
            .sum()
    };
    let (polls, swept) = (rig.calls("mark", INDEX), marks(&rig));
    tokio::time::sleep(Duration::from_secs(30)).await;
    let polls = rig.calls("mark", INDEX) - polls;
    let swept = marks(&rig) - swept;
    assert!((25..=35).contains(&polls), "{polls} polls in 30 s");
    assert!(
        swept <= polls && swept + 2 >= polls,
        "{swept} credential marks read in {polls} polls; want one per poll"
    );
    assert_eq!(rig.sink.count(), 1, "nothing new was delivered");
    rig.shutdown().await;
}

/// With a change index, the rotating keyturn delivers to its own sinks
/// without waiting for the index write, and the deliver step is recorded
/// done only once the index holds the version: while the index cannot be
/// written, the step fails and is retried (delivering again), and the
/// rotation ends only after the write.
#[tokio::test(start_paused = true)]
async fn the_deliver_step_delivers_first_and_ends_only_once_the_change_index_holds_the_version() {
    let rig = Rig::with_index(1, "every = \"6h\"", |inner| {
        Arc::new(crate::vaults::change_index::IndexedVault::new(
            // The background write and the deliver step's own fail.
            Arc::new(crate::vaults::change_index::IndexGate::new(inner, INDEX, 2)),
            INDEX,
        ))
    });
    rig.run().await;
    rig.until(Duration::from_secs(20), "the rotation's end", |r| {
        let s = r.status("c0");
        s.version == Some(1) && s.rotation.is_none()
    })
    .await;
    let deliveries: Vec<Duration> = rig
        .sink
        .delivered
        .lock()
        .unwrap()
        .iter()
        .map(|d| rig.at(d.3))
        .collect();
    assert_eq!(
        deliveries.len(),
        2,
        "delivered once, then again by the retried step: {deliveries:?}"
    );
    assert_eq!(
        deliveries[0],
        Duration::ZERO,
        "the sink waited for the index"
    );
    let written: Vec<Duration> = rig
        .vault
        .times("promote", Some(INDEX))
        .iter()
        .map(|t| rig.at(*t))
        .collect();
    assert_eq!(written.len(), 1, "{written:?}");
    assert!(
        written[0] >= Duration::from_millis(500) && written[0] <= deliveries[1],
        "the index write came at {:?}, deliveries at {deliveries:?}",
        written[0]
    );
    let index = crate::vaults::change_index::read(rig.vault.as_ref(), INDEX)
        .await
        .unwrap()
        .expect("an index");
    assert_eq!(index.get(&path("c0")), Some(&VersionRef("1".into())));
    let audit = std::fs::read_to_string(rig.dir.path().join("audit.log")).unwrap();
    assert!(
        audit.lines().any(|l| l.contains("rotation.deliver")
            && l.contains("failed")
            && l.contains("change index")),
        "no failed deliver step naming the change index in the audit"
    );
    rig.shutdown().await;
}

/// While the vault fails, the follower waits twice as long after each
/// failed poll (±10 % jitter); once it answers, the poll interval is back.
#[tokio::test(start_paused = true)]
async fn a_failing_vault_is_polled_with_growing_back_off_then_at_the_interval_again() {
    let rig = Rig::new(1, FOLLOW).await;
    rig.vault.fail("mark", 4, ErrorKind::Transient, None);
    rig.run_following().await;
    tokio::time::sleep(Duration::from_secs(40)).await;
    let times = rig.vault.times("mark", Some(&path("c0")));
    let gaps: Vec<f64> = times
        .windows(2)
        .map(|w| (w[1] - w[0]).as_secs_f64())
        .collect();
    assert!(gaps.len() >= 7, "{gaps:?}");
    for (i, want) in [2.0, 4.0, 8.0, 16.0, 1.0, 1.0].iter().enumerate() {
        assert!(
            (gaps[i] - want).abs() <= want * 0.11,
            "gap {i} after {} failures: {:.2}s, want {want}s ±10%: {gaps:?}",
            i + 1,
            gaps[i]
        );
    }
    rig.shutdown().await;
}

impl Rig {
    /// `cred`'s state and last error as status shows them, and how many
    /// credentials the `credentials{state="failed"}` gauge counts.
    fn follow_health(&self, cred: &str) -> (String, Option<String>, usize) {
        let s = self.status(cred);
        let failed = self
            .engine
            .state_counts()
            .iter()
            .find(|(st, _)| *st == crate::telemetry::CredentialState::Failed)
            .map_or(0, |c| c.1);
        (s.state, s.last_error, failed)
    }

    /// Rotates c0 elsewhere (through `via`), runs the follow loops, and
    /// waits for the follower's first delivery.
    async fn follow_first_version(&self, via: &dyn Vault, value: &str) {
        rotate_elsewhere(via, "c0", value).await;
        self.run_following().await;
        self.until(Duration::from_secs(5), "the first delivery", |r| {
            r.sink.count() == 1
        })
        .await;
    }
}

/// Black-box finding: a follower whose path nothing writes (a typo, a
/// rotator never started) showed `follow` as if in step. It shows
/// `follow:waiting` until its first version is delivered, then `follow`.
#[tokio::test(start_paused = true)]
async fn a_follower_with_nothing_to_follow_yet_shows_waiting() {
    for indexed in [false, true] {
        let rig = if indexed {
            Rig::following_with_index(1)
        } else {
            Rig::new(1, FOLLOW).await
        };
        rig.run_following().await;
        // Several polls answered, nothing current in the vault.
        tokio::time::sleep(Duration::from_secs(5)).await;
        let s = rig.status("c0");
        assert_eq!(
            (s.state.as_str(), s.version),
            ("follow:waiting", None),
            "indexed={indexed}"
        );
        assert_eq!(rig.sink.count(), 0);

        let rotator = rig.rotator();
        let via: &dyn Vault = if indexed {
            &rotator
        } else {
            rig.vault.as_ref()
        };
        rotate_elsewhere(via, "c0", "kt-canary-waiting-1").await;
        rig.until(Duration::from_secs(10), "the first delivery", |r| {
            r.sink.count() == 1
        })
        .await;
        let s = rig.status("c0");
        assert_eq!(
            (s.state.as_str(), s.version),
            ("follow", Some(1)),
            "indexed={indexed}"
        );
        rig.shutdown().await;
    }
}

/// Defect: a follower whose vault refused its reads (a revoked token, a
/// vault down) showed `follow`, no last error, and counted as `idle` in
/// the metrics; only the log said anything. Now the failed poll shows in
/// status as `failed` with the vault's error (and in the gauge the
/// `KeyturnRotationFailing` rule watches), counts like a failed rotation
/// (persisted, with when it began), and clears at the first poll that
/// reads the vault again. Without a change index (each credential's own
/// mark) and with one (the group's index).
#[tokio::test(start_paused = true)]
async fn a_follower_whose_vault_fails_shows_failed_until_a_poll_succeeds() {
    for indexed in [false, true] {
        let rig = if indexed {
            Rig::following_with_index(1)
        } else {
            Rig::new(1, FOLLOW).await
        };
        let rotator = rig.rotator();
        let via: &dyn Vault = if indexed {
            &rotator
        } else {
            rig.vault.as_ref()
        };
        rig.follow_first_version(via, "kt-canary-f1-one").await;
        assert_eq!(rig.follow_health("c0"), ("follow".into(), None, 0));

        // The next polls' first read (the index's mark, or c0's) is refused.
        let failing_from = super::clock::Clock::now(&rig.clock);
        rig.vault.fail("mark", 3, ErrorKind::Unauthorized, None);
        rig.until(Duration::from_secs(5), "the failed poll in status", |r| {
            r.status("c0").last_error.is_some()
        })
        .await;
        let (state, error, failed) = rig.follow_health("c0");
        assert_eq!((state.as_str(), failed), ("failed", 1), "indexed {indexed}");
        let error = error.unwrap();
        // The vault and its error; never a value.
        assert!(
            error.starts_with("follow: vault local: ")
                && error.contains("mark refused")
                && !error.contains("kt-canary"),
            "{error}"
        );
        let row = rig.store.credential(&key("c0")).unwrap().unwrap();
        assert!(row.consecutive_failures >= 1, "{row:?}");
        assert!(
            row.failing_since.is_some_and(|t| t >= failing_from),
            "{row:?}"
        );
        assert_eq!(row.last_error.as_deref(), Some(error.as_str()));
        assert_eq!(row.current_version, Some(1), "the version it has");

        // The vault answers again: the next poll clears it, and a new
        // version is delivered as before.
        rig.until(Duration::from_secs(30), "the recovery", |r| {
            r.follow_health("c0") == ("follow".into(), None, 0)
        })
        .await;
        let row = rig.store.credential(&key("c0")).unwrap().unwrap();
        assert_eq!(
            (row.consecutive_failures, row.failing_since, row.last_error),
            (0, None, None)
        );
        rotate_elsewhere(via, "c0", "kt-canary-f1-two").await;
        rig.until(Duration::from_secs(5), "the next delivery", |r| {
            r.sink.count() == 2
        })
        .await;
        assert_eq!(rig.follow_health("c0"), ("follow".into(), None, 0));
        rig.shutdown().await;
    }
}

/// A vault failure recorded before a restart is shown after it (from
/// state) and cleared by the restarted follower's first poll that reads the
/// vault.
#[tokio::test(start_paused = true)]
async fn a_vault_failure_recorded_before_a_restart_clears_at_the_first_good_poll() {
    let rig = Rig::new(1, FOLLOW).await;
    rig.follow_first_version(rig.vault.as_ref(), "kt-canary-f1-restart")
        .await;
    rig.vault.fail("mark", 1, ErrorKind::Transient, None);
    rig.until(Duration::from_secs(5), "the failed poll", |r| {
        r.status("c0").last_error.is_some()
    })
    .await;
    let rig = rig.restart(1, FOLLOW).await;
    rig.engine.start().await.unwrap();
    assert_eq!(rig.follow_health("c0").0, "failed", "not loaded from state");
    let e = rig.engine.clone();
    rig.tracker.spawn(async move { e.run_followers().await });
    rig.until(Duration::from_secs(5), "the recovery", |r| {
        r.follow_health("c0") == ("follow".into(), None, 0)
    })
    .await;
    let row = rig.store.credential(&key("c0")).unwrap().unwrap();
    assert_eq!((row.consecutive_failures, row.last_error), (0, None));
    assert_eq!(rig.sink.count(), 0, "delivered again after the restart");
    rig.shutdown().await;
}

/// A nudged check that cannot read the vault shows in status the same way
/// (it was only logged); the next poll that reads the credential clears it.
#[tokio::test(start_paused = true)]
async fn a_nudged_check_that_cannot_read_the_vault_shows_in_status() {
    let rig = Rig::new(1, "mode = \"follow\"\npoll = \"60s\"").await;
    rig.follow_first_version(rig.vault.as_ref(), "kt-canary-f1-nudge")
        .await;
    rig.vault.fail("read", 1, ErrorKind::Transient, None);
    rig.engine.nudge(&key("c0"));
    rig.until(Duration::from_secs(2), "the nudged check's failure", |r| {
        r.status("c0").last_error.is_some()
    })
    .await;
    let (state, error, failed) = rig.follow_health("c0");
    assert_eq!((state.as_str(), failed), ("failed", 1));
    assert!(
        error
            .as_deref()
            .is_some_and(|e| e.starts_with("follow: vault local: read refused")),
        "{error:?}"
    );
    rig.until(Duration::from_secs(70), "the poll's recovery", |r| {
        r.follow_health("c0") == ("follow".into(), None, 0)
    })
    .await;
    rig.shutdown().await;
}

/// The safety-net sweep reads at most one credential's mark per poll,
/// reaches every credential within `max(n, SWEEP_POLLS)` polls, and with
/// few credentials spreads them out rather than checking each every poll.
#[test]
fn the_sweep_checks_at_most_one_credential_per_poll_and_each_within_its_cycle() {
    use super::follow::{SWEEP_POLLS, sweep_pick};
    assert_eq!(sweep_pick(0, 0), None);
    for n in [1, 2, 3, 7, 30, 59, 60, 61, 1000] {
        let cycle = n.max(SWEEP_POLLS);
        let picks: Vec<Option<usize>> = (0..3 * cycle).map(|p| sweep_pick(p, n)).collect();
        let mut last: Vec<Option<usize>> = vec![None; n];
        for (p, pick) in picks.iter().enumerate() {
            let Some(i) = *pick else { continue };
            assert!(i < n, "n = {n}: poll {p} picked {i}");
            if let Some(before) = last[i] {
                let gap = p - before;
                assert!(gap <= cycle, "n = {n}: credential {i} waited {gap} polls");
                assert!(
                    gap > SWEEP_POLLS / 2,
                    "n = {n}: credential {i} checked again after {gap} polls"
                );
            }
            last[i] = Some(p);
        }
        for (i, l) in last.iter().enumerate() {
            assert!(
                l.is_some_and(|l| l >= 2 * cycle),
                "n = {n}: credential {i} not checked in the last cycle"
            );
        }
    }
}

#[test]
fn the_back_off_is_capped_and_never_shorter_than_the_poll() {
    use super::follow::{MAX_BACKOFF, next_delay};
    let s = Duration::from_secs;
    for _ in 0..100 {
        let d = next_delay(s(1), 30);
        assert!(
            d >= MAX_BACKOFF.mul_f64(0.9) && d <= MAX_BACKOFF.mul_f64(1.1),
            "{d:?}"
        );
        let d = next_delay(s(90), 3);
        assert!(d >= s(81) && d <= s(99), "{d:?}");
        let d = next_delay(s(5), 0);
        assert!(
            d >= Duration::from_millis(4500) && d <= Duration::from_millis(5500),
            "{d:?}"
        );
    }
}

/// A follower's failed checks count at the pace of a rotation's failures:
/// the first at once, the (n+1)th once the run has lasted the first n
/// parked waits (`max_delay` doubled per failure, capped at an hour),
/// whatever the number of checks in between; and a run of any length
/// neither panics nor counts early.
#[test]
fn a_followers_failed_checks_count_at_a_rotations_pace() {
    use super::follow::count_check_failure;
    let retry = crate::config::RetryConfig {
        initial_delay: Duration::from_millis(500),
        max_delay: Duration::from_secs(60),
        max_attempts: 5,
    };
    let t0 = Utc::now();
    let at = |s: i64| t0 + chrono::Duration::seconds(s);
    let mut row = CredentialRow {
        key: key("c0"),
        current_version: Some(1),
        last_rotated_at: None,
        next_due: None,
        consecutive_failures: 0,
        failing_since: None,
        last_error: None,
    };
    // (seconds since the first failure, the count after a failed check)
    for (s, n) in [
        (0, 1),
        (1, 1),
        (15, 1),
        (59, 1),
        (60, 2),
        (61, 2),
        (179, 2),
        (180, 3),
        (419, 3),
        (420, 4),
    ] {
        count_check_failure(&mut row, at(s), &retry);
        assert_eq!(row.consecutive_failures, n, "at {s} s");
        assert_eq!(row.failing_since, Some(t0), "one run");
    }
    // Deep in a long outage: an hour per count, and no overflow.
    row.consecutive_failures = u32::MAX - 1;
    count_check_failure(&mut row, at(3600), &retry);
    assert_eq!(row.consecutive_failures, u32::MAX - 1);
    // A success ends the run; the next failure starts one at once.
    row.consecutive_failures = 0;
    row.failing_since = None;
    count_check_failure(&mut row, at(5000), &retry);
    assert_eq!(
        (row.consecutive_failures, row.failing_since),
        (1, Some(at(5000)))
    );
}

/// Without an index the follower polls each credential's mark, delivers
/// each new version once, records it, and after a restart does not
/// deliver it again; the scheduler never rotates it.
#[tokio::test(start_paused = true)]
async fn a_restarted_follower_does_not_deliver_the_same_version_again() {
    let rig = Rig::new(1, FOLLOW).await;
    rotate_elsewhere(rig.vault.as_ref(), "c0", "kt-canary-one").await;
    rig.run_following().await;
    rig.until(Duration::from_secs(5), "delivery", |r| r.sink.count() == 1)
        .await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(rig.sink.count(), 1, "delivered twice");
    assert_eq!(
        rig.calls("read", &path("c0")),
        1,
        "the value was read again unchanged"
    );
    let rig = rig.restart(1, FOLLOW).await;
    rig.run_following().await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(
        rig.sink.count(),
        0,
        "a restart delivered the same version again"
    );
    assert_eq!(rig.status("c0").version, Some(1));
    rotate_elsewhere(rig.vault.as_ref(), "c0", "kt-canary-two").await;
    rig.until(Duration::from_secs(5), "second version", |r| {
        r.sink.count() == 1
    })
    .await;
    assert_eq!(rig.sink.values("c0"), vec![(2, b"kt-canary-two".to_vec())]);
    assert_eq!(
        rig.calls("stage", &path("c0")),
        2,
        "only the rotator staged"
    );
    rig.shutdown().await;
}

/// A nudge (`POST /v1/follow/nudge`) for a followed credential checks
/// its current version in the vault at once, long before the poll, even
/// when the change index does not list it yet; nudges arriving while that
/// check runs coalesce into one more check, and nothing is delivered
/// twice. A nudge for a credential this keyturn does not follow wakes the
/// loops for one early poll of the index.
#[tokio::test(start_paused = true)]
async fn a_nudge_checks_the_followed_credential_now_and_nudges_coalesce() {
    use super::follow::Nudged;
    let rig = Rig::with_index(2, "mode = \"follow\"\npoll = \"60s\"", |v| v);
    let rotator = rig.rotator();
    rotate_elsewhere(&rotator, "c0", "kt-canary-nudge-c0-one").await;
    rig.run_following().await;
    rig.until(Duration::from_secs(5), "the first poll's delivery", |r| {
        r.sink.versions("c0").len() == 1
    })
    .await;
    let started = Instant::now();

    // Written without the index (as a rotator whose index write has not
    // happened yet): only the nudge can find it before the sweep.
    rotate_elsewhere(rig.vault.as_ref(), "c0", "kt-canary-nudge-c0-two").await;
    let reads = rig.calls("read", &path("c0"));
    assert_eq!(rig.engine.nudge(&key("c0")), Nudged::Check);
    assert_eq!(rig.engine.nudge(&key("c0")), Nudged::Coalesced);
    assert_eq!(rig.engine.nudge(&key("c0")), Nudged::Coalesced);
    rig.until(Duration::from_secs(2), "the nudged delivery", |r| {
        r.sink.versions("c0").len() == 2
    })
    .await;
    assert_eq!(
        rig.sink.values("c0")[1],
        (2, b"kt-canary-nudge-c0-two".to_vec())
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        rig.calls("read", &path("c0")),
        reads + 2,
        "three nudges: one check, and one more for those that came during it"
    );
    assert_eq!(rig.sink.versions("c0").len(), 2, "delivered twice");
    // A nudge for a version already delivered delivers nothing.
    assert_eq!(rig.engine.nudge(&key("c0")), Nudged::Check);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(rig.sink.versions("c0").len(), 2);

    // Not followed here: one early poll of the index finds c1.
    rotate_elsewhere(&rotator, "c1", "kt-canary-nudge-c1-one").await;
    let other = CredentialKey::new(
        crate::model::AgentId::new("someone-else").unwrap(),
        crate::model::CredentialId::new("db").unwrap(),
    );
    assert_eq!(rig.engine.nudge(&other), Nudged::Poll);
    rig.until(Duration::from_secs(2), "the early poll's delivery", |r| {
        r.sink.versions("c1").len() == 1
    })
    .await;
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "{:?}: waited for the poll",
        started.elapsed()
    );
    rig.shutdown().await;
}

/// Acknowledgements, cut-over and independent deliveries.
mod acks;
mod follow;
mod health;
mod retired;

/// The `detail` of every `rotation.retire` record in `rig`'s audit log.
fn retire_details(rig: &Rig) -> Vec<Option<String>> {
    std::fs::read_to_string(rig.dir.path().join("audit.log"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|r| r["event"] == "rotation.retire")
        .map(|r| r["detail"].as_str().map(String::from))
        .collect()
}

/// Defect: after a credential's first version (there is no previous
/// version) status and the metrics said `retiring` for the whole grace
/// period, and the retire record at its end named no version. Such a
/// credential is `idle`, also after a restart; the retire step still runs
/// at grace end and its record says there was no previous version. The
/// second version's grace is `retiring` as before.
#[tokio::test(start_paused = true)]
async fn a_first_version_has_nothing_to_retire_and_shows_idle() {
    let schedule = "every = \"6h\"\ngrace = \"1m\"";
    let rig = Rig::started(1, schedule).await;
    let retiring = |rig: &Rig| {
        let counts = rig.engine.state_counts();
        counts
            .iter()
            .find(|(s, _)| *s == crate::telemetry::CredentialState::Retiring)
            .unwrap()
            .1
    };
    let s = rig.status("c0");
    assert_eq!(
        (s.state.as_str(), s.step.as_deref()),
        ("idle", None),
        "{s:?}"
    );
    assert_eq!(retiring(&rig), 0);
    // A restart during the grace finds it waiting to retire: still idle.
    let rig = rig.restart(1, schedule).await;
    rig.run().await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let s = rig.status("c0");
    assert_eq!((s.state.as_str(), s.version), ("idle", Some(1)), "{s:?}");
    assert_eq!(retiring(&rig), 0);
    tokio::time::sleep(Duration::from_secs(61)).await;
    assert_eq!(
        retire_details(&rig),
        [Some("no previous version".to_owned())]
    );
    let done = rig.rotate_c0().await;
    assert_eq!((done.error, done.version), (None, Some(2)));
    assert_eq!(rig.status("c0").state, "retiring");
    assert_eq!(retiring(&rig), 1);
    rig.shutdown().await;
}

/// A sink that refuses every delivery (and holds up the rotation).
struct RefusingSink;

#[async_trait]
impl Sink for RefusingSink {
    fn kind(&self) -> &'static str {
        "refusing"
    }
    fn describe(&self) -> String {
        "refusing".into()
    }
    async fn deliver(&self, _: &Notice, _: &SecretValue) -> Result<Delivered, PluginError> {
        Err(PluginError::new(
            ErrorKind::Unauthorized,
            "refused (injected)",
        ))
    }
    async fn retract(&self, _: &CredentialKey) -> Result<(), PluginError> {
        Ok(())
    }
    async fn preflight(&self) -> Result<(), PluginError> {
        Ok(())
    }
}

/// Defect: while a deliver step failed, status showed the previous
/// version (or none) as current though the new one was promoted (current
/// in the vault, maybe already in a file). It shows the promoted version,
/// `failed` at step `deliver`.
#[tokio::test(start_paused = true)]
async fn a_failing_deliver_shows_the_promoted_version() {
    let rig = Rig::in_dir_with(
        tempfile::tempdir().unwrap(),
        1,
        "every = \"6h\"",
        "",
        Arc::new(MemoryStore::new()),
        Arc::default(),
        &[Arc::new(RefusingSink)],
    );
    let done = rig.rotate_c0().await;
    assert!(done.error.is_some(), "{done:?}");
    let s = rig.status("c0");
    assert_eq!(
        (s.state.as_str(), s.step.as_deref(), s.version),
        ("failed", Some("deliver"), Some(1)),
        "{s:?}"
    );
    assert_eq!(rig.vault.stages(&path("c0")), vec![(1, Stage::Current)]);
    // `surface` and the metrics count it live too (they counted none).
    let facts = rig.engine.surface_facts();
    assert_eq!(facts[0].1.current_version, Some(1));
    assert_eq!(rig.engine.live_totals(rig.engine.now()).0, 1);
    // And it has an age, so the max-age alerts can fire for it
    // (black-box finding: none on `/metrics`, none in `surface`).
    tokio::time::sleep(Duration::from_secs(60)).await;
    let made = facts[0].1.last_rotated.expect("a made time in surface");
    assert!(made <= rig.engine.now(), "{made}");
    let age = rig.engine.credential_times()[0].1.expect("an age");
    assert!((60.0..120.0).contains(&age), "{age}");
    rig.shutdown().await;
}

/// A daily credential with one file sink, at its first version, started
/// again after `meanwhile` (given the file's path and the vault) ran with
/// the daemon down and the file removed; its start's restore has run.
/// The rig, the file and what it held.
async fn restarted_without_its_file(
    meanwhile: impl FnOnce(&std::path::Path, &MemVault),
) -> (Rig, std::path::PathBuf, Vec<u8>, Arc<MemVault>) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("agents/bot/c0");
    let sink = || -> Arc<dyn Sink> {
        crate::sinks::delivered_at(&file, &[file.parent().unwrap().parent().unwrap().into()])
            .unwrap()
    };
    let (store, vault) = (Arc::new(MemoryStore::new()), Arc::<MemVault>::default());
    let every = "every = \"24h\"";
    let rig = Rig::in_dir_with(dir, 1, every, "", store.clone(), vault.clone(), &[sink()]);
    rig.run().await;
    rig.first_version().await;
    let was = std::fs::read(&file).unwrap();
    let dir = rig.shutdown().await;

    std::fs::remove_file(&file).unwrap();
    meanwhile(&file, &vault);
    let rig = Rig::in_dir_with(dir, 1, every, "", store, vault.clone(), &[sink()]);
    rig.run().await;
    rig.engine.restore_missing_files().await;
    (rig, file, was, vault)
}

/// Black-box finding: a restore refused by what was in the file's place (a
/// FIFO, a directory) was not tried again once that was cleared: the agent
/// had no file until the next rotation, a day later here. The sink is
/// restored again after a back-off.
#[tokio::test(start_paused = true)]
async fn a_restore_refused_by_what_is_at_the_path_is_tried_again_after_a_back_off() {
    let (rig, file, was, _) =
        restarted_without_its_file(|file, _| std::fs::create_dir(file).unwrap()).await;
    assert!(file.is_dir(), "refused: a directory is in its place");
    std::fs::remove_dir(&file).unwrap();
    rig.until(
        Duration::from_secs(600),
        "restored after a back-off",
        |_| file.is_file(),
    )
    .await;
    assert_eq!(std::fs::read(&file).unwrap(), was);
    rig.shutdown().await;
}

/// Black-box finding: a delivered file missing at start whose vault did
/// not answer was restored once, then left to the next rotation (a day
/// later with a daily schedule). It is tried again after a back-off until
/// it is back.
#[tokio::test(start_paused = true)]
async fn a_missing_file_whose_vault_fails_is_restored_again_after_a_back_off() {
    let (rig, file, was, vault) =
        restarted_without_its_file(|_, vault| vault.fail("read", 3, ErrorKind::Transient, None))
            .await;
    assert!(!file.exists(), "its vault failed");
    rig.until(
        Duration::from_secs(600),
        "restored after a back-off",
        |_| file.exists(),
    )
    .await;
    assert_eq!(std::fs::read(&file).unwrap(), was);
    assert_eq!(
        vault.times("read", None).len(),
        4,
        "three failed reads, then one"
    );
    rig.shutdown().await;
}

/// Black-box finding: a credential renamed (the same vault `path`) while
/// its rotation was in flight ran two rotations on one place at once: the
/// departed one's, finishing with its old config, and the renamed one's
/// first. The target could be left with the abandoned value. The renamed
/// one's first rotation now begins when the departed one's has ended.
#[tokio::test(start_paused = true)]
async fn a_credential_renamed_mid_rotation_rotates_after_the_departed_one_ends() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_owned();
    let text = |name: &str| {
        let mut t = config_text(&d, 0, "", "");
        t.push_str(&format!(
            "[agents.bot.credentials.{name}]\nvault = \"local\"\npath = \"shared\"\nevery = \"6h\"\ngenerate = {{ kind = \"password\", length = 20 }}\ndeliver = [{{ type = \"file\", path = \"{}/agents/bot/{name}\" }}]\n",
            d.display()
        ));
        t
    };
    let first = text("db");
    let rig = Rig::from_text(dir, &first, Arc::default(), Arc::default(), &[]);
    rig.run().await;
    rig.first_version().await;
    // The next rotation of `db` takes 10 s at promote.
    rig.vault.slow("promote", Duration::from_secs(10));
    let done = rig.engine.trigger(&key("db")).unwrap();
    rig.until(Duration::from_secs(5), "db at promote", |r| {
        r.vault.times("promote", None).len() == 2
    })
    .await;
    let promoting = *rig.vault.times("promote", None).last().unwrap();
    let renamed = catalog_with(rig.dir.path(), &text("db2"), &rig.vault, &rig.sink, &[]);
    rig.vault.slow("promote", Duration::ZERO);
    rig.engine.reload(renamed).await;
    let finished = done.await.unwrap();
    assert_eq!((finished.error, finished.version), (None, Some(2)));
    rig.until(Duration::from_secs(30), "db2's first version", |r| {
        r.sink.versions("db2") == vec![1]
    })
    .await;
    let staged = rig.vault.times("stage", Some("shared"));
    assert_eq!(staged.len(), 3, "db's two versions and db2's first");
    assert!(
        staged[2] >= promoting + Duration::from_secs(10),
        "db2 staged its first version {:?} after db's promote began, while it ran (10 s)",
        staged[2] - promoting
    );
    // What the vault holds current is db2's, and db2's file has it.
    let stages = rig.vault.stages("shared");
    assert_eq!(stages.last(), Some(&(3, Stage::Current)), "{stages:?}");
    assert_eq!(rig.status("db2").version, Some(1));
    rig.shutdown().await;
}

/// Black-box finding: with the state volume full, a failed rotation could
/// not record its failure, so its count stayed put and every credential
/// was retried every `max_delay` (2 s there) for as long as the disk
/// stayed full: ~1000 log lines and failed-rotation counts a minute. The
/// back-off doubles as when the failure is recorded.
#[tokio::test(start_paused = true)]
async fn a_rotation_failing_while_the_state_cannot_be_written_backs_off_all_the_same() {
    let rig = Rig::started(1, "every = \"6h\"").await;
    rig.store.set_full(true);
    let done = rig.rotate_c0().await;
    assert!(done.error.is_some(), "the rotation cannot be recorded");
    // Each retry's due time, as status shows it, for a few minutes.
    let mut due = Vec::new();
    for _ in 0..1200 {
        if let Some(at) = rig.status("c0").next_due
            && due.last() != Some(&at)
        {
            due.push(at);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let gaps: Vec<i64> = due
        .windows(2)
        .map(|w| (w[1] - w[0]).num_seconds())
        .collect();
    assert!(gaps.len() >= 4, "{gaps:?}");
    // Parked 4 s (the retry ceiling), then 8, 16, 32, 64 s (the attempt
    // fails at once: it cannot record its start).
    assert_eq!(gaps[..4], [8, 16, 32, 64], "{gaps:?}");
    rig.store.set_full(false);
    rig.until(
        Duration::from_secs(300),
        "rotated once there is room",
        |r| r.status("c0").version == Some(2),
    )
    .await;
    rig.shutdown().await;
}

/// Black-box finding: after the config moved the token service's signing
/// credential to another vault, every exchange failed (`server_error`)
/// until a manual rotation: its current version was looked for in the new
/// vault, while a version stays where it was made until the next rotation.
/// A version's value is read where it was made.
#[tokio::test(start_paused = true)]
async fn a_versions_value_is_read_where_it_was_made_after_a_move() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_owned();
    let text = |vault: &str| {
        let mut t = config_text(&d, 0, "", "");
        t.push_str(&format!(
            "[vaults.other]\ntype = \"local\"\n[agents.bot.credentials.c0]\nvault = \"{vault}\"\nevery = \"6h\"\ngenerate = {{ kind = \"password\", length = 20 }}\ndeliver = [{{ type = \"file\", path = \"{}/agents/bot/c0\" }}]\n",
            d.display()
        ));
        t
    };
    let first = text("local");
    let rig = Rig::from_text(dir, &first, Arc::default(), Arc::default(), &[]);
    rig.run().await;
    rig.first_version().await;
    // Moved: `local` (where version 1 is) and `other`, each in memory.
    let other = Arc::new(MemVault::default());
    let config = crate::config::load_str(&d.join("k.toml"), &text("other")).unwrap();
    let mut catalog = Catalog::build(config, None).unwrap();
    for (name, vault) in [("local", &rig.vault), ("other", &other)] {
        let shared = catalog.vaults[name].clone();
        catalog.vaults.insert(
            name.into(),
            Arc::new(VaultHandle {
                vault: vault.clone(),
                limit: shared.limit.clone(),
                config: shared.config.clone(),
            }),
        );
    }
    let old = catalog.creds.remove(&key("c0")).unwrap();
    let sink: Arc<dyn Sink> = rig.sink.clone();
    catalog.creds.insert(Arc::new(CredEntry {
        agent: old.agent.clone(),
        key: old.key.clone(),
        path: old.path.clone(),
        policy: old.policy.clone(),
        vaults: vec![catalog.vaults["other"].clone()].into(),
        target: old.target.clone(),
        sinks: vec![sink].into(),
    }));
    rig.engine.reload(catalog).await;
    let version = |v: VersionNo| {
        rig.store
            .versions(&key("c0"))
            .unwrap()
            .into_iter()
            .find(|r| r.version == v)
            .unwrap()
    };
    let delivered = |v: VersionNo| {
        rig.sink
            .values("c0")
            .into_iter()
            .find(|(n, _)| *n == v)
            .unwrap()
            .1
    };
    let v1 = rig.engine.version_value(&version(1)).await.unwrap();
    assert_eq!(v1.expose(), delivered(1).as_slice(), "read in `local`");
    // The next rotation makes version 2 in `other`, read there.
    let done = rig.rotate_c0().await;
    assert_eq!((done.error, done.version), (None, Some(2)));
    assert_eq!(other.stages(&path("c0")).len(), 1);
    let v2 = rig.engine.version_value(&version(2)).await.unwrap();
    assert_eq!(v2.expose(), delivered(2).as_slice(), "read in `other`");
    rig.shutdown().await;
}
