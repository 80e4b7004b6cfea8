//! `[[agents.credentials]]`: schedule, vault path, follow, generator.

use super::*;

impl Validator<'_> {
    /// Two credentials must not set passwords on one PostgreSQL role: each
    /// rotation would overwrite the other's value, and retiring or
    /// decommissioning either would disable the role for both. (The same
    /// admin DSN file names the same server; two files that name one server
    /// cannot be told apart here.)
    fn target_roles_unique<'r>(
        &mut self,
        p: &Loc<'_>,
        this: CredRef<'r>,
        target: &TargetConfig,
        cross: &mut CrossChecks<'r>,
    ) {
        let TargetConfig::Postgres(pg) = target else {
            return;
        };
        for role in pg.roles() {
            let first = *cross
                .target_roles
                .entry((pg.admin_dsn_file.clone(), role.clone()))
                .or_insert(this);
            if first.agent == this.agent && first.cred == this.cred {
                continue;
            }
            let first = first.path();
            let mut issue = Issue::at(
                p.key("target").key("role").path(),
                format!(
                    "postgres role `{role}` (admin DSN file {}) is also the target of `{first}`: \
                     each rotation would overwrite the other's password, and retiring or decommissioning \
                     either would disable it for both; give each credential its own role",
                    pg.admin_dsn_file.display()
                ),
            );
            issue.related = Some(first);
            self.issues.push(issue);
            return;
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn credential<'r>(
        &mut self,
        p: &Loc<'_>,
        key: Option<CredentialKey>,
        agent_name: &'r str,
        cred_name: &'r str,
        c: &'r RawCredential,
        scope: &Scope<'r>,
        cross: &mut CrossChecks<'r>,
    ) -> Option<CredentialConfig> {
        let this = CredRef {
            agent: agent_name,
            cred: cred_name,
        };
        let before = self.issues.len();

        let mut vaults: Vec<std::sync::Arc<str>> = Vec::with_capacity(c.vault.0.len());
        let vp = p.key("vault");
        if c.vault.0.is_empty() {
            self.err(
                vp,
                "no vault named: write `vault = \"NAME\"` or `vault = [\"NAME\", ...]`",
            );
        }
        for (i, name) in c.vault.0.iter().enumerate() {
            let at = if c.vault.0.len() == 1 {
                vp
            } else {
                vp.index(i)
            };
            match scope.vault_names.get(name.as_str()) {
                Some(shared) if vaults.contains(shared) => {
                    self.err(at, format!("vault `{name}` is listed twice"));
                }
                Some(shared) => vaults.push(shared.clone()),
                None => {
                    let defined = if scope.vault_names.is_empty() {
                        "no vaults are defined (add a [vaults.NAME] table)".to_owned()
                    } else {
                        format!(
                            "defined vaults: {}",
                            list(scope.vault_names.keys().copied())
                        )
                    };
                    self.err(at, format!("unknown vault `{name}`; {defined}"));
                }
            }
        }

        // The default path is not stored (CredentialConfig::vault_path
        // builds it when used); spelled out here only for a message.
        if let Some(s) = &c.path {
            self.vault_path(p.key("path"), s);
        }
        let shown_path = || match &c.path {
            Some(s) => s.clone(),
            None => format!("agents/{agent_name}/{cred_name}"),
        };
        let here = if c.path.is_some() { p.key("path") } else { *p };
        for vault in &vaults {
            if scope
                .change_indexes
                .get(&**vault)
                .is_some_and(|i| *i == shown_path())
            {
                self.err(
                    here,
                    format!(
                        "vault path `{}` is the change_index of vault `{vault}`: keyturn writes its index there; use another path",
                        shown_path()
                    ),
                );
            }
            // The scope's own copy of the name lives as long as the raw file,
            // so the map can borrow it instead of copying.
            let Some((&vault, _)) = scope.vault_names.get_key_value(&**vault) else {
                continue;
            };
            let seen = VaultPathSeen {
                vault,
                cred: this,
                written: c.path.as_deref(),
            };
            if let Some(first) = cross
                .vault_paths
                .first_or_insert(seen.hash(), seen, |a, b| {
                    a.vault == b.vault && a.path_parts().concat_eq(&b.path_parts())
                })
            {
                let first = first.path();
                let mut issue = Issue::at(
                    here.path(),
                    format!(
                        "duplicate vault path: `{}` in vault `{vault}` is also used by `{first}`",
                        shown_path()
                    ),
                );
                issue.related = Some(first);
                self.issues.push(issue);
            }
        }

        let generate = self.generator(&p.key("generate"), &c.generate);
        let target = match &c.target {
            None => TargetConfig::none(),
            Some(t) => {
                let mut t = t.clone();
                t.plugin_mut().check(self, p.key("target"));
                self.target_roles_unique(p, this, &t, cross);
                t
            }
        };

        let follow = self.follow(p, c);
        // Black-box finding: a followed credential on a local vault was
        // accepted and then waited for good: no other keyturn writes it.
        if follow.is_some()
            && let Some(local) = c.vault.0.iter().find(|v| scope.local_vaults.contains(v))
        {
            self.err(
                p.key("mode"),
                format!(
                    "`mode = \"follow\"` on vault `{local}`, a local vault: only this keyturn writes it, so no rotator on another host can put a version there to follow; follow a vault both hosts reach (OpenBao, AWS Secrets Manager, Azure Key Vault)"
                ),
            );
        }
        let schedule = match (&c.schedule, &c.every) {
            // A followed credential is rotated by another keyturn: no
            // schedule here (`follow` reported one that is set).
            _ if follow.is_some() => Some(ScheduleSpec::Every(Duration::MAX)),
            (Some(_), Some(_)) => {
                self.err(
                    p.key("every"),
                    "both `schedule` and `every` are set; use exactly one of them",
                );
                None
            }
            (None, None) => {
                self.err_key(
                    *p,
                    "neither `schedule` nor `every` is set; use exactly one of them (e.g. schedule = \"0 */6 * * *\" or every = \"6h\")",
                );
                None
            }
            (Some(cron), None) => match ScheduleSpec::parse_cron(cron) {
                Ok(s) => Some(s),
                Err(reason) => {
                    self.err(
                        p.key("schedule"),
                        format!("bad cron schedule: {}", one_line(&reason)),
                    );
                    None
                }
            },
            (None, Some(every)) => self
                .duration(p.key("every"), every, Zero::Rejected)
                .map(ScheduleSpec::Every),
        };
        if let Some(period) = schedule
            .as_ref()
            .filter(|_| follow.is_none())
            .and_then(ScheduleSpec::min_period)
            && period < MIN_PERIOD
        {
            let key = if c.every.is_some() {
                "every"
            } else {
                "schedule"
            };
            self.err(
                p.key(key),
                format!(
                    "the rotation period ({}) must be at least {} (`ms` is milliseconds, `m` minutes)",
                    humantime::format_duration(period),
                    humantime::format_duration(MIN_PERIOD)
                ),
            );
        }
        let jitter = self.duration_or(
            p.key("jitter"),
            c.jitter.as_ref(),
            Duration::ZERO,
            Zero::Allowed,
        );
        if let Some(period) = schedule.as_ref().and_then(ScheduleSpec::min_period)
            && !jitter.is_zero()
            && jitter >= period
        {
            self.err(
                p.key("jitter"),
                format!(
                    "jitter ({}) must be shorter than the schedule's shortest period ({})",
                    humantime::format_duration(jitter),
                    humantime::format_duration(period)
                ),
            );
        }
        // The previous version is retired when the next rotation starts at
        // the latest, so a grace longer than the shortest gap between two
        // rotations would be cut short (and `expires_hint` would promise
        // more than that): refused when written, and the default is no
        // longer than that gap. A followed credential has no schedule here.
        let shortest = schedule
            .as_ref()
            .filter(|_| follow.is_none())
            .and_then(ScheduleSpec::min_period);
        let grace = match (&c.grace, shortest) {
            (Some(text), _) => {
                let grace = self.duration(p.key("grace"), text, Zero::Allowed);
                if let (Some(grace), Some(period)) = (grace, shortest)
                    && grace > period
                {
                    let (grace, period) = (
                        humantime::format_duration(grace),
                        humantime::format_duration(period),
                    );
                    let gap = if matches!(schedule, Some(ScheduleSpec::Cron(_))) {
                        ", the shortest gap between two firings of the schedule"
                    } else {
                        ""
                    };
                    self.err(
                        p.key("grace"),
                        format!(
                            "grace ({grace}) is longer than the rotation period ({period}{gap}): the previous version is retired when the next rotation starts, at the latest, so it would stay valid only {period}, not {grace}; set grace to at most {period}, or rotate less often"
                        ),
                    );
                }
                grace.unwrap_or(DEFAULT_GRACE)
            }
            (None, Some(period)) => DEFAULT_GRACE.min(period),
            (None, None) => DEFAULT_GRACE,
        };

        let max_age = c.max_age.as_ref().and_then(|text| {
            // What a version lives on schedule: the widest gap between two
            // rotations (a cron rotation may also come `jitter` late).
            let period = match (&schedule, &follow) {
                (Some(s), None) => crate::config::rotation_period(s, jitter),
                _ => None,
            };
            self.max_age(p, text, period, grace, scope.alert_rules.as_ref())
        });

        let sinks = c.deliver.as_deref().unwrap_or_default();
        let mut deliver = Vec::with_capacity(sinks.len());
        let deliver_loc = p.key("deliver");
        for (i, sink) in sinks.iter().enumerate() {
            let sink_before = self.issues.len();
            let mut sink = sink.clone();
            let mut sink_scope = SinkScope {
                credential: cred_name,
                agent: agent_name,
                keypair: matches!(c.generate, RawGenerator::Ed25519 {}),
                agent_names: &scope.agent_names,
                roots: scope.delivery_roots.as_deref(),
                at: SinkRef {
                    cred: this,
                    index: i,
                },
                claims: &mut cross.deliveries,
            };
            sink.plugin_mut()
                .check(self, deliver_loc.index(i), &mut sink_scope);
            if self.issues.len() == sink_before {
                deliver.push(sink);
            }
        }

        if self.issues.len() != before {
            return None;
        }
        Some(CredentialConfig {
            key: key?,
            vaults: vaults.into_boxed_slice(),
            path: c.path.as_deref().map(Box::from),
            generate: generate?,
            target,
            schedule: schedule?,
            jitter,
            grace,
            deliver,
            follow: follow.flatten(),
            max_age,
        })
    }

    /// `mode` and `poll`: `Some(Some(poll))` for `mode = "follow"`,
    /// `Some(None)` when follow mode is asked for but misconfigured (the
    /// schedule is then not checked: the error says why it must go),
    /// `None` for `mode = "rotate"` (the default).
    pub(super) fn follow(&mut self, p: &Loc<'_>, c: &RawCredential) -> Option<Option<Duration>> {
        let follow = match c.mode.as_deref() {
            None | Some("rotate") => false,
            Some("follow") => true,
            Some(other) => {
                self.err(
                    p.key("mode"),
                    format!(
                        "unknown mode `{other}`; expected \"rotate\" (the default) or \"follow\""
                    ),
                );
                false
            }
        };
        if !follow {
            if c.poll.is_some() {
                self.err(
                    p.key("poll"),
                    "`poll` is only for `mode = \"follow\"`: a rotated credential has a schedule",
                );
            }
            return None;
        }
        let before = self.issues.len();
        let why =
            "this keyturn does not rotate a followed credential (another keyturn does): remove it";
        for (key, set) in [
            ("schedule", c.schedule.is_some()),
            ("every", c.every.is_some()),
            ("jitter", c.jitter.is_some()),
        ] {
            if set {
                self.err(
                    p.key(key),
                    format!("`{key}` with `mode = \"follow\"`: {why}"),
                );
            }
        }
        if c.target
            .as_ref()
            .is_some_and(|t| *t != TargetConfig::none())
        {
            self.err(
                p.key("target"),
                format!("a target with `mode = \"follow\"`: the rotating keyturn applies the value at the target; {why}"),
            );
        }
        let poll = self.duration_or(p.key("poll"), c.poll.as_ref(), DEFAULT_POLL, Zero::Rejected);
        if poll < MIN_POLL {
            self.err(
                p.key("poll"),
                format!(
                    "poll ({}) must be at least {}",
                    humantime::format_duration(poll),
                    humantime::format_duration(MIN_POLL)
                ),
            );
        }
        Some((self.issues.len() == before).then_some(poll))
    }

    /// A path inside a vault: relative, `/`-separated, no `.`/`..`/empty
    /// parts, only [`VAULT_PATH_CHARS`], and not in the pending slot's
    /// namespace ([`RESERVED_VAULT_PREFIX`]). The path ends up in URLs
    /// (OpenBao, Azure), ARNs and SQL keys, so anything a URL or a shell
    /// gives a meaning to (`?`, `#`, `%`, spaces, control bytes) is refused
    /// rather than escaped differently by each vault.
    pub(super) fn vault_path(&mut self, p: Loc<'_>, s: &str) {
        let odd = s
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '/')));
        let problem = if s.is_empty() {
            Some("it is empty".to_owned())
        } else if let Some(c) = odd {
            Some(match c {
                '\0' => "it contains a NUL byte".to_owned(),
                '\n' | '\r' => "it contains a newline".to_owned(),
                ' ' => "it contains a space".to_owned(),
                c if c.is_control() => format!("it contains the control character {c:?}"),
                c => format!("it contains `{c}`"),
            })
        } else if s.starts_with('/') {
            Some("it is absolute".to_owned())
        } else if s.split('/').any(|seg| seg == "..") {
            Some("it contains `..`".to_owned())
        } else if s.split('/').any(|seg| seg == ".") {
            Some("it contains `.`".to_owned())
        } else if s.split('/').any(str::is_empty) {
            Some("it has an empty segment (`//` or a trailing `/`)".to_owned())
        } else if s.split('/').next() == Some(RESERVED_VAULT_PREFIX) {
            Some(format!(
                "`{RESERVED_VAULT_PREFIX}/` is reserved for the pending values of rotations in progress"
            ))
        } else {
            None
        };
        if let Some(why) = problem {
            self.err(
                p,
                format!(
                    "invalid vault path `{}`: {why}; a vault path is relative and `/`-separated, made of {VAULT_PATH_CHARS}, e.g. \"agents/invoice-bot/db\"",
                    s.escape_debug()
                ),
            );
        }
    }

    /// A generator's `length` (32 when unset), checked against its range;
    /// `unit` ends the message (`" bytes"`, or nothing for a password).
    pub(super) fn generated_length(
        &mut self,
        p: &Loc<'_>,
        generator: &str,
        length: Option<usize>,
        min: usize,
        unit: &str,
    ) -> usize {
        let length = length.unwrap_or(32);
        if !(min..=MAX_GENERATED_LEN).contains(&length) {
            self.err(
                p.key("length"),
                format!(
                    "{generator} length {length} is out of range: it must be between {min} and {MAX_GENERATED_LEN}{unit}"
                ),
            );
        }
        length
    }

    pub(super) fn generator(&mut self, p: &Loc<'_>, g: &RawGenerator) -> Option<GeneratorConfig> {
        let before = self.issues.len();
        let out = match g {
            RawGenerator::Password {
                length,
                lowercase,
                uppercase,
                digits,
                symbols,
            } => {
                let length = self.generated_length(p, "password", *length, MIN_PASSWORD_LEN, "");
                let classes = CharClasses {
                    lowercase: lowercase.unwrap_or(true),
                    uppercase: uppercase.unwrap_or(true),
                    digits: digits.unwrap_or(true),
                    symbols: symbols.unwrap_or(false),
                };
                if !classes.any() {
                    self.err(
                        *p,
                        "password has no character class enabled: enable at least one of lowercase, uppercase, digits, symbols",
                    );
                }
                GeneratorConfig::Password { length, classes }
            }
            RawGenerator::RandomBytes { length, encoding } => {
                let length =
                    self.generated_length(p, "random_bytes", *length, MIN_RANDOM_LEN, " bytes");
                GeneratorConfig::RandomBytes {
                    length,
                    encoding: match encoding.unwrap_or(RawEncoding::Hex) {
                        RawEncoding::Hex => ByteEncoding::Hex,
                        RawEncoding::Base64Url => ByteEncoding::Base64Url,
                    },
                }
            }
            RawGenerator::ApiKey { prefix, length } => {
                let length =
                    self.generated_length(p, "api_key", *length, MIN_RANDOM_LEN, " characters");
                let prefix = prefix.clone().unwrap_or_default();
                // The key ends up in env files and HTTP headers: keep the
                // prefix to characters that need no quoting anywhere.
                if !prefix
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.')
                {
                    self.err(
                        p.key("prefix"),
                        format!(
                            "invalid api_key prefix `{prefix}`: use only letters, digits, '_', '-' and '.'"
                        ),
                    );
                }
                GeneratorConfig::ApiKey { prefix, length }
            }
            RawGenerator::Ed25519 {} => GeneratorConfig::Ed25519,
        };
        (self.issues.len() == before).then_some(out)
    }
}
