//! The nouns every module shares: identifiers, stages, and the one type a secret
//! value may live in.
//!
//! Identifiers are validated newtypes so that a path built from them (a vault
//! path, a delivery directory, a state key) can never contain `/`, `..` or
//! spaces. `SecretValue` zeroizes its bytes on drop and prints as `[redacted]`,
//! so a secret that reaches a `{:?}` or a log field by mistake leaks nothing.

use std::fmt;

use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

/// Longest identifier accepted; keeps file names and metric labels sane.
pub const MAX_ID_LEN: usize = 64;

/// Why a string is not a valid identifier (agent, credential, vault, tier, ...).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("must not be empty")]
    Empty,
    #[error("is longer than {MAX_ID_LEN} characters")]
    TooLong,
    #[error(
        "must start with a lowercase letter or digit and contain only [a-z0-9_-] (no '/', '..', spaces or capitals)"
    )]
    BadChars,
}

/// Checks the identifier grammar `[a-z0-9][a-z0-9_-]*`, at most 64 characters.
pub fn validate_id(s: &str) -> Result<(), IdError> {
    let bytes = s.as_bytes();
    let Some(first) = bytes.first() else {
        return Err(IdError::Empty);
    };
    if bytes.len() > MAX_ID_LEN {
        return Err(IdError::TooLong);
    }
    let ok_first = first.is_ascii_lowercase() || first.is_ascii_digit();
    let ok_rest = bytes
        .iter()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'_' || *b == b'-');
    if ok_first && ok_rest {
        Ok(())
    } else {
        Err(IdError::BadChars)
    }
}

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        ///
        /// Held as an `Arc<str>`: a key is copied into many indexes (config,
        /// catalog, live status, timers), and at 100k credentials a clone that
        /// only bumps a counter keeps memory per credential small.
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(std::sync::Arc<str>);

        impl $name {
            pub fn new(s: impl AsRef<str>) -> Result<Self, IdError> {
                let s = s.as_ref();
                validate_id(s)?;
                // One allocation, the `Arc`'s (not a `String` first).
                Ok(Self(s.into()))
            }
            pub fn as_str(&self) -> &str {
                &self.0
            }
            /// A copy in an allocation of its own, not shared with `self`.
            pub fn unshared(&self) -> Self {
                Self(std::sync::Arc::from(&*self.0))
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.0)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                $name::new(s).map_err(serde::de::Error::custom)
            }
        }

        impl std::str::FromStr for $name {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, IdError> {
                $name::new(s)
            }
        }
    };
}

id_type!(
    /// A dedicated non-human identity.
    AgentId
);
id_type!(
    /// One credential of an agent; unique within that agent.
    CredentialId
);

/// `agent/credential`: the key of a credential everywhere (state, metrics, audit).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct CredentialKey {
    pub agent: AgentId,
    pub credential: CredentialId,
}

impl CredentialKey {
    pub fn new(agent: AgentId, credential: CredentialId) -> Self {
        Self { agent, credential }
    }
}

impl fmt::Display for CredentialKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.agent, self.credential)
    }
}

/// Identifies one rotation; it is the idempotency key of every step (the AWS
/// `ClientRequestToken`, the local vault's version tag, ...). 32 lowercase hex chars.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct RotationId(String);

impl RotationId {
    pub fn generate() -> Self {
        let bytes: [u8; 16] = rand::random();
        Self(hex::encode(bytes))
    }
    /// Accepts only what `generate` produces, so a rotation id read back from
    /// state or a request can be used in a file name safely.
    pub fn parse(s: &str) -> Option<Self> {
        (s.len() == 32
            && s.bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()))
        .then(|| Self(s.to_owned()))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for RotationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Version numbers count up from 1 per credential.
pub type VersionNo = u64;

/// The life of one version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    Pending,
    Current,
    Previous,
    Retired,
}

impl Stage {
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Pending => "pending",
            Stage::Current => "current",
            Stage::Previous => "previous",
            Stage::Retired => "retired",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "pending" => Stage::Pending,
            "current" => Stage::Current,
            "previous" => Stage::Previous,
            "retired" => Stage::Retired,
            _ => return None,
        })
    }
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What kind of value a generator makes; sinks use it to pick a layout
/// (a keypair is delivered as a bundle of files).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ValueKind {
    Password,
    RandomBytes,
    ApiKey,
    Ed25519,
}

impl ValueKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ValueKind::Password => "password",
            ValueKind::RandomBytes => "random_bytes",
            ValueKind::ApiKey => "api_key",
            ValueKind::Ed25519 => "ed25519",
        }
    }
}

/// The only home of a secret value. The bytes are zeroized when dropped and
/// never printed: `Debug` and `Display` show `[redacted]`. There is
/// deliberately no `Serialize`, so a secret cannot slip into JSON by accident;
/// code that must write it (a sink, a vault) calls `expose()`.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretValue(Zeroizing<Vec<u8>>);

impl SecretValue {
    pub fn new(bytes: Vec<u8>) -> Self {
        Self(Zeroizing::new(bytes))
    }
    pub fn from_string(s: String) -> Self {
        Self::new(s.into_bytes())
    }
    pub fn expose(&self) -> &[u8] {
        &self.0
    }
    /// The value as UTF-8 text, if it is text (every generator makes text).
    pub fn expose_str(&self) -> Option<&str> {
        std::str::from_utf8(&self.0).ok()
    }
    pub fn len(&self) -> usize {
        self.0.len()
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for SecretValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretValue([redacted])")
    }
}

