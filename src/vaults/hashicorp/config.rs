//! `[vaults.NAME]` with `type = "vault"`: the config, its check and how to log in.

use super::*;

/// How keyturn authenticates to the vault.
#[derive(Clone)]
pub enum HashicorpAuth {
    Token(SecretValue),
    TokenFile(PathBuf),
    AppRole {
        /// The AppRole auth mount, usually `approle`.
        mount: String,
        role_id_file: PathBuf,
        secret_id_file: PathBuf,
    },
}

impl std::fmt::Debug for HashicorpAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HashicorpAuth::Token(_) => f.write_str("Token([redacted])"),
            HashicorpAuth::TokenFile(p) => f.debug_tuple("TokenFile").field(p).finish(),
            HashicorpAuth::AppRole {
                mount,
                role_id_file,
                secret_id_file,
            } => f
                .debug_struct("AppRole")
                .field("mount", mount)
                .field("role_id_file", role_id_file)
                .field("secret_id_file", secret_id_file)
                .finish(),
        }
    }
}

/// Default time allowed for one HTTP request.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// `[vaults.NAME]` with `type = "vault"`: HashiCorp Vault or OpenBao, KV v2.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HashicorpConfig {
    /// `https://vault:8200`.
    pub address: String,
    /// The KV v2 mount (default `secret`).
    pub mount: Option<String>,
    /// Vault Enterprise / OpenBao namespace (`X-Vault-Namespace`).
    pub namespace: Option<String>,
    /// Key inside the KV data map that holds the value (default `value`).
    pub field: Option<String>,
    /// Exactly one way to log in: a token file, an environment variable
    /// holding the token, or AppRole.
    pub token_file: Option<PathBuf>,
    pub token_env: Option<String>,
    pub approle: Option<AppRoleConfig>,
    /// PEM bundle of the CA(s) that sign the vault's certificate (https only).
    pub ca_file: Option<PathBuf>,
    /// Per HTTP request (default 30 s).
    pub timeout: Option<String>,
    /// Where a rotating keyturn keeps its change index for followers (a
    /// path in this vault, opt-in; see `vaults::change_index`).
    pub change_index: Option<String>,
    pub max_concurrent: Option<usize>,
}

/// `approle = { role_id_file = ..., secret_id_file = ... }`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppRoleConfig {
    /// Where the AppRole auth method is mounted (default `approle`).
    pub mount: Option<String>,
    pub role_id_file: PathBuf,
    pub secret_id_file: PathBuf,
}

impl HashicorpConfig {
    /// A config with the defaults, logging in with `token_file`.
    pub fn new(address: impl Into<String>) -> Self {
        Self {
            address: address.into(),
            ..Self::default()
        }
    }

    pub fn mount(&self) -> &str {
        self.mount.as_deref().unwrap_or("secret")
    }

    pub fn field(&self) -> &str {
        self.field.as_deref().unwrap_or("value")
    }

    pub fn timeout(&self) -> Duration {
        duration_value(self.timeout.as_deref(), DEFAULT_TIMEOUT)
    }

    /// How to log in, reading `token_env` from the daemon's environment.
    pub fn auth(&self) -> Result<HashicorpAuth, String> {
        match (&self.token_file, &self.token_env, &self.approle) {
            (Some(f), None, None) => Ok(HashicorpAuth::TokenFile(f.clone())),
            (None, Some(var), None) => match std::env::var(var) {
                Ok(t) if !t.trim().is_empty() => Ok(HashicorpAuth::Token(SecretValue::new(
                    t.trim().as_bytes().to_vec(),
                ))),
                _ => Err(format!(
                    "token_env: the environment variable {var} is not set or empty; set it in the daemon's environment (e.g. an EnvironmentFile= of the unit) or use token_file"
                )),
            },
            (None, None, Some(a)) => Ok(HashicorpAuth::AppRole {
                mount: a.mount.as_deref().unwrap_or("approle").to_owned(),
                role_id_file: a.role_id_file.clone(),
                secret_id_file: a.secret_id_file.clone(),
            }),
            _ => {
                Err("set exactly one way to log in: `token_file`, `token_env` or `approle`".into())
            }
        }
    }
}

