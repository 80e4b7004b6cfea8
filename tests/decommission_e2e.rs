//! Decommission from the operator's side, on the local vault: an agent that
//! leaves the config is orphaned (listed, alerted, never revoked silently)
//! and revocable from state alone; a decommission declared in the config is
//! acted on at reload, survives `kill -9` mid-way without a second decision,
//! and completes when the target comes back. (Every vault type and the
//! PostgreSQL target: `real_vaults.rs`.)

mod common;

use std::time::Duration;

use common::*;
use keyturn::model::Stage;
use keyturn::vaults::Select;

fn cred_with_file(agent: &str, cred: &str, extra: &str) -> String {
    format!(
        r#"
[agents.{agent}.credentials.{cred}]
vault = "local"
generate = {{ kind = "password", length = 24 }}
every = "1h"
deliver = [{{ type = "file", path = "{{root}}/{agent}/{cred}", format = "raw" }}]
{extra}
"#
    )
}

fn text(o: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// The `status` table's line for `agent` in its agents section.
fn agents_line(env: &Env, agent: &str) -> Option<String> {
    let out = text(&env.cli_ok(&["status"]));
    out.lines()
        .skip_while(|l| !l.starts_with("AGENT  ") || !l.contains("DECIDED"))
        .find(|l| l.split_whitespace().next() == Some(agent))
        .map(str::to_owned)
}

fn wait_state(env: &Env, agent: &str, state: &str) {
    wait_for(Duration::from_secs(30), || {
        status_json(env)
            .iter()
            .filter(|r| r["agent"] == agent)
            .all(|r| r["state"] == state)
            .then_some(())
    })
    .unwrap_or_else(|| panic!("{agent} never reached {state}: {:?}", status_json(env)));
}

#[test]
fn an_agent_that_left_the_config_is_orphaned_and_revoked_only_when_told() {
    let two = format!(
        "{}{}{}{}",
        agent_table("gone"),
        cred_with_file("gone", "api", ""),
        agent_table("stays"),
        cred_with_file("stays", "api", "")
    );
    let env = Env::new(&two);
    let daemon = env.start();
    wait_version(&env, "gone", "api", 1);
    wait_version(&env, "stays", "api", 1);
    let file = env.root().join("gone/api");
    assert!(file.exists());

    // Removed by a reload: listed as orphaned, nothing revoked.
    env.write_credentials(&format!(
        "{}{}",
        agent_table("stays"),
        cred_with_file("stays", "api", "")
    ));
    daemon.reload();
    let line = wait_for(Duration::from_secs(10), || agents_line(&env, "gone"))
        .expect("the removed agent is listed");
    assert!(line.contains("orphaned"), "{line}");
    assert!(file.exists(), "an orphan must not be revoked silently");
    assert!(agents_line(&env, "stays").is_none());
    let nothing_decided = audit_records(&env)
        .iter()
        .all(|r| r["event"] != "decommission.decided");
    assert!(nothing_decided, "nobody decided anything");

    // Still an orphan after a restart (from state alone).
    daemon.stop();
    let daemon = env.start();
    let line = agents_line(&env, "gone").expect("still listed after a restart");
    assert!(line.contains("orphaned"), "{line}");
    assert!(file.exists());

    // Told: revoked from what state remembers.
    let out = env.cli(&[
        "decommission",
        "gone",
        "--reason",
        "left the config",
        "--wait",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("decommissioned"), "{}", text(&out));
    assert!(!file.exists(), "the orphan's file is removed");
    assert!(
        env.root().join("stays/api").exists(),
        "the other agent keeps its file"
    );
    let line = agents_line(&env, "gone").expect("listed as decommissioned");
    assert!(line.contains("decommissioned"), "{line}");
    daemon.stop();
    block_on(async {
        let k = keyturn::model::CredentialKey::new(
            keyturn::model::AgentId::new("gone").unwrap(),
            keyturn::model::CredentialId::new("api").unwrap(),
        );
        for stage in [Stage::Current, Stage::Previous, Stage::Pending] {
            assert_eq!(
                local_vault_value(&env, "local", &k, Select::Stage(stage)).await,
                None
            );
        }
        let kept = keyturn::model::CredentialKey::new(
            keyturn::model::AgentId::new("stays").unwrap(),
            keyturn::model::CredentialId::new("api").unwrap(),
        );
        assert!(
            local_vault_value(&env, "local", &kept, Select::Stage(Stage::Current))
                .await
                .is_some()
        );
    });
    audit_verifies(&env, "after an orphan's decommission");
}

/// A hook whose `revoke` fails (EX_TEMPFAIL) until `{dir}/revoke-ok`
/// exists; `test` refuses any value once revoked.
fn hook(env: &Env) -> std::path::PathBuf {
    let d = env.path().display();
    write_hook(
        env,
        &format!(
            r#"#!/bin/sh
case "$KEYTURN_STEP" in
  set) cat > "{d}/hook-value" ;;
  test) [ -e "{d}/revoked" ] && exit 1; cmp -s - "{d}/hook-value" || exit 1 ;;
  revoke) [ -e "{d}/revoke-ok" ] || exit 75; touch "{d}/revoked" ;;
esac
exit 0
"#
        ),
    )
}

/// Agent `bot` with credential `cred` (a file sink) on a `command` target
/// running `script` as its hook.
fn bot_on_hook(env: &Env, cred: &str, script: &str) {
    let p = write_hook(env, script);
    let target = format!(
        r#"target = {{ type = "command", program = "{}" }}"#,
        p.display()
    );
    env.write_credentials(&format!(
        "{}{}",
        agent_table("bot"),
        cred_with_file("bot", cred, &target)
    ));
}

