//! The `alertmanager` alert sink: Alertmanager's v2 API,
//! `POST /api/v2/alerts`, the way Prometheus sends alerts.
//!
//! ```toml
//! [alerts.am]
//! type = "alertmanager"
//! url = "http://alertmanager.internal:9093"   # or .../api/v2/alerts
//! severities = ["warning", "critical"]         # optional routing filters
//! ```
//!
//! `url` is either Alertmanager's base URL (`/api/v2/alerts` is appended
//! to its path, so a path prefix such as `/alertmanager` is kept) or the
//! endpoint itself (a path ending in `/api/v2/alerts`).
//!
//! **What is sent.** A JSON array of one `postableAlert`: labels
//! `alertname`, `severity`, `source = "keyturn"` and, when the alert has
//! them, `agent`, `credential`, `tenant`, `tier`, `mode` (`follow` on a
//! followed credential's alerts); annotations `summary`
//! and `description`; `startsAt` = when the condition began. While firing,
//! `endsAt` = now + 4 × the resend interval and the alert is sent again
//! every [`RESEND_INTERVAL`], as Prometheus does: Alertmanager keeps it
//! open while keyturn keeps sending, and resolves it by itself some minutes
//! after keyturn stopped (so an alert never stays open forever behind a
//! dead sender). A resolve sends the same labels with `endsAt` = the time
//! the condition ended; Alertmanager matches by labels, so it closes the
//! alert it has. `severity` is a label, so when a condition changes
//! severity (a warning that escalates to critical) the request that fires
//! the new severity also ends the old one (`endsAt` = now): Alertmanager
//! holds one alert per condition, at its current severity.

use super::http::{self, Endpoint};
use super::*;

/// How often a firing alert is sent again (Prometheus' default
/// `resend_delay` is 1 minute).
pub const RESEND_INTERVAL: Duration = Duration::from_secs(60);
/// The endpoint's path.
pub const API_PATH: &str = "/api/v2/alerts";

/// `[alerts.NAME]` with `type = "alertmanager"`.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlertmanagerConfig {
    /// Alertmanager's base URL, or its `/api/v2/alerts` endpoint.
    pub url: String,
    /// `warning`, `critical` (absent: both).
    pub severities: Option<Vec<String>>,
    pub tiers: Option<Vec<String>>,
    pub tenants: Option<Vec<String>>,
    /// Per request; default 5s.
    pub timeout: Option<String>,
}

impl AlertmanagerConfig {
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            ..Default::default()
        }
    }
}

common_keys!(AlertmanagerConfig);

impl AlertSinkPlugin for AlertmanagerConfig {
    fn check(&mut self, v: &mut Validator<'_>, p: Loc<'_>, scope: &AlertScope<'_>) {
        if let Some(why) = http::url_problem(&self.url) {
            v.err(
                p.key("url"),
                format!(
                    "invalid Alertmanager URL: {why} (write e.g. \"http://alertmanager.internal:9093\")"
                ),
            );
        } else if let Some(why) = api_path_problem(&self.url) {
            v.err(p.key("url"), why);
        }
        self.common().check(v, p, scope);
    }

    fn route(&self) -> Route {
        self.common().route()
    }

    fn build(self: Box<Self>, _name: &str) -> Result<Arc<dyn AlertSink>, PluginError> {
        Ok(Arc::new(AlertmanagerSink::new(&self)?))
    }
}

/// The sink.
#[derive(Debug)]
pub struct AlertmanagerSink {
    endpoint: Endpoint,
    resend: Duration,
}

/// A URL naming an API path other than [`API_PATH`] (`/api/v1/alerts`,
/// the v1 API Alertmanager 0.27 removed): black-box finding, it was taken
/// for a base URL, and alerts went to `/api/v1/alerts/api/v2/alerts`. A
/// base URL with a path of its own (a `--web.route-prefix`) is fine.
fn api_path_problem(url: &str) -> Option<String> {
    let path = reqwest::Url::parse(url)
        .ok()?
        .path()
        .trim_end_matches('/')
        .to_owned();
    (path.contains("/api/") && !path.ends_with(API_PATH)).then(|| {
        format!(
            "Alertmanager URL `{url}` names the API path `{path}`: give its base URL (e.g. \"http://alertmanager.internal:9093\") or its `{API_PATH}` endpoint (the v1 API is gone from Alertmanager 0.27 on)"
        )
    })
}

impl AlertmanagerSink {
    pub fn new(cfg: &AlertmanagerConfig) -> Result<Self, PluginError> {
        if let Some(why) = api_path_problem(&cfg.url) {
            return Err(PluginError::new(ErrorKind::Invalid, why));
        }
        let mut url = http::parse("alertmanager", &cfg.url)?;
        if !url.path().trim_end_matches('/').ends_with(API_PATH) {
            let path = format!("{}{API_PATH}", url.path().trim_end_matches('/'));
            url.set_path(&path);
        }
        Ok(Self {
            endpoint: Endpoint::new("alertmanager", url, cfg.common().timeout()),
            resend: RESEND_INTERVAL,
        })
    }

