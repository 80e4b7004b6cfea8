//! `vault_token`: a task's credential is an OpenBao / HashiCorp Vault token
//! with exactly the policies the task's policy level grants, the task's TTL,
//! and the task's attribution in its metadata.
//!
//! ```toml
//! [issuers.bao]
//! type = "vault_token"
//! address = "https://bao.example.com:8200"
//! approle = { role_id_file = "/etc/keyturn/role-id", secret_id_file = "/etc/keyturn/secret-id" }
//! token_role = "keyturn-tasks"   # recommended, see below
//!
//! # in a policy level:   bao = { policies = ["read-invoices"], num_uses = 20 }
//! ```
//!
//! # Connection and login
//! The same settings as a `type = "vault"` vault (`address`, `namespace`,
//! `token_file` / `token_env` / `approle`, `ca_file`, `timeout`), checked and
//! used by the same code ([`HashicorpConfig::check_connection`],
//! [`Connection`]): keyturn logs in on first use, renews its own token when
//! it is used in the last third of its TTL, and logs in again (or re-reads
//! the token file) after a 403.
//!
//! # Why a token role
//! Without `token_role`, keyturn calls `auth/token/create`: the task token is
//! a **child of keyturn's own token**, may only carry policies keyturn's own
//! token has, and is revoked with it — when keyturn's AppRole token reaches
//! its max TTL, every task token it minted dies mid-task. With `token_role`,
//! keyturn calls `auth/token/create/<role>`; a role written with
//! `orphan = true` makes **orphan** tokens that live exactly their TTL, and
//! its `allowed_policies` (not keyturn's own policies) bound what a task may
//! get, so keyturn's own token needs no data access at all:
//!
//! ```text
//! bao write auth/token/roles/keyturn-tasks orphan=true renewable=false \
//!     allowed_policies="read-invoices,read-reports" token_explicit_max_ttl=1h
//! # keyturn's own policy:
//! path "auth/token/create/keyturn-tasks" { capabilities = ["update"] }
//! path "auth/token/revoke-accessor"      { capabilities = ["update"] }
//! path "auth/token/lookup-accessor"      { capabilities = ["update"] }
//! ```
//!
//! # What `issue` asks for
//! `policies` exactly the grant's, `no_default_policy = true`, `ttl` =
//! `explicit_max_ttl` = the time left until the task's `expires_at` (whole
//! seconds, at most the task's TTL), `renewable = false`, `type = "service"`,
//! `num_uses` when the grant sets it, `display_name =
//! keyturn-<agent>-<task id>` (the server prefixes `token-`) and `meta` with
//! the whole attribution (task_id, agent, tenant, use_case, run_id,
//! initiator, sensitivity), which the server's audit log records with every
//! request the token makes. A token whose policies, type or lifetime are not
//! what was asked (a token role that adds or drops something) is revoked at
//! once and the issuance fails.
//!
//! The handle is the token's **accessor**: it can look the token up and
//! revoke it, but not use it. `secret` holds `token`; `public` holds
//! `address`, `accessor`, `expires_at` (RFC 3339) and `namespace` when set.
//!
//! # Revocation
//! `auth/token/revoke-accessor`; an accessor the server no longer knows
//! counts as revoked: only at the server and namespace that minted it (the
//! issuer's [`TaskIssuer::origin`], recorded with the task). After
//! `address` or `namespace` changed, the task manager leaves the tasks
//! minted before unrevoked (and says so) until the issuer points back. `verify_revoked` asks `auth/token/lookup-accessor`.
//! Without a handle (keyturn died between the mint and recording it) the
//! token cannot be found: OpenBao has no lookup by metadata, and listing
//! every accessor needs `sudo` and one call per token. `revoke` then answers
//! [`Revoked::ExpiresAt`] with the task's expiry (the token's explicit max
//! TTL is the time left until it), and never later than now + `max_ttl`,
//! the longest TTL this issuer ever mints. An `issue` that failed because
//! the server refused the create request (4xx), or whose token was not the
//! grant and was revoked at once, or that could not connect, left no token:
//! the task ends at once.
//!
//! Batch tokens cannot be revoked one by one (they end only at their TTL),
//! so a grant asking for `token_type = "batch"` is refused.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use vaultrs::api::token::requests::{CreateRoleTokenRequest, CreateTokenRequest};
use vaultrs::error::ClientError;

