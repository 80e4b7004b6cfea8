//! The items of one decommission: what an agent holds, each revoked and
//! then verified on its own.
//!
//! Per credential, in this order (each one waits for the one before it to
//! be verified), except the `sink:N` items, each done on its own:
//! 1. `acks`: the consumers still awaited are forgotten;
//! 2. `sink:N`: every file (or bundle) delivered is removed; verified by
//!    finding nothing keyturn put at the path. The agent owns its delivery
//!    directory, so it can make this fail (a directory where the file was,
//!    an unremovable entry): that item stays pending and alerting, and
//!    never keeps the target and the vaults from being revoked;
//! 3. `target` (and `target:WHERE` for each target a version was set on
//!    before the config changed it, e.g. another postgres `role`): the
//!    target stops accepting every value (postgres: NOLOGIN
//!    on every role, sessions terminated; `command`: the hook's `revoke`);
//!    verified by logging in with each value the vault still holds, which
//!    must be refused — so this comes before the vaults are emptied;
//! 4. `vault:NAME`: every version destroyed; verified by reading the
//!    current, previous and pending stages through the vault's own API,
//!    which must find nothing.
//!
//! A followed credential (`mode = "follow"`) has only the first two: its
//! versions and its target belong to the keyturn that rotates it.
//!
//! Per agent, when the daemon serves the token service (`[token_service]`
//! and `[daemon] listen`): `tokens`, whatever the agent's client policy —
//! any agent may be named in an `act` chain (a subject token's own `act` is
//! nested, never dropped), and the epoch covers those tokens too. Revoked
//! at the decision: the token service refuses every token naming the agent
//! (as `client_id` or anywhere in `act`) issued up to
//! [`DecommissionRow::token_epoch`](crate::state::DecommissionRow::token_epoch).
//! Verified through the token service's own check
//! ([`TokenProbe`]): probe tokens naming the agent, issued at the epoch and
//! signed by the current key, must come out inactive. How many live tokens
//! that ended is not known (issuing one writes nothing per token): the
//! record says "every token issued up to" the epoch.
//!
//! Per agent, when the daemon issues task-scoped credentials (`[issuers]`):
//! `tasks`, done through the task manager ([`TaskProbe`]): every task of
//! the agent ended (again each round until all are: ending is idempotent).
//! Revoked only once none of its tasks is starting, live or ending, that is
//! each task credential revoked and verified refused by its system; the
//! revocation time is when the last of them ended. A task ending wakes the
//! decommission at once, not at its next back-off round.

use std::path::PathBuf;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::model::{AgentId, CredentialId, CredentialKey, ErrorKind, PluginError, Stage};
use crate::rotation::{Catalog, Engine, Footprint};
use crate::state::RevocationRow;
use crate::targets::TargetConfig;
use crate::vaults::{Select, VaultItem, VaultRefs};

/// What one item revokes: the row's `spec`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Spec {
    Acks {},
    Sink {
        path: PathBuf,
    },
    Target {
        /// The target's own config (its JSON form).
        target: serde_json::Value,
        /// Where the values to try are: the primary vault and the path.
        vault: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        path: Option<String>,
    },
    Vault {
        vault: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        path: Option<String>,
    },
    /// The agent's access tokens: inactive when issued up to `issued_up_to`.
    Tokens {
        issued_up_to: DateTime<Utc>,
    },
    /// The agent's task-scoped credentials: every task ended, each
    /// credential revoked and verified refused by its system.
    Tasks {},
}

impl Spec {
    pub fn kind(&self) -> &'static str {
        match self {
            Spec::Acks {} => "acks",
            Spec::Sink { .. } => "sink",
            Spec::Target { .. } => "target",
            Spec::Vault { .. } => "vault",
            Spec::Tokens { .. } => "tokens",
            Spec::Tasks {} => "tasks",
        }
    }

    /// The order within a credential.
    fn rank(&self) -> u8 {
        match self {
            Spec::Acks {} => 0,
            Spec::Sink { .. } => 1,
            Spec::Target { .. } => 2,
            Spec::Vault { .. } => 3,
            Spec::Tokens { .. } => 4,
            Spec::Tasks {} => 5,
        }
    }
}

