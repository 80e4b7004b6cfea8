//! The task store: every task and what each issuer minted for it, in a small
//! SQLite database of its own, `<state_dir>/tasks/tasks.db` (0600, WAL,
//! `synchronous = FULL`), like the alert spool.
//!
//! A task is written *before* anything is issued for it, `starting`, with
//! one item per issuer in state `issuing`; the handle an issuer returns is
//! written as soon as it is known, and the task is `live` once every
//! credential is issued and delivered. So after a crash at any point the
//! store lists every credential that may exist: a task still `starting`
//! never reached its caller and is ended as a failed start, an item still
//! `issuing` is revoked by task id (the issuer's contract), an `issued` one
//! by its handle, and a live task's TTL is enforced from `expires_at`
//! whatever happened in between. `FULL` because a forgotten task would be a
//! credential nobody revokes.
//!
//! Writes go through one thread ([`crate::group_commit`]): the writes of
//! every caller queued together commit in one transaction, each in its own
//! savepoint, so concurrent task starts and ends share an fsync instead of
//! queueing for one each behind a mutex (a start and an end make six
//! writes). A caller is answered only once its writes committed. Reads use a
//! connection of their own; WAL lets them run beside the writer's commit, and
//! they see every write their caller has been answered for. (The ledger of
//! spent assertion ids writes on the read connection: one short transaction
//! that its request waits for anyway.)
//!
//! No secret is stored: handles are role names, access key ids and token
//! accessors.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use rusqlite::{Connection, OptionalExtension, params};
use tokio::sync::oneshot;

use crate::group_commit::{self, Flow, GroupCommit};

use super::issuers::TaskAttribution;

/// A task's lifecycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskState {
    /// Being issued: recorded before the first issuer is called, live once
    /// every credential is issued and delivered. One found so after a
    /// restart (or abandoned by its start) never reached its caller: it is
    /// ended as a failed start.
    Starting,
    /// Issued and delivered; its credentials work until `expires_at`.
    Live,
    /// Ended (by request, TTL, a failed start or a decommission); its
    /// credentials are being revoked.
    Ending,
    /// Every credential revoked and verified (or past its own expiry).
    Ended,
}

/// One issuer's credential of a task.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ItemState {
    /// Recorded before the issuer was called: it may or may not exist.
    Issuing,
    /// Minted; `handle` says what it is.
    Issued,
    /// The issuer revoked it; not yet verified.
    Revoked,
    /// The issuer cannot end it early; the system ends it at `expires_at`.
    Expiring,
    /// Verified refused by the system.
    Verified,
}

impl TaskState {
    fn as_str(self) -> &'static str {
        match self {
            TaskState::Starting => "starting",
            TaskState::Live => "live",
            TaskState::Ending => "ending",
            TaskState::Ended => "ended",
        }
    }

    fn parse(s: &str) -> rusqlite::Result<Self> {
        Ok(match s {
            "starting" => TaskState::Starting,
            "live" => TaskState::Live,
            "ending" => TaskState::Ending,
            "ended" => TaskState::Ended,
            other => return Err(bad_value("tasks.state", other)),
        })
    }
}

impl ItemState {
    fn as_str(self) -> &'static str {
        match self {
            ItemState::Issuing => "issuing",
            ItemState::Issued => "issued",
            ItemState::Revoked => "revoked",
            ItemState::Expiring => "expiring",
            ItemState::Verified => "verified",
        }
    }

    fn parse(s: &str) -> rusqlite::Result<Self> {
        Ok(match s {
            "issuing" => ItemState::Issuing,
            "issued" => ItemState::Issued,
            "revoked" => ItemState::Revoked,
            "expiring" => ItemState::Expiring,
            "verified" => ItemState::Verified,
            other => return Err(bad_value("task_items.state", other)),
        })
    }

    /// Nothing more to do for it (an expiring one once its time passed).
    pub fn is_done(self, expires_at_ms: Option<i64>, now_ms: i64) -> bool {
        match self {
            ItemState::Verified => true,
            ItemState::Expiring => expires_at_ms.is_some_and(|t| t <= now_ms),
            _ => false,
        }
    }
}

fn bad_value(column: &str, v: &str) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(
        0,
        rusqlite::types::Type::Text,
        format!("unknown {column} value {v:?}").into(),
    )
}

/// A task as stored.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct TaskRow {
    #[serde(flatten)]
    pub task: TaskAttribution,
    pub policy: String,
    /// Who started it (the authenticated caller, e.g. `uid=1001` or
    /// `uid=0 as invoice-bot`).
    pub started_by: String,
    pub started_at_ms: i64,
    pub expires_at_ms: i64,
    pub state: TaskState,
    pub ended_at_ms: Option<i64>,
    /// `end`, `ttl`, `start_failed`, `decommission`, `agent_retired`,
    /// `policy_changed`.
    pub end_reason: Option<String>,
    /// Where its credentials are written (`<task_root>/<agent>/<task id>`),
    /// recorded before anything is issued: the directory is removed from
    /// there at the end, whatever `task_root` says by then. `None`: no task
    /// root when it started (or a task recorded before keyturn kept it).
    pub dir: Option<PathBuf>,
    /// Who ended it: the authenticated caller of `task end` (e.g.
    /// `uid=1001`, `uid=0 as invoice-bot`), or `keyturn` when the daemon
    /// did (TTL, failed start, decommission).
    pub ended_by: Option<String>,
    pub items: Vec<ItemRow>,
}

/// One issuer's credential of a task, as stored.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ItemRow {
    pub issuer: String,
    pub handle: Option<String>,
    pub state: ItemState,
    /// When the system ends it by itself, once known.
    pub expires_at_ms: Option<i64>,
    pub last_error: Option<String>,
    /// The system its issuer reached when the task started
    /// ([`TaskIssuer::origin`]), recorded before anything is issued: it is
    /// revoked and verified there only. `None`: the issuer names none (or
    /// a task recorded before keyturn kept it).
    ///
    /// [`TaskIssuer::origin`]: super::issuers::TaskIssuer::origin
    pub origin: Option<String>,
}

#[derive(Debug, thiserror::Error)]
#[error("task store {path}: {message}")]
pub struct StoreError {
    pub path: String,
    pub message: String,
}

