"""Observability: fhir_sync's metrics through Debian's prometheus-postgres-exporter (0.11.1) with
docker/postgres_exporter/queries.yaml, the Prometheus rules and config, the Grafana dashboard, and the
docker/ stack files (checked statically: no Docker engine here).

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
import yaml

from harness.util import REPO_ROOT, free_port, wait_until

DOCKER = REPO_ROOT / "docker"
QUERIES = DOCKER / "postgres_exporter" / "queries.yaml"
GRANTS = DOCKER / "postgres_exporter" / "grants.sql"
PROMETHEUS_YML = DOCKER / "prometheus" / "prometheus.yml"
ALERTS_YML = DOCKER / "prometheus" / "alerts.yml"
ALERTS_TEST_YML = DOCKER / "prometheus" / "alerts_test.yml"
GRAFANA = DOCKER / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "fhir_sync.json"
COMPOSE = DOCKER / "compose.yaml"
FIXTURES = REPO_ROOT / "tests" / "fixtures"

EXPORTER_BIN = shutil.which("prometheus-postgres-exporter") or "/usr/bin/prometheus-postgres-exporter"
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"
# The postgres_exporter version queries.yaml is tested with (Debian 12's); compose runs the same one.
EXPORTER_VERSION = "0.11.1"

# ------------------------------------------------------------------------------------------------
# THE list: every metric family queries.yaml produces, with its Prometheus type. The exporter test
# asserts it sees exactly these fhir_* families (and their values); the dashboard and the alert
# rules may use no other metric name (plus EXPORTER_METRICS, which postgres_exporter itself adds).
FHIR_METRICS = {
    "fhir_outbox_unprocessed_count": "gauge",
    "fhir_outbox_lag_seconds": "gauge",
    "fhir_outbox_pending_transactions": "gauge",
    "fhir_connector_processed_total": "counter",
    "fhir_connector_failed_total": "counter",
    "fhir_connector_dead_lettered_total": "counter",
    "fhir_dlq_total": "gauge",
    "fhir_call_latency_seconds": "histogram",
    "fhir_call_errors_total": "counter",
    "fhir_outbox_table_pending": "gauge",
    "fhir_outbox_table_dead_lettered": "gauge",
    "fhir_outbox_table_lag_seconds": "gauge",
    "fhir_sync_workers": "gauge",
}
EXPORTER_METRICS = {"pg_up": "gauge"}
# Prometheus makes these itself for every scrape target (alerts may use them).
PROMETHEUS_SYNTHETIC = {"up"}

ERROR_CLASSES = ["transient", "unreachable", "auth", "conflict", "rejected", "unmappable", "dependency",
                 "exhausted"]
LATENCY_BOUNDS = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]
WORKER_STATES = ["starting", "idle", "working", "paused"]


def series_names() -> set[str]:
    """Sample names the families above expose (a histogram as _bucket, _sum, _count)."""
    out = set()
    for name, kind in {**FHIR_METRICS, **EXPORTER_METRICS}.items():
        out |= {name + s for s in ("_bucket", "_sum", "_count")} if kind == "histogram" else {name}
    return out


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
# PromQL: which metric names an expression uses
_PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless",
                 "offset", "atan2", "inf", "nan"}


def promql_metric_names(expr: str) -> set[str]:
    """Metric names referenced by a PromQL expression (Grafana variables allowed)."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'', '""', expr)            # strings
    e = re.sub(r"\{[^}]*\}", " ", e)                                              # label matchers
    e = re.sub(r"\[[^\]]*\]", " ", e)                                             # ranges
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", e)   # label lists
    e = re.sub(r"\$\{?[A-Za-z_][A-Za-z0-9_]*\}?", " ", e)                         # Grafana variables
    names = set()
    for m in re.finditer(r"(?<![\w.])([A-Za-z_:][A-Za-z0-9_:]*)(\s*\()?", e):
        word, call = m.group(1), m.group(2)
        if call or word.lower() in _PROMQL_WORDS:
            continue
        names.add(word)
    return names


