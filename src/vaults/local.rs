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
//! ciphertext to `(path, version, rotation_id)`: a row copied or swapped onto
//! another path or version fails to decrypt instead of yielding the wrong
//! credential. A wrong key or tampered row is an [`ErrorKind::Fatal`] error
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
//! under load they share the fsync. Reads run on a second thread through a
//! second, read-only connection, so they never queue behind a write's fsync
//! (WAL lets readers proceed during a write); one thread, not the blocking
//! pool, because the reads share that one connection anyway and a pool
//! thread per read only added hand-offs. Statements are prepared once and
//! cached.
//!
//! # Key
//! [`load_key`] takes the key from the systemd credential `key_credential` in
//! `$CREDENTIALS_DIRECTORY` when there is one, otherwise from `key_file`,
//! which is created (0600, 64 hex characters) on first start.

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

use super::{Select, StoredVersion, Vault, VaultItem, VaultPlugin, VersionRef};
use crate::config::validate::{Loc, Validator, VaultScope};
use crate::group_commit::{Flow, GroupCommit};
use crate::model::{ErrorKind, PluginError, RotationId, SecretValue, Stage};

/// Bytes of a vault key.
pub const KEY_LEN: usize = 32;
/// Bytes of an XChaCha20-Poly1305 nonce.
const NONCE_LEN: usize = 24;
/// Retired versions whose metadata is kept per path (their values are gone).
pub const RETIRED_KEPT: i64 = 16;
/// The database file inside the vault's directory.
pub const DB_FILE: &str = "vault.db";
/// Schema version this code writes; a newer one is refused.
const SCHEMA_VERSION: i64 = 1;
/// A key file or credential larger than this is certainly not a key; stop
/// reading instead of slurping whatever was put there.
const MAX_KEY_SOURCE: usize = 128;
/// How long a connection waits for the other one's lock (checkpoints).
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);
/// What the key-check record seals; its content does not matter, only that
/// it opens under the key.
const KEY_CHECK_PLAINTEXT: &[u8] = b"keyturn local vault key check";
const KEY_CHECK_AAD: &[u8] = b"keyturn-local-vault/v1/key-check";
/// Domain separation for the per-version associated data.
const VERSION_AAD_PREFIX: &[u8] = b"keyturn-local-vault/v1/version\0";
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

/// The 32-byte vault key. Zeroized on drop; prints as `LocalKey([redacted])`.
#[derive(Clone)]
pub struct LocalKey(Zeroizing<[u8; KEY_LEN]>);

impl LocalKey {
    pub fn from_bytes(bytes: [u8; KEY_LEN]) -> Self {
        Self(Zeroizing::new(bytes))
    }

    /// A fresh key from the OS CSPRNG.
    pub fn generate() -> Self {
        let mut key = Zeroizing::new([0u8; KEY_LEN]);
        OsRng.fill_bytes(&mut *key);
        Self(key)
    }

    fn cipher(&self) -> XChaCha20Poly1305 {
        XChaCha20Poly1305::new((&*self.0).into())
    }
}

impl fmt::Debug for LocalKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("LocalKey([redacted])")
    }
}

/// `[vaults.NAME]` with `type = "local"`. `check` fills in every default,
/// so after it `dir`, `key_file` and `key_credential` are all set.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalConfig {
    /// Default: `<state_dir>/vaults/<name>`.
    pub dir: Option<PathBuf>,
    /// Key file; created 0600 on first start when missing. Default:
    /// `<state_dir>/<name>-vault.key`.
    pub key_file: Option<PathBuf>,
    /// Name of the systemd credential (`LoadCredential=`) holding the key,
    /// used instead of the key file when `$CREDENTIALS_DIRECTORY` holds it.
    /// Default: `keyturn-<name>-vault-key`.
    pub key_credential: Option<String>,
    pub max_concurrent: Option<usize>,
}

impl VaultPlugin for LocalConfig {
    fn check(&mut self, v: &mut Validator<'_>, p: Loc<'_>, scope: &VaultScope<'_>) {
        let name = scope.name;
        match &mut self.dir {
            Some(d) => v.resolve_path(p.key("dir"), d),
            None => self.dir = Some(scope.state_dir.join("vaults").join(name)),
        }
        match &mut self.key_file {
            Some(k) => v.resolve_path(p.key("key_file"), k),
            None => self.key_file = Some(scope.state_dir.join(format!("{name}-vault.key"))),
        }
        let key_credential = self
            .key_credential
            .get_or_insert_with(|| format!("keyturn-{name}-vault-key"));
        // systemd credential names are file names in $CREDENTIALS_DIRECTORY.
        if key_credential.is_empty()
            || key_credential.contains('/')
            || key_credential == "."
            || key_credential == ".."
        {
            v.err(
                p.key("key_credential"),
                format!(
                    "invalid key_credential `{key_credential}`: it names a file in $CREDENTIALS_DIRECTORY, so it must be non-empty and contain no '/'"
                ),
            );
        }
    }

    fn max_concurrent(&self) -> Option<usize> {
        self.max_concurrent
    }

    fn open(&self, name: &str) -> Result<Arc<dyn Vault>, PluginError> {
        let missing = |what: &str| {
            PluginError::new(
                ErrorKind::Invalid,
                format!("local vault {name}: no {what} (the config was not checked)"),
            )
        };
        let dir = self.dir.as_deref().ok_or_else(|| missing("dir"))?;
        let key_file = self
            .key_file
            .as_deref()
            .ok_or_else(|| missing("key_file"))?;
        let key_credential = self
            .key_credential
            .as_deref()
            .ok_or_else(|| missing("key_credential"))?;
        let key = load_key(key_file, key_credential)?;
        Ok(Arc::new(LocalVault::open(name, dir, key)?))
    }

    fn data_dir(&self) -> Option<&Path> {
        self.dir.as_deref()
    }
}

/// Loads the vault key, from `$CREDENTIALS_DIRECTORY/<key_credential>` when
/// systemd passed it, else from `key_file` (created on first start).
pub fn load_key(key_file: &Path, key_credential: &str) -> Result<LocalKey, PluginError> {
    let credentials_dir = std::env::var_os("CREDENTIALS_DIRECTORY").map(PathBuf::from);
    load_key_from(key_file, key_credential, credentials_dir.as_deref())
}

