//! `POST /oauth/token` (and the same exchange over the daemon's sockets):
//! client and actor authentication, single-use `jti`s, the exchange
//! itself, and its audit.

use super::*;

impl TokenService {
    /// `agent`'s accepted keys, from the cache when fresh unless `fresh`.
    pub(super) async fn client_keys(
        &self,
        agent: &str,
        fresh: bool,
    ) -> Result<(Arc<Vec<AgentKey>>, bool), String> {
        // Read before the keys: a retirement committed after this read
        // moves it, so the keys read now are never kept past the next one.
        let generation = self.backend.versions_generation();
        if !fresh
            && let Some((at, seen, k)) = lock(&self.keys_cache).get(agent)
            && at.elapsed() < self.cache_for
            && *seen == generation
        {
            return Ok((k.clone(), true));
        }
        let keys = Arc::new(self.backend.client_keys(agent).await?);
        let mut cache = lock(&self.keys_cache);
        if cache.len() > 10_000 {
            let ttl = self.cache_for;
            cache.retain(|_, (at, seen, _)| at.elapsed() < ttl && *seen == generation);
        }
        cache.insert(
            agent.to_owned(),
            (std::time::Instant::now(), generation, keys.clone()),
        );
        Ok((keys, false))
    }

    /// Checks a private_key_jwt assertion (client or actor); its jti is
    /// spent by [`Self::spend`] before anything is done on its strength.
    pub(super) async fn authenticate(
        &self,
        token: &SecretValue,
        code: &'static str,
        what: &str,
    ) -> Result<Verified, ExchangeError> {
        let refuse = |why: String| err(code, format!("the {what} is refused: {why}"));
        let Some(token) = token.expose_str() else {
            return Err(refuse("it is not UTF-8 text".into()));
        };
        let claimed = self
            .verifier
            .claimed_agent(token)
            .map_err(|e| refuse(e.to_string()))?;
        // A decommission takes effect at once, whatever the cache holds.
        if self.backend.decommissioned_at(&claimed.agent).is_some() {
            return Err(refuse(format!("agent {} is decommissioned", claimed.agent)));
        }
        let (keys, cached) = self
            .client_keys(&claimed.agent, false)
            .await
            .map_err(refuse)?;
        let verified = match self.verifier.check(token, &claimed, &keys) {
            Err(
                crate::auth::AssertionError::BadSignature(_)
                | crate::auth::AssertionError::UnknownKid { .. }
                | crate::auth::AssertionError::NoKey(_),
            ) if cached => {
                let (keys, _) = self
                    .client_keys(&claimed.agent, true)
                    .await
                    .map_err(refuse)?;
                self.verifier.check(token, &claimed, &keys)
            }
            r => r,
        }
        .map_err(|e| refuse(e.to_string()))?;
        if !self.names_the_service_for(&verified) {
            return Err(refuse(format!(
                "its aud names no issuer of a tenant agent {} is a client of: name the service's issuer, its token endpoint, or the issuer of a tenant in the client's `tenants`",
                verified.agent
            )));
        }
        Ok(verified)
    }

    /// Whether an assertion's `aud` names this service for its agent: the
    /// service's issuer or token endpoint, or the issuer of a tenant with a
    /// key of its own that the agent is a client of (black-box finding: an
    /// assertion naming another tenant's issuer was taken).
    fn names_the_service_for(&self, v: &crate::auth::Verified) -> bool {
        let tenants = self
            .clients
            .get(&v.agent)
            .map_or(&[][..], |c| c.tenants.as_slice());
        let token_endpoint = format!("{}{TOKEN_PATH}", self.base);
        v.aud.iter().any(|aud| {
            *aud == token_endpoint
                || self.keys.iter().any(|k| {
                    k.policy.issuer == *aud && k.tenant.as_ref().is_none_or(|t| tenants.contains(t))
                })
        })
    }

