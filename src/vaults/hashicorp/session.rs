//! The client session: login (token, token file, AppRole), renewal, re-login after a 403, and error mapping.
//!
//! [`Connection`] is everything about talking to one OpenBao/Vault server
//! that is not KV: the `vault` vault holds one, and so does the
//! `vault_token` task issuer (`tasks::issuers::vault_token`), so both log
//! in, renew, re-login and map errors the same way.

use super::*;

/// The lease of an AppRole token.
#[derive(Clone, Copy)]
pub(super) struct Lease {
    pub(super) renew_at: Instant,
    pub(super) expires_at: Instant,
    /// What the last login granted; a renewal giving much less means the max
    /// TTL is near and a fresh login is due.
    pub(super) granted: Duration,
}

impl Lease {
    fn new(now: Instant, ttl: Duration, granted: Duration) -> Self {
        Lease {
            renew_at: now + ttl - ttl / RENEW_FRACTION,
            expires_at: now + ttl,
            granted,
        }
    }
}

pub(super) struct Session {
    pub(super) client: Arc<VaultClient>,
    /// Bumped whenever the token changes, so a task that got a 403 with an old
    /// token knows someone else already replaced it.
    pub(super) generation: u64,
    /// `None`: the token does not expire, or keyturn does not manage it.
    pub(super) lease: Option<Lease>,
    /// AppRole before the first login.
    pub(super) needs_login: bool,
}

pub(super) enum Upkeep {
    Ready,
    Renew,
    Login,
}

impl Session {
    fn upkeep(&self, now: Instant) -> Upkeep {
        if self.needs_login {
            return Upkeep::Login;
        }
        match self.lease {
            Some(l) if now >= l.expires_at => Upkeep::Login,
            Some(l) if now >= l.renew_at => Upkeep::Renew,
            _ => Upkeep::Ready,
        }
    }
}

/// A logged-in (or ready to log in) client of one OpenBao/Vault server.
pub(crate) struct Connection {
    /// What the server is to keyturn, first word of every message: `vault`
    /// (a `[vaults.NAME]`) or `issuer` (an `[issuers.NAME]`).
    pub(super) noun: &'static str,
    pub(super) name: String,
    pub(super) address: String,
    pub(super) namespace: Option<String>,
    pub(super) ca_file: Option<PathBuf>,
    pub(super) timeout: Duration,
    pub(super) auth: HashicorpAuth,
    pub(super) session: RwLock<Session>,
    /// Serializes logins, renewals and token-file reloads.
    pub(super) auth_lock: tokio::sync::Mutex<()>,
    pub(super) logins: AtomicU64,
    pub(super) renewals: AtomicU64,
}

