//! The `azure_key_vault` vault: Azure Key Vault secrets through the official
//! SDK (`azure_security_keyvault_secrets` 1.0, `azure_identity` 1.0).
//!
//! # Names
//! Key Vault secret names allow only `[0-9a-zA-Z-]` (1–127 characters) and are
//! case-insensitive, so a credential path is encoded, deterministically and
//! reversibly (hence collision-free), into lowercase letters, digits and `-`,
//! with `-` as an escape character ([`secret_name`]):
//!
//! | in the path | in the name |
//! | --- | --- |
//! | `a`–`z`, `0`–`9` | themselves |
//! | `/` | `--` |
//! | `-` | `-h` |
//! | `_` | `-u` |
//! | `.` | `-p` |
//! | `A`–`Z` | `-c` + the lowercase letter |
//! | any other byte | `-x` + two lowercase hex digits |
//!
//! e.g. `agents/invoice-bot/db_main` → `agents--invoice-hbot--db-umain`. Every
//! escape is `-` plus one code character, so decoding is unambiguous. An
//! encoded name longer than [`MAX_ENCODED_LEN`] is refused (`invalid`) rather
//! than hashed, so that two paths can never share a secret.
//!
//! # Two secrets per credential: readers only ever see a working value
//! Key Vault has no stages: a plain reader (an app, the CSI driver, an App
//! Service reference) reads the *latest* version of a secret. A pending value
//! written as a new version would be served to them before it works at the
//! target; written *disabled*, the latest version would answer `403` to them
//! for as long as the rotation is pending (hours, if a target is down). Neither
//! is acceptable, so the pending value lives in a sibling secret:
//!
//! - `NAME-staging` holds pending versions (tags `keyturn-rotation`,
//!   `keyturn-stage=pending`). `-s` never occurs in an encoded path, so this
//!   name cannot collide with another credential's. The [`VersionRef`] keyturn
//!   keeps for a version is the id of its staging version.
//! - `NAME` holds what readers get. `promote` copies the pending value there as
//!   a new version tagged `keyturn-stage=current` and `keyturn-version=<the
//!   staging version id>`, so it becomes "latest" exactly when it is promoted;
//!   the old current is retagged `previous` (still enabled, for the grace
//!   period); the staging version is disabled and tagged `promoted`.
//! - `retire` disables the previous version and tags it `retired`.
//!
//! # Idempotency without an idempotency token
//! Key Vault has no request token, so a write whose answer was lost may have
//! happened. Every write is therefore preceded by a read-back: `stage` lists
//! the staging secret's versions and returns the one tagged with this rotation
//! id if there is one; `promote` looks for a `NAME` version already tagged with
//! the version being promoted. A retried step never creates a second version.
//! Listing costs one call per 25 versions; versions cannot be deleted one by
//! one in Key Vault, so both secrets grow by one version per rotation.
//!
//! # Errors and retries
//! The SDK's retry policy is turned off (the engine owns retries): 429 is
//! `throttled` with the `Retry-After` seconds in the message, 5xx/408 and
//! connection or I/O failures are `transient`, 401/403 and token failures
//! `unauthorized`, 404 `not_found`, 409 `conflict`, other 4xx `invalid`.
//! Messages name the vault, the secret and the operation; never a value or a
//! token (service error texts are clipped, and never contain values).
//!
//! # Destroy
//! `destroy` deletes both secrets (a soft delete on vaults with soft delete,
//! which is every new vault) and then purges them. Purging needs the
//! `secrets/purge` permission and is refused on vaults with purge protection;
//! then the secrets stay soft-deleted (unreadable by normal reads, recoverable
//! by an admin) until the vault's retention ends, and a warning says so. Right
//! after a delete the service may answer 409 to the purge while the delete
//! completes: that is `transient`, and a retried `destroy` finishes it.
//!
//! # TLS and tests
//! The SDK refuses bearer tokens over plain http, so tests use the in-repo
//! TLS contract stub `tests/stubs/azure_keyvault_stub.py`; `ca_file` adds its
//! CA to the trusted roots, and `verify_challenge_resource = false` lets the
//! challenge's `resource` (vault.azure.net) differ from a loopback host. The
//! SDK keeps the response bodies it parses in buffers keyturn cannot zeroize;
//! keyturn's own copies of values are zeroized.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use azure_core::cloud::{CloudConfiguration, CustomConfiguration};
use azure_core::credentials::TokenCredential;
use azure_core::error::ErrorKind as AzErrorKind;
use azure_core::http::headers::RETRY_AFTER;
use azure_core::http::{ClientOptions, RequestContent, RetryOptions, Transport};
use azure_core::time::OffsetDateTime;
use azure_security_keyvault_secrets::models::{
    SecretAttributes, SecretClientGetSecretOptions, SecretClientUpdateSecretPropertiesOptions,
    SetSecretParameters, UpdateSecretPropertiesParameters,
};
use azure_security_keyvault_secrets::{ResourceExt, SecretClient, SecretClientOptions};
use futures::TryStreamExt;
use zeroize::{Zeroize, Zeroizing};

use super::lazy::LazyVault;
use super::{Select, StoredVersion, Vault, VaultItem, VaultPlugin, VersionRef};
use crate::config::validate::{Loc, Validator, VaultScope, duration_value};
use crate::model::{ErrorKind, PluginError, RotationId, SecretValue, Stage};

/// Longest encoded path: Key Vault allows 127 characters and the staging
/// secret adds [`STAGING_SUFFIX`].
pub const MAX_ENCODED_LEN: usize = 127 - STAGING_SUFFIX.len();
/// Appended to a credential's secret name for the secret holding its pending
/// versions. `-s` is not an escape the encoding produces.
const STAGING_SUFFIX: &str = "-staging";

const TAG_ROTATION: &str = "keyturn-rotation";
const TAG_STAGE: &str = "keyturn-stage";
/// On a `NAME` version: the staging version id it was promoted from (the
/// [`VersionRef`] keyturn knows it by).
const TAG_VERSION: &str = "keyturn-version";
/// On a version demoted to previous: the version whose promotion demoted it,
/// so a replayed promote knows which previous is its own.
const TAG_DEMOTED_BY: &str = "keyturn-demoted-by";
/// The credential path, for operators browsing the vault.
const TAG_PATH: &str = "keyturn-path";

/// Staging-secret stages besides `pending`.
const STAGE_PROMOTED: &str = "promoted";
const STAGE_ABANDONED: &str = "abandoned";

/// A secret name `check` reads; absent is as healthy as present.
const HEALTH_SECRET: &str = "keyturn-health-check";
/// Longest piece of a service error message quoted in ours.
const MAX_DETAIL: usize = 300;

/// Default time allowed for one request, connect included.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// `[vaults.NAME]` with `type = "azure_key_vault"`.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AzureConfig {
    /// `https://NAME.vault.azure.net`.
    pub vault_url: String,
    /// `client_secret`, `managed_identity` or `workload_identity`.
    pub auth: String,
    pub tenant_id: Option<String>,
    pub client_id: Option<String>,
    pub client_secret_file: Option<PathBuf>,
    /// An extra CA (PEM) to trust besides the system roots (a private
    /// endpoint's, or a test server's).
    pub ca_file: Option<PathBuf>,
    /// Require the auth challenge's resource to be a parent domain of the
    /// vault host (the SDK's default, true); false only for a loopback stub.
    pub verify_challenge_resource: Option<bool>,
    /// Where the Entra ID credentials (client secret, workload identity) get
    /// tokens, e.g. `https://login.microsoftonline.us` for a sovereign cloud
    /// or the test stub; https only. Unset: `AZURE_AUTHORITY_HOST`, else the
    /// public cloud.
    pub authority_host: Option<String>,
    /// Per request, connect included (default 30 s).
    pub timeout: Option<String>,
    pub max_concurrent: Option<usize>,
}

