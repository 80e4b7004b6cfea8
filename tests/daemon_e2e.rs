//! End-to-end tests of the real binary on the local vault with file sinks.

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::*;

const ONE_RAW: &str = r#"
[agents.bot]
owner = "alice@example.com"
tenant = "acme"
tier = "high"
uid = 1234
gid = 2345

[agents.bot.credentials.db]
vault = "local"
generate = { kind = "password", length = 40 }
every = "1h"
grace = "0s"
deliver = [
  { type = "file", path = "{root}/bot/db", format = "raw", mode = "0440" },
  { type = "file", path = "{root}/bot/db.json", format = "json" },
  { type = "file", path = "{root}/bot/db.env", format = "env", env_name = "DB_PASSWORD" },
]
"#;

/// [`ONE_RAW`] with its daemon started and version 1 delivered.
fn one_raw_at_version_1() -> (Env, Daemon) {
    let env = Env::new(ONE_RAW);
    let daemon = env.start();
    wait_version(&env, "bot", "db", 1);
    (env, daemon)
}

#[test]
fn delivers_files_with_mode_and_owner_and_rotates_on_demand() {
    let (env, daemon) = one_raw_at_version_1();

    let raw = env.root().join("bot/db");
    let meta = std::fs::metadata(&raw).unwrap();
    assert_eq!(meta.permissions().mode() & 0o7777, 0o440);
    assert_eq!(
        (meta.uid(), meta.gid()),
        (1234, 2345),
        "owner comes from the agent's uid/gid"
    );
    let dir_meta = std::fs::metadata(env.root().join("bot")).unwrap();
    assert_eq!(dir_meta.permissions().mode() & 0o7777, 0o750);
    assert_eq!(dir_meta.uid(), 1234);
    let v1 = std::fs::read_to_string(&raw).unwrap();
    assert_eq!(v1.len(), 40);

    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(env.root().join("bot/db.json")).unwrap()).unwrap();
    assert_eq!(json["value"], v1.as_str());
    assert_eq!(json["version"], 1);
    let envfile = std::fs::read_to_string(env.root().join("bot/db.env")).unwrap();
    assert!(
        envfile.contains(&format!("DB_PASSWORD='{v1}'")),
        "{envfile}"
    );

    let out = env.cli_ok(&["rotate", "bot/db", "--wait"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("version 2"));
    let v2 = std::fs::read_to_string(&raw).unwrap();
    assert_ne!(v1, v2, "rotate --wait must change the delivered value");
    let rows = status_json(&env);
    let r = row(&rows, "bot", "db");
    assert_eq!(r["version"], 2);
    assert_eq!(r["stage"], "current");
    assert!(
        r["last_rotated"].is_string() && r["next_due"].is_string(),
        "{r}"
    );
    daemon.stop();
}

/// Black-box finding: after a reload changed the agent's `uid`, its
/// directory (owned by the old uid) was refused as someone else's, and no
/// delivery of the agent's got through until a `chown` by hand. The reload
/// hands the agent's directories to the new uid.
#[test]
fn a_reload_that_changes_the_agents_uid_hands_its_directory_over() {
    let (env, daemon) = one_raw_at_version_1();
    let dir = env.root().join("bot");
    assert_eq!(std::fs::metadata(&dir).unwrap().uid(), 1234);
    env.write_credentials(&ONE_RAW.replace("uid = 1234", "uid = 4321"));
    daemon.reload();
    let out = env.cli(&["rotate", "bot/db", "--wait"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}\n{}", daemon.log_text());
    for p in [dir.clone(), dir.join("db"), dir.join("db.json")] {
        assert_eq!(
            std::fs::metadata(&p).unwrap().uid(),
            4321,
            "{} is the agent's new uid's",
            p.display()
        );
    }
    assert_eq!(version_of(&env, "bot", "db"), Some(2));
    daemon.stop();
}

#[test]
fn a_reader_never_sees_a_partial_or_empty_file() {
    let (env, daemon) = one_raw_at_version_1();
    let raw = env.root().join("bot/db");
    let json = env.root().join("bot/db.json");
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut reads = 0u64;
            let mut seen = std::collections::HashSet::new();
            while !stop.load(Ordering::Relaxed) {
                let v = std::fs::read(&raw).expect("the file is always there");
                assert_eq!(v.len(), 40, "partial or empty read: {} bytes", v.len());
                let j = std::fs::read(&json).expect("the json file is always there");
                let parsed: serde_json::Value =
                    serde_json::from_slice(&j).expect("json file always complete");
                assert!(parsed["version"].as_u64().is_some());
                seen.insert(v);
                reads += 1;
            }
            (reads, seen.len())
        })
    };
    for _ in 0..15 {
        env.cli_ok(&["rotate", "bot/db", "--wait"]);
    }
    stop.store(true, Ordering::Relaxed);
    let (reads, distinct) = reader.join().expect("reader saw a partial file");
    assert!(reads > 100, "reader only managed {reads} reads");
    assert!(
        distinct >= 2,
        "reader should have seen several versions, saw {distinct}"
    );
    assert_eq!(version_of(&env, "bot", "db"), Some(16));
    daemon.stop();
}

#[test]
fn in_place_delivery_keeps_the_inode_a_bind_mount_holds() {
    use std::io::{Read, Seek};
    // Every sink of ONE_RAW (raw 0440, json, env), in place.
    let config = ONE_RAW.replace(" },", ", atomic = false },");
    assert_eq!(config.matches("atomic = false").count(), 3);
    let env = Env::new(&config);
    let daemon = env.start();
    wait_version(&env, "bot", "db", 1);
    let raw = env.root().join("bot/db");
    let files = ["bot/db", "bot/db.json", "bot/db.env"].map(|f| env.root().join(f));
    // The inode as `stat` reports it, which is what a bind mount pins.
    let inode = |p: &std::path::Path| {
        let out = std::process::Command::new("stat")
            .args(["-c", "%i"])
            .arg(p)
            .output()
            .unwrap();
        assert!(out.status.success(), "stat {}", p.display());
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    };
    let inodes = files.each_ref().map(|f| inode(f));
    // A reader that opened the file before the rotations, as a container
    // bind-mounting it does.
    let mut held = std::fs::File::open(&raw).unwrap();
    let mut previous = std::fs::read_to_string(&raw).unwrap();
    assert_eq!(previous.len(), 40);
    for version in [2, 3] {
        env.cli_ok(&["rotate", "bot/db", "--wait"]);
        assert_eq!(
            files.each_ref().map(|f| inode(f)),
            inodes,
            "inodes of {files:?} after version {version}"
        );
        let now = std::fs::read_to_string(&raw).unwrap();
        assert_eq!(now.len(), 40);
        assert_ne!(now, previous, "version {version} delivered a new value");
        let doc = delivered_json(&env, "bot/db.json");
        assert_eq!(doc["version"], version);
        assert_eq!(doc["value"], now.as_str(), "json and raw agree");
        let envfile = std::fs::read_to_string(env.root().join("bot/db.env")).unwrap();
        assert!(
            envfile.contains(&format!("DB_PASSWORD='{now}'")),
            "{envfile}"
        );
        held.rewind().unwrap();
        let mut seen = String::new();
        held.read_to_string(&mut seen).unwrap();
        assert_eq!(
            seen, now,
            "the descriptor held since version 1 reads version {version}"
        );
        previous = now;
    }
    let meta = std::fs::metadata(&raw).unwrap();
    assert_eq!(meta.permissions().mode() & 0o7777, 0o440);
    assert_eq!((meta.uid(), meta.gid()), (1234, 2345));
    assert_eq!(version_of(&env, "bot", "db"), Some(3));
    assert!(temp_files(&env).is_empty(), "{:?}", temp_files(&env));
    daemon.stop();
}

#[test]
fn notify_socket_gets_ready_watchdog_reloading_stopping_and_bad_reload_keeps_config() {
    let env = Env::new(ONE_RAW);
    let daemon = env.start_with(&[("WATCHDOG_USEC", "400000")]);
    assert!(
        daemon.wait_notify("WATCHDOG=1", Duration::from_secs(5)),
        "{:?}",
        daemon.notifications()
    );

    daemon.signal(libc::SIGHUP);
    assert!(
        daemon.wait_notify("RELOADING=1", Duration::from_secs(10)),
        "{:?}",
        daemon.notifications()
    );
    let reload_msg = daemon
        .notifications()
        .into_iter()
        .find(|m| m.contains("RELOADING=1"))
        .unwrap();
    let usec: u64 = reload_msg
        .lines()
        .find_map(|l| l.strip_prefix("MONOTONIC_USEC="))
        .expect("RELOADING=1 comes with MONOTONIC_USEC")
        .parse()
        .unwrap();
    assert!(usec > 0);
    let readies = || {
        daemon
            .notifications()
            .iter()
            .filter(|m| m.contains("READY=1"))
            .count()
    };
    assert!(
        wait_for(Duration::from_secs(10), || (readies() >= 2).then_some(())).is_some(),
        "READY=1 after reload"
    );

    // An invalid config on reload keeps the old one and says why.
    let good = std::fs::read_to_string(&env.config).unwrap();
    std::fs::write(
        &env.config,
        format!("{good}\n[agents.bot.credentials.extra]\nvault = \"nope\"\n"),
    )
    .unwrap();
    daemon.signal(libc::SIGHUP);
    assert!(
        wait_for(Duration::from_secs(10), || daemon
            .notifications()
            .iter()
            .any(|m| m.contains("STATUS=reload failed"))
            .then_some(()))
        .is_some(),
        "{:?}",
        daemon.notifications()
    );
    std::fs::write(&env.config, &good).unwrap();
    assert_eq!(
        version_of(&env, "bot", "db"),
        Some(1),
        "still serving with the old config"
    );

    daemon.stop();
}

#[test]
fn stopping_is_notified() {
    let env = Env::new(ONE_RAW);
    let mut daemon = env.start();
    daemon.signal(libc::SIGTERM);
    let status = daemon
        .wait_exit(Duration::from_secs(20))
        .expect("exits on SIGTERM");
    assert!(status.success());
    assert!(
        daemon.wait_notify("STOPPING=1", Duration::from_secs(1)),
        "{:?}",
        daemon.notifications()
    );
}

#[test]
fn symlinks_at_the_delivery_path_or_its_parent_are_refused() {
    let creds = agent_table("bot")
        + r#"
[agents.bot.credentials.a]
vault = "local"
generate = { kind = "random_bytes", length = 32, encoding = "hex" }
every = "1h"
deliver = [{ type = "file", path = "{root}/bot/a", format = "raw" }]
[agents.spy.credentials.b]
vault = "local"
generate = { kind = "random_bytes", length = 32, encoding = "hex" }
every = "1h"
deliver = [{ type = "file", path = "{root}/spy/b", format = "raw" }]
"# + &agent_table("spy");
    let env = Env::new(&creds);
    let outside = env.path().join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    // A symlink at the file itself, and one at its parent directory.
    std::fs::create_dir_all(env.root().join("bot")).unwrap();
    std::os::unix::fs::symlink(outside.join("a"), env.root().join("bot/a")).unwrap();
    std::os::unix::fs::symlink(&outside, env.root().join("spy")).unwrap();

    let daemon = env.start();
    let rows = wait_for(Duration::from_secs(20), || {
        let rows = status_json(&env);
        rows.iter()
            .all(|r| {
                r["last_error"]
                    .as_str()
                    .is_some_and(|e| e.contains("symlink"))
            })
            .then_some(rows)
    })
    .unwrap_or_else(|| {
        panic!(
            "both deliveries should fail naming the symlink: {:?}",
            status_json(&env)
        )
    });
    // Promoted in the vault (status shows that version, failing at its
    // deliver step), but never counted as delivered.
    for r in &rows {
        assert!(
            r["last_rotated"].is_null() && r["step"] == "deliver" && r["state"] == "failed",
            "nothing may count as delivered: {r}"
        );
    }
    let out = env.cli(&["rotate", "bot/a", "--wait"]);
    assert_eq!(out.status.code(), Some(1), "rotate --wait must fail");
    assert!(String::from_utf8_lossy(&out.stdout).contains("symlink"));
    assert_eq!(
        std::fs::read_dir(&outside).unwrap().count(),
        0,
        "nothing written outside the root"
    );
    daemon.stop();
}

