//! `postgres`: the credential is the password of a PostgreSQL role.
//!
//! keyturn connects with an admin DSN read from a file (re-read on every
//! step, so the operator can rotate the admin password without a reload)
//! and runs `ALTER ROLE <role> WITH LOGIN PASSWORD '<verifier>'`. Admin
//! connections come from a pool shared by every target on the same server
//! and DSN: see [`pool`].
//!
//! The password itself never leaves this process: like psql's `\password`
//! (libpq `PQencryptPasswordConn`), we hash it client-side into a
//! SCRAM-SHA-256 verifier and send only that. So the plaintext cannot land in
//! the server log, `pg_stat_activity` or an error message quoting the query.
//! We still ask the session for `log_statement = 'none'` so the verifier stays
//! out of the logs too; that needs superuser (or `GRANT SET ON PARAMETER`),
//! and an admin role without it still works — it only loses that extra layer.
//! A SCRAM verifier is accepted by `md5`, `password` and `scram-sha-256`
//! entries of `pg_hba.conf` alike (PostgreSQL ≥ 10).
//!
//! Strategies:
//! - `single_user`: every version is the password of `role`. Setting a new
//!   one invalidates the old one at once (the window invariant 1 documents).
//! - `alternating_users`: odd versions log in as `role`, even versions as
//!   `<role>_clone`, so the previous value keeps working until
//!   [`Target::retire`] clears its password when the grace period ends. The
//!   clone is created on first use as `CREATE ROLE <role>_clone LOGIN INHERIT
//!   IN ROLE <role>`: a member of `role` that inherits every privilege granted
//!   to it (and to objects it owns), the pattern AWS documents for its
//!   alternating-users rotation. Per-role settings (`ALTER ROLE role SET ...`)
//!   are not inherited; copy them to the clone if the agent relies on them.
//!   Objects the clone creates are owned by the clone; use `SET ROLE role` in
//!   the agent if ownership matters.
//!
//! Role names are used exactly as configured (always quoted): `Invoice_Bot`
//! and `invoice_bot` are different roles.
//!
//! The verifier travels as a bind parameter whose `Debug` is redacted, read
//! by a constant `DO` block that runs the `ALTER ROLE`: tokio-postgres logs
//! every statement's text and every parameter's `Debug` at debug level, and
//! keyturn's log bridges those records, so a verifier in the statement text
//! would be in keyturn's own log. (A verifier plus one observed login lets
//! its holder log in as the role.) On the server, `log_statement` shows the
//! `DO` block, not the `ALTER ROLE` it runs; `log_statement = 'all'` would
//! show the bind parameter, which is why the session still asks for
//! `log_statement = 'none'` above.
//!
//! TLS, channel binding and the refusal of clear-text and MD5 password
//! exchanges: see [`connect`]. `sslmode` is the target's setting (the DSN's
//! parser knows only disable/prefer/require); a DSN's own `sslmode=require`
//! counts when the target names none.
//!
//! `alternating_users` adopts an existing `<role>_clone` only if keyturn made
//! it: keyturn's mark in its comment, a member of `role` that inherits, no
//! other membership and no attribute beyond LOGIN/INHERIT. Anything else is
//! someone else's role, and setting its password would hand it to the agent.

pub(crate) mod admin;
mod connect;
pub(crate) mod pool;
pub(crate) mod scram;

use async_trait::async_trait;
use bytes::BytesMut;
use tokio_postgres::Config;
use tokio_postgres::config::Host;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::{IsNull, ToSql, Type, to_sql_checked};

use admin::Admin;
use pool::{AdminConn, AdminPool, Lease};

pub use connect::{PgTls, WeakAuth};
pub use pool::DEFAULT_POOL_SIZE;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use super::{Left, Target, TargetPlugin};
use crate::config::validate::{Loc, Validator, Zero, duration_value};
use crate::model::{CredentialKey, ErrorKind, PluginError, SecretValue, VersionNo};

/// PostgreSQL's identifier limit (NAMEDATALEN - 1). Longer names are silently
/// truncated by the server, so `role` and its clone could collide: refuse them.
const MAX_ROLE_LEN: usize = 63;
const CLONE_SUFFIX: &str = "_clone";
/// Marks which version a role's password belongs to (`COMMENT ON ROLE`), so a
/// late `retire(previous)` never clears a newer version set on the same role.
const VERSION_MARK: &str = "keyturn: version ";
/// Every comment keyturn puts on a clone starts with this: the clone was made
/// by keyturn (the mark at creation, then [`VERSION_MARK`]).
const KEYTURN_MARK: &str = "keyturn: ";

/// Sets the password (and, under `alternating_users`, the version mark) of
/// the role named by the session settings `keyturn.*`, which the same
/// transaction set from bind parameters. Constant text: nothing secret is in
/// any statement tokio-postgres or the server may log.
///
/// The `ALTER ROLE` that `format` builds holds the verifier as a literal,
/// and the server puts a failed statement's text in the error's context,
/// which it logs (black-box finding: the verifier in the server log after
/// the role was renamed away). Its error is raised again from outside it,
/// with the same code and message and no statement text.
const SET_PASSWORD: &str = "DO $keyturn$ BEGIN \
    BEGIN \
    EXECUTE format('ALTER ROLE %I WITH LOGIN PASSWORD %L', \
        current_setting('keyturn.role'), current_setting('keyturn.verifier')); \
    EXCEPTION WHEN OTHERS THEN \
        RAISE EXCEPTION USING ERRCODE = SQLSTATE, MESSAGE = SQLERRM; \
    END; \
    IF current_setting('keyturn.mark') <> '' THEN \
        EXECUTE format('COMMENT ON ROLE %I IS %L', \
            current_setting('keyturn.role'), current_setting('keyturn.mark')); \
    END IF; \
    END $keyturn$";

/// Default time allowed to connect to the server.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// `target = { type = "postgres", ... }`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresConfig {
    /// File holding the admin connection string (libpq key=value or URL).
    pub admin_dsn_file: PathBuf,
    pub role: String,
    /// `single_user` (default) or `alternating_users`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strategy: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connect_timeout: Option<String>,
    /// Database to log into when testing a new value (default: the admin DSN's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub test_dbname: Option<String>,
    /// `disable`, `require` or `verify-full` (default: the admin DSN's
    /// `sslmode=require`, else `disable`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sslmode: Option<String>,
    /// PEM file of the CA(s) the server's certificate must chain to (`verify-full`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ssl_root_cert: Option<PathBuf>,
    /// Weak password exchanges the server may ask for: `password` (clear
    /// text), `md5`. Refused unless named here.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow_weak_auth: Vec<String>,
    /// Most admin connections open at once, shared with every target of the
    /// same server and admin DSN (default [`DEFAULT_POOL_SIZE`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool_size: Option<u32>,
}

/// The server an admin DSN file names: its hosts, host addresses and
/// ports (5432 when it names none); `None` when it cannot be read or parsed.
fn server_of(dsn_file: &std::path::Path) -> Option<(Vec<Host>, Vec<std::net::IpAddr>, Vec<u16>)> {
    let text = zeroize::Zeroizing::new(std::fs::read_to_string(dsn_file).ok()?);
    let cfg: Config = text.trim().parse().ok()?;
    let ports = match cfg.get_ports() {
        [] => vec![5432],
        ports => ports.to_vec(),
    };
    Some((
        cfg.get_hosts().to_vec(),
        cfg.get_hostaddrs().to_vec(),
        ports,
    ))
}

/// How versions map to roles.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PgStrategy {
    /// One role; its password changes in place.
    SingleUser,
    /// Two roles (`role`, `role_clone`) take turns, so the previous value
    /// keeps working through the grace period.
    AlternatingUsers,
}

impl PostgresConfig {
    /// A config with the defaults.
    pub fn new(admin_dsn_file: impl Into<PathBuf>, role: impl Into<String>) -> Self {
        Self {
            admin_dsn_file: admin_dsn_file.into(),
            role: role.into(),
            strategy: None,
            connect_timeout: None,
            test_dbname: None,
            sslmode: None,
            ssl_root_cert: None,
            allow_weak_auth: Vec::new(),
            pool_size: None,
        }
    }

    /// The `sslmode` setting; `None` when it is unknown.
    pub fn tls(&self) -> Option<Option<PgTls>> {
        match self.sslmode.as_deref() {
            None => Some(None),
            Some(s) => PgTls::parse(s).map(Some),
        }
    }

    pub fn strategy(&self) -> Option<PgStrategy> {
        match self.strategy.as_deref().unwrap_or("single_user") {
            "single_user" => Some(PgStrategy::SingleUser),
            "alternating_users" => Some(PgStrategy::AlternatingUsers),
            _ => None,
        }
    }

    pub fn with_strategy(mut self, strategy: PgStrategy) -> Self {
        self.strategy = Some(
            match strategy {
                PgStrategy::SingleUser => "single_user",
                PgStrategy::AlternatingUsers => "alternating_users",
            }
            .to_owned(),
        );
        self
    }

    pub fn connect_timeout(&self) -> Duration {
        duration_value(self.connect_timeout.as_deref(), DEFAULT_CONNECT_TIMEOUT)
    }

    /// The roles whose passwords it sets: `role`, and `<role>_clone` under
    /// `alternating_users`.
    pub fn roles(&self) -> Vec<String> {
        match self.strategy() {
            Some(PgStrategy::AlternatingUsers) => {
                vec![self.role.clone(), format!("{}{CLONE_SUFFIX}", self.role)]
            }
            _ => vec![self.role.clone()],
        }
    }

    /// The same role(s) (`role` and `strategy`) on the same server: the
    /// same admin DSN file, or DSN files naming the same hosts and ports.
    /// When either file cannot be read or parsed it cannot be told, and it
    /// counts as the same: revoking there could cut the current value off.
    pub fn same_place(&self, other: &PostgresConfig) -> bool {
        if self.role != other.role || self.strategy() != other.strategy() {
            return false;
        }
        if self.admin_dsn_file == other.admin_dsn_file {
            return true;
        }
        match (
            server_of(&self.admin_dsn_file),
            server_of(&other.admin_dsn_file),
        ) {
            (Some(a), Some(b)) => a == b,
            _ => true,
        }
    }

    pub fn pool_size(&self) -> u32 {
        self.pool_size.unwrap_or(DEFAULT_POOL_SIZE)
    }
}

impl PostgresConfig {
    /// Checks (and completes in place) the settings of the admin connection:
    /// `admin_dsn_file`, `connect_timeout`, `sslmode`, `ssl_root_cert`,
    /// `pool_size`, `allow_weak_auth`. The postgres task issuer has the same.
    pub(crate) fn check_admin(&mut self, v: &mut Validator<'_>, p: Loc<'_>) {
        v.resolve_path(p.key("admin_dsn_file"), &mut self.admin_dsn_file);
        v.duration_or(
            p.key("connect_timeout"),
            self.connect_timeout.as_ref(),
            DEFAULT_CONNECT_TIMEOUT,
            Zero::Rejected,
        );
        match self.tls() {
            None => v.err(
                p.key("sslmode"),
                format!(
                    "unknown sslmode `{}`; expected `disable`, `require` or `verify-full`",
                    self.sslmode.as_deref().unwrap_or_default()
                ),
            ),
            Some(Some(PgTls::VerifyFull)) if self.ssl_root_cert.is_none() => v.err(
                p.key("sslmode"),
                "sslmode = \"verify-full\" needs ssl_root_cert: the PEM file of the CA that signs the server's certificate",
            ),
            Some(mode) if mode != Some(PgTls::VerifyFull) && self.ssl_root_cert.is_some() => v.err(
                p.key("ssl_root_cert"),
                "ssl_root_cert is only used with sslmode = \"verify-full\"; set that, or remove ssl_root_cert",
            ),
            _ => {}
        }
        if let Some(ca) = &mut self.ssl_root_cert {
            v.resolve_path(p.key("ssl_root_cert"), ca);
        }
        if self.pool_size == Some(0) {
            v.err(
                p.key("pool_size"),
                "pool_size must be at least 1 (the most admin connections keyturn keeps open to this server)",
            );
        }
        for (i, name) in self.allow_weak_auth.iter().enumerate() {
            if !WeakAuth::NAMES.contains(&name.as_str()) {
                v.err(
                    p.key("allow_weak_auth").index(i),
                    format!("unknown authentication method `{name}`; expected `password` or `md5`"),
                );
            }
        }
    }
}

