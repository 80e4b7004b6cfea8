//! One attempt of one step: what `create`, `set`, `test`, `promote`,
//! `deliver` and `retire` do at the vaults, the target and the sinks, and
//! the state writes that record it. Retrying, recording and the one failure
//! path around every attempt are in `steps.rs`.

use super::catalog::{CredEntry, VaultHandle};
use super::engine::{Inner, chrono_dur};
use super::failpoint::crash_point;
use super::footprint::{Footprint, HeldAt};
use super::step::Step;
use super::steps::{RunMemory, StepError};
use crate::audit::Outcome;
use crate::generators;
use crate::model::{ErrorKind, PluginError, SecretValue, Stage};
use crate::sinks::Notice;
use crate::state::{CredentialRow, Restage, RotationRow, VersionRow, Write};
use crate::targets::Target;
use crate::vaults::{Promote, Select, Vault, VaultItem, VaultRefs, VersionRef};

impl Inner {
    /// One attempt of one step. Returns the state writes that record its effect.
    pub(super) async fn attempt_step(
        &self,
        entry: &CredEntry,
        rot: &mut RotationRow,
        run: &mut RunMemory,
    ) -> Result<Vec<Write>, StepError> {
        let key = entry.key();
        let item = VaultItem {
            key,
            path: &entry.vault_path(),
        };
        match rot.step {
            Step::Create => {
                let fresh = std::mem::take(&mut run.fresh);
                let generated = generators::generate(&entry.policy.generate).map_err(|e| {
                    StepError::new(
                        "generator",
                        PluginError::new(ErrorKind::Invalid, e.to_string()),
                    )
                })?;
                let primary = &entry.primary().vault;
                let vref = primary
                    .stage(item.pending(&rot.id, &generated.value).with_fresh(fresh))
                    .await
                    .map_err(|e| vault_error(primary.describe(), e))?;
                crash_point("rotation.create.after_primary_stage");
                // A fresh stage stored the value generated now. Otherwise read
                // back what the vault holds: after a replay it is the value
                // staged the first time, not the one generated now. The other
                // vaults get that value, so a replay that finds some of them
                // already staged cannot make them disagree.
                let stored = if fresh {
                    generated.value
                } else {
                    drop(generated);
                    read_from(primary.as_ref(), item, &vref).await?
                };
                let mut refs = VaultRefs(vec![(primary.describe().to_owned(), vref)]);
                for other in &entry.vaults[1..] {
                    let v = &other.vault;
                    let r = v
                        .stage(item.pending(&rot.id, &stored).with_fresh(fresh))
                        .await
                        .map_err(|e| vault_error(v.describe(), e))?;
                    refs.0.push((v.describe().to_owned(), r));
                }
                let public =
                    generators::public_part(generators::kind_of(&entry.policy.generate), &stored);
                let encoded = refs.encode();
                rot.vault_version = Some(encoded.clone());
                run.staged = Some(stored);
                Ok(vec![Write::Version(VersionRow {
                    key: key.clone(),
                    version: rot.version,
                    rotation: rot.id.clone(),
                    stage: Stage::Pending,
                    vault_version: encoded,
                    created_at: self.now(),
                    public,
                })])
            }
            Step::Set | Step::Test => {
                // Without a target these steps are skipped (`next_step`);
                // one reached anyway (a rotation resumed after the target
                // was removed from the config) has nothing to do.
                let Some(target) = &entry.target else {
                    return Ok(vec![]);
                };
                let value = self.staged_value(entry, rot, run).await?;
                let r = if rot.step == Step::Set {
                    target.set(key, rot.version, value).await
                } else {
                    target.test(key, rot.version, value).await
                };
                r.map_err(|e| target_error(target.as_ref(), e))?;
                Ok(vec![])
            }
            Step::Promote => {
                // Every vault already holds the value (create staged it in
                // all); promote each. Promote is idempotent, so after a
                // failure in one vault the retry re-promotes the others as
                // no-ops and the vaults converge on the same current version.
                let previous = rot
                    .previous_vault_version
                    .as_deref()
                    .map(|p| VaultRefs::decode(p, entry.primary().vault.describe()))
                    .unwrap_or_default();
                for (i, h) in entry.vaults.iter().enumerate() {
                    if i == 1 {
                        crash_point("rotation.promote.after_first_vault");
                    }
                    let vref = staged_in(entry, rot, h)?;
                    // Every version older than the previous one was retired
                    // before this rotation began (`rotate` runs the last
                    // rotation's retire step first).
                    let expected = previous.get(h.vault.describe());
                    let p = Promote {
                        version: &vref,
                        expected,
                    };
                    let promoted = if expected.is_some() || h.vault.promote_reads_current() {
                        h.vault.promote_from(item, p).await
                    } else {
                        // A first version in a vault whose promote reads
                        // nothing (the local vault: keyturn's own).
                        h.vault.promote(item, &vref).await.map(|()| None)
                    };
                    match (&promoted, expected) {
                        (Ok(before), Some(prev_ref)) => {
                            self.check_current_before_promote(
                                entry,
                                rot,
                                h.vault.describe(),
                                prev_ref,
                                &vref,
                                before.as_ref(),
                            )
                            .await?;
                        }
                        // A first version here (or a vault added since) over
                        // a current version keyturn did not write.
                        (Ok(Some(before)), None) if *before != vref => {
                            self.note_foreign_current(entry, rot, h.vault.describe(), before)
                                .await?;
                        }
                        _ => {}
                    }
                    if let Err(e) = promoted {
                        // Vaults are promoted in order, so when the first
                        // one refuses nothing is promoted anywhere yet: if
                        // the staged version is gone from it, the rotation
                        // is abandoned like in `set` and `test`. (Gone
                        // after a vault was promoted is another matter: the
                        // value is current there.)
                        let gone = i == 0
                            && match h.vault.read(item, Select::Version(&vref)).await {
                                Ok(found) => found.is_none(),
                                Err(e) => e.kind == ErrorKind::NotFound,
                            };
                        if !gone {
                            return Err(vault_error(h.vault.describe(), e));
                        }
                        return Err(StepError {
                            staged_gone: true,
                            ..vault_error(
                                h.vault.describe(),
                                PluginError::new(
                                    ErrorKind::NotFound,
                                    format!(
                                        "version {vref} of {} is gone from the vault (deleted out of band?), so it cannot be promoted ({})",
                                        item.path, e.message
                                    ),
                                ),
                            )
                        });
                    }
                }
                let mut writes = vec![Write::VersionStage {
                    key: key.clone(),
                    version: rot.version,
                    stage: Stage::Current,
                }];
                let mut keep = vec![rot.version];
                if let Some(prev) = rot.previous_version {
                    writes.push(Write::VersionStage {
                        key: key.clone(),
                        version: prev,
                        stage: Stage::Previous,
                    });
                    keep.push(prev);
                }
                // Anything older still marked current or previous was
                // retired in the vault by this promote.
                writes.push(Write::RetireOthers(Restage {
                    key: key.clone(),
                    except: keep,
                    from: vec![Stage::Current, Stage::Previous],
                    to: Stage::Retired,
                }));
                Ok(writes)
            }
            Step::Deliver => {
                let value = self.staged_value(entry, rot, run).await?;
                // Counted from now (the file's `rotated_at`), not from the
                // row's last update (a failed attempt's, when retried); the
                // row persisted is the one the step's record makes.
                let now = self.now();
                let row = delivered_row_at(entry, rot, now);
                let notice = notice_for(entry, rot, value, now, row.next_due);
                let mut writes = self.deliver_to_sinks(entry, &notice, value).await?;
                self.settle_vaults(entry, rot).await?;
                writes.push(Write::Credential(row));
                writes.push(Write::Holding {
                    key: key.clone(),
                    footprint: Footprint {
                        moved_from: self.moved_from(entry, rot).await,
                        ..Footprint::holding(entry)
                    }
                    .to_json(),
                });
                Ok(writes)
            }
            Step::Retire => self.retire_previous(entry, rot).await,
            Step::Done => Ok(vec![]),
        }
    }

