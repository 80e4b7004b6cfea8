//! What the on-call is given matches what keyturn exports: every metric the
//! Grafana dashboard (`packaging/grafana/keyturn.json`) and the Prometheus
//! alert rules (`packaging/prometheus/keyturn.rules.yml`) name is on the
//! `/metrics` page of a real daemon that has rotated, been decommissioned
//! mid-way and has an alert sink; and every alert links to its section of
//! `docs/runbooks.md`. (The rules' behaviour is tested by promtool:
//! `packaging/prometheus/check.sh`.)

mod common;

use std::collections::BTreeSet;
use std::io::Write;
use std::path::Path;
use std::time::Duration;

use common::*;

const DASHBOARD: &str = "packaging/grafana/keyturn.json";
const RULES: &str = "packaging/prometheus/keyturn.rules.yml";
const RUNBOOKS: &str = "docs/runbooks.md";

fn read(relative: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(relative);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every keyturn metric name in `text` (PromQL, or any text holding it): an
/// identifier starting `keyturn_` on a word boundary. Alert names
/// (`KeyturnDaemonDown`), the job label (`"keyturn"`) and URLs do not match.
fn metric_names(text: &str) -> BTreeSet<String> {
    let re = regex::Regex::new(r"\bkeyturn_[a-z0-9_]+").unwrap();
    re.find_iter(text).map(|m| m.as_str().to_owned()).collect()
}

/// The series names a query can select from an OpenMetrics page: every
/// sample's name, and for each `# TYPE` the names its samples have even when
/// it has none yet (a counter's `_total`, a histogram's `_bucket`, `_sum`,
/// `_count`), so a family that is declared but still empty counts.
fn exported_names(page: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in page.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split_whitespace();
            let (Some(name), Some(kind)) = (parts.next(), parts.next()) else {
                panic!("a TYPE line without a name and a type: {line:?}");
            };
            let suffixes: &[&str] = match kind {
                // OpenMetrics names the family, the Prometheus text format
                // the sample (`_total` already on it).
                "counter" if name.ends_with("_total") => &[""],
                "counter" => &["_total"],
                "histogram" => &["_bucket", "_sum", "_count"],
                "summary" => &["", "_sum", "_count"],
                _ => &[""],
            };
            names.extend(suffixes.iter().map(|s| format!("{name}{s}")));
        } else if !line.starts_with('#') && !line.is_empty() {
            let end = line.find(['{', ' ']).unwrap_or(line.len());
            names.insert(line[..end].to_owned());
        }
    }
    names
}

