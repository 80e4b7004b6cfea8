//! Fault tolerance of rotations against the real vault servers (issue 3):
//! a credential kept in OpenBao *and* AWS Secrets Manager (moto), `vault =
//! ["bao", "aws"]`, or in Azure Key Vault (the in-repo stub) as the primary
//! *and* OpenBao, `vault = ["kv", "bao"]`, rotated by the real `keyturn`
//! binary while
//!
//! a. a fault proxy (or, for Azure, the stub's own fault API) loses the
//!    response of each kind of write keyturn issues (the write is committed,
//!    the client never hears back);
//! b. the daemon is killed (`SIGKILL` from inside) at every failpoint;
//! c. a vault answers 503 (OpenBao) or 429 (AWS ThrottlingException, Azure
//!    with `Retry-After`) for a while.
//!
//! After each: exactly ONE new version per vault, both vaults agree on the
//! current version (same rotation id, same value) and it is what was
//! delivered, the previous version is kept as previous, and the audit chain
//! verifies. Checked with plain clients reading the servers directly (what an
//! agent reading the vault sees), not through keyturn's vault code.
//!
//! REAL SERVERS: needs `bash scripts/services.sh start` and its env file
//! sourced (`bash scripts/test.sh` does both). A missing variable fails the
//! test; it never skips. Built only with `--features failpoints` (part b).
//!
//! The daemon logs in to the Azure stub with a client secret at the stub's
//! Entra ID endpoint (`authority_host`), as `tests/real_vaults.rs` does; the
//! tests read Key Vault with plain REST calls (`KvPlain`).

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use aws_sdk_secretsmanager::config::BehaviorVersion;
use common::crash::{at_every_failpoint, bot_db, kill_9_and_resume};
use common::proxy::{Flavor, Match, Proxy};
use common::*;
use keyturn::model::{RotationId, Stage};
use keyturn::vaults::azure::secret_name;
use serde_json::{Map, Value};
use vaultrs::client::VaultClient;

/// Which vaults hold bot/db, in `vault = [...]` order (the first is the
/// primary: the engine reads the staged value back from it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Layout {
    /// `["bao", "aws"]`
    BaoAws,
    /// `["kv", "bao"]`: Azure Key Vault as the primary.
    KvBao,
}

/// A path no other test (or earlier run) uses, on both servers.
fn unique_path(test: &str) -> String {
    format!("keyturn-faults/{test}-{}/db", RotationId::generate())
}

/// Where the daemon reaches each vault (the server, or a proxy before it).
struct Addresses {
    bao: String,
    aws: String,
}

impl Addresses {
    fn direct() -> Addresses {
        Addresses {
            bao: need("KEYTURN_TEST_BAO_ADDR"),
            aws: need("KEYTURN_TEST_AWS_ENDPOINT"),
        }
    }
}

