//! The awaited consumers across a reload (rebound to the sinks of the new
//! catalog) and a restart (rebuilt from state, their background deliveries
//! resumed).

use super::*;

impl Inner {
    /// After a reload from `old` to `new`: a consumer awaited from a sink
    /// the reload removed is awaited no more (its delivery retries stop).
    /// One whose sink does not hold up the rotation (a webhook) and changed
    /// its `url` (the same position among the credential's such sinks, as
    /// many before as after) is now the sink at the new `url`, where its
    /// delivery is retried at once.
    pub(in crate::rotation) async fn rebind_awaited(
        self: &Arc<Self>,
        old: &Catalog,
        new: &Catalog,
    ) {
        let mut writes = Vec::new();
        let mut moved = Vec::new();
        let mut done = Vec::new();
        {
            let mut map = self.awaited();
            for (key, a) in map.iter_mut() {
                let Some(entry) = new.creds.get(key) else {
                    continue;
                };
                // The sinks a consumer may still be awaited from: a delivery
                // retried in the background (acknowledged by its own
                // success), or one whose consumer acks by itself. Black-box
                // finding: an `ack` a reload took away was still awaited, and
                // every later rotation waited out its grace for it.
                let names: Vec<String> = entry.sinks.iter().map(|s| s.describe()).collect();
                let awaits = |c: &Consumer| {
                    c.how == AckHow::Retrying
                        || entry
                            .sinks
                            .iter()
                            .any(|s| s.describe() == c.name && s.awaits_ack())
                };
                if a.outstanding()
                    .all(|c| names.contains(&c.name) && awaits(c))
                {
                    continue;
                }
                let background = |e: &CredEntry| -> Vec<String> {
                    e.sinks
                        .iter()
                        .filter(|s| !s.holds_up_rotation())
                        .map(|s| s.describe())
                        .collect()
                };
                let before = old
                    .creds
                    .get(key)
                    .map(|e| background(e))
                    .unwrap_or_default();
                let after = background(entry);
                let known: Vec<String> = a.consumers.iter().map(|c| c.name.clone()).collect();
                let (mut dropped, mut renamed) = (0i64, Vec::new());
                a.consumers.retain_mut(|c| {
                    if c.acked() || (names.contains(&c.name) && awaits(c)) {
                        return true;
                    }
                    if names.contains(&c.name) {
                        tracing::info!(agent = %key.agent, credential = %key.credential, version = a.version, consumer = %c.name, "reload: the consumer's sink no longer asks for an ack: it is not awaited any more");
                        dropped += 1;
                        return false;
                    }
                    let successor = before
                        .iter()
                        .position(|n| *n == c.name)
                        .filter(|_| before.len() == after.len() && c.how == AckHow::Retrying)
                        .map(|i| &after[i])
                        .filter(|n| !before.contains(n) && !known.contains(n));
                    if let Some(n) = successor {
                        renamed.push(n.clone());
                        tracing::info!(agent = %key.agent, credential = %key.credential, version = a.version, from = %c.name, to = %n, "reload: the delivery retried in the background goes to the sink's new url");
                        c.name = n.clone();
                        c.failing = None;
                        true
                    } else {
                        tracing::warn!(agent = %key.agent, credential = %key.credential, version = a.version, consumer = %c.name, "reload: the consumer's sink left the config: it is not awaited any more");
                        dropped += 1;
                        false
                    }
                });
                self.metrics.acks_awaiting(-dropped);
                writes.push(Write::AwaitAcks {
                    key: key.clone(),
                    version: a.version,
                    consumers: a.consumers.iter().map(|c| c.name.clone()).collect(),
                });
                // The acks given, at the times they were given: `surface`
                // shows them as each consumer's last use.
                writes.extend(a.consumers.iter().filter_map(|c| {
                    c.acked_at.map(|at| Write::Acked {
                        key: key.clone(),
                        version: a.version,
                        consumer: c.name.clone(),
                        at,
                    })
                }));
                if !renamed.is_empty() {
                    moved.push((key.clone(), a.version, renamed));
                }
                if a.complete() {
                    done.push(key.clone());
                }
            }
        }
        if writes.is_empty() {
            return;
        }
        if let Err(e) = self.persist(writes).await {
            tracing::warn!(error = %e.message, "reload: cannot record the consumers awaited now; a restart works them out again from the config");
        }
        self.ack_changed.notify_waiters();
        for key in &done {
            self.retire_now(key);
        }
        if moved.is_empty() {
            return;
        }
        let rows = self
            .load(move |s| {
                let mut rows = Vec::new();
                for (key, version, renamed) in moved {
                    if let Some(rot) = s.latest_rotation(&key)?
                        && rot.version == version
                    {
                        rows.push((rot, renamed));
                    }
                }
                Ok(rows)
            })
            .await;
        match rows {
            Ok(rows) => {
                for (rot, renamed) in rows {
                    self.resume_deliveries_of(rot, Some(&renamed));
                }
            }
            Err(e) => {
                tracing::warn!(error = %e.message, "reload: cannot retry deliveries at a changed url: reading their rotations failed; the next rotation delivers there");
            }
        }
    }