#[test]
fn canary_values_never_leak_into_logs_audit_state_or_errors() {
    let env = Env::new(
        &(agent_table("bot")
            + r#"
[agents.bot.credentials.key]
vault = "local"
generate = { kind = "api_key", prefix = "kt_canary_", length = 32 }
every = "1h"
grace = "0s"
deliver = [{ type = "file", path = "{root}/bot/key", format = "raw" }]
[agents.bot.credentials.broken]
vault = "local"
generate = { kind = "password", length = 24 }
every = "1h"
deliver = [{ type = "file", path = "{root}/bot/sub/broken", format = "raw" }]
"#),
    );
    // Make one delivery fail so error paths run too.
    std::fs::create_dir_all(env.root().join("bot")).unwrap();
    std::os::unix::fs::symlink("/nonexistent", env.root().join("bot/sub")).unwrap();
    let daemon = env.start();
    wait_version(&env, "bot", "key", 1);
    let mut values = Vec::new();
    for _ in 0..3 {
        values.push(std::fs::read(env.root().join("bot/key")).unwrap());
        let out = env.cli(&["rotate", "bot/key", "--wait"]);
        assert!(out.status.success());
        assert!(
            !contains(&out.stdout, &values[values.len() - 1])
                && !contains(&out.stderr, &values[values.len() - 1])
        );
    }
    values.push(std::fs::read(env.root().join("bot/key")).unwrap());
    let failed = env.cli(&["rotate", "bot/broken", "--wait"]);
    assert_eq!(failed.status.code(), Some(1));
    let status = env.cli(&["status"]);
    let log = daemon.stop();
    assert!(
        log.contains("TRACE") || log.contains("DEBUG"),
        "the daemon ran at trace level"
    );

    let mut haystacks: Vec<(String, Vec<u8>)> = vec![
        ("daemon log".into(), log.into_bytes()),
        (
            "rotate error".into(),
            [failed.stdout, failed.stderr].concat(),
        ),
        ("status".into(), [status.stdout, status.stderr].concat()),
    ];
    for (p, bytes) in read_tree(&env.state_dir()) {
        haystacks.push((p.display().to_string(), bytes));
    }
    for v in &values {
        assert!(v.starts_with(b"kt_canary_") && v.len() == 42);
        for (name, hay) in &haystacks {
            assert!(!contains(hay, v), "a secret value leaked into {name}");
            // The random part alone must not appear either.
            assert!(
                !contains(hay, &v[10..]),
                "a secret value leaked into {name}"
            );
        }
    }
}

/// A hook that prints the secret in every common encoding (as `curl -v -u
/// user:$SECRET` prints `Authorization: Basic ...`), then fails. Its stderr
/// must reach none of the state database, the audit log, `status` and the
/// errors, and the daemon's log only redacted.
const LEAKY_HOOK: &str = r#"#!/bin/sh
s=$(cat)
[ "$KEYTURN_STEP" = set ] || exit 0
printf '%s' "$s" > "$1/secret"
bytes=$(printf '%s' "$s" | od -An -tx1 -v)
{
  printf '%s\n' "$s"
  printf '%.20s\n' "$s"
  printf '%s' "$bytes" | tr -d ' \n'; echo
  printf '%s' "$bytes" | tr -d ' \n' | tr a-f A-F; echo
  for u in user ab abc; do
    b=$(printf '%s:%s' "$u" "$s" | base64 -w0)
    echo "$b"
    echo "$b" | tr -d '='
    echo "$b" | tr '+/' '-_'
    echo "$b" | cut -c1-30
  done
  printf '%s' "$s" | base64 -w0; echo
  for b in $bytes; do printf '%%%s' "$b"; done; echo
  for b in $bytes; do printf '\\u00%s' "$b"; done; echo
} > "$1/printed"
sed 's/^/> Authorization: Basic /' "$1/printed" >&2
echo "< HTTP/1.1 401 Unauthorized" >&2
exit 3
"#;

#[test]
fn hook_stderr_in_any_encoding_never_leaks() {
    let env = Env::new(&format!(
        r#"{}
[agents.bot.credentials.api]
vault = "local"
generate = {{ kind = "password", length = 32 }}
every = "1h"
target = {{ type = "command", program = "{{dir}}/hook.sh", args = ["{{dir}}"] }}
deliver = [{{ type = "file", path = "{{root}}/bot/api", format = "raw" }}]
"#,
        agent_table("bot")
    ));
    let hook = env.path().join("hook.sh");
    std::fs::write(&hook, LEAKY_HOOK).unwrap();
    std::fs::set_permissions(&hook, std::fs::Permissions::from_mode(0o755)).unwrap();
    let daemon = env.start();
    // The first rotation fails at `set`, retries, and parks.
    let error = wait_last_error(&env, "bot", "api", "exited with 3");
    let failed = env.cli(&["rotate", "bot/api", "--wait"]);
    assert_eq!(failed.status.code(), Some(1));
    let status = env.cli(&["status"]);
    let status_json = env.cli(&["status", "--json"]);
    let log = daemon.stop();
    let log_text = log.clone();

    let secret = std::fs::read(env.path().join("secret")).unwrap();
    assert_eq!(secret.len(), 32);
    let printed = std::fs::read_to_string(env.path().join("printed")).unwrap();
    let forms: Vec<&[u8]> = printed
        .lines()
        .map(str::as_bytes)
        .chain([secret.as_slice()])
        .filter(|l| l.len() >= 16)
        .collect();
    assert!(forms.len() >= 17, "{printed}");
    let mut haystacks: Vec<(String, Vec<u8>)> = vec![
        ("daemon log".into(), log.into_bytes()),
        (
            "rotate error".into(),
            [failed.stdout, failed.stderr].concat(),
        ),
        ("status".into(), [status.stdout, status.stderr].concat()),
        ("status --json".into(), status_json.stdout),
    ];
    for (p, bytes) in read_tree(&env.state_dir()) {
        haystacks.push((p.display().to_string(), bytes));
    }
    assert!(
        haystacks.iter().any(|(n, _)| n.ends_with("audit.log"))
            && haystacks.iter().any(|(n, _)| n.ends_with("state.db")),
        "the audit log and the state database are searched"
    );
    for form in &forms {
        // Skip the `user:` part of the Basic forms: 12 bytes from the 8th on
        // depend on the secret alone.
        let w = &form[8..20];
        for (name, hay) in &haystacks {
            assert!(
                !contains(hay, w),
                "{} of the secret leaked into {name}",
                String::from_utf8_lossy(form)
            );
        }
    }
    assert!(
        log_text.contains("hook failed")
            && log_text.contains("[REDACTED]")
            && log_text.contains("401 Unauthorized"),
        "the hook's stderr is in the log, redacted: {log_text}"
    );
    // What state and audit carry instead: the exit status, a fixed text.
    assert!(
        error.contains("the hook exited with 3 (its stderr is in the daemon's log)"),
        "{error}"
    );
}

/// Run by the `exec` sink: records its environment and argv per version,
/// and, once `fail` exists, prints the delivered value on stderr and fails.
const ON_DELIVERY: &str = r#"#!/bin/sh
env > "$1/env.$KEYTURN_VERSION"
printf '%s\n' "$0" "$@" > "$1/argv.$KEYTURN_VERSION"
if [ -e "$1/fail" ]; then
  echo "reload refused: $(cat "$2") was rejected" >&2
  exit 3
fi
"#;

#[test]
fn exec_sink_runs_with_the_notice_in_env_and_a_failure_shows_without_its_stderr() {
    let env = Env::new(&format!(
        r#"{}
[agents.bot.credentials.api]
vault = "local"
generate = {{ kind = "password", length = 32 }}
every = "1h"
deliver = [
  {{ type = "file", path = "{{root}}/bot/api", format = "raw" }},
  {{ type = "exec", program = "{{dir}}/on-delivery.sh", args = ["{{dir}}", "{{root}}/bot/api"], timeout = "10s" }},
]
"#,
        agent_table("bot")
    ));
    let program = env.path().join("on-delivery.sh");
    std::fs::write(&program, ON_DELIVERY).unwrap();
    std::fs::set_permissions(&program, std::fs::Permissions::from_mode(0o755)).unwrap();
    let daemon = env.start();
    wait_version(&env, "bot", "api", 1);

    // The program ran after the file was in place, with the notice in its
    // environment and the value nowhere in it.
    let v1 = std::fs::read_to_string(env.root().join("bot/api")).unwrap();
    assert_eq!(v1.len(), 32);
    let seen = std::fs::read_to_string(env.path().join("env.1")).unwrap();
    let argv = std::fs::read_to_string(env.path().join("argv.1")).unwrap();
    let vars: Vec<&str> = seen.lines().collect();
    for want in [
        "KEYTURN_AGENT=bot",
        "KEYTURN_CREDENTIAL=api",
        "KEYTURN_TENANT=acme",
        "KEYTURN_VERSION=1",
    ] {
        assert!(vars.contains(&want), "{want} missing in {seen}");
    }
    let rotation = vars
        .iter()
        .find_map(|l| l.strip_prefix("KEYTURN_ROTATION="))
        .unwrap_or_else(|| panic!("no KEYTURN_ROTATION in {seen}"));
    assert_eq!(rotation.len(), 32, "{rotation}");
    assert!(!seen.contains(&v1) && !argv.contains(&v1), "{seen}{argv}");

    // Now the program fails: the rotation fails at delivery and status says
    // how the program ended, not what it printed.
    std::fs::write(env.path().join("fail"), "").unwrap();
    let failed = env.cli(&["rotate", "bot/api", "--wait"]);
    assert_eq!(failed.status.code(), Some(1));
    let error = wait_last_error(&env, "bot", "api", "exited with 3");
    assert!(
        error.contains("the program exited with 3 (its stderr is in the daemon's log)"),
        "{error}"
    );
    assert!(!error.contains("reload refused"), "{error}");
    let status = env.cli(&["status"]);
    let log = daemon.stop();
    // The file sink delivered version 2 before the program refused it.
    let v2 = std::fs::read_to_string(env.root().join("bot/api")).unwrap();
    assert_ne!(v1, v2);
    assert!(
        std::fs::read_to_string(env.path().join("env.2"))
            .unwrap()
            .contains("KEYTURN_VERSION=2")
    );
    assert!(
        log.contains("exec sink failed") && log.contains("reload refused: [REDACTED] was rejected"),
        "the program's stderr is in the log, redacted: {log}"
    );
    let mut haystacks: Vec<(String, Vec<u8>)> = vec![
        ("daemon log".into(), log.into_bytes()),
        ("rotate".into(), [failed.stdout, failed.stderr].concat()),
        ("status".into(), [status.stdout, status.stderr].concat()),
    ];
    for (p, bytes) in read_tree(&env.state_dir()) {
        haystacks.push((p.display().to_string(), bytes));
    }
    for (name, hay) in &haystacks {
        for v in [&v1, &v2] {
            assert!(!contains(hay, v.as_bytes()), "a value leaked into {name}");
        }
    }
}

#[test]
fn audit_log_is_verified_and_tampering_is_detected() {
    let (env, daemon) = one_raw_at_version_1();
    for _ in 0..2 {
        env.cli_ok(&["rotate", "bot/db", "--wait"]);
    }
    daemon.stop();
    audit_verifies(&env, "before tampering");
    let original = std::fs::read_to_string(env.audit_log()).unwrap();
    let lines: Vec<&str> = original.lines().collect();
    assert!(lines.len() > 10, "every step is audited: {}", lines.len());
    for needle in [
        "rotation.create",
        "rotation.promote",
        "rotation.deliver",
        "delivery",
        "admin.rotate",
        "\"tenant\":\"acme\"",
        "\"owner\":\"alice@example.com\"",
    ] {
        assert!(original.contains(needle), "audit lacks {needle}");
    }
    // No target: `set` and `test` have nothing to do and are skipped, not
    // recorded (the crash-safety test, with a hook target, reaches them).
    for skipped in ["\"rotation.set\"", "\"rotation.test\""] {
        assert!(!original.contains(skipped), "audit has {skipped}");
    }

    let check = |name: &str, text: String, expect_line: Option<usize>| {
        std::fs::write(env.audit_log(), text).unwrap();
        let out = env.cli(&["audit", "verify"]);
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        assert_eq!(out.status.code(), Some(1), "{name} not detected: {err}");
        if let Some(l) = expect_line {
            assert!(
                err.contains(&format!("line {l}")),
                "{name}: should name line {l}: {err}"
            );
        }
        std::fs::write(env.audit_log(), &original).unwrap();
    };
    // Edit a middle record: the next record's prev hash no longer matches.
    let mut edited = lines.clone();
    let changed = edited[4].replace("rotation", "rotaTion");
    edited[4] = &changed;
    check("edit", edited.join("\n") + "\n", Some(6));
    // Delete a middle record.
    let mut deleted = lines.clone();
    deleted.remove(5);
    check("delete", deleted.join("\n") + "\n", Some(6));
    // Reorder two records.
    let mut swapped = lines.clone();
    swapped.swap(3, 4);
    check("reorder", swapped.join("\n") + "\n", Some(4));
    // Truncate the tail: only the head kept in state can tell.
    let truncated = lines[..lines.len() - 2].join("\n") + "\n";
    check("truncate", truncated, None);
    assert!(
        env.cli(&["audit", "verify"]).status.success(),
        "restored log verifies again"
    );
}

/// Black-box finding: a record edited in the middle of the log while the
/// daemon was down went unnoticed until someone ran `audit verify` (the
/// start checks only the tail), and `audit verify` named only the first bad
/// record. Now every bad record is listed, and the daemon checks the whole
/// chain after it starts: an `audit.chain_broken` record, an error in its
/// log and `keyturn_audit_chain_intact 0` for the alert.
#[test]
fn history_edited_while_down_is_found_after_the_start_and_every_edit_listed() {
    let (port, env) = with_http_listener();
    let daemon = env.spawn(&[("KEYTURN_LOG", "info")]);
    daemon.wait_ready();
    wait_version(&env, "bot", "db", 1);
    for _ in 0..2 {
        env.cli_ok(&["rotate", "bot/db", "--wait"]);
    }
    let intact = wait_for(Duration::from_secs(10), || {
        http_get(port, "/metrics")
            .lines()
            .any(|l| l == "keyturn_audit_chain_intact 1")
            .then_some(())
    });
    assert!(intact.is_some(), "{}", http_get(port, "/metrics"));
    daemon.stop();
    let original = std::fs::read_to_string(env.audit_log()).unwrap();
    let mut lines: Vec<String> = original.lines().map(str::to_owned).collect();
    assert!(lines.len() > 12, "{}", lines.len());
    lines[2] = lines[2].replacen("\"ok\"", "\"failed\"", 1);
    lines.remove(8);
    std::fs::write(env.audit_log(), lines.join("\n") + "\n").unwrap();

    let out = env.cli(&["audit", "verify"]);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(" line 4 (seq 4): prev hash does not match line 3"),
        "{err}"
    );
    assert!(err.contains(" line 9 (seq 10): expected seq 9"), "{err}");
    assert!(
        err.contains("2 problem(s) found; the whole log was checked"),
        "{err}"
    );

    let daemon = env.spawn(&[("KEYTURN_LOG", "info")]);
    daemon.wait_ready();
    let broken = wait_for(Duration::from_secs(10), || {
        http_get(port, "/metrics")
            .lines()
            .any(|l| l == "keyturn_audit_chain_intact 0")
            .then_some(())
    });
    assert!(broken.is_some(), "{}", http_get(port, "/metrics"));
    let record = wait_for(Duration::from_secs(10), || {
        audit_records(&env)
            .into_iter()
            .find(|r| r["event"] == "audit.chain_broken")
    })
    .expect("the broken chain is recorded");
    assert_eq!(record["outcome"], "failed");
    let why = record["error"].as_str().unwrap();
    assert!(
        why.contains("line 4 (seq 4)") && why.contains("2 problem(s)"),
        "{why}"
    );
    let log = daemon.stop();
    assert!(log.contains("the chain is broken"), "{log}");
}

