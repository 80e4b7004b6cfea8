//! The transparency test (issue 11's acceptance): a separate agent process
//! queries a REAL PostgreSQL in a tight loop, each query on a new connection
//! made with the credential it holds at that moment (read from its delivered
//! file), while keyturn rotates that credential 200 times, as fast as
//! `keyturn rotate --wait` goes, with `alternating_users`. Not one
//! authentication may fail, and at the end the agent uses the last version.
//!
//! Three ways the agent hears of a new version:
//! - it watches its file's directory (inotify) — `examples/rust_agent.rs`
//!   and `examples/python-agent/agent.py`;
//! - a `signal` sink sends it SIGHUP;
//! - `keyturn watch --restart` restarts it.
//!
//! Each agent acknowledges every version it has connected with (`keyturn
//! ack`), which is what lets keyturn retire the previous version as soon as
//! it is safe — and not before.
//!
//! REAL SERVERS: needs `bash scripts/services.sh start` and its env file
//! sourced; a missing variable fails the test.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::*;

/// `KEYTURN_TEST_ROTATIONS` overrides it (to look into a failure quickly).
fn rotations() -> u64 {
    std::env::var("KEYTURN_TEST_ROTATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200)
}

fn pg_admin(sql: &str) {
    let sql = sql.to_owned();
    block_on(async move {
        let cfg: tokio_postgres::Config = need("KEYTURN_TEST_PG_ADMIN_DSN").parse().unwrap();
        let (client, conn) = cfg.connect(tokio_postgres::NoTls).await.unwrap();
        let conn = tokio::spawn(conn);
        client
            .batch_execute(&sql)
            .await
            .unwrap_or_else(|e| panic!("admin `{sql}`: {e}"));
        drop(client);
        let _ = conn.await;
    })
}

/// The example agent, built once per test binary with the features this
/// test was built with (so nothing else is rebuilt).
fn rust_agent() -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            let mut features = Vec::new();
            if cfg!(feature = "failpoints") {
                features.push("failpoints");
            }
            if cfg!(feature = "real-servers") {
                features.push("real-servers");
            }
            let mut cmd = Command::new(env!("CARGO"));
            cmd.args(["build", "--example", "rust_agent"])
                .current_dir(env!("CARGO_MANIFEST_DIR"));
            if !features.is_empty() {
                cmd.arg("--features").arg(features.join(","));
            }
            let out = cmd.output().expect("run cargo build --example rust_agent");
            assert!(
                out.status.success(),
                "cargo build --example rust_agent: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let path = Path::new(bin())
                .parent()
                .unwrap()
                .join("examples")
                .join("rust_agent");
            assert!(path.exists(), "{} was not built", path.display());
            path
        })
        .clone()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Variant {
    /// The agent watches its file's directory.
    Inotify,
    /// A signal sink sends the agent SIGHUP.
    Sighup,
    /// `keyturn watch --restart` restarts the agent.
    WatchRestart,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lang {
    Rust,
    Python,
}

struct Run {
    env: Env,
    role: String,
    daemon: Option<Daemon>,
    agent: Option<Child>,
    /// Holds the signal sink's pid file until the agent runs (the first
    /// version must be delivered before the agent can start).
    placeholder: Option<Child>,
    out: PathBuf,
    err: PathBuf,
}

impl Run {
    fn new(variant: Variant) -> Run {
        let role = format!("kt_transp_{:016x}", rand::random::<u64>());
        pg_admin(&format!(
            "CREATE ROLE {role} LOGIN PASSWORD 'set-by-the-test-{role}'"
        ));
        let dsn = tempfile::NamedTempFile::new()
            .unwrap()
            .into_temp_path()
            .keep()
            .unwrap();
        std::fs::write(&dsn, need("KEYTURN_TEST_PG_ADMIN_DSN")).unwrap();
        let signal = match variant {
            Variant::Sighup => {
                r#", { type = "signal", pid_file = "{dir}/agent.pid", coalesce = "0s" }"#
            }
            _ => "",
        };
        let env = Env::new(&format!(
            r#"{agent}
[agents.bot.credentials.db]
vault = "local"
path = "transparency/{role}"
generate = {{ kind = "password", length = 32 }}
every = "24h"
grace = "20s"
target = {{ type = "postgres", admin_dsn_file = "{dsn}", role = "{role}", strategy = "alternating_users", connect_timeout = "3s" }}
deliver = [{{ type = "file", path = "{{root}}/bot/db.json", format = "json", ack = "explicit" }}{signal}]
"#,
            agent = agent_table("bot"),
            dsn = dsn.display(),
        ));
        let out = env.path().join("agent.out");
        let err = env.path().join("agent.err");
        Run {
            env,
            role,
            daemon: None,
            agent: None,
            placeholder: None,
            out,
            err,
        }
    }

    fn file(&self) -> PathBuf {
        self.env.root().join("bot").join("db.json")
    }

    fn agent_command(&self, lang: Lang, reload: &str) -> Command {
        let mut cmd = match lang {
            Lang::Rust => Command::new(rust_agent()),
            Lang::Python => {
                let mut c = Command::new(need("KEYTURN_TEST_PYTHON"));
                c.arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/python-agent/agent.py"));
                c
            }
        };
        cmd.arg("--file")
            .arg(self.file())
            .args(["--host", &need("KEYTURN_TEST_PG_HOST")])
            .args(["--port", &need("KEYTURN_TEST_PG_PORT")])
            .args(["--reload", reload, "--fresh-connections"])
            .arg("--ack-with")
            .arg(bin());
        cmd
    }

    fn start_agent(&mut self, variant: Variant, lang: Lang) {
        let mut cmd = match variant {
            Variant::Inotify => self.agent_command(lang, "watch"),
            Variant::Sighup => self.agent_command(lang, "sighup"),
            Variant::WatchRestart => {
                // The agent reloads on nothing by itself: every new version
                // reaches it by a restart.
                let agent = self.agent_command(lang, "sighup");
                let mut cmd = Command::new(bin());
                cmd.arg("watch")
                    .arg("--file")
                    .arg(self.file())
                    .args(["--restart", "--drain", "5s", "--debounce", "50ms", "--"])
                    .arg(agent.get_program())
                    .args(agent.get_args());
                cmd
            }
        };
        cmd.env("KEYTURN_CONFIG", &self.env.config)
            .env_remove("KEYTURN_LOG")
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&self.out).unwrap())
            .stderr(std::fs::File::create(&self.err).unwrap());
        let child = cmd.spawn().expect("spawn the agent");
        if variant == Variant::Sighup {
            std::fs::write(
                self.env.path().join("agent.pid"),
                format!("{}\n", child.id()),
            )
            .unwrap();
        }
        self.agent = Some(child);
    }

    fn write_pid(&self, pid: u32) {
        let tmp = self.env.path().join("agent.pid.tmp");
        std::fs::write(&tmp, format!("{pid}\n")).unwrap();
        std::fs::rename(&tmp, self.env.path().join("agent.pid")).unwrap();
    }

    /// A process that ignores SIGHUP, named by the pid file until the agent
    /// starts.
    fn start_placeholder(&mut self) {
        let p = Command::new("sh")
            .args(["-c", "trap '' HUP; exec sleep 600"])
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        self.write_pid(p.id());
        self.placeholder = Some(p);
    }

    fn agent_err(&self) -> String {
        std::fs::read_to_string(&self.err).unwrap_or_default()
    }

    /// Waits until the agent says it uses `version`.
    fn wait_agent_uses(&self, version: u64, within: Duration) {
        let needle = format!("using version {version}\n");
        wait_for(within, || self.agent_err().contains(&needle).then_some(())).unwrap_or_else(
            || {
                panic!(
                    "the agent never used version {version}; its stderr:\n{}\nstatus: {:?}",
                    tail(&self.agent_err()),
                    status_json(&self.env)
                )
            },
        );
    }

    /// SIGTERM to the agent (or its watch); the summaries it printed.
    fn stop_agent(&mut self) -> Vec<serde_json::Value> {
        let mut child = self.agent.take().unwrap();
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let status = wait_for(Duration::from_secs(20), || child.try_wait().unwrap())
            .unwrap_or_else(|| {
                let _ = child.kill();
                panic!("the agent did not stop on SIGTERM")
            });
        assert!(
            status.success(),
            "the agent: {status}; stderr:\n{}",
            tail(&self.agent_err())
        );
        std::fs::read_to_string(&self.out)
            .unwrap()
            .lines()
            .filter(|l| l.starts_with('{'))
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        if let Some(mut p) = self.placeholder.take() {
            let _ = p.kill();
            let _ = p.wait();
        }
        if let Some(mut a) = self.agent.take() {
            unsafe { libc::kill(a.id() as i32, libc::SIGTERM) };
            let _ = wait_for(Duration::from_secs(5), || a.try_wait().unwrap());
            let _ = a.kill();
        }
        if let Some(d) = self.daemon.take() {
            d.stop();
        }
        let role = &self.role;
        if !std::thread::panicking() {
            pg_admin(&format!(
                "DROP ROLE IF EXISTS {role}_clone; DROP ROLE IF EXISTS {role}"
            ));
        }
    }
}

