//! End-to-end tests of the ways operators break things, on the real binary:
//! manual rotations racing the scheduler, reloads that remove and re-add
//! credentials, `kill -9` mid-delivery, status while the config is invalid.
//! (The random kill -9 soak is `tests/chaos.rs`; a full disk is
//! `tests/disk_full.rs`.)

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use common::*;

/// `n` credentials of agent `bot`, each `every`/`jitter`, one file each.
fn creds(n: usize, every: &str, jitter: &str, grace: &str) -> String {
    let mut s =
        String::from("[agents.bot]\nowner = \"o@example.com\"\ntenant = \"t\"\ntier = \"high\"\n");
    for i in 0..n {
        s.push_str(&cred(i, every, jitter, grace));
    }
    s
}

fn cred(i: usize, every: &str, jitter: &str, grace: &str) -> String {
    format!(
        "[agents.bot.credentials.c{i}]\nvault = \"local\"\ngenerate = {{ kind = \"password\", length = 16 }}\nevery = \"{every}\"\njitter = \"{jitter}\"\ngrace = \"{grace}\"\ndeliver = [{{ type = \"file\", path = \"{{root}}/bot/c{i}\" }}]\n"
    )
}

fn ts(record: &serde_json::Value) -> DateTime<Utc> {
    record["ts"]
        .as_str()
        .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
        .map(|t| t.with_timezone(&Utc))
        .unwrap_or_else(|| panic!("audit record without a ts: {record}"))
}

/// The `rotation.start` records of each credential: (time, trigger).
fn starts(env: &Env) -> BTreeMap<String, Vec<(DateTime<Utc>, String)>> {
    let mut by_cred: BTreeMap<String, Vec<(DateTime<Utc>, String)>> = BTreeMap::new();
    for r in audit_records(env) {
        if r["event"] != "rotation.start" {
            continue;
        }
        let trigger = r["detail"]
            .as_str()
            .and_then(|d| d.strip_prefix("trigger="))
            .unwrap_or("?")
            .to_owned();
        let cred = r["credential"].as_str().unwrap_or("?").to_owned();
        by_cred.entry(cred).or_default().push((ts(&r), trigger));
    }
    by_cred
}

/// Defect: a manual rotation left the credential's old timer armed, so it
/// rotated on two interleaved schedules from then on. Every scheduled start
/// must come at least `every - jitter` after the start before it (the
/// interval counts from delivery, minus the credential's jitter offset).
#[test]
fn manual_rotations_never_put_a_credential_on_two_schedules() {
    const N: usize = 20;
    let env = Env::new(&creds(N, "4s", "1s", "0s"));
    let daemon = env.start();
    for i in 0..N {
        wait_version(&env, "bot", &format!("c{i}"), 1);
    }
    // One manual rotation, then `rotate all`, at different points of the
    // credentials' schedules.
    let out = env.cli(&["rotate", "bot/c0", "--wait"]);
    assert!(out.status.success(), "{out:?}");
    std::thread::sleep(Duration::from_millis(1300));
    let out = env.cli(&["rotate", "all", "--wait"]);
    assert!(out.status.success(), "{out:?}");
    std::thread::sleep(Duration::from_millis(700));
    let out = env.cli(&["rotate", "bot", "--wait"]);
    assert!(out.status.success(), "{out:?}");
    // Long enough for three scheduled rotations of every credential.
    std::thread::sleep(Duration::from_secs(13));
    daemon.stop();

    let min_gap = chrono::Duration::milliseconds(3000);
    let mut scheduled = 0;
    let mut too_close = Vec::new();
    for (cred, starts) in starts(&env) {
        for pair in starts.windows(2) {
            let ((prev, _), (at, trigger)) = (&pair[0], &pair[1]);
            if trigger != "schedule" {
                continue;
            }
            scheduled += 1;
            if *at - *prev < min_gap {
                too_close.push(format!(
                    "{cred}: {trigger} start {} ms after the previous one",
                    (*at - *prev).num_milliseconds()
                ));
            }
        }
    }
    assert!(
        too_close.is_empty(),
        "scheduled starts closer than every - jitter (3 s):\n{}",
        too_close.join("\n")
    );
    // The test only means something if the schedules ran.
    assert!(
        scheduled >= 2 * N,
        "only {scheduled} scheduled starts were seen"
    );
}
