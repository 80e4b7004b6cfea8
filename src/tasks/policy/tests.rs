//! Policy tests: the decision against a reference model, refusals, and the
//! config checks (through the validator and through a whole file).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use proptest::prelude::*;

use super::*;
use crate::config::validate::Context;
use crate::model::PluginError;
use crate::tasks::issuers::TaskIssuer;

/// An issuer for the checks: accepts a grant `{ roles = [...] }` with at
/// least one role, like a real one reports through the validator.
#[derive(Debug)]
struct RolesIssuer;

impl IssuerPlugin for RolesIssuer {
    fn check(&mut self, _: &mut Validator<'_>, _: Loc<'_>) {}

    fn check_grant(&self, grant: &Grant, v: &mut Validator<'_>, at: Loc<'_>) {
        #[derive(serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        #[allow(dead_code)]
        struct G {
            roles: Vec<String>,
        }
        match grant.parse::<G>() {
            Ok(g) if g.roles.is_empty() => v.err(at.key("roles"), "list at least one role"),
            Ok(_) => {}
            Err(e) => v.err(at, e),
        }
    }

    fn build(&self) -> Result<Arc<dyn TaskIssuer>, PluginError> {
        unreachable!("the policy checks never build an issuer")
    }
}

fn raw(text: &str) -> BTreeMap<String, RawPolicy> {
    #[derive(serde::Deserialize)]
    struct File {
        policies: BTreeMap<String, RawPolicy>,
    }
    toml::from_str::<File>(text).unwrap().policies
}

/// (policies, issues as `path: message`).
fn check(text: &str) -> (BTreeMap<String, Policy>, Vec<String>) {
    let raw = raw(text);
    let ctx = Context {
        source: PathBuf::from("/etc/keyturn/keyturn.toml"),
    };
    let mut v = Validator::for_section(&ctx);
    let agents: BTreeSet<&str> = ["bot", "other"].into_iter().collect();
    let pg = RolesIssuer;
    let lookup = |name: &str| -> Option<&dyn IssuerPlugin> {
        (name == "pg").then_some(&pg as &dyn IssuerPlugin)
    };
    let policies = check_all(
        &raw.iter().map(|(n, p)| (n.clone(), Some(p))).collect(),
        &agents,
        &IssuerScope {
            lookup: &lookup,
            names: &["pg"],
            invalid: &|_| false,
        },
        &mut v,
    );
    let issues = v
        .into_issues()
        .iter()
        .map(|i| format!("{}: {}", i.path, i.message))
        .collect();
    (policies, issues)
}

const GOOD: &str = r#"
[policies.invoicing]
agents = ["bot"]
tenants = ["acme", "globex"]
use_cases = ["month-end"]
max_ttl = "1h"
default_ttl = "10m"

[policies.invoicing.levels.low]
max_ttl = "5m"
grants.pg = { roles = ["read_a"] }

[policies.invoicing.levels.high]
grants.pg = { roles = ["read_a", "read_b"] }
"#;

#[test]
fn a_good_policy_is_read_with_its_defaults() {
    let (policies, issues) = check(GOOD);
    assert!(issues.is_empty(), "{issues:?}");
    let p = &policies["invoicing"];
    assert_eq!(p.max_ttl, Duration::from_secs(3600));
    assert_eq!(p.default_ttl, Duration::from_secs(600));
    assert_eq!(p.levels["low"].max_ttl, Duration::from_secs(300));
    assert_eq!(p.levels["high"].max_ttl, Duration::from_secs(3600));
    assert_eq!(
        p.levels["high"].grants["pg"].0,
        serde_json::json!({"roles": ["read_a", "read_b"]})
    );

    // The default TTL never exceeds a level's maximum.
    let ask = TaskAsk {
        agent: "bot",
        tenant: "acme",
        use_case: "month-end",
        sensitivity: "low",
        ttl: None,
    };
    assert_eq!(
        decide(&policies, &ask).unwrap().ttl,
        Duration::from_secs(300)
    );
    let high = TaskAsk {
        sensitivity: "high",
        ..ask.clone()
    };
    assert_eq!(
        decide(&policies, &high).unwrap().ttl,
        Duration::from_secs(600)
    );
}

