//! The local vault's tests.

use std::os::unix::fs::PermissionsExt;

use super::*;
use crate::test_support::secret;
use crate::vaults::contract::{assert_error, item, stage_and_promote, stage_new};

const KEY: [u8; KEY_LEN] = [7u8; KEY_LEN];

fn open(dir: &Path) -> LocalVault {
    LocalVault::open("test", dir, LocalKey::from_bytes(KEY)).unwrap()
}

/// A new vault in a new temporary directory.
fn fresh() -> (tempfile::TempDir, LocalVault) {
    let dir = tempfile::tempdir().unwrap();
    let vault = open(dir.path());
    (dir, vault)
}

fn v(n: u64) -> VersionRef {
    VersionRef(n.to_string())
}

async fn by_stage(vault: &LocalVault, path: &str, stage: Stage) -> Option<(String, Vec<u8>)> {
    vault
        .read(item(path), Select::Stage(stage))
        .await
        .unwrap()
        .map(|s| (s.version.0, s.value.expose().to_vec()))
}

fn raw_db(dir: &Path) -> Connection {
    Connection::open(dir.join(DB_FILE)).unwrap()
}

/// The one number `sql` selects from the vault's database in `dir`.
fn query_number(dir: &Path, sql: &str) -> i64 {
    raw_db(dir).query_row(sql, [], |r| r.get(0)).unwrap()
}

/// Stages and promotes `times` rotations of `it`, versions 1 to `times`.
async fn rotate(vault: &LocalVault, it: VaultItem<'_>, times: u64) {
    for n in 1..=times {
        rotate_to(vault, it, n, "x").await;
    }
}

async fn contract_subject() -> (LocalVault, String, tempfile::TempDir) {
    let (dir, vault) = fresh();
    (vault, "agents/bot/db".to_owned(), dir)
}

crate::vaults::contract::vault_contract!(open = contract_subject);

// The contract suite checks stages, replays, retire and destroy through
// the trait; the tests below check what it cannot see (the rows) and
// what is this vault's own (its error kinds and messages, numbering).

