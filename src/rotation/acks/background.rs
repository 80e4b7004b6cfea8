//! The tasks a delivery leaves running: a sink's ack watch, and the
//! background retries of a failed delivery to a sink that does not hold up
//! the rotation.

use super::*;

impl Inner {
    /// Acknowledges for `name` when its sink's watch says so.
    pub(super) fn spawn_ack_watch(
        self: Arc<Self>,
        key: CredentialKey,
        version: VersionNo,
        name: String,
        watch: crate::sinks::AckWatch,
    ) {
        let tracker = self.tracker.clone();
        let count = self.watch_count(&key, version, &name);
        tracker.spawn(async move {
            let result = tokio::select! {
                r = watch => r,
                _ = self.cancel.cancelled() => return,
            };
            match result {
                // Replaced (see `replace_ack_watch`): what it saw may be
                // keyturn's own open.
                Ok(()) if self.watch_count(&key, version, &name) != count => {
                    tracing::debug!(agent = %key.agent, credential = %key.credential, version, consumer = %name, "an acknowledgement watch replaced by a new delivery ended");
                }
                Ok(()) => {
                    // Stale: a newer version replaced it; a stopping
                    // daemon records nothing more.
                    if let Err(e) = self
                        .ack_within(&key, version, Some(&name), Actor::Daemon, None)
                        .await
                        && !matches!(e, AckError::Stale { .. } | AckError::NothingAwaited { .. })
                        && !self.cancel.is_cancelled()
                    {
                        tracing::warn!(agent = %key.agent, credential = %key.credential, version, consumer = %name, error = %e, "recording an acknowledgement failed");
                    }
                }
                // A watch of a version that was replaced ends so.
                Err(e) if !self.awaits_from(&key, version, &name) => {
                    tracing::debug!(agent = %key.agent, credential = %key.credential, version, consumer = %name, error = %e, "acknowledgement watch ended");
                }
                Err(e) => {
                    tracing::warn!(agent = %key.agent, credential = %key.credential, version, consumer = %name, error = %e, "watching for an acknowledgement failed; the consumer can still ack with `keyturn ack`");
                }
            }
        });
    }

    /// Retries a failed delivery to a sink that does not hold up the
    /// rotation, with the step back-off (capped, jittered, without an
    /// attempt limit), auditing each attempt, until it succeeds or the
    /// version is no longer awaited from it (a newer one was delivered).
    /// Past the grace deadline the consumer is a holdout and the retries go
    /// on: its successful delivery still counts as its (late) ack. A
    /// receiver that refuses the notice (an error retrying cannot cure, such
    /// as a 400 or a 401) is retried like a parked step instead: from the
    /// retry ceiling, doubling up to an hour. `first`: the error of the
    /// attempt before (none when resumed after a restart).
    pub(super) fn spawn_delivery_retry(
        self: Arc<Self>,
        key: CredentialKey,
        sink: Arc<dyn Sink>,
        notice: Notice,
        value: SecretValue,
        deadline: DateTime<Utc>,
        first: Option<PluginError>,
    ) {
        let tracker = self.tracker.clone();
        tracker.spawn(async move {
            let retry = entry_retry(&self.catalog());
            let mut delays = ExponentialBuilder::default()
                .with_min_delay(retry.initial_delay)
                .with_max_delay(retry.max_delay)
                .without_max_times()
                .with_jitter()
                .build();
            let name = sink.describe();
            let version = notice.version;
            let mut attempt = 1u32;
            let mut past_deadline = false;
            let mut asked = first.as_ref().and_then(|e| e.retry_after);
            // Consecutive refusals.
            let mut refused = u32::from(first.is_some_and(|e| !e.kind.is_retryable()));
            loop {
                // A receiver's `Retry-After` (capped by the sink) is waited
                // out in full: the back-off is the least wait, not the most.
                let backoff = delays.next().unwrap_or(retry.max_delay);
                let asked_for = asked.take().unwrap_or_default();
                let delay = if refused > 0 {
                    park_delay(&retry, refused)
                } else {
                    backoff
                }
                .max(asked_for);
                let left = (deadline - self.now()).to_std().unwrap_or(Duration::ZERO);
                // Past the grace deadline the consumer is a holdout; it is
                // still owed the version (a webhook may carry the value), so
                // the retries go on until it has it or a newer version is
                // delivered, at the capped back-off.
                if left.is_zero() && !past_deadline {
                    past_deadline = true;
                    tracing::warn!(agent = %key.agent, credential = %key.credential, version, sink = %name, "grace deadline passed: the consumer is a holdout; its delivery is still retried");
                }
                // One more attempt at the deadline, but never before the
                // receiver's `Retry-After`.
                let wait = if left.is_zero() {
                    delay
                } else {
                    delay.min(left).max(asked_for)
                };
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = self.cancel.cancelled() => return,
                }
                if !self.awaits_from(&key, version, &name) {
                    return;
                }
                let Some(entry) = self.catalog().creds.get(&key).cloned() else {
                    return;
                };
                // The sink as configured now (a reload may have changed its
                // settings); one that left the config is retried no more.
                let Some(sink) = entry.sinks.iter().find(|s| s.describe() == name).cloned()
                else {
                    return;
                };
                attempt += 1;
                let result = sink.deliver(&notice, &value).await;
                self.metrics.delivery(sink.kind(), result.is_ok());
                let (outcome, error) = match &result {
                    Ok(_) => (Outcome::Ok, None),
                    Err(e) => (Outcome::Failed, Some(format!("attempt {attempt}: {e}"))),
                };
                let head = self
                    .audit_delivery(&entry, &notice, outcome, name.clone(), error, true)
                    .await;
                match head {
                    Ok(h) => {
                        if let Err(e) = self.persist(vec![h]).await {
                            tracing::error!(error = %e, "recording a delivery attempt failed");
                        }
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "auditing a delivery attempt failed");
                    }
                }
                match result {
                    Ok(Delivered::Acknowledged) => {
                        let _ = self.ack(&key, version, Some(&name), Actor::Daemon).await;
                        return;
                    }
                    Ok(Delivered::Sent) => {
                        self.set_failing(&key, version, &name, None);
                        let watch = sink.ack_watch(&key, version);
                        self.set_how(
                            &key,
                            version,
                            &name,
                            if watch.is_some() {
                                AckHow::Watched
                            } else {
                                AckHow::Explicit
                            },
                        );
                        if let Some(w) = watch {
                            self.clone().spawn_ack_watch(key.clone(), version, name, w);
                        }
                        return;
                    }
                    Err(e) => {
                        asked = e.retry_after;
                        // Every kind is retried: a receiver that refuses now
                        // may be fixed later.
                        refused = if e.kind.is_retryable() {
                            0
                        } else {
                            refused.saturating_add(1)
                        };
                        self.set_failing(&key, version, &name, Some(retry_note(&e, attempt)));
                        tracing::warn!(agent = %key.agent, credential = %key.credential, version, sink = %name, attempt, error = %e, "delivery failed; retrying in the background");
                    }
                }
            }
        });
    }
}
