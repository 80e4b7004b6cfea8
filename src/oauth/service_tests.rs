//! The token service through the HTTP listener: golden wire tests of RFC
//! 8693 requests and answers, every error code, and the attack cases of
//! issue 16 that need the whole flow (client and actor authentication,
//! replays, the confused deputy, revocation, decommission, key rotation).
//!
//! The daemon's part (state, vault, audit) is an in-memory [`Backend`] here,
//! with the real task store for the ledgers; the daemon's own backend is
//! exercised end to end by `tests/oauth_e2e.rs`.

use std::collections::HashMap;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use super::config::{JwksSource, SubjectIssuerConfig, TokenServiceConfig};
use super::exchange::{ClientPolicy, TaskClaims};
use super::service::{Backend, TokenLedger, TokenService};
use super::subject::{SubjectIssuer, SubjectTokens};
use crate::audit::{AuditEvent, Outcome};
use crate::auth::AgentKey;
use crate::model::{AgentId, CredentialId, CredentialKey, RotationId, SecretValue, Stage};
use crate::state::VersionRow;
use crate::tasks::store::TaskStore;

const ISSUER: &str = "https://keyturn.test";
const IDP: &str = "https://idp.test/realms/corp";
/// The identity provider of tenant `partner`, which has its own signing key.
const PARTNER_IDP: &str = "https://idp.partner.test";
const API: &str = "https://api.test";
const TOKEN_TYPE_AT: &str = "urn:ietf:params:oauth:token-type:access_token";
const TOKEN_TYPE_JWT: &str = "urn:ietf:params:oauth:token-type:jwt";
const GRANT: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
const ASSERTION_TYPE: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

use crate::test_support::{Pair, pair};

fn now() -> i64 {
    i64::try_from(jsonwebtoken::get_current_timestamp()).unwrap()
}

/// The daemon's side, in memory; the ledgers are a real task store.
struct Mem {
    store: TaskStore,
    agents: Mutex<HashMap<String, Vec<AgentKey>>>,
    decommissioned: Mutex<HashMap<String, i64>>,
    /// Live tasks by id: (agent, claims).
    tasks: Mutex<HashMap<String, (String, TaskClaims)>>,
    /// The default signing credential's versions.
    signing: Mutex<Vec<(VersionRow, SecretValue)>>,
    /// Tenant `partner`'s own signing credential's versions.
    partner_signing: Mutex<Vec<(VersionRow, SecretValue)>>,
    /// `keyturn/signer2`'s versions: a signing credential switched to.
    other_signing: Mutex<Vec<(VersionRow, SecretValue)>>,
    /// Moved by a test that changes versions, as the engine does.
    generation: std::sync::atomic::AtomicU64,
    /// Every record, however it was audited.
    audit: Mutex<Vec<AuditEvent>>,
    /// The records of refusals audited as unauthenticated (the daemon
    /// rate-limits them).
    unauthenticated: Mutex<Vec<AuditEvent>>,
}

#[async_trait::async_trait]
impl Backend for Mem {
    async fn client_keys(&self, agent: &str) -> Result<Vec<AgentKey>, String> {
        if self.decommissioned.lock().unwrap().contains_key(agent) {
            return Err(format!("agent {agent} is decommissioned"));
        }
        self.agents
            .lock()
            .unwrap()
            .get(agent)
            .cloned()
            .ok_or_else(|| format!("{agent:?} is not a configured agent"))
    }
    async fn spend_jtis(&self, jtis: Vec<(String, String, i64)>) -> Result<Vec<bool>, String> {
        let now = i64::try_from(jsonwebtoken::get_current_timestamp()).unwrap_or(i64::MAX);
        self.store
            .spend_jtis(jtis, now)
            .await
            .map_err(|e| e.to_string())
    }

    fn token_ledger(&self) -> &dyn TokenLedger {
        &self.store
    }
    async fn signing_versions(
        &self,
        credential: &CredentialKey,
    ) -> Result<Vec<VersionRow>, String> {
        Ok(self
            .rows(credential)
            .lock()
            .unwrap()
            .iter()
            .map(|(v, _)| v.clone())
            .collect())
    }
    fn signing_current(&self, credential: &CredentialKey) -> Option<u64> {
        self.rows(credential)
            .lock()
            .unwrap()
            .iter()
            .find(|(v, _)| v.stage == Stage::Current)
            .map(|(v, _)| v.version)
    }
    async fn signing_value(&self, version: &VersionRow) -> Result<SecretValue, String> {
        self.rows(&version.key)
            .lock()
            .unwrap()
            .iter()
            .find(|(v, _)| v.version == version.version)
            .map(|(_, s)| s.clone())
            .ok_or_else(|| "no such version".into())
    }
    fn live_task(&self, agent: &str, id: &str) -> Result<Option<TaskClaims>, String> {
        Ok(self
            .tasks
            .lock()
            .unwrap()
            .get(id)
            .filter(|(a, _)| a == agent)
            .map(|(_, t)| t.clone()))
    }
    fn versions_generation(&self) -> u64 {
        self.generation.load(std::sync::atomic::Ordering::Acquire)
    }
    fn decommissioned_at(&self, agent: &str) -> Option<i64> {
        self.decommissioned.lock().unwrap().get(agent).copied()
    }
    async fn audit(&self, event: AuditEvent) {
        self.audit.lock().unwrap().push(event);
    }
    async fn audit_unauthenticated(&self, event: AuditEvent) {
        self.unauthenticated.lock().unwrap().push(event.clone());
        self.audit.lock().unwrap().push(event);
    }
}

impl Mem {
    fn rows(&self, credential: &CredentialKey) -> &Mutex<Vec<(VersionRow, SecretValue)>> {
        if *credential == partner_signer() {
            &self.partner_signing
        } else if *credential == signer_key("signer2") {
            &self.other_signing
        } else {
            &self.signing
        }
    }
}

/// The `kid` of the version of `rows` numbered `version`: its RFC 7638
/// thumbprint.
fn kid_in(rows: &Mutex<Vec<(VersionRow, SecretValue)>>, version: u64) -> String {
    let rows = rows.lock().unwrap();
    let (row, _) = rows.iter().find(|(r, _)| r.version == version).unwrap();
    super::exchange::ed25519_kid_of_pem(row.public.as_deref().unwrap()).unwrap()
}

/// The `kid` of the default signing credential's `version`.
fn kid(h: &Harness, version: u64) -> String {
    kid_in(&h.mem.signing, version)
}

fn signer_key(name: &str) -> CredentialKey {
    CredentialKey::new(
        AgentId::new("keyturn").unwrap(),
        CredentialId::new(name).unwrap(),
    )
}

fn partner_signer() -> CredentialKey {
    signer_key("partner-signer")
}

fn signing_row(version: u64, stage: Stage, public: &str) -> VersionRow {
    signing_row_of(signer_key("signer"), version, stage, public)
}

fn signing_row_of(key: CredentialKey, version: u64, stage: Stage, public: &str) -> VersionRow {
    VersionRow {
        key,
        version,
        rotation: RotationId::generate(),
        stage,
        vault_version: version.to_string(),
        created_at: chrono::Utc::now(),
        public: Some(public.to_owned()),
    }
}

struct Harness {
    addr: std::net::SocketAddr,
    /// What the service was built from.
    config: TokenServiceConfig,
    /// The identity provider's JWKS file.
    jwks_path: std::path::PathBuf,
    service: Arc<TokenService>,
    /// What the listener serves (the daemon swaps it on reload).
    slot: Arc<super::service::Slot>,
    metrics: Arc<crate::telemetry::Metrics>,
    mem: Arc<Mem>,
    /// The agents' private keys.
    keys: HashMap<&'static str, Pair>,
    idp: EncodingKey,
    cancel: CancellationToken,
    http: reqwest::Client,
    _dir: tempfile::TempDir,
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

fn client(agent: &str, scopes: &[&str], tenants: &[&str]) -> ClientPolicy {
    ClientPolicy {
        agent: agent.into(),
        scopes: scopes.iter().map(|s| s.to_string()).collect(),
        audiences: vec![API.into(), "https://db.test".into()],
        tenants: tenants.iter().map(|s| s.to_string()).collect(),
        ttl: Duration::from_secs(120),
    }
}

/// The subject issuers: `corp` (tenant acme) and `partner`, both the one
/// identity provider whose JWKS is at `jwks_path`.
fn subjects_from(jwks_path: &std::path::Path) -> SubjectTokens {
    let issuer = |name: &str, iss: &str, tenant: &str| {
        SubjectIssuer::from_config(SubjectIssuerConfig {
            name: name.into(),
            issuer: iss.into(),
            audience: vec!["keyturn".into()],
            algorithms: vec![Algorithm::EdDSA],
            jwks: JwksSource::File(jwks_path.to_owned()),
            refresh: Duration::from_secs(300),
            skew: Duration::from_secs(30),
            typ: vec!["at+jwt".into()],
            tenant: tenant.into(),
        })
        .unwrap()
    };
    SubjectTokens::new(vec![
        issuer("corp", IDP, "acme"),
        issuer("partner", PARTNER_IDP, "partner"),
    ])
}

impl Harness {
    /// Serves a service built from `config` instead (a reload), on the
    /// same backend: what is served from now on.
    async fn reload(&mut self, config: TokenServiceConfig) {
        let subjects = subjects_from(&self.jwks_path);
        subjects.start(&self.cancel).await;
        let service = Arc::new(
            TokenService::new(&config, subjects, self.mem.clone()).with_cache_for(Duration::ZERO),
        );
        self.slot.set(Some(service.clone()));
        self.service = service;
        self.config = config;
    }
}

async fn harness() -> Harness {
    // The tests change state (rotations) under the service: no cache.
    harness_cached(Duration::ZERO).await
}

/// The harness with the service's state reads kept `cache_for`.
async fn harness_cached(cache_for: Duration) -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let store = TaskStore::open(&dir.path().join("tasks")).unwrap();
    let mut keys = HashMap::new();
    let mut agents = HashMap::new();
    for agent in ["reporter", "intruder", "nopolicy", "partnerbot", "auditor"] {
        let p = pair();
        agents.insert(
            agent.to_owned(),
            vec![AgentKey {
                version: 1,
                public_pem: p.public.clone(),
            }],
        );
        keys.insert(agent, p);
    }
    let signer = pair();
    let partner = pair();
    let mem = Arc::new(Mem {
        store,
        agents: Mutex::new(agents),
        decommissioned: Mutex::default(),
        tasks: Mutex::default(),
        signing: Mutex::new(vec![(
            signing_row(1, Stage::Current, &signer.public),
            signer.private,
        )]),
        partner_signing: Mutex::new(vec![(
            signing_row_of(partner_signer(), 1, Stage::Current, &partner.public),
            partner.private,
        )]),
        other_signing: Mutex::default(),
        generation: Default::default(),
        audit: Mutex::default(),
        unauthenticated: Mutex::default(),
    });

    // The identity provider: an EdDSA key, published in a JWKS file.
    let idp_pem = include_bytes!("testdata/ed25519_b.pem");
    let idp = EncodingKey::from_ed_pem(idp_pem).unwrap();
    let mut jwk =
        serde_json::to_value(Jwk::from_encoding_key(&idp, Algorithm::EdDSA).unwrap()).unwrap();
    jwk["kid"] = json!("idp-1");
    let jwks_path = dir.path().join("idp-jwks.json");
    std::fs::write(&jwks_path, json!({ "keys": [jwk] }).to_string()).unwrap();
    let subjects = subjects_from(&jwks_path);
    let cancel = CancellationToken::new();
    subjects.start(&cancel).await;

    let config = TokenServiceConfig {
        issuer: ISSUER.into(),
        signing_credential: CredentialKey::new(
            AgentId::new("keyturn").unwrap(),
            CredentialId::new("signer").unwrap(),
        ),
        max_ttl: Duration::from_secs(300),
        max_act_depth: 3,
        clients: [
            (
                "reporter".to_owned(),
                client("reporter", &["read:reports", "write:reports"], &["acme"]),
            ),
            (
                "intruder".to_owned(),
                client("intruder", &["read:reports"], &["other-tenant"]),
            ),
            (
                "partnerbot".to_owned(),
                client("partnerbot", &["read:reports"], &["partner"]),
            ),
            // Serves both tenants: it may introspect their tokens.
            (
                "auditor".to_owned(),
                client("auditor", &["read:reports"], &["acme", "partner"]),
            ),
        ]
        .into(),
        tenant_keys: [("partner".to_owned(), partner_signer())].into(),
    };
    let service =
        Arc::new(TokenService::new(&config, subjects, mem.clone()).with_cache_for(cache_for));

