//! Configuration: TOML text → `raw` (serde structs, `deny_unknown_fields`) →
//! `validate` (pure, reports *every* error with file:line:col and TOML path)
//! → the typed [`Config`] below, which the rest of the daemon consumes.
//!
//! Nothing outside this module sees raw TOML; everything here is already
//! checked, so the engine never has to re-validate a path or an id. The
//! sections of plug-ins (vaults, targets, sinks) are the plug-ins' own config
//! structs, checked by the plug-ins through [`validate::Validator`].

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::alerts::AlertSinkConfig;
use crate::model::{AgentId, CredentialId, CredentialKey};
use crate::schedule::ScheduleSpec;
use crate::sinks::SinkConfig;
use crate::targets::TargetConfig;
use crate::vaults::VaultSpec;

pub mod client;
pub mod host;
mod lines;
pub mod load;
mod located;
pub mod raw;
pub mod trust;
pub mod validate;

pub use client::ClientPaths;
pub use host::check_host;
pub use load::{
    ConfigError, ConfigErrors, FileSet, Reloaded, load_file, load_str, load_tracked, reload,
    summary,
};

/// Where keyturn looks for its config when neither `--config` nor
/// `KEYTURN_CONFIG` says otherwise.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/keyturn/keyturn.toml";

/// A validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file it was read from (for messages and `check`).
    pub source: PathBuf,
    pub daemon: DaemonConfig,
    /// Tier name → revocation SLA.
    pub tiers: BTreeMap<String, TierConfig>,
    pub vaults: BTreeMap<String, VaultConfig>,
    pub agents: BTreeMap<AgentId, AgentConfig>,
    /// `[alerts.NAME]`: the alert sinks, by name.
    pub alerts: BTreeMap<String, AlertSinkConfig>,
    /// `[alert_rules]`: when rotation health raises an alert.
    pub alert_rules: AlertRules,
    /// `[policies.NAME]`: what tasks each agent may start (task-scoped credentials).
    pub policies: BTreeMap<String, crate::tasks::policy::Policy>,
    /// `[issuers.NAME]`: the systems that mint task credentials.
    pub issuers: BTreeMap<String, crate::tasks::issuers::IssuerConfig>,
    /// `[token_service.subject_issuers.NAME]`: whose subject tokens the token
    /// service accepts (checked; not yet served, see [`crate::oauth`]).
    pub subject_issuers: BTreeMap<String, crate::oauth::config::SubjectIssuerConfig>,
    /// `[token_service]` for issued tokens (issuer, signing credential,
    /// clients); `None` when not configured. Checked, not yet served.
    pub token_service: Option<crate::oauth::config::TokenServiceConfig>,
}

/// `[alert_rules]`, with its defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AlertRules {
    /// This many failed rotations in a row raise a warning.
    pub failures_warning: u32,
    /// This many raise it to critical (never when `None`).
    pub failures_critical: Option<u32>,
    /// Page when less than this is left before a credential's `max_age`.
    pub expiry_critical_before: ExpiryLead,
    /// Warn on consumers that had not acknowledged when grace ended.
    pub holdouts: bool,
    /// A condition that ends is resolved only after it stayed gone this
    /// long (a flapping one opens no second incident). Read at start.
    pub resolve_hold: Duration,
}

impl Default for AlertRules {
    fn default() -> Self {
        Self {
            failures_warning: 2,
            failures_critical: None,
            expiry_critical_before: ExpiryLead::Period,
            holdouts: true,
            resolve_hold: Duration::from_secs(120),
        }
    }
}

/// How long before `max_age` a credential is "expiring".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExpiryLead {
    /// The credential's rotation period: if the next scheduled rotation
    /// fails too, the version expires.
    Period,
    Fixed(Duration),
}

impl ExpiryLead {
    /// The lead for a credential rotated every `period` (`None`: no period,
    /// e.g. a followed credential, so no lead).
    pub fn for_period(self, period: Option<Duration>) -> Option<Duration> {
        match self {
            ExpiryLead::Period => period,
            ExpiryLead::Fixed(d) => Some(d),
        }
    }
}

impl Config {
    /// Every credential with its agent, in a stable order.
    pub fn credentials(&self) -> impl Iterator<Item = (&AgentConfig, &CredentialConfig)> {
        self.agents
            .values()
            .flat_map(|a| a.credentials.values().map(move |c| (a, c)))
    }
    pub fn credential(&self, key: &CredentialKey) -> Option<(&AgentConfig, &CredentialConfig)> {
        let agent = self.agents.get(&key.agent)?;
        let cred = agent.credentials.get(&key.credential)?;
        Some((agent, cred))
    }
    pub fn credential_count(&self) -> usize {
        self.agents.values().map(|a| a.credentials.len()).sum()
    }
}

