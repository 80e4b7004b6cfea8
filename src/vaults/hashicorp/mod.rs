//! `vault`: HashiCorp Vault and OpenBao, KV version 2, through `vaultrs`.
//!
//! # Layout in the KV v2 mount
//! - `<mount>/data/<path>`: the promoted versions, exactly what agents and
//!   other readers of the vault see. Every version keyturn writes is a map
//!   `{ <field>: "<value>", "keyturn_rotation": "<rotation id>" }` ([`ROTATION_KEY`]):
//!   readers use `<field>` (default `value`); keyturn uses the rotation id to find
//!   its versions again after a crash. The latest version is **current**; the one
//!   just before it (if its data is still there) is **previous**; older ones are
//!   **retired** and their data is destroyed.
//! - `<mount>/data/keyturn-pending/<path>` ([`PENDING_PREFIX`]): the pending slot.
//!   `stage` writes the new value here, so it is durable (invariant 2) while a
//!   plain reader of `<path>` never sees a value that does not yet work at the
//!   target. Grant agents no access to `keyturn-pending/*`. `promote` copies the
//!   value into `<path>` and then deletes the slot (all its versions), so the
//!   secret does not linger in a second place.
//!
//! Pending values are deliberately *not* kept in `custom_metadata`: metadata is
//! listed, shown in UIs and governed by a separate policy path; it is not a
//! place for secrets.
//!
//! # Version references
//! A [`VersionRef`] is the **rotation id** (32 hex characters) for every version
//! keyturn wrote. The KV version number of a value is not known at `stage` (the
//! value is not in `<path>` yet) and changes on a rollback, but the rotation id
//! is fixed from `stage` through `promote` and `retire`, which is what the engine
//! stores. A version written by someone else (no `keyturn_rotation` key) is
//! referred to as `kv-<N>`, its KV version number.
//!
//! # Writes and idempotency
//! Every write uses `cas` (check-and-set): the version number read just before.
//! A writer that slipped in between makes the write fail with
//! [`ErrorKind::Conflict`]; the engine re-reads and retries.
//! - `stage`: if the slot already holds this rotation, or `<path>` already has it
//!   as current (a replay after promote), returns without writing. A slot holding
//!   *another* rotation is the leftover of an abandoned rotation: it is
//!   overwritten (cas on the slot) and its old value destroyed.
//! - `promote`: a no-op when the latest version already carries the rotation,
//!   apart from finishing the clean-up (destroy the data of the version before
//!   the previous, delete the slot) that a crash may have interrupted. Otherwise
//!   the value (from the slot, or from the previous version for a rollback) is
//!   written to `<path>` with cas = the latest version number.
//! - `retire`: KV v2 *destroy* of the previous version's data (the version
//!   number stays in the metadata, marked destroyed).
//! - `destroy`: deletes the metadata of `<path>` and of the slot (all versions).
//!
//! # Authentication
//! - `token`: a fixed token from config.
//! - `token_file`: read at start; when the vault answers 403 the file is read
//!   again, once, and the call repeated if the token changed (a Vault Agent or an
//!   operator may have rewritten it).
//! - `approle`: logs in with the `role_id` and `secret_id` files (read at every
//!   login, so they can be rotated) on first use. keyturn renews its own token
//!   **on use**, when less than a third of its TTL is left, instead of from a
//!   background task: the trait has no lifecycle (a background task would need
//!   its own shutdown wiring), an idle daemon needs no token, and a token that
//!   expired while idle is simply replaced by a fresh login. When renewal no
//!   longer extends the lease enough (the role's max TTL is near), or the token
//!   was revoked (403), keyturn logs in again. Logins and renewals are serialized
//!   so many concurrent rotations trigger one of them, not one each.
//!
//! Tokens live in the vaultrs client (a plain `String`; vaultrs has no secret
//! type) and are never logged or put in a message.
//!
//! # Errors
//! Connection failures, timeouts and 5xx are `transient`; 429 `throttled`;
//! a cas mismatch `conflict`; 401/403 `unauthorized`; TLS certificate failures,
//! other 4xx and bad files `invalid`; a response we cannot understand `fatal`.
//! A 404 on a read is `Ok(None)`. Every message names the vault, its address,
//! the step and the KV path, never a value nor a token; response bodies are
//! never quoted.
//!
//! Values pass through `serde_json` buffers inside vaultrs and reqwest that are
//! not zeroized; keyturn's own copies are [`SecretValue`]s.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use serde_json::{Map, Value};
use vaultrs::api::kv2::requests::{ReadSecretRequest, SetSecretRequest, SetSecretRequestOptions};
use vaultrs::api::kv2::responses::{ReadSecretMetadataResponse, ReadSecretResponse};
use vaultrs::client::{VaultClient, VaultClientSettingsBuilder};
use vaultrs::error::ClientError;
use zeroize::Zeroizing;