    let slot = Arc::new(super::service::Slot::with(service.clone()));
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap();
    let metrics = Arc::new(crate::telemetry::Metrics::new());
    tokio::spawn(crate::api::http::serve_http(
        tokio::net::TcpListener::from_std(listener).unwrap(),
        metrics.clone(),
        Arc::new(AtomicBool::new(true)),
        cancel.clone(),
        crate::api::http::Limits::for_nofile(1024),
        crate::api::http::Routes {
            nudge: None,
            oauth: Some(slot.clone()),
        },
    ));
    Harness {
        addr,
        config,
        jwks_path,
        service,
        slot,
        metrics,
        mem,
        keys,
        idp,
        cancel,
        http: reqwest::Client::new(),
        _dir: dir,
    }
}

/// The human's access token from the identity provider: `claims` over the
/// defaults (a `null` removes one), `header` over `alg/typ/kid`.
fn subject_with(h: &Harness, header: Value, claims: Value) -> String {
    let mut c = json!({
        "iss": IDP,
        "sub": "alice@example.com",
        "aud": "keyturn",
        "exp": now() + 600,
        "iat": now(),
        "scope": "read:reports write:reports admin",
        "jti": "idp-jti-1",
    });
    merge(&mut c, claims);
    let mut hd = json!({ "alg": "EdDSA", "typ": "at+jwt", "kid": "idp-1" });
    merge(&mut hd, header);
    sign_raw(&h.idp, Algorithm::EdDSA, &hd, &c)
}

fn subject(h: &Harness) -> String {
    subject_with(h, json!({}), json!({}))
}

fn merge(into: &mut Value, over: Value) {
    for (k, v) in over.as_object().unwrap() {
        if v.is_null() {
            into.as_object_mut().unwrap().remove(k);
        } else {
            into[k] = v.clone();
        }
    }
}

fn b64(v: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v)
}

fn sign_raw(key: &EncodingKey, alg: Algorithm, header: &Value, claims: &Value) -> String {
    let msg = format!(
        "{}.{}",
        b64(header.to_string().as_bytes()),
        b64(claims.to_string().as_bytes())
    );
    let sig = jsonwebtoken::crypto::sign(msg.as_bytes(), key, alg).unwrap();
    format!("{msg}.{sig}")
}

/// An assertion of `agent` signed with `signer`'s key: claims over the
/// defaults, header over `alg: EdDSA`.
fn assertion_with(h: &Harness, agent: &str, signer: &str, header: Value, claims: Value) -> String {
    let mut c = json!({
        "iss": agent,
        "sub": agent,
        "aud": ISSUER,
        "exp": now() + 60,
        "iat": now(),
        "jti": hex::encode(rand::random::<[u8; 16]>()),
    });
    merge(&mut c, claims);
    let mut hd = json!({ "alg": "EdDSA", "typ": "JWT" });
    merge(&mut hd, header);
    let key = EncodingKey::from_ed_pem(h.keys[signer].private.expose()).unwrap();
    sign_raw(&key, Algorithm::EdDSA, &hd, &c)
}

fn assertion(h: &Harness, agent: &str) -> String {
    assertion_with(h, agent, agent, json!({}), json!({}))
}

/// A complete, valid exchange request of `reporter`, as form pairs.
fn request(h: &Harness) -> Vec<(String, String)> {
    [
        ("grant_type", GRANT.to_owned()),
        ("subject_token", subject(h)),
        ("subject_token_type", TOKEN_TYPE_AT.to_owned()),
        ("actor_token", assertion(h, "reporter")),
        ("actor_token_type", TOKEN_TYPE_JWT.to_owned()),
        ("client_assertion_type", ASSERTION_TYPE.to_owned()),
        ("client_assertion", assertion(h, "reporter")),
        ("audience", API.to_owned()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect()
}

fn set(form: &mut Vec<(String, String)>, k: &str, v: &str) {
    form.retain(|(n, _)| n != k);
    form.push((k.to_owned(), v.to_owned()));
}

fn without(mut form: Vec<(String, String)>, k: &str) -> Vec<(String, String)> {
    form.retain(|(n, _)| n != k);
    form
}

fn encode(form: &[(String, String)]) -> String {
    form_urlencoded::Serializer::new(String::new())
        .extend_pairs(form)
        .finish()
}

struct Answer {
    status: u16,
    headers: reqwest::header::HeaderMap,
    json: Value,
}

async fn post(h: &Harness, path: &str, form: &[(String, String)]) -> Answer {
    post_raw(h, path, "application/x-www-form-urlencoded", encode(form)).await
}

async fn post_raw(h: &Harness, path: &str, content_type: &str, body: String) -> Answer {
    post_authorized(h, path, content_type, body, None).await
}

/// A POST with an `Authorization` header, if given.
async fn post_authorized(
    h: &Harness,
    path: &str,
    content_type: &str,
    body: String,
    authorization: Option<&str>,
) -> Answer {
    let mut r = h
        .http
        .post(format!("http://{}{path}", h.addr))
        .header("content-type", content_type);
    if let Some(a) = authorization {
        r = r.header("authorization", a);
    }
    let r = r.body(body).send().await.unwrap();
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    let text = r.text().await.unwrap();
    let json = if text.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text}"))
    };
    Answer {
        status,
        headers,
        json,
    }
}

/// A GET of `path` from the harness's service, its answer unread.
async fn get_raw(h: &Harness, path: &str) -> reqwest::Response {
    h.http
        .get(format!("http://{}{path}", h.addr))
        .send()
        .await
        .unwrap()
}

async fn get(h: &Harness, path: &str) -> Answer {
    let r = get_raw(h, path).await;
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    let json = serde_json::from_str(&r.text().await.unwrap()).unwrap();
    Answer {
        status,
        headers,
        json,
    }
}

/// The error code of a refused request, after checking the wire format of
/// an error (RFC 6749 5.2) and that no token leaked into it.
fn refused(a: &Answer, sent: &[(String, String)]) -> String {
    assert!(
        a.status == 400 || a.status == 401,
        "{} {}",
        a.status,
        a.json
    );
    assert_eq!(a.headers["cache-control"], "no-store");
    assert_eq!(a.headers["content-type"], "application/json");
    let obj = a.json.as_object().unwrap();
    assert!(obj.keys().all(|k| k == "error" || k == "error_description"));
    let text = a.json.to_string();
    for (k, v) in sent {
        if k.ends_with("token") || k == "client_assertion" || k == "token" {
            let sig = v.rsplit('.').next().unwrap_or(v);
            assert!(sig.len() < 8 || !text.contains(sig), "{k} leaked: {text}");
        }
    }
    let code = a.json["error"].as_str().unwrap().to_owned();
    assert_eq!(
        a.status == 401,
        code == "invalid_client",
        "{code}: {}",
        a.status
    );
    code
}

/// A request of `partnerbot` (tenant partner) for a partner subject.
fn partner_request(h: &Harness) -> Vec<(String, String)> {
    let mut form = request(h);
    set(
        &mut form,
        "subject_token",
        &subject_with(h, json!({}), json!({ "iss": PARTNER_IDP })),
    );
    set(&mut form, "client_assertion", &assertion(h, "partnerbot"));
    set(&mut form, "actor_token", &assertion(h, "partnerbot"));
    set(&mut form, "scope", "read:reports");
    form
}

async fn code_of(h: &Harness, form: Vec<(String, String)>) -> String {
    let a = post(h, "/oauth/token", &form).await;
    refused(&a, &form)
}

/// Decodes an issued token with the JWKS the service publishes.
async fn verify_with_jwks(h: &Harness, token: &str) -> (Header, Value) {
    let jwks = get(h, "/.well-known/jwks.json").await.json;
    let set: jsonwebtoken::jwk::JwkSet = serde_json::from_value(jwks).unwrap();
    let header = jsonwebtoken::decode_header(token).unwrap();
    let jwk = set
        .find(header.kid.as_deref().unwrap())
        .expect("kid in JWKS");
    let mut v = Validation::new(Algorithm::EdDSA);
    v.set_issuer(&[ISSUER]);
    v.set_audience(&[API]);
    v.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
    let data =
        jsonwebtoken::decode::<Value>(token, &DecodingKey::from_jwk(jwk).unwrap(), &v).unwrap();
    (data.header, data.claims)
}

async fn issue(h: &Harness, form: &[(String, String)]) -> (String, Value) {
    let a = post(h, "/oauth/token", form).await;
    assert_eq!(a.status, 200, "{}", a.json);
    let token = a.json["access_token"].as_str().unwrap().to_owned();
    (token, a.json)
}

/// Asserts that a token answer has exactly RFC 8693's fields, no more.
fn assert_token_answer_fields(answer: &Value) {
    let mut keys: Vec<&String> = answer.as_object().unwrap().keys().collect();
    keys.sort();
    assert_eq!(
        keys,
        [
            "access_token",
            "expires_in",
            "issued_token_type",
            "scope",
            "token_type"
        ]
    );
}

#[tokio::test]
async fn a_token_exchange_answers_exactly_as_rfc_8693_says() {
    let h = harness().await;
    let form = request(&h);
    let a = post(&h, "/oauth/token", &form).await;
    assert_eq!(a.status, 200, "{}", a.json);
    assert_eq!(a.headers["cache-control"], "no-store");
    assert_eq!(a.headers["pragma"], "no-cache");
    assert_eq!(a.headers["content-type"], "application/json");
    assert_token_answer_fields(&a.json);
    assert_eq!(a.json["issued_token_type"], TOKEN_TYPE_AT);
    assert_eq!(a.json["token_type"], "Bearer");
    assert_eq!(a.json["scope"], "read:reports write:reports");
    let expires_in = a.json["expires_in"].as_u64().unwrap();
    assert!(
        (55..=60).contains(&expires_in),
        "{expires_in}: the actor token's exp caps it"
    );

    let token = a.json["access_token"].as_str().unwrap();
    let (header, claims) = verify_with_jwks(&h, token).await;
    assert_eq!(header.typ.as_deref(), Some("at+jwt"));
    assert_eq!(header.alg, Algorithm::EdDSA);
    assert_eq!(header.kid, Some(kid(&h, 1)));
    assert_eq!(claims["sub"], "alice@example.com");
    assert_eq!(claims["act"], json!({ "sub": "reporter" }));
    assert_eq!(claims["client_id"], "reporter");
    assert_eq!(claims["aud"], API);
    assert_eq!(claims["tenant"], "acme");
    assert_eq!(claims["iss"], ISSUER);

    // The audit has the issuance, without any token.
    let audit = h.mem.audit.lock().unwrap().clone();
    let ev = audit.last().unwrap();
    assert_eq!(ev.event, "oauth.token");
    assert_eq!(ev.outcome, Outcome::Ok);
    assert_eq!(ev.agent.as_ref().unwrap().as_str(), "reporter");
    let text = serde_json::to_string(&audit).unwrap();
    for (k, v) in &form {
        if k.contains("token") || k == "client_assertion" {
            assert!(
                !text.contains(v.rsplit('.').next().unwrap()),
                "{k} in audit"
            );
        }
    }
    assert!(!text.contains(token.rsplit('.').next().unwrap()));
}

#[tokio::test]
async fn metadata_and_jwks_are_published() {
    let h = harness().await;
    let m = get(&h, "/.well-known/oauth-authorization-server").await;
    assert_eq!(m.status, 200);
    assert_eq!(m.json["issuer"], ISSUER);
    assert_eq!(m.json["token_endpoint"], format!("{ISSUER}/oauth/token"));
    assert_eq!(
        m.json["jwks_uri"],
        format!("{ISSUER}/.well-known/jwks.json")
    );
    assert_eq!(
        m.json["introspection_endpoint"],
        format!("{ISSUER}/oauth/introspect")
    );
    assert_eq!(
        m.json["revocation_endpoint"],
        format!("{ISSUER}/oauth/revoke")
    );
    assert_eq!(m.json["grant_types_supported"], json!([GRANT]));
    assert_eq!(
        m.json["token_endpoint_auth_methods_supported"],
        json!(["private_key_jwt"])
    );
    let j = get(&h, "/.well-known/jwks.json").await;
    assert_eq!(j.status, 200);
    let keys = j.json["keys"].as_array().unwrap();
    assert_eq!(keys.len(), 1);
    assert_eq!(keys[0]["kid"], kid(&h, 1));
    assert_eq!(keys[0]["kty"], "OKP");
    assert_eq!(keys[0]["crv"], "Ed25519");
    assert!(keys[0].get("d").is_none(), "never the private part");
}

