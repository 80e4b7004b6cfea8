//! The token service's part of the daemon: built from the config at
//! start-up and again on a reload that changes it, what it needs of the
//! daemon (its backend), and exchanges over the sockets.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use super::DaemonError;
use super::handler::Handler;
use crate::api::protocol::{ApiError, ApiErrorKind};
use crate::api::socket::PeerCred;
use crate::audit::{AuditEvent, Outcome};
use crate::config::Config;
use crate::model::{AgentId, CredentialKey};
use crate::oauth::jwks::Jwks;
use crate::revocation::Revocations;
use crate::rotation::Engine;

/// The subject issuers of `[token_service.subject_issuers]`, each with its
/// key set (loaded by [`crate::oauth::SubjectTokens::start`]), and those
/// key sets. An issuer whose keys come from where they came from before
/// (same file or URL, same algorithms) keeps the set of the service
/// running, keys included: a set that cannot be loaded at a reload then
/// keeps the keys it had, as a failed refresh does (black-box finding: a
/// reload while the IdP's JWKS was unreadable left the issuer with none).
fn token_subjects(
    config: &Config,
    running: &[Arc<Jwks>],
) -> Result<(crate::oauth::SubjectTokens, Vec<Arc<Jwks>>), DaemonError> {
    let mut issuers = Vec::new();
    let mut sets = Vec::new();
    for (name, cfg) in &config.subject_issuers {
        let kept = running
            .iter()
            .find(|j| j.reads(&cfg.jwks, &cfg.algorithms))
            .cloned();
        let jwks =
            match kept {
                Some(j) => j,
                None => Arc::new(Jwks::new(cfg.jwks.clone(), cfg.algorithms.clone()).map_err(
                    |e| DaemonError::Startup(format!("token_service.subject_issuers.{name}: {e}")),
                )?),
            };
        sets.push(jwks.clone());
        issuers.push(crate::oauth::SubjectIssuer::new(cfg.clone(), jwks));
    }
    Ok((crate::oauth::SubjectTokens::new(issuers), sets))
}

/// `endpoint` of `keyturn_oauth_requests_total` for exchanges over the
/// sockets.
const SOCKET_TOKEN: &str = "token_socket";

/// The token service's part of the daemon: builds it from the config at
/// start-up and again on a reload that changes `[token_service]` (the new
/// one takes over at once, the old one's key-set refreshes stop).
pub(super) struct OauthService {
    /// The listener's address: tokens only on loopback.
    pub(super) addr: std::net::SocketAddr,
    pub(super) backend: Arc<OauthBackend>,
    pub(super) slot: Arc<crate::oauth::service::Slot>,
    pub(super) cancel: CancellationToken,
    /// What the service in the slot was built from, what stops its
    /// background work, and its subject issuers' key sets.
    pub(super) running: tokio::sync::Mutex<Option<Running>>,
}

/// The token service in the slot: what it was built from, what stops its
/// background work, and its subject issuers' key sets.
pub(super) type Running = (TokenServiceInputs, CancellationToken, Vec<Arc<Jwks>>);

/// The parts of the config a token service is built from.
type TokenServiceInputs = (
    Option<crate::oauth::config::TokenServiceConfig>,
    std::collections::BTreeMap<String, crate::oauth::config::SubjectIssuerConfig>,
);

