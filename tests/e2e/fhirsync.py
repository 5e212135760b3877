"""Helpers shared by the fhir_sync end-to-end tests: a database with the extension, the health
tables tracked, and a way to wait for the worker."""
from __future__ import annotations

import time

from harness.util import FIXTURES, wait_until
MRN = "http://hospital.example.org/mrn"
DB = "app"
# The role the workers connect as (fhir_sync.username): an ordinary LOGIN role with only what
# fhir_sync_grant_worker gives it, as the README's setup makes it.
WORKER_ROLE = "fhir_worker"
# Passes of its main loop each worker of this database has made (the `cycles` column, reset when a worker
# restarts). fhir_sync_worker_slots() is the set-returning function with database_oid under the
# fhir_sync_workers view (which names the database instead).
WORKER_CYCLES_SQL = ("SELECT pid, coalesce(cycles, 0) FROM fhir_sync_worker_slots()"
                     " WHERE database_oid = (SELECT oid FROM pg_database WHERE datname = current_database())")


class App:
    """A cluster serving database `app` with fhir_sync tracking the health tables."""

    def __init__(self, cluster):
        self.cluster = cluster
        self.conn = cluster.connect(DB)

    def sql(self, query: str, params=None):
        with self.conn.cursor() as cur:
            cur.execute(query, params)
            return cur.fetchall() if cur.description else None

    def one(self, query: str, params=None):
        rows = self.sql(query, params)
        return rows[0][0] if rows else None

    def reconnect(self):
        try:
            self.conn.close()
        except Exception:
            pass
        self.conn = self.cluster.connect(DB)

    def pending(self) -> int:
        return self.one("SELECT count(*) FROM fhir_outbox WHERE NOT processed")

    def wait_drained(self, timeout: float = 60):
        """Until every change is settled (delivered, or moved to the DLQ)."""
        wait_until(lambda: self.pending() == 0, timeout=timeout, message="outbox drained")

    def worker_cycles(self) -> dict[int, int]:
        """pid -> passes of its main loop, for each worker of this database."""
        return dict(self.sql(WORKER_CYCLES_SQL))

    def wait_cycles(self, n: int = 2, timeout: float = 30) -> None:
        """Until a worker of this database has made at least n more passes of its main loop.

        A pass ends after claiming and delivering, after finding nothing to do, while paused, or when the
        extension is missing; SIGHUP (a reload) is taken at the top of the next one. The pass under way
        when the wait starts may be the first of the n: n = 2 means at least one whole pass after the
        call. A worker with a new pid (restarted) counts its passes from 0.

        For "nothing happens while X" checks: n passes give the worker n real chances to do it. While
        paused a pass lasts at most poll_interval; with no client (settings refused, no server_url) or no
        extension, up to max(poll_interval, 5 s).
        """
        before = self.worker_cycles()

        def progressed():
            return any(c - before.get(pid, 0) >= n for pid, c in self.worker_cycles().items())

        wait_until(progressed, timeout=timeout, interval=0.05,
                   message=f"{n} more passes of the worker's loop (from {before})")

    def worker_pid(self) -> int | None:
        return self.one("SELECT pid FROM fhir_sync_workers LIMIT 1")

    def add_patient(self, mrn: str, family: str = "Doe", given: str = "Jane", gender: str = "female") -> int:
        return self.one(
            "INSERT INTO patient (identifier_system, identifier_value, name_family, name_given, gender, birth_date)"
            " VALUES (%s, %s, %s, %s, %s, '1970-01-01') RETURNING id",
            (MRN, mrn, family, given, gender),
        )


def make_app(make_cluster, server_url: str, conf: dict | None = None, track: bool = True, rows: bool = False,
             worker_role: str | None = WORKER_ROLE, pg=None) -> App:
    """worker_role: the non-superuser role the workers connect as; None leaves fhir_sync.username empty
    (the workers then connect as the bootstrap superuser). pg: the PostgreSQL install (harness.pg)."""
    settings = {
        "fhir_sync.database": DB,
        "fhir_sync.server_url": server_url,
        "fhir_sync.http_timeout": "5s",
        "fhir_sync.poll_interval": "1s",
        "log_min_messages": "log",
    }
    if worker_role:
        settings["fhir_sync.username"] = worker_role
    settings.update(conf or {})
    cluster = make_cluster(conf=settings, pg=pg)
    if worker_role:
        # Before the extension: CREATE EXTENSION grants the role named by fhir_sync.username.
        cluster.psql(f"CREATE ROLE {worker_role} LOGIN")
    cluster.create_db(DB)
    app = App(cluster)
    app.sql("CREATE EXTENSION fhir_sync")
    app.sql((FIXTURES / "health_tables.sql").read_text())
    if track:
        app.sql(
            "SELECT fhir_track('patient', 'Patient'), fhir_track('patient_other_identifiers', 'Patient'),"
            " fhir_track('form', 'Encounter'), fhir_track('blood_pressure', 'Observation'),"
            " fhir_track('pulse', 'Observation')"
        )
    if rows:
        app.sql((FIXTURES / "sample_rows.sql").read_text())
    return app


def eventually(fn, timeout: float = 30, interval: float = 0.1, message: str = "condition"):
    """Poll fn until it returns a truthy value; return that value."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = fn()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {message}; last value: {last!r}")
