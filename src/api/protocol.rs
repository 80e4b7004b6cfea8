//! The control protocol: one JSON request per line, one JSON response per line.
//!
//! # Wire format
//! Requests are internally tagged by `cmd`:
//! ```text
//! {"cmd":"ping"}
//! {"cmd":"status"}
//! {"cmd":"rotate","selector":"all","wait":true}
//! {"cmd":"rotate","selector":{"agent":"invoice-bot"}}                          (wait defaults to false)
//! {"cmd":"rotate","selector":{"credential":{"agent":"invoice-bot","credential":"db"}}}
//! {"cmd":"ack","agent":"invoice-bot","credential":"db","version":7}
//! {"cmd":"decommission","agent":"invoice-bot","reason":"retired","by":"alice@example.com"}
//! {"cmd":"agents"}
//! {"cmd":"surface","unused_after_seconds":2592000}
//! {"cmd":"tasks"}
//! ```
//! Responses carry `ok` and exactly one of `result` / `error`:
//! ```text
//! {"ok":true,"result":{"pong":{"version":"0.1.0"}}}
//! {"ok":true,"result":{"status":[{...StatusRow...}]}}
//! {"ok":true,"result":{"rotate":[{...RotateResult...}]}}
//! {"ok":true,"result":{"ack":{...AckResult...}}}
//! {"ok":false,"error":{"kind":"bad_request","message":"..."}}
//! ```
//! The `ok` flag lets a shell script (`jq .ok`) branch without knowing every
//! result shape; the result is externally tagged so a client can tell which
//! command it answers even when reading a log of responses.
//!
//! Nothing in this protocol ever carries a secret value: status rows and
//! rotation results name versions by number only.

use std::fmt;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::model::{AgentId, CredentialId, CredentialKey};

/// The commands a client may send, in the order they are listed in errors.
pub const COMMANDS: &[&str] = &[
    "ping",
    "status",
    "rotate",
    "ack",
    "decommission",
    "agents",
    "surface",
    "task_start",
    "task_end",
    "task_list",
    "tasks",
    "token_exchange",
];

/// The commands served on the agents' socket.
pub const AGENT_COMMANDS: &[&str] = &[
    "ping",
    "ack",
    "task_start",
    "task_end",
    "task_list",
    "token_exchange",
];

/// One request line. serde ignores fields beside the tag of a unit variant
/// even with `deny_unknown_fields`, so every command is a struct variant
/// (`{"cmd":"ping","verbose":true}` is refused).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Liveness of the daemon; answers with its version.
    Ping {},
    /// One row per configured credential.
    Status {},
    /// Start (or, with `wait`, run to completion) a rotation of the selected
    /// credentials.
    Rotate {
        selector: Selector,
        #[serde(default)]
        wait: bool,
    },
    /// A consumer has version `version` of `agent/credential`: every
    /// consumer awaiting an acknowledgement of it is acknowledged. Allowed
    /// for root, the daemon's uid and the agent's configured `uid`.
    Ack {
        agent: AgentId,
        credential: CredentialId,
        version: u64,
    },
    /// Retire `agent` for good and revoke everything it holds (see
    /// `crate::revocation`). Harmless when already decommissioned.
    Decommission {
        agent: AgentId,
        reason: String,
        /// The human who decided (default: none named).
        #[serde(default)]
        by: Option<String>,
    },
    /// Agents being decommissioned, decommissioned, or orphaned.
    Agents {},
    /// The whole identity surface (`crate::surface`).
    Surface {
        /// Flag agents with no use observed for this long (default 30 days).
        #[serde(default)]
        unused_after_seconds: Option<u64>,
    },
    /// Start a task with task-scoped credentials (`crate::tasks`), for the
    /// agent the caller authenticates as: its uid's agent, or `as_agent`
    /// (root and the socket's group for any agent, audited; an agent's own
    /// uid for itself).
    TaskStart {
        #[serde(default, rename = "as")]
        as_agent: Option<AgentId>,
        /// An RFC 7523 JWT assertion signed with the agent's own key
        /// (`crate::auth`): the caller is its agent, whatever the uid.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        assertion: Option<WireSecret>,
        #[serde(flatten)]
        task: TaskStartArgs,
    },
    /// End one of the caller's tasks now: its credentials are revoked.
    TaskEnd {
        #[serde(default, rename = "as")]
        as_agent: Option<AgentId>,
        /// An RFC 7523 JWT assertion signed with the agent's own key
        /// (`crate::auth`): the caller is its agent, whatever the uid.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        assertion: Option<WireSecret>,
        task: String,
    },
    /// The caller's tasks (live and ending, then the last ended ones).
    TaskList {
        #[serde(default, rename = "as")]
        as_agent: Option<AgentId>,
        /// An RFC 7523 JWT assertion signed with the agent's own key
        /// (`crate::auth`): the caller is its agent, whatever the uid.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        assertion: Option<WireSecret>,
    },
    /// Every agent's tasks not ended (live, and ending: revocation not
    /// verified yet), for `keyturn status`. Control socket only.
    Tasks {},
    /// RFC 8693 token exchange (`crate::oauth`) for the agent the caller
    /// is: its uid's agent, or `as_agent` as for tasks. The answer is the
    /// RFC 8693 body; a refusal is an error whose message starts with the
    /// OAuth error code.
    TokenExchange {
        #[serde(default, rename = "as")]
        as_agent: Option<AgentId>,
        #[serde(flatten)]
        exchange: TokenExchangeArgs,
    },
}