use super::lazy::LazyVault;
use super::{
    CurrentMark, Pending, Promote, Promoted, Select, StoredVersion, Vault, VaultItem, VaultPlugin,
    VersionRef,
};
use crate::config::validate::{Loc, Validator, VaultScope, duration_value, is_env_name};
use crate::model::{ErrorKind, PluginError, RotationId, SecretValue, Stage};

mod config;
mod kv;
mod session;
#[cfg(test)]
mod tests;

pub use config::{AppRoleConfig, DEFAULT_TIMEOUT, HashicorpAuth, HashicorpConfig};
pub(crate) use kv::endpoint_error;
pub(crate) use session::Connection;

/// The key, next to the value's field, that records which rotation wrote a version.
pub const ROTATION_KEY: &str = "keyturn_rotation";
/// Pending values live at `<mount>/data/keyturn-pending/<path>`.
pub const PENDING_PREFIX: &str = "keyturn-pending";
/// Prefix of the [`VersionRef`] of a version keyturn did not write.
const KV_REF_PREFIX: &str = "kv-";
/// Older versions read, at most, to find the one to retire when someone
/// else wrote the path after the current one.
const MAX_OLDER_READS: usize = 16;
/// A token, role id or secret id file larger than this is not one.
const MAX_SECRET_FILE: usize = 16 * 1024;
/// Renew when less than this fraction (1/RENEW_FRACTION) of the TTL is left.
const RENEW_FRACTION: u32 = 3;

/// Where a version's data is: the rotation that wrote it, or a bare KV number.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Ref {
    Rotation(RotationId),
    Kv(u64),
}

impl Ref {
    fn parse(v: &VersionRef) -> Option<Ref> {
        if let Some(n) = v.0.strip_prefix(KV_REF_PREFIX) {
            return n.parse().ok().filter(|n| *n > 0).map(Ref::Kv);
        }
        RotationId::parse(&v.0).map(Ref::Rotation)
    }
}

/// One KV version as read back (data present).
struct KvVersion {
    number: u64,
    rotation: Option<RotationId>,
    data: Map<String, Value>,
}

impl KvVersion {
    fn reference(&self) -> VersionRef {
        match &self.rotation {
            Some(r) => VersionRef(r.as_str().to_owned()),
            None => VersionRef(format!("{KV_REF_PREFIX}{}", self.number)),
        }
    }
    fn is(&self, r: &Ref) -> bool {
        match r {
            Ref::Rotation(id) => self.rotation.as_ref() == Some(id),
            Ref::Kv(n) => self.rotation.is_none() && self.number == *n,
        }
    }
}

/// A KV v2 mount of one HashiCorp Vault or OpenBao server.
pub struct HashicorpVault {
    conn: Connection,
    mount: String,
    field: String,
}

impl HashicorpVault {
    /// Checks the settings, reads the token or AppRole files and builds the
    /// client. Does no network I/O: a vault that is down at start is reported
    /// by `check` and by the first operation, not by refusing to start.
    pub async fn connect(name: &str, c: &HashicorpConfig) -> Result<Self, PluginError> {
        let auth = c
            .auth()
            .map_err(|m| PluginError::new(ErrorKind::Invalid, format!("vault {name}: {m}")))?;
        Self::with_auth(name, c, auth).await
    }

