//! `[policies.NAME]`: which tasks an agent may start, for which tenants and
//! use cases, and what each sensitivity level grants at each issuer, for how
//! long at most.
//!
//! ```toml
//! [policies.invoicing]
//! agents = ["invoice-bot"]
//! tenants = ["acme", "globex"]     # the tenants these agents may serve under this policy
//! use_cases = ["month-end"]        # optional: absent = any use case
//! max_ttl = "1h"                   # default 1h
//! default_ttl = "15m"              # default 15m (never above a level's max_ttl)
//!
//! [policies.invoicing.levels.low]
//! max_ttl = "15m"                  # optional, at most the policy's
//! grants.pg = { roles = ["read_invoices"] }
//!
//! [policies.invoicing.levels.high]
//! grants.pg = { roles = ["read_invoices", "read_payments"] }
//! ```
//!
//! A task request names its agent (from its authentication, never from the
//! request), tenant, use case, sensitivity and optionally a TTL. It is
//! granted by exactly one policy: the config refuses two policies that could
//! both match one request ([`check_all`]), so the answer never depends on
//! the order of tables. [`decide`] is pure: the task manager audits its
//! refusals.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::time::Duration;

use crate::config::validate::{Loc, Validator, Zero};
use crate::model::validate_id;

use super::issuers::{Grant, IssuerPlugin};

/// Default longest task of a policy.
pub const DEFAULT_MAX_TTL: Duration = Duration::from_secs(3600);
/// Default TTL of a task that names none.
pub const DEFAULT_TTL: Duration = Duration::from_secs(15 * 60);
/// Longest tenant or use-case name: they travel as STS session tags (256
/// characters at most) and in PostgreSQL role comments.
pub const MAX_LABEL_LEN: usize = 128;

/// `[policies.NAME]` as written.
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPolicy {
    pub agents: Vec<String>,
    pub tenants: Vec<String>,
    pub use_cases: Option<Vec<String>>,
    pub max_ttl: Option<String>,
    pub default_ttl: Option<String>,
    #[serde(default)]
    pub levels: BTreeMap<String, RawLevel>,
}

/// `[policies.NAME.levels.LEVEL]` as written.
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLevel {
    pub max_ttl: Option<String>,
    /// Issuer name → what this level grants there (the issuer's own table).
    #[serde(default)]
    pub grants: BTreeMap<String, serde_json::Value>,
}

/// A checked policy.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    pub name: String,
    pub agents: BTreeSet<String>,
    pub tenants: BTreeSet<String>,
    /// `None`: every use case.
    pub use_cases: Option<BTreeSet<String>>,
    pub max_ttl: Duration,
    pub default_ttl: Duration,
    pub levels: BTreeMap<String, Level>,
}

/// A checked sensitivity level.
#[derive(Debug, Clone, PartialEq)]
pub struct Level {
    pub max_ttl: Duration,
    /// Issuer name → grant.
    pub grants: BTreeMap<String, Grant>,
}

impl Policy {
    fn covers_use_case(&self, use_case: &str) -> bool {
        self.use_cases.as_ref().is_none_or(|u| u.contains(use_case))
    }
}

/// What the policies' checks know of the configured issuers.
pub struct IssuerScope<'a, 'i> {
    /// The issuer of a name, when its own check passed.
    pub lookup: &'a dyn Fn(&str) -> Option<&'i dyn IssuerPlugin>,
    /// Every `[issuers.NAME]` name, for messages.
    pub names: &'a [&'a str],
    /// Whether a name is an issuer whose own check failed (its errors are
    /// reported; its grants are not reported again as unknown).
    pub invalid: &'a dyn Fn(&str) -> bool,
}

/// Checks every `[policies.NAME]`: agents that exist, tenants and use cases
/// that are labels, TTLs that fit, levels whose grants each issuer accepts,
/// and no two policies that could match one request. Returns the policies
/// that are valid (the caller keeps a config only when nothing was reported).
pub fn check_all(
    raw: &BTreeMap<String, Option<&RawPolicy>>,
    agents: &BTreeSet<&str>,
    issuers: &IssuerScope<'_, '_>,
    v: &mut Validator<'_>,
) -> BTreeMap<String, Policy> {
    let top = Loc::top("policies");
    let mut out: BTreeMap<String, Policy> = BTreeMap::new();
    for (name, p) in raw {
        let at = top.key(name);
        if let Err(e) = validate_id(name) {
            v.err_key(at, format!("invalid policy name `{name}`: {e}"));
        }
        let Some(p) = p else { continue };
        if let Some(policy) = check_one(name, p, agents, issuers, v, at) {
            // Overlap with every policy already accepted.
            if let Some((other, why)) = out
                .values()
                .find_map(|q| overlap(&policy, q).map(|w| (q, w)))
            {
                v.err_key(
                    at,
                    format!(
                        "policy `{name}` overlaps policy `{}` ({why}): a task request must match one policy; \
                         split the agents, tenants or use cases between them",
                        other.name
                    ),
                );
                continue;
            }
            out.insert(name.clone(), policy);
        }
    }
    out
}

