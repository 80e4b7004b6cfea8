//! End-to-end tests of `keyturn watch` with a real child (a shell script)
//! and real files replaced the way the file sink replaces them (a rename
//! over the old one). The child logs what it hears to a file the test reads.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{bin, wait_for};

/// Logs `start PID`, `hup PID`, `usr1 PID` and `term PID` to `$LOG`; on
/// TERM exits with `$TERM_EXIT` unless `$IGNORE_TERM` is set. The sleep runs
/// in the background so a trap runs at once.
const CHILD: &str = r#"#!/bin/sh
echo "start $$" >> "$LOG"
trap 'echo "hup $$" >> "$LOG"' HUP
trap 'echo "usr1 $$" >> "$LOG"' USR1
if [ -n "$IGNORE_TERM" ]; then
  trap 'echo "term $$" >> "$LOG"' TERM
else
  trap 'echo "term $$" >> "$LOG"; exit "${TERM_EXIT:-0}"' TERM
fi
while :; do
  sleep 1 &
  wait $! 2>/dev/null
done
"#;

struct Rig {
    dir: tempfile::TempDir,
}

impl Rig {
    fn new() -> Rig {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("agents")).unwrap();
        let child = dir.path().join("child.sh");
        std::fs::write(&child, CHILD).unwrap();
        std::fs::set_permissions(&child, std::fs::Permissions::from_mode(0o755)).unwrap();
        let rig = Rig { dir };
        rig.deliver("v1");
        rig
    }

    fn file(&self) -> PathBuf {
        self.dir.path().join("agents").join("db.json")
    }

    fn log(&self) -> PathBuf {
        self.dir.path().join("child.log")
    }

    /// Replaces the file as the file sink does: a new file renamed over it.
    fn deliver(&self, content: &str) {
        let tmp = self.dir.path().join("agents").join(".db.json.tmp");
        std::fs::write(&tmp, content).unwrap();
        std::fs::rename(&tmp, self.file()).unwrap();
    }

    fn watch(&self, args: &[&str], env: &[(&str, &str)]) -> Child {
        let mut cmd = Command::new(bin());
        cmd.arg("watch")
            .arg("--file")
            .arg(self.file())
            .args(args)
            .arg("--")
            .arg(self.dir.path().join("child.sh"))
            .env("LOG", self.log())
            .env_remove("KEYTURN_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(self.dir.path().join("watch.log")).unwrap());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("spawn keyturn watch");
        self.wait_lines("start", 1);
        child
    }

    fn lines(&self) -> Vec<String> {
        std::fs::read_to_string(self.log())
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    /// The pids of the `what` lines.
    fn pids(&self, what: &str) -> Vec<i32> {
        self.lines()
            .iter()
            .filter_map(|l| l.strip_prefix(&format!("{what} ")))
            .map(|p| p.parse().unwrap())
            .collect()
    }

    fn wait_lines(&self, what: &str, n: usize) -> Vec<i32> {
        wait_for(Duration::from_secs(10), || {
            let p = self.pids(what);
            (p.len() >= n).then_some(p)
        })
        .unwrap_or_else(|| {
            panic!(
                "never saw {n} `{what}` line(s); child log: {:?}; watch log: {}",
                self.lines(),
                std::fs::read_to_string(self.dir.path().join("watch.log")).unwrap_or_default()
            )
        })
    }
}

fn signal(child: &Child, sig: i32) {
    assert_eq!(unsafe { libc::kill(child.id() as i32, sig) }, 0);
}

fn wait_exit(child: &mut Child, within: Duration) -> std::process::ExitStatus {
    wait_for(within, || child.try_wait().unwrap()).unwrap_or_else(|| {
        let _ = child.kill();
        panic!("keyturn watch did not exit within {within:?}")
    })
}

fn alive(pid: i32) -> bool {
    unsafe { libc::kill(pid, 0) == 0 }
}

fn stop(mut child: Child) {
    signal(&child, libc::SIGTERM);
    wait_exit(&mut child, Duration::from_secs(15));
}

#[test]
fn a_new_version_sends_sighup_and_other_files_send_nothing() {
    let rig = Rig::new();
    let watch = rig.watch(&[], &[]);
    let start = rig.pids("start")[0];
    rig.deliver("v2");
    assert_eq!(rig.wait_lines("hup", 1), vec![start]);
    // A temp file, an unrelated file, a chmod of it, a read of the watched
    // file: no new version.
    let dir = rig.dir.path().join("agents");
    std::fs::write(dir.join(".db.json.tmp"), "v3").unwrap();
    std::fs::remove_file(dir.join(".db.json.tmp")).unwrap();
    std::fs::write(dir.join("other"), "x").unwrap();
    std::fs::set_permissions(dir.join("other"), std::fs::Permissions::from_mode(0o600)).unwrap();
    assert_eq!(std::fs::read_to_string(rig.file()).unwrap(), "v2");
    // Nor a chmod, a chown or an atime change of the watched file itself
    // (black-box finding: each restarted or signalled the agent; a reload
    // that changes an agent's uid re-owns every file it has).
    std::fs::set_permissions(rig.file(), std::fs::Permissions::from_mode(0o600)).unwrap();
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    std::os::unix::fs::chown(rig.file(), Some(uid), Some(gid)).unwrap();
    let accessed = std::fs::FileTimes::new().set_accessed(std::time::SystemTime::now());
    std::fs::File::options()
        .write(true)
        .open(rig.file())
        .unwrap()
        .set_times(accessed)
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(rig.pids("hup").len(), 1, "{:?}", rig.lines());
    // An in-place rewrite with new bytes counts.
    std::fs::write(rig.file(), "v3").unwrap();
    assert_eq!(rig.wait_lines("hup", 2), vec![start, start]);
    assert_eq!(rig.pids("start").len(), 1, "signalled, never restarted");
    stop(watch);
}

/// Defect: once the file's directory was deleted (an agent's directory
/// removed; the next delivery makes it again) watch watched nothing and said
/// nothing: the child kept its old credential for good. The directory made
/// again is watched again, and a version delivered into it (or while it was
/// gone) signals the child; a directory moved away as well.
#[test]
fn a_directory_deleted_and_made_again_is_watched_again() {
    let rig = Rig::new();
    let watch = rig.watch(&[], &[]);
    let start = rig.pids("start")[0];
    let dir = rig.dir.path().join("agents");
    std::fs::remove_dir_all(&dir).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    std::fs::create_dir(&dir).unwrap();
    rig.deliver("v2");
    assert_eq!(rig.wait_lines("hup", 1), vec![start]);
    // Later versions in the new directory are seen too.
    std::thread::sleep(Duration::from_millis(700));
    rig.deliver("v3");
    assert_eq!(rig.wait_lines("hup", 2), vec![start, start]);
    // Moved away, then made again by the next delivery.
    std::fs::rename(&dir, rig.dir.path().join("agents.old")).unwrap();
    std::fs::create_dir(&dir).unwrap();
    rig.deliver("v4");
    assert_eq!(rig.wait_lines("hup", 3), vec![start, start, start]);
    std::thread::sleep(Duration::from_millis(700));
    rig.deliver("v5");
    assert_eq!(rig.wait_lines("hup", 4).len(), 4);
    stop(watch);
}

#[test]
fn signal_names_the_signal_sent() {
    let rig = Rig::new();
    let watch = rig.watch(&["--signal", "USR1"], &[]);
    rig.deliver("v2");
    rig.wait_lines("usr1", 1);
    assert!(rig.pids("hup").is_empty(), "{:?}", rig.lines());
    stop(watch);
}

#[test]
fn a_burst_of_five_changes_makes_one_signal() {
    let rig = Rig::new();
    let watch = rig.watch(&["--debounce", "300ms"], &[]);
    for i in 2..=6 {
        rig.deliver(&format!("v{i}"));
        std::thread::sleep(Duration::from_millis(30));
    }
    rig.wait_lines("hup", 1);
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        rig.pids("hup").len(),
        1,
        "one action for the burst: {:?}",
        rig.lines()
    );
    stop(watch);
}

