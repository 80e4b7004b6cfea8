//! The state directory on a small volume, as operators run it: the
//! databases' write-ahead logs stay bounded, and a volume that fills up
//! (keyturn's own writes or anyone else's) loses nothing. A restart while it
//! is still full says what to free instead of crashing; once there is room
//! again the daemon starts, the audit log verifies, and every rotation
//! resumes.
//!
//! The volume is a real filesystem mounted on the test's state directory:
//! ext4 in a loop-mounted image where the kernel allows it (that is where
//! SQLite's memory-mapped index faults with SIGBUS on a full disk), tmpfs
//! otherwise. Mounting needs root, as CI runs the suite.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

/// A filesystem mounted at `at` until dropped.
struct Volume {
    at: PathBuf,
    kind: &'static str,
}

impl Volume {
    fn mount(at: &Path, image_dir: &Path, mib: u64) -> Volume {
        std::fs::create_dir_all(at).unwrap();
        let image = image_dir.join("state.img");
        let ext4 = Command::new("truncate")
            .arg("-s")
            .arg(format!("{mib}M"))
            .arg(&image)
            .status()
            .is_ok_and(|s| s.success())
            && Command::new("mkfs.ext4")
                .args(["-q", "-F", "-m", "0"])
                .arg(&image)
                .status()
                .is_ok_and(|s| s.success())
            && Command::new("mount")
                .args(["-o", "loop"])
                .arg(&image)
                .arg(at)
                .status()
                .is_ok_and(|s| s.success());
        if ext4 {
            return Volume {
                at: at.to_path_buf(),
                kind: "ext4",
            };
        }
        Volume::tmpfs(at, mib)
    }

    /// A tmpfs of `mib` at `at`: there, a full volume still takes new
    /// directories (no block needed), only their files fail.
    fn tmpfs(at: &Path, mib: u64) -> Volume {
        std::fs::create_dir_all(at).unwrap();
        let tmpfs = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m,mode=0700")])
            .arg("tmpfs")
            .arg(at)
            .status()
            .expect("run mount");
        assert!(
            tmpfs.success(),
            "cannot mount a test volume at {} (these tests need root, as CI runs them)",
            at.display()
        );
        Volume {
            at: at.to_path_buf(),
            kind: "tmpfs",
        }
    }

    /// Writes a file until the volume is full (as another process might).
    fn fill(&self) -> PathBuf {
        use std::io::Write;
        let path = self.at.join("filler");
        let mut f = std::fs::File::create(&path).unwrap();
        let chunk = vec![0xa5u8; 64 * 1024];
        loop {
            match f.write(&chunk) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
                Err(e) => panic!("filling the volume: {e}"),
            }
        }
        // Small writes for the last partial blocks.
        while f.write(&[0u8; 512]).is_ok_and(|n| n > 0) {}
        let _ = f.sync_all();
        path
    }
}

impl Drop for Volume {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.at).status();
    }
}

fn creds(n: usize) -> String {
    let mut s = agent_table("bot");
    for i in 0..n {
        s.push_str(&format!(
            "[agents.bot.credentials.c{i}]\nvault = \"local\"\ngenerate = {{ kind = \"password\", length = 24 }}\nevery = \"1s\"\ngrace = \"0s\"\ndeliver = [{{ type = \"file\", path = \"{{root}}/bot/c{i}.json\", format = \"json\" }}]\n"
        ));
    }
    s
}

fn versions(env: &Env) -> Vec<u64> {
    status_json(env)
        .iter()
        .map(|r| r["version"].as_u64().unwrap_or(0))
        .collect()
}

