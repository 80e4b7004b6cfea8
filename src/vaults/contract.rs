//! The vault contract of [`super`], checked once for every vault.
//!
//! Each `pub(crate) async fn` below checks one clause against any [`Vault`];
//! [`vault_contract!`] turns them into one `#[tokio::test]` per clause for
//! one vault, so a failure names the vault and the clause
//! (`vaults::aws::tests::contract::retire_refuses_current_and_pending`). The
//! local and toy vaults run it always; the remote vaults run it against the
//! test servers (the `real-servers` feature).
//!
//! A clause gets `path`, a credential path that no other test uses (the test
//! servers are shared by every test running in parallel), and may also use
//! `<path>-other`. It destroys what it wrote once its assertions pass.
//! Values are canary strings, and no error message may contain one.
//!
//! Only what every vault keeps belongs here. A vault's own tests keep what is
//! its alone: how it lays versions out on its server, what a plain reader of
//! the vault sees, how many calls or writes a step costs, its error kinds
//! beyond the ones checked here, binary values (KV v2 and Key Vault store
//! text), authentication, paging and throttling. The few helpers those tests
//! share (an item, a stage, an error check) are at the end of this file.

use std::future::Future;
use std::panic::AssertUnwindSafe;

use futures::FutureExt;

use crate::model::{AgentId, CredentialId, CredentialKey, PluginError, RotationId, SecretValue};
use crate::model::{ErrorKind, Stage};

use super::{CurrentMark, Promote, Select, Vault, VaultItem, VersionRef};

/// Every value a clause writes starts with this, so one `contains` finds any
/// of them in an error message.
const CANARY: &str = "kt-canary-";
const ONE: &str = "kt-canary-one-4d1c";
const TWO: &str = "kt-canary-two-9e07";
const THREE: &str = "kt-canary-three-b3a2";
const FOUR: &str = "kt-canary-four-61f5";
/// What `<path>-other` holds, to see that a clause leaves it alone.
const OTHER: &str = "kt-canary-other-0c88";