/// How keyturn authenticates to Entra ID.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AzureAuth {
    ClientSecret {
        tenant_id: String,
        client_id: String,
        secret_file: PathBuf,
    },
    /// The VM's / App Service's managed identity; `client_id` picks a
    /// user-assigned one, `None` the system-assigned one.
    ManagedIdentity { client_id: Option<String> },
    /// AKS workload identity: `AZURE_TENANT_ID`, `AZURE_CLIENT_ID` and
    /// `AZURE_FEDERATED_TOKEN_FILE` from the pod's environment.
    WorkloadIdentity,
}

impl AzureConfig {
    /// A config with the defaults.
    pub fn new(vault_url: impl Into<String>, auth: &str) -> Self {
        Self {
            vault_url: vault_url.into(),
            auth: auth.to_owned(),
            ..Self::default()
        }
    }

    /// The way to log in; `None` when `auth` is unknown or incomplete.
    pub fn auth(&self) -> Option<AzureAuth> {
        match self.auth.as_str() {
            "client_secret" => Some(AzureAuth::ClientSecret {
                tenant_id: self.tenant_id.clone()?,
                client_id: self.client_id.clone()?,
                secret_file: self.client_secret_file.clone()?,
            }),
            "managed_identity" => Some(AzureAuth::ManagedIdentity {
                client_id: self.client_id.clone(),
            }),
            "workload_identity" => Some(AzureAuth::WorkloadIdentity),
            _ => None,
        }
    }

    pub fn timeout(&self) -> Duration {
        duration_value(self.timeout.as_deref(), DEFAULT_TIMEOUT)
    }
}

impl VaultPlugin for AzureConfig {
    fn check(&mut self, v: &mut Validator<'_>, p: Loc<'_>, _: &VaultScope<'_>) {
        v.url(
            p.key("vault_url"),
            &self.vault_url,
            &["https"],
            "https://NAME.vault.azure.net",
        );
        self.vault_url = self.vault_url.trim_end_matches('/').to_owned();
        if let Some(host) = &mut self.authority_host {
            // The SDK refuses a non-https authority too, but only at the
            // first rotation; say it at load time.
            v.url(
                p.key("authority_host"),
                host,
                &["https"],
                "https://login.microsoftonline.com",
            );
            *host = host.trim_end_matches('/').to_owned();
        }
        match self.auth.as_str() {
            "client_secret" => {
                for (key, set) in [
                    ("tenant_id", self.tenant_id.is_some()),
                    ("client_id", self.client_id.is_some()),
                    ("client_secret_file", self.client_secret_file.is_some()),
                ] {
                    if !set {
                        v.err_key(p, format!("auth = \"client_secret\" needs `{key}`"));
                    }
                }
                if let Some(f) = &mut self.client_secret_file {
                    v.resolve_path(p.key("client_secret_file"), f);
                }
            }
            "managed_identity" => {
                if self.authority_host.is_some() {
                    v.err(
                        p.key("authority_host"),
                        "authority_host has no effect with auth = \"managed_identity\" (the host's identity endpoint issues the tokens); remove it",
                    );
                }
            }
            "workload_identity" => {}
            other => v.err(
                p.key("auth"),
                format!("unknown auth `{other}`; expected one of `client_secret`, `managed_identity`, `workload_identity`"),
            ),
        }
        if let Some(ca) = &mut self.ca_file {
            v.resolve_path(p.key("ca_file"), ca);
        }
        v.timeout(&p, &self.timeout, DEFAULT_TIMEOUT);
    }

    fn max_concurrent(&self) -> Option<usize> {
        self.max_concurrent
    }

    fn open(&self, name: &str) -> Result<Arc<dyn Vault>, PluginError> {
        Ok(LazyVault::connecting(
            name,
            self.clone(),
            |name, c| async move {
                Ok(Arc::new(AzureVault::connect(&name, &c).await?) as Arc<dyn Vault>)
            },
        ))
    }
}

/// An Azure Key Vault. Cheap to share behind an `Arc`; the SDK client pools
/// connections.
pub struct AzureVault {
    name: String,
    client: SecretClient,
}

impl std::fmt::Debug for AzureVault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AzureVault")
            .field("name", &self.name)
            .field("vault_url", &self.client.endpoint().as_str())
            .finish_non_exhaustive()
    }
}

/// The Key Vault secret name for a credential path (see the module docs).
pub fn secret_name(path: &str) -> Result<String, PluginError> {
    let mut out = String::with_capacity(path.len() + 8);
    for b in path.bytes() {
        match b {
            b'a'..=b'z' | b'0'..=b'9' => out.push(b as char),
            b'/' => out.push_str("--"),
            b'-' => out.push_str("-h"),
            b'_' => out.push_str("-u"),
            b'.' => out.push_str("-p"),
            b'A'..=b'Z' => {
                out.push_str("-c");
                out.push(b.to_ascii_lowercase() as char);
            }
            _ => {
                out.push_str("-x");
                out.push_str(&hex::encode([b]));
            }
        }
    }
    if out.is_empty() || out.len() > MAX_ENCODED_LEN {
        return Err(PluginError::new(
            ErrorKind::Invalid,
            format!(
                "credential path `{}` encodes to a Key Vault secret name of {} characters; the limit is {MAX_ENCODED_LEN} (use a shorter path)",
                path.escape_debug(),
                out.len()
            ),
        ));
    }
    Ok(out)
}

/// The two secrets of one credential.
struct Names {
    /// What readers read: current and previous versions.
    main: String,
    /// Pending versions.
    staging: String,
}

impl Names {
    fn of(path: &str) -> Result<Self, PluginError> {
        let main = secret_name(path)?;
        let staging = format!("{main}{STAGING_SUFFIX}");
        Ok(Self { main, staging })
    }
}

/// What listing versions tells about one version (never its value).
#[derive(Debug, Clone)]
struct VersionInfo {
    id: String,
    enabled: bool,
    created: Option<OffsetDateTime>,
    tags: HashMap<String, String>,
}

impl VersionInfo {
    fn tag(&self, key: &str) -> Option<&str> {
        self.tags.get(key).map(String::as_str)
    }
    fn stage(&self) -> Option<&str> {
        self.tag(TAG_STAGE)
    }
    fn is(&self, stage: &str) -> bool {
        self.stage() == Some(stage)
    }
}

impl AzureVault {
    /// Builds the credential `s.auth` names and the client. Makes no request
    /// (see [`Vault::check`]).
    pub async fn connect(name: &str, s: &AzureConfig) -> Result<Self, PluginError> {
        let http = build_http_client(s).map_err(|what| {
            PluginError::new(
                ErrorKind::Invalid,
                format!("azure key vault `{name}`: {what}"),
            )
        })?;
        let credential = build_credential(name, s, &http).await?;
        Self::with_http(name, s, credential, http)
    }

    /// Tests and embedding: any TokenCredential (tests pass a fixed-token one).
    pub fn with_credential(
        name: &str,
        s: &AzureConfig,
        cred: Arc<dyn TokenCredential>,
    ) -> Result<Self, PluginError> {
        let http = build_http_client(s).map_err(|what| {
            PluginError::new(
                ErrorKind::Invalid,
                format!("azure key vault `{name}`: {what}"),
            )
        })?;
        Self::with_http(name, s, cred, http)
    }

