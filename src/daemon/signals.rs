//! Signals with their senders. A reload changes what keyturn rotates and
//! revokes, and a stop ends rotations and revocations, so their
//! `daemon.reload` and `daemon.stop` records name who asked: the pid and uid
//! the kernel puts in the signal's `siginfo` (`systemctl reload` or `stop`
//! shows as systemd's, a `kill` as its caller's). tokio's signal streams
//! carry the signal only; signal-hook's `WithOrigin` reads the sender in the
//! handler, async-signal-safely, and a thread of its own hands it over.

use signal_hook::iterator::exfiltrator::WithOrigin;
use signal_hook::iterator::{Handle, SignalsInfo};
use signal_hook::low_level::siginfo::Origin;

use crate::audit::Actor;

/// The signals received, each with who sent it.
pub(super) struct Incoming {
    rx: tokio::sync::mpsc::Receiver<Actor>,
    handle: Handle,
}

impl Incoming {
    /// Takes over `signals` (their default action, ending the process, no
    /// longer applies) until dropped.
    pub(super) fn new(signals: &[libc::c_int], thread: &str) -> std::io::Result<Incoming> {
        let mut signals = SignalsInfo::<WithOrigin>::new(signals)?;
        let handle = signals.handle();
        // Signals that arrive while one is waiting to be taken coalesce in
        // signal-hook (a reload reads the config as it is then).
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        std::thread::Builder::new()
            .name(thread.into())
            .spawn(move || {
                for origin in signals.forever() {
                    if tx.blocking_send(sender(&origin)).is_err() {
                        break;
                    }
                }
            })?;
        Ok(Incoming { rx, handle })
    }

    /// The next signal's sender (`Actor::Daemon` when the kernel sent it: a
    /// terminal's hang-up or Ctrl-C).
    pub(super) async fn recv(&mut self) -> Option<Actor> {
        self.rx.recv().await
    }
}

impl Drop for Incoming {
    fn drop(&mut self) {
        // Ends the thread's `forever`.
        self.handle.close();
    }
}

fn sender(origin: &Origin) -> Actor {
    match &origin.process {
        Some(p) => Actor::Signal {
            signal: name(origin.signal).into(),
            uid: p.uid,
            pid: p.pid,
        },
        None => Actor::Daemon,
    }
}

fn name(signal: libc::c_int) -> &'static str {
    match signal {
        libc::SIGHUP => "SIGHUP",
        libc::SIGTERM => "SIGTERM",
        libc::SIGINT => "SIGINT",
        libc::SIGUSR1 => "SIGUSR1",
        libc::SIGUSR2 => "SIGUSR2",
        _ => "a signal",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_sighup_names_its_sender() {
        let mut hups = Incoming::new(&[libc::SIGHUP], "test-sighup").unwrap();
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