impl OauthService {
    /// Builds the service `config` asks for, unless it is the one running:
    /// `true` when the slot changed. An error leaves the slot as it was.
    pub(super) async fn apply(&self, config: &Config) -> Result<bool, String> {
        let inputs: TokenServiceInputs =
            (config.token_service.clone(), config.subject_issuers.clone());
        let mut running = self.running.lock().await;
        if running.as_ref().map(|(i, _, _)| i) == Some(&inputs) {
            return Ok(false);
        }
        let mut key_sets = Vec::new();
        let service = match &config.token_service {
            None => None,
            // The listener has no TLS of its own: tokens cross it in the
            // clear, so only a loopback address (behind a TLS proxy) serves them.
            Some(_) if !self.addr.ip().is_loopback() => {
                return Err(format!(
                    "[token_service] needs [daemon] listen on a loopback address (it is {}): the listener has no TLS, and access tokens must not cross the network in the clear; listen on 127.0.0.1 and put a TLS proxy in front",
                    self.addr
                ));
            }
            Some(ts) => {
                let kept = running.as_ref().map_or(&[][..], |(_, _, sets)| sets);
                let (subjects, sets) = token_subjects(config, kept).map_err(|e| e.to_string())?;
                key_sets = sets;
                let stop = self.cancel.child_token();
                subjects.start(&stop).await;
                let backend: Arc<dyn crate::oauth::service::Backend> = self.backend.clone();
                Some((
                    Arc::new(crate::oauth::service::TokenService::new(
                        ts, subjects, backend,
                    )),
                    stop,
                ))
            }
        };
        let stop = service.as_ref().map(|(_, stop)| stop.clone());
        self.slot.set(service.map(|(s, _)| s));
        if let Some((_, old, _)) = running.replace((inputs, stop.unwrap_or_default(), key_sets)) {
            old.cancel();
        }
        Ok(true)
    }
}

/// What the token service needs of the daemon: agents' keys from state,
/// the task store's ledgers, the signing credential from its vault,
/// decommissions, the audit log.
pub(super) struct OauthBackend {
    pub(super) engine: Engine,
    pub(super) revocations: Revocations,
    pub(super) tasks: Arc<crate::tasks::manager::TaskManager>,
    /// The limits of refusals of unauthenticated requests (shared with the
    /// sockets' refusals, under their own key).
    pub(super) refusals: Arc<super::refusals::Refusals>,
}

#[async_trait::async_trait]
impl crate::oauth::service::Backend for OauthBackend {
    async fn client_keys(&self, agent: &str) -> Result<Vec<crate::auth::AgentKey>, String> {
        let catalog = self.engine.catalog();
        let Some((id, cfg)) = AgentId::new(agent)
            .ok()
            .and_then(|id| catalog.config.agents.get_key_value(&id))
        else {
            return Err(format!(
                "{:?} is not a configured agent",
                agent.chars().take(64).collect::<String>()
            ));
        };
        super::handler::auth_keys(&self.engine, &self.revocations, id, cfg)
            .await
            .map_err(super::handler::AuthKeysError::message)
    }

    async fn spend_jtis(&self, jtis: Vec<(String, String, i64)>) -> Result<Vec<bool>, String> {
        let now = i64::try_from(jsonwebtoken::get_current_timestamp()).unwrap_or(i64::MAX);
        self.tasks
            .store()
            .spend_jtis(jtis, now)
            .await
            .map_err(|e| e.to_string())
    }

    fn token_ledger(&self) -> &dyn crate::oauth::service::TokenLedger {
        self.tasks.store()
    }

    fn signing_current(&self, credential: &CredentialKey) -> Option<u64> {
        self.engine.current_version(credential)
    }

    async fn signing_versions(
        &self,
        credential: &CredentialKey,
    ) -> Result<Vec<crate::state::VersionRow>, String> {
        let key = credential.clone();
        self.engine
            .load(move |s| s.versions(&key))
            .await
            .map_err(|e| format!("cannot read the signing credential's versions: {e}"))
    }

    async fn signing_value(
        &self,
        version: &crate::state::VersionRow,
    ) -> Result<crate::model::SecretValue, String> {
        self.engine.version_value(version).await
    }

    fn live_task(
        &self,
        agent: &str,
        id: &str,
    ) -> Result<Option<crate::oauth::exchange::TaskClaims>, String> {
        let Some(row) = self.tasks.store().get(id).map_err(|e| e.to_string())? else {
            return Ok(None);
        };
        let now_ms = chrono::Utc::now().timestamp_millis();
        if row.task.agent != agent
            || row.state != crate::tasks::store::TaskState::Live
            || row.expires_at_ms <= now_ms
        {
            return Ok(None);
        }
        Ok(Some(crate::oauth::exchange::TaskClaims {
            task_id: row.task.task_id.clone(),
            run_id: row.task.run_id.clone(),
            use_case: row.task.use_case.clone(),
            tenant: row.task.tenant.clone(),
            expires_at: u64::try_from(row.expires_at_ms / 1000).unwrap_or(0),
        }))
    }