#[derive(Debug, Clone)]
pub struct DaemonConfig {
    /// State database, local vault, audit log and key file live here.
    pub state_dir: PathBuf,
    /// Control socket (mode 0660).
    pub socket: PathBuf,
    /// Group that may use the control socket besides root and the daemon's uid.
    pub socket_group: Option<String>,
    /// The agents' socket (mode 0666): only `ack` and `ping`, each request
    /// authorized by the peer's uid (default: `agent.sock` beside `socket`).
    pub agent_socket: PathBuf,
    /// Optional HTTP listener for /metrics, /healthz, /readyz.
    pub listen: Option<SocketAddr>,
    /// File sinks may only write below one of these directories.
    pub delivery_roots: Vec<PathBuf>,
    /// Audit log path (default: `<state_dir>/audit.log`).
    pub audit_log: PathBuf,
    /// The audit key (keys the audit chain), outside the state directory and
    /// the audit log's directory. `None`: the systemd credential
    /// `keyturn-audit-key` if there is one, else the chain is plain.
    pub audit_key_file: Option<PathBuf>,
    /// The key that signs follow nudges (`POST /v1/follow/nudge` on
    /// `listen`, the webhook sink's signature); `None`: no such route.
    pub follow_nudge_key_file: Option<PathBuf>,
    /// How long SIGTERM waits for in-flight steps before exiting.
    pub drain_timeout: Duration,
    /// Rotations running at once across all vaults.
    pub max_concurrent_rotations: usize,
    /// Overdue rotations found at start-up are spread over this window so a
    /// restart does not stampede the vaults.
    pub catch_up_spread: Duration,
    pub retry: RetryConfig,
    /// Where task credentials are written (`<task_root>/<agent>/<task
    /// id>/<issuer>.json`); `None`: only returned to the agent that asked.
    pub task_root: Option<PathBuf>,
    /// The `aud` an agent's JWT assertion must name (`crate::auth`);
    /// default `keyturn`.
    pub assertion_audience: String,
}

/// Capped exponential backoff with jitter for failed steps (owned by the engine).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryConfig {
    pub initial_delay: Duration,
    pub max_delay: Duration,
    /// Attempts of one step before the rotation is parked as failed and
    /// retried later by the scheduler.
    pub max_attempts: u32,
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self {
            initial_delay: Duration::from_millis(500),
            max_delay: Duration::from_secs(60),
            max_attempts: 5,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TierConfig {
    pub name: String,
    /// Time from decommission to verified revocation.
    pub revocation_sla: Duration,
}

/// One `[vaults.NAME]`: its name, the engine's limit, and the plug-in's own config.
#[derive(Debug, Clone)]
pub struct VaultConfig {
    pub name: String,
    /// Rotations touching this vault at once.
    pub max_concurrent: usize,
    pub spec: VaultSpec,
}

#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub id: AgentId,
    /// The accountable human.
    pub owner: String,
    pub tenant: String,
    pub tier: String,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    /// Overrides the tier's revocation SLA.
    pub revocation_sla: Option<Duration>,
    /// Declared retired in the config (`decommissioned = { ... }`).
    pub decommissioned: Option<Decommissioned>,
    pub credentials: BTreeMap<CredentialId, CredentialConfig>,
    /// One of its ed25519 credentials whose current and previous public
    /// keys check the agent's JWT assertions (`crate::auth`).
    pub auth_key: Option<CredentialId>,
}

impl AgentConfig {
    /// A copy without its credentials, in allocations of its own: its ids
    /// are not shared with `self` either (see `crate::memory::apart`).
    pub fn copy_without_credentials(&self) -> AgentConfig {
        AgentConfig {
            id: self.id.unshared(),
            owner: self.owner.clone(),
            tenant: self.tenant.clone(),
            tier: self.tier.clone(),
            uid: self.uid,
            gid: self.gid,
            revocation_sla: self.revocation_sla,
            decommissioned: self.decommissioned.clone(),
            credentials: BTreeMap::new(),
            auth_key: self.auth_key.as_ref().map(CredentialId::unshared),
        }
    }
}

/// `decommissioned = { at, reason, by }` on an agent: the decision, as the
/// config records it. Acted on at start and reload once `at` has come.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decommissioned {
    pub at: chrono::DateTime<chrono::Utc>,
    pub reason: String,
    pub by: Option<String>,
}

