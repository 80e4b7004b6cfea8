//! The SQL keyturn runs at the server for a task's role: constant text
//! (nothing secret is ever part of a statement; values travel as bind
//! parameters), as session functions made once per pooled admin connection
//! or, where the admin may not make them, as `DO` blocks.

/// What a grant's roles must pass at the server, as PL/pgSQL statements
/// over `wanted` (the grant's roles, `text[]`), with `too_strong text` and
/// `missing text` declared: every role exists, and none reaches (through
/// memberships) a role a member can SET ROLE to that is a superuser,
/// CREATEROLE, REPLICATION or BYPASSRLS, or has the server's files or
/// programs. Run at every issuance ([`issue_body`]) and by `keyturn check
/// --online` ([`GRANT_CHECK_DO`]): one text, so the check refuses exactly
/// what a start would.
macro_rules! grant_checks {
    () => {
        "missing := (SELECT string_agg(quote_ident(w), ', ') FROM unnest(wanted) w \
        WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = w)); \
    IF missing IS NOT NULL THEN \
        RAISE EXCEPTION 'role % of the grant does not exist: create it, or fix the policy''s grant', missing \
            USING ERRCODE = 'undefined_object'; \
    END IF; \
    too_strong := ( \
        WITH RECURSIVE up(oid) AS ( \
            SELECT oid FROM pg_roles WHERE rolname = ANY (wanted) \
            UNION SELECT m.roleid FROM pg_auth_members m JOIN up ON m.member = up.oid) \
        SELECT string_agg(DISTINCT quote_ident(p.rolname), ', ') FROM pg_roles p JOIN up USING (oid) \
        WHERE p.rolsuper OR p.rolcreaterole OR p.rolreplication OR p.rolbypassrls \
           OR p.rolname IN ('pg_execute_server_program', 'pg_read_server_files', 'pg_write_server_files')); \
    IF too_strong IS NOT NULL THEN \
        RAISE EXCEPTION 'the grant reaches %, which a member can SET ROLE to: a superuser, CREATEROLE, REPLICATION or BYPASSRLS role, or one with the server''s files or programs', too_strong \
            USING ERRCODE = 'invalid_parameter_value'; \
    END IF; "
    };
}

/// The declarations [`grant_checks`] needs, `wanted` from the session
/// setting `keyturn.roles` (a JSON array).
macro_rules! grant_vars {
    () => {
        "wanted text[] := ARRAY(SELECT json_array_elements_text(current_setting('keyturn.roles')::json)); \
    too_strong text; \
    missing text; "
    };
}

