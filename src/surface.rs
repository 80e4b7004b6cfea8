//! `keyturn surface`: the program's whole identity surface, so that unused
//! identities get decommissioned. Every agent with its owner, tenant, tier
//! and lifecycle state, its credentials with their age, lifetime, last
//! rotation, last acknowledgement, vaults and target; totals; and flags for
//! what an operator should look at.
//!
//! Definitions (stable: dashboards and the metrics use them):
//! - **identities**: agents not fully decommissioned (active,
//!   decommissioning, orphaned);
//! - **live versions**: versions that still work — each rotated
//!   credential's current version, plus its previous one while its grace
//!   period runs; none once the agent is decommissioned;
//! - **credential-seconds outstanding**: for each live version, the time
//!   it stays valid from now (the current one until its next rotation plus
//!   grace, the previous one until its grace ends): the exposure if every
//!   live value leaked this instant;
//! - **lifetime**: how long one version of the credential lives (its
//!   rotation period plus grace);
//! - **last use**: the last acknowledgement by a consumer of the
//!   credential (a file opened with `ack = "open"`, `keyturn ack`, a
//!   webhook's 2xx). keyturn observes use only where a consumer
//!   acknowledges; an agent none of whose consumers do is reported with
//!   `usage_observed = false` and is never flagged unused.
//! - **task credentials**: what issuers minted for an agent's tasks not
//!   ended (`crate::tasks`) that may still work: not verified revoked and
//!   not past the expiry their system enforces. Each is listed under its
//!   agent with its issuer, the object at the system (a role, a token
//!   accessor, an STS session) and when it expires; they count in the
//!   totals (`task_credentials`, `task_credential_seconds_outstanding`)
//!   apart from the standing credentials, whose definitions above they do
//!   not change.