/// [`load_key`] with the credentials directory passed in, so tests never
/// touch the process environment.
pub fn load_key_from(
    key_file: &Path,
    key_credential: &str,
    credentials_dir: Option<&Path>,
) -> Result<LocalKey, PluginError> {
    if let Some(dir) = credentials_dir.filter(|d| !d.as_os_str().is_empty())
        && let Some(key) = read_credential(dir, key_credential)?
    {
        return Ok(key);
    }
    // Two attempts: if another process creates the file between our failed
    // read and our O_EXCL create, the second read picks its key up.
    for _ in 0..2 {
        if let Some(key) = read_key_file(key_file)? {
            return Ok(key);
        }
        if let Some(key) = create_key_file(key_file)? {
            return Ok(key);
        }
    }
    Err(PluginError::new(
        ErrorKind::Transient,
        format!(
            "local vault key file {}: appears and disappears while being read",
            key_file.display()
        ),
    ))
}

/// The key in the systemd credential, or `None` when it is not there.
fn read_credential(dir: &Path, name: &str) -> Result<Option<LocalKey>, PluginError> {
    if name.is_empty() || name == "." || name == ".." || name.contains('/') || name.contains('\0') {
        return Err(PluginError::new(
            ErrorKind::Invalid,
            format!("local vault key_credential {name:?} is not a valid credential name"),
        ));
    }
    let path = dir.join(name);
    let file = match File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(PluginError::io(
                format!("local vault key credential {}", path.display()),
                &e,
            ));
        }
    };
    // systemd owns the credentials directory and its modes; no mode check.
    let raw = read_bounded(file, &path)?;
    parse_key(&raw, &path).map(Some)
}

/// The key in `path`, `None` when the file does not exist. Refuses a symlink,
/// a non-regular file and a file group or others can access.
fn read_key_file(path: &Path) -> Result<Option<LocalKey>, PluginError> {
    let file = match OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
            return Err(PluginError::new(
                ErrorKind::Invalid,
                format!(
                    "local vault key file {} is a symlink; refusing it (point key_file at the real file)",
                    path.display()
                ),
            ));
        }
        Err(e) => {
            return Err(PluginError::io(
                format!("local vault key file {}", path.display()),
                &e,
            ));
        }
    };
    let meta = file
        .metadata()
        .map_err(|e| PluginError::io(format!("local vault key file {}", path.display()), &e))?;
    if !meta.file_type().is_file() {
        return Err(PluginError::new(
            ErrorKind::Invalid,
            format!(
                "local vault key file {} is not a regular file",
                path.display()
            ),
        ));
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(PluginError::new(
            ErrorKind::Invalid,
            format!(
                "local vault key file {} has mode {mode:04o}: group and others must have no access (chmod 600 it)",
                path.display()
            ),
        ));
    }
    let raw = read_bounded(file, path)?;
    parse_key(&raw, path).map(Some)
}

/// Reads at most `MAX_KEY_SOURCE + 1` bytes into a buffer that is zeroized
/// and never reallocated (so no stray copy of the key is left in freed memory).
fn read_bounded(file: File, path: &Path) -> Result<Zeroizing<Vec<u8>>, PluginError> {
    let mut buf = Zeroizing::new(Vec::with_capacity(MAX_KEY_SOURCE + 1));
    file.take(MAX_KEY_SOURCE as u64 + 1)
        .read_to_end(&mut buf)
        .map_err(|e| PluginError::io(format!("local vault key {}", path.display()), &e))?;
    Ok(buf)
}

/// Accepts 32 raw bytes, or 64 hex characters with an optional final newline.
fn parse_key(raw: &[u8], path: &Path) -> Result<LocalKey, PluginError> {
    let mut key = Zeroizing::new([0u8; KEY_LEN]);
    if raw.len() == KEY_LEN {
        key.copy_from_slice(raw);
        return Ok(LocalKey(key));
    }
    let text = raw
        .strip_suffix(b"\r\n")
        .or_else(|| raw.strip_suffix(b"\n"))
        .unwrap_or(raw);
    // The decode error is not shown: it would quote a character of the key.
    if text.len() == 2 * KEY_LEN && hex::decode_to_slice(text, &mut *key).is_ok() {
        return Ok(LocalKey(key));
    }
    let found = if raw.len() > MAX_KEY_SOURCE {
        format!("more than {MAX_KEY_SOURCE} bytes")
    } else {
        format!("{} bytes", raw.len())
    };
    Err(PluginError::new(
        ErrorKind::Invalid,
        format!(
            "local vault key {} has the wrong length or format: expected 32 raw bytes or 64 hex characters, found {found}",
            path.display()
        ),
    ))
}

/// Creates `path` holding a new key as 64 hex characters and a newline, mode
/// 0600, durably. `None` if someone else created the file first.
fn create_key_file(path: &Path) -> Result<Option<LocalKey>, PluginError> {
    let ctx = || format!("local vault key file {}", path.display());
    let parent = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(parent)
        .map_err(|e| PluginError::io(format!("{}: creating its directory", ctx()), &e))?;

    let key = LocalKey::generate();
    let mut text = Zeroizing::new([0u8; 2 * KEY_LEN + 1]);
    hex::encode_to_slice(&key.0[..], &mut text[..2 * KEY_LEN])
        .map_err(|_| PluginError::new(ErrorKind::Fatal, format!("{}: hex encoding", ctx())))?;
    text[2 * KEY_LEN] = b'\n';

    let mut file = match OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return Ok(None),
        Err(e) => return Err(PluginError::io(format!("{}: creating it", ctx()), &e)),
    };
    let written = file
        .write_all(&*text)
        .and_then(|()| file.sync_all())
        .and_then(|()| File::open(parent)?.sync_all());
    if let Err(e) = written {
        // A half-written key file would be refused on every later start;
        // remove it so the next attempt starts clean.
        drop(file);
        let _ = std::fs::remove_file(path);
        return Err(PluginError::io(format!("{}: writing it", ctx()), &e));
    }
    tracing::info!(key_file = %path.display(), "created a new local vault key");
    Ok(Some(key))
}

// ---------------------------------------------------------------------------
// Vault
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

        let inner = Arc::new(Inner {
            name: name.to_owned(),
            db_path,
            cipher,
            reader: Mutex::new(reader),
        });
        let thread_inner = Arc::clone(&inner);
        let writes = GroupCommit::spawn(&format!("vault-{name}"), MAX_BATCH, move |batch| {
            write_batch(&thread_inner, &writer, batch);
            Flow::Continue
        })
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

    /// Queues `op` for the writer thread and waits until its batch committed.
    async fn write<T, F>(&self, op: F) -> Result<T, PluginError>
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
    Ok(())
}