use super::{
    Grant, IssueError, IssueRequest, Issued, IssuerPlugin, Revoked, TaskAttribution, TaskIssuer,
};
use crate::config::validate::{Loc, Validator, Zero, duration_value};
use crate::model::{ErrorKind, PluginError, SecretValue};
use crate::vaults::hashicorp::{
    AppRoleConfig, Connection, HashicorpAuth, HashicorpConfig, endpoint_error, header_safe,
    http_status,
};

#[cfg(test)]
mod tests;

/// The longest TTL an issuer mints unless `max_ttl` says otherwise.
pub const DEFAULT_MAX_TTL: Duration = Duration::from_secs(3600);

/// How the issuer names itself in messages and logs.
const NAME: &str = "vault_token";

/// `[issuers.NAME]` with `type = "vault_token"`.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenIssuerConfig {
    /// `https://bao:8200`.
    pub address: String,
    /// Vault Enterprise / OpenBao namespace (`X-Vault-Namespace`).
    pub namespace: Option<String>,
    /// Exactly one way to log in, as for a `type = "vault"` vault.
    pub token_file: Option<PathBuf>,
    pub token_env: Option<String>,
    pub approle: Option<AppRoleConfig>,
    /// PEM bundle of the CA(s) that sign the server's certificate.
    pub ca_file: Option<PathBuf>,
    /// Per HTTP request (default 30 s).
    pub timeout: Option<String>,
    /// A token role under `auth/token/roles/` to mint through
    /// (`auth/token/create/<role>`); recommended, see the module doc.
    pub token_role: Option<String>,
    /// The longest TTL this issuer mints (default 1h); a task asking for
    /// more is refused. Bounds a token whose accessor was never recorded.
    pub max_ttl: Option<String>,
}

/// What a policy level grants at a `vault_token` issuer.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenGrant {
    /// The token's policies, exactly (no `default` unless listed).
    pub policies: Vec<String>,
    /// How many requests the token may make (unlimited when unset).
    #[serde(default)]
    pub num_uses: Option<u64>,
    /// Only `service`: the default, and the only type that can be revoked.
    #[serde(default)]
    pub token_type: Option<String>,
}

impl TokenGrant {
    /// Every problem, as (key, message).
    fn problems(&self) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        if self.policies.is_empty() {
            out.push((
                "policies",
                "policies must not be empty: list the OpenBao policies the task's token gets"
                    .to_owned(),
            ));
        }
        for (i, p) in self.policies.iter().enumerate() {
            if p == "root" {
                out.push((
                    "policies",
                    "the `root` policy is never granted to a task".to_owned(),
                ));
            } else if !policy_name_ok(p) {
                out.push((
                    "policies",
                    format!(
                        "invalid policy name `{}`: lowercase letters, digits, `-`, `_`, `.` and `/` only",
                        p.escape_debug()
                    ),
                ));
            } else if self.policies[..i].contains(p) {
                out.push(("policies", format!("policy `{p}` is listed twice")));
            }
        }
        if self.num_uses == Some(0) {
            out.push((
                "num_uses",
                "num_uses = 0 would mean unlimited uses to OpenBao; leave it out for unlimited, or give at least 1".to_owned(),
            ));
        }
        match self.token_type.as_deref() {
            None | Some("service") => {}
            Some("batch") => out.push((
                "token_type",
                "batch tokens cannot be revoked one by one (they end only at their TTL), so a task could not be ended early; use `service` (the default)".to_owned(),
            )),
            Some(other) => out.push((
                "token_type",
                format!("unknown token type `{}`: only `service`", other.escape_debug()),
            )),
        }
        out
    }
}

