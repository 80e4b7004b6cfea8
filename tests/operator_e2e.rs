//! End-to-end tests of the ways operators break things, on the real binary:
//! manual rotations racing the scheduler, reloads that remove and re-add
//! credentials, `kill -9` mid-delivery, status while the config is invalid.
//! (The random kill -9 soak is `tests/chaos.rs`; a full disk is
//! `tests/disk_full.rs`.)

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use common::*;

/// `n` credentials of agent `bot`, each `every`/`jitter`, one file each.
fn creds(n: usize, every: &str, jitter: &str, grace: &str) -> String {
    let mut s = agent_table("bot");
    for i in 0..n {
        s.push_str(&cred(i, every, jitter, grace));
    }
    s
}

fn cred(i: usize, every: &str, jitter: &str, grace: &str) -> String {
    format!(
        "[agents.bot.credentials.c{i}]\nvault = \"local\"\ngenerate = {{ kind = \"password\", length = 16 }}\nevery = \"{every}\"\njitter = \"{jitter}\"\ngrace = \"{grace}\"\ndeliver = [{{ type = \"file\", path = \"{{root}}/bot/c{i}\" }}]\n"
    )
}

fn ts(record: &serde_json::Value) -> DateTime<Utc> {
    record["ts"]
        .as_str()
        .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
        .map(|t| t.with_timezone(&Utc))
        .unwrap_or_else(|| panic!("audit record without a ts: {record}"))
}

/// The `rotation.start` records of each credential: (time, trigger).
fn starts(env: &Env) -> BTreeMap<String, Vec<(DateTime<Utc>, String)>> {
    let mut by_cred: BTreeMap<String, Vec<(DateTime<Utc>, String)>> = BTreeMap::new();
    for r in audit_records(env) {
        if r["event"] != "rotation.start" {
            continue;
        }
        let trigger = r["detail"]
            .as_str()
            .and_then(|d| d.strip_prefix("trigger="))
            .unwrap_or("?")
            .to_owned();
        let cred = r["credential"].as_str().unwrap_or("?").to_owned();
        by_cred.entry(cred).or_default().push((ts(&r), trigger));
    }
    by_cred
}

/// Defect: a manual rotation left the credential's old timer armed, so it
/// rotated on two interleaved schedules from then on. Every scheduled start
/// must come at least `every - jitter` after the start before it (the
/// interval counts from delivery, minus the credential's jitter offset).
#[test]
fn manual_rotations_never_put_a_credential_on_two_schedules() {
    const N: usize = 20;
    let env = Env::new(&creds(N, "4s", "1s", "0s"));
    let daemon = env.start();
    for i in 0..N {
        wait_version(&env, "bot", &format!("c{i}"), 1);
    }
    // One manual rotation, then `rotate all`, at different points of the
    // credentials' schedules.
    let out = env.cli(&["rotate", "bot/c0", "--wait"]);
    assert!(out.status.success(), "{out:?}");
    std::thread::sleep(Duration::from_millis(1300));
    let out = env.cli(&["rotate", "all", "--wait"]);
    assert!(out.status.success(), "{out:?}");
    std::thread::sleep(Duration::from_millis(700));
    let out = env.cli(&["rotate", "bot", "--wait"]);
    assert!(out.status.success(), "{out:?}");
    // Long enough for three scheduled rotations of every credential.
    std::thread::sleep(Duration::from_secs(13));
    daemon.stop();

    let min_gap = chrono::Duration::milliseconds(3000);
    let mut scheduled = 0;
    let mut too_close = Vec::new();
    for (cred, starts) in starts(&env) {
        for pair in starts.windows(2) {
            let ((prev, _), (at, trigger)) = (&pair[0], &pair[1]);
            if trigger != "schedule" {
                continue;
            }
            scheduled += 1;
            if *at - *prev < min_gap {
                too_close.push(format!(
                    "{cred}: {trigger} start {} ms after the previous one",
                    (*at - *prev).num_milliseconds()
                ));
            }
        }
    }
    assert!(
        too_close.is_empty(),
        "scheduled starts closer than every - jitter (3 s):\n{}",
        too_close.join("\n")
    );
    // The test only means something if the schedules ran.
    assert!(
        scheduled >= 2 * N,
        "only {scheduled} scheduled starts were seen"
    );
}

/// What the local vault holds of version `v` of `cred` (None once retired).
fn vault_version(env: &Env, cred: &str, v: u64) -> Option<Vec<u8>> {
    let vref = keyturn::vaults::VersionRef(v.to_string());
    block_on(local_vault_value(
        env,
        "local",
        &bot_key(cred),
        keyturn::vaults::Select::Version(&vref),
    ))
    .map(|(_, value)| value)
}

/// Two credentials; `gone` rotates to version 2 (its version 1 then in a
/// 3 s grace period), and is then removed from the config by `remove`.
/// After the grace period, version 1 must be retired in the vault and in
/// state, and version 2 (the current value) kept.
fn removed_during_grace(remove: impl FnOnce(&Env, Daemon) -> Daemon) {
    use keyturn::model::Stage;
    let both = format!(
        "{}{}",
        creds(1, "1h", "0s", "3s"),
        cred(1, "1h", "0s", "3s").replace("c1", "gone")
    );
    let env = Env::new(&both);
    let daemon = env.start();
    wait_version(&env, "bot", "gone", 1);
    let out = env.cli(&["rotate", "bot/gone", "--wait"]);
    assert!(out.status.success(), "{out:?}");
    env.write_credentials(&creds(1, "1h", "0s", "3s"));
    let daemon = remove(&env, daemon);
    std::thread::sleep(Duration::from_secs(5));
    let log = daemon.stop();
    assert_eq!(
        stages(&env, &bot_key("gone")),
        vec![(1, Stage::Retired), (2, Stage::Current)],
        "log:\n{log}"
    );
    assert_eq!(
        vault_version(&env, "gone", 1),
        None,
        "version 1 is still in the vault"
    );
    assert!(
        vault_version(&env, "gone", 2).is_some(),
        "the current version stays until the agent is decommissioned"
    );
    let retired = audit_records(&env)
        .into_iter()
        .filter(|r| {
            r["event"] == "rotation.retire"
                && r["credential"] == "gone"
                && r["version"] == 2
                && r["detail"] == "retires version 1"
        })
        .count();
    assert_eq!(
        retired, 1,
        "one retire record for the removed credential's rotation to version 2"
    );
    audit_verifies(&env, "after the removed credential was retired");
}

/// Defect: a reload that removed a credential during its grace period
/// cancelled the retirement of its previous version, which stayed live in
/// the vault for good.
#[test]
fn a_credential_removed_by_reload_during_grace_still_has_its_previous_version_retired() {
    removed_during_grace(|_, daemon| {
        daemon.reload();
        daemon
    });
}

/// The same across a restart: the config was edited while the daemon was
/// down, so only the state database knows where the version is.
#[test]
fn a_credential_removed_while_the_daemon_was_down_still_has_its_previous_version_retired() {
    removed_during_grace(|env, daemon| {
        daemon.stop();
        env.start()
    });
}

