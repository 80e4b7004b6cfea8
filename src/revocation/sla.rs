//! SLA clocks and what `status`, `/metrics` and alerts see of
//! decommissions and orphans.

use chrono::{DateTime, Utc};

use super::{Decom, Orphan, Revocations};
use crate::alerts::{Alert, ConditionSource, Conditions, Severity};
use crate::api::protocol::{AgentLifecycle, PendingItem, ShownStage, StatusRow, TokensRevocation};
use crate::model::AgentId;
use crate::telemetry::SlaClock;

/// The share of the SLA at which the warning fires.
const WARN_AT: f64 = 0.8;

fn at_share(d: &Decom, share: f64) -> DateTime<Utc> {
    d.row.decided_at + chrono::Duration::milliseconds((d.row.sla_ms as f64 * share) as i64)
}

/// The rows `keyturn status` and `keyturn surface` show.
pub fn lifecycle_rows(
    decoms: &[Decom],
    orphans: &[Orphan],
    now: DateTime<Utc>,
) -> Vec<AgentLifecycle> {
    let mut rows: Vec<AgentLifecycle> = decoms
        .iter()
        .map(|d| {
            let ms =
                |t: Option<DateTime<Utc>>| t.map(|t| (t - d.row.decided_at).num_milliseconds());
            let complete = d.complete();
            AgentLifecycle {
                agent: d.row.agent.clone(),
                state: if complete {
                    "decommissioned"
                } else {
                    "decommissioning"
                }
                .into(),
                owner: d.row.owner.clone(),
                tenant: d.row.tenant.clone(),
                tier: d.row.tier.clone(),
                orphaned_since: None,
                decided_at: Some(d.row.decided_at),
                actor: Some(d.row.actor.clone()),
                by: d.row.by.clone(),
                reason: Some(d.row.reason.clone()),
                source: Some(d.row.source.clone()),
                sla_seconds: Some(d.row.sla_ms / 1000),
                deadline: Some(d.row.deadline()),
                remaining_ms: (!complete).then(|| (d.row.deadline() - now).num_milliseconds()),
                revoked_at: d.row.revoked_at,
                verified_at: d.row.verified_at,
                to_revoked_ms: ms(d.row.revoked_at),
                to_verified_ms: ms(d.row.verified_at),
                items: d.items.len(),
                revoked: d.items.iter().filter(|i| i.revoked_at.is_some()).count(),
                verified: d.items.iter().filter(|i| i.verified_at.is_some()).count(),
                pending: d
                    .items
                    .iter()
                    .filter(|i| i.verified_at.is_none())
                    .map(|i| PendingItem {
                        item: i.item.clone(),
                        attempts: i.attempts,
                        last_error: i.last_error.clone(),
                    })
                    .collect(),
                tokens: d
                    .items
                    .iter()
                    .find(|i| i.kind == "tokens")
                    .map(|i| TokensRevocation {
                        issued_up_to: d.row.token_epoch(),
                        verified_at: i.verified_at,
                        to_verified_ms: ms(i.verified_at),
                    }),
            }
        })
        .collect();
    rows.extend(orphans.iter().map(|o| AgentLifecycle {
        agent: o.agent.clone(),
        state: "orphaned".into(),
        owner: o.owner.clone(),
        tenant: o.tenant.clone(),
        tier: o.tier.clone(),
        orphaned_since: Some(o.since),
        decided_at: None,
        actor: None,
        by: None,
        reason: None,
        source: None,
        sla_seconds: None,
        deadline: None,
        remaining_ms: None,
        revoked_at: None,
        verified_at: None,
        to_revoked_ms: None,
        to_verified_ms: None,
        items: 0,
        revoked: 0,
        verified: 0,
        pending: Vec::new(),
        tokens: None,
    }));
    rows.sort_by(|a, b| a.agent.cmp(&b.agent));
    rows
}

/// Shows in `rows` (`keyturn status`) what the decommission of each
/// credential's agent did to its versions, once all of the credential's
/// items are verified: `destroyed` when that includes its vaults (none
/// serves a version any more), `revoked` when it had none to destroy (a
/// followed credential). Until then the version is still current.
pub fn show_revoked<'a>(rows: &mut [StatusRow], decom_of: impl Fn(&AgentId) -> Option<&'a Decom>) {
    for row in rows.iter_mut().filter(|r| r.version.is_some()) {
        let Some(d) = decom_of(&row.agent) else {
            continue;
        };
        let mut items = d
            .items
            .iter()
            .filter(|i| i.credential.as_ref() == Some(&row.credential))
            .peekable();
        if items.peek().is_none() {
            continue;
        }
        let (mut done, mut vaults) = (true, false);
        for i in items {
            done &= i.verified_at.is_some();
            vaults |= i.kind == "vault";
        }
        if done {
            row.stage = Some(if vaults {
                ShownStage::Destroyed
            } else {
                ShownStage::Revoked
            });
        }
    }
}

