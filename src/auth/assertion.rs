//! The RFC 7523 JWT bearer assertion: verifying one (the daemon) and
//! signing one (the CLI, for an agent holding its key file).
//!
//! Verification is in two steps because the keys to check a token against
//! depend on who it claims to be, and those keys live in the state database
//! (read asynchronously by the caller):
//! 1. [`Verifier::claimed_agent`] bounds the size, pins `alg` to `EdDSA` and
//!    reads the *unverified* `iss`, used only to pick the keys;
//! 2. [`Verifier::verify`] checks the signature against those keys (the
//!    `jsonwebtoken` crate, EdDSA only), then the claims, then spends the
//!    `jti` in the [`JtiLedger`].
//!
//! Header keys that point at key material (`jku`, `x5u`, `jwk`, `x5c`) are
//! never read: a token names its signer only through `iss` (and, at most,
//! picks one of that agent's configured keys with `kid`), so an attacker
//! cannot bring their own key.

use std::collections::HashSet;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::errors::ErrorKind as JwtErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::model::{SecretValue, Stage};
use crate::state::VersionRow;

/// The `aud` an assertion must carry unless `[daemon] assertion_audience`
/// says otherwise.
pub const DEFAULT_AUDIENCE: &str = "keyturn";
/// Clock skew tolerated on `exp`, `nbf` and `iat`.
pub const SKEW_SECS: u64 = 30;
/// The longest an assertion may live: a bearer token caught in transit is
/// worth little if it expires within minutes and can be used once.
pub const MAX_LIFETIME_SECS: i64 = 300;
/// Tokens longer than this are refused before any parsing.
pub const MAX_TOKEN_BYTES: usize = 8 * 1024;
/// The longest `jti` kept in the ledger.
pub const MAX_JTI_CHARS: usize = 128;

/// One public key an agent may sign with: a version of its `auth_key`
/// credential.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentKey {
    pub version: u64,
    /// SPKI PEM, as the ed25519 generator records it.
    pub public_pem: String,
}

impl AgentKey {
    /// The keys an assertion may be signed with, of a credential's
    /// versions: the current and the previous one (the overlap while a
    /// rotation is delivered), never a pending (not yet delivered) or a
    /// retired one. Current first.
    pub fn accepted(versions: &[VersionRow]) -> Vec<AgentKey> {
        let mut keys: Vec<(Stage, AgentKey)> = versions
            .iter()
            .filter(|v| matches!(v.stage, Stage::Current | Stage::Previous))
            .filter_map(|v| {
                Some((
                    v.stage,
                    AgentKey {
                        version: v.version,
                        public_pem: v.public.clone()?,
                    },
                ))
            })
            .collect();
        keys.sort_by_key(|(stage, k)| (*stage != Stage::Current, std::cmp::Reverse(k.version)));
        keys.into_iter().map(|(_, k)| k).collect()
    }
}

/// Where spent `jti`s are kept, so an assertion is used once. Durable:
/// a replay after a restart is refused too.
pub trait JtiLedger: Send + Sync {
    /// Records `jti` of `agent`, kept until `expires_at` (unix seconds);
    /// rows older than `now` may be pruned. `Ok(false)`: already spent.
    fn spend(&self, agent: &str, jti: &str, expires_at: i64, now: i64) -> Result<bool, String>;
}

/// What an accepted assertion proves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    /// The agent (its `iss` = `sub`).
    pub agent: String,
    pub jti: String,
    /// Unix seconds.
    pub exp: i64,
    /// The version of the key that signed it.
    pub key_version: u64,
    /// Its `aud`: one of the verifier's audiences, maybe others too.
    pub aud: Vec<String>,
}

impl Verified {
    /// How long its `jti` must be kept spent: until no clock within the
    /// skew would accept the assertion any more.
    pub fn keep_until(&self) -> i64 {
        self.exp.saturating_add(SKEW_SECS as i64)
    }
}

