//! The token service as served on the HTTP listener: `POST /oauth/token`
//! (RFC 8693), `POST /oauth/introspect` (RFC 7662), `POST /oauth/revoke`
//! (RFC 7009), `GET /.well-known/jwks.json` and `GET
//! /.well-known/oauth-authorization-server` (RFC 8414).
//!
//! [`TokenService`] holds the policy and the subject issuers and answers
//! each request with a [`Reply`]; what it needs of the daemon (the agents'
//! keys, the jti ledger, the signing credential in its vault, decommissions,
//! the audit log) comes through [`Backend`], so the whole flow is tested
//! here with real keys and tokens and served unchanged by the daemon.
//!
//! - **Client authentication** is `private_key_jwt` (RFC 7523 2.2): an
//!   EdDSA assertion signed with the agent's `auth_key`, `aud` the issuer or
//!   the token endpoint, single-use `jti` (the task store's ledger, so a
//!   replay is refused after a restart too). A failure is `invalid_client`
//!   with 401.
//!   Over the daemon's sockets the client is instead authenticated by the
//!   peer's uid ([`TokenService::token_for_agent`]): the same exchange,
//!   audited as authenticated by peer uid.
//! - **The actor token** is another such assertion of the *same* agent:
//!   an assertion of another agent is the confused deputy and is refused.
//!   Its `exp` is the actor's credential lifetime: the issued token never
//!   outlives it.
//! - **Keys**: the current version of `signing_credential`, read from its
//!   vault by the version state names (so `kid` always matches the key),
//!   cached until the current version changes. The JWKS publishes the
//!   current and previous versions and every other version that signed a
//!   token not yet expired ([`TokenLedger::signed`]). A tenant with a key
//!   of its own ([`KeySet`]) has its own `iss`, `kid`s, JWKS and metadata.
//! - **Inactive tokens**: expired, revoked (by `jti`, kept until `exp`), or
//!   issued (`iat`) no later than the decommission of the client or of any
//!   agent in its `act` chain: the decommission is the agent's epoch.
//!   [`TokenService::refuses_tokens_of`] proves it for a decommission's
//!   `tokens` item, with probe tokens that never leave the service.
//! - Every issuance, refusal and revocation is audited; no token or part
//!   of one is ever logged, audited or put in an error.
//!
//! This file holds the service's types, its backend and the metadata;
//! beside it: `token.rs` (`POST /oauth/token`), `keys.rs` (signing keys
//! and the JWKS) and `introspection.rs` (introspection, revocation and the
//! check of a token).

mod introspection;
mod keys;
mod token;

use std::sync::{Arc, Mutex};

use serde_json::{Value, json};

use super::exchange::{
    self, Actor, ClientPolicy, ExchangeError, GRANT_TYPE, Issued, PublishedKey, ServicePolicy,
    SigningKey, TOKEN_TYPE_ACCESS_TOKEN, TaskClaims,
};
use super::request;
use super::subject::SubjectTokens;
use crate::audit::{Actor as AuditActor, AuditEvent, Outcome};
use crate::auth::{AgentKey, Verified, Verifier};
use crate::model::{AgentId, CredentialKey, SecretValue};
use crate::state::VersionRow;

pub const TOKEN_PATH: &str = "/oauth/token";
pub const INTROSPECT_PATH: &str = "/oauth/introspect";
pub const REVOKE_PATH: &str = "/oauth/revoke";
pub const JWKS_PATH: &str = "/.well-known/jwks.json";
pub const METADATA_PATH: &str = "/.well-known/oauth-authorization-server";
/// Under it: `NAME` (a tenant's `iss` is `ISSUER/tenants/NAME`), its
/// metadata at `METADATA_PATH/tenants/NAME` (RFC 8414 3.1) and its JWKS at
/// `/tenants/NAME/jwks.json`.
pub const TENANTS_PATH: &str = "/tenants";

