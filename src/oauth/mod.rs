//! The token service (issue 16): RFC 8693 token exchange, so an agent acting
//! for a named human gets an access token scoped to the intersection of the
//! human's and the agent's permissions, recording both (`sub` = the human,
//! `act` = the agent).
//!
//! Served on the HTTP listener ([`service`], routed by `crate::api::http`):
//! `POST /oauth/token` takes the human's *subject token* (a JWT access token
//! from a configured identity provider) and the agent's `private_key_jwt`
//! assertions (`crate::auth`), and issues an RFC 9068 `at+jwt` signed with
//! a rotated keyturn key; JWKS, RFC 8414 metadata, introspection (RFC 7662)
//! and revocation (RFC 7009) beside it. The daemon's sockets serve the same
//! exchange (`token_exchange`) for an agent authenticated by the peer's uid
//! ([`service::TokenService::token_for_agent`]).
//!
//! - [`config`]      `[token_service]` and `[token_service.subject_issuers.NAME]`:
//!   issuer, audience, pinned algorithms, JWKS file or URL, refresh, skew,
//!   `typ`, tenant; the signing credential and the clients
//! - [`jwks`]        an issuer's key set: by `kid`, refreshed on a schedule and
//!   (rate-limited) on an unknown `kid`, the old set kept when a load fails
//! - [`subject`]     `validate(token) -> Subject`: every check, each refusal a
//!   [`subject::SubjectError`] with its OAuth error code
//! - [`strict_json`] JSON that refuses duplicate members (headers, claims, key sets)
//! - [`request`]     the form body of `POST /oauth/token` parsed
//! - [`exchange`]    the exchange as a pure function: validated subject, agent,
//!   request and client policy in; a signed `at+jwt` or the OAuth error out
//! - [`service`]     the endpoints: client and actor authentication, single-use
//!   `jti`s, the signing key from its vault, published keys, introspection,
//!   revocation, the audit; the daemon's part behind [`service::Backend`]
//!
//! The daemon builds it at start when `[token_service]` is configured and
//! `[daemon] listen` is set (changes take effect at a restart).

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
