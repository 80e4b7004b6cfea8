//! The shipped unit file is valid for systemd and keeps the properties the
//! daemon relies on (notify, watchdog, sandbox).

use std::path::Path;

fn unit() -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("systemd/keyturn.service"))
        .unwrap()
}

#[test]
fn unit_has_notify_watchdog_and_sandbox() {
    let u = unit();
    for line in [
        "Type=notify",
        "WatchdogSec=",
        "StateDirectory=keyturn",
        "RuntimeDirectory=",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "PrivateTmp=yes",
        "CapabilityBoundingSet=CAP_CHOWN CAP_DAC_OVERRIDE",
        "ExecReload=/bin/kill -HUP $MAINPID",
    ] {
        assert!(u.lines().any(|l| l.starts_with(line)), "unit lacks {line}");
    }
}

#[test]
fn systemd_analyze_verify_accepts_the_unit() {
    let out = std::process::Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .expect("systemd-analyze runs (Debian: apt-get install systemd)");
    assert!(out.status.success());
    let dir = tempfile::tempdir().unwrap();
    // Point ExecStart at a binary that exists here; verify checks it.
    let text = unit().replace("/usr/bin/keyturn", env!("CARGO_BIN_EXE_keyturn"));
    let path = dir.path().join("keyturn.service");
    std::fs::write(&path, text).unwrap();
    let out = std::process::Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    let problems: Vec<&str> = err
        .lines()
        .filter(|l| l.contains("keyturn.service"))
        .collect();
    assert!(
        out.status.success() && problems.is_empty(),
        "systemd-analyze verify: {err}"
    );
}

/// The daemon needs descriptors for deliveries, vault connections and
/// clients beyond systemd's default soft limit of 1024.
#[test]
fn unit_raises_the_open_files_limit() {
    let u = unit();
    let limit: u64 = u
        .lines()
        .find_map(|l| l.strip_prefix("LimitNOFILE="))
        .expect("unit lacks LimitNOFILE=")
        .trim()
        .parse()
        .expect("LimitNOFILE= is a number");
    assert!(limit >= 8192, "LimitNOFILE={limit}");
}

/// Under `ProtectSystem=strict` the daemon can write only where the unit
/// says. Every place the production example config writes to (state, the
/// audit log, the socket, the delivery roots) must be writable there, or the
/// daemon fails at start on a real host.
#[test]
fn unit_lets_the_production_config_write_where_it_writes() {
    let u = unit();
    let writable: Vec<&str> = u
        .lines()
        .filter_map(|l| l.strip_prefix("ReadWritePaths="))
        .flat_map(str::split_whitespace)
        .collect();
    let managed = |dir: &str, base: &str| {
        // StateDirectory=keyturn -> /var/lib/keyturn, and so on.
        u.lines()
            .filter_map(|l| l.strip_prefix(&format!("{dir}=")))
            .flat_map(str::split_whitespace)
            .map(|d| format!("{base}/{d}"))
            .collect::<Vec<_>>()
    };
    let mut allowed: Vec<String> = writable.iter().map(|s| (*s).to_owned()).collect();
    allowed.extend(managed("StateDirectory", "/var/lib"));
    allowed.extend(managed("RuntimeDirectory", "/run"));
    allowed.extend(managed("LogsDirectory", "/var/log"));
    let example = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("config/examples/production.toml"),
    )
    .unwrap();
    let cfg: toml::Table = toml::from_str(&example).unwrap();
    let daemon = cfg["daemon"].as_table().unwrap();
    let parent = |p: &str| Path::new(p).parent().unwrap().to_str().unwrap().to_owned();
    let mut places = vec![
        daemon["state_dir"].as_str().unwrap().to_owned(),
        parent(daemon["audit_log"].as_str().unwrap()),
        parent(daemon["socket"].as_str().unwrap()),
    ];
    for root in daemon["delivery_roots"].as_array().unwrap() {
        places.push(root.as_str().unwrap().to_owned());
    }
    for place in places {
        assert!(
            allowed
                .iter()
                .any(|a| Path::new(&place).starts_with(Path::new(a))),
            "the production config writes to {place}, which the unit does not make writable ({allowed:?})"
        );
    }
}

/// Runs systemd/check.sh (the CI check) on `unit`.
fn check_script(unit: Option<&Path>) -> std::process::Output {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("systemd/check.sh");
    let mut cmd = std::process::Command::new("bash");
    cmd.arg(script)
        .env("KEYTURN_BIN", env!("CARGO_BIN_EXE_keyturn"));
    if let Some(unit) = unit {
        cmd.arg(unit);
    }
    cmd.output().expect("bash runs")
}

/// A copy of the shipped unit with `edit` applied, in a temp dir.
fn edited_unit(edit: impl Fn(&str) -> Option<String>) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keyturn.service");
    let text: Vec<String> = unit().lines().filter_map(&edit).collect();
    std::fs::write(&path, text.join("\n") + "\n").unwrap();
    (dir, path)
}

#[test]
fn check_script_passes_the_shipped_unit_and_its_drop_ins() {
    let out = check_script(None);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("(at most 2.0)"), "{stdout}");
    for dropin in ["local-vault-key", "signal-sink", "restrict-network"] {
        assert!(
            stdout.contains(&format!("with examples/{dropin}.conf it verifies cleanly")),
            "{stdout}"
        );
    }
}

/// The check can fail: without its system call filter the unit is far
/// above 2.0.
#[test]
fn check_script_fails_a_unit_without_system_call_filter() {
    let (_dir, path) = edited_unit(|l| (!l.starts_with("SystemCallFilter=")).then(|| l.to_owned()));
    let out = check_script(Some(&path));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("is above 2.0"), "{stderr}");
    assert!(stderr.contains("SystemCallFilter=~@"), "{stderr}");
}

/// The check can fail on verify alone: an unknown setting (here a typo)
/// costs no exposure but makes `systemd-analyze verify` complain.
#[test]
fn check_script_fails_a_unit_verify_complains_about() {
    let (_dir, path) = edited_unit(|l| {
        Some(match l {
            "LockPersonality=yes" => "LockPersonalty=yes\nLockPersonality=yes".to_owned(),
            l => l.to_owned(),
        })
    });
    let out = check_script(Some(&path));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("Unknown key 'LockPersonalty'"), "{stderr}");
    assert!(!stderr.contains("is above"), "{stderr}");
}

/// Not root: the daemon's user, with exactly the capabilities delivery
/// needs as ambient ones (bounding = ambient, so nothing else can be
/// regained), and sysusers creates that user.
#[test]
fn unit_runs_as_its_own_user_with_only_the_capabilities_delivery_needs() {
    let u = unit();
    let value = |key: &str| -> Vec<String> {
        u.lines()
            .filter_map(|l| l.strip_prefix(&format!("{key}=")))
            .map(str::to_owned)
            .collect()
    };
    assert_eq!(value("User"), ["keyturn"]);
    assert_eq!(value("Group"), ["keyturn"]);
    assert_eq!(
        value("CapabilityBoundingSet"),
        ["CAP_CHOWN CAP_DAC_OVERRIDE"]
    );
    assert_eq!(value("AmbientCapabilities"), ["CAP_CHOWN CAP_DAC_OVERRIDE"]);
    assert_eq!(value("NoNewPrivileges"), ["yes"]);
    let sysusers = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("systemd/keyturn.sysusers.conf"),
    )
    .unwrap();
    assert!(
        sysusers.lines().any(|l| l.starts_with("u keyturn ")),
        "{sysusers}"
    );
}