def test_promql_metric_name_extraction():
    assert promql_metric_names('histogram_quantile(0.9, sum by (le) (rate(a_bucket{instance=~"$instance"}'
                               '[$__rate_interval])))') == {"a_bucket"}
    assert promql_metric_names('sum by (job, server) (rate(x_total[5m])) / on (job) group_left '
                               'sum without (le) (y) > 0.05') == {"x_total", "y"}
    assert promql_metric_names('up{job="fhir_sync"} == 0 and bool pg_up offset 5m') == {"up", "pg_up"}
    assert promql_metric_names('delta(fhir_dlq_total{a="b{c}"}[15m]) > 1e3') == {"fhir_dlq_total"}


def dashboard_exprs(dash: dict) -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target (rows' nested panels included) and template query."""
    out = []

    def walk(panels):
        for p in panels:
            for t in p.get("targets") or []:
                if t.get("expr"):
                    out.append((f"panel {p.get('title')!r} {t.get('refId')}", t["expr"]))
            walk(p.get("panels") or [])
    walk(dash.get("panels") or [])
    for v in (dash.get("templating") or {}).get("list") or []:
        q = v.get("query")
        q = q.get("query") if isinstance(q, dict) else q
        if v.get("type") == "query" and q:
            m = re.fullmatch(r"\s*label_values\(\s*(.+?)\s*,\s*\w+\s*\)\s*", q)
            out.append((f"variable {v['name']}", m.group(1) if m else q))
    return out


def alert_rules() -> list[dict]:
    doc = yaml.safe_load(ALERTS_YML.read_text())
    return [r for g in doc["groups"] for r in g["rules"]]


# ------------------------------------------------------------------------------------------------
# Grafana
def test_grafana_dashboard_uses_only_exported_metrics():
    dash = json.loads(DASHBOARD.read_text())
    allowed = series_names()
    exprs = dashboard_exprs(dash)
    assert len(exprs) >= 10, exprs
    for where, expr in exprs:
        names = promql_metric_names(expr)
        assert names, f"{where}: no metric in {expr!r}"
        assert names <= allowed, f"{where}: {sorted(names - allowed)} not exported (FHIR_METRICS): {expr!r}"

    # The panels the issue asks for, on the metrics that carry them.
    text = {p["title"]: " ".join(t["expr"] for t in p.get("targets", [])) for p in dash["panels"]}
    joined = "\n".join(text.values())
    assert re.search(r"rate\(fhir_connector_processed_total\{", text["Throughput"])
    assert "fhir_outbox_lag_seconds" in text["Lag"]
    assert "fhir_dlq_total" in text["Dead-letter queue"]
    for q in ("0.5", "0.9", "0.99"):
        assert re.search(rf"histogram_quantile\({re.escape(q)}, sum by \(le\) \(rate\(fhir_call_latency_seconds_bucket\{{",
                         text["FHIR call latency"]), q
    assert "sum by (error_class) (rate(fhir_call_errors_total{" in text["FHIR call errors by class"]
    assert "fhir_outbox_table_pending" in joined and "fhir_sync_workers" in joined

    # Datasource: every reference is the provisioned one; ids unique.
    ds = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yaml").read_text())["datasources"]
    uids = {d["uid"] for d in ds if d["type"] == "prometheus"}
    refs = [p["datasource"]["uid"] for p in dash["panels"]] + \
           [t["datasource"]["uid"] for p in dash["panels"] for t in p.get("targets", [])]
    assert set(refs) <= uids, (set(refs), uids)
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))


