//! The `webhook` sink: POSTs a signed JSON notice of each new version to a
//! receiver (usually the agent itself, or something that restarts it).
//!
//! ```toml
//! deliver = [
//!   { type = "file", path = "/run/keyturn/agents/invoice-bot/db", format = "json" },
//!   { type = "webhook", url = "http://127.0.0.1:8080/rotated", secret_file = "/etc/keyturn/hook.key" },
//! ]
//! ```
//!
//! **The request.** `POST url` with `Content-Type: application/json`,
//! `User-Agent: keyturn/<version>`, `Idempotency-Key: <rotation id>` (a
//! retried delivery carries the same one) and
//! `Keyturn-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(key, "<t>.<body>")>`,
//! the Stripe / Standard Webhooks shape: the receiver recomputes the HMAC
//! over the exact bytes it received and refuses a timestamp older than its
//! tolerance (5 minutes in `examples/webhook_receiver.py`), so a captured
//! request cannot be replayed later. The body is [`Body`]: names, versions
//! and times, never the value unless `include_value = true`.
//!
//! **The key** is the content of `secret_file` (read at every delivery,
//! so replacing the file takes effect at once; at least [`MIN_KEY_LEN`]
//! bytes, no access for group and others, one trailing newline ignored) or
//! the current value of the keyturn credential `secret_credential`.
//!
//! **Where it may go.** See [`guard`]: the name is resolved once, every
//! address is checked (no link-local, metadata, private unless
//! `allow_private`), and the connection is pinned to the checked addresses.
//! Redirects are never followed (a 3xx fails the delivery): a receiver
//! could otherwise send the request, and the value, anywhere. No proxy from
//! the environment is used either, for the same reason.
//!
//! **Outcome.** A 2xx is an acknowledgement (the receiver has the notice).
//! Anything else fails the delivery with a kind the engine retries by (the
//! sink itself never retries): 5xx, 408, timeouts and connection errors are
//! transient, 429 throttled (honouring `Retry-After`), 401/403 unauthorized,
//! other 4xx and 3xx invalid. Response bodies are never read: an error says
//! the status only, so nothing a receiver echoes lands in logs or state.

use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, LazyLock, Mutex, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use hmac::{Hmac, KeyInit, Mac};
use reqwest::Url;
use reqwest::header::{CONTENT_TYPE, HeaderValue, RETRY_AFTER, USER_AGENT};
use zeroize::Zeroizing;

use super::{CurrentValue, Delivered, Notice, Sink, SinkContext, SinkPlugin};
use crate::config::validate::{Loc, SinkScope, Validator, duration_value};
use crate::model::{
    AgentId, CredentialId, CredentialKey, ErrorKind, PluginError, SecretValue, validate_id,
};

mod config;
pub mod guard;
#[cfg(test)]
mod tests;

pub use config::{DEFAULT_TIMEOUT, MAX_TIMEOUT, MIN_TIMEOUT, WebhookConfig};
use guard::{Lookup, Policy, Refused};

/// The signature header.
pub const SIGNATURE_HEADER: &str = "Keyturn-Signature";
/// The shortest signing key: 256 bits, the HMAC-SHA256 output size (a
/// shorter key makes the HMAC no stronger than the key).
pub const MIN_KEY_LEN: usize = 32;
/// The longest key file read.
const MAX_KEY_LEN: usize = 4096;
/// The longest `Retry-After` honoured (the engine caps it too).
const MAX_RETRY_AFTER: Duration = Duration::from_secs(300);

/// `t=<unix seconds>,v1=<hex HMAC-SHA256(key, "<t>.<body>")>`.
pub fn sign(key: &[u8], t: i64, body: &[u8]) -> String {
    format!("t={t},v1={}", hex::encode(mac(key, t, body)))
}

/// [`sign`], then one more `v1=` made with `also` (a key credential's
/// previous value in its grace: a receiver that has not got the new key
/// yet verifies with the one it has).
fn sign_with(key: &[u8], also: Option<&[u8]>, t: i64, body: &[u8]) -> String {
    let mut header = sign(key, t, body);
    if let Some(other) = also {
        header.push_str(",v1=");
        header.push_str(&hex::encode(mac(other, t, body)));
    }
    header
}

