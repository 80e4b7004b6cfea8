//! The state database's schema: the migrations that build it, and applying
//! them when the store is opened read-write.
//!
//! Migrations are an ordered list of SQL scripts; `PRAGMA user_version` is the
//! number applied so far. Each runs in its own transaction together with the
//! `user_version` bump, so a crash mid-migration leaves the previous version.

use rusqlite::TransactionBehavior;

use super::SqliteStore;
use crate::state::{Result, StateError};

/// Migration `i` moves the schema from `user_version = i` to `i + 1`.
/// Append new migrations; never edit a released one.
pub(super) const MIGRATIONS: &[&str] = &[
    // 1: the initial schema.
    r#"
    CREATE TABLE credentials (
        agent                TEXT    NOT NULL,
        credential           TEXT    NOT NULL,
        current_version      INTEGER,
        last_rotated_at      INTEGER,
        next_due             INTEGER,
        consecutive_failures INTEGER NOT NULL DEFAULT 0,
        last_error           TEXT,
        PRIMARY KEY (agent, credential)
    );

    CREATE TABLE rotations (
        id                     TEXT    NOT NULL PRIMARY KEY,
        agent                  TEXT    NOT NULL,
        credential             TEXT    NOT NULL,
        step                   TEXT    NOT NULL,
        "trigger"              TEXT    NOT NULL,
        version                INTEGER NOT NULL,
        vault_version          TEXT,
        previous_version       INTEGER,
        previous_vault_version TEXT,
        started_at             INTEGER NOT NULL,
        updated_at             INTEGER NOT NULL,
        retire_at              INTEGER,
        attempts               INTEGER NOT NULL DEFAULT 0,
        last_error             TEXT
    );
    CREATE INDEX rotations_by_credential ON rotations (agent, credential, started_at);
    -- Start-up only needs the unfinished few among (eventually) millions.
    CREATE INDEX rotations_unfinished ON rotations (agent, credential) WHERE step != 'done';

    CREATE TABLE versions (
        agent         TEXT    NOT NULL,
        credential    TEXT    NOT NULL,
        version       INTEGER NOT NULL,
        rotation      TEXT    NOT NULL,
        stage         TEXT    NOT NULL,
        vault_version TEXT    NOT NULL,
        created_at    INTEGER NOT NULL,
        public        TEXT,
        PRIMARY KEY (agent, credential, version)
    );

    CREATE TABLE audit_head (
        id   INTEGER NOT NULL PRIMARY KEY CHECK (id = 1),
        seq  INTEGER NOT NULL,
        hash TEXT    NOT NULL
    );
    "#,
    // 2: where a rotation's versions are held (vaults, path, target), so its
    // previous version can be retired after the credential left the config.
    r#"
    ALTER TABLE rotations ADD COLUMN footprint TEXT;
    "#,
    // 3: consumers that must acknowledge the last delivered version, so a
    // restart neither forgets an awaited ack nor retires early.
    r#"
    CREATE TABLE acks (
        agent      TEXT    NOT NULL,
        credential TEXT    NOT NULL,
        version    INTEGER NOT NULL,
        consumer   TEXT    NOT NULL,
        acked_at   INTEGER,
        PRIMARY KEY (agent, credential, consumer)
    );
    "#,
    // 4: when a credential's current run of failures began, the stable
    // start of its "rotation failing" alert. Rows failing before this
    // migration have no first-failure time: they get the migration's time.
    r#"
    ALTER TABLE credentials ADD COLUMN failing_since INTEGER;
    UPDATE credentials SET failing_since = CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER)
        WHERE consecutive_failures > 0;
    "#,
    // 5: decommissions, each item of their revocation, and what every
    // credential holds where (to revoke it after it left the config). The
    // records are keyturn's own JSON (`state::DecommissionRow`, ...).
    r#"
    CREATE TABLE decommissions (
        agent  TEXT NOT NULL PRIMARY KEY,
        record TEXT NOT NULL
    );
    CREATE TABLE revocations (
        agent  TEXT NOT NULL,
        item   TEXT NOT NULL,
        record TEXT NOT NULL,
        PRIMARY KEY (agent, item)
    );
    CREATE TABLE holdings (
        agent      TEXT NOT NULL,
        credential TEXT NOT NULL,
        footprint  TEXT NOT NULL,
        PRIMARY KEY (agent, credential)
    );
    "#,
    // 6: a rotation's row is written before its `rotation.start` audit
    // record; until the row is written again, the audit seq that record
    // comes after, so a restart can tell whether it was appended.
    r#"
    ALTER TABLE rotations ADD COLUMN start_record_after INTEGER;
    "#,
    // 7: `keyturn rotate` requests waiting for the current version's acks,
    // so a restart does not drop them.
    r#"
    CREATE TABLE rotate_requests (
        agent        TEXT    NOT NULL,
        credential   TEXT    NOT NULL,
        requested_at INTEGER NOT NULL,
        PRIMARY KEY (agent, credential)
    );
    "#,
    // 8: each consumer's last acknowledgement of any version. The `acks`
    // rows are replaced by every delivery, which forgot that a consumer had
    // acked the version before (`keyturn surface` then called an agent
    // that acks every version unused until it acked the new one). Seeded
    // from the acks recorded so far.
    r#"
    CREATE TABLE last_acks (
        agent      TEXT    NOT NULL,
        credential TEXT    NOT NULL,
        consumer   TEXT    NOT NULL,
        version    INTEGER NOT NULL,
        acked_at   INTEGER NOT NULL,
        PRIMARY KEY (agent, credential, consumer)
    );
    INSERT INTO last_acks (agent, credential, consumer, version, acked_at)
        SELECT agent, credential, consumer, version, acked_at FROM acks
        WHERE acked_at IS NOT NULL;
    "#,
    // 9: the highest version of each credential the audit log names beyond
    // what a state database restored from a backup (or cut short) knew:
    // new versions are numbered after it, never again.
    r#"
    CREATE TABLE version_floors (
        agent      TEXT    NOT NULL,
        credential TEXT    NOT NULL,
        version    INTEGER NOT NULL,
        PRIMARY KEY (agent, credential)
    );
    "#,
];

