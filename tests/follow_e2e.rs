//! Follow mode end to end (issue 11, item 6): two real `keyturn` daemons on
//! one vault server, one rotating a credential and one following it
//! (`mode = "follow"`, `poll = "1s"`). After every rotation the follower's
//! delivered file holds the value the rotator delivered to its own file, in
//! order, each version once; the follower audits its deliveries with the
//! rotator's rotation ids, `status` shows it as followed, `keyturn rotate`
//! on the follower refuses, following survives a reload (SIGHUP), and a
//! restarted follower does not deliver the same version again.
//!
//! OpenBao and moto run with a change index (`change_index` on the vault,
//! on both daemons); the Azure stub without one (one metadata read per
//! credential per poll), so both ways of watching are covered.
//!
//! REAL SERVERS: needs `bash scripts/services.sh start` and its env file
//! sourced. A missing variable fails the test; it never skips. Every path
//! carries a random suffix (the servers are shared).

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::time::Duration;

use common::*;
use keyturn::vaults::Vault;
use keyturn::vaults::change_index;
use keyturn::vaults::hashicorp::{HashicorpAuth, HashicorpConfig, HashicorpVault};

const AGENT: &str = "bot";

fn unique(prefix: &str) -> String {
    format!("{prefix}{:016x}", rand::random::<u64>())
}

fn secret_file(dir: &tempfile::TempDir, name: &str, content: &str) -> PathBuf {
    let p = dir.path().join(name);
    std::fs::write(&p, content).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    p
}

fn bao_table(files: &tempfile::TempDir, index: Option<&str>) -> String {
    let token = secret_file(files, "bao-token", &need("KEYTURN_TEST_BAO_TOKEN"));
    format!(
        "[vaults.shared]\ntype = \"vault\"\naddress = \"{}\"\nmount = \"secret\"\ntoken_file = \"{}\"\ntimeout = \"5s\"\n{}",
        need("KEYTURN_TEST_BAO_ADDR"),
        token.display(),
        index_line(index)
    )
}

fn aws_table(index: Option<&str>) -> String {
    format!(
        "[vaults.shared]\ntype = \"aws_secrets_manager\"\nendpoint_url = \"{}\"\nregion = \"us-east-1\"\ntimeout = \"5s\"\n{}",
        need("KEYTURN_TEST_AWS_ENDPOINT"),
        index_line(index)
    )
}

fn azure_table(files: &tempfile::TempDir, index: Option<&str>) -> String {
    let secret = secret_file(files, "azure-client-secret", STUB_CLIENT_SECRET);
    format!(
        "{}{}",
        azure_stub_table("shared", &secret),
        index_line(index)
    )
}

fn index_line(index: Option<&str>) -> String {
    index.map_or_else(String::new, |p| format!("change_index = \"{p}\"\n"))
}

/// `db` of [`AGENT`], delivered as JSON to `{root}/bot/db.json`; `how` is
/// the schedule (rotator) or the mode (follower).
fn credential(path: &str, how: &str) -> String {
    format!(
        r#"
[agents.{AGENT}.credentials.db]
vault = "shared"
path = "{path}"
generate = {{ kind = "password", length = 32 }}
{how}
deliver = [{{ type = "file", path = "{{root}}/{AGENT}/db.json", format = "json" }}]
"#
    )
}

/// (value, version) of the delivered JSON file, if there is one.
fn delivered(env: &Env) -> Option<(String, u64)> {
    let p = env.root().join(AGENT).join("db.json");
    let doc: serde_json::Value = serde_json::from_slice(&std::fs::read(p).ok()?).ok()?;
    Some((doc["value"].as_str()?.to_owned(), doc["version"].as_u64()?))
}

