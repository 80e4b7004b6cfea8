//! Validating the human's subject token (RFC 8693 `subject_token`): a JWT
//! access token from a configured identity provider.
//!
//! The order matters. Everything that can be checked without a key is
//! checked first, on input that is bounded before it is parsed: the size,
//! the compact form, duplicate JSON members, `alg` against the issuer's
//! pinned list (so `none` and HMAC never reach a verifier), `crit`, `typ`.
//! Then the key is chosen by `kid` from the issuer's own key set only —
//! `jku`, `x5u`, `jwk` and `x5c` in the header are never read, so a token
//! cannot bring its own key — and must be of a type that fits `alg`. Only
//! then jsonwebtoken verifies the signature and the registered claims
//! (`iss` exact, `aud`, `exp` required, `nbf`, with the configured skew);
//! `iat` is checked here, as jsonwebtoken does not.

use std::sync::Arc;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, Validation};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use super::config::{SubjectIssuerConfig, normalize_typ};
use super::jwks::{Jwks, JwksError, Lookup, UsableKey, shown};
use super::strict_json;

/// The largest subject token accepted, checked before anything is decoded.
pub const MAX_TOKEN_BYTES: usize = 16 * 1024;

/// What a valid subject token says, with the tenant of its issuer.
#[derive(Debug, Clone, PartialEq)]
pub struct Subject {
    /// The `NAME` of the `[token_service.subject_issuers.NAME]` that accepted it.
    pub issuer_name: String,
    pub iss: String,
    pub sub: String,
    pub aud: Vec<String>,
    /// Seconds since the epoch.
    pub exp: u64,
    pub iat: Option<u64>,
    /// `scope` (space-separated) or `scp` (an array), as a list.
    pub scope: Vec<String>,
    /// `act` as the token has it (an earlier delegation, nested), kept whole.
    pub act: Option<Map<String, Value>>,
    /// `may_act`: who may act for the subject, when the token says.
    pub may_act: Option<Map<String, Value>>,
    pub client_id: Option<String>,
    pub jti: Option<String>,
    /// The tenant the issuer's subjects belong to.
    pub tenant: String,
}

/// Why a subject token was refused. The message says what is wrong and
/// never contains the token or any part of it but short, escaped header
/// and claim values (`kid`, `alg`, `typ`, `iss`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubjectError {
    #[error("the subject token is {len} bytes; at most {MAX_TOKEN_BYTES} are accepted")]
    TooLarge { len: usize },
    #[error("the subject token is not a signed JWT in compact form: {0}")]
    Malformed(String),
    #[error("the subject token's {part} has a duplicate member: {detail}")]
    DuplicateMember { part: &'static str, detail: String },
    #[error("the subject token is unsigned (alg `none`); only signed tokens are accepted")]
    Unsigned,
    #[error("algorithm `{alg}` is not accepted for issuer `{issuer}`; it is pinned to {pinned}")]
    AlgorithmNotAllowed {
        alg: String,
        issuer: String,
        pinned: String,
    },
    #[error(
        "the subject token's `alg` {alg} does not fit its key{kid} ({key_type}, for {key_algs})"
    )]
    AlgorithmKeyMismatch {
        alg: String,
        kid: String,
        key_type: &'static str,
        key_algs: String,
    },
    #[error(
        "the subject token has a `crit` header: keyturn understands no JWS extension, so it must refuse it (RFC 7515 section 4.1.11)"
    )]
    CriticalHeader,
    #[error(
        "the subject token's `typ` is {found}; issuer `{issuer}` accepts {expected} (RFC 9068 access tokens are `at+jwt`; an ID token is not an access token)"
    )]
    WrongType {
        found: String,
        issuer: String,
        expected: String,
    },
    #[error(
        "the subject token names no `kid` and issuer `{issuer}` has {keys} keys: the identity provider must set `kid`"
    )]
    KidRequired { issuer: String, keys: usize },
    #[error(
        "no key of issuer `{issuer}` has kid \"{kid}\" (the key set was refreshed at most once for it)"
    )]
    UnknownKey { issuer: String, kid: String },
    #[error("issuer `{issuer}` has no usable key{why}")]
    NoKeys { issuer: String, why: String },
    #[error("the subject token's signature does not verify with issuer `{issuer}`'s key{kid}")]
    BadSignature { issuer: String, kid: String },
    #[error(
        "the subject token has expired (`exp` is past, beyond the allowed skew of {skew_secs}s)"
    )]
    Expired { skew_secs: u64 },
    #[error(
        "the subject token is not valid yet (`nbf` is in the future, beyond the allowed skew of {skew_secs}s)"
    )]
    NotYetValid { skew_secs: u64 },
    #[error(
        "the subject token was issued in the future (`iat` is ahead of this host's clock by more than the allowed skew of {skew_secs}s)"
    )]
    IssuedInFuture { skew_secs: u64 },
    #[error("the subject token's `iss` is not `{expected}`")]
    WrongIssuer { expected: String },
    #[error(
        "the subject token's issuer \"{iss}\" is not configured in [token_service.subject_issuers]"
    )]
    UnknownIssuer { iss: String },
    #[error("the subject token's `aud` does not contain {expected}")]
    WrongAudience { expected: String },
    #[error("the subject token has no `{0}` claim, which is required")]
    MissingClaim(String),
    #[error("the subject token's `{claim}` claim is invalid: {why}")]
    InvalidClaim { claim: String, why: String },
}