/// One `#[tokio::test]` per clause of the contract, in a module `contract`.
///
/// `open = f`: `f().await` gives `(vault, path, guard)`: the vault under test
/// (any `Vault`), a credential path no other test uses, and whatever must
/// live as long as the test (a temporary directory; `()` when nothing).
/// Attributes written before `open` (the `real-servers` ignore) go on every
/// test.
///
/// `known_bugs = { clause: "part of its failure message", ... }` lists the
/// clauses the vault is known to break. Their tests pass only while the
/// clause fails with that message (see [`run`]): the bug stays on record, in
/// its own words, and the day it is fixed the test says so.
macro_rules! vault_contract {
    (
        $(#[$attr:meta])*
        open = $open:path
        $(, known_bugs = { $($bug:ident: $failing:literal),* $(,)? })?
        $(,)?
    ) => {
        mod contract {
            use super::*;

            const KNOWN_BUGS: &[(&str, &str)] = &[$($((stringify!($bug), $failing),)*)?];
            // A known bug names a clause that exists.
            $($(const _: () = { let _ = $crate::vaults::contract::$bug; };)*)?

            $crate::vaults::contract::vault_contract!(@clauses [$(#[$attr])*] $open;
                the_vault_passes_its_health_check,
                an_absent_credential_holds_nothing,
                stage_makes_a_pending_version,
                stage_is_idempotent_per_rotation,
                stage_replay_after_the_version_moved_on_returns_it,
                promote_makes_the_pending_version_current,
                promote_is_idempotent,
                promote_moves_current_to_previous_and_retires_the_old_previous,
                promote_of_the_previous_rolls_back,
                promote_of_an_unknown_version_is_not_found,
                retire_wipes_the_previous_and_is_idempotent,
                retire_refuses_current_and_pending,
                a_new_rotation_abandons_the_older_pending_version,
                a_new_rotation_abandons_even_the_first_pending_version,
                destroy_removes_every_version,
                values_come_back_byte_for_byte,
                current_mark_moves_with_the_current_version,
                a_fresh_stage_stores_its_value,
                promote_from_reports_what_was_current,
            );
        }
    };
    (@clauses $attrs:tt $open:path; $($clause:ident,)*) => {
        $($crate::vaults::contract::vault_contract!(@clause $attrs $open; $clause);)*
    };
    (@clause [$($attr:tt)*] $open:path; $clause:ident) => {
        $($attr)*
        #[tokio::test]
        async fn $clause() {
            let (vault, path, _guard) = $open().await;
            $crate::vaults::contract::run(
                stringify!($clause),
                KNOWN_BUGS,
                $crate::vaults::contract::$clause(&vault, &path),
            )
            .await;
        }
    };
}
pub(crate) use vault_contract;

/// Runs one clause. A clause listed in `known_bugs` must fail, with a panic
/// message containing the text recorded for it; one that passes is reported
/// as fixed, one that fails otherwise as a new failure.
pub(crate) async fn run(
    clause: &str,
    known_bugs: &[(&str, &str)],
    check: impl Future<Output = ()>,
) {
    let Some((_, failing)) = known_bugs.iter().find(|(c, _)| *c == clause) else {
        return check.await;
    };
    let Err(panic) = AssertUnwindSafe(check).catch_unwind().await else {
        panic!("{clause} passes now: the known bug is fixed, take it off known_bugs");
    };
    let message = panic
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| panic.downcast_ref::<&str>().copied())
        .unwrap_or("(a panic without a message)");
    assert!(
        message.contains(failing),
        "{clause} is a known bug failing with {failing:?}, but it failed otherwise: {message}"
    );
}

// ---------------------------------------------------------------------------
// Clauses
// ---------------------------------------------------------------------------

/// `check` answers `Ok` for a reachable vault with working credentials.
pub(crate) async fn the_vault_passes_its_health_check(vault: &dyn Vault, _path: &str) {
    if let Err(e) = vault.check().await {
        panic!("{}: check of a healthy vault: {e}", vault.describe());
    }
}

/// Nothing is readable of a credential never staged, by stage or by a
/// version of another credential; retiring that version and destroying the
/// credential are no-ops.
pub(crate) async fn an_absent_credential_holds_nothing(vault: &dyn Vault, path: &str) {
    let c = Cred::new(vault, path);
    let foreign = foreign_version(vault, path).await;
    c.expect(Stages::NONE, "a credential never staged").await;
    c.expect_gone(&foreign, "another credential's version")
        .await;
    c.retire(&foreign).await;
    c.destroy().await;
    c.destroy().await;
    c.expect(Stages::NONE, "after retire and destroy of nothing")
        .await;
}

/// `stage` stores the value as the pending version, readable by stage and
/// by the version it returned, carrying its rotation; nothing is current
/// until it is promoted.
pub(crate) async fn stage_makes_a_pending_version(vault: &dyn Vault, path: &str) {
    let c = Cred::new(vault, path);
    let one = c.stage(ONE).await;
    c.expect(Stages::NONE.pending(&one), "after the first stage")
        .await;
    c.expect_at(&one, Stage::Pending, "the staged version")
        .await;
    c.destroy().await;
}

/// A second `stage` of one rotation returns the first version and stores
/// nothing: the value staged first stays and no second version appears,
/// for the first version, once it is current, and for a later one.
pub(crate) async fn stage_is_idempotent_per_rotation(vault: &dyn Vault, path: &str) {
    let c = Cred::new(vault, path);
    let one = c.stage(ONE).await;
    c.expect_replay(&one, TWO, "of a pending version").await;
    c.expect(
        Stages::NONE.pending(&one),
        "after a stage replay (the first value stays)",
    )
    .await;
    c.promote(&one.version).await;
    c.expect_replay(&one, THREE, "of the current version").await;
    c.expect(
        Stages::NONE.current(&one),
        "after a stage replay of the promoted rotation (nothing staged again)",
    )
    .await;
    let two = c.stage(TWO).await;
    c.expect_replay(&two, FOUR, "of a pending version next to a current one")
        .await;
    c.expect(
        Stages::NONE.pending(&two).current(&one),
        "after a stage replay of the second rotation (the first value stays)",
    )
    .await;
    c.destroy().await;
}

/// The idempotency of `stage` holds however far the version moved on:
/// previous, then retired by a later promote.
pub(crate) async fn stage_replay_after_the_version_moved_on_returns_it(
    vault: &dyn Vault,
    path: &str,
) {
    let c = Cred::new(vault, path);
    let one = c.stage_and_promote(ONE).await;
    let two = c.stage_and_promote(TWO).await;
    c.expect_replay(&one, FOUR, "of the previous version").await;
    c.expect(
        Stages::NONE.current(&two).previous(&one),
        "after a stage replay of the previous rotation",
    )
    .await;
    let three = c.stage_and_promote(THREE).await;
    c.expect_replay(&one, FOUR, "of a retired version").await;
    c.expect(
        Stages::NONE.current(&three).previous(&two),
        "after a stage replay of a retired rotation (nothing staged again)",
    )
    .await;
    c.expect_gone(&one.version, "the retired version after its stage replay")
        .await;
    c.destroy().await;
}

/// `promote` makes the pending version current, with the same value, ref
/// and rotation; nothing is pending or previous after the first promote.
pub(crate) async fn promote_makes_the_pending_version_current(vault: &dyn Vault, path: &str) {
    let c = Cred::new(vault, path);
    let one = c.stage_and_promote(ONE).await;
    c.expect(Stages::NONE.current(&one), "after the first promote")
        .await;
    c.expect_at(&one, Stage::Current, "the promoted version")
        .await;
    c.destroy().await;
}

/// Promoting the current version again changes nothing: it does not shift
/// the current version to previous nor retire the previous one.
pub(crate) async fn promote_is_idempotent(vault: &dyn Vault, path: &str) {
    let c = Cred::new(vault, path);
    let one = c.stage_and_promote(ONE).await;
    c.promote(&one.version).await;
    c.expect(
        Stages::NONE.current(&one),
        "after promoting the current version again",
    )
    .await;
    let two = c.stage_and_promote(TWO).await;
    c.promote(&two.version).await;
    c.promote(&two.version).await;
    c.expect(
        Stages::NONE.current(&two).previous(&one),
        "after promoting the second version three times",
    )
    .await;
    c.destroy().await;
}

/// Each rotation gets a version ref of its own. While a new version is
/// pending the current one stays current; promoting it makes the old current
/// previous (still readable), and the next promote retires that previous
/// (its value gone, by stage and by version).
pub(crate) async fn promote_moves_current_to_previous_and_retires_the_old_previous(
    vault: &dyn Vault,
    path: &str,
) {
    let c = Cred::new(vault, path);
    let one = c.stage_and_promote(ONE).await;
    let two = c.stage(TWO).await;
    c.expect(
        Stages::NONE.pending(&two).current(&one),
        "while the second version is pending",
    )
    .await;
    c.promote(&two.version).await;
    c.expect(
        Stages::NONE.current(&two).previous(&one),
        "after the second promote",
    )
    .await;
    c.expect_at(&one, Stage::Previous, "the old current").await;
    let three = c.stage(THREE).await;
    c.expect(
        Stages::NONE.pending(&three).current(&two).previous(&one),
        "while the third version is pending",
    )
    .await;
    let refs = [&one.version, &two.version, &three.version];
    assert!(
        refs[0] != refs[1] && refs[1] != refs[2] && refs[0] != refs[2],
        "{}: three rotations got the version refs {refs:?}: each needs its own",
        c.name()
    );
    c.promote(&three.version).await;
    c.expect(
        Stages::NONE.current(&three).previous(&two),
        "after the third promote",
    )
    .await;
    c.expect_gone(
        &one.version,
        "the old previous, retired by the third promote",
    )
    .await;
    c.destroy().await;
}

/// Promoting the previous version (a rollback) makes it current again and
/// the current one previous; nothing is retired.
pub(crate) async fn promote_of_the_previous_rolls_back(vault: &dyn Vault, path: &str) {
    let c = Cred::new(vault, path);
    let one = c.stage_and_promote(ONE).await;
    let two = c.stage_and_promote(TWO).await;
    c.promote(&one.version).await;
    let rolled_back = Stages::NONE.current(&one).previous(&two);
    c.expect(rolled_back.clone(), "after promoting the previous version")
        .await;
    c.promote(&one.version).await;
    c.expect(rolled_back, "after promoting the rolled-back version again")
        .await;
    c.destroy().await;
}

/// Promoting a version the credential never had is `NotFound`, whether the
/// credential is absent or has versions, and changes nothing.
pub(crate) async fn promote_of_an_unknown_version_is_not_found(vault: &dyn Vault, path: &str) {
    let c = Cred::new(vault, path);
    let foreign = foreign_version(vault, path).await;
    let e = c.promote_err(&foreign).await;
    c.expect_refusal(&e, ErrorKind::NotFound, "promote of an absent credential");
    c.expect(
        Stages::NONE,
        "after a refused promote of an absent credential",
    )
    .await;
    let one = c.stage_and_promote(ONE).await;
    let e = c.promote_err(&foreign).await;
    c.expect_refusal(&e, ErrorKind::NotFound, "promote of an unknown version");
    c.expect(
        Stages::NONE.current(&one),
        "after a refused promote of an unknown version",
    )
    .await;
    c.destroy().await;
}

/// `retire` of the previous version drops its value; retiring it again, or
/// retiring a version the credential never had, is a no-op.
pub(crate) async fn retire_wipes_the_previous_and_is_idempotent(vault: &dyn Vault, path: &str) {
    let c = Cred::new(vault, path);
    let foreign = foreign_version(vault, path).await;
    let one = c.stage_and_promote(ONE).await;
    let two = c.stage_and_promote(TWO).await;
    c.retire(&one.version).await;
    c.expect(
        Stages::NONE.current(&two),
        "after retiring the previous version",
    )
    .await;
    c.expect_gone(&one.version, "the retired version").await;
    c.retire(&one.version).await;
    c.expect(Stages::NONE.current(&two), "after retiring it again")
        .await;
    c.retire(&foreign).await;
    c.expect(
        Stages::NONE.current(&two),
        "after retiring a version it never had",
    )
    .await;
    c.destroy().await;
}

/// `retire` of the current or the pending version is `Invalid` and changes
/// nothing (the engine retires only the previous version).
pub(crate) async fn retire_refuses_current_and_pending(vault: &dyn Vault, path: &str) {
    let c = Cred::new(vault, path);
    let one = c.stage(ONE).await;
    c.expect_retire_refused(&one, "retire of the first, pending version")
        .await;
    c.expect(
        Stages::NONE.pending(&one),
        "after a refused retire of the pending version",
    )
    .await;
    c.promote(&one.version).await;
    c.expect_retire_refused(&one, "retire of the current version")
        .await;
    let two = c.stage(TWO).await;
    c.expect_retire_refused(&two, "retire of a pending version")
        .await;
    c.expect(
        Stages::NONE.pending(&two).current(&one),
        "after refused retires of the current and the pending version",
    )
    .await;
    c.destroy().await;
}

/// A credential has one pending version: staging a new rotation while an
/// older one is pending (its rotation crashed and was abandoned) retires the
/// older one. It is no longer readable, promoting it fails and changes
/// nothing, retiring it is a no-op, and the new one promotes as usual. (The
/// kind of the failed promote is the vault's own: see its tests.)
pub(crate) async fn a_new_rotation_abandons_the_older_pending_version(
    vault: &dyn Vault,
    path: &str,
) {
    let c = Cred::new(vault, path);
    let one = c.stage_and_promote(ONE).await;
    let two = c.stage(TWO).await;
    let three = c.stage(THREE).await;
    c.expect_abandoned(&two, Stages::NONE.pending(&three).current(&one))
        .await;
    c.promote(&three.version).await;
    c.expect(
        Stages::NONE.current(&three).previous(&one),
        "after promoting the version staged over an abandoned one",
    )
    .await;
    c.destroy().await;
}

/// The same when the abandoned version is the credential's first, with no
/// current version yet: the abandoned value must not become current either.
pub(crate) async fn a_new_rotation_abandons_even_the_first_pending_version(
    vault: &dyn Vault,
    path: &str,
) {
    let c = Cred::new(vault, path);
    let one = c.stage(ONE).await;
    let two = c.stage(TWO).await;
    c.expect_abandoned(&one, Stages::NONE.pending(&two)).await;
    c.promote(&two.version).await;
    c.expect(
        Stages::NONE.current(&two),
        "after promoting the version staged over the abandoned first one",
    )
    .await;
    c.destroy().await;
}

/// `destroy` removes every version (pending, current, previous) of its
/// credential and no other's; it is idempotent, an old version cannot be
/// promoted afterwards, and a new stage never hands out a version ref used
/// before the destroy (state may still hold the old ones).
pub(crate) async fn destroy_removes_every_version(vault: &dyn Vault, path: &str) {
    let c = Cred::new(vault, path);
    let other = Cred::new(vault, &format!("{path}-other"));
    let kept = other.stage(OTHER).await;
    let one = c.stage_and_promote(ONE).await;
    let two = c.stage_and_promote(TWO).await;
    let three = c.stage(THREE).await;
    c.destroy().await;
    c.expect(Stages::NONE, "after destroy").await;
    let old = [&one.version, &two.version, &three.version];
    for v in old {
        c.expect_gone(v, "a version, after destroy").await;
    }
    c.destroy().await;
    let e = c.promote_err(&three.version).await;
    c.expect_refusal(&e, ErrorKind::NotFound, "promote of a destroyed version");
    other
        .expect(
            Stages::NONE.pending(&kept),
            "another credential, after destroy of its neighbour",
        )
        .await;

    let four = c.stage(FOUR).await;
    assert!(
        !old.contains(&&four.version),
        "{}: the stage after destroy handed out {}, a version ref used before the destroy",
        c.name(),
        four.version
    );
    c.expect(
        Stages::NONE.pending(&four),
        "after a stage following destroy",
    )
    .await;
    c.destroy().await;
    other.destroy().await;
}

/// `current_mark` is `None` while nothing is current (absent, only
/// pending, destroyed), stays while the current version stays (a new
/// pending version does not move it), and moves with every promote,
/// rollback included; another credential's promote leaves it.
pub(crate) async fn current_mark_moves_with_the_current_version(vault: &dyn Vault, path: &str) {
    let c = Cred::new(vault, path);
    let other = Cred::new(vault, &format!("{path}-other"));
    c.expect_mark(None, "mark of an absent credential").await;
    let one = c.stage(ONE).await;
    c.expect_mark(None, "mark with only a pending version")
        .await;
    c.promote(&one.version).await;
    let m1 = c.some_mark("after promote").await;
    c.expect_mark(Some(&m1), "the mark moved with nothing changed")
        .await;
    let two = c.stage(TWO).await;
    c.expect_mark(Some(&m1), "a pending version moved the mark")
        .await;
    other.stage_and_promote(OTHER).await;
    c.expect_mark(Some(&m1), "another credential's promote moved the mark")
        .await;
    c.promote(&two.version).await;
    let m2 = c.some_mark("after the second promote").await;
    assert_ne!(m1, m2, "{}: the mark did not move with a promote", c.name());
    c.promote(&one.version).await;
    let m3 = c.some_mark("after a rollback").await;
    assert_ne!(
        m2,
        m3,
        "{}: the mark did not move with a rollback",
        c.name()
    );
    c.destroy().await;
    c.expect_mark(None, "mark after destroy").await;
    other.destroy().await;
}

/// What is staged comes back exactly: quotes, backslashes, JSON and shell
/// characters, non-ASCII text, surrounding white space and line breaks, a
/// few KiB long.
pub(crate) async fn values_come_back_byte_for_byte(vault: &dyn Vault, path: &str) {
    let c = Cred::new(vault, path);
    let mut odd = format!(
        " {CANARY}odd \"double\" 'single' \\back\\slash {{\"json\": [1, null]}} <a href='x'>&amp;</a> \
         %s %n $HOME `id` ünïcødé ключ 鍵 🔑\r\n\ttab\n"
    );
    while odd.len() < 4096 {
        odd.push_str("0123456789abcdef/+=");
    }
    odd.push('\n');
    let staged = c.stage(&odd).await;
    c.expect_at(&staged, Stage::Pending, "the odd value").await;
    c.promote(&staged.version).await;
    c.expect(Stages::NONE.current(&staged), "the odd value, promoted")
        .await;
    c.destroy().await;
}

/// A `stage` marked fresh (the rotation's first) stores its value as the
/// pending version, whatever the credential holds: nothing, a current
/// version, or the pending leftover of an abandoned rotation (which it
/// abandons, as any stage does).
pub(crate) async fn a_fresh_stage_stores_its_value(vault: &dyn Vault, path: &str) {
    let c = Cred::new(vault, path);
    let one = c.stage_fresh(ONE).await;
    c.expect(Stages::NONE.pending(&one), "after a fresh first stage")
        .await;
    c.promote(&one.version).await;
    let two = c.stage_fresh(TWO).await;
    c.expect(
        Stages::NONE.pending(&two).current(&one),
        "after a fresh stage next to a current version",
    )
    .await;
    let three = c.stage_fresh(THREE).await;
    c.expect_abandoned(&two, Stages::NONE.pending(&three).current(&one))
        .await;
    c.expect_at(
        &three,
        Stage::Pending,
        "the fresh stage over an abandoned one",
    )
    .await;
    c.destroy().await;
}

/// `promote_from` promotes like `promote` and returns what was current
/// before: nothing at first, the old current, the version itself on a
/// replay. An `expected` that is not what is current (an out-of-band change)
/// changes nothing of what the promote does: the old previous is retired.
pub(crate) async fn promote_from_reports_what_was_current(vault: &dyn Vault, path: &str) {
    let c = Cred::new(vault, path);
    let one = c.stage(ONE).await;
    c.expect_promote_from(&one, None, None, "first promote")
        .await;
    c.expect_promote_from(
        &one,
        None,
        Some(&one),
        "a replayed promote reports the version itself",
    )
    .await;
    let two = c.stage(TWO).await;
    c.expect_promote_from(&two, Some(&one), Some(&one), "second promote")
        .await;
    c.expect(
        Stages::NONE.current(&two).previous(&one),
        "after the second promote_from",
    )
    .await;
    // The engine retires the previous before its next rotation begins.
    c.retire(&one.version).await;
    let three = c.stage(THREE).await;
    c.expect_promote_from(&three, Some(&two), Some(&two), "third promote")
        .await;
    c.expect(
        Stages::NONE.current(&three).previous(&two),
        "after the third promote_from",
    )
    .await;
    c.expect_gone(&one.version, "the version retired before the third promote")
        .await;
    // State expects a version that is not current: the old previous (two)
    // is retired by the promote all the same.
    let four = c.stage(FOUR).await;
    c.expect_promote_from(&four, Some(&one), Some(&three), "fourth promote")
        .await;
    c.expect(
        Stages::NONE.current(&four).previous(&three),
        "after a promote_from expecting a version that was not current",
    )
    .await;
    c.expect_gone(
        &two.version,
        "the old previous, retired by the fourth promote",
    )
    .await;
    c.destroy().await;
}

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/// A version ref the credential at `path` never had: the last of four
/// versions staged for `<path>-other` (destroyed again). Four, so that a
/// vault numbering versions per credential hands out a number beyond any a
/// clause reaches at `path` before using it.
async fn foreign_version(vault: &dyn Vault, path: &str) -> VersionRef {
    let other = Cred::new(vault, &format!("{path}-other"));
    let mut last = None;
    for _ in 0..4 {
        last = Some(other.stage(OTHER).await.version);
    }
    other.destroy().await;
    last.expect("four stages")
}

/// A version a clause staged: what reading it must give back.
#[derive(Debug, Clone)]
struct Staged {
    version: VersionRef,
    rotation: RotationId,
    value: String,
}

impl Staged {
    fn at(&self, stage: Stage) -> Seen {
        Seen {
            version: self.version.clone(),
            stage,
            rotation: Some(self.rotation.clone()),
            value: self.value.clone(),
        }
    }
}

/// A version as read back, comparable in one assertion.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Seen {
    version: VersionRef,
    stage: Stage,
    rotation: Option<RotationId>,
    value: String,
}

/// What a credential holds at every stage.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Stages {
    pending: Option<Seen>,
    current: Option<Seen>,
    previous: Option<Seen>,
    /// Always `None`: retired versions keep no value.
    retired: Option<Seen>,
}

