//! `[token_service.subject_issuers.NAME]`: the identity providers whose
//! access tokens keyturn accepts as the human's subject token.
//!
//! The raw struct is what the file says; [`RawSubjectIssuer::check`] turns it
//! into a [`SubjectIssuerConfig`] and reports every problem, located, through
//! the config [`Validator`] like every other section.

use std::path::PathBuf;
use std::time::Duration;

use jsonwebtoken::Algorithm;
use serde::Deserialize;

use crate::config::validate::{Loc, Validator, Zero, list};

/// The algorithms a subject issuer may be pinned to. Only asymmetric ones:
/// with HMAC the verifier would hold the issuer's signing secret.
pub const ALLOWED_ALGORITHMS: &[(&str, Algorithm)] = &[
    ("EdDSA", Algorithm::EdDSA),
    ("ES256", Algorithm::ES256),
    ("RS256", Algorithm::RS256),
    ("PS256", Algorithm::PS256),
];

/// `refresh` when unset: how often the key set is fetched again.
pub const DEFAULT_REFRESH: Duration = Duration::from_secs(5 * 60);
/// The floor of `refresh`: an identity provider is not polled harder.
pub const MIN_REFRESH: Duration = Duration::from_secs(30);
/// `skew` when unset, and its ceiling.
pub const DEFAULT_SKEW: Duration = Duration::from_secs(30);
pub const MAX_SKEW: Duration = Duration::from_secs(5 * 60);
/// `typ` when unset. RFC 9068 section 4: a resource server MUST check that
/// `typ` is `at+jwt` (or `application/at+jwt`). That is what tells an access
/// token from an ID token (`typ: JWT`) signed by the same keys, so an ID
/// token is not accepted as a subject token unless the operator lists `JWT`
/// for an identity provider that does not set `at+jwt`.
pub const DEFAULT_TYP: &[&str] = &["at+jwt"];

/// `[token_service]` as written (the fast path reads it in one go).
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTokenService {
    #[serde(default)]
    pub subject_issuers: std::collections::BTreeMap<String, RawSubjectIssuer>,
    pub issuer: Option<String>,
    pub signing_credential: Option<String>,
    pub max_ttl: Option<String>,
    pub max_act_depth: Option<i64>,
    #[serde(default)]
    pub clients: std::collections::BTreeMap<String, RawClient>,
    #[serde(default)]
    pub tenants: std::collections::BTreeMap<String, RawTenantKeys>,
}

/// `[token_service.tenants.NAME]` as written: a tenant with a signing key
/// of its own.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTenantKeys {
    /// `AGENT/CRED`: the ed25519 credential whose current version signs the
    /// tokens of this tenant's subjects.
    pub signing_credential: String,
}

impl RawTokenService {
    /// The scalar keys, apart from the tables.
    pub fn settings(&self) -> RawTokenSettings {
        RawTokenSettings {
            issuer: self.issuer.clone(),
            signing_credential: self.signing_credential.clone(),
            max_ttl: self.max_ttl.clone(),
            max_act_depth: self.max_act_depth,
        }
    }
}

/// The keys `[token_service]` takes (for "unknown key" messages).
pub const TOKEN_SERVICE_KEYS: &[&str] = &[
    "subject_issuers",
    "clients",
    "tenants",
    "issuer",
    "signing_credential",
    "max_ttl",
    "max_act_depth",
];
/// The scalar keys among them.
pub const TOKEN_SERVICE_SETTINGS: &[&str] =
    &["issuer", "signing_credential", "max_ttl", "max_act_depth"];

/// `[token_service]`'s own keys for issued tokens, as written.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTokenSettings {
    /// `iss` of issued tokens: https, or http to a loopback address.
    pub issuer: Option<String>,
    /// `AGENT/CRED`: the ed25519 credential whose current version signs.
    pub signing_credential: Option<String>,
    pub max_ttl: Option<String>,
    pub max_act_depth: Option<i64>,
}

