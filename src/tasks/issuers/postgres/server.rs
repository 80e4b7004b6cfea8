//! The issuer's steps on one leased admin connection: issue (create or
//! alter the role), revoke (disable, end its sessions, drop it, or strip
//! what it may do when it cannot be dropped), verify, find a task's role
//! without its handle, and check a grant at the server.

use super::*;

impl PgIssuer {
    /// Issues on `conn`: first as a new role (the task's role, named after
    /// a fresh task id, almost never exists: one round trip); when it does
    /// exist (issuing again, or someone else's), checks keyturn's mark and
    /// alters it.
    pub(super) async fn issue_on(
        &self,
        conn: &AdminConn,
        role: &str,
        settings: &IssueSettings<'_>,
        ctx: &str,
    ) -> Result<(), PluginError> {
        let fail = |e: tokio_postgres::Error| {
            conn.error(ctx, &e, &[settings.password, settings.verifier.as_bytes()])
        };
        match run_issue(conn, role, settings, true).await {
            Err(e) if e.code() == Some(&SqlState::DUPLICATE_OBJECT) => {}
            other => return other.map_err(fail),
        }
        let create = match role_comment(conn, role, ctx).await? {
            // Dropped meanwhile.
            None => true,
            Some(row) => {
                foreign(row.get(0), settings.task_id, role, ctx)?;
                false
            }
        };
        run_issue(conn, role, settings, create).await.map_err(fail)
    }

    pub(super) async fn revoke_on(
        &self,
        conn: &AdminConn,
        role: &str,
        task: &TaskAttribution,
        ctx: &str,
    ) -> Result<Revoked, PluginError> {
        let functions = conn
            .session(SESSION)
            .await
            .map_err(|e| conn.error(ctx, &e, &[]))?;
        let q = quote_ident(role);
        let (terminated, mut dropped) = if functions {
            let Some(done) = self.disable_and_drop(conn, role, task, ctx).await? else {
                return Ok(Revoked::Now);
            };
            done
        } else {
            let Some(row) = role_comment(conn, role, ctx).await? else {
                return Ok(Revoked::Now);
            };
            foreign(row.get(0), &task.task_id, role, ctx)?;
            // NOLOGIN first, so the sessions ended next cannot come back.
            conn.client
                .batch_execute(&format!("ALTER ROLE {q} WITH NOLOGIN PASSWORD NULL"))
                .await
                .map_err(|e| conn.error(ctx, &e, &[]))?;
            let terminated =
                terminate_sessions(conn, &[role.to_owned()], self.admin.connect_timeout, ctx)
                    .await?;
            // Most task roles own nothing: try the plain drop first, as it
            // needs no more than CREATEROLE.
            let dropped = conn.client.batch_execute(&format!("DROP ROLE {q}")).await;
            (Some(terminated), dropped)
        };
        if let Err(e) = &dropped
            && e.code() == Some(&SqlState::DEPENDENT_OBJECTS_STILL_EXIST)
        {
            dropped = drop_owned_and_role(conn, role).await;
        }
        // Still owning something: in other databases (the issuer's
        // `database`, or any the role could log into and create in).
        if let Err(e) = &dropped
            && e.code() == Some(&SqlState::DEPENDENT_OBJECTS_STILL_EXIST)
        {
            self.drop_owned_elsewhere(conn, role, ctx).await?;
            dropped = drop_owned_and_role(conn, role).await;
        }
        match dropped {
            Ok(()) => {
                tracing::info!(task = %task.task_id, role, terminated, "postgres task role dropped");
            }
            // The server refused (objects in another database, or another
            // role's objects depend on the task's): the role can no longer
            // be used, and stays, with no membership left, so that what it
            // still owns acts with nothing but that.
            Err(e) if e.as_db_error().is_some() => {
                let e = conn.error(ctx, &e, &[]);
                leave_no_membership(conn, role, ctx).await?;
                tracing::warn!(
                    task = %task.task_id, role, terminated, error = %e,
                    "postgres task role disabled (NOLOGIN, no password, no session, no membership) but not dropped"
                );
                // Black-box finding: only this log line said so; the item
                // and the audit record read as a clean revocation.
                return Ok(Revoked::Left(format!(
                    "role {role} disabled (NOLOGIN, no password, no session, no membership) but not dropped: {}; what it owns is still there: REASSIGN OWNED BY {role} TO <owner>; DROP OWNED BY {role}; DROP ROLE {role}",
                    e.message
                )));
            }
            Err(e) => return Err(conn.error(ctx, &e, &[])),
        }
        Ok(Revoked::Now)
    }

