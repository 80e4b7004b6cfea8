//! The firing set and the deliveries owed, in memory ([`State`]) and in
//! the spool database: how a change of the firing set becomes fires,
//! updates and resolves per sink, and how both are written and loaded.

use super::*;

impl State {
    pub(super) fn next_generation(&mut self) -> u64 {
        self.generation += 1;
        self.generation
    }

    /// Makes the deliveries agree with the firing set: each sink holds one
    /// incident per condition, agent and credential, at the highest
    /// severity firing that its route passes (a held alert counts: no
    /// receiver saw it end). A new incident is fired; a change of severity
    /// is fired again, as an update of the same incident; an incident gone
    /// (its last alert `ended`, or no longer routed to the sink) is
    /// resolved. Returns whether a delivery became due.
    pub(super) fn sync(
        &mut self,
        sinks: &[(String, Route)],
        now: DateTime<Utc>,
        ended: &[(Alert, DateTime<Utc>)],
        ops: &mut Vec<Op>,
    ) -> bool {
        // (sink, incident) → the alert it should hold, and whether one of
        // the incident's alerts is firing now (not only held).
        let mut view: BTreeMap<(String, String), (Alert, bool)> = BTreeMap::new();
        for f in self.firing.values() {
            for (sink, route) in sinks {
                if !route.matches(&f.alert) {
                    continue;
                }
                let live = f.gone_at.is_none();
                let entry = view
                    .entry((sink.clone(), f.alert.incident_key()))
                    .or_insert_with(|| (f.alert.clone(), live));
                if entry.0.severity < f.alert.severity {
                    entry.0 = f.alert.clone();
                }
                entry.1 |= live;
            }
        }
        let mut rows: BTreeMap<(String, String), Vec<String>> = BTreeMap::new();
        for ((sink, key), d) in &self.deliveries {
            rows.entry((sink.clone(), d.alert.incident_key()))
                .or_default()
                .push(key.clone());
        }
        let mut woken = false;
        for ((sink, incident), (alert, live)) in view {
            let keys = rows
                .remove(&(sink.clone(), incident.clone()))
                .unwrap_or_default();
            // The row that holds the incident: the one firing these labels,
            // else any firing, else a resolve not yet delivered (the
            // receiver may not have seen the end: the same incident).
            let row = |pick: &dyn Fn(&Delivery) -> bool| {
                keys.iter()
                    .position(|k| pick(&self.deliveries[&(sink.clone(), k.clone())]))
            };
            let primary = row(&|d| d.action == Action::Fire && d.alert.same_labels(&alert))
                .or_else(|| row(&|d| d.action == Action::Fire))
                .or(if keys.is_empty() { None } else { Some(0) });
            for (i, key) in keys.into_iter().enumerate() {
                let id = (sink.clone(), key);
                woken |= if Some(i) == primary {
                    self.hold(id, &alert, live, ops)
                } else {
                    // Two rows of one incident: spooled before incidents
                    // were keyed per condition.
                    self.end(id, now, ops)
                };
            }
            if primary.is_none() {
                let d = Delivery::fire(alert, self.next_generation());
                ops.push(Op::PutDelivery(
                    sink.clone(),
                    incident.clone(),
                    Box::new(d.clone()),
                ));
                self.deliveries.insert((sink, incident), d);
                woken = true;
            }
        }
        for ((sink, incident), keys) in rows {
            let route = sinks.iter().find(|(s, _)| *s == sink).map(|(_, r)| r);
            let ended_at = ended
                .iter()
                .filter(|(a, _)| a.incident_key() == incident && route.is_none_or(|r| r.matches(a)))
                .map(|(_, at)| *at)
                .max()
                .unwrap_or(now);
            for key in keys {
                woken |= self.end((sink.clone(), key), ended_at, ops);
            }
        }
        woken
    }

    /// Row `id` should hold `alert`; `live`: a condition's alert is firing
    /// now, not only held. Returns whether a fire became due.
    pub(super) fn hold(
        &mut self,
        id: (String, String),
        alert: &Alert,
        live: bool,
        ops: &mut Vec<Op>,
    ) -> bool {
        let generation = self.next_generation();
        let d = self.deliveries.get_mut(&id).expect("a listed row");
        match d.action {
            Action::Fire if d.alert == *alert => return false,
            // New text only: re-sends carry it; nothing is sent now.
            Action::Fire if d.alert.same_labels(alert) => d.alert = alert.clone(),
            // Every alert of the condition is held: its severity changes
            // when it is back (or it resolves), not while it is gone.
            Action::Fire if !live => return false,
            // Another severity: the receiver is told, unless it already
            // holds this one (an update still owed was taken back).
            Action::Fire => {
                d.alert = alert.clone();
                d.pending = d.lacks(alert);
                d.generation = generation;
                // A refusal of the last severity is not one of this one:
                // it is tried at once, and a refusal is audited again.
                if d.pending {
                    d.given_up = false;
                }
            }
            // Back before its resolve was delivered: the same incident.
            Action::Resolve { .. } => {
                d.action = Action::Fire;
                d.alert = alert.clone();
                d.owes_fire = false;
                d.given_up = false;
                d.pending = d.lacks(alert);
                d.generation = generation;
            }
        }
        ops.push(Op::put_delivery(&id, d));
        d.pending
    }

