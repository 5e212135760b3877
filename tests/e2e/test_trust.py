"""The trust boundary of SECURITY.md, attacked. Each test is one threat of the threat model, tried the way a
reviewer with an ordinary login role would try it, against a real cluster, real roles and the worker:

- least privilege: the workers connect as an ordinary role, and the launcher says when they do not;
- owners' code is sandboxed: a tracked table's owner tries to become superuser (or another role) through the
  worker and through a superuser's fhir_preview - settings that outlive the call, operators planted ahead on
  a path, SET SESSION AUTHORIZATION, a mapping function swapped after tracking;
- no role can stall delivery: advisory locks, a DROP DATABASE it may not run, a lock on a tracked table, rows
  whose reading fails or sleeps;
- a hostile server: a gzip bomb, ids that would steer a URL, a token that never expires, credentials over
  plain http.
"""
from __future__ import annotations

import gzip
import threading
import time


import psycopg
import pytest

from fhirsync import DB, MRN, WORKER_ROLE, eventually, make_app
from harness.faults import FaultServer
from psycopg.types.json import Json
from harness.util import wait_until
from jepsen import worker_pids
from test_security import HTTP_AUTH, connect_as, denied, reload_and_wait, secret_file, worker_log

OLD_CLAIM_LOCK_KEY = 0x6668_6972_5F73_796E     # the advisory lock key fhir_sync 0.1.0 claimed under


def rolsuper(app, role: str) -> bool:
    return app.one("SELECT rolsuper FROM pg_roles WHERE rolname = %s", (role,))


def make_owner(app, name: str = "appowner") -> psycopg.Connection:
    """An ordinary role that owns tables of its own in the app database, and a schema to plant things in."""
    app.sql(f"CREATE ROLE {name} LOGIN")
    app.sql(f"GRANT CREATE ON SCHEMA public TO {name}")
    app.sql(f"GRANT CREATE ON DATABASE {DB} TO {name}")
    return connect_as(app.cluster, name)


def plant_traps(owner, role: str = "appowner") -> None:
    """Operators = for bigint and text in a schema of the owner's: whoever runs one tries to make the owner
    superuser and records who it was. A statement of fhir_sync that resolved `=` through this schema would
    run it."""
    owner.execute("CREATE SCHEMA trap")
    owner.execute("CREATE TABLE trap.calls (who name, at timestamptz DEFAULT now())")
    owner.execute("GRANT INSERT ON trap.calls TO PUBLIC")
    owner.execute("GRANT USAGE ON SCHEMA trap TO PUBLIC")
    for ty in ("bigint", "text"):
        owner.execute(f"""CREATE FUNCTION trap.eq(a {ty}, b {ty}) RETURNS boolean LANGUAGE plpgsql AS $$
            BEGIN
                INSERT INTO trap.calls (who) VALUES (current_user);
                BEGIN
                    EXECUTE 'ALTER ROLE {role} SUPERUSER';
                EXCEPTION WHEN OTHERS THEN NULL;
                END;
                RETURN a OPERATOR(pg_catalog.=) b;
            END $$""")
        owner.execute(f"CREATE OPERATOR trap.= (LEFTARG = {ty}, RIGHTARG = {ty}, FUNCTION = trap.eq)")


def foreign_trap_calls(app, role: str = "appowner") -> int:
    return app.one("SELECT count(*) FROM trap.calls WHERE who <> %s", (role,))


def basic_texts(faults) -> set[str]:
    return {it["resource"].get("code", {}).get("text") for (t, _), it in faults.store.items.items() if t == "Basic"}


# ------------------------------------------------------------------------------------------ least privilege
@pytest.mark.e2e
def test_the_workers_connect_as_the_configured_ordinary_role_with_no_right_on_tracked_tables(make_cluster, faults):
    app = make_app(make_cluster, faults.base_url)
    pid = eventually(app.worker_pid, message="a worker")
    assert app.one("SELECT usename FROM pg_stat_activity WHERE pid = %s", (pid,)) == WORKER_ROLE
    assert rolsuper(app, WORKER_ROLE) is False
    # What fhir_sync_grant_worker gave it (at CREATE EXTENSION): its own tables, nothing on the tracked ones;
    # it reads those as their owners.
    assert app.one("SELECT has_table_privilege(%s, 'fhir_outbox', 'UPDATE')", (WORKER_ROLE,))
    assert not app.one("SELECT has_table_privilege(%s, 'patient', 'SELECT')", (WORKER_ROLE,))
    pid_row = app.add_patient("least-privilege")
    app.sql("INSERT INTO form (patient_id, name, encounter_date) VALUES (%s, 'visit', now())", (pid_row,))
    app.wait_drained()
    assert app.one("SELECT count(*) FROM fhir_dlq") == 0
    assert faults.store.find("Patient", f"{MRN}|least-privilege")
    assert f'connect as role "{WORKER_ROLE}"' in worker_log(app.cluster)


