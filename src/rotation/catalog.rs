//! The catalog: the validated config turned into live plug-ins, one entry per
//! credential. Built at start-up and on every reload; a rotation keeps the
//! entry it started with, so a reload never changes a rotation mid-flight.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;

use super::footprint::Footprint;
use crate::config::{AgentConfig, Config, CredentialConfig, GeneratorConfig, VaultConfig};
use crate::model::{CredentialKey, ErrorKind, PluginError, SecretValue, Stage};
use crate::schedule::{ScheduleSpec, jitter_offset};
use crate::sinks::{CurrentValue, Sink, SinkContext};
use crate::targets::{Target, TargetConfig};
use crate::vaults::change_index::IndexedVault;
use crate::vaults::{Select, Vault, VaultItem};

/// A vault and the limit on rotations touching it at once. Shared (`Arc`)
/// by every credential kept in it.
pub struct VaultHandle {
    pub vault: Arc<dyn Vault>,
    pub limit: Arc<Semaphore>,
    /// The config it was built from, to reuse it across reloads when unchanged.
    pub config: VaultConfig,
}

/// One credential, ready to rotate.
///
/// Kept small: there may be 100k. What it shares with others (the agent,
/// its [`CredPolicy`], vaults, sinks' roots) is behind an `Arc`; its vault
/// names are the handles' names, its sink configs were built into `sinks`.
pub struct CredEntry {
    /// The agent it belongs to (its `credentials` map is empty: they live
    /// in the catalog's entries). Shared by all of the agent's entries.
    pub agent: Arc<AgentConfig>,
    pub key: CredentialKey,
    /// Where in the vault, as written; `None` for the default (see
    /// [`CredEntry::vault_path`]).
    pub path: Option<Box<str>>,
    /// How it is generated, applied and scheduled: one `Arc` for every
    /// entry of a catalog whose settings are equal.
    pub policy: Arc<CredPolicy>,
    /// In the order of the config's `vaults`: the first is the primary.
    pub vaults: OneOrMore<Arc<VaultHandle>>,
    /// `None` for a pure shared secret (`target = { type = "none" }`, the
    /// default): nothing to apply, so `set` and `test` are skipped.
    pub target: Option<Arc<dyn Target>>,
    pub sinks: OneOrMore<Arc<dyn Sink>>,
}

/// The settings of a credential that are not about which one it is: most
/// credentials share them with many others (one per tier or template), so
/// the catalog keeps each distinct one once ([`Policies`]). A copy per
/// credential cost 128 bytes each, 13 MB at 100k credentials.
#[derive(Debug, PartialEq)]
pub struct CredPolicy {
    pub generate: GeneratorConfig,
    pub target: TargetConfig,
    pub schedule: ScheduleSpec,
    pub jitter: Duration,
    /// How long the previous version stays valid after delivery.
    pub grace: Duration,
    /// `mode = "follow"`: the poll interval (see [`CredentialConfig::follow`]).
    pub follow: Option<Duration>,
    /// The oldest the current version may be before it counts as expired.
    pub max_age: Option<Duration>,
}

impl CredPolicy {
    /// See [`CredentialConfig::rotation_period`].
    pub fn rotation_period(&self) -> Option<Duration> {
        if self.follow.is_some() {
            return None;
        }
        crate::config::rotation_period(&self.schedule, self.jitter)
    }
}

/// A policy's scalar settings: `jitter`, `grace`, `follow`, `max_age`.
type PolicyBucket = (Duration, Duration, Option<Duration>, Option<Duration>);

/// Hands out one `Arc` per distinct [`CredPolicy`] while a catalog is
/// built. Policies are bucketed by their scalar settings and compared in
/// full within a bucket; a bucket holds at most [`Policies::BUCKET`]
/// policies, so credentials that differ only in their target (a PostgreSQL
/// role each) cost a bounded comparison and simply keep their own.
#[derive(Default)]
struct Policies(HashMap<PolicyBucket, Vec<Arc<CredPolicy>>>);

impl Policies {
    const BUCKET: usize = 8;

    fn intern(&mut self, policy: CredPolicy) -> Arc<CredPolicy> {
        let bucket = self
            .0
            .entry((policy.jitter, policy.grace, policy.follow, policy.max_age))
            .or_default();
        if let Some(same) = bucket.iter().find(|p| ***p == policy) {
            return same.clone();
        }
        let policy = Arc::new(policy);
        if bucket.len() < Self::BUCKET {
            bucket.push(policy.clone());
        }
        policy
    }
}