#[test]
fn restart_starts_a_new_child_after_the_old_one_exits() {
    let rig = Rig::new();
    let watch = rig.watch(&["--restart"], &[]);
    let first = rig.pids("start")[0];
    rig.deliver("v2");
    let starts = rig.wait_lines("start", 2);
    assert_ne!(starts[1], first, "a new process");
    assert_eq!(
        rig.pids("term"),
        vec![first],
        "the old one was asked to stop"
    );
    assert!(!alive(first), "the old child is gone");
    assert!(rig.pids("hup").is_empty());
    // And again: every new version restarts once.
    rig.deliver("v3");
    let starts = rig.wait_lines("start", 3);
    assert_eq!(starts.len(), 3);
    stop(watch);
}

#[test]
fn restart_waits_for_the_drain_then_kills() {
    let rig = Rig::new();
    let watch = rig.watch(&["--restart", "--drain", "2s"], &[("IGNORE_TERM", "1")]);
    let first = rig.pids("start")[0];
    let t = Instant::now();
    rig.deliver("v2");
    rig.wait_lines("term", 1);
    // Still running through the drain...
    std::thread::sleep(Duration::from_millis(1000));
    assert!(alive(first), "killed before the drain ended");
    assert_eq!(rig.pids("start").len(), 1);
    // ...then killed and started again.
    let starts = rig.wait_lines("start", 2);
    let took = t.elapsed();
    assert!(took >= Duration::from_secs(2), "restarted after {took:?}");
    assert!(!alive(first));
    assert_ne!(starts[1], first);
    // This child ignores TERM too: SIGKILL the group to clean up.
    unsafe { libc::kill(-starts[1], libc::SIGKILL) };
    let mut watch = watch;
    let status = wait_exit(&mut watch, Duration::from_secs(10));
    assert_eq!(status.code(), Some(128 + libc::SIGKILL), "killed: 128 + 9");
}