/// A secrets-engine or auth mount: `/`-separated segments, no `..`;
/// completed in place without leading or trailing `/`.
fn check_mount(v: &mut Validator<'_>, p: Loc<'_>, mount: &mut Option<String>, default: &str) {
    let m = mount.as_deref().unwrap_or(default).trim_matches('/');
    if m.is_empty()
        || m.split('/')
            .any(|seg| seg.is_empty() || seg == "." || seg == "..")
        || m.contains(char::is_whitespace)
    {
        v.err(
            p,
            format!("invalid mount `{m}`: write its path without leading or trailing `/`, e.g. \"secret\""),
        );
    }
    if mount.is_some() {
        *mount = Some(m.to_owned());
    }
}

impl HashicorpConfig {
    /// Checks and completes what every client of the server has: `address`,
    /// the one way to log in, `ca_file` and `timeout`. The `vault_token`
    /// task issuer checks its own table with this too.
    pub(crate) fn check_connection(&mut self, v: &mut Validator<'_>, p: Loc<'_>) {
        v.url(
            p.key("address"),
            &self.address,
            &["http", "https"],
            "https://vault.example.com:8200",
        );
        self.address = self.address.trim_end_matches('/').to_owned();
        match (&mut self.token_file, &self.token_env, &mut self.approle) {
            (Some(f), None, None) => v.resolve_path(p.key("token_file"), f),
            (None, Some(e), None) => {
                if !is_env_name(e) {
                    v.err(
                        p.key("token_env"),
                        format!("invalid environment variable name `{e}`"),
                    );
                }
            }
            (None, None, Some(a)) => {
                let ap = p.key("approle");
                check_mount(v, ap.key("mount"), &mut a.mount, "approle");
                v.resolve_path(ap.key("role_id_file"), &mut a.role_id_file);
                v.resolve_path(ap.key("secret_id_file"), &mut a.secret_id_file);
            }
            _ => v.err_key(
                p,
                "set exactly one way to log in: `token_file`, `token_env` or `approle = { role_id_file = ..., secret_id_file = ... }`",
            ),
        }
        if let Some(ca) = &mut self.ca_file {
            v.resolve_path(p.key("ca_file"), ca);
        }
        v.timeout(&p, &self.timeout, DEFAULT_TIMEOUT);
    }
}

impl VaultPlugin for HashicorpConfig {
    fn check(&mut self, v: &mut Validator<'_>, p: Loc<'_>, _: &VaultScope<'_>) {
        self.check_connection(v, p);
        check_mount(v, p.key("mount"), &mut self.mount, "secret");
        let field = self.field();
        if field.is_empty() || field.starts_with("keyturn_") {
            v.err(
                p.key("field"),
                format!(
                    "invalid field `{field}`: it must be non-empty and not start with `keyturn_` (keyturn's own bookkeeping keys)"
                ),
            );
        }
    }

    fn max_concurrent(&self) -> Option<usize> {
        self.max_concurrent
    }

    fn change_index(&self) -> Option<&str> {
        self.change_index.as_deref()
    }

    fn open(&self, name: &str) -> Result<Arc<dyn Vault>, PluginError> {
        // The environment is read now: a missing variable is a start-up error.
        let auth = self
            .auth()
            .map_err(|m| PluginError::new(ErrorKind::Invalid, m))?;
        Ok(LazyVault::connecting(
            name,
            (self.clone(), auth),
            |name, (c, auth)| async move {
                Ok(Arc::new(HashicorpVault::with_auth(&name, &c, auth).await?) as Arc<dyn Vault>)
            },
        ))
    }
}
