//! Pure validation: [`RawConfig`] → [`Config`], or every problem found.
//!
//! Nothing here touches the file system or the environment; the caller hands
//! in the (absolute) directory relative paths resolve against. Each problem is
//! an [`Issue`] naming a TOML path; [`super::load`] turns the path into a
//! line and column by walking the parsed document, so this module never deals
//! with spans.
//!
//! Validation keeps going after a problem: an operator fixing a config wants
//! the whole list at once, not one error per `keyturn check` run.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use super::raw::{
    Parsed, RawAgent, RawAgentEntry, RawCredential, RawDaemon, RawEncoding, RawGenerator,
};
use super::{
    AgentConfig, AlertRules, ByteEncoding, CharClasses, Config, CredentialConfig, DaemonConfig,
    ExpiryLead, GeneratorConfig, RetryConfig, TierConfig, VaultConfig, resolve_relative,
};
use crate::model::{AgentId, CredentialId, CredentialKey, MAX_ID_LEN, validate_id};
use crate::schedule::ScheduleSpec;
use crate::targets::TargetConfig;

use super::raw::RawConfig;

mod location;
#[cfg(test)]
mod tests;
mod unique;

pub use location::{Anchor, Issue, Loc, Seg, TomlPath};
use unique::*;
pub use unique::{SinkScope, VaultScope};

/// What validation needs from outside the document.
#[derive(Debug, Clone)]
pub struct Context {
    /// The config file (absolute), recorded in [`Config::source`].
    pub source: PathBuf,
}

impl Context {
    /// Relative paths in the file resolve against the file's directory, and
    /// are normalised lexically so that delivery-root checks compare like
    /// with like.
    fn resolve(&self, p: &str) -> PathBuf {
        self.resolve_path(Path::new(p))
    }

    fn resolve_path(&self, p: &Path) -> PathBuf {
        normalize(&resolve_relative(&self.source, p))
    }
}

/// A duration setting's value once validated: `default` when unset (a
/// plug-in reads its settings through this, after `check` accepted them).
pub fn duration_value(text: Option<&str>, default: Duration) -> Duration {
    text.and_then(|t| humantime::parse_duration(t.trim()).ok())
        .unwrap_or(default)
}

/// Built-in tiers, used when the file has no `[tiers]` table.
pub const DEFAULT_TIERS: &[(&str, Duration)] = &[
    ("critical", Duration::from_secs(15 * 60)),
    ("high", Duration::from_secs(3600)),
    ("medium", Duration::from_secs(4 * 3600)),
    ("low", Duration::from_secs(24 * 3600)),
];

pub const DEFAULT_SOCKET: &str = "/run/keyturn/control.sock";
pub const DEFAULT_AGENT_SOCKET: &str = "/run/keyturn/agent.sock";
pub const DEFAULT_STATE_DIR: &str = "/var/lib/keyturn";
const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
const DEFAULT_MAX_CONCURRENT_ROTATIONS: usize = 64;
const DEFAULT_CATCH_UP_SPREAD: Duration = Duration::from_secs(300);
const DEFAULT_VAULT_MAX_CONCURRENT: usize = 16;
const DEFAULT_GRACE: Duration = Duration::from_secs(15 * 60);
/// `poll` of a followed credential: its default and its floor.
const DEFAULT_POLL: Duration = Duration::from_secs(5);
const MIN_POLL: Duration = Duration::from_secs(1);
const MIN_PASSWORD_LEN: usize = 8;
const MAX_GENERATED_LEN: usize = 4096;
const MIN_RANDOM_LEN: usize = 16;
/// What a vault path is made of (said in every message about one).
pub const VAULT_PATH_CHARS: &str = "letters, digits, `.`, `_`, `-` and `/` (ASCII only)";
/// The first segment of the vaults' pending slots (OpenBao's
/// `keyturn-pending/<path>`): no credential's own path may start there, or
/// its value would be another credential's pending value. Reserved in
/// every vault, so a credential can move between vaults unchanged.
pub const RESERVED_VAULT_PREFIX: &str = crate::vaults::hashicorp::PENDING_PREFIX;

/// Whether a duration may be zero.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Zero {
    Allowed,
    Rejected,
}

/// Validates a whole config. Returns the typed config only when there is no
/// issue at all.
pub fn validate(raw: &RawConfig, ctx: &Context) -> Result<Config, Vec<Issue>> {
    let mut v = Validator {
        ctx,
        issues: Vec::new(),
        durations: DurationCache::default(),
    };
    let config = v.config(raw);
    if v.issues.is_empty() {
        Ok(config)
    } else {
        Err(v.issues)
    }
}

/// Runs `check` with the validator of a config file at `source`, as a
/// plug-in's check runs inside [`validate`], and returns what it reported:
/// for tests of a plug-in kind whose table the file does not read yet.
#[cfg(test)]
pub(crate) fn issues_of(source: &Path, check: impl FnOnce(&mut Validator<'_>)) -> Vec<Issue> {
    let ctx = Context {
        source: source.to_path_buf(),
    };
    let mut v = Validator::for_section(&ctx);
    check(&mut v);
    v.into_issues()
}

/// The validation API plug-ins use: report located issues, read the common
/// kinds of setting (durations, paths, URLs) with the same messages
/// everywhere. A plug-in's `check` reports through it and completes its own
/// config in place (relative paths resolved, defaults filled in).
pub struct Validator<'a> {
    ctx: &'a Context,
    issues: Vec<Issue>,
    /// Durations already parsed. A big file repeats a handful of texts
    /// (`every = "24h"`, `grace = "1h"`) for every credential.
    durations: DurationCache,
}

/// The last few distinct duration texts that parsed, with their value.
#[derive(Default)]
struct DurationCache(Vec<(Box<str>, Duration)>);

impl DurationCache {
    /// Enough for the distinct durations of any config written by hand or
    /// by a template; past it, texts are simply parsed each time.
    const CAPACITY: usize = 16;

    fn get(&self, text: &str) -> Option<Duration> {
        self.0.iter().find(|(t, _)| **t == *text).map(|(_, d)| *d)
    }

    fn put(&mut self, text: &str, d: Duration) {
        if self.0.len() < Self::CAPACITY {
            self.0.push((text.into(), d));
        }
    }
}

/// What credential validation needs to know about the rest of the file.
struct Scope<'a> {
    /// Every `[vaults.NAME]` name, with one shared copy that credentials point to.
    vault_names: BTreeMap<&'a str, std::sync::Arc<str>>,
    tier_names: Vec<String>,
    /// `None` when `[daemon]` failed to deserialize: root checks are skipped
    /// rather than reporting every sink against roots we do not know.
    delivery_roots: Option<Vec<PathBuf>>,
    /// Every `[agents.NAME]` table, by name.
    agent_names: HashMap<&'a str, &'a super::raw::RawAgentEntry>,
    /// Vault name → its `change_index` path (no credential may live there).
    change_indexes: HashMap<String, String>,
    /// `None` when `[alert_rules]` failed to deserialize: `max_age` is then
    /// checked against the schedule only.
    alert_rules: Option<AlertRules>,
}

