//! An agent that uses a PostgreSQL credential keyturn rotates, written the
//! way the README's "For agent authors" section asks:
//!
//! 1. **Read the delivered file** (`format = "json"`): `value` is the
//!    password, `username` the login (with `alternating_users` it changes
//!    with the version), `version` the version, `agent`/`credential` name it.
//! 2. **Watch it**: inotify on the file's *directory* (keyturn renames a new
//!    file over the old one; a watch on the file itself would see only the
//!    first change), or reload on SIGHUP when a `signal` sink (or
//!    `keyturn watch`) tells it to (`--reload sighup`).
//! 3. **Reload**: connect with the new credential, then swap the connection.
//! 4. **Retry once with a fresh read** when the server refuses the password:
//!    a new version may have landed between the last read and the connect.
//! 5. **Acknowledge** the version once a connection with it works
//!    (`keyturn ack AGENT/CREDENTIAL VERSION`), so keyturn may retire the
//!    previous one as soon as every consumer has moved.
//!
//! It runs `SELECT current_user` in a tight loop and, on SIGTERM or SIGINT,
//! prints a JSON summary: queries, auth_failures, reloads, last_user,
//! last_version. With `--fresh-connections` every query opens a new
//! connection with the credential held at that moment, which proves the held
//! version keeps working (a persistent session would survive a password
//! change and prove nothing).
//!
//! ```text
//! cargo run --example rust_agent -- --file /run/keyturn/agents/bot/db.json \
//!     --host 127.0.0.1 --port 5432 --ack-with keyturn
//! ```
//!
//! The password is held in a `Zeroizing<String>` and never printed.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};
use futures::StreamExt;
use inotify::{Inotify, WatchMask};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;
use tokio_postgres::Client;
use tokio_postgres::error::SqlState;
use zeroize::Zeroizing;

type Error = Box<dyn std::error::Error + Send + Sync>;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Reload {
    /// inotify on the file's directory.
    Watch,
    /// SIGHUP (from a `signal` sink or `keyturn watch`).
    Sighup,
}

#[derive(Debug, Parser)]
struct Args {
    /// The delivered json file.
    #[arg(long)]
    file: PathBuf,
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    #[arg(long, default_value_t = 5432)]
    port: u16,
    #[arg(long, default_value = "postgres")]
    dbname: String,
    /// Verify the server against this CA (TLS); without it, no TLS (loopback).
    #[arg(long)]
    ca: Option<PathBuf>,
    #[arg(long, value_enum, default_value_t = Reload::Watch)]
    reload: Reload,
    /// The keyturn binary to acknowledge versions with; none: no acks.
    #[arg(long)]
    ack_with: Option<PathBuf>,
    /// Open a new connection for every query.
    #[arg(long)]
    fresh_connections: bool,
    /// Also write the summary to this file.
    #[arg(long)]
    summary: Option<PathBuf>,
}

/// One version of the credential, as delivered.
struct Credential {
    user: String,
    password: Zeroizing<String>,
    version: u64,
    /// `AGENT/CREDENTIAL`, for the ack.
    name: String,
}

/// The delivered file's fields this agent uses.
#[derive(serde::Deserialize)]
struct Delivered {
    value: String,
    version: u64,
    username: Option<String>,
    agent: String,
    credential: String,
}

fn read_credential(path: &Path) -> Result<Credential, Error> {
    let bytes = Zeroizing::new(std::fs::read(path)?);
    let d: Delivered = serde_json::from_slice(&bytes)
        .map_err(|e| format!("{}: not a keyturn json delivery: {e}", path.display()))?;
    Ok(Credential {
        user: d
            .username
            .ok_or_else(|| format!("{}: no username (not a postgres target?)", path.display()))?,
        password: Zeroizing::new(d.value),
        version: d.version,
        name: format!("{}/{}", d.agent, d.credential),
    })
}

#[derive(Default, serde::Serialize)]
struct Summary {
    queries: u64,
    /// Every refused password, including those a retry then got past.
    auth_failures: u64,
    /// Refusals the retry with a fresh read did not fix.
    failed_after_retry: u64,
    other_errors: u64,
    reloads: u64,
    acks: u64,
    ack_failures: u64,
    last_user: Option<String>,
    last_version: Option<u64>,
}

struct Agent {
    args: Args,
    tls: Option<tokio_postgres_rustls::MakeRustlsConnect>,
    held: Credential,
    acked: Option<u64>,
    summary: Summary,
}

fn is_auth_failure(e: &tokio_postgres::Error) -> bool {
    e.code().is_some_and(|c| {
        *c == SqlState::INVALID_PASSWORD || *c == SqlState::INVALID_AUTHORIZATION_SPECIFICATION
    })
}

impl Agent {
    async fn connect_as(&self, cred: &Credential) -> Result<Client, tokio_postgres::Error> {
        let mut cfg = tokio_postgres::Config::new();
        cfg.host(&self.args.host)
            .port(self.args.port)
            .dbname(&self.args.dbname)
            .user(&cred.user)
            .password(cred.password.as_bytes())
            .connect_timeout(Duration::from_secs(5));
        let client = match &self.tls {
            Some(tls) => {
                let (client, conn) = cfg.connect(tls.clone()).await?;
                tokio::spawn(conn);
                client
            }
            None => {
                let (client, conn) = cfg.connect(tokio_postgres::NoTls).await?;
                tokio::spawn(conn);
                client
            }
        };
        Ok(client)
    }

