//! Telemetry: log setup (tracing to stderr, human or JSON) and the metrics
//! registry served on `/metrics`.
//!
//! Metrics are typed handles on one [`Metrics`] value so callers never spell a
//! metric name or label by hand. Per-credential gauges (age, time until due)
//! are deliberately *not* stored per credential: at 100k credentials a
//! `Family` entry each would cost far more than the 1 KiB-per-credential
//! budget. Instead a [`Collector`] asks the daemon for the numbers at scrape
//! time through a provider closure and writes them straight to the encoder.

use std::fmt;
use std::io::IsTerminal;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Metric, Registry};
use tracing_subscriber::EnvFilter;

/// The environment variable that overrides the log filter (`EnvFilter` syntax).
pub const LOG_ENV: &str = "KEYTURN_LOG";

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Readable lines; coloured only when stderr is a terminal.
    Human,
    /// One JSON object per line with the event's fields at the top level, for
    /// journald / log shippers.
    Json,
}

/// Installs the global tracing subscriber, writing to stderr.
///
/// The filter comes from `KEYTURN_LOG` when set, else `filter` (e.g. `info` or
/// `keyturn=debug`). An invalid filter is reported on stderr and replaced by
/// `info` rather than silencing logs. Calling it again is harmless: the first
/// subscriber stays (tests call it from many places).
pub fn init(format: LogFormat, filter: &str) {
    let env = std::env::var(LOG_ENV).ok();
    let (env_filter, warning) = build_filter(env.as_deref(), filter);
    if let Some(w) = warning {
        // No subscriber yet, so this one line goes straight to stderr.
        eprintln!("keyturn: {w}");
    }
    let builder = tracing_subscriber::fmt()
        .with_env_filter(env_filter)
        .with_writer(std::io::stderr)
        // A log line that cannot be written (stderr a closed pipe, a log
        // file on a full disk) is dropped. With this on, the subscriber
        // reported each failure with `eprintln!`, which panicked on the
        // same stderr and took the daemon down (exit 101, mid-rotation).
        .log_internal_errors(false);
    // `try_init` fails only when a subscriber is already installed: that is
    // the idempotence we want, so the error is deliberately ignored.
    let _ = match format {
        LogFormat::Human => builder
            .with_ansi(std::io::stderr().is_terminal())
            .try_init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .try_init(),
    };
}

/// The filter from `KEYTURN_LOG` (when set and non-empty) or `fallback`; an
/// invalid spec yields `info` and a warning saying what was ignored.
fn build_filter(env: Option<&str>, fallback: &str) -> (EnvFilter, Option<String>) {
    let (source, spec) = match env.filter(|s| !s.trim().is_empty()) {
        Some(s) => (LOG_ENV, s),
        None => ("log filter", fallback),
    };
    let (filter, warning) = match EnvFilter::try_new(spec) {
        Ok(f) => (f, None),
        Err(e) => (
            EnvFilter::new("info"),
            Some(format!(
                "ignoring invalid {source} {spec:?} ({e}); using \"info\""
            )),
        ),
    };
    (quiet_dependencies(filter, spec), warning)
}

/// Libraries that log at ERROR what is an expected answer to keyturn (the
/// OpenBao client reports every 404 three times, though an absent pending
/// slot is the normal case; the TLS verifier every certificate it refuses)
/// and whose every real failure keyturn reports itself, with the step,
/// vault and credential. Off unless the filter names them
/// (`KEYTURN_LOG=info,vaultrs=debug` to see them again).
const QUIET_TARGETS: [&str; 3] = ["rustify", "vaultrs", "rustls_platform_verifier"];

fn quiet_dependencies(mut filter: EnvFilter, spec: &str) -> EnvFilter {
    for target in QUIET_TARGETS {
        if !spec.contains(target) {
            filter = filter.add_directive(
                format!("{target}=off")
                    .parse()
                    .expect("a static directive parses"),
            );
        }
    }
    filter
}

/// The states a credential can be in, as counted by `keyturn_credentials`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CredentialState {
    Idle,
    Rotating,
    Retiring,
    Failed,
}

impl CredentialState {
    pub const ALL: [CredentialState; 4] = [
        CredentialState::Idle,
        CredentialState::Rotating,
        CredentialState::Retiring,
        CredentialState::Failed,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            CredentialState::Idle => "idle",
            CredentialState::Rotating => "rotating",
            CredentialState::Retiring => "retiring",
            CredentialState::Failed => "failed",
        }
    }
}

/// The per-credential numbers the daemon hands over at scrape time.
#[derive(Debug, Clone, PartialEq)]
pub struct CredentialTimes {
    pub agent: String,
    pub credential: String,
    /// Seconds since the current version was promoted; `None` if never rotated.
    pub age_seconds: Option<f64>,
    /// Seconds until the next rotation is due; negative when overdue.
    pub next_due_seconds: Option<f64>,
    /// The credential's configured `max_age` in seconds; `None` without one.
    pub max_age_seconds: Option<f64>,
}

/// Called on every scrape; must be cheap enough to run for every credential.
pub type CredentialTimesProvider = Arc<dyn Fn() -> Vec<CredentialTimes> + Send + Sync>;

/// The revocation SLA clock of one decommission not complete.
#[derive(Debug, Clone, PartialEq)]
pub struct SlaClock {
    pub agent: String,
    /// Seconds until the SLA deadline (negative once breached).
    pub remaining_seconds: f64,
    /// The whole SLA (the agent's tier's), so an alert rule can say "80%
    /// of it is gone" as keyturn's own warning does.
    pub sla_seconds: f64,
}