#[tokio::test]
async fn every_error_code_on_the_wire() {
    let h = harness().await;
    let cases: Vec<(&str, Vec<(String, String)>)> = vec![
        ("invalid_request", without(request(&h), "subject_token")),
        ("invalid_request", without(request(&h), "actor_token")),
        ("invalid_client", without(request(&h), "client_assertion")),
        ("unsupported_grant_type", {
            let mut f = request(&h);
            set(&mut f, "grant_type", "client_credentials");
            f
        }),
        ("invalid_target", {
            let mut f = request(&h);
            set(&mut f, "audience", "https://evil.test");
            f
        }),
        ("invalid_scope", {
            let mut f = request(&h);
            set(&mut f, "scope", "admin");
            f
        }),
        ("unauthorized_client", {
            let mut f = request(&h);
            set(&mut f, "client_assertion", &assertion(&h, "nopolicy"));
            set(&mut f, "actor_token", &assertion(&h, "nopolicy"));
            f
        }),
    ];
    for (want, form) in cases {
        assert_eq!(code_of(&h, form).await, want);
    }
    // invalid_grant is the only code RFC 6749 has for a bad grant; token
    // exchange reports bad tokens as invalid_request (RFC 8693 2.2.2), so
    // it is never sent: a subject token that fails is invalid_request.
    let mut f = request(&h);
    set(&mut f, "subject_token", "not.a.token");
    assert_eq!(code_of(&h, f).await, "invalid_request");
    // Not a form.
    let a = post_raw(&h, "/oauth/token", "application/json", "{}".into()).await;
    assert_eq!(refused(&a, &[]), "invalid_request");
    // Each answer is counted by endpoint and code.
    let text = h.metrics.encode();
    for line in [
        r#"keyturn_oauth_requests_total{endpoint="token",result="invalid_target"} 1"#,
        r#"keyturn_oauth_requests_total{endpoint="token",result="unauthorized_client"} 1"#,
        r#"keyturn_oauth_requests_total{endpoint="token",result="invalid_client"} 1"#,
        r#"keyturn_oauth_requests_total{endpoint="token",result="invalid_request"} 4"#,
        r#"keyturn_oauth_requests_total{endpoint="introspect",result="ok"} 0"#,
    ] {
        assert!(text.contains(line), "{line} not in\n{text}");
    }
    // GET is not the endpoint.
    let r = h
        .http
        .get(format!("http://{}/oauth/token", h.addr))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 405);
}

/// An oversized body or another method gets the service's own error shape
/// (`invalid_request`, JSON, `no-store`), not the framework's plain text.
#[tokio::test]
async fn oversized_bodies_and_wrong_methods_get_oauth_errors() {
    let h = harness().await;
    let big = format!(
        "grant_type=x&pad={}",
        "a".repeat(super::request::MAX_BODY_BYTES + 1)
    );
    for path in ["/oauth/token", "/oauth/introspect", "/oauth/revoke"] {
        let a = post_raw(&h, path, "application/x-www-form-urlencoded", big.clone()).await;
        assert_eq!(a.status, 413, "{path}: {}", a.json);
        assert_eq!(a.headers["cache-control"], "no-store", "{path}");
        assert_eq!(a.headers["content-type"], "application/json", "{path}");
        assert_eq!(a.json["error"], "invalid_request", "{path}");
        assert!(a.json["error_description"].is_string(), "{path}");

        for method in [reqwest::Method::GET, reqwest::Method::PUT] {
            let r = h
                .http
                .request(method.clone(), format!("http://{}{path}", h.addr))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status().as_u16(), 405, "{method} {path}");
            let headers = r.headers().clone();
            assert_eq!(headers["cache-control"], "no-store", "{method} {path}");
            assert_eq!(headers["content-type"], "application/json");
            assert_eq!(headers["allow"], "POST");
            let json: Value = serde_json::from_str(&r.text().await.unwrap()).unwrap();
            assert_eq!(json["error"], "invalid_request", "{method} {path}");
        }
    }
    // Each counted, the 405s too (black-box finding: they were not).
    let text = h.metrics.encode();
    for endpoint in ["token", "introspect", "revoke"] {
        let line = format!(
            r#"keyturn_oauth_requests_total{{endpoint="{endpoint}",result="invalid_request"}} 3"#
        );
        assert!(text.contains(&line), "{line} not in\n{text}");
    }
}