/// An answer: the status and its JSON body (`None`: empty). Every answer
/// of the token service is sent with `Cache-Control: no-store`. `Debug`
/// never shows an `access_token`.
#[derive(Clone, PartialEq)]
pub struct Reply {
    pub status: u16,
    pub body: Option<Value>,
}

impl std::fmt::Debug for Reply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let body = self.body.as_ref().map(|b| {
            let mut b = b.clone();
            if let Some(t) = b.get_mut("access_token") {
                *t = Value::String("<redacted>".into());
            }
            b
        });
        f.debug_struct("Reply")
            .field("status", &self.status)
            .field("body", &body)
            .finish()
    }
}

impl Reply {
    fn ok(body: Value) -> Reply {
        Reply {
            status: 200,
            body: Some(body),
        }
    }

    /// RFC 6749 5.2: 401 for a client that failed to authenticate, 500 for
    /// `server_error`, else 400.
    fn error(e: &ExchangeError) -> Reply {
        let status = match e.code {
            "invalid_client" => 401,
            "server_error" => 500,
            "temporarily_unavailable" => 503,
            _ => 400,
        };
        Reply {
            status,
            body: Some(json!({ "error": e.code, "error_description": e.description })),
        }
    }
}

/// The RFC 8693 2.2.1 answer to an exchange: `access_token`,
/// `issued_token_type`, `token_type`, `expires_in`, `scope` (always).
pub fn answer(issued: &Issued) -> Value {
    json!({
        "access_token": issued.access_token.expose_str().unwrap_or_default(),
        "issued_token_type": TOKEN_TYPE_ACCESS_TOKEN,
        "token_type": "Bearer",
        "expires_in": issued.expires_in,
        "scope": issued.scope,
    })
}

/// A token exchange of an agent its caller already authenticated
/// ([`TokenService::token_for_agent`]): the RFC 8693 parameters without
/// client authentication. Tokens only as [`SecretValue`]s.
pub struct AgentExchange {
    /// `audience`, `resource`, `scope`, `requested_token_type`, `task_id`.
    pub params: exchange::Params,
    pub subject_token: SecretValue,
    /// Checked as over HTTP (an access token or a JWT).
    pub subject_token_type: Option<String>,
    /// The agent's own `private_key_jwt` assertion, if sent.
    pub actor_token: Option<SecretValue>,
}

/// Who asked and how the agent was authenticated, for the audit record.
pub struct Authenticated {
    pub actor: AuditActor,
    /// e.g. `authenticated by peer uid=1000 (pid 42)`.
    pub how: String,
}

/// Revoked tokens and which signing key versions signed tokens until when.
/// Durable (the task store): a revoked token stays revoked after a restart.
pub trait TokenLedger: Send + Sync {
    /// Records `jti` as revoked until `expires_at` (unix seconds); rows past
    /// `now` may be pruned.
    fn revoke(&self, jti: &str, expires_at: i64, now: i64) -> Result<(), String>;
    fn is_revoked(&self, jti: &str) -> Result<bool, String>;
    /// Version `version` of signing `credential` signed a token that
    /// expires at `until`.
    /// `public_pem`, its public key, is kept with the record: the state
    /// keeps only the newest retired versions of a credential, and one
    /// rotated often retires a version that signed a token still live.
    fn signed(
        &self,
        credential: &str,
        version: u64,
        until: i64,
        public_pem: Option<&str>,
    ) -> Result<(), String>;
    /// The public keys kept with the uses recorded under a credential
    /// name that starts with `prefix`: (name, version, public PEM).
    fn public_keys_under(&self, prefix: &str) -> Result<Vec<(String, u64, String)>, String>;
    /// Each version of `credential` with the latest `exp` it signed.
    fn signed_until(&self, credential: &str) -> Result<Vec<(u64, i64)>, String>;
    /// Every use recorded under a credential name that starts with
    /// `prefix`: (name, version, until).
    fn signed_under(&self, prefix: &str) -> Result<Vec<(String, u64, i64)>, String>;
    /// Uses recorded before the ledger named credentials (one signing
    /// credential then) become `credential`'s.
    fn adopt_unnamed_key_uses(&self, credential: &str) -> Result<(), String>;
}

