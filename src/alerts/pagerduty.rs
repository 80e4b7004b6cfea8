//! The `pagerduty` alert sink: PagerDuty's Events API v2.
//!
//! ```toml
//! [alerts.pd]
//! type = "pagerduty"
//! routing_key_file = "/etc/keyturn/pagerduty.key"   # mode 0600
//! severities = ["critical"]
//! # url = "https://events.pagerduty.com/v2/enqueue" (the default)
//! ```
//!
//! **What is sent.** `POST url` with `{routing_key, event_action, dedup_key,
//! payload, client}`. A fire is `event_action = "trigger"` with `payload`
//! `{summary (at most 1024 characters), source = "keyturn", severity
//! (critical or warning), timestamp, component = agent, group = tenant,
//! class = alertname, custom_details {agent, credential, tenant, tier,
//! mode (a followed credential's alert: `follow`), description}}`; a resolve is `event_action = "resolve"` with the same
//! `dedup_key` ([`Alert::incident_key`]: one per condition, agent and
//! credential, whatever the severity), which is how PagerDuty ties the two
//! to one incident. PagerDuty treats a second trigger with the key of an
//! open incident as the same incident, so a fire is sent once (no
//! re-sending): a retried or repeated trigger never opens a second one. A
//! condition that escalates (a warning at two failed rotations, critical
//! at five) is sent a second trigger with the new severity, which updates
//! the incident; the warning's end does not resolve it, only the
//! condition's.
//!
//! **Answers.** 202 is success; 429 is retried after `Retry-After` (or the
//! backoff), 5xx and connection errors are retried, 400 (an event PagerDuty
//! refuses) is given up and audited: tried again only every few minutes and
//! at a reload, and a trigger PagerDuty never accepted is neither sent nor
//! resolved once its condition has ended (see the manager).
//!
//! **The key** is read from `routing_key_file` when the sink is built (at
//! start and reload): a regular file, no access for group and others, one
//! trailing newline ignored. It lives only in a [`SecretValue`] and in the
//! request body, built in a buffer wiped on drop.

use std::path::PathBuf;

use zeroize::Zeroizing;

use super::http::{self, Endpoint};
use super::*;
use crate::model::{ErrorKind, SecretValue};

/// `url` when unset: the public Events API v2 endpoint.
pub const DEFAULT_URL: &str = "https://events.pagerduty.com/v2/enqueue";
/// The longest `payload.summary` PagerDuty takes.
pub const MAX_SUMMARY: usize = 1024;

/// `[alerts.NAME]` with `type = "pagerduty"`.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PagerdutyConfig {
    /// The integration's routing key; after `check`, absolute.
    pub routing_key_file: PathBuf,
    /// Default [`DEFAULT_URL`].
    pub url: Option<String>,
    /// `warning`, `critical` (absent: both).
    pub severities: Option<Vec<String>>,
    pub tiers: Option<Vec<String>>,
    pub tenants: Option<Vec<String>>,
    /// Per request; default 5s.
    pub timeout: Option<String>,
}

impl PagerdutyConfig {
    pub fn new(routing_key_file: impl Into<PathBuf>) -> Self {
        Self {
            routing_key_file: routing_key_file.into(),
            ..Default::default()
        }
    }
}

common_keys!(PagerdutyConfig);

impl AlertSinkPlugin for PagerdutyConfig {
    fn check(&mut self, v: &mut Validator<'_>, p: Loc<'_>, scope: &AlertScope<'_>) {
        v.resolve_path(p.key("routing_key_file"), &mut self.routing_key_file);
        if let Some(url) = &self.url
            && let Some(why) = http::url_problem(url)
        {
            v.err(
                p.key("url"),
                format!("invalid PagerDuty URL: {why} (write e.g. \"{DEFAULT_URL}\")"),
            );
        }
        self.common().check(v, p, scope);
    }

    fn route(&self) -> Route {
        self.common().route()
    }

    fn build(self: Box<Self>, _name: &str) -> Result<Arc<dyn AlertSink>, PluginError> {
        Ok(Arc::new(PagerdutySink::new(&self)?))
    }
}

/// The sink.
pub struct PagerdutySink {
    endpoint: Endpoint,
    routing_key: SecretValue,
}

impl std::fmt::Debug for PagerdutySink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PagerdutySink")
            .field("endpoint", &self.endpoint)
            .field("routing_key", &"...")
            .finish()
    }
}