/// The writer thread: one transaction per batch of queued operations, each in
/// its own savepoint, answers sent only after the commit.
/// One batch of writes: one transaction, each operation in its own savepoint
/// (a failing one rolls back alone), answers sent only after the commit.
fn write_batch(inner: &Inner, conn: &Connection, batch: &mut Vec<WriteJob>) {
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
    for WriteJob { op, answer } in batch.drain(..) {
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
            let opens = value.len() > NONCE_LEN
                && cipher
                    .decrypt(
                        XNonce::from_slice(&value[..NONCE_LEN]),
                        Payload {
                            msg: &value[NONCE_LEN..],
                            aad: KEY_CHECK_AAD,
                        },
                    )
                    .is_ok_and(|p| p == KEY_CHECK_PLAINTEXT);
            if !opens {
                return Err(MetaError::Refused(
                    ErrorKind::Fatal,
                    "the key does not open this vault: wrong key file or credential, \
                     or a new key was generated because the old key file went missing"
                        .into(),
                ));
            }
        }
    }
    Ok(())
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

impl Inner {
    fn lock(m: &Mutex<Connection>) -> MutexGuard<'_, Connection> {
        // A panic while holding the lock dropped its transaction, which rolls
        // back: the connection is still consistent, so keep using it.
        m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn err(&self, kind: ErrorKind, op: &str, path: &str, detail: impl fmt::Display) -> PluginError {
        PluginError::new(
            kind,
            format!("local vault {}: {op} {path}: {detail}", self.name),
        )
    }

    fn sql(&self, op: &'static str, path: &str) -> impl Fn(rusqlite::Error) -> PluginError + '_ {
        let path = path.to_owned();
        move |e| self.err(sql_kind(&e), op, &path, e)
    }

    fn seal(
        &self,
        path: &str,
        version: i64,
        rotation: &str,
        value: &SecretValue,
    ) -> Result<(Vec<u8>, Vec<u8>), PluginError> {
        let mut nonce = [0u8; NONCE_LEN];
        OsRng.fill_bytes(&mut nonce);
        let aad = version_aad(path, version, rotation);
        let ciphertext = self
            .cipher
            .encrypt(
                XNonce::from_slice(&nonce),
                Payload {
                    msg: value.expose(),
                    aad: &aad,
                },
            )
            .map_err(|_| {
                self.err(
                    ErrorKind::Fatal,
                    "stage",
                    path,
                    format!("encrypting version {version} failed"),
                )
            })?;
        Ok((nonce.to_vec(), ciphertext))
    }

    fn open_row(&self, path: &str, row: Row) -> Result<Option<StoredVersion>, PluginError> {
        let v = row.version;
        let corrupt = |what: &str| {
            self.err(
                ErrorKind::Fatal,
                "read",
                path,
                format!("version {v} is corrupt: {what}"),
            )
        };
        let stage = Stage::parse(&row.stage).ok_or_else(|| corrupt("unknown stage"))?;
        if stage == Stage::Retired {
            return Ok(None);
        }
        let (Some(nonce), Some(ciphertext)) = (row.nonce, row.ciphertext) else {
            return Err(corrupt("its value is missing"));
        };
        if nonce.len() != NONCE_LEN {
            return Err(corrupt("bad nonce length"));
        }
        let aad = version_aad(path, v, &row.rotation_id);
        let plaintext = self
            .cipher
            .decrypt(
                XNonce::from_slice(&nonce),
                Payload {
                    msg: &ciphertext,
                    aad: &aad,
                },
            )
            .map_err(|_| {
                self.err(
                    ErrorKind::Fatal,
                    "read",
                    path,
                    format!("cannot decrypt version {v}: wrong key, or the row was tampered with or moved"),
                )
            })?;
        Ok(Some(StoredVersion {
            version: VersionRef(v.to_string()),
            rotation: RotationId::parse(&row.rotation_id),
            stage,
            value: SecretValue::new(plaintext),
        }))
    }

    fn stage(
        &self,
        tx: &Connection,
        path: &str,
        rotation: &RotationId,
        value: &SecretValue,
    ) -> Result<VersionRef, PluginError> {
        let sql = self.sql("stage", path);
        let existing: Option<i64> = tx
            .prepare_cached("SELECT version FROM versions WHERE path = ?1 AND rotation_id = ?2")
            .and_then(|mut s| {
                s.query_row(params![path, rotation.as_str()], |r| r.get(0))
                    .optional()
            })
            .map_err(&sql)?;
        if let Some(version) = existing {
            // Idempotent replay: the value stored the first time wins.
            return Ok(VersionRef(version.to_string()));
        }

        // Only one pending per path. Another rotation's pending version is
        // the leftover of a rotation that crashed and was abandoned (the
        // engine never runs two rotations of one credential at once).
        let stale: Vec<i64> = tx
            .prepare_cached(
                "UPDATE versions SET stage = 'retired', nonce = NULL, ciphertext = NULL
                 WHERE path = ?1 AND stage = 'pending' RETURNING version",
            )
            .and_then(|mut s| s.query_map([path], |r| r.get(0))?.collect())
            .map_err(&sql)?;
        for version in &stale {
            tracing::warn!(
                vault = %self.name, path, version, rotation = %rotation,
                "replaced the pending version of an abandoned rotation"
            );
        }

        // max() of both, so a lost counter row can never cause a reuse.
        let version: i64 = tx
            .prepare_cached(
                "SELECT max(coalesce((SELECT last_version FROM paths WHERE path = ?1), 0),
                            coalesce((SELECT max(version) FROM versions WHERE path = ?1), 0)) + 1",
            )
            .and_then(|mut s| s.query_row([path], |r| r.get(0)))
            .map_err(&sql)?;
        tx.prepare_cached(
            "INSERT INTO paths (path, last_version) VALUES (?1, ?2)
             ON CONFLICT (path) DO UPDATE SET last_version = excluded.last_version",
        )
        .and_then(|mut s| s.execute(params![path, version]))
        .map_err(&sql)?;

        let (nonce, ciphertext) = self.seal(path, version, rotation.as_str(), value)?;
        tx.prepare_cached(
            "INSERT INTO versions (path, version, rotation_id, stage, created_at, nonce, ciphertext)
             VALUES (?1, ?2, ?3, 'pending', ?4, ?5, ?6)",
        )
        .and_then(|mut s| {
            s.execute(params![
                path,
                version,
                rotation.as_str(),
                chrono::Utc::now().timestamp_millis(),
                nonce,
                ciphertext
            ])
        })
        .map_err(&sql)?;
        Ok(VersionRef(version.to_string()))
    }