/// What the token service needs of the daemon.
#[async_trait::async_trait]
pub trait Backend: Send + Sync {
    /// The accepted keys of `agent`'s `auth_key` ([`AgentKey::accepted`]);
    /// `Err` says why the agent cannot authenticate (not configured, no
    /// `auth_key`, decommissioned, state unreadable).
    async fn client_keys(&self, agent: &str) -> Result<Vec<AgentKey>, String>;
    /// Spends assertion `jti`s (agent, jti, keep until), durably, in one
    /// write shared with concurrent requests: for each, `false` when it was
    /// already spent (a replay).
    async fn spend_jtis(&self, jtis: Vec<(String, String, i64)>) -> Result<Vec<bool>, String>;
    fn token_ledger(&self) -> &dyn TokenLedger;
    /// Every version of a signing credential, as state has them.
    async fn signing_versions(&self, credential: &CredentialKey)
    -> Result<Vec<VersionRow>, String>;
    /// A signing credential's current version, from memory (cheap): a
    /// change makes the service read the versions again at once.
    fn signing_current(&self, credential: &CredentialKey) -> Option<u64>;
    /// The value (an Ed25519 PKCS#8 PEM) of one signing credential version
    /// (`version.key` names the credential), read from its vault.
    async fn signing_value(&self, version: &VersionRow) -> Result<SecretValue, String>;
    /// `agent`'s task `id` if it is live (not ended, not expired); `None`
    /// for a task that is another agent's, ended or unknown.
    fn live_task(&self, agent: &str, id: &str) -> Result<Option<TaskClaims>, String>;
    /// A number that moves once a change of any credential's versions
    /// (an agent's key rotated or retired, a signing key promoted) is
    /// committed: what the service cached of versions read before it moved
    /// is read again, so a retired key stops working at once.
    fn versions_generation(&self) -> u64;
    /// When `agent` was decommissioned (unix seconds), if it was: its
    /// token epoch ([`crate::state::DecommissionRow::token_epoch`]).
    fn decommissioned_at(&self, agent: &str) -> Option<i64>;
    /// Audits what an authenticated client did or was refused.
    async fn audit(&self, event: AuditEvent);
    /// Audits the refusal of a request no client authenticated for (no or
    /// a bad assertion, a malformed request): anyone who reaches the
    /// listener can ask for these as fast as it answers, so the daemon
    /// records only a few per window and counts the rest.
    async fn audit_unauthenticated(&self, event: AuditEvent);
}

/// Where the daemon keeps the token service as currently configured: a
/// reload that changes `[token_service]` swaps in a new one (requests in
/// flight finish on the one they started with); empty when none is.
#[derive(Default)]
pub struct Slot(std::sync::RwLock<Option<Arc<TokenService>>>);

impl Slot {
    pub fn with(service: Arc<TokenService>) -> Slot {
        Slot(std::sync::RwLock::new(Some(service)))
    }

    pub fn get(&self) -> Option<Arc<TokenService>> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Puts `service` in; the one it replaces.
    pub fn set(&self, service: Option<Arc<TokenService>>) -> Option<Arc<TokenService>> {
        std::mem::replace(
            &mut *self.0.write().unwrap_or_else(|p| p.into_inner()),
            service,
        )
    }
}

/// The token service.
pub struct TokenService {
    /// The issuer without a final `/`: the endpoints' URLs start with it.
    base: String,
    /// The default key set (tenants without a key of their own), then one
    /// per tenant that has its own.
    keys: Vec<KeySet>,
    clients: std::collections::BTreeMap<String, ClientPolicy>,
    subjects: SubjectTokens,
    backend: Arc<dyn Backend>,
    verifier: Verifier,
    /// State reads, kept [`CACHE_FOR`] and read again at once when the
    /// versions generation moved (a rotation or retirement committed): each
    /// signing credential's versions and each agent's accepted keys (also
    /// read again when an assertion does not verify with the cached keys).
    cache_for: std::time::Duration,
    keys_cache: Mutex<std::collections::HashMap<String, Cached<Vec<AgentKey>>>>,
}

