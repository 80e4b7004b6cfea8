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

use serde::{Deserialize, Deserializer, Serialize};

use super::catalog::CredEntry;
use crate::targets::TargetConfig;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Footprint {
    /// Vault names, the primary first.
    pub vaults: Vec<String>,
    /// The path in the vaults; absent for the default `agents/AGENT/CREDENTIAL`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// The target's own config (its JSON form); absent for `none`.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "stored_target"
    )]
    pub target: Option<TargetConfig>,
    pub owner: String,
    pub tenant: String,
    /// The files (or bundle directories) the credential's sinks deliver
    /// to. Only in a holding (`Footprint::holding`), not in a rotation's.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub files: Vec<std::path::PathBuf>,
    /// Followed (`mode = "follow"`): the vaults and the target are the
    /// rotator's; a decommission here only takes the files back.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub follow: bool,
    /// The agent's tier, for the SLA of a decommission from state alone.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub tier: String,
    /// Where the credential held versions before the config moved it
    /// (another `path` or `vault`), while one is still held there: its
    /// previous version is retired there when its grace ends. Only in a
    /// holding.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub moved_from: Vec<HeldAt>,
    /// The targets versions of the credential were set on other than
    /// `target` (the config changed it since, e.g. a postgres `role`): a
    /// decommission revokes at each too. Only at a decision, from the
    /// footprints of the rotations that made the versions state holds.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub targets_from: Vec<TargetConfig>,
}

/// A path in a vault.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeldAt {
    pub vault: String,
    pub path: String,
}

/// A stored target in today's form or in the one written before targets
/// owned their config (see [`TargetConfig::from_stored`]).
fn stored_target<'de, D: Deserializer<'de>>(d: D) -> Result<Option<TargetConfig>, D::Error> {
    let value = Option::<serde_json::Value>::deserialize(d)?;
    value
        .map(|v| TargetConfig::from_stored(v).map_err(serde::de::Error::custom))
        .transpose()
}

impl Footprint {
    pub fn of(entry: &CredEntry) -> Footprint {
        Footprint {
            vaults: entry.vaults.iter().map(|h| h.config.name.clone()).collect(),
            path: entry.path.as_deref().map(str::to_owned),
            target: (!entry.policy.target.is_none()).then(|| entry.policy.target.clone()),
            owner: entry.agent.owner.clone(),
            tenant: entry.agent.tenant.clone(),
            files: Vec::new(),
            follow: false,
            tier: String::new(),
            moved_from: Vec::new(),
            targets_from: Vec::new(),
        }
    }

    /// Everything `entry` holds, for a decommission: where its versions
    /// are, its target, the files its sinks deliver to, and its agent's tier.
    /// Persisted with every delivery (`Write::Holding`), so a credential
    /// that left the config can still be revoked from state alone.
    pub fn holding(entry: &CredEntry) -> Footprint {
        Footprint {
            files: entry
                .sinks
                .iter()
                .filter_map(|s| s.delivered_path())
                .map(Into::into)
                .collect(),
            follow: entry.policy.follow.is_some(),
            tier: entry.agent.tier.clone(),
            ..Footprint::of(entry)
        }
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("a footprint serialises")
    }

    pub fn parse(text: &str) -> Result<Footprint, String> {
        serde_json::from_str(text).map_err(|e| format!("unreadable footprint: {e}"))
    }

    pub fn target_config(&self) -> TargetConfig {
        self.target.clone().unwrap_or_else(TargetConfig::none)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_target_kind_round_trips_through_json() {
        // Targets as their own JSON form names them (the rotation layer
        // knows no concrete target).
        let targets = [
            None,
            Some(
                serde_json::json!({"type": "postgres", "admin_dsn_file": "/etc/keyturn/pg.dsn",
                "role": "app", "strategy": "alternating_users", "connect_timeout": "2500ms",
                "test_dbname": "postgres"}),
            ),
            Some(
                serde_json::json!({"type": "command", "program": "/usr/local/bin/hook",
                "args": ["--x"], "timeout": "30s", "env": {"MODE": "strict"}}),
            ),
        ];
        for stored in targets {
            let target = stored.map(|v| TargetConfig::from_stored(v).unwrap());
            let fp = Footprint {
                vaults: vec!["bao".into(), "aws".into()],
                path: Some("team/app/db".into()),
                target: target.clone(),
                owner: "alice@example.com".into(),
                tenant: "acme".into(),
                files: vec!["/run/keyturn/a/db".into()],
                follow: true,
                tier: "high".into(),
                moved_from: vec![HeldAt {
                    vault: "bao".into(),
                    path: "team/old/db".into(),
                }],
                targets_from: Vec::new(),
            };
            let back = Footprint::parse(&fp.to_json()).unwrap();
            assert_eq!(back, fp);
            assert_eq!(
                back.target_config(),
                target.unwrap_or_else(TargetConfig::none)
            );
        }
    }

    #[test]
    fn the_json_form_is_stable() {
        // Rows written today must be read by every later keyturn.
        let text = r#"{"vaults":["local"],"target":{"type":"postgres","admin_dsn_file":"/d","role":"r","strategy":"single_user","connect_timeout":"1s"},"owner":"o","tenant":"t"}"#;
        let fp = Footprint::parse(text).unwrap();
        assert_eq!(fp.vaults, vec!["local".to_string()]);
        assert_eq!(fp.path, None);
        assert_eq!(fp.to_json(), text);
    }

    #[test]
    fn rows_written_before_targets_owned_their_config_are_still_read() {
        // The target's part is checked in `targets` (`from_stored`).
        let pg = r#"{"vaults":["local"],"target":{"type":"postgres","admin_dsn_file":"/d","role":"r","alternating_users":true,"connect_timeout_ms":1000},"owner":"o","tenant":"t"}"#;
        let fp = Footprint::parse(pg).unwrap();
        assert!(matches!(fp.target_config(), TargetConfig::Postgres(_)));
        let none = r#"{"vaults":["local"],"owner":"o","tenant":"t"}"#;
        assert!(Footprint::parse(none).unwrap().target_config().is_none());
    }
}