impl Stages {
    const NONE: Stages = Stages {
        pending: None,
        current: None,
        previous: None,
        retired: None,
    };

    fn pending(self, v: &Staged) -> Self {
        let pending = Some(v.at(Stage::Pending));
        Stages { pending, ..self }
    }

    fn current(self, v: &Staged) -> Self {
        let current = Some(v.at(Stage::Current));
        Stages { current, ..self }
    }

    fn previous(self, v: &Staged) -> Self {
        let previous = Some(v.at(Stage::Previous));
        Stages { previous, ..self }
    }
}

/// One credential of the vault under test; every call panics with the vault,
/// the step and the path when it fails.
struct Cred<'a> {
    vault: &'a dyn Vault,
    key: CredentialKey,
    path: String,
}

impl<'a> Cred<'a> {
    fn new(vault: &'a dyn Vault, path: &str) -> Self {
        let key = CredentialKey::new(
            AgentId::new("contract").unwrap(),
            CredentialId::new("db").unwrap(),
        );
        Cred {
            vault,
            key,
            path: path.to_owned(),
        }
    }

    fn item(&self) -> VaultItem<'_> {
        VaultItem {
            key: &self.key,
            path: &self.path,
        }
    }

    fn name(&self) -> String {
        format!("vault {} at {}", self.vault.describe(), self.path)
    }

    async fn stage_for(&self, rotation: &RotationId, value: &str) -> VersionRef {
        let value = SecretValue::from_string(value.to_owned());
        self.vault
            .stage(self.item().pending(rotation, &value))
            .await
            .unwrap_or_else(|e| panic!("{}: stage: {e}", self.name()))
    }

    /// Stages `value` for a new rotation.
    async fn stage(&self, value: &str) -> Staged {
        let rotation = RotationId::generate();
        Staged {
            version: self.stage_for(&rotation, value).await,
            rotation,
            value: value.to_owned(),
        }
    }

    async fn stage_and_promote(&self, value: &str) -> Staged {
        let staged = self.stage(value).await;
        self.promote(&staged.version).await;
        staged
    }

    /// Stages `value` for a new rotation, marked fresh.
    async fn stage_fresh(&self, value: &str) -> Staged {
        let rotation = RotationId::generate();
        let secret = SecretValue::from_string(value.to_owned());
        let version = self
            .vault
            .stage(self.item().pending(&rotation, &secret).with_fresh(true))
            .await
            .unwrap_or_else(|e| panic!("{}: fresh stage: {e}", self.name()));
        Staged {
            version,
            rotation,
            value: value.to_owned(),
        }
    }

    /// Asserts that `promote_from` of `v`, state expecting `expected` to be
    /// current, reports `was` as what was current before it.
    async fn expect_promote_from(
        &self,
        v: &Staged,
        expected: Option<&Staged>,
        was: Option<&Staged>,
        what: &str,
    ) {
        let version = &v.version;
        let got = self
            .vault
            .promote_from(
                self.item(),
                Promote {
                    version,
                    expected: expected.map(|e| &e.version),
                },
            )
            .await
            .unwrap_or_else(|e| panic!("{}: promote_from {version}: {e}", self.name()));
        assert_eq!(
            got.as_ref(),
            was.map(|w| &w.version),
            "{}: {what}",
            self.name()
        );
    }

    async fn promote(&self, version: &VersionRef) {
        if let Err(e) = self.vault.promote(self.item(), version).await {
            panic!("{}: promote {version}: {e}", self.name());
        }
    }

    async fn retire(&self, version: &VersionRef) {
        if let Err(e) = self.vault.retire(self.item(), version).await {
            panic!("{}: retire {version}: {e}", self.name());
        }
    }

    async fn destroy(&self) {
        if let Err(e) = self.vault.destroy(self.item()).await {
            panic!("{}: destroy: {e}", self.name());
        }
    }

    async fn promote_err(&self, version: &VersionRef) -> PluginError {
        match self.vault.promote(self.item(), version).await {
            Ok(()) => panic!("{}: promote {version} succeeded; it must fail", self.name()),
            Err(e) => e,
        }
    }

    /// Asserts that retiring `v` is refused as `Invalid` (see [`Self::expect_refusal`]).
    async fn expect_retire_refused(&self, v: &Staged, what: &str) {
        let version = &v.version;
        let e = match self.vault.retire(self.item(), version).await {
            Ok(()) => panic!("{}: retire {version} succeeded; it must fail", self.name()),
            Err(e) => e,
        };
        self.expect_refusal(&e, ErrorKind::Invalid, what);
    }

    async fn mark(&self) -> Option<CurrentMark> {
        self.vault
            .current_mark(self.item())
            .await
            .unwrap_or_else(|e| panic!("{}: current_mark: {e}", self.name()))
    }

    /// The current mark, which must be there `when`.
    async fn some_mark(&self, when: &str) -> CurrentMark {
        self.mark()
            .await
            .unwrap_or_else(|| panic!("{}: no mark {when}", self.name()))
    }

    /// Asserts that the current mark is `want`.
    async fn expect_mark(&self, want: Option<&CurrentMark>, what: &str) {
        assert_eq!(self.mark().await.as_ref(), want, "{}: {what}", self.name());
    }

    async fn read(&self, select: Select<'_>) -> Option<Seen> {
        let stored = self
            .vault
            .read(self.item(), select)
            .await
            .unwrap_or_else(|e| panic!("{}: read {select:?}: {e}", self.name()))?;
        let value = String::from_utf8(stored.value.expose().to_vec()).unwrap_or_else(|_| {
            panic!(
                "{}: read {select:?}: the value is not the UTF-8 text staged",
                self.name()
            )
        });
        Some(Seen {
            version: stored.version,
            stage: stored.stage,
            rotation: stored.rotation,
            value,
        })
    }

    /// Asserts what every stage reads as, `when`.
    async fn expect(&self, want: Stages, when: &str) {
        let got = Stages {
            pending: self.read(Select::Stage(Stage::Pending)).await,
            current: self.read(Select::Stage(Stage::Current)).await,
            previous: self.read(Select::Stage(Stage::Previous)).await,
            retired: self.read(Select::Stage(Stage::Retired)).await,
        };
        assert_eq!(got, want, "{}: {when}", self.name());
    }

    /// Asserts that reading `v` by its version gives it, at `stage`.
    async fn expect_at(&self, v: &Staged, stage: Stage, what: &str) {
        let got = self.read(Select::Version(&v.version)).await;
        let want = Some(v.at(stage));
        assert_eq!(got, want, "{}: {what}, read by version", self.name());
    }

    /// Asserts that reading `version` gives nothing.
    async fn expect_gone(&self, version: &VersionRef, what: &str) {
        let got = self.read(Select::Version(version)).await;
        assert_eq!(
            got,
            None,
            "{}: {what}, read by version {version}",
            self.name()
        );
    }

    /// Asserts that staging `v`'s rotation again, with another value, returns
    /// `v`'s version (the caller checks that nothing was stored).
    async fn expect_replay(&self, v: &Staged, other_value: &str, what: &str) {
        let got = self.stage_for(&v.rotation, other_value).await;
        assert_eq!(
            got,
            v.version,
            "{}: a stage replay {what} must return the version of the first stage",
            self.name()
        );
    }

    /// Asserts that `abandoned` is gone, the credential holding `want`, and
    /// that promoting and retiring `abandoned` change nothing.
    async fn expect_abandoned(&self, abandoned: &Staged, want: Stages) {
        let v = &abandoned.version;
        self.expect(
            want.clone(),
            "after staging over an abandoned pending version",
        )
        .await;
        self.expect_gone(v, "the abandoned version").await;
        let e = self.promote_err(v).await;
        self.expect_no_canary(&e, "promote of the abandoned version");
        self.retire(v).await;
        self.expect(
            want,
            "after a refused promote and a retire of the abandoned version",
        )
        .await;
    }

    /// A refusal has the kind the engine branches on and names the vault,
    /// never a value.
    fn expect_refusal(&self, e: &PluginError, kind: ErrorKind, what: &str) {
        assert_eq!(e.kind, kind, "{}: {what}: {e}", self.name());
        assert!(
            e.message.contains(self.vault.describe()),
            "{}: {what}: the message does not name the vault: {e}",
            self.name()
        );
        self.expect_no_canary(e, what);
    }

    fn expect_no_canary(&self, e: &PluginError, what: &str) {
        assert!(
            !e.message.contains(CANARY),
            "{}: {what}: the message quotes a value: {e}",
            self.name()
        );
    }
}

