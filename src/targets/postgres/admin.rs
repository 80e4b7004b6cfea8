//! keyturn's admin side of one PostgreSQL server: the admin DSN file (read
//! on every step), how to reach the server (`sslmode`, `ssl_root_cert`,
//! `allow_weak_auth`, `connect_timeout`) and the pool of admin connections
//! ([`super::pool`]). Shared by the postgres target and the postgres task
//! issuer ([`crate::tasks::issuers::postgres`]): a target and an issuer that
//! agree on these settings share one pool, so one server sees one set of
//! keyturn admin sessions.

use std::path::PathBuf;
use std::time::Duration;

use sha2::Digest;
use tokio_postgres::Config;
use tokio_postgres::config::SslMode;
use zeroize::Zeroizing;

use super::connect::{self, PgTls, WeakAuth};
use super::pool::{self, AdminConn, AdminManager, AdminPool, Lease, PoolKey, PoolSlot};
use super::{PostgresConfig, cause, endpoint};
use crate::model::{ErrorKind, PluginError};

/// How keyturn reaches one server as its admin.
#[derive(Debug)]
pub(crate) struct Admin {
    dsn_file: PathBuf,
    ssl_root_cert: Option<PathBuf>,
    /// The config's own `sslmode` (`None`: the DSN decides).
    tls: Option<PgTls>,
    weak: WeakAuth,
    pub(crate) connect_timeout: Duration,
    pool_size: usize,
    /// How long an admin connection may stay unused ([`pool::IDLE_TIMEOUT`];
    /// shorter in tests).
    pub(crate) idle_timeout: Duration,
    pool: PoolSlot,
}

impl Admin {
    /// The admin settings of `c` (its role and strategy are not read);
    /// `what` starts the messages (`postgres target`).
    pub(crate) fn new(c: &PostgresConfig, what: &str) -> Result<Self, PluginError> {
        let invalid = |m: &str| PluginError::new(ErrorKind::Invalid, format!("{what}: {m}"));
        let connect_timeout = c.connect_timeout();
        if connect_timeout.is_zero() {
            return Err(invalid("connect_timeout must be > 0"));
        }
        let tls = c
            .tls()
            .ok_or_else(|| invalid("sslmode must be disable, require or verify-full"))?;
        if c.pool_size() == 0 {
            return Err(invalid("pool_size must be at least 1"));
        }
        Ok(Self {
            dsn_file: c.admin_dsn_file.clone(),
            ssl_root_cert: c.ssl_root_cert.clone(),
            tls,
            weak: WeakAuth::from_names(&c.allow_weak_auth),
            connect_timeout,
            pool_size: c.pool_size() as usize,
            idle_timeout: pool::IDLE_TIMEOUT,
            pool: PoolSlot::default(),
        })
    }

    pub(crate) fn dsn_file(&self) -> &std::path::Path {
        &self.dsn_file
    }

    /// Reads and parses the admin DSN, and digests its content (the pool's
    /// key). Messages start with `what: step` and name the file, never its
    /// content.
    pub(crate) async fn config(
        &self,
        what: &str,
        step: &str,
    ) -> Result<(Config, [u8; 32]), PluginError> {
        let path = &self.dsn_file;
        let text = Zeroizing::new(tokio::fs::read_to_string(path).await.map_err(|e| {
            PluginError::io(
                format!("{what}: {step}: reading admin DSN file {}", path.display()),
                &e,
            )
        })?);
        // Black-box finding: an empty file was reported as a DSN naming no
        // host, with a host and port it did not name.
        if text.trim().is_empty() {
            return Err(PluginError::new(
                ErrorKind::Invalid,
                format!(
                    "{what}: {step}: admin DSN file {} is empty; write the admin connection string in it (host=... user=... password=...)",
                    path.display()
                ),
            ));
        }
        let digest = sha2::Sha256::digest(text.as_bytes()).into();
        let mut cfg: Config = text.trim().parse().map_err(|e: tokio_postgres::Error| {
            // Parse errors name the option (`invalid value for option `port``),
            // never its value.
            PluginError::new(
                ErrorKind::Invalid,
                format!(
                    "{what}: {step}: admin DSN in {}: {e}{}",
                    path.display(),
                    cause(&e)
                ),
            )
        })?;
        if cfg.get_application_name().is_none() {
            cfg.application_name("keyturn");
        }
        Ok((cfg, digest))
    }

    /// How to reach the server: the config's `sslmode`, else the DSN's
    /// `sslmode=require`. A DSN that says `disable` while the config asks
    /// for TLS is a contradiction the operator must resolve.
    pub(crate) fn tls_mode(&self, dsn: &Config, what: &str) -> Result<PgTls, PluginError> {
        Ok(match (self.tls, dsn.get_ssl_mode()) {
            (None, SslMode::Require) => PgTls::Require,
            (None, _) => PgTls::Disable,
            // Never connect with less than either side asked for.
            (Some(mode), dsn_mode @ (SslMode::Disable | SslMode::Require))
                if (mode == PgTls::Disable) != (dsn_mode == SslMode::Disable) =>
            {
                let dsn_mode = if dsn_mode == SslMode::Disable {
                    "disable"
                } else {
                    "require"
                };
                return Err(PluginError::new(
                    ErrorKind::Invalid,
                    format!(
                        "{what}: the admin DSN in {} says sslmode={dsn_mode} but the config says \
                         sslmode = \"{}\"; remove one of them",
                        self.dsn_file.display(),
                        mode.as_str()
                    ),
                ));
            }
            (Some(mode), _) => mode,
        })
    }