/// Why an assertion was refused. The text never holds the token; it says
/// which check failed and what a correct assertion looks like.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AssertionError {
    #[error("the assertion is {0} bytes; at most {MAX_TOKEN_BYTES} are accepted")]
    TooLarge(usize),
    #[error("the assertion is not a JWT ({0}); send header.payload.signature in base64url")]
    Malformed(String),
    #[error(
        "the assertion's claims do not decode as expected ({0}): every claim once, iat, exp and nbf numbers, the others strings"
    )]
    Undecodable(String),
    #[error("the assertion's alg {0:?} is refused: only EdDSA (Ed25519) is accepted")]
    Algorithm(String),
    #[error(
        "the assertion has no {0:?} claim; it needs iss = sub = the agent, aud, iat, exp and jti"
    )]
    MissingClaim(String),
    #[error("the assertion's iss {iss:?} and sub {sub:?} differ: both must name the agent")]
    IssNotSub { iss: String, sub: String },
    #[error(
        "the assertion's aud does not name {expected:?} (the token service also takes its issuer or token endpoint)"
    )]
    Audience { expected: String },
    #[error("the assertion has expired (exp is past, beyond {SKEW_SECS} s of clock skew)")]
    Expired,
    #[error("the assertion is not valid yet (nbf is in the future)")]
    NotYetValid,
    #[error("the assertion's iat is in the future (beyond {SKEW_SECS} s of clock skew)")]
    IssuedInFuture,
    #[error(
        "the assertion's lifetime is too long: exp must be at most {MAX_LIFETIME_SECS} s after iat and now"
    )]
    LifetimeTooLong,
    #[error("the assertion's jti is empty or longer than {MAX_JTI_CHARS} characters")]
    BadJti,
    #[error(
        "agent {0} has no key an assertion can be checked with (no `auth_key`, or no current version yet)"
    )]
    NoKey(String),
    #[error(
        "the assertion's kid {kid:?} names no accepted key of agent {agent} (accepted: the current and previous versions of its auth_key)"
    )]
    UnknownKid { agent: String, kid: String },
    #[error(
        "the assertion's signature does not match a current or previous key of agent {0}; sign with the key keyturn last delivered"
    )]
    BadSignature(String),
    #[error("the assertion's jti was already used: an assertion is single-use, sign a new one")]
    Replayed,
    #[error("the assertion's claims are invalid: {0}")]
    Invalid(String),
    #[error("cannot record the assertion's jti: {0}")]
    Ledger(String),
}

/// What [`Verifier::claimed_agent`] read, unverified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claimed {
    pub agent: String,
    pub kid: Option<String>,
}

/// Checks assertions for an audience (or one of a few).
#[derive(Debug, Clone)]
pub struct Verifier {
    /// Accepted `aud` values; the first is the one to name in messages.
    audiences: Vec<String>,
}

#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    iss: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    sub: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    aud: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    exp: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    iat: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    nbf: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    jti: Option<String>,
}

fn now_secs() -> i64 {
    i64::try_from(jsonwebtoken::get_current_timestamp()).unwrap_or(i64::MAX)
}

/// One base64url JSON segment as an object.
/// Whether the (unverified) payload of `token` has claim `name`.
fn claim_present(token: &str, name: &str) -> bool {
    token
        .split('.')
        .nth(1)
        .and_then(|p| segment(p, "payload").ok())
        .is_some_and(|claims| claims.contains_key(name))
}

fn segment(
    part: &str,
    what: &str,
) -> Result<serde_json::Map<String, serde_json::Value>, AssertionError> {
    let bytes = URL_SAFE_NO_PAD
        .decode(part.trim_end_matches('='))
        .map_err(|_| AssertionError::Malformed(format!("its {what} is not base64url")))?;
    match serde_json::from_slice(&bytes) {
        Ok(serde_json::Value::Object(m)) => Ok(m),
        _ => Err(AssertionError::Malformed(format!(
            "its {what} is not a JSON object"
        ))),
    }
}

impl Verifier {
    pub fn new(audience: impl Into<String>) -> Verifier {
        Verifier {
            audiences: vec![audience.into()],
        }
    }

    /// An assertion whose `aud` names any of `audiences` (not empty) is
    /// accepted: the token service takes its issuer or its token endpoint
    /// (RFC 7523 3).
    pub fn for_audiences(audiences: Vec<String>) -> Verifier {
        assert!(!audiences.is_empty(), "a verifier needs an audience");
        Verifier { audiences }
    }

    pub fn audience(&self) -> &str {
        &self.audiences[0]
    }