#[test]
fn every_problem_is_reported_at_its_key_at_once() {
    let (policies, issues) = check(
        r#"
[policies.bad]
agents = ["bot", "ghost"]
tenants = [" acme", ""]
use_cases = []
max_ttl = "1h"
default_ttl = "2h"

[policies.bad.levels.low]
max_ttl = "3h"
grants.pg = { roles = [] }
grants.nope = { roles = ["x"] }

[policies.bad.levels.empty]

[policies.nolevels]
agents = ["other"]
tenants = ["t"]
"#,
    );
    assert!(policies.is_empty());
    let want = [
        "policies.bad.agents[1]: unknown agent `ghost`",
        "policies.bad.tenants[0]: invalid tenant ` acme`: it starts or ends with white space",
        "policies.bad.tenants[1]: invalid tenant ``: it is empty",
        "policies.bad.use_cases: list at least one use case",
        "policies.bad.default_ttl: default_ttl (2h) is longer than max_ttl (1h)",
        "policies.bad.levels.low.max_ttl: a level's max_ttl (3h) may not exceed its policy's (1h)",
        "policies.bad.levels.low.grants.pg.roles: list at least one role",
        "policies.bad.levels.low.grants.nope: unknown issuer `nope`; configured: pg",
        "policies.bad.levels.empty: level `empty` grants nothing",
        "policies.nolevels: policy `nolevels` has no sensitivity level",
    ];
    for w in want {
        assert!(
            issues.iter().any(|i| i.starts_with(w)),
            "missing {w:?} in {issues:#?}"
        );
    }
    assert_eq!(issues.len(), want.len(), "{issues:#?}");
}

#[test]
fn policies_that_could_match_one_request_are_refused() {
    let (policies, issues) = check(
        r#"
[policies.a]
agents = ["bot"]
tenants = ["acme"]
use_cases = ["x", "y"]
levels.low.grants.pg = { roles = ["r"] }

[policies.b]
agents = ["bot", "other"]
tenants = ["acme", "globex"]
use_cases = ["y"]
levels.low.grants.pg = { roles = ["r"] }

[policies.c]
agents = ["bot"]
tenants = ["acme"]
use_cases = ["z"]
levels.low.grants.pg = { roles = ["r"] }

[policies.d]
agents = ["other"]
tenants = ["acme"]
levels.low.grants.pg = { roles = ["r"] }
"#,
    );
    assert_eq!(
        issues,
        [
            "policies.b: policy `b` overlaps policy `a` (agent `bot`, tenant `acme`, use case `y`): a task request \
             must match one policy; split the agents, tenants or use cases between them"
        ],
    );
    // `c` (another use case) and `d` (another agent) stand.
    assert_eq!(policies.keys().collect::<Vec<_>>(), ["a", "c", "d"]);
}

