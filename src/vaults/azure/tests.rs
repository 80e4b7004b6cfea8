//! The Azure Key Vault tests: pure ones, and ones against the in-repo contract stub (no emulator exists).

//! Unit tests for naming and error mapping, and REAL-SERVER tests against
//! the Key Vault contract stub (`tests/stubs/azure_keyvault_stub.py`),
//! started by `scripts/services.sh`, through the real SDK over TLS.

use super::*;
use macro_rules_attribute::apply;

use crate::test_support::{secret, server_test};
use crate::vaults::contract::{assert_error, item, stage_new};
use azure_core::credentials::{AccessToken, TokenRequestOptions};

const STUB_TOKEN: &str = "keyturn-test-token";
/// The stub's default `--client-id` / `--client-secret`.
const STUB_CLIENT_ID: &str = "keyturn-test-client";
const STUB_CLIENT_SECRET: &str = "keyturn-test-secret";
const START_SERVICES: &str =
    "start the test services: `bash scripts/services.sh start` (or run `bash scripts/test.sh`)";

#[test]
fn secret_names_are_valid_deterministic_and_distinct() {
    assert_eq!(
        secret_name("agents/invoice-bot/db_main").unwrap(),
        "agents--invoice-hbot--db-umain"
    );
    assert_eq!(secret_name("a/b_c").unwrap(), "a--b-uc");
    assert_eq!(secret_name("Db.v2").unwrap(), "-cdb-pv2");
    assert_eq!(secret_name("a b").unwrap(), "a-x20b");
    // Pairs that a lossy mapping (drop, lowercase, `/`→`-`) would merge.
    let paths = [
        "a/b", "a-b", "a_b", "a.b", "ab", "a//b", "a--b", "A/b", "a/B", "a-/b", "a/-b", "a-hb",
        "a/hb", "é", "a-x20b", "a b",
    ];
    let mut seen = std::collections::HashMap::new();
    for p in paths {
        let n = secret_name(p).unwrap();
        assert!(
            n.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-'),
            "{p} -> {n}"
        );
        assert!(!n.contains("-s"), "{n} could collide with a staging name");
        if let Some(other) = seen.insert(n.clone(), p) {
            panic!("{p} and {other} both map to {n}");
        }
    }
    assert_eq!(
        secret_name(&"a".repeat(MAX_ENCODED_LEN)).unwrap().len(),
        MAX_ENCODED_LEN
    );
    let long = secret_name(&"a".repeat(MAX_ENCODED_LEN + 1)).unwrap_err();
    assert_eq!(long.kind, ErrorKind::Invalid);
    assert!(secret_name("").is_err());
    let names = Names::of("x/y").unwrap();
    assert_eq!(names.staging, "x--y-staging");
    assert!(names.staging.len() <= 127);
}

#[test]
fn http_errors_map_to_kinds_with_retry_after() {
    use azure_core::http::headers::Headers;
    use azure_core::http::{RawResponse, StatusCode};
    let err = |status: StatusCode, retry_after: Option<&str>| {
        let mut headers = Headers::new();
        if let Some(r) = retry_after {
            headers.insert(RETRY_AFTER, r.to_owned());
        }
        let raw = RawResponse::from_bytes(status, headers, "");
        azure_core::Error::with_message(
            AzErrorKind::HttpResponse {
                status,
                error_code: Some("Code".into()),
                raw_response: Some(Box::new(raw)),
            },
            "service said no",
        )
    };
    assert_eq!(
        retry_after(&err(StatusCode::TooManyRequests, Some("7"))),
        Some(std::time::Duration::from_secs(7))
    );
    assert_eq!(retry_after(&err(StatusCode::TooManyRequests, None)), None);
    let (k, d) = classify(&err(StatusCode::TooManyRequests, Some("7")));
    assert_eq!(k, ErrorKind::Throttled);
    assert!(
        d.contains("HTTP 429") && d.contains("retry after 7s"),
        "{d}"
    );
    for (status, kind) in [
        (StatusCode::ServiceUnavailable, ErrorKind::Transient),
        (StatusCode::InternalServerError, ErrorKind::Transient),
        (StatusCode::Unauthorized, ErrorKind::Unauthorized),
        (StatusCode::Forbidden, ErrorKind::Unauthorized),
        (StatusCode::NotFound, ErrorKind::NotFound),
        (StatusCode::Conflict, ErrorKind::Conflict),
        (StatusCode::BadRequest, ErrorKind::Invalid),
    ] {
        assert_eq!(classify(&err(status, None)).0, kind, "{status:?}");
    }
    let io = azure_core::Error::with_message(AzErrorKind::Io, "connection reset");
    assert_eq!(classify(&io).0, ErrorKind::Transient);
    let conn = azure_core::Error::with_message(AzErrorKind::Connection, "refused");
    assert_eq!(classify(&conn).0, ErrorKind::Transient);
    let cred = azure_core::Error::with_message(AzErrorKind::Credential, "no token");
    assert_eq!(classify(&cred).0, ErrorKind::Unauthorized);
}

