//! An ack arriving (`keyturn ack`, or a sink's watch), and a new rotation
//! waiting for the acks of the current version before it retires the
//! previous one early.

use super::*;

impl Inner {
    /// Waits, before a new rotation retires the previous version early, for
    /// the consumers of the current one (`rot` delivered it) to acknowledge
    /// it, but no longer than its grace deadline. With alternating users the
    /// new rotation's `set` re-uses the user of the version being retired, so
    /// retiring it under a consumer that has not moved would break it.
    pub(in crate::rotation) async fn wait_for_acks(
        &self,
        rot: &RotationRow,
    ) -> Result<(), crate::rotation::engine::Stop> {
        let Some(deadline) = rot.retire_at else {
            return Ok(());
        };
        loop {
            let changed = self.ack_changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if self.is_retired(&rot.key.agent) {
                return Err(crate::rotation::engine::Stop::Abandoned);
            }
            if !self.awaits_acks(&rot.key, rot.version) {
                return Ok(());
            }
            let left = (deadline - self.now()).to_std().unwrap_or(Duration::ZERO);
            if left.is_zero() {
                return Ok(());
            }
            tracing::info!(agent = %rot.key.agent, credential = %rot.key.credential, version = rot.version, "a new rotation waits for the current version's acknowledgements (at most until its grace deadline)");
            tokio::select! {
                _ = tokio::time::sleep(left) => return Ok(()),
                _ = &mut changed => {}
                _ = self.cancel.cancelled() => return Err(crate::rotation::engine::Stop::Drained),
            }
        }
    }

    /// A rotation is about to retire the version before the current one
    /// (`rot` delivered the current one) before it begins: it may wait for
    /// the current version's consumers first, and the retirement reaches
    /// the vaults and the target, which may hang. If it was asked for
    /// (`keyturn rotate`), the request is stored first, so that a restart
    /// meanwhile (`kill -9` included) resumes it (waiting again, up to the
    /// same grace deadline) instead of dropping it; it is cleared when the
    /// rotation begins. A scheduled rotation needs nothing stored: its due
    /// time is.
    pub(in crate::rotation) async fn store_request_while_waiting(&self, rot: &RotationRow) {
        let key = &rot.key;
        let requested = self
            .live()
            .get(key)
            .is_some_and(|l| l.next_trigger == Some(Trigger::Manual) && !l.request_stored);
        if !requested {
            return;
        }
        let stored = self
            .persist(vec![Write::RotationRequested {
                key: key.clone(),
                at: self.now(),
            }])
            .await;
        match stored {
            Ok(()) => {
                if let Some(l) = self.live().get_mut(key) {
                    l.request_stored = true;
                }
            }
            Err(e) => {
                tracing::warn!(agent = %key.agent, credential = %key.credential, error = %e, "cannot store the rotation asked for before it begins: a restart before then would drop it");
            }
        }
    }

    /// `consumer` (every awaited one when `None`) acknowledges `version` of
    /// `key`; `actor` did it. Persisted and audited; the last ack of a
    /// version moves the retirement of the previous one to now.
    pub(crate) async fn ack(
        &self,
        key: &CredentialKey,
        version: VersionNo,
        consumer: Option<&str>,
        actor: Actor,
    ) -> Result<AckOutcome, AckError> {
        self.ack_within(key, version, consumer, actor, Some(ACK_WAITS_FOR_DELIVERY))
            .await
    }