impl TargetPlugin for PostgresConfig {
    fn check(&mut self, v: &mut Validator<'_>, p: Loc<'_>) {
        // A role name is an identifier keyturn quotes itself, within
        // PostgreSQL's 63-byte limit; under `alternating_users` the clone's
        // name adds `_clone`, so leave room for it (black-box finding: a
        // 60-byte `single_user` role, which makes no clone, was refused).
        let role = &self.role;
        let alternating = self.strategy() == Some(PgStrategy::AlternatingUsers);
        let max = if alternating {
            MAX_ROLE_LEN - CLONE_SUFFIX.len()
        } else {
            MAX_ROLE_LEN
        };
        if role.is_empty() || role.len() > max || role.contains('\0') {
            let why = if alternating {
                " (keyturn adds `_clone` for alternating_users)"
            } else {
                ""
            };
            v.err(
                p.key("role"),
                format!("invalid role `{role}`: it must be 1 to {max} bytes{why} without NUL"),
            );
        }
        if self.strategy().is_none() {
            v.err(
                p.key("strategy"),
                format!(
                    "unknown strategy `{}`; expected `single_user` or `alternating_users`",
                    self.strategy.as_deref().unwrap_or_default()
                ),
            );
        }
        self.check_admin(v, p);
    }

    fn build(&self) -> Result<Option<Arc<dyn Target>>, PluginError> {
        Ok(Some(Arc::new(PostgresTarget::new(self.clone())?)))
    }
}

#[derive(Debug)]
pub struct PostgresTarget {
    s: PostgresConfig,
    /// `<role>_clone` under `alternating_users`.
    clone: Option<String>,
    admin: Admin,
}

impl PostgresTarget {
    pub fn new(s: PostgresConfig) -> Result<Self, PluginError> {
        let invalid = |m: String| PluginError::new(ErrorKind::Invalid, m);
        if s.role.is_empty() || s.role.contains('\0') {
            return Err(invalid(
                "postgres target: role must be non-empty and contain no NUL".into(),
            ));
        }
        let clone = match s.strategy() {
            Some(PgStrategy::SingleUser) => None,
            Some(PgStrategy::AlternatingUsers) => Some(format!("{}{CLONE_SUFFIX}", s.role)),
            None => return Err(invalid("postgres target: unknown strategy".into())),
        };
        let longest = clone.as_deref().unwrap_or(&s.role);
        if longest.len() > MAX_ROLE_LEN {
            return Err(invalid(format!(
                "postgres target: role name {longest:?} is longer than {MAX_ROLE_LEN} bytes"
            )));
        }
        if let Some(db) = &s.test_dbname
            && (db.is_empty() || db.contains('\0'))
        {
            return Err(invalid(
                "postgres target: test_dbname must be non-empty".into(),
            ));
        }
        let admin = Admin::new(&s, "postgres target")?;
        Ok(Self { s, clone, admin })
    }

    /// The role `version` logs in as.
    fn role_for(&self, version: VersionNo) -> &str {
        match &self.clone {
            Some(clone) if version.is_multiple_of(2) => clone,
            _ => &self.s.role,
        }
    }

    /// The admin DSN and the pool of connections it names (see [`admin`]).
    async fn pool(&self, step: &str) -> Result<(Config, AdminPool), PluginError> {
        self.admin.pool(&self.describe(), step).await
    }

    /// The database `test` logs into: `test_dbname`, else the admin DSN's
    /// (libpq's default database is the user name; the admin connection
    /// used that when its DSN names none).
    fn test_db<'a>(&'a self, admin: &'a Config) -> &'a str {
        self.s
            .test_dbname
            .as_deref()
            .or(admin.get_dbname())
            .or(admin.get_user())
            .unwrap_or("postgres")
    }

    /// An admin connection for `step`, from the shared pool.
    async fn admin(&self, step: &str) -> Result<Lease, PluginError> {
        self.admin.lease(&self.describe(), step).await
    }

    /// Creates `<role>_clone` as a member of `role` if it does not exist yet,
    /// with keyturn's mark in its comment (one implicit transaction, so a crash
    /// never leaves an unmarked clone); adopts an existing one only if it is
    /// what keyturn makes.
    async fn ensure_clone(
        &self,
        conn: &AdminConn,
        clone: &str,
        ctx: &str,
    ) -> Result<(), PluginError> {
        let sql = format!(
            "CREATE ROLE {c} LOGIN INHERIT IN ROLE {r}; COMMENT ON ROLE {c} IS {m}",
            c = quote_ident(clone),
            r = quote_ident(&self.s.role),
            m = quote_literal(&format!("{KEYTURN_MARK}clone of {}", self.s.role)),
        );
        if !role_exists(conn, clone, ctx).await? {
            match conn.client.batch_execute(&sql).await {
                Ok(()) => return Ok(()),
                // Another keyturn (or a retried step) created it meanwhile:
                // checked below like any existing role.
                Err(e) if e.code() == Some(&SqlState::DUPLICATE_OBJECT) => {}
                Err(e) => {
                    return Err(conn.error(&format!("{ctx}: creating role {clone:?}"), &e, &[]));
                }
            }
        }
        let problems = self.foreign_clone(conn, clone, ctx).await?;
        if problems.is_empty() {
            return Ok(());
        }
        Err(self.clone_refused(ctx, clone, &problems))
    }

    /// Why keyturn will not use the existing role `clone` (`problems`, from
    /// [`Self::foreign_clone`]), and what to do. Black-box finding: a clone
    /// keyturn made, given a role or an attribute by hand since, was called
    /// someone else's role to drop.
    fn clone_refused(&self, ctx: &str, clone: &str, problems: &[CloneProblem]) -> PluginError {
        let listed = problems
            .iter()
            .map(|p| p.what.as_str())
            .collect::<Vec<_>>()
            .join("; ");
        let message = if problems.iter().any(|p| p.fix.is_none()) {
            format!(
                "{ctx}: role {clone:?} exists but is not the clone keyturn makes ({listed}); keyturn \
                 will not set a password on someone else's role. Drop or rename it, or choose \
                 another `role`"
            )
        } else {
            let fixes = problems
                .iter()
                .filter_map(|p| p.fix.as_deref())
                .collect::<Vec<_>>()
                .join("; ");
            format!(
                "{ctx}: role {clone:?} is the clone keyturn made of {:?}, changed since \
                 ({listed}); keyturn will not set a password on a clone that differs from the \
                 role it stands in for. Undo the change: `{fixes}`",
                self.s.role
            )
        };
        PluginError::new(ErrorKind::Invalid, message)
    }

    /// Whether `role` carries keyturn's mark (true when it does not exist:
    /// nothing to tell apart).
    async fn marked(&self, conn: &AdminConn, role: &str, ctx: &str) -> Result<bool, PluginError> {
        let comment: Option<Option<String>> =
            role_comment(conn, role, ctx).await?.map(|row| row.get(0));
        Ok(match comment {
            None => true,
            Some(c) => c.is_some_and(|c| c.starts_with(KEYTURN_MARK)),
        })
    }

    /// What makes the existing role `clone` differ from the clone keyturn
    /// creates: empty when it is keyturn's.
    async fn foreign_clone(
        &self,
        conn: &AdminConn,
        clone: &str,
        ctx: &str,
    ) -> Result<Vec<CloneProblem>, PluginError> {
        const SQL: &str = "SELECT r.rolsuper, r.rolcreaterole, r.rolcreatedb, r.rolreplication, \
                        r.rolbypassrls, r.rolinherit, shobj_description(r.oid, 'pg_authid'), \
                        ARRAY(SELECT g.rolname::text FROM pg_auth_members m \
                              JOIN pg_roles g ON g.oid = m.roleid WHERE m.member = r.oid) \
                 FROM pg_roles r WHERE r.rolname = $1";
        let row = async {
            let sql = conn.prepared(SQL).await?;
            conn.client.query_one(&sql, &[&clone]).await
        }
        .await
        .map_err(|e| conn.error(ctx, &e, &[]))?;
        let c = quote_ident(clone);
        let mut problems = Vec::new();
        let mut problem = |what: String, fix: Option<String>| {
            problems.push(CloneProblem { what, fix });
        };
        for (i, attribute) in [
            "SUPERUSER",
            "CREATEROLE",
            "CREATEDB",
            "REPLICATION",
            "BYPASSRLS",
        ]
        .into_iter()
        .enumerate()
        {
            if row.get::<_, bool>(i) {
                problem(
                    format!("it has {attribute}"),
                    Some(format!("ALTER ROLE {c} NO{attribute}")),
                );
            }
        }
        if !row.get::<_, bool>(5) {
            problem(
                "it is NOINHERIT".into(),
                Some(format!("ALTER ROLE {c} INHERIT")),
            );
        }
        let comment: Option<String> = row.get(6);
        if !comment
            .as_deref()
            .is_some_and(|c| c.starts_with(KEYTURN_MARK))
        {
            problem(
                format!("its comment lacks keyturn's mark `{KEYTURN_MARK}`"),
                None,
            );
        }
        let member_of: Vec<String> = row.get(7);
        if !member_of.contains(&self.s.role) {
            problem(
                format!("it is not a member of {:?}", self.s.role),
                Some(format!("GRANT {} TO {c}", quote_ident(&self.s.role))),
            );
        }
        for other in member_of.iter().filter(|g| **g != self.s.role) {
            problem(
                format!("it is also a member of {other:?}"),
                Some(format!("REVOKE {} FROM {c}", quote_ident(other))),
            );
        }
        Ok(problems)
    }

    fn roles(&self) -> Vec<&str> {
        let mut v = vec![self.s.role.as_str()];
        v.extend(self.clone.as_deref());
        v
    }
}

#[async_trait]
impl Target for PostgresTarget {
    fn describe(&self) -> String {
        format!("postgres:{}", self.s.role)
    }

    fn login_for(&self, version: VersionNo) -> Option<String> {
        Some(self.role_for(version).to_owned())
    }

    async fn set(
        &self,
        key: &CredentialKey,
        version: VersionNo,
        value: &SecretValue,
    ) -> Result<(), PluginError> {
        let role = self.role_for(version);
        let ctx = format!(
            "{}: set version {version} of {key} on role {role:?}",
            self.describe()
        );
        if value.is_empty() || value.expose().contains(&0) {
            // PostgreSQL passwords are C strings.
            return Err(PluginError::new(
                ErrorKind::Invalid,
                format!("{ctx}: a PostgreSQL password must be non-empty and contain no NUL byte"),
            ));
        }
        // The verifier is a 4096-round PBKDF2: CPU work, kept off the async
        // workers.
        let password = value.clone();
        let verifier = tokio::task::spawn_blocking(move || scram::verifier(password.expose()))
            .await
            .map_err(|e| PluginError::new(ErrorKind::Fatal, format!("{ctx}: hashing: {e}")))?;
        // Under alternating_users the password and its version mark change
        // together, in one transaction.
        let mark = match self.clone {
            Some(_) => format!("{VERSION_MARK}{version} of {key}"),
            None => String::new(),
        };
        let mut conn = self.admin("set").await?;
        loop {
            let outcome = conn
                .bounded(
                    &ctx,
                    self.set_on(&conn, role, &verifier, &mark, value, &ctx),
                )
                .await;
            if !conn.again(&outcome, &ctx).await? {
                return outcome;
            }
        }
    }