fn mac(key: &[u8], t: i64, body: &[u8]) -> [u8; 32] {
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(key).expect("HMAC takes keys of any length");
    mac.update(t.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    mac.finalize().into_bytes().into()
}

/// Why a signature does not verify.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadSignature {
    #[error("the signature header is malformed")]
    Malformed,
    #[error("the timestamp is outside the tolerance")]
    Stale,
    #[error("no v1 signature matches")]
    Mismatch,
}

/// What a receiver does (the reference is `examples/webhook_receiver.py`):
/// the timestamp is within `tolerance` of `now`, and one of the header's
/// `v1=` signatures is the HMAC of `"<t>.<body>"`, compared in constant time.
pub fn verify(
    key: &[u8],
    header: &str,
    body: &[u8],
    now: i64,
    tolerance: Duration,
) -> Result<(), BadSignature> {
    let mut t = None;
    let mut sigs = Vec::new();
    for part in header.split(',') {
        match part.trim().split_once('=') {
            Some(("t", v)) => t = v.parse::<i64>().ok(),
            Some(("v1", v)) => sigs.push(hex::decode(v).map_err(|_| BadSignature::Malformed)?),
            _ => {}
        }
    }
    let t = t.ok_or(BadSignature::Malformed)?;
    if now.abs_diff(t) > tolerance.as_secs() {
        return Err(BadSignature::Stale);
    }
    let ok = sigs.iter().any(|s| {
        let mut m =
            Hmac::<sha2::Sha256>::new_from_slice(key).expect("HMAC takes keys of any length");
        m.update(t.to_string().as_bytes());
        m.update(b".");
        m.update(body);
        m.verify_slice(s).is_ok()
    });
    if ok {
        Ok(())
    } else {
        Err(BadSignature::Mismatch)
    }
}

/// The JSON body: the notice, and the value only with `include_value`.
#[derive(serde::Serialize)]
pub struct Body<'a> {
    pub agent: &'a str,
    pub credential: &'a str,
    pub tenant: &'a str,
    pub version: u64,
    pub previous_version: Option<u64>,
    /// The rotation id (also the `Idempotency-Key`).
    pub rotation: &'a str,
    pub rotated_at: DateTime<Utc>,
    /// Until when the previous version keeps working.
    pub grace_until: Option<DateTime<Utc>>,
    /// Where the credential's file sink delivered the value.
    pub file: Option<&'a Path>,
    /// The user name this version logs in as, when the target decides it.
    pub login: Option<&'a str>,
    /// `password`, `random_bytes`, `api_key`, `ed25519`.
    pub kind: &'a str,
    /// The public key of a keypair (not secret).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub public: Option<&'a str>,
    /// The value as the file sink writes it raw (a keypair: the private
    /// key PEM); only with `include_value = true`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub value: Option<&'a str>,
}

/// Where the signing key comes from.
enum KeySource {
    File(PathBuf),
    Credential(CredentialKey, Arc<dyn CurrentValue>),
}

pub struct WebhookSink {
    url: Url,
    /// `describe()`: the URL without its query, which may hold a token.
    shown: String,
    key: KeySource,
    include_value: bool,
    policy: Policy,
    timeout: Duration,
    lookup: Arc<dyn Lookup>,
    /// Only for a test's own [`Lookup`]: sinks using the system resolver
    /// share one client per policy ([`shared_client`]).
    own_client: bool,
    client: OnceLock<reqwest::Client>,
}

