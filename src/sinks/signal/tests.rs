//! The signal sink's tests: the coalescing window on paused time, and
//! sends to real processes.

use std::os::unix::fs::symlink;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use super::*;

/// A coalescer counting its sends, failing them when told to.
#[derive(Default)]
struct Counted {
    windows: Coalescer<&'static str>,
    sends: AtomicUsize,
}

impl Counted {
    async fn deliver(
        &self,
        key: &'static str,
        window: Duration,
        fail: bool,
    ) -> Result<(), PluginError> {
        self.windows
            .join(key, window, || async {
                self.sends.fetch_add(1, Ordering::SeqCst);
                if fail {
                    Err(PluginError::new(ErrorKind::Transient, "no such process"))
                } else {
                    Ok(())
                }
            })
            .await
    }

    fn sends(&self) -> usize {
        self.sends.load(Ordering::SeqCst)
    }
}

/// A delivery running on its own task.
fn spawn_deliver(
    c: &Arc<Counted>,
    window: Duration,
    fail: bool,
) -> tokio::task::JoinHandle<Result<(), PluginError>> {
    let c = c.clone();
    tokio::spawn(async move { c.deliver("a", window, fail).await })
}

const WINDOW: Duration = Duration::from_secs(2);

/// Deliveries `gap` apart, all run to completion.
async fn burst(
    c: &Arc<Counted>,
    key: &'static str,
    n: usize,
    gap: Duration,
) -> Vec<Result<(), PluginError>> {
    let mut tasks = Vec::new();
    for _ in 0..n {
        let c = c.clone();
        tasks.push(tokio::spawn(
            async move { c.deliver(key, WINDOW, false).await },
        ));
        tokio::time::sleep(gap).await;
    }
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

#[tokio::test(start_paused = true)]
async fn a_burst_inside_the_window_is_one_send() {
    let c = Arc::new(Counted::default());
    let start = tokio::time::Instant::now();
    let results = burst(&c, "a", 3, Duration::from_millis(600)).await;
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    assert_eq!(c.sends(), 1, "three deliveries within 2s make one signal");
    // The send is at the end of the window the first delivery opened.
    assert_eq!(start.elapsed(), WINDOW);
}

#[tokio::test(start_paused = true)]
async fn two_bursts_are_two_sends() {
    let c = Arc::new(Counted::default());
    burst(&c, "a", 3, Duration::from_millis(100)).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    burst(&c, "a", 3, Duration::from_millis(100)).await;
    assert_eq!(c.sends(), 2);
}

#[tokio::test(start_paused = true)]
async fn a_delivery_after_the_window_closed_gets_its_own_send() {
    let c = Arc::new(Counted::default());
    // 0s opens, 2s sends; 2.5s comes after that send and opens another.
    let results = burst(&c, "a", 2, Duration::from_millis(2500)).await;
    assert!(results.iter().all(Result::is_ok));
    assert_eq!(c.sends(), 2);
}

#[tokio::test(start_paused = true)]
async fn windows_are_per_key() {
    let c = Arc::new(Counted::default());
    let (a, b) = tokio::join!(
        burst(&c, "a", 2, Duration::ZERO),
        burst(&c, "b", 2, Duration::ZERO)
    );
    assert!(a.iter().chain(&b).all(Result::is_ok));
    assert_eq!(c.sends(), 2, "one signal per consumer");
}

#[tokio::test(start_paused = true)]
async fn every_delivery_of_the_window_gets_the_shared_error() {
    let c = Arc::new(Counted::default());
    let first = spawn_deliver(&c, WINDOW, true);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let second = c.deliver("a", WINDOW, false).await;
    let first = first.await.unwrap();
    assert_eq!(c.sends(), 1);
    for r in [first, second] {
        let e = r.expect_err("the one send failed");
        assert_eq!(e.to_string(), "no such process");
    }
}

#[tokio::test(start_paused = true)]
async fn a_zero_window_sends_at_once() {
    let c = Arc::new(Counted::default());
    let start = tokio::time::Instant::now();
    c.deliver("a", Duration::ZERO, false).await.unwrap();
    c.deliver("a", Duration::ZERO, false).await.unwrap();
    assert_eq!(c.sends(), 2);
    assert_eq!(start.elapsed(), Duration::ZERO);
}

#[tokio::test(start_paused = true)]
async fn a_cancelled_opener_does_not_strand_its_window() {
    let c = Arc::new(Counted::default());
    let opener = spawn_deliver(&c, WINDOW, false);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let joiner = spawn_deliver(&c, WINDOW, false);
    tokio::time::sleep(Duration::from_millis(100)).await;
    opener.abort();
    let joined = joiner.await.unwrap();
    assert!(joined.unwrap_err().to_string().contains("cancelled"));
    // The next delivery opens a fresh window and is sent.
    c.deliver("a", WINDOW, false).await.unwrap();
    assert_eq!(c.sends(), 1);
}

#[test]
fn pids_parse_strictly() {
    assert_eq!(parse_pid(b"1234\n"), Some(1234));
    assert_eq!(parse_pid(b"  42  "), Some(42));
    for bad in [
        &b""[..],
        b"0",
        b"-1",
        b"12a",
        b"1 2",
        b"99999999999",
        b"\xff",
    ] {
        assert_eq!(parse_pid(bad), None, "{:?}", String::from_utf8_lossy(bad));
    }
}

/// A process of ours that lives until dropped.
struct Child(std::process::Child);

impl Child {
    fn sleeping() -> Self {
        Child(
            std::process::Command::new("sleep")
                .arg("60")
                .spawn()
                .unwrap(),
        )
    }

    fn pid(&self) -> u32 {
        self.0.id()
    }

    /// Waits for it to end; the signal that ended it.
    fn ended_by(&mut self) -> Option<i32> {
        std::os::unix::process::ExitStatusExt::signal(&self.0.wait().unwrap())
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn sink_for(pid_file: &Path, uid: Option<u32>, signal: &str) -> SignalSink {
    let cfg = SignalConfig {
        signal: Some(signal.into()),
        ..SignalConfig::pid_file(pid_file)
    };
    SignalSink::new(
        cfg,
        &SinkContext {
            delivery_roots: &[],
            uid,
            gid: None,
            former_uid: None,
            reader: None,
        },
    )
}

#[tokio::test]
async fn signals_the_process_in_the_pid_file() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Child::sleeping();
    let pid_file = dir.path().join("app.pid");
    std::fs::write(&pid_file, format!("{}\n", child.pid())).unwrap();
    sink_for(&pid_file, None, "SIGTERM").send().await.unwrap();
    assert_eq!(child.ended_by(), Some(libc::SIGTERM));
}

#[tokio::test]
async fn refuses_a_process_of_another_uid() {
    let dir = tempfile::tempdir().unwrap();
    let child = Child::sleeping();
    let pid_file = dir.path().join("app.pid");
    std::fs::write(&pid_file, child.pid().to_string()).unwrap();
    let other = nix::unistd::geteuid().as_raw() + 1;
    let e = sink_for(&pid_file, Some(other), "SIGTERM")
        .send()
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unauthorized);
    assert!(e.to_string().contains("refusing to signal it"), "{e}");
    assert!(
        e.to_string()
            .contains(&format!("not of uid {other} (the agent's)")),
        "{e}"
    );
    // Still running: nothing was sent.
    assert!(process_uids(child.pid() as i32).is_ok());
}

/// Defect (black-box): a pid file naming the daemon itself (a stale one
/// whose pid the daemon got after a reboot) made keyturn signal itself: for
/// an agent without `uid` its own uid passed the check, and `SIGTERM`
/// stopped it with exit 0. The daemon and init are never signalled.
#[tokio::test]
async fn never_signals_the_daemon_itself_or_init() {
    let dir = tempfile::tempdir().unwrap();
    let pid_file = dir.path().join("app.pid");
    for (pid, why) in [
        (std::process::id(), "the keyturn daemon itself"),
        (1, "the init process"),
    ] {
        std::fs::write(&pid_file, format!("{pid}\n")).unwrap();
        // SIGWINCH: ignored by default, harmless if it were sent.
        let e = sink_for(&pid_file, None, "SIGWINCH")
            .send()
            .await
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Invalid, "{e}");
        assert!(e.to_string().contains(why), "{e}");
        assert!(e.to_string().contains("refusing to signal it"), "{e}");
    }
    assert!(never_signalled(0).is_some() && never_signalled(-1).is_some());
}