    /// The retire step: the grace period of the previous version is over
    /// (or a newer rotation is starting), so it goes from every vault that
    /// holds it and stops working at the target.
    pub(super) async fn retire_previous(
        &self,
        entry: &CredEntry,
        rot: &RotationRow,
    ) -> Result<Vec<Write>, StepError> {
        let mut writes = vec![Write::PruneHistory(entry.key().clone())];
        // A first version retires nothing: its consumers not acked yet are
        // still awaited, not holdouts (no value they use stopped working).
        let Some(prev) = &rot.previous_vault_version else {
            return Ok(writes);
        };
        writes.extend(self.report_holdouts(entry, rot).await?);
        // Where the previous version was made, and where this rotation
        // made the current one: the config may have moved the credential
        // (another `path` or `vault`) in between.
        let made_here = self.place_of(entry, rot.footprint.as_deref());
        let prev_footprint = self.previous_footprint(entry, rot).await;
        let prev_place = match &prev_footprint {
            Some(f) => self.place_of(entry, Some(f)),
            None => made_here.clone(),
        };
        let primary = prev_place
            .vaults
            .first()
            .map_or_else(|| entry.primary().vault.describe(), |h| h.vault.describe());
        let refs = VaultRefs::decode(prev, primary);
        for h in &prev_place.vaults {
            // A vault added to the credential since the previous version
            // was made does not hold it.
            let Some(vref) = refs.get(h.vault.describe()) else {
                continue;
            };
            if made_here.holds(h.vault.describe(), &prev_place.path) {
                let item = VaultItem {
                    key: entry.key(),
                    path: &prev_place.path,
                };
                match h.vault.retire(item, vref).await {
                    Ok(()) => {}
                    // Black-box finding: a vault restored older than the
                    // state (a local vault's backup taken before the state
                    // database's) still serves the version to retire as its
                    // current one, having lost the newer: refused at every
                    // attempt, the credential never rotated again. What the
                    // vault serves is left alone, said once, and the
                    // rotation goes on (its promote makes a newer current).
                    Err(e)
                        if e.kind == ErrorKind::Invalid
                            && h.vault
                                .read(item, Select::Stage(Stage::Current))
                                .await
                                .ok()
                                .flatten()
                                .is_some_and(|v| &v.version == vref) =>
                    {
                        let why = format!(
                            "vault {} serves the version to retire ({vref}) as its current one: it lost the version after it (restored from an older backup?); not retiring what it serves",
                            h.vault.describe()
                        );
                        tracing::warn!(agent = %entry.key().agent, credential = %entry.key().credential, version = ?rot.previous_version, "{why}");
                        let head = self
                            .audit(self.audit_event(
                                entry,
                                Some(rot),
                                "vault.behind",
                                Outcome::Failed,
                                None,
                                Some(why),
                            ))
                            .await
                            .map_err(|e| StepError::new("audit", e))?;
                        writes.push(head);
                    }
                    Err(e) => return Err(vault_error(h.vault.describe(), e)),
                }
            } else {
                // The previous version is the last one held there: it is
                // that place's current one, so the place is emptied.
                self.empty_old_place(entry, h, &prev_place.path).await?;
            }
        }
        if let Some(previous) = rot.previous_version {
            // Where the previous value was set, and where this rotation set
            // the current one (the config may have changed the target in
            // between, or since: black-box finding, a reload that changed
            // it had the next rotation revoke the old target while the
            // current value, set there too, was still in use).
            let target_of = |f: &str| {
                Footprint::parse(f)
                    .ok()
                    .map(|f| f.target.unwrap_or_else(crate::targets::TargetConfig::none))
            };
            let prev_target = prev_footprint.as_deref().and_then(target_of);
            let cur_target = rot
                .footprint
                .as_deref()
                .and_then(target_of)
                .unwrap_or_else(|| entry.policy.target.clone());
            match prev_target {
                // The previous value was the last one set there: no value
                // is set there any more.
                Some(earlier) if !earlier.is_none() && !earlier.same_place(&cur_target) => {
                    writes.extend(
                        self.revoke_at_earlier_target(entry, rot, previous, &earlier, &cur_target)
                            .await?,
                    );
                }
                // The target stops accepting the previous value too
                // (alternating users: its role's password is cleared),
                // where it was set.
                prev_target => {
                    let target = match prev_target {
                        Some(t) if !t.same_place(&entry.policy.target) => t
                            .build()
                            .map_err(|e| StepError::new("the previous version's target", e))?,
                        _ => entry.target.clone(),
                    };
                    // Black-box finding: a rotation begun under
                    // `alternating_users`, parked, then set by the config
                    // now in force (`single_user` on the same role): its
                    // retire of the previous version on the role that
                    // previous version had cleared the password the
                    // current value lives on. A role that holds the
                    // current version is left alone.
                    let current_login =
                        entry.target.as_ref().and_then(|t| t.login_for(rot.version));
                    if let Some(target) = target {
                        let login = target.login_for(previous);
                        if login.is_some() && login == current_login {
                            tracing::info!(agent = %entry.key().agent, credential = %entry.key().credential, version = previous, login = ?login, "not retiring the previous version at the target: its login holds the current version now (the target's strategy changed)");
                        } else {
                            target
                                .retire(entry.key(), previous)
                                .await
                                .map_err(|e| target_error(target.as_ref(), e))?;
                        }
                    }
                }
            }
            writes.push(Write::VersionStage {
                key: entry.key().clone(),
                version: previous,
                stage: Stage::Retired,
            });
        }
        // What a sink kept of the previous version for readers mid-read (a
        // bundle's previous private key) leaves the disk with it.
        for sink in &entry.sinks {
            sink.retire_previous(entry.key())
                .await
                .map_err(|e| StepError::new(format!("sink {}", sink.describe()), e))?;
        }
        // Failed attempts of this step were shown on the credential's row;
        // that is over now.
        let row = self.cred_row(entry.key());
        if row.last_error.is_some() || row.consecutive_failures > 0 {
            writes.push(Write::Credential(CredentialRow {
                last_error: None,
                consecutive_failures: 0,
                failing_since: None,
                ..row
            }));
        }
        Ok(writes)
    }