#[test]
fn refusals_say_what_was_wrong_and_what_to_do() {
    let (policies, issues) = check(GOOD);
    assert!(issues.is_empty());
    let ask = TaskAsk {
        agent: "bot",
        tenant: "acme",
        use_case: "month-end",
        sensitivity: "high",
        ttl: Some(Duration::from_secs(60)),
    };
    // (the ask, its refusal's code, and what it says where that is checked)
    let cases = [
        (
            TaskAsk {
                agent: "other",
                ..ask.clone()
            },
            "no_policy",
            Some("agent `other` may not start tasks: no [policies.NAME] lists it in `agents`"),
        ),
        (
            TaskAsk {
                tenant: "initech",
                ..ask.clone()
            },
            "tenant_not_allowed",
            Some("agent `bot` may not serve tenant `initech`; its policies allow: acme, globex"),
        ),
        (
            TaskAsk {
                use_case: "payroll",
                ..ask.clone()
            },
            "use_case_not_allowed",
            Some(
                "agent `bot` may not run use case `payroll` for tenant `acme`; allowed: month-end",
            ),
        ),
        (
            TaskAsk {
                sensitivity: "secret",
                ..ask.clone()
            },
            "unknown_sensitivity",
            Some("policy `invoicing` has no sensitivity level `secret`; it has: high, low"),
        ),
        (
            TaskAsk {
                sensitivity: "low",
                ttl: Some(Duration::from_secs(301)),
                ..ask.clone()
            },
            "ttl_too_long",
            Some(
                "a TTL of 5m 1s is longer than policy `invoicing` allows at sensitivity `low` (5m); ask for 5m or less",
            ),
        ),
        (
            TaskAsk {
                sensitivity: "low",
                ttl: Some(Duration::from_secs(u64::MAX)),
                ..ask.clone()
            },
            "ttl_too_long",
            Some(
                "a TTL of over 100 years is longer than policy `invoicing` allows at sensitivity `low` (5m); ask for 5m or less",
            ),
        ),
        (
            TaskAsk {
                ttl: Some(Duration::from_millis(500)),
                ..ask.clone()
            },
            "ttl_zero",
            None,
        ),
        (
            TaskAsk {
                ttl: Some(Duration::from_millis(1999)),
                ..ask.clone()
            },
            "ttl_zero",
            Some(
                "a TTL must be at least 2 seconds: a shorter one runs out while its credentials are issued",
            ),
        ),
    ];
    for (a, code, says) in cases {
        let r = decide(&policies, &a).unwrap_err();
        assert_eq!(r.code(), code, "{a:?}");
        if let Some(says) = says {
            assert_eq!(r.to_string(), says);
        }
    }
    // Granted: whole seconds.
    let d = decide(
        &policies,
        &TaskAsk {
            ttl: Some(Duration::from_millis(90_500)),
            ..ask
        },
    )
    .unwrap();
    assert_eq!(
        (d.policy.name.as_str(), d.ttl),
        ("invoicing", Duration::from_secs(90))
    );
}

#[test]
fn a_policy_in_a_whole_file_is_checked_with_the_rest() {
    // Through the loader: located at its line, listed with the file's other
    // errors. (No issuer is configured, so the grant's issuer is unknown.)
    let text = "[agents.bot]\nowner = \"o@example.com\"\ntenant = \"acme\"\ntier = \"low\"\n\n\
                [policies.p]\nagents = [\"bot\", \"ghost\"]\ntenants = [\"acme\"]\n\
                levels.low.grants.pg = { roles = [\"r\"] }\n";
    let errs =
        crate::config::load::load_str(Path::new("/etc/keyturn/keyturn.toml"), text).unwrap_err();
    let got: Vec<String> = errs
        .0
        .iter()
        .map(|e| format!("{}:{}: {}: {}", e.line, e.column, e.toml_path, e.message))
        .collect();
    assert!(
        got.iter()
            .any(|e| e.starts_with("7:")
                && e.contains("policies.p.agents[1]: unknown agent `ghost`")),
        "{got:#?}"
    );
    assert!(
        got.iter().any(|e| e.contains("policies.p.levels.low.grants.pg: unknown issuer `pg`; no [issuers.NAME] table is configured")),
        "{got:#?}"
    );
}

// --------------------------------------------------------------------------
// decide() against a reference model
// --------------------------------------------------------------------------

const AGENTS: [&str; 3] = ["a", "b", "c"];
const TENANTS: [&str; 3] = ["t1", "t2", "t3"];
const USE_CASES: [&str; 3] = ["u1", "u2", "u3"];
const LEVELS: [&str; 2] = ["low", "high"];

fn subset(all: &'static [&'static str]) -> impl Strategy<Value = BTreeSet<String>> {
    proptest::sample::subsequence(all.to_vec(), 1..=all.len())
        .prop_map(|v| v.into_iter().map(str::to_owned).collect())
}

fn arb_policy(i: usize) -> impl Strategy<Value = Policy> {
    (
        subset(&AGENTS),
        subset(&TENANTS),
        proptest::option::of(subset(&USE_CASES)),
        1u64..5,
        proptest::sample::subsequence(LEVELS.to_vec(), 1..=2),
        proptest::collection::vec(1u64..6, 2),
    )
        .prop_map(
            move |(agents, tenants, use_cases, max, levels, level_max)| {
                let max_ttl = Duration::from_secs(max * 60);
                Policy {
                    name: format!("p{i}"),
                    agents,
                    tenants,
                    use_cases,
                    max_ttl,
                    default_ttl: Duration::from_secs(120).min(max_ttl),
                    levels: levels
                        .into_iter()
                        .zip(level_max)
                        .map(|(l, m)| {
                            (
                                l.to_owned(),
                                Level {
                                    max_ttl: Duration::from_secs(m * 60).min(max_ttl),
                                    grants: BTreeMap::new(),
                                },
                            )
                        })
                        .collect(),
                }
            },
        )
}

