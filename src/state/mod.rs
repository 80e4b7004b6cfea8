//! Persistent state: credentials, rotations, version metadata (never values),
//! and the audit head. The [`StateStore`] trait has the embedded SQLite
//! implementation; a PostgreSQL one is planned for scale-out.
//!
//! Writes go through [`StateStore::apply`], one transaction per call, so the
//! engine persists a step's effects atomically.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::model::{AgentId, CredentialId, CredentialKey, RotationId, Stage, VersionNo};
use crate::rotation::{Step, Trigger};

pub mod lock;
pub mod memory;
pub mod space;
pub mod sqlite;
mod writer;

pub use memory::MemoryStore;
pub use sqlite::SqliteStore;
pub use writer::StateWriter;

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("state database {path}: {message}")]
    Db { path: String, message: String },
    #[error(
        "state database {path} has schema version {found}, newer than this keyturn ({supported}); upgrade keyturn"
    )]
    TooNew {
        path: String,
        found: i64,
        supported: i64,
    },
    #[error("state database {path}: corrupt row: {message}")]
    Corrupt { path: String, message: String },
}

pub type Result<T> = std::result::Result<T, StateError>;

/// One credential's summary row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CredentialRow {
    pub key: CredentialKey,
    /// The version agents have been given (None before the first rotation).
    pub current_version: Option<VersionNo>,
    pub last_rotated_at: Option<DateTime<Utc>>,
    pub next_due: Option<DateTime<Utc>>,
    /// Failed attempts since the last success (drives the retry delay).
    pub consecutive_failures: u32,
    /// When the first of those failures happened (`None` when there are
    /// none): the stable start of a "rotation failing" alert, across
    /// restarts.
    pub failing_since: Option<DateTime<Utc>>,
    pub last_error: Option<String>,
}

impl CredentialRow {
    /// One more failure at `at`; the first of a run starts `failing_since`.
    pub fn count_failure(&mut self, at: DateTime<Utc>) {
        if self.consecutive_failures == 0 || self.failing_since.is_none() {
            self.failing_since = Some(at);
        }
        self.consecutive_failures = self.consecutive_failures.saturating_add(1);
    }
}

/// One rotation, persisted before and after every step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RotationRow {
    pub id: RotationId,
    pub key: CredentialKey,
    /// The next step to run (`Done` when finished).
    pub step: Step,
    pub trigger: Trigger,
    /// The version this rotation creates.
    pub version: VersionNo,
    /// Vault-native id of the new version, once staged.
    pub vault_version: Option<String>,
    /// The version that was current when this rotation started, if any.
    pub previous_version: Option<VersionNo>,
    pub previous_vault_version: Option<String>,
    pub started_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// When the previous version is retired (delivery + grace).
    pub retire_at: Option<DateTime<Utc>>,
    /// Failed attempts of the current step.
    pub attempts: u32,
    pub last_error: Option<String>,
    /// Where the versions are held (JSON the engine writes and reads; see
    /// `rotation::footprint`). `None` in rows written before it existed.
    pub footprint: Option<String>,
    /// While this rotation's `rotation.start` audit record may be missing:
    /// the seq of the last audit record before the row was first written
    /// (the start record, if it was appended, comes after it). The row is
    /// durable before its start record is appended, and the next write of
    /// the row clears this; a rotation resumed with it set looks for its
    /// start record after that seq and appends it if it is not there. `None`
    /// once the record is known to be in the log (and in rows written
    /// before it existed).
    pub start_record_after: Option<u64>,
}

/// Metadata of one version. Never the value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VersionRow {
    pub key: CredentialKey,
    pub version: VersionNo,
    pub rotation: RotationId,
    pub stage: Stage,
    pub vault_version: String,
    pub created_at: DateTime<Utc>,
    /// The public half of a keypair.
    pub public: Option<String>,
}

/// Every version of `key` other than `except` that is in `from` moves to `to`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Restage {
    pub key: CredentialKey,
    pub except: Vec<VersionNo>,
    pub from: Vec<Stage>,
    pub to: Stage,
}

impl Restage {
    /// Whether `version`, now at `stage`, moves (it is one of `key`'s).
    pub fn moves(&self, version: VersionNo, stage: Stage) -> bool {
        !self.except.contains(&version) && self.from.contains(&stage)
    }
}

/// One consumer that must acknowledge a delivered version (a sink whose
/// delivery was `Sent`, or one whose delivery is still being retried).
/// Rows are replaced by the next delivery of the credential.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AckRow {
    pub key: CredentialKey,
    pub version: VersionNo,
    /// The sink's description (`file:/run/keyturn/a/db`).
    pub consumer: String,
    /// `None` while awaited.
    pub acked_at: Option<DateTime<Utc>>,
}