    /// Connects with the held credential; on a refused password, reads the
    /// file again and retries once (a new version may have just landed).
    async fn connect(&mut self) -> Result<Client, Error> {
        match self.connect_as(&self.held).await {
            Ok(c) => return Ok(c),
            Err(e) if is_auth_failure(&e) => self.summary.auth_failures += 1,
            Err(e) => return Err(e.into()),
        }
        self.held = read_credential(&self.args.file)?;
        match self.connect_as(&self.held).await {
            Ok(c) => Ok(c),
            Err(e) => {
                if is_auth_failure(&e) {
                    self.summary.auth_failures += 1;
                    self.summary.failed_after_retry += 1;
                }
                Err(e.into())
            }
        }
    }

    /// Tells keyturn this consumer now uses the held version: one call,
    /// again on exit 69.
    async fn ack(&mut self) {
        if self.acked == Some(self.held.version) {
            return;
        }
        self.acked = Some(self.held.version);
        eprintln!("rust_agent: using version {}", self.held.version);
        let Some(keyturn) = &self.args.ack_with else {
            return;
        };
        // 69: keyturn could not record it now (restarting, or the delivery
        // is stuck): ack again a little later. Anything else is final.
        for attempt in 1..=3 {
            let status = tokio::process::Command::new(keyturn)
                .arg("ack")
                .arg(&self.held.name)
                .arg(self.held.version.to_string())
                .stdin(std::process::Stdio::null())
                .status()
                .await;
            match status {
                Ok(s) if s.success() => {
                    self.summary.acks += 1;
                    return;
                }
                Ok(s) if s.code() == Some(69) && attempt < 3 => {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                Ok(s) => {
                    self.summary.ack_failures += 1;
                    eprintln!(
                        "rust_agent: keyturn ack {} {}: {s}",
                        self.held.name, self.held.version
                    );
                    return;
                }
                Err(e) => {
                    self.summary.ack_failures += 1;
                    eprintln!("rust_agent: cannot run {}: {e}", keyturn.display());
                    return;
                }
            }
        }
    }

    async fn query(&mut self, client: &Client) -> Result<(), tokio_postgres::Error> {
        let row = client.query_one("SELECT current_user::text", &[]).await?;
        self.summary.queries += 1;
        self.summary.last_user = Some(row.get(0));
        self.summary.last_version = Some(self.held.version);
        Ok(())
    }
}

fn tls(ca: &Path) -> Result<tokio_postgres_rustls::MakeRustlsConnect, Error> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca)? {
        roots.add(cert?)?;
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(tokio_postgres_rustls::MakeRustlsConnect::new(config))
}

/// Sends `()` on every event in the file's directory (the file is
/// re-read and its version compared, so extra events cost one read).
fn watch_directory(file: &Path, tx: mpsc::UnboundedSender<()>) -> Result<(), Error> {
    let dir = file
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let inotify = Inotify::init()?;
    inotify.watches().add(
        dir,
        WatchMask::MOVED_TO | WatchMask::CLOSE_WRITE | WatchMask::CREATE,
    )?;
    let mut events = inotify.into_event_stream(vec![0u8; 4096])?;
    tokio::spawn(async move {
        while events.next().await.is_some() {
            if tx.send(()).is_err() {
                break;
            }
        }
    });
    Ok(())
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Error> {
    let args = Args::parse();
    let (tx, mut changed) = mpsc::unbounded_channel();
    match args.reload {
        Reload::Watch => watch_directory(&args.file, tx)?,
        Reload::Sighup => {
            let mut hup = signal(SignalKind::hangup())?;
            tokio::spawn(async move {
                while hup.recv().await.is_some() {
                    if tx.send(()).is_err() {
                        break;
                    }
                }
            });
        }
    }
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let stop = Arc::new(AtomicBool::new(false));
    let stopping = stop.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        stopping.store(true, Ordering::Relaxed);
    });
    let tls = args.ca.as_deref().map(tls).transpose()?;
    let held = read_credential(&args.file)?;
    let mut agent = Agent {
        args,
        tls,
        held,
        acked: None,
        summary: Summary::default(),
    };
    let mut client = Some(agent.connect().await?);
    agent.ack().await;
    let mut last_error = Instant::now() - Duration::from_secs(1);
    loop {
        // Stop, reload, then one query: checked between queries, never
        // interrupting one.
        if stop.load(Ordering::Relaxed) {
            break;
        }
        if changed.try_recv().is_ok() {
            while changed.try_recv().is_ok() {}
            match read_credential(&agent.args.file) {
                Ok(new) if new.version != agent.held.version => {
                    agent.held = new;
                    agent.summary.reloads += 1;
                    // Reconnect now with the new credential; the old
                    // connection is dropped only once the new one works.
                    match agent.connect().await {
                        Ok(c) => {
                            client = Some(c);
                            agent.ack().await;
                        }
                        Err(e) => {
                            agent.summary.other_errors += 1;
                            eprintln!("rust_agent: reload: {e}");
                        }
                    }
                }
                Ok(_) => {}
                Err(e) => eprintln!("rust_agent: reload: {e}"),
            }
            continue;
        }
        if agent.args.fresh_connections {
            client = match agent.connect().await {
                Ok(c) => Some(c),
                Err(e) => {
                    agent.summary.other_errors += 1;
                    if last_error.elapsed() > Duration::from_secs(1) {
                        eprintln!("rust_agent: connect: {e}");
                        last_error = Instant::now();
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    None
                }
            };
        }
        let Some(c) = client.take() else {
            client = agent.connect().await.ok();
            continue;
        };
        match agent.query(&c).await {
            Ok(()) => {
                agent.ack().await;
                client = Some(c);
            }
            Err(e) => {
                // The session broke: reconnect with a fresh read next time.
                agent.summary.other_errors += 1;
                eprintln!("rust_agent: query: {e}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    let summary = serde_json::to_string(&agent.summary)?;
    println!("{summary}");
    if let Some(path) = &agent.args.summary {
        std::fs::write(path, format!("{summary}\n"))?;
    }
    Ok(())
}