/// `[token_service.clients.AGENT]` as written.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawClient {
    pub scopes: Vec<String>,
    pub audiences: Vec<String>,
    /// Default: the agent's own `tenant`.
    pub tenants: Option<Vec<String>>,
    /// Default and ceiling: `max_ttl`.
    pub ttl: Option<String>,
}

/// `[token_service]` for issued tokens, checked.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenServiceConfig {
    pub issuer: String,
    pub signing_credential: crate::model::CredentialKey,
    pub max_ttl: Duration,
    pub max_act_depth: usize,
    /// By agent name.
    pub clients: std::collections::BTreeMap<String, super::exchange::ClientPolicy>,
    /// The tenants with a signing key of their own, and that key.
    pub tenant_keys: std::collections::BTreeMap<String, crate::model::CredentialKey>,
}

/// The ceiling of `max_act_depth`.
pub const MAX_ACT_DEPTH_CEILING: i64 = 16;

/// One issuer as written.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSubjectIssuer {
    /// The exact `iss` of its tokens.
    pub issuer: String,
    /// The audiences naming this token service (string or list): a token's
    /// `aud` must contain one of them.
    pub audience: StringList,
    /// The algorithms its tokens are signed with (pinned; required).
    pub algorithms: Vec<String>,
    pub jwks_file: Option<String>,
    pub jwks_url: Option<String>,
    pub refresh: Option<String>,
    pub skew: Option<String>,
    pub typ: Option<StringList>,
    /// The tenant its subjects belong to.
    pub tenant: String,
}

/// `"a"` or `["a", "b"]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StringList(pub Vec<String>);

impl<'de> Deserialize<'de> for StringList {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = StringList;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a string or an array of strings")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<StringList, E> {
                Ok(StringList(vec![v.to_owned()]))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<StringList, A::Error> {
                let mut out = Vec::new();
                while let Some(s) = seq.next_element::<String>()? {
                    out.push(s);
                }
                Ok(StringList(out))
            }
        }
        d.deserialize_any(Visitor)
    }
}

/// Where an issuer's keys come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JwksSource {
    File(PathBuf),
    /// https, or http to a loopback address.
    Url(String),
}

/// A checked subject issuer.
#[derive(Debug, Clone, PartialEq)]
pub struct SubjectIssuerConfig {
    /// The `NAME` of its table.
    pub name: String,
    pub issuer: String,
    pub audience: Vec<String>,
    pub algorithms: Vec<Algorithm>,
    pub jwks: JwksSource,
    pub refresh: Duration,
    pub skew: Duration,
    /// Accepted `typ` headers, lower case, without `application/`.
    pub typ: Vec<String>,
    pub tenant: String,
}

/// `typ` compared as RFC 7515 section 4.1.9 says: case-insensitive, with
/// `application/` omitted.
pub fn normalize_typ(t: &str) -> String {
    let t = t.trim().to_ascii_lowercase();
    match t.strip_prefix("application/") {
        Some(rest) => rest.to_owned(),
        None => t,
    }
}

