//! The `aws_secrets_manager` vault: versions of a credential are versions of one
//! AWS Secrets Manager secret, and keyturn's stages are Secrets Manager's
//! staging labels.
//!
//! # Mapping
//! - One credential = one secret named `secret_prefix + path`.
//! - One version = one secret version. Its `VersionId` is the rotation id: we
//!   pass the rotation id as `ClientRequestToken` (AWS wants 32–64 characters;
//!   a rotation id has 32), so the [`VersionRef`] *is* the rotation id and a
//!   version can always be traced back to the rotation that made it.
//! - Stages: `AWSPENDING` = pending, `AWSCURRENT` = current, `AWSPREVIOUS` =
//!   previous, no label = retired. A version that still carries `AWSPENDING`
//!   is pending even if it also carries `AWSCURRENT`: AWS attaches
//!   `AWSCURRENT` to the first version of every secret on its own, before
//!   keyturn has applied it at the target. keyturn treats that version as
//!   pending until `promote` removes `AWSPENDING` (so `read(Current)` is
//!   `None` until then, as with every other vault). Readers outside keyturn
//!   do see the first value as `AWSCURRENT` straight away; there is no older
//!   value they could be using instead, so nothing that worked stops working.
//!
//! # Operations (the rotation contract of AWS: createSecret … finishSecret)
//! - `stage`: `DescribeSecret` first. If a version with `VersionId` = rotation
//!   id exists, return it without writing: the engine replays `stage` with a
//!   *new* value after a crash and relies on getting the first one back, and
//!   AWS would reject (and moto would silently overwrite) a second value under
//!   the same token. Otherwise `CreateSecret` (no value, so no version is
//!   created) when the secret does not exist yet, then `PutSecretValue` with
//!   `VersionStages=["AWSPENDING"]`. Moving `AWSPENDING` off an abandoned
//!   rotation's version is done by AWS as part of that call.
//! - `read`: `GetSecretValue` always with an explicit `VersionStage` or
//!   `VersionId` (moto answers a bare `GetSecretValue` with a stale default).
//! - `promote`: `UpdateSecretVersionStage` moves `AWSCURRENT` to the version
//!   (with `RemoveFromVersionId` = the old current); AWS then moves
//!   `AWSPREVIOUS` to the old current by itself (moto does the same; the tests
//!   check it). A second call removes `AWSPENDING` from the version. Both
//!   calls are skipped when already done, so a replay after a crash between
//!   them finishes the job.
//! - `retire`: removes `AWSPREVIOUS` from the version. Secrets Manager has no
//!   way to delete one version's value: an unlabeled ("deprecated") version
//!   keeps its value, readable by `VersionId` with the right IAM permission,
//!   until AWS ages it out (it keeps about 100 versions per secret). keyturn
//!   reads an unlabeled version as retired (`None`).
//! - `destroy`: `DeleteSecret` with `ForceDeleteWithoutRecovery=true`.
//! - `check`: `ListSecrets` with `MaxResults=1`.
//!
//! # Write budget
//! Secrets Manager allows 50 write TPS per account and region, shared by every
//! client. Every write of one vault instance (`CreateSecret`,
//! `PutSecretValue`, `UpdateSecretVersionStage`, `DeleteSecret`) first waits
//! for a slot of a client-side budget ([`super::budget::WriteBudget`],
//! `write_budget` in config,
//! default 25/s). Slots are spaced `1 / budget` apart (a token bucket holding
//! one token), so no one-second window ever sees more than `budget + 1`
//! writes. Reads are not budgeted (their quota is 10,000 TPS).
//!
//! # Errors and retries
//! The SDK's own retries are off (`RetryConfig::disabled()`): the rotation
//! engine owns retries and back-off. Throttling maps to
//! [`ErrorKind::Throttled`], connection errors and 5xx to `Transient`, access
//! errors to `Unauthorized`, malformed requests to `Invalid`. Messages name
//! the vault, the operation and the secret id, never the value; a service
//! message that happens to echo the value being written is scrubbed.
//!
//! # Credentials
//! The standard AWS credential chain (environment, profile, web identity,
//! ECS/EC2 metadata), with `region`, `profile` and `endpoint_url` from config.
//! Without a configured region the chain may ask EC2 instance metadata, which
//! can take a few seconds to time out away from EC2.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_secretsmanager::Client;
use aws_sdk_secretsmanager::config::http::HttpResponse;
use aws_sdk_secretsmanager::config::retry::RetryConfig;
use aws_sdk_secretsmanager::config::timeout::TimeoutConfig;
use aws_sdk_secretsmanager::config::{BehaviorVersion, Region};
use aws_sdk_secretsmanager::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_secretsmanager::primitives::Blob;

