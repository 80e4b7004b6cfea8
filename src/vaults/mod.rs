//! Vaults: where versions of a credential are stored.
//!
//! Each vault is one file behind the [`Vault`] trait and does the minimum: one
//! call per operation, a [`PluginError`] with a kind on failure, no retries (the
//! rotation engine owns retries, backoff, concurrency limits, metrics and audit).
//!
//! The contract every vault keeps, because crash safety depends on it
//! (`contract.rs`, compiled into tests only, checks each clause against every vault):
//! - `stage` stores the value, durably, as the one pending version of the
//!   credential and returns its [`VersionRef`]: one of its own per rotation,
//!   never handed out again, not even after `destroy` (state may still hold
//!   the old one).
//! - `stage` is idempotent per rotation id. If this rotation already staged a
//!   version, it returns that version and does **not** store the new value; the
//!   engine then reads the durable value back with `read`. So a replay after a
//!   crash never creates a second version nor loses the first value.
//! - Staging a new rotation while an older one is pending retires the older
//!   one (its rotation was abandoned): it reads as `None` and promoting it fails.
//! - `read` gives one version, by stage or by ref, with its stage, rotation
//!   and exact value; `Ok(None)` when there is none (nothing staged, retired,
//!   destroyed, or a ref the credential never had).
//! - `promote`: pending (or previous, a rollback) → current, the old current
//!   → previous, the old previous → retired. A no-op when the version is
//!   already current; `NotFound` for a version the credential never had.
//! - `retire`: previous → retired, its value gone. A no-op when already
//!   retired or unknown; `Invalid` for the current or the pending version.
//! - `destroy` removes every version of the credential, and of no other; a
//!   no-op when there is none.
//! - `current_mark` names the current version cheaply (metadata only, no
//!   value): `None` while nothing is current (nothing staged, only pending,
//!   destroyed); the same mark while the current version stays; another mark
//!   after a promote makes another version current. Followers poll it.
//! - `promote_from` is `promote` told what the engine's state expects to
//!   be current; it returns what was current just before (see its docs).
//! - `settle` returns once what the vault owes others about a promoted
//!   version is durable; a no-op by default (only [`change_index`] owes).
//! - Error messages name the vault and never contain a value.
//!
//! # Adding a vault
//! Write `vaults/NAME.rs` (a folder when it is large) holding:
//! - its config struct (`serde::Deserialize`, `Serialize`, `Clone`,
//!   `PartialEq`, `Debug`, `#[serde(deny_unknown_fields)]`), the keys of
//!   `[vaults.X]` with `type = "NAME"` as written, `max_concurrent` included;
//! - `impl VaultPlugin` for it: `check` reports every problem through the
//!   [`Validator`] and completes the config in place; `open` makes the
//!   [`Vault`] without network I/O (a remote vault wraps its connect in
//!   [`lazy::LazyVault`], so a vault that is down does not stop start-up);
//! - the `Vault` itself, and its tests: one line of
//!   `contract::vault_contract!` runs the contract suite against it, and
//!   its own tests check only what is its alone.
//!
//! Then add one line to [`VaultSpec`] below. Nothing else changes: the
//! config loader, validation, the catalog and the engine only see the
//! registry. Policies that are not about one system are decorators around a
//! `Vault` ([`lazy`], [`change_index`]), not code inside a plug-in. A
//! vault that can say which version is current more cheaply than by
//! reading it overrides [`Vault::current_mark`] (followers poll it).
//!
//! # What the engine tells a vault, to save calls
//! Each rotation costs vault calls, which cost the vault CPU and the
//! rotation latency; `docs/vault-calls.md` lists them per vault. Most reads
//! a vault makes are there for the case state cannot rule out: a replay
//! after a crash, or someone writing the vault out of band. Two hints let
//! the engine say when it can rule them out; both are optional (ignoring
//! them is always correct, only slower):
//! - [`Pending::fresh`]: this is the rotation's first `stage` call on this
//!   vault (its first attempt, not resumed after a restart), so nothing of
//!   it can be there yet. A vault may skip its replay checks; it must still
//!   cope with a leftover of another rotation, and it stores `value`, so the
//!   engine does not read it back.
//! - [`Vault::promote_from`]'s `expected`: the version state holds as current,
//!   every older one of which the engine has already retired.

