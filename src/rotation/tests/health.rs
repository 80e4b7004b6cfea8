//! Rotation health under paused time: the alert conditions the engine
//! reports (failing rotations, versions near or past `max_age`, holdouts),
//! their severities, their stable `since` (also across a restart) and
//! `next_change`; and the abandonment of a rotation whose staged version
//! vanished while it was parked.

use super::*;
use crate::alerts::{Alert, Conditions, Severity};
use crate::audit::Actor;
use crate::rotation::{ACK_HOLDOUTS, CREDENTIAL_EXPIRED, CREDENTIAL_EXPIRING, ROTATION_FAILING};

const MINUTE: Duration = Duration::from_secs(60);

fn rig_in(schedule: &str, rules: &str, extra: &[Arc<dyn Sink>]) -> Rig {
    Rig::in_dir_with(
        tempfile::tempdir().unwrap(),
        1,
        schedule,
        &format!("[alert_rules]\n{rules}\n"),
        Arc::new(MemoryStore::new()),
        Arc::default(),
        extra,
    )
}

fn at(d: Duration) -> DateTime<Utc> {
    t0() + chrono::Duration::from_std(d).unwrap()
}

fn names(c: &Conditions) -> Vec<(&str, Severity)> {
    c.firing
        .iter()
        .map(|a| (a.name.as_str(), a.severity))
        .collect()
}

fn only<'a>(c: &'a Conditions, name: &str) -> &'a Alert {
    let found: Vec<&Alert> = c.firing.iter().filter(|a| a.name == name).collect();
    assert_eq!(found.len(), 1, "one {name} in {:?}", c.firing);
    found[0]
}

/// Each failed rotation counts; at `failures_warning` (2) a warning fires,
/// at `failures_critical` (3) it pages; its start is the first failure and
/// stays put; a success makes it disappear.
#[tokio::test(start_paused = true)]
async fn failures_warn_at_two_page_at_three_and_a_success_clears_them() {
    let rig = rig_in(
        "every = \"6h\"",
        "failures_warning = 2\nfailures_critical = 3",
        &[],
    );
    // Refused without retries: every trigger is one failed rotation.
    rig.vault.fail("stage", 3, ErrorKind::Unauthorized, None);
    assert!(rig.rotate_c0().await.error.is_some());
    let one = rig.engine.health_conditions(at(MINUTE));
    assert!(one.firing.is_empty(), "one failure is not enough: {one:?}");

    tokio::time::sleep(10 * MINUTE).await;
    assert!(rig.rotate_c0().await.error.is_some());
    let two = rig.engine.health_conditions(at(11 * MINUTE));
    assert_eq!(names(&two), vec![(ROTATION_FAILING, Severity::Warning)]);
    let a = only(&two, ROTATION_FAILING);
    assert_eq!(a.since, t0(), "the run began with the first failure");
    assert_eq!(
        (a.agent.as_deref(), a.credential.as_deref()),
        (Some("bot"), Some("c0"))
    );
    assert_eq!(
        (a.tenant.as_deref(), a.tier.as_deref()),
        (Some("acme"), Some("high"))
    );
    assert!(a.description.contains("unauthorized"), "{}", a.description);
    assert_eq!(
        two.next_change, None,
        "no max_age: nothing happens by the clock"
    );
    // Asked again later, the same condition with the same start and key.
    let again = rig.engine.health_conditions(at(15 * MINUTE));
    assert_eq!(only(&again, ROTATION_FAILING).since, t0());
    assert_eq!(only(&again, ROTATION_FAILING).dedup_key(), a.dedup_key());

    tokio::time::sleep(10 * MINUTE).await;
    assert!(rig.rotate_c0().await.error.is_some());
    let three = rig.engine.health_conditions(at(21 * MINUTE));
    assert_eq!(names(&three), vec![(ROTATION_FAILING, Severity::Critical)]);
    assert_eq!(only(&three, ROTATION_FAILING).since, t0());

    let ok = rig.rotate_c0().await;
    assert_eq!((ok.error, ok.version), (None, Some(1)));
    let healthy = rig.engine.health_conditions(at(22 * MINUTE));
    assert!(healthy.firing.is_empty(), "{healthy:?}");
    rig.shutdown().await;
}

