//! End-to-end tests of the real `keyturn` binary against REAL servers:
//! OpenBao (`vault`), moto (`aws_secrets_manager`), the Key Vault contract stub
//! (`azure_key_vault`, logging in with a client secret at the stub's Entra ID
//! endpoint), PostgreSQL (`postgres` target) and a shell hook (`command`).
//!
//! Every check reads the server itself, twice: through keyturn's own vault
//! type (`HashicorpVault`, `AwsVault`, `AzureVault`) and through the server's
//! plain read API (KV v2 over HTTP, the AWS SDK's `GetSecretValue` by stage,
//! the Azure SDK's "get latest"), and compares with the delivered file.
//!
//! REAL SERVERS: needs `bash scripts/services.sh start` and its env file
//! sourced (`bash scripts/test.sh` does both). A missing variable fails the
//! test; it never skips. Tests share the servers, so every secret path and
//! role name carries a random suffix.

mod common;

use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use keyturn::model::{SecretValue, Stage};
use keyturn::vaults::azure::{AzureConfig, AzureVault, secret_name};
use keyturn::vaults::hashicorp::{HashicorpAuth, HashicorpConfig, HashicorpVault};
use keyturn::vaults::{Select, Vault, VaultItem};

const AGENT: &str = "bot";

/// Lowercase letters and digits: valid in a KV path, a Secrets Manager name,
/// a Key Vault name (after encoding) and an unquoted PostgreSQL role name.
fn unique(prefix: &str) -> String {
    format!("{prefix}{:016x}", rand::random::<u64>())
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// A port nothing listens on (bound, then released).
fn closed_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// Files the config points at (tokens, DSNs, hooks), outside the daemon's
/// state so the canary scan of the state does not find them there.
struct Files(tempfile::TempDir);

impl Files {
    fn new() -> Self {
        Files(tempfile::tempdir().unwrap())
    }
    fn write(&self, name: &str, content: &str, mode: u32) -> PathBuf {
        let p = self.0.path().join(name);
        std::fs::write(&p, content).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        p
    }
    fn path(&self, name: &str) -> PathBuf {
        self.0.path().join(name)
    }
}

// --- config snippets ---------------------------------------------------------

fn bao_table(name: &str, address: &str, token_file: &Path) -> String {
    format!(
        r#"
[vaults.{name}]
type = "vault"
address = "{address}"
mount = "secret"
token_file = "{}"
timeout = "5s"
"#,
        token_file.display()
    )
}

/// The `bao` vault table for the test OpenBao, its token in a 0600 file.
fn bao_vault_table(files: &Files) -> String {
    let token = files.write("bao-token", &need("KEYTURN_TEST_BAO_TOKEN"), 0o600);
    bao_table("bao", &need("KEYTURN_TEST_BAO_ADDR"), &token)
}

fn aws_table(name: &str) -> String {
    format!(
        r#"
[vaults.{name}]
type = "aws_secrets_manager"
endpoint_url = "{}"
region = "us-east-1"
timeout = "5s"
"#,
        need("KEYTURN_TEST_AWS_ENDPOINT")
    )
}

/// One credential of [`AGENT`] with a json delivery at `{root}/bot/<cred>.json`.
fn credential(cred: &str, vaults: &str, path: &str, grace: &str, extra: &str) -> String {
    format!(
        r#"
[agents.{AGENT}.credentials.{cred}]
vault = {vaults}
path = "{path}"
generate = {{ kind = "password", length = 32 }}
every = "1h"
grace = "{grace}"
deliver = [{{ type = "file", path = "{{root}}/{AGENT}/{cred}.json", format = "json" }}]
{extra}
"#
    )
}

// --- the daemon and what it delivered ------------------------------------------

fn row(env: &Env, cred: &str) -> serde_json::Value {
    status_json(env)
        .into_iter()
        .find(|r| r["agent"] == AGENT && r["credential"] == cred)
        .unwrap_or_else(|| panic!("no status row for {AGENT}/{cred}"))
}

fn wait_version(env: &Env, cred: &str, v: u64) {
    wait_for(Duration::from_secs(60), || {
        (row(env, cred)["version"].as_u64() >= Some(v)).then_some(())
    })
    .unwrap_or_else(|| {
        panic!(
            "{AGENT}/{cred} never reached version {v}: {:?}",
            row(env, cred)
        )
    });
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn rotate(env: &Env, cred: &str) -> Output {
    env.cli(&["rotate", &format!("{AGENT}/{cred}"), "--wait"])
}

fn rotate_ok(env: &Env, cred: &str, version: u64) -> Output {
    let out = rotate(env, cred);
    assert!(out.status.success(), "rotate {cred}: {}", text(&out));
    assert!(
        text(&out).contains(&format!("rotated to version {version}")),
        "{}",
        text(&out)
    );
    out
}

/// The json delivery: (value, version, username).
#[derive(Debug, Clone, PartialEq)]
struct Delivered {
    value: String,
    version: u64,
    username: Option<String>,
}

fn delivered(env: &Env, cred: &str) -> Delivered {
    let p = env.root().join(AGENT).join(format!("{cred}.json"));
    let doc: serde_json::Value = serde_json::from_slice(
        &std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display())),
    )
    .unwrap();
    Delivered {
        value: doc["value"].as_str().expect("value").to_owned(),
        version: doc["version"].as_u64().expect("version"),
        username: doc["username"].as_str().map(str::to_owned),
    }
}

// --- reading the real servers ---------------------------------------------------

/// What keyturn's own vault type reads for `stage` (`None`: no such version).
async fn read_stage(v: &dyn Vault, cred: &str, path: &str, stage: Stage) -> Option<String> {
    let k = bot_key(cred);
    let item = VaultItem { key: &k, path };
    v.read(item, Select::Stage(stage))
        .await
        .unwrap_or_else(|e| panic!("{} read {stage:?} of {path}: {}", v.describe(), e.message))
        .map(|s| s.value.expose_str().expect("utf-8").to_owned())
}

/// What keyturn's own vault code reads of `db` at `path`: `current` and
/// `previous` in their stages, nothing pending.
async fn assert_stages(v: &dyn Vault, path: &str, current: &str, previous: &str) {
    let name = v.describe();
    assert_eq!(
        read_stage(v, "db", path, Stage::Current).await.as_deref(),
        Some(current),
        "{name} current"
    );
    assert_eq!(
        read_stage(v, "db", path, Stage::Previous).await.as_deref(),
        Some(previous),
        "{name} previous"
    );
    assert_eq!(
        read_stage(v, "db", path, Stage::Pending).await,
        None,
        "{name} pending"
    );
}

async fn bao_vault() -> HashicorpVault {
    HashicorpVault::with_auth(
        "bao-reader",
        &HashicorpConfig {
            timeout: Some("10s".into()),
            ..HashicorpConfig::new(need("KEYTURN_TEST_BAO_ADDR"))
        },
        HashicorpAuth::Token(SecretValue::from_string(need("KEYTURN_TEST_BAO_TOKEN"))),
    )
    .await
    .unwrap()
}

async fn azure_vault(secret_file: &Path) -> AzureVault {
    let url = need("KEYTURN_TEST_AZURE_URL");
    AzureVault::connect(
        "kv-reader",
        &AzureConfig {
            tenant_id: Some(TENANT.into()),
            client_id: Some(STUB_CLIENT_ID.into()),
            client_secret_file: Some(secret_file.to_owned()),
            ca_file: Some(need("KEYTURN_TEST_AZURE_CA").into()),
            verify_challenge_resource: Some(false),
            authority_host: Some(url.clone()),
            timeout: Some("10s".into()),
            ..AzureConfig::new(url, "client_secret")
        },
    )
    .await
    .unwrap()
}

fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

/// KV v2 over plain HTTP: `GET /v1/secret/data/<path>[?version=N]`.
/// Returns (value, version number); `None` on 404.
async fn bao_plain(path: &str, version: Option<u64>) -> Option<(String, u64)> {
    let mut url = format!("{}/v1/secret/data/{path}", need("KEYTURN_TEST_BAO_ADDR"));
    if let Some(v) = version {
        url.push_str(&format!("?version={v}"));
    }
    let rsp = http()
        .get(url)
        .header("X-Vault-Token", need("KEYTURN_TEST_BAO_TOKEN"))
        .send()
        .await
        .unwrap();
    if rsp.status() == 404 {
        return None;
    }
    assert!(
        rsp.status().is_success(),
        "bao GET {path}: {}",
        rsp.status()
    );
    let doc: serde_json::Value = serde_json::from_str(&rsp.text().await.unwrap()).unwrap();
    let value = doc["data"]["data"]["value"].as_str()?.to_owned();
    Some((value, doc["data"]["metadata"]["version"].as_u64().unwrap()))
}

/// `DELETE /v1/secret/metadata/<path>`: every version, out of band.
async fn bao_delete_all(path: &str) {
    let rsp = http()
        .delete(format!(
            "{}/v1/secret/metadata/{path}",
            need("KEYTURN_TEST_BAO_ADDR")
        ))
        .header("X-Vault-Token", need("KEYTURN_TEST_BAO_TOKEN"))
        .send()
        .await
        .unwrap();
    assert!(
        rsp.status().is_success(),
        "bao DELETE {path}: {}",
        rsp.status()
    );
}

/// The AWS SDK's `GetSecretValue` with an explicit stage.
async fn aws_plain(secret: &str, stage: &str) -> Option<String> {
    let conf = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .endpoint_url(need("KEYTURN_TEST_AWS_ENDPOINT"))
        .region(aws_sdk_secretsmanager::config::Region::new("us-east-1"))
        .load()
        .await;
    let client = aws_sdk_secretsmanager::Client::new(&conf);
    match client
        .get_secret_value()
        .secret_id(secret)
        .version_stage(stage)
        .send()
        .await
    {
        Ok(o) => o.secret_string().map(str::to_owned),
        Err(e) => {
            let e = e.into_service_error();
            assert!(
                e.is_resource_not_found_exception(),
                "aws GetSecretValue {secret} {stage}: {e:?}"
            );
            None
        }
    }
}

/// The Azure SDK's "get the latest version", as any reader of the vault does,
/// with a token from the stub's Entra ID endpoint.
async fn azure_plain_latest(path: &str) -> Option<String> {
    use azure_core::http::{ClientOptions, Transport};
    use azure_security_keyvault_secrets::{SecretClient, SecretClientOptions};
    let url = need("KEYTURN_TEST_AZURE_URL");
    let pem = std::fs::read(need("KEYTURN_TEST_AZURE_CA")).unwrap();
    let http = reqwest::Client::builder()
        .tls_certs_merge(reqwest::Certificate::from_pem_bundle(&pem).unwrap())
        .build()
        .unwrap();
    let transport = || Some(Transport::new(Arc::new(http.clone())));
    let mut cloud = azure_core::cloud::CustomConfiguration::default();
    cloud.authority_host = url.clone();
    let cred = azure_identity::ClientSecretCredential::new(
        TENANT,
        STUB_CLIENT_ID.into(),
        azure_core::credentials::Secret::new(STUB_CLIENT_SECRET.to_owned()),
        Some(azure_identity::ClientSecretCredentialOptions {
            client_options: ClientOptions {
                transport: transport(),
                cloud: Some(Arc::new(azure_core::cloud::CloudConfiguration::Custom(
                    cloud,
                ))),
                ..Default::default()
            },
        }),
    )
    .unwrap();
    let client = SecretClient::new(
        &url,
        cred,
        Some(SecretClientOptions {
            client_options: ClientOptions {
                transport: transport(),
                ..Default::default()
            },
            verify_challenge_resource: Some(false),
            ..Default::default()
        }),
    )
    .unwrap();
    match client.get_secret(&secret_name(path).unwrap(), None).await {
        Ok(r) => r.into_model().unwrap().value,
        Err(e) if e.http_status().map(u16::from) == Some(404) => None,
        Err(e) => panic!("azure get latest {path}: {e}"),
    }
}