    /// The client over `http` (the transport the credential may share).
    fn with_http(
        name: &str,
        s: &AzureConfig,
        cred: Arc<dyn TokenCredential>,
        http: reqwest::Client,
    ) -> Result<Self, PluginError> {
        let invalid = |what: String| {
            PluginError::new(
                ErrorKind::Invalid,
                format!("azure key vault `{name}`: {what}"),
            )
        };
        if !s.vault_url.starts_with("https://") {
            return Err(invalid(format!(
                "vault_url `{}` must start with https:// (Key Vault only speaks TLS and the SDK refuses tokens over http)",
                s.vault_url
            )));
        }
        let mut client_options = ClientOptions {
            // The engine owns retries and backoff; an SDK retrying underneath
            // would multiply attempts and hide throttling from it.
            retry: RetryOptions::none(),
            ..ClientOptions::default()
        };
        client_options.transport = Some(Transport::new(Arc::new(http)));
        let options = SecretClientOptions {
            client_options,
            verify_challenge_resource: Some(s.verify_challenge_resource.unwrap_or(true)),
            ..SecretClientOptions::default()
        };
        let client = SecretClient::new(&s.vault_url, cred, Some(options))
            .map_err(|e| invalid(format!("vault_url `{}`: {e}", s.vault_url)))?;
        Ok(Self {
            name: name.to_owned(),
            client,
        })
    }

    /// Our error for an SDK error while doing `op` on `secret`.
    fn error(&self, op: &str, secret: &str, e: &azure_core::Error) -> PluginError {
        let (kind, detail) = classify(e);
        PluginError::new(
            kind,
            format!(
                "azure key vault `{}` ({}): {op} secret `{secret}`: {detail}",
                self.name,
                self.client.endpoint().as_str().trim_end_matches('/')
            ),
        )
        .with_retry_after(retry_after(e))
    }

    /// Every version of `secret`, oldest first; empty when it does not exist.
    async fn list_versions(&self, op: &str, secret: &str) -> Result<Vec<VersionInfo>, PluginError> {
        let mut pager = self
            .client
            .list_secret_properties_versions(secret, None)
            .map_err(|e| self.error(op, secret, &e))?;
        let mut out = Vec::new();
        loop {
            match pager.try_next().await {
                Ok(Some(p)) => {
                    let id = p
                        .resource_id()
                        .ok()
                        .and_then(|r| r.version)
                        .ok_or_else(|| {
                            PluginError::new(
                                ErrorKind::Fatal,
                                format!(
                                    "azure key vault `{}`: {op} secret `{secret}`: a listed version has no version id",
                                    self.name
                                ),
                            )
                        })?;
                    let attributes = p.attributes.unwrap_or_default();
                    out.push(VersionInfo {
                        id,
                        // Absent means the service default, enabled.
                        enabled: attributes.enabled.unwrap_or(true),
                        created: attributes.created,
                        tags: p.tags.unwrap_or_default(),
                    });
                }
                Ok(None) => break,
                Err(e) if e.http_status().map(u16::from) == Some(404) => return Ok(Vec::new()),
                Err(e) => return Err(self.error(op, secret, &e)),
            }
        }
        // The service does not promise an order; creation time does.
        out.sort_by_key(|v| v.created);
        Ok(out)
    }

    /// The value of one version. `None` when it does not exist.
    async fn get_value(
        &self,
        op: &str,
        secret: &str,
        version: &str,
    ) -> Result<Option<SecretValue>, PluginError> {
        let options = SecretClientGetSecretOptions {
            secret_version: Some(version.to_owned()),
            ..Default::default()
        };
        let response = match self.client.get_secret(secret, Some(options)).await {
            Ok(r) => r,
            Err(e) if e.http_status().map(u16::from) == Some(404) => return Ok(None),
            Err(e) => return Err(self.error(op, secret, &e)),
        };
        let model = response
            .into_model()
            .map_err(|e| self.error(op, secret, &e))?;
        match model.value {
            Some(v) => Ok(Some(SecretValue::from_string(v))),
            None => Err(PluginError::new(
                ErrorKind::Fatal,
                format!(
                    "azure key vault `{}`: {op} secret `{secret}` version {version}: the service returned no value",
                    self.name
                ),
            )),
        }
    }

    /// Creates a version; returns its id.
    async fn set(
        &self,
        op: &str,
        secret: &str,
        value: &SecretValue,
        tags: HashMap<String, String>,
    ) -> Result<String, PluginError> {
        let text = value.expose_str().ok_or_else(|| {
            PluginError::new(
                ErrorKind::Invalid,
                format!(
                    "azure key vault `{}`: {op} secret `{secret}`: the value is not UTF-8 text, and Key Vault stores text",
                    self.name
                ),
            )
        })?;
        let mut params = SetSecretParameters {
            value: Some(text.to_owned()),
            tags: Some(tags),
            content_type: Some("text/plain".to_owned()),
            secret_attributes: None,
        };
        // Serialize by reference so our copy of the value can be wiped; the
        // JSON body itself belongs to the SDK from here on.
        let json = azure_core::json::to_json(&params);
        if let Some(v) = params.value.as_mut() {
            v.zeroize();
        }
        let body: RequestContent<SetSecretParameters> =
            json.map_err(|e| self.error(op, secret, &e))?.into();
        let response = self
            .client
            .set_secret(secret, body, None)
            .await
            .map_err(|e| self.error(op, secret, &e))?;
        let model = response
            .into_model()
            .map_err(|e| self.error(op, secret, &e))?;
        // The answer echoes the value; it goes out of scope with `model`.
        let id = model.resource_id().ok().and_then(|r| r.version);
        drop(Zeroizing::new(model.value.unwrap_or_default()));
        id.ok_or_else(|| {
            PluginError::new(
                ErrorKind::Fatal,
                format!(
                    "azure key vault `{}`: {op} secret `{secret}`: the service returned no version id",
                    self.name
                ),
            )
        })
    }

    /// Sets `enabled` (when given) and replaces the tags of one version.
    async fn update(
        &self,
        op: &str,
        secret: &str,
        version: &str,
        enabled: Option<bool>,
        tags: HashMap<String, String>,
    ) -> Result<(), PluginError> {
        let params = UpdateSecretPropertiesParameters {
            content_type: None,
            secret_attributes: enabled.map(|enabled| SecretAttributes {
                enabled: Some(enabled),
                ..Default::default()
            }),
            tags: Some(tags),
        };
        let body = params.try_into().map_err(|e| self.error(op, secret, &e))?;
        let options = SecretClientUpdateSecretPropertiesOptions {
            secret_version: Some(version.to_owned()),
            ..Default::default()
        };
        self.client
            .update_secret_properties(secret, body, Some(options))
            .await
            .map_err(|e| self.error(op, secret, &e))?;
        Ok(())
    }

    /// `v`'s tags with `stage` (and any `extra`) set.
    fn retag(v: &VersionInfo, stage: &str, extra: &[(&str, &str)]) -> HashMap<String, String> {
        let mut tags = v.tags.clone();
        tags.insert(TAG_STAGE.to_owned(), stage.to_owned());
        for (k, val) in extra {
            tags.insert((*k).to_owned(), (*val).to_owned());
        }
        tags
    }

    /// Disables pending staging versions other than `keep`: their rotations
    /// were abandoned (one pending version per credential, like the local vault).
    async fn abandon_other_pending(
        &self,
        names: &Names,
        staged: &[VersionInfo],
        keep: &str,
    ) -> Result<(), PluginError> {
        for v in staged {
            if v.id != keep && v.is(Stage::Pending.as_str()) {
                let tags = Self::retag(v, STAGE_ABANDONED, &[]);
                self.update("stage: abandon", &names.staging, &v.id, Some(false), tags)
                    .await?;
            }
        }
        Ok(())
    }

    async fn read_one(
        &self,
        op: &str,
        secret: &str,
        v: &VersionInfo,
        version: VersionRef,
        stage: Stage,
    ) -> Result<Option<StoredVersion>, PluginError> {
        let Some(value) = self.get_value(op, secret, &v.id).await? else {
            return Ok(None);
        };
        Ok(Some(StoredVersion {
            version,
            rotation: v.tag(TAG_ROTATION).and_then(RotationId::parse),
            stage,
            value,
        }))
    }
}

#[async_trait]
impl Vault for AzureVault {
    fn describe(&self) -> &str {
        &self.name
    }