    /// `DROP OWNED BY role` in every other database where the role owns
    /// objects or holds privileges (`pg_shdepend`, the cluster's catalog of
    /// them), each over a connection of its own: `DROP OWNED` acts in the
    /// database it runs in only. The admin becomes a member of the role
    /// first when it is not one (the `DROP ROLE` that follows ends that).
    async fn drop_owned_elsewhere(
        &self,
        conn: &AdminConn,
        role: &str,
        ctx: &str,
    ) -> Result<(), PluginError> {
        let q = quote_ident(role);
        let databases: Vec<String> = async {
            let rows = conn
                .client
                .query(
                    "SELECT DISTINCT d.datname::text FROM pg_shdepend s \
                     JOIN pg_database d ON d.oid = s.dbid \
                     WHERE s.refclassid = 'pg_authid'::regclass \
                     AND s.refobjid = (SELECT oid FROM pg_roles WHERE rolname = $1) \
                     AND d.datname <> current_database() AND d.datallowconn",
                    &[&role],
                )
                .await?;
            let member: bool = conn
                .client
                .query_one("SELECT pg_has_role($1, 'USAGE')", &[&role])
                .await?
                .get(0);
            if !member && !rows.is_empty() {
                conn.client
                    .batch_execute(&format!("GRANT {q} TO CURRENT_USER"))
                    .await?;
            }
            Ok::<_, tokio_postgres::Error>(rows.iter().map(|r| r.get(0)).collect())
        }
        .await
        .map_err(|e| conn.error(ctx, &e, &[]))?;
        for db in databases {
            let (client, connection) = self
                .admin
                .connect_to_database(&self.describe(), "revoke", &db)
                .await?;
            let done = client.batch_execute(&format!("DROP OWNED BY {q}")).await;
            drop(client);
            let _ = connection.await;
            done.map_err(|e| {
                crate::targets::postgres::pg_error(
                    &format!("{ctx}: DROP OWNED in database {db:?}"),
                    &e,
                    &[],
                )
            })?;
            tracing::info!(task_role = role, database = %db, "dropped what the task role owned in another database");
        }
        Ok(())
    }

    /// `keyturn_task_disable` then `keyturn_task_drop` ([`SESSION`]),
    /// pipelined: one round trip. `None`: the role does not exist (revoked);
    /// else the sessions ended (when known) and the drop's outcome, for
    /// [`Self::revoke_on`] to finish.
    async fn disable_and_drop(
        &self,
        conn: &AdminConn,
        role: &str,
        task: &TaskAttribution,
        ctx: &str,
    ) -> Result<Option<(Option<usize>, Result<(), tokio_postgres::Error>)>, PluginError> {
        let (disable, drop) = async {
            let disable = conn
                .prepared("SELECT pg_temp.keyturn_task_disable($1, $2)")
                .await?;
            let drop = conn
                .prepared(
                    "SELECT state, terminated, alive FROM pg_temp.keyturn_task_drop($1, $2, $3)",
                )
                .await?;
            Ok((disable, drop))
        }
        .await
        .map_err(|e: tokio_postgres::Error| conn.error(ctx, &e, &[]))?;
        let wait_ms = i64::try_from(self.admin.connect_timeout.as_millis()).unwrap_or(i64::MAX);
        let disable_params: [&(dyn ToSql + Sync); 2] = [&role, &task.task_id];
        let drop_params: [&(dyn ToSql + Sync); 3] = [&role, &task.task_id, &wait_ms];
        let (disabled, ended) = tokio::join!(
            conn.client.query_one(&disable, &disable_params),
            conn.client.query_one(&drop, &drop_params),
        );
        let disabled: String = disabled.map_err(|e| conn.error(ctx, &e, &[]))?.get(0);
        match disabled.as_str() {
            "absent" => return Ok(None),
            "foreign" => return Err(foreign_role(&task.task_id, role, ctx)),
            _ => {}
        }
        let row = match ended {
            Ok(row) => row,
            // The sessions were ended (that is not undone), the drop failed.
            Err(e) if e.as_db_error().is_some() => return Ok(Some((None, Err(e)))),
            Err(e) => return Err(conn.error(ctx, &e, &[])),
        };
        let (state, terminated, alive): (String, i32, i32) = (row.get(0), row.get(1), row.get(2));
        match state.as_str() {
            "dropped" => Ok(Some((usize::try_from(terminated).ok(), Ok(())))),
            "absent" => Ok(None),
            "alive" => Err(PluginError::new(
                ErrorKind::Transient,
                format!(
                    "{ctx}: {alive} session(s) of {role:?} still alive after pg_terminate_backend"
                ),
            )),
            // Changed between the two statements (its mark, or LOGIN
            // given back): the next attempt looks again.
            other => Err(PluginError::new(
                ErrorKind::Transient,
                format!(
                    "{ctx}: role {role:?} changed while it was being revoked ({other}); trying again"
                ),
            )),
        }
    }