@pytest.mark.e2e
def test_the_launcher_warns_about_a_superuser_worker_and_waits_for_a_missing_role(make_cluster, faults):
    app = make_app(make_cluster, faults.base_url, worker_role=None, conf={"log_min_messages": "warning"})
    wait_until(lambda: "connect as the bootstrap superuser" in worker_log(app.cluster), timeout=20,
               message="the launcher's warning")
    # A role that does not exist yet: no worker, a clear line; once it exists (and has its grants), delivery.
    reload_and_wait(app, {"fhir_sync.username": "late_worker"})
    wait_until(lambda: 'role "late_worker" named by fhir_sync.username does not exist' in worker_log(app.cluster),
               timeout=20, message="the missing role logged")
    wait_until(lambda: not worker_pids(app.cluster, db=DB), timeout=20, message="the superuser worker gone")
    app.add_patient("waits-for-role")
    app.sql("CREATE ROLE late_worker LOGIN")
    app.sql("SELECT fhir_sync_grant_worker('late_worker')")
    app.wait_drained(timeout=30)
    assert faults.store.find("Patient", f"{MRN}|waits-for-role")
    assert app.one("SELECT usename FROM pg_stat_activity WHERE backend_type = 'fhir_sync worker'") == "late_worker"


# ------------------------------------------------------------------------------------ owners' code sandboxed
def _track_note(app, owner, body: str) -> None:
    owner.execute("CREATE TABLE note (id int PRIMARY KEY, txt text)")
    owner.execute(f"CREATE FUNCTION note_fhir(n note) RETURNS jsonb LANGUAGE plpgsql AS $$ {body} $$")
    app.sql("SELECT fhir_track('note', 'Basic', map_function => 'note_fhir(note)'::regprocedure)")


NOTE_JSON = "jsonb_build_object('resourceType', 'Basic', 'code', jsonb_build_object('text', n.txt))"


def _leaks_search_path_through_map_function(app, owner):
    _track_note(app, owner, f"""BEGIN
        PERFORM set_config('search_path', 'trap, pg_catalog', false);
        PERFORM set_config('lock_timeout', '1h', false);
        RETURN {NOTE_JSON};
    END""")
    owner.execute("INSERT INTO note VALUES (1, 'first')")
    app.wait_drained()
    owner.execute("INSERT INTO note VALUES (2, 'second')")
    return {"first", "second"}


def _leaks_search_path_through_json_cast(app, owner):
    owner.execute("CREATE TYPE mood AS ENUM ('ok')")
    owner.execute("""CREATE FUNCTION mood_json(m mood) RETURNS json LANGUAGE plpgsql AS $$
        BEGIN
            PERFORM set_config('search_path', 'trap, pg_catalog', false);
            RETURN to_json(m::text);
        END $$""")
    owner.execute("CREATE CAST (mood AS json) WITH FUNCTION mood_json(mood)")
    owner.execute("CREATE TABLE clinic_patient (id int PRIMARY KEY, identifier_system text, identifier_value text,"
                  " name_family text, m mood DEFAULT 'ok')")
    app.sql("SELECT fhir_track('clinic_patient', 'Patient')")
    owner.execute("INSERT INTO clinic_patient VALUES (1, %s, 'cast-1', 'One')", (MRN,))
    app.wait_drained()
    owner.execute("INSERT INTO clinic_patient VALUES (2, %s, 'cast-2', 'Two')", (MRN,))
    return None


@pytest.mark.e2e
@pytest.mark.parametrize("vector", [_leaks_search_path_through_map_function, _leaks_search_path_through_json_cast],
                         ids=["map_function", "json_cast"])