#[tokio::test]
async fn attacks_on_the_subject_token_are_refused() {
    let h = harness().await;
    let attacker =
        EncodingKey::from_ed_pem(include_bytes!("testdata/ed25519_attacker.pem")).unwrap();
    let base = json!({
        "iss": IDP, "sub": "alice@example.com", "aud": "keyturn",
        "exp": now() + 600, "iat": now(), "scope": "read:reports",
    });
    let public_pem = {
        // HS256 with the IdP's public key bytes as the HMAC secret.
        let jwks = serde_json::to_value(Jwk::from_encoding_key(&h.idp, Algorithm::EdDSA).unwrap())
            .unwrap();
        jwks["x"].as_str().unwrap().to_owned()
    };
    let hs = {
        let key = EncodingKey::from_secret(public_pem.as_bytes()).unwrap();
        sign_raw(
            &key,
            Algorithm::HS256,
            &json!({"alg": "HS256", "typ": "at+jwt", "kid": "idp-1"}),
            &base,
        )
    };
    let none = format!(
        "{}.{}.",
        b64(json!({"alg": "none", "typ": "at+jwt"})
            .to_string()
            .as_bytes()),
        b64(base.to_string().as_bytes())
    );
    let cases: Vec<(&str, String)> = vec![
        ("alg none", none),
        ("HS256 with the public key as secret", hs),
        (
            "kid path traversal",
            subject_with(&h, json!({"kid": "../../../../etc/passwd"}), json!({})),
        ),
        (
            "jku pointing elsewhere with a foreign key",
            sign_raw(
                &attacker,
                Algorithm::EdDSA,
                &json!({"alg": "EdDSA", "typ": "at+jwt", "kid": "idp-1", "jku": "http://127.0.0.1:1/jwks"}),
                &base,
            ),
        ),
        (
            "x5u pointing elsewhere with a foreign key",
            sign_raw(
                &attacker,
                Algorithm::EdDSA,
                &json!({"alg": "EdDSA", "typ": "at+jwt", "kid": "idp-1", "x5u": "http://127.0.0.1:1/cert"}),
                &base,
            ),
        ),
        (
            "expired",
            subject_with(&h, json!({}), json!({"exp": now() - 120})),
        ),
        (
            "not yet valid",
            subject_with(&h, json!({}), json!({"nbf": now() + 600})),
        ),
        (
            "wrong iss",
            subject_with(&h, json!({}), json!({"iss": "https://evil.test"})),
        ),
        (
            "wrong aud",
            subject_with(&h, json!({}), json!({"aud": "other-api"})),
        ),
        (
            "an ID token",
            subject_with(&h, json!({"typ": "JWT"}), json!({})),
        ),
        (
            "a keyturn-issued token as subject (unconfigured issuer)",
            subject_with(&h, json!({}), json!({"iss": ISSUER})),
        ),
    ];
    // Duplicate JSON members: a second `sub` a lax parser would take.
    let dup_claims = format!(
        r#"{{"iss":"{IDP}","sub":"alice@example.com","sub":"admin@example.com","aud":"keyturn","exp":{},"iat":{},"scope":"read:reports"}}"#,
        now() + 600,
        now()
    );
    let dup = {
        let msg = format!(
            "{}.{}",
            b64(br#"{"alg":"EdDSA","typ":"at+jwt","kid":"idp-1"}"#),
            b64(dup_claims.as_bytes())
        );
        let sig = jsonwebtoken::crypto::sign(msg.as_bytes(), &h.idp, Algorithm::EdDSA).unwrap();
        format!("{msg}.{sig}")
    };
    let mut cases = cases;
    cases.push(("duplicate JSON members", dup));
    cases.push((
        "an oversized token",
        subject_with(&h, json!({}), json!({"pad": "x".repeat(40_000)})),
    ));
    for (what, token) in cases {
        let mut f = request(&h);
        set(&mut f, "subject_token", &token);
        assert_eq!(code_of(&h, f).await, "invalid_request", "{what}");
    }
}

#[tokio::test]
async fn attacks_on_the_exchange_are_refused() {
    let h = harness().await;
    let with = |name: &str, v: String| {
        let mut f = request(&h);
        set(&mut f, name, &v);
        f
    };
    // Scope widening: asking only for what the agent may not have is
    // refused; asking for more along with what it may have yields the
    // intersection, never wider (and `scope` in the answer says so).
    assert_eq!(
        code_of(&h, with("scope", "admin".into())).await,
        "invalid_scope"
    );
    let (token, answer) = issue(&h, &with("scope", "read:reports admin".into())).await;
    assert_eq!(answer["scope"], "read:reports");
    assert_eq!(
        verify_with_jwks(&h, &token).await.1["scope"],
        "read:reports"
    );
    // Audience injection: a second audience outside the policy.
    let mut f = request(&h);
    f.push(("audience".into(), "https://evil.test".into()));
    assert_eq!(code_of(&h, f).await, "invalid_target");
    let mut f = request(&h);
    f.push(("resource".into(), "https://evil.test/x".into()));
    assert_eq!(code_of(&h, f).await, "invalid_target");
    // Actor tokens that are not reporter's own: the confused deputy
    // (intruder's), and one forged for reporter with another key.
    let actor_tokens = [
        ("intruder's actor token", assertion(&h, "intruder")),
        (
            "an actor token for reporter signed with another key",
            assertion_with(&h, "reporter", "intruder", json!({}), json!({})),
        ),
    ];
    for (what, token) in actor_tokens {
        assert_eq!(
            code_of(&h, with("actor_token", token)).await,
            "invalid_request",
            "{what}"
        );
    }
    // Client assertions that must not authenticate reporter.
    let reporters = |claims: Value| assertion_with(&h, "reporter", "reporter", json!({}), claims);
    let client_assertions = [
        (
            "signed by another agent's key",
            assertion_with(&h, "reporter", "intruder", json!({}), json!({})),
        ),
        ("for another audience", reporters(json!({"aud": "keyturn"}))),
        ("expired", reporters(json!({"exp": now() - 120}))),
        (
            "lifetime inflation: valid for an hour",
            reporters(json!({"exp": now() + 3600})),
        ),
        (
            "alg HS256",
            sign_raw(
                &EncodingKey::from_secret(b"guess").unwrap(),
                Algorithm::HS256,
                &json!({"alg": "HS256"}),
                &json!({"iss": "reporter", "sub": "reporter", "aud": ISSUER, "exp": now() + 60, "jti": "x"}),
            ),
        ),
    ];
    for (what, a) in client_assertions {
        assert_eq!(
            code_of(&h, with("client_assertion", a)).await,
            "invalid_client",
            "{what}"
        );
    }
    // Replays: the same client assertion, then the same actor token, twice.
    let form = request(&h);
    issue(&h, &form).await;
    let mut replay = request(&h);
    set(&mut replay, "client_assertion", &form[6].1);
    assert_eq!(code_of(&h, replay).await, "invalid_client");
    let mut replay = request(&h);
    set(&mut replay, "actor_token", &form[3].1);
    assert_eq!(code_of(&h, replay).await, "invalid_request");
    // One assertion as both client and actor: its jti is spent once.
    let a = assertion(&h, "reporter");
    let mut f = request(&h);
    set(&mut f, "client_assertion", &a);
    set(&mut f, "actor_token", &a);
    assert_eq!(code_of(&h, f).await, "invalid_request");
    // A parameter twice.
    let mut f = request(&h);
    f.push(("subject_token".into(), subject(&h)));
    assert_eq!(code_of(&h, f).await, "invalid_request");
    // A refresh token asked for.
    assert_eq!(
        code_of(
            &h,
            with(
                "requested_token_type",
                "urn:ietf:params:oauth:token-type:refresh_token".into()
            )
        )
        .await,
        "invalid_request"
    );
    // Tenant: intruder serves another tenant; alice is acme's.
    let mut f = request(&h);
    set(&mut f, "client_assertion", &assertion(&h, "intruder"));
    set(&mut f, "actor_token", &assertion(&h, "intruder"));
    assert_eq!(code_of(&h, f).await, "invalid_request");
    // Subjects this agent may not act for: may_act naming another agent,
    // and a chain deeper than max_act_depth (3): two earlier actors + this
    // one is fine, three earlier are not.
    let deep = json!({"sub": "a", "act": {"sub": "b", "act": {"sub": "c"}}});
    let subjects = [
        (
            "may_act naming another agent",
            json!({"may_act": {"sub": "intruder"}}),
        ),
        ("a chain one actor too deep", json!({"act": deep})),
    ];
    for (what, claims) in subjects {
        let s = subject_with(&h, json!({}), claims);
        assert_eq!(
            code_of(&h, with("subject_token", s)).await,
            "invalid_request",
            "{what}"
        );
    }
    // A nested chain is kept whole under the agent.
    let s = subject_with(&h, json!({}), json!({"act": {"sub": "upstream-agent"}}));
    let (token, _) = issue(&h, &with("subject_token", s)).await;
    let (_, claims) = verify_with_jwks(&h, &token).await;
    assert_eq!(
        claims["act"],
        json!({"sub": "reporter", "act": {"sub": "upstream-agent"}})
    );
    // Every refusal was audited as refused, the tokens never.
    let audit = h.mem.audit.lock().unwrap().clone();
    assert!(
        audit
            .iter()
            .filter(|e| e.outcome == Outcome::Refused)
            .count()
            >= 15
    );
}

fn auth_form(h: &Harness, agent: &str, token: &str) -> Vec<(String, String)> {
    vec![
        ("token".into(), token.into()),
        ("client_assertion_type".into(), ASSERTION_TYPE.into()),
        ("client_assertion".into(), assertion(h, agent)),
    ]
}

/// bb7 #5: with the agents' keys cached (as the daemon does), a key that a
/// rotation retired is refused as soon as the retirement is committed (the
/// versions generation moved), not once the cache ages out.
#[tokio::test]
async fn a_retired_agent_key_is_refused_at_once_despite_the_cache() {
    let mut h = harness_cached(Duration::from_secs(3600)).await;
    let old = |h: &Harness| {
        let mut form = request(h);
        set(&mut form, "client_assertion", &assertion(h, "reporter"));
        set(&mut form, "actor_token", &assertion(h, "reporter"));
        form
    };
    // The old key authenticates, and its keys are now cached.
    issue(&h, &old(&h)).await;
    // Rotated twice: the old key is retired, v2 previous, v3 current.
    let (v2, v3) = (pair(), pair());
    *h.mem.agents.lock().unwrap().get_mut("reporter").unwrap() = vec![
        AgentKey {
            version: 3,
            public_pem: v3.public.clone(),
        },
        AgentKey {
            version: 2,
            public_pem: v2.public.clone(),
        },
    ];
    h.keys.insert("reporter-v3", v3);
    h.mem
        .generation
        .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
    let form = old(&h);
    assert_eq!(code_of(&h, form).await, "invalid_client");
    // The current key works (read again, not refused from a stale cache).
    let mut form = request(&h);
    let new = |h: &Harness| assertion_with(h, "reporter", "reporter-v3", json!({}), json!({}));
    set(&mut form, "client_assertion", &new(&h));
    set(&mut form, "actor_token", &new(&h));
    issue(&h, &form).await;
}

#[tokio::test]
async fn introspection_revocation_and_decommission() {
    let h = harness().await;
    let (token, _) = issue(&h, &request(&h)).await;
    let a = post(&h, "/oauth/introspect", &auth_form(&h, "auditor", &token)).await;
    assert_eq!(a.status, 200);
    assert_eq!(a.headers["cache-control"], "no-store");
    assert_eq!(a.json["active"], true);
    assert_eq!(a.json["act"], json!({"sub": "reporter"}));
    assert_eq!(a.json["scope"], "read:reports write:reports");
    assert_eq!(a.json["tenant"], "acme");
    assert_eq!(a.json["client_id"], "reporter");
    assert_eq!(a.json["sub"], "alice@example.com");

    // Introspection needs client authentication.
    let f = without(auth_form(&h, "intruder", &token), "client_assertion");
    assert_eq!(
        refused(&post(&h, "/oauth/introspect", &f).await, &f),
        "invalid_client"
    );
    // Garbage and a forged token are inactive, and say nothing more.
    for t in ["garbage", "a.b.c"] {
        let a = post(&h, "/oauth/introspect", &auth_form(&h, "auditor", t)).await;
        assert_eq!(a.json, json!({"active": false}));
    }
    let forged = {
        let (_, claims) = verify_with_jwks(&h, &token).await;
        let attacker =
            EncodingKey::from_ed_pem(include_bytes!("testdata/ed25519_attacker.pem")).unwrap();
        sign_raw(
            &attacker,
            Algorithm::EdDSA,
            &json!({"alg": "EdDSA", "typ": "at+jwt", "kid": kid(&h, 1)}),
            &claims,
        )
    };
    let a = post(&h, "/oauth/introspect", &auth_form(&h, "auditor", &forged)).await;
    assert_eq!(a.json, json!({"active": false}));

    // Only its client may revoke it; then it is inactive. An agent of
    // another tenant learns nothing (black-box finding: its refusal told
    // it the token was genuine): answered as for an unknown token, and
    // nothing is revoked.
    let a = post(&h, "/oauth/revoke", &auth_form(&h, "intruder", &token)).await;
    assert_eq!((a.status, &a.json), (200, &Value::Null));
    let a = post(&h, "/oauth/introspect", &auth_form(&h, "auditor", &token)).await;
    assert_eq!(a.json["active"], true);
    // One that may see it, not its client, is refused.
    let f = auth_form(&h, "auditor", &token);
    assert_eq!(
        refused(&post(&h, "/oauth/revoke", &f).await, &f),
        "unauthorized_client"
    );
    let a = post(&h, "/oauth/revoke", &auth_form(&h, "reporter", &token)).await;
    assert_eq!(a.status, 200);
    assert_eq!(a.json, Value::Null);
    let a = post(&h, "/oauth/introspect", &auth_form(&h, "auditor", &token)).await;
    assert_eq!(a.json, json!({"active": false}));
    // Revoking an unknown token is 200 too (RFC 7009 2.2).
    let a = post(&h, "/oauth/revoke", &auth_form(&h, "reporter", "unknown")).await;
    assert_eq!(a.status, 200);

    // Decommissioning the agent makes every token it acted in inactive at
    // once, and it can no longer authenticate.
    let (t2, _) = issue(&h, &request(&h)).await;
    let a = post(&h, "/oauth/introspect", &auth_form(&h, "auditor", &t2)).await;
    assert_eq!(a.json["active"], true);
    h.mem
        .decommissioned
        .lock()
        .unwrap()
        .insert("reporter".into(), now());
    let a = post(&h, "/oauth/introspect", &auth_form(&h, "auditor", &t2)).await;
    assert_eq!(a.json, json!({"active": false}));
    assert_eq!(code_of(&h, request(&h)).await, "invalid_client");
}

/// Defect (black-box): a decommissioned agent named in the subject
/// token's `act` chain was carried into a new, active token; and a token
/// issued after a decommission that named the agent was active. Both are
/// refused: every token naming a decommissioned agent is inactive.
#[tokio::test]
async fn a_decommissioned_agent_is_never_carried_in_a_delegation_chain() {
    let h = harness().await;
    let with_chain = |chain: Value| {
        let mut form = request(&h);
        set(
            &mut form,
            "subject_token",
            &subject_with(&h, json!({}), json!({ "act": chain })),
        );
        form
    };
    // Before: the chain is carried, nested.
    let (token, _) = issue(&h, &with_chain(json!({"sub": "auditor"}))).await;
    let a = post(&h, "/oauth/introspect", &auth_form(&h, "reporter", &token)).await;
    assert_eq!(
        a.json["act"],
        json!({"sub": "reporter", "act": {"sub": "auditor"}})
    );
    // `auditor` decommissioned a minute before that token's iat (a clock
    // between the decision and the record, or a config `at`).
    h.mem
        .decommissioned
        .lock()
        .unwrap()
        .insert("auditor".into(), now() - 60);
    let a = post(&h, "/oauth/introspect", &auth_form(&h, "reporter", &token)).await;
    assert_eq!(a.json, json!({"active": false}));
    // And no new token carries it, at any depth.
    for chain in [
        json!({"sub": "auditor"}),
        json!({"sub": "someone", "act": {"sub": "auditor"}}),
    ] {
        let form = with_chain(chain);
        let a = post(&h, "/oauth/token", &form).await;
        assert_eq!(refused(&a, &form), "invalid_grant");
        assert!(
            a.json["error_description"].as_str().unwrap().contains(
                "names agent `auditor` in its delegation chain, and that agent is decommissioned"
            ),
            "{}",
            a.json
        );
    }
    // A chain of agents still in service goes on working.
    issue(&h, &with_chain(json!({"sub": "someone"}))).await;
}

/// RFC 7662 2.2 and 4: a token is introspected only by its own client or
/// by a client that serves its tenant; for anyone else it is `{"active":
/// false}`, exactly as an unknown token, so tenants stay apart and an agent
/// without a client policy learns nothing.
#[tokio::test]
async fn only_the_client_or_a_client_of_its_tenant_may_introspect_a_token() {
    let h = harness().await;
    let (acme, _) = issue(&h, &request(&h)).await;
    let form = partner_request(&h);
    let (partner, _) = issue(&h, &form).await;
    let ask = |agent: &'static str, token: &str| {
        let f = auth_form(&h, agent, token);
        let h = &h;
        async move { post(h, "/oauth/introspect", &f).await }
    };
    for (agent, token, seen) in [
        // Its own client, and a client serving its tenant.
        ("reporter", &acme, true),
        ("auditor", &acme, true),
        ("partnerbot", &partner, true),
        ("auditor", &partner, true),
        // Another tenant's client, both ways.
        ("partnerbot", &acme, false),
        ("reporter", &partner, false),
        // A client serving neither, and an agent that is no client.
        ("intruder", &acme, false),
        ("nopolicy", &acme, false),
        ("nopolicy", &partner, false),
    ] {
        let a = ask(agent, token).await;
        assert_eq!(a.status, 200, "{agent}: {}", a.json);
        if seen {
            assert_eq!(a.json["active"], true, "{agent}: {}", a.json);
        } else {
            assert_eq!(a.json, json!({"active": false}), "{agent}");
        }
    }
}

/// Refusals of requests no client authenticated for (anyone on the
/// listener can send them as fast as it answers) are audited as such, for
/// the daemon to rate-limit; what an authenticated client does or is
/// refused is audited in full.
#[tokio::test]
async fn unauthenticated_refusals_are_audited_apart_from_authenticated_actions() {
    let h = harness().await;
    let (token, _) = issue(&h, &request(&h)).await;
    let unauthenticated = |h: &Harness| {
        h.mem
            .unauthenticated
            .lock()
            .unwrap()
            .iter()
            .map(|e| (e.event.clone(), e.outcome, e.agent.is_some()))
            .collect::<Vec<_>>()
    };
    assert_eq!(unauthenticated(&h), []);
    // Anonymous: a bad grant, no assertion, a forged assertion (at the
    // token endpoint and at revocation), a bad actor token beside a good
    // client assertion (not spent, so it can be replayed), a replay.
    let mut bad_grant = request(&h);
    set(&mut bad_grant, "grant_type", "x");
    let no_assertion = without(request(&h), "client_assertion");
    let mut forged = request(&h);
    let attacker =
        EncodingKey::from_ed_pem(include_bytes!("testdata/ed25519_attacker.pem")).unwrap();
    let forged_assertion = sign_raw(
        &attacker,
        Algorithm::EdDSA,
        &json!({"alg": "EdDSA", "kid": "1"}),
        &json!({"iss": "reporter", "sub": "reporter", "aud": ISSUER,
                "exp": now() + 60, "jti": "forged-1"}),
    );
    set(&mut forged, "client_assertion", &forged_assertion);
    let mut bad_actor = request(&h);
    set(&mut bad_actor, "actor_token", "a.b.c");
    let replayed = request(&h);
    issue(&h, &replayed).await;
    for form in [&bad_grant, &no_assertion, &forged, &bad_actor, &replayed] {
        assert_ne!(post(&h, "/oauth/token", form).await.status, 200);
    }
    let mut revoke = auth_form(&h, "reporter", &token);
    set(&mut revoke, "client_assertion", &forged_assertion);
    assert_eq!(post(&h, "/oauth/revoke", &revoke).await.status, 401);
    let revoke = without(auth_form(&h, "reporter", &token), "client_assertion");
    assert_eq!(post(&h, "/oauth/revoke", &revoke).await.status, 401);
    let refusal = |event: &str| (event.to_owned(), Outcome::Refused);
    assert_eq!(
        unauthenticated(&h)
            .into_iter()
            .map(|(e, o, _)| (e, o))
            .collect::<Vec<_>>(),
        [
            vec![refusal("oauth.token"); 5],
            vec![refusal("oauth.revoke"); 2]
        ]
        .concat()
    );
    // Authenticated: an issuance, a refusal by policy, a revocation of
    // someone else's token, a revocation: all audited in full.
    let before = h.mem.audit.lock().unwrap().len();
    issue(&h, &request(&h)).await;
    let mut scope = request(&h);
    set(&mut scope, "scope", "admin");
    assert_eq!(code_of(&h, scope).await, "invalid_scope");
    let f = auth_form(&h, "auditor", &token);
    assert_eq!(
        refused(&post(&h, "/oauth/revoke", &f).await, &f),
        "unauthorized_client"
    );
    let f = auth_form(&h, "reporter", &token);
    assert_eq!(post(&h, "/oauth/revoke", &f).await.status, 200);
    // Black-box finding: a replayed actor token beside a fresh client
    // assertion was counted with the listener's anonymous refusals; the
    // client authenticated, so the refusal is its own, in full.
    let used = request(&h);
    issue(&h, &used).await;
    let actor = used
        .iter()
        .find(|(k, _)| k == "actor_token")
        .unwrap()
        .1
        .clone();
    let mut replayed_actor = request(&h);
    set(&mut replayed_actor, "actor_token", &actor);
    let a = post(&h, "/oauth/token", &replayed_actor).await;
    assert_eq!(a.status, 400, "{}", a.json);
    assert_eq!(h.mem.audit.lock().unwrap().len(), before + 6);
    let last = h.mem.audit.lock().unwrap().last().cloned().unwrap();
    assert_eq!(last.outcome, Outcome::Refused);
    assert!(
        last.error.as_deref().unwrap_or("").contains("actor_token"),
        "{last:?}"
    );
    assert_eq!(unauthenticated(&h).len(), 7);
}

