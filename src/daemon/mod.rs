//! Wiring and lifecycle of `keyturn daemon`, in one place:
//! load config → lock and open state → open the audit log → build plug-ins →
//! resume rotations → serve the control socket (and HTTP) → `READY=1` →
//! wait for signals. SIGHUP reloads (an invalid config keeps the old one);
//! SIGTERM/SIGINT drain in-flight steps within `drain_timeout` and exit 0.
//!
//! - `handler.rs`: the answers to socket requests (control and agents').
//! - `oauth.rs`: the token service's part: built from the config and
//!   rebuilt on reload, its backend, and exchanges over the sockets.

mod handler;
mod oauth;
mod refusals;
mod signals;

use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use sd_notify::NotifyState;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::alerts::{self, Alerts};
use crate::api::socket;
use crate::audit::{Actor, AuditEvent, AuditKey, AuditLog, Outcome};
use crate::config::{self, Config, ConfigErrors};
use crate::memory;
use crate::model::{AgentId, CredentialKey, VersionNo};

use crate::revocation::Revocations;
use crate::rotation::{Catalog, Engine, EngineParts};
use crate::state::{SqliteStore, StateStore};
use crate::telemetry::{CredentialTimes, Metrics};
use handler::Handler;
use oauth::{OauthBackend, OauthService};

/// Why the daemon could not start or run.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("{0}")]
    Config(ConfigErrors),
    #[error("{0}")]
    Startup(String),
}

/// The state database inside `state_dir`.
pub fn state_db_path(config: &Config) -> PathBuf {
    state_db_in(&config.daemon.state_dir)
}

pub fn state_db_in(state_dir: &Path) -> PathBuf {
    state_dir.join("state.db")
}

/// Raises the soft limit on open files to the hard one and returns the
/// limit in force. systemd's default soft limit (1024) is kept low for
/// programs that use select(2); keyturn does not, and every delivery, vault
/// connection and client needs descriptors (the unit also sets
/// `LimitNOFILE`). Failing to raise it is not fatal: the HTTP listener's
/// share is derived from what is in force.
fn raise_nofile_limit() -> u64 {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return 1024;
    };
    if soft >= hard {
        return soft;
    }
    match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
        Ok(()) => {
            tracing::debug!(from = soft, to = hard, "raised the open files limit");
            hard
        }
        Err(e) => {
            tracing::warn!(soft, hard, error = %e, "cannot raise the open files limit");
            soft
        }
    }
}

/// Marks every descriptor the daemon inherited beyond stdin, stdout and
/// stderr close-on-exec, so hook programs and exec sinks get none of them.
/// Black-box finding: a hook listed the write end of a pipe the shell that
/// started the daemon held. The daemon's own descriptors are opened
/// close-on-exec already (Rust's default).
fn close_inherited_on_exec() {
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else {
        return;
    };
    let fds: Vec<i32> = dir
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .filter(|fd| *fd > 2)
        .collect();
    for fd in fds {
        // SAFETY: fcntl on a descriptor number only reads and sets its
        // flags; a number that is closed by now (the directory's own
        // descriptor) fails with EBADF, which is ignored.
        unsafe {
            let flags = libc::fcntl(fd, libc::F_GETFD);
            if flags >= 0 && flags & libc::FD_CLOEXEC == 0 {
                libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC);
            }
        }
    }
}