/// Black-box finding: bytes appended to the audit log (or a cut) while the
/// daemon runs were logged and recorded, but `keyturn_audit_chain_intact`
/// stayed 1, so no alert fired until a restart checked the chain.
#[test]
fn a_foreign_write_while_running_clears_the_chain_intact_gauge() {
    let (port, env) = with_http_listener();
    let daemon = env.spawn(&[("KEYTURN_LOG", "info")]);
    daemon.wait_ready();
    wait_version(&env, "bot", "db", 1);
    // The check of the whole chain after the start is done (it would find
    // the bytes below by itself).
    let checked = wait_for(Duration::from_secs(10), || {
        daemon
            .log_text()
            .contains("the whole chain is intact")
            .then_some(())
    });
    assert!(checked.is_some(), "{}", daemon.log_text());
    assert!(
        http_get(port, "/metrics")
            .lines()
            .any(|l| l == "keyturn_audit_chain_intact 1")
    );
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(env.audit_log())
        .unwrap();
    std::io::Write::write_all(&mut f, b"{\"seq\":999,\"forged\":true}\n").unwrap();
    drop(f);
    // The next append finds it.
    env.cli_ok(&["rotate", "bot/db", "--wait"]);
    let broken = wait_for(Duration::from_secs(10), || {
        http_get(port, "/metrics")
            .lines()
            .any(|l| l == "keyturn_audit_chain_intact 0")
            .then_some(())
    });
    assert!(broken.is_some(), "{}", http_get(port, "/metrics"));
    assert!(
        audit_records(&env)
            .iter()
            .any(|r| r["event"] == "audit.foreign_write"),
        "recorded"
    );
    daemon.stop();
}

/// Black-box finding: a daemon refused because something was in the way of
/// its socket (a file, or another daemon serving it from another state
/// directory) had already created a state database and recorded
/// `daemon.start` (ok) in the audit log, as if it had served. The sockets
/// and the listener are bound before anything is opened or written now.
#[test]
fn a_start_refused_for_its_socket_writes_no_state_and_no_start_record() {
    let env = Env::new(ONE_RAW);
    let socket = env.path().join("control.sock");
    std::fs::write(&socket, "in the way").unwrap();
    let mut daemon = env.spawn(&[]);
    let status = daemon
        .wait_exit(Duration::from_secs(30))
        .expect("refused at once");
    assert!(!status.success());
    let log = daemon.log_text();
    assert!(log.contains("control socket"), "{log}");
    assert!(!env.state_dir().join("state.db").exists(), "no state made");
    assert!(!env.audit_log().exists(), "nothing recorded");
    assert_eq!(std::fs::read_to_string(&socket).unwrap(), "in the way");

    // Another daemon serving that socket from another state directory.
    std::fs::remove_file(&socket).unwrap();
    let first = env.start();
    let other = Env::new(ONE_RAW);
    let text = std::fs::read_to_string(&other.config).unwrap().replace(
        &format!("socket = \"{}/control.sock\"", other.path().display()),
        &format!("socket = \"{}\"", socket.display()),
    );
    std::fs::write(&other.config, text).unwrap();
    let mut second = other.spawn(&[]);
    let status = second
        .wait_exit(Duration::from_secs(30))
        .expect("refused at once");
    assert!(!status.success(), "{}", second.log_text());
    assert!(!other.state_dir().join("state.db").exists());
    assert!(!other.audit_log().exists());
    // The first daemon's socket is still there and serving.
    env.cli_ok(&["status"]);
    first.stop();
    let starts = audit_records(&env)
        .iter()
        .filter(|r| r["event"] == "daemon.start")
        .count();
    assert_eq!(starts, 1);
}

/// A second daemon on the state directory of a running one is refused, and
/// says so once: its message went to stderr both as a log line and as a
/// `keyturn:` line, twice in the journal.
#[test]
fn a_second_daemon_on_one_state_directory_is_refused_and_says_so_once() {
    let env = Env::new(ONE_RAW);
    let first = env.start();
    let other = Env::new(ONE_RAW);
    let text = std::fs::read_to_string(&other.config).unwrap().replace(
        &format!("state_dir = \"{}/state\"", other.path().display()),
        &format!("state_dir = \"{}\"", env.state_dir().display()),
    );
    std::fs::write(&other.config, text).unwrap();
    let mut second = other.spawn(&[]);
    let status = second
        .wait_exit(Duration::from_secs(30))
        .expect("refused at once");
    assert!(!status.success());
    let log = second.log_text();
    assert_eq!(
        log.matches("two daemons must never share a state directory")
            .count(),
        1,
        "{log}"
    );
    assert!(log.contains(&format!("pid {}", first.pid())), "{log}");
    env.cli_ok(&["status"]);
    first.stop();
}

/// Black-box finding: a `state.db` restored from a backup taken before a
/// decommission brought the agent back to life: it rotated and delivered
/// again, and status, surface and the metrics showed it active. The
/// decommission the log records after the restored head is decided again,
/// at its first decision's time, before anything rotates or is restored.
#[test]
fn a_state_database_restored_from_before_a_decommission_keeps_the_agent_decommissioned() {
    let env = Env::new(ONE_RAW);
    let daemon = env.start();
    wait_version(&env, "bot", "db", 1);
    daemon.stop();
    let backup = env.path().join("backup");
    copy_db_files(&env.state_dir(), "state.db", &backup);
    let daemon = env.start();
    env.cli_ok(&["decommission", "bot", "--reason", "retired", "--wait"]);
    daemon.stop();
    let file = env.root().join("bot/db");
    assert!(!file.exists(), "retracted");
    restore_db_files(&env.state_dir(), "state.db", &backup);

    let daemon = env.start();
    wait_for(Duration::from_secs(30), || {
        let out = env.cli_ok(&["status"]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.lines()
            .any(|l| l.starts_with("bot ") && l.contains(" decommissioned"))
            .then_some(())
    })
    .unwrap_or_else(|| panic!("{}", daemon.log_text()));
    // Nothing was made or delivered again.
    env.cli(&["rotate", "bot/db", "--wait"]);
    let log = daemon.stop();
    assert!(!file.exists(), "delivered again:\n{log}");
    assert!(log.contains("records the decommission of bot"), "{log}");
    let records = audit_records(&env);
    let made: Vec<u64> = records
        .iter()
        .filter(|r| r["event"] == "rotation.create" && r["outcome"] == "ok")
        .filter_map(|r| r["version"].as_u64())
        .collect();
    assert_eq!(made, [1], "nothing rotated after the restore");
    let decided: Vec<_> = records
        .iter()
        .filter(|r| r["event"] == "decommission.decided")
        .collect();
    assert_eq!(decided.len(), 2, "{decided:?}");
    let first = decided[0]["detail"].as_str().unwrap();
    let at = first
        .split("decided_at=")
        .nth(1)
        .unwrap()
        .split(' ')
        .next()
        .unwrap();
    assert!(
        decided[1]["detail"]
            .as_str()
            .unwrap()
            .contains(&format!("decided_at={at}")),
        "the first decision's time: {decided:?}"
    );
}

/// Black-box finding: a clean stop left most of the state in
/// `state.db-wal` (4 KiB in `state.db`, ~490 KiB in the WAL), so a backup
/// of `state.db` alone copied back over it was silently overlaid by that
/// WAL at the next start: the restore did nothing. A clean stop folds the
/// WAL into the file; `state.db` alone is then the whole state.
#[test]
fn after_a_clean_stop_the_state_database_file_alone_is_the_state() {
    let env = Env::new(ONE_RAW);
    let daemon = env.start();
    wait_version(&env, "bot", "db", 1);
    daemon.stop();
    let wal = env.state_dir().join("state.db-wal");
    let left = std::fs::metadata(&wal).map_or(0, |m| m.len());
    assert_eq!(left, 0, "the WAL is empty after a clean stop");
    // So is the local vault's: a copy of `vault.db` alone holds every
    // version (black-box finding: it was an empty database).
    let vault = env.state_dir().join("vaults/local/vault.db");
    let wal = std::fs::metadata(vault.with_extension("db-wal")).map_or(0, |m| m.len());
    assert_eq!(wal, 0, "the local vault's WAL is empty after a clean stop");
    let copy = env.path().join("vault-copy.db");
    std::fs::copy(&vault, &copy).unwrap();
    let versions: i64 = rusqlite::Connection::open(&copy)
        .unwrap()
        .query_row("SELECT count(*) FROM versions", [], |r| r.get(0))
        .unwrap();
    assert_eq!(versions, 1, "the copy holds version 1");
    let backup = env.path().join("state.db.v1");
    std::fs::copy(env.state_dir().join("state.db"), &backup).unwrap();
    let daemon = env.start();
    env.cli_ok(&["rotate", "bot/db", "--wait"]);
    env.cli_ok(&["rotate", "bot/db", "--wait"]);
    daemon.stop();
    // The file alone, as an operator copies a backup back.
    std::fs::copy(&backup, env.state_dir().join("state.db")).unwrap();
    let out = env.cli_ok(&["status", "--json"]);
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        rows["credentials"][0]["version"], 1,
        "the restored state: {rows}"
    );
    let daemon = env.start();
    wait_for(Duration::from_secs(30), || {
        audit_records(&env)
            .into_iter()
            .find(|r| r["event"] == "state.behind")
    })
    .unwrap_or_else(|| panic!("state.behind recorded: {}", daemon.log_text()));
    daemon.stop();
}

/// Black-box finding: a `state.db` restored from a backup (what the docs
/// say to do when it is lost) numbered versions again from where the
/// backup stood: a second "version 2" and "version 3" with other values,
/// delivered under numbers agents had already seen. The records after the
/// restored head name versions the state does not know: new versions are
/// numbered after them (kept across restarts), and the start says so.
#[test]
fn a_state_database_restored_from_a_backup_never_numbers_a_version_twice() {
    let env = Env::new(ONE_RAW);
    let daemon = env.start();
    wait_version(&env, "bot", "db", 1);
    daemon.stop();
    let backup = env.path().join("backup");
    copy_db_files(&env.state_dir(), "state.db", &backup);
    let daemon = env.start();
    for _ in 0..2 {
        env.cli_ok(&["rotate", "bot/db", "--wait"]);
    }
    assert_eq!(version_of(&env, "bot", "db"), Some(3));
    daemon.stop();
    restore_db_files(&env.state_dir(), "state.db", &backup);

    // Started on the restored state: its current version (1) is one the
    // log shows superseded, so it rotates at once, as a catch-up
    // (black-box finding: it served version 1 until the next due time),
    // to version 4. Started again (the head has moved past the records
    // that told), the next version is 5.
    let daemon = env.start();
    wait_version(&env, "bot", "db", 4);
    let log = daemon.stop();
    assert!(
        log.contains("the state database is behind the audit log")
            && log.contains("bot/db version 3")
            && log.contains("rotating now the credentials whose current version"),
        "{log}"
    );
    let daemon = env.start();
    env.cli_ok(&["rotate", "bot/db", "--wait"]);
    assert_eq!(version_of(&env, "bot", "db"), Some(5));
    daemon.stop();
    let records = audit_records(&env);
    let made: Vec<u64> = records
        .iter()
        .filter(|r| r["event"] == "rotation.create" && r["outcome"] == "ok")
        .filter_map(|r| r["version"].as_u64())
        .collect();
    assert_eq!(made, [1, 2, 3, 4, 5], "each number once");
    let caught_up = records
        .iter()
        .find(|r| r["event"] == "rotation.start" && r["version"] == 4)
        .expect("version 4 started");
    assert!(
        caught_up["detail"]
            .as_str()
            .is_some_and(|d| d.contains("trigger=catch_up")),
        "{caught_up}"
    );
    let behind: Vec<_> = records
        .iter()
        .filter(|r| r["event"] == "state.behind")
        .collect();
    assert_eq!(behind.len(), 1, "{behind:?}");
}

/// Black-box finding: a local vault restored older than the state database
/// (its online backup taken first) still served the version the state
/// meant to retire as its current one; the retire was refused at every
/// attempt ("only the previous version can be retired") and the credential
/// never rotated again. The retire leaves what the vault serves, says so
/// (`vault.behind`), and the rotation goes on.
#[test]
fn a_local_vault_restored_older_than_the_state_does_not_stop_rotations() {
    let env = Env::new(&ONE_RAW.replace("grace = \"0s\"", "grace = \"1h\""));
    let daemon = env.start();
    wait_version(&env, "bot", "db", 1);
    daemon.stop();
    let vault_dir = env.state_dir().join("vaults").join("local");
    let backup = env.path().join("vault-backup");
    copy_db_files(&vault_dir, "vault.db", &backup);
    let daemon = env.start();
    env.cli_ok(&["rotate", "bot/db", "--wait"]);
    daemon.stop();
    restore_db_files(&vault_dir, "vault.db", &backup);

    let daemon = env.start();
    let out = env.cli(&["rotate", "bot/db", "--wait"]);
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(version_of(&env, "bot", "db"), Some(3));
    let rows = status_json(&env);
    assert!(row(&rows, "bot", "db")["last_error"].is_null(), "{rows:?}");
    let delivered = std::fs::read_to_string(env.root().join("bot/db")).unwrap();
    let value = block_on(local_vault_value(
        &env,
        "local",
        &keyturn::model::CredentialKey::new("bot".parse().unwrap(), "db".parse().unwrap()),
        keyturn::vaults::Select::Stage(keyturn::model::Stage::Current),
    ))
    .expect("a current version")
    .1;
    assert_eq!(
        delivered.as_bytes(),
        value.as_slice(),
        "the vault's current is delivered"
    );
    daemon.stop();
    let behind = audit_records(&env)
        .iter()
        .filter(|r| r["event"] == "vault.behind")
        .count();
    assert_eq!(behind, 1);
}

