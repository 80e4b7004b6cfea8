//! The daemon end to end under the shipped unit's sandbox, as far as a
//! machine without systemd as PID 1 can apply it (CI runs in a container).
//!
//! Applied, read from systemd/keyturn.service where the unit says it:
//! - `User=`/`Group=`: a non-root uid and gid (numeric stand-ins for the
//!   `keyturn` user), no supplementary groups (`setpriv`);
//! - `AmbientCapabilities=`/`CapabilityBoundingSet=`: exactly the unit's
//!   capabilities as ambient, inheritable, permitted, effective and bounding
//!   set (and with systemd/examples/signal-sink.conf, its CAP_KILL too);
//! - `NoNewPrivileges=yes`; `UMask=` (the unit's value);
//! - `ProtectSystem=strict` + `ReadWritePaths=`: `/` read-only, the test's
//!   directory (standing in for /var/lib/keyturn and /run/keyturn) writable
//!   (bubblewrap's bind mounts, in a private mount namespace: `PrivateMounts=`);
//!   read-only /proc/sys and /sys cover `ProtectKernelTunables=` and
//!   `ProtectControlGroups=`;
//! - `PrivateTmp=yes` (empty /tmp and /var/tmp), `PrivateDevices=yes` (a
//!   minimal /dev), `ProtectHome=` (empty /home and /root: the `tmpfs`
//!   flavour of it; the unit's `yes` makes them inaccessible),
//!   `ProtectHostname=yes` (a UTS namespace);
//! - `RuntimeDirectoryMode=0711` and `StateDirectoryMode=0700`: the
//!   directories are made with those modes, owned by the daemon's uid, as
//!   systemd makes them;
//! - a seccomp filter built from the unit's `SystemCallFilter=` lines (the
//!   groups expanded by the installed `systemd-analyze syscall-filter`,
//!   EPERM for the rest: `SystemCallErrorNumber=EPERM`),
//!   `SystemCallArchitectures=native`, `MemoryDenyWriteExecute=yes`,
//!   `RestrictAddressFamilies=` (on socket()) and `LockPersonality=yes`
//!   (tests/sandbox/seccomp_filter.py; bubblewrap loads it).
//!
//! Not applied (they need systemd itself): `RestrictNamespaces=` (clone
//! flag filtering), `RestrictRealtime=` (moot: `~@resources` already takes
//! sched_setscheduler), `RestrictSUIDSGID=`, `ProcSubset=pid`,
//! `ProtectKernelModules=`, `ProtectKernelLogs=`, `ProtectClock=`,
//! `RemoveIPC=`, `LimitNOFILE=`, `WatchdogSec=` (no watchdog is asked for
//! here), `LoadCredential*=`, and cgroup settings (`DeviceAllow=`,
//! `IPAddressDeny=` in the drop-in). Without CAP_SYS_ADMIN, CAP_SYS_MODULE,
//! CAP_SYS_TIME or CAP_SYSLOG most of what they forbid fails anyway.
//!
//! Needs root (to switch uids and make mount namespaces), bubblewrap,
//! setpriv, systemd-analyze and python3-seccomp (scripts/deps.sh installs
//! them; CI runs it).

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

/// Stand-ins for the `keyturn` user and for two agents' users. No passwd
/// entries are needed: everything is numeric.
const DAEMON_UID: u32 = 64_801;
const AGENT_UID: u32 = 64_802;
const OTHER_UID: u32 = 64_803;

fn unit_text(dropin: Option<&str>) -> String {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("systemd");
    let mut text = std::fs::read_to_string(dir.join("keyturn.service")).unwrap();
    if let Some(name) = dropin {
        text += &std::fs::read_to_string(dir.join("examples").join(name)).unwrap();
    }
    text
}

/// The values of `key=` in the unit, in order.
fn settings(unit: &str, key: &str) -> Vec<String> {
    unit.lines()
        .filter_map(|l| l.strip_prefix(&format!("{key}=")))
        .map(str::to_owned)
        .collect()
}