    /// [`Self::connect`] with the way to log in given (tests pass a token).
    pub async fn with_auth(
        name: &str,
        c: &HashicorpConfig,
        auth: HashicorpAuth,
    ) -> Result<Self, PluginError> {
        let mount = c.mount().to_owned();
        let field = c.field().to_owned();
        let invalid = |what: String| {
            PluginError::new(
                ErrorKind::Invalid,
                format!("vault {name} ({}): {what}", c.address.trim_end_matches('/')),
            )
        };
        if mount.is_empty() || mount.starts_with('/') || mount.ends_with('/') {
            return Err(invalid(format!(
                "mount {:?} must be a non-empty path without leading or trailing '/'",
                mount
            )));
        }
        if field.is_empty() || field == ROTATION_KEY {
            return Err(invalid(format!(
                "field {:?} must be non-empty and not {ROTATION_KEY:?}",
                field
            )));
        }
        Ok(HashicorpVault {
            conn: Connection::new("vault", name, c, auth)?,
            mount,
            field,
        })
    }
}

/// What `promote` decided after reading, before writing.
struct PromotePlan {
    /// What was current before: the latest version's reference, if its
    /// data could be read.
    before: Option<VersionRef>,
    /// Delete the pending slot (it holds the promoted value).
    clear_slot: bool,
    /// The version whose data to destroy after the write: the one that
    /// becomes retired (before the new previous), when the engine did not
    /// retire it already and keyturn wrote it; `None` to destroy nothing.
    retire_older: Option<u64>,
    action: PromoteAction,
}

enum PromoteAction {
    /// Already current; only clean-up is left.
    Done,
    /// Write `value` for `rotation` as a new version, cas = `cas`.
    Write {
        cas: u64,
        rotation: RotationId,
        value: SecretValue,
    },
}

fn ref_text(r: &Ref) -> String {
    match r {
        Ref::Rotation(id) => id.to_string(),
        Ref::Kv(n) => format!("{KV_REF_PREFIX}{n}"),
    }
}

/// What the vault's status code means for the engine.
fn status_kind(code: u16, errors: &str) -> ErrorKind {
    match code {
        400 if errors.contains("check-and-set") => ErrorKind::Conflict,
        401 | 403 => ErrorKind::Unauthorized,
        404 => ErrorKind::NotFound,
        429 => ErrorKind::Throttled,
        // 412: a performance standby has not caught up yet.
        408 | 412 => ErrorKind::Transient,
        500..=599 => ErrorKind::Transient,
        _ => ErrorKind::Invalid,
    }
}

/// `HTTP 503 Service Unavailable`: the reason phrase says what the number
/// means to whoever reads `status` (a 503 body says "Vault is sealed", or is
/// a load balancer's HTML page, which is never quoted).
fn http_status_text(code: u16) -> String {
    let reason = match code {
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        412 => "Precondition Failed",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => return format!("HTTP {code}"),
    };
    format!("HTTP {code} {reason}")
}

pub(crate) fn http_status(e: &ClientError) -> Option<u16> {
    match e {
        ClientError::APIError { code, .. } => Some(*code),
        ClientError::RestClientError {
            source: rustify::errors::ClientError::ServerResponseError { code, .. },
        } => Some(*code),
        _ => None,
    }
}

/// Tokens and namespaces go into HTTP headers; vaultrs unwraps the header
/// conversion, so anything it would reject must be refused before.
pub(crate) fn header_safe(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| (0x21..=0x7e).contains(&b))
}

/// Zeroizes the strings of a JSON value we built or received.
fn wipe_json(v: Value) {
    match v {
        Value::String(s) => drop(Zeroizing::new(s)),
        Value::Array(a) => a.into_iter().for_each(wipe_json),
        Value::Object(m) => m.into_iter().for_each(|(_, v)| wipe_json(v)),
        _ => {}
    }
}

/// A client used only until `connect` builds the real one.
fn placeholder_client() -> Result<VaultClient, PluginError> {
    VaultClientSettingsBuilder::default()
        .address("http://127.0.0.1:8200")
        .token("")
        .ca_certs(Vec::new())
        .identity(None)
        .verify(true)
        .build()
        .map_err(|e| PluginError::new(ErrorKind::Fatal, format!("vault client settings: {e}")))
        .and_then(|s| {
            VaultClient::new(s)
                .map_err(|e| PluginError::new(ErrorKind::Fatal, format!("vault client: {e}")))
        })
}