#[tokio::test]
async fn retired_values_leave_no_ciphertext_in_their_row() {
    let (dir, vault) = fresh();
    let it = item("agents/bot/db");
    rotate(&vault, it, 3).await;
    // Version 1 was retired by the third promote, version 2 by retire.
    vault.retire(it, &v(2)).await.unwrap();
    let raw = raw_db(dir.path());
    for version in [1, 2] {
        let (stage, nonce, ct): (String, Option<Vec<u8>>, Option<Vec<u8>>) = raw
            .query_row(
                "SELECT stage, nonce, ciphertext FROM versions WHERE version = ?1",
                [version],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .unwrap();
        assert_eq!(stage, "retired", "version {version}");
        assert!(nonce.is_none() && ct.is_none(), "version {version}");
    }
}

#[tokio::test]
async fn a_stage_replay_adds_no_row() {
    let (dir, vault) = fresh();
    let it = item("p");
    let r1 = RotationId::generate();
    vault
        .stage(it.pending(&r1, &secret("first")))
        .await
        .unwrap();
    vault
        .stage(it.pending(&r1, &secret("second")))
        .await
        .unwrap();
    vault.promote(it, &v(1)).await.unwrap();
    vault
        .stage(it.pending(&r1, &secret("third")))
        .await
        .unwrap();
    assert_eq!(query_number(dir.path(), "SELECT count(*) FROM versions"), 1);
}

#[tokio::test]
async fn an_abandoned_version_is_a_conflict_to_promote_and_its_replay_finds_it() {
    let (_dir, vault) = fresh();
    let it = item("p");
    let (r1, r2) = (RotationId::generate(), RotationId::generate());
    assert_eq!(
        vault.stage(it.pending(&r1, &secret("old"))).await.unwrap(),
        v(1)
    );
    assert_eq!(
        vault.stage(it.pending(&r2, &secret("new"))).await.unwrap(),
        v(2)
    );
    let e = vault.promote(it, &v(1)).await.unwrap_err();
    assert_eq!(e.kind, ErrorKind::Conflict, "{e}");
    // The abandoned rotation's replay finds its (retired) version, never a new one.
    assert_eq!(
        vault
            .stage(it.pending(&r1, &secret("again")))
            .await
            .unwrap(),
        v(1)
    );
    assert_eq!(by_stage(&vault, "p", Stage::Pending).await.unwrap().0, "2");
}

#[tokio::test]
async fn promote_names_an_unknown_version_and_refuses_malformed_ones() {
    let (_dir, vault) = fresh();
    let it = item("p");
    let e = vault.promote(it, &v(99)).await.unwrap_err();
    assert_error(&e, ErrorKind::NotFound, &["version 99", "p"], &[]);
    for junk in ["abc", "0", "-1", "01", "+2", ""] {
        let e = vault
            .promote(it, &VersionRef(junk.into()))
            .await
            .unwrap_err();
        assert_eq!(e.kind, ErrorKind::Invalid, "{junk:?}");
    }
}

#[tokio::test]
async fn destroy_deletes_the_rows_and_numbers_go_on() {
    let (dir, vault) = fresh();
    let it = item("p");
    rotate(&vault, it, 3).await;
    stage_new(&vault, "p", "y").await.unwrap();
    vault.destroy(it).await.unwrap();
    let rows = query_number(dir.path(), "SELECT count(*) FROM versions WHERE path = 'p'");
    assert_eq!(rows, 0);
    assert_eq!(stage_new(&vault, "p", "z").await.unwrap(), v(5));
}

#[tokio::test]
async fn retired_history_is_bounded() {
    let (dir, vault) = fresh();
    let it = item("p");
    rotate(&vault, it, 40).await;
    let rows = query_number(dir.path(), "SELECT count(*) FROM versions");
    assert_eq!(rows, RETIRED_KEPT + 2);
    assert_eq!(by_stage(&vault, "p", Stage::Current).await.unwrap().0, "40");
}

#[tokio::test]
async fn values_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    stage_new(&open(dir.path()), "p", "durable").await.unwrap();
    let vault = open(dir.path());
    assert_eq!(
        by_stage(&vault, "p", Stage::Pending).await.unwrap().1,
        b"durable"
    );
}

#[tokio::test]
async fn values_are_encrypted_at_rest() {
    let tmp = tempfile::tempdir().unwrap();
    // A directory the vault creates itself, to check its mode too.
    let vdir = tmp.path().join("vaults/local");
    let vault = open(&vdir);
    let canary = "canary-7d1f0b9e-not-in-any-file";
    let path = "agents/bot/canary-path";
    stage_new(&vault, path, canary).await.unwrap();
    vault.promote(item(path), &v(1)).await.unwrap();
    assert_eq!(
        by_stage(&vault, path, Stage::Current).await.unwrap().1,
        canary.as_bytes()
    );

    let mut all = Vec::new();
    for f in std::fs::read_dir(&vdir).unwrap() {
        let f = f.unwrap();
        let mode = f.metadata().unwrap().permissions().mode() & 0o777;
        assert_eq!(mode & 0o077, 0, "{:?} is {mode:o}", f.file_name());
        all.extend(std::fs::read(f.path()).unwrap());
    }
    let find = |needle: &[u8]| all.windows(needle.len()).any(|w| w == needle);
    // The scan does see the data (the path is stored in clear)...
    assert!(
        find(path.as_bytes()),
        "scan did not see the path: scanning the wrong files?"
    );
    // ...but never the value.
    assert!(!find(canary.as_bytes()));
    assert!(!find(&canary.as_bytes()[..12]));
    let mode = std::fs::metadata(&vdir).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700);
}