pub type Result<T> = std::result::Result<T, StoreError>;

/// Spent assertion ids live beside the tasks they authorize: one durable
/// database, so a replay after a restart is refused too.
impl crate::auth::JtiLedger for TaskStore {
    fn spend(
        &self,
        agent: &str,
        jti: &str,
        expires_at: i64,
        now: i64,
    ) -> std::result::Result<bool, String> {
        self.spend_jti(agent, jti, expires_at, now)
            .map_err(|e| e.to_string())
    }
}

/// The token service's revocations and key uses live here too: durable,
/// and small (a row per revoked token until it expires, one per key).
impl crate::oauth::service::TokenLedger for TaskStore {
    fn revoke(&self, jti: &str, expires_at: i64, now: i64) -> std::result::Result<(), String> {
        let mut db = self.db();
        let tx = db.transaction().map_err(|e| e.to_string())?;
        tx.execute(
            "DELETE FROM revoked_tokens WHERE expires_at < ?1",
            params![now],
        )
        .map_err(|e| self.err("prune revoked tokens", e).to_string())?;
        tx.execute(
            "INSERT OR REPLACE INTO revoked_tokens (jti, expires_at) VALUES (?1, ?2)",
            params![jti, expires_at],
        )
        .map_err(|e| self.err("revoke a token", e).to_string())?;
        tx.commit()
            .map_err(|e| self.err("revoke a token", e).to_string())
    }

    fn is_revoked(&self, jti: &str) -> std::result::Result<bool, String> {
        self.db()
            .query_row(
                "SELECT 1 FROM revoked_tokens WHERE jti = ?1",
                params![jti],
                |_| Ok(()),
            )
            .optional()
            .map(|r| r.is_some())
            .map_err(|e| self.err("read revoked tokens", e).to_string())
    }

    fn signed(
        &self,
        credential: &str,
        version: u64,
        until: i64,
        public_pem: Option<&str>,
    ) -> std::result::Result<(), String> {
        let version = i64::try_from(version).map_err(|_| "key version out of range".to_string())?;
        self.db()
            .execute(
                "INSERT INTO token_key_uses (credential, version, signed_until, public_pem) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT(credential, version) DO UPDATE SET signed_until = max(signed_until, excluded.signed_until),
                     public_pem = coalesce(excluded.public_pem, public_pem)",
                params![credential, version, until, public_pem],
            )
            .map(|_| ())
            .map_err(|e| self.err("record a signing key use", e).to_string())
    }

    fn signed_until(&self, credential: &str) -> std::result::Result<Vec<(u64, i64)>, String> {
        let db = self.db();
        let mut stmt = db
            .prepare_cached(
                "SELECT version, signed_until FROM token_key_uses WHERE credential = ?1",
            )
            .map_err(|e| self.err("read signing key uses", e).to_string())?;
        let rows = stmt
            .query_map(params![credential], |r| {
                Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?))
            })
            .and_then(|rows| rows.collect::<std::result::Result<Vec<_>, _>>())
            .map_err(|e| self.err("read signing key uses", e).to_string())?;
        Ok(rows
            .into_iter()
            .filter_map(|(v, u)| Some((u64::try_from(v).ok()?, u)))
            .collect())
    }

    fn signed_under(&self, prefix: &str) -> std::result::Result<Vec<(String, u64, i64)>, String> {
        self.key_uses_under(prefix, "signed_until", "")
    }

    fn public_keys_under(
        &self,
        prefix: &str,
    ) -> std::result::Result<Vec<(String, u64, String)>, String> {
        self.key_uses_under(prefix, "public_pem", "AND public_pem IS NOT NULL")
    }

    fn adopt_unnamed_key_uses(&self, credential: &str) -> std::result::Result<(), String> {
        self.db()
            .execute(
                "UPDATE OR REPLACE token_key_uses SET credential = ?1 WHERE credential = ''",
                params![credential],
            )
            .map(|_| ())
            .map_err(|e| self.err("adopt signing key uses", e).to_string())
    }
}

pub struct TaskStore {
    path: PathBuf,
    /// The connection for reads.
    db: Mutex<Connection>,
    /// The writer thread (or, for tests under paused time, inline).
    writer: GroupCommit<WriteJob>,
    /// `SELECT ... FROM tasks` ([`select_task`]).
    select: String,
}

/// Most callers' writes committed in one transaction.
const MAX_BATCH: usize = 256;

/// One write, as the manager asks for it.
enum Write {
    Insert(Box<TaskRow>),
    Item {
        task: String,
        issuer: String,
        state: ItemState,
        handle: Option<String>,
        expires_at_ms: Option<i64>,
        last_error: Option<String>,
    },
    ItemError {
        task: String,
        issuer: String,
        error: String,
    },
    State {
        task: String,
        state: TaskState,
        reason: Option<String>,
        by: Option<String>,
        at_ms: i64,
    },
    /// Assertion `jti`s (agent, jti, keep until) to spend; whether each was
    /// new is written into `spent`, in order. Expired ones are pruned first.
    Spend {
        jtis: Vec<(String, String, i64)>,
        now: i64,
        spent: Arc<Mutex<Vec<bool>>>,
    },
}

struct WriteJob {
    write: Write,
    reply: oneshot::Sender<std::result::Result<(), String>>,
}

