//! The `aws_sts` task issuer: a task's credential is an STS session of an
//! IAM role, narrowed by a session policy, tagged with the task's
//! attribution and lasting the task's TTL.
//!
//! # Issue
//! `AssumeRole` of the grant's `role_arn` with
//! - `RoleSessionName` = `keyturn-<task_id>`: CloudTrail names every call of
//!   the session after the task, and IAM sees it in `aws:userid`
//!   (`ROLEID:keyturn-<task_id>`);
//! - `Policy` = the grant's session policy, sent packed (no whitespace). The
//!   session may do only what both the role's policies and the session
//!   policy allow (AWS: "the intersection of the role's identity-based
//!   policy and the session policies");
//! - `DurationSeconds` = the task's TTL. STS takes 900 s to the role's
//!   `MaxSessionDuration` (at most 43,200 s; above the role's own maximum
//!   STS refuses, `invalid`). A TTL below 900 s gets 900 s only with
//!   `revoke_with_deny_policy`, which lets the task manager end the session
//!   at the TTL (see Revoke); without it such a TTL is refused (`invalid`)
//!   rather than silently stretched, since a 5-minute task would otherwise
//!   hold a credential for 15;
//! - session tags `task_id`, `agent`, `tenant`, `use_case`, `run_id`,
//!   `initiator`, `sensitivity` (not transitive: a role chained from the
//!   session does not carry them), and `SourceIdentity` = the initiator,
//!   which AWS keeps across role chaining and logs in CloudTrail. The
//!   role's trust policy must allow `sts:TagSession` and
//!   `sts:SetSourceIdentity` besides `sts:AssumeRole`;
//! - `ExternalId` when the grant has one.
//!
//! Tag values and the source identity must match STS's patterns. keyturn
//! sanitises them deterministically ([`tag_value`], [`source_identity`]):
//! every character outside the allowed ASCII set becomes `_`, then the text
//! is cut to STS's length (256 characters for a tag value, 64 for the source
//! identity, padded with `_` to its minimum of 2). Non-ASCII letters, which
//! AWS allows in tag values, become `_` too: the rule stays one simple,
//! predictable mapping. The audit record keeps the attribution as given.
//!
//! The handle is a small JSON object ([`StsHandle`]: role ARN, the
//! `AssumedRoleId`, access key id, expiry), never secret. The agent gets
//! `access_key_id`, `expiration`, `region` and `assumed_role_arn` as public
//! fields and `secret_access_key` and `session_token` as secrets.
//!
//! # Revoke
//! STS session credentials cannot be deleted: they work until their
//! expiration. A session whose expiration has passed is [`Revoked::Now`].
//! Otherwise:
//! - by default `revoke` answers [`Revoked::ExpiresAt`] with the session's
//!   expiration from the handle;
//! - with `revoke_with_deny_policy = true` it ends the session the way AWS
//!   documents ("Disabling permissions for temporary security
//!   credentials"): a statement denying `*` to `aws:userid` =
//!   `ROLEID:keyturn-<task_id>` (the `AssumedRoleId`, exactly this task's
//!   sessions, not the role's other sessions, unlike `aws:TokenIssueTime`)
//!   in the role's inline policy `keyturn-revoked-sessions`
//!   (`GetRolePolicy`, then `PutRolePolicy`), and answers [`Revoked::Now`].
//!   Sessions expiring in the same 5 minutes share a statement
//!   (`KeyturnRevokedUntil<unix seconds>`), which is dropped at the next
//!   revocation once they have all expired; statements that are not
//!   keyturn's are kept. IAM applies a policy change within seconds
//!   (eventual consistency), not at the instant of the call. Limits: an
//!   inline policy holds 10,240 characters per role, about 150 revoked,
//!   unexpired sessions (IAM then refuses the write: `invalid`, and the
//!   session still ends at its expiration); the read-modify-write is
//!   serialised within one keyturn, but two keyturn daemons revoking on one
//!   role at the same moment can lose one entry (IAM has no conditional
//!   write) — `verify_revoked` reads the policy back, so the task manager
//!   sees it and revokes again.
//! - a session whose AssumeRole answer was never recorded (keyturn killed
//!   after the call, or the answer lost) has only the handle recorded
//!   before the call ([`AskedHandle`]: the role it was asked of). Its
//!   `aws:userid` is the role's id (`GetRole`) and the session's name; it
//!   is denied until it would end at the latest (the task's expiry plus
//!   the call's timeout, or STS's shortest session). Without
//!   `iam:GetRole` (or the role gone) it ends by itself, by then.
//!
//! IAM acts in the account of the issuer's own credentials, so the deny
//! policy is only ever written to (and read back from) a role of that
//! account: a grant's role in another account is refused at issue with
//! `revoke_with_deny_policy` (`GetCallerIdentity` against the role ARN's
//! account), and a recorded session whose role is not in that account (the
//! issuer's credentials changed since) is neither revoked nor verified
//! there, since the same-named role of another account is not the one the
//! session belongs to.
//!
//! Without a handle (a crash between the mint and its record, an answer
//! lost) neither the role nor the expiration is known. Every session is
//! asked for the time left until the task's expiry when `AssumeRole` is
//! sent (never under STS's 15 minutes), so `revoke` answers that expiry
//! plus the call's `timeout` (or 15 minutes from now, whichever is later;
//! at most STS's 12 hours), and `verify_revoked` answers `false`.
//! `verify_revoked` with a handle: the expiration has passed, or (with the
//! deny policy) a deny statement of the role's policy names the session.
//!
//! # Errors
//! The AWS vault's mapping ([`crate::vaults::aws::sdk_error_detail`]):
//! `AccessDenied` → `unauthorized`, throttling → `throttled`, a malformed or
//! too large session policy, a duration above the role's maximum →
//! `invalid`, connection errors and 5xx → `transient`. Messages name the
//! issuer, the operation, the task and the role, never a credential.
//!
//! # Layout
//! - `aws_sts/mod.rs`: the issuer: its STS and IAM clients, issue, revoke,
//!   verify, check;
//! - `aws_sts/config.rs`: `[issuers.NAME]` and the grant, and their checks;
//! - `aws_sts/session.rs`: what a session is made of: its name, tags,
//!   source identity, duration, and the handle that records it;
//! - `aws_sts/deny.rs`: the deny policy that ends a session early.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use aws_sdk_sts::Client;
use aws_sdk_sts::types::Tag;
use tokio::sync::OnceCell;