    /// The previous version was set on a target the config has changed
    /// since (another postgres `role`, another hook): no later value is
    /// set there, so `previous` is ended there ([`Target::leave`]): a
    /// hook's `retire` of that version; a postgres role the config uses
    /// no longer is revoked as a decommission revokes it. A login of a
    /// name the config uses now (this credential's current target's, or
    /// another credential's) is left as it is: the current value may be
    /// on it (another `strategy` on the same role; the same server named
    /// another way). Without this the old role kept accepting the
    /// retired value until the agent was decommissioned. Audited as
    /// `target.revoked`, naming what was ended and what was left.
    async fn revoke_at_earlier_target(
        &self,
        entry: &CredEntry,
        rot: &RotationRow,
        previous: crate::model::VersionNo,
        earlier: &crate::targets::TargetConfig,
        current: &crate::targets::TargetConfig,
    ) -> Result<Option<Write>, StepError> {
        let key = entry.key();
        let Some(target) = earlier
            .build()
            .map_err(|e| StepError::new("the previous version's target", e))?
        else {
            return Ok(None);
        };
        let shown = target.describe();
        let mut keep = current.logins();
        for e in self.catalog().creds.values() {
            keep.extend(e.policy.target.logins());
        }
        let left = target.leave(key, previous, &keep).await.map_err(|e| {
            StepError::new(
                format!("target {shown} (the previous version's, before the config changed it)"),
                e,
            )
        })?;
        let mut detail = format!(
            "the config moved the credential off {shown}: version {previous}, the last value set there, is ended there"
        );
        if !left.ended.is_empty() {
            detail.push_str(&format!(" (logins revoked: {})", left.ended.join(", ")));
        }
        if !left.kept.is_empty() {
            let msg = format!(
                "; left as they are, since the config uses logins of these names now: {} (if the earlier target is another server, revoke them there by hand)",
                left.kept.join(", ")
            );
            detail.push_str(&msg);
        }
        tracing::info!(agent = %key.agent, credential = %key.credential, target = %shown, "{detail}");
        self.audit(self.audit_event(
            entry,
            Some(rot),
            "target.revoked",
            Outcome::Ok,
            Some(detail),
            None,
        ))
        .await
        .map(Some)
        .map_err(|e| StepError::new("audit", e))
    }