/// Decommissions and the identity surface, read at scrape time.
#[derive(Debug, Clone, Default)]
pub struct Lifecycle {
    /// Every decommission not complete.
    pub sla_clocks: Vec<SlaClock>,
    /// Agents by lifecycle state (`active`, `decommissioning`, ...).
    pub agents: Vec<(&'static str, i64)>,
    /// Further totals: `(metric name without prefix, help, value)`.
    pub totals: Vec<(&'static str, &'static str, f64)>,
}

/// Reads the [`Lifecycle`] figures at scrape time.
pub type LifecycleProvider = Arc<dyn Fn() -> Lifecycle + Send + Sync>;

/// Task-scoped credentials, read at scrape time (`crate::tasks`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TaskFigures {
    /// `(agent, issuer, n)`: credentials of tasks not ended that may still
    /// work (not yet verified revoked nor past their own expiry).
    pub active: Vec<(String, String, i64)>,
    /// Tasks past their TTL whose credentials are not all revoked yet.
    pub revocation_overdue: i64,
}

/// Reads the [`TaskFigures`] at scrape time.
pub type TaskFiguresProvider = Arc<dyn Fn() -> TaskFigures + Send + Sync>;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StepLabels {
    step: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DeliveryLabels {
    sink: String,
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct IssuerResultLabels {
    issuer: String,
    result: &'static str,
}

/// How one revocation attempt of a task credential ended, as counted by
/// `keyturn_task_revocations_total{result}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskRevocation {
    /// Revoked, and the system verified to refuse it.
    Verified,
    /// The system cannot end it early; it expires by itself (STS without
    /// the deny policy).
    Expires,
    /// The revocation or its verification failed; retried.
    Failed,
}

impl TaskRevocation {
    pub const ALL: [TaskRevocation; 3] = [
        TaskRevocation::Verified,
        TaskRevocation::Expires,
        TaskRevocation::Failed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            TaskRevocation::Verified => "verified",
            TaskRevocation::Expires => "expires",
            TaskRevocation::Failed => "failed",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OauthLabels {
    endpoint: &'static str,
    result: &'static str,
}

/// The `result` label of a token-service request: `ok` or its OAuth error
/// code (a fixed set: anything else is `other`).
pub const OAUTH_RESULTS: &[&str] = &[
    "ok",
    "invalid_request",
    "invalid_client",
    "invalid_grant",
    "invalid_target",
    "invalid_scope",
    "unauthorized_client",
    "unsupported_grant_type",
    "server_error",
    "temporarily_unavailable",
    "other",
];

/// Whether the audit log's filesystem is the state directory's (then the
/// state's free-space alerts already cover it).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AuditVolumeLabels {
    shared_with_state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SeverityLabels {
    severity: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AlertDeliveryLabels {
    sink: String,
    outcome: &'static str,
}

fn result_label(ok: bool) -> &'static str {
    if ok { "ok" } else { "failed" }
}

/// Every metric keyturn exports, with typed handles. Names get the `keyturn_`
/// prefix from the registry; counters get `_total` from the encoder.
pub struct Metrics {
    registry: Registry,
    rotations: Family<ResultLabels, Counter>,
    step_failures: Family<StepLabels, Counter>,
    rotation_duration: Histogram,
    credentials: Family<StateLabels, Gauge>,
    deliveries: Family<DeliveryLabels, Counter>,
    audit_records: Counter,
    vault_overwrites: Counter,
    audit_append_failures: Counter,
    /// 1 while the last audit append succeeded, 0 after a failure until one succeeds.
    audit_writable: Gauge,
    /// 1 unless the start-up check of the whole chain found a bad record.
    audit_chain_intact: Gauge,
    ack_holdouts: Counter,
    acks_awaiting: Gauge,
    provider: Slot<Vec<CredentialTimes>>,
    lifecycle: Slot<Lifecycle>,
    state_counts: RwLock<Option<StateCountsProvider>>,
    /// Free bytes where the state directory is, read at scrape time.
    state_free: Gauge,
    /// Free bytes where the audit log is (often its own volume), read at scrape time.
    audit_free: Family<AuditVolumeLabels, Gauge>,
    /// The state directory and the audit log's directory, once known.
    disk_paths: RwLock<Option<(std::path::PathBuf, std::path::PathBuf)>>,
    alerts_firing: Family<SeverityLabels, Gauge>,
    alert_deliveries: Family<AlertDeliveryLabels, Counter>,
    alert_spool_depth: Gauge,
    alerts_refused: Gauge,
    task_starts: Family<IssuerResultLabels, Counter>,
    task_revocations: Family<IssuerResultLabels, Counter>,
    oauth_requests: Family<OauthLabels, Counter>,
    tasks: Slot<TaskFigures>,
}

/// Counts credentials by state at scrape time, so the gauge is never stale
/// and nothing has to keep it up to date on every transition.
pub type StateCountsProvider = Arc<dyn Fn() -> Vec<(CredentialState, i64)> + Send + Sync>;

impl fmt::Debug for Metrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// A new metric of type `M`, registered as `name` with `help`.
fn register<M: Metric + Clone + Default>(registry: &mut Registry, name: &str, help: &str) -> M {
    let metric = M::default();
    registry.register(name, help, metric.clone());
    metric
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("keyturn");
        let rotations: Family<ResultLabels, Counter> =
            register(&mut registry, "rotations", "Rotations finished, by result");
        // Pre-create the result series at 0 so `rate()` and alerts see them
        // from the first scrape, not only after the first failure.
        for ok in [true, false] {
            let _ = rotations.get_or_create(&ResultLabels {
                result: result_label(ok),
            });
        }
        let step_failures: Family<StepLabels, Counter> = register(
            &mut registry,
            "rotation_step_failures",
            "Failed attempts of a rotation step (each retry counts)",
        );
        // Every step from the first scrape: the first failure is then an
        // increase Prometheus sees (a series born at 1 shows none), and an
        // empty family is not exported at all.
        for step in crate::rotation::Step::ALL {
            if step != crate::rotation::Step::Done {
                let _ = step_failures.get_or_create(&StepLabels {
                    step: step.as_str().into(),
                });
            }
        }
        // 1 ms doubling 17 times: the last finite bucket is ~65 s; slower
        // rotations land in +Inf.
        let rotation_duration = Histogram::new(exponential_buckets(0.001, 2.0, 17));
        registry.register(
            "rotation_duration_seconds",
            "Wall time of a rotation from create to deliver",
            rotation_duration.clone(),
        );
        let credentials: Family<StateLabels, Gauge> = register(
            &mut registry,
            "credentials",
            "Configured credentials, by state",
        );
        // Export every state from the start, so a dashboard sees 0 rather than
        // a missing series before the first transition.
        for s in CredentialState::ALL {
            credentials
                .get_or_create(&StateLabels { state: s.as_str() })
                .set(0);
        }
        let deliveries: Family<DeliveryLabels, Counter> = register(
            &mut registry,
            "deliveries",
            "Deliveries of a new version to a sink, by sink type and result",
        );
        for ok in [true, false] {
            let _ = deliveries.get_or_create(&DeliveryLabels {
                sink: "file".into(),
                result: result_label(ok),
            });
        }
        let audit_records: Counter = register(
            &mut registry,
            "audit_records",
            "Records appended to the audit log",
        );
        let audit_append_failures: Counter = register(
            &mut registry,
            "audit_append_failures",
            "Audit records that could not be appended (the step that wrote them fails and is retried)",
        );
        let audit_writable: Gauge = register(
            &mut registry,
            "audit_writable",
            "1 while the last append to the audit log succeeded; 0 from a failed append (full disk, I/O error, the file moved or deleted) until the next record is written",
        );
        audit_writable.set(1);
        let audit_chain_intact: Gauge = register(
            &mut registry,
            "audit_chain_intact",
            "0 when the check of the whole audit log's chain made after start-up found a bad record (an audit.chain_broken record names it; `keyturn audit verify` lists every one), or something else wrote to the log while keyturn runs (audit.foreign_write), else 1",
        );
        audit_chain_intact.set(1);
        let vault_overwrites: Counter = register(
            &mut registry,
            "vault_overwrites",
            "Promotes that found a credential's current version in a vault gone or not the one keyturn wrote (another rotator on the same path, or a manual write or delete); each has a vault.current_gone audit record",
        );
        let ack_holdouts: Counter = register(
            &mut registry,
            "ack_holdouts",
            "Consumers that had not acknowledged a version when its previous version was retired at the grace deadline",
        );
        let acks_awaiting: Gauge = register(
            &mut registry,
            "acks_awaiting",
            "Consumers that have not acknowledged the current version of their credential (holdouts included)",
        );
        let state_free: Gauge = register(
            &mut registry,
            "state_free_bytes",
            "Free bytes on the filesystem of the state directory (keyturn refuses to start below 4 MiB)",
        );
        let audit_free: Family<AuditVolumeLabels, Gauge> = register(
            &mut registry,
            "audit_free_bytes",
            "Free bytes on the filesystem of the audit log (keyturn refuses to start below 4 MiB); shared_with_state=\"true\" when it is the state directory's filesystem",
        );
        let alerts_firing: Family<SeverityLabels, Gauge> = register(
            &mut registry,
            "alerts_firing",
            "Alert conditions firing now, by severity",
        );
        for severity in ["warning", "critical"] {
            alerts_firing
                .get_or_create(&SeverityLabels { severity })
                .set(0);
        }
        let alert_deliveries: Family<AlertDeliveryLabels, Counter> = register(
            &mut registry,
            "alert_deliveries",
            "Fire and resolve deliveries to alert sinks, by sink name and outcome (ok, retry, gave_up)",
        );
        let alert_spool_depth: Gauge = register(
            &mut registry,
            "alert_spool_depth",
            "Alert deliveries (fire or resolve, per sink) spooled and not yet delivered",
        );
        let alerts_refused: Gauge = register(
            &mut registry,
            "alerts_refused",
            "Alert deliveries (fire or resolve, per sink) a sink refused and keyturn still owes: tried again every few minutes and at each reload",
        );
        // Labels are the issuer's name and the agent: both from the config,
        // so bounded; never a task id or a tenant (free text an agent
        // chooses per task).
        let task_starts: Family<IssuerResultLabels, Counter> = register(
            &mut registry,
            "task_starts",
            "Task credentials issued at start, by issuer name and result (ok, failed)",
        );
        let task_revocations: Family<IssuerResultLabels, Counter> = register(
            &mut registry,
            "task_revocations",
            "Revocations of task credentials, by issuer name and result (verified; expires: the system ends it at its expiry; failed: retried)",
        );
        let oauth_requests: Family<OauthLabels, Counter> = register(
            &mut registry,
            "oauth_requests",
            "Token service requests, by endpoint (token, introspect, revoke) and result (ok or the OAuth error code)",
        );
        let tasks = Scraped::register(&mut registry, "tasks", write_tasks);
        let provider = Scraped::register(&mut registry, "credential_times", write_credential_times);
        let lifecycle = Scraped::register(&mut registry, "lifecycle", write_lifecycle);
        Self {
            registry,
            rotations,
            step_failures,
            rotation_duration,
            credentials,
            deliveries,
            audit_records,
            vault_overwrites,
            audit_append_failures,
            audit_writable,
            audit_chain_intact,
            ack_holdouts,
            acks_awaiting,
            provider,
            lifecycle,
            state_counts: RwLock::new(None),
            state_free,
            audit_free,
            disk_paths: RwLock::new(None),
            alerts_firing,
            alert_deliveries,
            alert_spool_depth,
            alerts_refused,
            task_starts,
            task_revocations,
            oauth_requests,
            tasks,
        }
    }

    /// The token service is served: its series exist at 0.
    pub fn oauth_configured(&self) {
        for endpoint in ["token", "token_socket", "introspect", "revoke"] {
            for result in ["ok", "invalid_client", "invalid_request", "server_error"] {
                let _ = self
                    .oauth_requests
                    .get_or_create(&OauthLabels { endpoint, result });
            }
        }
    }

    /// One token-service request at `endpoint`, answered with `result`
    /// (`ok` or an OAuth error code).
    pub fn oauth_request(&self, endpoint: &'static str, result: &str) {
        let result = OAUTH_RESULTS
            .iter()
            .find(|r| **r == result)
            .copied()
            .unwrap_or("other");
        self.oauth_requests
            .get_or_create(&OauthLabels { endpoint, result })
            .inc();
    }

    /// The task issuer `issuer` is configured: its start and revocation
    /// series exist at 0, so `increase()` sees the first failure.
    pub fn task_issuer_configured(&self, issuer: &str) {
        for result in ["ok", "failed"] {
            let _ = self.task_starts.get_or_create(&IssuerResultLabels {
                issuer: issuer.into(),
                result,
            });
        }
        for r in TaskRevocation::ALL {
            let _ = self.task_revocations.get_or_create(&IssuerResultLabels {
                issuer: issuer.into(),
                result: r.as_str(),
            });
        }
    }

    /// A task's credential at `issuer` was issued (`ok`) or not.
    pub fn task_issued(&self, issuer: &str, ok: bool) {
        self.task_starts
            .get_or_create(&IssuerResultLabels {
                issuer: issuer.into(),
                result: result_label(ok),
            })
            .inc();
    }

    /// One revocation attempt of a task's credential at `issuer`.
    pub fn task_revocation(&self, issuer: &str, result: TaskRevocation) {
        self.task_revocations
            .get_or_create(&IssuerResultLabels {
                issuer: issuer.into(),
                result: result.as_str(),
            })
            .inc();
    }

    /// Installs the source of `tasks_active` and `task_revocation_overdue`.
    pub fn set_task_figures_provider(&self, provider: TaskFiguresProvider) {
        install(&self.tasks, provider);
    }

    /// The number of alert conditions firing with `severity` (`warning`, `critical`).
    pub fn set_alerts_firing(&self, severity: &'static str, n: i64) {
        self.alerts_firing
            .get_or_create(&SeverityLabels { severity })
            .set(n);
    }

    /// One delivery attempt to the alert sink `sink` (its `[alerts.NAME]`)
    /// ended with `outcome`: `ok`, `retry` (it will be tried again) or
    /// `gave_up`.
    pub fn alert_delivery(&self, sink: &str, outcome: &'static str) {
        self.alert_deliveries
            .get_or_create(&AlertDeliveryLabels {
                sink: sink.into(),
                outcome,
            })
            .inc();
    }

    /// The alert sink `sink` is configured: its outcome series start at 0,
    /// so `increase()` in an alert rule sees its first refusal (a series
    /// born at 1 has no increase to show).
    pub fn alert_sink_configured(&self, sink: &str) {
        for outcome in ["ok", "retry", "gave_up"] {
            let _ = self.alert_deliveries.get_or_create(&AlertDeliveryLabels {
                sink: sink.into(),
                outcome,
            });
        }
    }

    /// Alert deliveries spooled and not yet delivered.
    pub fn set_alert_spool_depth(&self, n: i64) {
        self.alert_spool_depth.set(n);
    }

    /// Alert deliveries a sink refused (given up) that are still owed.
    pub fn set_alerts_refused(&self, n: i64) {
        self.alerts_refused.set(n);
    }

    /// The state directory and the audit log whose filesystems'
    /// free space `state_free_bytes` and `audit_free_bytes` report.
    pub fn set_disk_paths(&self, state_dir: &std::path::Path, audit_log: &std::path::Path) {
        let audit_dir = match audit_log.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => std::path::PathBuf::from("."),
        };
        *self.disk_paths.write().unwrap_or_else(|p| p.into_inner()) =
            Some((state_dir.to_path_buf(), audit_dir));
    }

    /// Installs the source of the decommission and surface figures.
    pub fn set_lifecycle_provider(&self, provider: LifecycleProvider) {
        install(&self.lifecycle, provider);
    }

    /// Installs the source of the `credentials{state}` counts, read at scrape time.
    pub fn set_state_counts_provider(&self, provider: StateCountsProvider) {
        install(&self.state_counts, provider);
    }

    /// A rotation ended (successfully or not) after `duration`.
    pub fn rotation_finished(&self, ok: bool, duration: Duration) {
        self.rotations
            .get_or_create(&ResultLabels {
                result: result_label(ok),
            })
            .inc();
        self.rotation_duration.observe(duration.as_secs_f64());
    }

    /// One attempt of `step` (`create`, `set`, `test`, `promote`, ...) failed.
    pub fn step_failed(&self, step: &str) {
        self.step_failures
            .get_or_create(&StepLabels { step: step.into() })
            .inc();
    }

    /// Sets how many credentials are in `state` (the daemon recounts).
    pub fn set_credentials(&self, state: CredentialState, count: i64) {
        self.credentials
            .get_or_create(&StateLabels {
                state: state.as_str(),
            })
            .set(count);
    }

    /// One delivery to a sink of type `sink` (`file`, ...).
    pub fn delivery(&self, sink: &str, ok: bool) {
        self.deliveries
            .get_or_create(&DeliveryLabels {
                sink: sink.into(),
                result: result_label(ok),
            })
            .inc();
    }

    /// A previous version was retired at its grace deadline with `n`
    /// consumers that had not acknowledged the new one.
    pub fn ack_holdouts(&self, n: u64) {
        self.ack_holdouts.inc_by(n);
    }

    /// Consumers awaiting an ack went up or down by `delta`.
    pub fn acks_awaiting(&self, delta: i64) {
        self.acks_awaiting.inc_by(delta);
    }

    /// `n` records were appended to the audit log.
    pub fn audit_records(&self, n: u64) {
        self.audit_records.inc_by(n);
        self.audit_writable.set(1);
    }

    /// The start-up check of the whole audit chain found it intact or not.
    pub fn audit_chain_intact(&self, intact: bool) {
        self.audit_chain_intact.set(intact as i64);
    }

    /// A promote found the current version gone or written by someone else.
    pub fn vault_overwritten(&self) {
        self.vault_overwrites.inc();
    }

    /// Appending an audit record failed (full disk, I/O error, closed log).
    pub fn audit_append_failed(&self) {
        self.audit_append_failures.inc();
        self.audit_writable.set(0);
    }

    /// Installs (or replaces) the source of per-credential times. Until one is
    /// set the per-credential gauges are exported without samples.
    pub fn set_credential_times_provider(&self, provider: CredentialTimesProvider) {
        install(&self.provider, provider);
    }

    /// For modules that own extra metrics: register them before the `Metrics`
    /// is shared.
    pub fn registry_mut(&mut self) -> &mut Registry {
        &mut self.registry
    }

    /// The OpenMetrics text exposition of everything, ending in `# EOF`.
    pub fn encode(&self) -> String {
        self.encode_as(Exposition::OpenMetrics)
    }

    /// Everything, in the exposition format `as_`.
    pub fn encode_as(&self, as_: Exposition) -> String {
        let counts = self
            .state_counts
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if let Some(counts) = counts {
            for (state, n) in counts() {
                self.set_credentials(state, n);
            }
        }
        let disk_paths = self
            .disk_paths
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if let Some((state_dir, audit_dir)) = disk_paths {
            let bytes = |free: u64| i64::try_from(free).unwrap_or(i64::MAX);
            if let Ok(free) = crate::state::space::free_bytes(&state_dir) {
                self.state_free.set(bytes(free));
            }
            if let Ok(free) = crate::state::space::free_bytes(&audit_dir) {
                use std::os::unix::fs::MetadataExt;
                let device = |d: &std::path::Path| std::fs::metadata(d).map(|m| m.dev()).ok();
                let shared = device(&state_dir).is_some_and(|d| Some(d) == device(&audit_dir));
                self.audit_free.clear();
                self.audit_free
                    .get_or_create(&AuditVolumeLabels {
                        shared_with_state: if shared { "true" } else { "false" },
                    })
                    .set(bytes(free));
            }
        }
        let mut out = String::new();
        let encoded = match as_ {
            Exposition::OpenMetrics => {
                prometheus_client::encoding::text::encode(&mut out, &self.registry)
            }
            Exposition::PrometheusText => {
                prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry)
            }
        };
        if let Err(e) = encoded {
            // Only a collector can fail (fmt::Error); say so in the output
            // rather than serving a silently truncated page.
            tracing::error!(error = %e, "encoding metrics failed");
            out.clear();
            out.push_str("# encoding metrics failed\n");
            if as_ == Exposition::OpenMetrics {
                out.push_str("# EOF\n");
            }
        }
        out
    }
}