impl SubjectError {
    /// The OAuth error code of a token-exchange response refusing this
    /// subject token. RFC 8693 section 2.2.2: when the `subject_token` is
    /// "invalid for any reason, or [is] unacceptable based on policy", the
    /// `error` "MUST be the invalid_request error code" — not
    /// `invalid_grant`, which RFC 6749 keeps for authorization grants.
    pub fn oauth_error(&self) -> &'static str {
        "invalid_request"
    }
}

/// A token split and decoded, not yet verified.
#[derive(Debug)]
pub struct Unverified<'t> {
    token: &'t str,
    header: Map<String, Value>,
    claims: Map<String, Value>,
    alg_name: String,
}

impl<'t> Unverified<'t> {
    /// Size, compact form, base64url, strict JSON of both parts; `alg` is
    /// read and refused when it is `none`.
    pub fn parse(token: &'t str) -> Result<Self, SubjectError> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(SubjectError::TooLarge { len: token.len() });
        }
        let mut parts = token.split('.');
        let (Some(h), Some(c), Some(_sig), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(SubjectError::Malformed(
                "expected three base64url parts separated by `.` (an encrypted JWT has five and is not accepted)".to_owned(),
            ));
        };
        let header = decode_part(h, "header")?;
        let alg_name = match header.get("alg") {
            Some(Value::String(a)) => a.clone(),
            Some(_) => return Err(SubjectError::Malformed("`alg` is not a string".to_owned())),
            None => {
                return Err(SubjectError::Malformed(
                    "the header has no `alg`".to_owned(),
                ));
            }
        };
        if alg_name.eq_ignore_ascii_case("none") {
            return Err(SubjectError::Unsigned);
        }
        let claims = decode_part(c, "claims")?;
        Ok(Unverified {
            token,
            header,
            claims,
            alg_name,
        })
    }

    /// The unverified `iss` (to choose the issuer; checked again after).
    pub fn iss(&self) -> Option<&str> {
        self.claims.get("iss").and_then(Value::as_str)
    }
}

fn decode_part(part: &str, name: &'static str) -> Result<Map<String, Value>, SubjectError> {
    let bytes = URL_SAFE_NO_PAD.decode(part).map_err(|_| {
        SubjectError::Malformed(format!("the {name} is not base64url without padding"))
    })?;
    match strict_json::parse(&bytes) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(SubjectError::Malformed(format!(
            "the {name} is not a JSON object"
        ))),
        Err(e) if e.to_string().starts_with(strict_json::DUPLICATE) => {
            Err(SubjectError::DuplicateMember {
                part: name,
                detail: e.to_string(),
            })
        }
        Err(e) => Err(SubjectError::Malformed(format!(
            "the {name} is not JSON: {e}"
        ))),
    }
}

/// One configured issuer with its keys.
#[derive(Debug)]
pub struct SubjectIssuer {
    config: SubjectIssuerConfig,
    jwks: Arc<Jwks>,
}

impl SubjectIssuer {
    /// An issuer whose key set is `jwks` (loaded, or loaded on first use).
    pub fn new(config: SubjectIssuerConfig, jwks: Arc<Jwks>) -> Self {
        SubjectIssuer { config, jwks }
    }

