//! Where a rotation's versions are held: the vaults and the path in them, the
//! target, and the agent's owner and tenant (for the audit record). Persisted
//! with every rotation, so that a previous version whose grace period is
//! running is still retired when its credential has left the config — by a
//! reload, or by a restart with an edited config — instead of staying live
//! in the vault (and at the target) for good.
//!
//! The JSON form is keyturn's own and stable (the config's shape may change;
//! rows written by an older keyturn must still be read): add fields with
//! defaults, never rename one.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::catalog::CredEntry;
use crate::config::{CommandTargetConfig, PgStrategy, PostgresTargetConfig, TargetConfig};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Footprint {
    /// Vault names, the primary first.
    pub vaults: Vec<String>,
    /// The path in the vaults; absent for the default `agents/AGENT/CREDENTIAL`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// Absent for `none`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<TargetSpec>,
    pub owner: String,
    pub tenant: String,
}

/// A target's config, as the footprint keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum TargetSpec {
    Postgres {
        admin_dsn_file: PathBuf,
        role: String,
        alternating_users: bool,
        connect_timeout_ms: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        test_dbname: Option<String>,
    },
    /// `env` is config, not a secret (a hook's environment is readable
    /// through /proc; secrets reach hooks on stdin only).
    Command {
        program: PathBuf,
        args: Vec<String>,
        timeout_ms: u64,
        env: Vec<(String, String)>,
    },
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl Footprint {
    pub fn of(entry: &CredEntry) -> Footprint {
        Footprint {
            vaults: entry.vaults.iter().map(|h| h.config.name.clone()).collect(),
            path: entry.cfg.path.as_deref().map(str::to_owned),
            target: TargetSpec::of(&entry.cfg.target),
            owner: entry.agent.owner.clone(),
            tenant: entry.agent.tenant.clone(),
        }
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("a footprint serialises")
    }

    pub fn parse(text: &str) -> Result<Footprint, String> {
        serde_json::from_str(text).map_err(|e| format!("unreadable footprint: {e}"))
    }

    pub fn target_config(&self) -> TargetConfig {
        match &self.target {
            None => TargetConfig::None,
            Some(TargetSpec::Postgres {
                admin_dsn_file,
                role,
                alternating_users,
                connect_timeout_ms,
                test_dbname,
            }) => TargetConfig::Postgres(Box::new(PostgresTargetConfig {
                admin_dsn_file: admin_dsn_file.clone(),
                role: role.clone(),
                strategy: if *alternating_users {
                    PgStrategy::AlternatingUsers
                } else {
                    PgStrategy::SingleUser
                },
                connect_timeout: Duration::from_millis(*connect_timeout_ms),
                test_dbname: test_dbname.clone(),
            })),
            Some(TargetSpec::Command {
                program,
                args,
                timeout_ms,
                env,
            }) => TargetConfig::Command(Box::new(CommandTargetConfig {
                program: program.clone(),
                args: args.clone(),
                timeout: Duration::from_millis(*timeout_ms),
                env: env.clone(),
            })),
        }
    }
}

impl TargetSpec {
    fn of(cfg: &TargetConfig) -> Option<TargetSpec> {
        match cfg {
            TargetConfig::None => None,
            TargetConfig::Postgres(c) => Some(TargetSpec::Postgres {
                admin_dsn_file: c.admin_dsn_file.clone(),
                role: c.role.clone(),
                alternating_users: c.strategy == PgStrategy::AlternatingUsers,
                connect_timeout_ms: millis(c.connect_timeout),
                test_dbname: c.test_dbname.clone(),
            }),
            TargetConfig::Command(c) => Some(TargetSpec::Command {
                program: c.program.clone(),
                args: c.args.clone(),
                timeout_ms: millis(c.timeout),
                env: c.env.clone(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_target_kind_round_trips_through_json() {
        for target in [
            TargetConfig::None,
            TargetConfig::Postgres(Box::new(PostgresTargetConfig {
                admin_dsn_file: "/etc/keyturn/pg.dsn".into(),
                role: "app".into(),
                strategy: PgStrategy::AlternatingUsers,
                connect_timeout: Duration::from_millis(2500),
                test_dbname: Some("postgres".into()),
            })),
            TargetConfig::Command(Box::new(CommandTargetConfig {
                program: "/usr/local/bin/hook".into(),
                args: vec!["--x".into()],
                timeout: Duration::from_secs(30),
                env: vec![("MODE".into(), "strict".into())],
            })),
        ] {
            let fp = Footprint {
                vaults: vec!["bao".into(), "aws".into()],
                path: Some("team/app/db".into()),
                target: TargetSpec::of(&target),
                owner: "alice@example.com".into(),
                tenant: "acme".into(),
            };
            let back = Footprint::parse(&fp.to_json()).unwrap();
            assert_eq!(back, fp);
            assert_eq!(back.target_config(), target);
        }
    }

    #[test]
    fn the_json_form_is_stable() {
        // Rows written today must be read by every later keyturn.
        let text = r#"{"vaults":["local"],"target":{"type":"postgres","admin_dsn_file":"/d","role":"r","alternating_users":false,"connect_timeout_ms":1000},"owner":"o","tenant":"t"}"#;
        let fp = Footprint::parse(text).unwrap();
        assert_eq!(fp.vaults, vec!["local".to_string()]);
        assert_eq!(fp.path, None);
        assert_eq!(fp.to_json(), text);
    }
}
