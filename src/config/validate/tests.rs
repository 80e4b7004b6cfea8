//! Validation tests.

use super::*;

#[test]
fn normalize_is_lexical() {
    assert_eq!(normalize(Path::new("/a/./b/../c")), PathBuf::from("/a/c"));
    assert_eq!(normalize(Path::new("/../a")), PathBuf::from("/a"));
    assert_eq!(
        normalize(Path::new("../a/../../b")),
        PathBuf::from("../../b")
    );
}

#[test]
fn toml_paths_quote_keys_that_are_not_bare() {
    let p = TomlPath::root()
        .key("agents")
        .key("a.b")
        .key("deliver")
        .index(2)
        .key("path");
    assert_eq!(p.to_string(), "agents.\"a.b\".deliver[2].path");
}

#[test]
fn lazy_paths_are_the_eager_paths() {
    let agents = Loc::top("agents");
    let agent = agents.key("a.b");
    let creds = agent.key("credentials");
    let cred = creds.key("");
    let deliver = cred.key("deliver");
    let sink = deliver.index(2);
    let lazy = sink.key("path");
    let eager = TomlPath::root()
        .key("agents")
        .key("a.b")
        .key("credentials")
        .key("")
        .key("deliver")
        .index(2)
        .key("path");
    assert_eq!(lazy.path(), eager);
    assert_eq!(
        lazy.path().to_string(),
        "agents.\"a.b\".credentials.\"\".deliver[2].path"
    );
    assert_eq!(Loc::top("daemon").path().to_string(), "daemon");
}

#[test]
fn parts_compare_by_concatenation() {
    let default = Parts(["agents/", "a", "/", "x"]);
    assert!(default.concat_eq(&Parts(["agents/a/x", "", "", ""])));
    assert!(!default.concat_eq(&Parts(["agents/a/y", "", "", ""])));
    assert!(!default.concat_eq(&Parts(["agents/a/x/", "", "", ""])));
    let seen = |agent, cred, written| VaultPathSeen {
        vault: "v",
        cred: CredRef { agent, cred },
        written,
    };
    assert_eq!(
        seen("a", "x", None).hash(),
        seen("b", "y", Some("agents/a/x")).hash()
    );
    assert_ne!(
        seen("a", "x", None).hash(),
        VaultPathSeen {
            vault: "w",
            ..seen("a", "x", None)
        }
        .hash()
    );
}

#[test]
fn first_seen_tells_apart_values_with_the_same_hash() {
    let mut seen = FirstSeen::default();
    let same = |a: &&str, b: &&str| a == b;
    assert_eq!(seen.first_or_insert(7, "a", same), None);
    assert_eq!(seen.first_or_insert(7, "b", same), None);
    assert_eq!(seen.first_or_insert(8, "c", same), None);
    assert_eq!(seen.first_or_insert(7, "a", same), Some(&"a"));
    assert_eq!(seen.first_or_insert(7, "b", same), Some(&"b"));
    assert_eq!(seen.first_or_insert(8, "c", same), Some(&"c"));
    assert_eq!(seen.first_or_insert(9, "a", same), None);
}

/// Loading `text` fails with exactly one error: `message`, at `toml_path`.
fn assert_only_error(text: &str, toml_path: &str, message: &str) {
    let e = super::super::load_str(Path::new("/etc/keyturn/t.toml"), text)
        .expect_err("should fail")
        .0;
    assert_eq!(e.len(), 1, "{e:?}");
    assert_eq!(e[0].toml_path, toml_path);
    assert_eq!(e[0].message, message);
}

const HEAD: &str = "[daemon]\ndelivery_roots = [\"/run/kt\"]\n[vaults.v]\ntype = \"local\"\n\
[agents.a]\nowner = \"o\"\ntenant = \"t\"\ntier = \"low\"\n\
[agents.b]\nowner = \"o\"\ntenant = \"t\"\ntier = \"low\"\n";

