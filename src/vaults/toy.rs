//! `toy`: a vault that keeps versions in memory, compiled into tests only.
//!
//! It exists to show (and keep showing) that a vault is one file plus one
//! line of the registry in `vaults/mod.rs`: its config, its check, its
//! constructor and its behaviour are all here, and its test runs a full
//! rotation through the engine under paused time, configured from TOML like
//! any other vault.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;

use super::{Pending, Select, StoredVersion, Vault, VaultItem, VaultPlugin, VersionRef};
use crate::config::validate::{Loc, Validator, VaultScope};
use crate::model::{ErrorKind, PluginError, RotationId, SecretValue, Stage};

/// `[vaults.NAME]` with `type = "toy"`.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ToyConfig {
    /// Prepended to every path (checked: no `/` at either end).
    pub prefix: Option<String>,
    pub change_index: Option<String>,
    pub max_concurrent: Option<usize>,
}

impl VaultPlugin for ToyConfig {
    fn check(&mut self, v: &mut Validator<'_>, p: Loc<'_>, _: &VaultScope<'_>) {
        if let Some(prefix) = &self.prefix
            && (prefix.starts_with('/') || prefix.ends_with('/'))
        {
            v.err(p.key("prefix"), format!("invalid prefix `{prefix}`"));
        }
    }

    fn max_concurrent(&self) -> Option<usize> {
        self.max_concurrent
    }

    fn change_index(&self) -> Option<&str> {
        self.change_index.as_deref()
    }

    fn open(&self, name: &str) -> Result<Arc<dyn Vault>, PluginError> {
        Ok(Arc::new(ToyVault {
            name: name.to_owned(),
            prefix: self.prefix.clone().unwrap_or_default(),
            paths: Mutex::default(),
        }))
    }
}

struct Version {
    number: usize,
    rotation: RotationId,
    stage: Stage,
    /// `None` once retired.
    value: Option<Vec<u8>>,
}

/// One credential's versions, oldest first.
#[derive(Default)]
struct Versions {
    /// The last number handed out. It survives `destroy`, so a number
    /// remembered in state never names a newer value.
    last: usize,
    list: Vec<Version>,
}

pub struct ToyVault {
    name: String,
    prefix: String,
    paths: Mutex<HashMap<String, Versions>>,
}

impl ToyVault {
    fn key(&self, item: VaultItem<'_>) -> String {
        format!("{}{}", self.prefix, item.path)
    }

    fn err(&self, kind: ErrorKind, detail: impl std::fmt::Display) -> PluginError {
        PluginError::new(kind, format!("toy vault {}: {detail}", self.name))
    }

    fn number(&self, version: &VersionRef) -> Result<usize, PluginError> {
        version
            .0
            .parse::<usize>()
            .ok()
            .filter(|n| *n > 0)
            .ok_or_else(|| self.err(ErrorKind::Invalid, format!("no version {version}")))
    }
}

#[async_trait]
impl Vault for ToyVault {
    fn describe(&self) -> &str {
        &self.name
    }

    async fn stage(&self, new: Pending<'_>) -> Result<VersionRef, PluginError> {
        let mut paths = self.paths.lock().unwrap();
        let versions = paths.entry(self.key(new.item)).or_default();
        if let Some(v) = versions.list.iter().find(|v| v.rotation == *new.rotation) {
            return Ok(VersionRef(v.number.to_string()));
        }
        // One pending version per credential: an older one was abandoned.
        for v in versions
            .list
            .iter_mut()
            .filter(|v| v.stage == Stage::Pending)
        {
            v.stage = Stage::Retired;
            v.value = None;
        }
        versions.last += 1;
        versions.list.push(Version {
            number: versions.last,
            rotation: new.rotation.clone(),
            stage: Stage::Pending,
            value: Some(new.value.expose().to_vec()),
        });
        Ok(VersionRef(versions.last.to_string()))
    }

    async fn read(
        &self,
        item: VaultItem<'_>,
        select: Select<'_>,
    ) -> Result<Option<StoredVersion>, PluginError> {
        let wanted = match select {
            Select::Version(r) => Some(self.number(r)?),
            Select::Stage(_) => None,
        };
        let paths = self.paths.lock().unwrap();
        let Some(versions) = paths.get(&self.key(item)) else {
            return Ok(None);
        };
        let found = versions.list.iter().rev().find(|v| match select {
            Select::Stage(stage) => v.stage == stage,
            Select::Version(_) => Some(v.number) == wanted,
        });
        // Retired versions have no value left to read.
        Ok(found.and_then(|v| {
            Some(StoredVersion {
                version: VersionRef(v.number.to_string()),
                rotation: Some(v.rotation.clone()),
                stage: v.stage,
                value: SecretValue::new(v.value.clone()?),
            })
        }))
    }

