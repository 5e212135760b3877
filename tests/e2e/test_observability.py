"""Observability: fhir_sync's metrics through Debian's prometheus-postgres-exporter (0.11.1) with
docker/postgres_exporter/queries.yaml, and a real Prometheus loading the rules and parsing every dashboard
query. The checks of the docker/ files that need no process (compose, Dockerfiles, Grafana, alert rules,
promtool) are in tests/lint/test_docker_files.py; the metric list and the PromQL helpers both use are in
harness/monitoring.py.

The exporter test makes known traffic against a FaultServer and asserts the value of every metric:

    5 changes delivered       3 patients in one transaction (the first PUT delayed 0.3 s), then 2 forms
    1 change rejected         the next Patient PUT answered 422 -> dead-lettered
    3 changes pending         server down (listening socket closed) -> 1 call fails "unreachable",
                              the worker pauses, 2 patients + 1 form (one transaction) stay in the outbox

Every call goes out one at a time (max_in_flight = 1), so the counts cannot depend on timing.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import psycopg
import pytest

from harness.monitoring import (DASHBOARD, EXPORTER_VERSION, FHIR_METRICS, GRANTS, PROMETHEUS_YML, QUERIES,
                                alert_rules, dashboard_exprs)
from harness.util import FIXTURES, free_port, wait_until

pytestmark = pytest.mark.deploy

EXPORTER_BIN = shutil.which("prometheus-postgres-exporter") or "/usr/bin/prometheus-postgres-exporter"

ERROR_CLASSES = ["transient", "unreachable", "auth", "conflict", "rejected", "unmappable", "dependency",
                 "exhausted", "identifier_conflict", "not_sendable"]
LATENCY_BOUNDS = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]
WORKER_STATES = ["starting", "idle", "working", "paused"]


# ------------------------------------------------------------------------------------------------
# Prometheus text format
_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)(?:\s+-?\d+)?$')
_LABEL = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"\s*,?')


def parse_exposition(text: str):
    """-> (types {family: type}, samples [(name, {label: value}, float)])."""
    types, samples = {}, []
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(None, 3)
            types[name] = kind.strip()
            continue
        if not line.strip() or line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        assert m, f"unparsable exposition line: {line!r}"
        labels = {k: bytes(v, "utf-8").decode("unicode_escape") for k, v in _LABEL.findall(m.group(2) or "")}
        samples.append((m.group(1), labels, float(m.group(3))))
    return types, samples


class Scrape:
    def __init__(self, text: str):
        self.text = text
        self.types, self.samples = parse_exposition(text)

    def get(self, name: str, **labels) -> list[tuple[dict, float]]:
        return [(lb, v) for n, lb, v in self.samples
                if n == name and all(lb.get(k) == str(want) for k, want in labels.items())]

    def one(self, name: str, **labels) -> float:
        got = self.get(name, **labels)
        assert len(got) == 1, f"{name}{labels}: expected one sample, got {got}"
        return got[0][1]

    def by(self, name: str, label: str) -> dict[str, float]:
        out = {}
        for lb, v in self.get(name):
            assert lb[label] not in out, f"{name}: two samples with {label}={lb[label]}"
            out[lb[label]] = v
        return out


# ------------------------------------------------------------------------------------------------
class Exporter:
    """Debian's prometheus-postgres-exporter on a free loopback port, with queries.yaml."""

    def __init__(self, dsn: str, logfile: Path, extra_args=()):
        self.port = free_port()
        self.logfile = logfile
        env = dict(os.environ, DATA_SOURCE_NAME=dsn)
        env.pop("PG_EXPORTER_EXTEND_QUERY_PATH", None)
        self._log = open(logfile, "wb")
        self.proc = subprocess.Popen(
            [EXPORTER_BIN, f"--web.listen-address=127.0.0.1:{self.port}",
             f"--extend.query-path={QUERIES}", "--log.level=info", *extra_args],
            env=env, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/metrics"

    def scrape(self, timeout: float = 10) -> Scrape:
        with urllib.request.urlopen(self.url, timeout=timeout) as r:
            assert r.status == 200
            return Scrape(r.read().decode())

    def wait_scrape(self, timeout: float = 20) -> Scrape:
        def ready():
            assert self.proc.poll() is None, f"exporter exited {self.proc.returncode}:\n{self.log()}"
            return self.scrape()
        return wait_until(ready, timeout=timeout, interval=0.2, message=f"exporter at {self.url}")

    def log(self) -> str:
        return self.logfile.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()


# ------------------------------------------------------------------------------------------------
DB = "clinic"


def status(c) -> dict:
    conn = psycopg.connect(c.dsn(DB), autocommit=True)
    with conn:
        cur = conn.execute("SELECT * FROM fhir_sync_status")
        return dict(zip([d.name for d in cur.description], cur.fetchone()))


def call_errors(c) -> dict:
    return dict(c.query("SELECT error_class, count FROM fhir_sync_call_errors()", db=DB))


@pytest.mark.skipif(not Path(EXPORTER_BIN).exists(), reason="prometheus-postgres-exporter not installed")
def test_exporter_serves_every_metric_with_its_value(make_cluster, faults):
    v = subprocess.run([EXPORTER_BIN, "--version"], capture_output=True, text=True)
    assert f"version {EXPORTER_VERSION} " in v.stdout + v.stderr, v.stdout + v.stderr
    c = make_cluster(conf={
        "fhir_sync.server_url": faults.base_url,
        "fhir_sync.database": DB,
        "fhir_sync.workers": 1,
        "fhir_sync.max_in_flight": 1,       # one call at a time: exact call counts
        "fhir_sync.poll_interval": 100,
    })
    c.create_db(DB)
    c.psql((FIXTURES / "health_tables.sql").read_text(), db=DB)
    c.psql("CREATE EXTENSION fhir_sync;"
           "SELECT fhir_track('patient', 'Patient');"
           "SELECT fhir_track('form', 'Encounter');", db=DB)
    c.psql(GRANTS.read_text(), db=DB)
    conn = c.connect(DB)

    def patient_sql(pid: int) -> str:
        return (f"INSERT INTO patient (id, name_family, name_given, birth_date, gender, identifier_system, "
                f"identifier_value) VALUES ({pid}, 'Family{pid}', 'Given', '1980-01-01', 'female', "
                f"'http://hospital.example.org/mrn', 'MRN-{pid:04d}');")

    # --- 5 delivered: 3 patients in one transaction (the first PUT takes >= 0.3 s), then 2 forms
    faults.delay(0.3, times=1, match={"method": "PUT"})
    with conn.transaction():
        for pid in (1, 2, 3):
            conn.execute(patient_sql(pid))
    wait_until(lambda: status(c)["processed_total"] == 3 and status(c)["unprocessed"] == 0,
               timeout=30, message="3 patients delivered")
    conn.execute("INSERT INTO form (id, patient_id, name, encounter_date) VALUES "
                 "(1, 1, 'Check-up', '2024-03-01 09:30+00'), (2, 1, 'Follow-up', '2024-04-01 09:30+00')")
    wait_until(lambda: status(c)["processed_total"] == 5 and status(c)["unprocessed"] == 0,
               timeout=30, message="2 forms delivered")

    # --- 1 rejected: the server answers 422 to the next Patient PUT -> DLQ
    faults.respond(422, times=1, match={"method": "PUT", "type": "Patient"})
    conn.execute(patient_sql(4))
    wait_until(lambda: status(c)["dlq_size"] == 1 and status(c)["unprocessed"] == 0,
               timeout=30, message="patient 4 dead-lettered")

    # --- server down: 3 changes in one transaction stay pending, the worker pauses
    faults.refuse()
    with conn.transaction():
        conn.execute(patient_sql(5))
        conn.execute(patient_sql(6))
        conn.execute("INSERT INTO form (id, patient_id, name, encounter_date) "
                     "VALUES (3, 1, 'Emergency', '2024-05-01 09:30+00')")
    wait_until(lambda: call_errors(c).get("unreachable") == 1
               and c.query("SELECT state FROM fhir_sync_workers", db=DB) == [("paused",)],
               timeout=30, message="worker paused on the unreachable server")

    # What fhir_sync itself says, right before the scrape (nothing changes while paused).
    st = status(c)
    assert (st["unprocessed"], st["processed_total"], st["failed_total"], st["dlq_size"],
            st["dead_lettered_total"], st["fhir_calls"], st["fhir_call_errors"]) == (3, 5, 1, 1, 1, 6, 2), st
    assert st["paused_reason"] == "server unreachable"
    hist = c.query("SELECT le, count FROM fhir_sync_latency_histogram() ORDER BY le", db=DB)
    latency_sum = c.query("SELECT latency_sum_seconds FROM fhir_sync_stats()", db=DB)[0][0]

    # The exporter connects as the role of grants.sql (not a superuser), which cannot read patient data.
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        with psycopg.connect(f"host=127.0.0.1 port={c.port} user=fhir_sync_exporter dbname={DB}") as x:
            x.execute("SELECT count(*) FROM fhir_outbox")
    dsn = f"postgresql://fhir_sync_exporter@127.0.0.1:{c.port}/{DB}?sslmode=disable"
    exp = Exporter(dsn, c.dir / "postgres_exporter.log")
    try:
        lag_before = status(c)["lag_seconds"]
        s = exp.wait_scrape()
        lag_after = status(c)["lag_seconds"]
    finally:
        exp.stop()
    log = exp.log()
    (c.dir / "metrics.txt").write_text(s.text)          # for post-mortems

    # --- the file loaded, the database answered, every family is there with the right type
    assert s.one("pg_exporter_user_queries_load_error", filename=str(QUERIES)) == 0, log
    assert s.one("pg_up") == 1, log
    assert s.one("pg_exporter_last_scrape_error") == 0, log
    seen = {n: t for n, t in s.types.items() if n.startswith("fhir_")}
    assert seen == FHIR_METRICS, f"exported families differ from FHIR_METRICS:\n{seen}\n{log}"
    assert not re.search(r"(?i)level=error.*fhir", log), log

    # --- outbox
    assert s.one("fhir_outbox_unprocessed_count") == 3
    assert s.one("fhir_outbox_pending_transactions") == 1
    lag = s.one("fhir_outbox_lag_seconds")
    assert 0 < lag_before <= lag <= lag_after, (lag_before, lag, lag_after)

    # --- connector counters
    assert s.one("fhir_connector_processed_total") == 5
    assert s.one("fhir_connector_failed_total") == 1          # the 422; an unreachable server is no failure
    assert s.one("fhir_connector_dead_lettered_total") == 1
    assert s.one("fhir_dlq_total") == 1

    # --- call errors: one of each kind we caused, every class reported
    assert s.by("fhir_call_errors_total", "error_class") == {
        k: (1.0 if k in ("rejected", "unreachable") else 0.0) for k in ERROR_CLASSES}

    # --- latency histogram: 6 calls (5 delivered, 1 rejected; a refused connection is no call); one took >= 0.3 s
    assert s.types["fhir_call_latency_seconds"] == "histogram"
    buckets = s.by("fhir_call_latency_seconds_bucket", "le")
    assert sorted(float(k) for k in buckets) == LATENCY_BOUNDS + [math.inf], buckets
    by_bound = {float(k): v for k, v in buckets.items()}
    assert by_bound == {le: float(n) for le, n in hist}, (buckets, hist)      # what fhir_sync says
    assert by_bound[math.inf] == 6
    assert s.one("fhir_call_latency_seconds_count") == 6
    counts = [by_bound[b] for b in sorted(by_bound)]
    assert counts == sorted(counts), f"buckets not cumulative: {buckets}"
    assert by_bound[0.25] <= 5, f"the 0.3 s call must sit above le=0.25: {buckets}"
    assert s.one("fhir_call_latency_seconds_sum") == pytest.approx(latency_sum, abs=1e-6)
    assert latency_sum >= 0.3

    # --- per table
    pend = {(lb["table"], lb["resource_type"]): v for lb, v in s.get("fhir_outbox_table_pending")}
    assert pend == {("public.patient", "Patient"): 2, ("public.form", "Encounter"): 1}, pend
    dead = {(lb["table"], lb["resource_type"]): v for lb, v in s.get("fhir_outbox_table_dead_lettered")}
    assert dead == {("public.patient", "Patient"): 1, ("public.form", "Encounter"): 0}, dead
    tlag = {lb["table"]: v for lb, v in s.get("fhir_outbox_table_lag_seconds")}
    assert set(tlag) == {"public.patient", "public.form"}
    assert all(0 < v <= lag_after for v in tlag.values()), tlag
    assert lag_before <= max(tlag.values()) <= lag_after, (lag_before, tlag, lag_after)   # the oldest change

    # --- workers
    assert s.by("fhir_sync_workers", "state") == {k: (1.0 if k == "paused" else 0.0) for k in WORKER_STATES}



# ------------------------------------------------------------------------------------------------
# Prometheus
@pytest.mark.skipif(not shutil.which("prometheus"), reason="prometheus not installed")
def test_prometheus_loads_the_rules_and_parses_every_dashboard_query(tmp_path):
    """A real Prometheus (Debian's) loads prometheus.yml + alerts.yml and parses every PromQL expression."""
    port = free_port()
    log = open(tmp_path / "prometheus.log", "wb")
    proc = subprocess.Popen(
        [shutil.which("prometheus"), f"--config.file={PROMETHEUS_YML}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    base = f"http://127.0.0.1:{port}"

    def get(path: str, **params):
        url = base + path + ("?" + urllib.parse.urlencode(params) if params else "")
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                status, body = r.status, r.read()
        except urllib.error.HTTPError as e:
            status, body = e.code, e.read()
        return status, (json.loads(body) if body.startswith(b"{") else body)

    try:
        def ready():
            assert proc.poll() is None, (tmp_path / "prometheus.log").read_text()
            return get("/-/ready")[0] == 200 or None
        wait_until(ready, timeout=30, interval=0.2, message="prometheus ready")
        status, body = get("/api/v1/rules")
        assert status == 200, body
        loaded = {r["name"] for g in body["data"]["groups"] for r in g["rules"]}
        assert loaded == {r["alert"] for r in alert_rules()}

        exprs = dashboard_exprs(json.loads(DASHBOARD.read_text())) + \
            [(f"alert {r['alert']}", r["expr"]) for r in alert_rules()]
        for where, expr in exprs:
            q = expr.replace("$__rate_interval", "1m").replace("$instance", ".*")
            status, body = get("/api/v1/query", query=q)
            assert status == 200 and body.get("status") == "success", f"{where}: {expr!r}: {body}"
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        log.close()