/// The unit's ambient capabilities as setpriv spells them (`+chown,+kill`).
fn setpriv_caps(unit: &str) -> String {
    let caps: Vec<String> = settings(unit, "AmbientCapabilities")
        .iter()
        .flat_map(|v| v.split_whitespace().map(str::to_owned).collect::<Vec<_>>())
        .map(|c| format!("+{}", c.trim_start_matches("CAP_").to_lowercase()))
        .collect();
    assert!(!caps.is_empty(), "the unit names no AmbientCapabilities=");
    caps.join(",")
}

/// The capability bits the unit grants (for comparing with /proc).
fn cap_mask(unit: &str) -> u64 {
    let bit = |name: &str| match name {
        "CAP_CHOWN" => 0,
        "CAP_DAC_OVERRIDE" => 1,
        "CAP_KILL" => 5,
        other => panic!("this test does not know {other}; add its bit"),
    };
    settings(unit, "AmbientCapabilities")
        .iter()
        .flat_map(|v| v.split_whitespace().map(str::to_owned).collect::<Vec<_>>())
        .fold(0, |m, c| m | 1 << bit(&c))
}

/// The command line that starts the daemon as the unit would: bubblewrap
/// for the mounts, then setpriv for the user, capabilities and
/// no_new_privs, with the unit's umask. The shell in between writes the
/// daemon's pid (it `exec`s setpriv, which `exec`s keyturn).
fn sandbox(env: &Env, unit: &str, pid_file: &Path) -> Vec<String> {
    let dir = env.path().display().to_string();
    let umask = settings(unit, "UMask").pop().expect("the unit sets UMask=");
    let caps = setpriv_caps(unit);
    let inner = format!(
        "umask {umask} && echo $$ > '{pid}' && exec setpriv --reuid={DAEMON_UID} --regid={DAEMON_UID} --clear-groups \
         --inh-caps=-all,{caps} --ambient-caps=-all,{caps} --bounding-set=-all,{caps} --no-new-privs -- \"$@\"",
        pid = pid_file.display()
    );
    let filter = seccomp_filter(env, unit);
    // The outer shell opens the filter on fd 9 for bwrap, which loads it
    // just before it runs the inner shell (so setpriv and the daemon run
    // under it, as systemd loads it before exec).
    let outer = format!("exec bwrap --seccomp 9 \"$@\" 9<'{}'", filter.display());
    // The binary under test, bound where it is: a checkout under /tmp (or
    // /home, /root) would be hidden by the tmpfs mounts below. Under
    // systemd the unit runs /usr/bin/keyturn, which they do not hide.
    let bin_dir = Path::new(bin())
        .parent()
        .expect("the binary is in a directory")
        .display()
        .to_string();
    [
        "sh",
        "-c",
        &outer,
        "sh",
        "--die-with-parent",
        "--ro-bind",
        "/",
        "/",
        "--tmpfs",
        "/tmp",
        "--tmpfs",
        "/var/tmp",
        "--tmpfs",
        "/home",
        "--tmpfs",
        "/root",
        "--dev",
        "/dev",
        "--unshare-uts",
        "--ro-bind",
        &bin_dir,
        &bin_dir,
        "--bind",
        &dir,
        &dir,
        "--",
        "sh",
        "-c",
        &inner,
        "sh",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect()
}

/// Writes the seccomp program for the unit's SystemCallFilter= lines and
/// RestrictAddressFamilies= (tests/sandbox/seccomp_filter.py, which also
/// applies MemoryDenyWriteExecute=, LockPersonality= and
/// SystemCallArchitectures=native, so the unit must set those).
fn seccomp_filter(env: &Env, unit: &str) -> std::path::PathBuf {
    for (key, value) in [
        ("MemoryDenyWriteExecute", "yes"),
        ("LockPersonality", "yes"),
        ("SystemCallArchitectures", "native"),
        ("SystemCallErrorNumber", "EPERM"),
    ] {
        assert_eq!(
            settings(unit, key),
            [value],
            "the filter applies {key}={value}"
        );
    }
    let out = env.path().join("seccomp.bpf");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/sandbox/seccomp_filter.py");
    let mut cmd = Command::new("/usr/bin/python3");
    cmd.arg(script).arg(&out);
    for value in settings(unit, "SystemCallFilter") {
        cmd.arg("--filter").arg(value);
    }
    let families = settings(unit, "RestrictAddressFamilies").join(" ");
    cmd.arg("--families").arg(families);
    let status = cmd.status().expect("python3 runs");
    assert!(
        status.success(),
        "seccomp_filter.py failed (python3-seccomp: scripts/deps.sh)"
    );
    out
}

fn tools_present() {
    assert_root();
    for tool in ["bwrap", "setpriv", "systemd-analyze"] {
        let found = Command::new(tool)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok();
        assert!(found, "{tool} is missing: run scripts/deps.sh (CI does)");
    }
}

fn assert_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "the sandbox test needs root to switch uids and make mount namespaces (as CI runs the suite)"
    );
}