    /// An issuer with its own key set, not loaded yet.
    pub fn from_config(config: SubjectIssuerConfig) -> Result<Self, JwksError> {
        let jwks = Jwks::new(config.jwks.clone(), config.algorithms.clone())?;
        Ok(Self::new(config, Arc::new(jwks)))
    }

    pub fn config(&self) -> &SubjectIssuerConfig {
        &self.config
    }

    pub fn jwks(&self) -> &Arc<Jwks> {
        &self.jwks
    }

    /// Validates a subject token meant for this issuer.
    pub async fn validate(&self, token: &str) -> Result<Subject, SubjectError> {
        let t = Unverified::parse(token)?;
        self.verify(&t).await
    }

    /// Verifies a parsed token against this issuer's rules and keys.
    pub async fn verify(&self, t: &Unverified<'_>) -> Result<Subject, SubjectError> {
        self.verify_keyed(t).await.map(|(subject, _)| subject)
    }

    /// [`Self::verify`], also answering the key that verified the token.
    async fn verify_keyed(
        &self,
        t: &Unverified<'_>,
    ) -> Result<(Subject, Arc<UsableKey>), SubjectError> {
        let c = &self.config;
        let alg = c
            .algorithms
            .iter()
            .copied()
            .find(|a| alg_name(*a) == t.alg_name)
            .ok_or_else(|| SubjectError::AlgorithmNotAllowed {
                alg: shown(&t.alg_name),
                issuer: c.name.clone(),
                pinned: alg_names(&c.algorithms),
            })?;
        if t.header.contains_key("crit") {
            return Err(SubjectError::CriticalHeader);
        }
        let typ = match t.header.get("typ") {
            Some(Value::String(s)) => Some(s.as_str()),
            Some(_) => return Err(SubjectError::Malformed("`typ` is not a string".to_owned())),
            None => None,
        };
        // Compared as sent: `at+jwt ` is not `at+jwt` (only case and an
        // `application/` prefix are insignificant, RFC 7515 4.1.9).
        if !typ.is_some_and(|s| s.trim() == s && c.typ.contains(&normalize_typ(s))) {
            return Err(SubjectError::WrongType {
                found: typ.map_or("missing".to_owned(), |s| format!("\"{}\"", shown(s))),
                issuer: c.name.clone(),
                expected: c
                    .typ
                    .iter()
                    .map(|t| format!("\"{t}\""))
                    .collect::<Vec<_>>()
                    .join(", "),
            });
        }
        let kid = match t.header.get("kid") {
            Some(Value::String(s)) => Some(s.as_str()),
            Some(_) => return Err(SubjectError::Malformed("`kid` is not a string".to_owned())),
            None => None,
        };
        let kid_shown = kid.map_or(String::new(), |k| format!(" \"{}\"", shown(k)));

        let mut found = self.jwks.keys().find(kid);
        if let Err(Lookup::UnknownKid | Lookup::Empty) = found {
            // Rotation: the identity provider may have published a new key
            // since the last load. At most one load per floor.
            self.jwks.load_for_unknown_kid(kid).await;
            found = self.jwks.keys().find(kid);
        }
        let key = match found {
            Ok(k) => k,
            Err(Lookup::KidRequired { keys }) => {
                return Err(SubjectError::KidRequired {
                    issuer: c.name.clone(),
                    keys,
                });
            }
            Err(Lookup::UnknownKid) => {
                return Err(SubjectError::UnknownKey {
                    issuer: c.name.clone(),
                    kid: shown(kid.unwrap_or_default()),
                });
            }
            Err(Lookup::Empty) => {
                return Err(SubjectError::NoKeys {
                    issuer: c.name.clone(),
                    why: self.jwks.last_error().map_or(String::new(), |e| {
                        format!(" (the key set could not be loaded: {e})")
                    }),
                });
            }
        };
        if !key.algorithms.contains(&alg) {
            return Err(SubjectError::AlgorithmKeyMismatch {
                alg: alg_name(alg),
                kid: kid_shown,
                key_type: key.key_type.name(),
                key_algs: alg_names(&key.algorithms),
            });
        }
        debug_assert!(key.key_type.algorithms().contains(&alg));

        let skew = c.skew.as_secs();
        let mut v = Validation::new(alg);
        v.leeway = skew;
        v.validate_exp = true;
        v.validate_nbf = true;
        v.validate_aud = true;
        v.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        v.set_issuer(&[c.issuer.as_str()]);
        v.set_audience(&c.audience);
        // The claims were parsed strictly above; jsonwebtoken verifies the
        // signature over the exact bytes and the registered claims.
        jsonwebtoken::decode::<Value>(t.token, &key.key, &v).map_err(|e| {
            use jsonwebtoken::errors::ErrorKind as K;
            match e.kind() {
                K::InvalidSignature => SubjectError::BadSignature {
                    issuer: c.name.clone(),
                    kid: kid_shown.clone(),
                },
                K::ExpiredSignature => SubjectError::Expired { skew_secs: skew },
                K::ImmatureSignature => SubjectError::NotYetValid { skew_secs: skew },
                K::InvalidIssuer => SubjectError::WrongIssuer {
                    expected: c.issuer.clone(),
                },
                K::InvalidAudience => SubjectError::WrongAudience {
                    expected: audiences(&c.audience),
                },
                // jsonwebtoken says "missing" of a claim it cannot read too
                // (`exp` a string, or beyond u64): say which it is.
                K::MissingRequiredClaim(claim) if t.claims.contains_key(claim.as_str()) => {
                    SubjectError::InvalidClaim {
                        claim: claim.clone(),
                        why: match claim.as_str() {
                            "exp" | "nbf" | "iat" => {
                                "not a non-negative integer (seconds since the epoch)"
                            }
                            _ => "wrong type",
                        }
                        .to_owned(),
                    }
                }
                K::MissingRequiredClaim(claim) => SubjectError::MissingClaim(claim.clone()),
                K::InvalidClaimFormat(claim) => SubjectError::InvalidClaim {
                    claim: claim.clone(),
                    why: "wrong type".to_owned(),
                },
                K::InvalidAlgorithm => SubjectError::AlgorithmKeyMismatch {
                    alg: alg_name(alg),
                    kid: kid_shown.clone(),
                    key_type: key.key_type.name(),
                    key_algs: alg_names(&key.algorithms),
                },
                K::Base64(_) => SubjectError::Malformed(
                    "the signature is not base64url without padding".to_owned(),
                ),
                // jsonwebtoken's own messages name no token content.
                other => SubjectError::Malformed(format!("{other:?}").chars().take(120).collect()),
            }
        })?;
        Ok((self.subject(&t.claims, skew)?, key))
    }