#[tokio::test]
async fn wrong_key_is_fatal_and_names_the_vault() {
    let dir = tempfile::tempdir().unwrap();
    open(dir.path());
    let e = LocalVault::open("test", dir.path(), LocalKey::from_bytes([8u8; KEY_LEN])).unwrap_err();
    assert_error(&e, ErrorKind::Fatal, &["local vault test", "key"], &[]);
}

#[tokio::test]
async fn wrong_key_on_a_row_is_fatal_naming_path_and_version() {
    let dir = tempfile::tempdir().unwrap();
    stage_new(&open(dir.path()), "p", "x").await.unwrap();
    // Without the key check (an old or damaged file), a wrong key still
    // cannot read anything: each row fails on its own.
    raw_db(dir.path())
        .execute("DELETE FROM meta WHERE name = 'key_check'", [])
        .unwrap();
    let vault = LocalVault::open("test", dir.path(), LocalKey::from_bytes([9u8; KEY_LEN])).unwrap();
    let e = vault
        .read(item("p"), Select::Version(&v(1)))
        .await
        .unwrap_err();
    assert_error(&e, ErrorKind::Fatal, &["p", "version 1"], &[]);
}

#[tokio::test]
async fn tampered_swapped_or_corrupt_rows_are_fatal_not_panics() {
    let (dir, vault) = fresh();
    for path in ["a", "b", "c", "d", "e"] {
        stage_new(&vault, path, path).await.unwrap();
    }
    let raw = raw_db(dir.path());
    // a: one flipped ciphertext bit.
    raw.execute(
        "UPDATE versions SET ciphertext = (SELECT ciphertext FROM versions WHERE path = 'a') || x'00' WHERE path = 'a'",
        [],
    )
    .unwrap();
    // b: c's sealed value moved onto b.
    raw.execute(
        "UPDATE versions SET (nonce, ciphertext) = (SELECT nonce, ciphertext FROM versions WHERE path = 'c') WHERE path = 'b'",
        [],
    )
    .unwrap();
    // c: nonce of the wrong length (would panic in XNonce::from_slice).
    raw.execute("UPDATE versions SET nonce = x'0102' WHERE path = 'c'", [])
        .unwrap();
    // d: value missing on a live row.
    raw.execute("UPDATE versions SET ciphertext = NULL WHERE path = 'd'", [])
        .unwrap();
    // e: a version column that is not a number, and columns of the wrong type.
    raw.execute(
        "UPDATE versions SET version = 'x', nonce = 'text', ciphertext = 42 WHERE path = 'e'",
        [],
    )
    .unwrap();
    drop(raw);
    for path in ["a", "b", "c", "d", "e"] {
        let e = vault
            .read(item(path), Select::Stage(Stage::Pending))
            .await
            .unwrap_err();
        assert_error(&e, ErrorKind::Fatal, &[path], &[]);
    }
    // The vault keeps working for healthy rows.
    stage_new(&vault, "f", "f").await.unwrap();
    assert_eq!(by_stage(&vault, "f", Stage::Pending).await.unwrap().1, b"f");
    vault.check().await.unwrap();
}