/// Black-box finding: taking an agent's `decommissioned` table out again
/// passed `check` and the reload without a word, while the agent stayed
/// decommissioned (for good, as documented). Both say so now.
#[test]
fn undoing_a_decommission_in_the_config_is_warned_of() {
    let env = Env::new("");
    let nu = format!("{}{}", agent_table("nu"), cred_with_file("nu", "api", ""));
    env.write_credentials(&format!(
        "{}decommissioned = {{ at = \"2026-01-02T03:04:05Z\", reason = \"gone\" }}\n{}",
        agent_table("nu"),
        cred_with_file("nu", "api", "")
    ));
    let daemon = env.start();
    wait_state(&env, "nu", "decommissioned");
    let quiet = env.cli_ok(&["check"]);
    assert!(
        !String::from_utf8_lossy(&quiet.stderr).contains("warning"),
        "{quiet:?}"
    );
    env.write_credentials(&nu);
    let out = env.cli_ok(&["check"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("warning: agent nu was decommissioned") && stderr.contains("for good"),
        "{stderr}"
    );
    daemon.reload();
    wait_for(Duration::from_secs(10), || {
        daemon
            .log_text()
            .contains("`decommissioned` table was taken out")
            .then_some(())
    })
    .unwrap_or_else(|| panic!("no warning at reload:\n{}", daemon.log_text()));
    daemon.stop();
}

/// Defect: an agent added to the config already decommissioned (its `at`
/// past) had its first rotation begun before the decision was acted on.
/// Nothing is made for it.
#[test]
fn an_agent_added_already_decommissioned_is_never_rotated() {
    let env = Env::new("");
    let stays = format!(
        "{}{}",
        agent_table("stays"),
        cred_with_file("stays", "api", "")
    );
    env.write_credentials(&stays);
    let daemon = env.start();
    wait_version(&env, "stays", "api", 1);
    env.write_credentials(&format!(
        "{stays}{}decommissioned = {{ at = \"2026-01-02T03:04:05Z\", reason = \"never ran\" }}\n{}",
        agent_table("nu"),
        cred_with_file("nu", "api", "")
    ));
    daemon.reload();
    wait_state(&env, "nu", "decommissioned");
    let started: Vec<serde_json::Value> = audit_records(&env)
        .into_iter()
        .filter(|r| {
            r["agent"] == "nu"
                && r["event"]
                    .as_str()
                    .is_some_and(|e| e.starts_with("rotation."))
        })
        .collect();
    assert!(started.is_empty(), "{started:#?}");
    assert!(!env.root().join("nu/api").exists());
    // Nothing of it was ever made here: no breach of the SLA, though the
    // config dates the decision long before (black-box finding: recorded
    // as a breach of eleven months).
    let verified: Vec<serde_json::Value> = audit_records(&env)
        .into_iter()
        .filter(|r| r["agent"] == "nu" && r["event"] == "decommission.verified")
        .collect();
    assert_eq!(verified.len(), 1, "{verified:?}");
    assert_eq!(verified[0]["outcome"], "ok", "{verified:?}");
    assert!(
        verified[0]["detail"].as_str().unwrap().contains(" met "),
        "{verified:?}"
    );
    daemon.stop();
}

#[test]
fn a_decommission_declared_in_the_config_survives_kill_9_and_completes_when_the_target_returns() {
    let env = Env::new("");
    let hook = hook(&env);
    let target = format!(
        r#"target = {{ type = "command", program = "{}" }}"#,
        hook.display()
    );
    let config = |declared: &str| {
        format!(
            "{}{declared}\n{}",
            agent_table("bot"),
            cred_with_file("bot", "api", &target)
        )
    };
    env.write_credentials(&config(""));
    let daemon = env.start();
    wait_version(&env, "bot", "api", 1);
    let file = env.root().join("bot/api");
    assert!(file.exists());

    // GitOps: the decision is in the config, acted on at reload.
    env.write_credentials(&config(
        r#"decommissioned = { at = "2026-01-02T03:04:05Z", reason = "gitops retire", by = "bob@example.com" }"#,
    ));
    daemon.reload();
    wait_state(&env, "bot", "decommissioning");
    // The file goes first; the target's revoke keeps failing.
    wait_for(Duration::from_secs(10), || (!file.exists()).then_some(()))
        .expect("the file is retracted");
    wait_for(Duration::from_secs(10), || {
        audit_records(&env)
            .iter()
            .any(|r| r["event"] == "revocation.failed")
            .then_some(())
    })
    .expect("the target's revoke is retried");
    let line = agents_line(&env, "bot").expect("listed");
    assert!(line.contains("decommissioning"), "{line}");
    assert!(
        line.contains("2026-01-02T03:04:05Z"),
        "decided at the config's time: {line}"
    );
    daemon.kill9();

    // Back, with the target fixed: it resumes, decides nothing twice, ends.
    std::fs::write(env.path().join("revoke-ok"), b"").unwrap();
    let daemon = env.start();
    wait_state(&env, "bot", "decommissioned");
    daemon.stop();
    let records = audit_records(&env);
    let decided: Vec<_> = records
        .iter()
        .filter(|r| r["event"] == "decommission.decided")
        .collect();
    assert_eq!(decided.len(), 1, "one decision, however often it restarts");
    let detail = decided[0]["detail"].as_str().unwrap();
    assert!(
        detail.contains("source=config") && detail.contains("bob@example.com"),
        "{detail}"
    );
    let done = records
        .iter()
        .find(|r| r["event"] == "decommission.verified")
        .expect("completed");
    // Decided in January: the 1h SLA of tier high was long gone.
    assert!(
        done["detail"].as_str().unwrap().contains("breached"),
        "{done}"
    );
    assert!(env.path().join("revoked").exists());
    audit_verifies(&env, "after a declared decommission and a kill -9");
}

/// app/db's agent opens its file (`ack = "open"`) until the delivery counts
/// as acknowledged.
fn open_to_ack(env: &Env) {
    let ack_file = env.root().join("app/db");
    wait_for(Duration::from_secs(10), || {
        let _ = std::fs::read(&ack_file);
        status_json(env)
            .iter()
            .find(|r| r["agent"] == "app" && r["credential"] == "db")
            .filter(|r| r.get("awaiting_ack").is_none())
            .map(|_| ())
    })
    .expect("the open acknowledges the delivery");
}

/// Defect: while a decommission was stuck (its target's revoke failing),
/// `surface` counted one live version of a credential whose current and
/// previous versions both still worked, and gave it a next due time. Until
/// the revocation is verified both count, with no due time; then none.
#[test]
fn a_stuck_decommission_keeps_what_it_has_not_revoked_on_the_surface() {
    let env = Env::new("");
    let hook = hook(&env);
    let extra = format!(
        "target = {{ type = \"command\", program = \"{}\" }}\ngrace = \"1h\"",
        hook.display()
    );
    env.write_credentials(&format!(
        "{}{}",
        agent_table("bot"),
        cred_with_file("bot", "api", &extra)
    ));
    let daemon = env.start();
    wait_version(&env, "bot", "api", 1);
    env.cli_ok(&["rotate", "bot/api", "--wait"]);
    let api = |env: &Env| -> serde_json::Value {
        let s = surface(env, "30d");
        let agents = s["agents"].as_array().unwrap().clone();
        let bot = agents.into_iter().find(|a| a["agent"] == "bot").unwrap();
        bot["credentials"][0].clone()
    };
    let before = api(&env);
    assert_eq!(
        before["live_versions"], 2,
        "version 1 in its grace: {before}"
    );
    env.cli_ok(&["decommission", "bot", "--reason", "stuck"]);
    wait_state(&env, "bot", "decommissioning");
    let during = api(&env);
    assert_eq!(
        during["live_versions"], 2,
        "nothing is revoked yet: {during}"
    );
    assert!(during["next_due"].is_null(), "no rotation comes: {during}");
    // `--wait --timeout` gives up waiting on a stuck decommission (exit 75),
    // naming what is left; the revocation goes on.
    let started = std::time::Instant::now();
    let out = env.cli(&[
        "decommission",
        "bot",
        "--reason",
        "stuck",
        "--wait",
        "--timeout",
        "1s",
    ]);
    assert_eq!(out.status.code(), Some(75), "{}", text(&out));
    assert!(started.elapsed() < Duration::from_secs(10));
    let said = text(&out);
    assert!(
        said.contains("bot is still decommissioning after 1s (")
            && said.contains(" item(s) verified); its revocation goes on"),
        "{said}"
    );
    let out = env.cli(&["decommission", "bot", "--reason", "x", "--timeout", "1s"]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "--timeout needs --wait: {}",
        text(&out)
    );
    std::fs::write(env.path().join("revoke-ok"), "").unwrap();
    wait_state(&env, "bot", "decommissioned");
    let after = api(&env);
    assert_eq!(after["live_versions"], 0, "{after}");
    daemon.stop();
}

fn surface(env: &Env, unused_after: &str) -> serde_json::Value {
    let out = env.cli_ok(&["surface", "--json", "--unused-after", unused_after]);
    serde_json::from_slice(&out.stdout).expect("surface --json is JSON")
}

#[test]
fn surface_matches_the_configured_and_observed_state() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let with_d = |d: bool| {
        let mut c = format!(
            "{}{}{}{}{}{}{}{}",
            agent_table("app"),
            cred_with_file("app", "db", r#"grace = "10m""#)
                .replace(r#"format = "raw" }]"#, r#"format = "raw", ack = "open" }]"#),
            cred_with_file("app", "api", ""),
            agent_table("quiet"),
            cred_with_file("quiet", "api", ""),
            // An agent with no credential of its own (one that only runs
            // tasks, say) is an identity too.
            agent_table("tasker"),
            agent_table("retired"),
            cred_with_file("retired", "api", ""),
        );
        if d {
            c.push_str(&agent_table("left"));
            c.push_str(&cred_with_file("left", "api", ""));
        }
        c
    };
    let env = Env::with_daemon(&with_d(true), &format!("listen = \"127.0.0.1:{port}\""));
    let daemon = env.start();
    for (a, c) in [
        ("app", "db"),
        ("app", "api"),
        ("quiet", "api"),
        ("retired", "api"),
        ("left", "api"),
    ] {
        wait_version(&env, a, c, 1);
    }
    // The app opens its file: that acknowledgement is its observed use.
    open_to_ack(&env);
    env.cli_ok(&["decommission", "retired", "--reason", "done", "--wait"]);
    env.write_credentials(&with_d(false));
    daemon.reload();
    wait_for(Duration::from_secs(10), || agents_line(&env, "left")).expect("left is orphaned");

    let s = surface(&env, "30d");
    let t = &s["totals"];
    // app, quiet, tasker and the orphan `left`; `retired` is fully
    // decommissioned.
    assert_eq!(t["identities"], 4, "{t}");
    assert_eq!(t["agents"]["active"], 3, "{t}");
    assert_eq!(t["agents"]["decommissioned"], 1, "{t}");
    assert_eq!(t["agents"]["orphaned"], 1, "{t}");
    // The orphan's credential is listed: its version stays live until
    // `left` is decommissioned (it was left out).
    assert_eq!(
        t["credentials"], 5,
        "app 2, quiet 1, retired 1, left 1: {t}"
    );
    assert_eq!(t["live_versions"], 4, "retired's version is revoked: {t}");
    // Each live current version stays valid its hour + grace from now
    // (app/db's grace is 10m, the others have the default 15m); the
    // orphan's has no end to count to.
    let out = t["credential_seconds_outstanding"].as_u64().unwrap();
    let expect = 3 * 3600 + 600 + 2 * 900;
    assert!(out <= expect && out + 60 >= expect, "{out} vs {expect}");
    let agents = s["agents"].as_array().unwrap();
    let agent = |name: &str| agents.iter().find(|a| a["agent"] == name).unwrap();
    assert_eq!(agent("app")["state"], "active");
    assert_eq!(agent("app")["owner"], "alice@example.com");
    assert_eq!(agent("app")["usage_observed"], true);
    assert!(agent("app")["last_used"].is_string(), "{}", agent("app"));
    assert_eq!(agent("quiet")["usage_observed"], false);
    assert_eq!(agent("tasker")["state"], "active");
    assert_eq!(agent("tasker")["credentials"], serde_json::json!([]));
    assert_eq!(agent("retired")["state"], "decommissioned");
    assert_eq!(agent("retired")["credentials"][0]["live_versions"], 0);
    assert_eq!(agent("left")["state"], "orphaned");
    let orphans = &agent("left")["credentials"][0];
    assert_eq!(
        (
            &orphans["credential"],
            &orphans["mode"],
            &orphans["version"]
        ),
        (
            &serde_json::json!("api"),
            &serde_json::json!("unconfigured"),
            &serde_json::json!(1)
        ),
        "{orphans}"
    );
    assert_eq!(orphans["live_versions"], 1, "{orphans}");
    let db = agent("app")["credentials"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["credential"] == "db")
        .unwrap()
        .clone();
    assert_eq!(db["version"], 1);
    assert_eq!(db["vaults"], serde_json::json!(["local"]));
    assert_eq!(db["lifetime_seconds"], 3600 + 600, "{db}");
    assert_eq!(db["acking_consumers"], 1, "{db}");
    let f = &s["flags"];
    assert_eq!(f["orphaned"], serde_json::json!(["left"]), "{f}");
    assert_eq!(f["unconfigured"], serde_json::json!(["left/api"]), "{f}");
    assert_eq!(f["decommissions_in_progress"], serde_json::json!([]), "{f}");
    assert_eq!(
        f["unused"],
        serde_json::json!([]),
        "used within 30 days: {f}"
    );
    // With a window shorter than the time since the ack, app is unused;
    // quiet, whose use cannot be observed, never is.
    std::thread::sleep(Duration::from_millis(1100));
    let s = surface(&env, "1s");
    assert_eq!(
        s["flags"]["unused"],
        serde_json::json!(["app"]),
        "{}",
        s["flags"]
    );
    // The table says the same.
    let table = text(&env.cli_ok(&["surface"]));
    // The decommissioned agent is not one of the identities, and the
    // table does not list it among their parts.
    assert!(
        table.contains("identities 4  (active 3, decommissioning 0, orphaned 1)  decommissioned 1"),
        "{table}"
    );
    assert!(table.contains("left  [orphaned]"), "{table}");
    assert!(
        table.contains("NOT IN THE CONFIG: never rotated, live until decommissioned"),
        "{table}"
    );

    // The same totals as metrics.
    let m = http_get(port, "/metrics");
    for line in [
        "keyturn_identities 4",
        "keyturn_live_credential_versions 4",
        "keyturn_agents{state=\"orphaned\"} 1",
        "keyturn_agents{state=\"decommissioned\"} 1",
        "keyturn_agents{state=\"active\"} 3",
    ] {
        assert!(m.contains(line), "missing {line:?} in\n{m}");
    }
    // app's two and quiet's one: `retired`'s is no longer rotated (it was
    // counted as idle), and the orphan's is not in the config.
    let counted: f64 = m
        .lines()
        .filter(|l| l.starts_with("keyturn_credentials{state="))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(counted, 3.0, "{m}");
    daemon.stop();
}

/// Defect (black-box): a repeated `decommission` of an agent already
/// decommissioned answered "nothing new decided" and left no audit record
/// of the request: who asked, and why, is audited like any request.
#[test]
fn a_repeated_decommission_is_audited_with_its_caller() {
    let env = Env::new(&format!(
        "{}{}",
        agent_table("app"),
        cred_with_file("app", "db", "")
    ));
    let daemon = env.start();
    wait_version(&env, "app", "db", 1);
    env.cli_ok(&["decommission", "app", "--reason", "done", "--wait"]);
    let out = env.cli_ok(&[
        "decommission",
        "app",
        "--reason",
        "second",
        "--by",
        "mallory\" source=config",
    ]);
    assert!(
        text(&out).contains("already decommissioned"),
        "{}",
        text(&out)
    );
    let records = audit_records(&env);
    let repeated: Vec<_> = records
        .iter()
        .filter(|r| r["event"] == "decommission.repeated")
        .collect();
    assert_eq!(repeated.len(), 1, "{records:?}");
    let r = repeated[0];
    assert_eq!(r["agent"], "app");
    assert_eq!(r["actor"]["type"], "peer", "{r}");
    assert_eq!(
        r["actor"]["uid"].as_u64(),
        Some(u64::from(nix::unistd::geteuid().as_raw())),
        "{r}"
    );
    let detail = r["detail"].as_str().unwrap();
    assert!(
        // `--by` is quoted like the reason: it cannot add a field.
        detail.contains(r#"reason="second" by="mallory\" source=config" source=command"#),
        "{detail}"
    );
    assert_eq!(
        records
            .iter()
            .filter(|r| r["event"] == "decommission.decided")
            .count(),
        1,
        "nothing new decided"
    );
    daemon.stop();
    audit_verifies(&env, "after a repeated decommission");
}

/// Defect (black-box): `surface` called an agent that had just acked its
/// credential "unused" (and `last used never`) right after the next
/// rotation: the delivery replaced the ack records and lost the time of the
/// last ack. The last ack of any version is the agent's last use.
#[test]
fn surface_keeps_the_last_use_across_a_rotation() {
    let env = Env::new(&format!(
        "{}{}",
        agent_table("app"),
        cred_with_file("app", "db", r#"grace = "10m""#)
            .replace(r#"format = "raw" }]"#, r#"format = "raw", ack = "open" }]"#),
    ));
    let daemon = env.start();
    wait_version(&env, "app", "db", 1);
    open_to_ack(&env);
    let used = surface(&env, "30d")["agents"][0]["last_used"].clone();
    assert!(used.is_string(), "the ack is its use: {used}");
    // Version 2 is delivered and not opened (not acked) yet.
    env.cli_ok(&["rotate", "app/db", "--wait"]);
    wait_version(&env, "app", "db", 2);
    let s = surface(&env, "30d");
    let app = &s["agents"][0];
    assert_eq!(app["last_used"], used, "{app}");
    assert_eq!(app["usage_observed"], true, "{app}");
    assert_eq!(
        s["flags"]["unused"],
        serde_json::json!([]),
        "{}",
        s["flags"]
    );
    // And after a restart.
    daemon.stop();
    let daemon = env.start();
    assert_eq!(surface(&env, "30d")["agents"][0]["last_used"], used);
    daemon.stop();
}

/// Defect: a revocation that answered success without taking effect (an
/// API that acknowledged and did not act, a login enabled again) was never
/// done again: only its verification was retried, failing for ever while
/// the credential still worked. A revocation that does not verify is done
/// again before the next verification.
#[test]
fn a_revocation_that_does_not_hold_is_done_again_until_it_verifies() {
    let env = Env::new("");
    let d = env.path().display();
    // The first `revoke` exits 0 and does nothing; the second works.
    bot_on_hook(
        &env,
        "api",
        &format!(
            r#"#!/bin/sh
case "$KEYTURN_STEP" in
  set) cat > "{d}/hook-value" ;;
  test) [ -e "{d}/revoked" ] && exit 1; cmp -s - "{d}/hook-value" || exit 1 ;;
  revoke) echo >> "{d}/revokes"; [ "$(wc -l < "{d}/revokes")" -ge 2 ] && touch "{d}/revoked" ;;
esac
exit 0
"#
        ),
    );
    let daemon = env.start();
    wait_version(&env, "bot", "api", 1);
    env.cli_ok(&["decommission", "bot", "--reason", "done"]);
    wait_state(&env, "bot", "decommissioned");
    daemon.stop();
    let revokes = std::fs::read_to_string(env.path().join("revokes")).unwrap();
    assert_eq!(revokes.lines().count(), 2, "revoked, then again once");
    assert!(env.path().join("revoked").exists());
    let again = audit_records(&env)
        .into_iter()
        .filter(|r| {
            r["event"] == "revocation.revoked"
                && r["detail"].as_str().is_some_and(|d| d.contains("again"))
        })
        .count();
    assert_eq!(again, 1, "the second revocation is audited");
    audit_verifies(&env, "after a revocation done twice");
}

/// Defect: once any agent was decommissioned, `rotate all` reported its
/// credentials as FAILED and exited 1 for ever, although everything it
/// could rotate rotated. They are skipped (and said so); a selection with
/// nothing left to rotate is refused, saying why.
/// Agents `old` and `app`, each with credential `db` (a file), running,
/// each at version 1.
fn old_and_app() -> (Env, Daemon) {
    let env = Env::new(&format!(
        "{}{}{}{}",
        agent_table("old"),
        cred_with_file("old", "db", ""),
        agent_table("app"),
        cred_with_file("app", "db", "")
    ));
    let daemon = env.start();
    wait_version(&env, "old", "db", 1);
    wait_version(&env, "app", "db", 1);
    (env, daemon)
}

#[test]
fn rotate_all_skips_decommissioned_agents() {
    let (env, daemon) = old_and_app();
    env.cli_ok(&["decommission", "old", "--reason", "retired", "--wait"]);
    let out = env.cli_ok(&["rotate", "all", "--wait"]);
    let said = text(&out);
    assert!(
        said.contains("old/db: skipped: the agent is decommissioned"),
        "{said}"
    );
    assert!(said.contains("app/db: rotated to version 2"), "{said}");
    let json = env.cli_ok(&["rotate", "all", "--json"]);
    let results: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    let outcomes: Vec<&str> = results
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["outcome"].as_str().unwrap())
        .collect();
    assert_eq!(outcomes, ["started", "skipped"], "{results}");
    // Defect (black-box): a rotation refused for a decommissioned agent was
    // audited as an `admin.rotate` that went well.
    let out = env.cli(&["rotate", "old"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let refused = audit_records(&env)
        .into_iter()
        .rfind(|r| r["event"] == "admin.rotate")
        .unwrap();
    assert_eq!(refused["outcome"], "refused", "{refused}");
    assert_eq!(refused["agent"], "old", "{refused}");
    assert!(
        refused["error"]
            .as_str()
            .is_some_and(|e| e.contains("agent old is decommissioned")),
        "{refused}"
    );

    // A credential added to the decommissioned agent by a reload is never
    // rotated: the log says so, and status labels it.
    env.write_credentials(&format!(
        "{}{}{}{}{}",
        agent_table("old"),
        cred_with_file("old", "db", ""),
        cred_with_file("old", "extra", ""),
        agent_table("app"),
        cred_with_file("app", "db", "")
    ));
    daemon.reload();
    let log = daemon.log_text();
    assert!(
        log.lines()
            .any(|l| l.contains("added to an agent that is decommissioned")
                && l.contains("credential=extra")),
        "{log}"
    );
    let status = text(&env.cli_ok(&["status"]));
    let row = status
        .lines()
        .find(|l| l.starts_with("old/extra"))
        .unwrap_or_default();
    assert!(row.contains("decommissioned"), "{status}");
    assert!(!env.root().join("old/extra").exists());

    // A reason that says nothing is a usage error, decided nothing.
    let out = env.cli(&["decommission", "app", "--reason", " "]);
    assert_eq!(out.status.code(), Some(64), "{}", text(&out));
    assert!(text(&out).contains("needs a reason"), "{}", text(&out));
    // So is one too long (black-box finding: 60,000 characters went into
    // every alert; a longer one failed as an over-long request line).
    let long = "x".repeat(100_000);
    let out = env.cli(&["decommission", "app", "--reason", &long]);
    assert_eq!(out.status.code(), Some(64), "{}", text(&out));
    assert!(text(&out).contains("more than 1024"), "{}", text(&out));
    // The daemon refuses it too, from any client.
    let mut line = serde_json::to_vec(&serde_json::json!({
        "cmd": "decommission", "agent": "app", "reason": "y".repeat(2000)
    }))
    .unwrap();
    line.push(b'\n');
    let mut sock =
        std::os::unix::net::UnixStream::connect(env.path().join("control.sock")).unwrap();
    std::io::Write::write_all(&mut sock, &line).unwrap();
    let mut answer = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(sock), &mut answer).unwrap();
    assert!(answer.contains("more than 1024"), "{answer}");
    env.cli_ok(&["rotate", "app/db", "--wait"]);
    env.cli_ok(&["decommission", "app", "--reason", "retired", "--wait"]);
    let out = env.cli(&["rotate", "all"]);
    assert!(!out.status.success(), "nothing to rotate: {}", text(&out));
    let said = text(&out);
    assert!(
        said.contains(
            "none of the 3 selected credentials is rotated here (the agent is decommissioned)"
        ),
        "{said}"
    );
    daemon.stop();
}

/// Defects: a decommission after the config moved a credential (another
/// vault `path`, another file) left versions live at the old path and the
/// file the old sink delivered in place, and still said "verified". `db`
/// moved and was not rotated since (its only version is at the old path);
/// `api` moved and was rotated (its previous version, in its grace period,
/// is at the old path). Every place is revoked and verified.
#[test]
fn a_decommission_after_a_move_revokes_the_old_paths_and_the_old_file() {
    let cred = |name: &str, path: &str, file: &str| {
        format!(
            "[agents.mv.credentials.{name}]\nvault = \"local\"\n{path}generate = {{ kind = \"password\", length = 24 }}\nevery = \"1h\"\ngrace = \"1h\"\ndeliver = [{{ type = \"file\", path = \"{{root}}/mv/{file}\" }}]\n"
        )
    };
    let env = Env::new(&format!(
        "{}{}{}",
        agent_table("mv"),
        cred("db", "", "db"),
        cred("api", "", "api")
    ));
    let daemon = env.start();
    wait_version(&env, "mv", "db", 1);
    wait_version(&env, "mv", "api", 1);
    env.write_credentials(&format!(
        "{}{}{}",
        agent_table("mv"),
        cred("db", "path = \"moved/db\"\n", "db2"),
        cred("api", "path = \"moved/api\"\n", "api")
    ));
    daemon.reload();
    env.cli_ok(&["rotate", "mv/api", "--wait"]);
    let at = |cred: &str, path: &str| {
        let k = keyturn::model::CredentialKey::new(
            keyturn::model::AgentId::new("mv").unwrap(),
            keyturn::model::CredentialId::new(cred).unwrap(),
        );
        block_on(local_vault_value_at(
            &env,
            "local",
            &k,
            path,
            Select::Stage(Stage::Current),
        ))
    };
    assert!(at("db", "agents/mv/db").is_some(), "db's only version");
    assert!(at("api", "agents/mv/api").is_some(), "api's version 1");
    assert!(at("api", "moved/api").is_some(), "api's version 2");
    let old_file = env.root().join("mv/db");
    let new_file = env.root().join("mv/db2");
    assert!(wait_for(Duration::from_secs(10), || new_file.exists().then_some(())).is_some());
    assert!(old_file.exists());
    let out = env.cli(&[
        "decommission",
        "mv",
        "--reason",
        "moved, then retired",
        "--wait",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    for (cred, path) in [
        ("db", "agents/mv/db"),
        ("db", "moved/db"),
        ("api", "agents/mv/api"),
        ("api", "moved/api"),
    ] {
        assert!(at(cred, path).is_none(), "{path} is revoked");
    }
    assert!(!old_file.exists(), "the old sink's file is revoked");
    assert!(!new_file.exists());
    daemon.stop();
    audit_verifies(&env, "after a moved credential's decommission");
}

/// Black-box finding: an agent renamed in the config (the same vault
/// path and file), its old name then decommissioned as the README shows
/// ("replaced by invoice-bot-2"), had the renamed agent's vault path
/// emptied and its file removed (and a PostgreSQL role made NOLOGIN).
/// What a credential of the config uses now is left to it, as a move
/// leaves it.
#[test]
fn decommissioning_an_agents_old_name_leaves_the_renamed_agent_alone() {
    let cred = |agent: &str| {
        format!(
            "[agents.{agent}.credentials.db]\nvault = \"local\"\npath = \"shared/db\"\ngenerate = {{ kind = \"password\", length = 24 }}\nevery = \"1h\"\ndeliver = [{{ type = \"file\", path = \"{{root}}/shared/db\", format = \"raw\" }}]\n"
        )
    };
    let env = Env::new(&format!("{}{}", agent_table("old"), cred("old")));
    let daemon = env.start();
    wait_version(&env, "old", "db", 1);
    env.write_credentials(&format!("{}{}", agent_table("new"), cred("new")));
    daemon.reload();
    wait_version(&env, "new", "db", 1);
    let file = env.root().join("shared/db");
    let value = wait_for(Duration::from_secs(10), || {
        let v = std::fs::read(&file).ok()?;
        (Some(v.clone()) == local_current(&env, "new")).then_some(v)
    })
    .expect("the renamed agent's value is delivered");
    let out = env.cli(&[
        "decommission",
        "old",
        "--reason",
        "replaced by new",
        "--wait",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        std::fs::read(&file).ok(),
        Some(value.clone()),
        "new's file is left"
    );
    assert_eq!(
        local_current(&env, "new"),
        Some(value),
        "new's version is left"
    );
    // And new goes on rotating there.
    env.cli_ok(&["rotate", "new/db", "--wait"]);
    let log = daemon.stop();
    assert!(
        log.contains("not revoking what new/db of the config uses now"),
        "{log}"
    );
    audit_verifies(&env, "after the old name's decommission");
}

/// The current value at `shared/db` in the local vault, as `agent/db`'s.
fn local_current(env: &Env, agent: &str) -> Option<Vec<u8>> {
    let k = keyturn::model::CredentialKey::new(
        keyturn::model::AgentId::new(agent).unwrap(),
        keyturn::model::CredentialId::new("db").unwrap(),
    );
    block_on(local_vault_value_at(
        env,
        "local",
        &k,
        "shared/db",
        Select::Stage(Stage::Current),
    ))
    .map(|(_, value)| value)
}

/// Defects: a `decommission --wait` whose daemon died after the decision
/// said only that no daemon was listening, as if nothing had been asked;
/// and `status` with the daemon down showed a decommissioned agent's
/// credentials as rotating on schedule and no decommission at all. The
/// client says the decision is recorded, and the stored status shows it.
/// The daemon is killed once the revocation has begun, which is after the
/// decision is stored but maybe before the client has its answer: the
/// client then reads the decision from the stored state.
#[test]
fn a_decommission_outlives_its_daemon_in_what_the_cli_says() {
    let env = Env::new("");
    let revoking = env.dir.path().join("revoking");
    bot_on_hook(
        &env,
        "db",
        &format!(
            "#!/bin/sh\ncat > /dev/null\n[ \"$KEYTURN_STEP\" = revoke ] && touch {} && sleep 10\nexit 0\n",
            revoking.display()
        ),
    );
    let daemon = env.start();
    wait_version(&env, "bot", "db", 1);
    let waiting = {
        let config = env.config.clone();
        std::thread::spawn(move || {
            std::process::Command::new(bin())
                .args([
                    "decommission",
                    "bot",
                    "--reason",
                    "gone",
                    "--wait",
                    "--config",
                ])
                .arg(config)
                .env_remove("KEYTURN_CONFIG")
                .output()
                .unwrap()
        })
    };
    wait_for(Duration::from_secs(10), || revoking.exists().then_some(()))
        .expect("the revocation begins");
    daemon.kill9();
    let out = waiting.join().unwrap();
    assert_eq!(out.status.code(), Some(69), "{}", text(&out));
    assert!(
        text(&out).contains("the decommission of bot was decided and recorded"),
        "{}",
        text(&out)
    );
    // Black-box finding: "no daemon is listening (is --config pointing at
    // its config?)" came first, as if the request had gone astray.
    assert!(
        !text(&out).contains("is --config pointing"),
        "{}",
        text(&out)
    );

    let out = env.cli(&["status"]);
    let said = text(&out);
    assert!(said.contains("showing the state stored in"), "{said}");
    let cred = said
        .lines()
        .find(|l| l.starts_with("bot/db"))
        .unwrap_or_else(|| panic!("{said}"));
    assert!(cred.ends_with("decommissioning"), "{said}");
    let agent = said
        .lines()
        .find(|l| l.starts_with("bot ") && l.contains("decommissioning"));
    assert!(agent.is_some(), "the decommission is listed: {said}");
}

/// The STAGE cell of `agent/cred` in the `status` table.
fn stage_cell(env: &Env, agent: &str, cred: &str) -> String {
    let out = text(&env.cli(&["status"]));
    let line = out
        .lines()
        .find(|l| l.starts_with(&format!("{agent}/{cred} ")))
        .unwrap_or_else(|| panic!("no {agent}/{cred} line: {out}"));
    ["current", "destroyed", "revoked"]
        .into_iter()
        .find(|s| line.split_whitespace().any(|w| w == *s))
        .unwrap_or_else(|| panic!("no stage in {line:?}: {out}"))
        .to_owned()
}

/// Defect: after a decommission had destroyed every version of an agent's
/// credentials, `status` (online and offline, table and `--json`) still
/// showed their stage as `current`. It shows `destroyed` once the
/// credential's items are verified; another agent's stay `current`.
#[test]
fn status_shows_a_decommissioned_agents_versions_destroyed_online_and_offline() {
    let (env, daemon) = old_and_app();
    let stages = |env: &Env| {
        let rows = status_json(env);
        (
            row(&rows, "old", "db")["stage"].clone(),
            row(&rows, "app", "db")["stage"].clone(),
        )
    };
    assert_eq!(stages(&env), ("current".into(), "current".into()));
    env.cli_ok(&["decommission", "old", "--reason", "retired", "--wait"]);
    assert_eq!(stages(&env), ("destroyed".into(), "current".into()));
    assert_eq!(stage_cell(&env, "old", "db"), "destroyed");
    assert_eq!(stage_cell(&env, "app", "db"), "current");
    daemon.stop();

    // From the state database, as the daemon said it.
    assert_eq!(stages(&env), ("destroyed".into(), "current".into()));
    assert_eq!(stage_cell(&env, "old", "db"), "destroyed");
    assert_eq!(stage_cell(&env, "app", "db"), "current");
}

/// Defect (black-box, security): the items of a credential were revoked in
/// order, files first, so an agent being decommissioned could stop its own
/// revocation by making its delivered file unremovable (here: the directory
/// holding it replaced by a symlink, which keyturn never follows): the
/// target's `revoke` and the vault's destroy were never attempted and the
/// credential kept working. The file is an item on its own now: the target
/// and the vault are revoked and verified while it stays pending (and
/// alerting), and what the symlink points to is never touched.
#[test]
fn an_agent_cannot_hold_up_its_own_revocation_by_tampering_with_its_files() {
    let env = Env::new("");
    let d = env.path().display();
    let p = write_hook(
        &env,
        &format!(
            r#"#!/bin/sh
case "$KEYTURN_STEP" in
  set) cat > "{d}/hook-value" ;;
  test) [ -e "{d}/revoked" ] && exit 1; cmp -s - "{d}/hook-value" || exit 1 ;;
  revoke) touch "{d}/revoked" ;;
esac
exit 0
"#
        ),
    );
    env.write_credentials(&format!(
        r#"{}
[agents.bot.credentials.api]
vault = "local"
generate = {{ kind = "password", length = 24 }}
every = "1h"
target = {{ type = "command", program = "{}" }}
deliver = [{{ type = "file", path = "{{root}}/bot/sub/api", format = "raw" }}]
"#,
        agent_table("bot"),
        p.display()
    ));
    let daemon = env.start();
    wait_version(&env, "bot", "api", 1);
    // The agent swaps its directory for a symlink to somewhere else.
    let sub = env.root().join("bot/sub");
    let elsewhere = env.path().join("elsewhere");
    std::fs::rename(&sub, &elsewhere).unwrap();
    std::os::unix::fs::symlink(&elsewhere, &sub).unwrap();
    env.cli_ok(&["decommission", "bot", "--reason", "compromised"]);
    let verified = |item: &str| {
        audit_records(&env).iter().any(|r| {
            r["event"] == "revocation.verified"
                && r["detail"]
                    .as_str()
                    .is_some_and(|d| d.starts_with(&format!("item={item} ")))
        })
    };
    wait_for(Duration::from_secs(30), || {
        (verified("api/target") && verified("api/vault:local")).then_some(())
    })
    .unwrap_or_else(|| panic!("target and vault not revoked: {:?}", audit_records(&env)));
    assert!(env.path().join("revoked").exists(), "the hook's revoke ran");
    let k = keyturn::model::CredentialKey::new(
        keyturn::model::AgentId::new("bot").unwrap(),
        keyturn::model::CredentialId::new("api").unwrap(),
    );
    assert!(
        block_on(local_vault_value_at(
            &env,
            "local",
            &k,
            "agents/bot/api",
            Select::Stage(Stage::Current)
        ))
        .is_none(),
        "the vault's versions are destroyed"
    );
    // The file item alone stays open, saying why; nothing is followed.
    assert!(!verified("api/sink:0"));
    let failed = audit_records(&env)
        .into_iter()
        .rfind(|r| {
            r["event"] == "revocation.failed"
                && r["detail"].as_str().is_some_and(|d| d == "item=api/sink:0")
        })
        .expect("the file item failed");
    assert!(
        failed["error"].as_str().unwrap().contains("symlink"),
        "{failed}"
    );
    // Retried again and again (status counts the attempts), audited once
    // (black-box: one `revocation.failed` per attempt flooded the log).
    let attempts = || {
        let out = text(&env.cli_ok(&["status"]));
        out.split("api/sink:0: ")
            .nth(1)
            .and_then(|rest| rest.split(" attempt").next())
            .and_then(|n| n.trim().parse::<u32>().ok())
    };
    wait_for(Duration::from_secs(30), || {
        attempts().filter(|n| *n >= 4).map(|_| ())
    })
    .unwrap_or_else(|| panic!("the file item is retried: {:?}", attempts()));
    let failures = audit_records(&env)
        .into_iter()
        .filter(|r| {
            r["event"] == "revocation.failed"
                && r["detail"]
                    .as_str()
                    .is_some_and(|d| d.starts_with("item=api/sink:0"))
        })
        .count();
    assert_eq!(failures, 1, "one record while the error stays the same");
    assert!(elsewhere.join("api").exists(), "never followed");
    assert_eq!(
        status_json(&env)
            .iter()
            .find(|r| r["agent"] == "bot")
            .map(|r| r["state"].clone()),
        Some(serde_json::json!("decommissioning"))
    );
    daemon.stop();
}

/// bb9 #1: a decommission of an agent whose rotation fails and retries is
/// decided (recorded, audited, answered) at once, not after the rotation
/// has used up its attempts; a `kill -9` right after the answer keeps it;
/// the revocation runs once the step in flight has ended, and no `set`
/// runs after the `revoke`.
#[test]
fn a_decommission_is_recorded_at_once_while_a_failing_rotation_retries() {
    let env = Env::new("");
    let d = env.path().display().to_string();
    bot_on_hook(
        &env,
        "db",
        &format!(
            r#"#!/bin/sh
cat > /dev/null
echo "$KEYTURN_STEP" >> "{d}/steps"
case "$KEYTURN_STEP" in
  set) [ -e "{d}/fail" ] && {{ sleep 4; exit 75; }} ;;
  test) [ -e "{d}/revoked" ] && exit 1 ;;
  revoke) touch "{d}/revoked" ;;
esac
exit 0
"#
        ),
    );
    let daemon = env.start();
    wait_version(&env, "bot", "db", 1);
    std::fs::write(env.path().join("fail"), b"").unwrap();
    env.cli_ok(&["rotate", "bot/db"]);
    // The `set` of version 2 is failing (4 s an attempt, 3 attempts).
    wait_for(Duration::from_secs(20), || {
        audit_records(&env)
            .iter()
            .any(|r| r["event"] == "rotation.set" && r["outcome"] != "ok")
            .then_some(())
    })
    .expect("the set fails and is retried");
    std::thread::sleep(Duration::from_millis(500));
    let asked = std::time::Instant::now();
    let out = env.cli(&["decommission", "bot", "--reason", "pulled"]);
    let took = asked.elapsed();
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        took < Duration::from_secs(3),
        "the decision waited for the rotation's retries: {took:?}"
    );
    daemon.kill9();
    let decided = |env: &Env| {
        audit_records(env)
            .iter()
            .filter(|r| r["event"] == "decommission.decided")
            .count()
    };
    assert_eq!(decided(&env), 1, "the decision survives kill -9");

    // The hook of the killed daemon's step is let finish (4 s) before the
    // restarted daemon works on the target (see the hook items).
    let daemon = env.start();
    wait_state(&env, "bot", "decommissioned");
    daemon.stop();
    assert_eq!(decided(&env), 1, "decided once");
    let steps = std::fs::read_to_string(env.path().join("steps")).unwrap();
    let after_revoke: Vec<&str> = steps
        .lines()
        .skip_while(|s| *s != "revoke")
        .filter(|s| *s == "set")
        .collect();
    assert!(after_revoke.is_empty(), "no set after the revoke: {steps}");
    audit_verifies(&env, "after a decommission during retries and a kill -9");
}

