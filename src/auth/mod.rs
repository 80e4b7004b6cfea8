//! Agents authenticating to keyturn as themselves, with their own rotated
//! Ed25519 key: an RFC 7523 JWT bearer assertion.
//!
//! An agent in a container has no meaningful uid for `SO_PEERCRED`, so it
//! proves who it is by signing a short-lived JWT with the private key of
//! its `auth_key` credential (the ed25519 keypair keyturn rotates and
//! delivers to it). keyturn checks it against the public keys of that
//! credential's current and previous versions only (never a pending or a
//! retired one), so rotating the key rotates the agent's identity too.
//!
//! - [`assertion`]: the verifier (and the signer the CLI uses). It takes
//!   the expected audience and the accepted keys as parameters and records
//!   each `jti` in a [`JtiLedger`] so that an assertion is used once; the
//!   token service of issue 16 reuses it as is.
//!
//! Nothing here logs or returns the token itself: errors say which check
//! failed and what to do.

pub mod assertion;

pub use assertion::{
    AgentKey, AssertionError, DEFAULT_AUDIENCE, JtiLedger, MAX_LIFETIME_SECS, MAX_TOKEN_BYTES,
    SKEW_SECS, Verified, Verifier, sign,
};

#[cfg(test)]
mod tests;