    /// The agent a token claims to be (its `iss`) and its `kid`, read
    /// WITHOUT checking the signature: only to find the keys to check it
    /// with. Refuses oversized tokens and any `alg` but `EdDSA` here, so
    /// nothing else is ever parsed further.
    pub fn claimed_agent(&self, token: &str) -> Result<Claimed, AssertionError> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(AssertionError::TooLarge(token.len()));
        }
        let parts: Vec<&str> = token.split('.').collect();
        let [header, payload, _signature] = parts.as_slice() else {
            return Err(AssertionError::Malformed(format!(
                "{} parts instead of 3",
                parts.len()
            )));
        };
        let header = segment(header, "header")?;
        match header.get("alg") {
            Some(serde_json::Value::String(a)) if a == "EdDSA" => {}
            Some(serde_json::Value::String(a)) => {
                return Err(AssertionError::Algorithm(a.chars().take(32).collect()));
            }
            _ => return Err(AssertionError::Algorithm("(missing)".into())),
        }
        let kid = match header.get("kid") {
            None => None,
            Some(serde_json::Value::String(k)) => Some(k.clone()),
            Some(_) => {
                return Err(AssertionError::Malformed("its kid is not a string".into()));
            }
        };
        let payload = segment(payload, "payload")?;
        match payload.get("iss") {
            Some(serde_json::Value::String(iss)) if !iss.is_empty() => Ok(Claimed {
                agent: iss.clone(),
                kid,
            }),
            _ => Err(AssertionError::MissingClaim("iss".into())),
        }
    }

    /// Checks `token`, which [`Self::claimed_agent`] said is `claimed`,
    /// against `keys` (that agent's accepted keys), then spends its `jti`
    /// in `ledger`. Only a token that passes every check spends its jti.
    pub fn verify(
        &self,
        token: &str,
        claimed: &Claimed,
        keys: &[AgentKey],
        ledger: &dyn JtiLedger,
    ) -> Result<Verified, AssertionError> {
        let v = self.check(token, claimed, keys)?;
        match ledger.spend(&v.agent, &v.jti, v.keep_until(), now_secs()) {
            Ok(true) => Ok(v),
            Ok(false) => Err(AssertionError::Replayed),
            Err(e) => Err(AssertionError::Ledger(e)),
        }
    }

    /// Every check of [`Self::verify`] but the spending of the `jti`: the
    /// caller spends it ([`Verified::keep_until`]) before acting on it, for
    /// example with other callers' in one durable write.
    pub fn check(
        &self,
        token: &str,
        claimed: &Claimed,
        keys: &[AgentKey],
    ) -> Result<Verified, AssertionError> {
        let agent = &claimed.agent;
        if keys.is_empty() {
            return Err(AssertionError::NoKey(agent.clone()));
        }
        let candidates: Vec<&AgentKey> = match &claimed.kid {
            None => keys.iter().collect(),
            Some(kid) => {
                let picked: Vec<&AgentKey> = keys
                    .iter()
                    .filter(|k| kid.trim_start_matches('v') == k.version.to_string())
                    .collect();
                if picked.is_empty() {
                    return Err(AssertionError::UnknownKid {
                        agent: agent.clone(),
                        kid: kid.chars().take(64).collect(),
                    });
                }
                picked
            }
        };
        let mut validation = Validation::new(Algorithm::EdDSA);
        validation.leeway = SKEW_SECS;
        validation.validate_nbf = true;
        validation.set_audience(&self.audiences);
        validation.set_required_spec_claims(&["exp", "aud", "iss", "sub"]);
        validation.iss = Some(HashSet::from([agent.clone()]));
        let mut last = AssertionError::BadSignature(agent.clone());
        let mut verified = None;
        for key in candidates {
            let Ok(decoding) = DecodingKey::from_ed_pem(key.public_pem.as_bytes()) else {
                tracing::warn!(agent = %agent, version = key.version, "an auth_key version holds no usable Ed25519 public key");
                continue;
            };
            match jsonwebtoken::decode::<Claims>(token, &decoding, &validation) {
                Ok(data) => {
                    verified = Some((data.claims, key.version));
                    break;
                }
                Err(e) => {
                    last = match self.map_error(agent, e.into_kind()) {
                        // jsonwebtoken says "missing" of a time it cannot
                        // read too (`exp: -1`): say which it is.
                        AssertionError::MissingClaim(c) if claim_present(token, &c) => {
                            AssertionError::Invalid(format!(
                                "{c} is not a non-negative integer (seconds since the epoch)"
                            ))
                        }
                        other => other,
                    };
                    // Another key may match; any other failure is about
                    // the claims, the same whichever key signed.
                    if !matches!(last, AssertionError::BadSignature(_)) {
                        return Err(last);
                    }
                }
            }
        }
        let Some((claims, key_version)) = verified else {
            return Err(last);
        };
        let sub = claims
            .sub
            .ok_or_else(|| AssertionError::MissingClaim("sub".into()))?;
        if &sub != agent {
            return Err(AssertionError::IssNotSub {
                iss: agent.clone(),
                sub: sub.chars().take(64).collect(),
            });
        }
        let exp = claims
            .exp
            .ok_or_else(|| AssertionError::MissingClaim("exp".into()))?;
        let iat = claims
            .iat
            .ok_or_else(|| AssertionError::MissingClaim("iat".into()))?;
        let jti = claims
            .jti
            .ok_or_else(|| AssertionError::MissingClaim("jti".into()))?;
        let now = now_secs();
        let skew = SKEW_SECS as i64;
        if iat > now.saturating_add(skew) {
            return Err(AssertionError::IssuedInFuture);
        }
        if exp.saturating_sub(iat) > MAX_LIFETIME_SECS
            || exp.saturating_sub(now) > MAX_LIFETIME_SECS + skew
        {
            return Err(AssertionError::LifetimeTooLong);
        }
        if jti.is_empty() || jti.chars().count() > MAX_JTI_CHARS {
            return Err(AssertionError::BadJti);
        }
        let aud = match claims.aud {
            Some(serde_json::Value::String(a)) => vec![a],
            Some(serde_json::Value::Array(list)) => list
                .into_iter()
                .filter_map(|a| a.as_str().map(str::to_owned))
                .collect(),
            _ => Vec::new(),
        };
        Ok(Verified {
            agent: agent.clone(),
            aud,
            jti,
            exp,
            key_version,
        })
    }

    fn map_error(&self, agent: &str, kind: JwtErrorKind) -> AssertionError {
        match kind {
            JwtErrorKind::InvalidSignature => AssertionError::BadSignature(agent.to_owned()),
            JwtErrorKind::InvalidAlgorithm | JwtErrorKind::InvalidAlgorithmName => {
                AssertionError::Algorithm("not EdDSA".into())
            }
            JwtErrorKind::MissingRequiredClaim(c) => AssertionError::MissingClaim(c),
            JwtErrorKind::ExpiredSignature => AssertionError::Expired,
            JwtErrorKind::ImmatureSignature => AssertionError::NotYetValid,
            // The first is the configured `assertion_audience`; the others
            // (the token service's issuers, which name its tenants) are not
            // told to a caller not yet authenticated.
            JwtErrorKind::InvalidAudience => AssertionError::Audience {
                expected: self.audiences.first().cloned().unwrap_or_default(),
            },
            JwtErrorKind::InvalidIssuer => AssertionError::Invalid("iss".into()),
            JwtErrorKind::InvalidSubject => AssertionError::Invalid("sub".into()),
            JwtErrorKind::InvalidClaimFormat(c) => {
                AssertionError::Invalid(format!("{c} has the wrong type"))
            }
            JwtErrorKind::Base64(_) => AssertionError::Malformed("it is not base64url".into()),
            JwtErrorKind::Json(e) => {
                AssertionError::Undecodable(e.to_string().chars().take(120).collect())
            }
            JwtErrorKind::Utf8(_) => AssertionError::Malformed("it is not UTF-8".into()),
            JwtErrorKind::InvalidToken => AssertionError::Malformed("invalid token".into()),
            _ => AssertionError::Invalid("it cannot be checked".into()),
        }
    }
}

