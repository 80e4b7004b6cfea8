//! Followers (`mode = "follow"`) under paused time, with a real file sink
//! beside the in-memory one: what a follower does when its rotator
//! destroys the credential (a decommission there), and how a restarted
//! follower restores a file that went missing while it was down.

use super::*;
use crate::api::protocol::ShownStage;

/// The follower's real file of `c0`.
fn file_of(dir: &std::path::Path) -> std::path::PathBuf {
    dir.join("agents/bot/c0")
}

/// A file sink delivering to [`file_of`] (`dir` is the rig's).
fn file_sink(dir: &std::path::Path) -> Arc<dyn Sink> {
    crate::sinks::delivered_at(&file_of(dir), &[dir.join("agents")]).unwrap()
}

/// A follower of `c0` in `dir` (no change index), delivering to the
/// in-memory sink and to a file.
fn following_to_file(dir: tempfile::TempDir, store: Arc<MemoryStore>, vault: Arc<MemVault>) -> Rig {
    let file = file_sink(dir.path());
    Rig::in_dir_with(dir, 1, FOLLOW, "", store, vault, &[file])
}

/// Stops the rig and starts a follower on the same state, vault and
/// files, as the daemon starts: state loaded, missing files restored, then
/// the follow loops.
async fn restart_follower(rig: Rig) -> Rig {
    let (store, vault) = (rig.store.clone(), rig.vault.clone());
    let dir = rig.shutdown().await;
    start_follower(dir, store, vault).await
}

/// A follower started on `dir`, `store` and `vault` as the daemon starts.
async fn start_follower(
    dir: tempfile::TempDir,
    store: Arc<MemoryStore>,
    vault: Arc<MemVault>,
) -> Rig {
    let rig = following_to_file(dir, store, vault);
    rig.engine.start().await.unwrap();
    rig.engine.restore_missing_files().await;
    let e = rig.engine.clone();
    rig.tracker.spawn(async move { e.run_followers().await });
    rig
}

/// Sets the wall clock of `rig`, which starts at [`t0`], to the one of a
/// rig made at `made` that it replaces: a restart does not turn the wall
/// clock back.
fn same_wall_clock(rig: &Rig, made: Instant) {
    rig.clock.step_forward(Instant::now() - made);
}

