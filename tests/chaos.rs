//! Chaos: the daemon is killed with SIGKILL at random moments under load
//! (every credential rotating every second, manual rotations and reloads
//! thrown in), and restarted at once, while a reader thread per delivered
//! file reads it as fast as it can. Afterwards:
//! - no reader ever saw a partial, empty or malformed file, or a version
//!   older than one it had already seen;
//! - no temp file is left (they hold secrets);
//! - the audit chain verifies;
//! - every delivered value is the vault's current value;
//! - each credential's version count equals its promoted rotations (no
//!   duplicate version, none lost).
//!
//! CI runs it for 40 s. The soak is the same test for longer:
//!
//! ```sh
//! KEYTURN_CHAOS_SECONDS=600 cargo nextest run --all-features --test chaos
//! ```
//!
//! `KEYTURN_CHAOS_SEED` replays a run (the seed is printed).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::*;
use rand::{Rng, SeedableRng};

const JSON_CREDS: usize = 8;
const RAW_CREDS: usize = 2;
const VALUE_LEN: usize = 24;

fn config() -> String {
    let mut s = agent_table("bot");
    let cred = |id: &str, generate: &str, deliver: &str| {
        format!(
            "[agents.bot.credentials.{id}]\nvault = \"local\"\ngenerate = {generate}\nevery = \"1s\"\njitter = \"300ms\"\ngrace = \"500ms\"\ndeliver = [{deliver}]\n"
        )
    };
    let password = format!("{{ kind = \"password\", length = {VALUE_LEN} }}");
    for i in 0..JSON_CREDS {
        s.push_str(&cred(
            &format!("j{i}"),
            &password,
            &format!("{{ type = \"file\", path = \"{{root}}/bot/j{i}.json\", format = \"json\" }}"),
        ));
    }
    for i in 0..RAW_CREDS {
        s.push_str(&cred(
            &format!("r{i}"),
            &password,
            &format!("{{ type = \"file\", path = \"{{root}}/bot/r{i}\" }}"),
        ));
    }
    s.push_str(&cred(
        "k0",
        "{ kind = \"ed25519\" }",
        "{ type = \"file\", path = \"{root}/bot/k0\" }",
    ));
    s
}

#[derive(Clone, Copy)]
enum Kind {
    Json,
    Raw,
    Bundle,
}

/// What one read found: a version (None for raw files, which carry none),
/// or a reason the content was bad. `Ok(None)` with no file yet is fine.
fn read_once(path: &Path, kind: Kind) -> Result<Option<u64>, String> {
    let read = |p: &Path| match std::fs::read(p) {
        Ok(b) => Ok(Some(b)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("{}: {e}", p.display())),
    };
    match kind {
        Kind::Json => {
            let Some(bytes) = read(path)? else {
                return Ok(None);
            };
            let v: serde_json::Value = serde_json::from_slice(&bytes).map_err(|e| {
                format!("{}: not JSON ({e}), {} bytes", path.display(), bytes.len())
            })?;
            let value = v["value"].as_str().unwrap_or_default();
            if value.len() != VALUE_LEN {
                return Err(format!(
                    "{}: value of {} bytes",
                    path.display(),
                    value.len()
                ));
            }
            v["version"]
                .as_u64()
                .map(Some)
                .ok_or_else(|| format!("{}: no version", path.display()))
        }
        Kind::Raw => {
            let Some(bytes) = read(path)? else {
                return Ok(None);
            };
            if bytes.len() != VALUE_LEN {
                return Err(format!("{}: {} bytes", path.display(), bytes.len()));
            }
            Ok(None)
        }
        Kind::Bundle => {
            // As documented: resolve `..data` once, read both files from there.
            let data = match std::fs::read_link(path.join("..data")) {
                Ok(d) => path.join(d),
                Err(_) => return Ok(None),
            };
            let (Some(private), Some(meta)) = (
                read(&data.join("private.pem"))?,
                read(&data.join("meta.json"))?,
            ) else {
                // Pruned after two swaps while we held its name: a reader
                // would resolve `..data` again.
                return Ok(None);
            };
            let private = String::from_utf8_lossy(&private);
            if !private.starts_with("-----BEGIN PRIVATE KEY-----")
                || !private.trim_end().ends_with("-----END PRIVATE KEY-----")
            {
                return Err(format!("{}: a partial private key", data.display()));
            }
            let meta: serde_json::Value = serde_json::from_slice(&meta)
                .map_err(|e| format!("{}: meta.json is not JSON ({e})", data.display()))?;
            meta["version"]
                .as_u64()
                .map(Some)
                .ok_or_else(|| format!("{}: meta.json without a version", data.display()))
        }
    }
}

struct Readers {
    stop: Arc<AtomicBool>,
    reads: Arc<AtomicU64>,
    threads: Vec<std::thread::JoinHandle<Vec<String>>>,
}

impl Readers {
    fn start(files: Vec<(PathBuf, Kind)>) -> Readers {
        let stop = Arc::new(AtomicBool::new(false));
        let reads = Arc::new(AtomicU64::new(0));
        let threads = files
            .into_iter()
            .map(|(path, kind)| {
                let stop = stop.clone();
                let reads = reads.clone();
                std::thread::spawn(move || {
                    let mut bad = Vec::new();
                    let mut newest = 0;
                    while !stop.load(Ordering::Relaxed) {
                        match read_once(&path, kind) {
                            Ok(Some(v)) if v < newest => bad.push(format!(
                                "{}: version {v} after version {newest}",
                                path.display()
                            )),
                            Ok(Some(v)) => newest = v,
                            Ok(None) => {}
                            Err(e) => bad.push(e),
                        }
                        reads.fetch_add(1, Ordering::Relaxed);
                        if bad.len() > 20 {
                            break;
                        }
                        // Thousands of reads a second each, without starving
                        // the daemon of the machine's two cores.
                        std::thread::sleep(Duration::from_micros(200));
                    }
                    bad
                })
            })
            .collect();
        Readers {
            stop,
            reads,
            threads,
        }
    }