/// The recorded decision that an agent is retired, and how far its
/// revocation got. Kept as keyturn's own JSON (add fields with defaults,
/// never rename one): rows outlive the config that made them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DecommissionRow {
    pub agent: AgentId,
    /// When the decision was made (the SLA clock starts here).
    pub decided_at: DateTime<Utc>,
    /// When keyturn recorded it (later than `decided_at` for a decision
    /// declared in the config before the daemon read it).
    pub recorded_at: DateTime<Utc>,
    /// Who asked: the control-socket peer (`uid=0 gid=0 pid=42`) or `config`.
    pub actor: String,
    /// The human named with `--by` (or in the config's `by`), if any.
    #[serde(default)]
    pub by: Option<String>,
    pub reason: String,
    /// `command` or `config`.
    pub source: String,
    #[serde(default)]
    pub owner: String,
    #[serde(default)]
    pub tenant: String,
    #[serde(default)]
    pub tier: String,
    /// The revocation SLA, in milliseconds.
    pub sla_ms: u64,
    /// Every item revoked (the last one's time).
    #[serde(default)]
    pub revoked_at: Option<DateTime<Utc>>,
    /// Every item verified (the last one's time): the decommission is complete.
    #[serde(default)]
    pub verified_at: Option<DateTime<Utc>>,
    /// No version of the agent's credentials was made on this host when
    /// the decision was recorded: there was nothing here to revoke before
    /// that, so the SLA runs from the recording, not from a decision the
    /// config dates earlier. Black-box finding: a config `decommissioned`
    /// table with `at` in the past, on a host that had never run the agent
    /// (a new host, a fresh state directory), was recorded as a breach.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub nothing_held: bool,
}

impl DecommissionRow {
    /// When the revocation is due: `sla_ms` after the decision (after its
    /// recording when [`Self::nothing_held`]).
    pub fn deadline(&self) -> DateTime<Utc> {
        let from = if self.nothing_held {
            self.decided_at.max(self.recorded_at)
        } else {
            self.decided_at
        };
        from + chrono::Duration::milliseconds(i64::try_from(self.sla_ms).unwrap_or(i64::MAX / 2))
    }

    /// The agent's token epoch: every token naming it that was issued
    /// (`iat`) at or before this is inactive. The later of the decision and
    /// its recording, so a decision the config dates in the past still
    /// covers the tokens issued before the daemon acted on it.
    pub fn token_epoch(&self) -> DateTime<Utc> {
        self.decided_at.max(self.recorded_at)
    }
}

/// One thing a decommissioned agent held, revoked and then verified on its
/// own, and retried until both are done (across restarts).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevocationRow {
    pub agent: AgentId,
    /// Unique within the agent: `db/vault:bao`, `db/target`, `db/sink:0`,
    /// `db/acks`, and `tokens` (the agent's own, not a credential's).
    pub item: String,
    /// The credential the item belongs to; `None` for an agent-level item.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential: Option<CredentialId>,
    /// `vault`, `target`, `sink`, `acks` or `tokens`.
    pub kind: String,
    /// What to revoke, as the revocation module wrote it (JSON; never a value).
    pub spec: serde_json::Value,
    #[serde(default)]
    pub revoked_at: Option<DateTime<Utc>>,
    #[serde(default)]
    pub verified_at: Option<DateTime<Utc>>,
    #[serde(default)]
    pub attempts: u32,
    #[serde(default)]
    pub last_error: Option<String>,
}

/// A `keyturn rotate` accepted while the rotation it starts waits for the
/// current version's acknowledgements (up to that version's grace
/// deadline): kept until the rotation begins, so a restart meanwhile
/// resumes it instead of dropping it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestRow {
    pub key: CredentialKey,
    pub requested_at: DateTime<Utc>,
}

/// The last audit record's sequence number and hash, to detect a truncated log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditHead {
    pub seq: u64,
    /// The link to that record as the next record would carry it: its
    /// SHA-256, or its HMAC-SHA256 under the audit key for a keyed chain.
    pub hash: String,
}