    /// The same sink re-sending every `resend` (tests).
    pub fn with_resend_interval(mut self, resend: Duration) -> Self {
        self.resend = resend;
        self
    }

    /// The endpoint alerts are POSTed to.
    pub fn endpoint(&self) -> &reqwest::Url {
        &self.endpoint.url
    }

    /// Posts each alert with its `endsAt`, in one request.
    async fn send(&self, alerts: &[(&Alert, DateTime<Utc>)]) -> Result<(), PluginError> {
        let postable: Vec<Postable> = alerts
            .iter()
            .map(|(alert, ends_at)| Postable {
                labels: labels(alert),
                annotations: annotations(alert),
                starts_at: alert.since,
                ends_at: *ends_at,
            })
            .collect();
        let body = serde_json::to_vec(&postable)
            .map_err(|e| PluginError::new(ErrorKind::Fatal, format!("encoding the alert: {e}")))?;
        self.endpoint.post(body, &[]).await
    }
}

use crate::model::ErrorKind;

/// One `postableAlert` of the v2 API.
#[derive(Serialize)]
struct Postable {
    labels: BTreeMap<&'static str, String>,
    annotations: BTreeMap<&'static str, String>,
    #[serde(rename = "startsAt")]
    starts_at: DateTime<Utc>,
    #[serde(rename = "endsAt")]
    ends_at: DateTime<Utc>,
}

/// The labels of an alert, as Alertmanager and the webhook payload carry them.
pub fn labels(alert: &Alert) -> BTreeMap<&'static str, String> {
    let mut l = BTreeMap::new();
    l.insert("alertname", alert.name.clone());
    l.insert("severity", alert.severity.as_str().to_owned());
    l.insert("source", "keyturn".to_owned());
    for (k, v) in [
        ("agent", &alert.agent),
        ("credential", &alert.credential),
        ("tenant", &alert.tenant),
        ("tier", &alert.tier),
        ("mode", &alert.mode),
    ] {
        if let Some(v) = v {
            l.insert(k, v.clone());
        }
    }
    l
}

/// The annotations of an alert.
pub fn annotations(alert: &Alert) -> BTreeMap<&'static str, String> {
    BTreeMap::from([
        ("summary", alert.summary.clone()),
        ("description", alert.description.clone()),
    ])
}

#[async_trait]
impl AlertSink for AlertmanagerSink {
    fn describe(&self) -> String {
        self.endpoint.shown.clone()
    }

    fn kind(&self) -> &'static str {
        "alertmanager"
    }

    fn resend_interval(&self) -> Option<Duration> {
        Some(self.resend)
    }

    /// The alert, and for a severity change the alert it replaces, ended
    /// now: Alertmanager tells the two apart by their `severity` label.
    async fn fire(&self, notice: &Notice<'_>) -> Result<(), PluginError> {
        let now = Utc::now();
        let ends_at =
            now + chrono::Duration::from_std(self.resend * 4).unwrap_or(chrono::Duration::MAX);
        let alerts: Vec<(&Alert, DateTime<Utc>)> = notice
            .firing(now)
            .into_iter()
            .map(|(alert, ended)| (alert, ended.unwrap_or(ends_at)))
            .collect();
        self.send(&alerts).await
    }

    async fn resolve(
        &self,
        notice: &Notice<'_>,
        ended_at: DateTime<Utc>,
    ) -> Result<(), PluginError> {
        self.send(&[(notice.alert, ended_at)]).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_base_url_and_the_endpoint_are_both_accepted() {
        for (written, endpoint) in [
            (
                "http://127.0.0.1:9093",
                "http://127.0.0.1:9093/api/v2/alerts",
            ),
            (
                "http://127.0.0.1:9093/",
                "http://127.0.0.1:9093/api/v2/alerts",
            ),
            (
                "http://127.0.0.1:9093/api/v2/alerts",
                "http://127.0.0.1:9093/api/v2/alerts",
            ),
            (
                "http://am.internal/prefix/",
                "http://am.internal/prefix/api/v2/alerts",
            ),
        ] {
            let sink = AlertmanagerSink::new(&AlertmanagerConfig::new(written)).unwrap();
            assert_eq!(sink.endpoint().as_str(), endpoint, "{written}");
        }
    }

    #[test]
    fn metadata_addresses_and_passwords_in_the_url_are_refused() {
        for bad in [
            "http://169.254.169.254/",
            "http://user:pw@127.0.0.1:9093",
            "ftp://127.0.0.1",
            // The v1 API, taken for a base URL (black-box finding).
            "http://127.0.0.1:9093/api/v1/alerts",
        ] {
            let e = AlertmanagerSink::new(&AlertmanagerConfig::new(bad)).unwrap_err();
            assert_eq!(e.kind, ErrorKind::Invalid, "{bad}");
            assert!(!e.message.contains("pw"), "{e}");
        }
    }
}