use super::budget::WriteBudget;
use super::lazy::LazyVault;
use super::{
    CurrentMark, Pending, Promote, Promoted, Select, StoredVersion, Vault, VaultItem, VaultPlugin,
    VersionRef,
};
use crate::config::validate::{Loc, Validator, VaultScope, duration_value};
use crate::model::{ErrorKind, PluginError, RotationId, SecretValue, Stage};

/// The vault type in config, also used in messages.
pub const TYPE: &str = "aws_secrets_manager";
/// Default client-side write budget: half the account's shared 50 TPS quota.
pub const DEFAULT_WRITE_BUDGET_PER_SEC: f64 = 25.0;
/// Default time allowed for one call (connect + request + response).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

const AWSPENDING: &str = "AWSPENDING";
const AWSCURRENT: &str = "AWSCURRENT";
const AWSPREVIOUS: &str = "AWSPREVIOUS";

/// Describes secrets keyturn creates, for whoever finds them in the console.
const SECRET_DESCRIPTION: &str =
    "Managed by keyturn: rotated automatically (AWSPENDING -> AWSCURRENT -> AWSPREVIOUS).";

/// `[vaults.NAME]` with `type = "aws_secrets_manager"`.
#[derive(Debug, Clone, Default, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AwsConfig {
    /// AWS region; `None` = the credential chain's region (env, profile, IMDS).
    pub region: Option<String>,
    /// e.g. a VPC endpoint in production, moto in tests.
    pub endpoint_url: Option<String>,
    /// A profile of the shared config/credentials files.
    pub profile: Option<String>,
    /// Prepended to each credential's path to form the secret name.
    pub secret_prefix: Option<String>,
    /// Client-side budget of write calls per second (default 25).
    pub write_budget: Option<f64>,
    /// Time allowed for one call (default 30 s).
    pub timeout: Option<String>,
    /// Where a rotating keyturn keeps its change index for followers (a
    /// path in this vault, opt-in; see `vaults::change_index`).
    pub change_index: Option<String>,
    pub max_concurrent: Option<usize>,
}

impl AwsConfig {
    pub fn write_budget(&self) -> f64 {
        self.write_budget.unwrap_or(DEFAULT_WRITE_BUDGET_PER_SEC)
    }

    pub fn timeout(&self) -> Duration {
        duration_value(self.timeout.as_deref(), DEFAULT_TIMEOUT)
    }
}

impl VaultPlugin for AwsConfig {
    fn check(&mut self, v: &mut Validator<'_>, p: Loc<'_>, _: &VaultScope<'_>) {
        if let Some(u) = &self.endpoint_url {
            v.url(
                p.key("endpoint_url"),
                u,
                &["http", "https"],
                "https://secretsmanager.eu-west-1.amazonaws.com",
            );
        }
        let budget = self.write_budget();
        if !(budget.is_finite() && budget > 0.0) {
            v.err(
                p.key("write_budget"),
                format!("write_budget must be a positive number of writes per second (default {DEFAULT_WRITE_BUDGET_PER_SEC}; AWS allows 50 per account and region)"),
            );
        }
        v.timeout(&p, &self.timeout, DEFAULT_TIMEOUT);
    }

    fn max_concurrent(&self) -> Option<usize> {
        self.max_concurrent
    }

    fn change_index(&self) -> Option<&str> {
        self.change_index.as_deref()
    }

    fn open(&self, name: &str) -> Result<Arc<dyn Vault>, PluginError> {
        Ok(LazyVault::connecting(
            name,
            self.clone(),
            |name, c| async move { Ok(Arc::new(AwsVault::connect(&name, &c).await?) as Arc<dyn Vault>) },
        ))
    }
}