    /// What to remember of `t`, which [`Self::verify_keyed`] accepted as
    /// `subject`, verified with `key`.
    fn verified(
        t: &Unverified<'_>,
        issuer: usize,
        key: Arc<UsableKey>,
        subject: &Subject,
    ) -> Verified {
        Verified {
            issuer,
            kid: t
                .header
                .get("kid")
                .and_then(Value::as_str)
                .map(str::to_owned),
            key,
            nbf: t.claims.get("nbf").and_then(Value::as_u64),
            subject: subject.clone(),
        }
    }

    /// The claims of a verified token as a [`Subject`].
    fn subject(&self, claims: &Map<String, Value>, skew: u64) -> Result<Subject, SubjectError> {
        let invalid = |claim: &str, why: &str| SubjectError::InvalidClaim {
            claim: claim.to_owned(),
            why: why.to_owned(),
        };
        let string = |name: &str| -> Result<Option<String>, SubjectError> {
            match claims.get(name) {
                None => Ok(None),
                Some(Value::String(s)) => Ok(Some(s.clone())),
                Some(_) => Err(invalid(name, "not a string")),
            }
        };
        let number = |name: &str| -> Result<Option<u64>, SubjectError> {
            match claims.get(name) {
                None => Ok(None),
                Some(v) => v.as_u64().map(Some).ok_or_else(|| {
                    invalid(name, "not a non-negative integer (seconds since the epoch)")
                }),
            }
        };
        let object = |name: &str| -> Result<Option<Map<String, Value>>, SubjectError> {
            match claims.get(name) {
                None => Ok(None),
                Some(Value::Object(m)) => Ok(Some(m.clone())),
                Some(_) => Err(invalid(name, "not a JSON object")),
            }
        };
        let iss = string("iss")?.ok_or_else(|| SubjectError::MissingClaim("iss".to_owned()))?;
        let sub = string("sub")?.ok_or_else(|| SubjectError::MissingClaim("sub".to_owned()))?;
        if sub.is_empty() {
            return Err(invalid("sub", "empty"));
        }
        let aud = match claims.get("aud") {
            Some(Value::String(s)) => vec![s.clone()],
            Some(Value::Array(a)) => a
                .iter()
                .map(|v| v.as_str().map(str::to_owned))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| invalid("aud", "not a string or an array of strings"))?,
            _ => return Err(invalid("aud", "not a string or an array of strings")),
        };
        let exp = number("exp")?.ok_or_else(|| SubjectError::MissingClaim("exp".to_owned()))?;
        number("nbf")?;
        // Required, as RFC 9068 requires it of a JWT access token: a token
        // that does not say when it was made cannot be told from one made
        // before a key or a policy changed.
        let iat = number("iat")?.ok_or_else(|| SubjectError::MissingClaim("iat".to_owned()))?;
        let now = jsonwebtoken::get_current_timestamp();
        if iat > now.saturating_add(skew) {
            return Err(SubjectError::IssuedInFuture { skew_secs: skew });
        }
        let iat = Some(iat);
        let scope = match (claims.get("scope"), claims.get("scp")) {
            (Some(_), Some(_)) => {
                return Err(invalid(
                    "scp",
                    "both `scope` and `scp` are present; a token carries one",
                ));
            }
            (Some(Value::String(s)), None) => s
                .split(' ')
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect(),
            (Some(_), None) => return Err(invalid("scope", "not a space-separated string")),
            (None, Some(Value::Array(a))) => a
                .iter()
                .map(|v| v.as_str().map(str::to_owned))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| invalid("scp", "not an array of strings"))?,
            (None, Some(Value::String(s))) => s
                .split(' ')
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect(),
            (None, Some(_)) => return Err(invalid("scp", "not an array of strings")),
            (None, None) => Vec::new(),
        };
        let act = object("act")?;
        if let Some(a) = &act
            && !a.get("sub").is_some_and(Value::is_string)
        {
            return Err(invalid("act", "an actor without a string `sub`"));
        }
        Ok(Subject {
            issuer_name: self.config.name.clone(),
            iss,
            sub,
            aud,
            exp,
            iat,
            scope,
            act,
            may_act: object("may_act")?,
            client_id: string("client_id")?,
            jti: string("jti")?,
            tenant: self.config.tenant.clone(),
        })
    }
}