/// Black-box finding: without an audit key, a record appended after the
/// last one (its `prev` the SHA-256 of the line before) passed `audit
/// verify`, and the daemon chained its own records onto it, after which
/// nothing told it apart. The head the state database stored shows it:
/// verify names the records after that head, and the daemon records
/// `audit.unconfirmed` for them before anything else. A clean stop and
/// start leaves nothing unconfirmed.
#[test]
fn a_record_appended_after_the_stored_head_is_named_and_marked_unconfirmed() {
    use sha2::Digest as _;
    let (env, daemon) = one_raw_at_version_1();
    daemon.stop();
    env.start().stop();
    let clean = std::fs::read_to_string(env.audit_log()).unwrap();
    assert!(!clean.contains("audit.unconfirmed"), "{clean}");
    let out = env.cli_ok(&["audit", "verify"]);
    let said = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(!said.contains("come after the head"), "{said}");

    let last = clean.lines().last().unwrap();
    let mut forged: serde_json::Value = serde_json::from_str(last).unwrap();
    let seq = forged["seq"].as_u64().unwrap() + 1;
    forged["seq"] = seq.into();
    forged["prev"] = hex::encode(sha2::Sha256::digest(last.as_bytes())).into();
    forged["event"] = "decommission.decided".into();
    forged["detail"] = "FORGED".into();
    let mut log = std::fs::OpenOptions::new()
        .append(true)
        .open(env.audit_log())
        .unwrap();
    use std::io::Write as _;
    writeln!(log, "{forged}").unwrap();
    drop(log);

    let out = env.cli_ok(&["audit", "verify"]);
    let said = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        said.contains("the last 1 record(s) come after the head it stored"),
        "{said}"
    );
    env.start().stop();
    let records = audit_records(&env);
    let marked = records
        .iter()
        .position(|r| r["event"] == "audit.unconfirmed")
        .expect("the daemon marks the appended record");
    assert_eq!(
        records[marked]["seq"].as_u64(),
        Some(seq + 1),
        "first thing"
    );
    let why = records[marked]["error"].as_str().unwrap();
    assert!(why.contains(&format!("seq {seq}..={seq}")), "{why}");
    assert_eq!(records[marked + 1]["event"], "daemon.start");
    audit_verifies(&env, "after the restart");
}

/// The audit key of the keyed-chain tests: 40 bytes spelling a canary that
/// must never show up in a log, an output, the audit log or the state.
const AUDIT_KEY: &[u8] = b"AUDITKEYCANARY-0123456789-abcdefghijklmn";

/// `keyturn audit verify` with `config` and extra environment variables.
fn verify_with(config: &std::path::Path, env: &[(&str, &str)]) -> std::process::Output {
    let mut cmd = std::process::Command::new(bin());
    cmd.args(["audit", "verify", "--config"])
        .arg(config)
        .env_remove("KEYTURN_CONFIG")
        .env_remove("CREDENTIALS_DIRECTORY");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run keyturn")
}

/// Rewrites the audit log as an attacker without the key can: record 3
/// edited, every link a plain SHA-256 (the `chain` field dropped, or kept
/// when `keep_chain`), and the head in the state database set to match.
fn forge_plain_chain(env: &Env, original: &str, keep_chain: bool) {
    use sha2::Digest as _;
    let mut out: Vec<String> = Vec::new();
    for (i, line) in original.lines().enumerate() {
        let mut r: serde_json::Value = serde_json::from_str(line).unwrap();
        if i == 2 {
            r["detail"] = "nothing happened".into();
        }
        r["prev"] = match out.last() {
            None => keyturn::audit::GENESIS.into(),
            Some(p) => hex::encode(sha2::Sha256::digest(p.as_bytes())).into(),
        };
        if !keep_chain {
            r.as_object_mut().unwrap().remove("chain");
        }
        out.push(serde_json::to_string(&r).unwrap());
    }
    let last = out.last().unwrap();
    let hash = hex::encode(sha2::Sha256::digest(last.as_bytes()));
    std::fs::write(env.audit_log(), out.join("\n") + "\n").unwrap();
    let db = rusqlite::Connection::open(env.state_dir().join("state.db")).unwrap();
    let n = db
        .execute(
            "UPDATE audit_head SET seq = ?1, hash = ?2 WHERE id = 1",
            rusqlite::params![out.len() as i64, hash],
        )
        .unwrap();
    assert_eq!(n, 1, "the state database holds the audit head");
}

#[test]
fn a_keyed_audit_chain_cannot_be_rebuilt_without_the_key() {
    let env = Env::with_daemon(ONE_RAW, r#"audit_key_file = "{dir}/keys/audit.key""#);
    let keys = env.path().join("keys");
    std::fs::create_dir(&keys).unwrap();
    let key_file = keys.join("audit.key");
    let write_key = |bytes: &[u8], mode: u32| {
        std::fs::write(&key_file, bytes).unwrap();
        std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(mode)).unwrap();
    };
    // Unusable keys stop the daemon at start, with how to make one.
    let refused = |what: &str, needles: &[&str]| {
        let mut daemon = env.spawn(&[]);
        let status = daemon.wait_exit(Duration::from_secs(10)).expect(what);
        let log = daemon.log_text();
        assert_eq!(status.code(), Some(64), "{what}: a config error: {log}");
        assert!(log.contains(": daemon.audit_key_file: "), "{what}: {log}");
        for n in needles {
            assert!(log.contains(n), "{what}: should say {n:?}: {log}");
        }
        assert!(!log.contains("AUDITKEYCANARY"), "{what}: {log}");
    };
    refused(
        "missing",
        &["does not exist", "head -c 32 /dev/urandom > ", "chmod 600"],
    );
    assert!(!key_file.exists(), "keyturn never creates the key");
    write_key(&AUDIT_KEY[..31], 0o600);
    refused("short", &["holds 31 bytes", "at least 32"]);
    write_key(AUDIT_KEY, 0o640);
    refused("group-readable", &["mode 0640", "chmod 600"]);

    write_key(AUDIT_KEY, 0o600);
    let daemon = env.start();
    wait_version(&env, "bot", "db", 1);
    env.cli_ok(&["rotate", "bot/db", "--wait"]);
    let daemon_log = daemon.stop();
    let records = audit_records(&env);
    assert!(records.len() > 5);
    assert!(
        records.iter().all(|r| r["chain"] == "hmac-sha256"),
        "every record is keyed"
    );
    let out = env.cli(&["audit", "verify"]);
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("; keyed (hmac-sha256) from seq 1, checked with the audit key"),
        "{stdout}"
    );
    let original = std::fs::read_to_string(env.audit_log()).unwrap();

    // The same log and state without the key: not a pass.
    let no_key = env.path().join("no-key.toml");
    let text = std::fs::read_to_string(&env.config).unwrap();
    std::fs::write(&no_key, text.replace("audit_key_file", "# audit_key_file")).unwrap();
    let out = verify_with(&no_key, &[]);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("could not be checked") && err.contains("audit_key_file"),
        "{err}"
    );
    // The key from a systemd credential does instead.
    let creds = env.path().join("creds");
    std::fs::create_dir(&creds).unwrap();
    std::fs::write(creds.join("keyturn-audit-key"), AUDIT_KEY).unwrap();
    let out = verify_with(
        &no_key,
        &[("CREDENTIALS_DIRECTORY", creds.to_str().unwrap())],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Rebuilt with plain SHA-256 and the state head to match: detected,
    // whether the records still claim to be keyed or not.
    let mut outputs = vec![daemon_log, stdout, err];
    for keep_chain in [true, false] {
        forge_plain_chain(&env, &original, keep_chain);
        let out = env.cli(&["audit", "verify"]);
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        assert_eq!(out.status.code(), Some(1), "forgery passed: {err}");
        let expected = if keep_chain {
            "line 2 (seq 2): prev HMAC does not match line 1"
        } else {
            "the last record is plain (unkeyed) although the audit key is configured"
        };
        assert!(err.contains(expected), "{err}");
        outputs.push(err);
    }

    // The key never shows: not in the daemon's log, any output, the audit
    // log or the state database.
    let canary = &AUDIT_KEY[..14];
    for text in &outputs {
        assert!(!text.contains("AUDITKEYCANARY"), "{text}");
    }
    let db = env.state_dir().join("state.db");
    for file in [env.audit_log(), db.clone(), db.with_extension("db-wal")] {
        let Ok(bytes) = std::fs::read(&file) else {
            continue;
        };
        assert!(!contains(&bytes, canary), "{}", file.display());
    }
}

/// Black-box finding: another audit key (a key file rewritten, or another
/// file named) passed `check` and a reload, and the next start refused the
/// log as "truncated or altered". `check` and the reload refuse it, naming
/// the setting; the daemon goes on with the key it has.
#[test]
fn another_audit_key_is_refused_by_check_and_reload_before_a_start_would_fail() {
    let env = Env::with_daemon(ONE_RAW, r#"audit_key_file = "{dir}/keys/audit.key""#);
    let keys = env.path().join("keys");
    std::fs::create_dir(&keys).unwrap();
    let key_file = keys.join("audit.key");
    let write_key = |bytes: &[u8]| {
        std::fs::write(&key_file, bytes).unwrap();
        std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    };
    write_key(AUDIT_KEY);
    let daemon = env.start();
    wait_version(&env, "bot", "db", 1);
    env.cli_ok(&["rotate", "bot/db", "--wait"]);
    let mut other = AUDIT_KEY.to_vec();
    other[0] = b'X';
    write_key(&other);
    let out = env.cli(&["check"]);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(64), "{err}");
    assert!(
        err.contains("daemon.audit_key_file") && err.contains("was keyed with another key"),
        "{err}"
    );
    daemon.reload();
    let reload = wait_for(Duration::from_secs(10), || {
        audit_records(&env)
            .into_iter()
            .find(|r| r["event"] == "daemon.reload")
    })
    .expect("the reload is audited");
    assert_eq!(reload["outcome"], "failed", "{reload}");
    // Still rotating with the key it has; the key put back, all is well.
    env.cli_ok(&["rotate", "bot/db", "--wait"]);
    write_key(AUDIT_KEY);
    env.cli_ok(&["check"]);
    let log = daemon.stop();
    assert!(!log.contains("AUDITKEYCANARY") && !err.contains("AUDITKEYCANARY"));
    let daemon = env.start();
    daemon.stop();
    env.cli_ok(&["audit", "verify"]);
}

/// Black-box finding: `check` passed a state database a newer keyturn
/// had migrated, which the start refuses; the unit's `ExecStartPre=keyturn
/// check` then let a restart loop through. It says the daemon would not
/// start, and why.
#[test]
fn check_fails_on_a_state_database_of_a_newer_keyturn() {
    let env = Env::new(ONE_RAW);
    let daemon = env.start();
    wait_version(&env, "bot", "db", 1);
    daemon.stop();
    env.cli_ok(&["check"]);
    let db = rusqlite::Connection::open(env.state_dir().join("state.db")).unwrap();
    let version: i64 = db
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .unwrap();
    db.pragma_update(None, "user_version", version + 1).unwrap();
    drop(db);
    let out = env.cli(&["check"]);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("the daemon would not start") && err.contains("newer than this keyturn"),
        "{err}"
    );
}

