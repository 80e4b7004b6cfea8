//! `[vaults.NAME]` with `type = "azure_key_vault"`: the config, its check and how to log in.

use super::*;

/// Default time allowed for one request, connect included.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// `[vaults.NAME]` with `type = "azure_key_vault"`.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AzureConfig {
    /// `https://NAME.vault.azure.net`.
    pub vault_url: String,
    /// `client_secret`, `managed_identity` or `workload_identity`.
    pub auth: String,
    pub tenant_id: Option<String>,
    pub client_id: Option<String>,
    pub client_secret_file: Option<PathBuf>,
    /// An extra CA (PEM) to trust besides the system roots (a private
    /// endpoint's, or a test server's).
    pub ca_file: Option<PathBuf>,
    /// Require the auth challenge's resource to be a parent domain of the
    /// vault host (the SDK's default, true); false is accepted only when
    /// `vault_url`'s host is loopback (a test stub).
    pub verify_challenge_resource: Option<bool>,
    /// Where the Entra ID credentials (client secret, workload identity) get
    /// tokens, e.g. `https://login.microsoftonline.us` for a sovereign cloud
    /// or the test stub; https only. Unset: `AZURE_AUTHORITY_HOST`, else the
    /// public cloud.
    pub authority_host: Option<String>,
    /// Per request, connect included (default 30 s).
    pub timeout: Option<String>,
    /// Where a rotating keyturn keeps its change index for followers (a
    /// path in this vault, opt-in; see `vaults::change_index`).
    pub change_index: Option<String>,
    pub max_concurrent: Option<usize>,
}

/// How keyturn authenticates to Entra ID.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AzureAuth {
    ClientSecret {
        tenant_id: String,
        client_id: String,
        secret_file: PathBuf,
    },
    /// The VM's / App Service's managed identity; `client_id` picks a
    /// user-assigned one, `None` the system-assigned one.
    ManagedIdentity { client_id: Option<String> },
    /// AKS workload identity: `AZURE_TENANT_ID`, `AZURE_CLIENT_ID` and
    /// `AZURE_FEDERATED_TOKEN_FILE` from the pod's environment.
    WorkloadIdentity,
}

impl AzureConfig {
    /// A config with the defaults.
    pub fn new(vault_url: impl Into<String>, auth: &str) -> Self {
        Self {
            vault_url: vault_url.into(),
            auth: auth.to_owned(),
            ..Self::default()
        }
    }

    /// The way to log in; `None` when `auth` is unknown or incomplete.
    pub fn auth(&self) -> Option<AzureAuth> {
        match self.auth.as_str() {
            "client_secret" => Some(AzureAuth::ClientSecret {
                tenant_id: self.tenant_id.clone()?,
                client_id: self.client_id.clone()?,
                secret_file: self.client_secret_file.clone()?,
            }),
            "managed_identity" => Some(AzureAuth::ManagedIdentity {
                client_id: self.client_id.clone(),
            }),
            "workload_identity" => Some(AzureAuth::WorkloadIdentity),
            _ => None,
        }
    }

    pub fn timeout(&self) -> Duration {
        duration_value(self.timeout.as_deref(), DEFAULT_TIMEOUT)
    }
}

impl VaultPlugin for AzureConfig {
    fn check(&mut self, v: &mut Validator<'_>, p: Loc<'_>, _: &VaultScope<'_>) {
        v.url(
            p.key("vault_url"),
            &self.vault_url,
            &["https"],
            "https://NAME.vault.azure.net",
        );
        self.vault_url = self.vault_url.trim_end_matches('/').to_owned();
        if let Some(host) = &mut self.authority_host {
            // The SDK refuses a non-https authority too, but only at the
            // first rotation; say it at load time.
            v.url(
                p.key("authority_host"),
                host,
                &["https"],
                "https://login.microsoftonline.com",
            );
            *host = host.trim_end_matches('/').to_owned();
        }
        match self.auth.as_str() {
            "client_secret" => {
                for (key, set) in [
                    ("tenant_id", self.tenant_id.is_some()),
                    ("client_id", self.client_id.is_some()),
                    ("client_secret_file", self.client_secret_file.is_some()),
                ] {
                    if !set {
                        v.err_key(p, format!("auth = \"client_secret\" needs `{key}`"));
                    }
                }
                if let Some(f) = &mut self.client_secret_file {
                    v.resolve_path(p.key("client_secret_file"), f);
                }
            }
            "managed_identity" => {
                if self.authority_host.is_some() {
                    v.err(
                        p.key("authority_host"),
                        "authority_host has no effect with auth = \"managed_identity\" (the host's identity endpoint issues the tokens); remove it",
                    );
                }
            }
            "workload_identity" => {}
            other => v.err(
                p.key("auth"),
                format!("unknown auth `{other}`; expected one of `client_secret`, `managed_identity`, `workload_identity`"),
            ),
        }
        if self.verify_challenge_resource == Some(false) && !is_loopback_url(&self.vault_url) {
            v.err(
                p.key("verify_challenge_resource"),
                format!(
                    "verify_challenge_resource = false is only for a loopback stub (https://127.0.0.1:PORT, https://[::1]:PORT or https://localhost:PORT), and vault_url `{}` is not one: without the check a token for another resource may be sent to this host; remove the setting",
                    self.vault_url
                ),
            );
        }
        if let Some(ca) = &mut self.ca_file {
            v.resolve_path(p.key("ca_file"), ca);
        }
        v.timeout(&p, &self.timeout, DEFAULT_TIMEOUT);
    }

    fn max_concurrent(&self) -> Option<usize> {
        self.max_concurrent
    }

    fn change_index(&self) -> Option<&str> {
        self.change_index.as_deref()
    }

    fn open(&self, name: &str) -> Result<Arc<dyn Vault>, PluginError> {
        Ok(LazyVault::connecting(
            name,
            self.clone(),
            |name, c| async move {
                Ok(Arc::new(AzureVault::connect(&name, &c).await?) as Arc<dyn Vault>)
            },
        ))
    }
}

/// Whether `url`'s host is this machine's loopback (`localhost`, 127.0.0.0/8,
/// `::1`), the only place a test stub runs.
pub(super) fn is_loopback_url(url: &str) -> bool {
    let Ok(url) = reqwest::Url::parse(url) else {
        return false;
    };
    // An IPv6 host comes bracketed (`[::1]`).
    match url
        .host_str()
        .map(|h| h.trim_start_matches('[').trim_end_matches(']'))
    {
        Some(host) => {
            host.eq_ignore_ascii_case("localhost")
                || host
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback())
        }
        None => false,
    }
}