/// The two text formats `/metrics` speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exposition {
    /// OpenMetrics 1.0 (`application/openmetrics-text`), which Prometheus
    /// asks for first.
    OpenMetrics,
    /// The Prometheus text format 0.0.4 (`text/plain`), for every client
    /// that does not ask for OpenMetrics: `curl`, `promtool check metrics`,
    /// older scrapers. Black-box finding: served OpenMetrics to all of
    /// them, `promtool check metrics` failed on every counter.
    PrometheusText,
}

impl Exposition {
    /// The format an `Accept` header asks for: OpenMetrics when it names
    /// it (with a non-zero weight), as client_golang decides.
    pub fn from_accept(accept: Option<&str>) -> Self {
        let asks = accept.is_some_and(|a| {
            a.split(',').any(|range| {
                let mut parts = range.split(';').map(str::trim);
                let media = parts.next().unwrap_or_default();
                let refused = parts.any(|p| {
                    p.strip_prefix("q=")
                        .and_then(|q| q.parse::<f32>().ok())
                        .is_some_and(|q| q <= 0.0)
                });
                media.eq_ignore_ascii_case("application/openmetrics-text") && !refused
            })
        });
        if asks {
            Exposition::OpenMetrics
        } else {
            Exposition::PrometheusText
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Exposition::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
            Exposition::PrometheusText => {
                prometheus_client::encoding::prometheus_text::CONTENT_TYPE
            }
        }
    }
}

