//! Giving freed heap back to the operating system, decided in one place.
//!
//! glibc keeps freed memory for reuse and returns it only from the top of
//! each arena. After work that allocated and freed a lot, the pages in
//! between stay resident although nothing uses them: a config load (the
//! parse structures of 100k credentials are hundreds of MB, on the parsing
//! threads' arenas), or a burst of rotations. `malloc_trim` releases every
//! whole free page in every arena; it takes milliseconds, so it runs after
//! such work, never on a timer:
//! - at once after a config load (start-up, reload);
//! - one quiet second after a burst of at least [`TRIM_AFTER_JOBS`] jobs, or
//!   after any jobs at most once a minute, so that a steady trickle of
//!   rotations does not trim after each one.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A burst of at least this many jobs ends with a trim...
const TRIM_AFTER_JOBS: usize = 64;
/// ...and fewer jobs at most this often.
const TRIM_AT_MOST_EVERY: Duration = Duration::from_secs(60);
/// How long the work must have stopped before the trim.
const QUIET: Duration = Duration::from_secs(1);

/// What just freed heap.
#[derive(Debug, Clone, Copy)]
pub enum Freed {
    /// The config was parsed and validated (start-up, reload).
    ConfigLoad,
    /// This many jobs finished and the engine is idle.
    Jobs(usize),
}

struct Policy {
    jobs: usize,
    last_trim: Option<Instant>,
    /// Bumped by every report; a delayed decision is dropped when it is stale.
    generation: u64,
}

static POLICY: Mutex<Policy> = Mutex::new(Policy {
    jobs: 0,
    last_trim: None,
    generation: 0,
});

fn policy() -> std::sync::MutexGuard<'static, Policy> {
    POLICY.lock().unwrap_or_else(|p| p.into_inner())
}

/// Reports work that freed heap; the policy above decides whether and when
/// it goes back to the OS.
pub fn freed(what: Freed) {
    match what {
        Freed::ConfigLoad => {
            policy().last_trim = Some(Instant::now());
            release_freed_memory();
        }
        Freed::Jobs(n) => {
            let generation = {
                let mut p = policy();
                p.jobs += n;
                p.generation += 1;
                p.generation
            };
            let Ok(rt) = tokio::runtime::Handle::try_current() else {
                return;
            };
            rt.spawn(async move {
                tokio::time::sleep(QUIET).await;
                let trim = {
                    let mut p = policy();
                    let due = p.generation == generation
                        && (p.jobs >= TRIM_AFTER_JOBS
                            || (p.jobs > 0
                                && p.last_trim
                                    .is_none_or(|t| t.elapsed() >= TRIM_AT_MOST_EVERY)));
                    if due {
                        p.jobs = 0;
                        p.last_trim = Some(Instant::now());
                    }
                    due
                };
                if trim {
                    let _ = tokio::task::spawn_blocking(release_freed_memory).await;
                }
            });
        }
    }
}

/// Releases free heap pages of every malloc arena.
fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free heap pages; no pointer is touched.
    unsafe {
        libc::malloc_trim(0);
    }
}