#[test]
fn a_written_vault_path_clashes_with_a_default_one() {
    let text = format!(
        "{HEAD}[agents.a.credentials.x]\nvault = \"v\"\nevery = \"1h\"\ngenerate = {{ kind = \"ed25519\" }}\n\
[agents.b.credentials.y]\nvault = \"v\"\npath = \"agents/a/x\"\nevery = \"1h\"\ngenerate = {{ kind = \"ed25519\" }}\n"
    );
    assert_only_error(
        &text,
        "agents.b.credentials.y.path",
        "duplicate vault path: `agents/a/x` in vault `v` is also used by `agents.a.credentials.x` (line 13)",
    );
}

#[test]
fn an_absolute_and_a_relative_delivery_path_clash() {
    let text = format!(
        "{HEAD}[agents.a.credentials.x]\nvault = \"v\"\nevery = \"1h\"\ngenerate = {{ kind = \"ed25519\" }}\n\
deliver = [{{ type = \"file\", path = \"a/./x\" }}]\n\
[agents.a.credentials.y]\nvault = \"v\"\nevery = \"1h\"\ngenerate = {{ kind = \"ed25519\" }}\n\
deliver = [{{ type = \"file\", path = \"/run/kt/a/x\" }}, {{ type = \"file\", path = \"/run/kt/a/x2\" }}]\n"
    );
    // (Both credentials are agent `a`'s: another agent's sink in `a/` is
    // refused before it could clash, see `another_agents_directory_is_refused`.)
    assert_only_error(
        &text,
        "agents.a.credentials.y.deliver[0].path",
        "duplicate delivery path `/run/kt/a/x`: also written by `agents.a.credentials.x.deliver[0].path` (line 17)",
    );
}

#[test]
fn a_delivery_path_inside_another_sinks_place_is_refused_either_way_round() {
    let cred = |name: &str, kind: &str, path: &str| {
        format!(
            "[agents.a.credentials.{name}]\nvault = \"v\"\nevery = \"1h\"\ngenerate = {{ kind = \"{kind}\" }}\n\
deliver = [{{ type = \"file\", path = \"{path}\" }}]\n"
        )
    };
    // A file inside a keypair's bundle directory, written after it...
    let text = format!(
        "{HEAD}{}{}",
        cred("key", "ed25519", "a/bundle"),
        cred("pw", "password", "a/bundle/private.pem")
    );
    assert_only_error(
        &text,
        "agents.a.credentials.pw.deliver[0].path",
        "delivery path `/run/kt/a/bundle/private.pem` is inside another sink's place `/run/kt/a/bundle` (each delivery would \
replace the other's files; give each sink a path outside the other's): written by `agents.a.credentials.key.deliver[0].path` (line 17)",
    );
    // ... or before it.
    let text = format!(
        "{HEAD}{}{}",
        cred("pw", "password", "a/bundle/private.pem"),
        cred("key", "ed25519", "a/bundle")
    );
    assert_only_error(
        &text,
        "agents.a.credentials.key.deliver[0].path",
        "delivery path `/run/kt/a/bundle` is a directory above another sink's place `/run/kt/a/bundle/private.pem` (each delivery would \
replace the other's files; give each sink a path outside the other's): written by `agents.a.credentials.pw.deliver[0].path` (line 17)",
    );
    // A file two levels under another sink's file.
    let text = format!(
        "{HEAD}{}{}",
        cred("x", "password", "a/same"),
        cred("y", "password", "a/same/sub/deeper")
    );
    assert_only_error(
        &text,
        "agents.a.credentials.y.deliver[0].path",
        "delivery path `/run/kt/a/same/sub/deeper` is inside another sink's place `/run/kt/a/same` (each delivery would \
replace the other's files; give each sink a path outside the other's): written by `agents.a.credentials.x.deliver[0].path` (line 17)",
    );
    // Siblings, a shared directory and a name that only starts alike are fine.
    let text = format!(
        "{HEAD}{}{}{}{}",
        cred("x", "password", "a/db"),
        cred("y", "password", "a/db2"),
        cred("z", "ed25519", "a/dbkeys"),
        cred("w", "password", "a/sub/db")
    );
    super::super::load_str(Path::new("/etc/keyturn/t.toml"), &text).expect("no clash");
}