const SCHEMA: &str = "
    CREATE TABLE IF NOT EXISTS tasks (
        id            TEXT    NOT NULL PRIMARY KEY,
        agent         TEXT    NOT NULL,
        tenant        TEXT    NOT NULL,
        use_case      TEXT    NOT NULL,
        run_id        TEXT    NOT NULL,
        initiator     TEXT    NOT NULL,
        sensitivity   TEXT    NOT NULL,
        policy        TEXT    NOT NULL,
        started_by    TEXT    NOT NULL,
        started_at    INTEGER NOT NULL,
        expires_at    INTEGER NOT NULL,
        state         TEXT    NOT NULL,
        ended_at      INTEGER,
        end_reason    TEXT,
        dir           TEXT,
        ended_by      TEXT
    );
    CREATE INDEX IF NOT EXISTS tasks_open ON tasks (expires_at) WHERE state != 'ended';
    CREATE INDEX IF NOT EXISTS tasks_by_agent ON tasks (agent, started_at);
    CREATE TABLE IF NOT EXISTS task_items (
        task        TEXT    NOT NULL,
        issuer      TEXT    NOT NULL,
        handle      TEXT,
        state       TEXT    NOT NULL,
        expires_at  INTEGER,
        last_error  TEXT,
        origin      TEXT,
        PRIMARY KEY (task, issuer)
    );
    CREATE TABLE IF NOT EXISTS assertions (
        agent       TEXT    NOT NULL,
        jti         TEXT    NOT NULL,
        expires_at  INTEGER NOT NULL,
        PRIMARY KEY (agent, jti)
    );
    CREATE INDEX IF NOT EXISTS assertions_expiry ON assertions (expires_at);
    CREATE TABLE IF NOT EXISTS revoked_tokens (
        jti         TEXT    NOT NULL PRIMARY KEY,
        expires_at  INTEGER NOT NULL
    );
    CREATE TABLE IF NOT EXISTS token_key_uses (
        credential  TEXT    NOT NULL,
        version     INTEGER NOT NULL,
        signed_until INTEGER NOT NULL,
        PRIMARY KEY (credential, version)
    );
";

/// Before per-tenant signing keys, `token_keys` held the uses of the one
/// signing credential without naming it: its rows move to
/// `token_key_uses` under the credential `''`, which the token service
/// hands to its default credential ([`TokenLedger::adopt_unnamed_key_uses`]).
///
/// [`TokenLedger::adopt_unnamed_key_uses`]: crate::oauth::service::TokenLedger::adopt_unnamed_key_uses
const MIGRATE_TOKEN_KEYS: &str = "
    INSERT OR IGNORE INTO token_key_uses (credential, version, signed_until)
        SELECT '', version, signed_until FROM token_keys;
    DROP TABLE token_keys;
";

/// Columns added since the first schema: `(table, column, type)`, added to
/// a store made before them (their rows read `NULL`: not recorded).
const ADDED_COLUMNS: [(&str, &str, &str); 4] = [
    ("tasks", "dir", "TEXT"),
    ("task_items", "origin", "TEXT"),
    ("tasks", "ended_by", "TEXT"),
    ("token_key_uses", "public_pem", "TEXT"),
];

/// Adds the [`ADDED_COLUMNS`] a store made before them lacks.
fn add_columns(db: &Connection) -> rusqlite::Result<()> {
    for (table, column, kind) in ADDED_COLUMNS {
        if !has_column(db, table, column)? {
            db.execute_batch(&format!("ALTER TABLE {table} ADD COLUMN {column} {kind}"))?;
        }
    }
    Ok(())
}

