//! Config fixtures: one `bad-<rule>.toml` per validation rule, each asserting
//! its *specific* error (message, TOML path, line and column), and the
//! `good-*.toml` files asserting what they load to. Also loads every shipped
//! config under `config/` so an example can never rot.

use std::path::{Path, PathBuf};
use std::time::Duration;

use keyturn::config::{
    AlertRules, ByteEncoding, CharClasses, Config, ConfigError, ExpiryLead, GeneratorConfig,
    load_file,
};
use keyturn::schedule::ScheduleSpec;
use keyturn::sinks::SinkConfig;
use keyturn::sinks::file::FileFormat;
use keyturn::targets::TargetConfig;
use keyturn::vaults::VaultSpec;
use keyturn::vaults::local::LocalConfig;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/config")
        .join(name)
}

fn errors_of(name: &str) -> Vec<ConfigError> {
    match load_file(&fixture(name)) {
        Ok(_) => panic!("{name} loaded, but it must be rejected"),
        Err(e) => e.0,
    }
}

fn load_good(name: &str) -> Config {
    load_file(&fixture(name)).unwrap_or_else(|e| panic!("{name} must load:\n{e}"))
}

/// A config of the tests below: `[daemon]` (relative state and delivery
/// roots, and `daemon_extra`), then `rest` after the agent `bot`'s table
/// (owner, tenant, tier), which `rest` may go on with.
fn bot_config(daemon_extra: &str, vaults: &str, rest: &str) -> String {
    format!(
        r#"
[daemon]
state_dir = "state"
delivery_roots = ["agents"]
{daemon_extra}

{vaults}
[agents.bot]
owner = "alice@example.com"
tenant = "acme"
tier = "high"
{rest}"#
    )
}

/// The vault `bao` of [`bot_config`]s: a remote one (nothing is called).
const BAO_VAULT: &str = r#"[vaults.bao]
type = "vault"
address = "https://vault.example.com:8200"
token_file = "bao-token"
"#;

/// Loads `text` as the config file `file`, which must load.
fn must_load(file: &Path, text: &str) -> Config {
    keyturn::config::load_str(file, text).unwrap_or_else(|e| panic!("must load:\n{e}"))
}