#[test]
fn two_credentials_on_one_postgres_role_are_refused() {
    let cred = |agent: &str, name: &str, role: &str, strategy: &str| {
        format!(
            "[agents.{agent}.credentials.{name}]\nvault = \"v\"\nevery = \"1h\"\ngenerate = {{ kind = \"password\" }}\n\
target = {{ type = \"postgres\", admin_dsn_file = \"/etc/kt/pg.dsn\", role = \"{role}\", strategy = \"{strategy}\" }}\n"
        )
    };
    let text = format!(
        "{HEAD}{}{}",
        cred("a", "db", "app", "single_user"),
        cred("b", "db", "app", "single_user")
    );
    assert_only_error(
        &text,
        "agents.b.credentials.db.target.role",
        "postgres role `app` (admin DSN file /etc/kt/pg.dsn) is also the target of `agents.a.credentials.db`: \
each rotation would overwrite the other's password, and retiring or decommissioning either would disable it \
for both; give each credential its own role (line 13)",
    );
    // An alternating pair's second role counts too.
    let text = format!(
        "{HEAD}{}{}",
        cred("a", "db", "app", "alternating_users"),
        cred("a", "db2", "app_clone", "single_user")
    );
    let e = super::super::load_str(Path::new("/etc/keyturn/t.toml"), &text)
        .expect_err("app_clone is a's")
        .0;
    assert_eq!(e.len(), 1, "{e:?}");
    assert!(
        e[0].message.starts_with("postgres role `app_clone`"),
        "{e:?}"
    );
    // Another role, or the same name through another admin DSN file: fine.
    let text = format!(
        "{HEAD}{}{}{}",
        cred("a", "db", "app", "alternating_users"),
        cred("a", "db2", "app2", "single_user"),
        cred("b", "db", "app", "single_user").replace("/etc/kt/pg.dsn", "/etc/kt/other.dsn"),
    );
    super::super::load_str(Path::new("/etc/keyturn/t.toml"), &text).expect("no clash");
}

#[test]
fn cached_durations_are_checked_like_fresh_ones() {
    let ctx = Context {
        source: PathBuf::from("/etc/keyturn/t.toml"),
    };
    let mut v = Validator {
        ctx: &ctx,
        issues: Vec::new(),
        durations: DurationCache::default(),
    };
    let at = Loc::top("x");
    for _ in 0..2 {
        assert_eq!(
            v.duration(at, " 24h ", Zero::Rejected),
            Some(Duration::from_secs(24 * 3600))
        );
        assert_eq!(v.duration(at, "0s", Zero::Allowed), Some(Duration::ZERO));
    }
    assert!(v.issues.is_empty());
    // "0s" is cached now, and still refused where zero is not allowed.
    assert_eq!(v.duration(at, "0s", Zero::Rejected), None);
    assert_eq!(v.duration(at, "-24h", Zero::Rejected), None);
    assert_eq!(v.duration(at, "24 parsecs", Zero::Rejected), None);
    let messages: Vec<&str> = v.issues.iter().map(|i| i.message.as_str()).collect();
    assert_eq!(messages.len(), 3, "{messages:?}");
    assert!(messages[0].starts_with("duration `0s` is zero"));
    assert!(messages[1].starts_with("negative duration `-24h`"));
    assert!(messages[2].starts_with("invalid duration `24 parsecs`"));
    // Only texts that parsed are kept, up to the capacity.
    for i in 0..40 {
        v.duration(at, &format!("{i}s"), Zero::Allowed);
    }
    assert_eq!(v.durations.0.len(), DurationCache::CAPACITY);
}

#[test]
fn env_names() {
    assert!(is_env_name("DB_PASSWORD"));
    assert!(is_env_name("_X1"));
    assert!(!is_env_name("1X"));
    assert!(!is_env_name("db"));
    assert!(!is_env_name(""));
}

