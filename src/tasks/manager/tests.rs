//! Task manager tests under paused time, with an in-memory issuer standing
//! in for the systems (each real issuer is tested against its own server in
//! its module): what is issued, revoked, retried, audited and written.

use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt;
use std::sync::atomic::{AtomicU32, Ordering};

use super::*;
use crate::model::ErrorKind;
use crate::rotation::TokioClock;
use crate::tasks::issuers::Grant;
use crate::tasks::policy::Level;

const CANARY: &str = "canary-task-secret-7f3a9c";

/// Credentials "live at the system", by system and task id: what a real
/// system would accept. Failure injection per operation.
#[derive(Default)]
struct MemIssuer {
    name: String,
    /// The system the issuer reaches now (its origin): set, the issuer
    /// names it, as an OpenBao address or an admin DSN does; moved with
    /// [`MemIssuer::point_at`].
    at: Mutex<Option<String>>,
    /// (system, task id) of each credential that works.
    live: Mutex<BTreeSet<(String, String)>>,
    fail_issue: AtomicU32,
    /// A failed issue says it left nothing (the system refused the mint).
    fail_leaves_nothing: bool,
    fail_revoke: AtomicU32,
    /// Revoke answers "expires by itself" (like STS without a deny policy).
    expires_only: bool,
    /// Revoke answers that this is left at the system (`Revoked::Left`).
    leaves: Option<String>,
    revokes: AtomicU32,
    /// What `precheck` refuses with (an issuer's own refusal).
    refuse: Option<String>,
    issues: AtomicU32,
    /// Seconds `issue` takes before it mints (a slow system).
    issue_delay_s: AtomicU32,
    /// Seconds `revoke` takes.
    revoke_delay_s: AtomicU32,
    /// Seconds `precheck` takes (a slow lookup before anything is stored).
    precheck_delay_s: AtomicU32,
    /// Names its credential before minting it (`handle_before_issue`), as
    /// STS does with the role a session is asked of.
    names_before: bool,
    /// The handle each `revoke` was given.
    revoked_handles: Mutex<Vec<Option<String>>>,
}

impl MemIssuer {
    fn new(name: &str) -> Arc<MemIssuer> {
        Arc::new(MemIssuer {
            name: name.into(),
            ..Default::default()
        })
    }

    /// One whose credential cannot be ended early (STS without a deny
    /// policy).
    fn expiring(name: &str) -> Arc<MemIssuer> {
        Arc::new(MemIssuer {
            name: name.into(),
            expires_only: true,
            ..Default::default()
        })
    }

    fn is_live(&self, task: &str) -> bool {
        self.live.lock().unwrap().iter().any(|(_, t)| t == task)
    }

    /// The issuer now reaches `system` (an address or admin DSN changed).
    fn point_at(&self, system: &str) {
        *self.at.lock().unwrap() = Some(system.to_owned());
    }

    /// The system it reaches now ("" when it names none).
    fn system(&self) -> String {
        self.at.lock().unwrap().clone().unwrap_or_default()
    }
}

#[async_trait]
impl TaskIssuer for MemIssuer {
    fn describe(&self) -> String {
        format!("mem:{}", self.name)
    }

    async fn precheck(&self, _req: &IssueRequest<'_>) -> Result<(), PluginError> {
        let delay = self.precheck_delay_s.load(Ordering::SeqCst);
        tokio::time::sleep(Duration::from_secs(delay.into())).await;
        match &self.refuse {
            Some(why) => Err(PluginError::new(ErrorKind::Invalid, why.clone())),
            None => Ok(()),
        }
    }

    fn ends_early(&self) -> bool {
        !self.expires_only
    }

    fn handle_before_issue(&self, req: &IssueRequest<'_>) -> Option<String> {
        self.names_before
            .then(|| format!("{}-asked-{}", self.name, req.task.task_id))
    }

    async fn issue(&self, req: &IssueRequest<'_>) -> Result<Issued, IssueError> {
        self.issues.fetch_add(1, Ordering::SeqCst);
        let delay = self.issue_delay_s.load(Ordering::SeqCst);
        tokio::time::sleep(Duration::from_secs(delay.into())).await;
        if self.fail_issue.load(Ordering::SeqCst) > 0 {
            self.fail_issue.fetch_sub(1, Ordering::SeqCst);
            if self.fail_leaves_nothing {
                return Err(IssueError::nothing_left(PluginError::new(
                    ErrorKind::Invalid,
                    "400 Bad Request: policies not allowed",
                )));
            }
            return Err(PluginError::new(ErrorKind::Transient, "connection refused").into());
        }
        self.live
            .lock()
            .unwrap()
            .insert((self.system(), req.task.task_id.clone()));
        Ok(Issued {
            handle: format!("{}-{}", self.name, req.task.task_id),
            public: [("user".to_owned(), format!("kt_task_{}", req.task.task_id))].into(),
            secret: [(
                "password".to_owned(),
                SecretValue::from_string(CANARY.into()),
            )]
            .into(),
            expires_at: req.expires_at,
        })
    }

    async fn revoke(
        &self,
        task: &TaskAttribution,
        handle: Option<&str>,
        _expires_at: SystemTime,
    ) -> Result<Revoked, PluginError> {
        self.revokes.fetch_add(1, Ordering::SeqCst);
        self.revoked_handles
            .lock()
            .unwrap()
            .push(handle.map(str::to_owned));
        let delay = self.revoke_delay_s.load(Ordering::SeqCst);
        tokio::time::sleep(Duration::from_secs(delay.into())).await;
        if self.fail_revoke.load(Ordering::SeqCst) > 0 {
            self.fail_revoke.fetch_sub(1, Ordering::SeqCst);
            return Err(PluginError::new(
                ErrorKind::Transient,
                "server closed the connection",
            ));
        }
        if self.expires_only {
            return Ok(Revoked::ExpiresAt(
                SystemTime::now() + Duration::from_secs(600),
            ));
        }
        // Like a real system: what it does not know of is "already gone".
        self.live
            .lock()
            .unwrap()
            .remove(&(self.system(), task.task_id.clone()));
        if let Some(note) = &self.leaves {
            return Ok(Revoked::Left(note.clone()));
        }
        Ok(Revoked::Now)
    }

    async fn verify_revoked(
        &self,
        task: &TaskAttribution,
        _handle: Option<&str>,
    ) -> Result<bool, PluginError> {
        Ok(!self
            .live
            .lock()
            .unwrap()
            .contains(&(self.system(), task.task_id.clone())))
    }

    async fn origin(&self) -> Result<Option<String>, PluginError> {
        Ok(self.at.lock().unwrap().clone())
    }

    async fn check(&self) -> Result<(), PluginError> {
        Ok(())
    }
}

#[derive(Default)]
struct Recorded(Mutex<Vec<AuditEvent>>);

#[async_trait]
impl TaskRecorder for Recorded {
    async fn record(&self, event: AuditEvent) {
        self.0.lock().unwrap().push(event);
    }
}

impl Recorded {
    fn names(&self) -> Vec<String> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .map(|e| format!("{}:{:?}", e.event, e.outcome).to_lowercase())
            .collect()
    }

    fn all_text(&self) -> String {
        serde_json::to_string(&*self.0.lock().unwrap()).unwrap()
    }
}

struct Harness {
    _dir: tempfile::TempDir,
    root: PathBuf,
    state: PathBuf,
    pg: Arc<MemIssuer>,
    sts: Arc<MemIssuer>,
    rec: Arc<Recorded>,
    mgr: Arc<TaskManager>,
}

fn policy() -> Policy {
    let level = |issuers: &[&str], max: u64| Level {
        max_ttl: Duration::from_secs(max),
        grants: issuers
            .iter()
            .map(|i| ((*i).to_owned(), Grant(serde_json::json!({"roles": ["r"]}))))
            .collect(),
    };
    Policy {
        name: "invoicing".into(),
        agents: ["bot".to_owned()].into(),
        tenants: ["acme".to_owned(), "globex".to_owned()].into(),
        use_cases: None,
        max_ttl: Duration::from_secs(3600),
        default_ttl: Duration::from_secs(900),
        levels: [
            ("low".to_owned(), level(&["pg"], 900)),
            ("high".to_owned(), level(&["pg", "sts"], 3600)),
        ]
        .into(),
    }
}

