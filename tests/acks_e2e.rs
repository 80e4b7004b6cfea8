//! End-to-end tests of acknowledgements with the real binary: `keyturn ack`
//! on the agents' socket (root, the agent's uid, and a refused other uid),
//! and a file sink with `ack = "open"` acknowledged by a reader opening it.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::*;
use keyturn::model::Stage;

/// The agent's uid in these tests; another uid is refused.
const AGENT_UID: u32 = 65533;
const OTHER_UID: u32 = 65534;

fn credential(ack: &str) -> String {
    format!(
        r#"[agents.bot]
owner = "alice@example.com"
tenant = "acme"
tier = "high"
uid = {AGENT_UID}

[agents.bot.credentials.db]
vault = "local"
generate = {{ kind = "password", length = 32 }}
every = "24h"
grace = "1h"
deliver = [{{ type = "file", path = "{{root}}/bot/db", ack = "{ack}" }}]
"#
    )
}

/// An env whose directory others may traverse (not list), so that a CLI
/// run as another uid reaches the config and the agents' socket.
fn env(ack: &str) -> Env {
    let env = Env::with_daemon(&credential(ack), "agent_socket = \"{dir}/run/agent.sock\"");
    std::fs::set_permissions(env.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
    std::fs::set_permissions(&env.config, std::fs::Permissions::from_mode(0o644)).unwrap();
    env
}

/// `keyturn ack bot/db VERSION` run as `uid` (`None`: this test's own).
fn ack_as(env: &Env, uid: Option<u32>, version: u64) -> Output {
    let mut cmd = Command::new(bin());
    cmd.args(["ack", "bot/db", &version.to_string(), "--config"])
        .arg(&env.config)
        .env_remove("KEYTURN_CONFIG")
        .env_remove("KEYTURN_AGENT_SOCKET")
        .stdin(Stdio::null());
    if let Some(uid) = uid {
        cmd.uid(uid).gid(uid);
    }
    cmd.output().expect("run keyturn ack")
}

fn text(out: &Output) -> String {
    format!(
        "exit {:?}\nstdout: {}\nstderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn stage_of(env: &Env, version: u64) -> Option<Stage> {
    stages(env, &bot_key("db"))
        .into_iter()
        .find(|(v, _)| *v == version)
        .map(|(_, s)| s)
}

fn awaiting(env: &Env) -> Vec<String> {
    let rows = status_json(env);
    row(&rows, "bot", "db")["awaiting_ack"]
        .as_array()
        .map(|a| a.iter().map(|v| v.as_str().unwrap().to_owned()).collect())
        .unwrap_or_default()
}

/// Checks that version 1 still awaits the ack (it stays `previous`), then
/// acks version 2 as the agent's own uid, which must succeed.
fn agent_acks_version_2(env: &Env) -> Output {
    assert_eq!(
        stage_of(env, 1),
        Some(Stage::Previous),
        "still awaits the ack"
    );
    let out = ack_as(env, Some(AGENT_UID), 2);
    assert!(out.status.success(), "{}", text(&out));
    out
}

fn wait_retired(env: &Env, version: u64) {
    wait_for(Duration::from_secs(10), || {
        (stage_of(env, version) == Some(Stage::Retired)).then_some(())
    })
    .unwrap_or_else(|| {
        panic!(
            "version {version} was not retired: {:?}",
            stages(env, &bot_key("db"))
        )
    });
}

#[test]
fn keyturn_ack_retires_the_previous_version_and_refuses_other_uids() {
    assert_eq!(
        nix::unistd::geteuid().as_raw(),
        0,
        "runs as root (CI does): it spawns the CLI as other uids"
    );
    let env = env("explicit");
    let daemon = env.start();
    wait_version(&env, "bot", "db", 1);
    let path = env.root().join("bot/db");
    assert_eq!(
        awaiting(&env),
        vec![format!("file:{} (ack=explicit)", path.display())]
    );
    // Root acks version 1 (nothing to retire before it).
    let out = ack_as(&env, None, 1);
    assert!(out.status.success(), "{}", text(&out));

    env.cli_ok(&["rotate", "bot/db", "--wait"]);
    wait_version(&env, "bot", "db", 2);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(stage_of(&env, 1), Some(Stage::Previous), "awaits the ack");

    // Another uid is refused, and the refusal is audited with its uid.
    let out = ack_as(&env, Some(OTHER_UID), 2);
    assert_eq!(out.status.code(), Some(77), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("may not acknowledge"),
        "{}",
        text(&out)
    );
    let refused = audit_records(&env)
        .into_iter()
        .find(|r| r["event"] == "ack.refused")
        .expect("an ack.refused record");
    assert_eq!(refused["actor"]["uid"], OTHER_UID, "{refused}");
    assert_eq!(refused["credential"], "db", "{refused}");
    // A stale version is a clear error.
    let out = ack_as(&env, Some(AGENT_UID), 1);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("version 1 is not the one awaiting"),
        "{}",
        text(&out)
    );
    // ... and audited, with the agent's uid and why (black-box finding: a
    // failed ack left no trace but the agent's own logs).
    let stale = audit_records(&env)
        .into_iter()
        .find(|r| r["event"] == "ack.refused" && r["actor"]["uid"] == AGENT_UID)
        .expect("the stale ack is audited");
    assert_eq!(
        (stale["version"].as_u64(), &stale["outcome"]),
        (Some(1), &serde_json::json!("refused")),
        "{stale}"
    );
    assert!(
        stale["error"]
            .as_str()
            .unwrap()
            .contains("version 1 is not the one awaiting"),
        "{stale}"
    );
    std::thread::sleep(Duration::from_millis(300));
    // The agent's own uid acks: the previous version goes right after.
    let out = agent_acks_version_2(&env);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("acknowledged"),
        "{}",
        text(&out)
    );
    wait_retired(&env, 1);
    assert!(awaiting(&env).is_empty());
    let acks: Vec<_> = audit_records(&env)
        .into_iter()
        .filter(|r| r["event"] == "delivery.ack" && r["version"] == 2)
        .collect();
    assert_eq!(acks.len(), 1, "{acks:?}");
    assert_eq!(acks[0]["actor"]["uid"], AGENT_UID, "{:?}", acks[0]);
    daemon.stop();
    audit_verifies(&env, "after acks");
}