/// How many verified subject tokens [`SubjectTokens`] remembers.
pub const VERIFIED_CACHE_ENTRIES: usize = 4096;

/// A subject token that verified: what it said, and the key that verified
/// it, which must still be its issuer's for the result to stand.
#[derive(Debug, Clone)]
struct Verified {
    issuer: usize,
    kid: Option<String>,
    key: Arc<UsableKey>,
    nbf: Option<u64>,
    subject: Subject,
}

/// Every configured subject issuer, found by a token's exact `iss`.
///
/// An agent acting for a human presents the same subject token in every
/// exchange until it expires, so the tokens that verified are remembered,
/// by the SHA-256 of their exact bytes (never the token itself): the same
/// bytes again skip the parse and the signature check. Nothing else is
/// skipped. The result stands only while the key that verified it is still
/// the one its issuer's key set holds under that `kid` (a key set reloaded
/// without it, or with another key under the name, verifies again), and
/// `exp`, `nbf` and `iat` are checked against the clock again each time,
/// with the same skew. Refusals are not remembered.
#[derive(Debug)]
pub struct SubjectTokens {
    issuers: Vec<SubjectIssuer>,
    verified: quick_cache::sync::Cache<[u8; 32], Arc<Verified>>,
}

impl Default for SubjectTokens {
    fn default() -> Self {
        Self::new(Vec::new())
    }
}

impl SubjectTokens {
    pub fn new(issuers: Vec<SubjectIssuer>) -> Self {
        SubjectTokens {
            issuers,
            verified: quick_cache::sync::Cache::new(VERIFIED_CACHE_ENTRIES),
        }
    }

    pub fn issuers(&self) -> &[SubjectIssuer] {
        &self.issuers
    }

    /// How many verified tokens are remembered now.
    pub fn remembered(&self) -> usize {
        self.verified.len()
    }