    /// How to reach the server for `dsn`: the TLS mode, and the CA file
    /// with its content when the mode checks the certificate.
    async fn tls_of<'a>(
        &'a self,
        dsn: &Config,
        what: &str,
    ) -> Result<(PgTls, Option<(&'a PathBuf, Vec<u8>)>), PluginError> {
        let mode = self.tls_mode(dsn, what)?;
        let ca = match (mode, &self.ssl_root_cert) {
            (PgTls::VerifyFull, Some(path)) => Some((path, connect::read_ca(path, what).await?)),
            _ => None,
        };
        Ok((mode, ca))
    }

    /// How a connection reaches the server, from [`Self::tls_of`]'s answer.
    fn transport(
        &self,
        mode: PgTls,
        ca: Option<&(&PathBuf, Vec<u8>)>,
        what: &str,
    ) -> Result<connect::Transport, PluginError> {
        connect::Transport::new(
            mode,
            ca.map(|(path, pem)| (path.as_path(), pem.as_slice())),
            self.weak,
            self.connect_timeout,
            what,
        )
    }

    /// Session settings travel in the startup packet: no extra round trip
    /// per step, nor per connection.
    fn session_settings(&self, cfg: &mut Config) {
        let ms = self.connect_timeout.as_millis().max(1);
        let options = match cfg.get_options() {
            Some(o) => format!("{o} -c statement_timeout={ms}"),
            None => format!("-c statement_timeout={ms}"),
        };
        cfg.options(options);
    }

    /// The admin DSN and the pool of connections it names (see [`pool`]).
    pub(crate) async fn pool(
        &self,
        what: &str,
        step: &str,
    ) -> Result<(Config, AdminPool), PluginError> {
        let (mut cfg, dsn_digest) = self.config(what, step).await?;
        let what = format!("{what}: {step}");
        let (mode, ca) = self.tls_of(&cfg, &what).await?;
        let key = PoolKey {
            dsn_file: self.dsn_file.clone(),
            dsn_digest,
            mode,
            ca: ca
                .as_ref()
                .map(|(path, pem)| ((*path).clone(), sha2::Sha256::digest(pem).into())),
            weak: self.weak,
            connect_timeout: self.connect_timeout,
            size: self.pool_size,
            idle: self.idle_timeout,
        };
        let dsn = cfg.clone();
        let pool = self.pool.pool(key, || {
            let transport = self.transport(mode, ca.as_ref(), &what)?;
            self.session_settings(&mut cfg);
            let what = format!("admin connection to {}", endpoint(&cfg));
            Ok(AdminManager::new(cfg, transport, what, self.idle_timeout))
        })?;
        Ok((dsn, pool))
    }

    /// A connection of its own (not pooled) to database `dbname` of the
    /// server, as the admin DSN's user, reached as the pool's connections
    /// are. For the rare step that must act in another database (a task
    /// role's objects there); the caller drops it when done.
    pub(crate) async fn connect_to_database(
        &self,
        what: &str,
        step: &str,
        dbname: &str,
    ) -> Result<(tokio_postgres::Client, tokio::task::JoinHandle<()>), PluginError> {
        let (mut cfg, _) = self.config(what, step).await?;
        let what = format!("{what}: {step}");
        let (mode, ca) = self.tls_of(&cfg, &what).await?;
        let transport = self.transport(mode, ca.as_ref(), &what)?;
        self.session_settings(&mut cfg);
        cfg.dbname(dbname);
        let shown = format!(
            "admin connection to {} (database {dbname:?})",
            endpoint(&cfg)
        );
        transport.connect_off_worker(cfg, shown).await
    }

    /// An admin connection for `step`, from the shared pool.
    pub(crate) async fn lease(&self, what: &str, step: &str) -> Result<Lease, PluginError> {
        let (_, pool) = self.pool(what, step).await?;
        Lease::get(&pool, &format!("{what}: {step}")).await
    }
}

/// Ends every session of `roles` but the admin's own. PostgreSQL ≥ 14 waits
/// up to `wait` for each backend to exit, so that a success means the
/// sessions are gone (older servers only get the signal). Returns how many
/// sessions there were.
pub(crate) async fn terminate_sessions(
    conn: &AdminConn,
    roles: &[String],
    wait: Duration,
    ctx: &str,
) -> Result<usize, PluginError> {
    let version: i32 = async {
        let sql = conn
            .prepared("SELECT current_setting('server_version_num')::int")
            .await?;
        conn.client.query_one(&sql, &[]).await
    }
    .await
    .map_err(|e| conn.error(ctx, &e, &[]))?
    .get(0);
    let wait_ms = i64::try_from(wait.as_millis()).unwrap_or(i64::MAX);
    let rows = async {
        if version >= 140000 {
            let sql = conn
                .prepared(
                    "SELECT pid, pg_terminate_backend(pid, $2) FROM pg_stat_activity \
                     WHERE usename = ANY($1) AND pid <> pg_backend_pid()",
                )
                .await?;
            conn.client.query(&sql, &[&roles, &wait_ms]).await
        } else {
            let sql = conn
                .prepared(
                    "SELECT pid, pg_terminate_backend(pid) FROM pg_stat_activity \
                     WHERE usename = ANY($1) AND pid <> pg_backend_pid()",
                )
                .await?;
            conn.client.query(&sql, &[&roles]).await
        }
    }
    .await
    .map_err(|e| conn.error(&format!("{ctx}: terminating sessions"), &e, &[]))?;
    let alive = rows.iter().filter(|r| !r.get::<_, bool>(1)).count();
    if alive > 0 && version >= 140000 {
        return Err(PluginError::new(
            ErrorKind::Transient,
            format!(
                "{ctx}: {alive} session(s) of {roles:?} still alive after pg_terminate_backend"
            ),
        ));
    }
    Ok(rows.len())
}
