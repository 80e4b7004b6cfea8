//! End-to-end tests of the real binary's `signal` sink, against real
//! processes: a shell that logs every SIGHUP it gets; and of its `webhook`
//! sink, against the reference receiver in `examples/`.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

/// A consumer process: it logs each SIGHUP, with the versions of the three
/// JSON files it would re-read, and writes its pid file once it listens.
struct Consumer {
    child: std::process::Child,
    log: PathBuf,
}

impl Consumer {
    fn start(env: &Env, pid_file: &Path) -> Consumer {
        let log = env.path().join("hup.log");
        let bot = env.root().join("bot");
        let script = format!(
            r#"trap 'echo hup >> {log}; for f in a b c; do grep -o "\"version\":[0-9]*" {bot}/$f.json >> {log}; done' HUP
echo $$ > {pid}.tmp && mv {pid}.tmp {pid}
while :; do sleep 0.1; done"#,
            log = log.display(),
            bot = bot.display(),
            pid = pid_file.display(),
        );
        let child = Command::new("sh")
            .arg("-c")
            .arg(script)
            .stdin(Stdio::null())
            .spawn()
            .expect("start the consumer");
        wait_for(Duration::from_secs(10), || pid_file.exists().then_some(()))
            .expect("the consumer writes its pid file");
        Consumer { child, log }
    }

    /// Its log, one entry per line.
    fn lines(&self) -> Vec<String> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    fn hups(&self) -> usize {
        self.lines().iter().filter(|l| *l == "hup").count()
    }

    /// Waits for a SIGHUP after the `before`th, then for longer than the
    /// window, and asserts that exactly one came; the log.
    fn one_more_hup(&self, before: usize) -> Vec<String> {
        wait_for(Duration::from_secs(5), || {
            (self.hups() > before).then_some(())
        })
        .unwrap_or_else(|| panic!("no SIGHUP after the rotation: {:?}", self.lines()));
        std::thread::sleep(Duration::from_secs(3));
        let lines = self.lines();
        assert_eq!(
            self.hups(),
            before + 1,
            "three credentials rotated within the window make exactly one SIGHUP: {lines:?}"
        );
        lines
    }
}