/// Every `expr` (panel target or alert rule) of the dashboard, and the
/// templating queries: the places Grafana sends PromQL.
fn dashboard_queries(dashboard: &serde_json::Value) -> Vec<String> {
    fn walk(v: &serde_json::Value, out: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(m) => {
                for (k, v) in m {
                    match (k.as_str(), v) {
                        ("expr", serde_json::Value::String(s)) => out.push(s.clone()),
                        ("query", serde_json::Value::String(s)) => out.push(s.clone()),
                        ("query", serde_json::Value::Object(q)) => {
                            if let Some(serde_json::Value::String(s)) = q.get("query") {
                                out.push(s.clone());
                            }
                        }
                        _ => walk(v, out),
                    }
                }
            }
            serde_json::Value::Array(a) => a.iter().for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk(dashboard, &mut out);
    out
}

/// The names in `used` that `exported` lacks.
fn missing(used: &BTreeSet<String>, exported: &BTreeSet<String>) -> Vec<String> {
    used.difference(exported).cloned().collect()
}

#[test]
fn metric_names_are_read_from_queries_and_from_the_exposition() {
    let q = r#"histogram_quantile(0.9, sum by (le) (rate(keyturn_rotation_duration_seconds_bucket{job="keyturn"}[5m])))
        / on(instance) keyturn_credentials{state="failed"} and KeyturnDaemonDown keyturn:rule"#;
    assert_eq!(
        metric_names(q).into_iter().collect::<Vec<_>>(),
        [
            "keyturn_credentials",
            "keyturn_rotation_duration_seconds_bucket"
        ]
    );
    let page = "# HELP keyturn_rotations Rotations\n# TYPE keyturn_rotations counter\n\
                keyturn_rotations_total{result=\"ok\"} 1\n\
                # TYPE keyturn_rotation_duration_seconds histogram\n\
                # TYPE keyturn_credential_age_seconds gauge\n\
                keyturn_credential_age_seconds{agent=\"a\",credential=\"b\"} 2.0\n# EOF\n";
    let exported = exported_names(page);
    for name in [
        "keyturn_rotations_total",
        "keyturn_rotation_duration_seconds_bucket",
        "keyturn_rotation_duration_seconds_count",
        "keyturn_credential_age_seconds",
    ] {
        assert!(exported.contains(name), "{name} in {exported:?}");
    }
    // A name nothing exports, and a counter without its `_total`, are caught.
    let used: BTreeSet<String> = ["keyturn_rotations", "keyturn_rotatoins_total"]
        .map(String::from)
        .into();
    assert_eq!(
        missing(&used, &exported),
        ["keyturn_rotations", "keyturn_rotatoins_total"]
    );
}

/// A hook target whose `revoke` always fails (EX_TEMPFAIL), so a
/// decommission stays in progress and its SLA clock is exported.
fn failing_revoke_hook(env: &Env) -> std::path::PathBuf {
    let p = env.path().join("hook.sh");
    let d = env.path().display();
    std::fs::write(
        &p,
        format!(
            "#!/bin/sh\ncase \"$KEYTURN_STEP\" in\n  set) cat > \"{d}/hook-value\" ;;\n  test) cmp -s - \"{d}/hook-value\" || exit 1 ;;\n  revoke) exit 75 ;;\nesac\nexit 0\n"
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    p
}

#[test]
fn the_dashboard_and_the_alert_rules_name_only_metrics_a_running_daemon_exports() {
    let dashboard: serde_json::Value =
        serde_json::from_str(&read(DASHBOARD)).expect("the dashboard is JSON");
    let queries = dashboard_queries(&dashboard);
    assert!(
        queries.len() >= 10,
        "the dashboard's queries were found: {queries:?}"
    );
    let from_dashboard: BTreeSet<String> = queries.iter().flat_map(|q| metric_names(q)).collect();
    let from_rules = metric_names(&read(RULES));
    assert!(from_rules.len() >= 8, "{from_rules:?}");

    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let env = Env::with_daemon("", &format!("listen = \"127.0.0.1:{port}\""));
    let hook = failing_revoke_hook(&env);
    env.write_credentials(&format!(
        r#"{app}
[agents.app.credentials.db]
vault = "local"
generate = {{ kind = "password", length = 24 }}
every = "1h"
max_age = "3h"
deliver = [{{ type = "file", path = "{{root}}/app/db", format = "raw" }}]

{gone}
[agents.gone.credentials.api]
vault = "local"
generate = {{ kind = "password", length = 24 }}
every = "1h"
target = {{ type = "command", program = "{hook}" }}
deliver = [{{ type = "file", path = "{{root}}/gone/api", format = "raw" }}]

# Nothing listens there: deliveries are retried and spooled.
[alerts.oncall]
type = "alertmanager"
url = "http://127.0.0.1:9"
"#,
        app = agent_table("app"),
        gone = agent_table("gone"),
        hook = hook.display(),
    ));
    let daemon = env.start();
    wait_version(&env, "app", "db", 1);
    wait_version(&env, "gone", "api", 1);
    // Read now: the decommission removes gone's file.
    let values: Vec<(&str, Vec<u8>)> = ["app/db", "gone/api"]
        .map(|f| (f, std::fs::read(env.root().join(f)).unwrap()))
        .into();
    assert!(
        values.iter().all(|(_, v)| v.len() == 24),
        "24-char passwords"
    );
    env.cli_ok(&["decommission", "gone", "--reason", "observability test"]);
    let page = wait_for(Duration::from_secs(30), || {
        let page = http_get(port, "/metrics");
        page.contains("keyturn_decommission_sla_remaining_seconds{agent=\"gone\"}")
            .then_some(page)
    })
    .expect("the decommission's SLA clock is exported while revoke fails");

    // The families the rules compare, with the values the config implies.
    for line in [
        "keyturn_credential_max_age_seconds{agent=\"app\",credential=\"db\"} 10800.0",
        "keyturn_decommission_sla_seconds{agent=\"gone\"} 3600.0",
        "keyturn_alert_deliveries_total{sink=\"oncall\",outcome=\"gave_up\"} 0",
        "keyturn_audit_append_failures_total 0",
        "keyturn_rotations_total{result=\"ok\"}",
        "keyturn_rotation_duration_seconds_bucket{le=",
    ] {
        assert!(page.contains(line), "missing {line:?} in\n{page}");
    }
    // The values delivered are nowhere on the page.
    for (file, value) in &values {
        assert!(
            !contains(page.as_bytes(), value),
            "{file}'s value in /metrics"
        );
    }
    // What a client that does not ask for OpenMetrics gets (curl,
    // `promtool check metrics`, older scrapers) is the Prometheus text
    // format, and promtool finds nothing wrong in it. Black-box finding:
    // OpenMetrics for everyone, and promtool failed on every counter.
    assert!(
        page.contains("content-type: text/plain; version=0.0.4"),
        "{page}"
    );
    let body = page.split_once("\r\n\r\n").expect("a head and a body").1;
    let mut promtool = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool (packaging/prometheus/check.sh installs it: apt-get install prometheus)");
    promtool
        .stdin
        .take()
        .unwrap()
        .write_all(body.as_bytes())
        .unwrap();
    let checked = promtool.wait_with_output().unwrap();
    assert!(
        checked.status.success(),
        "promtool check metrics: {}{}\n{body}",
        String::from_utf8_lossy(&checked.stdout),
        String::from_utf8_lossy(&checked.stderr)
    );
    // Prometheus asks for OpenMetrics first and gets it, with the same
    // series.
    let open = http_get_with(
        port,
        "/metrics",
        "Accept: application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5\r\n",
    );
    assert!(
        open.contains("content-type: application/openmetrics-text; version=1.0.0")
            && open.trim_end().ends_with("# EOF"),
        "{open}"
    );
    let exported = exported_names(&page);
    assert_eq!(
        exported,
        exported_names(&open),
        "the two formats export the same series"
    );
    let from_dashboard = missing(&from_dashboard, &exported);
    let from_rules = missing(&from_rules, &exported);
    assert!(
        from_dashboard.is_empty() && from_rules.is_empty(),
        "metrics named but not exported: dashboard {from_dashboard:?}, rules {from_rules:?}\n/metrics:\n{page}"
    );
    daemon.stop();
}

/// GitHub's anchor for a Markdown heading: lower case, spaces to `-`, and
/// everything but letters, digits, `-` and `_` dropped.
fn github_anchor(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
            _ => None,
        })
        .collect()
}

#[test]
fn every_alert_links_to_its_own_runbook_section() {
    let rules = read(RULES);
    let runbooks = read(RUNBOOKS);
    let anchors: BTreeSet<String> = runbooks
        .lines()
        .filter_map(|l| l.strip_prefix("## "))
        .map(github_anchor)
        .collect();
    let field = |key: &str| -> Vec<String> {
        rules
            .lines()
            .filter_map(|l| l.trim_start().strip_prefix(key))
            .map(|v| v.trim().trim_matches('"').to_owned())
            .collect()
    };
    let alerts = field("- alert:");
    let urls = field("runbook_url:");
    assert!(alerts.len() >= 8, "{alerts:?}");
    for key in ["severity:", "summary:", "description:"] {
        assert_eq!(field(key).len(), alerts.len(), "one {key} per alert");
    }
    assert_eq!(urls.len(), alerts.len(), "one runbook_url per alert");
    for (alert, url) in alerts.iter().zip(&urls) {
        let anchor = github_anchor(alert);
        assert_eq!(
            url,
            &format!("https://github.com/keyturn/keyturn/blob/main/docs/runbooks.md#{anchor}"),
            "{alert}"
        );
        assert!(
            anchors.contains(&anchor),
            "{RUNBOOKS} has no section \"## {alert}\" (anchors: {anchors:?})"
        );
    }
}

/// The dashboard is a Grafana JSON model Grafana can place: panels with
/// unique ids on the 24-column grid without overlapping, and every panel and
/// query reading the one Prometheus chosen in the `DS_PROMETHEUS` variable
/// (so it works provisioned from a file as well as imported by hand).
#[test]
fn the_dashboard_is_a_grafana_model_over_one_prometheus_variable() {
    let d: serde_json::Value = serde_json::from_str(&read(DASHBOARD)).unwrap();
    assert_eq!(d["uid"], "keyturn");
    assert!(
        d["schemaVersion"].as_u64().unwrap() >= 36,
        "{}",
        d["schemaVersion"]
    );
    let vars = d["templating"]["list"].as_array().unwrap();
    assert!(
        vars.iter().any(|v| v["name"] == "DS_PROMETHEUS"
            && v["type"] == "datasource"
            && v["query"] == "prometheus"),
        "{vars:?}"
    );
    let ds = serde_json::json!({"type": "prometheus", "uid": "${DS_PROMETHEUS}"});
    for v in vars.iter().filter(|v| v["type"] == "query") {
        assert_eq!(v["datasource"], ds, "variable {}", v["name"]);
    }
    let panels = d["panels"].as_array().unwrap();
    let mut ids = BTreeSet::new();
    let mut cells: BTreeSet<(u64, u64)> = BTreeSet::new();
    for p in panels {
        let title = p["title"].as_str().unwrap();
        assert!(
            ids.insert(p["id"].as_u64().unwrap()),
            "duplicate id: {title}"
        );
        let g = &p["gridPos"];
        let [x, y, w, h] = ["x", "y", "w", "h"].map(|k| g[k].as_u64().unwrap());
        assert!(x + w <= 24 && w > 0 && h > 0, "{title}: {g}");
        for cell in (x..x + w).flat_map(|c| (y..y + h).map(move |r| (c, r))) {
            assert!(
                cells.insert(cell),
                "{title} overlaps another panel at {cell:?}"
            );
        }
        if p["type"] == "row" {
            continue;
        }
        assert_eq!(p["datasource"], ds, "{title}");
        let targets = p["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "{title}");
        for t in targets {
            assert_eq!(t["datasource"], ds, "{title}");
            assert!(!t["expr"].as_str().unwrap().is_empty(), "{title}");
        }
    }
    assert!(ids.len() >= 20, "{} panels", ids.len());
}