/// One write inside a transaction.
#[derive(Debug, Clone)]
pub enum Write {
    Credential(CredentialRow),
    Rotation(RotationRow),
    Version(VersionRow),
    /// Moves one version to `stage` (no-op if the row does not exist). Lets
    /// the engine record promote and retire without reading the rows first.
    VersionStage {
        key: CredentialKey,
        version: VersionNo,
        stage: Stage,
    },
    RetireOthers(Restage),
    AuditHead(AuditHead),
    /// Forget a credential removed from config (its rows, not its audit).
    ForgetCredential(CredentialKey),
    /// Replaces every ack row of `key` by one awaited row per consumer of
    /// `version` (none: clears them). Written with the deliver step, so it
    /// costs no commit of its own.
    AwaitAcks {
        key: CredentialKey,
        version: VersionNo,
        consumers: Vec<String>,
    },
    /// `consumer` acknowledged `version` (no-op without such a row); also
    /// its last acknowledgement (see [`StateStore::last_acks`]).
    Acked {
        key: CredentialKey,
        version: VersionNo,
        consumer: String,
        at: DateTime<Utc>,
    },
    /// Records (or updates) a decommission.
    Decommission(DecommissionRow),
    /// Records (or updates) one item of a decommission.
    Revocation(RevocationRow),
    /// What `key` holds where, as last delivered (the rotation footprint
    /// with the sinks): what a decommission revokes once the credential
    /// has left the config.
    Holding {
        key: CredentialKey,
        footprint: String,
    },
    /// A rotation of `key` was asked for (`keyturn rotate`) and waits for
    /// the current version's acks before it begins (see [`RequestRow`]).
    /// A request already stored is kept as it is.
    RotationRequested {
        key: CredentialKey,
        at: DateTime<Utc>,
    },
    /// The requested rotation of `key` has begun (written with its start).
    RotationRequestDone(CredentialKey),
    /// `key` had a version `version` that this state database does not
    /// know (it was restored from a backup, or lost its last writes): new
    /// versions are numbered above it. A lower floor than the stored one
    /// changes nothing.
    VersionFloor {
        key: CredentialKey,
        version: VersionNo,
    },
    /// Drops `key`'s finished rotations and retired versions beyond the
    /// newest [`HISTORY_KEPT`] of each, so the state database stays bounded
    /// per credential however long it rotates (the audit log is the history).
    PruneHistory(CredentialKey),
}

/// Finished rotations and retired versions kept per credential.
pub const HISTORY_KEPT: u32 = 8;

/// Everything needed at start-up.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub credentials: Vec<CredentialRow>,
    /// Rotations whose step is not `Done`.
    pub unfinished: Vec<RotationRow>,
    /// Every ack row (awaited or acknowledged) of the last deliveries.
    pub acks: Vec<AckRow>,
    /// Rotations asked for that have not begun yet, in key order.
    pub requests: Vec<RequestRow>,
}

pub trait StateStore: Send + Sync {
    /// Applies all writes in one transaction, durably.
    fn apply(&self, writes: &[Write]) -> Result<()>;
    /// Applies several independent groups of writes, each atomically, with
    /// one result per group in order; a failed group leaves no trace and
    /// does not stop the others. Stores that can should commit them
    /// together (the [`StateWriter`] group-commits through this).
    fn apply_batch(&self, groups: &[&[Write]]) -> Vec<Result<()>> {
        groups.iter().map(|w| self.apply(w)).collect()
    }
    fn snapshot(&self) -> Result<Snapshot>;
    /// Each consumer's last acknowledgement of any version of its
    /// credential, in key and consumer order: unlike the [`AckRow`]s of
    /// the snapshot, kept when the next delivery replaces those (a
    /// credential's last use outlives its rotation).
    fn last_acks(&self) -> Result<Vec<AckRow>>;
    /// Every [`Write::VersionFloor`] stored, in key order.
    fn version_floors(&self) -> Result<Vec<(CredentialKey, VersionNo)>>;
    fn credential(&self, key: &CredentialKey) -> Result<Option<CredentialRow>>;
    fn rotation(&self, id: &RotationId) -> Result<Option<RotationRow>>;
    /// The newest rotation of a credential, finished or not: of the highest
    /// version, the last begun (by version first: the wall clock may step
    /// back between rotations).
    fn latest_rotation(&self, key: &CredentialKey) -> Result<Option<RotationRow>>;
    fn versions(&self, key: &CredentialKey) -> Result<Vec<VersionRow>>;
    fn audit_head(&self) -> Result<Option<AuditHead>>;
    /// Every decommission, in agent order.
    fn decommissions(&self) -> Result<Vec<DecommissionRow>>;
    /// The items of `agent`'s decommission, in item order.
    fn revocations(&self, agent: &AgentId) -> Result<Vec<RevocationRow>>;
    /// What each of `agent`'s credentials holds (`Write::Holding`), in key order.
    fn holdings(&self, agent: &AgentId) -> Result<Vec<(CredentialKey, String)>>;
    /// Every agent state remembers (a credential row or a holding), sorted.
    fn agents(&self) -> Result<Vec<AgentId>>;
    /// At a clean stop: everything committed moves into the database file
    /// itself, so that the file alone is the whole state (a backup copy of
    /// it, or one restored over it, is not joined by a stale log).
    fn checkpoint(&self) -> Result<()> {
        Ok(())
    }
}
