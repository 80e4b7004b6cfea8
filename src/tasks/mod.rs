//! Task-scoped credentials (issue 15): a credential minted for one task of
//! one agent, at the system that enforces it, narrowed by the task's
//! sensitivity, carrying the task's attribution chain, and revoked when the
//! task ends or its TTL passes, whichever comes first.
//!
//! The pieces, each in its own module as it lands:
//! - [`issuers`]: the plug-ins that mint and revoke a task's credential at
//!   one system (`postgres`: a role per task; `aws_sts`: `AssumeRole` with a
//!   session policy; `vault_token`: an OpenBao/Vault token). Each owns its
//!   config (`[issuers.NAME]`), the shape of its grant in a policy, and its
//!   behaviour, like vaults and targets do.
//! - policies (`[policies.NAME]`): per agent and use case, by sensitivity,
//!   the grants a task may receive at each issuer, the maximum TTL, and the
//!   tenants the agent may serve.
//! - the task manager: start, end, list; persisted before anything is
//!   issued, so that a crash never leaves a credential keyturn does not know
//!   of; TTL timers resumed after a restart; every issuance and revocation
//!   audited with the whole attribution chain, never the credential.
//! - agent authentication: the control socket peer's uid maps to the agent
//!   with that `uid`; an agent in a container signs a request with its own
//!   rotated Ed25519 key (an RFC 7523 JWT assertion).

pub mod issuers;
pub mod manager;
pub mod policy;
pub mod store;
