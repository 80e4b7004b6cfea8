//! STUB.
use std::path::Path;

use async_trait::async_trait;

use super::{Select, StoredVersion, Vault, VaultItem, VersionRef};
use crate::model::{PluginError, RotationId, SecretValue};

pub struct LocalKey;
pub struct LocalVault;

pub fn load_key(_key_file: &Path, _key_credential: &str) -> Result<LocalKey, PluginError> {
    unimplemented!()
}

impl LocalVault {
    pub fn open(_name: &str, _dir: &Path, _key: LocalKey) -> Result<LocalVault, PluginError> {
        unimplemented!()
    }
}

#[async_trait]
impl Vault for LocalVault {
    fn name(&self) -> &str {
        unimplemented!()
    }
    async fn stage(
        &self,
        _: VaultItem<'_>,
        _: &RotationId,
        _: &SecretValue,
    ) -> Result<VersionRef, PluginError> {
        unimplemented!()
    }
    async fn read(
        &self,
        _: VaultItem<'_>,
        _: Select<'_>,
    ) -> Result<Option<StoredVersion>, PluginError> {
        unimplemented!()
    }
    async fn promote(&self, _: VaultItem<'_>, _: &VersionRef) -> Result<(), PluginError> {
        unimplemented!()
    }
    async fn retire(&self, _: VaultItem<'_>, _: &VersionRef) -> Result<(), PluginError> {
        unimplemented!()
    }
    async fn destroy(&self, _: VaultItem<'_>) -> Result<(), PluginError> {
        unimplemented!()
    }
    async fn check(&self) -> Result<(), PluginError> {
        unimplemented!()
    }
}