    /// Row `id`'s incident ended at `ended_at`. Returns whether a resolve
    /// became due.
    fn end(&mut self, id: (String, String), ended_at: DateTime<Utc>, ops: &mut Vec<Op>) -> bool {
        let generation = self.next_generation();
        let d = self.deliveries.get_mut(&id).expect("a listed row");
        if matches!(d.action, Action::Resolve { .. }) {
            return false;
        }
        if d.sent.is_none() && d.given_up {
            // The sink refused every fire of it: no incident is open there
            // to resolve, and a trigger now would page for an alert that
            // is already over.
            tracing::warn!(
                sink = %id.0, key = %id.1, severity = d.alert.severity.as_str(),
                "alert ended; its sink never accepted it (given up), so neither it nor a resolve is sent"
            );
            self.deliveries.remove(&id);
            ops.push(Op::DelDelivery(id.0, id.1));
            return false;
        }
        d.action = Action::Resolve { ended_at };
        d.owes_fire = d.sent.is_none();
        d.given_up = false;
        d.pending = true;
        d.generation = generation;
        ops.push(Op::put_delivery(&id, d));
        true
    }

    /// Commits `ops` in one transaction. A failure (a full disk) is logged:
    /// memory stays right, and the next change writes the rows again.
    pub(super) fn commit(&mut self, ops: Vec<Op>) {
        if ops.is_empty() {
            return;
        }
        if let Err(e) = write(&mut self.db, &ops) {
            tracing::error!(error = %e, "alert spool: cannot write; deliveries continue from memory");
        }
    }
}

pub(super) fn write(db: &mut Connection, ops: &[Op]) -> Result<(), String> {
    let tx = db.transaction().map_err(|e| e.to_string())?;
    for op in ops {
        let r = match op {
            Op::PutFiring(key, f) => tx.execute(
                "INSERT OR REPLACE INTO firing (key, body) VALUES (?1, ?2)",
                params![key, serde_json::to_string(f).map_err(|e| e.to_string())?],
            ),
            Op::DelFiring(key) => tx.execute("DELETE FROM firing WHERE key = ?1", params![key]),
            Op::PutDelivery(sink, key, d) => tx.execute(
                "INSERT OR REPLACE INTO delivery (sink, key, body) VALUES (?1, ?2, ?3)",
                params![
                    sink,
                    key,
                    serde_json::to_string(d).map_err(|e| e.to_string())?
                ],
            ),
            Op::DelDelivery(sink, key) => tx.execute(
                "DELETE FROM delivery WHERE sink = ?1 AND key = ?2",
                params![sink, key],
            ),
        };
        r.map_err(|e| e.to_string())?;
    }
    tx.commit().map_err(|e| e.to_string())
}

pub(super) fn load(state: &mut State) -> rusqlite::Result<()> {
    let mut firing = BTreeMap::new();
    let mut deliveries = BTreeMap::new();
    {
        let mut q = state.db.prepare("SELECT key, body FROM firing")?;
        let rows = q.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?;
        for row in rows {
            let (key, body) = row?;
            match serde_json::from_str::<Firing>(&body) {
                Ok(f) => {
                    firing.insert(key, f);
                }
                Err(e) => {
                    tracing::error!(key = %key, error = %e, "alert spool: unreadable row skipped")
                }
            }
        }
        let mut q = state.db.prepare("SELECT sink, key, body FROM delivery")?;
        let rows = q.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
            ))
        })?;
        for row in rows {
            let (sink, key, body) = row?;
            match serde_json::from_str::<Delivery>(&body) {
                Ok(d) => {
                    deliveries.insert((sink, key), d);
                }
                Err(e) => {
                    tracing::error!(key = %key, error = %e, "alert spool: unreadable row skipped")
                }
            }
        }
    }
    for d in deliveries.values_mut() {
        // Rows of spools written before `sent` and `given_up`.
        if d.fired && d.sent.is_none() {
            d.sent = Some(d.alert.clone());
        }
        if d.sent.is_none() && !d.pending && d.last_sent.is_some() && d.action == Action::Fire {
            d.given_up = true;
        }
    }
    state.firing = firing;
    state.deliveries = deliveries;
    Ok(())
}