/// The RFC 8693 parameters of `token_exchange` (no client authentication:
/// the peer's uid is). Tokens only as [`WireSecret`]s.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenExchangeArgs {
    pub subject_token: WireSecret,
    pub subject_token_type: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requested_token_type: Option<String>,
    /// Space-delimited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub audience: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub resource: Vec<String>,
    /// One of the agent's live tasks the token is for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task_id: Option<String>,
    /// The agent's own `private_key_jwt` assertion: optional, as the peer
    /// is the actor; if sent, its `exp` caps the token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actor_token: Option<WireSecret>,
}

/// The RFC 8693 2.2.1 answer to `token_exchange`. `Debug` never shows the
/// token ([`WireSecret`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenExchanged {
    pub access_token: WireSecret,
    pub issued_token_type: String,
    pub token_type: String,
    pub expires_in: u64,
    pub scope: String,
}

/// What a task start asks for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskStartArgs {
    pub tenant: String,
    pub use_case: String,
    pub run_id: String,
    pub initiator: String,
    pub sensitivity: String,
    /// Default: the policy's `default_ttl`.
    #[serde(default)]
    pub ttl_seconds: Option<u64>,
}

impl Request {
    /// The command name as it appears on the wire (for logs and audit).
    pub fn cmd(&self) -> &'static str {
        match self {
            Request::Ping {} => "ping",
            Request::Status {} => "status",
            Request::Rotate { .. } => "rotate",
            Request::Ack { .. } => "ack",
            Request::Decommission { .. } => "decommission",
            Request::Agents {} => "agents",
            Request::Surface { .. } => "surface",
            Request::TaskStart { .. } => "task_start",
            Request::TaskEnd { .. } => "task_end",
            Request::TaskList { .. } => "task_list",
            Request::Tasks {} => "tasks",
            Request::TokenExchange { .. } => "token_exchange",
        }
    }
}

/// Which credentials a command applies to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", from = "WireSelector")]
pub enum Selector {
    All,
    Agent(AgentId),
    Credential(CredentialKey),
}

/// A selector as read: a credential key refuses unknown fields.
#[derive(Deserialize)]
#[serde(rename_all = "snake_case")]
enum WireSelector {
    All,
    Agent(AgentId),
    Credential(WireKey),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WireKey {
    agent: AgentId,
    credential: CredentialId,
}

impl From<WireSelector> for Selector {
    fn from(w: WireSelector) -> Self {
        match w {
            WireSelector::All => Selector::All,
            WireSelector::Agent(a) => Selector::Agent(a),
            WireSelector::Credential(k) => {
                Selector::Credential(CredentialKey::new(k.agent, k.credential))
            }
        }
    }
}

impl Selector {
    /// Whether `key` is selected.
    pub fn matches(&self, key: &CredentialKey) -> bool {
        match self {
            Selector::All => true,
            Selector::Agent(a) => &key.agent == a,
            Selector::Credential(k) => k == key,
        }
    }
}

impl fmt::Display for Selector {
    /// The CLI spelling, the inverse of [`parse_selector`].
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Selector::All => f.write_str("all"),
            Selector::Agent(a) => write!(f, "{a}"),
            Selector::Credential(k) => write!(f, "{k}"),
        }
    }
}

/// Parses the CLI spelling of a selector: `all`, `AGENT` or `AGENT/CREDENTIAL`.
///
/// `all` is reserved: an agent that happens to be named `all` is still
/// reachable through `all/CREDENTIAL`.
pub fn parse_selector(s: &str) -> Result<Selector, String> {
    const USAGE: &str = "expected `all`, AGENT or AGENT/CREDENTIAL";
    let s = s.trim();
    // Quoted in errors at most this long (black-box finding: a selector of
    // 100,000 characters came back whole).
    let shown = |s: &str| {
        const MAX: usize = 80;
        match s.char_indices().nth(MAX) {
            None => s.to_owned(),
            Some((at, _)) => format!("{}… ({} characters)", &s[..at], s.chars().count()),
        }
    };
    if s.is_empty() {
        return Err(format!("empty selector: {USAGE}"));
    }
    if s == "all" {
        return Ok(Selector::All);
    }
    let mut parts = s.split('/');
    let agent = parts.next().unwrap_or_default();
    let credential = parts.next();
    if parts.next().is_some() {
        return Err(format!(
            "selector `{}` has more than one '/': {USAGE}",
            shown(s)
        ));
    }
    let agent =
        AgentId::new(agent).map_err(|e| format!("selector `{}`: agent id {e}", shown(s)))?;
    match credential {
        None => Ok(Selector::Agent(agent)),
        Some(c) => {
            let credential = CredentialId::new(c)
                .map_err(|e| format!("selector `{}`: credential id {e}", shown(s)))?;
            Ok(Selector::Credential(CredentialKey::new(agent, credential)))
        }
    }
}

