//! Fault tolerance of rotations against the real vault servers (issue 3):
//! a credential kept in OpenBao *and* AWS Secrets Manager (moto), `vault =
//! ["bao", "aws"]`, rotated by the real `keyturn` binary while
//!
//! a. a fault proxy loses the response of each kind of write keyturn issues
//!    (the write is committed, the client never hears back);
//! b. the daemon is killed (`SIGKILL` from inside) at every failpoint;
//! c. a vault answers 503 (OpenBao) or 429 ThrottlingException (AWS) for a
//!    while.
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
//! Azure is not covered here: the daemon cannot authenticate to the Azure
//! stub yet (authority_host); its own fault API is used by the vault's tests.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use aws_sdk_secretsmanager::config::BehaviorVersion;
use common::proxy::{Flavor, Match, Proxy};
use common::*;
use keyturn::model::{AgentId, CredentialId, CredentialKey, RotationId, Stage};
use keyturn::rotation::FAILPOINTS;
use keyturn::state::{SqliteStore, StateStore};
use serde_json::{Map, Value};
use vaultrs::client::{VaultClient, VaultClientSettingsBuilder};

const START_HINT: &str =
    "start the test services: `bash scripts/services.sh start` (or run `bash scripts/test.sh`)";

fn required(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("{name} is not set; {START_HINT}"))
}

fn key() -> CredentialKey {
    CredentialKey::new(
        AgentId::new("bot").unwrap(),
        CredentialId::new("db").unwrap(),
    )
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
            bao: required("KEYTURN_TEST_BAO_ADDR"),
            aws: required("KEYTURN_TEST_AWS_ENDPOINT"),
        }
    }
}

/// An Env whose bot/db credential lives in `["bao", "aws"]` at `path`.
/// `grace` decides when the previous version is retired: "1h" keeps it as
/// previous until the next rotation starts (which retires it first).
fn remote_env(addr: &Addresses, path: &str, grace: &str, daemon_extra: &str) -> Env {
    // Every AWS_* variable of the services env reaches the daemon: the
    // harness spawns it with the test's environment.
    required("AWS_ACCESS_KEY_ID");
    let region = required("AWS_REGION");
    let config = format!(
        r#"
[vaults.bao]
type = "vault"
address = "{bao}"
token_file = "{{dir}}/bao-token"
timeout = "5s"

[vaults.aws]
type = "aws_secrets_manager"
endpoint_url = "{aws}"
region = "{region}"
timeout = "5s"

[agents.bot]
owner = "alice@example.com"
tenant = "acme"
tier = "high"

[agents.bot.credentials.db]
vault = ["bao", "aws"]
path = "{path}"
generate = {{ kind = "password", length = 32 }}
every = "1h"
grace = "{grace}"
deliver = [{{ type = "file", path = "{{root}}/bot/db.json", format = "json" }}]
"#,
        bao = addr.bao,
        aws = addr.aws,
    );
    let env = Env::with_daemon(&config, daemon_extra);
    let token = env.path().join("bao-token");
    std::fs::write(&token, required("KEYTURN_TEST_BAO_TOKEN")).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600)).unwrap();
    env
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Waits until bot/db is at `version` and no rotation runs or is parked.
/// With a grace of 0 the previous version is retired right after delivery,
/// so `idle` also means retired; with a long grace the state is `retiring`.
fn wait_settled(env: &Env, version: u64) {
    wait_for(Duration::from_secs(60), || {
        let rows = status_json(env);
        let r = &rows[0];
        (r["version"].as_u64() == Some(version)
            && (r["state"] == "idle" || r["state"] == "retiring"))
            .then_some(())
    })
    .unwrap_or_else(|| panic!("never settled at version {version}: {:?}", status_json(env)));
}

// ---------------------------------------------------------------------------
// What the servers hold, read with plain clients
// ---------------------------------------------------------------------------

fn bao_client() -> VaultClient {
    VaultClient::new(
        VaultClientSettingsBuilder::default()
            .address(required("KEYTURN_TEST_BAO_ADDR"))
            .token(required("KEYTURN_TEST_BAO_TOKEN"))
            .build()
            .unwrap(),
    )
    .unwrap()
}

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
        .endpoint_url(required("KEYTURN_TEST_AWS_ENDPOINT"))
        .region(aws_config::Region::new(required("AWS_REGION")))
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
/// - the delivered file holds that value at `version`; state agrees.
fn check_vaults(env: &Env, path: &str, version: u64, previous: Option<&Held>, what: &str) -> Held {
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
            aws_current, value,
            "{what}: the vaults disagree about the current value"
        );
        assert_eq!(
            aws_rotation, rotation,
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
        Held { value, rotation }
    });

    let delivered: Value =
        serde_json::from_slice(&std::fs::read(env.root().join("bot/db.json")).unwrap()).unwrap();
    assert_eq!(delivered["version"], version, "{what}: delivered version");
    assert_eq!(
        delivered["value"].as_str(),
        Some(held.value.as_str()),
        "{what}: the delivered file holds the vaults' current value"
    );
    let state = SqliteStore::open_read_only(&env.state_dir().join("state.db")).unwrap();
    let stages: Vec<(u64, Stage)> = state
        .versions(&key())
        .unwrap()
        .into_iter()
        .map(|v| (v.version, v.stage))
        .collect();
    assert_eq!(
        stages.last(),
        Some(&(version, Stage::Current)),
        "{what}: state {stages:?}"
    );
    assert_eq!(stages.len() as u64, version, "{what}: state {stages:?}");
    held
}

fn audit_verifies(env: &Env, what: &str) {
    let verify = env.cli(&["audit", "verify"]);
    assert!(
        verify.status.success(),
        "{what}: audit verify: {}",
        String::from_utf8_lossy(&verify.stderr)
    );
}