    /// The footprint of the rotation that made the version before `rot`'s
    /// (its JSON form), if state still has it.
    pub(super) async fn previous_footprint(
        &self,
        entry: &CredEntry,
        rot: &RotationRow,
    ) -> Option<String> {
        let previous = rot.previous_version?;
        let key = entry.key().clone();
        self.load(move |s| {
            let Some(made_by) = s
                .versions(&key)?
                .into_iter()
                .find(|v| v.version == previous)
                .map(|v| v.rotation)
            else {
                return Ok(None);
            };
            Ok(s.rotation(&made_by)?.and_then(|r| r.footprint))
        })
        .await
        .ok()
        .flatten()
    }

    /// The vaults and path the previous version of `rot` is held at that
    /// `rot` did not make its version in: the places a move left it, kept
    /// in the holding so that a decommission before its retire takes it.
    async fn moved_from(&self, entry: &CredEntry, rot: &RotationRow) -> Vec<HeldAt> {
        let Some(previous) = self.previous_footprint(entry, rot).await else {
            return Vec::new();
        };
        let prev_place = self.place_of(entry, Some(&previous));
        let made_here = self.place_of(entry, rot.footprint.as_deref());
        prev_place
            .vaults
            .iter()
            .filter(|h| !made_here.holds(h.vault.describe(), &prev_place.path))
            .map(|h| HeldAt {
                vault: h.config.name.clone(),
                path: prev_place.path.clone(),
            })
            .collect()
    }