/// Vault paths end up in URLs (OpenBao, Azure), ARNs and SQL keys: only a
/// strict character set is accepted, and `keyturn-pending/` is reserved.
#[test]
fn vault_paths_accept_only_the_strict_character_set() {
    let ctx = Context {
        source: PathBuf::from("/etc/keyturn/keyturn.toml"),
    };
    let problem = |s: &str| {
        let mut v = Validator {
            ctx: &ctx,
            issues: Vec::new(),
            durations: DurationCache::default(),
        };
        v.vault_path(Loc::top("path"), s);
        v.issues.into_iter().next().map(|i| i.message)
    };
    for good in ["agents/bot/db", "acme/invoice-bot/db.v2", "A_b-c.d/e"] {
        assert_eq!(problem(good), None, "{good:?} is a good vault path");
    }
    for (bad, why) in [
        ("agents/bot\0/db", "a NUL byte"),
        ("agents/bot/db\nx", "a newline"),
        ("agents/bot/db?x", "`?`"),
        ("agents/bot/db#x", "`#`"),
        ("agents/%2e%2e/db", "`%`"),
        ("agents/bot db", "a space"),
        ("agents/bøt/db", "`ø`"),
        (
            "keyturn-pending/agents/bot/db",
            "`keyturn-pending/` is reserved",
        ),
        ("keyturn-pending", "`keyturn-pending/` is reserved"),
    ] {
        let got = problem(bad).unwrap_or_else(|| panic!("{bad:?} must be refused"));
        assert!(got.contains(why), "{bad:?}: {got}");
        assert!(
            got.contains("letters, digits, `.`, `_`, `-`"),
            "says what is allowed: {got}"
        );
    }
}

/// A directory right below a delivery root named after an agent is that
/// agent's: another agent's sink may not write there (nor create it).
#[test]
fn another_agents_directory_is_refused() {
    let text = format!(
        "{HEAD}[agents.b.credentials.y]\nvault = \"v\"\nevery = \"1h\"\ngenerate = {{ kind = \"ed25519\" }}\n\
deliver = [{{ type = \"file\", path = \"a\" }}, {{ type = \"file\", path = \"b/a/y\" }}]\n"
    );
    assert_only_error(
        &text,
        "agents.b.credentials.y.deliver[0].path",
        "delivery path `/run/kt/a` of agent `b` is in the directory of agent `a` (/run/kt/a); put agent `b`'s files under /run/kt/b",
    );
}

/// Black-box finding: two agents delivering into one directory not named
/// after either passed `check`; the file sink gave the directory to the
/// one with a `uid`, which could then replace the other's file. Refused at
/// the place whose directory the agent would be given; in either order,
/// in a directory below too, and not when no agent sharing it has a `uid`
/// (the directory stays the daemon's).
#[test]
fn an_agents_directory_may_not_hold_another_agents_files() {
    let config = |uid_a: bool, a_path: &str, b_path: &str| {
        let head = if uid_a {
            HEAD.replacen("tier = \"low\"\n", "tier = \"low\"\nuid = 4242\n", 1)
        } else {
            HEAD.to_owned()
        };
        format!(
            "{head}[agents.a.credentials.x]\nvault = \"v\"\nevery = \"1h\"\ngenerate = {{ kind = \"password\" }}\n\
deliver = [{{ type = \"file\", path = \"{a_path}\" }}]\n\
[agents.b.credentials.y]\nvault = \"v\"\nevery = \"1h\"\ngenerate = {{ kind = \"password\" }}\n\
deliver = [{{ type = \"file\", path = \"{b_path}\" }}]\n"
        )
    };
    let message = |b_place: &str| {
        format!(
            "delivery path `/run/kt/shared/a.json` of agent `a`: its directory `/run/kt/shared` is given to agent `a` (it has a `uid`), and agent `b`'s delivery path `{b_place}` is in it too, where `a` could replace that file with its own. Give each agent a directory of its own (e.g. one named after it right below the delivery root)"
        )
    };
    // The last: with a place of `b` whose path is shorter than the
    // directory's and sorts after it (a search over the sorted places
    // must not take its length for its order).
    for b in [
        "shared/b.json",
        "shared/sub/b.json",
        "shared/b.json\" }, { type = \"file\", path = \"z",
    ] {
        let e = super::super::load_str(
            Path::new("/etc/keyturn/t.toml"),
            &config(true, "shared/a.json", b),
        )
        .expect_err("refused")
        .0;
        assert_eq!(e.len(), 1, "{e:?}");
        assert_eq!(e[0].toml_path, "agents.a.credentials.x.deliver[0].path");
        // `b`'s first place (the one in the shared directory).
        let b_place = &b[..b.find('"').unwrap_or(b.len())];
        assert_eq!(
            e[0].message,
            format!("{} (line 23)", message(&format!("/run/kt/{b_place}")))
        );
    }
    // `b`'s files deeper in `a`'s named directory: the earlier check says so.
    let e = super::super::load_str(
        Path::new("/etc/keyturn/t.toml"),
        &config(true, "a/x.json", "a/sub/b.json"),
    )
    .expect_err("refused")
    .0;
    assert!(
        e.iter()
            .any(|i| i.message.contains("is in the directory of agent `a`")),
        "{e:?}"
    );
    // No `uid`: the shared directory stays the daemon's.
    super::super::load_str(
        Path::new("/etc/keyturn/t.toml"),
        &config(false, "shared/a.json", "shared/b.json"),
    )
    .unwrap();
    // Side by side, each in a directory of its own, with a `uid`.
    super::super::load_str(
        Path::new("/etc/keyturn/t.toml"),
        &config(true, "shared/a/a.json", "shared/b/b.json"),
    )
    .unwrap();
}

