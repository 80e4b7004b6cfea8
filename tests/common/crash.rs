//! The kill -9 harness: the daemon is killed at a failpoint in the middle of
//! a rotation, restarted, and must finish that rotation with exactly one new
//! version. `tests/crash_safety.rs` runs it on local vaults and
//! `tests/real_faults.rs` on the real servers; each brings the checks of its
//! own vaults, the harness does the rest.
//!
//! Needs the binary built with `--features failpoints`: with
//! `FAILPOINTS=<name>=return` the daemon SIGKILLs itself at that point (see
//! `keyturn::rotation::crash_point`), exactly like `kill -9`.

use std::os::unix::process::ExitStatusExt;
use std::panic::AssertUnwindSafe;
use std::sync::Mutex;
use std::time::Duration;

use keyturn::model::{CredentialKey, Stage};
use keyturn::rotation::FAILPOINTS;

use super::{
    Env, audit_records, audit_verifies, bot_key, delivered_json, stages, temp_files, wait_settled,
};

/// The one credential a crash case rotates: `bot/db`, delivered as JSON to
/// `{root}/bot/db.json`.
pub fn bot_db() -> CredentialKey {
    bot_key("db")
}

/// One crash case on `env`, whose config holds [`bot_db`] only, with
/// `grace = "0s"` (so a settled rotation has retired its previous version)
/// and a target (without one the engine skips `set` and `test`, and their
/// failpoints are never reached):
///
/// 1. a first run rotates to version 1 and is stopped; `at_version_1`
///    inspects the vaults and returns what `resumed` compares against;
/// 2. a second run, with `failpoint` armed, is asked to rotate: the rotation
///    must not succeed (only a retire failpoint comes after delivery), the
///    daemon must die of SIGKILL, and its log must name the failpoint;
/// 3. a third run must resume to version 2 with the previous one retired;
/// 4. with the daemon stopped, `resumed` asserts that each vault holds
///    exactly one new version and that they agree, and returns the current
///    value. The harness then asserts that the state database holds version
///    1 retired and 2 current, the delivered file holds version 2 with that
///    value, no temp file (a full secret) is left in the delivery root, and
///    the audit chain verifies.
pub fn kill_9_and_resume<B>(
    env: &Env,
    failpoint: &str,
    at_version_1: impl FnOnce() -> B,
    resumed: impl FnOnce(B) -> Vec<u8>,
) {
    let first = env.start();
    wait_settled(env, 1, &["idle"]);
    first.stop();
    let before = at_version_1();

    let out = killed_at(env, failpoint, || env.cli(&["rotate", "bot/db", "--wait"]));
    if !failpoint.contains("retire") {
        // Retiring the previous version happens after delivery (after grace),
        // so only at the retire failpoints may `rotate --wait` have succeeded.
        assert_ne!(
            out.status.code(),
            Some(0),
            "{failpoint}: the rotation cannot have succeeded"
        );
    }

    let again = env.start();
    // grace = 0: idle at version 2 means the previous version is retired too.
    wait_settled(env, 2, &["idle"]);
    again.stop();

    let current = resumed(before);
    assert_eq!(
        stages(env, &bot_db()),
        vec![(1, Stage::Retired), (2, Stage::Current)],
        "{failpoint}: state"
    );
    let delivered = delivered_json(env, "bot/db.json");
    assert_eq!(delivered["version"], 2, "{failpoint}: delivered version");
    assert_eq!(
        delivered["value"].as_str().map(str::as_bytes),
        Some(current.as_slice()),
        "{failpoint}: the delivered file holds the vaults' current value"
    );
    let temps = temp_files(env);
    assert!(temps.is_empty(), "{failpoint}: temp files left: {temps:?}");
    audit_verifies(env, failpoint);
    every_rotation_started_once_and_ended(env, failpoint);
}

/// Starts `env`'s daemon with `failpoint` armed, runs `trigger` (which must
/// make the daemon reach it) and asserts that the daemon died there, of
/// SIGKILL, like `kill -9`. Returns what `trigger` returned.
pub fn killed_at<T>(env: &Env, failpoint: &str, trigger: impl FnOnce() -> T) -> T {
    let mut doomed = env.start_with(&[("FAILPOINTS", &format!("{failpoint}=return"))]);
    let out = trigger();
    let status = doomed.wait_exit(Duration::from_secs(30));
    let killed_log = doomed.log_text();
    let status = status
        .unwrap_or_else(|| panic!("{failpoint}: the daemon was not killed; log:\n{killed_log}"));
    assert_eq!(
        status.signal(),
        Some(libc::SIGKILL),
        "{failpoint}: the daemon died of SIGKILL ({status}); log:\n{killed_log}"
    );
    assert!(
        killed_log.contains(failpoint),
        "{failpoint}: not reached; log:\n{killed_log}"
    );
    out
}

/// Every rotation the audit log names has its `rotation.start` record
/// exactly once and ended (`rotation.deliver`, or `rotation.abandoned`),
/// and no version was started by two rotations. A start recorded for a
/// rotation the state database never had is a rotation that never ends,
/// whose version another rotation then makes.
pub fn every_rotation_started_once_and_ended(env: &Env, what: &str) {
    use std::collections::BTreeMap;
    let records = audit_records(env);
    let mut events: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut starters: BTreeMap<(String, u64), Vec<String>> = BTreeMap::new();
    for r in &records {
        let Some(id) = r["rotation"].as_str() else {
            continue;
        };
        let event = r["event"].as_str().unwrap_or_default().to_owned();
        if event == "rotation.start" {
            let made = (
                format!(
                    "{}/{}",
                    r["agent"].as_str().unwrap_or_default(),
                    r["credential"].as_str().unwrap_or_default()
                ),
                r["version"].as_u64().unwrap_or_default(),
            );
            starters.entry(made).or_default().push(id.to_owned());
        }
        let ok = r["outcome"] == "ok";
        events.entry(id.to_owned()).or_default().push(if ok {
            event
        } else {
            format!("{event} (failed)")
        });
    }
    for (id, evs) in &events {
        let starts = evs.iter().filter(|e| *e == "rotation.start").count();
        assert_eq!(
            starts, 1,
            "{what}: rotation {id} has {starts} start records: {evs:?}"
        );
        assert!(
            evs.iter()
                .any(|e| e == "rotation.deliver" || e.starts_with("rotation.abandoned")),
            "{what}: rotation {id} never ended: {evs:?}"
        );
    }
    for ((cred, version), ids) in &starters {
        assert_eq!(
            ids.len(),
            1,
            "{what}: version {version} of {cred} was started by {} rotations: {ids:?}",
            ids.len()
        );
    }
}

/// Runs `case` at every failpoint, four at a time (each case makes its own
/// Env and daemon), and fails naming every failpoint that failed, not just
/// the first.
pub fn at_every_failpoint(case: impl Fn(&str) + Sync) {
    let queue = Mutex::new(FAILPOINTS.to_vec());
    let failures = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| {
                loop {
                    let Some(fp) = queue.lock().unwrap().pop() else {
                        return;
                    };
                    if let Err(e) = std::panic::catch_unwind(AssertUnwindSafe(|| case(fp))) {
                        let msg = e
                            .downcast_ref::<String>()
                            .cloned()
                            .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                            .unwrap_or_default();
                        failures.lock().unwrap().push(format!("{fp}: {msg}"));
                    }
                }
            });
        }
    });
    let failures = failures.into_inner().unwrap();
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}
