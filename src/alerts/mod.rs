//! Alerts: conditions that must reach the on-call (a revocation SLA at risk
//! or breached, rotation that keeps failing, a credential near its
//! `max_age`, holdouts past grace, orphaned agents), and the alert sinks
//! that carry them to an alerting pipeline (`alertmanager`, `pagerduty`,
//! `webhook`).
//!
//! The engine does not send alerts itself: it says which conditions are
//! true now ([`Alert`], one per condition and severity, each with a stable
//! [`Alert::dedup_key`]); the alert manager compares that set with the one
//! it last saw, fires the new ones, keeps re-sending those still firing and
//! resolves the ones gone. Each sink holds one incident per condition, agent
//! and credential ([`Alert::incident_key`]), at the highest severity its
//! route passes: an escalation updates it, only the end resolves it.
//! Level-triggered, so a restart, a flapping condition or a sink that was
//! down never opens a second incident for one condition.
//!
//! # Layout
//! - [`manager`]: [`Alerts`], the spooled, retried, audited delivery of
//!   the firing set to every alert sink whose routing filters match;
//! - [`alertmanager`], [`pagerduty`], [`webhook`]: the alert sinks, each
//!   owning its `[alerts.NAME]` config, its check and its build;
//! - `http`: what the three share (URL rules, the POST and how an answer
//!   maps to an error kind).
//!
//! # Adding an alert sink
//! Write `alerts/NAME.rs` with its config struct (`deny_unknown_fields`,
//! the routing keys `severities`, `tiers`, `tenants` and `timeout` among
//! its own, and `common_keys!` for it), `impl AlertSinkPlugin` (check
//! through the [`Validator`], build) and the [`AlertSink`]; then add one
//! line to [`AlertSinkConfig`].

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::config::validate::{Loc, Validator};
use crate::model::PluginError;
use crate::plugin::registry;

/// `common()`, the [`Common`] view of a sink config's routing keys and
/// `timeout` (the fields `severities`, `tiers`, `tenants`, `timeout` every
/// alert sink config has).
macro_rules! common_keys {
    ($config:ty) => {
        impl $config {
            fn common(&self) -> Common<'_> {
                Common {
                    severities: &self.severities,
                    tiers: &self.tiers,
                    tenants: &self.tenants,
                    timeout: &self.timeout,
                }
            }
        }
    };
}

pub mod alertmanager;
mod http;
pub mod manager;
pub mod pagerduty;
#[cfg(test)]
mod tests;
pub mod webhook;

pub use manager::{
    AlertRecorder, Alerts, FiresAt, ManagerOptions, MemoryRecorder, NamedSink, NoConditions,
    POKE_GAP, run_loop,
};

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

    /// The severity named `text` (`warning`, `critical`).
    pub fn parse(text: &str) -> Option<Severity> {
        match text {
            "warning" => Some(Severity::Warning),
            "critical" => Some(Severity::Critical),
            _ => None,
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
    /// The `mode` label: `follow` on the alerts of a followed credential
    /// (`mode = "follow"`, rotated by another keyturn), so the on-call
    /// tells a failing follower from a failing rotation; unset otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
    /// One line for a pager (`annotations.summary`).
    pub summary: String,
    /// What is wrong and what to do (`annotations.description`).
    pub description: String,
    /// When the condition began (`startsAt`): stable from one evaluation
    /// to the next for as long as the condition holds.
    pub since: DateTime<Utc>,
}

impl Alert {
    /// Stable per condition, agent, credential and severity: the key of
    /// the spool's firing set, of the webhook's `fingerprint`, and what
    /// Alertmanager tells alerts apart by (its labels include `severity`).
    /// Two evaluations of one condition give the same key.
    pub fn dedup_key(&self) -> String {
        format!("{}/{}", self.incident_key(), self.severity.as_str())
    }

    /// Stable per condition, agent and credential, whatever the severity:
    /// one incident at the receiver (PagerDuty's `dedup_key`,
    /// `keyturn/<alertname>/<agent>/<credential>`). A condition that
    /// escalates from `warning` to `critical` (or back) updates that
    /// incident; only its end resolves it.
    pub fn incident_key(&self) -> String {
        format!(
            "keyturn/{}/{}/{}",
            self.name,
            self.agent.as_deref().unwrap_or("-"),
            self.credential.as_deref().unwrap_or("-"),
        )
    }

    /// The condition this one replaces when it begins, on the same agent
    /// and credential (`KeyturnCredentialExpired` replaces
    /// `KeyturnCredentialExpiring`): the replaced one is resolved at once,
    /// not held for the flap hold beside the one that replaced it.
    pub fn replaces(&self) -> Option<&'static str> {
        use crate::rotation::health::{CREDENTIAL_EXPIRED, CREDENTIAL_EXPIRING};
        (self.name == CREDENTIAL_EXPIRED).then_some(CREDENTIAL_EXPIRING)
    }

    /// Whether `other` carries the same labels (everything but the text
    /// and `since`): a receiver that keys alerts by labels (Alertmanager)
    /// sees the two as one alert.
    pub fn same_labels(&self, other: &Alert) -> bool {
        self.name == other.name
            && self.severity == other.severity
            && self.agent == other.agent
            && self.credential == other.credential
            && self.tenant == other.tenant
            && self.tier == other.tier
            && self.mode == other.mode
    }
}