    /// The place a footprint names (the config's place for the credential
    /// when there is none, or it cannot be read). A vault the config no
    /// longer has cannot be reached: it is left out, and said.
    pub(super) fn place_of(&self, entry: &CredEntry, footprint: Option<&str>) -> Place {
        let here = || Place {
            path: entry.vault_path().into_owned(),
            vaults: entry.vaults.iter().cloned().collect(),
        };
        let Some(footprint) = footprint.and_then(|f| Footprint::parse(f).ok()) else {
            return here();
        };
        let path = footprint
            .path
            .clone()
            .unwrap_or_else(|| format!("agents/{}/{}", entry.key().agent, entry.key().credential));
        let names: Vec<&str> = entry
            .vaults
            .iter()
            .map(|h| h.config.name.as_str())
            .collect();
        if path == entry.vault_path() && footprint.vaults == names {
            return here();
        }
        let catalog = self.catalog();
        let mut vaults = Vec::new();
        for name in &footprint.vaults {
            match catalog.vaults.get(name) {
                Some(h) => vaults.push(h.clone()),
                None => {
                    tracing::warn!(agent = %entry.key().agent, credential = %entry.key().credential, vault = %name, path = %path, "a version of this credential is held in vault {name:?}, which is no longer configured: it cannot be retired there")
                }
            }
        }
        Place { path, vaults }
    }

    /// After a move: the versions at the old path of vault `h` all go
    /// (`destroy`), as a decommission takes them, unless a credential of
    /// the config uses that path in that vault now (then they are that
    /// credential's, and nothing there is this one's to take).
    async fn empty_old_place(
        &self,
        entry: &CredEntry,
        h: &VaultHandle,
        path: &str,
    ) -> Result<(), StepError> {
        let name = h.config.name.as_str();
        let taken = self
            .catalog()
            .creds
            .values()
            .any(|e| e.vault_path() == path && e.vaults.iter().any(|v| v.config.name == name));
        if taken {
            tracing::warn!(agent = %entry.key().agent, credential = %entry.key().credential, vault = %name, path = %path, "the credential moved from this path, which another credential uses now: its old versions there are left to that credential");
            return Ok(());
        }
        let item = VaultItem {
            key: entry.key(),
            path,
        };
        h.vault
            .destroy(item)
            .await
            .map_err(|e| vault_error(h.vault.describe(), e))?;
        tracing::info!(agent = %entry.key().agent, credential = %entry.key().credential, vault = %name, path = %path, "moved by the config: its versions at the old path are destroyed");
        Ok(())
    }