/// A source of figures installed after start-up (`Metrics::set_*_provider`)
/// and called at every scrape.
type Slot<T> = Arc<RwLock<Option<Arc<dyn Fn() -> T + Send + Sync>>>>;

/// Installs `provider` in `slot`, replacing any earlier one. A poisoned lock
/// only means a provider panicked mid-scrape; the slot itself is still a
/// plain Option, safe to overwrite.
fn install<P>(slot: &RwLock<Option<P>>, provider: P) {
    *slot.write().unwrap_or_else(|p| p.into_inner()) = Some(provider);
}

/// A collector of figures read from its [`Slot`]'s provider at scrape time,
/// written by `write` (`None` while no provider is installed); it holds
/// nothing between scrapes.
struct Scraped<T: 'static> {
    name: &'static str,
    slot: Slot<T>,
    write: fn(Option<T>, DescriptorEncoder) -> Result<(), fmt::Error>,
}

impl<T: 'static> Scraped<T> {
    /// Registers a collector named `name` (for `Debug`) and returns the
    /// slot its provider goes in.
    fn register(
        registry: &mut Registry,
        name: &'static str,
        write: fn(Option<T>, DescriptorEncoder) -> Result<(), fmt::Error>,
    ) -> Slot<T> {
        let slot: Slot<T> = Arc::new(RwLock::new(None));
        registry.register_collector(Box::new(Scraped {
            name,
            slot: Arc::clone(&slot),
            write,
        }));
        slot
    }
}

