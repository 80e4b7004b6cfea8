//! The admin connections of the postgres target: pooled, and shared by every
//! target (and postgres task issuer, see [`super::admin`]) of the process
//! that reaches the same server the same way.
//!
//! One credential is one target object, so twenty credentials on one server
//! are twenty targets; they share one pool when their admin DSN file (path
//! *and* current content), `sslmode`, CA file (path and content),
//! `allow_weak_auth`, `connect_timeout` and `pool_size` agree. The registry
//! holds pools weakly; each target holds the pool it used last. The DSN file
//! is still read on every step, so an operator who rotates the admin password
//! in that file needs no reload: the next step sees new content, hence a new
//! pool, and the old pool is dropped (its connections closed) once no target
//! holds it.
//!
//! The pool is `deadpool`'s generic `managed::Pool`, with a
//! [`managed::Manager`] whose
//! `create` is [`Transport::connect`] — the same TLS, channel-binding and
//! [`AuthGuard`](super::connect) path as an unpooled connection, and errors
//! that keep their kind and their explanation (a refused MD5 exchange, a
//! wrong CA). `deadpool-postgres` would have meant going through its
//! `Connect` trait, whose `tokio_postgres::Error` cannot carry those, for a
//! statement cache that is a dozen lines here.
//!
//! A pooled connection:
//! - carries its session settings in the startup packet (`statement_timeout`
//!   in `options`, `application_name`), and tries `log_statement = 'none'`
//!   once, when it is made (only a superuser may; see the target's doc);
//! - prepares each statement once ([`AdminConn::prepared`]), and runs each
//!   session setup once ([`AdminConn::session`]: the task issuer's
//!   `pg_temp` functions);
//! - is discarded instead of returned when it saw a connection-level error,
//!   and on recycle when its connection task has ended (server restart,
//!   `pg_terminate_backend`). Recycling sends nothing (a ping would cost
//!   every step a round trip); a step whose *reused* connection turns out
//!   dead is retried once on a new one instead (every step is idempotent);
//! - is closed after [`IDLE_TIMEOUT`] unused, by a reaper task that holds
//!   the pool weakly and ends when the pool is empty or gone, so an idle
//!   daemon keeps neither connections nor timers.
//!
//! Logging in costs the client a 4096-round PBKDF2 (SCRAM); new connections
//! log in on the blocking pool ([`Transport::connect_off_worker`]).
//!
//! The pool keeps the parsed admin DSN (a `tokio_postgres::Config`, whose
//! `Debug` hides the password) to make connections with, for as long as the
//! pool lives.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{LazyLock, Mutex};
use std::time::Duration;

use deadpool::managed::{self, Metrics, Object, Pool, PoolError, RecycleError, RecycleResult};
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, Config, Statement};

use super::connect::{PgTls, Transport, WeakAuth};
use crate::model::{ErrorKind, PluginError};

/// Admin connections per pool unless the target says `pool_size`.
pub const DEFAULT_POOL_SIZE: u32 = 4;
/// An admin connection unused this long is closed.
pub(super) const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a step waits for a free connection of a full pool.
const WAIT_TIMEOUT: Duration = Duration::from_secs(60);

/// What makes two targets' admin connections interchangeable. Contents are
/// kept as SHA-256 digests: the key never holds the admin password.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(super) struct PoolKey {
    pub dsn_file: PathBuf,
    pub dsn_digest: [u8; 32],
    pub mode: PgTls,
    /// `ssl_root_cert` and the digest of its content (`verify-full`).
    pub ca: Option<(PathBuf, [u8; 32])>,
    pub weak: WeakAuth,
    pub connect_timeout: Duration,
    pub size: usize,
    pub idle: Duration,
}

pub(crate) type AdminPool = Pool<AdminManager>;

/// Every live pool of the process, by key. Weak: a pool lives as long as a
/// target holds it.
static POOLS: LazyLock<Mutex<HashMap<PoolKey, managed::WeakPool<AdminManager>>>> =
    LazyLock::new(Default::default);

