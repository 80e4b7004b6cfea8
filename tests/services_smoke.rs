//! Smoke test of the real test services (`scripts/services.sh`): each server
//! the real-server tests rely on is up at the address the env file names,
//! and the credentials in it work. When one of these fails, the vault and
//! target tests against that server would fail too, but this says why first.
//!
//! REAL SERVERS: needs `bash scripts/services.sh start` and its env file
//! sourced (`bash scripts/test.sh` does both). A missing variable fails the
//! test; it never skips.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::Duration;

const START_HINT: &str =
    "start the test services: `bash scripts/services.sh start` (or run `bash scripts/test.sh`)";

fn required(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("{name} is not set; {START_HINT}"))
}

/// `http://127.0.0.1:PORT` -> `127.0.0.1:PORT`.
fn authority(url: &str, name: &str) -> String {
    url.strip_prefix("http://")
        .unwrap_or_else(|| panic!("{name}={url:?} is not an http:// URL"))
        .trim_end_matches('/')
        .to_owned()
}

/// A plain HTTP/1.0 GET over a `TcpStream` (no client crate needed);
/// returns the status code and the whole response.
fn http_get(authority: &str, path: &str, headers: &[(&str, &str)]) -> (u16, String) {
    let mut stream = TcpStream::connect(authority)
        .unwrap_or_else(|e| panic!("connect to {authority}: {e}; {START_HINT}"));
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream
        .set_write_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut request = format!("GET {path} HTTP/1.0\r\nHost: {authority}\r\n");
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes()).unwrap();
    // HTTP/1.0: the server closes the connection after the response.
    let mut response = Vec::new();
    stream
        .read_to_end(&mut response)
        .unwrap_or_else(|e| panic!("read the answer of {authority}{path}: {e}"));
    let response = String::from_utf8_lossy(&response).into_owned();
    let status = response
        .strip_prefix("HTTP/1.")
        .and_then(|rest| rest.get(2..5))
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("{authority}{path} did not answer HTTP: {response:?}"));
    (status, response)
}

#[test]
fn openbao_answers_and_the_root_token_works() {
    let addr = authority(&required("KEYTURN_TEST_BAO_ADDR"), "KEYTURN_TEST_BAO_ADDR");
    let token = required("KEYTURN_TEST_BAO_TOKEN");

    let (status, body) = http_get(&addr, "/v1/sys/health", &[]);
    assert_eq!(status, 200, "bao health: {body}");
    assert!(body.contains("\"sealed\":false"), "bao is sealed: {body}");

    let (status, body) = http_get(
        &addr,
        "/v1/auth/token/lookup-self",
        &[("X-Vault-Token", &token)],
    );
    assert_eq!(
        status, 200,
        "KEYTURN_TEST_BAO_TOKEN is not a valid token: {body}"
    );
    assert!(
        body.contains("\"root\""),
        "KEYTURN_TEST_BAO_TOKEN is not a root token"
    );

    let (status, _) = http_get(
        &addr,
        "/v1/auth/token/lookup-self",
        &[("X-Vault-Token", "not-the-token")],
    );
    assert_eq!(status, 403, "bao accepted a wrong token");
}

#[test]
fn moto_answers_http() {
    let endpoint = required("KEYTURN_TEST_AWS_ENDPOINT");
    for name in ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION"] {
        required(name);
    }
    let addr = authority(&endpoint, "KEYTURN_TEST_AWS_ENDPOINT");
    let (status, response) = http_get(&addr, "/", &[]);
    assert!(
        (200..500).contains(&status),
        "moto at {endpoint} answered {status}: {response}"
    );
}

