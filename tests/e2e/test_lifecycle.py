"""The worker's life in a real cluster: it never blocks DROP EXTENSION or DROP DATABASE, comes
back after pg_terminate_backend, reloads its settings, and waits quietly where there is
nothing to serve."""
from __future__ import annotations

import time

import pytest

from fhirsync import DB, MRN, eventually, make_app


@pytest.mark.fault
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


@pytest.mark.fault
def test_drop_database_while_busy_completes_and_the_worker_does_not_crash_loop(make_cluster, faults):
    app = make_app(make_cluster, faults.base_url)
    faults.delay(0.05, times=None)
    app.sql("INSERT INTO patient (identifier_system, identifier_value) SELECT %s, 'd' || g FROM generate_series(1, 300) g",
            (MRN,))
    faults.wait_for_requests(5)
    app.conn.close()
    app.cluster.close_connections()
    log_at = len(app.cluster.log_text())
    started = time.monotonic()
    app.cluster.psql(f"DROP DATABASE {DB}")
    assert time.monotonic() - started < 10
    # The launcher has looked at pg_database since the drop: whatever worker it would (wrongly) start for
    # the dropped database it has started by now.
    app.cluster.wait_for_log(f'fhir_sync launcher: database "{DB}" does not exist', timeout=30, start=log_at)
    log = app.cluster.log_text()
    assert 'FATAL:  database "app" does not exist' not in log, "no worker may try to connect to a dropped database"
    # Recreated, it is served again.
    app.cluster.create_db(DB)
    conn = app.cluster.connect(DB)
    conn.execute("CREATE EXTENSION fhir_sync")
    eventually(lambda: conn.execute("SELECT count(*) FROM fhir_sync_workers WHERE database = %s AND state = 'idle'",
                                    (DB,)).fetchone()[0] == 1, timeout=30, message="worker back on the new database")
    # Again, over the whole time since the drop (a late attempt would have been logged by now).
    log = app.cluster.log_text()
    assert 'FATAL:  database "app" does not exist' not in log, "no worker may try to connect to a dropped database"


@pytest.mark.e2e
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


@pytest.mark.e2e
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
    assert app.one("SELECT max(attempts) FROM fhir_outbox_delivered") == 0


@pytest.mark.e2e
def test_a_database_without_the_extension_is_waited_on_quietly(make_cluster, faults):
    cluster = make_cluster(conf={"fhir_sync.database": "app, nosuchdb", "fhir_sync.server_url": faults.base_url})
    cluster.create_db("app")
    conn = cluster.connect("app")
    # (No extension anywhere: fhir_sync's views cannot say how far the worker is; the log and
    # pg_stat_activity can.) The launcher's pass that finds nosuchdb missing is the one that would start a
    # worker for it; the worker for app is connected, so its first pass, without the extension, is under way.
    cluster.wait_for_log('launcher: database "nosuchdb" does not exist', timeout=30)
    eventually(lambda: cluster.query("SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'fhir_sync worker'",
                                     db="app")[0][0] >= 1, message="the worker for app")
    log = cluster.log_text()
    assert 'launcher: database "nosuchdb" does not exist' in log
    assert 'FATAL:  database "nosuchdb" does not exist' not in log
    assert "terminated by signal" not in log
    rows = cluster.query("SELECT state FROM pg_stat_activity WHERE backend_type = 'fhir_sync worker'", db="app")
    assert len(rows) == 1
    conn.execute("CREATE EXTENSION fhir_sync")
    eventually(lambda: conn.execute("SELECT state FROM fhir_sync_workers").fetchone()[0] == "idle",
               message="worker idle once the extension exists")
    # The worker went idle only after its wait without the extension (a pass, then up to 5 s asleep): the
    # same checks again, now that the time without the extension is over.
    log = cluster.log_text()
    assert 'FATAL:  database "nosuchdb" does not exist' not in log
    assert "terminated by signal" not in log


@pytest.mark.db
def test_create_extension_without_preload_is_refused_with_a_hint(make_cluster):
    import psycopg
    import pytest
    cluster = make_cluster(preload="")
    conn = cluster.connect("postgres")
    with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState) as err:
        conn.execute("CREATE EXTENSION fhir_sync")
    assert "shared_preload_libraries" in str(err.value)
    assert "Add fhir_sync to shared_preload_libraries" in (err.value.diag.message_hint or "")


def needs_static_tls(library) -> bool:
    """Whether an ELF shared object is marked DF_STATIC_TLS (some code of it uses initial-exec TLS)."""
    import struct
    data = library.read_bytes()
    assert data[:4] == b"\x7fELF" and data[4] == 2, "a 64-bit ELF object"
    phoff, = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    for i in range(phnum):
        p_type, _flags, p_offset, _vaddr, _paddr, p_filesz = struct.unpack_from("<IIQQQQ", data, phoff + i * phentsize)
        if p_type != 2:   # PT_DYNAMIC
            continue
        for at in range(p_offset, p_offset + p_filesz, 16):
            tag, value = struct.unpack_from("<qQ", data, at)
            if tag == 30:   # DT_FLAGS
                return bool(value & 0x10)   # DF_STATIC_TLS
    return False


@pytest.mark.every_version
@pytest.mark.db
def test_the_library_needs_no_static_tls(make_cluster):
    """PostgreSQL dlopens the library, and a dlopened library's static TLS comes out of the little room
    glibc keeps spare, shared with every other preloaded library: when mimalloc used initial-exec TLS,
    PostgreSQL 17 on Debian trixie refused to start ("cannot allocate memory in static TLS block").
    mimalloc is built with local-dynamic TLS; nothing in the library may need static TLS again."""
    from harness.pg import PG
    from harness.util import wait_until
    library = PG.host(f"/usr/lib/postgresql/{PG.major}/lib/fhir_sync.so")
    assert not needs_static_tls(library), f"{library} is marked STATIC_TLS (readelf -d; readelf -r | grep TPOFF)"
    cluster = make_cluster(conf={"fhir_sync.database": "postgres"})
    wait_until(lambda: cluster.query("SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'fhir_sync launcher'")
               == [(1,)], timeout=30, message="the launcher started")