use super::{
    Grant, IssueError, IssueRequest, Issued, IssuerPlugin, Revoked, TaskAttribution, TaskIssuer,
};
use crate::config::validate::{Loc, Validator, duration_value};
use crate::model::{ErrorKind, PluginError, SecretValue};
use crate::vaults::aws::{error_code, sdk_config, sdk_error_detail};

/// The issuer type in config, also used in messages.
pub const TYPE: &str = "aws_sts";
/// Default time allowed for one call (connect + request + response).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// STS's shortest session (`DurationSeconds` minimum).
pub const MIN_SESSION: Duration = Duration::from_secs(900);
/// STS's longest role session (a role's `MaxSessionDuration` maximum).
pub const MAX_SESSION: Duration = Duration::from_secs(43_200);
/// STS's limit on a session policy's plain text, in characters ("The
/// plaintext that you use for both inline and managed session policies
/// can't exceed 2,048 characters", AssumeRole API reference).
pub const MAX_POLICY_CHARS: usize = 2048;
/// Every session keyturn opens is named `keyturn-<task_id>`.
pub const SESSION_PREFIX: &str = "keyturn-";
/// `RoleSessionName` and `SourceIdentity` length limits.
const MAX_SESSION_NAME: usize = 64;
const MAX_SOURCE_IDENTITY: usize = 64;
const MIN_SOURCE_IDENTITY: usize = 2;
/// A session tag value's length limit.
const MAX_TAG_VALUE: usize = 256;
/// `ExternalId` length limits.
const EXTERNAL_ID_LEN: std::ops::RangeInclusive<usize> = 2..=1224;

mod config;
mod deny;
mod session;

pub use config::{StsGrant, StsIssuerConfig};
use config::{check_external_id, check_role_arn, pack_policy};
pub use deny::DENY_POLICY_NAME;
use deny::*;
pub use session::{
    AskedHandle, SessionHandle, StsHandle, session_name, session_tags, source_identity, tag_value,
};
use session::{session_seconds, unrecorded_session_end, until_expiry};

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