    fn read(&self, path: &str, select: Selector) -> Result<Option<StoredVersion>, PluginError> {
        let sql = self.sql("read", path);
        let conn = Self::lock(&self.reader);
        let map = |r: &rusqlite::Row<'_>| {
            Ok(Row {
                version: r.get(0)?,
                rotation_id: r.get(1)?,
                stage: r.get(2)?,
                nonce: r.get(3)?,
                ciphertext: r.get(4)?,
            })
        };
        let row = match select {
            // Retired versions have no value left to read.
            Selector::Stage(Stage::Retired) => return Ok(None),
            Selector::Stage(stage) => conn
                .prepare_cached(
                    "SELECT version, rotation_id, stage, nonce, ciphertext FROM versions
                     WHERE path = ?1 AND stage = ?2 ORDER BY version DESC LIMIT 1",
                )
                .and_then(|mut s| s.query_row(params![path, stage.as_str()], map).optional()),
            Selector::Version(version) => conn
                .prepare_cached(
                    "SELECT version, rotation_id, stage, nonce, ciphertext FROM versions
                     WHERE path = ?1 AND version = ?2",
                )
                .and_then(|mut s| s.query_row(params![path, version], map).optional()),
        }
        .map_err(&sql)?;
        drop(conn);
        match row {
            Some(row) => self.open_row(path, row),
            None => Ok(None),
        }
    }

    /// The stage of `version`, inside `tx`.
    fn stage_of(
        &self,
        tx: &Connection,
        op: &'static str,
        path: &str,
        version: i64,
    ) -> Result<Option<Stage>, PluginError> {
        let stage: Option<String> = tx
            .prepare_cached("SELECT stage FROM versions WHERE path = ?1 AND version = ?2")
            .and_then(|mut s| s.query_row(params![path, version], |r| r.get(0)).optional())
            .map_err(self.sql(op, path))?;
        stage
            .map(|s| {
                Stage::parse(&s).ok_or_else(|| {
                    self.err(
                        ErrorKind::Fatal,
                        op,
                        path,
                        format!("version {version} is corrupt: unknown stage"),
                    )
                })
            })
            .transpose()
    }

    fn promote(&self, tx: &Connection, path: &str, version: i64) -> Result<(), PluginError> {
        let sql = self.sql("promote", path);
        match self.stage_of(tx, "promote", path, version)? {
            None => {
                return Err(self.err(
                    ErrorKind::NotFound,
                    "promote",
                    path,
                    format!("version {version} does not exist"),
                ));
            }
            Some(Stage::Current) => return Ok(()),
            Some(Stage::Retired) => {
                return Err(self.err(
                    ErrorKind::Conflict,
                    "promote",
                    path,
                    format!(
                        "version {version} is retired (its value is gone); it cannot become current"
                    ),
                ));
            }
            Some(Stage::Pending | Stage::Previous) => {}
        }
        // Order matters: wipe the old previous (unless it is the version being
        // promoted back, a rollback), then shift current → previous, then
        // make `version` current.
        tx.prepare_cached(
            "UPDATE versions SET stage = 'retired', nonce = NULL, ciphertext = NULL
             WHERE path = ?1 AND stage = 'previous' AND version != ?2",
        )
        .and_then(|mut s| s.execute(params![path, version]))
        .map_err(&sql)?;
        tx.prepare_cached(
            "UPDATE versions SET stage = 'previous' WHERE path = ?1 AND stage = 'current'",
        )
        .and_then(|mut s| s.execute([path]))
        .map_err(&sql)?;
        tx.prepare_cached("UPDATE versions SET stage = 'current' WHERE path = ?1 AND version = ?2")
            .and_then(|mut s| s.execute(params![path, version]))
            .map_err(&sql)?;
        prune_retired(tx, path).map_err(&sql)?;
        Ok(())
    }

    fn retire(&self, tx: &Connection, path: &str, version: i64) -> Result<(), PluginError> {
        let sql = self.sql("retire", path);
        match self.stage_of(tx, "retire", path, version)? {
            // Gone (pruned or destroyed) or already retired: nothing to do.
            None | Some(Stage::Retired) => return Ok(()),
            Some(stage @ (Stage::Current | Stage::Pending)) => {
                return Err(self.err(
                    ErrorKind::Invalid,
                    "retire",
                    path,
                    format!(
                        "version {version} is {stage}; only the previous version can be retired"
                    ),
                ));
            }
            Some(Stage::Previous) => {}
        }
        tx.prepare_cached(
            "UPDATE versions SET stage = 'retired', nonce = NULL, ciphertext = NULL
             WHERE path = ?1 AND version = ?2",
        )
        .and_then(|mut s| s.execute(params![path, version]))
        .map_err(&sql)?;
        prune_retired(tx, path).map_err(&sql)?;
        Ok(())
    }

    fn destroy(&self, tx: &Connection, path: &str) -> Result<(), PluginError> {
        let sql = self.sql("destroy", path);
        // secure_delete overwrites the deleted cells; the `paths` counter
        // stays so numbers never repeat.
        tx.prepare_cached("DELETE FROM versions WHERE path = ?1")
            .and_then(|mut s| s.execute([path]))
            .map_err(sql)?;
        Ok(())
    }

    fn check(&self) -> Result<(), PluginError> {
        let conn = Self::lock(&self.reader);
        conn.prepare_cached("SELECT count(*) FROM meta")
            .and_then(|mut s| s.query_row([], |r| r.get::<_, i64>(0)))
            .map_err(|e| {
                PluginError::new(
                    sql_kind(&e),
                    format!(
                        "local vault {}: check {}: {e}",
                        self.name,
                        self.db_path.display()
                    ),
                )
            })?;
        Ok(())
    }
}

/// Keeps the metadata of only the newest `RETIRED_KEPT` retired versions.
fn prune_retired(tx: &Connection, path: &str) -> rusqlite::Result<usize> {
    tx.prepare_cached(
        "DELETE FROM versions WHERE path = ?1 AND stage = 'retired' AND version NOT IN
           (SELECT version FROM versions WHERE path = ?1 AND stage = 'retired'
            ORDER BY version DESC LIMIT ?2)",
    )?
    .execute(params![path, RETIRED_KEPT])
}