/// bb9 #2: a `set` hook running when the daemon is killed with -9 does not
/// outlive it: the hook dies with the daemon, what it started is killed at
/// the next start before any step, and nothing arms the target after the
/// decommission's `revoke`.
#[test]
fn a_hook_does_not_outlive_a_daemon_killed_with_9() {
    let env = Env::new("");
    let d = env.path().display().to_string();
    bot_on_hook(
        &env,
        "db",
        &format!(
            r#"#!/bin/sh
cat > /dev/null
case "$KEYTURN_STEP" in
  set) if [ -e "{d}/slow" ]; then echo $$ > "{d}/pgid"; sleep 6; touch "{d}/armed"; fi ;;
  test) [ -e "{d}/revoked" ] && exit 1 ;;
  revoke) touch "{d}/revoked" ;;
esac
exit 0
"#
        ),
    );
    let daemon = env.start();
    wait_version(&env, "bot", "db", 1);
    std::fs::write(env.path().join("slow"), b"").unwrap();
    env.cli_ok(&["rotate", "bot/db"]);
    let pgid: i32 = wait_for(Duration::from_secs(20), || {
        std::fs::read_to_string(env.path().join("pgid"))
            .ok()
            .and_then(|t| t.trim().parse().ok())
    })
    .expect("the slow set runs");
    daemon.kill9();
    // The restarted daemon's replay of that `set` is quick and arms nothing.
    std::fs::remove_file(env.path().join("slow")).unwrap();
    let group_alive = || {
        // SAFETY: signal 0 only probes whether the group exists.
        unsafe { libc::kill(-pgid, 0) == 0 }
    };
    let daemon = env.start();
    // Gone before anything else happens (zombies waiting for init aside).
    assert!(
        wait_for(Duration::from_secs(5), || (!group_alive()).then_some(())).is_some()
            || std::fs::read_to_string(format!("/proc/{pgid}/stat")).is_err(),
        "the hook's process group outlived the daemon"
    );
    env.cli_ok(&["decommission", "bot", "--reason", "pulled"]);
    wait_state(&env, "bot", "decommissioned");
    // Longer than the hook's sleep: nothing of it is left to arm the target.
    std::thread::sleep(Duration::from_secs(7));
    daemon.stop();
    assert!(env.path().join("revoked").exists());
    assert!(
        !env.path().join("armed").exists(),
        "a set of the killed daemon armed the target after the revoke"
    );
}
