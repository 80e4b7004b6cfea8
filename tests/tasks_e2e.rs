//! Task-scoped credentials end to end: the real daemon, its agents' socket,
//! the `keyturn task` CLI and the real PostgreSQL of scripts/services.sh.
//! A low-sensitivity task reads table A and not B, a high one reads both,
//! the server names the task, `task end` and the TTL revoke the role (even
//! across `kill -9`), and refusals are audited.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::{Env, audit_records, wait_for};

fn need(var: &str) -> String {
    std::env::var(var).unwrap_or_else(|_| {
        panic!("{var} is not set: start the test services: `bash scripts/services.sh start` (or run `bash scripts/test.sh`)")
    })
}

/// psql as the admin (DSN from the test services), or as `user`/`password`.
fn psql(dsn: &str, sql: &str) -> Result<String, String> {
    let out = Command::new("psql")
        .args([
            "-X",
            "-q",
            "-A",
            "-t",
            "-v",
            "ON_ERROR_STOP=1",
            "-d",
            dsn,
            "-c",
            sql,
        ])
        .env("PGCONNECT_TIMEOUT", "5")
        .stdin(Stdio::null())
        .output()
        .expect("psql");
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_owned())
    }
}

struct Db {
    admin: String,
    suffix: String,
}

impl Db {
    fn new() -> Db {
        let admin = need("KEYTURN_TEST_PG_ADMIN_DSN");
        let suffix = format!("{:08x}", rand_u32());
        let s = &suffix;
        psql(
            &admin,
            &format!(
                "CREATE TABLE t_a_{s} (v text); INSERT INTO t_a_{s} VALUES ('alpha');
                 CREATE TABLE t_b_{s} (v text); INSERT INTO t_b_{s} VALUES ('beta');
                 CREATE ROLE r_low_{s} NOLOGIN; GRANT SELECT ON t_a_{s} TO r_low_{s};
                 CREATE ROLE r_high_{s} NOLOGIN; GRANT SELECT ON t_a_{s}, t_b_{s} TO r_high_{s};"
            ),
        )
        .unwrap();
        Db { admin, suffix }
    }

    /// The delivered DSN: what the agent connects with.
    fn as_task(&self, cred: &serde_json::Value) -> String {
        cred["dsn"].as_str().unwrap().to_owned()
    }
}

impl Drop for Db {
    fn drop(&mut self) {
        let s = &self.suffix;
        let _ = psql(
            &self.admin,
            &format!(
                "DROP TABLE IF EXISTS t_a_{s}, t_b_{s}; DROP ROLE IF EXISTS r_low_{s}; DROP ROLE IF EXISTS r_high_{s};"
            ),
        );
    }
}

fn rand_u32() -> u32 {
    let mut b = [0u8; 4];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b))
        .unwrap();
    u32::from_le_bytes(b)
}

fn env(db: &Db) -> Env {
    let s = &db.suffix;
    let env = Env::with_daemon(
        &format!(
            r#"
[agents.bot]
owner = "alice@example.com"
tenant = "acme"
tier = "high"
uid = 4242
gid = 4242

[issuers.pg]
type = "postgres"
admin_dsn_file = "{{dir}}/pg-admin.dsn"

[policies.invoicing]
agents = ["bot"]
tenants = ["acme", "globex"]
max_ttl = "1h"
default_ttl = "10m"
levels.low.grants.pg = {{ roles = ["r_low_{s}"] }}
levels.high.grants.pg = {{ roles = ["r_high_{s}"] }}
"#
        ),
        "task_root = \"{dir}/agents/tasks\"",
    );
    std::fs::write(env.path().join("pg-admin.dsn"), &db.admin).unwrap();
    env
}