pub struct Catalog {
    /// The config this catalog was built from, without its credentials
    /// (they are in `creds`; at 100k credentials a second copy costs
    /// ~80 MB): `config.agents[..].credentials` is empty.
    pub config: Arc<Config>,
    pub creds: CredMap,
    pub vaults: HashMap<String, Arc<VaultHandle>>,
}

impl CredEntry {
    /// `agent/credential`.
    pub fn key(&self) -> &CredentialKey {
        &self.key
    }

    /// Where in the vault the credential lives.
    pub fn vault_path(&self) -> std::borrow::Cow<'_, str> {
        crate::config::vault_path(&self.key, self.path.as_deref())
    }

    /// Its deterministic jitter offset (computed when scheduled: a stored
    /// copy is 16 bytes per credential).
    pub fn offset(&self) -> Duration {
        jitter_offset(&self.key, self.policy.jitter)
    }

    /// The vault names for status and messages: `bao` or `bao+aws`.
    pub fn vault_label(&self) -> String {
        let names: Vec<&str> = self.vaults.iter().map(|h| h.config.name.as_str()).collect();
        names.join("+")
    }

    /// The vault a new value is staged in first and read back from.
    pub fn primary(&self) -> &VaultHandle {
        &self.vaults[0]
    }

    /// The entry of a credential that has left the config while its
    /// previous version still awaits retirement, rebuilt from the footprint
    /// its rotation persisted and the vaults `catalog` has. Only its vaults,
    /// path, target and agent mean anything: the engine only ever retires
    /// with it (it is never rotated, and it has no sinks). A vault that is
    /// no longer configured is left out, with a warning; without the
    /// primary (whose version references name no vault) it is an error.
    pub fn departed(
        key: &CredentialKey,
        fp: &Footprint,
        catalog: &Catalog,
    ) -> Result<CredEntry, String> {
        // A single-vault version reference does not name its vault: it is
        // the primary's, so without the primary it cannot be placed.
        let primary = fp.vaults.first().map(String::as_str).unwrap_or_default();
        if !catalog.vaults.contains_key(primary) {
            return Err(format!(
                "its primary vault {primary:?} is not configured any more"
            ));
        }
        let mut vaults = Vec::with_capacity(fp.vaults.len());
        for name in &fp.vaults {
            match catalog.vaults.get(name) {
                Some(h) => vaults.push(h.clone()),
                None => {
                    tracing::warn!(agent = %key.agent, credential = %key.credential, vault = %name, "vault no longer configured: the previous version kept there cannot be retired")
                }
            }
        }
        let target_cfg = fp.target_config();
        let target = target_cfg.build().map_err(|e| format!("target: {e}"))?;
        Ok(CredEntry {
            agent: Arc::new(AgentConfig {
                id: key.agent.clone(),
                owner: fp.owner.clone(),
                tenant: fp.tenant.clone(),
                tier: String::new(),
                uid: None,
                gid: None,
                revocation_sla: None,
                decommissioned: None,
                credentials: Default::default(),
                auth_key: None,
            }),
            key: key.clone(),
            path: fp.path.as_deref().map(Box::from),
            policy: Arc::new(CredPolicy {
                // Never used: a departed entry is never rotated.
                generate: GeneratorConfig::Ed25519,
                target: target_cfg,
                schedule: ScheduleSpec::Every(Duration::MAX),
                jitter: Duration::ZERO,
                grace: Duration::ZERO,
                follow: None,
                max_age: None,
            }),
            vaults: vaults.into(),
            target,
            sinks: Vec::new().into(),
        })
    }
}

/// Opens the vault of `[vaults.NAME]`, with its change index recording
/// every promote when it has one.
fn open_vault(name: &str, vcfg: &VaultConfig) -> Result<Arc<dyn Vault>, BuildError> {
    let plugin = vcfg.spec.plugin();
    let vault = plugin.open(name).map_err(|source| BuildError::Vault {
        vault: name.to_owned(),
        source,
    })?;
    Ok(match plugin.change_index() {
        Some(path) => Arc::new(IndexedVault::new(vault, path)),
        None => vault,
    })
}

/// A list that is almost always one item long (a credential's vaults, its
/// sinks), kept inline then: a boxed slice of one costs a 32-byte heap chunk
/// per credential.
#[derive(Clone)]
pub enum OneOrMore<T> {
    One(T),
    More(Box<[T]>),
}

impl<T> std::ops::Deref for OneOrMore<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        match self {
            OneOrMore::One(t) => std::slice::from_ref(t),
            OneOrMore::More(all) => all,
        }
    }
}

