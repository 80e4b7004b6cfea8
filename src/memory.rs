//! Giving freed heap back to the operating system, decided in one place.
//!
//! glibc keeps freed memory for reuse and returns it only from the top of
//! each arena. After work that allocated and freed a lot, the pages in
//! between stay resident although nothing uses them: a config load (the
//! parse structures of 100k credentials are hundreds of MB, on the parsing
//! threads' arenas), a burst of rotations, or a big control response (the
//! status of 100k credentials is ~70 MB of rows and JSON while it is built
//! and written). `malloc_trim` releases every whole free page in every
//! arena; it takes milliseconds, so it runs after such work, never on a
//! timer:
//! - at once after a config load (start-up, reload);
//! - one quiet second (no other report) after a burst of at least
//!   [`TRIM_AFTER_JOBS`] jobs or control responses of at least
//!   [`TRIM_AFTER_RESPONSE_BYTES`] in all, or after any jobs at most once a
//!   minute, so that a steady trickle of rotations does not trim after each
//!   one.
//!
//! Every report postpones the decision, so the trim runs after the last of
//! overlapping work: a trim while a big response is still being built would
//! leave that response's pages resident once it is freed.
//!
//! A trim gives back whole free pages only: a page that holds one live
//! object among freed ones stays. So the config load, the biggest such
//! work, runs [`apart`] from the long-lived objects made of it.
//!
//! Two limits of glibc shape the rest ([`configure`], and where big
//! transient work runs):
//! - `malloc_trim` shrinks the free *top* of the main arena only. A thread
//!   arena's top (where a thread's freed small chunks end up once the trim
//!   consolidates them) goes back only from `free` of a large chunk, and
//!   only above the trim threshold. Big transient work that can run on the
//!   daemon's main thread (the state snapshot at start-up) runs there.
//! - By default glibc raises its mmap threshold to the largest block freed
//!   (up to 32 MiB) and its trim threshold to twice that: after one status
//!   of 100k credentials, buffers of up to 32 MiB come from an arena and a
//!   thread arena keeps up to 64 MiB free at its top, out of the trim's
//!   reach (~20 MB more idle RSS at 100k). [`configure`] fixes both at
//!   [`MALLOC_THRESHOLD`].

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A burst of at least this many jobs ends with a trim...
const TRIM_AFTER_JOBS: usize = 64;
/// ...and fewer jobs at most this often.
const TRIM_AT_MOST_EVERY: Duration = Duration::from_secs(60);
/// Control responses of at least this many bytes in all end with a trim
/// (the heap they used is a few times their JSON).
const TRIM_AFTER_RESPONSE_BYTES: usize = 1 << 20;
/// How long the work must have stopped before the trim.
const QUIET: Duration = Duration::from_secs(1);

/// What just freed heap.
#[derive(Debug, Clone, Copy)]
pub enum Freed {
    /// The config was parsed and validated (start-up, reload).
    ConfigLoad,
    /// This many jobs finished and the engine is idle.
    Jobs(usize),
    /// A control response of this many bytes was written and dropped.
    Response(usize),
}

#[derive(Debug)]
struct Policy {
    /// Jobs and response bytes since the last trim.
    jobs: usize,
    response_bytes: usize,
    last_trim: Option<Instant>,
    /// Bumped by every report; a delayed decision is dropped when it is stale.
    generation: u64,
}

impl Policy {
    const fn new() -> Policy {
        Policy {
            jobs: 0,
            response_bytes: 0,
            last_trim: None,
            generation: 0,
        }
    }

    /// Counts a report; returns the generation its delayed decision checks.
    fn report(&mut self, what: Freed) -> u64 {
        match what {
            Freed::ConfigLoad => {}
            Freed::Jobs(n) => self.jobs += n,
            Freed::Response(bytes) => self.response_bytes += bytes,
        }
        self.generation += 1;
        self.generation
    }

    /// The decision [`QUIET`] after the report of `generation`: trim if no
    /// report came since and the work since the last trim is worth it.
    fn decide(&mut self, generation: u64, now: Instant) -> bool {
        let due = self.generation == generation
            && (self.jobs >= TRIM_AFTER_JOBS
                || self.response_bytes >= TRIM_AFTER_RESPONSE_BYTES
                || (self.jobs > 0
                    && self
                        .last_trim
                        .is_none_or(|t| now.duration_since(t) >= TRIM_AT_MOST_EVERY)));
        if due {
            self.trimmed(now);
        }
        due
    }

    fn trimmed(&mut self, now: Instant) {
        self.jobs = 0;
        self.response_bytes = 0;
        self.last_trim = Some(now);
    }
}

static POLICY: Mutex<Policy> = Mutex::new(Policy::new());

fn policy() -> std::sync::MutexGuard<'static, Policy> {
    POLICY.lock().unwrap_or_else(|p| p.into_inner())
}

