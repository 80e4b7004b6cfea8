//! `postgres`: a PostgreSQL role per task.
//!
//! ```toml
//! [issuers.warehouse]
//! type = "postgres"
//! admin_dsn_file = "/etc/keyturn/warehouse.dsn"
//! sslmode = "verify-full"
//! ssl_root_cert = "/etc/keyturn/warehouse-ca.pem"
//! database = "sales"          # delivered to the agent (default: the admin DSN's)
//! role_prefix = "kt_task_"    # the default
//! ```
//! and, in a policy level, the grant `{ roles = ["read_a"], connection_limit = 2 }`.
//!
//! The admin connection is the postgres target's, setting for setting
//! (`admin_dsn_file`, `sslmode`, `ssl_root_cert`, `connect_timeout`,
//! `pool_size`, `allow_weak_auth`), and so is its pool: an issuer and a
//! target that agree on those share one set of admin sessions
//! ([`crate::targets::postgres::admin`]).
//!
//! **issue** makes the role `<role_prefix><task_id>` (named after the task,
//! so `revoke` finds it without a handle), in one transaction:
//! `LOGIN PASSWORD '<SCRAM verifier>' VALID UNTIL '<expires_at>'`, member
//! (inheriting) of exactly the grant's roles, `CONNECTION LIMIT` if the grant
//! says, the task's attribution as JSON in its comment (`{"keyturn":"task",
//! "task_id":..., "agent":..., ...}`; the comment is also keyturn's mark), and
//! `application_name` set for the role (`keyturn-task <id> run <run> by
//! <initiator>`, made of safe characters, cut to 63 bytes), so that
//! `pg_stat_activity` names the task. The delivered `dsn` carries the same
//! `application_name` (and so does the public field of that name): a client
//! that sets its own (psql's fallback included) overrides the role's
//! default; `usename` still names the task.
//! The password is 32 random letters and digits; only its verifier, computed
//! by keyturn, reaches the server, as a redacted bind parameter read by a
//! constant `DO` block (the target's technique: see
//! [`crate::targets::postgres`]). Issuing again for the same task sets a
//! fresh password, expiry and membership on the same role.
//!
//! The statements run in functions each pooled admin session makes once in
//! its own `pg_temp` schema ([`SESSION`]), so that the server compiles and
//! plans them once per session rather than at every task: a task start is
//! one round trip (`CREATE ROLE ... IN ROLE ...`, the comment and
//! `application_name`, in one transaction; the role's existence is checked
//! only when that fails), a revoke one more. An admin that may not make
//! temporary objects (`TEMP` revoked on the database) gets the same
//! statements as `DO` blocks and separate round trips. What stays per task
//! at the server is mostly its check of the verifier against the empty
//! password, a 4096-round PBKDF2 (see BENCHMARKS.md, issue 15).
//!
//! The grant may not reach a role with `SUPERUSER`, `CREATEROLE`,
//! `REPLICATION` or `BYPASSRLS`, nor `pg_execute_server_program`,
//! `pg_read_server_files` or `pg_write_server_files`, directly or through
//! the roles it is a member of: a member can `SET ROLE` to any of them and
//! would hold more than the policy meant.
//!
//! `VALID UNTIL` refuses new logins after the expiry even when keyturn is
//! down; it does not end sessions already open, which keyturn's revoke at
//! the TTL does.
//!
//! The admin role needs `CREATEROLE` and membership in `pg_signal_backend`
//! (or superuser); on PostgreSQL 16 and later also `ADMIN OPTION` on the
//! roles it grants. `check` says which is missing.
//!
//! **revoke** sets the role `NOLOGIN PASSWORD NULL`, ends its sessions, then
//! drops it. A role that still owns objects or holds privileges in the admin
//! DSN's database is cleaned up first with `DROP OWNED BY` (RESTRICT), in
//! the transaction that drops it: what the task made there is dropped, not
//! kept. Kept, it would need an owner: the admin (often a superuser) would
//! run a `SECURITY DEFINER` function, view or rule the task planted with its
//! own privileges for anyone who calls it, and any one role kept for the
//! purpose would own every task's objects at once. A task that means its
//! data to outlast it hands it to one of its granted roles (`ALTER TABLE ...
//! OWNER TO`), or writes into tables it did not make. An admin without the
//! privileges of the task role (`CREATEROLE`, no superuser) grants itself
//! the role in that transaction, as `DROP OWNED` needs them; dropping the
//! role ends the membership. When the role cannot be dropped (objects in
//! another database, or another role's object depending on the task's), it
//! stays, unable to log in, member of no role any more (what it still owns
//! acts with no privilege of the grant), and a warning names it. A role that
//! does not exist is already revoked, at the server that made it: the
//! admin DSN's hosts and ports are the issuer's [`TaskIssuer::origin`],
//! recorded with each task, and after the DSN points elsewhere the task
//! manager leaves such tasks unrevoked (and says so) until it points back.
//! A task is revoked by the role name recorded when it was issued: a
//! `role_prefix` changed since names new tasks' roles only. A role with the task's name whose
//! comment lacks keyturn's mark for that task is someone else's: `issue`,
//! `revoke` and `verify_revoked` refuse it (`invalid`) and leave it alone.
//!
//! # Layout
//! - `postgres/mod.rs`: the issuer: the task's role name, the grant, what
//!   the agent receives (password, DSN), and [`TaskIssuer`];
//! - `postgres/config.rs`: `[issuers.NAME]` and the grant, and their checks;
//! - `postgres/sql.rs`: the constant SQL the server runs ([`SESSION`], the
//!   `DO` blocks);
//! - `postgres/server.rs`: each step on a leased admin connection: issue,
//!   revoke (disable, end the sessions, drop), verify, check a grant.

mod config;
mod server;
mod sql;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use async_trait::async_trait;
use tokio_postgres::Config;
use tokio_postgres::config::Host;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;

use super::{
    Grant, IssueError, IssueRequest, Issued, IssuerPlugin, Revoked, TaskAttribution, TaskIssuer,
};
use crate::config::validate::{Loc, Validator};
use crate::config::{CharClasses, GeneratorConfig};
use crate::model::{ErrorKind, PluginError, SecretValue};
use crate::targets::postgres::admin::{Admin, terminate_sessions};
use crate::targets::postgres::pool::{AdminConn, Lease};
use crate::targets::postgres::{Hidden, PgTls, PostgresConfig, quote_ident, role_comment, scram};

pub use config::{PgGrant, PgIssuerConfig};
use config::{grant_problems, prefix_problem};
use server::check_grant_on;
use sql::{GRANT_CHECK_DO, ISSUE_DO, SESSION};

/// The role name's start unless `role_prefix` says otherwise.
pub const DEFAULT_ROLE_PREFIX: &str = "kt_task_";
/// PostgreSQL's identifier limit (NAMEDATALEN - 1).
const MAX_IDENT_LEN: usize = 63;
/// A task id's longest ([`TaskAttribution::task_id`]).
const MAX_TASK_ID_LEN: usize = 32;
/// So that `<role_prefix><task_id>` always fits in an identifier.
const MAX_PREFIX_LEN: usize = MAX_IDENT_LEN - MAX_TASK_ID_LEN;
const PASSWORD_LEN: usize = 32;
/// The `keyturn` key of a task role's comment.
const TASK_MARK: &str = "task";
/// Predefined roles that reach the server's files or programs: as much as
/// a superuser, for a task.
const SERVER_ROLES: [&str; 3] = [
    "pg_execute_server_program",
    "pg_read_server_files",
    "pg_write_server_files",
];

/// The task's role at one server.
#[derive(Debug)]
pub struct PgIssuer {
    c: PgIssuerConfig,
    admin: Admin,
}

impl PgIssuer {
    pub fn new(c: PgIssuerConfig) -> Result<Self, PluginError> {
        let admin = Admin::new(&c.admin_settings(), "postgres issuer")?;
        Ok(Self { c, admin })
    }

    /// The role of `task_id`; the id is checked, as it becomes part of an
    /// identifier and of `application_name`.
    fn role_of(&self, task_id: &str) -> Result<String, PluginError> {
        let ok = !task_id.is_empty()
            && task_id.len() <= MAX_TASK_ID_LEN
            && task_id
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
        if !ok {
            return Err(PluginError::new(
                ErrorKind::Invalid,
                format!(
                    "{}: task id {task_id:?} is not 1 to {MAX_TASK_ID_LEN} lowercase letters and digits",
                    self.describe()
                ),
            ));
        }
        Ok(format!("{}{task_id}", self.c.role_prefix()))
    }

    /// The task's role, its grant and the context for messages, or what
    /// the issuer refuses without calling PostgreSQL.
    fn checked(&self, req: &IssueRequest<'_>) -> Result<(String, PgGrant, String), PluginError> {
        let task = req.task;
        let role = self.role_of(&task.task_id)?;
        let ctx = format!(
            "{}: issue for task {} (role {role:?})",
            self.describe(),
            task.task_id
        );
        let invalid = |m: String| PluginError::new(ErrorKind::Invalid, format!("{ctx}: {m}"));
        let grant: PgGrant = req
            .grant
            .parse()
            .map_err(|e| invalid(format!("invalid grant: {e}")))?;
        if let Some((_, problem)) = grant_problems(&grant, self.c.role_prefix())
            .into_iter()
            .next()
        {
            return Err(invalid(format!("invalid grant: {problem}")));
        }
        Ok((role, grant, ctx))
    }