/// Decommissioning the agent that holds the signing credential destroys
/// its keys: the running service stops signing with it at once (a
/// `server_error` naming the reason), publishes it no more and its tokens
/// are inactive; the decommission's tokens item still verifies.
#[tokio::test]
async fn a_decommissioned_signer_signs_nothing_more() {
    let h = harness().await;
    let (token, _) = issue(&h, &request(&h)).await;
    h.mem
        .decommissioned
        .lock()
        .unwrap()
        .insert("keyturn".into(), now());
    let a = post(&h, "/oauth/token", &request(&h)).await;
    assert_eq!(a.status, 500, "{}", a.json);
    assert_eq!(a.json["error"], "server_error");
    // Black-box finding: a request the policy refuses was answered
    // `server_error` too, sending the caller to the operator.
    let mut scope = request(&h);
    set(&mut scope, "scope", "admin");
    assert_eq!(code_of(&h, scope).await, "invalid_scope");
    let jwks = get(&h, "/.well-known/jwks.json").await;
    assert_eq!(jwks.json, json!({"keys": []}));
    let a = post(&h, "/oauth/introspect", &auth_form(&h, "auditor", &token)).await;
    assert_eq!(a.json, json!({"active": false}));
    h.service
        .refuses_tokens_of("keyturn", now())
        .await
        .expect("the tokens item verifies");
}

#[tokio::test]
async fn tokens_stay_verifiable_across_a_signing_key_rotation() {
    let h = harness().await;
    let (old, _) = issue(&h, &request(&h)).await;
    // Rotate: v1 becomes previous, v2 current.
    let v2 = pair();
    {
        let mut s = h.mem.signing.lock().unwrap();
        s[0].0.stage = Stage::Previous;
        s.push((signing_row(2, Stage::Current, &v2.public), v2.private));
    }
    let (new, _) = issue(&h, &request(&h)).await;
    let (hn, _) = verify_with_jwks(&h, &new).await;
    assert_eq!(hn.kid, Some(kid(&h, 2)));
    let (ho, _) = verify_with_jwks(&h, &old).await;
    assert_eq!(ho.kid, Some(kid(&h, 1)));
    // Rotate again: v1 is retired, but a token it signed is still live, so
    // it stays published until that token expires.
    let v3 = pair();
    {
        let mut s = h.mem.signing.lock().unwrap();
        s[0].0.stage = Stage::Retired;
        s[1].0.stage = Stage::Previous;
        s.push((signing_row(3, Stage::Current, &v3.public), v3.private));
    }
    let kids: Vec<String> = get(&h, "/.well-known/jwks.json").await.json["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["kid"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(kids, [kid(&h, 3), kid(&h, 2), kid(&h, 1)]);
    verify_with_jwks(&h, &old).await;
    let a = post(&h, "/oauth/introspect", &auth_form(&h, "auditor", &old)).await;
    assert_eq!(a.json["active"], true);
    // A retired key that never signed anything live is not published.
    let v4 = pair();
    {
        let mut s = h.mem.signing.lock().unwrap();
        s.push((signing_row(4, Stage::Retired, &v4.public), v4.private));
    }
    let n = get(&h, "/.well-known/jwks.json").await.json["keys"]
        .as_array()
        .unwrap()
        .len();
    assert_eq!(n, 3);
}

/// Black-box finding: state keeps only the newest retired versions of a
/// credential, and a signing credential rotated often (eleven times
/// within a token's life) lost the row of the version that signed a live
/// token: its key left the JWKS, the token went inactive. The ledger keeps
/// the public key with the use.
#[tokio::test]
async fn a_live_tokens_key_stays_published_after_state_pruned_its_version() {
    let h = harness().await;
    let (old, _) = issue(&h, &request(&h)).await;
    let k1 = kid(&h, 1);
    let v2 = pair();
    {
        let mut s = h.mem.signing.lock().unwrap();
        // v1 retired, then pruned from state by later rotations.
        s.remove(0);
        s.push((signing_row(2, Stage::Current, &v2.public), v2.private));
    }
    let (hd, _) = verify_with_jwks(&h, &old).await;
    assert_eq!(hd.kid, Some(k1.clone()));
    let a = post(&h, "/oauth/introspect", &auth_form(&h, "auditor", &old)).await;
    assert_eq!(a.json["active"], true, "{}", a.json);
    assert_eq!(
        jwks_kids(&h, "/.well-known/jwks.json").await,
        [kid(&h, 2), k1]
    );
}

/// The `kid`s the JWKS at `path` publishes, in order.
async fn jwks_kids(h: &Harness, path: &str) -> Vec<String> {
    get(h, path).await.json["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["kid"].as_str().unwrap().to_owned())
        .collect()
}

/// bb7 #8: a reload that names another `signing_credential` (same version
/// number, another key) gives the new key a `kid` of its own, and keeps
/// the old credential's key published while a token it signed is live.
#[tokio::test]
async fn switching_the_signing_credential_keeps_old_tokens_verifiable() {
    let mut h = harness().await;
    let (old, _) = issue(&h, &request(&h)).await;
    let other = pair();
    h.mem.other_signing.lock().unwrap().push((
        signing_row_of(signer_key("signer2"), 1, Stage::Current, &other.public),
        other.private,
    ));
    let mut config = h.config.clone();
    config.signing_credential = signer_key("signer2");
    h.reload(config).await;
    let (new, _) = issue(&h, &request(&h)).await;
    let (hn, _) = verify_with_jwks(&h, &new).await;
    let (ho, _) = verify_with_jwks(&h, &old).await;
    let (new_kid, old_kid) = (kid_in(&h.mem.other_signing, 1), kid(&h, 1));
    assert_ne!(new_kid, old_kid);
    assert_eq!(hn.kid.as_ref(), Some(&new_kid));
    assert_eq!(ho.kid.as_ref(), Some(&old_kid));
    assert_eq!(
        jwks_kids(&h, "/.well-known/jwks.json").await,
        [new_kid, old_kid.clone()]
    );
    for t in [&old, &new] {
        let a = post(&h, "/oauth/introspect", &auth_form(&h, "auditor", t)).await;
        assert_eq!(a.json["active"], true, "{}", a.json);
    }
    // The old credential's key is the default set's only: the tenant with
    // a key of its own does not publish it.
    assert!(
        !jwks_kids(&h, "/tenants/partner/jwks.json")
            .await
            .contains(&old_kid)
    );
}

/// Defect (black-box): a reload that swapped the default set's and a
/// tenant's signing credentials published each set's current key in the
/// other's JWKS (as a key the set signed with before), so the tenants
/// trusted each other's tokens. A key version signs for one set only
/// while its tokens may be live, and is published by that set alone.
#[tokio::test]
async fn a_key_moved_to_another_set_is_never_trusted_by_both() {
    let mut h = harness().await;
    let (default_token, _) = issue(&h, &request(&h)).await;
    let form = partner_request(&h);
    let (partner_token, _) = issue(&h, &form).await;
    let default_kid = jsonwebtoken::decode_header(&default_token)
        .unwrap()
        .kid
        .unwrap();
    let partner_kid = jsonwebtoken::decode_header(&partner_token)
        .unwrap()
        .kid
        .unwrap();

    let mut config = h.config.clone();
    config.signing_credential = partner_signer();
    config.tenant_keys = [("partner".to_owned(), signer_key("signer"))].into();
    h.reload(config).await;
    let default_set = jwks_kids(&h, "/.well-known/jwks.json").await;
    let partner_set = jwks_kids(&h, "/tenants/partner/jwks.json").await;
    assert!(
        default_set.iter().all(|k| !partner_set.contains(k)),
        "a key in both sets: {default_set:?} {partner_set:?}"
    );
    // Each set still publishes the key its live tokens were signed with.
    assert!(default_set.contains(&default_kid), "{default_set:?}");
    assert!(partner_set.contains(&partner_kid), "{partner_set:?}");
    // And neither signs with the other's key while those tokens may be live.
    let a = post(&h, "/oauth/token", &request(&h)).await;
    assert_eq!(
        (a.status, &a.json["error"]),
        (500, &json!("server_error")),
        "{}",
        a.json
    );
}

/// Tokens signed before kids were thumbprints carry the version as `kid`
/// and their key's uses were recorded under the bare credential name:
/// while such a token may be live, its key is published under that kid
/// too, and it verifies and introspects active.
#[tokio::test]
async fn a_token_with_a_version_kid_of_before_verifies_while_one_may_be_live() {
    let h = harness().await;
    let (token, _) = issue(&h, &request(&h)).await;
    let (_, claims) = verify_with_jwks(&h, &token).await;
    let legacy = {
        let rows = h.mem.signing.lock().unwrap();
        let key = EncodingKey::from_ed_pem(rows[0].1.expose()).unwrap();
        sign_raw(
            &key,
            Algorithm::EdDSA,
            &json!({"alg": "EdDSA", "typ": "at+jwt", "kid": "1"}),
            &claims,
        )
    };
    let introspect = |t: String| {
        let h = &h;
        async move {
            post(h, "/oauth/introspect", &auth_form(h, "auditor", &t))
                .await
                .json
        }
    };
    // Nothing recorded under the old name: kid "1" names no key.
    assert_eq!(introspect(legacy.clone()).await, json!({"active": false}));
    assert_eq!(jwks_kids(&h, "/.well-known/jwks.json").await, [kid(&h, 1)]);
    // As a keyturn of before recorded its use.
    h.mem
        .store
        .signed("keyturn/signer", 1, now() + 600, None)
        .unwrap();
    assert_eq!(introspect(legacy.clone()).await["active"], true);
    assert_eq!(
        jwks_kids(&h, "/.well-known/jwks.json").await,
        [kid(&h, 1), "1".to_owned()]
    );
    verify_with_jwks(&h, &legacy).await;
}

/// bb7 #9: a client authenticates one way (RFC 6749 2.3: two methods are
/// `invalid_request`), a `client_id` beside the assertion must name the
/// client it authenticates (RFC 7521 4.2: else `invalid_client`), and a
/// 401 challenges with the scheme the client tried (RFC 6749 5.2).
#[tokio::test]
async fn client_authentication_is_one_method_naming_one_client() {
    let h = harness().await;
    const FORM: &str = "application/x-www-form-urlencoded";
    const BASIC: &str = "Basic cmVwb3J0ZXI6c2VjcmV0";
    // a) Another client's id with reporter's assertion, at each endpoint.
    let mut form = request(&h);
    set(&mut form, "client_id", "intruder");
    let a = post(&h, "/oauth/token", &form).await;
    assert_eq!(refused(&a, &form), "invalid_client");
    assert!(
        a.json["error_description"]
            .as_str()
            .unwrap()
            .contains("client_id"),
        "{}",
        a.json
    );
    let (token, _) = issue(&h, &request(&h)).await;
    for path in ["/oauth/introspect", "/oauth/revoke"] {
        let mut form = auth_form(&h, "reporter", &token);
        form.push(("client_id".into(), "intruder".into()));
        let a = post(&h, path, &form).await;
        assert_eq!(refused(&a, &form), "invalid_client", "{path}");
    }
    // Its own id is fine.
    let mut form = request(&h);
    set(&mut form, "client_id", "reporter");
    issue(&h, &form).await;
    let mut form = auth_form(&h, "reporter", &token);
    form.push(("client_id".into(), "reporter".into()));
    assert_eq!(
        post(&h, "/oauth/introspect", &form).await.json["active"],
        true
    );

    // b) Two methods in one request.
    let form = request(&h);
    let a = post_authorized(&h, "/oauth/token", FORM, encode(&form), Some(BASIC)).await;
    assert_eq!(a.status, 400);
    assert_eq!(refused(&a, &form), "invalid_request");
    let mut form = request(&h);
    set(&mut form, "client_secret", "secret");
    assert_eq!(code_of(&h, form).await, "invalid_request");
    let form = auth_form(&h, "reporter", &token);
    let a = post_authorized(&h, "/oauth/introspect", FORM, encode(&form), Some(BASIC)).await;
    assert_eq!(refused(&a, &form), "invalid_request");

    // c) Basic alone: 401 challenging Basic; the body's methods: not Basic.
    let basic_only = without(
        without(request(&h), "client_assertion"),
        "client_assertion_type",
    );
    let a = post_authorized(&h, "/oauth/token", FORM, encode(&basic_only), Some(BASIC)).await;
    assert_eq!(refused(&a, &basic_only), "invalid_client");
    assert_eq!(
        a.headers["www-authenticate"],
        format!("Basic realm=\"{ISSUER}\"").as_str()
    );
    let form = without(request(&h), "client_assertion");
    let a = post(&h, "/oauth/token", &form).await;
    assert_eq!(refused(&a, &form), "invalid_client");
    let challenge = a.headers["www-authenticate"].to_str().unwrap();
    assert!(!challenge.starts_with("Basic"), "{challenge}");
}

/// The claims of a JWT, unverified (the test checks them, not the key).
fn claims_of(token: &str) -> Value {
    use base64::Engine as _;
    let payload = token.split('.').nth(1).unwrap();
    serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload)
            .unwrap(),
    )
    .unwrap()
}