#[test]
fn sigterm_is_forwarded_and_watch_exits_with_the_childs_status() {
    let rig = Rig::new();
    let mut watch = rig.watch(&[], &[("TERM_EXIT", "3")]);
    let pid = rig.pids("start")[0];
    signal(&watch, libc::SIGTERM);
    let status = wait_exit(&mut watch, Duration::from_secs(10));
    assert_eq!(rig.pids("term"), vec![pid], "the child heard SIGTERM");
    assert_eq!(status.code(), Some(3), "the child's exit status");
}

#[test]
fn a_child_that_exits_by_itself_ends_watch_with_its_status() {
    let rig = Rig::new();
    let script = rig.dir.path().join("seven.sh");
    std::fs::write(&script, "#!/bin/sh\nsleep 0.3\nexit 7\n").unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    let status = Command::new(bin())
        .args(["watch", "--file"])
        .arg(rig.file())
        .arg("--")
        .arg(&script)
        .status()
        .unwrap();
    assert_eq!(status.code(), Some(7));
    // A shell's convention for a child killed by a signal.
    let status = Command::new(bin())
        .args(["watch", "--file"])
        .arg(rig.file())
        .args(["--", "sh", "-c", "kill -TERM $$"])
        .status()
        .unwrap();
    assert_eq!(status.code(), Some(128 + libc::SIGTERM));
}

#[test]
fn bad_usage_is_refused_with_a_reason() {
    let rig = Rig::new();
    let run = |args: &[&str]| {
        let out = Command::new(bin())
            .arg("watch")
            .args(args)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let file = rig.file().display().to_string();
    let (code, err) = run(&["--file", "/nonexistent-dir-kt/db.json", "--", "true"]);
    assert_eq!(code, Some(64), "{err}");
    assert!(
        err.contains("cannot watch the directory /nonexistent-dir-kt"),
        "{err}"
    );
    let (code, err) = run(&["--file", &file, "--signal", "KILL", "--", "true"]);
    assert_eq!(code, Some(2), "clap's usage error: {err}");
    assert!(err.contains("unknown signal `KILL`"), "{err}");
    let (code, err) = run(&[
        "--file",
        &file,
        "--signal",
        "HUP",
        "--restart",
        "--",
        "true",
    ]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("cannot be used with"), "{err}");
    let (code, err) = run(&["--file", &file, "--", "/nonexistent-kt-program"]);
    assert_eq!(code, Some(127), "{err}");
    assert!(err.contains("cannot run /nonexistent-kt-program"), "{err}");
}

/// Black-box finding: `watch` told of its own troubles with `eprintln!`,
/// which panics (exit 101, a backtrace) when stderr is a pipe nobody reads.
/// Its exit status is the agent's or the documented one, whatever became
/// of stderr.
#[test]
fn a_closed_stderr_does_not_change_what_watch_does() {
    let rig = Rig::new();
    let file = rig.file().display().to_string();
    let (read, write) = nix::unistd::pipe().expect("pipe");
    drop(read);
    let out = Command::new(bin())
        .args(["watch", "--file", &file, "--", "/nonexistent-kt-program"])
        .stderr(Stdio::from(write))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(127), "{out:?}");
}

/// Black-box finding: `--file` naming a key pair sink's `path` (the
/// bundle's directory) never fired on a rotation, which swaps `..data`
/// inside that directory. Its files are watched.
#[test]
fn a_bundle_directory_fires_when_its_data_is_swapped() {
    use std::os::unix::fs::symlink;
    let rig = Rig::new();
    let bundle = rig.dir.path().join("agents").join("sign");
    std::fs::create_dir(&bundle).unwrap();
    let version = |n: u32| {
        let data = bundle.join(format!("..v{n}"));
        std::fs::create_dir(&data).unwrap();
        std::fs::write(data.join("private.pem"), format!("key {n}")).unwrap();
        let tmp = bundle.join("..data_tmp");
        symlink(format!("..v{n}"), &tmp).unwrap();
        std::fs::rename(&tmp, bundle.join("..data")).unwrap();
    };
    version(1);
    symlink("..data/private.pem", bundle.join("private.pem")).unwrap();
    let mut cmd = Command::new(bin());
    cmd.arg("watch")
        .arg("--file")
        .arg(&bundle)
        .arg("--")
        .arg(rig.dir.path().join("child.sh"))
        .env("LOG", rig.log())
        .env_remove("KEYTURN_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(rig.dir.path().join("watch.log")).unwrap());
    let watch = cmd.spawn().expect("spawn keyturn watch");
    rig.wait_lines("start", 1);
    std::thread::sleep(Duration::from_millis(300));
    version(2);
    assert_eq!(rig.wait_lines("hup", 1).len(), 1);
    stop(watch);
}