/// (fixture, line, column, TOML path, message substring). Column 0 = not checked.
const BAD: &[(&str, usize, usize, &str, &str)] = &[
    (
        "bad-auth-key-unknown.toml",
        13,
        12,
        "agents.bot.auth_key",
        "unknown credential `signing` for auth_key; agent `bot`'s credentials: `db`",
    ),
    (
        "bad-auth-key-not-ed25519.toml",
        13,
        12,
        "agents.bot.auth_key",
        "auth_key `db` is not an ed25519 keypair",
    ),
    (
        "bad-auth-key-other-agent.toml",
        13,
        12,
        "agents.bot.auth_key",
        "auth_key `signing` is a credential of agent `other`: an agent authenticates with a key of its own",
    ),
    (
        "bad-assertion-audience.toml",
        5,
        22,
        "daemon.assertion_audience",
        "assertion_audience must be a non-empty name",
    ),
    (
        "bad-vault-listed-twice.toml",
        15,
        19,
        "agents.bot.credentials.db.vault[1]",
        "vault `local` is listed twice",
    ),
    (
        "bad-unknown-vault-in-list.toml",
        15,
        19,
        "agents.bot.credentials.db.vault[1]",
        "unknown vault `aws`; defined vaults: `local`",
    ),
    (
        "bad-vault-auth.toml",
        6,
        9,
        "vaults.bao",
        "set exactly one way to log in: `token_file`, `token_env` or `approle",
    ),
    (
        "bad-vault-url.toml",
        8,
        13,
        "vaults.kv.vault_url",
        "invalid URL `http://acme.vault.azure.net`: the scheme must be `https`",
    ),
    (
        "bad-authority-host.toml",
        13,
        18,
        "vaults.kv.authority_host",
        "invalid URL `http://login.example.internal`: the scheme must be `https`",
    ),
    (
        "bad-authority-host-managed-identity.toml",
        10,
        18,
        "vaults.kv.authority_host",
        "authority_host has no effect with auth = \"managed_identity\"",
    ),
    (
        "bad-write-budget.toml",
        9,
        16,
        "vaults.aws.write_budget",
        "write_budget must be a positive number of writes per second",
    ),
    (
        "bad-pg-strategy.toml",
        18,
        89,
        "agents.bot.credentials.db.target.strategy",
        "unknown strategy `round_robin`; expected `single_user` or `alternating_users`",
    ),
    (
        "bad-command-env.toml",
        22,
        9,
        "agents.bot.credentials.api.target.env.KEYTURN_STEP",
        "invalid environment variable `KEYTURN_STEP`: `KEYTURN_*` variables are set by keyturn for each step",
    ),
    (
        "bad-command-args-nul.toml",
        22,
        0,
        "agents.bot.credentials.api.target.args[1]",
        "the argument contains a NUL byte, which a program cannot be given",
    ),
    (
        "bad-exec-env-nul.toml",
        18,
        0,
        "agents.bot.credentials.api.deliver[0].env.MODE",
        "the value of `MODE` contains a NUL byte",
    ),
    (
        "bad-delivery-temp-name.toml",
        18,
        0,
        "agents.bot.credentials.db.deliver[0].path",
        "has the shape of keyturn's temp files",
    ),
    (
        "bad-unknown-key.toml",
        17,
        1,
        "agents.bot.credentials.db.schedul",
        "unknown key `schedul`; expected one of `vault`, `path`, `generate`",
    ),
    (
        "bad-exec-stdin-typo.toml",
        18,
        68,
        "agents.bot.credentials.db.deliver[0].stdin",
        "unknown key `stdin`; expected one of `program`, `args`, `timeout`, `stdin_value`, `env`",
    ),
    (
        "bad-exec-timeout.toml",
        18,
        78,
        "agents.bot.credentials.db.deliver[0].timeout",
        "duration `0s` is zero: it must be greater than zero",
    ),
    (
        "bad-exec-env.toml",
        18,
        76,
        "agents.bot.credentials.db.deliver[0].env.KEYTURN_VERSION",
        "invalid environment variable `KEYTURN_VERSION`: `KEYTURN_*` variables are set by keyturn",
    ),
    (
        "bad-exec-empty-program.toml",
        18,
        75,
        "agents.bot.credentials.db.deliver[1].program",
        "path must not be empty",
    ),
    (
        "bad-unknown-key-in-deliver.toml",
        18,
        46,
        "agents.bot.credentials.db.deliver[0].colour",
        "unknown key `colour`; expected one of `path`, `format`, `mode`, `env_name`",
    ),
    (
        "bad-unknown-vault-type.toml",
        7,
        8,
        "vaults.local.type",
        "unknown value `s3`; expected one of `local`, `vault`, `aws_secrets_manager`, `azure_key_vault`",
    ),
    (
        "bad-cron.toml",
        16,
        12,
        "agents.bot.credentials.db.schedule",
        "bad cron schedule: cron expression has 4 fields",
    ),
    (
        "bad-schedule-and-every.toml",
        17,
        9,
        "agents.bot.credentials.db.every",
        "both `schedule` and `every` are set",
    ),
    (
        "bad-no-schedule.toml",
        14,
        25,
        "agents.bot.credentials.db",
        "neither `schedule` nor `every` is set",
    ),
    (
        "bad-unknown-vault.toml",
        15,
        9,
        "agents.bot.credentials.db.vault",
        "unknown vault `bao`; defined vaults: `local`",
    ),
    (
        "bad-unknown-tier.toml",
        12,
        8,
        "agents.bot.tier",
        "unknown tier `platinum`; defined tiers: `critical`, `high`, `low`, `medium`",
    ),
    (
        "bad-duplicate-table.toml",
        20,
        9,
        "",
        "duplicate key `bot` (in `[agents.bot]`)",
    ),
    (
        "bad-duplicate-vault-path.toml",
        23,
        8,
        "agents.bot.credentials.cache.path",
        "duplicate vault path: `shared/db` in vault `local` is also used by `agents.bot.credentials.db.path` (line 16)",
    ),
    (
        "bad-duplicate-delivery-path.toml",
        24,
        36,
        "agents.bot.credentials.cache.deliver[0].path",
        "also written by `agents.bot.credentials.db.deliver[0].path` (line 18)",
    ),
    (
        "bad-id.toml",
        9,
        9,
        "agents.Invoice-Bot",
        "invalid agent name `Invoice-Bot`: must start with a lowercase letter or digit and contain only [a-z0-9_-]",
    ),
    (
        "bad-vault-path.toml",
        16,
        8,
        "agents.bot.credentials.db.path",
        "invalid vault path `agents/../other/db`: it contains `..`",
    ),
    (
        "bad-vault-path-absolute.toml",
        16,
        8,
        "agents.bot.credentials.db.path",
        "invalid vault path `/agents/bot/db`: it is absolute",
    ),
    (
        "bad-vault-path-reserved.toml",
        16,
        8,
        "agents.bot.credentials.db.path",
        "invalid vault path `keyturn-pending/agents/other/db`: `keyturn-pending/` is reserved",
    ),
    (
        "bad-vault-path-chars.toml",
        16,
        8,
        "agents.bot.credentials.db.path",
        "invalid vault path `agents/bot/db?version=1`: it contains `?`",
    ),
    (
        "bad-azure-unverified-challenge.toml",
        13,
        29,
        "vaults.kv.verify_challenge_resource",
        "verify_challenge_resource = false is only for a loopback stub",
    ),
    (
        "bad-audit-key-in-state-dir.toml",
        5,
        18,
        "daemon.audit_key_file",
        "audit_key_file `/var/lib/keyturn/keys/audit.key` is inside the state directory `/var/lib/keyturn`",
    ),
    (
        "bad-audit-key-beside-log.toml",
        5,
        18,
        "daemon.audit_key_file",
        "is inside the audit log's directory `/var/log/keyturn`",
    ),
    (
        "bad-delivery-root-in-state-dir.toml",
        4,
        29,
        "daemon.delivery_roots[1]",
        "overlaps the state directory",
    ),
    (
        "bad-delivery-other-agents-dir.toml",
        23,
        36,
        "agents.bot.credentials.db.deliver[0].path",
        "is in the directory of agent `other`",
    ),
    (
        "bad-delivery-outside-root.toml",
        18,
        36,
        "agents.bot.credentials.db.deliver[0].path",
        "delivery path `/etc/bot/db` is outside every delivery root",
    ),
    (
        "bad-delivery-dotdot.toml",
        18,
        36,
        "agents.bot.credentials.db.deliver[0].path",
        "delivery path `bot/../../escape` contains `..`",
    ),
    (
        "bad-missing-delivery-roots.toml",
        17,
        36,
        "agents.bot.credentials.db.deliver[0].path",
        "file sinks need `daemon.delivery_roots`",
    ),
    (
        "bad-mode-too-wide.toml",
        18,
        53,
        "agents.bot.credentials.db.deliver[0].mode",
        "file mode 0644 is wider than 0640",
    ),
    (
        "bad-mode-unreadable.toml",
        18,
        53,
        "agents.bot.credentials.db.deliver[0].mode",
        "file mode 0000 lets no one read the secret",
    ),
    (
        "bad-format-keypair.toml",
        18,
        56,
        "agents.bot.credentials.ssh.deliver[0].format",
        "`format` does not apply to credential `ssh`: an ed25519 keypair is delivered as a directory",
    ),
    (
        "bad-mode-not-octal.toml",
        18,
        53,
        "agents.bot.credentials.db.deliver[0].mode",
        "invalid file mode `0498`",
    ),
    (
        "bad-mode-too-long.toml",
        18,
        53,
        "agents.bot.credentials.db.deliver[0].mode",
        "invalid file mode `04440`: it has 5 digits; a mode has at most four, e.g. \"0440\"",
    ),
    (
        "bad-env-name-on-raw.toml",
        18,
        57,
        "agents.bot.credentials.db.deliver[0].env_name",
        "`env_name` applies only to `format = \"env\"`, and this sink writes raw",
    ),
    (
        "bad-zero-duration.toml",
        16,
        9,
        "agents.bot.credentials.db.every",
        "duration `0s` is zero: it must be greater than zero",
    ),
    (
        "bad-negative-duration.toml",
        17,
        9,
        "agents.bot.credentials.db.grace",
        "negative duration `-5m`",
    ),
    (
        "bad-bad-duration.toml",
        6,
        17,
        "daemon.drain_timeout",
        "invalid duration `soon`",
    ),
    (
        "bad-jitter.toml",
        17,
        10,
        "agents.bot.credentials.db.jitter",
        "jitter (2h) must be shorter than the schedule's shortest period (1h)",
    ),
    (
        "bad-grace-longer-than-period.toml",
        17,
        9,
        "agents.bot.credentials.db.grace",
        "grace (30s) is longer than the rotation period (10s): the previous version is retired when the next rotation starts, at the latest, so it would stay valid only 10s, not 30s; set grace to at most 10s, or rotate less often",
    ),
    (
        "bad-grace-cron.toml",
        17,
        9,
        "agents.bot.credentials.db.grace",
        "grace (30m) is longer than the rotation period (15m, the shortest gap between two firings of the schedule)",
    ),
    (
        "bad-password-length.toml",
        17,
        42,
        "agents.bot.credentials.db.generate.length",
        "password length 6 is out of range: it must be between 8 and 4096",
    ),
    (
        "bad-password-no-class.toml",
        17,
        12,
        "agents.bot.credentials.db.generate",
        "password has no character class enabled",
    ),
    (
        "bad-random-bytes-length.toml",
        17,
        46,
        "agents.bot.credentials.db.generate.length",
        "random_bytes length 8 is out of range: it must be between 16 and 4096 bytes",
    ),
    (
        "bad-api-key-length.toml",
        17,
        57,
        "agents.bot.credentials.db.generate.length",
        "api_key length 10 is out of range",
    ),
    (
        "bad-empty-owner.toml",
        10,
        9,
        "agents.bot.owner",
        "owner must not be empty",
    ),
    (
        "bad-empty-tenant.toml",
        11,
        10,
        "agents.bot.tenant",
        "tenant must not be empty",
    ),
    (
        "bad-max-concurrent.toml",
        8,
        18,
        "vaults.local.max_concurrent",
        "max_concurrent must be at least 1",
    ),
    (
        "bad-env-name.toml",
        18,
        73,
        "agents.bot.credentials.db.deliver[0].env_name",
        "invalid env_name `db-password`: it must match [A-Z_][A-Z0-9_]*",
    ),
    (
        "bad-ack-open-keypair.toml",
        18,
        53,
        "agents.bot.credentials.ssh.deliver[0].ack",
        "`ack = \"open\"` cannot watch credential `ssh`: an ed25519 keypair is delivered as a directory",
    ),
    (
        "bad-agent-socket-is-control.toml",
        5,
        16,
        "daemon.agent_socket",
        "agent_socket must not be the control socket",
    ),
    (
        "bad-in-place-keypair.toml",
        18,
        56,
        "agents.bot.credentials.ssh.deliver[0].atomic",
        "`atomic = false` cannot deliver credential `ssh`: an ed25519 keypair is delivered as a directory",
    ),
    (
        "bad-signal-target.toml",
        18,
        12,
        "agents.bot.credentials.db.deliver[0]",
        "a signal sink names its process by exactly one of `pid_file` or `unit`",
    ),
    (
        "bad-signal-name.toml",
        18,
        67,
        "agents.bot.credentials.db.deliver[0].signal",
        "unknown signal `SIGKILL`: use one of `SIGHUP`, `SIGINT`, `SIGQUIT`, `SIGTERM`, `SIGUSR1`, `SIGUSR2`, `SIGWINCH`",
    ),
    (
        "bad-signal-coalesce.toml",
        18,
        69,
        "agents.bot.credentials.db.deliver[0].coalesce",
        "coalesce `5m` is longer than 1m",
    ),
    (
        "bad-signal-unit.toml",
        18,
        38,
        "agents.bot.credentials.db.deliver[0].unit",
        "invalid unit `--now`: write a systemd service name",
    ),
    (
        "bad-webhook-userinfo.toml",
        18,
        38,
        "agents.bot.credentials.db.deliver[0].url",
        "invalid webhook URL: it holds a user name or password, which would end up in logs",
    ),
    (
        "bad-webhook-metadata.toml",
        18,
        38,
        "agents.bot.credentials.db.deliver[0].url",
        "invalid webhook URL: its address ::ffff:169.254.169.254 is a cloud metadata service address",
    ),
    (
        "bad-webhook-include-value.toml",
        18,
        38,
        "agents.bot.credentials.db.deliver[0].url",
        "`include_value = true` sends the value, so it needs https, or plain http to a loopback address",
    ),
    (
        "bad-webhook-secret-source.toml",
        18,
        12,
        "agents.bot.credentials.db.deliver[0]",
        "a webhook sink signs with exactly one of `secret_file` or `secret_credential`",
    ),
    (
        "bad-webhook-unknown-credential.toml",
        18,
        91,
        "agents.bot.credentials.db.deliver[0].secret_credential",
        "unknown credential `bot/hook-key`: no [agents.bot.credentials.hook-key] in the config",
    ),
    (
        "bad-webhook-own-credential.toml",
        18,
        91,
        "agents.bot.credentials.db.deliver[0].secret_credential",
        "`bot/db` is the credential this webhook announces",
    ),
    (
        "bad-webhook-short-key.toml",
        18,
        91,
        "agents.bot.credentials.db.deliver[0].secret_credential",
        "`bot/hook-key` makes values of 22 bytes; a webhook signing key needs at least 32",
    ),
    (
        "bad-webhook-timeout.toml",
        18,
        120,
        "agents.bot.credentials.db.deliver[0].timeout",
        "timeout `5m` is out of range: it must be between 100ms and 1m",
    ),
    (
        "bad-follow-schedule.toml",
        17,
        9,
        "agents.bot.credentials.db.every",
        "`every` with `mode = \"follow\"`: this keyturn does not rotate a followed credential",
    ),
    (
        "bad-follow-local.toml",
        16,
        8,
        "agents.bot.credentials.db.mode",
        "`mode = \"follow\"` on vault `local`, a local vault",
    ),
    (
        "bad-follow-poll.toml",
        17,
        8,
        "agents.bot.credentials.db.poll",
        "poll (500ms) must be at least 1s",
    ),
    (
        "bad-follow-target.toml",
        18,
        10,
        "agents.bot.credentials.db.target",
        "a target with `mode = \"follow\"`",
    ),
    (
        "bad-mode.toml",
        16,
        8,
        "agents.bot.credentials.db.mode",
        "unknown mode `mirror`; expected \"rotate\" (the default) or \"follow\"",
    ),
    (
        "bad-change-index.toml",
        10,
        16,
        "vaults.bao.change_index",
        "invalid vault path `../keyturn/index`: it contains `..`",
    ),
    (
        "bad-change-index-clash.toml",
        17,
        0,
        "agents.bot.credentials.db",
        "vault path `agents/bot/db` is the change_index of vault `bao`",
    ),
    (
        "bad-max-age-short.toml",
        18,
        11,
        "agents.bot.credentials.db.max_age",
        "max_age (1h) must be longer than the rotation period (1h) plus grace (15m): a version is used that long when every rotation runs on time, so the credential would always be \"expired\"",
    ),
    (
        "bad-max-age-pages-on-schedule.toml",
        17,
        11,
        "agents.bot.credentials.db.max_age",
        "max_age (10h) must be longer than the rotation period (6h) plus [alert_rules] expiry_critical_before (6h)",
    ),
    (
        "bad-max-age-cron.toml",
        17,
        11,
        "agents.bot.credentials.db.max_age",
        "max_age (2days) must be longer than the rotation period (3days) plus grace (15m)",
    ),
    (
        "bad-alert-rules-critical.toml",
        16,
        21,
        "alert_rules.failures_critical",
        "failures_critical (2) must be at least failures_warning (3)",
    ),
    (
        "bad-alert-rules-lead.toml",
        15,
        26,
        "alert_rules.expiry_critical_before",
        "invalid expiry_critical_before `one period`: write \"period\" (the credential's rotation period) or a duration",
    ),
    (
        "bad-alert-rules-unknown-key.toml",
        15,
        1,
        "alert_rules.failure_warning",
        "unknown key `failure_warning`; expected one of `failures_warning`, `failures_critical`, `expiry_critical_before`, `holdouts`, `resolve_hold`",
    ),
    (
        "bad-alert-unknown-type.toml",
        21,
        8,
        "alerts.chat.type",
        "unknown value `slack`; expected one of `alertmanager`, `pagerduty`, `webhook`",
    ),
    (
        "bad-alert-url.toml",
        22,
        7,
        "alerts.am.url",
        "invalid Alertmanager URL: its address 169.254.169.254 is a cloud metadata service address",
    ),
    (
        "bad-alert-url-userinfo.toml",
        22,
        7,
        "alerts.hook.url",
        "invalid webhook URL: it holds a user name or password, which would end up in logs",
    ),
    (
        "bad-alert-unknown-tier.toml",
        23,
        18,
        "alerts.pd.tiers[1]",
        "unknown tier `gold`; defined tiers: `critical`, `high`, `low`, `medium`",
    ),
    (
        "bad-alert-empty-filter.toml",
        23,
        11,
        "alerts.am.tenants",
        "`tenants = []` routes nothing to this sink; remove the key to route every alert",
    ),
    (
        "bad-alert-severity.toml",
        23,
        26,
        "alerts.am.severities[1]",
        "unknown severity `page`; expected `warning` or `critical`",
    ),
    (
        "bad-alert-routing-key-inline.toml",
        22,
        1,
        "alerts.pd.routing_key",
        "unknown key `routing_key`; expected one of `routing_key_file`, `url`",
    ),
    (
        "bad-alert-timeout.toml",
        23,
        11,
        "alerts.am.timeout",
        "timeout `5m` is out of range: it must be between 100ms and 1m",
    ),
    (
        "bad-alert-name.toml",
        20,
        9,
        "alerts.On-Call",
        "invalid alert sink name `On-Call`",
    ),
];

