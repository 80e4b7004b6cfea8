//! The token service's issuers and policies, and the alert rules and sinks.

use super::*;

impl Validator<'_> {
    /// What the token service needs of the rest of the config, checked
    /// here so that `keyturn check` refuses what the daemon would:
    /// - the HTTP listener on a loopback address (it has no TLS: tokens
    ///   must not cross the network in the clear);
    /// - no subject issuer with the service's own `iss` (or a tenant's): its
    ///   tokens would be checked as an outside provider's, by signature
    ///   alone, so a revoked token, or one of a decommissioned agent or an
    ///   ended task, would be exchanged for a fresh one.
    pub(super) fn token_service_beside(
        &mut self,
        daemon: &DaemonConfig,
        ts: &crate::oauth::config::TokenServiceConfig,
        raw: &RawConfig,
    ) {
        if let Some(addr) = daemon.listen
            && !addr.ip().is_loopback()
        {
            self.err(
                Loc::top("daemon").key("listen"),
                format!(
                    "[token_service] needs [daemon] listen on a loopback address (it is {addr}): the listener has no TLS, and access tokens must not cross the network in the clear; listen on 127.0.0.1 and put a TLS proxy in front"
                ),
            );
        }
        let own = ts.issuer.trim_end_matches('/');
        let top = Loc::top("token_service");
        let all = top.key("subject_issuers");
        for (name, issuer) in &raw.subject_issuers {
            let Parsed::Ok(issuer) = issuer else { continue };
            let iss = issuer.issuer.trim_end_matches('/');
            let tenant = iss
                .strip_prefix(own)
                .and_then(|rest| rest.strip_prefix("/tenants/"))
                .is_some_and(|t| !t.is_empty() && !t.contains('/'));
            if iss == own || tenant {
                self.err(
                    all.key(name).key("issuer"),
                    format!(
                        "issuer `{}` is this token service's own: its tokens cannot be subject tokens \
                         (they would be checked by signature alone, so a revoked token, or one of a \
                         decommissioned agent or an ended task, would be exchanged for a fresh one); \
                         an agent acting further on a delegation exchanges the human's token again",
                        issuer.issuer
                    ),
                );
            }
        }
    }

    /// `[token_service.subject_issuers.NAME]`: each checked by the oauth
    /// module; two may not claim the same `iss` (a token would have two sets
    /// of keys and rules).
    pub(super) fn subject_issuers(
        &mut self,
        raw: &RawConfig,
    ) -> BTreeMap<String, crate::oauth::config::SubjectIssuerConfig> {
        let mut out = BTreeMap::new();
        let top = Loc::top("token_service");
        let all = top.key("subject_issuers");
        let mut seen: HashMap<&str, &str> = HashMap::new();
        for (name, issuer) in &raw.subject_issuers {
            let p = all.key(name);
            let id_ok = self.id(&p, "subject issuer", name);
            let Parsed::Ok(issuer) = issuer else { continue };
            if let Some(first) = seen.get(issuer.issuer.as_str()).copied() {
                self.err(
                    p.key("issuer"),
                    format!(
                        "issuer `{}` is already configured in [token_service.subject_issuers.{first}]: one table per `iss`",
                        issuer.issuer
                    ),
                );
                continue;
            }
            seen.insert(issuer.issuer.as_str(), name.as_str());
            if let Some(checked) = issuer.check(self, &p, name)
                && id_ok
            {
                out.insert(name.clone(), checked);
            }
        }
        out
    }

    /// `[issuers.NAME]`: each checked by its plug-in.
    pub(super) fn issuers(
        &mut self,
        raw: &RawConfig,
    ) -> BTreeMap<String, crate::tasks::issuers::IssuerConfig> {
        let mut out = BTreeMap::new();
        let top = Loc::top("issuers");
        for (name, issuer) in &raw.issuers {
            let p = top.key(name);
            let id_ok = self.id(&p, "issuer", name);
            let Parsed::Ok(issuer) = issuer else { continue };
            let before = self.issues.len();
            let mut issuer = issuer.clone();
            issuer.plugin_mut().check(self, p);
            if id_ok && self.issues.len() == before {
                out.insert(name.clone(), issuer);
            }
        }
        out
    }

    /// `[policies.NAME]`: checked by the tasks module, each grant by its issuer.
    pub(super) fn policies(
        &mut self,
        raw: &RawConfig,
        issuers: &BTreeMap<String, crate::tasks::issuers::IssuerConfig>,
    ) -> BTreeMap<String, crate::tasks::policy::Policy> {
        let agents: std::collections::BTreeSet<&str> =
            raw.agents.iter().map(|(n, _)| n.as_str()).collect();
        let policies = raw
            .policies
            .iter()
            .map(|(n, p)| (n.clone(), p.ok()))
            .collect();
        let names: Vec<&str> = raw.issuers.keys().map(String::as_str).collect();
        let lookup = |name: &str| -> Option<&dyn crate::tasks::issuers::IssuerPlugin> {
            issuers.get(name).map(|i| i.plugin())
        };
        // An issuer that failed its own check is still known by name: its
        // grants are not reported as naming an unknown issuer.
        let invalid = |name: &str| raw.issuers.contains_key(name) && !issuers.contains_key(name);
        let scope = crate::tasks::policy::IssuerScope {
            lookup: &lookup,
            names: &names,
            invalid: &invalid,
        };
        crate::tasks::policy::check_all(&policies, &agents, &scope, self)
    }

    /// `[alert_rules]`: every key optional.
    pub(super) fn alert_rules(&mut self, raw: &RawConfig) -> AlertRules {
        let default = AlertRules::default();
        let Some(Parsed::Ok(r)) = &raw.alert_rules else {
            return default;
        };
        let p = Loc::top("alert_rules");
        let failures_warning = r.failures_warning.unwrap_or(default.failures_warning);
        if failures_warning == 0 {
            self.err(
                p.key("failures_warning"),
                "failures_warning must be at least 1 (the number of failed rotations in a row that raises a warning)",
            );
        }
        if let Some(critical) = r.failures_critical
            && critical < failures_warning.max(1)
        {
            self.err(
                p.key("failures_critical"),
                format!(
                    "failures_critical ({critical}) must be at least failures_warning ({failures_warning}): the page comes after the warning"
                ),
            );
        }
        let expiry_critical_before = match r.expiry_critical_before.as_deref().map(str::trim) {
            None => default.expiry_critical_before,
            Some("period") => ExpiryLead::Period,
            Some(text) => {
                let at = p.key("expiry_critical_before");
                if text.starts_with(|c: char| c.is_ascii_digit()) {
                    self.duration(at, text, Zero::Rejected)
                        .map_or(default.expiry_critical_before, ExpiryLead::Fixed)
                } else {
                    self.err(
                        at,
                        format!(
                            "invalid expiry_critical_before `{text}`: write \"period\" (the credential's rotation period) or a duration such as \"6h\""
                        ),
                    );
                    default.expiry_critical_before
                }
            }
        };
        AlertRules {
            failures_warning,
            failures_critical: r.failures_critical,
            expiry_critical_before,
            holdouts: r.holdouts.unwrap_or(default.holdouts),
            resolve_hold: r
                .resolve_hold
                .as_deref()
                .and_then(|t| self.duration(p.key("resolve_hold"), t, Zero::Allowed))
                .unwrap_or(default.resolve_hold),
        }
    }

    /// `max_age` of a credential: longer than a version lives on schedule
    /// (the period, plus grace), else the credential would always be
    /// "expired"; and longer than the period plus `expiry_critical_before`,
    /// else it would be "expiring" before its next rotation is even due.
    /// A followed credential has no schedule here: only the value is checked.
    pub(super) fn max_age(
        &mut self,
        p: &Loc<'_>,
        text: &str,
        period: Option<Duration>,
        grace: Duration,
        rules: Option<&AlertRules>,
    ) -> Option<Duration> {
        let at = p.key("max_age");
        let max_age = self.duration(at, text, Zero::Rejected)?;
        let Some(period) = period else {
            return Some(max_age);
        };
        let fmt = |d: Duration| humantime::format_duration(d).to_string();
        if max_age <= period.saturating_add(grace) {
            self.err(
                at,
                format!(
                    "max_age ({}) must be longer than the rotation period ({}) plus grace ({}): a version is used that long when every rotation runs on time, so the credential would always be \"expired\"",
                    fmt(max_age),
                    fmt(period),
                    fmt(grace)
                ),
            );
            return None;
        }
        if let Some(lead) = rules.and_then(|r| r.expiry_critical_before.for_period(Some(period)))
            && max_age <= period.saturating_add(lead)
        {
            self.err(
                at,
                format!(
                    "max_age ({}) must be longer than the rotation period ({}) plus [alert_rules] expiry_critical_before ({}): otherwise less than that is left before max_age before the next rotation is even due, and a healthy credential pages every period",
                    fmt(max_age),
                    fmt(period),
                    fmt(lead)
                ),
            );
            return None;
        }
        Some(max_age)
    }

    /// `[alerts.NAME]`: each alert sink checked by its plug-in.
    pub(super) fn alerts(
        &mut self,
        raw: &RawConfig,
        tiers: &[String],
    ) -> BTreeMap<String, crate::alerts::AlertSinkConfig> {
        let mut out = BTreeMap::new();
        let alerts_loc = Loc::top("alerts");
        for (name, sink) in &raw.alerts {
            let p = alerts_loc.key(name);
            let id_ok = self.id(&p, "alert sink", name);
            let Parsed::Ok(sink) = sink else { continue };
            let before = self.issues.len();
            let mut sink = sink.clone();
            sink.plugin_mut()
                .check(self, p, &crate::alerts::AlertScope { tiers });
            if id_ok && self.issues.len() == before {
                out.insert(name.clone(), sink);
            }
        }
        out
    }
}