/// Runs the daemon until SIGTERM/SIGINT.
pub async fn run(config_path: &Path) -> Result<(), DaemonError> {
    let started = std::time::Instant::now();
    // First: a SIGHUP's default action ends the process, and a start can
    // take a while (the state, the vaults); one that arrives meanwhile is
    // kept and reloads once the daemon serves.
    let mut hup = signals::Incoming::new(&[libc::SIGHUP], "keyturn-sighup")
        .map_err(|e| DaemonError::Startup(format!("cannot handle SIGHUP: {e}")))?;
    memory::configure();
    close_inherited_on_exec();
    let nofile = raise_nofile_limit();
    let (config, read_files) =
        memory::apart(|| config::load_tracked(config_path)).map_err(DaemonError::Config)?;
    // A copy on this thread, and the one read freed now (a shadowed binding
    // would live as long as the daemon; see `memory::apart`).
    let mut config_files = read_files.clone();
    drop(read_files);
    // The settings `keyturn check` checks on this host too: a config error.
    config::check_host(&config).map_err(DaemonError::Config)?;
    tracing::debug!(elapsed = ?started.elapsed(), "config loaded");
    #[cfg(feature = "failpoints")]
    let _failpoints = fail::FailScenario::setup();
    let startup =
        |what: &str, e: &dyn std::fmt::Display| DaemonError::Startup(format!("{what}: {e}"));

    let state_dir = config.daemon.state_dir.clone();
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&state_dir)
        .map_err(|e| {
            startup(
                &format!("cannot create state_dir {}", state_dir.display()),
                &e,
            )
        })?;
    let _lock = crate::state::lock::acquire(&state_dir).map_err(DaemonError::Startup)?;
    if std::process::id() == 1 {
        tracing::warn!(
            "keyturn runs as PID 1: what a hook leaves behind is reparented to it and never reaped; run it under an init (docker run --init, tini)"
        );
    }
    // Before any step: what a hook of a daemon killed with -9 left running.
    let hooks = state_dir.join("hooks");
    crate::process::end_leftover_groups(&hooks).map_err(|e| {
        startup(
            &format!(
                "cannot end what the programs of a previous run left ({})",
                hooks.display()
            ),
            &e,
        )
    })?;
    crate::state::space::room_to_start(&config).map_err(DaemonError::Startup)?;

    // The sockets and the listener before anything is opened or written:
    // a second daemon on the same socket or port (or a file in the way) is
    // refused before it creates a state database or records a start. A
    // start that fails later removes the socket files it bound; clients
    // that connect meanwhile wait for their answer until it serves.
    let sock = socket::bind(&config.daemon.socket, config.daemon.socket_group.as_deref()).map_err(
        |e| {
            startup(
                &format!("control socket {}", config.daemon.socket.display()),
                &e,
            )
        },
    )?;
    let agent_sock = socket::bind_agent(&config.daemon.agent_socket).map_err(|e| {
        startup(
            &format!("agent socket {}", config.daemon.agent_socket.display()),
            &e,
        )
    })?;
    let listener = match config.daemon.listen {
        None => None,
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| startup(&format!("cannot listen on {addr}"), &e))?,
        ),
    };

    // A state database with no audit head beside an audit log with records
    // was lost or replaced (the inverse of a log behind the state's head,
    // refused when the log is opened): checked before a missing database is
    // created, and again on one that exists but records no head.
    let state_db = state_db_path(&config);
    let refuse_lost_state = || {
        crate::audit::refuse_records_without_state(&config.daemon.audit_log, &state_db)
            .map_err(|e| startup("cannot open the state database", &e))
    };
    if !state_db.exists() {
        refuse_lost_state()?;
    }
    let opened = SqliteStore::open(&state_db).and_then(|s| s.check_integrity().map(|()| s));
    let state: Arc<dyn StateStore> = Arc::new(opened.map_err(|e| {
        let text = e.to_string();
        let advice = if text.contains("malformed") || text.contains("not a database") {
            "; the database is damaged: restore state.db from a backup (it holds no secret value: \
             those are in the vaults)"
        } else if text.contains("ermission denied")
            || text.contains("readonly")
            || text.contains("unable to open")
        {
            "; the daemon's user must own the state directory and everything in it \
             (`chown -R keyturn: /var/lib/keyturn` for the packaged unit)"
        } else {
            ""
        };
        startup("cannot open the state database", &format!("{text}{advice}"))
    })?);
    let head = state
        .audit_head()
        .map_err(|e| startup("cannot read the audit head", &e))?;
    if head.is_none() {
        refuse_lost_state()?;
    }
    let audit_key = AuditKey::load(config.daemon.audit_key_file.as_deref())
        .map_err(|e| DaemonError::Startup(format!("cannot load the audit key: {e}")))?;
    tracing::info!(
        keyed = audit_key.is_some(),
        "audit chain: {}",
        if audit_key.is_some() {
            "keyed (hmac-sha256)"
        } else {
            "plain sha-256 (no audit key configured)"
        }
    );
    let chain_check = (head.clone(), audit_key.clone());
    let audit = AuditLog::open_keyed(&config.daemon.audit_log, head.as_ref(), audit_key)
        .map_err(|e| startup("cannot open the audit log", &e))?;

    let catalog =
        Catalog::build(config, None).map_err(|e| startup("cannot set up vaults and sinks", &e))?;
    let config = catalog.config.clone();
    tracing::debug!(elapsed = ?started.elapsed(), "state, audit log and plug-ins ready");

    let metrics = Arc::new(Metrics::new());
    metrics.set_disk_paths(&state_dir, &config.daemon.audit_log);
    let cancel = CancellationToken::new();
    let tracker = TaskTracker::new();
    let engine = Engine::new(EngineParts {
        catalog,
        state: state.clone(),
        audit: audit.clone(),
        metrics: metrics.clone(),
        cancel: cancel.clone(),
        tracker: tracker.clone(),
    })
    .map_err(|e| startup("cannot start the engine", &e))?;

    if let Some(what) = audit.foreign_at_open() {
        audit_daemon(
            &engine,
            "audit.foreign_write",
            Outcome::Failed,
            None,
            Some(what.to_owned()),
        )
        .await;
    }
    // Decommissions the log records after the state's head that the
    // state lacks (a restored older state.db): decided again once the
    // revocations are loaded, below.
    let mut lost_decommissions = Vec::new();
    // Credentials whose current version the log shows superseded.
    let mut superseded = Vec::new();
    if let Some((first, last)) = audit.unconfirmed_at_open() {
        lost_decommissions = decommissions_after(&audit, first - 1)
            .map_err(|e| startup("cannot read the audit log", &e))?;
        let behind = versions_beyond_state(&audit, state.as_ref(), first - 1)
            .map_err(|e| startup("cannot read the audit log", &e))?;
        if !behind.is_empty() {
            let floors: Vec<crate::state::Write> = behind
                .iter()
                .map(|b| crate::state::Write::VersionFloor {
                    key: b.key.clone(),
                    version: b.named,
                })
                .collect();
            state
                .apply(&floors)
                .map_err(|e| startup("cannot record the versions the state lacks", &e))?;
            let named: Vec<String> = behind
                .iter()
                .take(10)
                .map(|b| {
                    format!(
                        "{} version {} (seq {}; the state knows version {})",
                        b.key, b.named, b.seq, b.known
                    )
                })
                .collect();
            let more = behind.len().saturating_sub(named.len());
            let why = format!(
                "the state database is behind the audit log: it does not know versions the log \
                 records as made: {}{}. It was restored from an older backup, or lost its last \
                 writes (a damaged or deleted state.db-wal). New versions are numbered after \
                 those, never again; the vaults may hold versions it does not know (a warning \
                 at each one's next rotation). If a newer copy of the whole state directory \
                 exists, stop keyturn and restore that instead",
                named.join(", "),
                if more > 0 {
                    format!(" and {more} more")
                } else {
                    String::new()
                }
            );
            tracing::warn!(credentials = behind.len(), "{why}");
            audit_daemon(&engine, "state.behind", Outcome::Failed, None, Some(why)).await;
            superseded = behind.into_iter().map(|b| b.key).collect();
        }
        let why = format!(
            "records seq {first}..={last} come after the last head the state database stored: \
             written just before the daemon stopped (kill -9, power loss), or appended by \
             someone who can write the audit log; check them"
        );
        tracing::warn!(first, last, "audit log: {why}");
        audit_daemon(
            &engine,
            "audit.unconfirmed",
            Outcome::Failed,
            None,
            Some(why),
        )
        .await;
    }
    audit_daemon(
        &engine,
        "daemon.start",
        Outcome::Ok,
        Some(format!("config={}", config_path.display())),
        None,
    )
    .await;
    {
        let metrics = Arc::clone(&metrics);
        audit.on_foreign_write(move || metrics.audit_chain_intact(false));
    }
    check_audit_chain(
        engine.clone(),
        metrics.clone(),
        config.daemon.audit_log.clone(),
        chain_check,
    );
    engine
        .start()
        .await
        .map_err(|e| startup("cannot load state", &e))?;
    tracing::debug!(elapsed = ?started.elapsed(), "rotations resumed and timers armed");
    memory::freed(memory::Freed::ConfigLoad);

    // Alerts: the spool is read now, so deliveries still owed from before
    // a restart go out at once; the loop asks the conditions.
    let alerts = Alerts::open(
        &state_dir.join("alerts"),
        alerts::build_sinks(&config.alerts).map_err(|e| startup("alert sinks", &e))?,
        Arc::new(EngineRecorder(engine.clone())),
        Some(metrics.clone()),
        alerts::ManagerOptions {
            flap_hold: config.alert_rules.resolve_hold,
            ..alerts::ManagerOptions::default()
        },
        cancel.clone(),
        tracker.clone(),
    )
    .map_err(|e| startup("cannot open the alert spool", &e))?;

    // Decommissions and rotations poke the alert loop when an alert may
    // have changed.
    engine.set_alert_poke(alerts.poke_handle());
    let revocations = Revocations::start(engine.clone(), alerts.poke_handle())
        .await
        .map_err(|e| startup("cannot load the decommissions", &e))?;
    redecide_lost_decommissions(&engine, &revocations, lost_decommissions).await;
    // Files missing since the last run (a tmpfs after a reboot) come back
    // now: decommissioned agents are known, nothing else delivers yet.
    engine.restore_missing_files().await;
    // Black-box finding: after a restore of the state and the local
    // vault from an older backup, the vault served (and the start
    // delivered) a value the log shows superseded many versions ago,
    // until the next due time. Each such credential rotates now.
    let rotated = superseded
        .iter()
        .filter(|key| engine.rotate_superseded(key))
        .count();
    if rotated > 0 {
        tracing::warn!(
            credentials = rotated,
            "rotating now the credentials whose current version in the state the audit log shows superseded (the state was behind it)"
        );
    }
    tracker.spawn(alerts::run_loop(
        alerts.clone(),
        Arc::new(alerts::AllConditions(vec![
            Arc::new(revocations.clone()),
            Arc::new(crate::rotation::RotationHealth(engine.clone())),
        ])),
        cancel.clone(),
    ));
    // Refusals on the sockets and the task manager's share their limits.
    let refusals: Arc<refusals::Refusals> = Arc::default();
    let tasks = Arc::new(
        crate::tasks::manager::TaskManager::new(
            crate::tasks::store::TaskStore::open(&config.daemon.state_dir.join("tasks"))
                .map_err(|e| startup("cannot open the task store", &e))?,
            task_setup(&engine.catalog().config, &revocations, engine.now())
                .map_err(|e| startup("cannot build the task issuers", &e))?,
            Arc::new(refusals::TaskAudit {
                engine: engine.clone(),
                refusals: refusals.clone(),
            }),
            Arc::new(crate::rotation::SystemClock),
        )
        .with_metrics(metrics.clone()),
    );
    for issuer in engine.catalog().config.issuers.keys() {
        metrics.task_issuer_configured(issuer);
    }
    tracker.spawn(tasks.clone().run(cancel.clone()));
    revocations.serve_tasks(tasks.clone());
    let handler = Arc::new(Handler {
        engine: engine.clone(),
        revocations: revocations.clone(),
        tasks: tasks.clone(),
        oauth: Default::default(),
        metrics: metrics.clone(),
        refusals,
    });
    tracker.spawn(socket::serve(
        sock,
        handler.clone(),
        cancel.clone(),
        tracker.clone(),
    ));
    tracker.spawn(socket::serve(
        agent_sock,
        handler.clone(),
        cancel.clone(),
        tracker.clone(),
    ));

    let ready = Arc::new(AtomicBool::new(false));
    {
        let e = engine.clone();
        metrics.set_credential_times_provider(Arc::new(move || {
            let catalog = e.catalog();
            e.credential_times()
                .into_iter()
                .map(|(key, age, due)| CredentialTimes {
                    // From `creds`: the catalog's config no longer holds
                    // the credentials (they were moved there).
                    max_age_seconds: catalog
                        .creds
                        .get(&key)
                        .and_then(|c| c.policy.max_age)
                        .map(|d| d.as_secs_f64()),
                    agent: key.agent.to_string(),
                    credential: key.credential.to_string(),
                    age_seconds: age,
                    next_due_seconds: due,
                })
                .collect()
        }));
        let r = revocations.clone();
        let e = engine.clone();
        metrics.set_lifecycle_provider(Arc::new(move || {
            let lifecycle = r.lifecycle();
            let catalog = e.catalog();
            let mut agents = vec![("active", 0i64)];
            for state in ["decommissioning", "decommissioned", "orphaned"] {
                agents.push((
                    state,
                    lifecycle.iter().filter(|l| l.state == state).count() as i64,
                ));
            }
            // Active: configured and not decommissioned.
            agents[0].1 = catalog
                .config
                .agents
                .keys()
                .filter(|a| !lifecycle.iter().any(|l| &l.agent == *a))
                .count() as i64;
            let (live_versions, outstanding) = e.live_totals(e.now());
            let identities = agents
                .iter()
                .filter(|(s, _)| *s != "decommissioned")
                .map(|(_, n)| *n)
                .sum::<i64>();
            crate::telemetry::Lifecycle {
                sla_clocks: r.sla_clocks(),
                agents,
                totals: vec![
                    (
                        "identities",
                        "Agents not fully decommissioned (active, decommissioning, orphaned): the identity surface",
                        identities as f64,
                    ),
                    (
                        "live_credential_versions",
                        "Credential versions that still work (current ones, and previous ones in their grace period)",
                        live_versions as f64,
                    ),
                    (
                        "credential_seconds_outstanding",
                        "Sum over live versions of the time each stays valid from now",
                        outstanding as f64,
                    ),
                ],
            }
        }));
        let t = tasks.clone();
        metrics.set_task_figures_provider(Arc::new(move || {
            t.figures().unwrap_or_else(|e| {
                tracing::error!("task metrics: {e}");
                Default::default()
            })
        }));
        let e = engine.clone();
        metrics.set_state_counts_provider(Arc::new(move || {
            e.state_counts()
                .iter()
                .map(|(s, n)| (*s, *n as i64))
                .collect()
        }));
    }
    if config.daemon.listen.is_none() && config.token_service.is_some() {
        tracing::warn!(
            "[token_service] is configured but [daemon] listen is not: the token service is not served; set listen (e.g. \"127.0.0.1:9464\")"
        );
    }
    let mut oauth_service: Option<OauthService> = None;
    if let (Some(addr), Some(listener)) = (config.daemon.listen, listener) {
        // The nudge key is read at every nudge; a key that cannot work is
        // a start-up error, not a stream of 500s.
        let nudge = match &config.daemon.follow_nudge_key_file {
            None => None,
            Some(path) => {
                crate::sinks::webhook::read_key_file(path).map_err(|e| {
                    DaemonError::Startup(format!("daemon.follow_nudge_key_file: {e}"))
                })?;
                Some(Arc::new(crate::api::http::FollowNudge::new(
                    path.clone(),
                    Arc::new(engine.clone()),
                )))
            }
        };
        let service = OauthService {
            addr,
            backend: Arc::new(OauthBackend {
                engine: engine.clone(),
                revocations: revocations.clone(),
                tasks: tasks.clone(),
                refusals: handler.refusals.clone(),
            }),
            // The sockets' `token_exchange` is the same service.
            slot: handler.oauth.clone(),
            cancel: cancel.clone(),
            running: Default::default(),
        };
        service.apply(&config).await.map_err(DaemonError::Startup)?;
        // It verifies the decommissions' `tokens` items, whichever service
        // the slot holds then.
        revocations.serve_tokens(service.slot.clone());
        let oauth = Some(service.slot.clone());
        oauth_service = Some(service);
        tracker.spawn(crate::api::http::serve_http(
            listener,
            metrics.clone(),
            ready.clone(),
            cancel.clone(),
            crate::api::http::Limits::for_nofile(nofile),
            crate::api::http::Routes { nudge, oauth },
        ));
    }

    let watchdog = watchdog_interval();
    {
        let e = engine.clone();
        tracker.spawn(async move {
            e.run_scheduler(watchdog, || notify(&[NotifyState::Watchdog]))
                .await;
        });
        let e = engine.clone();
        tracker.spawn(async move { e.run_followers().await });
    }

    // Sink preflight (directory checks, stale temp cleanup) touches the disk
    // once per sink: at 100k credentials that is seconds, so it runs after
    // READY. A sink that cannot work is reported here and again, with
    // retries, by the deliver step that needs it.
    {
        let catalog = engine.catalog();
        let cancel = cancel.clone();
        tracker.spawn(async move {
            tokio::select! {
                _ = preflight(&catalog) => tracing::debug!(elapsed = ?started.elapsed(), "sinks checked"),
                _ = cancel.cancelled() => {}
            }
        });
    }

    ready.store(true, Ordering::SeqCst);
    let status = format!("serving {} credentials", engine.catalog().creds.len());
    notify(&[NotifyState::Ready, NotifyState::Status(&status)]);
    tracing::info!(config = %config_path.display(), credentials = engine.catalog().creds.len(), "keyturn ready");

    let mut stops = signals::Incoming::new(&[libc::SIGTERM, libc::SIGINT], "keyturn-sigterm")
        .map_err(|e| startup("cannot handle SIGTERM and SIGINT", &e))?;
    // SIGUSR1 is the "reopen your logs" of many logrotate scripts; by
    // default it ended the daemon with no log line and no `daemon.stop`
    // (black-box finding). keyturn reopens nothing: said, and ignored.
    let mut usr = signals::Incoming::new(&[libc::SIGUSR1, libc::SIGUSR2], "keyturn-sigusr")
        .map_err(|e| startup("cannot handle SIGUSR1 and SIGUSR2", &e))?;
    let stopped_by = loop {
        tokio::select! {
            Some(sender) = usr.recv() => {
                tracing::warn!(sender = %sender, "SIGUSR1/SIGUSR2 ignored: keyturn logs to stderr (the journal) and keeps its audit log open; it has no log file to reopen. SIGHUP reloads the config, SIGTERM stops");
            }
            Some(sender) = hup.recv() => {
                reload(config_path, &engine, &alerts, &mut config_files, sender).await;
                match task_setup(&engine.catalog().config, &revocations, engine.now()) {
                    Ok(setup) => {
                        for issuer in setup.issuers.keys() {
                            metrics.task_issuer_configured(issuer);
                        }
                        // Applied all the same (new tasks need the new
                        // issuers); the tasks named stay unrevoked, and
                        // say why, until their issuer points back.
                        match tasks.stranded_by(&setup).await {
                            Ok(lines) => {
                                for line in lines {
                                    tracing::warn!("reload leaves a task credential unrevocable: {line}");
                                }
                            }
                            Err(e) => tracing::warn!("tasks: {e}"),
                        }
                        tasks.set_setup(setup)
                    }
                    Err(e) => tracing::error!("task issuers: {e}; tasks keep the issuers they had"),
                }
                revocations.reload().await;
                let catalog = engine.catalog();
                let config = &catalog.config;
                if oauth_service.is_none() && config.token_service.is_some() {
                    tracing::warn!("[token_service] is configured but [daemon] listen was not at start-up: the token service is not served until a restart with listen set");
                }
                if let Some(service) = &oauth_service {
                    match service.apply(config).await {
                        Ok(true) if config.token_service.is_some() => {
                            metrics.oauth_configured();
                            tracing::info!("token service: reloaded with the new [token_service]");
                        }
                        Ok(true) => tracing::info!("token service: reloaded without [token_service]: its routes answer 404"),
                        Ok(false) => {}
                        Err(e) => tracing::error!("{e}; the token service keeps its previous configuration"),
                    }
                }
            }
            Some(sender) = stops.recv() => break sender,
        }
    };

    notify(&[
        NotifyState::Stopping,
        NotifyState::Status("draining in-flight rotation steps"),
    ]);
    tracing::info!("stopping: draining in-flight rotation steps");
    ready.store(false, Ordering::SeqCst);
    cancel.cancel();
    tracker.close();
    let drain = engine.catalog().config.daemon.drain_timeout;
    let deadline = tokio::time::Instant::now() + drain;
    // Signals that come while draining are said, not silently dropped
    // (black-box finding: a second SIGTERM, an operator's Ctrl-C twice,
    // or a SIGHUP got no log line at all).
    let drained = loop {
        tokio::select! {
            _ = tracker.wait() => break true,
            _ = tokio::time::sleep_until(deadline) => break false,
            Some(sender) = stops.recv() => {
                let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                tracing::warn!(sender = %sender, "already stopping: waiting at most {} more for in-flight steps; SIGKILL stops at once (every step is persisted: they resume at the next start)", humantime::format_duration(Duration::from_secs(left.as_secs().max(1))));
            }
            Some(sender) = hup.recv() => {
                tracing::warn!(sender = %sender, "SIGHUP ignored: the daemon is stopping (the config is read again at the next start)");
            }
            Some(sender) = usr.recv() => {
                tracing::warn!(sender = %sender, "SIGUSR1/SIGUSR2 ignored: the daemon is stopping");
            }
        }
    };
    if !drained {
        tracing::warn!(timeout = %humantime::format_duration(drain), "in-flight steps did not finish in time; they resume at the next start");
    }
    refusals::flush(&handler.refusals).await;
    let detail = match &stopped_by {
        Actor::Signal { .. } => None,
        _ => Some("SIGTERM or SIGINT from the kernel (a terminal's Ctrl-C)".to_owned()),
    };
    audit_as(
        &engine,
        stopped_by,
        "daemon.stop",
        Outcome::Ok,
        detail,
        None,
    )
    .await;
    audit.close().await;
    // The state database's WAL goes into the file: after a clean stop,
    // `state.db` alone is the state (black-box finding: a backup copied
    // back over it was silently overlaid by the WAL left beside it).
    let state = engine.state().clone();
    let folded = match tokio::task::spawn_blocking(move || state.checkpoint()).await {
        Ok(done) => done.map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    if let Err(e) = folded {
        tracing::warn!(error = %e, "cannot fold the state database's WAL into it at stop; the next start does");
    }
    // So are the local vaults' (black-box finding).
    for handle in engine.catalog().vaults.values() {
        handle.vault.close().await;
    }
    tracing::info!("stopped");
    Ok(())
}