/// The SDK config of every AWS plug-in (this vault, the `aws_sts` task
/// issuer): the standard credential chain, with `region`, `profile` and
/// `endpoint_url` from config, the SDK's own retries off (the engine owns
/// retries and back-off) and `timeout` for connect, each attempt and the
/// whole call. Does not call AWS: credentials are resolved at the first call.
pub(crate) async fn sdk_config(
    region: Option<&str>,
    profile: Option<&str>,
    endpoint_url: Option<&str>,
    timeout: Duration,
) -> aws_config::SdkConfig {
    let mut loader = aws_config::defaults(BehaviorVersion::latest())
        // A retry inside the SDK would also spend a vault's write budget
        // behind the engine's back.
        .retry_config(RetryConfig::disabled())
        .timeout_config(
            TimeoutConfig::builder()
                .connect_timeout(timeout)
                .operation_attempt_timeout(timeout)
                .operation_timeout(timeout)
                .build(),
        );
    if let Some(region) = region {
        loader = loader.region(Region::new(region.to_owned()));
    }
    if let Some(profile) = profile {
        loader = loader.profile_name(profile);
    }
    if let Some(url) = endpoint_url {
        loader = loader.endpoint_url(url);
    }
    loader.load().await
}

// ---------------------------------------------------------------------------
// Error mapping
// ---------------------------------------------------------------------------

/// The kind of an AWS service error, from its code, HTTP status and
/// message: Secrets Manager's codes, and those of STS and IAM that the
/// `aws_sts` task issuer meets. Pure, so it is tested without a server.
pub(crate) fn classify_service(
    code: Option<&str>,
    status: u16,
    message: Option<&str>,
) -> ErrorKind {
    let rate_exceeded = message.is_some_and(|m| m.contains("Rate exceeded"));
    match code.unwrap_or("") {
        "ThrottlingException"
        | "Throttling"
        | "TooManyRequestsException"
        | "RequestLimitExceeded" => ErrorKind::Throttled,
        _ if status == 429 || rate_exceeded => ErrorKind::Throttled,
        "AccessDeniedException"
        | "AccessDenied"
        | "UnrecognizedClientException"
        | "InvalidClientTokenId"
        | "InvalidSignatureException"
        | "SignatureDoesNotMatch"
        | "IncompleteSignature"
        | "MissingAuthenticationToken"
        | "ExpiredTokenException" => ErrorKind::Unauthorized,
        "ResourceNotFoundException" | "NoSuchEntity" => ErrorKind::NotFound,
        "ResourceExistsException" | "ConcurrentModification" => ErrorKind::Conflict,
        // STS: a bad session policy, too much policy and tags, a duration
        // above the role's maximum; IAM: an inline policy over its quota.
        "MalformedPolicyDocument"
        | "PackedPolicyTooLarge"
        | "ValidationError"
        | "LimitExceeded" => ErrorKind::Invalid,
        "EntityTemporarilyUnmodifiable" | "ServiceFailure" => ErrorKind::Transient,
        "InvalidRequestException"
        | "InvalidParameterException"
        | "InvalidNextTokenException"
        | "ValidationException"
        | "MalformedPolicyDocumentException"
        | "PreconditionNotMetException"
        | "LimitExceededException"
        | "EncryptionFailure"
        | "DecryptionFailure" => ErrorKind::Invalid,
        "InternalServiceError" | "InternalFailure" | "ServiceUnavailable" => ErrorKind::Transient,
        _ if status == 401 || status == 403 => ErrorKind::Unauthorized,
        _ if status >= 500 => ErrorKind::Transient,
        _ if status == 404 => ErrorKind::NotFound,
        _ => ErrorKind::Invalid,
    }
}

