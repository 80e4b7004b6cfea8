//! The signal sink's config: `deliver = [{ type = "signal", ... }]`, its check and its constructor.

use super::*;

/// `coalesce` when unset: long enough to gather the credentials of one agent
/// rotated together (`keyturn rotate AGENT`, one schedule tick), short
/// enough that the agent hears of a new value soon.
pub const DEFAULT_COALESCE: Duration = Duration::from_secs(2);
/// Every delivery waits for the window to close, so a long one holds up
/// the rotation it belongs to.
pub const MAX_COALESCE: Duration = Duration::from_secs(60);
/// The signals a consumer may be sent: those daemons use to mean "reload"
/// or "stop". Nothing that cannot be handled (SIGKILL, SIGSTOP) or that
/// means a fault (SIGSEGV, ...).
pub const SIGNALS: &[Signal] = &[
    Signal::SIGHUP,
    Signal::SIGUSR1,
    Signal::SIGUSR2,
    Signal::SIGTERM,
    Signal::SIGINT,
    Signal::SIGQUIT,
    Signal::SIGWINCH,
];

/// One `deliver = [{ type = "signal", ... }]` entry.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignalConfig {
    /// A file holding the consumer's pid; after `check`, absolute.
    pub pid_file: Option<PathBuf>,
    /// A systemd service whose `MainPID` is the consumer.
    pub unit: Option<String>,
    /// A name from [`SIGNALS`]; default SIGHUP.
    pub signal: Option<String>,
    /// Deliveries to one consumer within this long make one signal; default 2s.
    pub coalesce: Option<String>,
}

impl SignalConfig {
    pub fn pid_file(path: impl Into<PathBuf>) -> Self {
        Self {
            pid_file: Some(path.into()),
            unit: None,
            signal: None,
            coalesce: None,
        }
    }

    /// The signal, once `check` accepted the name.
    pub fn signal(&self) -> Signal {
        self.signal
            .as_deref()
            .and_then(signal_named)
            .unwrap_or(Signal::SIGHUP)
    }

    /// The coalescing window, once `check` accepted it.
    pub fn coalesce(&self) -> Duration {
        duration_value(self.coalesce.as_deref(), DEFAULT_COALESCE)
    }
}

fn signal_named(name: &str) -> Option<Signal> {
    SIGNALS.iter().copied().find(|s| s.as_str() == name)
}

/// A systemd service name as `systemctl` takes it: `name.service`, with
/// the characters of unit names (and never a leading `-`, which
/// `systemctl` would read as an option).
fn is_service_name(s: &str) -> bool {
    s.strip_suffix(".service").is_some_and(|stem| {
        !stem.is_empty()
            && !stem.starts_with('-')
            && stem
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b":-_.\\@".contains(&b))
    })
}

impl SinkPlugin for SignalConfig {
    fn check(&mut self, v: &mut Validator<'_>, p: Loc<'_>, _scope: &mut SinkScope<'_, '_>) {
        // Several credentials of an agent signal one consumer, so the
        // target is not claimed as a file sink's path is.
        match (&mut self.pid_file, &self.unit) {
            (Some(_), Some(_)) | (None, None) => v.err_key(
                p,
                "a signal sink names its process by exactly one of `pid_file` or `unit`",
            ),
            (Some(path), None) => v.resolve_path(p.key("pid_file"), path),
            (None, Some(unit)) if !is_service_name(unit) => v.err(
                p.key("unit"),
                format!(
                    "invalid unit `{unit}`: write a systemd service name such as \"invoice-bot.service\""
                ),
            ),
            (None, Some(_)) => {}
        }
        if let Some(name) = &self.signal
            && signal_named(name).is_none()
        {
            v.err(
                p.key("signal"),
                format!(
                    "unknown signal `{name}`: use one of {}",
                    list(SIGNALS.iter().map(|s| s.as_str()))
                ),
            );
        }
        if let Some(text) = &self.coalesce {
            let at = p.key("coalesce");
            if let Some(d) = v.duration(at, text, Zero::Allowed)
                && d > MAX_COALESCE
            {
                v.err(
                    at,
                    format!(
                        "coalesce `{text}` is longer than {}: every delivery waits for the window, so keep it short",
                        humantime::format_duration(MAX_COALESCE)
                    ),
                );
            }
        }
    }

    fn build(self: Box<Self>, ctx: &SinkContext<'_>) -> Result<Arc<dyn Sink>, PluginError> {
        Ok(Arc::new(SignalSink::new(*self, ctx)))
    }
}