/// bb7 #10: refusals say what is wrong, every answer is `no-store`, `typ`
/// is compared as sent, the issuer is kept exactly as configured and the
/// metadata of an issuer with a path is where RFC 8414 3.1 puts it.
#[tokio::test]
async fn diagnostics_headers_and_the_issuer_are_exact() {
    let mut h = harness().await;
    // a) An `exp` that is there but is no time is invalid, not missing.
    for exp in [json!("9999999999"), json!(1e20)] {
        let mut form = request(&h);
        let t = subject_with(&h, json!({}), json!({ "exp": exp }));
        set(&mut form, "subject_token", &t);
        let a = post(&h, "/oauth/token", &form).await;
        refused(&a, &form);
        let d = a.json["error_description"].as_str().unwrap();
        assert!(d.contains("exp") && !d.contains("has no"), "{d}");
    }
    // b) So for an assertion's.
    let mut form = request(&h);
    let bad = assertion_with(&h, "reporter", "reporter", json!({}), json!({ "exp": -1 }));
    set(&mut form, "client_assertion", &bad);
    let a = post(&h, "/oauth/token", &form).await;
    assert_eq!(refused(&a, &form), "invalid_client");
    let d = a.json["error_description"].as_str().unwrap();
    assert!(d.contains("exp is not a non-negative integer"), "{d}");
    // c) A method the JWKS and metadata do not take: 405 as the service
    // words its errors, never cached.
    for path in [
        "/.well-known/jwks.json",
        "/.well-known/oauth-authorization-server",
        "/tenants/partner/jwks.json",
        "/.well-known/oauth-authorization-server/tenants/partner",
    ] {
        let a = post_raw(&h, path, "application/x-www-form-urlencoded", String::new()).await;
        assert_eq!(a.status, 405, "{path}");
        assert_eq!(a.headers["cache-control"], "no-store", "{path}");
        assert_eq!(a.headers["allow"], "GET", "{path}");
        assert_eq!(a.json["error"], "invalid_request", "{path}");
    }
    // d) `typ` with trailing whitespace is not `at+jwt`.
    let mut form = request(&h);
    let t = subject_with(&h, json!({ "typ": "at+jwt " }), json!({}));
    set(&mut form, "subject_token", &t);
    refused(&post(&h, "/oauth/token", &form).await, &form);

    // Black-box finding: an issuer of no path and a final `/` had its
    // metadata at the well-known URL, but 404 with the `/` kept.
    let mut config = h.config.clone();
    config.issuer = format!("{ISSUER}/");
    h.reload(config).await;
    let m = get(&h, "/.well-known/oauth-authorization-server").await;
    assert_eq!(m.status, 200, "{}", m.json);
    assert_eq!(m.json["issuer"], format!("{ISSUER}/"));
    let slash = get(&h, "/.well-known/oauth-authorization-server/").await;
    assert_eq!((slash.status, &slash.json), (200, &m.json));

    // e) and f): an issuer with a path and a final `/`, kept exactly.
    let iss = format!("{ISSUER}/kt/");
    let mut config = h.config.clone();
    config.issuer = iss.clone();
    h.reload(config).await;
    let m = get(&h, "/.well-known/oauth-authorization-server/kt").await;
    assert_eq!(m.status, 200, "{}", m.json);
    assert_eq!(m.json["issuer"], iss.as_str());
    // Black-box finding: authlib keeps the final `/` in the well-known URL
    // (RFC 8414 3.1 drops it): served too.
    let slash = get(&h, "/.well-known/oauth-authorization-server/kt/").await;
    assert_eq!((slash.status, &slash.json), (200, &m.json));
    assert_eq!(m.json["token_endpoint"], format!("{ISSUER}/kt/oauth/token"));
    let t = get(
        &h,
        "/.well-known/oauth-authorization-server/kt/tenants/partner",
    )
    .await;
    assert_eq!(t.json["issuer"], format!("{ISSUER}/kt/tenants/partner"));
    assert_eq!(
        get_raw(&h, "/.well-known/oauth-authorization-server/other")
            .await
            .status(),
        404
    );
    let mut form = request(&h);
    let named =
        |h: &Harness| assertion_with(h, "reporter", "reporter", json!({}), json!({ "aud": iss }));
    set(&mut form, "client_assertion", &named(&h));
    set(&mut form, "actor_token", &named(&h));
    let (token, _) = issue(&h, &form).await;
    assert_eq!(claims_of(&token)["iss"], iss.as_str());
    let mut form = auth_form(&h, "auditor", &token);
    let by_auditor = assertion_with(&h, "auditor", "auditor", json!({}), json!({ "aud": iss }));
    set(&mut form, "client_assertion", &by_auditor);
    let a = post(&h, "/oauth/introspect", &form).await;
    assert_eq!(a.json["active"], true, "{}", a.json);
}

#[tokio::test]
async fn a_token_for_a_task_carries_its_attribution_and_ends_with_it() {
    let h = harness().await;
    let task = |tenant: &str, expires_at: i64| TaskClaims {
        task_id: "t1".into(),
        run_id: "run-42".into(),
        use_case: "invoicing".into(),
        tenant: tenant.into(),
        expires_at: u64::try_from(expires_at).unwrap(),
    };
    h.mem
        .tasks
        .lock()
        .unwrap()
        .insert("t1".into(), ("reporter".into(), task("acme", now() + 30)));
    let mut f = request(&h);
    set(&mut f, "task_id", "t1");
    let (token, answer) = issue(&h, &f).await;
    assert!(
        answer["expires_in"].as_u64().unwrap() <= 30,
        "{answer}: ends with the task"
    );
    let (_, claims) = verify_with_jwks(&h, &token).await;
    assert_eq!(claims["txn"], "run-42");
    assert_eq!(claims["use_case"], "invoicing");
    assert_eq!(claims["task_id"], "t1");
    let a = post(&h, "/oauth/introspect", &auth_form(&h, "auditor", &token)).await;
    assert_eq!(a.json["txn"], "run-42");
    assert_eq!(a.json["task_id"], "t1");
    // The task ended early (`keyturn task end`): its token is inactive at
    // once, not at its `exp`.
    let live = h.mem.tasks.lock().unwrap().remove("t1").unwrap();
    let a = post(&h, "/oauth/introspect", &auth_form(&h, "auditor", &token)).await;
    assert_eq!(a.json, json!({ "active": false }));
    h.mem.tasks.lock().unwrap().insert("t1".into(), live);

    // Another agent's task, an unknown one, and one of another tenant.
    h.mem
        .tasks
        .lock()
        .unwrap()
        .insert("t2".into(), ("intruder".into(), task("acme", now() + 30)));
    h.mem
        .tasks
        .lock()
        .unwrap()
        .insert("t3".into(), ("reporter".into(), task("globex", now() + 30)));
    for id in ["t2", "nope", "t3"] {
        let mut f = request(&h);
        set(&mut f, "task_id", id);
        assert_eq!(code_of(&h, f).await, "invalid_request", "task {id}");
    }
}

// The pre-authenticated path (the daemon's sockets, by peer uid): the same
// exchange, checks and error codes as over HTTP.

fn peer_request(h: &Harness) -> super::service::AgentExchange {
    super::service::AgentExchange {
        params: super::exchange::Params {
            audience: vec![API.into()],
            ..Default::default()
        },
        subject_token: SecretValue::from_string(subject(h)),
        subject_token_type: Some(TOKEN_TYPE_AT.into()),
        actor_token: None,
    }
}

fn by_peer() -> super::service::Authenticated {
    super::service::Authenticated {
        actor: crate::audit::Actor::Peer {
            uid: 1234,
            gid: 1234,
            pid: 42,
        },
        how: "authenticated by peer uid=1234 (pid 42) on a socket".into(),
    }
}

async fn by_uid(
    h: &Harness,
    agent: &str,
    req: super::service::AgentExchange,
) -> Result<super::exchange::Issued, super::exchange::ExchangeError> {
    h.service.token_for_agent(agent, req, by_peer()).await
}

async fn code_by_uid(h: &Harness, agent: &str, req: super::service::AgentExchange) -> &'static str {
    match by_uid(h, agent, req).await {
        Ok(i) => panic!("issued: {i:?}"),
        Err(e) => {
            let ev = h.mem.audit.lock().unwrap().last().cloned().unwrap();
            assert_eq!(ev.event, "oauth.token");
            assert_eq!(ev.outcome, Outcome::Refused, "{ev:?}");
            assert!(ev.detail.as_deref().unwrap().contains("by peer uid=1234"));
            e.code
        }
    }
}