impl TaskStore {
    /// The uses of signing keys recorded under a credential name starting
    /// with `prefix` (and `also`, more of the `WHERE` clause): (name,
    /// version, `column`). Both are constants of this file.
    fn key_uses_under<T: rusqlite::types::FromSql>(
        &self,
        prefix: &str,
        column: &'static str,
        also: &'static str,
    ) -> std::result::Result<Vec<(String, u64, T)>, String> {
        let db = self.db();
        let mut stmt = db
            .prepare_cached(&format!(
                "SELECT credential, version, {column} FROM token_key_uses
                 WHERE substr(credential, 1, length(?1)) = ?1 {also}"
            ))
            .map_err(|e| self.err("read signing key uses", e).to_string())?;
        let rows = stmt
            .query_map(params![prefix], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, T>(2)?,
                ))
            })
            .and_then(|rows| rows.collect::<std::result::Result<Vec<_>, _>>())
            .map_err(|e| self.err("read signing key uses", e).to_string())?;
        Ok(rows
            .into_iter()
            .filter_map(|(c, v, x)| Some((c, u64::try_from(v).ok()?, x)))
            .collect())
    }

    /// Opens (creating it 0600 if missing) `<dir>/tasks.db`, with its
    /// writer thread.
    pub fn open(dir: &Path) -> Result<TaskStore> {
        Self::open_with(dir, |conn| {
            let mut conn = conn;
            GroupCommit::spawn_lingering(
                "keyturn-tasks",
                MAX_BATCH,
                group_commit::FSYNC_LINGER,
                &group_commit::BUSY,
                move |batch| serve(&mut conn, batch),
            )
        })
    }

    /// [`open`](Self::open), but each write is committed on the caller's
    /// thread, alone: for tests under `tokio::time::pause()`, where waiting
    /// on another thread would let the paused clock jump ahead.
    pub fn open_inline(dir: &Path) -> Result<TaskStore> {
        Self::open_with(dir, |conn| {
            let mut conn = conn;
            Ok(GroupCommit::inline(move |batch| serve(&mut conn, batch)))
        })
    }

    fn open_with(
        dir: &Path,
        writer: impl FnOnce(Connection) -> std::io::Result<GroupCommit<WriteJob>>,
    ) -> Result<TaskStore> {
        let path = dir.join("tasks.db");
        let err = |what: &str, e: &dyn std::fmt::Display| StoreError {
            path: path.display().to_string(),
            message: format!("{what}: {e}"),
        };
        crate::private_file::create_parent(&path)
            .map_err(|e| err("cannot create its directory", &e))?;
        crate::private_file::open_options()
            .read(true)
            .write(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| err("cannot create", &e))?;
        let open = || -> rusqlite::Result<Connection> {
            let db = Connection::open(&path)?;
            db.execute_batch("PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL;")?;
            Ok(db)
        };
        let wdb = open()
            .and_then(|db| db.execute_batch(SCHEMA).map(|()| db))
            .and_then(|db| add_columns(&db).map(|()| db))
            .and_then(|db| {
                let legacy: bool = db.query_row(
                    "SELECT count(*) > 0 FROM sqlite_master WHERE type = 'table' AND name = 'token_keys'",
                    [],
                    |r| r.get(0),
                )?;
                if legacy {
                    db.execute_batch(&format!("BEGIN; {MIGRATE_TOKEN_KEYS} COMMIT;"))?;
                }
                Ok(db)
            })
            .map_err(|e| err("cannot set up", &e))?;
        let db = open().map_err(|e| err("cannot open", &e))?;
        let select = select_task(&db).map_err(|e| err("cannot read", &e))?;
        let writer = writer(wdb).map_err(|e| err("cannot start its writer thread", &e))?;
        Ok(TaskStore {
            path,
            db: Mutex::new(db),
            writer,
            select,
        })
    }

    /// Queues `write` and waits until it is committed.
    async fn write(&self, what: &str, write: Write) -> Result<()> {
        let (reply, answer) = oneshot::channel();
        let failed = |message: String| StoreError {
            path: self.path.display().to_string(),
            message: format!("{what}: {message}"),
        };
        self.writer
            .submit(WriteJob { write, reply })
            .map_err(|_| failed("the writer thread has stopped".into()))?;
        answer
            .await
            .map_err(|_| failed("the writer thread has stopped".into()))?
            .map_err(failed)
    }

    /// Opens `<dir>/tasks.db` only to read it (`keyturn status` while the
    /// daemon is down): `None` when there is none, nothing created, nothing
    /// set up.
    pub fn open_read_only(dir: &Path) -> Result<Option<TaskStore>> {
        let path = dir.join("tasks.db");
        if !path.exists() {
            return Ok(None);
        }
        let db = Connection::open_with_flags(
            &path,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(|e| StoreError {
            path: path.display().to_string(),
            message: format!("cannot open: {e}"),
        })?;
        // Every write is refused: a reader must not change the daemon's store.
        let writer = GroupCommit::inline(|batch: &mut Vec<WriteJob>| {
            for job in batch.drain(..) {
                let _ = job.reply.send(Err("opened read-only".into()));
            }
            Flow::Continue
        });
        // A store the daemon has not opened since a column came: read as
        // it is, nothing migrated.
        let select = select_task(&db).map_err(|e| StoreError {
            path: path.display().to_string(),
            message: format!("cannot read: {e}"),
        })?;
        Ok(Some(TaskStore {
            path,
            db: Mutex::new(db),
            writer,
            select,
        }))
    }

    fn db(&self) -> MutexGuard<'_, Connection> {
        self.db.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn err(&self, what: &str, e: rusqlite::Error) -> StoreError {
        StoreError {
            path: self.path.display().to_string(),
            message: format!("{what}: {e}"),
        }
    }

    /// Records a new live task and one `issuing` item per issuer,
    /// atomically, before anything is issued.
    pub async fn insert(&self, t: &TaskRow) -> Result<()> {
        self.write("insert task", Write::Insert(Box::new(t.clone())))
            .await
    }

    /// Records an item's new state (and its handle and expiry once known).
    pub async fn set_item(
        &self,
        task: &str,
        issuer: &str,
        state: ItemState,
        handle: Option<&str>,
        expires_at_ms: Option<i64>,
        last_error: Option<&str>,
    ) -> Result<()> {
        let write = Write::Item {
            task: task.to_owned(),
            issuer: issuer.to_owned(),
            state,
            handle: handle.map(str::to_owned),
            expires_at_ms,
            last_error: last_error.map(str::to_owned),
        };
        self.write("update task item", write).await
    }

    /// Records only an item's last error (a revocation attempt failed).
    pub async fn item_error(&self, task: &str, issuer: &str, error: &str) -> Result<()> {
        let write = Write::ItemError {
            task: task.to_owned(),
            issuer: issuer.to_owned(),
            error: error.to_owned(),
        };
        self.write("update task item", write).await
    }

    /// Moves a task to `state`: `Live` only from `Starting`, `Ending` only
    /// from either; the first end reason and ender given stay; `Ended`
    /// records when.
    pub async fn set_state(
        &self,
        task: &str,
        state: TaskState,
        reason: Option<&str>,
        by: Option<&str>,
        at_ms: i64,
    ) -> Result<()> {
        let write = Write::State {
            task: task.to_owned(),
            state,
            reason: reason.map(str::to_owned),
            by: by.map(str::to_owned),
            at_ms,
        };
        self.write("update task", write).await
    }

    /// Spends assertion `jti`s (agent, jti, keep until: unix seconds) in
    /// one durable write shared with other callers' (the writer's group
    /// commit): for each, `false` when it was already spent (a replay).
    pub async fn spend_jtis(
        &self,
        jtis: Vec<(String, String, i64)>,
        now: i64,
    ) -> Result<Vec<bool>> {
        let spent = Arc::new(Mutex::new(Vec::new()));
        self.write(
            "spend jtis",
            Write::Spend {
                jtis,
                now,
                spent: spent.clone(),
            },
        )
        .await?;
        Ok(std::mem::take(
            &mut *spent.lock().unwrap_or_else(|p| p.into_inner()),
        ))
    }

    /// Spends an agent's assertion `jti` (see `crate::auth`): `false` when
    /// it was already spent. Rows past `expires_at` (unix seconds) are
    /// pruned first, in the same transaction: such an assertion is refused
    /// as expired before it gets here.
    pub fn spend_jti(&self, agent: &str, jti: &str, expires_at: i64, now: i64) -> Result<bool> {
        let mut db = self.db();
        let tx = db.transaction().map_err(|e| self.err("spend jti", e))?;
        tx.execute("DELETE FROM assertions WHERE expires_at < ?1", params![now])
            .map_err(|e| self.err("prune spent jtis", e))?;
        let inserted = tx
            .execute(
                "INSERT OR IGNORE INTO assertions (agent, jti, expires_at) VALUES (?1, ?2, ?3)",
                params![agent, jti, expires_at],
            )
            .map_err(|e| self.err("spend jti", e))?;
        tx.commit().map_err(|e| self.err("spend jti", e))?;
        Ok(inserted == 1)
    }

    /// One task with its items.
    pub fn get(&self, id: &str) -> Result<Option<TaskRow>> {
        let db = self.db();
        let task = db
            .prepare_cached(&format!("{} WHERE id = ?1", self.select))
            .and_then(|mut stmt| stmt.query_row(params![id], task_row).optional())
            .map_err(|e| self.err("read task", e))?;
        match task {
            None => Ok(None),
            Some(mut t) => {
                t.items = items(&db, id).map_err(|e| self.err("read task items", e))?;
                Ok(Some(t))
            }
        }
    }

    /// Tasks not ended (live or ending), oldest expiry first; or, with
    /// `agent`, that agent's tasks (the `recent_ended` most recent ended ones
    /// too).
    pub fn list(&self, agent: Option<&str>, recent_ended: usize) -> Result<Vec<TaskRow>> {
        let db = self.db();
        let mut out: Vec<TaskRow> = {
            let (sql, p): (String, Vec<&dyn rusqlite::ToSql>) = match &agent {
                Some(a) => (
                    format!(
                        "{} WHERE state != 'ended' AND agent = ?1 ORDER BY expires_at",
                        self.select
                    ),
                    vec![a as &dyn rusqlite::ToSql],
                ),
                None => (
                    format!("{} WHERE state != 'ended' ORDER BY expires_at", self.select),
                    vec![],
                ),
            };
            let mut stmt = db.prepare(&sql).map_err(|e| self.err("list tasks", e))?;
            stmt.query_map(p.as_slice(), task_row)
                .and_then(|rows| rows.collect::<rusqlite::Result<Vec<_>>>())
                .map_err(|e| self.err("list tasks", e))?
        };
        if recent_ended > 0 {
            let limit = i64::try_from(recent_ended).unwrap_or(i64::MAX);
            let mut stmt = db
                .prepare(&format!(
                    "{} WHERE state = 'ended' AND (?1 IS NULL OR agent = ?1)
                     ORDER BY ended_at DESC LIMIT ?2",
                    self.select
                ))
                .map_err(|e| self.err("list tasks", e))?;
            let ended = stmt
                .query_map(params![agent, limit], task_row)
                .and_then(|rows| rows.collect::<rusqlite::Result<Vec<_>>>())
                .map_err(|e| self.err("list tasks", e))?;
            out.extend(ended);
        }
        for t in &mut out {
            t.items = items(&db, &t.task.task_id).map_err(|e| self.err("read task items", e))?;
        }
        Ok(out)
    }
}