// ---------------------------------------------------------------------------
// The issuer
// ---------------------------------------------------------------------------

/// The STS and IAM clients and what messages say about them, built at the
/// first call.
struct Connected {
    client: Client,
    region: String,
    endpoint: String,
    iam: aws_sdk_iam::Client,
    iam_endpoint: String,
}

/// An `aws_sts` issuer. Cheap to share behind an `Arc`.
pub struct StsIssuer {
    config: StsIssuerConfig,
    connected: OnceCell<Connected>,
    /// Credentials instead of the chain's (tests against a private moto).
    credentials: Option<aws_sdk_sts::config::SharedCredentialsProvider>,
    /// One read-modify-write of a deny policy at a time (IAM has no
    /// conditional write; see the module docs for several daemons).
    deny_writes: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for StsIssuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StsIssuer")
            .field("region", &self.config.region)
            .field("endpoint_url", &self.config.endpoint_url)
            .finish_non_exhaustive()
    }
}

/// A request as [`StsIssuer::issue`] sends it, once every local check passed.
struct Prepared {
    grant: StsGrant,
    /// The task and role, for messages.
    what: String,
    seconds: i32,
    policy: String,
}

impl StsIssuer {
    /// The grant, the session's length and its policy, or what the issuer
    /// refuses without calling STS.
    async fn prepared(&self, req: &IssueRequest<'_>) -> Result<Prepared, PluginError> {
        let task = req.task;
        let grant: StsGrant = req.grant.parse().map_err(|e| {
            self.err(
                ErrorKind::Invalid,
                "issue",
                &format!("for task {}", task.task_id),
                format!("invalid grant: {e}"),
            )
        })?;
        let what = task_role(task, &grant.role_arn);
        let invalid = |detail: String| self.err(ErrorKind::Invalid, "issue", &what, detail);
        let seconds =
            session_seconds(req.ttl, self.config.revoke_with_deny_policy).map_err(invalid)?;
        check_role_arn(&grant.role_arn).map_err(invalid)?;
        if let Some(id) = &grant.external_id {
            check_external_id(id).map_err(invalid)?;
        }
        let policy = self.session_policy(&grant, &what).await?;
        Ok(Prepared {
            grant,
            what,
            seconds,
            policy,
        })
    }

    /// No I/O: the client is built at the first call.
    pub fn new(config: StsIssuerConfig) -> Self {
        Self {
            config,
            connected: OnceCell::new(),
            credentials: None,
            deny_writes: tokio::sync::Mutex::new(()),
        }
    }

    /// With fixed credentials instead of the credential chain.
    #[cfg(test)]
    pub(crate) fn with_credentials(
        config: StsIssuerConfig,
        credentials: aws_sdk_sts::config::Credentials,
    ) -> Self {
        Self {
            credentials: Some(aws_sdk_sts::config::SharedCredentialsProvider::new(
                credentials,
            )),
            ..Self::new(config)
        }
    }

    /// `issuer aws_sts:ENDPOINT: OP WHAT: DETAIL`.
    fn err(
        &self,
        kind: ErrorKind,
        op: &str,
        what: &str,
        detail: impl std::fmt::Display,
    ) -> PluginError {
        let sep = if what.is_empty() { "" } else { " " };
        PluginError::new(
            kind,
            format!("issuer {}: {op}{sep}{what}: {detail}", self.describe()),
        )
    }