use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;

use crate::config::validate::{Loc, Validator, VaultScope};
use crate::model::{CredentialKey, PluginError, RotationId, SecretValue, Stage};
use crate::plugin::registry;

pub mod aws;
pub mod azure;
pub mod budget;
pub mod change_index;
#[cfg(test)]
pub(crate) mod contract;
pub mod hashicorp;
pub mod lazy;
pub mod local;
#[cfg(test)]
pub mod toy;

registry! {
    /// `[vaults.NAME]`, selected by `type`: one variant per vault.
    pub enum VaultSpec: VaultPlugin {
        Local(local::LocalConfig),
        // HashiCorp Vault or OpenBao, KV v2.
        Vault(hashicorp::HashicorpConfig),
        AwsSecretsManager(aws::AwsConfig),
        AzureKeyVault(azure::AzureConfig),
        #[cfg(test)]
        Toy(toy::ToyConfig),
    }
}

/// What the registry needs of a vault's config.
#[async_trait]
pub trait VaultPlugin: std::fmt::Debug + Send + Sync {
    /// Reports every problem of the section at `at` and completes it in
    /// place (defaults that depend on the daemon, relative paths resolved).
    fn check(&mut self, v: &mut Validator<'_>, at: Loc<'_>, scope: &VaultScope<'_>);

    /// `max_concurrent` as written: rotations touching the vault at once.
    fn max_concurrent(&self) -> Option<usize>;

    /// The vault named `name`. No network I/O.
    fn open(&self, name: &str) -> Result<Arc<dyn Vault>, PluginError>;

    /// `change_index` as written: the path of the entry, in this vault,
    /// where a rotating keyturn records every promote for its followers
    /// (see [`change_index`]).
    fn change_index(&self) -> Option<&str> {
        None
    }

    /// A local directory the vault writes to, for the free-space check at
    /// start-up.
    fn data_dir(&self) -> Option<&Path> {
        None
    }

    /// `keyturn check --online`: logs in to the vault named `name` and uses
    /// it once ([`Vault::check`]), changing nothing. `Ok` may carry a note
    /// for the operator (what was not checked, and why). The default opens
    /// the vault; one whose `open` creates things (the local vault makes its
    /// key and database) overrides this to look without touching.
    async fn probe(&self, name: &str) -> Result<Option<String>, PluginError> {
        self.open(name)?.check().await.map(|()| None)
    }
}

/// One credential as a vault sees it.
#[derive(Debug, Clone, Copy)]
pub struct VaultItem<'a> {
    pub key: &'a CredentialKey,
    /// The credential's `path` in config (validated: relative, no `..`).
    pub path: &'a str,
}

impl<'a> VaultItem<'a> {
    /// `value` as this item's pending version for `rotation`: what
    /// [`Vault::stage`] stores.
    pub fn pending(self, rotation: &'a RotationId, value: &'a SecretValue) -> Pending<'a> {
        Pending {
            item: self,
            rotation,
            value,
            fresh: false,
        }
    }
}

/// What one `stage` call stores: a value for one item and one rotation (the
/// rotation id is what makes a replay idempotent).
#[derive(Debug, Clone, Copy)]
pub struct Pending<'a> {
    pub item: VaultItem<'a>,
    pub rotation: &'a RotationId,
    pub value: &'a SecretValue,
    /// The caller guarantees that no `stage` call for this rotation was
    /// ever made on this vault (see "What the engine tells a vault" in the
    /// module docs). `false` unless set with [`Pending::with_fresh`].
    pub fresh: bool,
}

impl Pending<'_> {
    /// Marks this as the rotation's first `stage` call on the vault.
    pub fn with_fresh(self, fresh: bool) -> Self {
        Pending { fresh, ..self }
    }
}

/// What the engine's promote step asks of [`Vault::promote_from`]: make
/// `version` current, the engine's state holding `expected` as current
/// (`None`: none).
#[derive(Debug, Clone, Copy)]
pub struct Promote<'a> {
    pub version: &'a VersionRef,
    pub expected: Option<&'a VersionRef>,
}

