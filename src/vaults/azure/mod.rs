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
//! challenge's `resource` (vault.azure.net) differ from a loopback host
//! (validation refuses it for any other host: there it would let a server
//! ask for a token meant for another resource). The
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
use super::{
    CurrentMark, Pending, Promote, Promoted, Select, StoredVersion, Vault, VaultItem, VaultPlugin,
    VersionRef,
};
use crate::config::validate::{Loc, Validator, VaultScope, duration_value};
use crate::model::{ErrorKind, PluginError, RotationId, SecretValue, Stage};

mod client;
mod config;
#[cfg(test)]
mod tests;

use client::*;
pub use config::{AzureAuth, AzureConfig, DEFAULT_TIMEOUT};

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

    async fn stage(&self, new: Pending<'_>) -> Result<VersionRef, PluginError> {
        let names = Names::of(new.item.path)?;
        // Read back first: if a previous attempt's write happened (its answer
        // lost, or we crashed), that version is this rotation's.
        let staged = self.list_versions("stage", &names.staging).await?;
        if let Some(v) = staged
            .iter()
            .rev()
            .find(|v| v.tag(TAG_ROTATION) == Some(new.rotation.as_str()))
        {
            self.abandon_other_pending(&names, &staged, &v.id).await?;
            return Ok(VersionRef(v.id.clone()));
        }
        let tags = HashMap::from([
            (TAG_ROTATION.to_owned(), new.rotation.to_string()),
            (TAG_STAGE.to_owned(), Stage::Pending.as_str().to_owned()),
            (TAG_PATH.to_owned(), new.item.path.to_owned()),
        ]);
        let id = self.set("stage", &names.staging, new.value, tags).await?;
        self.abandon_other_pending(&names, &staged, &id).await?;
        tracing::debug!(vault = %self.name, credential = %new.item.key, secret = %names.staging, version = %id, "staged a pending version");
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
        let p = Promote {
            version,
            expected: None,
        };
        self.promote_from(item, p).await.map(|_| ())
    }

    /// Promote lists `NAME`'s versions, which names the current one too (as
    /// `read` of the current stage would): no extra list and get for the
    /// engine's check.
    fn promote_reads_current(&self) -> bool {
        true
    }

    async fn promote_from(&self, item: VaultItem<'_>, p: Promote<'_>) -> Promoted {
        let version = p.version;
        let names = Names::of(item.path)?;
        let op = format!("promote version {version}");
        let v = version.0.as_str();
        let main = self.list_versions(&op, &names.main).await?;
        let before = main
            .iter()
            .rev()
            .find(|m| m.enabled && m.is(Stage::Current.as_str()))
            .map(|m| VersionRef(m.tag(TAG_VERSION).unwrap_or(&m.id).to_owned()));
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
        Ok(before)
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

    /// The current version's id from the version list (properties only,
    /// no value): one call per 25 versions of the secret, which grows by
    /// one version per rotation.
    async fn current_mark(&self, item: VaultItem<'_>) -> Result<Option<CurrentMark>, PluginError> {
        let names = Names::of(item.path)?;
        let main = self.list_versions("current_mark", &names.main).await?;
        Ok(main
            .iter()
            .rev()
            .find(|v| v.enabled && v.is(Stage::Current.as_str()))
            .map(|v| CurrentMark(v.id.clone())))
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