#[tokio::test]
async fn an_agent_authenticated_by_peer_uid_gets_the_same_token() {
    let h = harness().await;
    let mut req = peer_request(&h);
    // The subject has read, write and admin; the agent read and write.
    req.params.scope = Some("read:reports admin".into());
    let subject_sig = req
        .subject_token
        .expose_str()
        .unwrap()
        .rsplit('.')
        .next()
        .unwrap()
        .to_owned();
    let issued = by_uid(&h, "reporter", req).await.unwrap();
    assert_eq!(
        issued.scope, "read:reports",
        "never wider than asked or held"
    );
    // No actor token: the client's TTL (under the policy's) caps it.
    assert!(
        (115..=120).contains(&issued.expires_in),
        "{}",
        issued.expires_in
    );
    let body = super::service::answer(&issued);
    assert_token_answer_fields(&body);
    assert_eq!(body["issued_token_type"], TOKEN_TYPE_AT);
    let token = issued.access_token.expose_str().unwrap().to_owned();
    assert!(!format!("{issued:?}").contains(&token));
    let (header, claims) = verify_with_jwks(&h, &token).await;
    assert_eq!(header.typ.as_deref(), Some("at+jwt"));
    assert_eq!(claims["sub"], "alice@example.com");
    assert_eq!(claims["act"], json!({ "sub": "reporter" }));
    assert_eq!(claims["client_id"], "reporter");
    assert_eq!(claims["scope"], "read:reports");
    let a = post(&h, "/oauth/introspect", &auth_form(&h, "auditor", &token)).await;
    assert_eq!(a.json["active"], true, "{}", a.json);
    assert_eq!(a.json["client_id"], "reporter");

    // Audited as authenticated by peer uid, by that peer, without a token.
    let audit = h.mem.audit.lock().unwrap().clone();
    let ev = audit.iter().rfind(|e| e.event == "oauth.token").unwrap();
    assert_eq!(ev.outcome, Outcome::Ok);
    assert_eq!(ev.agent.as_ref().unwrap().as_str(), "reporter");
    assert_eq!(
        ev.actor,
        crate::audit::Actor::Peer {
            uid: 1234,
            gid: 1234,
            pid: 42
        }
    );
    let detail = ev.detail.as_deref().unwrap();
    assert!(
        detail.contains("authenticated by peer uid=1234"),
        "{detail}"
    );
    assert!(detail.contains("scope \"read:reports\""), "{detail}");
    let text = serde_json::to_string(&audit).unwrap();
    assert!(!text.contains(token.rsplit('.').next().unwrap()));
    assert!(!text.contains(&subject_sig));

    // The same refusals as over HTTP.
    let mut r = peer_request(&h);
    r.params.scope = Some("admin".into());
    assert_eq!(code_by_uid(&h, "reporter", r).await, "invalid_scope");
    let mut r = peer_request(&h);
    r.params.audience = vec!["https://evil.test".into()];
    assert_eq!(code_by_uid(&h, "reporter", r).await, "invalid_target");
    let mut r = peer_request(&h);
    r.subject_token_type = Some("urn:ietf:params:oauth:token-type:id_token".into());
    assert_eq!(code_by_uid(&h, "reporter", r).await, "invalid_request");
    let mut r = peer_request(&h);
    r.subject_token = SecretValue::from_string(String::new());
    assert_eq!(code_by_uid(&h, "reporter", r).await, "invalid_request");
    let mut r = peer_request(&h);
    r.subject_token =
        SecretValue::from_string(subject_with(&h, json!({}), json!({ "exp": now() - 3600 })));
    assert_eq!(code_by_uid(&h, "reporter", r).await, "invalid_request");
    // Another tenant's subject: `intruder` serves only other-tenant.
    assert_eq!(
        code_by_uid(&h, "intruder", peer_request(&h)).await,
        "invalid_request"
    );
    // An agent that is not a client of the service.
    assert_eq!(
        code_by_uid(&h, "nopolicy", peer_request(&h)).await,
        "unauthorized_client"
    );
    // A decommissioned agent, at once.
    h.mem
        .decommissioned
        .lock()
        .unwrap()
        .insert("reporter".into(), now());
    assert_eq!(
        code_by_uid(&h, "reporter", peer_request(&h)).await,
        "invalid_client"
    );
}

#[tokio::test]
async fn by_peer_uid_an_actor_token_is_the_agents_own_and_single_use() {
    let h = harness().await;
    // The agent's own assertion: accepted, and its exp caps the token.
    let actor = assertion(&h, "reporter");
    let mut r = peer_request(&h);
    r.actor_token = Some(SecretValue::from_string(actor.clone()));
    let issued = by_uid(&h, "reporter", r).await.unwrap();
    assert!(issued.expires_in <= 60, "{}", issued.expires_in);
    // Replayed: refused.
    let mut r = peer_request(&h);
    r.actor_token = Some(SecretValue::from_string(actor));
    assert_eq!(code_by_uid(&h, "reporter", r).await, "invalid_request");
    let ev = h.mem.audit.lock().unwrap().last().cloned().unwrap();
    assert!(
        ev.error.as_deref().unwrap().contains("actor_token"),
        "{ev:?}"
    );
    // Another agent's assertion (the confused deputy): refused.
    let mut r = peer_request(&h);
    r.actor_token = Some(SecretValue::from_string(assertion(&h, "intruder")));
    assert_eq!(code_by_uid(&h, "reporter", r).await, "invalid_request");
    // One signed with another agent's key: refused.
    let mut r = peer_request(&h);
    r.actor_token = Some(SecretValue::from_string(assertion_with(
        &h,
        "reporter",
        "intruder",
        json!({}),
        json!({}),
    )));
    assert_eq!(code_by_uid(&h, "reporter", r).await, "invalid_request");
}

#[tokio::test]
async fn by_peer_uid_a_task_binds_the_token() {
    let h = harness().await;
    let task = |tenant: &str| TaskClaims {
        task_id: "t1".into(),
        run_id: "run-7".into(),
        use_case: "invoicing".into(),
        tenant: tenant.into(),
        expires_at: u64::try_from(now() + 30).unwrap(),
    };
    let tasks = [
        ("t1", "reporter", "acme"),
        ("t2", "intruder", "acme"),
        ("t3", "reporter", "globex"),
    ];
    for (id, agent, tenant) in tasks {
        let mut t = task(tenant);
        t.task_id = id.into();
        h.mem
            .tasks
            .lock()
            .unwrap()
            .insert(id.into(), (agent.into(), t));
    }
    let mut r = peer_request(&h);
    r.params.task_id = Some("t1".into());
    let issued = by_uid(&h, "reporter", r).await.unwrap();
    assert!(issued.expires_in <= 30, "ends with the task");
    let (_, claims) = verify_with_jwks(&h, issued.access_token.expose_str().unwrap()).await;
    assert_eq!(claims["txn"], "run-7");
    assert_eq!(claims["task_id"], "t1");
    for id in ["t2", "nope", "t3"] {
        let mut r = peer_request(&h);
        r.params.task_id = Some(id.into());
        assert_eq!(
            code_by_uid(&h, "reporter", r).await,
            "invalid_request",
            "task {id}"
        );
    }
}

/// Tenant `partner` has its own signing key: its tokens carry its own `iss`
/// and `kid`s and are published only in its own JWKS, so a resource server
/// of one tenant never trusts another's; introspection checks each token
/// against its own key set.
#[tokio::test]
async fn a_tenant_with_its_own_key_has_its_own_issuer_kids_jwks_and_metadata() {
    let h = harness().await;
    let tenant_iss = format!("{ISSUER}/tenants/partner");
    let mut form = request(&h);
    set(
        &mut form,
        "subject_token",
        &subject_with(&h, json!({}), json!({ "iss": PARTNER_IDP })),
    );
    // The client may name the service by its tenant's issuer.
    let partner_assertion = || {
        assertion_with(
            &h,
            "partnerbot",
            "partnerbot",
            json!({}),
            json!({ "aud": tenant_iss }),
        )
    };
    set(&mut form, "client_assertion", &partner_assertion());
    set(&mut form, "actor_token", &partner_assertion());
    set(&mut form, "scope", "read:reports");
    let (token, _) = issue(&h, &form).await;
    let header = jsonwebtoken::decode_header(&token).unwrap();
    let partner_kid = kid_in(&h.mem.partner_signing, 1);
    assert_eq!(header.kid.as_ref(), Some(&partner_kid));

    // Its own JWKS verifies it, with its own `iss`; the default JWKS does
    // not have its key, and its JWKS does not have the default key.
    let own = get(&h, "/tenants/partner/jwks.json").await;
    assert_eq!(own.status, 200);
    assert_eq!(own.headers["cache-control"], "no-store");
    let set_p: jsonwebtoken::jwk::JwkSet = serde_json::from_value(own.json).unwrap();
    assert_eq!(
        set_p
            .keys
            .iter()
            .map(|k| k.common.key_id.clone().unwrap())
            .collect::<Vec<_>>(),
        std::slice::from_ref(&partner_kid)
    );
    let mut v = Validation::new(Algorithm::EdDSA);
    v.set_issuer(&[&tenant_iss]);
    v.set_audience(&[API]);
    let claims = jsonwebtoken::decode::<Value>(
        &token,
        &DecodingKey::from_jwk(set_p.find(&partner_kid).unwrap()).unwrap(),
        &v,
    )
    .unwrap()
    .claims;
    assert_eq!(claims["tenant"], "partner");
    assert_eq!(claims["iss"], tenant_iss.as_str());
    let default: jsonwebtoken::jwk::JwkSet =
        serde_json::from_value(get(&h, "/.well-known/jwks.json").await.json).unwrap();
    assert!(default.find(&partner_kid).is_none());
    assert_eq!(default.keys.len(), 1);

    // A tenant without a key of its own (acme) signs with the default key.
    let (acme, _) = issue(&h, &request(&h)).await;
    let hd = jsonwebtoken::decode_header(&acme).unwrap();
    assert_eq!(hd.kid, Some(kid(&h, 1)));
    assert!(set_p.find(&kid(&h, 1)).is_none());

    // RFC 8414 3.1 metadata of the tenant's issuer.
    let m = get(
        &h,
        "/.well-known/oauth-authorization-server/tenants/partner",
    )
    .await;
    assert_eq!(m.status, 200);
    assert_eq!(m.json["issuer"], tenant_iss.as_str());
    assert_eq!(
        m.json["jwks_uri"],
        format!("{ISSUER}/tenants/partner/jwks.json")
    );
    assert_eq!(m.json["token_endpoint"], format!("{ISSUER}/oauth/token"));
    for path in [
        "/tenants/acme/jwks.json",
        "/tenants/nobody/jwks.json",
        "/tenants/..%2F..%2Fetc/jwks.json",
        "/.well-known/oauth-authorization-server/tenants/acme",
    ] {
        assert_eq!(get_raw(&h, path).await.status(), 404, "{path}");
    }

    // Introspection: both active, each checked against its own key set.
    for t in [&token, &acme] {
        let a = post(&h, "/oauth/introspect", &auth_form(&h, "auditor", t)).await;
        assert_eq!(a.json["active"], true, "{}", a.json);
    }
    let a = post(&h, "/oauth/introspect", &auth_form(&h, "auditor", &token)).await;
    assert_eq!(a.json["iss"], tenant_iss.as_str());

    // Forgeries across key sets are inactive: the partner key under the
    // default `iss`, and under a default `kid`.
    let partner_key = {
        let rows = h.mem.partner_signing.lock().unwrap();
        EncodingKey::from_ed_pem(rows[0].1.expose()).unwrap()
    };
    let resign = |kid: &str, claims: &Value| {
        sign_raw(
            &partner_key,
            Algorithm::EdDSA,
            &json!({"alg": "EdDSA", "typ": "at+jwt", "kid": kid}),
            claims,
        )
    };
    let mut c = claims.clone();
    c["iss"] = json!(ISSUER);
    c["tenant"] = json!("acme");
    for (what, t) in [
        ("iss", resign(&partner_kid, &c)),
        ("kid", resign(&kid(&h, 1), &claims)),
    ] {
        let a = post(&h, "/oauth/introspect", &auth_form(&h, "auditor", &t)).await;
        assert_eq!(a.json, json!({"active": false}), "forged {what}");
    }
    // The genuine claims re-signed correctly stay valid: the refusals above
    // are about the key set, not the claims.
    let genuine = resign(&partner_kid, &claims);
    let a = post(&h, "/oauth/introspect", &auth_form(&h, "auditor", &genuine)).await;
    assert_eq!(a.json["active"], true);
}

/// The listener answers with whatever service the slot holds (the daemon
/// swaps it on a reload): 404 while it is empty, at once when filled.
#[tokio::test]
async fn the_listener_serves_the_service_in_the_slot() {
    let h = harness().await;
    let old = h.slot.set(None).expect("the harness serves one");
    for path in ["/.well-known/jwks.json", "/tenants/partner/jwks.json"] {
        assert_eq!(get_raw(&h, path).await.status(), 404, "{path}");
    }
    let r = h
        .http
        .post(format!("http://{}/oauth/token", h.addr))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(encode(&request(&h)))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    h.slot.set(Some(old));
    issue(&h, &request(&h)).await;
}

#[test]
fn a_reply_debug_never_shows_the_access_token() {
    let token = "eyJhbGciOiJFZERTQSJ9.canary-claims.canary-signature-part";
    let reply = super::service::Reply {
        status: 200,
        body: Some(json!({ "access_token": token, "token_type": "Bearer", "expires_in": 60 })),
    };
    let shown = format!("{reply:?} {reply:#?}");
    assert!(!shown.contains("canary"), "{shown}");
    assert!(shown.contains("<redacted>"), "{shown}");
    assert!(shown.contains("200") && shown.contains("Bearer"), "{shown}");
    // An error reply is shown whole.
    let e = super::service::Reply {
        status: 400,
        body: Some(json!({ "error": "invalid_scope" })),
    };
    assert!(format!("{e:?}").contains("invalid_scope"));
}

