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

/// Builds the target a credential's config names. No I/O: connections are
/// made when a step runs, so a target that is down does not stop start-up.
pub fn build(cfg: &TargetConfig) -> Result<Arc<dyn Target>, PluginError> {
    match cfg {
        TargetConfig::None => Ok(Arc::new(none::NoTarget)),
        TargetConfig::Postgres(_) | TargetConfig::Command(_) => Err(PluginError::new(
            crate::model::ErrorKind::Invalid,
            "this target type is not available in this build yet",
        )),
    }
}