impl WebhookSink {
    pub(super) fn new(
        cfg: WebhookConfig,
        ctx: &SinkContext<'_>,
        lookup: Option<Arc<dyn Lookup>>,
    ) -> Result<Self, PluginError> {
        let invalid = |why: String| PluginError::new(ErrorKind::Invalid, why);
        let url =
            Url::parse(&cfg.url).map_err(|e| invalid(format!("webhook sink: invalid URL: {e}")))?;
        let shown = describe_url(&url);
        let include_value = cfg.include_value;
        let policy = Policy {
            allow_private: cfg.allow_private,
            // The value crosses the network in clear only to loopback.
            loopback_only: include_value && url.scheme() == "http",
        };
        if let Some(why) = config::url_problem(&url, include_value, config::policy_of(&cfg)) {
            return Err(invalid(format!("{shown}: invalid webhook URL: {why}")));
        }
        let key = match (&cfg.secret_file, cfg.signing_credential()) {
            (Some(path), None) => KeySource::File(path.clone()),
            (None, Some(cred)) => match ctx.reader {
                Some(r) => KeySource::Credential(cred, r.clone()),
                None => {
                    return Err(invalid(format!(
                        "{shown}: secret_credential {cred} is not a configured credential"
                    )));
                }
            },
            _ => {
                return Err(invalid(format!(
                    "{shown}: needs exactly one of secret_file or secret_credential"
                )));
            }
        };
        let own_client = lookup.is_some();
        let lookup = lookup.unwrap_or_else(system_lookup);
        Ok(Self {
            timeout: cfg.timeout(),
            url,
            shown,
            key,
            include_value,
            policy,
            lookup,
            own_client,
            client: OnceLock::new(),
        })
    }

    fn client(&self) -> Result<reqwest::Client, PluginError> {
        let plain = self.url.scheme() == "http";
        if !self.own_client {
            return shared_client_for(self.policy, plain);
        }
        if let Some(c) = self.client.get() {
            return Ok(c.clone());
        }
        let c = build_client(self.lookup.clone(), self.policy, plain)?;
        Ok(self.client.get_or_init(|| c).clone())
    }

    /// The signing key, read now (a replaced key file or a rotated key
    /// credential takes effect at the next delivery).
    async fn signing_key(&self) -> Result<SecretValue, PluginError> {
        match &self.key {
            KeySource::File(path) => {
                let path = path.clone();
                tokio::task::spawn_blocking(move || read_key_file(&path))
                    .await
                    .map_err(|e| {
                        PluginError::new(ErrorKind::Transient, format!("reading the key: {e}"))
                    })?
            }
            KeySource::Credential(cred, reader) => {
                let key = reader.current().await.map_err(|e| {
                    PluginError::new(
                        e.kind,
                        format!("{}: signing key: {}", self.shown, e.message),
                    )
                    .with_retry_after(e.retry_after)
                })?;
                if key.len() < MIN_KEY_LEN {
                    return Err(PluginError::new(
                        ErrorKind::Invalid,
                        format!(
                            "{}: the signing key credential {cred} is {} bytes long; a webhook key must be at least {MIN_KEY_LEN}",
                            self.shown,
                            key.len()
                        ),
                    ));
                }
                Ok(key)
            }
        }
    }

    /// A key credential's previous value while it is in its grace: the key
    /// credential and this sink's credential may rotate together (`keyturn
    /// rotate AGENT`, one schedule), and the notice may then go out before
    /// the key's own file reached the receiver. Best effort: without it the
    /// notice is signed with the current key alone, as with a key file.
    async fn previous_signing_key(&self) -> Option<SecretValue> {
        let KeySource::Credential(cred, reader) = &self.key else {
            return None;
        };
        match reader.previous().await {
            Ok(key) => key.filter(|k| k.len() >= MIN_KEY_LEN),
            Err(e) => {
                tracing::debug!(sink = %self.shown, credential = %cred, error = %e, "the signing key's previous version cannot be read; signing with the current one alone");
                None
            }
        }
    }