impl<T> From<Vec<T>> for OneOrMore<T> {
    fn from(mut v: Vec<T>) -> Self {
        if v.len() == 1 {
            OneOrMore::One(v.pop().expect("one item"))
        } else {
            OneOrMore::More(v.into_boxed_slice())
        }
    }
}

impl<T> FromIterator<T> for OneOrMore<T> {
    fn from_iter<I: IntoIterator<Item = T>>(iter: I) -> Self {
        iter.into_iter().collect::<Vec<T>>().into()
    }
}

impl<'a, T> IntoIterator for &'a OneOrMore<T> {
    type Item = &'a T;
    type IntoIter = std::slice::Iter<'a, T>;
    fn into_iter(self) -> Self::IntoIter {
        self.iter()
    }
}

/// The catalog's entries, sorted by key: a lookup is a binary search. At
/// 100k credentials a hash map's buckets and slack cost ~50 bytes per
/// credential; this costs one pointer, and `status` gets the order for free.
#[derive(Default)]
pub struct CredMap(Vec<Arc<CredEntry>>);

impl CredMap {
    /// Keys must be unique (validation guarantees it).
    pub fn new(mut entries: Vec<Arc<CredEntry>>) -> Self {
        entries.sort_unstable_by(|a, b| a.key().cmp(b.key()));
        entries.shrink_to_fit();
        CredMap(entries)
    }

    fn find(&self, key: &CredentialKey) -> Result<usize, usize> {
        self.0.binary_search_by(|e| e.key().cmp(key))
    }

    pub fn get(&self, key: &CredentialKey) -> Option<&Arc<CredEntry>> {
        self.find(key).ok().map(|i| &self.0[i])
    }

    pub fn contains_key(&self, key: &CredentialKey) -> bool {
        self.find(key).is_ok()
    }

    /// Inserts or replaces the entry for `entry`'s key.
    pub fn insert(&mut self, entry: Arc<CredEntry>) {
        match self.find(entry.key()) {
            Ok(i) => self.0[i] = entry,
            Err(i) => self.0.insert(i, entry),
        }
    }

    pub fn remove(&mut self, key: &CredentialKey) -> Option<Arc<CredEntry>> {
        self.find(key).ok().map(|i| self.0.remove(i))
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// In key order.
    pub fn keys(&self) -> impl Iterator<Item = &CredentialKey> {
        self.0.iter().map(|e| e.key())
    }

    /// In key order.
    pub fn values(&self) -> impl Iterator<Item = &Arc<CredEntry>> {
        self.0.iter()
    }
}

impl std::ops::Index<&CredentialKey> for CredMap {
    type Output = Arc<CredEntry>;
    fn index(&self, key: &CredentialKey) -> &Arc<CredEntry> {
        self.get(key).expect("no catalog entry for this key")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("vault {vault:?}: {source}")]
    Vault { vault: String, source: PluginError },
    #[error("{key}: target: {source}")]
    Target {
        key: CredentialKey,
        source: PluginError,
    },
    #[error("{key}: deliver[{index}]: {source}")]
    Sink {
        key: CredentialKey,
        index: usize,
        source: PluginError,
    },
}

impl Catalog {
    /// Whether a credential of the config other than `key` uses `target`
    /// now: a value of `key` set on it earlier is not revoked there (that
    /// would cut the other one off).
    pub fn target_used_by_other(&self, key: &CredentialKey, target: &TargetConfig) -> bool {
        self.creds
            .values()
            .any(|e| e.key() != key && e.policy.target.same_place(target))
    }

