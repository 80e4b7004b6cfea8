//! The exchange as a pure function: every refusal and the attack cases of
//! issue 16 that are about exchange; issued tokens verified independently
//! with `jsonwebtoken` and the public JWK of the signing key.

use std::time::Duration;

use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Validation};
use serde_json::{Map, Value, json};

use super::Subject;
use super::exchange::{
    Actor, ClientPolicy, ExchangeError, Issued, Params, ServicePolicy, SigningKey, exchange,
};

const ISSUER: &str = "https://keyturn.example.com";
const PEM: &[u8] = include_bytes!("testdata/ed25519_a.pem");
const NOW: u64 = 1_900_000_000;

fn service() -> ServicePolicy {
    ServicePolicy {
        issuer: ISSUER.into(),
        max_ttl: Duration::from_secs(300),
        max_act_depth: 3,
    }
}

fn client() -> ClientPolicy {
    ClientPolicy {
        agent: "reporter".into(),
        scopes: vec!["read:reports".into(), "write:reports".into()],
        audiences: vec![
            "https://api.example.com".into(),
            "https://db.example.com".into(),
        ],
        tenants: vec!["corp".into()],
        ttl: Duration::from_secs(120),
    }
}

fn subject() -> Subject {
    Subject {
        issuer_name: "corp".into(),
        iss: "https://idp.example.com".into(),
        sub: "alice".into(),
        aud: vec!["keyturn".into()],
        exp: NOW + 3600,
        iat: Some(NOW - 10),
        scope: vec![
            "read:reports".into(),
            "admin".into(),
            "write:reports".into(),
        ],
        act: None,
        may_act: None,
        client_id: None,
        jti: None,
        tenant: "corp".into(),
    }
}

fn actor() -> Actor {
    Actor {
        agent: "reporter".into(),
        valid_until: None,
    }
}

fn params() -> Params {
    Params {
        audience: vec!["https://api.example.com".into()],
        ..Params::default()
    }
}

fn key() -> SigningKey {
    SigningKey {
        kid: "7".into(),
        key: EncodingKey::from_ed_pem(PEM).unwrap(),
    }
}

fn run(
    s: &Subject,
    c: Option<&ClientPolicy>,
    a: &Actor,
    p: &Params,
) -> Result<Issued, ExchangeError> {
    exchange(&service(), c, s, a, p, NOW, &key())
}

fn ok(s: &Subject, p: &Params) -> Issued {
    run(s, Some(&client()), &actor(), p).unwrap()
}

fn err(s: &Subject, p: &Params) -> ExchangeError {
    run(s, Some(&client()), &actor(), p).unwrap_err()
}

/// Verifies the issued token with the public JWK only; returns header and claims.
fn verify(i: &Issued, aud: &str) -> (jsonwebtoken::Header, Value) {
    let enc = EncodingKey::from_ed_pem(PEM).unwrap();
    let jwk: Jwk = Jwk::from_encoding_key(&enc, Algorithm::EdDSA).unwrap();
    let dec = DecodingKey::from_jwk(&jwk).unwrap();
    let mut v = Validation::new(Algorithm::EdDSA);
    v.set_audience(&[aud]);
    v.set_issuer(&[ISSUER]);
    v.validate_exp = false; // NOW is a fixed time in the future
    v.set_required_spec_claims(&["iss", "aud", "sub"]);
    let token = i.access_token.expose_str().unwrap();
    let data = jsonwebtoken::decode::<Value>(token, &dec, &v).unwrap();
    (data.header, data.claims)
}

fn obj(v: Value) -> Option<Map<String, Value>> {
    match v {
        Value::Object(m) => Some(m),
        _ => unreachable!(),
    }
}

#[test]
fn a_valid_exchange_issues_a_verifiable_at_jwt_with_sub_act_and_intersected_scope() {
    let i = ok(&subject(), &params());
    let (h, c) = verify(&i, "https://api.example.com");
    assert_eq!(h.typ.as_deref(), Some("at+jwt"));
    assert_eq!(h.kid.as_deref(), Some("7"));
    assert_eq!(h.alg, Algorithm::EdDSA);
    assert_eq!(c["sub"], "alice");
    assert_eq!(c["client_id"], "reporter");
    assert_eq!(c["act"], json!({"sub": "reporter"}));
    assert_eq!(c["scope"], "read:reports write:reports");
    assert_eq!(c["tenant"], "corp");
    assert_eq!(c["iat"], NOW);
    assert_eq!(c["exp"], NOW + 120);
    assert_eq!(c["jti"], i.jti.as_str());
    assert_eq!(i.expires_in, 120);
    assert_eq!(i.scope, "read:reports write:reports");
    assert!(!format!("{i:?}").contains(i.access_token.expose_str().unwrap()));
    // Two issuances never share a jti.
    assert_ne!(ok(&subject(), &params()).jti, i.jti);
}

