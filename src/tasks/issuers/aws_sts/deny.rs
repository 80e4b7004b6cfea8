//! The deny policy (early revocation): keyturn's statements in a task
//! role's inline policy `keyturn-revoked-sessions`, and the IAM calls that
//! read it and check the role is in the issuer's own account.

use super::*;

/// The inline policy of a task role that holds keyturn's deny statements.
pub const DENY_POLICY_NAME: &str = "keyturn-revoked-sessions";
/// keyturn's statements in it are `KeyturnRevokedUntil<unix seconds>`.
const DENY_SID_PREFIX: &str = "KeyturnRevokedUntil";
/// Revoked sessions share a statement per this many seconds of expiry:
/// fewer statements (an inline policy is limited to 10,240 characters per
/// role), and a statement goes as a whole once its sessions have expired.
const DENY_BUCKET_SECS: u64 = 300;

/// The role name of `arn:...:role/[PATH/]NAME`.
pub(super) fn role_name(arn: &str) -> &str {
    arn.rsplit('/').next().unwrap_or(arn)
}

/// The partition and account of an ARN (`arn:PARTITION:SERVICE:REGION:ACCOUNT:...`);
/// empty where it has none.
pub(super) fn arn_account(arn: &str) -> (&str, &str) {
    let mut parts = arn.splitn(6, ':');
    let partition = parts.nth(1).unwrap_or_default();
    let account = parts.nth(2).unwrap_or_default();
    (partition, account)
}

/// The policy document as IAM answers it: URL-encoded (RFC 3986) on AWS,
/// plain on moto.
pub(super) fn decode_policy_document(text: &str) -> String {
    if text.trim_start().starts_with('{') {
        text.to_owned()
    } else {
        percent_encoding::percent_decode_str(text)
            .decode_utf8_lossy()
            .into_owned()
    }
}

/// The statements of a policy document (a lone statement is a list of one).
pub(super) fn statements(doc: &str) -> Result<Vec<serde_json::Value>, String> {
    let value: serde_json::Value = serde_json::from_str(doc)
        .map_err(|e| format!("the {DENY_POLICY_NAME} policy is not JSON: {e}"))?;
    match value.get("Statement") {
        Some(serde_json::Value::Array(list)) => Ok(list.clone()),
        Some(one @ serde_json::Value::Object(_)) => Ok(vec![one.clone()]),
        None => Ok(Vec::new()),
        Some(_) => Err(format!(
            "the {DENY_POLICY_NAME} policy's Statement is neither a list nor an object"
        )),
    }
}

/// The expiry bucket of one of keyturn's statements.
fn bucket_of(statement: &serde_json::Value) -> Option<u64> {
    statement
        .get("Sid")?
        .as_str()?
        .strip_prefix(DENY_SID_PREFIX)?
        .parse()
        .ok()
}

/// The `aws:userid` values a statement denies.
fn denied_user_ids(statement: &serde_json::Value) -> Vec<&str> {
    match statement.pointer("/Condition/StringEquals/aws:userid") {
        Some(serde_json::Value::String(one)) => vec![one.as_str()],
        Some(serde_json::Value::Array(list)) => list.iter().filter_map(|v| v.as_str()).collect(),
        _ => Vec::new(),
    }
}

/// The deny policy once `user_id` (a session expiring at `expires`) is in
/// it and the statements whose sessions have all expired by `now` are gone;
/// `None` when it lists the session already and nothing expired. Statements
/// that are not keyturn's are kept as they are.
pub(crate) fn deny_policy_with(
    existing: Option<&str>,
    user_id: &str,
    expires: u64,
    now: u64,
) -> Result<Option<String>, String> {
    let mut list = match existing {
        Some(doc) => statements(doc)?,
        None => Vec::new(),
    };
    let before = list.len();
    list.retain(|st| bucket_of(st).is_none_or(|bucket| bucket > now));
    let mut changed = list.len() != before;
    let bucket = expires.div_ceil(DENY_BUCKET_SECS) * DENY_BUCKET_SECS;
    match list.iter_mut().find(|st| bucket_of(st) == Some(bucket)) {
        Some(st) if denied_user_ids(st).contains(&user_id) => {}
        Some(st) => {
            let mut ids: Vec<serde_json::Value> = denied_user_ids(st)
                .into_iter()
                .map(|id| serde_json::Value::String(id.to_owned()))
                .collect();
            ids.push(user_id.into());
            st["Condition"]["StringEquals"]["aws:userid"] = ids.into();
            changed = true;
        }
        None => {
            list.push(serde_json::json!({
                "Sid": format!("{DENY_SID_PREFIX}{bucket}"),
                "Effect": "Deny",
                "Action": "*",
                "Resource": "*",
                "Condition": {"StringEquals": {"aws:userid": [user_id]}},
            }));
            changed = true;
        }
    }
    Ok(
        changed
            .then(|| serde_json::json!({"Version": "2012-10-17", "Statement": list}).to_string()),
    )
}

/// Whether a deny statement of the policy names `user_id`.
pub(crate) fn deny_policy_lists(doc: &str, user_id: &str) -> Result<bool, String> {
    Ok(statements(doc)?.iter().any(|st| {
        st.get("Effect").and_then(|e| e.as_str()) == Some("Deny")
            && denied_user_ids(st).contains(&user_id)
    }))
}