/// The kind and text of a failed SDK call of any AWS service (they share
/// `SdkError` and the response type): the service's code and message, or
/// why the request did not reach it. `endpoint` and `timeout` are for the
/// text. The text may carry whatever the service echoed: a caller that sent
/// a secret scrubs it.
pub(crate) fn sdk_error_detail<E>(
    e: &SdkError<E, HttpResponse>,
    endpoint: &str,
    timeout: Duration,
) -> (ErrorKind, String)
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    match e {
        SdkError::ServiceError(se) => {
            let status = se.raw().status().as_u16();
            let code = se.err().code();
            let message = se.err().message();
            (
                classify_service(code, status, message),
                format!(
                    "{} (HTTP {status}): {}",
                    code.unwrap_or("unknown error"),
                    message.unwrap_or("no message")
                ),
            )
        }
        SdkError::TimeoutError(_) => (
            ErrorKind::Transient,
            format!("no answer from {} within {:?}", endpoint, timeout),
        ),
        SdkError::DispatchFailure(d) => {
            let text = error_chain(e);
            if d.is_io() || d.is_timeout() {
                (
                    ErrorKind::Transient,
                    format!("cannot reach {}: {text}", endpoint),
                )
            } else if text.to_ascii_lowercase().contains("credential") {
                // The credential chain found nothing or failed: the
                // request never left. Config or IAM must change.
                (
                    ErrorKind::Unauthorized,
                    format!("no usable AWS credentials: {text}"),
                )
            } else if d.is_user() {
                (ErrorKind::Invalid, format!("request not sent: {text}"))
            } else {
                (
                    ErrorKind::Transient,
                    format!("cannot reach {}: {text}", endpoint),
                )
            }
        }
        SdkError::ResponseError(r) => {
            let status = r.raw().status().as_u16();
            let kind = if status == 429 {
                ErrorKind::Throttled
            } else {
                ErrorKind::Transient
            };
            (
                kind,
                format!(
                    "unreadable response (HTTP {status}) from {}: {}",
                    endpoint,
                    error_chain(e)
                ),
            )
        }
        SdkError::ConstructionFailure(_) => {
            let text = error_chain(e);
            let kind = if text.to_ascii_lowercase().contains("credential") {
                ErrorKind::Unauthorized
            } else {
                ErrorKind::Invalid
            };
            (kind, format!("could not build the request: {text}"))
        }
        _ => (ErrorKind::Transient, error_chain(e)),
    }
}

/// The service error code, if the call reached the service.
pub(crate) fn error_code<E: ProvideErrorMetadata>(e: &SdkError<E, HttpResponse>) -> Option<&str> {
    e.as_service_error().and_then(|s| s.code())
}

fn is_not_found<E: ProvideErrorMetadata>(e: &SdkError<E, HttpResponse>) -> bool {
    error_code(e) == Some("ResourceNotFoundException")
}

/// `error: cause: cause ...`, without the `Debug` dump that the SDK's
/// `DisplayErrorContext` appends (it repeats the chain in one long line).
pub(crate) fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        // Some layers repeat their source's text in their own; skip echoes.
        if !text.ends_with(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// Replaces any occurrence of `value` in `text`. Service messages are not
/// supposed to echo a `SecretString` (AWS marks it sensitive), but a message
/// is written to logs and the audit log, so we do not rely on that.
fn scrub(text: String, value: Option<&SecretValue>) -> String {
    match value.and_then(SecretValue::expose_str) {
        Some(v) if !v.is_empty() && text.contains(v) => text.replace(v, "[redacted]"),
        _ => text,
    }
}

/// The keyturn stage of a version from its staging labels; `None` = no label
/// (retired). `AWSPENDING` wins over `AWSCURRENT`: see the module docs.
fn stage_of(labels: &[String]) -> Option<Stage> {
    let has = |l: &str| labels.iter().any(|x| x == l);
    if has(AWSPENDING) {
        Some(Stage::Pending)
    } else if has(AWSCURRENT) {
        Some(Stage::Current)
    } else if has(AWSPREVIOUS) {
        Some(Stage::Previous)
    } else {
        None
    }
}

/// The version that holds AWSCURRENT without having been promoted: AWS puts
/// AWSCURRENT on a secret's first version along with the AWSPENDING asked for.
fn unpromoted_current(versions: &Labels) -> Option<String> {
    versions
        .iter()
        .find(|(_, l)| has_label(l, AWSCURRENT) && has_label(l, AWSPENDING))
        .map(|(id, _)| id.clone())
}

fn has_label(labels: &[String], label: &str) -> bool {
    labels.iter().any(|l| l == label)
}

fn label_of(stage: Stage) -> Option<&'static str> {
    match stage {
        Stage::Pending => Some(AWSPENDING),
        Stage::Current => Some(AWSCURRENT),
        Stage::Previous => Some(AWSPREVIOUS),
        Stage::Retired => None,
    }
}