#[test]
fn scope_never_widens() {
    // Requested wider than both: only the intersection is granted.
    let p = Params {
        scope: Some("read:reports admin delete:everything".into()),
        ..params()
    };
    let i = ok(&subject(), &p);
    assert_eq!(i.scope, "read:reports");
    let (_, c) = verify(&i, "https://api.example.com");
    assert_eq!(c["scope"], "read:reports");
    // The subject's `admin` is not the agent's to use, even if requested alone.
    let p = Params {
        scope: Some("admin".into()),
        ..params()
    };
    assert_eq!(err(&subject(), &p).code, "invalid_scope");
    // A subject without any scope the agent may use.
    let s = Subject {
        scope: vec!["admin".into()],
        ..subject()
    };
    assert_eq!(err(&s, &params()).code, "invalid_scope");
    // Malformed scope strings.
    for bad in ["", "a  b", "a\"b", "a\\b", " a"] {
        let p = Params {
            scope: Some(bad.into()),
            ..params()
        };
        assert_eq!(err(&subject(), &p).code, "invalid_scope", "{bad:?}");
    }
}

#[test]
fn audience_injection_is_invalid_target() {
    for p in [
        Params {
            audience: vec!["https://evil.example.com".into()],
            ..Params::default()
        },
        Params {
            audience: vec!["https://api.example.com".into()],
            resource: vec!["https://evil.example.com".into()],
            ..Params::default()
        },
        // Two audiences and none named: no default is guessed.
        Params::default(),
    ] {
        assert_eq!(err(&subject(), &p).code, "invalid_target", "{p:?}");
    }
    // Both allowed targets: aud holds both.
    let p = Params {
        audience: vec!["https://api.example.com".into()],
        resource: vec!["https://db.example.com".into()],
        ..Params::default()
    };
    let i = ok(&subject(), &p);
    let (_, c) = verify(&i, "https://db.example.com");
    assert_eq!(
        c["aud"],
        json!(["https://api.example.com", "https://db.example.com"])
    );
}

#[test]
fn confused_deputy_may_act_naming_another_agent_is_refused() {
    let s = Subject {
        may_act: obj(json!({"sub": "other-agent"})),
        ..subject()
    };
    let e = err(&s, &params());
    assert_eq!(e.code, "invalid_request");
    assert!(e.description.contains("may_act"), "{e}");
    // may_act naming this agent is honoured.
    let s = Subject {
        may_act: obj(json!({"sub": "reporter"})),
        ..subject()
    };
    ok(&s, &params());
    // ... but not with another issuer, or a constraint keyturn does not know.
    for m in [
        json!({"sub": "reporter", "iss": "https://other.example.com"}),
        json!({"sub": "reporter", "email": "x@example.com"}),
    ] {
        let s = Subject {
            may_act: obj(m),
            ..subject()
        };
        assert_eq!(err(&s, &params()).code, "invalid_request");
    }
}

#[test]
fn the_act_chain_is_nested_never_dropped_and_bounded() {
    let s = Subject {
        act: obj(json!({"sub": "planner", "act": {"sub": "orchestrator"}})),
        ..subject()
    };
    let i = ok(&s, &params());
    let (_, c) = verify(&i, "https://api.example.com");
    assert_eq!(
        c["act"],
        json!({"sub": "reporter", "act": {"sub": "planner", "act": {"sub": "orchestrator"}}})
    );
    // Depth + 1 over the maximum.
    let s = Subject {
        act: obj(json!({"sub": "a", "act": {"sub": "b", "act": {"sub": "c"}}})),
        ..subject()
    };
    let e = err(&s, &params());
    assert_eq!(e.code, "invalid_request");
    assert!(e.description.contains("max_act_depth"), "{e}");
    // Malformed levels.
    for a in [
        json!({"act": {"sub": "b"}}),
        json!({"sub": "a", "act": "b"}),
        json!({"sub": 3}),
    ] {
        let s = Subject {
            act: obj(a),
            ..subject()
        };
        assert_eq!(err(&s, &params()).code, "invalid_request");
    }
}

#[test]
fn cross_tenant_subject_is_refused() {
    let s = Subject {
        tenant: "partner".into(),
        ..subject()
    };
    let e = err(&s, &params());
    assert_eq!(e.code, "invalid_request");
    assert!(e.description.contains("tenant"), "{e}");
}

#[test]
fn lifetime_is_never_inflated() {
    // Subject expiring sooner than the client ttl.
    let s = Subject {
        exp: NOW + 30,
        ..subject()
    };
    assert_eq!(ok(&s, &params()).expires_in, 30);
    // Client ttl above max_ttl.
    let c = ClientPolicy {
        ttl: Duration::from_secs(86_400),
        ..client()
    };
    let i = run(&subject(), Some(&c), &actor(), &params()).unwrap();
    assert_eq!(i.expires_in, 300);
    // The agent's credential ends sooner.
    let a = Actor {
        valid_until: Some(NOW + 10),
        ..actor()
    };
    let i = run(&subject(), Some(&client()), &a, &params()).unwrap();
    assert_eq!(i.expires_in, 10);
    let (_, claims) = verify(&i, "https://api.example.com");
    assert_eq!(claims["exp"], NOW + 10);
    // Nothing left.
    let s = Subject {
        exp: NOW,
        ..subject()
    };
    assert_eq!(err(&s, &params()).code, "invalid_request");
}

