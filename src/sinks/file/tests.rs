//! The file sink's tests.

use std::os::unix::fs::{MetadataExt, PermissionsExt, symlink};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use chrono::TimeZone;

use super::*;
use crate::model::RotationId;
use crate::test_support::{assert_root, key, secret};

const AGENT: &str = "invoice-bot";

fn cfg(path: &Path, format: FileFormat) -> FileConfig {
    FileConfig {
        env_name: Some("DB".into()),
        ..FileConfig::new(path, format)
    }
}

/// A sink writing as the daemon's own user.
fn new_sink(cfg: FileConfig, roots: &[PathBuf]) -> Result<FileSink, PluginError> {
    FileSink::new(
        cfg,
        &SinkContext {
            delivery_roots: roots,
            uid: None,
            gid: None,
            former_uid: None,
            reader: None,
        },
    )
}

fn sink(root: &Path, path: &Path, format: FileFormat) -> FileSink {
    new_sink(cfg(path, format), &[root.to_path_buf()]).expect("valid sink")
}

/// A sink writing `root/AGENT/name`, and that path.
fn agent_sink(root: &Path, name: &str, format: FileFormat) -> (PathBuf, FileSink) {
    let path = root.join(AGENT).join(name);
    let s = sink(root, &path, format);
    (path, s)
}

/// Delivers `value` as `version` of a password.
async fn deliver_password(
    s: &FileSink,
    version: u64,
    value: &str,
) -> Result<Delivered, PluginError> {
    s.deliver(&notice(version, ValueKind::Password, None), &secret(value))
        .await
}

/// `root/AGENT`, created (empty).
fn agent_dir(root: &Path) -> PathBuf {
    let dir = root.join(AGENT);
    std::fs::create_dir(&dir).unwrap();
    dir
}

fn notice(version: u64, kind: ValueKind, public: Option<&str>) -> Notice {
    Notice {
        key: key(AGENT, "db"),
        tenant: "acme".into(),
        owner: "alice@example.com".into(),
        version,
        previous_version: version.checked_sub(1).filter(|&v| v > 0),
        rotation: RotationId::parse(&format!("{version:032x}")).unwrap(),
        rotated_at: Utc.with_ymd_and_hms(2026, 1, 2, 3, 4, 5).unwrap(),
        expires_hint: None,
        kind,
        public: public.map(str::to_owned),
        login: None,
        grace_until: None,
        file: None,
    }
}

fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

fn mode_of(p: &Path) -> u32 {
    std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777
}

#[tokio::test]
async fn raw_is_the_value_bytes_exactly() {
    let root = tempfile::tempdir().unwrap();
    let (path, s) = agent_sink(root.path(), "db", FileFormat::Raw);
    let got = deliver_password(&s, 1, "pa ss\n'x\"").await.unwrap();
    assert_eq!(got, Delivered::Acknowledged);
    assert_eq!(std::fs::read(&path).unwrap(), b"pa ss\n'x\"");
    assert_eq!(mode_of(&path), 0o400);
    // Only the file: no temp file left behind.
    assert_eq!(entries(&root.path().join(AGENT)), vec!["db"]);
}

#[tokio::test]
async fn json_has_every_documented_field() {
    let root = tempfile::tempdir().unwrap();
    let (path, s) = agent_sink(root.path(), "db.json", FileFormat::Json);
    let mut n = notice(7, ValueKind::Password, Some("ssh-ed25519 AAAA"));
    n.expires_hint = Some(Utc.with_ymd_and_hms(2026, 1, 3, 0, 0, 0).unwrap());
    s.deliver(&n, &secret("p\"w\\d")).await.unwrap();
    let doc: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    assert_eq!(
        doc,
        serde_json::json!({
            "value": "p\"w\\d",
            "version": 7,
            "rotation": format!("{:032x}", 7),
            "rotated_at": "2026-01-02T03:04:05Z",
            "expires_hint": "2026-01-03T00:00:00Z",
            "agent": AGENT,
            "credential": "db",
            "public": "ssh-ed25519 AAAA",
        })
    );
    // Without a public key there is no "public" field and the hint is null.
    deliver_password(&s, 8, "x").await.unwrap();
    let doc: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    assert!(doc.get("public").is_none());
    assert_eq!(doc["expires_hint"], serde_json::Value::Null);
    assert_eq!(doc["version"], 8);
}

