//! Delivery: one task per sink sends what it is owed, backs off while
//! the sink fails, gives up a delivery the receiver refuses, and audits
//! what was delivered.

use super::*;

impl Alerts {
    /// What `sink` should send now, and when it next has something due: a
    /// firing alert's re-send (at `resend`), a refused delivery's next try
    /// (at `resend`, else `max_backoff`).
    fn due(
        &self,
        sink: &str,
        now: DateTime<Utc>,
        resend: Option<Duration>,
    ) -> (Vec<(String, Delivery)>, Option<DateTime<Utc>>) {
        let every = |d: &Delivery| {
            let every = if d.given_up {
                Some(resend.unwrap_or(self.inner.opts.max_backoff))
            } else if d.action == Action::Fire {
                resend
            } else {
                None
            };
            every.and_then(|r| chrono::Duration::from_std(r).ok())
        };
        let state = self.state();
        let mut due = Vec::new();
        let mut next: Option<DateTime<Utc>> = None;
        let from = (sink.to_owned(), String::new());
        for ((s, key), d) in state.deliveries.range(from..) {
            if s != sink {
                break;
            }
            if d.pending {
                due.push((key.clone(), d.clone()));
                continue;
            }
            if let (Some(every), Some(last)) = (every(d), d.last_sent) {
                let at = last + every;
                if at <= now {
                    due.push((key.clone(), d.clone()));
                } else {
                    next = Some(next.map_or(at, |n| n.min(at)));
                }
            }
        }
        (due, next)
    }