/// Associated data for one version: the ciphertext only opens at the path,
/// version and rotation it was sealed for. Length-prefixed, so no two
/// different triples encode alike.
fn version_aad(path: &str, version: i64, rotation: &str) -> Vec<u8> {
    let mut aad = Vec::with_capacity(VERSION_AAD_PREFIX.len() + 24 + path.len() + rotation.len());
    aad.extend_from_slice(VERSION_AAD_PREFIX);
    aad.extend_from_slice(&(path.len() as u64).to_be_bytes());
    aad.extend_from_slice(path.as_bytes());
    aad.extend_from_slice(&version.to_be_bytes());
    aad.extend_from_slice(&(rotation.len() as u64).to_be_bytes());
    aad.extend_from_slice(rotation.as_bytes());
    aad
}

fn sql_kind(e: &rusqlite::Error) -> ErrorKind {
    use rusqlite::ErrorCode as C;
    match e {
        rusqlite::Error::SqliteFailure(f, _) => match f.code {
            C::DatabaseBusy
            | C::DatabaseLocked
            | C::SystemIoFailure
            | C::DiskFull
            | C::OutOfMemory => ErrorKind::Transient,
            C::PermissionDenied | C::ReadOnly | C::CannotOpen => ErrorKind::Unauthorized,
            C::ConstraintViolation => ErrorKind::Conflict,
            _ => ErrorKind::Fatal,
        },
        // Type and conversion errors mean a row does not look like ours.
        _ => ErrorKind::Fatal,
    }
}

/// The path is only a database key here, but a path that would be unsafe in
/// any other vault or as a file name is refused everywhere alike.
fn check_path(vault: &str, path: &str) -> Result<(), PluginError> {
    let bad = |why: &str| {
        PluginError::new(
            ErrorKind::Invalid,
            format!("local vault {vault}: path {path:?} {why}"),
        )
    };
    if path.is_empty() {
        return Err(bad("is empty"));
    }
    if path.len() > MAX_PATH_LEN {
        return Err(bad("is too long"));
    }
    if path.starts_with('/') {
        return Err(bad("is absolute"));
    }
    if path.chars().any(|c| c.is_control()) {
        return Err(bad("contains control characters"));
    }
    if path
        .split('/')
        .any(|c| c.is_empty() || c == "." || c == "..")
    {
        return Err(bad("has an empty, '.' or '..' component"));
    }
    Ok(())
}

/// The decimal version number of a [`VersionRef`]; only canonical numbers
/// this vault could have handed out are accepted.
fn parse_version(vault: &str, path: &str, v: &VersionRef) -> Result<i64, PluginError> {
    match v.0.parse::<i64>() {
        Ok(n) if n >= 1 && n.to_string() == v.0 => Ok(n),
        _ => Err(PluginError::new(
            ErrorKind::Invalid,
            format!(
                "local vault {vault}: {path}: {:?} is not a local vault version number",
                v.0
            ),
        )),
    }
}

#[async_trait]
impl Vault for LocalVault {
    fn describe(&self) -> &str {
        &self.inner.name
    }

    async fn stage(
        &self,
        item: VaultItem<'_>,
        rotation: &RotationId,
        value: &SecretValue,
    ) -> Result<VersionRef, PluginError> {
        check_path(&self.inner.name, item.path)?;
        let (path, rotation, value) = (item.path.to_owned(), rotation.clone(), value.clone());
        self.write(move |inner, tx| inner.stage(tx, &path, &rotation, &value))
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
        self.write(move |inner, tx| inner.promote(tx, &path, version))
            .await
    }

    async fn retire(&self, item: VaultItem<'_>, version: &VersionRef) -> Result<(), PluginError> {
        check_path(&self.inner.name, item.path)?;
        let version = parse_version(&self.inner.name, item.path, version)?;
        let path = item.path.to_owned();
        self.write(move |inner, tx| inner.retire(tx, &path, version))
            .await
    }

    async fn destroy(&self, item: VaultItem<'_>) -> Result<(), PluginError> {
        check_path(&self.inner.name, item.path)?;
        let path = item.path.to_owned();
        self.write(move |inner, tx| inner.destroy(tx, &path)).await
    }

