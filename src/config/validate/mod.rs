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

mod credential;
mod daemon;
mod location;
mod services;
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

/// The most a `max_concurrent` setting takes: far above any useful
/// value, far below what a semaphore holds (a reload with 2^63 passed the
/// check and then panicked the daemon: black-box finding).
pub(crate) const MAX_CONCURRENCY: usize = 1_000_000;

/// Why `text` looks like a path a shell would expand: a leading `~`, or
/// `$NAME` / `${NAME}`.
fn unexpanded_reason(text: &str) -> Option<&'static str> {
    if text.starts_with('~') {
        return Some("starts with `~`");
    }
    let bytes = text.as_bytes();
    let variable = bytes
        .windows(2)
        .any(|w| w[0] == b'$' && (w[1] == b'{' || w[1] == b'_' || w[1].is_ascii_uppercase()));
    variable.then_some("names an environment variable (`$NAME`)")
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
/// The shortest rotation period (`every`, or the shortest gap between two
/// firings of `schedule`): below it a typo (`"1ms"` for `"1m"`) would
/// rotate hundreds of times a second and fill the audit log.
const MIN_PERIOD: Duration = Duration::from_secs(1);
const MIN_PASSWORD_LEN: usize = 8;
const MAX_GENERATED_LEN: usize = 4096;
/// The longest duration a config may give.
const MAX_DURATION: Duration = Duration::from_secs(100 * 365 * 86_400);
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
    let (config, issues) = validate_all(raw, ctx);
    if issues.is_empty() {
        Ok(config)
    } else {
        Err(issues)
    }
}