def test_settings_made_by_owners_code_do_not_outlive_it_in_the_worker(make_cluster, faults, vector):
    """The worst case: the worker is a superuser (fhir_sync.username empty). The owner's code sets search_path
    for the session, with its own operator = ahead of pg_catalog's; the worker's claim and settle compare
    bigints and texts with = right after. The owner must stay an ordinary role, the trap never run by anyone
    else, and the rows still delivered."""
    app = make_app(make_cluster, faults.base_url, worker_role=None)
    owner = make_owner(app)
    plant_traps(owner)
    want = vector(app, owner)
    app.wait_drained(timeout=30)
    app.add_patient("after-the-trap")        # more claims and settles after the owner's code ran
    app.wait_drained(timeout=30)
    assert rolsuper(app, "appowner") is False, "appowner became superuser through the worker"
    assert foreign_trap_calls(app) == 0, "the worker resolved = through the owner's schema"
    assert app.one("SELECT count(*) FROM fhir_dlq") == 0
    if want:
        assert want <= basic_texts(faults)
    assert faults.store.find("Patient", f"{MRN}|after-the-trap")


@pytest.mark.e2e
def test_a_superusers_fhir_preview_keeps_its_session_clean(make_cluster, faults):
    app = make_app(make_cluster, faults.base_url)
    owner = make_owner(app)
    plant_traps(owner)
    _leaks_search_path_through_map_function(app, owner)
    before = app.one("SHOW search_path")
    preview = app.one("SELECT fhir_preview('note', 1)")
    assert preview["code"]["text"] == "first"
    assert app.one("SHOW search_path") == before
    assert app.one("SHOW lock_timeout") == "0"
    assert app.one("SELECT 1::bigint = 1::bigint") is True     # would run trap.= had the path leaked
    assert foreign_trap_calls(app) == 0
    assert rolsuper(app, "appowner") is False


@pytest.mark.e2e
def test_owners_code_cannot_take_on_another_identity(make_cluster, faults):
    """SET SESSION AUTHORIZATION / SET ROLE inside the owner's mapping function, in a superuser worker: refused
    (a security-restricted operation); the row is dead-lettered with the reason, the others delivered."""
    app = make_app(make_cluster, faults.base_url, worker_role=None, conf={"log_min_messages": "warning"})
    owner = make_owner(app)
    _track_note(app, owner, f"""BEGIN
        IF n.id = 2 THEN
            EXECUTE 'SET SESSION AUTHORIZATION DEFAULT';
            EXECUTE 'ALTER ROLE appowner SUPERUSER';
        ELSIF n.id = 3 THEN
            EXECUTE 'SET ROLE NONE';
            EXECUTE 'ALTER ROLE appowner SUPERUSER';
        END IF;
        RETURN {NOTE_JSON};
    END""")
    owner.execute("INSERT INTO note VALUES (1, 'plain'), (2, 'session-auth'), (3, 'set-role')")
    app.wait_drained(timeout=30)
    assert rolsuper(app, "appowner") is False
    assert basic_texts(faults) == {"plain"}
    errors = dict(app.sql("SELECT record_id, error FROM fhir_dlq"))
    assert set(errors) == {"2", "3"}, errors
    for e in errors.values():
        # PostgreSQL names the SET SESSION AUTHORIZATION refusal after the user-id switch, SET ROLE's after
        # the security-restricted operation: both are what the sandbox sets.
        assert "cannot set parameter" in e and ("security-restricted operation" in e
                                                 or "security-definer function" in e), e
    assert app.one("SELECT array_agg(DISTINCT error_class) FROM fhir_dlq") == ["unmappable"]


