//! Sinks: how a running agent receives a new version.
//!
//! One file per sink behind the [`Sink`] trait. A sink does one delivery and
//! reports; the engine owns retries and audit. `deliver` is idempotent per
//! version: delivering the same version twice leaves the same result.
//!
//! # Adding a sink
//! Write `sinks/NAME.rs` (a folder when it is large) holding:
//! - its config struct (`serde::Deserialize`, `Serialize`, `Clone`,
//!   `PartialEq`, `Debug`, `#[serde(deny_unknown_fields)]`), the keys of
//!   `deliver = [{ type = "NAME", ... }]` as written;
//! - `impl SinkPlugin` for it: `check` reports every problem through the
//!   [`Validator`] (claiming the place it writes through the
//!   [`SinkScope`], so two sinks never write one place) and completes the
//!   config in place; `build` makes the [`Sink`] (no I/O);
//! - the `Sink` itself, and its tests.
//!
//! Then add one line to [`SinkConfig`] below. Nothing else changes.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use crate::config::validate::{Loc, SinkScope, Validator};
use crate::model::{CredentialKey, PluginError, RotationId, SecretValue, ValueKind, VersionNo};
use crate::plugin::registry;

pub mod exec;
pub mod file;
pub mod signal;
pub mod webhook;

registry! {
    /// One entry of a credential's `deliver = [...]`: one variant per sink.
    pub enum SinkConfig: SinkPlugin {
        File(file::FileConfig),
        Exec(exec::ExecConfig),
        Signal(signal::SignalConfig),
        Webhook(webhook::WebhookConfig),
    }
}

/// What the registry needs of a sink's config.
pub trait SinkPlugin: std::fmt::Debug + Send + Sync {
    /// Reports every problem of the entry at `at` and completes it in place.
    fn check(&mut self, v: &mut Validator<'_>, at: Loc<'_>, scope: &mut SinkScope<'_, '_>);

    /// The sink. No I/O: `Sink::preflight` checks the place before the
    /// first delivery.
    fn build(self: Box<Self>, ctx: &SinkContext<'_>) -> Result<Arc<dyn Sink>, PluginError>;

    /// Another credential whose current value the sink reads when it
    /// delivers (a webhook's signing key), once `check` accepted it: the
    /// catalog builds it with a reader for it ([`SinkContext::reader`]).
    fn reads_credential(&self) -> Option<CredentialKey> {
        None
    }
}

/// Reads the current value of one credential from its primary vault.
#[async_trait]
pub trait CurrentValue: std::fmt::Debug + Send + Sync {
    async fn current(&self) -> Result<SecretValue, PluginError>;

    /// Its previous value while that is in its grace period (`None` once
    /// retired, or when there is none).
    async fn previous(&self) -> Result<Option<SecretValue>, PluginError> {
        Ok(None)
    }
}

/// What a sink is built with besides its own config.
#[derive(Debug, Clone, Copy)]
pub struct SinkContext<'a> {
    /// `daemon.delivery_roots`.
    pub delivery_roots: &'a [PathBuf],
    /// The agent's `uid` and `gid`: what it delivers belongs to them
    /// (`None`: the daemon's own).
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    /// The agent's `uid` before the reload that changed it: directories of
    /// the agent's it still owns are handed to the new one (black-box
    /// finding: they were refused as someone else's, and no delivery of the
    /// agent's got through until a `chown` by hand).
    pub former_uid: Option<u32>,
    /// The reader of the credential [`SinkPlugin::reads_credential`] names.
    pub reader: Option<&'a Arc<dyn CurrentValue>>,
}

impl SinkConfig {
    pub fn build(self, ctx: &SinkContext<'_>) -> Result<Arc<dyn Sink>, PluginError> {
        self.into_plugin().build(ctx)
    }
}

/// A sink that can only take back what was delivered at `path` (a file,
/// or a bundle directory) below one of `delivery_roots`: a decommission
/// retracts with it once the credential's own sink is gone from the config.
pub fn delivered_at(path: &Path, delivery_roots: &[PathBuf]) -> Result<Arc<dyn Sink>, PluginError> {
    Ok(Arc::new(file_at(path, delivery_roots)?))
}

/// Whether what was delivered at `path` (below one of `delivery_roots`) is
/// gone, never following a link: `Ok` says how (naming what the agent kept
/// in a bundle directory), `Err` what of keyturn's is still there.
pub async fn retracted_at(path: &Path, delivery_roots: &[PathBuf]) -> Result<String, PluginError> {
    file_at(path, delivery_roots)?.retracted().await
}