#[tokio::test]
async fn env_quotes_single_quotes_and_sources_back() {
    let root = tempfile::tempdir().unwrap();
    let (path, s) = agent_sink(root.path(), "db.env", FileFormat::Env);
    let value = "it's $HOME `x` \"q\"";
    deliver_password(&s, 3, value).await.unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    assert_eq!(
        text, "DB='it'\\''s $HOME `x` \"q\"'\nDB_VERSION=3\n",
        "exact env content"
    );
    // A POSIX shell reads back exactly the value and the version.
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(r#". "$1"; printf '%s|%s' "$DB" "$DB_VERSION""#)
        .arg("sh")
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(String::from_utf8(out.stdout).unwrap(), format!("{value}|3"));
}

/// With alternating users the user name changes with the version, so it
/// is delivered next to the password, in json and env alike.
#[tokio::test]
async fn the_login_name_is_delivered_with_the_value() {
    let root = tempfile::tempdir().unwrap();
    let mut n = notice(4, ValueKind::Password, None);
    n.login = Some("bot's_clone".into());

    let json = root.path().join(AGENT).join("db.json");
    sink(root.path(), &json, FileFormat::Json)
        .deliver(&n, &secret("pw"))
        .await
        .unwrap();
    let doc: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    assert_eq!(doc["username"], "bot's_clone");
    assert_eq!(doc["value"], "pw");

    let env = root.path().join(AGENT).join("db.env");
    sink(root.path(), &env, FileFormat::Env)
        .deliver(&n, &secret("pw"))
        .await
        .unwrap();
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(r#". "$1"; printf '%s|%s|%s' "$DB" "$DB_VERSION" "$DB_USERNAME""#)
        .arg("sh")
        .arg(&env)
        .output()
        .unwrap();
    assert_eq!(String::from_utf8(out.stdout).unwrap(), "pw|4|bot's_clone");
}

/// The umask is per process, so this briefly changes it for every test
/// running at the same time; the sink's own tests do not depend on it
/// (that is the point), and the window is one delivery long.
#[tokio::test]
async fn mode_is_exact_whatever_the_umask() {
    for umask in [0o077, 0o000] {
        let root = tempfile::tempdir().unwrap();
        let path = root.path().join("tenant").join(AGENT).join("db");
        let mut c = cfg(&path, FileFormat::Raw);
        c.mode = Some("0440".into());
        let s = new_sink(c, &[root.path().to_path_buf()]).unwrap();
        let old = nix::sys::stat::umask(Mode::from_bits_truncate(umask));
        let res = deliver_password(&s, 1, "v").await;
        nix::sys::stat::umask(old);
        res.unwrap();
        assert_eq!(mode_of(&path), 0o440, "file mode with umask {umask:o}");
        // The agent directory is the file's parent here (the first
        // component is not named after the agent): 0750; above it 0755.
        assert_eq!(mode_of(&root.path().join("tenant").join(AGENT)), 0o750);
        assert_eq!(mode_of(&root.path().join("tenant")), 0o755);
    }
}

#[tokio::test]
async fn owner_is_set_on_file_and_agent_dir() {
    assert_root("chown");
    let root = tempfile::tempdir().unwrap();
    let path = root.path().join(AGENT).join("sub").join("db");
    let c = cfg(&path, FileFormat::Raw);
    let roots = [root.path().to_path_buf()];
    let ctx = SinkContext {
        delivery_roots: &roots,
        uid: Some(1234),
        gid: Some(1234),
        former_uid: None,
        reader: None,
    };
    let s = FileSink::new(c, &ctx).unwrap();
    deliver_password(&s, 1, "v").await.unwrap();
    for p in [
        path.clone(),
        root.path().join(AGENT),
        root.path().join(AGENT).join("sub"),
    ] {
        let m = std::fs::metadata(&p).unwrap();
        assert_eq!((m.uid(), m.gid()), (1234, 1234), "{}", p.display());
    }
    assert_eq!(mode_of(&root.path().join(AGENT)), 0o750);
    assert_eq!(mode_of(&root.path().join(AGENT).join("sub")), 0o750);
    // The root itself is not the agent's.
    assert_eq!(std::fs::metadata(root.path()).unwrap().uid(), 0);
}

/// Black-box finding: a file and a key pair delivered into one directory
/// not named after the agent (an agent renamed, its paths kept): once the
/// agent had a uid the file sink gave the directory to the agent, and the
/// bundle refused it ("owned by uid 1234, not by root or the daemon"),
/// failing every rotation. Both take the directory holding what they
/// deliver for the agent's.
#[tokio::test]
async fn a_file_and_a_bundle_in_one_directory_agree_it_is_the_agents() {
    assert_root("chown");
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("old-name");
    let roots = [root.path().to_path_buf()];
    let ctx = SinkContext {
        delivery_roots: &roots,
        uid: Some(1234),
        gid: Some(1234),
        former_uid: None,
        reader: None,
    };
    let file = FileSink::new(cfg(&dir.join("db"), FileFormat::Raw), &ctx).unwrap();
    let bundle = FileSink::new(cfg(&dir.join("signing"), FileFormat::Raw), &ctx).unwrap();
    deliver_password(&file, 1, "v").await.unwrap();
    assert_eq!(std::fs::metadata(&dir).unwrap().uid(), 1234, "the agent's");
    deliver_keypair(&bundle, 1).await;
    deliver_keypair(&bundle, 2).await;
    assert_eq!(std::fs::metadata(dir.join("signing")).unwrap().uid(), 1234);
    // The other way round: a bundle first, then the file.
    let other = root.path().join("other-name");
    let bundle = FileSink::new(cfg(&other.join("signing"), FileFormat::Raw), &ctx).unwrap();
    let file = FileSink::new(cfg(&other.join("db"), FileFormat::Raw), &ctx).unwrap();
    deliver_keypair(&bundle, 1).await;
    deliver_password(&file, 1, "v").await.unwrap();
    deliver_keypair(&bundle, 2).await;
    assert_eq!(std::fs::metadata(&other).unwrap().uid(), 1234);
    assert_eq!(mode_of(&other), 0o750);
}

#[tokio::test]
async fn same_version_twice_leaves_the_file_alone() {
    let root = tempfile::tempdir().unwrap();
    let (path, s) = agent_sink(root.path(), "db", FileFormat::Json);
    let n = notice(4, ValueKind::Password, None);
    s.deliver(&n, &secret("v4")).await.unwrap();
    let ino = std::fs::metadata(&path).unwrap().ino();
    s.deliver(&n, &secret("v4")).await.unwrap();
    assert_eq!(
        std::fs::metadata(&path).unwrap().ino(),
        ino,
        "not rewritten"
    );
    deliver_password(&s, 5, "v5").await.unwrap();
    assert_ne!(
        std::fs::metadata(&path).unwrap().ino(),
        ino,
        "new version replaces"
    );
}

/// Each symlink case: the delivery is refused as Invalid, the message
/// names the symlink, and nothing appears where the symlink points.
async fn assert_symlink_refused(root: &Path, path: &Path, link: &Path, outside: &Path) {
    let s = sink(root, path, FileFormat::Raw);
    let before = entries(outside);
    let err = deliver_password(&s, 1, "canary-sym-81c2")
        .await
        .unwrap_err();
    assert_eq!(err.kind, ErrorKind::Invalid, "{err}");
    assert!(err.message.contains("symlink"), "{err}");
    assert!(err.message.contains(&link.display().to_string()), "{err}");
    assert!(!err.message.contains("canary"), "{err}");
    assert_eq!(entries(outside), before, "nothing written outside the root");
    let err = s.preflight().await.unwrap_err();
    assert_eq!(err.kind, ErrorKind::Invalid, "preflight: {err}");
}

#[tokio::test]
async fn symlink_at_the_target_file_is_refused() {
    let root = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    let dir = agent_dir(root.path());
    let path = dir.join("db");
    symlink(outside.path().join("stolen"), &path).unwrap();
    assert_symlink_refused(root.path(), &path, &path, outside.path()).await;
    assert!(
        std::fs::symlink_metadata(&path)
            .unwrap()
            .file_type()
            .is_symlink()
    );
    // Retract (a decommission) removes the link itself, never what it
    // points to: a symlink the agent planted there cannot hold it up.
    std::fs::write(outside.path().join("stolen"), "not keyturn's").unwrap();
    let s = sink(root.path(), &path, FileFormat::Raw);
    s.retract(&notice(1, ValueKind::Password, None).key)
        .await
        .unwrap();
    assert!(
        std::fs::symlink_metadata(&path).is_err(),
        "the link is gone"
    );
    assert_eq!(
        std::fs::read_to_string(outside.path().join("stolen")).unwrap(),
        "not keyturn's"
    );
    assert!(s.retracted().await.unwrap().contains("is gone"));
}

/// Defect (black-box): a bundle holding a file the agent put there (or a
/// link of keyturn's replaced by one pointing elsewhere) could never be
/// retracted, so the decommission never ended. What keyturn put there goes
/// (names removed, never followed), the agent's own files stay, and the
/// proof names them.
#[tokio::test]
async fn retract_takes_what_keyturn_put_in_a_bundle_and_names_the_rest() {
    let root = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    std::fs::write(outside.path().join("x"), "outside").unwrap();
    let key = notice(1, ValueKind::Password, None).key;
    let (bundle, s) = agent_sink(root.path(), "signing", FileFormat::Raw);
    deliver_keypair(&s, 1).await;
    deliver_keypair(&s, 2).await;
    std::fs::write(bundle.join("cache.txt"), "mine").unwrap();
    std::fs::create_dir(bundle.join("notes")).unwrap();
    std::fs::remove_file(bundle.join("public.pem")).unwrap();
    symlink(outside.path().join("x"), bundle.join("public.pem")).unwrap();
    let data = timestamped_dirs(&bundle);
    std::fs::create_dir(bundle.join(&data[0]).join("agent-dir")).unwrap();
    let err = s.retracted().await.unwrap_err();
    assert!(err.message.contains("still there"), "{err}");

    s.retract(&key).await.unwrap();
    let mut left = entries(&bundle);
    left.sort();
    assert_eq!(
        left,
        vec![data[0].clone(), "cache.txt".into(), "notes".into()]
    );
    assert!(entries(&bundle.join(&data[0])) == vec!["agent-dir"]);
    assert_eq!(
        std::fs::read_to_string(outside.path().join("x")).unwrap(),
        "outside"
    );
    let how = s.retracted().await.unwrap();
    assert!(how.contains("cache.txt") && how.contains("notes"), "{how}");
    assert!(how.contains("did not put there"), "{how}");
    s.retract(&key).await.unwrap();
}

#[tokio::test]
async fn symlink_at_the_parent_dir_is_refused() {
    let root = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    let parent = root.path().join(AGENT);
    symlink(outside.path(), &parent).unwrap();
    let path = parent.join("db");
    assert_symlink_refused(root.path(), &path, &parent, outside.path()).await;
}

#[tokio::test]
async fn symlink_at_an_intermediate_dir_is_refused() {
    let root = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    let tenant = root.path().join("acme");
    symlink(outside.path(), &tenant).unwrap();
    let path = tenant.join(AGENT).join("db");
    assert_symlink_refused(root.path(), &path, &tenant, outside.path()).await;
}

/// The root is the operator's: a root that is itself a symlink (to a
/// mounted volume, say) is followed, unlike anything below it.
#[tokio::test]
async fn a_delivery_root_that_is_a_symlink_is_followed() {
    let base = tempfile::tempdir().unwrap();
    let real = base.path().join("volume");
    std::fs::create_dir(&real).unwrap();
    let root = base.path().join("agents");
    symlink(&real, &root).unwrap();
    let path = root.join(AGENT).join("db");
    let s = sink(&root, &path, FileFormat::Raw);
    deliver_password(&s, 1, "v1").await.unwrap();
    assert_eq!(
        std::fs::read_to_string(real.join(AGENT).join("db")).unwrap(),
        "v1"
    );
}

/// Black-box finding: a delivery root of mode 0777, one its group could
/// write, or another user's was delivered into (the same faults one level
/// down were refused): whoever can write it can move an agent's directory
/// away and plant their own. A sticky one (`/tmp`) is fine; a removal
/// (decommission) still goes through.
#[tokio::test]
async fn a_delivery_root_others_can_write_is_refused() {
    assert_root("chown the root to another user");
    let base = tempfile::tempdir().unwrap();
    let root = base.path().join("agents");
    std::fs::create_dir(&root).unwrap();
    let path = root.join(AGENT).join("db");
    let s = sink(&root, &path, FileFormat::Raw);
    deliver_password(&s, 1, "v1").await.unwrap();
    let chmod =
        |mode: u32| std::fs::set_permissions(&root, std::fs::Permissions::from_mode(mode)).unwrap();
    for (mode, owner, why) in [
        (0o777, 0, "writable by everyone"),
        (0o775, 0, "writable by its group"),
        (0o755, 65534, "owned by uid 65534"),
    ] {
        chmod(mode);
        std::os::unix::fs::chown(&root, Some(owner), None).unwrap();
        let err = deliver_password(&s, 2, "v2").await.unwrap_err();
        assert_eq!(err.kind, ErrorKind::Invalid, "{err}");
        assert!(err.message.contains(why), "{mode:o} {owner}: {err}");
        assert!(err.message.contains(&root.display().to_string()), "{err}");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "v1");
    }
    std::os::unix::fs::chown(&root, Some(0), None).unwrap();
    chmod(0o1777);
    deliver_password(&s, 2, "v2").await.unwrap();
    chmod(0o777);
    s.retract(&notice(1, ValueKind::Password, None).key)
        .await
        .unwrap();
    assert!(!path.exists(), "a decommission still removes the file");
}

#[tokio::test]
async fn a_directory_at_a_single_file_target_is_refused() {
    let root = tempfile::tempdir().unwrap();
    let path = root.path().join(AGENT).join("db");
    std::fs::create_dir_all(&path).unwrap();
    let s = sink(root.path(), &path, FileFormat::Raw);
    let err = deliver_password(&s, 1, "v").await.unwrap_err();
    assert_eq!(err.kind, ErrorKind::Invalid);
    assert!(err.message.contains("is a directory"), "{err}");
}

/// Defect: a credential whose `generate.kind` changed between a single
/// value and a keypair while its file sink kept the path failed every
/// delivery from then on (`... is not a directory`, `... is a directory`).
/// What keyturn delivered there before is replaced by the new layout, both
/// ways, with nothing of the old one left.
#[tokio::test]
async fn a_kind_change_replaces_the_file_by_a_bundle_and_back() {
    let root = tempfile::tempdir().unwrap();
    let (path, s) = agent_sink(root.path(), "db", FileFormat::Raw);
    deliver_password(&s, 1, "old-password").await.unwrap();
    assert!(path.is_file());

    deliver_keypair(&s, 2).await;
    assert!(path.is_dir());
    assert_eq!(
        std::fs::read_to_string(path.join("private.pem")).unwrap(),
        pem("PRIVATE KEY", 2)
    );
    assert_eq!(timestamped_dirs(&path).len(), 1, "{:?}", entries(&path));
    assert_eq!(entries(&root.path().join(AGENT)), vec!["db"]);

    deliver_password(&s, 3, "new-password").await.unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), b"new-password");
    assert_eq!(entries(&root.path().join(AGENT)), vec!["db"]);
}

