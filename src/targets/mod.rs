//! Targets: the system a credential unlocks, where a new value is applied
//! (`set`) and tried (`test`) before it is promoted, and where the previous
//! value is retired once its grace period ends.
//!
//! - `none` (the default) is no target at all: a pure shared secret, nothing
//!   to apply, so the engine skips `set` and `test`.
//! - [`postgres`]: `ALTER ROLE ... PASSWORD` over an admin connection, with the
//!   `single_user` and `alternating_users` strategies.
//! - [`command`]: a hook program for any other system (secret on stdin).
//!
//! # Adding a target
//! Write `targets/NAME.rs` (a folder when it is large) holding:
//! - its config struct (`serde::Deserialize`, `Serialize`, `Clone`,
//!   `PartialEq`, `Debug`, `#[serde(deny_unknown_fields)]`), the keys of
//!   `target = { type = "NAME", ... }` as written;
//! - `impl TargetPlugin` for it: `check` reports every problem through the
//!   [`Validator`] and completes the config in place, `build` makes the
//!   [`Target`] (no I/O: connect when a step runs);
//! - the `Target` itself, and its tests.
//!
//! Then add one line to [`TargetConfig`] below, and one to
//! [`TargetConfig::same_place`] (which configs of it reach the same place).
//! Nothing else changes: the config loader, validation and the rotation
//! engine only see the registry.

use std::sync::Arc;

use async_trait::async_trait;

use crate::config::validate::{Loc, Validator};
use crate::model::{CredentialKey, PluginError, SecretValue, VersionNo};
use crate::plugin::registry;

pub mod command;
pub mod postgres;

registry! {
    /// `target = { type = ... }` of a credential: one variant per target.
    /// Serialized into each rotation's footprint.
    #[derive(serde::Serialize)]
    pub enum TargetConfig: TargetPlugin {
        None(NoTarget),
        Postgres(postgres::PostgresConfig),
        Command(command::CommandConfig),
    }
}

impl TargetConfig {
    /// Whether a value set through `self` lands where one set through
    /// `other` does (the same role of the same server, the same hook):
    /// then a config change from one to the other is no change of target,
    /// and nothing set through the earlier one may be revoked (it holds the
    /// current value). Settings that do not move the value (timeouts, pool
    /// sizes, TLS, where the admin DSN file lives) do not count.
    pub fn same_place(&self, other: &TargetConfig) -> bool {
        match (self, other) {
            (TargetConfig::None(_), TargetConfig::None(_)) => true,
            (TargetConfig::Postgres(a), TargetConfig::Postgres(b)) => a.same_place(b),
            (TargetConfig::Command(a), TargetConfig::Command(b)) => a.same_place(b),
            _ => false,
        }
    }
}

/// What the registry needs of a target's config.
pub trait TargetPlugin: std::fmt::Debug + Send + Sync {
    /// Reports every problem of the section at `at` and completes it in
    /// place (relative paths resolved against the config file).
    fn check(&mut self, v: &mut Validator<'_>, at: Loc<'_>);

    /// The target, or `None` when there is nothing to apply. No I/O.
    fn build(&self) -> Result<Option<Arc<dyn Target>>, PluginError>;
}

/// `target = { type = "none" }`, the default: a pure shared secret.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct NoTarget {}

impl TargetPlugin for NoTarget {
    fn check(&mut self, _: &mut Validator<'_>, _: Loc<'_>) {}

    fn build(&self) -> Result<Option<Arc<dyn Target>>, PluginError> {
        Ok(None)
    }
}

impl TargetConfig {
    /// No target (a zero-sized box: no allocation).
    pub fn none() -> TargetConfig {
        TargetConfig::None(Box::default())
    }

    pub fn is_none(&self) -> bool {
        matches!(self, TargetConfig::None(_))
    }

    /// A target config as a rotation's footprint stored it: this enum's
    /// JSON, or the form footprints had before targets owned their config
    /// (durations in `*_ms` integers, `alternating_users` a boolean, `env`
    /// a list of pairs), which is rewritten into today's keys first.
    pub fn from_stored(value: serde_json::Value) -> Result<TargetConfig, String> {
        use serde_json::Value;
        if let Ok(t) = serde_json::from_value::<TargetConfig>(value.clone()) {
            return Ok(t);
        }
        let Value::Object(mut obj) = value else {
            return Err("a stored target is not a JSON object".into());
        };
        if let Some(alternating) = obj.remove("alternating_users") {
            let strategy = if alternating == Value::Bool(true) {
                "alternating_users"
            } else {
                "single_user"
            };
            obj.insert("strategy".into(), strategy.into());
        }
        for (old, new) in [
            ("connect_timeout_ms", "connect_timeout"),
            ("timeout_ms", "timeout"),
        ] {
            if let Some(ms) = obj.remove(old) {
                obj.insert(new.into(), format!("{ms}ms").into());
            }
        }
        if let Some(Value::Array(pairs)) = obj.get("env") {
            let env: serde_json::Map<String, Value> = pairs
                .iter()
                .filter_map(|p| match p.as_array()?.as_slice() {
                    [Value::String(k), v] => Some((k.clone(), v.clone())),
                    _ => None,
                })
                .collect();
            obj.insert("env".into(), Value::Object(env));
        }
        serde_json::from_value(Value::Object(obj)).map_err(|e| format!("stored target: {e}"))
    }

    /// Builds the target; `None` for `none`. No I/O: connections are made
    /// when a step runs, so a target that is down does not stop start-up.
    pub fn build(&self) -> Result<Option<Arc<dyn Target>>, PluginError> {
        self.plugin().build()
    }