    /// The value this rotation staged: what this run remembers, else read
    /// from the primary vault (and remembered).
    async fn staged_value<'r>(
        &self,
        entry: &CredEntry,
        rot: &RotationRow,
        run: &'r mut RunMemory,
    ) -> Result<&'r SecretValue, StepError> {
        let value = match run.staged.take() {
            Some(v) => v,
            None => self.read_staged(entry, rot).await?,
        };
        Ok(run.staged.insert(value))
    }

    /// The value this rotation staged, read from the primary vault.
    pub(super) async fn read_staged(
        &self,
        entry: &CredEntry,
        rot: &RotationRow,
    ) -> Result<SecretValue, StepError> {
        let item = VaultItem {
            key: entry.key(),
            path: &entry.vault_path(),
        };
        let primary = entry.primary();
        let vref = staged_in(entry, rot, primary)?;
        read_from(primary.vault.as_ref(), item, &vref).await
    }

    /// The end of the deliver step: waits until each vault has made durable
    /// what it owes others about the promoted version (its change index
    /// entry, written in the background since the promote). Local delivery
    /// went first; the step is recorded done only after this, so a replay
    /// after a crash settles again.
    pub(super) async fn settle_vaults(
        &self,
        entry: &CredEntry,
        rot: &RotationRow,
    ) -> Result<(), StepError> {
        let item = VaultItem {
            key: entry.key(),
            path: &entry.vault_path(),
        };
        for h in entry.vaults.iter() {
            let vref = staged_in(entry, rot, h)?;
            h.vault
                .settle(item, &vref)
                .await
                .map_err(|e| vault_error(h.vault.describe(), e))?;
        }
        Ok(())
    }

    /// Black-box finding: the first rotation of a credential whose vault
    /// path already held a secret (someone else's, or a keyturn's on another
    /// host) overwrote it without a word. It becomes the version before
    /// in the vault's history, destroyed in time like any other. Said
    /// loudly: a warning and an audit record, at no remote vault call (the
    /// promote reports it).
    async fn note_foreign_current(
        &self,
        entry: &CredEntry,
        rot: &RotationRow,
        vault: &str,
        before: &VersionRef,
    ) -> Result<(), StepError> {
        let msg = format!(
            "step promote: vault {vault:?}: {} held a current version keyturn did not write ({before}): version {} is current now, and that one is the version before it in the vault's history, which the next rotations and a decommission destroy like any other. If that secret belongs to someone else, give this credential another `path`",
            entry.vault_path(),
            rot.version,
        );
        self.say_current_gone(entry, rot, vault, msg).await
    }

    /// A current version in `vault` that keyturn did not expect, said
    /// loudly: a warning, the overwritten metric (`KeyturnVaultOverwritten`)
    /// and a `vault.current_gone` record, whose head is persisted with the
    /// step, like delivery records.
    async fn say_current_gone(
        &self,
        entry: &CredEntry,
        rot: &RotationRow,
        vault: &str,
        msg: String,
    ) -> Result<(), StepError> {
        tracing::warn!(agent = %entry.key().agent, credential = %entry.key().credential, vault = %vault, version = rot.version, rotation = %rot.id, "{msg}");
        self.metrics.vault_overwritten();
        self.audit(self.audit_event(
            entry,
            Some(rot),
            "vault.current_gone",
            Outcome::Failed,
            Some(vault.to_owned()),
            Some(msg),
        ))
        .await
        .map_err(|e| StepError::new("audit", e))?;
        Ok(())
    }

    /// At promote: was the version keyturn knows as current (`prev_ref`)
    /// still current in vault `vault` (`before`, what the vault found
    /// current as it promoted)? If someone deleted or overwrote it out of
    /// band, the promote went ahead (it makes the vault serve a working
    /// value again, which is better than leaving it broken until an operator
    /// acts), but that vault no longer holds the previous value agents may
    /// still use during the grace period. Nothing else would notice, so it
    /// is said loudly: a warning and an audit record. Costs no vault call:
    /// [`Vault::promote_from`] reports `before`.
    pub(super) async fn check_current_before_promote(
        &self,
        entry: &CredEntry,
        rot: &RotationRow,
        vault: &str,
        prev_ref: &VersionRef,
        new_ref: &VersionRef,
        before: Option<&VersionRef>,
    ) -> Result<(), StepError> {
        let Some(prev_version) = rot.previous_version else {
            return Ok(());
        };
        // The new ref: a replay after this vault was already promoted.
        if before == Some(prev_ref) || before == Some(new_ref) {
            return Ok(());
        }
        // Moved by the config: the previous version is held elsewhere (and
        // is retired there), not gone.
        if let Some(f) = self.previous_footprint(entry, rot).await {
            let made_here = self.place_of(entry, rot.footprint.as_deref());
            if !self.place_of(entry, Some(&f)).holds(vault, &made_here.path) {
                return Ok(());
            }
        }
        let now_there = match before {
            Some(r) => format!("its current version is {r}, which keyturn did not write"),
            None => "it has no current version".to_owned(),
        };
        let msg = format!(
            "step promote: vault {vault:?}: version {prev_version} ({prev_ref}) of {}, the current version before this rotation, is gone: {now_there} (deleted or overwritten out of band). Promoting version {} makes it current again, but this vault no longer holds the previous value",
            entry.vault_path(),
            rot.version,
        );
        self.say_current_gone(entry, rot, vault, msg).await
    }
}

