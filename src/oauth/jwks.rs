//! An issuer's JSON Web Key Set: loaded from a file or fetched over HTTPS,
//! kept by `kid`, refreshed on a schedule and, for a `kid` it does not know,
//! at most once per [`UNKNOWN_KID_FLOOR`] — never once per request, or every
//! forged token would make keyturn hit the identity provider.
//!
//! A refresh that fails keeps the set it had: an identity provider that is
//! down for a minute must not make every subject token invalid. Keys that
//! cannot verify any of the issuer's pinned algorithms (wrong `kty`, curve,
//! `alg` or `use`) are left out when the set is read, so a token can only
//! ever be checked with a key that fits an algorithm the operator chose.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use super::config::JwksSource;
use super::strict_json;

/// The most a key set may weigh (file or HTTP body).
pub const MAX_JWKS_BYTES: usize = 256 * 1024;
/// A `kid` not in the set triggers a refresh at most this often.
pub const UNKNOWN_KID_FLOOR: Duration = Duration::from_secs(30);
/// Connect and whole-request timeout of a fetch.
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(10);

/// What kind of key a JWK holds, as far as the pinned algorithms go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyType {
    Rsa,
    P256,
    Ed25519,
}

impl KeyType {
    /// The algorithms a key of this type can verify.
    pub fn algorithms(self) -> &'static [Algorithm] {
        match self {
            KeyType::Rsa => &[Algorithm::RS256, Algorithm::PS256],
            KeyType::P256 => &[Algorithm::ES256],
            KeyType::Ed25519 => &[Algorithm::EdDSA],
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            KeyType::Rsa => "RSA",
            KeyType::P256 => "EC P-256",
            KeyType::Ed25519 => "OKP Ed25519",
        }
    }
}

/// One key that can verify at least one pinned algorithm.
pub struct UsableKey {
    pub kid: Option<String>,
    pub key_type: KeyType,
    /// The pinned algorithms this key may verify: its type's, narrowed to
    /// its own `alg` when the JWK names one.
    pub algorithms: Vec<Algorithm>,
    pub key: DecodingKey,
}

impl std::fmt::Debug for UsableKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UsableKey")
            .field("kid", &self.kid)
            .field("key_type", &self.key_type)
            .field("algorithms", &self.algorithms)
            .finish_non_exhaustive()
    }
}

/// The usable keys of one set.
#[derive(Debug, Default)]
pub struct KeySet {
    by_kid: HashMap<String, Arc<UsableKey>>,
    /// Usable keys without a `kid` (usable only when the set has one key).
    unnamed: Vec<Arc<UsableKey>>,
    /// Keys left out (type, curve, `alg` or `use` unusable).
    pub skipped: usize,
}

/// Why a key set could not be loaded. Never holds key material.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum JwksError {
    #[error("reading {path}: {error}")]
    Read { path: String, error: String },
    #[error("fetching {url}: {error}")]
    Fetch { url: String, error: String },
    #[error("{source_name} is larger than {MAX_JWKS_BYTES} bytes")]
    TooLarge { source_name: String },
    #[error("{source_name} is not a JSON Web Key Set: {error}")]
    Invalid { source_name: String, error: String },
}

/// A key lookup that found nothing usable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    /// The token names a `kid` the set does not have.
    UnknownKid,
    /// The token names no `kid` and the set has several keys.
    KidRequired { keys: usize },
    /// The set has no usable key at all.
    Empty,
}