/// The body of what makes, for the role named by the session settings
/// `keyturn.*` (set from bind parameters in the same transaction),
/// everything a task role is: created when `keyturn.create` is `on` (in one
/// `CREATE ROLE ... IN ROLE`; a role that appeared meanwhile fails the
/// transaction with `duplicate_object`), else altered: LOGIN with the
/// verifier and expiry, member of exactly the roles in the JSON array
/// `keyturn.roles`; then the comment and `application_name`. Constant
/// text: nothing secret is in any statement tokio-postgres or the server
/// may log; the statements `format` builds with the verifier re-raise
/// their errors without their text (the server logs a failed statement's
/// text as the error's context). The same body runs as the session function
/// `pg_temp.keyturn_task_issue()` ([`SESSION`]: compiled and planned once
/// per pooled connection) or, where the admin may not make temporary
/// objects, as a `DO` block ([`ISSUE_DO`], compiled at each call).
macro_rules! issue_body {
    () => {
        concat!(
            "DECLARE \
    r text := current_setting('keyturn.role'); \
    g text; ",
            grant_vars!(),
            "BEGIN ",
            grant_checks!(),
            "IF current_setting('keyturn.create') = 'on' THEN \
        BEGIN \
        EXECUTE format('CREATE ROLE %I WITH LOGIN INHERIT CONNECTION LIMIT %s PASSWORD %L VALID UNTIL %L%s', \
            r, current_setting('keyturn.limit')::int, current_setting('keyturn.verifier'), \
            current_setting('keyturn.until'), \
            (SELECT coalesce(' IN ROLE ' || string_agg(quote_ident(w), ', '), '') FROM unnest(wanted) w)); \
        EXCEPTION WHEN OTHERS THEN \
            RAISE EXCEPTION USING ERRCODE = SQLSTATE, MESSAGE = SQLERRM; \
        END; \
    ELSE \
        BEGIN \
        EXECUTE format('ALTER ROLE %I WITH LOGIN INHERIT CONNECTION LIMIT %s PASSWORD %L VALID UNTIL %L', \
            r, current_setting('keyturn.limit')::int, current_setting('keyturn.verifier'), \
            current_setting('keyturn.until')); \
        EXCEPTION WHEN OTHERS THEN \
            RAISE EXCEPTION USING ERRCODE = SQLSTATE, MESSAGE = SQLERRM; \
        END; \
        FOR g IN SELECT b.rolname FROM pg_auth_members m \
                 JOIN pg_roles b ON b.oid = m.roleid JOIN pg_roles t ON t.oid = m.member \
                 WHERE t.rolname = r AND b.rolname <> ALL (wanted) LOOP \
            EXECUTE format('REVOKE %I FROM %I', g, r); \
        END LOOP; \
        FOREACH g IN ARRAY wanted LOOP \
            IF NOT EXISTS (SELECT 1 FROM pg_auth_members m \
                           JOIN pg_roles b ON b.oid = m.roleid JOIN pg_roles t ON t.oid = m.member \
                           WHERE t.rolname = r AND b.rolname = g) THEN \
                EXECUTE format('GRANT %I TO %I', g, r); \
            END IF; \
        END LOOP; \
    END IF; \
    EXECUTE format('COMMENT ON ROLE %I IS %L', r, current_setting('keyturn.comment')); \
    EXECUTE format('ALTER ROLE %I SET application_name = %L', r, current_setting('keyturn.app')); \
END"
        )
    };
}

/// [`grant_checks`] alone, as an anonymous block: `keyturn check --online`
/// runs it in a transaction it rolls back.
pub(super) const GRANT_CHECK_DO: &str = concat!(
    "DO $keyturn$ DECLARE ",
    grant_vars!(),
    "BEGIN ",
    grant_checks!(),
    "END $keyturn$"
);

/// [`issue_body`] as an anonymous block: where the admin may not make the
/// session functions.
pub(super) const ISSUE_DO: &str = concat!("DO $keyturn$ ", issue_body!(), " $keyturn$");