#[test]
fn settings_without_https_are_refused() {
    let s = AzureConfig {
        timeout: Some("1s".into()),
        ..AzureConfig::new("http://127.0.0.1:1", "workload_identity")
    };
    let e = AzureVault::with_credential("kv", &s, Arc::new(FixedToken("t".into()))).unwrap_err();
    assert_error(&e, ErrorKind::Invalid, &["https://"], &[]);
}

// --- against the stub (real SDK, real TLS) ------------------------------

/// Stands in for Entra ID: always the same token.
#[derive(Debug)]
struct FixedToken(String);

#[async_trait]
impl TokenCredential for FixedToken {
    async fn get_token(
        &self,
        _scopes: &[&str],
        _options: Option<TokenRequestOptions<'_>>,
    ) -> azure_core::Result<AccessToken> {
        Ok(AccessToken::new(
            self.0.clone(),
            OffsetDateTime::now_utc() + azure_core::time::Duration::hours(1),
        ))
    }
}

struct Stub {
    url: String,
    ca: PathBuf,
}

fn stub() -> Stub {
    let url =
        std::env::var("KEYTURN_TEST_AZURE_URL").unwrap_or_else(|_| panic!("{START_SERVICES}"));
    let ca = std::env::var("KEYTURN_TEST_AZURE_CA").unwrap_or_else(|_| panic!("{START_SERVICES}"));
    Stub {
        url: url.trim_end_matches('/').to_owned(),
        ca: PathBuf::from(ca),
    }
}

/// The vault `name` at `url`, trusting the stub's CA, logged in with `token`.
fn vault_at(name: &str, url: &str, timeout: &str, token: &str) -> AzureVault {
    let s = AzureConfig {
        ca_file: Some(stub().ca),
        verify_challenge_resource: Some(false),
        timeout: Some(timeout.into()),
        ..AzureConfig::new(url, "workload_identity")
    };
    AzureVault::with_credential(name, &s, Arc::new(FixedToken(token.into()))).unwrap()
}

fn vault_with_token(token: &str) -> AzureVault {
    vault_at("kv-test", &stub().url, "10s", token)
}

fn vault() -> AzureVault {
    vault_with_token(STUB_TOKEN)
}

/// A vault that logs in like the daemon does: a client secret sent to
/// the stub's Entra ID token endpoint (`authority_host`), over the same
/// TLS client as the vault requests (the stub's CA is only in `ca_file`).
async fn vault_with_client_secret(secret: &str) -> (AzureVault, tempfile::TempDir) {
    let stub = stub();
    let dir = tempfile::tempdir().unwrap();
    let secret_file = dir.path().join("client-secret");
    std::fs::write(&secret_file, format!("{secret}\n")).unwrap();
    let s = AzureConfig {
        tenant_id: Some("00000000-0000-0000-0000-000000000001".into()),
        client_id: Some(STUB_CLIENT_ID.into()),
        client_secret_file: Some(secret_file),
        ca_file: Some(stub.ca),
        verify_challenge_resource: Some(false),
        authority_host: Some(stub.url.clone()),
        timeout: Some("10s".into()),
        ..AzureConfig::new(stub.url, "client_secret")
    };
    (AzureVault::connect("kv-entra", &s).await.unwrap(), dir)
}