/// One batch: every job's write in its own savepoint of one transaction
/// (a failed write is rolled back alone and answered with its error), one
/// commit, then every caller is answered. If the commit fails, all are.
fn serve(db: &mut Connection, batch: &mut Vec<WriteJob>) -> Flow {
    let jobs = std::mem::take(batch);
    let tx = match db.transaction() {
        Ok(tx) => tx,
        Err(e) => {
            let message = format!("cannot begin: {e}");
            for job in jobs {
                let _ = job.reply.send(Err(message.clone()));
            }
            return Flow::Continue;
        }
    };
    let mut results = Vec::with_capacity(jobs.len());
    // A job alone needs no savepoint: the transaction is its own, and a
    // failed write leaves nothing to commit.
    let alone = jobs.len() == 1;
    let run = |sql: &str| {
        tx.prepare_cached(sql)
            .and_then(|mut s| s.execute([]))
            .map(drop)
    };
    for job in &jobs {
        let result = if alone {
            apply(&tx, &job.write)
        } else {
            match run("SAVEPOINT w").and_then(|()| apply(&tx, &job.write)) {
                Ok(()) => run("RELEASE w"),
                Err(e) => run("ROLLBACK TO w")
                    .and_then(|()| run("RELEASE w"))
                    .and(Err(e)),
            }
        };
        results.push(result.map_err(|e| e.to_string()));
    }
    if alone && results[0].is_err() {
        drop(tx);
        for (job, result) in jobs.into_iter().zip(results) {
            let _ = job.reply.send(result);
        }
        return Flow::Continue;
    }
    match tx.commit() {
        Ok(()) => {
            for (job, result) in jobs.into_iter().zip(results) {
                let _ = job.reply.send(result);
            }
        }
        Err(e) => {
            let message = format!("cannot commit: {e}");
            for job in jobs {
                let _ = job.reply.send(Err(message.clone()));
            }
        }
    }
    Flow::Continue
}

fn apply(db: &Connection, write: &Write) -> rusqlite::Result<()> {
    match write {
        Write::Insert(t) => {
            let a = &t.task;
            db.prepare_cached(
                "INSERT INTO tasks (id, agent, tenant, use_case, run_id, initiator, sensitivity, policy,
                                    started_by, started_at, expires_at, state, dir)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, 'starting', ?12)",
            )?
            .execute(params![
                a.task_id,
                a.agent,
                a.tenant,
                a.use_case,
                a.run_id,
                a.initiator,
                a.sensitivity,
                t.policy,
                t.started_by,
                t.started_at_ms,
                t.expires_at_ms,
                t.dir.as_deref().map(path_text).transpose()?
            ])?;
            let mut item = db.prepare_cached(
                "INSERT INTO task_items (task, issuer, state, origin, handle) VALUES (?1, ?2, 'issuing', ?3, ?4)",
            )?;
            for i in &t.items {
                item.execute(params![a.task_id, i.issuer, i.origin, i.handle])?;
            }
        }
        Write::Item {
            task,
            issuer,
            state,
            handle,
            expires_at_ms,
            last_error,
        } => {
            db.prepare_cached(
                "UPDATE task_items SET state = ?3, handle = COALESCE(?4, handle),
                        expires_at = COALESCE(?5, expires_at), last_error = ?6
                 WHERE task = ?1 AND issuer = ?2",
            )?
            .execute(params![
                task,
                issuer,
                state.as_str(),
                handle,
                expires_at_ms,
                last_error
            ])?;
        }
        Write::ItemError {
            task,
            issuer,
            error,
        } => {
            db.prepare_cached(
                "UPDATE task_items SET last_error = ?3 WHERE task = ?1 AND issuer = ?2",
            )?
            .execute(params![task, issuer, error])?;
        }
        Write::State {
            task,
            state,
            reason,
            by,
            at_ms,
        } => {
            db.prepare_cached(
                "UPDATE tasks SET state = ?2, end_reason = COALESCE(end_reason, ?3),
                        ended_by = COALESCE(ended_by, ?5),
                        ended_at = CASE WHEN ?2 = 'ended' THEN ?4 ELSE ended_at END
                 WHERE id = ?1 AND (?2 != 'ending' OR state IN ('starting', 'live'))
                       AND (?2 != 'live' OR state = 'starting')",
            )?
            .execute(params![task, state.as_str(), reason, at_ms, by])?;
        }
        Write::Spend { jtis, now, spent } => {
            db.prepare_cached("DELETE FROM assertions WHERE expires_at < ?1")?
                .execute(params![now])?;
            let mut insert = db.prepare_cached(
                "INSERT OR IGNORE INTO assertions (agent, jti, expires_at) VALUES (?1, ?2, ?3)",
            )?;
            let mut out = Vec::with_capacity(jtis.len());
            for (agent, jti, until) in jtis {
                out.push(insert.execute(params![agent, jti, until])? == 1);
            }
            *spent.lock().unwrap_or_else(|p| p.into_inner()) = out;
        }
    }
    Ok(())
}