    /// Builds plug-ins for `config`. Vaults whose config did not change are
    /// taken over from `previous` (open connections, loaded keys).
    pub fn build(mut config: Config, previous: Option<&Catalog>) -> Result<Catalog, BuildError> {
        let mut vaults = HashMap::new();
        for (name, vcfg) in &config.vaults {
            let reuse = previous.and_then(|p| p.vaults.get(name)).filter(|h| {
                h.config.spec == vcfg.spec && h.config.max_concurrent == vcfg.max_concurrent
            });
            let handle = match reuse {
                Some(h) => h.clone(),
                None => Arc::new(VaultHandle {
                    vault: open_vault(name, vcfg)?,
                    limit: Arc::new(Semaphore::new(vcfg.max_concurrent.max(1))),
                    config: vcfg.clone(),
                }),
            };
            vaults.insert(name.clone(), handle);
        }
        let roots = config.daemon.delivery_roots.clone();
        let readers = current_value_readers(&config, &vaults, previous);
        let mut creds = Vec::with_capacity(config.credential_count());
        let mut policies = Policies::default();
        // Everything the catalog keeps is a copy, and the parsed config is
        // freed whole at the end, not piece by piece while the entries are
        // made: see `crate::memory::apart`.
        let parsed = std::mem::take(&mut config.agents);
        let mut kept = config.clone();
        for agent in parsed.values() {
            let copy = agent.copy_without_credentials();
            let shared = Arc::new(copy.clone());
            kept.agents.insert(copy.id.clone(), copy);
            // The agent's uid before this reload, when it changed.
            let former_uid = previous
                .and_then(|p| p.config.agents.get(&agent.id))
                .and_then(|a| a.uid)
                .filter(|u| agent.uid != Some(*u));
            for cred in agent.credentials.values() {
                let entry = entry(
                    cred,
                    &shared,
                    former_uid,
                    &vaults,
                    &mut policies,
                    &roots,
                    &readers,
                )?;
                creds.push(Arc::new(entry));
            }
        }
        let creds = CredMap::new(creds);
        let config = Arc::new(kept);
        Ok(Catalog {
            config,
            creds,
            vaults,
        })
    }
}

/// The catalog entry of `cred`, of `agent`, made of copies (see
/// [`Catalog::build`]).
fn entry(
    cred: &CredentialConfig,
    agent: &Arc<AgentConfig>,
    former_uid: Option<u32>,
    vaults: &HashMap<String, Arc<VaultHandle>>,
    policies: &mut Policies,
    roots: &[std::path::PathBuf],
    readers: &HashMap<CredentialKey, Arc<dyn CurrentValue>>,
) -> Result<CredEntry, BuildError> {
    let key = CredentialKey::new(agent.id.clone(), cred.key.credential.unshared());
    let mut sinks = Vec::with_capacity(cred.deliver.len());
    for (index, s) in cred.deliver.iter().enumerate() {
        let ctx = SinkContext {
            delivery_roots: roots,
            uid: agent.uid,
            gid: agent.gid,
            former_uid,
            reader: s.plugin().reads_credential().and_then(|k| readers.get(&k)),
        };
        let sink = s.clone().build(&ctx).map_err(|source| BuildError::Sink {
            key: key.clone(),
            index,
            source,
        })?;
        sinks.push(sink);
    }
    // Sinks run one after another in this order (the deliver step): the
    // ones that write first, whatever the config's order.
    sinks.sort_by_key(|s| s.only_notifies());
    let target = cred.target.build().map_err(|source| BuildError::Target {
        key: key.clone(),
        source,
    })?;
    Ok(CredEntry {
        agent: agent.clone(),
        key,
        path: cred.path.clone(),
        policy: policies.intern(CredPolicy {
            generate: cred.generate.clone(),
            target: cred.target.clone(),
            schedule: cred.schedule.clone(),
            jitter: cred.jitter,
            grace: cred.grace,
            follow: cred.follow,
            max_age: cred.max_age,
        }),
        // The handles name the vaults (see `CredEntry::vault_label`).
        vaults: cred
            .vaults
            .iter()
            .map(|name| {
                vaults
                    .get(&**name)
                    .expect("validation guarantees every credential's vault exists")
                    .clone()
            })
            .collect(),
        target,
        sinks: sinks.into(),
    })
}

/// Reads a credential's current value from its primary vault (a webhook
/// signs with another credential's current value). Reads the vault without
/// taking its concurrency limit: the reader runs inside a rotation's
/// deliver step, which may hold the last permit already.
struct VaultCurrentValue {
    vault: Arc<VaultHandle>,
    key: CredentialKey,
    path: String,
}

impl std::fmt::Debug for VaultCurrentValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} in vault {}", self.key, self.vault.config.name)
    }
}

#[async_trait::async_trait]
impl CurrentValue for VaultCurrentValue {
    async fn previous(&self) -> Result<Option<SecretValue>, PluginError> {
        let item = VaultItem {
            key: &self.key,
            path: &self.path,
        };
        Ok(self
            .vault
            .vault
            .read(item, Select::Stage(Stage::Previous))
            .await?
            .map(|v| v.value))
    }

