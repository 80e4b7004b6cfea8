//! The engine's wall clock, injected so that engine tests can run under
//! `tokio::time::pause()`: with [`TokioClock`], the time the engine schedules
//! by moves exactly as tokio's paused clock does (`advance`, and the jump to
//! the next timer when every task waits), so a test of a 6-hour schedule runs
//! in milliseconds and the same way every time.

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

/// Wall time that advances with tokio's clock, from `start`.
#[derive(Debug, Clone, Copy)]
pub struct TokioClock {
    start: DateTime<Utc>,
    at: tokio::time::Instant,
}

impl TokioClock {
    /// Reads tokio's clock now: call it inside the runtime.
    pub fn starting_at(start: DateTime<Utc>) -> Self {
        TokioClock {
            start,
            at: tokio::time::Instant::now(),
        }
    }
}

impl Clock for TokioClock {
    fn now(&self) -> DateTime<Utc> {
        let elapsed = tokio::time::Instant::now().duration_since(self.at);
        self.start + chrono::Duration::from_std(elapsed).unwrap_or(chrono::Duration::MAX)
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
