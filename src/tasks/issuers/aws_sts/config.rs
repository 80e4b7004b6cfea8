//! `[issuers.NAME]` with `type = "aws_sts"` and the shape of its grant in a
//! policy, with their checks: pure, run by `keyturn check` and again (the
//! ARN and external id) before each issuance.

use super::*;

/// `[issuers.NAME]` with `type = "aws_sts"`.
#[derive(Debug, Clone, Default, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StsIssuerConfig {
    /// AWS region; `None` = the credential chain's region (env, profile).
    pub region: Option<String>,
    /// e.g. a VPC endpoint of STS in production, moto in tests.
    pub endpoint_url: Option<String>,
    /// A profile of the shared config/credentials files.
    pub profile: Option<String>,
    /// Time allowed for one call (default 30 s).
    pub timeout: Option<String>,
    /// End a session at once on revoke, with a deny statement in the
    /// inline policy `keyturn-revoked-sessions` of its role (see the module
    /// docs). Off by default: it needs `iam:GetRolePolicy` and
    /// `iam:PutRolePolicy` on the task roles, and `iam:GetRole` to end a
    /// session whose answer was never recorded.
    #[serde(default)]
    pub revoke_with_deny_policy: bool,
    /// IAM's endpoint for `revoke_with_deny_policy` (moto in tests);
    /// default AWS's. `endpoint_url` is STS's only.
    pub iam_endpoint_url: Option<String>,
}

impl StsIssuerConfig {
    pub fn timeout(&self) -> Duration {
        duration_value(self.timeout.as_deref(), DEFAULT_TIMEOUT)
    }
}

/// What a policy level grants at an `aws_sts` issuer:
/// `{ role_arn = "...", session_policy = '{"Version": ...}' }`.
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StsGrant {
    /// The role the task's session assumes.
    pub role_arn: String,
    /// The session policy, inline (a JSON document).
    pub session_policy: Option<String>,
    /// The session policy, from a file (an absolute path; read at each
    /// issuance, so an edit takes effect with the next task).
    pub session_policy_file: Option<PathBuf>,
    /// `ExternalId`, when the role's trust policy asks for one.
    pub external_id: Option<String>,
}

impl IssuerPlugin for StsIssuerConfig {
    fn check(&mut self, v: &mut Validator<'_>, at: Loc<'_>) {
        if let Some(region) = &self.region
            && region.trim().is_empty()
        {
            v.err(
                at.key("region"),
                "region must not be empty (write e.g. \"eu-west-1\", or leave it out to use the credential chain's)",
            );
        }
        if let Some(u) = &self.endpoint_url {
            v.url(
                at.key("endpoint_url"),
                u,
                &["http", "https"],
                "https://sts.eu-west-1.amazonaws.com",
            );
        }
        if let Some(u) = &self.iam_endpoint_url {
            if self.revoke_with_deny_policy {
                v.url(
                    at.key("iam_endpoint_url"),
                    u,
                    &["http", "https"],
                    "https://iam.amazonaws.com",
                );
            } else {
                v.err_key(
                    at.key("iam_endpoint_url"),
                    "iam_endpoint_url is used only with revoke_with_deny_policy = true",
                );
            }
        }
        v.timeout(&at, &self.timeout, DEFAULT_TIMEOUT);
    }