    /// Validates a subject token with the issuer its `iss` names; a token
    /// from an issuer that is not configured is refused before any key is
    /// looked at.
    pub async fn validate(&self, token: &str) -> Result<Subject, SubjectError> {
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        if let Some(v) = self.verified.get(&digest) {
            match self.still_valid(&v) {
                Some(Ok(())) => return Ok(v.subject.clone()),
                Some(Err(e)) => return Err(e),
                // Its key changed: verified from scratch below.
                None => {
                    self.verified.remove(&digest);
                }
            }
        }
        let (issuer, t) = self.issuer_of(token)?;
        let (subject, key) = self.issuers[issuer].verify_keyed(&t).await?;
        let v = SubjectIssuer::verified(&t, issuer, key, &subject);
        self.verified.insert(digest, Arc::new(v));
        Ok(subject)
    }

    /// A remembered token checked again: `None` when its issuer's key set
    /// no longer holds the key that verified it under its `kid`, else the
    /// time checks' result.
    fn still_valid(&self, v: &Verified) -> Option<Result<(), SubjectError>> {
        let issuer = self.issuers.get(v.issuer)?;
        let key = issuer.jwks.keys().find(v.kid.as_deref()).ok()?;
        if !Arc::ptr_eq(&key, &v.key) {
            return None;
        }
        let skew = issuer.config.skew.as_secs();
        let now = jsonwebtoken::get_current_timestamp();
        // As jsonwebtoken checks them, and `iat` as `subject` does.
        Some(if v.subject.exp < now.saturating_sub(skew) {
            Err(SubjectError::Expired { skew_secs: skew })
        } else if v.nbf.is_some_and(|nbf| nbf > now.saturating_add(skew)) {
            Err(SubjectError::NotYetValid { skew_secs: skew })
        } else if v
            .subject
            .iat
            .is_some_and(|iat| iat > now.saturating_add(skew))
        {
            Err(SubjectError::IssuedInFuture { skew_secs: skew })
        } else {
            Ok(())
        })
    }

    /// The token parsed, with the index of the issuer its `iss` names.
    fn issuer_of<'t>(&self, token: &'t str) -> Result<(usize, Unverified<'t>), SubjectError> {
        let t = Unverified::parse(token)?;
        let iss = match t.claims.get("iss") {
            Some(Value::String(s)) => s.as_str(),
            Some(_) => {
                return Err(SubjectError::InvalidClaim {
                    claim: "iss".to_owned(),
                    why: "not a string".to_owned(),
                });
            }
            None => return Err(SubjectError::MissingClaim("iss".to_owned())),
        };
        let Some(issuer) = self.issuers.iter().position(|i| i.config.issuer == iss) else {
            return Err(SubjectError::UnknownIssuer { iss: shown(iss) });
        };
        Ok((issuer, t))
    }

    /// Loads every issuer's key set once and keeps refreshing them every
    /// `refresh` until `cancel`. A set that fails to load is retried on the
    /// schedule (and on an unknown `kid`); its error is logged. The first
    /// loads run side by side, and this waits for them at most
    /// [`START_WAIT`]: a JWKS file is read in milliseconds, but an identity
    /// provider that does not answer must not hold up the daemon's start
    /// (black-box finding: 10 s per issuer, one after another, before the
    /// listener or any rotation ran). A load still running goes on; an
    /// exchange meanwhile waits for it (see [`Jwks::load_for_unknown_kid`]).
    pub async fn start(&self, cancel: &tokio_util::sync::CancellationToken) {
        let mut loads = Vec::with_capacity(self.issuers.len());
        for i in &self.issuers {
            let (jwks, every, cancel) = (i.jwks.clone(), i.config.refresh, cancel.clone());
            let (loaded, done) = tokio::sync::oneshot::channel::<()>();
            tokio::spawn(async move {
                let _ = jwks.load().await;
                let _ = loaded.send(());
                jwks.spawn_refresh(every, cancel);
            });
            loads.push(done);
        }
        let _ = tokio::time::timeout(START_WAIT, futures::future::join_all(loads)).await;
    }
}

/// How long [`SubjectTokens::start`] waits for the first loads of the key
/// sets.
pub const START_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// An algorithm's JOSE name (`EdDSA`, `ES256`, ...): its variant name.
fn alg_name(a: Algorithm) -> String {
    format!("{a:?}")
}

/// The names of `algs`, comma-separated, for an error message.
fn alg_names(algs: &[Algorithm]) -> String {
    algs.iter()
        .map(|a| alg_name(*a))
        .collect::<Vec<_>>()
        .join(", ")
}

fn audiences(a: &[String]) -> String {
    a.iter()
        .map(|a| format!("`{a}`"))
        .collect::<Vec<_>>()
        .join(" or ")
}