/// Black-box finding: with `audit_key_file` taken out of the config,
/// `check` said ok of a keyed audit log the daemon then refused to start
/// on. By hand it warns (the unit may pass the key as a credential); under
/// systemd without the credential it fails, as the start would.
#[test]
fn check_says_when_a_keyed_audit_log_would_have_no_key() {
    let env = Env::with_daemon(ONE_RAW, r#"audit_key_file = "{dir}/keys/audit.key""#);
    let keys = env.path().join("keys");
    std::fs::create_dir(&keys).unwrap();
    let key_file = keys.join("audit.key");
    std::fs::write(&key_file, AUDIT_KEY).unwrap();
    std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let daemon = env.start();
    wait_version(&env, "bot", "db", 1);
    daemon.stop();
    let text = std::fs::read_to_string(&env.config).unwrap();
    let line = format!(
        "audit_key_file = \"{}/keys/audit.key\"",
        env.path().display()
    );
    assert!(text.contains(&line), "{text}");
    std::fs::write(&env.config, text.replace(&line, "")).unwrap();
    let out = env.cli(&["check"]);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("warning: the audit log")
            && err.contains("is keyed")
            && err.contains("no audit key is given"),
        "{err}"
    );
    // As the unit's `ExecStartPre=keyturn check` runs it: with systemd's
    // credentials directory.
    let credentials = env.path().join("credentials");
    std::fs::create_dir(&credentials).unwrap();
    let check_under_systemd = || {
        let out = std::process::Command::new(bin())
            .args(["check", "--config"])
            .arg(&env.config)
            .env("CREDENTIALS_DIRECTORY", &credentials)
            .env_remove("KEYTURN_CONFIG")
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        (out.status.code(), err)
    };
    let (code, err) = check_under_systemd();
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("the daemon would not start") && err.contains("is keyed"),
        "{err}"
    );
    // With the key as the credential, all is well.
    std::fs::copy(&key_file, credentials.join("keyturn-audit-key")).unwrap();
    let (code, err) = check_under_systemd();
    assert!(code == Some(0) && !err.contains("is keyed"), "{err}");

    // Black-box finding: `audit archive --broken` without the key started
    // a plain chain after the keyed one (a downgrade). It is refused; with
    // the key the new log is keyed and verifies.
    let before = std::fs::read_to_string(env.audit_log()).unwrap();
    let out = env.cli(&["audit", "archive", "--broken"]);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("is keyed") && err.contains("no audit key is given"),
        "{err}"
    );
    assert_eq!(std::fs::read_to_string(env.audit_log()).unwrap(), before);
    let with_key = |args: &[&str]| {
        std::process::Command::new(bin())
            .args(args)
            .arg("--config")
            .arg(&env.config)
            .env("CREDENTIALS_DIRECTORY", &credentials)
            .output()
            .unwrap()
    };
    let out = with_key(&["audit", "archive"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let records = audit_records(&env);
    assert_eq!(records[0]["event"], "audit.archived");
    assert_eq!(records[0]["chain"], "hmac-sha256");
    let out = with_key(&["audit", "verify"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A plain log goes keyed once the daemon runs with the key as a systemd
/// credential (`LoadCredentialEncrypted=keyturn-audit-key:...`).
#[test]
fn a_plain_audit_log_goes_keyed_with_the_systemd_credential() {
    let (env, daemon) = one_raw_at_version_1();
    daemon.stop();
    let plain = audit_records(&env).len();
    assert!(audit_records(&env).iter().all(|r| r.get("chain").is_none()));
    audit_verifies(&env, "plain");

    let creds = env.path().join("creds");
    std::fs::create_dir(&creds).unwrap();
    std::fs::write(creds.join("keyturn-audit-key"), AUDIT_KEY).unwrap();
    let creds_env = [("CREDENTIALS_DIRECTORY", creds.to_str().unwrap())];
    let daemon = env.start_with(&creds_env);
    env.cli_ok(&["rotate", "bot/db", "--wait"]);
    let log = daemon.stop();
    assert!(log.contains("keyed (hmac-sha256)"), "{log}");
    assert!(!log.contains("AUDITKEYCANARY"), "{log}");
    let records = audit_records(&env);
    assert!(records[..plain].iter().all(|r| r.get("chain").is_none()));
    assert!(records[plain..].iter().all(|r| r["chain"] == "hmac-sha256"));

    let out = verify_with(&env.config, &creds_env);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains(&format!("keyed (hmac-sha256) from seq {}", plain + 1)),
        "{stdout}"
    );
    // Without the credential the keyed part cannot be checked, and the
    // daemon will not append plain records after it.
    let out = verify_with(&env.config, &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("could not be checked"));
    let mut daemon = env.spawn(&[]);
    let status = daemon.wait_exit(Duration::from_secs(10)).expect("refused");
    let log = daemon.log_text();
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(log.contains("is keyed (hmac-sha256"), "{log}");
}

/// Waits until `event` is the log's last record and the head stored in the
/// state database reaches it, then checks that a copy of the log without it
/// fails verification.
fn cutting_the_last_record_is_detected(env: &Env, event: &str) {
    let db = env.state_dir().join("state.db");
    let found = wait_for(Duration::from_secs(5), || {
        let text = std::fs::read_to_string(env.audit_log()).ok()?;
        let last: serde_json::Value = serde_json::from_str(text.lines().last()?).ok()?;
        if last["event"] != event {
            return None;
        }
        use keyturn::state::StateStore as _;
        let store = keyturn::state::SqliteStore::open_read_only(&db).ok()?;
        let head = store.audit_head().ok()??;
        (Some(head.seq) == last["seq"].as_u64()).then_some((text, head))
    });
    let Some((text, head)) = found else {
        panic!(
            "{event}: the head in the state database does not reach it, so cutting it off is not detected; log:\n{}",
            std::fs::read_to_string(env.audit_log()).unwrap_or_default()
        );
    };
    let lines: Vec<&str> = text.lines().collect();
    let cut = env.path().join("audit-cut.log");
    let kept: String = lines[..lines.len() - 1]
        .iter()
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(&cut, kept).unwrap();
    let err = keyturn::audit::verify_file(&cut, Some(&head)).expect_err(event);
    assert!(
        matches!(err.problem, keyturn::audit::Problem::Truncated { .. }),
        "{event}: {err}"
    );
}

/// Defect (black-box): `daemon.reload` records said `actor: daemon` only,
/// so a reload could not be attributed. The SIGHUP's sender (pid and uid,
/// from its siginfo) is the reload's actor; so is SIGTERM's for the stop.
#[test]
fn a_reload_and_a_stop_are_attributed_to_the_process_that_sent_the_signal() {
    let env = Env::new("");
    let daemon = env.start();
    daemon.reload();
    let reload = audit_records(&env)
        .into_iter()
        .find(|r| r["event"] == "daemon.reload")
        .expect("the reload is audited");
    assert_eq!(
        reload["actor"],
        serde_json::json!({
            "type": "signal",
            "signal": "SIGHUP",
            "uid": unsafe { libc::getuid() },
            "pid": std::process::id(),
        }),
        "{reload}"
    );
    daemon.stop();
    let stop = audit_records(&env)
        .into_iter()
        .find(|r| r["event"] == "daemon.stop")
        .expect("the stop is audited");
    assert_eq!(
        stop["actor"],
        serde_json::json!({
            "type": "signal",
            "signal": "SIGTERM",
            "uid": unsafe { libc::getuid() },
            "pid": std::process::id(),
        }),
        "{stop}"
    );
    audit_verifies(&env, "after an attributed reload and stop");
}

#[test]
fn cutting_any_kind_of_record_off_the_end_is_detected() {
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "this test runs a client as another uid, which needs root (as CI runs the suite)"
    );
    let env = Env::new("");
    let daemon = env.start();
    cutting_the_last_record_is_detected(&env, "daemon.start");
    daemon.reload();
    cutting_the_last_record_is_detected(&env, "daemon.reload");

    // A hook that holds `set` open while the marker exists: the first
    // rotation waits there, and a manual rotate joins it, adding only
    // its own record.
    let marker = env.path().join("hold");
    std::fs::write(&marker, "").unwrap();
    let hook = env.path().join("hold.sh");
    std::fs::write(
        &hook,
        "#!/bin/sh\ncat >/dev/null\nwhile [ -e \"$1\" ]; do sleep 0.05; done\n",
    )
    .unwrap();
    std::fs::set_permissions(&hook, std::fs::Permissions::from_mode(0o755)).unwrap();
    env.write_credentials(&format!(
        r#"{}
[agents.bot.credentials.api]
vault = "local"
generate = {{ kind = "password", length = 24 }}
every = "1h"
target = {{ type = "command", program = "{{dir}}/hold.sh", args = ["{{dir}}/hold"], timeout = "60s" }}
deliver = [{{ type = "file", path = "{{root}}/bot/api", format = "raw" }}]
"#,
        agent_table("bot")
    ));
    daemon.reload();
    cutting_the_last_record_is_detected(&env, "rotation.create");
    env.cli_ok(&["rotate", "bot/api"]);
    cutting_the_last_record_is_detected(&env, "admin.rotate");
    // A socket mode loosened by an admin lets nobody connect, so that the
    // daemon itself refuses (and audits) it.
    std::fs::set_permissions(
        env.path().join("control.sock"),
        std::fs::Permissions::from_mode(0o666),
    )
    .unwrap();
    let refused = cli_as_nobody(&env, &["status"]);
    assert!(!refused.status.success());
    cutting_the_last_record_is_detected(&env, "admin.refused");
    std::fs::remove_file(&marker).unwrap();
    wait_version(&env, "bot", "api", 1);
    daemon.stop();
    cutting_the_last_record_is_detected(&env, "daemon.stop");

    // The same through `keyturn audit verify`, on the log itself.
    let original = std::fs::read_to_string(env.audit_log()).unwrap();
    let lines: Vec<&str> = original.lines().collect();
    std::fs::write(env.audit_log(), lines[..lines.len() - 1].join("\n") + "\n").unwrap();
    let out = env.cli(&["audit", "verify"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("the tail was truncated"), "{err}");
    std::fs::write(env.audit_log(), &original).unwrap();
    audit_verifies(&env, "restored");

    // Without the state database the tail cannot be checked: said, not passed.
    std::fs::rename(
        env.state_dir().join("state.db"),
        env.path().join("state.db.moved"),
    )
    .unwrap();
    let out = env.cli(&["audit", "verify"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("chain intact, but the tail was NOT checked")
            && err.contains("no state database"),
        "{err}"
    );
}

/// Where `key` is set in `config`: `FILE:LINE:COL: daemon.KEY: `, the
/// column that of its value.
fn located_at(config: &std::path::Path, key: &str) -> String {
    let text = std::fs::read_to_string(config).unwrap();
    let (n, line) = text
        .lines()
        .enumerate()
        .find(|(_, l)| l.starts_with(&format!("{key} = ")))
        .unwrap_or_else(|| panic!("{key} in {text}"));
    let col = line.find('"').unwrap() + 1;
    format!("{}:{}:{col}: daemon.{key}: ", config.display(), n + 1)
}

/// The daemon's start refuses a key file it cannot load and a socket group
/// that does not exist: `keyturn check` and `check --online` (the unit's
/// `ExecStartPre`, the operator's gate before a restart) refuse the same
/// config, by the same check, located like any config error, and the
/// daemon exits 64 with the same line.
#[test]
fn check_refuses_what_the_daemon_start_refuses_on_this_host() {
    let port = free_port();
    let cases: [(&str, String, &str, &[&str]); 4] = [
        (
            "16-byte audit key",
            r#"audit_key_file = "{dir}/short.key""#.into(),
            "audit_key_file",
            &["holds 16 bytes", "at least 32", "head -c 32 /dev/urandom"],
        ),
        (
            "0644 audit key",
            r#"audit_key_file = "{dir}/open.key""#.into(),
            "audit_key_file",
            &["mode 0644", "chmod 600"],
        ),
        (
            "0644 nudge key",
            format!("listen = \"127.0.0.1:{port}\"\nfollow_nudge_key_file = \"{{dir}}/open.key\""),
            "follow_nudge_key_file",
            &["mode 0644", "chmod 600"],
        ),
        (
            "missing socket group",
            r#"socket_group = "kt-no-such-group-4711""#.into(),
            "socket_group",
            &["group `kt-no-such-group-4711` does not exist"],
        ),
    ];
    for (what, extra, key, needles) in cases {
        let env = Env::with_daemon(ONE_RAW, &extra);
        let write = |name: &str, bytes: &[u8], mode: u32| {
            let f = env.path().join(name);
            std::fs::write(&f, bytes).unwrap();
            std::fs::set_permissions(&f, std::fs::Permissions::from_mode(mode)).unwrap();
        };
        write("short.key", &AUDIT_KEY[..16], 0o600);
        write("open.key", AUDIT_KEY, 0o644);
        let located = located_at(&env.config, key);
        for args in [&["check"][..], &["check", "--online"]] {
            let out = env.cli(args);
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(64), "{what}: {args:?}: {err}");
            assert!(
                err.contains(&located),
                "{what}: {args:?}: {located:?} in {err}"
            );
            for n in needles {
                assert!(err.contains(n), "{what}: {args:?}: should say {n:?}: {err}");
            }
        }
        let mut daemon = env.spawn(&[]);
        let status = daemon.wait_exit(Duration::from_secs(10)).expect(what);
        let log = daemon.log_text();
        assert_eq!(status.code(), Some(64), "{what}: {log}");
        assert!(log.contains(&located), "{what}: {located:?} in {log}");
        assert!(!log.contains("AUDITKEYCANARY"), "{what}: {log}");
    }
}

/// A reload carrying a restart-only setting the next start would refuse is
/// refused now (the old config kept, the located error in the status), not
/// accepted with "takes effect after a restart"; once the key is fixed, the
/// same reload goes through with that warning.
#[test]
fn a_reload_that_would_stop_the_next_start_is_refused() {
    let (env, daemon) = one_raw_at_version_1();
    let key = env.path().join("audit.key");
    std::fs::write(&key, &AUDIT_KEY[..16]).unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let good = std::fs::read_to_string(&env.config).unwrap();
    let with_key = good.replacen(
        "\n[vaults.local]",
        &format!("audit_key_file = \"{}\"\n\n[vaults.local]", key.display()),
        1,
    );
    assert_ne!(with_key, good);
    std::fs::write(&env.config, &with_key).unwrap();
    daemon.reload();
    let located = located_at(&env.config, "audit_key_file");
    let refused = daemon
        .notifications()
        .into_iter()
        .find(|m| m.contains("STATUS=reload failed"))
        .unwrap_or_else(|| panic!("reload refused: {}", daemon.log_text()));
    assert!(refused.contains(&located), "{located:?} in {refused}");
    assert!(refused.contains("holds 16 bytes"), "{refused}");
    assert!(
        !daemon.log_text().contains("config reloaded"),
        "{}",
        daemon.log_text()
    );

    std::fs::write(&key, AUDIT_KEY).unwrap();
    daemon.reload();
    let log = daemon.log_text();
    assert!(
        log.contains("config reloaded") && log.contains("daemon.audit_key_file"),
        "accepted, with the restart warning: {log}"
    );
    daemon.stop();
}

#[test]
fn check_passes_every_shipped_config() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    // packaging/keyturn.toml: the packages' /etc/keyturn/keyturn.toml.
    let mut files = vec![
        root.join("config/keyturn.toml"),
        root.join("packaging/keyturn.toml"),
    ];
    for e in std::fs::read_dir(root.join("config/examples")).unwrap() {
        files.push(e.unwrap().path());
    }
    let check = |f: &std::path::Path| {
        std::process::Command::new(bin())
            .args(["check", "--config"])
            .arg(f)
            .output()
            .unwrap()
    };
    // The group of `socket_group = "keyturn"` (the packaged config and an
    // example) is created by the package (sysusers); `check` checks the
    // group exists on this host, as the daemon's start does. Without it
    // here, the group is the one error, and the same config with a group
    // this host has passes.
    let tmp = tempfile::tempdir().unwrap();
    let has_group = nix::unistd::Group::from_name("keyturn").unwrap().is_some();
    for (i, f) in files.iter_mut().enumerate() {
        let text = std::fs::read_to_string(&*f).unwrap();
        if has_group || !text.contains("socket_group = \"keyturn\"") {
            continue;
        }
        let out = check(f);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{stderr}");
        assert!(
            stderr.contains(": daemon.socket_group: control socket group `keyturn` does not exist")
                && stderr.contains("1 error(s)"),
            "{stderr}"
        );
        let copy = tmp.path().join(format!("{i}.toml"));
        std::fs::write(
            &copy,
            text.replace("socket_group = \"keyturn\"", "socket_group = \"root\""),
        )
        .unwrap();
        *f = copy;
    }
    // The alert sinks' key files are read too (a missing one stops the
    // start): an example's `/etc/keyturn/*.key` is named by `check` on a
    // host without it, and passes with files of the same kind.
    for (i, f) in files.iter_mut().enumerate() {
        let text = std::fs::read_to_string(&*f).unwrap();
        let keys: Vec<&str> = text
            .lines()
            .filter(|l| !l.trim_start().starts_with('#'))
            .filter_map(|l| l.split('"').nth(1))
            .filter(|v| v.starts_with("/etc/keyturn/") && v.ends_with(".key"))
            .filter(|v| !std::path::Path::new(v).exists())
            .collect();
        if keys.is_empty() {
            continue;
        }
        let out = check(f);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{stderr}");
        let mut copy_text = text.clone();
        for (n, key) in keys.iter().enumerate() {
            assert!(stderr.contains(&format!("{key}: No such file")), "{stderr}");
            let local = tmp.path().join(format!("{i}-{n}.key"));
            std::fs::write(&local, "0123456789abcdef0123456789abcdef").unwrap();
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&local, std::fs::Permissions::from_mode(0o600)).unwrap();
            copy_text = copy_text.replace(key, &local.display().to_string());
        }
        let copy = tmp.path().join(format!("{i}-keys.toml"));
        std::fs::write(&copy, copy_text).unwrap();
        *f = copy;
    }
    for f in files {
        let out = check(&f);
        assert!(
            out.status.success(),
            "{}: {}",
            f.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn every_bad_config_fixture_exits_64_with_a_located_error() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/config");
    let mut n = 0;
    for e in std::fs::read_dir(&dir).unwrap() {
        let p = e.unwrap().path();
        let name = p.file_name().unwrap().to_string_lossy().to_string();
        if !name.starts_with("bad-") {
            continue;
        }
        n += 1;
        let out = std::process::Command::new(bin())
            .args(["check", "--config"])
            .arg(&p)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{name}: {err}");
        let located = format!("{}:", p.display());
        assert!(
            err.contains(&located),
            "{name}: error names the file: {err}"
        );
        let after = &err[err.find(&located).unwrap() + located.len()..];
        let mut parts = after.splitn(3, ':');
        let line: usize = parts.next().unwrap().parse().unwrap_or(0);
        assert!(line > 0, "{name}: error has a line number: {err}");
    }
    assert!(n >= 12, "expected a fixture per rule, found {n}");
}

#[test]
fn rotate_without_a_daemon_says_what_to_do() {
    let env = Env::new(ONE_RAW);
    let out = env.cli(&["rotate", "bot/db", "--wait"]);
    assert_eq!(out.status.code(), Some(69));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("daemon"), "{err}");
    let bad = env.cli(&["rotate", "Bot/../db"]);
    assert_eq!(bad.status.code(), Some(64));
}

#[test]
fn status_without_a_daemon_shows_the_stored_state() {
    let (env, daemon) = one_raw_at_version_1();
    daemon.stop();
    let out = env.cli_ok(&["status", "--json"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("showing the state stored"));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let rows = &doc["credentials"];
    assert_eq!(rows[0]["version"], 1);
    assert_eq!(rows[0]["state"], "stopped");
    // Tasks too, from the task store (none here).
    assert_eq!(doc["tasks"], serde_json::json!([]), "{doc}");
}

#[test]
fn reload_adds_a_credential_and_rotates_it() {
    let (env, daemon) = one_raw_at_version_1();
    let mut text = std::fs::read_to_string(&env.config).unwrap();
    text.push_str(&format!(
        "\n[agents.bot.credentials.token]\nvault = \"local\"\ngenerate = {{ kind = \"api_key\", prefix = \"tok_\", length = 24 }}\nevery = \"1h\"\ndeliver = [{{ type = \"file\", path = \"{}/bot/token\" }}]\n",
        env.root().display()
    ));
    std::fs::write(&env.config, text).unwrap();
    daemon.reload();
    wait_version(&env, "bot", "token", 1);
    let token = std::fs::read_to_string(env.root().join("bot/token")).unwrap();
    assert!(token.starts_with("tok_") && token.len() == 28, "{token:?}");
    assert_eq!(
        version_of(&env, "bot", "db"),
        Some(1),
        "the other credential is untouched"
    );
    daemon.stop();
}

#[test]
fn overdue_rotations_after_downtime_are_spread_not_stampeded() {
    let mut creds = agent_table("bot");
    for i in 0..5 {
        creds.push_str(&format!(
            "[agents.bot.credentials.c{i}]\nvault = \"local\"\ngenerate = {{ kind = \"password\", length = 16 }}\nevery = \"2s\"\ngrace = \"0s\"\ndeliver = [{{ type = \"file\", path = \"{{root}}/bot/c{i}\" }}]\n"
        ));
    }
    let env = Env::with_daemon(&creds, "");
    // Replace the harness's 1s catch-up window with a 10s one.
    let text = std::fs::read_to_string(&env.config)
        .unwrap()
        .replace("catch_up_spread = \"1s\"", "catch_up_spread = \"10s\"");
    std::fs::write(&env.config, text).unwrap();
    // Run once with a long interval so nothing rotates again, then stop.
    let slow = std::fs::read_to_string(&env.config)
        .unwrap()
        .replace("every = \"2s\"", "every = \"1h\"");
    let fast = std::fs::read_to_string(&env.config).unwrap();
    std::fs::write(&env.config, &slow).unwrap();
    let first = env.start();
    for i in 0..5 {
        wait_version(&env, "bot", &format!("c{i}"), 1);
    }
    first.stop();
    // Downtime: with a 2s interval every credential is now overdue.
    std::fs::write(&env.config, &fast).unwrap();
    std::thread::sleep(Duration::from_millis(2500));
    let second = env.start();
    std::thread::sleep(Duration::from_millis(800));
    let early = status_json(&env)
        .iter()
        .filter(|r| r["version"].as_u64() >= Some(2))
        .count();
    assert!(
        early <= 2,
        "{early} of 5 overdue rotations fired at once; they should be spread over 10s"
    );
    for i in 0..5 {
        wait_version(&env, "bot", &format!("c{i}"), 2);
    }
    second.stop();
}

/// [`ONE_RAW`] (kept in grace) with the HTTP listener on a free port.
fn with_http_listener() -> (u16, Env) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let env = Env::with_daemon(
        &ONE_RAW.replace("grace = \"0s\"", "grace = \"1h\""),
        &format!("listen = \"127.0.0.1:{port}\""),
    );
    (port, env)
}

#[test]
fn http_listener_serves_metrics_health_and_readiness() {
    let (port, env) = with_http_listener();
    let daemon = env.spawn(&[("KEYTURN_LOG", "info")]);
    daemon.wait_ready();
    wait_version(&env, "bot", "db", 1);
    assert!(http_get(port, "/healthz").starts_with("HTTP/1.1 200"));
    assert!(http_get(port, "/readyz").starts_with("HTTP/1.1 200"));
    let metrics = http_get(port, "/metrics");
    for needle in [
        "keyturn_rotations_total{result=\"ok\"} 1",
        // Version 1 has no previous version to retire: idle in its grace.
        "keyturn_credentials{state=\"idle\"} 1",
        "keyturn_credentials{state=\"retiring\"} 0",
        "keyturn_credential_age_seconds{agent=\"bot\",credential=\"db\"}",
        "keyturn_credential_next_due_seconds{agent=\"bot\",credential=\"db\"}",
        "keyturn_rotation_duration_seconds_count 1",
    ] {
        assert!(
            metrics.contains(needle),
            "metrics lack {needle}:\n{metrics}"
        );
    }
    daemon.stop();
}

/// Any local user can open TCP connections to the HTTP listener. With the
/// daemon at 256 open files (soft; hard 1024), 400 idle connections used to
/// take every descriptor: /healthz went unanswered, the control socket
/// stopped accepting and deliveries failed with EMFILE. Now the soft limit
/// is raised to the hard one, the listener holds at most its share and
/// closes the oldest idle connection for a new one, and a header that never
/// ends is cut off.
#[test]
fn idle_http_connections_cannot_exhaust_the_daemons_descriptors() {
    use std::io::{Read, Write};
    let (port, env) = with_http_listener();
    let daemon = env.spawn_command(&[("KEYTURN_LOG", "info")], |cmd| {
        limit_open_files(cmd, 256, 1024);
    });
    daemon.wait_ready();
    wait_version(&env, "bot", "db", 1);
    let idle: Vec<std::net::TcpStream> = (0..400)
        .map(|_| std::net::TcpStream::connect(("127.0.0.1", port)).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(500));

    let mut health = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    health
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    write!(
        health,
        "GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut answer = String::new();
    let _ = health.read_to_string(&mut answer);
    assert!(
        answer.starts_with("HTTP/1.1 200"),
        "/healthz with 400 idle connections open: {answer:?}"
    );
    // The control socket accepts, and a rotation delivers (a file: new
    // descriptors), each within a bound rather than hanging.
    let bounded = |args: &[&str]| {
        std::process::Command::new("timeout")
            .arg("30")
            .arg(bin())
            .args(args)
            .arg("--config")
            .arg(&env.config)
            .env_remove("KEYTURN_CONFIG")
            .output()
            .unwrap()
    };
    let out = bounded(&["status"]);
    assert!(
        out.status.success(),
        "status: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = bounded(&["rotate", "bot/db", "--wait"]);
    assert!(
        out.status.success(),
        "rotate --wait: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(version_of(&env, "bot", "db"), Some(2));
    drop(idle);

    // A header that never ends is cut off after the header-read timeout
    // (10 s), however slowly it trickles in.
    let mut slow = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    let started = std::time::Instant::now();
    let mut cut_off = false;
    for i in 0..30 {
        std::thread::sleep(Duration::from_secs(1));
        if slow.write_all(format!("X-{i}: y\r\n").as_bytes()).is_err() {
            cut_off = true;
            break;
        }
    }
    assert!(cut_off, "a slow header was not cut off in 30 s");
    assert!(
        started.elapsed() >= Duration::from_secs(9),
        "{:?}",
        started.elapsed()
    );
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", daemon.pid())).unwrap();
    let open_files = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    assert!(
        open_files
            .split_whitespace()
            .skip(3)
            .take(2)
            .eq(["1024", "1024"]),
        "the soft limit is raised to the hard one: {open_files}"
    );

    let log = daemon.stop();
    assert!(!log.contains("Too many open files"), "{log}");
}

#[test]
fn json_log_format_writes_one_json_object_per_line() {
    let env = Env::new(ONE_RAW);
    let mut cmd = std::process::Command::new(bin());
    let notify = env.path().join("n.sock");
    let sock = std::os::unix::net::UnixDatagram::bind(&notify).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let child = cmd
        .args(["daemon", "--log-format", "json", "--config"])
        .arg(&env.config)
        .env("NOTIFY_SOCKET", &notify)
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut buf = [0u8; 1024];
    let n = sock.recv(&mut buf).expect("READY");
    assert!(String::from_utf8_lossy(&buf[..n]).contains("READY=1"));
    wait_version(&env, "bot", "db", 1);
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(lines.len() >= 3, "{text}");
    for l in lines {
        let v: serde_json::Value =
            serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"));
        assert!(v["level"].is_string() && v["timestamp"].is_string(), "{l}");
    }
    assert!(text.contains("\"message\":\"rotated\""), "{text}");
}

/// Black-box finding: `rotate nobody` exited 1, the code of a failed
/// rotation; a name the config does not have is 67, as for `decommission`.
#[test]
fn rotate_of_an_unknown_agent_or_credential_exits_67() {
    let env = Env::new(ONE_RAW);
    let daemon = env.start();
    wait_version(&env, "bot", "db", 1);
    for selector in ["nobody", "bot/nothing"] {
        let out = env.cli(&["rotate", selector]);
        assert_eq!(out.status.code(), Some(67), "{selector}: {out:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("in the config (see `keyturn status`)"),
            "{err}"
        );
    }
    let out = env.cli(&["rotate", "bot/db", "--wait"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    daemon.stop();
}

/// Black-box finding: the errors that stop the start were plain text under
/// `--log-format json`, the one thing a log pipeline must see. Each is a
/// JSON line, naming its file and line, and the exit is still 64.
#[test]
fn json_log_format_writes_config_errors_as_json_lines() {
    let env = Env::new(ONE_RAW);
    let text = std::fs::read_to_string(&env.config).unwrap();
    std::fs::write(
        &env.config,
        format!("{text}\n[agents.bot.credentials.two]\nvault = \"nowhere\"\n"),
    )
    .unwrap();
    let out = std::process::Command::new(bin())
        .args(["daemon", "--log-format", "json", "--config"])
        .arg(&env.config)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64), "{out:?}");
    let text = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<serde_json::Value> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let errors: Vec<&str> = lines
        .iter()
        .filter(|v| v["message"] == "config error")
        .map(|v| v["error"].as_str().unwrap_or_default())
        .collect();
    assert!(!errors.is_empty(), "{text}");
    let config = env.config.display().to_string();
    assert!(
        errors
            .iter()
            .all(|e| e.contains(&format!("{config}:")) && e.contains("agents.bot.credentials.two")),
        "each error names its file, line and TOML path: {text}"
    );
    assert!(text.contains("not starting"), "{text}");
}

/// Runs a CLI command as uid/gid 65534 (nobody), which needs root. It
/// needs to reach the binary (a copy beside the config: the checkout may
/// sit where nobody cannot enter, e.g. /root), the config and the socket's
/// directory.
fn cli_as_nobody(env: &Env, args: &[&str]) -> std::process::Output {
    use std::os::unix::process::CommandExt;
    let bin_copy = env.path().join("keyturn-client");
    if !bin_copy.exists() {
        std::fs::copy(bin(), &bin_copy).unwrap();
    }
    std::fs::set_permissions(env.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&env.config, std::fs::Permissions::from_mode(0o644)).unwrap();
    std::process::Command::new(&bin_copy)
        .args(args)
        .arg("--config")
        .arg(&env.config)
        .env_remove("KEYTURN_CONFIG")
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap()
}

/// A user the kernel keeps off the socket (mode 0660, another group) gets
/// EX_NOPERM (77), not "no daemon listening" (69), and is told which group
/// to join. That refusal never reaches the daemon, so it is not audited.
#[test]
fn a_user_kept_off_the_socket_exits_77_naming_the_socket_group() {
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "this test runs a client as another uid, which needs root (as CI runs the suite)"
    );
    let daemon_group = nix::unistd::Group::from_gid(nix::unistd::Gid::from_raw(1))
        .ok()
        .flatten()
        .expect("group 1 exists")
        .name;
    let env = Env::with_daemon(ONE_RAW, &format!("socket_group = \"{daemon_group}\""));
    let daemon = env.start();
    for args in [&["status"][..], &["rotate", "bot/db"][..]] {
        let out = cli_as_nobody(&env, args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(77), "{args:?}: {stderr}");
        assert!(stderr.contains("permission denied on"), "{stderr}");
        assert!(
            stderr.contains(&format!(
                "add the user to the socket's group `{daemon_group}`"
            )),
            "{stderr}"
        );
    }
    daemon.stop();
}

#[test]
fn a_peer_outside_the_socket_policy_is_refused_and_audited() {
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "this test runs a client as another uid, which needs root (as CI runs the suite)"
    );
    let env = Env::new(ONE_RAW);
    let daemon = env.start();
    // An admin loosening the socket's mode must still not let nobody in:
    // SO_PEERCRED is checked on every connection.
    std::fs::set_permissions(
        env.path().join("control.sock"),
        std::fs::Permissions::from_mode(0o666),
    )
    .unwrap();
    let out = cli_as_nobody(&env, &["rotate", "bot/db", "--wait"]);
    let err = String::from_utf8_lossy(&out.stderr);
    // EX_NOPERM, as when the kernel refuses the connection.
    assert_eq!(out.status.code(), Some(77), "{err}");
    assert!(err.contains("65534"), "the refusal names the uid: {err}");
    daemon.stop();
    let audit = std::fs::read_to_string(env.audit_log()).unwrap();
    let refused = audit
        .lines()
        .find(|l| l.contains("\"event\":\"admin.refused\""))
        .expect("refusal audited");
    assert!(
        refused.contains("\"uid\":65534") && refused.contains("\"outcome\":\"refused\""),
        "{refused}"
    );
    assert!(
        !audit.contains("\"event\":\"admin.rotate\""),
        "the refused request did not run"
    );
}

/// Black-box finding: every refused control connection was an fsynced
/// audit record, so a user who could reach the socket filled the log by
/// connecting in a loop. Refusals on the control socket are rate-limited
/// per uid like the agents' socket's, and summarized by the stop.
#[test]
fn a_flood_of_refused_control_connections_is_audited_only_a_few_times() {
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "this test runs a client as another uid, which needs root (as CI runs the suite)"
    );
    let env = Env::new(ONE_RAW);
    let daemon = env.start();
    std::fs::set_permissions(
        env.path().join("control.sock"),
        std::fs::Permissions::from_mode(0o666),
    )
    .unwrap();
    for _ in 0..25 {
        let out = cli_as_nobody(&env, &["status"]);
        assert_eq!(
            out.status.code(),
            Some(77),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    daemon.stop();
    let records = audit_records(&env);
    let refused: Vec<_> = records
        .iter()
        .filter(|r| r["event"] == "admin.refused")
        .collect();
    assert_eq!(refused.len(), 11, "10 refusals and a summary: {refused:?}");
    assert!(refused.iter().all(|r| r["actor"]["uid"] == 65534));
    let summary = refused
        .iter()
        .find_map(|r| r["detail"].as_str().filter(|d| d.contains("more refusals")))
        .unwrap_or_else(|| panic!("no summary: {refused:?}"));
    assert!(
        summary.starts_with("and 15 more refusals from uid 65534 in the last "),
        "{summary}"
    );
    audit_verifies(&env, "after refused control connections");
}

/// Defect: a lost state database (vaults, vault key and audit log intact)
/// was taken as a new one: versions numbered from 1 again while the vault
/// went on, and the audit log got a second promote of version 1. The
/// daemon refuses to start on a state database with no audit head beside
/// an audit log that has records, names both files and what to do, and
/// changes nothing. Starting over as the message says works.
#[test]
fn a_lost_state_database_beside_an_audit_log_with_records_is_refused() {
    let (env, daemon) = one_raw_at_version_1();
    for _ in 0..2 {
        env.cli_ok(&["rotate", "bot/db", "--wait"]);
    }
    daemon.stop();
    let state = env.state_dir();
    let db = state.join("state.db");
    let remove_state = || {
        for f in ["state.db", "state.db-wal", "state.db-shm"] {
            let _ = std::fs::remove_file(state.join(f));
        }
    };
    remove_state();
    let tree = |dir: &std::path::Path| {
        let mut t = read_tree(dir);
        t.sort();
        t
    };
    let (state_before, delivered_before) = (tree(&state), tree(&env.root()));
    let log_before = std::fs::read(env.audit_log()).unwrap();
    let refused = |what: &str| {
        let mut daemon = env.spawn(&[]);
        let status = daemon.wait_exit(Duration::from_secs(10)).expect(what);
        let log = daemon.log_text();
        assert_eq!(status.code(), Some(1), "{what}: {log}");
        let audit = env.audit_log().display().to_string();
        for needle in [
            format!("the state database {} is missing or new", db.display()),
            format!("the audit log {audit} already holds records (up to seq "),
            format!("Restore {} from a backup", db.display()),
            format!("`mv {audit} {audit}.old`"),
        ] {
            assert!(
                log.contains(&needle),
                "{what}: should say {needle:?}: {log}"
            );
        }
        assert_eq!(
            std::fs::read(env.audit_log()).unwrap(),
            log_before,
            "{what}"
        );
        assert_eq!(tree(&env.root()), delivered_before, "{what}");
    };
    refused("no state database");
    assert_eq!(tree(&state), state_before, "nothing written or created");
    assert!(!db.exists());

    // An empty state database in its place (restored from the wrong file,
    // say) has no head either.
    std::fs::write(&db, b"").unwrap();
    refused("an empty state database");
    let vault_files = |t: Vec<(std::path::PathBuf, Vec<u8>)>| {
        t.into_iter()
            .filter(|(p, _)| p.starts_with(state.join("vaults")) || p.ends_with("local-vault.key"))
            .collect::<Vec<_>>()
    };
    assert_eq!(vault_files(tree(&state)), vault_files(state_before.clone()));

    // Starting over, as the message says: the old log moved away.
    remove_state();
    let old = env.audit_log().with_extension("log.old");
    std::fs::rename(env.audit_log(), &old).unwrap();
    let daemon = env.start();
    wait_version(&env, "bot", "db", 1);
    daemon.stop();
    assert_eq!(std::fs::read(&old).unwrap(), log_before);
    audit_verifies(&env, "the new log");
}

/// Black-box finding: `check --online` against a PostgreSQL behind a proxy
/// that stalled reported the failure and exit 69, then, 8 times in 10, a
/// tokio panic and its backtrace: the login given up at `--timeout` was
/// still running on the blocking pool when the runtime shut down. (This
/// test's silent and trickling servers did not make it panic before the
/// fix either; it holds the clean end: the report, exit 69, no panic.)
#[test]
fn check_online_against_a_server_that_never_answers_ends_cleanly() {
    // A server that answers one byte every 200 ms, for ever.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = silent.local_addr().unwrap().port();
    let trickle = silent.try_clone().unwrap();
    std::thread::spawn(move || {
        for conn in trickle.incoming() {
            let Ok(mut conn) = conn else { return };
            std::thread::spawn(move || {
                use std::io::Write as _;
                while conn.write_all(b"R").is_ok() {
                    std::thread::sleep(Duration::from_millis(200));
                }
            });
        }
    });
    let env = Env::new("");
    let dsn = env.path().join("admin.dsn");
    std::fs::write(
        &dsn,
        format!("host=127.0.0.1 port={port} user=admin password=x dbname=postgres\n"),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&dsn, std::fs::Permissions::from_mode(0o600)).unwrap();
    env.write_credentials(&format!(
        "{}[agents.bot.credentials.db]\nvault = \"local\"\ngenerate = {{ kind = \"password\", length = 16 }}\nevery = \"1h\"\ntarget = {{ type = \"postgres\", admin_dsn_file = \"{}\", role = \"bot\", connect_timeout = \"2s\" }}\n",
        agent_table("bot"),
        dsn.display()
    ));
    for _ in 0..3 {
        let out = env.cli(&["check", "--online", "--timeout", "1s"]);
        let (stdout, stderr) = (
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
        );
        assert_eq!(out.status.code(), Some(69), "{stdout}{stderr}");
        assert!(stdout.contains("FAILED"), "{stdout}");
        assert!(
            !stderr.contains("panicked") && !stdout.contains("panicked"),
            "{stdout}{stderr}"
        );
    }
    drop(silent);
}

/// Black-box finding: a vault `token_file` (or a PostgreSQL admin DSN)
/// every local user could read passed `check` silently, where key files
/// must be 0600. `check` warns, naming the setting; 0640 is fine.
#[test]
fn check_warns_of_a_secret_file_every_user_can_read() {
    use std::os::unix::fs::PermissionsExt;
    let env = Env::new("");
    let token = env.path().join("bao.token");
    let dsn = env.path().join("admin.dsn");
    std::fs::write(&token, "s.canary-token-1\n").unwrap();
    std::fs::write(&dsn, "host=127.0.0.1 user=admin password=canary-pw-1\n").unwrap();
    env.write_credentials(&format!(
        "[vaults.bao]\ntype = \"vault\"\naddress = \"http://127.0.0.1:1\"\ntoken_file = \"{}\"\n\n{}[agents.bot.credentials.db]\nvault = \"bao\"\ngenerate = {{ kind = \"password\", length = 16 }}\nevery = \"1h\"\ntarget = {{ type = \"postgres\", admin_dsn_file = \"{}\", role = \"bot\" }}\n",
        token.display(),
        agent_table("bot"),
        dsn.display()
    ));
    let check = |mode: u32| {
        for f in [&token, &dsn] {
            std::fs::set_permissions(f, std::fs::Permissions::from_mode(mode)).unwrap();
        }
        let out = env.cli(&["check"]);
        assert_eq!(out.status.code(), Some(0), "{out:?}");
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(!stderr.contains("canary"), "{stderr}");
        stderr
    };
    let stderr = check(0o644);
    for what in [
        "vaults.bao.token_file",
        "agents.bot.credentials.db.target.admin_dsn_file",
    ] {
        assert!(
            stderr.contains(&format!("warning: {what}"))
                && stderr.contains("every local user can read it (mode 0644)"),
            "{what}: {stderr}"
        );
    }
    let stderr = check(0o640);
    assert!(!stderr.contains("every local user can read"), "{stderr}");
    assert!(!stderr.contains("fails until it is there"), "{stderr}");
    // Files a step reads that are not there (yet): a warning each
    // (black-box finding: a missing CA file passed `check`).
    env.write_credentials(&format!(
        "{}[agents.bot.credentials.db]\nvault = \"local\"\ngenerate = {{ kind = \"password\", length = 16 }}\nevery = \"1h\"\ntarget = {{ type = \"postgres\", admin_dsn_file = \"{d}/no.dsn\", role = \"bot\", sslmode = \"verify-full\", ssl_root_cert = \"{d}/no-ca.pem\" }}\n",
        agent_table("bot"),
        d = env.path().display()
    ));
    let out = env.cli(&["check"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    for what in ["admin_dsn_file", "ssl_root_cert"] {
        assert!(
            stderr.contains(&format!(
                "warning: agents.bot.credentials.db.target.{what}: "
            )) && stderr.contains("every rotation of the credential fails until it is there"),
            "{what}: {stderr}"
        );
    }
}

/// Black-box finding: a webhook sink's `secret_file` of mode 0644 passed
/// `check` (and `check --online`), and every delivery to it then failed at
/// the daemon's preflight. `check` warns, naming the sink; a good key file
/// passes silently.
#[test]
fn check_warns_of_a_webhook_key_file_the_daemon_cannot_use() {
    use std::os::unix::fs::PermissionsExt;
    let env = Env::new("");
    let key = env.path().join("hook.key");
    std::fs::write(&key, "CANARY-hook-key-0123456789abcdef0123456789\n").unwrap();
    env.write_credentials(&format!(
        "{}[agents.bot.credentials.db]\nvault = \"local\"\ngenerate = {{ kind = \"password\", length = 16 }}\nevery = \"1h\"\ndeliver = [{{ type = \"webhook\", url = \"http://127.0.0.1:9/hook\", secret_file = \"{}\" }}]\n",
        agent_table("bot"),
        key.display()
    ));
    let check = |mode: u32| {
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(mode)).unwrap();
        let out = env.cli(&["check"]);
        assert_eq!(out.status.code(), Some(0), "{out:?}");
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(!stderr.contains("CANARY"), "{stderr}");
        stderr
    };
    let stderr = check(0o644);
    assert!(
        stderr.contains("warning: agents.bot.credentials.db.deliver[0].secret_file")
            && stderr.contains("mode 0644"),
        "{stderr}"
    );
    let stderr = check(0o600);
    assert!(!stderr.contains("secret_file"), "{stderr}");
}

/// Black-box finding: SIGUSR1 (what many logrotate scripts send to reopen
/// logs) ended the daemon, with no log line and no `daemon.stop` record.
/// It is logged and ignored.
#[test]
fn sigusr1_is_logged_and_ignored() {
    let env = Env::new(ONE_RAW);
    let daemon = env.start();
    wait_version(&env, "bot", "db", 1);
    daemon.signal(libc::SIGUSR1);
    wait_for(Duration::from_secs(10), || {
        daemon
            .log_text()
            .contains("SIGUSR1/SIGUSR2 ignored")
            .then_some(())
    })
    .unwrap_or_else(|| panic!("not logged: {}", daemon.log_text()));
    let log = daemon.log_text();
    assert!(
        log.contains("SIGUSR1 from uid="),
        "names the signal and its sender: {log}"
    );
    env.cli_ok(&["rotate", "bot/db", "--wait"]);
    daemon.stop();
    assert!(
        audit_records(&env)
            .iter()
            .any(|r| r["event"] == "daemon.stop"),
        "stopped by SIGTERM, not by the SIGUSR1"
    );
}

/// Black-box finding: hook programs got the descriptors the daemon had
/// inherited from whatever started it (a shell's pipe, say). The daemon
/// marks them close-on-exec at start: a hook sees none of them.
#[test]
fn hooks_get_no_descriptor_the_daemon_inherited() {
    use std::os::unix::fs::MetadataExt;
    let env = Env::new(&format!(
        r#"{}
[agents.bot.credentials.api]
vault = "local"
generate = {{ kind = "password", length = 32 }}
every = "1h"
target = {{ type = "command", program = "{{dir}}/hook.sh", args = ["{{dir}}"] }}
deliver = [{{ type = "file", path = "{{root}}/bot/api", format = "raw" }}]
"#,
        agent_table("bot")
    ));
    let hook = env.path().join("hook.sh");
    std::fs::write(
        &hook,
        "#!/bin/sh\ncat > /dev/null\nfor f in /proc/$$/fd/*; do readlink \"$f\" || true; done >> \"$1/fds\"\nexit 0\n",
    )
    .unwrap();
    std::fs::set_permissions(&hook, std::fs::Permissions::from_mode(0o755)).unwrap();
    // A pipe without close-on-exec, as a shell's would be: the daemon
    // (a child of this test process) inherits both ends.
    let mut fds = [0; 2];
    // SAFETY: pipe(2) fills the two-element array it is given.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    let inode = std::fs::metadata(format!("/proc/self/fd/{}", fds[0]))
        .unwrap()
        .ino();
    let daemon = env.start();
    wait_version(&env, "bot", "api", 1);
    daemon.stop();
    // SAFETY: the two descriptors pipe(2) gave this test.
    unsafe {
        libc::close(fds[0]);
        libc::close(fds[1]);
    }
    let seen = std::fs::read_to_string(env.path().join("fds")).unwrap();
    assert!(seen.contains("pipe:["), "the hook's own stdin: {seen}");
    assert!(
        !seen.contains(&format!("pipe:[{inode}]")),
        "the hook got the inherited pipe: {seen}"
    );
}

/// Black-box finding: a file sink refused (a symlink planted at its path)
/// failed the deliver step before the sinks after it were tried: the
/// agent's files disagreed (one at the new version, one at the old) until
/// an operator removed the symlink. The files after it are written; what
/// tells the agent (a signal, an exec) waits until every file is in place.
#[test]
fn a_refused_file_sink_leaves_the_files_after_it_written() {
    let env = Env::new(&format!(
        r#"{}
[agents.bot.credentials.db]
vault = "local"
generate = {{ kind = "password", length = 24 }}
every = "1h"
deliver = [
  {{ type = "file", path = "{{root}}/bot/a", format = "raw" }},
  {{ type = "file", path = "{{root}}/bot/b", format = "raw" }},
  {{ type = "file", path = "{{root}}/bot/c", format = "raw" }},
  {{ type = "exec", program = "/bin/sh", args = ["-c", "touch {{dir}}/told"] }},
]
"#,
        agent_table("bot")
    ));
    let daemon = env.start();
    wait_version(&env, "bot", "db", 1);
    let told = env.path().join("told");
    std::fs::remove_file(&told).unwrap();
    let dir = env.root().join("bot");
    let old = std::fs::read(dir.join("c")).unwrap();
    std::fs::remove_file(dir.join("b")).unwrap();
    std::os::unix::fs::symlink(env.path().join("elsewhere"), dir.join("b")).unwrap();
    let out = env.cli(&["rotate", "bot/db", "--wait"]);
    assert!(!out.status.success(), "{out:?}");
    let a = std::fs::read(dir.join("a")).unwrap();
    assert_ne!(a, old, "the first file holds the new version");
    assert_eq!(
        std::fs::read(dir.join("c")).unwrap(),
        a,
        "so does the third"
    );
    assert!(!told.exists(), "the exec sink waits for every file");
    // Once the path is cleared, the parked step, resumed, delivers all.
    std::fs::remove_file(dir.join("b")).unwrap();
    env.cli_ok(&["rotate", "bot/db", "--wait"]);
    wait_for(Duration::from_secs(10), || told.exists().then_some(()))
        .unwrap_or_else(|| panic!("never delivered: {}", daemon.log_text()));
    assert_eq!(std::fs::read(dir.join("b")).unwrap(), a);
    daemon.stop();
}

/// Black-box finding: an agent `uid` (or `gid`) no user of the host has
/// passed `check` silently, and a typo went unnoticed until the agent
/// could not read its file. `check` warns; a known one passes silently.
#[test]
fn check_warns_of_an_agent_uid_no_user_has() {
    let env = Env::new("");
    let config = |uid: u32| {
        format!(
            "{}uid = {uid}\ngid = {uid}\n[agents.bot.credentials.db]\nvault = \"local\"\ngenerate = {{ kind = \"password\", length = 16 }}\nevery = \"1h\"\n",
            agent_table("bot")
        )
    };
    env.write_credentials(&config(4_242_424));
    let out = env.cli(&["check"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("warning: agents.bot.uid = 4242424: no user of this host has it")
            && stderr.contains("warning: agents.bot.gid = 4242424: no group of this host has it"),
        "{stderr}"
    );
    env.write_credentials(&config(0));
    let out = env.cli(&["check"]);
    assert!(
        !String::from_utf8_lossy(&out.stderr).contains("no user"),
        "{out:?}"
    );
}

/// Black-box finding: after a deliver step that failed and was retried,
/// the stored `last_rotated` and `next_due` were a failed attempt's, where
/// the running daemon showed the delivery's: `status` changed across a
/// restart, and the restarted daemon rotated earlier than announced. The
/// state stores what the running daemon shows.
#[test]
fn a_retried_delivery_is_stored_with_the_time_the_running_daemon_shows() {
    let env = Env::new(&format!(
        r#"{}
[agents.bot.credentials.db]
vault = "local"
generate = {{ kind = "password", length = 24 }}
every = "1h"
deliver = [
  {{ type = "file", path = "{{root}}/bot/db", format = "raw" }},
  {{ type = "exec", program = "/bin/sh", args = ["-c", "test ! -e {{dir}}/fail"] }},
]
"#,
        agent_table("bot")
    ));
    let daemon = env.start();
    wait_version(&env, "bot", "db", 1);
    std::fs::write(env.path().join("fail"), "").unwrap();
    assert!(!env.cli(&["rotate", "bot/db", "--wait"]).status.success());
    std::thread::sleep(Duration::from_millis(1500));
    std::fs::remove_file(env.path().join("fail")).unwrap();
    env.cli_ok(&["rotate", "bot/db", "--wait"]);
    let times = |env: &Env| {
        let rows = status_json(env);
        let r = row(&rows, "bot", "db");
        assert_eq!(r["version"], 2, "{r}");
        (r["last_rotated"].clone(), r["next_due"].clone())
    };
    let live = times(&env);
    daemon.stop();
    assert_eq!(times(&env), live, "stored as shown");
}

/// Black-box finding: a lost or cut audit log left the daemon unstartable
/// for good, and the runbook's way out ("archive the log, start a new
/// one") could not be taken; a refused start also left an empty
/// `audit.log` behind. `keyturn audit archive --broken` keeps the old log
/// and starts a new one that goes on from the state's head; without
/// `--broken` a log that does not verify is left as it is.
#[test]
fn a_cut_or_lost_audit_log_is_archived_and_the_daemon_goes_on() {
    let refused_start = |env: &Env| {
        let mut daemon = env.spawn(&[]);
        let status = daemon
            .wait_exit(Duration::from_secs(30))
            .expect("refused at once");
        assert!(!status.success());
        daemon.log_text()
    };
    let (env, daemon) = one_raw_at_version_1();
    env.cli_ok(&["rotate", "bot/db", "--wait"]);
    daemon.stop();

    // Cut: the last three records gone.
    let full = std::fs::read_to_string(env.audit_log()).unwrap();
    let lines: Vec<&str> = full.lines().collect();
    let cut: String = lines[..lines.len() - 3]
        .iter()
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(env.audit_log(), &cut).unwrap();
    let log = refused_start(&env);
    assert!(log.contains("keyturn audit archive --broken"), "{log}");

    // Not archived without --broken; nothing changed.
    let out = env.cli(&["audit", "archive"]);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("--broken"), "{err}");
    assert_eq!(std::fs::read_to_string(env.audit_log()).unwrap(), cut);

    let to = env.path().join("audit.log.cut");
    let out = env.cli_ok(&["audit", "archive", "--broken", "--to", to.to_str().unwrap()]);
    let said = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(said.contains("recorded as broken"), "{said}");
    assert_eq!(std::fs::read_to_string(&to).unwrap(), cut, "kept as found");
    // The new log goes on: it starts, rotates and verifies.
    let daemon = env.start();
    env.cli_ok(&["rotate", "bot/db", "--wait"]);
    wait_version(&env, "bot", "db", 3);
    daemon.stop();
    let out = env.cli_ok(&["audit", "verify"]);
    let said = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(said.contains("going on from seq"), "{said}");
    let records = audit_records(&env);
    assert_eq!(records[0]["event"], "audit.archived", "{:?}", records[0]);
    assert_eq!(records[0]["outcome"], "failed");
    assert_eq!(
        records[0]["seq"].as_u64(),
        Some(lines.len() as u64 + 1),
        "numbered after every record the old log held"
    );

    // Lost: the start is refused and leaves no empty log behind.
    std::fs::remove_file(env.audit_log()).unwrap();
    let log = refused_start(&env);
    assert!(log.contains("empty or missing"), "{log}");
    assert!(
        !env.audit_log().exists(),
        "a refused start made an empty log"
    );
    let out = env.cli(&["audit", "archive"]);
    assert_eq!(out.status.code(), Some(1));
    env.cli_ok(&["audit", "archive", "--broken"]);
    let daemon = env.start();
    env.cli_ok(&["rotate", "bot/db", "--wait"]);
    wait_version(&env, "bot", "db", 4);
    daemon.stop();
    env.cli_ok(&["audit", "verify"]);

    // An intact log is archived without --broken, and links to it.
    let before = std::fs::read_to_string(env.audit_log()).unwrap();
    let out = env.cli_ok(&["audit", "archive"]);
    let said = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(!said.contains("broken"), "{said}");
    let archived: Vec<_> = std::fs::read_dir(env.audit_log().parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| std::fs::read_to_string(p).is_ok_and(|t| t == before))
        .collect();
    assert_eq!(archived.len(), 1, "the old log under its archive name");
    let records = audit_records(&env);
    assert_eq!(records.len(), 1);
    assert_eq!(records[0]["outcome"], "ok");
    env.start().stop();
    env.cli_ok(&["audit", "verify"]);
}

/// Black-box finding: `keyturn check` run as the daemon's user passed a
/// state directory that user may not open (root's, mode 0700), and the
/// start then failed on it ("Permission denied"). The systemd unit's
/// `ExecStartPre` check is there to catch exactly that.
#[test]
fn check_refuses_a_state_directory_its_user_may_not_use() {
    use std::os::unix::fs::PermissionsExt;
    let env = Env::new(ONE_RAW);
    let as_nobody = || {
        std::process::Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
            .arg(bin())
            .args(["check", "--config"])
            .arg(&env.config)
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap()
    };
    // Everything readable by others but the state directory.
    let open = |p: &std::path::Path, mode: u32| {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
    };
    open(env.path(), 0o755);
    open(&env.config, 0o644);
    open(&env.root(), 0o755);
    std::fs::create_dir(env.state_dir()).unwrap();
    open(&env.state_dir(), 0o700);
    let out = as_nobody();
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(64), "{err}");
    assert!(
        err.contains("daemon.state_dir")
            && err.contains("may not be read, written and searched by this user (uid 65534)"),
        "{err}"
    );
    // Root may: `check` passes for the user the daemon runs as.
    env.cli_ok(&["check"]);
    // Missing, in a directory that user may not write: the start could not make it.
    std::fs::remove_dir(env.state_dir()).unwrap();
    let err = String::from_utf8_lossy(&as_nobody().stderr).to_string();
    assert!(
        err.contains("is missing and this user (uid 65534) may not create it"),
        "{err}"
    );
}