/// The items of one credential, from what it holds.
pub fn plan(
    agent: &AgentId,
    key: &CredentialKey,
    fp: &Footprint,
    now: DateTime<Utc>,
) -> Vec<RevocationRow> {
    let mut specs = vec![(format!("{}/acks", key.credential), Spec::Acks {})];
    for (i, path) in fp.files.iter().enumerate() {
        specs.push((
            format!("{}/sink:{i}", key.credential),
            Spec::Sink { path: path.clone() },
        ));
    }
    if !fp.follow {
        if let (Some(target), Some(primary)) = (&fp.target, fp.vaults.first())
            && !target.is_none()
        {
            specs.push((
                format!("{}/target", key.credential),
                Spec::Target {
                    target: serde_json::to_value(target).expect("a target config serialises"),
                    vault: primary.clone(),
                    path: fp.path.clone(),
                },
            ));
        }
        // Where a value was set before the config changed the target.
        if let Some(primary) = fp.vaults.first() {
            for earlier in &fp.targets_from {
                let shown = earlier
                    .build()
                    .ok()
                    .flatten()
                    .map_or_else(|| "earlier".to_owned(), |t| t.describe());
                let mut item = format!("{}/target:{shown}", key.credential);
                while specs.iter().any(|(i, _)| *i == item) {
                    item.push('+');
                }
                specs.push((
                    item,
                    Spec::Target {
                        target: serde_json::to_value(earlier).expect("a target config serialises"),
                        vault: primary.clone(),
                        path: fp.path.clone(),
                    },
                ));
            }
        }
        for v in &fp.vaults {
            specs.push((
                format!("{}/vault:{v}", key.credential),
                Spec::Vault {
                    vault: v.clone(),
                    path: fp.path.clone(),
                },
            ));
        }
        // Where a move left a version that is not retired yet.
        for m in &fp.moved_from {
            specs.push((
                format!("{}/vault:{}:{}", key.credential, m.vault, m.path),
                Spec::Vault {
                    vault: m.vault.clone(),
                    path: Some(m.path.clone()),
                },
            ));
        }
    }
    let _ = now;
    specs
        .into_iter()
        .map(|(item, spec)| pending_row(agent, item, Some(key.credential.clone()), &spec))
        .collect()
}

/// The `tokens` item of an agent whose tokens become inactive up to
/// `issued_up_to` (the decommission's token epoch).
pub fn plan_tokens(agent: &AgentId, issued_up_to: DateTime<Utc>) -> RevocationRow {
    pending_row(agent, "tokens".into(), None, &Spec::Tokens { issued_up_to })
}

/// The row of item `item` (revoking `spec`) of `agent`, not yet revoked.
fn pending_row(
    agent: &AgentId,
    item: String,
    credential: Option<CredentialId>,
    spec: &Spec,
) -> RevocationRow {
    RevocationRow {
        agent: agent.clone(),
        item,
        credential,
        kind: spec.kind().to_owned(),
        spec: serde_json::to_value(spec).expect("a spec serialises"),
        revoked_at: None,
        verified_at: None,
        attempts: 0,
        last_error: None,
    }
}

/// The `tasks` item of an agent, when the daemon issues task-scoped
/// credentials (`[issuers]`).
pub fn plan_tasks(agent: &AgentId) -> RevocationRow {
    pending_row(agent, "tasks".into(), None, &Spec::Tasks {})
}

/// What revokes and verifies the `tasks` item: the task manager.
#[async_trait::async_trait]
pub trait TaskProbe: Send + Sync {
    /// Ends every task of `agent` not ended (idempotent).
    async fn end_tasks_of(&self, agent: &str) -> Result<(), String>;
    /// `Ok` when no task of `agent` is starting, live or ending, with when
    /// the last of its tasks ended (`None`: it never had one); `Err` says
    /// which are not ended yet and why.
    fn tasks_ended(&self, agent: &str) -> Result<Option<DateTime<Utc>>, String>;
    /// Changes each time a task has ended.
    fn ended_changes(&self) -> tokio::sync::watch::Receiver<u64>;
}