fn file_at(path: &Path, delivery_roots: &[PathBuf]) -> Result<file::FileSink, PluginError> {
    let cfg = file::FileConfig {
        path: path.to_path_buf(),
        format: None,
        mode: None,
        env_name: None,
        atomic: None,
        ack: None,
    };
    let ctx = SinkContext {
        delivery_roots,
        uid: None,
        gid: None,
        former_uid: None,
        reader: None,
    };
    file::FileSink::new(cfg, &ctx)
}

/// What a sink is told about the version it delivers (everything but the value).
#[derive(Debug, Clone)]
pub struct Notice {
    pub key: CredentialKey,
    pub tenant: String,
    pub owner: String,
    pub version: VersionNo,
    /// The version this one replaces (`None` for the first).
    pub previous_version: Option<VersionNo>,
    pub rotation: RotationId,
    pub rotated_at: DateTime<Utc>,
    /// When this value stops working at the latest: the next rotation
    /// (due time) plus grace, by which the next value has long arrived; a
    /// hint only.
    pub expires_hint: Option<DateTime<Utc>>,
    pub kind: ValueKind,
    /// The public half of a keypair, when there is one (not secret).
    pub public: Option<String>,
    /// The user name this version logs in as, when the target decides it
    /// (PostgreSQL `alternating_users`: it changes with every rotation).
    pub login: Option<String>,
    /// Until when the previous version keeps working (delivery + grace);
    /// `None` when there is no previous version.
    pub grace_until: Option<DateTime<Utc>>,
    /// Where a sink of the same credential put the value on disk (the
    /// first one that has a [`Sink::delivered_path`]), for sinks that only
    /// tell the agent where to look.
    pub file: Option<PathBuf>,
}

/// Resolves when a consumer has acknowledged a version by itself (a file
/// sink with `ack = "open"`: the file was opened after it was put in place).
pub type AckWatch = Pin<Box<dyn Future<Output = Result<(), PluginError>> + Send>>;

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

    /// The sink's `type` (`file`, `exec`, ...): the `sink` label of the
    /// deliveries metric.
    fn kind(&self) -> &'static str;

    async fn deliver(&self, notice: &Notice, value: &SecretValue)
    -> Result<Delivered, PluginError>;

    /// The previous version was retired: anything of it kept for readers
    /// mid-read goes now (a bundle's previous directory and its private key).
    async fn retire_previous(&self, _key: &CredentialKey) -> Result<(), PluginError> {
        Ok(())
    }

    /// Removes what was delivered (decommission).
    async fn retract(&self, key: &CredentialKey) -> Result<(), PluginError>;

    /// Checks, before the first delivery, that delivery can work (directory
    /// exists or can be created, no symlink in the way, writable). Also the
    /// place to clean up stale temp files.
    async fn preflight(&self) -> Result<(), PluginError>;

    /// Whether the sink only tells the agent to look again (a signal)
    /// rather than handing it the value. The catalog delivers these after
    /// a credential's other sinks, so the agent finds what they wrote.
    fn only_notifies(&self) -> bool {
        false
    }

    /// How this sink writes its file, if it writes one: equal for two
    /// sinks (of two configs) whose files are written alike (path, format,
    /// mode, owner...). A reload gives the current version at once to a
    /// sink whose file is not written as before (`rotation/restore.rs`).
    fn written_as(&self) -> Option<String> {
        None
    }

    /// The file (or bundle directory) this sink delivers to, if it writes
    /// one: the notice of the credential's other sinks names it.
    fn delivered_path(&self) -> Option<&Path> {
        None
    }

    /// Whether a failed delivery fails the deliver step (retried with it,
    /// the rotation waiting). A sink that answers `false` (a webhook to a
    /// receiver that may be down) is retried by the engine in the
    /// background instead: its consumer counts as not yet acknowledged, the
    /// other sinks and the rotation go on.
    fn holds_up_rotation(&self) -> bool {
        true
    }

    /// Whether its consumer acknowledges deliveries by itself (a file
    /// sink's `ack`): its deliveries return [`Delivered::Sent`] and it is
    /// awaited. `false` (the default): a delivery that succeeds is
    /// acknowledged, and one awaited from before a reload or restart that
    /// took its `ack` away is awaited no more.
    fn awaits_ack(&self) -> bool {
        false
    }

    /// For a delivery of `version` that returned [`Delivered::Sent`]: a
    /// watch that resolves when the consumer acknowledges it by itself.
    /// `None` (the default): only `keyturn ack` acknowledges it. Called
    /// right after `deliver`, and after a restart for a version still
    /// awaited (then anything from now on counts).
    fn ack_watch(&self, _key: &CredentialKey, _version: VersionNo) -> Option<AckWatch> {
        None
    }
}