/// Defect: `task_root` at a delivery root made `<task_root>/<agent>` each
/// agent's own delivery directory (every task then failed, with advice to
/// remove that directory), and `task_root` in an agent's directory put every
/// agent's task directories where that agent may rename them. Both are
/// refused; beside the agents' directories is accepted.
#[test]
fn task_root_is_a_directory_of_its_own_beside_the_agents() {
    let with_root = |root: &str| {
        HEAD.replacen(
            "[daemon]\n",
            &format!("[daemon]\ntask_root = \"{root}\"\n"),
            1,
        )
    };
    assert_only_error(
        &with_root("/run/kt"),
        "daemon.task_root",
        "task_root /run/kt is a delivery root itself, so <task_root>/<agent> would be each agent's own delivery directory; give tasks a directory of their own in it, e.g. \"/run/kt/tasks\"",
    );
    assert_only_error(
        &with_root("/run/kt/a/tasks"),
        "daemon.task_root",
        "task_root /run/kt/a/tasks is in the delivery directory of agent `a` (/run/kt/a): every agent's task directories would be made in it; put it beside the agents' directories, e.g. \"/run/kt/tasks\"",
    );
    let cfg = super::super::load_str(
        Path::new("/etc/keyturn/t.toml"),
        &with_root("/run/kt/tasks"),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        cfg.daemon.task_root.as_deref(),
        Some(Path::new("/run/kt/tasks"))
    );
}

#[test]
fn a_follow_nudge_key_needs_the_http_listener_and_is_resolved_like_other_paths() {
    let head = HEAD.replacen(
        "[daemon]\n",
        "[daemon]\nfollow_nudge_key_file = \"keys/nudge.key\"\n",
        1,
    );
    assert_only_error(
        &head,
        "daemon.follow_nudge_key_file",
        "follow_nudge_key_file enables POST /v1/follow/nudge on the HTTP listener, but there is no `listen` address (write e.g. listen = \"0.0.0.0:9464\")",
    );
    let with_listen = head.replacen("[daemon]\n", "[daemon]\nlisten = \"127.0.0.1:9464\"\n", 1);
    let cfg = super::super::load_str(Path::new("/etc/keyturn/t.toml"), &with_listen)
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        cfg.daemon.follow_nudge_key_file.as_deref(),
        Some(Path::new("/etc/keyturn/keys/nudge.key"))
    );
}

/// bb9 #5: `every = "1ms"` (a typo for `"1m"`) would rotate hundreds of
/// times a second; a cron schedule every second is the floor itself.
#[test]
fn a_rotation_period_below_one_second_is_refused() {
    let cred = |schedule: &str| {
        format!(
            "{HEAD}[agents.a.credentials.x]\nvault = \"v\"\n{schedule}\ngrace = \"1ms\"\ngenerate = {{ kind = \"ed25519\" }}\n"
        )
    };
    assert_only_error(
        &cred("every = \"1ms\""),
        "agents.a.credentials.x.every",
        "the rotation period (1ms) must be at least 1s (`ms` is milliseconds, `m` minutes)",
    );
    assert_only_error(
        &cred("every = \"999ms\""),
        "agents.a.credentials.x.every",
        "the rotation period (999ms) must be at least 1s (`ms` is milliseconds, `m` minutes)",
    );
    super::super::load_str(Path::new("/etc/keyturn/t.toml"), &cred("every = \"1s\""))
        .expect("one second is allowed");
}

