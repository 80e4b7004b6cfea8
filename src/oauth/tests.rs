//! Subject-token validation against attacks, key rotation and a failing
//! identity provider. Key sets are served by a local hyper server (or read
//! from a file); the keys in `testdata/` are test-only keys.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{Algorithm, EncodingKey};
use serde_json::{Value, json};

use super::config::{JwksSource, SubjectIssuerConfig};
use super::jwks::{Jwks, JwksError, MAX_JWKS_BYTES};
use super::subject::{MAX_TOKEN_BYTES, SubjectError, SubjectIssuer, SubjectTokens};

const ISS: &str = "https://idp.example.com/realms/corp";
const AUD: &str = "keyturn";

// ---------------------------------------------------------------- keys

struct TestKey {
    enc: EncodingKey,
    alg: Algorithm,
    kid: String,
    /// The public JWK, with `kid`.
    jwk: Value,
}

/// The key in `testdata/{file}.pem`, for `alg`, published as `kid`.
fn key(file: &str, alg: Algorithm, kid: &str) -> TestKey {
    let pem = std::fs::read(format!(
        "{}/src/oauth/testdata/{file}.pem",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap();
    let enc = match alg {
        Algorithm::EdDSA => EncodingKey::from_ed_pem(&pem),
        Algorithm::ES256 => EncodingKey::from_ec_pem(&pem),
        _ => EncodingKey::from_rsa_pem(&pem),
    }
    .unwrap();
    let mut jwk = serde_json::to_value(Jwk::from_encoding_key(&enc, alg).unwrap()).unwrap();
    jwk["kid"] = json!(kid);
    TestKey {
        enc,
        alg,
        kid: kid.to_owned(),
        jwk,
    }
}

fn ed_a() -> TestKey {
    key("ed25519_a", Algorithm::EdDSA, "a")
}
fn ed_b() -> TestKey {
    key("ed25519_b", Algorithm::EdDSA, "b")
}
/// A key no configured issuer publishes.
fn ed_attacker() -> TestKey {
    key("ed25519_attacker", Algorithm::EdDSA, "a")
}
fn p256() -> TestKey {
    key("p256", Algorithm::ES256, "ec")
}
fn rsa(alg: Algorithm) -> TestKey {
    key("rsa", alg, "rsa")
}

fn jwks_of(keys: &[&TestKey]) -> String {
    json!({ "keys": keys.iter().map(|k| k.jwk.clone()).collect::<Vec<_>>() }).to_string()
}

// -------------------------------------------------------------- tokens

fn now() -> u64 {
    jsonwebtoken::get_current_timestamp()
}

fn claims() -> Value {
    json!({
        "iss": ISS,
        "sub": "alice@example.com",
        "aud": [AUD, "other-api"],
        "exp": now() + 300,
        "iat": now(),
        "scope": "invoices:read invoices:write",
        "jti": "jti-1",
        "client_id": "web-app",
    })
}

fn b64(s: &str) -> String {
    URL_SAFE_NO_PAD.encode(s)
}

/// Signs the exact header and claims texts given.
fn sign_raw(key: &EncodingKey, alg: Algorithm, header: &str, claims: &str) -> String {
    let msg = format!("{}.{}", b64(header), b64(claims));
    let sig = jsonwebtoken::crypto::sign(msg.as_bytes(), key, alg).unwrap();
    format!("{msg}.{sig}")
}

/// A token signed by `k`: header `alg`, `typ: at+jwt`, `kid`, then `extra`
/// (a `null` member removes one).
fn token_with(k: &TestKey, extra: Value, claims: &Value) -> String {
    let mut h = json!({ "alg": format!("{:?}", k.alg), "typ": "at+jwt", "kid": k.kid });
    for (name, v) in extra.as_object().unwrap() {
        if v.is_null() {
            h.as_object_mut().unwrap().remove(name);
        } else {
            h[name] = v.clone();
        }
    }
    sign_raw(&k.enc, k.alg, &h.to_string(), &claims.to_string())
}

fn token(k: &TestKey) -> String {
    token_with(k, json!({}), &claims())
}

fn with_claim(name: &str, v: Value) -> Value {
    let mut c = claims();
    if v.is_null() {
        c.as_object_mut().unwrap().remove(name);
    } else {
        c[name] = v;
    }
    c
}

// ------------------------------------------------------------- issuers

fn config(jwks: JwksSource, algorithms: Vec<Algorithm>) -> SubjectIssuerConfig {
    SubjectIssuerConfig {
        name: "corp".to_owned(),
        issuer: ISS.to_owned(),
        audience: vec![AUD.to_owned()],
        algorithms,
        jwks,
        refresh: Duration::from_secs(300),
        skew: Duration::from_secs(30),
        typ: vec!["at+jwt".to_owned()],
        tenant: "acme".to_owned(),
    }
}

/// An issuer whose keys are read from a file holding `keys`, loaded. The
/// unknown-kid floor is long: no second load happens in the test.
async fn file_issuer(
    keys: &[&TestKey],
    algorithms: Vec<Algorithm>,
) -> (SubjectIssuer, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("jwks.json");
    std::fs::write(&path, jwks_of(keys)).unwrap();
    let cfg = config(JwksSource::File(path), algorithms);
    let jwks = Jwks::with_floor(
        cfg.jwks.clone(),
        cfg.algorithms.clone(),
        Duration::from_secs(3600),
    )
    .unwrap();
    jwks.load().await.unwrap();
    (SubjectIssuer::new(cfg, Arc::new(jwks)), dir)
}

async fn ed_issuer() -> (SubjectIssuer, tempfile::TempDir) {
    file_issuer(&[&ed_a()], vec![Algorithm::EdDSA]).await
}

async fn url_issuer(server: &JwksServer, floor: Duration) -> SubjectIssuer {
    let cfg = config(JwksSource::Url(server.url()), vec![Algorithm::EdDSA]);
    let jwks = Jwks::with_floor(cfg.jwks.clone(), cfg.algorithms.clone(), floor).unwrap();
    SubjectIssuer::new(cfg, Arc::new(jwks))
}

/// Asserts the refusal, that its message holds no part of the token, and
/// that it maps to the RFC 8693 error code.
fn refused(r: Result<super::Subject, SubjectError>, token: &str) -> SubjectError {
    let e = r.expect_err("the token must be refused");
    let msg = e.to_string();
    for part in token.split('.').filter(|p| p.len() >= 8) {
        assert!(!msg.contains(part), "the message quotes the token: {msg}");
    }
    assert_eq!(e.oauth_error(), "invalid_request");
    e
}

// -------------------------------------------------------- JWKS server

/// A local HTTP server answering every request with the current status and
/// body, counting connections and requests.
struct JwksServer {
    addr: SocketAddr,
    reply: Arc<Mutex<(u16, String)>>,
    requests: Arc<AtomicUsize>,
    connections: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl JwksServer {
    async fn start(body: String) -> JwksServer {
        use http_body_util::Full;
        use hyper::body::Bytes;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let reply = Arc::new(Mutex::new((200u16, body)));
        let requests = Arc::new(AtomicUsize::new(0));
        let connections = Arc::new(AtomicUsize::new(0));
        let (r, q, c) = (reply.clone(), requests.clone(), connections.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                c.fetch_add(1, Ordering::SeqCst);
                let (r, q) = (r.clone(), q.clone());
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |_req| {
                        q.fetch_add(1, Ordering::SeqCst);
                        let (status, body) = r.lock().unwrap().clone();
                        async move {
                            Ok::<_, Infallible>(
                                hyper::Response::builder()
                                    .status(status)
                                    .header("content-type", "application/json")
                                    .body(Full::new(Bytes::from(body)))
                                    .unwrap(),
                            )
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        JwksServer {
            addr,
            reply,
            requests,
            connections,
            task,
        }
    }

    fn url(&self) -> String {
        format!("http://{}/jwks.json", self.addr)
    }

    fn serve(&self, status: u16, body: String) {
        *self.reply.lock().unwrap() = (status, body);
    }

    fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }

    fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

impl Drop for JwksServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

// ------------------------------------------------------------ accepted

#[tokio::test]
async fn a_valid_token_yields_its_subject() {
    let (issuer, _dir) = ed_issuer().await;
    let mut c = claims();
    c["act"] = json!({ "sub": "agent-1", "act": { "sub": "agent-0" } });
    c["may_act"] = json!({ "sub": "invoice-bot" });
    let t = token_with(&ed_a(), json!({}), &c);
    let s = issuer.validate(&t).await.unwrap();
    assert_eq!(s.iss, ISS);
    assert_eq!(s.sub, "alice@example.com");
    assert_eq!(s.aud, vec![AUD.to_owned(), "other-api".to_owned()]);
    assert_eq!(s.exp, c["exp"].as_u64().unwrap());
    assert_eq!(s.scope, vec!["invoices:read", "invoices:write"]);
    assert_eq!(s.tenant, "acme");
    assert_eq!(s.issuer_name, "corp");
    assert_eq!(s.jti.as_deref(), Some("jti-1"));
    assert_eq!(s.client_id.as_deref(), Some("web-app"));
    // The earlier delegation chain is kept whole, nested.
    assert_eq!(Value::Object(s.act.unwrap()), c["act"]);
    assert_eq!(Value::Object(s.may_act.unwrap()), c["may_act"]);
}

#[tokio::test]
async fn every_pinned_algorithm_verifies_with_its_key_type() {
    let (ec, rs, ps) = (p256(), rsa(Algorithm::RS256), rsa(Algorithm::PS256));
    let mut ps_jwk = ps.jwk.clone();
    ps_jwk["kid"] = json!("rsa-pss");
    let ps = TestKey {
        kid: "rsa-pss".into(),
        jwk: ps_jwk,
        ..ps
    };
    let all = vec![
        Algorithm::EdDSA,
        Algorithm::ES256,
        Algorithm::RS256,
        Algorithm::PS256,
    ];
    let (issuer, _dir) = file_issuer(&[&ed_a(), &ec, &rs, &ps], all).await;
    for k in [ed_a(), p256(), rsa(Algorithm::RS256)] {
        issuer
            .validate(&token(&k))
            .await
            .unwrap_or_else(|e| panic!("{:?}: {e}", k.alg));
    }
    issuer.validate(&token(&ps)).await.unwrap();
}

#[tokio::test]
async fn scp_arrays_are_read_as_scope_and_the_typ_media_type_form_is_accepted() {
    let (issuer, _dir) = ed_issuer().await;
    let mut c = with_claim("scope", Value::Null);
    c["scp"] = json!(["a", "b"]);
    let t = token_with(&ed_a(), json!({ "typ": "application/AT+JWT" }), &c);
    assert_eq!(issuer.validate(&t).await.unwrap().scope, vec!["a", "b"]);
}

// -------------------------------------------------------------- attacks

#[tokio::test]
async fn alg_none_is_refused() {
    let (issuer, _dir) = ed_issuer().await;
    for alg in ["none", "None", "NONE"] {
        let h = json!({ "alg": alg, "typ": "at+jwt", "kid": "a" }).to_string();
        let t = format!("{}.{}.", b64(&h), b64(&claims().to_string()));
        let e = refused(issuer.validate(&t).await, &t);
        assert_eq!(e, SubjectError::Unsigned, "{alg}");
    }
}

#[tokio::test]
async fn hs256_signed_with_the_public_key_as_secret_is_refused() {
    let (issuer, _dir) = ed_issuer().await;
    let public = ed_a().jwk["x"].as_str().unwrap().to_owned();
    for secret in [
        public.as_bytes().to_vec(),
        URL_SAFE_NO_PAD.decode(&public).unwrap(),
    ] {
        let hs = EncodingKey::from_secret(&secret).unwrap();
        let h = json!({ "alg": "HS256", "typ": "at+jwt", "kid": "a" }).to_string();
        let t = sign_raw(&hs, Algorithm::HS256, &h, &claims().to_string());
        let e = refused(issuer.validate(&t).await, &t);
        assert!(
            matches!(e, SubjectError::AlgorithmNotAllowed { ref alg, .. } if alg == "HS256"),
            "{e}"
        );
    }
}

#[tokio::test]
async fn an_algorithm_that_is_not_pinned_is_refused_even_with_a_valid_signature() {
    // The issuer publishes an EC key but is pinned to EdDSA only: the EC key
    // is unusable and an ES256 token is refused before any key is chosen.
    let (issuer, _dir) = file_issuer(&[&ed_a(), &p256()], vec![Algorithm::EdDSA]).await;
    let t = token(&p256());
    let e = refused(issuer.validate(&t).await, &t);
    assert_eq!(
        e,
        SubjectError::AlgorithmNotAllowed {
            alg: "ES256".into(),
            issuer: "corp".into(),
            pinned: "EdDSA".into()
        }
    );
    assert_eq!(issuer.jwks().keys().len(), 1, "the EC key is not usable");
}

#[tokio::test]
async fn an_rs256_header_on_an_ec_key_is_refused() {
    let algs = vec![Algorithm::ES256, Algorithm::RS256];
    // With the JWK's own `alg` and without it: the key type decides.
    let mut bare = p256();
    bare.jwk.as_object_mut().unwrap().remove("alg");
    for ec in [p256(), bare] {
        let (issuer, _dir) = file_issuer(&[&ec, &rsa(Algorithm::RS256)], algs.clone()).await;
        let rs = rsa(Algorithm::RS256);
        let h = json!({ "alg": "RS256", "typ": "at+jwt", "kid": "ec" }).to_string();
        let t = sign_raw(&rs.enc, Algorithm::RS256, &h, &claims().to_string());
        let e = refused(issuer.validate(&t).await, &t);
        assert!(
            matches!(e, SubjectError::AlgorithmKeyMismatch { ref alg, key_type: "EC P-256", .. } if alg == "RS256"),
            "{e}"
        );
    }
}

#[tokio::test]
async fn a_jwk_whose_alg_disagrees_with_its_type_is_unusable() {
    let mut ec = p256();
    ec.jwk["alg"] = json!("RS256");
    let (issuer, _dir) = file_issuer(
        &[&ec, &rsa(Algorithm::RS256)],
        vec![Algorithm::ES256, Algorithm::RS256],
    )
    .await;
    assert_eq!(issuer.jwks().keys().len(), 1);
    assert_eq!(issuer.jwks().keys().skipped, 1);
    let t = token(&p256());
    let e = refused(issuer.validate(&t).await, &t);
    assert!(matches!(e, SubjectError::UnknownKey { .. }), "{e}");
    // A set with no usable key at all is not taken.
    let e = super::jwks::KeySet::parse(jwks_of(&[&ec]).as_bytes(), &[Algorithm::ES256], "t")
        .unwrap_err();
    assert!(e.to_string().contains("none of its 1 keys"), "{e}");
}

/// An RSA key under 2048 bits is not used (the verifier would call every
/// signature by it bad, which reads as a forged token).
#[tokio::test]
async fn an_rsa_key_under_2048_bits_is_unusable() {
    let mut small = rsa(Algorithm::RS256);
    let n = URL_SAFE_NO_PAD
        .decode(small.jwk["n"].as_str().unwrap())
        .unwrap();
    assert_eq!(n.len(), 256, "a 2048-bit test key");
    small.jwk["n"] = json!(URL_SAFE_NO_PAD.encode(&n[..128]));
    let (issuer, _dir) =
        file_issuer(&[&small, &p256()], vec![Algorithm::RS256, Algorithm::ES256]).await;
    assert_eq!(issuer.jwks().keys().skipped, 1);
    let t = token(&rsa(Algorithm::RS256));
    let e = refused(issuer.validate(&t).await, &t);
    assert!(matches!(e, SubjectError::UnknownKey { .. }), "{e}");
    let (issuer, _dir) = file_issuer(&[&rsa(Algorithm::RS256)], vec![Algorithm::RS256]).await;
    issuer.validate(&t).await.unwrap();
}

#[tokio::test]
async fn kid_injection_is_a_map_miss_with_one_rate_limited_refresh() {
    let a = ed_a();
    let server = JwksServer::start(jwks_of(&[&a])).await;
    let issuer = url_issuer(&server, Duration::from_millis(300)).await;
    let unknown_kid_loads = || {
        let stats = &issuer.jwks().stats;
        stats.unknown_kid_loads.load(Ordering::Relaxed)
    };
    issuer.jwks().load().await.unwrap();
    assert_eq!(server.requests(), 1);
    tokio::time::sleep(Duration::from_millis(350)).await;

    let kids = [
        "../../etc/passwd",
        "/etc/passwd",
        "a/../a",
        "a\u{0}",
        "' OR '1'='1",
        "https://attacker.example/jwks.json",
    ];
    for (i, kid) in kids.iter().enumerate() {
        let t = token_with(&a, json!({ "kid": kid }), &claims());
        let e = refused(issuer.validate(&t).await, &t);
        assert!(matches!(e, SubjectError::UnknownKey { .. }), "{kid}: {e}");
        if i == 0 {
            // The first unknown kid triggers exactly one load...
            assert_eq!(server.requests(), 2);
        }
    }
    // ...and the rest, within the floor, none.
    assert_eq!(
        server.requests(),
        2,
        "a load per request would let forged tokens hammer the IdP"
    );
    assert_eq!(unknown_kid_loads(), 1);

    // Concurrent requests with unknown kids after the floor: still one load.
    tokio::time::sleep(Duration::from_millis(350)).await;
    let t = token_with(&a, json!({ "kid": "nope" }), &claims());
    let all = futures::future::join_all((0..20).map(|_| issuer.validate(&t))).await;
    assert!(
        all.iter()
            .all(|r| matches!(r, Err(SubjectError::UnknownKey { .. })))
    );
    assert_eq!(server.requests(), 3);
    assert_eq!(unknown_kid_loads(), 2);

    // The real key still works, and the message quotes the kid escaped.
    issuer.validate(&token(&a)).await.unwrap();
    let t = token_with(&a, json!({ "kid": "x\ny" }), &claims());
    let e = refused(issuer.validate(&t).await, &t);
    assert!(e.to_string().contains(r#""x\ny""#), "{e}");
}

#[tokio::test]
async fn kid_is_required_when_the_set_has_several_keys() {
    let (issuer, _dir) = file_issuer(&[&ed_a(), &ed_b()], vec![Algorithm::EdDSA]).await;
    let t = token_with(&ed_a(), json!({ "kid": null }), &claims());
    let e = refused(issuer.validate(&t).await, &t);
    assert_eq!(
        e,
        SubjectError::KidRequired {
            issuer: "corp".into(),
            keys: 2
        }
    );
    // With one key in the set, no kid is needed.
    let (single, _dir) = ed_issuer().await;
    single.validate(&t).await.unwrap();
}

#[tokio::test]
async fn jku_x5u_jwk_and_x5c_headers_are_never_used() {
    let listener = JwksServer::start(jwks_of(&[&ed_attacker()])).await;
    let (issuer, _dir) = ed_issuer().await;
    let url = listener.url();
    let attacker = ed_attacker();
    let mut attacker_jwk = attacker.jwk.clone();
    attacker_jwk["kid"] = json!("evil");
    let pointers = json!({
        "jku": url,
        "x5u": url,
        "jwk": attacker_jwk,
        "x5c": ["MIIBszCCAVmgAwIBAgIUEjR4"],
    });
    // Signed by the attacker with the key it points to: refused, as the
    // issuer's own key does not verify it.
    for (name, v) in pointers.as_object().unwrap() {
        let kid = if name == "jwk" { "evil" } else { "a" };
        let t = token_with(&attacker, json!({ name: v, "kid": kid }), &claims());
        let e = refused(issuer.validate(&t).await, &t);
        assert!(
            matches!(
                e,
                SubjectError::BadSignature { .. } | SubjectError::UnknownKey { .. }
            ),
            "{name}: {e}"
        );
    }
    // Signed by the real key with all of them set: accepted, with the
    // configured key; the pointers are not followed.
    let mut extra = pointers.clone();
    extra["kid"] = json!("a");
    let t = token_with(&ed_a(), extra, &claims());
    issuer.validate(&t).await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(listener.connections(), 0, "a header URL was contacted");
}

#[tokio::test]
async fn time_claims_are_checked_with_the_skew() {
    let (issuer, _dir) = ed_issuer().await;
    let n = now();
    let cases = [
        (
            "exp",
            json!(n - 120),
            SubjectError::Expired { skew_secs: 30 },
        ),
        (
            "nbf",
            json!(n + 120),
            SubjectError::NotYetValid { skew_secs: 30 },
        ),
        (
            "iat",
            json!(n + 120),
            SubjectError::IssuedInFuture { skew_secs: 30 },
        ),
        ("exp", Value::Null, SubjectError::MissingClaim("exp".into())),
        // RFC 9068 requires `iat` of a JWT access token.
        ("iat", Value::Null, SubjectError::MissingClaim("iat".into())),
    ];
    for (claim, v, want) in cases {
        let t = token_with(&ed_a(), json!({}), &with_claim(claim, v.clone()));
        let e = refused(issuer.validate(&t).await, &t);
        assert_eq!(e, want, "{claim} = {v}");
    }
    // Within the skew: accepted.
    for (claim, v) in [("exp", n - 10), ("nbf", n + 10), ("iat", n + 10)] {
        let t = token_with(&ed_a(), json!({}), &with_claim(claim, json!(v)));
        issuer
            .validate(&t)
            .await
            .unwrap_or_else(|e| panic!("{claim}: {e}"));
    }
}

#[tokio::test]
async fn wrong_issuer_and_audience_are_refused() {
    let (issuer, _dir) = ed_issuer().await;
    let cases = [
        (
            "iss",
            json!("https://idp.example.com/realms/corp/"),
            SubjectError::WrongIssuer {
                expected: ISS.into(),
            },
        ),
        (
            "iss",
            json!("https://IDP.example.com/realms/corp"),
            SubjectError::WrongIssuer {
                expected: ISS.into(),
            },
        ),
        (
            "aud",
            json!("other-api"),
            SubjectError::WrongAudience {
                expected: "`keyturn`".into(),
            },
        ),
        (
            "aud",
            json!(["keyturn-evil", "other"]),
            SubjectError::WrongAudience {
                expected: "`keyturn`".into(),
            },
        ),
        ("aud", Value::Null, SubjectError::MissingClaim("aud".into())),
        ("sub", Value::Null, SubjectError::MissingClaim("sub".into())),
    ];
    for (claim, v, want) in cases {
        let t = token_with(&ed_a(), json!({}), &with_claim(claim, v.clone()));
        let e = refused(issuer.validate(&t).await, &t);
        assert_eq!(e, want, "{claim} = {v}");
    }
}

#[tokio::test]
async fn an_id_token_or_another_typ_is_not_an_access_token() {
    let (issuer, _dir) = ed_issuer().await;
    let mut id_token = claims();
    id_token["nonce"] = json!("n-0S6_WzA2Mj");
    id_token["aud"] = json!(AUD);
    for typ in [
        json!("JWT"),
        json!("id_token+jwt"),
        json!("dpop+jwt"),
        Value::Null,
    ] {
        let t = token_with(&ed_a(), json!({ "typ": typ }), &id_token);
        let e = refused(issuer.validate(&t).await, &t);
        assert!(matches!(e, SubjectError::WrongType { .. }), "{typ}: {e}");
    }
    // An issuer configured to accept `JWT` takes it.
    let (mut lenient, _dir2) = ed_issuer().await;
    let cfg = SubjectIssuerConfig {
        typ: vec!["at+jwt".into(), "jwt".into()],
        ..lenient.config().clone()
    };
    lenient = SubjectIssuer::new(cfg, lenient.jwks().clone());
    let t = token_with(&ed_a(), json!({ "typ": "JWT" }), &id_token);
    lenient.validate(&t).await.unwrap();
}

#[tokio::test]
async fn tokens_of_unconfigured_issuers_and_their_keys_are_refused() {
    let (issuer, _dir) = ed_issuer().await;
    let tokens = SubjectTokens::new(vec![issuer]);
    // A configured `iss`, signed by a key of another issuer with the same kid.
    let forged = token(&ed_attacker());
    let e = refused(tokens.validate(&forged).await, &forged);
    assert!(matches!(e, SubjectError::BadSignature { .. }), "{e}");
    // Another issuer's token, validly signed by its own key.
    let other = token_with(
        &ed_attacker(),
        json!({}),
        &with_claim("iss", json!("https://evil.example")),
    );
    let e = refused(tokens.validate(&other).await, &other);
    assert_eq!(
        e,
        SubjectError::UnknownIssuer {
            iss: "https://evil.example".into()
        }
    );
    // The configured one is found by its `iss`.
    tokens.validate(&token(&ed_a())).await.unwrap();
}

#[tokio::test]
async fn duplicate_json_members_are_refused() {
    let (issuer, _dir) = ed_issuer().await;
    let a = ed_a();
    let exp = now() + 300;
    let claims_dup =
        format!(r#"{{"iss":"{ISS}","sub":"alice","sub":"admin","aud":"{AUD}","exp":{exp}}}"#);
    let header = r#"{"alg":"EdDSA","typ":"at+jwt","kid":"a"}"#;
    let t = sign_raw(&a.enc, a.alg, header, &claims_dup);
    let e = refused(issuer.validate(&t).await, &t);
    assert!(
        matches!(e, SubjectError::DuplicateMember { part: "claims", .. }),
        "{e}"
    );

    let nested = format!(
        r#"{{"iss":"{ISS}","sub":"alice","aud":"{AUD}","exp":{exp},"act":{{"sub":"a","sub":"b"}}}}"#
    );
    let t = sign_raw(&a.enc, a.alg, header, &nested);
    let e = refused(issuer.validate(&t).await, &t);
    assert!(
        matches!(e, SubjectError::DuplicateMember { part: "claims", .. }),
        "{e}"
    );

    let header_dup = r#"{"alg":"EdDSA","typ":"at+jwt","kid":"a","kid":"b"}"#;
    let ok_claims = format!(
        r#"{{"iss":"{ISS}","sub":"alice","aud":"{AUD}","exp":{exp},"iat":{}}}"#,
        now()
    );
    let t = sign_raw(&a.enc, a.alg, header_dup, &ok_claims);
    let e = refused(issuer.validate(&t).await, &t);
    assert!(
        matches!(e, SubjectError::DuplicateMember { part: "header", .. }),
        "{e}"
    );
    // The same bytes without the duplicate are fine.
    let t = sign_raw(&a.enc, a.alg, header, &ok_claims);
    issuer.validate(&t).await.unwrap();
}

#[tokio::test]
async fn an_oversized_token_is_refused_before_it_is_decoded() {
    let (issuer, _dir) = ed_issuer().await;
    let t = token_with(
        &ed_a(),
        json!({}),
        &with_claim("pad", json!("x".repeat(MAX_TOKEN_BYTES))),
    );
    assert!(t.len() > MAX_TOKEN_BYTES);
    let e = refused(issuer.validate(&t).await, &t);
    assert_eq!(e, SubjectError::TooLarge { len: t.len() });
    // Not base64 at all, but too large: the size is what is reported.
    let junk = "!".repeat(MAX_TOKEN_BYTES + 1);
    assert!(matches!(
        issuer.validate(&junk).await,
        Err(SubjectError::TooLarge { .. })
    ));
}

#[tokio::test]
async fn crit_headers_and_malformed_tokens_are_refused() {
    let (issuer, _dir) = ed_issuer().await;
    let t = token_with(&ed_a(), json!({ "crit": ["exp"], "exp": 1 }), &claims());
    assert_eq!(
        refused(issuer.validate(&t).await, &t),
        SubjectError::CriticalHeader
    );
    let good = token(&ed_a());
    let parts: Vec<&str> = good.split('.').collect();
    let cases = [
        String::new(),
        "a.b".to_owned(),
        format!("{good}.x.y"),
        format!("{}.{}.{}=", parts[0], parts[1], parts[2]),
        format!("{}.{}.", parts[0], parts[1]),
        format!("{}.{}.{}", parts[0], b64("[1,2]"), parts[2]),
        format!("{}.{}.{}", b64("{\"typ\":\"at+jwt\"}"), parts[1], parts[2]),
    ];
    for t in cases {
        let r = issuer.validate(&t).await;
        assert!(r.is_err(), "accepted {t:?}");
    }
    // A signature in standard base64 (with padding) is named as such.
    let standard =
        base64::engine::general_purpose::STANDARD.encode(URL_SAFE_NO_PAD.decode(parts[2]).unwrap());
    let t = format!("{}.{}.{standard}", parts[0], parts[1]);
    let e = refused(issuer.validate(&t).await, &t);
    assert!(e.to_string().contains("not base64url"), "{e}");
    // A tampered claim breaks the signature.
    let tampered = format!(
        "{}.{}.{}",
        parts[0],
        b64(&with_claim("sub", json!("admin")).to_string()),
        parts[2]
    );
    let e = refused(issuer.validate(&tampered).await, &tampered);
    assert!(matches!(e, SubjectError::BadSignature { .. }), "{e}");
}

#[tokio::test]
async fn scope_and_scp_together_and_malformed_actors_are_refused() {
    let (issuer, _dir) = ed_issuer().await;
    let mut c = claims();
    c["scp"] = json!(["admin"]);
    let t = token_with(&ed_a(), json!({}), &c);
    assert!(matches!(
        refused(issuer.validate(&t).await, &t),
        SubjectError::InvalidClaim { .. }
    ));
    for act in [json!("agent-1"), json!({ "client_id": "x" })] {
        let t = token_with(&ed_a(), json!({}), &with_claim("act", act));
        let e = refused(issuer.validate(&t).await, &t);
        assert!(
            matches!(e, SubjectError::InvalidClaim { ref claim, .. } if claim == "act"),
            "{e}"
        );
    }
}

// ------------------------------------------------------------- garbage

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(256))]

    /// Whatever arrives, validation answers with an error and never panics.
    #[test]
    fn garbage_never_panics(
        raw in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..600),
        header in "[ -~]{0,80}",
        claims_text in "[ -~]{0,120}",
    ) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let (issuer, _dir) = ed_issuer().await;
            let text = String::from_utf8_lossy(&raw).into_owned();
            proptest::prop_assert!(issuer.validate(&text).await.is_err());
            let dotted = format!("{}.{}.{}", b64(&header), b64(&claims_text), b64(&text));
            proptest::prop_assert!(issuer.validate(&dotted).await.is_err());
            let a = ed_a();
            let signed = sign_raw(&a.enc, a.alg, &header, &claims_text);
            let _ = issuer.validate(&signed).await;
            Ok(())
        })?;
    }
}

// -------------------------------------------------- rotation & failures

#[tokio::test]
async fn a_rotated_key_is_picked_up_and_the_old_one_stays_until_removed() {
    let (a, b) = (ed_a(), ed_b());
    let server = JwksServer::start(jwks_of(&[&a])).await;
    let issuer = url_issuer(&server, Duration::ZERO).await;
    issuer.jwks().load().await.unwrap();
    issuer.validate(&token(&a)).await.unwrap();

    // The IdP publishes b next to a, then signs with b: the unknown kid
    // loads the set again and b verifies; a still does.
    server.serve(200, jwks_of(&[&a, &b]));
    issuer.validate(&token(&b)).await.unwrap();
    assert_eq!(server.requests(), 2);
    issuer.validate(&token(&a)).await.unwrap();
    assert_eq!(server.requests(), 2, "a known kid loads nothing");

    // The scheduled refresh picks up a's removal.
    server.serve(200, jwks_of(&[&b]));
    let cancel = tokio_util::sync::CancellationToken::new();
    let task = issuer
        .jwks()
        .clone()
        .spawn_refresh(Duration::from_millis(100), cancel.clone());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while issuer.jwks().keys().has_kid("a") {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the refresh never ran"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    cancel.cancel();
    task.await.unwrap();
    let old = token(&a);
    let e = refused(issuer.validate(&old).await, &old);
    assert!(matches!(e, SubjectError::UnknownKey { .. }), "{e}");
    issuer.validate(&token(&b)).await.unwrap();
}

#[tokio::test]
async fn a_failing_jwks_url_keeps_the_cached_keys() {
    let a = ed_a();
    let server = JwksServer::start(jwks_of(&[&a])).await;
    let issuer = url_issuer(&server, Duration::ZERO).await;
    let jwks = issuer.jwks().clone();
    jwks.load().await.unwrap();

    let bad = [
        (500, "internal error".to_owned()),
        (200, "<html>maintenance</html>".to_owned()),
        (200, jwks_of(&[&a, &a])),
        (200, r#"{"keys":[{"kid":"a"}]}"#.to_owned()),
        (
            200,
            format!(r#"{{"keys":[],"pad":"{}"}}"#, "x".repeat(MAX_JWKS_BYTES)),
        ),
        (302, String::new()),
    ];
    for (status, body) in bad {
        server.serve(status, body);
        let e = jwks.load().await.unwrap_err();
        if status == 200 && jwks.stats.failures.load(Ordering::Relaxed) == 5 {
            assert!(matches!(e, JwksError::TooLarge { .. }), "{e}");
        }
        issuer
            .validate(&token(&a))
            .await
            .unwrap_or_else(|err| panic!("after {status} ({e}): {err}"));
    }
    // The server gone entirely: same.
    let url = server.url();
    drop(server);
    tokio::time::sleep(Duration::from_millis(50)).await;
    let e = jwks.load().await.unwrap_err();
    assert!(matches!(e, JwksError::Fetch { .. }), "{e}");
    assert!(e.to_string().contains(&url), "{e}");
    issuer.validate(&token(&a)).await.unwrap();
    assert_eq!(jwks.stats.failures.load(Ordering::Relaxed), 7);
    assert_eq!(jwks.last_error(), Some(e));
}

#[tokio::test]
async fn an_issuer_whose_keys_never_loaded_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(
        JwksSource::File(dir.path().join("missing.json")),
        vec![Algorithm::EdDSA],
    );
    let issuer = SubjectIssuer::from_config(cfg).unwrap();
    let t = token(&ed_a());
    let e = refused(issuer.validate(&t).await, &t);
    assert!(
        matches!(e, SubjectError::NoKeys { ref why, .. } if why.contains("missing.json")),
        "{e}"
    );
}

#[tokio::test]
async fn no_token_reaches_the_logs() {
    let (_guard, logs) = crate::test_support::capture_logs();
    let server = JwksServer::start(jwks_of(&[&ed_a()])).await;
    let issuer = url_issuer(&server, Duration::ZERO).await;
    issuer.jwks().load().await.unwrap();
    server.serve(500, String::new());
    let _ = issuer.jwks().load().await;
    let mut tokens = vec![token(&ed_a()), token(&ed_attacker())];
    tokens.push(token_with(&ed_a(), json!({ "kid": "unknown" }), &claims()));
    for t in &tokens {
        let _ = issuer.validate(t).await;
    }
    let logs = String::from_utf8(logs.lock().unwrap().clone()).unwrap();
    assert!(
        logs.contains("key set not refreshed"),
        "the failed load is logged: {logs}"
    );
    for t in &tokens {
        for part in t.split('.') {
            assert!(!logs.contains(part), "a token part was logged");
        }
    }
}

// --------------------------------------------------------------- config

fn load(text: &str) -> Result<crate::config::Config, crate::config::ConfigErrors> {
    crate::config::load_str(std::path::Path::new("/etc/keyturn/keyturn.toml"), text)
}

#[test]
fn a_subject_issuer_loads_with_its_defaults() {
    let cfg = load(
        r#"
[token_service.subject_issuers.corp]
issuer = "https://idp.example.com/realms/corp"
audience = "keyturn"
algorithms = ["EdDSA", "RS256"]
jwks_file = "idp/jwks.json"
tenant = "acme"

[token_service.subject_issuers.partner]
issuer = "https://partner.example"
audience = ["keyturn", "https://keyturn.example/oauth/token"]
algorithms = ["ES256"]
jwks_url = "http://127.0.0.1:8443/jwks.json"
refresh = "1m"
skew = "5m"
typ = ["at+jwt", "application/JWT"]
tenant = "partner"
"#,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let corp = &cfg.subject_issuers["corp"];
    assert_eq!(corp.issuer, "https://idp.example.com/realms/corp");
    assert_eq!(corp.audience, vec!["keyturn"]);
    assert_eq!(corp.algorithms, vec![Algorithm::EdDSA, Algorithm::RS256]);
    assert_eq!(
        corp.jwks,
        JwksSource::File("/etc/keyturn/idp/jwks.json".into())
    );
    assert_eq!(corp.refresh, Duration::from_secs(300));
    assert_eq!(corp.skew, Duration::from_secs(30));
    assert_eq!(corp.typ, vec!["at+jwt"], "RFC 9068: at+jwt only by default");
    assert_eq!(corp.tenant, "acme");
    let p = &cfg.subject_issuers["partner"];
    assert_eq!(
        p.jwks,
        JwksSource::Url("http://127.0.0.1:8443/jwks.json".into())
    );
    assert_eq!(p.audience.len(), 2);
    assert_eq!(
        (p.refresh, p.skew),
        (Duration::from_secs(60), Duration::from_secs(300))
    );
    assert_eq!(p.typ, vec!["at+jwt", "jwt"]);
}

#[test]
fn every_subject_issuer_problem_is_reported_located_at_once() {
    let text = r#"
[token_service.subject_issuers.corp]
issuer = "https://idp.example.com"
audience = []
algorithms = ["EdDSA", "HS256", "none"]
jwks_url = "http://idp.example.com/jwks.json"
refresh = "1s"
skew = "10m"
typ = []
tenant = " "

[token_service.subject_issuers.both]
issuer = "https://other.example"
audience = "keyturn"
algorithms = []
jwks_file = "a.json"
jwks_url = "https://other.example/jwks"
tenant = "t"

[token_service.subject_issuers.neither]
issuer = "https://idp.example.com"
audience = "keyturn"
algorithms = ["ES256"]
tenant = "t"

[token_service.subject_issuers.typo]
issuer = "https://third.example"
audience = "keyturn"
algorithms = ["ES256"]
jwks_file = "a.json"
tenant = "t"
skw = "1s"

[token_service.other]
x = 1
"#;
    let errors = load(text).unwrap_err().0;
    let got: Vec<(usize, String, String)> = errors
        .iter()
        .map(|e| (e.line, e.toml_path.clone(), e.message.clone()))
        .collect();
    let want: &[(usize, &str, &str)] = &[
        (
            4,
            "token_service.subject_issuers.corp.audience",
            "at least one audience",
        ),
        (
            5,
            "token_service.subject_issuers.corp.algorithms[1]",
            "`HS256` is not accepted",
        ),
        (
            5,
            "token_service.subject_issuers.corp.algorithms[2]",
            "`none` is not accepted",
        ),
        (
            6,
            "token_service.subject_issuers.corp.jwks_url",
            "plain http is allowed only to a loopback address",
        ),
        (
            7,
            "token_service.subject_issuers.corp.refresh",
            "at least 30s",
        ),
        (8, "token_service.subject_issuers.corp.skew", "at most 5m"),
        (9, "token_service.subject_issuers.corp.typ", "at least one"),
        (
            10,
            "token_service.subject_issuers.corp.tenant",
            "tenant must not be empty",
        ),
        (
            15,
            "token_service.subject_issuers.both.algorithms",
            "must not be empty",
        ),
        (
            17,
            "token_service.subject_issuers.both.jwks_url",
            "not both",
        ),
        (
            21,
            "token_service.subject_issuers.neither.issuer",
            "already configured in [token_service.subject_issuers.corp]",
        ),
        (
            32,
            "token_service.subject_issuers.typo.skw",
            "unknown key `skw`",
        ),
        (34, "token_service.other", "unknown key `other`"),
    ];
    for (line, path, msg) in want {
        assert!(
            got.iter()
                .any(|(l, p, m)| l == line && p == path && m.contains(msg)),
            "missing {line} {path} {msg:?} in:\n{got:#?}"
        );
    }
    assert_eq!(got.len(), want.len(), "{got:#?}");
}

#[tokio::test]
async fn start_loads_every_issuer_and_refreshes_a_jwks_file_on_schedule() {
    let (a, b) = (ed_a(), ed_b());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("jwks.json");
    std::fs::write(&path, jwks_of(&[&a])).unwrap();
    let cfg = SubjectIssuerConfig {
        refresh: Duration::from_millis(100),
        ..config(JwksSource::File(path.clone()), vec![Algorithm::EdDSA])
    };
    let tokens = SubjectTokens::new(vec![SubjectIssuer::from_config(cfg).unwrap()]);
    let cancel = tokio_util::sync::CancellationToken::new();
    tokens.start(&cancel).await;
    let jwks = tokens.issuers()[0].jwks().clone();
    assert!(jwks.keys().has_kid("a"), "start loads the set");
    tokens.validate(&token(&a)).await.unwrap();

    std::fs::write(&path, jwks_of(&[&b])).unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !jwks.keys().has_kid("b") {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the file was never read again"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokens.validate(&token(&b)).await.unwrap();
    cancel.cancel();
    // After cancel no more loads happen.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let loads = jwks.stats.loads.load(Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(jwks.stats.loads.load(Ordering::Relaxed), loads);
}

/// Black-box finding: each issuer whose JWKS URL accepted and never
/// answered held the daemon's start for the fetch timeout (10 s), one after
/// another, before the listener and any rotation. The first loads run side
/// by side and the start waits for them at most `START_WAIT`; a file set
/// beside them is loaded by then, and a hung one is still tried.
#[tokio::test]
async fn issuers_that_do_not_answer_do_not_hold_up_the_start() {
    let a = ed_a();
    let hung = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/jwks", hung.local_addr().unwrap());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("jwks.json");
    std::fs::write(&path, jwks_of(&[&a])).unwrap();
    let mut issuers: Vec<SubjectIssuer> = (0..4)
        .map(|i| {
            let cfg = SubjectIssuerConfig {
                issuer: format!("https://hung-{i}.example"),
                ..config(JwksSource::Url(url.clone()), vec![Algorithm::EdDSA])
            };
            SubjectIssuer::from_config(cfg).unwrap()
        })
        .collect();
    issuers.push(
        SubjectIssuer::from_config(config(JwksSource::File(path), vec![Algorithm::EdDSA])).unwrap(),
    );
    let tokens = SubjectTokens::new(issuers);
    let cancel = tokio_util::sync::CancellationToken::new();
    let started = std::time::Instant::now();
    tokens.start(&cancel).await;
    let took = started.elapsed();
    assert!(
        took < crate::oauth::subject::START_WAIT + Duration::from_secs(1),
        "{took:?}"
    );
    assert!(tokens.issuers()[4].jwks().keys().has_kid("a"));
    tokens.validate(&token(&a)).await.unwrap();
    for i in &tokens.issuers()[..4] {
        assert!(i.jwks().keys().is_empty());
        assert_eq!(
            i.jwks().stats.loads.load(Ordering::Relaxed),
            1,
            "being tried"
        );
    }
    cancel.cancel();
    drop(hung);
}

/// A subject token that verified is remembered by the SHA-256 of its bytes,
/// so the same token again skips the signature check. The result stands
/// only while the key that verified it is still its issuer's under its
/// `kid`, and its `exp` is checked against the clock each time; refusals
/// are not remembered.
#[tokio::test]
async fn a_remembered_subject_token_is_checked_again_against_the_key_set_and_the_clock() {
    let a = ed_a();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("jwks.json");
    std::fs::write(&path, jwks_of(&[&a])).unwrap();
    let cfg = SubjectIssuerConfig {
        refresh: Duration::from_millis(100),
        skew: Duration::ZERO,
        ..config(JwksSource::File(path.clone()), vec![Algorithm::EdDSA])
    };
    let tokens = SubjectTokens::new(vec![SubjectIssuer::from_config(cfg).unwrap()]);
    let cancel = tokio_util::sync::CancellationToken::new();
    tokens.start(&cancel).await;
    let jwks = tokens.issuers()[0].jwks().clone();

    let t = token(&a);
    let first = tokens.validate(&t).await.unwrap();
    assert_eq!(tokens.remembered(), 1);
    assert_eq!(tokens.validate(&t).await.unwrap(), first);
    assert_eq!(tokens.remembered(), 1, "the same token is one entry");
    let forged = token(&ed_attacker());
    refused(tokens.validate(&forged).await, &forged);
    assert_eq!(tokens.remembered(), 1, "a refusal is not remembered");

    // Past its `exp`, a remembered token is refused like any other.
    let short = token_with(&a, json!({}), &with_claim("exp", json!(now() + 1)));
    tokens.validate(&short).await.unwrap();
    assert_eq!(tokens.remembered(), 2);
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let e = refused(tokens.validate(&short).await, &short);
    assert_eq!(e, SubjectError::Expired { skew_secs: 0 });

    // Another key published under the token's `kid`: verified again, and
    // refused, as the new key did not sign it.
    let reloaded = |jwks: &Arc<Jwks>| jwks.stats.loads.load(Ordering::Relaxed);
    let wait_reload = async |jwks: &Arc<Jwks>| {
        let before = reloaded(jwks);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while reloaded(jwks) < before + 2 {
            assert!(tokio::time::Instant::now() < deadline, "never reloaded");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    std::fs::write(&path, jwks_of(&[&ed_attacker()])).unwrap();
    wait_reload(&jwks).await;
    let e = refused(tokens.validate(&t).await, &t);
    assert!(matches!(e, SubjectError::BadSignature { .. }), "{e}");
    // The key back: valid again. Then the key set without it: refused.
    std::fs::write(&path, jwks_of(&[&a])).unwrap();
    wait_reload(&jwks).await;
    assert_eq!(tokens.validate(&t).await.unwrap(), first);
    std::fs::write(&path, jwks_of(&[&ed_b()])).unwrap();
    wait_reload(&jwks).await;
    let e = refused(tokens.validate(&t).await, &t);
    assert!(matches!(e, SubjectError::UnknownKey { .. }), "{e}");
    cancel.cancel();
}

/// Agents `signer` (an ed25519 `sig`) and `reporter` (an ed25519 `c`, a
/// password `pw`), in a local vault `v`: what a token service can name.
fn token_agents() -> String {
    use crate::test_support::agent_table;
    format!(
        r#"
[vaults.v]
type = "local"

{signer}[agents.signer.credentials.sig]
vault = "v"
every = "1d"
generate = {{ kind = "ed25519" }}

{reporter}[agents.reporter.credentials.c]
vault = "v"
every = "1h"
generate = {{ kind = "ed25519" }}
[agents.reporter.credentials.pw]
vault = "v"
every = "1h"
generate = {{ kind = "password", length = 20 }}
"#,
        signer = agent_table("signer"),
        reporter = agent_table("reporter"),
    )
}

/// `agents` with a `[token_service]` at `https://keyturn.example.com`
/// that signs with `signing_credential`, its other settings in `rest`.
fn with_token_service(agents: &str, signing_credential: &str, rest: &str) -> String {
    format!(
        "{agents}\n[token_service]\nissuer = \"https://keyturn.example.com\"\n\
         signing_credential = \"{signing_credential}\"\n{rest}"
    )
}

#[test]
fn the_token_service_loads_with_its_defaults_and_clients() {
    let agents = token_agents();
    let cfg = load(&with_token_service(
        &agents,
        "signer/sig",
        r#"
[token_service.clients.reporter]
scopes = ["read:reports"]
audiences = ["https://api.example.com"]

[token_service.clients.signer]
scopes = ["a", "b"]
audiences = ["x"]
tenants = ["acme", "partner"]
ttl = "1m"
"#,
    ))
    .unwrap_or_else(|e| panic!("{e}"));
    let t = cfg.token_service.expect("configured");
    assert_eq!(t.issuer, "https://keyturn.example.com");
    assert_eq!(t.signing_credential.to_string(), "signer/sig");
    assert_eq!(t.max_ttl, Duration::from_secs(300));
    assert_eq!(t.max_act_depth, 3);
    let r = &t.clients["reporter"];
    assert_eq!(r.tenants, vec!["acme"], "default: the agent's own tenant");
    assert_eq!(r.ttl, Duration::from_secs(300), "default: max_ttl");
    assert_eq!(r.scopes, vec!["read:reports"]);
    let s = &t.clients["signer"];
    assert_eq!((s.ttl, s.tenants.len()), (Duration::from_secs(60), 2));
    // Without the section the token service is off.
    assert!(load(&agents).unwrap().token_service.is_none());
}

/// Defects (black-box): `keyturn check` passed two configs the service
/// could not honour. A subject issuer with the service's own `iss` (or a
/// tenant's) turned a revoked token back into a fresh active one; a
/// listener off loopback passed check and the daemon refused to start.
#[test]
fn check_refuses_the_services_own_issuer_as_a_subject_issuer_and_a_listener_off_loopback() {
    let agents = token_agents();
    let subject = |iss: &str| {
        format!(
            "[token_service.subject_issuers.self]\nissuer = \"{iss}\"\naudience = \"x\"\n\
             algorithms = [\"EdDSA\"]\njwks_file = \"jwks.json\"\ntenant = \"acme\"\n"
        )
    };
    for iss in [
        "https://keyturn.example.com",
        "https://keyturn.example.com/",
        "https://keyturn.example.com/tenants/partner",
    ] {
        let e = load(&with_token_service(&agents, "signer/sig", &subject(iss)))
            .unwrap_err()
            .0;
        assert_eq!(e.len(), 1, "{iss}: {e:?}");
        assert_eq!(e[0].toml_path, "token_service.subject_issuers.self.issuer");
        assert!(
            e[0].message.contains("is this token service's own"),
            "{e:?}"
        );
    }
    // Another issuer under the same host is someone else's.
    load(&with_token_service(
        &agents,
        "signer/sig",
        &subject("https://keyturn.example.com/realms/corp"),
    ))
    .unwrap_or_else(|e| panic!("{e}"));

    let off = with_token_service(&agents, "signer/sig", "").replacen(
        "[agents.",
        "[daemon]\nlisten = \"0.0.0.0:9464\"\n\n[agents.",
        1,
    );
    let e = load(&off).unwrap_err().0;
    assert_eq!(e.len(), 1, "{e:?}");
    assert_eq!(e[0].toml_path, "daemon.listen");
    assert!(
        e[0].message
            .contains("needs [daemon] listen on a loopback address"),
        "{e:?}"
    );
    let on = off.replace("0.0.0.0:9464", "127.0.0.1:9464");
    load(&on).unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn every_token_service_problem_is_reported_located_at_once() {
    let agents = token_agents();
    let text = format!(
        r#"{agents}
[token_service]
issuer = "http://keyturn.example.com"
signing_credential = "reporter/pw"
max_ttl = "0s"
max_act_depth = 0

[token_service.clients.ghost]
scopes = ["a"]
audiences = ["x"]

[token_service.clients.reporter]
scopes = ["bad scope"]
audiences = []
tenants = []
ttl = "1h"
extra = 1
"#
    );
    let errors = load(&text).unwrap_err().0;
    let got: Vec<(String, String)> = errors
        .iter()
        .map(|e| (e.toml_path.clone(), e.message.clone()))
        .collect();
    let want: &[(&str, &str)] = &[
        (
            "token_service.issuer",
            "plain http is allowed only to a loopback",
        ),
        (
            "token_service.signing_credential",
            "must be an ed25519 credential",
        ),
        ("token_service.max_ttl", ""),
        ("token_service.max_act_depth", "from 1"),
        ("token_service.clients.ghost", "not a configured agent"),
        ("token_service.clients.reporter.extra", "unknown"),
    ];
    for (path, msg) in want {
        assert!(
            got.iter().any(|(p, m)| p == path && m.contains(msg)),
            "missing {path}: {msg} in {got:#?}"
        );
    }
    assert!(errors.iter().all(|e| e.line > 0), "{got:#?}");

    // RFC 8414 2: an issuer identifier has no query and no fragment.
    for issuer in [
        "https://keyturn.example.com?tenant=a",
        "https://keyturn.example.com/#x",
    ] {
        let bad = text.replace("http://keyturn.example.com", issuer);
        let errors = load(&bad).unwrap_err().0;
        assert!(
            errors.iter().any(|e| e.toml_path == "token_service.issuer"
                && e.message.contains("has a query or a fragment")),
            "{issuer}: {errors:#?}"
        );
    }

    // Once the typo is fixed, the client's own problems are all reported.
    let errors = load(&text.replace("extra = 1\n", "")).unwrap_err().0;
    let got: Vec<(String, String)> = errors
        .iter()
        .map(|e| (e.toml_path.clone(), e.message.clone()))
        .collect();
    for (path, msg) in [
        ("token_service.clients.reporter.scopes[0]", "RFC 6749"),
        ("token_service.clients.reporter.audiences", "at least one"),
        ("token_service.clients.reporter.tenants", "at least one"),
        ("token_service.issuer", "loopback"),
    ] {
        assert!(
            got.iter().any(|(p, m)| p == path && m.contains(msg)),
            "missing {path}: {msg} in {got:#?}"
        );
    }

    // A client's tenant that no subject issuer is of (a typo) is refused,
    // once subject issuers are configured.
    let text = with_token_service(
        &agents,
        "signer/sig",
        r#"
[token_service.subject_issuers.corp]
issuer = "https://idp.example.com"
audience = "keyturn"
algorithms = ["EdDSA"]
jwks_file = "idp/jwks.json"
tenant = "acme"

[token_service.clients.reporter]
scopes = ["a"]
audiences = ["x"]
tenants = ["acme", "acmee"]
"#,
    );
    let errors = load(&text).unwrap_err().0;
    assert_eq!(errors.len(), 1, "{errors:#?}");
    assert_eq!(
        errors[0].toml_path,
        "token_service.clients.reporter.tenants[1]"
    );
    assert!(
        errors[0].message.contains("`acmee`") && errors[0].message.contains("`acme`"),
        "{errors:#?}"
    );
    load(&text.replace(", \"acmee\"", "")).unwrap_or_else(|e| panic!("{e}"));
}

/// An agent's `auth_key` is delivered to that agent: as the service's or a
/// tenant's signing key, it would let the agent mint any token. A located
/// error, at `check`, start and reload alike (they all load the config so).
#[test]
fn an_agents_auth_key_is_refused_as_a_signing_key() {
    let agents = token_agents();
    let authenticating = agents.replace(
        "[agents.reporter]\n",
        "[agents.reporter]\nauth_key = \"c\"\n",
    );
    assert_ne!(authenticating, agents);
    let errors = load(&with_token_service(
        &authenticating,
        "reporter/c",
        "[token_service.tenants.partner]\nsigning_credential = \"reporter/c\"\n",
    ))
    .unwrap_err()
    .0;
    for path in [
        "token_service.signing_credential",
        "token_service.tenants.partner.signing_credential",
    ] {
        assert!(
            errors.iter().any(|e| e.toml_path == path
                && e.line > 0
                && e.message.contains("agent `reporter`'s auth_key")),
            "missing {path} in {errors:#?}"
        );
    }
    // The same credential is a signing key once no agent authenticates with it.
    let cfg =
        load(&with_token_service(&agents, "reporter/c", "")).unwrap_or_else(|e| panic!("{e}"));
    assert!(cfg.token_service.is_some());
}

/// Black-box finding: a signing credential delivered to a file (an
/// agent's directory, say) passed `check`; whoever reads the file could
/// sign any token. Every sink that hands the value out is refused; a
/// signal, or a webhook that only notifies, is not.
#[test]
fn a_signing_key_delivered_out_of_keyturn_is_refused() {
    let agents = format!(
        "[daemon]\ndelivery_roots = [\"/run/keyturn\"]\n{}",
        token_agents()
    );
    let with = |deliver: &str| {
        with_token_service(
            &agents.replace(
                "[agents.signer.credentials.sig]\n",
                &format!("[agents.signer.credentials.sig]\ndeliver = [{deliver}]\n"),
            ),
            "signer/sig",
            "",
        )
    };
    for (deliver, kind) in [
        (
            r#"{ type = "file", path = "/run/keyturn/leak/signer" }"#,
            "file",
        ),
        (
            r#"{ type = "exec", program = "/usr/bin/true", stdin_value = true }"#,
            "exec",
        ),
        (
            r#"{ type = "webhook", url = "https://hooks.example/k", include_value = true, secret_file = "/etc/keyturn/hook.key" }"#,
            "webhook",
        ),
    ] {
        let errors = load(&with(deliver)).unwrap_err().0;
        assert!(
            errors
                .iter()
                .any(|e| e.toml_path == "token_service.signing_credential"
                    && e.message.contains(&format!("`deliver[0]` (type {kind})"))
                    && e.message.contains("hands its private key out")),
            "{kind}: {errors:#?}"
        );
    }
    // Nor may a target be given it (black-box finding: a command hook got
    // the private key on stdin at `set` and `test`).
    let targeted = with_token_service(
        &agents.replace(
            "[agents.signer.credentials.sig]\n",
            "[agents.signer.credentials.sig]\ntarget = { type = \"command\", program = \"/usr/bin/tee\" }\n",
        ),
        "signer/sig",
        "",
    );
    let errors = load(&targeted).unwrap_err().0;
    assert!(
        errors
            .iter()
            .any(|e| e.toml_path == "token_service.signing_credential"
                && e.message.contains("has a `target` (command)")),
        "{errors:#?}"
    );
    for notice in [
        r#"{ type = "webhook", url = "https://hooks.example/k", secret_file = "/etc/keyturn/hook.key" }"#,
        r#"{ type = "exec", program = "/usr/bin/true" }"#,
    ] {
        load(&with(notice)).unwrap_or_else(|e| panic!("a notice carries no value: {e}"));
    }
}

#[test]
fn tenants_with_their_own_signing_keys_load_and_every_problem_is_reported() {
    let agents = token_agents();
    let with_partner_sig = format!(
        r#"{agents}
[agents.signer.credentials.partner_sig]
vault = "v"
every = "1d"
generate = {{ kind = "ed25519" }}
"#
    );
    let base = with_token_service(&with_partner_sig, "signer/sig", "");
    let cfg = load(&format!(
        "{base}\n[token_service.tenants.partner]\nsigning_credential = \"signer/partner_sig\"\n"
    ))
    .unwrap_or_else(|e| panic!("{e}"));
    let t = cfg.token_service.expect("configured");
    assert_eq!(
        t.tenant_keys
            .iter()
            .map(|(n, k)| (n.as_str(), k.to_string()))
            .collect::<Vec<_>>(),
        [("partner", "signer/partner_sig".to_owned())]
    );

    let errors = load(&format!(
        r#"{base}
[token_service.tenants.shared]
signing_credential = "signer/sig"

[token_service.tenants.passwords]
signing_credential = "reporter/pw"

[token_service.tenants."a/b"]
signing_credential = "signer/partner_sig"

[token_service.tenants.ghost]
signing_credential = "nobody/none"

[token_service.tenants.typo]
signing_credential = "signer/partner_sig"
extra = 1
"#
    ))
    .unwrap_err()
    .0;
    let got: Vec<(String, String)> = errors
        .iter()
        .map(|e| (e.toml_path.clone(), e.message.clone()))
        .collect();
    for (path, msg) in [
        (
            "token_service.tenants.shared.signing_credential",
            "already signs for [token_service] signing_credential",
        ),
        (
            "token_service.tenants.passwords.signing_credential",
            "must be an ed25519 credential",
        ),
        ("token_service.tenants.\"a/b\"", "letters, digits"),
        (
            "token_service.tenants.ghost.signing_credential",
            "not a configured credential",
        ),
        ("token_service.tenants.typo.extra", "unknown"),
    ] {
        assert!(
            got.iter().any(|(p, m)| p == path && m.contains(msg)),
            "missing {path}: {msg} in {got:#?}"
        );
    }
    assert!(errors.iter().all(|e| e.line > 0), "{got:#?}");

    // Two tenants on one key would trust each other's tokens.
    let errors = load(&format!(
        "{base}\n[token_service.tenants.a]\nsigning_credential = \"signer/partner_sig\"\n[token_service.tenants.b]\nsigning_credential = \"signer/partner_sig\"\n"
    ))
    .unwrap_err()
    .0;
    assert!(
        errors.iter().any(
            |e| e.toml_path == "token_service.tenants.b.signing_credential"
                && e.message.contains("[token_service.tenants.a]")
        ),
        "{errors:#?}"
    );
}
