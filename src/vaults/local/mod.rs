//! The embedded local vault: versions encrypted at rest in one SQLite file.
//!
//! # Storage
//! `<dir>/vault.db` (dir created 0700, file 0600) in WAL mode with
//! `synchronous=FULL`, so a `stage` that returned survives a power cut
//! (invariant 2: a value is durable before it is applied at a target), and
//! `secure_delete=ON`, so a wiped or destroyed value's ciphertext is
//! overwritten on disk instead of lingering in free pages.
//!
//! One row per version: `(path, version, rotation_id, stage, created_at,
//! nonce, ciphertext)`. `version` counts from 1 per path and never repeats,
//! even after `destroy` (a per-path counter in `paths` survives it), so a
//! version number remembered in the state database can never alias a newer
//! value. `rotation_id` is unique per path: it is the idempotency key of
//! `stage`.
//!
//! # Encryption
//! Each value is sealed with XChaCha20-Poly1305 under the vault key, with a
//! fresh random 24-byte nonce per version and associated data binding the
//! ciphertext to `(path, version, rotation_id, stage)`: a row copied or
//! swapped onto another path or version, or given another stage (the
//! previous version made current again: a silent rollback), fails to
//! decrypt instead of yielding the wrong credential. So every stage change
//! re-seals the value under a fresh nonce; a schema-1 file (sealed without
//! the stage) is re-sealed once when opened. A wrong key or tampered row is an [`ErrorKind::Fatal`] error
//! naming the path and version, never a panic. At open, a small sealed
//! "key check" record in `meta` tells a wrong key apart from a corrupt row.
//!
//! # Stages
//! - `stage` is idempotent per rotation id: a second call returns the version
//!   already stored and ignores the new value. Only one version per path is
//!   pending: staging for a *different* rotation while a pending version exists
//!   means that older rotation crashed and was abandoned, so its pending
//!   version is retired (value wiped) and the new one replaces it. Its number
//!   is not reused, and promoting it later fails with `Conflict`.
//! - `promote`: pending (or previous, for a rollback) → current; the old
//!   current → previous; the old previous → retired (value wiped).
//! - `retire`: previous → retired (value wiped).
//! - Retired rows keep only metadata, and only the last [`RETIRED_KEPT`] per
//!   path, so the table stays bounded however long the daemon rotates.
//!
//! # Concurrency and group commit
//! rusqlite is synchronous. Writes go to one dedicated writer thread that owns
//! the write connection (SQLite has one writer anyway). With `synchronous=FULL`
//! every commit costs an fsync, which caps one-transaction-per-operation at a
//! few hundred operations per second; so the writer takes every operation
//! already queued (up to [`MAX_BATCH`]), runs each inside its own savepoint
//! (a failing operation rolls back alone), commits once, and only then
//! answers each caller. Every caller still gets "durable before return";
//! under load they share the fsync.
//!
//! One exception: a batch holding only `retire`s commits with
//! `synchronous=NORMAL` (no fsync); the next `stage`, `promote` or
//! `destroy` commit (whose WAL fsync covers every frame before it) or a
//! checkpoint makes it durable. In a rotation that next commit follows at
//! once: the engine retires the previous version right before it stages the
//! next. Losing a retire to a power cut costs no invariant: if the state
//! lost the step too, the retire step is replayed; if not, the value stays
//! at stage `previous` (where it sat through the grace period) until the
//! next `promote` of the path wipes every other previous version.
//!
//! Reads run on a second thread through a second, read-only connection, so
//! they never queue behind a write's fsync (WAL lets readers proceed during
//! a write); one thread, not the blocking
//! pool, because the reads share that one connection anyway and a pool
//! thread per read only added hand-offs. Statements are prepared once and
//! cached.
//!
//! # Key
//! [`load_key`] takes the key from the systemd credential `key_credential` in
//! `$CREDENTIALS_DIRECTORY` when there is one, otherwise from `key_file`,
//! which is created (0600, 64 hex characters) on first start through a temp
//! file linked into place. A `key_credential` the config names is required.