/// The answer is reused while nothing it reads changed, and follows each
/// of its inputs: the alert rules of a reload (a new catalog), a retired
/// agent, a rotation's outcome.
#[tokio::test(start_paused = true)]
async fn the_reused_answer_follows_a_reload_a_retirement_and_a_rotation() {
    let rig = rig_in("every = \"6h\"", "failures_warning = 2", &[]);
    rig.vault.fail("stage", 2, ErrorKind::Unauthorized, None);
    assert!(rig.rotate_c0().await.error.is_some());
    assert!(rig.rotate_c0().await.error.is_some());
    let failing = rig.engine.health_conditions(at(MINUTE));
    assert_eq!(names(&failing), vec![(ROTATION_FAILING, Severity::Warning)]);
    let again = rig.engine.health_conditions(at(2 * MINUTE));
    assert_eq!(again.firing, failing.firing, "nothing changed");

    // A reload that raises the threshold: the same live rows, new rules.
    let reload = |rules: &str| {
        let text = config_text(
            rig.dir.path(),
            1,
            "every = \"6h\"",
            &format!("[alert_rules]\n{rules}\n"),
        );
        catalog_with(rig.dir.path(), &text, &rig.vault, &rig.sink, &[])
    };
    rig.engine.reload(reload("failures_warning = 3")).await;
    let raised = rig.engine.health_conditions(at(3 * MINUTE));
    assert!(
        raised.firing.is_empty(),
        "two failures, warning at three: {raised:?}"
    );
    rig.engine.reload(reload("failures_warning = 2")).await;
    let back = rig.engine.health_conditions(at(4 * MINUTE));
    assert_eq!(names(&back), vec![(ROTATION_FAILING, Severity::Warning)]);

    // A retired agent's failures are not a rotation problem.
    rig.engine.retire_agent(
        &crate::model::AgentId::new("bot").unwrap(),
        "decommissioning",
    );
    let retired = rig.engine.health_conditions(at(5 * MINUTE));
    assert!(retired.firing.is_empty(), "{retired:?}");
    rig.shutdown().await;
}

/// `since` comes from state: a restarted engine on the same store reports
/// the same start for the same failing run.
#[tokio::test(start_paused = true)]
async fn the_start_of_a_failing_run_survives_a_restart() {
    let rig = Rig::single().await;
    // The default rules: a warning at 2 failures.
    rig.vault.fail("stage", 2, ErrorKind::Unauthorized, None);
    assert!(rig.rotate_c0().await.error.is_some());
    tokio::time::sleep(5 * MINUTE).await;
    assert!(rig.rotate_c0().await.error.is_some());
    let before = rig.engine.health_conditions(at(6 * MINUTE));
    assert_eq!(only(&before, ROTATION_FAILING).since, t0());

    tokio::time::sleep(HOUR).await;
    let rig = rig.restart(1, "every = \"6h\"").await;
    // Loads the state, without the scheduler (which would retry at once).
    rig.engine.start().await.unwrap();
    let after = rig.engine.health_conditions(at(2 * HOUR));
    assert_eq!(
        after.firing, before.firing,
        "the same alert, the same start"
    );
    rig.shutdown().await;
}

