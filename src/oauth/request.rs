//! The body of `POST /oauth/token` (`application/x-www-form-urlencoded`)
//! parsed into an RFC 8693 request, before any token is looked at.
//!
//! - `grant_type` other than token exchange: `unsupported_grant_type`;
//! - a single-valued parameter twice (RFC 6749 3.2), a missing
//!   `subject_token`/`subject_token_type`, a `subject_token_type` other than
//!   an access token or JWT, a missing `actor_token` (delegation only) or an
//!   `actor_token_type` other than JWT: `invalid_request`;
//! - `client_assertion_type` other than jwt-bearer, or no client assertion:
//!   `invalid_client` (the endpoint answers it with 401); more than one
//!   client authentication method (an `Authorization` header, a
//!   `client_secret`, an assertion): `invalid_request` (RFC 6749 2.3);
//! - unknown parameters are ignored (RFC 6749 3.2); `audience` and
//!   `resource` may repeat. Tokens are kept only as [`SecretValue`]s.

use super::exchange::{ExchangeError, GRANT_TYPE, Params, TOKEN_TYPE_ACCESS_TOKEN, TOKEN_TYPE_JWT};
use crate::model::SecretValue;

/// The largest body read.
pub const MAX_BODY_BYTES: usize = 64 * 1024;
/// `client_assertion_type` of `private_key_jwt` (RFC 7523 2.2).
pub const CLIENT_ASSERTION_TYPE: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

/// A parsed token-exchange request.
pub struct TokenRequest {
    pub params: Params,
    pub subject_token: SecretValue,
    pub subject_token_type: String,
    pub actor_token: SecretValue,
    pub client: ClientAuth,
}

/// How a request authenticates its client: `private_key_jwt` (RFC 7523
/// 2.2), and the `client_id` it names, if any, which must be the client
/// the assertion authenticates (RFC 7521 4.2).
pub struct ClientAuth {
    pub assertion: SecretValue,
    pub client_id: Option<String>,
}

/// The client authentication parameters of a form, as sent.
#[derive(Default)]
pub struct ClientParams {
    pub assertion_type: Option<String>,
    pub assertion: Option<String>,
    pub client_secret: Option<String>,
    pub client_id: Option<String>,
}

impl ClientParams {
    /// Takes `k` if it is one of them: whether it was, `Err` for one sent
    /// twice (RFC 6749 3.2).
    pub fn take(&mut self, k: &str, v: String) -> Result<bool, ExchangeError> {
        let slot = match k {
            "client_assertion_type" => &mut self.assertion_type,
            "client_assertion" => &mut self.assertion,
            "client_secret" => &mut self.client_secret,
            "client_id" => &mut self.client_id,
            _ => return Ok(false),
        };
        if slot.replace(v).is_some() {
            return Err(invalid(
                "invalid_request",
                format!("parameter `{k}` is sent more than once"),
            ));
        }
        Ok(true)
    }

    /// The client's authentication: `private_key_jwt` and one method only
    /// (RFC 6749 2.3: `invalid_request` for two, an `Authorization` header
    /// — `authorization` is its scheme — or a `client_secret` besides the
    /// assertion); no assertion is `invalid_client`.
    pub fn check(self, authorization: Option<&str>) -> Result<ClientAuth, ExchangeError> {
        let assertion_sent = self.assertion_type.is_some() || self.assertion.is_some();
        let methods = [
            authorization.is_some(),
            self.client_secret.is_some(),
            assertion_sent,
        ];
        if methods.iter().filter(|m| **m).count() > 1 {
            return Err(invalid(
                "invalid_request",
                "the request authenticates the client more than one way (RFC 6749 2.3): send only the private_key_jwt assertion, no Authorization header or client_secret",
            ));
        }
        let assertion = self.assertion.filter(|a| !a.is_empty());
        match (self.assertion_type.as_deref(), assertion) {
            (Some(CLIENT_ASSERTION_TYPE), Some(a)) => Ok(ClientAuth {
                assertion: SecretValue::from_string(a),
                client_id: self.client_id,
            }),
            _ => Err(invalid(
                "invalid_client",
                format!(
                    "authenticate with private_key_jwt: client_assertion_type={CLIENT_ASSERTION_TYPE} and client_assertion{}",
                    match (authorization, self.client_secret.is_some()) {
                        (Some(_), _) => " (the Authorization header is not accepted)",
                        (None, true) => " (client_secret is not accepted)",
                        _ => "",
                    }
                ),
            )),
        }
    }
}