use std::any::Any;
use std::fmt;
use std::fs::{DirBuilder, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use rand::RngCore;
use rand::rngs::OsRng;
use rusqlite::{Connection, OpenFlags, OptionalExtension, params};
use zeroize::Zeroizing;

use super::{Pending, Select, StoredVersion, Vault, VaultItem, VaultPlugin, VersionRef};
use crate::config::validate::{Loc, Validator, VaultScope};
use crate::group_commit::{Flow, GroupCommit};
use crate::model::{ErrorKind, PluginError, RotationId, SecretValue, Stage};

mod config;
mod key;
mod probe;
mod store;
#[cfg(test)]
mod tests;

pub use config::LocalConfig;
pub(crate) use key::read_capped;
pub use key::{LocalKey, load_key, load_key_from};
use store::*;

/// Bytes of a vault key.
pub const KEY_LEN: usize = 32;
/// Bytes of an XChaCha20-Poly1305 nonce.
const NONCE_LEN: usize = 24;
/// Retired versions whose metadata is kept per path (their values are gone).
pub const RETIRED_KEPT: i64 = 16;
/// The database file inside the vault's directory.
pub const DB_FILE: &str = "vault.db";
/// Schema version this code writes; a newer one is refused.
/// 2: the stage is part of each value's associated data (1: it was not;
/// a schema-1 file is migrated when opened).
const SCHEMA_VERSION: i64 = 2;
/// A key file or credential larger than this is certainly not a key; stop
/// reading instead of slurping whatever was put there.
const MAX_KEY_SOURCE: usize = 128;
/// How long a connection waits for the other one's lock (checkpoints).
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);
/// What the key-check record seals; its content does not matter, only that
/// it opens under the key.
const KEY_CHECK_PLAINTEXT: &[u8] = b"keyturn local vault key check";
const KEY_CHECK_AAD: &[u8] = b"keyturn-local-vault/v1/key-check";
/// Domain separation for the per-version associated data (schema 1's is
/// still read, to migrate).
const VERSION_AAD_PREFIX: &[u8] = b"keyturn-local-vault/v2/version\0";
const VERSION_AAD_PREFIX_V1: &[u8] = b"keyturn-local-vault/v1/version\0";
/// Where a test stops the key file's creation half way (a crash).
#[cfg(feature = "failpoints")]
const KEY_CRASH_POINT: &str = "local_vault.key_file.before_write";
/// Most write operations committed together by the writer thread.
pub const MAX_BATCH: usize = 256;
/// Longest path accepted (it is only a database key here, but keep it sane).
const MAX_PATH_LEN: usize = 512;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS meta (
    name  TEXT PRIMARY KEY,
    value BLOB NOT NULL
) WITHOUT ROWID;
-- The last version number handed out per path. Survives destroy so that
-- numbers never repeat.
CREATE TABLE IF NOT EXISTS paths (
    path         TEXT PRIMARY KEY,
    last_version INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS versions (
    path        TEXT    NOT NULL,
    version     INTEGER NOT NULL CHECK (version >= 1),
    rotation_id TEXT    NOT NULL,
    stage       TEXT    NOT NULL
                CHECK (stage IN ('pending', 'current', 'previous', 'retired')),
    created_at  INTEGER NOT NULL, -- unix milliseconds
    nonce       BLOB,             -- NULL once retired
    ciphertext  BLOB,             -- NULL once retired
    PRIMARY KEY (path, version),
    UNIQUE (path, rotation_id)
);
CREATE INDEX IF NOT EXISTS versions_by_stage ON versions (path, stage);
";

// ---------------------------------------------------------------------------
// Key
// ---------------------------------------------------------------------------

/// The embedded vault. Cheap to clone; all clones share the connections.
/// The writer thread stops when the last clone is dropped.
#[derive(Clone)]
pub struct LocalVault {
    inner: Arc<Inner>,
    writes: Arc<GroupCommit<WriteJob>>,
    reads: Arc<GroupCommit<ReadJob>>,
}

/// A read for the reader thread; it answers its caller itself.
type ReadJob = Box<dyn FnOnce(&Inner) + Send>;

struct Inner {
    name: String,
    db_path: PathBuf,
    /// Holds a copy of the key and zeroizes it on drop.
    cipher: XChaCha20Poly1305,
    reader: Mutex<Connection>,
}

/// What a write operation hands back, type-erased so one channel carries
/// every operation (the caller downcasts to its own `T`).
type WriteOutput = Result<Box<dyn Any + Send>, PluginError>;

/// A write operation; it runs inside the writer's open transaction.
type WriteOp = Box<dyn FnOnce(&Inner, &Connection) -> WriteOutput + Send>;

/// One write operation for the writer thread, and where to answer.
struct WriteJob {
    op: WriteOp,
    /// Its caller is answered only once the commit is fsynced (all but
    /// `retire`; see the module doc).
    durable: bool,
    answer: tokio::sync::oneshot::Sender<WriteOutput>,
}

impl fmt::Debug for LocalVault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LocalVault")
            .field("name", &self.inner.name)
            .field("db_path", &self.inner.db_path)
            .finish_non_exhaustive()
    }
}