#[async_trait]
impl Vault for HashicorpVault {
    fn describe(&self) -> &str {
        &self.conn.name
    }

    async fn stage(&self, new: Pending<'_>) -> Result<VersionRef, PluginError> {
        const STEP: &str = "stage";
        let reference = VersionRef(new.rotation.as_str().to_owned());
        let target = Ref::Rotation(new.rotation.clone());
        let pending_path = Self::pending_path(new.item.path);
        if new.fresh {
            // Nothing of this rotation can be here yet, and after a promote
            // the slot is deleted whole: cas 0 ("only if absent") succeeds in
            // one call. A slot that is there (an abandoned rotation's
            // leftover) refuses it; the checks below then deal with it.
            match self
                .write_kv(STEP, &pending_path, 0, new.rotation, new.value)
                .await
            {
                Ok(_) => return Ok(reference),
                Err(e) if e.kind == ErrorKind::Conflict => {}
                Err(e) => return Err(e),
            }
        }
        let slot = self.read_kv(STEP, &pending_path, None).await?;
        if slot.as_ref().is_some_and(|s| s.is(&target)) {
            // Replay: the value stored the first time wins.
            return Ok(reference);
        }
        // A replay after promote finished (and cleared the slot).
        if let Some(latest) = self.read_kv(STEP, new.item.path, None).await?
            && latest.is(&target)
        {
            return Ok(reference);
        }
        let cas = match &slot {
            Some(old) => {
                tracing::warn!(
                    vault = %self.conn.name, credential = %new.item.key, path = new.item.path,
                    abandoned = %old.reference(), rotation = %new.rotation,
                    "replacing the pending value of an abandoned rotation"
                );
                old.number
            }
            // Absent, or its latest version deleted: the metadata knows.
            None => self
                .read_meta(STEP, &pending_path)
                .await?
                .map_or(0, |m| m.current_version),
        };
        self.write_kv(STEP, &pending_path, cas, new.rotation, new.value)
            .await?;
        if let Some(old) = slot {
            // The abandoned value must not linger in the slot's history.
            self.destroy_versions(STEP, &pending_path, vec![old.number])
                .await?;
        }
        Ok(reference)
    }

    async fn read(
        &self,
        item: VaultItem<'_>,
        select: Select<'_>,
    ) -> Result<Option<StoredVersion>, PluginError> {
        const STEP: &str = "read";
        let path = item.path;
        let pending_path = Self::pending_path(path);
        match select {
            Select::Stage(Stage::Retired) => Ok(None),
            Select::Stage(Stage::Current) => self
                .read_kv(STEP, path, None)
                .await?
                .map(|v| self.to_stored(STEP, path, v, Stage::Current))
                .transpose(),
            Select::Stage(Stage::Previous) => {
                let (latest, _) = self.latest(STEP, path).await?;
                self.read_previous(STEP, path, latest)
                    .await?
                    .map(|v| self.to_stored(STEP, path, v, Stage::Previous))
                    .transpose()
            }
            Select::Stage(Stage::Pending) => {
                let Some(slot) = self.read_kv(STEP, &pending_path, None).await? else {
                    return Ok(None);
                };
                // A slot whose rotation is already current is the leftover of
                // a promote that crashed before clearing it: not pending.
                if let Some(r) = &slot.rotation
                    && let Some(latest) = self.read_kv(STEP, path, None).await?
                    && latest.rotation.as_ref() == Some(r)
                {
                    return Ok(None);
                }
                self.to_stored(STEP, &pending_path, slot, Stage::Pending)
                    .map(Some)
            }
            Select::Version(v) => {
                let target = self.parse_ref(STEP, path, v)?;
                let (latest, latest_data) = self.latest(STEP, path).await?;
                if let Some(cur) = latest_data.filter(|c| c.is(&target)) {
                    return self.to_stored(STEP, path, cur, Stage::Current).map(Some);
                }
                if let Ref::Rotation(_) = target
                    && let Some(slot) = self
                        .read_kv(STEP, &pending_path, None)
                        .await?
                        .filter(|s| s.is(&target))
                {
                    return self
                        .to_stored(STEP, &pending_path, slot, Stage::Pending)
                        .map(Some);
                }
                self.read_previous(STEP, path, latest)
                    .await?
                    .filter(|p| p.is(&target))
                    .map(|p| self.to_stored(STEP, path, p, Stage::Previous))
                    .transpose()
            }
        }
    }