    /// Rebuilds the awaited consumers from state at start-up. `retiring`:
    /// the versions whose previous version is still to be retired (their
    /// rotation is at its retire step); any other version's outstanding
    /// consumers are holdouts already.
    pub(in crate::rotation) fn restore_awaited(
        self: &Arc<Self>,
        rows: Vec<AckRow>,
        retiring: &HashMap<CredentialKey, VersionNo>,
    ) {
        let catalog = self.catalog();
        let mut map = self.awaited();
        let mut outstanding = 0i64;
        let mut watches = Vec::new();
        for row in rows {
            let sink = catalog.creds.get(&row.key).and_then(|e| {
                e.sinks
                    .iter()
                    .find(|s| s.describe() == row.consumer)
                    .cloned()
            });
            let acked = row.acked_at.is_some();
            // Its sink no longer asks for an ack (changed while the daemon
            // was down): a delivery that succeeded is all it needs.
            if !acked
                && sink
                    .as_ref()
                    .is_some_and(|s| s.holds_up_rotation() && !s.awaits_ack())
            {
                tracing::info!(agent = %row.key.agent, credential = %row.key.credential, version = row.version, consumer = %row.consumer, "a consumer awaited before the restart no longer asks for an ack: it is not awaited any more");
                continue;
            }
            if !acked && sink.is_none() && catalog.creds.contains_key(&row.key) {
                // Its sink left the config (or changed its `url`) while the
                // daemon was down: nothing delivers to it or awaits it any more.
                tracing::warn!(agent = %row.key.agent, credential = %row.key.credential, version = row.version, consumer = %row.consumer, "a consumer awaited before the restart is no longer in the config: it is not awaited any more");
                continue;
            }
            // A delivery retried (acked or not): acknowledged by its own
            // success only, and no reason to retire early (`complete`).
            let mut how = if sink.as_ref().is_some_and(|s| !s.holds_up_rotation()) {
                AckHow::Retrying
            } else {
                AckHow::Explicit
            };
            if !acked && let Some(sink) = &sink {
                if !sink.holds_up_rotation() {
                    // Its delivery failed: retried (`resume_deliveries`),
                    // acknowledged by its own success only.
                    how = AckHow::Retrying;
                } else if let Some(w) = sink.ack_watch(&row.key, row.version) {
                    how = AckHow::Watched;
                    watches.push((row.key.clone(), row.version, row.consumer.clone(), w));
                }
            }
            outstanding += i64::from(!acked);
            let a = map.entry(row.key.clone()).or_insert_with(|| Awaited {
                version: row.version,
                consumers: Vec::new(),
                // A first version retires nothing: never holdouts.
                retired_with_holdouts: retiring.get(&row.key) != Some(&row.version)
                    && row.version > 1,
            });
            a.consumers.push(Consumer {
                name: row.consumer,
                how,
                acked_at: row.acked_at,
                failing: None,
                watch: 0,
            });
        }
        drop(map);
        self.metrics.acks_awaiting(outstanding);
        for (key, version, name, w) in watches {
            self.clone().spawn_ack_watch(key, version, name, w);
        }
    }