/// Policies as the config keeps them: a later one that overlaps an earlier
/// one is dropped (the config refuses it).
fn arb_policies() -> impl Strategy<Value = BTreeMap<String, Policy>> {
    (arb_policy(0), arb_policy(1), arb_policy(2), arb_policy(3)).prop_map(|(a, b, c, d)| {
        let mut out: BTreeMap<String, Policy> = BTreeMap::new();
        for p in [a, b, c, d] {
            if out.values().all(|q| overlap(&p, q).is_none()) {
                out.insert(p.name.clone(), p);
            }
        }
        out
    })
}

/// The model: every policy matching agent, tenant and use case (by brute
/// force); exactly one grants, with the level's bound on the TTL.
fn model(
    policies: &BTreeMap<String, Policy>,
    ask: &TaskAsk<'_>,
) -> Result<(String, Duration), &'static str> {
    let by_agent: Vec<&Policy> = policies
        .values()
        .filter(|p| p.agents.iter().any(|a| a == ask.agent))
        .collect();
    if by_agent.is_empty() {
        return Err("no_policy");
    }
    let by_tenant: Vec<&Policy> = by_agent
        .into_iter()
        .filter(|p| p.tenants.iter().any(|t| t == ask.tenant))
        .collect();
    if by_tenant.is_empty() {
        return Err("tenant_not_allowed");
    }
    let matching: Vec<&Policy> = by_tenant
        .into_iter()
        .filter(|p| match &p.use_cases {
            None => true,
            Some(u) => u.iter().any(|x| x == ask.use_case),
        })
        .collect();
    assert!(
        matching.len() <= 1,
        "the config lets no two policies match one request"
    );
    let Some(p) = matching.first() else {
        return Err("use_case_not_allowed");
    };
    let Some(level) = p.levels.get(ask.sensitivity) else {
        return Err("unknown_sensitivity");
    };
    match ask.ttl {
        None => Ok((p.name.clone(), p.default_ttl.min(level.max_ttl))),
        Some(t) if t.as_secs() < 2 => Err("ttl_zero"),
        Some(t) if t > level.max_ttl => Err("ttl_too_long"),
        Some(t) => Ok((p.name.clone(), Duration::from_secs(t.as_secs()))),
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn decide_is_the_reference_model(
        policies in arb_policies(),
        agent in proptest::sample::select(AGENTS.to_vec()),
        tenant in proptest::sample::select(TENANTS.to_vec()),
        use_case in proptest::sample::select(USE_CASES.to_vec()),
        sensitivity in proptest::sample::select(vec!["low", "high", "other"]),
        ttl in proptest::option::of(0u64..400_000),
    ) {
        let ask = TaskAsk {
            agent,
            tenant,
            use_case,
            sensitivity,
            ttl: ttl.map(Duration::from_millis),
        };
        let got = decide(&policies, &ask).map(|d| (d.policy.name.clone(), d.ttl)).map_err(|r| r.code());
        prop_assert_eq!(got.clone(), model(&policies, &ask));
        if let Ok((name, ttl)) = got {
            // Never wider than the policy that granted it.
            let p = &policies[&name];
            prop_assert!(p.agents.contains(agent) && p.tenants.contains(tenant));
            prop_assert!(ttl <= p.levels[sensitivity].max_ttl && ttl <= p.max_ttl);
        }
    }
}