/// Defect: a `keyturn rotate` accepted while the rotation waited for
/// version 2's ack ("started", audited, status `rotating:create`) was
/// dropped by a clean restart: no version 3 ever came. And with the daemon
/// down, `status` listed the awaited consumer as a holdout "retired at the
/// grace deadline without their ack" while that deadline was still ahead.
/// Now the request is stored while it waits and resumed by the restart
/// (waiting again for the ack), and offline status says "awaiting ack".
#[test]
fn a_rotate_waiting_for_an_ack_survives_a_restart_and_offline_status_says_awaiting() {
    let env = env("explicit");
    let daemon = env.start();
    wait_version(&env, "bot", "db", 1);
    let out = ack_as(&env, None, 1);
    assert!(out.status.success(), "{}", text(&out));
    env.cli_ok(&["rotate", "bot/db", "--wait"]);
    wait_version(&env, "bot", "db", 2);
    let consumer = format!("file:{}", env.root().join("bot/db").display());
    assert_eq!(awaiting(&env), vec![format!("{consumer} (ack=explicit)")]);

    // Version 3 is asked for: it waits for version 2's ack (grace 1h).
    let out = env.cli_ok(&["rotate", "bot/db"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("started"),
        "{}",
        text(&out)
    );
    let waiting = |env: &Env| {
        let rows = status_json(env);
        let r = row(&rows, "bot", "db");
        (r["state"] == "rotating" && r["step"] == "awaiting_ack").then_some(())
    };
    wait_for(Duration::from_secs(10), || waiting(&env)).expect("the rotation waits for the ack");
    let online = row(&status_json(&env), "bot", "db").clone();
    daemon.stop();

    // Offline: version 2's consumer is still awaited, not a holdout.
    let rows = status_json(&env);
    let r = row(&rows, "bot", "db");
    // And the credential is shown as the daemon showed it: the requested
    // rotation waiting for the acks, not the retirement it waits on; but
    // `requested`, not `rotating`, with no daemon (black-box finding).
    for field in ["step", "rotation", "version", "stage"] {
        assert_eq!(
            r[field], online[field],
            "{field}: offline {r} online {online}"
        );
    }
    assert_eq!(r["state"], "requested", "{r}");
    assert_eq!(r["awaiting_ack"], serde_json::json!([consumer]), "{r}");
    assert!(
        r.get("holdouts")
            .is_none_or(|h| h == &serde_json::json!([])),
        "{r}"
    );
    let table = String::from_utf8_lossy(&env.cli(&["status"]).stdout).into_owned();
    assert!(!table.contains("holdouts"), "{table}");
    assert!(table.contains("awaiting ack"), "{table}");
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("bot") && l.contains("requested:awaiting_ack")),
        "{table}"
    );

    // Restarted: the request waits again, then rotates right after the ack.
    let daemon = env.start();
    wait_for(Duration::from_secs(10), || waiting(&env))
        .expect("after the restart the requested rotation waits again");
    agent_acks_version_2(&env);
    wait_version(&env, "bot", "db", 3);
    let start = audit_records(&env)
        .into_iter()
        .find(|r| r["event"] == "rotation.start" && r["version"] == 3)
        .expect("version 3 started");
    assert_eq!(start["detail"], "trigger=manual", "{start}");
    daemon.stop();
    audit_verifies(&env, "after the resumed request");
}

