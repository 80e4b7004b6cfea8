//! For every failpoint: the daemon is killed there (SIGKILL from inside, like
//! `kill -9`), restarted, and the rotation completes with exactly one new
//! version, the delivered file valid, and the audit chain intact.
//! Built only with `--features failpoints`.

mod common;

use std::time::Duration;

use common::*;
use keyturn::model::{AgentId, CredentialId, CredentialKey, Stage};
use keyturn::rotation::FAILPOINTS;
use keyturn::state::{SqliteStore, StateStore};
use keyturn::vaults::{Select, VersionRef};

/// The credential is kept in two vaults (the Env's `local` and `mirror`), so
/// every failpoint also checks that the vaults never disagree. Its target is
/// a hook that reads the value and succeeds: with no target at all the engine
/// skips `set` and `test`, and their failpoints would never be reached.
const CONFIG: &str = r#"
[vaults.mirror]
type = "local"

[agents.bot]
owner = "alice@example.com"
tenant = "acme"
tier = "high"

[agents.bot.credentials.db]
vault = ["local", "mirror"]
generate = { kind = "password", length = 32 }
every = "1h"
grace = "0s"
target = { type = "command", program = "/bin/sh", args = ["-c", "cat >/dev/null"] }
deliver = [{ type = "file", path = "{root}/bot/db.json", format = "json" }]
"#;

fn key() -> CredentialKey {
    CredentialKey::new(
        AgentId::new("bot").unwrap(),
        CredentialId::new("db").unwrap(),
    )
}

/// Waits until bot/db is at `version`, idle (its previous version retired).
fn wait_settled(env: &Env, version: u64) {
    wait_for(Duration::from_secs(30), || {
        let rows = status_json(env);
        let r = &rows[0];
        (r["version"].as_u64() == Some(version) && r["state"] == "idle").then_some(())
    })
    .unwrap_or_else(|| panic!("never settled at version {version}: {:?}", status_json(env)));
}

fn check_one(failpoint: &str) {
    let env = Env::new(CONFIG);
    let first = env.start();
    wait_settled(&env, 1);
    first.stop();

    // Second run: the failpoint kills the daemon during the manual rotation.
    let mut doomed = env.start_with(&[("FAILPOINTS", &format!("{failpoint}=return"))]);
    let out = env.cli(&["rotate", "bot/db", "--wait"]);
    if !failpoint.contains("retire") {
        // Retiring the previous version happens after delivery (after grace),
        // so only for the retire failpoints may `rotate --wait` have succeeded.
        assert_ne!(
            out.status.code(),
            Some(0),
            "{failpoint}: the rotation cannot have succeeded"
        );
    }
    let status = doomed.wait_exit(Duration::from_secs(30));
    assert!(
        status.is_some(),
        "{failpoint}: the daemon was not killed; log:\n{}",
        doomed.log_text()
    );
    let killed_log = doomed.log_text();
    assert!(
        killed_log.contains(failpoint),
        "{failpoint}: not reached; log:\n{killed_log}"
    );

    // Third run: resumes and completes.
    let again = env.start();
    wait_settled(&env, 2);
    again.stop();

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut currents = Vec::new();
    for vault in ["local", "mirror"] {
        let (current_ref, current) = rt
            .block_on(local_vault_value(
                &env,
                vault,
                &key(),
                Select::Stage(Stage::Current),
            ))
            .unwrap_or_else(|| panic!("{failpoint}: no current version in vault {vault}"));
        assert_eq!(
            current_ref, "2",
            "{failpoint}: exactly one new version in vault {vault}"
        );
        assert!(
            rt.block_on(local_vault_value(
                &env,
                vault,
                &key(),
                Select::Version(&VersionRef("3".into()))
            ))
            .is_none(),
            "{failpoint}: a duplicate version was created in vault {vault}"
        );
        currents.push(current);
    }
    assert_eq!(
        currents[0], currents[1],
        "{failpoint}: the vaults disagree about the current value"
    );
    let current = currents.swap_remove(0);
    let state = SqliteStore::open_read_only(&env.state_dir().join("state.db")).unwrap();
    let versions: Vec<(u64, Stage)> = state
        .versions(&key())
        .unwrap()
        .into_iter()
        .map(|v| (v.version, v.stage))
        .collect();
    assert_eq!(
        versions,
        vec![(1, Stage::Retired), (2, Stage::Current)],
        "{failpoint}"
    );

    let delivered: serde_json::Value =
        serde_json::from_slice(&std::fs::read(env.root().join("bot/db.json")).unwrap()).unwrap();
    assert_eq!(delivered["version"], 2, "{failpoint}");
    assert_eq!(
        delivered["value"].as_str().unwrap().as_bytes(),
        current.as_slice(),
        "{failpoint}: file holds the vault's value"
    );

    let verify = env.cli(&["audit", "verify"]);
    assert!(
        verify.status.success(),
        "{failpoint}: {}",
        String::from_utf8_lossy(&verify.stderr)
    );
    // A temp file of the killed process holds a full secret: gone.
    let temps: Vec<_> = read_tree(&env.root())
        .into_iter()
        .map(|(p, _)| p)
        .filter(|p| p.to_string_lossy().contains(".tmp."))
        .collect();
    assert!(temps.is_empty(), "{failpoint}: temp files left: {temps:?}");
}

#[test]
fn every_failpoint_is_survived() {
    for fp in FAILPOINTS {
        check_one(fp);
    }
}

/// SIGTERM while a step is in flight: the step finishes and is persisted, the
/// daemon exits 0 within the drain timeout, and the next start resumes the
/// rotation at the following step.
#[test]
fn sigterm_drains_the_in_flight_step_and_the_rotation_resumes() {
    let env = Env::new(CONFIG);
    let first = env.start();
    wait_settled(&env, 1);
    first.stop();

    // Make `create` take 1.5 s after its effect, then ask for a rotation.
    let mut slow = env.start_with(&[("FAILPOINTS", "rotation.after_create=sleep(1500)")]);
    let client = {
        let config = env.config.clone();
        std::thread::spawn(move || {
            std::process::Command::new(bin())
                .args(["rotate", "bot/db", "--wait", "--config"])
                .arg(&config)
                .output()
                .unwrap()
        })
    };
    std::thread::sleep(Duration::from_millis(600));
    slow.signal(libc::SIGTERM);
    let started = std::time::Instant::now();
    let status = slow
        .wait_exit(Duration::from_secs(15))
        .expect("exits after draining");
    assert!(status.success(), "exit 0 after draining: {status}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "within drain_timeout"
    );
    let out = client.join().unwrap();
    assert_eq!(
        out.status.code(),
        Some(1),
        "the waiting client is told the rotation did not finish"
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("stopping"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );

    // The drained step was recorded: the rotation is parked after `create`.
    let state = SqliteStore::open_read_only(&env.state_dir().join("state.db")).unwrap();
    let latest = state
        .latest_rotation(&key())
        .unwrap()
        .expect("a rotation was started");
    assert_eq!(
        latest.step,
        keyturn::rotation::Step::Set,
        "create finished and was persisted before exit"
    );
    drop(state);

    let again = env.start();
    wait_settled(&env, 2);
    again.stop();
    let state = SqliteStore::open_read_only(&env.state_dir().join("state.db")).unwrap();
    let done = state.latest_rotation(&key()).unwrap().unwrap();
    assert_eq!(
        done.id, latest.id,
        "the same rotation resumed, not a new one"
    );
    assert!(env.cli(&["audit", "verify"]).status.success());
}