fn start(env: &Env, sensitivity: &str, extra: &[&str]) -> serde_json::Value {
    let mut args = vec![
        "task",
        "start",
        "--as",
        "bot",
        "--tenant",
        "acme",
        "--use-case",
        "month-end",
        "--run-id",
        "run-77",
        "--initiator",
        "alice@example.com",
        "--sensitivity",
        sensitivity,
    ];
    args.extend_from_slice(extra);
    let out = env.cli_ok(&args);
    serde_json::from_slice(&out.stdout).unwrap()
}

fn pg_credential(started: &serde_json::Value) -> serde_json::Value {
    let file = started["credentials"]["pg"]["file"].as_str().unwrap();
    serde_json::from_slice(&std::fs::read(file).unwrap()).unwrap()
}

#[cfg_attr(
    not(feature = "real-servers"),
    ignore = "needs the test servers: scripts/services.sh start, then --features real-servers"
)]
#[test]
fn a_task_gets_what_its_sensitivity_grants_and_loses_it_at_end() {
    let db = Db::new();
    let env = env(&db);
    // The issuer's system is checked with the rest.
    let online = env.cli_ok(&["check", "--online"]);
    let text = String::from_utf8_lossy(&online.stdout);
    assert!(
        text.lines()
            .any(|l| l.starts_with("issuer") && l.contains(" pg ") && l.contains(" ok")),
        "{text}"
    );
    let _d = env.start();
    let s = &db.suffix;

    let low = start(&env, "low", &[]);
    let id = low["task"].as_str().unwrap().to_owned();
    // The secret is in the task's file only, owned by the agent.
    assert!(
        low["credentials"]["pg"]["secret"]
            .as_object()
            .is_none_or(|m| m.is_empty()),
        "{low}"
    );
    let cred = pg_credential(&low);
    let file = low["credentials"]["pg"]["file"].as_str().unwrap();
    let meta = std::fs::metadata(file).unwrap();
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    assert_eq!(
        (meta.uid(), meta.permissions().mode() & 0o777),
        (4242, 0o400)
    );
    let as_low = db.as_task(&cred);
    assert_eq!(
        psql(&as_low, &format!("SELECT v FROM t_a_{s}")).unwrap(),
        "alpha"
    );
    let denied = psql(&as_low, &format!("SELECT v FROM t_b_{s}")).unwrap_err();
    assert!(denied.contains("permission denied"), "{denied}");
    // The server names the task.
    let app = psql(
        &as_low,
        "SELECT application_name FROM pg_stat_activity WHERE pid = pg_backend_pid()",
    )
    .unwrap();
    assert!(app.contains(&id) && app.contains("run-77"), "{app}");

    let high = start(&env, "high", &[]);
    let as_high = db.as_task(&pg_credential(&high));
    assert_eq!(
        psql(&as_high, &format!("SELECT v FROM t_b_{s}")).unwrap(),
        "beta"
    );

    // `task list` shows both; `task end` revokes at once.
    let list: serde_json::Value =
        serde_json::from_slice(&env.cli_ok(&["task", "list", "--as", "bot"]).stdout).unwrap();
    assert_eq!(
        list.as_array()
            .unwrap()
            .iter()
            .filter(|t| t["state"] == "live")
            .count(),
        2
    );
    let ended: serde_json::Value =
        serde_json::from_slice(&env.cli_ok(&["task", "end", "--as", "bot", &id]).stdout).unwrap();
    assert_eq!(ended["state"], "ended", "{ended}");
    assert!(
        psql(&as_low, "SELECT 1").is_err(),
        "the ended task's role still logs in"
    );
    assert!(!std::path::Path::new(file).exists());
    // The other task is untouched.
    assert_eq!(
        psql(&as_high, &format!("SELECT v FROM t_a_{s}")).unwrap(),
        "alpha"
    );
    env.cli_ok(&["task", "end", "--as", "bot", high["task"].as_str().unwrap()]);

    // Audited with the attribution, never the password.
    let records = audit_records(&env);
    let text = serde_json::to_string(&records).unwrap();
    for ev in ["task.started", "task.issued", "task.revoked", "task.ended"] {
        assert!(records.iter().any(|r| r["event"] == ev), "no {ev} record");
    }
    assert!(
        text.contains("alice@example.com") && text.contains("uid=0 as bot"),
        "{text}"
    );
    assert!(!text.contains(cred["password"].as_str().unwrap()));
}