fn text(o: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Runs the scenario on `table` (the same vault table for both daemons).
fn one_rotator_one_follower(table: &str, path: &str) {
    let rotator = Env::new(&format!(
        "{table}\n{}{}",
        agent_table(AGENT),
        credential(path, "every = \"1h\"\ngrace = \"1h\"")
    ));
    let follower = Env::new(&format!(
        "{table}\n{}{}",
        agent_table(AGENT),
        credential(path, "mode = \"follow\"\npoll = \"1s\"")
    ));
    let r = rotator.start();
    wait_version(&rotator, AGENT, "db", 1);
    let f = follower.start();

    // Every version the rotator delivers reaches the follower's file, in
    // order, one version step each (none skipped, none twice).
    let mut seen = Vec::new();
    let mut values = Vec::new();
    for round in 1..=4u64 {
        if round == 3 {
            // A reload rebuilds the follow loops; following goes on.
            f.reload();
        }
        if round > 1 {
            let out = rotator.cli(&["rotate", &format!("{AGENT}/db"), "--wait"]);
            assert!(out.status.success(), "rotate: {}", text(&out));
        }
        let (want, rv) = delivered(&rotator).expect("the rotator's file");
        assert_eq!(rv, round, "the rotator's version");
        let got = wait_for(Duration::from_secs(20), || {
            delivered(&follower).filter(|(v, _)| *v == want)
        })
        .unwrap_or_else(|| {
            panic!(
                "round {round}: the follower's file never got the rotator's value; it holds {:?}; follower log:\n{}",
                delivered(&follower).map(|(_, v)| v),
                f.log_text()
            )
        });
        seen.push(got.1);
        values.push(want);
    }
    assert_eq!(seen, vec![1, 2, 3, 4], "the follower's versions, in order");

    // Status: the follower shows the credential as followed, at its version
    // (recorded right after the file is written).
    wait_version(&follower, AGENT, "db", 4);
    let rows = status_json(&follower);
    let row = row(&rows, AGENT, "db");
    assert_eq!(row["state"], "follow", "{row}");
    assert_eq!(row["version"], 4, "{row}");
    assert!(row["next_due"].is_null(), "{row}");
    let table = text(&follower.cli_ok(&["status"]));
    assert!(table.contains("follow"), "{table}");

    // `rotate` on the follower is refused, and nothing rotates.
    let out = follower.cli(&["rotate", &format!("{AGENT}/db"), "--wait"]);
    assert!(
        !out.status.success(),
        "rotate on a follower succeeded: {}",
        text(&out)
    );
    assert!(text(&out).contains("followed"), "{}", text(&out));

    // The follower's audit: one successful delivery per version, carrying
    // the rotator's rotation id for it (the vault records it).
    let rotator_ids: Vec<String> = audit_records(&rotator)
        .iter()
        .filter(|r| r["event"] == "rotation.deliver" && r["outcome"] == "ok")
        .filter_map(|r| r["rotation"].as_str().map(str::to_owned))
        .collect();
    let follower_ids: Vec<String> = audit_records(&follower)
        .iter()
        .filter(|r| r["event"] == "delivery" && r["outcome"] == "ok")
        .filter_map(|r| r["rotation"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(follower_ids.len(), 4, "{follower_ids:?}");
    assert_eq!(
        follower_ids, rotator_ids,
        "the follower delivers the rotator's rotations"
    );
    audit_verifies(&follower, "follower");

    // A restart does not deliver the same version again.
    let before = audit_records(&follower).len();
    f.stop();
    let f = follower.start();
    std::thread::sleep(Duration::from_secs(3));
    let again = audit_records(&follower)
        .iter()
        .skip(before)
        .filter(|r| r["event"] == "delivery")
        .count();
    assert_eq!(again, 0, "a restarted follower delivered again");
    assert_eq!(delivered(&follower).map(|(_, v)| v), Some(4));

    let log = f.stop();
    r.stop();
    // Secret values stay out of the follower's log, audit and state.
    let audit = std::fs::read_to_string(follower.audit_log()).unwrap();
    let state = read_tree(&follower.state_dir());
    for value in &values {
        assert!(
            !log.contains(value.as_str()),
            "a value in the follower's log"
        );
        assert!(
            !audit.contains(value.as_str()),
            "a value in the follower's audit log"
        );
        for (p, bytes) in &state {
            assert!(
                !contains(bytes, value.as_bytes()),
                "a value in {}",
                p.display()
            );
        }
    }
}

/// The test OpenBao's `secret` mount as a vault named `name`, with the root token.
async fn bao_vault(name: &str) -> HashicorpVault {
    HashicorpVault::with_auth(
        name,
        &HashicorpConfig {
            mount: Some("secret".into()),
            ..HashicorpConfig::new(need("KEYTURN_TEST_BAO_ADDR"))
        },
        HashicorpAuth::Token(keyturn::model::SecretValue::from_string(need(
            "KEYTURN_TEST_BAO_TOKEN",
        ))),
    )
    .await
    .unwrap()
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn a_follower_on_openbao_with_a_change_index_delivers_every_version() {
    let files = tempfile::tempdir().unwrap();
    let path = unique("e2e/follow/bao/");
    let index = unique("e2e/follow/index-");
    one_rotator_one_follower(&bao_table(&files, Some(&index)), &path);
    // The index the rotator keeps lists the credential (and no value).
    rt().block_on(async {
        let v = bao_vault("bao-reader").await;
        let listed = change_index::read(&v, &index)
            .await
            .unwrap()
            .expect("the change index exists");
        assert!(listed.contains_key(&path), "{listed:?}");
        assert_eq!(listed.len(), 1, "{listed:?}");
        v.check().await.unwrap();
    });
}

#[test]
fn a_follower_on_moto_with_a_change_index_delivers_every_version() {
    let path = unique("e2e/follow/aws/");
    let index = unique("e2e/follow/index-");
    one_rotator_one_follower(&aws_table(Some(&index)), &path);
    rt().block_on(async {
        let v = aws_vault().await;
        let listed = change_index::read(&v, &index)
            .await
            .unwrap()
            .expect("the change index exists");
        assert!(listed.contains_key(&path), "{listed:?}");
    });
}

#[test]
fn a_follower_on_the_azure_stub_without_an_index_delivers_every_version() {
    let files = tempfile::tempdir().unwrap();
    let path = unique("e2e-follow-azure-");
    one_rotator_one_follower(&azure_table(&files, None), &path);
}

/// The request load a follower puts on OpenBao, counted by a proxy in
/// front of it: with the change index one metadata read per poll (plus the
/// slow safety-net sweep), whatever the number of credentials; without it,
/// one per credential per poll.
#[test]
fn with_a_change_index_a_follower_of_many_credentials_reads_openbao_about_once_per_poll() {
    use common::proxy::{Flavor, Proxy};
    const N: usize = 20;
    let files = tempfile::tempdir().unwrap();
    let prefix = unique("e2e/follow/load-");
    let index = format!("{prefix}/index");
    let creds = |how: &str| -> String {
        (0..N)
            .map(|i| {
                format!(
                    r#"
[agents.{AGENT}.credentials.c{i}]
vault = "shared"
path = "{prefix}/c{i}"
generate = {{ kind = "password", length = 32 }}
{how}
deliver = [{{ type = "file", path = "{{root}}/{AGENT}/c{i}", format = "raw" }}]
"#
                )
            })
            .collect()
    };
    let rotator = Env::new(&format!(
        "{}\n{}{}",
        bao_table(&files, Some(&index)),
        agent_table(AGENT),
        creds("every = \"1h\"")
    ));
    let r = rotator.start();
    for i in 0..N {
        wait_version(&rotator, AGENT, &format!("c{i}"), 1);
    }
    // Count the requests of `poll = "1s"` followers over 5 s once every
    // credential arrived.
    let load = |with_index: bool| -> usize {
        let proxy = Proxy::start(&need("KEYTURN_TEST_BAO_ADDR"), Flavor::Bao);
        let token = secret_file(&files, "bao-token", &need("KEYTURN_TEST_BAO_TOKEN"));
        let table = format!(
            "[vaults.shared]\ntype = \"vault\"\naddress = \"{}\"\nmount = \"secret\"\ntoken_file = \"{}\"\ntimeout = \"5s\"\n{}",
            proxy.url(),
            token.display(),
            index_line(with_index.then_some(index.as_str()))
        );
        let follower = Env::new(&format!(
            "{table}\n{}{}",
            agent_table(AGENT),
            creds("mode = \"follow\"\npoll = \"1s\"")
        ));
        let f = follower.start();
        for i in 0..N {
            let want = std::fs::read(rotator.root().join(AGENT).join(format!("c{i}"))).unwrap();
            wait_for(Duration::from_secs(20), || {
                std::fs::read(follower.root().join(AGENT).join(format!("c{i}")))
                    .ok()
                    .filter(|got| *got == want)
            })
            .unwrap_or_else(|| panic!("c{i} never reached the follower:\n{}", f.log_text()));
        }
        let before = proxy.seen().len();
        std::thread::sleep(Duration::from_secs(5));
        let requests = proxy.seen().len() - before;
        f.stop();
        requests
    };
    let indexed = load(true);
    let per_credential = load(false);
    r.stop();
    eprintln!(
        "requests to OpenBao in 5 s, {N} followed credentials, poll = 1s: {indexed} with the change index, {per_credential} without"
    );
    // 5 polls: ~5 index reads, and the sweep at most one credential per
    // poll (one every 3 polls for 20).
    assert!(
        (3..=14).contains(&indexed),
        "{indexed} requests in 5 s with the index"
    );
    assert!(
        // 4 to 5 polls fit in 5 s at 1 s ±10 % (a poll of 20 reads takes
        // a little time too); 3 leaves room for a slow machine.
        per_credential >= 3 * N,
        "{per_credential} requests in 5 s without the index"
    );
    assert!(
        indexed * 5 < per_credential,
        "the index saves little: {indexed} vs {per_credential}"
    );
}

/// POSTs a webhook-shaped nudge signed with `key` to the follower; the status.
fn nudge(port: u16, key: &[u8], body: &[u8]) -> u16 {
    rt().block_on(async {
        let sig = keyturn::sinks::webhook::sign(key, chrono::Utc::now().timestamp(), body);
        reqwest::Client::builder()
            .no_proxy()
            .build()
            .unwrap()
            .post(format!("http://127.0.0.1:{port}/v1/follow/nudge"))
            .header("Content-Type", "application/json")
            .header(keyturn::sinks::webhook::SIGNATURE_HEADER, sig)
            .body(body.to_vec())
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    })
}

/// Follow nudges (issue 11's push with the poll as the safety net): the
/// rotator's plain `webhook` sink POSTs to the follower's
/// `/v1/follow/nudge`, and the follower, polling only every 60 s, has each
/// new version within 2 s of `rotate --wait`. A nudge signed with another
/// key is refused (401) and delivers nothing; the same nudge signed with
/// the right key then delivers at once (so the refusal, not a slow
/// follower, is what kept the file unchanged).
#[test]
fn a_nudged_follower_on_openbao_has_each_new_version_long_before_its_poll() {
    let files = tempfile::tempdir().unwrap();
    let path = unique("e2e/follow/nudge/");
    let index = unique("e2e/follow/index-");
    let table = bao_table(&files, Some(&index));
    let key = secret_file(
        &files,
        "nudge.key",
        "kt-test-nudge-key-0123456789abcdef0123456789",
    );
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}/v1/follow/nudge");
    let rotator = Env::new(&format!(
        "{table}\n{}\n[agents.{AGENT}.credentials.db]\nvault = \"shared\"\npath = \"{path}\"\ngenerate = {{ kind = \"password\", length = 32 }}\nevery = \"1h\"\ngrace = \"1h\"\ndeliver = [\n  {{ type = \"file\", path = \"{{root}}/{AGENT}/db.json\", format = \"json\" }},\n  {{ type = \"webhook\", url = \"{url}\", secret_file = \"{}\" }},\n]\n",
        agent_table(AGENT),
        key.display()
    ));
    let follower = Env::with_daemon(
        &format!(
            "{table}\n{}{}",
            agent_table(AGENT),
            credential(&path, "mode = \"follow\"\npoll = \"60s\"")
        ),
        &format!(
            "listen = \"127.0.0.1:{port}\"\nfollow_nudge_key_file = \"{}\"",
            key.display()
        ),
    );
    let r = rotator.start();
    wait_version(&rotator, AGENT, "db", 1);
    let f = follower.start();
    // The first poll (at start) delivers version 1.
    wait_for(Duration::from_secs(20), || {
        delivered(&follower).filter(|(_, v)| *v == 1)
    })
    .unwrap_or_else(|| panic!("the first poll delivered nothing:\n{}", f.log_text()));

    for round in 2..=3u64 {
        let out = rotator.cli(&["rotate", &format!("{AGENT}/db"), "--wait"]);
        assert!(out.status.success(), "rotate: {}", text(&out));
        let rotated = std::time::Instant::now();
        let (want, _) = delivered(&rotator).expect("the rotator's file");
        wait_for(Duration::from_secs(2), || {
            delivered(&follower).filter(|(v, _)| *v == want)
        })
        .unwrap_or_else(|| {
            panic!(
                "round {round}: not nudged within 2 s (poll = 60s); follower log:\n{}",
                f.log_text()
            )
        });
        eprintln!(
            "round {round}: the follower's file after {:?}",
            rotated.elapsed()
        );
    }
    assert_eq!(delivered(&follower).map(|(_, v)| v), Some(3));
    r.stop();

    // A new current version the index does not list (written straight
    // into OpenBao): only a nudge finds it before the poll.
    let canary = format!("kt-canary-nudge-{:016x}", rand::random::<u64>());
    rt().block_on(async {
        let v = bao_vault("bao-writer").await;
        let cred = keyturn::model::CredentialKey::new(
            keyturn::model::AgentId::new(AGENT).unwrap(),
            keyturn::model::CredentialId::new("db").unwrap(),
        );
        let item = keyturn::vaults::VaultItem {
            key: &cred,
            path: &path,
        };
        let rotation = keyturn::model::RotationId::generate();
        let value = keyturn::model::SecretValue::from_string(canary.clone());
        let staged = v.stage(item.pending(&rotation, &value)).await.unwrap();
        v.promote(item, &staged).await.unwrap();
    });
    let body = serde_json::to_vec(&serde_json::json!({
        "agent": AGENT, "credential": "db", "tenant": "acme", "version": 4,
        "rotation": "r", "rotated_at": "2026-12-03T00:00:00Z", "kind": "password",
    }))
    .unwrap();
    let wrong = b"kt-test-another-key-0123456789abcdef0123456789";
    assert_eq!(nudge(port, wrong, &body), 401, "a wrongly signed nudge");
    // Anyone who reaches the listener can send refused nudges: a few a
    // minute are logged one by one, not each (5,000 WARN lines in half a
    // second drowned the follower's real warnings).
    for _ in 0..100 {
        assert_eq!(nudge(port, wrong, &body), 401, "a wrongly signed nudge");
    }
    let logged = || {
        f.log_text()
            .lines()
            .filter(|l| l.contains("follow nudge refused"))
            .count()
    };
    assert_eq!(logged(), 10, "refused nudges logged:\n{}", f.log_text());
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        delivered(&follower).map(|(_, v)| v),
        Some(3),
        "a refused nudge delivered"
    );
    let right = std::fs::read(&key).unwrap();
    assert_eq!(nudge(port, &right, &body), 202, "a rightly signed nudge");
    let got = wait_for(Duration::from_secs(2), || {
        delivered(&follower).filter(|(v, _)| *v == canary)
    })
    .unwrap_or_else(|| panic!("the signed nudge delivered nothing:\n{}", f.log_text()));
    assert_eq!(got.1, 4);
    let log = f.stop();
    assert!(!log.contains(&canary), "the value in the follower's log");
    audit_verifies(&follower, "follower");
}

/// A nudge key the webhook sink would refuse (readable by others, too
/// short) stops the daemon at start with the setting named, instead of
/// answering every nudge with an error.
#[test]
fn a_follower_with_a_nudge_key_it_cannot_use_does_not_start() {
    for (content, mode, why) in [
        (
            "kt-test-nudge-key-0123456789abcdef0123456789",
            0o644,
            "chmod 600",
        ),
        ("kt-short-key", 0o600, "at least 32"),
    ] {
        let files = tempfile::tempdir().unwrap();
        let key = files.path().join("nudge.key");
        std::fs::write(&key, content).unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(mode)).unwrap();
        let env = Env::with_daemon(
            "",
            &format!(
                "listen = \"127.0.0.1:{}\"\nfollow_nudge_key_file = \"{}\"",
                free_port(),
                key.display()
            ),
        );
        let mut daemon = env.spawn(&[]);
        let status = daemon
            .wait_exit(Duration::from_secs(20))
            .expect("the daemon must refuse to start");
        let log = daemon.log_text();
        assert!(!status.success(), "{log}");
        assert!(log.contains("follow_nudge_key_file"), "{log}");
        assert!(log.contains(why), "{why}: {log}");
        assert!(!log.contains(content), "the key in the log: {log}");
    }
}

/// A follower whose OpenBao token is refused (HTTP 403: revoked, expired)
/// shows it: `status` gives the credential as `failed` with the vault's
/// error, and `/metrics` counts it in `keyturn_credentials{state="failed"}`
/// (the gauge the shipped `KeyturnRotationFailing` rule watches), where it
/// used to show `follow`, no error and `idle`. `/readyz` stays ready: the
/// daemon runs, and the vault problem is the credential's.
#[test]
fn a_follower_whose_openbao_token_is_refused_shows_failed_in_status_and_metrics() {
    let files = tempfile::tempdir().unwrap();
    let path = unique("e2e/follow/refused/");
    let index = unique("e2e/follow/index-");
    let rotator = Env::new(&format!(
        "{}\n{}{}",
        bao_table(&files, Some(&index)),
        agent_table(AGENT),
        credential(&path, "every = \"1h\"")
    ));
    let _r = rotator.start();
    wait_version(&rotator, AGENT, "db", 1);

    let bogus = files.path().join("refused-token");
    std::fs::write(&bogus, "kt-test-refused-token").unwrap();
    std::fs::set_permissions(&bogus, std::fs::Permissions::from_mode(0o600)).unwrap();
    let table = format!(
        "[vaults.shared]\ntype = \"vault\"\naddress = \"{}\"\nmount = \"secret\"\ntoken_file = \"{}\"\ntimeout = \"5s\"\n{}",
        need("KEYTURN_TEST_BAO_ADDR"),
        bogus.display(),
        index_line(Some(&index))
    );
    let port = free_port();
    let follower = Env::with_daemon(
        &format!(
            "{table}\n{}{}",
            agent_table(AGENT),
            credential(&path, "mode = \"follow\"\npoll = \"1s\"")
        ),
        &format!("listen = \"127.0.0.1:{port}\""),
    );
    let f = follower.start();
    let error = wait_last_error(&follower, AGENT, "db", "403");
    assert!(error.starts_with("follow: vault shared"), "{error}");
    assert!(!error.contains("kt-test-refused-token"), "{error}");
    let rows = status_json(&follower);
    assert_eq!(row(&rows, AGENT, "db")["state"], "failed", "{rows:?}");
    let table = text(&follower.cli_ok(&["status"]));
    assert!(table.contains("failed") && table.contains("403"), "{table}");
    let metrics = http_get(port, "/metrics");
    assert!(
        metrics.contains("keyturn_credentials{state=\"failed\"} 1"),
        "{metrics}"
    );
    assert!(http_get(port, "/readyz").contains("200 OK"), "not ready");
    assert!(delivered(&follower).is_none(), "{}", f.log_text());
}

/// Defect (black-box): a follower's file missing at its start while its
/// vault could not be read was never restored once the vault answered
/// again ("the next rotation delivers it": another host's, up to a period
/// away). The poll that finds the vault back restores it.
#[test]
fn a_followers_file_missing_while_its_vault_was_down_is_restored_when_it_is_back() {
    let (rotator_files, follower_files) =
        (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let path = unique("e2e/follow/restore/");
    let rotator = Env::new(&format!(
        "{}\n{}{}",
        bao_table(&rotator_files, None),
        agent_table(AGENT),
        credential(&path, "every = \"1h\"")
    ));
    let follower = Env::new(&format!(
        "{}\n{}{}",
        bao_table(&follower_files, None),
        agent_table(AGENT),
        credential(&path, "mode = \"follow\"\npoll = \"1s\"")
    ));
    let _r = rotator.start();
    wait_version(&rotator, AGENT, "db", 1);
    let f = follower.start();
    let first = wait_for(Duration::from_secs(20), || delivered(&follower))
        .expect("the follower delivers version 1");
    f.stop();
    // Down: its file gone (a reboot emptied /run) and its token refused.
    std::fs::remove_file(follower.root().join(AGENT).join("db.json")).unwrap();
    secret_file(&follower_files, "bao-token", "kt-test-refused-token");
    let f = follower.start();
    let _ = wait_last_error(&follower, AGENT, "db", "403");
    assert!(delivered(&follower).is_none(), "the vault cannot be read");
    // Back: the token file is read again after a 403.
    secret_file(
        &follower_files,
        "bao-token",
        &need("KEYTURN_TEST_BAO_TOKEN"),
    );
    let back = wait_for(Duration::from_secs(20), || delivered(&follower))
        .unwrap_or_else(|| panic!("restored once the vault is back: {}", f.log_text()));
    assert_eq!(back, first, "the same version and value");
    let restored = audit_records(&follower)
        .into_iter()
        .filter(|r| {
            r["event"] == "delivery" && r["detail"].as_str().is_some_and(|d| d.contains("restored"))
        })
        .count();
    assert_eq!(restored, 1, "audited as restored");
}

/// Black-box findings, with the read-only policy the README gives
/// followers (`read` on the credentials' `data/` and `metadata/` and the
/// index, nothing under `keyturn-pending/`): a follower never took back
/// what it delivered after its rotator's decommission (its check read the
/// pending slot: 403), and with that read allowed, a KV `delete` of the
/// current version (undone by `undelete`) made it remove the agent's file
/// and audit `follow.revoked` of a decommission that never happened. Now a
/// deleted current version is a failure (the file stays), `undelete`
/// brings it back, and the decommission is followed, all with that policy.
#[test]
fn a_read_only_follower_tells_a_deleted_current_version_from_a_decommission() {
    let files = tempfile::tempdir().unwrap();
    let path = unique("e2e/follow/ro/");
    let index = unique("e2e/follow/ro-index-");
    let rotator = Env::new(&format!(
        "{}\n{}{}",
        bao_table(&files, Some(&index)),
        agent_table(AGENT),
        credential(&path, "every = \"1h\"\ngrace = \"1h\"")
    ));
    let r = rotator.start();
    wait_version(&rotator, AGENT, "db", 1);

    // The follower's token: the README's read-only policy, nothing more.
    let policy_name = unique("kt-e2e-follower-");
    let policy = format!(
        "path \"secret/data/{path}\" {{ capabilities = [\"read\"] }}\n\
         path \"secret/metadata/{path}\" {{ capabilities = [\"read\"] }}\n\
         path \"secret/data/{index}\" {{ capabilities = [\"read\"] }}\n\
         path \"secret/metadata/{index}\" {{ capabilities = [\"read\"] }}\n"
    );
    let admin = bao_client();
    let token = rt().block_on(async {
        vaultrs::sys::policy::set(&admin, &policy_name, &policy)
            .await
            .unwrap();
        vaultrs::token::new(
            &admin,
            Some(
                vaultrs::api::token::requests::CreateTokenRequest::builder()
                    .policies(vec![policy_name.clone()])
                    .no_default_policy(true)
                    .ttl("10m"),
            ),
        )
        .await
        .unwrap()
        .client_token
    });
    let token_file = secret_file(&files, "follower-token", &token);
    let follower = Env::new(&format!(
        "[vaults.shared]\ntype = \"vault\"\naddress = \"{}\"\nmount = \"secret\"\ntoken_file = \"{}\"\ntimeout = \"5s\"\n{}\n{}{}",
        need("KEYTURN_TEST_BAO_ADDR"),
        token_file.display(),
        index_line(None),
        agent_table(AGENT),
        credential(&path, "mode = \"follow\"\npoll = \"1s\"")
    ));
    // `check --online` accepts the token the README describes (black-box
    // finding: it failed on `auth/token/lookup-self`, which a token
    // without the `default` policy may not call).
    let checked = follower.cli(&["check", "--online"]);
    assert!(checked.status.success(), "{checked:?}");
    let f = follower.start();
    let (value, _) = wait_for(Duration::from_secs(20), || delivered(&follower))
        .unwrap_or_else(|| panic!("never delivered: {}", f.log_text()));

    // A soft delete of the current version: a failure, the file kept. (Its
    // metadata's current version stays: the restarted follower's first
    // poll is what reads the path again.)
    rt().block_on(vaultrs::kv2::delete_latest(&admin, "secret", &path))
        .unwrap();
    f.stop();
    let f = follower.start();
    let error = wait_for(Duration::from_secs(30), || {
        let rows = status_json(&follower);
        row(&rows, AGENT, "db")["last_error"]
            .as_str()
            .filter(|e| e.contains("not a decommission"))
            .map(str::to_owned)
    })
    .unwrap_or_else(|| {
        panic!(
            "no failure shown: {:?}\n{}",
            status_json(&follower),
            f.log_text()
        )
    });
    assert!(error.contains("undelete"), "{error}");
    assert_eq!(delivered(&follower).map(|(v, _)| v), Some(value.clone()));
    let revoked = |env: &Env| {
        audit_records(env)
            .iter()
            .filter(|r| r["event"] == "follow.revoked")
            .count()
    };
    assert_eq!(revoked(&follower), 0, "{}", f.log_text());

    // `undelete` brings it back as it was.
    let meta = rt()
        .block_on(vaultrs::kv2::read_metadata(&admin, "secret", &path))
        .unwrap();
    rt().block_on(vaultrs::kv2::undelete_versions(
        &admin,
        "secret",
        &path,
        vec![meta.current_version],
    ))
    .unwrap();
    wait_for(Duration::from_secs(20), || {
        let rows = status_json(&follower);
        (row(&rows, AGENT, "db")["state"] == "follow").then_some(())
    })
    .unwrap_or_else(|| panic!("not following again: {:?}", status_json(&follower)));
    assert_eq!(delivered(&follower).map(|(v, _)| v), Some(value));

    // The rotator's decommission is followed: the file is taken back.
    let out = rotator.cli(&["decommission", AGENT, "--reason", "e2e", "--wait"]);
    assert!(out.status.success(), "{}", text(&out));
    wait_for(Duration::from_secs(30), || {
        (revoked(&follower) == 1 && delivered(&follower).is_none()).then_some(())
    })
    .unwrap_or_else(|| panic!("not revoked on the follower: {}", f.log_text()));
    f.stop();
    r.stop();
    rt().block_on(vaultrs::sys::policy::delete(&admin, &policy_name))
        .unwrap();
}

/// Black-box finding: a follower of a credential kept in two vaults that
/// took over as its rotator (the rotator's host died mid-grace) retired
/// the previous version that rotator left in the primary vault only: the
/// other vault kept it readable (AWS `AWSPREVIOUS`) until the next
/// rotation here, up to a period later. It is retired in every vault.
#[test]
fn a_follower_taking_over_a_credential_in_two_vaults_retires_the_left_version_in_both() {
    use keyturn::model::Stage;
    use keyturn::vaults::{Select, VaultItem};
    let files = tempfile::tempdir().unwrap();
    let path = unique("takeover-");
    let tables = format!(
        "{}\n{}",
        bao_table(&files, None),
        aws_table(None).replace("[vaults.shared]", "[vaults.mirror]")
    );
    let config = |how: &str| {
        format!(
            "{tables}\n{}{}",
            agent_table(AGENT),
            credential(&path, how)
                .replace("vault = \"shared\"", "vault = [\"shared\", \"mirror\"]")
        )
    };
    let rotator = Env::new(&config("every = \"1h\"\ngrace = \"1h\""));
    let follower = Env::new(&config("mode = \"follow\"\npoll = \"1s\""));
    let r = rotator.start();
    wait_version(&rotator, AGENT, "db", 1);
    let f = follower.start();
    let out = rotator.cli(&["rotate", &format!("{AGENT}/db"), "--wait"]);
    assert!(out.status.success(), "rotate: {}", text(&out));
    let (current, _) = delivered(&rotator).unwrap();
    wait_for(Duration::from_secs(20), || {
        delivered(&follower).filter(|(v, _)| *v == current)
    })
    .unwrap_or_else(|| panic!("not followed: {}", f.log_text()));
    // The rotator's host dies mid-grace; the follower rotates it now.
    r.kill9();
    let key = bot_key("db");
    let previous_in = |vault: &dyn Vault| {
        rt().block_on(vault.read(
            VaultItem {
                key: &key,
                path: &path,
            },
            Select::Stage(Stage::Previous),
        ))
        .unwrap()
        .map(|v| v.version)
    };
    let (bao, aws) = (
        rt().block_on(bao_vault("shared")),
        rt().block_on(aws_vault()),
    );
    assert!(previous_in(&bao).is_some() && previous_in(&aws).is_some());
    follower.write_credentials(&config("every = \"1h\"\ngrace = \"3s\""));
    f.reload();
    wait_for(Duration::from_secs(30), || {
        (previous_in(&bao).is_none() && previous_in(&aws).is_none()).then_some(())
    })
    .unwrap_or_else(|| {
        panic!(
            "the left version is still readable: bao {:?}, aws {:?}\n{}",
            previous_in(&bao),
            previous_in(&aws),
            f.log_text()
        )
    });
    assert_eq!(delivered(&follower).map(|(v, _)| v), Some(current));
    let takeover = audit_records(&follower)
        .into_iter()
        .find(|r| r["event"] == "rotation.takeover")
        .expect("a takeover record");
    assert!(
        takeover["detail"]
            .as_str()
            .unwrap()
            .contains("shared, mirror"),
        "{takeover}"
    );
    f.stop();
}