// --- PostgreSQL -------------------------------------------------------------------

fn pg_admin_dsn() -> String {
    need("KEYTURN_TEST_PG_ADMIN_DSN")
}

/// The admin DSN's password, for the canary scan.
fn pg_admin_password() -> String {
    pg_admin_dsn()
        .split_whitespace()
        .find_map(|kv| kv.strip_prefix("password="))
        .expect("KEYTURN_TEST_PG_ADMIN_DSN has a password=")
        .to_owned()
}

async fn pg_admin(sql: &str) {
    let cfg: tokio_postgres::Config = pg_admin_dsn().parse().unwrap();
    let (client, conn) = cfg.connect(tokio_postgres::NoTls).await.unwrap();
    let conn = tokio::spawn(conn);
    client
        .batch_execute(sql)
        .await
        .unwrap_or_else(|e| panic!("admin `{sql}`: {e}"));
    drop(client);
    let _ = conn.await;
}

/// The password stored for `role` (`None`: no password, nothing logs in).
async fn pg_password_of(role: &str) -> Option<String> {
    let cfg: tokio_postgres::Config = pg_admin_dsn().parse().unwrap();
    let (client, conn) = cfg.connect(tokio_postgres::NoTls).await.unwrap();
    let conn = tokio::spawn(conn);
    let v: Option<String> = client
        .query_one(
            "SELECT rolpassword FROM pg_authid WHERE rolname = $1",
            &[&role],
        )
        .await
        .unwrap()
        .get(0);
    drop(client);
    let _ = conn.await;
    v
}

/// The SCRAM verifier stored for `role` (`SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`).
async fn pg_verifier(role: &str) -> String {
    let v = pg_password_of(role)
        .await
        .unwrap_or_else(|| panic!("{role}: no password"));
    assert!(
        v.starts_with("SCRAM-SHA-256$"),
        "{role}: not a SCRAM verifier"
    );
    v
}

/// The test server, logging in as `user` with `password`.
fn pg_user_config(user: &str, password: &str) -> tokio_postgres::Config {
    let mut cfg = tokio_postgres::Config::new();
    cfg.host(need("KEYTURN_TEST_PG_HOST"))
        .port(need("KEYTURN_TEST_PG_PORT").parse().unwrap())
        .user(user)
        .password(password)
        .dbname("postgres")
        .connect_timeout(Duration::from_secs(5));
    cfg
}

/// Logs in as `user` with `password` and runs a query. `Err` carries the
/// server's reason.
async fn pg_login(user: &str, password: &str) -> Result<(), String> {
    let (client, conn) = pg_user_config(user, password)
        .connect(tokio_postgres::NoTls)
        .await
        .map_err(|e| match e.as_db_error() {
            Some(db) => db.message().to_owned(),
            None => e.to_string(),
        })?;
    let conn = tokio::spawn(conn);
    let r = client
        .simple_query("SELECT 1")
        .await
        .map(|_| ())
        .map_err(|e| e.to_string());
    drop(client);
    let _ = conn.await;
    r
}

/// Asserts `user`/`password` is refused *because of the password* (a refused
/// connection or a missing role would be a broken test, not a retired value).
async fn assert_login_refused(user: &str, password: &str) {
    let e = pg_login(user, password)
        .await
        .expect_err("the login must be refused");
    assert!(
        e.contains("password authentication failed"),
        "{user}: refused for another reason: {e}"
    );
}

/// A new login role at the test server, `prefix` and a unique suffix; its
/// password is [`initial_password`] until keyturn rotates it.
fn pg_new_role(prefix: &str) -> String {
    let role = unique(prefix);
    rt().block_on(pg_admin(&format!(
        "CREATE ROLE {role} LOGIN PASSWORD '{}'",
        initial_password(&role)
    )));
    role
}

fn initial_password(role: &str) -> String {
    format!("set-by-the-test-{role}")
}

/// An Env with one credential, `db` in the local vault, whose target is
/// `role` at the test server, rotated with `strategy`.
fn pg_local_env(files: &Files, role: &str, strategy: &str, grace: &str) -> Env {
    pg_local_env_with(files, role, strategy, grace, "")
}

/// [`pg_local_env`] with `extra` target settings (`, key = value` pairs).
fn pg_local_env_with(files: &Files, role: &str, strategy: &str, grace: &str, extra: &str) -> Env {
    Env::new(&format!(
        "{}{}",
        agent_table(AGENT),
        credential(
            "db",
            r#""local""#,
            &unique("e2e/pg/"),
            grace,
            &pg_target_with(files, role, strategy, &pg_admin_dsn(), extra),
        )
    ))
}

/// A postgres target on `role` with the admin DSN in a 0600 file.
fn pg_target(files: &Files, role: &str, strategy: &str, dsn: &str) -> String {
    pg_target_with(files, role, strategy, dsn, "")
}

/// [`pg_target`] with `extra` settings (`, key = value` pairs).
fn pg_target_with(files: &Files, role: &str, strategy: &str, dsn: &str, extra: &str) -> String {
    let dsn_file = files.write(&format!("{role}.dsn"), dsn, 0o600);
    format!(
        r#"target = {{ type = "postgres", admin_dsn_file = "{}", role = "{role}", strategy = "{strategy}", connect_timeout = "3s"{extra} }}"#,
        dsn_file.display()
    )
}

// --- canary scan ------------------------------------------------------------------

/// Forms in which a value could leak into text: itself, JSON-escaped, and
/// Debug-escaped (a password may hold `"` or `\`).
fn forms(v: &str) -> Vec<String> {
    let json = serde_json::to_string(v).unwrap();
    let debug = format!("{v:?}");
    let mut out = vec![
        v.to_owned(),
        json[1..json.len() - 1].to_owned(),
        debug[1..debug.len() - 1].to_owned(),
    ];
    out.dedup();
    out
}

/// Fails if any of `secrets` occurs in any of `places` (name, bytes).
fn assert_nowhere(secrets: &[(&str, String)], places: &[(String, Vec<u8>)]) {
    for (what, s) in secrets {
        assert!(s.len() >= 8, "{what} is too short to grep for");
        for f in forms(s) {
            for (name, hay) in places {
                assert!(!contains(hay, f.as_bytes()), "{what} appears in {name}");
            }
        }
    }
}

// --- 1. one full cycle per vault type -----------------------------------------------

/// Starts a daemon on one credential `db` in `vaults`, lets it do the initial
/// rotation, runs `rotate --wait`, and returns (env, daemon, v1, v2).
fn two_versions(
    vault_tables: &str,
    vaults: &str,
    path: &str,
) -> (Env, Daemon, Delivered, Delivered) {
    let env = Env::new(&format!(
        "{vault_tables}\n{}{}",
        agent_table(AGENT),
        credential("db", vaults, path, "1h", "")
    ));
    let daemon = env.start();
    wait_version(&env, "db", 1);
    let v1 = delivered(&env, "db");
    assert_eq!(v1.version, 1);
    rotate_ok(&env, "db", 2);
    let v2 = delivered(&env, "db");
    assert_eq!(v2.version, 2);
    assert_ne!(v1.value, v2.value, "rotate must deliver a new value");
    (env, daemon, v1, v2)
}