@pytest.mark.e2e
def test_a_mapping_function_swapped_after_tracking_is_refused_not_run(make_cluster, faults):
    app = make_app(make_cluster, faults.base_url, worker_role=None)
    owner = make_owner(app)
    _track_note(app, owner, f"BEGIN RETURN {NOTE_JSON}; END")
    owner.execute("INSERT INTO note VALUES (1, 'tracked')")
    app.wait_drained()
    # Given away to another role: its new owner could rewrite it and act as the table's owner.
    app.sql("CREATE ROLE other_owner")
    app.sql("ALTER FUNCTION note_fhir(note) OWNER TO other_owner")
    owner.execute("INSERT INTO note VALUES (2, 're-owned')")
    app.wait_drained()
    assert "owned by a role other than the table's owner" in app.one("SELECT error FROM fhir_dlq WHERE record_id = '2'")
    # Dropped and created again under the same name, with code that escalates and leaves a mark no
    # rollback undoes (setval): never called (by OID).
    app.sql("DROP FUNCTION note_fhir(note)")
    owner.execute("CREATE SEQUENCE ran")
    owner.execute(f"""CREATE FUNCTION note_fhir(n note) RETURNS jsonb LANGUAGE plpgsql AS $$ BEGIN
        PERFORM setval('ran', 42); EXECUTE 'ALTER ROLE appowner SUPERUSER'; RETURN {NOTE_JSON}; END $$""")
    owner.execute("INSERT INTO note VALUES (3, 'swapped')")
    app.wait_drained()
    assert "no longer exists" in app.one("SELECT error FROM fhir_dlq WHERE record_id = '3'")
    assert app.one("SELECT last_value FROM ran") == 1, "the function swapped in under the same name ran"
    assert rolsuper(app, "appowner") is False
    assert basic_texts(faults) == {"tracked"}
    # Tracking again (the DBA looks at the new function) and requeueing delivers; the new function runs as
    # the table's owner, so its ALTER ROLE fails and the row is dead-lettered with that reason instead.
    owner.execute(f"CREATE OR REPLACE FUNCTION note_fhir(n note) RETURNS jsonb LANGUAGE plpgsql AS $$ BEGIN RETURN {NOTE_JSON}; END $$")
    app.sql("SELECT fhir_track('note', 'Basic', map_function => 'note_fhir(note)'::regprocedure)")
    app.sql("SELECT fhir_requeue_dlq()")
    app.wait_drained()
    assert basic_texts(faults) == {"tracked", "re-owned", "swapped"}


@pytest.mark.e2e
def test_fhir_track_checks_who_tracks_and_which_function(make_cluster, faults):
    app = make_app(make_cluster, faults.base_url)
    owner = make_owner(app)
    owner.execute("CREATE TABLE note (id int PRIMARY KEY, txt text)")
    owner.execute(f"CREATE FUNCTION note_fhir(n note) RETURNS jsonb LANGUAGE sql AS $$ SELECT {NOTE_JSON} $$")
    owner.execute("CREATE FUNCTION text_fhir(t text) RETURNS jsonb LANGUAGE sql AS $$ SELECT '{}'::jsonb $$")
    app.sql("CREATE FUNCTION dba_note_fhir(n note) RETURNS jsonb LANGUAGE sql AS $$ SELECT '{}'::jsonb $$")
    app.sql("CREATE ROLE clerk LOGIN")
    app.sql("GRANT EXECUTE ON FUNCTION fhir_track(regclass, text, regprocedure, name, text, text, boolean, text)"
            " TO clerk, appowner")
    clerk = connect_as(app.cluster, "clerk")
    msg = denied(clerk, "SELECT fhir_track('note', 'Basic', map_function => 'note_fhir(note)'::regprocedure)")
    assert "must be able to act as the owner of table public.note" in msg
    with pytest.raises(psycopg.Error) as e:
        app.sql("SELECT fhir_track('note', 'Basic', map_function => 'text_fhir(text)'::regprocedure)")
    assert e.value.sqlstate == "42P13" and "must take exactly one public.note row" in str(e.value)
    msg = denied(app.conn, "SELECT fhir_track('note', 'Basic', map_function => 'dba_note_fhir(note)'::regprocedure)")
    assert "is not owned by the owner of table public.note" in msg
    # The owner may not accept a function of someone else's; a superuser may, explicitly.
    msg = denied(owner, "SELECT fhir_track('note', 'Basic', map_function => 'dba_note_fhir(note)'::regprocedure,"
                        " function_owner_trusted => true)")
    assert "only a superuser" in msg
    app.sql("SELECT fhir_track('note', 'Basic', map_function => 'dba_note_fhir(note)'::regprocedure,"
            " function_owner_trusted => true)")
    assert app.one("SELECT map_function_owner::text FROM fhir_tracked WHERE table_name = 'note'::regclass") == "postgres"


