//! The task store: every task and what each issuer minted for it, in a small
//! SQLite database of its own, `<state_dir>/tasks/tasks.db` (0600, WAL,
//! `synchronous = FULL`), like the alert spool.
//!
//! A task is written *before* anything is issued for it, with one item per
//! issuer in state `issuing`; the handle an issuer returns is written as soon
//! as it is known. So after a crash at any point the store lists every
//! credential that may exist: an item still `issuing` is revoked by task id
//! (the issuer's contract), an `issued` one by its handle, and a live task's
//! TTL is enforced from `expires_at` whatever happened in between. `FULL`
//! because a task is rarer than a rotation step and a forgotten one would be
//! a credential nobody revokes; a task start costs one fsync for the task and
//! one per issuer.
//!
//! No secret is stored: handles are role names, access key ids and token
//! accessors.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use rusqlite::{Connection, OptionalExtension, params};

use super::issuers::TaskAttribution;

/// A task's lifecycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskState {
    /// Issued (or being issued); its credentials work until `expires_at`.
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
            TaskState::Live => "live",
            TaskState::Ending => "ending",
            TaskState::Ended => "ended",
        }
    }

    fn parse(s: &str) -> rusqlite::Result<Self> {
        Ok(match s {
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
    /// `end`, `ttl`, `start_failed`, `decommission`.
    pub end_reason: Option<String>,
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

pub struct TaskStore {
    path: PathBuf,
    db: Mutex<Connection>,
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
        end_reason    TEXT
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
        PRIMARY KEY (task, issuer)
    );
    CREATE TABLE IF NOT EXISTS assertions (
        agent       TEXT    NOT NULL,
        jti         TEXT    NOT NULL,
        expires_at  INTEGER NOT NULL,
        PRIMARY KEY (agent, jti)
    );
";

impl TaskStore {
    /// Opens (creating it 0600 if missing) `<dir>/tasks.db`.
    pub fn open(dir: &Path) -> Result<TaskStore> {
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
        let db = Connection::open(&path).map_err(|e| err("cannot open", &e))?;
        db.execute_batch("PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL;")
            .and_then(|()| db.execute_batch(SCHEMA))
            .map_err(|e| err("cannot set up", &e))?;
        Ok(TaskStore {
            path,
            db: Mutex::new(db),
        })
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
        Ok(Some(TaskStore {
            path,
            db: Mutex::new(db),
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

    /// Records a new live task and one `issuing` item per issuer, in one
    /// transaction, before anything is issued.
    pub fn insert(&self, t: &TaskRow) -> Result<()> {
        let mut db = self.db();
        let tx = db.transaction().map_err(|e| self.err("insert", e))?;
        let a = &t.task;
        tx.execute(
            "INSERT INTO tasks (id, agent, tenant, use_case, run_id, initiator, sensitivity, policy,
                                started_by, started_at, expires_at, state)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, 'live')",
            params![
                a.task_id, a.agent, a.tenant, a.use_case, a.run_id, a.initiator, a.sensitivity,
                t.policy, t.started_by, t.started_at_ms, t.expires_at_ms
            ],
        )
        .map_err(|e| self.err("insert task", e))?;
        for item in &t.items {
            tx.execute(
                "INSERT INTO task_items (task, issuer, state) VALUES (?1, ?2, 'issuing')",
                params![a.task_id, item.issuer],
            )
            .map_err(|e| self.err("insert task item", e))?;
        }
        tx.commit().map_err(|e| self.err("insert", e))
    }

    /// Records an item's new state (and its handle and expiry once known).
    pub fn set_item(
        &self,
        task: &str,
        issuer: &str,
        state: ItemState,
        handle: Option<&str>,
        expires_at_ms: Option<i64>,
        last_error: Option<&str>,
    ) -> Result<()> {
        self.db()
            .execute(
                "UPDATE task_items SET state = ?3, handle = COALESCE(?4, handle),
                        expires_at = COALESCE(?5, expires_at), last_error = ?6
                 WHERE task = ?1 AND issuer = ?2",
                params![
                    task,
                    issuer,
                    state.as_str(),
                    handle,
                    expires_at_ms,
                    last_error
                ],
            )
            .map(drop)
            .map_err(|e| self.err("update task item", e))
    }

    /// Records only an item's last error (a revocation attempt failed).
    pub fn item_error(&self, task: &str, issuer: &str, error: &str) -> Result<()> {
        self.db()
            .execute(
                "UPDATE task_items SET last_error = ?3 WHERE task = ?1 AND issuer = ?2",
                params![task, issuer, error],
            )
            .map(drop)
            .map_err(|e| self.err("update task item", e))
    }

    /// Moves a task to `state`: `Ending` only from `Live`; the first end
    /// reason given stays; `Ended` records when.
    pub fn set_state(
        &self,
        task: &str,
        state: TaskState,
        reason: Option<&str>,
        at_ms: i64,
    ) -> Result<()> {
        self.db()
            .execute(
                "UPDATE tasks SET state = ?2, end_reason = COALESCE(end_reason, ?3),
                        ended_at = CASE WHEN ?2 = 'ended' THEN ?4 ELSE ended_at END
                 WHERE id = ?1 AND (?2 != 'ending' OR state = 'live')",
                params![task, state.as_str(), reason, at_ms],
            )
            .map(drop)
            .map_err(|e| self.err("update task", e))
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
            .query_row(
                &format!("{SELECT_TASK} WHERE id = ?1"),
                params![id],
                task_row,
            )
            .optional()
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
                        "{SELECT_TASK} WHERE state != 'ended' AND agent = ?1 ORDER BY expires_at"
                    ),
                    vec![a as &dyn rusqlite::ToSql],
                ),
                None => (
                    format!("{SELECT_TASK} WHERE state != 'ended' ORDER BY expires_at"),
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
                    "{SELECT_TASK} WHERE state = 'ended' AND (?1 IS NULL OR agent = ?1)
                     ORDER BY ended_at DESC LIMIT ?2"
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

const SELECT_TASK: &str =
    "SELECT id, agent, tenant, use_case, run_id, initiator, sensitivity, policy,
                                  started_by, started_at, expires_at, state, ended_at, end_reason
                           FROM tasks";

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
        items: Vec::new(),
    })
}

fn items(db: &Connection, task: &str) -> rusqlite::Result<Vec<ItemRow>> {
    let mut stmt = db.prepare_cached(
        "SELECT issuer, handle, state, expires_at, last_error FROM task_items WHERE task = ?1 ORDER BY issuer",
    )?;
    stmt.query_map(params![task], |r| {
        Ok(ItemRow {
            issuer: r.get(0)?,
            handle: r.get(1)?,
            state: ItemState::parse(&r.get::<_, String>(2)?)?,
            expires_at_ms: r.get(3)?,
            last_error: r.get(4)?,
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
            state: TaskState::Live,
            ended_at_ms: None,
            end_reason: None,
            items: issuers
                .iter()
                .map(|i| ItemRow {
                    issuer: (*i).into(),
                    handle: None,
                    state: ItemState::Issuing,
                    expires_at_ms: None,
                    last_error: None,
                })
                .collect(),
        }
    }

    #[test]
    fn a_task_survives_reopening_at_every_stage() {
        let dir = tempfile::tempdir().unwrap();
        let s = TaskStore::open(dir.path()).unwrap();
        let t = row("t1", "bot", &["pg", "sts"], 9_000);
        s.insert(&t).unwrap();
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
        .unwrap();
        drop(s);

        let s = TaskStore::open(dir.path()).unwrap();
        let got = s.get("t1").unwrap().unwrap();
        assert_eq!(got.items[0].handle.as_deref(), Some("kt_task_t1"));
        assert_eq!(got.items[0].state, ItemState::Issued);
        assert_eq!(got.items[1].state, ItemState::Issuing);
        s.set_state("t1", TaskState::Ending, Some("ttl"), 9_000)
            .unwrap();
        // The first reason stays.
        s.set_state("t1", TaskState::Ending, Some("end"), 9_001)
            .unwrap();
        s.set_item(
            "t1",
            "sts",
            ItemState::Expiring,
            None,
            Some(9_000),
            Some("cannot end early"),
        )
        .unwrap();
        s.set_item("t1", "pg", ItemState::Verified, None, None, None)
            .unwrap();
        let got = s.get("t1").unwrap().unwrap();
        assert_eq!(
            (got.state, got.end_reason.as_deref()),
            (TaskState::Ending, Some("ttl"))
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
        s.set_state("t1", TaskState::Ended, None, 9_100).unwrap();
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

    #[test]
    fn open_tasks_are_listed_by_expiry_and_by_agent() {
        let dir = tempfile::tempdir().unwrap();
        let s = TaskStore::open(dir.path()).unwrap();
        s.insert(&row("a", "bot", &["pg"], 3_000)).unwrap();
        s.insert(&row("b", "other", &["pg"], 2_000)).unwrap();
        s.insert(&row("c", "bot", &["pg"], 1_000)).unwrap();
        s.set_state("c", TaskState::Ended, Some("end"), 1_500)
            .unwrap();
        let ids = |v: Vec<TaskRow>| v.into_iter().map(|t| t.task.task_id).collect::<Vec<_>>();
        assert_eq!(ids(s.list(None, 0).unwrap()), ["b", "a"]);
        assert_eq!(ids(s.list(Some("bot"), 0).unwrap()), ["a"]);
        assert_eq!(ids(s.list(Some("bot"), 10).unwrap()), ["a", "c"]);
        assert_eq!(ids(s.list(Some("other"), 10).unwrap()), ["b"]);
        // A second task with the same id is refused, not merged.
        assert!(s.insert(&row("a", "bot", &["pg"], 5_000)).is_err());
    }

    #[test]
    fn read_only_opens_what_exists_and_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        assert!(TaskStore::open_read_only(dir.path()).unwrap().is_none());
        assert!(!dir.path().join("tasks.db").exists(), "nothing created");
        let s = TaskStore::open(dir.path()).unwrap();
        s.insert(&row("a", "bot", &["pg"], 3_000)).unwrap();
        drop(s);
        let r = TaskStore::open_read_only(dir.path()).unwrap().unwrap();
        assert_eq!(r.list(None, 0).unwrap()[0].task.task_id, "a");
        assert!(r.insert(&row("b", "bot", &["pg"], 3_000)).is_err());
    }
}