impl RawSubjectIssuer {
    /// Every problem reported through `v`; the config only when there was none.
    pub(crate) fn check(
        &self,
        v: &mut Validator<'_>,
        p: &Loc<'_>,
        name: &str,
    ) -> Option<SubjectIssuerConfig> {
        let before = v.issue_count();
        if self.issuer.is_empty() {
            v.err(
                p.key("issuer"),
                "issuer must not be empty: write the exact `iss` of the identity provider's tokens",
            );
        } else if self.issuer.trim() != self.issuer {
            v.err(p.key("issuer"), "issuer has leading or trailing whitespace: `iss` is compared exactly, so no token would match");
        }
        let audience = self.audience.0.clone();
        if audience.is_empty() {
            v.err(p.key("audience"), "audience must name at least one audience: the `aud` value the identity provider puts in tokens meant for keyturn");
        }
        for (i, a) in audience.iter().enumerate() {
            if a.trim().is_empty() {
                v.err(p.key("audience").index(i), "an audience must not be empty");
            }
        }

        let mut algorithms = Vec::new();
        if self.algorithms.is_empty() {
            v.err(
                p.key("algorithms"),
                format!(
                    "algorithms must not be empty: pin the algorithms the identity provider signs with ({})",
                    list(ALLOWED_ALGORITHMS.iter().map(|(n, _)| *n))
                ),
            );
        }
        for (i, a) in self.algorithms.iter().enumerate() {
            match ALLOWED_ALGORITHMS.iter().find(|(n, _)| n == a) {
                Some((_, alg)) if algorithms.contains(alg) => {
                    v.err(p.key("algorithms").index(i), format!("algorithm `{a}` is listed twice"));
                }
                Some((_, alg)) => algorithms.push(*alg),
                None => v.err(
                    p.key("algorithms").index(i),
                    format!(
                        "algorithm `{a}` is not accepted for subject tokens; choose from {} (asymmetric only: `none` and HMAC never are)",
                        list(ALLOWED_ALGORITHMS.iter().map(|(n, _)| *n))
                    ),
                ),
            }
        }

        let jwks = match (&self.jwks_file, &self.jwks_url) {
            (None, None) => {
                v.err_key(p.key("jwks_url"), "missing key `jwks_url` or `jwks_file`: say where the identity provider's keys are");
                None
            }
            (Some(_), Some(_)) => {
                v.err_key(
                    p.key("jwks_url"),
                    "set either `jwks_file` or `jwks_url`, not both",
                );
                None
            }
            (Some(f), None) => {
                let mut path = PathBuf::from(f);
                v.resolve_path(p.key("jwks_file"), &mut path);
                Some(JwksSource::File(path))
            }
            (None, Some(u)) => {
                let at = p.key("jwks_url");
                let issues = v.issue_count();
                v.url(
                    at,
                    u,
                    &["https", "http"],
                    "https://idp.example.com/.well-known/jwks.json",
                );
                if v.issue_count() == issues && u.starts_with("http://") && !is_loopback_url(u) {
                    v.err(
                        p.key("jwks_url"),
                        format!("plain http is allowed only to a loopback address (127.0.0.1, [::1], localhost): the keys decide whose tokens are trusted; use https for `{u}`"),
                    );
                }
                Some(JwksSource::Url(u.clone()))
            }
        };

        let refresh = v.duration_or(
            p.key("refresh"),
            self.refresh.as_ref(),
            DEFAULT_REFRESH,
            Zero::Rejected,
        );
        if refresh < MIN_REFRESH {
            v.err(
                p.key("refresh"),
                format!("refresh must be at least {}: the identity provider is not polled harder than that", humantime::format_duration(MIN_REFRESH)),
            );
        }
        let skew = v.duration_or(
            p.key("skew"),
            self.skew.as_ref(),
            DEFAULT_SKEW,
            Zero::Allowed,
        );
        if skew > MAX_SKEW {
            v.err(
                p.key("skew"),
                format!(
                    "skew must be at most {}: a larger one keeps expired tokens alive",
                    humantime::format_duration(MAX_SKEW)
                ),
            );
        }
        let typ: Vec<String> = match &self.typ {
            None => DEFAULT_TYP.iter().map(|t| normalize_typ(t)).collect(),
            Some(l) => {
                if l.0.is_empty() {
                    v.err(
                        p.key("typ"),
                        "typ must name at least one accepted `typ` header (RFC 9068: \"at+jwt\")",
                    );
                }
                for (i, t) in l.0.iter().enumerate() {
                    if t.trim().is_empty() {
                        v.err(p.key("typ").index(i), "a typ must not be empty");
                    }
                }
                l.0.iter().map(|t| normalize_typ(t)).collect()
            }
        };
        if self.tenant.trim().is_empty() {
            v.err(
                p.key("tenant"),
                "tenant must not be empty: the tenant this issuer's subjects belong to",
            );
        }
        if v.issue_count() != before {
            return None;
        }
        Some(SubjectIssuerConfig {
            name: name.to_owned(),
            issuer: self.issuer.clone(),
            audience,
            algorithms,
            jwks: jwks?,
            refresh,
            skew,
            typ,
            tenant: self.tenant.trim().to_owned(),
        })
    }
}