/// Made once per pooled admin connection
/// ([`AdminConn::session`](crate::targets::postgres::pool::AdminConn::session)),
/// in its own `pg_temp` schema (gone with the session; no other role can make or
/// change objects there), so that PostgreSQL compiles them and plans their
/// queries once per session, not at each task:
/// - `keyturn_task_issue(role, create, verifier, until, limit, roles,
///   comment, app)`: sets the `keyturn.*` settings (transaction-local) from
///   its arguments, then runs [`issue_body`]: one statement, its own
///   transaction;
/// - `keyturn_task_mark(comment, task)`: whether a role's comment carries
///   keyturn's mark for `task`: it starts as keyturn writes it (the fast
///   path), or it is JSON with the mark, as [`foreign`](super::foreign)
///   decides;
/// - `keyturn_task_disable(role, task)`: `NOLOGIN PASSWORD NULL` on the
///   task's role; `absent`, `foreign` (left alone) or `disabled`;
/// - `keyturn_task_drop(role, task, wait_ms)`: for a task role that cannot
///   log in, ends its sessions (waiting up to `wait_ms` for each to exit,
///   PostgreSQL 14 and later) and, when none is left, drops it: `(state,
///   terminated, alive)`, state `absent`, `foreign`, `enabled` (still
///   LOGIN: not touched), `alive` (sessions outlived the wait: not dropped)
///   or `dropped`. A role that still owns objects fails it with
///   `dependent_objects_still_exist`.
///
/// `disable` and `drop` are two statements, so that `NOLOGIN` is committed
/// before the sessions are ended and none can come back.
pub(super) const SESSION: &str = concat!(
    "CREATE OR REPLACE FUNCTION pg_temp.keyturn_task_issue(p_role text, p_create text, \
        p_verifier text, p_until text, p_limit text, p_roles text, p_comment text, p_app text) \
    RETURNS void LANGUAGE plpgsql AS $keyturn$ \
BEGIN \
    PERFORM set_config('keyturn.role', p_role, true), set_config('keyturn.create', p_create, true), \
        set_config('keyturn.verifier', p_verifier, true), set_config('keyturn.until', p_until, true), \
        set_config('keyturn.limit', p_limit, true), set_config('keyturn.roles', p_roles, true), \
        set_config('keyturn.comment', p_comment, true), set_config('keyturn.app', p_app, true); \
    ",
    issue_body!(),
    "; \
END $keyturn$; \
CREATE OR REPLACE FUNCTION pg_temp.keyturn_task_mark(c text, task text) RETURNS boolean \
LANGUAGE plpgsql AS $keyturn$ \
DECLARE v json; \
BEGIN \
    IF c IS NULL THEN RETURN false; END IF; \
    IF starts_with(c, '{\"keyturn\":\"task\",\"task_id\":' || to_json(task)::text || ',') THEN \
        RETURN true; \
    END IF; \
    BEGIN v := c::json; EXCEPTION WHEN others THEN RETURN false; END; \
    RETURN coalesce(json_typeof(v) = 'object' \
        AND json_typeof(v->'keyturn') = 'string' AND v->>'keyturn' = 'task' \
        AND json_typeof(v->'task_id') = 'string' AND v->>'task_id' = task, false); \
END $keyturn$; \
CREATE OR REPLACE FUNCTION pg_temp.keyturn_task_disable(r text, task text) RETURNS text \
LANGUAGE plpgsql AS $keyturn$ \
DECLARE c text; \
BEGIN \
    SELECT shobj_description(oid, 'pg_authid') INTO c FROM pg_roles WHERE rolname = r; \
    IF NOT FOUND THEN RETURN 'absent'; END IF; \
    IF NOT pg_temp.keyturn_task_mark(c, task) THEN RETURN 'foreign'; END IF; \
    EXECUTE format('ALTER ROLE %I WITH NOLOGIN PASSWORD NULL', r); \
    RETURN 'disabled'; \
END $keyturn$; \
CREATE OR REPLACE FUNCTION pg_temp.keyturn_task_drop(r text, task text, wait_ms bigint, \
    OUT state text, OUT terminated int, OUT alive int) \
LANGUAGE plpgsql AS $keyturn$ \
DECLARE o oid; c text; login boolean; p int; \
    waits boolean := current_setting('server_version_num')::int >= 140000; \
BEGIN \
    terminated := 0; alive := 0; \
    SELECT oid, shobj_description(oid, 'pg_authid'), rolcanlogin INTO o, c, login \
        FROM pg_roles WHERE rolname = r; \
    IF NOT FOUND THEN state := 'absent'; RETURN; END IF; \
    IF NOT pg_temp.keyturn_task_mark(c, task) THEN state := 'foreign'; RETURN; END IF; \
    IF login THEN state := 'enabled'; RETURN; END IF; \
    FOR p IN SELECT a.pid FROM pg_stat_activity a \
             WHERE a.usesysid = o AND a.pid <> pg_backend_pid() LOOP \
        terminated := terminated + 1; \
        IF waits THEN \
            IF NOT pg_terminate_backend(p, wait_ms) THEN alive := alive + 1; END IF; \
        ELSE \
            PERFORM pg_terminate_backend(p); \
        END IF; \
    END LOOP; \
    IF alive > 0 THEN state := 'alive'; RETURN; END IF; \
    EXECUTE format('DROP ROLE %I', r); \
    state := 'dropped'; \
END $keyturn$"
);