/// `max_age = 13h` on a 6 h schedule, expiring `period` (6 h) before: the
/// version delivered at 0 is expiring from 7 h and expired from 13 h;
/// `next_change` names each threshold before it comes; a rotation resets
/// the clock.
#[tokio::test(start_paused = true)]
async fn a_version_is_expiring_one_period_before_max_age_then_expired() {
    let rig = rig_in("every = \"6h\"\nmax_age = \"13h\"", "", &[]);
    assert_eq!(rig.rotate_c0().await.version, Some(1));

    let fresh = rig.engine.health_conditions(at(HOUR));
    assert!(fresh.firing.is_empty(), "{fresh:?}");
    assert_eq!(fresh.next_change, Some(at(7 * HOUR)));
    let just_before = rig
        .engine
        .health_conditions(at(7 * HOUR) - chrono::Duration::milliseconds(1));
    assert!(just_before.firing.is_empty(), "{just_before:?}");

    let expiring = rig.engine.health_conditions(at(7 * HOUR));
    assert_eq!(
        names(&expiring),
        vec![(CREDENTIAL_EXPIRING, Severity::Critical)]
    );
    assert_eq!(only(&expiring, CREDENTIAL_EXPIRING).since, at(7 * HOUR));
    assert_eq!(expiring.next_change, Some(at(13 * HOUR)));
    let later = rig.engine.health_conditions(at(10 * HOUR));
    assert_eq!(later.firing, expiring.firing, "stable while it holds");

    let expired = rig.engine.health_conditions(at(13 * HOUR));
    assert_eq!(
        names(&expired),
        vec![(CREDENTIAL_EXPIRED, Severity::Critical)],
        "expired replaces expiring"
    );
    assert_eq!(only(&expired, CREDENTIAL_EXPIRED).since, at(13 * HOUR));
    assert_eq!(expired.next_change, None);

    // A rotation at 8 h (the scheduler is not running here) resets it.
    tokio::time::sleep(8 * HOUR).await;
    assert_eq!(rig.rotate_c0().await.version, Some(2));
    let rotated = rig.engine.health_conditions(at(8 * HOUR));
    assert!(rotated.firing.is_empty(), "{rotated:?}");
    assert_eq!(rotated.next_change, Some(at(15 * HOUR)));
    rig.shutdown().await;
}

/// Defect: a decommissioned agent's credential kept ageing in the
/// rotation health conditions and the metrics, so its `max_age` paged an
/// operator (expiring, then expired) for an agent retired on purpose, and
/// `status` showed it due ever since. Once the agent is stopped, none of
/// that is reported; the other agents' are.
#[tokio::test(start_paused = true)]
async fn a_decommissioned_agent_raises_no_rotation_alerts_and_has_nothing_due() {
    let rig = rig_in("every = \"6h\"\nmax_age = \"13h\"", "", &[]);
    assert_eq!(rig.rotate_c0().await.version, Some(1));
    let expired = rig.engine.health_conditions(at(14 * HOUR));
    assert_eq!(
        names(&expired),
        vec![(CREDENTIAL_EXPIRED, Severity::Critical)]
    );
    assert_eq!(rig.engine.credential_times().len(), 1);
    assert!(rig.status("c0").next_due.is_some());

    let agent = key("c0").agent.clone();
    rig.engine.stop_agent(&agent, "decommissioning").await;
    for label in ["decommissioning", "decommissioned"] {
        rig.engine.set_agent_label(&agent, label);
        let c = rig.engine.health_conditions(at(14 * HOUR));
        assert!(c.firing.is_empty(), "{label}: {c:?}");
        assert_eq!(c.next_change, None, "{label}");
        assert!(rig.engine.credential_times().is_empty(), "{label}");
        let row = rig.status("c0");
        assert_eq!((row.state.as_str(), row.next_due), (label, None));
    }
    rig.shutdown().await;
}

/// A fixed `expiry_critical_before` instead of the period.
#[tokio::test(start_paused = true)]
async fn a_fixed_expiry_lead_moves_the_expiring_threshold() {
    let rig = rig_in(
        "every = \"6h\"\nmax_age = \"13h\"",
        "expiry_critical_before = \"2h\"",
        &[],
    );
    assert_eq!(rig.rotate_c0().await.version, Some(1));
    let c = rig.engine.health_conditions(at(HOUR));
    assert_eq!(c.next_change, Some(at(11 * HOUR)));
    assert!(
        rig.engine
            .health_conditions(at(10 * HOUR))
            .firing
            .is_empty()
    );
    let c = rig.engine.health_conditions(at(11 * HOUR));
    assert_eq!(only(&c, CREDENTIAL_EXPIRING).since, at(11 * HOUR));
    rig.shutdown().await;
}