/// SIGHUP: validate the new config and swap it in, or keep the old one.
/// Only the files that changed since the last load are read again (see
/// [`config::reload`]).
/// `sender`: who sent the SIGHUP, named by its `daemon.reload` record.
async fn reload(
    config_path: &Path,
    engine: &Engine,
    alerts: &Alerts,
    files: &mut config::FileSet,
    sender: Actor,
) {
    if let Ok(now) = NotifyState::monotonic_usec_now() {
        notify(&[NotifyState::Reloading, now]);
    }
    let old = engine.catalog();
    let located = |errors: config::ConfigErrors| {
        format!(
            "{} error(s), first: {} (`keyturn check` lists them all; the config loaded before stays in force)",
            errors.0.len(),
            errors.0.first().map(|e| e.to_string()).unwrap_or_default()
        )
    };
    let previous: &config::FileSet = files;
    let rebuilt = match memory::apart(|| config::reload(config_path, previous)) {
        Err(errors) => Err(located(errors)),
        Ok(config::Reloaded::Partial {
            mut config,
            files: new_files,
            kept,
            read,
        }) => {
            match checked_restart_only(&old.config, &mut config, located).and_then(|restart_only| {
                Catalog::build_partial(config, &old, &kept)
                    .map(|built| built.map(|c| (c, restart_only)))
                    .map_err(|e| e.to_string())
            }) {
                Ok(Some((catalog, restart_only))) => {
                    tracing::debug!(
                        read,
                        kept = kept.len(),
                        "reload: only changed agent files read"
                    );
                    Ok((catalog, new_files, restart_only))
                }
                // A clash with an unchanged file: read everything, so that
                // validation locates it.
                Ok(None) => full_reload(config_path, &old, located),
                Err(why) => Err(why),
            }
        }
        Ok(config::Reloaded::Full(config, new_files)) => {
            build_full(config, new_files, &old, located)
        }
    };
    // The alert sinks are built (their key files read) before anything is
    // swapped, so a bad one keeps the whole old config.
    let rebuilt = rebuilt.and_then(|(catalog, new_files, restart_only)| {
        let sinks =
            alerts::build_sinks(&catalog.config.alerts).map_err(|e| format!("alert sinks: {e}"))?;
        Ok((catalog, new_files, restart_only, sinks))
    });
    let outcome = match rebuilt {
        Ok((catalog, new_files, restart_only, alert_sinks)) => {
            alerts.set_sinks(alert_sinks);
            // A copy on this thread: the one read is freed with the config
            // (see `memory::apart`).
            *files = new_files.clone();
            engine.reload(catalog).await;
            memory::freed(memory::Freed::ConfigLoad);
            // As at start-up, checked in the background, not on the reload
            // path; only the sinks of credentials built anew.
            let old_entries: std::collections::HashSet<usize> = old
                .creds
                .values()
                .map(|e| Arc::as_ptr(e) as usize)
                .collect();
            let catalog = engine.catalog();
            tokio::spawn(async move {
                let fresh = catalog
                    .creds
                    .values()
                    .filter(|e| !old_entries.contains(&(Arc::as_ptr(e) as usize)));
                preflight_entries(fresh).await;
            });
            Ok(restart_only)
        }
        Err(why) => Err(why),
    };
    match outcome {
        Ok(restart_only) => {
            for setting in &restart_only {
                tracing::warn!(setting = %setting, "changed in the config but only takes effect after a restart");
            }
            tracing::info!(
                credentials = engine.catalog().creds.len(),
                "config reloaded"
            );
            audit_as(engine, sender, "daemon.reload", Outcome::Ok, None, None).await;
            let status = format!(
                "serving {} credentials (reloaded)",
                engine.catalog().creds.len()
            );
            notify(&[NotifyState::Ready, NotifyState::Status(&status)]);
        }
        Err(why) => {
            tracing::error!(error = %why, "reload failed; keeping the previous config");
            audit_as(
                engine,
                sender,
                "daemon.reload",
                Outcome::Failed,
                None,
                Some(why.clone()),
            )
            .await;
            let status = format!("reload failed, keeping the previous config: {why}");
            notify(&[NotifyState::Ready, NotifyState::Status(&status)]);
        }
    }
}