    async fn stage(
        &self,
        item: VaultItem<'_>,
        rotation: &RotationId,
        value: &SecretValue,
    ) -> Result<VersionRef, PluginError> {
        let names = Names::of(item.path)?;
        // Read back first: if a previous attempt's write happened (its answer
        // lost, or we crashed), that version is this rotation's.
        let staged = self.list_versions("stage", &names.staging).await?;
        if let Some(v) = staged
            .iter()
            .rev()
            .find(|v| v.tag(TAG_ROTATION) == Some(rotation.as_str()))
        {
            self.abandon_other_pending(&names, &staged, &v.id).await?;
            return Ok(VersionRef(v.id.clone()));
        }
        let tags = HashMap::from([
            (TAG_ROTATION.to_owned(), rotation.to_string()),
            (TAG_STAGE.to_owned(), Stage::Pending.as_str().to_owned()),
            (TAG_PATH.to_owned(), item.path.to_owned()),
        ]);
        let id = self.set("stage", &names.staging, value, tags).await?;
        self.abandon_other_pending(&names, &staged, &id).await?;
        tracing::debug!(vault = %self.name, credential = %item.key, secret = %names.staging, version = %id, "staged a pending version");
        Ok(VersionRef(id))
    }

    async fn read(
        &self,
        item: VaultItem<'_>,
        select: Select<'_>,
    ) -> Result<Option<StoredVersion>, PluginError> {
        let names = Names::of(item.path)?;
        match select {
            Select::Stage(Stage::Retired) => Ok(None),
            Select::Stage(Stage::Pending) => {
                let staged = self.list_versions("read pending", &names.staging).await?;
                let Some(v) = staged
                    .iter()
                    .rev()
                    .find(|v| v.enabled && v.is(Stage::Pending.as_str()))
                else {
                    return Ok(None);
                };
                let version = VersionRef(v.id.clone());
                self.read_one("read pending", &names.staging, v, version, Stage::Pending)
                    .await
            }
            Select::Stage(stage) => {
                let op = format!("read {stage}");
                let main = self.list_versions(&op, &names.main).await?;
                let Some(v) = main
                    .iter()
                    .rev()
                    .find(|v| v.enabled && v.is(stage.as_str()))
                else {
                    return Ok(None);
                };
                let version = VersionRef(v.tag(TAG_VERSION).unwrap_or(&v.id).to_owned());
                self.read_one(&op, &names.main, v, version, stage).await
            }
            Select::Version(version) => {
                let op = format!("read version {version}");
                let main = self.list_versions(&op, &names.main).await?;
                if let Some(v) = main
                    .iter()
                    .rev()
                    .find(|v| v.tag(TAG_VERSION) == Some(version.0.as_str()))
                {
                    let stage = v.stage().and_then(Stage::parse);
                    return match stage {
                        Some(stage @ (Stage::Current | Stage::Previous)) if v.enabled => {
                            self.read_one(&op, &names.main, v, version.clone(), stage)
                                .await
                        }
                        // Retired (disabled): the value is gone as far as keyturn is concerned.
                        _ => Ok(None),
                    };
                }
                let staged = self.list_versions(&op, &names.staging).await?;
                match staged.iter().find(|v| v.id == version.0) {
                    Some(v) if v.enabled && v.is(Stage::Pending.as_str()) => {
                        self.read_one(&op, &names.staging, v, version.clone(), Stage::Pending)
                            .await
                    }
                    _ => Ok(None),
                }
            }
        }
    }

    async fn promote(&self, item: VaultItem<'_>, version: &VersionRef) -> Result<(), PluginError> {
        let names = Names::of(item.path)?;
        let op = format!("promote version {version}");
        let v = version.0.as_str();
        let main = self.list_versions(&op, &names.main).await?;
        let staged = self.list_versions(&op, &names.staging).await?;
        let copies = |stage: &str| {
            main.iter()
                .rev()
                .find(|m| m.tag(TAG_VERSION) == Some(v) && m.enabled && m.is(stage))
        };

        // 1. Make `version` the latest version of NAME, unless an earlier
        //    attempt already did (read back: a lost answer must not make two).
        let current_id = if let Some(done) = copies(Stage::Current.as_str()) {
            done.id.clone()
        } else {
            let (value, rotation) = if let Some(prev) = copies(Stage::Previous.as_str()) {
                // A rollback to the previous version: copy it again so that it
                // becomes "latest" for readers, not just tagged current.
                let value = self.get_value(&op, &names.main, &prev.id).await?;
                (value, prev.tag(TAG_ROTATION).map(str::to_owned))
            } else {
                let Some(pending) = staged.iter().find(|s| s.id == v) else {
                    return Err(PluginError::new(
                        ErrorKind::NotFound,
                        format!(
                            "azure key vault `{}`: {op}: secret `{}` has no such version",
                            self.name, names.staging
                        ),
                    ));
                };
                if !(pending.enabled && pending.is(Stage::Pending.as_str())) {
                    return Err(PluginError::new(
                        ErrorKind::Invalid,
                        format!(
                            "azure key vault `{}`: {op}: version is {} in secret `{}`, not pending; refusing to promote it",
                            self.name,
                            pending.stage().unwrap_or("untagged"),
                            names.staging
                        ),
                    ));
                }
                let value = self.get_value(&op, &names.staging, v).await?;
                (value, pending.tag(TAG_ROTATION).map(str::to_owned))
            };
            let Some(value) = value else {
                return Err(PluginError::new(
                    ErrorKind::NotFound,
                    format!(
                        "azure key vault `{}`: {op}: its value disappeared while promoting",
                        self.name
                    ),
                ));
            };
            let mut tags = HashMap::from([
                (TAG_STAGE.to_owned(), Stage::Current.as_str().to_owned()),
                (TAG_VERSION.to_owned(), v.to_owned()),
                (TAG_PATH.to_owned(), item.path.to_owned()),
            ]);
            if let Some(r) = rotation {
                tags.insert(TAG_ROTATION.to_owned(), r);
            }
            self.set(&op, &names.main, &value, tags).await?
        };

        // 2. Demote the old current, retire an older previous and any older
        //    copy of this version. Each is idempotent, so a replay finishes
        //    what a crash interrupted.
        for m in &main {
            if m.id == current_id {
                continue;
            }
            if m.tag(TAG_VERSION) == Some(v) {
                if m.enabled || !m.is(Stage::Retired.as_str()) {
                    let tags = Self::retag(m, Stage::Retired.as_str(), &[]);
                    self.update(&op, &names.main, &m.id, Some(false), tags)
                        .await?;
                }
            } else if m.is(Stage::Current.as_str()) {
                let tags = Self::retag(m, Stage::Previous.as_str(), &[(TAG_DEMOTED_BY, v)]);
                self.update(&op, &names.main, &m.id, None, tags).await?;
            } else if m.is(Stage::Previous.as_str()) && m.tag(TAG_DEMOTED_BY) != Some(v) {
                let tags = Self::retag(m, Stage::Retired.as_str(), &[]);
                self.update(&op, &names.main, &m.id, Some(false), tags)
                    .await?;
            }
        }

        // 3. The staging copy has done its job: disable it so the value is
        //    enabled in one place only. Its tags keep `stage` replayable.
        if let Some(s) = staged
            .iter()
            .find(|s| s.id == v && (s.enabled || s.is(Stage::Pending.as_str())))
        {
            let tags = Self::retag(s, STAGE_PROMOTED, &[]);
            self.update(&op, &names.staging, &s.id, Some(false), tags)
                .await?;
        }
        tracing::debug!(vault = %self.name, credential = %item.key, secret = %names.main, version = %version, "promoted");
        Ok(())
    }