    async fn check(&self) -> Result<(), PluginError> {
        self.run(|inner| inner.check()).await
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;
    use crate::model::{AgentId, CredentialId, CredentialKey};

    const KEY: [u8; KEY_LEN] = [7u8; KEY_LEN];

    fn cred() -> CredentialKey {
        CredentialKey::new(
            AgentId::new("bot").unwrap(),
            CredentialId::new("db").unwrap(),
        )
    }

    fn item<'a>(key: &'a CredentialKey, path: &'a str) -> VaultItem<'a> {
        VaultItem { key, path }
    }

    fn open(dir: &Path) -> LocalVault {
        LocalVault::open("test", dir, LocalKey::from_bytes(KEY)).unwrap()
    }

    fn secret(s: &str) -> SecretValue {
        SecretValue::from_string(s.to_owned())
    }

    fn v(n: u64) -> VersionRef {
        VersionRef(n.to_string())
    }

    async fn by_stage(vault: &LocalVault, path: &str, stage: Stage) -> Option<(String, Vec<u8>)> {
        let c = cred();
        vault
            .read(item(&c, path), Select::Stage(stage))
            .await
            .unwrap()
            .map(|s| (s.version.0, s.value.expose().to_vec()))
    }

    fn raw_db(dir: &Path) -> Connection {
        Connection::open(dir.join(DB_FILE)).unwrap()
    }

    /// Stages and promotes `times` rotations of `it`, versions 1 to `times`.
    async fn rotate(vault: &LocalVault, it: VaultItem<'_>, times: u64) {
        for n in 1..=times {
            vault
                .stage(it, &RotationId::generate(), &secret("x"))
                .await
                .unwrap();
            vault.promote(it, &v(n)).await.unwrap();
        }
    }

    async fn contract_subject() -> (LocalVault, String, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        (open(dir.path()), "agents/bot/db".to_owned(), dir)
    }

    crate::vaults::contract::vault_contract!(open = contract_subject);

    // The contract suite checks stages, replays, retire and destroy through
    // the trait; the tests below check what it cannot see (the rows) and
    // what is this vault's own (its error kinds and messages, numbering).

    #[tokio::test]
    async fn retired_values_leave_no_ciphertext_in_their_row() {
        let dir = tempfile::tempdir().unwrap();
        let vault = open(dir.path());
        let c = cred();
        let it = item(&c, "agents/bot/db");
        rotate(&vault, it, 3).await;
        // Version 1 was retired by the third promote, version 2 by retire.
        vault.retire(it, &v(2)).await.unwrap();
        let raw = raw_db(dir.path());
        for version in [1, 2] {
            let (stage, nonce, ct): (String, Option<Vec<u8>>, Option<Vec<u8>>) = raw
                .query_row(
                    "SELECT stage, nonce, ciphertext FROM versions WHERE version = ?1",
                    [version],
                    |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
                )
                .unwrap();
            assert_eq!(stage, "retired", "version {version}");
            assert!(nonce.is_none() && ct.is_none(), "version {version}");
        }
    }

    #[tokio::test]
    async fn a_stage_replay_adds_no_row() {
        let dir = tempfile::tempdir().unwrap();
        let vault = open(dir.path());
        let c = cred();
        let it = item(&c, "p");
        let r1 = RotationId::generate();
        vault.stage(it, &r1, &secret("first")).await.unwrap();
        vault.stage(it, &r1, &secret("second")).await.unwrap();
        vault.promote(it, &v(1)).await.unwrap();
        vault.stage(it, &r1, &secret("third")).await.unwrap();
        let rows: i64 = raw_db(dir.path())
            .query_row("SELECT count(*) FROM versions", [], |r| r.get(0))
            .unwrap();
        assert_eq!(rows, 1);
    }

    #[tokio::test]
    async fn an_abandoned_version_is_a_conflict_to_promote_and_its_replay_finds_it() {
        let dir = tempfile::tempdir().unwrap();
        let vault = open(dir.path());
        let c = cred();
        let it = item(&c, "p");
        let (r1, r2) = (RotationId::generate(), RotationId::generate());
        assert_eq!(vault.stage(it, &r1, &secret("old")).await.unwrap(), v(1));
        assert_eq!(vault.stage(it, &r2, &secret("new")).await.unwrap(), v(2));
        let e = vault.promote(it, &v(1)).await.unwrap_err();
        assert_eq!(e.kind, ErrorKind::Conflict, "{e}");
        // The abandoned rotation's replay finds its (retired) version, never a new one.
        assert_eq!(vault.stage(it, &r1, &secret("again")).await.unwrap(), v(1));
        assert_eq!(by_stage(&vault, "p", Stage::Pending).await.unwrap().0, "2");
    }

    #[tokio::test]
    async fn promote_names_an_unknown_version_and_refuses_malformed_ones() {
        let dir = tempfile::tempdir().unwrap();
        let vault = open(dir.path());
        let c = cred();
        let it = item(&c, "p");
        let e = vault.promote(it, &v(99)).await.unwrap_err();
        assert_eq!(e.kind, ErrorKind::NotFound);
        assert!(
            e.message.contains("version 99") && e.message.contains("p"),
            "{e}"
        );
        for junk in ["abc", "0", "-1", "01", "+2", ""] {
            let e = vault
                .promote(it, &VersionRef(junk.into()))
                .await
                .unwrap_err();
            assert_eq!(e.kind, ErrorKind::Invalid, "{junk:?}");
        }
    }

    #[tokio::test]
    async fn destroy_deletes_the_rows_and_numbers_go_on() {
        let dir = tempfile::tempdir().unwrap();
        let vault = open(dir.path());
        let c = cred();
        let it = item(&c, "p");
        rotate(&vault, it, 3).await;
        vault
            .stage(it, &RotationId::generate(), &secret("y"))
            .await
            .unwrap();
        vault.destroy(it).await.unwrap();
        let rows: i64 = raw_db(dir.path())
            .query_row("SELECT count(*) FROM versions WHERE path = 'p'", [], |r| {
                r.get(0)
            })
            .unwrap();
        assert_eq!(rows, 0);
        assert_eq!(
            vault
                .stage(it, &RotationId::generate(), &secret("z"))
                .await
                .unwrap(),
            v(5)
        );
    }

    #[tokio::test]
    async fn retired_history_is_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let vault = open(dir.path());
        let c = cred();
        let it = item(&c, "p");
        rotate(&vault, it, 40).await;
        let rows: i64 = raw_db(dir.path())
            .query_row("SELECT count(*) FROM versions", [], |r| r.get(0))
            .unwrap();
        assert_eq!(rows, RETIRED_KEPT + 2);
        assert_eq!(by_stage(&vault, "p", Stage::Current).await.unwrap().0, "40");
    }

