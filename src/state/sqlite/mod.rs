//! The embedded SQLite state store (the default [`StateStore`]).
//!
//! One database file under the state directory, in WAL mode, behind a
//! `Mutex<Connection>`: the engine calls the store from blocking context and a
//! single connection keeps every write serialised without SQLite-level
//! contention. CLI commands that only inspect state open it with
//! [`SqliteStore::open_read_only`] while the daemon keeps running; WAL lets
//! them read without blocking the daemon's writes.
//!
//! # Durability
//! `synchronous=NORMAL` in WAL mode: a committed transaction is in the WAL
//! file before `apply` returns, so it survives the process being killed at any
//! point (`kill -9`, a panic, the OOM killer) — the failure the crash tests
//! exercise. What it does *not* promise is survival of a power loss or kernel
//! crash: the WAL is fsynced only at checkpoints, so the last few commits can
//! roll back. That is safe for keyturn because every rotation step is
//! idempotent and keyed by the rotation id: state that is *behind* reality is
//! replayed to the same end state, and the audit log (fsynced before any
//! head of it is stored here)
//! stays the record of what happened. `FULL` would cost an fsync per step.
//!
//! # Schema
//! The tables and the migrations that build them are in `schema.rs`.
//! Timestamps are stored as `INTEGER` unix milliseconds (the engine truncates
//! its timestamps to milliseconds; anything finer is dropped on write).
//! Secret values never reach this database: no table has a column for one.
//!
//! # Layout
//! - `mod.rs`: [`SqliteStore`]: opening, connection settings, the writes
//!   (one transaction per `apply`, savepoints per group in `apply_batch`) and
//!   the reads of [`StateStore`];
//! - `schema.rs`: the migrations and [`SCHEMA_VERSION`];
//! - `rows.rs`: column lists, row decoding (bad rows are `Corrupt`) and the
//!   encodings the writes use.

use std::path::Path;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use rusqlite::{Connection, OpenFlags, OptionalExtension, Row, TransactionBehavior, params};

use super::{
    AckRow, AuditHead, CredentialRow, DecommissionRow, Result, RevocationRow, RotationRow,
    Snapshot, StateError, StateStore, VersionRow, Write,
};
use crate::model::{AgentId, CredentialKey, RotationId, Stage, VersionNo};
use crate::private_file;

mod rows;
mod schema;

use rows::{
    ACK_COLS, CREDENTIAL_COLS, Decode, ROTATION_COLS, VERSION_COLS, decode_ack, decode_agent,
    decode_credential, decode_decommission, decode_floor, decode_holding, decode_request,
    decode_revocation, decode_rotation, decode_version, to_json, to_millis,
};
pub use schema::SCHEMA_VERSION;

/// The WAL is checkpointed into the database every this many pages (1 MiB
/// at SQLite's 4 KiB pages) instead of SQLite's default 1000, and cut back to
/// [`WAL_SIZE_LIMIT`] after a checkpoint, where SQLite's default leaves it at
/// its largest for good: each WAL of the state directory then stays near
/// 1 MiB instead of ~4 MiB, which on a small volume was enough to fill it.
/// Shared with the local vault.
pub const WAL_CHECKPOINT_PAGES: i64 = 256;
pub const WAL_SIZE_LIMIT: i64 = 1 << 20;