impl Drop for Consumer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Credential `c` of `bot`: a signal sink, listed first (it must still go
/// after the file is written), then a JSON file.
fn signalled_credential(c: &str, pid_file: &Path, coalesce: &str) -> String {
    format!(
        r#"
[agents.bot.credentials.{c}]
vault = "local"
generate = {{ kind = "password", length = 32 }}
every = "1h"
grace = "0s"
deliver = [
  {{ type = "signal", pid_file = "{pid}", coalesce = "{coalesce}" }},
  {{ type = "file", path = "{{root}}/bot/{c}.json", format = "json" }},
]
"#,
        pid = pid_file.display()
    )
}

fn three_credentials(pid_file: &Path) -> String {
    agent_table("bot")
        + &["a", "b", "c"]
            .map(|c| signalled_credential(c, pid_file, "2s"))
            .concat()
}

#[test]
fn a_burst_of_rotations_is_one_sighup_after_the_files() {
    let pid_file = tempfile::tempdir().unwrap();
    let pid_file = pid_file.path().join("consumer.pid");
    let env = Env::new(&three_credentials(&pid_file));
    let consumer = Consumer::start(&env, &pid_file);
    let daemon = env.start();
    for c in ["a", "b", "c"] {
        wait_version(&env, "bot", c, 1);
    }
    // The first deliveries signalled it too (spread over catch_up_spread,
    // so once or twice); let the shell run its trap.
    std::thread::sleep(Duration::from_millis(500));
    let before = consumer.hups();
    assert!(
        before >= 1,
        "the first delivery signals: {:?}",
        consumer.lines()
    );

    // All three at once, as the brief's operator would.
    env.cli_ok(&["rotate", "bot", "--wait"]);
    let lines = consumer.one_more_hup(before);
    // When it arrived, all three files already held version 2.
    let last = lines.iter().rposition(|l| l == "hup").unwrap();
    assert_eq!(
        lines[last + 1..],
        vec![r#""version":2"#.to_owned(); 3],
        "{lines:?}"
    );

    // Signals sent within a moment of each other may merge in the kernel
    // (a pending SIGHUP is not queued twice), so the window shows best
    // with deliveries far enough apart for the shell to trap each one.
    let before = consumer.hups();
    for c in ["a", "b", "c"] {
        env.cli_ok(&["rotate", &format!("bot/{c}")]);
        std::thread::sleep(Duration::from_millis(400));
    }
    for c in ["a", "b", "c"] {
        wait_version(&env, "bot", c, 3);
    }
    let lines = consumer.one_more_hup(before);
    let last = lines.iter().rposition(|l| l == "hup").unwrap();
    assert_eq!(
        lines[last + 1..],
        vec![r#""version":3"#.to_owned(); 3],
        "{lines:?}"
    );
    daemon.stop();
}

#[test]
fn no_signal_when_the_file_before_it_failed() {
    let dir = tempfile::tempdir().unwrap();
    let pid_file = dir.path().join("consumer.pid");
    // Without a window: it must still wait for the file.
    let creds = agent_table("bot") + &signalled_credential("a", &pid_file, "0s");
    let env = Env::new(&creds);
    // The file cannot be written: a symlink stands where it goes.
    std::fs::create_dir_all(env.root().join("bot")).unwrap();
    std::os::unix::fs::symlink(dir.path().join("elsewhere"), env.root().join("bot/a.json"))
        .unwrap();
    let consumer = Consumer::start(&env, &pid_file);
    let daemon = env.start();
    wait_for(Duration::from_secs(20), || {
        status_json(&env)
            .iter()
            .any(|r| {
                r["last_error"]
                    .as_str()
                    .is_some_and(|e| e.contains("symlink"))
            })
            .then_some(())
    })
    .unwrap_or_else(|| panic!("the file delivery must fail: {:?}", status_json(&env)));
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        consumer.hups(),
        0,
        "no signal for a value that was not delivered: {:?}",
        consumer.lines()
    );
    daemon.stop();
}

#[test]
fn a_process_of_another_uid_is_not_signalled() {
    let me = nix::unistd::geteuid().as_raw();
    let agent_uid = if me == 65534 { 65533 } else { 65534 };
    let mut sleeper = Command::new("sleep").arg("120").spawn().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let pid_file = dir.path().join("other.pid");
    std::fs::write(&pid_file, sleeper.id().to_string()).unwrap();
    let creds = agent_table("bot")
        + &format!(
            r#"uid = {agent_uid}

[agents.bot.credentials.db]
vault = "local"
generate = {{ kind = "password", length = 32 }}
every = "1h"
deliver = [{{ type = "signal", pid_file = "{pid}", signal = "SIGTERM", coalesce = "0s" }}]
"#,
            pid = pid_file.display()
        );
    let env = Env::new(&creds);
    let daemon = env.start();
    let expected = format!(
        "a process of uid {me}, not of uid {agent_uid} (the agent's); refusing to signal it"
    );
    let error = wait_for(Duration::from_secs(20), || {
        status_json(&env)
            .iter()
            .find_map(|r| r["last_error"].as_str().map(str::to_owned))
            .filter(|e| e.contains(&expected))
    })
    .unwrap_or_else(|| panic!("status must show the refusal: {:?}", status_json(&env)));
    assert!(error.contains(&pid_file.display().to_string()), "{error}");
    let out = env.cli(&["rotate", "bot/db", "--wait"]);
    assert_eq!(out.status.code(), Some(1), "rotate --wait must fail");
    assert!(String::from_utf8_lossy(&out.stdout).contains("refusing to signal it"));
    assert!(
        sleeper.try_wait().unwrap().is_none(),
        "the other uid's process must not have been sent SIGTERM"
    );
    let _ = sleeper.kill();
    let _ = sleeper.wait();
    daemon.stop();
}

/// The reference receiver `examples/webhook_receiver.py`, verifying with
/// the key in `key_file`; one JSON line per request on its stdout.
struct PyReceiver {
    child: std::process::Child,
    lines: std::sync::mpsc::Receiver<serde_json::Value>,
    port: u16,
}

impl PyReceiver {
    fn start(key_file: &Path) -> PyReceiver {
        Self::start_on(key_file, 0)
    }

    /// On `port` (0: any free one).
    fn start_on(key_file: &Path, port: u16) -> PyReceiver {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/webhook_receiver.py");
        let mut child = Command::new("python3")
            .arg(script)
            .arg("--key-file")
            .arg(key_file)
            .arg("--port")
            .arg(port.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3 runs");
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(serde_json::from_str(&line).unwrap()).is_err() {
                    break;
                }
            }
        });
        let first: serde_json::Value = lines.recv_timeout(Duration::from_secs(20)).unwrap();
        let port = first["listening"].as_u64().unwrap() as u16;
        PyReceiver { child, lines, port }
    }

    /// The next notice's line, past any refused because the key file was
    /// not delivered yet (keyturn retries those).
    fn next(&self) -> serde_json::Value {
        loop {
            let line = self
                .lines
                .recv_timeout(Duration::from_secs(30))
                .expect("the receiver got a notice");
            let waiting = line["reason"]
                .as_str()
                .is_some_and(|r| r.starts_with("key unavailable"));
            if !waiting {
                return line;
            }
        }
    }
}