# ------------------------------------------------------------------------------- no role can stall delivery
@pytest.mark.e2e
def test_no_lock_an_ordinary_role_can_take_stalls_the_claims(make_cluster, faults):
    """The claims are serialised by a lock no SQL statement can name. An ordinary role holds every advisory lock
    that looks like it (the 0.1.0 key, the same two halves as an int4 pair, small keys), and keeps
    transactions open holding what it can on fhir_sync's tables without a privilege check (PREPARE of
    statements that name them): changes still flow."""
    app = make_app(make_cluster, faults.base_url)
    app.sql("CREATE ROLE clerk LOGIN")
    app.sql("GRANT USAGE ON SCHEMA public TO clerk")
    clerk = connect_as(app.cluster, "clerk")
    clerk.execute("SELECT pg_advisory_lock(%s)", (OLD_CLAIM_LOCK_KEY,))
    clerk.execute("SELECT pg_advisory_lock(%s, %s)", (0x6668_6972, 0x5F73_796E))
    for k in range(16):
        clerk.execute("SELECT pg_advisory_lock(%s)", (k,))
    holder = psycopg.connect(host="127.0.0.1", port=app.cluster.port, user="clerk", dbname=DB)
    try:
        for i, table in enumerate(("fhir_outbox", "fhir_dlq", "fhir_sync_state", "fhir_tracked",
                                    "fhir_outbox_delivered", "fhir_sync_version")):
            holder.execute(f"PREPARE p{i} AS DELETE FROM {table}")      # ROW EXCLUSIVE, held, unchecked
        for i in range(5):
            app.add_patient(f"unlocked-{i}")
        app.wait_drained(timeout=15)
        assert all(faults.store.find("Patient", f"{MRN}|unlocked-{i}") for i in range(5))
    finally:
        holder.rollback()
        holder.close()
    assert app.one("SELECT count(*) FROM fhir_dlq") == 0


@pytest.mark.e2e
def test_a_drop_database_the_role_may_not_run_does_not_touch_delivery(make_cluster, faults):
    app = make_app(make_cluster, faults.base_url)
    app.sql("CREATE ROLE clerk LOGIN")
    clerk = connect_as(app.cluster, "clerk", db="postgres")
    pid = eventually(app.worker_pid, message="a worker")
    stop = threading.Event()
    refused = []

    def loop():
        while not stop.is_set():
            for sql in (f"DROP DATABASE {DB}", f"ALTER DATABASE {DB} RENAME TO elsewhere"):
                try:
                    clerk.execute(sql)
                except psycopg.Error as e:
                    refused.append(e.sqlstate)

    t = threading.Thread(target=loop, daemon=True)
    t.start()
    try:
        for i in range(20):
            app.add_patient(f"while-dropping-{i}")
        app.wait_drained(timeout=20)
    finally:
        stop.set()
        t.join(10)
    assert refused and set(refused) == {"42501"}, set(refused)
    assert app.worker_pid() == pid, "the worker left its database for a DROP DATABASE that was refused"
    assert "leaving database" not in worker_log(app.cluster)
    assert all(faults.store.find("Patient", f"{MRN}|while-dropping-{i}") for i in range(20))


@pytest.mark.fault
def test_a_locked_tracked_table_holds_back_only_its_own_changes(make_cluster, faults):
    app = make_app(make_cluster, faults.base_url, conf={"fhir_sync.lock_timeout": "300ms"})
    owner = make_owner(app)
    _track_note(app, owner, f"BEGIN RETURN {NOTE_JSON}; END")
    # A committed change of note that the worker has not read yet: the server is down meanwhile.
    faults.refuse()
    owner.execute("INSERT INTO note VALUES (1, 'behind-a-lock')")
    eventually(lambda: (app.one("SELECT paused_reason FROM fhir_sync_status") or "").startswith("server unreachable"),
               message="paused")
    locker = psycopg.connect(host="127.0.0.1", port=app.cluster.port, user="appowner", dbname=DB)
    try:
        locker.execute("LOCK TABLE note IN ACCESS EXCLUSIVE MODE")     # held: the transaction stays open
        faults.accept()
        for i in range(5):
            app.add_patient(f"beside-a-lock-{i}")
        eventually(lambda: all(faults.store.find("Patient", f"{MRN}|beside-a-lock-{i}") for i in range(5)),
                   timeout=15, message="other tables' changes delivered while note is locked")
        assert app.one("SELECT count(*) FROM fhir_outbox WHERE NOT processed AND resource_table = 'note'::regclass") == 1
        # (The server has the patients before the worker has settled that tier: wait for the settle.)
        eventually(lambda: app.one("SELECT error_class FROM fhir_outbox WHERE NOT processed") == "waiting",
                   timeout=10, message="note's change held back as waiting")
    finally:
        locker.rollback()
        locker.close()
    app.wait_drained(timeout=30)
    assert app.one("SELECT count(*) FROM fhir_dlq") == 0, "a locked table is a reason to wait, not to give up"