/// One signing credential and the tokens it signs: the default one, or a
/// tenant's own (`[token_service.tenants.NAME]`), whose tokens have their
/// own `iss` (`ISSUER/tenants/NAME`), JWKS and metadata, so that a
/// resource server of one tenant never trusts another tenant's tokens.
///
/// A `kid` is the key's RFC 7638 thumbprint ([`exchange::ed25519_kid`]).
/// Each use of a key is recorded in the ledger under the set and the
/// credential ([`Self::ledger_name`]), so when the set's
/// `signing_credential` changes the previous credential's keys stay
/// published until the last token they signed expires, as after a
/// rotation. Tokens signed before kids were thumbprints carry the version
/// (`VERSION`, a tenant's `NAME.VERSION`): their uses were recorded under
/// the bare credential name, and while one may be live the key is also
/// published under that legacy kid.
struct KeySet {
    /// `None`: the default.
    tenant: Option<String>,
    /// `iss` of its tokens and the rest of the service's policy.
    policy: ServicePolicy,
    credential: CredentialKey,
    /// The current signing version and its key.
    signing: Mutex<Option<(u64, Arc<SigningKey>)>>,
    versions_cache: Mutex<Option<Cached<Vec<VersionRow>>>>,
    /// What the ledger holds of each version's use: a write records `exp`
    /// plus `max_ttl`, so one write covers every token signed in the next
    /// `max_ttl`.
    signed: Mutex<std::collections::HashMap<u64, i64>>,
}

impl KeySet {
    /// The `kid` tokens carried before kids were thumbprints.
    fn legacy_kid(&self, version: u64) -> String {
        match &self.tenant {
            None => version.to_string(),
            Some(t) => format!("{t}.{version}"),
        }
    }

    /// What the ledger's names of this set's key uses start with.
    fn ledger_prefix(&self) -> String {
        match &self.tenant {
            None => "set:default ".to_owned(),
            Some(t) => format!("set:tenants/{t} "),
        }
    }

    /// The ledger's name of this set's uses of `credential`'s keys.
    fn ledger_name(&self, credential: &CredentialKey) -> String {
        format!("{}{credential}", self.ledger_prefix())
    }

    fn jwks_path(&self) -> String {
        match &self.tenant {
            None => JWKS_PATH.to_owned(),
            Some(t) => format!("{TENANTS_PATH}/{t}/jwks.json"),
        }
    }
}

/// How long state reads are reused (at thousands of requests a second, each
/// would otherwise queue behind the state writer).
const CACHE_FOR: std::time::Duration = std::time::Duration::from_secs(1);

/// A state read, when it was made and the [`Backend::versions_generation`]
/// read before it.
type Cached<T> = (std::time::Instant, u64, Arc<T>);

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The unix time now.
fn now_secs() -> i64 {
    i64::try_from(jsonwebtoken::get_current_timestamp()).unwrap_or(i64::MAX)
}

/// 404 for the metadata or JWKS of a tenant without a key of its own.
fn not_found_tenant() -> Reply {
    Reply {
        status: 404,
        body: Some(json!({
            "error": "not_found",
            "error_description": "no such tenant key set: only the tenants in [token_service.tenants] have their own metadata and JWKS",
        })),
    }
}

/// `AGENT/CRED` as the ledger names a credential.
fn parse_credential(text: &str) -> Option<CredentialKey> {
    let (agent, credential) = text.split_once('/')?;
    Some(CredentialKey::new(
        AgentId::new(agent).ok()?,
        crate::model::CredentialId::new(credential).ok()?,
    ))
}

fn err(code: &'static str, description: impl Into<String>) -> ExchangeError {
    ExchangeError {
        code,
        description: description.into(),
    }
}

