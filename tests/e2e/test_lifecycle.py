"""The worker's life in a real cluster: it never blocks DROP EXTENSION or DROP DATABASE, comes
back after pg_terminate_backend, reloads its settings, and waits quietly where there is
nothing to serve."""
from __future__ import annotations

import time

from fhirsync import DB, MRN, eventually, make_app


def test_drop_extension_while_busy_completes_quickly(make_cluster, faults):
    app = make_app(make_cluster, faults.base_url)
    faults.delay(0.05, times=None)
    app.sql("INSERT INTO patient (identifier_system, identifier_value) SELECT %s, 'x' || g FROM generate_series(1, 300) g",
            (MRN,))
    faults.wait_for_requests(5)
    started = time.monotonic()
    app.sql("DROP EXTENSION fhir_sync CASCADE")
    assert time.monotonic() - started < 10
    # The worker notices and waits for the extension to come back, without crashing.
    eventually(lambda: app.one("SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'fhir_sync worker'") == 1,
               message="worker still running")
    assert "terminated by signal" not in app.cluster.log_text()


def test_drop_database_while_busy_completes_and_the_worker_does_not_crash_loop(make_cluster, faults):
    app = make_app(make_cluster, faults.base_url)
    faults.delay(0.05, times=None)
    app.sql("INSERT INTO patient (identifier_system, identifier_value) SELECT %s, 'd' || g FROM generate_series(1, 300) g",
            (MRN,))
    faults.wait_for_requests(5)
    app.conn.close()
    app.cluster.close_connections()
    started = time.monotonic()
    app.cluster.psql(f"DROP DATABASE {DB}")
    assert time.monotonic() - started < 10
    time.sleep(3)
    log = app.cluster.log_text()
    assert 'FATAL:  database "app" does not exist' not in log, "no worker may try to connect to a dropped database"
    # Recreated, it is served again.
    app.cluster.create_db(DB)
    conn = app.cluster.connect(DB)
    conn.execute("CREATE EXTENSION fhir_sync")
    eventually(lambda: conn.execute("SELECT count(*) FROM fhir_sync_workers WHERE database = %s AND state = 'idle'",
                                    (DB,)).fetchone()[0] == 1, timeout=30, message="worker back on the new database")


def test_pg_terminate_backend_brings_a_new_worker(make_cluster, faults):
    app = make_app(make_cluster, faults.base_url)
    for round_ in range(3):
        pid = eventually(app.worker_pid, message="a worker")
        assert app.one("SELECT pg_terminate_backend(%s)", (pid,))
        eventually(lambda: (p := app.worker_pid()) and p != pid, timeout=30, message="a new worker")
        app.add_patient(f"term-{round_}")
        app.wait_drained(timeout=30)
    assert {f"term-{i}" for i in range(3)} <= {it["resource"]["identifier"][0]["value"]
                                               for (t, _), it in faults.store.items.items() if t == "Patient"}


def test_settings_reload_without_restart(make_cluster, faults):
    from harness.faults import FaultServer
    app = make_app(make_cluster, "http://127.0.0.1:9")   # nothing listens there
    app.add_patient("reloaded")
    eventually(lambda: app.one("SELECT paused_reason FROM fhir_sync_status") == "server unreachable",
               message="paused on an unreachable server")
    app.sql(f"ALTER SYSTEM SET fhir_sync.server_url = '{faults.base_url}'")
    app.sql("SELECT pg_reload_conf()")
    app.wait_drained(timeout=30)
    assert faults.store.find("Patient", f"{MRN}|reloaded")
    assert app.one("SELECT max(attempts) FROM fhir_outbox") == 0


def test_a_database_without_the_extension_is_waited_on_quietly(make_cluster, faults):
    cluster = make_cluster(conf={"fhir_sync.database": "app, nosuchdb", "fhir_sync.server_url": faults.base_url})
    cluster.create_db("app")
    conn = cluster.connect("app")
    time.sleep(2)
    log = cluster.log_text()
    assert 'launcher: database "nosuchdb" does not exist' in log
    assert 'FATAL:  database "nosuchdb" does not exist' not in log
    assert "terminated by signal" not in log
    rows = cluster.query("SELECT state FROM pg_stat_activity WHERE backend_type = 'fhir_sync worker'", db="app")
    assert len(rows) == 1
    conn.execute("CREATE EXTENSION fhir_sync")
    eventually(lambda: conn.execute("SELECT state FROM fhir_sync_workers").fetchone()[0] == "idle",
               message="worker idle once the extension exists")


def test_create_extension_without_preload_is_refused_with_a_hint(make_cluster):
    import psycopg
    import pytest
    cluster = make_cluster(preload="")
    conn = cluster.connect("postgres")
    with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState) as err:
        conn.execute("CREATE EXTENSION fhir_sync")
    assert "shared_preload_libraries" in str(err.value)
    assert "Add fhir_sync to shared_preload_libraries" in (err.value.diag.message_hint or "")
