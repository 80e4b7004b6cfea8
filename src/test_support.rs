//! Helpers the unit tests of several modules share (compiled for tests only).

use chrono::{DateTime, Utc};

use crate::model::{AgentId, CredentialId, CredentialKey, SecretValue};
use crate::state::CredentialRow;

/// The key of `agent`'s credential `credential` (both valid ids).
pub(crate) fn key(agent: &str, credential: &str) -> CredentialKey {
    CredentialKey::new(
        AgentId::new(agent).unwrap(),
        CredentialId::new(credential).unwrap(),
    )
}

/// The `[agents.NAME]` table (owner, tenant, tier) of a test agent, for a
/// config that adds its credentials after it.
pub(crate) fn agent_table(name: &str) -> String {
    format!("[agents.{name}]\nowner = \"alice@example.com\"\ntenant = \"acme\"\ntier = \"high\"\n")
}

/// `ms` milliseconds after a fixed instant (in 2027): a test clock at the
/// precision the engine keeps.
pub(crate) fn at_ms(ms: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(1_800_000_000_000 + ms).unwrap()
}

/// [`at_ms`] in whole seconds.
pub(crate) fn at_secs(s: i64) -> DateTime<Utc> {
    at_ms(s * 1000)
}

pub(crate) fn secret(s: &str) -> SecretValue {
    SecretValue::from_string(s.to_owned())
}

/// A test that needs root fails without it, rather than passing without
/// having checked anything: CI runs the suite as root.
pub(crate) fn assert_root(what_needs_it: &str) {
    assert!(
        nix::unistd::geteuid().is_root(),
        "{what_needs_it} needs root (as CI runs the suite)"
    );
}

/// A credential's state row with every field set (timestamps at the
/// millisecond precision the engine keeps).
pub(crate) fn credential_row(k: &CredentialKey) -> CredentialRow {
    CredentialRow {
        key: k.clone(),
        current_version: Some(3),
        last_rotated_at: Some(at_ms(1_000)),
        next_due: Some(at_ms(21_600_456)),
        consecutive_failures: 2,
        last_error: Some("vault bao: connection refused".into()),
    }
}