/// Reads every file of the config again and builds its catalog.
fn full_reload(
    config_path: &Path,
    old: &Catalog,
    located: impl Fn(config::ConfigErrors) -> String,
) -> Result<(Catalog, config::FileSet, Vec<String>), String> {
    let (config, files) = memory::apart(|| config::load_tracked(config_path)).map_err(&located)?;
    build_full(config, files, old, located)
}

fn build_full(
    mut config: Config,
    files: config::FileSet,
    old: &Catalog,
    located: impl Fn(config::ConfigErrors) -> String,
) -> Result<(Catalog, config::FileSet, Vec<String>), String> {
    let restart_only = checked_restart_only(&old.config, &mut config, located)?;
    Catalog::build(config, Some(old))
        .map(|c| (c, files, restart_only))
        .map_err(|e| e.to_string())
}

/// [`config::check_host`] on the settings as written, then
/// [`keep_restart_only_settings`]. A restart-only setting does not take
/// effect on reload, but the next start will read it: one that would stop
/// that start (a key file it cannot load, a group that does not exist)
/// refuses the reload now, as `keyturn check` does, rather than leave a
/// daemon that runs until its next restart and then does not come back.
fn checked_restart_only(
    old: &Config,
    new: &mut Config,
    located: impl Fn(config::ConfigErrors) -> String,
) -> Result<Vec<String>, String> {
    config::check_host(new).map_err(located)?;
    Ok(keep_restart_only_settings(old, new))
}