// ---------------------------------------------------------------------------
// The vault
// ---------------------------------------------------------------------------

/// Version ids → staging labels of one secret, as `DescribeSecret` reports them.
type Labels = HashMap<String, Vec<String>>;

/// An AWS Secrets Manager vault. Cheap to share behind an `Arc`; every call
/// through it shares one write budget.
pub struct AwsVault {
    name: String,
    prefix: String,
    /// Where requests go, for messages.
    endpoint: String,
    timeout: Duration,
    client: Client,
    budget: WriteBudget,
}

impl std::fmt::Debug for AwsVault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AwsVault")
            .field("name", &self.name)
            .field("prefix", &self.prefix)
            .field("endpoint", &self.endpoint)
            .finish_non_exhaustive()
    }
}

impl AwsVault {
    /// Builds the client from the standard credential chain and `s`. Does not
    /// call AWS (credentials are resolved at the first call); use
    /// [`Vault::check`] to find out whether the vault is usable.
    pub async fn connect(name: &str, s: &AwsConfig) -> Result<Self, PluginError> {
        let invalid = |what: String| {
            PluginError::new(ErrorKind::Invalid, format!("vault {name} ({TYPE}): {what}"))
        };
        let budget = WriteBudget::new(name, s.write_budget()).ok_or_else(|| {
            invalid(format!(
                "write_budget must be a positive number, got {}",
                s.write_budget()
            ))
        })?;
        let timeout = s.timeout();
        if timeout.is_zero() {
            return Err(invalid("timeout must be more than zero".into()));
        }

        let conf = sdk_config(
            s.region.as_deref(),
            s.profile.as_deref(),
            s.endpoint_url.as_deref(),
            timeout,
        )
        .await;
        let Some(region) = conf.region().map(|r| r.to_string()) else {
            return Err(invalid(
                "no AWS region: set `region` in the vault's config, or AWS_REGION, or a region in the profile"
                    .into(),
            ));
        };
        let endpoint = match &s.endpoint_url {
            Some(url) => url.clone(),
            None => format!("the Secrets Manager endpoint of region {region}"),
        };
        Ok(Self {
            name: name.to_owned(),
            prefix: s.secret_prefix.clone().unwrap_or_default(),
            endpoint,
            timeout,
            client: aws_sdk_secretsmanager::Client::new(&conf),
            budget,
        })
    }

    /// Writes sent to Secrets Manager by this vault so far (each one after
    /// its write-budget slot). For the benchmark and tests.
    pub fn writes_issued(&self) -> u64 {
        self.budget.issued()
    }

    /// The secret name of a credential.
    pub fn secret_id(&self, path: &str) -> String {
        format!("{}{}", self.prefix, path)
    }

    fn err(
        &self,
        kind: ErrorKind,
        op: &str,
        secret: &str,
        detail: impl std::fmt::Display,
    ) -> PluginError {
        PluginError::new(
            kind,
            format!(
                "vault {} ({TYPE}): {op} of secret {secret}: {detail}",
                self.name
            ),
        )
    }

    /// A [`PluginError`] for a failed SDK call; `value` is scrubbed from the
    /// text if it appears there.
    fn sdk_err<E>(
        &self,
        op: &str,
        secret: &str,
        e: &SdkError<E, HttpResponse>,
        value: Option<&SecretValue>,
    ) -> PluginError
    where
        E: ProvideErrorMetadata + std::error::Error + 'static,
    {
        let (kind, detail) = sdk_error_detail(e, &self.endpoint, self.timeout);
        self.err(kind, op, secret, scrub(detail, value))
    }