/// The pool for `key`: the live one, or a new one made by `make` (which
/// builds the transport; its errors are the caller's).
pub(super) fn shared(
    key: &PoolKey,
    make: impl FnOnce() -> Result<AdminManager, PluginError>,
) -> Result<AdminPool, PluginError> {
    let mut pools = POOLS.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(pool) = pools.get(key).and_then(|w| w.upgrade()) {
        return Ok(pool);
    }
    let pool = Pool::builder(make()?)
        .max_size(key.size)
        .wait_timeout(Some(WAIT_TIMEOUT))
        .runtime(deadpool::Runtime::Tokio1)
        .build()
        .map_err(|e| PluginError::new(ErrorKind::Fatal, format!("admin connection pool: {e}")))?;
    pools.retain(|_, w| w.upgrade().is_some());
    pools.insert(key.clone(), pool.weak());
    Ok(pool)
}

/// Makes and checks admin connections for one pool.
pub(crate) struct AdminManager {
    /// The admin DSN with the session settings added.
    cfg: Config,
    transport: Transport,
    /// `admin connection to host:port`, for errors.
    what: String,
    idle: Duration,
    /// A reaper task is running for this pool.
    pub(super) reaping: AtomicBool,
    /// Tests: skip the recycle check, so a dead connection reaches a step.
    #[cfg(test)]
    pub(super) trust_idle: AtomicBool,
    /// Tests: steps retried on a new connection.
    #[cfg(test)]
    pub(super) retries: std::sync::atomic::AtomicUsize,
    /// Tests: connections made.
    #[cfg(test)]
    pub(super) created: std::sync::atomic::AtomicUsize,
}

impl AdminManager {
    pub(super) fn new(cfg: Config, transport: Transport, what: String, idle: Duration) -> Self {
        Self {
            cfg,
            transport,
            what,
            idle,
            reaping: AtomicBool::new(false),
            #[cfg(test)]
            trust_idle: AtomicBool::new(false),
            #[cfg(test)]
            retries: Default::default(),
            #[cfg(test)]
            created: Default::default(),
        }
    }

    /// The transport this pool's connections use (also right for the
    /// target's login test: same server, same rules).
    pub(super) fn transport(&self) -> &Transport {
        &self.transport
    }
}

impl std::fmt::Debug for AdminManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminManager")
            .field("what", &self.what)
            .finish_non_exhaustive()
    }
}

impl managed::Manager for AdminManager {
    type Type = AdminConn;
    type Error = PluginError;

    async fn create(&self) -> Result<AdminConn, PluginError> {
        let (client, _task) = self
            .transport
            .connect_off_worker(self.cfg.clone(), self.what.clone())
            .await?;
        // Keep the verifier out of the server log where we may. Failing for
        // lack of privilege is fine (see the target's doc); anything else is
        // not. Session-wide, so once per connection.
        let set = client
            .batch_execute("SET log_statement = 'none'; SET log_min_error_statement = 'panic'");
        match tokio::time::timeout(self.transport.answer_within(), set).await {
            Err(_) => return Err(no_answer(&self.what, self.transport.answer_within())),
            Ok(Err(e)) if e.code() != Some(&SqlState::INSUFFICIENT_PRIVILEGE) => {
                return Err(super::pg_error(&self.what, &e, &[]));
            }
            Ok(_) => {}
        }
        #[cfg(test)]
        self.created.fetch_add(1, Ordering::Relaxed);
        Ok(AdminConn {
            client,
            statements: Mutex::default(),
            session: Mutex::default(),
            lost: AtomicBool::new(false),
        })
    }

    async fn recycle(&self, conn: &mut AdminConn, _: &Metrics) -> RecycleResult<PluginError> {
        #[cfg(test)]
        if self.trust_idle.load(Ordering::Relaxed) {
            return Ok(());
        }
        if conn.lost.load(Ordering::Relaxed) || conn.client.is_closed() {
            return Err(RecycleError::message("the connection is closed"));
        }
        Ok(())
    }
}

/// One pooled admin connection and its prepared statements.
pub(crate) struct AdminConn {
    pub(crate) client: Client,
    statements: Mutex<HashMap<&'static str, Statement>>,
    /// Session setups run on this connection ([`AdminConn::session`]):
    /// whether the server took each.
    session: Mutex<HashMap<&'static str, bool>>,
    /// It saw a connection-level error: never hand it out again.
    lost: AtomicBool,
}