/// A directory at the path that is not a keyturn bundle is still refused,
/// and so is a bundle holding a file keyturn did not put there, saying
/// what to do: both are left as they were.
#[tokio::test]
async fn a_kind_change_leaves_what_keyturn_did_not_deliver() {
    let root = tempfile::tempdir().unwrap();
    let (path, s) = agent_sink(root.path(), "db", FileFormat::Raw);
    std::fs::create_dir_all(&path).unwrap();
    std::fs::write(path.join("notes"), "mine").unwrap();
    let err = deliver_password(&s, 1, "v").await.unwrap_err();
    assert!(err.message.contains("is a directory"), "{err}");
    assert_eq!(entries(&path), vec!["notes"]);

    let other = root.path().join(AGENT).join("signing");
    let s = sink(root.path(), &other, FileFormat::Raw);
    deliver_keypair(&s, 1).await;
    std::fs::write(other.join("notes"), "mine").unwrap();
    let before = entries(&other);
    let err = deliver_password(&s, 2, "v").await.unwrap_err();
    assert_eq!(err.kind, ErrorKind::Invalid);
    assert!(
        err.message
            .contains("holds \"notes\", which keyturn did not put there")
            && err.message.contains("move that file away"),
        "{err}"
    );
    assert_eq!(entries(&other), before);
    assert_eq!(
        std::fs::read_to_string(other.join("private.pem")).unwrap(),
        pem("PRIVATE KEY", 1)
    );
}

