//! The `webhook` alert sink: Alertmanager's webhook payload (version
//! "4"), signed like the webhook sink, so any pipeline that already takes
//! Alertmanager webhooks takes keyturn's alerts.
//!
//! ```toml
//! [alerts.hook]
//! type = "webhook"
//! url = "https://alerts.example.com/keyturn"
//! secret_file = "/etc/keyturn/alert-hook.key"   # >= 32 bytes, mode 0600
//! ```
//!
//! **What is sent.** `POST url` with one alert per request (two when the
//! severity changes, below):
//! `{version: "4", groupKey, truncatedAlerts: 0, status, receiver (the
//! NAME of [alerts.NAME]), groupLabels {alertname}, commonLabels,
//! commonAnnotations, externalURL: "", alerts: [{status, labels,
//! annotations, startsAt, endsAt, generatorURL: "", fingerprint}]}`:
//! status `firing` (endsAt Alertmanager's zero time) or `resolved` (endsAt
//! the end), the labels and annotations of the `alertmanager` sink, and a
//! fingerprint that is the same for every notification of one condition
//! at one severity. When the condition changes severity, the notification
//! that fires the new severity also carries the old one, `resolved` (the
//! payload's `status` is `firing`; `commonLabels` then lack `severity`),
//! as Alertmanager would notify it.
//! The signature header is the webhook sink's:
//! `Keyturn-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(key, "<t>.<body>")>`
//! ([`crate::sinks::webhook::sign`]); the key is read from `secret_file`
//! at every request (the webhook sink's rules: at least 32 bytes, no
//! access for group and others). A firing alert is sent once, a resolve
//! once, as Alertmanager notifies a webhook.

use std::path::PathBuf;

use sha2::Digest;

use super::alertmanager::{annotations, labels};
use super::http::{self, Endpoint};
use super::*;
use crate::model::{ErrorKind, SecretValue};
use crate::sinks::webhook::{MIN_KEY_LEN, SIGNATURE_HEADER, read_secret_file, sign};

/// `[alerts.NAME]` with `type = "webhook"`.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlertWebhookConfig {
    pub url: String,
    /// The HMAC key; after `check`, absolute.
    pub secret_file: PathBuf,
    /// `warning`, `critical` (absent: both).
    pub severities: Option<Vec<String>>,
    pub tiers: Option<Vec<String>>,
    pub tenants: Option<Vec<String>>,
    /// Per request; default 5s.
    pub timeout: Option<String>,
}

impl AlertWebhookConfig {
    pub fn new(url: impl Into<String>, secret_file: impl Into<PathBuf>) -> Self {
        Self {
            url: url.into(),
            secret_file: secret_file.into(),
            ..Default::default()
        }
    }
}

common_keys!(AlertWebhookConfig);

impl AlertSinkPlugin for AlertWebhookConfig {
    fn check(&mut self, v: &mut Validator<'_>, p: Loc<'_>, scope: &AlertScope<'_>) {
        if let Some(why) = http::url_problem(&self.url) {
            v.err(
                p.key("url"),
                format!(
                    "invalid webhook URL: {why} (write e.g. \"https://alerts.example.com/keyturn\")"
                ),
            );
        }
        v.resolve_path(p.key("secret_file"), &mut self.secret_file);
        self.common().check(v, p, scope);
    }

    fn route(&self) -> Route {
        self.common().route()
    }

    fn build(self: Box<Self>, name: &str) -> Result<Arc<dyn AlertSink>, PluginError> {
        Ok(Arc::new(AlertWebhookSink::new(&self, name)?))
    }
}

/// The sink.
#[derive(Debug)]
pub struct AlertWebhookSink {
    endpoint: Endpoint,
    secret_file: PathBuf,
    receiver: String,
}

impl AlertWebhookSink {
    /// Reads the key once, so a missing or weak key fails at start.
    pub fn new(cfg: &AlertWebhookConfig, receiver: &str) -> Result<Self, PluginError> {
        let url = http::parse("webhook", &cfg.url)?;
        let sink = Self {
            endpoint: Endpoint::new("alert-webhook", url, cfg.common().timeout()),
            secret_file: cfg.secret_file.clone(),
            receiver: receiver.to_owned(),
        };
        read_key(&sink.secret_file)?;
        Ok(sink)
    }