fn rotate_wait(env: &Env) -> std::process::Output {
    env.cli(&["rotate", "bot/db", "--wait"])
}

// ---------------------------------------------------------------------------
// a. Lost responses
// ---------------------------------------------------------------------------

/// For each write keyturn issues, one response is lost: the rotation retries
/// and ends with exactly one new version in each vault.
#[test]
fn a_lost_response_of_every_write_still_makes_exactly_one_version() {
    let direct = Addresses::direct();
    let bao = Proxy::start(&direct.bao, Flavor::Bao);
    let aws = Proxy::start(&direct.aws, Flavor::Aws);
    let path = unique_path("lost");
    let env = remote_env(
        &Addresses {
            bao: bao.url(),
            aws: aws.url(),
        },
        &path,
        "1h",
        "",
    );

    // CreateSecret is issued once per secret: in the first rotation.
    let create = aws.drop_response(Match::aws("CreateSecret"), 1);
    let daemon = env.start();
    wait_settled(&env, 1);
    assert_eq!(aws.hits(create), 1, "the CreateSecret response was dropped");
    let mut held = check_vaults(&env, &path, 1, None, "CreateSecret lost");

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
        let out = rotate_wait(&env);
        assert!(
            out.status.success(),
            "{what}: rotate --wait failed: {}{}\nlog:\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            daemon.log_text()
        );
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
        wait_settled(&env, version);
        held = check_vaults(&env, &path, version, Some(&held), what);
    }
    let log = daemon.stop();
    assert!(
        log.contains("step failed"),
        "the lost responses were retried"
    );
    audit_verifies(&env, "lost responses");
}

// ---------------------------------------------------------------------------
// b. kill -9 at every failpoint
// ---------------------------------------------------------------------------

fn crash_at(failpoint: &str) {
    let path = unique_path("crash");
    let env = remote_env(&Addresses::direct(), &path, "0s", "");
    let first = env.start();
    wait_settled(&env, 1);
    first.stop();
    let before = check_vaults(&env, &path, 1, None, failpoint);

    let mut doomed = env.start_with(&[("FAILPOINTS", &format!("{failpoint}=return"))]);
    let out = rotate_wait(&env);
    if !failpoint.contains("retire") {
        assert_ne!(
            out.status.code(),
            Some(0),
            "{failpoint}: the rotation cannot have succeeded"
        );
    }
    assert!(
        doomed.wait_exit(Duration::from_secs(30)).is_some(),
        "{failpoint}: the daemon was not killed; log:\n{}",
        doomed.log_text()
    );
    let killed_log = doomed.log_text();
    assert!(
        killed_log.contains(failpoint),
        "{failpoint}: not reached; log:\n{killed_log}"
    );

    let again = env.start();
    wait_settled(&env, 2);
    // grace = 0: the previous version is retired right after delivery.
    wait_for(Duration::from_secs(30), || {
        (status_json(&env)[0]["state"] == "idle").then_some(())
    })
    .unwrap_or_else(|| {
        panic!(
            "{failpoint}: previous never retired: {:?}",
            status_json(&env)
        )
    });
    again.stop();

    // Exactly one new version in each vault; they agree with each other and
    // with the file. The previous is retired (grace 0): destroyed in bao,
    // unlabeled in AWS.
    let rt = runtime();
    rt.block_on(async {
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
        let delivered: Value =
            serde_json::from_slice(&std::fs::read(env.root().join("bot/db.json")).unwrap())
                .unwrap();
        assert_eq!(delivered["version"], 2, "{failpoint}");
        assert_eq!(
            delivered["value"].as_str(),
            Some(value.as_str()),
            "{failpoint}: file"
        );
    });
    let state = SqliteStore::open_read_only(&env.state_dir().join("state.db")).unwrap();
    let stages: Vec<(u64, Stage)> = state
        .versions(&key())
        .unwrap()
        .into_iter()
        .map(|v| (v.version, v.stage))
        .collect();
    assert_eq!(
        stages,
        vec![(1, Stage::Retired), (2, Stage::Current)],
        "{failpoint}"
    );
    audit_verifies(&env, failpoint);
}

/// `kill -9` at every failpoint with the credential in OpenBao and AWS.
/// Failpoints run four at a time (each on its own credential path and
/// daemon) to keep the test under a minute or so.
#[test]
fn b_kill_9_at_every_failpoint_resumes_to_one_version_per_vault() {
    let queue = std::sync::Mutex::new(FAILPOINTS.to_vec());
    let failures = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| {
                loop {
                    let Some(fp) = queue.lock().unwrap().pop() else {
                        return;
                    };
                    if let Err(e) = std::panic::catch_unwind(|| crash_at(fp)) {
                        let msg = e
                            .downcast_ref::<String>()
                            .cloned()
                            .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                            .unwrap_or_default();
                        failures.lock().unwrap().push(format!("{fp}: {msg}"));
                    }
                }
            });
        }
    });
    let failures = failures.into_inner().unwrap();
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
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
    let env = remote_env(&addr, &path, "1h", "");
    let daemon = env.start();
    wait_settled(&env, 1);
    let held = check_vaults(&env, &path, 1, None, "before the outage");

    let rule = proxy.fail(
        Match::any(),
        status,
        usize::MAX,
        Some(Duration::from_secs(1)),
    );
    let out = env.cli(&["rotate", "bot/db"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

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
    wait_settled(&env, 2);
    let row = &status_json(&env)[0];
    assert!(row["last_error"].is_null(), "the error is cleared: {row}");
    check_vaults(&env, &path, 2, Some(&held), "after the outage");
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
