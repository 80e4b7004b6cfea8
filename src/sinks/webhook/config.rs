//! The webhook sink's config: `deliver = [{ type = "webhook", ... }]`, its check and its constructor.

use super::*;

/// `timeout` when unset.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);
/// The shortest and longest `timeout`: a delivery waits for the receiver,
/// and the credential's other sinks wait for the delivery.
pub const MIN_TIMEOUT: Duration = Duration::from_millis(100);
pub const MAX_TIMEOUT: Duration = Duration::from_secs(60);

/// One `deliver = [{ type = "webhook", ... }]` entry.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    /// `http://` or `https://`, no user name or password in it.
    pub url: String,
    /// A file holding the signing key; after `check`, absolute.
    pub secret_file: Option<PathBuf>,
    /// `AGENT/CREDENTIAL`: sign with that credential's current value.
    pub secret_credential: Option<String>,
    /// Put the value in the body (https or loopback only).
    #[serde(default)]
    pub include_value: bool,
    /// Allow private addresses (10/8, 172.16/12, 192.168/16, 100.64/10, fc00::/7).
    #[serde(default)]
    pub allow_private: bool,
    /// Per request; default 5s.
    pub timeout: Option<String>,
}

impl WebhookConfig {
    pub fn new(url: impl Into<String>, secret_file: impl Into<PathBuf>) -> Self {
        Self {
            url: url.into(),
            secret_file: Some(secret_file.into()),
            secret_credential: None,
            include_value: false,
            allow_private: false,
            timeout: None,
        }
    }

    /// The timeout, once `check` accepted it.
    pub fn timeout(&self) -> Duration {
        duration_value(self.timeout.as_deref(), DEFAULT_TIMEOUT)
    }

    /// `secret_credential`, once `check` accepted it.
    pub fn signing_credential(&self) -> Option<CredentialKey> {
        let (a, c) = self.secret_credential.as_deref()?.split_once('/')?;
        Some(CredentialKey::new(
            AgentId::new(a).ok()?,
            CredentialId::new(c).ok()?,
        ))
    }
}

/// The problem with a webhook URL, if any. Shared by `check` and the
/// sink's constructor (which is also handed configs that were not checked,
/// by tests and tools).
pub(super) fn url_problem(url: &Url, include_value: bool, policy: Policy) -> Option<String> {
    if !matches!(url.scheme(), "http" | "https") {
        return Some("the scheme must be http or https".into());
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Some(
            "it holds a user name or password, which would end up in logs: a webhook is authenticated by its signature".into(),
        );
    }
    let Some(host) = url.host_str().filter(|h| !h.is_empty()) else {
        return Some("it has no host".into());
    };
    let literal = guard::ip_literal(host);
    if let Some(ip) = literal
        && let Err(r) = guard::check(ip, policy)
    {
        return Some(format!("its address {ip} is {}", r.why()));
    }
    if include_value && url.scheme() == "http" {
        let loopback = match literal {
            Some(ip) => guard::check(
                ip,
                Policy {
                    allow_private: true,
                    loopback_only: true,
                },
            )
            .is_ok(),
            None => host.eq_ignore_ascii_case("localhost"),
        };
        if !loopback {
            return Some(
                "`include_value = true` sends the value, so it needs https, or plain http to a loopback address (127.0.0.1, [::1], localhost)".into(),
            );
        }
    }
    None
}

impl SinkPlugin for WebhookConfig {
    fn check(&mut self, v: &mut Validator<'_>, p: Loc<'_>, scope: &mut SinkScope<'_, '_>) {
        // Several credentials may report to one receiver, so the URL is not
        // claimed as a file sink's path is.
        match Url::parse(&self.url) {
            Err(e) => v.err(
                p.key("url"),
                // Not echoed: a URL that does not parse may still hold a password.
                format!("invalid URL: {e} (write e.g. \"https://hooks.example.com/keyturn\")"),
            ),
            Ok(url) => {
                if let Some(why) = url_problem(&url, self.include_value, policy_of(self)) {
                    v.err(p.key("url"), format!("invalid webhook URL: {why}"));
                }
            }
        }
        match (&mut self.secret_file, &self.secret_credential) {
            (Some(_), Some(_)) | (None, None) => v.err_key(
                p,
                "a webhook sink signs with exactly one of `secret_file` or `secret_credential`",
            ),
            (Some(path), None) => v.resolve_path(p.key("secret_file"), path),
            (None, Some(name)) => {
                let at = p.key("secret_credential");
                match name.split_once('/') {
                    Some((a, c)) if validate_id(a).is_ok() && validate_id(c).is_ok() => {
                        if a == scope.agent && c == scope.credential {
                            v.err(
                                at,
                                format!(
                                    "`{name}` is the credential this webhook announces: the receiver could not check the signature before it had the new value; sign with another credential or a key file"
                                ),
                            );
                        } else if !scope.is_credential(a, c) {
                            v.err(
                                at,
                                format!(
                                    "unknown credential `{name}`: no [agents.{a}.credentials.{c}] in the config"
                                ),
                            );
                        } else if let Some(n) = scope.value_len(a, c)
                            && n < MIN_KEY_LEN
                        {
                            v.err(
                                at,
                                format!(
                                    "`{name}` makes values of {n} bytes; a webhook signing key needs at least {MIN_KEY_LEN} (e.g. generate = {{ kind = \"random_bytes\", length = 32 }})"
                                ),
                            );
                        }
                    }
                    _ => v.err(
                        at,
                        format!(
                            "invalid secret_credential `{name}`: write AGENT/CREDENTIAL, e.g. \"invoice-bot/webhook-key\""
                        ),
                    ),
                }
            }
        }
        if let Some(text) = &self.timeout {
            v.timeout_within(p, text, MIN_TIMEOUT, MAX_TIMEOUT);
        }
    }

    fn build(self: Box<Self>, ctx: &SinkContext<'_>) -> Result<Arc<dyn Sink>, PluginError> {
        Ok(Arc::new(WebhookSink::new(*self, ctx, None)?))
    }

    fn reads_credential(&self) -> Option<CredentialKey> {
        self.signing_credential()
    }
}

/// The address a URL's host names literally (`127.0.0.1`, `[::1]`).
pub(super) fn policy_of(cfg: &WebhookConfig) -> Policy {
    Policy {
        allow_private: cfg.allow_private,
        // Decided per request from the URL's scheme (see `WebhookSink`).
        loopback_only: false,
    }
}