/// The schema version this build writes and understands.
pub const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

impl SqliteStore {
    pub(super) fn user_version(&self) -> Result<i64> {
        self.lock()
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(|e| self.err(e))
    }

    pub(super) fn migrate(&self) -> Result<()> {
        let mut conn = self.lock();
        loop {
            // Read the version inside the write transaction, so two processes
            // opening the same new database cannot both apply a migration.
            let tx = conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(|e| self.err(e))?;
            let found: i64 = tx
                .query_row("PRAGMA user_version", [], |r| r.get(0))
                .map_err(|e| self.err(e))?;
            if found > SCHEMA_VERSION {
                return Err(self.too_new(found));
            }
            if found == SCHEMA_VERSION {
                return Ok(());
            }
            let Ok(index) = usize::try_from(found) else {
                return Err(StateError::Corrupt {
                    path: self.path.clone(),
                    message: format!("negative schema version {found}"),
                });
            };
            tx.execute_batch(MIGRATIONS[index]).map_err(|e| {
                let mut err = self.err(e);
                if let StateError::Db { message, .. } = &mut err {
                    *message = format!("migration {} failed: {message}", index + 1);
                }
                err
            })?;
            // PRAGMA does not take bound parameters; the value is our own integer.
            tx.execute_batch(&format!("PRAGMA user_version = {}", index + 1))
                .map_err(|e| self.err(e))?;
            tx.commit().map_err(|e| self.err(e))?;
            tracing::info!(path = %self.path, schema_version = index + 1, "state database migrated");
        }
    }
}