impl<T: 'static> fmt::Debug for Scraped<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Scraped")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl<T: 'static> Collector for Scraped<T> {
    fn encode(&self, encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        // Clone the Arc out so the lock is not held while the provider runs.
        let provider = self.slot.read().unwrap_or_else(|p| p.into_inner()).clone();
        (self.write)(provider.map(|p| p()), encoder)
    }
}

/// `credential_age_seconds`, `credential_next_due_seconds` and
/// `credential_max_age_seconds` (no samples until a provider is installed).
fn write_credential_times(
    times: Option<Vec<CredentialTimes>>,
    mut encoder: DescriptorEncoder,
) -> Result<(), fmt::Error> {
    let times = times.unwrap_or_default();
    type Pick = fn(&CredentialTimes) -> Option<f64>;
    let gauges: [(&str, &str, Pick); 3] = [
        (
            "credential_age_seconds",
            "Seconds since the current version of the credential was promoted",
            |t| t.age_seconds,
        ),
        (
            "credential_next_due_seconds",
            "Seconds until the credential's next rotation is due (negative when overdue)",
            |t| t.next_due_seconds,
        ),
        (
            "credential_max_age_seconds",
            "The credential's configured max_age: its current version counts as expired when older (only credentials with one)",
            |t| t.max_age_seconds,
        ),
    ];
    for (name, help, pick) in gauges {
        let mut metric = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
        for t in &times {
            if let Some(v) = pick(t).filter(|v| v.is_finite()) {
                let labels = [
                    ("agent", t.agent.as_str()),
                    ("credential", t.credential.as_str()),
                ];
                metric.encode_family(&labels)?.encode_gauge(&v)?;
            }
        }
    }
    Ok(())
}