/// Policy names go into JSON only, but a name OpenBao would rewrite
/// (upper case is lowered) or split (commas) would make "exactly the
/// grant's policies" untrue.
fn policy_name_ok(p: &str) -> bool {
    !p.is_empty()
        && p.len() <= 128
        && p.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'_' | b'.' | b'/')
        })
}

/// A token role's name goes into the URL path `auth/token/create/<role>`.
fn role_name_ok(r: &str) -> bool {
    !r.is_empty()
        && r.len() <= 128
        && r.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && r != "."
        && r != ".."
}

/// An accessor is what `revoke` is handed back from state: 24 characters
/// from the server (with a `.<namespace id>` suffix in a namespace).
fn accessor_ok(a: &str) -> bool {
    !a.is_empty()
        && a.len() <= 128
        && a.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

impl TokenIssuerConfig {
    /// The connection settings, as the `vault` vault's config holds them.
    fn connection(&self) -> HashicorpConfig {
        HashicorpConfig {
            address: self.address.clone(),
            namespace: self.namespace.clone(),
            token_file: self.token_file.clone(),
            token_env: self.token_env.clone(),
            approle: self.approle.clone(),
            ca_file: self.ca_file.clone(),
            timeout: self.timeout.clone(),
            ..HashicorpConfig::default()
        }
    }

    fn max_ttl(&self) -> Duration {
        duration_value(self.max_ttl.as_deref(), DEFAULT_MAX_TTL)
    }
}

impl IssuerPlugin for TokenIssuerConfig {
    fn check(&mut self, v: &mut Validator<'_>, at: Loc<'_>) {
        let mut c = self.connection();
        c.check_connection(v, at);
        // Take back what the check completed (trimmed address, resolved paths).
        self.address = c.address;
        self.token_file = c.token_file;
        self.approle = c.approle;
        self.ca_file = c.ca_file;
        if let Some(ns) = &self.namespace
            && !header_safe(ns)
        {
            v.err(
                at.key("namespace"),
                "invalid namespace: printable ASCII without spaces, e.g. \"team-a\"",
            );
        }
        if let Some(role) = &self.token_role
            && !role_name_ok(role)
        {
            v.err(
                at.key("token_role"),
                format!(
                    "invalid token role `{}`: letters, digits, `-`, `_` and `.` only (the name under auth/token/roles/)",
                    role.escape_debug()
                ),
            );
        }
        if let Some(text) = &self.max_ttl
            && let Some(d) = v.duration(at.key("max_ttl"), text, Zero::Rejected)
            && d < Duration::from_secs(1)
        {
            v.err(
                at.key("max_ttl"),
                format!("max_ttl `{text}` is under a second: token TTLs are whole seconds"),
            );
        }
    }

    fn check_grant(&self, grant: &Grant, v: &mut Validator<'_>, at: Loc<'_>) {
        match grant.parse::<TokenGrant>() {
            Err(e) => v.err(
                at,
                format!(
                    "invalid vault_token grant: {e} (write e.g. {{ policies = [\"read-invoices\"], num_uses = 20 }})"
                ),
            ),
            Ok(g) => {
                for (key, message) in g.problems() {
                    v.err(at.key(key), message);
                }
            }
        }
    }

    fn refuses_ttl(&self, max_ttl: Duration) -> Option<String> {
        (max_ttl > self.max_ttl()).then(|| {
            format!(
                "its max_ttl is {}",
                humantime::format_duration(self.max_ttl())
            )
        })
    }

    fn build(&self) -> Result<Arc<dyn TaskIssuer>, PluginError> {
        let config = self.connection();
        // The environment is read now: a missing variable is a start-up error.
        let auth = config.auth().map_err(|m| {
            PluginError::new(
                ErrorKind::Invalid,
                format!("issuer {NAME} ({}): {m}", self.address),
            )
        })?;
        Ok(Arc::new(VaultTokenIssuer {
            address: config.address.trim_end_matches('/').to_owned(),
            config,
            auth,
            token_role: self.token_role.clone(),
            max_ttl: self.max_ttl(),
            conn: tokio::sync::OnceCell::new(),
        }))
    }
}

/// Mints task tokens at one OpenBao / Vault server.
pub struct VaultTokenIssuer {
    address: String,
    config: HashicorpConfig,
    auth: HashicorpAuth,
    token_role: Option<String>,
    max_ttl: Duration,
    /// Built on first use: reading the token or AppRole files is I/O, and
    /// an issuer is built without any.
    conn: tokio::sync::OnceCell<Connection>,
}

impl VaultTokenIssuer {
    /// The grant and the token's TTL in whole seconds, or what the issuer
    /// refuses without calling OpenBao.
    fn settle(&self, req: &IssueRequest<'_>) -> Result<(TokenGrant, u64), PluginError> {
        let step = format!("issue (task {})", req.task.task_id);
        let grant: TokenGrant = req.grant.parse().map_err(|e| {
            self.fail(
                ErrorKind::Invalid,
                &step,
                format!("not a vault_token grant: {e}"),
            )
        })?;
        if let Some((key, message)) = grant.problems().into_iter().next() {
            return Err(self.fail(ErrorKind::Invalid, &step, format!("grant {key}: {message}")));
        }
        // The token ends at the task's expiry at the latest: its TTL is the
        // whole seconds left until then, not the TTL counted from now.
        let now = SystemTime::now();
        let left = req
            .expires_at
            .duration_since(now)
            .unwrap_or_default()
            .min(req.ttl);
        let ttl_s = left.as_secs();
        if ttl_s == 0 {
            return Err(self.fail(
                ErrorKind::Invalid,
                &step,
                "the task's expiry has passed (or is under a second away)",
            ));
        }
        if left > self.max_ttl {
            return Err(self.fail(
                ErrorKind::Invalid,
                &step,
                format!(
                    "the task's TTL ({ttl_s}s) is longer than this issuer's max_ttl ({}s); raise max_ttl or lower the policy's TTL",
                    self.max_ttl.as_secs()
                ),
            ));
        }
        Ok((grant, ttl_s))
    }

    async fn connection(&self) -> Result<&Connection, PluginError> {
        self.conn
            .get_or_try_init(|| async {
                Connection::new("issuer", NAME, &self.config, self.auth.clone())
            })
            .await
    }

    /// An error before any call (a bad grant, a bad handle).
    fn fail(&self, kind: ErrorKind, step: &str, detail: impl std::fmt::Display) -> PluginError {
        PluginError::new(
            kind,
            format!("issuer {NAME} ({}): {step}: {detail}", self.address),
        )
    }

    /// What to change: the token role's `advice`, or, without a token
    /// role, the server's own limits.
    fn role_advice(&self, advice: &str) -> String {
        match &self.token_role {
            Some(role) => format!("the token role `{role}` changes it: {advice}"),
            None => "the server's token limits (the token mount's max TTL) change it".to_owned(),
        }
    }

    /// How many uses the token of `accessor` has (0: unlimited), as the
    /// server says.
    async fn uses_of(
        &self,
        conn: &Connection,
        step: &str,
        accessor: &str,
    ) -> Result<u64, PluginError> {
        conn.call(step, "auth/token/lookup-accessor", |c| async move {
            vaultrs::token::lookup_accessor(&*c, accessor)
                .await
                .map(|t| t.num_uses)
        })
        .await
    }

    fn create_location(&self) -> String {
        match &self.token_role {
            Some(role) => format!("auth/token/create/{role}"),
            None => "auth/token/create".to_owned(),
        }
    }

    /// `auth/token/revoke-accessor`; `Ok(false)` when the server did not
    /// know the accessor (already revoked or expired).
    async fn revoke_accessor(
        &self,
        conn: &Connection,
        step: &str,
        accessor: &str,
    ) -> Result<bool, PluginError> {
        conn.call(step, "auth/token/revoke-accessor", |c| async move {
            match vaultrs::token::revoke_accessor(&*c, accessor).await {
                Ok(()) => Ok(true),
                Err(e) if unknown_accessor(&e) => Ok(false),
                Err(e) => Err(e),
            }
        })
        .await
    }

    fn handle<'h>(&self, step: &str, handle: &'h str) -> Result<&'h str, PluginError> {
        if accessor_ok(handle) {
            Ok(handle)
        } else {
            Err(self.fail(
                ErrorKind::Invalid,
                step,
                "the recorded handle is not a token accessor",
            ))
        }
    }
}