/// What [`Vault::promote_from`] answers: the version current just before.
pub type Promoted = Result<Option<VersionRef>, PluginError>;

/// A vault-native version identifier (a number for the local vault and KV v2,
/// a version id for AWS and Azure). Stored in state; never a secret.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
pub struct VersionRef(pub String);

impl std::fmt::Display for VersionRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Which version to read.
#[derive(Debug, Clone, Copy)]
pub enum Select<'a> {
    Stage(Stage),
    Version(&'a VersionRef),
}

/// A version read back from a vault.
#[derive(Debug)]
pub struct StoredVersion {
    pub version: VersionRef,
    pub rotation: Option<RotationId>,
    pub stage: Stage,
    pub value: SecretValue,
}

#[async_trait]
pub trait Vault: Send + Sync {
    /// The `[vaults.NAME]` name, for messages.
    fn describe(&self) -> &str;

    /// Stores `value` as the pending version of `item` for `rotation`, durably,
    /// before returning. Idempotent per rotation id (see the module docs).
    async fn stage(&self, new: Pending<'_>) -> Result<VersionRef, PluginError>;

    /// Reads one version; `Ok(None)` when there is none (no current yet,
    /// destroyed, retired values are gone).
    async fn read(
        &self,
        item: VaultItem<'_>,
        select: Select<'_>,
    ) -> Result<Option<StoredVersion>, PluginError>;

    /// Makes `version` current; the old current becomes previous and an older
    /// previous becomes retired. A no-op when `version` is already current.
    async fn promote(&self, item: VaultItem<'_>, version: &VersionRef) -> Result<(), PluginError>;

    /// [`Vault::promote`], as the engine's promote step calls it: `p.expected`
    /// is the version the engine's state holds as current in this vault
    /// (`None`: none), every version older than it already retired by the
    /// engine. Returns the version that was current just before the promote
    /// (`None`: none; `version` itself when it already was, a replay), which
    /// the engine compares with `expected` to notice a current version
    /// deleted or overwritten out of band. (With no current version in
    /// state the engine calls plain `promote`: there is nothing to check.)
    ///
    /// The default reads the current version, then promotes: two calls. A
    /// vault whose promote reads the current version anyway overrides it to
    /// read once, and may skip retiring versions older than `expected` when
    /// the version it finds current is `expected`. Decorators forward it.
    async fn promote_from(&self, item: VaultItem<'_>, p: Promote<'_>) -> Promoted {
        let before = self
            .read(item, Select::Stage(Stage::Current))
            .await?
            .map(|v| v.version);
        self.promote(item, p.version).await?;
        Ok(before)
    }

    /// Whether [`promote_from`](Vault::promote_from) learns what was
    /// current at no extra call (its promote reads it anyway): then the
    /// engine uses it for a first version too, to notice a path that held
    /// a secret keyturn did not write. The default's promote_from reads
    /// first: `false`, and a first version is promoted plainly. Decorators
    /// forward it.
    fn promote_reads_current(&self) -> bool {
        false
    }

    /// Retires `version` (drops or disables its value) if it is previous. A no-op
    /// when it is already retired or gone; an error if it is current or pending.
    async fn retire(&self, item: VaultItem<'_>, version: &VersionRef) -> Result<(), PluginError>;

    /// Destroys every version of `item` (decommission).
    async fn destroy(&self, item: VaultItem<'_>) -> Result<(), PluginError>;

    /// Health: can we reach and use the vault? (`check --online`, `/readyz`).
    async fn check(&self) -> Result<(), PluginError>;

    /// At a clean stop, after the last step: folds what the vault keeps
    /// beside its files into them (the local vault's WAL), so that a copy
    /// of its database file alone is the whole vault. Best effort; the
    /// default has nothing to do. Decorators forward it.
    async fn close(&self) {}

    /// Returns once everything this vault owes others about `version` of
    /// `item` (the version the caller promoted last) is durable: a change
    /// index entry that followers read ([`change_index`]). The engine calls
    /// it at the end of the deliver step, so the step is not recorded done
    /// (and is replayed after a crash) until then; a vault with nothing to
    /// owe keeps this default. Decorators forward it.
    async fn settle(&self, item: VaultItem<'_>, version: &VersionRef) -> Result<(), PluginError> {
        let _ = (item, version);
        Ok(())
    }

    /// Whether every version of `item` is gone from the vault, which only
    /// its rotator's `destroy` (a decommission there) does: what a follower
    /// asks before it takes back what it delivered, when the vault shows
    /// no current version. `delivered`: the version it delivered last.
    /// The default reads that version: gone when it cannot be found. A
    /// vault that can tell a deleted current version from a destroyed
    /// credential overrides it, and answers an error for the former (the
    /// agents keep what they have).
    async fn gone(&self, item: VaultItem<'_>, delivered: &VersionRef) -> Result<bool, PluginError> {
        Ok(self.read(item, Select::Version(delivered)).await?.is_none())
    }

    /// A mark that changes whenever another version of `item` becomes
    /// current, read as cheaply as the vault allows (no value): what a
    /// follower polls. `None` while there is no current version. The
    /// default reads the current version (value included); a vault with a
    /// metadata call overrides it.
    async fn current_mark(&self, item: VaultItem<'_>) -> Result<Option<CurrentMark>, PluginError> {
        Ok(self
            .read(item, Select::Stage(Stage::Current))
            .await?
            .map(|v| CurrentMark(v.version.0)))
    }
}

/// What [`Vault::current_mark`] returns: opaque, compared only for equality
/// with an earlier mark of the same item (a KV version number, an AWS
/// version id, a version ref). Not a [`VersionRef`]: a vault may mark its
/// current version with something it cannot read a version by.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CurrentMark(pub String);

/// The version one rotation created in each of a credential's vaults, as
/// recorded in state (`vault_version` columns): a JSON object
/// `{"VAULT": "REF", ...}`. A bare string is a ref recorded before credentials
/// could name several vaults; it belongs to the credential's primary vault.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VaultRefs(pub Vec<(String, VersionRef)>);

impl VaultRefs {
    pub fn get(&self, vault: &str) -> Option<&VersionRef> {
        self.0.iter().find(|(v, _)| v == vault).map(|(_, r)| r)
    }

    pub fn encode(&self) -> String {
        let map: serde_json::Map<String, serde_json::Value> = self
            .0
            .iter()
            .map(|(v, r)| (v.clone(), serde_json::Value::String(r.0.clone())))
            .collect();
        serde_json::Value::Object(map).to_string()
    }

    /// `primary` owns a legacy bare ref. Unreadable text yields no refs, so
    /// the caller reports "no staged version" rather than touching a
    /// version it cannot identify.
    pub fn decode(text: &str, primary: &str) -> VaultRefs {
        if !text.starts_with('{') {
            return VaultRefs(vec![(primary.to_owned(), VersionRef(text.to_owned()))]);
        }
        match serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(text) {
            Ok(map) => VaultRefs(
                map.into_iter()
                    .filter_map(|(v, r)| match r {
                        serde_json::Value::String(r) => Some((v, VersionRef(r))),
                        _ => None,
                    })
                    .collect(),
            ),
            Err(_) => VaultRefs::default(),
        }
    }
}

#[cfg(test)]
mod refs_tests {
    use super::*;

    #[test]
    fn vault_refs_round_trip_and_read_legacy_bare_refs() {
        let refs = VaultRefs(vec![
            ("bao".into(), VersionRef("r:0a".into())),
            ("aws".into(), VersionRef("6f1c-22".into())),
        ]);
        let text = refs.encode();
        let back = VaultRefs::decode(&text, "ignored");
        assert_eq!(back.get("bao"), Some(&VersionRef("r:0a".into())));
        assert_eq!(back.get("aws"), Some(&VersionRef("6f1c-22".into())));
        assert_eq!(back.0.len(), 2);

        let legacy = VaultRefs::decode("7", "local");
        assert_eq!(legacy.0, vec![("local".to_owned(), VersionRef("7".into()))]);
        assert!(VaultRefs::decode("{not json", "local").0.is_empty());
    }
}