    pub(super) async fn verify_on(
        &self,
        conn: &AdminConn,
        role: &str,
        task: &TaskAttribution,
        ctx: &str,
    ) -> Result<bool, PluginError> {
        const SQL: &str = "SELECT r.rolcanlogin AND (r.rolvaliduntil IS NULL OR r.rolvaliduntil > now()), \
                    shobj_description(r.oid, 'pg_authid'), \
                    (SELECT count(*) FROM pg_stat_activity a WHERE a.usesysid = r.oid) \
             FROM pg_roles r WHERE r.rolname = $1";
        let row = async {
            let sql = conn.prepared(SQL).await?;
            conn.client.query_opt(&sql, &[&role]).await
        }
        .await
        .map_err(|e| conn.error(ctx, &e, &[]))?;
        let Some(row) = row else { return Ok(true) };
        foreign(row.get(1), &task.task_id, role, ctx)?;
        let can_log_in: bool = row.get(0);
        let sessions: i64 = row.get(2);
        Ok(!can_log_in && sessions == 0)
    }
    /// The role to revoke or verify: `role`, the recorded handle's. Without
    /// a handle (keyturn died between the mint and its record) `role` is
    /// named after the task under today's `role_prefix`, which may have
    /// changed since: the role of the task is then the one among the
    /// server's roles named `<a role_prefix><task id>` that carries
    /// keyturn's mark for this task (`role` when there is none: it is
    /// absent, so revoked).
    pub(super) async fn role_on(
        &self,
        conn: &AdminConn,
        task: &TaskAttribution,
        handle: Option<&str>,
        role: &str,
        ctx: &str,
    ) -> Result<String, PluginError> {
        // The task id is lowercase letters and digits (`role_of`): no
        // pattern character of LIKE.
        const SQL: &str = "SELECT rolname, shobj_description(oid, 'pg_authid') \
                           FROM pg_roles WHERE rolname LIKE '%' || $1";
        if handle.is_some() {
            return Ok(role.to_owned());
        }
        let rows = async {
            let sql = conn.prepared(SQL).await?;
            conn.client.query(&sql, &[&task.task_id]).await
        }
        .await
        .map_err(|e| conn.error(ctx, &e, &[]))?;
        let mut ours: Vec<String> = rows
            .into_iter()
            .map(|r| (r.get::<_, String>(0), r.get::<_, Option<String>>(1)))
            .filter(|(name, comment)| {
                name.strip_suffix(task.task_id.as_str())
                    .is_some_and(|prefix| prefix_problem(prefix).is_none())
                    && foreign(comment.clone(), &task.task_id, name, ctx).is_ok()
            })
            .map(|(name, _)| name)
            .collect();
        match ours.len() {
            0 => Ok(role.to_owned()),
            1 => Ok(ours.remove(0)),
            _ => Err(PluginError::new(
                ErrorKind::Invalid,
                format!(
                    "{ctx}: several roles carry keyturn's mark for task {} ({}); revoke them by hand",
                    task.task_id,
                    ours.join(", ")
                ),
            )),
        }
    }

    /// The task's role (see [`PgIssuer::role_for`]), the message context of
    /// `doing` to it, and an admin connection leased for `step`: what
    /// `revoke` and `verify_revoked` start with.
    pub(super) async fn role_and_lease(
        &self,
        task: &TaskAttribution,
        handle: Option<&str>,
        doing: &str,
        step: &str,
    ) -> Result<(String, String, Lease), PluginError> {
        let role = self.role_for(task, handle)?;
        let ctx = format!(
            "{}: {doing} task {} (role {role:?})",
            self.describe(),
            task.task_id
        );
        let conn = self.admin.lease(&self.describe(), step).await?;
        Ok((role, ctx, conn))
    }
}