/// `auth_key` names the agent's ed25519 credential; the audience defaults
/// to `keyturn` and can be set.
#[test]
fn an_auth_key_and_the_assertion_audience_load() {
    let text = |daemon_extra: &str| {
        bot_config(
            daemon_extra,
            "[vaults.local]\ntype = \"local\"\n",
            r#"auth_key = "signing"

[agents.bot.credentials.signing]
vault = "local"
every = "1h"
generate = { kind = "ed25519" }
deliver = [{ type = "file", path = "bot/signing" }]
"#,
        )
    };
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("k.toml");
    let cfg = must_load(&file, &text(""));
    let bot = keyturn::model::AgentId::new("bot").unwrap();
    assert_eq!(
        cfg.agents[&bot].auth_key.as_ref().map(|c| c.as_str()),
        Some("signing")
    );
    assert_eq!(cfg.daemon.assertion_audience, "keyturn");
    let cfg = must_load(&file, &text("assertion_audience = \"keyturn.example.com\""));
    assert_eq!(cfg.daemon.assertion_audience, "keyturn.example.com");
}

/// `mode = "follow"`: no schedule needed, `poll` defaults to 5 s, and
/// `change_index` is read on a remote vault.
#[test]
fn a_followed_credential_loads_with_its_poll() {
    let text = bot_config(
        "",
        &format!("{BAO_VAULT}change_index = \"keyturn/index\"\n"),
        r#"
[agents.bot.credentials.db]
vault = "bao"
mode = "follow"
generate = { kind = "password", length = 32 }
deliver = [{ type = "file", path = "bot/db" }]

[agents.bot.credentials.api]
vault = "bao"
mode = "follow"
poll = "1s"
generate = { kind = "api_key" }
deliver = [{ type = "file", path = "bot/api" }]

[agents.bot.credentials.rotated]
vault = "bao"
every = "1h"
generate = { kind = "api_key" }
deliver = [{ type = "file", path = "bot/rotated" }]
"#,
    );
    let dir = tempfile::tempdir().unwrap();
    let cfg = must_load(&dir.path().join("k.toml"), &text);
    let cred = |c: &str| {
        let key = keyturn::model::CredentialKey::new(
            keyturn::model::AgentId::new("bot").unwrap(),
            keyturn::model::CredentialId::new(c).unwrap(),
        );
        cfg.credential(&key).unwrap().1.follow
    };
    assert_eq!(cred("db"), Some(Duration::from_secs(5)));
    assert_eq!(cred("api"), Some(Duration::from_secs(1)));
    assert_eq!(cred("rotated"), None);
    assert_eq!(
        cfg.vaults["bao"].spec.plugin().change_index(),
        Some("keyturn/index")
    );
}

