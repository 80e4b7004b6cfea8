//! The verifier against real Ed25519 keys (made by the ed25519 generator,
//! as the daemon makes them) and the real task store as the jti ledger.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use proptest::prelude::*;
use serde_json::{Value, json};

use super::assertion::{AgentKey, AssertionError, Verifier};
use crate::model::{AgentId, CredentialId, CredentialKey, RotationId, SecretValue, Stage};
use crate::state::VersionRow;
use crate::tasks::store::TaskStore;

const AUD: &str = "keyturn";
const AGENT: &str = "invoice-bot";

use crate::test_support::{Pair, pair};

fn now() -> i64 {
    i64::try_from(jsonwebtoken::get_current_timestamp()).unwrap()
}

fn claims() -> Value {
    let now = now();
    json!({
        "iss": AGENT, "sub": AGENT, "aud": AUD,
        "iat": now, "exp": now + 60,
        "jti": format!("jti-{}", rand::random::<u64>()),
    })
}

fn signed_with(p: &Pair, header: &Header, claims: &Value) -> String {
    let key = EncodingKey::from_ed_pem(p.private.expose()).unwrap();
    jsonwebtoken::encode(header, claims, &key).unwrap()
}

fn signed(p: &Pair, claims: &Value) -> String {
    signed_with(p, &Header::new(Algorithm::EdDSA), claims)
}

fn key(version: u64, p: &Pair) -> AgentKey {
    AgentKey {
        version,
        public_pem: p.public.clone(),
    }
}

struct Harness {
    dir: tempfile::TempDir,
    store: TaskStore,
    verifier: Verifier,
}

fn harness() -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let store = TaskStore::open(dir.path()).unwrap();
    Harness {
        dir,
        store,
        verifier: Verifier::new(AUD),
    }
}

impl Harness {
    fn check(&self, token: &str, keys: &[AgentKey]) -> Result<super::Verified, AssertionError> {
        let claimed = self.verifier.claimed_agent(token)?;
        self.verifier.verify(token, &claimed, keys, &self.store)
    }
}

fn without(mut c: Value, claim: &str) -> Value {
    c.as_object_mut().unwrap().remove(claim);
    c
}

fn with(mut c: Value, claim: &str, v: Value) -> Value {
    c.as_object_mut().unwrap().insert(claim.into(), v);
    c
}

#[test]
fn a_valid_assertion_is_accepted_and_names_the_agent() {
    let h = harness();
    let p = pair();
    let c = claims();
    let v = h.check(&signed(&p, &c), &[key(3, &p)]).unwrap();
    assert_eq!(v.agent, AGENT);
    assert_eq!(v.jti, c["jti"].as_str().unwrap());
    assert_eq!(v.exp, c["exp"].as_i64().unwrap());
    assert_eq!(v.key_version, 3);
    // `aud` as an array holding the audience is as good.
    let c = with(claims(), "aud", json!(["other", AUD]));
    h.check(&signed(&p, &c), &[key(3, &p)]).unwrap();
}

#[test]
fn a_replayed_assertion_is_refused_also_after_reopening_the_store() {
    let h = harness();
    let p = pair();
    let token = signed(&p, &claims());
    h.check(&token, &[key(1, &p)]).unwrap();
    assert_eq!(
        h.check(&token, &[key(1, &p)]),
        Err(AssertionError::Replayed)
    );
    // The daemon restarts: the ledger is the database, not memory.
    let Harness { dir, store, .. } = h;
    drop(store);
    let h = Harness {
        store: TaskStore::open(dir.path()).unwrap(),
        dir,
        verifier: Verifier::new(AUD),
    };
    assert_eq!(
        h.check(&token, &[key(1, &p)]),
        Err(AssertionError::Replayed)
    );
}

#[test]
fn the_same_jti_of_two_agents_is_two_assertions_and_expired_rows_are_pruned() {
    let h = harness();
    let now = now();
    assert!(h.store.spend_jti("a", "j", now + 60, now).unwrap());
    assert!(h.store.spend_jti("b", "j", now + 60, now).unwrap());
    assert!(!h.store.spend_jti("a", "j", now + 60, now).unwrap());
    // Once past its expiry a row is pruned by the next insert.
    assert!(h.store.spend_jti("c", "k", now + 200, now + 100).unwrap());
    assert!(h.store.spend_jti("a", "j", now + 300, now + 100).unwrap());
}