    /// The staging labels of every version of `secret`; `None` when the
    /// secret does not exist. Real AWS lists only labeled versions; moto
    /// also lists unlabeled ones (with no labels). Both mean the same here.
    async fn labels(&self, op: &str, secret: &str) -> Result<Option<Labels>, PluginError> {
        match self.client.describe_secret().secret_id(secret).send().await {
            Ok(out) => Ok(Some(out.version_ids_to_stages.unwrap_or_default())),
            Err(e) if is_not_found(&e) => Ok(None),
            Err(e) => Err(self.sdk_err(op, secret, &e, None)),
        }
    }

    /// `promote` once `DescribeSecret` answered (`versions`).
    async fn promote_labeled(
        &self,
        secret: &str,
        versions: Option<Labels>,
        version: &VersionRef,
    ) -> Result<(), PluginError> {
        let Some(versions) = versions else {
            return Err(self.err(
                ErrorKind::NotFound,
                "promote",
                secret,
                "the secret does not exist",
            ));
        };
        let labels = match versions.get(&version.0) {
            Some(labels) if !labels.is_empty() => labels,
            _ => {
                return Err(self.err(
                    ErrorKind::NotFound,
                    "promote",
                    secret,
                    format!("version {version} does not exist or is retired"),
                ));
            }
        };
        if !has_label(labels, AWSCURRENT) {
            let current = versions
                .iter()
                .find(|(_, l)| has_label(l, AWSCURRENT))
                .map(|(id, _)| id.as_str());
            // AWS moves AWSPREVIOUS to `current` as part of this call.
            self.move_label(
                "promote (move AWSCURRENT)",
                secret,
                AWSCURRENT,
                Some(&version.0),
                current,
            )
            .await?;
        }
        if has_label(labels, AWSPENDING) {
            self.remove_label("promote (remove AWSPENDING)", secret, AWSPENDING, version)
                .await?;
        }
        Ok(())
    }

    /// Creates `secret` without a value (so without a version). A secret
    /// that already exists (a lost response, a race) is fine.
    async fn create_empty(&self, secret: &str) -> Result<(), PluginError> {
        self.budget.acquire().await;
        match self
            .client
            .create_secret()
            .name(secret)
            .description(SECRET_DESCRIPTION)
            .send()
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if error_code(&e) == Some("ResourceExistsException") => Ok(()),
            Err(e) => Err(self.sdk_err("stage (CreateSecret)", secret, &e, None)),
        }
    }

    /// The clean-up of a `stage` over the abandoned first version, for a
    /// replay after a crash between its two calls: while the AWSCURRENT
    /// holder is still pending (never promoted), no version was ever
    /// previous, so an AWSPREVIOUS anywhere marks an abandoned value.
    async fn clear_abandoned_previous(
        &self,
        secret: &str,
        versions: &Labels,
    ) -> Result<(), PluginError> {
        if unpromoted_current(versions).is_none() {
            return Ok(());
        }
        for (id, labels) in versions {
            if has_label(labels, AWSPREVIOUS) {
                let op = "stage (remove AWSPREVIOUS)";
                self.remove_label(op, secret, AWSPREVIOUS, &VersionRef(id.clone()))
                    .await?;
            }
        }
        Ok(())
    }

    /// Takes `label` off `version`.
    async fn remove_label(
        &self,
        op: &str,
        secret: &str,
        label: &str,
        version: &VersionRef,
    ) -> Result<(), PluginError> {
        self.move_label(op, secret, label, None, Some(&version.0))
            .await
    }

    /// `UpdateSecretVersionStage`, within the write budget.
    async fn move_label(
        &self,
        op: &str,
        secret: &str,
        label: &str,
        move_to: Option<&str>,
        remove_from: Option<&str>,
    ) -> Result<(), PluginError> {
        self.budget.acquire().await;
        self.client
            .update_secret_version_stage()
            .secret_id(secret)
            .version_stage(label)
            .set_move_to_version_id(move_to.map(str::to_owned))
            .set_remove_from_version_id(remove_from.map(str::to_owned))
            .send()
            .await
            .map(|_| ())
            .map_err(|e| self.sdk_err(op, secret, &e, None))
    }
}

#[async_trait]
impl Vault for AwsVault {
    fn describe(&self) -> &str {
        &self.name
    }