/// `grace` may be as long as the rotation period (the shortest gap of a
/// cron schedule), not longer (`bad-grace-*.toml`); left out, it is 15 min,
/// or the period if that is shorter, so a default is never cut short
/// either. A followed credential has no schedule here: its grace is not
/// checked against one.
#[test]
fn grace_is_at_most_the_rotation_period_and_defaults_to_no_more() {
    let text = |schedule: &str, grace: &str| {
        bot_config(
            "",
            "[vaults.local]\ntype = \"local\"\n",
            &format!(
                r#"
[agents.bot.credentials.db]
vault = "local"
{schedule}
{grace}
generate = {{ kind = "password", length = 32 }}
deliver = [{{ type = "file", path = "bot/db" }}]
"#
            ),
        )
    };
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("k.toml");
    let grace = |schedule: &str, grace: &str| {
        let cfg = must_load(&file, &text(schedule, grace));
        cfg.credentials().next().unwrap().1.grace
    };
    let secs = Duration::from_secs;
    assert_eq!(grace("every = \"10s\"", "grace = \"10s\""), secs(10));
    assert_eq!(grace("every = \"10s\"", ""), secs(10));
    assert_eq!(grace("every = \"10m\"", ""), secs(600));
    assert_eq!(grace("every = \"1h\"", ""), secs(900));
    assert_eq!(grace("every = \"1h\"", "grace = \"1h\""), secs(3600));
    assert_eq!(
        grace("schedule = \"0,45 * * * *\"", "grace = \"15m\""),
        secs(900)
    );
    assert_eq!(grace("schedule = \"0,50 * * * *\"", ""), secs(600));
    let errors = keyturn::config::load_str(&file, &text("every = \"1h\"", "grace = \"61m\""))
        .unwrap_err()
        .0;
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert_eq!(errors[0].toml_path, "agents.bot.credentials.db.grace");
    assert!(
        errors[0]
            .message
            .contains("grace (1h 1m) is longer than the rotation period (1h)"),
        "{}",
        errors[0]
    );
    let followed = bot_config(
        "",
        BAO_VAULT,
        r#"
[agents.bot.credentials.db]
vault = "bao"
mode = "follow"
grace = "2h"
generate = { kind = "password", length = 32 }
deliver = [{ type = "file", path = "bot/db" }]
"#,
    );
    let cfg = must_load(&file, &followed);
    assert_eq!(cfg.credentials().next().unwrap().1.grace, secs(7200));
}

