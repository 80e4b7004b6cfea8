//! What tells an active token from the rest: the check of a token this
//! service issued (signature by a published key, `iss`, `exp`), whether it
//! is still active (not revoked, issued after every decommission it names),
//! introspection (RFC 7662), revocation (RFC 7009), and the proof a
//! decommission's `tokens` item is verified with.

use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::{Map, Value, json};

use super::{Reply, SecretValue, TokenForm, TokenService, err, now_secs, same_client, token_form};
use crate::audit::{Actor as AuditActor, AuditEvent, Outcome};
use crate::auth::Verified;
use crate::model::AgentId;
use crate::oauth::exchange::ExchangeError;

/// The claims of a token this service issued, once its signature, `iss`
/// and `exp` are checked.
struct Checked {
    claims: Map<String, Value>,
}

impl Checked {
    fn str(&self, k: &str) -> Option<&str> {
        self.claims.get(k).and_then(Value::as_str)
    }
    fn int(&self, k: &str) -> Option<i64> {
        self.claims.get(k).and_then(Value::as_i64)
    }
    /// The client and every agent in the `act` chain.
    fn agents(&self) -> Vec<String> {
        let mut out: Vec<String> = self
            .str("client_id")
            .map(str::to_owned)
            .into_iter()
            .collect();
        let mut cur = self.claims.get("act").and_then(Value::as_object);
        let mut depth = 0;
        while let Some(level) = cur {
            if let Some(s) = level.get("sub").and_then(Value::as_str) {
                out.push(s.to_owned());
            }
            cur = level.get("act").and_then(Value::as_object);
            depth += 1;
            if depth > 64 {
                break;
            }
        }
        out
    }
}

impl TokenService {
    /// A token of this service with a valid signature by a published key
    /// and the `iss` of that key's set, not expired. `None` for anything
    /// else.
    async fn check(&self, token: &SecretValue, now: i64) -> Result<Option<Checked>, ExchangeError> {
        let Some(token) = token.expose_str() else {
            return Ok(None);
        };
        if token.len() > crate::auth::MAX_TOKEN_BYTES * 4 {
            return Ok(None);
        }
        let Ok(header) = jsonwebtoken::decode_header(token) else {
            return Ok(None);
        };
        if header.alg != Algorithm::EdDSA
            || header.typ.as_deref() != Some("at+jwt")
            || header.jku.is_some()
            || header.x5u.is_some()
        {
            return Ok(None);
        }
        let Some(kid) = header.kid.as_deref() else {
            return Ok(None);
        };
        // The set whose published keys hold the kid (thumbprints never
        // collide; a legacy kid is published by its own set only).
        let mut found = None;
        for set in &self.keys {
            let keys = self.published(set, now).await.map_err(|e| {
                tracing::error!("token service: cannot list the signing keys: {e}");
                err(
                    "temporarily_unavailable",
                    "the signing keys cannot be read now; retry",
                )
            })?;
            if let Some(key) = keys.into_iter().find(|k| k.kid == kid) {
                found = Some((set, key));
                break;
            }
        }
        let Some((set, key)) = found else {
            return Ok(None);
        };
        let Ok(decoding) = DecodingKey::from_ed_pem(key.public_pem.as_bytes()) else {
            return Ok(None);
        };
        let mut v = Validation::new(Algorithm::EdDSA);
        v.leeway = 0;
        v.validate_aud = false;
        v.set_required_spec_claims(&["exp", "iss", "iat", "jti"]);
        v.iss = Some(std::collections::HashSet::from([set.policy.issuer.clone()]));
        match jsonwebtoken::decode::<Map<String, Value>>(token, &decoding, &v) {
            Ok(data) => Ok(Some(Checked {
                claims: data.claims,
            })),
            Err(_) => Ok(None),
        }
    }