#[tokio::test]
async fn the_oauth_token_record_names_the_task_and_its_run() {
    let h = harness().await;
    h.mem.tasks.lock().unwrap().insert(
        "t1".into(),
        (
            "reporter".into(),
            TaskClaims {
                task_id: "t1".into(),
                run_id: "run-42".into(),
                use_case: "invoicing".into(),
                tenant: "acme".into(),
                expires_at: u64::try_from(now() + 30).unwrap(),
            },
        ),
    );
    let mut f = request(&h);
    set(&mut f, "task_id", "t1");
    issue(&h, &f).await;
    let mut refused = request(&h);
    set(&mut refused, "task_id", "gone-7");
    assert_eq!(code_of(&h, refused).await, "invalid_request");
    issue(&h, &request(&h)).await;
    let audit = h.mem.audit.lock().unwrap();
    let details: Vec<(Outcome, String)> = audit
        .iter()
        .filter(|e| e.event == "oauth.token")
        .map(|e| (e.outcome, e.detail.clone().unwrap_or_default()))
        .collect();
    assert_eq!(details.len(), 3, "{details:?}");
    assert_eq!(details[0].0, Outcome::Ok);
    assert!(
        details[0].1.contains(r#"task "t1", run_id "run-42""#),
        "{details:?}"
    );
    assert_eq!(details[1].0, Outcome::Refused);
    assert!(details[1].1.contains(r#"task "gone-7""#), "{details:?}");
    assert!(!details[2].1.contains("task"), "no task named: {details:?}");
}

#[tokio::test]
async fn the_tokens_probe_passes_only_when_the_service_refuses_the_agents_tokens() {
    use crate::revocation::items::verify_tokens;
    let h = harness().await;
    let agent = AgentId::new("reporter").unwrap();
    let (live, _) = issue(&h, &request(&h)).await;
    let audited = h.mem.audit.lock().unwrap().len();
    // Every use of `c`'s keys, under any name.
    let signed = |c: &CredentialKey| {
        let mut uses = h.mem.store.signed_under("").unwrap();
        uses.retain(|(name, _, _)| name.ends_with(&c.to_string()));
        uses
    };
    let default_signer = CredentialKey::new(
        AgentId::new("keyturn").unwrap(),
        CredentialId::new("signer").unwrap(),
    );
    let signed_before = (signed(&default_signer), signed(&partner_signer()));
    let epoch = chrono::Utc::now();

    // Not decommissioned (or a backend that forgot it): the service would
    // still accept its tokens, so the item is not verified.
    let e = verify_tokens(Some(&*h.service), &agent, epoch)
        .await
        .unwrap_err();
    assert_eq!(e.kind, crate::model::ErrorKind::Transient);
    assert!(e.message.contains("still active"), "{}", e.message);
    // Not served yet: nothing proved either.
    assert!(verify_tokens(None, &agent, epoch).await.is_err());
    // Decommissioned before the epoch: a token issued in between names the
    // agent as well, and is refused as well.
    h.mem
        .decommissioned
        .lock()
        .unwrap()
        .insert("reporter".into(), epoch.timestamp() - 10);
    verify_tokens(Some(&*h.service), &agent, epoch)
        .await
        .unwrap();

    // Decommissioned at the epoch: refused as client and in act chains.
    h.mem
        .decommissioned
        .lock()
        .unwrap()
        .insert("reporter".into(), epoch.timestamp());
    let note = verify_tokens(Some(&*h.service), &agent, epoch)
        .await
        .unwrap();
    assert!(
        note.contains("refuses every token naming reporter"),
        "{note}"
    );
    // So is the live token it held.
    let a = post(&h, "/oauth/introspect", &auth_form(&h, "auditor", &live)).await;
    assert_eq!(a.json, json!({"active": false}));
    // The probes went nowhere: no audit record, no ledger write.
    assert_eq!(
        h.mem
            .audit
            .lock()
            .unwrap()
            .iter()
            .skip(audited)
            .filter(|e| e.event != "oauth.introspect")
            .count(),
        0
    );
    assert_eq!(
        (signed(&default_signer), signed(&partner_signer())),
        signed_before
    );
}

/// The `tokens` item in a whole decommission: the decision records it,
/// it stays unverified (retried, with why, across a restart) while the
/// token service still accepts the agent's tokens, and completes the
/// decommission, within the SLA, once the service refuses them.
#[tokio::test]
async fn a_decommission_verifies_its_tokens_item_through_the_token_service() {
    use crate::revocation::{Decision, Revocations};
    let h = harness().await;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display();
    let text = format!(
        r#"[daemon]
state_dir = "{d}/state"
socket = "{d}/control.sock"
listen = "127.0.0.1:9"
retry = {{ initial_delay = "200ms", max_delay = "400ms" }}
[vaults.local]
type = "local"
{bot}{keyturn}[agents.keyturn.credentials.signer]
vault = "local"
every = "24h"
generate = {{ kind = "ed25519" }}
[token_service]
issuer = "{ISSUER}"
signing_credential = "keyturn/signer"
"#,
        bot =
            crate::test_support::agent_table("reporter") + &crate::test_support::agent_table("old"),
        keyturn = crate::test_support::agent_table("keyturn"),
    );
    let store = Arc::new(crate::state::MemoryStore::new());
    // A daemon over `store`: its revocations and what stops it.
    let daemon = || async {
        use crate::state::StateStore as _;
        let config = crate::config::load_str(&dir.path().join("k.toml"), &text).expect("config");
        let catalog = crate::rotation::Catalog::build(config, None).unwrap();
        let head = store.audit_head().unwrap();
        let audit =
            crate::audit::AuditLog::open_inline(&dir.path().join("audit.log"), head.as_ref())
                .unwrap();
        let cancel = CancellationToken::new();
        let engine = crate::rotation::Engine::with_clock_inline(
            crate::rotation::EngineParts {
                catalog,
                state: store.clone(),
                audit,
                metrics: Arc::new(crate::telemetry::Metrics::new()),
                cancel: cancel.clone(),
                tracker: tokio_util::task::TaskTracker::new(),
            },
            Arc::new(crate::rotation::SystemClock),
        );
        let r = Revocations::start(engine, Arc::new(tokio::sync::Notify::new()))
            .await
            .unwrap();
        (r, cancel)
    };
    let (revocations, cancel) = daemon().await;
    let agent = AgentId::new("reporter").unwrap();
    let (_, decom) = revocations
        .decide(Decision {
            agent: agent.clone(),
            reason: "retired".into(),
            by: None,
            actor: crate::audit::Actor::Daemon,
            source: "command",
            decided_at: None,
        })
        .await
        .unwrap();
    let tokens = decom
        .items
        .iter()
        .find(|i| i.item == "tokens")
        .expect("a tokens item");
    assert_eq!(
        (tokens.kind.as_str(), tokens.credential.as_ref()),
        ("tokens", None)
    );
    let epoch = decom.row.token_epoch();
    assert_eq!(epoch, decom.row.decided_at, "decided now: the decision");

    // A decision the config dates in the past: its tokens' epoch is when
    // the daemon recorded it, so tokens issued in between are covered.
    let (_, late) = revocations
        .decide(Decision {
            agent: AgentId::new("old").unwrap(),
            reason: "gitops".into(),
            by: None,
            actor: crate::audit::Actor::Daemon,
            source: "config",
            decided_at: Some(chrono::Utc::now() - chrono::Duration::days(1)),
        })
        .await
        .unwrap();
    let spec =
        crate::revocation::items::parse(late.items.iter().find(|i| i.item == "tokens").unwrap())
            .unwrap();
    assert_eq!(
        spec,
        crate::revocation::items::Spec::Tokens {
            issued_up_to: late.row.recorded_at
        }
    );
    assert!(late.row.recorded_at > late.row.decided_at);

    // Served by a token service whose backend does not know the decision.
    revocations.serve_tokens(h.service.clone());
    let item = |r: &Revocations| {
        r.get(&agent)
            .unwrap()
            .items
            .into_iter()
            .find(|i| i.item == "tokens")
            .unwrap()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while item(&revocations).attempts < 2 {
        assert!(std::time::Instant::now() < deadline, "never retried");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let pending = item(&revocations);
    assert_eq!(pending.verified_at, None);
    assert_eq!(pending.revoked_at, Some(epoch), "revoked at the decision");
    assert!(
        pending
            .last_error
            .as_deref()
            .unwrap()
            .contains("still active"),
        "{pending:?}"
    );
    assert!(!revocations.get(&agent).unwrap().complete());

    // Restarted: resumed from state, still not verified.
    cancel.cancel();
    let (revocations, cancel) = daemon().await;
    let before = item(&revocations).attempts;
    revocations.serve_tokens(h.service.clone());
    while item(&revocations).attempts <= before {
        assert!(std::time::Instant::now() < deadline, "not resumed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(item(&revocations).verified_at, None);
    let row = revocations
        .lifecycle()
        .into_iter()
        .find(|l| l.agent == agent)
        .unwrap();
    assert_eq!(row.state, "decommissioning");
    assert!(row.pending.iter().any(|p| p.item == "tokens"), "{row:?}");
    assert_eq!(row.tokens.as_ref().unwrap().verified_at, None);

    // The service learns the decision: verified, and the decommission ends.
    h.mem
        .decommissioned
        .lock()
        .unwrap()
        .insert("reporter".into(), epoch.timestamp());
    while !revocations.get(&agent).unwrap().complete() {
        assert!(std::time::Instant::now() < deadline, "never verified");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let row = revocations
        .lifecycle()
        .into_iter()
        .find(|l| l.agent == agent)
        .unwrap();
    assert_eq!(row.state, "decommissioned");
    let t = row.tokens.expect("the tokens progress");
    assert_eq!(t.issued_up_to, epoch);
    assert!(t.to_verified_ms.unwrap() >= 0);
    assert!(
        t.verified_at.unwrap() <= row.deadline.unwrap(),
        "within the SLA"
    );
    let records: Vec<String> = std::fs::read_to_string(dir.path().join("audit.log"))
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    let find = |event: &str| {
        records
            .iter()
            .filter(|l| l.contains(&format!("\"event\":\"{event}\"")))
            .cloned()
            .collect::<Vec<_>>()
    };
    assert!(
        find("revocation.failed")
            .iter()
            .any(|l| l.contains("item=tokens"))
    );
    assert!(
        find("revocation.verified")
            .iter()
            .any(|l| l.contains("item=tokens"))
    );
    let done = find("decommission.verified");
    assert_eq!(done.len(), 1, "{records:?}");
    assert!(
        done[0].contains(" met ") && done[0].contains("tokens: decision→verified"),
        "{}",
        done[0]
    );
    cancel.cancel();
}

/// Black-box finding: a client assertion naming another tenant's issuer as
/// `aud` was taken. It names the service's issuer, its token endpoint, or
/// the issuer of a tenant the agent is a client of.
#[tokio::test]
async fn a_client_assertion_for_another_tenants_issuer_is_refused() {
    let h = harness().await;
    let partner = format!("{ISSUER}/tenants/partner");
    let named = |h: &Harness, aud: &str| {
        assertion_with(h, "reporter", "reporter", json!({}), json!({ "aud": aud }))
    };
    let mut form = request(&h);
    set(&mut form, "client_assertion", &named(&h, &partner));
    let a = post(&h, "/oauth/token", &form).await;
    assert_eq!(
        (a.status, &a.json["error"]),
        (401, &json!("invalid_client"))
    );
    let why = a.json["error_description"].as_str().unwrap();
    assert!(why.contains("names no issuer of a tenant"), "{why}");
    refused(&a, &form);
    // The token endpoint, and the service's issuer, are names of it.
    for aud in [format!("{ISSUER}/oauth/token"), ISSUER.to_owned()] {
        let mut form = request(&h);
        set(&mut form, "client_assertion", &named(&h, &aud));
        set(&mut form, "actor_token", &named(&h, &aud));
        issue(&h, &form).await;
    }
}

/// Black-box finding: `scope=` or `client_id=` sent empty (as some client
/// libraries always do) was refused as a bad value; RFC 6749 3.2 has a
/// parameter without a value treated as omitted.
#[tokio::test]
async fn parameters_sent_without_a_value_are_omitted() {
    let h = harness().await;
    let mut form = request(&h);
    for k in [
        "scope",
        "client_id",
        "task_id",
        "audience",
        "resource",
        "requested_token_type",
    ] {
        form.push((k.to_owned(), String::new()));
    }
    let a = post(&h, "/oauth/token", &form).await;
    assert_eq!(a.status, 200, "{}", a.json);
    let (token, _) = issue(&h, &request(&h)).await;
    let mut f = auth_form(&h, "reporter", &token);
    f.push(("client_id".to_owned(), String::new()));
    f.push(("token_type_hint".to_owned(), String::new()));
    let a = post(&h, "/oauth/introspect", &f).await;
    assert_eq!(a.status, 200, "{}", a.json);
    assert_eq!(a.json["active"], true, "{}", a.json);
}