impl Drop for PyReceiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A rotation delivers a file and a webhook: the receiver (the reference
/// one, in Python) gets one signed POST per version, verifies it with the
/// current value of another credential (delivered to it as a file: the
/// catalog's reader of `secret_credential`), with `Idempotency-Key` = the
/// rotation id and the file's path in the body, never the value.
#[test]
fn a_rotation_posts_one_signed_notice_naming_the_file() {
    // The receiver reads the signing key where keyturn delivers it.
    let env = Env::new("");
    let key_file = env.root().join("bot/hook.key");
    let receiver = PyReceiver::start(&key_file);
    let config = agent_table("bot")
        + &format!(
            r#"
[agents.bot.credentials.hook-key]
vault = "local"
generate = {{ kind = "random_bytes", length = 32, encoding = "hex" }}
every = "24h"
deliver = [{{ type = "file", path = "{{root}}/bot/hook.key" }}]

[agents.bot.credentials.db]
vault = "local"
generate = {{ kind = "password", length = 32 }}
every = "1h"
deliver = [
  {{ type = "webhook", url = "http://127.0.0.1:{port}/rotated?token=kept-out-of-logs", secret_credential = "bot/hook-key" }},
  {{ type = "file", path = "{{root}}/bot/db.json", format = "json" }},
]
"#,
            port = receiver.port
        );
    env.write_credentials(&config);
    let daemon = env.start();
    wait_version(&env, "bot", "db", 1);
    let first = receiver.next();
    assert_eq!(first["verified"], true, "{first}");
    assert_eq!(first["version"], 1);

    env.cli_ok(&["rotate", "bot/db", "--wait"]);
    let second = receiver.next();
    assert_eq!(second["verified"], true, "{second}");
    assert_eq!(second["repeat"], false);
    assert_eq!(second["agent"], "bot");
    assert_eq!(second["credential"], "db");
    assert_eq!(second["version"], 2);
    assert_eq!(second["has_value"], false);
    let file = env.root().join("bot/db.json");
    assert_eq!(second["file"], file.display().to_string());
    assert_eq!(second["idempotency_key"], second["rotation"]);
    // The rotation id is the one the audit log records for this delivery.
    let rotation = second["rotation"].as_str().unwrap();
    let audited = audit_records(&env);
    let delivery = audited
        .iter()
        .find(|r| {
            r["event"] == "delivery"
                && r["credential"] == "db"
                && r["version"] == 2
                && r["detail"]
                    .as_str()
                    .is_some_and(|d| d.starts_with("webhook:"))
        })
        .unwrap_or_else(|| panic!("no webhook delivery audited: {audited:?}"));
    assert_eq!(delivery["rotation"], rotation);
    assert_eq!(delivery["outcome"], "ok");
    assert_eq!(
        delivery["detail"],
        format!("webhook:http://127.0.0.1:{}/rotated", receiver.port)
    );
    // One POST per version: nothing more arrives.
    assert!(
        receiver
            .lines
            .recv_timeout(Duration::from_millis(500))
            .is_err()
    );
    // Neither the value nor the URL's query is in the log or the audit.
    let value = std::fs::read_to_string(&file).unwrap();
    let value: serde_json::Value = serde_json::from_str(&value).unwrap();
    let value = value["value"].as_str().unwrap().to_owned();
    let log = daemon.stop();
    let audit = std::fs::read_to_string(env.audit_log()).unwrap();
    for text in [&log, &audit] {
        assert!(!text.contains(&value));
        assert!(!text.contains("kept-out-of-logs"));
    }
}

/// A webhook receiver that is down delays only its own delivery: the
/// rotation and the credential's file go on at once, the webhook is retried
/// in the background (every attempt audited), awaited meanwhile. Once the
/// receiver is up, the retried notice arrives, verified, and acknowledges
/// it; the previous version keeps its grace period (black-box finding: it
/// was retired right then, where a notice delivered the first time keeps
/// it: the receiver's answer says nothing of the agents' moving on).
#[test]
fn a_receiver_that_is_down_is_retried_while_the_rotation_and_the_file_go_on() {
    use keyturn::model::Stage;
    use std::os::unix::fs::PermissionsExt;
    let env = Env::new("");
    let key_file = env.path().join("hook.key");
    std::fs::write(&key_file, "0123456789abcdef0123456789abcdef\n").unwrap();
    std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    // A free port.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let config = agent_table("bot")
        + &format!(
            r#"
[agents.bot.credentials.db]
vault = "local"
generate = {{ kind = "password", length = 32 }}
every = "24h"
grace = "1h"
deliver = [
  {{ type = "webhook", url = "http://127.0.0.1:{port}/rotated", secret_file = "{key}", timeout = "1s" }},
  {{ type = "file", path = "{{root}}/bot/db.json", format = "json" }},
]
"#,
            key = key_file.display()
        );
    env.write_credentials(&config);
    // Up for version 1 (a new rotation waits for the current version's
    // acks, and the webhook's is its 2xx), then down.
    let receiver = PyReceiver::start_on(&key_file, port);
    let daemon = env.start();
    wait_version(&env, "bot", "db", 1);
    assert_eq!(receiver.next()["version"], 1);
    drop(receiver);
    let file = env.root().join("bot/db.json");
    let version_in_file = || {
        let text = std::fs::read_to_string(&file).unwrap();
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        v["version"].as_u64().unwrap()
    };

    // The rotation finishes although its webhook cannot be delivered,
    // and says so (defect, black-box: it said only "rotated").
    let started = std::time::Instant::now();
    let out = env.cli_ok(&["rotate", "bot/db", "--wait"]);
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "the rotation waited for the receiver: {:?}",
        started.elapsed()
    );
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains("rotated to version 2; delivery to webhook:http://127.0.0.1:")
            && said.contains("failed and is retried in the background"),
        "{said}"
    );
    wait_version(&env, "bot", "db", 2);
    assert_eq!(version_in_file(), 2, "the file sink went on");
    let rows = status_json(&env);
    let awaiting = row(&rows, "bot", "db")["awaiting_ack"].clone();
    assert!(
        awaiting.as_array().is_some_and(|a| a
            .iter()
            .any(|c| c.as_str().unwrap().starts_with("webhook:"))),
        "the webhook is awaited: {awaiting}"
    );
    // Retried in the background: several failed attempts for version 2.
    let failed_attempts = || {
        audit_records(&env)
            .iter()
            .filter(|r| {
                r["event"] == "delivery"
                    && r["version"] == 2
                    && r["outcome"] == "failed"
                    && r["detail"]
                        .as_str()
                        .is_some_and(|d| d.starts_with("webhook:"))
            })
            .count()
    };
    wait_for(Duration::from_secs(20), || {
        (failed_attempts() >= 3).then_some(())
    })
    .unwrap_or_else(|| panic!("{} failed attempts audited", failed_attempts()));
    let stage_of = |v: u64| {
        stages(&env, &bot_key("db"))
            .into_iter()
            .find(|(n, _)| *n == v)
            .map(|(_, s)| s)
    };
    assert_eq!(stage_of(1), Some(Stage::Previous), "retired before the ack");

    // The receiver comes up on that port: the retried notice arrives,
    // verified, and acknowledges it; version 1 keeps its one-hour grace.
    let receiver = PyReceiver::start_on(&key_file, port);
    let notice = receiver.next();
    assert_eq!(notice["verified"], true, "{notice}");
    assert_eq!(notice["version"], 2, "{notice}");
    wait_for(Duration::from_secs(15), || {
        let rows = status_json(&env);
        let awaiting = row(&rows, "bot", "db")["awaiting_ack"].clone();
        // (Left out of the JSON when there is none.)
        awaiting.as_array().is_none_or(Vec::is_empty).then_some(())
    })
    .expect("the delivered webhook is acknowledged");
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        stage_of(1),
        Some(Stage::Previous),
        "retired before its grace ended"
    );
    daemon.stop();
}