    async fn retire(&self, item: VaultItem<'_>, version: &VersionRef) -> Result<(), PluginError> {
        let names = Names::of(item.path)?;
        let op = format!("retire version {version}");
        let v = version.0.as_str();
        let main = self.list_versions(&op, &names.main).await?;
        let copies: Vec<&VersionInfo> = main
            .iter()
            .filter(|m| m.tag(TAG_VERSION) == Some(v))
            .collect();
        if copies
            .iter()
            .any(|m| m.enabled && m.is(Stage::Current.as_str()))
        {
            return Err(PluginError::new(
                ErrorKind::Invalid,
                format!(
                    "azure key vault `{}`: {op}: it is the current version of secret `{}`; refusing to retire it",
                    self.name, names.main
                ),
            ));
        }
        if copies.is_empty() {
            let staged = self.list_versions(&op, &names.staging).await?;
            if staged
                .iter()
                .any(|s| s.id == v && s.enabled && s.is(Stage::Pending.as_str()))
            {
                return Err(PluginError::new(
                    ErrorKind::Invalid,
                    format!(
                        "azure key vault `{}`: {op}: it is pending in secret `{}`; refusing to retire it",
                        self.name, names.staging
                    ),
                ));
            }
            // Unknown or already gone: nothing to do.
            return Ok(());
        }
        for m in copies {
            if m.enabled || !m.is(Stage::Retired.as_str()) {
                let tags = Self::retag(m, Stage::Retired.as_str(), &[]);
                self.update(&op, &names.main, &m.id, Some(false), tags)
                    .await?;
            }
        }
        Ok(())
    }

    async fn destroy(&self, item: VaultItem<'_>) -> Result<(), PluginError> {
        let names = Names::of(item.path)?;
        for secret in [&names.main, &names.staging] {
            match self.client.delete_secret(secret, None).await {
                Ok(_) => {}
                // Never existed, or deleted by an earlier attempt.
                Err(e) if e.http_status().map(u16::from) == Some(404) => {}
                Err(e) => return Err(self.error("destroy: delete", secret, &e)),
            }
            match self.client.purge_deleted_secret(secret, None).await {
                Ok(_) => {}
                Err(e) => match e.http_status().map(u16::from) {
                    Some(404) => {}
                    Some(403) => {
                        tracing::warn!(
                            vault = %self.name, credential = %item.key, secret = %secret,
                            "purge not permitted (no secrets/purge permission, or purge protection): \
                             the secret stays soft-deleted, unreadable but recoverable, until the vault's retention ends"
                        );
                    }
                    Some(409) => {
                        let mut err = self.error("destroy: purge", secret, &e);
                        err.kind = ErrorKind::Transient;
                        err.message
                            .push_str(" (the delete is still completing; retry the destroy)");
                        return Err(err);
                    }
                    _ => return Err(self.error("destroy: purge", secret, &e)),
                },
            }
        }
        Ok(())
    }

    async fn check(&self) -> Result<(), PluginError> {
        // Any authenticated answer about a secret proves reachability, TLS
        // and credentials; absent is fine.
        match self.client.get_secret(HEALTH_SECRET, None).await {
            Ok(_) => Ok(()),
            Err(e) if e.http_status().map(u16::from) == Some(404) => Ok(()),
            Err(e) => Err(self.error("check: read", HEALTH_SECRET, &e)),
        }
    }
}

/// The SDK's reqwest client, built by us to trust `ca_file` and bound time.
fn build_http_client(s: &AzureConfig) -> Result<reqwest::Client, String> {
    let timeout = s.timeout();
    let mut builder = reqwest::Client::builder()
        .https_only(true)
        .timeout(timeout)
        .connect_timeout(timeout.min(Duration::from_secs(10)))
        // Key Vault does not redirect; following one would carry the token.
        .redirect(reqwest::redirect::Policy::none());
    if let Some(ca) = &s.ca_file {
        let pem = std::fs::read(ca).map_err(|e| format!("ca_file {}: {e}", ca.display()))?;
        let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| {
            format!(
                "ca_file {}: not a PEM certificate bundle: {e}",
                ca.display()
            )
        })?;
        if certs.is_empty() {
            return Err(format!("ca_file {}: holds no certificate", ca.display()));
        }
        builder = builder.tls_certs_merge(certs);
    }
    builder
        .build()
        .map_err(|e| format!("building the HTTPS client: {}", chain(&e)))
}

/// The Entra ID credential `s.auth` describes.
///
/// The client secret and workload identity credentials talk to the authority
/// host over the vault's own HTTPS client (`http`), so `ca_file` and the
/// timeouts apply to token requests too (a private authority, or the test
/// stub). Managed identity keeps the SDK's default transport: IMDS and the App
/// Service identity endpoint are plain http on a link-local or loopback
/// address, which the vault's https-only client would refuse.
async fn build_credential(
    name: &str,
    s: &AzureConfig,
    http: &reqwest::Client,
) -> Result<Arc<dyn TokenCredential>, PluginError> {
    let fail = |what: String| {
        PluginError::new(
            ErrorKind::Invalid,
            format!("azure key vault `{name}`: credentials: {what}"),
        )
    };
    // Tokens from Entra ID: no SDK retries here either.
    let options = || ClientOptions {
        retry: RetryOptions::none(),
        ..ClientOptions::default()
    };
    let entra_options = || {
        let mut o = options();
        o.transport = Some(Transport::new(Arc::new(http.clone())));
        if let Some(host) = &s.authority_host {
            let mut custom = CustomConfiguration::default();
            custom.authority_host = host.clone();
            o.cloud = Some(Arc::new(CloudConfiguration::Custom(custom)));
        }
        o
    };
    let auth = s.auth().ok_or_else(|| {
        fail(format!(
            "auth `{}` is unknown or incomplete (the config was not checked)",
            s.auth
        ))
    })?;
    let cred: Arc<dyn TokenCredential> = match &auth {
        AzureAuth::ClientSecret {
            tenant_id,
            client_id,
            secret_file,
        } => {
            let raw = Zeroizing::new(tokio::fs::read(secret_file).await.map_err(|e| {
                PluginError::io(
                    format!(
                        "azure key vault `{name}`: client secret file {}",
                        secret_file.display()
                    ),
                    &e,
                )
            })?);
            let text = std::str::from_utf8(&raw)
                .map_err(|_| {
                    fail(format!(
                        "client secret file {} is not UTF-8 text",
                        secret_file.display()
                    ))
                })?
                .trim_end_matches(['\r', '\n']);
            if text.is_empty() {
                return Err(fail(format!(
                    "client secret file {} is empty",
                    secret_file.display()
                )));
            }
            azure_identity::ClientSecretCredential::new(
                tenant_id,
                client_id.clone(),
                azure_core::credentials::Secret::new(text.to_owned()),
                Some(azure_identity::ClientSecretCredentialOptions {
                    client_options: entra_options(),
                }),
            )
            .map_err(|e| fail(format!("client secret credential: {e}")))?
        }
        AzureAuth::ManagedIdentity { client_id } => azure_identity::ManagedIdentityCredential::new(
            Some(azure_identity::ManagedIdentityCredentialOptions {
                user_assigned_id: client_id
                    .clone()
                    .map(azure_identity::UserAssignedId::ClientId),
                client_options: options(),
            }),
        )
        .map_err(|e| fail(format!("managed identity: {e}")))?,
        AzureAuth::WorkloadIdentity => {
            let mut o = azure_identity::WorkloadIdentityCredentialOptions::default();
            o.credential_options.client_options = entra_options();
            azure_identity::WorkloadIdentityCredential::new(Some(o))
                .map_err(|e| fail(format!("workload identity: {e}")))?
        }
    };
    Ok(cred)
}

/// The kind and an operator-facing description of an SDK error.
/// The `Retry-After` of a 429 or 503, in seconds (the form Key Vault sends).
fn retry_after(e: &azure_core::Error) -> Option<std::time::Duration> {
    match e.kind() {
        AzErrorKind::HttpResponse { raw_response, .. } => raw_response
            .as_ref()?
            .headers()
            .get_optional_str(&RETRY_AFTER)?
            .trim()
            .parse::<u64>()
            .ok()
            .map(std::time::Duration::from_secs),
        _ => None,
    }
}