/// `max_age` on a followed credential: no schedule here, so only the
/// duration is checked (a follower alerts on a version it has held too long).
#[test]
fn max_age_on_a_followed_credential_needs_no_schedule() {
    let text = |max_age: &str| {
        bot_config(
            "",
            BAO_VAULT,
            &format!(
                r#"
[agents.bot.credentials.db]
vault = "bao"
mode = "follow"
max_age = "{max_age}"
generate = {{ kind = "password", length = 32 }}
deliver = [{{ type = "file", path = "bot/db" }}]
"#
            ),
        )
    };
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("k.toml");
    let cfg = must_load(&file, &text("1m"));
    let (_, db) = cfg.credentials().next().expect("the followed credential");
    assert_eq!(db.max_age, Some(Duration::from_secs(60)));
    assert_eq!(db.rotation_period(), None, "a follower has no period");
    let errors = keyturn::config::load_str(&file, &text("soon"))
        .unwrap_err()
        .0;
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert_eq!(errors[0].toml_path, "agents.bot.credentials.db.max_age");
    assert!(
        errors[0].message.contains("invalid duration `soon`"),
        "{errors:?}"
    );
}

#[test]
fn every_bad_fixture_reports_its_specific_error() {
    let mut failures = Vec::new();
    for &(name, line, column, path, message) in BAD {
        let errors = errors_of(name);
        let ok = errors.len() == 1 && {
            let e = &errors[0];
            e.line == line
                && (column == 0 || e.column == column)
                && e.toml_path == path
                && e.message.contains(message)
                && e.file == fixture(name)
        };
        if !ok {
            failures.push(format!(
                "{name}: expected exactly one error at {line}:{column} `{path}` containing {message:?}, got:\n{}",
                errors.iter().map(|e| format!("  {e}\n")).collect::<String>()
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn every_bad_fixture_is_in_the_table() {
    // A new bad-*.toml without an expectation would otherwise go untested.
    let dir = fixture("");
    for entry in std::fs::read_dir(&dir).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        if name.starts_with("bad-") && name != "bad-several.toml" {
            assert!(
                BAD.iter().any(|(n, ..)| *n == name),
                "{name} has no expectation in BAD"
            );
        }
    }
}

#[test]
fn several_problems_are_all_reported_in_file_order() {
    let errors = errors_of("bad-several.toml");
    let got: Vec<(usize, &str)> = errors
        .iter()
        .map(|e| (e.line, e.toml_path.as_str()))
        .collect();
    assert_eq!(
        got,
        vec![
            (5, "daemon.max_concurrent_rotations"),
            (13, "agents.bot.tier"),
            (17, "agents.bot.credentials.db.schedule"),
            (19, "agents.bot.credentials.db.deliver[0].mode"),
            (22, "agents.bot.credentials.api.vault"),
            (24, "agents.bot.credentials.api.jitter"),
            (25, "agents.bot.credentials.api.generate.length"),
        ],
        "{errors:#?}"
    );
    assert!(errors[2].message.contains("Minutes must be at most 59"));
    assert!(!errors[2].message.contains('\n'), "one line per error");
}

#[test]
fn a_missing_file_is_one_error_at_line_zero() {
    let errors = load_file(&fixture("no-such-file.toml")).unwrap_err().0;
    assert_eq!(errors.len(), 1);
    assert_eq!(errors[0].line, 0);
    assert!(errors[0].message.contains("cannot read config file"));
}

#[test]
fn good_full_reads_every_key() {
    let cfg = load_good("good-full.toml");
    let d = &cfg.daemon;
    assert_eq!(d.state_dir, Path::new("/var/lib/keyturn"));
    assert_eq!(d.socket, Path::new("/run/keyturn/control.sock"));
    assert_eq!(d.socket_group.as_deref(), Some("keyturn"));
    assert_eq!(d.listen, Some("127.0.0.1:9464".parse().unwrap()));
    assert_eq!(
        d.delivery_roots,
        vec![
            PathBuf::from("/run/keyturn/agents"),
            PathBuf::from("/srv/agents")
        ]
    );
    assert_eq!(d.audit_log, Path::new("/var/log/keyturn/audit.log"));
    assert_eq!(
        d.audit_key_file.as_deref(),
        Some(Path::new("/etc/keyturn/audit.key"))
    );
    assert_eq!(d.drain_timeout, Duration::from_secs(45));
    assert_eq!(d.max_concurrent_rotations, 8);
    assert_eq!(d.catch_up_spread, Duration::from_secs(120));
    assert_eq!(d.retry.initial_delay, Duration::from_secs(1));
    assert_eq!(d.retry.max_delay, Duration::from_secs(120));
    assert_eq!(d.retry.max_attempts, 7);

    assert_eq!(cfg.tiers.keys().collect::<Vec<_>>(), ["high", "low"]);
    assert_eq!(cfg.tiers["high"].revocation_sla, Duration::from_secs(3600));

    assert_eq!(
        cfg.alert_rules,
        AlertRules {
            failures_warning: 3,
            failures_critical: Some(5),
            expiry_critical_before: ExpiryLead::Fixed(Duration::from_secs(8 * 3600)),
            holdouts: false,
            resolve_hold: Duration::from_secs(30),
        }
    );

    let v = &cfg.vaults["local"];
    assert_eq!(v.max_concurrent, 4);
    let VaultSpec::Local(local) = &v.spec else {
        panic!("expected the local vault, found {:?}", v.spec);
    };
    // Relative paths resolve against the config file's directory.
    assert_eq!(local.dir, Some(fixture("vaults/local")));
    assert_eq!(
        local.key_file.as_deref(),
        Some(Path::new("/etc/keyturn/local.key"))
    );
    assert_eq!(local.key_credential.as_deref(), Some("local-key"));

    assert_eq!(cfg.agents.len(), 2);
    assert_eq!(cfg.credential_count(), 4);
    let bot = &cfg.agents[&"invoice-bot".parse().unwrap()];
    assert_eq!(
        (bot.owner.as_str(), bot.tenant.as_str(), bot.tier.as_str()),
        ("alice@example.com", "acme", "high")
    );
    assert_eq!((bot.uid, bot.gid), (Some(1001), Some(1002)));

    let db = &bot.credentials[&"db".parse().unwrap()];
    assert_eq!(db.key.to_string(), "invoice-bot/db");
    assert_eq!(db.vault_label(), "local");
    assert_eq!(db.vault_path(), "acme/invoice-bot/db");
    assert_eq!(
        db.generate,
        GeneratorConfig::Password {
            length: 40,
            classes: CharClasses {
                lowercase: true,
                uppercase: true,
                digits: true,
                symbols: true
            }
        }
    );
    assert!(db.target.is_none());
    assert_eq!(
        db.schedule,
        ScheduleSpec::parse_cron("0 */6 * * *").unwrap()
    );
    assert_eq!(db.jitter, Duration::from_secs(300));
    assert_eq!(db.grace, Duration::from_secs(600));
    assert_eq!(db.max_age, Some(Duration::from_secs(86400)));
    // The widest gap of the cron expression, plus its jitter.
    assert_eq!(
        db.rotation_period(),
        Some(Duration::from_secs(6 * 3600 + 300))
    );
    assert_eq!(db.deliver.len(), 2);
    let SinkConfig::File(json) = &db.deliver[0] else {
        panic!("a file sink")
    };
    assert_eq!(
        json.path,
        Path::new("/run/keyturn/agents/invoice-bot/db.json")
    );
    assert_eq!(
        (json.format(), json.mode()),
        (FileFormat::Json, Some(0o440))
    );
    // (File sinks take the owner from the agent when they are built:
    // `daemon_e2e::delivers_files_with_mode_and_owner_and_rotates_on_demand`.)
    let SinkConfig::File(env) = &db.deliver[1] else {
        panic!("a file sink")
    };
    assert_eq!(
        (env.format(), env.mode(), env.env_name.as_deref()),
        (FileFormat::Env, Some(0o400), Some("DB_PASSWORD"))
    );

    let key = &bot.credentials[&"signing-key".parse().unwrap()];
    assert_eq!(key.generate, GeneratorConfig::Ed25519);
    assert_eq!(
        key.vault_path(),
        "agents/invoice-bot/signing-key",
        "default vault path"
    );
    assert_eq!(
        key.schedule,
        ScheduleSpec::Every(Duration::from_secs(7 * 86400))
    );
    assert_eq!(key.grace, Duration::from_secs(15 * 60), "default grace");
    assert_eq!(key.max_age, None, "no max_age by default");

    let crawler = &cfg.agents[&"crawler".parse().unwrap()];
    let token = &crawler.credentials[&"api-token".parse().unwrap()];
    assert_eq!(
        token.generate,
        GeneratorConfig::ApiKey {
            prefix: "kt_live_".into(),
            length: 40
        }
    );
    let SinkConfig::File(t) = &token.deliver[0] else {
        panic!("a file sink")
    };
    assert_eq!(
        t.env_name.as_deref(),
        Some("API_TOKEN"),
        "default env name from the credential id"
    );
    assert_eq!(t.format(), FileFormat::Env);
    assert_eq!((crawler.uid, crawler.gid), (None, None));
    let session = &crawler.credentials[&"session-secret".parse().unwrap()];
    assert_eq!(
        session.generate,
        GeneratorConfig::RandomBytes {
            length: 48,
            encoding: ByteEncoding::Base64Url
        }
    );
    assert!(session.deliver.is_empty());
}

#[test]
fn good_minimal_takes_the_defaults() {
    let cfg = load_good("good-minimal.toml");
    let d = &cfg.daemon;
    assert_eq!(d.state_dir, Path::new("/var/lib/keyturn"));
    assert_eq!(d.socket, Path::new("/run/keyturn/control.sock"));
    assert_eq!(d.audit_log, Path::new("/var/lib/keyturn/audit.log"));
    assert_eq!(d.audit_key_file, None);
    assert_eq!(d.listen, None);
    assert!(d.delivery_roots.is_empty());
    assert_eq!(d.drain_timeout, Duration::from_secs(30));
    assert_eq!(d.max_concurrent_rotations, 64);
    assert_eq!(d.catch_up_spread, Duration::from_secs(300));
    assert_eq!(d.retry, Default::default());
    assert_eq!(
        cfg.alert_rules,
        AlertRules {
            failures_warning: 2,
            failures_critical: None,
            expiry_critical_before: ExpiryLead::Period,
            holdouts: true,
            resolve_hold: Duration::from_secs(120),
        }
    );
    let tiers: Vec<(&str, u64)> = cfg
        .tiers
        .values()
        .map(|t| (t.name.as_str(), t.revocation_sla.as_secs()))
        .collect();
    assert_eq!(
        tiers,
        [
            ("critical", 900),
            ("high", 3600),
            ("low", 86400),
            ("medium", 14400)
        ]
    );
    let v = &cfg.vaults["local"];
    assert_eq!(v.max_concurrent, 16);
    assert_eq!(
        v.spec,
        VaultSpec::Local(Box::new(LocalConfig {
            dir: Some("/var/lib/keyturn/vaults/local".into()),
            key_file: Some("/var/lib/keyturn/local-vault.key".into()),
            key_credential: Some("keyturn-local-vault-key".into()),
            key_credential_required: false,
            max_concurrent: None,
        }))
    );
    let (agent, cred) = cfg.credentials().next().unwrap();
    assert_eq!(agent.id.as_str(), "bot");
    assert_eq!(cred.vault_path(), "agents/bot/token");
    assert_eq!(
        cred.generate,
        GeneratorConfig::RandomBytes {
            length: 32,
            encoding: ByteEncoding::Hex
        }
    );
    assert!(cred.target.is_none());
    assert_eq!(cred.jitter, Duration::ZERO);
}

/// Every config shipped in the repository loads: the demo, and the examples.
#[test]
fn shipped_configs_load() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
    let mut files = Vec::new();
    for dir in [root.clone(), root.join("examples")] {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let p = entry.unwrap().path();
            if p.extension().is_some_and(|e| e == "toml") {
                files.push(p);
            }
        }
    }
    assert!(
        files.len() >= 3,
        "expected the demo and two examples, found {files:?}"
    );
    for f in &files {
        if let Err(e) = load_file(f) {
            panic!("{} must load:\n{e}", f.display());
        }
    }
}

#[test]
fn the_demo_writes_only_under_demo_run() {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let cfg = load_file(&manifest.join("config/keyturn.toml")).unwrap();
    let demo_run = manifest.join("demo-run");
    let d = &cfg.daemon;
    for p in [&d.state_dir, &d.socket, &d.audit_log] {
        assert!(
            p.starts_with(&demo_run),
            "{} escapes demo-run/",
            p.display()
        );
    }
    assert_eq!(d.delivery_roots, vec![demo_run.join("agents")]);
    for v in cfg.vaults.values() {
        let VaultSpec::Local(local) = &v.spec else {
            panic!("the demo runs on the local vault only, found {:?}", v.spec);
        };
        let (dir, key_file) = (
            local.dir.as_ref().unwrap(),
            local.key_file.as_ref().unwrap(),
        );
        assert!(dir.starts_with(&demo_run) && key_file.starts_with(&demo_run));
    }
    let mut generators = std::collections::BTreeSet::new();
    let mut formats = std::collections::BTreeSet::new();
    for (agent, cred) in cfg.credentials() {
        assert_eq!(
            (agent.uid, agent.gid),
            (None, None),
            "the demo runs as any user"
        );
        generators.insert(
            format!("{:?}", cred.generate)
                .split([' ', '{'])
                .next()
                .unwrap()
                .to_owned(),
        );
        for sink in &cred.deliver {
            if let SinkConfig::File(f) = sink {
                formats.insert(f.format().as_str());
            }
        }
        let period = cred.schedule.min_period().unwrap();
        assert!(
            period <= Duration::from_secs(30),
            "{} rotates every {period:?}",
            cred.key
        );
    }
    assert_eq!(cfg.agents.len(), 3);
    assert_eq!(generators.len(), 4, "every generator: {generators:?}");
    assert_eq!(formats.len(), 3, "every format: {formats:?}");
}

#[test]
fn good_remote_reads_every_vault_and_target_type() {
    use keyturn::targets::postgres::{PgStrategy, PostgresConfig};
    use keyturn::vaults::aws::AwsConfig;
    use keyturn::vaults::azure::AzureAuth;
    use keyturn::vaults::hashicorp::HashicorpAuth;
    let cfg = load_good("good-remote.toml");
    let dir = fixture("");
    let VaultSpec::Vault(bao) = &cfg.vaults["bao"].spec else {
        panic!("bao: {:?}", cfg.vaults["bao"].spec)
    };
    // The trailing `/` is dropped so request URLs are built one way.
    assert_eq!(bao.address, "https://bao.internal:8200");
    assert_eq!(bao.mount(), "kv");
    assert_eq!(bao.namespace.as_deref(), Some("team-a"));
    assert_eq!(bao.field(), "value");
    assert_eq!(bao.timeout(), Duration::from_secs(30));
    assert_eq!(
        bao.ca_file.as_deref(),
        Some(dir.join("bao-ca.pem").as_path())
    );
    let HashicorpAuth::AppRole {
        mount,
        role_id_file,
        secret_id_file,
    } = bao.auth().unwrap()
    else {
        panic!("bao logs in with AppRole")
    };
    assert_eq!(
        (mount.as_str(), role_id_file, secret_id_file),
        (
            "approle",
            dir.join("bao-role-id"),
            dir.join("bao-secret-id")
        )
    );
    assert_eq!(
        cfg.vaults["aws"].spec,
        VaultSpec::AwsSecretsManager(Box::new(AwsConfig {
            region: Some("eu-west-1".into()),
            secret_prefix: Some("keyturn/".into()),
            write_budget: Some(10.0),
            max_concurrent: Some(8),
            ..AwsConfig::default()
        }))
    );
    let VaultSpec::AwsSecretsManager(aws) = &cfg.vaults["aws"].spec else {
        unreachable!()
    };
    assert_eq!(aws.timeout(), Duration::from_secs(30), "the default");
    assert_eq!(cfg.vaults["aws"].max_concurrent, 8);
    let VaultSpec::AzureKeyVault(kv) = &cfg.vaults["kv"].spec else {
        panic!("kv: {:?}", cfg.vaults["kv"].spec)
    };
    assert_eq!(kv.verify_challenge_resource, None, "verified by default");
    // The trailing `/` is dropped, as for the other URLs.
    assert_eq!(
        kv.authority_host.as_deref(),
        Some("https://login.microsoftonline.us")
    );
    assert_eq!(
        kv.auth(),
        Some(AzureAuth::ClientSecret {
            tenant_id: "00000000-0000-0000-0000-000000000001".into(),
            client_id: "00000000-0000-0000-0000-000000000002".into(),
            secret_file: dir.join("azure-client-secret"),
        })
    );

    let creds: Vec<_> = cfg.credentials().map(|(_, c)| c).collect();
    let db = creds
        .iter()
        .find(|c| c.key.credential.as_str() == "db")
        .unwrap();
    assert_eq!(
        db.vaults.iter().map(|v| &**v).collect::<Vec<_>>(),
        ["bao", "aws"],
        "the order is kept: the first vault is the primary"
    );
    assert_eq!(db.vault_label(), "bao+aws");
    assert_eq!(
        db.target,
        TargetConfig::Postgres(Box::new(
            PostgresConfig::new(dir.join("pg-admin.dsn"), "invoice_bot")
                .with_strategy(PgStrategy::AlternatingUsers)
        ))
    );
    let TargetConfig::Postgres(pg) = &db.target else {
        unreachable!()
    };
    assert_eq!(pg.connect_timeout(), Duration::from_secs(10), "the default");
    let partner = creds
        .iter()
        .find(|c| c.key.credential.as_str() == "partner")
        .unwrap();
    let TargetConfig::Command(hook) = &partner.target else {
        panic!("partner: {:?}", partner.target)
    };
    assert_eq!(hook.program, dir.join("hooks/partner-key"));
    assert_eq!(hook.args, ["--account", "acme"]);
    assert_eq!(hook.timeout(), Duration::from_secs(10));
    assert_eq!(
        hook.env.iter().collect::<Vec<_>>(),
        [(
            &"PARTNER_API".to_owned(),
            &"https://partner.example.com".to_owned()
        )]
    );
}

#[test]
fn good_alerts_reads_every_alert_sink_key() {
    use keyturn::alerts::{AlertSinkConfig, Route, Severity};
    let cfg = load_good("good-alerts.toml");
    assert_eq!(cfg.alerts.keys().collect::<Vec<_>>(), ["am", "hook", "pd"]);
    let AlertSinkConfig::Alertmanager(am) = &cfg.alerts["am"] else {
        panic!("{:?}", cfg.alerts["am"]);
    };
    assert_eq!(am.url, "http://alertmanager.internal:9093");
    assert_eq!(cfg.alerts["am"].plugin().route(), Route::default());
    let AlertSinkConfig::Pagerduty(pd) = &cfg.alerts["pd"] else {
        panic!("{:?}", cfg.alerts["pd"]);
    };
    // Relative to the config file's directory.
    assert_eq!(pd.routing_key_file, fixture("keys/pagerduty.key"));
    assert_eq!(
        pd.url.as_deref(),
        Some("https://events.eu.pagerduty.com/v2/enqueue")
    );
    assert_eq!(pd.timeout.as_deref(), Some("10s"));
    assert_eq!(
        cfg.alerts["pd"].plugin().route(),
        Route {
            severities: Some(vec![Severity::Critical]),
            tiers: Some(vec!["critical".into(), "high".into()]),
            tenants: Some(vec!["acme".into()]),
        }
    );
    let AlertSinkConfig::Webhook(hook) = &cfg.alerts["hook"] else {
        panic!("{:?}", cfg.alerts["hook"]);
    };
    assert_eq!(hook.secret_file, Path::new("/etc/keyturn/alert-hook.key"));
    assert_eq!(
        cfg.alerts["hook"].plugin().route().severities,
        Some(vec![Severity::Warning, Severity::Critical])
    );
}

#[test]
fn every_alert_sink_problem_is_reported_at_once_and_no_password_is_echoed() {
    let text = std::fs::read_to_string(fixture("good-alerts.toml"))
        .unwrap()
        .replace(
            "url = \"http://alertmanager.internal:9093\"",
            "url = \"http://am:s3cr3t-canary@alertmanager.internal:9093\"",
        )
        .replace("severities = [\"critical\"]", "severities = [\"urgent\"]")
        .replace("timeout = \"10s\"", "timeout = \"0s\"")
        .replace(
            "secret_file = \"/etc/keyturn/alert-hook.key\"",
            "secret_file = \"\"",
        );
    let errors = keyturn::config::load_str(&fixture("good-alerts.toml"), &text)
        .unwrap_err()
        .0;
    let got: Vec<&str> = errors.iter().map(|e| e.toml_path.as_str()).collect();
    assert_eq!(
        got,
        [
            "alerts.am.url",
            "alerts.pd.severities[0]",
            "alerts.pd.timeout",
            "alerts.hook.secret_file",
        ],
        "{errors:#?}"
    );
    for e in &errors {
        assert!(!e.to_string().contains("s3cr3t-canary"), "{e}");
    }
}