    /// [`Inner::ack`], waiting at most `limit` (`None`: as long as it
    /// takes) for a delivery of `version` under way to be recorded.
    pub(super) async fn ack_within(
        &self,
        key: &CredentialKey,
        version: VersionNo,
        consumer: Option<&str>,
        actor: Actor,
        limit: Option<Duration>,
    ) -> Result<AckOutcome, AckError> {
        self.delivered(key, version, limit).await?;
        // An ack counts in memory only once it is audited and persisted: one
        // that cannot be recorded (a full state volume) is not applied, so
        // the ack again the agent is told to give is recorded, not "already
        // acknowledged".
        let _recording = self.recording_ack.lock().await;
        let now = self.now();
        let acknowledged: Vec<String> = {
            let map = self.awaited();
            let Some(a) = map.get(key) else {
                return Err(AckError::NothingAwaited { key: key.clone() });
            };
            if a.version != version {
                return Err(AckError::Stale {
                    key: key.clone(),
                    version,
                    awaited: a.version,
                });
            }
            a.outstanding()
                .filter(|c| c.acked_by(consumer))
                .map(|c| c.name.clone())
                .collect()
        };
        if acknowledged.is_empty() {
            let (awaiting, complete) = {
                let map = self.awaited();
                let a = map.get(key).filter(|a| a.version == version);
                (
                    a.iter()
                        .flat_map(|a| a.outstanding())
                        .map(|c| c.name.clone())
                        .collect(),
                    a.is_some_and(|a| a.complete()),
                )
            };
            // Only while a version before it is still to retire (black-box
            // finding: said of a first version, and of one whose previous
            // version was retired at its grace deadline).
            let retiring = complete
                && self
                    .live()
                    .get(key)
                    .is_some_and(|l| l.retire_at.is_some() && l.retires_previous);
            return Ok(AckOutcome {
                acknowledged,
                awaiting,
                retiring,
            });
        }
        let entry = self
            .catalog()
            .creds
            .get(key)
            .cloned()
            .or_else(|| self.departed_entries().get(key).cloned());
        let mut writes: Vec<Write> = acknowledged
            .iter()
            .map(|c| Write::Acked {
                key: key.clone(),
                version,
                consumer: c.clone(),
                at: now,
            })
            .collect();
        let ack_event = |c: &str, outcome: Outcome| {
            let mut ev = AuditEvent::new("delivery.ack", actor.clone(), outcome);
            ev.agent = Some(key.agent.clone());
            ev.credential = Some(key.credential.clone());
            if let Some(e) = &entry {
                ev.tenant = Some(e.agent.tenant.clone());
                ev.owner = Some(e.agent.owner.clone());
            }
            ev.version = Some(version);
            ev.detail = Some(format!("consumer={c}"));
            ev
        };
        let mut audited = Vec::new();
        let mut failure = None;
        for c in &acknowledged {
            match self.append(ack_event(c, Outcome::Ok)).await {
                Ok(head) => {
                    writes.push(Write::AuditHead(head));
                    audited.push(c);
                }
                Err(e) => {
                    failure = Some(format!("audit: {}", e.message));
                    break;
                }
            }
        }
        if failure.is_none()
            && let Err(e) = self.persist(writes).await
        {
            failure = Some(format!("state: {}", e.message));
        }
        if let Some(why) = failure {
            // What the log already says was acknowledged is taken back: the
            // ack does not count, and the consumer is still awaited.
            for c in audited {
                let mut ev = ack_event(c, Outcome::Failed);
                ev.error = Some(format!(
                    "not recorded ({why}): it does not count; ack again"
                ));
                if let Err(e) = self.append(ev).await {
                    tracing::error!(error = %e.message, "auditing an acknowledgement that could not be recorded failed");
                }
            }
            return Err(AckError::Internal(why));
        }
        let (awaiting, complete) = {
            let mut map = self.awaited();
            let Some(a) = map.get_mut(key).filter(|a| a.version == version) else {
                // A newer version was delivered meanwhile.
                return Err(AckError::Stale {
                    key: key.clone(),
                    version,
                    awaited: map.get(key).map_or(version, |a| a.version),
                });
            };
            let mut now_acked = 0i64;
            for c in a.consumers.iter_mut() {
                if !c.acked() && acknowledged.contains(&c.name) {
                    c.acked_at = Some(now);
                    now_acked += 1;
                }
            }
            self.metrics.acks_awaiting(-now_acked);
            let awaiting: Vec<String> = a.outstanding().map(|c| c.name.clone()).collect();
            (awaiting, a.complete())
        };
        tracing::info!(agent = %key.agent, credential = %key.credential, version, consumers = %acknowledged.join(", "), actor = %actor, "acknowledged");
        self.ack_changed.notify_waiters();
        let retiring = complete && self.retire_now(key);
        Ok(AckOutcome {
            acknowledged,
            awaiting,
            retiring,
        })
    }

    /// Every consumer of the current version of `key` has acknowledged it:
    /// the retire timer, if the rotation is waiting for it, fires now.
    /// Returns whether the previous version is being retired.
    pub(super) fn retire_now(&self, key: &CredentialKey) -> bool {
        let mut live = self.live();
        let mut retiring = false;
        if let Some(l) = live.get(key).filter(|l| l.retire_at.is_some()) {
            // After a first version the step retires nothing.
            retiring = l.retires_previous;
            live.schedule(key, Job::Retire, self.now());
        }
        drop(live);
        self.wake.notify_one();
        retiring
    }
}