/// Drops, in one transaction, what the disabled task role `role` owns in
/// the admin DSN's database and the privileges granted to it there (`DROP
/// OWNED`), then the role. Nothing the task made is kept: handed to the
/// admin, a `SECURITY DEFINER` function or a view the task planted would
/// act with the admin's privileges for anyone; handed to any one role
/// kept for the purpose, with those of every other task's objects. An
/// admin without the privileges of the role (`CREATEROLE` but no
/// superuser) makes itself a member for the transaction: `DROP OWNED`
/// needs that, and `DROP ROLE` takes the membership away again.
async fn drop_owned_and_role(conn: &AdminConn, role: &str) -> Result<(), tokio_postgres::Error> {
    let client = &conn.client;
    let q = quote_ident(role);
    let has_privileges: bool = client
        .query_one("SELECT pg_has_role($1, 'USAGE')", &[&role])
        .await?
        .get(0);
    let member = if has_privileges {
        String::new()
    } else {
        format!("GRANT {q} TO CURRENT_USER; ")
    };
    let dropped = client
        .batch_execute(&format!(
            "BEGIN; {member}DROP OWNED BY {q}; DROP ROLE {q}; COMMIT"
        ))
        .await;
    if dropped.as_ref().is_err_and(|e| e.as_db_error().is_some()) {
        // Leave the failed transaction: the session goes back to the pool
        // idle.
        let _ = client.batch_execute("ROLLBACK").await;
    }
    dropped
}

/// Revokes every role `role` is a member of: a task role that has to stay
/// keeps no privilege of its grant.
async fn leave_no_membership(conn: &AdminConn, role: &str, ctx: &str) -> Result<(), PluginError> {
    let revoke = async {
        let rows = conn
            .client
            .query(
                "SELECT b.rolname::text FROM pg_auth_members m \
                 JOIN pg_roles b ON b.oid = m.roleid JOIN pg_roles t ON t.oid = m.member \
                 WHERE t.rolname = $1",
                &[&role],
            )
            .await?;
        let q = quote_ident(role);
        let mut sql = String::new();
        for row in &rows {
            let granted: String = row.get(0);
            let _ = write!(sql, "REVOKE {} FROM {q}; ", quote_ident(&granted));
        }
        if sql.is_empty() {
            return Ok(());
        }
        conn.client.batch_execute(&sql).await
    };
    revoke.await.map_err(|e| conn.error(ctx, &e, &[]))
}

/// One attempt at the issuance, in one transaction: a call of the session
/// function (one statement), or, without it, the settings and the `DO`
/// block between BEGIN and COMMIT, pipelined (one round trip; on an error
/// the rest is rejected and COMMIT rolls back, so the pooled session is
/// idle again, and the settings, transaction-local, are gone). `create`:
/// as a new role.
async fn run_issue(
    conn: &AdminConn,
    role: &str,
    settings: &IssueSettings<'_>,
    create: bool,
) -> Result<(), tokio_postgres::Error> {
    let client = &conn.client;
    let create = if create { "on" } else { "off" };
    let hidden = Hidden(settings.verifier);
    let params: [&(dyn ToSql + Sync); 8] = [
        &role,
        &create,
        &hidden,
        &settings.until,
        &settings.limit,
        &settings.roles,
        &settings.comment,
        &settings.app,
    ];
    if conn.session(SESSION).await? {
        let call = conn
            .prepared("SELECT pg_temp.keyturn_task_issue($1, $2, $3, $4, $5, $6, $7, $8)")
            .await?;
        return client.execute(&call, &params).await.map(drop);
    }
    let set = conn
        .prepared(
            "SELECT set_config('keyturn.role', $1, true), \
                    set_config('keyturn.create', $2, true), \
                    set_config('keyturn.verifier', $3, true), \
                    set_config('keyturn.until', $4, true), \
                    set_config('keyturn.limit', $5, true), \
                    set_config('keyturn.roles', $6, true), \
                    set_config('keyturn.comment', $7, true), \
                    set_config('keyturn.app', $8, true)",
        )
        .await?;
    let (begin, set, run, commit) = tokio::join!(
        client.batch_execute("BEGIN"),
        client.execute(&set, &params),
        client.batch_execute(ISSUE_DO),
        client.batch_execute("COMMIT"),
    );
    begin?;
    set?;
    run?;
    commit
}

/// [`GRANT_CHECK_DO`] for `roles` (a JSON array) in a transaction rolled
/// back, pipelined like [`run_issue`].
pub(super) async fn check_grant_on(
    conn: &AdminConn,
    roles: &str,
) -> Result<(), tokio_postgres::Error> {
    let client = &conn.client;
    let set = conn
        .prepared("SELECT set_config('keyturn.roles', $1, true)")
        .await?;
    let params: [&(dyn ToSql + Sync); 1] = [&roles];
    let (begin, set, run, rollback) = tokio::join!(
        client.batch_execute("BEGIN"),
        client.execute(&set, &params),
        client.batch_execute(GRANT_CHECK_DO),
        client.batch_execute("ROLLBACK"),
    );
    begin?;
    set?;
    run?;
    rollback
}