    /// One sink's delivery task.
    pub(super) async fn run_sink(self, slot: Arc<SinkSlot>) {
        let name = slot.named.name.clone();
        let sink = slot.named.sink.clone();
        let resend = sink.resend_interval();
        let mut failures: u32 = 0;
        loop {
            let now = Utc::now();
            let (due, next) = self.due(&name, now, resend);
            if due.is_empty() {
                let wait = next
                    .and_then(|t| (t - now).to_std().ok())
                    .unwrap_or(Duration::from_secs(3600));
                tokio::select! {
                    _ = slot.wake.notified() => {}
                    _ = tokio::time::sleep(wait) => {}
                    _ = slot.stop.cancelled() => return,
                }
                continue;
            }
            let mut backoff = None;
            for (key, d) in due {
                // The fire a resolve still owes goes first (the next round
                // sends the resolve).
                let what = match d.action {
                    Action::Resolve { .. } if d.owes_fire => Action::Fire,
                    a => a,
                };
                let attempt = async {
                    match what {
                        Action::Fire => {
                            let notice = Notice {
                                key: &key,
                                alert: &d.alert,
                                replaces: d.replaced(),
                            };
                            sink.fire(&notice).await
                        }
                        // The alert the receiver holds is the one it ends.
                        Action::Resolve { ended_at } => {
                            let notice = Notice {
                                key: &key,
                                alert: d.sent.as_ref().unwrap_or(&d.alert),
                                replaces: None,
                            };
                            sink.resolve(&notice, ended_at).await
                        }
                    }
                };
                let result = tokio::select! {
                    r = attempt => r,
                    _ = slot.stop.cancelled() => return,
                };
                match result {
                    Ok(()) => {
                        failures = 0;
                        self.delivered(&name, &key, &d, what).await;
                    }
                    Err(e) if e.kind.is_retryable() => {
                        failures = failures.saturating_add(1);
                        let wait = backoff_delay(&self.inner.opts, failures)
                            .max(e.retry_after.unwrap_or_default());
                        tracing::warn!(
                            sink = %name, key = %key, error = %e.message,
                            // Jittered: shown to the millisecond.
                            retry_in = %humantime::format_duration(std::time::Duration::from_millis(
                                u64::try_from(wait.as_millis()).unwrap_or(u64::MAX)
                            )),
                            "alert delivery failed; retrying"
                        );
                        if let Some(m) = &self.inner.metrics {
                            m.alert_delivery(&name, "retry");
                        }
                        backoff = Some(wait);
                        break;
                    }
                    Err(e) => self.gave_up(&name, &key, &d, what, &e).await,
                }
            }
            if let Some(wait) = backoff {
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = slot.stop.cancelled() => return,
                }
            }
        }
    }

    /// `what` of `sent` reached sink `name`.
    pub(super) async fn delivered(&self, name: &str, key: &str, sent: &Delivery, what: Action) {
        let now = Utc::now();
        let mut new_fire = false;
        {
            let mut guard = self.state();
            let state: &mut State = &mut guard;
            let id = (name.to_owned(), key.to_owned());
            let mut ops = Vec::new();
            let generation = state.next_generation();
            if let Some(d) = state.deliveries.get_mut(&id) {
                let unchanged = d.generation == sent.generation;
                match what {
                    Action::Fire => {
                        new_fire = d.lacks(&sent.alert);
                        d.sent = Some(sent.alert.clone());
                        d.owes_fire = false;
                        d.given_up = false;
                        // A resolve that owed its fire stays pending.
                        if d.action == Action::Fire {
                            if unchanged {
                                d.pending = false;
                                d.last_sent = Some(now);
                            } else if d.lacks(&d.alert.clone()) {
                                // The severity changed meanwhile (or back).
                                d.pending = true;
                                d.generation = generation;
                            }
                        }
                        ops.push(Op::put_delivery(&id, d));
                    }
                    Action::Resolve { .. } if unchanged => {
                        state.deliveries.remove(&id);
                        ops.push(Op::DelDelivery(id.0, id.1));
                    }
                    // Fired again while the resolve was on its way: the
                    // receiver saw the end, so the fire is owed.
                    Action::Resolve { .. } => {
                        if d.action == Action::Fire {
                            d.sent = None;
                            d.pending = true;
                            d.generation = generation;
                            ops.push(Op::put_delivery(&id, d));
                        }
                    }
                }
            }
            state.commit(ops);
            self.gauges(state);
        }
        if let Some(m) = &self.inner.metrics {
            m.alert_delivery(name, "ok");
        }
        let event = match what {
            Action::Fire if new_fire => "alert.fired",
            Action::Fire => return,
            Action::Resolve { .. } => "alert.resolved",
        };
        let alert = match what {
            Action::Fire => &sent.alert,
            Action::Resolve { .. } => sent.sent.as_ref().unwrap_or(&sent.alert),
        };
        tracing::info!(sink = %name, key = %key, severity = alert.severity.as_str(), "{event}");
        self.inner
            .recorder
            .record(audit_event(event, Outcome::Ok, name, alert, None))
            .await;
    }

    /// `what` of `sent` was refused by sink `name` in a way retrying soon
    /// will not change: given up, and tried again only every
    /// `max_backoff` (or resend interval) and at a reload. Audited when
    /// the row is first refused.
    async fn gave_up(&self, name: &str, key: &str, sent: &Delivery, what: Action, e: &PluginError) {
        let now = Utc::now();
        let mut first = false;
        let mut dropped = false;
        {
            let mut state = self.state();
            let id = (name.to_owned(), key.to_owned());
            let mut ops = Vec::new();
            if let Some(d) = state.deliveries.get_mut(&id) {
                let same_action = matches!(
                    (what, d.action),
                    (Action::Fire, Action::Fire) | (Action::Resolve { .. }, Action::Resolve { .. })
                );
                if what == Action::Fire && !same_action && d.sent.is_none() {
                    // The fire a resolve owed: the sink never accepted the
                    // alert and it is over, so nothing is owed any more.
                    dropped = true;
                    state.deliveries.remove(&id);
                    ops.push(Op::DelDelivery(id.0, id.1));
                } else if same_action {
                    first = !d.given_up;
                    d.given_up = true;
                    if d.generation == sent.generation {
                        d.pending = false;
                        d.last_sent = Some(now);
                    }
                    ops.push(Op::put_delivery(&id, d));
                }
            }
            state.commit(ops);
            self.gauges(&state);
        }
        if let Some(m) = &self.inner.metrics {
            m.alert_delivery(name, "gave_up");
        }
        let action = match what {
            Action::Fire => "fire",
            Action::Resolve { .. } => "resolve",
        };
        if dropped {
            tracing::error!(sink = %name, key = %key, action, error = %e.message, "alert delivery refused; given up: the alert has ended, so nothing more is sent");
        } else {
            tracing::error!(sink = %name, key = %key, action, error = %e.message, "alert delivery refused; given up: tried again every few minutes and at a reload");
        }
        if !first && !dropped {
            return;
        }
        let mut event = audit_event("alert.failed", Outcome::Failed, name, &sent.alert, None);
        event.error = Some(e.message.clone());
        event.detail = Some(format!(
            "{} action={action}",
            event.detail.unwrap_or_default(),
        ));
        self.inner.recorder.record(event).await;
    }
}

fn audit_event(
    event: &str,
    outcome: Outcome,
    sink: &str,
    alert: &Alert,
    error: Option<String>,
) -> AuditEvent {
    let mut ev = AuditEvent::new(event, Actor::Daemon, outcome);
    ev.agent = alert.agent.as_deref().and_then(|a| AgentId::new(a).ok());
    ev.credential = alert
        .credential
        .as_deref()
        .and_then(|c| CredentialId::new(c).ok());
    ev.tenant = alert.tenant.clone();
    ev.detail = Some(format!(
        "sink={sink} alert={} severity={} key={}",
        alert.name,
        alert.severity.as_str(),
        alert.dedup_key()
    ));
    ev.error = error;
    ev
}
