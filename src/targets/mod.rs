//! Targets: the system a credential unlocks, where a new value is applied
//! (`set`) and tried (`test`) before it is promoted. Only `none` exists so far
//! (pure shared secrets); PostgreSQL and command hooks come later behind the
//! same trait.

use std::sync::Arc;

use async_trait::async_trait;

use crate::config::TargetConfig;
use crate::model::{CredentialKey, PluginError, SecretValue, VersionNo};

pub mod none;

#[async_trait]
pub trait Target: Send + Sync {
    /// Short description for logs and status (`none`, `postgres:invoice_bot`).
    fn describe(&self) -> String;

    /// Whether `set`/`test` need the pending value. The engine skips reading
    /// it back from the vault when they do not.
    fn uses_value(&self) -> bool {
        true
    }

    /// Applies the pending value at the target. Idempotent per version.
    async fn set(
        &self,
        key: &CredentialKey,
        version: VersionNo,
        value: &SecretValue,
    ) -> Result<(), PluginError>;

    /// Uses the pending value at the target (e.g. logs in with it).
    async fn test(
        &self,
        key: &CredentialKey,
        version: VersionNo,
        value: &SecretValue,
    ) -> Result<(), PluginError>;

    /// Revokes every value at the target (decommission).
    async fn revoke(&self, key: &CredentialKey) -> Result<(), PluginError>;

    async fn check(&self) -> Result<(), PluginError>;
}

/// Builds the target a credential's config names.
pub fn build(cfg: &TargetConfig) -> Arc<dyn Target> {
    match cfg {
        TargetConfig::None => Arc::new(none::NoTarget),
    }
}