    /// Whether a checked token is still active: not revoked, naming no
    /// decommissioned agent (as client or in `act`; a token minted after a
    /// decommission that still names the agent is no better than one minted
    /// before), and, bound to a task, the task still live (ended early, its
    /// tokens end with it).
    fn active(&self, t: &Checked) -> Result<bool, ExchangeError> {
        let jti = t.str("jti").unwrap_or_default();
        let revoked = self.backend.token_ledger().is_revoked(jti).map_err(|e| {
            tracing::error!("token service: cannot read revocations: {e}");
            err(
                "temporarily_unavailable",
                "revocations cannot be read now; retry",
            )
        })?;
        if revoked {
            return Ok(false);
        }
        if t.agents()
            .iter()
            .any(|a| self.backend.decommissioned_at(a).is_some())
        {
            return Ok(false);
        }
        let Some(task) = t.str("task_id") else {
            return Ok(true);
        };
        let agent = t.str("client_id").unwrap_or_default();
        let live = self.backend.live_task(agent, task).map_err(|e| {
            tracing::error!("token service: cannot read tasks: {e}");
            err("temporarily_unavailable", "tasks cannot be read now; retry")
        })?;
        Ok(live.is_some())
    }

    /// The agent whose client assertion `form` carries, the assertion spent
    /// (it is single-use).
    async fn authenticate_client(&self, form: &TokenForm) -> Result<Verified, ExchangeError> {
        let client = self
            .authenticate(&form.client.assertion, "invalid_client", "client assertion")
            .await?;
        same_client(form.client.client_id.as_deref(), &client)?;
        self.spend(&[(&client, "invalid_client", "client assertion")])
            .await?;
        Ok(client)
    }

    /// Whether agent `caller` may introspect `t` (RFC 7662 2.2 and 4: only
    /// callers specifically authorized for this token): its own client, or
    /// a client of the service (`[token_service.clients.CALLER]`) that
    /// serves the token's tenant. Anyone else learns nothing, not even that
    /// the token exists: tenants stay apart.
    fn may_introspect(&self, caller: &str, t: &Checked) -> bool {
        if t.str("client_id") == Some(caller) {
            return true;
        }
        let tenant = t.str("tenant");
        self.clients
            .get(caller)
            .is_some_and(|c| c.tenants.iter().any(|s| Some(s.as_str()) == tenant))
    }

    /// `POST /oauth/introspect`: an authenticated agent may ask about the
    /// tokens [`Self::may_introspect`] lets it see; any other token is
    /// `{"active": false}`.
    pub async fn introspect(&self, body: &[u8], authorization: Option<&str>) -> Reply {
        let answer = async {
            let form = token_form(body, authorization)?;
            let caller = self.authenticate_client(&form).await?;
            let now = now_secs();
            let Some(t) = self.check(&form.token, now).await? else {
                return Ok::<_, ExchangeError>(json!({ "active": false }));
            };
            if !self.may_introspect(&caller.agent, &t) || !self.active(&t)? {
                return Ok(json!({ "active": false }));
            }
            let mut out = Map::new();
            out.insert("active".into(), Value::Bool(true));
            for k in [
                "iss",
                "sub",
                "aud",
                "exp",
                "iat",
                "nbf",
                "jti",
                "client_id",
                "scope",
                "act",
                "tenant",
                "txn",
                "use_case",
                "task_id",
            ] {
                if let Some(v) = t.claims.get(k) {
                    out.insert(k.into(), v.clone());
                }
            }
            out.insert("token_type".into(), Value::String("Bearer".into()));
            Ok(Value::Object(out))
        }
        .await;
        match answer {
            Ok(body) => Reply::ok(body),
            Err(e) => Reply::error(&e),
        }
    }