/// Settings bound at start-up (open files, sockets) cannot change on reload:
/// keep the running values and say which ones changed.
fn keep_restart_only_settings(old: &Config, new: &mut Config) -> Vec<String> {
    let mut changed = Vec::new();
    let (o, n) = (&old.daemon, &mut new.daemon);
    // `keep!(name: fields)`: when any of `fields` changed, say `name` and
    // keep the running values of all of them.
    macro_rules! keep {
        ($($name:literal: $($field:ident),+;)+) => {$(
            if $(o.$field != n.$field)||+ {
                changed.push($name.to_owned());
                $(n.$field.clone_from(&o.$field);)+
            }
        )+};
    }
    // What the new config's defaults were derived from, before it is kept.
    let new_state_dir = n.state_dir.clone();
    keep! {
        "daemon.state_dir": state_dir;
        "daemon.audit_log": audit_log;
        "daemon.audit_key_file": audit_key_file;
        "daemon.socket": socket;
        "daemon.socket_group": socket_group;
        "daemon.agent_socket": agent_socket;
        "daemon.listen": listen;
        "daemon.follow_nudge_key_file": follow_nudge_key_file;
        "daemon.max_concurrent_rotations": max_concurrent_rotations;
    }
    keep_local_vault_files(old, new, &new_state_dir, &mut changed);
    // The alert manager's hold is set when it opens.
    if old.alert_rules.resolve_hold != new.alert_rules.resolve_hold {
        changed.push("alert_rules.resolve_hold".to_owned());
        new.alert_rules.resolve_hold = old.alert_rules.resolve_hold;
    }
    changed
}