/// The [`Lifecycle`] gauges (nothing until a provider is installed).
fn write_lifecycle(l: Option<Lifecycle>, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
    let Some(l) = l else {
        return Ok(());
    };
    let mut m = encoder.encode_descriptor(
        "decommission_sla_remaining_seconds",
        "Seconds until the revocation SLA deadline of each decommission in progress (negative once breached)",
        None,
        MetricType::Gauge,
    )?;
    for c in l
        .sla_clocks
        .iter()
        .filter(|c| c.remaining_seconds.is_finite())
    {
        m.encode_family(&[("agent", c.agent.as_str())])?
            .encode_gauge(&c.remaining_seconds)?;
    }
    let mut m = encoder.encode_descriptor(
        "decommission_sla_seconds",
        "The whole revocation SLA of each decommission in progress (its agent's tier's)",
        None,
        MetricType::Gauge,
    )?;
    for c in l.sla_clocks.iter().filter(|c| c.sla_seconds.is_finite()) {
        m.encode_family(&[("agent", c.agent.as_str())])?
            .encode_gauge(&c.sla_seconds)?;
    }
    let mut m = encoder.encode_descriptor(
        "agents",
        "Agents by lifecycle state (active, decommissioning, decommissioned, orphaned)",
        None,
        MetricType::Gauge,
    )?;
    for (state, n) in &l.agents {
        m.encode_family(&[("state", *state)])?.encode_gauge(n)?;
    }
    for (name, help, v) in &l.totals {
        encoder
            .encode_descriptor(name, help, None, MetricType::Gauge)?
            .encode_gauge(v)?;
    }
    Ok(())
}