#[tokio::test]
async fn refuses_symlinked_malformed_and_stale_pid_files() {
    let dir = tempfile::tempdir().unwrap();
    let child = Child::sleeping();
    let real = dir.path().join("real.pid");
    std::fs::write(&real, child.pid().to_string()).unwrap();
    let link = dir.path().join("link.pid");
    symlink(&real, &link).unwrap();
    let e = sink_for(&link, None, "SIGTERM").send().await.unwrap_err();
    assert!(e.to_string().contains("is a symlink"), "{e}");

    let garbage = dir.path().join("garbage.pid");
    std::fs::write(&garbage, "not a pid").unwrap();
    let e = sink_for(&garbage, None, "SIGTERM")
        .send()
        .await
        .unwrap_err();
    assert!(e.to_string().contains("does not hold a pid"), "{e}");

    // A pid that was ours and is gone.
    let mut gone = std::process::Command::new("true").spawn().unwrap();
    gone.wait().unwrap();
    let stale = dir.path().join("stale.pid");
    std::fs::write(&stale, gone.id().to_string()).unwrap();
    let e = sink_for(&stale, None, "SIGTERM").send().await.unwrap_err();
    assert!(e.to_string().contains("not running"), "{e}");
    assert!(e.kind().is_retryable());

    // A process that ended and is not reaped yet (a zombie): not running.
    let mut zombie = std::process::Command::new("true").spawn().unwrap();
    let state = || {
        std::fs::read_to_string(format!("/proc/{}/status", zombie.id()))
            .unwrap()
            .lines()
            .find_map(|l| l.strip_prefix("State:").map(|s| s.trim().to_owned()))
            .unwrap()
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while !state().starts_with('Z') {
        assert!(std::time::Instant::now() < deadline, "{}", state());
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let dead = dir.path().join("zombie.pid");
    std::fs::write(&dead, zombie.id().to_string()).unwrap();
    let e = sink_for(&dead, None, "SIGTERM").send().await.unwrap_err();
    assert!(e.to_string().contains("not running"), "{e}");
    zombie.wait().unwrap();

    let e = sink_for(&dir.path().join("missing.pid"), None, "SIGTERM")
        .send()
        .await
        .unwrap_err();
    assert!(e.to_string().contains("does not exist"), "{e}");
    // The child never got a SIGTERM through the symlink.
    assert!(process_uids(child.pid() as i32).is_ok());
}