    /// The body, in a buffer wiped on drop (it may hold the value).
    fn body(
        &self,
        notice: &Notice,
        value: &SecretValue,
    ) -> Result<Zeroizing<Vec<u8>>, PluginError> {
        let value = if self.include_value {
            Some(value.expose_str().ok_or_else(|| {
                PluginError::new(
                    ErrorKind::Invalid,
                    format!(
                        "{}: the value is not UTF-8 text, so it cannot travel in a JSON body",
                        self.shown
                    ),
                )
            })?)
        } else {
            None
        };
        let body = Body {
            agent: notice.key.agent.as_str(),
            credential: notice.key.credential.as_str(),
            tenant: &notice.tenant,
            version: notice.version,
            previous_version: notice.previous_version,
            rotation: notice.rotation.as_str(),
            rotated_at: notice.rotated_at,
            grace_until: notice.grace_until,
            file: notice.file.as_deref(),
            login: notice.login.as_deref(),
            kind: notice.kind.as_str(),
            public: notice.public.as_deref(),
            value,
        };
        // Room for the value escaped, so the buffer is not reallocated
        // (which would leave an unwiped copy behind).
        let mut out = Zeroizing::new(Vec::with_capacity(
            2048 + value.map_or(0, |v| v.len() * 6)
                + notice.public.as_ref().map_or(0, |p| p.len() * 2),
        ));
        serde_json::to_writer(&mut *out, &body).map_err(|e| {
            PluginError::new(
                ErrorKind::Fatal,
                format!("{}: encoding the notice: {e}", self.shown),
            )
        })?;
        Ok(out)
    }

    fn send_error(&self, e: reqwest::Error) -> PluginError {
        // reqwest's messages name the URL, query and all.
        let e = e.without_url();
        let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&e);
        while let Some(s) = source {
            if let Some(r) = s.downcast_ref::<Refused>() {
                return PluginError::new(
                    ErrorKind::Invalid,
                    format!("{}: refusing to connect: {r}", self.shown),
                );
            }
            source = s.source();
        }
        let chain = chain(&e);
        if e.is_timeout() {
            PluginError::new(
                ErrorKind::Transient,
                format!(
                    "{}: no answer within {} ({chain})",
                    self.shown,
                    humantime::format_duration(self.timeout)
                ),
            )
        } else if e.is_connect() {
            PluginError::new(
                ErrorKind::Transient,
                format!("{}: cannot connect to the receiver: {chain}", self.shown),
            )
        } else {
            PluginError::new(ErrorKind::Transient, format!("{}: {chain}", self.shown))
        }
    }

    fn status_error(
        &self,
        status: reqwest::StatusCode,
        retry_after: Option<Duration>,
    ) -> PluginError {
        let shown = &self.shown;
        let code = status.as_u16();
        match code {
            300..=399 => PluginError::new(
                ErrorKind::Invalid,
                format!(
                    "{shown}: the receiver answered {status} (a redirect); redirects are never followed: point `url` at the final address"
                ),
            ),
            401 | 403 => PluginError::new(
                ErrorKind::Unauthorized,
                format!(
                    "{shown}: the receiver refused the notice with {status} (does it have the signing key?)"
                ),
            ),
            429 => PluginError::new(
                ErrorKind::Throttled,
                format!("{shown}: the receiver answered {status}"),
            )
            .with_retry_after(retry_after),
            408 | 500..=599 => PluginError::new(
                ErrorKind::Transient,
                format!("{shown}: the receiver answered {status}"),
            )
            .with_retry_after(retry_after),
            _ => PluginError::new(
                ErrorKind::Invalid,
                format!("{shown}: the receiver answered {status}"),
            ),
        }
    }
}

