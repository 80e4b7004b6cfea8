//! Makes one new secret value from a [`GeneratorConfig`].
//!
//! Every byte of randomness comes from the OS CSPRNG ([`OsRng`]), and every
//! choice of a character uses `gen_range`, which samples without modulo bias.
//! Buffers that hold secret material are allocated once at their final size
//! (so no reallocation leaves a stale copy behind) and are either zeroized on
//! drop or moved straight into a [`SecretValue`].
//!
//! `OsRng` panics only if the kernel's `getrandom` fails, which on Linux means
//! the machine itself is broken; no untrusted input can reach that path.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ed25519_dalek::SigningKey;
use ed25519_dalek::pkcs8::{EncodePrivateKey, EncodePublicKey, spki::der::pem::LineEnding};
use rand::Rng;
use rand::RngCore;
use rand::rngs::OsRng;
use rand::seq::SliceRandom;
use zeroize::Zeroizing;

use super::{GenerateError, Generated, kind_of};
use crate::config::{ByteEncoding, GeneratorConfig};
use crate::model::SecretValue;

/// Longest value any generator makes (characters or bytes). Far beyond any
/// real credential; it only stops a typo (`length = 3200000`) from allocating
/// megabytes of secret memory on every rotation.
pub const MAX_LENGTH: usize = 4096;

pub const LOWERCASE: &[u8] = b"abcdefghijklmnopqrstuvwxyz";
pub const UPPERCASE: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ";
pub const DIGITS: &[u8] = b"0123456789";
/// Symbols that survive unquoted in a shell word, a URL userinfo (mostly), a
/// DSN and a `.env` file: no quotes, `$`, `\`, `` ` ``, `&`, `;`, `|`, `<>`,
/// `*?[]` (globs), `()` `{}`, `/` or whitespace.
pub const SYMBOLS: &[u8] = b"!#%+,-.:=@^_~";
pub const BASE62: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// Generates a fresh value as `cfg` describes.
pub fn generate(cfg: &GeneratorConfig) -> Result<Generated, GenerateError> {
    let kind = kind_of(cfg);
    let (value, public) = match cfg {
        GeneratorConfig::Password { length, classes } => {
            let classes: Vec<&[u8]> = [
                (classes.lowercase, LOWERCASE),
                (classes.uppercase, UPPERCASE),
                (classes.digits, DIGITS),
                (classes.symbols, SYMBOLS),
            ]
            .into_iter()
            .filter_map(|(on, class)| on.then_some(class))
            .collect();
            (password(*length, &classes)?, None)
        }
        GeneratorConfig::RandomBytes { length, encoding } => {
            (random_bytes(*length, *encoding)?, None)
        }
        GeneratorConfig::ApiKey { prefix, length } => (api_key(prefix, *length)?, None),
        GeneratorConfig::Ed25519 => {
            let (private, public) = ed25519()?;
            (private, Some(public))
        }
    };
    Ok(Generated {
        value,
        kind,
        public,
    })
}

fn check_length(what: &str, length: usize) -> Result<(), GenerateError> {
    if length == 0 {
        return Err(GenerateError::Invalid(format!(
            "{what}: length must be at least 1"
        )));
    }
    if length > MAX_LENGTH {
        return Err(GenerateError::Invalid(format!(
            "{what}: length {length} is above the maximum of {MAX_LENGTH}"
        )));
    }
    Ok(())
}

/// One uniformly chosen byte of `alphabet` (non-empty).
fn pick(alphabet: &[u8]) -> u8 {
    alphabet[OsRng.gen_range(0..alphabet.len())]
}