/// Why two policies could both match one request, if they could.
fn overlap(a: &Policy, b: &Policy) -> Option<String> {
    let agent = a.agents.intersection(&b.agents).next()?;
    let tenant = a.tenants.intersection(&b.tenants).next()?;
    let use_case = match (&a.use_cases, &b.use_cases) {
        (None, None) => "every use case".to_owned(),
        (Some(u), None) | (None, Some(u)) => format!("use case `{}`", u.iter().next()?),
        (Some(x), Some(y)) => format!("use case `{}`", x.intersection(y).next()?),
    };
    Some(format!("agent `{agent}`, tenant `{tenant}`, {use_case}"))
}

fn check_one(
    name: &str,
    p: &RawPolicy,
    agents: &BTreeSet<&str>,
    issuers: &IssuerScope<'_, '_>,
    v: &mut Validator<'_>,
    at: Loc<'_>,
) -> Option<Policy> {
    let before = v.issue_count();
    if p.agents.is_empty() {
        v.err(at.key("agents"), "list at least one agent");
    }
    for (i, a) in p.agents.iter().enumerate() {
        if !agents.contains(a.as_str()) {
            v.err(
                at.key("agents").index(i),
                format!("unknown agent `{a}`: no [agents.{a}] table"),
            );
        }
    }
    let tenants = labels(v, at.key("tenants"), "tenant", &p.tenants);
    let use_cases = p
        .use_cases
        .as_ref()
        .map(|u| labels(v, at.key("use_cases"), "use case", u));
    let max_ttl = v.duration_or(
        at.key("max_ttl"),
        p.max_ttl.as_ref(),
        DEFAULT_MAX_TTL,
        Zero::Rejected,
    );
    let default_ttl = bounded_ttl(
        v,
        at.key("default_ttl"),
        p.default_ttl.as_ref(),
        (DEFAULT_TTL.min(max_ttl), DEFAULT_TTL),
        max_ttl,
        |ttl, max| format!("default_ttl ({ttl}) is longer than max_ttl ({max})"),
    );
    if p.levels.is_empty() {
        v.err_key(
            at,
            format!("policy `{name}` has no sensitivity level: add [policies.{name}.levels.NAME] with its grants"),
        );
    }
    let levels_at = at.key("levels");
    let mut levels = BTreeMap::new();
    for (level_name, l) in &p.levels {
        let lat = levels_at.key(level_name);
        if let Err(e) = validate_id(level_name) {
            v.err_key(
                lat,
                format!("invalid sensitivity level name `{level_name}`: {e}"),
            );
        }
        let level_max = bounded_ttl(
            v,
            lat.key("max_ttl"),
            l.max_ttl.as_ref(),
            (max_ttl, max_ttl),
            max_ttl,
            |ttl, max| format!("a level's max_ttl ({ttl}) may not exceed its policy's ({max})"),
        );
        if l.grants.is_empty() {
            v.err_key(
                lat,
                format!("level `{level_name}` grants nothing: add grants.ISSUER = {{ ... }}"),
            );
        }
        let gat = lat.key("grants");
        let mut grants = BTreeMap::new();
        for (issuer_name, g) in &l.grants {
            let at = gat.key(issuer_name);
            let grant = Grant(g.clone());
            match (issuers.lookup)(issuer_name) {
                Some(plugin) => {
                    plugin.check_grant(&grant, v, at);
                    if let Some(why) = plugin.refuses_ttl(level_max) {
                        v.err_key(
                            at,
                            format!(
                                "level `{level_name}` allows tasks of up to {} (its max_ttl, or the policy's), \
                                 but issuer `{issuer_name}` refuses them: {why}; lower the level's max_ttl \
                                 or raise the issuer's",
                                humantime::format_duration(level_max)
                            ),
                        );
                    }
                }
                // Its own errors are reported; the grant cannot be checked.
                None if (issuers.invalid)(issuer_name) => {}
                None => v.err_key(
                    at,
                    format!(
                        "unknown issuer `{issuer_name}`; {}",
                        if issuers.names.is_empty() {
                            "no [issuers.NAME] table is configured".to_owned()
                        } else {
                            format!("configured: {}", issuers.names.join(", "))
                        }
                    ),
                ),
            }
            grants.insert(issuer_name.clone(), grant);
        }
        levels.insert(
            level_name.clone(),
            Level {
                max_ttl: level_max,
                grants,
            },
        );
    }
    (v.issue_count() == before).then(|| Policy {
        name: name.to_owned(),
        agents: p.agents.iter().cloned().collect(),
        tenants,
        use_cases,
        max_ttl,
        default_ttl,
        levels,
    })
}