/// One line of `keyturn status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusRow {
    pub agent: AgentId,
    pub credential: CredentialId,
    pub vault: String,
    /// The current version number, if the credential has ever been rotated.
    pub version: Option<u64>,
    pub stage: Option<ShownStage>,
    pub last_rotated: Option<DateTime<Utc>>,
    pub next_due: Option<DateTime<Utc>>,
    /// `idle`, `rotating`, `retiring`, `failed`, or `follow` (a credential
    /// another keyturn rotates, `mode = "follow"`).
    pub state: String,
    /// The step a rotation in progress is at (`create`, `promote`, ...).
    pub step: Option<String>,
    /// The id of the rotation in progress or the last one.
    pub rotation: Option<String>,
    pub last_error: Option<String>,
    /// Consumers that have not acknowledged the current version yet, within
    /// its grace period (`file:/run/keyturn/a/db (ack=open)`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub awaiting_ack: Vec<String>,
    /// Consumers that had not acknowledged the current version when the
    /// previous one was retired at its grace deadline.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub holdouts: Vec<String>,
}

/// The stage `keyturn status` shows of a credential's version: `current`,
/// or what the decommission of its agent did to it once that is verified.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ShownStage {
    Current,
    /// Every copy the agent was given is revoked, but the versions are not
    /// this keyturn's to destroy (a followed credential: its rotator's).
    Revoked,
    /// Every version destroyed at every vault (and revoked at the target)
    /// by the decommission of its agent.
    Destroyed,
}

impl ShownStage {
    pub fn as_str(self) -> &'static str {
        match self {
            ShownStage::Current => "current",
            ShownStage::Revoked => "revoked",
            ShownStage::Destroyed => "destroyed",
        }
    }
}

impl std::fmt::Display for ShownStage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One agent that is not simply active: decommissioning, decommissioned,
/// or orphaned (state remembers it, the config does not name it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentLifecycle {
    pub agent: AgentId,
    /// `decommissioning`, `decommissioned` or `orphaned`.
    pub state: String,
    #[serde(default)]
    pub owner: String,
    #[serde(default)]
    pub tenant: String,
    #[serde(default)]
    pub tier: String,
    /// Orphaned: since when this daemon has seen it so.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub orphaned_since: Option<DateTime<Utc>>,
    /// The decision (absent for an orphan).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decided_at: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actor: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub by: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// `command` or `config`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sla_seconds: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline: Option<DateTime<Utc>>,
    /// Milliseconds until the deadline (negative once it passed); absent
    /// when complete.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remaining_ms: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_at: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verified_at: Option<DateTime<Utc>>,
    /// Decision → every item revoked, in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to_revoked_ms: Option<i64>,
    /// Decision → every item verified, in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to_verified_ms: Option<i64>,
    #[serde(default)]
    pub items: usize,
    #[serde(default)]
    pub revoked: usize,
    #[serde(default)]
    pub verified: usize,
    /// Items not verified yet, with why.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pending: Vec<PendingItem>,
    /// Its access tokens, when the daemon serves the token service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens: Option<TokensRevocation>,
}

/// A decommissioned agent's access tokens (its `tokens` item).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokensRevocation {
    /// Every token naming the agent issued (`iat`) up to this is inactive.
    pub issued_up_to: DateTime<Utc>,
    /// When the token service's own check confirmed it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verified_at: Option<DateTime<Utc>>,
    /// Decision → verified, in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to_verified_ms: Option<i64>,
}

/// A revocation item not done yet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingItem {
    pub item: String,
    pub attempts: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

/// What a `decommission` did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DecommissionResult {
    /// The agent was already decommissioned: nothing new was decided.
    pub already: bool,
    pub agent: AgentLifecycle,
}

/// What happened to one credential of a `rotate` request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RotateResult {
    pub agent: AgentId,
    pub credential: CredentialId,
    pub rotation: Option<String>,
    pub version: Option<u64>,
    pub outcome: RotateOutcome,
    pub error: Option<String>,
    /// A completed rotation whose delivery to a sink that does not hold
    /// the rotation up (a webhook) failed and is retried in the background.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// What an `ack` did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AckResult {
    pub agent: AgentId,
    pub credential: CredentialId,
    pub version: u64,
    /// The consumers this ack acknowledged (empty: they all had already).
    pub acknowledged: Vec<String>,
    /// Consumers of the version still awaited.
    pub awaiting: Vec<String>,
    /// Whether the previous version is being retired now.
    pub retiring: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RotateOutcome {
    /// Accepted; running in the background (`wait = false`).
    Started,
    /// A rotation was running already (`wait = false`): the request is
    /// met by it (its id and version, once begun).
    Joined,
    /// Ran to the end (`wait = true`).
    Completed,
    Failed,
    /// Not rotated by this keyturn (followed, or its agent decommissioned),
    /// in a selection of several credentials; `error` says why.
    Skipped,
}

