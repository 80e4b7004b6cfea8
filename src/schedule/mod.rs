//! When each credential is due.
//!
//! - [`ScheduleSpec`]: a cron expression (5-field standard or 6-field with
//!   seconds) or a fixed interval (`every = "6h"`), answering `next_after`.
//! - Deterministic per-credential jitter: a stable hash of the credential key
//!   picks an offset in `[0, jitter)`, so the same credential gets the same
//!   offset after every restart and a fleet does not fire in lockstep.
//! - [`TimerHeap`]: one min-heap of deadlines for all credentials (not one task
//!   per credential), with cheap rescheduling.
//! - Catch-up: overdue rotations found at start-up are spread over a window.

mod heap;
mod spec;

pub use heap::TimerHeap;
pub use spec::{ScheduleSpec, catch_up_times, jitter_offset};