/// A local vault's database and key file are opened at start-up: a reload
/// that moves them (its `dir` or `key_file`, or the `state_dir` their
/// defaults are in) would put every credential on an empty vault at once.
/// The running places are kept, and each change named; a local vault the
/// reload adds has its default places in the running state directory.
fn keep_local_vault_files(
    old: &Config,
    new: &mut Config,
    new_state_dir: &Path,
    changed: &mut Vec<String>,
) {
    use crate::vaults::VaultSpec;
    let state_dir = new.daemon.state_dir.clone();
    for (name, vault) in &mut new.vaults {
        let VaultSpec::Local(l) = &mut vault.spec else {
            continue;
        };
        match old.vaults.get(name).map(|v| &v.spec) {
            Some(VaultSpec::Local(was)) => {
                for (field, now, then) in [
                    ("dir", &mut l.dir, &was.dir),
                    ("key_file", &mut l.key_file, &was.key_file),
                ] {
                    if now != then {
                        changed.push(format!("vaults.{name}.{field}"));
                        now.clone_from(then);
                    }
                }
            }
            _ if new_state_dir != state_dir => {
                for path in [&mut l.dir, &mut l.key_file].into_iter().flatten() {
                    if let Ok(rest) = path.strip_prefix(new_state_dir) {
                        *path = state_dir.join(rest);
                    }
                }
            }
            _ => {}
        }
    }
}

/// Checks every sink can deliver (and cleans stale temp files). A failure is
/// logged; the rotation's deliver step reports and retries it.
async fn preflight(catalog: &Catalog) {
    preflight_entries(catalog.creds.values()).await;
}

async fn preflight_entries<'a>(entries: impl Iterator<Item = &'a Arc<crate::rotation::CredEntry>>) {
    for entry in entries {
        for sink in &entry.sinks {
            if let Err(e) = sink.preflight().await {
                tracing::warn!(agent = %entry.key().agent, credential = %entry.key().credential, sink = %sink.describe(), error = %e, "sink preflight failed");
            }
        }
    }
}

/// Half of `WATCHDOG_USEC`, when systemd asks for watchdog pings.
///
/// As sd_watchdog_enabled(3) specifies: `WATCHDOG_PID`, when set, must be our
/// pid; when unset the watchdog applies to us. (The sd-notify crate insists on
/// `WATCHDOG_PID` being set, which a supervisor other than systemd may not do.)
fn watchdog_interval() -> Option<Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    if let Ok(pid) = std::env::var("WATCHDOG_PID")
        && pid.parse::<u32>().ok() != Some(std::process::id())
    {
        return None;
    }
    (usec > 0).then(|| Duration::from_micros(usec / 2))
}

fn notify(states: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(false, states) {
        tracing::debug!(error = %e, "sd_notify failed");
    }
}

/// Records a lifecycle event of the daemon (its head stored in state, like
/// every record's).
/// The start checks only the log's tail; this checks the whole chain, in
/// the background (a large log is not read before rotations go on), and
/// records what it finds: a record edited, deleted or reordered while the
/// daemon was down is logged, written as `audit.chain_broken` (naming the
/// first, counting the rest) and kept in `keyturn_audit_chain_intact`.
fn check_audit_chain(
    engine: Engine,
    metrics: Arc<Metrics>,
    path: PathBuf,
    (head, key): (Option<crate::state::AuditHead>, Option<AuditKey>),
) {
    tokio::spawn(async move {
        let started = std::time::Instant::now();
        let checked = tokio::task::spawn_blocking(move || {
            crate::audit::verify_all(&path, head.as_ref(), key.as_ref(), 1)
        })
        .await;
        let Ok(all) = checked else {
            return;
        };
        let Some(first) = all.problems.first() else {
            tracing::info!(
                records = all.report.records,
                elapsed = ?started.elapsed(),
                "audit log: the whole chain is intact"
            );
            metrics.audit_chain_intact(true);
            return;
        };
        metrics.audit_chain_intact(false);
        let count = all.problems.len() as u64 + all.more;
        let why = format!(
            "{first}; {count} problem(s) in all: run `keyturn audit verify` to list every one"
        );
        tracing::error!("audit log: the chain is broken: {why}");
        audit_daemon(
            &engine,
            "audit.chain_broken",
            Outcome::Failed,
            Some(format!("{} record(s) read", all.report.records)),
            Some(why),
        )
        .await;
    });
}