#[async_trait::async_trait]
impl TaskProbe for crate::tasks::manager::TaskManager {
    async fn end_tasks_of(&self, agent: &str) -> Result<(), String> {
        self.retire_agent(agent);
        self.end_all_of(agent, "decommission")
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    fn tasks_ended(&self, agent: &str) -> Result<Option<DateTime<Utc>>, String> {
        // The open ones, then the one that ended last.
        let tasks = self.list(Some(agent), 1).map_err(|e| e.to_string())?;
        let open: Vec<_> = tasks
            .iter()
            .filter(|t| t.state != crate::tasks::store::TaskState::Ended)
            .collect();
        if open.is_empty()
            && let Some(t) = tasks.iter().find(|t| self.end_in_progress(&t.task.task_id))
        {
            return Err(format!(
                "task {} of {agent} is ending (its end not recorded yet)",
                t.task.task_id
            ));
        }
        match open.first() {
            None => Ok(tasks
                .iter()
                .filter_map(|t| t.ended_at_ms)
                .max()
                .and_then(DateTime::<Utc>::from_timestamp_millis)),
            Some(t) => {
                // Black-box finding: a session that expires by itself (an
                // `aws_sts` issuer without `revoke_with_deny_policy`) was
                // waited for with words that called it a transient failure.
                let expiring = t.items.iter().find_map(|i| {
                    (i.state == crate::tasks::store::ItemState::Expiring)
                        .then_some(i.expires_at_ms)
                        .flatten()
                        .and_then(DateTime::<Utc>::from_timestamp_millis)
                        .map(|at| (i, at))
                });
                if let Some((i, at)) = expiring {
                    return Err(format!(
                        "task {} of {agent}: its credential from issuer {} cannot be ended early and keeps working until it expires by itself at {}; the decommission is verified only then (an `aws_sts` issuer ends sessions at once with `revoke_with_deny_policy = true`)",
                        t.task.task_id,
                        i.issuer,
                        at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
                    ));
                }
                let why = t
                    .items
                    .iter()
                    .find_map(|i| i.last_error.as_deref())
                    .unwrap_or("its credentials are being revoked");
                Err(format!(
                    "{} task(s) of {agent} not ended yet (task {}: {why}); keyturn retries until every one is revoked",
                    open.len(),
                    t.task.task_id
                ))
            }
        }
    }

    fn ended_changes(&self) -> tokio::sync::watch::Receiver<u64> {
        crate::tasks::manager::TaskManager::ended_changes(self)
    }
}

/// What verifies the `tokens` item: the token service itself.
#[async_trait::async_trait]
pub trait TokenProbe: Send + Sync {
    /// `Ok` when a token naming `agent` (as client, and only in an `act`
    /// chain) issued at `issued_at` (unix seconds) is refused by the
    /// service's own check; `Err` says why not.
    async fn refuses_tokens_of(&self, agent: &str, issued_at: i64) -> Result<(), String>;
}

#[async_trait::async_trait]
impl TokenProbe for crate::oauth::service::TokenService {
    async fn refuses_tokens_of(&self, agent: &str, issued_at: i64) -> Result<(), String> {
        crate::oauth::service::TokenService::refuses_tokens_of(self, agent, issued_at).await
    }
}

/// The daemon's: the service the slot holds now (a reload may swap it).
#[async_trait::async_trait]
impl TokenProbe for crate::oauth::service::Slot {
    async fn refuses_tokens_of(&self, agent: &str, issued_at: i64) -> Result<(), String> {
        match self.get() {
            Some(service) => service.refuses_tokens_of(agent, issued_at).await,
            None => Err("[token_service] is not configured now: keyturn retries until a reload brings it back".into()),
        }
    }
}

/// Verifies the `tokens` item: `probe` is the token service being served
/// (`None`: not serving yet, so nothing can be proved).
pub async fn verify_tokens(
    probe: Option<&dyn TokenProbe>,
    agent: &AgentId,
    issued_up_to: DateTime<Utc>,
) -> Result<String, PluginError> {
    let Some(probe) = probe else {
        return Err(PluginError::new(
            ErrorKind::Transient,
            "the token service is not serving, so its refusal of these tokens cannot be checked; keyturn retries until it serves ([token_service] with [daemon] listen)",
        ));
    };
    let at = issued_up_to.timestamp();
    probe
        .refuses_tokens_of(agent.as_str(), at)
        .await
        .map_err(|e| PluginError::new(ErrorKind::Transient, e))?;
    Ok(format!(
        "token service refuses every token naming {agent} issued up to {}",
        issued_up_to.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
    ))
}

/// Whether `row` is done on its own, not in its credential's order: a
/// delivered file. Its removal is in the hands of the agent being retired
/// (it owns the directory), so it must never hold up the revocation at the
/// target or in the vaults.
pub fn independent(row: &RevocationRow) -> bool {
    row.kind == "sink"
}

/// Items of one credential in the order they are done.
pub fn ordered(mut items: Vec<RevocationRow>) -> Vec<RevocationRow> {
    items.sort_by_key(|r| {
        (
            parse(r).map(|s| s.rank()).unwrap_or(u8::MAX),
            r.item.clone(),
        )
    });
    items
}

pub fn parse(row: &RevocationRow) -> Result<Spec, PluginError> {
    serde_json::from_value(row.spec.clone()).map_err(|e| {
        PluginError::new(
            ErrorKind::Fatal,
            format!("item {} has an unreadable spec ({e})", row.item),
        )
    })
}

fn vault_of<'a>(
    catalog: &'a Catalog,
    name: &str,
) -> Result<&'a Arc<crate::rotation::VaultHandle>, PluginError> {
    catalog.vaults.get(name).ok_or_else(|| {
        PluginError::new(
            ErrorKind::Invalid,
            format!(
                "vault {name:?} is not configured any more: add it back (as it was) so keyturn can empty it and verify it; the item completes only then, even if the versions there were destroyed by hand"
            ),
        )
    })
}