    async fn test(
        &self,
        key: &CredentialKey,
        version: VersionNo,
        value: &SecretValue,
    ) -> Result<(), PluginError> {
        let role = self.role_for(version);
        let (admin, pool) = self.pool("test").await?;
        let mut cfg = Config::new();
        for h in admin.get_hosts() {
            match h {
                Host::Tcp(name) => cfg.host(name),
                Host::Unix(path) => cfg.host_path(path),
            };
        }
        for a in admin.get_hostaddrs() {
            cfg.hostaddr(*a);
        }
        for p in admin.get_ports() {
            cfg.port(*p);
        }
        let db = self.test_db(&admin);
        cfg.user(role)
            .password(value.expose())
            .dbname(db)
            .ssl_mode(admin.get_ssl_mode())
            .connect_timeout(self.admin.connect_timeout)
            .application_name("keyturn-test");
        let ctx = format!(
            "{}: test version {version} of {key}: login as {role:?} to database {db:?} at {}",
            self.describe(),
            endpoint(&cfg)
        );
        // Its own connection (the point is to log in with the new value),
        // on the blocking pool for the SCRAM login, closed at once.
        let (client, task) = pool
            .manager()
            .transport()
            .connect_off_worker(cfg, ctx.clone())
            .await
            .map_err(|e| redact_err(e, value.expose()))?;
        let outcome =
            match tokio::time::timeout(self.admin.connect_timeout, client.simple_query("SELECT 1"))
                .await
            {
                Ok(answer) => answer
                    .map(drop)
                    .map_err(|e| pg_error(&ctx, &e, &[value.expose()])),
                Err(_) => Err(PluginError::new(
                    ErrorKind::Transient,
                    format!(
                        "{ctx}: logged in, but no answer to SELECT 1 within connect_timeout ({})",
                        humantime::format_duration(self.admin.connect_timeout)
                    ),
                )),
            };
        // Dropping the client makes the connection task say goodbye
        // (Terminate) and end; wait for that, briefly.
        drop(client);
        let _ = tokio::time::timeout(self.admin.connect_timeout, task).await;
        outcome
    }

    async fn retire(&self, key: &CredentialKey, previous: VersionNo) -> Result<(), PluginError> {
        if self.clone.is_none() {
            // single_user: the new password already replaced the old one.
            return Ok(());
        }
        let role = self.role_for(previous);
        let ctx = format!(
            "{}: retire version {previous} of {key} on role {role:?}",
            self.describe()
        );
        let mut conn = self.admin("retire").await?;
        loop {
            let outcome = conn
                .bounded(&ctx, self.retire_on(&conn, key, previous, role, &ctx))
                .await;
            if !conn.again(&outcome, &ctx).await? {
                return outcome;
            }
        }
    }

    async fn revoke(&self, key: &CredentialKey) -> Result<(), PluginError> {
        let ctx = format!("{}: revoke {key}", self.describe());
        let mut conn = self.admin("revoke").await?;
        loop {
            let outcome = conn.bounded(&ctx, self.revoke_on(&conn, key, &ctx)).await;
            if !conn.again(&outcome, &ctx).await? {
                return outcome;
            }
        }
    }

    async fn leave(
        &self,
        key: &CredentialKey,
        previous: VersionNo,
        keep: &[String],
    ) -> Result<Left, PluginError> {
        let ctx = format!(
            "{}: end version {previous} of {key} (the config moved it off this target)",
            self.describe()
        );
        let (kept, roles): (Vec<&str>, Vec<&str>) = self
            .roles()
            .into_iter()
            .partition(|r| keep.iter().any(|k| k == r));
        let mut conn = self.admin("leave").await?;
        let ended = loop {
            let outcome = conn
                .bounded(&ctx, self.revoke_roles_on(&conn, key, &roles, &ctx))
                .await;
            if !conn.again(&outcome, &ctx).await? {
                break outcome?;
            }
        };
        Ok(Left {
            ended,
            kept: kept.into_iter().map(str::to_owned).collect(),
        })
    }

    async fn check(&self) -> Result<(), PluginError> {
        let ctx = format!("{}: check", self.describe());
        let (admin, _) = self.pool("check").await?;
        let db = self.test_db(&admin).to_owned();
        let mut conn = self.admin("check").await?;
        let facts = loop {
            let outcome = conn
                .bounded(&ctx, check_facts(&conn, &self.s.role, &db, &ctx))
                .await;
            if !conn.again(&outcome, &ctx).await? {
                break outcome?;
            }
        };
        let invalid = |why: String| {
            Err(PluginError::new(
                ErrorKind::Invalid,
                format!("{ctx}: {why}"),
            ))
        };
        let role = &self.s.role;
        if !facts.role_exists {
            return invalid(format!("role {role:?} does not exist"));
        }
        // Black-box finding: an admin role without CREATEROLE passed, and
        // the first rotation failed "permission denied" without saying why.
        if !facts.admin_may_alter {
            return invalid(format!(
                "the admin role {:?} (admin_dsn_file {}) is neither superuser nor CREATEROLE: it cannot set passwords{}; `ALTER ROLE {} CREATEROLE`",
                facts.admin,
                self.s.admin_dsn_file.display(),
                if self.clone.is_some() {
                    " or create the clone"
                } else {
                    ""
                },
                quote_ident(&facts.admin)
            ));
        }
        // Black-box finding: a `test_dbname` that does not exist passed,
        // and the first rotation set a password its login test could not
        // use: a `single_user` agent was locked out.
        match facts.database {
            None => invalid(format!(
                "database {db:?}, which `test` logs into as {role:?}, does not exist (test_dbname, else the admin DSN's database)"
            )),
            Some((false, _)) => invalid(format!(
                "database {db:?}, which `test` logs into, does not allow connections (datallowconn is false)"
            )),
            Some((true, false)) => invalid(format!(
                "role {role:?} has no CONNECT privilege on database {db:?}, which `test` logs into: `GRANT CONNECT ON DATABASE {} TO {}`",
                quote_ident(&db),
                quote_ident(role)
            )),
            Some((true, true)) => self.check_clone(&mut conn, &ctx).await,
        }
    }
}

/// One way an existing role differs from the clone keyturn makes, and the
/// statement that undoes it (none: the role is not keyturn's).
struct CloneProblem {
    what: String,
    fix: Option<String>,
}

/// The steps' work on one admin connection (the [`Target`] methods retry
/// them once on a new connection when a reused one was dead).
impl PostgresTarget {
    /// `check --online` of an `alternating_users` clone that exists: the
    /// first rotation onto it refuses one that is not keyturn's, or was
    /// changed since (black-box finding: `check` said ok, and the rotation
    /// a period later failed).
    async fn check_clone(&self, conn: &mut Lease, ctx: &str) -> Result<(), PluginError> {
        let Some(clone) = self.clone.as_deref() else {
            return Ok(());
        };
        let problems = loop {
            let outcome = conn
                .bounded(ctx, async {
                    if role_exists(conn, clone, ctx).await? {
                        self.foreign_clone(conn, clone, ctx).await
                    } else {
                        Ok(Vec::new())
                    }
                })
                .await;
            if !conn.again(&outcome, ctx).await? {
                break outcome?;
            }
        };
        if problems.is_empty() {
            Ok(())
        } else {
            Err(self.clone_refused(ctx, clone, &problems))
        }
    }

    async fn set_on(
        &self,
        conn: &AdminConn,
        role: &str,
        verifier: &str,
        mark: &str,
        value: &SecretValue,
        ctx: &str,
    ) -> Result<(), PluginError> {
        if self.clone.as_deref() == Some(role) {
            self.ensure_clone(conn, role, ctx).await?;
        }
        let fail =
            |e: tokio_postgres::Error| conn.error(ctx, &e, &[value.expose(), verifier.as_bytes()]);
        let settings = conn
            .prepared(
                "SELECT set_config('keyturn.role', $1, true), \
                        set_config('keyturn.verifier', $2, true), \
                        set_config('keyturn.mark', $3, true)",
            )
            .await
            .map_err(fail)?;
        // One transaction, pipelined: the four messages leave together and
        // their answers come back in order (one round trip). If one fails,
        // the server rejects the rest of the transaction and its COMMIT rolls
        // back, so the pooled session is idle again either way; the settings
        // are transaction-local, so no secret stays in the session.
        let client = &conn.client;
        let hidden = Hidden(verifier);
        let params: [&(dyn ToSql + Sync); 3] = [&role, &hidden, &mark];
        let (begin, settings, alter, commit) = tokio::join!(
            client.batch_execute("BEGIN"),
            client.execute(&settings, &params),
            client.batch_execute(SET_PASSWORD),
            client.batch_execute("COMMIT"),
        );
        begin.map_err(fail)?;
        settings.map_err(fail)?;
        alter.map_err(fail)?;
        commit.map_err(fail)
    }

    async fn retire_on(
        &self,
        conn: &AdminConn,
        key: &CredentialKey,
        previous: VersionNo,
        role: &str,
        ctx: &str,
    ) -> Result<(), PluginError> {
        let Some(row) = role_comment(conn, role, ctx).await? else {
            return Ok(()); // no such role: nothing logs in with it
        };
        let mark: Option<String> = row.get(0);
        if let Some(mark) = mark.as_deref().and_then(|m| m.strip_prefix(VERSION_MARK))
            && !holds(mark, key, previous)
        {
            // A later version was set on this role after `previous`, or
            // another credential's (this one renamed): clearing the
            // password now would lock that value's agents out.
            tracing::warn!(credential = %key, role, previous, holds = mark, "retire skipped: the role holds another value");
            return Ok(());
        }
        conn.client
            .batch_execute(&format!(
                "ALTER ROLE {} WITH PASSWORD NULL",
                quote_ident(role)
            ))
            .await
            .map_err(|e| conn.error(ctx, &e, &[]))
    }

    async fn revoke_on(
        &self,
        conn: &AdminConn,
        key: &CredentialKey,
        ctx: &str,
    ) -> Result<(), PluginError> {
        self.revoke_roles_on(conn, key, &self.roles(), ctx)
            .await
            .map(drop)
    }

    /// Revokes `roles` (of [`Self::roles`]): no login, no password, their
    /// sessions ended. Returns those that existed.
    async fn revoke_roles_on(
        &self,
        conn: &AdminConn,
        key: &CredentialKey,
        roles: &[&str],
        ctx: &str,
    ) -> Result<Vec<String>, PluginError> {
        let mut present = Vec::new();
        for &role in roles {
            if Some(role) == self.clone.as_deref() && !self.marked(conn, role, ctx).await? {
                // Someone else's role under the clone's name: `set` refused
                // it, so no value keyturn made logs in with it. Not ours to
                // disable.
                tracing::warn!(credential = %key, role, "revoke skipped a role keyturn did not make");
                continue;
            }
            if role_exists(conn, role, ctx).await? {
                // NOLOGIN first so the sessions we terminate cannot come back.
                conn.client
                    .batch_execute(&format!(
                        "ALTER ROLE {} WITH NOLOGIN PASSWORD NULL",
                        quote_ident(role)
                    ))
                    .await
                    .map_err(|e| conn.error(&format!("{ctx}: role {role:?}"), &e, &[]))?;
                present.push(role.to_owned());
            }
        }
        if present.is_empty() {
            return Ok(present);
        }
        // The admin session itself is never one of the role's.
        let terminated =
            admin::terminate_sessions(conn, &present, self.admin.connect_timeout, ctx).await?;
        tracing::info!(credential = %key, roles = ?present, terminated, "postgres logins revoked");
        Ok(present)
    }
}

