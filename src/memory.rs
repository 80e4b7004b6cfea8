//! Giving freed heap back to the operating system.
//!
//! glibc keeps freed memory for reuse and returns it only from the top of
//! each arena. After a burst that allocated and freed a lot (loading a big
//! config, a few thousand rotations), the pages in between stay resident
//! although nothing uses them. `malloc_trim` releases every whole free page
//! in every arena; it takes milliseconds, so it runs after bursts, not on a
//! timer.

/// Releases free heap pages of every malloc arena.
pub fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free heap pages; no pointer is touched.
    unsafe {
        libc::malloc_trim(0);
    }
}