/// `[token_service]`'s issued-token keys and its clients, checked against
/// the agents: everything reported through `v`, located; `None` when the
/// section sets none of them (the token service is off) or there was a problem.
pub(crate) fn check_token_service(
    v: &mut Validator<'_>,
    settings: Option<&RawTokenSettings>,
    clients: &std::collections::BTreeMap<String, crate::config::raw::Parsed<RawClient>>,
    tenants: &std::collections::BTreeMap<String, crate::config::raw::Parsed<RawTenantKeys>>,
    agents: &std::collections::BTreeMap<crate::model::AgentId, crate::config::AgentConfig>,
    subject_tenants: Option<&std::collections::BTreeSet<&str>>,
) -> Option<TokenServiceConfig> {
    let empty = RawTokenSettings::default();
    let s = settings.unwrap_or(&empty);
    if *s == empty && clients.is_empty() && tenants.is_empty() {
        return None;
    }
    let before = v.issue_count();
    let top = Loc::top("token_service");
    let issuer = match &s.issuer {
        None => {
            v.err_key(top.key("issuer"), "missing key `issuer`: the `iss` of the tokens keyturn issues (https, e.g. \"https://keyturn.example.com\")");
            String::new()
        }
        Some(u) => {
            let issues = v.issue_count();
            v.url(
                top.key("issuer"),
                u,
                &["https", "http"],
                "https://keyturn.example.com",
            );
            if v.issue_count() == issues && u.starts_with("http://") && !is_loopback_url(u) {
                v.err(
                    top.key("issuer"),
                    format!(
                        "plain http is allowed only to a loopback address: use https for `{u}`"
                    ),
                );
            }
            if v.issue_count() == issues && u.contains(['?', '#']) {
                v.err(
                    top.key("issuer"),
                    format!("issuer `{u}` has a query or a fragment: an issuer identifier has neither (RFC 8414 section 2); write a URL such as \"https://keyturn.example.com\" or with a path"),
                );
            }
            u.clone()
        }
    };
    let signing_credential = match &s.signing_credential {
        None => {
            v.err_key(top.key("signing_credential"), "missing key `signing_credential`: name the ed25519 credential that signs issued tokens, as \"AGENT/CRED\"");
            None
        }
        Some(text) => signing_credential_ref(v, top.key("signing_credential"), text, agents),
    };
    let mut tenant_keys = std::collections::BTreeMap::new();
    let all_tenants = top.key("tenants");
    for (name, raw) in tenants {
        let p = all_tenants.key(name);
        let crate::config::raw::Parsed::Ok(t) = raw else {
            continue;
        };
        if name.is_empty()
            || !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            v.err_key(
                p,
                format!("tenant name {name:?} must be letters, digits, `-` and `_` only: it is part of the tenant's `iss`, JWKS URL and key ids"),
            );
            continue;
        }
        let cred = p.key("signing_credential");
        let Some(key) = signing_credential_ref(v, cred, &t.signing_credential, agents) else {
            continue;
        };
        let shared = (signing_credential.as_ref() == Some(&key))
            .then(|| "[token_service] signing_credential".to_owned())
            .or_else(|| {
                tenant_keys
                    .iter()
                    .find(|(_, k)| **k == key)
                    .map(|(other, _)| format!("[token_service.tenants.{other}]"))
            });
        if let Some(other) = shared {
            v.err(
                cred,
                format!("`{}` already signs for {other}: a tenant's own key must be its own, or the tenants would trust each other's tokens", t.signing_credential),
            );
            continue;
        }
        tenant_keys.insert(name.clone(), key);
    }
    let max_ttl = v.duration_or(
        top.key("max_ttl"),
        s.max_ttl.as_ref(),
        super::exchange::DEFAULT_MAX_TTL,
        Zero::Rejected,
    );
    let max_act_depth = match s.max_act_depth {
        None => super::exchange::DEFAULT_MAX_ACT_DEPTH,
        Some(d) if (1..=MAX_ACT_DEPTH_CEILING).contains(&d) => usize::try_from(d).unwrap_or(1),
        Some(_) => {
            v.err(
                top.key("max_act_depth"),
                format!(
                    "max_act_depth must be from 1 (only the agent acts) to {MAX_ACT_DEPTH_CEILING}"
                ),
            );
            1
        }
    };
    let mut out = std::collections::BTreeMap::new();
    let all_clients = top.key("clients");
    for (name, raw) in clients {
        let p = all_clients.key(name);
        let crate::config::raw::Parsed::Ok(c) = raw else {
            continue;
        };
        let Some(agent) = agents
            .iter()
            .find(|(id, _)| id.as_str() == name)
            .map(|(_, a)| a)
        else {
            v.err(
                p,
                format!(
                    "`{name}` is not a configured agent: a client is an agent in [agents.NAME]"
                ),
            );
            continue;
        };
        let n = v.issue_count();
        if c.scopes.is_empty() {
            v.err(
                p.key("scopes"),
                "scopes must name at least one scope the agent may obtain",
            );
        }
        for (i, sc) in c.scopes.iter().enumerate() {
            if sc.is_empty()
                || !sc
                    .bytes()
                    .all(|b| b == 0x21 || (0x23..=0x5B).contains(&b) || (0x5D..=0x7E).contains(&b))
            {
                v.err(
                    p.key("scopes").index(i),
                    "a scope is printable ASCII without spaces, `\"` or `\\` (RFC 6749 3.3)",
                );
            }
        }
        if c.audiences.is_empty() {
            v.err(p.key("audiences"), "audiences must name at least one audience (resource server) the agent may obtain tokens for");
        }
        for (i, a) in c.audiences.iter().enumerate() {
            if a.trim().is_empty() || a.trim() != a {
                v.err(
                    p.key("audiences").index(i),
                    "an audience must not be empty or have surrounding whitespace",
                );
            }
        }
        let tenants = match &c.tenants {
            None => vec![agent.tenant.clone()],
            Some(t) => {
                if t.is_empty() {
                    v.err(
                        p.key("tenants"),
                        "tenants must name at least one tenant (or leave it out: the agent's own)",
                    );
                }
                // A tenant no subject issuer is of: no subject is ever of
                // it (a typo, most likely).
                for (i, tenant) in t.iter().enumerate() {
                    if let Some(known) = subject_tenants
                        && !known.contains(tenant.as_str())
                    {
                        v.err(
                            p.key("tenants").index(i),
                            format!(
                                "no subject issuer is of tenant `{tenant}`, so no subject ever is; the subject issuers' tenants: {}",
                                if known.is_empty() {
                                    "none".to_owned()
                                } else {
                                    known.iter().map(|t| format!("`{t}`")).collect::<Vec<_>>().join(", ")
                                }
                            ),
                        );
                    }
                }
                t.clone()
            }
        };
        let ttl = v.duration_or(p.key("ttl"), c.ttl.as_ref(), max_ttl, Zero::Rejected);
        if ttl > max_ttl {
            v.err(
                p.key("ttl"),
                format!(
                    "ttl must be at most max_ttl ({})",
                    humantime::format_duration(max_ttl)
                ),
            );
        }
        if v.issue_count() == n {
            out.insert(
                name.clone(),
                super::exchange::ClientPolicy {
                    agent: name.clone(),
                    scopes: c.scopes.clone(),
                    audiences: c.audiences.clone(),
                    tenants,
                    ttl,
                },
            );
        }
    }
    if v.issue_count() != before {
        return None;
    }
    Some(TokenServiceConfig {
        issuer,
        signing_credential: signing_credential?,
        max_ttl,
        max_act_depth,
        clients: out,
        tenant_keys,
    })
}