    async fn connected(&self) -> Result<&Connected, PluginError> {
        self.connected
            .get_or_try_init(|| async {
                let timeout = self.config.timeout();
                if timeout.is_zero() {
                    return Err(self.err(
                        ErrorKind::Invalid,
                        "connect",
                        "",
                        "timeout must be more than zero",
                    ));
                }
                let conf = sdk_config(
                    self.config.region.as_deref(),
                    self.config.profile.as_deref(),
                    self.config.endpoint_url.as_deref(),
                    timeout,
                )
                .await;
                let Some(region) = conf.region().map(|r| r.to_string()) else {
                    return Err(self.err(
                        ErrorKind::Invalid,
                        "connect",
                        "",
                        "no AWS region: set `region` in the issuer's config, or AWS_REGION, or a region in the profile",
                    ));
                };
                let mut sts = aws_sdk_sts::config::Builder::from(&conf);
                // IAM has its own endpoint: never STS's.
                let mut iam = aws_sdk_iam::config::Builder::from(&conf);
                iam.set_endpoint_url(self.config.iam_endpoint_url.clone());
                if let Some(c) = &self.credentials {
                    sts = sts.credentials_provider(c.clone());
                    iam = iam.credentials_provider(c.clone());
                }
                let endpoint = match &self.config.endpoint_url {
                    Some(url) => url.clone(),
                    None => format!("the STS endpoint of region {region}"),
                };
                let iam_endpoint = match &self.config.iam_endpoint_url {
                    Some(url) => url.clone(),
                    None => "the IAM endpoint".to_owned(),
                };
                Ok(Connected {
                    client: Client::from_conf(sts.build()),
                    region,
                    endpoint,
                    iam: aws_sdk_iam::Client::from_conf(iam.build()),
                    iam_endpoint,
                })
            })
            .await
    }
    /// The grant's session policy, packed.
    async fn session_policy(&self, grant: &StsGrant, what: &str) -> Result<String, PluginError> {
        let invalid = |detail: String| self.err(ErrorKind::Invalid, "issue", what, detail);
        let text = match (&grant.session_policy, &grant.session_policy_file) {
            (Some(text), None) => text.clone(),
            (None, Some(path)) => read_policy_file(path)
                .await
                .map_err(|e| self.err(e.kind, "issue", what, e.message))?,
            _ => {
                return Err(invalid(
                    "the grant needs exactly one of session_policy and session_policy_file".into(),
                ));
            }
        };
        pack_policy(&text).map_err(invalid)
    }
}

async fn read_policy_file(path: &Path) -> Result<String, PluginError> {
    tokio::fs::read_to_string(path)
        .await
        .map_err(|e| PluginError::io(format!("session_policy_file {}", path.display()), &e))
}

/// A message naming the task and the role.
fn task_role(task: &TaskAttribution, role_arn: &str) -> String {
    format!("for task {} (role {role_arn})", task.task_id)
}

/// Whether the HTTP client never connected to STS (refused, no route,
/// DNS): the request was not sent.
fn never_connected(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(e);
    while let Some(c) = cause {
        if c.downcast_ref::<hyper_util::client::legacy::Error>()
            .is_some_and(hyper_util::client::legacy::Error::is_connect)
        {
            return true;
        }
        cause = c.source();
    }
    false
}

#[async_trait]
impl TaskIssuer for StsIssuer {
    fn describe(&self) -> String {
        match (&self.config.endpoint_url, &self.config.region) {
            (Some(url), _) => format!("{TYPE}:{url}"),
            (None, Some(region)) => format!("{TYPE}:{region}"),
            (None, None) => TYPE.to_owned(),
        }
    }

    fn object(&self, task: &TaskAttribution, handle: Option<&str>) -> String {
        let session = session_name(&task.task_id);
        match handle.map(SessionHandle::decode) {
            Some(Ok(SessionHandle::Session(h))) => format!(
                "STS session {session} of {} (access key {})",
                h.role_arn, h.access_key_id
            ),
            Some(Ok(SessionHandle::Asked(a))) => {
                format!("STS session {session} of {} (not recorded)", a.asked_of)
            }
            _ => format!("STS session {session}"),
        }
    }

    /// The role the session is asked of: its `aws:userid` follows.
    fn handle_before_issue(&self, req: &IssueRequest<'_>) -> Option<String> {
        let grant: StsGrant = req.grant.parse().ok()?;
        Some(
            AskedHandle {
                asked_of: grant.role_arn,
            }
            .encode(),
        )
    }

    async fn precheck(&self, req: &IssueRequest<'_>) -> Result<(), PluginError> {
        self.prepared(req).await.map(|_| ())
    }

    /// Without `revoke_with_deny_policy` a session cannot be ended early.
    fn ends_early(&self) -> bool {
        self.config.revoke_with_deny_policy
    }