async fn audit_daemon(
    engine: &Engine,
    event: &str,
    outcome: Outcome,
    detail: Option<String>,
    error: Option<String>,
) {
    audit_as(engine, Actor::Daemon, event, outcome, detail, error).await;
}

/// A record of the daemon's own event that `actor` asked for.
async fn audit_as(
    engine: &Engine,
    actor: Actor,
    event: &str,
    outcome: Outcome,
    detail: Option<String>,
    error: Option<String>,
) {
    let mut ev = AuditEvent::new(event, actor, outcome);
    ev.detail = detail;
    ev.error = error;
    if let Err(e) = engine.record(ev).await {
        tracing::error!(event, error = %e, "cannot write to the audit log");
    }
}

/// Alert deliveries go to the audit log through the engine, which persists
/// the audit head with each record (the task manager's: `refusals.rs`).
struct EngineRecorder(Engine);

#[async_trait]
impl alerts::AlertRecorder for EngineRecorder {
    async fn record(&self, event: AuditEvent) {
        let name = event.event.clone();
        if let Err(e) = self.0.record(event).await {
            tracing::error!(event = %name, error = %e, "cannot write to the audit log");
        }
    }
}

/// What the task manager works with, from the config: the policies, the
/// issuers (built, no I/O), the agents that may hold tasks (not the
/// decommissioned: the manager ends their tasks; a decommission the config
/// dates in the future takes them when it comes) and the task root.
fn task_setup(
    config: &Config,
    revocations: &Revocations,
    now: chrono::DateTime<chrono::Utc>,
) -> Result<crate::tasks::manager::TaskSetup, crate::model::PluginError> {
    let retired: std::collections::HashSet<AgentId> = revocations
        .lifecycle()
        .into_iter()
        .filter(|l| l.state != "orphaned")
        .map(|l| l.agent)
        .collect();
    let mut issuers = std::collections::BTreeMap::new();
    for (name, issuer) in &config.issuers {
        issuers.insert(name.clone(), issuer.plugin().build()?);
    }
    Ok(crate::tasks::manager::TaskSetup {
        policies: config.policies.clone(),
        issuers,
        agents: config
            .agents
            .iter()
            .filter(|(id, a)| {
                !a.decommissioned.as_ref().is_some_and(|d| d.in_effect(now))
                    && !retired.contains(*id)
            })
            .map(|(id, a)| {
                (
                    id.to_string(),
                    crate::tasks::manager::AgentOwner {
                        uid: a.uid,
                        gid: a.gid,
                    },
                )
            })
            .collect(),
        task_root: config.daemon.task_root.clone(),
    })
}

/// A decommission the audit log records after the state database's head
/// (see [`decommissions_after`]).
struct LostDecommission {
    agent: crate::model::AgentId,
    decided_at: chrono::DateTime<chrono::Utc>,
    seq: u64,
}

/// The decommissions the audit log records after `after` (the state's
/// stored head): what a state database restored from an older backup may
/// not know. Black-box finding: such a restore brought a decommissioned
/// agent back to life, rotating and delivering again, and nothing said so.
fn decommissions_after(audit: &AuditLog, after: u64) -> Result<Vec<LostDecommission>, String> {
    let found = std::cell::RefCell::new(Vec::<LostDecommission>::new());
    audit
        .find_after(after, |r| {
            let e = &r.event;
            if e.event == "decommission.decided"
                && e.outcome == Outcome::Ok
                && let Some(agent) = &e.agent
            {
                // The decision's own time (the SLA counts from it), else
                // the record's.
                let decided_at = e
                    .detail
                    .as_deref()
                    .and_then(|d| d.split_once("decided_at="))
                    .and_then(|(_, rest)| rest.split_whitespace().next())
                    .or(Some(r.ts.as_str()))
                    .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
                    .map(|t| t.with_timezone(&chrono::Utc));
                if let Some(decided_at) = decided_at {
                    found.borrow_mut().push(LostDecommission {
                        agent: agent.clone(),
                        decided_at,
                        seq: r.seq,
                    });
                }
            }
            false
        })
        .map_err(|e| e.to_string())?;
    Ok(found.into_inner())
}

/// Decides again each decommission of `lost` the state does not know, at
/// the time it was first decided: a decommission is for good, and the
/// log is what a restored state database cannot take back.
async fn redecide_lost_decommissions(
    engine: &Engine,
    revocations: &Revocations,
    lost: Vec<LostDecommission>,
) {
    for l in lost {
        if revocations.get(&l.agent).is_some() {
            continue;
        }
        let why = format!(
            "the audit log records the decommission of {} (seq {}, decided {}) that the state database does not know (restored from an older backup?): decided again, from that time",
            l.agent,
            l.seq,
            l.decided_at
                .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
        );
        tracing::warn!(agent = %l.agent, "{why}");
        audit_daemon(engine, "state.behind", Outcome::Failed, None, Some(why)).await;
        let decision = crate::revocation::Decision {
            agent: l.agent.clone(),
            reason: format!(
                "decided before a restore of the state (audit seq {})",
                l.seq
            ),
            by: None,
            actor: crate::audit::Actor::Daemon,
            source: "audit",
            decided_at: Some(l.decided_at),
        };
        if let Err(e) = revocations.decide(decision).await {
            tracing::error!(agent = %l.agent, error = %e, "cannot decide again the decommission the state lost: run `keyturn decommission {}` yourself", l.agent);
        }
    }
}

/// A version the audit log records as made that the state database does
/// not know (see [`versions_beyond_state`]).
struct Beyond {
    key: CredentialKey,
    /// The highest version of `key` the log's records after the head name.
    named: VersionNo,
    /// The seq of the record that names it.
    seq: u64,
    /// The highest version the state knows of `key`.
    known: VersionNo,
}

