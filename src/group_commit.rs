//! Group commit: one OS thread owns a resource that is expensive per commit
//! (an fsync, a SQLite transaction) and serves every job queued for it in one
//! batch, so that concurrent callers share the cost. The state writer, the
//! audit log and the local vault's writes all work this way; the batching
//! lives here once, and each of them says only what a batch does.
//!
//! A job carries its own answer channel; `serve` answers every job of the
//! batch (dropping a job's sender tells its caller the job was not done).
//!
//! [`GroupCommit::inline`] serves each job on the caller's thread instead, at
//! once: for tests under `tokio::time::pause()`, where waiting on another
//! thread would let the paused clock jump ahead.
//!
//! A batch forms by itself only when jobs arrive while the previous one is
//! being served. On a disk whose fsync takes a fraction of a millisecond,
//! concurrent rotations spread over time each found the server idle and
//! paid an fsync of their own. So a server that fsyncs lingers (like
//! PostgreSQL's `commit_delay` with `commit_siblings`): while more
//! rotations are running than jobs are in its batch, it waits up to its
//! linger for more. With one rotation running it never waits.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, mpsc};
use std::time::{Duration, Instant};

/// How many rotation jobs are running now (see [`Busy`]): the callers a
/// lingering server may expect a job from soon.
pub static BUSY: AtomicUsize = AtomicUsize::new(0);

/// How long a server that fsyncs waits for the jobs of other running
/// rotations: a few fsyncs' worth on a fast disk, small next to a rotation.
pub const FSYNC_LINGER: Duration = Duration::from_millis(2);

/// Counts one running job in [`BUSY`] while it lives.
#[derive(Debug)]
pub struct Busy(());

impl Busy {
    pub fn enter() -> Busy {
        BUSY.fetch_add(1, Ordering::Relaxed);
        Busy(())
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        BUSY.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Whether the server goes on after a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    Continue,
    /// Stop serving (a close request): later jobs are refused.
    Stop,
}

/// The job could not be queued: the server has stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stopped;

type Serve<J> = Box<dyn FnMut(&mut Vec<J>) -> Flow + Send>;

pub struct GroupCommit<J> {
    mode: Mode<J>,
}

enum Mode<J> {
    Thread(mpsc::Sender<J>),
    /// The serve function, and `None` once it asked to stop.
    Inline(Mutex<Option<Serve<J>>>),
}

impl<J> std::fmt::Debug for GroupCommit<J> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mode = match self.mode {
            Mode::Thread(_) => "thread",
            Mode::Inline(_) => "inline",
        };
        f.debug_struct("GroupCommit")
            .field("mode", &mode)
            .finish_non_exhaustive()
    }
}