impl Revocations {
    /// [`show_revoked`] with this daemon's decommissions.
    pub fn show_revoked(&self, rows: &mut [StatusRow]) {
        let decoms = self.decoms();
        show_revoked(rows, |agent| decoms.get(agent));
    }

    /// `status` rows of every decommission and orphan.
    pub fn lifecycle(&self) -> Vec<AgentLifecycle> {
        let (decoms, orphans) = self.snapshot();
        lifecycle_rows(&decoms, &orphans, self.inner.engine.now())
    }

    /// The SLA clock of every decommission not complete, for
    /// `keyturn_decommission_sla_remaining_seconds` and
    /// `keyturn_decommission_sla_seconds`.
    pub fn sla_clocks(&self) -> Vec<SlaClock> {
        let now = self.inner.engine.now();
        self.snapshot()
            .0
            .iter()
            .filter(|d| !d.complete())
            .map(|d| SlaClock {
                agent: d.row.agent.to_string(),
                remaining_seconds: (d.row.deadline() - now).num_milliseconds() as f64 / 1000.0,
                sla_seconds: d.row.sla_ms as f64 / 1000.0,
            })
            .collect()
    }
}

impl ConditionSource for Revocations {
    fn conditions(&self, now: DateTime<Utc>) -> Conditions {
        let (decoms, orphans) = self.snapshot();
        conditions_of(&decoms, &orphans, now)
    }
}