    async fn current(&self) -> Result<SecretValue, PluginError> {
        let item = VaultItem {
            key: &self.key,
            path: &self.path,
        };
        match self
            .vault
            .vault
            .read(item, Select::Stage(Stage::Current))
            .await
        {
            Ok(Some(v)) => Ok(v.value),
            // Transient: at start-up its first rotation may still be
            // running, and the delivery waiting for it succeeds once it is done.
            Ok(None) => Err(PluginError::new(
                ErrorKind::Transient,
                format!(
                    "credential {} has no current version in vault {} yet",
                    self.key, self.vault.config.name
                ),
            )),
            Err(e) => Err(PluginError::new(
                e.kind,
                format!(
                    "reading the current version of credential {} in vault {}: {}",
                    self.key, self.vault.config.name, e.message
                ),
            )
            .with_retry_after(e.retry_after)),
        }
    }
}

/// A reader for every credential a sink reads ([`crate::sinks::SinkPlugin::reads_credential`]),
/// usually none. A credential not in `config` (a partial reload keeps the
/// agents of unchanged files out of it) is found in `previous`.
fn current_value_readers(
    config: &Config,
    vaults: &HashMap<String, Arc<VaultHandle>>,
    previous: Option<&Catalog>,
) -> HashMap<CredentialKey, Arc<dyn CurrentValue>> {
    let wanted: std::collections::HashSet<CredentialKey> = config
        .agents
        .values()
        .flat_map(|a| a.credentials.values())
        .flat_map(|c| c.deliver.iter())
        .filter_map(|s| s.plugin().reads_credential())
        .collect();
    let mut readers: HashMap<CredentialKey, Arc<dyn CurrentValue>> = HashMap::new();
    for key in wanted {
        let found = config
            .agents
            .get(&key.agent)
            .and_then(|a| a.credentials.get(&key.credential))
            .and_then(|c| {
                let vault = vaults.get(&**c.vaults.first()?)?.clone();
                Some((vault, c.vault_path().into_owned()))
            })
            .or_else(|| {
                let e = previous?.creds.get(&key)?;
                Some((e.vaults[0].clone(), e.vault_path().into_owned()))
            });
        if let Some((vault, path)) = found {
            let reader = VaultCurrentValue {
                vault,
                key: key.clone(),
                path,
            };
            readers.insert(key, Arc::new(reader));
        }
    }
    readers
}

