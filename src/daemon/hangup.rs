//! SIGHUP with its sender. A reload changes what keyturn rotates and
//! revokes, so its `daemon.reload` record names who asked: the pid and uid
//! the kernel puts in the signal's `siginfo` (`systemctl reload` shows as
//! systemd's, a `kill -HUP` as its caller's). tokio's signal streams carry
//! the signal only; signal-hook's `WithOrigin` reads the sender in the
//! handler, async-signal-safely, and a thread of its own hands it over.

use signal_hook::consts::SIGHUP;
use signal_hook::iterator::exfiltrator::WithOrigin;
use signal_hook::iterator::{Handle, SignalsInfo};
use signal_hook::low_level::siginfo::Origin;

use crate::audit::Actor;

/// The SIGHUPs received, each with who sent it.
pub(super) struct Hangups {
    rx: tokio::sync::mpsc::Receiver<Actor>,
    handle: Handle,
}

impl Hangups {
    pub(super) fn new() -> std::io::Result<Hangups> {
        let mut signals = SignalsInfo::<WithOrigin>::new([SIGHUP])?;
        let handle = signals.handle();
        // Signals that arrive while one is waiting to be taken coalesce in
        // signal-hook (a reload reads the config as it is then).
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        std::thread::Builder::new()
            .name("keyturn-sighup".into())
            .spawn(move || {
                for origin in signals.forever() {
                    if tx.blocking_send(sender(&origin)).is_err() {
                        break;
                    }
                }
            })?;
        Ok(Hangups { rx, handle })
    }

    /// The next SIGHUP's sender (`Actor::Daemon` when the kernel sent it,
    /// a terminal hang-up).
    pub(super) async fn recv(&mut self) -> Option<Actor> {
        self.rx.recv().await
    }
}

impl Drop for Hangups {
    fn drop(&mut self) {
        // Ends the thread's `forever`.
        self.handle.close();
    }
}

fn sender(origin: &Origin) -> Actor {
    match &origin.process {
        Some(p) => Actor::Signal {
            signal: "SIGHUP".into(),
            uid: p.uid,
            pid: p.pid,
        },
        None => Actor::Daemon,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_sighup_names_its_sender() {
        let mut hups = Hangups::new().unwrap();
        nix::sys::signal::kill(nix::unistd::getpid(), nix::sys::signal::Signal::SIGHUP).unwrap();
        let actor = tokio::time::timeout(std::time::Duration::from_secs(10), hups.recv())
            .await
            .expect("the SIGHUP arrives")
            .unwrap();
        assert_eq!(
            actor,
            Actor::Signal {
                signal: "SIGHUP".into(),
                uid: nix::unistd::getuid().as_raw(),
                pid: std::process::id() as i32,
            }
        );
    }
}