/// An Env whose bot/db credential lives in the vaults of `layout` at
/// `path`. `grace` decides when the previous version is retired: "1h" keeps
/// it as previous until the next rotation starts (which retires it first).
/// Azure is always reached directly: the stub injects its own faults.
fn remote_env(
    layout: Layout,
    addr: &Addresses,
    path: &str,
    grace: &str,
    daemon_extra: &str,
) -> Env {
    let (second, vaults) = match layout {
        Layout::BaoAws => {
            // Every AWS_* variable of the services env reaches the daemon:
            // the harness spawns it with the test's environment.
            need("AWS_ACCESS_KEY_ID");
            let region = need("AWS_REGION");
            let table = format!(
                r#"
[vaults.aws]
type = "aws_secrets_manager"
endpoint_url = "{aws}"
region = "{region}"
timeout = "5s"
"#,
                aws = addr.aws,
            );
            (table, r#"["bao", "aws"]"#)
        }
        Layout::KvBao => {
            let url = need("KEYTURN_TEST_AZURE_URL");
            let table = format!(
                r#"
[vaults.kv]
type = "azure_key_vault"
vault_url = "{url}"
auth = "client_secret"
tenant_id = "{TENANT}"
client_id = "{STUB_CLIENT_ID}"
client_secret_file = "{{dir}}/azure-client-secret"
authority_host = "{url}"
ca_file = "{ca}"
verify_challenge_resource = false
timeout = "5s"
"#,
                ca = need("KEYTURN_TEST_AZURE_CA"),
            );
            (table, r#"["kv", "bao"]"#)
        }
    };
    let config = format!(
        r#"
{bao}{second}
[agents.bot]
owner = "alice@example.com"
tenant = "acme"
tier = "high"

[agents.bot.credentials.db]
vault = {vaults}
path = "{path}"
generate = {{ kind = "password", length = 32 }}
every = "1h"
grace = "{grace}"
# A hook that reads the value and succeeds: without a target the engine skips
# `set` and `test`, and the kill -9 test could not reach their failpoints.
target = {{ type = "command", program = "/bin/sh", args = ["-c", "cat >/dev/null"] }}
deliver = [{{ type = "file", path = "{{root}}/bot/db.json", format = "json" }}]
"#,
        bao = bao_table(&addr.bao),
    );
    let env = Env::with_daemon(&config, daemon_extra);
    let secret_file = |name: &str, content: &str| {
        let file = env.path().join(name);
        std::fs::write(&file, content).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
    };
    write_bao_token(&env);
    if layout == Layout::KvBao {
        secret_file("azure-client-secret", STUB_CLIENT_SECRET);
    }
    env
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Waits until bot/db is at `version` and no rotation runs or is parked.
/// With a long grace the previous version waits to be retired: `retiring`.
fn wait_rotated(env: &Env, version: u64) {
    wait_settled(env, version, &["idle", "retiring"]);
}

// ---------------------------------------------------------------------------
// What the servers hold, read with plain clients
// ---------------------------------------------------------------------------

fn not_found(e: &vaultrs::error::ClientError) -> bool {
    matches!(e, vaultrs::error::ClientError::APIError { code: 404, .. })
        || matches!(
            e,
            vaultrs::error::ClientError::RestClientError {
                source: rustify::errors::ClientError::ServerResponseError { code: 404, .. }
            }
        )
}

/// One KV v2 version of `path`: `(value, keyturn_rotation)`, `None` when
/// destroyed or absent.
async fn bao_version(c: &VaultClient, path: &str, n: u64) -> Option<(String, String)> {
    match vaultrs::kv2::read_version::<Map<String, Value>>(c, "secret", path, n).await {
        Ok(m) => Some((
            m["value"].as_str().expect("value field").to_owned(),
            m["keyturn_rotation"]
                .as_str()
                .expect("keyturn_rotation field")
                .to_owned(),
        )),
        Err(e) if not_found(&e) => None,
        Err(e) => panic!("bao read {path} v{n}: {e}"),
    }
}

async fn aws_client() -> aws_sdk_secretsmanager::Client {
    let conf = aws_config::defaults(BehaviorVersion::latest())
        .endpoint_url(need("KEYTURN_TEST_AWS_ENDPOINT"))
        .region(aws_config::Region::new(need("AWS_REGION")))
        .load()
        .await;
    aws_sdk_secretsmanager::Client::new(&conf)
}

/// Every version of the AWS secret, deprecated (unlabeled) ones included:
/// version id -> staging labels. One page of 100 is plenty for these tests
/// (and moto hands out a NextToken even on the last page).
async fn aws_versions(
    c: &aws_sdk_secretsmanager::Client,
    name: &str,
) -> BTreeMap<String, Vec<String>> {
    let page = c
        .list_secret_version_ids()
        .secret_id(name)
        .include_deprecated(true)
        .max_results(100)
        .send()
        .await
        .unwrap_or_else(|e| panic!("ListSecretVersionIds {name}: {e:?}"));
    page.versions()
        .iter()
        .map(|v| {
            (
                v.version_id().unwrap_or_default().to_owned(),
                v.version_stages().to_vec(),
            )
        })
        .collect()
}

async fn aws_value(
    c: &aws_sdk_secretsmanager::Client,
    name: &str,
    stage: &str,
) -> (String, String) {
    let out = c
        .get_secret_value()
        .secret_id(name)
        .version_stage(stage)
        .send()
        .await
        .unwrap_or_else(|e| panic!("GetSecretValue {name} {stage}: {e:?}"));
    (
        out.secret_string().expect("a string secret").to_owned(),
        out.version_id().expect("a version id").to_owned(),
    )
}

/// The current value as the servers hold it after `version` rotations.
struct Held {
    value: String,
    rotation: String,
}

/// Asserts the invariants after the credential reached `version`:
/// - OpenBao: exactly `version` KV versions at `path`, the latest carrying
///   the current value, the one before it the previous value (`previous`),
///   older ones destroyed; the pending slot cleared.
/// - AWS: exactly `version` secret versions; AWSCURRENT has the same value
///   and rotation id as OpenBao's current, AWSPREVIOUS the previous value;
///   no AWSPENDING left; older versions unlabeled.
/// - Azure: see [`kv_check`] (the previous version kept).
/// - the delivered file holds that value at `version`; state agrees.
fn check_vaults(
    env: &Env,
    layout: Layout,
    path: &str,
    version: u64,
    previous: Option<&Held>,
    what: &str,
) -> Held {
    let rt = runtime();
    let held = rt.block_on(async {
        let bao = bao_client();
        let meta = vaultrs::kv2::read_metadata(&bao, "secret", path)
            .await
            .unwrap_or_else(|e| panic!("{what}: bao metadata of {path}: {e}"));
        assert_eq!(
            meta.current_version,
            version,
            "{what}: exactly one new KV version per rotation in bao ({:?})",
            meta.versions.keys().collect::<Vec<_>>()
        );
        assert_eq!(meta.versions.len() as u64, version, "{what}: bao versions");
        let (value, rotation) = bao_version(&bao, path, version)
            .await
            .unwrap_or_else(|| panic!("{what}: bao has no current version"));
        if version >= 2 {
            let prev = bao_version(&bao, path, version - 1).await;
            let prev = prev.unwrap_or_else(|| panic!("{what}: bao lost the previous version"));
            if let Some(p) = previous {
                assert_eq!(prev.0, p.value, "{what}: bao previous value");
                assert_eq!(prev.1, p.rotation, "{what}: bao previous rotation");
            }
        }
        for old in 1..version.saturating_sub(1) {
            assert!(
                bao_version(&bao, path, old).await.is_none(),
                "{what}: bao version {old} (before the previous) should be destroyed"
            );
        }
        match vaultrs::kv2::read_metadata(&bao, "secret", &format!("keyturn-pending/{path}")).await
        {
            Err(e) if not_found(&e) => {}
            Ok(m) => panic!(
                "{what}: the pending slot was not cleared ({} versions)",
                m.versions.len()
            ),
            Err(e) => panic!("{what}: bao pending metadata: {e}"),
        }
        let held = Held { value, rotation };
        match layout {
            Layout::BaoAws => aws_check(path, version, &held, previous, what).await,
            Layout::KvBao => kv_check(path, version, &held, previous, false, what).await,
        }
        held
    });

    let delivered = delivered_json(env, "bot/db.json");
    assert_eq!(delivered["version"], version, "{what}: delivered version");
    assert_eq!(
        delivered["value"].as_str(),
        Some(held.value.as_str()),
        "{what}: the delivered file holds the vaults' current value"
    );
    let stages = stages(env, &bot_db());
    assert_eq!(
        stages.last(),
        Some(&(version, Stage::Current)),
        "{what}: state {stages:?}"
    );
    assert_eq!(stages.len() as u64, version, "{what}: state {stages:?}");
    held
}

/// AWS holds exactly `version` versions, AWSCURRENT is `current`,
/// AWSPREVIOUS `previous`; no AWSPENDING; older versions unlabeled.
async fn aws_check(path: &str, version: u64, current: &Held, previous: Option<&Held>, what: &str) {
    let aws = aws_client().await;
    let versions = aws_versions(&aws, path).await;
    assert_eq!(
        versions.len() as u64,
        version,
        "{what}: exactly one new AWS version per rotation: {versions:?}"
    );
    assert!(
        versions
            .values()
            .all(|l| !l.iter().any(|s| s == "AWSPENDING")),
        "{what}: AWSPENDING left behind: {versions:?}"
    );
    let (aws_current, aws_rotation) = aws_value(&aws, path, "AWSCURRENT").await;
    assert_eq!(
        aws_current, current.value,
        "{what}: the vaults disagree about the current value"
    );
    assert_eq!(
        aws_rotation, current.rotation,
        "{what}: the vaults disagree about the current version"
    );
    if version >= 2 {
        let (aws_prev, aws_prev_rotation) = aws_value(&aws, path, "AWSPREVIOUS").await;
        if let Some(p) = previous {
            assert_eq!(aws_prev, p.value, "{what}: AWS previous value");
            assert_eq!(
                aws_prev_rotation, p.rotation,
                "{what}: AWS previous rotation"
            );
        }
        let labeled = versions.values().filter(|l| !l.is_empty()).count();
        assert_eq!(
            labeled, 2,
            "{what}: only current and previous are labeled: {versions:?}"
        );
    }
}

/// Key Vault read with plain REST calls (api-version 7.5) and a token from
/// the stub's Entra ID endpoint: what any reader of the vault sees, not
/// keyturn's vault code. Also the stub's control API (faults, request log).
/// Make one per runtime: its connection pool belongs to the runtime.
struct KvPlain {
    http: reqwest::Client,
    url: String,
    token: String,
}

/// One version of a Key Vault secret, from the versions listing.
#[derive(Debug)]
struct KvVersion {
    id: String,
    enabled: bool,
    tags: BTreeMap<String, String>,
}

impl KvVersion {
    fn tag(&self, name: &str) -> Option<&str> {
        self.tags.get(name).map(String::as_str)
    }
}

impl KvPlain {
    async fn new() -> KvPlain {
        let url = need("KEYTURN_TEST_AZURE_URL");
        let pem = std::fs::read(need("KEYTURN_TEST_AZURE_CA")).unwrap();
        let http = reqwest::Client::builder()
            .tls_certs_merge(reqwest::Certificate::from_pem_bundle(&pem).unwrap())
            .timeout(Duration::from_secs(10))
            .build()
            .unwrap();
        let rsp = http
            .post(format!("{url}/{TENANT}/oauth2/v2.0/token"))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(format!(
                "grant_type=client_credentials&client_id={STUB_CLIENT_ID}\
                 &client_secret={STUB_CLIENT_SECRET}&scope=https%3A%2F%2Fvault.azure.net%2F.default"
            ))
            .send()
            .await
            .unwrap();
        assert!(rsp.status().is_success(), "stub token: {}", rsp.status());
        let doc: Value = serde_json::from_str(&rsp.text().await.unwrap()).unwrap();
        let token = doc["access_token"].as_str().expect("a token").to_owned();
        KvPlain { http, url, token }
    }

    /// GET with the token; `None` on 404 (absent) or 403 (disabled).
    async fn get(&self, url: &str) -> Option<Value> {
        let rsp = self
            .http
            .get(url)
            .bearer_auth(&self.token)
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET {url}: {e}"));
        let status = rsp.status().as_u16();
        if status == 404 || status == 403 {
            return None;
        }
        let text = rsp.text().await.unwrap();
        assert_eq!(status, 200, "GET {url}: {text}");
        Some(serde_json::from_str(&text).unwrap())
    }

    /// Every version of `secret`, in creation order (the stub lists them so;
    /// the service does not promise an order), following `nextLink`.
    async fn versions(&self, secret: &str) -> Vec<KvVersion> {
        let mut out = Vec::new();
        let mut next = Some(format!(
            "{}/secrets/{secret}/versions?api-version=7.5",
            self.url
        ));
        while let Some(url) = next.take() {
            let Some(page) = self.get(&url).await else {
                break;
            };
            for v in page["value"].as_array().expect("a value array") {
                let id = v["id"].as_str().expect("an id");
                out.push(KvVersion {
                    id: id.rsplit('/').next().unwrap().to_owned(),
                    enabled: v["attributes"]["enabled"].as_bool().expect("enabled"),
                    tags: serde_json::from_value(v["tags"].clone()).unwrap_or_default(),
                });
            }
            next = page["nextLink"].as_str().map(str::to_owned);
        }
        out
    }

    /// The value of one version; `None` when disabled (403) or absent.
    async fn value(&self, secret: &str, id: &str) -> Option<String> {
        let url = format!("{}/secrets/{secret}/{id}?api-version=7.5", self.url);
        let doc = self.get(&url).await?;
        Some(doc["value"].as_str().expect("a value").to_owned())
    }

    /// `POST /_stub/<what>` (faults, drop_response).
    async fn control(&self, what: &str, body: Value) {
        let rsp = self
            .http
            .post(format!("{}/_stub/{what}", self.url))
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .await
            .unwrap();
        assert!(rsp.status().is_success(), "stub {what}: {}", rsp.status());
    }

    /// The stub's log of the requests for `secret`, oldest first.
    async fn requests(&self, secret: &str) -> Vec<Value> {
        let url = format!("{}/_stub/requests?secret={secret}", self.url);
        let text = self
            .http
            .get(url)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let doc: Value = serde_json::from_str(&text).unwrap();
        doc["requests"].as_array().expect("requests").clone()
    }
}

/// Runs `f` with a fresh [`KvPlain`] on its own runtime.
fn with_kv<T>(f: impl AsyncFnOnce(&KvPlain) -> T) -> T {
    runtime().block_on(async {
        let kv = KvPlain::new().await;
        f(&kv).await
    })
}

/// `NAME` and `NAME-staging`: the Key Vault secrets of a credential path.
fn kv_names(path: &str) -> (String, String) {
    let main = secret_name(path).unwrap();
    let staging = format!("{main}-staging");
    (main, staging)
}

/// Azure holds exactly `version` versions of the main secret (one per
/// rotation): the latest is enabled, tagged current, and has `current`'s
/// value and rotation id (so it agrees with the other vault); the one
/// before it is the enabled `previous`, or disabled and tagged retired when
/// `previous_retired` (grace over); older ones are disabled and retired.
/// The staging secret has one version per rotation, none enabled.
async fn kv_check(
    path: &str,
    version: u64,
    current: &Held,
    previous: Option<&Held>,
    previous_retired: bool,
    what: &str,
) {
    let kv = KvPlain::new().await;
    let (main, staging) = kv_names(path);
    let versions = kv.versions(&main).await;
    assert_eq!(
        versions.len() as u64,
        version,
        "{what}: exactly one new Azure version per rotation: {versions:?}"
    );
    let latest = versions.last().expect("a version");
    assert!(
        latest.enabled && latest.tag("keyturn-stage") == Some("current"),
        "{what}: Azure's latest version is the current one: {versions:?}"
    );
    assert_eq!(
        kv.value(&main, &latest.id).await.as_deref(),
        Some(current.value.as_str()),
        "{what}: the vaults disagree about the current value"
    );
    assert_eq!(
        latest.tag("keyturn-rotation"),
        Some(current.rotation.as_str()),
        "{what}: the vaults disagree about the current version"
    );
    let n = versions.len();
    if n >= 2 {
        let prev = &versions[n - 2];
        if previous_retired {
            assert!(
                !prev.enabled && prev.tag("keyturn-stage") == Some("retired"),
                "{what}: Azure previous retired (disabled): {versions:?}"
            );
        } else {
            assert!(
                prev.enabled && prev.tag("keyturn-stage") == Some("previous"),
                "{what}: Azure previous kept: {versions:?}"
            );
            if let Some(p) = previous {
                assert_eq!(
                    kv.value(&main, &prev.id).await.as_deref(),
                    Some(p.value.as_str()),
                    "{what}: Azure previous value"
                );
                assert_eq!(
                    prev.tag("keyturn-rotation"),
                    Some(p.rotation.as_str()),
                    "{what}: Azure previous rotation"
                );
            }
        }
    }
    for old in versions.iter().take(n.saturating_sub(2)) {
        assert!(
            !old.enabled && old.tag("keyturn-stage") == Some("retired"),
            "{what}: Azure versions before the previous are retired: {versions:?}"
        );
    }
    let staged = kv.versions(&staging).await;
    assert_eq!(
        staged.len() as u64,
        version,
        "{what}: exactly one staging version per rotation: {staged:?}"
    );
    assert!(
        staged.iter().all(|v| !v.enabled),
        "{what}: no pending value left enabled in the staging secret: {staged:?}"
    );
}

/// `rotate bot/db --wait` succeeds: a lost response was retried.
fn rotate_wait_succeeds(env: &Env, daemon: &Daemon, what: &str) {
    let out = env.cli(&["rotate", "bot/db", "--wait"]);
    assert!(
        out.status.success(),
        "{what}: rotate --wait failed: {}{}\nlog:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        daemon.log_text()
    );
}

/// `rotate bot/db` (not waiting for the rotation) is accepted.
fn rotate_started(env: &Env) {
    env.cli_ok(&["rotate", "bot/db"]);
}

/// A proxy in front of OpenBao and one in front of AWS, the unique path of
/// `test`'s credential, and its Env (both vaults, grace "1h") reaching each
/// vault through its proxy.
fn proxied_bao_aws(test: &str) -> (Proxy, Proxy, String, Env) {
    let direct = Addresses::direct();
    let bao = Proxy::start(&direct.bao, Flavor::Bao);
    let aws = Proxy::start(&direct.aws, Flavor::Aws);
    let path = unique_path(test);
    let env = remote_env(
        Layout::BaoAws,
        &Addresses {
            bao: bao.url(),
            aws: aws.url(),
        },
        &path,
        "1h",
        "",
    );
    (bao, aws, path, env)
}

/// Stops the daemon, whose log shows failed (then retried) steps, and
/// verifies the audit chain.
fn stop_after_lost_responses(env: &Env, daemon: Daemon, what: &str) {
    let log = daemon.stop();
    assert!(
        log.contains("step failed"),
        "{what}: the lost responses were retried"
    );
    audit_verifies(env, what);
}

// ---------------------------------------------------------------------------
// a. Lost responses
// ---------------------------------------------------------------------------

/// For each write keyturn issues, one response is lost: the rotation retries
/// and ends with exactly one new version in each vault.
#[test]
fn a_lost_response_of_every_write_still_makes_exactly_one_version() {
    let (bao, aws, path, env) = proxied_bao_aws("lost");

    // CreateSecret is issued once per secret: in the first rotation.
    let create = aws.drop_response(Match::aws("CreateSecret"), 1);
    let daemon = env.start();
    wait_rotated(&env, 1);
    assert_eq!(aws.hits(create), 1, "the CreateSecret response was dropped");
    let mut held = check_vaults(&env, Layout::BaoAws, &path, 1, None, "CreateSecret lost");

    let pending = format!("/v1/secret/data/keyturn-pending/{path}");
    let data = format!("/v1/secret/data/{path}");
    let destroy = format!("/v1/secret/destroy/{path}");
    let slot_meta = format!("/v1/secret/metadata/keyturn-pending/{path}");
    // (proxy, matcher, what): each is the only fault of one rotation.
    let cases: Vec<(&Proxy, Match, &str)> = vec![
        (
            &bao,
            Match::bao("POST", &pending),
            "bao: pending-slot write",
        ),
        (
            &bao,
            Match::bao("POST", &data),
            "bao: data write with cas (promote)",
        ),
        // Retire at the start of the next rotation (grace not over yet)
        // destroys the previous version's data.
        (&bao, Match::bao("POST", &destroy), "bao: destroy (retire)"),
        (
            &bao,
            Match::bao("DELETE", &slot_meta),
            "bao: pending-slot metadata delete",
        ),
        (&aws, Match::aws("PutSecretValue"), "aws: PutSecretValue"),
        (
            &aws,
            Match::aws("UpdateSecretVersionStage").with_body("\"AWSCURRENT\""),
            "aws: UpdateSecretVersionStage move AWSCURRENT (promote)",
        ),
        (
            &aws,
            Match::aws("UpdateSecretVersionStage").with_body("\"AWSPENDING\""),
            "aws: UpdateSecretVersionStage remove AWSPENDING (promote)",
        ),
        (
            &aws,
            Match::aws("UpdateSecretVersionStage").with_body("\"AWSPREVIOUS\""),
            "aws: UpdateSecretVersionStage remove AWSPREVIOUS (retire)",
        ),
    ];
    let mut version = 1;
    for (proxy, matcher, what) in cases {
        let rule = proxy.drop_response(matcher.clone(), 1);
        rotate_wait_succeeds(&env, &daemon, what);
        assert_eq!(
            proxy.hits(rule),
            1,
            "{what}: the fault was injected (requests seen: {:?})",
            proxy.counts()
        );
        assert!(
            proxy.count(&matcher) >= 2,
            "{what}: the lost write was retried"
        );
        version += 1;
        wait_rotated(&env, version);
        held = check_vaults(&env, Layout::BaoAws, &path, version, Some(&held), what);
    }
    stop_after_lost_responses(&env, daemon, "lost responses");
}

/// The same for Azure Key Vault (`["kv", "bao"]`), whose writes have no
/// idempotency token: the stub commits each kind of write keyturn issues
/// once and drops its answer, and keyturn's read-back before a retried write
/// must keep it from making a second version.
#[test]
fn a_kv_lost_response_of_every_azure_write_still_makes_exactly_one_version() {
    let path = unique_path("lost-kv");
    let (main, staging) = kv_names(&path);
    let env = remote_env(Layout::KvBao, &Addresses::direct(), &path, "1h", "");
    // Answers the stub dropped for `secret` with `method` (logged status 0).
    let dropped = |secret: &str, method: &str| {
        with_kv(async |kv| kv.requests(secret).await)
            .iter()
            .filter(|r| r["method"] == method && r["status"] == 0)
            .count()
    };
    let drop_next = |secret: &str, method: &str, body: Option<&str>| {
        let mut rule = serde_json::json!({"count": 1, "secret": secret, "method": method});
        if let Some(b) = body {
            rule["body"] = b.into();
        }
        with_kv(async |kv| kv.control("drop_response", rule).await);
    };

    // The very first write creates the staging secret.
    drop_next(&staging, "PUT", None);
    let daemon = env.start();
    wait_rotated(&env, 1);
    assert_eq!(
        dropped(&staging, "PUT"),
        1,
        "the first stage's answer was dropped"
    );
    let mut held = check_vaults(&env, Layout::KvBao, &path, 1, None, "first stage lost");

    // (secret, method, body filter, what): each is the only fault of one
    // rotation. The body filters tell apart the PATCHes of one secret by the
    // stage tag they write. Abandoning an older pending version (a PATCH on
    // the staging secret) happens only after an abandoned rotation: not here.
    let cases: Vec<(&str, &str, Option<&str>, &str)> = vec![
        (&staging, "PUT", None, "stage: set on the staging secret"),
        (&main, "PUT", None, "promote: set on the main secret"),
        (
            &main,
            "PATCH",
            Some("\"previous\""),
            "promote: tag the old current previous",
        ),
        (
            &staging,
            "PATCH",
            Some("\"promoted\""),
            "promote: disable the promoted staging version",
        ),
        // Retire at the start of the next rotation (grace not over yet).
        (
            &main,
            "PATCH",
            Some("\"retired\""),
            "retire: disable the previous version",
        ),
    ];
    let mut version = 1;
    for (secret, method, body, what) in cases {
        let before = dropped(secret, method);
        drop_next(secret, method, body);
        rotate_wait_succeeds(&env, &daemon, what);
        assert_eq!(
            dropped(secret, method),
            before + 1,
            "{what}: the fault was injected"
        );
        version += 1;
        wait_rotated(&env, version);
        held = check_vaults(&env, Layout::KvBao, &path, version, Some(&held), what);
    }
    stop_after_lost_responses(&env, daemon, "Azure lost responses");
}

// ---------------------------------------------------------------------------
// b. kill -9 at every failpoint
// ---------------------------------------------------------------------------

/// Kill -9 at `failpoint` (tests/common/crash.rs) on a credential kept in
/// the vaults of `layout`, with grace 0. Before the crash the servers hold
/// version 1 as [`check_vaults`] says; after it, exactly one new version in
/// each vault, and they agree with each other: the previous is retired
/// (destroyed in bao, unlabeled in AWS, disabled in Azure).
fn crash_at(layout: Layout, failpoint: &str) {
    let path = unique_path("crash");
    let env = remote_env(layout, &Addresses::direct(), &path, "0s", "");
    kill_9_and_resume(
        &env,
        failpoint,
        || check_vaults(&env, layout, &path, 1, None, failpoint),
        |before| {
            runtime().block_on(async {
                let bao = bao_client();
                let meta = vaultrs::kv2::read_metadata(&bao, "secret", &path)
                    .await
                    .unwrap();
                assert_eq!(meta.current_version, 2, "{failpoint}: bao versions");
                assert!(
                    bao_version(&bao, &path, 1).await.is_none(),
                    "{failpoint}: bao version 1 retired (destroyed)"
                );
                let (value, rotation) = bao_version(&bao, &path, 2).await.unwrap();
                assert_ne!(value, before.value, "{failpoint}: a new value");
                match layout {
                    Layout::BaoAws => {
                        let aws = aws_client().await;
                        let versions = aws_versions(&aws, &path).await;
                        assert_eq!(versions.len(), 2, "{failpoint}: AWS versions {versions:?}");
                        assert_eq!(
                            versions.get(&before.rotation).map(Vec::is_empty),
                            Some(true),
                            "{failpoint}: AWS version 1 retired (unlabeled): {versions:?}"
                        );
                        let (aws_value, aws_rotation) = aws_value(&aws, &path, "AWSCURRENT").await;
                        assert_eq!(aws_value, value, "{failpoint}: the vaults disagree");
                        assert_eq!(aws_rotation, rotation, "{failpoint}: the vaults disagree");
                    }
                    Layout::KvBao => {
                        let current = Held {
                            value: value.clone(),
                            rotation,
                        };
                        kv_check(&path, 2, &current, None, true, failpoint).await;
                    }
                }
                value.into_bytes()
            })
        },
    );
}

/// `kill -9` at every failpoint with the credential in OpenBao and AWS.
#[test]
fn b_kill_9_at_every_failpoint_resumes_to_one_version_per_vault() {
    at_every_failpoint(|fp| crash_at(Layout::BaoAws, fp));
}

/// `kill -9` at every failpoint with the credential in Azure Key Vault (the
/// primary: the engine reads the staged value back from it after a crash)
/// and OpenBao.
#[test]
fn b_kv_kill_9_at_every_failpoint_resumes_to_one_version_per_vault() {
    at_every_failpoint(|fp| crash_at(Layout::KvBao, fp));
}

// ---------------------------------------------------------------------------
// c. Vault down / throttled
// ---------------------------------------------------------------------------

/// While `proxy` fails every request, `status --json` shows the failing step
/// and an error naming `vault` with `needles`; once it stops failing, the
/// rotation completes by itself (no manual trigger).
fn outage(flavor: Flavor, status: u16, vault: &str, needles: &[&str]) {
    let direct = Addresses::direct();
    let proxy = match flavor {
        Flavor::Bao => Proxy::start(&direct.bao, flavor),
        Flavor::Aws => Proxy::start(&direct.aws, flavor),
    };
    let addr = match flavor {
        Flavor::Bao => Addresses {
            bao: proxy.url(),
            aws: direct.aws.clone(),
        },
        Flavor::Aws => Addresses {
            bao: direct.bao.clone(),
            aws: proxy.url(),
        },
    };
    let path = unique_path(&format!("outage-{status}"));
    let env = remote_env(Layout::BaoAws, &addr, &path, "1h", "");
    let daemon = env.start();
    wait_rotated(&env, 1);
    let held = check_vaults(&env, Layout::BaoAws, &path, 1, None, "before the outage");

    let rule = proxy.fail(
        Match::any(),
        status,
        usize::MAX,
        Some(Duration::from_secs(1)),
    );
    rotate_started(&env);

    // The engine retries the step with back-off, then parks the rotation;
    // status says where and why, whichever of the two it is in.
    let row = wait_for(Duration::from_secs(30), || {
        let rows = status_json(&env);
        let r = rows[0].clone();
        (r["state"] == "failed").then_some(r)
    })
    .unwrap_or_else(|| panic!("never failed: {:?}", status_json(&env)));
    assert_eq!(row["step"], "create", "the failing step: {row}");
    assert_eq!(row["version"], 1, "still at the old version: {row}");
    let error = row["last_error"]
        .as_str()
        .unwrap_or_else(|| panic!("no error: {row}"));
    assert!(error.contains("create"), "names the step: {error}");
    assert!(
        error.contains(&format!("vault \"{vault}\"")),
        "names the vault: {error}"
    );
    for needle in needles {
        assert!(
            error.to_lowercase().contains(&needle.to_lowercase()),
            "says {needle:?}: {error}"
        );
    }
    assert!(!error.contains(&held.value), "no secret in the error");
    let attempts = proxy.hits(rule);
    assert!(
        attempts >= 3,
        "the step was retried ({attempts} requests refused)"
    );

    // Still failing a while later: it keeps retrying, with back-off.
    std::thread::sleep(Duration::from_millis(1500));
    let later = proxy.hits(rule);
    assert!(later > attempts, "the parked rotation is retried by itself");
    assert!(
        later < 20,
        "retries back off instead of hammering the vault ({later} requests in ~2 s)"
    );
    let row = &status_json(&env)[0];
    assert_eq!(row["version"], 1, "{row}");

    // The vault is back: the rotation completes without a trigger.
    proxy.clear();
    wait_rotated(&env, 2);
    let row = &status_json(&env)[0];
    assert!(row["last_error"].is_null(), "the error is cleared: {row}");
    check_vaults(
        &env,
        Layout::BaoAws,
        &path,
        2,
        Some(&held),
        "after the outage",
    );
    daemon.stop();
    audit_verifies(&env, "outage");
}

#[test]
fn c_bao_unavailable_503_then_back() {
    outage(Flavor::Bao, 503, "bao", &["503", "unavailable"]);
}

#[test]
fn c_aws_throttled_429_then_back() {
    outage(Flavor::Aws, 429, "aws", &["429", "throttl"]);
}

/// Azure Key Vault throttles (429 with `Retry-After: 2`) the staging secret
/// for more attempts than a step makes, so the rotation is also parked once.
/// While it lasts, status names the step, the vault and the throttling; the
/// rotation completes by itself afterwards; and per the stub's request log no
/// request for that secret came sooner than `Retry-After` after a 429.
#[test]
fn c_kv_throttled_429_honours_retry_after_then_completes() {
    // The test daemons make 3 attempts per step (tests/common): 4 throttled
    // answers cover the in-step retries and the parked rotation's retry.
    const THROTTLED: usize = 4;
    const RETRY_AFTER: f64 = 2.0;
    let path = unique_path("throttled-kv");
    let (_, staging) = kv_names(&path);
    let env = remote_env(Layout::KvBao, &Addresses::direct(), &path, "1h", "");
    let daemon = env.start();
    wait_rotated(&env, 1);
    let held = check_vaults(&env, Layout::KvBao, &path, 1, None, "before throttling");

    // The first request of a rotation for the staging secret is the primary
    // (kv) stage's read-back listing, in step create: refused for a while.
    with_kv(async |kv| {
        kv.control(
            "faults",
            serde_json::json!({"status": 429, "count": THROTTLED,
                               "retry_after": RETRY_AFTER as u64, "secret": staging}),
        )
        .await
    });
    let started = Instant::now();
    rotate_started(&env);
    let row = wait_for(Duration::from_secs(20), || {
        let r = status_json(&env)[0].clone();
        r["last_error"].is_string().then_some(r)
    })
    .unwrap_or_else(|| panic!("no error shown: {:?}", status_json(&env)));
    assert_eq!(row["step"], "create", "the failing step: {row}");
    assert_eq!(row["version"], 1, "still at the old version: {row}");
    let error = row["last_error"].as_str().unwrap();
    assert!(error.contains("create"), "names the step: {error}");
    assert!(error.contains("vault \"kv\""), "names the vault: {error}");
    assert!(error.contains("429"), "says 429: {error}");
    assert!(
        error.to_lowercase().contains("throttl"),
        "says throttled: {error}"
    );
    assert!(!error.contains(&held.value), "no secret in the error");

    // Completes by itself once the throttling ends.
    wait_rotated(&env, 2);
    let took = started.elapsed();
    let row = &status_json(&env)[0];
    assert!(row["last_error"].is_null(), "the error is cleared: {row}");
    check_vaults(
        &env,
        Layout::KvBao,
        &path,
        2,
        Some(&held),
        "after throttling",
    );
    daemon.stop();
    audit_verifies(&env, "Azure throttled");

    // Retry-After honoured: after each 429, the next request for the secret
    // (the stub logs arrival and answer times) came at least that late.
    let log = with_kv(async |kv| kv.requests(&staging).await);
    let throttled: Vec<usize> = (0..log.len())
        .filter(|&i| log[i]["status"] == 429)
        .collect();
    assert_eq!(throttled.len(), THROTTLED, "every fault was hit: {log:?}");
    for i in throttled {
        let next = log
            .get(i + 1)
            .unwrap_or_else(|| panic!("no request after the 429 #{i}: {log:?}"));
        let gap = next["start"].as_f64().unwrap() - log[i]["end"].as_f64().unwrap();
        assert!(
            gap >= RETRY_AFTER,
            "request {} came {gap:.3}s after a 429 with Retry-After {RETRY_AFTER}s: {log:?}",
            i + 1
        );
    }
    assert!(
        took >= Duration::from_secs_f64(RETRY_AFTER * THROTTLED as f64),
        "took {took:?}"
    );
}

// ---------------------------------------------------------------------------
// d. The calls of one rotation (docs/vault-calls.md)
// ---------------------------------------------------------------------------

// ---------------------------------------------------------------------------
// d. The calls of one rotation (docs/vault-calls.md)
// ---------------------------------------------------------------------------

/// `METHOD path` of an OpenBao call, the credential's path written `P`.
fn bao_call(r: &common::proxy::Seen, path: &str) -> String {
    let p = r.path.strip_prefix("/v1/secret/").unwrap_or(&r.path);
    let p = p.strip_suffix('?').unwrap_or(p);
    format!("{} {}", r.method, p.replace(path, "P"))
}

/// The Secrets Manager operation, with the label an
/// `UpdateSecretVersionStage` moves.
fn aws_call(r: &common::proxy::Seen) -> String {
    let op = r
        .amz_target
        .as_deref()
        .unwrap_or("?")
        .trim_start_matches("secretsmanager.");
    let label = ["AWSCURRENT", "AWSPENDING", "AWSPREVIOUS"]
        .into_iter()
        .find(|l| op == "UpdateSecretVersionStage" && r.body.contains(&format!("\"{l}\"")));
    match label {
        Some(l) => format!("{op} {l}"),
        None => op.to_owned(),
    }
}

/// The OpenBao calls of one rotation (P the credential's path), the same
/// whether OpenBao is the primary vault or the second.
const BAO_CALLS: [&str; 8] = [
    // retire version 1 (the previous rotation's previous)
    "GET data/P",
    "GET data/P?version=1",
    "POST destroy/P",
    // create: one write, cas 0, into the empty pending slot
    "POST data/keyturn-pending/P",
    // promote
    "GET data/keyturn-pending/P",
    "GET data/P",
    "POST data/P",
    "DELETE metadata/keyturn-pending/P",
];

/// One fresh rotation of a credential kept in OpenBao (the primary) and
/// AWS makes exactly the calls docs/vault-calls.md lists, in that order:
/// the rotation after the first, with grace 1h so that it begins by
/// retiring the version before the current one. A change that adds a call
/// fails here, and so does one that drops a call (update the doc with it).
#[test]
fn d_one_rotation_makes_the_listed_openbao_and_aws_calls() {
    let (bao, aws, path, env) = proxied_bao_aws("calls");
    let daemon = env.start();
    wait_rotated(&env, 1);
    rotate_wait_succeeds(&env, &daemon, "version 2");
    wait_rotated(&env, 2);
    let held = check_vaults(&env, Layout::BaoAws, &path, 2, None, "version 2");
    let (b, a) = (bao.seen().len(), aws.seen().len());
    rotate_wait_succeeds(&env, &daemon, "version 3");
    wait_rotated(&env, 3);
    let bao_calls: Vec<String> = bao.seen()[b..].iter().map(|r| bao_call(r, &path)).collect();
    let aws_calls: Vec<String> = aws.seen()[a..].iter().map(aws_call).collect();
    check_vaults(&env, Layout::BaoAws, &path, 3, Some(&held), "version 3");
    daemon.stop();
    audit_verifies(&env, "counted rotations");

    assert_eq!(bao_calls, BAO_CALLS, "the OpenBao calls of one rotation");
    let aws_want = [
        // retire version 1
        "DescribeSecret",
        "UpdateSecretVersionStage AWSPREVIOUS",
        // create
        "DescribeSecret",
        "PutSecretValue",
        // promote
        "DescribeSecret",
        "UpdateSecretVersionStage AWSCURRENT",
        "UpdateSecretVersionStage AWSPENDING",
    ];
    assert_eq!(aws_calls, aws_want, "the AWS calls of one rotation");
}

/// The same for Azure Key Vault as the primary (`["kv", "bao"]`), counted
/// by the stub's request log (which does not log token requests; the SDK
/// caches its token). OpenBao, second here, makes the same calls as when
/// it is the primary: no step reads a value back after a fresh stage.
#[test]
fn d_kv_one_rotation_makes_the_listed_azure_calls() {
    let direct = Addresses::direct();
    let bao = Proxy::start(&direct.bao, Flavor::Bao);
    let path = unique_path("calls-kv");
    let (main, staging) = kv_names(&path);
    let env = remote_env(
        Layout::KvBao,
        &Addresses {
            bao: bao.url(),
            aws: direct.aws.clone(),
        },
        &path,
        "1h",
        "",
    );
    // `METHOD secret` of the logged Key Vault requests after `since`.
    let kv_calls = |since: f64| {
        let mut rows: Vec<(f64, String)> = with_kv(async |kv| {
            let mut rows = Vec::new();
            for (secret, name) in [(&main, "NAME"), (&staging, "NAME-staging")] {
                for r in kv.requests(secret).await {
                    let start = r["start"].as_f64().expect("a start time");
                    if start > since {
                        rows.push((start, format!("{} {name}", r["method"].as_str().unwrap())));
                    }
                }
            }
            rows
        });
        rows.sort_by(|a, b| a.0.total_cmp(&b.0));
        rows
    };
    let daemon = env.start();
    wait_rotated(&env, 1);
    rotate_wait_succeeds(&env, &daemon, "version 2");
    wait_rotated(&env, 2);
    let held = check_vaults(&env, Layout::KvBao, &path, 2, None, "version 2");
    let since = kv_calls(0.0).last().map_or(0.0, |r| r.0);
    let b = bao.seen().len();
    rotate_wait_succeeds(&env, &daemon, "version 3");
    wait_rotated(&env, 3);
    let kv: Vec<String> = kv_calls(since).into_iter().map(|r| r.1).collect();
    let bao_calls: Vec<String> = bao.seen()[b..].iter().map(|r| bao_call(r, &path)).collect();
    check_vaults(&env, Layout::KvBao, &path, 3, Some(&held), "version 3");
    daemon.stop();
    audit_verifies(&env, "counted rotations");

    let kv_want = [
        // retire version 1: list NAME's versions, disable the previous
        "GET NAME",
        "PATCH NAME",
        // create: list the staging versions (a replay's read-back, and
        // pending leftovers to abandon), write the pending version
        "GET NAME-staging",
        "PUT NAME-staging",
        // promote: list both secrets, get the pending value, write it as
        // NAME's latest, tag the old current previous, disable the
        // staging version
        "GET NAME",
        "GET NAME-staging",
        "GET NAME-staging",
        "PUT NAME",
        "PATCH NAME",
        "PATCH NAME-staging",
    ];
    assert_eq!(kv, kv_want, "the Azure calls of one rotation");
    assert_eq!(bao_calls, BAO_CALLS, "the OpenBao calls of one rotation");
}