    /// After a restart: the deliveries that were being retried in the
    /// background (to sinks that do not hold up the rotation) are retried
    /// again, with the value read back from the vault. `retiring`: the
    /// rotations at their retire step. A version whose grace period ended
    /// with holdouts (its rotation done) is still owed to them while it is
    /// current: its rotation is read from state.
    pub(in crate::rotation) fn resume_deliveries(self: &Arc<Self>, retiring: Vec<RotationRow>) {
        let resumed: std::collections::HashSet<(CredentialKey, VersionNo)> = retiring
            .iter()
            .map(|r| (r.key.clone(), r.version))
            .collect();
        for rot in retiring {
            self.resume_deliveries_of(rot, None);
        }
        // Every other version still owed somewhere: one whose grace ended
        // with holdouts, and a first version (it retires nothing, so its
        // rotation is done however its deliveries went).
        let holdouts: Vec<(CredentialKey, VersionNo)> = self
            .awaited()
            .iter()
            .filter(|(k, a)| {
                a.outstanding().next().is_some() && !resumed.contains(&((*k).clone(), a.version))
            })
            .map(|(k, a)| (k.clone(), a.version))
            .collect();
        if holdouts.is_empty() {
            return;
        }
        // Shown as retrying from the start (the rotation is read below).
        let catalog = self.catalog();
        for (key, version) in &holdouts {
            for s in catalog.creds.get(key).iter().flat_map(|e| e.sinks.iter()) {
                if !s.holds_up_rotation() && self.awaits_from(key, *version, &s.describe()) {
                    self.set_how(key, *version, &s.describe(), AckHow::Retrying);
                }
            }
        }
        let me = self.clone();
        self.tracker.spawn(async move {
            let rows = me
                .load(move |s| {
                    let mut rows = Vec::new();
                    for (key, version) in holdouts {
                        // A newer rotation under way delivers by itself.
                        if let Some(rot) = s.latest_rotation(&key)?
                            && rot.version == version
                            && rot.step == crate::rotation::step::Step::Done
                        {
                            rows.push(rot);
                        }
                    }
                    Ok(rows)
                })
                .await;
            match rows {
                Ok(rows) => {
                    for rot in rows {
                        me.resume_deliveries_of(rot, None);
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot resume the deliveries owed to holdouts: reading their rotations failed");
                }
            }
        });
    }

    /// Retries again, in the background, each delivery of `rot`'s version
    /// still awaited from a sink that does not hold up the rotation (of
    /// those named in `only`, if given).
    fn resume_deliveries_of(self: &Arc<Self>, rot: RotationRow, only: Option<&[String]>) {
        let catalog = self.catalog();
        let Some(entry) = catalog.creds.get(&rot.key) else {
            return;
        };
        if self.is_retired(&rot.key.agent) {
            return;
        }
        // Past it the consumer is a holdout, still owed the version.
        let deadline = rot.retire_at.unwrap_or_else(|| self.now());
        let sinks: Vec<Arc<dyn Sink>> = entry
            .sinks
            .iter()
            .filter(|s| {
                !s.holds_up_rotation()
                    && only.is_none_or(|o| o.contains(&s.describe()))
                    && self.awaits_from(&rot.key, rot.version, &s.describe())
            })
            .cloned()
            .collect();
        if sinks.is_empty() {
            return;
        }
        for s in &sinks {
            self.set_how(&rot.key, rot.version, &s.describe(), AckHow::Retrying);
        }
        let (me, entry) = (self.clone(), entry.clone());
        self.tracker.spawn(async move {
            let value = match me.read_staged(&entry, &rot).await {
                Ok(v) => v,
                Err(e) => {
                    tracing::warn!(agent = %rot.key.agent, credential = %rot.key.credential, version = rot.version, error = %e.message(), "cannot resume the deliveries being retried: the version cannot be read back");
                    return;
                }
            };
            let next_due = me.cred_row(entry.key()).next_due;
            let notice = crate::rotation::attempt::notice_for(&entry, &rot, &value, rot.updated_at, next_due);
            for sink in sinks {
                me.clone().spawn_delivery_retry(
                    rot.key.clone(),
                    sink,
                    notice.clone(),
                    value.clone(),
                    deadline,
                    None,
                );
            }
        });
    }
}