/// The TTL `text` at `at`: `(unset, invalid)` when it is not set or does not
/// read; reported with `longer(ttl, max)` when it is longer than `max_ttl`.
fn bounded_ttl(
    v: &mut Validator<'_>,
    at: Loc<'_>,
    text: Option<&String>,
    (unset, invalid): (Duration, Duration),
    max_ttl: Duration,
    longer: impl FnOnce(humantime::FormattedDuration, humantime::FormattedDuration) -> String,
) -> Duration {
    let ttl = match text {
        Some(_) => v.duration_or(at, text, invalid, Zero::Rejected),
        None => unset,
    };
    if ttl > max_ttl {
        v.err(
            at,
            longer(
                humantime::format_duration(ttl),
                humantime::format_duration(max_ttl),
            ),
        );
    }
    ttl
}

/// A list of tenant or use-case names: non-empty, each a printable label.
fn labels(v: &mut Validator<'_>, at: Loc<'_>, what: &str, list: &[String]) -> BTreeSet<String> {
    if list.is_empty() {
        v.err(at, format!("list at least one {what}"));
    }
    let mut out = BTreeSet::new();
    for (i, s) in list.iter().enumerate() {
        if let Err(e) = label(s) {
            v.err(
                at.index(i),
                format!("invalid {what} `{}`: {e}", s.escape_debug()),
            );
        } else {
            out.insert(s.clone());
        }
    }
    out
}

/// A tenant, use case, run id or initiator: 1 to [`MAX_LABEL_LEN`]
/// characters, no control characters, no leading or trailing space.
pub fn label(s: &str) -> Result<(), String> {
    if s.is_empty() {
        return Err("it is empty".into());
    }
    if s.chars().count() > MAX_LABEL_LEN {
        return Err(format!("it is longer than {MAX_LABEL_LEN} characters"));
    }
    if s.chars().any(char::is_control) {
        return Err("it contains a control character".into());
    }
    if s.trim() != s {
        return Err("it starts or ends with white space".into());
    }
    Ok(())
}

/// What a task asks for. `agent` comes from how the caller authenticated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskAsk<'a> {
    pub agent: &'a str,
    pub tenant: &'a str,
    pub use_case: &'a str,
    pub sensitivity: &'a str,
    pub ttl: Option<Duration>,
}

/// What the policy grants a task.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision<'p> {
    pub policy: &'p Policy,
    pub level: &'p Level,
    pub ttl: Duration,
}

/// The shortest TTL a task may ask for (black-box finding: `--ttl 1s`
/// passed the policy, then ran out before the `vault_token` issuer could
/// mint a token of whole seconds that ends with the task).
pub const MIN_TTL: Duration = Duration::from_secs(2);

/// Why a task is refused; its `Display` says what was wrong and what to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    NoPolicy {
        agent: String,
    },
    Tenant {
        agent: String,
        tenant: String,
        allowed: Vec<String>,
    },
    UseCase {
        agent: String,
        tenant: String,
        use_case: String,
        allowed: Vec<String>,
    },
    Sensitivity {
        policy: String,
        sensitivity: String,
        levels: Vec<String>,
    },
    Ttl {
        policy: String,
        sensitivity: String,
        asked: Duration,
        max: Duration,
    },
    ZeroTtl,
}

