//! RFC 8693 token exchange as a pure function: a validated subject (the
//! human), an authenticated agent (the actor), the request's parameters, the
//! agent's client policy, the time and the signing key in; an RFC 9068
//! `at+jwt` access token or the RFC 8693 / RFC 6749 error out.
//!
//! Nothing here does I/O, so every refusal is tested without a listener.
//! Error codes, and why:
//! - `unauthorized_client`: the agent has no client policy (RFC 6749 5.2:
//!   "not authorized to use this authorization grant type").
//! - `invalid_request`: the subject token is unacceptable based on policy —
//!   its `may_act` names someone else, its tenant is not one the agent
//!   serves, its `act` chain is malformed or would exceed the maximum depth —
//!   and a bad `requested_token_type`. RFC 8693 2.2.2 says a subject or actor
//!   token "unacceptable based on policy" MUST be `invalid_request`; the same
//!   code [`super::SubjectError::oauth_error`] uses.
//! - `invalid_target`: a requested `audience`/`resource` outside the agent's
//!   `audiences` (RFC 8693 2.2.2), or none requested and no single default.
//! - `invalid_scope`: subject ∩ agent's allowed ∩ requested is empty.
//!
//! Scope never widens: a requested scope the subject or the agent lacks is
//! dropped, and the `scope` of the response (always returned) says what was
//! granted (RFC 6749 3.3).

use std::time::Duration;

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Map, Value, json};

use super::Subject;
use crate::model::SecretValue;

/// `subject_token_type` values accepted (RFC 8693 3).
pub const TOKEN_TYPE_ACCESS_TOKEN: &str = "urn:ietf:params:oauth:token-type:access_token";
pub const TOKEN_TYPE_JWT: &str = "urn:ietf:params:oauth:token-type:jwt";
/// `grant_type` of a token exchange.
pub const GRANT_TYPE: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
/// `max_ttl` and `max_act_depth` when unset.
pub const DEFAULT_MAX_TTL: Duration = Duration::from_secs(5 * 60);
pub const DEFAULT_MAX_ACT_DEPTH: usize = 3;

/// What the token service as a whole says.
#[derive(Debug, Clone)]
pub struct ServicePolicy {
    /// `iss` of issued tokens.
    pub issuer: String,
    pub max_ttl: Duration,
    /// The longest `act` chain an issued token may carry (1 = only the agent).
    pub max_act_depth: usize,
}

/// `[token_service.clients.AGENT]`: what one agent may obtain.
#[derive(Debug, Clone, PartialEq)]
pub struct ClientPolicy {
    pub agent: String,
    pub scopes: Vec<String>,
    pub audiences: Vec<String>,
    /// The tenants whose subjects this agent may act for.
    pub tenants: Vec<String>,
    pub ttl: Duration,
}

/// The RFC 8693 parameters the exchange looks at (the tokens themselves
/// are already validated into [`Subject`] and [`Actor`]).
#[derive(Debug, Clone, Default)]
pub struct Params {
    pub audience: Vec<String>,
    pub resource: Vec<String>,
    /// Space-delimited, as sent.
    pub scope: Option<String>,
    pub requested_token_type: Option<String>,
    /// `task_id` (a keyturn extension) as sent: the caller's live task the
    /// token is for. The service resolves it into [`Params::task`].
    pub task_id: Option<String>,
    /// The task, resolved: its attribution goes into the token.
    pub task: Option<TaskClaims>,
}

/// A live task of the agent, as the token records it: `txn` (RFC 8417's
/// transaction id) = the run id, `use_case`, `task_id`; the token never
/// outlives the task and never leaves its tenant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskClaims {
    pub task_id: String,
    pub run_id: String,
    pub use_case: String,
    pub tenant: String,
    /// Unix seconds.
    pub expires_at: u64,
}

/// The authenticated agent.
#[derive(Debug, Clone)]
pub struct Actor {
    pub agent: String,
    /// When the agent's credential stops being valid (unix seconds), if known:
    /// an issued token never outlives it.
    pub valid_until: Option<u64>,
}

/// The current version of the signing credential.
pub struct SigningKey {
    /// Its public key's [`ed25519_kid`].
    pub kid: String,
    pub key: EncodingKey,
}