impl LocalVault {
    /// Opens (creating on first use) the vault in `dir` and checks that `key`
    /// is the key its values were sealed with.
    pub fn open(name: &str, dir: &Path, key: LocalKey) -> Result<LocalVault, PluginError> {
        let ctx = |what: &str| format!("local vault {name}: {what} {}", dir.display());
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| PluginError::io(ctx("creating directory"), &e))?;
        let db_path = dir.join(DB_FILE);
        // Create the file ourselves so it is 0600 from its first byte; SQLite
        // gives the -wal and -shm files the mode of the database file.
        OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&db_path)
            .map_err(|e| PluginError::io(ctx("creating database in"), &e))?;

        let db_err = |what: &str, e: rusqlite::Error| {
            PluginError::new(sql_kind(&e), format!("{}: {e}", ctx(what)))
        };
        let writer = Connection::open_with_flags(
            &db_path,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(|e| db_err("opening database in", e))?;
        configure_writer(&writer).map_err(|e| db_err("configuring database in", e))?;
        writer
            .execute_batch(SCHEMA)
            .map_err(|e| db_err("creating schema in", e))?;

        let cipher = key.cipher();
        drop(key);
        check_meta(&writer, &cipher).map_err(|e| match e {
            MetaError::Sql(e) => db_err("reading key check in", e),
            MetaError::Refused(kind, why) => PluginError::new(
                kind,
                format!("local vault {name}: {why} ({})", db_path.display()),
            ),
        })?;

        let reader = Connection::open_with_flags(
            &db_path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(|e| db_err("opening database in", e))?;
        reader
            .busy_timeout(BUSY_TIMEOUT)
            .map_err(|e| db_err("configuring database in", e))?;
        reader.set_prepared_statement_cache_capacity(16);
        reader
            .pragma_update(None, "cache_size", VAULT_CACHE_KIB)
            .map_err(|e| db_err("configuring database in", e))?;

        let inner = Arc::new(Inner {
            name: name.to_owned(),
            db_path,
            cipher,
            reader: Mutex::new(reader),
        });
        let thread_inner = Arc::clone(&inner);
        let writes = GroupCommit::spawn_lingering(
            &format!("vault-{name}"),
            MAX_BATCH,
            crate::group_commit::FSYNC_LINGER,
            &crate::group_commit::BUSY,
            move |batch| {
                write_batch(&thread_inner, &writer, batch);
                Flow::Continue
            },
        )
        .map_err(|e| PluginError::io(ctx("starting the writer thread for"), &e))?;
        let thread_inner = Arc::clone(&inner);
        let reads = GroupCommit::spawn(
            &format!("vault-{name}-r"),
            MAX_BATCH,
            move |batch: &mut Vec<ReadJob>| {
                for job in batch.drain(..) {
                    // A panicking read drops its answer: the caller gets an
                    // error and the thread keeps serving the others.
                    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        job(&thread_inner)
                    }));
                }
                Flow::Continue
            },
        )
        .map_err(|e| PluginError::io(ctx("starting the reader thread for"), &e))?;
        Ok(LocalVault {
            inner,
            writes: Arc::new(writes),
            reads: Arc::new(reads),
        })
    }

    /// Queues `op` for the writer thread and waits until its batch
    /// committed (durably, if `durable`).
    async fn write<T, F>(&self, durable: bool, op: F) -> Result<T, PluginError>
    where
        T: Send + 'static,
        F: FnOnce(&Inner, &Connection) -> Result<T, PluginError> + Send + 'static,
    {
        let (answer, answered) = tokio::sync::oneshot::channel();
        let job = WriteJob {
            op: Box::new(move |inner, conn| {
                op(inner, conn).map(|t| Box::new(t) as Box<dyn Any + Send>)
            }),
            answer,
            durable,
        };
        let bug = |what: &str| {
            PluginError::new(
                ErrorKind::Fatal,
                format!(
                    "local vault {}: {what} (a bug: see the log)",
                    self.inner.name
                ),
            )
        };
        self.writes
            .submit(job)
            .map_err(|_| bug("the writer thread has stopped"))?;
        let output = answered
            .await
            .map_err(|_| bug("the write operation panicked"))??;
        output
            .downcast::<T>()
            .map(|t| *t)
            .map_err(|_| bug("the writer answered with the wrong type"))
    }

    /// Runs `op` on the reader thread. One thread rather than the blocking
    /// pool: reads share one connection anyway, and dozens of pool threads
    /// queueing on its mutex cost more in context switches than the reads.
    async fn run<T, F>(&self, op: F) -> Result<T, PluginError>
    where
        T: Send + 'static,
        F: FnOnce(&Inner) -> Result<T, PluginError> + Send + 'static,
    {
        let (answer, answered) = tokio::sync::oneshot::channel();
        let job: ReadJob = Box::new(move |inner| {
            let _ = answer.send(op(inner));
        });
        let bug = |what: &str| {
            PluginError::new(
                ErrorKind::Fatal,
                format!("local vault {}: {what}", self.inner.name),
            )
        };
        self.reads
            .submit(job)
            .map_err(|_| bug("the reader thread has stopped"))?;
        answered.await.map_err(|_| bug("operation panicked"))?
    }
}