    fn finish(self) -> (u64, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        let bad = self
            .threads
            .into_iter()
            .flat_map(|t| t.join().expect("reader thread"))
            .collect();
        (self.reads.load(Ordering::Relaxed), bad)
    }
}

/// `name` from the environment, if it is set and parses.
fn env_value<T: std::str::FromStr>(name: &str) -> Option<T> {
    std::env::var(name).ok().and_then(|s| s.parse().ok())
}

#[test]
fn random_kill_9_under_load_loses_nothing_and_readers_never_see_a_bad_file() {
    let seconds: u64 = env_value("KEYTURN_CHAOS_SECONDS").unwrap_or(40);
    let seed: u64 = env_value("KEYTURN_CHAOS_SEED").unwrap_or_else(rand::random);
    eprintln!("chaos: {seconds} s, KEYTURN_CHAOS_SEED={seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);

    let env = Env::new(&config());
    let bot = env.root().join("bot");
    let mut files: Vec<(PathBuf, Kind)> = (0..JSON_CREDS)
        .map(|i| (bot.join(format!("j{i}.json")), Kind::Json))
        .collect();
    files.extend((0..RAW_CREDS).map(|i| (bot.join(format!("r{i}")), Kind::Raw)));
    files.push((bot.join("k0"), Kind::Bundle));
    let readers = Readers::start(files);

    let until = Instant::now() + Duration::from_secs(seconds);
    let mut kills = 0;
    while Instant::now() < until {
        let daemon = env.start();
        let lifetime = Duration::from_millis(rng.gen_range(300..4000));
        let born = Instant::now();
        while born.elapsed() < lifetime {
            std::thread::sleep(Duration::from_millis(rng.gen_range(50..700)));
            match rng.gen_range(0..10) {
                0 => {
                    let _ = env.cli(&["rotate", "all"]);
                }
                1 => {
                    let c = format!("bot/j{}", rng.gen_range(0..JSON_CREDS));
                    let _ = env.cli(&["rotate", &c]);
                }
                2 => daemon.signal(libc::SIGHUP),
                _ => {}
            }
        }
        daemon.kill9();
        kills += 1;
    }

    // The last start, with the schedules frozen (an `every = "1s"`
    // credential is hardly ever idle): whatever was in flight finishes and
    // every previous version is retired, then a clean stop.
    let text = std::fs::read_to_string(&env.config).unwrap();
    std::fs::write(
        &env.config,
        text.replace("every = \"1s\"", "every = \"1h\""),
    )
    .unwrap();
    let daemon = env.start();
    let settled = wait_for(Duration::from_secs(60), || {
        let rows = status_json(&env);
        rows.iter()
            .all(|r| r["state"] == "idle" && r["version"].as_u64().is_some())
            .then_some(rows)
    });
    // Let the readers see the final state too, then stop them.
    std::thread::sleep(Duration::from_millis(300));
    let (reads, bad) = readers.finish();
    daemon.stop();
    let rows = settled.unwrap_or_else(|| panic!("never settled: {:?}", status_json(&env)));
    eprintln!("chaos: {kills} kills, {reads} reads");
    assert!(kills >= 5, "only {kills} kills in {seconds} s");
    assert!(
        bad.is_empty(),
        "bad reads (seed {seed}):\n{}",
        bad.join("\n")
    );

    let leftovers = temp_files(&env);
    assert!(
        leftovers.is_empty(),
        "temp files left (seed {seed}): {leftovers:?}"
    );
    audit_verifies(&env, &format!("seed {seed}"));

    // Promoted rotations per credential, from the audit log (a step replayed
    // after a kill is recorded again, under the same rotation id).
    let mut promoted: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for r in audit_records(&env) {
        if r["event"] == "rotation.promote" && r["outcome"] == "ok" {
            promoted
                .entry(r["credential"].as_str().unwrap_or("?").to_owned())
                .or_default()
                .insert(r["rotation"].as_str().unwrap_or("?").to_owned());
        }
    }
    for row in &rows {
        let cred = row["credential"].as_str().unwrap();
        let version = row["version"].as_u64().unwrap();
        let (vault_ref, current) = block_on(local_vault_value(
            &env,
            "local",
            &bot_key(cred),
            keyturn::vaults::Select::Stage(keyturn::model::Stage::Current),
        ))
        .unwrap_or_else(|| panic!("{cred}: no current version in the vault"));
        assert_eq!(
            vault_ref,
            version.to_string(),
            "{cred}: status and vault disagree"
        );
        assert_eq!(
            promoted.get(cred).map_or(0, |p| p.len() as u64),
            version,
            "{cred}: versions != promoted rotations (seed {seed})"
        );
        let delivered = match cred.chars().next() {
            Some('j') => {
                let v: serde_json::Value = serde_json::from_slice(
                    &std::fs::read(bot.join(format!("{cred}.json"))).unwrap(),
                )
                .unwrap();
                assert_eq!(v["version"].as_u64(), Some(version), "{cred}");
                v["value"].as_str().unwrap().as_bytes().to_vec()
            }
            Some('r') => std::fs::read(bot.join(cred)).unwrap(),
            _ => std::fs::read(bot.join(cred).join("private.pem")).unwrap(),
        };
        assert_eq!(
            delivered, current,
            "{cred}: the delivered value is not the vault's current (seed {seed})"
        );
    }
    assert_eq!(rows.len(), JSON_CREDS + RAW_CREDS + 1);
}