@pytest.mark.e2e
def test_a_row_that_cannot_be_read_is_dead_lettered_alone_and_the_log_keeps_its_values(make_cluster, faults):
    """A column whose cast raises (quoting the value, as PostgreSQL's own messages do) and one whose cast sleeps
    past fhir_sync.statement_timeout: each row is dead-lettered on its own with its SQLSTATE, the others are
    delivered, and the log names neither the value nor PostgreSQL's message."""
    app = make_app(make_cluster, faults.base_url, conf={"fhir_sync.statement_timeout": "1s"})
    owner = make_owner(app)
    owner.execute("CREATE TYPE mood AS ENUM ('ok', 'bad', 'slow')")
    owner.execute("""CREATE FUNCTION mood_json(m mood) RETURNS json LANGUAGE plpgsql AS $$
        BEGIN
            IF m = 'bad' THEN RAISE EXCEPTION 'cannot render Quentavia-Secret-%', m; END IF;
            IF m = 'slow' THEN PERFORM pg_sleep(30); END IF;
            RETURN to_json(m::text);
        END $$""")
    owner.execute("CREATE CAST (mood AS json) WITH FUNCTION mood_json(mood)")
    owner.execute("CREATE TABLE clinic_patient (id int PRIMARY KEY, identifier_system text, identifier_value text,"
                  " name_family text, m mood)")
    app.sql("SELECT fhir_track('clinic_patient', 'Patient')")
    owner.execute("INSERT INTO clinic_patient VALUES (1, %s, 'r-ok', 'Fine', 'ok'), (2, %s, 'r-bad', 'Bad', 'bad'),"
                  " (3, %s, 'r-slow', 'Slow', 'slow')", (MRN, MRN, MRN))
    app.wait_drained(timeout=60)
    owner.execute("INSERT INTO clinic_patient VALUES (4, %s, 'r-after', 'After', 'ok')", (MRN,))
    app.wait_drained(timeout=30)
    assert faults.store.find("Patient", f"{MRN}|r-ok") and faults.store.find("Patient", f"{MRN}|r-after")
    dlq = {r[0]: (r[1], r[2]) for r in app.sql("SELECT record_id, error_class, error FROM fhir_dlq")}
    assert set(dlq) == {"2", "3"}, dlq
    assert dlq["2"][0] == "unmappable" and "cannot be read (SQLSTATE P0001)" in dlq["2"][1]
    assert dlq["3"][0] == "unmappable" and "cannot be read (SQLSTATE 57014)" in dlq["3"][1]
    log = app.cluster.log_text()
    assert "Quentavia-Secret" not in log
    assert "r-bad" not in log and "r-slow" not in log


@pytest.mark.e2e
@pytest.mark.parametrize("then", ["", "BEGIN PERFORM public.fhir_patient_json(n); EXCEPTION WHEN OTHERS THEN NULL; END;"],
                         ids=["sleeps", "calls_fhir_sync_back"])
def test_owners_code_that_catches_its_timeout_cannot_hold_the_worker(make_cluster, faults, then):
    """A mapping function that catches query_canceled and sleeps again for an hour (or calls back into
    fhir_sync, which must not extend its time): past statement_timeout plus a grace period the worker gets an
    interrupt no code can catch - its sleep is woken - exits and is restarted, and the log says whose code it
    was. Once the data is fixed, the change is delivered."""
    app = make_app(make_cluster, faults.base_url, conf={"fhir_sync.statement_timeout": "500ms"})
    owner = make_owner(app)
    _track_note(app, owner, f"""BEGIN
        WHILE n.txt = 'stubborn' LOOP
            BEGIN
                PERFORM pg_sleep(3600);
            EXCEPTION WHEN query_canceled THEN NULL;
            END;
            {then}
        END LOOP;
        RETURN {NOTE_JSON};
    END""")
    pid = eventually(app.worker_pid, message="a worker")
    started = time.monotonic()
    owner.execute("INSERT INTO note VALUES (1, 'stubborn')")
    wait_until(lambda: "went on past fhir_sync.statement_timeout" in worker_log(app.cluster), timeout=30,
               message="the watchdog's line")
    print(f"\n  worker stopped {time.monotonic() - started:.1f} s after the change")
    eventually(lambda: (p := app.worker_pid()) and p != pid, timeout=30, message="a new worker")
    owner.execute("UPDATE note SET txt = 'fine'")
    app.wait_drained(timeout=60)
    assert "fine" in basic_texts(faults)
    assert "terminated by signal" not in app.cluster.log_text()


