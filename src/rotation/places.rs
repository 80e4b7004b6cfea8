//! Place locks: a job (rotation, retirement, restore) holds every place it
//! writes — each vault path, each delivered file, a PostgreSQL role — for as
//! long as it runs.
//!
//! Within one config no two credentials share a vault path or a file
//! (validation refuses it), so the locks are never contended there. They
//! matter across a reload: a credential renamed while its rotation was in
//! flight left a departed entry finishing that rotation with its old config
//! while the renamed one's first rotation wrote the same vault path, role
//! and file at the same time (black-box finding: the role could end up with
//! the abandoned value, which no vault or file held). Now the second waits
//! for the first.
//!
//! An entry lives only while a job holds or waits for it, so the map stays
//! as small as the number of jobs in flight.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::{Mutex as AsyncMutex, OwnedMutexGuard};

use super::catalog::CredEntry;
use crate::targets::TargetConfig;

type Locks = Arc<Mutex<HashMap<String, Arc<AsyncMutex<()>>>>>;

#[derive(Default)]
pub(super) struct PlaceLocks {
    locks: Locks,
}

/// The places held by one job, released on drop.
pub(super) struct Held {
    locks: Locks,
    guards: Vec<(String, OwnedMutexGuard<()>)>,
}

/// Where `entry` writes: its vault paths, its delivered files and its
/// PostgreSQL role. Not a command hook's target: one hook commonly serves
/// many credentials (it is told which one), and they rotate independently.
pub(super) fn places(entry: &CredEntry) -> Vec<String> {
    let path = entry.vault_path();
    let mut places: Vec<String> = entry
        .vaults
        .iter()
        .map(|h| format!("vault {} {path}", h.config.name))
        .chain(
            entry
                .sinks
                .iter()
                .filter_map(|s| s.delivered_path())
                .map(|p| format!("file {}", p.display())),
        )
        .collect();
    if let TargetConfig::Postgres(pg) = &entry.policy.target {
        places.push(format!("postgres role {}", pg.role));
    }
    // One order for every job, so that two cannot each hold one place and
    // wait for the other's.
    places.sort();
    places.dedup();
    places
}

impl PlaceLocks {
    /// Waits until no other job holds any of `entry`'s places, and holds
    /// them.
    pub(super) async fn hold(&self, entry: &CredEntry) -> Held {
        let mut held = self.held();
        for place in places(entry) {
            let guard = self.lock_of(&place).lock_owned().await;
            held.guards.push((place, guard));
        }
        held
    }

    /// [`PlaceLocks::hold`] at once, or `None` if another job holds one of
    /// the places: for work that must go before anything started after it.
    pub(super) fn hold_now(&self, entry: &CredEntry) -> Option<Held> {
        let mut held = self.held();
        for place in places(entry) {
            // On failure `held` releases what it took so far.
            let guard = self.lock_of(&place).try_lock_owned().ok()?;
            held.guards.push((place, guard));
        }
        Some(held)
    }

    fn held(&self) -> Held {
        Held {
            locks: self.locks.clone(),
            guards: Vec::new(),
        }
    }

    /// The lock of `place`, made if no job holds or waits for it. Cloned
    /// under the map's lock, before it is waited for (see [`Held`]'s drop).
    fn lock_of(&self, place: &str) -> Arc<AsyncMutex<()>> {
        self.locks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(place.to_owned())
            .or_default()
            .clone()
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.locks.lock().unwrap().len()
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        let mut locks = self.locks.lock().unwrap_or_else(|p| p.into_inner());
        for (place, guard) in self.guards.drain(..) {
            drop(guard);
            // Nobody else holds or waits for it (a waiter clones the lock
            // under the map's lock, before it waits).
            if locks.get(&place).is_some_and(|l| Arc::strong_count(l) == 1) {
                locks.remove(&place);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn entry(dir: &std::path::Path, cred: &str, path: &str, role: Option<&str>) -> Arc<CredEntry> {
        let d = dir.display();
        let target = role.map_or(String::new(), |r| {
            format!(
                "target = {{ type = \"postgres\", role = \"{r}\", admin_dsn_file = \"{d}/dsn\" }}\n"
            )
        });
        let text = format!(
            "[daemon]\nstate_dir = \"{d}/state\"\nsocket = \"{d}/control.sock\"\ndelivery_roots = [\"{d}/agents\"]\n[vaults.local]\ntype = \"local\"\n{}[agents.bot.credentials.{cred}]\nvault = \"local\"\npath = \"{path}\"\nevery = \"1h\"\ngenerate = {{ kind = \"password\", length = 20 }}\n{target}deliver = [{{ type = \"file\", path = \"{d}/agents/bot/{cred}\" }}]\n",
            crate::test_support::agent_table("bot")
        );
        let config = crate::config::load_str(&dir.join("k.toml"), &text).expect("valid config");
        let catalog = super::super::Catalog::build(config, None).expect("catalog");
        catalog.creds.values().next().expect("one").clone()
    }

    #[test]
    fn a_credential_s_places_are_its_vault_path_file_and_role() {
        let dir = tempfile::tempdir().unwrap();
        let e = entry(dir.path(), "db", "shared/db", Some("app"));
        let d = dir.path().display();
        assert_eq!(
            places(&e),
            vec![
                format!("file {d}/agents/bot/db"),
                "postgres role app".to_owned(),
                "vault local shared/db".to_owned(),
            ]
        );
    }

    /// Two entries sharing a place run one after the other; entries that
    /// share none do not wait; the map empties when the jobs end.
    #[tokio::test(start_paused = true)]
    async fn jobs_sharing_a_place_take_turns_and_others_do_not_wait() {
        let dir = tempfile::tempdir().unwrap();
        let old = entry(dir.path(), "db", "shared/db", Some("app"));
        // Renamed: another file, the same vault path and role.
        let renamed = entry(dir.path(), "db2", "shared/db", Some("app"));
        let other = entry(dir.path(), "api", "shared/api", None);
        let locks = Arc::new(PlaceLocks::default());
        let order = Arc::new(Mutex::new(Vec::new()));
        let job = |e: Arc<CredEntry>, name: &'static str, delay: u64| {
            let (locks, order) = (locks.clone(), order.clone());
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(delay)).await;
                let _held = locks.hold(&e).await;
                order.lock().unwrap().push(format!("{name} start"));
                tokio::time::sleep(Duration::from_secs(10)).await;
                order.lock().unwrap().push(format!("{name} end"));
            })
        };
        let jobs = [
            job(old, "old", 0),
            job(renamed, "renamed", 100),
            job(other, "other", 200),
        ];
        for j in jobs {
            j.await.unwrap();
        }
        assert_eq!(
            *order.lock().unwrap(),
            vec![
                "old start",
                "other start",
                "old end",
                "renamed start",
                "other end",
                "renamed end"
            ]
        );
        assert_eq!(locks.len(), 0, "nothing held, nothing kept");
    }
}