fn harness_with(pg: Arc<MemIssuer>, sts: Arc<MemIssuer>) -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("tasks");
    let state = dir.path().join("state");
    let rec = Arc::new(Recorded::default());
    let setup = setup(&pg, &sts, &root);
    let clock = Arc::new(TokioClock::starting_at(Utc::now()));
    let mgr = Arc::new(TaskManager::new(
        TaskStore::open_inline(&state).unwrap(),
        setup,
        rec.clone(),
        clock,
    ));
    Harness {
        _dir: dir,
        root,
        state,
        pg,
        sts,
        rec,
        mgr,
    }
}

fn setup(pg: &Arc<MemIssuer>, sts: &Arc<MemIssuer>, root: &Path) -> TaskSetup {
    TaskSetup {
        policies: [("invoicing".to_owned(), policy())].into(),
        issuers: [
            ("pg".to_owned(), pg.clone() as Arc<dyn TaskIssuer>),
            ("sts".to_owned(), sts.clone() as Arc<dyn TaskIssuer>),
        ]
        .into(),
        // `intruder` is configured but no policy lists it.
        agents: [
            (
                "bot".to_owned(),
                AgentOwner {
                    uid: None,
                    gid: None,
                },
            ),
            (
                "intruder".to_owned(),
                AgentOwner {
                    uid: None,
                    gid: None,
                },
            ),
        ]
        .into(),
        task_root: Some(root.to_path_buf()),
    }
}

fn harness() -> Harness {
    harness_with(MemIssuer::new("pg"), MemIssuer::new("sts"))
}

impl Harness {
    /// Starts a task for `bot` as `request` asks: its id.
    async fn start_as_bot(&self, request: StartRequest) -> String {
        let started = self.mgr.start(&caller("bot"), request).await.unwrap();
        started.task.task.task_id
    }

    /// A start for `bot` at `sensitivity` that fails: why.
    async fn start_err(&self, sensitivity: &str) -> TaskError {
        self.mgr
            .start(&caller("bot"), ask(sensitivity, None))
            .await
            .unwrap_err()
    }