    async fn stage(&self, new: Pending<'_>) -> Result<VersionRef, PluginError> {
        let secret = self.secret_id(new.item.path);
        let token = new.rotation.as_str();
        let mut unpromoted = None;
        match self.labels("stage", &secret).await? {
            // Replay: the first value for this rotation wins; do not write.
            Some(versions) if versions.contains_key(token) => {
                self.clear_abandoned_previous(&secret, &versions).await?;
                return Ok(VersionRef(token.to_owned()));
            }
            Some(versions) => unpromoted = unpromoted_current(&versions),
            None => self.create_empty(&secret).await?,
        }

        let put = self
            .client
            .put_secret_value()
            .secret_id(&secret)
            .client_request_token(token)
            .version_stages(AWSPENDING);
        // Over the abandoned first version, which AWS labelled AWSCURRENT as
        // well: AWSCURRENT moves along with AWSPENDING, so that a value never
        // applied at the target does not read as current once it is no
        // longer pending (the new version is then in the first one's place).
        let put = match unpromoted {
            Some(_) => put.version_stages(AWSCURRENT),
            None => put,
        };
        // Every generator makes text; SecretBinary is for anything else.
        let put = match new.value.expose_str() {
            Some(text) => put.secret_string(text),
            None => put.secret_binary(Blob::new(new.value.expose().to_vec())),
        };
        self.budget.acquire().await;
        match put.send().await {
            Ok(_) => {}
            // A version with this token exists but carries no label (AWS does
            // not list those in DescribeSecret): this rotation staged before
            // and its version was since superseded. Same answer as a replay.
            Err(e) if error_code(&e) == Some("ResourceExistsException") => {
                return Ok(VersionRef(token.to_owned()));
            }
            Err(e) => {
                return Err(self.sdk_err("stage (PutSecretValue)", &secret, &e, Some(new.value)));
            }
        }
        if let Some(old) = unpromoted {
            // Moving AWSCURRENT put AWSPREVIOUS on the abandoned version.
            let op = "stage (remove AWSPREVIOUS)";
            self.remove_label(op, &secret, AWSPREVIOUS, &VersionRef(old))
                .await?;
        }
        Ok(VersionRef(token.to_owned()))
    }

    async fn read(
        &self,
        item: VaultItem<'_>,
        select: Select<'_>,
    ) -> Result<Option<StoredVersion>, PluginError> {
        let secret = self.secret_id(item.path);
        let get = self.client.get_secret_value().secret_id(&secret);
        let get = match select {
            Select::Stage(stage) => match label_of(stage) {
                Some(label) => get.version_stage(label),
                // Retired versions carry no label; there is nothing to ask for.
                None => return Ok(None),
            },
            Select::Version(v) => get.version_id(&v.0),
        };
        let mut out = match get.send().await {
            Ok(out) => out,
            Err(e) if is_not_found(&e) => return Ok(None),
            Err(e) => return Err(self.sdk_err("read", &secret, &e, None)),
        };
        let Some(stage) = stage_of(out.version_stages()) else {
            return Ok(None); // unlabeled = retired
        };
        if let Select::Stage(wanted) = select {
            // AWSCURRENT on a version still pending (a secret's first
            // version) is not current for keyturn yet.
            if wanted != stage {
                return Ok(None);
            }
        }
        let Some(version_id) = out.version_id.take() else {
            return Err(self.err(
                ErrorKind::Fatal,
                "read",
                &secret,
                "the response carries no VersionId",
            ));
        };
        let value = if let Some(text) = out.secret_string.take() {
            SecretValue::from_string(text)
        } else if let Some(blob) = out.secret_binary.take() {
            SecretValue::new(blob.into_inner())
        } else {
            return Err(self.err(
                ErrorKind::Fatal,
                "read",
                &secret,
                format!("version {version_id} has no value"),
            ));
        };
        Ok(Some(StoredVersion {
            rotation: RotationId::parse(&version_id),
            version: VersionRef(version_id),
            stage,
            value,
        }))
    }

    async fn promote(&self, item: VaultItem<'_>, version: &VersionRef) -> Result<(), PluginError> {
        let secret = self.secret_id(item.path);
        let versions = self.labels("promote", &secret).await?;
        self.promote_labeled(&secret, versions, version).await
    }

