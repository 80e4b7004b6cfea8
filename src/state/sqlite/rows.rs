//! Rows between SQLite and the state's row types: the column lists the
//! SELECTs share with their decoders, decoding a row (a row holding junk is
//! `Decode::Corrupt`, not a panic), and the encodings the writes use
//! (unix milliseconds, keyturn's own JSON records).

use chrono::{DateTime, Utc};
use rusqlite::Row;

use crate::model::{AgentId, CredentialId, CredentialKey, RotationId, Stage, VersionNo};
use crate::state::{
    AckRow, CredentialRow, DecommissionRow, RequestRow, RevocationRow, RotationRow, Step, Trigger,
    VersionRow,
};

// Column lists shared by the SELECTs and their decoders: keep them in step.
pub(super) const CREDENTIAL_COLS: &str = "agent, credential, current_version, last_rotated_at, next_due, \
     consecutive_failures, last_error, failing_since";
pub(super) const ROTATION_COLS: &str = "id, agent, credential, step, \"trigger\", version, vault_version, \
     previous_version, previous_vault_version, started_at, updated_at, retire_at, attempts, \
     last_error, footprint, start_record_after";
pub(super) const ACK_COLS: &str = "agent, credential, version, consumer, acked_at";
pub(super) const VERSION_COLS: &str =
    "agent, credential, version, rotation, stage, vault_version, created_at, public";

pub(super) fn to_json<T: serde::Serialize>(t: &T) -> String {
    serde_json::to_string(t).expect("a state record serialises")
}

fn from_json<T: serde::de::DeserializeOwned>(table: &str, text: &str) -> DecodeResult<T> {
    serde_json::from_str(text)
        .map_err(|e| Decode::Corrupt(format!("{table}: unreadable record: {e}")))
}

pub(super) fn decode_decommission(row: &Row<'_>) -> DecodeResult<DecommissionRow> {
    from_json("decommissions", &row.get::<_, String>(0)?)
}

pub(super) fn decode_revocation(row: &Row<'_>) -> DecodeResult<RevocationRow> {
    from_json("revocations", &row.get::<_, String>(0)?)
}

pub(super) fn decode_holding(row: &Row<'_>) -> DecodeResult<(CredentialKey, String)> {
    Ok((key_at(row, "holdings", 0)?, row.get(2)?))
}

pub(super) fn decode_agent(row: &Row<'_>) -> DecodeResult<AgentId> {
    let a: String = row.get(0)?;
    AgentId::new(a.clone()).map_err(|e| Decode::Corrupt(format!("agent id {a:?}: {e}")))
}

pub(super) fn to_millis(t: DateTime<Utc>) -> i64 {
    t.timestamp_millis()
}

/// Why a row could not be decoded: SQLite failed, or the row holds junk.
pub(super) enum Decode {
    Sql(rusqlite::Error),
    Corrupt(String),
}

impl From<rusqlite::Error> for Decode {
    fn from(e: rusqlite::Error) -> Self {
        use rusqlite::Error as E;
        match e {
            // A column of the wrong type or range is bad data, not a DB failure.
            E::InvalidColumnType(..)
            | E::FromSqlConversionFailure(..)
            | E::IntegralValueOutOfRange(..)
            | E::Utf8Error(..) => Decode::Corrupt(e.to_string()),
            other => Decode::Sql(other),
        }
    }
}

pub(super) type DecodeResult<T> = std::result::Result<T, Decode>;

fn corrupt(table: &str, column: &str, what: impl std::fmt::Display) -> Decode {
    Decode::Corrupt(format!("{table}.{column}: {what}"))
}

fn key_at(row: &Row<'_>, table: &str, agent_idx: usize) -> DecodeResult<CredentialKey> {
    let agent: String = row.get(agent_idx)?;
    let credential: String = row.get(agent_idx + 1)?;
    let agent =
        AgentId::new(&agent).map_err(|e| corrupt(table, "agent", format!("{agent:?} {e}")))?;
    let credential = CredentialId::new(&credential)
        .map_err(|e| corrupt(table, "credential", format!("{credential:?} {e}")))?;
    Ok(CredentialKey::new(agent, credential))
}

fn ts(table: &str, column: &str, millis: i64) -> DecodeResult<DateTime<Utc>> {
    DateTime::from_timestamp_millis(millis)
        .ok_or_else(|| corrupt(table, column, format!("timestamp {millis} out of range")))
}

fn opt_ts(table: &str, column: &str, millis: Option<i64>) -> DecodeResult<Option<DateTime<Utc>>> {
    millis.map(|m| ts(table, column, m)).transpose()
}