/// The form parameters of introspection and revocation.
struct TokenForm {
    token: SecretValue,
    client: request::ClientAuth,
}

/// `token` and client authentication, each at most once (RFC 6749 3.2);
/// `token_type_hint` and unknown parameters are ignored (RFC 7662 2.1,
/// RFC 7009 2.1: the hint is only an optimisation). `authorization` is the
/// scheme of the request's `Authorization` header, if any.
fn token_form(body: &[u8], authorization: Option<&str>) -> Result<TokenForm, ExchangeError> {
    if body.len() > request::MAX_BODY_BYTES {
        return Err(err(
            "invalid_request",
            format!("the request body is over {} bytes", request::MAX_BODY_BYTES),
        ));
    }
    let mut token = None;
    let mut client = request::ClientParams::default();
    for (k, v) in form_urlencoded::parse(body) {
        // Without a value: omitted (RFC 6749 3.2).
        if v.is_empty() || client.take(k.as_ref(), v.to_string())? || k != "token" {
            continue;
        }
        if token.replace(v.into_owned()).is_some() {
            return Err(err(
                "invalid_request",
                format!("parameter `{k}` is sent more than once"),
            ));
        }
    }
    let client = client.check(authorization)?;
    let Some(token) = token.filter(|t| !t.is_empty()) else {
        return Err(err("invalid_request", "token is missing"));
    };
    Ok(TokenForm {
        token: SecretValue::from_string(token),
        client,
    })
}

/// RFC 7521 4.2: a `client_id` sent with an assertion names the client
/// the assertion authenticates, else the client is not authenticated.
fn same_client(client_id: Option<&str>, client: &Verified) -> Result<(), ExchangeError> {
    match client_id {
        Some(id) if id != client.agent => Err(err(
            "invalid_client",
            format!(
                "client_id {:?} is not the client the assertion authenticates (agent `{}`)",
                id.chars().take(64).collect::<String>(),
                client.agent
            ),
        )),
        _ => Ok(()),
    }
}

impl TokenService {
    pub fn new(
        config: &super::config::TokenServiceConfig,
        subjects: SubjectTokens,
        backend: Arc<dyn Backend>,
    ) -> TokenService {
        // The `iss` exactly as configured (compared exactly by resource
        // servers, RFC 8414 2 and 3.3); the endpoints and the tenants'
        // issuers under it without a final `/`.
        let issuer = config.issuer.clone();
        let base = issuer.trim_end_matches('/').to_owned();
        let key_set = |tenant: Option<&String>, credential: &CredentialKey| KeySet {
            tenant: tenant.cloned(),
            policy: ServicePolicy {
                issuer: match tenant {
                    None => issuer.clone(),
                    Some(t) => format!("{base}{TENANTS_PATH}/{t}"),
                },
                max_ttl: config.max_ttl,
                max_act_depth: config.max_act_depth,
            },
            credential: credential.clone(),
            signing: Mutex::new(None),
            versions_cache: Mutex::new(None),
            signed: Mutex::new(Default::default()),
        };
        let mut keys = vec![key_set(None, &config.signing_credential)];
        keys.extend(config.tenant_keys.iter().map(|(t, c)| key_set(Some(t), c)));
        // A client assertion names the service by its (or its tenant's)
        // issuer, or by the token endpoint.
        let mut audiences: Vec<String> = keys.iter().map(|k| k.policy.issuer.clone()).collect();
        audiences.push(format!("{base}{TOKEN_PATH}"));
        if let Err(e) = backend
            .token_ledger()
            .adopt_unnamed_key_uses(&config.signing_credential.to_string())
        {
            tracing::error!("token service: cannot name the signing key uses recorded before: {e}");
        }
        TokenService {
            base,
            keys,
            clients: config.clients.clone(),
            subjects,
            backend,
            verifier: Verifier::for_audiences(audiences),
            cache_for: CACHE_FOR,
            keys_cache: Mutex::new(Default::default()),
        }
    }