/// A consumer that must acknowledge (its delivery is `Sent`) and never does.
struct Silent;

#[async_trait]
impl Sink for Silent {
    fn kind(&self) -> &'static str {
        "silent"
    }
    fn describe(&self) -> String {
        "silent:reader".into()
    }
    fn awaits_ack(&self) -> bool {
        true
    }
    async fn deliver(&self, _: &Notice, _: &SecretValue) -> Result<Delivered, PluginError> {
        Ok(Delivered::Sent)
    }
    async fn retract(&self, _: &CredentialKey) -> Result<(), PluginError> {
        Ok(())
    }
    async fn preflight(&self) -> Result<(), PluginError> {
        Ok(())
    }
}

/// A consumer that had not acknowledged when grace ended raises a warning
/// starting at the grace deadline; its late ack resolves it; with
/// `holdouts = false` nothing is raised.
#[tokio::test(start_paused = true)]
async fn holdouts_past_grace_raise_a_warning_until_they_ack() {
    for enabled in [true, false] {
        let rig = rig_in(
            "every = \"6h\"\ngrace = \"1h\"",
            &format!("holdouts = {enabled}"),
            &[Arc::new(Silent)],
        );
        rig.run().await;
        rig.first_version().await;
        let c0 = key("c0");
        let ack = |v| rig.engine.inner.ack(&c0, v, None, Actor::Daemon);
        ack(1).await.unwrap();
        tokio::time::sleep(10 * MINUTE).await;
        assert_eq!(rig.rotate_c0().await.version, Some(2));
        let during = rig.engine.health_conditions(at(30 * MINUTE));
        assert!(during.firing.is_empty(), "within grace: {during:?}");
        tokio::time::sleep(HOUR + MINUTE).await;
        assert_eq!(
            rig.status("c0").holdouts,
            vec!["silent:reader (ack=explicit)"]
        );
        let after = rig.engine.health_conditions(at(80 * MINUTE));
        if !enabled {
            assert!(after.firing.is_empty(), "holdouts = false: {after:?}");
            rig.shutdown().await;
            continue;
        }
        assert_eq!(names(&after), vec![(ACK_HOLDOUTS, Severity::Warning)]);
        let a = only(&after, ACK_HOLDOUTS);
        // The grace deadline: version 2's delivery (10 min and a poll of
        // `until` in) plus 1 h.
        let delivered = rig.status("c0").last_rotated.unwrap();
        assert_eq!(a.since, delivered + chrono::Duration::hours(1));
        assert!(a.since >= at(70 * MINUTE) && a.since < at(70 * MINUTE + Duration::from_secs(1)));
        assert!(a.description.contains("silent:reader"), "{}", a.description);
        ack(2).await.unwrap();
        let acked = rig.engine.health_conditions(at(81 * MINUTE));
        assert!(acked.firing.is_empty(), "{acked:?}");
        rig.shutdown().await;
    }
}