/// `tasks_active{agent,issuer}` and `task_revocation_overdue` (the task
/// store is their one source).
fn write_tasks(
    figures: Option<TaskFigures>,
    mut encoder: DescriptorEncoder,
) -> Result<(), fmt::Error> {
    let figures = figures.unwrap_or_default();
    let mut m = encoder.encode_descriptor(
        "tasks_active",
        "Credentials of tasks not ended that may still work, by agent and issuer name",
        None,
        MetricType::Gauge,
    )?;
    for (agent, issuer, n) in &figures.active {
        m.encode_family(&[("agent", agent.as_str()), ("issuer", issuer.as_str())])?
            .encode_gauge(n)?;
    }
    // Always exported (0 without tasks), so an alert on it is never
    // blind to a missing series.
    encoder
        .encode_descriptor(
            "task_revocation_overdue",
            "Tasks past their TTL whose credentials are not all revoked yet (revocation is retried)",
            None,
            MetricType::Gauge,
        )?
        .encode_gauge(&figures.revocation_overdue)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openmetrics_only_for_a_client_that_asks_for_it() {
        use Exposition::*;
        for (accept, want) in [
            (None, PrometheusText),
            (Some("*/*"), PrometheusText),
            (Some("text/plain"), PrometheusText),
            // What Prometheus sends.
            (
                Some(
                    "application/openmetrics-text;version=1.0.0;q=0.5,application/openmetrics-text;version=0.0.1;q=0.4,text/plain;version=0.0.4;q=0.3,*/*;q=0.2",
                ),
                OpenMetrics,
            ),
            (Some("Application/OpenMetrics-Text"), OpenMetrics),
            (
                Some("application/openmetrics-text;q=0, text/plain"),
                PrometheusText,
            ),
        ] {
            assert_eq!(Exposition::from_accept(accept), want, "{accept:?}");
        }
    }

    /// The audit log is often on a volume of its own (the package puts it in
    /// /var/log/keyturn): its free space is reported from its own filesystem.
    #[test]
    fn free_space_is_reported_for_the_state_and_the_audit_log_volumes() {
        let m = Metrics::new();
        let value = |text: &str, name: &str| -> Option<u64> {
            text.lines()
                .find_map(|l| l.strip_prefix(&format!("{name} ")))
                .map(|v| v.trim().parse().unwrap())
        };
        let state = tempfile::tempdir().unwrap();
        // /dev/shm is a tmpfs: a filesystem other than the temp dir's here.
        let audit_dir = tempfile::tempdir_in("/dev/shm").unwrap();
        let state_fs = crate::state::space::free_bytes(state.path()).unwrap();
        let audit_fs = crate::state::space::free_bytes(audit_dir.path()).unwrap();
        assert_ne!(state_fs, audit_fs, "the test needs two filesystems");
        m.set_disk_paths(state.path(), &audit_dir.path().join("audit.log"));
        let text = m.encode();
        let state_free = value(&text, "keyturn_state_free_bytes").unwrap();
        let audit_free = value(
            &text,
            "keyturn_audit_free_bytes{shared_with_state=\"false\"}",
        )
        .unwrap();
        let near = |a: u64, b: u64| a.abs_diff(b) < 64 * 1024 * 1024;
        assert!(near(state_free, state_fs), "{state_free} vs {state_fs}");
        assert!(near(audit_free, audit_fs), "{audit_free} vs {audit_fs}");
        // In the state directory (the default): one volume, said so, and
        // only one series.
        m.set_disk_paths(state.path(), &state.path().join("audit.log"));
        let text = m.encode();
        assert_eq!(
            text.matches("keyturn_audit_free_bytes{").count(),
            1,
            "{text}"
        );
        let audit_free = value(
            &text,
            "keyturn_audit_free_bytes{shared_with_state=\"true\"}",
        )
        .unwrap();
        assert!(near(audit_free, state_fs), "{audit_free} vs {state_fs}");
        // A bare file name: the audit log is in the working directory.
        m.set_disk_paths(state.path(), std::path::Path::new("audit.log"));
        let cwd_fs = crate::state::space::free_bytes(std::path::Path::new(".")).unwrap();
        let text = m.encode();
        let audit_free = text
            .lines()
            .find(|l| l.starts_with("keyturn_audit_free_bytes{"))
            .and_then(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .unwrap();
        assert!(near(audit_free, cwd_fs), "{audit_free} vs {cwd_fs}");
    }

    #[test]
    fn counters_and_gauges_appear_with_prefix_and_labels() {
        let m = Metrics::new();
        // Series that alerts rely on exist at 0 before anything happened.
        let fresh = m.encode();
        for line in [
            "keyturn_rotations_total{result=\"failed\"} 0",
            "keyturn_deliveries_total{sink=\"file\",result=\"failed\"} 0",
            "keyturn_credentials{state=\"retiring\"} 0",
            "keyturn_audit_records_total 0",
            "keyturn_audit_append_failures_total 0",
            "keyturn_audit_writable 1",
            "keyturn_audit_chain_intact 1",
            "keyturn_vault_overwrites_total 0",
        ] {
            // Whole lines: a HELP text may begin with a sample's words
            // ("keyturn_audit_writable 1 while ...").
            assert!(
                fresh.lines().any(|l| l == line),
                "missing {line:?} in\n{fresh}"
            );
        }
        m.rotation_finished(true, Duration::from_millis(20));
        m.rotation_finished(true, Duration::from_millis(20));
        m.rotation_finished(false, Duration::from_secs(3));
        m.step_failed("promote");
        m.set_credentials(CredentialState::Idle, 41);
        m.set_credentials(CredentialState::Failed, 1);
        m.delivery("file", true);
        m.delivery("file", false);
        m.audit_records(5);
        m.alert_sink_configured("oncall");
        m.alert_delivery("oncall", "gave_up");
        m.audit_append_failed();
        m.audit_append_failed();
        let text = m.encode();
        for line in [
            "keyturn_rotations_total{result=\"ok\"} 2",
            "keyturn_rotations_total{result=\"failed\"} 1",
            "keyturn_rotation_step_failures_total{step=\"promote\"} 1",
            "keyturn_rotation_duration_seconds_count 3",
            "keyturn_credentials{state=\"idle\"} 41",
            "keyturn_credentials{state=\"rotating\"} 0",
            "keyturn_credentials{state=\"failed\"} 1",
            "keyturn_deliveries_total{sink=\"file\",result=\"ok\"} 1",
            "keyturn_deliveries_total{sink=\"file\",result=\"failed\"} 1",
            "keyturn_audit_records_total 5",
            "keyturn_audit_append_failures_total 2",
            "keyturn_audit_writable 0",
            "keyturn_alert_deliveries_total{sink=\"oncall\",outcome=\"ok\"} 0",
            "keyturn_alert_deliveries_total{sink=\"oncall\",outcome=\"retry\"} 0",
            "keyturn_alert_deliveries_total{sink=\"oncall\",outcome=\"gave_up\"} 1",
            "# TYPE keyturn_credential_age_seconds gauge",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
        assert!(text.ends_with("# EOF\n"));
        // The next record written clears the failure; a broken chain stays.
        m.audit_records(1);
        m.audit_chain_intact(false);
        let text = m.encode();
        assert!(
            text.lines().any(|l| l == "keyturn_audit_writable 1"),
            "{text}"
        );
        assert!(
            text.lines().any(|l| l == "keyturn_audit_chain_intact 0"),
            "{text}"
        );
        // The histogram's largest finite bucket covers a minute.
        assert!(text.contains("le=\"65.536\""), "{text}");
    }

    #[test]
    fn per_credential_times_come_from_the_provider_at_scrape_time() {
        let m = Metrics::new();
        // Before a provider is set: descriptors only, no samples.
        assert!(!m.encode().contains("keyturn_credential_age_seconds{"));

        let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let c = Arc::clone(&calls);
        m.set_credential_times_provider(Arc::new(move || {
            c.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            vec![
                CredentialTimes {
                    agent: "bot".into(),
                    credential: "db".into(),
                    age_seconds: Some(12.5),
                    next_due_seconds: Some(-3.0),
                    max_age_seconds: Some(86400.0),
                },
                CredentialTimes {
                    agent: "bot".into(),
                    credential: "api".into(),
                    age_seconds: None,
                    next_due_seconds: Some(f64::NAN),
                    max_age_seconds: None,
                },
            ]
        }));
        let text = m.encode();
        assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 1);
        assert!(
            text.contains("keyturn_credential_age_seconds{agent=\"bot\",credential=\"db\"} 12.5"),
            "{text}"
        );
        assert!(
            text.contains(
                "keyturn_credential_next_due_seconds{agent=\"bot\",credential=\"db\"} -3.0"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "keyturn_credential_max_age_seconds{agent=\"bot\",credential=\"db\"} 86400.0"
            ),
            "{text}"
        );
        // Unknown or non-finite values (and no max_age) are omitted, not
        // exported as garbage.
        assert!(!text.contains("credential=\"api\""), "{text}");
        // A second scrape asks again (values are not cached per credential).
        m.encode();
        assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 2);
    }

    #[test]
    fn task_metrics_have_bounded_labels_and_start_at_zero() {
        let m = Metrics::new();
        let fresh = m.encode();
        assert!(
            fresh.contains("keyturn_task_revocation_overdue 0\n"),
            "{fresh}"
        );
        assert!(!fresh.contains("keyturn_tasks_active{"), "{fresh}");
        m.task_issuer_configured("bao");
        for line in [
            "keyturn_task_starts_total{issuer=\"bao\",result=\"failed\"} 0",
            "keyturn_task_revocations_total{issuer=\"bao\",result=\"failed\"} 0",
            "keyturn_task_revocations_total{issuer=\"bao\",result=\"expires\"} 0",
        ] {
            assert!(m.encode().contains(line), "missing {line:?}");
        }
        m.task_issued("bao", true);
        m.task_issued("bao", false);
        m.task_revocation("bao", TaskRevocation::Verified);
        m.set_task_figures_provider(Arc::new(|| TaskFigures {
            active: vec![("bot".into(), "bao".into(), 2)],
            revocation_overdue: 1,
        }));
        let text = m.encode();
        for line in [
            "# TYPE keyturn_tasks_active gauge",
            "keyturn_tasks_active{agent=\"bot\",issuer=\"bao\"} 2",
            "# TYPE keyturn_task_revocation_overdue gauge",
            "keyturn_task_revocation_overdue 1",
            "keyturn_task_starts_total{issuer=\"bao\",result=\"ok\"} 1",
            "keyturn_task_starts_total{issuer=\"bao\",result=\"failed\"} 1",
            "keyturn_task_revocations_total{issuer=\"bao\",result=\"verified\"} 1",
            "# HELP keyturn_task_starts Task credentials issued at start",
        ] {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }
    }

    #[test]
    fn decommission_sla_clocks_export_what_is_left_and_the_whole_sla() {
        let m = Metrics::new();
        // No provider yet: no lifecycle families at all.
        assert!(!m.encode().contains("decommission_sla"));
        m.set_lifecycle_provider(Arc::new(|| Lifecycle {
            sla_clocks: vec![
                SlaClock {
                    agent: "late".into(),
                    remaining_seconds: -30.0,
                    sla_seconds: 3600.0,
                },
                SlaClock {
                    agent: "odd".into(),
                    remaining_seconds: f64::NAN,
                    sla_seconds: 600.0,
                },
            ],
            ..Lifecycle::default()
        }));
        let text = m.encode();
        for line in [
            "keyturn_decommission_sla_remaining_seconds{agent=\"late\"} -30.0",
            "keyturn_decommission_sla_seconds{agent=\"late\"} 3600.0",
            "keyturn_decommission_sla_seconds{agent=\"odd\"} 600.0",
            "# TYPE keyturn_decommission_sla_seconds gauge",
        ] {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }
        assert!(
            !text.contains("keyturn_decommission_sla_remaining_seconds{agent=\"odd\"}"),
            "{text}"
        );
    }

    #[test]
    fn log_filter_comes_from_the_environment_first() {
        // The directives, without the ones that quieten dependencies.
        let own = |f: &EnvFilter| {
            let mut d: Vec<String> = f
                .to_string()
                .split(',')
                .filter(|d| !QUIET_TARGETS.iter().any(|t| d.starts_with(t)))
                .map(str::to_owned)
                .collect();
            d.sort();
            d.join(",")
        };
        let (f, w) = build_filter(Some("keyturn=trace"), "warn");
        assert_eq!(own(&f), "keyturn=trace");
        assert!(w.is_none());
        // Unset or blank variable: the configured filter.
        assert_eq!(own(&build_filter(None, "warn").0), "warn");
        assert_eq!(own(&build_filter(Some("  "), "warn").0), "warn");
        // A typo is reported and falls back to info instead of silencing logs.
        let (f, w) = build_filter(Some("keyturn=loud"), "warn");
        assert_eq!(own(&f), "info");
        let w = w.unwrap();
        assert!(
            w.contains("KEYTURN_LOG") && w.contains("keyturn=loud"),
            "{w}"
        );
    }

    #[test]
    fn noisy_dependencies_are_off_unless_the_filter_names_them() {
        let directives = |spec: &str| {
            let mut d: Vec<String> = build_filter(Some(spec), "info")
                .0
                .to_string()
                .split(',')
                .map(str::to_owned)
                .collect();
            d.sort();
            d
        };
        assert_eq!(
            directives("trace"),
            vec![
                "rustify=off",
                "rustls_platform_verifier=off",
                "trace",
                "vaultrs=off"
            ]
        );
        assert_eq!(
            directives("info,vaultrs=debug"),
            vec![
                "info",
                "rustify=off",
                "rustls_platform_verifier=off",
                "vaultrs=debug"
            ]
        );
    }
}