fn tail(s: &str) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

fn transparency(variant: Variant, lang: Lang) {
    let mut run = Run::new(variant);
    if variant == Variant::Sighup {
        run.start_placeholder();
    }
    run.daemon = Some(run.env.start());
    wait_version(&run.env, "bot", "db", 1);
    run.start_agent(variant, lang);
    run.wait_agent_uses(1, Duration::from_secs(20));

    let rotations = rotations();
    let t = Instant::now();
    for v in 2..=rotations + 1 {
        let r = Instant::now();
        let out = run.env.cli(&["rotate", "bot/db", "--wait"]);
        if v <= 6 {
            eprintln!("rotation {v}: {:?}", r.elapsed());
        }
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && text.contains(&format!("rotated to version {v}")),
            "rotation to {v}: {text}{}\nagent:\n{}",
            String::from_utf8_lossy(&out.stderr),
            tail(&run.agent_err())
        );
    }
    let took = t.elapsed();
    let last = rotations + 1;
    run.wait_agent_uses(last, Duration::from_secs(20));
    // Let the loop run queries with it (a reload is followed by queries).
    std::thread::sleep(Duration::from_secs(1));
    let summaries = run.stop_agent();
    assert!(!summaries.is_empty(), "the agent printed no summary");
    let sum = |k: &str| {
        summaries
            .iter()
            .map(|s| s[k].as_u64().unwrap())
            .sum::<u64>()
    };
    let end = summaries.last().unwrap();
    eprintln!(
        "{variant:?}/{lang:?}: {rotations} rotations in {took:?}; agent summaries: {summaries:?}"
    );

    assert_eq!(
        sum("auth_failures"),
        0,
        "authentication failures while rotating; agent stderr:\n{}",
        tail(&run.agent_err())
    );
    assert_eq!(sum("failed_after_retry"), 0);
    assert!(
        sum("queries") > rotations,
        "the agent ran only {} queries: not a tight loop",
        sum("queries")
    );
    assert_eq!(
        end["last_version"], last,
        "the agent ends on the last version"
    );
    // Odd versions log in as the role, even ones as its clone.
    let delivered = delivered_json(&run.env, "bot/db.json");
    assert_eq!(delivered["version"], last);
    assert_eq!(
        end["last_user"], delivered["username"],
        "current_user is the last version's login"
    );
    assert_eq!(end["last_user"], run.role.as_str());
    assert_eq!(
        sum("ack_failures"),
        0,
        "every ack was accepted; agent stderr:\n{}",
        tail(&run.agent_err())
    );
    match variant {
        Variant::WatchRestart => assert!(summaries.len() > 1, "restarted: {summaries:?}"),
        _ => assert!(end["reloads"].as_u64().unwrap() >= 1),
    }
}

#[test]
fn transparency_rust_agent_watching_its_file() {
    transparency(Variant::Inotify, Lang::Rust);
}

#[test]
fn transparency_rust_agent_reloading_on_sighup_from_a_signal_sink() {
    transparency(Variant::Sighup, Lang::Rust);
}

#[test]
fn transparency_rust_agent_restarted_by_keyturn_watch() {
    transparency(Variant::WatchRestart, Lang::Rust);
}

#[test]
fn transparency_python_agent_watching_its_file() {
    transparency(Variant::Inotify, Lang::Python);
}