    async fn promote(&self, item: VaultItem<'_>, version: &VersionRef) -> Result<(), PluginError> {
        let n = self.number(version)?;
        let mut paths = self.paths.lock().unwrap();
        let versions = paths.entry(self.key(item)).or_default();
        match versions.list.iter().find(|v| v.number == n) {
            None => return Err(self.err(ErrorKind::NotFound, format!("no version {n}"))),
            Some(v) if v.stage == Stage::Current => return Ok(()),
            Some(v) if v.stage == Stage::Retired => {
                return Err(self.err(ErrorKind::Invalid, format!("version {n} is retired")));
            }
            Some(_) => {}
        }
        // Pending, or previous for a rollback.
        for v in versions.list.iter_mut() {
            if v.number == n {
                v.stage = Stage::Current;
            } else if v.stage == Stage::Current {
                v.stage = Stage::Previous;
            } else if v.stage == Stage::Previous {
                v.stage = Stage::Retired;
                v.value = None;
            }
        }
        Ok(())
    }

    async fn retire(&self, item: VaultItem<'_>, version: &VersionRef) -> Result<(), PluginError> {
        let n = self.number(version)?;
        let mut paths = self.paths.lock().unwrap();
        let Some(v) = paths
            .get_mut(&self.key(item))
            .and_then(|vs| vs.list.iter_mut().find(|v| v.number == n))
        else {
            return Ok(());
        };
        match v.stage {
            Stage::Previous | Stage::Retired => {
                v.stage = Stage::Retired;
                v.value = None;
                Ok(())
            }
            s => Err(self.err(ErrorKind::Invalid, format!("version {n} is {s}"))),
        }
    }

    async fn destroy(&self, item: VaultItem<'_>) -> Result<(), PluginError> {
        if let Some(versions) = self.paths.lock().unwrap().get_mut(&self.key(item)) {
            versions.list.clear();
        }
        Ok(())
    }

    async fn check(&self) -> Result<(), PluginError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::audit::AuditLog;
    use crate::model::{AgentId, CredentialId, CredentialKey};
    use crate::rotation::{Catalog, Engine};
    use crate::state::{MemoryStore, StateStore};

    async fn contract_subject() -> (ToyVault, String, ()) {
        let vault = ToyVault {
            name: "toy".into(),
            prefix: "kt-".into(),
            paths: Mutex::default(),
        };
        (vault, "agents/bot/db".to_owned(), ())
    }

    crate::vaults::contract::vault_contract!(open = contract_subject);

    #[tokio::test(start_paused = true)]
    async fn a_toy_vault_from_toml_rotates_through_the_engine_under_paused_time() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().display();
        let text = format!(
            r#"[daemon]
state_dir = "{d}/state"
socket = "{d}/control.sock"
[vaults.play]
type = "toy"
prefix = "kt-"
{agent}[agents.bot.credentials.db]
vault = "play"
generate = {{ kind = "password", length = 24 }}
every = "1h"
grace = "10m"
"#,
            agent = crate::test_support::agent_table("bot")
        );
        let config = crate::config::load_str(&dir.path().join("k.toml"), &text).unwrap();
        let catalog = Catalog::build(config, None).unwrap();
        let vault = catalog.vaults["play"].vault.clone();
        let store = Arc::new(MemoryStore::new());
        let audit = AuditLog::open_inline(&dir.path().join("audit.log"), None).unwrap();
        let start = chrono::DateTime::from_timestamp(1_798_761_600, 0).unwrap();
        let clock = crate::rotation::TokioClock::starting_at(start);
        let (engine, cancel, tracker) =
            Engine::paused_for_test(catalog, store.clone(), audit, clock);
        engine.start().await.unwrap();
        let e = engine.clone();
        tracker.spawn(async move { e.run_scheduler(None, || {}).await });

        let key = CredentialKey::new(
            AgentId::new("bot").unwrap(),
            CredentialId::new("db").unwrap(),
        );
        let item = VaultItem {
            key: &key,
            path: "agents/bot/db",
        };
        let current = || async {
            vault
                .read(item, Select::Stage(Stage::Current))
                .await
                .unwrap()
                .map(|v| (v.version.0, v.value.expose().to_vec()))
        };
        // The initial rotation, then one an hour later: each promoted in
        // the toy vault and recorded in state.
        let mut seen = Vec::new();
        for expected in ["1", "2"] {
            for _ in 0..4000 {
                if current().await.is_some_and(|(v, _)| v == expected) {
                    break;
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            let (version, value) = current().await.expect("a current version");
            assert_eq!(version, expected);
            assert_eq!(value.len(), 24, "the configured generator");
            seen.push(value);
        }
        assert_ne!(seen[0], seen[1], "a new value");
        let previous = vault
            .read(item, Select::Stage(Stage::Previous))
            .await
            .unwrap()
            .expect("the previous version is live during its grace");
        assert_eq!(previous.value.expose(), seen[0].as_slice());
        // Its grace ends: the engine retires it through the toy vault.
        tokio::time::sleep(Duration::from_secs(11 * 60)).await;
        assert!(
            vault
                .read(item, Select::Stage(Stage::Previous))
                .await
                .unwrap()
                .is_none(),
            "retired after the grace period"
        );
        let row = store.credential(&key).unwrap().expect("a state row");
        assert_eq!(row.current_version, Some(2));
        cancel.cancel();
        tracker.close();
        tracker.wait().await;
    }
}
