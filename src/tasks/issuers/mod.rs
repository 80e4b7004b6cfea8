//! Task issuers: mint a credential for one task at the system that enforces
//! it, and revoke it.
//!
//! An issuer does the minimum, like every plug-in: one mint, one revoke, one
//! check that the credential no longer works, a typed error with a `kind`;
//! the task manager owns retries, timers, persistence and audit.
//!
//! # The contract
//! - **Attribution.** Every issuer writes the task's [`TaskAttribution`]
//!   (task id, agent, tenant, use case, run id, initiator, sensitivity)
//!   where its system keeps it next to the credential (a role's comment and
//!   `application_name`, STS session tags and `SourceIdentity`, token
//!   metadata), so that the system's own logs name the task.
//! - **Lifetime.** The credential expires at the system by itself at
//!   [`IssueRequest::expires_at`] where the system can say so (`VALID UNTIL`,
//!   `DurationSeconds`, a token TTL), so that a keyturn that is down at the
//!   TTL still does not leave it working.
//! - **Crash safety.** The task is persisted before `issue` runs. If keyturn
//!   dies after the mint and before it recorded [`Issued::handle`], `revoke`
//!   is called with `handle: None` and must find the credential from the
//!   task id alone where the system allows (a role named after the task), or
//!   say in [`Revoked::ExpiresAt`] when it ends by itself (by the task's
//!   expiry, which `revoke` is given, when the system enforced it). An
//!   issuer that can name the credential before minting it (an STS
//!   session: its role, and a name that follows from the task) says so in
//!   [`TaskIssuer::handle_before_issue`]; that handle is recorded with the
//!   task and given to `revoke` and `verify_revoked` instead of `None`.
//! - **Failed issues.** An `issue` error may leave a credential behind (the
//!   answer to the mint was lost): the manager then revokes as after a
//!   crash. An issuer that knows nothing is left (the system refused the
//!   mint, or what it minted was revoked at once) says so with
//!   [`IssueError::nothing_left`], and the task ends at once.
//! - **Idempotence.** `issue` for a task id that was already issued either
//!   returns the same credential's handle with fresh values (a role's
//!   password set again) or mints a new one and revokes nothing; `revoke`
//!   and `verify_revoked` are harmless twice and after the credential is gone.
//! - **Secrets.** Values only in [`SecretValue`]; never in errors, logs,
//!   the handle or `public` fields.
//! - **Origin.** "Not found" means "revoked" only at the system that minted
//!   the credential. An issuer whose settings name the system (an address,
//!   an admin DSN) says which one it reaches in [`TaskIssuer::origin`]; the
//!   manager records that with each credential before minting and revokes
//!   or verifies it only while the issuer still reaches the same system.
//!
//! # Adding an issuer
//! Write `tasks/issuers/NAME.rs` (a folder when large) with its config struct
//! (`[issuers.X] type = "NAME"`, `deny_unknown_fields`), its grant struct (the
//! table a policy level gives it), `impl IssuerPlugin` (check the config and
//! a grant through the [`Validator`], build the issuer without I/O) and `impl
//! TaskIssuer`, with tests against the real system. Then one line in the
//! registry below.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;

use crate::config::validate::{Loc, Validator};
use crate::model::{PluginError, SecretValue};
use crate::plugin::registry;

pub mod aws_sts;
pub mod postgres;
#[cfg(test)]
mod test_support;
pub mod vault_token;

registry! {
    /// `[issuers.NAME] type = ...`: one variant per issuer.
    pub enum IssuerConfig: IssuerPlugin {
        Postgres(postgres::PgIssuerConfig),
        VaultToken(vault_token::TokenIssuerConfig),
        AwsSts(aws_sts::StsIssuerConfig),
    }
}

/// Who a task is for and why: carried into every system that sees the
/// task's credential, and into every audit record about it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TaskAttribution {
    /// keyturn's id for the task (unique, URL- and identifier-safe:
    /// lowercase letters and digits, at most 32 characters).
    pub task_id: String,
    pub agent: String,
    pub tenant: String,
    pub use_case: String,
    /// The agent framework's id for the run the task belongs to.
    pub run_id: String,
    /// The human (or system) who started the run.
    pub initiator: String,
    /// The sensitivity level the policy granted (e.g. `low`, `high`).
    pub sensitivity: String,
}