/// A rotation parked before promote whose staged version is deleted out
/// of band is abandoned (audited, its row done, its version retired in
/// state) instead of failing forever; the next attempt is a fresh rotation
/// with a new id and value, and it succeeds. Status shows the abandoned
/// rotation `failed` at the step it was abandoned at.
#[tokio::test(start_paused = true)]
async fn a_rotation_whose_staged_version_vanished_while_parked_is_abandoned_and_redone() {
    let rig = Rig::single().await;
    assert_eq!(rig.rotate_c0().await.version, Some(1));
    rig.vault.fail("promote", 1, ErrorKind::Unauthorized, None);
    let parked = rig.rotate_c0().await;
    assert!(parked.error.is_some());
    let stuck = rig.store.latest_rotation(&key("c0")).unwrap().unwrap();
    assert_eq!((stuck.step, stuck.version), (Step::Promote, 2));
    // Someone deletes the pending version in the vault.
    rig.vault.delete_pending(&path("c0"));

    let abandoned = rig.rotate_c0().await;
    let err = abandoned.error.unwrap();
    assert!(
        err.contains(&format!("step promote: rotation {} abandoned: ", stuck.id))
            && err.contains("is gone"),
        "{err}"
    );
    let row = rig.store.rotation(&stuck.id).unwrap().unwrap();
    assert_eq!(row.step, Step::Done);
    assert!(
        row.last_error
            .as_deref()
            .unwrap_or("")
            .contains("abandoned"),
        "{row:?}"
    );
    assert_eq!(rig.stage_of(2), Some(Stage::Retired));
    let s = rig.status("c0");
    assert_eq!(s.version, Some(1), "the current one stays");
    // Status names the step it was abandoned at, like any step failure
    // (it said `failed` at step `done`).
    assert_eq!(
        (s.state.as_str(), s.step.as_deref(), s.rotation.as_deref()),
        ("failed", Some("promote"), Some(stuck.id.as_str())),
        "{s:?}"
    );
    assert!(s.last_error.unwrap_or_default().contains("abandoned"));

    // Version 3 would have the current one's parity: under
    // `alternating_users` it would take the current value's role and end
    // it without grace. The fresh rotation is version 4.
    let fresh = rig.rotate_c0().await;
    assert_eq!((fresh.error, fresh.version), (None, Some(4)));
    assert_ne!(fresh.rotation, Some(stuck.id.clone()), "a new rotation");
    assert_eq!(rig.sink.versions("c0"), vec![1, 4]);
    let values = rig.sink.values("c0");
    assert_ne!(values[0].1, values[1].1, "a new value");
    assert_eq!(rig.stage_of(4), Some(Stage::Current));
    assert!(rig.engine.health_conditions(at(HOUR)).firing.is_empty());
    let dir = rig.shutdown().await;
    let audit = std::fs::read_to_string(dir.path().join("audit.log")).unwrap();
    let record = audit
        .lines()
        .find(|l| l.contains("\"rotation.abandoned\""))
        .unwrap_or_else(|| panic!("no abandon record: {audit}"));
    assert!(
        record.contains(stuck.id.as_str()) && record.contains("step=promote"),
        "{record}"
    );
    assert_eq!(audit.matches("\"rotation.abandoned\"").count(), 1);
}