impl AdminConn {
    /// `sql`, prepared on this connection the first time it is used.
    pub(crate) async fn prepared(
        &self,
        sql: &'static str,
    ) -> Result<Statement, tokio_postgres::Error> {
        if let Some(s) = self.cached(sql) {
            return Ok(s);
        }
        let s = self.client.prepare(sql).await?;
        self.statements
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(sql, s.clone());
        Ok(s)
    }

    /// Runs `setup` (session objects, e.g. `pg_temp` functions) once on this
    /// connection: `Ok(true)` once it ran, `Ok(false)` if the server refused
    /// it for lack of privilege (remembered, not tried again on this
    /// connection), any other error as is (tried again next time).
    pub(crate) async fn session(&self, setup: &'static str) -> Result<bool, tokio_postgres::Error> {
        let known = self
            .session
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(setup)
            .copied();
        if let Some(took) = known {
            return Ok(took);
        }
        let took = match self.client.batch_execute(setup).await {
            Ok(()) => true,
            Err(e) if e.code() == Some(&SqlState::INSUFFICIENT_PRIVILEGE) => false,
            Err(e) => return Err(e),
        };
        self.session
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(setup, took);
        Ok(took)
    }

    fn cached(&self, sql: &str) -> Option<Statement> {
        let statements = self.statements.lock().unwrap_or_else(|e| e.into_inner());
        statements.get(sql).cloned()
    }

    /// Maps `e` like [`super::pg_error`], and marks the connection lost when
    /// `e` says the session is gone (or the protocol state is unknown).
    pub(crate) fn error(
        &self,
        ctx: &str,
        e: &tokio_postgres::Error,
        secrets: &[&[u8]],
    ) -> PluginError {
        if connection_lost(e) {
            self.lost.store(true, Ordering::Relaxed);
        }
        super::pg_error(ctx, e, secrets)
    }

    fn is_lost(&self) -> bool {
        self.lost.load(Ordering::Relaxed) || self.client.is_closed()
    }
}

/// Errors after which the connection must not be reused: no server error
/// (I/O, closed, a message out of order) or the session ended by the server
/// (class 08 connection exception, 57P0x shutdown / terminated).
fn connection_lost(e: &tokio_postgres::Error) -> bool {
    match e.as_db_error() {
        None => true,
        Some(db) => {
            let c = db.code().code();
            c.starts_with("08") || c.starts_with("57P")
        }
    }
}

/// A step that got no answer in `within`.
fn no_answer(ctx: &str, within: Duration) -> PluginError {
    PluginError::new(
        ErrorKind::Transient,
        format!(
            "{ctx}: no answer from the server within {}: the connection is closed and the step tried again later",
            humantime::format_duration(within)
        ),
    )
}

/// The bound on a step's statements when the pool is gone (it never is
/// while a lease holds a connection of it).
const DEFAULT_ANSWER_WITHIN: Duration = Duration::from_secs(20);

/// An admin connection lent to one step. Dropped, it goes back to the pool,
/// unless it was lost: then it is closed.
pub(crate) struct Lease {
    /// `None` only after a lost connection with no retry left.
    conn: Option<Object<AdminManager>>,
    /// The step already retried once on a new connection.
    retried: bool,
}

impl std::ops::Deref for Lease {
    type Target = AdminConn;
    fn deref(&self) -> &AdminConn {
        self.conn
            .as_ref()
            .expect("a lease without a retry left is not used again")
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take()
            && conn.is_lost()
        {
            drop(Object::take(conn));
        }
    }
}

impl Lease {
    /// A connection from `pool`; errors are prefixed with `ctx`.
    pub(crate) async fn get(pool: &AdminPool, ctx: &str) -> Result<Self, PluginError> {
        let conn = pool.get().await.map_err(|e| match e {
            PoolError::Backend(e) => PluginError {
                message: format!("{ctx}: {}", e.message),
                ..e
            },
            PoolError::Timeout(_) => PluginError::new(
                ErrorKind::Transient,
                format!(
                    "{ctx}: all {} admin connections to {} stayed busy for {}s",
                    pool.status().max_size,
                    pool.manager().what,
                    WAIT_TIMEOUT.as_secs()
                ),
            ),
            e => PluginError::new(
                ErrorKind::Fatal,
                format!("{ctx}: admin connection pool: {e}"),
            ),
        })?;
        let manager = pool.manager();
        if !manager.reaping.swap(true, Ordering::AcqRel) {
            tokio::spawn(reap(pool.weak(), manager.idle));
        }
        Ok(Self {
            conn: Some(conn),
            retried: false,
        })
    }

