//! `none`: a pure shared secret. Nothing to apply or test; every stored
//! version "works", so invariant 1 holds trivially.

use async_trait::async_trait;

use super::Target;
use crate::model::{CredentialKey, PluginError, SecretValue, VersionNo};

#[derive(Debug, Default)]
pub struct NoTarget;

#[async_trait]
impl Target for NoTarget {
    fn describe(&self) -> String {
        "none".into()
    }
    fn uses_value(&self) -> bool {
        false
    }
    fn has_steps(&self) -> bool {
        false
    }
    async fn set(
        &self,
        _: &CredentialKey,
        _: VersionNo,
        _: &SecretValue,
    ) -> Result<(), PluginError> {
        Ok(())
    }
    async fn test(
        &self,
        _: &CredentialKey,
        _: VersionNo,
        _: &SecretValue,
    ) -> Result<(), PluginError> {
        Ok(())
    }
    async fn revoke(&self, _: &CredentialKey) -> Result<(), PluginError> {
        Ok(())
    }
    async fn check(&self) -> Result<(), PluginError> {
        Ok(())
    }
}