#[test]
fn an_assertion_for_another_audience_is_refused() {
    let h = harness();
    let p = pair();
    let c = with(claims(), "aud", json!("someone-else"));
    assert_eq!(
        h.check(&signed(&p, &c), &[key(1, &p)]),
        Err(AssertionError::Audience {
            expected: AUD.into()
        })
    );
    let c = with(claims(), "aud", json!(["a", "b"]));
    assert!(matches!(
        h.check(&signed(&p, &c), &[key(1, &p)]),
        Err(AssertionError::Audience { .. })
    ));
}

#[test]
fn time_claims_are_enforced() {
    let h = harness();
    let p = pair();
    let k = [key(1, &p)];
    let now = now();
    let expired = with(
        with(claims(), "iat", json!(now - 200)),
        "exp",
        json!(now - 100),
    );
    assert_eq!(
        h.check(&signed(&p, &expired), &k),
        Err(AssertionError::Expired)
    );
    let too_long = with(claims(), "exp", json!(now + 3600));
    assert_eq!(
        h.check(&signed(&p, &too_long), &k),
        Err(AssertionError::LifetimeTooLong)
    );
    assert!(
        AssertionError::LifetimeTooLong
            .to_string()
            .contains("lifetime is too long")
    );
    // Backdating iat to stretch the window does not help either.
    let backdated = with(
        with(claims(), "iat", json!(now - 290)),
        "exp",
        json!(now + 60),
    );
    assert_eq!(
        h.check(&signed(&p, &backdated), &k),
        Err(AssertionError::LifetimeTooLong)
    );
    let nbf = with(claims(), "nbf", json!(now + 120));
    assert_eq!(
        h.check(&signed(&p, &nbf), &k),
        Err(AssertionError::NotYetValid)
    );
    let iat = with(
        with(claims(), "iat", json!(now + 120)),
        "exp",
        json!(now + 180),
    );
    assert_eq!(
        h.check(&signed(&p, &iat), &k),
        Err(AssertionError::IssuedInFuture)
    );
    // Within the skew is fine.
    let skewed = with(claims(), "iat", json!(now + 10));
    h.check(&signed(&p, &skewed), &k).unwrap();
}

#[test]
fn every_required_claim_is_required() {
    let h = harness();
    let p = pair();
    let k = [key(1, &p)];
    for claim in ["exp", "iat", "jti", "iss", "sub", "aud"] {
        let c = without(claims(), claim);
        assert_eq!(
            h.check(&signed(&p, &c), &k),
            Err(AssertionError::MissingClaim(claim.into())),
            "without {claim}"
        );
    }
    let c = with(claims(), "sub", json!("other-bot"));
    assert!(matches!(
        h.check(&signed(&p, &c), &k),
        Err(AssertionError::IssNotSub { .. })
    ));
    let c = with(claims(), "jti", json!("x".repeat(129)));
    assert_eq!(h.check(&signed(&p, &c), &k), Err(AssertionError::BadJti));
    let c = with(claims(), "jti", json!(""));
    assert_eq!(h.check(&signed(&p, &c), &k), Err(AssertionError::BadJti));
}

fn b64(v: &Value) -> String {
    URL_SAFE_NO_PAD.encode(serde_json::to_vec(v).unwrap())
}

#[test]
fn alg_none_and_other_algorithms_are_refused() {
    let h = harness();
    let p = pair();
    let k = [key(1, &p)];
    let unsigned = format!(
        "{}.{}.",
        b64(&json!({"alg": "none", "typ": "JWT"})),
        b64(&claims())
    );
    assert_eq!(
        h.check(&unsigned, &k),
        Err(AssertionError::Algorithm("none".into()))
    );
    // The classic confusion: HS256 keyed with the public key's bytes (as a
    // verifier that takes the alg from the token would check it).
    let raw_public = {
        use ed25519_dalek::pkcs8::DecodePublicKey;
        ed25519_dalek::VerifyingKey::from_public_key_pem(&p.public)
            .unwrap()
            .to_bytes()
            .to_vec()
    };
    for secret in [p.public.as_bytes().to_vec(), raw_public] {
        let hs = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims(),
            &EncodingKey::from_secret(&secret).unwrap(),
        )
        .unwrap();
        assert_eq!(
            h.check(&hs, &k),
            Err(AssertionError::Algorithm("HS256".into()))
        );
        // And past the header check, the library refuses it too: the alg
        // is pinned, never taken from the token.
        let claimed = super::assertion::Claimed {
            agent: AGENT.into(),
            kid: None,
        };
        assert!(matches!(
            h.verifier.verify(&hs, &claimed, &k, &h.store),
            Err(AssertionError::Algorithm(_))
        ));
    }
    for alg in ["RS256", "ES256", "PS256", "HS512"] {
        let forged = format!("{}.{}.c2ln", b64(&json!({"alg": alg})), b64(&claims()));
        assert_eq!(
            h.check(&forged, &k),
            Err(AssertionError::Algorithm(alg.into()))
        );
    }
}