    /// `attempt` (a step's statements on this connection), given up when
    /// the server does not answer within [`Transport::answer_within`]
    /// (a server that hangs, or a network that drops packets silently): the
    /// connection is then lost, never handed out again.
    pub(crate) async fn bounded<T>(
        &self,
        ctx: &str,
        attempt: impl std::future::Future<Output = Result<T, PluginError>>,
    ) -> Result<T, PluginError> {
        let conn = self
            .conn
            .as_ref()
            .expect("a lease without a retry left is not used again");
        let within = Object::pool(conn).map_or(DEFAULT_ANSWER_WITHIN, |p| {
            p.manager().transport.answer_within()
        });
        match tokio::time::timeout(within, attempt).await {
            Ok(outcome) => outcome,
            Err(_) => {
                conn.lost.store(true, Ordering::Relaxed);
                Err(no_answer(ctx, within))
            }
        }
    }

    /// After a step's attempt: whether to run it again. A connection that
    /// turned out lost is closed, never returned to the pool. When it was a
    /// reused one (so a new one may well work) and the step has not retried
    /// yet, the pool's idle connections are closed too (after a server
    /// restart they are all dead) and the lease moves to a new connection.
    pub(crate) async fn again<T>(
        &mut self,
        outcome: &Result<T, PluginError>,
        ctx: &str,
    ) -> Result<bool, PluginError> {
        let Some(conn) = self.conn.take_if(|c| outcome.is_err() && c.is_lost()) else {
            return Ok(false);
        };
        let reused = Object::metrics(&conn).recycle_count > 0;
        let pool = Object::pool(&conn);
        drop(Object::take(conn));
        let Some(pool) = pool.filter(|_| reused && !self.retried) else {
            return Ok(false);
        };
        tracing::debug!(
            connection = %pool.manager().what,
            "admin connection lost between uses; retrying the step on a new one"
        );
        #[cfg(test)]
        pool.manager().retries.fetch_add(1, Ordering::Relaxed);
        pool.retain(|_, _| false);
        self.conn = Lease::get(&pool, ctx).await?.conn.take();
        self.retried = true;
        Ok(true)
    }
}

/// Closes `pool`'s connections idle longer than its idle time; ends when
/// the pool is gone or has no connection left (the next `get` starts a new
/// reaper).
async fn reap(pool: managed::WeakPool<AdminManager>, idle: Duration) {
    let period = (idle / 4).max(Duration::from_millis(10));
    loop {
        tokio::time::sleep(period).await;
        let Some(pool) = pool.upgrade() else { return };
        pool.retain(|_, m| m.last_used() < idle);
        if pool.status().size == 0 {
            let manager = pool.manager();
            manager.reaping.store(false, Ordering::Release);
            // A connection made since: keep going unless its `get` already
            // started another reaper.
            if pool.status().size == 0 || manager.reaping.swap(true, Ordering::AcqRel) {
                return;
            }
        }
    }
}

/// The pool a target used last: holding it keeps it (and its connections)
/// alive between steps.
#[derive(Default)]
pub(super) struct PoolSlot(Mutex<Option<(PoolKey, AdminPool)>>);

impl PoolSlot {
    /// The pool for `key`: the one held, or the process's shared one (made
    /// by `make` if there is none), which is then held instead.
    pub(super) fn pool(
        &self,
        key: PoolKey,
        make: impl FnOnce() -> Result<AdminManager, PluginError>,
    ) -> Result<AdminPool, PluginError> {
        let mut slot = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((held, pool)) = &*slot
            && *held == key
        {
            return Ok(pool.clone());
        }
        let pool = shared(&key, make)?;
        *slot = Some((key, pool.clone()));
        Ok(pool)
    }
}

impl std::fmt::Debug for PoolSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PoolSlot")
    }
}
