//! `[issuers.NAME] type = "postgres"`: its settings, the grant of a policy
//! level, and their checks.

use super::*;

/// `[issuers.NAME] type = "postgres"`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct PgIssuerConfig {
    /// File holding the admin connection string (libpq key=value or URL);
    /// its role needs `CREATEROLE` and `pg_signal_backend` (or superuser).
    pub admin_dsn_file: PathBuf,
    /// `disable`, `require` or `verify-full` (default: the admin DSN's
    /// `sslmode=require`, else `disable`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sslmode: Option<String>,
    /// PEM file of the CA(s) the server's certificate must chain to (`verify-full`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ssl_root_cert: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connect_timeout: Option<String>,
    /// Most admin connections open at once, shared with every target and
    /// issuer of the same server and admin DSN.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool_size: Option<u32>,
    /// Weak password exchanges the server may ask for: `password`, `md5`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow_weak_auth: Vec<String>,
    /// The task roles' names start with this (default [`DEFAULT_ROLE_PREFIX`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role_prefix: Option<String>,
    /// The database delivered to the agent (default: the admin DSN's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub database: Option<String>,
}

impl PgIssuerConfig {
    /// A config with the defaults.
    pub fn new(admin_dsn_file: impl Into<PathBuf>) -> Self {
        Self {
            admin_dsn_file: admin_dsn_file.into(),
            sslmode: None,
            ssl_root_cert: None,
            connect_timeout: None,
            pool_size: None,
            allow_weak_auth: Vec::new(),
            role_prefix: None,
            database: None,
        }
    }

    pub fn role_prefix(&self) -> &str {
        self.role_prefix.as_deref().unwrap_or(DEFAULT_ROLE_PREFIX)
    }

    /// The admin settings as the postgres target holds them (its role and
    /// strategy unused), to check and connect with the target's code.
    pub(super) fn admin_settings(&self) -> PostgresConfig {
        PostgresConfig {
            connect_timeout: self.connect_timeout.clone(),
            sslmode: self.sslmode.clone(),
            ssl_root_cert: self.ssl_root_cert.clone(),
            allow_weak_auth: self.allow_weak_auth.clone(),
            pool_size: self.pool_size,
            ..PostgresConfig::new(&self.admin_dsn_file, DEFAULT_ROLE_PREFIX)
        }
    }
}

/// What is wrong with `p` as a `role_prefix`, if anything.
pub(super) fn prefix_problem(p: &str) -> Option<String> {
    let shape = !p.is_empty()
        && p.len() <= MAX_PREFIX_LEN
        && p.starts_with(|c: char| c.is_ascii_lowercase())
        && p.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if !shape {
        Some(format!(
            "invalid role_prefix `{p}`: 1 to {MAX_PREFIX_LEN} bytes of lowercase letters, digits and `_`, starting with a letter (the task id, up to {MAX_TASK_ID_LEN} characters, follows it within PostgreSQL's {MAX_IDENT_LEN}-byte names)"
        ))
    } else if p.starts_with("pg_") {
        Some(format!(
            "invalid role_prefix `{p}`: PostgreSQL reserves role names starting with `pg_`"
        ))
    } else {
        None
    }
}

/// What a policy level grants at a postgres issuer.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct PgGrant {
    /// The roles the task role becomes a member of (inheriting their
    /// privileges), and no other.
    pub roles: Vec<String>,
    /// Most sessions of the task role at once (default: no limit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connection_limit: Option<u32>,
}

/// A problem of a grant, and the key it is about.
pub(super) enum GrantField {
    Roles,
    Role(usize),
    ConnectionLimit,
}

/// Every problem of `g` (a task role would have the name `prefix...`).
pub(super) fn grant_problems(g: &PgGrant, prefix: &str) -> Vec<(GrantField, String)> {
    let mut out = Vec::new();
    if g.roles.is_empty() {
        out.push((
            GrantField::Roles,
            "roles is empty: name the roles whose privileges the task gets".to_owned(),
        ));
    }
    for (i, r) in g.roles.iter().enumerate() {
        let problem = if r.is_empty() || r.len() > MAX_IDENT_LEN || r.contains('\0') {
            Some(format!(
                "invalid role `{r}`: a role name is 1 to {MAX_IDENT_LEN} bytes without NUL"
            ))
        } else if r.starts_with(prefix) {
            Some(format!(
                "role `{r}` starts with the issuer's role_prefix `{prefix}`: task roles are not granted to other tasks"
            ))
        } else if SERVER_ROLES.contains(&r.as_str()) {
            Some(format!(
                "role `{r}` reaches the server's files or programs, as much as a superuser: not granted to tasks"
            ))
        } else if g.roles[..i].contains(r) {
            Some(format!("role `{r}` is listed twice"))
        } else {
            None
        };
        out.extend(problem.map(|p| (GrantField::Role(i), p)));
    }
    if let Some(n) = g.connection_limit
        && (n == 0 || n > i32::MAX as u32)
    {
        out.push((
            GrantField::ConnectionLimit,
            format!(
                "connection_limit {n} is out of range: at least 1 (leave it out for no limit), at most {}",
                i32::MAX
            ),
        ));
    }
    out
}

impl IssuerPlugin for PgIssuerConfig {
    fn check(&mut self, v: &mut Validator<'_>, at: Loc<'_>) {
        let mut admin = self.admin_settings();
        admin.check_admin(v, at);
        self.admin_dsn_file = admin.admin_dsn_file;
        self.ssl_root_cert = admin.ssl_root_cert;
        if let Some(p) = &self.role_prefix
            && let Some(problem) = prefix_problem(p)
        {
            v.err(at.key("role_prefix"), problem);
        }
        if let Some(db) = &self.database
            && (db.is_empty() || db.len() > MAX_IDENT_LEN || db.contains('\0'))
        {
            v.err(
                at.key("database"),
                format!("invalid database `{db}`: a database name is 1 to {MAX_IDENT_LEN} bytes without NUL"),
            );
        }
    }

    fn check_grant(&self, grant: &Grant, v: &mut Validator<'_>, at: Loc<'_>) {
        let g: PgGrant = match grant.parse() {
            Ok(g) => g,
            Err(e) => {
                return v.err(
                    at,
                    format!(
                        "invalid postgres grant: {e} (expected roles = [\"role\", ...] and optionally connection_limit = N)"
                    ),
                );
            }
        };
        for (field, problem) in grant_problems(&g, self.role_prefix()) {
            let roles = at.key("roles");
            let loc = match field {
                GrantField::Roles => roles,
                GrantField::Role(i) => roles.index(i),
                GrantField::ConnectionLimit => at.key("connection_limit"),
            };
            v.err(loc, problem);
        }
    }

    fn build(&self) -> Result<Arc<dyn TaskIssuer>, PluginError> {
        Ok(Arc::new(PgIssuer::new(self.clone())?))
    }
}
