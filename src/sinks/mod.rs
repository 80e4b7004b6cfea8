//! Sinks: how a running agent receives a new version.
//!
//! One file per sink behind the [`Sink`] trait. A sink does one delivery and
//! reports; the engine owns retries and audit. `deliver` is idempotent per
//! version: delivering the same version twice leaves the same result.

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use crate::model::{CredentialKey, PluginError, RotationId, SecretValue, ValueKind, VersionNo};

pub mod file;

/// What a sink is told about the version it delivers (everything but the value).
#[derive(Debug, Clone)]
pub struct Notice {
    pub key: CredentialKey,
    pub tenant: String,
    pub owner: String,
    pub version: VersionNo,
    pub rotation: RotationId,
    pub rotated_at: DateTime<Utc>,
    /// When the agent should expect the next value (next due + grace); a hint only.
    pub expires_hint: Option<DateTime<Utc>>,
    pub kind: ValueKind,
    /// The public half of a keypair, when there is one (not secret).
    pub public: Option<String>,
    /// The user name this version logs in as, when the target decides it
    /// (PostgreSQL `alternating_users`: it changes with every rotation).
    pub login: Option<String>,
}

/// The outcome of a delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivered {
    /// The agent has it (a file is in place: the agent reads it when it wants).
    Acknowledged,
    /// Sent, but the agent has not confirmed it yet.
    Sent,
}

#[async_trait]
pub trait Sink: Send + Sync {
    /// Short description for logs and status, e.g. `file:/run/keyturn/a/db`.
    fn describe(&self) -> String;

    async fn deliver(&self, notice: &Notice, value: &SecretValue)
    -> Result<Delivered, PluginError>;

    /// Removes what was delivered (decommission).
    async fn retract(&self, key: &CredentialKey) -> Result<(), PluginError>;

    /// Checks, before the first delivery, that delivery can work (directory
    /// exists or can be created, no symlink in the way, writable). Also the
    /// place to clean up stale temp files.
    async fn preflight(&self) -> Result<(), PluginError>;
}