@pytest.mark.e2e
def test_owners_code_in_the_worker_reads_no_other_owners_rows_through_fhir_sync(make_cluster, faults):
    """A mapping function calls fhir_map_row (public) on the patient table of another owner: inside the worker it
    is the table owner's call, with that owner's rights - refused - not a read with the other owner's rights."""
    app = make_app(make_cluster, faults.base_url)
    victim = app.add_patient("victim")
    app.sql("INSERT INTO patient_other_identifiers (patient_id, identifier_system, identifier_value)"
            " VALUES (%s, 'urn:ssn', 'SECRET-SSN')", (victim,))
    app.wait_drained()
    owner = make_owner(app)
    _track_note(app, owner, f"""BEGIN
        RETURN jsonb_build_object('resourceType', 'Basic', 'code', jsonb_build_object('text',
            public.fhir_map_row('patient', 'public.patient'::regtype::oid,
                         jsonb_build_object('id', {victim}, 'identifier_system', '{MRN}',
                                            'identifier_value', 'victim', 'name_family', 'V'))::text));
    END""")
    owner.execute("INSERT INTO note VALUES (1, 'snoop')")
    app.wait_drained()
    # (The victim's own Patient carries it, as it should; no Basic may.)
    assert not any("SECRET-SSN" in r.body.decode(errors="replace") for r in faults.requests
                   if r.url_path.strip("/").split("/")[0] == "Basic")
    assert "snoop" not in str(basic_texts(faults))
    err = app.one("SELECT error FROM fhir_dlq WHERE record_id = '1'")
    assert err and "SQLSTATE 42501" in err, err


@pytest.mark.e2e
def test_a_caller_without_the_owners_rights_reads_nothing_more_through_fhir_sync(make_cluster, faults):
    """fhir_map_row is open to PUBLIC and reads a patient's identifier rows: for a caller that cannot read that
    table, it reads as the caller (refused), not as the table's owner. fhir_preview, granted, honours the
    table's row-level security for such a caller."""
    app = make_app(make_cluster, faults.base_url)
    pid = app.add_patient("rls-visible", family="Visible")
    app.sql("INSERT INTO patient_other_identifiers (patient_id, identifier_system, identifier_value)"
            " VALUES (%s, 'urn:ssn', 'SECRET-SSN')", (pid,))
    hidden = app.add_patient("rls-hidden", family="Hidden")
    app.wait_drained()
    app.sql("CREATE ROLE clerk LOGIN")
    clerk = connect_as(app.cluster, "clerk")
    row = {"id": pid, "identifier_system": MRN, "identifier_value": "rls-visible", "name_family": "Visible"}
    with pytest.raises(psycopg.Error) as e:
        clerk.execute("SELECT fhir_map_row('patient', 'patient'::regtype::oid, %s::jsonb)",
                      (Json(row),)).fetchall()
    assert e.value.sqlstate == "42501" and "SECRET-SSN" not in str(e.value), str(e.value)
    # Granted preview and SELECT, but row-level security shows the clerk one patient only.
    app.sql("GRANT SELECT ON patient, patient_other_identifiers, fhir_tracked, fhir_sync_state TO clerk")
    app.sql("GRANT EXECUTE ON FUNCTION fhir_preview(regclass, anyelement), fhir_preview_row(oid, text) TO clerk")
    app.sql("ALTER TABLE patient ENABLE ROW LEVEL SECURITY")
    app.sql("CREATE POLICY clerk_sees_visible ON patient FOR SELECT TO clerk USING (name_family = 'Visible')")
    assert clerk.execute("SELECT fhir_preview('patient', %s)", (pid,)).fetchone()[0]["name"][0]["family"] == "Visible"
    with pytest.raises(psycopg.Error) as e:
        clerk.execute("SELECT fhir_preview('patient', %s)", (hidden,))
    assert "has no row with key" in str(e.value) and "Hidden" not in str(e.value)
    assert app.one("SELECT fhir_preview('patient', %s)", (hidden,))["name"][0]["family"] == "Hidden"