    /// The role named by `handle`, else by the task id. The handle is the
    /// name the role was made with, under the `role_prefix` of that time:
    /// a prefix changed since names new tasks' roles only. As the handle
    /// comes from keyturn's state, it must still look like a task role of
    /// this task (a prefix keyturn accepts, then the task id); and every
    /// step checks the role's comment for keyturn's mark for this task
    /// before it touches it, so a tampered handle cannot make keyturn drop
    /// a role keyturn did not make for this task.
    fn role_for(
        &self,
        task: &TaskAttribution,
        handle: Option<&str>,
    ) -> Result<String, PluginError> {
        let derived = self.role_of(&task.task_id)?;
        match handle {
            Some(h) if h != derived => match h.strip_suffix(task.task_id.as_str()) {
                Some(prefix) if prefix_problem(prefix).is_none() => Ok(h.to_owned()),
                _ => Err(PluginError::new(
                    ErrorKind::Invalid,
                    format!(
                        "{}: task {}: the recorded role {h:?} is not a task role of this task \
                         (a role_prefix, then the task id); keyturn's task store may have been \
                         altered, and keyturn leaves that role alone",
                        self.describe(),
                        task.task_id
                    ),
                )),
            },
            _ => Ok(derived),
        }
    }
}

/// What one issuance sets, besides the role's name.
struct IssueSettings<'a> {
    task_id: &'a str,
    password: &'a [u8],
    verifier: &'a str,
    until: String,
    limit: String,
    roles: String,
    comment: String,
    app: String,
}

/// Err unless `comment` carries keyturn's mark for `task_id`.
fn foreign(
    comment: Option<String>,
    task_id: &str,
    role: &str,
    ctx: &str,
) -> Result<(), PluginError> {
    let ours = comment
        .and_then(|c| serde_json::from_str::<serde_json::Value>(&c).ok())
        .is_some_and(|v| v["keyturn"] == TASK_MARK && v["task_id"] == task_id);
    if ours {
        return Ok(());
    }
    Err(foreign_role(task_id, role, ctx))
}

/// The error for a role with a task's name that is not keyturn's.
fn foreign_role(task_id: &str, role: &str, ctx: &str) -> PluginError {
    PluginError::new(
        ErrorKind::Invalid,
        format!(
            "{ctx}: role {role:?} exists but is not keyturn's role for task {task_id} (its comment \
             lacks keyturn's task mark); keyturn leaves someone else's role alone. Rename or drop \
             it, or change the issuer's role_prefix"
        ),
    )
}

/// The role's comment: keyturn's mark and the task's whole attribution.
#[derive(serde::Serialize)]
struct Comment<'a> {
    keyturn: &'static str,
    #[serde(flatten)]
    task: &'a TaskAttribution,
    expires_at: &'a str,
}

/// `keyturn-task <task_id> run <run_id> by <initiator>`: characters outside
/// `[A-Za-z0-9._@-]` become `_`, and the run id and initiator are cut
/// (sharing the room fairly) to fit PostgreSQL's 63 bytes.
fn application_name(t: &TaskAttribution) -> String {
    let safe = |s: &str| -> String {
        s.chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || "._@-".contains(c) {
                    c
                } else {
                    '_'
                }
            })
            .collect()
    };
    let head = format!("keyturn-task {} run ", safe(&t.task_id));
    let (run, who) = (safe(&t.run_id), safe(&t.initiator));
    let room = MAX_IDENT_LEN.saturating_sub(head.len() + " by ".len());
    let half = room / 2;
    let (r, w) = if run.len() + who.len() <= room {
        (run.len(), who.len())
    } else if run.len() <= half {
        (run.len(), room - run.len())
    } else if who.len() <= room - half {
        (room - who.len(), who.len())
    } else {
        (half, room - half)
    };
    let mut name = format!("{head}{} by {}", &run[..r], &who[..w]);
    name.truncate(MAX_IDENT_LEN);
    name
}