/// The server's answer for an accessor it does not know (revoked, expired
/// or never issued): HTTP 400 "invalid accessor".
fn unknown_accessor(e: &ClientError) -> bool {
    http_status(e) == Some(400)
        && matches!(e, ClientError::APIError { errors, .. }
            if errors.iter().any(|m| m.contains("invalid accessor")))
}

/// Whether a failed request certainly made nothing at the server: it
/// answered 4xx (refused), or the connection to it was never made (the
/// request was not sent).
fn made_nothing(e: &ClientError) -> bool {
    if http_status(e).is_some_and(|s| (400..500).contains(&s)) {
        return true;
    }
    matches!(e, ClientError::RestClientError {
        source: rustify::errors::ClientError::RequestError { source, .. },
    } if source
        .chain()
        .any(|c| c.downcast_ref::<reqwest::Error>().is_some_and(reqwest::Error::is_connect)))
}

/// The attribution as token metadata: the server's audit log records it
/// with every request the token makes.
fn attribution_meta(t: &TaskAttribution) -> HashMap<String, String> {
    [
        ("task_id", &t.task_id),
        ("agent", &t.agent),
        ("tenant", &t.tenant),
        ("use_case", &t.use_case),
        ("run_id", &t.run_id),
        ("initiator", &t.initiator),
        ("sensitivity", &t.sensitivity),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.clone()))
    .collect()
}