/// `AGENT/CRED` naming a configured ed25519 credential, else a located
/// error and `None`.
fn signing_credential_ref(
    v: &mut Validator<'_>,
    at: Loc,
    text: &str,
    agents: &std::collections::BTreeMap<crate::model::AgentId, crate::config::AgentConfig>,
) -> Option<crate::model::CredentialKey> {
    let found = text.split_once('/').and_then(|(a, c)| {
        let (id, agent) = agents.iter().find(|(id, _)| id.as_str() == a)?;
        agent
            .credentials
            .iter()
            .find(|(id, _)| id.as_str() == c)
            .map(|(_, cred)| (id, agent, cred))
    });
    match found {
        // Its private key is delivered to the agent, which could then sign
        // any token for any human, scope, audience and client.
        Some((id, agent, cred)) if agent.auth_key.as_ref() == Some(&cred.key.credential) => {
            v.err(at, format!("signing_credential `{text}` is agent `{id}`'s auth_key, whose private key keyturn delivers to that agent: it could sign any token itself; use a credential of its own that no agent authenticates with"));
            None
        }
        None => {
            v.err(at, format!("signing_credential `{text}` is not a configured credential: write \"AGENT/CRED\" naming one with `generate = {{ kind = \"ed25519\" }}`"));
            None
        }
        Some((_, _, cred)) if !matches!(cred.generate, crate::config::GeneratorConfig::Ed25519) => {
            v.err(at, format!("signing_credential `{text}` must be an ed25519 credential: issued tokens are signed with EdDSA"));
            None
        }
        // The same for a sink that hands the value out: whoever reads it
        // (an agent's file, a webhook receiver) could sign any token.
        Some((_, _, cred))
            if let Some((i, sink)) = cred
                .deliver
                .iter()
                .enumerate()
                .find(|(_, s)| hands_out_value(s)) =>
        {
            v.err(at, format!("signing_credential `{text}` is delivered by its `deliver[{i}]` (type {}), which hands its private key out of keyturn: whoever reads it could sign any token; remove that sink (a signing key needs none: its public keys are published in the JWKS)", sink.type_name()));
            None
        }
        // A target is given the value to set (a hook reads it on stdin):
        // it would hold the private key too.
        Some((_, _, cred)) if !cred.target.is_none() => {
            v.err(at, format!("signing_credential `{text}` has a `target` ({}), which is given its private key to set: whoever runs or reads it could sign any token; remove the target (a signing key is used by keyturn alone: its public keys are published in the JWKS)", cred.target.type_name()));
            None
        }
        Some((_, _, cred)) => Some(cred.key.clone()),
    }
}