fn default_path(key: &CredentialKey, path: &Option<String>) -> String {
    path.clone()
        .unwrap_or_else(|| format!("agents/{}/{}", key.agent, key.credential))
}

/// A credential of another agent in the config that uses now what `spec`
/// would revoke of `key`: the same delivered file, the same vault path in
/// the same vault, or the same PostgreSQL role (a command hook is told
/// which credential to revoke, so one hook serving many is no shared
/// place). Left alone then, as a move or a target change leaves it
/// (black-box finding: an agent renamed in the config, its old name then
/// decommissioned as the README shows, had the renamed agent's role made
/// NOLOGIN, its vault path emptied and its files removed).
fn used_now(catalog: &Catalog, key: &CredentialKey, spec: &Spec) -> Option<CredentialKey> {
    let mut others = catalog
        .creds
        .values()
        .filter(|e| e.key().agent != key.agent);
    let user = match spec {
        Spec::Sink { path } => others.find(|e| {
            e.sinks
                .iter()
                .any(|s| s.delivered_path() == Some(path.as_path()))
        }),
        Spec::Target { target, .. } => {
            let t = stored_target(target).ok()?;
            if !matches!(t, TargetConfig::Postgres(_)) {
                return None;
            }
            others.find(|e| e.policy.target.same_place(&t))
        }
        Spec::Vault { vault, path } => {
            let path = default_path(key, path);
            others.find(|e| {
                e.vault_path() == path && e.vaults.iter().any(|h| h.config.name == *vault)
            })
        }
        Spec::Acks {} | Spec::Tokens { .. } | Spec::Tasks {} => None,
    };
    user.map(|e| e.key().clone())
}