/// Defect: a credential removed and added back by reload was rotated at
/// once as `trigger=initial`, though its current version was seconds old.
/// Its state is picked up again instead, whether it came back in the same
/// run or after a restart without it.
#[test]
fn a_credential_added_back_is_not_rotated_as_new() {
    let full = creds(2, "1h", "0s", "0s");
    let without = creds(1, "1h", "0s", "0s");
    let env = Env::new(&full);
    let daemon = env.start();
    wait_version(&env, "bot", "c1", 1);
    // Removed and added back in the same run.
    env.write_credentials(&without);
    daemon.reload();
    env.write_credentials(&full);
    daemon.reload();
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(version_of(&env, "bot", "c1"), Some(1));
    // Removed, the daemon restarted without it, then added back.
    env.write_credentials(&without);
    daemon.reload();
    daemon.stop();
    let daemon = env.start();
    env.write_credentials(&full);
    daemon.reload();
    std::thread::sleep(Duration::from_millis(1500));
    let row = row(&status_json(&env), "bot", "c1").clone();
    assert_eq!(row["version"].as_u64(), Some(1), "{row}");
    assert!(
        row["last_rotated"].as_str().is_some(),
        "status shows when it last rotated: {row}"
    );
    daemon.stop();
    let c1_starts = starts(&env).remove("c1").unwrap_or_default();
    assert_eq!(
        c1_starts
            .iter()
            .map(|(_, t)| t.as_str())
            .collect::<Vec<_>>(),
        vec!["initial"],
        "c1 rotated again after coming back"
    );
}