// ---------------------------------------------------------------------------
// What the vaults' own tests share
// ---------------------------------------------------------------------------

/// `path` as an item of the credential the vaults' own tests write (`bot`'s
/// `db`; the vaults keep versions by path, the key only shows in logs).
pub(crate) fn item(path: &str) -> VaultItem<'_> {
    static KEY: std::sync::LazyLock<CredentialKey> =
        std::sync::LazyLock::new(|| crate::test_support::key("bot", "db"));
    VaultItem { key: &KEY, path }
}

/// Stages `value` at `path` for a new rotation.
pub(crate) async fn stage_new(
    vault: &dyn Vault,
    path: &str,
    value: &str,
) -> Result<VersionRef, PluginError> {
    let value = SecretValue::from_string(value.to_owned());
    vault
        .stage(item(path).pending(&RotationId::generate(), &value))
        .await
}

/// Stages `value` at `path` for a new rotation and promotes it; panics if
/// either fails.
pub(crate) async fn stage_and_promote(vault: &dyn Vault, path: &str, value: &str) -> VersionRef {
    let version = stage_new(vault, path, value)
        .await
        .unwrap_or_else(|e| panic!("stage at {path}: {e}"));
    if let Err(e) = vault.promote(item(path), &version).await {
        panic!("promote {version} at {path}: {e}");
    }
    version
}

/// Asserts that `e` is of `kind`, that its message names each of `names`
/// and that it quotes none of `secrets`.
pub(crate) fn assert_error(e: &PluginError, kind: ErrorKind, names: &[&str], secrets: &[&str]) {
    assert_eq!(e.kind, kind, "{e}");
    for name in names {
        assert!(e.message.contains(name), "{name:?} missing from: {e}");
    }
    for secret in secrets {
        assert!(!e.message.contains(secret), "{secret:?} quoted in: {e}");
    }
}