#[apply(server_test!)]
async fn client_secret_logs_in_at_the_authority_host() {
    let (v, _dir) = vault_with_client_secret(STUB_CLIENT_SECRET).await;
    v.check().await.unwrap();
    // A full write and read, so the token is really accepted for writes.
    let path = unique_path("entra");
    let r = stage_new(&v, &path, "entra-value").await.unwrap();
    v.promote(item(&path), &r).await.unwrap();
    assert_eq!(latest(&v, &path).await.as_deref(), Some("entra-value"));
}

#[apply(server_test!)]
async fn a_wrong_client_secret_is_unauthorized_and_not_quoted() {
    let wrong = "wrong-secret-7f3a9c";
    let (v, _dir) = vault_with_client_secret(wrong).await;
    let e = v.check().await.unwrap_err();
    // Entra ID's own reason reaches the operator.
    let names = ["kv-entra", "Invalid client secret"];
    assert_error(&e, ErrorKind::Unauthorized, &names, &[wrong]);
}

/// Defect (found black-box): a server certificate that does not chain to
/// `ca_file` was `transient` (retried for ever, "check that the service is
/// up"). It is `invalid`, and says what to check.
#[apply(server_test!)]
async fn a_certificate_not_from_the_ca_file_is_invalid_not_transient() {
    // A CA, but not the stub's: the test PostgreSQL's.
    let other_ca =
        std::env::var("KEYTURN_TEST_PG_CA").unwrap_or_else(|_| panic!("{START_SERVICES}"));
    let s = AzureConfig {
        ca_file: Some(PathBuf::from(other_ca)),
        verify_challenge_resource: Some(false),
        timeout: Some("10s".into()),
        ..AzureConfig::new(stub().url, "workload_identity")
    };
    let v =
        AzureVault::with_credential("kv-ca", &s, Arc::new(FixedToken(STUB_TOKEN.into()))).unwrap();
    let e = v.check().await.unwrap_err();
    assert_error(
        &e,
        ErrorKind::Invalid,
        &["kv-ca", "ca_file", "certificate"],
        &[],
    );
}

/// A path no other test (or earlier run) uses.
fn unique_path(test: &str) -> String {
    format!("tests/{test}/{}", RotationId::generate())
}

/// The stub vault, a path no other test uses, and the names of its secrets.
fn subject(test: &str) -> (AzureVault, String, Names) {
    let path = unique_path(test);
    let names = Names::of(&path).unwrap();
    (vault(), path, names)
}

async fn contract_subject() -> (AzureVault, String, ()) {
    (vault(), unique_path("contract"), ())
}

crate::vaults::contract::vault_contract! {
    #[cfg_attr(
        not(feature = "real-servers"),
        ignore = "needs the test servers: scripts/services.sh start, then --features real-servers"
    )]
    open = contract_subject
}

/// Tells the stub to misbehave for one secret.
async fn control(what: &str, body: serde_json::Value) {
    let stub = stub();
    let pem = std::fs::read(&stub.ca).unwrap();
    let client = reqwest::Client::builder()
        .tls_certs_merge(reqwest::Certificate::from_pem_bundle(&pem).unwrap())
        .build()
        .unwrap();
    let rsp = client
        .post(format!("{}/_stub/{what}", stub.url))
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    assert!(
        rsp.status().is_success(),
        "stub control {what}: {}",
        rsp.status()
    );
}

/// Has the stub make the next write to `secret` but drop its response.
async fn drop_next_response(secret: &str) {
    control(
        "drop_response",
        serde_json::json!({"count": 1, "secret": secret}),
    )
    .await;
}

/// Has the stub answer the next request for `secret` with `status`,
/// asking to retry after `retry_after` seconds.
async fn fail_next(secret: &str, status: u16, retry_after: u64) {
    control(
        "faults",
        serde_json::json!({"status": status, "count": 1, "retry_after": retry_after, "secret": secret}),
    )
    .await;
}