/// At least one character of every class, the rest drawn uniformly from the
/// union of the classes, then shuffled so the guaranteed characters are not
/// always at the front.
fn password(length: usize, classes: &[&[u8]]) -> Result<SecretValue, GenerateError> {
    check_length("password", length)?;
    if classes.is_empty() {
        return Err(GenerateError::Invalid(
            "password: enable at least one of lowercase, uppercase, digits, symbols".into(),
        ));
    }
    if length < classes.len() {
        return Err(GenerateError::Invalid(format!(
            "password: length {length} is shorter than the {} enabled character classes \
             (each needs at least one character)",
            classes.len()
        )));
    }
    // The classes are disjoint, so their concatenation has no duplicate and
    // a uniform pick from it is uniform over the allowed characters.
    let all: Vec<u8> = classes.concat();
    let mut out = Zeroizing::new(Vec::with_capacity(length));
    for class in classes {
        out.push(pick(class));
    }
    while out.len() < length {
        out.push(pick(&all));
    }
    out.shuffle(&mut OsRng);
    Ok(SecretValue::new(std::mem::take(&mut *out)))
}

fn random_bytes(length: usize, encoding: ByteEncoding) -> Result<SecretValue, GenerateError> {
    check_length("random_bytes", length)?;
    let mut raw = Zeroizing::new(vec![0u8; length]);
    OsRng.fill_bytes(&mut raw);
    let text = match encoding {
        ByteEncoding::Hex => hex::encode(&*raw),
        ByteEncoding::Base64Url => URL_SAFE_NO_PAD.encode(&*raw),
    };
    Ok(SecretValue::from_string(text))
}

fn api_key(prefix: &str, length: usize) -> Result<SecretValue, GenerateError> {
    check_length("api_key", length)?;
    if prefix.len() > MAX_LENGTH {
        return Err(GenerateError::Invalid(format!(
            "api_key: prefix is longer than {MAX_LENGTH} bytes"
        )));
    }
    // A key is pasted into headers, env files and shells: a space or a
    // control character in the prefix would break every one of them.
    if prefix.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(GenerateError::Invalid(
            "api_key: prefix must not contain whitespace or control characters".into(),
        ));
    }
    let mut out = String::with_capacity(prefix.len() + length);
    out.push_str(prefix);
    for _ in 0..length {
        out.push(char::from(pick(BASE62)));
    }
    Ok(SecretValue::from_string(out))
}