impl<J: Send + 'static> GroupCommit<J> {
    /// Starts the thread `name`. It takes the first job queued and every
    /// other one already waiting, up to `max_batch`, and hands them to
    /// `serve`; it ends when `serve` says [`Flow::Stop`] or every handle is
    /// dropped and the queue is empty.
    pub fn spawn(
        name: &str,
        max_batch: usize,
        serve: impl FnMut(&mut Vec<J>) -> Flow + Send + 'static,
    ) -> std::io::Result<Self> {
        Self::spawn_lingering(name, max_batch, Duration::ZERO, &BUSY, serve)
    }

    /// [`spawn`](Self::spawn), but after the jobs already queued, while
    /// fewer are in the batch than `busy` counts callers (the daemon passes
    /// [`BUSY`]), the thread waits up to `linger` (in all, per batch) for more.
    pub fn spawn_lingering(
        name: &str,
        max_batch: usize,
        linger: Duration,
        busy: &'static AtomicUsize,
        mut serve: impl FnMut(&mut Vec<J>) -> Flow + Send + 'static,
    ) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel::<J>();
        std::thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || {
                let mut batch = Vec::new();
                while let Ok(first) = rx.recv() {
                    batch.push(first);
                    while batch.len() < max_batch {
                        match rx.try_recv() {
                            Ok(job) => batch.push(job),
                            Err(_) => break,
                        }
                    }
                    if !linger.is_zero() {
                        let until = Instant::now() + linger;
                        while batch.len() < max_batch.min(busy.load(Ordering::Relaxed)) {
                            let left = until.saturating_duration_since(Instant::now());
                            match rx.recv_timeout(left) {
                                Ok(job) => batch.push(job),
                                Err(_) => break,
                            }
                        }
                    }
                    let flow = serve(&mut batch);
                    batch.clear();
                    if flow == Flow::Stop {
                        // Dropping `rx` refuses every later job.
                        return;
                    }
                }
            })?;
        Ok(GroupCommit {
            mode: Mode::Thread(tx),
        })
    }

    /// Serves every job on the submitting thread, alone, before `submit`
    /// returns.
    pub fn inline(serve: impl FnMut(&mut Vec<J>) -> Flow + Send + 'static) -> Self {
        GroupCommit {
            mode: Mode::Inline(Mutex::new(Some(Box::new(serve)))),
        }
    }

    pub fn submit(&self, job: J) -> Result<(), Stopped> {
        match &self.mode {
            Mode::Thread(tx) => tx.send(job).map_err(|_| Stopped),
            Mode::Inline(serve) => {
                let mut slot = serve.lock().unwrap_or_else(|p| p.into_inner());
                let Some(serve) = slot.as_mut() else {
                    return Err(Stopped);
                };
                if serve(&mut vec![job]) == Flow::Stop {
                    *slot = None;
                }
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    /// A job: a number to add and where to send the running total.
    type Job = (u64, mpsc::Sender<u64>);

    fn summer(batches: Arc<AtomicUsize>) -> impl FnMut(&mut Vec<Job>) -> Flow + Send {
        let mut total = 0;
        move |batch: &mut Vec<Job>| {
            batches.fetch_add(1, Ordering::SeqCst);
            for (n, reply) in batch.drain(..) {
                if n == 0 {
                    return Flow::Stop;
                }
                total += n;
                let _ = reply.send(total);
            }
            Flow::Continue
        }
    }

    #[test]
    fn a_thread_serves_queued_jobs_in_batches_in_order_and_stops_when_asked() {
        let batches = Arc::new(AtomicUsize::new(0));
        let gc = GroupCommit::spawn("test-gc", 64, summer(batches.clone())).unwrap();
        let (tx, rx) = mpsc::channel();
        for n in 1..=100 {
            gc.submit((n, tx.clone())).unwrap();
        }
        let totals: Vec<u64> = (0..100).map(|_| rx.recv().unwrap()).collect();
        let want: Vec<u64> = (1..=100).map(|n| n * (n + 1) / 2).collect();
        assert_eq!(totals, want, "in order, each answered");
        assert!(batches.load(Ordering::SeqCst) <= 100);
        gc.submit((0, tx.clone())).unwrap();
        // The thread stops; a job submitted after that is refused or dropped.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while gc.submit((1, tx.clone())).is_ok() {
            assert!(std::time::Instant::now() < deadline, "never stopped");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }

    #[test]
    fn a_lingering_server_waits_for_busy_callers_but_not_alone() {
        static CALLERS: AtomicUsize = AtomicUsize::new(1);
        let batches = Arc::new(AtomicUsize::new(0));
        let gc = GroupCommit::spawn_lingering(
            "test-linger",
            64,
            Duration::from_secs(1),
            &CALLERS,
            summer(batches.clone()),
        )
        .unwrap();
        let (tx, rx) = mpsc::channel();
        // One caller: its job is served at once.
        let t = Instant::now();
        gc.submit((1, tx.clone())).unwrap();
        assert_eq!(rx.recv().unwrap(), 1);
        assert!(
            t.elapsed() < Duration::from_millis(900),
            "did not linger alone"
        );
        // Three callers: their jobs, submitted apart, share one batch.
        CALLERS.store(3, Ordering::SeqCst);
        for n in [2, 3, 4] {
            gc.submit((n, tx.clone())).unwrap();
            std::thread::sleep(Duration::from_millis(30));
        }
        assert_eq!(
            (0..3).map(|_| rx.recv().unwrap()).collect::<Vec<_>>(),
            vec![3, 6, 10]
        );
        assert_eq!(batches.load(Ordering::SeqCst), 2, "one batch for the three");
        // The linger is bounded: with callers that send nothing, a job
        // waits for the linger at most.
        CALLERS.store(64, Ordering::SeqCst);
        let t = Instant::now();
        gc.submit((5, tx.clone())).unwrap();
        assert_eq!(rx.recv().unwrap(), 15);
        assert!(t.elapsed() >= Duration::from_secs(1));
        assert!(t.elapsed() < Duration::from_secs(10));
    }

    #[test]
    fn inline_serves_on_the_caller_before_submit_returns() {
        let batches = Arc::new(AtomicUsize::new(0));
        let gc = GroupCommit::inline(summer(batches.clone()));
        let (tx, rx) = mpsc::channel();
        gc.submit((5, tx.clone())).unwrap();
        assert_eq!(rx.try_recv(), Ok(5), "answered already");
        gc.submit((0, tx.clone())).unwrap();
        assert_eq!(gc.submit((1, tx)), Err(Stopped));
        assert_eq!(batches.load(Ordering::SeqCst), 2);
    }
}