fn classify(e: &azure_core::Error) -> (ErrorKind, String) {
    match e.kind() {
        AzErrorKind::HttpResponse {
            status,
            error_code,
            raw_response,
        } => {
            let code = u16::from(*status);
            let kind = match code {
                429 => ErrorKind::Throttled,
                401 | 403 => ErrorKind::Unauthorized,
                404 => ErrorKind::NotFound,
                409 => ErrorKind::Conflict,
                408 | 500..=599 => ErrorKind::Transient,
                _ => ErrorKind::Invalid,
            };
            let mut detail = format!("HTTP {code}");
            if let Some(c) = error_code {
                detail.push(' ');
                detail.push_str(&clip(c));
            }
            detail.push_str(": ");
            detail.push_str(&clip(&e.to_string()));
            if let Some(after) = raw_response
                .as_ref()
                .and_then(|r| r.headers().get_optional_str(&RETRY_AFTER))
            {
                match after.trim().parse::<u64>() {
                    Ok(secs) => detail.push_str(&format!("; retry after {secs}s")),
                    Err(_) => detail.push_str(&format!("; Retry-After: {}", clip(after))),
                }
            }
            (kind, detail)
        }
        AzErrorKind::Connection | AzErrorKind::Io => (ErrorKind::Transient, chain(e)),
        AzErrorKind::Credential => (
            ErrorKind::Unauthorized,
            format!("getting a token: {}", chain(e)),
        ),
        // A response we cannot parse, a challenge we refuse, a bad URL: retrying
        // the same request will not help.
        AzErrorKind::DataConversion | AzErrorKind::Other => (ErrorKind::Invalid, chain(e)),
        #[allow(unreachable_patterns)]
        _ => (ErrorKind::Transient, chain(e)),
    }
}

/// An error and its causes, `a: b: c`, without repeats, clipped.
fn chain(e: &dyn std::error::Error) -> String {
    let mut parts: Vec<String> = vec![e.to_string()];
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        source = s.source();
    }
    clip(&parts.join(": "))
}

