//! What the alert sinks share: the URL rules, one JSON POST, and how an
//! answer maps to an error kind.
//!
//! The connection goes through the webhook sink's guarded client (see
//! [`crate::sinks::webhook::guard`]) with private addresses allowed: an
//! alerting pipeline usually lives on the private network, but the cloud
//! metadata services and link-local addresses stay out of reach whatever a
//! DNS answer says. Redirects are never followed and no proxy from the
//! environment is used. Response bodies are never read, so nothing a
//! receiver echoes lands in logs, audit or the spool.

use std::time::Duration;

use reqwest::Url;
use reqwest::header::{CONTENT_TYPE, HeaderValue, USER_AGENT};

use crate::model::{ErrorKind, PluginError};
use crate::sinks::webhook::guard::{self, Policy};
use crate::sinks::webhook::{USER_AGENT_VALUE, chain, send_unread, shared_client};

/// Private addresses allowed, metadata and link-local refused.
pub(super) const POLICY: Policy = Policy {
    allow_private: true,
    loopback_only: false,
};

/// The problem with an alert sink's URL, if any (shared by `check` and
/// `build`, which tests call on unchecked configs).
pub(super) fn url_problem(text: &str) -> Option<String> {
    let url = match Url::parse(text) {
        Ok(u) => u,
        // Not echoed: a URL that does not parse may still hold a password.
        Err(e) => return Some(format!("it does not parse ({e})")),
    };
    if !matches!(url.scheme(), "http" | "https") {
        return Some("the scheme must be http or https".into());
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Some("it holds a user name or password, which would end up in logs".into());
    }
    let Some(host) = url.host_str().filter(|h| !h.is_empty()) else {
        return Some("it has no host".into());
    };
    if let Some(ip) = guard::ip_literal(host)
        && let Err(r) = guard::check(ip, POLICY)
    {
        return Some(format!("its address {ip} is {}", r.why()));
    }
    None
}

/// `<kind>:<scheme>://<host>[:port]<path>`: never the query or fragment,
/// which may hold a token.
pub(super) fn describe_url(kind: &str, url: &Url) -> String {
    let port = url.port().map(|p| format!(":{p}")).unwrap_or_default();
    format!(
        "{kind}:{}://{}{port}{}",
        url.scheme(),
        url.host_str().unwrap_or_default(),
        url.path()
    )
}

/// Parses a URL `check` accepted (or says why not, for unchecked configs).
pub(super) fn parse(kind: &str, text: &str) -> Result<Url, PluginError> {
    if let Some(why) = url_problem(text) {
        return Err(PluginError::new(
            ErrorKind::Invalid,
            format!("{kind} alert sink: invalid url: {why}"),
        ));
    }
    Url::parse(text).map_err(|e| PluginError::new(ErrorKind::Invalid, format!("{kind}: {e}")))
}

/// One endpoint an alert sink POSTs JSON to.
pub(super) struct Endpoint {
    pub url: Url,
    /// [`describe_url`].
    pub shown: String,
    pub timeout: Duration,
}

impl std::fmt::Debug for Endpoint {
    /// The URL without its query, which may hold a token.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.shown)
    }
}

impl Endpoint {
    /// `url`, shown as `<kind>:` [`describe_url`].
    pub fn new(kind: &str, url: Url, timeout: Duration) -> Self {
        Self {
            shown: describe_url(kind, &url),
            url,
            timeout,
        }
    }

    /// POSTs `body` with the extra `headers`. `Ok` on any 2xx; otherwise an
    /// error whose kind the manager retries by: connection errors,
    /// timeouts, 408 and 5xx transient; 429 throttled (with `Retry-After`);
    /// 401 and 403 unauthorized; 3xx (never followed) and other 4xx invalid.
    pub async fn post(
        &self,
        body: Vec<u8>,
        headers: &[(&'static str, String)],
    ) -> Result<(), PluginError> {
        guard::check_literal(&self.url, POLICY, &self.shown)?;
        let mut request = shared_client(POLICY)?
            .post(self.url.clone())
            .timeout(self.timeout)
            .header(CONTENT_TYPE, HeaderValue::from_static("application/json"))
            .header(USER_AGENT, HeaderValue::from_static(USER_AGENT_VALUE));
        for (name, value) in headers {
            request = request.header(*name, value);
        }
        let (status, after) = send_unread(request.body(body))
            .await
            .map_err(|e| self.send_error(e))?;
        if status.is_success() {
            return Ok(());
        }
        let shown = &self.shown;
        Err(match status.as_u16() {
            300..=399 => PluginError::new(
                ErrorKind::Invalid,
                format!(
                    "{shown}: answered {status} (a redirect); redirects are never followed: point `url` at the final address"
                ),
            ),
            401 | 403 => PluginError::new(
                ErrorKind::Unauthorized,
                format!("{shown}: refused with {status}"),
            ),
            429 => PluginError::new(ErrorKind::Throttled, format!("{shown}: answered {status}"))
                .with_retry_after(after),
            408 | 500..=599 => {
                PluginError::new(ErrorKind::Transient, format!("{shown}: answered {status}"))
                    .with_retry_after(after)
            }
            _ => PluginError::new(ErrorKind::Invalid, format!("{shown}: answered {status}")),
        })
    }

    fn send_error(&self, e: reqwest::Error) -> PluginError {
        // reqwest's messages name the URL, query and all.
        let e = e.without_url();
        let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&e);
        while let Some(s) = source {
            if let Some(r) = s.downcast_ref::<guard::Refused>() {
                return PluginError::new(
                    ErrorKind::Invalid,
                    format!("{}: refusing to connect: {r}", self.shown),
                );
            }
            source = s.source();
        }
        let what = if e.is_timeout() {
            format!(
                "no answer within {}",
                humantime::format_duration(self.timeout)
            )
        } else if e.is_connect() {
            "cannot connect".to_owned()
        } else {
            "request failed".to_owned()
        };
        PluginError::new(
            ErrorKind::Transient,
            format!("{}: {what}: {}", self.shown, chain(&e)),
        )
    }
}