impl SigningKey {
    /// From the Ed25519 PKCS#8 PEM the ed25519 generator delivers; its
    /// `kid` is derived from the key itself, so it always names this key.
    pub fn from_ed25519_pem(pem: &SecretValue) -> Option<SigningKey> {
        use ed25519_dalek::pkcs8::DecodePrivateKey as _;
        let private = ed25519_dalek::SigningKey::from_pkcs8_pem(pem.expose_str()?).ok()?;
        Some(SigningKey {
            kid: ed25519_kid(&private.verifying_key()),
            key: EncodingKey::from_ed_pem(pem.expose()).ok()?,
        })
    }
}

/// The `kid` of a signing key: the RFC 7638 JWK thumbprint (SHA-256) of
/// its public key. It names the key, not the credential or the version:
/// two keys never share one, whichever credential, tenant or re-created
/// credential they come from, so a resource server that caches keys by
/// `kid` never verifies with the wrong one.
pub fn ed25519_kid(public: &ed25519_dalek::VerifyingKey) -> String {
    use base64::Engine as _;
    use jsonwebtoken::jwk::{
        AlgorithmParameters, EllipticCurve, Jwk, OctetKeyPairParameters, OctetKeyPairType,
        ThumbprintHash,
    };
    let jwk = Jwk {
        common: Default::default(),
        algorithm: AlgorithmParameters::OctetKeyPair(OctetKeyPairParameters {
            key_type: OctetKeyPairType::OctetKeyPair,
            curve: EllipticCurve::Ed25519,
            x: base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(public.as_bytes()),
        }),
    };
    jwk.thumbprint(ThumbprintHash::SHA256)
        .expect("an Ed25519 OKP key always has a thumbprint")
}

/// [`ed25519_kid`] of an Ed25519 SPKI PEM; `None` for anything else.
pub fn ed25519_kid_of_pem(public_pem: &str) -> Option<String> {
    use ed25519_dalek::pkcs8::DecodePublicKey as _;
    let vk = ed25519_dalek::VerifyingKey::from_public_key_pem(public_pem).ok()?;
    Some(ed25519_kid(&vk))
}

/// A public key as published in a JWKS: its `kid` and its SPKI PEM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishedKey {
    pub kid: String,
    pub public_pem: String,
}

/// An issued token. `Debug` never shows the token.
pub struct Issued {
    pub access_token: SecretValue,
    pub expires_in: u64,
    pub scope: String,
    pub aud: Vec<String>,
    pub jti: String,
}

impl std::fmt::Debug for Issued {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issued")
            .field("expires_in", &self.expires_in)
            .field("scope", &self.scope)
            .field("aud", &self.aud)
            .field("jti", &self.jti)
            .finish_non_exhaustive()
    }
}

/// A refusal: the OAuth `error` and an `error_description` (never holding a
/// token).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExchangeError {
    pub code: &'static str,
    pub description: String,
}

impl ExchangeError {
    fn new(code: &'static str, description: impl Into<String>) -> Self {
        ExchangeError {
            code,
            description: description.into(),
        }
    }
}

impl std::fmt::Display for ExchangeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code, self.description)
    }
}

/// RFC 6749 appendix A.4: scope-token = 1*( %x21 / %x23-5B / %x5D-7E ).
fn valid_scope_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b == 0x21 || (0x23..=0x5B).contains(&b) || (0x5D..=0x7E).contains(&b))
}

/// How many `act` levels `act` holds (0 for none); `None` when a level is
/// not an object with a string `sub`.
/// The deepest `act` chain read (beyond it a chain is refused as malformed).
pub const MAX_ACT_LEVELS: usize = 64;

/// The number of actors in an `act` chain: `None` when a level is not an
/// object with a string `sub`; past [`MAX_ACT_LEVELS`] it is not read on,
/// and `MAX_ACT_LEVELS + 1` stands for "deeper".
fn act_depth(act: Option<&Map<String, Value>>) -> Option<usize> {
    let mut depth = 0;
    let mut cur = act;
    while let Some(level) = cur {
        if !level.get("sub").is_some_and(Value::is_string) {
            return None;
        }
        depth += 1;
        if depth > MAX_ACT_LEVELS {
            return Some(depth);
        }
        cur = match level.get("act") {
            None => None,
            Some(Value::Object(m)) => Some(m),
            Some(_) => return None,
        };
    }
    Some(depth)
}

/// The exchange. `now` is unix seconds.
pub fn exchange(
    service: &ServicePolicy,
    client: Option<&ClientPolicy>,
    subject: &Subject,
    actor: &Actor,
    params: &Params,
    now: u64,
    key: &SigningKey,
) -> Result<Issued, ExchangeError> {
    plan(service, client, subject, actor, params, now)?.sign(key)
}