    fn versions_generation(&self) -> u64 {
        self.engine.versions_generation()
    }

    fn decommissioned_at(&self, agent: &str) -> Option<i64> {
        let id = AgentId::new(agent).ok()?;
        self.revocations
            .get(&id)
            .map(|d| d.row.token_epoch().timestamp())
    }

    async fn audit(&self, event: AuditEvent) {
        if let Err(e) = self.engine.record(event).await {
            tracing::error!(error = %e, "cannot audit a token service request");
        }
    }

    async fn audit_unauthenticated(&self, event: AuditEvent) {
        let name = match event.event.as_str() {
            "oauth.token" => "oauth.token",
            "oauth.revoke" => "oauth.revoke",
            _ => "oauth",
        };
        super::refusals::audit(
            &self.refusals,
            &self.engine,
            super::refusals::HTTP_LISTENER,
            name,
            event,
        )
        .await;
    }
}

impl Handler {
    /// `token_exchange` on a socket: the peer's uid authenticates the
    /// agent (see [`ControlHandler::token_exchange`]).
    pub(super) async fn exchange_token(
        &self,
        peer: PeerCred,
        privileged: bool,
        as_agent: Option<AgentId>,
        args: crate::api::protocol::TokenExchangeArgs,
    ) -> Result<crate::api::protocol::ResponseBody, ApiError> {
        use crate::api::protocol::{ResponseBody, TokenExchanged, WireSecret};
        use crate::oauth::service::{AgentExchange, Authenticated};
        let Some(service) = self.oauth.get() else {
            return Err(ApiError::unavailable(
                "this daemon serves no token service: configure [token_service] and reload (with [daemon] listen on a loopback address, which takes a restart)",
            ));
        };
        let caller = self
            .task_caller(peer, privileged, as_agent.as_ref())
            .and_then(|c| {
                // An agent retired in the config: as over HTTP (its keys
                // are refused there).
                let catalog = self.engine.catalog();
                let retired = AgentId::new(&c.agent)
                    .ok()
                    .and_then(|id| catalog.config.agents.get(&id))
                    .and_then(|a| a.decommissioned.as_ref())
                    .is_some_and(|d| d.in_effect(self.engine.now()));
                if retired {
                    return Err(ApiError::forbidden(format!(
                        "invalid_client: agent {} is decommissioned",
                        c.agent
                    )));
                }
                Ok(c)
            });
        let caller = match caller {
            Ok(c) => c,
            Err(mut e) => {
                // Said as the token service says it: the OAuth code first.
                if !e.message.starts_with("invalid_client:") {
                    let code = match e.kind {
                        ApiErrorKind::Forbidden | ApiErrorKind::NotFound => "invalid_client",
                        _ => "invalid_request",
                    };
                    e.message = format!("{code}: {}", e.message);
                }
                // A client refused is refused (exit 77), whatever the
                // reason: an agent the config does not know included.
                if e.message.starts_with("invalid_client:") {
                    e.kind = ApiErrorKind::Forbidden;
                }
                let mut ev = AuditEvent::new("oauth.token", peer.actor(), Outcome::Refused);
                ev.agent = as_agent;
                ev.error = Some(e.message.clone());
                ev.detail = Some(format!(
                    "by peer uid={} (pid {}) on a socket",
                    peer.uid, peer.pid
                ));
                self.record_refusal(peer, "oauth.token", ev).await;
                let code = e.message.split(':').next().unwrap_or_default();
                self.metrics.oauth_request(SOCKET_TOKEN, code);
                return Err(e);
            }
        };
        let req = AgentExchange {
            params: crate::oauth::exchange::Params {
                audience: args.audience,
                resource: args.resource,
                scope: args.scope,
                requested_token_type: args.requested_token_type,
                task_id: args.task_id.filter(|t| !t.is_empty()),
                task: None,
            },
            subject_token: args.subject_token.0,
            subject_token_type: Some(args.subject_token_type),
            actor_token: args.actor_token.map(|t| t.0),
        };
        let by = Authenticated {
            actor: peer.actor(),
            how: format!(
                "authenticated by peer {} (pid {}) on a socket",
                caller.described, peer.pid
            ),
        };
        let result = service.token_for_agent(&caller.agent, req, by).await;
        self.metrics.oauth_request(
            SOCKET_TOKEN,
            result.as_ref().map_or_else(|e| e.code, |_| "ok"),
        );
        match result {
            Ok(issued) => Ok(ResponseBody::TokenExchanged(Box::new(TokenExchanged {
                access_token: WireSecret(issued.access_token),
                issued_token_type: crate::oauth::exchange::TOKEN_TYPE_ACCESS_TOKEN.to_owned(),
                token_type: "Bearer".to_owned(),
                expires_in: issued.expires_in,
                scope: issued.scope,
            }))),
            // The OAuth error code first, as RFC 6749 5.2 names it.
            Err(e) => Err(ApiError::new(
                match e.code {
                    "invalid_client" | "unauthorized_client" => ApiErrorKind::Forbidden,
                    "server_error" => ApiErrorKind::Internal,
                    "temporarily_unavailable" => ApiErrorKind::Unavailable,
                    _ => ApiErrorKind::BadRequest,
                },
                e.to_string(),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(dir: &std::path::Path, algorithms: &str) -> Config {
        let d = dir.display();
        let text = format!(
            r#"[daemon]
state_dir = "{d}/state"
socket = "{d}/control.sock"
listen = "127.0.0.1:9"
[vaults.local]
type = "local"
{keyturn}[agents.keyturn.credentials.signer]
vault = "local"
every = "24h"
generate = {{ kind = "ed25519" }}
[token_service]
issuer = "http://127.0.0.1:9"
signing_credential = "keyturn/signer"
[token_service.subject_issuers.corp]
issuer = "https://idp.example.com"
audience = "keyturn"
algorithms = [{algorithms}]
jwks_file = "{d}/idp.jwks"
tenant = "acme"
"#,
            keyturn = crate::test_support::agent_table("keyturn"),
        );
        crate::config::load_str(&dir.join("k.toml"), &text).expect("config")
    }

    /// Black-box finding: a reload while an issuer's JWKS could not be read
    /// (a garbled file, an IdP answering 500) built the issuer a new, empty
    /// key set, and every exchange of its subjects failed until a refresh
    /// succeeded; the log said the previous keys stayed in use.
    #[tokio::test]
    async fn a_rebuilt_issuer_of_the_same_keys_keeps_them_when_they_cannot_be_read() {
        let dir = tempfile::tempdir().unwrap();
        let pem = std::fs::read(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/src/oauth/testdata/ed25519_a.pem"
        ))
        .unwrap();
        let enc = jsonwebtoken::EncodingKey::from_ed_pem(&pem).unwrap();
        let mut jwk = serde_json::to_value(
            jsonwebtoken::jwk::Jwk::from_encoding_key(&enc, jsonwebtoken::Algorithm::EdDSA)
                .unwrap(),
        )
        .unwrap();
        jwk["kid"] = "a".into();
        let jwks = dir.path().join("idp.jwks");
        std::fs::write(&jwks, serde_json::json!({ "keys": [jwk] }).to_string()).unwrap();
        let cancel = CancellationToken::new();

        let (subjects, sets) = token_subjects(&config(dir.path(), r#""EdDSA""#), &[]).unwrap();
        subjects.start(&cancel).await;
        assert_eq!(sets[0].keys().len(), 1);

        std::fs::write(&jwks, "garbage").unwrap();
        let (subjects, again) = token_subjects(&config(dir.path(), r#""EdDSA""#), &sets).unwrap();
        subjects.start(&cancel).await;
        assert!(Arc::ptr_eq(&sets[0], &again[0]), "the same key set");
        assert_eq!(again[0].keys().len(), 1, "the keys it had are kept");
        assert!(again[0].last_error().is_some());

        // Other algorithms: another set, read anew (and empty here).
        let (subjects, other) =
            token_subjects(&config(dir.path(), r#""EdDSA", "ES256""#), &again).unwrap();
        subjects.start(&cancel).await;
        assert!(!Arc::ptr_eq(&again[0], &other[0]));
        assert_eq!(other[0].keys().len(), 0);
        cancel.cancel();
    }
}