/// Every refused ack used to be an fsynced audit record, so any local user
/// could fill the state volume by asking to be refused. Now a uid's
/// refusals are audited at most 10 a minute per event (the rest are
/// counted and summarized once the minute ends), and still refused.
#[test]
fn a_flood_of_refused_acks_is_audited_only_a_few_times() {
    let env = env("explicit");
    let daemon = env.start();
    wait_version(&env, "bot", "db", 1);
    for _ in 0..25 {
        let out = ack_as(&env, Some(OTHER_UID), 1);
        assert_eq!(out.status.code(), Some(77), "{}", text(&out));
    }
    let refused: Vec<_> = audit_records(&env)
        .into_iter()
        .filter(|r| r["event"] == "ack.refused")
        .collect();
    assert_eq!(refused.len(), 10, "{refused:?}");
    assert!(refused.iter().all(|r| r["actor"]["uid"] == OTHER_UID));
    daemon.stop();
    // Defect (black-box): a stop before the minute ended lost the summary
    // of the other 15; it is written at the stop.
    let records = audit_records(&env);
    let summary = records
        .iter()
        .filter(|r| r["event"] == "ack.refused")
        .find_map(|r| r["detail"].as_str().filter(|d| d.contains("more refusals")))
        .unwrap_or_else(|| panic!("no summary before daemon.stop: {records:?}"));
    assert!(
        summary.starts_with(&format!(
            "and 15 more refusals from uid {OTHER_UID} in the last "
        )),
        "{summary}"
    );
    let at = |event: &str| records.iter().position(|r| r["event"] == event).unwrap();
    assert!(
        records
            .iter()
            .rposition(|r| r["detail"]
                .as_str()
                .is_some_and(|d| d.contains("more refusals")))
            .unwrap()
            < at("daemon.stop")
    );
    audit_verifies(&env, "after refused acks");
}

/// Any local user can connect to the 0666 agents' socket. Idle connections
/// used to be accepted without bound until the daemon ran out of
/// descriptors, and then neither socket accepted (`keyturn status` got no
/// answer). Now the agents' socket holds at most an eighth of the open
/// files limit (a quarter of that per uid), closing a uid's oldest idle
/// connection for its new one: the control socket and other agents' acks
/// keep working while one uid floods it.
#[test]
fn a_flood_of_agent_socket_connections_leaves_both_sockets_serving() {
    let env = env("explicit");
    let daemon = env.spawn_command(&[], |cmd| {
        limit_open_files(cmd, 256, 256);
    });
    daemon.wait_ready();
    wait_version(&env, "bot", "db", 1);
    let socket = env.path().join("run/agent.sock");
    // More idle connections than the daemon has descriptors; each connect
    // is bounded so that a daemon that stopped accepting fails the test
    // below instead of hanging it here.
    let idle = block_on(async {
        let mut idle = Vec::new();
        for _ in 0..600 {
            let connect = tokio::net::UnixStream::connect(&socket);
            if let Ok(Ok(s)) = tokio::time::timeout(Duration::from_millis(50), connect).await {
                idle.push(s);
            }
        }
        idle
    });
    std::thread::sleep(Duration::from_millis(500));
    let fds = std::fs::read_dir(format!("/proc/{}/fd", daemon.pid()))
        .unwrap()
        .count();
    assert!(fds < 200, "the daemon holds {fds} descriptors");
    let started = std::time::Instant::now();
    env.cli_ok(&["status"]);
    assert!(started.elapsed() < Duration::from_secs(5));
    // Another uid's ack over the flooded agents' socket is served.
    let out = ack_as(&env, Some(AGENT_UID), 1);
    assert!(out.status.success(), "{}", text(&out));
    // So is this uid's: its own oldest idle connection makes room.
    let out = ack_as(&env, None, 1);
    assert!(out.status.success(), "{}", text(&out));
    drop(idle);
    daemon.stop();
}