impl fmt::Display for SecretValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

/// The kind every plug-in error carries; the rotation engine branches on it
/// (retry with backoff, slow down, give up) so plug-ins never retry themselves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// Might work if tried again (I/O hiccup, connection refused, 5xx).
    Transient,
    /// The other side asked us to slow down (429, throttling).
    Throttled,
    /// Someone else changed the thing (cas mismatch, version moved).
    Conflict,
    NotFound,
    Unauthorized,
    /// Our request was wrong; retrying will not help until config changes.
    Invalid,
    /// Broken beyond retry (corrupt data, wrong key).
    Fatal,
}

impl ErrorKind {
    /// The kind of a failure to connect, from its error chain: a TLS
    /// certificate the client does not trust will not start working by
    /// retrying (`Invalid`: fix `ca_file` or the server's certificate);
    /// anything else (refused, reset, timeout, DNS) may (`Transient`).
    pub fn of_connection(chain: &str) -> ErrorKind {
        if chain.contains("certificate") || chain.contains("UnknownIssuer") {
            ErrorKind::Invalid
        } else {
            ErrorKind::Transient
        }
    }

    pub fn is_retryable(self) -> bool {
        matches!(
            self,
            ErrorKind::Transient | ErrorKind::Throttled | ErrorKind::Conflict
        )
    }
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Transient => "transient",
            ErrorKind::Throttled => "throttled",
            ErrorKind::Conflict => "conflict",
            ErrorKind::NotFound => "not_found",
            ErrorKind::Unauthorized => "unauthorized",
            ErrorKind::Invalid => "invalid",
            ErrorKind::Fatal => "fatal",
        }
    }
    /// A reasonable kind for an I/O error.
    pub fn from_io(e: &std::io::Error) -> Self {
        use std::io::ErrorKind as K;
        match e.kind() {
            K::NotFound => ErrorKind::NotFound,
            K::PermissionDenied => ErrorKind::Unauthorized,
            K::InvalidInput | K::InvalidData => ErrorKind::Invalid,
            _ => ErrorKind::Transient,
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The error every plug-in (vault, target, sink, alert sink) returns: a kind
/// for the engine and a message for the operator. The message must never
/// contain a secret value; plug-ins build it from names and error causes only.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct PluginError {
    pub kind: ErrorKind,
    pub message: String,
    /// How long the other side asked us to wait (HTTP `Retry-After`); the
    /// engine waits at least this long before the next attempt.
    pub retry_after: Option<std::time::Duration>,
}

impl PluginError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
            retry_after: None,
        }
    }
    pub fn with_retry_after(mut self, after: Option<std::time::Duration>) -> Self {
        self.retry_after = after;
        self
    }
    /// `context: e`, with [`io_hint`]'s advice.
    pub fn io(context: impl fmt::Display, e: &std::io::Error) -> Self {
        Self::new(
            ErrorKind::from_io(e),
            format!("{context}: {e}{}", io_hint(e)),
        )
    }
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }
}

/// What an operator needs beyond an I/O error's text. A file system that
/// is read-only for keyturn and writable from a shell is the service's
/// sandbox: the shipped unit has `ProtectSystem=strict`.
pub fn io_hint(e: &std::io::Error) -> &'static str {
    if e.raw_os_error() == Some(libc::EROFS) {
        " (under keyturn's systemd unit, ProtectSystem=strict leaves only its ReadWritePaths= writable: \
         add this directory with a drop-in, see \"Write outside keyturn's directories\" in docs/operating.md)"
    } else {
        ""
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_follow_the_grammar() {
        for ok in ["a", "invoice-bot", "db_2", "0x"] {
            assert!(AgentId::new(ok).is_ok(), "{ok}");
        }
        assert_eq!(AgentId::new(""), Err(IdError::Empty));
        for bad in ["-a", "_a", "A", "a/b", "..", "a b", "a.b", "é"] {
            assert_eq!(AgentId::new(bad), Err(IdError::BadChars), "{bad}");
        }
        assert_eq!(AgentId::new("a".repeat(65)), Err(IdError::TooLong));
    }

    /// A read-only file system gets the sandbox advice; other errors none.
    #[test]
    fn a_read_only_file_system_points_at_the_units_write_paths() {
        let rofs = std::io::Error::from_raw_os_error(libc::EROFS);
        let e = PluginError::io("file sink /srv/a/x: create delivery root /srv/a", &rofs);
        assert!(
            e.message.starts_with(
                "file sink /srv/a/x: create delivery root /srv/a: Read-only file system"
            ) && e.message.contains("ReadWritePaths=")
                && e.message.contains("docs/operating.md"),
            "{}",
            e.message
        );
        let denied = std::io::Error::from_raw_os_error(libc::EACCES);
        assert!(
            !PluginError::io("x", &denied)
                .message
                .contains("ReadWritePaths")
        );
    }

    #[test]
    fn secret_value_never_prints() {
        let v = SecretValue::from_string("canary-5f2a".into());
        assert_eq!(format!("{v}"), "[redacted]");
        assert!(!format!("{v:?}").contains("canary"));
        assert_eq!(v.expose(), b"canary-5f2a");
    }

    #[test]
    fn rotation_ids_round_trip_and_reject_junk() {
        let id = RotationId::generate();
        assert_eq!(RotationId::parse(id.as_str()), Some(id));
        assert!(RotationId::parse("../../etc/passwd").is_none());
        assert!(RotationId::parse(&"A".repeat(32)).is_none());
    }
}