    #[tokio::test]
    async fn values_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let c = cred();
        let it = item(&c, "p");
        {
            let vault = open(dir.path());
            vault
                .stage(it, &RotationId::generate(), &secret("durable"))
                .await
                .unwrap();
        }
        let vault = open(dir.path());
        assert_eq!(
            by_stage(&vault, "p", Stage::Pending).await.unwrap().1,
            b"durable"
        );
    }

    #[tokio::test]
    async fn values_are_encrypted_at_rest() {
        let tmp = tempfile::tempdir().unwrap();
        // A directory the vault creates itself, to check its mode too.
        let vdir = tmp.path().join("vaults/local");
        let vault = open(&vdir);
        let c = cred();
        let canary = "canary-7d1f0b9e-not-in-any-file";
        let path = "agents/bot/canary-path";
        let it = item(&c, path);
        vault
            .stage(it, &RotationId::generate(), &secret(canary))
            .await
            .unwrap();
        vault.promote(it, &v(1)).await.unwrap();
        assert_eq!(
            by_stage(&vault, path, Stage::Current).await.unwrap().1,
            canary.as_bytes()
        );

        let mut all = Vec::new();
        for f in std::fs::read_dir(&vdir).unwrap() {
            let f = f.unwrap();
            let mode = f.metadata().unwrap().permissions().mode() & 0o777;
            assert_eq!(mode & 0o077, 0, "{:?} is {mode:o}", f.file_name());
            all.extend(std::fs::read(f.path()).unwrap());
        }
        let find = |needle: &[u8]| all.windows(needle.len()).any(|w| w == needle);
        // The scan does see the data (the path is stored in clear)...
        assert!(
            find(path.as_bytes()),
            "scan did not see the path: scanning the wrong files?"
        );
        // ...but never the value.
        assert!(!find(canary.as_bytes()));
        assert!(!find(&canary.as_bytes()[..12]));
        let mode = std::fs::metadata(&vdir).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
    }

    #[tokio::test]
    async fn wrong_key_is_fatal_and_names_the_vault() {
        let dir = tempfile::tempdir().unwrap();
        open(dir.path());
        let e =
            LocalVault::open("test", dir.path(), LocalKey::from_bytes([8u8; KEY_LEN])).unwrap_err();
        assert_eq!(e.kind, ErrorKind::Fatal);
        assert!(
            e.message.contains("local vault test") && e.message.contains("key"),
            "{e}"
        );
    }

    #[tokio::test]
    async fn wrong_key_on_a_row_is_fatal_naming_path_and_version() {
        let dir = tempfile::tempdir().unwrap();
        let c = cred();
        open(dir.path())
            .stage(item(&c, "p"), &RotationId::generate(), &secret("x"))
            .await
            .unwrap();
        // Without the key check (an old or damaged file), a wrong key still
        // cannot read anything: each row fails on its own.
        raw_db(dir.path())
            .execute("DELETE FROM meta WHERE name = 'key_check'", [])
            .unwrap();
        let vault =
            LocalVault::open("test", dir.path(), LocalKey::from_bytes([9u8; KEY_LEN])).unwrap();
        let e = vault
            .read(item(&c, "p"), Select::Version(&v(1)))
            .await
            .unwrap_err();
        assert_eq!(e.kind, ErrorKind::Fatal);
        assert!(
            e.message.contains("p") && e.message.contains("version 1"),
            "{e}"
        );
    }

    #[tokio::test]
    async fn tampered_swapped_or_corrupt_rows_are_fatal_not_panics() {
        let dir = tempfile::tempdir().unwrap();
        let vault = open(dir.path());
        let c = cred();
        for path in ["a", "b", "c", "d", "e"] {
            vault
                .stage(item(&c, path), &RotationId::generate(), &secret(path))
                .await
                .unwrap();
        }
        let raw = raw_db(dir.path());
        // a: one flipped ciphertext bit.
        raw.execute(
            "UPDATE versions SET ciphertext = (SELECT ciphertext FROM versions WHERE path = 'a') || x'00' WHERE path = 'a'",
            [],
        )
        .unwrap();
        // b: c's sealed value moved onto b.
        raw.execute(
            "UPDATE versions SET (nonce, ciphertext) = (SELECT nonce, ciphertext FROM versions WHERE path = 'c') WHERE path = 'b'",
            [],
        )
        .unwrap();
        // c: nonce of the wrong length (would panic in XNonce::from_slice).
        raw.execute("UPDATE versions SET nonce = x'0102' WHERE path = 'c'", [])
            .unwrap();
        // d: value missing on a live row.
        raw.execute("UPDATE versions SET ciphertext = NULL WHERE path = 'd'", [])
            .unwrap();
        // e: a version column that is not a number, and columns of the wrong type.
        raw.execute(
            "UPDATE versions SET version = 'x', nonce = 'text', ciphertext = 42 WHERE path = 'e'",
            [],
        )
        .unwrap();
        drop(raw);
        for path in ["a", "b", "c", "d", "e"] {
            let e = vault
                .read(item(&c, path), Select::Stage(Stage::Pending))
                .await
                .unwrap_err();
            assert_eq!(e.kind, ErrorKind::Fatal, "{path}: {e}");
            assert!(e.message.contains(path), "{e}");
        }
        // The vault keeps working for healthy rows.
        vault
            .stage(item(&c, "f"), &RotationId::generate(), &secret("f"))
            .await
            .unwrap();
        assert_eq!(by_stage(&vault, "f", Stage::Pending).await.unwrap().1, b"f");
        vault.check().await.unwrap();
    }

    #[tokio::test]
    async fn unsafe_paths_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let vault = open(dir.path());
        let c = cred();
        for path in ["", "/abs", "a/../b", "..", "a//b", "a/", "./a", "a\nb"] {
            let e = vault
                .stage(item(&c, path), &RotationId::generate(), &secret("x"))
                .await
                .unwrap_err();
            assert_eq!(e.kind, ErrorKind::Invalid, "{path:?}");
            let e = vault.destroy(item(&c, path)).await.unwrap_err();
            assert_eq!(e.kind, ErrorKind::Invalid, "{path:?}");
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_stages_on_many_paths() {
        let dir = tempfile::tempdir().unwrap();
        let vault = open(dir.path());
        let tasks: Vec<_> = (0..64)
            .map(|i| {
                let vault = vault.clone();
                tokio::spawn(async move {
                    let c = cred();
                    let path = format!("agents/a{i}/db");
                    let it = item(&c, &path);
                    let r = RotationId::generate();
                    let ver = vault
                        .stage(it, &r, &secret(&format!("v{i}")))
                        .await
                        .unwrap();
                    vault.promote(it, &ver).await.unwrap();
                    let got = vault
                        .read(it, Select::Stage(Stage::Current))
                        .await
                        .unwrap()
                        .unwrap();
                    assert_eq!(got.value.expose(), format!("v{i}").as_bytes());
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        vault.check().await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failing_write_does_not_spoil_its_batch() {
        let dir = tempfile::tempdir().unwrap();
        let vault = open(dir.path());
        // Interleave good stages with promotes that must fail, so they share
        // group-commit batches.
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..100 {
            let vault = vault.clone();
            tasks.spawn(async move {
                let c = cred();
                let path = format!("p{i}");
                let it = item(&c, &path);
                if i % 2 == 0 {
                    vault
                        .stage(it, &RotationId::generate(), &secret(&path))
                        .await
                        .map(|_| ())
                } else {
                    vault.promote(it, &v(7)).await
                }
            });
        }
        let mut results = Vec::new();
        while let Some(r) = tasks.join_next().await {
            results.push(r.unwrap());
        }
        assert_eq!(results.iter().filter(|r| r.is_ok()).count(), 50);
        assert!(
            results
                .iter()
                .filter_map(|r| r.as_ref().err())
                .all(|e| e.kind == ErrorKind::NotFound)
        );
        for i in (0..100).step_by(2) {
            let path = format!("p{i}");
            assert_eq!(
                by_stage(&vault, &path, Stage::Pending).await.unwrap().1,
                path.as_bytes()
            );
        }
    }

    #[test]
    fn key_file_is_created_0600_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let key_file = dir.path().join("sub/vault.key");
        let k1 = load_key_from(&key_file, "vault-key", None).unwrap();
        let meta = std::fs::metadata(&key_file).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        let text = std::fs::read_to_string(&key_file).unwrap();
        assert_eq!(text.len(), 65);
        assert!(text[..64].bytes().all(|b| b.is_ascii_hexdigit()) && text.ends_with('\n'));
        let k2 = load_key_from(&key_file, "vault-key", None).unwrap();
        assert_eq!(*k1.0, *k2.0);
        assert_ne!(*k1.0, [0u8; KEY_LEN]);
        // And a vault opened with it opens again with the reloaded key.
        let vdir = dir.path().join("v");
        LocalVault::open("t", &vdir, k1).unwrap();
        LocalVault::open(
            "t",
            &vdir,
            load_key_from(&key_file, "vault-key", None).unwrap(),
        )
        .unwrap();
    }

    #[test]
    fn unsafe_key_files_are_refused_with_the_file_named() {
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("good.key");
        std::fs::write(&good, hex::encode(KEY)).unwrap();
        std::fs::set_permissions(&good, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(*load_key_from(&good, "k", None).unwrap().0, KEY);

        let readable = dir.path().join("readable.key");
        std::fs::write(&readable, hex::encode(KEY)).unwrap();
        std::fs::set_permissions(&readable, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = load_key_from(&readable, "k", None).unwrap_err();
        assert_eq!(e.kind, ErrorKind::Invalid);
        assert!(
            e.message.contains("readable.key") && e.message.contains("0644"),
            "{e}"
        );

        let group = dir.path().join("group.key");
        std::fs::write(&group, KEY).unwrap();
        std::fs::set_permissions(&group, std::fs::Permissions::from_mode(0o640)).unwrap();
        assert_eq!(
            load_key_from(&group, "k", None).unwrap_err().kind,
            ErrorKind::Invalid
        );

        let link = dir.path().join("link.key");
        std::os::unix::fs::symlink(&good, &link).unwrap();
        let e = load_key_from(&link, "k", None).unwrap_err();
        assert_eq!(e.kind, ErrorKind::Invalid);
        assert!(
            e.message.contains("link.key") && e.message.contains("symlink"),
            "{e}"
        );

        for (name, content) in [
            ("short.key", b"abcdef".to_vec()),
            ("long.key", vec![b'a'; 1000]),
            ("nothex.key", vec![b'z'; 64]),
            ("empty.key", Vec::new()),
        ] {
            let p = dir.path().join(name);
            std::fs::write(&p, &content).unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
            let e = load_key_from(&p, "k", None).unwrap_err();
            assert_eq!(e.kind, ErrorKind::Invalid, "{name}");
            assert!(e.message.contains(name), "{e}");
            // Nothing of the file's content is echoed.
            assert!(
                !e.message.contains("zzzz") && !e.message.contains("aaaa"),
                "{e}"
            );
        }
    }

    #[test]
    fn credentials_directory_wins_over_the_key_file() {
        let dir = tempfile::tempdir().unwrap();
        let creds = dir.path().join("creds");
        std::fs::create_dir(&creds).unwrap();
        let key_file = dir.path().join("vault.key");

        // Raw 32 bytes.
        std::fs::write(creds.join("vault-key"), KEY).unwrap();
        let k = load_key_from(&key_file, "vault-key", Some(&creds)).unwrap();
        assert_eq!(*k.0, KEY);
        assert!(
            !key_file.exists(),
            "the key file must not be created when the credential is there"
        );

        // 64 hex characters and a newline.
        let other = [3u8; KEY_LEN];
        std::fs::write(creds.join("hex-key"), format!("{}\n", hex::encode(other))).unwrap();
        assert_eq!(
            *load_key_from(&key_file, "hex-key", Some(&creds)).unwrap().0,
            other
        );

        // Credential absent: falls back to (and creates) the key file.
        let k = load_key_from(&key_file, "missing", Some(&creds)).unwrap();
        assert!(key_file.exists());
        assert_ne!(*k.0, KEY);

        // A bad credential is an error, not a silent fallback.
        std::fs::write(creds.join("bad"), b"nope").unwrap();
        let e = load_key_from(&key_file, "bad", Some(&creds)).unwrap_err();
        assert_eq!(e.kind, ErrorKind::Invalid);
        assert!(e.message.contains("bad"), "{e}");
        let e = load_key_from(&key_file, "../vault.key", Some(&creds)).unwrap_err();
        assert_eq!(e.kind, ErrorKind::Invalid);
    }

    /// Throughput table, not an assertion: `KT_BENCH_N=100000 cargo test --lib
    /// vaults::local::tests::bench -- --ignored --nocapture`. Each credential
    /// is staged, promoted and read back, `KT_BENCH_CONCURRENCY` at a time.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "benchmark; run by hand"]
    async fn bench_stage_promote_read() {
        let n: usize = std::env::var("KT_BENCH_N")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(10_000);
        let conc: usize = std::env::var("KT_BENCH_CONCURRENCY")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(32);
        let dir =
            tempfile::tempdir_in(std::env::var("KT_BENCH_DIR").unwrap_or_else(|_| ".".into()))
                .unwrap();
        let vault = open(dir.path());
        let sem = Arc::new(tokio::sync::Semaphore::new(conc));
        println!("| phase | credentials | seconds | ops/s |");
        println!("|---|---|---|---|");
        for phase in ["stage", "promote", "read current"] {
            let start = std::time::Instant::now();
            let mut tasks = tokio::task::JoinSet::new();
            for i in 0..n {
                let (vault, sem) = (vault.clone(), sem.clone());
                tasks.spawn(async move {
                    let _permit = sem.acquire().await.unwrap();
                    let c = cred();
                    let path = format!("agents/a{i}/db");
                    let it = item(&c, &path);
                    match phase {
                        "stage" => {
                            vault
                                .stage(
                                    it,
                                    &RotationId::generate(),
                                    &secret("0123456789abcdef0123456789abcdef"),
                                )
                                .await
                                .unwrap();
                        }
                        "promote" => vault.promote(it, &v(1)).await.unwrap(),
                        _ => assert!(
                            vault
                                .read(it, Select::Stage(Stage::Current))
                                .await
                                .unwrap()
                                .is_some()
                        ),
                    }
                });
            }
            while let Some(r) = tasks.join_next().await {
                r.unwrap();
            }
            let secs = start.elapsed().as_secs_f64();
            println!("| {phase} | {n} | {secs:.2} | {:.0} |", n as f64 / secs);
        }
        let size = std::fs::metadata(dir.path().join(DB_FILE)).unwrap().len();
        println!("vault.db: {} KiB", size / 1024);
    }

    #[test]
    fn key_debug_is_redacted() {
        let k = LocalKey::from_bytes(KEY);
        let s = format!("{k:?}");
        assert_eq!(s, "LocalKey([redacted])");
        let dir = tempfile::tempdir().unwrap();
        let vault = LocalVault::open("t", dir.path(), k).unwrap();
        assert!(!format!("{vault:?}").contains("07"));
    }
}