    /// Spends the jtis of checked assertions, each with the error code and
    /// name to refuse it with if it was spent before (a replay).
    pub(super) async fn spend(
        &self,
        assertions: &[(&Verified, &'static str, &str)],
    ) -> Result<(), ExchangeError> {
        let fresh = self.spend_each(assertions).await?;
        refuse_replayed(assertions, &fresh)
    }

    /// Spends the jtis of checked assertions: for each, whether it was not
    /// spent before (each fresh one is spent now, whatever the others were).
    async fn spend_each(
        &self,
        assertions: &[(&Verified, &'static str, &str)],
    ) -> Result<Vec<bool>, ExchangeError> {
        let jtis = assertions
            .iter()
            .map(|(v, _, _)| (v.agent.clone(), v.jti.clone(), v.keep_until()))
            .collect();
        self.backend.spend_jtis(jtis).await.map_err(|e| {
            tracing::error!("token service: cannot record assertion jtis: {e}");
            err(
                "temporarily_unavailable",
                "the single-use check cannot be recorded now; retry",
            )
        })
    }

    /// `POST /oauth/token`; `authorization` is the scheme of the request's
    /// `Authorization` header, if any (one authentication method only).
    pub async fn token(&self, body: &[u8], peer: &str, authorization: Option<&str>) -> Reply {
        let mut ev = AuditEvent::new("oauth.token", AuditActor::Daemon, Outcome::Ok);
        let mut authenticated = false;
        let result = self
            .issue(body, authorization, &mut ev, &mut authenticated)
            .await;
        let result = self
            .audited(ev, result, format!("from {peer}"), authenticated)
            .await;
        match result {
            Ok(issued) => Reply::ok(answer(&issued)),
            Err(e) => Reply::error(&e),
        }
    }

    /// A token exchange for `agent`, which the caller already authenticated
    /// (the daemon's sockets: by the peer's uid, `by` says how, for the
    /// audit). The rest is [`Self::token`]'s: the same checks, the same
    /// token, the same error codes. A decommissioned agent and one that is
    /// not a client of the service are refused; an `actor_token`, if sent,
    /// must be the same agent's assertion (checked and its `jti` spent as
    /// over HTTP) and caps the token's lifetime; without one the policy's
    /// TTL does.
    pub async fn token_for_agent(
        &self,
        agent: &str,
        req: AgentExchange,
        by: Authenticated,
    ) -> Result<Issued, ExchangeError> {
        let mut ev = AuditEvent::new("oauth.token", by.actor, Outcome::Ok);
        ev.agent = AgentId::new(agent).ok();
        let result = async {
            if self.backend.decommissioned_at(agent).is_some() {
                return Err(err(
                    "invalid_client",
                    format!("agent {agent} is decommissioned"),
                ));
            }
            request::subject_token_type(req.subject_token_type)?;
            if req.subject_token.expose().is_empty() {
                return Err(err("invalid_request", "subject_token is missing"));
            }
            let valid_until = match &req.actor_token {
                None => None,
                Some(token) => {
                    let actor = self
                        .authenticate(token, "invalid_request", "actor_token")
                        .await?;
                    self.spend(&[(&actor, "invalid_request", "actor_token")])
                        .await?;
                    if actor.agent != agent {
                        return Err(err(
                            "invalid_request",
                            format!(
                                "the actor_token is agent `{}`'s, but the client is `{agent}`: an agent acts only as itself",
                                actor.agent
                            ),
                        ));
                    }
                    u64::try_from(actor.exp).ok()
                }
            };
            self.grant(agent, valid_until, &req.subject_token, req.params, &mut ev)
                .await
        }
        .await;
        // The caller authenticated the agent (its refusals are its own).
        self.audited(ev, result, by.how, true).await
    }

    /// Audits the outcome of an exchange (`note` says where it came from
    /// and how the client was authenticated) and hands it back; a refusal
    /// before the client `authenticated` is audited as such
    /// ([`Backend::audit_unauthenticated`]).
    async fn audited(
        &self,
        mut ev: AuditEvent,
        result: Result<Issued, ExchangeError>,
        note: String,
        authenticated: bool,
    ) -> Result<Issued, ExchangeError> {
        ev.detail = Some(match &ev.detail {
            Some(d) => format!("{d}; {note}"),
            None => note,
        });
        if let Err(e) = &result {
            ev.outcome = if e.code == "server_error" {
                Outcome::Failed
            } else {
                Outcome::Refused
            };
            ev.error = Some(e.to_string());
        }
        self.audit_as(ev, authenticated).await;
        result
    }

    /// Audits `ev` fully when the client `authenticated`, else as a
    /// refusal of an unauthenticated request (rate-limited by the daemon).
    pub(super) async fn audit_as(&self, ev: AuditEvent, authenticated: bool) {
        if authenticated || ev.outcome == Outcome::Ok {
            self.backend.audit(ev).await;
        } else {
            self.backend.audit_unauthenticated(ev).await;
        }
    }

    /// `POST /oauth/token` once parsed: client and actor authentication
    /// (private_key_jwt), then [`Self::grant`]. `authenticated` is set once
    /// the client's (and actor's) assertions are checked and spent.
    async fn issue(
        &self,
        body: &[u8],
        authorization: Option<&str>,
        ev: &mut AuditEvent,
        authenticated: &mut bool,
    ) -> Result<Issued, ExchangeError> {
        let req = request::parse(body, authorization)?;
        let client = self
            .authenticate(&req.client.assertion, "invalid_client", "client assertion")
            .await?;
        ev.agent = AgentId::new(&client.agent).ok();
        same_client(req.client.client_id.as_deref(), &client)?;
        let actor = self
            .authenticate(&req.actor_token, "invalid_request", "actor_token")
            .await?;
        let assertions = [
            (&client, "invalid_client", "client assertion"),
            (&actor, "invalid_request", "actor_token"),
        ];
        let fresh = self.spend_each(&assertions).await?;
        // The client proved itself with a fresh assertion (spent now): what
        // is refused from here on is its own, audited as such, a replayed
        // actor token included (black-box finding: those were counted with
        // the unauthenticated refusals of the listener).
        *authenticated = fresh.first() == Some(&true);
        refuse_replayed(&assertions, &fresh)?;
        if actor.agent != client.agent {
            return Err(err(
                "invalid_request",
                format!(
                    "the actor_token is agent `{}`'s, but the client is `{}`: an agent acts only as itself",
                    actor.agent, client.agent
                ),
            ));
        }
        self.grant(
            &client.agent,
            u64::try_from(actor.exp).ok(),
            &req.subject_token,
            req.params,
            ev,
        )
        .await
    }

    /// The exchange for an authenticated `agent` (the actor; its credential
    /// valid until `valid_until`, if known): the subject token, the task,
    /// the exchange itself, the signing key's use recorded, the audit detail.
    async fn grant(
        &self,
        agent: &str,
        valid_until: Option<u64>,
        subject_token: &SecretValue,
        mut params: exchange::Params,
        ev: &mut AuditEvent,
    ) -> Result<Issued, ExchangeError> {
        let subject = self
            .subjects
            .validate(subject_token.expose_str().unwrap_or(""))
            .await
            .map_err(|e| {
                err(
                    e.oauth_error(),
                    format!("the subject_token is refused: {e}"),
                )
            })?;
        ev.tenant = Some(subject.tenant.clone());
        // Every agent of the subject's delegation chain must still be one: a
        // decommissioned agent's tokens are inactive, and a new token must
        // not carry it on. (The subject's `client_id` is its identity
        // provider's client, not an agent.)
        let mut chain = subject.act.as_ref();
        let mut named: Vec<&str> = Vec::new();
        for _ in 0..=exchange::MAX_ACT_LEVELS {
            let Some(level) = chain else { break };
            named.extend(level.get("sub").and_then(serde_json::Value::as_str));
            chain = level.get("act").and_then(serde_json::Value::as_object);
        }
        if let Some(gone) = named
            .into_iter()
            .find(|a| self.backend.decommissioned_at(a).is_some())
        {
            return Err(err(
                "invalid_grant",
                format!(
                    "the subject_token names agent `{}` in its delegation chain, and that agent is decommissioned",
                    gone.chars().take(64).collect::<String>()
                ),
            ));
        }
        if let Some(id) = &params.task_id {
            // Named in the record, as task records do, refused or not.
            let id_shown = id.chars().take(64).collect::<String>();
            ev.detail = Some(format!("task {id_shown:?}"));
            let task = self
                .backend
                .live_task(agent, id)
                .map_err(|e| {
                    tracing::error!("token service: cannot read tasks: {e}");
                    err("temporarily_unavailable", "tasks cannot be read now; retry")
                })?
                .ok_or_else(|| {
                    err(
                        "invalid_request",
                        format!("task_id {id_shown:?} is not a live task of agent `{agent}`",),
                    )
                })?;
            params.task = Some(task);
        }
        let set = self.signer_for(&subject.tenant);
        let now = now_secs();
        // The policy first: a request it refuses is told so, signing key
        // or not.
        let planned = exchange::plan(
            &set.policy,
            self.clients.get(agent),
            &subject,
            &Actor {
                agent: agent.to_owned(),
                valid_until,
            },
            &params,
            u64::try_from(now).unwrap_or(0),
        )?;
        let (version, key) = self.signing_key(set).await?;
        let issued = planned.sign(&key)?;
        let exp = now.saturating_add(i64::try_from(issued.expires_in).unwrap_or(i64::MAX));
        if let Err(e) = self.note_signed(set, version, exp) {
            // Without the record the key could leave the JWKS before the
            // token expires: refuse rather than issue an unverifiable token.
            tracing::error!("token service: cannot record the signing key's use: {e}");
            return Err(err(
                "server_error",
                "the token service cannot record the issuance now; retry",
            ));
        }
        let task = params
            .task
            .as_ref()
            .map(|t| format!(", task {:?}, run_id {:?}", t.task_id, t.run_id))
            .unwrap_or_default();
        ev.detail = Some(format!(
            "subject {:?} of issuer {}, scope {:?}, aud {:?}, jti {}, kid {}, expires_in {}s{task}",
            subject.sub,
            subject.issuer_name,
            issued.scope,
            issued.aud,
            issued.jti,
            key.kid,
            issued.expires_in
        ));
        Ok(issued)
    }
}

/// The refusal of the first of `assertions` that was not `fresh` (spent
/// before: a replay), with its error code and name.
fn refuse_replayed(
    assertions: &[(&Verified, &'static str, &str)],
    fresh: &[bool],
) -> Result<(), ExchangeError> {
    match assertions.iter().zip(fresh).find(|(_, fresh)| !**fresh) {
        Some(((_, code, what), _)) => Err(err(
            code,
            format!(
                "the {what} is refused: {}",
                crate::auth::AssertionError::Replayed
            ),
        )),
        None => Ok(()),
    }
}