/// What the alert manager asks a sink to send about one incident.
#[derive(Debug, Clone, Copy)]
pub struct Notice<'a> {
    /// The key the receiver knows the incident by (PagerDuty's
    /// `dedup_key`): [`Alert::incident_key`], or for an incident opened
    /// before keyturn keyed incidents so, the [`Alert::dedup_key`] it was
    /// opened with.
    pub key: &'a str,
    /// The alert to fire (or, for a resolve, the one the receiver holds).
    pub alert: &'a Alert,
    /// For a fire: the alert the receiver last accepted for this incident,
    /// when its labels differ from `alert`'s (the severity changed). A
    /// sink whose receiver keys alerts by labels ends it in the same
    /// request; PagerDuty's trigger simply updates the incident.
    pub replaces: Option<&'a Alert>,
}

impl<'a> Notice<'a> {
    /// A notice of `alert` under `key`, replacing nothing.
    pub fn new(key: &'a str, alert: &'a Alert) -> Self {
        Self {
            key,
            alert,
            replaces: None,
        }
    }

    /// What a fire tells a receiver that keys alerts by labels: the
    /// replaced alert ended at `now` (if any), then the alert, firing
    /// (`None`).
    pub fn firing(&self, now: DateTime<Utc>) -> Vec<(&'a Alert, Option<DateTime<Utc>>)> {
        let mut out = Vec::with_capacity(2);
        if let Some(old) = self.replaces {
            out.push((old, Some(now)));
        }
        out.push((self.alert, None));
        out
    }
}

/// What the daemon's alert loop asks for: the conditions true at `now`,
/// and when the answer may next change without any event (an SLA reaching
/// 80 %, a credential reaching its `max_age`), so the loop evaluates again
/// then and a deadline is alerted on time.
pub trait ConditionSource: Send + Sync {
    fn conditions(&self, now: DateTime<Utc>) -> Conditions;
}

/// Several sources as one: every alert of each, the earliest next change.
pub struct AllConditions(pub Vec<std::sync::Arc<dyn ConditionSource>>);

impl ConditionSource for AllConditions {
    fn conditions(&self, now: DateTime<Utc>) -> Conditions {
        let mut all = Conditions::default();
        for source in &self.0 {
            let c = source.conditions(now);
            all.firing.extend(c.firing);
            all.next_change = match (all.next_change, c.next_change) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
        }
        all
    }
}

#[derive(Debug, Clone, Default)]
pub struct Conditions {
    pub firing: Vec<Alert>,
    /// The next time a condition starts or stops by the clock alone.
    pub next_change: Option<DateTime<Utc>>,
}

registry! {
    /// One `[alerts.NAME]` table: one variant per alert sink.
    pub enum AlertSinkConfig: AlertSinkPlugin {
        Alertmanager(alertmanager::AlertmanagerConfig),
        Pagerduty(pagerduty::PagerdutyConfig),
        Webhook(webhook::AlertWebhookConfig),
    }
}

/// What the registry needs of an alert sink's config.
pub trait AlertSinkPlugin: std::fmt::Debug + Send + Sync {
    /// Reports every problem of `[alerts.NAME]` at `at` and completes it in
    /// place (relative paths resolved).
    fn check(&mut self, v: &mut Validator<'_>, at: Loc<'_>, scope: &AlertScope<'_>);

    /// Which alerts go to this sink, once `check` accepted the config.
    fn route(&self) -> Route;

    /// The sink, named `name` (the `NAME` of `[alerts.NAME]`). Reads its
    /// secret file, if it has one, so a missing key fails here.
    fn build(self: Box<Self>, name: &str) -> Result<Arc<dyn AlertSink>, PluginError>;
}

impl AlertSinkConfig {
    /// The sink and its route.
    pub fn build(self, name: &str) -> Result<NamedSink, PluginError> {
        let route = self.plugin().route();
        let sink = self.into_plugin().build(name)?;
        Ok(NamedSink {
            name: name.to_owned(),
            sink,
            route,
        })
    }
}

/// Builds every `[alerts.NAME]` of a config.
/// Every sink that fails is named, not only the first.
pub fn build_sinks(
    configs: &BTreeMap<String, AlertSinkConfig>,
) -> Result<Vec<NamedSink>, PluginError> {
    let mut sinks = Vec::with_capacity(configs.len());
    let mut failed: Option<PluginError> = None;
    for (name, c) in configs {
        match c.clone().build(name) {
            Ok(s) => sinks.push(s),
            Err(e) => {
                let message = format!("[alerts.{name}]: {}", e.message);
                failed = Some(match failed {
                    None => PluginError::new(e.kind, message),
                    Some(f) => PluginError::new(f.kind, format!("{}; {message}", f.message)),
                });
            }
        }
    }
    match failed {
        Some(e) => Err(e),
        None => Ok(sinks),
    }
}

/// What an alert sink's check needs to know about the rest of the config.
#[derive(Debug, Clone, Copy)]
pub struct AlertScope<'a> {
    /// The tier names (`[tiers]`, or the built-in ones).
    pub tiers: &'a [String],
}