impl KeySet {
    /// Reads a JWKS document; `pinned` are the issuer's algorithms.
    pub fn parse(bytes: &[u8], pinned: &[Algorithm], source_name: &str) -> Result<Self, JwksError> {
        let invalid = |error: String| JwksError::Invalid {
            source_name: source_name.to_owned(),
            error,
        };
        let doc = strict_json::parse(bytes).map_err(|e| invalid(e.to_string()))?;
        let Some(Value::Array(keys)) = doc.get("keys") else {
            return Err(invalid("no `keys` array".to_owned()));
        };
        let mut set = KeySet::default();
        for k in keys {
            // One key this version of keyturn cannot read (a new kty, a
            // malformed entry) makes that key unusable, not the whole set.
            let usable = serde_json::from_value::<Jwk>(k.clone())
                .ok()
                .and_then(|jwk| usable(&jwk, pinned));
            let Some(key) = usable else {
                set.skipped += 1;
                continue;
            };
            match key.kid.clone() {
                Some(kid) => {
                    if set.by_kid.contains_key(&kid) {
                        return Err(invalid(format!(
                            "two keys have kid {:?}: a token naming it could be checked with either",
                            shown(&kid)
                        )));
                    }
                    set.by_kid.insert(kid, Arc::new(key));
                }
                None => set.unnamed.push(Arc::new(key)),
            }
        }
        if set.is_empty() {
            // Taken as a failed load, so the previous keys stay: a set that
            // suddenly has nothing keyturn may use is a misconfiguration or
            // a broken deployment at the identity provider, not a reason to
            // refuse every subject token.
            return Err(invalid(format!(
                "none of its {} keys can verify the pinned algorithms ({})",
                keys.len(),
                pinned
                    .iter()
                    .map(|a| format!("{a:?}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        Ok(set)
    }

    /// How many usable keys the set has.
    pub fn len(&self) -> usize {
        self.by_kid.len() + self.unnamed.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The key for a token's `kid`. The `kid` is only ever a map key: it is
    /// never a path, a URL or part of a query.
    pub fn find(&self, kid: Option<&str>) -> Result<Arc<UsableKey>, Lookup> {
        if self.is_empty() {
            return Err(Lookup::Empty);
        }
        match kid {
            Some(kid) => self.by_kid.get(kid).cloned().ok_or(Lookup::UnknownKid),
            None if self.len() == 1 => Ok(self
                .by_kid
                .values()
                .chain(self.unnamed.iter())
                .next()
                .cloned()
                .expect("one key")),
            None => Err(Lookup::KidRequired { keys: self.len() }),
        }
    }

    /// Whether the set has a key with this `kid`.
    pub fn has_kid(&self, kid: &str) -> bool {
        self.by_kid.contains_key(kid)
    }
}

/// The key of `jwk` when it can verify one of `pinned`.
fn usable(jwk: &Jwk, pinned: &[Algorithm]) -> Option<UsableKey> {
    if let Some(u) = &jwk.common.public_key_use
        && *u != PublicKeyUse::Signature
    {
        return None;
    }
    let key_type = match &jwk.algorithm {
        AlgorithmParameters::RSA(rsa) => {
            // The verifier refuses a modulus under 2048 bits as a bad
            // signature: say what is wrong with the key instead, once, as
            // the set is loaded.
            let bits = rsa_bits(&rsa.n);
            if bits < MIN_RSA_BITS {
                tracing::warn!(kid = %shown(jwk.common.key_id.as_deref().unwrap_or("")), bits, "an RSA key of the subject issuer's key set is not used: it has {bits} bits, and at least {MIN_RSA_BITS} are needed");
                return None;
            }
            KeyType::Rsa
        }
        AlgorithmParameters::EllipticCurve(p) if p.curve == EllipticCurve::P256 => KeyType::P256,
        AlgorithmParameters::OctetKeyPair(p) if p.curve == EllipticCurve::Ed25519 => {
            KeyType::Ed25519
        }
        // Symmetric keys ("oct") and every other curve or type.
        _ => return None,
    };
    let mut algorithms: Vec<Algorithm> = key_type
        .algorithms()
        .iter()
        .copied()
        .filter(|a| pinned.contains(a))
        .collect();
    if let Some(alg) = jwk.common.key_algorithm {
        // The JWK's own `alg` narrows it further; an `alg` that is not one
        // of its type's (an RSA key saying ES256) makes it unusable.
        let named = alg.to_string().parse::<Algorithm>().ok();
        algorithms.retain(|a| Some(*a) == named);
    }
    if algorithms.is_empty() {
        return None;
    }
    let key = DecodingKey::from_jwk(jwk).ok()?;
    Some(UsableKey {
        kid: jwk.common.key_id.clone(),
        key_type,
        algorithms,
        key,
    })
}

/// The smallest RSA modulus used (as the signature verifier requires).
const MIN_RSA_BITS: usize = 2048;

/// The bits of an RSA modulus given as base64url (0 when it does not decode).
fn rsa_bits(n: &str) -> usize {
    use base64::Engine as _;
    let Ok(bytes) =
        base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(n.trim_end_matches('='))
    else {
        return 0;
    };
    match bytes.iter().position(|b| *b != 0) {
        Some(first) => (bytes.len() - first) * 8 - bytes[first].leading_zeros() as usize,
        None => 0,
    }
}

/// An untrusted string shown in a message: at most 64 characters, escaped.
pub(crate) fn shown(s: &str) -> String {
    let mut out: String = s
        .chars()
        .take(64)
        .collect::<String>()
        .escape_debug()
        .to_string();
    if s.chars().count() > 64 {
        out.push('…');
    }
    out
}

/// Counters of one issuer's key set (for metrics and tests).
#[derive(Debug, Default)]
pub struct JwksStats {
    /// Loads attempted (scheduled, unknown-kid and first).
    pub loads: AtomicU64,
    /// Loads that failed (the previous set was kept).
    pub failures: AtomicU64,
    /// Loads triggered by a `kid` the set did not have.
    pub unknown_kid_loads: AtomicU64,
}

/// One issuer's key set, cached and refreshed.
pub struct Jwks {
    source: JwksSource,
    pinned: Vec<Algorithm>,
    current: RwLock<Arc<KeySet>>,
    /// When the last load was attempted (for the unknown-kid floor).
    last_load: Mutex<Option<Instant>>,
    /// One load at a time: concurrent requests with an unknown `kid` wait
    /// for the same load instead of each starting one.
    loading: tokio::sync::Mutex<()>,
    unknown_kid_floor: Duration,
    client: Option<reqwest::Client>,
    last_error: Mutex<Option<JwksError>>,
    pub stats: JwksStats,
}

impl std::fmt::Debug for Jwks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Jwks")
            .field("source", &self.source)
            .field("keys", &self.keys().len())
            .finish_non_exhaustive()
    }
}

impl Jwks {
    /// An empty cache; nothing is read until [`Jwks::load`].
    pub fn new(source: JwksSource, pinned: Vec<Algorithm>) -> Result<Self, JwksError> {
        Self::with_floor(source, pinned, UNKNOWN_KID_FLOOR)
    }

    /// [`Jwks::new`] with another unknown-kid floor (tests).
    pub fn with_floor(
        source: JwksSource,
        pinned: Vec<Algorithm>,
        unknown_kid_floor: Duration,
    ) -> Result<Self, JwksError> {
        // Only a URL needs a client (and, for https, the platform's roots).
        let client = match &source {
            JwksSource::File(_) => None,
            JwksSource::Url(url) => Some(
                reqwest::Client::builder()
                    .connect_timeout(FETCH_TIMEOUT)
                    .timeout(FETCH_TIMEOUT)
                    // A redirect could lead anywhere; the configured URL is the one.
                    .redirect(reqwest::redirect::Policy::none())
                    .build()
                    .map_err(|e| JwksError::Fetch {
                        url: url.clone(),
                        error: format!("building the HTTP client: {}", error_chain(&e)),
                    })?,
            ),
        };
        Ok(Jwks {
            source,
            pinned,
            current: RwLock::new(Arc::new(KeySet::default())),
            last_load: Mutex::new(None),
            loading: tokio::sync::Mutex::new(()),
            unknown_kid_floor,
            client,
            last_error: Mutex::new(None),
            stats: JwksStats::default(),
        })
    }

    /// Whether this cache reads `source` with `pinned`: the cache a new
    /// issuer of the same keys may take over.
    pub fn reads(&self, source: &JwksSource, pinned: &[Algorithm]) -> bool {
        self.source == *source && self.pinned == pinned
    }

    /// The current set.
    pub fn keys(&self) -> Arc<KeySet> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The error of the last load, if it failed.
    pub fn last_error(&self) -> Option<JwksError> {
        self.last_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Loads the set now; on failure the previous set stays.
    pub async fn load(&self) -> Result<(), JwksError> {
        let _one = self.loading.lock().await;
        self.load_locked().await
    }

    async fn load_locked(&self) -> Result<(), JwksError> {
        *self.last_load.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
        self.stats.loads.fetch_add(1, Ordering::Relaxed);
        let result = match self.read().await {
            Ok(bytes) => KeySet::parse(&bytes, &self.pinned, &source_name(&self.source)),
            Err(e) => Err(e),
        };
        match result {
            Ok(set) => {
                if set.skipped > 0 {
                    tracing::debug!(source = %source_name(&self.source), skipped = set.skipped, usable = set.len(), "key set: keys unusable with the pinned algorithms left out");
                }
                *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(set);
                *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = None;
                Ok(())
            }
            Err(e) => {
                self.stats.failures.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e, "key set not refreshed; the previous keys stay in use");
                *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.clone());
                Err(e)
            }
        }
    }

    /// A token named `kid`, which the set does not have: loads the set again
    /// unless a load was attempted within the floor. Returns whether the set
    /// has the `kid` afterwards.
    pub async fn load_for_unknown_kid(&self, kid: Option<&str>) -> bool {
        let _one = self.loading.lock().await;
        // Another request may have loaded it while this one waited.
        let found = |set: &KeySet| match kid {
            Some(k) => set.has_kid(k),
            None => !set.is_empty(),
        };
        if found(&self.keys()) {
            return true;
        }
        let recent = self
            .last_load
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some_and(|t| t.elapsed() < self.unknown_kid_floor);
        if recent {
            return false;
        }
        self.stats.unknown_kid_loads.fetch_add(1, Ordering::Relaxed);
        let _ = self.load_locked().await;
        found(&self.keys())
    }

    /// Loads the set every `every` until `cancel`; failures are logged by
    /// [`Jwks::load`] and the old set kept.
    pub fn spawn_refresh(
        self: Arc<Self>,
        every: Duration,
        cancel: CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(every) => {}
                }
                let _ = self.load().await;
            }
        })
    }