/// Reports work that freed heap; the policy above decides whether and when
/// it goes back to the OS.
pub fn freed(what: Freed) {
    let generation = {
        let mut p = policy();
        let generation = p.report(what);
        if let Freed::ConfigLoad = what {
            p.trimmed(Instant::now());
        }
        generation
    };
    if let Freed::ConfigLoad = what {
        release_freed_memory();
        return;
    }
    let Ok(rt) = tokio::runtime::Handle::try_current() else {
        return;
    };
    rt.spawn(async move {
        tokio::time::sleep(QUIET).await;
        if policy().decide(generation, Instant::now()) {
            let _ = tokio::task::spawn_blocking(release_freed_memory).await;
        }
    });
}

/// Runs `f` on a thread of its own and returns what it made: for a config
/// load (parse and validation), which allocates and frees hundreds of MB in
/// many small pieces.
///
/// glibc gives each thread an arena, so that heap is apart from the one of
/// the caller's thread, where the long-lived objects are made, and goes
/// back to the OS whole once it is freed. On one arena, the catalog's
/// entries filled the holes the parse left and pinned the pages around
/// them: 26 MB of free but resident heap at 100k credentials.
///
/// It takes two things of the caller:
/// - keep *copies* of what it keeps of the result, made on its own thread
///   (as [`crate::rotation::Catalog::build`] does), ids included: an
///   `Arc<str>` shared with the result pins its page;
/// - free the result at once when done, not piece by piece while the
///   copies are made: a chunk freed on the caller's thread goes to that
///   thread's cache (glibc's tcache) and is handed out again to its next
///   allocation of that size, which puts a long-lived object back among
///   the freed ones.
pub fn apart<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| match s.spawn(f).join() {
        Ok(made) => made,
        Err(panic) => std::panic::resume_unwind(panic),
    })
}

/// The mmap and trim thresholds, fixed: a thread arena keeps at most this
/// much free at its top. glibc's initial 128 KiB made the config load of
/// 100k credentials ~25 % slower (a mapping for every block above it); 1 MiB
/// costs nothing measurable there and keeps the idle RSS as low.
const MALLOC_THRESHOLD: i32 = 1024 * 1024;

/// Fixes glibc's mmap and trim thresholds (see the module's notes): blocks
/// above [`MALLOC_THRESHOLD`] are mapped and unmapped on their own, and an
/// arena's free top above it goes back on `free`. Called once at daemon
/// start, before the config load.
pub fn configure() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    for param in [libc::M_MMAP_THRESHOLD, libc::M_TRIM_THRESHOLD] {
        // SAFETY: mallopt only sets malloc's tuning parameters.
        if unsafe { libc::mallopt(param, MALLOC_THRESHOLD) } != 1 {
            tracing::warn!(param, "mallopt failed: glibc keeps its dynamic thresholds");
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

#[cfg(test)]
mod tests {
    use super::*;

    fn after(p: &mut Policy, what: Freed, at: Instant) -> bool {
        let g = p.report(what);
        p.decide(g, at)
    }

    #[test]
    fn a_burst_of_jobs_or_a_big_response_is_trimmed_after() {
        let t = Instant::now();
        let mut p = Policy::new();
        p.trimmed(t);
        assert!(after(&mut p, Freed::Jobs(TRIM_AFTER_JOBS), t));
        assert!(after(&mut p, Freed::Response(TRIM_AFTER_RESPONSE_BYTES), t));
        // Small responses add up.
        for _ in 0..3 {
            assert!(!after(
                &mut p,
                Freed::Response(TRIM_AFTER_RESPONSE_BYTES / 4),
                t
            ));
        }
        assert!(after(
            &mut p,
            Freed::Response(TRIM_AFTER_RESPONSE_BYTES / 4),
            t
        ));
    }

    #[test]
    fn a_trickle_of_jobs_is_trimmed_at_most_once_a_minute() {
        let t = Instant::now();
        let mut p = Policy::new();
        p.trimmed(t);
        assert!(!after(&mut p, Freed::Jobs(1), t + Duration::from_secs(1)));
        assert!(!after(&mut p, Freed::Jobs(1), t + Duration::from_secs(59)));
        assert!(after(&mut p, Freed::Jobs(1), t + TRIM_AT_MOST_EVERY));
        assert_eq!(p.jobs, 0);
        // Responses alone never trim by the minute.
        assert!(!after(
            &mut p,
            Freed::Response(10),
            t + 3 * TRIM_AT_MOST_EVERY
        ));
    }

    #[test]
    fn the_trim_waits_for_the_last_of_overlapping_work() {
        // The engine goes idle after a burst while a status is being built:
        // the decision of the burst is stale once the response is reported,
        // and the response's decision trims for both.
        let t = Instant::now();
        let mut p = Policy::new();
        p.trimmed(t);
        let burst = p.report(Freed::Jobs(100_000));
        let status = p.report(Freed::Response(20 << 20));
        assert!(!p.decide(burst, t + QUIET));
        assert!(p.decide(status, t + QUIET));
        assert_eq!((p.jobs, p.response_bytes), (0, 0));
    }
}