/// Defect: a followed credential whose checks kept failing raised no
/// failure alert (the shipped Prometheus rule fired for it; keyturn's own
/// alerts did not). It raises `KeyturnRotationFailing` at the same counts
/// as a rotation (`failures_warning`, `failures_critical`), its failed
/// checks counted at the pace of a rotation's failures, labelled
/// `mode="follow"` and saying it is following that fails; the first check
/// that reads the vault again ends it. Its `max_age` counts from when this
/// keyturn delivered the version.
#[tokio::test(start_paused = true)]
async fn a_followed_credential_that_keeps_failing_raises_the_failure_alert_until_a_check_succeeds()
{
    let rig = rig_in(
        &format!("{FOLLOW}\nmax_age = \"1h\""),
        "failures_warning = 2\nfailures_critical = 3",
        &[],
    );
    rig.follow_first_version(rig.vault.as_ref(), "kt-canary-health-follow")
        .await;
    let now = |r: &Rig| super::super::clock::Clock::now(&r.clock);
    let delivered = now(&rig);
    assert!(rig.engine.health_conditions(delivered).firing.is_empty());

    // The next four polls cannot read c0's mark (no change index: each
    // poll reads it); the fifth can. Failing, the polls back off: about 0,
    // 2, 6 and 14 s, then 30 s.
    let reads = |r: &Rig| r.vault.times("mark", None).len();
    let before = reads(&rig);
    rig.vault.fail("mark", 4, ErrorKind::Unauthorized, None);
    let failing = |r: &Rig| {
        r.engine
            .health_conditions(now(r))
            .firing
            .into_iter()
            .find(|a| a.name == ROTATION_FAILING)
    };
    // Defect: each failed poll counted, so two polls within 2 s warned.
    // Failures count as a rotation's do: the second once the run lasted
    // the first parked wait (the rig's `max_delay`, 4 s), the third after
    // 4 + 8 s.
    rig.until(Duration::from_secs(5), "two failed polls", |r| {
        reads(r) >= before + 2
    })
    .await;
    let count = |r: &Rig| {
        r.engine
            .inner
            .live()
            .get(&key("c0"))
            .and_then(|l| l.row.as_ref().map(|row| row.consecutive_failures))
    };
    assert_eq!(count(&rig), Some(1), "counted once so far");
    assert!(failing(&rig).is_none(), "a 2-second outage warned");
    rig.until(Duration::from_secs(10), "the warning", |r| {
        failing(r).is_some_and(|a| a.severity == Severity::Warning)
    })
    .await;
    let warn = failing(&rig).unwrap();
    assert_eq!(warn.mode.as_deref(), Some("follow"), "{warn:?}");
    assert_eq!(
        (warn.agent.as_deref(), warn.credential.as_deref()),
        (Some("bot"), Some("c0"))
    );
    assert!(
        warn.summary.contains("following") && warn.summary.contains("failing"),
        "{}",
        warn.summary
    );
    assert!(
        warn.since > delivered,
        "began at the first failure: {warn:?}"
    );
    assert!(
        warn.description.contains("mark refused") && !warn.description.contains("kt-canary"),
        "{}",
        warn.description
    );
    rig.until(Duration::from_secs(20), "the page", |r| {
        failing(r).is_some_and(|a| a.severity == Severity::Critical)
    })
    .await;
    let page = failing(&rig).unwrap();
    assert_eq!(
        (page.since, page.mode.as_deref()),
        (warn.since, Some("follow")),
        "one run, one start"
    );

    // The vault answers again: the next check succeeds and the alert is gone.
    rig.until(Duration::from_secs(30), "the recovery", |r| {
        r.engine.health_conditions(now(r)).firing.is_empty()
    })
    .await;
    assert_eq!(rig.follow_health("c0"), ("follow".into(), None, 0));

    let c = rig
        .engine
        .health_conditions(delivered + chrono::Duration::hours(2));
    assert_eq!(names(&c), vec![(CREDENTIAL_EXPIRED, Severity::Critical)]);
    let expired = only(&c, CREDENTIAL_EXPIRED);
    assert!(expired.description.contains("followed"), "{c:?}");
    assert_eq!(expired.mode.as_deref(), Some("follow"));
    rig.shutdown().await;
}

/// After a restart, the credential whose rotation was abandoned gets its
/// fresh rotation at once (as a parked rotation resumes at once), not at its
/// next due time six hours later.
#[tokio::test(start_paused = true)]
async fn after_a_restart_the_fresh_rotation_after_an_abandoned_one_starts_at_once() {
    let rig = Rig::single().await;
    assert_eq!(rig.rotate_c0().await.version, Some(1));
    rig.vault.fail("promote", 1, ErrorKind::Unauthorized, None);
    assert!(rig.rotate_c0().await.error.is_some());
    rig.vault.delete_pending(&path("c0"));
    let err = rig.rotate_c0().await.error.unwrap();
    assert!(err.contains("abandoned"), "{err}");

    let rig = rig.restart(1, "every = \"6h\"").await;
    rig.run().await;
    rig.until(Duration::from_secs(1), "the fresh rotation", |r| {
        r.sink.count() == 1
    })
    .await;
    // The current one is 1 and 2 was abandoned: 4, of the other parity.
    assert_eq!(rig.sink.versions("c0"), vec![4]);
    assert!(rig.engine.health_conditions(at(HOUR)).firing.is_empty());
    rig.shutdown().await;
}