#[async_trait]
impl Sink for WebhookSink {
    fn kind(&self) -> &'static str {
        "webhook"
    }

    fn describe(&self) -> String {
        self.shown.clone()
    }

    async fn deliver(
        &self,
        notice: &Notice,
        value: &SecretValue,
    ) -> Result<Delivered, PluginError> {
        guard::check_literal(&self.url, self.policy, &self.shown)?;
        let key = self.signing_key().await?;
        let previous = self.previous_signing_key().await;
        let body = self.body(notice, value)?;
        let signature = sign_with(
            key.expose(),
            previous.as_ref().map(SecretValue::expose),
            Utc::now().timestamp(),
            &body,
        );
        drop((key, previous));
        let request = self
            .client()?
            .post(self.url.clone())
            .timeout(self.timeout)
            .header(CONTENT_TYPE, HeaderValue::from_static("application/json"))
            .header(USER_AGENT, HeaderValue::from_static(USER_AGENT_VALUE))
            .header("Idempotency-Key", notice.rotation.as_str())
            .header(SIGNATURE_HEADER, signature)
            .body(body.to_vec());
        let (status, retry_after) = send_unread(request).await.map_err(|e| self.send_error(e))?;
        if status.is_success() {
            Ok(Delivered::Acknowledged)
        } else {
            Err(self.status_error(status, retry_after))
        }
    }

    /// Without the value the notice says "look again": it goes after the
    /// credential's sinks that write, so `file` is in place when it arrives.
    fn only_notifies(&self) -> bool {
        !self.include_value
    }

    /// A receiver that is down delays only its own delivery: the engine
    /// retries it in the background (until the grace deadline) while the
    /// other sinks and the rotation go on.
    fn holds_up_rotation(&self) -> bool {
        false
    }

    /// Nothing to take back: the receiver was told of versions, and
    /// decommission revokes those at the vaults and the target. A notice
    /// of the decommission would be a new kind of message, which receivers
    /// written against this one do not expect.
    async fn retract(&self, _key: &CredentialKey) -> Result<(), PluginError> {
        Ok(())
    }

    /// Reads the key file (mode, length); no network: the receiver may
    /// start after the daemon.
    async fn preflight(&self) -> Result<(), PluginError> {
        if let KeySource::File(path) = &self.key {
            let path = path.clone();
            tokio::task::spawn_blocking(move || read_key_file(&path).map(drop))
                .await
                .map_err(|e| {
                    PluginError::new(ErrorKind::Transient, format!("reading the key: {e}"))
                })??;
        }
        Ok(())
    }
}

pub(crate) const USER_AGENT_VALUE: &str = concat!("keyturn/", env!("CARGO_PKG_VERSION"));

/// `webhook:<scheme>://<host>[:port]<path>`: never the query or fragment,
/// which may hold a token.
fn describe_url(url: &Url) -> String {
    let port = url.port().map(|p| format!(":{p}")).unwrap_or_default();
    format!(
        "webhook:{}://{}{port}{}",
        url.scheme(),
        url.host_str().unwrap_or_default(),
        url.path()
    )
}

/// A key file: a regular file (not a symlink), no access for group and
/// others, [`MIN_KEY_LEN`]..=[`MAX_KEY_LEN`] bytes once one trailing
/// newline is dropped (`openssl rand -hex 32 > hook.key` makes a good one).
/// Also the key of follow nudges (`[daemon] follow_nudge_key_file`).
pub(crate) fn read_key_file(path: &Path) -> Result<SecretValue, PluginError> {
    read_secret_file(
        path,
        "webhook key file",
        MIN_KEY_LEN,
        &format!("a webhook key must be at least {MIN_KEY_LEN} (e.g. `openssl rand -hex 32`)"),
    )
}

/// A secret file (`what` names it in messages): a regular file (not a
/// symlink), no access for group and others, `min_len..=`[`MAX_KEY_LEN`]
/// bytes once one trailing newline is dropped (`too_short` says what is
/// needed when it is shorter). Also read by the alert sinks
/// (a PagerDuty routing key, an alert webhook's signing key).
pub(crate) fn read_secret_file(
    path: &Path,
    what: &str,
    min_len: usize,
    too_short: &str,
) -> Result<SecretValue, PluginError> {
    let shown = path.display();
    let invalid =
        |why: String| PluginError::new(ErrorKind::Invalid, format!("{what} {shown}: {why}"));
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ELOOP) => invalid("is a symlink; point secret_file at the real file".into()),
            _ => PluginError::io(format_args!("{what} {shown}"), &e),
        })?;
    let meta = file
        .metadata()
        .map_err(|e| PluginError::io(format_args!("{what} {shown}"), &e))?;
    if !meta.is_file() {
        return Err(invalid("is not a regular file".into()));
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(invalid(format!(
            "has mode {mode:04o}: group and others must have no access (chmod 600 it)"
        )));
    }
    let mut raw = crate::vaults::local::read_capped(&file, MAX_KEY_LEN)
        .map_err(|e| PluginError::io(format_args!("{what} {shown}"), &e))?;
    if raw.len() > MAX_KEY_LEN {
        return Err(invalid(format!("is longer than {MAX_KEY_LEN} bytes")));
    }
    if raw.ends_with(b"\n") {
        raw.pop();
        if raw.ends_with(b"\r") {
            raw.pop();
        }
    }
    if raw.len() < min_len {
        return Err(invalid(format!("holds {} bytes; {too_short}", raw.len())));
    }
    Ok(SecretValue::new(std::mem::take(&mut *raw)))
}