/// `value` quoted for a libpq key=value connection string.
fn dsn_value(out: &mut String, value: &str) {
    out.push('\'');
    for c in value.chars() {
        if c == '\'' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('\'');
}

/// Where the agent connects: the admin DSN's first host and port.
fn host_port(dsn: &Config) -> (String, u16) {
    let host = match (dsn.get_hostaddrs().first(), dsn.get_hosts().first()) {
        (_, Some(Host::Tcp(name))) => name.clone(),
        (Some(ip), None) => ip.to_string(),
        (_, Some(Host::Unix(dir))) => dir.display().to_string(),
        (None, None) => "localhost".to_owned(),
    };
    (host, dsn.get_ports().first().copied().unwrap_or(5432))
}

/// The server the admin DSN names: its hosts (or host addresses) and
/// ports, sorted, e.g. `postgres 10.0.0.5:5432`. Roles are the cluster's,
/// so the database and the admin user are left out: another database or
/// admin of the same server sees the same roles.
fn server_of(dsn: &Config) -> String {
    let hosts = dsn.get_hosts();
    let addrs = dsn.get_hostaddrs();
    let ports = dsn.get_ports();
    let n = hosts.len().max(addrs.len()).max(1);
    let mut servers: Vec<String> = (0..n)
        .map(|i| {
            let host = match (hosts.get(i), addrs.get(i)) {
                (Some(Host::Tcp(name)), _) => name.to_ascii_lowercase(),
                (Some(Host::Unix(dir)), _) => dir.display().to_string(),
                (None, Some(ip)) => ip.to_string(),
                (None, None) => "localhost".to_owned(),
            };
            let port = ports.get(i).or(ports.first()).copied().unwrap_or(5432);
            format!("{host}:{port}")
        })
        .collect();
    servers.sort();
    servers.dedup();
    format!("postgres {}", servers.join(","))
}

#[async_trait]
impl TaskIssuer for PgIssuer {
    fn describe(&self) -> String {
        format!("postgres issuer ({})", self.admin.dsn_file().display())
    }

    /// The server the admin DSN names now ([`server_of`]): the file is read
    /// at every step, so a changed file moves the issuer too.
    async fn origin(&self) -> Result<Option<String>, PluginError> {
        let (dsn, _) = self.admin.config(&self.describe(), "origin").await?;
        Ok(Some(server_of(&dsn)))
    }

    fn object(&self, task: &TaskAttribution, handle: Option<&str>) -> String {
        // Without a handle the role is still the one named after the task.
        match handle
            .map(str::to_owned)
            .or_else(|| self.role_of(&task.task_id).ok())
        {
            Some(role) => format!("role {role}"),
            None => format!("role of task {}", task.task_id),
        }
    }

    async fn precheck(&self, req: &IssueRequest<'_>) -> Result<(), PluginError> {
        self.checked(req).map(|_| ())
    }

    async fn issue(&self, req: &IssueRequest<'_>) -> Result<Issued, IssueError> {
        // Nothing is created before the admin connection is in hand; any
        // failure after may follow a created role (`revoke` finds it by the
        // task's name).
        let nothing = IssueError::nothing_left;
        let minted: Result<Issued, IssueError> = async {
            let task = req.task;
            let (role, grant, ctx) = self.checked(req).map_err(nothing)?;
            let invalid = |m: String| PluginError::new(ErrorKind::Invalid, format!("{ctx}: {m}"));
            // VALID UNTIL in whole seconds, never after `expires_at`.
            let secs = req
                .expires_at
                .duration_since(UNIX_EPOCH)
                .map_err(|_| nothing(invalid("expires_at is before 1970".into())))?
                .as_secs();
            let expires_at = UNIX_EPOCH + Duration::from_secs(secs);
            let until = humantime::format_rfc3339_seconds(expires_at).to_string();

            let password = crate::generators::generate(&GeneratorConfig::Password {
                length: PASSWORD_LEN,
                classes: CharClasses {
                    lowercase: true,
                    uppercase: true,
                    digits: true,
                    symbols: false,
                },
            })
            .map_err(|e| nothing(PluginError::new(e.kind(), format!("{ctx}: {e}"))))?
            .value;
            // A 4096-round PBKDF2: kept off the async workers.
            let verifier = {
                let password = password.clone();
                tokio::task::spawn_blocking(move || scram::verifier(password.expose()))
                    .await
                    .map_err(|e| {
                        nothing(PluginError::new(
                            ErrorKind::Fatal,
                            format!("{ctx}: hashing: {e}"),
                        ))
                    })?
            };
            let settings = IssueSettings {
                task_id: &task.task_id,
                password: password.expose(),
                verifier: &verifier,
                until: until.clone(),
                limit: grant.connection_limit.map_or(-1, i64::from).to_string(),
                roles: serde_json::to_string(&grant.roles).expect("strings serialize"),
                comment: serde_json::to_string(&Comment {
                    keyturn: TASK_MARK,
                    task,
                    expires_at: &until,
                })
                .expect("strings serialize"),
                app: application_name(task),
            };

            let (dsn, pool) = self
                .admin
                .pool(&self.describe(), "issue")
                .await
                .map_err(nothing)?;
            let mut conn = Lease::get(&pool, &ctx).await.map_err(nothing)?;
            loop {
                let outcome = conn
                    .bounded(&ctx, self.issue_on(&conn, &role, &settings, &ctx))
                    .await;
                if !conn.again(&outcome, &ctx).await? {
                    outcome?;
                    break;
                }
            }
            drop(conn);

            let mode = self.admin.tls_mode(&dsn, &ctx)?;
            let (host, port) = host_port(&dsn);
            let dbname = self
                .c
                .database
                .as_deref()
                .or(dsn.get_dbname())
                .or(dsn.get_user())
                .unwrap_or("postgres")
                .to_owned();
            let mut public = BTreeMap::from([
                ("user".to_owned(), role.clone()),
                ("host".to_owned(), host.clone()),
                ("port".to_owned(), port.to_string()),
                ("dbname".to_owned(), dbname.clone()),
                ("sslmode".to_owned(), mode.as_str().to_owned()),
                ("expires_at".to_owned(), until),
                ("application_name".to_owned(), application_name(task)),
            ]);
            let root_cert = match mode {
                PgTls::VerifyFull => self
                    .c
                    .ssl_root_cert
                    .as_ref()
                    .map(|p| p.display().to_string()),
                _ => None,
            };
            if let Some(ca) = &root_cert {
                public.insert("sslrootcert".to_owned(), ca.clone());
            }
            // Sized once, so no reallocation leaves a copy of the password behind.
            let pw = password.expose_str().expect("generated passwords are text");
            let mut dsn_text = String::with_capacity(
                128 + host.len()
                    + dbname.len()
                    + role.len()
                    + pw.len()
                    + root_cert.as_ref().map_or(0, |c| c.len()) * 2,
            );
            // application_name too: a client's own (psql's fallback included)
            // would override the role's default, and the server should name
            // the task whatever connects with this DSN.
            let app = application_name(task);
            for (key, value) in [
                ("host", host.as_str()),
                ("dbname", dbname.as_str()),
                ("user", role.as_str()),
                ("password", pw),
                ("application_name", app.as_str()),
            ] {
                let _ = write!(dsn_text, "{key}=");
                dsn_value(&mut dsn_text, value);
                dsn_text.push(' ');
            }
            let _ = write!(dsn_text, "port={port} sslmode={}", mode.as_str());
            if let Some(ca) = &root_cert {
                dsn_text.push_str(" sslrootcert=");
                dsn_value(&mut dsn_text, ca);
            }
            let secret = BTreeMap::from([
                ("password".to_owned(), password),
                ("dsn".to_owned(), SecretValue::from_string(dsn_text)),
            ]);
            Ok(Issued {
                handle: role,
                public,
                secret,
                expires_at,
            })
        }
        .await;
        minted
    }

    async fn revoke(
        &self,
        task: &TaskAttribution,
        handle: Option<&str>,
        _expires_at: std::time::SystemTime,
    ) -> Result<Revoked, PluginError> {
        let (role, ctx, mut conn) = self
            .role_and_lease(task, handle, "revoke", "revoke")
            .await?;
        loop {
            let attempt = async {
                let role = self.role_on(&conn, task, handle, &role, &ctx).await?;
                self.revoke_on(&conn, &role, task, &ctx).await
            };
            let outcome = conn.bounded(&ctx, attempt).await;
            if !conn.again(&outcome, &ctx).await? {
                return outcome;
            }
        }
    }

    async fn verify_revoked(
        &self,
        task: &TaskAttribution,
        handle: Option<&str>,
    ) -> Result<bool, PluginError> {
        let (role, ctx, mut conn) = self
            .role_and_lease(task, handle, "verify revocation of", "verify")
            .await?;
        loop {
            let attempt = async {
                let role = self.role_on(&conn, task, handle, &role, &ctx).await?;
                self.verify_on(&conn, &role, task, &ctx).await
            };
            let outcome = conn.bounded(&ctx, attempt).await;
            if !conn.again(&outcome, &ctx).await? {
                return outcome;
            }
        }
    }

    async fn check(&self) -> Result<(), PluginError> {
        let ctx = format!("{}: check", self.describe());
        let mut conn = self.admin.lease(&self.describe(), "check").await?;
        let (create, signal) = loop {
            let attempt = async {
                let sql = conn
                    .prepared(
                        "SELECT rolsuper OR rolcreaterole, \
                                rolsuper OR pg_has_role(current_user, 'pg_signal_backend', 'MEMBER') \
                         FROM pg_roles WHERE rolname = current_user",
                    )
                    .await?;
                conn.client.query_one(&sql, &[]).await
            };
            let attempt = async {
                attempt
                    .await
                    .map(|row| (row.get::<_, bool>(0), row.get::<_, bool>(1)))
                    .map_err(|e| conn.error(&ctx, &e, &[]))
            };
            let outcome = conn.bounded(&ctx, attempt).await;
            if !conn.again(&outcome, &ctx).await? {
                break outcome?;
            }
        };
        let missing = match (create, signal) {
            (true, true) => return Ok(()),
            (false, _) => "can not create roles: it needs CREATEROLE",
            (true, false) => {
                "can not end a task role's sessions at revoke: grant it pg_signal_backend"
            }
        };
        Err(PluginError::new(
            ErrorKind::Unauthorized,
            format!("{ctx}: the admin DSN's role {missing} (or be superuser)"),
        ))
    }

    /// The grant's roles pass `grant_checks` (`sql.rs`) at the server, as
    /// at every issuance: they exist and reach no role too strong for a task.
    async fn check_grant(
        &self,
        grant: &Grant,
        _max_ttl: Duration,
    ) -> Result<Option<String>, PluginError> {
        let ctx = format!("{}: check grant", self.describe());
        let grant: PgGrant = grant.parse().map_err(|e| {
            PluginError::new(ErrorKind::Invalid, format!("{ctx}: invalid grant: {e}"))
        })?;
        let roles = serde_json::to_string(&grant.roles).expect("strings serialize");
        let mut conn = self.admin.lease(&self.describe(), "check").await?;
        loop {
            let attempt = async {
                check_grant_on(&conn, &roles)
                    .await
                    .map_err(|e| conn.error(&ctx, &e, &[]))
            };
            let outcome = conn.bounded(&ctx, attempt).await;
            if !conn.again(&outcome, &ctx).await? {
                return outcome.map(|()| None);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    //! Config checks, then real-server tests: they need the PostgreSQL the
    //! services script starts (KEYTURN_TEST_PG_*) and fail, never skip,
    //! without it. Each test works on its own uniquely named tables, roles
    //! and tasks, so they run in parallel.

    use std::path::Path;
    use std::time::SystemTime;

    use macro_rules_attribute::apply;
    use tokio_postgres::{Client, NoTls};

    use super::*;
    use crate::config::validate::issues_of;
    use crate::tasks::issuers::IssuerConfig;
    use crate::tasks::issuers::test_support::{
        assert_error, assert_not_revoked, assert_revoked_now, attribution, in_an_hour, issue,
        request,
    };
    use crate::test_support::server_test;

    // ---- config ----

    /// `[issuers.pg]` from `body`, checked: (TOML path, message) of each issue.
    fn config_issues(body: &str) -> Vec<(String, String)> {
        let mut c: PgIssuerConfig = toml::from_str(body).unwrap();
        let top = Loc::top("issuers");
        issues_of(Path::new("/etc/keyturn/keyturn.toml"), |v| {
            c.check(v, top.key("pg"))
        })
        .into_iter()
        .map(|i| (i.path.to_string(), i.message))
        .collect()
    }

    /// The grant `body` (a TOML table) checked by a default issuer.
    fn grant_issues(body: &str) -> Vec<(String, String)> {
        let value: serde_json::Value = toml::from_str(body).unwrap();
        let c = PgIssuerConfig::new("/etc/keyturn/pg.dsn");
        let top = Loc::top("policies");
        issues_of(Path::new("/etc/keyturn/keyturn.toml"), |v| {
            c.check_grant(&Grant(value), v, top.key("p").key("low").key("pg"))
        })
        .into_iter()
        .map(|i| (i.path.to_string(), i.message))
        .collect()
    }

    #[test]
    fn a_full_config_is_accepted_and_completed_in_place() {
        let text = r#"
            type = "postgres"
            admin_dsn_file = "pg.dsn"
            sslmode = "verify-full"
            ssl_root_cert = "ca.pem"
            connect_timeout = "3s"
            pool_size = 2
            allow_weak_auth = ["md5"]
            role_prefix = "agent_task_"
            database = "sales"
        "#;
        let IssuerConfig::Postgres(mut c) = toml::from_str::<IssuerConfig>(text).unwrap() else {
            panic!("`type = \"postgres\"` is the postgres issuer")
        };
        let top = Loc::top("issuers");
        let issues = issues_of(Path::new("/etc/keyturn/keyturn.toml"), |v| {
            c.plugin_check(v, top.key("pg"))
        });
        assert!(issues.is_empty(), "{issues:?}");
        assert_eq!(c.admin_dsn_file, Path::new("/etc/keyturn/pg.dsn"));
        assert_eq!(
            c.ssl_root_cert.as_deref(),
            Some(Path::new("/etc/keyturn/ca.pem"))
        );
        assert_eq!(c.role_prefix(), "agent_task_");
        c.build().unwrap();
        assert_eq!(PgIssuerConfig::new("/x").role_prefix(), DEFAULT_ROLE_PREFIX);
    }

    impl PgIssuerConfig {
        fn plugin_check(&mut self, v: &mut Validator<'_>, at: Loc<'_>) {
            IssuerPlugin::check(self, v, at)
        }
    }

    #[test]
    fn unknown_keys_are_refused() {
        let e = toml::from_str::<IssuerConfig>(
            "type = \"postgres\"\nadmin_dsn_file = \"pg.dsn\"\nrole = \"x\"\n",
        )
        .unwrap_err();
        assert!(e.to_string().contains("unknown field `role`"), "{e}");
    }

    #[test]
    fn every_bad_setting_is_reported_at_its_key_at_once() {
        let issues = config_issues(
            r#"
            admin_dsn_file = ""
            sslmode = "verify-ca"
            connect_timeout = "0s"
            pool_size = 0
            allow_weak_auth = ["trust"]
            role_prefix = "Task-"
            database = ""
        "#,
        );
        let at: Vec<&str> = issues.iter().map(|(p, _)| p.as_str()).collect();
        assert_eq!(
            at,
            [
                "issuers.pg.admin_dsn_file",
                "issuers.pg.connect_timeout",
                "issuers.pg.sslmode",
                "issuers.pg.pool_size",
                "issuers.pg.allow_weak_auth[0]",
                "issuers.pg.role_prefix",
                "issuers.pg.database",
            ],
            "{issues:?}"
        );
        assert!(
            issues[2].1.contains("unknown sslmode `verify-ca`"),
            "{issues:?}"
        );
        assert!(
            issues[5].1.contains("invalid role_prefix `Task-`"),
            "{issues:?}"
        );

        let e = config_issues("admin_dsn_file = \"pg.dsn\"\nsslmode = \"verify-full\"\n");
        assert_eq!(e.len(), 1, "{e:?}");
        assert_eq!(e[0].0, "issuers.pg.sslmode");
        assert!(e[0].1.contains("needs ssl_root_cert"), "{e:?}");

        let long = "p".repeat(MAX_PREFIX_LEN + 1);
        let e = config_issues(&format!(
            "admin_dsn_file = \"pg.dsn\"\nrole_prefix = \"{long}\"\n"
        ));
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(e[0].1.contains("1 to 31 bytes"), "{e:?}");
        let e = config_issues("admin_dsn_file = \"pg.dsn\"\nrole_prefix = \"pg_task_\"\n");
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(
            e[0].1.contains("reserves role names starting with `pg_`"),
            "{e:?}"
        );
        assert_eq!(
            config_issues(&format!(
                "admin_dsn_file = \"pg.dsn\"\nrole_prefix = \"{}\"\n",
                "p".repeat(MAX_PREFIX_LEN)
            )),
            vec![]
        );
    }

    #[test]
    fn grants_are_checked_at_each_key() {
        assert_eq!(
            grant_issues("roles = [\"read_a\"]\nconnection_limit = 2"),
            vec![]
        );
        let e = grant_issues("roles = []");
        assert_eq!(e.len(), 1, "{e:?}");
        assert_eq!(e[0].0, "policies.p.low.pg.roles");
        assert!(e[0].1.contains("roles is empty"), "{e:?}");
        let e = grant_issues(
            "roles = [\"a\", \"\", \"kt_task_other\", \"pg_execute_server_program\", \"a\"]\nconnection_limit = 0",
        );
        let at: Vec<&str> = e.iter().map(|(p, _)| p.as_str()).collect();
        assert_eq!(
            at,
            [
                "policies.p.low.pg.roles[1]",
                "policies.p.low.pg.roles[2]",
                "policies.p.low.pg.roles[3]",
                "policies.p.low.pg.roles[4]",
                "policies.p.low.pg.connection_limit",
            ],
            "{e:?}"
        );
        assert!(e[1].1.contains("role_prefix `kt_task_`"), "{e:?}");
        assert!(e[3].1.contains("listed twice"), "{e:?}");
        // Unknown keys and wrong types: one issue at the grant.
        let e = grant_issues("role = [\"a\"]");
        assert_eq!(e.len(), 1, "{e:?}");
        assert_eq!(e[0].0, "policies.p.low.pg");
        assert!(e[0].1.contains("unknown field `role`"), "{e:?}");
        let e = grant_issues("roles = \"a\"");
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(e[0].1.contains("invalid type"), "{e:?}");
    }

    /// `keyturn_task_mark`'s fast path expects the comment to start as
    /// keyturn writes it; any other start takes its JSON path.
    #[test]
    fn the_comment_starts_with_the_mark_and_the_task_id() {
        let t = attribution("0123456789abcdef01234567");
        let c = serde_json::to_string(&Comment {
            keyturn: TASK_MARK,
            task: &t,
            expires_at: "2030-01-01T00:00:00Z",
        })
        .unwrap();
        assert!(
            c.starts_with(r#"{"keyturn":"task","task_id":"0123456789abcdef01234567","#),
            "{c}"
        );
        assert!(SESSION.contains(
            r#"starts_with(c, '{"keyturn":"task","task_id":' || to_json(task)::text || ',')"#
        ));
    }

    #[test]
    fn application_name_is_safe_and_fits() {
        let mut t = attribution("abc123");
        assert_eq!(
            application_name(&t),
            "keyturn-task abc123 run run-42 by alice@example.com"
        );
        t.task_id = "a".repeat(32);
        t.run_id = "r".repeat(40);
        t.initiator = "Zoë O'Brien; DROP ROLE x".into();
        let name = application_name(&t);
        assert!(name.len() <= 63, "{name}");
        assert!(
            name.starts_with(&format!("keyturn-task {} run rrrr", t.task_id)),
            "{name}"
        );
        assert!(name.contains(" by Zo_"), "{name}");
        assert!(
            name.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b" ._@-".contains(&b)),
            "{name}"
        );
    }

    #[test]
    fn task_ids_and_handles_are_checked() {
        let issuer = PgIssuer::new(PgIssuerConfig::new("/nonexistent")).unwrap();
        assert_eq!(issuer.role_of("abc1").unwrap(), "kt_task_abc1");
        for bad in ["", "ABC", "a-b", "a\"b", &"a".repeat(33)] {
            assert_eq!(
                issuer.role_of(bad).unwrap_err().kind,
                ErrorKind::Invalid,
                "{bad:?}"
            );
        }
        let t = attribution("abc1");
        assert_eq!(issuer.role_for(&t, None).unwrap(), "kt_task_abc1");
        assert_eq!(
            issuer.role_for(&t, Some("kt_task_abc1")).unwrap(),
            "kt_task_abc1"
        );
        assert_eq!(
            issuer.role_for(&t, Some("postgres")).unwrap_err().kind,
            ErrorKind::Invalid
        );
    }

    // ---- real PostgreSQL below ----

    const NEED: &str =
        "start the test services: `bash scripts/services.sh start` (or run `bash scripts/test.sh`)";

    /// Tables A and B, roles `r_low` (SELECT on A) and `r_high` (SELECT on
    /// A and B), a DSN file; all named with a random suffix and dropped with
    /// every task role of the fixture when it goes.
    struct Fx {
        host: String,
        port: u16,
        admin_dsn: String,
        sfx: String,
        dir: tempfile::TempDir,
    }

    impl Fx {
        async fn new() -> Self {
            let var =
                |n: &str| std::env::var(n).unwrap_or_else(|_| panic!("{n} is not set: {NEED}"));
            let fx = Fx {
                host: var("KEYTURN_TEST_PG_HOST"),
                port: var("KEYTURN_TEST_PG_PORT").parse().unwrap(),
                admin_dsn: var("KEYTURN_TEST_PG_ADMIN_DSN"),
                sfx: hex::encode(rand::random::<[u8; 4]>()),
                dir: tempfile::tempdir().unwrap(),
            };
            std::fs::write(fx.dsn_file(), format!("{}\n", fx.admin_dsn)).unwrap();
            fx.admin()
                .await
                .batch_execute(&format!(
                    "CREATE TABLE {a} (x int); INSERT INTO {a} VALUES (1); \
                     CREATE TABLE {b} (x int); INSERT INTO {b} VALUES (2); \
                     CREATE ROLE {low}; GRANT SELECT ON {a} TO {low}; \
                     CREATE ROLE {high}; GRANT SELECT ON {a}, {b} TO {high};",
                    a = fx.table("a"),
                    b = fx.table("b"),
                    low = fx.low(),
                    high = fx.high(),
                ))
                .await
                .unwrap();
            fx
        }

        fn dsn_file(&self) -> PathBuf {
            self.dir.path().join("admin.dsn")
        }

        fn table(&self, n: &str) -> String {
            format!("kt_{n}_{}", self.sfx)
        }

        fn low(&self) -> String {
            format!("r_low_{}", self.sfx)
        }

        fn high(&self) -> String {
            format!("r_high_{}", self.sfx)
        }

        /// A task of this fixture (its id ends with the suffix).
        fn task(&self, name: &str) -> TaskAttribution {
            attribution(&format!("{name}{}", self.sfx))
        }

        fn config(&self) -> PgIssuerConfig {
            PgIssuerConfig {
                connect_timeout: Some("5s".into()),
                ..PgIssuerConfig::new(self.dsn_file())
            }
        }

        fn issuer(&self) -> PgIssuer {
            PgIssuer::new(self.config()).unwrap()
        }

        async fn admin(&self) -> Client {
            let cfg: Config = self.admin_dsn.parse().unwrap();
            let (c, conn) = cfg.connect(NoTls).await.unwrap();
            tokio::spawn(conn);
            c
        }

        /// Runs `sql` as the superuser.
        async fn sql(&self, sql: &str) {
            self.admin().await.batch_execute(sql).await.unwrap();
        }

        /// Points the issuer's DSN file at `user` with `password` on `db`.
        fn use_admin(&self, user: &str, password: &str, db: &str) {
            std::fs::write(
                self.dsn_file(),
                format!(
                    "host={} port={} user={user} password={password} dbname={db}",
                    self.host, self.port
                ),
            )
            .unwrap();
        }

        /// Makes `kt_adm_SUFFIX` (password `adm-pw-1`): a login that may
        /// create roles and end their sessions, and no superuser.
        async fn make_admin(&self) -> String {
            let admin = format!("kt_adm_{}", self.sfx);
            self.sql(&format!(
                "CREATE ROLE {admin} LOGIN CREATEROLE PASSWORD 'adm-pw-1'; \
                 GRANT pg_signal_backend TO {admin}"
            ))
            .await;
            admin
        }

        /// Issues for `task` a grant of `roles`.
        async fn issue(
            &self,
            issuer: &PgIssuer,
            task: &TaskAttribution,
            roles: &[String],
            ttl: Duration,
        ) -> Result<Issued, PluginError> {
            let grant = Grant(serde_json::json!({ "roles": roles }));
            issue(issuer, task, &grant, ttl).await
        }

        /// Logs in as `issued`, asserts the session reads table A and not B,
        /// and returns it.
        async fn reads_a_not_b(&self, issued: &Issued) -> Client {
            let c = self.login(issued).await.unwrap();
            assert!(self.reads(&c, "a").await, "{} reads A", issued.handle);
            assert!(
                !self.reads(&c, "b").await,
                "{} must not read B",
                issued.handle
            );
            c
        }

        /// Asserts that revoking `task` by its id ends the session `c` and
        /// drops the role `issued` named.
        async fn assert_revoked(
            &self,
            issuer: &PgIssuer,
            task: &TaskAttribution,
            issued: &Issued,
            c: &Client,
        ) {
            assert_revoked_now(issuer, task, None).await;
            assert!(
                c.simple_query("SELECT 1").await.is_err(),
                "the session survived"
            );
            assert!(
                !self.role_exists(&issued.handle).await,
                "the role was not dropped"
            );
        }

        /// Logs in as the issued credential says, independently of keyturn.
        async fn login(&self, issued: &Issued) -> Result<Client, tokio_postgres::Error> {
            let p = &issued.public;
            assert_eq!(p["host"], self.host);
            assert_eq!(p["port"], self.port.to_string());
            self.login_as(&p["user"], issued.secret["password"].expose_str().unwrap())
                .await
        }

        async fn login_as(
            &self,
            user: &str,
            password: &str,
        ) -> Result<Client, tokio_postgres::Error> {
            let mut cfg = Config::new();
            cfg.host(&self.host)
                .port(self.port)
                .user(user)
                .password(password)
                .dbname("postgres")
                .connect_timeout(Duration::from_secs(5));
            let (c, conn) = cfg.connect(NoTls).await?;
            tokio::spawn(conn);
            c.simple_query("SELECT 1").await?;
            Ok(c)
        }

        async fn reads(&self, c: &Client, table: &str) -> bool {
            match c
                .simple_query(&format!("SELECT x FROM {}", self.table(table)))
                .await
            {
                Ok(_) => true,
                Err(e) => {
                    assert_eq!(e.code(), Some(&SqlState::INSUFFICIENT_PRIVILEGE), "{e}");
                    false
                }
            }
        }

        /// The roles `role` is directly a member of, sorted.
        async fn member_of(&self, role: &str) -> Vec<String> {
            self.admin()
                .await
                .query_one(
                    "SELECT coalesce(array_agg(b.rolname::text ORDER BY b.rolname), '{}') \
                     FROM pg_auth_members m JOIN pg_roles b ON b.oid = m.roleid \
                     JOIN pg_roles t ON t.oid = m.member WHERE t.rolname = $1",
                    &[&role],
                )
                .await
                .unwrap()
                .get(0)
        }

        /// The issuer's session functions that `role`'s sessions made.
        async fn session_functions_of(&self, role: &str) -> i64 {
            self.admin()
                .await
                .query_one(
                    "SELECT count(*) FROM pg_proc p JOIN pg_roles o ON o.oid = p.proowner \
                     WHERE o.rolname = $1 AND p.proname LIKE 'keyturn\\_task\\_%' \
                     AND p.pronamespace::regnamespace::text LIKE 'pg\\_temp\\_%'",
                    &[&role],
                )
                .await
                .unwrap()
                .get(0)
        }

        /// Lets `r_low` (and so its tasks) create in schema `public`, as an
        /// "ETL writer" grant may; taken back when the fixture goes.
        async fn may_create_in_public(&self) {
            self.sql(&format!("GRANT CREATE ON SCHEMA public TO {}", self.low()))
                .await;
        }

        /// Issues `task` a grant of `r_low`, which may create in `public`,
        /// and logs in as the task.
        async fn creating_task(
            &self,
            issuer: &PgIssuer,
            task: &TaskAttribution,
        ) -> (Issued, Client) {
            let got = self.issue(issuer, task, &[self.low()], TTL).await.unwrap();
            self.may_create_in_public().await;
            let c = self.login(&got).await.unwrap();
            (got, c)
        }

        /// Makes `kt_plain_SUFFIX`, a login with no privilege, and logs in
        /// as it.
        async fn plain(&self) -> (String, Client) {
            let plain = format!("kt_plain_{}", self.sfx);
            self.sql(&format!("CREATE ROLE {plain} LOGIN PASSWORD 'plain-pw-1'"))
                .await;
            let c = self.login_as(&plain, "plain-pw-1").await.unwrap();
            (plain, c)
        }

        async fn table_exists(&self, table: &str) -> bool {
            self.admin()
                .await
                .query_opt("SELECT 1 FROM pg_tables WHERE tablename = $1", &[&table])
                .await
                .unwrap()
                .is_some()
        }

        async fn role_exists(&self, role: &str) -> bool {
            self.admin()
                .await
                .query_opt("SELECT 1 FROM pg_roles WHERE rolname = $1", &[&role])
                .await
                .unwrap()
                .is_some()
        }
    }

    impl Drop for Fx {
        fn drop(&mut self) {
            let dsn = self.admin_dsn.clone();
            let sfx = self.sfx.clone();
            let (a, b, low, high) = (self.table("a"), self.table("b"), self.low(), self.high());
            // Drop runs inside the test's runtime: clean up on a fresh one.
            let _ = std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(async move {
                    let cfg: Config = dsn.parse().unwrap();
                    let Ok((c, conn)) = cfg.connect(NoTls).await else {
                        return;
                    };
                    tokio::spawn(conn);
                    let Ok(rows) = c
                        .query(
                            "SELECT rolname::text FROM pg_roles WHERE rolname LIKE '%' || $1",
                            &[&sfx],
                        )
                        .await
                    else {
                        return;
                    };
                    let mut tasks: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
                    tasks.retain(|r| *r != low && *r != high);
                    for r in &tasks {
                        let _ = c
                            .query(
                                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = $1",
                                &[r],
                            )
                            .await;
                        let _ = c
                            .batch_execute(&format!(
                                "DROP OWNED BY {q}; DROP ROLE IF EXISTS {q}",
                                q = quote_ident(r)
                            ))
                            .await;
                    }
                    let _ = c
                        .batch_execute(&format!(
                            "DROP TABLE IF EXISTS {a}, {b}; REVOKE ALL ON SCHEMA public FROM {low}; \
                             DROP ROLE IF EXISTS {low}; DROP ROLE IF EXISTS {high}"
                        ))
                        .await;
                });
            })
            .join();
        }
    }

    const TTL: Duration = Duration::from_secs(600);

    #[apply(server_test!)]
    async fn a_low_task_reads_a_not_b_a_high_task_reads_both_and_the_server_names_the_task() {
        let fx = Fx::new().await;
        let issuer = fx.issuer();
        issuer.check().await.unwrap();

        let low = fx.task("low");
        let got = fx.issue(&issuer, &low, &[fx.low()], TTL).await.unwrap();
        assert_eq!(got.handle, format!("kt_task_{}", low.task_id));
        assert_eq!(got.public["user"], got.handle);
        assert_eq!(got.public["dbname"], "postgres");
        assert_eq!(got.public["sslmode"], "disable");
        assert_eq!(got.secret["password"].len(), PASSWORD_LEN);
        let c = fx.reads_a_not_b(&got).await;
        assert_eq!(fx.member_of(&got.handle).await, vec![fx.low()]);

        // The server names the task: application_name of its session, and
        // the whole attribution in the role's comment.
        let app: String = c
            .query_one(
                "SELECT application_name FROM pg_stat_activity WHERE pid = pg_backend_pid()",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(
            app,
            format!(
                "keyturn-task {} run run-42 by alice@example.com",
                low.task_id
            )
        );
        let comment: String = fx
            .admin()
            .await
            .query_one(
                "SELECT shobj_description(oid, 'pg_authid') FROM pg_roles WHERE rolname = $1",
                &[&got.handle],
            )
            .await
            .unwrap()
            .get(0);
        let comment: serde_json::Value = serde_json::from_str(&comment).unwrap();
        assert_eq!(comment["keyturn"], "task");
        let back: TaskAttribution = serde_json::from_value(comment.clone()).unwrap();
        assert_eq!(back, low);
        assert_eq!(comment["expires_at"], got.public["expires_at"]);

        // The same agent at high sensitivity: both tables. Logged in through
        // the delivered DSN this time.
        let high = fx.task("high");
        let got_high = fx
            .issue(&issuer, &high, &[fx.low(), fx.high()], TTL)
            .await
            .unwrap();
        let dsn: Config = got_high.secret["dsn"]
            .expose_str()
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(dsn.get_user(), Some(got_high.handle.as_str()));
        let (ch, conn) = dsn.connect(NoTls).await.unwrap();
        tokio::spawn(conn);
        assert!(fx.reads(&ch, "a").await);
        assert!(fx.reads(&ch, "b").await);
        let mut both = vec![fx.high(), fx.low()];
        both.sort();
        assert_eq!(fx.member_of(&got_high.handle).await, both);
    }

    #[apply(server_test!)]
    async fn issuing_again_sets_a_fresh_password_and_exactly_the_new_grant() {
        let fx = Fx::new().await;
        let issuer = fx.issuer();
        let task = fx.task("again");
        let first = fx
            .issue(&issuer, &task, &[fx.low(), fx.high()], TTL)
            .await
            .unwrap();
        let grant = Grant(serde_json::json!({ "roles": [fx.low()], "connection_limit": 1 }));
        let second = issue(&issuer, &task, &grant, TTL).await.unwrap();
        assert_eq!(first.handle, second.handle);
        assert_ne!(
            first.secret["password"].expose(),
            second.secret["password"].expose()
        );
        let e = fx
            .login(&first)
            .await
            .expect_err("the first password still works");
        assert_eq!(e.code(), Some(&SqlState::INVALID_PASSWORD), "{e}");
        let c = fx.login(&second).await.unwrap();
        assert!(fx.reads(&c, "a").await);
        assert!(
            !fx.reads(&c, "b").await,
            "r_high's membership was not taken back"
        );
        assert_eq!(fx.member_of(&second.handle).await, vec![fx.low()]);
        // connection_limit = 1: a second session is refused.
        let e = fx.login(&second).await.expect_err("a second session");
        assert_eq!(e.code(), Some(&SqlState::TOO_MANY_CONNECTIONS), "{e}");
    }

    #[apply(server_test!)]
    async fn over_verified_tls_the_delivered_dsn_asks_for_it_too() {
        let fx = Fx::new().await;
        let ca = std::env::var("KEYTURN_TEST_PG_CA").unwrap_or_else(|_| panic!("{NEED}"));
        let issuer = PgIssuer::new(PgIssuerConfig {
            sslmode: Some("verify-full".into()),
            ssl_root_cert: Some(ca.clone().into()),
            database: Some("postgres".into()),
            ..fx.config()
        })
        .unwrap();
        issuer.check().await.unwrap();
        let task = fx.task("tls");
        let got = fx.issue(&issuer, &task, &[fx.low()], TTL).await.unwrap();
        assert_eq!(got.public["sslmode"], "verify-full");
        assert_eq!(got.public["sslrootcert"], ca);
        let dsn = got.secret["dsn"].expose_str().unwrap();
        assert!(
            dsn.contains(" sslmode=verify-full sslrootcert='"),
            "the DSN lacks TLS"
        );
        assert!(dsn.starts_with(&format!(
            "host='{}' dbname='postgres' user='{}'",
            fx.host, got.handle
        )));
        issuer
            .revoke(&task, Some(&got.handle), in_an_hour())
            .await
            .unwrap();
    }

    #[apply(server_test!)]
    async fn revoke_ends_the_session_and_the_login_and_is_harmless_twice() {
        let fx = Fx::new().await;
        let issuer = fx.issuer();
        let task = fx.task("rev");
        let got = fx.issue(&issuer, &task, &[fx.low()], TTL).await.unwrap();
        let live = fx.login(&got).await.unwrap();
        assert_not_revoked(&issuer, &task, Some(&got.handle)).await;

        assert_revoked_now(&issuer, &task, Some(&got.handle)).await;
        assert!(
            live.simple_query("SELECT 1").await.is_err(),
            "the task's session survived revoke"
        );
        let e = fx.login(&got).await.expect_err("login after revoke");
        assert_eq!(e.code(), Some(&SqlState::INVALID_PASSWORD), "{e}");
        assert!(
            !fx.role_exists(&got.handle).await,
            "the role was not dropped"
        );
        assert_eq!(
            issuer
                .revoke(&task, Some(&got.handle), in_an_hour())
                .await
                .unwrap(),
            Revoked::Now
        );
        assert_revoked_now(&issuer, &task, None).await;
    }

    #[apply(server_test!)]
    async fn revoke_without_a_handle_finds_the_role_by_task_id_and_drops_what_it_made() {
        let fx = Fx::new().await;
        let issuer = fx.issuer();
        let task = fx.task("crash");
        let (got, c) = fx.creating_task(&issuer, &task).await;
        // The task made two tables: its role owns something. It hands one
        // to its granted role, which may create in the schema.
        let (made, handed) = (fx.table("made"), fx.table("handed"));
        c.batch_execute(&format!(
            "CREATE TABLE {made} (x int); CREATE TABLE {handed} (x int); \
             ALTER TABLE {handed} OWNER TO {}",
            fx.low()
        ))
        .await
        .unwrap();
        // keyturn "crashed" before it recorded the handle.
        fx.assert_revoked(&issuer, &task, &got, &c).await;
        assert!(!fx.table_exists(&made).await, "the task's table was kept");
        assert!(
            fx.table_exists(&handed).await,
            "the handed table was dropped"
        );
        fx.sql(&format!("DROP TABLE {handed}")).await;
    }

    /// Defect (black-box): with `database` set (the README's own example),
    /// what a task made in that database survived its end, owned by its
    /// role, which stayed (`DROP OWNED` acts in the admin DSN's database
    /// only). What it made in any database is dropped, then the role.
    #[apply(server_test!)]
    async fn what_a_task_made_in_another_database_goes_with_it() {
        let fx = Fx::new().await;
        let db = fx.table("db");
        fx.sql(&format!("CREATE DATABASE {db}")).await;
        let mut cfg: Config = fx.admin_dsn.parse().unwrap();
        cfg.dbname(&db);
        let (c, conn) = cfg.connect(NoTls).await.unwrap();
        tokio::spawn(conn);
        c.batch_execute(&format!("GRANT CREATE ON SCHEMA public TO {}", fx.low()))
            .await
            .unwrap();
        let issuer = PgIssuer::new(PgIssuerConfig {
            database: Some(db.clone()),
            ..fx.config()
        })
        .unwrap();
        let task = fx.task("otherdb");
        let got = fx
            .issue(&issuer, &task, &[fx.low()], Duration::from_secs(600))
            .await
            .unwrap();
        assert_eq!(got.public["dbname"], db.as_str(), "{:?}", got.public);
        let mut login = Config::new();
        login
            .host(&fx.host)
            .port(fx.port)
            .user(&got.handle)
            .password(got.secret["password"].expose_str().unwrap())
            .dbname(&db);
        let (t, conn) = login.connect(NoTls).await.unwrap();
        tokio::spawn(conn);
        let (made, f) = (fx.table("made"), fx.table("planted"));
        t.batch_execute(&format!(
            "CREATE TABLE {made} (x int); CREATE FUNCTION {f}() RETURNS int \
             LANGUAGE sql SECURITY DEFINER AS 'SELECT 1'"
        ))
        .await
        .unwrap();

        assert_revoked_now(&issuer, &task, Some(&got.handle)).await;
        assert!(!fx.role_exists(&got.handle).await, "the role stayed");
        let left = c
            .query_one(
                "SELECT (SELECT count(*) FROM pg_class WHERE relname = $1) \
                 + (SELECT count(*) FROM pg_proc WHERE proname = $2)",
                &[&made, &f],
            )
            .await
            .unwrap()
            .get::<_, i64>(0);
        drop(c);
        fx.sql(&format!("DROP DATABASE {db} WITH (FORCE)")).await;
        assert_eq!(left, 0, "the task's table or function outlived it in {db}");
    }

    #[apply(server_test!)]
    async fn a_security_definer_function_a_task_made_acts_for_nobody_after_its_end() {
        let fx = Fx::new().await;
        let issuer = fx.issuer();
        let task = fx.task("definer");
        let (got, c) = fx.creating_task(&issuer, &task).await;
        let (plain, p) = fx.plain().await;
        // The task plants a function that, run as a superuser, makes
        // `plain` one; EXECUTE is PUBLIC's by default.
        let f = fx.table("promote");
        c.batch_execute(&format!(
            "CREATE FUNCTION {f}() RETURNS text LANGUAGE plpgsql SECURITY DEFINER AS $f$ \
             BEGIN EXECUTE 'ALTER ROLE {plain} SUPERUSER'; RETURN current_user; END $f$"
        ))
        .await
        .unwrap();
        fx.assert_revoked(&issuer, &task, &got, &c).await;

        let called = p.simple_query(&format!("SELECT {f}()")).await;
        let super_now: bool = fx
            .admin()
            .await
            .query_one(
                "SELECT rolsuper FROM pg_roles WHERE rolname = $1",
                &[&plain],
            )
            .await
            .unwrap()
            .get(0);
        // Clean up before asserting: the function may be the admin's now.
        fx.sql(&format!(
            "DROP FUNCTION IF EXISTS {f}(); ALTER ROLE {plain} NOSUPERUSER"
        ))
        .await;
        assert!(!super_now, "the task's function made {plain} a superuser");
        let e = called.expect_err("the task's function outlived the task");
        assert_eq!(e.code(), Some(&SqlState::UNDEFINED_FUNCTION), "{e}");
    }

    #[apply(server_test!)]
    async fn a_task_role_that_must_stay_keeps_no_privilege_of_its_grant() {
        let fx = Fx::new().await;
        let issuer = fx.issuer();
        let task = fx.task("stays");
        let (got, c) = fx.creating_task(&issuer, &task).await;
        let (_, p) = fx.plain().await;
        // The task makes a table and a function that reads A with the
        // task's grant for whoever calls it.
        let (made, f) = (fx.table("made"), fx.table("peek"));
        c.batch_execute(&format!(
            "CREATE TABLE {made} (x int); \
             CREATE FUNCTION {f}() RETURNS int LANGUAGE sql SECURITY DEFINER \
             AS 'SELECT x FROM {a}'",
            a = fx.table("a")
        ))
        .await
        .unwrap();
        p.simple_query(&format!("SELECT {f}()")).await.unwrap();
        // Someone else's view on the task's table: DROP OWNED refuses.
        let view = fx.table("dep");
        fx.sql(&format!("CREATE VIEW {view} AS SELECT x FROM {made}"))
            .await;

        // Said as what is left (black-box finding: only the log said so,
        // the item and its audit record read as a clean revocation).
        match issuer
            .revoke(&task, Some(&got.handle), in_an_hour())
            .await
            .unwrap()
        {
            Revoked::Left(note) => assert!(
                note.contains("but not dropped")
                    && note.contains(&format!("DROP OWNED BY {}", got.handle)),
                "{note}"
            ),
            other => panic!("expected what is left, got {other:?}"),
        }
        assert!(
            issuer
                .verify_revoked(&task, Some(&got.handle))
                .await
                .unwrap()
        );
        assert!(fx.role_exists(&got.handle).await, "the role was dropped");
        assert!(fx.table_exists(&made).await, "the table was dropped");
        assert_eq!(fx.member_of(&got.handle).await, Vec::<String>::new());
        let e = p
            .simple_query(&format!("SELECT {f}()"))
            .await
            .expect_err("the task's function still reads A");
        assert_eq!(e.code(), Some(&SqlState::INSUFFICIENT_PRIVILEGE), "{e}");
        // Once the view is gone, the next revoke drops role and objects.
        fx.sql(&format!("DROP VIEW {view}")).await;
        assert_revoked_now(&issuer, &task, Some(&got.handle)).await;
        assert!(!fx.role_exists(&got.handle).await, "the role stayed");
        assert!(!fx.table_exists(&made).await, "the table was kept");
    }

    #[apply(server_test!)]
    async fn valid_until_refuses_login_after_the_expiry_without_keyturn() {
        let fx = Fx::new().await;
        let issuer = fx.issuer();
        let task = fx.task("ttl");
        let got = fx
            .issue(&issuer, &task, &[fx.low()], Duration::from_secs(2))
            .await
            .unwrap();
        let live = fx.login(&got).await.unwrap();
        let until: SystemTime = humantime::parse_rfc3339(&got.public["expires_at"]).unwrap();
        assert_eq!(until, got.expires_at);
        assert!(got.expires_at <= SystemTime::now() + Duration::from_secs(2));
        tokio::time::sleep(
            got.expires_at
                .duration_since(SystemTime::now())
                .unwrap_or_default()
                + Duration::from_millis(1100),
        )
        .await;
        let e = fx.login(&got).await.expect_err("login after VALID UNTIL");
        assert_eq!(e.code(), Some(&SqlState::INVALID_PASSWORD), "{e}");
        // VALID UNTIL ends no session: it is not revoked until keyturn says.
        assert!(!issuer.verify_revoked(&task, None).await.unwrap());
        drop(live);
        assert_revoked_now(&issuer, &task, None).await;
    }

    /// The server an issuer reaches is its admin DSN's hosts and ports,
    /// whatever the database, user or password; another host (name or
    /// port) is another server.
    #[test]
    fn the_origin_is_the_admin_dsns_hosts_and_ports() {
        let of = |dsn: &str| server_of(&dsn.parse::<Config>().unwrap());
        let a = of("host=db.example.com port=5432 user=admin password=s3cret dbname=sales");
        assert_eq!(a, "postgres db.example.com:5432");
        assert!(!a.contains("s3cret"));
        assert_eq!(
            of("postgresql://other:pw@DB.example.com/postgres"),
            a,
            "same server, another admin and database"
        );
        assert_ne!(of("host=db.example.com port=5433"), a);
        assert_ne!(of("host=db2.example.com"), a);
        assert_eq!(
            of("host=b,a port=5432,5433"),
            of("host=a,b port=5433,5432"),
            "a host list in any order"
        );
        assert_eq!(of("hostaddr=10.0.0.5 port=6432"), "postgres 10.0.0.5:6432");
    }

    /// Nothing is created before the admin connection is in hand: an issue
    /// whose admin login is refused, or whose server is down, says it left
    /// nothing, and the task manager ends such a start at once rather than
    /// retry revocations against a server it cannot reach.
    #[apply(server_test!)]
    async fn an_issue_that_never_reached_the_server_left_nothing() {
        let fx = Fx::new().await;
        let task = fx.task("unreached");
        let grant = Grant(serde_json::json!({ "roles": [fx.low()] }));
        let issuer = fx.issuer();
        fx.use_admin(
            &format!("kt_nobody_{}", fx.sfx),
            "not-a-password",
            "postgres",
        );
        let e = issuer
            .issue(&request(&task, &grant, TTL))
            .await
            .expect_err("the admin login is refused");
        assert!(e.nothing_left, "{e}");
        std::fs::write(fx.dsn_file(), "host=127.0.0.1 port=1 user=x dbname=x\n").unwrap();
        let e = issuer
            .issue(&request(&task, &grant, TTL))
            .await
            .expect_err("nothing listens there");
        assert!(e.nothing_left, "{e}");
        assert!(!fx.role_exists(&format!("kt_task_{}", task.task_id)).await);
    }

    #[apply(server_test!)]
    async fn the_origin_follows_the_admin_dsn_file() {
        let fx = Fx::new().await;
        let issuer = fx.issuer();
        let at = format!("postgres {}:{}", fx.host.to_ascii_lowercase(), fx.port);
        assert_eq!(issuer.origin().await.unwrap().as_deref(), Some(at.as_str()));
        // The file is read at every step: a new content is a new server.
        std::fs::write(
            fx.dsn_file(),
            format!("host=elsewhere.invalid port={} user=x", fx.port),
        )
        .unwrap();
        assert_eq!(
            issuer.origin().await.unwrap().unwrap(),
            format!("postgres elsewhere.invalid:{}", fx.port)
        );
    }

    /// A `role_prefix` changed under a live task: the task is revoked by
    /// the role name recorded as its handle; a handle that is not a task
    /// role of this task, or names a role without keyturn's mark for it,
    /// is refused and that role left alone.
    #[apply(server_test!)]
    async fn a_changed_role_prefix_revokes_earlier_tasks_by_their_recorded_role() {
        let fx = Fx::new().await;
        let task = fx.task("prefix");
        let got = fx
            .issue(&fx.issuer(), &task, &[fx.low()], TTL)
            .await
            .unwrap();
        assert_eq!(got.handle, format!("kt_task_{}", task.task_id));
        let live = fx.login(&got).await.unwrap();
        let renamed = PgIssuer::new(PgIssuerConfig {
            role_prefix: Some("kt2_".into()),
            ..fx.config()
        })
        .unwrap();
        assert_not_revoked(&renamed, &task, Some(&got.handle)).await;
        assert_revoked_now(&renamed, &task, Some(&got.handle)).await;
        assert!(live.simple_query("SELECT 1").await.is_err());
        assert!(!fx.role_exists(&got.handle).await);

        // What an altered task store could hand back.
        let victim = format!("kt_victim_{}", fx.sfx);
        fx.sql(&format!("CREATE ROLE {victim} LOGIN PASSWORD 'victim-0'"))
            .await;
        // Minted before a prefix change, its role never recorded (a crash
        // between the mint and the record): found by the task's mark.
        let crashed = fx.task("prefixcrash");
        let got = fx
            .issue(&fx.issuer(), &crashed, &[fx.low()], TTL)
            .await
            .unwrap();
        assert_not_revoked(&renamed, &crashed, None).await;
        assert_revoked_now(&renamed, &crashed, None).await;
        assert!(!fx.role_exists(&got.handle).await);

        let e = renamed
            .revoke(&task, Some(&victim), in_an_hour())
            .await
            .unwrap_err();
        assert_error(&e, ErrorKind::Invalid, "is not a task role of this task");
        let e = renamed
            .verify_revoked(&task, Some(&victim))
            .await
            .unwrap_err();
        assert_error(&e, ErrorKind::Invalid, "is not a task role of this task");
        // Shaped like one, but not keyturn's for this task (no mark).
        let shaped = format!("other_{}", task.task_id);
        fx.sql(&format!("CREATE ROLE {shaped} LOGIN PASSWORD 'shaped-0'"))
            .await;
        let e = renamed
            .revoke(&task, Some(&shaped), in_an_hour())
            .await
            .unwrap_err();
        assert_error(&e, ErrorKind::Invalid, "not keyturn's role");
        fx.login_as(&victim, "victim-0").await.unwrap();
        fx.login_as(&shaped, "shaped-0").await.unwrap();
        fx.sql(&format!("DROP ROLE {victim}; DROP ROLE {shaped}"))
            .await;
    }

    #[apply(server_test!)]
    async fn someone_elses_role_with_the_tasks_name_is_left_alone() {
        let fx = Fx::new().await;
        let issuer = fx.issuer();
        let task = fx.task("foreign");
        let role = format!("kt_task_{}", task.task_id);
        fx.sql(&format!(
            "CREATE ROLE {role} LOGIN PASSWORD 'theirs-0'; \
             COMMENT ON ROLE {role} IS '{{\"keyturn\":\"task\",\"task_id\":\"another\"}}'"
        ))
        .await;
        let e = fx
            .issue(&issuer, &task, &[fx.low()], TTL)
            .await
            .unwrap_err();
        assert_error(&e, ErrorKind::Invalid, "not keyturn's role");
        let e = issuer.revoke(&task, None, in_an_hour()).await.unwrap_err();
        assert_eq!(e.kind, ErrorKind::Invalid, "{e}");
        let e = issuer.verify_revoked(&task, None).await.unwrap_err();
        assert_eq!(e.kind, ErrorKind::Invalid, "{e}");
        // Untouched: it logs in with its own password, no membership.
        fx.login_as(&role, "theirs-0").await.unwrap();
        assert_eq!(fx.member_of(&role).await, Vec::<String>::new());
    }

    #[apply(server_test!)]
    async fn a_grant_reaching_a_powerful_or_missing_role_issues_nothing() {
        let fx = Fx::new().await;
        let issuer = fx.issuer();
        // `r_low` reaches a CREATEROLE role through a membership.
        let strong = format!("r_strong_{}", fx.sfx);
        fx.sql(&format!(
            "CREATE ROLE {strong} CREATEROLE; GRANT {strong} TO {}",
            fx.low()
        ))
        .await;
        let task = fx.task("strong");
        let e = fx
            .issue(&issuer, &task, &[fx.low()], TTL)
            .await
            .unwrap_err();
        assert_error(&e, ErrorKind::Invalid, &strong);
        assert!(!fx.role_exists(&format!("kt_task_{}", task.task_id)).await);
        // A role that does not exist: the whole transaction rolls back.
        let task = fx.task("missing");
        let e = fx
            .issue(
                &issuer,
                &task,
                &[fx.high(), format!("r_none_{}", fx.sfx)],
                TTL,
            )
            .await
            .unwrap_err();
        assert_error(&e, ErrorKind::Invalid, "does not exist");
        assert!(!fx.role_exists(&format!("kt_task_{}", task.task_id)).await);
        // A superuser granted directly.
        let root = format!("r_root_{}", fx.sfx);
        fx.sql(&format!("CREATE ROLE {root} SUPERUSER")).await;
        let e = fx
            .issue(&issuer, &fx.task("root"), std::slice::from_ref(&root), TTL)
            .await
            .unwrap_err();
        assert_error(&e, ErrorKind::Invalid, &root);

        // Defect: `keyturn check --online` accepted these grants, which
        // every start refuses. It runs the same checks, with the same words,
        // and accepts what a start accepts.
        let grant = |roles: &[String]| Grant(serde_json::json!({ "roles": roles }));
        for (roles, says) in [
            (vec![fx.low()], strong.clone()),
            (
                vec![fx.high(), format!("r_none_{}", fx.sfx)],
                "does not exist".to_owned(),
            ),
            (vec![root.clone()], root.clone()),
        ] {
            let e = issuer.check_grant(&grant(&roles), TTL).await.unwrap_err();
            assert_error(&e, ErrorKind::Invalid, &says);
        }
        assert_eq!(
            issuer.check_grant(&grant(&[fx.high()]), TTL).await.unwrap(),
            None
        );
    }

    #[apply(server_test!)]
    async fn the_password_and_its_verifier_reach_no_log_error_handle_or_public_field() {
        let fx = Fx::new().await;
        // tokio-postgres logs with `log`; the daemon bridges it (telemetry).
        let _ = tracing_log::LogTracer::init();
        let (_guard, logs) = crate::test_support::capture_logs();
        let issuer = fx.issuer();
        let task = fx.task("canary");
        let got = fx.issue(&issuer, &task, &[fx.low()], TTL).await.unwrap();
        let password = got.secret["password"].expose_str().unwrap().to_owned();
        // A second issue fails in the server after the verifier was sent.
        let e = fx
            .issue(&issuer, &task, &[format!("r_none_{}", fx.sfx)], TTL)
            .await
            .unwrap_err();
        issuer.revoke(&task, None, in_an_hour()).await.unwrap();
        let logs = String::from_utf8(logs.lock().unwrap().clone()).unwrap();
        // The capture works: the admin connection's statements are in it.
        assert!(logs.contains("executing statement"), "{logs}");
        assert!(logs.contains("set_config('keyturn.verifier'"), "{logs}");
        for text in [
            logs,
            e.to_string(),
            format!("{got:?}"),
            format!("{:?}", got.public),
            got.handle.clone(),
            format!("{issuer:?}"),
        ] {
            assert!(!text.contains(&password), "the password leaked: {text}");
            assert!(
                !text.contains("SCRAM-SHA-256$"),
                "the verifier leaked: {text}"
            );
        }
        assert!(got.secret["dsn"].expose_str().unwrap().contains(&password));
    }

    #[apply(server_test!)]
    async fn an_issuer_and_a_target_on_one_dsn_share_one_pool() {
        let fx = Fx::new().await;
        let issuer = fx.issuer();
        issuer.check().await.unwrap();
        // The postgres target builds its admin side from its own config.
        let target = PostgresConfig {
            connect_timeout: Some("5s".into()),
            ..PostgresConfig::new(fx.dsn_file(), "some_role")
        };
        let target_admin = Admin::new(&target, "postgres target").unwrap();
        let (_, a) = issuer.admin.pool("t", "test").await.unwrap();
        let (_, b) = target_admin.pool("t", "test").await.unwrap();
        assert!(
            std::ptr::eq(a.manager(), b.manager()),
            "two pools for one DSN"
        );
    }

    #[apply(server_test!)]
    async fn an_admin_with_createrole_and_pg_signal_backend_is_enough() {
        let fx = Fx::new().await;
        let admin = fx.make_admin().await;
        fx.use_admin(&admin, "adm-pw-1", "postgres");
        let issuer = fx.issuer();
        issuer.check().await.unwrap();
        let task = fx.task("notsuper");
        let got = fx.issue(&issuer, &task, &[fx.low()], TTL).await.unwrap();
        // Through the session functions, made by the admin in its session.
        assert_eq!(fx.session_functions_of(&admin).await, 4);
        let c = fx.reads_a_not_b(&got).await;
        // What the task made does not keep its role.
        let made = fx.table("made");
        fx.may_create_in_public().await;
        c.batch_execute(&format!("CREATE TABLE {made} (x int)"))
            .await
            .unwrap();
        fx.assert_revoked(&issuer, &task, &got, &c).await;
        assert!(!fx.table_exists(&made).await, "the task's table was kept");
    }

    #[apply(server_test!)]
    async fn an_admin_that_may_not_make_temporary_objects_issues_and_revokes_the_same() {
        let fx = Fx::new().await;
        let admin = fx.make_admin().await;
        let db = format!("kt_notemp_{}", fx.sfx);
        fx.sql(&format!("CREATE DATABASE {db}")).await;
        fx.sql(&format!("REVOKE TEMP ON DATABASE {db} FROM PUBLIC"))
            .await;
        fx.use_admin(&admin, "adm-pw-1", &db);
        let issuer = fx.issuer();
        let task = fx.task("notemp");
        let got = fx.issue(&issuer, &task, &[fx.low()], TTL).await.unwrap();
        assert_eq!(got.public["dbname"], db);
        let c = fx.reads_a_not_b(&got).await;
        // Issuing again alters the role: exactly the new grant.
        let again = fx.issue(&issuer, &task, &[fx.high()], TTL).await.unwrap();
        assert_eq!(fx.member_of(&again.handle).await, vec![fx.high()]);
        // The server refused the session functions: DO blocks did it.
        assert_eq!(fx.session_functions_of(&admin).await, 0);
        fx.assert_revoked(&issuer, &task, &got, &c).await;
        drop(issuer);
        fx.sql(&format!("DROP DATABASE {db} WITH (FORCE)")).await;
    }

    #[apply(server_test!)]
    async fn check_reports_a_wrong_admin_password_or_an_admin_without_createrole() {
        let fx = Fx::new().await;
        let canary = "canary-admin-3b9f";
        fx.use_admin("postgres", canary, "postgres");
        let issuer = fx.issuer();
        let e = issuer.check().await.unwrap_err();
        assert_error(&e, ErrorKind::Unauthorized, "admin.dsn");
        assert!(!e.message.contains(canary), "{e}");

        // An admin that may log in but not create roles.
        let weak = format!("kt_weakadmin_{}", fx.sfx);
        fx.sql(&format!("CREATE ROLE {weak} LOGIN PASSWORD 'weak-pw-1'"))
            .await;
        fx.use_admin(&weak, "weak-pw-1", "postgres");
        let e = issuer.check().await.unwrap_err();
        assert_error(&e, ErrorKind::Unauthorized, "CREATEROLE");
        // It may create roles but not end their sessions.
        fx.sql(&format!("ALTER ROLE {weak} CREATEROLE")).await;
        let e = issuer.check().await.unwrap_err();
        assert_error(&e, ErrorKind::Unauthorized, "pg_signal_backend");
    }
}