/// Defects (black-box): a delivery path with NUL was accepted (every
/// rotation then parked at deliver, its value current in the vault and
/// delivered nowhere) and one with a newline made such a file; a control
/// character in `owner` reached the terminal through `surface`; an agent
/// named `all` could never be rotated on its own; a huge `every` never
/// rotated (no next due time could be computed).
#[test]
fn names_that_would_break_output_or_selection_are_refused() {
    let cred = |deliver: &str, every: &str| {
        format!(
            "{HEAD}[agents.a.credentials.x]\nvault = \"v\"\nevery = \"{every}\"\ngenerate = {{ kind = \"ed25519\" }}\n{deliver}"
        )
    };
    assert_only_error(
        &cred(
            "deliver = [{ type = \"file\", path = \"a/d\\u0000b\" }]\n",
            "1h",
        ),
        "agents.a.credentials.x.deliver[0].path",
        "delivery path `a/d\\0b` contains the control character '\\0'; file names here are printable",
    );
    assert_only_error(
        &cred(
            "deliver = [{ type = \"file\", path = \"a/d\\nb\" }]\n",
            "1h",
        ),
        "agents.a.credentials.x.deliver[0].path",
        "delivery path `a/d\\nb` contains the control character '\\n'; file names here are printable",
    );
    assert_only_error(
        &cred("", "999999999999d"),
        "agents.a.credentials.x.every",
        "duration `999999999999d` is over 100 years: write a shorter one",
    );
    assert_only_error(
        &HEAD.replace(
            "owner = \"o\"\ntenant = \"t\"\ntier = \"low\"\n[agents.b]",
            "owner = \"o\\nforged line\"\ntenant = \"t\"\ntier = \"low\"\n[agents.b]",
        ),
        "agents.a.owner",
        "owner must not contain control characters (newlines, tabs, NUL, bidi overrides)",
    );
    assert_only_error(
        &HEAD.replace("[agents.b]", "[agents.all]"),
        "agents.all",
        "`all` cannot name an agent: `keyturn rotate all` selects every credential; choose another name",
    );
}

/// Defect (black-box): a `socket` path over a Unix socket's 107 bytes
/// passed `check` (and a reload); the daemon then failed to start.
#[test]
fn a_socket_path_too_long_to_bind_is_refused() {
    let long = format!("/run/{}/control.sock", "k".repeat(100));
    let text = HEAD.replace(
        "[daemon]\n",
        &format!("[daemon]\nsocket = \"{long}\"\nagent_socket = \"/run/kt-agent.sock\"\n"),
    );
    assert_only_error(
        &text,
        "daemon.socket",
        &format!(
            "socket path {long} is {} bytes: a Unix socket's path is at most 107 bytes; choose a shorter one",
            long.len()
        ),
    );
}