impl RotateOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            RotateOutcome::Started => "started",
            RotateOutcome::Joined => "joined",
            RotateOutcome::Completed => "completed",
            RotateOutcome::Failed => "failed",
            RotateOutcome::Skipped => "skipped",
        }
    }
}

/// One response line. Serialized through [`WireResponse`] so the JSON shape
/// is `{"ok":true,"result":...}` / `{"ok":false,"error":...}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(into = "WireResponse", try_from = "WireResponse")]
pub enum Response {
    Ok(ResponseBody),
    Error(ApiError),
}

impl Response {
    /// The body, or the daemon's error.
    pub fn into_result(self) -> Result<ResponseBody, ApiError> {
        match self {
            Response::Ok(b) => Ok(b),
            Response::Error(e) => Err(e),
        }
    }
}

impl From<Result<ResponseBody, ApiError>> for Response {
    fn from(r: Result<ResponseBody, ApiError>) -> Self {
        match r {
            Ok(b) => Response::Ok(b),
            Err(e) => Response::Error(e),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ResponseBody {
    Pong { version: String },
    Status(Vec<StatusRow>),
    Rotate(Vec<RotateResult>),
    Ack(AckResult),
    Decommission(Box<DecommissionResult>),
    Agents(Vec<AgentLifecycle>),
    Surface(Box<crate::surface::Surface>),
    TaskStarted(Box<TaskStarted>),
    TaskEnded(Box<TaskView>),
    Tasks(Vec<TaskView>),
    TokenExchanged(Box<TokenExchanged>),
}

/// A task as `task_list` and `task_end` report it (never a credential).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskView {
    pub task: String,
    pub agent: String,
    pub tenant: String,
    pub use_case: String,
    pub run_id: String,
    pub initiator: String,
    pub sensitivity: String,
    pub policy: String,
    pub started_by: String,
    pub started_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
    /// `starting`, `live`, `ending` or `ended`.
    pub state: String,
    #[serde(default)]
    pub ended_at: Option<DateTime<Utc>>,
    #[serde(default)]
    pub end_reason: Option<String>,
    /// Who ended it: the caller of `task end` as authenticated, or
    /// `keyturn` (TTL, failed start, decommission).
    #[serde(default)]
    pub ended_by: Option<String>,
    pub items: Vec<TaskItemView>,
}

/// One issuer's credential of a task (its handle: a role name, an access
/// key id, a token accessor; never the secret).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskItemView {
    pub issuer: String,
    #[serde(default)]
    pub handle: Option<String>,
    /// `issuing`, `issued`, `revoked`, `expiring`, `verified`.
    pub state: String,
    #[serde(default)]
    pub expires_at: Option<DateTime<Utc>>,
    #[serde(default)]
    pub last_error: Option<String>,
}

/// The answer to `task_start`: the task, and each issuer's credential. The
/// secret fields are here only when no task directory is configured (then
/// this answer is the one way they reach the agent); otherwise `file` says
/// where they were written and `secret` is empty.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskStarted {
    #[serde(flatten)]
    pub task: TaskView,
    #[serde(default)]
    pub dir: Option<String>,
    pub credentials: std::collections::BTreeMap<String, TaskCredential>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskCredential {
    pub public: std::collections::BTreeMap<String, String>,
    #[serde(default)]
    pub secret: std::collections::BTreeMap<String, WireSecret>,
    pub expires_at: DateTime<Utc>,
    #[serde(default)]
    pub file: Option<String>,
}

/// A secret on the wire: a `task_start` credential or a `token_exchange`
/// access token to the agent itself (the places a secret leaves the daemon
/// over a socket), and an assertion or subject token to it. Zeroized and redacted like
/// [`crate::model::SecretValue`], whose bytes it holds; serialized as the
/// text only here.
#[derive(Clone, PartialEq, Eq)]
pub struct WireSecret(pub crate::model::SecretValue);

impl fmt::Debug for WireSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl Serialize for WireSecret {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.0.expose_str() {
            Some(text) => s.serialize_str(text),
            None => Err(serde::ser::Error::custom("a task secret is not UTF-8")),
        }
    }
}

impl<'de> Deserialize<'de> for WireSecret {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = zeroize::Zeroizing::new(String::deserialize(d)?);
        Ok(WireSecret(crate::model::SecretValue::new(
            text.as_bytes().to_vec(),
        )))
    }
}