/// The alerts of these decommissions and orphans at `now`.
pub fn conditions_of(decoms: &[Decom], orphans: &[Orphan], now: DateTime<Utc>) -> Conditions {
    {
        let mut out = Conditions::default();
        let mut next = |t: DateTime<Utc>| {
            if t > now {
                out.next_change = Some(out.next_change.map_or(t, |n| n.min(t)));
            }
        };
        let mut firing = Vec::new();
        for d in decoms.iter().filter(|d| !d.complete()) {
            let warn_at = at_share(d, WARN_AT);
            let deadline = d.row.deadline();
            next(warn_at);
            next(deadline);
            let pending = d.items.iter().filter(|i| i.verified_at.is_none()).count();
            let first_error = d
                .items
                .iter()
                .find_map(|i| i.last_error.as_deref().map(|e| format!("{}: {e}", i.item)))
                .unwrap_or_else(|| "no error yet".into());
            let alert = |name: &str, severity, since, summary: String| Alert {
                name: name.into(),
                severity,
                agent: Some(d.row.agent.to_string()),
                credential: None,
                tenant: Some(d.row.tenant.clone()),
                tier: Some(d.row.tier.clone()),
                mode: None,
                summary,
                description: format!(
                    "Agent {} was decommissioned at {} ({}); {pending} of {} revocation item(s) are not verified yet. First problem: {first_error}. keyturn keeps retrying; `keyturn status` shows each item.",
                    d.row.agent,
                    d.row
                        .decided_at
                        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                    d.row.reason,
                    d.items.len()
                ),
                since,
            };
            if now >= warn_at {
                firing.push(alert(
                    "KeyturnRevocationSlaAtRisk",
                    Severity::Warning,
                    warn_at,
                    format!(
                        "revocation of {} has used 80% of its SLA ({}), not verified yet",
                        d.row.agent,
                        humantime::format_duration(std::time::Duration::from_millis(d.row.sla_ms))
                    ),
                ));
            }
            if now >= deadline {
                firing.push(alert(
                    "KeyturnRevocationSlaBreached",
                    Severity::Critical,
                    deadline,
                    format!(
                        "revocation SLA of {} breached: credentials of a decommissioned agent may still work",
                        d.row.agent
                    ),
                ));
            }
        }
        for o in orphans {
            let agent = &o.agent;
            let known = |s: &String| (!s.is_empty()).then(|| s.clone());
            firing.push(Alert {
                name: "KeyturnAgentOrphaned".into(),
                severity: Severity::Warning,
                agent: Some(agent.to_string()),
                credential: None,
                tenant: known(&o.tenant),
                tier: known(&o.tier),
                mode: None,
                summary: format!("agent {agent} left the config without a decommission"),
                description: format!(
                    "State remembers credentials of agent {agent}, which the config no longer names. They are not revoked: run `keyturn decommission {agent} --reason ...` to revoke them, or put the agent back in the config."
                ),
                since: o.since,
            });
        }
        out.firing = firing;
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::AgentId;
    use crate::state::{DecommissionRow, RevocationRow};
    use crate::test_support::at_secs as t;

    fn decom(sla_s: u64, verified: bool) -> Decom {
        let agent = AgentId::new("bot").unwrap();
        Decom {
            row: DecommissionRow {
                agent: agent.clone(),
                decided_at: t(1000),
                recorded_at: t(1000),
                actor: "config".into(),
                by: None,
                reason: "retired".into(),
                source: "config".into(),
                owner: "o".into(),
                tenant: "acme".into(),
                tier: "high".into(),
                sla_ms: sla_s * 1000,
                revoked_at: verified.then(|| t(1001)),
                verified_at: verified.then(|| t(1002)),
                nothing_held: false,
            },
            items: vec![RevocationRow {
                agent,
                item: "db/vault:bao".into(),
                credential: Some(crate::model::CredentialId::new("db").unwrap()),
                kind: "vault".into(),
                spec: serde_json::json!({}),
                revoked_at: None,
                verified_at: verified.then(|| t(1002)),
                attempts: 3,
                last_error: (!verified).then(|| "vault \"bao\": connection refused".into()),
            }],
        }
    }

    fn names(c: &Conditions) -> Vec<(String, Severity)> {
        c.firing
            .iter()
            .map(|a| (a.name.clone(), a.severity))
            .collect()
    }

    #[test]
    fn the_warning_fires_at_80_percent_the_breach_at_100_and_completion_clears_both() {
        let d = [decom(100, false)];
        let before = conditions_of(&d, &[], t(1079));
        assert!(before.firing.is_empty());
        assert_eq!(before.next_change, Some(t(1080)), "wake at 80 %");
        let warn = conditions_of(&d, &[], t(1080));
        assert_eq!(
            names(&warn),
            vec![("KeyturnRevocationSlaAtRisk".into(), Severity::Warning)]
        );
        assert_eq!(warn.next_change, Some(t(1100)), "wake at the deadline");
        let a = &warn.firing[0];
        assert_eq!(
            (a.since, a.tenant.as_deref(), a.tier.as_deref()),
            (t(1080), Some("acme"), Some("high"))
        );
        assert!(
            a.description.contains("connection refused"),
            "{}",
            a.description
        );
        let breach = conditions_of(&d, &[], t(5000));
        assert_eq!(breach.firing.len(), 2);
        let b = breach
            .firing
            .iter()
            .find(|a| a.name == "KeyturnRevocationSlaBreached")
            .unwrap();
        // Stable from one evaluation to the next: one incident.
        assert_eq!(b.since, t(1100));
        assert_eq!(
            b.dedup_key(),
            conditions_of(&d, &[], t(9000)).firing[1].dedup_key()
        );
        assert_eq!(breach.next_change, None);
        assert!(
            conditions_of(&[decom(100, true)], &[], t(5000))
                .firing
                .is_empty()
        );
    }

    /// A status row of `bot/CRED` at version 2, current.
    fn status_row(cred: &str) -> StatusRow {
        let mut row = crate::api::protocol::tests::row();
        row.agent = AgentId::new("bot").unwrap();
        row.credential = crate::model::CredentialId::new(cred).unwrap();
        row.version = Some(2);
        row
    }

    #[test]
    fn status_shows_a_credentials_versions_destroyed_once_its_items_are_verified() {
        let mut rows = [status_row("db"), status_row("other")];
        let pending = [decom(100, false)];
        show_revoked(&mut rows, |_| pending.first());
        assert_eq!(rows[0].stage, Some(ShownStage::Current), "not verified yet");
        let done = [decom(100, true)];
        show_revoked(&mut rows, |_| done.first());
        assert_eq!(rows[0].stage, Some(ShownStage::Destroyed));
        assert_eq!(
            rows[1].stage,
            Some(ShownStage::Current),
            "no item of its own"
        );
        // A followed credential's versions are its rotator's: only the
        // agent's copies (its files) are revoked.
        let mut followed = decom(100, true);
        followed.items[0].kind = "sink".into();
        followed.items[0].item = "db/sink:0".into();
        let mut rows = [status_row("db")];
        show_revoked(&mut rows, |_| Some(&followed));
        assert_eq!(rows[0].stage, Some(ShownStage::Revoked));
        // Another agent's decommission changes nothing.
        let mut rows = [status_row("db")];
        show_revoked(&mut rows, |a| done.iter().find(|d| d.row.agent != *a));
        assert_eq!(rows[0].stage, Some(ShownStage::Current));
    }

    #[test]
    fn an_orphan_raises_a_warning_with_what_is_known_of_it() {
        let o = Orphan {
            agent: AgentId::new("gone").unwrap(),
            since: t(7),
            owner: "alice".into(),
            tenant: "acme".into(),
            tier: String::new(),
        };
        let c = conditions_of(&[], std::slice::from_ref(&o), t(100));
        assert_eq!(
            names(&c),
            vec![("KeyturnAgentOrphaned".into(), Severity::Warning)]
        );
        assert_eq!(c.firing[0].since, t(7));
        assert_eq!(c.firing[0].tenant.as_deref(), Some("acme"));
        assert_eq!(c.firing[0].tier, None);
        let rows = lifecycle_rows(&[], &[o], t(100));
        assert_eq!(
            (rows[0].state.as_str(), rows[0].owner.as_str()),
            ("orphaned", "alice")
        );
    }
}