    /// `POST /oauth/revoke`: the client that a token was issued to revokes
    /// it; an unknown or invalid token is answered 200 (RFC 7009 2.2).
    pub async fn revoke(&self, body: &[u8], peer: &str, authorization: Option<&str>) -> Reply {
        let mut ev = AuditEvent::new("oauth.revoke", AuditActor::Daemon, Outcome::Ok);
        let mut authenticated = false;
        let result = async {
            let form = token_form(body, authorization)?;
            let client = self.authenticate_client(&form).await?;
            authenticated = true;
            ev.agent = AgentId::new(&client.agent).ok();
            let now = now_secs();
            let Some(t) = self.check(&form.token, now).await? else {
                ev.detail = Some("not an active token of this service: nothing to revoke".into());
                return Ok(());
            };
            // A token the client may not even introspect (another tenant's)
            // is answered as an unknown one: black-box finding, the refusal
            // told one tenant that a token of another was genuine.
            if !self.may_introspect(&client.agent, &t) {
                ev.detail = Some("not a token this client may see: nothing revoked".into());
                return Ok(());
            }
            if t.str("client_id") != Some(client.agent.as_str()) {
                return Err(err(
                    "unauthorized_client",
                    format!(
                        "the token was not issued to agent `{}`: only its client may revoke it",
                        client.agent
                    ),
                ));
            }
            let jti = t.str("jti").unwrap_or_default();
            let exp = t.int("exp").unwrap_or(now);
            self.backend
                .token_ledger()
                .revoke(jti, exp, now)
                .map_err(|e| {
                    tracing::error!("token service: cannot record a revocation: {e}");
                    err(
                        "temporarily_unavailable",
                        "the revocation cannot be recorded now; retry",
                    )
                })?;
            ev.detail = Some(format!("jti {jti}"));
            Ok(())
        }
        .await;
        ev.detail = Some(match &ev.detail {
            Some(d) => format!("{d}; from {peer}"),
            None => format!("from {peer}"),
        });
        let reply = match result {
            Ok(()) => Reply {
                status: 200,
                body: None,
            },
            Err(e) => {
                ev.outcome = Outcome::Refused;
                ev.error = Some(e.to_string());
                Reply::error(&e)
            }
        };
        self.audit_as(ev, authenticated).await;
        reply
    }

    /// Whether every token naming `agent` issued (`iat`) at `issued_at` is
    /// refused: what verifies a decommission's `tokens` item. For each key
    /// set (the default and each tenant's), probe tokens with that `iat`,
    /// signed by its current key — one with the agent as client, one naming
    /// it only deep in an `act` chain — go through introspection's own path
    /// (`check`, `active`) and must come out inactive. A
    /// probe is never logged, audited, persisted, recorded in the ledger or
    /// returned. `Err` says why not.
    pub async fn refuses_tokens_of(&self, agent: &str, issued_at: i64) -> Result<(), String> {
        let now = now_secs();
        // Not an agent id (`:`), so nothing but `agent` is decommissioned.
        let other = "keyturn:probe";
        for set in &self.keys {
            if self.signer_retired(set) {
                // It publishes no key: none of its tokens passes `check`.
                continue;
            }
            let iss = &set.policy.issuer;
            let (_, key) = self
                .signing_key(set)
                .await
                .map_err(|e| format!("key set of {iss}: {}", e.description))?;
            let probes = [
                ("as client", agent, json!({ "sub": agent })),
                (
                    "in an act chain",
                    other,
                    json!({ "sub": other, "act": { "sub": agent } }),
                ),
            ];
            for (how, client_id, act) in probes {
                let claims = json!({
                    "iss": iss,
                    "sub": other,
                    "aud": other,
                    "iat": issued_at,
                    "exp": now.max(issued_at).saturating_add(60),
                    "jti": format!("{other}:{issued_at}"),
                    "client_id": client_id,
                    "act": act,
                });
                let mut header = jsonwebtoken::Header::new(Algorithm::EdDSA);
                header.typ = Some("at+jwt".into());
                header.kid = Some(key.kid.clone());
                let probe = jsonwebtoken::encode(&header, &claims, &key.key)
                    .map(SecretValue::from_string)
                    .map_err(|_| format!("key set of {iss}: the key cannot sign a probe"))?;
                let Some(checked) = self.check(&probe, now).await.map_err(|e| e.description)?
                else {
                    return Err(format!(
                        "a probe signed by the current key of {iss} (kid {}) does not pass the token check, so the refusal proves nothing",
                        key.kid
                    ));
                };
                if self.active(&checked).map_err(|e| e.description)? {
                    return Err(format!(
                        "a token of {iss} naming agent {agent} {how}, issued at its decommission, is still active"
                    ));
                }
            }
        }
        Ok(())
    }
}