/// [`validate`], but the config as far as it could be read is returned
/// beside the issues (a setting with an issue holds a default or a
/// placeholder): for the host checks of the settings without one.
pub fn validate_all(raw: &RawConfig, ctx: &Context) -> (Config, Vec<Issue>) {
    let mut v = Validator {
        ctx,
        issues: Vec::new(),
        durations: DurationCache::default(),
    };
    let config = v.config(raw);
    (config, v.issues)
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
    /// The names of the `local` vaults (no other keyturn writes them, so
    /// nothing there can be followed).
    local_vaults: Vec<String>,
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
            Some(Parsed::Ok(d)) => (d.clone(), !raw.taken_out("daemon.delivery_roots")),
            Some(Parsed::Invalid) => (RawDaemon::default(), false),
        };
        let daemon = self.daemon(&daemon_path, &raw_daemon);

        let tiers = self.tiers(raw);
        let vaults = self.vaults(raw, &daemon);
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
            local_vaults: vaults
                .iter()
                .filter(|(_, v)| matches!(v.spec, crate::vaults::VaultSpec::Local(_)))
                .map(|(n, _)| n.clone())
                .collect(),
            alert_rules: match &raw.alert_rules {
                Some(Parsed::Invalid) => None,
                _ if raw.taken_out("alert_rules") => None,
                _ => Some(alert_rules),
            },
        };

        self.task_root_beside_agents(&daemon_path, &daemon, &scope);
        let mut agents = BTreeMap::new();
        // Cross-credential uniqueness: first place each was seen.
        let mut cross = CrossChecks {
            vault_paths: FirstSeen::default(),
            deliveries: Deliveries::default(),
            target_roles: HashMap::new(),
        };

        let agents_loc = Loc::top("agents");
        for (agent_name, entry) in &raw.agents {
            let agent_path = agents_loc.key(agent_name);
            let creds_loc = agent_path.key("credentials");
            let mut agent_id = self
                .id(&agent_path, "agent", agent_name)
                .then(|| AgentId::new(agent_name.as_str()).ok())
                .flatten();
            // `keyturn rotate all` means every credential: an agent of
            // that name could never be selected on its own.
            if agent_name == "all" {
                self.err_key(
                    agent_path,
                    "`all` cannot name an agent: `keyturn rotate all` selects every credential; choose another name",
                );
                agent_id = None;
            }
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
        let shared = cross.deliveries.shared_agent_dirs();
        self.issues.extend(shared);

        let alerts = self.alerts(raw, &scope.tier_names);
        let issuers = self.issuers(raw);
        let policies = self.policies(raw, &issuers);
        let subject_issuers = self.subject_issuers(raw);
        let settings = match &raw.token_settings {
            Some(Parsed::Ok(s)) => Some(s),
            _ => None,
        };
        // The tenants subjects can be of: those of the subject issuers
        // (unknown while one of them does not read, or none is configured
        // yet).
        let subject_tenants: Option<std::collections::BTreeSet<&str>> =
            (!subject_issuers.is_empty() && subject_issuers.len() == raw.subject_issuers.len())
                .then(|| {
                    subject_issuers
                        .values()
                        .map(|i| i.tenant.as_str())
                        .collect()
                });
        let token_service = crate::oauth::config::check_token_service(
            self,
            settings,
            &raw.token_clients,
            &raw.token_tenants,
            &agents,
            subject_tenants.as_ref(),
        );
        if let Some(ts) = &token_service {
            self.token_service_beside(&daemon, ts, raw);
        }
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
            // Past this no date can be computed from it (and nothing would
            // ever happen): a typo, not a schedule.
            Ok(d) if d > MAX_DURATION => {
                self.err(
                    path,
                    format!("duration `{text}` is over 100 years: write a shorter one"),
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
        self.unexpanded(path, &p.to_string_lossy());
        *p = self.ctx.resolve_path(p);
    }

    /// A path written as a shell would expand it (`~/keys`, `$HOME/keys`,
    /// `${STATE}/db`): keyturn takes paths as written, so it would use a
    /// directory named `~` or `$HOME` beside the config (black-box
    /// finding). Refused, saying what to write instead; true when it was.
    pub(crate) fn unexpanded(&mut self, path: Loc<'_>, text: &str) -> bool {
        let Some(why) = unexpanded_reason(text) else {
            return false;
        };
        self.err(
            path,
            format!("path `{text}` {why}: keyturn does not expand it (no shell reads the config); write the absolute path"),
        );
        true
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

    fn vaults(&mut self, raw: &RawConfig, daemon: &DaemonConfig) -> BTreeMap<String, VaultConfig> {
        let state_dir = &daemon.state_dir;
        let mut out = BTreeMap::new();
        // The directories of the vaults that have one (local vaults), each
        // with the vault it is of.
        let mut dirs: Vec<(PathBuf, &str)> = Vec::new();
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
            } else if max_concurrent > MAX_CONCURRENCY {
                self.err(
                    p.key("max_concurrent"),
                    format!("max_concurrent is at most {MAX_CONCURRENCY}"),
                );
            }
            if let Some(index) = spec.plugin().change_index() {
                self.vault_path(p.key("change_index"), index);
            }
            if let Some(dir) = spec.plugin().data_dir() {
                self.vault_dir_apart(p, name, dir, &dirs, daemon);
                dirs.push((dir.to_path_buf(), name));
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

    /// A vault's own directory (a local vault's database) is no other
    /// vault's (two vaults on one `dir` overwrote each other's versions:
    /// black-box finding), holds no audit log and no delivery root, and is
    /// not below one.
    fn vault_dir_apart(
        &mut self,
        p: Loc<'_>,
        name: &str,
        dir: &Path,
        others: &[(PathBuf, &str)],
        daemon: &DaemonConfig,
    ) {
        let overlap = |a: &Path, b: &Path| a.starts_with(b) || b.starts_with(a);
        let why = if let Some((_, other)) = others.iter().find(|(d, _)| overlap(dir, d)) {
            Some(format!(
                "it overlaps the directory of vault `{other}`; each local vault needs a directory of its own"
            ))
        } else if daemon.audit_log.starts_with(dir) {
            Some(format!(
                "it holds the audit log `{}`; keep the log out of it",
                daemon.audit_log.display()
            ))
        } else {
            daemon
                .delivery_roots
                .iter()
                .find(|r| overlap(dir, r))
                .map(|r| format!("it overlaps the delivery root `{}`, where sinks write as root; keep the vault's directory apart from it", r.display()))
        };
        if let Some(why) = why {
            // (A default `dir`, not in the file, is located at the vault's
            // table.)
            self.err(
                p.key("dir"),
                format!("vault `{name}`'s directory `{}`: {why}", dir.display()),
            );
        }
    }

    /// An absolute URL with one of `schemes` and a host; `example` shows a good one.
    pub(crate) fn url(&mut self, p: Loc<'_>, text: &str, schemes: &[&str], example: &str) {
        let mut shown = text.to_owned();
        let problem = match text.split_once("://") {
            None => Some("it has no scheme".to_owned()),
            Some((scheme, rest)) => {
                let host = rest.split(['/', '?', '#']).next().unwrap_or("");
                if let Some((_, after)) = host.rsplit_once('@') {
                    // Not echoed: the message reaches the daemon's log on
                    // a refused reload.
                    shown = format!("{scheme}://***@{after}...");
                    Some("it holds a user name or password, which would end up in logs, `status` and the audit log with every error naming the URL; give credentials with the auth settings".to_owned())
                } else if !schemes.contains(&scheme) {
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
                format!("invalid URL `{shown}`: {why} (write e.g. \"{example}\")"),
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
        // Printed by `status`, `surface` and alerts: a control character
        // (a newline, NUL, a bidi override) would forge or hide output.
        for (key, text) in [("owner", &a.owner), ("tenant", &a.tenant)] {
            if text.chars().any(is_unprintable) {
                self.err(
                    p.key(key),
                    format!("{key} must not contain control characters (newlines, tabs, NUL, bidi overrides)"),
                );
            }
        }
        // `(uid_t)-1` is "leave unchanged" to chown: the delivered files
        // stayed the daemon's, without an error (black-box finding).
        for (key, id) in [("uid", a.uid), ("gid", a.gid)] {
            if id == Some(u32::MAX) {
                self.err(
                    p.key(key),
                    format!("{key} 4294967295 is (uid_t)-1, which chown takes as \"leave unchanged\": the agent would not own its files; name the agent's {key}"),
                );
            }
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
            // Its `generate` had an error (reported) and a stand-in.
            Parsed::Ok(_)
                if raw.taken_out(
                    &TomlPath::root()
                        .key("agents")
                        .key(agent)
                        .key("credentials")
                        .key(name)
                        .key("generate")
                        .to_string(),
                ) =>
            {
                None
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
            } else if d.reason.trim().len() > crate::revocation::MAX_REASON_BYTES {
                self.err(
                    dp.key("reason"),
                    format!(
                        "reason is {} bytes long, more than {}: say it in short (it goes to the audit log, every alert and `status`)",
                        d.reason.trim().len(),
                        crate::revocation::MAX_REASON_BYTES
                    ),
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

/// A character that must not reach a terminal from a config label: a
/// control character, or a bidirectional override or isolate.
pub(crate) fn is_unprintable(c: char) -> bool {
    c.is_control() || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}