fn chown(path: &Path, uid: u32, mode: u32) {
    std::os::unix::fs::chown(path, Some(uid), Some(uid)).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// The directories as systemd makes them for the unit: the test's dir
/// stands in for /run/keyturn (0711, the daemon's), `agents` for
/// /run/keyturn/agents (0711), `state` for /var/lib/keyturn (0700).
fn lay_out(env: &Env) {
    chown(env.path(), DAEMON_UID, 0o711);
    chown(&env.root(), DAEMON_UID, 0o711);
    std::fs::create_dir(env.state_dir()).unwrap();
    chown(&env.state_dir(), DAEMON_UID, 0o700);
}

/// Runs `args` as `uid` (no capabilities), returning (success, stdout).
fn as_user(uid: u32, args: &[&str]) -> (bool, Vec<u8>) {
    let out = Command::new("setpriv")
        .args([
            format!("--reuid={uid}"),
            format!("--regid={uid}"),
            "--clear-groups".to_owned(),
            "--".to_owned(),
        ])
        .args(args)
        .output()
        .unwrap();
    (out.status.success(), out.stdout)
}

fn credentials(with_signal: Option<&Path>, extra: &str) -> String {
    let signal = with_signal.map_or(String::new(), |pid| {
        format!(
            r#"  {{ type = "signal", pid_file = "{}", coalesce = "0s" }},
"#,
            pid.display()
        )
    });
    agent_table("bot")
        + &format!(
            r#"uid = {AGENT_UID}
gid = {AGENT_UID}

[agents.bot.credentials.db]
vault = "local"
generate = {{ kind = "password", length = 32 }}
every = "1h"
deliver = [
  {{ type = "file", path = "{{root}}/bot/db.json", format = "json" }},
{signal}]
{extra}"#
        )
}

/// The daemon's process, as the kernel sees it: uids, capabilities,
/// no_new_privs, umask, and whether its / is read-only.
fn process_facts(pid: i32) -> (String, String) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let mountinfo = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap();
    (status, mountinfo)
}

fn field<'a>(status: &'a str, name: &str) -> &'a str {
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name}:")))
        .unwrap_or_else(|| panic!("no {name} in {status}"))
        .trim()
}

fn assert_sandboxed(pid: i32, unit: &str) {
    let (status, mountinfo) = process_facts(pid);
    let uids: Vec<&str> = field(&status, "Uid").split_whitespace().collect();
    assert!(
        uids.iter().all(|u| *u == DAEMON_UID.to_string()),
        "{status}"
    );
    assert_eq!(field(&status, "Groups"), "", "no supplementary groups");
    let mask = cap_mask(unit);
    for set in ["CapEff", "CapPrm", "CapBnd", "CapAmb"] {
        let got = u64::from_str_radix(field(&status, set), 16).unwrap();
        assert_eq!(got, mask, "{set} is {got:#x}, the unit grants {mask:#x}");
    }
    assert_eq!(field(&status, "NoNewPrivs"), "1");
    // A seccomp filter (mode 2) is in force.
    assert_eq!(field(&status, "Seccomp"), "2", "no seccomp filter");
    assert_eq!(field(&status, "Umask"), "0077");
    // Its root is a read-only bind of the host's.
    let root = mountinfo
        .lines()
        .find(|l| l.split_whitespace().nth(4) == Some("/"))
        .expect("a / mount");
    let options = root.split_whitespace().nth(5).unwrap();
    assert!(
        options.split(',').any(|o| o == "ro"),
        "/ is not read-only: {root}"
    );
}