    /// Promote's `DescribeSecret` names the current version too (like
    /// [`Vault::current_mark`]): no `GetSecretValue` for the engine's check.
    fn promote_reads_current(&self) -> bool {
        true
    }

    async fn promote_from(&self, item: VaultItem<'_>, p: Promote<'_>) -> Promoted {
        let version = p.version;
        let secret = self.secret_id(item.path);
        let versions = self.labels("promote", &secret).await?;
        // `AWSCURRENT` with `AWSPENDING` still on it is current for no
        // reader. On the version being promoted, with the one it replaced
        // moved to `AWSPREVIOUS`, it is a replay of a promote cut short
        // between its two label moves: that version is what the vault has
        // current (not "none", which would read as an out-of-band delete).
        // A first version has both labels from its creation, and nothing
        // was current before it.
        let before = versions.as_ref().and_then(|vs| {
            let replaced = vs.values().any(|l| has_label(l, AWSPREVIOUS));
            vs.iter()
                .find(|(id, l)| {
                    has_label(l, AWSCURRENT)
                        && (!has_label(l, AWSPENDING) || (replaced && **id == version.0))
                })
                .map(|(id, _)| VersionRef(id.clone()))
        });
        self.promote_labeled(&secret, versions, version).await?;
        Ok(before)
    }

    /// Removes `AWSPREVIOUS` from `version`. Secrets Manager cannot delete
    /// one version's value: the unlabeled version keeps it until AWS ages it
    /// out, readable by `VersionId` with `secretsmanager:GetSecretValue`.
    async fn retire(&self, item: VaultItem<'_>, version: &VersionRef) -> Result<(), PluginError> {
        let secret = self.secret_id(item.path);
        let Some(versions) = self.labels("retire", &secret).await? else {
            return Ok(()); // destroyed: nothing left to retire
        };
        let Some(labels) = versions.get(&version.0) else {
            return Ok(()); // unlabeled or gone: already retired
        };
        if let Some(stage @ (Stage::Current | Stage::Pending)) = stage_of(labels) {
            return Err(self.err(
                ErrorKind::Invalid,
                "retire",
                &secret,
                format!("version {version} is {stage}; only the previous version can be retired"),
            ));
        }
        if has_label(labels, AWSPREVIOUS) {
            self.remove_label("retire (remove AWSPREVIOUS)", &secret, AWSPREVIOUS, version)
                .await?;
        }
        Ok(())
    }

    async fn destroy(&self, item: VaultItem<'_>) -> Result<(), PluginError> {
        let secret = self.secret_id(item.path);
        self.budget.acquire().await;
        match self
            .client
            .delete_secret()
            .secret_id(&secret)
            .force_delete_without_recovery(true)
            .send()
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if is_not_found(&e) => Ok(()),
            Err(e) => Err(self.sdk_err("destroy (DeleteSecret)", &secret, &e, None)),
        }
    }

    /// `DescribeSecret`: the version id labelled `AWSCURRENT` (and not
    /// `AWSPENDING`, like `read`), without reading a value.
    async fn current_mark(&self, item: VaultItem<'_>) -> Result<Option<CurrentMark>, PluginError> {
        let secret = self.secret_id(item.path);
        let Some(versions) = self
            .labels("current_mark (DescribeSecret)", &secret)
            .await?
        else {
            return Ok(None);
        };
        Ok(versions
            .iter()
            .find(|(_, l)| has_label(l, AWSCURRENT) && !has_label(l, AWSPENDING))
            .map(|(id, _)| CurrentMark(id.clone())))
    }

    async fn check(&self) -> Result<(), PluginError> {
        self.client
            .list_secrets()
            .max_results(1)
            .send()
            .await
            .map(|_| ())
            .map_err(|e| self.sdk_err("check (ListSecrets)", "(none)", &e, None))
    }
}

// ---------------------------------------------------------------------------
// Tests. The ones marked "real server" run against moto_server: they read
// KEYTURN_TEST_AWS_ENDPOINT (plus AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY /
// AWS_REGION) and fail when it is missing. Each test uses its own secrets.
// ---------------------------------------------------------------------------

#[cfg(test)]
mod tests;