fn invalid(code: &'static str, d: impl Into<String>) -> ExchangeError {
    ExchangeError {
        code,
        description: d.into(),
    }
}

/// `subject_token_type` as sent: an access token or a JWT, else
/// `invalid_request` (the control socket's exchange checks it the same way).
pub fn subject_token_type(sent: Option<String>) -> Result<String, ExchangeError> {
    match sent.filter(|t| !t.is_empty()) {
        Some(t) if t == TOKEN_TYPE_ACCESS_TOKEN || t == TOKEN_TYPE_JWT => Ok(t),
        Some(_) => Err(invalid(
            "invalid_request",
            format!("subject_token_type must be {TOKEN_TYPE_ACCESS_TOKEN} or {TOKEN_TYPE_JWT}"),
        )),
        None => Err(invalid("invalid_request", "subject_token_type is missing")),
    }
}

/// Parses `body`; `authorization` is the scheme of the request's
/// `Authorization` header, if it has one.
pub fn parse(body: &[u8], authorization: Option<&str>) -> Result<TokenRequest, ExchangeError> {
    if body.len() > MAX_BODY_BYTES {
        return Err(invalid(
            "invalid_request",
            format!("the request body is over {MAX_BODY_BYTES} bytes"),
        ));
    }
    const SINGLE: &[&str] = &[
        "grant_type",
        "scope",
        "requested_token_type",
        "subject_token",
        "subject_token_type",
        "actor_token",
        "actor_token_type",
        "task_id",
    ];
    let mut single: std::collections::HashMap<&'static str, String> = Default::default();
    let mut params = Params::default();
    let mut client = ClientParams::default();
    for (k, v) in form_urlencoded::parse(body) {
        // RFC 6749 3.2: "Parameters sent without a value MUST be treated
        // as if they were omitted from the request" (a client library that
        // always sends `scope=` was refused).
        if v.is_empty() {
            continue;
        }
        match k.as_ref() {
            "audience" => params.audience.push(v.into_owned()),
            "resource" => params.resource.push(v.into_owned()),
            other if client.take(other, v.to_string())? => {}
            other => {
                if let Some(name) = SINGLE.iter().find(|n| **n == other)
                    && single.insert(name, v.into_owned()).is_some()
                {
                    return Err(invalid(
                        "invalid_request",
                        format!("parameter `{name}` is sent more than once"),
                    ));
                }
            }
        }
    }
    let mut take = |n: &str| single.remove(n).filter(|v| !v.is_empty());
    match take("grant_type").as_deref() {
        None => return Err(invalid("invalid_request", "grant_type is missing")),
        Some(GRANT_TYPE) => {}
        Some(_) => {
            return Err(invalid(
                "unsupported_grant_type",
                format!("only token exchange ({GRANT_TYPE}) is supported"),
            ));
        }
    }
    let client = client.check(authorization)?;
    let Some(subject_token) = take("subject_token") else {
        return Err(invalid("invalid_request", "subject_token is missing"));
    };
    let subject_token_type = subject_token_type(take("subject_token_type"))?;
    let Some(actor_token) = take("actor_token") else {
        return Err(invalid(
            "invalid_request",
            "actor_token is missing: only delegation is supported, the agent's assertion is the actor token",
        ));
    };
    if take("actor_token_type").as_deref() != Some(TOKEN_TYPE_JWT) {
        return Err(invalid(
            "invalid_request",
            format!("actor_token_type must be {TOKEN_TYPE_JWT}"),
        ));
    }
    params.scope = single.remove("scope");
    params.requested_token_type = single.remove("requested_token_type");
    params.task_id = single.remove("task_id").filter(|t| !t.is_empty());
    Ok(TokenRequest {
        params,
        subject_token: SecretValue::from_string(subject_token),
        subject_token_type,
        actor_token: SecretValue::from_string(actor_token),
        client,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const OK: &str = "grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Atoken-exchange\
&subject_token=SUBJECT-CANARY&subject_token_type=urn%3Aietf%3Aparams%3Aoauth%3Atoken-type%3Aaccess_token\
&actor_token=ACTOR-CANARY&actor_token_type=urn%3Aietf%3Aparams%3Aoauth%3Atoken-type%3Ajwt\
&client_assertion_type=urn%3Aietf%3Aparams%3Aoauth%3Aclient-assertion-type%3Ajwt-bearer\
&client_assertion=CLIENT-CANARY&audience=https%3A%2F%2Fa&resource=https%3A%2F%2Fb&audience=https%3A%2F%2Fc\
&scope=read+write&unknown=1";

    fn code(body: &str) -> &'static str {
        code_with(body, None)
    }

    fn code_with(body: &str, authorization: Option<&str>) -> &'static str {
        match parse(body.as_bytes(), authorization) {
            Ok(_) => "ok",
            Err(e) => {
                assert!(!e.description.contains("CANARY"), "{e}");
                e.code
            }
        }
    }

    #[test]
    fn a_complete_request_parses() {
        let r = parse(OK.as_bytes(), None).unwrap();
        assert_eq!(r.params.audience, vec!["https://a", "https://c"]);
        assert_eq!(r.params.resource, vec!["https://b"]);
        assert_eq!(r.params.scope.as_deref(), Some("read write"));
        assert_eq!(r.subject_token.expose_str(), Some("SUBJECT-CANARY"));
        assert_eq!(r.actor_token.expose_str(), Some("ACTOR-CANARY"));
        assert_eq!(r.client.assertion.expose_str(), Some("CLIENT-CANARY"));
        assert_eq!(r.client.client_id, None);
        let named = parse(format!("{OK}&client_id=bot").as_bytes(), None).unwrap();
        assert_eq!(named.client.client_id.as_deref(), Some("bot"));
        assert_eq!(r.subject_token_type, TOKEN_TYPE_ACCESS_TOKEN);
    }

    #[test]
    fn each_bad_request_gets_its_error_code() {
        let without = |p: &str| {
            OK.split('&')
                .filter(|kv| !kv.starts_with(&format!("{p}=")))
                .collect::<Vec<_>>()
                .join("&")
        };
        assert_eq!(
            code(&OK.replace("token-exchange", "client_credentials")),
            "unsupported_grant_type"
        );
        assert_eq!(code(&without("grant_type")), "invalid_request");
        assert_eq!(code(&without("subject_token")), "invalid_request");
        assert_eq!(code(&without("subject_token_type")), "invalid_request");
        assert_eq!(
            code(&OK.replace("token-type%3Aaccess_token", "token-type%3Aid_token")),
            "invalid_request"
        );
        // Laundering: no actor.
        assert_eq!(code(&without("actor_token")), "invalid_request");
        assert_eq!(code(&without("actor_token_type")), "invalid_request");
        // Unauthenticated client.
        assert_eq!(code(&without("client_assertion")), "invalid_client");
        assert_eq!(code(&without("client_assertion_type")), "invalid_client");
        // RFC 6749 2.3: one client authentication method per request.
        assert_eq!(code_with(OK, Some("Basic")), "invalid_request");
        assert_eq!(code(&format!("{OK}&client_secret=x")), "invalid_request");
        assert_eq!(
            code_with(&without("client_assertion_type"), Some("Basic")),
            "invalid_request"
        );
        // Basic (or a secret) alone: not a method keyturn accepts.
        let no_jwt = without("client_assertion");
        let no_jwt = no_jwt
            .split('&')
            .filter(|kv| !kv.starts_with("client_assertion_type="))
            .collect::<Vec<_>>()
            .join("&");
        assert_eq!(code_with(&no_jwt, Some("Basic")), "invalid_client");
        assert_eq!(code(&format!("{no_jwt}&client_secret=x")), "invalid_client");
        // A parameter twice.
        assert_eq!(
            code(&format!("{OK}&subject_token=OTHER-CANARY")),
            "invalid_request"
        );
        assert_eq!(code(&format!("{OK}&scope=admin")), "invalid_request");
        assert_eq!(
            code(&format!("{OK}&client_id=a&client_id=b")),
            "invalid_request"
        );
        // Too large.
        let big = format!("{OK}&pad={}", "x".repeat(MAX_BODY_BYTES));
        assert_eq!(code(&big), "invalid_request");
        // Garbage never panics.
        for g in ["", "&&&", "=%%%", "grant_type", "\u{0}\u{ff}"] {
            assert_ne!(code(g), "ok");
        }
    }
}