/// SQLite's page cache per connection, in KiB (negative: a size, not a
/// page count). The default, 2 MB, fills at ~10k credentials and holds
/// ~8 MB of pages after a batch of 100k (dirty pages of a big group
/// commit stay cached); the rows are read by key, and the pages a
/// rotation reads are in the kernel's page cache anyway.
const VAULT_CACHE_KIB: i64 = -512;

fn configure_writer(conn: &Connection) -> rusqlite::Result<()> {
    conn.busy_timeout(BUSY_TIMEOUT)?;
    let mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_CANTOPEN),
            Some(format!("could not switch to WAL mode (got {mode})")),
        ));
    }
    // FULL: the WAL is fsynced at every commit, so a returned `stage` is durable.
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "secure_delete", "ON")?;
    // A bounded WAL, as for the state database.
    conn.pragma_update(
        None,
        "wal_autocheckpoint",
        crate::state::sqlite::WAL_CHECKPOINT_PAGES,
    )?;
    conn.pragma_update(
        None,
        "journal_size_limit",
        crate::state::sqlite::WAL_SIZE_LIMIT,
    )?;
    conn.set_prepared_statement_cache_capacity(32);
    conn.pragma_update(None, "cache_size", VAULT_CACHE_KIB)?;
    Ok(())
}

/// The writer thread: one transaction per batch of queued operations, each in
/// its own savepoint, answers sent only after the commit.
/// One batch of writes: one transaction, each operation in its own savepoint
/// (a failing one rolls back alone), answers sent only after the commit.
fn write_batch(inner: &Inner, conn: &Connection, batch: &mut Vec<WriteJob>) {
    // FULL is the connection's setting; a batch no caller needs durable
    // yet commits without the fsync (see the module doc). If switching
    // fails, the batch simply stays FULL.
    let relaxed = !batch.iter().any(|j| j.durable)
        && conn.pragma_update(None, "synchronous", "NORMAL").is_ok();
    write_ops(inner, conn, batch);
    if relaxed && let Err(e) = conn.pragma_update(None, "synchronous", "FULL") {
        // Later batches would not be durable: refuse them instead.
        tracing::error!(vault = %inner.name, error = %e, "local vault: cannot restore synchronous=FULL");
        panic!(
            "local vault {}: cannot restore synchronous=FULL: {e}",
            inner.name
        );
    }
}