    fn check_grant(&self, grant: &Grant, v: &mut Validator<'_>, at: Loc<'_>) {
        let g: StsGrant = match grant.parse() {
            Ok(g) => g,
            Err(e) => {
                v.err(at, format!("invalid {TYPE} grant: {e}"));
                return;
            }
        };
        if let Err(why) = check_role_arn(&g.role_arn) {
            v.err(at.key("role_arn"), why);
        }
        match (&g.session_policy, &g.session_policy_file) {
            (Some(_), Some(_)) => v.err_key(
                at.key("session_policy_file"),
                "set either session_policy or session_policy_file, not both",
            ),
            (None, None) => v.err_key(
                at,
                "a session policy is required: set session_policy (a JSON document) or session_policy_file",
            ),
            (Some(text), None) => {
                if let Err(why) = pack_policy(text) {
                    v.err(at.key("session_policy"), why);
                }
            }
            (None, Some(path)) => {
                // Validation is pure: the file is read (and its policy
                // checked) at each issuance.
                if !path.is_absolute() {
                    v.err(
                        at.key("session_policy_file"),
                        format!(
                            "session_policy_file must be an absolute path, got `{}`",
                            path.display()
                        ),
                    );
                }
            }
        }
        if let Some(id) = &g.external_id
            && let Err(why) = check_external_id(id)
        {
            v.err(at.key("external_id"), why);
        }
    }

    fn build(&self) -> Result<Arc<dyn TaskIssuer>, PluginError> {
        Ok(Arc::new(StsIssuer::new(self.clone())))
    }
}

/// `arn:PARTITION:iam::ACCOUNT:role/[PATH/]NAME`.
pub(super) fn check_role_arn(arn: &str) -> Result<(), String> {
    let example = "arn:aws:iam::123456789012:role/agent-tasks";
    let parts: Vec<&str> = arn.splitn(6, ':').collect();
    let problem = match parts.as_slice() {
        ["arn", partition, "iam", "", account, resource] => {
            if partition.is_empty() {
                Some("it has no partition")
            } else if account.len() != 12 || !account.bytes().all(|b| b.is_ascii_digit()) {
                Some("the account must be 12 digits")
            } else if !resource.starts_with("role/")
                || resource.ends_with('/')
                || resource.contains(char::is_whitespace)
            {
                Some("the resource must be role/NAME")
            } else {
                None
            }
        }
        _ => Some("it is not an IAM role ARN"),
    };
    match problem {
        None => Ok(()),
        Some(why) => Err(format!(
            "invalid role_arn `{arn}`: {why} (write e.g. \"{example}\")"
        )),
    }
}

/// A session policy as sent to STS: parsed, then written without
/// whitespace. Err says why STS would refuse it.
pub(crate) fn pack_policy(text: &str) -> Result<String, String> {
    let doc: serde_json::Value = serde_json::from_str(text)
        .map_err(|e| format!("the session policy is not valid JSON: {e}"))?;
    let Some(obj) = doc.as_object() else {
        return Err("the session policy must be a JSON object (an IAM policy document)".into());
    };
    if !obj.contains_key("Statement") {
        return Err("the session policy has no \"Statement\"".into());
    }
    let packed = doc.to_string();
    // STS accepts tab, LF, CR and U+0020..=U+00FF in a policy.
    if let Some(c) = packed
        .chars()
        .find(|&c| !matches!(c, '\t' | '\n' | '\r' | '\u{20}'..='\u{ff}'))
    {
        return Err(format!(
            "the session policy contains {c:?} (U+{:04X}); STS accepts only characters up to U+00FF",
            c as u32
        ));
    }
    let chars = packed.chars().count();
    if chars > MAX_POLICY_CHARS {
        return Err(format!(
            "the session policy is {chars} characters without whitespace; STS accepts at most {MAX_POLICY_CHARS}"
        ));
    }
    Ok(packed)
}

/// `[\w+=,.@:/-]`, 2 to 1224 characters.
pub(super) fn check_external_id(id: &str) -> Result<(), String> {
    let len = id.chars().count();
    if !EXTERNAL_ID_LEN.contains(&len) {
        return Err(format!(
            "external_id must be 2 to 1224 characters, got {len}"
        ));
    }
    if let Some(c) = id
        .chars()
        .find(|&c| !(c.is_ascii_alphanumeric() || "_+=,.@:/-".contains(c)))
    {
        return Err(format!(
            "external_id contains {c:?}; STS accepts letters, digits and _+=,.@:/-"
        ));
    }
    Ok(())
}
