//! Crash points at every step boundary (and inside the steps where a crash
//! leaves something behind), for the crash-safety tests.
//!
//! Built only with the `failpoints` cargo feature. A test starts the daemon with
//! `FAILPOINTS=rotation.after_create=return` and the process kills itself with
//! SIGKILL at that point, exactly like `kill -9`: no destructor, no flush.

/// Every crash point, in the order a rotation passes them.
pub const FAILPOINTS: &[&str] = &[
    // Inside start, once the rotation's row is committed and before its
    // `rotation.start` record is appended (the restart must resume that
    // rotation and record its start, once).
    "rotation.start.after_row",
    "rotation.after_start",
    "rotation.before_create",
    // Inside create, once the primary vault holds the value and before the
    // other vaults do (a replay must give them the primary's value).
    "rotation.create.after_primary_stage",
    "rotation.after_create",
    "rotation.before_set",
    "rotation.after_set",
    "rotation.before_test",
    "rotation.after_test",
    "rotation.before_promote",
    // Inside promote, once the first vault has promoted and before the others.
    "rotation.promote.after_first_vault",
    "rotation.after_promote",
    "rotation.before_deliver",
    // Inside the file sink: the temp file is written and fsynced, not yet
    // renamed over the delivered file (a crash leaves it behind).
    "sink.file.before_rename",
    "rotation.after_deliver",
    "rotation.before_retire",
    "rotation.after_retire",
];

// Crash points outside rotations, each with its own kill -9 test:
// `task.start.after_mint` (an issuer minted a task's credential, its handle
// not recorded yet; `tests/tasks_e2e.rs`).

/// Kills the process here if the named failpoint is configured.
#[inline]
pub fn crash_point(name: &str) {
    #[cfg(feature = "failpoints")]
    if fail::eval(name, |_| ()).is_some() {
        tracing::warn!(failpoint = name, "failpoint hit: killing the process");
        let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
    }
    #[cfg(not(feature = "failpoints"))]
    let _ = name;
}