/// Start, deliver to a file owned by the agent's uid, status over the
/// socket, rotate, SIGHUP reload (with a new credential), SIGTERM stop —
/// all as the unit would run it.
#[test]
fn the_daemon_runs_end_to_end_under_the_units_sandbox() {
    tools_present();
    let unit = unit_text(None);
    let env = Env::new(&credentials(None, ""));
    lay_out(&env);
    let pid_file = env.path().join("daemon.pid");
    let daemon = env.spawn_wrapped(&[], &sandbox(&env, &unit, &pid_file), &pid_file);
    daemon.wait_ready();
    assert_sandboxed(daemon.pid(), &unit);

    // Delivered: owned by the agent, readable by it through the 0711
    // directories, not by another user, who cannot list the agents either.
    let file = env.root().join("bot/db.json");
    wait_for(Duration::from_secs(30), || file.exists().then_some(()))
        .unwrap_or_else(|| panic!("nothing delivered; log:\n{}", daemon.log_text()));
    let meta = std::fs::metadata(&file).unwrap();
    assert_eq!(meta.uid(), AGENT_UID);
    assert_eq!(meta.mode() & 0o077, 0, "mode {:o}", meta.mode());
    let (ok, content) = as_user(AGENT_UID, &["cat", file.to_str().unwrap()]);
    assert!(ok, "the agent cannot read its file");
    let value: serde_json::Value = serde_json::from_slice(&content).unwrap();
    assert!(!content.is_empty());
    let (ok, _) = as_user(OTHER_UID, &["cat", file.to_str().unwrap()]);
    assert!(!ok, "another user read the agent's file");
    let (ok, _) = as_user(OTHER_UID, &["ls", env.root().to_str().unwrap()]);
    assert!(!ok, "another user listed the agents' directory (0711)");

    // Status over the control socket, for an operator in the daemon's group
    // (the socket's, with no socket_group): the daemon reads the client's
    // supplementary groups in /proc/PID/status, which the unit leaves
    // readable (no ProtectProc=). Without the group: refused (77).
    let status_as = |groups: &str| {
        let mut cmd = Command::new("setpriv");
        cmd.args([
            format!("--reuid={OTHER_UID}"),
            format!("--regid={OTHER_UID}"),
        ]);
        if groups.is_empty() {
            cmd.arg("--clear-groups");
        } else {
            cmd.arg(format!("--groups={groups}"));
        }
        cmd.args(["--", bin(), "status", "--json", "--config"])
            .arg(&env.config)
            .env_remove("KEYTURN_CONFIG")
            .output()
            .unwrap()
    };
    let out = status_as(&DAEMON_UID.to_string());
    assert!(
        out.status.success(),
        "a member of the socket's group was refused: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(status_as("").status.code(), Some(77));
    // A rotation on demand.
    let rows = status_json(&env);
    assert_eq!(row(&rows, "bot", "db")["version"], 1, "{rows:?}");
    env.cli_ok(&["rotate", "bot/db", "--wait"]);
    wait_version(&env, "bot", "db", 2);
    let (_, rotated) = as_user(AGENT_UID, &["cat", file.to_str().unwrap()]);
    assert_ne!(rotated, content, "the rotated value was not delivered");

    // SIGHUP reload with a second credential.
    env.write_credentials(&credentials(
        None,
        r#"
[agents.bot.credentials.api]
vault = "local"
generate = { kind = "password", length = 32 }
every = "1h"
deliver = [{ type = "file", path = "{root}/bot/api.json", format = "json" }]
"#,
    ));
    daemon.reload();
    let api = env.root().join("bot/api.json");
    wait_for(Duration::from_secs(30), || api.exists().then_some(()))
        .unwrap_or_else(|| panic!("not delivered after reload; log:\n{}", daemon.log_text()));
    assert_eq!(std::fs::metadata(&api).unwrap().uid(), AGENT_UID);

    // The state the daemon wrote is its own and private.
    for entry in std::fs::read_dir(env.state_dir()).unwrap() {
        let meta = entry.unwrap().metadata().unwrap();
        assert_eq!(meta.uid(), DAEMON_UID);
        assert_eq!(meta.mode() & 0o077, 0, "state entry mode {:o}", meta.mode());
    }

    // SIGTERM: a clean exit; the sandbox refused nothing the daemon tried
    // (EPERM is what the filter and the missing capabilities answer); and
    // no secret in what it logged.
    let log = daemon.stop();
    assert!(
        !log.contains("Operation not permitted") && !log.contains("EPERM"),
        "the sandbox refused something:\n{log}"
    );
    let rotated: serde_json::Value = serde_json::from_slice(&rotated).unwrap();
    for doc in [value, rotated] {
        let secret = doc["value"].as_str().expect("a delivered value");
        assert_eq!(secret.len(), 32, "the generated password");
        assert!(!log.contains(secret), "a delivered secret is in the log");
    }
}

/// The signal sink under the unit: without CAP_KILL (the default) a
/// signal to the agent's process fails and says which drop-in adds it;
/// with systemd/examples/signal-sink.conf the agent is signalled.
#[test]
fn the_signal_sink_needs_the_signal_sink_drop_in() {
    tools_present();
    // The agent's process: a `sleep` of the agent's uid, which SIGHUP ends.
    let spawn_agent = || {
        Command::new("setpriv")
            .args([
                format!("--reuid={AGENT_UID}"),
                format!("--regid={AGENT_UID}"),
                "--clear-groups".to_owned(),
                "--".to_owned(),
                "sleep".to_owned(),
                "120".to_owned(),
            ])
            .spawn()
            .unwrap()
    };
    for dropin in [None, Some("signal-sink.conf")] {
        let unit = unit_text(dropin);
        let mut agent = spawn_agent();
        // The pid file where the daemon can see it: under PrivateTmp=yes a
        // pid file in /tmp is not (the daemon has its own /tmp), so it is
        // in a directory of the agent's, like /run/bot/bot.pid.
        let env = Env::new(&credentials(Some(Path::new("{dir}/bot/bot.pid")), ""));
        let agent_run = env.path().join("bot");
        std::fs::create_dir(&agent_run).unwrap();
        std::fs::write(agent_run.join("bot.pid"), agent.id().to_string()).unwrap();
        chown(&agent_run.join("bot.pid"), AGENT_UID, 0o644);
        chown(&agent_run, AGENT_UID, 0o755);
        lay_out(&env);
        let pid_file = env.path().join("daemon.pid");
        let daemon = env.spawn_wrapped(&[], &sandbox(&env, &unit, &pid_file), &pid_file);
        daemon.wait_ready();
        assert_sandboxed(daemon.pid(), &unit);
        match dropin {
            None => {
                let error = wait_for(Duration::from_secs(30), || {
                    let rows = status_json(&env);
                    row(&rows, "bot", "db")["last_error"]
                        .as_str()
                        .filter(|e| e.contains("CAP_KILL"))
                        .map(str::to_owned)
                })
                .unwrap_or_else(|| {
                    panic!(
                        "no CAP_KILL error in status: {:?}\nlog:\n{}",
                        status_json(&env),
                        daemon.log_text()
                    )
                });
                assert!(
                    error.contains("/usr/share/doc/keyturn/examples/systemd/signal-sink.conf"),
                    "{error}"
                );
                assert!(
                    agent.try_wait().unwrap().is_none(),
                    "the agent was signalled"
                );
                let _ = agent.kill();
                let _ = agent.wait();
            }
            Some(_) => {
                let status = wait_for(Duration::from_secs(30), || agent.try_wait().unwrap())
                    .unwrap_or_else(|| {
                        panic!("the agent was not signalled; log:\n{}", daemon.log_text())
                    });
                use std::os::unix::process::ExitStatusExt;
                assert_eq!(status.signal(), Some(libc::SIGHUP), "{status}");
            }
        }
        daemon.stop();
    }
}