    /// Runs `start` for a second, into `sts`'s slow issue (its
    /// `issue_delay_s` set): the start must not complete.
    async fn until_issuing_at_sts<F: Future<Output = Result<Started, TaskError>>>(
        &self,
        start: &mut std::pin::Pin<Box<F>>,
    ) {
        tokio::select! {
            r = start => panic!("the start completed: {r:?}"),
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }

    /// Starts a `high` task whose issue fails at `sts`: its record.
    async fn failed_start_at_sts(&self) -> TaskRow {
        let e = self.start_err("high").await;
        let TaskError::Issue { task, issuer, .. } = &e else {
            panic!("{e}")
        };
        assert_eq!(issuer, "sts");
        self.mgr.store.get(task).unwrap().unwrap()
    }

    /// Starts a task for `bot` at `sensitivity` (`ttl` in seconds): its id.
    async fn start(&self, sensitivity: &str, ttl: Option<u64>) -> String {
        self.start_as_bot(ask(sensitivity, ttl)).await
    }

    /// A new manager over the same store and setup, its clock `secs` past
    /// now: what a restart finds (after kill -9, say).
    fn restarted(&self, secs: i64) -> TaskManager {
        let clock = Arc::new(TokioClock::starting_at(
            Utc::now() + chrono::Duration::seconds(secs),
        ));
        TaskManager::new(
            TaskStore::open_inline(&self.state).unwrap(),
            setup(&self.pg, &self.sts, &self.root),
            self.rec.clone(),
            clock,
        )
    }

    /// The stored state of task `id`.
    fn state_of(&self, id: &str) -> TaskState {
        self.mgr.store.get(id).unwrap().unwrap().state
    }
}

/// Asserts that `t` has ended for `reason`.
fn assert_ended(t: &TaskRow, reason: &str) {
    assert_eq!(
        (t.state, t.end_reason.as_deref()),
        (TaskState::Ended, Some(reason))
    );
}

fn caller(agent: &str) -> Caller {
    Caller {
        agent: agent.into(),
        actor: Actor::Peer {
            uid: 1001,
            gid: 1001,
            pid: 42,
        },
        described: "uid=1001".into(),
    }
}

fn ask(sensitivity: &str, ttl: Option<u64>) -> StartRequest {
    StartRequest {
        tenant: "acme".into(),
        use_case: "month-end".into(),
        run_id: "run-77".into(),
        initiator: "alice@example.com".into(),
        sensitivity: sensitivity.into(),
        ttl: ttl.map(Duration::from_secs),
    }
}

#[tokio::test(start_paused = true)]
async fn a_task_is_issued_written_ended_revoked_and_audited() {
    let h = harness();
    let started = h
        .mgr
        .start(&caller("bot"), ask("high", Some(600)))
        .await
        .unwrap();
    let id = started.task.task.task_id.clone();
    assert_eq!(id.len(), 24);
    assert!(h.pg.is_live(&id) && h.sts.is_live(&id));
    assert_eq!(started.task.state, TaskState::Live);
    assert_eq!(started.task.policy, "invoicing");
    assert_eq!(
        started.task.expires_at_ms - started.task.started_at_ms,
        600_000
    );
    assert!(
        started
            .task
            .items
            .iter()
            .all(|i| i.state == ItemState::Issued && i.handle.is_some())
    );

    // The files: one per issuer, 0400 in a 0700 directory named by the task.
    let dir = started.dir.clone().unwrap();
    assert_eq!(dir, h.root.join("bot").join(&id));
    assert_eq!(
        std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777,
        0o700
    );
    assert_eq!(
        std::fs::metadata(h.root.join("bot"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o750
    );
    let f = &started.credentials["pg"].file.clone().unwrap();
    assert_eq!(
        std::fs::metadata(f).unwrap().permissions().mode() & 0o777,
        0o400
    );
    let doc: serde_json::Value = serde_json::from_slice(&std::fs::read(f).unwrap()).unwrap();
    assert_eq!(doc["password"], CANARY);
    assert_eq!(doc["task"], id.as_str());
    assert_eq!(doc["user"], format!("kt_task_{id}"));

    let ended = h.mgr.end(&caller("bot"), &id).await.unwrap();
    assert_ended(&ended, "end");
    assert_eq!(ended.ended_by.as_deref(), Some("uid=1001"));
    assert!(ended.items.iter().all(|i| i.state == ItemState::Verified));
    assert!(!h.pg.is_live(&id) && !h.sts.is_live(&id));
    assert!(!dir.exists());
    // Ending twice is harmless and revokes nothing more.
    h.mgr.end(&caller("bot"), &id).await.unwrap();
    assert_eq!(h.pg.revokes.load(Ordering::SeqCst), 1);

    assert_eq!(
        h.rec.names(),
        [
            "task.started:ok",
            "task.issued:ok",
            "task.issued:ok",
            "task.end:ok",
            "task.revoked:ok",
            "task.revoked:ok",
            "task.ended:ok",
            // The second request is audited too.
            "task.end:ok",
        ]
    );
    let text = h.rec.all_text();
    for field in [
        "run-77",
        "alice@example.com",
        "month-end",
        "\\\"high\\\"",
        "uid=1001",
        &id,
    ] {
        assert!(
            text.contains(field),
            "{field} missing from the audit: {text}"
        );
    }
    // Never the credential: not in the audit, not in the store.
    assert!(!text.contains(CANARY));
    let db = std::fs::read(h.state.join("tasks.db")).unwrap();
    let wal = std::fs::read(h.state.join("tasks.db-wal")).unwrap_or_default();
    for bytes in [db, wal] {
        assert!(!bytes.windows(CANARY.len()).any(|w| w == CANARY.as_bytes()));
    }
}

#[tokio::test(start_paused = true)]
async fn refusals_are_audited_and_issue_nothing() {
    let h = harness();
    let mut other_tenant = ask("low", None);
    other_tenant.tenant = "initech".into();
    let e = h.mgr.start(&caller("bot"), other_tenant).await.unwrap_err();
    assert!(
        matches!(e, TaskError::Refused(Refusal::Tenant { .. })),
        "{e}"
    );
    let e = h
        .mgr
        .start(&caller("bot"), ask("low", Some(901)))
        .await
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        "refused: a TTL of 15m 1s is longer than policy `invoicing` allows at sensitivity `low` (15m); ask for 15m or less"
    );
    let e = h
        .mgr
        .start(&caller("intruder"), ask("low", None))
        .await
        .unwrap_err();
    assert!(matches!(e, TaskError::Refused(Refusal::NoPolicy { .. })));
    let mut bad = ask("low", None);
    bad.run_id = "run\n42".into();
    let e = h.mgr.start(&caller("bot"), bad).await.unwrap_err();
    assert_eq!(
        e.to_string(),
        "invalid run_id: it contains a control character"
    );

    assert_eq!(h.rec.names(), ["task.refused:refused"; 3]);
    assert!(
        h.rec
            .all_text()
            .contains("tenant_not_allowed: agent `bot` may not serve tenant `initech`")
    );
    assert!(h.pg.live.lock().unwrap().is_empty());
    assert!(h.mgr.list(None, 10).unwrap().is_empty());
}

#[tokio::test(start_paused = true)]
async fn an_agent_cannot_end_or_see_another_agents_task() {
    let h = harness();
    let id = h.start("low", None).await;
    let e = h.mgr.end(&caller("other"), &id).await.unwrap_err();
    // Said like an unknown task.
    assert_eq!(e.to_string(), format!("no task `{id}`"));
    assert!(h.pg.is_live(&id));
    assert_eq!(h.mgr.list(Some("other"), 10).unwrap().len(), 0);
    assert_eq!(h.mgr.list(Some("bot"), 10).unwrap().len(), 1);
    assert!(h.rec.names().contains(&"task.end:refused".to_owned()));
}

#[tokio::test(start_paused = true)]
async fn the_ttl_ends_a_task_and_survives_a_restart() {
    let h = harness();
    let id = h.start("low", Some(60)).await;
    // Due in 60 s.
    let wait = h.mgr.tick().await.unwrap();
    assert_eq!(wait, Duration::from_secs(60));

    // "Restart": a new manager over the same store (what kill -9 leaves).
    let mgr = h.restarted(61);
    assert!(h.pg.is_live(&id));
    mgr.tick().await.unwrap();
    let t = mgr.list(Some("bot"), 10).unwrap().remove(0);
    assert_ended(&t, "ttl");
    assert!(!h.pg.is_live(&id));
    assert!(!h.root.join("bot").join(&id).exists());
}

/// A task as a crash in the middle of its start leaves it: recorded, the
/// system's credential minted, its handle never recorded.
fn cut_off_start() -> TaskRow {
    TaskRow {
        task: TaskAttribution {
            task_id: "0123456789abcdef01234567".into(),
            agent: "bot".into(),
            tenant: "acme".into(),
            use_case: "month-end".into(),
            run_id: "r".into(),
            initiator: "alice".into(),
            sensitivity: "low".into(),
        },
        policy: "invoicing".into(),
        started_by: "uid=1001".into(),
        started_at_ms: 0,
        expires_at_ms: i64::MAX / 4,
        state: TaskState::Starting,
        ended_at_ms: None,
        end_reason: None,
        dir: None,
        ended_by: None,
        items: vec![ItemRow {
            issuer: "pg".into(),
            handle: None,
            state: ItemState::Issuing,
            expires_at_ms: None,
            last_error: None,
            origin: None,
        }],
    }
}

#[tokio::test(start_paused = true)]
async fn a_credential_minted_before_a_crash_is_found_and_revoked() {
    let h = harness();
    let row = cut_off_start();
    h.mgr.store.insert(&row).await.unwrap();
    h.pg.live
        .lock()
        .unwrap()
        .insert((String::new(), row.task.task_id.clone()));
    // Ending it revokes by task id.
    h.mgr.end(&caller("bot"), &row.task.task_id).await.unwrap();
    assert!(!h.pg.is_live(&row.task.task_id));
    let t = h.mgr.store.get(&row.task.task_id).unwrap().unwrap();
    // Whoever ends it, it ends as the failed start it was.
    assert_ended(&t, "start_failed");
}

/// Black-box finding: a PostgreSQL task role that owned objects someone
/// else's view depends on was disabled but not dropped, and only the log
/// said so: `task list` and the `task.revoked` record read as clean. What
/// the issuer says is left is kept on the item and in the record.
#[tokio::test(start_paused = true)]
async fn what_a_revocation_leaves_behind_is_kept_on_the_item_and_audited() {
    let pg = Arc::new(MemIssuer {
        name: "pg".into(),
        leaves: Some("role kt_task_x disabled but not dropped: DROP OWNED BY kt_task_x".into()),
        ..Default::default()
    });
    let h = harness_with(pg, MemIssuer::new("sts"));
    let id = h.start("low", Some(60)).await;
    let t = h.mgr.end(&caller("bot"), &id).await.unwrap();
    assert_ended(&t, "end");
    let item = t.items.iter().find(|i| i.issuer == "pg").unwrap();
    assert_eq!(item.state, ItemState::Verified);
    assert!(
        item.last_error
            .as_deref()
            .is_some_and(|e| e.contains("not dropped")),
        "{item:?}"
    );
    let revoked = h
        .rec
        .0
        .lock()
        .unwrap()
        .iter()
        .find(|e| {
            e.event == "task.revoked" && e.detail.as_deref().is_some_and(|d| d.contains("\"pg\""))
        })
        .cloned()
        .unwrap();
    let detail: serde_json::Value =
        serde_json::from_str(revoked.detail.as_deref().unwrap()).unwrap();
    assert!(
        detail["left"].as_str().unwrap().contains("DROP OWNED BY"),
        "{detail}"
    );
}

/// Black-box finding: a mint cut off by a crash (the system never
/// answered), then the issuer pointed at another system, left the task
/// `ending` (overdue) and its agent's decommission pending for good: the
/// error asked to point the issuer back at a system that never answered.
/// Nothing the mint made outlives the task's expiry (it was issued to
/// expire then), so past it the item is done as expired; before it, the
/// item waits as any credential of a moved issuer does.
#[tokio::test(start_paused = true)]
async fn a_mint_cut_off_before_its_issuer_moved_is_done_at_the_tasks_expiry() {
    let h = harness();
    let mut row = cut_off_start();
    row.expires_at_ms = Utc::now().timestamp_millis() + 60_000;
    row.items[0].origin = Some("https://bao-a:8200".into());
    let id = row.task.task_id.clone();
    h.mgr.store.insert(&row).await.unwrap();
    h.pg.point_at("https://bao-b:8200");

    let before = h.restarted(0);
    before.tick().await.unwrap();
    let t = before.store.get(&id).unwrap().unwrap();
    assert_eq!(t.state, TaskState::Ending);
    let error = t.items[0].last_error.clone().unwrap_or_default();
    assert!(error.contains("now reaches https://bao-b:8200"), "{error}");

    let after = h.restarted(61);
    after.tick().await.unwrap();
    let t = after.store.get(&id).unwrap().unwrap();
    assert_ended(&t, "start_failed");
    assert_eq!(t.items[0].state, ItemState::Expiring);
    assert_eq!(after.figures().unwrap().revocation_overdue, 0);
    assert_eq!(
        h.pg.revokes.load(Ordering::SeqCst),
        0,
        "nothing asked of the other system"
    );
    assert!(
        h.rec.names().contains(&"task.expiring:ok".to_owned()),
        "{:?}",
        h.rec.names()
    );
}

/// Defect: after a kill -9 during a task start, the restarted daemon showed
/// the half-started task `live` and its credentials kept working until the
/// TTL, although its caller got an error and holds nothing. A start that
/// did not complete is ended at the restart's first pass, as a failed
/// start, and what it issued is revoked (by handle, or by task id).
#[tokio::test(start_paused = true)]
async fn a_start_cut_off_by_a_crash_is_ended_at_restart_as_a_failed_start() {
    let h = harness();
    let mut row = cut_off_start();
    row.items.push(ItemRow {
        issuer: "sts".into(),
        handle: None,
        state: ItemState::Issuing,
        expires_at_ms: None,
        last_error: None,
        origin: None,
    });
    let id = row.task.task_id.clone();
    h.mgr.store.insert(&row).await.unwrap();
    // `sts` minted and recorded its handle, `pg` minted and the crash came.
    h.mgr
        .store
        .set_item(&id, "sts", ItemState::Issued, Some("sts-h"), None, None)
        .await
        .unwrap();
    h.pg.live
        .lock()
        .unwrap()
        .insert((h.pg.system(), id.clone()));
    h.sts
        .live
        .lock()
        .unwrap()
        .insert((h.sts.system(), id.clone()));
    let restarted = h.restarted(0);
    // Not live, even before the first pass.
    assert_eq!(
        restarted.list(Some("bot"), 0).unwrap()[0].state,
        TaskState::Starting
    );
    restarted.tick().await.unwrap();
    let t = restarted.store.get(&id).unwrap().unwrap();
    assert_ended(&t, "start_failed");
    assert_eq!(t.ended_by.as_deref(), Some("keyturn"));
    assert!(!h.pg.is_live(&id) && !h.sts.is_live(&id));
    let ended = h.rec.0.lock().unwrap().last().cloned().unwrap();
    assert_eq!(ended.event, "task.ended");
    let detail: serde_json::Value = serde_json::from_str(ended.detail.as_deref().unwrap()).unwrap();
    assert_eq!(detail["reason"], "start_failed");
}

/// A start abandoned half-way (its request dropped) is left alone while it
/// runs, then ended as a failed start at the next pass.
#[tokio::test(start_paused = true)]
async fn a_start_abandoned_half_way_is_ended_as_a_failed_start() {
    let h = harness();
    h.sts.issue_delay_s.store(30, Ordering::SeqCst);
    let bot = caller("bot");
    let mut start = Box::pin(h.mgr.start(&bot, ask("high", None)));
    h.until_issuing_at_sts(&mut start).await;
    let open = h.mgr.list(Some("bot"), 0).unwrap();
    let id = open[0].task.task_id.clone();
    assert_eq!(open[0].state, TaskState::Starting);
    assert!(h.pg.is_live(&id));
    // In progress: the loop leaves it to its start.
    h.mgr.tick().await.unwrap();
    assert_eq!(h.state_of(&id), TaskState::Starting);
    assert!(h.pg.is_live(&id));
    drop(start);
    h.mgr.tick().await.unwrap();
    let t = h.mgr.store.get(&id).unwrap().unwrap();
    assert_ended(&t, "start_failed");
    assert!(!h.pg.is_live(&id) && !h.sts.is_live(&id));
}

/// Defect: the audit log never said who ended a task, and `task.issued` /
/// `task.revoked` records carried only the issuer and the task id. Every
/// record of a task carries its whole attribution; the end is audited with
/// its caller (`task.end`, the peer as actor) and `task.ended` says why and
/// who: the caller as authenticated, or `keyturn` (TTL, failed start).
#[tokio::test(start_paused = true)]
async fn who_ended_a_task_is_audited_with_the_whole_attribution() {
    let h = harness();
    let operator = Caller {
        agent: "bot".into(),
        actor: Actor::Peer {
            uid: 0,
            gid: 0,
            pid: 7,
        },
        described: "uid=0 as bot".into(),
    };
    let by_operator = h.start("low", None).await;
    h.mgr.end(&operator, &by_operator).await.unwrap();
    let by_ttl = h.start("low", Some(60)).await;
    tokio::time::advance(Duration::from_secs(61)).await;
    h.mgr.tick().await.unwrap();

    let records = h.rec.0.lock().unwrap().clone();
    let of = |task: &str, event: &str| -> Vec<(AuditEvent, serde_json::Value)> {
        records
            .iter()
            .filter(|r| r.event == event)
            .map(|r| {
                let d: serde_json::Value =
                    serde_json::from_str(r.detail.as_deref().unwrap()).unwrap();
                (r.clone(), d)
            })
            .filter(|(_, d)| d["task"] == task)
            .collect()
    };
    let (end, _) = &of(&by_operator, "task.end")[0];
    assert_eq!(end.actor, operator.actor);
    let (ended, d) = &of(&by_operator, "task.ended")[0];
    assert_eq!(ended.actor, operator.actor);
    assert_eq!(
        (&d["reason"], &d["ended_by"]),
        (&"end".into(), &"uid=0 as bot".into())
    );
    let (ended, d) = &of(&by_ttl, "task.ended")[0];
    assert_eq!(ended.actor, Actor::Daemon);
    assert_eq!(
        (&d["reason"], &d["ended_by"]),
        (&"ttl".into(), &"keyturn".into())
    );
    for task in [&by_operator, &by_ttl] {
        for event in ["task.issued", "task.revoked", "task.ended"] {
            let (r, d) = &of(task, event)[0];
            assert_eq!(r.agent.as_ref().map(|a| a.as_str()), Some("bot"), "{event}");
            assert_eq!(r.tenant.as_deref(), Some("acme"), "{event}");
            for (k, v) in [
                ("run_id", "run-77"),
                ("use_case", "month-end"),
                ("initiator", "alice@example.com"),
                ("sensitivity", "low"),
            ] {
                assert_eq!(d[k], v, "{event} {k}: {d}");
            }
            if event != "task.ended" {
                assert_eq!(d["issuer"], "pg", "{event}");
            }
        }
    }
    assert_eq!(
        h.mgr
            .store
            .get(&by_ttl)
            .unwrap()
            .unwrap()
            .ended_by
            .as_deref(),
        Some("keyturn")
    );
}

/// A credential that cannot be ended early is audited as expiring, not as
/// revoked: it keeps working until its own expiry.
#[tokio::test(start_paused = true)]
async fn a_credential_that_only_expires_is_not_audited_as_revoked() {
    let h = harness_with(MemIssuer::expiring("pg"), MemIssuer::new("sts"));
    let id = h.start("low", None).await;
    h.mgr.end(&caller("bot"), &id).await.unwrap();
    let names = h.rec.names();
    assert!(names.contains(&"task.expiring:ok".to_owned()), "{names:?}");
    assert!(!names.contains(&"task.revoked:ok".to_owned()), "{names:?}");
}

#[tokio::test(start_paused = true)]
async fn a_failed_start_revokes_what_was_issued() {
    let sts = MemIssuer::new("sts");
    sts.fail_issue.store(1, Ordering::SeqCst);
    let h = harness_with(MemIssuer::new("pg"), sts);
    let e = h.start_err("high").await;
    let TaskError::Issue { task, issuer, .. } = &e else {
        panic!("{e}")
    };
    assert_eq!(issuer, "sts");
    assert!(
        !h.pg.is_live(task),
        "pg's credential outlived the failed start"
    );
    let t = h.mgr.store.get(task).unwrap().unwrap();
    assert_ended(&t, "start_failed");
    assert!(h.rec.names().contains(&"task.issued:failed".to_owned()));
}

/// Defect: an issuer's own refusal (a TTL it cannot mint, a session
/// policy file missing) came after the issuers before it in name order had
/// minted; one that cannot be ended early (STS without a deny policy) then
/// outlived the failed start, and the task stayed `ending`, overdue and
/// holding decommissions, until it expired. Every issuer's own refusals
/// come first: nothing is minted or recorded, and the refusal is audited.
#[tokio::test(start_paused = true)]
async fn an_issuers_own_refusal_comes_before_anything_is_minted() {
    let pg = MemIssuer::expiring("pg");
    let sts = Arc::new(MemIssuer {
        name: "sts".into(),
        refuse: Some("the task's TTL of 10s is below STS's shortest session".into()),
        ..Default::default()
    });
    let h = harness_with(pg, sts);
    let e = h.start_err("high").await;
    let TaskError::Unissuable { issuer, .. } = &e else {
        panic!("{e}")
    };
    assert_eq!(issuer, "sts");
    assert_eq!(h.pg.issues.load(Ordering::SeqCst), 0, "pg minted");
    assert!(h.mgr.list(None, 10).unwrap().is_empty(), "a task recorded");
    assert_eq!(h.rec.names(), ["task.refused:refused"]);
    assert!(h.rec.all_text().contains("below STS's shortest session"));
}

/// Defect: issuers were called in name order, so a credential that cannot
/// be ended early could be minted before one that then failed; it outlived
/// the failed start. Those that can be ended are minted first, and the
/// issuers a failure left uncalled hold nothing: the task ends at once.
#[tokio::test(start_paused = true)]
async fn credentials_that_cannot_be_ended_early_are_minted_last() {
    let pg = MemIssuer::expiring("pg");
    let sts = MemIssuer::new("sts");
    sts.fail_issue.store(1, Ordering::SeqCst);
    let h = harness_with(pg, sts);
    let t = h.failed_start_at_sts().await;
    assert_eq!(h.pg.issues.load(Ordering::SeqCst), 0, "pg minted first");
    assert_ended(&t, "start_failed");
    let pg_item = t.items.iter().find(|i| i.issuer == "pg").unwrap();
    assert_eq!(pg_item.state, ItemState::Verified);
}

/// Defect: an issue that failed left its item `issuing` without a handle,
/// so the task was ended as after a crash: an issuer that cannot find the
/// credential by task id (a token without its accessor) answered "expires
/// at now + max_ttl", and the failed start stayed `ending`, overdue and
/// holding decommissions, for up to an hour. An issuer that knows nothing
/// was made (the system refused the mint) says so, and the task ends at
/// once; one that cannot know is still waited for.
#[tokio::test(start_paused = true)]
async fn a_refused_mint_ends_the_failed_start_at_once() {
    for refused in [true, false] {
        let pg = MemIssuer::new("pg");
        let sts = Arc::new(MemIssuer {
            name: "sts".into(),
            expires_only: true,
            fail_leaves_nothing: refused,
            ..Default::default()
        });
        sts.fail_issue.store(1, Ordering::SeqCst);
        let h = harness_with(pg, sts);
        let t = h.failed_start_at_sts().await;
        let item = |name: &str| t.items.iter().find(|i| i.issuer == name).unwrap();
        assert_eq!(item("pg").state, ItemState::Verified, "pg revoked");
        if refused {
            assert_ended(&t, "start_failed");
            assert_eq!(item("sts").state, ItemState::Verified);
            assert_eq!(h.sts.revokes.load(Ordering::SeqCst), 0, "nothing to revoke");
        } else {
            // A lost answer: the session may exist, and ends by itself.
            assert_eq!(t.state, TaskState::Ending);
            assert_eq!(item("sts").state, ItemState::Expiring);
            assert_eq!(h.sts.revokes.load(Ordering::SeqCst), 1);
        }
        assert_eq!(h.mgr.figures().unwrap().revocation_overdue, 0);
    }
}

/// An issuer that names its credential before the mint (an STS session:
/// the role it is asked of) gets that name in `revoke` after an issue whose
/// answer was lost, and after a crash between the mint and its record;
/// a handle from `issue` replaces it.
#[tokio::test(start_paused = true)]
async fn revoke_gets_the_handle_named_before_the_mint() {
    let sts = Arc::new(MemIssuer {
        name: "sts".into(),
        names_before: true,
        ..Default::default()
    });
    sts.fail_issue.store(1, Ordering::SeqCst);
    let h = harness_with(MemIssuer::new("pg"), sts);
    // A lost answer.
    let t = h.failed_start_at_sts().await;
    let asked = format!("sts-asked-{}", t.task.task_id);
    assert_eq!(
        *h.sts.revoked_handles.lock().unwrap(),
        [Some(asked.clone())]
    );
    assert_ended(&t, "start_failed");
    let item = t.items.iter().find(|i| i.issuer == "sts").unwrap();
    assert_eq!(item.handle.as_deref(), Some(asked.as_str()));
    assert_eq!(h.pg.revokes.load(Ordering::SeqCst), 1);
    assert_eq!(
        *h.pg.revoked_handles.lock().unwrap(),
        [Some(format!("pg-{}", t.task.task_id))]
    );

    // Issued: the handle `issue` returned is the one revoked.
    h.sts.revoked_handles.lock().unwrap().clear();
    let id = h.start("high", None).await;
    h.mgr.end(&caller("bot"), &id).await.unwrap();
    assert_eq!(
        *h.sts.revoked_handles.lock().unwrap(),
        [Some(format!("sts-{id}"))]
    );

    // A start that died during the call (its request dropped, as the
    // process would be): the name recorded before it is what is revoked.
    h.sts.revoked_handles.lock().unwrap().clear();
    h.sts.issue_delay_s.store(30, Ordering::SeqCst);
    let bot = caller("bot");
    let mut start = Box::pin(h.mgr.start(&bot, ask("high", None)));
    h.until_issuing_at_sts(&mut start).await;
    drop(start);
    let id = h.mgr.list(Some("bot"), 0).unwrap()[0].task.task_id.clone();
    h.mgr.tick().await.unwrap();
    assert_eq!(
        *h.sts.revoked_handles.lock().unwrap(),
        [Some(format!("sts-asked-{id}"))]
    );
}

#[tokio::test(start_paused = true)]
async fn a_failed_revocation_is_retried_until_verified() {
    let pg = MemIssuer::new("pg");
    pg.fail_revoke.store(2, Ordering::SeqCst);
    let h = harness_with(pg, MemIssuer::new("sts"));
    let id = h.start("low", None).await;
    let t = h.mgr.end(&caller("bot"), &id).await.unwrap();
    assert_eq!(t.state, TaskState::Ending);
    assert_eq!(
        t.items[0].last_error.as_deref(),
        Some("server closed the connection")
    );
    assert!(h.pg.is_live(&id));
    // The next pass is the retry interval away; it fails once more, then works.
    assert_eq!(h.mgr.tick().await.unwrap(), h.mgr.retry);
    assert_eq!(h.state_of(&id), TaskState::Ending);
    h.mgr.tick().await.unwrap();
    assert_eq!(h.state_of(&id), TaskState::Ended);
    assert!(!h.pg.is_live(&id));
    // Two failures with the same error: the first is audited, the second
    // is persisted and logged only (once an hour it would be summarized).
    assert_eq!(
        h.rec
            .names()
            .iter()
            .filter(|n| *n == "task.revoke_failed:failed")
            .count(),
        1
    );
}

/// Defect: a `task end` whose revocation failed was retried only at the
/// task's TTL (the time the running loop was armed for), not every few
/// seconds: the credential kept working. The loop is told to try again
/// after the retry interval.
#[tokio::test(start_paused = true)]
async fn a_task_end_that_fails_is_retried_by_the_running_loop() {
    let pg = MemIssuer::new("pg");
    let h = harness_with(pg, MemIssuer::new("sts"));
    let cancel = tokio_util::sync::CancellationToken::new();
    let run = tokio::spawn(h.mgr.clone().run(cancel.clone()));
    let id = h.start("low", Some(900)).await;
    // The loop is armed for the task's TTL, 15 minutes away.
    tokio::time::sleep(Duration::from_millis(10)).await;
    h.pg.fail_revoke.store(1, Ordering::SeqCst);
    let t = h.mgr.end(&caller("bot"), &id).await.unwrap();
    assert_eq!(t.state, TaskState::Ending);
    assert!(h.pg.is_live(&id));
    tokio::time::sleep(h.mgr.retry + Duration::from_secs(1)).await;
    assert_eq!(
        h.state_of(&id),
        TaskState::Ended,
        "retried after the interval"
    );
    assert!(!h.pg.is_live(&id));
    cancel.cancel();
    run.await.unwrap();
}

/// Defect: a task whose TTL passed stayed live (its credential working)
/// until some other request woke the loop: the pass that ran while it
/// started left it to its start and armed the loop an hour away. The loop
/// is woken when a task goes live, and revokes it at its TTL with nothing
/// else happening.
#[tokio::test(start_paused = true)]
async fn the_ttl_ends_a_task_with_no_other_request() {
    let h = harness();
    let cancel = tokio_util::sync::CancellationToken::new();
    let run = tokio::spawn(h.mgr.clone().run(cancel.clone()));
    // The loop has passed once (nothing open) and sleeps.
    tokio::time::sleep(Duration::from_millis(10)).await;
    // A slow start: the loop passes while the task is starting.
    h.pg.issue_delay_s.store(1, Ordering::SeqCst);
    let id = h.start("low", Some(60)).await;
    assert_eq!(h.state_of(&id), TaskState::Live);
    tokio::time::sleep(Duration::from_secs(59)).await;
    assert_eq!(h.state_of(&id), TaskState::Live, "ended before its TTL");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let t = h.mgr.store.get(&id).unwrap().unwrap();
    assert_ended(&t, "ttl");
    assert!(!h.pg.is_live(&id));
    assert!(!h.root.join("bot").join(&id).exists());
    assert_eq!(h.mgr.figures().unwrap().revocation_overdue, 0);
    cancel.cancel();
    run.await.unwrap();
}

/// Defect: a start answered `live` was ended as a failed start a moment
/// later, its credential revoked under the caller: the pass that ended an
/// expired task went on with the list it read before, where the new task
/// was still `starting`, and took it for an abandoned start once its start
/// had completed. A pass reads each task again before it acts on it.
#[tokio::test(start_paused = true)]
async fn a_start_that_completes_during_a_pass_is_not_taken_for_a_failed_one() {
    let h = harness();
    let expired = h.start("low", Some(60)).await;
    tokio::time::advance(Duration::from_secs(61)).await;
    // The new task is starting (its `sts` credential takes 1 s) when the
    // pass lists the open tasks; revoking the expired one takes 2 s.
    h.sts.issue_delay_s.store(1, Ordering::SeqCst);
    h.pg.revoke_delay_s.store(2, Ordering::SeqCst);
    let bot = caller("bot");
    let mut start = Box::pin(h.mgr.start(&bot, ask("high", Some(600))));
    tokio::select! {
        r = &mut start => panic!("the start completed: {r:?}"),
        () = tokio::time::sleep(Duration::from_millis(100)) => {}
    }
    let (pass, started) = tokio::join!(h.mgr.tick(), start);
    pass.unwrap();
    let id = started.unwrap().task.task.task_id;
    assert_ended(&h.mgr.store.get(&expired).unwrap().unwrap(), "ttl");
    assert_eq!(h.state_of(&id), TaskState::Live);
    assert!(h.pg.is_live(&id) && h.sts.is_live(&id));
    assert!(h.root.join("bot").join(&id).is_dir());
    assert!(
        !h.rec.all_text().contains("start_failed"),
        "{:?}",
        h.rec.names()
    );
}

/// A start that failed, and whose revocation failed too, is retried after
/// the retry interval: not only when the loop wakes for something else (an
/// hour later, say), while what it issued keeps working.
#[tokio::test(start_paused = true)]
async fn a_failed_start_whose_revocation_fails_is_retried_by_the_running_loop() {
    let h = harness();
    let cancel = tokio_util::sync::CancellationToken::new();
    let run = tokio::spawn(h.mgr.clone().run(cancel.clone()));
    tokio::time::sleep(Duration::from_millis(10)).await;
    h.sts.fail_issue.store(1, Ordering::SeqCst);
    h.pg.fail_revoke.store(1, Ordering::SeqCst);
    let TaskError::Issue { task: id, .. } = h.start_err("high").await else {
        panic!("not an issue error");
    };
    assert_eq!(h.state_of(&id), TaskState::Ending);
    assert!(h.pg.is_live(&id));
    tokio::time::sleep(h.mgr.retry + Duration::from_secs(1)).await;
    assert_ended(&h.mgr.store.get(&id).unwrap().unwrap(), "start_failed");
    assert!(!h.pg.is_live(&id));
    cancel.cancel();
    run.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_credential_that_only_expires_ends_the_task_at_its_expiry() {
    let sts = MemIssuer::expiring("sts");
    let h = harness_with(MemIssuer::new("pg"), sts);
    let id = h.start("high", None).await;
    let t = h.mgr.end(&caller("bot"), &id).await.unwrap();
    assert_eq!(t.state, TaskState::Ending);
    let sts_item = t.items.iter().find(|i| i.issuer == "sts").unwrap();
    assert_eq!(sts_item.state, ItemState::Expiring);
    // Before the expiry, a pass leaves it ending (the system still accepts
    // the credential).
    h.mgr.tick().await.unwrap();
    h.mgr.end(&caller("bot"), &id).await.unwrap();
    assert_eq!(h.state_of(&id), TaskState::Ending);
    assert!(h.root.join("bot").join(&id).is_dir());
    // What a decommission waiting for it says (black-box finding: its
    // words called the wait a transient failure).
    let waits = crate::revocation::TaskProbe::tasks_ended(&*h.mgr, "bot").unwrap_err();
    assert!(
        waits.contains(&format!(
            "task {id} of bot: its credential from issuer sts cannot be ended early"
        )) && waits.contains("expires by itself at "),
        "{waits}"
    );
    // Ended once the clock passes the expiry the system enforces (600 s).
    tokio::time::advance(Duration::from_secs(601)).await;
    let mgr = h.restarted(601);
    mgr.tick().await.unwrap();
    assert_eq!(mgr.store.get(&id).unwrap().unwrap().state, TaskState::Ended);
}

#[tokio::test(start_paused = true)]
async fn decommission_ends_every_task_of_the_agent() {
    let h = harness();
    let a = h.start("low", None).await;
    let mut other = ask("high", None);
    other.tenant = "globex".into();
    let b = h.start_as_bot(other).await;
    // Two tenants, two directories: never a shared file.
    assert_ne!(a, b);
    assert!(h.root.join("bot").join(&a).is_dir() && h.root.join("bot").join(&b).is_dir());
    assert_eq!(h.mgr.end_all_of("bot", "decommission").await.unwrap(), 2);
    for id in [&a, &b] {
        let t = h.mgr.store.get(id).unwrap().unwrap();
        assert_ended(&t, "decommission");
    }
    assert!(h.pg.live.lock().unwrap().is_empty() && h.sts.live.lock().unwrap().is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_retired_agent_starts_nothing_and_its_tasks_end() {
    let h = harness();
    let id = h.start("low", None).await;
    // The config no longer lists it as active (decommissioned, or removed).
    let mut s = setup(&h.pg, &h.sts, &h.root);
    s.agents.clear();
    h.mgr.set_setup(s);
    let e = h
        .mgr
        .start(&caller("bot"), ask("low", None))
        .await
        .unwrap_err();
    assert!(matches!(e, TaskError::AgentRetired(_)), "{e}");
    // Refused, and audited as the other refusals are.
    assert_eq!(h.rec.names().last().unwrap(), "task.refused:refused");
    assert!(
        h.rec.all_text().contains("agent `bot` is decommissioned"),
        "{}",
        h.rec.all_text()
    );
    h.mgr.tick().await.unwrap();
    let t = h.mgr.store.get(&id).unwrap().unwrap();
    assert_ended(&t, "agent_retired");
    assert!(!h.pg.is_live(&id));
}

/// Black-box finding: starts racing a decommission passed the agent check
/// before the decision and were then issued credentials after it (they
/// ended, `agent_retired`, once issued). A start checks again once its
/// task is stored: decommissioned since, nothing is issued, and the task
/// ends for the decommission.
#[tokio::test(start_paused = true)]
async fn a_start_overtaken_by_a_decommission_issues_nothing() {
    let h = harness();
    h.pg.precheck_delay_s.store(5, Ordering::SeqCst);
    let mgr = h.mgr.clone();
    let start = tokio::spawn(async move { mgr.start(&caller("bot"), ask("low", None)).await });
    tokio::time::sleep(Duration::from_secs(1)).await;
    // What the decommission does (the daemon blocks starts before its
    // decision is stored).
    h.mgr.retire_agent("bot");
    let e = start.await.unwrap().unwrap_err();
    assert!(matches!(e, TaskError::AgentRetired(_)), "{e}");
    assert_eq!(h.pg.issues.load(Ordering::SeqCst), 0, "nothing issued");
    let tasks = h.mgr.store.list(Some("bot"), 10).unwrap();
    assert_eq!(tasks.len(), 1, "{tasks:?}");
    assert_ended(&tasks[0], "decommission");
    // Blocked starts stay refused, and unblocking (a decision that could
    // not be stored) lets them start again.
    let mgr = &h.mgr;
    let s = setup(&h.pg, &h.sts, &h.root);
    mgr.set_setup(s);
    assert!(matches!(
        h.start_err("low").await,
        TaskError::AgentRetired(_)
    ));
    mgr.unblock_starts("bot");
    h.pg.precheck_delay_s.store(0, Ordering::SeqCst);
    h.start("low", None).await;
}

/// Defect: a reload that narrowed a policy left the tasks it would now
/// refuse live, with their credentials, for their whole TTL. A task whose
/// level no longer grants an issuer it holds a credential of ends at once;
/// one longer than its level's new `max_ttl` ends when that has passed
/// since its start; the others are left alone.
#[tokio::test(start_paused = true)]
async fn a_reload_that_narrows_a_policy_ends_the_tasks_it_no_longer_allows() {
    let h = harness();
    let high = h.start("high", Some(3000)).await;
    let low = h.start("low", Some(600)).await;
    let short = h.start("low", Some(120)).await;
    let mut s = setup(&h.pg, &h.sts, &h.root);
    let p = s.policies.get_mut("invoicing").unwrap();
    p.levels.get_mut("high").unwrap().grants.remove("sts");
    p.levels.get_mut("low").unwrap().max_ttl = Duration::from_secs(300);
    h.mgr.set_setup(s);
    h.mgr.tick().await.unwrap();
    assert_ended(&h.mgr.store.get(&high).unwrap().unwrap(), "policy_changed");
    assert!(!h.pg.is_live(&high) && !h.sts.is_live(&high));
    for id in [&low, &short] {
        assert_eq!(h.mgr.store.get(id).unwrap().unwrap().state, TaskState::Live);
    }
    // The 10-minute task ends 5 minutes after its start, the 2-minute one
    // at its own end.
    tokio::time::sleep(Duration::from_secs(121)).await;
    h.mgr.tick().await.unwrap();
    assert_ended(&h.mgr.store.get(&short).unwrap().unwrap(), "ttl");
    assert_eq!(
        h.mgr.store.get(&low).unwrap().unwrap().state,
        TaskState::Live
    );
    tokio::time::sleep(Duration::from_secs(180)).await;
    h.mgr.tick().await.unwrap();
    assert_ended(&h.mgr.store.get(&low).unwrap().unwrap(), "policy_changed");
    assert!(!h.pg.is_live(&low));
    assert!(h.rec.all_text().contains("policy_changed"), "audited");
}

#[tokio::test(start_paused = true)]
async fn a_planted_agent_directory_is_refused() {
    let h = harness();
    // Someone else's directory (here: not a directory) where keyturn writes.
    std::fs::create_dir_all(&h.root).unwrap();
    std::os::unix::fs::symlink("/tmp", h.root.join("bot")).unwrap();
    let e = h
        .mgr
        .start(&caller("bot"), ask("low", None))
        .await
        .unwrap_err();
    assert!(matches!(e, TaskError::Deliver { .. }), "{e}");
    assert!(
        h.pg.live.lock().unwrap().is_empty(),
        "the credential outlived the failed start"
    );
}

#[tokio::test(start_paused = true)]
async fn metrics_show_active_credentials_results_and_overdue_revocations() {
    let pg = MemIssuer::new("pg");
    pg.fail_revoke.store(u32::MAX, Ordering::SeqCst);
    let h = harness_with(pg, MemIssuer::new("sts"));
    let metrics = Arc::new(crate::telemetry::Metrics::new());
    let mgr = TaskManager::new(
        TaskStore::open_inline(&h.state.join("metered")).unwrap(),
        setup(&h.pg, &h.sts, &h.root),
        h.rec.clone(),
        Arc::new(TokioClock::starting_at(Utc::now())),
    )
    .with_metrics(metrics.clone());
    let high = mgr
        .start(&caller("bot"), ask("high", Some(60)))
        .await
        .unwrap();
    mgr.start(&caller("bot"), ask("low", Some(600)))
        .await
        .unwrap();
    let f = mgr.figures().unwrap();
    assert_eq!(
        f.active,
        vec![
            ("bot".to_owned(), "pg".to_owned(), 2),
            ("bot".to_owned(), "sts".to_owned(), 1)
        ]
    );
    assert_eq!(f.revocation_overdue, 0);

    // Past the first task's TTL its pg role cannot be revoked: overdue,
    // and still counted active; its sts credential is revoked.
    tokio::time::advance(Duration::from_secs(61)).await;
    mgr.tick().await.unwrap();
    let f = mgr.figures().unwrap();
    assert_eq!(f.revocation_overdue, 1);
    assert_eq!(f.active, vec![("bot".to_owned(), "pg".to_owned(), 2)]);
    let text = metrics.encode();
    for line in [
        "keyturn_task_starts_total{issuer=\"pg\",result=\"ok\"} 2",
        "keyturn_task_starts_total{issuer=\"sts\",result=\"ok\"} 1",
        "keyturn_task_revocations_total{issuer=\"pg\",result=\"failed\"} 1",
        "keyturn_task_revocations_total{issuer=\"sts\",result=\"verified\"} 1",
    ] {
        assert!(text.contains(line), "missing {line:?} in\n{text}");
    }
    assert!(!text.contains(&high.task.task.task_id), "no task id label");

    // Once it can be revoked, nothing is overdue and the task's
    // credentials are no longer active.
    h.pg.fail_revoke.store(0, Ordering::SeqCst);
    tokio::time::advance(mgr.retry).await;
    mgr.tick().await.unwrap();
    let f = mgr.figures().unwrap();
    assert_eq!(f.revocation_overdue, 0);
    assert_eq!(f.active, vec![("bot".to_owned(), "pg".to_owned(), 1)]);
}

/// An issuer pointed at another system under a live task (an OpenBao
/// `address`, a postgres admin DSN): the new system does not know the
/// credential, which must not count as revoked. The task stays ending,
/// overdue once past its TTL, the item saying what to do, until the
/// issuer points back; then it is revoked where it was minted.
#[tokio::test(start_paused = true)]
async fn a_credential_is_revoked_only_at_the_system_that_minted_it() {
    let pg = MemIssuer::new("pg");
    pg.point_at("https://bao-a:8200");
    let h = harness_with(pg, MemIssuer::new("sts"));
    let id = h.start("low", Some(60)).await;
    let stored = h.mgr.store.get(&id).unwrap().unwrap();
    assert_eq!(
        stored.items[0].origin.as_deref(),
        Some("https://bao-a:8200")
    );

    h.pg.point_at("https://bao-b:8200");
    // The reload's warning (and `keyturn check`'s) names the task.
    let warned = h
        .mgr
        .stranded_by(&setup(&h.pg, &h.sts, &h.root))
        .await
        .unwrap();
    assert_eq!(warned.len(), 1, "{warned:?}");
    assert!(
        warned[0].contains(&id) && warned[0].contains("now reaches https://bao-b:8200"),
        "{warned:?}"
    );

    let t = h.mgr.end(&caller("bot"), &id).await.unwrap();
    assert!(
        h.pg.is_live(&id),
        "still works at the system that minted it"
    );
    assert_eq!(t.state, TaskState::Ending);
    assert_eq!(t.items[0].state, ItemState::Issued);
    let error = t.items[0].last_error.clone().unwrap();
    assert!(
        error.contains("issued at https://bao-a:8200")
            && error.contains("now reaches https://bao-b:8200")
            && error.contains("Point [issuers.pg] back at https://bao-a:8200"),
        "{error}"
    );
    assert_eq!(
        h.pg.revokes.load(Ordering::SeqCst),
        0,
        "nothing asked of the other system"
    );
    assert!(!h.rec.names().contains(&"task.revoked:ok".to_owned()));
    assert_eq!(h.rec.names().last().unwrap(), "task.revoke_failed:failed");
    // Past its TTL it is overdue, which alerts.
    tokio::time::advance(Duration::from_secs(61)).await;
    h.mgr.tick().await.unwrap();
    assert_eq!(h.mgr.figures().unwrap().revocation_overdue, 1);
    assert_eq!(h.state_of(&id), TaskState::Ending);

    // Pointed back: revoked where it was minted, verified, ended.
    h.pg.point_at("https://bao-a:8200");
    h.mgr.tick().await.unwrap();
    assert!(!h.pg.is_live(&id));
    let t = h.mgr.store.get(&id).unwrap().unwrap();
    assert_ended(&t, "end");
    assert_eq!(t.items[0].state, ItemState::Verified);
    assert!(
        h.mgr
            .stranded_by(&setup(&h.pg, &h.sts, &h.root))
            .await
            .unwrap()
            .is_empty()
    );
}

/// The issuer moves between the revocation and its verification: the
/// verification at the other system is not taken as proof.
#[tokio::test(start_paused = true)]
async fn a_revocation_is_not_verified_at_another_system() {
    let pg = MemIssuer::new("pg");
    pg.point_at("postgres db-a:5432");
    // The revocation fails once, so the task waits, revoked nowhere yet.
    pg.fail_revoke.store(1, Ordering::SeqCst);
    let h = harness_with(pg, MemIssuer::new("sts"));
    let id = h.start("low", None).await;
    h.mgr.end(&caller("bot"), &id).await.unwrap();
    assert_eq!(h.state_of(&id), TaskState::Ending);
    // Revoked at a, then moved to b before it is verified.
    let row = h.mgr.store.get(&id).unwrap().unwrap();
    h.pg.revoke(
        &row.task,
        None,
        SystemTime::now() + Duration::from_secs(3600),
    )
    .await
    .unwrap();
    h.mgr
        .store
        .set_item(&id, "pg", ItemState::Revoked, None, None, None)
        .await
        .unwrap();
    h.pg.point_at("postgres db-b:5432");
    h.mgr.tick().await.unwrap();
    let t = h.mgr.store.get(&id).unwrap().unwrap();
    assert_eq!(t.state, TaskState::Ending);
    assert_eq!(t.items[0].state, ItemState::Revoked, "not verified");
    assert!(
        t.items[0]
            .last_error
            .as_deref()
            .unwrap()
            .contains("now reaches postgres db-b:5432")
    );
    h.pg.point_at("postgres db-a:5432");
    h.mgr.tick().await.unwrap();
    assert_ended(&h.mgr.store.get(&id).unwrap().unwrap(), "end");
}

/// Defects (black-box): a reload removing the issuer of a credential that
/// can only expire said "add it back to revoke" (adding it back revokes
/// nothing); and a removed issuer of a revocable one left no audit record,
/// while a failing one wrote a record every few seconds.
#[tokio::test(start_paused = true)]
async fn a_removed_issuer_is_reported_only_where_adding_it_back_helps() {
    let h = harness_with(MemIssuer::expiring("pg"), MemIssuer::new("sts"));
    let id = h.start("high", None).await;
    let t = h.mgr.end(&caller("bot"), &id).await.unwrap();
    let pg_item = t.items.iter().find(|i| i.issuer == "pg").unwrap();
    assert_eq!(pg_item.state, ItemState::Expiring, "{t:?}");
    let mut s = setup(&h.pg, &h.sts, &h.root);
    s.issuers.remove("pg");
    let stranded = h.mgr.stranded_by(&s).await.unwrap();
    assert!(stranded.is_empty(), "{stranded:?}");
    h.mgr.set_setup(s);
    h.mgr.tick().await.unwrap();
    let t = h.mgr.store.get(&id).unwrap().unwrap();
    let pg_item = t.items.iter().find(|i| i.issuer == "pg").unwrap();
    assert!(
        !pg_item
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains("add it back")),
        "{pg_item:?}"
    );

    // A live task whose issuer is removed: audited once, not at every pass.
    h.mgr.set_setup(setup(&h.pg, &h.sts, &h.root));
    let live = h.start("low", None).await;
    let mut s = setup(&h.pg, &h.sts, &h.root);
    s.issuers.remove("pg");
    h.mgr.set_setup(s);
    let before = h.rec.names().len();
    h.mgr.end(&caller("bot"), &live).await.unwrap();
    for _ in 0..5 {
        h.mgr.tick().await.unwrap();
    }
    let failed: Vec<String> = h.rec.names()[before..]
        .iter()
        .filter(|n| *n == "task.revoke_failed:failed")
        .cloned()
        .collect();
    assert_eq!(failed.len(), 1, "{:?}", h.rec.names());
    assert!(
        h.rec
            .all_text()
            .contains("the issuer is no longer configured; add it back to revoke")
    );
}

/// `task_root` removed (or moved) by a reload under a live task: its files
/// are removed at its end from where they were written.
#[tokio::test(start_paused = true)]
async fn a_tasks_files_are_removed_where_they_were_written_after_task_root_changed() {
    let h = harness();
    let started = h.mgr.start(&caller("bot"), ask("low", None)).await.unwrap();
    let id = started.task.task.task_id.clone();
    let dir = started.dir.clone().unwrap();
    assert_eq!(started.task.dir.as_deref(), Some(dir.as_path()));
    assert!(dir.join("pg.json").exists());
    let mut s = setup(&h.pg, &h.sts, &h.root);
    s.task_root = None;
    h.mgr.set_setup(s);
    let t = h.mgr.end(&caller("bot"), &id).await.unwrap();
    assert_ended(&t, "end");
    assert!(!dir.exists(), "{} left behind", dir.display());

    // Another root now: the next task's files go there, and the first
    // root's are still removed at their task's end.
    let other = h.root.with_file_name("other-root");
    let mut s = setup(&h.pg, &h.sts, &h.root);
    s.task_root = Some(other.clone());
    h.mgr.set_setup(s);
    let second = h.mgr.start(&caller("bot"), ask("low", None)).await.unwrap();
    let second_dir = second.dir.unwrap();
    assert!(second_dir.starts_with(&other));
    h.mgr.set_setup(setup(&h.pg, &h.sts, &h.root));
    h.mgr
        .end(&caller("bot"), &second.task.task.task_id)
        .await
        .unwrap();
    assert!(!second_dir.exists());
}

/// A recorded directory that is not `<root>/<agent>/<task id>` (an altered
/// task store) is not removed: the task waits, and says why in the log.
#[test]
fn only_a_tasks_own_directory_is_removed() {
    let dir = tempfile::tempdir().unwrap();
    let task = TaskAttribution {
        task_id: "abc123".into(),
        agent: "bot".into(),
        tenant: "acme".into(),
        use_case: "m".into(),
        run_id: "r".into(),
        initiator: "i".into(),
        sensitivity: "low".into(),
    };
    let victim = dir.path().join("precious");
    std::fs::create_dir_all(victim.join("data")).unwrap();
    for recorded in [
        victim.clone(),
        dir.path().join("bot").join("other"),
        dir.path().join("nobot").join("abc123"),
        PathBuf::from("bot/abc123"),
    ] {
        let e = remove_task_dir(&recorded, &task).unwrap_err();
        assert!(e.contains("is not <task_root>/bot/abc123"), "{e}");
    }
    assert!(victim.join("data").exists());
    // The real one goes; a missing one is no error.
    let own = dir.path().join("bot").join("abc123");
    std::fs::create_dir_all(&own).unwrap();
    std::fs::write(own.join("pg.json"), "{}").unwrap();
    remove_task_dir(&own, &task).unwrap();
    assert!(!own.exists());
    remove_task_dir(&own, &task).unwrap();
}

/// A record's event, and what the task store said of its task when it was
/// written: the task's state, and each item's.
type Seen = (String, Option<TaskState>, Vec<ItemState>);

/// What the task store said of the task when each of its records was
/// written.
#[derive(Default)]
struct StoreAtRecord {
    mgr: std::sync::OnceLock<std::sync::Weak<TaskManager>>,
    seen: Mutex<Vec<Seen>>,
}

#[async_trait]
impl TaskRecorder for StoreAtRecord {
    async fn record(&self, event: AuditEvent) {
        let task: Option<String> = event
            .detail
            .as_deref()
            .and_then(|d| serde_json::from_str::<serde_json::Value>(d).ok())
            .and_then(|d| d["task"].as_str().map(str::to_owned));
        let row = self
            .mgr
            .get()
            .and_then(std::sync::Weak::upgrade)
            .zip(task)
            .and_then(|(m, t)| m.store.get(&t).ok().flatten());
        self.seen.lock().unwrap().push((
            event.event.clone(),
            row.as_ref().map(|r| r.state),
            row.map(|r| r.items.iter().map(|i| i.state).collect())
                .unwrap_or_default(),
        ));
    }
}

/// Black-box findings (kill -9 at the wrong moment): `task.end` was
/// audited as accepted before the end was stored, so a kill between left
/// a live task whose end the audit log had recorded; and an item was
/// stored as verified before its `task.revoked` record, so a kill between
/// left no record of that revocation, ever. The end is stored before its
/// record; a revocation is recorded before it is stored as verified (a
/// kill between verifies and records it again at the next start).
#[tokio::test]
async fn a_task_end_is_stored_before_it_is_audited_and_a_revocation_audited_before_it_is_stored() {
    let dir = tempfile::tempdir().unwrap();
    let (pg, sts) = (MemIssuer::new("pg"), MemIssuer::new("sts"));
    let rec = Arc::new(StoreAtRecord::default());
    let mgr = Arc::new(TaskManager::new(
        TaskStore::open_inline(&dir.path().join("state")).unwrap(),
        setup(&pg, &sts, &dir.path().join("tasks")),
        rec.clone(),
        Arc::new(TokioClock::starting_at(Utc::now())),
    ));
    let _ = rec.mgr.set(Arc::downgrade(&mgr));
    let id = mgr
        .start(&caller("bot"), ask("low", None))
        .await
        .unwrap()
        .task
        .task
        .task_id;
    let ended = mgr.end(&caller("bot"), &id).await.unwrap();
    assert_eq!(ended.state, TaskState::Ended);
    let seen = rec.seen.lock().unwrap().clone();
    let at = |event: &str| {
        seen.iter()
            .find(|(e, ..)| e == event)
            .unwrap_or_else(|| panic!("no {event}: {seen:?}"))
            .clone()
    };
    let (_, state, _) = at("task.end");
    assert_eq!(state, Some(TaskState::Ending), "{seen:?}");
    let (_, _, items) = at("task.revoked");
    assert!(
        !items.contains(&ItemState::Verified),
        "stored as verified before its record: {seen:?}"
    );
}