#[tokio::test]
async fn unsafe_paths_are_refused() {
    let (_dir, vault) = fresh();
    for path in ["", "/abs", "a/../b", "..", "a//b", "a/", "./a", "a\nb"] {
        let e = stage_new(&vault, path, "x").await.unwrap_err();
        assert_eq!(e.kind, ErrorKind::Invalid, "{path:?}");
        let e = vault.destroy(item(path)).await.unwrap_err();
        assert_eq!(e.kind, ErrorKind::Invalid, "{path:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_stages_on_many_paths() {
    let (_dir, vault) = fresh();
    let tasks: Vec<_> = (0..64)
        .map(|i| {
            let vault = vault.clone();
            tokio::spawn(async move {
                let path = format!("agents/a{i}/db");
                stage_and_promote(&vault, &path, &format!("v{i}")).await;
                let got = vault
                    .read(item(&path), Select::Stage(Stage::Current))
                    .await
                    .unwrap()
                    .unwrap();
                assert_eq!(got.value.expose(), format!("v{i}").as_bytes());
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    vault.check().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_write_does_not_spoil_its_batch() {
    let (_dir, vault) = fresh();
    // Interleave good stages with promotes that must fail, so they share
    // group-commit batches.
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..100 {
        let vault = vault.clone();
        tasks.spawn(async move {
            let path = format!("p{i}");
            if i % 2 == 0 {
                stage_new(&vault, &path, &path).await.map(|_| ())
            } else {
                vault.promote(item(&path), &v(7)).await
            }
        });
    }
    let mut results = Vec::new();
    while let Some(r) = tasks.join_next().await {
        results.push(r.unwrap());
    }
    assert_eq!(results.iter().filter(|r| r.is_ok()).count(), 50);
    assert!(
        results
            .iter()
            .filter_map(|r| r.as_ref().err())
            .all(|e| e.kind == ErrorKind::NotFound)
    );
    for i in (0..100).step_by(2) {
        let path = format!("p{i}");
        assert_eq!(
            by_stage(&vault, &path, Stage::Pending).await.unwrap().1,
            path.as_bytes()
        );
    }
}

#[test]
fn key_file_is_created_0600_and_reused() {
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("sub/vault.key");
    let k1 = load_key_from(&key_file, "vault-key", false, None, None).unwrap();
    let meta = std::fs::metadata(&key_file).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    let text = std::fs::read_to_string(&key_file).unwrap();
    assert_eq!(text.len(), 65);
    assert!(text[..64].bytes().all(|b| b.is_ascii_hexdigit()) && text.ends_with('\n'));
    let k2 = load_key_from(&key_file, "vault-key", false, None, None).unwrap();
    assert_eq!(*k1.0, *k2.0);
    assert_ne!(*k1.0, [0u8; KEY_LEN]);
    // And a vault opened with it opens again with the reloaded key.
    let vdir = dir.path().join("v");
    LocalVault::open("t", &vdir, k1).unwrap();
    LocalVault::open(
        "t",
        &vdir,
        load_key_from(&key_file, "vault-key", false, None, None).unwrap(),
    )
    .unwrap();
}

#[test]
fn unsafe_key_files_are_refused_with_the_file_named() {
    let dir = tempfile::tempdir().unwrap();
    let good = key_file(dir.path(), "good.key", hex::encode(KEY), 0o600);
    assert_eq!(
        *load_key_from(&good, "k", false, None, None).unwrap().0,
        KEY
    );

    let readable = key_file(dir.path(), "readable.key", hex::encode(KEY), 0o644);
    let e = load_key_from(&readable, "k", false, None, None).unwrap_err();
    assert_error(&e, ErrorKind::Invalid, &["readable.key", "0644"], &[]);

    let group = key_file(dir.path(), "group.key", KEY, 0o640);
    assert_eq!(
        load_key_from(&group, "k", false, None, None)
            .unwrap_err()
            .kind,
        ErrorKind::Invalid
    );

    let link = dir.path().join("link.key");
    std::os::unix::fs::symlink(&good, &link).unwrap();
    let e = load_key_from(&link, "k", false, None, None).unwrap_err();
    assert_error(&e, ErrorKind::Invalid, &["link.key", "symlink"], &[]);

    for (name, content) in [
        ("short.key", b"abcdef".to_vec()),
        ("long.key", vec![b'a'; 1000]),
        ("nothex.key", vec![b'z'; 64]),
        ("empty.key", Vec::new()),
    ] {
        let p = key_file(dir.path(), name, content, 0o600);
        let e = load_key_from(&p, "k", false, None, None).unwrap_err();
        // Nothing of the file's content is echoed.
        assert_error(&e, ErrorKind::Invalid, &[name], &["zzzz", "aaaa"]);
    }
}

/// `name` in `dir`, holding `content`, with permissions `mode`.
fn key_file(dir: &Path, name: &str, content: impl AsRef<[u8]>, mode: u32) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, content).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
    p
}

/// An empty credentials directory in `dir`, and a key file path beside it.
fn creds_and_key_file(dir: &Path) -> (PathBuf, PathBuf) {
    let creds = dir.join("creds");
    std::fs::create_dir(&creds).unwrap();
    (creds, dir.join("vault.key"))
}

#[test]
fn credentials_directory_wins_over_the_key_file() {
    let dir = tempfile::tempdir().unwrap();
    let (creds, key_file) = creds_and_key_file(dir.path());

    // Raw 32 bytes.
    std::fs::write(creds.join("vault-key"), KEY).unwrap();
    let k = load_key_from(&key_file, "vault-key", false, Some(&creds), None).unwrap();
    assert_eq!(*k.0, KEY);
    assert!(
        !key_file.exists(),
        "the key file must not be created when the credential is there"
    );

    // 64 hex characters and a newline.
    let other = [3u8; KEY_LEN];
    std::fs::write(creds.join("hex-key"), format!("{}\n", hex::encode(other))).unwrap();
    assert_eq!(
        *load_key_from(&key_file, "hex-key", false, Some(&creds), None)
            .unwrap()
            .0,
        other
    );

    // Credential absent: falls back to (and creates) the key file.
    let k = load_key_from(&key_file, "missing", false, Some(&creds), None).unwrap();
    assert!(key_file.exists());
    assert_ne!(*k.0, KEY);

    // A bad credential is an error, not a silent fallback.
    std::fs::write(creds.join("bad"), b"nope").unwrap();
    let e = load_key_from(&key_file, "bad", false, Some(&creds), None).unwrap_err();
    assert_error(&e, ErrorKind::Invalid, &["bad"], &[]);
    let e = load_key_from(&key_file, "../vault.key", false, Some(&creds), None).unwrap_err();
    assert_eq!(e.kind, ErrorKind::Invalid);
}

/// A key credential the config names is the key: when systemd did not pass
/// it, that is an error, never a reason to make a new key file (which
/// would encrypt new values under a key nobody backed up).
#[test]
fn a_named_key_credential_that_is_missing_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let (creds, key_file) = creds_and_key_file(dir.path());
    for credentials_dir in [Some(creds.as_path()), None] {
        let e = load_key_from(&key_file, "vault-key", true, credentials_dir, None).unwrap_err();
        // It names the credential and what to do.
        let names = ["`vault-key`", "LoadCredential"];
        assert_error(&e, ErrorKind::Invalid, &names, &[]);
        assert!(!key_file.exists(), "no key file made");
    }
    std::fs::write(creds.join("vault-key"), KEY).unwrap();
    assert_eq!(
        *load_key_from(&key_file, "vault-key", true, Some(&creds), None)
            .unwrap()
            .0,
        KEY
    );
}

/// A crash between creating the key file and writing it must not leave an
/// empty key file behind, which every later start would refuse.
#[cfg(feature = "failpoints")]
#[test]
fn a_crash_while_creating_the_key_file_leaves_no_empty_key() {
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("vault.key");
    fail::cfg(KEY_CRASH_POINT, "return").unwrap();
    let crashed = load_key_from(&key_file, "vault-key", false, None, None);
    fail::remove(KEY_CRASH_POINT);
    assert!(crashed.is_err(), "the failpoint stopped the creation");
    let k1 = load_key_from(&key_file, "vault-key", false, None, None)
        .expect("the next start makes a key instead of refusing a leftover");
    let k2 = load_key_from(&key_file, "vault-key", false, None, None).unwrap();
    assert_eq!(*k1.0, *k2.0);
    assert_eq!(std::fs::read(&key_file).unwrap().len(), 65);
}

/// The stage is bound to the ciphertext: a row whose stage was changed in
/// the database (previous made current: a rollback) fails to open instead
/// of handing out the old value as the current one.
#[tokio::test]
async fn a_stage_changed_in_the_database_is_detected() {
    let (dir, vault) = fresh();
    let it = item("agents/bot/db");
    rotate_to(&vault, it, 1, "old-canary").await;
    rotate_to(&vault, it, 2, "new-canary").await;
    assert_eq!(
        current_and_previous(&vault).await,
        [
            Some(("2".into(), b"new-canary".to_vec())),
            Some(("1".into(), b"old-canary".to_vec()))
        ]
    );
    raw_db(dir.path())
        .execute(
            "UPDATE versions SET stage = CASE stage WHEN 'current' THEN 'previous' ELSE 'current' END
             WHERE path = 'agents/bot/db' AND stage IN ('current', 'previous')",
            [],
        )
        .unwrap();
    let e = vault
        .read(it, Select::Stage(Stage::Current))
        .await
        .unwrap_err();
    assert_error(&e, ErrorKind::Fatal, &["version 1"], &["canary"]);
}

/// Vaults written before the stage was bound (the v1 associated data)
/// stay readable: opening one re-seals its values with the stage, once.
#[tokio::test]
async fn a_vault_sealed_without_the_stage_is_migrated_on_open() {
    let dir = tempfile::tempdir().unwrap();
    let it = item("agents/bot/db");
    // Two rotations, the vault closed again at the end of the statement.
    rotate(&open(dir.path()), it, 2).await;
    // Re-seal every value as the v1 format did, and mark the file v1.
    let cipher = LocalKey::from_bytes(KEY).cipher();
    let raw = raw_db(dir.path());
    let rows: Vec<(i64, String, String, Vec<u8>)> = raw
        .prepare(
            "SELECT version, rotation_id, stage, nonce FROM versions WHERE ciphertext IS NOT NULL",
        )
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(rows.len(), 2);
    for (version, rotation, stage, nonce) in rows {
        let value = format!("v1-{stage}");
        let ct = cipher
            .encrypt(
                XNonce::from_slice(&nonce),
                Payload {
                    msg: value.as_bytes(),
                    aad: &version_aad_v1("agents/bot/db", version, &rotation),
                },
            )
            .unwrap();
        raw.execute(
            "UPDATE versions SET ciphertext = ?1 WHERE path = 'agents/bot/db' AND version = ?2",
            params![ct, version],
        )
        .unwrap();
    }
    raw.execute("UPDATE meta SET value = 1 WHERE name = 'schema'", [])
        .unwrap();
    drop(raw);

    let vault = open(dir.path());
    assert_eq!(
        current_and_previous(&vault).await,
        [
            Some(("2".into(), b"v1-current".to_vec())),
            Some(("1".into(), b"v1-previous".to_vec()))
        ]
    );
    let schema = query_number(dir.path(), "SELECT value FROM meta WHERE name = 'schema'");
    assert_eq!(schema, SCHEMA_VERSION, "migrated once");
    // And it keeps working: a rotation moves both stages on.
    rotate_to(&vault, it, 3, "x").await;
    assert_eq!(
        by_stage(&vault, "agents/bot/db", Stage::Previous).await,
        Some(("2".into(), b"v1-current".to_vec()))
    );
}

/// The current and the previous version of `agents/bot/db` and their values.
async fn current_and_previous(vault: &LocalVault) -> [Option<(String, Vec<u8>)>; 2] {
    [
        by_stage(vault, "agents/bot/db", Stage::Current).await,
        by_stage(vault, "agents/bot/db", Stage::Previous).await,
    ]
}

/// Stages and promotes one more rotation of `it`, `value` as version `n`.
async fn rotate_to(vault: &LocalVault, it: VaultItem<'_>, n: u64, value: &str) {
    vault
        .stage(it.pending(&RotationId::generate(), &secret(value)))
        .await
        .unwrap();
    vault.promote(it, &v(n)).await.unwrap();
}

/// Throughput table, not an assertion: `KT_BENCH_N=100000 cargo test --lib
/// vaults::local::tests::bench -- --ignored --nocapture`. Each credential
/// is staged, promoted and read back, `KT_BENCH_CONCURRENCY` at a time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark; run by hand"]
async fn bench_stage_promote_read() {
    let n: usize = std::env::var("KT_BENCH_N")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10_000);
    let conc: usize = std::env::var("KT_BENCH_CONCURRENCY")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(32);
    let dir =
        tempfile::tempdir_in(std::env::var("KT_BENCH_DIR").unwrap_or_else(|_| ".".into())).unwrap();
    let vault = open(dir.path());
    let sem = Arc::new(tokio::sync::Semaphore::new(conc));
    println!("| phase | credentials | seconds | ops/s |");
    println!("|---|---|---|---|");
    for phase in ["stage", "promote", "read current"] {
        let start = std::time::Instant::now();
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..n {
            let (vault, sem) = (vault.clone(), sem.clone());
            tasks.spawn(async move {
                let _permit = sem.acquire().await.unwrap();
                let path = format!("agents/a{i}/db");
                let it = item(&path);
                match phase {
                    "stage" => {
                        stage_new(&vault, &path, "0123456789abcdef0123456789abcdef")
                            .await
                            .unwrap();
                    }
                    "promote" => vault.promote(it, &v(1)).await.unwrap(),
                    _ => assert!(
                        vault
                            .read(it, Select::Stage(Stage::Current))
                            .await
                            .unwrap()
                            .is_some()
                    ),
                }
            });
        }
        while let Some(r) = tasks.join_next().await {
            r.unwrap();
        }
        let secs = start.elapsed().as_secs_f64();
        println!("| {phase} | {n} | {secs:.2} | {:.0} |", n as f64 / secs);
    }
    let size = std::fs::metadata(dir.path().join(DB_FILE)).unwrap().len();
    println!("vault.db: {} KiB", size / 1024);
}

#[test]
fn key_debug_is_redacted() {
    let k = LocalKey::from_bytes(KEY);
    let s = format!("{k:?}");
    assert_eq!(s, "LocalKey([redacted])");
    let dir = tempfile::tempdir().unwrap();
    let vault = LocalVault::open("t", dir.path(), k).unwrap();
    assert!(!format!("{vault:?}").contains("07"));
}

/// A batch no caller needs durable (only retires) commits with
/// `synchronous=NORMAL`; every other batch, and every batch after it, with
/// `FULL`, whose WAL fsync covers the relaxed commit before it.
#[tokio::test]
async fn only_a_batch_of_retires_commits_without_fsync_and_full_comes_back() {
    let (dir, vault) = fresh();
    let setting = |durable: bool| {
        vault.write(durable, |_, conn| {
            conn.query_row("PRAGMA synchronous", [], |r| r.get::<_, i64>(0))
                .map_err(|e| PluginError::new(ErrorKind::Fatal, e.to_string()))
        })
    };
    const NORMAL: i64 = 1;
    const FULL: i64 = 2;
    assert_eq!(setting(true).await.unwrap(), FULL);
    assert_eq!(setting(false).await.unwrap(), NORMAL);
    assert_eq!(setting(true).await.unwrap(), FULL, "restored after");

    // A retire, then a stage: both land, and the previous value is gone.
    for n in 1..=3 {
        stage_and_promote(&vault, "p", &format!("value-{n}")).await;
    }
    vault.retire(item("p"), &v(2)).await.unwrap();
    assert_eq!(by_stage(&vault, "p", Stage::Previous).await, None);
    assert_eq!(setting(true).await.unwrap(), FULL);
    drop(vault);
    let vault = open(dir.path());
    assert_eq!(
        by_stage(&vault, "p", Stage::Previous).await,
        None,
        "after reopening"
    );
    assert_eq!(
        by_stage(&vault, "p", Stage::Current).await,
        Some(("3".to_owned(), b"value-3".to_vec()))
    );
}