impl TaskView {
    /// The view of a stored task.
    pub fn of(t: &crate::tasks::store::TaskRow) -> TaskView {
        let time = |ms: i64| DateTime::<Utc>::from_timestamp_millis(ms).unwrap_or_default();
        let name = |v: &dyn erased_name::Named| v.name();
        TaskView {
            task: t.task.task_id.clone(),
            agent: t.task.agent.clone(),
            tenant: t.task.tenant.clone(),
            use_case: t.task.use_case.clone(),
            run_id: t.task.run_id.clone(),
            initiator: t.task.initiator.clone(),
            sensitivity: t.task.sensitivity.clone(),
            policy: t.policy.clone(),
            started_by: t.started_by.clone(),
            started_at: time(t.started_at_ms),
            expires_at: time(t.expires_at_ms),
            state: name(&t.state),
            ended_at: t.ended_at_ms.map(time),
            end_reason: t.end_reason.clone(),
            ended_by: t.ended_by.clone(),
            items: t
                .items
                .iter()
                .map(|i| TaskItemView {
                    issuer: i.issuer.clone(),
                    handle: i.handle.clone(),
                    state: name(&i.state),
                    expires_at: i.expires_at_ms.map(time),
                    last_error: i.last_error.clone(),
                })
                .collect(),
        }
    }
}

/// The snake_case name serde gives a unit enum value.
mod erased_name {
    pub trait Named {
        fn name(&self) -> String;
    }
    impl<T: serde::Serialize> Named for T {
        fn name(&self) -> String {
            serde_json::to_value(self)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_default()
        }
    }
}

/// The JSON shape of a response; see the module doc.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct WireResponse {
    ok: bool,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    result: Option<ResponseBody>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    error: Option<ApiError>,
}

impl From<Response> for WireResponse {
    fn from(r: Response) -> Self {
        match r {
            Response::Ok(b) => WireResponse {
                ok: true,
                result: Some(b),
                error: None,
            },
            Response::Error(e) => WireResponse {
                ok: false,
                result: None,
                error: Some(e),
            },
        }
    }
}

impl TryFrom<WireResponse> for Response {
    type Error = String;
    fn try_from(w: WireResponse) -> Result<Self, String> {
        match (w.ok, w.result, w.error) {
            (true, Some(b), None) => Ok(Response::Ok(b)),
            (false, None, Some(e)) => Ok(Response::Error(e)),
            (true, _, _) => Err("`ok: true` needs a `result` and no `error`".into()),
            (false, _, _) => Err("`ok: false` needs an `error` and no `result`".into()),
        }
    }
}

/// An error the daemon reports to a client.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{kind}: {message}")]
pub struct ApiError {
    pub kind: ApiErrorKind,
    pub message: String,
}

impl ApiError {
    pub fn new(kind: ApiErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(ApiErrorKind::BadRequest, message)
    }
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(ApiErrorKind::NotFound, message)
    }
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(ApiErrorKind::Forbidden, message)
    }
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(ApiErrorKind::Unavailable, message)
    }
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(ApiErrorKind::Internal, message)
    }
    pub fn failed(message: impl Into<String>) -> Self {
        Self::new(ApiErrorKind::Failed, message)
    }
    pub fn stale(message: impl Into<String>) -> Self {
        Self::new(ApiErrorKind::Stale, message)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ApiErrorKind {
    /// The request could not be parsed or makes no sense.
    BadRequest,
    /// The selector names no configured agent or credential.
    NotFound,
    /// The peer is not allowed to use the socket.
    Forbidden,
    /// The daemon cannot do it now (shutting down, reloading).
    Unavailable,
    /// A bug or an unexpected failure inside the daemon.
    Internal,
    /// The requested operation ran and failed (e.g. `rotate --wait`).
    Failed,
    /// The request names a version that is not (or no longer) the one it
    /// could apply to (an `ack` of a version not awaiting acks).
    Stale,
}

impl ApiErrorKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ApiErrorKind::BadRequest => "bad_request",
            ApiErrorKind::NotFound => "not_found",
            ApiErrorKind::Forbidden => "forbidden",
            ApiErrorKind::Unavailable => "unavailable",
            ApiErrorKind::Internal => "internal",
            ApiErrorKind::Failed => "failed",
            ApiErrorKind::Stale => "stale",
        }
    }
}