#[cfg(test)]
impl<'a> Validator<'a> {
    /// A validator for one section checked on its own: plug-in unit tests,
    /// and sections the loader does not read yet (`[issuers.NAME]`).
    pub(crate) fn for_section(ctx: &'a Context) -> Self {
        Validator {
            ctx,
            issues: Vec::new(),
            durations: DurationCache::default(),
        }
    }

    /// Every issue reported so far.
    pub(crate) fn into_issues(self) -> Vec<Issue> {
        self.issues
    }
}

#[cfg(test)]
impl Validator<'_> {
    /// Runs `check` with a validator for a config file at
    /// `/etc/keyturn/keyturn.toml`: every issue it reported. For the tests
    /// of a plug-in's own checks (a config struct, an issuer's grant).
    pub(crate) fn issues_of(check: impl FnOnce(&mut Validator<'_>)) -> Vec<Issue> {
        issues_of(Path::new("/etc/keyturn/keyturn.toml"), check)
    }
}

impl Validator<'_> {
    /// Reports a problem with a value.
    pub(crate) fn err(&mut self, at: Loc<'_>, message: impl Into<String>) {
        self.issues.push(Issue::at(at.path(), message));
    }

    /// How many issues were reported so far (a section is kept only when
    /// checking it reported none).
    pub(crate) fn issue_count(&self) -> usize {
        self.issues.len()
    }

    /// Reports a problem with a key (unknown, missing next to it, ...).
    pub(crate) fn err_key(&mut self, at: Loc<'_>, message: impl Into<String>) {
        self.issues.push(Issue::at_key(at.path(), message));
    }

    fn config(&mut self, raw: &RawConfig) -> Config {
        let daemon_path = Loc::top("daemon");
        let (raw_daemon, daemon_ok) = match &raw.daemon {
            None => (RawDaemon::default(), true),
            Some(Parsed::Ok(d)) => (d.clone(), true),
            Some(Parsed::Invalid) => (RawDaemon::default(), false),
        };
        let daemon = self.daemon(&daemon_path, &raw_daemon);

        let tiers = self.tiers(raw);
        let vaults = self.vaults(raw, &daemon.state_dir);
        let alert_rules = self.alert_rules(raw);

        let scope = Scope {
            vault_names: raw
                .vaults
                .keys()
                .map(|n| (n.as_str(), std::sync::Arc::from(n.as_str())))
                .collect(),
            tier_names: match &raw.tiers {
                Some(t) => t.keys().cloned().collect(),
                None => DEFAULT_TIERS.iter().map(|(n, _)| n.to_string()).collect(),
            },
            delivery_roots: daemon_ok.then(|| daemon.delivery_roots.clone()),
            agent_names: raw.agents.iter().map(|(n, a)| (n.as_str(), a)).collect(),
            change_indexes: vaults
                .iter()
                .filter_map(|(n, v)| Some((n.clone(), v.spec.plugin().change_index()?.to_owned())))
                .collect(),
            alert_rules: match &raw.alert_rules {
                Some(Parsed::Invalid) => None,
                _ => Some(alert_rules),
            },
        };

        self.task_root_beside_agents(&daemon_path, &daemon, &scope);
        let mut agents = BTreeMap::new();
        // Cross-credential uniqueness: first place each was seen.
        let mut cross = CrossChecks {
            vault_paths: FirstSeen::default(),
            deliveries: Deliveries::default(),
        };

        let agents_loc = Loc::top("agents");
        for (agent_name, entry) in &raw.agents {
            let agent_path = agents_loc.key(agent_name);
            let creds_loc = agent_path.key("credentials");
            let agent_id = self
                .id(&agent_path, "agent", agent_name)
                .then(|| AgentId::new(agent_name.as_str()).ok())
                .flatten();
            let raw_agent = entry.agent.ok();
            if let Some(a) = raw_agent {
                self.agent_fields(&agent_path, a, &scope);
            }
            let mut credentials = BTreeMap::new();
            for (cred_name, raw_cred) in &entry.credentials {
                let cred_path = creds_loc.key(cred_name);
                let cred_id = self
                    .id(&cred_path, "credential", cred_name)
                    .then(|| CredentialId::new(cred_name.as_str()).ok())
                    .flatten();
                let Parsed::Ok(raw_cred) = raw_cred else {
                    continue;
                };
                let key = agent_id
                    .clone()
                    .zip(cred_id)
                    .map(|(a, c)| CredentialKey::new(a, c));
                let cred = self.credential(
                    &cred_path, key, agent_name, cred_name, raw_cred, &scope, &mut cross,
                );
                if let Some(cred) = cred {
                    credentials.insert(cred.key.credential.clone(), cred);
                }
            }
            let auth_key = raw_agent.and_then(|a| {
                self.auth_key(&agent_path, agent_name, a.auth_key.as_deref()?, entry, raw)
            });
            if let (Some(id), Some(a)) = (agent_id, raw_agent) {
                let (revocation_sla, decommissioned) = self.agent_lifecycle(&agent_path, a);
                agents.insert(
                    id.clone(),
                    AgentConfig {
                        id,
                        owner: a.owner.trim().to_owned(),
                        tenant: a.tenant.trim().to_owned(),
                        tier: a.tier.clone(),
                        uid: a.uid,
                        gid: a.gid,
                        revocation_sla,
                        decommissioned,
                        credentials,
                        auth_key,
                    },
                );
            }
        }

        let alerts = self.alerts(raw, &scope.tier_names);
        let issuers = self.issuers(raw);
        let policies = self.policies(raw, &issuers);
        let subject_issuers = self.subject_issuers(raw);
        let settings = match &raw.token_settings {
            Some(Parsed::Ok(s)) => Some(s),
            _ => None,
        };
        let token_service = crate::oauth::config::check_token_service(
            self,
            settings,
            &raw.token_clients,
            &raw.token_tenants,
            &agents,
        );
        Config {
            source: self.ctx.source.clone(),
            daemon,
            tiers,
            vaults,
            agents,
            alerts,
            alert_rules,
            policies,
            issuers,
            subject_issuers,
            token_service,
        }
    }

    /// `[token_service.subject_issuers.NAME]`: each checked by the oauth
    /// module; two may not claim the same `iss` (a token would have two sets
    /// of keys and rules).
    fn subject_issuers(
        &mut self,
        raw: &RawConfig,
    ) -> BTreeMap<String, crate::oauth::config::SubjectIssuerConfig> {
        let mut out = BTreeMap::new();
        let top = Loc::top("token_service");
        let all = top.key("subject_issuers");
        let mut seen: HashMap<&str, &str> = HashMap::new();
        for (name, issuer) in &raw.subject_issuers {
            let p = all.key(name);
            let id_ok = self.id(&p, "subject issuer", name);
            let Parsed::Ok(issuer) = issuer else { continue };
            if let Some(first) = seen.get(issuer.issuer.as_str()).copied() {
                self.err(
                    p.key("issuer"),
                    format!(
                        "issuer `{}` is already configured in [token_service.subject_issuers.{first}]: one table per `iss`",
                        issuer.issuer
                    ),
                );
                continue;
            }
            seen.insert(issuer.issuer.as_str(), name.as_str());
            if let Some(checked) = issuer.check(self, &p, name)
                && id_ok
            {
                out.insert(name.clone(), checked);
            }
        }
        out
    }

    /// `[issuers.NAME]`: each checked by its plug-in.
    fn issuers(
        &mut self,
        raw: &RawConfig,
    ) -> BTreeMap<String, crate::tasks::issuers::IssuerConfig> {
        let mut out = BTreeMap::new();
        let top = Loc::top("issuers");
        for (name, issuer) in &raw.issuers {
            let p = top.key(name);
            let id_ok = self.id(&p, "issuer", name);
            let Parsed::Ok(issuer) = issuer else { continue };
            let before = self.issues.len();
            let mut issuer = issuer.clone();
            issuer.plugin_mut().check(self, p);
            if id_ok && self.issues.len() == before {
                out.insert(name.clone(), issuer);
            }
        }
        out
    }

    /// `[policies.NAME]`: checked by the tasks module, each grant by its issuer.
    fn policies(
        &mut self,
        raw: &RawConfig,
        issuers: &BTreeMap<String, crate::tasks::issuers::IssuerConfig>,
    ) -> BTreeMap<String, crate::tasks::policy::Policy> {
        let agents: std::collections::BTreeSet<&str> =
            raw.agents.iter().map(|(n, _)| n.as_str()).collect();
        let policies = raw
            .policies
            .iter()
            .map(|(n, p)| (n.clone(), p.ok()))
            .collect();
        let names: Vec<&str> = raw.issuers.keys().map(String::as_str).collect();
        let lookup = |name: &str| -> Option<&dyn crate::tasks::issuers::IssuerPlugin> {
            issuers.get(name).map(|i| i.plugin())
        };
        // An issuer that failed its own check is still known by name: its
        // grants are not reported as naming an unknown issuer.
        let invalid = |name: &str| raw.issuers.contains_key(name) && !issuers.contains_key(name);
        let scope = crate::tasks::policy::IssuerScope {
            lookup: &lookup,
            names: &names,
            invalid: &invalid,
        };
        crate::tasks::policy::check_all(&policies, &agents, &scope, self)
    }

    /// `[alert_rules]`: every key optional.
    fn alert_rules(&mut self, raw: &RawConfig) -> AlertRules {
        let default = AlertRules::default();
        let Some(Parsed::Ok(r)) = &raw.alert_rules else {
            return default;
        };
        let p = Loc::top("alert_rules");
        let failures_warning = r.failures_warning.unwrap_or(default.failures_warning);
        if failures_warning == 0 {
            self.err(
                p.key("failures_warning"),
                "failures_warning must be at least 1 (the number of failed rotations in a row that raises a warning)",
            );
        }
        if let Some(critical) = r.failures_critical
            && critical < failures_warning.max(1)
        {
            self.err(
                p.key("failures_critical"),
                format!(
                    "failures_critical ({critical}) must be at least failures_warning ({failures_warning}): the page comes after the warning"
                ),
            );
        }
        let expiry_critical_before = match r.expiry_critical_before.as_deref().map(str::trim) {
            None => default.expiry_critical_before,
            Some("period") => ExpiryLead::Period,
            Some(text) => {
                let at = p.key("expiry_critical_before");
                if text.starts_with(|c: char| c.is_ascii_digit()) {
                    self.duration(at, text, Zero::Rejected)
                        .map_or(default.expiry_critical_before, ExpiryLead::Fixed)
                } else {
                    self.err(
                        at,
                        format!(
                            "invalid expiry_critical_before `{text}`: write \"period\" (the credential's rotation period) or a duration such as \"6h\""
                        ),
                    );
                    default.expiry_critical_before
                }
            }
        };
        AlertRules {
            failures_warning,
            failures_critical: r.failures_critical,
            expiry_critical_before,
            holdouts: r.holdouts.unwrap_or(default.holdouts),
            resolve_hold: r
                .resolve_hold
                .as_deref()
                .and_then(|t| self.duration(p.key("resolve_hold"), t, Zero::Allowed))
                .unwrap_or(default.resolve_hold),
        }
    }

    /// `max_age` of a credential: longer than a version lives on schedule
    /// (the period, plus grace), else the credential would always be
    /// "expired"; and longer than the period plus `expiry_critical_before`,
    /// else it would be "expiring" before its next rotation is even due.
    /// A followed credential has no schedule here: only the value is checked.
    fn max_age(
        &mut self,
        p: &Loc<'_>,
        text: &str,
        period: Option<Duration>,
        grace: Duration,
        rules: Option<&AlertRules>,
    ) -> Option<Duration> {
        let at = p.key("max_age");
        let max_age = self.duration(at, text, Zero::Rejected)?;
        let Some(period) = period else {
            return Some(max_age);
        };
        let fmt = |d: Duration| humantime::format_duration(d).to_string();
        if max_age <= period.saturating_add(grace) {
            self.err(
                at,
                format!(
                    "max_age ({}) must be longer than the rotation period ({}) plus grace ({}): a version is used that long when every rotation runs on time, so the credential would always be \"expired\"",
                    fmt(max_age),
                    fmt(period),
                    fmt(grace)
                ),
            );
            return None;
        }
        if let Some(lead) = rules.and_then(|r| r.expiry_critical_before.for_period(Some(period)))
            && max_age <= period.saturating_add(lead)
        {
            self.err(
                at,
                format!(
                    "max_age ({}) must be longer than the rotation period ({}) plus [alert_rules] expiry_critical_before ({}): otherwise less than that is left before max_age before the next rotation is even due, and a healthy credential pages every period",
                    fmt(max_age),
                    fmt(period),
                    fmt(lead)
                ),
            );
            return None;
        }
        Some(max_age)
    }

    /// `[alerts.NAME]`: each alert sink checked by its plug-in.
    fn alerts(
        &mut self,
        raw: &RawConfig,
        tiers: &[String],
    ) -> BTreeMap<String, crate::alerts::AlertSinkConfig> {
        let mut out = BTreeMap::new();
        let alerts_loc = Loc::top("alerts");
        for (name, sink) in &raw.alerts {
            let p = alerts_loc.key(name);
            let id_ok = self.id(&p, "alert sink", name);
            let Parsed::Ok(sink) = sink else { continue };
            let before = self.issues.len();
            let mut sink = sink.clone();
            sink.plugin_mut()
                .check(self, p, &crate::alerts::AlertScope { tiers });
            if id_ok && self.issues.len() == before {
                out.insert(name.clone(), sink);
            }
        }
        out
    }

    /// Checks a name against the id grammar; the key is what is wrong, so
    /// the issue points at it.
    fn id(&mut self, path: &Loc<'_>, what: &str, name: &str) -> bool {
        match validate_id(name) {
            Ok(()) => true,
            Err(e) => {
                self.err_key(
                    *path,
                    format!(
                        "invalid {what} name `{name}`: {e}; names match [a-z0-9][a-z0-9_-]* and are at most {MAX_ID_LEN} characters"
                    ),
                );
                false
            }
        }
    }

    pub(crate) fn duration(&mut self, path: Loc<'_>, text: &str, zero: Zero) -> Option<Duration> {
        let t = text.trim();
        if t.starts_with('-') {
            self.err(
                path,
                format!("negative duration `{text}`: durations must be positive"),
            );
            return None;
        }
        let parsed = match self.durations.get(t) {
            Some(d) => Ok(d),
            None => humantime::parse_duration(t).inspect(|d| self.durations.put(t, *d)),
        };
        match parsed {
            Ok(d) if d.is_zero() && zero == Zero::Rejected => {
                self.err(
                    path,
                    format!("duration `{text}` is zero: it must be greater than zero"),
                );
                None
            }
            Ok(d) => Some(d),
            Err(e) => {
                self.err(
                    path,
                    format!("invalid duration `{text}`: {e} (write e.g. \"30s\", \"15m\", \"6h\")"),
                );
                None
            }
        }
    }

    /// `timeout` of an HTTP sink: a duration between `min` and `max`, an error saying so otherwise.
    pub(crate) fn timeout_within(&mut self, p: Loc<'_>, text: &str, min: Duration, max: Duration) {
        let at = p.key("timeout");
        if let Some(d) = self.duration(at, text, Zero::Rejected)
            && !(min..=max).contains(&d)
        {
            self.err(
                at,
                format!(
                    "timeout `{text}` is out of range: it must be between {} and {}",
                    humantime::format_duration(min),
                    humantime::format_duration(max)
                ),
            );
        }
    }

    pub(crate) fn duration_or(
        &mut self,
        path: Loc<'_>,
        text: Option<&String>,
        default: Duration,
        zero: Zero,
    ) -> Duration {
        match text {
            Some(t) => self.duration(path, t, zero).unwrap_or(default),
            None => default,
        }
    }

    /// A path setting: non-empty, resolved against the config file's directory.
    /// A path setting, completed in place: non-empty, resolved against the
    /// config file's directory.
    pub(crate) fn resolve_path(&mut self, path: Loc<'_>, p: &mut PathBuf) {
        if p.as_os_str().is_empty() {
            self.err(path, "path must not be empty");
        }
        *p = self.ctx.resolve_path(p);
    }

    fn path_setting(&mut self, path: Loc<'_>, text: &str) -> PathBuf {
        if text.trim().is_empty() {
            self.err(path, "path must not be empty");
        }
        self.ctx.resolve(text)
    }

    /// `task_root` is not in an agent's directory (a directory right below
    /// a delivery root named after an agent): every agent's task
    /// directories would be made in it, where that agent may rename them.
    fn task_root_beside_agents(&mut self, p: &Loc<'_>, daemon: &DaemonConfig, scope: &Scope<'_>) {
        let Some(task_root) = &daemon.task_root else {
            return;
        };
        for r in &daemon.delivery_roots {
            if let Some(Component::Normal(first)) = task_root
                .strip_prefix(r)
                .ok()
                .and_then(|rest| rest.components().next())
                && let Some(agent) = first.to_str()
                && scope.agent_names.contains_key(agent)
            {
                self.err(
                    p.key("task_root"),
                    format!(
                        "task_root {} is in the delivery directory of agent `{agent}` ({}): every agent's task directories would be made in it; put it beside the agents' directories, e.g. \"{}\"",
                        task_root.display(),
                        r.join(agent).display(),
                        r.join("tasks").display()
                    ),
                );
                return;
            }
        }
    }

    fn daemon(&mut self, p: &Loc<'_>, d: &RawDaemon) -> DaemonConfig {
        let state_dir = match &d.state_dir {
            Some(s) => self.path_setting(p.key("state_dir"), s),
            None => PathBuf::from(DEFAULT_STATE_DIR),
        };
        let socket = match &d.socket {
            Some(s) => self.path_setting(p.key("socket"), s),
            None => PathBuf::from(DEFAULT_SOCKET),
        };
        let agent_socket = match &d.agent_socket {
            Some(s) => self.path_setting(p.key("agent_socket"), s),
            None => socket.with_file_name("agent.sock"),
        };
        if agent_socket == socket {
            self.err(
                p.key("agent_socket"),
                "agent_socket must not be the control socket: agents reach it without the socket's group",
            );
        }
        if let Some(g) = &d.socket_group
            && g.trim().is_empty()
        {
            self.err(p.key("socket_group"), "socket_group must not be empty");
        }
        let listen = d
            .listen
            .as_ref()
            .and_then(|l| match l.parse::<SocketAddr>() {
                Ok(a) => Some(a),
                Err(e) => {
                    self.err(
                        p.key("listen"),
                        format!(
                            "invalid listen address `{l}`: {e} (write e.g. \"127.0.0.1:9464\")"
                        ),
                    );
                    None
                }
            });
        let delivery_roots: Vec<PathBuf> = d
            .delivery_roots
            .iter()
            .flatten()
            .enumerate()
            .map(|(i, r)| self.path_setting(p.key("delivery_roots").index(i), r))
            .collect();
        self.roots_apart_from_state(p, &delivery_roots, &state_dir);
        let audit_log = match &d.audit_log {
            Some(s) => self.path_setting(p.key("audit_log"), s),
            None => state_dir.join("audit.log"),
        };
        let audit_key_file = d.audit_key_file.as_ref().map(|s| {
            let key = self.path_setting(p.key("audit_key_file"), s);
            self.key_apart_from_log(p, &key, &state_dir, &audit_log);
            key
        });
        let follow_nudge_key_file = d.follow_nudge_key_file.as_ref().map(|s| {
            let key = self.path_setting(p.key("follow_nudge_key_file"), s);
            if d.listen.is_none() {
                self.err(
                    p.key("follow_nudge_key_file"),
                    "follow_nudge_key_file enables POST /v1/follow/nudge on the HTTP listener, but there is no `listen` address (write e.g. listen = \"0.0.0.0:9464\")",
                );
            }
            key
        });
        let drain_timeout = self.duration_or(
            p.key("drain_timeout"),
            d.drain_timeout.as_ref(),
            DEFAULT_DRAIN_TIMEOUT,
            Zero::Rejected,
        );
        let max_concurrent_rotations = d
            .max_concurrent_rotations
            .unwrap_or(DEFAULT_MAX_CONCURRENT_ROTATIONS);
        if max_concurrent_rotations == 0 {
            self.err(
                p.key("max_concurrent_rotations"),
                "max_concurrent_rotations must be at least 1",
            );
        }
        let catch_up_spread = self.duration_or(
            p.key("catch_up_spread"),
            d.catch_up_spread.as_ref(),
            DEFAULT_CATCH_UP_SPREAD,
            Zero::Allowed,
        );
        let retry = self.retry(&p.key("retry"), d);
        let task_root = d.task_root.as_ref().map(|s| {
            let root = self.path_setting(p.key("task_root"), s);
            if let Some(r) = delivery_roots.iter().find(|r| root == **r) {
                self.err(
                    p.key("task_root"),
                    format!(
                        "task_root {} is a delivery root itself, so <task_root>/<agent> would be each agent's own delivery directory; give tasks a directory of their own in it, e.g. \"{}\"",
                        root.display(),
                        r.join("tasks").display()
                    ),
                );
            } else if !delivery_roots.iter().any(|r| root.starts_with(r)) {
                self.err(
                    p.key("task_root"),
                    format!(
                        "task_root {} is not inside a delivery root ({}); task credentials are delivered like the other files: put it under one, e.g. \"{}\"",
                        root.display(),
                        if delivery_roots.is_empty() { "none is configured".to_owned() } else { delivery_roots.iter().map(|r| r.display().to_string()).collect::<Vec<_>>().join(", ") },
                        delivery_roots.first().map(|r| r.join("tasks").display().to_string()).unwrap_or_else(|| "/run/keyturn/agents/tasks".to_owned())
                    ),
                );
            }
            root
        });
        let assertion_audience = match &d.assertion_audience {
            Some(a) if a.trim().is_empty() || a.trim() != a => {
                self.err(
                    p.key("assertion_audience"),
                    "assertion_audience must be a non-empty name without surrounding spaces (default \"keyturn\")",
                );
                a.clone()
            }
            Some(a) => a.clone(),
            None => crate::auth::DEFAULT_AUDIENCE.to_owned(),
        };
        DaemonConfig {
            state_dir,
            socket,
            socket_group: d.socket_group.clone(),
            agent_socket,
            listen,
            delivery_roots,
            audit_log,
            audit_key_file,
            follow_nudge_key_file,
            drain_timeout,
            max_concurrent_rotations,
            catch_up_spread,
            retry,
            task_root,
            assertion_audience,
        }
    }

    /// A sink writes anything it likes below a delivery root (as root), so
    /// a root must neither hold the state directory (vault keys, vault and
    /// state databases, the audit log) nor lie inside it.
    fn roots_apart_from_state(&mut self, p: &Loc<'_>, roots: &[PathBuf], state_dir: &Path) {
        for (i, root) in roots.iter().enumerate() {
            let how = if root == state_dir {
                "the same directory"
            } else if state_dir.starts_with(root) {
                "the root contains it"
            } else if root.starts_with(state_dir) {
                "the root is inside it"
            } else {
                continue;
            };
            self.err(
                p.key("delivery_roots").index(i),
                format!(
                    "delivery root `{}` overlaps the state directory `{}` ({how}), where keyturn keeps its keys and databases; choose a delivery root outside it (e.g. /run/keyturn/agents)",
                    root.display(),
                    state_dir.display()
                ),
            );
        }
    }

    /// The audit key keys the chain against whoever can write the log and
    /// the state database: kept beside them it would protect nothing.
    fn key_apart_from_log(&mut self, p: &Loc<'_>, key: &Path, state_dir: &Path, audit_log: &Path) {
        let audit_dir = audit_log.parent().unwrap_or(Path::new("/"));
        let inside = if key.starts_with(state_dir) {
            format!("the state directory `{}`", state_dir.display())
        } else if key.starts_with(audit_dir) {
            format!("the audit log's directory `{}`", audit_dir.display())
        } else {
            return;
        };
        self.err(
            p.key("audit_key_file"),
            format!(
                "audit_key_file `{}` is inside {inside}: whoever can write the audit log and the state database could read or replace it, and the key is there to stop them; keep it elsewhere (e.g. /etc/keyturn/audit.key) or pass it as the systemd credential keyturn-audit-key (LoadCredentialEncrypted=)",
                key.display()
            ),
        );
    }

    fn retry(&mut self, p: &Loc<'_>, d: &RawDaemon) -> RetryConfig {
        let default = RetryConfig::default();
        let Some(r) = &d.retry else {
            return default;
        };
        let initial_delay = self.duration_or(
            p.key("initial_delay"),
            r.initial_delay.as_ref(),
            default.initial_delay,
            Zero::Rejected,
        );
        let max_delay = self.duration_or(
            p.key("max_delay"),
            r.max_delay.as_ref(),
            default.max_delay,
            Zero::Rejected,
        );
        if initial_delay > max_delay {
            self.err(
                p.key(if r.max_delay.is_some() {
                    "max_delay"
                } else {
                    "initial_delay"
                }),
                format!(
                    "initial_delay ({}) is longer than max_delay ({})",
                    humantime::format_duration(initial_delay),
                    humantime::format_duration(max_delay)
                ),
            );
        }
        let max_attempts = r.max_attempts.unwrap_or(default.max_attempts);
        if max_attempts == 0 {
            self.err(p.key("max_attempts"), "max_attempts must be at least 1");
        }
        RetryConfig {
            initial_delay,
            max_delay,
            max_attempts,
        }
    }

    fn tiers(&mut self, raw: &RawConfig) -> BTreeMap<String, TierConfig> {
        let Some(tiers) = &raw.tiers else {
            return DEFAULT_TIERS
                .iter()
                .map(|(name, sla)| {
                    let name = name.to_string();
                    let t = TierConfig {
                        name: name.clone(),
                        revocation_sla: *sla,
                    };
                    (name, t)
                })
                .collect();
        };
        let mut out = BTreeMap::new();
        for (name, tier) in tiers {
            let tiers_loc = Loc::top("tiers");
            let p = tiers_loc.key(name);
            let id_ok = self.id(&p, "tier", name);
            let Parsed::Ok(tier) = tier else { continue };
            let sla = self.duration(
                p.key("revocation_sla"),
                &tier.revocation_sla,
                Zero::Rejected,
            );
            if let (true, Some(revocation_sla)) = (id_ok, sla) {
                out.insert(
                    name.clone(),
                    TierConfig {
                        name: name.clone(),
                        revocation_sla,
                    },
                );
            }
        }
        out
    }

    fn vaults(&mut self, raw: &RawConfig, state_dir: &Path) -> BTreeMap<String, VaultConfig> {
        let mut out = BTreeMap::new();
        for (name, vault) in &raw.vaults {
            let vaults_loc = Loc::top("vaults");
            let p = vaults_loc.key(name);
            let id_ok = self.id(&p, "vault", name);
            let Parsed::Ok(vault) = vault else { continue };
            let before = self.issues.len();
            let mut spec = vault.clone();
            spec.plugin_mut()
                .check(self, p, &VaultScope { name, state_dir });
            let max_concurrent = spec
                .plugin()
                .max_concurrent()
                .unwrap_or(DEFAULT_VAULT_MAX_CONCURRENT);
            if max_concurrent == 0 {
                self.err(p.key("max_concurrent"), "max_concurrent must be at least 1");
            }
            if let Some(index) = spec.plugin().change_index() {
                self.vault_path(p.key("change_index"), index);
            }
            if id_ok && self.issues.len() == before {
                out.insert(
                    name.clone(),
                    VaultConfig {
                        name: name.clone(),
                        max_concurrent,
                        spec,
                    },
                );
            }
        }
        out
    }

    /// `timeout` of a remote vault or a target: `default` when unset, never zero.
    pub(crate) fn timeout(
        &mut self,
        p: &Loc<'_>,
        text: &Option<String>,
        default: Duration,
    ) -> Duration {
        self.duration_or(p.key("timeout"), text.as_ref(), default, Zero::Rejected)
    }

    /// An absolute URL with one of `schemes` and a host; `example` shows a good one.
    pub(crate) fn url(&mut self, p: Loc<'_>, text: &str, schemes: &[&str], example: &str) {
        let problem = match text.split_once("://") {
            None => Some("it has no scheme".to_owned()),
            Some((scheme, rest)) => {
                let host = rest.split(['/', '?', '#']).next().unwrap_or("");
                if !schemes.contains(&scheme) {
                    Some(format!("the scheme must be {}", list(schemes.iter())))
                } else if host.is_empty() {
                    Some("it has no host".to_owned())
                } else if host.contains(char::is_whitespace) {
                    Some("its host contains whitespace".to_owned())
                } else {
                    None
                }
            }
        };
        if let Some(why) = problem {
            self.err(
                p,
                format!("invalid URL `{text}`: {why} (write e.g. \"{example}\")"),
            );
        }
    }

    fn agent_fields(&mut self, p: &Loc<'_>, a: &RawAgent, scope: &Scope<'_>) {
        if a.owner.trim().is_empty() {
            self.err(
                p.key("owner"),
                "owner must not be empty: every agent needs an accountable human",
            );
        }
        if a.tenant.trim().is_empty() {
            self.err(p.key("tenant"), "tenant must not be empty");
        }
        if !scope.tier_names.contains(&a.tier) {
            self.err(
                p.key("tier"),
                format!(
                    "unknown tier `{}`; defined tiers: {}",
                    a.tier,
                    list(scope.tier_names.iter().map(String::as_str))
                ),
            );
        }
    }

    /// `auth_key = "NAME"`: one of this agent's own credentials, generated
    /// as an ed25519 keypair (its public keys check the agent's JWT
    /// assertions, see `crate::auth`).
    fn auth_key(
        &mut self,
        p: &Loc<'_>,
        agent: &str,
        name: &str,
        entry: &RawAgentEntry,
        raw: &RawConfig,
    ) -> Option<CredentialId> {
        let at = p.key("auth_key");
        let own = entry.credentials.iter().find(|(n, _)| n == name);
        let Some((_, cred)) = own else {
            let (other_agent, cred) = name.split_once('/').unwrap_or(("", name));
            let elsewhere = raw.agents.iter().find(|(a, e)| {
                a != agent
                    && (other_agent.is_empty() || a == other_agent)
                    && e.credentials.iter().any(|(n, _)| n == cred)
            });
            let message = match elsewhere {
                Some((other, _)) => format!(
                    "auth_key `{name}` is a credential of agent `{other}`: an agent authenticates with a key of its own; name one of `{agent}`'s ed25519 credentials"
                ),
                None => format!(
                    "unknown credential `{name}` for auth_key; agent `{agent}`'s credentials: {}",
                    list(entry.credentials.iter().map(|(n, _)| n.as_str()))
                ),
            };
            self.err(at, message);
            return None;
        };
        match cred {
            Parsed::Ok(c) if matches!(c.generate, RawGenerator::Ed25519 {}) => {
                CredentialId::new(name).ok()
            }
            Parsed::Ok(_) => {
                self.err(
                    at,
                    format!(
                        "auth_key `{name}` is not an ed25519 keypair: an assertion is checked with the credential's public key, so it needs generate = {{ kind = \"ed25519\" }}"
                    ),
                );
                None
            }
            // Its own error is already reported.
            Parsed::Invalid => None,
        }
    }

    /// `revocation_sla` and `decommissioned` of an agent.
    fn agent_lifecycle(
        &mut self,
        p: &Loc<'_>,
        a: &RawAgent,
    ) -> (Option<Duration>, Option<super::Decommissioned>) {
        let sla = a
            .revocation_sla
            .as_deref()
            .and_then(|t| self.duration(p.key("revocation_sla"), t, Zero::Rejected));
        let decommissioned = a.decommissioned.as_ref().and_then(|d| {
            let dp = p.key("decommissioned");
            if d.reason.trim().is_empty() {
                self.err(
                    dp.key("reason"),
                    "reason must not be empty: say why the agent is retired (it goes to the audit log)",
                );
            }
            let Some(written) = &d.at else {
                self.err(
                    dp,
                    "missing key `at`: when the agent was retired, an RFC 3339 time like \"2026-12-01T09:00:00Z\"",
                );
                return None;
            };
            let at = match chrono::DateTime::parse_from_rfc3339(written.0.trim()) {
                Ok(t) => Some(t.with_timezone(&chrono::Utc)),
                Err(e) => {
                    self.err(
                        dp.key("at"),
                        format!(
                            "invalid time `{}`: {e}; write an RFC 3339 time with its offset, e.g. \"2026-12-01T09:00:00Z\"",
                            written.0
                        ),
                    );
                    None
                }
            };
            Some(super::Decommissioned {
                at: at?,
                reason: d.reason.trim().to_owned(),
                by: d.by.as_ref().map(|b| b.trim().to_owned()).filter(|b| !b.is_empty()),
            })
        });
        (sla, decommissioned)
    }

    #[allow(clippy::too_many_arguments)]
    fn credential<'r>(
        &mut self,
        p: &Loc<'_>,
        key: Option<CredentialKey>,
        agent_name: &'r str,
        cred_name: &'r str,
        c: &'r RawCredential,
        scope: &Scope<'r>,
        cross: &mut CrossChecks<'r>,
    ) -> Option<CredentialConfig> {
        let this = CredRef {
            agent: agent_name,
            cred: cred_name,
        };
        let before = self.issues.len();

        let mut vaults: Vec<std::sync::Arc<str>> = Vec::with_capacity(c.vault.0.len());
        let vp = p.key("vault");
        if c.vault.0.is_empty() {
            self.err(
                vp,
                "no vault named: write `vault = \"NAME\"` or `vault = [\"NAME\", ...]`",
            );
        }
        for (i, name) in c.vault.0.iter().enumerate() {
            let at = if c.vault.0.len() == 1 {
                vp
            } else {
                vp.index(i)
            };
            match scope.vault_names.get(name.as_str()) {
                Some(shared) if vaults.contains(shared) => {
                    self.err(at, format!("vault `{name}` is listed twice"));
                }
                Some(shared) => vaults.push(shared.clone()),
                None => {
                    let defined = if scope.vault_names.is_empty() {
                        "no vaults are defined (add a [vaults.NAME] table)".to_owned()
                    } else {
                        format!(
                            "defined vaults: {}",
                            list(scope.vault_names.keys().copied())
                        )
                    };
                    self.err(at, format!("unknown vault `{name}`; {defined}"));
                }
            }
        }

        // The default path is not stored (CredentialConfig::vault_path
        // builds it when used); spelled out here only for a message.
        if let Some(s) = &c.path {
            self.vault_path(p.key("path"), s);
        }
        let shown_path = || match &c.path {
            Some(s) => s.clone(),
            None => format!("agents/{agent_name}/{cred_name}"),
        };
        let here = if c.path.is_some() { p.key("path") } else { *p };
        for vault in &vaults {
            if scope
                .change_indexes
                .get(&**vault)
                .is_some_and(|i| *i == shown_path())
            {
                self.err(
                    here,
                    format!(
                        "vault path `{}` is the change_index of vault `{vault}`: keyturn writes its index there; use another path",
                        shown_path()
                    ),
                );
            }
            // The scope's own copy of the name lives as long as the raw file,
            // so the map can borrow it instead of copying.
            let Some((&vault, _)) = scope.vault_names.get_key_value(&**vault) else {
                continue;
            };
            let seen = VaultPathSeen {
                vault,
                cred: this,
                written: c.path.as_deref(),
            };
            if let Some(first) = cross
                .vault_paths
                .first_or_insert(seen.hash(), seen, |a, b| {
                    a.vault == b.vault && a.path_parts().concat_eq(&b.path_parts())
                })
            {
                let first = first.path();
                let mut issue = Issue::at(
                    here.path(),
                    format!(
                        "duplicate vault path: `{}` in vault `{vault}` is also used by `{first}`",
                        shown_path()
                    ),
                );
                issue.related = Some(first);
                self.issues.push(issue);
            }
        }

        let generate = self.generator(&p.key("generate"), &c.generate);
        let target = match &c.target {
            None => TargetConfig::none(),
            Some(t) => {
                let mut t = t.clone();
                t.plugin_mut().check(self, p.key("target"));
                t
            }
        };

        let follow = self.follow(p, c);
        let schedule = match (&c.schedule, &c.every) {
            // A followed credential is rotated by another keyturn: no
            // schedule here (`follow` reported one that is set).
            _ if follow.is_some() => Some(ScheduleSpec::Every(Duration::MAX)),
            (Some(_), Some(_)) => {
                self.err(
                    p.key("every"),
                    "both `schedule` and `every` are set; use exactly one of them",
                );
                None
            }
            (None, None) => {
                self.err_key(
                    *p,
                    "neither `schedule` nor `every` is set; use exactly one of them (e.g. schedule = \"0 */6 * * *\" or every = \"6h\")",
                );
                None
            }
            (Some(cron), None) => match ScheduleSpec::parse_cron(cron) {
                Ok(s) => Some(s),
                Err(reason) => {
                    self.err(
                        p.key("schedule"),
                        format!("bad cron schedule: {}", one_line(&reason)),
                    );
                    None
                }
            },
            (None, Some(every)) => self
                .duration(p.key("every"), every, Zero::Rejected)
                .map(ScheduleSpec::Every),
        };
        let jitter = self.duration_or(
            p.key("jitter"),
            c.jitter.as_ref(),
            Duration::ZERO,
            Zero::Allowed,
        );
        if let Some(period) = schedule.as_ref().and_then(ScheduleSpec::min_period)
            && !jitter.is_zero()
            && jitter >= period
        {
            self.err(
                p.key("jitter"),
                format!(
                    "jitter ({}) must be shorter than the schedule's shortest period ({})",
                    humantime::format_duration(jitter),
                    humantime::format_duration(period)
                ),
            );
        }
        // The previous version is retired when the next rotation starts at
        // the latest, so a grace longer than the shortest gap between two
        // rotations would be cut short (and `expires_hint` would promise
        // more than that): refused when written, and the default is no
        // longer than that gap. A followed credential has no schedule here.
        let shortest = schedule
            .as_ref()
            .filter(|_| follow.is_none())
            .and_then(ScheduleSpec::min_period);
        let grace = match (&c.grace, shortest) {
            (Some(text), _) => {
                let grace = self.duration(p.key("grace"), text, Zero::Allowed);
                if let (Some(grace), Some(period)) = (grace, shortest)
                    && grace > period
                {
                    let (grace, period) = (
                        humantime::format_duration(grace),
                        humantime::format_duration(period),
                    );
                    let gap = if matches!(schedule, Some(ScheduleSpec::Cron(_))) {
                        ", the shortest gap between two firings of the schedule"
                    } else {
                        ""
                    };
                    self.err(
                        p.key("grace"),
                        format!(
                            "grace ({grace}) is longer than the rotation period ({period}{gap}): the previous version is retired when the next rotation starts, at the latest, so it would stay valid only {period}, not {grace}; set grace to at most {period}, or rotate less often"
                        ),
                    );
                }
                grace.unwrap_or(DEFAULT_GRACE)
            }
            (None, Some(period)) => DEFAULT_GRACE.min(period),
            (None, None) => DEFAULT_GRACE,
        };

        let max_age = c.max_age.as_ref().and_then(|text| {
            // What a version lives on schedule: the widest gap between two
            // rotations (a cron rotation may also come `jitter` late).
            let period = match (&schedule, &follow) {
                (Some(s), None) => super::rotation_period(s, jitter),
                _ => None,
            };
            self.max_age(p, text, period, grace, scope.alert_rules.as_ref())
        });

        let sinks = c.deliver.as_deref().unwrap_or_default();
        let mut deliver = Vec::with_capacity(sinks.len());
        let deliver_loc = p.key("deliver");
        for (i, sink) in sinks.iter().enumerate() {
            let sink_before = self.issues.len();
            let mut sink = sink.clone();
            let mut sink_scope = SinkScope {
                credential: cred_name,
                agent: agent_name,
                keypair: matches!(c.generate, RawGenerator::Ed25519 {}),
                agent_names: &scope.agent_names,
                roots: scope.delivery_roots.as_deref(),
                at: SinkRef {
                    cred: this,
                    index: i,
                },
                claims: &mut cross.deliveries,
            };
            sink.plugin_mut()
                .check(self, deliver_loc.index(i), &mut sink_scope);
            if self.issues.len() == sink_before {
                deliver.push(sink);
            }
        }

        if self.issues.len() != before {
            return None;
        }
        Some(CredentialConfig {
            key: key?,
            vaults: vaults.into_boxed_slice(),
            path: c.path.as_deref().map(Box::from),
            generate: generate?,
            target,
            schedule: schedule?,
            jitter,
            grace,
            deliver,
            follow: follow.flatten(),
            max_age,
        })
    }

    /// `mode` and `poll`: `Some(Some(poll))` for `mode = "follow"`,
    /// `Some(None)` when follow mode is asked for but misconfigured (the
    /// schedule is then not checked: the error says why it must go),
    /// `None` for `mode = "rotate"` (the default).
    fn follow(&mut self, p: &Loc<'_>, c: &RawCredential) -> Option<Option<Duration>> {
        let follow = match c.mode.as_deref() {
            None | Some("rotate") => false,
            Some("follow") => true,
            Some(other) => {
                self.err(
                    p.key("mode"),
                    format!(
                        "unknown mode `{other}`; expected \"rotate\" (the default) or \"follow\""
                    ),
                );
                false
            }
        };
        if !follow {
            if c.poll.is_some() {
                self.err(
                    p.key("poll"),
                    "`poll` is only for `mode = \"follow\"`: a rotated credential has a schedule",
                );
            }
            return None;
        }
        let before = self.issues.len();
        let why =
            "this keyturn does not rotate a followed credential (another keyturn does): remove it";
        for (key, set) in [
            ("schedule", c.schedule.is_some()),
            ("every", c.every.is_some()),
            ("jitter", c.jitter.is_some()),
        ] {
            if set {
                self.err(
                    p.key(key),
                    format!("`{key}` with `mode = \"follow\"`: {why}"),
                );
            }
        }
        if c.target
            .as_ref()
            .is_some_and(|t| *t != TargetConfig::none())
        {
            self.err(
                p.key("target"),
                format!("a target with `mode = \"follow\"`: the rotating keyturn applies the value at the target; {why}"),
            );
        }
        let poll = self.duration_or(p.key("poll"), c.poll.as_ref(), DEFAULT_POLL, Zero::Rejected);
        if poll < MIN_POLL {
            self.err(
                p.key("poll"),
                format!(
                    "poll ({}) must be at least {}",
                    humantime::format_duration(poll),
                    humantime::format_duration(MIN_POLL)
                ),
            );
        }
        Some((self.issues.len() == before).then_some(poll))
    }

    /// A path inside a vault: relative, `/`-separated, no `.`/`..`/empty
    /// parts, only [`VAULT_PATH_CHARS`], and not in the pending slot's
    /// namespace ([`RESERVED_VAULT_PREFIX`]). The path ends up in URLs
    /// (OpenBao, Azure), ARNs and SQL keys, so anything a URL or a shell
    /// gives a meaning to (`?`, `#`, `%`, spaces, control bytes) is refused
    /// rather than escaped differently by each vault.
    fn vault_path(&mut self, p: Loc<'_>, s: &str) {
        let odd = s
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '/')));
        let problem = if s.is_empty() {
            Some("it is empty".to_owned())
        } else if let Some(c) = odd {
            Some(match c {
                '\0' => "it contains a NUL byte".to_owned(),
                '\n' | '\r' => "it contains a newline".to_owned(),
                ' ' => "it contains a space".to_owned(),
                c if c.is_control() => format!("it contains the control character {c:?}"),
                c => format!("it contains `{c}`"),
            })
        } else if s.starts_with('/') {
            Some("it is absolute".to_owned())
        } else if s.split('/').any(|seg| seg == "..") {
            Some("it contains `..`".to_owned())
        } else if s.split('/').any(|seg| seg == ".") {
            Some("it contains `.`".to_owned())
        } else if s.split('/').any(str::is_empty) {
            Some("it has an empty segment (`//` or a trailing `/`)".to_owned())
        } else if s.split('/').next() == Some(RESERVED_VAULT_PREFIX) {
            Some(format!(
                "`{RESERVED_VAULT_PREFIX}/` is reserved for the pending values of rotations in progress"
            ))
        } else {
            None
        };
        if let Some(why) = problem {
            self.err(
                p,
                format!(
                    "invalid vault path `{}`: {why}; a vault path is relative and `/`-separated, made of {VAULT_PATH_CHARS}, e.g. \"agents/invoice-bot/db\"",
                    s.escape_debug()
                ),
            );
        }
    }

    /// A generator's `length` (32 when unset), checked against its range;
    /// `unit` ends the message (`" bytes"`, or nothing for a password).
    fn generated_length(
        &mut self,
        p: &Loc<'_>,
        generator: &str,
        length: Option<usize>,
        min: usize,
        unit: &str,
    ) -> usize {
        let length = length.unwrap_or(32);
        if !(min..=MAX_GENERATED_LEN).contains(&length) {
            self.err(
                p.key("length"),
                format!(
                    "{generator} length {length} is out of range: it must be between {min} and {MAX_GENERATED_LEN}{unit}"
                ),
            );
        }
        length
    }

    fn generator(&mut self, p: &Loc<'_>, g: &RawGenerator) -> Option<GeneratorConfig> {
        let before = self.issues.len();
        let out = match g {
            RawGenerator::Password {
                length,
                lowercase,
                uppercase,
                digits,
                symbols,
            } => {
                let length = self.generated_length(p, "password", *length, MIN_PASSWORD_LEN, "");
                let classes = CharClasses {
                    lowercase: lowercase.unwrap_or(true),
                    uppercase: uppercase.unwrap_or(true),
                    digits: digits.unwrap_or(true),
                    symbols: symbols.unwrap_or(false),
                };
                if !classes.any() {
                    self.err(
                        *p,
                        "password has no character class enabled: enable at least one of lowercase, uppercase, digits, symbols",
                    );
                }
                GeneratorConfig::Password { length, classes }
            }
            RawGenerator::RandomBytes { length, encoding } => {
                let length =
                    self.generated_length(p, "random_bytes", *length, MIN_RANDOM_LEN, " bytes");
                GeneratorConfig::RandomBytes {
                    length,
                    encoding: match encoding.unwrap_or(RawEncoding::Hex) {
                        RawEncoding::Hex => ByteEncoding::Hex,
                        RawEncoding::Base64Url => ByteEncoding::Base64Url,
                    },
                }
            }
            RawGenerator::ApiKey { prefix, length } => {
                let length =
                    self.generated_length(p, "api_key", *length, MIN_RANDOM_LEN, " characters");
                let prefix = prefix.clone().unwrap_or_default();
                // The key ends up in env files and HTTP headers: keep the
                // prefix to characters that need no quoting anywhere.
                if !prefix
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.')
                {
                    self.err(
                        p.key("prefix"),
                        format!(
                            "invalid api_key prefix `{prefix}`: use only letters, digits, '_', '-' and '.'"
                        ),
                    );
                }
                GeneratorConfig::ApiKey { prefix, length }
            }
            RawGenerator::Ed25519 {} => GeneratorConfig::Ed25519,
        };
        (self.issues.len() == before).then_some(out)
    }
}