/// Whether a delivery of `sink` carries the credential's value: a file,
/// a program given it on stdin, a webhook with `include_value` (a signal,
/// a program told only what was delivered, and a notice-only webhook
/// carry none).
fn hands_out_value(sink: &crate::sinks::SinkConfig) -> bool {
    use crate::sinks::SinkConfig;
    match sink {
        SinkConfig::File(_) => true,
        SinkConfig::Exec(e) => e.stdin_value,
        SinkConfig::Webhook(w) => w.include_value,
        SinkConfig::Signal(_) => false,
    }
}

/// Whether an `http://` URL's host is a loopback address.
fn is_loopback_url(u: &str) -> bool {
    let Some(rest) = u.strip_prefix("http://") else {
        return false;
    };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    // Userinfo is not part of the host.
    let hostport = authority.rsplit('@').next().unwrap_or("");
    let host = if let Some(v6) = hostport.strip_prefix('[') {
        v6.split(']').next().unwrap_or("")
    } else {
        hostport.split(':').next().unwrap_or("")
    };
    if host.eq_ignore_ascii_case("localhost") {
        return true;
    }
    host.parse::<std::net::IpAddr>()
        .is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::is_loopback_url;

    #[test]
    fn loopback_urls() {
        assert!(is_loopback_url("http://127.0.0.1:8080/jwks"));
        assert!(is_loopback_url("http://[::1]:80/jwks"));
        assert!(is_loopback_url("http://localhost/jwks"));
        assert!(!is_loopback_url("http://127.0.0.1.evil.example/jwks"));
        assert!(!is_loopback_url("http://idp.example.com/jwks"));
        assert!(!is_loopback_url("http://127.0.0.1@idp.example.com/jwks"));
    }
}