#[test]
fn an_agent_without_client_policy_is_unauthorized_client() {
    assert_eq!(
        run(&subject(), None, &actor(), &params()).unwrap_err().code,
        "unauthorized_client"
    );
    // Another agent's policy is not this agent's.
    let a = Actor {
        agent: "intruder".into(),
        valid_until: None,
    };
    assert_eq!(
        run(&subject(), Some(&client()), &a, &params())
            .unwrap_err()
            .code,
        "unauthorized_client"
    );
}

#[test]
fn requested_token_type_is_checked() {
    for t in [
        "urn:ietf:params:oauth:token-type:access_token",
        "urn:ietf:params:oauth:token-type:jwt",
    ] {
        let p = Params {
            requested_token_type: Some(t.into()),
            ..params()
        };
        ok(&subject(), &p);
    }
    let p = Params {
        requested_token_type: Some("urn:ietf:params:oauth:token-type:refresh_token".into()),
        ..params()
    };
    assert_eq!(err(&subject(), &p).code, "invalid_request");
}

/// bb7 #8: the `kid` of a signing key is its RFC 7638 thumbprint, the
/// same from the private key as from the public one, and differs per key.
#[test]
fn a_signing_key_kid_is_its_rfc_7638_thumbprint() {
    use ed25519_dalek::pkcs8::{DecodePrivateKey as _, EncodePublicKey as _};
    // RFC 8037 A.3: the thumbprint of its Ed25519 example key.
    let x = "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo";
    use base64::Engine as _;
    let bytes: [u8; 32] = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(x)
        .unwrap()
        .try_into()
        .unwrap();
    let vk = ed25519_dalek::VerifyingKey::from_bytes(&bytes).unwrap();
    assert_eq!(
        super::exchange::ed25519_kid(&vk),
        "kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k"
    );
    let private = std::str::from_utf8(PEM).unwrap();
    let signing =
        SigningKey::from_ed25519_pem(&crate::model::SecretValue::from_string(private.to_owned()))
            .unwrap();
    let public = ed25519_dalek::SigningKey::from_pkcs8_pem(private)
        .unwrap()
        .verifying_key()
        .to_public_key_pem(Default::default())
        .unwrap();
    assert_eq!(
        super::exchange::ed25519_kid_of_pem(&public).as_deref(),
        Some(signing.kid.as_str())
    );
    let other = std::str::from_utf8(include_bytes!("testdata/ed25519_b.pem")).unwrap();
    let other =
        SigningKey::from_ed25519_pem(&crate::model::SecretValue::from_string(other.to_owned()))
            .unwrap();
    assert_ne!(other.kid, signing.kid);
}

#[test]
fn issued_tokens_verify_with_the_published_jwks_by_kid() {
    use ed25519_dalek::pkcs8::{DecodePrivateKey as _, EncodePublicKey as _};
    let public = |pem: &[u8]| {
        ed25519_dalek::SigningKey::from_pkcs8_pem(std::str::from_utf8(pem).unwrap())
            .unwrap()
            .verifying_key()
            .to_public_key_pem(Default::default())
            .unwrap()
    };
    let key = |kid: &str, public_pem: String| super::exchange::PublishedKey {
        kid: kid.into(),
        public_pem,
    };
    let keys = [
        key("7", public(PEM)),
        key("6", public(include_bytes!("testdata/ed25519_b.pem"))),
        key("5", "not a key".into()),
    ];
    let doc = super::exchange::jwks_document(&keys);
    let set: jsonwebtoken::jwk::JwkSet = serde_json::from_value(doc.clone()).unwrap();
    assert_eq!(set.keys.len(), 2, "{doc}");
    assert_eq!(doc["keys"][0]["kty"], "OKP");
    assert_eq!(doc["keys"][0]["crv"], "Ed25519");
    assert_eq!(doc["keys"][1]["kid"], "6");
    assert!(doc["keys"][0].get("d").is_none(), "never the private part");

    let i = ok(&subject(), &params());
    let token = i.access_token.expose_str().unwrap();
    let kid = jsonwebtoken::decode_header(token).unwrap().kid.unwrap();
    let mut v = Validation::new(Algorithm::EdDSA);
    v.set_audience(&["https://api.example.com"]);
    v.validate_exp = false;
    let jwk = set.find(&kid).unwrap();
    jsonwebtoken::decode::<Value>(token, &DecodingKey::from_jwk(jwk).unwrap(), &v).unwrap();
    // The previous version's key does not verify the current one's token.
    let other = set.find("6").unwrap();
    assert!(
        jsonwebtoken::decode::<Value>(token, &DecodingKey::from_jwk(other).unwrap(), &v).is_err()
    );
}