    async fn read(&self) -> Result<Vec<u8>, JwksError> {
        match (&self.source, &self.client) {
            (JwksSource::File(path), _) => read_file(path).await,
            (JwksSource::Url(url), Some(client)) => fetch(client, url).await,
            (JwksSource::Url(url), None) => Err(JwksError::Fetch {
                url: url.clone(),
                error: "no HTTP client".to_owned(),
            }),
        }
    }
}

async fn fetch(client: &reqwest::Client, url: &str) -> Result<Vec<u8>, JwksError> {
    let err = |error: String| JwksError::Fetch {
        url: url.to_owned(),
        error,
    };
    let mut resp = client
        .get(url)
        .header(
            reqwest::header::ACCEPT,
            "application/jwk-set+json, application/json",
        )
        .send()
        .await
        .map_err(|e| err(error_chain(&e)))?;
    if resp.status() != reqwest::StatusCode::OK {
        return Err(err(format!("HTTP status {}", resp.status())));
    }
    let too_large = || JwksError::TooLarge {
        source_name: url.to_owned(),
    };
    if resp
        .content_length()
        .is_some_and(|n| n > MAX_JWKS_BYTES as u64)
    {
        return Err(too_large());
    }
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(|e| err(error_chain(&e)))? {
        if body.len() + chunk.len() > MAX_JWKS_BYTES {
            return Err(too_large());
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

async fn read_file(path: &std::path::Path) -> Result<Vec<u8>, JwksError> {
    use tokio::io::AsyncReadExt;
    let err = |e: std::io::Error| JwksError::Read {
        path: path.display().to_string(),
        error: e.to_string(),
    };
    let f = tokio::fs::File::open(path).await.map_err(err)?;
    let mut body = Vec::new();
    f.take(MAX_JWKS_BYTES as u64 + 1)
        .read_to_end(&mut body)
        .await
        .map_err(err)?;
    if body.len() > MAX_JWKS_BYTES {
        return Err(JwksError::TooLarge {
            source_name: path.display().to_string(),
        });
    }
    Ok(body)
}

fn source_name(s: &JwksSource) -> String {
    match s {
        JwksSource::File(p) => p.display().to_string(),
        JwksSource::Url(u) => u.clone(),
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut at = e.source();
    while let Some(s) = at {
        out.push_str(": ");
        out.push_str(&s.to_string());
        at = s.source();
    }
    out
}