/// Whether a role whose version mark reads `mark` (after
/// [`VERSION_MARK`]) holds `version` of `key`: `N of AGENT/CREDENTIAL`, or
/// `N` alone as marks were before they named the credential. Black-box
/// finding: a removed credential's retirement cleared a role its renamed
/// successor had set the same version number on.
fn holds(mark: &str, key: &CredentialKey, version: VersionNo) -> bool {
    match mark.split_once(" of ") {
        Some((v, of)) => v == version.to_string() && of == key.to_string(),
        None => mark == version.to_string(),
    }
}

async fn role_exists(conn: &AdminConn, role: &str, ctx: &str) -> Result<bool, PluginError> {
    async {
        let sql = conn
            .prepared("SELECT 1 FROM pg_roles WHERE rolname = $1")
            .await?;
        conn.client.query_opt(&sql, &[&role]).await
    }
    .await
    .map(|r| r.is_some())
    .map_err(|e| conn.error(ctx, &e, &[]))
}

/// What `check --online` looks at on the server.
struct CheckFacts {
    role_exists: bool,
    /// The admin connection's user.
    admin: String,
    /// Superuser or CREATEROLE.
    admin_may_alter: bool,
    /// The test database, when it exists: whether it allows connections,
    /// and whether the role may connect to it.
    database: Option<(bool, bool)>,
}

async fn check_facts(
    conn: &AdminConn,
    role: &str,
    db: &str,
    ctx: &str,
) -> Result<CheckFacts, PluginError> {
    async {
        let row = conn
            .client
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = $1), current_user::text, \
                 (SELECT rolsuper OR rolcreaterole FROM pg_roles WHERE rolname = current_user)",
                &[&role],
            )
            .await?;
        let role_exists: bool = row.get(0);
        let database = if role_exists {
            conn.client
                .query_opt(
                    "SELECT datallowconn, has_database_privilege($1, oid, 'CONNECT') \
                     FROM pg_database WHERE datname = $2",
                    &[&role, &db],
                )
                .await?
                .map(|r| (r.get(0), r.get(1)))
        } else {
            None
        };
        Ok(CheckFacts {
            role_exists,
            admin: row.get(1),
            admin_may_alter: row.get::<_, Option<bool>>(2).unwrap_or(false),
            database,
        })
    }
    .await
    .map_err(|e| conn.error(ctx, &e, &[]))
}

/// The row of `role`'s comment (none: no such role).
pub(crate) async fn role_comment(
    conn: &AdminConn,
    role: &str,
    ctx: &str,
) -> Result<Option<tokio_postgres::Row>, PluginError> {
    async {
        let sql = conn
            .prepared("SELECT shobj_description(oid, 'pg_authid') FROM pg_roles WHERE rolname = $1")
            .await?;
        conn.client.query_opt(&sql, &[&role]).await
    }
    .await
    .map_err(|e| conn.error(ctx, &e, &[]))
}

/// A text bind parameter whose `Debug` is redacted: tokio-postgres logs the
/// `Debug` of every parameter at debug level.
pub(crate) struct Hidden<'a>(pub(crate) &'a str);

impl std::fmt::Debug for Hidden<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("[redacted]")
    }
}

impl ToSql for Hidden<'_> {
    fn to_sql(
        &self,
        ty: &Type,
        out: &mut BytesMut,
    ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        self.0.to_sql(ty, out)
    }

    fn accepts(ty: &Type) -> bool {
        <&str as ToSql>::accepts(ty)
    }

    to_sql_checked!();
}

/// `host:port` list for messages: where we tried, never who or with what.
fn endpoint(cfg: &Config) -> String {
    let ports = cfg.get_ports();
    let port = |i: usize| ports.get(i).or(ports.first()).copied().unwrap_or(5432);
    let hosts: Vec<String> = cfg
        .get_hosts()
        .iter()
        .enumerate()
        .map(|(i, h)| match h {
            Host::Tcp(n) => format!("{n}:{}", port(i)),
            Host::Unix(p) => format!("{}/.s.PGSQL.{}", p.display(), port(i)),
        })
        .collect();
    if hosts.is_empty() {
        format!("localhost:{}", port(0))
    } else {
        hosts.join(",")
    }
}

/// The error's cause chain, `: `-joined (tokio-postgres' Display stops at the
/// top level, e.g. "error connecting to server").
fn cause(e: &tokio_postgres::Error) -> String {
    let mut out = String::new();
    let mut src = std::error::Error::source(e);
    while let Some(s) = src {
        out.push_str(": ");
        out.push_str(&s.to_string());
        src = s.source();
    }
    out
}

/// Maps a tokio-postgres error to a plug-in error. A server error keeps only
/// its message and SQLSTATE (no DETAIL/HINT, no query text); `secrets` are
/// scrubbed from the result anyway, as a last line of defence.
pub(crate) fn pg_error(ctx: &str, e: &tokio_postgres::Error, secrets: &[&[u8]]) -> PluginError {
    let (kind, msg) = match e.as_db_error() {
        Some(db) => {
            let code = db.code();
            // Black-box finding: `check --online` explained a missing
            // privilege, the rotation's error did not.
            let hint = if *code == SqlState::INSUFFICIENT_PRIVILEGE {
                "; the admin DSN's role may set passwords only with CREATEROLE (or as superuser): `keyturn check --online` says what it lacks"
            } else {
                ""
            };
            (
                db_kind(code),
                format!("{ctx}: {} (SQLSTATE {}){hint}", db.message(), code.code()),
            )
        }
        None => {
            let top = e.to_string();
            // tokio-postgres' error kinds are private; its Display strings are
            // the stable part of its API we can branch on.
            let kind = if top.starts_with("authentication error") {
                ErrorKind::Unauthorized
            } else if top.starts_with("invalid connection string")
                || top.starts_with("invalid configuration")
            {
                ErrorKind::Invalid
            } else {
                ErrorKind::Transient
            };
            let cause = cause(e);
            // Black-box finding: a CA file that does not sign the server's
            // certificate was reported with advice to check that the
            // server is up.
            let hint = if cause.contains("invalid peer certificate") {
                "; the server's certificate does not verify against the CA file (ssl_root_cert) for the host name the DSN connects to: check both"
            } else {
                ""
            };
            (kind, format!("{ctx}: {top}{cause}{hint}"))
        }
    };
    let mut err = PluginError::new(kind, msg);
    for s in secrets {
        err = redact_err(err, s);
    }
    err
}

fn redact_err(mut e: PluginError, secret: &[u8]) -> PluginError {
    if let Ok(s) = std::str::from_utf8(secret)
        && !s.is_empty()
        && e.message.contains(s)
    {
        e.message = e.message.replace(s, "[REDACTED]");
    }
    e
}

fn db_kind(code: &SqlState) -> ErrorKind {
    let c = code.code();
    if *code == SqlState::INVALID_PASSWORD
        || *code == SqlState::INVALID_AUTHORIZATION_SPECIFICATION
        || *code == SqlState::INSUFFICIENT_PRIVILEGE
    {
        ErrorKind::Unauthorized
    } else if c.starts_with("08") // connection exception
        || c.starts_with("53") // insufficient resources (too many connections)
        || c.starts_with("57P") // shutting down, cannot connect now
        || *code == SqlState::QUERY_CANCELED // statement_timeout
        || *code == SqlState::T_R_SERIALIZATION_FAILURE
        || *code == SqlState::T_R_DEADLOCK_DETECTED
        || *code == SqlState::LOCK_NOT_AVAILABLE
    {
        ErrorKind::Transient
    } else {
        // Undefined role or database, syntax, ... : config must change.
        ErrorKind::Invalid
    }
}

/// `"name"` with embedded quotes doubled: any role name becomes one identifier.
pub(crate) fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// A string literal safe under either `standard_conforming_strings` setting,
/// as libpq's `PQescapeLiteral` builds it: quotes doubled, and with a
/// backslash present, an `E'...'` literal with backslashes doubled.
fn quote_literal(s: &str) -> String {
    let body = s.replace('\'', "''");
    if s.contains('\\') {
        format!(" E'{}'", body.replace('\\', "\\\\"))
    } else {
        format!("'{body}'")
    }
}

#[cfg(test)]
mod tests {
    //! Real-server tests: they need a PostgreSQL the services script starts
    //! (KEYTURN_TEST_PG_*), and fail — never skip — without it. Each test
    //! works on its own uniquely named roles so they run in parallel.

    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;

    use macro_rules_attribute::apply;
    use tokio_postgres::{Client, NoTls};

    use super::*;
    use crate::test_support::{secret, server_test};

    const NEED: &str =
        "start the test services: `bash scripts/services.sh start` (or run `bash scripts/test.sh`)";

    struct Pg {
        host: String,
        port: u16,
        admin_dsn: String,
    }

    fn pg() -> Pg {
        let var = |n: &str| std::env::var(n).unwrap_or_else(|_| panic!("{n} is not set: {NEED}"));
        Pg {
            host: var("KEYTURN_TEST_PG_HOST"),
            port: var("KEYTURN_TEST_PG_PORT")
                .parse()
                .expect("KEYTURN_TEST_PG_PORT is a port"),
            admin_dsn: var("KEYTURN_TEST_PG_ADMIN_DSN"),
        }
    }

    /// `set`, then `test`, of version `v` with password `pw`: both succeed.
    async fn set_and_test(t: &PostgresTarget, v: VersionNo, pw: &str) {
        t.set(&key(), v, &secret(pw)).await.unwrap();
        t.test(&key(), v, &secret(pw)).await.unwrap();
    }

    fn key() -> CredentialKey {
        crate::test_support::key("bot", "db")
    }

    /// A role unique to one test; dropped (with its clone) when the test ends,
    /// even by panic.
    /// Runs `body`, then drops `roles` even when an assertion in it failed
    /// (the panic goes on afterwards).
    async fn dropping_roles(
        admin: &Client,
        roles: &[String],
        body: impl std::future::Future<Output = ()>,
    ) {
        let outcome = futures::FutureExt::catch_unwind(std::panic::AssertUnwindSafe(body)).await;
        for r in roles {
            admin
                .batch_execute(&format!("DROP ROLE IF EXISTS {}", quote_ident(r)))
                .await
                .unwrap();
        }
        if let Err(panic) = outcome {
            std::panic::resume_unwind(panic);
        }
    }

    struct Fixture {
        pg: Pg,
        role: String,
        dir: tempfile::TempDir,
    }

    impl Fixture {
        async fn new(tag: &str) -> Self {
            let pg = pg();
            let role = format!("kt_{tag}_{}", hex::encode(rand::random::<[u8; 4]>()));
            let f = Fixture {
                pg,
                role,
                dir: tempfile::tempdir().unwrap(),
            };
            f.admin()
                .await
                .batch_execute(&format!("CREATE ROLE {} NOLOGIN", quote_ident(&f.role)))
                .await
                .unwrap();
            std::fs::write(
                f.dir.path().join("admin.dsn"),
                format!("{}\n", f.pg.admin_dsn),
            )
            .unwrap();
            f
        }

        async fn admin(&self) -> Client {
            let cfg: Config = self.pg.admin_dsn.parse().unwrap();
            let (c, conn) = cfg.connect(NoTls).await.unwrap();
            tokio::spawn(conn);
            c
        }

