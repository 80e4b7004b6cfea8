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