/// What a plain reader of the vault gets: the latest version's value.
async fn latest(v: &AzureVault, path: &str) -> Option<String> {
    match v.client.get_secret(&secret_name(path).unwrap(), None).await {
        Ok(r) => r.into_model().unwrap().value,
        Err(e) if e.http_status().map(u16::from) == Some(404) => None,
        Err(e) => panic!("plain read of {path}: {e}"),
    }
}

#[apply(server_test!)]
async fn plain_readers_get_only_promoted_values_and_retired_versions_are_disabled() {
    let (v, path, names) = subject("cycle");
    let it = item(&path);

    let v1 = stage_new(&v, &path, "value-one").await.unwrap();
    assert_eq!(
        latest(&v, &path).await,
        None,
        "a pending value must not be what readers get"
    );

    // Promote: readers get it; a replayed promote makes no second version.
    v.promote(it, &v1).await.unwrap();
    v.promote(it, &v1).await.unwrap();
    assert_eq!(latest(&v, &path).await.as_deref(), Some("value-one"));
    assert_eq!(
        v.list_versions("t", &names.main).await.unwrap().len(),
        1,
        "a replayed promote made a second version"
    );

    // Readers keep the current value while the next one is pending.
    let v2 = stage_new(&v, &path, "value-two").await.unwrap();
    assert_eq!(latest(&v, &path).await.as_deref(), Some("value-one"));
    v.promote(it, &v2).await.unwrap();
    assert_eq!(latest(&v, &path).await.as_deref(), Some("value-two"));

    // Retire the previous: disabled in the vault, unreadable even by id.
    v.retire(it, &v1).await.unwrap();
    let main = v.list_versions("t", &names.main).await.unwrap();
    let old = main
        .iter()
        .find(|m| m.tag(TAG_VERSION) == Some(v1.0.as_str()))
        .unwrap();
    assert!(!old.enabled, "the retired version must be disabled");
    assert_eq!(old.stage(), Some("retired"));
    let opts = SecretClientGetSecretOptions {
        secret_version: Some(old.id.clone()),
        ..Default::default()
    };
    let e = v
        .client
        .get_secret(&names.main, Some(opts))
        .await
        .unwrap_err();
    assert_eq!(
        e.http_status().map(u16::from),
        Some(403),
        "a disabled version must not be readable"
    );
    // A refused retire of the current version leaves readers alone.
    assert_eq!(
        v.retire(it, &v2).await.unwrap_err().kind,
        ErrorKind::Invalid
    );
    assert_eq!(latest(&v, &path).await.as_deref(), Some("value-two"));

    v.destroy(it).await.unwrap();
    assert_eq!(latest(&v, &path).await, None);
}

#[apply(server_test!)]
async fn stage_replay_after_a_lost_response_returns_the_same_version() {
    let (v, path, names) = subject("dropped");
    let it = item(&path);
    let r = RotationId::generate();

    drop_next_response(&names.staging).await;
    let e = v
        .stage(it.pending(&r, &secret("first-try")))
        .await
        .unwrap_err();
    let staging = names.staging.as_str();
    assert_error(
        &e,
        ErrorKind::Transient,
        &[staging, "kv-test"],
        &["first-try"],
    );

    // The write happened; the retry must find it, not write again.
    let version = v
        .stage(it.pending(&r, &secret("second-try")))
        .await
        .unwrap();
    let staged = v.list_versions("t", &names.staging).await.unwrap();
    assert_eq!(
        staged.len(),
        1,
        "the retried stage created a second version"
    );
    assert_eq!(staged[0].id, version.0);
    let p = v
        .read(it, Select::Stage(Stage::Pending))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        p.value.expose(),
        b"first-try",
        "the committed value is the one kept"
    );

    // Same for promote: the copy to the main secret is not made twice.
    drop_next_response(&names.main).await;
    assert_eq!(
        v.promote(it, &version).await.unwrap_err().kind,
        ErrorKind::Transient
    );
    v.promote(it, &version).await.unwrap();
    assert_eq!(v.list_versions("t", &names.main).await.unwrap().len(), 1);
    assert_eq!(latest(&v, &path).await.as_deref(), Some("first-try"));
    v.destroy(it).await.unwrap();
}