impl Catalog {
    /// After a partial reload ([`crate::config::Reloaded::Partial`]): builds
    /// `config`'s credentials and takes over, as they are, the entries of
    /// `previous` whose agent is in `kept` (from files that did not change).
    /// `Ok(None)` when a credential built here clashes with one taken over
    /// (the same vault path, or the same delivery): validation saw only one
    /// side, so the caller reloads everything and validation says where.
    pub fn build_partial(
        mut config: Config,
        previous: &Catalog,
        kept: &std::collections::HashSet<String>,
    ) -> Result<Option<Catalog>, BuildError> {
        let taken: Vec<Arc<CredEntry>> = previous
            .creds
            .values()
            .filter(|e| kept.contains(e.key().agent.as_str()))
            .cloned()
            .collect();
        for e in &taken {
            config
                .agents
                .entry(e.key().agent.clone())
                .or_insert_with(|| (*e.agent).clone());
        }
        let mut catalog = Catalog::build(config, Some(previous))?;
        // The same place twice: a vault path in one vault, or a delivery.
        let places = |e: &CredEntry| -> Vec<String> {
            let path = e.vault_path();
            e.vaults
                .iter()
                .map(|h| format!("vault {} {path}", h.config.name))
                .chain(e.sinks.iter().map(|s| s.describe()))
                .collect()
        };
        let built: std::collections::HashSet<String> =
            catalog.creds.values().flat_map(|e| places(e)).collect();
        if taken
            .iter()
            .any(|e| places(e).iter().any(|p| built.contains(p)))
        {
            return Ok(None);
        }
        // Sorted once, not inserted one by one (100k inserts into a sorted
        // vector move it 100k times).
        let mut all: Vec<Arc<CredEntry>> = catalog.creds.values().cloned().collect();
        all.extend(taken);
        catalog.creds = CredMap::new(all);
        Ok(Some(catalog))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `n` credentials of agent `bot`: `c0..` with equal settings, then one
    /// each with another grace and another generator, and `hooks`
    /// credentials that differ only in their target's arguments.
    fn catalog(dir: &std::path::Path, n: usize, hooks: usize) -> Catalog {
        let d = dir.display();
        let mut text = format!(
            "[daemon]\nstate_dir = \"{d}/state\"\nsocket = \"{d}/control.sock\"\ndelivery_roots = [\"{d}/agents\"]\n[vaults.local]\ntype = \"local\"\n{}",
            crate::test_support::agent_table("bot")
        );
        let password = "generate = { kind = \"password\", length = 20 }\n";
        let cred = |name: &str, extra: &str| {
            let generate = if extra.contains("generate") {
                ""
            } else {
                password
            };
            format!(
                "[agents.bot.credentials.{name}]\nvault = \"local\"\nevery = \"1h\"\n{generate}{extra}\ndeliver = [{{ type = \"file\", path = \"{d}/agents/bot/{name}\" }}]\n"
            )
        };
        for i in 0..n {
            text.push_str(&cred(&format!("c{i}"), "grace = \"5m\""));
        }
        text.push_str(&cred("longer", "grace = \"10m\""));
        text.push_str(&cred(
            "api",
            "grace = \"5m\"\ngenerate = { kind = \"api_key\", prefix = \"kt_\" }",
        ));
        for i in 0..hooks {
            text.push_str(&cred(
                &format!("h{i}"),
                &format!("grace = \"5m\"\ntarget = {{ type = \"command\", program = \"/bin/true\", args = [\"{i}\"] }}"),
            ));
        }
        let config = crate::config::load_str(&dir.join("k.toml"), &text).expect("valid config");
        let catalog = Catalog::build(config.clone(), None).expect("catalog");
        // The catalog keeps copies, not shares, of the parsed config's ids
        // (`memory::apart` relies on it: a shared one would pin the parse's
        // heap). `config.clone()` shares them with `config`.
        let same = |a: &str, b: &str| std::ptr::eq(a.as_ptr(), b.as_ptr());
        for (id, agent) in &config.agents {
            let kept = &catalog.config.agents[id];
            assert!(!same(kept.id.as_str(), id.as_str()), "agent {id}");
            for cred in agent.credentials.values() {
                let e = catalog.creds.get(&cred.key).expect("built");
                assert!(!same(e.key.agent.as_str(), id.as_str()), "{}", cred.key);
                assert!(!same(e.agent.id.as_str(), id.as_str()), "{}", cred.key);
                let credential = cred.key.credential.as_str();
                assert!(!same(e.key.credential.as_str(), credential), "{}", cred.key);
            }
        }
        catalog
    }

    fn policy(c: &Catalog, cred: &str) -> Arc<CredPolicy> {
        let key = crate::test_support::key("bot", cred);
        c.creds.get(&key).expect("built").policy.clone()
    }

    #[test]
    fn credentials_with_equal_settings_share_one_policy() {
        let dir = tempfile::tempdir().unwrap();
        let c = catalog(dir.path(), 50, 0);
        let first = policy(&c, "c0");
        for i in 1..50 {
            assert!(Arc::ptr_eq(&first, &policy(&c, &format!("c{i}"))), "c{i}");
        }
        assert_eq!(first.grace, Duration::from_secs(300));
        // Anything that differs is not shared, and keeps its own value.
        let longer = policy(&c, "longer");
        assert!(!Arc::ptr_eq(&first, &longer));
        assert_eq!(longer.grace, Duration::from_secs(600));
        let api = policy(&c, "api");
        assert!(!Arc::ptr_eq(&first, &api));
        assert!(matches!(api.generate, GeneratorConfig::ApiKey { .. }));
        // The identity of each credential stays its own.
        let e = c.creds.get(&crate::test_support::key("bot", "c7")).unwrap();
        assert_eq!(e.vault_path(), "agents/bot/c7");
        assert_eq!(e.offset(), jitter_offset(e.key(), e.policy.jitter));
    }

    #[test]
    fn credentials_that_differ_only_in_their_target_keep_their_own() {
        let dir = tempfile::tempdir().unwrap();
        let hooks = 3 * Policies::BUCKET;
        let c = catalog(dir.path(), 2, hooks);
        // A full bucket stops interning: each hook keeps its own target,
        // and the credentials interned before still share theirs.
        for i in 0..hooks {
            let p = policy(&c, &format!("h{i}"));
            let TargetConfig::Command(cmd) = &p.target else {
                panic!("h{i}: {:?}", p.target);
            };
            assert_eq!(cmd.args, [i.to_string()], "h{i}");
            assert!(
                c.creds
                    .get(&crate::test_support::key("bot", &format!("h{i}")))
                    .unwrap()
                    .target
                    .is_some()
            );
        }
        assert!(Arc::ptr_eq(&policy(&c, "c0"), &policy(&c, "c1")));
    }
}
