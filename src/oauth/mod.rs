//! The token service (issue 16): RFC 8693 token exchange, so an agent acting
//! for a named human gets an access token scoped to the intersection of the
//! human's and the agent's permissions, recording both (`sub` = the human,
//! `act` = the agent).
//!
//! What it will be: `POST /oauth/token` on the HTTP listener taking the
//! human's *subject token* (a JWT access token from a configured identity
//! provider) and the agent's authentication (RFC 7523, `crate::auth` once
//! it lands), and issuing an RFC 9068 `at+jwt` signed with a rotated keyturn
//! key, with JWKS, metadata, introspection and revocation endpoints.
//!
//! What exists now: the first half of that, validating subject tokens.
//! - [`config`]      `[token_service.subject_issuers.NAME]`: issuer, audience,
//!   pinned algorithms, JWKS file or URL, refresh, skew, `typ`, tenant
//! - [`jwks`]        an issuer's key set: by `kid`, refreshed on a schedule and
//!   (rate-limited) on an unknown `kid`, the old set kept when a load fails
//! - [`subject`]     `validate(token) -> Subject`: every check, each refusal a
//!   [`subject::SubjectError`] with its OAuth error code
//! - [`strict_json`] JSON that refuses duplicate members (headers, claims, key sets)
//! - [`request`]     the form body of `POST /oauth/token` parsed (not yet served)
//! - [`exchange`]    the exchange as a pure function: validated subject, agent,
//!   request and client policy in; a signed `at+jwt` or the OAuth error out
//!
//! The config is parsed and checked by `keyturn check` and at start; the
//! daemon does not build [`subject::SubjectTokens`] yet, as nothing serves
//! the token endpoint.

pub mod config;
pub mod exchange;
pub mod jwks;
pub mod request;
pub mod service;
pub mod strict_json;
pub mod subject;

#[cfg(test)]
mod exchange_tests;
#[cfg(test)]
mod service_tests;
#[cfg(test)]
mod tests;

pub use subject::{Subject, SubjectError, SubjectIssuer, SubjectTokens};
