//! The tamper-evident audit log: JSON lines, each record carrying the SHA-256
//! of the previous line — or, with an audit key, its HMAC-SHA256 under the
//! key (the record then says `"chain":"hmac-sha256"`) — appended and fsynced
//! before the step it records counts as done. The head (last seq + link) is
//! also kept in the state database so a truncated tail is detected;
//! `keyturn audit verify` names the first bad record.
//! Every append advances that head: a step's records with the step's own
//! state writes, every other record (daemon start/stop/reload, admin requests,
//! refused peers) through [`Engine::record`](crate::rotation::Engine::record).
//!
//! What the chain proves: a record edited, deleted, reordered or inserted
//! anywhere, and records cut off the end, are detected, as long as the state
//! database is not rewritten as well. Without an audit key the chain is a
//! plain hash, so whoever can write both the log and the state database
//! (root, or the daemon's user) can rebuild a consistent, forged history.
//! With the key ([`AuditKey`]: `[daemon] audit_key_file`, or the systemd
//! credential `keyturn-audit-key`), forging a record, or rebuilding the
//! chain after an edit, needs the key: write access to the log and the
//! state is no longer enough. The key must therefore live outside the state
//! directory and the log's directory (validation refuses it there); best is
//! `LoadCredentialEncrypted=`, so it is on disk only encrypted to the host.
//!
//! What it does not prove, even with the key: records cut off the end by
//! someone who can also roll the state head back to an earlier value they
//! saw (an old head is a valid head); a log rewritten entirely without the
//! key before the daemon first ran with one (the switch from plain to keyed
//! is trusted on first use: `audit verify` reports the seq keying starts at,
//! to compare with when the key was configured); and anything by whoever
//! holds the key. The last records of a step in flight when the daemon is
//! killed are ahead of the stored head (the state lags by at most that
//! step), and a power loss can roll the head back a few commits
//! (`synchronous=NORMAL`), which makes the check lenient, never wrong. Ship
//! the log off the host (journald forwarding, a log shipper) for evidence
//! that outlives the host.
//!
//! Keyed and plain records: a log may go from plain to keyed (a key
//! configured later; the daemon writes keyed records whenever it has the
//! key), never back: `audit verify` refuses a plain record after a keyed
//! one, and with the key, a log whose last record is plain. The daemon
//! refuses to start without the key on a keyed log rather than append
//! plain records to it. A record's `prev` is of its own kind; the head
//! stored after a record is that record's line linked with the writer's
//! key (the next record's `prev`).
//!
//! Appends from many rotations are group-committed: one writer thread batches
//! whatever is queued, writes it, fsyncs once, then answers every caller.

use serde::{Deserialize, Serialize};

use crate::model::{AgentId, CredentialId, RotationId, VersionNo};

mod archive;
mod key;
mod log;
mod verify;

pub use archive::{ARCHIVED_EVENT, Archived, Continues, archive, default_archive_path};
pub use key::{AUDIT_KEY_CREDENTIAL, AuditKey, MIN_KEY_LEN};
pub use log::{AuditLog, refuse_records_without_state};
pub use verify::{
    Problem, Verification, VerifyError, VerifyReport, key_matches_tail, keyed_tail, verify_all,
    verify_file, verify_file_keyed,
};

/// The hash a first record points back to.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("audit log {path}: {message}")]
    Io { path: String, message: String },
    #[error("audit log {path} is closed")]
    Closed { path: String },
    /// The file disagrees with the head kept in the state database (or its
    /// last line is not a record): refuse to chain onto a tampered history.
    #[error(
        "audit log {path}: {message}; run `keyturn audit verify` to find the first bad record (to go on with a new log that records the break: `keyturn audit archive --broken`, see the runbook KeyturnAuditChainBroken)"
    )]
    Tampered { path: String, message: String },
    /// The inverse of [`Tampered`](Self::Tampered): the state database has
    /// no audit head (it was deleted, lost, or replaced by an empty one)
    /// while the log has records. Starting would number every credential's
    /// versions from 1 again while the vaults and the log go on.
    #[error(
        "the state database {state_db} is missing or new (it records no audit head) but the audit log {path} already holds records ({last}): the state database was lost or replaced, and starting on it would number versions from 1 again while the vaults and the audit log go on. Restore {state_db} from a backup and start again; or, to really start over with new version numbers, move the old audit log away first (`mv {path} {path}.old`), then start"
    )]
    StateLost {
        path: String,
        state_db: String,
        /// `up to seq N`, or what the last line is instead.
        last: String,
    },
    /// The log is keyed and no key is configured: appending plain records
    /// after keyed ones would be a downgrade `audit verify` refuses.
    #[error(
        "audit log {path} is keyed (hmac-sha256; record seq {seq}) but no audit key is configured; {}",
        KEY_HINT
    )]
    NoKey { path: String, seq: u64 },
}

/// How to give the audit key, for the errors that need it.
pub const KEY_HINT: &str = "give the key with `audit_key_file` in [daemon] or the systemd credential `keyturn-audit-key` (LoadCredentialEncrypted=keyturn-audit-key:...)";

/// How a record's `prev` links it to the line before; absent from a record
/// (`None`) means plain SHA-256.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Chain {
    /// HMAC-SHA256 under the audit key.
    #[serde(rename = "hmac-sha256")]
    HmacSha256,
}

/// Who did it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "type")]
pub enum Actor {
    /// The daemon itself (scheduler, resume, retries).
    Daemon,
    /// A control-socket client, identified by SO_PEERCRED.
    Peer { uid: u32, gid: u32, pid: i32 },
    /// The process that sent the daemon `signal` (`SIGHUP`: reload), as
    /// the kernel reports it (`siginfo`).
    Signal { signal: String, uid: u32, pid: i32 },
}

impl std::fmt::Display for Actor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Actor::Daemon => f.write_str("daemon"),
            Actor::Peer { uid, gid, pid } => write!(f, "uid={uid} gid={gid} pid={pid}"),
            Actor::Signal { signal, uid, pid } => write!(f, "{signal} from uid={uid} pid={pid}"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Ok,
    Failed,
    Refused,
}

/// What the caller describes; the log adds seq, time and the chain hash.
/// Never put a secret value in any field.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEvent {
    /// e.g. `rotation.create`, `rotation.deliver`, `admin.rotate`, `daemon.start`.
    pub event: String,
    pub actor: Actor,
    pub outcome: Outcome,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub agent: Option<AgentId>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub credential: Option<CredentialId>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub tenant: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub owner: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub rotation: Option<RotationId>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub version: Option<VersionNo>,
    /// Free-form, non-secret detail (sink description, trigger, ...).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub detail: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub error: Option<String>,
}

impl AuditEvent {
    pub fn new(event: impl Into<String>, actor: Actor, outcome: Outcome) -> Self {
        Self {
            event: event.into(),
            actor,
            outcome,
            agent: None,
            credential: None,
            tenant: None,
            owner: None,
            rotation: None,
            version: None,
            detail: None,
            error: None,
        }
    }
}

/// One line of the log as written.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditRecord {
    pub seq: u64,
    /// RFC 3339, UTC.
    pub ts: String,
    /// SHA-256 (hex) of the previous line's bytes, or HMAC-SHA256 under the
    /// audit key when `chain` says so, or [`GENESIS`].
    pub prev: String,
    /// `"hmac-sha256"` for a keyed record; absent for a plain SHA-256 link.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub chain: Option<Chain>,
    #[serde(flatten)]
    pub event: AuditEvent,
}