#[test]
fn issuers_and_policies_in_a_whole_file() {
    let file = Path::new("/etc/keyturn/keyturn.toml");
    let text = r#"
[daemon]
delivery_roots = ["/run/keyturn/agents"]
task_root = "/run/keyturn/agents/tasks"

[agents.bot]
owner = "o@example.com"
tenant = "acme"
tier = "low"
uid = 1001

[issuers.pg]
type = "postgres"
admin_dsn_file = "pg-admin.dsn"

[issuers.bao]
type = "vault_token"
address = "https://bao.internal:8200"
token_file = "/etc/keyturn/bao-token"

[policies.p]
agents = ["bot"]
tenants = ["acme"]
levels.low.grants.pg = { roles = ["read_a"] }
levels.high.grants.pg = { roles = ["read_a", "read_b"] }
levels.high.grants.bao = { policies = ["invoices-read"] }
"#;
    let cfg = crate::config::load::load_str(file, text).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(cfg.issuers.keys().collect::<Vec<_>>(), ["bao", "pg"]);
    assert_eq!(
        cfg.daemon.task_root.as_deref(),
        Some(Path::new("/run/keyturn/agents/tasks"))
    );
    let p = &cfg.policies["p"];
    assert_eq!(
        p.levels["high"].grants.keys().collect::<Vec<_>>(),
        ["bao", "pg"]
    );

    // Each issuer checks its own grants; a task root outside the delivery
    // roots is refused; a grant of an issuer that failed its own check is
    // not reported twice.
    let bad = text
        .replace(
            "task_root = \"/run/keyturn/agents/tasks\"",
            "task_root = \"/var/tmp/tasks\"",
        )
        .replace("{ policies = [\"invoices-read\"] }", "{ policies = [] }")
        .replace(
            "{ roles = [\"read_a\"] }",
            "{ roles = [\"read_a\"], surprise = 1 }",
        )
        .replace("address = \"https://bao.internal:8200\"\n", "");
    let errs = crate::config::load::load_str(file, &bad).unwrap_err();
    let got: Vec<String> = errs
        .0
        .iter()
        .map(|e| format!("{}: {}", e.toml_path, e.message))
        .collect();
    assert!(
        got.iter().any(|e| e.starts_with(
            "daemon.task_root: task_root /var/tmp/tasks is not inside a delivery root"
        )),
        "{got:#?}"
    );
    assert!(
        got.iter()
            .any(|e| e.starts_with("policies.p.levels.low.grants.pg") && e.contains("surprise")),
        "{got:#?}"
    );
    assert!(got.iter().any(|e| e.starts_with("issuers.bao")), "{got:#?}");
    assert!(
        !got.iter().any(|e| e.contains("unknown issuer")),
        "{got:#?}"
    );
}

/// Defect: `check` accepted an issuer `max_ttl` below a level's TTL, and
/// every task of that level was then refused at start. It is an error at
/// the level's grant of that issuer, saying both TTLs and what to change.
#[test]
fn a_level_whose_tasks_outlive_an_issuers_max_ttl_is_refused() {
    let file = Path::new("/etc/keyturn/keyturn.toml");
    let text = |issuer_max: &str| {
        format!(
            r#"
[agents.bot]
owner = "o@example.com"
tenant = "acme"
tier = "low"
uid = 1001

[issuers.bao]
type = "vault_token"
address = "https://bao.internal:8200"
token_file = "/etc/keyturn/bao-token"
max_ttl = "{issuer_max}"

[policies.p]
agents = ["bot"]
tenants = ["acme"]
default_ttl = "15m"
max_ttl = "30m"
levels.low.max_ttl = "10m"
levels.low.grants.bao = {{ policies = ["invoices-read"] }}
levels.high.grants.bao = {{ policies = ["invoices-read"] }}
"#
        )
    };
    crate::config::load::load_str(file, &text("30m")).unwrap_or_else(|e| panic!("{e}"));
    let errs = crate::config::load::load_str(file, &text("10m")).unwrap_err();
    let got: Vec<String> = errs
        .0
        .iter()
        .map(|e| format!("{}: {}", e.toml_path, e.message))
        .collect();
    // `high` inherits the policy's 30m; `low` (10m) fits.
    assert_eq!(got.len(), 1, "{got:#?}");
    assert!(
        got[0].starts_with(
            "policies.p.levels.high.grants.bao: level `high` allows tasks of up to 30m"
        ) && got[0].contains("its max_ttl is 10m")
            && got[0].contains("lower the level's max_ttl or raise the issuer's"),
        "{got:#?}"
    );
}