    async fn promote(&self, item: VaultItem<'_>, version: &VersionRef) -> Result<(), PluginError> {
        let target = self.parse_ref("promote", item.path, version)?;
        let plan = self.plan_promote(item.path, &target, None).await?;
        self.commit_promote(item.path, plan).await.map(|_| ())
    }

    /// The promote's own read of the latest version says what was current,
    /// so the engine's check costs no call. When that is `expected`, the
    /// version before it was retired by the engine already and is not
    /// destroyed again.
    fn promote_reads_current(&self) -> bool {
        true
    }

    async fn promote_from(&self, item: VaultItem<'_>, p: Promote<'_>) -> Promoted {
        let target = self.parse_ref("promote", item.path, p.version)?;
        let plan = self.plan_promote(item.path, &target, p.expected).await?;
        self.commit_promote(item.path, plan).await
    }

    async fn retire(&self, item: VaultItem<'_>, version: &VersionRef) -> Result<(), PluginError> {
        const STEP: &str = "retire";
        let path = item.path;
        let target = self.parse_ref(STEP, path, version)?;
        let (latest, latest_data) = self.latest(STEP, path).await?;
        let is_current = match (&target, &latest_data) {
            (Ref::Kv(n), _) => *n == latest && latest > 0,
            (Ref::Rotation(_), Some(cur)) => cur.is(&target),
            (Ref::Rotation(_), None) => false,
        };
        if is_current {
            return Err(self.conn.err(
                ErrorKind::Invalid,
                STEP,
                &self.location(path),
                format!("version {version} is current; only the previous version can be retired"),
            ));
        }
        match self.read_previous(STEP, path, latest).await? {
            Some(prev) if prev.is(&target) => {
                return self.destroy_versions(STEP, path, vec![prev.number]).await;
            }
            // Black-box finding: a previous version someone deleted (KV
            // `delete`, which `undelete` reverses) was taken for retired:
            // the retire said ok and the value stayed recoverable. The
            // version before the current one is the previous by this
            // layout; deleted, it is destroyed now.
            None if latest >= 2 => {
                let deleted = self.read_meta(STEP, path).await?.is_some_and(|m| {
                    m.versions
                        .get(&(latest - 1).to_string())
                        .is_some_and(|v| !v.destroyed && !v.deletion_time.is_empty())
                });
                if deleted {
                    return self.destroy_versions(STEP, path, vec![latest - 1]).await;
                }
            }
            _ => {}
        }
        // Someone else wrote the path since (a version after the current
        // one): the previous is further back. Found by its rotation id, or
        // its number, among the versions not destroyed yet.
        if let Some(number) = self.find_older(STEP, path, latest, &target).await? {
            return self.destroy_versions(STEP, path, vec![number]).await;
        }
        if let Ref::Rotation(_) = target
            && self
                .read_kv(STEP, &Self::pending_path(path), None)
                .await?
                .is_some_and(|s| s.is(&target))
        {
            return Err(self.conn.err(
                ErrorKind::Invalid,
                STEP,
                &self.location(path),
                format!("version {version} is pending; only the previous version can be retired"),
            ));
        }
        // Already retired or gone.
        Ok(())
    }

    async fn destroy(&self, item: VaultItem<'_>) -> Result<(), PluginError> {
        self.delete_all("destroy", item.path).await?;
        self.delete_all("destroy", &Self::pending_path(item.path))
            .await
    }

    /// A decommission deletes the metadata, every version with it; a KV
    /// `delete` of the current version (undone by `undelete`) or a `destroy`
    /// of it by hand leaves the metadata: not a decommission, and not a
    /// reason for a follower to take the agents' files back. One metadata
    /// read, which a follower's read-only policy allows (the pending slot
    /// is not read: followers get no access to it).
    async fn gone(&self, item: VaultItem<'_>, delivered: &VersionRef) -> Result<bool, PluginError> {
        const STEP: &str = "follow";
        let _ = delivered;
        match self.read_meta(STEP, item.path).await? {
            None => Ok(true),
            Some(m) => Err(self.conn.err(
                ErrorKind::Invalid,
                STEP,
                &self.location(item.path),
                format!(
                    "its current version (KV version {}) is deleted or destroyed, but the \
                     credential is still there (its metadata): not a decommission, which \
                     deletes every version. The agents keep what they have; `undelete` the \
                     version, or rotate the credential on its rotator",
                    m.current_version
                ),
            )),
        }
    }