/// A token the policy allows, not signed yet: [`plan`] decides, then
/// [`Planned::sign`] signs, so that a request the policy refuses is told
/// so even while no signing key can be had (black-box finding: it was
/// answered `server_error` then, as if the request were right).
pub struct Planned {
    claims: Value,
    expires_in: u64,
    scope: String,
    aud: Vec<String>,
    jti: String,
}

impl Planned {
    /// Signs the token with `key`.
    pub fn sign(self, key: &SigningKey) -> Result<Issued, ExchangeError> {
        let mut header = Header::new(Algorithm::EdDSA);
        header.typ = Some("at+jwt".into());
        header.kid = Some(key.kid.clone());
        let token = jsonwebtoken::encode(&header, &self.claims, &key.key).map_err(|_| {
            ExchangeError::new(
                "server_error",
                "the signing key cannot sign; the operator must check the signing credential",
            )
        })?;
        Ok(Issued {
            access_token: SecretValue::from_string(token),
            expires_in: self.expires_in,
            scope: self.scope,
            aud: self.aud,
            jti: self.jti,
        })
    }
}

/// Everything [`exchange`] decides before it signs.
pub fn plan(
    service: &ServicePolicy,
    client: Option<&ClientPolicy>,
    subject: &Subject,
    actor: &Actor,
    params: &Params,
    now: u64,
) -> Result<Planned, ExchangeError> {
    let Some(client) = client.filter(|c| c.agent == actor.agent) else {
        return Err(ExchangeError::new(
            "unauthorized_client",
            format!(
                "agent `{}` may not use token exchange: add [token_service.clients.{}] to the config",
                actor.agent, actor.agent
            ),
        ));
    };
    if let Some(t) = &params.requested_token_type
        && t != TOKEN_TYPE_ACCESS_TOKEN
        && t != TOKEN_TYPE_JWT
    {
        return Err(ExchangeError::new(
            "invalid_request",
            format!(
                "requested_token_type must be {TOKEN_TYPE_ACCESS_TOKEN} (or {TOKEN_TYPE_JWT}): only access tokens are issued"
            ),
        ));
    }

    // Tenant: a subject from a tenant this agent does not serve never yields a token.
    if !client.tenants.contains(&subject.tenant) {
        return Err(ExchangeError::new(
            "invalid_request",
            format!(
                "the subject token belongs to tenant `{}`, which agent `{}` does not serve",
                subject.tenant, actor.agent
            ),
        ));
    }

    // A task binds the token to its tenant too.
    if let Some(task) = &params.task
        && task.tenant != subject.tenant
    {
        return Err(ExchangeError::new(
            "invalid_request",
            format!(
                "task {} is for tenant `{}`, the subject token for tenant `{}`: a task never serves another tenant",
                task.task_id, task.tenant, subject.tenant
            ),
        ));
    }

    // may_act (RFC 8693 4.4): when present, it must name this agent.
    if let Some(may) = &subject.may_act {
        let names_agent = may.get("sub").and_then(Value::as_str) == Some(actor.agent.as_str());
        let iss_ok = match may.get("iss") {
            None => true,
            Some(v) => v.as_str() == Some(service.issuer.as_str()),
        };
        let known = may.keys().all(|k| k == "sub" || k == "iss");
        if !(names_agent && iss_ok && known) {
            return Err(ExchangeError::new(
                "invalid_request",
                format!(
                    "the subject token's may_act does not allow agent `{}` to act for its subject",
                    actor.agent
                ),
            ));
        }
    }

    // act chain: the agent outermost, the subject's chain nested, never dropped.
    let Some(prior) = act_depth(subject.act.as_ref()) else {
        return Err(ExchangeError::new(
            "invalid_request",
            "the subject token's act claim is malformed: each level must be an object with a string sub",
        ));
    };
    if prior + 1 > service.max_act_depth {
        let deep = if prior > MAX_ACT_LEVELS {
            format!("more than {}", MAX_ACT_LEVELS + 1)
        } else {
            (prior + 1).to_string()
        };
        return Err(ExchangeError::new(
            "invalid_request",
            format!(
                "the delegation chain would be {deep} actors deep; at most {} are allowed (max_act_depth)",
                service.max_act_depth
            ),
        ));
    }
    let mut act = Map::new();
    act.insert("sub".into(), Value::String(actor.agent.clone()));
    if let Some(inner) = &subject.act {
        act.insert("act".into(), Value::Object(inner.clone()));
    }

    // Audience: every requested target within the client's audiences.
    let mut aud: Vec<String> = Vec::new();
    for t in params.audience.iter().chain(&params.resource) {
        if !client.audiences.iter().any(|a| a == t) {
            return Err(ExchangeError::new(
                "invalid_target",
                format!(
                    "agent `{}` may not obtain tokens for the requested audience or resource",
                    actor.agent
                ),
            ));
        }
        if !aud.contains(t) {
            aud.push(t.clone());
        }
    }
    if aud.is_empty() {
        match client.audiences.as_slice() {
            [only] => aud.push(only.clone()),
            _ => {
                return Err(ExchangeError::new(
                    "invalid_target",
                    "name the target with `audience` or `resource`: this agent has more than one",
                ));
            }
        }
    }

    // Scope: subject ∩ client ∩ requested, in the subject's order.
    let requested: Option<Vec<&str>> = match &params.scope {
        None => None,
        Some(s) => {
            let parts: Vec<&str> = s.split(' ').collect();
            if parts.iter().any(|p| !valid_scope_token(p)) {
                return Err(ExchangeError::new(
                    "invalid_scope",
                    "scope must be scope tokens separated by single spaces (RFC 6749 3.3)",
                ));
            }
            Some(parts)
        }
    };
    let mut granted: Vec<&str> = Vec::new();
    for s in &subject.scope {
        if client.scopes.iter().any(|c| c == s)
            && requested.as_ref().is_none_or(|r| r.contains(&s.as_str()))
            && !granted.contains(&s.as_str())
        {
            granted.push(s);
        }
    }
    if granted.is_empty() {
        return Err(ExchangeError::new(
            "invalid_scope",
            "no scope is left: the token's scope is what the subject holds, the agent is allowed and the request asks for, and that is empty",
        ));
    }
    let scope = granted.join(" ");

    // Lifetime: the shortest of the client's ttl, max_ttl, the subject's exp
    // and the agent's credential.
    let mut exp = now
        .saturating_add(client.ttl.as_secs())
        .min(now.saturating_add(service.max_ttl.as_secs()))
        .min(subject.exp);
    if let Some(v) = actor.valid_until {
        exp = exp.min(v);
    }
    if let Some(task) = &params.task {
        exp = exp.min(task.expires_at);
    }
    if exp <= now {
        return Err(ExchangeError::new(
            "invalid_request",
            "the subject token or the agent's credential expires now: nothing is left to delegate",
        ));
    }

    let jti = {
        use rand::RngCore;
        let mut id = [0u8; 16];
        rand::rngs::OsRng.fill_bytes(&mut id);
        hex::encode(id)
    };
    let aud_claim = match aud.as_slice() {
        [one] => Value::String(one.clone()),
        _ => json!(aud),
    };
    let mut claims = json!({
        "iss": service.issuer,
        "sub": subject.sub,
        "aud": aud_claim,
        "exp": exp,
        "iat": now,
        "jti": jti,
        "client_id": actor.agent,
        "scope": scope,
        "act": act,
        "tenant": subject.tenant,
    });
    if let Some(task) = &params.task {
        claims["txn"] = json!(task.run_id);
        claims["use_case"] = json!(task.use_case);
        claims["task_id"] = json!(task.task_id);
    }
    Ok(Planned {
        claims,
        expires_in: exp - now,
        scope,
        aud,
        jti,
    })
}

/// The JWK Set (RFC 7517) of the published keys, in their order:
/// OKP/Ed25519 keys with their `kid`, `alg` EdDSA, `use` sig. A key that
/// is not an Ed25519 SPKI PEM is left out.
pub fn jwks_document(keys: &[PublishedKey]) -> Value {
    use base64::Engine as _;
    use ed25519_dalek::pkcs8::DecodePublicKey as _;
    let keys: Vec<Value> = keys
        .iter()
        .filter_map(|k| {
            let vk = ed25519_dalek::VerifyingKey::from_public_key_pem(&k.public_pem).ok()?;
            Some(json!({
                "kty": "OKP",
                "crv": "Ed25519",
                "x": base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(vk.as_bytes()),
                "kid": k.kid,
                "alg": "EdDSA",
                "use": "sig",
            }))
        })
        .collect();
    json!({ "keys": keys })
}