#[test]
fn openbao_full_cycle_is_current_and_previous_on_the_server() {
    let files = Files::new();
    let path = unique("e2e/bao/");
    let (_env, daemon, v1, v2) = two_versions(&bao_vault_table(&files), r#""bao""#, &path);
    rt().block_on(async {
        let v = bao_vault().await;
        assert_stages(&v, &path, &v2.value, &v1.value).await;

        // What any reader of the KV mount sees: the latest KV version is the
        // delivered value, the one before it the previous value.
        let (latest, n) = bao_plain(&path, None).await.expect("the secret exists");
        assert_eq!(latest, v2.value);
        let (before, _) = bao_plain(&path, Some(n - 1)).await.expect("version n-1");
        assert_eq!(before, v1.value);
        // The pending slot is cleaned up after promote.
        assert_eq!(
            bao_plain(&format!("keyturn-pending/{path}"), None).await,
            None
        );
    });
    daemon.stop();
}

/// Black-box finding: a credential's first rotation over a path that
/// already held someone else's secret overwrote it without a word. It is
/// said now (a warning, `vault.current_gone`), and the other secret is
/// the version before in the KV history; a second rotation says nothing.
#[test]
fn a_first_rotation_over_a_secret_keyturn_did_not_write_says_so() {
    let files = Files::new();
    let path = unique("e2e/bao-foreign/");
    rt().block_on(async {
        let mut data = std::collections::HashMap::new();
        data.insert("value", "CANARY-FOREIGN-1");
        vaultrs::kv2::set(&bao_client(), "secret", &path, &data)
            .await
            .unwrap();
    });
    let (env, daemon, _, _) = two_versions(&bao_vault_table(&files), r#""bao""#, &path);
    let log = daemon.stop();
    let said: Vec<_> = audit_records(&env)
        .into_iter()
        .filter(|r| r["event"] == "vault.current_gone")
        .collect();
    assert_eq!(said.len(), 1, "{said:?}");
    assert_eq!(said[0]["version"], 1, "{said:?}");
    assert!(
        said[0]["error"]
            .as_str()
            .is_some_and(|e| e.contains("did not write") && e.contains("kv-1")),
        "{said:?}"
    );
    assert!(
        log.contains("held a current version keyturn did not write"),
        "{log}"
    );
    assert!(!log.contains("CANARY-FOREIGN-1"));
}

/// Black-box finding: a previous version someone had deleted (KV `delete`,
/// undone by `undelete`) was reported retired while its value stayed
/// recoverable. The retire destroys it.
#[test]
fn a_deleted_previous_version_is_destroyed_when_it_is_retired() {
    let files = Files::new();
    let path = unique("e2e/bao-deleted-prev/");
    let (env, daemon, _, _) = two_versions(&bao_vault_table(&files), r#""bao""#, &path);
    let client = bao_client();
    rt().block_on(async {
        let meta = vaultrs::kv2::read_metadata(&client, "secret", &path)
            .await
            .unwrap();
        let previous = meta.current_version - 1;
        vaultrs::kv2::delete_versions(&client, "secret", &path, vec![previous])
            .await
            .unwrap();
    });
    rotate_ok(&env, "db", 3);
    daemon.stop();
    rt().block_on(async {
        let meta = vaultrs::kv2::read_metadata(&client, "secret", &path)
            .await
            .unwrap();
        let previous = (meta.current_version - 2).to_string();
        let v = &meta.versions[&previous];
        assert!(v.destroyed, "version {previous}: {meta:?}");
    });
}

#[test]
fn aws_full_cycle_is_awscurrent_and_awsprevious_on_the_server() {
    let path = unique("e2e/aws/");
    let (_env, daemon, v1, v2) = two_versions(&aws_table("aws"), r#""aws""#, &path);
    rt().block_on(async {
        let v = aws_vault().await;
        assert_stages(&v, &path, &v2.value, &v1.value).await;

        assert_eq!(aws_plain(&path, "AWSCURRENT").await, Some(v2.value.clone()));
        assert_eq!(
            aws_plain(&path, "AWSPREVIOUS").await,
            Some(v1.value.clone())
        );
        assert_eq!(aws_plain(&path, "AWSPENDING").await, None);
    });
    daemon.stop();
}

#[test]
fn azure_full_cycle_through_client_secret_login_is_latest_on_the_server() {
    let files = Files::new();
    let secret = files.write("azure-client-secret", STUB_CLIENT_SECRET, 0o600);
    let path = unique("e2e/azure/");
    let (_env, daemon, v1, v2) = two_versions(&azure_stub_table("kv", &secret), r#""kv""#, &path);
    rt().block_on(async {
        let v = azure_vault(&secret).await;
        assert_stages(&v, &path, &v2.value, &v1.value).await;
        // A plain reader gets the latest version: the delivered value.
        assert_eq!(azure_plain_latest(&path).await, Some(v2.value.clone()));
    });
    daemon.stop();
}

// --- 2. one credential in three vaults ------------------------------------------------

#[test]
fn three_vaults_agree_on_current_and_previous_after_two_rotations() {
    let files = Files::new();
    let secret = files.write("azure-client-secret", STUB_CLIENT_SECRET, 0o600);
    let path = unique("e2e/multi/");
    let tables = format!(
        "{}{}{}",
        bao_vault_table(&files),
        aws_table("aws"),
        azure_stub_table("kv", &secret)
    );
    let (env, daemon, _v1, v2) = two_versions(&tables, r#"["bao", "aws", "kv"]"#, &path);
    rotate_ok(&env, "db", 3);
    let v3 = delivered(&env, "db");
    assert_eq!(v3.version, 3);
    assert_ne!(v3.value, v2.value);
    rt().block_on(async {
        let bao = bao_vault().await;
        let aws = aws_vault().await;
        let kv = azure_vault(&secret).await;
        for v in [&bao as &dyn Vault, &aws, &kv] {
            assert_stages(v, &path, &v3.value, &v2.value).await;
        }
        let (latest, n) = bao_plain(&path, None).await.unwrap();
        assert_eq!(latest, v3.value);
        assert_eq!(bao_plain(&path, Some(n - 1)).await.unwrap().0, v2.value);
        assert_eq!(aws_plain(&path, "AWSCURRENT").await, Some(v3.value.clone()));
        assert_eq!(
            aws_plain(&path, "AWSPREVIOUS").await,
            Some(v2.value.clone())
        );
        assert_eq!(azure_plain_latest(&path).await, Some(v3.value.clone()));
    });
    daemon.stop();
}

// --- 3. PostgreSQL target --------------------------------------------------------------

/// Polls until `user`/`password` is refused; returns how long that took.
/// Panics if it still logs in at the deadline.
async fn wait_refused(user: &str, password: &str, deadline: Duration) -> Duration {
    let start = Instant::now();
    loop {
        match pg_login(user, password).await {
            Ok(()) if start.elapsed() < deadline => {
                tokio::time::sleep(Duration::from_millis(200)).await
            }
            Ok(()) => panic!("{user}: the previous value still logs in after {deadline:?}"),
            Err(e) => {
                assert!(
                    e.contains("password authentication failed"),
                    "{user}: refused for another reason: {e}"
                );
                return start.elapsed();
            }
        }
    }
}

/// Black-box finding: a rotation begun under `alternating_users` (parked:
/// a foreign `<role>_clone` in the way), the config then changed to
/// `single_user` on the same role and the rotation finished there; at the
/// end of the grace period the retire of version 1 cleared the role's
/// password, which was version 2's by then: the delivered value stopped
/// working while `status` said all was well.
#[test]
fn a_strategy_changed_mid_rotation_never_retires_the_role_holding_the_current_value() {
    let files = Files::new();
    let role = pg_new_role("kt_strat_");
    let clone = format!("{role}_clone");
    let rt = rt();
    rt.block_on(pg_admin(&format!("CREATE ROLE {clone} LOGIN")));
    let env = pg_local_env(&files, &role, "alternating_users", "3s");
    let daemon = env.start();
    wait_version(&env, "db", 1);
    let out = rotate(&env, "db");
    assert!(
        !out.status.success(),
        "the foreign clone refuses: {}",
        text(&out)
    );
    let config = std::fs::read_to_string(&env.config).unwrap();
    let single = config.replace(
        "strategy = \"alternating_users\"",
        "strategy = \"single_user\"",
    );
    assert_ne!(single, config);
    std::fs::write(&env.config, single).unwrap();
    daemon.reload();
    // The parked rotation goes on under the new config: version 2 is set on
    // the role itself.
    wait_version(&env, "db", 2);
    let current = delivered(&env, "db");
    assert_eq!(current.username.as_deref(), Some(role.as_str()));
    // Past the grace period, with version 1 retired: version 2 still logs in.
    let retired = wait_for(Duration::from_secs(20), || {
        audit_records(&env)
            .into_iter()
            .find(|r| r["event"] == "rotation.retire" && r["version"] == 2 && r["outcome"] == "ok")
    });
    assert!(retired.is_some(), "{}", daemon.log_text());
    rt.block_on(async {
        pg_login(&role, &current.value)
            .await
            .unwrap_or_else(|e| panic!("version 2 no longer logs in: {e}"));
    });
    daemon.stop();
    rt.block_on(pg_admin(&format!("DROP ROLE IF EXISTS {clone}")));
}

#[test]
fn postgres_alternating_users_previous_logs_in_until_grace_ends() {
    const GRACE: Duration = Duration::from_secs(5);
    let files = Files::new();
    let role = pg_new_role("kt_alt_");
    let clone = format!("{role}_clone");
    let env = pg_local_env(&files, &role, "alternating_users", "5s");
    let daemon = env.start();
    wait_version(&env, "db", 1);
    let mut prev = delivered(&env, "db");
    assert_eq!(
        prev.username.as_deref(),
        Some(role.as_str()),
        "odd versions are the role"
    );
    let rt = rt();
    rt.block_on(async {
        pg_login(&role, &prev.value).await.expect("v1 logs in");
        assert_login_refused(&role, &initial_password(&role)).await;
    });
    for version in [2, 3] {
        rotate_ok(&env, "db", version);
        let rotated = Instant::now();
        let new = delivered(&env, "db");
        assert_eq!(new.version, version);
        let expect_user = if version % 2 == 0 { &clone } else { &role };
        assert_eq!(new.username.as_ref(), Some(expect_user));
        let prev_user = prev.username.clone().unwrap();
        rt.block_on(async {
            pg_login(expect_user, &new.value)
                .await
                .unwrap_or_else(|e| panic!("v{version} must log in: {e}"));
            // Within the grace period both values work: agents that have not
            // re-read the file yet keep working.
            pg_login(&prev_user, &prev.value)
                .await
                .unwrap_or_else(|e| panic!("v{} must still log in during grace: {e}", version - 1));
            let took = wait_refused(&prev_user, &prev.value, Duration::from_secs(40)).await;
            // Not retired early: refused only once the grace period is over
            // (it started at promote, shortly before `rotate --wait` returned).
            assert!(
                rotated.elapsed() >= GRACE - Duration::from_secs(1),
                "v{} was refused after {took:?}, before the {GRACE:?} grace ended",
                version - 1
            );
            pg_login(expect_user, &new.value)
                .await
                .unwrap_or_else(|e| panic!("v{version} must still log in after retire: {e}"));
        });
        prev = new;
    }
    daemon.stop();
    rt.block_on(pg_admin(&format!("DROP ROLE {clone}; DROP ROLE {role}")));
}

/// Defect: a rotation abandoned after its value was set at the target (its
/// pending copy deleted out of band while promote kept failing) left that
/// value logging in, held by no vault and no agent; and the fresh rotation
/// took the next version number, whose `alternating_users` role held the
/// current value: the agents' password stopped working at once, with no
/// grace. The abandoned value is retired when the rotation is abandoned,
/// and the fresh version takes the role the current one is not on.
#[test]
fn an_abandoned_rotation_ends_its_own_value_and_never_the_current_one() {
    let files = Files::new();
    let role = pg_new_role("kt_abandon_");
    let clone = format!("{role}_clone");
    let proxy =
        common::proxy::Proxy::start(&need("KEYTURN_TEST_BAO_ADDR"), common::proxy::Flavor::Bao);
    let token = files.write("bao-token", &need("KEYTURN_TEST_BAO_TOKEN"), 0o600);
    let path = unique("e2e/abandon/");
    let env = Env::new(&format!(
        "{}{}{}",
        bao_table("bao", &proxy.url(), &token),
        agent_table(AGENT),
        credential(
            "db",
            r#""bao""#,
            &path,
            "1h",
            &pg_target(&files, &role, "alternating_users", &pg_admin_dsn()),
        )
    ));
    let daemon = env.start();
    wait_version(&env, "db", 1);
    rotate_ok(&env, "db", 2);
    let current = delivered(&env, "db");
    assert_eq!(current.username.as_deref(), Some(clone.as_str()));

    // Version 3 is set on `role` and tested; promote cannot store it.
    let promote = common::proxy::Match::bao("POST", &format!("/v1/secret/data/{path}"));
    let refused = proxy.fail(promote, 500, usize::MAX, None);
    let out = env.cli(&["rotate", &format!("{AGENT}/db")]);
    assert!(out.status.success(), "{}", text(&out));
    wait_for(Duration::from_secs(30), || {
        let r = row(&env, "db");
        (r["state"] == "failed" && r["step"] == "promote").then_some(())
    })
    .unwrap_or_else(|| panic!("never parked at promote: {:?}", row(&env, "db")));
    assert!(proxy.hits(refused) >= 1);
    // Someone deletes the pending copy, the only one of version 3's value.
    rt().block_on(bao_delete_all(&format!("keyturn-pending/{path}")));
    assert!(
        rt().block_on(pg_password_of(&role)).is_some(),
        "version 3 was set on the role"
    );

    // The fresh rotation cannot even stage its value for now: what the
    // abandon did is seen on its own.
    proxy.clear();
    let pending =
        common::proxy::Match::bao("POST", &format!("/v1/secret/data/keyturn-pending/{path}"));
    let staged = proxy.fail(pending, 500, usize::MAX, None);
    wait_for(Duration::from_secs(60), || {
        (proxy.hits(staged) >= 1).then_some(())
    })
    .unwrap_or_else(|| panic!("no fresh rotation: {:?}", row(&env, "db")));
    let audit = std::fs::read_to_string(env.audit_log()).unwrap();
    assert!(audit.contains("\"rotation.abandoned\""), "{audit}");
    rt().block_on(async {
        // The current value works, within its own grace as ever.
        pg_login(&clone, &current.value)
            .await
            .unwrap_or_else(|e| panic!("the current value stopped working: {e}"));
        // `role` had version 3's value, which no vault and no agent holds:
        // its password is cleared.
        assert_eq!(pg_password_of(&role).await, None, "version 3 still logs in");
    });

    proxy.clear();
    wait_version(&env, "db", 4);
    let fresh = delivered(&env, "db");
    assert_eq!(
        (fresh.version, fresh.username.as_deref()),
        (5, Some(role.as_str())),
        "the fresh version takes the role the current one is not on"
    );
    rt().block_on(async {
        pg_login(&role, &fresh.value)
            .await
            .expect("the fresh value logs in");
        pg_login(&clone, &current.value)
            .await
            .unwrap_or_else(|e| panic!("version 2 ended without its grace: {e}"));
    });
    daemon.stop();
    rt().block_on(pg_admin(&format!("DROP ROLE {clone}; DROP ROLE {role}")));
}

#[test]
fn postgres_single_user_new_value_logs_in_and_old_does_not() {
    let files = Files::new();
    let role = pg_new_role("kt_one_");
    let env = pg_local_env(&files, &role, "single_user", "1h");
    let daemon = env.start();
    wait_version(&env, "db", 1);
    let v1 = delivered(&env, "db");
    assert_eq!(v1.username.as_deref(), Some(role.as_str()));
    rotate_ok(&env, "db", 2);
    let v2 = delivered(&env, "db");
    assert_eq!(v2.username.as_deref(), Some(role.as_str()));
    let rt = rt();
    rt.block_on(async {
        pg_login(&role, &v2.value).await.expect("v2 logs in");
        assert_login_refused(&role, &v1.value).await;
    });
    daemon.stop();
    rt.block_on(pg_admin(&format!("DROP ROLE {role}")));
}

/// tokio-postgres logs every statement it sends at debug level, and the
/// daemon bridges those records into its log: the SCRAM verifier that
/// `ALTER ROLE ... PASSWORD` carries must not be among them (with it and one
/// observed login, anyone can log in as the role).
#[test]
fn postgres_trace_log_holds_no_scram_verifier() {
    let files = Files::new();
    let role = pg_new_role("kt_verifier_");
    let env = pg_local_env(&files, &role, "single_user", "1h");
    let daemon = env.start(); // --log-level trace
    wait_version(&env, "db", 1);
    let rt = rt();
    let mut verifiers = vec![rt.block_on(pg_verifier(&role))];
    rotate_ok(&env, "db", 2);
    verifiers.push(rt.block_on(pg_verifier(&role)));
    assert_ne!(verifiers[0], verifiers[1]);
    let log = daemon.stop();
    assert!(
        log.contains("tokio_postgres") && log.contains("executing"),
        "the driver's own statement records are not in the log, the scan proves little"
    );
    for v in &verifiers {
        // The whole verifier, and each key alone (44 base64 characters).
        let keys = v.rsplit('$').next().unwrap();
        for part in std::iter::once(v.as_str()).chain(keys.split(':')) {
            assert!(
                !log.contains(part),
                "a SCRAM verifier part appears in the trace log"
            );
        }
    }
    rt.block_on(pg_admin(&format!("DROP ROLE {role}")));
}

/// A rotation over TLS with the server's certificate checked against the
/// test CA and its name (`sslmode = "verify-full"`). The role may log in over
/// TLS only (pg_hba `hostnossl ... reject`), so the `test` step, and the
/// agent's own logins below, prove the target really used TLS.
#[test]
fn postgres_rotates_over_tls_with_verify_full() {
    let files = Files::new();
    let role = pg_new_role("kt_tls_");
    rt().block_on(pg_admin(&format!("GRANT kt_hba_tls_only TO {role}")));
    let tls = format!(
        r#", sslmode = "verify-full", ssl_root_cert = "{}""#,
        need("KEYTURN_TEST_PG_CA")
    );
    let env = pg_local_env_with(&files, &role, "single_user", "1h", &tls);
    let daemon = env.start();
    wait_version(&env, "db", 1);
    rotate_ok(&env, "db", 2);
    let v2 = delivered(&env, "db");
    let e = rt()
        .block_on(pg_login(&role, &v2.value))
        .expect_err("the role logs in over TLS only");
    assert!(
        e.contains("no encryption"),
        "refused for another reason: {e}"
    );
    daemon.stop();
    rt().block_on(pg_admin(&format!("DROP ROLE {role}")));
}

// --- 4. command target ---------------------------------------------------------------------

/// A hook that logs "$KEYTURN_STEP $KEYTURN_VERSION sha256(stdin)" and, while
/// the marker file exists, fails `test` printing the secret to stderr.
const HOOK: &str = r#"#!/bin/sh
secret=$(cat)
hash=$(printf '%s' "$secret" | sha256sum | cut -c1-64)
printf '%s %s %s\n' "$KEYTURN_STEP" "${KEYTURN_VERSION:-}" "$hash" >> "$HOOK_LOG"
if [ "$KEYTURN_STEP" = test ] && [ -e "$HOOK_MARKER" ]; then
  printf 'partner API refused key %s\n' "$secret" >&2
  exit 1
fi
exit 0
"#;

fn sha256_hex(s: &str) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(s.as_bytes()))
}

struct Hook {
    target: String,
    log: PathBuf,
    marker: PathBuf,
}

fn hook(files: &Files) -> Hook {
    let program = files.write("hook.sh", HOOK, 0o755);
    let log = files.path("hook.log");
    let marker = files.path("hook.fail");
    let target = format!(
        r#"target = {{ type = "command", program = "{}", timeout = "10s", env = {{ HOOK_LOG = "{}", HOOK_MARKER = "{}" }} }}"#,
        program.display(),
        log.display(),
        marker.display()
    );
    Hook {
        target,
        log,
        marker,
    }
}

/// An Env with one credential, `api` in the `bao` vault at `path`, whose
/// target is the hook `h`; grace 0.
fn hook_env(files: &Files, h: &Hook, path: &str) -> Env {
    Env::new(&format!(
        "{}{}{}",
        bao_vault_table(files),
        agent_table(AGENT),
        credential("api", r#""bao""#, path, "0s", &h.target)
    ))
}

fn hook_log(h: &Hook) -> Vec<String> {
    std::fs::read_to_string(&h.log)
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

#[test]
fn command_hook_failure_is_redacted_and_a_retry_succeeds() {
    let files = Files::new();
    let h = hook(&files);
    let path = unique("e2e/hook/");
    let env = hook_env(&files, &h, &path);
    let daemon = env.start();
    wait_version(&env, "api", 1);
    let v1 = delivered(&env, "api");
    let log = hook_log(&h);
    let hash1 = sha256_hex(&v1.value);
    assert!(log.contains(&format!("set 1 {hash1}")), "{log:?}");
    assert!(log.contains(&format!("test 1 {hash1}")), "{log:?}");

    std::fs::write(&h.marker, "").unwrap();
    let failed = rotate(&env, "api");
    let out = text(&failed);
    assert!(!failed.status.success(), "{out}");
    // The value the hook rejected: staged in the vault's pending slot.
    let pending = rt()
        .block_on(bao_plain(&format!("keyturn-pending/{path}"), None))
        .expect("the rejected value is still pending")
        .0;
    assert_ne!(pending, v1.value);
    let r = row(&env, "api");
    let last_error = r["last_error"].as_str().expect("last_error").to_owned();
    assert_eq!(r["state"], "failed", "{r}");
    assert_eq!(r["step"], "test", "a parked rotation shows its step: {r}");
    // The hook's stderr is in the daemon's log, redacted; the error (state,
    // audit, status) says only how the hook ended.
    let daemon_log = daemon.log_text();
    assert!(
        daemon_log.contains("partner API refused key [REDACTED]"),
        "the hook's stderr is logged: {daemon_log}"
    );
    assert!(
        !daemon_log.contains(&pending),
        "the rejected value leaked into the log"
    );
    for e in [&out, &last_error] {
        assert!(
            e.contains("the hook exited with 1 (its stderr is in the daemon's log)"),
            "{e}"
        );
        assert!(
            !e.contains("partner API refused key"),
            "the hook's stderr is not in the error: {e}"
        );
        assert!(!e.contains(&pending), "the rejected value leaked: {e}");
        assert!(
            e.contains("step test: target command:"),
            "names the step and target: {e}"
        );
        assert!(e.contains("bot/api"), "names agent and credential: {e}");
        assert_eq!(
            e.matches("hook.sh").count(),
            1,
            "the target is named once: {e}"
        );
    }
    assert_eq!(
        delivered(&env, "api"),
        v1,
        "a failed rotation delivers nothing"
    );

    std::fs::remove_file(&h.marker).unwrap();
    let ok = rotate(&env, "api");
    assert!(ok.status.success(), "{}", text(&ok));
    let v2 = delivered(&env, "api");
    // The parked rotation resumed: the rejected value, now accepted.
    assert_eq!(v2.version, 2, "{}", text(&ok));
    assert_eq!(v2.value, pending);
    let log = hook_log(&h);
    let hash2 = sha256_hex(&v2.value);
    assert!(
        log.contains(&format!("set {} {hash2}", v2.version)),
        "{log:?}"
    );
    assert!(
        log.contains(&format!("test {} {hash2}", v2.version)),
        "{log:?}"
    );
    assert_eq!(
        log.iter().filter(|l| l.starts_with("test 2 ")).count(),
        2,
        "test ran once failing, once passing: {log:?}"
    );
    daemon.stop();
}

// --- 5. canary: no secret in any output ----------------------------------------------------

#[test]
fn no_delivered_value_nor_server_credential_appears_in_any_output() {
    let files = Files::new();
    let bao_token = need("KEYTURN_TEST_BAO_TOKEN");
    let token = files.write("bao-token", &bao_token, 0o600);
    let azure_secret = files.write("azure-client-secret", STUB_CLIENT_SECRET, 0o600);
    let h = hook(&files);
    let role = pg_new_role("kt_canary_");
    let clone = format!("{role}_clone");
    let api_path = unique("e2e/canary-api/");
    let env = Env::new(&format!(
        "{}{}{}\n{}{}{}",
        bao_table("bao", &need("KEYTURN_TEST_BAO_ADDR"), &token),
        aws_table("aws"),
        azure_stub_table("kv", &azure_secret),
        agent_table(AGENT),
        credential(
            "db",
            r#"["bao", "aws"]"#,
            &unique("e2e/canary-db/"),
            "2s",
            &pg_target(&files, &role, "alternating_users", &pg_admin_dsn()),
        ),
        credential("api", r#""kv""#, &api_path, "0s", &h.target),
    ));
    // `Env::spawn` runs the daemon with `--log-level trace`: every crate's
    // trace events (HTTP clients, SDKs, the PostgreSQL driver) are in the log.
    let daemon = env.start();
    let mut outputs: Vec<(String, Vec<u8>)> = Vec::new();
    let mut record = |name: &str, o: &Output| {
        outputs.push((format!("`{name}` stdout"), o.stdout.clone()));
        outputs.push((format!("`{name}` stderr"), o.stderr.clone()));
    };
    let mut values = Vec::new();
    wait_version(&env, "db", 1);
    wait_version(&env, "api", 1);
    values.push(("db v1", delivered(&env, "db").value));
    values.push(("api v1", delivered(&env, "api").value));

    record("rotate db", &rotate_ok(&env, "db", 2));
    values.push(("db v2", delivered(&env, "db").value));

    // A hook that prints the secret on stderr, and fails.
    std::fs::write(&h.marker, "").unwrap();
    let failed = rotate(&env, "api");
    assert!(!failed.status.success(), "{}", text(&failed));
    record("rotate api (failing hook)", &failed);
    let rejected = rt().block_on(async {
        let kv = azure_vault(&azure_secret).await;
        read_stage(&kv, "api", &api_path, Stage::Pending)
            .await
            .expect("the rejected value is pending")
    });
    values.push(("api rejected pending value", rejected));
    record("status --json (failed)", &env.cli(&["status", "--json"]));
    record("status (failed)", &env.cli(&["status"]));
    std::fs::remove_file(&h.marker).unwrap();
    record("rotate api", &rotate_ok(&env, "api", 2));
    values.push(("api v2", delivered(&env, "api").value));

    record("rotate db again", &rotate_ok(&env, "db", 3));
    values.push(("db v3", delivered(&env, "db").value));
    // Let the grace end so the retire step (a target call) is logged too.
    wait_for(Duration::from_secs(30), || {
        (row(&env, "db")["state"] == "idle").then_some(())
    })
    .unwrap_or_else(|| panic!("db never settled: {}", row(&env, "db")));
    record("status --json", &env.cli(&["status", "--json"]));
    record("audit verify", &env.cli(&["audit", "verify"]));
    let log = daemon.stop();
    assert!(
        log.contains("TRACE"),
        "the daemon did not log at trace level, the scan proves little"
    );

    let mut places = outputs;
    places.push(("the daemon log (trace)".into(), log.into_bytes()));
    places.push(("the hook's log".into(), std::fs::read(&h.log).unwrap()));
    for (p, bytes) in read_tree(&env.state_dir()) {
        // Includes audit.log and the state database.
        places.push((p.display().to_string(), bytes));
    }
    assert!(
        places.iter().any(|(p, _)| p.ends_with("audit.log")),
        "the audit log is scanned"
    );
    let mut secrets: Vec<(&str, String)> = values;
    secrets.push(("the OpenBao token", bao_token));
    secrets.push(("the PostgreSQL admin password", pg_admin_password()));
    secrets.push(("the Azure client secret", STUB_CLIENT_SECRET.to_owned()));
    assert_nowhere(&secrets, &places);

    rt().block_on(pg_admin(&format!("DROP ROLE {clone}; DROP ROLE {role}")));
}

// --- 6. bad input: clear errors naming agent, credential, vault/target and step ---------

/// `rotate --wait` fails; returns its output and the status row's last_error,
/// after checking both name the agent/credential and `needles`.
fn assert_rotation_fails(env: &Env, cred: &str, needles: &[&str]) -> (String, String) {
    let out = rotate(env, cred);
    let out_text = text(&out);
    assert!(!out.status.success(), "rotate must fail: {out_text}");
    let r = row(env, cred);
    assert_eq!(r["state"], "failed", "{r}");
    let last_error = r["last_error"].as_str().unwrap_or_default().to_owned();
    let who = format!("{AGENT}/{cred}");
    assert!(
        // `FAILED (version N): ` when the rotation had begun a version.
        out_text.contains(&format!("{who}: FAILED: {who}: step "))
            || (out_text.contains(&format!("{who}: FAILED (version "))
                && out_text.contains(&format!("): {who}: step "))),
        "{out_text}"
    );
    for n in needles {
        assert!(
            out_text.contains(n),
            "`rotate --wait` output lacks {n:?}: {out_text}"
        );
        assert!(
            last_error.contains(n),
            "status last_error lacks {n:?}: {last_error}"
        );
    }
    (out_text, last_error)
}

#[test]
fn bad_input_wrong_vault_address() {
    let files = Files::new();
    let token = files.write("bao-token", &need("KEYTURN_TEST_BAO_TOKEN"), 0o600);
    let addr = format!("http://127.0.0.1:{}", closed_port());
    let env = Env::new(&format!(
        "{}{}{}",
        bao_table("bao", &addr, &token),
        agent_table(AGENT),
        credential("db", r#""bao""#, &unique("e2e/bad/"), "0s", "")
    ));
    let daemon = env.start();
    assert_rotation_fails(&env, "db", &["step create", "vault \"bao\"", &addr[7..]]);
    daemon.stop();
}

#[test]
fn bad_input_bad_openbao_token() {
    let files = Files::new();
    let garbage = "hvs.not-a-token-4f1c9e2a7b";
    let token = files.write("bao-token", garbage, 0o600);
    let env = Env::new(&format!(
        "{}{}{}",
        bao_table("bao", &need("KEYTURN_TEST_BAO_ADDR"), &token),
        agent_table(AGENT),
        credential("db", r#""bao""#, &unique("e2e/bad/"), "0s", "")
    ));
    let daemon = env.start();
    let (out, last) = assert_rotation_fails(
        &env,
        "db",
        &["step create", "vault \"bao\"", "unauthorized"],
    );
    assert!(
        !out.contains(garbage) && !last.contains(garbage),
        "the token is never quoted"
    );
    daemon.stop();
}

/// The promoted secret deleted out of band (all its KV versions): the next
/// rotation makes the vault serve a working value again, and says loudly, in
/// the log and the audit, that the version it knew as current was gone.
#[test]
fn bad_input_current_secret_deleted_out_of_band() {
    let files = Files::new();
    let path = unique("e2e/gone/");
    let env = Env::new(&format!(
        "{}{}{}",
        bao_vault_table(&files),
        agent_table(AGENT),
        credential("db", r#""bao""#, &path, "1h", "")
    ));
    let daemon = env.start();
    wait_version(&env, "db", 1);
    rotate_ok(&env, "db", 2);
    rt().block_on(bao_delete_all(&path));
    rotate_ok(&env, "db", 3);
    let v3 = delivered(&env, "db");
    rt().block_on(async {
        let v = bao_vault().await;
        assert_eq!(
            read_stage(&v, "db", &path, Stage::Current).await,
            Some(v3.value.clone())
        );
        assert_eq!(read_stage(&v, "db", &path, Stage::Previous).await, None);
        assert_eq!(
            bao_plain(&path, None).await.map(|(v, _)| v),
            Some(v3.value.clone())
        );
    });
    let gone = "step promote: vault \"bao\": version 2 (";
    let audit = std::fs::read_to_string(env.audit_log()).unwrap();
    let record: serde_json::Value = audit
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .find(|r| r["event"] == "vault.current_gone")
        .unwrap_or_else(|| panic!("no vault.current_gone audit record: {audit}"));
    assert_eq!(record["agent"], AGENT);
    assert_eq!(record["credential"], "db");
    assert_eq!(record["detail"], "bao");
    let error = record["error"].as_str().unwrap();
    for needle in [
        gone,
        &format!(
            "of {path}, the current version before this rotation, is gone: it has no current version"
        ),
    ] {
        assert!(
            error.contains(needle),
            "audit error lacks {needle:?}: {error}"
        );
    }
    let log = daemon.stop();
    let line = log
        .lines()
        .find(|l| l.contains(gone))
        .unwrap_or_else(|| panic!("no warning in the daemon log: {log}"));
    for needle in ["WARN", "agent=bot", "credential=db", "vault=bao", "is gone"] {
        assert!(line.contains(needle), "log line lacks {needle:?}: {line}");
    }
}

/// The pending value deleted out of band while its rotation is parked (the
/// hook failed `test`): resuming cannot silently use another value; it fails
/// saying which version is gone from which vault.
#[test]
fn bad_input_pending_secret_deleted_out_of_band() {
    let files = Files::new();
    let h = hook(&files);
    let path = unique("e2e/gone-pending/");
    let env = hook_env(&files, &h, &path);
    let daemon = env.start();
    wait_version(&env, "api", 1);
    std::fs::write(&h.marker, "").unwrap();
    assert!(!rotate(&env, "api").status.success());
    let rotation = row(&env, "api")["rotation"]
        .as_str()
        .expect("parked rotation")
        .to_owned();
    rt().block_on(bao_delete_all(&format!("keyturn-pending/{path}")));
    std::fs::remove_file(&h.marker).unwrap();
    assert_rotation_fails(
        &env,
        "api",
        &[
            "step test",
            "vault \"bao\"",
            &format!("version {rotation} of {path} is gone from the vault"),
            "(not_found)",
        ],
    );
    daemon.stop();
}

#[test]
fn bad_input_target_dsn_cannot_connect() {
    let files = Files::new();
    let role = unique("kt_nodsn_");
    let dsn = format!(
        "host=127.0.0.1 port={} user=postgres password={} dbname=postgres",
        closed_port(),
        pg_admin_password()
    );
    let env = Env::new(&format!(
        "{}{}",
        agent_table(AGENT),
        credential(
            "db",
            r#""local""#,
            &unique("e2e/bad/"),
            "0s",
            &pg_target(&files, &role, "single_user", &dsn),
        )
    ));
    let daemon = env.start();
    let (out, last) = assert_rotation_fails(&env, "db", &["step set", "target postgres:"]);
    assert!(!out.contains(&pg_admin_password()) && !last.contains(&pg_admin_password()));
    daemon.stop();
}

/// Defect: every successful rotation on OpenBao logged ~8 ERROR lines at the
/// default level (the client libraries reporting the expected 404 of an
/// absent pending slot), which makes alerting on ERROR in the journal
/// useless. A successful rotation on any vault logs nothing at ERROR or WARN.
#[test]
fn successful_rotations_log_no_error_or_warning_at_the_default_level() {
    let files = Files::new();
    let secret = files.write("client-secret", STUB_CLIENT_SECRET, 0o600);
    let tables = format!(
        "{}{}{}",
        bao_vault_table(&files),
        aws_table("aws"),
        azure_stub_table("az", &secret)
    );
    let env = Env::new(&format!(
        "{tables}\n{}{}{}",
        agent_table(AGENT),
        credential("db", r#""bao""#, &unique("quiet/bao/"), "0s", ""),
        credential(
            "all",
            r#"["bao", "aws", "az"]"#,
            &unique("quiet/all/"),
            "0s",
            ""
        ),
    ));
    let daemon = env.start_with(&[("KEYTURN_LOG", "info")]);
    wait_version(&env, "db", 1);
    wait_version(&env, "all", 1);
    rotate_ok(&env, "db", 2);
    rotate_ok(&env, "all", 2);
    let log = daemon.stop();
    let loud: Vec<&str> = log
        .lines()
        .filter(|l| l.contains(" ERROR ") || l.contains(" WARN "))
        .collect();
    assert!(
        loud.is_empty(),
        "{} line(s) at ERROR/WARN:\n{}",
        loud.len(),
        loud.join("\n")
    );
    assert!(log.contains("rotated"), "the log is at info level:\n{log}");
}

// --- 4. decommission ---------------------------------------------------------------

/// An open session of `user`, kept until the returned client is dropped.
async fn pg_session(user: &str, password: &str) -> tokio_postgres::Client {
    let (client, conn) = pg_user_config(user, password)
        .connect(tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    client.simple_query("SELECT 1").await.unwrap();
    client
}

#[test]
fn decommission_revokes_and_verifies_every_vault_the_target_and_the_files() {
    let files = Files::new();
    let secret = files.write("azure-client-secret", STUB_CLIENT_SECRET, 0o600);
    let role = pg_new_role("kt_dec_");
    let clone = format!("{role}_clone");
    let (bao_path, aws_path, kv_path) =
        (unique("e2e/dec/"), unique("e2e/dec/"), unique("e2e/dec/"));
    let env = Env::new(&format!(
        "{}{}{}{}{}{}{}{}",
        bao_vault_table(&files),
        aws_table("aws"),
        azure_stub_table("kv", &secret),
        agent_table(AGENT),
        credential(
            "db",
            r#""local""#,
            &unique("e2e/dec/pg/"),
            "1h",
            &pg_target(&files, &role, "alternating_users", &pg_admin_dsn())
        ),
        credential("in-bao", r#""bao""#, &bao_path, "1h", ""),
        credential("in-aws", r#""aws""#, &aws_path, "1h", ""),
        credential("in-kv", r#""kv""#, &kv_path, "1h", ""),
    ));
    let daemon = env.start();
    for c in ["db", "in-bao", "in-aws", "in-kv"] {
        wait_version(&env, c, 1);
    }
    let v1 = delivered(&env, "db");
    rotate_ok(&env, "db", 2);
    let v2 = delivered(&env, "db");
    assert_eq!(v2.username.as_deref(), Some(clone.as_str()));
    let values: Vec<(String, String)> = ["in-bao", "in-aws", "in-kv"]
        .iter()
        .map(|c| (c.to_string(), delivered(&env, c).value))
        .collect();
    let rt = rt();
    // The agent is logged in (as the clone, with v2) when it is retired.
    let session = rt.block_on(pg_session(&clone, &v2.value));

    let out = env.cli(&[
        "decommission",
        AGENT,
        "--reason",
        "retired in the e2e test",
        "--by",
        "alice@example.com",
        "--wait",
        "--json",
    ]);
    assert!(out.status.success(), "decommission: {}", text(&out));
    let result: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let row = &result["agent"];
    assert_eq!(result["already"], false);
    assert_eq!(row["state"], "decommissioned", "{row}");
    assert_eq!(row["by"], "alice@example.com");
    assert_eq!(row["items"], row["verified"], "{row}");
    // acks + file + target + vault for db; acks + file + vault for the others.
    assert_eq!(row["items"], 4 + 3 * 3, "{row}");

    rt.block_on(async {
        // No value is readable from any vault through its own API.
        assert_eq!(bao_plain(&bao_path, None).await, None, "bao");
        for stage in ["AWSCURRENT", "AWSPREVIOUS", "AWSPENDING"] {
            assert_eq!(aws_plain(&aws_path, stage).await, None, "aws {stage}");
        }
        assert_eq!(azure_plain_latest(&kv_path).await, None, "azure");
        // No role logs in, with any value the agent ever had.
        for (user, password) in [(&role, &v1.value), (&clone, &v2.value)] {
            let e = pg_login(user, password)
                .await
                .expect_err("a revoked role must not log in");
            assert!(
                e.contains("not permitted to log in")
                    || e.contains("password authentication failed"),
                "{user}: refused for another reason: {e}"
            );
        }
        // The session the agent held is gone.
        assert!(
            session.simple_query("SELECT 1").await.is_err(),
            "the agent's session survived its decommission"
        );
    });
    // The files are gone.
    for c in ["db", "in-bao", "in-aws", "in-kv"] {
        let p = env.root().join(AGENT).join(format!("{c}.json"));
        assert!(!p.exists(), "{} is still there", p.display());
    }
    // Status shows it complete; rotating it is refused.
    for r in status_json(&env) {
        assert_eq!(r["state"], "decommissioned", "{r}");
    }
    let table = text(&env.cli_ok(&["status"]));
    assert!(table.contains("decommissioned"), "{table}");
    let refused = rotate(&env, "db");
    assert!(!refused.status.success());
    assert!(
        text(&refused).contains("decommissioned"),
        "{}",
        text(&refused)
    );

    // Twice is harmless; an unknown agent is a clear error with its own code.
    let again = env.cli(&["decommission", AGENT, "--reason", "again"]);
    assert!(again.status.success(), "{}", text(&again));
    assert!(
        text(&again).contains("already decommissioned"),
        "{}",
        text(&again)
    );
    let ghost = env.cli(&["decommission", "ghost", "--reason", "x"]);
    assert_eq!(ghost.status.code(), Some(67), "{}", text(&ghost));
    assert!(
        text(&ghost).contains("no agent \"ghost\""),
        "{}",
        text(&ghost)
    );

    let log = daemon.stop();
    rt.block_on(async {
        let k = bot_key("db");
        for stage in [Stage::Current, Stage::Previous, Stage::Pending] {
            assert_eq!(
                local_vault_value(&env, "local", &k, Select::Stage(stage)).await,
                None,
                "local vault {stage:?}"
            );
        }
    });

    // The audit log: decision → revoked → verified, in order, with times.
    audit_verifies(&env, "after a decommission");
    let records = audit_records(&env);
    let pos = |event: &str| {
        records
            .iter()
            .position(|r| r["event"] == event)
            .unwrap_or_else(|| panic!("no {event} record"))
    };
    let decided = pos("decommission.decided");
    let verified = pos("decommission.verified");
    assert!(decided < pos("revocation.revoked") && pos("revocation.verified") < verified);
    let d = &records[decided];
    assert!(
        d["detail"]
            .as_str()
            .unwrap()
            .contains("retired in the e2e test"),
        "{d}"
    );
    assert!(
        d["detail"].as_str().unwrap().contains("alice@example.com"),
        "{d}"
    );
    assert_eq!(
        records
            .iter()
            .filter(|r| r["event"] == "revocation.verified")
            .count(),
        13
    );
    let v = &records[verified];
    assert!(v["detail"].as_str().unwrap().contains(" met "), "{v}");

    // No value leaked anywhere.
    let mut secrets = vec![("v1", v1.value.clone()), ("v2", v2.value.clone())];
    for (c, value) in &values {
        secrets.push((c.as_str(), value.clone()));
    }
    let mut places = vec![
        ("daemon log".to_owned(), log.into_bytes()),
        (
            "audit log".to_owned(),
            std::fs::read(env.audit_log()).unwrap(),
        ),
        ("status".to_owned(), table.into_bytes()),
        ("decommission output".to_owned(), out.stdout.clone()),
    ];
    places.push((
        "state db".to_owned(),
        std::fs::read(env.state_dir().join("state.db")).unwrap(),
    ));
    assert_nowhere(&secrets, &places);
}

// --- `keyturn check --online` ------------------------------------------------------

/// Defect (black-box): after a reload changed a postgres target's `role`
/// (no rotation since), a decommission revoked and "verified" only the new
/// role, and said `verified, SLA met` while the old role still logged in
/// with the agent's value. Every target a version was set on is revoked and
/// verified (here both roles of the old `alternating_users` pair).
#[test]
fn decommission_after_a_role_change_revokes_the_roles_the_values_were_set_on() {
    let files = Files::new();
    let old = pg_new_role("kt_was_");
    let old_clone = format!("{old}_clone");
    let new = pg_new_role("kt_now_");
    let path = unique("e2e/dec/moved/");
    let config = |target: String| {
        format!(
            "{}{}",
            agent_table(AGENT),
            credential("db", r#""local""#, &path, "1h", &target)
        )
    };
    let env = Env::new(&config(pg_target(
        &files,
        &old,
        "alternating_users",
        &pg_admin_dsn(),
    )));
    let daemon = env.start();
    wait_version(&env, "db", 1);
    let v1 = delivered(&env, "db");
    rotate_ok(&env, "db", 2);
    let v2 = delivered(&env, "db");
    assert_eq!(v2.username.as_deref(), Some(old_clone.as_str()));
    env.write_credentials(&config(pg_target(
        &files,
        &new,
        "single_user",
        &pg_admin_dsn(),
    )));
    daemon.reload();
    let out = env.cli(&["decommission", AGENT, "--reason", "moved", "--wait"]);
    assert!(out.status.success(), "decommission: {}", text(&out));
    let rt = rt();
    rt.block_on(async {
        assert_login_refused(&old, &v1.value).await;
        assert_login_refused(&old_clone, &v2.value).await;
    });
    let verified: Vec<String> = audit_records(&env)
        .into_iter()
        .filter(|r| r["event"] == "revocation.verified")
        .filter_map(|r| r["detail"].as_str().map(str::to_owned))
        .collect();
    for item in ["db/target ", &format!("db/target:postgres:{old} ")] {
        assert!(
            verified
                .iter()
                .any(|d| d.starts_with(&format!("item={item}"))),
            "{item} verified: {verified:?}"
        );
    }
    daemon.stop();
    rt.block_on(pg_admin(&format!(
        "DROP ROLE IF EXISTS {old}; DROP ROLE IF EXISTS {old_clone}; DROP ROLE {new}"
    )));
}

/// Defect (black-box): after a reload changed a postgres target's `role`,
/// the next rotation set its value on the new role, and the old role kept
/// the agent's previous password (and its LOGIN) after that version was
/// retired, until a decommission. When the version set on the old role
/// retires, the old role is revoked (as a decommission revokes it).
#[test]
fn retiring_a_version_set_on_a_role_the_config_changed_since_revokes_that_role() {
    let files = Files::new();
    let old = pg_new_role("kt_was_");
    let new = pg_new_role("kt_now_");
    let path = unique("e2e/retire/moved/");
    let config = |role: &str| {
        format!(
            "{}{}",
            agent_table(AGENT),
            credential(
                "db",
                r#""local""#,
                &path,
                "1s",
                &pg_target(&files, role, "single_user", &pg_admin_dsn())
            )
        )
    };
    let env = Env::new(&config(&old));
    let daemon = env.start();
    wait_version(&env, "db", 1);
    let v1 = delivered(&env, "db");
    let rt = rt();
    rt.block_on(pg_login(&old, &v1.value))
        .expect("version 1 logs in as the old role");
    env.write_credentials(&config(&new));
    daemon.reload();
    rotate_ok(&env, "db", 2);
    let v2 = delivered(&env, "db");
    // Version 1 retires at the end of its 1s grace.
    wait_for(Duration::from_secs(20), || {
        rt.block_on(pg_login(&old, &v1.value))
            .is_err()
            .then_some(())
    })
    .unwrap_or_else(|| panic!("the old role {old} still logs in with the retired version"));
    rt.block_on(async {
        let e = pg_login(&old, &v1.value).await.unwrap_err();
        // NOLOGIN and no password, as a decommission leaves it.
        assert!(
            e.contains("not permitted to log in") || e.contains("password authentication failed"),
            "{old}: refused for another reason: {e}"
        );
        pg_login(&new, &v2.value)
            .await
            .expect("version 2 logs in as the new role");
    });
    daemon.stop();
    rt.block_on(pg_admin(&format!("DROP ROLE {old}; DROP ROLE {new}")));
}

/// Defect (black-box): a reload that changed only how the target is
/// reached (`connect_timeout`, `pool_size`, the admin DSN file moved with
/// the same content) was taken for another target: when the version before
/// it retired, the role was revoked "at the earlier target", which is the
/// same role, and the current value stopped logging in (status: idle). The
/// same for a decommission of another agent that had used that role: it is
/// the role a credential of the config uses now.
#[test]
fn a_reload_that_only_changes_how_the_target_is_reached_revokes_nothing() {
    let files = Files::new();
    let role = pg_new_role("kt_same_");
    let path = unique("e2e/retire/same/");
    let moved_dsn = files.write("moved.dsn", &pg_admin_dsn(), 0o600);
    let config = |extra: &str| {
        format!(
            "{}{}",
            agent_table(AGENT),
            credential(
                "db",
                r#""local""#,
                &path,
                "1s",
                &pg_target_with(&files, &role, "single_user", &pg_admin_dsn(), extra)
            )
        )
    };
    let env = Env::new(&config(""));
    let daemon = env.start();
    wait_version(&env, "db", 1);
    let moved = config(", pool_size = 2").replace(
        &format!(
            "admin_dsn_file = \"{}\"",
            files.path(&format!("{role}.dsn")).display()
        ),
        &format!("admin_dsn_file = \"{}\"", moved_dsn.display()),
    );
    let moved = moved.replace(r#"connect_timeout = "3s""#, r#"connect_timeout = "5s""#);
    assert!(moved.contains("moved.dsn") && moved.contains(r#"connect_timeout = "5s""#));
    env.write_credentials(&moved);
    daemon.reload();
    rotate_ok(&env, "db", 2);
    let v2 = delivered(&env, "db");
    let rt = rt();
    // Version 1 retires at the end of its 1s grace; wait well past it.
    wait_for(Duration::from_secs(20), || {
        (row(&env, "db")["stage"] == "current" && row(&env, "db")["state"] == "idle").then_some(())
    })
    .expect("version 2 settles");
    std::thread::sleep(Duration::from_secs(3));
    rt.block_on(pg_login(&role, &v2.value))
        .unwrap_or_else(|e| panic!("the current version no longer logs in as {role}: {e}"));
    let log = daemon.stop();
    assert!(
        !log.contains("the config moved the credential off"),
        "the same role was revoked as an earlier target:\n{log}"
    );
    rt.block_on(pg_admin(&format!("DROP ROLE {role}")));
}

/// Black-box findings: a reload that changed a postgres target's
/// `strategy` on the same role, or named the same server another way
/// (`127.0.0.1`, then `localhost`), was a change of target, and when the
/// version set before it retired, the earlier target's roles were all
/// revoked: the role holding the current value among them (NOLOGIN, its
/// password gone), with status `idle`. Only the roles the config uses no
/// longer are revoked now; the others are left, and the audit record
/// says which.
#[test]
fn a_changed_strategy_or_server_name_never_revokes_the_role_holding_the_current_value() {
    let files = Files::new();
    let role = pg_new_role("kt_strat_");
    let clone = format!("{role}_clone");
    let path = unique("e2e/retire/strategy/");
    let localhost = files.write(
        "localhost.dsn",
        &pg_admin_dsn().replace("host=127.0.0.1", "host=localhost"),
        0o600,
    );
    assert!(
        std::fs::read_to_string(&localhost)
            .unwrap()
            .contains("host=localhost")
    );
    let config = |strategy: &str| {
        format!(
            "{}{}",
            agent_table(AGENT),
            credential(
                "db",
                r#""local""#,
                &path,
                "1s",
                &pg_target(&files, &role, strategy, &pg_admin_dsn())
            )
        )
    };
    let rt = rt();
    let env = Env::new(&config("single_user"));
    let daemon = env.start();
    wait_version(&env, "db", 1);
    // The version before the current one retires (1s grace) and the
    // credential settles.
    let settle = |env: &Env, n: u64| {
        let out = rotate_ok(env, "db", n);
        wait_for(Duration::from_secs(20), || {
            let r = row(env, "db");
            (r["state"] == "idle").then_some(())
        })
        .expect("settles");
        std::thread::sleep(Duration::from_secs(2));
        out
    };
    let login = |user: &str, value: &str| rt.block_on(pg_login(user, value));
    // single_user -> alternating_users on the same role. Version 2 is set
    // on the clone; the role stays as it is (a name the config uses).
    env.write_credentials(&config("alternating_users"));
    daemon.reload();
    settle(&env, 2);
    let v2 = delivered(&env, "db");
    assert_eq!(v2.username.as_deref(), Some(clone.as_str()));
    login(&clone, &v2.value).expect("version 2 logs in as the clone");
    // Version 3 on the role itself, the usual alternation.
    settle(&env, 3);
    let v3 = delivered(&env, "db");
    login(&role, &v3.value).expect("version 3 logs in as the role");
    // alternating_users -> single_user: version 4 on the role; when
    // version 3 retires, only the clone (no longer used) is revoked.
    env.write_credentials(&config("single_user"));
    daemon.reload();
    settle(&env, 4);
    let v4 = delivered(&env, "db");
    login(&role, &v4.value)
        .unwrap_or_else(|e| panic!("the current version no longer logs in as {role}: {e}"));
    let e = login(&clone, &v2.value).expect_err("the clone is revoked");
    assert!(
        e.contains("not permitted to log in") || e.contains("password authentication failed"),
        "{e}"
    );
    // The same server named another way: nothing is revoked.
    let renamed = config("single_user").replace(
        &format!(
            "admin_dsn_file = \"{}\"",
            files.path(&format!("{role}.dsn")).display()
        ),
        &format!("admin_dsn_file = \"{}\"", localhost.display()),
    );
    assert!(renamed.contains("localhost.dsn"));
    env.write_credentials(&renamed);
    daemon.reload();
    settle(&env, 5);
    let v5 = delivered(&env, "db");
    login(&role, &v5.value).unwrap_or_else(|e| {
        panic!("the current version no longer logs in as {role} after the DSN named the server another way: {e}")
    });
    daemon.stop();
    let records: Vec<serde_json::Value> = audit_records(&env)
        .into_iter()
        .filter(|r| r["event"] == "target.revoked")
        .collect();
    let details: Vec<&str> = records
        .iter()
        .filter_map(|r| r["detail"].as_str())
        .collect();
    assert_eq!(details.len(), 3, "{details:#?}");
    assert!(
        details[0].contains(&format!(
            "left as they are, since the config uses logins of these names now: {role}"
        )),
        "{details:#?}"
    );
    assert!(
        details[1].contains(&format!("(logins revoked: {clone})")),
        "{details:#?}"
    );
    assert!(
        details[2].contains(&format!(
            "left as they are, since the config uses logins of these names now: {role}"
        )),
        "{details:#?}"
    );
    rt.block_on(pg_admin(&format!(
        "DROP ROLE {role}; DROP ROLE IF EXISTS {clone}"
    )));
}

/// `keyturn check --online` on `env`'s config, with the AWS secret key
/// replaced by `aws_secret` (moto accepts any key; it stands for a canary).
fn check_online(env: &Env, args: &[&str], aws_secret: &str) -> (Option<i32>, String, String) {
    let out = std::process::Command::new(bin())
        .args(["check", "--online"])
        .args(args)
        .arg("--config")
        .arg(env.path().join("keyturn.toml"))
        .env_remove("KEYTURN_CONFIG")
        .env_remove("CREDENTIALS_DIRECTORY")
        .env("AWS_SECRET_ACCESS_KEY", aws_secret)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The report's line for `what` (`vault` or `target`) named `name`.
fn probe_line<'a>(stdout: &'a str, what: &str, name: &str) -> &'a str {
    stdout
        .lines()
        .find(|l| {
            let mut words = l.split_whitespace();
            words.next() == Some(what) && words.next() == Some(name)
        })
        .unwrap_or_else(|| panic!("no line for {what} {name}:\n{stdout}"))
}

/// Every vault type and both target types, all reachable with good
/// credentials: one `ok` line each, exit 0. Nothing is created: the local
/// vault, never started, reports that its key and database do not exist yet.
#[test]
fn check_online_passes_when_every_vault_and_target_answers() {
    let files = Files::new();
    let role = pg_new_role("kt_online_");
    let azure_secret = files.write("azure-secret", STUB_CLIENT_SECRET, 0o600);
    let hook = files.write("hook.sh", "#!/bin/sh\nexit 0\n", 0o755);
    let env = Env::new(&format!(
        "{}{}{}{}{}{}",
        bao_vault_table(&files),
        aws_table("aws"),
        azure_stub_table("azure", &azure_secret),
        agent_table(AGENT),
        credential(
            "db",
            r#""bao""#,
            &unique("e2e/online/"),
            "0s",
            &pg_target(&files, &role, "single_user", &pg_admin_dsn()),
        ),
        credential(
            "api",
            r#"["aws", "azure", "local"]"#,
            &unique("e2e/online/"),
            "0s",
            &format!(
                r#"target = {{ type = "command", program = "{}" }}"#,
                hook.display()
            ),
        ),
    ));
    let canary = unique("kt_canary_aws_secret_");
    let started = Instant::now();
    let (code, stdout, stderr) = check_online(&env, &[], &canary);
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    for (what, name) in [
        ("vault", "aws"),
        ("vault", "azure"),
        ("vault", "bao"),
        ("vault", "local"),
        ("target", "bot/api"),
        ("target", "bot/db"),
    ] {
        let line = probe_line(&stdout, what, name);
        assert!(line.contains(" ok"), "{line}");
    }
    assert!(probe_line(&stdout, "vault", "aws").contains("aws_secrets_manager"));
    assert!(probe_line(&stdout, "target", "bot/db").contains(&format!("postgres:{role}")));
    assert!(
        probe_line(&stdout, "target", "bot/api").contains("not run"),
        "a hook is not run: {stdout}"
    );
    assert!(
        probe_line(&stdout, "vault", "local").contains("not created yet"),
        "{stdout}"
    );
    assert!(
        !env.state_dir().exists(),
        "check --online created the state directory (the local vault's key)"
    );
    assert!(started.elapsed() < Duration::from_secs(30));
    assert_nowhere(
        &[
            ("the AWS secret key", canary),
            ("the Azure client secret", STUB_CLIENT_SECRET.to_owned()),
            ("the OpenBao token", need("KEYTURN_TEST_BAO_TOKEN")),
            ("the PostgreSQL admin password", pg_admin_password()),
        ],
        &[(
            "check --online".to_owned(),
            [stdout, stderr].concat().into_bytes(),
        )],
    );
    rt().block_on(pg_admin(&format!("DROP ROLE {role}")));
}

/// Each kind of vault and target fails for its own reason; each failure is
/// reported with its reason and what to do, the others are still checked,
/// and the command exits 69. No credential of the config is printed.
#[test]
fn check_online_reports_each_failure_and_checks_the_rest() {
    let files = Files::new();
    let role = pg_new_role("kt_online_");
    let bao_canary = unique("kt_canary_bao_token_");
    let azure_canary = unique("kt_canary_azure_secret_");
    let pg_canary = unique("kt_canary_pg_password_");
    let aws_canary = unique("kt_canary_aws_secret_");
    let bad_token = files.write("bad-token", &bao_canary, 0o600);
    let bad_azure = files.write("bad-azure", &azure_canary, 0o600);
    let wrong_dsn = pg_admin_dsn().replace(&pg_admin_password(), &pg_canary);
    // A local vault whose database exists but whose key directory is gone.
    let lost = files.path("lost");
    std::fs::create_dir(&lost).unwrap();
    std::fs::write(lost.join("vault.db"), b"").unwrap();
    // An address that accepts connections and never answers.
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let silent_addr = format!("http://{}", silent.local_addr().unwrap());
    let good_token = files.write("good-token", &need("KEYTURN_TEST_BAO_TOKEN"), 0o600);
    let env = Env::new(&format!(
        r#"{}{}
[vaults.aws]
type = "aws_secrets_manager"
endpoint_url = "http://127.0.0.1:{}"
region = "us-east-1"
timeout = "3s"
{}
[vaults.lost]
type = "local"
dir = "{}"
key_file = "{}"
{}{}{}{}"#,
        bao_table("bao", &need("KEYTURN_TEST_BAO_ADDR"), &bad_token),
        bao_table("silent", &silent_addr, &good_token),
        closed_port(),
        azure_stub_table("azure", &bad_azure),
        lost.display(),
        files.path("gone/lost-vault.key").display(),
        agent_table(AGENT),
        credential(
            "db",
            r#""local""#,
            &unique("e2e/online/"),
            "0s",
            // Its own DSN file (`pg_target` names the file after the role).
            &format!(
                r#"target = {{ type = "postgres", admin_dsn_file = "{}", role = "{role}", connect_timeout = "3s" }}"#,
                files.write("wrong.dsn", &wrong_dsn, 0o600).display()
            ),
        ),
        credential(
            "api",
            r#"["aws", "azure", "lost", "silent"]"#,
            &unique("e2e/online/"),
            "0s",
            &format!(
                r#"target = {{ type = "command", program = "{}" }}"#,
                files.path("no-such-hook").display()
            ),
        ),
        credential(
            "ok",
            r#""bao""#,
            &unique("e2e/online/"),
            "0s",
            &pg_target(&files, &role, "single_user", &pg_admin_dsn()),
        ),
    ));
    let started = Instant::now();
    let (code, stdout, stderr) = check_online(&env, &["--timeout", "2s"], &aws_canary);
    let took = started.elapsed();
    assert_eq!(code, Some(69), "{stdout}{stderr}");
    // Concurrent: the silent vault's 2 s and the AWS SDK's retries overlap.
    assert!(took < Duration::from_secs(15), "took {took:?}");
    let failed = |what: &str, name: &str, needles: &[&str]| {
        let line = probe_line(&stdout, what, name);
        assert!(line.contains("FAILED"), "{line}");
        for n in needles {
            assert!(line.contains(n), "{what} {name}: no {n:?} in: {line}");
        }
    };
    failed("vault", "bao", &["unauthorized", "check the credentials"]);
    failed("vault", "aws", &["transient", "reachable"]);
    failed("vault", "azure", &["unauthorized", "check the credentials"]);
    failed(
        "vault",
        "lost",
        &["key file", "is missing but the database", "restore the key"],
    );
    failed("vault", "silent", &["no answer within 2s", "--timeout"]);
    failed("target", "bot/api", &["no-such-hook"]);
    failed("target", "bot/db", &["password authentication failed"]);
    // Still checked, and fine: the local vault and the good target.
    assert!(
        probe_line(&stdout, "vault", "local").contains(" ok"),
        "{stdout}"
    );
    assert!(
        probe_line(&stdout, "target", "bot/ok").contains(" ok"),
        "{stdout}"
    );
    assert!(stderr.contains("7 of 9 online check(s) failed"), "{stderr}");
    drop(silent);
    assert_nowhere(
        &[
            ("the OpenBao token", bao_canary),
            ("the Azure client secret", azure_canary),
            ("the PostgreSQL password", pg_canary),
            ("the AWS secret key", aws_canary),
        ],
        &[(
            "check --online".to_owned(),
            [stdout, stderr].concat().into_bytes(),
        )],
    );
    rt().block_on(pg_admin(&format!("DROP ROLE {role}")));
}

/// Black-box finding: a `single_user` rotation cut off by `kill -9` after
/// its value was set on the role (its `test` failing), whose credential was
/// then removed from the config, was recorded as abandoned and "undone at
/// the target", but nothing was sent to the server: the role kept the
/// value no agent had, and the agents stayed locked out. The current
/// value is set on the role again.
#[test]
fn a_single_user_rotation_left_in_the_config_s_wake_gets_the_current_value_back() {
    let files = Files::new();
    let role = pg_new_role("kt_undo_");
    let db = format!("{role}_db");
    let rt = rt();
    rt.block_on(pg_admin(&format!("CREATE DATABASE {db}")));
    let path = unique("e2e/undo/");
    let cred = credential(
        "db",
        r#""local""#,
        &path,
        "1h",
        &pg_target_with(
            &files,
            &role,
            "single_user",
            &pg_admin_dsn(),
            &format!(", test_dbname = \"{db}\""),
        ),
    );
    let env = Env::new(&format!("{}{cred}", agent_table(AGENT)));
    let daemon = env.start();
    wait_version(&env, "db", 1);
    let v1 = delivered(&env, "db");
    rt.block_on(pg_login(&role, &v1.value))
        .expect("version 1 logs in");
    // Version 2 is set on the role; its test cannot reach the database.
    rt.block_on(pg_admin(&format!("ALTER DATABASE {db} RENAME TO {db}_x")));
    let out = env.cli(&["rotate", &format!("{AGENT}/db")]);
    assert!(out.status.success(), "{}", text(&out));
    wait_for(Duration::from_secs(30), || {
        let r = row(&env, "db");
        (r["step"] == "test" && r["last_error"].is_string()).then_some(())
    })
    .unwrap_or_else(|| panic!("never failed at test: {:?}", row(&env, "db")));
    assert!(
        rt.block_on(pg_login(&role, &v1.value)).is_err(),
        "version 2 replaced version 1 on the role"
    );
    daemon.kill9();
    rt.block_on(pg_admin(&format!("ALTER DATABASE {db}_x RENAME TO {db}")));
    // The credential leaves the config while the daemon is down.
    env.write_credentials(&agent_table(AGENT));
    let daemon = env.start();
    wait_for(Duration::from_secs(30), || {
        audit_records(&env)
            .into_iter()
            .find(|r| r["event"] == "rotation.abandoned")
    })
    .expect("the rotation is recorded as abandoned");
    rt.block_on(pg_login(&role, &v1.value))
        .unwrap_or_else(|e| panic!("the agents' version 1 no longer logs in as {role}: {e}"));
    daemon.stop();
    // (DROP DATABASE cannot run in a batch's implicit transaction.)
    rt.block_on(pg_admin(&format!("DROP DATABASE {db}")));
    rt.block_on(pg_admin(&format!("DROP ROLE {role}")));
}

/// Black-box finding: a credential renamed between restarts (the same
/// `alternating_users` target) had its successor set version 2 on the
/// clone while the removed one's version 2, on that clone too, was in its
/// grace; when that grace ended, the removed credential's retirement
/// cleared the clone: the successor's current value stopped logging in
/// (status: idle). A role's mark names the credential as well as the
/// version, and a retirement leaves another credential's value alone.
#[test]
fn a_renamed_credential_s_value_survives_the_retirement_of_its_predecessor() {
    let files = Files::new();
    let role = pg_new_role("kt_rename_");
    let clone = format!("{role}_clone");
    let target = pg_target(&files, &role, "alternating_users", &pg_admin_dsn());
    let config = |cred: &str| {
        format!(
            "{}{}",
            agent_table(AGENT),
            credential(cred, r#""local""#, &unique("e2e/rename/"), "15s", &target)
        )
    };
    let env = Env::new(&config("db"));
    let daemon = env.start();
    wait_version(&env, "db", 1);
    rotate_ok(&env, "db", 2);
    rotate_ok(&env, "db", 3);
    // Version 2 (on the clone) is in its 15s grace.
    let graced = std::time::Instant::now();
    daemon.stop();
    env.write_credentials(&config("db2"));
    let daemon = env.start();
    wait_version(&env, "db2", 1);
    rotate_ok(&env, "db2", 2);
    let v2 = delivered(&env, "db2");
    assert_eq!(v2.username.as_deref(), Some(clone.as_str()));
    // The removed credential's version 2 retires at the end of its grace.
    std::thread::sleep(Duration::from_secs(17).saturating_sub(graced.elapsed()));
    wait_for(Duration::from_secs(20), || {
        audit_records(&env).into_iter().find(|r| {
            r["event"] == "rotation.retire"
                && r["credential"] == "db"
                && r["outcome"] == "ok"
                && r["version"] == 3
        })
    })
    .expect("the removed credential's version 2 retired");
    rt().block_on(pg_login(&clone, &v2.value))
        .unwrap_or_else(|e| {
            panic!("the renamed credential's current value no longer logs in as {clone}: {e}")
        });
    daemon.stop();
    rt().block_on(pg_admin(&format!("DROP ROLE {role}; DROP ROLE {clone}")));
}

/// Black-box finding: a vault that accepts connections and never answers
/// (a hung server, a firewall dropping packets) held the whole start for
/// its `timeout` per missing delivered file, one after another: no
/// socket, no `/healthz`, no rotation of any other credential for a
/// quarter of an hour. The restores run at once, the start waits for them
/// a bounded time, and the other credentials rotate meanwhile.
#[test]
fn a_hung_vault_does_not_hold_up_the_start() {
    let files = Files(tempfile::tempdir().unwrap());
    let token = files.write("bao-token", &need("KEYTURN_TEST_BAO_TOKEN"), 0o600);
    let base = unique("kt-hung-");
    let config = |address: &str| {
        let mut c = agent_table(AGENT);
        c.push_str(&bao_table("bao", address, &token));
        for i in 0..6 {
            c.push_str(&credential(
                &format!("b{i}"),
                "\"bao\"",
                &format!("{base}/b{i}"),
                "1h",
                "",
            ));
        }
        c.push_str(&credential("l", "\"local\"", "l", "1h", ""));
        c
    };
    let env = Env::new(&config(&need("KEYTURN_TEST_BAO_ADDR")));
    let daemon = env.start();
    for i in 0..6 {
        wait_version(&env, &format!("b{i}"), 1);
    }
    wait_version(&env, "l", 1);
    daemon.stop();

    // A reboot emptied the agents' files; OpenBao now accepts and never
    // answers (timeout 5s: one after another, six restores took 30s).
    for i in 0..6 {
        std::fs::remove_file(env.root().join(AGENT).join(format!("b{i}.json"))).unwrap();
    }
    let hung = TcpListener::bind("127.0.0.1:0").unwrap();
    let address = format!("http://{}", hung.local_addr().unwrap());
    let held = std::thread::spawn(move || {
        let mut held = Vec::new();
        for c in hung.incoming().take(64) {
            let Ok(c) = c else { break };
            held.push(c);
        }
        held
    });
    env.write_credentials(&config(&address));
    let started = Instant::now();
    let daemon = env.start();
    let ready_after = started.elapsed();
    assert!(
        ready_after < Duration::from_secs(20),
        "ready only after {ready_after:?}"
    );
    // The credential on the local vault rotates meanwhile.
    rotate_ok(&env, "l", 2);
    assert!(
        !env.root().join(AGENT).join("b0.json").exists(),
        "nothing to restore from"
    );
    daemon.stop();
    drop(held);
}