#[test]
fn a_full_state_volume_loses_nothing_and_the_daemon_starts_once_there_is_room() {
    const N: usize = 10;
    let env = Env::new(&creds(N));
    let images = tempfile::tempdir().unwrap();
    let volume = Volume::mount(&env.state_dir(), images.path(), 24);
    eprintln!("state volume: {}", volume.kind);

    let mut daemon = env.start();
    wait_for(Duration::from_secs(30), || {
        versions(&env).iter().all(|v| *v >= 2).then_some(())
    })
    .expect("rotating");

    // The volume fills up under the running daemon.
    let filler = volume.fill();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !daemon.log_text().contains("No space left on device")
        && !daemon.log_text().contains("database or disk is full")
    {
        assert!(
            Instant::now() < deadline,
            "keyturn never hit the full volume"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        daemon.wait_exit(Duration::ZERO).is_none(),
        "the daemon died on a full volume; log:\n{}",
        daemon.log_text()
    );
    // Status says why each failing credential fails (one whose rotation
    // could not even be recorded as begun said nothing).
    let failing = wait_for(Duration::from_secs(30), || {
        let failed: Vec<serde_json::Value> = status_json(&env)
            .into_iter()
            .filter(|r| r["state"] == "failed")
            .collect();
        (!failed.is_empty()).then_some(failed)
    })
    .unwrap_or_else(|| panic!("nothing failed: {:?}", status_json(&env)));
    for row in &failing {
        assert!(row["last_error"].is_string(), "no error shown: {row}");
    }
    // The worst moment to die: mid-write on a full volume.
    daemon.kill9();

    // A restart while it is still full refuses, and says what to do.
    let mut refused = env.spawn(&[]);
    let status = refused
        .wait_exit(Duration::from_secs(30))
        .expect("a start on a full volume ends");
    let log = refused.log_text();
    assert_eq!(
        status.code(),
        Some(1),
        "exits 1 rather than crash ({status}); log:\n{log}"
    );
    assert!(
        log.contains("KiB free") && log.contains("Free some space"),
        "{log}"
    );
    // `check` says so too (black-box finding: it passed, so the unit's
    // ExecStartPre let a start through that then failed, again and again).
    let out = env.cli(&["check"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("the daemon would not start") && err.contains("KiB free"),
        "{err}"
    );
    // And says no "ok" first (black-box finding).
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(!said.contains("ok"), "{said}");

    // Room again: it starts and every credential rotates again.
    std::fs::remove_file(&filler).unwrap();
    let before = {
        let again = env.start();
        let before = versions(&env);
        wait_for(Duration::from_secs(60), || {
            versions(&env)
                .iter()
                .zip(&before)
                .all(|(now, then)| *now >= then + 2)
                .then_some(())
        })
        .unwrap_or_else(|| panic!("rotations did not resume: {:?}", status_json(&env)));
        again.stop();
        before
    };
    assert_eq!(before.len(), N);
    audit_verifies(&env, "after the disk filled up");
    let integrity: String = rusqlite_integrity(&env.state_dir().join("state.db"));
    assert_eq!(integrity, "ok");
    // What each agent holds is what the vault holds as current.
    for i in 0..N {
        let key = bot_key(&format!("c{i}"));
        let (_, current) = block_on(local_vault_value(
            &env,
            "local",
            &key,
            keyturn::vaults::Select::Stage(keyturn::model::Stage::Current),
        ))
        .expect("a current version");
        let file: serde_json::Value = serde_json::from_slice(
            &std::fs::read(env.root().join(format!("bot/c{i}.json"))).unwrap(),
        )
        .unwrap();
        assert_eq!(
            file["value"].as_str().unwrap().as_bytes(),
            current.as_slice(),
            "c{i}"
        );
    }
    drop(volume);
}

/// Each SQLite write-ahead log is checkpointed every 1 MiB and cut back to
/// 1 MiB (SQLite's defaults let each grow to ~4 MiB and stay there).
#[test]
fn the_write_ahead_logs_stay_bounded() {
    let env = Env::new(&creds(30));
    let daemon = env.start();
    let wals = [
        env.state_dir().join("state.db-wal"),
        env.state_dir().join("vaults/local/vault.db-wal"),
    ];
    let mut largest = [0u64; 2];
    let until = Instant::now() + Duration::from_secs(12);
    while Instant::now() < until {
        for (i, w) in wals.iter().enumerate() {
            if let Ok(m) = std::fs::metadata(w) {
                largest[i] = largest[i].max(m.len());
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let rotated = audit_records(&env)
        .iter()
        .filter(|r| r["event"] == "rotation.deliver")
        .count();
    daemon.stop();
    // Enough writes to have grown past the limit many times over.
    assert!(rotated >= 200, "only {rotated} rotations");
    for (w, size) in wals.iter().zip(largest) {
        assert!(size > 0, "{} was never seen", w.display());
        assert!(size <= 1_400_000, "{} grew to {size} bytes", w.display());
    }
}

fn rusqlite_integrity(db: &Path) -> String {
    let conn =
        rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .expect("open the state database");
    conn.query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .expect("integrity_check")
}

/// Black-box finding: a key pair delivered to a full delivery volume left
/// an empty `..TIMESTAMP.VERSION.HEX` directory in the bundle per retry
/// (removed only by the next delivery that worked). A delivery that fails
/// removes its own directory; the agent's pair is untouched.
#[test]
fn a_bundle_delivery_that_fails_on_a_full_volume_leaves_nothing_behind() {
    let env = Env::new(&format!(
        "{}[agents.bot.credentials.key]\nvault = \"local\"\ngenerate = {{ kind = \"ed25519\" }}\nevery = \"1h\"\ngrace = \"0s\"\ndeliver = [{{ type = \"file\", path = \"{{root}}/bot/key\" }}]\n",
        agent_table("bot")
    ));
    let volume = Volume::tmpfs(&env.root(), 2);
    let daemon = env.start();
    wait_version(&env, "bot", "key", 1);
    let bundle = env.root().join("bot/key");
    let data_dirs = || -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(&bundle)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("..") && n != "..data")
            .collect();
        names.sort();
        names
    };
    let before = data_dirs();
    assert_eq!(before.len(), 1, "{before:?}");
    let public = std::fs::read(bundle.join("public.pem")).unwrap();

    let filler = volume.fill();
    for _ in 0..3 {
        let out = env.cli(&["rotate", "bot/key", "--wait"]);
        assert_eq!(out.status.code(), Some(1), "{out:?}");
    }
    assert_eq!(
        data_dirs(),
        before,
        "no directory left by the failed deliveries"
    );
    assert_eq!(std::fs::read(bundle.join("public.pem")).unwrap(), public);

    std::fs::remove_file(&filler).unwrap();
    env.cli_ok(&["rotate", "bot/key", "--wait"]);
    assert_ne!(std::fs::read(bundle.join("public.pem")).unwrap(), public);
    daemon.stop();
    drop(volume);
}
