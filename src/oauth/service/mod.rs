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

mod introspection;

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
    fn signed(&self, credential: &str, version: u64, until: i64) -> Result<(), String>;
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
        if client.take(k.as_ref(), v.to_string())? || k != "token" {
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
        let path = path.trim_start_matches('/');
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

    /// A key set's versions, from the cache when fresh.
    async fn signing_versions(&self, set: &KeySet) -> Result<Arc<Vec<VersionRow>>, String> {
        let generation = self.backend.versions_generation();
        let current = self.backend.signing_current(&set.credential);
        if let Some((at, seen, v)) = &*lock(&set.versions_cache)
            && at.elapsed() < self.cache_for
            && *seen == generation
            && current.is_some()
            && v.iter()
                .any(|r| r.stage == crate::model::Stage::Current && Some(r.version) == current)
        {
            return Ok(v.clone());
        }
        let v = Arc::new(self.backend.signing_versions(&set.credential).await?);
        *lock(&set.versions_cache) = Some((std::time::Instant::now(), generation, v.clone()));
        Ok(v)
    }

    /// `agent`'s accepted keys, from the cache when fresh unless `fresh`.
    async fn client_keys(
        &self,
        agent: &str,
        fresh: bool,
    ) -> Result<(Arc<Vec<AgentKey>>, bool), String> {
        // Read before the keys: a retirement committed after this read
        // moves it, so the keys read now are never kept past the next one.
        let generation = self.backend.versions_generation();
        if !fresh
            && let Some((at, seen, k)) = lock(&self.keys_cache).get(agent)
            && at.elapsed() < self.cache_for
            && *seen == generation
        {
            return Ok((k.clone(), true));
        }
        let keys = Arc::new(self.backend.client_keys(agent).await?);
        let mut cache = lock(&self.keys_cache);
        if cache.len() > 10_000 {
            let ttl = self.cache_for;
            cache.retain(|_, (at, seen, _)| at.elapsed() < ttl && *seen == generation);
        }
        cache.insert(
            agent.to_owned(),
            (std::time::Instant::now(), generation, keys.clone()),
        );
        Ok((keys, false))
    }

    /// The keys of a key set that are published: its credential's current
    /// and previous versions and any other (not pending) version that
    /// signed a token not yet expired, each under its thumbprint; under its
    /// legacy kid too while a token that carries it may be live; then the
    /// keys of credentials the set signed with before that signed a token
    /// not yet expired. None while the set's signer is decommissioned.
    async fn published(&self, set: &KeySet, now: i64) -> Result<Vec<PublishedKey>, String> {
        if self.signer_retired(set) {
            return Ok(Vec::new());
        }
        let versions = self.signing_versions(set).await?;
        let ledger = self.backend.token_ledger();
        let uses = ledger.signed_under(&set.ledger_prefix())?;
        let legacy = ledger.signed_until(&set.credential.to_string())?;
        let own = set.ledger_name(&set.credential);
        let live = |name: &str, version: u64| {
            uses.iter()
                .any(|(n, v, until)| n == name && *v == version && *until > now)
        };
        let legacy_live = |version: u64| {
            legacy
                .iter()
                .any(|(v, until)| *v == version && *until > now)
        };
        let mut keys: Vec<PublishedKey> = Vec::new();
        let mut publish = |kid: Option<String>, pem: &str| {
            if let Some(kid) = kid
                && !keys.iter().any(|k| k.kid == kid)
            {
                keys.push(PublishedKey {
                    kid,
                    public_pem: pem.to_owned(),
                });
            }
        };
        let accepted = AgentKey::accepted(&versions);
        let mut older: Vec<&VersionRow> = versions
            .iter()
            .filter(|v| !matches!(v.stage, crate::model::Stage::Pending))
            .filter(|v| !accepted.iter().any(|k| k.version == v.version))
            .filter(|v| live(&own, v.version) || legacy_live(v.version))
            .collect();
        older.sort_by_key(|v| std::cmp::Reverse(v.version));
        let shown: Vec<(u64, &str)> = accepted
            .iter()
            .map(|k| (k.version, k.public_pem.as_str()))
            .chain(
                older
                    .iter()
                    .filter_map(|v| Some((v.version, v.public.as_deref()?))),
            )
            .collect();
        for (_, pem) in &shown {
            publish(exchange::ed25519_kid_of_pem(pem), pem);
        }
        for (version, pem) in &shown {
            if legacy_live(*version) {
                publish(Some(set.legacy_kid(*version)), pem);
            }
        }
        // The credentials the set signed with before (`signing_credential`
        // changed): their keys while a token they signed may be live.
        let mut before: Vec<&str> = uses
            .iter()
            .filter(|(n, _, until)| *n != own && *until > now)
            .map(|(n, _, _)| n.as_str())
            .collect();
        before.sort_unstable();
        before.dedup();
        for name in before {
            let Some(credential) = name
                .strip_prefix(set.ledger_prefix().as_str())
                .and_then(parse_credential)
            else {
                continue;
            };
            if self
                .backend
                .decommissioned_at(credential.agent.as_str())
                .is_some()
            {
                continue;
            }
            let mut rows = self.backend.signing_versions(&credential).await?;
            rows.retain(|v| {
                !matches!(v.stage, crate::model::Stage::Pending) && live(name, v.version)
            });
            rows.sort_by_key(|v| std::cmp::Reverse(v.version));
            for v in &rows {
                if let Some(pem) = v.public.as_deref() {
                    publish(exchange::ed25519_kid_of_pem(pem), pem);
                }
            }
        }
        Ok(keys)
    }

    /// `GET /.well-known/jwks.json` (`tenant` `None`), or a tenant's
    /// `GET /tenants/NAME/jwks.json`: only that key set's keys; 404 for a
    /// tenant without a key of its own.
    pub async fn jwks(&self, tenant: Option<&str>) -> Reply {
        let Some(set) = self.tenant_keys(tenant) else {
            return not_found_tenant();
        };
        match self.published(set, now_secs()).await {
            Ok(keys) => Reply::ok(exchange::jwks_document(&keys)),
            Err(e) => {
                tracing::error!("token service: cannot list the signing keys: {e}");
                Reply::error(&err(
                    "temporarily_unavailable",
                    "the signing keys cannot be read now; retry",
                ))
            }
        }
    }

    /// Whether the agent holding a key set's signing credential is
    /// decommissioned: its keys are destroyed, so the set signs nothing
    /// more, publishes nothing and none of its tokens is active.
    fn signer_retired(&self, set: &KeySet) -> bool {
        self.backend
            .decommissioned_at(set.credential.agent.as_str())
            .is_some()
    }

    /// A key set's current signing key and its version, read from the
    /// vault when the current version changed since the last read.
    async fn signing_key(&self, set: &KeySet) -> Result<(u64, Arc<SigningKey>), ExchangeError> {
        let unavailable = |why: String| {
            tracing::error!("token service: no signing key ({}): {why}", set.credential);
            err(
                "server_error",
                "the token service cannot sign now: the operator must check the signing credential (keyturn status)",
            )
        };
        if self.signer_retired(set) {
            return Err(unavailable(format!(
                "agent {} is decommissioned and its keys destroyed: name another signing_credential and reload",
                set.credential.agent
            )));
        }
        let versions = self.signing_versions(set).await.map_err(unavailable)?;
        let Some(current) = versions
            .iter()
            .find(|v| v.stage == crate::model::Stage::Current)
        else {
            return Err(unavailable(
                "the signing credential has no current version yet".into(),
            ));
        };
        if let Some((v, key)) = &*lock(&set.signing)
            && *v == current.version
        {
            return Ok((*v, key.clone()));
        }
        let pem = self
            .backend
            .signing_value(current)
            .await
            .map_err(unavailable)?;
        let key = SigningKey::from_ed25519_pem(&pem).ok_or_else(|| {
            unavailable(format!(
                "version {} of the signing credential is not an Ed25519 private key",
                current.version
            ))
        })?;
        let key = Arc::new(key);
        *lock(&set.signing) = Some((current.version, key.clone()));
        Ok((current.version, key))
    }

    /// Checks a private_key_jwt assertion (client or actor); its jti is
    /// spent by [`Self::spend`] before anything is done on its strength.
    async fn authenticate(
        &self,
        token: &SecretValue,
        code: &'static str,
        what: &str,
    ) -> Result<Verified, ExchangeError> {
        let refuse = |why: String| err(code, format!("the {what} is refused: {why}"));
        let Some(token) = token.expose_str() else {
            return Err(refuse("it is not UTF-8 text".into()));
        };
        let claimed = self
            .verifier
            .claimed_agent(token)
            .map_err(|e| refuse(e.to_string()))?;
        // A decommission takes effect at once, whatever the cache holds.
        if self.backend.decommissioned_at(&claimed.agent).is_some() {
            return Err(refuse(format!("agent {} is decommissioned", claimed.agent)));
        }
        let (keys, cached) = self
            .client_keys(&claimed.agent, false)
            .await
            .map_err(refuse)?;
        match self.verifier.check(token, &claimed, &keys) {
            Err(
                crate::auth::AssertionError::BadSignature(_)
                | crate::auth::AssertionError::UnknownKid { .. }
                | crate::auth::AssertionError::NoKey(_),
            ) if cached => {
                let (keys, _) = self
                    .client_keys(&claimed.agent, true)
                    .await
                    .map_err(refuse)?;
                self.verifier.check(token, &claimed, &keys)
            }
            r => r,
        }
        .map_err(|e| refuse(e.to_string()))
    }

    /// Spends the jtis of checked assertions, each with the error code and
    /// name to refuse it with if it was spent before (a replay).
    async fn spend(
        &self,
        assertions: &[(&Verified, &'static str, &str)],
    ) -> Result<(), ExchangeError> {
        let jtis = assertions
            .iter()
            .map(|(v, _, _)| (v.agent.clone(), v.jti.clone(), v.keep_until()))
            .collect();
        let fresh = self.backend.spend_jtis(jtis).await.map_err(|e| {
            tracing::error!("token service: cannot record assertion jtis: {e}");
            err(
                "temporarily_unavailable",
                "the single-use check cannot be recorded now; retry",
            )
        })?;
        for ((_, code, what), fresh) in assertions.iter().zip(fresh) {
            if !fresh {
                return Err(err(
                    code,
                    format!(
                        "the {what} is refused: {}",
                        crate::auth::AssertionError::Replayed
                    ),
                ));
            }
        }
        Ok(())
    }

    /// `POST /oauth/token`; `authorization` is the scheme of the request's
    /// `Authorization` header, if any (one authentication method only).
    pub async fn token(&self, body: &[u8], peer: &str, authorization: Option<&str>) -> Reply {
        let mut ev = AuditEvent::new("oauth.token", AuditActor::Daemon, Outcome::Ok);
        let mut authenticated = false;
        let result = self
            .issue(body, authorization, &mut ev, &mut authenticated)
            .await;
        let result = self
            .audited(ev, result, format!("from {peer}"), authenticated)
            .await;
        match result {
            Ok(issued) => Reply::ok(answer(&issued)),
            Err(e) => Reply::error(&e),
        }
    }

    /// A token exchange for `agent`, which the caller already authenticated
    /// (the daemon's sockets: by the peer's uid, `by` says how, for the
    /// audit). The rest is [`Self::token`]'s: the same checks, the same
    /// token, the same error codes. A decommissioned agent and one that is
    /// not a client of the service are refused; an `actor_token`, if sent,
    /// must be the same agent's assertion (checked and its `jti` spent as
    /// over HTTP) and caps the token's lifetime; without one the policy's
    /// TTL does.
    pub async fn token_for_agent(
        &self,
        agent: &str,
        req: AgentExchange,
        by: Authenticated,
    ) -> Result<Issued, ExchangeError> {
        let mut ev = AuditEvent::new("oauth.token", by.actor, Outcome::Ok);
        ev.agent = AgentId::new(agent).ok();
        let result = async {
            if self.backend.decommissioned_at(agent).is_some() {
                return Err(err(
                    "invalid_client",
                    format!("agent {agent} is decommissioned"),
                ));
            }
            request::subject_token_type(req.subject_token_type)?;
            if req.subject_token.expose().is_empty() {
                return Err(err("invalid_request", "subject_token is missing"));
            }
            let valid_until = match &req.actor_token {
                None => None,
                Some(token) => {
                    let actor = self
                        .authenticate(token, "invalid_request", "actor_token")
                        .await?;
                    self.spend(&[(&actor, "invalid_request", "actor_token")])
                        .await?;
                    if actor.agent != agent {
                        return Err(err(
                            "invalid_request",
                            format!(
                                "the actor_token is agent `{}`'s, but the client is `{agent}`: an agent acts only as itself",
                                actor.agent
                            ),
                        ));
                    }
                    u64::try_from(actor.exp).ok()
                }
            };
            self.grant(agent, valid_until, &req.subject_token, req.params, &mut ev)
                .await
        }
        .await;
        // The caller authenticated the agent (its refusals are its own).
        self.audited(ev, result, by.how, true).await
    }

    /// Audits the outcome of an exchange (`note` says where it came from
    /// and how the client was authenticated) and hands it back; a refusal
    /// before the client `authenticated` is audited as such
    /// ([`Backend::audit_unauthenticated`]).
    async fn audited(
        &self,
        mut ev: AuditEvent,
        result: Result<Issued, ExchangeError>,
        note: String,
        authenticated: bool,
    ) -> Result<Issued, ExchangeError> {
        ev.detail = Some(match &ev.detail {
            Some(d) => format!("{d}; {note}"),
            None => note,
        });
        if let Err(e) = &result {
            ev.outcome = if e.code == "server_error" {
                Outcome::Failed
            } else {
                Outcome::Refused
            };
            ev.error = Some(e.to_string());
        }
        self.audit_as(ev, authenticated).await;
        result
    }

    /// Audits `ev` fully when the client `authenticated`, else as a
    /// refusal of an unauthenticated request (rate-limited by the daemon).
    async fn audit_as(&self, ev: AuditEvent, authenticated: bool) {
        if authenticated || ev.outcome == Outcome::Ok {
            self.backend.audit(ev).await;
        } else {
            self.backend.audit_unauthenticated(ev).await;
        }
    }

    /// `POST /oauth/token` once parsed: client and actor authentication
    /// (private_key_jwt), then [`Self::grant`]. `authenticated` is set once
    /// the client's (and actor's) assertions are checked and spent.
    async fn issue(
        &self,
        body: &[u8],
        authorization: Option<&str>,
        ev: &mut AuditEvent,
        authenticated: &mut bool,
    ) -> Result<Issued, ExchangeError> {
        let req = request::parse(body, authorization)?;
        let client = self
            .authenticate(&req.client.assertion, "invalid_client", "client assertion")
            .await?;
        ev.agent = AgentId::new(&client.agent).ok();
        same_client(req.client.client_id.as_deref(), &client)?;
        let actor = self
            .authenticate(&req.actor_token, "invalid_request", "actor_token")
            .await?;
        self.spend(&[
            (&client, "invalid_client", "client assertion"),
            (&actor, "invalid_request", "actor_token"),
        ])
        .await?;
        *authenticated = true;
        if actor.agent != client.agent {
            return Err(err(
                "invalid_request",
                format!(
                    "the actor_token is agent `{}`'s, but the client is `{}`: an agent acts only as itself",
                    actor.agent, client.agent
                ),
            ));
        }
        self.grant(
            &client.agent,
            u64::try_from(actor.exp).ok(),
            &req.subject_token,
            req.params,
            ev,
        )
        .await
    }

    /// The exchange for an authenticated `agent` (the actor; its credential
    /// valid until `valid_until`, if known): the subject token, the task,
    /// the exchange itself, the signing key's use recorded, the audit detail.
    async fn grant(
        &self,
        agent: &str,
        valid_until: Option<u64>,
        subject_token: &SecretValue,
        mut params: exchange::Params,
        ev: &mut AuditEvent,
    ) -> Result<Issued, ExchangeError> {
        let subject = self
            .subjects
            .validate(subject_token.expose_str().unwrap_or(""))
            .await
            .map_err(|e| {
                err(
                    e.oauth_error(),
                    format!("the subject_token is refused: {e}"),
                )
            })?;
        ev.tenant = Some(subject.tenant.clone());
        if let Some(id) = &params.task_id {
            // Named in the record, as task records do, refused or not.
            let id_shown = id.chars().take(64).collect::<String>();
            ev.detail = Some(format!("task {id_shown:?}"));
            let task = self
                .backend
                .live_task(agent, id)
                .map_err(|e| {
                    tracing::error!("token service: cannot read tasks: {e}");
                    err("temporarily_unavailable", "tasks cannot be read now; retry")
                })?
                .ok_or_else(|| {
                    err(
                        "invalid_request",
                        format!("task_id {id_shown:?} is not a live task of agent `{agent}`",),
                    )
                })?;
            params.task = Some(task);
        }
        let set = self.signer_for(&subject.tenant);
        let (version, key) = self.signing_key(set).await?;
        let now = now_secs();
        let issued = exchange::exchange(
            &set.policy,
            self.clients.get(agent),
            &subject,
            &Actor {
                agent: agent.to_owned(),
                valid_until,
            },
            &params,
            u64::try_from(now).unwrap_or(0),
            &key,
        )?;
        let exp = now.saturating_add(i64::try_from(issued.expires_in).unwrap_or(i64::MAX));
        if let Err(e) = self.note_signed(set, version, exp) {
            // Without the record the key could leave the JWKS before the
            // token expires: refuse rather than issue an unverifiable token.
            tracing::error!("token service: cannot record the signing key's use: {e}");
            return Err(err(
                "server_error",
                "the token service cannot record the issuance now; retry",
            ));
        }
        let task = params
            .task
            .as_ref()
            .map(|t| format!(", task {:?}, run_id {:?}", t.task_id, t.run_id))
            .unwrap_or_default();
        ev.detail = Some(format!(
            "subject {:?} of issuer {}, scope {:?}, aud {:?}, jti {}, kid {}, expires_in {}s{task}",
            subject.sub,
            subject.issuer_name,
            issued.scope,
            issued.aud,
            issued.jti,
            key.kid,
            issued.expires_in
        ));
        Ok(issued)
    }

    /// Makes sure the ledger keeps `version` of `set`'s credential
    /// published until `exp`.
    fn note_signed(&self, set: &KeySet, version: u64, exp: i64) -> Result<(), String> {
        let mut signed = lock(&set.signed);
        if signed.get(&version).is_some_and(|until| *until >= exp) {
            return Ok(());
        }
        let ttl = i64::try_from(set.policy.max_ttl.as_secs()).unwrap_or(i64::MAX);
        let until = exp.saturating_add(ttl);
        self.backend
            .token_ledger()
            .signed(&set.ledger_name(&set.credential), version, until)?;
        signed.insert(version, until);
        Ok(())
    }
}