    /// How long state reads are reused ([`CACHE_FOR`] by default; tests
    /// that change state under the service use zero).
    pub fn with_cache_for(mut self, d: std::time::Duration) -> Self {
        self.cache_for = d;
        self
    }

    pub fn issuer(&self) -> &str {
        &self.keys[0].policy.issuer
    }

    pub fn subjects(&self) -> &SubjectTokens {
        &self.subjects
    }

    /// The key set of a tenant with its own key, or the default one
    /// (`None`); `None` for a tenant without.
    fn tenant_keys(&self, tenant: Option<&str>) -> Option<&KeySet> {
        self.keys.iter().find(|k| k.tenant.as_deref() == tenant)
    }

    /// The key set that signs tokens for `tenant`'s subjects.
    fn signer_for(&self, tenant: &str) -> &KeySet {
        self.tenant_keys(Some(tenant)).unwrap_or(&self.keys[0])
    }

    /// RFC 8414 metadata of the service (`tenant` `None`) or of a tenant
    /// with its own key (`METADATA_PATH/tenants/NAME`); 404 for any other.
    pub fn metadata(&self, tenant: Option<&str>) -> Reply {
        let Some(set) = self.tenant_keys(tenant) else {
            return not_found_tenant();
        };
        let base = &self.base;
        Reply::ok(json!({
            "issuer": set.policy.issuer,
            "token_endpoint": format!("{base}{TOKEN_PATH}"),
            "jwks_uri": format!("{base}{}", set.jwks_path()),
            "introspection_endpoint": format!("{base}{INTROSPECT_PATH}"),
            "revocation_endpoint": format!("{base}{REVOKE_PATH}"),
            "grant_types_supported": [GRANT_TYPE],
            "response_types_supported": [],
            "token_endpoint_auth_methods_supported": ["private_key_jwt"],
            "token_endpoint_auth_signing_alg_values_supported": ["EdDSA"],
            "introspection_endpoint_auth_methods_supported": ["private_key_jwt"],
            "introspection_endpoint_auth_signing_alg_values_supported": ["EdDSA"],
            "revocation_endpoint_auth_methods_supported": ["private_key_jwt"],
            "revocation_endpoint_auth_signing_alg_values_supported": ["EdDSA"],
            "scopes_supported": self.all_scopes(),
        }))
    }

    /// RFC 8414 3.1 metadata at `METADATA_PATH/{path}`: `path` the issuer's
    /// path (the service's own metadata) or a tenant's issuer's path
    /// (`…/tenants/NAME`); a tenant's is also found without the issuer's
    /// path (behind a proxy that strips it). 404 for any other.
    pub fn metadata_at(&self, path: &str) -> Reply {
        let own = reqwest::Url::parse(&self.base)
            .map(|u| u.path().trim_matches('/').to_owned())
            .unwrap_or_default();
        // An issuer written with a final `/` keeps it in `iss`; RFC 8414
        // 3.1 drops it from the well-known URL, and some clients (authlib)
        // keep it: both are served.
        let path = path.trim_start_matches('/');
        let path = match path.strip_suffix('/') {
            Some(p) if !p.is_empty() => p,
            _ => path,
        };
        if !own.is_empty() && path == own {
            return self.metadata(None);
        }
        let rest = match path.strip_prefix(own.as_str()) {
            Some(r) if !own.is_empty() && r.starts_with('/') => &r[1..],
            _ => path,
        };
        match rest
            .strip_prefix(TENANTS_PATH.trim_start_matches('/'))
            .and_then(|t| t.strip_prefix('/'))
        {
            Some(tenant) if !tenant.is_empty() && !tenant.contains('/') => {
                self.metadata(Some(tenant))
            }
            _ => not_found_tenant(),
        }
    }

    fn all_scopes(&self) -> Vec<String> {
        let mut s: Vec<String> = self
            .clients
            .values()
            .flat_map(|c| c.scopes.iter().cloned())
            .collect();
        s.sort();
        s.dedup();
        s
    }
}