impl fmt::Display for ApiErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Parses one request line. Errors are `bad_request` with a message a human
/// can act on: serde's own message for malformed JSON or fields, and the list
/// of valid commands for a missing or unknown `cmd`.
pub fn parse_request(line: &str) -> Result<Request, ApiError> {
    // A duplicate member is refused: which of two `version`s (or `as`es) a
    // request means must not depend on the parser.
    let value = crate::oauth::strict_json::parse(line.as_bytes())
        .map_err(|e| ApiError::bad_request(format!("malformed JSON request: {e}")))?;
    let valid = COMMANDS.join(", ");
    match value.get("cmd") {
        None => {
            return Err(ApiError::bad_request(format!(
                "request has no `cmd` field; valid commands: {valid}"
            )));
        }
        Some(serde_json::Value::String(c)) if !COMMANDS.contains(&c.as_str()) => {
            // Echo at most a short prefix: the name came from the client.
            let shown: String = c.chars().take(64).collect();
            return Err(ApiError::bad_request(format!(
                "unknown command `{}`; valid commands: {valid}",
                shown.escape_debug()
            )));
        }
        Some(serde_json::Value::String(_)) => {}
        Some(_) => {
            return Err(ApiError::bad_request(format!(
                "`cmd` must be a string; valid commands: {valid}"
            )));
        }
    }
    serde_json::from_value(value)
        .map_err(|e| ApiError::bad_request(format!("invalid request: {e}")))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::test_support::key;
    use chrono::TimeZone;

    /// A status row of a rotation under way, for tests.
    pub(crate) fn row() -> StatusRow {
        StatusRow {
            agent: AgentId::new("invoice-bot").unwrap(),
            credential: CredentialId::new("db").unwrap(),
            vault: "local".into(),
            version: Some(3),
            stage: Some(ShownStage::Current),
            last_rotated: Some(Utc.with_ymd_and_hms(2025, 1, 2, 3, 4, 5).unwrap()),
            next_due: None,
            state: "rotating".into(),
            step: Some("promote".into()),
            rotation: Some("0123456789abcdef0123456789abcdef".into()),
            last_error: None,
            awaiting_ack: Vec::new(),
            holdouts: Vec::new(),
        }
    }

    #[test]
    fn requests_have_the_documented_json_and_round_trip() {
        let cases = [
            (Request::Ping {}, r#"{"cmd":"ping"}"#),
            (Request::Status {}, r#"{"cmd":"status"}"#),
            (Request::Tasks {}, r#"{"cmd":"tasks"}"#),
            (
                Request::Rotate {
                    selector: Selector::All,
                    wait: true,
                },
                r#"{"cmd":"rotate","selector":"all","wait":true}"#,
            ),
            (
                Request::Rotate {
                    selector: Selector::Agent(AgentId::new("bot").unwrap()),
                    wait: false,
                },
                r#"{"cmd":"rotate","selector":{"agent":"bot"},"wait":false}"#,
            ),
            (
                Request::Rotate {
                    selector: Selector::Credential(key("bot", "db")),
                    wait: false,
                },
                r#"{"cmd":"rotate","selector":{"credential":{"agent":"bot","credential":"db"}},"wait":false}"#,
            ),
        ];
        for (req, json) in cases {
            assert_eq!(serde_json::to_string(&req).unwrap(), json);
            assert_eq!(parse_request(json).unwrap(), req);
        }
        // `wait` is optional and defaults to false.
        assert_eq!(
            parse_request(r#"{"cmd":"rotate","selector":"all"}"#).unwrap(),
            Request::Rotate {
                selector: Selector::All,
                wait: false
            }
        );
    }

    /// The socket logs task requests with `{:?}`: the assertion, a bearer
    /// token while it lives, must not show; it goes back out as sent.
    #[test]
    fn an_assertion_is_read_on_every_task_command_and_never_printed() {
        let token = "eyJhbGciOiJFZERTQSJ9.kt_canary_payload.kt_canary_sig";
        for line in [
            format!(r#"{{"cmd":"task_list","assertion":"{token}"}}"#),
            format!(r#"{{"cmd":"task_end","task":"t1","assertion":"{token}"}}"#),
            format!(
                r#"{{"cmd":"task_start","assertion":"{token}","tenant":"a","use_case":"u","run_id":"r","initiator":"i","sensitivity":"low"}}"#
            ),
        ] {
            let req = parse_request(&line).unwrap();
            let (Request::TaskList { assertion, .. }
            | Request::TaskEnd { assertion, .. }
            | Request::TaskStart { assertion, .. }) = &req
            else {
                panic!("{line}");
            };
            assert_eq!(assertion.as_ref().unwrap().0.expose_str(), Some(token));
            assert!(!format!("{req:?}").contains("kt_canary"), "{req:?}");
            assert!(serde_json::to_string(&req).unwrap().contains(token));
        }
        let plain = parse_request(r#"{"cmd":"task_list"}"#).unwrap();
        assert!(!serde_json::to_string(&plain).unwrap().contains("assertion"));
    }

    /// `token_exchange` carries a subject token (and maybe an actor
    /// token): read, sent back out as sent, never in `{:?}`; its answer's
    /// access token neither.
    #[test]
    fn a_token_exchange_round_trips_and_never_prints_its_tokens() {
        let subject = "eyJhbGciOiJFZERTQSJ9.kt_subject_payload.kt_subject_sig";
        let actor = "eyJhbGciOiJFZERTQSJ9.kt_actor_payload.kt_actor_sig";
        let line = format!(
            r#"{{"cmd":"token_exchange","as":"bot","subject_token":"{subject}","subject_token_type":"urn:ietf:params:oauth:token-type:access_token","scope":"a b","audience":["https://x","https://y"],"resource":["https://r"],"task_id":"t1","actor_token":"{actor}"}}"#
        );
        let req = parse_request(&line).unwrap();
        let Request::TokenExchange { as_agent, exchange } = &req else {
            panic!("{req:?}");
        };
        assert_eq!(as_agent.as_ref().unwrap().as_str(), "bot");
        assert_eq!(exchange.subject_token.0.expose_str(), Some(subject));
        assert_eq!(
            exchange.actor_token.as_ref().unwrap().0.expose_str(),
            Some(actor)
        );
        assert_eq!(exchange.audience, ["https://x", "https://y"]);
        assert_eq!(exchange.scope.as_deref(), Some("a b"));
        assert!(!format!("{req:?}").contains("kt_"), "{req:?}");
        let back = serde_json::to_string(&req).unwrap();
        assert_eq!(parse_request(&back).unwrap(), req);
        // Unknown fields and a missing subject token are refused.
        for bad in [
            line.replace(r#""scope""#, r#""scopes""#),
            r#"{"cmd":"token_exchange","subject_token_type":"x"}"#.to_owned(),
        ] {
            assert_eq!(
                parse_request(&bad).unwrap_err().kind,
                ApiErrorKind::BadRequest
            );
        }
        let answer = ResponseBody::TokenExchanged(Box::new(TokenExchanged {
            access_token: WireSecret(crate::model::SecretValue::from_string(subject.into())),
            issued_token_type: "urn:ietf:params:oauth:token-type:access_token".into(),
            token_type: "Bearer".into(),
            expires_in: 60,
            scope: "a".into(),
        }));
        assert!(!format!("{answer:?}").contains("kt_"), "{answer:?}");
        let json: serde_json::Value = serde_json::to_value(&answer).unwrap();
        assert_eq!(json["token_exchanged"]["access_token"], subject);
    }

    #[test]
    fn bad_requests_are_explained() {
        let e = parse_request("{not json").unwrap_err();
        assert_eq!(e.kind, ApiErrorKind::BadRequest);
        assert!(e.message.starts_with("malformed JSON request: "), "{e}");

        let e = parse_request(r#"{"cmd":"reboot"}"#).unwrap_err();
        assert_eq!(e.kind, ApiErrorKind::BadRequest);
        assert!(e.message.contains("unknown command `reboot`"), "{e}");
        assert!(e.message.contains("ping, status, rotate"), "{e}");

        let e = parse_request(r#"{"selector":"all"}"#).unwrap_err();
        assert!(e.message.contains("no `cmd`"), "{e}");
        let e = parse_request(r#"{"cmd":7}"#).unwrap_err();
        assert!(e.message.contains("must be a string"), "{e}");

        // Invalid ids are rejected by the id newtypes, not passed on.
        let e = parse_request(r#"{"cmd":"rotate","selector":{"agent":"../etc"}}"#).unwrap_err();
        assert!(e.message.starts_with("invalid request: "), "{e}");
        // Unknown fields are refused rather than silently ignored.
        let e = parse_request(r#"{"cmd":"rotate","selector":"all","force":true}"#).unwrap_err();
        assert!(e.message.contains("force"), "{e}");
        assert!(parse_request(r#"{"cmd":"rotate"}"#).is_err());
        assert!(parse_request("[]").is_err());
    }

    /// Black-box finding: `{"cmd":"ack",...,"version":7,"version":8}` was
    /// taken as version 8. Two members with one name are refused, at any
    /// depth, naming the member.
    #[test]
    fn a_duplicate_member_is_refused() {
        for line in [
            r#"{"cmd":"ack","agent":"bot","credential":"db","version":7,"version":8}"#,
            r#"{"cmd":"ping","cmd":"status"}"#,
            r#"{"cmd":"rotate","selector":{"credential":{"agent":"a","agent":"b","credential":"c"}}}"#,
        ] {
            let e = parse_request(line).unwrap_err();
            assert_eq!(e.kind, ApiErrorKind::BadRequest, "{line}");
            assert!(e.message.contains("duplicate member"), "{line}: {e}");
        }
        assert!(
            parse_request(r#"{"cmd":"ack","agent":"bot","credential":"db","version":7}"#).is_ok()
        );
    }

    /// Every request shape refuses a field it does not know, naming it, as
    /// the config does: a misspelt option must not be silently dropped.
    #[test]
    fn unknown_fields_are_refused_everywhere() {
        for (line, field) in [
            (r#"{"cmd":"ping","verbose":true}"#, "verbose"),
            (r#"{"cmd":"status","agent":"bot"}"#, "agent"),
            (r#"{"cmd":"rotate","selector":"all","force":true}"#, "force"),
            (
                r#"{"cmd":"rotate","selector":{"credential":{"agent":"bot","credential":"db","stage":"x"}}}"#,
                "stage",
            ),
        ] {
            let e = parse_request(line).expect_err(line);
            assert_eq!(e.kind, ApiErrorKind::BadRequest, "{line}");
            assert!(
                e.message.contains(&format!("unknown field `{field}`")),
                "{line}: {e}"
            );
        }
    }

    #[test]
    fn responses_have_the_documented_json_and_round_trip() {
        let ok = Response::Ok(ResponseBody::Pong {
            version: "1.2.3".into(),
        });
        let json = serde_json::to_string(&ok).unwrap();
        assert_eq!(json, r#"{"ok":true,"result":{"pong":{"version":"1.2.3"}}}"#);
        assert_eq!(serde_json::from_str::<Response>(&json).unwrap(), ok);

        let err = Response::Error(ApiError::forbidden("uid 7 refused"));
        let json = serde_json::to_string(&err).unwrap();
        assert_eq!(
            json,
            r#"{"ok":false,"error":{"kind":"forbidden","message":"uid 7 refused"}}"#
        );
        assert_eq!(serde_json::from_str::<Response>(&json).unwrap(), err);

        let status = Response::Ok(ResponseBody::Status(vec![row()]));
        let json = serde_json::to_string(&status).unwrap();
        assert!(
            json.contains(r#""last_rotated":"2025-01-02T03:04:05Z""#),
            "{json}"
        );
        assert_eq!(serde_json::from_str::<Response>(&json).unwrap(), status);

        let rotate = Response::Ok(ResponseBody::Rotate(vec![RotateResult {
            agent: AgentId::new("bot").unwrap(),
            credential: CredentialId::new("db").unwrap(),
            rotation: None,
            version: Some(4),
            outcome: RotateOutcome::Completed,
            error: None,
            note: None,
        }]));
        let json = serde_json::to_string(&rotate).unwrap();
        assert!(json.contains(r#""outcome":"completed""#), "{json}");
        assert_eq!(serde_json::from_str::<Response>(&json).unwrap(), rotate);

        // Contradictory envelopes are protocol errors, not silently accepted.
        for bad in [
            r#"{"ok":true}"#,
            r#"{"ok":false,"result":{"pong":{"version":"1"}}}"#,
            r#"{"ok":true,"result":{"pong":{"version":"1"}},"error":{"kind":"internal","message":"x"}}"#,
        ] {
            assert!(serde_json::from_str::<Response>(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn selectors_parse_from_cli_text() {
        assert_eq!(parse_selector("all"), Ok(Selector::All));
        assert_eq!(
            parse_selector("invoice-bot"),
            Ok(Selector::Agent(AgentId::new("invoice-bot").unwrap()))
        );
        assert_eq!(
            parse_selector("invoice-bot/db"),
            Ok(Selector::Credential(key("invoice-bot", "db")))
        );
        assert_eq!(
            parse_selector("all/db"),
            Ok(Selector::Credential(key("all", "db")))
        );
        for (bad, needle) in [
            ("", "empty selector"),
            ("a/b/c", "more than one '/'"),
            ("Bot", "agent id must start"),
            ("bot/", "credential id must not be empty"),
            ("/db", "agent id must not be empty"),
            ("bot/../x", "more than one '/'"),
            ("bot/D B", "credential id must start"),
        ] {
            let e = parse_selector(bad).unwrap_err();
            assert!(e.contains(needle), "{bad:?}: {e}");
        }
        // A huge one is quoted cut short, with its length.
        let huge = format!("{}/x", "a".repeat(100_000));
        let e = parse_selector(&huge).unwrap_err();
        assert!(e.len() < 300, "{e}");
        assert!(e.contains("… (100002 characters)"), "{e}");
        // Display is the inverse of parsing.
        for s in ["all", "bot", "bot/db"] {
            assert_eq!(parse_selector(s).unwrap().to_string(), s);
        }
        assert!(Selector::Agent(AgentId::new("bot").unwrap()).matches(&key("bot", "db")));
        assert!(!Selector::Credential(key("bot", "db")).matches(&key("bot", "api")));
    }
}

#[cfg(test)]
mod ack_tests {
    use super::*;

    #[test]
    fn the_ack_request_and_result_have_the_documented_json() {
        let line = r#"{"cmd":"ack","agent":"invoice-bot","credential":"db","version":7}"#;
        let req = parse_request(line).unwrap();
        assert_eq!(
            req,
            Request::Ack {
                agent: AgentId::new("invoice-bot").unwrap(),
                credential: CredentialId::new("db").unwrap(),
                version: 7,
            }
        );
        assert_eq!(serde_json::to_string(&req).unwrap(), line);
        let err = parse_request(r#"{"cmd":"ack","agent":"a","credential":"db"}"#).unwrap_err();
        assert_eq!(err.kind, ApiErrorKind::BadRequest, "{}", err.message);
        assert!(err.message.contains("version"), "{}", err.message);
        let resp = Response::Ok(ResponseBody::Ack(AckResult {
            agent: AgentId::new("a").unwrap(),
            credential: CredentialId::new("db").unwrap(),
            version: 7,
            acknowledged: vec!["file:/run/a/db".into()],
            awaiting: vec![],
            retiring: true,
        }));
        let json = serde_json::to_string(&resp).unwrap();
        assert_eq!(
            json,
            r#"{"ok":true,"result":{"ack":{"agent":"a","credential":"db","version":7,"acknowledged":["file:/run/a/db"],"awaiting":[],"retiring":true}}}"#
        );
        assert_eq!(serde_json::from_str::<Response>(&json).unwrap(), resp);
    }
}