impl Refusal {
    /// A short machine-readable reason for the audit record and the API.
    pub fn code(&self) -> &'static str {
        match self {
            Refusal::NoPolicy { .. } => "no_policy",
            Refusal::Tenant { .. } => "tenant_not_allowed",
            Refusal::UseCase { .. } => "use_case_not_allowed",
            Refusal::Sensitivity { .. } => "unknown_sensitivity",
            Refusal::Ttl { .. } => "ttl_too_long",
            Refusal::ZeroTtl => "ttl_zero",
        }
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let d = |d: &Duration| humantime::format_duration(*d).to_string();
        match self {
            Refusal::NoPolicy { agent } => write!(
                f,
                "agent `{agent}` may not start tasks: no [policies.NAME] lists it in `agents`"
            ),
            Refusal::Tenant {
                agent,
                tenant,
                allowed,
            } => write!(
                f,
                "agent `{agent}` may not serve tenant `{tenant}`; its policies allow: {}",
                allowed.join(", ")
            ),
            Refusal::UseCase {
                agent,
                tenant,
                use_case,
                allowed,
            } => write!(
                f,
                "agent `{agent}` may not run use case `{use_case}` for tenant `{tenant}`; allowed: {}",
                allowed.join(", ")
            ),
            Refusal::Sensitivity {
                policy,
                sensitivity,
                levels,
            } => write!(
                f,
                "policy `{policy}` has no sensitivity level `{sensitivity}`; it has: {}",
                levels.join(", ")
            ),
            Refusal::Ttl {
                policy,
                sensitivity,
                asked,
                max,
            } => {
                // Whole seconds (as a TTL is granted); an absurd one is not
                // spelled out in years, weeks, days, ... to the nanosecond.
                const ABSURD: Duration = Duration::from_secs(100 * 365 * 86_400);
                let asked = if *asked > ABSURD {
                    "over 100 years".to_owned()
                } else {
                    d(&Duration::from_secs(asked.as_secs()))
                };
                write!(
                    f,
                    "a TTL of {asked} is longer than policy `{policy}` allows at sensitivity `{sensitivity}` ({}); ask for {} or less",
                    d(max),
                    d(max)
                )
            }
            Refusal::ZeroTtl => write!(
                f,
                "a TTL must be at least {} seconds: a shorter one runs out while its credentials are issued",
                MIN_TTL.as_secs()
            ),
        }
    }
}

/// The one policy that grants `ask`, its level and the task's TTL, or why
/// not. Pure.
pub fn decide<'p>(
    policies: &'p BTreeMap<String, Policy>,
    ask: &TaskAsk<'_>,
) -> Result<Decision<'p>, Refusal> {
    let mine: Vec<&Policy> = policies
        .values()
        .filter(|p| p.agents.contains(ask.agent))
        .collect();
    if mine.is_empty() {
        return Err(Refusal::NoPolicy {
            agent: ask.agent.to_owned(),
        });
    }
    let for_tenant: Vec<&Policy> = mine
        .iter()
        .copied()
        .filter(|p| p.tenants.contains(ask.tenant))
        .collect();
    if for_tenant.is_empty() {
        let allowed: BTreeSet<&String> = mine.iter().flat_map(|p| &p.tenants).collect();
        return Err(Refusal::Tenant {
            agent: ask.agent.to_owned(),
            tenant: ask.tenant.to_owned(),
            allowed: allowed.into_iter().cloned().collect(),
        });
    }
    // At most one: the config refuses overlapping policies.
    let Some(policy) = for_tenant
        .iter()
        .copied()
        .find(|p| p.covers_use_case(ask.use_case))
    else {
        let allowed: BTreeSet<&String> = for_tenant
            .iter()
            .flat_map(|p| p.use_cases.iter().flatten())
            .collect();
        return Err(Refusal::UseCase {
            agent: ask.agent.to_owned(),
            tenant: ask.tenant.to_owned(),
            use_case: ask.use_case.to_owned(),
            allowed: allowed.into_iter().cloned().collect(),
        });
    };
    let Some(level) = policy.levels.get(ask.sensitivity) else {
        return Err(Refusal::Sensitivity {
            policy: policy.name.clone(),
            sensitivity: ask.sensitivity.to_owned(),
            levels: policy.levels.keys().cloned().collect(),
        });
    };
    let ttl = match ask.ttl {
        Some(t) if t < MIN_TTL => return Err(Refusal::ZeroTtl),
        Some(t) if t > level.max_ttl => {
            return Err(Refusal::Ttl {
                policy: policy.name.clone(),
                sensitivity: ask.sensitivity.to_owned(),
                asked: t,
                max: level.max_ttl,
            });
        }
        // Whole seconds: every issuer's system counts in seconds.
        Some(t) => Duration::from_secs(t.as_secs()),
        None => policy.default_ttl.min(level.max_ttl),
    };
    Ok(Decision { policy, level, ttl })
}

#[cfg(test)]
mod tests;