impl PagerdutySink {
    /// Reads the routing key file.
    pub fn new(cfg: &PagerdutyConfig) -> Result<Self, PluginError> {
        let url = http::parse("pagerduty", cfg.url.as_deref().unwrap_or(DEFAULT_URL))?;
        let routing_key = crate::sinks::webhook::read_secret_file(
            &cfg.routing_key_file,
            "PagerDuty routing key file",
            1,
            "it must hold the integration's routing key",
        )?;
        if routing_key.expose_str().is_none() {
            return Err(PluginError::new(
                ErrorKind::Invalid,
                format!(
                    "PagerDuty routing key file {}: the key is not UTF-8 text",
                    cfg.routing_key_file.display()
                ),
            ));
        }
        Ok(Self {
            endpoint: Endpoint::new("pagerduty", url, cfg.common().timeout()),
            routing_key,
        })
    }

    async fn send(&self, event: Event<'_>) -> Result<(), PluginError> {
        let mut body = Zeroizing::new(Vec::with_capacity(4096));
        serde_json::to_writer(&mut *body, &event)
            .map_err(|e| PluginError::new(ErrorKind::Fatal, format!("encoding the event: {e}")))?;
        // reqwest takes the body by value: this copy is the request's.
        self.endpoint.post(body.to_vec(), &[]).await
    }

    fn key(&self) -> &str {
        // Checked to be UTF-8 in `new`.
        self.routing_key.expose_str().unwrap_or_default()
    }
}

/// An Events API v2 event.
#[derive(Serialize)]
struct Event<'a> {
    routing_key: &'a str,
    event_action: &'static str,
    dedup_key: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    payload: Option<Payload<'a>>,
    client: &'static str,
}

#[derive(Serialize)]
struct Payload<'a> {
    summary: &'a str,
    source: &'static str,
    severity: &'static str,
    timestamp: DateTime<Utc>,
    #[serde(skip_serializing_if = "Option::is_none")]
    component: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    group: Option<&'a str>,
    class: &'a str,
    custom_details: Details<'a>,
}

#[derive(Serialize)]
struct Details<'a> {
    agent: Option<&'a str>,
    credential: Option<&'a str>,
    tenant: Option<&'a str>,
    tier: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    mode: Option<&'a str>,
    description: &'a str,
}

/// At most [`MAX_SUMMARY`] characters, cut at a character boundary.
fn summary(text: &str) -> &str {
    match text.char_indices().nth(MAX_SUMMARY) {
        Some((i, _)) => &text[..i],
        None => text,
    }
}

#[async_trait]
impl AlertSink for PagerdutySink {
    fn describe(&self) -> String {
        self.endpoint.shown.clone()
    }

    fn kind(&self) -> &'static str {
        "pagerduty"
    }

    /// A trigger; for a severity change (`replaces`) the same trigger,
    /// whose `dedup_key` updates the open incident's severity.
    async fn fire(&self, notice: &Notice<'_>) -> Result<(), PluginError> {
        let alert = notice.alert;
        self.send(Event {
            routing_key: self.key(),
            event_action: "trigger",
            dedup_key: notice.key,
            payload: Some(Payload {
                summary: summary(&alert.summary),
                source: "keyturn",
                severity: alert.severity.as_str(),
                timestamp: alert.since,
                component: alert.agent.as_deref(),
                group: alert.tenant.as_deref(),
                class: &alert.name,
                custom_details: Details {
                    agent: alert.agent.as_deref(),
                    credential: alert.credential.as_deref(),
                    tenant: alert.tenant.as_deref(),
                    tier: alert.tier.as_deref(),
                    mode: alert.mode.as_deref(),
                    description: &alert.description,
                },
            }),
            client: "keyturn",
        })
        .await
    }

    async fn resolve(
        &self,
        notice: &Notice<'_>,
        _ended_at: DateTime<Utc>,
    ) -> Result<(), PluginError> {
        self.send(Event {
            routing_key: self.key(),
            event_action: "resolve",
            dedup_key: notice.key,
            payload: None,
            client: "keyturn",
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summaries_are_cut_at_1024_characters_on_a_boundary() {
        let long = "é".repeat(2000);
        assert_eq!(summary(&long).chars().count(), MAX_SUMMARY);
        assert_eq!(summary("short"), "short");
    }

    #[test]
    fn a_key_file_others_can_read_is_refused_and_the_key_never_shows() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pd.key");
        std::fs::write(&path, "canary-routing-key-0123456789abcd\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = PagerdutySink::new(&PagerdutyConfig::new(&path)).unwrap_err();
        assert!(e.message.contains("chmod 600"), "{e}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let sink = PagerdutySink::new(&PagerdutyConfig::new(&path)).unwrap();
        assert_eq!(sink.key(), "canary-routing-key-0123456789abcd");
        assert!(!format!("{sink:?}").contains("canary"));
        assert_eq!(
            sink.describe(),
            "pagerduty:https://events.pagerduty.com/v2/enqueue"
        );
    }
}