/// The `cron` crate explains with a caret under the expression over several
/// lines; keep the first line's context and the last line's reason.
fn one_line(reason: &str) -> String {
    let lines: Vec<&str> = reason.lines().map(str::trim).collect();
    match (lines.first(), lines.last()) {
        (Some(first), Some(last)) if lines.len() > 1 => {
            let context = first.split_once("\": ").map_or(*first, |(c, _)| c);
            format!("{context}\": {last}")
        }
        _ => reason.to_owned(),
    }
}

/// A name a shell, systemd's `EnvironmentFile=` and dotenv readers all take:
/// `[A-Z_][A-Z0-9_]*` (upper case, so it cannot clash with a shell's own).
pub fn is_env_name(s: &str) -> bool {
    let b = s.as_bytes();
    match b.first() {
        Some(f) if f.is_ascii_uppercase() || *f == b'_' => b[1..]
            .iter()
            .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || *c == b'_'),
        _ => false,
    }
}

pub(crate) fn list<'a>(items: impl Iterator<Item = impl AsRef<str> + 'a>) -> String {
    let set: BTreeSet<String> = items.map(|s| format!("`{}`", s.as_ref())).collect();
    set.into_iter().collect::<Vec<_>>().join(", ")
}

/// Removes `.` and resolves `..` lexically (without looking at the disk).
pub fn normalize(p: &Path) -> PathBuf {
    normalize_onto(PathBuf::with_capacity(p.as_os_str().len()), p)
}

/// [`normalize`] of `out` joined with `p`, when `out` is already normalised.
pub(crate) fn normalize_onto(mut out: PathBuf, p: &Path) -> PathBuf {
    for c in p.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                // `..` at the root stays at the root; a leading `..` of a
                // relative path is kept.
                let popped =
                    matches!(out.components().next_back(), Some(Component::Normal(_))) && out.pop();
                if !popped && !out.has_root() {
                    out.push("..");
                }
            }
            other => out.push(other),
        }
    }
    out
}
