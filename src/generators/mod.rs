//! Generators make new secret values from the OS CSPRNG.
//!
//! - `password`: chosen character classes, at least one character of each.
//! - `random_bytes`: N random bytes, hex or base64url (no padding).
//! - `api_key`: a prefix plus N base62 characters.
//! - `ed25519`: a keypair; the private key (PKCS#8 PEM) is the secret value,
//!   the public key (SPKI PEM) is recorded in state and delivered beside it.

use crate::config::GeneratorConfig;
use crate::model::{ErrorKind, SecretValue, ValueKind};

mod generate;

pub use generate::generate;

/// A freshly generated value.
#[derive(Debug)]
pub struct Generated {
    pub value: SecretValue,
    pub kind: ValueKind,
    /// Public half of a keypair (not secret).
    pub public: Option<String>,
}

/// Why a value could not be generated. Messages name parameters, never values.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GenerateError {
    /// The parameters cannot make a value (zero length, no character class,
    /// fewer characters than required classes, absurd sizes).
    #[error("invalid generator parameters: {0}")]
    Invalid(String),
    /// A key could not be encoded (should not happen with valid keys).
    #[error("could not encode the generated key: {0}")]
    Encode(String),
}

impl GenerateError {
    /// The kind the rotation engine branches on: bad parameters will not get
    /// better with retries; an encoding failure is a bug, so fatal.
    pub fn kind(&self) -> ErrorKind {
        match self {
            GenerateError::Invalid(_) => ErrorKind::Invalid,
            GenerateError::Encode(_) => ErrorKind::Fatal,
        }
    }
}

/// The kind of value a generator config makes.
pub fn kind_of(cfg: &GeneratorConfig) -> ValueKind {
    match cfg {
        GeneratorConfig::Password { .. } => ValueKind::Password,
        GeneratorConfig::RandomBytes { .. } => ValueKind::RandomBytes,
        GeneratorConfig::ApiKey { .. } => ValueKind::ApiKey,
        GeneratorConfig::Ed25519 => ValueKind::Ed25519,
    }
}

/// The public half of a stored value, derived from the value itself (so that
/// after a crash-and-replay it always matches what the vault holds).
pub fn public_part(kind: ValueKind, value: &SecretValue) -> Option<String> {
    use ed25519_dalek::SigningKey;
    use ed25519_dalek::pkcs8::DecodePrivateKey;
    use ed25519_dalek::pkcs8::EncodePublicKey;
    use ed25519_dalek::pkcs8::spki::der::pem::LineEnding;
    match kind {
        ValueKind::Ed25519 => {
            let pem = value.expose_str()?;
            let key = SigningKey::from_pkcs8_pem(pem).ok()?;
            key.verifying_key().to_public_key_pem(LineEnding::LF).ok()
        }
        _ => None,
    }
}