impl Decommissioned {
    /// Whether the decision is in effect at `now`: `at` has come. Before,
    /// the agent is active everywhere (its credentials, tasks and tokens);
    /// from `at` on, keyturn acts on it (`crate::revocation`) and refuses
    /// it everywhere, one notion for every part.
    pub fn in_effect(&self, now: chrono::DateTime<chrono::Utc>) -> bool {
        self.at <= now
    }
}

impl Config {
    /// The revocation SLA of `agent`: its own, else its tier's.
    pub fn revocation_sla(&self, agent: &AgentConfig) -> Duration {
        agent
            .revocation_sla
            .or_else(|| self.tiers.get(&agent.tier).map(|t| t.revocation_sla))
            .unwrap_or(Duration::from_secs(3600))
    }
}

#[derive(Debug, Clone)]
pub struct CredentialConfig {
    pub key: CredentialKey,
    /// Names of `[vaults.NAME]` entries, at least one, no duplicates. The
    /// first is the primary: a new value is staged there first, and the
    /// others get the value read back from it.
    pub vaults: Box<[std::sync::Arc<str>]>,
    /// Where in the vault, as written (relative, `/`-separated, no `..`);
    /// `None` means the default `agents/AGENT/CREDENTIAL`, built when used
    /// (a stored copy costs ~5 MB at 100k credentials). Use [`Self::vault_path`].
    pub path: Option<Box<str>>,
    pub generate: GeneratorConfig,
    pub target: TargetConfig,
    pub schedule: ScheduleSpec,
    pub jitter: Duration,
    /// How long the previous version stays valid after delivery.
    pub grace: Duration,
    pub deliver: Vec<SinkConfig>,
    /// `mode = "follow"`: the poll interval. This keyturn does not rotate
    /// the credential; it delivers each new current version it finds in the
    /// vault (`rotation::follow`). `schedule` is then unused.
    pub follow: Option<Duration>,
    /// The oldest the current version may be before it counts as expired
    /// (an alert; see [`AlertRules`]). On a followed credential, counted
    /// from when this keyturn delivered the version.
    pub max_age: Option<Duration>,
}

impl CredentialConfig {
    /// Where in the vault the credential lives.
    pub fn vault_path(&self) -> std::borrow::Cow<'_, str> {
        vault_path(&self.key, self.path.as_deref())
    }

    /// The vault names for status and messages: `bao` or `bao+aws`.
    pub fn vault_label(&self) -> String {
        self.vaults.join("+")
    }

    /// The longest time between two scheduled rotations (an interval, or
    /// the widest gap of a cron expression), with the jitter that can
    /// delay a cron rotation; `None` for a followed credential.
    pub fn rotation_period(&self) -> Option<Duration> {
        if self.follow.is_some() {
            return None;
        }
        rotation_period(&self.schedule, self.jitter)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GeneratorConfig {
    Password {
        length: usize,
        classes: CharClasses,
    },
    RandomBytes {
        /// Bytes of randomness before encoding.
        length: usize,
        encoding: ByteEncoding,
    },
    ApiKey {
        /// e.g. `kt_live_`; the random part follows it.
        prefix: String,
        /// Characters of the random part (base62).
        length: usize,
    },
    Ed25519,
}

/// The character classes a password draws from (at least one is on).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CharClasses {
    pub lowercase: bool,
    pub uppercase: bool,
    pub digits: bool,
    pub symbols: bool,
}

impl CharClasses {
    pub fn any(&self) -> bool {
        self.lowercase || self.uppercase || self.digits || self.symbols
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ByteEncoding {
    Hex,
    Base64Url,
}

/// Where in the vault credential `key` lives: `path` as written, or the
/// default `agents/AGENT/CREDENTIAL`.
pub fn vault_path<'a>(key: &CredentialKey, path: Option<&'a str>) -> std::borrow::Cow<'a, str> {
    match path {
        Some(p) => std::borrow::Cow::Borrowed(p),
        None => std::borrow::Cow::Owned(format!("agents/{}/{}", key.agent, key.credential)),
    }
}

/// The longest time between two rotations on `schedule`: an interval (its
/// jitter only makes it shorter), or the widest gap of a cron expression
/// plus the jitter that may delay each firing.
pub fn rotation_period(schedule: &ScheduleSpec, jitter: Duration) -> Option<Duration> {
    match schedule {
        ScheduleSpec::Every(d) => Some(*d),
        ScheduleSpec::Cron(c) => c.max_period.map(|p| p.saturating_add(jitter)),
    }
}

/// Resolves a possibly relative path in the config against the config file's directory.
pub fn resolve_relative(config_file: &Path, p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        config_file.parent().unwrap_or(Path::new(".")).join(p)
    }
}