/// Black-box finding: `~/keys` and `$HOME/keys` were taken as written, a
/// directory named `~` or `$HOME` beside the config. Refused, in every
/// kind of path setting, each named.
#[test]
fn paths_a_shell_would_expand_are_refused() {
    let text = "[daemon]\nstate_dir = \"~/keyturn\"\naudit_log = \"${STATE}/audit.log\"\n\
delivery_roots = [\"/run/kt\"]\n[vaults.v]\ntype = \"local\"\nkey_file = \"$HOME/vault.key\"\n\
[agents.a]\nowner = \"o\"\ntenant = \"t\"\ntier = \"low\"\n\
[agents.a.credentials.x]\nvault = \"v\"\nevery = \"1h\"\ngenerate = { kind = \"ed25519\" }\n\
deliver = [{ type = \"file\", path = \"/run/kt/a/$KEY\" }]\n";
    let e = super::super::load_str(Path::new("/etc/keyturn/t.toml"), text)
        .expect_err("should fail")
        .0;
    let got: Vec<(&str, &str)> = e
        .iter()
        .map(|e| (e.toml_path.as_str(), e.message.as_str()))
        .collect();
    let tail = "keyturn does not expand it (no shell reads the config); write the absolute path";
    let env = "names an environment variable (`$NAME`)";
    assert_eq!(
        got,
        [
            (
                "daemon.state_dir",
                format!("path `~/keyturn` starts with `~`: {tail}").as_str()
            ),
            (
                "daemon.audit_log",
                format!("path `${{STATE}}/audit.log` {env}: {tail}").as_str()
            ),
            (
                "vaults.v.key_file",
                format!("path `$HOME/vault.key` {env}: {tail}").as_str()
            ),
            (
                "agents.a.credentials.x.deliver[0].path",
                format!("path `/run/kt/a/$KEY` {env}: {tail}").as_str()
            ),
        ],
        "{e:?}"
    );
    // A `$` that names no variable is a file name like any other.
    let fine = format!(
        "{HEAD}[agents.a.credentials.x]\nvault = \"v\"\nevery = \"1h\"\ngenerate = {{ kind = \"ed25519\" }}\n\
deliver = [{{ type = \"file\", path = \"/run/kt/a/price$5.key\" }}]\n"
    );
    super::super::load_str(Path::new("/etc/keyturn/t.toml"), &fine).expect("a `$5` is no variable");
}

/// Black-box finding: a password in a vault's URL was accepted and then
/// printed by every error naming the vault, into the daemon's log,
/// `status` and the audit log. Refused, without echoing it.
#[test]
fn a_vault_url_holding_a_password_is_refused_without_echoing_it() {
    for (table, key, url) in [
        (
            "type = \"vault\"\nmount = \"kv\"\ntoken_env = \"T\"",
            "address",
            "http://kt:CANARY-77@127.0.0.1:8200",
        ),
        (
            "type = \"aws_secrets_manager\"\nregion = \"us-east-1\"",
            "endpoint_url",
            "http://kt:CANARY-77@127.0.0.1:5000/x",
        ),
        (
            "type = \"azure_key_vault\"",
            "vault_url",
            "https://kt:CANARY-77@v.vault.azure.net",
        ),
    ] {
        let text = format!("[vaults.r]\n{table}\n{key} = \"{url}\"\n");
        let e = super::super::load_str(Path::new("/etc/keyturn/t.toml"), &text)
            .expect_err("should fail")
            .0;
        let hit = e
            .iter()
            .find(|e| e.toml_path == format!("vaults.r.{key}"))
            .unwrap_or_else(|| panic!("{key} not refused: {e:?}"));
        assert!(
            hit.message.contains("holds a user name or password"),
            "{hit:?}"
        );
        assert!(!format!("{e:?}").contains("CANARY-77"), "echoed: {e:?}");
    }
}

