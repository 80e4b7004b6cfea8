//! Alerts: conditions that must reach the on-call (a revocation SLA at risk
//! or breached, rotation that keeps failing, a credential near its
//! `max_age`, holdouts past grace, orphaned agents), and the alert sinks
//! that carry them to an alerting pipeline (`alertmanager`, `pagerduty`,
//! `webhook`).
//!
//! The engine does not send alerts itself: it says which conditions are
//! true now ([`Alert`], one per condition, each with a stable
//! [`Alert::dedup_key`]); the alert manager compares that set with the one
//! it last saw, fires the new ones, keeps re-sending those still firing and
//! resolves the ones gone. Level-triggered, so a restart, a flapping
//! condition or a sink that was down never opens a second incident for one
//! condition.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// How urgent an alert is (the `severity` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    /// Someone should look during working hours.
    Warning,
    /// Page the on-call now.
    Critical,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Warning => "warning",
            Severity::Critical => "critical",
        }
    }
}

/// One condition that is true now. Never carries a secret value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Alert {
    /// The `alertname` label, e.g. `KeyturnRevocationSlaBreached`.
    pub name: String,
    pub severity: Severity,
    pub agent: Option<String>,
    pub credential: Option<String>,
    pub tenant: Option<String>,
    pub tier: Option<String>,
    /// One line for a pager (`annotations.summary`).
    pub summary: String,
    /// What is wrong and what to do (`annotations.description`).
    pub description: String,
    /// When the condition began (`startsAt`): stable from one evaluation
    /// to the next for as long as the condition holds.
    pub since: DateTime<Utc>,
}

impl Alert {
    /// Stable per condition, agent and credential: PagerDuty's `dedup_key`,
    /// the spool's key. Two evaluations of one condition give the same key.
    pub fn dedup_key(&self) -> String {
        format!(
            "keyturn/{}/{}/{}",
            self.name,
            self.agent.as_deref().unwrap_or("-"),
            self.credential.as_deref().unwrap_or("-")
        )
    }
}

/// What the daemon's alert loop asks for: the conditions true at `now`,
/// and when the answer may next change without any event (an SLA reaching
/// 80 %, a credential reaching its `max_age`), so the loop evaluates again
/// then and a deadline is alerted on time.
pub trait ConditionSource: Send + Sync {
    fn conditions(&self, now: DateTime<Utc>) -> Conditions;
}

#[derive(Debug, Clone, Default)]
pub struct Conditions {
    pub firing: Vec<Alert>,
    /// The next time a condition starts or stops by the clock alone.
    pub next_change: Option<DateTime<Utc>>,
}
