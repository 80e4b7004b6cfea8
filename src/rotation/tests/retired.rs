//! A decommissioned agent's rotations stop for good, under paused time: one
//! waiting out a back-off stops at once and one mid-step stops right after
//! the step, each recorded as abandoned; no timer fires for it again, a
//! manual trigger is refused, and the other agents go on.

use super::*;

#[tokio::test(start_paused = true)]
async fn stopping_an_agent_abandons_its_rotation_in_flight_and_nothing_of_it_runs_again() {
    let rig = Rig::new(2, "every = \"1h\"").await;
    rig.run().await;
    rig.until(Duration::from_secs(30), "first versions", |r| {
        r.sink.count() == 2
    })
    .await;
    // c0's next rotation keeps failing at `stage`: it waits out back-offs.
    rig.vault.fail("stage", 100, ErrorKind::Transient, None);
    let waiter = rig.engine.trigger(&key("c0")).unwrap();
    rig.until(Duration::from_secs(30), "c0 retrying", |r| {
        r.vault.times("stage", Some(&path("c0"))).len() >= 2
    })
    .await;
    let agent = key("c0").agent.clone();
    let before = Instant::now();
    rig.engine.stop_agent(&agent, "decommissioning").await;
    assert!(
        Instant::now() - before < Duration::from_secs(1),
        "the back-off is cut short, not waited out"
    );
    let done = waiter.await.unwrap();
    assert!(
        done.error
            .as_deref()
            .unwrap_or_default()
            .contains("decommissioned"),
        "{done:?}"
    );
    // Recorded as abandoned: finished, with the reason, audited.
    let why = abandoned(&rig);
    assert!(why.contains("abandoned at step create"), "{why}");
    let audit = std::fs::read_to_string(rig.dir.path().join("audit.log")).unwrap();
    assert!(audit.contains("\"event\":\"rotation.abandoned\""));
    // Nothing of the agent runs again: no timer, no manual trigger.
    let stages = rig.vault.times("stage", None).len();
    assert!(rig.engine.trigger(&key("c1")).is_none(), "refused");
    tokio::time::sleep(3 * HOUR).await;
    assert_eq!(rig.vault.times("stage", None).len(), stages);
    assert_eq!(rig.status("c0").state, "decommissioning");
    assert_eq!(rig.status("c1").state, "decommissioning");
    rig.engine.set_agent_label(&agent, "decommissioned");
    assert_eq!(rig.status("c1").state, "decommissioned");
    rig.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_step_in_flight_finishes_and_the_rotation_stops_right_after_it() {
    let rig = Rig::single().await;
    rig.run().await;
    rig.until(Duration::from_secs(30), "first version", |r| {
        r.sink.count() == 1
    })
    .await;
    rig.vault.slow("stage", Duration::from_secs(5));
    let waiter = rig.engine.trigger(&key("c0")).unwrap();
    rig.until(Duration::from_secs(10), "staging", |r| {
        r.vault.times("stage", None).len() == 2
    })
    .await;
    let started = Instant::now();
    rig.engine
        .stop_agent(&key("c0").agent, "decommissioning")
        .await;
    let waited = Instant::now() - started;
    assert!(
        waited >= Duration::from_secs(4) && waited < Duration::from_secs(6),
        "returns once the step in flight is over: {waited:?}"
    );
    assert!(waiter.await.unwrap().error.is_some());
    // The step it was in finished; nothing after it ran.
    assert_eq!(rig.vault.times("promote", None).len(), 1, "only v1's");
    assert_eq!(rig.sink.count(), 1);
    let why = abandoned(&rig);
    assert!(
        why.contains("abandoned at step set") || why.contains("abandoned at step promote"),
        "{why}"
    );
    rig.shutdown().await;
}

/// Defect: a rotation parked after its retries when its agent was
/// decommissioned got no `rotation.abandoned` record (its trail in the
/// audit log never closed), and status kept showing its old step error
/// under the credential being revoked. It is recorded as abandoned, and
/// the step error is no longer shown.
#[tokio::test(start_paused = true)]
async fn a_parked_rotation_is_recorded_as_abandoned_and_its_error_no_longer_shown() {
    let rig = Rig::single().await;
    rig.vault.fail("stage", 1000, ErrorKind::Transient, None);
    rig.run().await;
    rig.until(Duration::from_secs(30), "parked", |r| {
        r.status("c0").state == "failed"
    })
    .await;
    let parked = rig.status("c0");
    let rotation = parked.rotation.clone().expect("a parked rotation");
    assert!(parked.last_error.is_some());
    rig.engine
        .stop_agent(&key("c0").agent, "decommissioning")
        .await;
    let why = abandoned(&rig);
    assert!(why.contains("abandoned at step create"), "{why}");
    let audit = std::fs::read_to_string(rig.dir.path().join("audit.log")).unwrap();
    let records: Vec<serde_json::Value> = audit
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .filter(|r: &serde_json::Value| r["event"] == "rotation.abandoned")
        .collect();
    assert_eq!(records.len(), 1, "{audit}");
    assert_eq!(records[0]["rotation"], rotation.as_str());
    let s = rig.status("c0");
    assert_eq!(s.state, "decommissioning");
    assert_eq!((s.step, s.last_error), (None, None));
    // Not again at the next start (the revocation stops the agent again).
    rig.engine
        .stop_agent(&key("c0").agent, "decommissioning")
        .await;
    let audit = std::fs::read_to_string(rig.dir.path().join("audit.log")).unwrap();
    assert_eq!(audit.matches("\"rotation.abandoned\"").count(), 1);
    rig.shutdown().await;
}

/// The error c0's latest rotation finished with: asserts it finished.
fn abandoned(rig: &Rig) -> String {
    let latest = rig.store.latest_rotation(&key("c0")).unwrap().unwrap();
    assert_eq!(latest.step, Step::Done, "{latest:?}");
    latest.last_error.unwrap_or_default()
}

/// `n` credentials due hourly, built on `rig`'s directory, vault and sink:
/// the catalog a reload swaps in.
fn catalog_of(rig: &Rig, n: usize) -> Catalog {
    let text = config_text(rig.dir.path(), n, "every = \"1h\"", "");
    catalog_with(rig.dir.path(), &text, &rig.vault, &rig.sink, &[])
}

/// Defect: a credential that left the config (by a reload, or while the
/// daemon was down) keeps its current version where it is until its agent
/// is decommissioned, yet `keyturn surface` and the metrics counted it
/// nowhere. It is listed, and counted as a live version, until it comes
/// back into the config or its agent is decommissioned.
#[tokio::test(start_paused = true)]
async fn a_credential_that_left_the_config_still_counts_as_live_until_its_agent_is_decommissioned()
{
    let rig = Rig::new(2, "every = \"1h\"").await;
    rig.run().await;
    rig.until(Duration::from_secs(30), "first versions", |r| {
        r.sink.count() == 2
    })
    .await;
    assert_eq!(rig.engine.live_totals(rig.engine.now()).0, 2);
    let left = |rig: &Rig| -> Vec<(CredentialKey, VersionNo)> {
        rig.engine
            .unconfigured_live()
            .into_iter()
            .map(|(k, u)| (k, u.version))
            .collect()
    };
    assert!(left(&rig).is_empty());
    // c1 leaves the config by a reload.
    rig.engine.reload(catalog_of(&rig, 1)).await;
    assert_eq!(left(&rig), vec![(key("c1"), 1)]);
    assert_eq!(rig.engine.live_totals(rig.engine.now()).0, 2);
    // A restart finds it in state.
    let rig = rig.restart(1, "every = \"1h\"").await;
    rig.run().await;
    assert_eq!(left(&rig), vec![(key("c1"), 1)]);
    assert_eq!(rig.engine.live_totals(rig.engine.now()).0, 2);
    // Back in the config, it is counted as configured again, once.
    rig.engine.reload(catalog_of(&rig, 2)).await;
    assert!(left(&rig).is_empty());
    assert_eq!(rig.engine.live_totals(rig.engine.now()).0, 2);
    // Gone again, then its agent decommissioned: nothing of it is live.
    rig.engine.reload(catalog_of(&rig, 1)).await;
    assert_eq!(left(&rig), vec![(key("c1"), 1)]);
    let agent = key("c0").agent.clone();
    rig.engine.stop_agent(&agent, "decommissioning").await;
    assert_eq!(left(&rig), vec![(key("c1"), 1)], "live until revoked");
    rig.engine.set_agent_label(&agent, "decommissioned");
    assert!(left(&rig).is_empty());
    assert_eq!(rig.engine.live_totals(rig.engine.now()).0, 0);
    rig.shutdown().await;
}