/// What a policy level grants at one issuer: the level's table for that
/// issuer, as written. The issuer checks it with
/// [`IssuerPlugin::check_grant`] when the config is loaded and reads it
/// with [`Grant::parse`] into its own struct when it issues.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Grant(pub serde_json::Value);

impl Grant {
    /// The grant as the issuer's own struct.
    pub fn parse<T: serde::de::DeserializeOwned>(&self) -> Result<T, String> {
        serde_json::from_value(self.0.clone()).map_err(|e| e.to_string())
    }
}

/// One issuance.
#[derive(Debug, Clone)]
pub struct IssueRequest<'a> {
    pub task: &'a TaskAttribution,
    pub grant: &'a Grant,
    /// The task's TTL, whole seconds.
    pub ttl: Duration,
    /// When the credential must stop working at the latest.
    pub expires_at: SystemTime,
}

/// What an issuer minted.
#[derive(Debug)]
pub struct Issued {
    /// What `revoke` needs to find the credential (a role name, an access
    /// key id, a token accessor). Persisted in state: never secret.
    pub handle: String,
    /// Fields the agent needs that are not secret (a user name, a host, an
    /// access key id, the expiry), delivered with the secrets.
    pub public: BTreeMap<String, String>,
    /// The secret fields (a password, a secret access key and session
    /// token, a token).
    pub secret: BTreeMap<String, SecretValue>,
    /// When the system itself ends the credential (at or before the TTL).
    pub expires_at: SystemTime,
}

/// What `revoke` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Revoked {
    /// The credential no longer works (or was never minted).
    Now,
    /// The credential no longer works, but something of it is left at the
    /// system, which an operator should clear by hand: what, and how (a
    /// PostgreSQL task role that owns objects, disabled but not dropped).
    /// Kept on the item and in its `task.revoked` record.
    Left(String),
    /// The system cannot end it early; it stops working by itself then
    /// (STS session credentials without a deny policy, a token whose
    /// accessor was never recorded).
    ExpiresAt(SystemTime),
}

/// Why [`TaskIssuer::issue`] failed, and whether a credential may be left
/// at the system.
#[derive(Debug)]
pub struct IssueError {
    pub error: PluginError,
    /// `false`: the mint may have happened (a lost answer, a token that
    /// could not be revoked); the manager revokes by task id as after a
    /// crash. `true`: nothing of this task is left at the system.
    pub nothing_left: bool,
}

impl IssueError {
    /// The system refused the mint, or what it minted is already revoked.
    pub fn nothing_left(error: PluginError) -> Self {
        Self {
            error,
            nothing_left: true,
        }
    }
}

/// An error whose mint may have happened.
impl From<PluginError> for IssueError {
    fn from(error: PluginError) -> Self {
        Self {
            error,
            nothing_left: false,
        }
    }
}

impl std::fmt::Display for IssueError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.error.fmt(f)
    }
}

/// A task issuer at one system.
#[async_trait]
pub trait TaskIssuer: Send + Sync {
    /// `type:name`-like text for messages (`postgres:127.0.0.1:5432`).
    fn describe(&self) -> String;

    /// What the task's credential is at the system, for the identity
    /// surface (`role kt_task_…`, `token accessor …`, `STS session …`):
    /// never secret. `handle` is [`Issued::handle`] when it was recorded.
    fn object(&self, task: &TaskAttribution, handle: Option<&str>) -> String {
        match handle {
            Some(h) => h.to_owned(),
            None => format!("not recorded (task {})", task.task_id),
        }
    }

    /// What names the credential [`Self::issue`] is about to mint for
    /// `req`, when the issuer knows it before the mint, or `None` (the
    /// default). The manager records it with the item as the task is
    /// persisted, before anything is issued: after a crash between the mint
    /// and its record, or an `issue` whose answer was lost, `revoke` and
    /// `verify_revoked` are given this handle instead of `None`, so an
    /// issuer that can end a credential early ends this one too. A handle
    /// from `issue` replaces it. Not secret, and no I/O.
    fn handle_before_issue(&self, req: &IssueRequest<'_>) -> Option<String> {
        let _ = req;
        None
    }

