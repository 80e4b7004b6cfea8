//! The config file as written: serde structs that mirror the TOML one to one.
//!
//! Every struct denies unknown keys, so a typo (`schedul = ...`) is an error
//! instead of a silently ignored setting. Values that need more than a type
//! check (durations, modes, paths, ids, cron expressions) stay strings here;
//! [`super::validate`] turns them into typed values and reports every problem.
//!
//! Plug-in sections (vaults, targets, sinks) are the plug-ins' own config
//! structs, gathered in the registries of `vaults`, `targets` and `sinks`
//! (enums tagged by `type`); `generate` is tagged by `kind`.
//!
//! The file is not deserialized in one go: [`super::load`] deserializes each
//! section (the daemon table, each tier, vault, agent and credential) on its
//! own so that one bad section does not hide the errors in the others. The
//! result of that is a [`RawConfig`], where a section that failed is kept as
//! [`Parsed::Invalid`] (its error is already reported): validation then still
//! knows the name exists and does not report a second, misleading "unknown
//! vault" for every credential that refers to it.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde::de::IgnoredAny;

use crate::alerts::AlertSinkConfig;
use crate::sinks::SinkConfig;
use crate::targets::TargetConfig;
use crate::tasks::policy::RawPolicy;
use crate::vaults::VaultSpec;

/// A section that deserialized, or one whose error was already reported.
#[derive(Debug, Clone, PartialEq)]
pub enum Parsed<T> {
    Ok(T),
    Invalid,
}

impl<T> Parsed<T> {
    pub fn ok(&self) -> Option<&T> {
        match self {
            Parsed::Ok(t) => Some(t),
            Parsed::Invalid => None,
        }
    }
}

/// The whole file, section by section, in the shape validation consumes.
/// Map keys are the names as written (not yet checked against the id grammar).
#[derive(Debug, Clone, Default)]
pub struct RawConfig {
    /// `None` when there is no `[daemon]` table (every key has a default).
    pub daemon: Option<Parsed<RawDaemon>>,
    /// `None` when there is no `[tiers]` table (the built-in tiers apply).
    pub tiers: Option<BTreeMap<String, Parsed<RawTier>>>,
    pub vaults: BTreeMap<String, Parsed<VaultSpec>>,
    /// In file order, so that of two clashing credentials or sinks the one
    /// further down is reported as the duplicate.
    pub agents: Vec<(String, RawAgentEntry)>,
    /// `[alerts.NAME]`: the alert sinks.
    pub alerts: BTreeMap<String, Parsed<AlertSinkConfig>>,
    /// `None` when there is no `[alert_rules]` table (every key has a default).
    pub alert_rules: Option<Parsed<RawAlertRules>>,
    /// `[policies.NAME]`: what tasks each agent may start.
    pub policies: BTreeMap<String, Parsed<RawPolicy>>,
    /// `[issuers.NAME]`: the systems that mint task credentials.
    pub issuers: BTreeMap<String, Parsed<crate::tasks::issuers::IssuerConfig>>,
    /// `[token_service.subject_issuers.NAME]`: whose subject tokens are accepted.
    pub subject_issuers: BTreeMap<String, Parsed<crate::oauth::config::RawSubjectIssuer>>,
    /// `[token_service]`'s keys for issued tokens; `None` when none is set.
    pub token_settings: Option<Parsed<crate::oauth::config::RawTokenSettings>>,
    /// `[token_service.clients.AGENT]`.
    pub token_clients: BTreeMap<String, Parsed<crate::oauth::config::RawClient>>,
    /// `[token_service.tenants.NAME]`.
    pub token_tenants: BTreeMap<String, Parsed<crate::oauth::config::RawTenantKeys>>,
    /// The keys taken out of their sections for a wrong type, or stood in
    /// for (their errors already reported), as dotted paths: each section
    /// is validated as read, but what other sections are checked against
    /// must not come from such a key (a `[daemon]` without its bad
    /// `delivery_roots` has none).
    pub taken_out: Vec<String>,
}

impl RawConfig {
    /// Whether the key at the dotted `path`, or a key inside it, was taken
    /// out in reading.
    pub fn taken_out(&self, path: &str) -> bool {
        self.taken_out.iter().any(|p| {
            p.strip_prefix(path)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with(['.', '[']))
        })
    }
}

/// `[alert_rules]`: when rotation health raises an alert. Every key is optional.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAlertRules {
    pub failures_warning: Option<u32>,
    pub failures_critical: Option<u32>,
    /// `"period"` or a duration.
    pub expiry_critical_before: Option<String>,
    pub holdouts: Option<bool>,
    /// How long a condition must stay gone before its alert is resolved.
    pub resolve_hold: Option<String>,
}

/// One `[agents.NAME]` table: its own keys and its credentials, each
/// deserialized separately.
#[derive(Debug, Clone)]
pub struct RawAgentEntry {
    pub agent: Parsed<RawAgent>,
    /// In file order.
    pub credentials: Vec<(String, Parsed<RawCredential>)>,
}

