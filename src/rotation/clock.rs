//! The engine's wall clock, injected so that engine tests can run under
//! `tokio::time::pause()`: with [`TokioClock`], the time the engine schedules
//! by moves exactly as tokio's paused clock does (`advance`, and the jump to
//! the next timer when every task waits), so a test of a 6-hour schedule runs
//! in milliseconds and the same way every time.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use chrono::{DateTime, Utc};

pub trait Clock: Send + Sync {
    fn now(&self) -> DateTime<Utc>;
}

/// The system's wall clock: what the daemon runs on.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }
}

/// Wall time that advances with tokio's clock, from `start`, plus the
/// steps a test made it take ([`TokioClock::step_forward`]: a VM resumed
/// from suspend, NTP stepping a clock that was behind). Clones share the
/// steps.
#[derive(Debug, Clone)]
pub struct TokioClock {
    start: DateTime<Utc>,
    at: tokio::time::Instant,
    stepped_ms: Arc<AtomicI64>,
}

impl TokioClock {
    /// Reads tokio's clock now: call it inside the runtime.
    pub fn starting_at(start: DateTime<Utc>) -> Self {
        TokioClock {
            start,
            at: tokio::time::Instant::now(),
            stepped_ms: Arc::default(),
        }
    }

    /// Moves the wall time `by` ahead at once, while tokio's clock (the
    /// monotonic one timers run on) does not move.
    pub fn step_forward(&self, by: std::time::Duration) {
        let ms = i64::try_from(by.as_millis()).unwrap_or(i64::MAX);
        self.stepped_ms.fetch_add(ms, Ordering::Relaxed);
    }

    /// Moves the wall time `by` back at once (a clock that ran ahead set
    /// right), while tokio's clock does not move.
    pub fn step_back(&self, by: std::time::Duration) {
        let ms = i64::try_from(by.as_millis()).unwrap_or(i64::MAX);
        self.stepped_ms.fetch_sub(ms, Ordering::Relaxed);
    }
}

impl Clock for TokioClock {
    fn now(&self) -> DateTime<Utc> {
        let elapsed = tokio::time::Instant::now().duration_since(self.at);
        let stepped = chrono::Duration::milliseconds(self.stepped_ms.load(Ordering::Relaxed));
        self.start + chrono::Duration::from_std(elapsed).unwrap_or(chrono::Duration::MAX) + stepped
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_tokio_clock_moves_with_paused_time() {
        let start = DateTime::from_timestamp(1_800_000_000, 0).unwrap();
        let clock = TokioClock::starting_at(start);
        assert_eq!(clock.now(), start);
        tokio::time::advance(Duration::from_secs(90)).await;
        assert_eq!(clock.now(), start + chrono::Duration::seconds(90));
        // Auto-advance: a sleep with nothing else to do completes at once.
        tokio::time::sleep(Duration::from_secs(3600)).await;
        assert_eq!(clock.now(), start + chrono::Duration::seconds(3690));
    }
}