/// Signs a fresh assertion for `agent` with its private key (PKCS#8 PEM,
/// as the ed25519 generator delivers it): random `jti`, `iat` = now,
/// `exp` = now + `lifetime_secs`. The token is a bearer credential for as
/// long as it lives, so it is returned as a secret.
pub fn sign(
    private_pem: &SecretValue,
    agent: &str,
    audience: &str,
    lifetime_secs: i64,
) -> Result<SecretValue, AssertionError> {
    use rand::RngCore;
    let key = EncodingKey::from_ed_pem(private_pem.expose()).map_err(|_| {
        AssertionError::Malformed(
            "the key file is not an Ed25519 private key in PKCS#8 PEM (the file keyturn delivers for an ed25519 credential)".into(),
        )
    })?;
    let mut id = [0u8; 16];
    rand::rngs::OsRng.fill_bytes(&mut id);
    let now = now_secs();
    let claims = Claims {
        iss: Some(agent.to_owned()),
        sub: Some(agent.to_owned()),
        aud: Some(serde_json::Value::String(audience.to_owned())),
        exp: Some(now + lifetime_secs),
        iat: Some(now),
        nbf: None,
        jti: Some(hex::encode(id)),
    };
    let token = jsonwebtoken::encode(&Header::new(Algorithm::EdDSA), &claims, &key)
        .map_err(|e| AssertionError::Invalid(format!("cannot sign: {e}")))?;
    Ok(SecretValue::from_string(token))
}