use std::collections::{BTreeMap, HashMap};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::api::protocol::AgentLifecycle;
use crate::model::CredentialKey;
use crate::rotation::{CredEntry, SurfaceFacts};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Surface {
    pub generated_at: DateTime<Utc>,
    /// An agent with no use observed for this long is flagged unused.
    pub unused_after_seconds: u64,
    pub totals: Totals,
    pub flags: Flags,
    pub agents: Vec<SurfaceAgent>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Totals {
    pub identities: usize,
    /// Agents by state: active, decommissioning, decommissioned, orphaned.
    pub agents: BTreeMap<String, usize>,
    pub credentials: usize,
    pub live_versions: usize,
    pub credential_seconds_outstanding: u64,
    /// Tasks not ended, of every agent.
    #[serde(default)]
    pub tasks: usize,
    /// Their credentials that may still work.
    #[serde(default)]
    pub task_credentials: usize,
    /// Sum over those of the time each stays valid from now.
    #[serde(default)]
    pub task_credential_seconds_outstanding: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Flags {
    /// Agents with no use observed within `unused_after_seconds`.
    pub unused: Vec<String>,
    /// `agent/credential` whose current version is older than its `max_age`.
    pub past_max_age: Vec<String>,
    pub without_owner: Vec<String>,
    pub decommissions_in_progress: Vec<String>,
    pub orphaned: Vec<String>,
    /// `agent/credential` no longer in the config (removed, or its agent
    /// orphaned) whose current version still works: nothing rotates it
    /// until the agent is decommissioned.
    #[serde(default)]
    pub unconfigured: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SurfaceAgent {
    pub agent: String,
    pub owner: String,
    pub tenant: String,
    pub tier: String,
    /// active, decommissioning, decommissioned, orphaned.
    pub state: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_used: Option<DateTime<Utc>>,
    pub usage_observed: bool,
    pub credentials: Vec<SurfaceCredential>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decommission: Option<AgentLifecycle>,
    /// Its tasks not ended, soonest to expire first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tasks: Vec<SurfaceTask>,
}

/// A task not ended, and its credentials that may still work.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SurfaceTask {
    pub task: String,
    pub tenant: String,
    pub use_case: String,
    pub sensitivity: String,
    /// `live`, or `ending` (its credentials are being revoked).
    pub state: String,
    /// The task's TTL.
    pub expires_at: DateTime<Utc>,
    pub credentials: Vec<SurfaceTaskCredential>,
}

/// One issuer's credential of a task.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SurfaceTaskCredential {
    pub issuer: String,
    /// What it is at the system: `role kt_task_…`, `token accessor …`,
    /// `STS session keyturn-… of arn:…`. Never secret.
    pub object: String,
    /// When the system ends it by itself (the task's TTL when not known).
    pub expires_at: DateTime<Utc>,
    /// `issuing`, `issued`, `revoked` (not verified yet) or `expiring`.
    pub state: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SurfaceCredential {
    pub credential: String,
    /// `rotate`, `follow`, or `unconfigured` (no longer in the config:
    /// never rotated again, its current version live until the agent is
    /// decommissioned, with no end to count outstanding seconds to), or
    /// `revoking` (the same, of an agent being decommissioned).
    pub mode: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub age_seconds: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lifetime_seconds: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_rotated: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_due: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_ack: Option<DateTime<Utc>>,
    /// Consumers that acknowledge deliveries (so use can be observed).
    pub acking_consumers: usize,
    pub vaults: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    pub live_versions: usize,
    pub outstanding_seconds: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_age_seconds: Option<u64>,
    pub past_max_age: bool,
}

/// The last acknowledgement of each credential and how many consumers
/// acknowledge it (from the state's ack rows).
pub type Acks = HashMap<CredentialKey, (Option<DateTime<Utc>>, usize)>;

/// [`Acks`] from the consumers of each credential's last delivery
/// (`Snapshot::acks`: they count the acknowledging consumers) and each
/// consumer's last acknowledgement of any version (`StateStore::last_acks`:
/// a rotation does not make an agent that acked the version before it
/// look unused).
pub fn acks(awaited: Vec<crate::state::AckRow>, last: Vec<crate::state::AckRow>) -> Acks {
    let mut acks = Acks::new();
    for r in awaited {
        let a = acks.entry(r.key).or_default();
        a.0 = a.0.max(r.acked_at);
        a.1 += 1;
    }
    for r in last {
        let a = acks.entry(r.key).or_default();
        a.0 = a.0.max(r.acked_at);
    }
    acks
}

fn secs(d: chrono::Duration) -> u64 {
    u64::try_from(d.num_seconds()).unwrap_or(0)
}

/// One credential of the surface, and its live versions.
fn credential(
    entry: &CredEntry,
    f: &SurfaceFacts,
    acks: &Acks,
    revoked: bool,
    now: DateTime<Utc>,
) -> SurfaceCredential {
    let grace = chrono::Duration::from_std(entry.policy.grace).unwrap_or_default();
    let follow = entry.policy.follow.is_some();
    let lifetime = match (f.last_rotated, f.next_due) {
        (Some(l), Some(n)) if !follow => Some(secs(n - l + grace)),
        _ => None,
    };
    let (live, outstanding) = if revoked {
        (0, 0)
    } else {
        f.live(entry.policy.grace, follow, now)
    };
    let max_age = max_age_of(entry);
    let age = f.last_rotated.map(|l| secs(now - l));
    let (last_ack, acking) = acks.get(entry.key()).copied().unwrap_or((None, 0));
    SurfaceCredential {
        credential: entry.key().credential.to_string(),
        mode: if follow { "follow" } else { "rotate" }.into(),
        version: f.current_version,
        age_seconds: age,
        lifetime_seconds: lifetime,
        last_rotated: f.last_rotated,
        next_due: f.next_due.filter(|_| !follow),
        last_ack,
        acking_consumers: acking,
        vaults: entry.vaults.iter().map(|h| h.config.name.clone()).collect(),
        target: entry.target.as_ref().map(|t| t.describe()),
        live_versions: live,
        outstanding_seconds: outstanding,
        max_age_seconds: max_age.map(|d| d.as_secs()),
        past_max_age: !revoked && matches!((age, max_age), (Some(a), Some(m)) if a > m.as_secs()),
    }
}

/// The credential's `max_age`, where the config has one.
fn max_age_of(entry: &CredEntry) -> Option<std::time::Duration> {
    entry.policy.max_age
}

/// Builds the surface.
pub fn build<'a>(
    facts: &[(std::sync::Arc<CredEntry>, SurfaceFacts)],
    configured: impl IntoIterator<Item = &'a crate::config::AgentConfig>,
    lifecycle: &[AgentLifecycle],
    acks: &Acks,
    unused_after: std::time::Duration,
    now: DateTime<Utc>,
) -> Surface {
    let by_agent: HashMap<&str, &AgentLifecycle> =
        lifecycle.iter().map(|l| (l.agent.as_str(), l)).collect();
    let mut agents: BTreeMap<String, SurfaceAgent> = BTreeMap::new();
    for (entry, f) in facts {
        let name = entry.key().agent.to_string();
        let decom = by_agent.get(name.as_str()).copied();
        let state = decom.map_or("active", |d| d.state.as_str());
        let revoked = state == "decommissioned";
        let a = agents.entry(name.clone()).or_insert_with(|| SurfaceAgent {
            agent: name.clone(),
            owner: entry.agent.owner.clone(),
            tenant: entry.agent.tenant.clone(),
            tier: entry.agent.tier.clone(),
            state: state.into(),
            last_used: None,
            usage_observed: false,
            credentials: Vec::new(),
            decommission: decom.cloned(),
            tasks: Vec::new(),
        });
        let c = credential(entry, f, acks, revoked, now);
        a.usage_observed |= c.acking_consumers > 0;
        a.last_used = a.last_used.max(c.last_ack);
        a.credentials.push(c);
    }
    // Configured agents with no credential (one that only runs tasks, say):
    // identities too, as `/metrics` counts them.
    for a in configured {
        let name = a.id.to_string();
        if agents.contains_key(&name) {
            continue;
        }
        let decom = by_agent.get(name.as_str()).copied();
        agents.insert(
            name.clone(),
            SurfaceAgent {
                agent: name,
                owner: a.owner.clone(),
                tenant: a.tenant.clone(),
                tier: a.tier.clone(),
                state: decom.map_or("active", |d| d.state.as_str()).into(),
                last_used: None,
                usage_observed: false,
                credentials: Vec::new(),
                decommission: decom.cloned(),
                tasks: Vec::new(),
            },
        );
    }
    // Decommissions of agents gone from the config, and orphans.
    for l in lifecycle {
        agents
            .entry(l.agent.to_string())
            .or_insert_with(|| SurfaceAgent {
                agent: l.agent.to_string(),
                owner: l.owner.clone(),
                tenant: l.tenant.clone(),
                tier: l.tier.clone(),
                state: l.state.clone(),
                last_used: None,
                usage_observed: false,
                credentials: Vec::new(),
                decommission: Some(l.clone()),
                tasks: Vec::new(),
            });
    }
    // Any length a client asks for: one reaching before chrono's earliest
    // instant flags nothing (black-box finding: it panicked the handler).
    let unused_cut = chrono::Duration::from_std(unused_after)
        .ok()
        .and_then(|d| now.checked_sub_signed(d))
        .unwrap_or(DateTime::<Utc>::MIN_UTC);
    let mut totals = Totals::default();
    let mut flags = Flags::default();
    for a in agents.values() {
        *totals.agents.entry(a.state.clone()).or_default() += 1;
        if a.state != "decommissioned" {
            totals.identities += 1;
        }
        totals.credentials += a.credentials.len();
        for c in &a.credentials {
            totals.live_versions += c.live_versions;
            totals.credential_seconds_outstanding += c.outstanding_seconds;
            if c.past_max_age {
                flags
                    .past_max_age
                    .push(format!("{}/{}", a.agent, c.credential));
            }
        }
        if a.owner.trim().is_empty() {
            flags.without_owner.push(a.agent.clone());
        }
        match a.state.as_str() {
            "decommissioning" => flags.decommissions_in_progress.push(a.agent.clone()),
            "orphaned" => flags.orphaned.push(a.agent.clone()),
            "active" if a.usage_observed && a.last_used.is_none_or(|t| t < unused_cut) => {
                flags.unused.push(a.agent.clone())
            }
            _ => {}
        }
    }
    for state in ["active", "decommissioning", "decommissioned", "orphaned"] {
        totals.agents.entry(state.into()).or_default();
    }
    Surface {
        generated_at: now,
        unused_after_seconds: unused_after.as_secs(),
        totals,
        flags,
        agents: agents.into_values().collect(),
    }
}

/// Adds the credentials the config no longer names whose current version
/// still works (`Engine::unconfigured_live`): an orphaned agent's, and one
/// removed from an agent still configured. Their current version stays
/// where it is until the agent is decommissioned, so it counts as live; it
/// has no due time, so it adds no outstanding seconds, and it is flagged.
pub fn add_unconfigured(
    s: &mut Surface,
    rows: Vec<(CredentialKey, crate::rotation::Unconfigured)>,
    acks: &Acks,
) {
    let now = s.generated_at;
    for (key, u) in rows {
        let Ok(i) = s
            .agents
            .binary_search_by(|a| a.agent.as_str().cmp(key.agent.as_str()))
        else {
            continue;
        };
        let a = &mut s.agents[i];
        if a.state == "decommissioned" {
            continue;
        }
        // Being revoked: still live until its decommission verifies it
        // (black-box finding: it was left out, and the totals under-counted
        // exactly while the revocation failed), but not flagged: "decommission
        // their agent" would be wrong advice.
        let leaving = a.state == "decommissioning";
        let (last_ack, acking) = acks.get(&key).copied().unwrap_or((None, 0));
        a.usage_observed |= acking > 0;
        a.last_used = a.last_used.max(last_ack);
        a.credentials.push(SurfaceCredential {
            credential: key.credential.to_string(),
            mode: if leaving { "revoking" } else { "unconfigured" }.into(),
            version: Some(u.version),
            age_seconds: u.made.map(|l| secs(now - l)),
            lifetime_seconds: None,
            last_rotated: u.made,
            next_due: None,
            last_ack,
            acking_consumers: acking,
            vaults: Vec::new(),
            target: None,
            live_versions: 1,
            outstanding_seconds: 0,
            max_age_seconds: None,
            past_max_age: false,
        });
        a.credentials
            .sort_by(|x, y| x.credential.cmp(&y.credential));
        s.totals.credentials += 1;
        s.totals.live_versions += 1;
        if !leaving {
            s.flags.unconfigured.push(key.to_string());
        }
    }
    s.flags.unconfigured.sort();
}

/// Who an agent is, for one that has tasks but no standing credential.
#[derive(Debug, Clone, Default)]
pub struct AgentInfo {
    pub owner: String,
    pub tenant: String,
    pub tier: String,
}

/// Adds each agent's tasks not ended to `s` (`tasks`: agent, task), and
/// counts their credentials in the totals. An agent with tasks and no
/// standing credential joins the surface as `active` (`info` says who it
/// is), so that an identity holding only task credentials is not missed.
pub fn add_tasks(
    s: &mut Surface,
    tasks: Vec<(String, SurfaceTask)>,
    info: &dyn Fn(&str) -> AgentInfo,
) {
    let now = s.generated_at;
    for (agent, task) in tasks {
        let i = match s.agents.binary_search_by(|a| a.agent.as_str().cmp(&agent)) {
            Ok(i) => i,
            Err(i) => {
                let who = info(&agent);
                s.agents.insert(
                    i,
                    SurfaceAgent {
                        agent: agent.clone(),
                        owner: who.owner,
                        tenant: who.tenant,
                        tier: who.tier,
                        state: "active".into(),
                        last_used: None,
                        usage_observed: false,
                        credentials: Vec::new(),
                        decommission: None,
                        tasks: Vec::new(),
                    },
                );
                *s.totals.agents.entry("active".into()).or_default() += 1;
                s.totals.identities += 1;
                if s.agents[i].owner.trim().is_empty() {
                    s.flags.without_owner.push(agent.clone());
                    s.flags.without_owner.sort();
                }
                i
            }
        };
        s.totals.tasks += 1;
        for c in &task.credentials {
            s.totals.task_credentials += 1;
            s.totals.task_credential_seconds_outstanding += secs(c.expires_at - now);
        }
        let a = &mut s.agents[i];
        a.tasks.push(task);
        a.tasks
            .sort_by(|x, y| (x.expires_at, &x.task).cmp(&(y.expires_at, &y.task)));
    }
}

/// `keyturn surface` as a table.
pub fn render(s: &Surface) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let t = &s.totals;
    let _ = writeln!(
        out,
        "identities {}  (active {}, decommissioning {}, orphaned {})  decommissioned {}",
        t.identities,
        t.agents.get("active").copied().unwrap_or(0),
        t.agents.get("decommissioning").copied().unwrap_or(0),
        t.agents.get("orphaned").copied().unwrap_or(0),
        t.agents.get("decommissioned").copied().unwrap_or(0),
    );
    let _ = writeln!(
        out,
        "credentials {}  live versions {}  credential-hours outstanding {:.1}",
        t.credentials,
        t.live_versions,
        t.credential_seconds_outstanding as f64 / 3600.0
    );
    if t.tasks > 0 {
        let _ = writeln!(
            out,
            "tasks {}  task credentials {}  task credential-hours outstanding {:.1}",
            t.tasks,
            t.task_credentials,
            t.task_credential_seconds_outstanding as f64 / 3600.0
        );
    }
    let hours =
        |x: Option<u64>| x.map_or_else(|| "-".to_owned(), |s| format!("{:.1}h", s as f64 / 3600.0));
    for a in &s.agents {
        let used = match (a.usage_observed, a.last_used) {
            (false, _) => "not observed".to_owned(),
            (true, None) => "never".to_owned(),
            (true, Some(t)) => t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        };
        let _ = writeln!(
            out,
            "\n{}  [{}]  owner {}  tenant {}  tier {}  last used {used}",
            a.agent,
            a.state,
            if a.owner.is_empty() { "-" } else { &a.owner },
            if a.tenant.is_empty() { "-" } else { &a.tenant },
            if a.tier.is_empty() { "-" } else { &a.tier },
        );
        for c in &a.credentials {
            let _ = writeln!(
                out,
                "  {:<20} v{:<4} age {:<8} lifetime {:<8} live {}  {}{}{}",
                c.credential,
                c.version.map_or_else(|| "-".into(), |v| v.to_string()),
                hours(c.age_seconds),
                hours(c.lifetime_seconds),
                c.live_versions,
                c.vaults.join("+"),
                c.target
                    .as_deref()
                    .map(|t| format!(" -> {t}"))
                    .unwrap_or_default(),
                if c.past_max_age {
                    "  PAST MAX_AGE"
                } else if c.mode == "unconfigured" {
                    "  NOT IN THE CONFIG: never rotated, live until decommissioned"
                } else if c.mode == "revoking" {
                    "  NOT IN THE CONFIG: live until its agent's decommission revokes it"
                } else {
                    ""
                },
            );
        }
        for task in &a.tasks {
            let _ = writeln!(
                out,
                "  task {}  tenant {}  use case {}  sensitivity {}  [{}]",
                task.task, task.tenant, task.use_case, task.sensitivity, task.state
            );
            for c in &task.credentials {
                let _ = writeln!(
                    out,
                    "    {:<20} {}  expires {}",
                    c.issuer,
                    c.object,
                    c.expires_at
                        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                );
            }
        }
    }
    let f = &s.flags;
    let mut flag = |what: &str, list: &[String]| {
        if !list.is_empty() {
            let _ = writeln!(out, "\nflag: {what}: {}", list.join(", "));
        }
    };
    flag(
        &format!(
            "unused (no use observed for {})",
            humantime::format_duration(std::time::Duration::from_secs(s.unused_after_seconds))
        ),
        &f.unused,
    );
    flag("past max_age", &f.past_max_age);
    flag("without an owner", &f.without_owner);
    flag("decommission in progress", &f.decommissions_in_progress);
    flag(
        "orphaned (left the config, not decommissioned)",
        &f.orphaned,
    );
    flag(
        "credentials left the config, still live (decommission their agent to revoke them)",
        &f.unconfigured,
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task(id: &str, minutes: i64, now: DateTime<Utc>) -> SurfaceTask {
        SurfaceTask {
            task: id.into(),
            tenant: "acme".into(),
            use_case: "month-end".into(),
            sensitivity: "low".into(),
            state: "live".into(),
            expires_at: now + chrono::Duration::minutes(minutes),
            credentials: vec![SurfaceTaskCredential {
                issuer: "bao".into(),
                object: format!("token accessor acc-{id}"),
                expires_at: now + chrono::Duration::minutes(minutes),
                state: "issued".into(),
            }],
        }
    }

    /// Black-box finding: a credential removed from the config of an agent
    /// being decommissioned was shown "NOT IN THE CONFIG: never rotated,
    /// live until decommissioned" and flagged "decommission their agent".
    /// An orphan's still is.
    #[test]
    fn a_decommissioning_agents_unconfigured_credentials_are_left_to_its_decommission() {
        let now = crate::test_support::at_secs(0);
        let lifecycle = |agent: &str, state: &str| -> AgentLifecycle {
            serde_json::from_value(serde_json::json!({ "agent": agent, "state": state })).unwrap()
        };
        let mut s = build(
            &[],
            [],
            &[
                lifecycle("leaving", "decommissioning"),
                lifecycle("lost", "orphaned"),
            ],
            &Acks::new(),
            std::time::Duration::from_secs(60),
            now,
        );
        let u = || crate::rotation::Unconfigured {
            version: 3,
            made: Some(now),
        };
        add_unconfigured(
            &mut s,
            vec![
                (crate::test_support::key("leaving", "db"), u()),
                (crate::test_support::key("lost", "db"), u()),
            ],
            &Acks::new(),
        );
        assert_eq!(s.flags.unconfigured, vec!["lost/db".to_owned()]);
        let text = render(&s);
        assert_eq!(
            text.matches("never rotated, live until decommissioned")
                .count(),
            1,
            "{text}"
        );
        // Still live until revoked (black-box finding: it was not counted).
        assert_eq!(s.totals.live_versions, 2);
        let leaving = s.agents.iter().find(|a| a.agent == "leaving").unwrap();
        assert_eq!(leaving.credentials[0].mode, "revoking");
        assert!(
            text.contains("live until its agent's decommission revokes it"),
            "{text}"
        );
    }

    /// Black-box finding: `surface --unused-after 99999999999d` panicked
    /// the daemon's handler (`DateTime - TimeDelta overflowed`).
    #[test]
    fn any_unused_after_a_client_sends_is_taken() {
        let now = crate::test_support::at_secs(0);
        for secs in [
            0,
            9_223_372_036,
            8_639_999_999_999,
            1_000_000_000_000_000,
            u64::MAX,
        ] {
            let s = build(
                &[],
                [],
                &[],
                &Acks::new(),
                std::time::Duration::from_secs(secs),
                now,
            );
            assert!(s.flags.unused.is_empty(), "{secs}");
            assert!(render(&s).starts_with("identities 0"), "{secs}");
        }
    }

    #[test]
    fn task_credentials_count_in_their_agents_surface() {
        let now = crate::test_support::at_secs(0);
        let mut s = build(
            &[],
            [],
            &[],
            &Acks::new(),
            std::time::Duration::from_secs(60),
            now,
        );
        assert_eq!(s.totals.identities, 0);
        add_tasks(
            &mut s,
            vec![
                ("bot".into(), task("t2", 30, now)),
                ("bot".into(), task("t1", 10, now)),
            ],
            &|agent| AgentInfo {
                owner: format!("owner-of-{agent}"),
                tenant: "acme".into(),
                tier: "high".into(),
            },
        );
        // An agent holding only task credentials is an identity too.
        assert_eq!(s.totals.identities, 1);
        assert_eq!(s.totals.agents["active"], 1);
        assert_eq!(
            (s.totals.tasks, s.totals.task_credentials),
            (2, 2),
            "{:?}",
            s.totals
        );
        assert_eq!(s.totals.task_credential_seconds_outstanding, 40 * 60);
        let a = &s.agents[0];
        assert_eq!(
            (a.agent.as_str(), a.owner.as_str()),
            ("bot", "owner-of-bot")
        );
        assert_eq!(
            a.tasks.iter().map(|t| t.task.as_str()).collect::<Vec<_>>(),
            ["t1", "t2"],
            "soonest to expire first"
        );
        let text = render(&s);
        assert!(text.contains("tasks 2  task credentials 2"), "{text}");
        assert!(
            text.contains("token accessor acc-t1  expires 2027-01-15T08:10:00Z"),
            "{text}"
        );
        let json = serde_json::to_value(&s).unwrap();
        assert_eq!(
            json["agents"][0]["tasks"][1]["credentials"][0]["issuer"],
            "bao"
        );
    }
}