#[apply(server_test!)]
async fn throttling_is_throttled_with_retry_after_and_not_retried_by_the_sdk() {
    let (v, path, names) = subject("throttled");
    fail_next(&names.staging, 429, 7).await;
    let e = stage_new(&v, &path, "v").await.unwrap_err();
    let staging = names.staging.as_str();
    assert_error(
        &e,
        ErrorKind::Throttled,
        &["retry after 7s", "stage", staging],
        &[],
    );
    assert_eq!(
        e.retry_after,
        Some(std::time::Duration::from_secs(7)),
        "the engine waits at least what the vault asked"
    );
    // One fault, one failure: the SDK did not retry it away, and it is over.
    stage_new(&v, &path, "v").await.unwrap();
    v.destroy(item(&path)).await.unwrap();
}

#[apply(server_test!)]
async fn service_unavailable_is_transient() {
    let (v, path, names) = subject("unavailable");
    fail_next(&names.main, 503, 1).await;
    let current = Select::Stage(Stage::Current);
    let e = v.read(item(&path), current).await.unwrap_err();
    assert_error(&e, ErrorKind::Transient, &["HTTP 503"], &[]);
    assert!(v.read(item(&path), current).await.unwrap().is_none());
}

#[apply(server_test!)]
async fn a_bad_token_is_unauthorized() {
    let v = vault_with_token("not-the-token");
    let path = unique_path("badtoken");
    let e = stage_new(&v, &path, "v").await.unwrap_err();
    assert_error(&e, ErrorKind::Unauthorized, &[], &["not-the-token"]);
    assert_eq!(v.check().await.unwrap_err().kind, ErrorKind::Unauthorized);
}

#[apply(server_test!)]
async fn an_unreachable_vault_is_transient() {
    // A port nobody listens on (bind, read the port, close).
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("https://127.0.0.1:{port}");
    let v = vault_at("kv-down", &url, "5s", STUB_TOKEN);
    let e = v.check().await.unwrap_err();
    assert_error(&e, ErrorKind::Transient, &["kv-down"], &[]);
}

#[apply(server_test!)]
async fn promoting_an_abandoned_version_is_invalid() {
    let (v, path) = (vault(), unique_path("abandon"));
    let old = stage_new(&v, &path, "old").await.unwrap();
    stage_new(&v, &path, "new").await.unwrap();
    assert_eq!(
        v.promote(item(&path), &old).await.unwrap_err().kind,
        ErrorKind::Invalid
    );
    v.destroy(item(&path)).await.unwrap();
}

#[apply(server_test!)]
async fn replay_finds_a_version_beyond_the_first_page() {
    let (v, path, names) = subject("paging");
    let it = item(&path);
    let rotations: Vec<RotationId> = (0..30).map(|_| RotationId::generate()).collect();
    let mut versions = Vec::new();
    for r in &rotations {
        versions.push(v.stage(it.pending(r, &secret("x"))).await.unwrap());
    }
    // The service pages at 25: rotation 28's version is on page two.
    assert_eq!(
        v.stage(it.pending(&rotations[28], &secret("y")))
            .await
            .unwrap(),
        versions[28]
    );
    assert_eq!(
        v.list_versions("t", &names.staging).await.unwrap().len(),
        30
    );
    v.destroy(it).await.unwrap();
}

#[test]
fn only_loopback_urls_count_as_loopback() {
    use super::config::is_loopback_url;
    for url in [
        "https://127.0.0.1:8443",
        "https://127.3.2.1",
        "https://[::1]:8443/",
        "https://LOCALHOST:1",
    ] {
        assert!(is_loopback_url(url), "{url}");
    }
    for url in [
        "https://acme.vault.azure.net",
        "https://localhost.evil.example",
        "https://127.0.0.1.nip.io",
        "https://10.0.0.1",
        "not a url",
    ] {
        assert!(!is_loopback_url(url), "{url}");
    }
}
