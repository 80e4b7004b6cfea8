//! keyturn: a daemon that owns the lifecycle of the credentials autonomous
//! software agents use — scheduled rotation, storage in vaults, delivery to the
//! running agent, revocation — with every step in a tamper-evident audit log.
//!
//! # Layout
//! - [`model`]      identifiers, stages, `SecretValue` (zeroized, redacted), plug-in errors
//! - [`config`]     TOML → raw serde structs → pure validation (all errors, located) → `Config`
//! - [`schedule`]   cron / every / jitter → next due; one timer heap for all credentials
//! - [`generators`] password, random bytes, API key, Ed25519 keypair
//! - [`rotation`]   the persisted rotation state machine and its engine; resume after crash;
//!   follow mode (delivering what another keyturn rotates)
//! - [`targets`]    trait `Target` + `postgres`, `command` (apply and test a new value where it is used)
//! - [`oauth`]      the token service (RFC 8693 token exchange, introspection, revocation, JWKS) on the HTTP listener
//! - [`tasks`]      task-scoped credentials: trait `TaskIssuer` (mint and revoke one task's credential at its system)
//! - [`vaults`]     trait `Vault` + `local` (embedded, encrypted), `hashicorp`, `aws`, `azure`;
//!   `change_index`, the rotator's record of promotes that followers poll
//! - [`sinks`]      trait `Sink` + `file` (atomic write, bundles via `..data`), `signal`, `exec`, `webhook` (signed, address-guarded)
//! - [`audit`]      hash-chained JSON-lines log, group-committed; verify
//! - [`auth`]       agents authenticating as themselves: RFC 7523 Ed25519 JWT assertions, single-use `jti`
//! - [`state`]      trait `StateStore` + SQLite (WAL, migrations); never secret values
//! - `plugin`       the macro behind the vault, target and sink registries
//! - [`group_commit`] one thread serving queued jobs in batches (state, audit, local vault)
//! - [`memory`]     giving freed heap back to the OS after bursts
//! - [`process`]    running a program: own process group, stdin, redacted stderr tail, timeout + killpg
//! - `private_file`  creating the daemon's own files: 0700 directory, 0600 file, no symlinks
//! - [`alerts`]     conditions for the on-call and the alert sinks that carry them
//! - [`revocation`] decommission: the decision, revoking and verifying everything an agent held, SLA clocks, orphans
//! - [`surface`]    `keyturn surface`: every identity, its credentials, totals and flags
//! - [`api`]        control socket (SO_PEERCRED) and HTTP `/metrics` `/healthz` `/readyz`
//! - [`daemon`]     wiring and lifecycle: sd_notify, signals, reload, drain
//! - [`telemetry`]  tracing setup and the metrics registry
//! - [`cli`]        the `keyturn` commands
//! - [`watch`]      `keyturn watch`: run an agent, signal or restart it when its files change
//! - `test_support` helpers the unit tests of several modules share (tests only)

pub mod alerts;
pub mod api;
pub mod audit;
pub mod auth;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod generators;
pub mod group_commit;
pub mod memory;
pub mod model;
pub mod oauth;
mod plugin;
mod private_file;
pub mod process;
pub mod revocation;
pub mod rotation;
pub mod schedule;
pub mod sinks;
pub mod state;
pub mod surface;
pub mod targets;
pub mod tasks;
pub mod telemetry;
#[cfg(test)]
mod test_support;
pub mod vaults;
pub mod watch;