    /// The logins a value set through it uses (a postgres target's
    /// roles); none for a hook or no target.
    pub fn logins(&self) -> Vec<String> {
        match self {
            TargetConfig::Postgres(p) => p.roles(),
            _ => Vec::new(),
        }
    }

    /// Revokes every value of `key` at this target ([`Target::revoke`]);
    /// nothing for `none`. For a target the config may no longer name: a
    /// decommission's, or the one a retired version was set on before the
    /// config changed it.
    pub async fn revoke(&self, key: &CredentialKey) -> Result<(), PluginError> {
        match self.build()? {
            Some(t) => t.revoke(key).await,
            None => Ok(()),
        }
    }
}

/// What [`Target::leave`] did: the logins it ended, and those it left
/// because the config uses a login of that name now.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Left {
    pub ended: Vec<String>,
    pub kept: Vec<String>,
}

#[async_trait]
pub trait Target: Send + Sync {
    /// Short description for logs and status (`postgres:invoice_bot`).
    fn describe(&self) -> String;

    /// Applies the pending value at the target. Idempotent per version.
    async fn set(
        &self,
        key: &CredentialKey,
        version: VersionNo,
        value: &SecretValue,
    ) -> Result<(), PluginError>;

    /// Uses the pending value at the target (e.g. logs in with it).
    async fn test(
        &self,
        key: &CredentialKey,
        version: VersionNo,
        value: &SecretValue,
    ) -> Result<(), PluginError>;

    /// Called when the grace period of `previous` ends: the previous value
    /// must stop working where the target can tell values apart (the other
    /// role of `alternating_users`). Idempotent; a no-op by default, which is
    /// right for targets that hold one value at a time.
    async fn retire(&self, _key: &CredentialKey, _previous: VersionNo) -> Result<(), PluginError> {
        Ok(())
    }

    /// The user name `version` logs in as, when the target decides it
    /// (`alternating_users` flips between two roles). Sinks deliver it next
    /// to the password (json/env formats). `None`: the agent's config knows.
    fn login_for(&self, _version: VersionNo) -> Option<String> {
        None
    }

    /// Revokes every value at the target (decommission).
    async fn revoke(&self, key: &CredentialKey) -> Result<(), PluginError>;

    /// The config moved the credential off this target, and `previous`,
    /// the last value set here, retires: it stops working here, and no
    /// login in `keep` (those the config uses now: this credential's
    /// current target's and every other credential's) is touched, since
    /// the current value may be set on one of that name (another
    /// `strategy` on the same role, the same server named another way).
    /// The default ends that one version (`retire`): a hook's `revoke`
    /// ends every value of the credential by name, the current one too
    /// when only the hook's `args` changed (black-box finding).
    async fn leave(
        &self,
        key: &CredentialKey,
        previous: VersionNo,
        keep: &[String],
    ) -> Result<Left, PluginError> {
        let _ = keep;
        self.retire(key, previous).await?;
        Ok(Left::default())
    }

    /// Health: can we reach the target and use it as the steps do, changing
    /// nothing? (`keyturn check --online`.)
    async fn check(&self) -> Result<(), PluginError>;

    /// What [`Target::check`] cannot prove, for `keyturn check --online` to
    /// say next to its `ok` (a hook is not run: that would be a step).
    fn check_caveat(&self) -> Option<&'static str> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use command::CommandConfig;
    use postgres::{PgStrategy, PostgresConfig};

    fn stored(text: &str) -> TargetConfig {
        TargetConfig::from_stored(serde_json::from_str(text).unwrap()).unwrap()
    }

    #[test]
    fn stored_targets_of_the_old_form_are_read() {
        let TargetConfig::Postgres(c) = stored(
            r#"{"type":"postgres","admin_dsn_file":"/d","role":"r","alternating_users":true,"connect_timeout_ms":1000,"test_dbname":"t"}"#,
        ) else {
            panic!("a postgres target");
        };
        assert_eq!(c.strategy(), Some(PgStrategy::AlternatingUsers));
        assert_eq!(c.connect_timeout(), std::time::Duration::from_millis(1000));
        assert_eq!(
            (c.role.as_str(), c.test_dbname.as_deref()),
            ("r", Some("t"))
        );

        let TargetConfig::Command(c) = stored(
            r#"{"type":"command","program":"/h","args":["a"],"timeout_ms":30000,"env":[["MODE","strict"]]}"#,
        ) else {
            panic!("a command target");
        };
        assert_eq!(c.timeout(), std::time::Duration::from_secs(30));
        assert_eq!(c.args, vec!["a".to_string()]);
        assert_eq!(c.env.get("MODE").map(String::as_str), Some("strict"));
    }

    #[test]
    fn every_target_round_trips_through_its_json_form() {
        let pg = PostgresConfig {
            connect_timeout: Some("2500ms".into()),
            test_dbname: Some("postgres".into()),
            ..PostgresConfig::new("/etc/keyturn/pg.dsn", "app")
        }
        .with_strategy(PgStrategy::AlternatingUsers);
        let hook = CommandConfig {
            args: vec!["--x".into()],
            timeout: Some("30s".into()),
            env: [("MODE".to_owned(), "strict".to_owned())].into(),
            ..CommandConfig::new("/usr/local/bin/hook")
        };
        for t in [
            TargetConfig::none(),
            TargetConfig::Postgres(Box::new(pg)),
            TargetConfig::Command(Box::new(hook)),
        ] {
            let json = serde_json::to_value(&t).unwrap();
            assert_eq!(TargetConfig::from_stored(json).unwrap(), t);
        }
    }
}
