//! Rotation health against a real vault (issue 12): a rotation parked
//! before promote whose staged value is deleted out of band in OpenBao is
//! abandoned (audited) rather than retried forever, and a fresh rotation
//! succeeds once the target works again. Run by the real `keyturn` binary;
//! OpenBao is read and written with a plain client, not keyturn's code.
//!
//! REAL SERVERS: needs `bash scripts/services.sh start` and its env file
//! sourced (`bash scripts/test.sh` does both). A missing variable fails the
//! test; it never skips.

mod common;

use std::time::Duration;

use common::*;
use keyturn::model::RotationId;
use serde_json::{Map, Value};
use vaultrs::client::VaultClient;

/// The latest KV v2 version of `path`, `None` when absent or deleted.
async fn bao_latest(c: &VaultClient, path: &str) -> Option<Map<String, Value>> {
    match vaultrs::kv2::read::<Map<String, Value>>(c, "secret", path).await {
        Ok(m) => Some(m),
        Err(vaultrs::error::ClientError::APIError { code: 404, .. }) => None,
        Err(vaultrs::error::ClientError::RestClientError {
            source: rustify::errors::ClientError::ServerResponseError { code: 404, .. },
        }) => None,
        Err(e) => panic!("bao read {path}: {e}"),
    }
}

fn row_of(env: &Env) -> Value {
    row(&status_json(env), "bot", "db").clone()
}

fn abandoned_records(env: &Env) -> Vec<Value> {
    audit_records(env)
        .into_iter()
        .filter(|r| r["event"] == "rotation.abandoned")
        .collect()
}

#[test]
fn a_staged_value_deleted_in_openbao_while_parked_is_abandoned_and_a_fresh_rotation_succeeds() {
    let path = format!("keyturn-health/{}/db", RotationId::generate());
    let pending = format!("keyturn-pending/{path}");
    let config = format!(
        r#"
{bao}
{agent}
[agents.bot.credentials.db]
vault = "bao"
path = "{path}"
generate = {{ kind = "password", length = 32 }}
every = "1h"
grace = "1m"
# The target accepts a value only while {{dir}}/target-up exists.
target = {{ type = "command", program = "/bin/sh", args = ["-c", "cat >/dev/null; test -e {{dir}}/target-up"] }}
deliver = [{{ type = "file", path = "{{root}}/bot/db.json", format = "json" }}]
"#,
        bao = bao_table(&need("KEYTURN_TEST_BAO_ADDR")),
        agent = agent_table("bot"),
    );
    let env = Env::new(&config);
    write_bao_token(&env);
    let up = env.path().join("target-up");
    std::fs::write(&up, b"").unwrap();
    let bao = bao_client();

    let daemon = env.start();
    wait_version(&env, "bot", "db", 1);
    let first = delivered_json(&env, "bot/db.json");

    // The target goes down: the rotation stages version 2 and parks at set
    // (the scheduler keeps retrying it, each retry failing at set).
    std::fs::remove_file(&up).unwrap();
    let out = env.cli(&["rotate", "bot/db", "--wait"]);
    assert!(!out.status.success(), "the target is down");
    let parked = row_of(&env);
    assert_eq!(parked["step"], "set", "{parked}");
    let stuck = parked["rotation"]
        .as_str()
        .expect("a parked rotation")
        .to_owned();
    let slot = block_on(bao_latest(&bao, &pending)).expect("the staged value is in bao");
    assert_eq!(slot["keyturn_rotation"], stuck.as_str(), "{slot:?}");

    // Someone deletes the staged value in OpenBao, all its versions.
    block_on(vaultrs::kv2::delete_metadata(&bao, "secret", &pending)).unwrap();

    // The next retry finds it gone: the rotation is abandoned, once, and a
    // fresh one (new id) begins and parks at set while the target is down.
    let record = wait_for(Duration::from_secs(30), || {
        abandoned_records(&env).into_iter().next()
    })
    .unwrap_or_else(|| panic!("no rotation.abandoned record; log:\n{}", daemon.log_text()));
    assert_eq!(record["rotation"], stuck.as_str(), "{record}");
    assert_eq!(record["detail"], "step=set", "{record}");
    assert!(
        record["error"]
            .as_str()
            .unwrap_or("")
            .contains("is gone from the vault"),
        "{record}"
    );
    let fresh = wait_for(Duration::from_secs(30), || {
        row_of(&env)["rotation"]
            .as_str()
            .filter(|r| *r != stuck)
            .map(str::to_owned)
    })
    .unwrap_or_else(|| panic!("no fresh rotation: {}", row_of(&env)));

    // The target comes back: the fresh rotation completes, as version 4
    // (version 3 would have the current one's parity: under
    // `alternating_users` it would take the current value's role).
    std::fs::write(&up, b"").unwrap();
    let out = env.cli(&["rotate", "bot/db", "--wait"]);
    assert!(
        out.status.success(),
        "rotate: {}\nlog:\n{}",
        String::from_utf8_lossy(&out.stderr),
        daemon.log_text()
    );
    wait_settled(&env, 4, &["idle", "retiring"]);
    let delivered = delivered_json(&env, "bot/db.json");
    assert_eq!(delivered["version"], 4);
    assert_ne!(delivered["value"], first["value"], "a new value");
    let current = block_on(bao_latest(&bao, &path)).expect("a current version in bao");
    assert_eq!(
        current["value"], delivered["value"],
        "bao serves what was delivered"
    );
    assert_eq!(current["keyturn_rotation"], fresh.as_str());
    assert_eq!(abandoned_records(&env).len(), 1, "abandoned once");
    let row = row_of(&env);
    assert!(row["last_error"].is_null(), "{row}");
    let log = daemon.stop();
    assert!(
        log.contains(&format!("step set: rotation {stuck} abandoned")),
        "{log}"
    );
    audit_verifies(&env, "after the abandoned rotation");
}