/// The routing filters of one alert sink: an alert goes to the sink when
/// each filter that is set lists its value (an alert without a tier or a
/// tenant passes only the filters that are not set).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Route {
    pub severities: Option<Vec<Severity>>,
    pub tiers: Option<Vec<String>>,
    pub tenants: Option<Vec<String>>,
}

impl Route {
    pub fn matches(&self, alert: &Alert) -> bool {
        let listed = |filter: &Option<Vec<String>>, value: &Option<String>| match filter {
            None => true,
            Some(list) => value.as_ref().is_some_and(|v| list.contains(v)),
        };
        self.severities
            .as_ref()
            .is_none_or(|s| s.contains(&alert.severity))
            && listed(&self.tiers, &alert.tier)
            && listed(&self.tenants, &alert.tenant)
    }
}

/// The routing keys and `timeout` every alert sink takes, checked alike.
pub(crate) struct Common<'a> {
    pub severities: &'a Option<Vec<String>>,
    pub tiers: &'a Option<Vec<String>>,
    pub tenants: &'a Option<Vec<String>>,
    pub timeout: &'a Option<String>,
}

impl Common<'_> {
    pub(crate) fn check(&self, v: &mut Validator<'_>, p: Loc<'_>, scope: &AlertScope<'_>) {
        let empty = |v: &mut Validator<'_>, key: &'static str| {
            v.err(
                p.key(key),
                format!(
                    "`{key} = []` routes nothing to this sink; remove the key to route every alert"
                ),
            )
        };
        if let Some(severities) = self.severities {
            if severities.is_empty() {
                empty(v, "severities");
            }
            for (i, s) in severities.iter().enumerate() {
                if Severity::parse(s).is_none() {
                    v.err(
                        p.key("severities").index(i),
                        format!("unknown severity `{s}`; expected `warning` or `critical`"),
                    );
                }
            }
        }
        if let Some(tiers) = self.tiers {
            if tiers.is_empty() {
                empty(v, "tiers");
            }
            for (i, t) in tiers.iter().enumerate() {
                if !scope.tiers.contains(t) {
                    v.err(
                        p.key("tiers").index(i),
                        format!(
                            "unknown tier `{t}`; defined tiers: {}",
                            crate::config::validate::list(scope.tiers.iter())
                        ),
                    );
                }
            }
        }
        if let Some(tenants) = self.tenants {
            if tenants.is_empty() {
                empty(v, "tenants");
            }
            for (i, t) in tenants.iter().enumerate() {
                if t.trim().is_empty() {
                    v.err(p.key("tenants").index(i), "a tenant must not be empty");
                }
            }
        }
        if let Some(text) = self.timeout {
            v.timeout_within(p, text, MIN_TIMEOUT, MAX_TIMEOUT);
        }
    }

    pub(crate) fn route(&self) -> Route {
        Route {
            severities: self
                .severities
                .as_ref()
                .map(|s| s.iter().filter_map(|s| Severity::parse(s)).collect()),
            tiers: self.tiers.clone(),
            tenants: self.tenants.clone(),
        }
    }

    pub(crate) fn timeout(&self) -> Duration {
        crate::config::validate::duration_value(self.timeout.as_deref(), DEFAULT_TIMEOUT)
    }
}

/// `timeout` of an alert sink when unset, and its range.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);
pub const MIN_TIMEOUT: Duration = Duration::from_millis(100);
pub const MAX_TIMEOUT: Duration = Duration::from_secs(60);

/// Carries alerts to one alerting pipeline. One call is one request; the
/// manager owns retries, backoff, spooling and audit. Never logs or keeps a
/// response body.
#[async_trait]
pub trait AlertSink: Send + Sync {
    /// For logs, status and audit, e.g. `alertmanager:http://am:9093/api/v2/alerts`
    /// (never a query string or a key).
    fn describe(&self) -> String;

    /// The sink's `type`.
    fn kind(&self) -> &'static str;

    /// How often a firing alert is sent again for as long as it fires
    /// (`None`: once; the receiver keeps it open until resolved).
    fn resend_interval(&self) -> Option<Duration> {
        None
    }

    /// The condition is firing (new, still, or at another severity).
    async fn fire(&self, notice: &Notice<'_>) -> Result<(), PluginError>;

    /// The condition ended at `ended_at`.
    async fn resolve(
        &self,
        notice: &Notice<'_>,
        ended_at: DateTime<Utc>,
    ) -> Result<(), PluginError>;
}