/// The private key as PKCS#8 v1 PEM (the secret value) and the public key as
/// SPKI PEM. v1 (RFC 8410 section 7: the seed alone, no public key) is what
/// OpenSSL 3.0 and Python's `cryptography` read; the v2 form (with the public
/// key, RFC 5958) that `SigningKey::to_pkcs8_pem` writes is refused by both,
/// so an agent could not load its own key. `SigningKey` and `KeypairBytes`
/// zeroize themselves on drop and `to_pkcs8_pem` returns a zeroizing string,
/// so the only long-lived copy is the `SecretValue`.
fn ed25519() -> Result<(SecretValue, String), GenerateError> {
    let signing = SigningKey::generate(&mut OsRng);
    let seed_only = ed25519_dalek::pkcs8::KeypairBytes {
        secret_key: signing.to_bytes(),
        public_key: None,
    };
    let private = seed_only
        .to_pkcs8_pem(LineEnding::LF)
        .map_err(|e| GenerateError::Encode(format!("ed25519 private key as PKCS#8: {e}")))?;
    let public = signing
        .verifying_key()
        .to_public_key_pem(LineEnding::LF)
        .map_err(|e| GenerateError::Encode(format!("ed25519 public key as SPKI: {e}")))?;
    Ok((SecretValue::new(private.as_bytes().to_vec()), public))
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use ed25519_dalek::VerifyingKey;
    use ed25519_dalek::pkcs8::{DecodePrivateKey, DecodePublicKey};

    use super::*;
    use crate::config::CharClasses;
    use crate::model::{ErrorKind, ValueKind};

    fn pw(length: usize, l: bool, u: bool, d: bool, s: bool) -> GeneratorConfig {
        GeneratorConfig::Password {
            length,
            classes: CharClasses {
                lowercase: l,
                uppercase: u,
                digits: d,
                symbols: s,
            },
        }
    }

    fn text(g: &Generated) -> String {
        g.value
            .expose_str()
            .expect("generators make text")
            .to_owned()
    }

    #[test]
    fn password_has_length_and_every_enabled_class() {
        // Length 4 with 4 classes forces exactly one of each: the tightest case.
        for length in [4, 5, 16, 64, 200] {
            for _ in 0..50 {
                let g = generate(&pw(length, true, true, true, true)).unwrap();
                assert_eq!(g.kind, ValueKind::Password);
                assert!(g.public.is_none());
                let s = text(&g);
                assert_eq!(s.len(), length);
                let b = s.as_bytes();
                for class in [LOWERCASE, UPPERCASE, DIGITS, SYMBOLS] {
                    assert!(
                        b.iter().any(|c| class.contains(c)),
                        "class missing in a {length}-char password"
                    );
                }
            }
        }
    }

    #[test]
    fn password_respects_disabled_classes() {
        for _ in 0..100 {
            let s = text(&generate(&pw(40, false, true, true, false)).unwrap());
            assert!(
                s.bytes()
                    .all(|c| UPPERCASE.contains(&c) || DIGITS.contains(&c)),
                "{s}"
            );
            assert!(s.bytes().any(|c| UPPERCASE.contains(&c)));
            assert!(s.bytes().any(|c| DIGITS.contains(&c)));
        }
        let s = text(&generate(&pw(300, false, false, false, true)).unwrap());
        assert!(s.bytes().all(|c| SYMBOLS.contains(&c)));
    }

    #[test]
    fn password_guaranteed_chars_are_not_always_in_front() {
        // With 4 classes and length 4, an unshuffled generator would always
        // put the lowercase letter first.
        let firsts: HashSet<bool> = (0..200)
            .map(|_| {
                let s = text(&generate(&pw(4, true, true, true, true)).unwrap());
                LOWERCASE.contains(&s.as_bytes()[0])
            })
            .collect();
        assert_eq!(
            firsts.len(),
            2,
            "the first character is always the same class"
        );
    }

    #[test]
    fn password_uses_the_whole_alphabet() {
        // 200 x 64 chars from 75 symbols: every one appears unless the
        // selection is broken (probability of a miss is ~1e-70).
        let mut seen = HashSet::new();
        for _ in 0..200 {
            seen.extend(text(&generate(&pw(64, true, true, true, true)).unwrap()).into_bytes());
        }
        let alphabet: HashSet<u8> = [LOWERCASE, UPPERCASE, DIGITS, SYMBOLS]
            .concat()
            .into_iter()
            .collect();
        assert_eq!(seen, alphabet);
    }

    #[test]
    fn password_bad_parameters_are_invalid_not_panics() {
        for cfg in [
            pw(0, true, true, true, true),
            pw(3, true, true, true, true),
            pw(16, false, false, false, false),
            pw(MAX_LENGTH + 1, true, false, false, false),
            pw(usize::MAX, true, false, false, false),
        ] {
            let e = generate(&cfg).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Invalid, "{e}");
        }
        assert_eq!(
            text(&generate(&pw(1, false, false, true, false)).unwrap()).len(),
            1
        );
        assert_eq!(
            text(&generate(&pw(MAX_LENGTH, true, true, true, true)).unwrap()).len(),
            MAX_LENGTH
        );
    }

    #[test]
    fn random_bytes_hex_and_base64url() {
        let hex_cfg = GeneratorConfig::RandomBytes {
            length: 32,
            encoding: ByteEncoding::Hex,
        };
        let g = generate(&hex_cfg).unwrap();
        assert_eq!(g.kind, ValueKind::RandomBytes);
        let s = text(&g);
        assert_eq!(s.len(), 64);
        assert_eq!(hex::decode(&s).unwrap().len(), 32);
        assert!(
            s.bytes()
                .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c))
        );

        for length in [1, 2, 3, 32, 33, 100] {
            let s = text(
                &generate(&GeneratorConfig::RandomBytes {
                    length,
                    encoding: ByteEncoding::Base64Url,
                })
                .unwrap(),
            );
            assert!(!s.contains('='), "padding in {s}");
            assert!(
                s.bytes()
                    .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_')
            );
            assert_eq!(URL_SAFE_NO_PAD.decode(&s).unwrap().len(), length);
        }

        for length in [0, MAX_LENGTH + 1] {
            let e = generate(&GeneratorConfig::RandomBytes {
                length,
                encoding: ByteEncoding::Hex,
            })
            .unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Invalid);
        }
    }

    #[test]
    fn api_key_has_prefix_and_base62_tail() {
        let cfg = GeneratorConfig::ApiKey {
            prefix: "kt_live_".into(),
            length: 40,
        };
        let g = generate(&cfg).unwrap();
        assert_eq!(g.kind, ValueKind::ApiKey);
        let s = text(&g);
        let tail = s.strip_prefix("kt_live_").expect("prefix");
        assert_eq!(tail.len(), 40);
        assert!(tail.bytes().all(|c| BASE62.contains(&c)));

        let empty_prefix = text(
            &generate(&GeneratorConfig::ApiKey {
                prefix: String::new(),
                length: 1,
            })
            .unwrap(),
        );
        assert_eq!(empty_prefix.len(), 1);

        for (prefix, length) in [
            ("kt_", 0),
            ("kt ", 10),
            ("kt\n", 10),
            ("kt_", MAX_LENGTH + 1),
        ] {
            let e = generate(&GeneratorConfig::ApiKey {
                prefix: prefix.into(),
                length,
            })
            .unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Invalid, "{prefix:?} {length}");
        }
    }

    #[test]
    fn values_differ_across_calls() {
        let cfgs = [
            pw(20, true, true, true, true),
            GeneratorConfig::RandomBytes {
                length: 16,
                encoding: ByteEncoding::Hex,
            },
            GeneratorConfig::ApiKey {
                prefix: "k_".into(),
                length: 24,
            },
            GeneratorConfig::Ed25519,
        ];
        for cfg in &cfgs {
            let values: HashSet<String> = (0..50).map(|_| text(&generate(cfg).unwrap())).collect();
            assert_eq!(values.len(), 50, "{cfg:?} repeated a value");
        }
    }

    #[test]
    fn ed25519_pem_round_trips_and_public_matches_private() {
        let g = generate(&GeneratorConfig::Ed25519).unwrap();
        assert_eq!(g.kind, ValueKind::Ed25519);
        let private_pem = text(&g);
        assert!(private_pem.starts_with("-----BEGIN PRIVATE KEY-----\n"));
        let public_pem = g.public.expect("a keypair has a public half");
        assert!(public_pem.starts_with("-----BEGIN PUBLIC KEY-----\n"));
        assert!(!public_pem.contains("PRIVATE"));

        // PKCS#8 v1 as RFC 8410 section 7 shows it (what OpenSSL and
        // Python's cryptography read): SEQUENCE { INTEGER 0, { 1.3.101.112 },
        // OCTET STRING { OCTET STRING seed } }, 48 bytes.
        let b64: String = private_pem
            .lines()
            .filter(|l| !l.starts_with("-----"))
            .collect();
        let der = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .unwrap();
        assert_eq!(der.len(), 48, "v1, no public key");
        assert_eq!(
            der[..16],
            [
                0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22,
                0x04, 0x20
            ]
        );

        let signing = SigningKey::from_pkcs8_pem(&private_pem).expect("PKCS#8 parses back");
        let verifying = VerifyingKey::from_public_key_pem(&public_pem).expect("SPKI parses back");
        assert_eq!(signing.verifying_key(), verifying);

        // And the pair actually works together.
        use ed25519_dalek::{Signer, Verifier};
        let sig = signing.sign(b"keyturn");
        verifying.verify(b"keyturn", &sig).unwrap();
    }
}