    async fn issue(&self, req: &IssueRequest<'_>) -> Result<Issued, IssueError> {
        let task = req.task;
        // Nothing is minted before AssumeRole is sent.
        let Prepared {
            grant,
            what,
            seconds,
            policy,
        } = self.prepared(req).await.map_err(IssueError::nothing_left)?;
        let invalid = |detail: String| self.err(ErrorKind::Invalid, "issue", &what, detail);
        let c = self.connected().await.map_err(IssueError::nothing_left)?;
        // A session it could not end early is not minted.
        if self.config.revoke_with_deny_policy {
            self.role_in_own_account(c, "issue", &what, &grant.role_arn)
                .await
                .map_err(IssueError::nothing_left)?;
        }

        // Counted from now, when it is asked for: the session ends with the
        // task (`revoke` without a handle relies on it).
        let seconds = until_expiry(seconds, req.expires_at, SystemTime::now());
        let mut call = c
            .client
            .assume_role()
            .role_arn(&grant.role_arn)
            .role_session_name(session_name(&task.task_id))
            .policy(policy)
            .duration_seconds(seconds)
            .source_identity(source_identity(&task.initiator))
            .set_external_id(grant.external_id.clone());
        for (key, value) in session_tags(task) {
            let tag = Tag::builder().key(key).value(value).build().map_err(|e| {
                IssueError::nothing_left(invalid(format!("session tag {key}: {e}")))
            })?;
            call = call.tags(tag);
        }
        let out = call.send().await.map_err(|e| {
            let (kind, detail) = sdk_error_detail(&e, &c.endpoint, self.config.timeout());
            let error = self.err(kind, "issue (AssumeRole)", &what, detail);
            // STS refused the request (4xx), or it was never sent (not
            // built, no connection made): no session exists. A lost answer
            // may follow one that does.
            let refused = match &e {
                aws_sdk_sts::error::SdkError::ServiceError(se) => {
                    se.raw().status().is_client_error()
                }
                aws_sdk_sts::error::SdkError::ConstructionFailure(_) => true,
                aws_sdk_sts::error::SdkError::DispatchFailure(_) => never_connected(&e),
                _ => false,
            };
            if refused {
                IssueError::nothing_left(error)
            } else {
                IssueError::from(error)
            }
        })?;

        let fatal = |detail: &str| self.err(ErrorKind::Fatal, "issue (AssumeRole)", &what, detail);
        let (Some(creds), Some(user)) = (out.credentials, out.assumed_role_user) else {
            return Err(fatal("the response carries no credentials").into());
        };
        let since_epoch = SystemTime::try_from(creds.expiration)
            .ok()
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .ok_or_else(|| fatal("the response's expiration is out of range"))?;
        // Whole seconds, rounded up: the handle keeps seconds, and keyturn
        // must never think a session over before STS does (AWS answers
        // whole seconds; moto milliseconds).
        let expires = since_epoch.as_secs() + u64::from(since_epoch.subsec_nanos() > 0);
        let expires_at = UNIX_EPOCH + Duration::from_secs(expires);
        let handle = StsHandle {
            role_arn: grant.role_arn.clone(),
            assumed_role_id: user.assumed_role_id,
            access_key_id: creds.access_key_id.clone(),
            expires,
        };
        let public = BTreeMap::from([
            ("access_key_id".to_owned(), creds.access_key_id),
            (
                "expiration".to_owned(),
                humantime::format_rfc3339_seconds(expires_at).to_string(),
            ),
            ("region".to_owned(), c.region.clone()),
            ("assumed_role_arn".to_owned(), user.arn),
        ]);
        // The SDK's strings move into SecretValue without a copy.
        let secret = BTreeMap::from([
            (
                "secret_access_key".to_owned(),
                SecretValue::from_string(creds.secret_access_key),
            ),
            (
                "session_token".to_owned(),
                SecretValue::from_string(creds.session_token),
            ),
        ]);
        Ok(Issued {
            handle: handle.encode(),
            public,
            secret,
            expires_at,
        })
    }