    /// The system this issuer reaches now, as a stable, non-secret identity
    /// taken from its settings (`vault_token`: the address and namespace;
    /// `postgres`: the admin DSN's hosts and ports), or `None` when the
    /// handle itself names the system or revocation looks nothing up (the
    /// default). Recorded with each credential before it is minted; the
    /// manager revokes and verifies a credential only while this is still
    /// what was recorded, as a credential another system does not know of
    /// is not revoked.
    async fn origin(&self) -> Result<Option<String>, PluginError> {
        Ok(None)
    }

    /// Refuses what [`Self::issue`] would refuse without calling the
    /// system (a TTL it cannot mint, a grant it cannot use). The manager
    /// asks every issuer of a task before any of them mints, so such a
    /// refusal leaves no other issuer's credential behind. The default
    /// accepts.
    async fn precheck(&self, req: &IssueRequest<'_>) -> Result<(), PluginError> {
        let _ = req;
        Ok(())
    }

    /// Whether [`Self::revoke`] ends the credential at once (`false`: it
    /// expires by itself). Those that can be ended are minted first, so a
    /// failing later issuer leaves nothing that outlives the task's end.
    fn ends_early(&self) -> bool {
        true
    }

    /// Mints the task's credential per the grant, expiring at the system
    /// by `expires_at` where it can.
    async fn issue(&self, req: &IssueRequest<'_>) -> Result<Issued, IssueError>;

    /// Ends the task's credential: `handle` is [`Issued::handle`], or `None`
    /// when keyturn did not record it (a crash between mint and record, an
    /// `issue` that failed). `expires_at` is the task's expiry, the
    /// [`IssueRequest::expires_at`] it was issued with: a credential the
    /// system ends by itself ends by then. Harmless when it is already gone.
    async fn revoke(
        &self,
        task: &TaskAttribution,
        handle: Option<&str>,
        expires_at: SystemTime,
    ) -> Result<Revoked, PluginError>;

    /// Whether the credential is refused by the system now (checked through
    /// the system, not keyturn's memory).
    async fn verify_revoked(
        &self,
        task: &TaskAttribution,
        handle: Option<&str>,
    ) -> Result<bool, PluginError>;

    /// The issuer can reach and authenticate to its system
    /// (`keyturn check --online`).
    async fn check(&self) -> Result<(), PluginError>;

    /// Refuses, at the system, a policy level's `grant` whose tasks (of up
    /// to `max_ttl`) every start would fail or cut short there (`keyturn
    /// check --online`), with the code a start runs where there is one.
    /// Changes nothing. `Ok(Some(note))`: what could not be checked. The
    /// default: nothing to check there.
    async fn check_grant(
        &self,
        grant: &Grant,
        max_ttl: Duration,
    ) -> Result<Option<String>, PluginError> {
        let _ = (grant, max_ttl);
        Ok(None)
    }
}

/// What the registry needs of an issuer's config.
pub trait IssuerPlugin: std::fmt::Debug + Send + Sync {
    /// Reports every problem of `[issuers.NAME]` at `at` and completes it in
    /// place (relative paths resolved).
    fn check(&mut self, v: &mut Validator<'_>, at: Loc<'_>);

    /// Reports every problem of a policy level's grant for this issuer.
    fn check_grant(&self, grant: &Grant, v: &mut Validator<'_>, at: Loc<'_>);

    /// Why this issuer refuses every task of a level whose tasks may live
    /// `max_ttl` (a TTL above its own limit), if it does. The default:
    /// no limit.
    fn refuses_ttl(&self, max_ttl: Duration) -> Option<String> {
        let _ = max_ttl;
        None
    }

    /// The issuer. No I/O: connect when a task needs it.
    fn build(&self) -> Result<Arc<dyn TaskIssuer>, PluginError>;
}