fn write_ops(inner: &Inner, conn: &Connection, batch: &mut Vec<WriteJob>) {
    let mut done: Vec<(WriteOutput, tokio::sync::oneshot::Sender<WriteOutput>)> =
        Vec::with_capacity(batch.len());
    let fail = |what: &str, e: &rusqlite::Error| {
        PluginError::new(
            sql_kind(e),
            format!("local vault {}: {what}: {e}", inner.name),
        )
    };
    if let Err(e) = conn.execute_batch("BEGIN IMMEDIATE") {
        let err = fail("starting a write transaction", &e);
        for job in batch.drain(..) {
            let _ = job.answer.send(Err(err.clone()));
        }
        return;
    }
    for WriteJob { op, answer, .. } in batch.drain(..) {
        if let Err(e) = conn.execute_batch("SAVEPOINT op") {
            done.push((Err(fail("starting a savepoint", &e)), answer));
            continue;
        }
        // A panic in one operation must not take the writer (and every
        // later write) down with it: dropping `answer` tells its caller.
        let output =
            match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| op(inner, conn))) {
                Ok(output) => Some(output),
                Err(_) => {
                    tracing::error!(vault = %inner.name, "local vault write operation panicked");
                    None
                }
            };
        let ok = matches!(output, Some(Ok(_)));
        let end = if ok {
            "RELEASE op"
        } else {
            "ROLLBACK TO op; RELEASE op"
        };
        let ended = conn.execute_batch(end);
        match (output, ended) {
            (Some(output), Ok(())) => done.push((output, answer)),
            (Some(_), Err(e)) => done.push((Err(fail("ending a savepoint", &e)), answer)),
            (None, _) => drop(answer),
        }
    }
    let commit_error = conn.execute_batch("COMMIT").err().map(|e| {
        let _ = conn.execute_batch("ROLLBACK");
        fail("committing", &e)
    });
    for (output, answer) in done {
        let output = match (&commit_error, output) {
            (Some(e), Ok(_)) => Err(e.clone()),
            (_, output) => output,
        };
        let _ = answer.send(output);
    }
}

enum MetaError {
    Sql(rusqlite::Error),
    Refused(ErrorKind, String),
}

impl From<rusqlite::Error> for MetaError {
    fn from(e: rusqlite::Error) -> Self {
        MetaError::Sql(e)
    }
}

/// Records the schema version and key check on first open; on later opens
/// refuses a newer schema and a key that does not open the key check.
fn check_meta(conn: &Connection, cipher: &XChaCha20Poly1305) -> Result<(), MetaError> {
    let schema: Option<i64> = conn
        .query_row("SELECT value FROM meta WHERE name = 'schema'", [], |r| {
            r.get(0)
        })
        .optional()?;
    match schema {
        None => {
            conn.execute(
                "INSERT INTO meta (name, value) VALUES ('schema', ?1)",
                [SCHEMA_VERSION],
            )?;
        }
        Some(v) if v > SCHEMA_VERSION => {
            return Err(MetaError::Refused(
                ErrorKind::Fatal,
                format!(
                    "database schema {v} is newer than this keyturn understands ({SCHEMA_VERSION})"
                ),
            ));
        }
        Some(_) => {}
    }

    key_check(conn, cipher)?;
    if schema == Some(1) {
        // Values sealed before the stage was bound: re-seal them once, in
        // one transaction with the schema's new number.
        let tx = conn.unchecked_transaction()?;
        let migrated = store::migrate_v1(&tx, cipher)?;
        tx.execute(
            "UPDATE meta SET value = ?1 WHERE name = 'schema'",
            [SCHEMA_VERSION],
        )?;
        tx.commit()?;
        tracing::info!(
            values = migrated,
            "local vault: bound each value to its stage (schema 1 to 2)"
        );
    }
    Ok(())
}

/// Seals the key check on first open; later, refuses a key that does not open it.
fn key_check(conn: &Connection, cipher: &XChaCha20Poly1305) -> Result<(), MetaError> {
    let check: Option<Vec<u8>> = conn
        .query_row("SELECT value FROM meta WHERE name = 'key_check'", [], |r| {
            r.get(0)
        })
        .optional()?;
    match check {
        None => {
            let mut nonce = [0u8; NONCE_LEN];
            OsRng.fill_bytes(&mut nonce);
            let sealed = cipher
                .encrypt(
                    XNonce::from_slice(&nonce),
                    Payload {
                        msg: KEY_CHECK_PLAINTEXT,
                        aad: KEY_CHECK_AAD,
                    },
                )
                .map_err(|_| {
                    MetaError::Refused(ErrorKind::Fatal, "sealing the key check failed".into())
                })?;
            let mut value = nonce.to_vec();
            value.extend_from_slice(&sealed);
            conn.execute(
                "INSERT INTO meta (name, value) VALUES ('key_check', ?1)",
                [value],
            )?;
        }
        Some(value) => {
            if !key_check_opens(&value, cipher) {
                return Err(MetaError::Refused(ErrorKind::Fatal, WRONG_KEY.into()));
            }
        }
    }
    Ok(())
}

