//! Many deliveries, one send: the window behind the signal sink.

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::watch;

use crate::model::{ErrorKind, PluginError};

/// The outcome of one send, once it is known.
type Outcome = Option<Result<(), PluginError>>;

/// Windows keyed by what is sent to: the first delivery for a key opens
/// one and, when it closes, sends; the deliveries that arrived meanwhile
/// wait for that send and share its outcome. A delivery arriving once the
/// send has begun opens the next window: it may follow a write the send
/// came too early for.
pub(super) struct Coalescer<K> {
    open: Mutex<HashMap<K, watch::Receiver<Outcome>>>,
}

impl<K> Default for Coalescer<K> {
    fn default() -> Self {
        Self {
            open: Mutex::new(HashMap::new()),
        }
    }
}

impl<K: Hash + Eq + Clone> Coalescer<K> {
    /// Joins the open window for `key`, or opens one lasting `window` that
    /// ends with `send()` (the first delivery's: they all send the same).
    pub(super) async fn join<F, Fut>(
        &self,
        key: K,
        window: Duration,
        send: F,
    ) -> Result<(), PluginError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<(), PluginError>>,
    {
        let opened = {
            let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
            match open.get(&key) {
                // `has_changed` fails once the opener is gone (its
                // delivery was cancelled): its window will never send.
                Some(rx) if rx.has_changed().is_ok() => Err(rx.clone()),
                _ => {
                    let (tx, rx) = watch::channel(None);
                    open.insert(key.clone(), rx);
                    Ok(tx)
                }
            }
        };
        match opened {
            Ok(tx) => {
                tokio::time::sleep(window).await;
                self.open
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&key);
                let outcome = send().await;
                tx.send_replace(Some(outcome.clone()));
                outcome
            }
            Err(mut rx) => match rx.wait_for(Option::is_some).await {
                Ok(outcome) => outcome.clone().unwrap_or(Ok(())),
                Err(_) => Err(PluginError::new(
                    ErrorKind::Transient,
                    "the signal this delivery was waiting for was cancelled before it was sent",
                )),
            },
        }
    }
}
