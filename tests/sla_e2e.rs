//! Revocation SLAs reach the on-call, end to end: OpenBao "down" (a fault
//! proxy answers 503 for it) during a decommission under a short SLA; the
//! warning (80 %) and then the breach (100 %) reach a real Alertmanager
//! (read back through its own API) and the PagerDuty Events v2 contract
//! stub (`tests/stubs/pagerduty_events_stub.py`); `kill -9` and a restart
//! mid-way forget nothing and open no second incident; when OpenBao
//! returns, revocation completes and both alerts resolve.
//!
//! REAL SERVERS: OpenBao and Alertmanager from `scripts/services.sh`
//! (`KEYTURN_TEST_BAO_*`, `KEYTURN_TEST_ALERTMANAGER_URL`).

mod common;

use std::os::unix::fs::PermissionsExt;
use std::process::Child;
use std::time::{Duration, Instant};

use common::proxy::{Flavor, Match, Proxy};
use common::*;
use serde_json::Value;

fn get_json(url: &str) -> Value {
    block_on(async {
        let text = reqwest::get(url).await.unwrap().text().await.unwrap();
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{url}: {e}: {text}"))
    })
}

/// The PagerDuty stub on a free port.
struct PagerDuty {
    child: Child,
    base: String,
}

impl PagerDuty {
    fn start() -> PagerDuty {
        let (child, base) = start_pagerduty_stub();
        PagerDuty { child, base }
    }

    /// `(event_action, dedup_key, summary)` of every event accepted, in order.
    fn events(&self) -> Vec<(String, String, String)> {
        get_json(&format!("{}/control/events", self.base))
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                let e = &e["event"];
                (
                    e["event_action"].as_str().unwrap_or_default().to_owned(),
                    e["dedup_key"].as_str().unwrap_or_default().to_owned(),
                    e["payload"]["summary"]
                        .as_str()
                        .unwrap_or_default()
                        .to_owned(),
                )
            })
            .collect()
    }

    fn count(&self, action: &str, alert: &str) -> usize {
        self.events()
            .iter()
            .filter(|(a, k, _)| a == action && k.contains(alert))
            .count()
    }
}

impl Drop for PagerDuty {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Alertmanager's active alerts named `name` for `agent`.
fn am_active(am: &str, name: &str, agent: &str) -> Vec<Value> {
    get_json(&format!("{am}/api/v2/alerts"))
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["labels"]["alertname"] == name && a["labels"]["agent"] == agent)
        .filter(|a| a["status"]["state"] == "active")
        .cloned()
        .collect()
}

fn wait_until(what: &str, limit: Duration, mut f: impl FnMut() -> bool) -> Instant {
    wait_for(limit, || f().then(Instant::now)).unwrap_or_else(|| panic!("timed out: {what}"))
}

const AT_RISK: &str = "KeyturnRevocationSlaAtRisk";
const BREACHED: &str = "KeyturnRevocationSlaBreached";

/// The `[alerts.am]` table (the test Alertmanager at `am`) and, last, the
/// `[alerts.pd]` table (PagerDuty at `pd`, its routing key written to
/// `pd.key` in `env`'s directory).
fn alert_sinks(env: &Env, am: &str, pd: &str) -> String {
    let key = env.path().join("pd.key");
    std::fs::write(&key, "canaryPDkey0123456789abcdefABCDE").unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    format!(
        "[alerts.am]\ntype = \"alertmanager\"\nurl = \"{am}\"\n\n[alerts.pd]\ntype = \"pagerduty\"\nrouting_key_file = \"{}\"\nurl = \"{pd}/v2/enqueue\"\n",
        key.display()
    )
}