fn clip(s: &str) -> String {
    let s = s.trim();
    if s.len() <= MAX_DETAIL {
        return s.to_owned();
    }
    let mut end = MAX_DETAIL;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

#[cfg(test)]
mod tests {
    //! Unit tests for naming and error mapping, and REAL-SERVER tests against
    //! the Key Vault contract stub (`tests/stubs/azure_keyvault_stub.py`),
    //! started by `scripts/services.sh`, through the real SDK over TLS.

    use super::*;
    use crate::model::{AgentId, CredentialId, CredentialKey};
    use azure_core::credentials::{AccessToken, TokenRequestOptions};

    const STUB_TOKEN: &str = "keyturn-test-token";
    /// The stub's default `--client-id` / `--client-secret`.
    const STUB_CLIENT_ID: &str = "keyturn-test-client";
    const STUB_CLIENT_SECRET: &str = "keyturn-test-secret";
    const START_SERVICES: &str =
        "start the test services: `bash scripts/services.sh start` (or run `bash scripts/test.sh`)";

    #[test]
    fn secret_names_are_valid_deterministic_and_distinct() {
        assert_eq!(
            secret_name("agents/invoice-bot/db_main").unwrap(),
            "agents--invoice-hbot--db-umain"
        );
        assert_eq!(secret_name("a/b_c").unwrap(), "a--b-uc");
        assert_eq!(secret_name("Db.v2").unwrap(), "-cdb-pv2");
        assert_eq!(secret_name("a b").unwrap(), "a-x20b");
        // Pairs that a lossy mapping (drop, lowercase, `/`→`-`) would merge.
        let paths = [
            "a/b", "a-b", "a_b", "a.b", "ab", "a//b", "a--b", "A/b", "a/B", "a-/b", "a/-b", "a-hb",
            "a/hb", "é", "a-x20b", "a b",
        ];
        let mut seen = std::collections::HashMap::new();
        for p in paths {
            let n = secret_name(p).unwrap();
            assert!(
                n.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-'),
                "{p} -> {n}"
            );
            assert!(!n.contains("-s"), "{n} could collide with a staging name");
            if let Some(other) = seen.insert(n.clone(), p) {
                panic!("{p} and {other} both map to {n}");
            }
        }
        assert_eq!(
            secret_name(&"a".repeat(MAX_ENCODED_LEN)).unwrap().len(),
            MAX_ENCODED_LEN
        );
        let long = secret_name(&"a".repeat(MAX_ENCODED_LEN + 1)).unwrap_err();
        assert_eq!(long.kind, ErrorKind::Invalid);
        assert!(secret_name("").is_err());
        let names = Names::of("x/y").unwrap();
        assert_eq!(names.staging, "x--y-staging");
        assert!(names.staging.len() <= 127);
    }

    #[test]
    fn http_errors_map_to_kinds_with_retry_after() {
        use azure_core::http::headers::Headers;
        use azure_core::http::{RawResponse, StatusCode};
        let err = |status: StatusCode, retry_after: Option<&str>| {
            let mut headers = Headers::new();
            if let Some(r) = retry_after {
                headers.insert(RETRY_AFTER, r.to_owned());
            }
            let raw = RawResponse::from_bytes(status, headers, "");
            azure_core::Error::with_message(
                AzErrorKind::HttpResponse {
                    status,
                    error_code: Some("Code".into()),
                    raw_response: Some(Box::new(raw)),
                },
                "service said no",
            )
        };
        assert_eq!(
            retry_after(&err(StatusCode::TooManyRequests, Some("7"))),
            Some(std::time::Duration::from_secs(7))
        );
        assert_eq!(retry_after(&err(StatusCode::TooManyRequests, None)), None);
        let (k, d) = classify(&err(StatusCode::TooManyRequests, Some("7")));
        assert_eq!(k, ErrorKind::Throttled);
        assert!(
            d.contains("HTTP 429") && d.contains("retry after 7s"),
            "{d}"
        );
        for (status, kind) in [
            (StatusCode::ServiceUnavailable, ErrorKind::Transient),
            (StatusCode::InternalServerError, ErrorKind::Transient),
            (StatusCode::Unauthorized, ErrorKind::Unauthorized),
            (StatusCode::Forbidden, ErrorKind::Unauthorized),
            (StatusCode::NotFound, ErrorKind::NotFound),
            (StatusCode::Conflict, ErrorKind::Conflict),
            (StatusCode::BadRequest, ErrorKind::Invalid),
        ] {
            assert_eq!(classify(&err(status, None)).0, kind, "{status:?}");
        }
        let io = azure_core::Error::with_message(AzErrorKind::Io, "connection reset");
        assert_eq!(classify(&io).0, ErrorKind::Transient);
        let conn = azure_core::Error::with_message(AzErrorKind::Connection, "refused");
        assert_eq!(classify(&conn).0, ErrorKind::Transient);
        let cred = azure_core::Error::with_message(AzErrorKind::Credential, "no token");
        assert_eq!(classify(&cred).0, ErrorKind::Unauthorized);
    }

    #[test]
    fn settings_without_https_are_refused() {
        let s = AzureConfig {
            timeout: Some("1s".into()),
            ..AzureConfig::new("http://127.0.0.1:1", "workload_identity")
        };
        let e =
            AzureVault::with_credential("kv", &s, Arc::new(FixedToken("t".into()))).unwrap_err();
        assert_eq!(e.kind, ErrorKind::Invalid);
        assert!(e.message.contains("https://"), "{}", e.message);
    }

    // --- against the stub (real SDK, real TLS) ------------------------------

    /// Stands in for Entra ID: always the same token.
    #[derive(Debug)]
    struct FixedToken(String);

    #[async_trait]
    impl TokenCredential for FixedToken {
        async fn get_token(
            &self,
            _scopes: &[&str],
            _options: Option<TokenRequestOptions<'_>>,
        ) -> azure_core::Result<AccessToken> {
            Ok(AccessToken::new(
                self.0.clone(),
                OffsetDateTime::now_utc() + azure_core::time::Duration::hours(1),
            ))
        }
    }

    struct Stub {
        url: String,
        ca: PathBuf,
    }

    fn stub() -> Stub {
        let url =
            std::env::var("KEYTURN_TEST_AZURE_URL").unwrap_or_else(|_| panic!("{START_SERVICES}"));
        let ca =
            std::env::var("KEYTURN_TEST_AZURE_CA").unwrap_or_else(|_| panic!("{START_SERVICES}"));
        Stub {
            url: url.trim_end_matches('/').to_owned(),
            ca: PathBuf::from(ca),
        }
    }

    fn vault_with_token(token: &str) -> AzureVault {
        let stub = stub();
        let s = AzureConfig {
            ca_file: Some(stub.ca),
            verify_challenge_resource: Some(false),
            timeout: Some("10s".into()),
            ..AzureConfig::new(stub.url, "workload_identity")
        };
        AzureVault::with_credential("kv-test", &s, Arc::new(FixedToken(token.into()))).unwrap()
    }

    fn vault() -> AzureVault {
        vault_with_token(STUB_TOKEN)
    }

    /// A vault that logs in like the daemon does: a client secret sent to
    /// the stub's Entra ID token endpoint (`authority_host`), over the same
    /// TLS client as the vault requests (the stub's CA is only in `ca_file`).
    async fn vault_with_client_secret(secret: &str) -> (AzureVault, tempfile::TempDir) {
        let stub = stub();
        let dir = tempfile::tempdir().unwrap();
        let secret_file = dir.path().join("client-secret");
        std::fs::write(&secret_file, format!("{secret}\n")).unwrap();
        let s = AzureConfig {
            tenant_id: Some("00000000-0000-0000-0000-000000000001".into()),
            client_id: Some(STUB_CLIENT_ID.into()),
            client_secret_file: Some(secret_file),
            ca_file: Some(stub.ca),
            verify_challenge_resource: Some(false),
            authority_host: Some(stub.url.clone()),
            timeout: Some("10s".into()),
            ..AzureConfig::new(stub.url, "client_secret")
        };
        (AzureVault::connect("kv-entra", &s).await.unwrap(), dir)
    }

    #[cfg_attr(
        not(feature = "real-servers"),
        ignore = "needs the test servers: scripts/services.sh start, then --features real-servers"
    )]
    #[tokio::test]
    async fn client_secret_logs_in_at_the_authority_host() {
        let (v, _dir) = vault_with_client_secret(STUB_CLIENT_SECRET).await;
        v.check().await.unwrap();
        // A full write and read, so the token is really accepted for writes.
        let path = unique_path("entra");
        let k = key();
        let item = VaultItem {
            key: &k,
            path: &path,
        };
        let id = RotationId::generate();
        let r = v.stage(item, &id, &value("entra-value")).await.unwrap();
        v.promote(item, &r).await.unwrap();
        assert_eq!(latest(&v, &path).await.as_deref(), Some("entra-value"));
    }

    #[cfg_attr(
        not(feature = "real-servers"),
        ignore = "needs the test servers: scripts/services.sh start, then --features real-servers"
    )]
    #[tokio::test]
    async fn a_wrong_client_secret_is_unauthorized_and_not_quoted() {
        let wrong = "wrong-secret-7f3a9c";
        let (v, _dir) = vault_with_client_secret(wrong).await;
        let e = v.check().await.unwrap_err();
        assert_eq!(e.kind, ErrorKind::Unauthorized, "{}", e.message);
        assert!(e.message.contains("kv-entra"), "{}", e.message);
        assert!(!e.message.contains(wrong), "{}", e.message);
        // Entra ID's own reason reaches the operator.
        assert!(e.message.contains("Invalid client secret"), "{}", e.message);
    }

    /// A path no other test (or earlier run) uses.
    fn unique_path(test: &str) -> String {
        format!("tests/{test}/{}", RotationId::generate())
    }

    fn key() -> CredentialKey {
        CredentialKey::new(
            AgentId::new("agent").unwrap(),
            CredentialId::new("db").unwrap(),
        )
    }

    fn value(s: &str) -> SecretValue {
        SecretValue::from_string(s.to_owned())
    }

    async fn contract_subject() -> (AzureVault, String, ()) {
        (vault(), unique_path("contract"), ())
    }

    crate::vaults::contract::vault_contract! {
        #[cfg_attr(
            not(feature = "real-servers"),
            ignore = "needs the test servers: scripts/services.sh start, then --features real-servers"
        )]
        open = contract_subject
    }

    /// Tells the stub to misbehave for one secret.
    async fn control(what: &str, body: serde_json::Value) {
        let stub = stub();
        let pem = std::fs::read(&stub.ca).unwrap();
        let client = reqwest::Client::builder()
            .tls_certs_merge(reqwest::Certificate::from_pem_bundle(&pem).unwrap())
            .build()
            .unwrap();
        let rsp = client
            .post(format!("{}/_stub/{what}", stub.url))
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .await
            .unwrap();
        assert!(
            rsp.status().is_success(),
            "stub control {what}: {}",
            rsp.status()
        );
    }

    /// What a plain reader of the vault gets: the latest version's value.
    async fn latest(v: &AzureVault, path: &str) -> Option<String> {
        match v.client.get_secret(&secret_name(path).unwrap(), None).await {
            Ok(r) => r.into_model().unwrap().value,
            Err(e) if e.http_status().map(u16::from) == Some(404) => None,
            Err(e) => panic!("plain read of {path}: {e}"),
        }
    }

    #[cfg_attr(
        not(feature = "real-servers"),
        ignore = "needs the test servers: scripts/services.sh start, then --features real-servers"
    )]
    #[tokio::test]
    async fn plain_readers_get_only_promoted_values_and_retired_versions_are_disabled() {
        let v = vault();
        let path = unique_path("cycle");
        let k = key();
        let item = VaultItem {
            key: &k,
            path: &path,
        };
        let names = Names::of(&path).unwrap();

        let v1 = v
            .stage(item, &RotationId::generate(), &value("value-one"))
            .await
            .unwrap();
        assert_eq!(
            latest(&v, &path).await,
            None,
            "a pending value must not be what readers get"
        );

        // Promote: readers get it; a replayed promote makes no second version.
        v.promote(item, &v1).await.unwrap();
        v.promote(item, &v1).await.unwrap();
        assert_eq!(latest(&v, &path).await.as_deref(), Some("value-one"));
        assert_eq!(
            v.list_versions("t", &names.main).await.unwrap().len(),
            1,
            "a replayed promote made a second version"
        );

        // Readers keep the current value while the next one is pending.
        let v2 = v
            .stage(item, &RotationId::generate(), &value("value-two"))
            .await
            .unwrap();
        assert_eq!(latest(&v, &path).await.as_deref(), Some("value-one"));
        v.promote(item, &v2).await.unwrap();
        assert_eq!(latest(&v, &path).await.as_deref(), Some("value-two"));

        // Retire the previous: disabled in the vault, unreadable even by id.
        v.retire(item, &v1).await.unwrap();
        let main = v.list_versions("t", &names.main).await.unwrap();
        let old = main
            .iter()
            .find(|m| m.tag(TAG_VERSION) == Some(v1.0.as_str()))
            .unwrap();
        assert!(!old.enabled, "the retired version must be disabled");
        assert_eq!(old.stage(), Some("retired"));
        let opts = SecretClientGetSecretOptions {
            secret_version: Some(old.id.clone()),
            ..Default::default()
        };
        let e = v
            .client
            .get_secret(&names.main, Some(opts))
            .await
            .unwrap_err();
        assert_eq!(
            e.http_status().map(u16::from),
            Some(403),
            "a disabled version must not be readable"
        );
        // A refused retire of the current version leaves readers alone.
        assert_eq!(
            v.retire(item, &v2).await.unwrap_err().kind,
            ErrorKind::Invalid
        );
        assert_eq!(latest(&v, &path).await.as_deref(), Some("value-two"));

        v.destroy(item).await.unwrap();
        assert_eq!(latest(&v, &path).await, None);
    }

    #[cfg_attr(
        not(feature = "real-servers"),
        ignore = "needs the test servers: scripts/services.sh start, then --features real-servers"
    )]
    #[tokio::test]
    async fn stage_replay_after_a_lost_response_returns_the_same_version() {
        let v = vault();
        let path = unique_path("dropped");
        let k = key();
        let item = VaultItem {
            key: &k,
            path: &path,
        };
        let names = Names::of(&path).unwrap();
        let r = RotationId::generate();

        control(
            "drop_response",
            serde_json::json!({"count": 1, "secret": names.staging}),
        )
        .await;
        let e = v.stage(item, &r, &value("first-try")).await.unwrap_err();
        assert_eq!(e.kind, ErrorKind::Transient, "{}", e.message);
        assert!(
            e.message.contains(&names.staging) && e.message.contains("kv-test"),
            "{}",
            e.message
        );
        assert!(!e.message.contains("first-try"));

        // The write happened; the retry must find it, not write again.
        let version = v.stage(item, &r, &value("second-try")).await.unwrap();
        let staged = v.list_versions("t", &names.staging).await.unwrap();
        assert_eq!(
            staged.len(),
            1,
            "the retried stage created a second version"
        );
        assert_eq!(staged[0].id, version.0);
        let p = v
            .read(item, Select::Stage(Stage::Pending))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            p.value.expose(),
            b"first-try",
            "the committed value is the one kept"
        );

        // Same for promote: the copy to the main secret is not made twice.
        control(
            "drop_response",
            serde_json::json!({"count": 1, "secret": names.main}),
        )
        .await;
        assert_eq!(
            v.promote(item, &version).await.unwrap_err().kind,
            ErrorKind::Transient
        );
        v.promote(item, &version).await.unwrap();
        assert_eq!(v.list_versions("t", &names.main).await.unwrap().len(), 1);
        assert_eq!(latest(&v, &path).await.as_deref(), Some("first-try"));
        v.destroy(item).await.unwrap();
    }

    #[cfg_attr(
        not(feature = "real-servers"),
        ignore = "needs the test servers: scripts/services.sh start, then --features real-servers"
    )]
    #[tokio::test]
    async fn throttling_is_throttled_with_retry_after_and_not_retried_by_the_sdk() {
        let v = vault();
        let path = unique_path("throttled");
        let k = key();
        let item = VaultItem {
            key: &k,
            path: &path,
        };
        let names = Names::of(&path).unwrap();
        control("faults", serde_json::json!({"status": 429, "count": 1, "retry_after": 7, "secret": names.staging})).await;
        let e = v
            .stage(item, &RotationId::generate(), &value("v"))
            .await
            .unwrap_err();
        assert_eq!(e.kind, ErrorKind::Throttled, "{}", e.message);
        assert!(e.message.contains("retry after 7s"), "{}", e.message);
        assert_eq!(
            e.retry_after,
            Some(std::time::Duration::from_secs(7)),
            "the engine waits at least what the vault asked"
        );
        assert!(
            e.message.contains("stage") && e.message.contains(&names.staging),
            "{}",
            e.message
        );
        // One fault, one failure: the SDK did not retry it away, and it is over.
        v.stage(item, &RotationId::generate(), &value("v"))
            .await
            .unwrap();
        v.destroy(item).await.unwrap();
    }

    #[cfg_attr(
        not(feature = "real-servers"),
        ignore = "needs the test servers: scripts/services.sh start, then --features real-servers"
    )]
    #[tokio::test]
    async fn service_unavailable_is_transient() {
        let v = vault();
        let path = unique_path("unavailable");
        let k = key();
        let item = VaultItem {
            key: &k,
            path: &path,
        };
        let names = Names::of(&path).unwrap();
        control(
            "faults",
            serde_json::json!({"status": 503, "count": 1, "retry_after": 1, "secret": names.main}),
        )
        .await;
        let e = v
            .read(item, Select::Stage(Stage::Current))
            .await
            .unwrap_err();
        assert_eq!(e.kind, ErrorKind::Transient, "{}", e.message);
        assert!(e.message.contains("HTTP 503"), "{}", e.message);
        assert!(
            v.read(item, Select::Stage(Stage::Current))
                .await
                .unwrap()
                .is_none()
        );
    }

    #[cfg_attr(
        not(feature = "real-servers"),
        ignore = "needs the test servers: scripts/services.sh start, then --features real-servers"
    )]
    #[tokio::test]
    async fn a_bad_token_is_unauthorized() {
        let v = vault_with_token("not-the-token");
        let path = unique_path("badtoken");
        let k = key();
        let item = VaultItem {
            key: &k,
            path: &path,
        };
        let e = v
            .stage(item, &RotationId::generate(), &value("v"))
            .await
            .unwrap_err();
        assert_eq!(e.kind, ErrorKind::Unauthorized, "{}", e.message);
        assert!(!e.message.contains("not-the-token"), "{}", e.message);
        assert_eq!(v.check().await.unwrap_err().kind, ErrorKind::Unauthorized);
    }

    #[cfg_attr(
        not(feature = "real-servers"),
        ignore = "needs the test servers: scripts/services.sh start, then --features real-servers"
    )]
    #[tokio::test]
    async fn an_unreachable_vault_is_transient() {
        // A port nobody listens on (bind, read the port, close).
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let s = AzureConfig {
            ca_file: Some(stub().ca),
            verify_challenge_resource: Some(false),
            timeout: Some("5s".into()),
            ..AzureConfig::new(format!("https://127.0.0.1:{port}"), "workload_identity")
        };
        let v = AzureVault::with_credential("kv-down", &s, Arc::new(FixedToken(STUB_TOKEN.into())))
            .unwrap();
        let e = v.check().await.unwrap_err();
        assert_eq!(e.kind, ErrorKind::Transient, "{}", e.message);
        assert!(e.message.contains("kv-down"), "{}", e.message);
    }

    #[cfg_attr(
        not(feature = "real-servers"),
        ignore = "needs the test servers: scripts/services.sh start, then --features real-servers"
    )]
    #[tokio::test]
    async fn promoting_an_abandoned_version_is_invalid() {
        let v = vault();
        let path = unique_path("abandon");
        let k = key();
        let item = VaultItem {
            key: &k,
            path: &path,
        };
        let old = v
            .stage(item, &RotationId::generate(), &value("old"))
            .await
            .unwrap();
        v.stage(item, &RotationId::generate(), &value("new"))
            .await
            .unwrap();
        assert_eq!(
            v.promote(item, &old).await.unwrap_err().kind,
            ErrorKind::Invalid
        );
        v.destroy(item).await.unwrap();
    }

    #[cfg_attr(
        not(feature = "real-servers"),
        ignore = "needs the test servers: scripts/services.sh start, then --features real-servers"
    )]
    #[tokio::test]
    async fn replay_finds_a_version_beyond_the_first_page() {
        let v = vault();
        let path = unique_path("paging");
        let k = key();
        let item = VaultItem {
            key: &k,
            path: &path,
        };
        let rotations: Vec<RotationId> = (0..30).map(|_| RotationId::generate()).collect();
        let mut versions = Vec::new();
        for r in &rotations {
            versions.push(v.stage(item, r, &value("x")).await.unwrap());
        }
        // The service pages at 25: rotation 28's version is on page two.
        assert_eq!(
            v.stage(item, &rotations[28], &value("y")).await.unwrap(),
            versions[28]
        );
        let names = Names::of(&path).unwrap();
        assert_eq!(
            v.list_versions("t", &names.staging).await.unwrap().len(),
            30
        );
        v.destroy(item).await.unwrap();
    }
}
