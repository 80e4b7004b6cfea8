//! The HTTPS client, the Entra ID credential, and what an SDK error means to the engine.

use super::*;

/// The SDK's reqwest client, built by us to trust `ca_file` and bound time.
pub(super) fn build_http_client(s: &AzureConfig) -> Result<reqwest::Client, String> {
    let timeout = s.timeout();
    let mut builder = reqwest::Client::builder()
        .https_only(true)
        .timeout(timeout)
        .connect_timeout(timeout.min(Duration::from_secs(10)))
        // Key Vault does not redirect; following one would carry the token.
        .redirect(reqwest::redirect::Policy::none());
    if let Some(ca) = &s.ca_file {
        let pem = std::fs::read(ca).map_err(|e| format!("ca_file {}: {e}", ca.display()))?;
        let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| {
            format!(
                "ca_file {}: not a PEM certificate bundle: {e}",
                ca.display()
            )
        })?;
        if certs.is_empty() {
            return Err(format!("ca_file {}: holds no certificate", ca.display()));
        }
        builder = builder.tls_certs_merge(certs);
    }
    builder
        .build()
        .map_err(|e| format!("building the HTTPS client: {}", chain(&e)))
}

/// The Entra ID credential `s.auth` describes.
///
/// The client secret and workload identity credentials talk to the authority
/// host over the vault's own HTTPS client (`http`), so `ca_file` and the
/// timeouts apply to token requests too (a private authority, or the test
/// stub). Managed identity keeps the SDK's default transport: IMDS and the App
/// Service identity endpoint are plain http on a link-local or loopback
/// address, which the vault's https-only client would refuse.
pub(super) async fn build_credential(
    name: &str,
    s: &AzureConfig,
    http: &reqwest::Client,
) -> Result<Arc<dyn TokenCredential>, PluginError> {
    let fail = |what: String| {
        PluginError::new(
            ErrorKind::Invalid,
            format!("azure key vault `{name}`: credentials: {what}"),
        )
    };
    // Tokens from Entra ID: no SDK retries here either.
    let options = || ClientOptions {
        retry: RetryOptions::none(),
        ..ClientOptions::default()
    };
    let entra_options = || {
        let mut o = options();
        o.transport = Some(Transport::new(Arc::new(http.clone())));
        if let Some(host) = &s.authority_host {
            let mut custom = CustomConfiguration::default();
            custom.authority_host = host.clone();
            o.cloud = Some(Arc::new(CloudConfiguration::Custom(custom)));
        }
        o
    };
    let auth = s.auth().ok_or_else(|| {
        fail(format!(
            "auth `{}` is unknown or incomplete (the config was not checked)",
            s.auth
        ))
    })?;
    let cred: Arc<dyn TokenCredential> = match &auth {
        AzureAuth::ClientSecret {
            tenant_id,
            client_id,
            secret_file,
        } => {
            let raw = Zeroizing::new(tokio::fs::read(secret_file).await.map_err(|e| {
                PluginError::io(
                    format!(
                        "azure key vault `{name}`: client secret file {}",
                        secret_file.display()
                    ),
                    &e,
                )
            })?);
            let text = std::str::from_utf8(&raw)
                .map_err(|_| {
                    fail(format!(
                        "client secret file {} is not UTF-8 text",
                        secret_file.display()
                    ))
                })?
                .trim_end_matches(['\r', '\n']);
            if text.is_empty() {
                return Err(fail(format!(
                    "client secret file {} is empty",
                    secret_file.display()
                )));
            }
            azure_identity::ClientSecretCredential::new(
                tenant_id,
                client_id.clone(),
                azure_core::credentials::Secret::new(text.to_owned()),
                Some(azure_identity::ClientSecretCredentialOptions {
                    client_options: entra_options(),
                }),
            )
            .map_err(|e| fail(format!("client secret credential: {e}")))?
        }
        AzureAuth::ManagedIdentity { client_id } => azure_identity::ManagedIdentityCredential::new(
            Some(azure_identity::ManagedIdentityCredentialOptions {
                user_assigned_id: client_id
                    .clone()
                    .map(azure_identity::UserAssignedId::ClientId),
                client_options: options(),
            }),
        )
        .map_err(|e| fail(format!("managed identity: {e}")))?,
        AzureAuth::WorkloadIdentity => {
            let mut o = azure_identity::WorkloadIdentityCredentialOptions::default();
            o.credential_options.client_options = entra_options();
            azure_identity::WorkloadIdentityCredential::new(Some(o))
                .map_err(|e| fail(format!("workload identity: {e}")))?
        }
    };
    Ok(cred)
}

/// The kind and an operator-facing description of an SDK error.
/// The `Retry-After` of a 429 or 503, in seconds (the form Key Vault sends).
pub(super) fn retry_after(e: &azure_core::Error) -> Option<std::time::Duration> {
    match e.kind() {
        AzErrorKind::HttpResponse { raw_response, .. } => raw_response
            .as_ref()?
            .headers()
            .get_optional_str(&RETRY_AFTER)?
            .trim()
            .parse::<u64>()
            .ok()
            .map(std::time::Duration::from_secs),
        _ => None,
    }
}

pub(super) fn classify(e: &azure_core::Error) -> (ErrorKind, String) {
    match e.kind() {
        AzErrorKind::HttpResponse {
            status,
            error_code,
            raw_response,
        } => {
            let code = u16::from(*status);
            let kind = match code {
                429 => ErrorKind::Throttled,
                401 | 403 => ErrorKind::Unauthorized,
                404 => ErrorKind::NotFound,
                409 => ErrorKind::Conflict,
                408 | 500..=599 => ErrorKind::Transient,
                _ => ErrorKind::Invalid,
            };
            let mut detail = format!("HTTP {code}");
            if let Some(c) = error_code {
                detail.push(' ');
                detail.push_str(&clip(c));
            }
            detail.push_str(": ");
            detail.push_str(&clip(&e.to_string()));
            if let Some(after) = raw_response
                .as_ref()
                .and_then(|r| r.headers().get_optional_str(&RETRY_AFTER))
            {
                match after.trim().parse::<u64>() {
                    Ok(secs) => detail.push_str(&format!("; retry after {secs}s")),
                    Err(_) => detail.push_str(&format!("; Retry-After: {}", clip(after))),
                }
            }
            (kind, detail)
        }
        AzErrorKind::Connection | AzErrorKind::Io => {
            let text = chain(e);
            match ErrorKind::of_connection(&text) {
                ErrorKind::Invalid => (
                    ErrorKind::Invalid,
                    format!(
                        "the vault's TLS certificate is not trusted (check `ca_file` and the server's certificate): {text}"
                    ),
                ),
                kind => (kind, text),
            }
        }
        AzErrorKind::Credential => (
            ErrorKind::Unauthorized,
            format!("getting a token: {}", chain(e)),
        ),
        // A response we cannot parse, a challenge we refuse, a bad URL: retrying
        // the same request will not help.
        AzErrorKind::DataConversion | AzErrorKind::Other => (ErrorKind::Invalid, chain(e)),
        #[allow(unreachable_patterns)]
        _ => (ErrorKind::Transient, chain(e)),
    }
}

/// An error and its causes, `a: b: c`, without repeats, clipped.
pub(super) fn chain(e: &dyn std::error::Error) -> String {
    let mut parts: Vec<String> = vec![e.to_string()];
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        source = s.source();
    }
    clip(&parts.join(": "))
}

pub(super) fn clip(s: &str) -> String {
    let s = s.trim();
    if s.len() <= MAX_DETAIL {
        return s.to_owned();
    }
    let mut end = MAX_DETAIL;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}