/// Revokes one item. Idempotent: revoking twice is harmless.
pub async fn revoke(engine: &Engine, key: &CredentialKey, spec: &Spec) -> Result<(), PluginError> {
    if let Some(user) = used_now(&engine.catalog(), key, spec) {
        tracing::warn!(agent = %key.agent, credential = %key.credential, used_by = %user, "decommission: not revoking what {user} of the config uses now (the same file, vault path or role): it is that credential's");
        return Ok(());
    }
    match spec {
        Spec::Acks {} => engine.clear_acks(key).await,
        Spec::Sink { path } => {
            let roots = engine.catalog().config.daemon.delivery_roots.clone();
            crate::sinks::delivered_at(path, &roots)?.retract(key).await
        }
        Spec::Target { target, .. } => stored_target(target)?.revoke(key).await,
        Spec::Vault { vault, path } => {
            let catalog = engine.catalog();
            let h = vault_of(&catalog, vault)?;
            let path = default_path(key, path);
            h.vault.destroy(VaultItem { key, path: &path }).await
        }
        Spec::Tokens { .. } | Spec::Tasks {} => Err(not_a_credential_item()),
    }
}

/// `tokens` and `tasks` are the agent's, not a credential's.
fn not_a_credential_item() -> PluginError {
    PluginError::new(
        ErrorKind::Fatal,
        "the tokens and tasks items belong to the agent, not to a credential",
    )
}

fn stored_target(target: &serde_json::Value) -> Result<TargetConfig, PluginError> {
    TargetConfig::from_stored(target.clone()).map_err(|e| PluginError::new(ErrorKind::Fatal, e))
}

fn build_target(
    target: &serde_json::Value,
) -> Result<Option<Arc<dyn crate::targets::Target>>, PluginError> {
    stored_target(target)?.build()
}

/// Proves one revoked item where it can be proved. `Ok` with a note on how.
pub async fn verify(
    engine: &Engine,
    key: &CredentialKey,
    spec: &Spec,
) -> Result<String, PluginError> {
    if let Some(user) = used_now(&engine.catalog(), key, spec) {
        return Ok(format!("left to {user}, which uses it now"));
    }
    match spec {
        Spec::Acks {} => Ok("no consumer awaited".into()),
        Spec::Sink { path } => {
            let roots = engine.catalog().config.daemon.delivery_roots.clone();
            crate::sinks::retracted_at(path, &roots).await
        }
        Spec::Target {
            target,
            vault,
            path,
        } => {
            let Some(t) = build_target(target)? else {
                return Ok("no target".into());
            };
            let catalog = engine.catalog();
            let h = vault_of(&catalog, vault)?;
            let path = default_path(key, path);
            let item = VaultItem { key, path: &path };
            let k = key.clone();
            let versions = engine.load(move |s| s.versions(&k)).await?;
            let mut tried = 0;
            for v in versions.iter().filter(|v| v.stage != Stage::Retired) {
                let refs = VaultRefs::decode(&v.vault_version, vault);
                let Some(vref) = refs.get(vault) else {
                    continue;
                };
                let Some(stored) = h.vault.read(item, Select::Version(vref)).await? else {
                    continue;
                };
                match t.test(key, v.version, &stored.value).await {
                    Ok(()) => {
                        return Err(PluginError::new(
                            ErrorKind::Transient,
                            format!(
                                "{}: version {} still logs in after the revocation",
                                t.describe(),
                                v.version
                            ),
                        ));
                    }
                    Err(e)
                        if matches!(
                            e.kind,
                            ErrorKind::Unauthorized | ErrorKind::Invalid | ErrorKind::NotFound
                        ) =>
                    {
                        tried += 1;
                    }
                    Err(e) => return Err(e),
                }
            }
            Ok(if tried == 0 {
                format!("{}: no value left to try", t.describe())
            } else {
                format!("{}: {tried} value(s) refused", t.describe())
            })
        }
        Spec::Vault { vault, path } => {
            let catalog = engine.catalog();
            let h = vault_of(&catalog, vault)?;
            let path = default_path(key, path);
            let item = VaultItem { key, path: &path };
            for stage in [Stage::Current, Stage::Previous, Stage::Pending] {
                if let Some(v) = h.vault.read(item, Select::Stage(stage)).await? {
                    return Err(PluginError::new(
                        ErrorKind::Transient,
                        format!(
                            "vault {vault:?} still serves a {stage} version ({}) of {path}",
                            v.version
                        ),
                    ));
                }
            }
            Ok(format!("vault {vault:?} serves nothing at {path}"))
        }
        Spec::Tokens { .. } | Spec::Tasks {} => Err(not_a_credential_item()),
    }
}