/// Black-box findings: an `audit_log` on a delivered file's path or on
/// `state.db`, and two local vaults on one `dir`, passed the check; the
/// first lost the audit log, the second overwrote the other's versions.
#[test]
fn the_audit_log_and_local_vault_directories_are_places_of_their_own() {
    let errors = |text: &str| -> Vec<(String, String)> {
        super::super::load_str(Path::new("/etc/keyturn/t.toml"), text)
            .expect_err("should fail")
            .0
            .into_iter()
            .map(|e| (e.toml_path, e.message))
            .collect()
    };
    let e = errors(
        "[daemon]\nstate_dir = \"/var/lib/kt\"\ndelivery_roots = [\"/run/kt\"]\naudit_log = \"/run/kt/app/db\"\n",
    );
    assert_eq!(e.len(), 1, "{e:?}");
    assert_eq!(e[0].0, "daemon.audit_log");
    assert!(
        e[0].1
            .starts_with("audit_log `/run/kt/app/db` is below the delivery root `/run/kt`"),
        "{e:?}"
    );
    for ours in ["state.db", "state.db-wal", "vaults/x/audit.log", "tasks"] {
        let e = errors(&format!(
            "[daemon]\nstate_dir = \"/var/lib/kt\"\naudit_log = \"/var/lib/kt/{ours}\"\n"
        ));
        assert_eq!(e.len(), 1, "{ours}: {e:?}");
        assert!(
            e[0].1
                .contains("is one of keyturn's own places in the state directory"),
            "{ours}: {e:?}"
        );
    }
    let e = errors(
        "[daemon]\nstate_dir = \"/var/lib/kt\"\n[vaults.local]\ntype = \"local\"\n\
[vaults.local2]\ntype = \"local\"\ndir = \"/var/lib/kt/vaults/local\"\n",
    );
    assert_eq!(
        e,
        [(
            "vaults.local2.dir".to_owned(),
            "vault `local2`'s directory `/var/lib/kt/vaults/local`: it overlaps the directory of vault `local`; each local vault needs a directory of its own".to_owned()
        )]
    );
    let e = errors(
        "[daemon]\nstate_dir = \"/var/lib/kt\"\ndelivery_roots = [\"/run/kt\"]\n\
[vaults.v]\ntype = \"local\"\ndir = \"/run/kt/v\"\n",
    );
    assert_eq!(e.len(), 1, "{e:?}");
    assert!(
        e[0].1.contains("overlaps the delivery root `/run/kt`"),
        "{e:?}"
    );
    // The defaults, a log of its own name in the state directory, and one
    // elsewhere are fine.
    for log in [
        "/var/lib/kt/audit.log",
        "/var/lib/kt/audit-2026.log",
        "/var/log/kt/audit.log",
    ] {
        super::super::load_str(
            Path::new("/etc/keyturn/t.toml"),
            &format!(
                "[daemon]\nstate_dir = \"/var/lib/kt\"\ndelivery_roots = [\"/run/kt\"]\naudit_log = \"{log}\"\n\
[vaults.a]\ntype = \"local\"\n[vaults.b]\ntype = \"local\"\n"
            ),
        )
        .unwrap_or_else(|e| panic!("{log}: {e:?}"));
    }
}

/// Black-box finding: `<root>/a/.` and `<root>/a/dir/` were taken (a
/// file written at `<root>/a` and `<root>/a/dir`), and a 300-byte name
/// failed every delivery for ever.
#[test]
fn delivery_paths_that_name_no_file_or_too_long_a_name_are_refused() {
    let long = "n".repeat(300);
    for (path, says) in [
        ("/run/kt/a/.", "ends with `/` or `/.`"),
        ("/run/kt/a/dir/", "ends with `/` or `/.`"),
        (
            &format!("/run/kt/a/{long}") as &str,
            "is 300 bytes long; a file name is at most 255 bytes",
        ),
    ] {
        let text = format!(
            "{HEAD}[agents.a.credentials.x]\nvault = \"v\"\nevery = \"1h\"\ngenerate = {{ kind = \"ed25519\" }}\n\
deliver = [{{ type = \"file\", path = \"{path}\" }}]\n"
        );
        let e = super::super::load_str(Path::new("/etc/keyturn/t.toml"), &text)
            .expect_err(path)
            .0;
        assert_eq!(e.len(), 1, "{path}: {e:?}");
        assert_eq!(e[0].toml_path, "agents.a.credentials.x.deliver[0].path");
        assert!(e[0].message.contains(says), "{path}: {e:?}");
    }
}

/// Black-box finding: `uid = 4294967295` passed, and chown took it as
/// "leave unchanged": the agent's files stayed the daemon's.
#[test]
fn a_uid_or_gid_of_minus_one_is_refused() {
    for key in ["uid", "gid"] {
        let text = HEAD.replace("[agents.b]\n", &format!("[agents.b]\n{key} = 4294967295\n"));
        let e = super::super::load_str(Path::new("/etc/keyturn/t.toml"), &text)
            .expect_err(key)
            .0;
        assert_eq!(e.len(), 1, "{e:?}");
        assert_eq!(e[0].toml_path, format!("agents.b.{key}"));
        assert!(e[0].message.contains("(uid_t)-1"), "{e:?}");
    }
}