#[tokio::test]
async fn postgres_accepts_the_admin_dsn_and_refuses_a_wrong_password() {
    let host = required("KEYTURN_TEST_PG_HOST");
    let port = required("KEYTURN_TEST_PG_PORT");
    let dsn = required("KEYTURN_TEST_PG_ADMIN_DSN");
    assert!(
        dsn.contains(&format!("host={host}")) && dsn.contains(&format!("port={port}")),
        "KEYTURN_TEST_PG_ADMIN_DSN does not point at KEYTURN_TEST_PG_HOST:KEYTURN_TEST_PG_PORT"
    );

    let (client, connection) = tokio_postgres::connect(&dsn, tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("connect with KEYTURN_TEST_PG_ADMIN_DSN: {e}; {START_HINT}"));
    let driver = tokio::spawn(connection);
    let row = client
        .query_one("SELECT 1::int4, current_setting('max_connections')", &[])
        .await
        .unwrap();
    assert_eq!(row.get::<_, i32>(0), 1);
    // The real-server tests run in parallel and each opens connections.
    assert_eq!(row.get::<_, String>(1), "200");
    let is_superuser: bool = client
        .query_one(
            "SELECT rolsuper FROM pg_roles WHERE rolname = current_user",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(is_superuser, "the admin DSN must be a superuser");
    drop(client);
    driver.await.unwrap().unwrap();

    // Password auth is really on: the postgres targets' tests rely on a
    // wrong password being refused.
    let wrong = format!("host={host} port={port} user=postgres password=wrong dbname=postgres");
    let err = tokio_postgres::connect(&wrong, tokio_postgres::NoTls)
        .await
        .err()
        .expect("postgres accepted a wrong password");
    assert_eq!(
        err.code(),
        Some(&tokio_postgres::error::SqlState::INVALID_PASSWORD),
        "unexpected error: {err:?}"
    );
}

#[tokio::test]
async fn azure_stub_serves_tls_with_its_ca() {
    let stub = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/stubs/azure_keyvault_stub.py");
    assert!(stub.exists(), "{} is missing", stub.display());
    let url = required("KEYTURN_TEST_AZURE_URL");
    let ca = required("KEYTURN_TEST_AZURE_CA");
    assert!(
        url.starts_with("https://"),
        "KEYTURN_TEST_AZURE_URL={url:?} is not https"
    );

    // Trusting the stub's CA works, and nothing else would: a client without
    // it must refuse the certificate, or this test would prove nothing.
    let (status, _) = https_get(&format!("{url}/healthz"), Some(&ca))
        .await
        .unwrap_or_else(|e| {
            panic!("GET {url}/healthz over TLS trusting KEYTURN_TEST_AZURE_CA={ca}: {e}")
        });
    assert_eq!(status, 200);
    let untrusted = https_get(&format!("{url}/healthz"), None).await;
    assert!(
        untrusted.is_err(),
        "the stub's certificate was accepted without its CA"
    );
}

/// GET over TLS, verifying the server against `ca` only (plus the system
/// roots, which never hold the stub's CA). vaultrs's reqwest client is the one
/// TLS client among our direct dependencies that takes a CA file; it is used
/// here for a plain HTTPS GET, not for anything Vault.
async fn https_get(url: &str, ca: Option<&str>) -> Result<(u16, String), String> {
    let settings = vaultrs::client::VaultClientSettingsBuilder::default()
        .address(url)
        .ca_certs(ca.map(str::to_owned).into_iter().collect())
        .verify(true)
        .build()
        .map_err(|e| e.to_string())?;
    let client = vaultrs::client::VaultClient::new(settings).map_err(|e| e.to_string())?;
    let response = client
        .http
        .http
        .get(url)
        .send()
        .await
        .map_err(|e| format!("{e:?}"))?;
    let status = response.status().as_u16();
    Ok((status, response.text().await.map_err(|e| e.to_string())?))
}

#[test]
fn alertmanager_answers_alone_without_gossip() {
    let url = required("KEYTURN_TEST_ALERTMANAGER_URL");
    let addr = authority(&url, "KEYTURN_TEST_ALERTMANAGER_URL");
    let (status, _) = http_get(&addr, "/-/ready", &[]);
    assert_eq!(status, 200, "Alertmanager is not ready");
    let (status, body) = http_get(&addr, "/api/v2/status", &[]);
    assert_eq!(status, 200);
    assert!(
        body.contains(r#""cluster":{"peers":[],"status":"disabled"}"#),
        "Alertmanager runs with gossip: {body}"
    );
}