pub struct SqliteStore {
    conn: Mutex<Connection>,
    /// For error messages.
    path: String,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl SqliteStore {
    /// Opens (creating if missing) the database read-write and migrates it to
    /// [`SCHEMA_VERSION`]. The parent directory is created 0700 and the file
    /// 0600; SQLite gives the `-wal`/`-shm` files the database file's mode.
    pub fn open(path: &Path) -> Result<SqliteStore> {
        let display = path.display().to_string();
        let io_err = |what: &str, e: std::io::Error| StateError::Db {
            path: display.clone(),
            message: format!("{what}: {e}"),
        };
        private_file::create_parent(path).map_err(|e| io_err("cannot create its directory", e))?;
        // Create the file ourselves so its mode is 0600 from the first byte,
        // whatever the process umask is. An existing file is left as it is.
        private_file::open_options()
            .read(true)
            .write(true)
            .truncate(false)
            .open(path)
            .map_err(|e| io_err("cannot create", e))?;

        let store = Self::connect(path, false)?;
        store.migrate()?;
        Ok(store)
    }

    /// Opens an existing database for reading only (CLI `status` and friends
    /// while the daemon runs). Never migrates: a database at another schema
    /// version is refused, telling which side must be upgraded.
    pub fn open_read_only(path: &Path) -> Result<SqliteStore> {
        let store = Self::connect(path, true)?;
        let found = store.user_version()?;
        if found > SCHEMA_VERSION {
            return Err(store.too_new(found));
        }
        if found < SCHEMA_VERSION {
            return Err(StateError::Db {
                path: store.path.clone(),
                message: format!(
                    "schema version {found} is older than this keyturn ({SCHEMA_VERSION}); \
                     start the daemon once to migrate it"
                ),
            });
        }
        Ok(store)
    }

    pub fn path(&self) -> &str {
        &self.path
    }

    /// SQLite's `PRAGMA integrity_check`, refused unless it answers `ok`.
    /// Black-box finding: a damaged state database (a page or an index
    /// out of step with its table) was accepted at start, and the daemon
    /// wrote a second row for a credential through the damaged index. The
    /// daemon checks once at start; the cost is a read of the whole file.
    pub fn check_integrity(&self) -> Result<()> {
        let conn = self.lock();
        let found: rusqlite::Result<Vec<String>> = conn
            .prepare("PRAGMA integrity_check(10)")
            .and_then(|mut st| st.query_map([], |r| r.get(0))?.collect());
        match found {
            Ok(rows) if rows.len() == 1 && rows[0] == "ok" => Ok(()),
            Ok(rows) => Err(StateError::Db {
                path: self.path.clone(),
                message: format!(
                    "the database is damaged (malformed: SQLite's integrity check says: {})",
                    rows.join("; ")
                ),
            }),
            Err(e) => Err(self.err(e)),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding the lock cannot leave a half-applied write:
        // an open rusqlite Transaction rolls back when dropped during unwinding.
        self.conn
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn err(&self, e: rusqlite::Error) -> StateError {
        db_err(&self.path, e)
    }

    /// [`err`](Self::err) for an error that several callers are told about.
    fn err_ref(&self, e: &rusqlite::Error) -> StateError {
        StateError::Db {
            path: self.path.clone(),
            message: e.to_string(),
        }
    }

    fn too_new(&self, found: i64) -> StateError {
        StateError::TooNew {
            path: self.path.clone(),
            found,
            supported: SCHEMA_VERSION,
        }
    }

    /// Opens the connection both [`open`](Self::open) and
    /// [`open_read_only`](Self::open_read_only) use, with the settings every
    /// connection needs (and, read-write, WAL mode).
    fn connect(path: &Path, read_only: bool) -> Result<SqliteStore> {
        let display = path.display().to_string();
        let access = if read_only {
            OpenFlags::SQLITE_OPEN_READ_ONLY
        } else {
            OpenFlags::SQLITE_OPEN_READ_WRITE
        };
        let conn = Connection::open_with_flags(path, access | OpenFlags::SQLITE_OPEN_NO_MUTEX)
            .map_err(|e| db_err(&display, e))?;
        let store = SqliteStore {
            conn: Mutex::new(conn),
            path: display,
        };
        store.configure(read_only)?;
        Ok(store)
    }

    fn configure(&self, read_only: bool) -> Result<()> {
        let conn = self.lock();
        conn.busy_timeout(Duration::from_secs(5))
            .map_err(|e| self.err(e))?;
        conn.set_prepared_statement_cache_capacity(32);
        conn.pragma_update(None, "foreign_keys", true)
            .map_err(|e| self.err(e))?;
        if !read_only {
            // journal_mode returns the resulting mode as a row.
            let mode: String = conn
                .pragma_update_and_check(None, "journal_mode", "wal", |r| r.get(0))
                .map_err(|e| self.err(e))?;
            if !mode.eq_ignore_ascii_case("wal") {
                return Err(StateError::Db {
                    path: self.path.clone(),
                    message: format!("cannot switch to WAL journal mode (got {mode})"),
                });
            }
            conn.pragma_update(None, "synchronous", "NORMAL")
                .map_err(|e| self.err(e))?;
            // Bound the WAL (see `WAL_CHECKPOINT_PAGES`).
            conn.pragma_update(None, "wal_autocheckpoint", WAL_CHECKPOINT_PAGES)
                .map_err(|e| self.err(e))?;
            conn.pragma_update(None, "journal_size_limit", WAL_SIZE_LIMIT)
                .map_err(|e| self.err(e))?;
        }
        Ok(())
    }

    fn write_one(&self, tx: &Connection, w: &Write) -> Result<()> {
        let e = |e| self.err(e);
        match w {
            Write::Credential(c) => {
                let mut st = tx
                    .prepare_cached(
                        "INSERT INTO credentials (agent, credential, current_version, \
                         last_rotated_at, next_due, consecutive_failures, last_error, \
                         failing_since) \
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8) \
                         ON CONFLICT (agent, credential) DO UPDATE SET \
                         current_version = excluded.current_version, \
                         last_rotated_at = excluded.last_rotated_at, \
                         next_due = excluded.next_due, \
                         consecutive_failures = excluded.consecutive_failures, \
                         last_error = excluded.last_error, \
                         failing_since = excluded.failing_since",
                    )
                    .map_err(e)?;
                st.execute(params![
                    c.key.agent.as_str(),
                    c.key.credential.as_str(),
                    c.current_version.map(|v| self.ver_to_sql(v)).transpose()?,
                    c.last_rotated_at.map(to_millis),
                    c.next_due.map(to_millis),
                    i64::from(c.consecutive_failures),
                    c.last_error,
                    c.failing_since.map(to_millis),
                ])
                .map_err(e)?;
            }
            Write::Rotation(r) => {
                let mut st = tx
                    .prepare_cached(
                        "INSERT INTO rotations (id, agent, credential, step, \"trigger\", \
                         version, vault_version, previous_version, previous_vault_version, \
                         started_at, updated_at, retire_at, attempts, last_error, footprint, \
                         start_record_after) \
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, \
                         ?16) \
                         ON CONFLICT (id) DO UPDATE SET \
                         agent = excluded.agent, credential = excluded.credential, \
                         step = excluded.step, \"trigger\" = excluded.\"trigger\", \
                         version = excluded.version, vault_version = excluded.vault_version, \
                         previous_version = excluded.previous_version, \
                         previous_vault_version = excluded.previous_vault_version, \
                         started_at = excluded.started_at, updated_at = excluded.updated_at, \
                         retire_at = excluded.retire_at, attempts = excluded.attempts, \
                         last_error = excluded.last_error, footprint = excluded.footprint, \
                         start_record_after = excluded.start_record_after",
                    )
                    .map_err(e)?;
                st.execute(params![
                    r.id.as_str(),
                    r.key.agent.as_str(),
                    r.key.credential.as_str(),
                    r.step.as_str(),
                    r.trigger.as_str(),
                    self.ver_to_sql(r.version)?,
                    r.vault_version,
                    r.previous_version.map(|v| self.ver_to_sql(v)).transpose()?,
                    r.previous_vault_version,
                    to_millis(r.started_at),
                    to_millis(r.updated_at),
                    r.retire_at.map(to_millis),
                    i64::from(r.attempts),
                    r.last_error,
                    r.footprint,
                    r.start_record_after
                        .map(|s| self.seq_to_sql(s))
                        .transpose()?,
                ])
                .map_err(e)?;
            }
            Write::Version(v) => {
                let mut st = tx
                    .prepare_cached(
                        "INSERT INTO versions (agent, credential, version, rotation, stage, \
                         vault_version, created_at, public) \
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8) \
                         ON CONFLICT (agent, credential, version) DO UPDATE SET \
                         rotation = excluded.rotation, stage = excluded.stage, \
                         vault_version = excluded.vault_version, \
                         created_at = excluded.created_at, public = excluded.public",
                    )
                    .map_err(e)?;
                st.execute(params![
                    v.key.agent.as_str(),
                    v.key.credential.as_str(),
                    self.ver_to_sql(v.version)?,
                    v.rotation.as_str(),
                    v.stage.as_str(),
                    v.vault_version,
                    to_millis(v.created_at),
                    v.public,
                ])
                .map_err(e)?;
            }
            Write::VersionStage {
                key,
                version,
                stage,
            } => {
                let mut st = tx
                    .prepare_cached(
                        "UPDATE versions SET stage = ?4 \
                         WHERE agent = ?1 AND credential = ?2 AND version = ?3",
                    )
                    .map_err(e)?;
                st.execute(params![
                    key.agent.as_str(),
                    key.credential.as_str(),
                    self.ver_to_sql(*version)?,
                    stage.as_str(),
                ])
                .map_err(e)?;
            }
            Write::RetireOthers(r) => {
                let key = &r.key;
                // Few rows per credential: select the candidates, filter here.
                let mut st = tx
                    .prepare_cached(
                        "SELECT version, stage FROM versions WHERE agent = ?1 AND credential = ?2",
                    )
                    .map_err(e)?;
                let rows: Vec<(i64, String)> = st
                    .query_map(params![key.agent.as_str(), key.credential.as_str()], |r| {
                        Ok((r.get(0)?, r.get(1)?))
                    })
                    .map_err(e)?
                    .collect::<std::result::Result<_, _>>()
                    .map_err(e)?;
                let mut up = tx
                    .prepare_cached(
                        "UPDATE versions SET stage = ?4 \
                         WHERE agent = ?1 AND credential = ?2 AND version = ?3",
                    )
                    .map_err(e)?;
                for (v, stage) in rows {
                    let Some(stage) = Stage::parse(&stage) else {
                        continue;
                    };
                    if u64::try_from(v).is_ok_and(|v| r.moves(v, stage)) {
                        up.execute(params![
                            key.agent.as_str(),
                            key.credential.as_str(),
                            v,
                            r.to.as_str()
                        ])
                        .map_err(e)?;
                    }
                }
            }
            Write::AuditHead(h) => {
                let seq = i64::try_from(h.seq).map_err(|_| StateError::Db {
                    path: self.path.clone(),
                    message: format!("audit seq {} does not fit in the database", h.seq),
                })?;
                let mut st = tx
                    .prepare_cached(
                        // Concurrent rotations may persist their heads out of
                        // order; the head only ever moves forward.
                        "INSERT INTO audit_head (id, seq, hash) VALUES (1, ?1, ?2) \
                         ON CONFLICT (id) DO UPDATE SET seq = excluded.seq, hash = excluded.hash \
                         WHERE excluded.seq > audit_head.seq",
                    )
                    .map_err(e)?;
                st.execute(params![seq, h.hash]).map_err(e)?;
            }
            Write::PruneHistory(key) => {
                for sql in [
                    "DELETE FROM rotations WHERE agent = ?1 AND credential = ?2 \
                     AND step = 'done' AND id NOT IN (SELECT id FROM rotations \
                     WHERE agent = ?1 AND credential = ?2 AND step = 'done' \
                     ORDER BY version DESC, started_at DESC, id DESC LIMIT ?3)",
                    "DELETE FROM versions WHERE agent = ?1 AND credential = ?2 \
                     AND stage = 'retired' AND version NOT IN (SELECT version FROM versions \
                     WHERE agent = ?1 AND credential = ?2 AND stage = 'retired' \
                     ORDER BY version DESC LIMIT ?3)",
                ] {
                    tx.prepare_cached(sql)
                        .map_err(e)?
                        .execute(params![
                            key.agent.as_str(),
                            key.credential.as_str(),
                            super::HISTORY_KEPT
                        ])
                        .map_err(e)?;
                }
            }
            Write::AwaitAcks {
                key,
                version,
                consumers,
            } => {
                tx.prepare_cached("DELETE FROM acks WHERE agent = ?1 AND credential = ?2")
                    .map_err(e)?
                    .execute(params![key.agent.as_str(), key.credential.as_str()])
                    .map_err(e)?;
                let version = self.ver_to_sql(*version)?;
                for c in consumers {
                    tx.prepare_cached(
                        "INSERT INTO acks (agent, credential, version, consumer, acked_at) \
                         VALUES (?1, ?2, ?3, ?4, NULL)",
                    )
                    .map_err(e)?
                    .execute(params![
                        key.agent.as_str(),
                        key.credential.as_str(),
                        version,
                        c
                    ])
                    .map_err(e)?;
                }
            }
            Write::Acked {
                key,
                version,
                consumer,
                at,
            } => {
                tx.prepare_cached(
                    "UPDATE acks SET acked_at = ?5 WHERE agent = ?1 AND credential = ?2 \
                     AND consumer = ?3 AND version = ?4",
                )
                .map_err(e)?
                .execute(params![
                    key.agent.as_str(),
                    key.credential.as_str(),
                    consumer,
                    self.ver_to_sql(*version)?,
                    to_millis(*at)
                ])
                .map_err(e)?;
                // Kept past the next delivery (which replaces the acks rows).
                tx.prepare_cached(
                    "INSERT INTO last_acks (agent, credential, consumer, version, acked_at) \
                     SELECT agent, credential, consumer, version, acked_at FROM acks \
                     WHERE agent = ?1 AND credential = ?2 AND consumer = ?3 AND version = ?4 \
                     ON CONFLICT (agent, credential, consumer) DO UPDATE \
                     SET version = excluded.version, acked_at = excluded.acked_at \
                     WHERE excluded.acked_at >= last_acks.acked_at",
                )
                .map_err(e)?
                .execute(params![
                    key.agent.as_str(),
                    key.credential.as_str(),
                    consumer,
                    self.ver_to_sql(*version)?
                ])
                .map_err(e)?;
            }
            Write::Decommission(d) => {
                tx.prepare_cached(
                    "INSERT INTO decommissions (agent, record) VALUES (?1, ?2) \
                     ON CONFLICT (agent) DO UPDATE SET record = excluded.record",
                )
                .map_err(e)?
                .execute(params![d.agent.as_str(), to_json(d)])
                .map_err(e)?;
            }
            Write::Revocation(r) => {
                tx.prepare_cached(
                    "INSERT INTO revocations (agent, item, record) VALUES (?1, ?2, ?3) \
                     ON CONFLICT (agent, item) DO UPDATE SET record = excluded.record",
                )
                .map_err(e)?
                .execute(params![r.agent.as_str(), r.item, to_json(r)])
                .map_err(e)?;
            }
            Write::Holding { key, footprint } => {
                tx.prepare_cached(
                    "INSERT INTO holdings (agent, credential, footprint) VALUES (?1, ?2, ?3) \
                     ON CONFLICT (agent, credential) DO UPDATE SET footprint = excluded.footprint \
                     WHERE footprint != excluded.footprint",
                )
                .map_err(e)?
                .execute(params![
                    key.agent.as_str(),
                    key.credential.as_str(),
                    footprint
                ])
                .map_err(e)?;
            }
            Write::RotationRequested { key, at } => {
                tx.prepare_cached(
                    "INSERT INTO rotate_requests (agent, credential, requested_at) \
                     VALUES (?1, ?2, ?3) ON CONFLICT (agent, credential) DO NOTHING",
                )
                .map_err(e)?
                .execute(params![
                    key.agent.as_str(),
                    key.credential.as_str(),
                    to_millis(*at)
                ])
                .map_err(e)?;
            }
            Write::RotationRequestDone(key) => {
                tx.prepare_cached(
                    "DELETE FROM rotate_requests WHERE agent = ?1 AND credential = ?2",
                )
                .map_err(e)?
                .execute(params![key.agent.as_str(), key.credential.as_str()])
                .map_err(e)?;
            }
            Write::VersionFloor { key, version } => {
                tx.prepare_cached(
                    "INSERT INTO version_floors (agent, credential, version) VALUES (?1, ?2, ?3) \
                     ON CONFLICT (agent, credential) DO UPDATE SET version = max(version, excluded.version)",
                )
                .map_err(e)?
                .execute(params![
                    key.agent.as_str(),
                    key.credential.as_str(),
                    i64::try_from(*version).unwrap_or(i64::MAX)
                ])
                .map_err(e)?;
            }
            Write::ForgetCredential(key) => {
                for sql in [
                    "DELETE FROM rotate_requests WHERE agent = ?1 AND credential = ?2",
                    "DELETE FROM holdings WHERE agent = ?1 AND credential = ?2",
                    "DELETE FROM acks WHERE agent = ?1 AND credential = ?2",
                    "DELETE FROM last_acks WHERE agent = ?1 AND credential = ?2",
                    "DELETE FROM versions WHERE agent = ?1 AND credential = ?2",
                    "DELETE FROM rotations WHERE agent = ?1 AND credential = ?2",
                    "DELETE FROM credentials WHERE agent = ?1 AND credential = ?2",
                ] {
                    tx.prepare_cached(sql)
                        .map_err(e)?
                        .execute(params![key.agent.as_str(), key.credential.as_str()])
                        .map_err(e)?;
                }
            }
        }
        Ok(())
    }

    fn seq_to_sql(&self, seq: u64) -> Result<i64> {
        i64::try_from(seq).map_err(|_| StateError::Db {
            path: self.path.clone(),
            message: format!("audit seq {seq} does not fit in the database"),
        })
    }

    fn ver_to_sql(&self, v: VersionNo) -> Result<i64> {
        i64::try_from(v).map_err(|_| StateError::Db {
            path: self.path.clone(),
            message: format!("version number {v} does not fit in the database"),
        })
    }

    /// Runs a SELECT and decodes every row, mapping bad rows to `Corrupt`.
    fn query_rows<T, P: rusqlite::Params>(
        &self,
        sql: &str,
        params: P,
        decode: fn(&Row<'_>) -> std::result::Result<T, Decode>,
    ) -> Result<Vec<T>> {
        let conn = self.lock();
        let mut st = conn.prepare_cached(sql).map_err(|e| self.err(e))?;
        let mut rows = st.query(params).map_err(|e| self.err(e))?;
        let mut out = Vec::new();
        while let Some(row) = rows.next().map_err(|e| self.err(e))? {
            out.push(decode(row).map_err(|d| self.decode_err(d))?);
        }
        Ok(out)
    }

    fn decode_err(&self, d: Decode) -> StateError {
        match d {
            Decode::Sql(e) => self.err(e),
            Decode::Corrupt(message) => StateError::Corrupt {
                path: self.path.clone(),
                message,
            },
        }
    }
}

impl StateStore for SqliteStore {
    fn apply(&self, writes: &[Write]) -> Result<()> {
        if writes.is_empty() {
            return Ok(());
        }
        let mut conn = self.lock();
        // IMMEDIATE takes the write lock up front, so a concurrent reader
        // upgrading cannot make us fail with SQLITE_BUSY half-way through.
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(|e| self.err(e))?;
        for w in writes {
            self.write_one(&tx, w)?;
        }
        tx.commit().map_err(|e| self.err(e))
    }

    /// One transaction for every group, each group in its own savepoint: a
    /// group that fails is rolled back alone, the others still commit. The
    /// single commit is what makes group commit cheap (one WAL append and
    /// one lock round instead of one per caller).
    fn apply_batch(&self, groups: &[&[Write]]) -> Vec<Result<()>> {
        let mut results: Vec<Result<()>> = Vec::with_capacity(groups.len());
        let mut conn = self.lock();
        let mut tx = match conn.transaction_with_behavior(TransactionBehavior::Immediate) {
            Ok(tx) => tx,
            Err(e) => return groups.iter().map(|_| Err(self.err_ref(&e))).collect(),
        };
        for writes in groups {
            let mut sp = match tx.savepoint() {
                Ok(sp) => sp,
                Err(e) => {
                    // The transaction itself is unusable: nothing commits.
                    return groups.iter().map(|_| Err(self.err_ref(&e))).collect();
                }
            };
            let applied = writes.iter().try_for_each(|w| self.write_one(&sp, w));
            match applied {
                Ok(()) => {
                    if let Err(e) = sp.commit() {
                        return groups.iter().map(|_| Err(self.err_ref(&e))).collect();
                    }
                    results.push(Ok(()));
                }
                Err(err) => {
                    if let Err(e) = sp.rollback() {
                        // Cannot undo this group's part: nothing may commit.
                        return groups.iter().map(|_| Err(self.err_ref(&e))).collect();
                    }
                    drop(sp);
                    results.push(Err(err));
                }
            }
        }
        if let Err(e) = tx.commit() {
            // Every group shares the commit; those that failed keep their own error.
            return results
                .into_iter()
                .map(|r| r.and(Err(self.err_ref(&e))))
                .collect();
        }
        results
    }

    fn snapshot(&self) -> Result<Snapshot> {
        let credentials = self.query_rows(
            &format!("SELECT {CREDENTIAL_COLS} FROM credentials"),
            [],
            decode_credential,
        )?;
        let unfinished = self.query_rows(
            &format!("SELECT {ROTATION_COLS} FROM rotations WHERE step != 'done'"),
            [],
            decode_rotation,
        )?;
        let acks = self.query_rows(
            &format!("SELECT {ACK_COLS} FROM acks ORDER BY agent, credential, consumer"),
            [],
            decode_ack,
        )?;
        let requests = self.query_rows(
            "SELECT agent, credential, requested_at FROM rotate_requests \
             ORDER BY agent, credential",
            [],
            decode_request,
        )?;
        Ok(Snapshot {
            credentials,
            unfinished,
            acks,
            requests,
        })
    }

    fn last_acks(&self) -> Result<Vec<AckRow>> {
        self.query_rows(
            &format!("SELECT {ACK_COLS} FROM last_acks ORDER BY agent, credential, consumer"),
            [],
            decode_ack,
        )
    }

    fn version_floors(&self) -> Result<Vec<(CredentialKey, VersionNo)>> {
        self.query_rows(
            "SELECT agent, credential, version FROM version_floors ORDER BY agent, credential",
            [],
            decode_floor,
        )
    }

    fn credential(&self, key: &CredentialKey) -> Result<Option<CredentialRow>> {
        Ok(self
            .query_rows(
                &format!(
                    "SELECT {CREDENTIAL_COLS} FROM credentials WHERE agent = ?1 AND credential = ?2"
                ),
                params![key.agent.as_str(), key.credential.as_str()],
                decode_credential,
            )?
            .pop())
    }

    fn rotation(&self, id: &RotationId) -> Result<Option<RotationRow>> {
        Ok(self
            .query_rows(
                &format!("SELECT {ROTATION_COLS} FROM rotations WHERE id = ?1"),
                params![id.as_str()],
                decode_rotation,
            )?
            .pop())
    }

    fn latest_rotation(&self, key: &CredentialKey) -> Result<Option<RotationRow>> {
        // By version first: the wall clock may have stepped back since the
        // rotation before (black-box finding: the older rotation was taken
        // for the latest, and a retire "took over" a version made here).
        Ok(self
            .query_rows(
                &format!(
                    "SELECT {ROTATION_COLS} FROM rotations WHERE agent = ?1 AND credential = ?2 \
                     ORDER BY version DESC, started_at DESC, id DESC LIMIT 1"
                ),
                params![key.agent.as_str(), key.credential.as_str()],
                decode_rotation,
            )?
            .pop())
    }

    fn versions(&self, key: &CredentialKey) -> Result<Vec<VersionRow>> {
        self.query_rows(
            &format!(
                "SELECT {VERSION_COLS} FROM versions WHERE agent = ?1 AND credential = ?2 \
                 ORDER BY version"
            ),
            params![key.agent.as_str(), key.credential.as_str()],
            decode_version,
        )
    }

    fn checkpoint(&self) -> Result<()> {
        // TRUNCATE: the WAL is left empty (not just rewound), so a
        // `state.db` copied back over this one cannot be joined by it.
        self.lock()
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
            .map_err(|e| self.err(e))
    }

    fn audit_head(&self) -> Result<Option<AuditHead>> {
        let conn = self.lock();
        let row: Option<(i64, String)> = conn
            .prepare_cached("SELECT seq, hash FROM audit_head WHERE id = 1")
            .map_err(|e| self.err(e))?
            .query_row([], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()
            .map_err(|e| self.err(e))?;
        row.map(|(seq, hash)| {
            let seq = u64::try_from(seq).map_err(|_| StateError::Corrupt {
                path: self.path.clone(),
                message: format!("audit_head: negative seq {seq}"),
            })?;
            Ok(AuditHead { seq, hash })
        })
        .transpose()
    }

    fn decommissions(&self) -> Result<Vec<DecommissionRow>> {
        self.query_rows(
            "SELECT record FROM decommissions ORDER BY agent",
            [],
            decode_decommission,
        )
    }

    fn revocations(&self, agent: &AgentId) -> Result<Vec<RevocationRow>> {
        self.query_rows(
            "SELECT record FROM revocations WHERE agent = ?1 ORDER BY item",
            params![agent.as_str()],
            decode_revocation,
        )
    }

    fn holdings(&self, agent: &AgentId) -> Result<Vec<(CredentialKey, String)>> {
        self.query_rows(
            "SELECT agent, credential, footprint FROM holdings WHERE agent = ?1 ORDER BY credential",
            params![agent.as_str()],
            decode_holding,
        )
    }

    fn agents(&self) -> Result<Vec<AgentId>> {
        self.query_rows(
            "SELECT agent FROM credentials UNION SELECT agent FROM holdings ORDER BY 1",
            [],
            decode_agent,
        )
    }
}

fn db_err(path: &str, e: rusqlite::Error) -> StateError {
    StateError::Db {
        path: path.to_owned(),
        message: e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::schema::MIGRATIONS;
    use super::*;
    use crate::state::{Restage, Step, Trigger};
    use crate::test_support::{credential_row, key};
    use chrono::{DateTime, Utc};
    use std::os::unix::fs::PermissionsExt;
    use std::path::PathBuf;
    use std::time::Instant;

    /// A timestamp as the engine makes them: truncated to milliseconds.
    fn at(millis: i64) -> DateTime<Utc> {
        DateTime::from_timestamp_millis(millis).unwrap()
    }

    fn rot(k: &CredentialKey, step: Step) -> RotationRow {
        RotationRow {
            id: RotationId::generate(),
            key: k.clone(),
            step,
            trigger: Trigger::CatchUp,
            version: 4,
            vault_version: Some("v-4".into()),
            previous_version: Some(3),
            previous_vault_version: Some("v-3".into()),
            started_at: at(1_700_000_000_001),
            updated_at: at(1_700_000_000_999),
            retire_at: Some(at(1_700_000_900_000)),
            attempts: 5,
            last_error: Some("target postgres: timeout".into()),
            footprint: Some(r#"{"vaults":["bao"],"owner":"o","tenant":"t"}"#.into()),
            start_record_after: Some(41),
        }
    }

    fn version(k: &CredentialKey, rotation: &RotationId, n: VersionNo) -> VersionRow {
        VersionRow {
            key: k.clone(),
            version: n,
            rotation: rotation.clone(),
            stage: Stage::Previous,
            vault_version: format!("v-{n}"),
            created_at: at(1_700_000_000_777),
            public: Some("ssh-ed25519 AAAA".into()),
        }
    }

    /// `relative` inside a fresh temp dir, which lives as long as the `TempDir`.
    fn tmp_path(relative: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(relative);
        (dir, path)
    }

    fn open_tmp() -> (tempfile::TempDir, SqliteStore) {
        let (dir, path) = tmp_path("state/keyturn.db");
        (dir, SqliteStore::open(&path).unwrap())
    }

    fn stages(s: &SqliteStore, k: &CredentialKey) -> Vec<(u64, Stage)> {
        s.versions(k)
            .unwrap()
            .into_iter()
            .map(|v| (v.version, v.stage))
            .collect()
    }

    /// One write of each row type, in one transaction.
    fn apply_one_of_each(
        s: &SqliteStore,
        c: &CredentialRow,
        r: &RotationRow,
        v: &VersionRow,
        h: &AuditHead,
    ) {
        s.apply(&[
            Write::Credential(c.clone()),
            Write::Rotation(r.clone()),
            Write::Version(v.clone()),
            Write::AuditHead(h.clone()),
        ])
        .unwrap();
    }

    #[test]
    fn stage_writes_move_versions_without_reading_them() {
        let (_dir, s) = open_tmp();
        let k = key("invoice-bot", "db");
        let r = rot(&k, Step::Promote);
        let mut rows = Vec::new();
        for (n, stage) in [
            (1, Stage::Retired),
            (2, Stage::Previous),
            (3, Stage::Current),
            (4, Stage::Pending),
        ] {
            let mut v = version(&k, &r.id, n);
            v.stage = stage;
            rows.push(Write::Version(v));
        }
        s.apply(&rows).unwrap();
        // Promote 4: 4 current, 3 previous, every other current/previous retired.
        s.apply(&[
            Write::VersionStage {
                key: k.clone(),
                version: 4,
                stage: Stage::Current,
            },
            Write::VersionStage {
                key: k.clone(),
                version: 3,
                stage: Stage::Previous,
            },
            Write::RetireOthers(Restage {
                key: k.clone(),
                except: vec![4, 3],
                from: vec![Stage::Current, Stage::Previous],
                to: Stage::Retired,
            }),
            // A missing version is a no-op, not an error.
            Write::VersionStage {
                key: k.clone(),
                version: 99,
                stage: Stage::Retired,
            },
        ])
        .unwrap();
        assert_eq!(
            stages(&s, &k),
            vec![
                (1, Stage::Retired),
                (2, Stage::Retired),
                (3, Stage::Previous),
                (4, Stage::Current)
            ]
        );
    }

    #[test]
    fn audit_head_never_moves_backwards() {
        let (_dir, s) = open_tmp();
        let head = |seq| AuditHead {
            seq,
            hash: format!("h{seq}"),
        };
        s.apply(&[Write::AuditHead(head(11))]).unwrap();
        // A slower rotation persisting an older head must not regress it.
        s.apply(&[Write::AuditHead(head(10))]).unwrap();
        assert_eq!(s.audit_head().unwrap(), Some(head(11)));
        s.apply(&[Write::AuditHead(head(12))]).unwrap();
        assert_eq!(s.audit_head().unwrap(), Some(head(12)));
    }

    #[test]
    fn each_row_type_round_trips() {
        let (_dir, s) = open_tmp();
        let k = key("invoice-bot", "db");
        let c = credential_row(&k);
        let r = rot(&k, Step::Deliver);
        let v = version(&k, &r.id, 3);
        let h = AuditHead {
            seq: 42,
            hash: "ab".repeat(32),
        };
        apply_one_of_each(&s, &c, &r, &v, &h);
        assert_eq!(s.credential(&k).unwrap(), Some(c.clone()));
        assert_eq!(s.rotation(&r.id).unwrap(), Some(r.clone()));
        assert_eq!(s.versions(&k).unwrap(), vec![v]);
        assert_eq!(s.audit_head().unwrap(), Some(h));

        // All the Options empty round-trip as None, not as defaults.
        let k2 = key("invoice-bot", "api");
        let empty = CredentialRow {
            key: k2.clone(),
            current_version: None,
            last_rotated_at: None,
            next_due: None,
            consecutive_failures: 0,
            failing_since: None,
            last_error: None,
        };
        let bare = RotationRow {
            vault_version: None,
            previous_version: None,
            previous_vault_version: None,
            retire_at: None,
            last_error: None,
            attempts: 0,
            trigger: Trigger::Initial,
            start_record_after: None,
            ..rot(&k2, Step::Create)
        };
        s.apply(&[
            Write::Credential(empty.clone()),
            Write::Rotation(bare.clone()),
        ])
        .unwrap();
        assert_eq!(s.credential(&k2).unwrap(), Some(empty));
        assert_eq!(s.rotation(&bare.id).unwrap(), Some(bare));
        assert_eq!(s.credential(&key("nobody", "x")).unwrap(), None);
        assert_eq!(s.rotation(&RotationId::generate()).unwrap(), None);
    }

    #[test]
    fn writes_upsert() {
        let (_dir, s) = open_tmp();
        let k = key("a", "c");
        let mut c = credential_row(&k);
        let mut r = rot(&k, Step::Create);
        let mut v = version(&k, &r.id, 4);
        v.stage = Stage::Pending;
        let h = AuditHead {
            seq: 1,
            hash: "x".into(),
        };
        apply_one_of_each(&s, &c, &r, &v, &h);

        c.current_version = Some(4);
        c.consecutive_failures = 0;
        c.last_error = None;
        r.step = Step::Retire;
        r.attempts = 0;
        v.stage = Stage::Current;
        let h = AuditHead {
            seq: 9,
            hash: "y".into(),
        };
        apply_one_of_each(&s, &c, &r, &v, &h);

        let snap = s.snapshot().unwrap();
        assert_eq!(snap.credentials, vec![c]);
        assert_eq!(snap.unfinished, vec![r]);
        assert_eq!(s.versions(&k).unwrap(), vec![v]);
        assert_eq!(s.audit_head().unwrap(), Some(h));
    }

    #[test]
    fn snapshot_lists_only_unfinished_rotations_and_latest_is_newest() {
        let (_dir, s) = open_tmp();
        let k = key("a", "c");
        let mut old = rot(&k, Step::Done);
        old.started_at = at(1_000);
        let mut newer = rot(&k, Step::Test);
        newer.started_at = at(2_000);
        let other = rot(&key("b", "c"), Step::Retire);
        s.apply(&[
            Write::Rotation(newer.clone()),
            Write::Rotation(old.clone()),
            Write::Rotation(other.clone()),
        ])
        .unwrap();
        let mut unfinished = s.snapshot().unwrap().unfinished;
        unfinished.sort_by(|a, b| a.key.cmp(&b.key));
        assert_eq!(unfinished, vec![newer.clone(), other]);
        assert_eq!(s.latest_rotation(&k).unwrap(), Some(newer.clone()));

        // Finishing it drops it from the snapshot but keeps it as the latest.
        let done = RotationRow {
            step: Step::Done,
            ..newer
        };
        s.apply(&[Write::Rotation(done.clone())]).unwrap();
        assert!(
            s.snapshot()
                .unwrap()
                .unfinished
                .iter()
                .all(|r| r.id != done.id)
        );
        assert_eq!(s.latest_rotation(&k).unwrap(), Some(done.clone()));
        assert_eq!(s.latest_rotation(&key("z", "z")).unwrap(), None);

        // The next version, begun after the wall clock stepped back a day:
        // still the latest.
        let mut next = rot(&k, Step::Done);
        next.version = done.version + 1;
        next.started_at = at(2_000) - chrono::Duration::days(1);
        s.apply(&[Write::Rotation(next.clone())]).unwrap();
        assert_eq!(s.latest_rotation(&k).unwrap(), Some(next));
    }

    #[test]
    fn pruning_keeps_the_newest_history_and_everything_live() {
        let (_dir, s) = open_tmp();
        let k = key("a", "busy");
        let other = key("a", "quiet");
        let n = u64::from(crate::state::HISTORY_KEPT) + 5;
        let mut writes = Vec::new();
        for v in 1..=n {
            let mut r = rot(&k, Step::Done);
            r.version = v;
            r.started_at = at(1_700_000_000_000 + v as i64);
            let mut ver = version(&k, &r.id, v);
            ver.stage = match v {
                _ if v == n => Stage::Current,
                _ if v == n - 1 => Stage::Previous,
                _ => Stage::Retired,
            };
            writes.push(Write::Version(ver));
            writes.push(Write::Rotation(r));
        }
        let unfinished = rot(&k, Step::Deliver);
        writes.push(Write::Rotation(unfinished.clone()));
        let o = rot(&other, Step::Done);
        let mut ov = version(&other, &o.id, 1);
        ov.stage = Stage::Retired;
        writes.push(Write::Version(ov));
        writes.push(Write::Rotation(o));
        s.apply(&writes).unwrap();
        s.apply(&[Write::PruneHistory(k.clone())]).unwrap();

        let kept = u64::from(crate::state::HISTORY_KEPT);
        let versions = stages(&s, &k);
        let retired: Vec<u64> = versions
            .iter()
            .filter(|(_, st)| *st == Stage::Retired)
            .map(|(v, _)| *v)
            .collect();
        assert_eq!(retired, ((n - 1 - kept)..=(n - 2)).collect::<Vec<_>>());
        assert!(versions.contains(&(n - 1, Stage::Previous)));
        assert!(versions.contains(&(n, Stage::Current)));
        let rotations: i64 = s
            .lock()
            .query_row(
                "SELECT count(*) FROM rotations WHERE credential = 'busy' AND step = 'done'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(rotations, i64::from(crate::state::HISTORY_KEPT));
        assert_eq!(
            s.snapshot().unwrap().unfinished,
            vec![unfinished],
            "an unfinished rotation is never pruned"
        );
        assert_eq!(
            s.versions(&other).unwrap().len(),
            1,
            "other credentials untouched"
        );
    }

    #[test]
    fn forget_removes_only_that_credentials_rows() {
        let (_dir, s) = open_tmp();
        let gone = key("a", "gone");
        let kept = key("a", "kept");
        let mut writes = Vec::new();
        for k in [&gone, &kept] {
            let r = rot(k, Step::Set);
            writes.push(Write::Version(version(k, &r.id, 1)));
            writes.push(Write::Rotation(r));
            writes.push(Write::Credential(credential_row(k)));
        }
        s.apply(&writes).unwrap();
        s.apply(&[Write::ForgetCredential(gone.clone())]).unwrap();

        assert_eq!(s.credential(&gone).unwrap(), None);
        assert_eq!(s.latest_rotation(&gone).unwrap(), None);
        assert!(s.versions(&gone).unwrap().is_empty());
        assert!(s.credential(&kept).unwrap().is_some());
        assert!(s.latest_rotation(&kept).unwrap().is_some());
        assert_eq!(s.versions(&kept).unwrap().len(), 1);
        let snap = s.snapshot().unwrap();
        assert_eq!(snap.credentials.len(), 1);
        assert_eq!(snap.unfinished.len(), 1);
    }

    /// A stored `keyturn rotate` request keeps the time it was first made,
    /// is in the snapshot until its rotation begins, and goes with its
    /// credential; in both stores.
    #[test]
    fn rotate_requests_are_kept_until_done_in_both_stores() {
        let (_dir, sqlite) = open_tmp();
        let memory = crate::state::MemoryStore::new();
        let (a, b) = (key("a", "c"), key("b", "c"));
        for s in [&sqlite as &dyn StateStore, &memory] {
            s.apply(&[
                Write::RotationRequested {
                    key: a.clone(),
                    at: at(1_000),
                },
                Write::RotationRequested {
                    key: b.clone(),
                    at: at(2_000),
                },
                Write::RotationRequested {
                    key: a.clone(),
                    at: at(3_000),
                },
            ])
            .unwrap();
            let requested = |s: &dyn StateStore| {
                s.snapshot()
                    .unwrap()
                    .requests
                    .into_iter()
                    .map(|r| (r.key, r.requested_at))
                    .collect::<Vec<_>>()
            };
            assert_eq!(
                requested(s),
                vec![(a.clone(), at(1_000)), (b.clone(), at(2_000))]
            );
            s.apply(&[Write::RotationRequestDone(a.clone())]).unwrap();
            assert_eq!(requested(s), vec![(b.clone(), at(2_000))]);
            s.apply(&[Write::ForgetCredential(b.clone())]).unwrap();
            assert_eq!(requested(s), vec![]);
        }
    }

    #[test]
    fn a_failed_write_rolls_back_the_whole_transaction() {
        let (_dir, s) = open_tmp();
        let k = key("a", "c");
        let mut too_big = rot(&k, Step::Create);
        too_big.version = u64::MAX;
        let err = s
            .apply(&[
                Write::Credential(credential_row(&k)),
                Write::Rotation(too_big),
            ])
            .unwrap_err();
        assert!(matches!(err, StateError::Db { .. }), "{err}");
        assert_eq!(s.credential(&k).unwrap(), None);
    }

    /// Decommissions, their items and holdings survive a reopen, read back
    /// the same from SQLite and from the in-memory store, and `agents`
    /// lists every agent either table remembers.
    #[test]
    fn decommissions_items_and_holdings_round_trip_in_both_stores() {
        use crate::model::AgentId;
        use crate::state::{DecommissionRow, MemoryStore, RevocationRow};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        let t = crate::test_support::at_secs(100);
        let agent = AgentId::new("gone").unwrap();
        let d = DecommissionRow {
            agent: agent.clone(),
            decided_at: t,
            recorded_at: t,
            actor: "uid=0 gid=0 pid=1".into(),
            by: Some("alice".into()),
            reason: "retired".into(),
            source: "command".into(),
            owner: "o".into(),
            tenant: "acme".into(),
            tier: "high".into(),
            sla_ms: 3_600_000,
            revoked_at: None,
            verified_at: None,
            nothing_held: false,
        };
        let item = |name: &str| RevocationRow {
            agent: agent.clone(),
            item: format!("db/{name}"),
            credential: Some(key("gone", "db").credential),
            kind: name.into(),
            spec: serde_json::json!({"kind": "acks"}),
            revoked_at: Some(t),
            verified_at: None,
            attempts: 2,
            last_error: Some("still there".into()),
        };
        let writes = vec![
            Write::Decommission(d.clone()),
            Write::Revocation(item("acks")),
            Write::Revocation(item("vault:bao")),
            Write::Holding {
                key: key("gone", "db"),
                footprint: "{\"vaults\":[\"bao\"]}".into(),
            },
            Write::Credential(credential_row(&key("other", "x"))),
        ];
        let memory = MemoryStore::new();
        memory.apply(&writes).unwrap();
        {
            let s = SqliteStore::open(&path).unwrap();
            s.apply(&writes).unwrap();
            // An update replaces the record.
            let mut done = item("acks");
            done.verified_at = Some(t);
            s.apply(&[Write::Revocation(done.clone())]).unwrap();
            memory.apply(&[Write::Revocation(done)]).unwrap();
        }
        let s = SqliteStore::open(&path).unwrap();
        for store in [&s as &dyn StateStore, &memory] {
            assert_eq!(store.decommissions().unwrap(), vec![d.clone()]);
            let items = store.revocations(&agent).unwrap();
            assert_eq!(items.len(), 2);
            assert_eq!(items[0].item, "db/acks");
            assert_eq!(items[0].verified_at, Some(t));
            assert_eq!(items[1].last_error.as_deref(), Some("still there"));
            assert_eq!(
                store.holdings(&agent).unwrap(),
                vec![(key("gone", "db"), "{\"vaults\":[\"bao\"]}".to_owned())]
            );
            let agents: Vec<String> = store
                .agents()
                .unwrap()
                .into_iter()
                .map(|a| a.to_string())
                .collect();
            assert_eq!(agents, vec!["gone".to_owned(), "other".to_owned()]);
        }
    }

    #[test]
    fn a_damaged_database_fails_the_integrity_check() {
        let (_dir, path) = tmp_path("keyturn.db");
        {
            let s = SqliteStore::open(&path).unwrap();
            for c in ["a", "b", "c"] {
                let k = key("agent", c);
                s.apply(&[
                    Write::Credential(credential_row(&k)),
                    Write::Rotation(rot(&k, Step::Done)),
                ])
                .unwrap();
            }
            s.check_integrity().unwrap();
            s.checkpoint().unwrap();
        }
        // An index out of step with its table: what a torn page or a
        // bad copy leaves, made here by redefining the index in place.
        {
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch(
                "PRAGMA writable_schema = ON; \
                 UPDATE sqlite_schema SET sql = 'CREATE INDEX rotations_by_credential ON rotations (started_at, credential, agent)' \
                 WHERE name = 'rotations_by_credential';",
            )
            .unwrap();
        }
        let s = SqliteStore::open(&path).unwrap();
        let e = s.check_integrity().unwrap_err().to_string();
        assert!(
            e.contains("damaged") && e.contains("rotations_by_credential"),
            "{e}"
        );
    }

    #[test]
    fn migrates_an_empty_database_and_reopens() {
        let (_dir, path) = tmp_path("new/dir/keyturn.db");
        let k = key("a", "c");
        {
            let s = SqliteStore::open(&path).unwrap();
            assert_eq!(s.user_version().unwrap(), SCHEMA_VERSION);
            s.apply(&[Write::Credential(credential_row(&k))]).unwrap();
        }
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&path), 0o600);
        assert_eq!(mode(path.parent().unwrap()), 0o700);

        // Re-opening applies nothing and keeps the data.
        let s = SqliteStore::open(&path).unwrap();
        assert_eq!(s.user_version().unwrap(), SCHEMA_VERSION);
        assert_eq!(s.credential(&k).unwrap(), Some(credential_row(&k)));
        let journal: String = s
            .lock()
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .unwrap();
        assert_eq!(journal, "wal");
        let wal = path.with_file_name("keyturn.db-wal");
        assert_eq!(mode(&wal), 0o600, "the WAL inherits the database's mode");
    }

    #[test]
    fn a_version_1_database_is_migrated_and_keeps_its_rotations() {
        let (_dir, path) = tmp_path("keyturn.db");
        let k = key("a", "c");
        {
            // What keyturn wrote before rotations had a footprint.
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch(MIGRATIONS[0]).unwrap();
            conn.execute_batch(
                "INSERT INTO rotations (id, agent, credential, step, \"trigger\", version, \
                 previous_version, started_at, updated_at, retire_at) VALUES \
                 ('0123456789abcdef0123456789abcdef', 'a', 'c', 'retire', 'schedule', 2, 1, \
                 1700000000000, 1700000000500, 1700000900000); PRAGMA user_version = 1;",
            )
            .unwrap();
        }
        let s = SqliteStore::open(&path).unwrap();
        assert_eq!(s.user_version().unwrap(), SCHEMA_VERSION);
        let rot = s
            .latest_rotation(&k)
            .unwrap()
            .expect("the rotation survived");
        assert_eq!(
            (rot.step, rot.version, rot.footprint.as_deref()),
            (Step::Retire, 2, None)
        );
        let mut with = rot.clone();
        with.footprint = Some("{}".into());
        s.apply(&[Write::Rotation(with.clone())]).unwrap();
        assert_eq!(s.latest_rotation(&k).unwrap(), Some(with));
    }

    #[test]
    fn a_version_7_database_keeps_its_acks_as_last_acks_past_the_next_delivery() {
        let (_dir, path) = tmp_path("keyturn.db");
        {
            let conn = Connection::open(&path).unwrap();
            for m in &MIGRATIONS[..7] {
                conn.execute_batch(m).unwrap();
            }
            conn.execute_batch(
                "INSERT INTO acks (agent, credential, version, consumer, acked_at) VALUES \
                 ('a', 'db', 3, 'file:/x', 1700000000000), ('a', 'db', 3, 'file:/y', NULL); \
                 PRAGMA user_version = 7;",
            )
            .unwrap();
        }
        let s = SqliteStore::open(&path).unwrap();
        let k = key("a", "db");
        let acked = |v: u64, c: &str, ms: i64| AckRow {
            key: k.clone(),
            version: v,
            consumer: c.into(),
            acked_at: DateTime::from_timestamp_millis(ms),
        };
        assert_eq!(
            s.last_acks().unwrap(),
            vec![acked(3, "file:/x", 1_700_000_000_000)]
        );
        // Version 4 is delivered: the acks rows are replaced, the last
        // acks are kept; an ack of version 4 moves them on.
        s.apply(&[Write::AwaitAcks {
            key: k.clone(),
            version: 4,
            consumers: vec!["file:/x".into(), "file:/y".into()],
        }])
        .unwrap();
        assert_eq!(
            s.last_acks().unwrap(),
            vec![acked(3, "file:/x", 1_700_000_000_000)]
        );
        s.apply(&[Write::Acked {
            key: k.clone(),
            version: 4,
            consumer: "file:/y".into(),
            at: DateTime::from_timestamp_millis(1_700_000_900_000).unwrap(),
        }])
        .unwrap();
        assert_eq!(
            s.last_acks().unwrap(),
            vec![
                acked(3, "file:/x", 1_700_000_000_000),
                acked(4, "file:/y", 1_700_000_900_000)
            ]
        );
        s.apply(&[Write::ForgetCredential(k.clone())]).unwrap();
        assert_eq!(s.last_acks().unwrap(), vec![]);
    }

    #[test]
    fn a_version_3_database_gives_failing_credentials_a_stable_failing_since() {
        let (_dir, path) = tmp_path("keyturn.db");
        {
            // What keyturn wrote before failure runs had a start time.
            let conn = Connection::open(&path).unwrap();
            for m in &MIGRATIONS[..3] {
                conn.execute_batch(m).unwrap();
            }
            conn.execute_batch(
                "INSERT INTO credentials (agent, credential, current_version, \
                 consecutive_failures) VALUES ('a', 'failing', 1, 3), ('a', 'fine', 1, 0); \
                 PRAGMA user_version = 3;",
            )
            .unwrap();
        }
        let before = Utc::now() - chrono::Duration::seconds(1);
        let s = SqliteStore::open(&path).unwrap();
        let failing = s.credential(&key("a", "failing")).unwrap().unwrap();
        let since = failing.failing_since.expect("a failing row gets a start");
        assert!(since >= before && since <= Utc::now(), "{since}");
        assert_eq!(
            s.credential(&key("a", "fine"))
                .unwrap()
                .unwrap()
                .failing_since,
            None
        );
        drop(s);
        // Persisted: reopening does not move it.
        let s = SqliteStore::open(&path).unwrap();
        assert_eq!(
            s.credential(&key("a", "failing"))
                .unwrap()
                .unwrap()
                .failing_since,
            Some(since)
        );
    }

    #[test]
    fn a_newer_database_is_refused() {
        let (_dir, path) = tmp_path("keyturn.db");
        drop(SqliteStore::open(&path).unwrap());
        {
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch(&format!("PRAGMA user_version = {}", SCHEMA_VERSION + 1))
                .unwrap();
        }
        for res in [SqliteStore::open(&path), SqliteStore::open_read_only(&path)] {
            match res {
                Err(StateError::TooNew {
                    found, supported, ..
                }) => {
                    assert_eq!(found, SCHEMA_VERSION + 1);
                    assert_eq!(supported, SCHEMA_VERSION);
                }
                other => panic!("expected TooNew, got {other:?}"),
            }
        }
    }

    #[test]
    fn read_only_store_sees_the_writers_commits() {
        let (dir, rw) = open_tmp();
        let ro = SqliteStore::open_read_only(&dir.path().join("state/keyturn.db")).unwrap();
        let k = key("a", "c");
        assert_eq!(ro.credential(&k).unwrap(), None);
        rw.apply(&[Write::Credential(credential_row(&k))]).unwrap();
        assert_eq!(ro.credential(&k).unwrap(), Some(credential_row(&k)));
        let mut c = credential_row(&k);
        c.current_version = Some(7);
        rw.apply(&[Write::Credential(c.clone())]).unwrap();
        assert_eq!(ro.snapshot().unwrap().credentials, vec![c]);
        // And it cannot write.
        assert!(ro.apply(&[Write::ForgetCredential(k)]).is_err());
    }

    #[test]
    fn read_only_open_of_a_missing_database_fails() {
        let (_dir, path) = tmp_path("absent.db");
        assert!(SqliteStore::open_read_only(&path).is_err());
        assert!(!path.exists());
    }

    #[test]
    fn corrupt_rows_are_errors_not_panics() {
        let (dir, s) = open_tmp();
        let k = key("a", "c");
        let r = rot(&k, Step::Set);
        s.apply(&[
            Write::Rotation(r.clone()),
            Write::Credential(credential_row(&k)),
        ])
        .unwrap();
        let raw = Connection::open(dir.path().join("state/keyturn.db")).unwrap();
        let expect_corrupt = |what: &str, res: Result<()>| match res {
            Err(StateError::Corrupt { message, .. }) => {
                assert!(message.contains(what), "{message} should mention {what}")
            }
            other => panic!("expected Corrupt for {what}, got {other:?}"),
        };

        raw.execute("UPDATE rotations SET step = 'teleport'", [])
            .unwrap();
        expect_corrupt("step", s.snapshot().map(drop));
        expect_corrupt("step", s.rotation(&r.id).map(drop));
        raw.execute("UPDATE rotations SET step = 'set', id = 'not-an-id'", [])
            .unwrap();
        expect_corrupt("rotations.id", s.snapshot().map(drop));
        raw.execute("UPDATE rotations SET step = 'done'", [])
            .unwrap();

        // Each update spoils one column (and repairs the one before).
        for (update, what) in [
            (
                "UPDATE credentials SET agent = '../etc'",
                "credentials.agent",
            ),
            (
                "UPDATE credentials SET agent = 'a', current_version = -1",
                "current_version",
            ),
            ("UPDATE credentials SET current_version = 'three'", ""),
            (
                "UPDATE credentials SET current_version = 1, next_due = 9223372036854775807",
                "next_due",
            ),
        ] {
            raw.execute(update, []).unwrap();
            expect_corrupt(what, s.snapshot().map(drop));
        }
    }

    /// A guard for future changes: a value that only ever lived in a
    /// `SecretValue` must not reach the database, its WAL or its shm, whatever
    /// rows the engine writes about that rotation.
    #[test]
    fn secret_values_never_reach_the_database() {
        let (dir, s) = open_tmp();
        let canary = crate::model::SecretValue::from_string("canary-7d1e-do-not-store".into());
        let k = key("a", "c");
        let r = rot(&k, Step::Promote);
        s.apply(&[
            Write::Credential(credential_row(&k)),
            Write::Rotation(r.clone()),
            Write::Version(version(&k, &r.id, 4)),
            Write::AuditHead(AuditHead {
                seq: 3,
                hash: "h".into(),
            }),
        ])
        .unwrap();
        // Errors are formatted the way the engine does it: the value redacts itself.
        let c = CredentialRow {
            last_error: Some(format!("target rejected {canary} / {canary:?}")),
            ..credential_row(&k)
        };
        s.apply(&[Write::Credential(c)]).unwrap();

        let needle = canary.expose();
        let mut checked = 0;
        for entry in std::fs::read_dir(dir.path().join("state")).unwrap() {
            let bytes = std::fs::read(entry.unwrap().path()).unwrap();
            assert!(!bytes.windows(needle.len()).any(|w| w == needle));
            checked += 1;
        }
        assert!(checked >= 2, "the db and its WAL were checked");
    }

    /// 100k credentials load in one pass. Prints the time (no timing
    /// assertion: the machine is shared); debug builds take a few hundred ms.
    #[test]
    fn snapshot_of_100k_credentials() {
        let (_dir, s) = open_tmp();
        let writes: Vec<Write> = (0..100_000)
            .map(|i| Write::Credential(credential_row(&key(&format!("agent-{i}"), "db"))))
            .collect();
        let t = Instant::now();
        s.apply(&writes).unwrap();
        let applied = t.elapsed();
        let t = Instant::now();
        let snap = s.snapshot().unwrap();
        let loaded = t.elapsed();
        assert_eq!(snap.credentials.len(), 100_000);
        eprintln!("100k credentials: apply {applied:?}, snapshot {loaded:?}");
    }
}