const WRONG_KEY: &str = "the key does not open this vault: wrong key file or credential, \
                         or a new key was generated because the old key file went missing";

/// Whether `value`, the sealed key check in `meta`, opens under `cipher`.
fn key_check_opens(value: &[u8], cipher: &XChaCha20Poly1305) -> bool {
    value.len() > NONCE_LEN
        && cipher
            .decrypt(
                XNonce::from_slice(&value[..NONCE_LEN]),
                Payload {
                    msg: &value[NONCE_LEN..],
                    aad: KEY_CHECK_AAD,
                },
            )
            .is_ok_and(|p| p == KEY_CHECK_PLAINTEXT)
}

/// What `read` selects, owned so it can move to the blocking pool.
enum Selector {
    Stage(Stage),
    Version(i64),
}

/// One row as read, before decryption.
struct Row {
    version: i64,
    rotation_id: String,
    stage: String,
    nonce: Option<Vec<u8>>,
    ciphertext: Option<Vec<u8>>,
}

impl Row {
    /// From `SELECT version, rotation_id, stage, nonce, ciphertext`.
    fn from_sql(r: &rusqlite::Row<'_>) -> rusqlite::Result<Row> {
        Ok(Row {
            version: r.get(0)?,
            rotation_id: r.get(1)?,
            stage: r.get(2)?,
            nonce: r.get(3)?,
            ciphertext: r.get(4)?,
        })
    }
}

#[async_trait]
impl Vault for LocalVault {
    /// Black-box finding: a clean stop left every value in `vault.db-wal`,
    /// and a copy of `vault.db` alone (restored as the docs say, the WAL
    /// deleted) was an empty vault. A checkpoint on a connection of its
    /// own (the writer's runs each batch in a transaction) truncates the
    /// WAL into the file.
    async fn close(&self) {
        let path = self.inner.db_path.clone();
        let folded = tokio::task::spawn_blocking(move || {
            let conn = Connection::open_with_flags(
                &path,
                OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
            )?;
            conn.busy_timeout(BUSY_TIMEOUT)?;
            conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
        })
        .await
        .map_err(|e| e.to_string())
        .and_then(|r| r.map_err(|e| e.to_string()));
        if let Err(e) = folded {
            tracing::warn!(vault = %self.inner.name, error = %e, "cannot fold the local vault's WAL into its database at stop; the next start does");
        }
    }
    fn describe(&self) -> &str {
        &self.inner.name
    }

    async fn stage(&self, new: Pending<'_>) -> Result<VersionRef, PluginError> {
        check_path(&self.inner.name, new.item.path)?;
        let (path, rotation, value) = (
            new.item.path.to_owned(),
            new.rotation.clone(),
            new.value.clone(),
        );
        self.write(true, move |inner, tx| {
            inner.stage(tx, &path, &rotation, &value)
        })
        .await
    }

    async fn read(
        &self,
        item: VaultItem<'_>,
        select: Select<'_>,
    ) -> Result<Option<StoredVersion>, PluginError> {
        check_path(&self.inner.name, item.path)?;
        let selector = match select {
            Select::Stage(stage) => Selector::Stage(stage),
            Select::Version(v) => Selector::Version(parse_version(&self.inner.name, item.path, v)?),
        };
        let path = item.path.to_owned();
        self.run(move |inner| inner.read(&path, selector)).await
    }

    async fn promote(&self, item: VaultItem<'_>, version: &VersionRef) -> Result<(), PluginError> {
        check_path(&self.inner.name, item.path)?;
        let version = parse_version(&self.inner.name, item.path, version)?;
        let path = item.path.to_owned();
        self.write(true, move |inner, tx| inner.promote(tx, &path, version))
            .await
    }

    async fn retire(&self, item: VaultItem<'_>, version: &VersionRef) -> Result<(), PluginError> {
        check_path(&self.inner.name, item.path)?;
        let version = parse_version(&self.inner.name, item.path, version)?;
        let path = item.path.to_owned();
        self.write(false, move |inner, tx| inner.retire(tx, &path, version))
            .await
    }

    async fn destroy(&self, item: VaultItem<'_>) -> Result<(), PluginError> {
        check_path(&self.inner.name, item.path)?;
        let path = item.path.to_owned();
        self.write(true, move |inner, tx| inner.destroy(tx, &path))
            .await
    }

    async fn check(&self) -> Result<(), PluginError> {
        self.run(|inner| inner.check()).await
    }
}