def test_grafana_provisioning_matches_compose():
    compose = yaml.safe_load(COMPOSE.read_text())
    g = compose["services"]["grafana"]
    mounts = dict(_bind_mounts(g))                       # host path -> container path
    prov = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "fhir_sync.yaml").read_text())
    (provider,) = prov["providers"]
    assert provider["type"] == "file"
    assert mounts[DOCKER / "grafana" / "dashboards"] == provider["options"]["path"]
    assert mounts[DOCKER / "grafana" / "provisioning"] == "/etc/grafana/provisioning"
    home = g["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == provider["options"]["path"] + "/" + DASHBOARD.name
    (ds,) = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yaml").read_text())["datasources"]
    host, port = re.fullmatch(r"http://([^:/]+):(\d+)/?", ds["url"]).groups()
    assert host in compose["services"] and host == "prometheus"
    assert int(port) in _container_ports(compose["services"]["prometheus"])


# ------------------------------------------------------------------------------------------------
# Prometheus
@pytest.mark.skipif(not Path(PROMTOOL).exists(), reason="promtool not installed")
def test_promtool_checks_rules_and_config():
    for args in (["check", "rules", ALERTS_YML], ["check", "config", PROMETHEUS_YML],
                 ["test", "rules", ALERTS_TEST_YML]):
        r = subprocess.run([PROMTOOL, *map(str, args)], capture_output=True, text=True, timeout=60,
                           cwd=REPO_ROOT)
        assert r.returncode == 0, f"promtool {' '.join(map(str, args))}:\n{r.stdout}{r.stderr}"
    cfg = yaml.safe_load(PROMETHEUS_YML.read_text())
    assert [(PROMETHEUS_YML.parent / f).resolve() for f in cfg["rule_files"]] == [ALERTS_YML.resolve()]


def test_alerts_cover_the_issue_and_use_only_exported_metrics():
    rules = alert_rules()
    allowed = series_names() | PROMETHEUS_SYNTHETIC
    used = {}
    for r in rules:
        names = promql_metric_names(r["expr"])
        assert names and names <= allowed, f"{r['alert']}: {sorted(names - allowed)} not exported"
        assert r["labels"]["severity"] in ("warning", "critical")
        assert r["annotations"]["summary"]
        used[r["alert"]] = (names, r["expr"])
    # lag above a threshold, DLQ growing, worker down, worker paused, error rate
    assert "fhir_outbox_lag_seconds" in used["FhirSyncLagHigh"][0]
    assert "fhir_dlq_total" in used["FhirSyncDlqGrowing"][0]
    assert "fhir_sync_workers" in used["FhirSyncWorkerDown"][0]
    assert 'state="paused"' in used["FhirSyncWorkerPaused"][1]
    assert {"fhir_call_errors_total", "fhir_call_latency_seconds_count"} <= used["FhirSyncCallErrorRate"][0]
    # every alert has a unit test
    tests = yaml.safe_load(ALERTS_TEST_YML.read_text())["tests"]
    tested = {a["alertname"] for t in tests for a in t["alert_rule_test"] if a["exp_alerts"]}
    assert tested == set(used), set(used) - tested


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


# ------------------------------------------------------------------------------------------------
# docker/: what can be checked without a Docker engine
def _bind_mounts(service: dict):
    """(host path resolved against docker/, container path) of a service's bind mounts."""
    for v in service.get("volumes") or []:
        if isinstance(v, dict):
            src, dst = v.get("source"), v.get("target")
            if v.get("type") != "bind":
                continue
        else:
            src, dst = v.split(":")[:2]
        if src.startswith((".", "/")):
            yield (DOCKER / src).resolve(), dst


def _container_ports(service: dict) -> set[int]:
    return {int(str(p).split(":")[-1].split("/")[0]) for p in service.get("ports") or []}


def _host_ports(service: dict) -> list[int]:
    out = []
    for p in service.get("ports") or []:
        parts = str(p).split("/")[0].split(":")
        assert len(parts) >= 2, f"port {p!r}: publish as host:container"
        out.append(int(parts[-2]))
    return out


def _dockerfile(path: Path) -> list[str]:
    """Instructions of a Dockerfile, continuation lines joined, comments dropped."""
    lines, cur = [], ""
    for raw in path.read_text().splitlines():
        s = raw.strip()
        if not cur and (not s or s.startswith("#")):
            continue
        cur += " " + s.rstrip("\\").strip()
        if not s.endswith("\\"):
            lines.append(cur.strip())
            cur = ""
    return lines


def _arg_default(lines: list[str], name: str) -> str:
    for ln in lines:
        m = re.fullmatch(rf"ARG {name}=(\S+)", ln)
        if m:
            return m.group(1)
    raise AssertionError(f"no ARG {name}=...")


def _ignored(ignore_file: Path, rel: str) -> bool:
    """Whether .dockerignore rules exclude rel (last matching pattern wins; enough for our simple file)."""
    import fnmatch
    ignored = False
    for ln in ignore_file.read_text().splitlines():
        ln = ln.strip()
        if not ln or ln.startswith("#"):
            continue
        neg = ln.startswith("!")
        pat = ln.lstrip("!").strip("/")
        parts = rel.strip("/").split("/")
        if any(fnmatch.fnmatch("/".join(parts[:i]), pat) for i in range(1, len(parts) + 1)):
            ignored = not neg
    return ignored


def _cargo_pgrx_version() -> str:
    m = re.search(r'^pgrx\s*=\s*"=?([\d.]+)"', (REPO_ROOT / "Cargo.toml").read_text(), re.M)
    return m.group(1)


def test_compose_files_exist_names_agree_and_ports_do_not_clash():
    compose = yaml.safe_load(COMPOSE.read_text())
    svcs = compose["services"]
    assert set(svcs) == {"postgres", "helios", "postgres-exporter", "prometheus", "grafana"}

    # every path it builds or mounts exists; named volumes are declared; depends_on names services
    for name, s in svcs.items():
        if "build" in s:
            b = s["build"] if isinstance(s["build"], dict) else {"context": s["build"]}
            ctx = (DOCKER / b["context"]).resolve()
            assert ctx.is_dir(), f"{name}: build context {ctx}"
            df = ctx / b.get("dockerfile", "Dockerfile")
            assert df.is_file(), f"{name}: {df}"
            assert s.get("image"), f"{name}: a built service names its image"
        for src, dst in _bind_mounts(s):
            assert src.exists(), f"{name}: mount source {src} does not exist"
            assert REPO_ROOT in src.parents, f"{name}: {src} is outside the repository"
        for v in s.get("volumes") or []:
            src = v.split(":")[0] if isinstance(v, str) else v.get("source")
            if not src.startswith((".", "/")):
                assert src in (compose.get("volumes") or {}), f"{name}: volume {src} not declared"
        deps = s.get("depends_on") or []
        for d in deps if isinstance(deps, list) else deps.keys():
            assert d in svcs, f"{name} depends on unknown service {d}"

    # host ports: unique
    hp = [p for s in svcs.values() for p in _host_ports(s)]
    assert len(hp) == len(set(hp)), f"host ports clash: {hp}"

    # postgres -> helios: fhir_sync.server_url names the helios service and its port
    pg = svcs["postgres"]
    settings = dict(a.split("=", 1) for a in pg["command"] if "=" in a)
    host, port = re.fullmatch(r"http://([^:/]+):(\d+)/?", settings["fhir_sync.server_url"]).groups()
    assert host == "helios" and int(port) in _container_ports(svcs["helios"])
    helios_df = _dockerfile(DOCKER / "helios" / "Dockerfile")
    assert any(f"HFS_SERVER_PORT={port}" in ln for ln in helios_df)
    assert settings["fhir_sync.database"] == pg["environment"]["POSTGRES_DB"]

    # initdb: demo tables, then the extension, then the exporter's role, then its password
    initdb = sorted((dst, src) for src, dst in _bind_mounts(pg) if dst.startswith("/docker-entrypoint-initdb.d/"))
    assert [src for _, src in initdb] == [
        FIXTURES / "health_tables.sql", DOCKER / "initdb" / "20-fhir_sync.sql", GRANTS,
        DOCKER / "initdb" / "31-exporter-password.sh"]
    assert os.access(DOCKER / "initdb" / "31-exporter-password.sh", os.X_OK)
    assert pg["environment"]["EXPORTER_PASSWORD"]

    # exporter: the tested version, our queries.yaml where --extend.query-path says, a DSN naming the
    # postgres service, its database and the role of grants.sql
    ex = svcs["postgres-exporter"]
    assert ex["image"] == f"quay.io/prometheuscommunity/postgres-exporter:v{EXPORTER_VERSION}", ex["image"]
    qpath = next(a.split("=", 1)[1] for a in ex["command"] if a.startswith("--extend.query-path="))
    assert dict(_bind_mounts(ex))[QUERIES.resolve()] == qpath
    dsn = ex["environment"]["DATA_SOURCE_NAME"]
    m = re.fullmatch(r"postgresql://(\w+):[^@]+@([\w-]+):(\d+)/(\w+)\?sslmode=disable", dsn)
    assert m, dsn
    assert m.group(1) == "fhir_sync_exporter" and "fhir_sync_exporter" in GRANTS.read_text()
    assert m.group(2) == "postgres" and m.group(3) == "5432" and m.group(4) == pg["environment"]["POSTGRES_DB"]
    ex_port = int(next(a for a in ex["command"] if a.startswith("--web.listen-address=")).rsplit(":", 1)[1])
    assert ex_port in _container_ports(ex)

    # prometheus: its config is in the mounted directory and scrapes the exporter service
    pr = svcs["prometheus"]
    conf = next(a.split("=", 1)[1] for a in pr["command"] if a.startswith("--config.file="))
    mounts = {dst: src for src, dst in _bind_mounts(pr)}
    conf_dir = Path(conf).parent.as_posix()
    assert mounts[conf_dir] == PROMETHEUS_YML.parent.resolve()
    assert (mounts[conf_dir] / Path(conf).name).is_file()
    targets = [t for sc in yaml.safe_load(PROMETHEUS_YML.read_text())["scrape_configs"]
               if sc["job_name"] == "fhir_sync" for st in sc["static_configs"] for t in st["targets"]]
    assert targets == [f"postgres-exporter:{ex_port}"]


def test_dockerfiles_build_what_the_repo_pins():
    df = _dockerfile(DOCKER / "Dockerfile")
    froms = [ln.split()[1] for ln in df if ln.startswith("FROM ")]
    pg_major = _arg_default(df, "PG_MAJOR")
    assert froms == ["rust:1.95-bookworm", "postgres:${PG_MAJOR}-bookworm"], froms
    cargo = (REPO_ROOT / "Cargo.toml").read_text()
    assert re.search(r'rust-version\s*=\s*"1\.95"', cargo)
    assert re.search(rf'default\s*=\s*\["pg{pg_major}"\]', cargo)           # the extension's default PG
    assert _arg_default(df, "PGRX_VERSION") == _cargo_pgrx_version() == "0.18.1"
    run = " ".join(ln for ln in df if ln.startswith("RUN "))
    assert "postgresql-server-dev-${PG_MAJOR}" in run
    assert "cargo install cargo-pgrx --version ${PGRX_VERSION} --locked" in run
    assert "cargo pgrx package" in run
    assert "shared_preload_libraries" in run and "'fhir_sync'" in run
    # every COPY from the context exists and is not dropped by Dockerfile.dockerignore
    ignore = DOCKER / "Dockerfile.dockerignore"
    for ln in df:
        if ln.startswith("COPY ") and "--from=" not in ln:
            for src in ln.split()[1:-1]:
                assert (REPO_ROOT / src).exists(), src
                assert not _ignored(ignore, src), f"{src} is excluded by {ignore.name}"
    assert _ignored(ignore, "target/release/x") and _ignored(ignore, "tests/e2e")
    # the package layout the runtime stage copies is what cargo pgrx package writes
    copy = next(ln for ln in df if ln.startswith("COPY --from=build"))
    assert "/build/target/release/fhir_sync-pg${PG_MAJOR}/usr/" in copy

    h = _dockerfile(DOCKER / "helios" / "Dockerfile")
    from harness.util import HFS_BIN, SEARCH_PARAMS
    hv = _arg_default(h, "HELIOS_VERSION")
    assert HFS_BIN.parent.parent.name == f"helios-{hv}"                     # what the tests run
    assert SEARCH_PARAMS.parent.name == f"medplum-{_arg_default(h, 'MEDPLUM_VERSION')}"
    assert "--no-default-features --features R4,sqlite" in " ".join(h)
    compose = yaml.safe_load(COMPOSE.read_text())
    assert compose["services"]["helios"]["image"] == f"fhir_sync/helios:{hv}"
    assert compose["services"]["postgres"]["image"] == f"fhir_sync/postgres:{pg_major}"