    /// The KV metadata's `current_version` (`kv-N`): one metadata read, no
    /// value. Every promote writes a new KV version of `<path>` (a rollback
    /// too), so the number moves exactly when another version is current.
    async fn current_mark(&self, item: VaultItem<'_>) -> Result<Option<CurrentMark>, PluginError> {
        Ok(self
            .read_meta("current_mark", item.path)
            .await?
            .filter(|m| m.current_version > 0)
            .map(|m| CurrentMark(format!("{KV_REF_PREFIX}{}", m.current_version))))
    }

    async fn check(&self) -> Result<(), PluginError> {
        // A token without the `default` policy may not look itself up
        // (black-box finding: a follower's read-only token, as the README
        // describes it, failed `check --online` here while the daemon
        // followed with it). Refused, the mount check below decides: it
        // passes for any valid token allowed something in the mount.
        let unlooked = match self
            .conn
            .call("check", "auth/token/lookup-self", |c| async move {
                vaultrs::token::lookup_self(&*c).await
            })
            .await
        {
            Ok(_) => None,
            Err(e) if e.kind == ErrorKind::Unauthorized => Some(e),
            Err(e) => return Err(e),
        };
        // The mount is KV version 2 (a version 1 mount takes the first
        // write as a plain secret at `data/...` and answers nothing keyturn
        // can read), and the token may use something in it. The endpoint
        // the `bao kv` commands ask the same of.
        let mount = self.mount.as_str();
        let location = format!("sys/internal/ui/mounts/{mount}");
        let info = self
            .conn
            .call("check", &location, |c| async move {
                vaultrs::api::exec_with_result(
                    &*c,
                    MountInfo {
                        path: mount.to_owned(),
                    },
                )
                .await
            })
            .await;
        let wrong = |detail: String| self.conn.err(ErrorKind::Invalid, "check", mount, detail);
        match info {
            Ok(m) if m.kind == "kv" && m.version() == Some("2") => Ok(()),
            Ok(m) if m.kind == "kv" => Err(wrong(format!(
                "mount `{mount}` is KV version {}; keyturn keeps versions in a KV version 2 mount \
                 (`bao secrets enable -version=2 -path={mount} kv`, or `bao kv enable-versioning {mount}`)",
                m.version().unwrap_or("1")
            ))),
            Ok(m) => Err(wrong(format!(
                "mount `{mount}` is a `{}` engine, not KV version 2",
                m.kind
            ))),
            Err(e) if e.kind == ErrorKind::Unauthorized => Err(unlooked.unwrap_or_else(|| {
                wrong(format!(
                    "there is no mount `{mount}`, or the token may use nothing in it \
                     (check `mount` and the token's policies)"
                ))
            })),
            Err(e) => Err(e),
        }
    }
}

/// `GET sys/internal/ui/mounts/PATH`: the engine mounted at `PATH`, for any
/// token allowed something in it (no `sys/mounts` rights needed).
struct MountInfo {
    path: String,
}

#[derive(serde::Deserialize)]
struct MountDescription {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    options: Option<std::collections::BTreeMap<String, String>>,
}

impl MountDescription {
    fn version(&self) -> Option<&str> {
        self.options.as_ref()?.get("version").map(String::as_str)
    }
}

impl rustify::Endpoint for MountInfo {
    type Response = MountDescription;
    const REQUEST_BODY_TYPE: rustify::enums::RequestType = rustify::enums::RequestType::JSON;
    const RESPONSE_BODY_TYPE: rustify::enums::ResponseType = rustify::enums::ResponseType::JSON;

    fn path(&self) -> String {
        format!("/sys/internal/ui/mounts/{}", self.path)
    }

    fn method(&self) -> rustify::enums::RequestMethod {
        rustify::enums::RequestMethod::GET
    }
}