#[test]
fn another_agents_key_is_refused() {
    let h = harness();
    let mine = pair();
    let theirs = pair();
    // Signed by another agent's key, claiming to be this agent.
    assert_eq!(
        h.check(&signed(&theirs, &claims()), &[key(1, &mine)]),
        Err(AssertionError::BadSignature(AGENT.into()))
    );
    assert_eq!(
        h.check(&signed(&mine, &claims()), &[]),
        Err(AssertionError::NoKey(AGENT.into()))
    );
}

/// A listener that counts every connection it gets.
fn counting_listener() -> (String, Arc<AtomicUsize>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/jwks.json", l.local_addr().unwrap());
    let hits = Arc::new(AtomicUsize::new(0));
    let counted = hits.clone();
    std::thread::spawn(move || {
        for mut s in l.incoming().flatten() {
            counted.fetch_add(1, Ordering::SeqCst);
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf);
            let _ = s.write_all(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n");
        }
    });
    (url, hits)
}

#[test]
fn key_pointing_headers_are_never_fetched_nor_used() {
    let h = harness();
    let configured = pair();
    let attacker = pair();
    let (url, hits) = counting_listener();
    let mut header = Header::new(Algorithm::EdDSA);
    header.jku = Some(url.clone());
    header.x5u = Some(url.clone());
    // The attacker's own key in the token (jwk, x5c): ignored.
    let raw = {
        use ed25519_dalek::pkcs8::DecodePublicKey;
        ed25519_dalek::VerifyingKey::from_public_key_pem(&attacker.public).unwrap()
    };
    header.jwk = Some(
        serde_json::from_value(json!({
            "kty": "OKP", "crv": "Ed25519", "alg": "EdDSA",
            "x": URL_SAFE_NO_PAD.encode(raw.as_bytes()),
        }))
        .unwrap(),
    );
    header.x5c = Some(vec!["MIIBMzCB5qADAgECAhQ".into()]);
    let forged = signed_with(&attacker, &header, &claims());
    assert_eq!(
        h.check(&forged, &[key(1, &configured)]),
        Err(AssertionError::BadSignature(AGENT.into()))
    );
    // The agent's own token with the same headers verifies against the
    // configured key only.
    let genuine = signed_with(&configured, &header, &claims());
    assert_eq!(
        h.check(&genuine, &[key(1, &configured)])
            .unwrap()
            .key_version,
        1
    );
    std::thread::sleep(std::time::Duration::from_millis(200));
    assert_eq!(
        hits.load(Ordering::SeqCst),
        0,
        "the jku/x5u URL was contacted"
    );
    // The listener does count: a connection shows.
    drop(
        std::net::TcpStream::connect(url.trim_start_matches("http://").split('/').next().unwrap())
            .unwrap(),
    );
    std::thread::sleep(std::time::Duration::from_millis(200));
    assert_eq!(hits.load(Ordering::SeqCst), 1);
}

fn version(n: u64, stage: Stage, p: &Pair) -> VersionRow {
    VersionRow {
        key: CredentialKey::new(
            AgentId::new(AGENT).unwrap(),
            CredentialId::new("auth").unwrap(),
        ),
        version: n,
        rotation: RotationId::generate(),
        stage,
        vault_version: n.to_string(),
        created_at: chrono::Utc::now(),
        public: Some(p.public.clone()),
    }
}