#[test]
fn an_sla_breach_with_openbao_down_pages_once_survives_kill_9_and_resolves_when_it_returns() {
    let am = need("KEYTURN_TEST_ALERTMANAGER_URL");
    let proxy = Proxy::start(&need("KEYTURN_TEST_BAO_ADDR"), Flavor::Bao);
    let pd = PagerDuty::start();
    let agent = format!("sla-bot-{:06x}", rand::random::<u32>() & 0xff_ffff);
    let env = Env::new("");
    write_bao_token(&env);
    let path = format!("e2e/sla/{agent}");
    env.write_credentials(&format!(
        r#"
[tiers]
fast = {{ revocation_sla = "6s" }}

[alert_rules]
resolve_hold = "0s"

{alerts}
{bao}
{table}
[agents.{agent}.credentials.local]
vault = "local"
generate = {{ kind = "password", length = 24 }}
every = "1h"
deliver = [{{ type = "file", path = "{{root}}/{agent}/local" }}]

[agents.{agent}.credentials.in-bao]
vault = "bao"
path = "{path}"
generate = {{ kind = "password", length = 24 }}
every = "1h"
deliver = [{{ type = "file", path = "{{root}}/{agent}/in-bao" }}]
"#,
        alerts = alert_sinks(&env, &am, &pd.base),
        table = agent_table_in(&agent, "fast"),
        bao = bao_table(&proxy.url()),
    ));
    let daemon = env.start();
    wait_version(&env, &agent, "local", 1);
    wait_version(&env, &agent, "in-bao", 1);

    // OpenBao goes away; the agent is retired.
    proxy.fail(Match::any(), 503, usize::MAX, None);
    let out = env.cli(&["decommission", &agent, "--reason", "sla test", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let row: Value = serde_json::from_slice(&out.stdout).unwrap();
    let deadline: chrono::DateTime<chrono::Utc> =
        row["agent"]["deadline"].as_str().unwrap().parse().unwrap();

    // The warning at 80 %, then the breach at 100 %, in both pipelines.
    wait_until(
        "the warning in Alertmanager",
        Duration::from_secs(15),
        || !am_active(&am, AT_RISK, &agent).is_empty(),
    );
    let warn = &am_active(&am, AT_RISK, &agent)[0];
    assert_eq!(warn["labels"]["severity"], "warning", "{warn}");
    assert_eq!(warn["labels"]["tenant"], "acme");
    assert_eq!(warn["labels"]["tier"], "fast");
    assert!(
        am_active(&am, BREACHED, &agent).is_empty() || chrono::Utc::now() >= deadline,
        "the breach must not come before the deadline"
    );
    wait_until(
        "the breach in Alertmanager",
        Duration::from_secs(15),
        || !am_active(&am, BREACHED, &agent).is_empty(),
    );
    let seen = chrono::Utc::now();
    assert!(seen >= deadline, "breach seen before the deadline");
    assert_eq!(
        am_active(&am, BREACHED, &agent)[0]["labels"]["severity"],
        "critical"
    );
    wait_until(
        "both triggers at PagerDuty",
        Duration::from_secs(15),
        || pd.count("trigger", AT_RISK) == 1 && pd.count("trigger", BREACHED) == 1,
    );
    assert!(
        !pd.events().iter().any(|(_, _, s)| s.is_empty()),
        "every event has a summary"
    );
    // The revocation is stuck on OpenBao, retrying.
    let table = String::from_utf8_lossy(&env.cli_ok(&["status"]).stdout).into_owned();
    assert!(table.contains("decommissioning"), "{table}");
    assert!(
        table.contains("in-bao/vault:bao"),
        "the pending item is named: {table}"
    );

    // And in the log, at their severities: a host that watches its
    // journal for ERROR lines hears of the breach without any alert sink.
    let log = daemon.log_text();
    let logged = |level: &str, name: &str| {
        log.lines()
            .any(|l| l.contains(level) && l.contains("alert firing") && l.contains(name))
    };
    assert!(
        logged("ERROR", BREACHED) && logged("WARN", AT_RISK),
        "{log}"
    );

    // kill -9 mid-way and a restart: nothing forgotten, no second incident.
    daemon.kill9();
    let daemon = env.start();
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(pd.count("trigger", BREACHED), 1, "{:?}", pd.events());
    assert_eq!(pd.count("trigger", AT_RISK), 1, "{:?}", pd.events());
    assert_eq!(
        am_active(&am, BREACHED, &agent).len(),
        1,
        "one alert, not two"
    );
    let table = String::from_utf8_lossy(&env.cli_ok(&["status"]).stdout).into_owned();
    assert!(table.contains("decommissioning"), "{table}");

    // OpenBao returns: revocation completes, both alerts resolve.
    proxy.clear();
    wait_for(Duration::from_secs(30), || {
        status_json(&env)
            .iter()
            .all(|r| r["state"] == "decommissioned")
            .then_some(())
    })
    .expect("the decommission completes once OpenBao is back");
    wait_until(
        "both resolves at PagerDuty",
        Duration::from_secs(15),
        || pd.count("resolve", AT_RISK) == 1 && pd.count("resolve", BREACHED) == 1,
    );
    wait_until(
        "no active alert in Alertmanager",
        Duration::from_secs(15),
        || {
            am_active(&am, AT_RISK, &agent).is_empty()
                && am_active(&am, BREACHED, &agent).is_empty()
        },
    );
    assert_eq!(pd.count("trigger", BREACHED), 1, "{:?}", pd.events());
    let records = audit_records(&env);
    let delivered = records
        .iter()
        .filter(|r| {
            r["event"]
                .as_str()
                .unwrap_or_default()
                .starts_with("alert.")
        })
        .count();
    assert!(delivered >= 4, "alert deliveries are audited: {delivered}");
    assert!(
        records.iter().any(|r| r["event"] == "decommission.verified"
            && r["detail"]
                .as_str()
                .unwrap_or_default()
                .contains("breached")),
        "the breach is on record"
    );
    daemon.stop();
    audit_verifies(&env, "after an SLA breach");
}

#[test]
fn a_rotation_that_keeps_failing_pages_before_max_age_and_a_success_resolves_it() {
    let am = need("KEYTURN_TEST_ALERTMANAGER_URL");
    let pd = PagerDuty::start();
    let agent = format!("sick-bot-{:06x}", rand::random::<u32>() & 0xff_ffff);
    let env = Env::new("");
    // A target whose `set` refuses while {dir}/broken exists.
    let hook = env.path().join("hook.sh");
    let d = env.path().display();
    std::fs::write(
        &hook,
        format!(
            "#!/bin/sh\ncase \"$KEYTURN_STEP\" in\n  set) [ -e \"{d}/broken\" ] && exit 1; cat > \"{d}/value\" ;;\n  test) cmp -s - \"{d}/value\" || exit 1 ;;\nesac\nexit 0\n"
        ),
    )
    .unwrap();
    std::fs::set_permissions(&hook, std::fs::Permissions::from_mode(0o755)).unwrap();
    env.write_credentials(&format!(
        r#"
[alert_rules]
failures_warning = 2
failures_critical = 4
resolve_hold = "0s"

{alerts}severities = ["critical"]

{table}
[agents.{agent}.credentials.api]
vault = "local"
generate = {{ kind = "password", length = 24 }}
every = "3s"
grace = "1s"
max_age = "12s"
target = {{ type = "command", program = "{hook}" }}
deliver = [{{ type = "file", path = "{{root}}/{agent}/api" }}]
"#,
        alerts = alert_sinks(&env, &am, &pd.base),
        table = agent_table(&agent),
        hook = hook.display(),
    ));
    let daemon = env.start();
    wait_version(&env, &agent, "api", 1);
    let broken_at = Instant::now();
    std::fs::write(env.path().join("broken"), b"").unwrap();
    let max_age_at = broken_at + Duration::from_secs(12);

    let failing = |severity: &str| {
        am_active(&am, "KeyturnRotationFailing", &agent)
            .iter()
            .any(|a| a["labels"]["severity"] == severity && a["labels"]["credential"] == "api")
    };
    wait_until("the failing warning", Duration::from_secs(20), || {
        failing("warning")
    });
    wait_until("the failing page", Duration::from_secs(20), || {
        failing("critical")
    });
    let expiring = wait_until("expiring, paged", Duration::from_secs(20), || {
        !am_active(&am, "KeyturnCredentialExpiring", &agent).is_empty()
            || !am_active(&am, "KeyturnCredentialExpired", &agent).is_empty()
    });
    assert!(
        expiring < max_age_at || !am_active(&am, "KeyturnCredentialExpiring", &agent).is_empty(),
        "the expiry page must come before max_age is reached"
    );
    wait_until("PagerDuty paged", Duration::from_secs(20), || {
        pd.count("trigger", "KeyturnRotationFailing") == 1
            && pd.count("trigger", "KeyturnCredentialExpiring") == 1
    });
    assert!(
        pd.events().iter().all(|(_, k, _)| !k.contains("warning")),
        "only critical alerts are routed to PagerDuty"
    );

    // Fixed: the next rotation succeeds and every alert resolves.
    std::fs::remove_file(env.path().join("broken")).unwrap();
    wait_version(&env, &agent, "api", 2);
    wait_until("resolved in Alertmanager", Duration::from_secs(30), || {
        am_active(&am, "KeyturnRotationFailing", &agent).is_empty()
            && am_active(&am, "KeyturnCredentialExpiring", &agent).is_empty()
            && am_active(&am, "KeyturnCredentialExpired", &agent).is_empty()
    });
    wait_until("resolved at PagerDuty", Duration::from_secs(30), || {
        pd.count("resolve", "KeyturnRotationFailing") == 1
            && pd.count("resolve", "KeyturnCredentialExpiring") == 1
    });
    assert_eq!(
        pd.count("trigger", "KeyturnRotationFailing"),
        1,
        "one incident"
    );
    daemon.stop();
}

/// Defect: keyturn's own `KeyturnRotationFailing` never fired for a
/// follower whose follow failed (only the shipped Prometheus rule did). A
/// follower whose OpenBao answers 503 (a fault proxy in front of it)
/// raises it in a real Alertmanager and at PagerDuty, labelled
/// `mode="follow"` and saying that following is failing; when OpenBao
/// answers again the next poll succeeds and it resolves in both.
#[test]
fn a_follower_that_cannot_read_its_vault_raises_the_failing_alert_until_it_reads_again() {
    let am = need("KEYTURN_TEST_ALERTMANAGER_URL");
    let bao = need("KEYTURN_TEST_BAO_ADDR");
    let proxy = Proxy::start(&bao, Flavor::Bao);
    let pd = PagerDuty::start();
    let agent = format!("follow-bot-{:06x}", rand::random::<u32>() & 0xff_ffff);
    let path = format!("e2e/follow-alert/{agent}");
    let credential = |how: &str| {
        format!(
            r#"{}
[agents.{agent}.credentials.db]
vault = "bao"
path = "{path}"
generate = {{ kind = "password", length = 24 }}
{how}
deliver = [{{ type = "file", path = "{{root}}/{agent}/db" }}]
"#,
            agent_table(&agent)
        )
    };
    let rotator = Env::new(&format!(
        "{}{}",
        bao_table(&bao),
        credential("every = \"1h\"")
    ));
    write_bao_token(&rotator);
    let follower = Env::new("");
    write_bao_token(&follower);
    follower.write_credentials(&format!(
        "[alert_rules]\nfailures_warning = 2\nresolve_hold = \"0s\"\n\n{}\n{}{}",
        alert_sinks(&follower, &am, &pd.base),
        bao_table(&proxy.url()),
        credential("mode = \"follow\"\npoll = \"1s\"")
    ));
    let r = rotator.start();
    wait_version(&rotator, &agent, "db", 1);
    let f = follower.start();
    wait_version(&follower, &agent, "db", 1);

    // OpenBao goes away for the follower only.
    proxy.fail(Match::any(), 503, usize::MAX, None);
    const FAILING: &str = "KeyturnRotationFailing";
    wait_until(
        "the follower's failing alert",
        Duration::from_secs(30),
        || !am_active(&am, FAILING, &agent).is_empty(),
    );
    let active = am_active(&am, FAILING, &agent);
    assert_eq!(active.len(), 1, "{active:?}");
    let a = &active[0];
    assert_eq!(a["labels"]["mode"], "follow", "{a}");
    assert_eq!(a["labels"]["credential"], "db", "{a}");
    assert_eq!(a["labels"]["severity"], "warning", "{a}");
    assert_eq!(a["labels"]["source"], "keyturn", "{a}");
    let summary = a["annotations"]["summary"].as_str().unwrap_or_default();
    assert!(summary.contains("following is failing"), "{a}");
    assert!(
        a["annotations"]["description"]
            .as_str()
            .unwrap_or_default()
            .contains("503"),
        "names the vault's error: {a}"
    );
    wait_until("the trigger at PagerDuty", Duration::from_secs(15), || {
        pd.count("trigger", FAILING) == 1
    });
    let trigger = get_json(&format!("{}/control/events", pd.base))
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["event"].clone())
        .find(|e| e["event_action"] == "trigger")
        .unwrap();
    assert_eq!(
        trigger["payload"]["custom_details"]["mode"], "follow",
        "{trigger}"
    );

    // OpenBao answers again: the next poll reads it and the alert resolves.
    proxy.clear();
    wait_until("resolved in Alertmanager", Duration::from_secs(30), || {
        am_active(&am, FAILING, &agent).is_empty()
    });
    wait_until("resolved at PagerDuty", Duration::from_secs(15), || {
        pd.count("resolve", FAILING) == 1
    });
    assert_eq!(pd.count("trigger", FAILING), 1, "one incident");
    assert_eq!(
        row(&status_json(&follower), &agent, "db")["state"],
        "follow"
    );
    f.stop();
    r.stop();
}
