//! The SCRAM-SHA-256 verifier keyturn sets as a role's password (RFC 5802,
//! RFC 7677; PostgreSQL's `SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`),
//! exactly as libpq's `PQencryptPasswordConn` and postgres-protocol's
//! `password::scram_sha_256` make it: SASLprep when the password is valid
//! UTF-8 and allowed by it, else the bytes as they are; a random 16-byte
//! salt; 4096 iterations (PostgreSQL's default `scram_iterations`).
//!
//! Why not postgres-protocol's function: its PBKDF2 keys a new HMAC in every
//! one of the 4096 rounds, twice the SHA-256 work of RustCrypto's `pbkdf2`,
//! which keys it once; the profile of `bench/pg_peer.py` put that hashing at
//! a third of keyturn's CPU per postgres rotation. Every intermediate key is
//! zeroized.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, KeyInit, Mac};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

/// PostgreSQL's default `scram_iterations`.
pub const ITERATIONS: u32 = 4096;
const SALT_LEN: usize = 16;

/// The verifier of `password` with a fresh random salt.
pub fn verifier(password: &[u8]) -> Zeroizing<String> {
    verifier_with_salt(password, rand::random::<[u8; SALT_LEN]>())
}

fn verifier_with_salt(password: &[u8], salt: [u8; SALT_LEN]) -> Zeroizing<String> {
    let prepared: Zeroizing<Vec<u8>> = Zeroizing::new(
        std::str::from_utf8(password)
            .ok()
            .and_then(|s| stringprep::saslprep(s).ok())
            .map_or_else(|| password.to_vec(), |p| p.into_owned().into_bytes()),
    );
    let mut salted = Zeroizing::new([0u8; 32]);
    pbkdf2::pbkdf2_hmac::<Sha256>(&prepared, &salt, ITERATIONS, salted.as_mut());
    let client_key = Zeroizing::new(hmac(&salted, b"Client Key"));
    let stored_key = Sha256::digest(client_key.as_slice());
    let server_key = hmac(&salted, b"Server Key");
    Zeroizing::new(format!(
        "SCRAM-SHA-256${ITERATIONS}:{}${}:{}",
        STANDARD.encode(salt),
        STANDARD.encode(stored_key),
        STANDARD.encode(server_key)
    ))
}

fn hmac(key: &[u8; 32], message: &[u8]) -> [u8; 32] {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes keys of any length");
    mac.update(message);
    mac.finalize().into_bytes().into()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// postgres-protocol's own test vector (`password::test`), made by its
    /// `scram_sha_256_salt` and checked there against libpq.
    #[test]
    fn the_verifier_matches_postgres_protocols_for_the_same_salt() {
        let salt = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16];
        assert_eq!(
            verifier_with_salt(b"secret", salt).as_str(),
            "SCRAM-SHA-256$4096:AQIDBAUGBwgJCgsMDQ4PEA==$8rrDg00OqaiWXJ7p+sCgHEIaBSHY89ZJl3mfIsf32oY=:05L1f+yZbiN8O0AnO40Og85NNRhvzTS57naKRWCcsIA="
        );
    }

    #[test]
    fn salts_are_fresh_and_saslprep_applies_only_where_it_can() {
        assert_ne!(*verifier(b"same"), *verifier(b"same"));
        let salt = [7; SALT_LEN];
        // U+00A0 (no-break space) maps to a space under SASLprep.
        assert_eq!(
            *verifier_with_salt("a\u{a0}b".as_bytes(), salt),
            *verifier_with_salt(b"a b", salt)
        );
        // Not UTF-8: the bytes as they are.
        assert_ne!(
            *verifier_with_salt(b"a\xffb", salt),
            *verifier_with_salt(b"ab", salt)
        );
    }
}