/// Every audit record of `event` in the rig's log.
fn records(rig: &Rig, event: &str) -> Vec<serde_json::Value> {
    std::fs::read_to_string(rig.dir.path().join("audit.log"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|r| r["event"] == event)
        .collect()
}

/// What the rotator's decommission does to the vault: every version of
/// `c0` destroyed (and, through the index decorator, its index entry).
async fn destroy_elsewhere(via: &dyn Vault) {
    let key = key("c0");
    let path = path("c0");
    via.destroy(VaultItem {
        key: &key,
        path: &path,
    })
    .await
    .unwrap();
}

/// Defect F2: when the rotator decommissioned the credential (every version
/// and the metadata destroyed in the vault), the follower kept the revoked
/// value in its agent's file and showed it `current`/`follow`, before and
/// after a restart, and logged nothing. Now it removes the delivered file,
/// shows the version `revoked` (state and stage), audits `follow.revoked`,
/// records the version retired, and a restart neither restores the file
/// nor forgets the revocation. A version the vault holds later is
/// delivered as usual. Without a change index (the credential's own mark)
/// and with one (the rotator's destroy takes it out of the index).
#[tokio::test(start_paused = true)]
async fn a_follower_removes_what_it_delivered_when_its_rotator_destroys_the_credential() {
    for indexed in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let file = file_sink(dir.path());
        let rig = if indexed {
            Rig::with_index_in(dir, 1, FOLLOW, |v| v, &[file])
        } else {
            following_to_file(dir, Arc::new(MemoryStore::new()), Arc::default())
        };
        let rotator = rig.rotator();
        let via: &dyn Vault = if indexed {
            &rotator
        } else {
            rig.vault.as_ref()
        };
        rig.follow_first_version(via, "kt-canary-f2-one").await;
        let file = file_of(rig.dir.path());
        assert_eq!(std::fs::read(&file).unwrap(), b"kt-canary-f2-one");
        let s = rig.status("c0");
        assert_eq!(
            (s.state.as_str(), s.stage),
            ("follow", Some(ShownStage::Current))
        );

        destroy_elsewhere(via).await;
        rig.until(Duration::from_secs(10), "the revocation", |r| {
            r.status("c0").state == "revoked"
        })
        .await;
        let s = rig.status("c0");
        assert_eq!(
            (s.version, s.stage, s.last_error.as_deref()),
            (Some(1), Some(ShownStage::Revoked), None),
            "indexed {indexed}: {s:?}"
        );
        assert!(
            !file.exists(),
            "indexed {indexed}: the revoked value stays on disk"
        );
        assert_eq!(rig.stage_of(1), Some(Stage::Retired));
        let revoked = records(&rig, "follow.revoked");
        assert_eq!(revoked.len(), 1, "{revoked:?}");
        assert_eq!(revoked[0]["outcome"], "ok");
        assert_eq!(revoked[0]["version"], 1);
        let detail = revoked[0]["detail"].as_str().unwrap();
        assert!(
            detail.contains("destroyed") && detail.contains(&file.display().to_string()),
            "{detail}"
        );
        // Not alerted as failing, nor as aging: nothing of it is live.
        let health = rig.engine.health_conditions(rig.engine.now());
        assert!(health.firing.is_empty(), "{health:?}");
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert_eq!(records(&rig, "follow.revoked").len(), 1, "revoked again");

        if !indexed {
            // A restart remembers it and does not bring the file back.
            let rig2 = restart_follower(rig).await;
            tokio::time::sleep(Duration::from_secs(3)).await;
            let s = rig2.status("c0");
            assert_eq!(
                (s.state.as_str(), s.stage),
                ("revoked", Some(ShownStage::Revoked)),
                "after a restart: {s:?}"
            );
            assert!(!file.exists(), "restored after a restart");
            assert_eq!(rig2.sink.count(), 0);
            assert_eq!(records(&rig2, "follow.revoked").len(), 1);
            // The credential made anew by a rotator: delivered as usual.
            rotate_elsewhere(rig2.vault.as_ref(), "c0", "kt-canary-f2-new").await;
            rig2.until(Duration::from_secs(5), "the new version", |r| {
                r.sink.count() == 1
            })
            .await;
            assert_eq!(
                rig2.sink.values("c0"),
                vec![(2, b"kt-canary-f2-new".to_vec())]
            );
            assert_eq!(std::fs::read(&file).unwrap(), b"kt-canary-f2-new");
            let s = rig2.status("c0");
            assert_eq!(
                (s.state.as_str(), s.stage),
                ("follow", Some(ShownStage::Current))
            );
            assert_eq!(
                rig2.stage_of(1),
                Some(Stage::Retired),
                "no grace for a revoked value"
            );
            rig2.shutdown().await;
        } else {
            rig.shutdown().await;
        }
    }
}