fn rfc3339(t: SystemTime) -> String {
    chrono::DateTime::<chrono::Utc>::from(t).to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// The fields every create request sets, on either builder.
macro_rules! token_request {
    ($builder:ident, $grant:expr, $ttl:expr, $display:expr, $meta:expr) => {{
        $builder
            .policies($grant.policies.clone())
            .no_default_policy(true)
            .ttl($ttl.clone())
            .explicit_max_ttl($ttl.clone())
            .renewable(false)
            .token_type("service")
            .display_name($display.clone())
            .meta($meta.clone());
        if let Some(n) = $grant.num_uses {
            $builder.num_uses(n);
        }
        $builder.build().map_err(endpoint_error)
    }};
}

#[async_trait]
impl TaskIssuer for VaultTokenIssuer {
    fn describe(&self) -> String {
        format!("{NAME}:{}", self.address)
    }

    fn object(&self, task: &TaskAttribution, handle: Option<&str>) -> String {
        match handle {
            Some(accessor) => format!("token accessor {accessor}"),
            None => format!("token of task {} (accessor not recorded)", task.task_id),
        }
    }

    /// The address (lowercase, without a trailing `/`) and the namespace:
    /// an accessor means a token only at the server and namespace that
    /// made it; elsewhere it is unknown, which is not revoked.
    async fn origin(&self) -> Result<Option<String>, PluginError> {
        let address = self.address.to_ascii_lowercase();
        Ok(Some(
            match self
                .config
                .namespace
                .as_deref()
                .map(|ns| ns.trim_matches('/'))
                .filter(|ns| !ns.is_empty())
            {
                Some(ns) => format!("{address} namespace {ns}"),
                None => address,
            },
        ))
    }

    async fn precheck(&self, req: &IssueRequest<'_>) -> Result<(), PluginError> {
        self.settle(req).map(|_| ())
    }

    async fn issue(&self, req: &IssueRequest<'_>) -> Result<Issued, IssueError> {
        let task = req.task;
        let step = format!("issue (task {})", task.task_id);
        // Before the TTL is counted: the expiry computed below is never
        // later than the one OpenBao sets.
        let now = SystemTime::now();
        // Nothing is made before the create request.
        let (grant, ttl_s) = self.settle(req).map_err(IssueError::nothing_left)?;
        let conn = self.connection().await.map_err(IssueError::nothing_left)?;
        let location = self.create_location();
        let ttl = format!("{ttl_s}s");
        let display = format!("keyturn-{}-{}", task.agent, task.task_id);
        let meta = attribution_meta(task);
        // Whether the last attempt made no token: the server refused the
        // request (4xx), or no connection to it was made. A lost answer (a
        // reset, a timeout, a 5xx) may follow a token that was made.
        let refused = std::sync::atomic::AtomicBool::new(false);
        let refusal = |r: Result<vaultrs::api::AuthInfo, ClientError>| {
            refused.store(
                r.as_ref().err().is_some_and(made_nothing),
                std::sync::atomic::Ordering::Relaxed,
            );
            r
        };
        let res = match &self.token_role {
            Some(role) => {
                conn.call(&step, &location, |c| {
                    let mut b = CreateRoleTokenRequest::builder();
                    b.role_name(role.as_str());
                    let endpoint = token_request!(b, grant, ttl, display, meta);
                    async move { refusal(vaultrs::api::auth(&*c, endpoint?).await) }
                })
                .await
            }
            None => {
                conn.call(&step, &location, |c| {
                    let mut b = CreateTokenRequest::builder();
                    let endpoint = token_request!(b, grant, ttl, display, meta);
                    async move { refusal(vaultrs::api::auth(&*c, endpoint?).await) }
                })
                .await
            }
        };
        let mut auth = match res {
            Ok(auth) => auth,
            Err(e) if refused.load(std::sync::atomic::Ordering::Relaxed) => {
                return Err(IssueError::nothing_left(e));
            }
            Err(e) => return Err(e.into()),
        };
        let token = SecretValue::from_string(std::mem::take(&mut auth.client_token));
        let accessor = std::mem::take(&mut auth.accessor);
        if !accessor_ok(&accessor) {
            return Err(conn
                .err(
                    ErrorKind::Fatal,
                    &step,
                    &location,
                    "the server returned a token without a usable accessor; it ends at its TTL",
                )
                .into());
        }

        // The server may have changed what was asked (a token role's
        // settings win over the request): such a token is not the grant.
        let mut got = auth.token_policies.clone();
        got.sort();
        let mut want = grant.policies.clone();
        want.sort();
        let problem = if auth.token_type != "service" {
            Some(format!(
                "the server made a `{}` token, not a service token",
                auth.token_type.escape_debug()
            ))
        } else if got != want {
            Some(format!(
                "the token got policies [{}], not the grant's [{}]; check the token role's allowed and disallowed policies",
                got.join(", "),
                want.join(", ")
            ))
        } else if auth.lease_duration == 0 {
            Some("the token does not expire".to_owned())
        } else if auth.renewable {
            Some("the token is renewable; the token role must not make it so".to_owned())
        } else if auth.lease_duration + 1 < ttl_s {
            // A role's token_explicit_max_ttl or token_max_ttl (or the
            // mount's max TTL) below the task's: the token would die while
            // keyturn reports the task live.
            Some(format!(
                "the token lives {}s, less than the task's {ttl_s}s; {}",
                auth.lease_duration,
                self.role_advice("raise its token_explicit_max_ttl and token_max_ttl (and the token mount's max TTL) to at least the policies' max_ttl")
            ))
        } else {
            match self.uses_of(conn, &step, &accessor).await {
                Ok(uses) if uses != grant.num_uses.unwrap_or(0) => Some(format!(
                    "the token has {} uses, not the grant's {}; {}",
                    if uses == 0 {
                        "unlimited".to_owned()
                    } else {
                        uses.to_string()
                    },
                    grant
                        .num_uses
                        .map_or("unlimited".to_owned(), |n| n.to_string()),
                    self.role_advice(
                        "set its token_num_uses to 0 and give num_uses in the policy level's grant"
                    )
                )),
                Ok(_) => None,
                Err(e) => Some(format!("the token could not be looked up ({e})")),
            }
        };
        if let Some(problem) = problem {
            let (revoked, outcome) = match self.revoke_accessor(conn, &step, &accessor).await {
                Ok(_) => (true, "it was revoked".to_owned()),
                Err(e) => (
                    false,
                    format!("revoking it failed too ({e}); it ends at its TTL"),
                ),
            };
            let error = conn.err(
                ErrorKind::Invalid,
                &step,
                &location,
                format!("{problem}: {outcome}"),
            );
            return Err(if revoked {
                IssueError::nothing_left(error)
            } else {
                error.into()
            });
        }

        let expires_at = req
            .expires_at
            .min(now + Duration::from_secs(auth.lease_duration));
        let mut public = BTreeMap::from([
            ("address".to_owned(), self.address.clone()),
            ("accessor".to_owned(), accessor.clone()),
            ("expires_at".to_owned(), rfc3339(expires_at)),
        ]);
        if let Some(ns) = &self.config.namespace {
            public.insert("namespace".to_owned(), ns.clone());
        }
        Ok(Issued {
            handle: accessor,
            public,
            secret: BTreeMap::from([("token".to_owned(), token)]),
            expires_at,
        })
    }

    async fn revoke(
        &self,
        task: &TaskAttribution,
        handle: Option<&str>,
        expires_at: SystemTime,
    ) -> Result<Revoked, PluginError> {
        let step = format!("revoke (task {})", task.task_id);
        let Some(handle) = handle else {
            // No lookup by metadata exists; see the module doc. A token of
            // this task was minted with the time left until the task's
            // expiry as its explicit max TTL.
            return Ok(Revoked::ExpiresAt(
                expires_at.min(SystemTime::now() + self.max_ttl),
            ));
        };
        let accessor = self.handle(&step, handle)?;
        let conn = self.connection().await?;
        self.revoke_accessor(conn, &step, accessor).await?;
        Ok(Revoked::Now)
    }

    async fn verify_revoked(
        &self,
        task: &TaskAttribution,
        handle: Option<&str>,
    ) -> Result<bool, PluginError> {
        let step = format!("verify_revoked (task {})", task.task_id);
        let Some(handle) = handle else {
            return Err(self.fail(
                ErrorKind::Invalid,
                &step,
                "no accessor was recorded, so the token cannot be looked up; it ends at its TTL",
            ));
        };
        let accessor = self.handle(&step, handle)?;
        let conn = self.connection().await?;
        conn.call(&step, "auth/token/lookup-accessor", |c| async move {
            match vaultrs::token::lookup_accessor(&*c, accessor).await {
                Ok(_) => Ok(false),
                Err(e) if unknown_accessor(&e) => Ok(true),
                // A token being revoked by the server (its last use spent)
                // can answer with a partial entry for a moment: not
                // confirmed gone yet; the next pass looks again.
                Err(ClientError::RestClientError {
                    source: rustify::errors::ClientError::ResponseParseError { .. },
                }) => Ok(false),
                Err(e) => Err(e),
            }
        })
        .await
    }

    async fn check(&self) -> Result<(), PluginError> {
        let conn = self.connection().await?;
        conn.call("check", "auth/token/lookup-self", |c| async move {
            vaultrs::token::lookup_self(&*c).await.map(|_| ())
        })
        .await
    }

    /// The token role's limits against the level's: a role that caps the
    /// token's TTL below `max_ttl`, or its uses below the grant's, makes
    /// every such task's token die mid-task (a start refuses it); one that
    /// does not allow (or disallows) a granted policy makes every start fail.
    async fn check_grant(
        &self,
        grant: &Grant,
        max_ttl: Duration,
    ) -> Result<Option<String>, PluginError> {
        let Some(role) = &self.token_role else {
            return Ok(None);
        };
        let step = "check grant";
        let grant: TokenGrant = grant.parse().map_err(|e| {
            self.fail(
                ErrorKind::Invalid,
                step,
                format!("not a vault_token grant: {e}"),
            )
        })?;
        let conn = self.connection().await?;
        let location = format!("auth/token/roles/{role}");
        let limits = match conn
            .call(step, &location, |c| async move {
                vaultrs::api::exec_with_result(&*c, ReadRole { name: role.clone() }).await
            })
            .await
        {
            Ok(limits) => limits,
            // Reading roles is not something keyturn needs to run.
            Err(e) if e.kind == ErrorKind::Unauthorized => {
                return Ok(Some(format!(
                    "the limits of token role `{role}` were not checked: grant keyturn's token \
                     `read` on auth/token/roles/{role} to check them"
                )));
            }
            Err(e) => return Err(e),
        };
        let ttl_s = max_ttl.as_secs();
        let mut problems = Vec::new();
        for (key, limit) in [
            ("token_explicit_max_ttl", limits.token_explicit_max_ttl),
            ("token_max_ttl", limits.token_max_ttl),
        ] {
            if limit > 0 && limit < ttl_s {
                problems.push(format!(
                    "its {key} ({limit}s) is shorter than the level's max_ttl ({ttl_s}s): raise it"
                ));
            }
        }
        // The server refuses a token whose policies the role does not
        // allow (every start would fail). Globs are not judged here.
        let not_allowed: Vec<&String> = grant
            .policies
            .iter()
            .filter(|p| {
                *p != "default"
                    && !limits.allowed_policies.is_empty()
                    && limits.allowed_policies_glob.is_empty()
                    && !limits.allowed_policies.contains(p)
            })
            .collect();
        if !not_allowed.is_empty() {
            problems.push(format!(
                "its allowed_policies ({}) do not include {}: add them to the role, or grant others",
                limits.allowed_policies.join(", "),
                not_allowed.iter().map(|p| format!("`{p}`")).collect::<Vec<_>>().join(", ")
            ));
        }
        let refused: Vec<&String> = grant
            .policies
            .iter()
            .filter(|p| limits.disallowed_policies.contains(p))
            .collect();
        if !refused.is_empty() {
            problems.push(format!(
                "its disallowed_policies include {}",
                refused
                    .iter()
                    .map(|p| format!("`{p}`"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        let uses = limits.token_num_uses;
        if uses > 0 && grant.num_uses.is_none_or(|n| n > uses) {
            problems.push(format!(
                "its token_num_uses ({uses}) caps the grant's {}: set it to 0 and give num_uses in the grant",
                grant.num_uses.map_or("unlimited uses".to_owned(), |n| format!("{n} uses"))
            ));
        }
        if problems.is_empty() {
            return Ok(None);
        }
        Err(conn.err(
            ErrorKind::Invalid,
            step,
            &location,
            format!(
                "the token role `{role}` refuses or cuts short every task's token of this grant (a start fails): {}",
                problems.join("; ")
            ),
        ))
    }
}

/// `GET auth/token/roles/<name>`: the limits a token role puts on the
/// tokens it makes (vaultrs' own response lacks `token_num_uses` and
/// `token_max_ttl`).
struct ReadRole {
    name: String,
}

#[derive(serde::Deserialize)]
struct RoleLimits {
    #[serde(default)]
    token_explicit_max_ttl: u64,
    #[serde(default)]
    token_max_ttl: u64,
    #[serde(default)]
    token_num_uses: u64,
    #[serde(default)]
    allowed_policies: Vec<String>,
    #[serde(default)]
    allowed_policies_glob: Vec<String>,
    #[serde(default)]
    disallowed_policies: Vec<String>,
}

impl rustify::Endpoint for ReadRole {
    type Response = RoleLimits;
    const REQUEST_BODY_TYPE: rustify::enums::RequestType = rustify::enums::RequestType::JSON;
    const RESPONSE_BODY_TYPE: rustify::enums::ResponseType = rustify::enums::ResponseType::JSON;

    fn path(&self) -> String {
        format!("/auth/token/roles/{}", self.name)
    }

    fn method(&self) -> rustify::enums::RequestMethod {
        rustify::enums::RequestMethod::GET
    }
}