        fn settings(&self, strategy: PgStrategy) -> PostgresConfig {
            PostgresConfig {
                connect_timeout: Some("5s".into()),
                ..PostgresConfig::new(self.dir.path().join("admin.dsn"), &self.role)
            }
            .with_strategy(strategy)
        }

        fn target(&self, strategy: PgStrategy) -> PostgresTarget {
            PostgresTarget::new(self.settings(strategy)).unwrap()
        }

        /// Logs in as `user` with `password`, independently of the target.
        async fn login(&self, user: &str, password: &str) -> Result<Client, tokio_postgres::Error> {
            let mut cfg = Config::new();
            cfg.host(&self.pg.host)
                .port(self.pg.port)
                .user(user)
                .password(password)
                .dbname("postgres")
                .connect_timeout(Duration::from_secs(5));
            let (c, conn) = cfg.connect(NoTls).await?;
            tokio::spawn(conn);
            c.simple_query("SELECT 1").await?;
            Ok(c)
        }

        async fn assert_login_refused(&self, user: &str, password: &str) {
            let e = self.login(user, password).await.err().unwrap_or_else(|| {
                panic!("{user} still logs in with a password that should no longer work")
            });
            assert_eq!(e.code(), Some(&SqlState::INVALID_PASSWORD), "{e}");
        }
    }

