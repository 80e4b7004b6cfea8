//! Wiring and lifecycle of `keyturn daemon`, in one place:
//! load config → lock and open state → open the audit log → build plug-ins →
//! resume rotations → serve the control socket (and HTTP) → `READY=1` →
//! wait for signals. SIGHUP reloads (an invalid config keeps the old one);
//! SIGTERM/SIGINT drain in-flight steps within `drain_timeout` and exit 0.

use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use sd_notify::NotifyState;
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::alerts::{self, Alerts};
use crate::api::protocol::{
    AckResult, AgentLifecycle, ApiError, ApiErrorKind, DecommissionResult, RotateOutcome,
    RotateResult, Selector, StatusRow,
};
use crate::api::socket::{self, ControlHandler, PeerCred};
use crate::audit::{Actor, AuditEvent, AuditKey, AuditLog, Outcome};
use crate::config::{self, Config, ConfigErrors};
use crate::memory;
use crate::model::{AgentId, CredentialKey};
use crate::revocation::{Decision, DecommissionError, Revocations};
use crate::rotation::{AckError, Catalog, Engine, EngineParts};
use crate::state::{SqliteStore, StateStore};
use crate::telemetry::{CredentialTimes, Metrics};

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

/// Runs the daemon until SIGTERM/SIGINT.
pub async fn run(config_path: &Path) -> Result<(), DaemonError> {
    let started = std::time::Instant::now();
    memory::configure();
    let nofile = raise_nofile_limit();
    let (config, mut config_files) =
        config::load_tracked(config_path).map_err(DaemonError::Config)?;
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
    let _lock = lock_state_dir(&state_dir)?;
    {
        let mut dirs: Vec<&Path> = vec![&state_dir];
        dirs.extend(config.daemon.audit_log.parent().filter(|d| d.is_dir()));
        for v in config.vaults.values() {
            if let Some(dir) = v.spec.plugin().data_dir()
                && dir.is_dir()
            {
                dirs.push(dir);
            }
        }
        crate::state::space::check_room_to_start(&dirs).map_err(DaemonError::Startup)?;
    }

    let state: Arc<dyn StateStore> = Arc::new(
        SqliteStore::open(&state_db_path(&config))
            .map_err(|e| startup("cannot open the state database", &e))?,
    );
    let head = state
        .audit_head()
        .map_err(|e| startup("cannot read the audit head", &e))?;
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
    let audit = AuditLog::open_keyed(&config.daemon.audit_log, head.as_ref(), audit_key)
        .map_err(|e| startup("cannot open the audit log", &e))?;

    let catalog =
        Catalog::build(config, None).map_err(|e| startup("cannot set up vaults and sinks", &e))?;
    let config = catalog.config.clone();
    tracing::debug!(elapsed = ?started.elapsed(), "state, audit log and plug-ins ready");

    let metrics = Arc::new(Metrics::new());
    metrics.set_state_dir(state_dir.clone());
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

    audit_daemon(
        &engine,
        "daemon.start",
        Outcome::Ok,
        Some(format!("config={}", config_path.display())),
        None,
    )
    .await;
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
    // Decommissions and rotations poke the alert loop when an alert may
    // have changed.
    engine.set_alert_poke(alerts.poke_handle());
    let revocations = Revocations::start(engine.clone(), alerts.poke_handle())
        .await
        .map_err(|e| startup("cannot load the decommissions", &e))?;
    tracker.spawn(alerts::run_loop(
        alerts.clone(),
        Arc::new(alerts::AllConditions(vec![
            Arc::new(revocations.clone()),
            Arc::new(crate::rotation::RotationHealth(engine.clone())),
        ])),
        cancel.clone(),
    ));
    let tasks = Arc::new(
        crate::tasks::manager::TaskManager::new(
            crate::tasks::store::TaskStore::open(&config.daemon.state_dir.join("tasks"))
                .map_err(|e| startup("cannot open the task store", &e))?,
            task_setup(&engine.catalog().config, &revocations)
                .map_err(|e| startup("cannot build the task issuers", &e))?,
            Arc::new(EngineRecorder(engine.clone())),
            Arc::new(crate::rotation::SystemClock),
        )
        .with_metrics(metrics.clone()),
    );
    for issuer in engine.catalog().config.issuers.keys() {
        metrics.task_issuer_configured(issuer);
    }
    tracker.spawn(tasks.clone().run(cancel.clone()));
    let handler = Arc::new(Handler {
        engine: engine.clone(),
        revocations: revocations.clone(),
        tasks: tasks.clone(),
        oauth: Default::default(),
        metrics: metrics.clone(),
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
                        .and_then(|c| c.cfg.max_age)
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
    if let Some(addr) = config.daemon.listen {
        // The nudge key is read at every nudge; a key that cannot work is
        // a start-up error, not a stream of 500s.
        let nudge = match &config.daemon.follow_nudge_key_file {
            None => None,
            Some(path) => {
                crate::sinks::webhook::read_key_file(path).map_err(|e| {
                    DaemonError::Startup(format!("daemon.follow_nudge_key_file: {e}"))
                })?;
                Some(Arc::new(crate::api::http::FollowNudge {
                    key_file: path.clone(),
                    target: Arc::new(engine.clone()),
                }))
            }
        };
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| startup(&format!("cannot listen on {addr}"), &e))?;
        let service = OauthService {
            addr,
            backend: Arc::new(OauthBackend {
                engine: engine.clone(),
                revocations: revocations.clone(),
                tasks: tasks.clone(),
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

    let mut hup = signal(SignalKind::hangup()).map_err(|e| startup("cannot handle SIGHUP", &e))?;
    let mut term =
        signal(SignalKind::terminate()).map_err(|e| startup("cannot handle SIGTERM", &e))?;
    let mut int =
        signal(SignalKind::interrupt()).map_err(|e| startup("cannot handle SIGINT", &e))?;
    loop {
        tokio::select! {
            _ = hup.recv() => {
                reload(config_path, &engine, &alerts, &mut config_files).await;
                match task_setup(&engine.catalog().config, &revocations) {
                    Ok(setup) => {
                        for issuer in setup.issuers.keys() {
                            metrics.task_issuer_configured(issuer);
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
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }

    notify(&[
        NotifyState::Stopping,
        NotifyState::Status("draining in-flight rotation steps"),
    ]);
    tracing::info!("stopping: draining in-flight rotation steps");
    ready.store(false, Ordering::SeqCst);
    cancel.cancel();
    tracker.close();
    let drain = engine.catalog().config.daemon.drain_timeout;
    if tokio::time::timeout(drain, tracker.wait()).await.is_err() {
        tracing::warn!(timeout = %humantime::format_duration(drain), "in-flight steps did not finish in time; they resume at the next start");
    }
    audit_daemon(&engine, "daemon.stop", Outcome::Ok, None, None).await;
    audit.close().await;
    tracing::info!("stopped");
    Ok(())
}

/// SIGHUP: validate the new config and swap it in, or keep the old one.
/// Only the files that changed since the last load are read again (see
/// [`config::reload`]).
async fn reload(config_path: &Path, engine: &Engine, alerts: &Alerts, files: &mut config::FileSet) {
    if let Ok(now) = NotifyState::monotonic_usec_now() {
        notify(&[NotifyState::Reloading, now]);
    }
    let old = engine.catalog();
    let located = |errors: config::ConfigErrors| {
        format!(
            "{} error(s), first: {}",
            errors.0.len(),
            errors.0.first().map(|e| e.to_string()).unwrap_or_default()
        )
    };
    let rebuilt = match config::reload(config_path, files) {
        Err(errors) => Err(located(errors)),
        Ok(config::Reloaded::Partial {
            mut config,
            files: new_files,
            kept,
            read,
        }) => {
            let restart_only = keep_restart_only_settings(&old.config, &mut config);
            match Catalog::build_partial(config, &old, &kept) {
                Ok(Some(catalog)) => {
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
                Err(e) => Err(e.to_string()),
            }
        }
        Ok(config::Reloaded::Full(config, new_files)) => build_full(config, new_files, &old),
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
            *files = new_files;
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
            audit_daemon(engine, "daemon.reload", Outcome::Ok, None, None).await;
            let status = format!(
                "serving {} credentials (reloaded)",
                engine.catalog().creds.len()
            );
            notify(&[NotifyState::Ready, NotifyState::Status(&status)]);
        }
        Err(why) => {
            tracing::error!(error = %why, "reload failed; keeping the previous config");
            audit_daemon(
                engine,
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
) -> Result<(Catalog, config::FileSet, Vec<&'static str>), String> {
    let (config, files) = config::load_tracked(config_path).map_err(located)?;
    build_full(config, files, old)
}

fn build_full(
    mut config: Config,
    files: config::FileSet,
    old: &Catalog,
) -> Result<(Catalog, config::FileSet, Vec<&'static str>), String> {
    let restart_only = keep_restart_only_settings(&old.config, &mut config);
    Catalog::build(config, Some(old))
        .map(|c| (c, files, restart_only))
        .map_err(|e| e.to_string())
}

/// Settings bound at start-up (open files, sockets) cannot change on reload:
/// keep the running values and say which ones changed.
fn keep_restart_only_settings(old: &Config, new: &mut Config) -> Vec<&'static str> {
    let mut changed = Vec::new();
    let (o, n) = (&old.daemon, &mut new.daemon);
    if o.state_dir != n.state_dir {
        changed.push("daemon.state_dir");
        n.state_dir = o.state_dir.clone();
    }
    if o.audit_log != n.audit_log {
        changed.push("daemon.audit_log");
        n.audit_log = o.audit_log.clone();
    }
    if o.audit_key_file != n.audit_key_file {
        changed.push("daemon.audit_key_file");
        n.audit_key_file = o.audit_key_file.clone();
    }
    if o.socket != n.socket || o.socket_group != n.socket_group {
        changed.push("daemon.socket");
        n.socket = o.socket.clone();
        n.socket_group = o.socket_group.clone();
    }
    if o.agent_socket != n.agent_socket {
        changed.push("daemon.agent_socket");
        n.agent_socket = o.agent_socket.clone();
    }
    if o.listen != n.listen {
        changed.push("daemon.listen");
        n.listen = o.listen;
    }
    if o.follow_nudge_key_file != n.follow_nudge_key_file {
        changed.push("daemon.follow_nudge_key_file");
        n.follow_nudge_key_file = o.follow_nudge_key_file.clone();
    }
    if o.max_concurrent_rotations != n.max_concurrent_rotations {
        changed.push("daemon.max_concurrent_rotations");
        n.max_concurrent_rotations = o.max_concurrent_rotations;
    }
    changed
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

/// Holds an exclusive lock on `<state_dir>/keyturn.lock` for the daemon's life,
/// so two daemons never share one state directory.
fn lock_state_dir(state_dir: &Path) -> Result<std::fs::File, DaemonError> {
    let path = state_dir.join("keyturn.lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&path)
        .map_err(|e| DaemonError::Startup(format!("cannot open {}: {e}", path.display())))?;
    // SAFETY: flock on a valid, owned file descriptor.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        return Err(DaemonError::Startup(format!(
            "another keyturn daemon is using {} (lock {} is held)",
            state_dir.display(),
            path.display()
        )));
    }
    Ok(file)
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
async fn audit_daemon(
    engine: &Engine,
    event: &str,
    outcome: Outcome,
    detail: Option<String>,
    error: Option<String>,
) {
    let mut ev = AuditEvent::new(event, Actor::Daemon, outcome);
    ev.detail = detail;
    ev.error = error;
    if let Err(e) = engine.record(ev).await {
        tracing::error!(event, error = %e, "cannot write to the audit log");
    }
}

/// Alert deliveries and task records go to the audit log through the engine, which
/// persists the audit head with each record.
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

/// The subject issuers of `[token_service.subject_issuers]`, each with its
/// key set (loaded by [`crate::oauth::SubjectTokens::start`]).
fn token_subjects(config: &Config) -> Result<crate::oauth::SubjectTokens, DaemonError> {
    let mut issuers = Vec::new();
    for (name, cfg) in &config.subject_issuers {
        let issuer = crate::oauth::SubjectIssuer::from_config(cfg.clone()).map_err(|e| {
            DaemonError::Startup(format!("token_service.subject_issuers.{name}: {e}"))
        })?;
        issuers.push(issuer);
    }
    Ok(crate::oauth::SubjectTokens::new(issuers))
}

/// Answers control-socket requests from the engine.
struct Handler {
    engine: Engine,
    revocations: Revocations,
    tasks: Arc<crate::tasks::manager::TaskManager>,
    /// The token service, when `[token_service]` and `listen` are
    /// configured (swapped on reload).
    oauth: Arc<crate::oauth::service::Slot>,
    /// Socket exchanges are counted with the listener's token requests.
    metrics: Arc<crate::telemetry::Metrics>,
}

/// `endpoint` of `keyturn_oauth_requests_total` for exchanges over the
/// sockets.
const SOCKET_TOKEN: &str = "token_socket";

/// The token service's part of the daemon: builds it from the config at
/// start-up and again on a reload that changes `[token_service]` (the new
/// one takes over at once, the old one's key-set refreshes stop).
struct OauthService {
    /// The listener's address: tokens only on loopback.
    addr: std::net::SocketAddr,
    backend: Arc<OauthBackend>,
    slot: Arc<crate::oauth::service::Slot>,
    cancel: CancellationToken,
    /// What the service in the slot was built from, and what stops its
    /// background work.
    running: tokio::sync::Mutex<Option<(TokenServiceInputs, CancellationToken)>>,
}

/// The parts of the config a token service is built from.
type TokenServiceInputs = (
    Option<crate::oauth::config::TokenServiceConfig>,
    std::collections::BTreeMap<String, crate::oauth::config::SubjectIssuerConfig>,
);

impl OauthService {
    /// Builds the service `config` asks for, unless it is the one running:
    /// `true` when the slot changed. An error leaves the slot as it was.
    async fn apply(&self, config: &Config) -> Result<bool, String> {
        let inputs: TokenServiceInputs =
            (config.token_service.clone(), config.subject_issuers.clone());
        let mut running = self.running.lock().await;
        if running.as_ref().map(|(i, _)| i) == Some(&inputs) {
            return Ok(false);
        }
        let service = match &config.token_service {
            None => None,
            // The listener has no TLS of its own: tokens cross it in the
            // clear, so only a loopback address (behind a TLS proxy) serves them.
            Some(_) if !self.addr.ip().is_loopback() => {
                return Err(format!(
                    "[token_service] needs [daemon] listen on a loopback address (it is {}): the listener has no TLS, and access tokens must not cross the network in the clear; listen on 127.0.0.1 and put a TLS proxy in front",
                    self.addr
                ));
            }
            Some(ts) => {
                let subjects = token_subjects(config).map_err(|e| e.to_string())?;
                let stop = self.cancel.child_token();
                subjects.start(&stop).await;
                let backend: Arc<dyn crate::oauth::service::Backend> = self.backend.clone();
                Some((
                    Arc::new(crate::oauth::service::TokenService::new(
                        ts, subjects, backend,
                    )),
                    stop,
                ))
            }
        };
        let stop = service.as_ref().map(|(_, stop)| stop.clone());
        self.slot.set(service.map(|(s, _)| s));
        if let Some((_, old)) = running.replace((inputs, stop.unwrap_or_default())) {
            old.cancel();
        }
        Ok(true)
    }
}

/// The task manager's records take the same way.
#[async_trait]
impl crate::tasks::manager::TaskRecorder for EngineRecorder {
    async fn record(&self, event: AuditEvent) {
        alerts::AlertRecorder::record(self, event).await;
    }
}

/// What the task manager works with, from the config: the policies, the
/// issuers (built, no I/O), the agents that may hold tasks (not the
/// decommissioned: the manager ends their tasks) and the task root.
fn task_setup(
    config: &Config,
    revocations: &Revocations,
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
            .filter(|(id, a)| a.decommissioned.is_none() && !retired.contains(*id))
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

impl Handler {
    /// The agent a task request is for: `as_agent` when the peer is
    /// privileged (audited as acting for it) or is that agent's own uid;
    /// else the one agent configured with the peer's uid.
    fn task_caller(
        &self,
        peer: PeerCred,
        privileged: bool,
        as_agent: Option<&AgentId>,
    ) -> Result<crate::tasks::manager::Caller, ApiError> {
        let catalog = self.engine.catalog();
        let agents = &catalog.config.agents;
        let caller = |agent: &AgentId, described: String| crate::tasks::manager::Caller {
            agent: agent.to_string(),
            actor: peer.actor(),
            described,
        };
        if let Some(a) = as_agent {
            let Some(cfg) = agents.get(a) else {
                return Err(ApiError::not_found(format!("no agent {a:?} in the config")));
            };
            if cfg.uid == Some(peer.uid) {
                return Ok(caller(a, format!("uid={}", peer.uid)));
            }
            if privileged {
                return Ok(caller(a, format!("uid={} as {a}", peer.uid)));
            }
            return Err(ApiError::forbidden(format!(
                "uid {} may not act for agent {a}: only the agent's own uid, root or the control socket's group may",
                peer.uid
            )));
        }
        let mine: Vec<&AgentId> = agents
            .iter()
            .filter(|(_, a)| a.uid == Some(peer.uid))
            .map(|(id, _)| id)
            .collect();
        match mine.as_slice() {
            [one] => Ok(caller(one, format!("uid={}", peer.uid))),
            [] => Err(ApiError::forbidden(format!(
                "uid {} is not the uid of any configured agent; an agent calls as itself (its `uid` in the config), an operator names one with `as`",
                peer.uid
            ))),
            many => Err(ApiError::bad_request(format!(
                "uid {} is the uid of several agents ({}); name one with `as`",
                peer.uid,
                many.iter()
                    .map(|a| a.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))),
        }
    }
}

impl Handler {
    /// The agent a task request with a JWT assertion is for (`crate::auth`):
    /// the assertion's, checked against the current and previous public
    /// keys of that agent's `auth_key`, its `jti` spent in the task store.
    /// Refused with `as` (one way to name the agent per request), and when
    /// the peer's uid is another agent's (that agent must not be able to
    /// act as this one by holding its token). The error goes with the
    /// agent to put in the refusal's audit record, when known.
    async fn assertion_caller(
        &self,
        peer: PeerCred,
        as_agent: Option<&AgentId>,
        token: &crate::api::protocol::WireSecret,
    ) -> Result<crate::tasks::manager::Caller, (ApiError, Option<AgentId>)> {
        use crate::auth::{AgentKey, Verifier};
        if as_agent.is_some() {
            return Err((
                ApiError::bad_request(
                    "`as` and `assertion` together: an assertion already names its agent; send one of them",
                ),
                as_agent.cloned(),
            ));
        }
        let Some(token) = token.0.expose_str() else {
            return Err((ApiError::forbidden("the assertion is not UTF-8 text"), None));
        };
        let catalog = self.engine.catalog();
        let config = &catalog.config;
        let verifier = Verifier::new(config.daemon.assertion_audience.clone());
        let refused = |e: crate::auth::AssertionError, agent: Option<AgentId>| {
            (ApiError::forbidden(e.to_string()), agent)
        };
        let claimed = verifier
            .claimed_agent(token)
            .map_err(|e| refused(e, None))?;
        let Some((agent, cfg)) = AgentId::new(&claimed.agent)
            .ok()
            .and_then(|id| config.agents.get_key_value(&id))
        else {
            return Err((
                ApiError::forbidden(format!(
                    "the assertion's iss {:?} is not a configured agent",
                    claimed.agent.chars().take(64).collect::<String>()
                )),
                None,
            ));
        };
        let agent = agent.clone();
        let deny = |message: String| (ApiError::forbidden(message), Some(agent.clone()));
        if cfg.uid != Some(peer.uid)
            && let Some((other, _)) = config
                .agents
                .iter()
                .find(|(id, a)| **id != agent && a.uid == Some(peer.uid))
        {
            return Err(deny(format!(
                "uid {} is agent {other}'s: it may not present an assertion of agent {agent}",
                peer.uid
            )));
        }
        let Some(auth_key) = cfg.auth_key.clone() else {
            return Err(deny(format!(
                "agent {agent} has no `auth_key` in the config: set auth_key to one of its ed25519 credentials to let it authenticate by assertion"
            )));
        };
        let key = CredentialKey::new(agent.clone(), auth_key);
        let versions = self
            .engine
            .load(move |s| s.versions(&key))
            .await
            .map_err(|e| {
                (
                    ApiError::unavailable(format!("cannot read the agent's keys: {e}")),
                    Some(agent.clone()),
                )
            })?;
        let keys = AgentKey::accepted(&versions);
        let verified = verifier
            .verify(token, &claimed, &keys, self.tasks.store())
            .map_err(|e| deny(e.to_string()))?;
        Ok(crate::tasks::manager::Caller {
            agent: agent.to_string(),
            actor: peer.actor(),
            described: format!(
                "assertion {agent} (key v{}, jti {}) from uid={}",
                verified.key_version,
                verified.jti.chars().take(64).collect::<String>(),
                peer.uid
            ),
        })
    }
}

/// What the token service needs of the daemon: agents' keys from state,
/// the task store's ledgers, the signing credential from its vault,
/// decommissions, the audit log.
struct OauthBackend {
    engine: Engine,
    revocations: Revocations,
    tasks: Arc<crate::tasks::manager::TaskManager>,
}

#[async_trait::async_trait]
impl crate::oauth::service::Backend for OauthBackend {
    async fn client_keys(&self, agent: &str) -> Result<Vec<crate::auth::AgentKey>, String> {
        let catalog = self.engine.catalog();
        let Some((id, cfg)) = AgentId::new(agent)
            .ok()
            .and_then(|id| catalog.config.agents.get_key_value(&id))
        else {
            return Err(format!(
                "{:?} is not a configured agent",
                agent.chars().take(64).collect::<String>()
            ));
        };
        if cfg.decommissioned.is_some() || self.revocations.get(id).is_some() {
            return Err(format!("agent {id} is decommissioned"));
        }
        let Some(auth_key) = cfg.auth_key.clone() else {
            return Err(format!(
                "agent {id} has no `auth_key` in the config: set auth_key to one of its ed25519 credentials to let it authenticate"
            ));
        };
        let key = CredentialKey::new(id.clone(), auth_key);
        let versions = self
            .engine
            .load(move |s| s.versions(&key))
            .await
            .map_err(|e| format!("cannot read the agent's keys: {e}"))?;
        Ok(crate::auth::AgentKey::accepted(&versions))
    }

    async fn spend_jtis(&self, jtis: Vec<(String, String, i64)>) -> Result<Vec<bool>, String> {
        let now = i64::try_from(jsonwebtoken::get_current_timestamp()).unwrap_or(i64::MAX);
        self.tasks
            .store()
            .spend_jtis(jtis, now)
            .await
            .map_err(|e| e.to_string())
    }

    fn token_ledger(&self) -> &dyn crate::oauth::service::TokenLedger {
        self.tasks.store()
    }

    fn signing_current(&self, credential: &CredentialKey) -> Option<u64> {
        self.engine.current_version(credential)
    }

    async fn signing_versions(
        &self,
        credential: &CredentialKey,
    ) -> Result<Vec<crate::state::VersionRow>, String> {
        let key = credential.clone();
        self.engine
            .load(move |s| s.versions(&key))
            .await
            .map_err(|e| format!("cannot read the signing credential's versions: {e}"))
    }

    async fn signing_value(
        &self,
        version: &crate::state::VersionRow,
    ) -> Result<crate::model::SecretValue, String> {
        use crate::vaults::{Select, VaultItem, VaultRefs};
        let catalog = self.engine.catalog();
        let signing = &version.key;
        let Some(entry) = catalog.creds.get(signing) else {
            return Err(format!(
                "the signing credential {} is not configured",
                signing
            ));
        };
        let path = entry.cfg.vault_path();
        let vault = &entry.vaults[0];
        let item = VaultItem {
            key: signing,
            path: &path,
        };
        let refs = VaultRefs::decode(&version.vault_version, &vault.config.name);
        let Some(wanted) = refs.get(&vault.config.name) else {
            return Err(format!(
                "version {} of {} has no version in vault {}",
                version.version, signing, vault.config.name
            ));
        };
        match vault.vault.read(item, Select::Version(wanted)).await {
            Ok(Some(v)) => Ok(v.value),
            Ok(None) => Err(format!(
                "version {} of {} is not in vault {}",
                version.version, signing, vault.config.name
            )),
            Err(e) => Err(format!(
                "reading version {} of {} in vault {}: {}",
                version.version, signing, vault.config.name, e.message
            )),
        }
    }

    fn live_task(
        &self,
        agent: &str,
        id: &str,
    ) -> Result<Option<crate::oauth::exchange::TaskClaims>, String> {
        let Some(row) = self.tasks.store().get(id).map_err(|e| e.to_string())? else {
            return Ok(None);
        };
        let now_ms = chrono::Utc::now().timestamp_millis();
        if row.task.agent != agent
            || row.state != crate::tasks::store::TaskState::Live
            || row.expires_at_ms <= now_ms
        {
            return Ok(None);
        }
        Ok(Some(crate::oauth::exchange::TaskClaims {
            task_id: row.task.task_id.clone(),
            run_id: row.task.run_id.clone(),
            use_case: row.task.use_case.clone(),
            tenant: row.task.tenant.clone(),
            expires_at: u64::try_from(row.expires_at_ms / 1000).unwrap_or(0),
        }))
    }

    fn decommissioned_at(&self, agent: &str) -> Option<i64> {
        let id = AgentId::new(agent).ok()?;
        self.revocations
            .get(&id)
            .map(|d| d.row.token_epoch().timestamp())
    }

    async fn audit(&self, event: AuditEvent) {
        if let Err(e) = self.engine.record(event).await {
            tracing::error!(error = %e, "cannot audit a token service request");
        }
    }
}

impl Handler {
    fn select(&self, selector: &Selector) -> Result<Vec<CredentialKey>, ApiError> {
        let catalog = self.engine.catalog();
        let mut keys: Vec<CredentialKey> = catalog
            .creds
            .keys()
            .filter(|k| match selector {
                Selector::All => true,
                Selector::Agent(a) => &k.agent == a,
                Selector::Credential(c) => *k == c,
            })
            .cloned()
            .collect();
        keys.sort();
        if keys.is_empty() {
            let what = match selector {
                Selector::All => "no credentials are configured".to_string(),
                Selector::Agent(a) => {
                    format!("no agent {a:?} in the config (see `keyturn status`)")
                }
                Selector::Credential(c) => {
                    format!("no credential {c} in the config (see `keyturn status`)")
                }
            };
            return Err(ApiError {
                kind: ApiErrorKind::NotFound,
                message: what,
            });
        }
        Ok(keys)
    }
}

#[async_trait]
impl ControlHandler for Handler {
    async fn status(&self) -> Vec<StatusRow> {
        self.engine.status()
    }

    async fn rotate(
        &self,
        actor: Actor,
        selector: Selector,
        wait: bool,
    ) -> Result<Vec<RotateResult>, ApiError> {
        let keys = self.select(&selector)?;
        let mut ev = AuditEvent::new("admin.rotate", actor, Outcome::Ok);
        ev.detail = Some(format!("{} credential(s), wait={wait}", keys.len()));
        if let [only] = keys.as_slice() {
            ev.agent = Some(only.agent.clone());
            ev.credential = Some(only.credential.clone());
        }
        if let Err(e) = self.engine.record(ev).await {
            return Err(ApiError {
                kind: ApiErrorKind::Unavailable,
                message: format!("cannot write the audit record: {e}"),
            });
        }
        let catalog = self.engine.catalog();
        if let Some(label) = keys.first().and_then(|k| self.engine.agent_label(&k.agent))
            && keys.iter().all(|k| k.agent == keys[0].agent)
        {
            return Err(ApiError::bad_request(format!(
                "agent {} is {label}: its credentials are not rotated any more (see `keyturn status`)",
                keys[0].agent
            )));
        }
        let followed =
            |k: &CredentialKey| catalog.creds.get(k).is_some_and(|e| e.cfg.follow.is_some());
        if let [only] = keys.as_slice()
            && followed(only)
        {
            return Err(ApiError {
                kind: ApiErrorKind::BadRequest,
                message: format!(
                    "{only} is followed (mode = \"follow\"), rotated by another keyturn: rotate it there"
                ),
            });
        }
        let mut waiting = Vec::with_capacity(keys.len());
        let mut results = Vec::with_capacity(keys.len());
        for key in keys {
            let refused = if followed(&key) {
                Some("followed, rotated by another keyturn".to_owned())
            } else {
                self.engine
                    .agent_label(&key.agent)
                    .map(|label| format!("the agent is {label}"))
            };
            if let Some(why) = refused {
                results.push(RotateResult {
                    agent: key.agent,
                    credential: key.credential,
                    rotation: None,
                    version: None,
                    outcome: RotateOutcome::Failed,
                    error: Some(why),
                });
                continue;
            }
            let rx = self.engine.trigger(&key);
            waiting.push((key, rx));
        }
        for (key, rx) in waiting {
            let result = match rx {
                None => RotateResult {
                    agent: key.agent,
                    credential: key.credential,
                    rotation: None,
                    version: None,
                    outcome: RotateOutcome::Failed,
                    error: Some("removed from the config".into()),
                },
                Some(_) if !wait => RotateResult {
                    agent: key.agent,
                    credential: key.credential,
                    rotation: None,
                    version: None,
                    outcome: RotateOutcome::Started,
                    error: None,
                },
                Some(rx) => match rx.await {
                    Ok(done) => RotateResult {
                        agent: key.agent,
                        credential: key.credential,
                        rotation: done.rotation.map(|r| r.to_string()),
                        version: done.version,
                        outcome: if done.error.is_none() {
                            RotateOutcome::Completed
                        } else {
                            RotateOutcome::Failed
                        },
                        error: done.error,
                    },
                    Err(_) => RotateResult {
                        agent: key.agent,
                        credential: key.credential,
                        rotation: None,
                        version: None,
                        outcome: RotateOutcome::Failed,
                        error: Some("the daemon stopped before the rotation finished".into()),
                    },
                },
            };
            results.push(result);
        }
        Ok(results)
    }

    async fn task(
        &self,
        peer: PeerCred,
        privileged: bool,
        command: socket::TaskCommand,
    ) -> Result<crate::api::protocol::ResponseBody, ApiError> {
        use crate::api::protocol::{
            ResponseBody, TaskCredential, TaskStarted, TaskView, WireSecret,
        };
        use crate::tasks::manager::{StartRequest, TaskError};
        let (as_agent, assertion) = command.auth();
        let (as_agent, assertion) = (as_agent.cloned(), assertion.cloned());
        let by_assertion = assertion.is_some();
        let decided = match &assertion {
            Some(token) => self.assertion_caller(peer, as_agent.as_ref(), token).await,
            None => self
                .task_caller(peer, privileged, as_agent.as_ref())
                .map_err(|e| (e, as_agent.clone())),
        };
        let caller = match decided {
            Ok(c) => c,
            Err((e, agent)) => {
                // The reason only: the token itself never reaches the log.
                let mut ev = AuditEvent::new("task.refused", peer.actor(), Outcome::Refused);
                ev.agent = agent;
                ev.error = Some(e.message.clone());
                if by_assertion {
                    ev.detail = Some("authenticated by assertion".into());
                }
                if let Err(err) = self.engine.record(ev).await {
                    tracing::error!(error = %err, "cannot audit a refused task request");
                }
                return Err(e);
            }
        };
        let api_error = |e: TaskError| match e {
            TaskError::Refused(r) => ApiError::forbidden(r.to_string()),
            TaskError::AgentRetired(_) => ApiError::forbidden(e.to_string()),
            TaskError::Invalid { .. } => ApiError::bad_request(e.to_string()),
            TaskError::NotFound(_) | TaskError::NotYours(_) => ApiError::not_found(e.to_string()),
            TaskError::Issue { .. } | TaskError::Deliver { .. } => ApiError::failed(e.to_string()),
            TaskError::Store(_) => ApiError::internal(e.to_string()),
        };
        match command {
            socket::TaskCommand::Start { task, .. } => {
                let started = self
                    .tasks
                    .start(
                        &caller,
                        StartRequest {
                            tenant: task.tenant,
                            use_case: task.use_case,
                            run_id: task.run_id,
                            initiator: task.initiator,
                            sensitivity: task.sensitivity,
                            ttl: task.ttl_seconds.map(Duration::from_secs),
                        },
                    )
                    .await
                    .map_err(api_error)?;
                // With a task directory the secrets are in its files only.
                let in_files = started.dir.is_some();
                Ok(ResponseBody::TaskStarted(Box::new(TaskStarted {
                    task: TaskView::of(&started.task),
                    dir: started.dir.map(|d| d.display().to_string()),
                    credentials: started
                        .credentials
                        .into_iter()
                        .map(|(name, c)| {
                            (
                                name,
                                TaskCredential {
                                    public: c.public,
                                    secret: if in_files {
                                        Default::default()
                                    } else {
                                        c.secret
                                            .into_iter()
                                            .map(|(k, v)| (k, WireSecret(v)))
                                            .collect()
                                    },
                                    expires_at: c.expires_at.into(),
                                    file: c.file.map(|f| f.display().to_string()),
                                },
                            )
                        })
                        .collect(),
                })))
            }
            socket::TaskCommand::End { task, .. } => {
                let row = self.tasks.end(&caller, &task).await.map_err(api_error)?;
                Ok(ResponseBody::TaskEnded(Box::new(TaskView::of(&row))))
            }
            socket::TaskCommand::List { .. } => {
                let rows = self
                    .tasks
                    .list(Some(&caller.agent), 20)
                    .map_err(api_error)?;
                Ok(ResponseBody::Tasks(rows.iter().map(TaskView::of).collect()))
            }
        }
    }

    async fn ack(
        &self,
        peer: PeerCred,
        key: CredentialKey,
        version: u64,
    ) -> Result<AckResult, ApiError> {
        let catalog = self.engine.catalog();
        let agent_uid = catalog.config.agents.get(&key.agent).and_then(|a| a.uid);
        let allowed = peer.uid == 0
            || peer.uid == nix::unistd::geteuid().as_raw()
            || agent_uid == Some(peer.uid);
        if !allowed {
            // Said the same whether or not the agent exists: a peer that may
            // not ack learns nothing about the config.
            let reason = format!(
                "uid {} may not acknowledge {key}: only root, the daemon's user and the agent's configured uid may",
                peer.uid
            );
            tracing::warn!(uid = peer.uid, pid = peer.pid, credential = %key, version, "refused ack");
            let mut ev = AuditEvent::new("ack.refused", peer.actor(), Outcome::Refused);
            ev.agent = Some(key.agent.clone());
            ev.credential = Some(key.credential.clone());
            ev.version = Some(version);
            ev.error = Some(reason.clone());
            if let Err(e) = self.engine.record(ev).await {
                tracing::error!(error = %e, "cannot audit a refused ack");
            }
            return Err(ApiError::forbidden(reason));
        }
        if !catalog.creds.contains_key(&key) {
            return Err(ApiError::not_found(format!(
                "no credential {key} in the config (see `keyturn status`)"
            )));
        }
        match self.engine.ack(&key, version, peer.actor()).await {
            Ok(done) => Ok(AckResult {
                agent: key.agent,
                credential: key.credential,
                version,
                acknowledged: done.acknowledged,
                awaiting: done.awaiting,
                retiring: done.retiring,
            }),
            Err(e @ (AckError::Stale { .. } | AckError::NothingAwaited { .. })) => {
                Err(ApiError::stale(e.to_string()))
            }
            Err(e @ AckError::Delivering { .. }) => Err(ApiError::unavailable(e.to_string())),
            Err(AckError::Internal(m)) => Err(ApiError::unavailable(format!(
                "cannot record the acknowledgement: {m}"
            ))),
        }
    }

    async fn decommission(
        &self,
        actor: Actor,
        agent: AgentId,
        reason: String,
        by: Option<String>,
    ) -> Result<DecommissionResult, ApiError> {
        if reason.trim().is_empty() {
            return Err(ApiError::bad_request(
                "a decommission needs a reason (--reason TEXT): it goes to the audit log",
            ));
        }
        let decision = Decision {
            agent: agent.clone(),
            reason: reason.trim().to_owned(),
            by: by.map(|b| b.trim().to_owned()).filter(|b| !b.is_empty()),
            actor,
            source: "command",
            decided_at: None,
        };
        // Its tasks end first: their credentials are revoked at once.
        if let Err(e) = self.tasks.end_all_of(agent.as_str(), "decommission").await {
            tracing::error!(agent = %agent, "ending the agent's tasks: {e}");
        }
        match self.revocations.decide(decision).await {
            Ok((already, _)) => {
                let row = self
                    .revocations
                    .lifecycle()
                    .into_iter()
                    .find(|l| l.agent == agent)
                    .ok_or_else(|| ApiError::internal("the decommission vanished"))?;
                Ok(DecommissionResult {
                    already,
                    agent: row,
                })
            }
            Err(DecommissionError::NotFound(m)) => Err(ApiError::not_found(m)),
            Err(DecommissionError::Unavailable(m)) => Err(ApiError::unavailable(m)),
        }
    }

    async fn agents(&self) -> Vec<AgentLifecycle> {
        self.revocations.lifecycle()
    }

    async fn token_exchange(
        &self,
        peer: PeerCred,
        privileged: bool,
        as_agent: Option<AgentId>,
        args: crate::api::protocol::TokenExchangeArgs,
    ) -> Result<crate::api::protocol::ResponseBody, ApiError> {
        use crate::api::protocol::{ResponseBody, TokenExchanged, WireSecret};
        use crate::oauth::service::{AgentExchange, Authenticated};
        let Some(service) = self.oauth.get() else {
            return Err(ApiError::unavailable(
                "this daemon serves no token service: configure [token_service] and reload (with [daemon] listen on a loopback address, which takes a restart)",
            ));
        };
        let caller = self
            .task_caller(peer, privileged, as_agent.as_ref())
            .and_then(|c| {
                // An agent retired in the config: as over HTTP (its keys
                // are refused there).
                let catalog = self.engine.catalog();
                let retired = AgentId::new(&c.agent)
                    .ok()
                    .and_then(|id| catalog.config.agents.get(&id))
                    .is_some_and(|a| a.decommissioned.is_some());
                if retired {
                    return Err(ApiError::forbidden(format!(
                        "invalid_client: agent {} is decommissioned",
                        c.agent
                    )));
                }
                Ok(c)
            });
        let caller = match caller {
            Ok(c) => c,
            Err(mut e) => {
                // Said as the token service says it: the OAuth code first.
                if !e.message.starts_with("invalid_client:") {
                    let code = match e.kind {
                        ApiErrorKind::Forbidden | ApiErrorKind::NotFound => "invalid_client",
                        _ => "invalid_request",
                    };
                    e.message = format!("{code}: {}", e.message);
                }
                let mut ev = AuditEvent::new("oauth.token", peer.actor(), Outcome::Refused);
                ev.agent = as_agent;
                ev.error = Some(e.message.clone());
                ev.detail = Some(format!(
                    "by peer uid={} (pid {}) on a socket",
                    peer.uid, peer.pid
                ));
                if let Err(err) = self.engine.record(ev).await {
                    tracing::error!(error = %err, "cannot audit a refused token exchange");
                }
                let code = e.message.split(':').next().unwrap_or_default();
                self.metrics.oauth_request(SOCKET_TOKEN, code);
                return Err(e);
            }
        };
        let req = AgentExchange {
            params: crate::oauth::exchange::Params {
                audience: args.audience,
                resource: args.resource,
                scope: args.scope,
                requested_token_type: args.requested_token_type,
                task_id: args.task_id.filter(|t| !t.is_empty()),
                task: None,
            },
            subject_token: args.subject_token.0,
            subject_token_type: Some(args.subject_token_type),
            actor_token: args.actor_token.map(|t| t.0),
        };
        let by = Authenticated {
            actor: peer.actor(),
            how: format!(
                "authenticated by peer {} (pid {}) on a socket",
                caller.described, peer.pid
            ),
        };
        let result = service.token_for_agent(&caller.agent, req, by).await;
        self.metrics.oauth_request(
            SOCKET_TOKEN,
            result.as_ref().map_or_else(|e| e.code, |_| "ok"),
        );
        match result {
            Ok(issued) => Ok(ResponseBody::TokenExchanged(Box::new(TokenExchanged {
                access_token: WireSecret(issued.access_token),
                issued_token_type: crate::oauth::exchange::TOKEN_TYPE_ACCESS_TOKEN.to_owned(),
                token_type: "Bearer".to_owned(),
                expires_in: issued.expires_in,
                scope: issued.scope,
            }))),
            // The OAuth error code first, as RFC 6749 5.2 names it.
            Err(e) => Err(ApiError::new(
                match e.code {
                    "invalid_client" | "unauthorized_client" => ApiErrorKind::Forbidden,
                    "server_error" => ApiErrorKind::Internal,
                    "temporarily_unavailable" => ApiErrorKind::Unavailable,
                    _ => ApiErrorKind::BadRequest,
                },
                e.to_string(),
            )),
        }
    }

    async fn tasks(&self) -> Result<Vec<crate::api::protocol::TaskView>, ApiError> {
        let rows = self
            .tasks
            .list(None, 0)
            .map_err(|e| ApiError::unavailable(e.to_string()))?;
        Ok(rows
            .iter()
            .map(crate::api::protocol::TaskView::of)
            .collect())
    }

    async fn surface(&self, unused_after: Duration) -> Result<crate::surface::Surface, ApiError> {
        let rows = self
            .engine
            .load(|s| Ok(s.snapshot()?.acks))
            .await
            .map_err(|e| ApiError::unavailable(format!("cannot read state: {e}")))?;
        let mut acks: crate::surface::Acks = std::collections::HashMap::new();
        for r in rows {
            let a = acks.entry(r.key).or_default();
            a.0 = a.0.max(r.acked_at);
            a.1 += 1;
        }
        let facts = self.engine.surface_facts();
        let lifecycle = self.revocations.lifecycle();
        let mut surface =
            crate::surface::build(&facts, &lifecycle, &acks, unused_after, self.engine.now());
        let tasks = self
            .tasks
            .surface_tasks()
            .map_err(|e| ApiError::unavailable(e.to_string()))?;
        let catalog = self.engine.catalog();
        crate::surface::add_tasks(&mut surface, tasks, &|agent| {
            AgentId::new(agent)
                .ok()
                .and_then(|id| catalog.config.agents.get(&id))
                .map(|a| crate::surface::AgentInfo {
                    owner: a.owner.clone(),
                    tenant: a.tenant.clone(),
                    tier: a.tier.clone(),
                })
                .unwrap_or_default()
        });
        Ok(surface)
    }

    async fn refused(&self, peer: PeerCred, reason: String) {
        let mut ev = AuditEvent::new(
            "admin.refused",
            Actor::Peer {
                uid: peer.uid,
                gid: peer.gid,
                pid: peer.pid,
            },
            Outcome::Refused,
        );
        ev.error = Some(reason);
        if let Err(e) = self.engine.record(ev).await {
            tracing::error!(error = %e, "cannot audit a refused control connection");
        }
    }
}