/// `[daemon]`. Every key is optional.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDaemon {
    pub state_dir: Option<String>,
    pub socket: Option<String>,
    pub socket_group: Option<String>,
    pub agent_socket: Option<String>,
    pub listen: Option<String>,
    pub delivery_roots: Option<Vec<String>>,
    pub audit_log: Option<String>,
    pub audit_key_file: Option<String>,
    /// Enables `POST /v1/follow/nudge` on `listen`, signed with this key.
    pub follow_nudge_key_file: Option<String>,
    pub drain_timeout: Option<String>,
    pub max_concurrent_rotations: Option<usize>,
    pub catch_up_spread: Option<String>,
    pub retry: Option<RawRetry>,
    /// Where task credentials are written (`<task_root>/<agent>/<task id>/`).
    pub task_root: Option<String>,
    /// The `aud` agents' JWT assertions must name (default `keyturn`).
    pub assertion_audience: Option<String>,
}

/// `[daemon.retry]`: backoff of failed rotation steps.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRetry {
    pub initial_delay: Option<String>,
    pub max_delay: Option<String>,
    pub max_attempts: Option<u32>,
}

/// `[tiers.NAME]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTier {
    pub revocation_sla: String,
}

/// The scalar keys of `[agents.NAME]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAgent {
    pub owner: String,
    pub tenant: String,
    pub tier: String,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    /// Overrides the tier's `revocation_sla` for this agent.
    pub revocation_sla: Option<String>,
    /// `decommissioned = { at = "RFC 3339", reason = "..." }`: the agent
    /// is retired (declared in config, GitOps style).
    pub decommissioned: Option<RawDecommissioned>,
    /// The agent's ed25519 credential whose key signs its JWT assertions.
    pub auth_key: Option<String>,
    /// Deserialized credential by credential elsewhere; listed here so the
    /// key is known (and named in "expected one of" messages).
    #[serde(default)]
    pub credentials: Option<IgnoredAny>,
}

/// `decommissioned = { at = ..., reason = ..., by = ... }` on an agent.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDecommissioned {
    /// Required; optional here so that its absence is reported as a
    /// missing key rather than as a time that does not parse.
    #[serde(default)]
    pub at: Option<RawTime>,
    pub reason: String,
    /// The human who decided (default: the config).
    pub by: Option<String>,
}

/// A point in time as written: an RFC 3339 string or a TOML datetime.
#[derive(Debug, Clone, PartialEq)]
pub struct RawTime(pub String);

impl<'de> Deserialize<'de> for RawTime {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Either {
            Text(String),
            Toml(toml::value::Datetime),
        }
        match Either::deserialize(d) {
            Ok(Either::Text(s)) => Ok(RawTime(s)),
            Ok(Either::Toml(t)) => Ok(RawTime(t.to_string())),
            Err(_) => Err(serde::de::Error::custom(
                "expected an RFC 3339 time like \"2026-12-01T09:00:00Z\"",
            )),
        }
    }
}

/// `[agents.AGENT.credentials.NAME]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCredential {
    pub vault: VaultList,
    pub path: Option<String>,
    pub generate: RawGenerator,
    pub target: Option<TargetConfig>,
    pub schedule: Option<String>,
    pub every: Option<String>,
    pub jitter: Option<String>,
    pub grace: Option<String>,
    pub deliver: Option<Vec<SinkConfig>>,
    /// `"rotate"` (default) or `"follow"`.
    pub mode: Option<String>,
    /// How often a followed credential's vault is polled (default 5 s).
    pub poll: Option<String>,
    /// The oldest the current version may be (alerts: `[alert_rules]`).
    pub max_age: Option<String>,
}

/// `vault = "bao"` or `vault = ["bao", "aws"]`: a credential kept in several
/// vaults is staged in all of them and promoted only when all hold it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VaultList(pub Vec<String>);

impl<'de> Deserialize<'de> for VaultList {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = VaultList;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a vault name or an array of vault names")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<VaultList, E> {
                Ok(VaultList(vec![v.to_owned()]))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<VaultList, A::Error> {
                let mut names = Vec::new();
                while let Some(name) = seq.next_element::<String>()? {
                    names.push(name);
                }
                Ok(VaultList(names))
            }
        }
        d.deserialize_any(Visitor)
    }
}

/// `generate = { kind = ... }`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum RawGenerator {
    Password {
        length: Option<usize>,
        lowercase: Option<bool>,
        uppercase: Option<bool>,
        digits: Option<bool>,
        symbols: Option<bool>,
    },
    RandomBytes {
        length: Option<usize>,
        encoding: Option<RawEncoding>,
    },
    ApiKey {
        prefix: Option<String>,
        length: Option<usize>,
    },
    Ed25519 {},
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RawEncoding {
    Hex,
    #[serde(rename = "base64url")]
    Base64Url,
}

/// The keys allowed at the top of the file (for "unknown key" messages).
pub const TOP_LEVEL_KEYS: &[&str] = &[
    "daemon",
    "tiers",
    "vaults",
    "agents",
    "alerts",
    "alert_rules",
    "policies",
    "issuers",
    "token_service",
];