    impl Drop for Fixture {
        fn drop(&mut self) {
            let dsn = self.pg.admin_dsn.clone();
            let roles = [self.role.clone(), format!("{}{CLONE_SUFFIX}", self.role)];
            // Drop runs inside the test's runtime: clean up on a fresh one.
            let _ = std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
                rt.block_on(async move {
                    let cfg: Config = dsn.parse().unwrap();
                    let Ok((c, conn)) = cfg.connect(NoTls).await else { return };
                    tokio::spawn(conn);
                    for r in roles {
                        let _ = c
                            .query(
                                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = $1",
                                &[&r],
                            )
                            .await;
                        let _ = c.batch_execute(&format!("DROP ROLE IF EXISTS {}", quote_ident(&r))).await;
                    }
                });
            })
            .join();
        }
    }

    #[test]
    fn a_version_mark_names_the_version_and_the_credential() {
        let k = key();
        let other = crate::test_support::key("bot", "renamed");
        assert!(holds(&format!("3 of {k}"), &k, 3));
        assert!(
            !holds(&format!("3 of {other}"), &k, 3),
            "another credential's"
        );
        assert!(!holds(&format!("4 of {k}"), &k, 3), "a newer version");
        // Marks written before they named the credential.
        assert!(holds("3", &k, 3));
        assert!(!holds("4", &k, 3));
    }

    #[test]
    fn quoting_cannot_be_escaped() {
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
        assert_eq!(quote_literal("it's"), "'it''s'");
        assert_eq!(quote_literal("a\\'b"), " E'a\\\\''b'");
    }

    #[test]
    fn alternating_versions_map_to_two_roles() {
        let s = |strategy| PostgresConfig::new("/nonexistent", "app").with_strategy(strategy);
        let alt = PostgresTarget::new(s(PgStrategy::AlternatingUsers)).unwrap();
        assert_eq!(alt.login_for(1).as_deref(), Some("app"));
        assert_eq!(alt.login_for(2).as_deref(), Some("app_clone"));
        assert_eq!(alt.login_for(3).as_deref(), Some("app"));
        let single = PostgresTarget::new(s(PgStrategy::SingleUser)).unwrap();
        assert_eq!(single.login_for(2).as_deref(), Some("app"));
        // A name the server would truncate, so that role and clone collide.
        let mut long = s(PgStrategy::AlternatingUsers);
        long.role = "r".repeat(60);
        assert_eq!(
            PostgresTarget::new(long).unwrap_err().kind,
            ErrorKind::Invalid
        );
    }

    #[test]
    fn tls_and_weak_auth_settings_are_checked() {
        let errors = |target: &str| -> Vec<(String, String)> {
            let text = format!(
                "[vaults.v]\ntype = \"local\"\n[agents.a]\nowner = \"o\"\ntenant = \"t\"\ntier = \"low\"\n\
                 [agents.a.credentials.db]\nvault = \"v\"\nevery = \"1h\"\ngenerate = {{ kind = \"ed25519\" }}\n\
                 target = {{ type = \"postgres\", admin_dsn_file = \"pg.dsn\", role = \"bot\"{target} }}\n"
            );
            match crate::config::load_str(std::path::Path::new("/etc/keyturn/t.toml"), &text) {
                Ok(_) => Vec::new(),
                Err(e) => e.0.into_iter().map(|e| (e.toml_path, e.message)).collect(),
            }
        };
        let at = |key: &str| format!("agents.a.credentials.db.target.{key}");
        assert_eq!(
            errors(r#", sslmode = "verify-full", ssl_root_cert = "ca.pem""#),
            vec![]
        );
        assert_eq!(
            errors(r#", sslmode = "require", allow_weak_auth = ["md5", "password"]"#),
            vec![]
        );
        let e = errors(r#", sslmode = "verify-ca""#);
        assert_eq!(e.len(), 1, "{e:?}");
        assert_eq!(e[0].0, at("sslmode"));
        assert!(e[0].1.contains("unknown sslmode `verify-ca`"), "{e:?}");
        let e = errors(r#", sslmode = "verify-full""#);
        assert_eq!(e.len(), 1, "{e:?}");
        assert_eq!(e[0].0, at("sslmode"));
        assert!(e[0].1.contains("needs ssl_root_cert"), "{e:?}");
        let e = errors(r#", ssl_root_cert = "ca.pem""#);
        assert_eq!(e.len(), 1, "{e:?}");
        assert_eq!(e[0].0, at("ssl_root_cert"));
        assert!(
            e[0].1.contains("only used with sslmode = \"verify-full\""),
            "{e:?}"
        );
        let e = errors(r#", allow_weak_auth = ["trust"]"#);
        assert_eq!(e.len(), 1, "{e:?}");
        assert_eq!(e[0].0, at("allow_weak_auth[0]"));
        assert!(
            e[0].1.contains("unknown authentication method `trust`"),
            "{e:?}"
        );
    }

    #[test]
    fn pool_size_is_checked() {
        let text = |extra: &str| {
            format!(
                "[vaults.v]\ntype = \"local\"\n[agents.a]\nowner = \"o\"\ntenant = \"t\"\ntier = \"low\"\n\
                 [agents.a.credentials.db]\nvault = \"v\"\nevery = \"1h\"\ngenerate = {{ kind = \"ed25519\" }}\n\
                 target = {{ type = \"postgres\", admin_dsn_file = \"pg.dsn\", role = \"bot\"{extra} }}\n"
            )
        };
        let load = |extra: &str| {
            crate::config::load_str(std::path::Path::new("/etc/keyturn/t.toml"), &text(extra))
        };
        assert!(load(", pool_size = 8").is_ok());
        let e = load(", pool_size = 0").unwrap_err().0;
        assert_eq!(e.len(), 1, "{e:?}");
        assert_eq!(e[0].toml_path, "agents.a.credentials.db.target.pool_size");
        assert!(
            e[0].message.contains("pool_size must be at least 1"),
            "{e:?}"
        );
        assert!(load(", pool_size = -1").is_err());
        assert_eq!(
            PostgresTarget::new(PostgresConfig {
                pool_size: Some(0),
                ..PostgresConfig::new("/nonexistent", "app")
            })
            .unwrap_err()
            .kind,
            ErrorKind::Invalid
        );
    }

    /// Black-box finding: a 60-byte `single_user` role was refused for the
    /// `_clone` suffix only `alternating_users` adds.
    #[test]
    fn role_length_is_checked_against_the_strategy() {
        let load = |role: &str, strategy: &str| {
            let text = format!(
                "[vaults.v]\ntype = \"local\"\n[agents.a]\nowner = \"o\"\ntenant = \"t\"\ntier = \"low\"\n\
                 [agents.a.credentials.db]\nvault = \"v\"\nevery = \"1h\"\ngenerate = {{ kind = \"ed25519\" }}\n\
                 target = {{ type = \"postgres\", admin_dsn_file = \"pg.dsn\", role = \"{role}\"{strategy} }}\n"
            );
            crate::config::load_str(std::path::Path::new("/etc/keyturn/t.toml"), &text)
        };
        let alternating = ", strategy = \"alternating_users\"";
        for n in [57, 58, 63] {
            let role = "r".repeat(n);
            assert!(load(&role, "").is_ok(), "{n} bytes, single_user");
            assert!(
                load(&role, ", strategy = \"single_user\"").is_ok(),
                "{n} bytes, single_user named"
            );
        }
        assert!(load(&"r".repeat(57), alternating).is_ok());
        let e = load(&"r".repeat(58), alternating).unwrap_err().0;
        assert!(
            e[0].message
                .contains("1 to 57 bytes (keyturn adds `_clone`"),
            "{e:?}"
        );
        let e = load(&"r".repeat(64), "").unwrap_err().0;
        assert!(e[0].message.contains("1 to 63 bytes without NUL"), "{e:?}");
    }

    // ---- real PostgreSQL below ----

    /// Black-box findings: a `test_dbname` that does not exist, and an
    /// admin role that may not set passwords, passed `check --online`; the
    /// first rotation then failed (the first after `set`, locking a
    /// `single_user` agent out). Each is named, with what to do.
    #[apply(server_test!)]
    async fn check_finds_a_missing_test_database_and_an_admin_without_createrole() {
        let f = Fixture::new("chk").await;
        let t = PostgresTarget::new(PostgresConfig {
            test_dbname: Some("kt_no_such_db".into()),
            ..f.settings(PgStrategy::SingleUser)
        })
        .unwrap();
        let e = t.check().await.unwrap_err();
        assert_eq!(e.kind, ErrorKind::Invalid, "{e}");
        assert!(
            e.message
                .contains("database \"kt_no_such_db\", which `test` logs into as"),
            "{e}"
        );

        let weak = format!("{}_adm", f.role);
        f.admin()
            .await
            .batch_execute(&format!(
                "CREATE ROLE {} LOGIN PASSWORD 'weak-admin-pw-1'",
                quote_ident(&weak)
            ))
            .await
            .unwrap();
        let dsn = f.dir.path().join("weak.dsn");
        std::fs::write(
            &dsn,
            format!(
                "host={} port={} user={weak} password=weak-admin-pw-1 dbname=postgres\n",
                f.pg.host, f.pg.port
            ),
        )
        .unwrap();
        let t = PostgresTarget::new(PostgresConfig {
            admin_dsn_file: dsn.clone(),
            ..f.settings(PgStrategy::SingleUser)
        })
        .unwrap();
        let e = t.check().await.unwrap_err();
        // The rotation's error says what `check --online` explains.
        let set = t.set(&key(), 1, &secret("weak-set-1")).await.unwrap_err();
        f.admin()
            .await
            .batch_execute(&format!("DROP ROLE {}", quote_ident(&weak)))
            .await
            .unwrap();
        assert!(
            set.message.contains("SQLSTATE 42501")
                && set.message.contains("only with CREATEROLE")
                && set.message.contains("keyturn check --online"),
            "{set}"
        );
        // An empty DSN file is called empty (black-box finding: "the DSN
        // names no host", naming localhost:5432).
        std::fs::write(&dsn, "\n").unwrap();
        let empty = PostgresTarget::new(PostgresConfig {
            admin_dsn_file: dsn.clone(),
            ..f.settings(PgStrategy::SingleUser)
        })
        .unwrap()
        .check()
        .await
        .unwrap_err();
        assert!(
            empty
                .message
                .contains(&format!("admin DSN file {} is empty", dsn.display())),
            "{empty}"
        );
        assert!(
            e.message.contains("is neither superuser nor CREATEROLE")
                && e.message.contains(&dsn.display().to_string())
                && !e.message.contains("weak-admin-pw-1"),
            "{e}"
        );
        f.target(PgStrategy::SingleUser).check().await.unwrap();
    }

    #[apply(server_test!)]
    async fn single_user_set_and_test_log_in_and_old_password_stops_working() {
        let f = Fixture::new("single").await;
        let t = f.target(PgStrategy::SingleUser);
        t.check().await.unwrap();
        set_and_test(&t, 1, "first-pass-1").await;
        f.login(&f.role, "first-pass-1").await.unwrap();

        t.set(&key(), 2, &secret("second-pass-2")).await.unwrap();
        // Idempotent per version: a replayed step changes nothing.
        set_and_test(&t, 2, "second-pass-2").await;
        f.assert_login_refused(&f.role, "first-pass-1").await;
        let e = t
            .test(&key(), 2, &secret("first-pass-1"))
            .await
            .unwrap_err();
        assert_eq!(e.kind, ErrorKind::Unauthorized, "{e}");
        assert!(!e.message.contains("first-pass-1"), "{e}");
        t.retire(&key(), 1).await.unwrap(); // no-op
        f.login(&f.role, "second-pass-2").await.unwrap();
    }

    /// Black-box finding: the verifier reached the server's log when the
    /// password statement failed (the role renamed away): the server logs
    /// a failed statement's text as the error's context, which it also
    /// sends to the client (`where`). Run here as `set` runs it.
    #[apply(server_test!)]
    async fn a_failing_password_statement_tells_the_server_log_no_verifier() {
        let f = Fixture::new("nolog").await;
        let admin = f.admin().await;
        let verifier = scram::verifier(b"canary-for-the-server-log");
        let missing = format!("{}_gone", f.role);
        let run = async {
            admin.batch_execute("BEGIN").await?;
            admin
                .execute(
                    "SELECT set_config('keyturn.role', $1, true), \
                            set_config('keyturn.verifier', $2, true), \
                            set_config('keyturn.mark', '', true)",
                    &[&missing, &verifier.as_str()],
                )
                .await?;
            admin.batch_execute(SET_PASSWORD).await
        };
        let e = run.await.unwrap_err();
        let _ = admin.batch_execute("ROLLBACK").await;
        let db = e.as_db_error().expect("a server error");
        assert_eq!(db.code(), &SqlState::UNDEFINED_OBJECT, "{db:?}");
        assert!(db.message().contains("does not exist"), "{db:?}");
        let salt = verifier.split('$').nth(1).unwrap().to_owned();
        for text in [
            db.message(),
            db.where_().unwrap_or_default(),
            &format!("{db:?}"),
        ] {
            assert!(
                !text.contains(&salt),
                "the verifier is in the error: {text}"
            );
            assert!(
                !text.contains("SCRAM-SHA-256"),
                "the verifier is in the error: {text}"
            );
        }
    }

    #[apply(server_test!)]
    async fn alternating_previous_works_until_retired() {
        let f = Fixture::new("alt").await;
        let t = f.target(PgStrategy::AlternatingUsers);
        let clone = format!("{}_clone", f.role);
        // Something the agent's role may do, to prove the clone inherits it.
        f.admin()
            .await
            .batch_execute(&format!(
                "CREATE TABLE {r}_t (x int); GRANT SELECT ON {r}_t TO {q}",
                r = f.role,
                q = quote_ident(&f.role)
            ))
            .await
            .unwrap();

        set_and_test(&t, 1, "alt-pass-1").await;
        set_and_test(&t, 2, "alt-pass-2").await;
        assert_eq!(t.login_for(2).as_deref(), Some(clone.as_str()));

        let c2 = f.login(&clone, "alt-pass-2").await.unwrap();
        c2.simple_query(&format!("SELECT * FROM {}_t", f.role))
            .await
            .unwrap();
        // Grace period: the previous value still logs in.
        f.login(&f.role, "alt-pass-1").await.unwrap();

        t.retire(&key(), 1).await.unwrap();
        t.retire(&key(), 1).await.unwrap(); // idempotent
        f.assert_login_refused(&f.role, "alt-pass-1").await;
        f.login(&clone, "alt-pass-2").await.unwrap();

        // v3 goes back to `role`; a late retire(1) must not clear it.
        t.set(&key(), 3, &secret("alt-pass-3")).await.unwrap();
        t.retire(&key(), 1).await.unwrap();
        f.login(&f.role, "alt-pass-3").await.unwrap();
        t.retire(&key(), 2).await.unwrap();
        f.assert_login_refused(&clone, "alt-pass-2").await;

        f.admin()
            .await
            .batch_execute(&format!("DROP TABLE {}_t", f.role))
            .await
            .unwrap();
    }

    #[apply(server_test!)]
    async fn passwords_with_quotes_and_backslashes_round_trip() {
        let f = Fixture::new("quote").await;
        let t = f.target(PgStrategy::SingleUser);
        for (v, pw) in [
            (1, r#"a'b"c\d\\'e; DROP ROLE postgres; --"#),
            (2, r"\'); SELECT 1; --\"),
            (3, "ünï€ode ' $$ $1 %s {}"),
            // SASLprep changes these (no-break space, Roman numeral nine):
            // the verifier and the login must prepare them alike.
            (4, "nb\u{a0}sp \u{2168} ﬁ"),
        ] {
            set_and_test(&t, v, pw).await;
            f.login(&f.role, pw).await.unwrap();
        }
    }

    /// Black-box finding: a server (or a proxy in front of it) that accepts
    /// and then never answers held a step for ever: `connect_timeout`
    /// covered the socket only, and the statements had no client-side
    /// bound. Rotation stalled at `set` with no error, and a revocation
    /// behind it never ended. Now the login is bounded by `connect_timeout`
    /// and a step's statements by twice that; the connection is dropped.
    #[apply(server_test!)]
    async fn a_server_that_stops_answering_fails_the_step_in_bounded_time() {
        let f = Fixture::new("stall").await;
        let proxy =
            crate::test_support::StallProxy::start(format!("{}:{}", f.pg.host, f.pg.port)).await;
        let dsn: String =
            f.pg.admin_dsn
                .split_whitespace()
                .map(|kv| match kv.split_once('=') {
                    Some(("host", _)) => "host=127.0.0.1".to_owned(),
                    Some(("port", _)) => format!("port={}", proxy.port),
                    _ => kv.to_owned(),
                })
                .collect::<Vec<_>>()
                .join(" ");
        std::fs::write(f.dir.path().join("admin.dsn"), format!("{dsn}\n")).unwrap();
        let t = PostgresTarget::new(PostgresConfig {
            connect_timeout: Some("1s".into()),
            ..f.settings(PgStrategy::SingleUser)
        })
        .unwrap();
        set_and_test(&t, 1, "stall-pw-1").await;

        // A pooled connection whose server stops answering mid-step, and
        // the new connection the step then tries: both given up.
        proxy.stall();
        let bounded =
            |step: &'static str, started: std::time::Instant, outcome: Result<(), PluginError>| {
                let took = started.elapsed();
                let e = outcome.expect_err(step);
                assert_eq!(e.kind, ErrorKind::Transient, "{step}: {e}");
                assert!(e.message.contains("no answer"), "{step}: {e}");
                // At most: 2s of statements on the pooled connection, then 1s
                // to log in on a new one.
                assert!(took < Duration::from_secs(6), "{step} took {took:?}: {e}");
            };
        // Without the bounds these never return: fail instead of hanging.
        async fn within<T>(f: impl std::future::Future<Output = T>) -> T {
            tokio::time::timeout(Duration::from_secs(30), f)
                .await
                .expect("the step did not give up")
        }
        let (k, pw1, pw2) = (key(), secret("stall-pw-1"), secret("stall-pw-2"));
        let started = std::time::Instant::now();
        bounded("set", started, within(t.set(&k, 2, &pw2)).await);
        let started = std::time::Instant::now();
        bounded("revoke", started, within(t.revoke(&k)).await);
        let started = std::time::Instant::now();
        bounded("check", started, within(t.check()).await);
        let started = std::time::Instant::now();
        bounded("test", started, within(t.test(&k, 1, &pw1)).await);

        // Answering again: the next step works on a new connection.
        proxy.resume();
        set_and_test(&t, 3, "stall-pw-3").await;
        f.login(&f.role, "stall-pw-3").await.unwrap();
    }

    #[apply(server_test!)]
    async fn wrong_admin_dsn_gives_a_clear_error_without_the_password() {
        let f = Fixture::new("baddsn").await;
        let canary = "canary-admin-7d1e";
        let path = f.dir.path().join("admin.dsn");
        let set_dsn = |dsn: String| std::fs::write(&path, dsn).unwrap();
        let t = f.target(PgStrategy::SingleUser);

        // Wrong admin password.
        set_dsn(format!(
            "host={} port={} user=postgres password={canary} dbname=postgres",
            f.pg.host, f.pg.port
        ));
        let e = t.check().await.unwrap_err();
        assert_eq!(e.kind, ErrorKind::Unauthorized, "{e}");
        assert!(!e.message.contains(canary), "{e}");
        let e = t
            .set(&key(), 1, &secret("canary-new-3c2b"))
            .await
            .unwrap_err();
        assert_eq!(e.kind, ErrorKind::Unauthorized, "{e}");
        assert!(!e.message.contains("canary"), "{e}");

        // Nothing listens: transient, names host and port.
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = closed.local_addr().unwrap().port();
        drop(closed);
        set_dsn(format!(
            "postgresql://postgres:{canary}@127.0.0.1:{port}/postgres"
        ));
        let e = t.check().await.unwrap_err();
        assert_eq!(e.kind, ErrorKind::Transient, "{e}");
        assert!(e.message.contains(&format!("127.0.0.1:{port}")), "{e}");
        assert!(e.message.contains("postgres:kt_baddsn"), "{e}");
        assert!(!e.message.contains(canary), "{e}");

        // Unparsable DSN and missing file: invalid / not found, naming the file.
        set_dsn(format!("host=x port=notaport password={canary}"));
        let e = t.check().await.unwrap_err();
        assert_eq!(e.kind, ErrorKind::Invalid, "{e}");
        assert!(!e.message.contains(canary), "{e}");
        // The DSN's own sslmode=require is honoured (TLS, the certificate
        // unchecked); a DSN saying disable while the target asks for TLS is
        // refused, not silently downgraded.
        set_dsn(format!("{} sslmode=require", f.pg.admin_dsn));
        t.check().await.unwrap();
        set_dsn(format!("{} sslmode=disable", f.pg.admin_dsn));
        let tls = PostgresTarget::new(PostgresConfig {
            sslmode: Some("require".into()),
            ..f.settings(PgStrategy::SingleUser)
        })
        .unwrap();
        let e = tls.check().await.unwrap_err();
        assert_eq!(e.kind, ErrorKind::Invalid, "{e}");
        assert!(e.message.contains("sslmode=disable"), "{e}");
        std::fs::remove_file(&path).unwrap();
        let e = t.check().await.unwrap_err();
        assert_eq!(e.kind, ErrorKind::NotFound, "{e}");
        assert!(e.message.contains("admin.dsn"), "{e}");

        // Right DSN, role that does not exist: invalid.
        set_dsn(f.pg.admin_dsn.clone());
        let mut s = f.settings(PgStrategy::SingleUser);
        s.role = format!("{}_missing", f.role);
        let t = PostgresTarget::new(s).unwrap();
        assert_eq!(t.check().await.unwrap_err().kind, ErrorKind::Invalid);
        let e = t
            .set(&key(), 1, &secret("canary-pw-91aa"))
            .await
            .unwrap_err();
        assert_eq!(e.kind, ErrorKind::Invalid, "{e}");
        assert!(e.message.contains("does not exist"), "{e}");
        assert!(
            !e.message.contains("canary") && !e.message.contains("SCRAM"),
            "{e}"
        );
    }

    fn ca() -> PathBuf {
        std::env::var("KEYTURN_TEST_PG_CA")
            .unwrap_or_else(|_| panic!("KEYTURN_TEST_PG_CA is not set: {NEED}"))
            .into()
    }

    impl Fixture {
        /// Puts the fixture's role in a pg_hba group of the test server
        /// (scripts/services.sh): `kt_hba_password`, `kt_hba_md5`, `kt_hba_tls_only`.
        async fn join(&self, group: &str) {
            self.admin()
                .await
                .batch_execute(&format!("GRANT {group} TO {}", quote_ident(&self.role)))
                .await
                .unwrap();
        }

        fn tls_target(&self, mode: &str, ca: Option<PathBuf>) -> PostgresTarget {
            PostgresTarget::new(PostgresConfig {
                sslmode: Some(mode.into()),
                ssl_root_cert: ca,
                ..self.settings(PgStrategy::SingleUser)
            })
            .unwrap()
        }
    }

    #[apply(server_test!)]
    async fn verify_full_checks_the_ca_and_the_host_name() {
        let f = Fixture::new("tls").await;
        // The role may log in over TLS only: `test` passing proves TLS.
        f.join("kt_hba_tls_only").await;
        for mode in ["verify-full", "require"] {
            let t = f.tls_target(mode, (mode == "verify-full").then(ca));
            t.check().await.unwrap();
            set_and_test(&t, 1, "tls-pass-1").await;
        }
        let e = f.login(&f.role, "tls-pass-1").await.unwrap_err();
        assert!(
            e.as_db_error()
                .is_some_and(|d| d.message().contains("no encryption")),
            "only TLS logins are accepted for this role: {e}"
        );

        // A missing CA file, one without a certificate, and a CA that did
        // not sign the server's certificate.
        let e = f
            .tls_target("verify-full", Some(f.dir.path().join("missing-ca.pem")))
            .check()
            .await
            .unwrap_err();
        assert_eq!(e.kind, ErrorKind::NotFound, "{e}");
        assert!(e.message.contains("ssl_root_cert"), "{e}");
        std::fs::write(f.dir.path().join("not-pem.pem"), "not a certificate\n").unwrap();
        let e = f
            .tls_target("verify-full", Some(f.dir.path().join("not-pem.pem")))
            .check()
            .await
            .unwrap_err();
        assert_eq!(e.kind, ErrorKind::Invalid, "{e}");
        assert!(e.message.contains("holds no certificate"), "{e}");
        // Another test CA (the Azure stub's): the chain does not verify.
        let other_ca = std::env::var("KEYTURN_TEST_AZURE_CA")
            .unwrap_or_else(|_| panic!("KEYTURN_TEST_AZURE_CA is not set: {NEED}"));
        let e = f
            .tls_target("verify-full", Some(other_ca.into()))
            .check()
            .await
            .unwrap_err();
        assert!(e.message.contains("invalid peer certificate"), "{e}");
        // The right CA, but a name the certificate does not hold.
        let path = f.dir.path().join("admin.dsn");
        std::fs::write(
            &path,
            f.pg.admin_dsn.replace(
                "host=127.0.0.1",
                "host=not-in-the-cert.invalid hostaddr=127.0.0.1",
            ),
        )
        .unwrap();
        let e = f
            .tls_target("verify-full", Some(ca()))
            .check()
            .await
            .unwrap_err();
        assert!(e.message.contains("certificate"), "{e}");
        assert!(
            e.message.contains("NotValidForName") || e.message.contains("not valid for"),
            "{e}"
        );
    }

    #[apply(server_test!)]
    async fn clear_text_and_md5_password_requests_are_refused_unless_allowed() {
        let f = Fixture::new("weak").await;
        // The server asks this role for its password in clear text.
        f.join("kt_hba_password").await;
        let plain = f.target(PgStrategy::SingleUser);
        plain.set(&key(), 1, &secret("weak-pass-1")).await.unwrap();
        let e = plain
            .test(&key(), 1, &secret("weak-pass-1"))
            .await
            .unwrap_err();
        assert_eq!(e.kind, ErrorKind::Invalid, "{e}");
        assert!(e.message.contains("clear text"), "{e}");
        assert!(
            e.message.contains("allow_weak_auth"),
            "says what to do: {e}"
        );
        assert!(!e.message.contains("weak-pass-1"), "{e}");
        // Over TLS, channel binding refuses it.
        let tls = f.tls_target("verify-full", Some(ca()));
        let e = tls
            .test(&key(), 1, &secret("weak-pass-1"))
            .await
            .unwrap_err();
        assert_eq!(e.kind, ErrorKind::Invalid, "{e}");
        assert!(e.message.contains("channel binding"), "{e}");
        // Allowed explicitly: the login goes through.
        let allowed = PostgresTarget::new(PostgresConfig {
            allow_weak_auth: vec!["password".into()],
            ..f.settings(PgStrategy::SingleUser)
        })
        .unwrap();
        allowed
            .test(&key(), 1, &secret("weak-pass-1"))
            .await
            .unwrap();

        // An admin whose password is stored as MD5, in an `md5` pg_hba group.
        let md5_admin = format!("{}_md5", f.role);
        let admin = f.admin().await;
        admin
            .batch_execute(&format!(
                "SET password_encryption = 'md5'; \
                 CREATE ROLE {r} LOGIN CREATEROLE PASSWORD 'md5-admin-pass' IN ROLE kt_hba_md5",
                r = quote_ident(&md5_admin)
            ))
            .await
            .unwrap();
        std::fs::write(
            f.dir.path().join("admin.dsn"),
            format!(
                "host={} port={} user={md5_admin} password=md5-admin-pass dbname=postgres",
                f.pg.host, f.pg.port
            ),
        )
        .unwrap();
        let outcome = async {
            let e = plain.check().await.unwrap_err();
            assert_eq!(e.kind, ErrorKind::Invalid, "{e}");
            assert!(e.message.contains("MD5"), "{e}");
            assert!(!e.message.contains("md5-admin-pass"), "{e}");
            let allowed = PostgresTarget::new(PostgresConfig {
                allow_weak_auth: vec!["md5".into()],
                ..f.settings(PgStrategy::SingleUser)
            })
            .unwrap();
            allowed.check().await.unwrap();
        };
        // The extra role is dropped even when an assertion fails.
        dropping_roles(&admin, &[md5_admin], outcome).await;
    }

    #[apply(server_test!)]
    async fn a_foreign_clone_is_refused_and_keyturns_own_is_adopted() {
        let f = Fixture::new("clone").await;
        let t = f.target(PgStrategy::AlternatingUsers);
        let clone = format!("{}_clone", f.role);
        let admin = f.admin().await;
        // Someone else's role under the clone's name: a login role, not a
        // member of `role`, without keyturn's mark.
        admin
            .batch_execute(&format!(
                "CREATE ROLE {} LOGIN PASSWORD 'theirs-1234'",
                quote_ident(&clone)
            ))
            .await
            .unwrap();
        // `check --online` says so before the first rotation (black-box
        // finding: it said ok, and the rotation onto the clone failed a
        // period later).
        let e = t.check().await.unwrap_err();
        assert_eq!(e.kind, ErrorKind::Invalid, "{e}");
        assert!(e.message.contains("not the clone keyturn makes"), "{e}");
        t.set(&key(), 1, &secret("own-pass-1")).await.unwrap();
        let e = t.set(&key(), 2, &secret("own-pass-2")).await.unwrap_err();
        assert_eq!(e.kind, ErrorKind::Invalid, "{e}");
        assert!(e.message.contains("not the clone keyturn makes"), "{e}");
        assert!(e.message.contains("mark"), "{e}");
        assert!(e.message.contains("not a member of"), "{e}");
        // Its password is untouched, and revoke leaves it alone too.
        f.login(&clone, "theirs-1234").await.unwrap();
        assert!(f.login(&clone, "own-pass-2").await.is_err());
        t.revoke(&key()).await.unwrap();
        f.login(&clone, "theirs-1234").await.unwrap();
        f.assert_login_refused(&f.role, "own-pass-1").await;

        // Marked and a member, but with a privilege of its own: still refused.
        admin
            .batch_execute(&format!(
                "GRANT {r} TO {c}; ALTER ROLE {c} CREATEDB; COMMENT ON ROLE {c} IS 'keyturn: version 2'",
                r = quote_ident(&f.role),
                c = quote_ident(&clone)
            ))
            .await
            .unwrap();
        let e = t.set(&key(), 2, &secret("own-pass-2")).await.unwrap_err();
        assert!(e.message.contains("CREATEDB"), "{e}");
        // keyturn's clone changed by hand: what to undo, not "drop it".
        let undo = format!("ALTER ROLE {} NOCREATEDB", quote_ident(&clone));
        for e in [e, t.check().await.unwrap_err()] {
            assert!(
                e.message.contains("is the clone keyturn made of")
                    && e.message.contains(&undo)
                    && !e.message.contains("Drop or rename"),
                "{e}"
            );
        }

        // keyturn's own clone, left behind by a crash after it was created:
        // adopted, and a replayed set is idempotent.
        admin
            .batch_execute(&format!("DROP ROLE {}", quote_ident(&clone)))
            .await
            .unwrap();
        t.ensure_clone(&t.admin("set").await.unwrap(), &clone, "test")
            .await
            .unwrap();
        t.check().await.unwrap();
        t.set(&key(), 2, &secret("own-pass-2")).await.unwrap();
        set_and_test(&t, 2, "own-pass-2").await;
        f.login(&clone, "own-pass-2").await.unwrap();
    }

    #[apply(server_test!)]
    async fn revoke_disables_login_and_kills_live_sessions() {
        let f = Fixture::new("revoke").await;
        let t = f.target(PgStrategy::AlternatingUsers);
        t.set(&key(), 1, &secret("rev-pass-1")).await.unwrap();
        t.set(&key(), 2, &secret("rev-pass-2")).await.unwrap();
        let live1 = f.login(&f.role, "rev-pass-1").await.unwrap();
        let live2 = f
            .login(&format!("{}_clone", f.role), "rev-pass-2")
            .await
            .unwrap();

        t.revoke(&key()).await.unwrap();
        t.revoke(&key()).await.unwrap(); // idempotent

        for live in [live1, live2] {
            assert!(
                live.simple_query("SELECT 1").await.is_err(),
                "session survived revoke"
            );
        }
        for (user, pw) in [
            (f.role.clone(), "rev-pass-1"),
            (format!("{}_clone", f.role), "rev-pass-2"),
        ] {
            let e = f.login(&user, pw).await.expect_err("login after revoke");
            // Password cleared and NOLOGIN: refused either way.
            assert!(
                matches!(e.code(), Some(c) if *c == SqlState::INVALID_PASSWORD
                    || *c == SqlState::INVALID_AUTHORIZATION_SPECIFICATION),
                "{e}"
            );
        }
        let e = t.test(&key(), 1, &secret("rev-pass-1")).await.unwrap_err();
        assert_eq!(e.kind, ErrorKind::Unauthorized);
    }

    // ---- the admin connection pool ----

    impl Fixture {
        /// Points the fixture's DSN file at the test server with
        /// `application_name = app`, so the pool's sessions can be counted.
        fn dsn_with_app(&self, app: &str) {
            std::fs::write(
                self.dir.path().join("admin.dsn"),
                format!("{} application_name={app}\n", self.pg.admin_dsn),
            )
            .unwrap();
        }

        /// Server sessions named `app`.
        async fn sessions(&self, app: &str) -> i64 {
            self.admin()
                .await
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1",
                    &[&app],
                )
                .await
                .unwrap()
                .get(0)
        }

        /// Waits (up to 5 s) until `app` has `n` sessions; false if never.
        async fn sessions_become(&self, app: &str, n: i64) -> bool {
            for _ in 0..100 {
                if self.sessions(app).await == n {
                    return true;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            false
        }
    }

    fn app(tag: &str) -> String {
        format!("kt_{tag}_{}", hex::encode(rand::random::<[u8; 4]>()))
    }

    #[cfg_attr(
        not(feature = "real-servers"),
        ignore = "needs the test servers: scripts/services.sh start, then --features real-servers"
    )]
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn twenty_targets_on_one_dsn_share_pool_size_admin_connections() {
        let f = Fixture::new("pool").await;
        let app = app("pool");
        f.dsn_with_app(&app);
        const SIZE: usize = 3;
        let roles: Vec<String> = (0..20).map(|i| format!("{}_{i}", f.role)).collect();
        let admin = f.admin().await;
        for r in &roles {
            admin
                .batch_execute(&format!("CREATE ROLE {} NOLOGIN", quote_ident(r)))
                .await
                .unwrap();
        }
        let outcome = async {
            let targets: Vec<Arc<PostgresTarget>> = roles
                .iter()
                .map(|r| {
                    Arc::new(
                        PostgresTarget::new(PostgresConfig {
                            role: r.clone(),
                            pool_size: Some(SIZE as u32),
                            ..f.settings(PgStrategy::SingleUser)
                        })
                        .unwrap(),
                    )
                })
                .collect();
            // Sample the server's sessions of this pool while the burst runs.
            let stop = Arc::new(AtomicBool::new(false));
            let sampler = tokio::spawn({
                let stop = stop.clone();
                let admin = f.admin().await;
                let app = app.clone();
                async move {
                    let mut most = 0i64;
                    while !stop.load(Ordering::Relaxed) {
                        let n: i64 = admin
                            .query_one(
                                "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1",
                                &[&app],
                            )
                            .await
                            .unwrap()
                            .get(0);
                        most = most.max(n);
                        tokio::time::sleep(Duration::from_millis(2)).await;
                    }
                    most
                }
            });
            let burst = targets.iter().enumerate().map(|(i, t)| {
                let t = t.clone();
                tokio::spawn(
                    async move { t.set(&key(), 1, &secret(&format!("pool-pass-{i}"))).await },
                )
            });
            for r in futures::future::join_all(burst).await {
                r.unwrap().unwrap();
            }
            stop.store(true, Ordering::Relaxed);
            let most = sampler.await.unwrap();
            // One pool for all twenty, never more than SIZE connections made.
            let (_, pool) = targets[0].pool("test").await.unwrap();
            for t in &targets[1..] {
                let (_, other) = t.pool("test").await.unwrap();
                assert!(
                    std::ptr::eq(pool.manager(), other.manager()),
                    "targets with one DSN share one pool"
                );
            }
            let created = pool.manager().created.load(Ordering::Relaxed);
            assert!(
                (1..=SIZE).contains(&created),
                "{created} admin connections made"
            );
            assert!(most <= SIZE as i64, "{most} admin sessions at once");
            // They stay open for the next step.
            assert_eq!(f.sessions(&app).await, created as i64);
            for (i, r) in roles.iter().enumerate() {
                f.login(r, &format!("pool-pass-{i}")).await.unwrap();
            }
        };
        dropping_roles(&admin, &roles, outcome).await;
    }

    #[apply(server_test!)]
    async fn a_changed_dsn_file_is_used_by_the_next_step_without_a_reload() {
        let f = Fixture::new("dsnchg").await;
        let (first, second) = (app("dsn_a"), app("dsn_b"));
        f.dsn_with_app(&first);
        let t = f.target(PgStrategy::SingleUser);
        t.set(&key(), 1, &secret("chg-pass-1")).await.unwrap();
        assert_eq!(f.sessions(&first).await, 1);

        // A wrong admin password in the file: the pooled, healthy connection
        // of the old content is not used.
        let canary = "canary-admin-55e0";
        std::fs::write(
            f.dir.path().join("admin.dsn"),
            format!(
                "host={} port={} user=postgres password={canary} dbname=postgres",
                f.pg.host, f.pg.port
            ),
        )
        .unwrap();
        let e = t.set(&key(), 2, &secret("chg-pass-2")).await.unwrap_err();
        assert_eq!(e.kind, ErrorKind::Unauthorized, "{e}");
        assert!(!e.message.contains(canary), "{e}");
        assert!(!e.message.contains("chg-pass"), "{e}");

        // New content: a new pool; the old one's connection is closed.
        f.dsn_with_app(&second);
        set_and_test(&t, 2, "chg-pass-2").await;
        assert_eq!(f.sessions(&second).await, 1);
        assert!(
            f.sessions_become(&first, 0).await,
            "the old pool's connection stays open"
        );
    }

    #[apply(server_test!)]
    async fn a_killed_pooled_connection_does_not_fail_the_next_step() {
        let f = Fixture::new("kill").await;
        let app = app("kill");
        f.dsn_with_app(&app);
        let t = f.target(PgStrategy::AlternatingUsers);
        let kill = || async {
            let killed: i64 = f
                .admin()
                .await
                .query_one(
                    "SELECT count(pg_terminate_backend(pid, 5000)) FROM pg_stat_activity \
                     WHERE application_name = $1",
                    &[&app],
                )
                .await
                .unwrap()
                .get(0);
            assert_eq!(killed, 1, "one pooled admin session");
        };
        t.set(&key(), 1, &secret("kill-pass-1")).await.unwrap();
        kill().await;
        // The pool notices the closed connection when it hands it out.
        set_and_test(&t, 2, "kill-pass-2").await;

        // A dead connection the pool did not notice reaches the step: it is
        // retried once, on a new connection.
        let (_, pool) = t.pool("test").await.unwrap();
        pool.manager().trust_idle.store(true, Ordering::Relaxed);
        for (step, v) in [("set", 3), ("retire", 2), ("revoke", 0), ("check", 0)] {
            kill().await;
            let before = pool.manager().retries.load(Ordering::Relaxed);
            match step {
                "set" => t.set(&key(), v, &secret("kill-pass-3")).await,
                "retire" => t.retire(&key(), v).await,
                "revoke" => t.revoke(&key()).await,
                _ => t.check().await,
            }
            .unwrap_or_else(|e| panic!("{step} after the admin session was killed: {e}"));
            assert_eq!(
                pool.manager().retries.load(Ordering::Relaxed),
                before + 1,
                "{step} retried on a new connection"
            );
        }
        // revoke ran on the pooled connection and disabled the role.
        f.assert_login_refused(&f.role, "kill-pass-3").await;
        assert_eq!(f.sessions(&app).await, 1);
    }

    #[apply(server_test!)]
    async fn idle_admin_connections_are_closed_and_made_again_when_needed() {
        let f = Fixture::new("idle").await;
        let app = app("idle");
        f.dsn_with_app(&app);
        let mut t = f.target(PgStrategy::SingleUser);
        t.admin.idle_timeout = Duration::from_millis(300);
        t.set(&key(), 1, &secret("idle-pass-1")).await.unwrap();
        assert_eq!(f.sessions(&app).await, 1);
        assert!(
            f.sessions_become(&app, 0).await,
            "the idle connection stays open"
        );
        let (_, pool) = t.pool("test").await.unwrap();
        assert_eq!(pool.status().size, 0);
        // The reaper ends with the last connection: nothing keeps ticking.
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!pool.manager().reaping.load(Ordering::Relaxed));
        set_and_test(&t, 2, "idle-pass-2").await;
        assert_eq!(pool.manager().created.load(Ordering::Relaxed), 2);
        assert!(
            f.sessions_become(&app, 0).await,
            "the second one is closed too"
        );
    }

    #[apply(server_test!)]
    async fn the_login_test_closes_its_connection_at_once() {
        let f = Fixture::new("login").await;
        let t = f.target(PgStrategy::SingleUser);
        set_and_test(&t, 1, "login-pass-1").await;
        // `test` returned after its connection ended: the server has (or is
        // about to have) no session of the role.
        let sessions = || async {
            f.admin()
                .await
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity WHERE usename = $1",
                    &[&f.role],
                )
                .await
                .unwrap()
                .get::<_, i64>(0)
        };
        let mut n = sessions().await;
        for _ in 0..20 {
            if n == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
            n = sessions().await;
        }
        assert_eq!(n, 0, "the login test's session is still open");
    }

    #[apply(server_test!)]
    async fn neither_the_value_nor_its_verifier_reaches_the_log() {
        let f = Fixture::new("logs").await;
        // tokio-postgres logs with `log`; the daemon bridges it (telemetry).
        let _ = tracing_log::LogTracer::init();
        let (_guard, logs) = crate::test_support::capture_logs();
        let canary = "canary-logged-4f1a";
        let t = f.target(PgStrategy::AlternatingUsers);
        for v in 1..=2 {
            set_and_test(&t, v, canary).await;
        }
        let e = t
            .test(&key(), 1, &secret("canary-wrong-4f1a"))
            .await
            .unwrap_err();
        assert!(!e.message.contains("canary"), "{e}");
        t.retire(&key(), 1).await.unwrap();
        t.revoke(&key()).await.unwrap();
        let logs = String::from_utf8(logs.lock().unwrap().clone()).unwrap();
        // The capture works: tokio-postgres' statement log is in it (the
        // pooled admin connection's statements and the login test's query).
        assert!(logs.contains("executing statement"), "{logs}");
        assert!(logs.contains("SELECT 1"), "{logs}");
        assert!(!logs.contains("canary"), "{logs}");
        assert!(!logs.contains("SCRAM-SHA-256$"), "{logs}");
    }
}

#[cfg(test)]
mod place_tests {
    use super::*;

    #[test]
    fn only_the_role_the_strategy_and_the_server_make_another_place() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, dsn: &str| {
            let p = dir.path().join(name);
            std::fs::write(&p, dsn).unwrap();
            p
        };
        let a = write(
            "a.dsn",
            "host=db1 port=5432 user=postgres password=canary-a",
        );
        let moved = write(
            "moved.dsn",
            "host=db1 user=admin password=canary-b dbname=x",
        );
        let other = write("other.dsn", "host=db2 user=postgres password=canary-a");
        let base = PostgresConfig::new(&a, "bot");
        let same = |c: &PostgresConfig| base.same_place(c) && c.same_place(&base);

        let mut tuned = base.clone();
        tuned.connect_timeout = Some("5s".into());
        tuned.pool_size = Some(2);
        tuned.sslmode = Some("require".into());
        tuned.test_dbname = Some("x".into());
        assert!(same(&tuned), "settings that do not move the value");
        assert!(
            same(&PostgresConfig::new(&moved, "bot")),
            "the DSN file moved, same server"
        );
        assert!(
            same(&PostgresConfig::new(dir.path().join("gone.dsn"), "bot")),
            "a file that cannot be read cannot tell: never revoke where the value may be"
        );

        assert!(!same(&PostgresConfig::new(&a, "bot2")), "another role");
        assert!(!same(
            &base.clone().with_strategy(PgStrategy::AlternatingUsers)
        ));
        assert!(!same(&PostgresConfig::new(&other, "bot")), "another server");
        let port = write("port.dsn", "host=db1 port=5433 user=postgres");
        assert!(!same(&PostgresConfig::new(&port, "bot")), "another port");
    }
}