impl StsIssuer {
    /// The deny policy of `role_arn`, decoded; `None` when the role has none.
    pub(super) async fn deny_policy(
        &self,
        c: &Connected,
        op: &str,
        what: &str,
        role_arn: &str,
    ) -> Result<Option<String>, PluginError> {
        match c
            .iam
            .get_role_policy()
            .role_name(role_name(role_arn))
            .policy_name(DENY_POLICY_NAME)
            .send()
            .await
        {
            Ok(out) => Ok(Some(decode_policy_document(out.policy_document()))),
            Err(e) if error_code(&e) == Some("NoSuchEntity") => Ok(None),
            Err(e) => {
                let (kind, detail) = sdk_error_detail(&e, &c.iam_endpoint, self.config.timeout());
                Err(self.err(kind, &format!("{op} (GetRolePolicy)"), what, detail))
            }
        }
    }

    /// Writes a statement denying the session `user_id` (expiring at
    /// `expires`, unix seconds) into `role_arn`'s deny policy, pruning the
    /// statements whose sessions have all expired; nothing when it is
    /// listed already.
    pub(super) async fn deny_session(
        &self,
        c: &Connected,
        what: &str,
        role_arn: &str,
        user_id: &str,
        expires: u64,
    ) -> Result<(), PluginError> {
        let _one_writer = self.deny_writes.lock().await;
        let existing = self.deny_policy(c, "revoke", what, role_arn).await?;
        let updated = deny_policy_with(existing.as_deref(), user_id, expires, unix_now())
            .map_err(|e| self.err(ErrorKind::Invalid, "revoke", what, e))?;
        if let Some(doc) = updated {
            c.iam
                .put_role_policy()
                .role_name(role_name(role_arn))
                .policy_name(DENY_POLICY_NAME)
                .policy_document(doc)
                .send()
                .await
                .map_err(|e| {
                    let (kind, detail) =
                        sdk_error_detail(&e, &c.iam_endpoint, self.config.timeout());
                    self.err(kind, "revoke (PutRolePolicy)", what, detail)
                })?;
        }
        Ok(())
    }

    /// Denies the task's session of the role it was asked of, whose
    /// answer was never recorded, until `end` (the latest it can end):
    /// `false` when its id cannot be known (see
    /// [`Self::asked_session_id`]).
    pub(super) async fn deny_asked(
        &self,
        task: &TaskAttribution,
        asked: &AskedHandle,
        end: SystemTime,
    ) -> Result<bool, PluginError> {
        let what = task_role(task, &asked.asked_of);
        let c = self.connected().await?;
        self.role_in_own_account(c, "revoke", &what, &asked.asked_of)
            .await?;
        let Some(id) = self
            .asked_session_id(c, "revoke", &what, &asked.asked_of, task)
            .await?
        else {
            return Ok(false);
        };
        let end = end
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs() + 1)
            .unwrap_or(0);
        self.deny_session(c, &what, &asked.asked_of, &id, end)
            .await?;
        Ok(true)
    }

    /// The `aws:userid` of the task's session of `role_arn`,
    /// `ROLEID:keyturn-<task_id>`, from `GetRole`; `None` when IAM refuses
    /// to say (no such role: its sessions are gone with it; or no
    /// `iam:GetRole` permission: the session then ends by itself).
    pub(super) async fn asked_session_id(
        &self,
        c: &Connected,
        op: &str,
        what: &str,
        role_arn: &str,
        task: &TaskAttribution,
    ) -> Result<Option<String>, PluginError> {
        match c.iam.get_role().role_name(role_name(role_arn)).send().await {
            Ok(out) => Ok(out
                .role()
                .map(|r| format!("{}:{}", r.role_id(), session_name(&task.task_id)))),
            Err(e) => {
                let (kind, detail) = sdk_error_detail(&e, &c.iam_endpoint, self.config.timeout());
                // Refused, not throttled (AWS throttles with a 400).
                let refused = !kind.is_retryable()
                    && e.raw_response()
                        .is_some_and(|r| r.status().is_client_error());
                if refused {
                    tracing::warn!(
                        task = %task.task_id,
                        "{op}: GetRole of {role_arn} refused ({detail}): the session whose \
                         answer was not recorded is not denied, it ends by itself"
                    );
                    return Ok(None);
                }
                Err(self.err(kind, &format!("{op} (GetRole)"), what, detail))
            }
        }
    }

    /// `Ok` when the issuer's credentials are of the account (and
    /// partition) of `role_arn`. IAM acts in the caller's own account: the
    /// deny policy of a role of another account would be written to, and
    /// read back from, the role of the same name in the caller's, which
    /// ends nothing; read back, it would even look like a revocation.
    pub(super) async fn role_in_own_account(
        &self,
        c: &Connected,
        op: &str,
        what: &str,
        role_arn: &str,
    ) -> Result<(), PluginError> {
        let me = c.client.get_caller_identity().send().await.map_err(|e| {
            let (kind, detail) = sdk_error_detail(&e, &c.endpoint, self.config.timeout());
            self.err(kind, &format!("{op} (GetCallerIdentity)"), what, detail)
        })?;
        let (partition, account) = arn_account(role_arn);
        let mine = (
            me.arn().map(|a| arn_account(a).0).unwrap_or_default(),
            me.account().unwrap_or_default(),
        );
        if mine == (partition, account) {
            return Ok(());
        }
        Err(self.err(
            ErrorKind::Invalid,
            op,
            what,
            format!(
                "the role is in account {account} ({partition}) but the issuer's credentials are of \
                 account {} ({}): IAM would put the deny policy on that account's role of the \
                 same name, which ends nothing. revoke_with_deny_policy needs credentials of the \
                 role's account; without it the session ends at its expiration",
                mine.1, mine.0
            ),
        ))
    }
}