fn ver(table: &str, column: &str, v: i64) -> DecodeResult<VersionNo> {
    VersionNo::try_from(v).map_err(|_| corrupt(table, column, format!("negative version {v}")))
}

fn count(table: &str, column: &str, v: i64) -> DecodeResult<u32> {
    u32::try_from(v).map_err(|_| corrupt(table, column, format!("count {v} out of range")))
}

fn rotation_id(table: &str, column: &str, s: &str) -> DecodeResult<RotationId> {
    RotationId::parse(s).ok_or_else(|| corrupt(table, column, format!("bad rotation id {s:?}")))
}

/// A row of `version_floors` (agent, credential, version).
pub(super) fn decode_floor(row: &Row<'_>) -> DecodeResult<(CredentialKey, VersionNo)> {
    const T: &str = "version_floors";
    Ok((key_at(row, T, 0)?, ver(T, "version", row.get(2)?)?))
}

pub(super) fn decode_credential(row: &Row<'_>) -> DecodeResult<CredentialRow> {
    const T: &str = "credentials";
    Ok(CredentialRow {
        key: key_at(row, T, 0)?,
        current_version: row
            .get::<_, Option<i64>>(2)?
            .map(|v| ver(T, "current_version", v))
            .transpose()?,
        last_rotated_at: opt_ts(T, "last_rotated_at", row.get(3)?)?,
        next_due: opt_ts(T, "next_due", row.get(4)?)?,
        consecutive_failures: count(T, "consecutive_failures", row.get(5)?)?,
        last_error: row.get(6)?,
        failing_since: opt_ts(T, "failing_since", row.get(7)?)?,
    })
}

pub(super) fn decode_ack(row: &Row<'_>) -> DecodeResult<AckRow> {
    const T: &str = "acks";
    Ok(AckRow {
        key: key_at(row, T, 0)?,
        version: ver(T, "version", row.get(2)?)?,
        consumer: row.get(3)?,
        acked_at: opt_ts(T, "acked_at", row.get(4)?)?,
    })
}

pub(super) fn decode_request(row: &Row<'_>) -> DecodeResult<RequestRow> {
    const T: &str = "rotate_requests";
    Ok(RequestRow {
        key: key_at(row, T, 0)?,
        requested_at: ts(T, "requested_at", row.get(2)?)?,
    })
}

pub(super) fn decode_rotation(row: &Row<'_>) -> DecodeResult<RotationRow> {
    const T: &str = "rotations";
    let id: String = row.get(0)?;
    let step: String = row.get(3)?;
    let trigger: String = row.get(4)?;
    Ok(RotationRow {
        id: rotation_id(T, "id", &id)?,
        key: key_at(row, T, 1)?,
        step: Step::parse(&step)
            .ok_or_else(|| corrupt(T, "step", format!("unknown step {step:?}")))?,
        trigger: Trigger::parse(&trigger)
            .ok_or_else(|| corrupt(T, "trigger", format!("unknown trigger {trigger:?}")))?,
        version: ver(T, "version", row.get(5)?)?,
        vault_version: row.get(6)?,
        previous_version: row
            .get::<_, Option<i64>>(7)?
            .map(|v| ver(T, "previous_version", v))
            .transpose()?,
        previous_vault_version: row.get(8)?,
        started_at: ts(T, "started_at", row.get(9)?)?,
        updated_at: ts(T, "updated_at", row.get(10)?)?,
        retire_at: opt_ts(T, "retire_at", row.get(11)?)?,
        attempts: count(T, "attempts", row.get(12)?)?,
        last_error: row.get(13)?,
        footprint: row.get(14)?,
        start_record_after: row
            .get::<_, Option<i64>>(15)?
            .map(|s| {
                u64::try_from(s)
                    .map_err(|_| corrupt(T, "start_record_after", format!("negative seq {s}")))
            })
            .transpose()?,
    })
}

pub(super) fn decode_version(row: &Row<'_>) -> DecodeResult<VersionRow> {
    const T: &str = "versions";
    let rotation: String = row.get(3)?;
    let stage: String = row.get(4)?;
    Ok(VersionRow {
        key: key_at(row, T, 0)?,
        version: ver(T, "version", row.get(2)?)?,
        rotation: rotation_id(T, "rotation", &rotation)?,
        stage: Stage::parse(&stage)
            .ok_or_else(|| corrupt(T, "stage", format!("unknown stage {stage:?}")))?,
        vault_version: row.get(5)?,
        created_at: ts(T, "created_at", row.get(6)?)?,
        public: row.get(7)?,
    })
}