/// Defect: after a failed reload the daemon keeps serving its previous
/// config, but `status --config FILE` exited 64 because FILE was invalid,
/// so an operator could not ask it what it runs. The client commands need
/// only the socket (and `audit verify` the state paths); they read those
/// even from a file that does not validate, and say that it does not.
#[test]
fn status_and_rotate_still_reach_the_daemon_while_the_config_is_invalid() {
    let good = creds(2, "1h", "0s", "0s");
    let env = Env::new(&good);
    let daemon = env.start();
    wait_version(&env, "bot", "c1", 1);
    for broken in [
        // Invalid meaning: an unknown key, a bad duration.
        format!(
            "{good}\n[agents.bot.credentials.c9]\nvault = \"local\"\nevery = \"soon\"\ncolour = 1\n"
        ),
        // Invalid TOML below the daemon table.
        format!("{good}\n[agents.bot.credentials.c9\nvault = \n"),
    ] {
        env.write_credentials(&broken);
        daemon.reload();
        let out = env.cli(&["status", "--json"]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{stderr}");
        assert!(stderr.contains("does not validate"), "{stderr}");
        let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let rows = doc["credentials"].as_array().unwrap();
        assert_eq!(rows.len(), 2, "the daemon's running config: {rows:?}");
        let out = env.cli(&["rotate", "bot/c0", "--wait"]);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let out = env.cli(&["audit", "verify"]);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert_eq!(version_of(&env, "bot", "c0"), Some(3));
    daemon.stop();
    // No daemon to ask: the invalid file is the problem, every error listed.
    env.write_credentials(&format!(
        "{good}\n[agents.bot.credentials.c8]\nvault = \"local\"\nevery = \"soon\"\n[agents.bot.credentials.c9]\ncolour = 1\n"
    ));
    let out = env.cli(&["status"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(
        stderr.contains("colour") && stderr.contains("credentials.c8: missing key"),
        "every error is listed: {stderr}"
    );
    // ...and what the state database holds is shown all the same (a bad
    // config is why the daemon is down), saying the config is invalid.
    assert!(stderr.contains("is INVALID"), "{stderr}");
    assert!(stderr.contains("showing the state stored in"), "{stderr}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    for c in ["c0", "c1"] {
        assert!(
            stdout.lines().any(|l| l.starts_with(&format!("bot/{c} "))
                || l.starts_with(&format!("bot  {c}"))
                || (l.contains("bot") && l.contains(c))),
            "bot/{c} stored: {stdout}"
        );
    }
    let out = env.cli(&["status", "--json"]);
    assert_eq!(out.status.code(), Some(64));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let rows = doc["credentials"].as_array().unwrap();
    let versions: Vec<(&str, u64, &str)> = rows
        .iter()
        .map(|r| {
            (
                r["credential"].as_str().unwrap(),
                r["version"].as_u64().unwrap(),
                r["vault"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(versions, [("c0", 3, "?"), ("c1", 1, "?")], "{doc}");
}

/// Defect: `rotate nope` answered `no agent AgentId("nope") in the config`,
/// a Rust debug form in an operator's message. Each unknown name is given
/// back as written, with where to look.
#[test]
fn rotating_what_the_config_lacks_names_it_as_written() {
    let env = Env::new(&creds(1, "1h", "0s", "0s"));
    let daemon = env.start();
    wait_version(&env, "bot", "c0", 1);
    for (selector, said) in [
        (
            "nope",
            "no agent \"nope\" in the config (see `keyturn status`)",
        ),
        (
            "bot/nope",
            "no credential bot/nope in the config (see `keyturn status`)",
        ),
    ] {
        let out = env.cli(&["rotate", selector]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        // 67: names nothing configured (as `decommission` of an unknown agent).
        assert_eq!(out.status.code(), Some(67), "{stderr}");
        assert!(stderr.contains(said), "{selector}: {stderr}");
        assert!(
            !stderr.contains("AgentId") && !stderr.contains("CredentialId"),
            "{stderr}"
        );
    }
    daemon.stop();
}

/// `keyturn ARGS --config ...` with its stdout on `stdout`, its stderr read.
fn cli_with_stdout(env: &Env, args: &[&str], stdout: std::process::Stdio) -> std::process::Output {
    std::process::Command::new(bin())
        .args(args)
        .arg("--config")
        .arg(&env.config)
        .env_remove("KEYTURN_CONFIG")
        .stdin(std::process::Stdio::null())
        .stdout(stdout)
        .stderr(std::process::Stdio::piped())
        .output()
        .expect("run keyturn")
}

/// Defect: `keyturn status | head -3` panicked ("failed printing to stdout:
/// Broken pipe") with a backtrace on stderr. A client command writing to a
/// pipe whose reader is gone ends quietly by SIGPIPE, as Unix tools do; the
/// daemon is not affected by the reader of a client going away.
#[test]
fn output_into_a_closed_pipe_ends_the_command_quietly() {
    use std::os::unix::process::ExitStatusExt;
    let env = Env::new(&creds(3, "1h", "0s", "0s"));
    let daemon = env.start();
    wait_version(&env, "bot", "c2", 1);
    for args in [
        &["status"][..],
        &["check"],
        &["surface"],
        &["audit", "verify"],
    ] {
        // The reading end is closed before the command starts: its first
        // write meets a pipe with no reader.
        let (read, write) = nix::unistd::pipe().expect("pipe");
        drop(read);
        let out = cli_with_stdout(&env, args, write.into());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.signal(),
            Some(13),
            "{args:?}: {:?} {stderr}",
            out.status
        );
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }
    // The daemon still answers.
    env.cli_ok(&["status"]);
    daemon.stop();
}

/// Black-box finding: the daemon exited 101 mid-rotation when its log
/// stream broke (stderr a pipe whose reader died, a log file on a full
/// disk): the log library reported the failed write with `eprintln!`, which
/// panicked on the same stderr. And a client command whose output could
/// not be written (`status > /dev/full`) panicked with a backtrace. Now the
/// daemon drops the log lines and keeps working, and the command says what
/// failed and exits 1.
#[test]
fn a_broken_log_stream_does_not_stop_the_daemon_and_unwritable_output_fails_cleanly() {
    let env = Env::new(&creds(2, "1h", "0s", "0s"));
    let (read, write) = nix::unistd::pipe().expect("pipe");
    drop(read);
    let daemon = env.spawn_command(&[], |cmd| {
        cmd.stderr(std::process::Stdio::from(write));
    });
    daemon.wait_ready();
    wait_version(&env, "bot", "c1", 1);
    env.cli_ok(&["rotate", "bot/c0", "--wait"]);
    assert_eq!(version_of(&env, "bot", "c0"), Some(2));
    for args in [&["status"][..], &["audit", "verify"]] {
        let full = std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/full")
            .expect("/dev/full");
        let out = cli_with_stdout(&env, args, full.into());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
        assert!(
            stderr.contains("keyturn: cannot write its output: No space left on device"),
            "{args:?}: {stderr}"
        );
    }
    daemon.stop();
    let audit = std::fs::read_to_string(env.audit_log()).unwrap();
    assert!(audit.contains("\"daemon.stop\""), "{audit}");
}

/// Black-box finding: `KEYTURN_CONFIG=` (empty, as `Environment=KEYTURN_CONFIG=`
/// in a unit sets it) failed every command with "a value is required for
/// '--config'", an option no one had typed. Empty counts as unset, as it
/// did for completions: the default path is used, `--config` still wins.
#[test]
fn an_empty_keyturn_config_counts_as_unset() {
    let env = Env::new(&creds(1, "1h", "0s", "0s"));
    let run = |args: &[&str]| {
        let out = std::process::Command::new(bin())
            .args(args)
            .env("KEYTURN_CONFIG", "")
            .output()
            .expect("run keyturn");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.code(), text)
    };
    let (code, text) = run(&["check"]);
    assert!(!text.contains("a value is required"), "{text}");
    assert!(
        text.contains("/etc/keyturn/keyturn.toml"),
        "{code:?}: {text}"
    );
    let config = env.config.to_str().unwrap();
    let (code, text) = run(&["check", "--config", config]);
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains(config), "{text}");
    // The agent's side: an empty `KEYTURN_AGENT_SOCKET` likewise.
    let out = std::process::Command::new(bin())
        .args(["ack", "bot/c0", "1", "--config", config])
        .env("KEYTURN_AGENT_SOCKET", "")
        .output()
        .expect("run keyturn");
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(!text.contains("a value is required"), "{text}");
    assert_ne!(out.status.code(), Some(2), "{text}");
}

/// Defect: a delivered file that went missing while the daemon was down
/// (a tmpfs `/run` emptied by a reboot, an agent that deleted its file) was
/// not delivered again before the credential's next rotation, a whole
/// period later, while `status` and `/readyz` said all was well. At start
/// the current version is delivered again, without a rotation, audited;
/// after `kill -9` as after a clean stop. A file that is there is left
/// alone.
#[test]
fn delivered_files_missing_at_start_are_restored_without_a_rotation() {
    let env = Env::new(&creds(3, "1h", "0s", "1h"));
    let daemon = env.start();
    for i in 0..3 {
        wait_version(&env, "bot", &format!("c{i}"), 1);
    }
    env.cli_ok(&["rotate", "bot/c0", "--wait"]);
    let file = |i: usize| env.root().join(format!("bot/c{i}"));
    let before: Vec<Vec<u8>> = (0..3).map(|i| std::fs::read(file(i)).unwrap()).collect();
    let kept_inode = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(file(2)).unwrap());
    daemon.stop();

    // As after a reboot: the agent's directory is gone but for one file.
    std::fs::remove_file(file(0)).unwrap();
    std::fs::remove_file(file(1)).unwrap();
    let daemon = env.start();
    for (i, was) in before.iter().enumerate() {
        assert_eq!(std::fs::read(file(i)).ok().as_ref(), Some(was), "c{i}");
    }
    assert_eq!(
        std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(file(2)).unwrap()),
        kept_inode,
        "a file that is there is not written again"
    );
    assert_eq!(version_of(&env, "bot", "c0"), Some(2), "no rotation");
    assert_eq!(version_of(&env, "bot", "c1"), Some(1), "no rotation");
    let restored: Vec<serde_json::Value> = audit_records(&env)
        .into_iter()
        .filter(|r| {
            r["event"] == "delivery" && r["detail"].as_str().is_some_and(|d| d.contains("restored"))
        })
        .collect();
    // Restored at once, in any order.
    let mut got: Vec<(&str, u64)> = restored
        .iter()
        .map(|r| {
            (
                r["credential"].as_str().unwrap(),
                r["version"].as_u64().unwrap(),
            )
        })
        .collect();
    got.sort();
    assert_eq!(got, [("c0", 2), ("c1", 1)], "{restored:?}");

    // After kill -9 too, the whole agent directory gone.
    daemon.kill9();
    std::fs::remove_dir_all(env.root().join("bot")).unwrap();
    let daemon = env.start();
    for (i, was) in before.iter().enumerate() {
        assert_eq!(std::fs::read(file(i)).ok().as_ref(), Some(was), "c{i}");
    }
    env.cli_ok(&["audit", "verify"]);

    // A decommissioned agent's files were retracted on purpose: a restart
    // does not bring them back.
    env.cli_ok(&["decommission", "bot", "--reason", "retired", "--wait"]);
    assert!((0..3).all(|i| !file(i).exists()), "retracted");
    daemon.kill9();
    let daemon = env.start();
    assert!(
        (0..3).all(|i| !file(i).exists()),
        "a decommissioned agent's files stay gone"
    );
    daemon.stop();
}

/// Agent `bot`'s credential `db` on a command target: a shell hook that
/// keeps the value in `{d}/value` (`{d}`: the test's directory) and checks
/// it, running `set_first` at the start of its `set` step; `deliver` is the
/// sink list.
fn command_target_db(env: &Env, set_first: &str, deliver: &str) -> String {
    let d = env.path().display().to_string();
    let set_first = set_first.replace("{d}", &d);
    let hook = env.path().join("hook.sh");
    std::fs::write(
        &hook,
        format!(
            "#!/bin/sh
case \"$KEYTURN_STEP\" in
  set) {set_first} cat > \"{d}/value\" ;;
  test) cmp -s - \"{d}/value\" || exit 1 ;;
esac
exit 0
"
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&hook, std::fs::Permissions::from_mode(0o755)).unwrap();
    format!(
        "{}[agents.bot.credentials.db]\nvault = \"local\"\ngenerate = {{ kind = \"password\", length = 16 }}\nevery = \"1h\"\ntarget = {{ type = \"command\", program = \"{}\" }}\ndeliver = [{deliver}]\n",
        agent_table("bot"),
        hook.display()
    )
}

/// One file sink, for `bot/db`.
const ONE_FILE: &str = "{ type = \"file\", path = \"{root}/bot/db\" }";

/// A credential whose next rotation is parked (its target refuses the new
/// value) still has the current version: a file of it that went missing
/// comes back at start, as the version the agent may still use. Defect:
/// the restored json named the parked rotation's id, not the one that made
/// the version, and had no `expires_hint`.
#[test]
fn a_missing_file_comes_back_while_the_next_rotation_is_parked() {
    let env = Env::new("");
    env.write_credentials(&command_target_db(
        &env,
        "[ -e \"{d}/refuse\" ] && exit 1;",
        "{ type = \"file\", path = \"{root}/bot/db\", format = \"json\" }",
    ));
    let daemon = env.start();
    wait_version(&env, "bot", "db", 1);
    let file = env.root().join("bot/db");
    let read =
        || -> serde_json::Value { serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap() };
    let before = read();
    std::fs::write(env.path().join("refuse"), "").unwrap();
    let out = env.cli(&["rotate", "bot/db", "--wait"]);
    assert_eq!(out.status.code(), Some(1), "the target refuses: parked");
    daemon.kill9();
    std::fs::remove_file(&file).unwrap();
    let daemon = env.start();
    let after = read();
    for field in ["value", "version", "rotation"] {
        assert_eq!(after[field], before[field], "{field}: {after} / {before}");
    }
    assert!(after["expires_hint"].is_string(), "{after}");
    assert_eq!(version_of(&env, "bot", "db"), Some(1));
    daemon.stop();
}

/// Agent `bot`'s credential `db` (a file sink) on a `command` target: a
/// shell hook running `steps`, the arms of a `case` on `$KEYTURN_STEP`
/// (`{d}` in them: the test's directory).
fn hook_db(env: &Env, steps: &str) {
    let d = env.path().display().to_string();
    let hook = env.path().join("hook.sh");
    std::fs::write(
        &hook,
        format!(
            "#!/bin/sh\ncase \"$KEYTURN_STEP\" in\n{}\nesac\nexit 0\n",
            steps.replace("{d}", &d)
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&hook, std::fs::Permissions::from_mode(0o755)).unwrap();
    env.write_credentials(&format!(
        "{}[agents.bot.credentials.db]\nvault = \"local\"\ngenerate = {{ kind = \"password\", length = 16 }}\nevery = \"1h\"\ntarget = {{ type = \"command\", program = \"{}\", timeout = \"60s\" }}\ndeliver = [{ONE_FILE}]\n",
        agent_table("bot"),
        hook.display()
    ));
}

/// Defect: a rotation killed after its value was set at the target, whose
/// credential was removed from the config before the restart, was neither
/// finished nor undone: a target that holds one value kept one no agent
/// had, locking the agents out for good. At the next start the target gets
/// the current value back, and the rotation is recorded as abandoned.
#[test]
fn a_rotation_whose_credential_left_the_config_while_down_is_undone_at_the_target() {
    let env = Env::new("");
    hook_db(
        &env,
        "  set) cat > \"{d}/value\" ;;
  test) [ -e \"{d}/slow\" ] && sleep 20; cmp -s - \"{d}/value\" || exit 1 ;;",
    );
    let daemon = env.start();
    wait_version(&env, "bot", "db", 1);
    let file = env.root().join("bot/db");
    let at_target = || std::fs::read(env.path().join("value")).unwrap();
    let held = std::fs::read(&file).unwrap();
    assert_eq!(at_target(), held, "the target takes what the agent holds");
    std::fs::write(env.path().join("slow"), "").unwrap();
    env.cli_ok(&["rotate", "bot/db"]);
    // Version 2 is set at the target, and its test hangs.
    wait_for(Duration::from_secs(20), || {
        (at_target() != held).then_some(())
    })
    .expect("version 2 set at the target");
    // Asked again meanwhile: met by the rotation in flight, and said so.
    let again = env.cli_ok(&["rotate", "bot/db"]);
    let again = String::from_utf8_lossy(&again.stdout);
    assert!(
        again.contains("already rotating") && again.contains("version 2"),
        "{again}"
    );
    daemon.kill9();
    std::fs::remove_file(env.path().join("slow")).unwrap();
    // The credential leaves the config while the daemon is down.
    env.write_credentials(&agent_table("bot"));
    let daemon = env.start();
    let abandoned = wait_for(Duration::from_secs(20), || {
        audit_records(&env)
            .into_iter()
            .find(|r| r["event"] == "rotation.abandoned")
    })
    .expect("the rotation is recorded as abandoned");
    assert_eq!(abandoned["version"], 2, "{abandoned}");
    assert_eq!(
        at_target(),
        held,
        "the target takes the agent's value again"
    );
    assert_eq!(std::fs::read(&file).unwrap(), held, "the file is untouched");
    daemon.stop();
    env.cli_ok(&["audit", "verify"]);
}

/// Defect: a `keyturn rotate` cut short by `kill -9` while the version
/// before the current one was being retired (a target whose retirement
/// hangs) was dropped: no rotation resumed at the next start, and nothing
/// said so. The request is stored before that retirement, and the next
/// start carries it out.
#[test]
fn a_rotate_asked_for_survives_kill_9_during_the_retirement_before_it() {
    let env = Env::new("");
    hook_db(
        &env,
        "  set) cat > \"{d}/value\" ;;
  test) cmp -s - \"{d}/value\" || exit 1 ;;
  retire) [ -e \"{d}/slow\" ] && touch \"{d}/retiring\" && sleep 20 ;;",
    );
    let daemon = env.start();
    wait_version(&env, "bot", "db", 1);
    env.cli_ok(&["rotate", "bot/db", "--wait"]);
    std::fs::write(env.path().join("slow"), "").unwrap();
    env.cli_ok(&["rotate", "bot/db"]);
    wait_for(Duration::from_secs(20), || {
        env.path().join("retiring").exists().then_some(())
    })
    .expect("version 1 is being retired");
    daemon.kill9();
    std::fs::remove_file(env.path().join("slow")).unwrap();
    let daemon = env.start();
    wait_version(&env, "bot", "db", 3);
    daemon.stop();
}

/// Black-box finding: a directory planted where a file was delivered (the
/// daemon down, or a reload) was taken for the file: the agent had none
/// until the next rotation, nothing was audited. The restore tries, is
/// refused, and audits the failed delivery naming what is in the way; once
/// it is cleared, a reload delivers the file.
#[test]
fn a_directory_planted_at_a_delivered_path_is_reported_and_then_restored() {
    let env = Env::new(&creds(1, "1h", "0s", "0s"));
    let daemon = env.start();
    wait_version(&env, "bot", "c0", 1);
    let file = env.root().join("bot/c0");
    let value = std::fs::read(&file).unwrap();
    daemon.stop();
    std::fs::remove_file(&file).unwrap();
    std::fs::create_dir(&file).unwrap();
    let daemon = env.start();
    let failed = wait_for(Duration::from_secs(10), || {
        audit_records(&env)
            .into_iter()
            .find(|r| r["event"] == "delivery" && r["outcome"] == "failed")
    })
    .unwrap_or_else(|| panic!("no failed delivery audited: {}", daemon.log_text()));
    let error = failed["error"].as_str().unwrap_or_default();
    assert!(error.contains("bot/c0"), "{failed}");
    std::fs::remove_dir(&file).unwrap();
    daemon.reload();
    let got = wait_for(Duration::from_secs(10), || std::fs::read(&file).ok());
    assert_eq!(got, Some(value));
    assert_eq!(version_of(&env, "bot", "c0"), Some(1), "no rotation");
    daemon.stop();
}

/// The `delivery` records of restored files: (credential, version, sink).
fn restored_records(env: &Env) -> Vec<(String, u64, String)> {
    audit_records(env)
        .into_iter()
        .filter(|r| {
            r["event"] == "delivery" && r["detail"].as_str().is_some_and(|d| d.contains("restored"))
        })
        .map(|r| {
            (
                r["credential"].as_str().unwrap().to_owned(),
                r["version"].as_u64().unwrap(),
                r["detail"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

/// Defect: a file sink added to a credential by a reload got no file until
/// the credential's next rotation, a whole period later. The reload now
/// delivers the current version to it (no rotation, audited as restored);
/// a file deleted before a reload comes back the same way; a file that is
/// there is left alone.
#[test]
fn a_file_sink_added_by_reload_gets_the_current_version_at_once() {
    let env = Env::new(&creds(2, "1h", "0s", "1h"));
    let daemon = env.start();
    wait_version(&env, "bot", "c0", 1);
    wait_version(&env, "bot", "c1", 1);
    env.cli_ok(&["rotate", "bot/c0", "--wait"]);
    let c0 = env.root().join("bot/c0");
    let c1 = env.root().join("bot/c1");
    let kept_inode = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&c1).unwrap());
    let value = std::fs::read(&c0).unwrap();

    // A second file for c0, at a new path.
    let added = "deliver = [{ type = \"file\", path = \"{root}/bot/c0\" }, { type = \"file\", path = \"{root}/copy/c0\" }]\n";
    let config = creds(2, "1h", "0s", "1h").replacen(
        "deliver = [{ type = \"file\", path = \"{root}/bot/c0\" }]\n",
        added,
        1,
    );
    assert_ne!(config, creds(2, "1h", "0s", "1h"));
    env.write_credentials(&config);
    daemon.reload();
    let copy = env.root().join("copy/c0");
    let got = wait_for(Duration::from_secs(10), || std::fs::read(&copy).ok());
    assert_eq!(
        got.as_ref(),
        Some(&value),
        "the added sink has the current value"
    );
    assert_eq!(version_of(&env, "bot", "c0"), Some(2), "no rotation");
    assert_eq!(
        std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&c1).unwrap()),
        kept_inode,
        "a file that is there is not written again"
    );

    // A file deleted while the daemon runs comes back at the next reload.
    let c1_value = std::fs::read(&c1).unwrap();
    std::fs::remove_file(&c1).unwrap();
    daemon.reload();
    let got = wait_for(Duration::from_secs(10), || std::fs::read(&c1).ok());
    assert_eq!(got, Some(c1_value));
    assert_eq!(version_of(&env, "bot", "c1"), Some(1), "no rotation");
    let restored = wait_for(Duration::from_secs(10), || {
        let r = restored_records(&env);
        (r.len() >= 2).then_some(r)
    })
    .unwrap_or_else(|| panic!("{:?}", restored_records(&env)));
    let got: Vec<(&str, u64)> = restored.iter().map(|(c, v, _)| (c.as_str(), *v)).collect();
    assert_eq!(got, [("c0", 2), ("c1", 1)], "{restored:?}");
    assert!(restored[0].2.contains("copy/c0"), "{restored:?}");
    env.cli_ok(&["audit", "verify"]);
    daemon.stop();
}

/// Black-box finding: a file sink removed by a reload (its file kept, as
/// documented) and put back after a rotation kept the stale file, whose
/// version was then retired while the agent still read it; so did a
/// credential renamed and renamed back (the file held the other
/// credential's value). A sink a reload adds, or writes otherwise (format,
/// mode, owner), gets the current version whether or not a file is at its
/// path.
#[test]
fn a_file_sink_put_back_by_reload_gets_the_current_version_over_a_stale_file() {
    let base = creds(1, "1h", "0s", "1h");
    let two = base.replacen(
        "deliver = [{ type = \"file\", path = \"{root}/bot/c0\" }]\n",
        "deliver = [{ type = \"file\", path = \"{root}/bot/c0\" }, { type = \"file\", path = \"{root}/bot/copy\" }]\n",
        1,
    );
    assert_ne!(two, base);
    let env = Env::new(&two);
    let daemon = env.start();
    wait_version(&env, "bot", "c0", 1);
    let copy = env.root().join("bot/copy");
    let c0 = env.root().join("bot/c0");
    assert_eq!(std::fs::read(&copy).unwrap(), std::fs::read(&c0).unwrap());

    // Removed: the file stays, and goes stale with the next rotation.
    env.write_credentials(&base);
    daemon.reload();
    std::thread::sleep(Duration::from_millis(500));
    env.cli_ok(&["rotate", "bot/c0", "--wait"]);
    let current = std::fs::read(&c0).unwrap();
    assert_ne!(
        std::fs::read(&copy).unwrap(),
        current,
        "stale, as documented"
    );

    // Put back: the current version, over the stale file, without a rotation.
    env.write_credentials(&two);
    daemon.reload();
    let got = wait_for(Duration::from_secs(10), || {
        std::fs::read(&copy).ok().filter(|v| *v == current)
    });
    assert_eq!(
        got.as_ref(),
        Some(&current),
        "the put-back sink holds the current version"
    );
    assert_eq!(version_of(&env, "bot", "c0"), Some(2), "no rotation");
    let restored = restored_records(&env);
    assert!(
        restored.iter().any(|(c, v, d)| c == "c0"
            && *v == 2
            && d.contains("a reload added or changed its sink")),
        "{restored:?}"
    );
    // A sink that stayed is not written again by later reloads.
    let inode =
        |p: &std::path::Path| std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(p).unwrap());
    let (before_c0, before_copy) = (inode(&c0), inode(&copy));
    daemon.reload();
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!((inode(&c0), inode(&copy)), (before_c0, before_copy));

    // A sink written otherwise (here its format) gets the current version
    // in its new form at once, not at the next rotation.
    let json = two.replacen(
        "path = \"{root}/bot/copy\" }",
        "path = \"{root}/bot/copy\", format = \"json\" }",
        1,
    );
    assert_ne!(json, two);
    env.write_credentials(&json);
    daemon.reload();
    let doc = wait_for(Duration::from_secs(10), || {
        serde_json::from_slice::<serde_json::Value>(&std::fs::read(&copy).ok()?).ok()
    })
    .expect("the copy rewritten as JSON");
    assert_eq!(doc["version"], 2, "{doc}");
    assert_eq!(doc["value"].as_str().map(str::as_bytes), Some(&current[..]));
    assert_eq!(inode(&c0), before_c0, "the sink that did not change");
    env.cli_ok(&["audit", "verify"]);
    daemon.stop();
}

/// A reload that adds a file sink while a rotation runs: the rotation
/// delivers only to the sinks it started with, and the added file gets the
/// version that rotation made as soon as it ends (not the one before, and
/// not a whole period later).
#[test]
fn a_file_sink_added_during_a_rotation_gets_the_version_it_made() {
    let env = Env::new("");
    let slow_set = "if [ -e \"{d}/slow\" ]; then touch \"{d}/in-set\"; sleep 3; fi;";
    env.write_credentials(&command_target_db(&env, slow_set, ONE_FILE));
    let daemon = env.start();
    wait_version(&env, "bot", "db", 1);
    std::fs::write(env.path().join("slow"), "").unwrap();
    let rotate = {
        let config = env.config.clone();
        std::thread::spawn(move || {
            std::process::Command::new(bin())
                .args(["rotate", "bot/db", "--wait", "--config"])
                .arg(config)
                .env_remove("KEYTURN_CONFIG")
                .output()
                .unwrap()
        })
    };
    // The rotation is in its slow `set` step when the reload comes.
    let in_set = env.path().join("in-set");
    assert!(
        wait_for(Duration::from_secs(10), || in_set.exists().then_some(())).is_some(),
        "the rotation reached its set step"
    );
    env.write_credentials(&command_target_db(
        &env,
        slow_set,
        &format!("{ONE_FILE}, {{ type = \"file\", path = \"{{root}}/copy/db\" }}"),
    ));
    daemon.reload();
    let out = rotate.join().unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(version_of(&env, "bot", "db"), Some(2));
    let current = std::fs::read(env.root().join("bot/db")).unwrap();
    let copy = env.root().join("copy/db");
    let got = wait_for(Duration::from_secs(10), || std::fs::read(&copy).ok());
    assert_eq!(got, Some(current), "the added file has version 2");
    daemon.stop();
}

/// Defect: SIGTERM while a hook's `set` ran stopped the rotation right
/// after it, with most of `drain_timeout` unused: the target had the new
/// value and the vault and the agent's file the old one for as long as the
/// daemon stayed down. A rotation whose value is applied is carried
/// through to delivery within the drain; one not yet applied stops.
#[test]
fn a_stop_during_set_delivers_what_the_target_has() {
    let env = Env::new("");
    let hook = write_hook(
        &env,
        "#!/bin/sh\ncase \"$KEYTURN_STEP\" in set) cat >/dev/null; sleep 1 ;; test) cat >/dev/null ;; esac\nexit 0\n",
    );
    env.write_credentials(&format!(
        "{}[agents.bot.credentials.db]\nvault = \"local\"\ngenerate = {{ kind = \"password\", length = 16 }}\nevery = \"1h\"\ntarget = {{ type = \"command\", program = \"{}\" }}\ndeliver = [{{ type = \"file\", path = \"{{root}}/bot/db\", format = \"json\" }}]\n",
        agent_table("bot"),
        hook.display()
    ));
    let mut daemon = env.start();
    wait_version(&env, "bot", "db", 1);
    env.cli_ok(&["rotate", "bot/db"]);
    // In the middle of the second `set`.
    std::thread::sleep(Duration::from_millis(400));
    daemon.signal(libc::SIGTERM);
    let status = daemon.wait_exit(Duration::from_secs(20)).expect("exits");
    assert!(status.success(), "{status:?}");
    let file: serde_json::Value =
        serde_json::from_slice(&std::fs::read(env.root().join("bot/db")).unwrap()).unwrap();
    assert_eq!(file["version"], 2, "the agent has what the target has");
    assert_eq!(version_of(&env, "bot", "db"), Some(2));
}

/// A config directory: `keyturn.toml` and `agents.d/*.toml`. A reload reads
/// only the agent files that changed: an unchanged file (same inode, size
/// and modification time) is not read again, so that even a broken copy of
/// it goes unnoticed until it is touched; then the reload fails, names that
/// file, and the running config stays.
#[test]
fn a_reload_reads_only_the_agent_files_that_changed() {
    let env = Env::new("");
    let agents_d = env.path().join("agents.d");
    std::fs::create_dir(&agents_d).unwrap();
    let agent = |name: &str, creds: &[&str]| {
        let mut s = agent_table(name);
        for c in creds {
            s.push_str(&format!(
                "[agents.{name}.credentials.{c}]\nvault = \"local\"\ngenerate = {{ kind = \"password\", length = 16 }}\nevery = \"1h\"\ndeliver = [{{ type = \"file\", path = \"{}/{name}/{c}\" }}]\n",
                env.root().display()
            ));
        }
        s
    };
    std::fs::write(agents_d.join("a.toml"), agent("a", &["x"])).unwrap();
    std::fs::write(agents_d.join("b.toml"), agent("b", &["y"])).unwrap();
    // A file modified a moment before it is read is read again at the next
    // reload whatever its signature (two writes within one tick of the
    // filesystem clock look alike): make these an hour old.
    let hour_ago = std::time::SystemTime::now() - Duration::from_secs(3600);
    for f in [
        env.config.clone(),
        agents_d.join("a.toml"),
        agents_d.join("b.toml"),
    ] {
        std::fs::File::options()
            .write(true)
            .open(&f)
            .unwrap()
            .set_modified(hour_ago)
            .unwrap();
    }
    let daemon = env.start();
    wait_version(&env, "a", "x", 1);
    wait_version(&env, "b", "y", 1);

    // b.toml changes, a.toml does not: only b.toml is read.
    std::fs::write(agents_d.join("b.toml"), agent("b", &["y", "z"])).unwrap();
    daemon.reload();
    wait_version(&env, "b", "z", 1);
    assert_eq!(version_of(&env, "a", "x"), Some(1), "a/x kept as it was");
    let log = daemon.log_text();
    let partial = log
        .lines()
        .find(|l| l.contains("reload: only changed agent files read"))
        .unwrap_or_else(|| panic!("no partial reload: {log}"));
    assert!(
        partial.contains("read=1") && partial.contains("kept=1"),
        "{partial}"
    );

    // a.toml broken in place with its size and modification time put back
    // (as `cp -p` would): the change time still tells, it is read, and the
    // reload fails naming it.
    let a = agents_d.join("a.toml");
    let meta = std::fs::metadata(&a).unwrap();
    // An unclosed table header, padded to the same size.
    let broken = format!("[agents.a{}", " ".repeat(meta.len() as usize - 9));
    std::fs::write(&a, &broken).unwrap();
    std::fs::File::options()
        .write(true)
        .open(&a)
        .unwrap()
        .set_modified(meta.modified().unwrap())
        .unwrap();
    assert_eq!(std::fs::metadata(&a).unwrap().len(), meta.len());
    daemon.reload();
    let log = daemon.log_text();
    assert!(
        log.contains("reload failed") && log.contains("agents.d/a.toml"),
        "{log}"
    );
    let rows = status_json(&env);
    assert_eq!(rows.len(), 3, "the running config stays: {rows:?}");

    // Named by its directory, the broken config still lets the client
    // commands ask the daemon (they exited 64 without asking).
    for args in [
        vec!["status"],
        vec!["rotate", "b/y", "--wait"],
        vec!["audit", "verify"],
    ] {
        let out = std::process::Command::new(bin())
            .args(&args)
            .arg("--config")
            .arg(env.path())
            .env_remove("KEYTURN_CONFIG")
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{args:?}: {err}");
        assert!(err.contains("does not validate"), "{args:?}: {err}");
    }
    assert_eq!(version_of(&env, "b", "y"), Some(2));
    daemon.stop();
}

/// `keyturn status` on a pseudo-terminal (`script` from util-linux), with
/// `extra` environment; its output with `\r\n` made `\n`.
fn status_on_a_tty(env: &Env, extra: &[(&str, &str)]) -> String {
    let command = format!(
        "{} status --config {}",
        bin(),
        env.path().join("keyturn.toml").display()
    );
    let out = std::process::Command::new("script")
        .args(["-qec", &command, "/dev/null"])
        .env_remove("NO_COLOR")
        .env_remove("KEYTURN_CONFIG")
        .env("TERM", "xterm-256color")
        .envs(extra.iter().copied())
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run script(1)");
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout).replace("\r\n", "\n")
}

/// Agent and credential ids of the longest allowed length: every line of
/// `status` still fits 80 columns, with the ids cut in the middle. No
/// colour when piped, even forced off by nothing; `--color always` colours;
/// on a terminal it colours unless NO_COLOR is set (and not empty).
#[test]
fn status_fits_80_columns_and_colours_only_on_a_terminal() {
    let agent = format!("{}-tail", "a".repeat(59));
    let cred = format!("{}-end", "c".repeat(60));
    let env = Env::new(&format!(
        "{}[agents.{agent}.credentials.{cred}]\nvault = \"local\"\ngenerate = {{ kind = \"password\", length = 16 }}\nevery = \"1h\"\ndeliver = [{{ type = \"file\", path = \"{{root}}/long\" }}]\n",
        agent_table(&agent)
    ));
    let _daemon = env.start();
    wait_version(&env, &agent, &cred, 1);

    let piped = |args: &[&str], extra: &[(&str, &str)]| {
        let out = std::process::Command::new(bin())
            .args(args)
            .arg("--config")
            .arg(env.path().join("keyturn.toml"))
            .env_remove("KEYTURN_CONFIG")
            .env_remove("NO_COLOR")
            .env_remove("CLICOLOR_FORCE")
            .envs(extra.iter().copied())
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    let plain = piped(&["status"], &[]);
    assert!(!plain.contains('\x1b'), "escapes in a pipe: {plain:?}");
    // The output is ASCII but for `…` (one column): chars are columns here.
    for line in plain.lines() {
        assert!(
            line.chars().count() <= 80,
            "wider than 80: {line:?}\n{plain}"
        );
    }
    let line = plain
        .lines()
        .find(|l| l.starts_with("aaaa"))
        .unwrap_or_else(|| panic!("no row: {plain}"));
    assert!(line.contains('…') && line.contains("c-end "), "{line}");
    assert!(line.contains("current") && line.contains(" ago "), "{line}");

    let forced = piped(&["status", "--color", "always"], &[("NO_COLOR", "1")]);
    assert!(forced.contains("\x1b["), "--color always: {forced:?}");
    assert!(!piped(&["status", "--color", "never"], &[]).contains('\x1b'));
    // --wide: the full table, whole ids.
    let wide = piped(&["status", "--wide"], &[]);
    assert!(wide.contains(&cred) && wide.contains(&agent), "{wide}");

    let tty = status_on_a_tty(&env, &[]);
    assert!(tty.contains("\x1b["), "no colour on a terminal: {tty:?}");
    let no_color = status_on_a_tty(&env, &[("NO_COLOR", "1")]);
    assert!(no_color.contains("c-end"), "{no_color}");
    assert!(
        !no_color.contains('\x1b'),
        "NO_COLOR=1 must win: {no_color:?}"
    );
    let empty = status_on_a_tty(&env, &[("NO_COLOR", "")]);
    assert!(
        empty.contains("\x1b["),
        "an empty NO_COLOR is unset: {empty:?}"
    );
}

/// Defect: `check` passed alert sinks whose key files were missing or
/// readable by others, and the daemon then refused to start (exit 1)
/// naming only the first of them. `check`, online or not, reads every
/// alert sink's key file and names each that fails, located (exit 64), as
/// does the daemon's start.
#[test]
fn alert_sinks_with_bad_key_files_fail_check_and_are_all_named() {
    let env = Env::new("");
    let key = env.path().join("wh.key");
    std::fs::write(&key, "0123456789abcdef0123456789abcdef").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    env.write_credentials(&format!(
        "[alerts.pd]\ntype = \"pagerduty\"\nrouting_key_file = \"{}/missing.key\"\nurl = \"http://127.0.0.1:9/v2/enqueue\"\n\
[alerts.wh]\ntype = \"webhook\"\nurl = \"http://127.0.0.1:9/hook\"\nsecret_file = \"{}\"\n",
        env.path().display(),
        key.display()
    ));
    for online in [false, true] {
        let out = if online {
            env.cli(&["check", "--online"])
        } else {
            env.cli(&["check"])
        };
        assert_eq!(out.status.code(), Some(64), "{out:?}");
        let said = String::from_utf8_lossy(&out.stderr);
        let pd = said.lines().find(|l| l.contains(": alerts.pd: "));
        let wh = said.lines().find(|l| l.contains(": alerts.wh: "));
        assert!(pd.is_some_and(|l| l.contains("missing.key")), "{said}");
        assert!(wh.is_some_and(|l| l.contains("mode 0644")), "{said}");
        assert!(said.contains("keyturn.toml:13:1: alerts.pd"), "{said}");
    }

    let mut daemon = std::process::Command::new(bin())
        .args(["daemon", "--config"])
        .arg(&env.config)
        .env_remove("NOTIFY_SOCKET")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let status = wait_for(Duration::from_secs(20), || daemon.try_wait().unwrap());
    let Some(status) = status else {
        daemon.kill().unwrap();
        panic!("the daemon started with unreadable alert keys");
    };
    assert_eq!(status.code(), Some(64), "a config error");
    let mut stderr = String::new();
    std::io::Read::read_to_string(daemon.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    assert!(
        stderr.contains("alerts.pd: ") && stderr.contains("alerts.wh: "),
        "{stderr}"
    );
}

/// Defect: with the daemon down, status showed the next-due time stored
/// before a reload lengthened the period (soon, then overdue) though a
/// restart would not rotate; it computes it from the config as the daemon
/// does. And a parked failure showed as `interrupted` where the daemon
/// said `failed`.
/// Offline status (the daemon stopped) shows `bot/db` as the daemon
/// showed it in `online`: its state, step and version.
fn offline_shows(env: &Env, online: &serde_json::Value) {
    let rows = status_json(env);
    let offline = row(&rows, "bot", "db");
    assert_eq!(
        (&offline["state"], &offline["step"], &offline["version"]),
        (&online["state"], &online["step"], &online["version"]),
        "{offline}"
    );
}

#[test]
fn offline_status_follows_the_config_schedule_and_shows_a_parked_failure() {
    let env = Env::new("");
    let text = command_target_db(&env, "[ -e \"{d}/refuse\" ] && exit 1;", ONE_FILE);
    env.write_credentials(&text.replace("every = \"1h\"", "every = \"10s\""));
    let daemon = env.start();
    wait_version(&env, "bot", "db", 1);
    env.write_credentials(&text.replace("every = \"1h\"", "every = \"24h\""));
    daemon.reload();
    daemon.stop();
    let due = |env: &Env| {
        let rows = status_json(env);
        let due = row(&rows, "bot", "db")["next_due"]
            .as_str()
            .unwrap()
            .to_owned();
        DateTime::parse_from_rfc3339(&due)
            .unwrap()
            .with_timezone(&Utc)
    };
    let offline = due(&env);
    assert!(
        offline > Utc::now() + chrono::Duration::hours(12),
        "offline next due {offline}: every = 24h now"
    );
    let daemon = env.start();
    let online = due(&env);
    assert!(
        (online - offline).num_seconds().abs() <= 1,
        "online {online}, offline {offline}"
    );

    std::fs::write(env.path().join("refuse"), "").unwrap();
    let out = env.cli(&["rotate", "bot/db", "--wait"]);
    assert_eq!(out.status.code(), Some(1), "the target refuses: parked");
    let rows = status_json(&env);
    let parked = row(&rows, "bot", "db").clone();
    assert_eq!(parked["state"], "failed", "{parked}");
    daemon.stop();
    offline_shows(&env, &parked);

    // Parked at delivery (a file where the directory goes), after the
    // promote: the new version is current in the vault, online and offline
    // alike (black-box finding: offline showed the version before).
    let daemon = env.start();
    std::fs::remove_file(env.path().join("refuse")).unwrap();
    std::fs::remove_dir_all(env.root().join("bot")).unwrap();
    std::fs::write(env.root().join("bot"), "in the way").unwrap();
    let out = env.cli(&["rotate", "bot/db", "--wait", "--json"]);
    assert_eq!(out.status.code(), Some(1), "the delivery fails: parked");
    let failed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let rows = status_json(&env);
    let parked = row(&rows, "bot", "db").clone();
    assert_eq!(parked["step"], "deliver", "{parked}");
    // The result names the parked rotation and its version, as status does.
    assert_eq!(
        (
            &failed[0]["outcome"],
            &failed[0]["rotation"],
            &failed[0]["version"]
        ),
        (
            &serde_json::json!("failed"),
            &parked["rotation"],
            &parked["version"]
        ),
        "{failed}"
    );
    daemon.stop();
    offline_shows(&env, &parked);
}

/// Defect: changing a credential's `generate.kind` between a single value
/// and a keypair while its file sink kept the path made every delivery
/// after the reload fail, for good (the path held the other layout). The
/// next rotation delivers the new value in the new layout: password →
/// ed25519 bundle → api_key file, each by a reload and `rotate --wait`.
#[test]
fn a_changed_generator_kind_is_delivered_in_its_layout_at_the_same_path() {
    let cred = |generate: &str| {
        format!(
            "{}[agents.bot.credentials.key]\nvault = \"local\"\ngenerate = {generate}\nevery = \"1h\"\ndeliver = [{{ type = \"file\", path = \"{{root}}/bot/key\" }}]\n",
            agent_table("bot")
        )
    };
    let env = Env::new(&cred(r#"{ kind = "password", length = 20 }"#));
    let daemon = env.start();
    wait_version(&env, "bot", "key", 1);
    let path = env.root().join("bot/key");
    assert!(path.is_file());

    env.write_credentials(&cred(r#"{ kind = "ed25519" }"#));
    daemon.reload();
    env.cli_ok(&["rotate", "bot/key", "--wait"]);
    let private = std::fs::read_to_string(path.join("private.pem")).unwrap();
    assert!(
        private.starts_with("-----BEGIN PRIVATE KEY-----"),
        "a keypair"
    );
    assert!(path.join("public.pem").exists());
    let meta = std::fs::read_to_string(path.join("meta.json")).unwrap();
    assert!(meta.contains("\"version\":2"), "{meta}");

    env.write_credentials(&cred(
        r#"{ kind = "api_key", prefix = "kt_", length = 24 }"#,
    ));
    daemon.reload();
    env.cli_ok(&["rotate", "bot/key", "--wait"]);
    let value = std::fs::read_to_string(&path).unwrap();
    assert!(value.starts_with("kt_"), "an api key in a single file");
    let rows = status_json(&env);
    let r = row(&rows, "bot", "key");
    assert_eq!(r["version"], 3, "{r}");
    assert!(r["last_error"].is_null(), "{r}");
    daemon.stop();
    audit_verifies(&env, "after the kind changes");
}

/// Black-box finding: `rotate --wait` of a credential already rotating
/// said "rotated" (outcome `completed`) like a rotation it had started,
/// where the README promises the request is met by the one in flight. Now:
/// without `--wait`, `joined` with the version it makes; with `--wait`, the
/// outcome of that rotation and a note that it was joined, one rotation.
#[test]
fn a_rotate_met_by_the_rotation_in_flight_says_it_joined_it() {
    let env = Env::new("");
    let go = env.path().join("go");
    let text = command_target_db(
        &env,
        "while [ ! -e \"{d}/go\" ]; do sleep 0.05; done;",
        ONE_FILE,
    );
    std::fs::write(&go, "").unwrap();
    env.write_credentials(&text);
    let daemon = env.start();
    wait_version(&env, "bot", "db", 1);
    std::fs::remove_file(&go).unwrap();

    let first = env.cli_ok(&["rotate", "bot/db", "--json"]);
    let first: serde_json::Value = serde_json::from_slice(&first.stdout).unwrap();
    assert_eq!(first[0]["outcome"], "started", "{first}");
    let joined = wait_for(Duration::from_secs(10), || {
        let out = env.cli_ok(&["rotate", "bot/db", "--json"]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        (v[0]["outcome"] == "joined").then_some(v)
    })
    .expect("a second request joins the rotation in flight");
    assert_eq!(joined[0]["version"], 2, "{joined}");
    let waiting = {
        let config = env.config.clone();
        std::thread::spawn(move || {
            std::process::Command::new(bin())
                .args(["rotate", "bot/db", "--wait", "--json", "--config"])
                .arg(&config)
                .output()
                .unwrap()
        })
    };
    std::thread::sleep(Duration::from_millis(500));
    std::fs::write(&go, "").unwrap();
    let out = waiting.join().unwrap();
    assert!(out.status.success(), "{out:?}");
    let done: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (&done[0]["outcome"], &done[0]["version"], &done[0]["note"]),
        (
            &serde_json::json!("completed"),
            &serde_json::json!(2),
            &serde_json::json!("joined the rotation already in flight")
        ),
        "{done}"
    );
    daemon.stop();
    let creates = audit_records(&env)
        .iter()
        .filter(|r| r["event"] == "rotation.create")
        .count();
    assert_eq!(creates, 2, "version 1 and the one rotation all three met");
}

/// Black-box finding: after a reload changed a credential's target, the next
/// rotation, retiring the version before the current one at its start,
/// revoked the old target while the current value, set there too, was in
/// use (and lost its grace), and sent `retire` of the old versions to the
/// new target, which never had them. The old target is retired there as
/// usual, and told to end the last value set on it when that retires.
#[test]
fn a_changed_target_is_revoked_when_the_last_value_set_on_it_retires() {
    let env = Env::new("");
    let d = env.path().display().to_string();
    let hook = |n: u32| {
        let path = env.path().join(format!("hook{n}.sh"));
        std::fs::write(
            &path,
            format!(
                "#!/bin/sh\necho \"$KEYTURN_STEP ${{KEYTURN_VERSION:-all}}\" >> {d}/hook{n}.log\nexit 0\n"
            ),
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        path
    };
    let config = |program: &std::path::Path| {
        format!(
            "{}[agents.bot.credentials.db]\nvault = \"local\"\ngenerate = {{ kind = \"password\", length = 16 }}\nevery = \"1h\"\ngrace = \"3s\"\ntarget = {{ type = \"command\", program = \"{}\" }}\ndeliver = [{ONE_FILE}]\n",
            agent_table("bot"),
            program.display()
        )
    };
    let (one, two) = (hook(1), hook(2));
    let log = |n: u32| {
        std::fs::read_to_string(env.path().join(format!("hook{n}.log"))).unwrap_or_default()
    };
    env.write_credentials(&config(&one));
    let daemon = env.start();
    wait_version(&env, "bot", "db", 1);
    env.cli_ok(&["rotate", "bot/db", "--wait"]);
    env.write_credentials(&config(&two));
    daemon.reload();
    env.cli_ok(&["rotate", "bot/db", "--wait"]);
    // Version 3 went to the new target; version 1 was retired at the old
    // one, which still holds version 2 (in its grace): not revoked yet.
    let (first, second) = (log(1), log(2));
    assert!(first.contains("retire 1"), "{first}");
    assert!(
        !first.contains("revoke"),
        "revoked with version 2 still in use:\n{first}"
    );
    assert_eq!(second.lines().next(), Some("set 3"), "{second}");
    assert!(!second.contains("retire"), "{second}");
    // Version 2's grace ends: the old target is told to end it, that
    // version only. Not `revoke` (every value of the credential by name):
    // a hook whose only change was its `args` is the same partner, where
    // that ended the current value too (black-box finding).
    let retired = wait_for(Duration::from_secs(20), || {
        log(1).contains("retire 2").then_some(())
    });
    assert!(retired.is_some(), "{}", log(1));
    assert!(!log(1).contains("revoke"), "{}", log(1));
    assert!(!log(2).contains("revoke"), "{}", log(2));
    // It is in the audit log, naming the earlier target, not only in the
    // daemon's log.
    let audited = wait_for(Duration::from_secs(10), || {
        audit_records(&env)
            .into_iter()
            .find(|r| r["event"] == "target.revoked")
    })
    .expect("no target.revoked record");
    assert_eq!(audited["outcome"], "ok", "{audited}");
    assert_eq!(audited["credential"], "db", "{audited}");
    let detail = audited["detail"].as_str().unwrap_or_default();
    assert!(
        detail.contains("hook1.sh") && detail.contains("version 2"),
        "{audited}"
    );
    daemon.stop();
    audit_verifies(&env, "after the earlier target's revocation");
}

/// Black-box finding: a key pair bundle whose `private.pem` was deleted
/// (its link, or the file in `..data`) was never restored, at a start or a
/// reload: only a whole bundle gone was. Either is restored now, without
/// a rotation.
#[test]
fn a_bundle_missing_one_of_its_files_is_restored_at_start_and_reload() {
    let env = Env::new(&format!(
        "{}[agents.bot.credentials.sign]\nvault = \"local\"\ngenerate = {{ kind = \"ed25519\" }}\nevery = \"1h\"\ndeliver = [{{ type = \"file\", path = \"{{root}}/bot/sign\" }}]\n",
        agent_table("bot")
    ));
    let daemon = env.start();
    wait_version(&env, "bot", "sign", 1);
    let private = env.root().join("bot/sign/private.pem");
    let key = std::fs::read(&private).unwrap();
    daemon.stop();
    std::fs::remove_file(&private).unwrap();
    let daemon = env.start();
    assert_eq!(
        std::fs::read(&private).ok(),
        Some(key.clone()),
        "restored at start"
    );
    // The file inside `..data` deleted: the link leads nowhere; a reload
    // restores it.
    std::fs::remove_file(env.root().join("bot/sign/..data/private.pem")).unwrap();
    assert!(std::fs::read(&private).is_err());
    daemon.reload();
    let restored = wait_for(Duration::from_secs(10), || std::fs::read(&private).ok());
    assert_eq!(restored, Some(key), "restored at reload");
    assert_eq!(version_of(&env, "bot", "sign"), Some(1), "no rotation");
    daemon.stop();
}
