//! Targets: the system a credential unlocks, where a new value is applied
//! (`set`) and tried (`test`) before it is promoted, and where the previous
//! value is retired once its grace period ends.
//!
//! - `none` (the default) is no target at all: a pure shared secret, nothing
//!   to apply, so the engine skips `set` and `test`.
//! - [`postgres`]: `ALTER ROLE ... PASSWORD` over an admin connection, with the
//!   `single_user` and `alternating_users` strategies.
//! - [`command`]: a hook program for any other system (secret on stdin).

use std::sync::Arc;

use async_trait::async_trait;

use crate::config::TargetConfig;
use crate::model::{CredentialKey, PluginError, SecretValue, VersionNo};

pub mod command;
pub mod postgres;

#[async_trait]
pub trait Target: Send + Sync {
    /// Short description for logs and status (`postgres:invoice_bot`).
    fn describe(&self) -> String;

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

    /// Called when the grace period of `previous` ends: the previous value
    /// must stop working where the target can tell values apart (the other
    /// role of `alternating_users`). Idempotent; a no-op by default, which is
    /// right for targets that hold one value at a time.
    async fn retire(&self, _key: &CredentialKey, _previous: VersionNo) -> Result<(), PluginError> {
        Ok(())
    }

    /// The user name `version` logs in as, when the target decides it
    /// (`alternating_users` flips between two roles). Sinks deliver it next
    /// to the password (json/env formats). `None`: the agent's config knows.
    fn login_for(&self, _version: VersionNo) -> Option<String> {
        None
    }

    /// Revokes every value at the target (decommission).
    async fn revoke(&self, key: &CredentialKey) -> Result<(), PluginError>;

    async fn check(&self) -> Result<(), PluginError>;
}

/// Builds the target a credential's config names; `None` for `none` (a
/// pure shared secret: nothing to apply). No I/O: connections are made when
/// a step runs, so a target that is down does not stop start-up.
pub fn build(cfg: &TargetConfig) -> Result<Option<Arc<dyn Target>>, PluginError> {
    Ok(match cfg {
        TargetConfig::None => None,
        TargetConfig::Postgres(c) => Some(Arc::new(postgres::PostgresTarget::new((**c).clone())?)),
        TargetConfig::Command(c) => Some(Arc::new(command::CommandTarget::new((**c).clone()))),
    })
}