/// What [`task_row`] reads; a column added since the first schema reads
/// `NULL` in a store written before it, opened read-only.
fn select_task(db: &Connection) -> rusqlite::Result<String> {
    let or_null = |column: &'static str| -> rusqlite::Result<&'static str> {
        Ok(if has_column(db, "tasks", column)? {
            column
        } else {
            "NULL"
        })
    };
    Ok(format!(
        "SELECT id, agent, tenant, use_case, run_id, initiator, sensitivity, policy,
                started_by, started_at, expires_at, state, ended_at, end_reason, {}, {}
         FROM tasks",
        or_null("dir")?,
        or_null("ended_by")?
    ))
}

/// Whether `table` has `column`.
fn has_column(db: &Connection, table: &str, column: &str) -> rusqlite::Result<bool> {
    db.query_row(
        "SELECT count(*) > 0 FROM pragma_table_info(?1) WHERE name = ?2",
        params![table, column],
        |r| r.get(0),
    )
}

/// A path as stored: text (a task root is checked to be UTF-8 when the
/// config is read; one that is not cannot be recorded, and the start fails).
fn path_text(p: &Path) -> rusqlite::Result<&str> {
    p.to_str().ok_or_else(|| {
        rusqlite::Error::ToSqlConversionFailure(format!("path {} is not UTF-8", p.display()).into())
    })
}

fn task_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<TaskRow> {
    Ok(TaskRow {
        task: TaskAttribution {
            task_id: r.get(0)?,
            agent: r.get(1)?,
            tenant: r.get(2)?,
            use_case: r.get(3)?,
            run_id: r.get(4)?,
            initiator: r.get(5)?,
            sensitivity: r.get(6)?,
        },
        policy: r.get(7)?,
        started_by: r.get(8)?,
        started_at_ms: r.get(9)?,
        expires_at_ms: r.get(10)?,
        state: TaskState::parse(&r.get::<_, String>(11)?)?,
        ended_at_ms: r.get(12)?,
        end_reason: r.get(13)?,
        dir: r.get::<_, Option<String>>(14)?.map(PathBuf::from),
        ended_by: r.get(15)?,
        items: Vec::new(),
    })
}