#[cfg_attr(
    not(feature = "real-servers"),
    ignore = "needs the test servers: scripts/services.sh start, then --features real-servers"
)]
#[test]
fn the_ttl_is_enforced_across_kill_9() {
    let db = Db::new();
    let env = env(&db);
    let d = env.start();
    let t = start(&env, "low", &["--ttl", "4s"]);
    let as_task = db.as_task(&pg_credential(&t));
    assert!(psql(&as_task, "SELECT 1").is_ok());
    d.kill9();
    // The daemon is down: `status` shows the live task from the store.
    let offline = common::status_doc(&env);
    assert_eq!(offline["tasks"][0]["task"], t["task"], "{offline}");
    assert_eq!(offline["tasks"][0]["state"], "live", "{offline}");
    std::thread::sleep(Duration::from_secs(5));
    // Restarted after the TTL passed: the task ends at once.
    let _d = env.start();
    let gone = wait_for(Duration::from_secs(15), || psql(&as_task, "SELECT 1").err());
    assert!(
        gone.is_some(),
        "the task's role still logs in after its TTL"
    );
    let list: serde_json::Value =
        serde_json::from_slice(&env.cli_ok(&["task", "list", "--as", "bot"]).stdout).unwrap();
    let row = list
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["task"] == t["task"])
        .cloned();
    let row = wait_for(Duration::from_secs(10), || {
        let l: serde_json::Value =
            serde_json::from_slice(&env.cli_ok(&["task", "list", "--as", "bot"]).stdout).unwrap();
        l.as_array()?
            .iter()
            .find(|r| r["task"] == t["task"] && r["state"] == "ended")
            .cloned()
    })
    .unwrap_or_else(|| panic!("not ended: {row:?}"));
    assert_eq!(row["end_reason"], "ttl");
}

#[cfg_attr(
    not(feature = "real-servers"),
    ignore = "needs the test servers: scripts/services.sh start, then --features real-servers"
)]
#[test]
fn refusals_are_clear_and_audited() {
    let db = Db::new();
    let env = env(&db);
    let _d = env.start();
    let base = [
        "task",
        "start",
        "--as",
        "bot",
        "--use-case",
        "month-end",
        "--run-id",
        "r",
        "--initiator",
        "alice",
    ];
    let run = |extra: &[&str]| {
        let mut args = base.to_vec();
        args.extend_from_slice(extra);
        env.cli(&args)
    };
    let out = run(&["--tenant", "initech", "--sensitivity", "low"]);
    assert_eq!(out.status.code(), Some(77));
    assert!(String::from_utf8_lossy(&out.stderr).contains("may not serve tenant `initech`"));
    let out = run(&["--tenant", "acme", "--sensitivity", "low", "--ttl", "2h"]);
    assert_eq!(out.status.code(), Some(77));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("ask for 1h or less"),
        "{out:?}"
    );
    let out = run(&["--tenant", "acme", "--sensitivity", "secret"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("no sensitivity level `secret`"));

    // A uid that is no agent's may not start tasks (on the agents' socket,
    // which anyone can reach), and may not act for one.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(env.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let socket = env.path().join("agent.sock");
    for args in [vec!["task", "list"], vec!["task", "list", "--as", "bot"]] {
        let out = Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
            .arg(common::bin())
            .args(&args)
            .arg("--socket")
            .arg(&socket)
            .arg("--config")
            .arg("/nonexistent.toml")
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(77), "{args:?}: {out:?}");
    }
    let refused = audit_records(&env)
        .iter()
        .filter(|r| r["event"] == "task.refused")
        .count();
    assert!(refused >= 5, "{refused} refusals audited");
}