    async fn send(&self, alerts: &[(&Alert, Option<DateTime<Utc>>)]) -> Result<(), PluginError> {
        let body = serde_json::to_vec(&payload(&self.receiver, alerts))
            .map_err(|e| PluginError::new(ErrorKind::Fatal, format!("encoding the alert: {e}")))?;
        let path = self.secret_file.clone();
        let key = tokio::task::spawn_blocking(move || read_key(&path))
            .await
            .map_err(|e| {
                PluginError::new(ErrorKind::Transient, format!("reading the key: {e}"))
            })??;
        let signature = sign(key.expose(), Utc::now().timestamp(), &body);
        drop(key);
        self.endpoint
            .post(body, &[(SIGNATURE_HEADER, signature)])
            .await
    }
}

/// The signing key, read now (a replaced file takes effect at once).
fn read_key(path: &std::path::Path) -> Result<SecretValue, PluginError> {
    read_secret_file(
        path,
        "alert webhook key file",
        MIN_KEY_LEN,
        &format!("a webhook key must be at least {MIN_KEY_LEN} (e.g. `openssl rand -hex 32`)"),
    )
}

/// Alertmanager's zero time, its `endsAt` of a firing alert in webhooks.
const ZERO_TIME: &str = "0001-01-01T00:00:00Z";

/// The version-4 webhook payload of `alerts` (of one condition), each
/// firing (`None`) or resolved at the time given.
pub fn payload(receiver: &str, alerts: &[(&Alert, Option<DateTime<Utc>>)]) -> serde_json::Value {
    let firing = alerts.iter().any(|(_, ended)| ended.is_none());
    let status = |firing: bool| if firing { "firing" } else { "resolved" };
    // Alertmanager's commonLabels and commonAnnotations: those every
    // alert of the notification has, with the same value.
    let common = |each: &dyn Fn(&Alert) -> BTreeMap<&'static str, String>| {
        let mut all = alerts.iter().map(|(a, _)| each(a));
        let mut common = all.next().unwrap_or_default();
        for other in all {
            common.retain(|k, v| other.get(k) == Some(v));
        }
        common
    };
    let name = alerts
        .first()
        .map(|(a, _)| a.name.as_str())
        .unwrap_or_default();
    let items: Vec<serde_json::Value> = alerts
        .iter()
        .map(|(alert, ended)| {
            serde_json::json!({
                "status": status(ended.is_none()),
                "labels": labels(alert),
                "annotations": annotations(alert),
                "startsAt": alert.since.to_rfc3339(),
                "endsAt": ended.map_or_else(|| ZERO_TIME.to_owned(), |t| t.to_rfc3339()),
                "generatorURL": "",
                "fingerprint": fingerprint(alert),
            })
        })
        .collect();
    serde_json::json!({
        "version": "4",
        "groupKey": format!("{{}}:{{alertname={name:?}}}"),
        "truncatedAlerts": 0,
        "status": status(firing),
        "receiver": receiver,
        "groupLabels": { "alertname": name },
        "commonLabels": common(&labels),
        "commonAnnotations": common(&annotations),
        "externalURL": "",
        "alerts": items,
    })
}

/// 16 hex digits naming the condition at its severity (Alertmanager's
/// fingerprint is a 64-bit hash of the label set, `severity` included;
/// this one is of the dedup key).
pub fn fingerprint(alert: &Alert) -> String {
    let digest = sha2::Sha256::digest(alert.dedup_key().as_bytes());
    hex::encode(&digest[..8])
}

#[async_trait]
impl AlertSink for AlertWebhookSink {
    fn describe(&self) -> String {
        self.endpoint.shown.clone()
    }

    fn kind(&self) -> &'static str {
        "webhook"
    }

    /// The alert firing, and for a severity change the alert it replaces
    /// resolved now, in one notification.
    async fn fire(&self, notice: &Notice<'_>) -> Result<(), PluginError> {
        self.send(&notice.firing(Utc::now())).await
    }

    async fn resolve(
        &self,
        notice: &Notice<'_>,
        ended_at: DateTime<Utc>,
    ) -> Result<(), PluginError> {
        self.send(&[(notice.alert, Some(ended_at))]).await
    }
}