/// Sends `request`: the answer's status and `Retry-After`. The body is
/// dropped unread: nothing of the receiver's answer is kept.
pub(crate) async fn send_unread(
    request: reqwest::RequestBuilder,
) -> Result<(reqwest::StatusCode, Option<Duration>), reqwest::Error> {
    let response = request.send().await?;
    let status = response.status();
    let after = retry_after(response.headers().get(RETRY_AFTER));
    drop(response);
    Ok((status, after))
}

/// `Retry-After` in seconds or as an HTTP date, capped.
pub(crate) fn retry_after(h: Option<&HeaderValue>) -> Option<Duration> {
    let text = h?.to_str().ok()?.trim();
    let after = match text.parse::<u64>() {
        Ok(secs) => Duration::from_secs(secs),
        Err(_) => {
            let at = DateTime::parse_from_rfc2822(text).ok()?;
            (at.with_timezone(&Utc) - Utc::now())
                .to_std()
                .unwrap_or_default()
        }
    };
    Some(after.min(MAX_RETRY_AFTER))
}

pub(crate) fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let s_text = s.to_string();
        if !out.contains(&s_text) {
            out.push_str(": ");
            out.push_str(&s_text);
        }
        source = s.source();
    }
    out
}

fn system_lookup() -> Arc<dyn Lookup> {
    static SYSTEM: LazyLock<Arc<dyn Lookup>> = LazyLock::new(|| Arc::new(guard::SystemLookup));
    SYSTEM.clone()
}

/// One client per policy for every sink on the system resolver: a client
/// holds a connection pool and the TLS roots, too much to keep per sink.
pub(crate) fn shared_client(policy: Policy) -> Result<reqwest::Client, PluginError> {
    shared_client_for(policy, false)
}

/// [`shared_client`], for plain-http URLs only when `plain` (see
/// [`build_client`]).
fn shared_client_for(policy: Policy, plain: bool) -> Result<reqwest::Client, PluginError> {
    static CLIENTS: LazyLock<Mutex<Vec<(Policy, bool, reqwest::Client)>>> =
        LazyLock::new(Default::default);
    let mut clients = CLIENTS.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((_, _, c)) = clients.iter().find(|(p, h, _)| *p == policy && *h == plain) {
        return Ok(c.clone());
    }
    let c = build_client(system_lookup(), policy, plain)?;
    clients.push((policy, plain, c.clone()));
    Ok(c)
}

/// `plain`: the client only ever talks plain http (the sink's URL is
/// `http://`), so it trusts no CA at all: the platform's root store (~2 MiB
/// resident) is not loaded for a receiver on loopback or a follower's nudge
/// URL. A redirect to https is never followed anyway.
fn build_client(
    lookup: Arc<dyn Lookup>,
    policy: Policy,
    plain: bool,
) -> Result<reqwest::Client, PluginError> {
    let mut builder = reqwest::Client::builder();
    if plain {
        builder = builder.tls_certs_only(std::iter::empty());
    }
    builder
        .redirect(reqwest::redirect::Policy::none())
        // A proxy would connect wherever the name points, past the guard.
        .no_proxy()
        .dns_resolver(Arc::new(guard::GuardedResolver { lookup, policy }))
        .build()
        .map_err(|e| {
            PluginError::new(
                ErrorKind::Fatal,
                format!("building the webhook HTTP client: {}", chain(&e)),
            )
        })
}
