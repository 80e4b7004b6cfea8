//! What an STS session of a task is made of: its name, tags and source
//! identity (sanitised into STS's patterns), its duration, and the handle
//! that records it with the task.

use super::*;

/// A session tag value STS accepts (`[\p{L}\p{Z}\p{N}_.:/=+\-@]*`, at most
/// 256 characters), kept to ASCII: letters, digits, space and `_.:/=+-@`
/// stay, anything else becomes `_`; then cut to 256 characters.
pub fn tag_value(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || " _.:/=+-@".contains(c) {
                c
            } else {
                '_'
            }
        })
        .take(MAX_TAG_VALUE)
        .collect()
}

/// Text STS accepts as a `SourceIdentity` or `RoleSessionName`
/// (`[\w+=,.@-]*`): letters, digits and `_+=,.@-` stay, anything else
/// becomes `_`; then cut to `max` characters.
fn sts_name(s: &str, max: usize) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "_+=,.@-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .take(max)
        .collect()
}

/// The `SourceIdentity` for an initiator: [`sts_name`] cut to 64
/// characters and padded with `_` to STS's minimum of 2.
pub fn source_identity(initiator: &str) -> String {
    let mut s = sts_name(initiator, MAX_SOURCE_IDENTITY);
    while s.chars().count() < MIN_SOURCE_IDENTITY {
        s.push('_');
    }
    s
}

/// `keyturn-<task_id>` (a task id is already in STS's charset; the
/// mapping only guards against a future id format).
pub fn session_name(task_id: &str) -> String {
    sts_name(&format!("{SESSION_PREFIX}{task_id}"), MAX_SESSION_NAME)
}

/// The session tags of a task, in a fixed order.
pub fn session_tags(task: &TaskAttribution) -> [(&'static str, String); 7] {
    [
        ("task_id", tag_value(&task.task_id)),
        ("agent", tag_value(&task.agent)),
        ("tenant", tag_value(&task.tenant)),
        ("use_case", tag_value(&task.use_case)),
        ("run_id", tag_value(&task.run_id)),
        ("initiator", tag_value(&task.initiator)),
        ("sensitivity", tag_value(&task.sensitivity)),
    ]
}

/// The `DurationSeconds` of a TTL, or why STS cannot honour it. With
/// early revocation a TTL below STS's minimum gets the minimum: the task
/// manager revokes the session (a deny statement) at the TTL.
pub(super) fn session_seconds(ttl: Duration, early_revocation: bool) -> Result<i32, String> {
    if ttl < MIN_SESSION && early_revocation {
        return Ok(MIN_SESSION.as_secs() as i32);
    }
    if ttl < MIN_SESSION {
        return Err(format!(
            "the task's TTL of {}s is below STS's shortest session ({}s): without revoke_with_deny_policy the credential cannot be ended early and would outlive the task; ask for a TTL of at least 15m",
            ttl.as_secs(),
            MIN_SESSION.as_secs()
        ));
    }
    if ttl > MAX_SESSION {
        return Err(format!(
            "the task's TTL of {}s is above STS's longest role session ({}s)",
            ttl.as_secs(),
            MAX_SESSION.as_secs()
        ));
    }
    // ≤ 43,200: fits.
    Ok(ttl.as_secs() as i32)
}

/// `seconds` (from [`session_seconds`]) cut so that a session asked for at
/// `now` ends with the task, at `expires_at`: the whole seconds left until
/// then, rounded up, never under STS's shortest session. A session asked
/// for the whole TTL once the start had taken a while would end that much
/// after the task.
pub(super) fn until_expiry(seconds: i32, expires_at: SystemTime, now: SystemTime) -> i32 {
    let left = expires_at.duration_since(now).unwrap_or_default();
    let left = left.as_secs() + u64::from(left.subsec_nanos() > 0);
    let floor = MIN_SESSION.as_secs();
    seconds.min(i32::try_from(left.max(floor)).unwrap_or(i32::MAX))
}

/// When a session of a task whose expiration was never recorded ends at
/// the latest (`revoke` without a handle): it was asked for at most the
/// time left until the task's `expires_at` (or STS's shortest session),
/// by a request that took at most `timeout`, before `now`; and no session
/// outlives STS's longest from its start.
pub(super) fn unrecorded_session_end(
    expires_at: SystemTime,
    timeout: Duration,
    now: SystemTime,
) -> SystemTime {
    let with_the_call = expires_at
        .checked_add(timeout + Duration::from_secs(1))
        .unwrap_or(expires_at);
    with_the_call.max(now + MIN_SESSION).min(now + MAX_SESSION)
}

/// What `revoke` and `verify_revoked` need of a session, persisted as the
/// task's handle. Not secret: an access key id identifies a credential
/// without granting anything.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StsHandle {
    pub role_arn: String,
    /// `ROLEID:keyturn-<task_id>`: the session's `aws:userid`.
    pub assumed_role_id: String,
    pub access_key_id: String,
    /// The session's expiration, seconds since the Unix epoch.
    pub expires: u64,
}

impl StsHandle {
    pub fn encode(&self) -> String {
        serde_json::to_string(self).expect("a handle serializes")
    }

    pub fn decode(text: &str) -> Result<Self, String> {
        serde_json::from_str(text).map_err(|e| format!("unreadable {TYPE} handle: {e}"))
    }

    pub fn expires_at(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(self.expires)
    }
}

/// The handle recorded before AssumeRole is sent
/// ([`TaskIssuer::handle_before_issue`]): the role the session is asked of.
/// With it, a session whose answer was never recorded (a crash after the
/// call, a lost answer) is still denied at the task's end with
/// `revoke_with_deny_policy`: its `aws:userid` follows from the role's id
/// and the task, `ROLEID:keyturn-<task_id>`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AskedHandle {
    pub asked_of: String,
}

/// A task's handle as recorded: the session AssumeRole answered with, or
/// only the role it was asked of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionHandle {
    Session(StsHandle),
    Asked(AskedHandle),
}

impl AskedHandle {
    pub fn encode(&self) -> String {
        serde_json::to_string(self).expect("a handle serializes")
    }
}

impl SessionHandle {
    pub fn decode(text: &str) -> Result<Self, String> {
        match serde_json::from_str::<AskedHandle>(text) {
            Ok(asked) => Ok(Self::Asked(asked)),
            Err(_) => StsHandle::decode(text).map(Self::Session),
        }
    }
}