/// With `ack = "open"`: waits for version 1, reads its file, and waits
/// until that read acknowledged it. Returns the file's path.
fn version_1_acked_by_opening(env: &Env) -> std::path::PathBuf {
    wait_version(env, "bot", "db", 1);
    let path = env.root().join("bot/db");
    std::fs::read(&path).unwrap();
    wait_for(Duration::from_secs(10), || {
        awaiting(env).is_empty().then_some(())
    })
    .unwrap_or_else(|| panic!("reading version 1 acks it: {:?}", status_json(env)));
    path
}

/// Black-box finding: a reload that changed an `ack = "open"` sink (its
/// mode) recorded an ack of the awaited version that nobody gave: the
/// watch saw keyturn's own open of the file as it delivered it again.
/// The delivery a reload makes replaces the watch; only a reader's open
/// after it counts.
#[test]
fn a_reload_that_changes_an_open_ack_sink_acknowledges_nothing() {
    let env = env("open");
    let daemon = env.start();
    let path = version_1_acked_by_opening(&env);
    env.cli_ok(&["rotate", "bot/db", "--wait"]);
    let awaited = vec![format!("file:{} (ack=open)", path.display())];
    assert_eq!(awaiting(&env), awaited);

    for mode in ["0440", "0400"] {
        let text = std::fs::read_to_string(&env.config).unwrap();
        let text = text
            .replace(
                "ack = \"open\" }",
                &format!("ack = \"open\", mode = \"{mode}\" }}"),
            )
            .replace("mode = \"0440\" }", &format!("mode = \"{mode}\" }}"));
        std::fs::write(&env.config, text).unwrap();
        daemon.reload();
        wait_for(Duration::from_secs(10), || {
            use std::os::unix::fs::PermissionsExt;
            let m = std::fs::metadata(&path).ok()?.permissions().mode() & 0o777;
            (format!("0{m:o}") == mode).then_some(())
        })
        .unwrap_or_else(|| panic!("not delivered again with mode {mode}"));
        std::thread::sleep(Duration::from_millis(500));
        assert_eq!(awaiting(&env), awaited, "keyturn's own delivery is no ack");
        assert_eq!(stage_of(&env, 1), Some(Stage::Previous));
    }
    assert!(
        !audit_records(&env)
            .iter()
            .any(|r| r["event"] == "delivery.ack" && r["version"] == 2),
        "no ack recorded"
    );
    // A reader's open after the delivery counts, as before.
    std::fs::read(&path).unwrap();
    wait_retired(&env, 1);
    assert!(awaiting(&env).is_empty());
    daemon.stop();
}

#[test]
fn with_ack_open_a_reader_opening_the_file_acknowledges_it() {
    let env = env("open");
    let daemon = env.start();
    let path = version_1_acked_by_opening(&env);

    env.cli_ok(&["rotate", "bot/db", "--wait"]);
    wait_version(&env, "bot", "db", 2);
    assert_eq!(
        awaiting(&env),
        vec![format!("file:{} (ack=open)", path.display())]
    );
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        stage_of(&env, 1),
        Some(Stage::Previous),
        "keyturn's own writes are not an ack"
    );
    // The reader opens the new file: version 1 goes right after.
    let value = std::fs::read(&path).unwrap();
    assert_eq!(value.len(), 32);
    wait_retired(&env, 1);
    let acks: Vec<_> = audit_records(&env)
        .into_iter()
        .filter(|r| r["event"] == "delivery.ack" && r["version"] == 2)
        .collect();
    assert_eq!(acks.len(), 1, "{acks:?}");
    assert_eq!(acks[0]["actor"]["type"], "daemon", "{:?}", acks[0]);
    daemon.stop();
}