impl Connection {
    /// Checks the connection settings of `c` (address, namespace, AppRole
    /// mount, `ca_file`), reads the token or AppRole files and builds the
    /// client. No network I/O: the first call logs in when it must.
    pub(crate) fn new(
        noun: &'static str,
        name: &str,
        c: &HashicorpConfig,
        auth: HashicorpAuth,
    ) -> Result<Self, PluginError> {
        let name = name.to_owned();
        let address = c.address.trim_end_matches('/').to_owned();
        let namespace = c.namespace.clone();
        let ca_file = c.ca_file.clone();
        let timeout = c.timeout();
        let invalid = |what: String| {
            PluginError::new(
                ErrorKind::Invalid,
                format!("{noun} {name} ({address}): {what}"),
            )
        };
        if !(address.starts_with("http://") || address.starts_with("https://")) {
            return Err(invalid(
                "address must start with http:// or https://".into(),
            ));
        }
        if let Some(ns) = &namespace
            && !header_safe(ns)
        {
            return Err(invalid(
                "namespace must be printable ASCII without spaces".into(),
            ));
        }
        if let HashicorpAuth::AppRole { mount, .. } = &auth
            && (mount.is_empty() || mount.starts_with('/') || mount.ends_with('/'))
        {
            return Err(invalid(format!(
                "approle mount {mount:?} must be a non-empty path without leading or trailing '/'"
            )));
        }

        if let Some(ca) = &ca_file {
            // reqwest accepts a file without any certificate in it (and then
            // trusts nothing extra); say so at start instead of failing every
            // call with an unknown-issuer error.
            let pem = std::fs::read(ca).map_err(|e| {
                PluginError::io(
                    format!("{noun} {name} ({address}): ca_file {}", ca.display()),
                    &e,
                )
            })?;
            if !pem
                .windows(b"-----BEGIN CERTIFICATE-----".len())
                .any(|w| w == b"-----BEGIN CERTIFICATE-----")
            {
                return Err(invalid(format!(
                    "ca_file {} holds no PEM certificate",
                    ca.display()
                )));
            }
        }

        let mut conn = Connection {
            noun,
            name,
            address,
            namespace,
            ca_file,
            timeout,
            auth,
            // Replaced just below, once the client can be built.
            session: RwLock::new(Session {
                client: Arc::new(placeholder_client()?),
                generation: 0,
                lease: None,
                needs_login: false,
            }),
            auth_lock: tokio::sync::Mutex::new(()),
            logins: AtomicU64::new(0),
            renewals: AtomicU64::new(0),
        };
        let (token, needs_login) = match &conn.auth {
            HashicorpAuth::Token(t) => {
                let t = t.expose_str().map(str::trim).unwrap_or_default();
                if !header_safe(t) {
                    return Err(conn.err(
                        ErrorKind::Invalid,
                        "connect",
                        "token",
                        "the token is empty or not printable ASCII",
                    ));
                }
                (Zeroizing::new(t.to_owned()), false)
            }
            HashicorpAuth::TokenFile(path) => (conn.read_secret_file(path, "token file")?, false),
            HashicorpAuth::AppRole {
                role_id_file,
                secret_id_file,
                ..
            } => {
                // Read now so a missing or unreadable file fails at start.
                conn.read_secret_file(role_id_file, "role_id file")?;
                conn.read_secret_file(secret_id_file, "secret_id file")?;
                (Zeroizing::new(String::new()), true)
            }
        };
        let client = conn.build_client(&token)?;
        *conn
            .session
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner) = Session {
            client: Arc::new(client),
            generation: 1,
            lease: None,
            needs_login,
        };
        Ok(conn)
    }

    #[cfg(test)]
    pub(super) fn counters(&self) -> (u64, u64) {
        (
            self.logins.load(Ordering::Relaxed),
            self.renewals.load(Ordering::Relaxed),
        )
    }

    pub(super) fn build_client(&self, token: &str) -> Result<VaultClient, PluginError> {
        let invalid = |detail: String| self.err(ErrorKind::Invalid, "connect", "client", detail);
        let mut settings = VaultClientSettingsBuilder::default()
            // vaultrs's address setter panics on a bad URL; give it a constant
            // and replace it below with a checked parse. Every other field is
            // set explicitly so nothing comes from VAULT_* environment variables.
            .address("http://127.0.0.1:8200")
            .token(token)
            .ca_certs(
                self.ca_file
                    .iter()
                    .map(|p| p.to_string_lossy().into_owned())
                    .collect::<Vec<_>>(),
            )
            .identity(None)
            .verify(true)
            .timeout(Some(self.timeout))
            .namespace(self.namespace.clone())
            .build()
            .map_err(|e| invalid(format!("client settings: {e}")))?;
        // An absolute URL joined onto any base is parsed on its own.
        settings.address = settings
            .address
            .join(&self.address)
            .map_err(|e| invalid(format!("address is not a valid URL: {e}")))?;
        if settings.address.host_str().is_none_or(str::is_empty) {
            return Err(invalid("address has no host".into()));
        }
        if let Some(ca) = &self.ca_file
            && settings.address.scheme() == "http"
        {
            tracing::warn!(vault = %self.name, ca_file = %ca.display(), "ca_file is ignored for an http:// address");
        }
        VaultClient::new(settings).map_err(|e| self.error("connect", "client", e))
    }

    /// Reads a token / role id / secret id file: trimmed, non-empty, header-safe.
    pub(super) fn read_secret_file(
        &self,
        path: &Path,
        what: &str,
    ) -> Result<Zeroizing<String>, PluginError> {
        let ctx = || {
            format!(
                "{} {} ({}): {what} {}",
                self.noun,
                self.name,
                self.address,
                path.display()
            )
        };
        let file = std::fs::File::open(path).map_err(|e| PluginError::io(ctx(), &e))?;
        let buf = crate::vaults::local::read_capped(file, MAX_SECRET_FILE)
            .map_err(|e| PluginError::io(ctx(), &e))?;
        if buf.len() > MAX_SECRET_FILE {
            return Err(PluginError::new(
                ErrorKind::Invalid,
                format!("{}: larger than {MAX_SECRET_FILE} bytes", ctx()),
            ));
        }
        let text = std::str::from_utf8(&buf).map(str::trim).unwrap_or_default();
        if !header_safe(text) {
            return Err(PluginError::new(
                ErrorKind::Invalid,
                format!("{}: empty or not printable ASCII", ctx()),
            ));
        }
        Ok(Zeroizing::new(text.to_owned()))
    }

    pub(super) fn install(&self, client: VaultClient, lease: Option<Lease>) {
        let mut s = self.session.write().unwrap_or_else(PoisonError::into_inner);
        s.client = Arc::new(client);
        s.generation += 1;
        s.lease = lease;
        s.needs_login = false;
    }

    pub(super) fn snapshot(&self) -> (Arc<VaultClient>, u64, Upkeep) {
        let s = self.session.read().unwrap_or_else(PoisonError::into_inner);
        (s.client.clone(), s.generation, s.upkeep(Instant::now()))
    }

    /// The client to use now, logging in or renewing first when due.
    pub(super) async fn client(&self) -> Result<(Arc<VaultClient>, u64), PluginError> {
        let (client, generation, upkeep) = self.snapshot();
        if matches!(upkeep, Upkeep::Ready) {
            return Ok((client, generation));
        }
        let _guard = self.auth_lock.lock().await;
        // Another task may have done it while we waited.
        let (client, _, upkeep) = self.snapshot();
        match upkeep {
            Upkeep::Ready => {}
            Upkeep::Login => self.login().await?,
            Upkeep::Renew => self.renew(&client).await?,
        }
        let (client, generation, _) = self.snapshot();
        Ok((client, generation))
    }

    /// AppRole login; installs the new token. Caller holds `auth_lock`.
    pub(super) async fn login(&self) -> Result<(), PluginError> {
        let HashicorpAuth::AppRole {
            mount,
            role_id_file,
            secret_id_file,
        } = &self.auth
        else {
            return Ok(());
        };
        let role_id = self.read_secret_file(role_id_file, "role_id file")?;
        let secret_id = self.read_secret_file(secret_id_file, "secret_id file")?;
        let anonymous = self.build_client("")?;
        let now = Instant::now();
        let auth = vaultrs::auth::approle::login(&anonymous, mount, &role_id, &secret_id)
            .await
            .map_err(|e| self.error("login", &format!("auth/{mount}/login"), e))?;
        let token = Zeroizing::new(auth.client_token);
        if !header_safe(&token) {
            return Err(self.err(
                ErrorKind::Fatal,
                "login",
                &format!("auth/{mount}/login"),
                "the vault returned a token that is not printable ASCII",
            ));
        }
        let ttl = Duration::from_secs(auth.lease_duration);
        let lease = (!ttl.is_zero()).then(|| Lease::new(now, ttl, ttl));
        let client = self.build_client(&token)?;
        self.install(client, lease);
        self.logins.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(vault = %self.name, ttl_s = ttl.as_secs(), "logged in with approle");
        Ok(())
    }

    /// Renews our own token; falls back to a login when renewal is refused or
    /// no longer extends the lease enough. Caller holds `auth_lock`.
    pub(super) async fn renew(&self, client: &VaultClient) -> Result<(), PluginError> {
        let now = Instant::now();
        let lease = self
            .session
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .lease;
        match vaultrs::token::renew_self(client, None).await {
            Ok(auth) => {
                let ttl = Duration::from_secs(auth.lease_duration);
                let granted = lease.map_or(ttl, |l| l.granted);
                if ttl < granted / RENEW_FRACTION {
                    // The max TTL caps the renewal: start a fresh token now
                    // rather than run into the wall.
                    return self.login().await;
                }
                let mut s = self.session.write().unwrap_or_else(PoisonError::into_inner);
                s.lease = Some(Lease::new(now, ttl, granted));
                drop(s);
                self.renewals.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(vault = %self.name, ttl_s = ttl.as_secs(), "renewed own token");
                Ok(())
            }
            Err(e) => {
                let e = self.error("renew", "auth/token/renew-self", e);
                if e.kind == ErrorKind::Unauthorized {
                    return self.login().await;
                }
                // Still valid (we only renew in its last third): keep using it
                // and try renewing again on the next use.
                tracing::warn!(vault = %self.name, error = %e, "token renewal failed; token still valid");
                Ok(())
            }
        }
    }

    /// After a 403: reload the token file or log in again, once. Returns
    /// whether repeating the call can help.
    pub(super) async fn reauth_after_denied(
        &self,
        failed_generation: u64,
    ) -> Result<bool, PluginError> {
        let _guard = self.auth_lock.lock().await;
        let (client, generation, _) = self.snapshot();
        if generation != failed_generation {
            return Ok(true);
        }
        match &self.auth {
            HashicorpAuth::Token(_) => Ok(false),
            HashicorpAuth::TokenFile(path) => {
                let token = self.read_secret_file(path, "token file")?;
                if *token == client.settings.token {
                    return Ok(false);
                }
                let client = self.build_client(&token)?;
                self.install(client, None);
                tracing::info!(vault = %self.name, token_file = %path.display(), "reloaded the token file after a 403");
                Ok(true)
            }
            HashicorpAuth::AppRole { .. } => {
                self.login().await?;
                Ok(true)
            }
        }
    }

    /// Runs one vault call with auth upkeep, repeating it once after a 403 if
    /// the credentials changed. `location` names the path for messages.
    ///
    /// `op` gets its own handle on the client; the future it returns may
    /// borrow from `self` and the arguments, but not from the closure (a
    /// higher-ranked `AsyncFn` would make the trait's futures non-`Send`).
    pub(crate) async fn call<T, F, Fut>(
        &self,
        step: &str,
        location: &str,
        op: F,
    ) -> Result<T, PluginError>
    where
        F: Fn(Arc<VaultClient>) -> Fut,
        Fut: std::future::Future<Output = Result<T, ClientError>>,
    {
        let (client, generation) = self.client().await?;
        match op(client).await {
            Ok(v) => Ok(v),
            Err(e) if http_status(&e) == Some(403) => {
                if self.reauth_after_denied(generation).await? {
                    let (client, _) = self.client().await?;
                    op(client).await.map_err(|e| self.error(step, location, e))
                } else {
                    Err(self.error(step, location, e))
                }
            }
            Err(e) => Err(self.error(step, location, e)),
        }
    }

    // -----------------------------------------------------------------------
    // Errors
    // -----------------------------------------------------------------------

    pub(crate) fn err(
        &self,
        kind: ErrorKind,
        step: &str,
        location: &str,
        detail: impl std::fmt::Display,
    ) -> PluginError {
        PluginError::new(
            kind,
            format!(
                "{} {} ({}): {step} {location}: {detail}",
                self.noun, self.name, self.address
            ),
        )
    }

    /// Maps a vaultrs error to a kind and a message without any response body.
    pub(crate) fn error(&self, step: &str, location: &str, e: ClientError) -> PluginError {
        use rustify::errors::ClientError as Rest;
        let (kind, detail) = match &e {
            ClientError::APIError { code, errors } => {
                // OpenBao's "1 error occurred:\n\t* permission denied\n\n"
                // on one line.
                let text = errors
                    .join("; ")
                    .split_whitespace()
                    .collect::<Vec<_>>()
                    .join(" ");
                (
                    status_kind(*code, &text),
                    format!("{}: {text}", http_status_text(*code)),
                )
            }
            ClientError::RestClientError { source } => match source {
                Rest::ServerResponseError { code, .. } => {
                    (status_kind(*code, ""), http_status_text(*code))
                }
                Rest::RequestError { source, .. } => {
                    let chain = format!("{source:#}");
                    let kind = ErrorKind::of_connection(&chain);
                    let what = if kind == ErrorKind::Invalid {
                        "the vault's TLS certificate is not trusted (check `ca_file` and the server's certificate)"
                    } else {
                        "cannot reach the vault"
                    };
                    (kind, format!("{what}: {chain}"))
                }
                Rest::ResponseError { source } => (
                    ErrorKind::Transient,
                    format!("reading the response failed: {source:#}"),
                ),
                // Not the vault's JSON: a proxy's or load balancer's page
                // in between, most likely, and gone on a retry; or a mount
                // that is not KV version 2, which `check --online` names.
                Rest::ResponseParseError { .. } | Rest::ResponseConversionError { .. } => (
                    ErrorKind::Transient,
                    "the answer is not the vault's JSON (a proxy or load balancer in between, \
                     or a mount that is not KV version 2: `keyturn check --online` tells)"
                        .to_owned(),
                ),
                other => (
                    ErrorKind::Fatal,
                    format!("unexpected response or request: {other}"),
                ),
            },
            ClientError::FileReadError { path, source } => (
                ErrorKind::from_io(source),
                format!("cannot read {path}: {source}"),
            ),
            ClientError::FileNotFoundError { path } => {
                (ErrorKind::NotFound, format!("no such file: {path}"))
            }
            ClientError::ParseCertificateError { path, source } => (
                ErrorKind::Invalid,
                format!("ca_file {path} is not a PEM certificate bundle: {source}"),
            ),
            ClientError::RestClientBuildError { source } => (
                ErrorKind::Invalid,
                format!("cannot build the HTTP client: {source}"),
            ),
            other => (ErrorKind::Fatal, format!("unexpected response: {other}")),
        };
        self.err(kind, step, location, detail)
    }
}