#[test]
fn current_and_previous_keys_are_accepted_pending_and_retired_refused() {
    let h = harness();
    let (retired, previous, current, pending) = (pair(), pair(), pair(), pair());
    let rows = [
        version(1, Stage::Retired, &retired),
        version(2, Stage::Previous, &previous),
        version(3, Stage::Current, &current),
        version(4, Stage::Pending, &pending),
    ];
    let keys = AgentKey::accepted(&rows);
    assert_eq!(
        keys.iter().map(|k| k.version).collect::<Vec<_>>(),
        [3, 2],
        "current first, then previous"
    );
    assert_eq!(
        h.check(&signed(&current, &claims()), &keys)
            .unwrap()
            .key_version,
        3
    );
    assert_eq!(
        h.check(&signed(&previous, &claims()), &keys)
            .unwrap()
            .key_version,
        2
    );
    for (what, p) in [("retired", &retired), ("pending", &pending)] {
        assert_eq!(
            h.check(&signed(p, &claims()), &keys),
            Err(AssertionError::BadSignature(AGENT.into())),
            "{what}"
        );
    }
    // A kid picks the version; one that is not accepted is refused by name.
    let mut header = Header::new(Algorithm::EdDSA);
    header.kid = Some("2".into());
    assert_eq!(
        h.check(&signed_with(&previous, &header, &claims()), &keys)
            .unwrap()
            .key_version,
        2
    );
    header.kid = Some("1".into());
    assert!(matches!(
        h.check(&signed_with(&retired, &header, &claims()), &keys),
        Err(AssertionError::UnknownKid { .. })
    ));
}

#[test]
fn garbage_never_panics_and_is_refused() {
    let h = harness();
    let p = pair();
    let k = [key(1, &p)];
    let good = signed(&p, &claims());
    let cases = [
        String::new(),
        ".".into(),
        "..".into(),
        "...".into(),
        "a.b.c".into(),
        "a.b".into(),
        "💥.💥.💥".into(),
        format!("{}.{}", b64(&json!({"alg": "EdDSA"})), b64(&json!([1, 2]))),
        format!("{}.{}.", b64(&json!("EdDSA")), b64(&claims())),
        format!("{}.{}.", b64(&json!({"alg": 7})), b64(&claims())),
        format!("{}.{}.!!", b64(&json!({"alg": "EdDSA"})), b64(&claims())),
        format!(
            "{}.{}.AAAA",
            b64(&json!({"alg": "EdDSA"})),
            b64(&with(claims(), "exp", json!("soon")))
        ),
        format!(
            "{}.{}.AAAA",
            b64(&json!({"alg": "EdDSA", "kid": 5})),
            b64(&claims())
        ),
        format!(
            "{}.{}.AAAA",
            b64(&json!({"alg": "EdDSA", "crit": ["x"]})),
            b64(&claims())
        ),
        good.replace('.', ""),
        format!("{good}.extra"),
        good[..good.len() - 3].to_string(),
        "x".repeat(super::MAX_TOKEN_BYTES + 1),
    ];
    for token in &cases {
        assert!(h.check(token, &k).is_err(), "accepted {token:?}");
    }
    assert!(matches!(
        h.check(&"x".repeat(super::MAX_TOKEN_BYTES + 1), &k),
        Err(AssertionError::TooLarge(_))
    ));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    #[test]
    fn random_input_never_panics(token in ".{0,600}", flip in 0usize..400, byte in any::<u8>()) {
        let h = harness();
        let p = pair();
        let k = [key(1, &p)];
        prop_assert!(h.check(&token, &k).is_err());
        // A genuine token with any one byte changed is refused.
        let good = signed(&p, &claims());
        let mut bytes = good.clone().into_bytes();
        let i = flip % bytes.len();
        bytes[i] = byte;
        if let Ok(mutated) = String::from_utf8(bytes)
            && mutated != good
        {
            prop_assert!(h.check(&mutated, &k).is_err());
        }
    }
}

#[test]
fn a_signed_assertion_verifies_and_its_error_texts_never_hold_the_token() {
    let h = harness();
    let p = pair();
    let token = super::sign(&p.private, AGENT, AUD, 60).unwrap();
    let text = token.expose_str().unwrap().to_owned();
    let v = h.check(&text, &[key(7, &p)]).unwrap();
    assert_eq!((v.agent.as_str(), v.key_version), (AGENT, 7));
    assert!(v.exp - now() <= 60);
    let err = h.check(&text, &[key(7, &p)]).unwrap_err().to_string();
    assert!(!err.contains(&text) && !err.contains(text.split('.').nth(2).unwrap()));
    assert_eq!(format!("{token:?}"), "SecretValue([redacted])");
    let not_a_key = SecretValue::from_string(
        "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n".into(),
    );
    assert!(super::sign(&not_a_key, AGENT, AUD, 60).is_err());
}
