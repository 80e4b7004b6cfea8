//! A client-side write budget: write calls spaced `1 / rate` apart (a token
//! bucket holding one token), so that no one-second window sees more than
//! the rate. A policy about shared quotas, not about any one system: a vault
//! whose service limits write calls per second (Secrets Manager allows 50
//! per account and region, shared by every client) takes one and waits for
//! a slot before each write *call* it makes. It is not a decorator around
//! the [`super::Vault`] trait because quotas count calls, and one vault
//! operation can make one or two of them (AWS: `CreateSecret` then
//! `PutSecretValue` for a first stage). Reads are not budgeted.
//!
//! Each slot taken is logged at debug level with the vault's name
//! (`KEYTURN_LOG=keyturn::vaults::budget=debug`), so an operator or a
//! benchmark can check the budget from keyturn's side.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

/// Writes are spaced this much wider than 1/budget (see [`WriteBudget::new`]).
const SPACING_MARGIN: f64 = 1.025;

/// Spaces writes `interval` apart: each caller reserves the next free slot
/// and sleeps until it. A caller that is cancelled while waiting loses its
/// slot, which only makes the budget more conservative.
#[derive(Debug)]
pub struct WriteBudget {
    /// The vault it paces, for its log records.
    vault: String,
    interval: Duration,
    next_slot: Mutex<Instant>,
    issued: AtomicU64,
}

impl WriteBudget {
    /// `None` unless `per_sec` is a positive, finite rate whose interval fits
    /// a `Duration`.
    pub fn new(vault: &str, per_sec: f64) -> Option<Self> {
        if !(per_sec.is_finite() && per_sec > 0.0) {
            return None;
        }
        // 2.5 % wider than 1/rate: with exact spacing a closed 1-s window
        // can hold budget + 1 writes (one at each end), and network jitter
        // can bring two writes closer by the time AWS counts them. The margin
        // keeps AWS's count at or under the budget for jitter up to 25 ms
        // per second of writes.
        let interval = Duration::try_from_secs_f64(SPACING_MARGIN / per_sec).ok()?;
        Some(Self {
            vault: vault.to_owned(),
            interval,
            next_slot: Mutex::new(Instant::now()),
            issued: AtomicU64::new(0),
        })
    }

    /// Reserves the next free slot at or after `now` and returns it.
    pub fn reserve(&self, now: Instant) -> Instant {
        // The critical section cannot panic; recover from poison anyway.
        let mut next = self
            .next_slot
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let slot = (*next).max(now);
        *next = slot + self.interval;
        slot
    }

    /// Waits for this caller's slot, then counts the write as issued.
    pub async fn acquire(&self) {
        let slot = self.reserve(Instant::now());
        tokio::time::sleep_until(slot).await;
        self.issued.fetch_add(1, Ordering::Relaxed);
        // With a timestamp per write, an operator (or bench/remote.py) can
        // check the budget from keyturn's side, not only from AWS's.
        tracing::debug!(vault = %self.vault, "write slot taken");
    }

    pub fn issued(&self) -> u64 {
        self.issued.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[test]
    fn bad_budgets_are_refused() {
        for bad in [0.0, -1.0, f64::NAN, f64::INFINITY, 1e-300] {
            assert!(WriteBudget::new("v", bad).is_none(), "{bad}");
        }
        assert!(WriteBudget::new("v", 25.0).is_some());
    }

    #[test]
    fn budget_spaces_slots() {
        let budget = WriteBudget::new("v", 10.0).unwrap();
        let t0 = Instant::now();
        // 21 writes asked for at once: the first now, the last after 2.05 s
        // (2.5 % margin), never more than 10 in any closed one-second window.
        let slots: Vec<Duration> = (0..21).map(|_| budget.reserve(t0) - t0).collect();
        assert_eq!(slots[0], Duration::ZERO);
        assert_eq!(slots[20], Duration::from_millis(2050));
        for w in slots.windows(11) {
            assert!(w[10] - w[0] > Duration::from_secs(1), "{w:?}");
        }
        // After a quiet spell, no burst is saved up: the next slot is "now",
        // the one after it a full interval later.
        let later = t0 + Duration::from_secs(60);
        assert_eq!(budget.reserve(later), later);
        assert_eq!(
            budget.reserve(later),
            later + Duration::from_micros(102_500)
        );
    }

    #[tokio::test]
    async fn budget_acquire_waits_and_counts() {
        let budget = Arc::new(WriteBudget::new("v", 50.0).unwrap());
        let start = std::time::Instant::now();
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..11 {
            let b = budget.clone();
            tasks.spawn(async move { b.acquire().await });
        }
        while let Some(r) = tasks.join_next().await {
            r.unwrap();
        }
        assert!(
            start.elapsed() >= Duration::from_millis(195),
            "{:?}",
            start.elapsed()
        );
        assert_eq!(budget.issued(), 11);
    }
}