#[test]
fn construction_rejects_paths_outside_the_root() {
    let roots = vec![PathBuf::from("/run/keyturn/agents")];
    let bad = [
        "relative/db",
        "/run/keyturn/agents/../etc/shadow",
        "/run/keyturn/agents/a/../../x",
        "/run/keyturn/agents/a//db",
        "/run/keyturn/agents/a/db/",
        "/run/keyturn/agents/./a/db",
        "/run/keyturn/other/db",
        "/run/keyturn/agentsX/db",
        "/run/keyturn/agents",
        "/etc/shadow",
    ];
    for p in bad {
        let err = new_sink(cfg(Path::new(p), FileFormat::Raw), &roots).unwrap_err();
        assert_eq!(err.kind, ErrorKind::Invalid, "{p}: {err}");
    }
    let ok = new_sink(
        cfg(Path::new("/run/keyturn/agents/a/db"), FileFormat::Raw),
        &roots,
    )
    .unwrap();
    assert_eq!(ok.describe(), "file:/run/keyturn/agents/a/db");
    // A root with `..` in it is never a match.
    let err = new_sink(
        cfg(Path::new("/run/keyturn/x/db"), FileFormat::Raw),
        &[PathBuf::from("/run/keyturn/agents/..")],
    )
    .unwrap_err();
    assert_eq!(err.kind, ErrorKind::Invalid);
    // A bad env name or mode.
    let mut c = cfg(Path::new("/run/keyturn/agents/a/db"), FileFormat::Env);
    c.env_name = Some("1BAD-NAME".into());
    assert!(new_sink(c, &roots).is_err());
    let mut c = cfg(Path::new("/run/keyturn/agents/a/db"), FileFormat::Raw);
    c.mode = Some("4755".into());
    assert!(new_sink(c, &roots).is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readers_never_see_a_partial_file() {
    let root = tempfile::tempdir().unwrap();
    let (path, s) = agent_sink(root.path(), "db.json", FileFormat::Json);
    // Large enough that a non-atomic write would be seen half done.
    let values = ["a".repeat(64 * 1024), "b".repeat(64 * 1024)];
    deliver_password(&s, 1, &values[0]).await.unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let reads = Arc::new(AtomicUsize::new(0));
    let reader = {
        let (stop, reads, path, values) =
            (stop.clone(), reads.clone(), path.clone(), values.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let bytes = std::fs::read(&path).expect("the file is always there");
                let doc: serde_json::Value =
                    serde_json::from_slice(&bytes).expect("a complete json document");
                let version = doc["version"].as_u64().unwrap();
                let expect = &values[((version - 1) % 2) as usize];
                assert_eq!(
                    doc["value"].as_str().unwrap(),
                    expect.as_str(),
                    "version {version}"
                );
                reads.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    for version in 2..=201u64 {
        let value = &values[((version - 1) % 2) as usize];
        deliver_password(&s, version, value).await.unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    reader.join().expect("reader saw only complete versions");
    assert!(reads.load(Ordering::Relaxed) > 0);
    assert_eq!(entries(&root.path().join(AGENT)), vec!["db.json"]);
}

/// Delivers `version` of an Ed25519 keypair (the made-up PEMs of [`pem`]).
async fn deliver_keypair(s: &FileSink, version: u64) {
    let public = pem("PUBLIC KEY", version);
    s.deliver(
        &notice(version, ValueKind::Ed25519, Some(&public)),
        &secret(&pem("PRIVATE KEY", version)),
    )
    .await
    .unwrap();
}

fn pem(kind: &str, version: u64) -> String {
    format!("-----BEGIN {kind}-----\nversion-{version}\n-----END {kind}-----\n")
}

fn timestamped_dirs(bundle: &Path) -> Vec<String> {
    entries(bundle)
        .into_iter()
        .filter(|n| n.starts_with("..") && n != DATA_LINK)
        .collect()
}

#[tokio::test]
async fn bundle_swaps_data_and_prunes_old_dirs() {
    let root = tempfile::tempdir().unwrap();
    let bundle = root.path().join(AGENT).join("signing");
    let mut c = cfg(&bundle, FileFormat::Raw);
    c.mode = Some("0440".into());
    let s = new_sink(c, &[root.path().to_path_buf()]).unwrap();
    for version in 1..=4u64 {
        deliver_keypair(&s, version).await;
        let data = std::fs::read_link(bundle.join(DATA_LINK)).unwrap();
        let data = data.to_str().unwrap();
        assert!(
            data.starts_with("..") && data.contains(&format!(".{version}.")),
            "{data}"
        );
        assert_eq!(
            std::fs::read_to_string(bundle.join("private.pem")).unwrap(),
            pem("PRIVATE KEY", version)
        );
        assert_eq!(
            std::fs::read_to_string(bundle.join("public.pem")).unwrap(),
            pem("PUBLIC KEY", version)
        );
        let meta: serde_json::Value =
            serde_json::from_slice(&std::fs::read(bundle.join("meta.json")).unwrap()).unwrap();
        assert_eq!(meta["version"], version);
        assert!(
            !meta.to_string().contains("PRIVATE"),
            "no secret in meta.json"
        );
        assert_eq!(mode_of(&bundle.join(data).join("private.pem")), 0o440);
        assert_eq!(mode_of(&bundle.join(data)), 0o750);
        let dirs = timestamped_dirs(&bundle);
        assert!(dirs.len() <= 2, "old dirs pruned: {dirs:?}");
        assert!(dirs.iter().any(|d| d == data));
    }
    for link in BUNDLE_FILES {
        assert_eq!(
            std::fs::read_link(bundle.join(link)).unwrap(),
            PathBuf::from(format!("..data/{link}"))
        );
    }
    assert_eq!(mode_of(&root.path().join(AGENT)), 0o750, "agent dir");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bundle_readers_never_mix_versions() {
    let root = tempfile::tempdir().unwrap();
    let (bundle, s) = agent_sink(root.path(), "signing", FileFormat::Raw);
    deliver_keypair(&s, 1).await;
    let stop = Arc::new(AtomicBool::new(false));
    let pairs = Arc::new(AtomicUsize::new(0));
    let reader = {
        let (stop, pairs, bundle) = (stop.clone(), pairs.clone(), bundle.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                // A consistent reader resolves `..data` once, then reads the
                // pair from that directory; a pruned directory means retry.
                let Ok(dir) = std::fs::canonicalize(bundle.join(DATA_LINK)) else {
                    continue;
                };
                let (Ok(private), Ok(public)) = (
                    std::fs::read_to_string(dir.join("private.pem")),
                    std::fs::read_to_string(dir.join("public.pem")),
                ) else {
                    continue;
                };
                let version = |s: &str| s.lines().nth(1).map(str::to_owned);
                assert!(version(&private).is_some(), "complete private key");
                assert_eq!(version(&private), version(&public), "a matched pair");
                // Through the top-level links each file is always complete.
                let linked = std::fs::read_to_string(bundle.join("private.pem")).unwrap();
                assert!(linked.ends_with("-----END PRIVATE KEY-----\n"), "{linked}");
                pairs.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    for version in 2..=60u64 {
        deliver_keypair(&s, version).await;
    }
    stop.store(true, Ordering::Relaxed);
    reader.join().expect("reader saw only matched pairs");
    assert!(pairs.load(Ordering::Relaxed) > 0);
    assert!(timestamped_dirs(&bundle).len() <= 2);
}

#[tokio::test]
async fn bundle_refuses_links_it_did_not_make() {
    let root = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    let bundle = root.path().join(AGENT).join("signing");
    std::fs::create_dir_all(&bundle).unwrap();
    symlink(outside.path(), bundle.join(DATA_LINK)).unwrap();
    let s = sink(root.path(), &bundle, FileFormat::Raw);
    let public = pem("PUBLIC KEY", 1);
    let err = s
        .deliver(
            &notice(1, ValueKind::Ed25519, Some(&public)),
            &secret("canary-bundle-19d0"),
        )
        .await
        .unwrap_err();
    assert_eq!(err.kind, ErrorKind::Invalid, "{err}");
    assert!(!err.message.contains("canary"));
    assert!(entries(outside.path()).is_empty());
    assert!(
        timestamped_dirs(&bundle).is_empty(),
        "nothing written before the check"
    );

    std::fs::remove_file(bundle.join(DATA_LINK)).unwrap();
    symlink(outside.path().join("x"), bundle.join("private.pem")).unwrap();
    let err = s
        .deliver(&notice(1, ValueKind::Ed25519, Some(&public)), &secret("v"))
        .await
        .unwrap_err();
    assert_eq!(err.kind, ErrorKind::Invalid, "{err}");
    assert!(err.message.contains("private.pem"), "{err}");
    assert!(entries(outside.path()).is_empty());
}

/// A temp name of this process (`ours`) or of another one.
fn temp_of(name: &str, ours: bool) -> String {
    let token = if ours {
        process_token()
    } else {
        process_token() ^ 0x5a5a_5a5a
    };
    format!(".{name}.tmp.{token:08x}0badcafe")
}

fn touch_aged(path: &Path, age: Duration) {
    let f = std::fs::File::create(path).unwrap();
    f.set_modified(std::time::SystemTime::now() - age).unwrap();
}

#[tokio::test]
async fn preflight_removes_dead_temp_files_only() {
    let root = tempfile::tempdir().unwrap();
    let dir = agent_dir(root.path());
    let path = dir.join("db");
    let minutes = Duration::from_secs(120);
    // Another process's temp is a crash leftover, however young.
    let dead_old = dir.join(temp_of("db", false));
    touch_aged(&dead_old, minutes);
    let dead_young = dir.join(format!(".db.tmp.{:08x}00000001", process_token() ^ 1));
    touch_aged(&dead_young, Duration::ZERO);
    // An earlier keyturn's name (no token).
    let legacy = dir.join(".db.tmp.0123abcd");
    touch_aged(&legacy, Duration::ZERO);
    // This process's: in use while young, a leftover when old.
    let mine_young = dir.join(temp_of("db", true));
    touch_aged(&mine_young, Duration::ZERO);
    let mine_old = dir.join(format!(".db.tmp.{:08x}00000002", process_token()));
    touch_aged(&mine_old, minutes);
    // Not ours: another file's temp, and a name keyturn never makes.
    let other = dir.join(temp_of("other", false));
    touch_aged(&other, minutes);
    let foreign = dir.join(".db.tmp.editor-backup");
    touch_aged(&foreign, minutes);
    // A directory temp left by a crash while creating the agent dir.
    let dead_dir = root.path().join(temp_of(AGENT, false));
    std::fs::create_dir(&dead_dir).unwrap();

    sink(root.path(), &path, FileFormat::Raw)
        .preflight()
        .await
        .unwrap();
    for gone in [&dead_old, &dead_young, &legacy, &mine_old, &dead_dir] {
        assert!(!gone.exists(), "{} was left", gone.display());
    }
    assert!(
        mine_young.exists(),
        "a young temp of this process may be in use"
    );
    assert!(
        other.exists(),
        "another sink's temp file is not this sink's"
    );
    assert!(
        foreign.exists(),
        "a name keyturn does not make is left alone"
    );
}

#[tokio::test]
async fn a_delivery_removes_this_processs_stale_temp_files_in_its_directory() {
    let root = tempfile::tempdir().unwrap();
    let dir = agent_dir(root.path());
    let path = dir.join("db");
    // Left by a failed delivery of this process a while ago, to this
    // file and to another one in the same directory.
    let mine_old = dir.join(temp_of("db", true));
    touch_aged(&mine_old, Duration::from_secs(120));
    let mine_other = dir.join(format!(".other.tmp.{:08x}00000003", process_token()));
    touch_aged(&mine_other, Duration::from_secs(120));
    // In use (young), and another process's (preflight's job).
    let mine_young = dir.join(format!(".db.tmp.{:08x}00000004", process_token()));
    touch_aged(&mine_young, Duration::ZERO);
    let dead = dir.join(temp_of("db", false));
    touch_aged(&dead, Duration::from_secs(120));
    let s = sink(root.path(), &path, FileFormat::Raw);
    deliver_password(&s, 1, "v1").await.unwrap();
    assert!(!mine_old.exists() && !mine_other.exists());
    assert!(mine_young.exists(), "a young temp may be in use");
    assert!(dead.exists(), "left to preflight");
    s.preflight().await.unwrap();
    assert!(!dead.exists());
}

#[tokio::test]
async fn preflight_removes_a_bundle_directory_left_by_a_crash() {
    let root = tempfile::tempdir().unwrap();
    let (path, s) = agent_sink(root.path(), "signing", FileFormat::Raw);
    deliver_keypair(&s, 1).await;
    let current = timestamped_dirs(&path);
    assert_eq!(current.len(), 1);
    // What a kill -9 between writing version 2 and the swap leaves.
    let left = path.join(format!(
        "..20260101T000000.2.{:08x}00000000",
        process_token() ^ 7
    ));
    std::fs::create_dir(&left).unwrap();
    std::fs::write(left.join("private.pem"), pem("PRIVATE KEY", 2)).unwrap();
    std::os::unix::fs::symlink(left.file_name().unwrap(), path.join("..data_tmp")).unwrap();
    // And the previous pair's directory, made by an earlier process (a
    // restart in its grace): kept until its retirement (black-box finding:
    // a reload's preflight removed it).
    let previous = path.join(format!(
        "..20251231T000000.0.{:08x}00000000",
        process_token() ^ 7
    ));
    std::fs::create_dir(&previous).unwrap();
    s.preflight().await.unwrap();
    let mut kept = current.clone();
    kept.push(previous.file_name().unwrap().to_string_lossy().into_owned());
    kept.sort();
    let mut found = timestamped_dirs(&path);
    found.sort();
    assert_eq!(found, kept, "the current and the previous stay");
    assert!(!path.join("..data_tmp").exists());
    assert_eq!(
        std::fs::read_to_string(path.join("private.pem")).unwrap(),
        pem("PRIVATE KEY", 1)
    );
    // The retirement takes it.
    s.retire_previous(&key(AGENT, "signing")).await.unwrap();
    assert_eq!(timestamped_dirs(&path), current);
}

/// Black-box finding: a symlink planted under a dead bundle directory's
/// name was rightly left alone, but the log said "removed" at every
/// reload. It says so only of what it removed.
#[tokio::test]
async fn a_symlink_under_a_dead_directory_s_name_is_left_and_not_said_removed() {
    let root = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    let (path, s) = agent_sink(root.path(), "signing", FileFormat::Raw);
    deliver_keypair(&s, 1).await;
    let planted = path.join(format!(
        "..20200101T000000.1.{:08x}00000000",
        process_token() ^ 7
    ));
    symlink(outside.path(), &planted).unwrap();
    // And a real one left by a crash, which is removed and said so.
    let left = path.join(format!(
        "..20200101T000000.2.{:08x}00000000",
        process_token() ^ 7
    ));
    std::fs::create_dir(&left).unwrap();
    // What the sweep asks before it says "removed".
    let bundle = super::fs::open_dir(None, path.as_os_str()).unwrap();
    let removed = |name: &Path| {
        s.inner
            .removed_data_dir(&bundle, name.file_name().unwrap())
            .unwrap()
    };
    assert!(!removed(&planted), "a symlink is not removed");
    assert!(removed(&left), "a dead directory is");
    assert!(std::fs::symlink_metadata(&planted).is_ok(), "left");
    assert!(outside.path().exists());
    assert!(!left.exists(), "removed");
    s.preflight().await.unwrap();
    assert!(std::fs::symlink_metadata(&planted).is_ok(), "left");
}

#[tokio::test]
async fn preflight_passes_on_a_fresh_root() {
    let root = tempfile::tempdir().unwrap();
    let root_path = root.path().join("not-yet");
    let s = sink(
        &root_path,
        &root_path.join(AGENT).join("db"),
        FileFormat::Raw,
    );
    s.preflight().await.unwrap();
    assert!(root_path.is_dir(), "preflight creates the delivery root");
    assert!(entries(&root_path).is_empty(), "but nothing below it");
}

#[tokio::test]
async fn retract_removes_everything_and_twice_is_fine() {
    let root = tempfile::tempdir().unwrap();
    let key = notice(1, ValueKind::Password, None).key;

    let (_, s) = agent_sink(root.path(), "db", FileFormat::Env);
    deliver_password(&s, 1, "v").await.unwrap();
    s.retract(&key).await.unwrap();
    assert!(entries(&root.path().join(AGENT)).is_empty());
    s.retract(&key).await.unwrap();

    let (bundle, b) = agent_sink(root.path(), "signing", FileFormat::Raw);
    for v in 1..=3 {
        deliver_keypair(&b, v).await;
    }
    b.retract(&key).await.unwrap();
    assert!(
        !bundle.exists(),
        "bundle directory and all it held are gone"
    );
    b.retract(&key).await.unwrap();
    // Never delivered at all: also fine.
    let never = sink(
        root.path(),
        &root.path().join("nobody").join("x"),
        FileFormat::Raw,
    );
    never.retract(&key).await.unwrap();
}

/// Defect (black-box): a symlink put in place of a directory ABOVE the
/// delivered file kept its decommission item pending for ever ("is a
/// symlink; refusing to follow it"). A link that names a place in its own
/// directory by plain names is walked by those names (never followed): the
/// delivered file is removed there. Any other link is still never
/// followed, and the error says where it points and what to do; once the
/// operator removes the link, the item completes.
#[tokio::test]
async fn retract_reaches_the_file_below_a_directory_replaced_by_a_plain_symlink() {
    let root = tempfile::tempdir().unwrap();
    let key = notice(1, ValueKind::Password, None).key;
    let (path, s) = agent_sink(root.path(), "sub/db.json", FileFormat::Json);
    deliver_password(&s, 1, "v").await.unwrap();
    let agent = root.path().join(AGENT);
    std::fs::rename(agent.join("sub"), agent.join("sub.moved")).unwrap();
    std::os::unix::fs::symlink("sub.moved", agent.join("sub")).unwrap();
    assert!(path.exists(), "reachable through the link");
    s.retract(&key).await.unwrap();
    assert!(
        entries(&agent.join("sub.moved")).is_empty(),
        "the delivered file is gone where the link's maker moved it"
    );
    assert!(s.retracted().await.unwrap().contains("is gone"));

    // A link that leaves its directory is never followed: what it points
    // to is left alone, and the error says why and what to do.
    let outside = tempfile::tempdir().unwrap();
    let (path, s) = agent_sink(root.path(), "far/db.json", FileFormat::Json);
    deliver_password(&s, 1, "v").await.unwrap();
    std::fs::rename(agent.join("far"), outside.path().join("far")).unwrap();
    std::os::unix::fs::symlink(outside.path().join("far"), agent.join("far")).unwrap();
    for err in [
        s.retract(&key).await.unwrap_err(),
        s.retracted().await.unwrap_err(),
    ] {
        assert_eq!(err.kind, ErrorKind::Invalid, "{err}");
        let msg = err.to_string();
        for part in [
            format!(
                "{} is a symlink to {}",
                agent.join("far").display(),
                outside.path().join("far").display()
            ),
            format!(
                "Check {} by hand",
                outside.path().join("far/db.json").display()
            ),
            format!("then remove the symlink {}", agent.join("far").display()),
        ] {
            assert!(msg.contains(&part), "{part:?} in {msg}");
        }
    }
    assert!(path.exists(), "what the link points to is left alone");
    // The operator removes the link: nothing is at the path any more.
    std::fs::remove_file(agent.join("far")).unwrap();
    assert!(s.retracted().await.unwrap().contains("is gone"));
    s.retract(&key).await.unwrap();
}

#[tokio::test]
async fn error_messages_never_carry_the_value() {
    let root = tempfile::tempdir().unwrap();
    let canary = "canary-err-3b7d";
    let n = notice(1, ValueKind::Password, None);

    // A NUL byte cannot be put in an env file.
    let (_, s) = agent_sink(root.path(), "db.env", FileFormat::Env);
    let v = SecretValue::new(format!("{canary}\0").into_bytes());
    let err = s.deliver(&n, &v).await.unwrap_err();
    assert_eq!(err.kind, ErrorKind::Invalid);
    assert!(!format!("{err} {err:?}").contains(canary));

    // Non-UTF-8 cannot be json.
    let (_, s) = agent_sink(root.path(), "db.json", FileFormat::Json);
    let mut bytes = canary.as_bytes().to_vec();
    bytes.push(0xff);
    let err = s.deliver(&n, &SecretValue::new(bytes)).await.unwrap_err();
    assert_eq!(err.kind, ErrorKind::Invalid);
    assert!(!format!("{err} {err:?}").contains(canary));

    // An ed25519 notice without its public key.
    let (_, s) = agent_sink(root.path(), "sig", FileFormat::Raw);
    let err = s
        .deliver(&notice(1, ValueKind::Ed25519, None), &secret(canary))
        .await
        .unwrap_err();
    assert!(!format!("{err} {err:?}").contains(canary));

    // An I/O failure mid-way (a file where a directory must be).
    std::fs::write(root.path().join("blocker"), b"").unwrap();
    let s = sink(
        root.path(),
        &root.path().join("blocker").join("db"),
        FileFormat::Raw,
    );
    let err = s.deliver(&n, &secret(canary)).await.unwrap_err();
    assert_eq!(err.kind, ErrorKind::Invalid, "{err}");
    assert!(err.message.contains("not a directory"), "{err}");
    assert!(!format!("{err} {err:?}").contains(canary));
}

#[test]
fn resolving_onto_the_root_is_normalizing_the_join() {
    let roots = [PathBuf::from("/run/kt")];
    for rel in ["a/x", "./a//x/.", "a/./x/"] {
        assert_eq!(
            FileConfig::resolve(&roots, Path::new(rel)),
            normalize(&roots[0].join(rel)),
            "{rel}"
        );
    }
    assert_eq!(
        FileConfig::resolve(&roots, Path::new("/run/kt/./a")),
        PathBuf::from("/run/kt/a")
    );
}

/// `UMask=0077` in the unit must not narrow a delivery root keyturn creates
/// to 0700: the agents below it could no longer reach their directories.
#[tokio::test]
async fn a_created_delivery_root_has_its_mode_whatever_the_umask() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("run").join("agents");
    let s = sink(&root, &root.join(AGENT).join("db"), FileFormat::Raw);
    let old = nix::sys::stat::umask(Mode::from_bits_truncate(0o077));
    let res = deliver_password(&s, 1, "v").await;
    nix::sys::stat::umask(old);
    res.unwrap();
    assert_eq!(mode_of(&root), 0o755, "the delivery root");
    assert_eq!(mode_of(&dir.path().join("run")), 0o755, "above the root");
    assert_eq!(mode_of(&root.join(AGENT)), 0o750, "the agent's directory");
}

/// An existing directory on the way is used only when it belongs to the
/// daemon (or, from the agent's directory down, to the agent): a directory
/// another user owns could be theirs to rename files in or out of.
#[tokio::test]
async fn existing_directories_owned_by_another_user_are_refused() {
    assert_root("chown");
    let root = tempfile::tempdir().unwrap();
    let roots = [root.path().to_path_buf()];
    let ctx = SinkContext {
        delivery_roots: &roots,
        uid: Some(1234),
        gid: Some(1234),
        former_uid: None,
        reader: None,
    };
    // The agent's own directory, owned by someone else.
    let agent = agent_dir(root.path());
    nix::unistd::chown(&agent, Some(Uid::from_raw(4321)), None).unwrap();
    let s = FileSink::new(cfg(&agent.join("db"), FileFormat::Raw), &ctx).unwrap();
    let err = deliver_password(&s, 1, "v").await.unwrap_err();
    assert!(
        err.message.contains("owned by uid 4321") && err.message.contains(AGENT),
        "{err}"
    );
    assert!(!agent.join("db").exists(), "nothing written");
    // The agent's own uid is fine.
    nix::unistd::chown(&agent, Some(Uid::from_raw(1234)), None).unwrap();
    deliver_password(&s, 1, "v").await.unwrap();

    // A directory above the agent's, owned by someone else.
    let shared = root.path().join("tenant");
    std::fs::create_dir(&shared).unwrap();
    nix::unistd::chown(&shared, Some(Uid::from_raw(1234)), None).unwrap();
    let path = shared.join(AGENT).join("db");
    let s = FileSink::new(cfg(&path, FileFormat::Raw), &ctx).unwrap();
    let err = deliver_password(&s, 1, "v").await.unwrap_err();
    assert!(err.message.contains("owned by uid 1234"), "{err}");
    assert!(!shared.join(AGENT).exists(), "nothing created below it");
}

/// Black-box finding: an agent given a `uid` after keyturn had made its
/// directory (root's, 0750) was delivered files it could not reach, the
/// deliveries audited ok. The agent's directory, and those keyturn makes
/// below it, become the agent's when they are root's or the daemon's.
#[tokio::test]
async fn an_agent_directory_of_roots_is_given_to_the_agent() {
    assert_root("chown");
    let root = tempfile::tempdir().unwrap();
    let roots = [root.path().to_path_buf()];
    let path = root.path().join(AGENT).join("sub").join("db");
    let before = new_sink(cfg(&path, FileFormat::Raw), &roots).unwrap();
    deliver_password(&before, 1, "v").await.unwrap();
    let owner = |p: &Path| {
        let m = std::fs::metadata(p).unwrap();
        (m.uid(), m.gid())
    };
    assert_eq!(owner(&root.path().join(AGENT)), (0, 0));
    let ctx = SinkContext {
        delivery_roots: &roots,
        uid: Some(1234),
        gid: Some(2345),
        former_uid: None,
        reader: None,
    };
    let s = FileSink::new(cfg(&path, FileFormat::Raw), &ctx).unwrap();
    deliver_password(&s, 2, "v2").await.unwrap();
    for p in [
        root.path().join(AGENT),
        root.path().join(AGENT).join("sub"),
        path.clone(),
    ] {
        assert_eq!(owner(&p), (1234, 2345), "{}", p.display());
    }
    assert_eq!(mode_of(&root.path().join(AGENT)), 0o750);
    // The root stays root's.
    assert_eq!(owner(root.path()).0, 0);
}

/// Black-box finding: a world-writable agent directory was used without a
/// word, and a file another user planted there (after removing the
/// delivered one) was what the agent read. A directory on the way that
/// its group or everyone can write is refused, unless sticky.
#[tokio::test]
async fn a_directory_others_can_write_is_refused_unless_sticky() {
    use std::os::unix::fs::PermissionsExt;
    let root = tempfile::tempdir().unwrap();
    let agent = agent_dir(root.path());
    let (path, s) = agent_sink(root.path(), "db", FileFormat::Raw);
    let chmod =
        |p: &Path, m: u32| std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap();
    for (mode, who) in [
        (0o777, "everyone"),
        (0o770, "its group"),
        (0o757, "everyone"),
    ] {
        chmod(&agent, mode);
        let err = deliver_password(&s, 1, "v").await.unwrap_err();
        assert!(
            err.message.contains(&format!("writable by {who}"))
                && err.message.contains("chmod go-w"),
            "{mode:o}: {err}"
        );
        assert!(!path.exists(), "nothing written at {mode:o}");
    }
    chmod(&agent, 0o1777);
    deliver_password(&s, 1, "v").await.unwrap();
    chmod(&agent, 0o750);
    deliver_password(&s, 2, "v2").await.unwrap();

    // A directory above the agent's, too.
    let shared = root.path().join("tenant");
    std::fs::create_dir(&shared).unwrap();
    chmod(&shared, 0o777);
    let s = sink(root.path(), &shared.join(AGENT).join("db"), FileFormat::Raw);
    let err = deliver_password(&s, 1, "v").await.unwrap_err();
    assert!(err.message.contains("tenant"), "{err}");
    assert!(!shared.join(AGENT).exists(), "nothing created below it");
}

/// When the previous version is retired, its private key leaves the disk
/// at once, not at the next delivery.
#[tokio::test]
async fn retiring_the_previous_keypair_removes_its_private_key() {
    let root = tempfile::tempdir().unwrap();
    let (bundle, s) = agent_sink(root.path(), "signing", FileFormat::Raw);
    deliver_keypair(&s, 1).await;
    deliver_keypair(&s, 2).await;
    assert_eq!(timestamped_dirs(&bundle).len(), 2, "the previous is kept");
    let key = notice(2, ValueKind::Ed25519, None).key;
    s.retire_previous(&key).await.unwrap();
    let current = std::fs::read_link(bundle.join(DATA_LINK)).unwrap();
    assert_eq!(
        timestamped_dirs(&bundle),
        vec![current.to_str().unwrap().to_owned()],
        "only the current directory is left"
    );
    assert_eq!(
        std::fs::read_to_string(bundle.join("private.pem")).unwrap(),
        pem("PRIVATE KEY", 2)
    );
    // Twice, and on a single file or nothing delivered yet: fine.
    s.retire_previous(&key).await.unwrap();
    let (_, f) = agent_sink(root.path(), "db", FileFormat::Raw);
    f.retire_previous(&key).await.unwrap();
    deliver_password(&f, 1, "v").await.unwrap();
    f.retire_previous(&key).await.unwrap();
}

/// A sink writing `root/AGENT/name` in place (`atomic = false`), and that path.
fn in_place_sink(root: &Path, name: &str, format: FileFormat) -> (PathBuf, FileSink) {
    let path = root.join(AGENT).join(name);
    let mut c = cfg(&path, format);
    c.atomic = Some(false);
    let s = new_sink(c, &[root.to_path_buf()]).expect("valid sink");
    (path, s)
}

#[tokio::test]
async fn in_place_creates_the_file_then_keeps_its_inode() {
    use std::io::Seek;
    let root = tempfile::tempdir().unwrap();
    let (path, s) = in_place_sink(root.path(), "db", FileFormat::Raw);
    // Absent: created, with the default mode, and no temp left behind.
    deliver_password(&s, 1, "first-value-long").await.unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), b"first-value-long");
    assert_eq!(mode_of(&path), 0o400);
    let ino = std::fs::metadata(&path).unwrap().ino();
    // What a bind mount is: a descriptor on the inode, opened before.
    let mut held = std::fs::File::open(&path).unwrap();
    for (version, value) in [(2, "second"), (3, "third-and-longest-value")] {
        deliver_password(&s, version, value).await.unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.ino(), ino, "version {version} kept the inode");
        assert_eq!(meta.nlink(), 1);
        // Truncated first: a shorter value leaves no tail of the longer one.
        assert_eq!(std::fs::read(&path).unwrap(), value.as_bytes());
        held.rewind().unwrap();
        let mut seen = Vec::new();
        held.read_to_end(&mut seen).unwrap();
        assert_eq!(
            seen,
            value.as_bytes(),
            "the held descriptor sees version {version}"
        );
    }
    assert_eq!(mode_of(&path), 0o400);
    assert_eq!(entries(&root.path().join(AGENT)), vec!["db"]);
    // The atomic default, for contrast, replaces the inode.
    let atomic = sink(root.path(), &path, FileFormat::Raw);
    deliver_password(&atomic, 4, "fourth").await.unwrap();
    assert_ne!(std::fs::metadata(&path).unwrap().ino(), ino);
}

#[tokio::test]
async fn in_place_json_and_env_are_complete_after_each_delivery() {
    let root = tempfile::tempdir().unwrap();
    let (json, s) = in_place_sink(root.path(), "db.json", FileFormat::Json);
    let (envf, e) = in_place_sink(root.path(), "db.env", FileFormat::Env);
    deliver_password(&s, 1, "a-rather-long-first-value")
        .await
        .unwrap();
    deliver_password(&e, 1, "a-rather-long-first-value")
        .await
        .unwrap();
    let (ji, ei) = (
        std::fs::metadata(&json).unwrap().ino(),
        std::fs::metadata(&envf).unwrap().ino(),
    );
    deliver_password(&s, 2, "v2").await.unwrap();
    deliver_password(&e, 2, "v2").await.unwrap();
    let doc: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    assert_eq!(
        (doc["value"].as_str(), doc["version"].as_u64()),
        (Some("v2"), Some(2))
    );
    assert_eq!(
        std::fs::read_to_string(&envf).unwrap(),
        "DB='v2'\nDB_VERSION=2\n"
    );
    assert_eq!(std::fs::metadata(&json).unwrap().ino(), ji);
    assert_eq!(std::fs::metadata(&envf).unwrap().ino(), ei);
}

#[tokio::test]
async fn in_place_applies_a_changed_mode_and_owner_to_the_same_inode() {
    assert_root("chown");
    let root = tempfile::tempdir().unwrap();
    let (path, s) = in_place_sink(root.path(), "db", FileFormat::Raw);
    deliver_password(&s, 1, "v1").await.unwrap();
    let ino = std::fs::metadata(&path).unwrap().ino();
    let mut c = cfg(&path, FileFormat::Raw);
    c.atomic = Some(false);
    c.mode = Some("0440".into());
    let roots = [root.path().to_path_buf()];
    let s = FileSink::new(
        c,
        &SinkContext {
            delivery_roots: &roots,
            uid: Some(1234),
            gid: Some(2345),
            former_uid: None,
            reader: None,
        },
    )
    .unwrap();
    deliver_password(&s, 2, "v2").await.unwrap();
    let m = std::fs::metadata(&path).unwrap();
    assert_eq!(m.ino(), ino);
    assert_eq!(mode_of(&path), 0o440);
    assert_eq!((m.uid(), m.gid()), (1234, 2345));
    assert_eq!(std::fs::read(&path).unwrap(), b"v2");
    // The same version again changes nothing (no write to wake watchers).
    let before = m.mtime_nsec() + m.mtime() * 1_000_000_000;
    std::thread::sleep(Duration::from_millis(20));
    deliver_password(&s, 2, "v2").await.unwrap();
    let m = std::fs::metadata(&path).unwrap();
    assert_eq!(
        m.mtime_nsec() + m.mtime() * 1_000_000_000,
        before,
        "not rewritten"
    );
}

/// An in-place delivery to `root/AGENT/db` is refused as Invalid, saying
/// `why`, without the value, and `target` (what the path leads to) still
/// holds `precious`.
async fn assert_in_place_refused(root: &Path, target: &Path, why: &str) {
    let (_, s) = in_place_sink(root, "db", FileFormat::Raw);
    let err = deliver_password(&s, 1, "canary-inplace-5d1e")
        .await
        .unwrap_err();
    assert_eq!(err.kind, ErrorKind::Invalid, "{err}");
    assert!(err.message.contains(why), "{err}");
    assert!(!err.message.contains("canary"), "{err}");
    assert_eq!(std::fs::read(target).unwrap(), b"precious");
}

#[tokio::test]
async fn in_place_refuses_a_symlink_at_the_path() {
    let root = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    let target = outside.path().join("victim");
    std::fs::write(&target, b"precious").unwrap();
    let dir = agent_dir(root.path());
    let path = dir.join("db");
    symlink(&target, &path).unwrap();
    assert_in_place_refused(root.path(), &target, "symlink").await;
    assert!(
        std::fs::symlink_metadata(&path)
            .unwrap()
            .file_type()
            .is_symlink()
    );
}

#[tokio::test]
async fn in_place_refuses_a_hard_link_at_the_path() {
    let root = tempfile::tempdir().unwrap();
    let dir = agent_dir(root.path());
    // Same file system as the delivery, so the link can be made.
    let target = root.path().join("victim");
    std::fs::write(&target, b"precious").unwrap();
    std::fs::hard_link(&target, dir.join("db")).unwrap();
    assert_in_place_refused(root.path(), &target, "2 hard links").await;
}

#[tokio::test]
async fn in_place_never_writes_a_keypair() {
    let root = tempfile::tempdir().unwrap();
    let (path, s) = in_place_sink(root.path(), "ssh", FileFormat::Raw);
    let err = s
        .deliver(
            &notice(1, ValueKind::Ed25519, Some("pub")),
            &secret("canary-key-0b9e"),
        )
        .await
        .unwrap_err();
    assert_eq!(err.kind, ErrorKind::Invalid, "{err}");
    assert!(err.message.contains("atomic = false"), "{err}");
    assert!(!path.exists());
}

/// A sink with `ack` set, writing `root/AGENT/db` (atomic or in place).
fn ack_sink(root: &Path, ack: FileAck, atomic: bool) -> (PathBuf, FileSink) {
    let path = root.join(AGENT).join("db");
    let cfg = FileConfig {
        ack: Some(ack),
        atomic: Some(atomic),
        ..cfg(&path, FileFormat::Raw)
    };
    let s = new_sink(cfg, &[root.to_path_buf()]).expect("valid sink");
    (path, s)
}

/// Whether `watch` resolves (Ok) within `wait`.
/// Delivers `value` as version `version` of the password, which must be sent.
async fn deliver_sent(s: &FileSink, version: u64, value: &str) {
    assert_eq!(
        deliver_password(s, version, value).await.unwrap(),
        Delivered::Sent
    );
}

/// The sink's ack watch of `version` of the agent's `db`.
fn watch(s: &FileSink, version: u64) -> crate::sinks::AckWatch {
    s.ack_watch(&key(AGENT, "db"), version).expect("a watch")
}

/// The error a watch ends with (within 5 s).
async fn ended(watch: &mut crate::sinks::AckWatch) -> PluginError {
    tokio::time::timeout(Duration::from_secs(5), watch.as_mut())
        .await
        .expect("ends")
        .unwrap_err()
}

async fn acked_within(watch: &mut crate::sinks::AckWatch, wait: Duration) -> bool {
    match tokio::time::timeout(wait, watch.as_mut()).await {
        Ok(r) => {
            r.expect("the watch works");
            true
        }
        Err(_) => false,
    }
}

#[tokio::test]
async fn ack_explicit_is_sent_and_has_no_watch() {
    let root = tempfile::tempdir().unwrap();
    let (_, s) = ack_sink(root.path(), FileAck::Explicit, true);
    deliver_sent(&s, 1, "a").await;
    assert!(s.ack_watch(&key(AGENT, "db"), 1).is_none());
}

/// Defect: after a restart the sink had delivered nothing, so the watch
/// the engine asks for (of the version the file holds) took every event
/// for a newer delivery and ended at once ("replaced before it was
/// opened"): the consumer's open never counted and it was reported as a
/// holdout. A fresh sink's watch counts the first open; a newer delivery
/// still ends it.
#[tokio::test]
async fn ack_open_after_a_restart_counts_the_first_open_of_the_file() {
    let root = tempfile::tempdir().unwrap();
    let (path, s) = ack_sink(root.path(), FileAck::Open, true);
    deliver_sent(&s, 4, "four").await;
    // The daemon restarts: a new sink, the file already in place.
    let (_, s) = ack_sink(root.path(), FileAck::Open, true);
    let mut w = watch(&s, 4);
    assert!(!acked_within(&mut w, Duration::from_millis(200)).await);
    assert_eq!(std::fs::read(&path).unwrap(), b"four");
    assert!(acked_within(&mut w, Duration::from_secs(5)).await);

    let (_, s) = ack_sink(root.path(), FileAck::Open, true);
    let mut w4 = watch(&s, 4);
    deliver_sent(&s, 5, "five").await;
    std::fs::read(&path).unwrap();
    let e = ended(&mut w4).await;
    assert!(e.message.contains("replaced"));
}

#[tokio::test]
async fn ack_open_counts_a_readers_open_after_delivery_but_not_keyturns_own() {
    for atomic in [true, false] {
        let root = tempfile::tempdir().unwrap();
        let (path, s) = ack_sink(root.path(), FileAck::Open, atomic);
        // The first delivery creates the directory: the watch starts after it.
        deliver_sent(&s, 1, "one").await;
        let mut w1 = watch(&s, 1);
        assert!(
            !acked_within(&mut w1, Duration::from_millis(200)).await,
            "atomic={atomic}: nobody opened it yet"
        );
        assert_eq!(std::fs::read(&path).unwrap(), b"one");
        assert!(
            acked_within(&mut w1, Duration::from_secs(5)).await,
            "atomic={atomic}"
        );

        // Version 2 over an existing file: keyturn opens the file to compare
        // and (in place) to write; neither counts.
        deliver_sent(&s, 2, "two").await;
        let mut w2 = watch(&s, 2);
        assert!(
            !acked_within(&mut w2, Duration::from_millis(200)).await,
            "atomic={atomic}: keyturn's own opens are not an ack"
        );
        // Delivered again (a retried step): the file already holds it.
        deliver_sent(&s, 2, "two").await;
        let mut w2b = watch(&s, 2);
        assert!(!acked_within(&mut w2b, Duration::from_millis(200)).await);
        let mut f = std::fs::File::open(&path).unwrap();
        let mut got = String::new();
        f.read_to_string(&mut got).unwrap();
        assert_eq!(got, "two");
        assert!(
            acked_within(&mut w2, Duration::from_secs(5)).await,
            "atomic={atomic}"
        );
        assert!(
            acked_within(&mut w2b, Duration::from_secs(5)).await,
            "atomic={atomic}"
        );

        // A watch of a version that was replaced ends with an error.
        deliver_sent(&s, 3, "three").await;
        let mut w3 = watch(&s, 3);
        deliver_sent(&s, 4, "four").await;
        std::fs::read(&path).unwrap();
        let e = ended(&mut w3).await;
        assert!(e.message.contains("replaced"), "atomic={atomic}");
        // After a restart (no watch from a delivery), any open from now counts.
        let mut w4 = watch(&s, 4);
        let _ = s.ack_watch(&key(AGENT, "db"), 4);
        std::fs::read(&path).unwrap();
        assert!(acked_within(&mut w4, Duration::from_secs(5)).await);
    }
}