/// The (version, rotation) pairs of the follower's `delivery` records.
fn delivered_pairs(rig: &Rig) -> Vec<(u64, String)> {
    records(rig, "delivery")
        .iter()
        .filter(|r| r["outcome"] == "ok")
        .map(|r| {
            (
                r["version"].as_u64().unwrap(),
                r["rotation"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

/// Defect F3: a follower restarted with its file gone, while the rotator
/// had rotated twice, restored the newest value under its old version
/// number (the audit paired version 1 with two rotations), then delivered
/// the same value again as version 2. Now a version number names one value:
/// the newer value is delivered once, as version 2, to every sink. When the
/// vault has not moved on, the missing file gets the same version and value
/// back (and nothing else is delivered).
#[tokio::test(start_paused = true)]
async fn a_restarted_follower_restores_a_missing_file_without_mixing_versions() {
    let rig = following_to_file(
        tempfile::tempdir().unwrap(),
        Arc::new(MemoryStore::new()),
        Arc::default(),
    );
    rig.follow_first_version(rig.vault.as_ref(), "kt-canary-f3-a")
        .await;
    let file = file_of(rig.dir.path());

    // Down, file gone, nothing rotated: the same version and value back.
    std::fs::remove_file(&file).unwrap();
    let rig = restart_follower(rig).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(std::fs::read(&file).unwrap(), b"kt-canary-f3-a");
    assert_eq!(rig.sink.count(), 0, "delivered though nothing changed");
    assert_eq!(rig.status("c0").version, Some(1));

    // Down, file gone, two rotations meanwhile (the first's value retired).
    std::fs::remove_file(&file).unwrap();
    let (store, vault) = (rig.store.clone(), rig.vault.clone());
    let dir = rig.shutdown().await;
    rotate_elsewhere(vault.as_ref(), "c0", "kt-canary-f3-b").await;
    rotate_elsewhere(vault.as_ref(), "c0", "kt-canary-f3-c").await;
    let rig = start_follower(dir, store, vault).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(std::fs::read(&file).unwrap(), b"kt-canary-f3-c");
    assert_eq!(
        rig.sink.values("c0"),
        vec![(2, b"kt-canary-f3-c".to_vec())],
        "the newer value once, as a new version"
    );
    let s = rig.status("c0");
    assert_eq!((s.version, s.state.as_str()), (Some(2), "follow"));
    // Each version with one rotation in the audit; each rotation with one
    // version.
    let pairs = delivered_pairs(&rig);
    let mut by_version: HashMap<u64, Vec<&str>> = HashMap::new();
    let mut by_rotation: HashMap<&str, Vec<u64>> = HashMap::new();
    for (v, r) in &pairs {
        by_version.entry(*v).or_default().push(r);
        by_rotation.entry(r).or_default().push(*v);
    }
    for (v, rs) in &by_version {
        assert!(
            rs.iter().all(|r| *r == rs[0]),
            "version {v}: rotations {rs:?} ({pairs:?})"
        );
    }
    for (r, vs) in &by_rotation {
        assert!(
            vs.iter().all(|v| *v == vs[0]),
            "rotation {r}: versions {vs:?} ({pairs:?})"
        );
    }
    assert_eq!(by_version.len(), 2, "{pairs:?}");
    rig.shutdown().await;
}

/// A follower of `c0` as an ed25519 keypair (a bundle directory at
/// [`file_of`]) with `grace = "1m"`.
fn following_a_keypair(
    dir: tempfile::TempDir,
    store: Arc<MemoryStore>,
    vault: Arc<MemVault>,
) -> Rig {
    let text = config_text(dir.path(), 1, &format!("{FOLLOW}\ngrace = \"1m\""), "").replace(
        "generate = { kind = \"password\", length = 20 }",
        "generate = { kind = \"ed25519\" }",
    );
    let file = file_sink(dir.path());
    Rig::from_text(dir, &text, store, vault, &[file])
}

/// A new keypair of `c0`, rotated elsewhere.
async fn rotate_a_keypair_elsewhere(via: &dyn Vault) {
    let g = crate::generators::generate(&crate::config::GeneratorConfig::Ed25519).unwrap();
    rotate_elsewhere(via, "c0", g.value.expose_str().unwrap()).await;
}

/// The timestamped pair directories of the bundle at `bundle`.
fn pair_dirs(bundle: &std::path::Path) -> usize {
    std::fs::read_dir(bundle)
        .unwrap()
        .filter_map(Result::ok)
        .filter(|e| {
            let name = e.file_name();
            let name = name.to_string_lossy();
            name.starts_with("..") && name != "..data" && e.path().join("private.pem").exists()
        })
        .count()
}

/// Defect F10: a follower kept the previous keypair's directory, with its
/// private key, until the next delivery (a whole rotation period), where
/// the rotator removes it when the previous version's grace ends. Now the
/// follower removes it when the grace it gave that version ends, and
/// records the version retired; also after a restart in the middle of the
/// grace period.
#[tokio::test(start_paused = true)]
async fn a_follower_removes_the_previous_private_key_when_its_grace_ends() {
    for restart in [false, true] {
        let rig = following_a_keypair(
            tempfile::tempdir().unwrap(),
            Arc::new(MemoryStore::new()),
            Arc::default(),
        );
        let bundle = file_of(rig.dir.path());
        rotate_a_keypair_elsewhere(rig.vault.as_ref()).await;
        rig.run_following().await;
        rig.until(Duration::from_secs(5), "the first pair", |r| {
            r.sink.count() == 1
        })
        .await;
        assert_eq!(pair_dirs(&bundle), 1);
        rotate_a_keypair_elsewhere(rig.vault.as_ref()).await;
        rig.until(Duration::from_secs(5), "the second pair", |r| {
            r.sink.count() == 2
        })
        .await;
        let delivered = Instant::now();
        assert_eq!(
            pair_dirs(&bundle),
            2,
            "the previous pair, for readers mid-read"
        );
        assert_eq!(
            (rig.stage_of(1), rig.stage_of(2)),
            (Some(Stage::Previous), Some(Stage::Current))
        );
        let rig = if restart {
            tokio::time::sleep(Duration::from_secs(10)).await;
            let (store, vault, made) = (rig.store.clone(), rig.vault.clone(), rig.start);
            let dir = rig.shutdown().await;
            let rig = following_a_keypair(dir, store, vault);
            same_wall_clock(&rig, made);
            rig.run_following().await;
            rig
        } else {
            rig
        };
        // Still there shortly before the grace ends; gone just after.
        tokio::time::sleep_until(delivered + Duration::from_secs(55)).await;
        assert_eq!(
            pair_dirs(&bundle),
            2,
            "restart {restart}: removed before its grace ended"
        );
        tokio::time::sleep_until(delivered + Duration::from_secs(62)).await;
        assert_eq!(
            pair_dirs(&bundle),
            1,
            "restart {restart}: the retired private key is still on disk"
        );
        assert_eq!(rig.stage_of(1), Some(Stage::Retired), "restart {restart}");
        assert_eq!(rig.status("c0").state, "follow");
        rig.shutdown().await;
    }
}

/// The config of `c0` rotated here (`every = "6h"`, `grace = "5m"`).
const PROMOTED: &str = "every = \"6h\"\ngrace = \"5m\"";

/// Defect F6: a follower promoted to rotator (its `mode` changed) after its
/// rotator died in the middle of a grace period never retired the dead
/// rotator's previous version: it stayed readable in the vault for good,
/// through every later rotation. Now the promoted keyturn retires it when
/// its grace ends (counted from its own delivery of the current version),
/// audited as its own retire step; promoted by a restart or by a reload,
/// or after that grace ended already (then at once). Later rotations
/// retire as usual.
#[tokio::test(start_paused = true)]
async fn a_promoted_follower_retires_the_previous_version_its_dead_rotator_left() {
    for how in ["restart", "reload", "late reload"] {
        let rig = Rig::new(1, &format!("{FOLLOW}\ngrace = \"5m\"")).await;
        rotate_elsewhere(rig.vault.as_ref(), "c0", "kt-canary-f6-one").await;
        rig.run_following().await;
        rig.until(Duration::from_secs(5), "the first version", |r| {
            r.sink.count() == 1
        })
        .await;
        // The rotator's second rotation, then its host dies mid-grace.
        rotate_elsewhere(rig.vault.as_ref(), "c0", "kt-canary-f6-two").await;
        rig.until(Duration::from_secs(5), "the second version", |r| {
            r.sink.count() == 2
        })
        .await;
        let delivered = Instant::now();
        let p = path("c0");
        assert_eq!(
            rig.vault.stages(&p),
            vec![(1, Stage::Previous), (2, Stage::Current)]
        );
        let rig = match how {
            "restart" => {
                tokio::time::sleep(Duration::from_secs(30)).await;
                let made = rig.start;
                let rig = rig.restart(1, PROMOTED).await;
                same_wall_clock(&rig, made);
                rig.run().await;
                rig
            }
            _ => {
                let wait = if how == "reload" { 30 } else { 400 };
                tokio::time::sleep(Duration::from_secs(wait)).await;
                let text = config_text(rig.dir.path(), 1, PROMOTED, "");
                let catalog = catalog_with(rig.dir.path(), &text, &rig.vault, &rig.sink, &[]);
                rig.engine.reload(catalog).await;
                rig
            }
        };
        if how == "late reload" {
            rig.until(Duration::from_secs(5), "the retirement, at once", |r| {
                r.vault.stages(&p)[0].1 == Stage::Retired
            })
            .await;
        } else {
            tokio::time::sleep_until(delivered + Duration::from_secs(290)).await;
            assert_eq!(
                rig.vault.stages(&p)[0].1,
                Stage::Previous,
                "{how}: retired early"
            );
            assert_eq!(rig.status("c0").state, "retiring", "{how}");
            tokio::time::sleep_until(delivered + Duration::from_secs(302)).await;
            assert_eq!(
                rig.vault.stages(&p),
                vec![(1, Stage::Retired), (2, Stage::Current)],
                "{how}: the dead rotator's previous version is still live"
            );
        }
        let takeover = records(&rig, "rotation.takeover");
        assert_eq!(takeover.len(), 1, "{how}: {takeover:?}");
        assert!(!records(&rig, "rotation.retire").is_empty(), "{how}");
        assert_eq!(rig.status("c0").state, "idle", "{how}");
        // The next rotations retire as usual.
        for _ in 0..2 {
            let done = rig.rotate_c0().await;
            assert_eq!(done.error, None, "{how}");
            tokio::time::sleep(Duration::from_secs(301)).await;
        }
        assert_eq!(
            rig.vault.stages(&p),
            vec![
                (1, Stage::Retired),
                (2, Stage::Retired),
                (3, Stage::Retired),
                (4, Stage::Current)
            ],
            "{how}"
        );
        assert_eq!(records(&rig, "rotation.takeover").len(), 1, "{how}");
        rig.shutdown().await;
    }
}

/// A promoted follower that rotates before the taken-over grace ends
/// retires the dead rotator's previous version first, as a rotation does
/// with its own pending retirement.
#[tokio::test(start_paused = true)]
async fn a_promoted_follower_rotating_at_once_retires_the_left_version_first() {
    let rig = Rig::new(1, &format!("{FOLLOW}\ngrace = \"5m\"")).await;
    rotate_elsewhere(rig.vault.as_ref(), "c0", "kt-canary-f6b-one").await;
    rotate_elsewhere(rig.vault.as_ref(), "c0", "kt-canary-f6b-two").await;
    rig.run_following().await;
    rig.until(Duration::from_secs(5), "the current version", |r| {
        r.sink.count() == 1
    })
    .await;
    let rig = rig.restart(1, PROMOTED).await;
    rig.engine.start().await.unwrap();
    // Rotated before the scheduler ran the armed retire job.
    let done = rig.rotate_c0().await;
    assert_eq!(done.error, None);
    let p = path("c0");
    assert_eq!(
        rig.vault.stages(&p),
        vec![
            (1, Stage::Retired),
            (2, Stage::Previous),
            (3, Stage::Current)
        ]
    );
    rig.shutdown().await;
}

/// Black-box finding: a credential rotated here, then followed (its
/// `mode` changed to `follow`, by a restart or a reload) while its
/// previous version was in its grace period, stayed `retiring` for good,
/// and that version was never retired in the vault. The retirement it
/// owes still runs when the grace ends.
#[tokio::test(start_paused = true)]
async fn a_rotator_turned_follower_still_retires_what_it_owed() {
    for how in ["restart", "reload"] {
        let rig = Rig::started(1, "every = \"6h\"\ngrace = \"1m\"").await;
        assert_eq!(rig.rotate_c0().await.version, Some(2));
        let p = path("c0");
        let followed = format!("{FOLLOW}\ngrace = \"1m\"");
        let rig = match how {
            "restart" => {
                let made = rig.start;
                let rig = rig.restart(1, &followed).await;
                same_wall_clock(&rig, made);
                rig.run_following().await;
                rig
            }
            _ => {
                let text = config_text(rig.dir.path(), 1, &followed, "");
                let catalog = catalog_with(rig.dir.path(), &text, &rig.vault, &rig.sink, &[]);
                rig.engine.reload(catalog).await;
                rig
            }
        };
        assert_eq!(rig.vault.stages(&p)[0], (1, Stage::Previous), "{how}");
        rig.until(Duration::from_secs(120), "the owed retirement", |r| {
            r.vault.stages(&p)[0].1 == Stage::Retired
        })
        .await;
        rig.until(Duration::from_secs(10), "no longer retiring", |r| {
            r.status("c0").state != "retiring"
        })
        .await;
        rig.shutdown().await;
    }
}