/// Black-box finding: a state database restored from a backup (as the docs
/// say to, when it is lost), or one whose WAL was damaged, numbered
/// versions again from where it stood: a second "version 4" with another
/// value, delivered under the number agents had acked. Its stored audit
/// head is then behind the log, and the records after it (usually the few
/// of a batch cut by a kill -9) name rotations of versions the state does
/// not know: a rotation's row is stored before its first record, so after
/// a crash the state always knows every version the log names.
fn versions_beyond_state(
    audit: &AuditLog,
    state: &dyn StateStore,
    after: u64,
) -> Result<Vec<Beyond>, String> {
    let named = std::cell::RefCell::new(
        std::collections::HashMap::<CredentialKey, (VersionNo, u64)>::new(),
    );
    audit
        .find_after(after, |r| {
            let e = &r.event;
            if e.event.starts_with("rotation.")
                && let (Some(agent), Some(credential), Some(version)) =
                    (&e.agent, &e.credential, e.version)
            {
                let key = CredentialKey::new(agent.clone(), credential.clone());
                let mut named = named.borrow_mut();
                let entry = named.entry(key).or_insert((version, r.seq));
                if version > entry.0 {
                    *entry = (version, r.seq);
                }
            }
            false
        })
        .map_err(|e| e.to_string())?;
    let mut behind = Vec::new();
    for (key, (version, seq)) in named.into_inner() {
        let latest = state.latest_rotation(&key).map_err(|e| e.to_string())?;
        let current = state.credential(&key).map_err(|e| e.to_string())?;
        let known = latest
            .map(|r| r.version)
            .into_iter()
            .chain(current.and_then(|c| c.current_version))
            .max()
            .unwrap_or(0);
        if version > known {
            behind.push(Beyond {
                key,
                named: version,
                seq,
                known,
            });
        }
    }
    behind.sort_by(|a, b| a.key.cmp(&b.key));
    Ok(behind)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Black-box finding: an issuer's refusal of a task it cannot mint (a
    /// TTL under the STS minimum) exited 1, every other refusal 77.
    #[test]
    fn an_issuers_refusal_of_a_task_is_forbidden() {
        use crate::api::protocol::ApiErrorKind;
        let e = handler::task_api_error(crate::tasks::manager::TaskError::Unissuable {
            issuer: "sts".into(),
            error: crate::model::PluginError::new(
                crate::model::ErrorKind::Invalid,
                "ask for a TTL of at least 15m",
            ),
        });
        assert_eq!(e.kind, ApiErrorKind::Forbidden);
        assert!(
            e.message.contains("issuer `sts` refuses this task"),
            "{}",
            e.message
        );
    }

    fn config(daemon: &str) -> Config {
        let text = format!(
            "[daemon]\n{daemon}\n[vaults.local]\ntype = \"local\"\n\n{}",
            crate::test_support::agent_table("bot")
        );
        config::load_str(Path::new("/etc/keyturn/keyturn.toml"), &text).unwrap()
    }

    /// A reload names each setting bound at start-up that changed and keeps
    /// its running value (both halves of `daemon.socket`); the others take
    /// the new value.
    #[test]
    fn a_reload_keeps_and_names_the_settings_bound_at_start_up() {
        let old = config(
            "state_dir = \"/var/lib/a\"\nsocket_group = \"ops\"\nlisten = \"127.0.0.1:9000\"\nmax_concurrent_rotations = 4\ndrain_timeout = \"10s\"",
        );
        let mut new = config(
            "state_dir = \"/var/lib/b\"\nsocket_group = \"dev\"\nlisten = \"127.0.0.1:9001\"\nmax_concurrent_rotations = 4\ndrain_timeout = \"20s\"",
        );
        let changed = keep_restart_only_settings(&old, &mut new);
        // The audit log's and the local vault's defaults live in the state
        // directory: a reload that moved it moved them too.
        assert_eq!(
            changed,
            [
                "daemon.state_dir",
                "daemon.audit_log",
                "daemon.socket_group",
                "daemon.listen",
                "vaults.local.dir",
                "vaults.local.key_file"
            ]
        );
        let local = |c: &Config| match &c.vaults["local"].spec {
            crate::vaults::VaultSpec::Local(l) => (l.dir.clone(), l.key_file.clone()),
            _ => unreachable!(),
        };
        assert_eq!(
            local(&new),
            (
                Some("/var/lib/a/vaults/local".into()),
                Some("/var/lib/a/local-vault.key".into())
            ),
            "the local vault stays where it is open"
        );
        let (o, n) = (&old.daemon, &new.daemon);
        assert_eq!(n.state_dir, o.state_dir);
        assert_eq!(n.socket_group.as_deref(), Some("ops"));
        assert_eq!(n.listen, o.listen);
        assert_ne!(n.drain_timeout, o.drain_timeout, "not bound at start-up");
        assert!(keep_restart_only_settings(&old, &mut new).is_empty());
    }

    /// A local vault added by a reload that also moved `state_dir` has its
    /// default places in the running state directory, not the new one.
    #[test]
    fn a_local_vault_added_with_a_moved_state_dir_lives_in_the_running_one() {
        let old = config("state_dir = \"/var/lib/a\"");
        let text = format!(
            "[daemon]\nstate_dir = \"/var/lib/b\"\n[vaults.local]\ntype = \"local\"\n[vaults.spare]\ntype = \"local\"\n\n{}",
            crate::test_support::agent_table("bot")
        );
        let mut new = config::load_str(Path::new("/etc/keyturn/keyturn.toml"), &text).unwrap();
        keep_restart_only_settings(&old, &mut new);
        let crate::vaults::VaultSpec::Local(spare) = &new.vaults["spare"].spec else {
            unreachable!()
        };
        assert_eq!(
            spare.dir.as_deref(),
            Some(Path::new("/var/lib/a/vaults/spare"))
        );
        assert_eq!(
            spare.key_file.as_deref(),
            Some(Path::new("/var/lib/a/spare-vault.key"))
        );
    }

    /// `[alert_rules] resolve_hold` is read when the alert manager opens:
    /// a reload says so and keeps it, and takes the other alert rules.
    #[test]
    fn a_reload_keeps_and_names_the_resolve_hold() {
        let with = |rules: &str| {
            let text = format!(
                "[alert_rules]\n{rules}\n[vaults.local]\ntype = \"local\"\n\n{}",
                crate::test_support::agent_table("bot")
            );
            config::load_str(Path::new("/etc/keyturn/keyturn.toml"), &text).unwrap()
        };
        let old = with("resolve_hold = \"2m\"\nfailures_warning = 2");
        let mut new = with("resolve_hold = \"30s\"\nfailures_warning = 3");
        let changed = keep_restart_only_settings(&old, &mut new);
        assert_eq!(changed, ["alert_rules.resolve_hold"]);
        assert_eq!(new.alert_rules.resolve_hold, Duration::from_secs(120));
        assert_eq!(new.alert_rules.failures_warning, 3, "reloadable");
    }
}