    async fn revoke(
        &self,
        task: &TaskAttribution,
        handle: Option<&str>,
        expires_at: SystemTime,
    ) -> Result<Revoked, PluginError> {
        // The session's expiration was never recorded: it ends with the
        // task, give or take the call that asked for it.
        let unrecorded_end =
            || unrecorded_session_end(expires_at, self.config.timeout(), SystemTime::now());
        let h = match handle.map(SessionHandle::decode).transpose() {
            Ok(Some(SessionHandle::Session(h))) => h,
            Ok(None) => return Ok(Revoked::ExpiresAt(unrecorded_end())),
            Ok(Some(SessionHandle::Asked(asked))) => {
                let end = unrecorded_end();
                if !self.config.revoke_with_deny_policy {
                    return Ok(Revoked::ExpiresAt(end));
                }
                return match self.deny_asked(task, &asked, end).await {
                    Ok(true) => Ok(Revoked::Now),
                    Ok(false) => Ok(Revoked::ExpiresAt(end)),
                    // The handle has no expiration to give up at: retried
                    // while it may help, up to STS's shortest session
                    // past the task's expiry.
                    Err(e)
                        if e.kind.is_retryable()
                            && expires_at
                                .checked_add(MIN_SESSION)
                                .is_some_and(|last| SystemTime::now() < last) =>
                    {
                        Err(e)
                    }
                    Err(e) => {
                        tracing::warn!(
                            task = %task.task_id,
                            "revoke: the session whose answer was not recorded could not be \
                             denied ({e}): it ends by itself"
                        );
                        Ok(Revoked::ExpiresAt(end))
                    }
                };
            }
            Err(e) => {
                let what = format!("for task {}", task.task_id);
                return Err(self.err(ErrorKind::Fatal, "revoke", &what, e));
            }
        };
        if unix_now() >= h.expires {
            return Ok(Revoked::Now);
        }
        if !self.config.revoke_with_deny_policy {
            return Ok(Revoked::ExpiresAt(h.expires_at()));
        }
        let what = task_role(task, &h.role_arn);
        let c = self.connected().await?;
        self.role_in_own_account(c, "revoke", &what, &h.role_arn)
            .await?;
        self.deny_session(c, &what, &h.role_arn, &h.assumed_role_id, h.expires)
            .await?;
        Ok(Revoked::Now)
    }

    async fn verify_revoked(
        &self,
        task: &TaskAttribution,
        handle: Option<&str>,
    ) -> Result<bool, PluginError> {
        let (role_arn, user_id) = match handle.map(SessionHandle::decode).transpose() {
            Ok(None) => return Ok(false),
            Ok(Some(SessionHandle::Session(h))) => {
                if unix_now() >= h.expires {
                    return Ok(true);
                }
                (h.role_arn, Some(h.assumed_role_id))
            }
            Ok(Some(SessionHandle::Asked(asked))) => (asked.asked_of, None),
            Err(e) => {
                let what = format!("for task {}", task.task_id);
                return Err(self.err(ErrorKind::Fatal, "verify_revoked", &what, e));
            }
        };
        if !self.config.revoke_with_deny_policy {
            return Ok(false);
        }
        let what = task_role(task, &role_arn);
        let c = self.connected().await?;
        self.role_in_own_account(c, "verify_revoked", &what, &role_arn)
            .await?;
        let user_id = match user_id {
            Some(id) => id,
            None => match self
                .asked_session_id(c, "verify_revoked", &what, &role_arn, task)
                .await?
            {
                Some(id) => id,
                None => return Ok(false),
            },
        };
        match self
            .deny_policy(c, "verify_revoked", &what, &role_arn)
            .await?
        {
            None => Ok(false),
            Some(doc) => deny_policy_lists(&doc, &user_id)
                .map_err(|e| self.err(ErrorKind::Invalid, "verify_revoked", &what, e)),
        }
    }

    /// `GetCallerIdentity`: reaches STS and authenticates, needs no
    /// permission.
    async fn check(&self) -> Result<(), PluginError> {
        let c = self.connected().await?;
        c.client
            .get_caller_identity()
            .send()
            .await
            .map(|_| ())
            .map_err(|e| {
                let (kind, detail) = sdk_error_detail(&e, &c.endpoint, self.config.timeout());
                self.err(kind, "check (GetCallerIdentity)", "", detail)
            })
    }
}

#[cfg(test)]
mod tests;