fn items(db: &Connection, task: &str) -> rusqlite::Result<Vec<ItemRow>> {
    let mut stmt = db.prepare_cached(
        "SELECT issuer, handle, state, expires_at, last_error, origin FROM task_items WHERE task = ?1 ORDER BY issuer",
    )?;
    stmt.query_map(params![task], |r| {
        Ok(ItemRow {
            issuer: r.get(0)?,
            handle: r.get(1)?,
            state: ItemState::parse(&r.get::<_, String>(2)?)?,
            expires_at_ms: r.get(3)?,
            last_error: r.get(4)?,
            origin: r.get(5)?,
        })
    })?
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(id: &str, agent: &str, issuers: &[&str], expires_at_ms: i64) -> TaskRow {
        TaskRow {
            task: TaskAttribution {
                task_id: id.into(),
                agent: agent.into(),
                tenant: "acme".into(),
                use_case: "month-end".into(),
                run_id: "run-1".into(),
                initiator: "alice@example.com".into(),
                sensitivity: "low".into(),
            },
            policy: "invoicing".into(),
            started_by: "uid=1001".into(),
            started_at_ms: 1_000,
            expires_at_ms,
            state: TaskState::Starting,
            ended_at_ms: None,
            end_reason: None,
            dir: Some(PathBuf::from(format!("/run/keyturn/tasks/{agent}/{id}"))),
            ended_by: None,
            items: issuers
                .iter()
                .map(|i| ItemRow {
                    issuer: (*i).into(),
                    handle: None,
                    state: ItemState::Issuing,
                    expires_at_ms: None,
                    last_error: None,
                    origin: Some(format!("https://{i}.example.com:8200")),
                })
                .collect(),
        }
    }

    /// How many item rows task `id` has in `db`.
    fn items_of(db: &Connection, id: &str) -> i64 {
        db.query_row(
            "SELECT count(*) FROM task_items WHERE task = ?1",
            [id],
            |r| r.get(0),
        )
        .unwrap()
    }

    #[tokio::test]
    async fn a_task_survives_reopening_at_every_stage() {
        let dir = tempfile::tempdir().unwrap();
        let s = TaskStore::open(dir.path()).unwrap();
        let t = row("t1", "bot", &["pg", "sts"], 9_000);
        s.insert(&t).await.unwrap();
        // Recorded before anything is issued: both items may exist.
        assert_eq!(s.get("t1").unwrap().unwrap(), t);
        s.set_item(
            "t1",
            "pg",
            ItemState::Issued,
            Some("kt_task_t1"),
            Some(9_000),
            None,
        )
        .await
        .unwrap();
        drop(s);

        let s = TaskStore::open(dir.path()).unwrap();
        let got = s.get("t1").unwrap().unwrap();
        assert_eq!(got.items[0].handle.as_deref(), Some("kt_task_t1"));
        assert_eq!(got.items[0].state, ItemState::Issued);
        assert_eq!(got.items[1].state, ItemState::Issuing);
        s.set_state("t1", TaskState::Live, None, None, 8_000)
            .await
            .unwrap();
        assert_eq!(s.get("t1").unwrap().unwrap().state, TaskState::Live);
        s.set_state("t1", TaskState::Ending, Some("ttl"), Some("keyturn"), 9_000)
            .await
            .unwrap();
        // The first reason stays.
        s.set_state(
            "t1",
            TaskState::Ending,
            Some("end"),
            Some("uid=1001"),
            9_001,
        )
        .await
        .unwrap();
        s.set_item(
            "t1",
            "sts",
            ItemState::Expiring,
            None,
            Some(9_000),
            Some("cannot end early"),
        )
        .await
        .unwrap();
        s.set_item("t1", "pg", ItemState::Verified, None, None, None)
            .await
            .unwrap();
        let got = s.get("t1").unwrap().unwrap();
        assert_eq!(
            (
                got.state,
                got.end_reason.as_deref(),
                got.ended_by.as_deref()
            ),
            (TaskState::Ending, Some("ttl"), Some("keyturn"))
        );
        // The handle is kept when a later update does not repeat it.
        assert_eq!(got.items[0].handle.as_deref(), Some("kt_task_t1"));
        assert!(
            got.items
                .iter()
                .all(|i| i.state.is_done(i.expires_at_ms, 9_000))
        );
        assert!(
            !got.items[1]
                .state
                .is_done(got.items[1].expires_at_ms, 8_999)
        );
        s.set_state("t1", TaskState::Ended, None, None, 9_100)
            .await
            .unwrap();
        drop(s);

        let s = TaskStore::open(dir.path()).unwrap();
        let got = s.get("t1").unwrap().unwrap();
        assert_eq!(
            (got.state, got.ended_at_ms),
            (TaskState::Ended, Some(9_100))
        );
        assert!(s.list(None, 0).unwrap().is_empty());
        assert_eq!(s.list(Some("bot"), 5).unwrap().len(), 1);
        // 0600, whatever the umask.
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("tasks.db"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[tokio::test]
    async fn open_tasks_are_listed_by_expiry_and_by_agent() {
        let dir = tempfile::tempdir().unwrap();
        let s = TaskStore::open(dir.path()).unwrap();
        s.insert(&row("a", "bot", &["pg"], 3_000)).await.unwrap();
        s.insert(&row("b", "other", &["pg"], 2_000)).await.unwrap();
        s.insert(&row("c", "bot", &["pg"], 1_000)).await.unwrap();
        s.set_state("c", TaskState::Ended, Some("end"), None, 1_500)
            .await
            .unwrap();
        let ids = |v: Vec<TaskRow>| v.into_iter().map(|t| t.task.task_id).collect::<Vec<_>>();
        assert_eq!(ids(s.list(None, 0).unwrap()), ["b", "a"]);
        assert_eq!(ids(s.list(Some("bot"), 0).unwrap()), ["a"]);
        assert_eq!(ids(s.list(Some("bot"), 10).unwrap()), ["a", "c"]);
        assert_eq!(ids(s.list(Some("other"), 10).unwrap()), ["b"]);
        // A second task with the same id is refused, not merged.
        assert!(s.insert(&row("a", "bot", &["pg"], 5_000)).await.is_err());
    }

    /// Several callers' writes in one batch: each is applied or refused on
    /// its own (a duplicate task leaves the others, and a half-applied
    /// insert leaves nothing), all under one commit.
    #[test]
    fn a_batch_commits_each_callers_write_alone() {
        let dir = tempfile::tempdir().unwrap();
        let s = TaskStore::open_inline(dir.path()).unwrap();
        let mut db = Connection::open(dir.path().join("tasks.db")).unwrap();
        let mut answers = Vec::new();
        let mut batch = Vec::new();
        for write in [
            Write::Insert(Box::new(row("a", "bot", &["pg"], 3_000))),
            // Same id: refused.
            Write::Insert(Box::new(row("a", "bot", &["pg", "sts"], 4_000))),
            // Its task row goes in, its second item fails: neither stays.
            Write::Insert(Box::new(row("half", "bot", &["pg", "pg"], 4_000))),
            Write::Insert(Box::new(row("b", "bot", &["pg"], 5_000))),
            Write::State {
                task: "b".into(),
                state: TaskState::Ending,
                reason: Some("end".into()),
                by: None,
                at_ms: 4_500,
            },
        ] {
            let (reply, answer) = oneshot::channel();
            batch.push(WriteJob { write, reply });
            answers.push(answer);
        }
        assert_eq!(serve(&mut db, &mut batch), Flow::Continue);
        let got: Vec<bool> = answers
            .into_iter()
            .map(|mut a| a.try_recv().unwrap().is_ok())
            .collect();
        assert_eq!(got, [true, false, false, true, true]);
        let a = s.get("a").unwrap().unwrap();
        assert_eq!((a.expires_at_ms, a.items.len()), (3_000, 1));
        assert!(s.get("half").unwrap().is_none());
        assert_eq!(items_of(&db, "half"), 0);
        assert_eq!(s.get("b").unwrap().unwrap().state, TaskState::Ending);

        // Alone in its batch (no savepoint), a half-applied insert leaves
        // nothing either, and the next batch commits.
        for (write, ok) in [
            (
                Write::Insert(Box::new(row("half2", "bot", &["pg", "pg"], 4_000))),
                false,
            ),
            (
                Write::Insert(Box::new(row("c", "bot", &["pg"], 6_000))),
                true,
            ),
        ] {
            let (reply, mut answer) = oneshot::channel();
            let mut batch = vec![WriteJob { write, reply }];
            assert_eq!(serve(&mut db, &mut batch), Flow::Continue);
            assert_eq!(answer.try_recv().unwrap().is_ok(), ok);
        }
        assert!(s.get("half2").unwrap().is_none());
        assert_eq!(items_of(&db, "half2"), 0);
        assert_eq!(s.get("c").unwrap().unwrap().items.len(), 1);
    }

    /// A store made before tasks recorded their directory and items their
    /// origin gets the columns; what it held reads as not recorded, and new
    /// tasks keep both.
    #[tokio::test]
    async fn a_store_from_before_dirs_and_origins_gets_their_columns() {
        let dir = tempfile::tempdir().unwrap();
        {
            let db = Connection::open(dir.path().join("tasks.db")).unwrap();
            db.execute_batch(
                "CREATE TABLE tasks (id TEXT NOT NULL PRIMARY KEY, agent TEXT NOT NULL,
                     tenant TEXT NOT NULL, use_case TEXT NOT NULL, run_id TEXT NOT NULL,
                     initiator TEXT NOT NULL, sensitivity TEXT NOT NULL, policy TEXT NOT NULL,
                     started_by TEXT NOT NULL, started_at INTEGER NOT NULL,
                     expires_at INTEGER NOT NULL, state TEXT NOT NULL, ended_at INTEGER,
                     end_reason TEXT);
                 CREATE TABLE task_items (task TEXT NOT NULL, issuer TEXT NOT NULL, handle TEXT,
                     state TEXT NOT NULL, expires_at INTEGER, last_error TEXT,
                     PRIMARY KEY (task, issuer));
                 INSERT INTO tasks VALUES ('old', 'bot', 'acme', 'm', 'r', 'i', 'low', 'p',
                     'uid=1', 1000, 9000, 'live', NULL, NULL);
                 INSERT INTO task_items VALUES ('old', 'pg', 'kt_task_old', 'issued', 9000, NULL);",
            )
            .unwrap();
        }
        let s = TaskStore::open(dir.path()).unwrap();
        let old = s.get("old").unwrap().unwrap();
        assert_eq!(old.dir, None);
        assert_eq!(old.items[0].origin, None);
        assert_eq!(old.items[0].handle.as_deref(), Some("kt_task_old"));
        let new = row("new", "bot", &["pg", "sts"], 9_000);
        s.insert(&new).await.unwrap();
        drop(s);
        // Reopening adds nothing twice.
        let s = TaskStore::open(dir.path()).unwrap();
        let got = s.get("new").unwrap().unwrap();
        assert_eq!(got, new);
        assert_eq!(
            got.dir.as_deref(),
            Some(Path::new("/run/keyturn/tasks/bot/new"))
        );
        assert_eq!(
            got.items[1].origin.as_deref(),
            Some("https://sts.example.com:8200")
        );
    }

    #[tokio::test]
    async fn read_only_opens_what_exists_and_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        assert!(TaskStore::open_read_only(dir.path()).unwrap().is_none());
        assert!(!dir.path().join("tasks.db").exists(), "nothing created");
        let s = TaskStore::open(dir.path()).unwrap();
        s.insert(&row("a", "bot", &["pg"], 3_000)).await.unwrap();
        drop(s);
        let r = TaskStore::open_read_only(dir.path()).unwrap().unwrap();
        assert_eq!(r.list(None, 0).unwrap()[0].task.task_id, "a");
        assert!(r.insert(&row("b", "bot", &["pg"], 3_000)).await.is_err());
    }

    /// A store written before `ended_by` existed is read as it is (the
    /// column `NULL`) and gains the column when the daemon opens it.
    #[tokio::test]
    async fn a_store_without_ended_by_is_read_then_migrated() {
        let dir = tempfile::tempdir().unwrap();
        {
            let old = SCHEMA.replace(",\n        ended_by      TEXT", "");
            assert_ne!(old, SCHEMA);
            let db = Connection::open(dir.path().join("tasks.db")).unwrap();
            db.execute_batch(&old).unwrap();
            db.execute_batch(
                "INSERT INTO tasks (id, agent, tenant, use_case, run_id, initiator, sensitivity, policy,
                                    started_by, started_at, expires_at, state, ended_at, end_reason)
                 VALUES ('t', 'bot', 'acme', 'u', 'r', 'i', 'low', 'p', 'uid=1', 1, 2, 'ended', 2, 'ttl')",
            )
            .unwrap();
        }
        let r = TaskStore::open_read_only(dir.path()).unwrap().unwrap();
        let t = r.get("t").unwrap().unwrap();
        assert_eq!((t.end_reason.as_deref(), t.ended_by), (Some("ttl"), None));
        drop(r);
        let s = TaskStore::open(dir.path()).unwrap();
        s.insert(&row("n", "bot", &["pg"], 9_000)).await.unwrap();
        s.set_state("n", TaskState::Ending, Some("end"), Some("uid=1001"), 5_000)
            .await
            .unwrap();
        let n = s.get("n").unwrap().unwrap();
        assert_eq!(n.ended_by.as_deref(), Some("uid=1001"));
        assert_eq!(s.get("t").unwrap().unwrap().ended_by, None);
    }

    /// Signing key uses are per credential; the rows written before they
    /// named one move to the default credential, and nothing else.
    #[test]
    fn key_uses_are_per_credential_and_unnamed_ones_are_adopted() {
        use crate::oauth::service::TokenLedger;
        let dir = tempfile::tempdir().unwrap();
        // A store as the previous schema left it.
        {
            let db = Connection::open(dir.path().join("tasks.db")).unwrap();
            db.execute_batch(
                "CREATE TABLE token_keys (version INTEGER NOT NULL PRIMARY KEY, signed_until INTEGER NOT NULL);
                 INSERT INTO token_keys VALUES (3, 500), (4, 900);",
            )
            .unwrap();
        }
        let s = TaskStore::open(dir.path()).unwrap();
        s.signed("k/partner", 3, 100, None).unwrap();
        assert_eq!(s.signed_until("k/partner").unwrap(), [(3, 100)]);
        assert!(s.signed_until("k/default").unwrap().is_empty());
        s.adopt_unnamed_key_uses("k/default").unwrap();
        let mut d = s.signed_until("k/default").unwrap();
        d.sort();
        assert_eq!(d, [(3, 500), (4, 900)]);
        assert_eq!(s.signed_until("k/partner").unwrap(), [(3, 100)]);
        // A later use only extends.
        s.signed("k/default", 4, 800, None).unwrap();
        s.signed("k/default", 3, 700, None).unwrap();
        d = s.signed_until("k/default").unwrap();
        d.sort();
        assert_eq!(d, [(3, 700), (4, 900)]);
        drop(s);
        // Reopening migrates nothing twice.
        let s = TaskStore::open(dir.path()).unwrap();
        d = s.signed_until("k/default").unwrap();
        d.sort();
        assert_eq!(d, [(3, 700), (4, 900)]);
    }
}