# ------------------------------------------------------------------------------------------ hostile server
def _vm_hwm_kb(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


@pytest.mark.fault
def test_a_gzip_bomb_costs_the_worker_one_mebibyte_not_its_memory(make_cluster, faults):
    bomb = gzip.compress(b" " * (512 << 20), compresslevel=1)
    assert len(bomb) < 4 << 20
    app = make_app(make_cluster, faults.base_url)
    pid = eventually(app.worker_pid, message="a worker")
    faults.respond(503, times=1, body=bomb, headers={"Content-Encoding": "gzip"}, content_type="application/fhir+json",
                   match={"contains": "bomb"})
    app.add_patient("bomb")
    app.wait_drained(timeout=30)                              # the 503 is retried, then delivered
    assert faults.store.find("Patient", f"{MRN}|bomb")
    assert app.worker_pid() == pid
    hwm_mb = _vm_hwm_kb(pid) / 1024
    print(f"\n  worker peak RSS after a 512 MiB gzip bomb: {hwm_mb:.0f} MB")
    assert hwm_mb < 300, f"the worker's peak RSS reached {hwm_mb:.0f} MB"
    assert "terminated by signal" not in app.cluster.log_text()


@pytest.mark.fault
@pytest.mark.parametrize("bad_id", ["../../metadata", "a/b", "p?x=1", ".."])
def test_an_id_from_the_server_that_would_steer_a_url_is_refused(make_cluster, faults, bad_id):
    app = make_app(make_cluster, faults.base_url)
    faults.respond(201, times=1, body={"resourceType": "Patient", "id": bad_id}, match={"contains": "steer"})
    row = app.add_patient("steer")
    app.wait_drained()
    dlq = app.sql("SELECT error_class, error FROM fhir_dlq")
    assert len(dlq) == 1 and dlq[0][0] == "rejected" and "not a FHIR id" in dlq[0][1], dlq
    assert app.one("SELECT fhir_id FROM fhir_sync_state WHERE resource_key = %s", (str(row),)) is None
    # The next change addresses the resource by its identifier, never by the id the server made up.
    app.sql("UPDATE patient SET name_family = 'Next' WHERE id = %s", (row,))
    app.wait_drained()
    assert not any(bad_id in r.path or r.url_path.rstrip("/").endswith("/..") for r in faults.requests)
    assert faults.store.find("Patient", f"{MRN}|steer")


@pytest.mark.fault
def test_a_token_that_never_expires_is_used_within_bounds(make_cluster, faults):
    """expires_in of 10^15 s would overflow the worker's clock arithmetic: it is clamped (to a day)."""
    tokens = FaultServer().start()
    try:
        tokens.respond(200, times=None, content_type="application/json", match={"method": "POST"},
                       body={"access_token": "tok-forever", "token_type": "Bearer", "expires_in": 10 ** 15})
        app = make_app(make_cluster, faults.base_url, conf=HTTP_AUTH)
        reload_and_wait(app, {"fhir_sync.auth": "oauth2", "fhir_sync.oauth_token_url": f"{tokens.base_url}/token",
                              "fhir_sync.oauth_client_id": "fhir-sync", "fhir_sync.oauth_client_secret": "s3cret"})
        pid = eventually(app.worker_pid, message="a worker")
        for i in range(3):
            app.add_patient(f"forever-{i}")
        app.wait_drained(timeout=20)
        assert {r.headers.get("authorization") for r in faults.requests if r.method == "PUT"} == {"Bearer tok-forever"}
        assert app.worker_pid() == pid
    finally:
        tokens.stop()


@pytest.mark.e2e
def test_credentials_are_not_sent_over_plain_http_unless_allowed(make_cluster, faults):
    app = make_app(make_cluster, faults.base_url)
    token = secret_file(app, "token", "tok-in-clear")
    reload_and_wait(app, {"fhir_sync.auth": "bearer", "fhir_sync.auth_token_file": str(token)})
    wait_until(lambda: "would send credentials over plain http://" in worker_log(app.cluster), timeout=20,
               message="the refusal logged")
    app.add_patient("clear-text")
    eventually(lambda: app.one("SELECT worker_state FROM fhir_sync_status") == "sending nothing: settings refused (see the log)",
               timeout=10, message="the worker sends nothing")
    assert not faults.requests, "a request went out with credentials over http"
    reload_and_wait(app, {"fhir_sync.allow_http_credentials": "on"})
    app.wait_drained(timeout=20)
    assert {r.headers.get("authorization") for r in faults.requests if r.method == "PUT"} == {"Bearer tok-in-clear"}
    assert "tok-in-clear" not in app.cluster.log_text()