/// What the sinks are told of the version `rot` made (`value`).
pub(super) fn notice_for(
    entry: &CredEntry,
    rot: &RotationRow,
    value: &SecretValue,
    rotated_at: chrono::DateTime<chrono::Utc>,
    next_due: Option<chrono::DateTime<chrono::Utc>>,
) -> Notice {
    let kind = generators::kind_of(&entry.policy.generate);
    Notice {
        key: entry.key().clone(),
        tenant: entry.agent.tenant.clone(),
        owner: entry.agent.owner.clone(),
        version: rot.version,
        rotation: rot.id.clone(),
        rotated_at,
        expires_hint: next_due.map(|d| d + chrono_dur(entry.policy.grace)),
        kind,
        public: generators::public_part(kind, value),
        login: entry.target.as_ref().and_then(|t| t.login_for(rot.version)),
        previous_version: rot.previous_version,
        // The latest the previous version works: acks may retire it sooner.
        grace_until: rot
            .previous_version
            .map(|_| rotated_at + chrono_dur(entry.policy.grace)),
        file: entry
            .sinks
            .iter()
            .find_map(|s| s.delivered_path())
            .map(Into::into),
    }
}

/// The credential row after `rot` is delivered (its row as the deliver
/// step's record left it: `updated_at` is when the delivery was done).
pub(super) fn delivered_row(entry: &CredEntry, rot: &RotationRow) -> CredentialRow {
    delivered_row_at(entry, rot, rot.updated_at)
}

/// The credential row after `rot` was delivered at `at`.
pub(super) fn delivered_row_at(
    entry: &CredEntry,
    rot: &RotationRow,
    at: chrono::DateTime<chrono::Utc>,
) -> CredentialRow {
    CredentialRow {
        key: entry.key().clone(),
        current_version: Some(rot.version),
        last_rotated_at: Some(at),
        next_due: entry.policy.schedule.next_due(
            at,
            entry.offset(),
            rot.previous_version.is_none(),
        ),
        consecutive_failures: 0,
        failing_since: None,
        last_error: None,
    }
}

/// The version `rot` staged in vault `h`.
pub(super) fn staged_in(
    entry: &CredEntry,
    rot: &RotationRow,
    h: &VaultHandle,
) -> Result<VersionRef, StepError> {
    let missing = |what: String| StepError::new("state", PluginError::new(ErrorKind::Fatal, what));
    let text = rot.vault_version.as_deref().ok_or_else(|| {
        missing(format!(
            "rotation {} reached {} without a staged version",
            rot.id, rot.step
        ))
    })?;
    VaultRefs::decode(text, entry.primary().vault.describe())
        .get(h.vault.describe())
        .cloned()
        .ok_or_else(|| {
            missing(format!(
                "rotation {} has no version in vault {:?} (the credential's vault list changed while it ran); trigger a new rotation",
                rot.id,
                h.vault.describe()
            ))
        })
}

/// Targets start their messages with their own description
/// (`command:/path`, `postgres:role`); say it once, not twice.
pub(super) fn target_error(target: &dyn Target, mut e: PluginError) -> StepError {
    let described = target.describe();
    if let Some(rest) = e.message.strip_prefix(&format!("{described}: ")) {
        e.message = rest.to_owned();
    }
    StepError::new(format!("target {described}"), e)
}

pub(super) fn vault_error(name: &str, e: PluginError) -> StepError {
    StepError::new(format!("vault {name:?}"), e)
}

/// Reads one version back; a version that is gone (none, or a not-found
/// error) is an error marked `staged_gone`.
pub(super) async fn read_from(
    vault: &dyn Vault,
    item: VaultItem<'_>,
    vref: &VersionRef,
) -> Result<SecretValue, StepError> {
    match vault.read(item, Select::Version(vref)).await {
        Ok(Some(v)) => Ok(v.value),
        Ok(None) => Err(StepError {
            staged_gone: true,
            ..vault_error(
                vault.describe(),
                PluginError::new(
                    ErrorKind::NotFound,
                    format!(
                        "version {vref} of {} is gone from the vault (deleted out of band?); the rotation cannot go on without the value it staged",
                        item.path
                    ),
                ),
            )
        }),
        Err(e) => Err(StepError {
            staged_gone: e.kind == ErrorKind::NotFound,
            ..vault_error(vault.describe(), e)
        }),
    }
}

/// Where a version is held: the path in its vaults, and the vaults.
#[derive(Clone)]
pub(super) struct Place {
    pub path: String,
    pub vaults: Vec<std::sync::Arc<VaultHandle>>,
}

impl Place {
    /// Whether vault `vault` at `path` is (part of) this place.
    fn holds(&self, vault: &str, path: &str) -> bool {
        self.path == path && self.vaults.iter().any(|h| h.vault.describe() == vault)
    }
}
