#!/usr/bin/env python3
"""fhir_sync benchmarks: how fast changes get from a commit to the FHIR server, and what capture costs.

    benches/run.sh [scenario ...] [options]        # the one command (builds, installs, then runs this)
    python benches/bench.py [scenario ...] [options]

Scenarios (default: every one but soak10m; "all" adds it):
    steady     paced single-row transactions (200 rows/s, 30 s): commit -> arrival latency
    burst20k   20,000 rows in one commit: drain rows/s with single PUTs, then with Bundles (bundle_size 100)
    burst100k  100,000 rows in one commit: drained, writes <= rows, worker memory sampled during the drain
    slow20ms   the endpoint answers after 20 ms: rows/s with max_in_flight and Bundles; in-flight per identifier
    capture    us per captured row (DO loop, tracked vs untracked) and pgbench TPS tracked vs untracked
    claim1m    EXPLAIN (ANALYZE, BUFFERS) of the claim with 1k / 1M pending and 1k pending + 1M delivered
    soak10m    10 min at 300 rows/s with fhir_cleanup_old(0) every minute: first vs last minute, outbox bloat
    helios     steady and burst against the real Helios FHIR server (if installed)
    wal        WAL the worker writes per delivered change (pg_walinspect, by record type): first writes and
               updates, single PUTs and Bundles of 100, captured with delivery paused, then drained alone
    walsim     the same per-change WAL for candidate designs of issue 17 (lease, settle, state), replayed in SQL
               on copies of the outbox and sync-state tables
    walfirst   the same for a first write's identity reservation and settle, by candidate design of the sync state

It starts its own PostgreSQL 15 cluster under target/bench/cluster (fhir_sync preloaded, track_commit_timestamp on,
fsync on) and the local endpoint (benches/endpoint), prints one table per scenario and writes every figure to
target/bench/results.json. It prints figures and does not judge them: it exits non-zero only when something is
broken (a row never arrived, a row was dead-lettered, the endpoint crashed, a wait timed out).

Latency = commit -> arrival at the endpoint, per row: the commit time is pg_xact_commit_timestamp(xmin) of the
source row, the arrival is the endpoint's CLOCK_REALTIME record, matched by the patient's identifier (unique per
run and scenario). Against Helios (no arrival record) latency is commit -> settled (fhir_outbox_delivered.processed_at).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import re
import select
import signal
import statistics
import subprocess
import sys
import threading
import time
import traceback
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "e2e"))

from harness.cluster import Cluster  # noqa: E402
from harness.pg import PG  # noqa: E402
from harness.util import HFS_BIN, free_port, wait_until  # noqa: E402

PG_BIN = Path(PG.bindir)   # this machine's PostgreSQL 15, unless FHIR_SYNC_PG_* name another

import psycopg  # noqa: E402

BENCH_DIR = REPO / "target" / "bench"
FIXTURES = REPO / "tests" / "fixtures"
DB = "bench"
MRN = "urn:bench:mrn"
DEFAULT_ENDPOINT = REPO / "target" / "bench-endpoint" / "release" / "fhir-bench-endpoint"


SCENARIOS = ["steady", "burst20k", "burst100k", "slow20ms", "capture", "claim1m", "soak10m", "helios", "wal",
             "walsim", "walfirst"]
DEFAULT_SCENARIOS = [s for s in SCENARIOS if s != "soak10m"]


class Broken(Exception):
    """Something is wrong (not merely slow): rows lost, dead-lettered, endpoint gone, a wait timed out."""


class ServerDied(Broken):
    """A server process crashed (or the postmaster is gone): the rest of the run cannot be trusted."""


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------------------------------------- statistics
def pct(values: list[float], p: float) -> float | None:
    """Nearest-rank percentile."""
    if not values:
        return None
    s = sorted(values)
    k = max(0, min(len(s) - 1, int(round(p / 100.0 * len(s) + 0.5)) - 1))
    return s[k]


def lat_summary(lat_ms: list[float]) -> dict:
    if not lat_ms:
        return {"n": 0}
    return {"n": len(lat_ms), "p50": pct(lat_ms, 50), "p95": pct(lat_ms, 95), "p99": pct(lat_ms, 99),
            "max": max(lat_ms), "mean": statistics.fmean(lat_ms)}


def fmt(v, digits: int = 1) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        return f"{v:.{digits}f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def table(title: str, headers: list[str], rows: list[list]) -> str:
    cells = [[fmt(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    line = "+".join("-" * (w + 2) for w in widths)
    out = [f"\n== {title}", line,
           "|".join(f" {h:<{w}} " for h, w in zip(headers, widths)), line]
    for r in cells:
        out.append("|".join(f" {c:>{w}} " if i else f" {c:<{w}} " for i, (c, w) in enumerate(zip(r, widths))))
    out.append(line)
    text = "\n".join(out)
    print(text, flush=True)
    return text


# ---------------------------------------------------------------------------------------------- endpoint
class Endpoint:
    """The local FHIR endpoint (benches/endpoint), one process for the whole run."""

    def __init__(self, binary: Path, port: int, workdir: Path):
        self.binary = Path(binary)
        self.port = port
        self.record = workdir / "endpoint-arrivals.json"
        self.logfile = workdir / "endpoint.log"
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, delay_ms: int = 0) -> "Endpoint":
        if not self.binary.exists():
            raise FileNotFoundError(f"{self.binary} not found: build it with "
                                    f"cargo build --release --manifest-path benches/endpoint/Cargo.toml")
        err = open(self.logfile, "ab")
        self.proc = subprocess.Popen([str(self.binary), "--port", str(self.port), "--delay-ms", str(delay_ms),
                                      "--record", str(self.record), "--quiet"],
                                     stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL,
                                     start_new_session=True)
        err.close()
        ready, _, _ = select.select([self.proc.stdout], [], [], 10)
        line = self.proc.stdout.readline().decode().strip() if ready else ""
        if not line.startswith("listening"):
            self.stop()
            raise Broken(f"endpoint did not start (got {line!r}); see {self.logfile}")
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def check(self) -> None:
        if not self.alive():
            rc = self.proc.returncode if self.proc else None
            raise Broken(f"the endpoint died (exit {rc}); see {self.logfile}")

    def _call(self, method: str, path: str, timeout: float = 60):
        req = urllib.request.Request(self.url + path, method=method, data=b"" if method == "POST" else None)
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read())

    def stats(self, arrivals: bool = False, since: int = 0) -> dict:
        self.check()
        q = f"?since={since}" if arrivals else "?arrivals=0"
        return self._call("GET", "/_stats" + q)

    def reset(self) -> None:
        self.check()
        self._call("POST", "/_reset?store=1")

    def set_delay(self, ms: int) -> None:
        self.check()
        self._call("POST", f"/_config?delay_ms={int(ms)}")

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None


# ---------------------------------------------------------------------------------------------- memory
def proc_mem(pid: int) -> dict:
    """VmRSS, VmHWM, RssAnon, RssShmem of a process, in kB (RssAnon is its private memory: shared_buffers pages
    it touched count in RssShmem)."""
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            k, _, v = line.partition(":")
            if k in ("VmRSS", "VmHWM", "RssAnon", "RssShmem", "RssFile"):
                out[k] = int(v.split()[0])
    except (FileNotFoundError, ProcessLookupError, ValueError):
        pass
    return out


def proc_cpu_s(pid: int) -> float:
    """CPU seconds (user + system, all threads) a process has used so far."""
    f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


def clear_hwm(pid: int) -> None:
    """Resets VmHWM (Linux: echo 5 > /proc/pid/clear_refs); best effort."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        pass


class MemSampler(threading.Thread):
    def __init__(self, pid_fn, interval: float = 0.25):
        super().__init__(daemon=True)
        self.pid_fn = pid_fn
        self.interval = interval
        self.samples: list[tuple[float, dict]] = []
        self._halt = threading.Event()
        self.pids: set[int] = set()

    def run(self):
        while not self._halt.is_set():
            pid = self.pid_fn()
            if pid:
                self.pids.add(pid)
                m = proc_mem(pid)
                if m:
                    self.samples.append((time.time(), m))
            self._halt.wait(self.interval)

    def stop(self) -> dict:
        self._halt.set()
        self.join(5)
        if not self.samples:
            return {}
        first, last = self.samples[0][1], self.samples[-1][1]
        return {
            "samples": len(self.samples),
            "worker_pids": sorted(self.pids),
            "rss_anon_kb_start": first.get("RssAnon"),
            "rss_anon_kb_max": max(s.get("RssAnon", 0) for _, s in self.samples),
            "rss_anon_kb_end": last.get("RssAnon"),
            "vmrss_kb_max": max(s.get("VmRSS", 0) for _, s in self.samples),
            "vmrss_kb_end": last.get("VmRSS"),
            "vmhwm_kb_end": last.get("VmHWM"),
        }


def mem_cells(m: dict) -> list:
    mb = lambda kb: None if kb is None else kb / 1024.0  # noqa: E731
    return [mb(m.get("vmrss_kb_max")), mb(m.get("vmhwm_kb_end")), mb(m.get("rss_anon_kb_max"))]


# ---------------------------------------------------------------------------------------------- drivers
class PacedDriver:
    """Inserts one patient per transaction at a fixed rate from `conns` connections (each its own thread),
    row i due at t0 + i / rate. Bounded by `seconds`."""

    def __init__(self, bench: "Bench", tag: str, rate: float, seconds: float, conns: int = 2, start: int = 0):
        self.bench, self.tag, self.rate, self.seconds, self.conns = bench, tag, rate, seconds, conns
        self.start_index = start
        self.total = int(rate * seconds)
        self.sent = 0
        self.max_behind_ms = 0.0
        self.errors: list[str] = []
        self._lock = threading.Lock()
        self.t0 = 0.0
        self.t_end = 0.0

    def _run(self, k: int):
        conn = psycopg.connect(self.bench.cluster.dsn(DB), autocommit=True)
        sql = self.bench.patient_insert_sql(single=True)
        try:
            i = k
            while i < self.total:
                due = self.t0 + i / self.rate
                now = time.monotonic()
                if due > now:
                    time.sleep(due - now)
                else:
                    with self._lock:
                        self.max_behind_ms = max(self.max_behind_ms, (now - due) * 1000)
                if time.monotonic() > self.t0 + self.seconds + 30:
                    self.errors.append("driver fell more than 30 s behind; stopped")
                    return
                n = self.start_index + i
                conn.execute(sql, self.bench.patient_params(self.tag, n))
                with self._lock:
                    self.sent += 1
                i += self.conns
        except Exception as e:  # noqa: BLE001
            self.errors.append(repr(e))
        finally:
            conn.close()

    def run(self) -> "PacedDriver":
        self.t0 = time.monotonic()
        threads = [threading.Thread(target=self._run, args=(k,), daemon=True) for k in range(self.conns)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(self.seconds + 60)
        self.t_end = time.monotonic()
        if self.errors:
            raise Broken(f"driver {self.tag}: {self.errors[:3]}")
        return self

    @property
    def achieved_rate(self) -> float:
        return self.sent / max(1e-9, self.t_end - self.t0)


# ---------------------------------------------------------------------------------------------- the bench
class Bench:
    def __init__(self, args):
        self.args = args
        self.quick = args.quick
        self.run_id = time.strftime("r%m%d%H%M%S")
        self.results: dict = {"run_id": self.run_id, "started": _dt.datetime.now().isoformat(timespec="seconds"),
                              "machine": machine(), "scenarios": {}}
        self.tables: list[str] = []
        self.broken: list[str] = []
        BENCH_DIR.mkdir(parents=True, exist_ok=True)
        self.endpoint = Endpoint(Path(args.endpoint), free_port(), BENCH_DIR)
        conf = {
            "fhir_sync.database": DB,
            "fhir_sync.server_url": self.endpoint.url,
            "track_commit_timestamp": True,
            # durable commits, as in production (the e2e harness turns fsync off)
            "fsync": True,
            "synchronous_commit": "on",
            "shared_buffers": "512MB",
            "max_wal_size": "4GB",
            "checkpoint_timeout": "15min",
            "pg_stat_statements.track": "top",
            "pg_stat_statements.max": 2000,
            "log_min_messages": "warning",
            "log_checkpoints": True,
            "max_connections": 50,
        }
        preload = "fhir_sync,pg_stat_statements"
        for kv in args.conf or []:
            k, _, v = kv.partition("=")
            if k.strip() == "shared_preload_libraries":
                preload += "," + v.strip().strip("'")
            else:
                conf[k.strip()] = v.strip().strip("'")
        # Cluster.init() wipes its own directory: keep it apart from the results
        self.cluster = Cluster("cluster", conf=conf, preload=preload, base_dir=BENCH_DIR)
        self.conn: psycopg.Connection | None = None
        self.has_guc: dict[str, bool] = {}
        self.outbox_base = 0
        self.dlq_base = 0
        self.log_offset = 0

    # -------------------------------------------------------------------------------- setup / teardown
    def setup(self):
        log(f"starting endpoint on {self.endpoint.url}")
        self.endpoint.start()
        log(f"initdb + start cluster in {self.cluster.dir}")
        self.cluster.init()
        self.cluster.start()
        self.cluster.create_db(DB)
        self.conn = self.cluster.connect(DB)
        self.sql("CREATE EXTENSION fhir_sync")
        self.sql("CREATE EXTENSION pg_stat_statements")
        self.sql("CREATE EXTENSION pgstattuple")
        self.sql("CREATE EXTENSION pg_walinspect")
        self.sql((FIXTURES / "health_tables.sql").read_text())
        self.sql("SELECT fhir_track('patient', 'Patient'), fhir_track('patient_other_identifiers', 'Patient'),"
                 " fhir_track('form', 'Encounter'), fhir_track('blood_pressure', 'Observation'),"
                 " fhir_track('pulse', 'Observation')")
        for g in ("fhir_sync.bundle_size", "fhir_sync.bundle_type", "fhir_sync.max_in_flight",
                  "fhir_sync.batch_size"):
            self.has_guc[g] = self.guc_exists(g)
        self.results["extension"] = {
            "pg_version": self.one("SHOW server_version"),
            "gucs": self.has_guc,
            **installed_build(),
        }
        if self.args.build == "unknown":
            self.args.build = self.results["extension"]["build_guess"]
        self.wait_worker()
        log(f"worker pid {self.worker_pid()}; settings available: {self.has_guc}")

    def teardown(self):
        try:
            self.endpoint.stop()
        finally:
            if not self.args.keep:
                self.cluster.cleanup()
            else:
                import harness.cluster as hc
                hc._LIVE.discard(self.cluster)  # not stopped at exit either
                self.cluster.close_connections()
                log(f"cluster left running on port {self.cluster.port} (--keep); stop it with: runuser -u postgres"
                    f" -- {PG_BIN}/pg_ctl -D {self.cluster.data} stop")

    # -------------------------------------------------------------------------------- SQL helpers
    def sql(self, q: str, params=None):
        with self.conn.cursor() as cur:
            cur.execute(q, params)
            return cur.fetchall() if cur.description else None

    def one(self, q: str, params=None):
        rows = self.sql(q, params)
        return rows[0][0] if rows else None

    def guc_exists(self, name: str) -> bool:
        # A placeholder (a setting the loaded library does not define) has no description.
        return bool(self.one("SELECT short_desc IS NOT NULL AND short_desc <> '' FROM pg_settings WHERE name = %s",
                             (name,)))

    def configure(self, settle: float = 0.6, **settings):
        """ALTER SYSTEM SET fhir_sync.<name> (None: RESET) + pg_reload_conf(); the worker re-reads at SIGHUP."""
        for k, v in settings.items():
            name = k if "." in k else f"fhir_sync.{k}"
            if name in self.has_guc and not self.has_guc[name]:
                if v is not None:
                    raise Broken(f"{name} is not defined by this build of fhir_sync")
                continue
            if v is None:
                self.sql(f"ALTER SYSTEM RESET {name}")
            else:
                self.sql(f"ALTER SYSTEM SET {name} = '{v}'")
        self.sql("SELECT pg_reload_conf()")
        time.sleep(settle)

    def reset_settings(self):
        self.configure(server_url=self.endpoint.url, max_in_flight=None, batch_size=None,
                       **{k.split(".", 1)[1]: None for k in ("fhir_sync.bundle_size", "fhir_sync.bundle_type")
                          if self.has_guc.get(k)})

    def worker_pid(self) -> int | None:
        try:
            return self.one("SELECT pid FROM fhir_sync_workers WHERE database = %s AND pid IS NOT NULL LIMIT 1",
                            (DB,))
        except psycopg.Error:
            return None

    def wait_worker(self, timeout: float = 30) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pid = self.worker_pid()
            if pid:
                return pid
            time.sleep(0.2)
        raise Broken(f"no fhir_sync worker for database {DB} after {timeout}s")

    def worker_state(self) -> str | None:
        return self.one("SELECT state FROM fhir_sync_workers WHERE database = %s LIMIT 1", (DB,))

    def check_server(self) -> None:
        """Raises ServerDied when the postmaster is gone or a server process crashed since the scenario began
        (e.g. fhir_sync.so overwritten by an install while the cluster runs: SIGBUS)."""
        pid = self.cluster.postmaster_pid()
        alive = False
        if pid:
            try:
                os.kill(pid, 0)
                alive = True
            except ProcessLookupError:
                pass
        try:
            with open(self.cluster.logfile, "rb") as f:
                f.seek(self.log_offset)
                text = f.read().decode(errors="replace")
        except OSError:
            text = ""
        crash = re.search(r"terminated by signal \d+[^\n]*|PANIC:[^\n]*", text)
        if not alive or crash or self.conn.closed:
            so = installed_build()
            note = ""
            if so.get("so_mtime") != self.results.get("extension", {}).get("so_mtime"):
                note = f"; fhir_sync.so was reinstalled during the run ({so.get('so_mtime')})"
            raise ServerDied(f"the server died ({crash.group(0) if crash else 'postmaster gone'}){note}:\n"
                             + self.cluster.log_tail(15))

    def pending(self) -> int:
        return self.one("SELECT count(*) FROM fhir_outbox WHERE NOT processed")

    def delivered_rel(self) -> str:
        """Where delivered changes are: fhir_outbox_delivered since 0.6.0; before, fhir_outbox's rows marked
        processed (so that a build before it can be measured with this script)."""
        if self.one("SELECT to_regclass('fhir_outbox_delivered') IS NOT NULL"):
            return "fhir_outbox_delivered"
        return "(SELECT * FROM fhir_outbox WHERE processed) AS delivered"

    def dlq(self) -> int:
        """Dead letters made since the scenario began."""
        return self.one("SELECT count(*) FROM fhir_dlq WHERE id > %s", (self.dlq_base,))

    def status(self) -> dict:
        with self.conn.cursor() as cur:
            cur.execute("SELECT * FROM fhir_sync_status")
            row = cur.fetchone()
            return dict(zip([d.name for d in cur.description], row)) if row else {}

    # -------------------------------------------------------------------------------- rows
    def ident(self, tag: str, n: int) -> str:
        return f"{self.run_id}.{tag}.{n}"

    @staticmethod
    def patient_insert_sql(single: bool = True) -> str:
        return ("INSERT INTO patient (identifier_system, identifier_value, name_family, name_given, name_text,"
                " gender, birth_date, phone_number, email, address_line, address_city, address_state,"
                " address_postal_code, address_country) VALUES (%s, %s, %s, 'Jane', %s, %s, %s, '+1 555 0100',"
                " 'jane@example.org', '1 Main St', 'Springfield', 'IL', '62701', 'US')")

    def patient_params(self, tag: str, n: int):
        return (MRN, self.ident(tag, n), f"Doe{n}", f"Jane Doe{n}", "female" if n % 2 else "male",
                _dt.date(1950, 1, 1) + _dt.timedelta(days=n % 20000))

    def insert_burst(self, tag: str, n: int) -> float:
        """n patients in ONE transaction (INSERT ... SELECT). Returns the commit time (epoch seconds)."""
        prefix = f"{self.run_id}.{tag}."
        with self.conn.transaction():
            self.sql(
                "INSERT INTO patient (identifier_system, identifier_value, name_family, name_given, name_text,"
                " gender, birth_date, phone_number, email, address_line, address_city, address_state,"
                " address_postal_code, address_country)"
                " SELECT %s, %s || g, 'Doe' || g, 'Jane', 'Jane Doe' || g,"
                " CASE WHEN g %% 2 = 1 THEN 'female' ELSE 'male' END, date '1950-01-01' + (g %% 20000),"
                " '+1 555 0100', 'jane@example.org', '1 Main St', 'Springfield', 'IL', '62701', 'US'"
                " FROM generate_series(0, %s - 1) g", (MRN, prefix, n))
        return self.one("SELECT extract(epoch FROM pg_xact_commit_timestamp(xmin))::float8 FROM patient"
                        " WHERE identifier_value = %s", (prefix + "0",))

    def commit_times(self, tag: str) -> dict[str, float]:
        """identifier_value -> commit time (epoch us) of the scenario's patients."""
        rows = self.sql("SELECT identifier_value, (extract(epoch FROM pg_xact_commit_timestamp(xmin)) * 1e6)::int8"
                        " FROM patient WHERE identifier_system = %s AND identifier_value LIKE %s",
                        (MRN, f"{self.run_id}.{tag}.%"))
        return {v: t for v, t in rows}

    def settled_times(self, tag: str) -> dict:
        """Per patient of the scenario: (commit us, settled us = max processed_at of its delivered changes, all
        delivered, changes, max attempts). A delivered change is in fhir_outbox_delivered, a pending one in
        fhir_outbox; both name the patient by key."""
        commits = self.commit_times(tag)
        rows = self.sql(
            "WITH h AS (SELECT resource_key, max(processed_at) AS t, count(*) AS n, max(attempts) AS a"
            f"             FROM {self.delivered_rel()} WHERE id > %s AND resource_table = 'patient'::regclass GROUP BY 1),"
            "     o AS (SELECT resource_key, count(*) AS n, max(attempts) AS a"
            "             FROM fhir_outbox WHERE NOT processed AND id > %s AND resource_table = 'patient'::regclass"
            "            GROUP BY 1)"
            " SELECT p.identifier_value, (extract(epoch FROM h.t) * 1e6)::int8, o.n IS NULL AND h.n IS NOT NULL,"
            "        coalesce(h.n, 0) + coalesce(o.n, 0), greatest(h.a, o.a)"
            "   FROM patient p LEFT JOIN h ON h.resource_key = p.id::text LEFT JOIN o ON o.resource_key = p.id::text"
            "  WHERE p.identifier_system = %s AND p.identifier_value LIKE %s AND (h.n IS NOT NULL OR o.n IS NOT NULL)",
            (self.outbox_base, self.outbox_base, MRN, f"{self.run_id}.{tag}.%"))
        got = {r[0]: r[1:] for r in rows}
        return {v: (c, *got.get(v, (None, False, 0, 0))) for v, c in commits.items()}

    # -------------------------------------------------------------------------------- waiting
    def wait_drained(self, expected_writes: int | None, timeout: float, what: str,
                     endpoint_base: int = 0) -> float:
        """Until the endpoint saw expected_writes writes (if given) and the outbox has nothing pending.
        Returns the monotonic time it was drained. Raises Broken on timeout or endpoint death."""
        deadline = time.monotonic() + timeout
        last_check = time.monotonic()
        if expected_writes is not None:
            while True:
                if time.monotonic() - last_check > 1:
                    self.check_server()
                    last_check = time.monotonic()
                st = self.endpoint.stats()
                if st["writes"] - endpoint_base >= expected_writes:
                    break
                if time.monotonic() > deadline:
                    raise Broken(f"{what}: only {st['writes'] - endpoint_base} of {expected_writes} writes reached "
                                 f"the endpoint in {timeout:.0f}s (pending {self.pending()}, dlq {self.dlq()}, "
                                 f"worker {self.worker_state()})")
                time.sleep(0.05)
        while True:
            self.check_server()
            p = self.pending()
            if p == 0:
                return time.monotonic()
            if time.monotonic() > deadline:
                raise Broken(f"{what}: {p} changes still pending after {timeout:.0f}s (dlq {self.dlq()}, "
                             f"worker {self.worker_state()})")
            time.sleep(0.1)

    def pgss_reset(self):
        self.sql("SELECT pg_stat_statements_reset()")

    def pgss_top(self, n: int = 8) -> list[dict]:
        rows = self.sql(
            "SELECT calls, total_exec_time, mean_exec_time, rows, shared_blks_hit + shared_blks_read,"
            "       regexp_replace(query, '\\s+', ' ', 'g')"
            "  FROM pg_stat_statements s JOIN pg_database d ON d.oid = s.dbid AND d.datname = %s"
            " WHERE query !~* '(pg_stat_statements|fhir_sync_workers|fhir_sync_status|pg_xact_commit_timestamp"
            "|pg_reload_conf|ALTER SYSTEM|count\\(\\*\\) FROM fhir_outbox WHERE NOT processed)'"
            " ORDER BY total_exec_time DESC LIMIT %s", (DB, n))
        return [{"calls": r[0], "total_ms": r[1], "mean_ms": r[2], "rows": r[3], "blocks": r[4], "query": r[5]}
                for r in rows]

    def print_pgss(self, title: str, top: list[dict]):
        self.tables.append(table(f"{title}: statements by total time (pg_stat_statements, top-level)",
                                 ["calls", "total ms", "mean ms", "rows", "buffers", "statement"],
                                 [[t["calls"], t["total_ms"], t["mean_ms"], t["rows"], t["blocks"],
                                   t["query"][:90]] for t in top]))

    # -------------------------------------------------------------------------------- measurement
    def measure_endpoint_rows(self, tag: str, base: int) -> dict:
        """Joins the endpoint's arrivals (since index `base`) with the scenario's rows."""
        st = self.endpoint.stats(arrivals=True, since=base)
        commits = self.commit_times(tag)
        first_arrival: dict[str, int] = {}
        count: dict[str, int] = {}
        prefix = f"{MRN}|{self.run_id}.{tag}."
        for us, method, rtype, ident in st["arrivals"]:
            if method != "PUT" or not ident.startswith(prefix):
                continue
            v = ident[len(MRN) + 1:]
            count[v] = count.get(v, 0) + 1
            if v not in first_arrival:
                first_arrival[v] = us
        missing = [v for v in commits if v not in first_arrival]
        lat = [(first_arrival[v] - c) / 1000.0 for v, c in commits.items() if v in first_arrival]
        resent = sum(c - 1 for c in count.values())
        out = {"rows": len(commits), "arrived": len(first_arrival), "missing": len(missing),
               "resent": resent, "latency_ms": lat_summary(lat),
               "first_commit_us": min(commits.values()) if commits else None,
               "last_arrival_us": max(first_arrival.values()) if first_arrival else None,
               "negative_latencies": sum(1 for x in lat if x < 0)}
        if missing:
            out["missing_examples"] = missing[:5]
        return out

    def endpoint_counters(self, before: dict) -> dict:
        after = self.endpoint.stats()
        keys = ("requests", "writes", "puts", "deletes", "bundles", "errors")
        d = {k: after[k] - before.get(k, 0) for k in keys}
        d.update({k: after[k] for k in ("max_inflight_per_identifier", "overlaps", "duplicates_in_bundle",
                                        "max_requests_in_flight", "overlap_examples")})
        return d

    def begin_scenario(self) -> dict:
        """Resets the endpoint (counters, arrivals, store) and pg_stat_statements; checks nothing is pending."""
        self.check_server()
        if not self.endpoint.alive():
            log("endpoint not running: restarting it")
            self.endpoint.start()
        p = self.pending()
        if p:
            self.wait_drained(None, 120, "leftovers of the previous scenario")
        self.endpoint.reset()
        self.outbox_base = self.one("SELECT coalesce(max(id), 0) FROM fhir_outbox")
        self.dlq_base = self.one("SELECT coalesce(max(id), 0) FROM fhir_dlq")
        self.pgss_reset()
        self.sql("SELECT fhir_sync_reset_stats()")
        return self.endpoint.stats()

    def check_clean(self, what: str, res: dict):
        problems = []
        if res.get("missing"):
            problems.append(f"{res['missing']} rows never reached the endpoint (e.g. {res.get('missing_examples')})")
        d = self.dlq()
        if d:
            problems.append(f"{d} dead letters: "
                            f"{self.sql('SELECT error_class, http_status, left(error, 200) FROM fhir_dlq WHERE id > %s LIMIT 3', (self.dlq_base,))}")
        if problems:
            raise Broken(f"{what}: " + "; ".join(problems))

    # -------------------------------------------------------------------------------- WAL
    def wal_lsn(self) -> str:
        return self.one("SELECT pg_current_wal_insert_lsn()::text")

    def wal_between(self, start: str, end: str) -> dict:
        """WAL from start to end: total bytes and, per record type (pg_walinspect), records, bytes, FPI bytes."""
        # pg_walinspect reads only flushed WAL; the walwriter flushes within wal_writer_delay.
        wait_until(lambda: self.one("SELECT pg_current_wal_flush_lsn() >= %s::pg_lsn", (end,)), timeout=10,
                   message="WAL flushed")
        total = int(self.one("SELECT pg_wal_lsn_diff(%s::pg_lsn, %s::pg_lsn)", (end, start)))
        # (the first column is "resource_manager/record_type": read by position)
        kinds = [{"record": r[0], "count": int(r[1]), "bytes": int(r[3]), "fpi_bytes": int(r[5])}
                 for r in self.sql("SELECT * FROM pg_get_wal_stats(%s::pg_lsn, %s::pg_lsn, true)"
                                   " WHERE count > 0 ORDER BY 8 DESC", (start, end))]
        return {"bytes": total, "records": sum(k["count"] for k in kinds),
                "fpi_bytes": sum(k["fpi_bytes"] for k in kinds), "kinds": kinds}

    @staticmethod
    def wal_per_change(w: dict, changes: int) -> list:
        """WAL bytes, records and FPI bytes per change."""
        return [w["bytes"] / changes, w["records"] / changes, w["fpi_bytes"] / changes]

    @staticmethod
    def wal_kinds_cell(w: dict, changes: int, top: int = 6) -> str:
        """The heaviest record types, per change: 'Heap/UPDATE 1.0x 210 B; ...'."""
        return "; ".join(f"{k['record']} {k['count'] / changes:.2f}x {(k['bytes'] + k['fpi_bytes']) / changes:.0f} B"
                         for k in w["kinds"][:top])

    def wal_drain(self, tag: str, n: int, change_sql: str | None) -> dict:
        """Captures n changes with delivery paused (first writes, or with change_sql an update of the rows tag
        made), then lets the worker drain them alone and returns the WAL of the drain."""
        if change_sql is None:
            self.begin_scenario()
        else:  # the endpoint keeps what the first pass stored: the updates address it by id and version
            self.check_server()
            self.dlq_base = self.one("SELECT coalesce(max(id), 0) FROM fhir_dlq")
        requests0 = self.endpoint.stats().get("requests", 0)
        self.capture_paused(tag, n, change_sql)
        start = self.wal_lsn()
        self.configure(server_url=self.endpoint.url, settle=0)
        self.wait_drained(None, 600, f"wal {tag}")
        end = self.wal_lsn()
        w = self.wal_between(start, end)
        w.update(changes=n, requests=self.endpoint.stats().get("requests", 0) - requests0)
        # What the drain left for vacuum (dead row versions, dead index entries), paid now rather than by
        # autovacuum later: part of what a delivered change costs, whatever the design.
        self.sql("VACUUM fhir_outbox, fhir_sync_state")
        w["vacuum"] = self.wal_between(end, self.wal_lsn())
        self.check_clean(f"wal {tag}", {})
        return w

    def scenario_wal(self):
        n = 2000 if self.quick else 10000
        out, rows = {}, []
        configs = [("single", "single PUTs", {})]
        if self.has_guc.get("fhir_sync.bundle_size"):
            configs.append(("bundle", "Bundles of 100", {"bundle_size": 100, "bundle_type": "batch"}))
        for key, label, settings in configs:
            self.reset_settings()
            if settings:
                self.configure(**settings)
            tag = f"wal-{key}"
            first = self.wal_drain(tag, n, None)
            # an update of every row the first pass wrote: addressed by id, If-Match on the version
            upd = self.wal_drain(tag, n, "UPDATE patient SET name_given = 'Janet' WHERE identifier_system = %s"
                                         " AND identifier_value LIKE %s")
            out[key] = {"first_writes": first, "updates": upd}
            for what, w in (("first writes", first), ("updates", upd)):
                rows.append([f"{label}, {what}", n, w["requests"], *self.wal_per_change(w, n),
                             self.wal_kinds_cell(w, n), w["vacuum"]["bytes"] / n])
        self.reset_settings()
        self.results["scenarios"]["wal"] = out
        self.tables.append(table(
            f"wal: WAL the worker writes while it drains {n:,} changes captured with delivery paused (pg_walinspect;"
            f" target <= 150 B per delivered change)",
            ["config", "changes", "requests", "WAL B/change", "records/change", "of it FPI B", "heaviest records",
             "then VACUUM B/change"],
            rows))

    # The writes of candidate designs of issue 17 (lease, settle, sync state), run for every batch of ids in
    # its own transaction. %(ids)s: the batch.
    WALSIM_STATE_UPDATE = ("UPDATE walsim_state s SET fhir_version = (s.fhir_version::int + 1)::text,"
                           " last_synced_at = now(), last_outbox_id = o.id FROM walsim_outbox o"
                           " WHERE o.id = ANY (%(ids)s) AND s.resource_table = o.resource_table"
                           " AND s.resource_key = o.resource_key")
    WALSIM_LEASE = ("UPDATE walsim_outbox SET locked_by = 1, lock_expires_at = now() + interval '30 s'"
                    " WHERE id = ANY (%(ids)s)")
    WALSIM_SETTLE = ("UPDATE walsim_outbox SET processed = true, processed_at = now(), locked_by = NULL,"
                     " lock_expires_at = NULL, next_retry_at = NULL, fhir_resource_id = 'x' || id,"
                     " fhir_version = '2' WHERE id = ANY (%(ids)s)")
    # (name, what, outbox fillfactor, sync-state fillfactor, statements); the state is written first, while
    # the batch's outbox rows are still there to join with.
    WALSIM_CANDIDATES = [
        ("today", "row lease (HOT) + settle UPDATE (non-HOT) + state UPDATE; outbox fillfactor 50", 50, 100,
         [WALSIM_LEASE, WALSIM_STATE_UPDATE, WALSIM_SETTLE]),
        ("shmem lease", "lease in shared memory; settle UPDATE + state UPDATE", 50, 100,
         [WALSIM_STATE_UPDATE, WALSIM_SETTLE]),
        ("shmem lease, outbox ff 100", "the same, outbox fillfactor 100", 100, 100,
         [WALSIM_STATE_UPDATE, WALSIM_SETTLE]),
        ("shmem lease, state ff 70", "the same, sync-state fillfactor 70 (room for HOT updates)", 50, 70,
         [WALSIM_STATE_UPDATE, WALSIM_SETTLE]),
        ("delete", "lease in shared memory; state UPDATE + DELETE the delivered rows; outbox fillfactor 100",
         100, 100, [WALSIM_STATE_UPDATE, "DELETE FROM walsim_outbox WHERE id = ANY (%(ids)s)"]),
        ("delete, state ff 70", "the same, sync-state fillfactor 70", 100, 70,
         [WALSIM_STATE_UPDATE, "DELETE FROM walsim_outbox WHERE id = ANY (%(ids)s)"]),
        ("cursor", "append-only log: one cursor row per batch + state UPDATE", 100, 100,
         [WALSIM_STATE_UPDATE,
          "UPDATE walsim_cursor SET last_id = (SELECT max(i) FROM unnest(%(ids)s::bigint[]) i), at = now()"]),
        ("cursor, state ff 70", "the same, sync-state fillfactor 70", 100, 70,
         [WALSIM_STATE_UPDATE,
          "UPDATE walsim_cursor SET last_id = (SELECT max(i) FROM unnest(%(ids)s::bigint[]) i), at = now()"]),
        ("cursor, unlogged versions", "cursor per batch; versions in an UNLOGGED table (lost in a crash: re-read),"
         " the logged state written only when an id changes", 100, 100,
         [WALSIM_STATE_UPDATE.replace("UPDATE walsim_state", "UPDATE walsim_versions"),
          "UPDATE walsim_cursor SET last_id = (SELECT max(i) FROM unnest(%(ids)s::bigint[]) i), at = now()"]),
    ]

    def capture_paused(self, tag: str, n: int, change_sql: str | None) -> None:
        """Captures n changes with delivery paused and leaves them pending: n new patients, or with change_sql an
        update of the patients an earlier pass of tag made (and delivered)."""
        self.configure(server_url="")
        if change_sql is None:
            self.insert_burst(tag, n)
        else:
            with self.conn.transaction():
                self.sql(change_sql, (MRN, f"{self.run_id}.{tag}.%"))
        pending = self.pending()
        if pending < n:
            raise Broken(f"{tag}: {pending} changes captured, {n} expected")

    def copy_pending_to_walsim(self, fillfactor: int = 100) -> list[int]:
        """A copy of the pending changes (all of them, just captured) in walsim_outbox; returns their ids."""
        self.sql("DROP TABLE IF EXISTS walsim_outbox")
        # No autovacuum on the copies: its WAL would be counted as the replay's.
        self.sql(f"CREATE TABLE walsim_outbox (LIKE fhir_outbox INCLUDING ALL)"
                 f" WITH (fillfactor = {fillfactor}, autovacuum_enabled = off)")
        cols = ("txid, table_name, record_id, operation, resource_type, resource_table, resource_key, payload_json,"
                " identifier_system, identifier_value, created_at")
        self.sql(f"INSERT INTO walsim_outbox ({cols}) SELECT {cols} FROM fhir_outbox WHERE NOT processed ORDER BY id")
        return [r[0] for r in self.sql("SELECT id FROM walsim_outbox ORDER BY id")]

    def replay(self, ids: list[int], batch: int, transactions: list[list[str]]) -> dict:
        """Runs each batch's transactions (lists of statements, %(ids)s = the batch) and returns their WAL. The
        capture wrote these pages in this checkpoint cycle, as it does for the worker's writes."""
        self.sql("SET synchronous_commit = off")
        start = self.wal_lsn()
        for i in range(0, len(ids), batch):
            for statements in transactions:
                with self.conn.transaction():
                    for st in statements:
                        self.sql(st, {"ids": ids[i:i + batch]})
        end = self.wal_lsn()
        self.sql("RESET synchronous_commit")
        return self.wal_between(start, end)

    def resume_and_drain(self, tag: str) -> None:
        """Delivery on again: the changes captured for a replay go out, so that the next scenario starts clean."""
        self.configure(server_url=self.endpoint.url)
        self.wait_drained(None, 600, tag)

    def scenario_walsim(self):
        n = 2000 if self.quick else 10000
        batch = 100
        # Real rows: n patients delivered (their sync state exists), then an update of each captured with
        # delivery paused: the changes the candidates settle.
        self.reset_settings()
        self.wal_drain("walsim", n, None)
        self.capture_paused("walsim", n, "UPDATE patient SET name_given = 'Janet' WHERE identifier_system = %s"
                                         " AND identifier_value LIKE %s")
        out, rows = {}, []
        for key, what, fillfactor, state_ff, statements in self.WALSIM_CANDIDATES:
            ids = self.copy_pending_to_walsim(fillfactor)
            self.sql("DROP TABLE IF EXISTS walsim_state, walsim_versions, walsim_cursor")
            self.sql(f"CREATE TABLE walsim_state (LIKE fhir_sync_state INCLUDING ALL)"
                     f" WITH (fillfactor = {state_ff}, autovacuum_enabled = off)")
            self.sql("CREATE UNLOGGED TABLE walsim_versions (LIKE fhir_sync_state INCLUDING ALL)")
            self.sql("CREATE TABLE walsim_cursor (last_id bigint, at timestamptz)")
            self.sql("INSERT INTO walsim_cursor VALUES (0, now())")
            for t in ("walsim_state", "walsim_versions"):
                self.sql(f"INSERT INTO {t} SELECT s.resource_table, s.resource_key, s.resource_type, s.fhir_id, '1',"
                         f" s.identifier_system, s.identifier_value, false, now(), 0 FROM fhir_sync_state s"
                         f" JOIN walsim_outbox o USING (resource_table, resource_key)")
            self.sql("VACUUM (ANALYZE) walsim_outbox, walsim_state, walsim_versions, walsim_cursor")
            w = self.replay(ids, batch, [statements])
            m = len(ids)
            out[key] = {**w, "changes": m, "what": what}
            rows.append([key, m, *self.wal_per_change(w, m), what, self.wal_kinds_cell(w, m, top=4)])
        self.sql("DROP TABLE IF EXISTS walsim_outbox, walsim_state, walsim_versions, walsim_cursor")
        self.resume_and_drain("walsim")
        self.results["scenarios"]["walsim"] = out
        self.tables.append(table(
            f"walsim: WAL per delivered update of candidate designs, replayed in SQL over {n:,} real captured changes"
            f" in transactions of {batch} (one per batch; the worker's own claim/settle statements not included)",
            ["candidate", "changes", "WAL B/change", "records/change", "of it FPI B", "what", "heaviest records"],
            rows))

    # What a first write records in the sync state, by candidate design (docs/delivery.md): the identity
    # reservation before the send (one transaction per batch), then the settle that records the resource id
    # the server gave (another). Every candidate also deletes the delivered outbox rows, as the worker does.
    # The id: 16 hex digits, as the bench endpoint gives.
    WALFIRST_FID = "substr(md5(o.id::text), 1, 16)"
    WALFIRST_RESERVE_STATE = (
        "INSERT INTO walsim_state (resource_table, resource_key, resource_type, identifier_system, identifier_value,"
        " deleted, last_synced_at) SELECT o.resource_table, o.resource_key, o.resource_type, o.identifier_system,"
        " o.identifier_value, false, now() FROM walsim_outbox o WHERE o.id = ANY (%(ids)s)")
    WALFIRST_SETTLE_UPDATE = (
        f"UPDATE walsim_state s SET fhir_id = {WALFIRST_FID}, fhir_version = '1', last_synced_at = now(),"
        " last_outbox_id = o.id FROM walsim_outbox o WHERE o.id = ANY (%(ids)s)"
        " AND s.resource_table = o.resource_table AND s.resource_key = o.resource_key")
    WALFIRST_SETTLE_INSERT = (
        "INSERT INTO walsim_state (resource_table, resource_key, resource_type, fhir_id, fhir_version,"
        " identifier_system, identifier_value, deleted, last_synced_at, last_outbox_id)"
        f" SELECT o.resource_table, o.resource_key, o.resource_type, {WALFIRST_FID}, '1', o.identifier_system,"
        " o.identifier_value, false, now(), o.id FROM walsim_outbox o WHERE o.id = ANY (%(ids)s)")
    WALFIRST_DELETE = "DELETE FROM walsim_outbox WHERE id = ANY (%(ids)s)"
    WALFIRST_TEXT_INDEXES = [
        "CREATE INDEX ON walsim_state (identifier_value, identifier_system) WHERE NOT deleted",
        "CREATE INDEX ON walsim_state (fhir_id) WHERE NOT deleted"]
    WALFIRST_HASH = "pg_catalog.hashtextextended(identifier_value, pg_catalog.hashtextextended(identifier_system, 0))"
    WALFIRST_FID_INDEX = ("CREATE INDEX ON walsim_state (pg_catalog.hashtextextended(fhir_id, 0))"
                          " WHERE fhir_id IS NOT NULL AND NOT deleted")
    WALFIRST_HASH_INDEXES = [f"CREATE INDEX ON walsim_state ({WALFIRST_HASH}) WHERE NOT deleted", WALFIRST_FID_INDEX]
    # (name, what, DDL after walsim_state's primary key, reservation statements, settle statements)
    WALFIRST_CANDIDATES = [
        ("0.6.1", "reservation = a state row (text-keyed identifier and id indexes); the settle rewrites it"
         " with its id (non-HOT: the id is indexed)", WALFIRST_TEXT_INDEXES,
         [WALFIRST_RESERVE_STATE], [WALFIRST_SETTLE_UPDATE, WALFIRST_DELETE]),
        ("0.7.0", "the same, both indexes keyed by 64-bit hashes; a reservation gets no id index entry",
         WALFIRST_HASH_INDEXES, [WALFIRST_RESERVE_STATE], [WALFIRST_SETTLE_UPDATE, WALFIRST_DELETE]),
        ("reservation table", "0.7.0's indexes; the reservation in a narrow table (row key, identity hash: two"
         " indexes), deleted by the settle, which inserts the state row once with its id",
         WALFIRST_HASH_INDEXES + [
             "CREATE TABLE walsim_ident (resource_table regclass NOT NULL, resource_key text NOT NULL,"
             " identity bigint NOT NULL, PRIMARY KEY (resource_table, resource_key)) WITH (autovacuum_enabled = off)",
             "CREATE INDEX ON walsim_ident (identity)"],
         ["INSERT INTO walsim_ident SELECT o.resource_table, o.resource_key, pg_catalog.hashtextextended("
          "o.resource_type || '|' || o.identifier_system || '|' || o.identifier_value, 0) FROM walsim_outbox o"
          " WHERE o.id = ANY (%(ids)s)"],
         ["DELETE FROM walsim_ident i USING walsim_outbox o WHERE o.id = ANY (%(ids)s)"
          " AND i.resource_table = o.resource_table AND i.resource_key = o.resource_key",
          WALFIRST_SETTLE_INSERT, WALFIRST_DELETE]),
        ("identity table", "the row's identity kept in its own table (row key, hashed identity index), written"
         " before the send and kept; the state row (no identifier index) inserted once, by the settle",
         [WALFIRST_FID_INDEX,
          "CREATE TABLE walsim_ident (resource_table regclass NOT NULL, resource_key text NOT NULL, resource_type"
          " text NOT NULL, identifier_system text NOT NULL, identifier_value text NOT NULL,"
          " PRIMARY KEY (resource_table, resource_key)) WITH (autovacuum_enabled = off)",
          f"CREATE INDEX ON walsim_ident ({WALFIRST_HASH})"],
         ["INSERT INTO walsim_ident SELECT o.resource_table, o.resource_key, o.resource_type, o.identifier_system,"
          " o.identifier_value FROM walsim_outbox o WHERE o.id = ANY (%(ids)s)"],
         [WALFIRST_SETTLE_INSERT, WALFIRST_DELETE]),
    ]

    def scenario_walfirst(self):
        n = 2000 if self.quick else 10000
        batch = 100
        self.reset_settings()
        self.begin_scenario()
        self.capture_paused("walfirst", n, None)
        out, rows = {}, []
        for key, what, ddl, reserve, settle in self.WALFIRST_CANDIDATES:
            ids = self.copy_pending_to_walsim()
            self.sql("DROP TABLE IF EXISTS walsim_state, walsim_ident")
            self.sql("CREATE TABLE walsim_state (LIKE fhir_sync_state INCLUDING DEFAULTS)"
                     " WITH (fillfactor = 70, autovacuum_enabled = off)")
            self.sql("ALTER TABLE walsim_state ADD PRIMARY KEY (resource_table, resource_key)")
            for st in ddl:
                self.sql(st)
            self.sql("VACUUM (ANALYZE) walsim_outbox, walsim_state")
            w = self.replay(ids, batch, [reserve, settle])
            m = len(ids)
            out[key] = {**w, "changes": m, "what": what}
            rows.append([key, m, *self.wal_per_change(w, m), what, self.wal_kinds_cell(w, m, top=4)])
        self.sql("DROP TABLE IF EXISTS walsim_outbox, walsim_state, walsim_ident")
        self.resume_and_drain("walfirst")
        self.results["scenarios"]["walfirst"] = out
        self.tables.append(table(
            f"walfirst: WAL per first write of candidate designs of the sync state, replayed in SQL over {n:,} real"
            f" captured new patients in batches of {batch} (a reservation transaction and a settle transaction each,"
            f" with the outbox delete; the worker's own claim and reads not included)",
            ["candidate", "changes", "WAL B/change", "records/change", "of it FPI B", "what", "heaviest records"],
            rows))

    # -------------------------------------------------------------------------------- scenarios
    def scenario_steady(self):
        rate = self.args.steady_rate
        secs = 8 if self.quick else self.args.steady_seconds
        res = self.run_steady("steady", rate, secs)
        self.results["scenarios"]["steady"] = res
        self.tables.append(table(
            f"steady: {rate:.0f} rows/s, one row per transaction, {secs:.0f} s (target p50 <= 5 ms, p99 <= 25 ms)",
            ["rows", "requests", "rows/s", "p50 ms", "p95 ms", "p99 ms", "max ms", "settle p50", "settle p99",
             "RSS max MB", "HWM MB", "anon max MB"],
            [[res["rows"], res["endpoint"]["requests"], res["rows_per_s"], res["latency_ms"].get("p50"),
              res["latency_ms"].get("p95"), res["latency_ms"].get("p99"), res["latency_ms"].get("max"),
              res["settle_ms"].get("p50"), res["settle_ms"].get("p99"), *mem_cells(res["memory"])]]))
        self.print_pgss("steady", res["statements"])

    def run_steady(self, tag: str, rate: float, secs: float) -> dict:
        before = self.begin_scenario()
        pid = self.wait_worker()
        clear_hwm(pid)
        sampler = MemSampler(self.worker_pid)
        sampler.start()
        log(f"{tag}: {rate:.0f} rows/s for {secs:.0f} s")
        drv = PacedDriver(self, tag, rate, secs, conns=self.args.driver_conns).run()
        self.wait_drained(drv.sent, 60, tag)
        mem = sampler.stop()
        statements = self.pgss_top()
        res = self.measure_endpoint_rows(tag, 0)
        settled = self.settled_times(tag)
        settle_lat = [(s - c) / 1000.0 for c, s, *_ in settled.values() if s is not None]
        res.update({"rate_target": rate, "seconds": secs, "rows_per_s": drv.achieved_rate,
                    "driver_max_behind_ms": drv.max_behind_ms, "endpoint": self.endpoint_counters(before),
                    "settle_ms": lat_summary(settle_lat), "memory": mem, "statements": statements})
        self.check_clean(tag, res)
        return res

    def run_burst(self, tag: str, rows: int, timeout: float) -> dict:
        before = self.begin_scenario()
        pid = self.wait_worker()
        clear_hwm(pid)
        sampler = MemSampler(self.worker_pid)
        sampler.start()
        log(f"{tag}: inserting {rows:,} rows in one transaction")
        t_ins = time.monotonic()
        commit_s = self.insert_burst(tag, rows)
        insert_s = time.monotonic() - t_ins
        t_commit_mono = time.monotonic()
        self.wait_drained(rows, timeout, tag)
        drained_wall = time.time()
        mem = sampler.stop()
        statements = self.pgss_top()
        res = self.measure_endpoint_rows(tag, 0)
        last_settle = self.one(f"SELECT extract(epoch FROM max(processed_at))::float8 FROM {self.delivered_rel()}"
                               " WHERE id > %s",
                               (self.outbox_base,))
        drain_s = (last_settle or drained_wall) - commit_s
        arrival_s = (res["last_arrival_us"] / 1e6 - commit_s) if res.get("last_arrival_us") else None
        res.update({"insert_s": insert_s, "drain_s": drain_s, "rows_per_s": rows / drain_s if drain_s > 0 else None,
                    "arrival_rows_per_s": rows / arrival_s if arrival_s else None,
                    "observed_drain_s": time.monotonic() - t_commit_mono,
                    "endpoint": self.endpoint_counters(before), "memory": mem, "statements": statements})
        self.check_clean(tag, res)
        return res

    def burst_row(self, label: str, r: dict) -> list:
        lat = r["latency_ms"]
        return [label, r["rows"], r["endpoint"]["requests"], r["rows_per_s"], r["drain_s"], lat.get("p50"),
                lat.get("p95"), lat.get("p99"), lat.get("max"), *mem_cells(r["memory"])]

    BURST_HEADERS = ["config", "rows", "requests", "rows/s", "drain s", "p50 ms", "p95 ms", "p99 ms", "max ms",
                     "RSS max MB", "HWM MB", "anon max MB"]

    def scenario_burst20k(self):
        n = 2000 if self.quick else 20000
        out = {}
        rows = []
        self.reset_settings()
        out["single"] = self.run_burst("b20k-single", n, 600)
        rows.append(self.burst_row("single PUTs (defaults)", out["single"]))
        self.print_pgss("burst20k single", out["single"]["statements"])
        if self.has_guc.get("fhir_sync.bundle_size"):
            self.configure(bundle_size=100, bundle_type="batch")
            out["bundle100"] = self.run_burst("b20k-bundle", n, 600)
            rows.append(self.burst_row("bundle_size=100 batch", out["bundle100"]))
            self.print_pgss("burst20k bundle", out["bundle100"]["statements"])
            self.reset_settings()
        else:
            out["bundle100"] = {"skipped": "fhir_sync.bundle_size is not defined by the installed build"}
            rows.append(["bundle_size=100 batch", "skipped: no fhir_sync.bundle_size in this build"]
                        + [None] * (len(self.BURST_HEADERS) - 2))
        self.results["scenarios"]["burst20k"] = out
        self.tables.append(table(f"burst20k: {n:,} rows in one commit (targets: single >= 5,000 rows/s, "
                                 f"bundles >= 15,000 rows/s)", self.BURST_HEADERS, rows))

    def scenario_burst100k(self):
        n = 10000 if self.quick else 100000
        self.reset_settings()
        r = self.run_burst("b100k", n, 1800)
        # Writes, not requests: the worker also reads the server's CapabilityStatement (GET /metadata) once.
        ok = r["endpoint"]["writes"] <= r["rows"]
        r["requests_le_rows"] = ok
        self.results["scenarios"]["burst100k"] = r
        self.tables.append(table(f"burst100k: {n:,} rows in one commit, defaults (writes <= rows: {ok}; "
                                 f"worker RssAnon start {fmt((r['memory'].get('rss_anon_kb_start') or 0) / 1024)} MB,"
                                 f" end {fmt((r['memory'].get('rss_anon_kb_end') or 0) / 1024)} MB)",
                                 self.BURST_HEADERS, [self.burst_row("single PUTs (defaults)", r)]))
        self.print_pgss("burst100k", r["statements"])
        if not ok:
            raise Broken(f"burst100k: {r['endpoint']['writes']} writes for {r['rows']} rows")

    def scenario_slow20ms(self):
        n = 1000 if self.quick else 5000
        delay = 20
        configs = [("defaults (max_in_flight 4)", {}),
                   ("max_in_flight 16", {"max_in_flight": 16}),
                   ("max_in_flight 32", {"max_in_flight": 32})]
        if self.has_guc.get("fhir_sync.bundle_size"):
            configs.append(("bundle_size 100 batch, max_in_flight 4",
                            {"bundle_size": 100, "bundle_type": "batch"}))
            configs.append(("bundle_size 100 transaction, max_in_flight 4",
                            {"bundle_size": 100, "bundle_type": "transaction"}))
            configs.append(("bundle_size 100 batch, max_in_flight 4, batch_size 800",
                            {"bundle_size": 100, "bundle_type": "batch", "batch_size": 800}))
        out, rows = {}, []
        self.endpoint.set_delay(delay)
        try:
            for i, (label, conf) in enumerate(configs):
                self.reset_settings()
                if conf:
                    self.configure(**conf)
                r = self.run_burst(f"slow{i}", n, 900)
                r["config"] = conf
                out[label] = r
                rows.append(self.burst_row(label, r)[:9] + [r["endpoint"]["max_inflight_per_identifier"],
                                                            r["endpoint"]["max_requests_in_flight"],
                                                            r["endpoint"]["overlaps"]])
        finally:
            self.endpoint.set_delay(0)
            self.reset_settings()
        if not self.has_guc.get("fhir_sync.bundle_size"):
            out["bundles"] = {"skipped": "fhir_sync.bundle_size is not defined by the installed build"}
        self.results["scenarios"]["slow20ms"] = out
        self.tables.append(table(f"slow20ms: endpoint answers after {delay} ms, {n:,} rows in one commit "
                                 f"(target >= 1,000 rows/s; max in flight per identifier must be 1)",
                                 self.BURST_HEADERS[:9] + ["max/ident", "max concurrent", "overlaps"], rows))
        worst = max((r["endpoint"]["max_inflight_per_identifier"] for r in out.values() if "endpoint" in r), default=0)
        if worst > 1:
            raise Broken(f"slow20ms: the endpoint saw {worst} requests in flight for one identifier")

    # ---------------------------------------------------------------- capture
    def scenario_capture(self):
        n = 20000 if self.quick else self.args.capture_rows
        reps = 3 if self.quick else self.args.capture_reps
        self.reset_settings()
        self.begin_scenario()
        self.sql("DROP TABLE IF EXISTS cap_tracked, cap_untracked")
        self.sql("CREATE TABLE cap_tracked (LIKE patient INCLUDING ALL)")
        self.sql("CREATE TABLE cap_untracked (LIKE patient INCLUDING ALL)")
        self.sql("SELECT fhir_track('cap_tracked', 'Patient')")
        loop = ("DO $$ BEGIN FOR i IN 1..{n} LOOP INSERT INTO {t} (identifier_system, identifier_value, name_family,"
                " name_given, gender, birth_date, address_city) VALUES ('urn:bench:cap', 'cap-' || i, 'Doe', 'Jane',"
                " 'female', date '1970-01-01', 'Springfield'); END LOOP; END $$")
        times = {"cap_untracked": [], "cap_tracked": []}
        log(f"capture: {reps} x {n:,} single-row INSERTs in one transaction (rolled back), tracked vs untracked")
        # warm up both (plans, trigger prepare, buffers)
        for t in times:
            self._timed_rollback(loop.format(n=min(n, 2000), t=t))
        for rep in range(reps):
            order = ["cap_untracked", "cap_tracked"] if rep % 2 == 0 else ["cap_tracked", "cap_untracked"]
            for t in order:
                times[t].append(self._timed_rollback(loop.format(n=n, t=t)))
                self.sql(f"VACUUM {t}")
                self.sql("VACUUM fhir_outbox")
        per_row = [(tr - un) / n * 1e6 for tr, un in zip(times["cap_tracked"], times["cap_untracked"])]
        cap = {"rows": n, "reps": reps, "untracked_s": times["cap_untracked"], "tracked_s": times["cap_tracked"],
               "us_per_row_untracked": statistics.median(times["cap_untracked"]) / n * 1e6,
               "us_per_row_tracked": statistics.median(times["cap_tracked"]) / n * 1e6,
               "overhead_us_per_row_each_rep": per_row,
               "overhead_us_per_row_median": statistics.median(per_row)}
        self.tables.append(table(
            f"capture: {n:,} single-row INSERTs in one transaction (server-side loop, rolled back), median of {reps}"
            f" (target overhead <= 30 us/row)",
            ["table", "median s", "us/row", "overhead us/row (median)", "each rep us/row"],
            [["untracked", statistics.median(times["cap_untracked"]), cap["us_per_row_untracked"], None, None],
             ["tracked (fhir_track)", statistics.median(times["cap_tracked"]), cap["us_per_row_tracked"],
              cap["overhead_us_per_row_median"], " ".join(f"{x:.1f}" for x in per_row)]]))
        self.results["scenarios"]["capture"] = {"loop": cap}
        self.results["scenarios"]["capture"]["pgbench"] = self._pgbench()

    def _timed_rollback(self, q: str) -> float:
        with psycopg.connect(self.cluster.dsn(DB)) as c:  # not autocommit: the DO runs in a transaction
            t0 = time.perf_counter()
            c.execute(q)
            dt = time.perf_counter() - t0
            c.rollback()
        return dt

    # pgbench modes: (label, table, what the run shows). "floor" has no fhir_sync at all: the simplest trigger
    # capture there is, a PL/pgSQL AFTER ROW trigger writing one row into an unindexed copy of the outbox.
    PGBENCH_MODES = [
        ("untracked", "cap_untracked", "baseline"),
        ("floor", "cap_floor_src", "PL/pgSQL trigger, 1 row into an unindexed table"),
        ("paused", "cap_tracked", "tracked, delivery paused: the capture alone"),
        ("draining", "cap_tracked", "tracked, worker delivering on the same cores"),
    ]

    def _pgbench(self) -> dict:
        secs = 8 if self.quick else self.args.pgbench_seconds
        rounds = 1 if self.quick else self.args.pgbench_rounds
        clients = self.args.pgbench_clients
        # The machine's speed drifts by 10-30 % within minutes, so every mode runs once per round, in an order
        # rotated from round to round, and the figures are medians over rounds with their ranges.
        self.sql("DROP TABLE IF EXISTS cap_floor, cap_floor_src")
        self.sql("CREATE TABLE cap_floor_src (LIKE patient INCLUDING ALL)")
        self.sql("CREATE TABLE cap_floor (LIKE fhir_outbox INCLUDING DEFAULTS INCLUDING IDENTITY)")
        self.sql("""CREATE OR REPLACE FUNCTION cap_floor_capture() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                INSERT INTO cap_floor (table_name, record_id, operation, resource_type, resource_table, resource_key,
                                       identifier_system, identifier_value)
                VALUES (TG_TABLE_SCHEMA || '.' || TG_TABLE_NAME, NEW.id::text, 'I', 'Patient', TG_RELID::regclass,
                        NEW.id::text, NEW.identifier_system, NEW.identifier_value);
                RETURN NULL;
            END $$""")
        self.sql("CREATE TRIGGER cap_floor_capture AFTER INSERT ON cap_floor_src FOR EACH ROW"
                 " EXECUTE FUNCTION cap_floor_capture()")
        cols = ("identifier_system, identifier_value, name_family, name_given, gender, birth_date, address_city")
        log(f"pgbench: {rounds} rounds x {len(self.PGBENCH_MODES)} modes x {clients} clients x {secs} s, durable "
            f"commits")
        runs = []
        for rnd in range(rounds):
            shift = rnd % len(self.PGBENCH_MODES)
            modes = self.PGBENCH_MODES[shift:] + self.PGBENCH_MODES[:shift]
            for mode, t, _ in modes:
                # no ':' in the literal: pgbench -M prepared would take ":bench" for one of its variables
                system = f"bench-pgb-{self.run_id}-{rnd}-{mode}"
                values = (f"VALUES ('{system}', gen_random_uuid()::text, 'Doe', 'Jane', 'female', date '1970-01-01',"
                          f" 'Springfield')")
                stmt = f"INSERT INTO {t} ({cols}) {values}"
                script = BENCH_DIR / f"pgbench-{mode}.sql"
                script.write_text(stmt + ";\n")
                os.chmod(script, 0o644)
                if mode == "paused":
                    self.configure(server_url="")
                self.sql("CHECKPOINT")
                wpid = self.worker_pid()
                cpu0 = proc_cpu_s(wpid) if wpid else None
                cmd = [str(PG_BIN / "pgbench"), "-n", "-h", "127.0.0.1", "-p", str(self.cluster.port), "-U",
                       "postgres", "-M", self.args.pgbench_protocol, "-c", str(clients), "-j", str(min(clients, 2)),
                       "-T", str(secs), "-f", str(script), DB]
                r = subprocess.run(cmd, capture_output=True, text=True, timeout=secs + 120)
                if r.returncode != 0:
                    raise Broken(f"pgbench failed: {r.stderr[-2000:]}")
                tps = float(re.search(r"tps = ([0-9.]+) \(without initial", r.stdout).group(1))
                n = int(re.search(r"number of transactions actually processed: (\d+)", r.stdout).group(1))
                lat = re.search(r"latency average = ([0-9.]+) ms", r.stdout)
                pend = self.pending()
                run = {"round": rnd + 1, "mode": mode, "table": t, "tps": tps, "transactions": n,
                       "latency_avg_ms": float(lat.group(1)) if lat else None, "pending_at_end": pend,
                       "system": system}
                if mode == "paused":
                    self.configure(server_url=self.endpoint.url)
                if t == "cap_tracked":
                    t0 = time.monotonic()
                    self.wait_drained(None, 600, "pgbench tracked")
                    run["drain_after_s"] = time.monotonic() - t0
                    if mode == "draining":
                        run["latency_ms"] = self._pgbench_latency(system)
                        if cpu0 is not None and self.worker_pid() == wpid:
                            # the worker's CPU (all its threads) while pgbench ran and it drained, per row
                            run["worker_cpu_us_per_row"] = (proc_cpu_s(wpid) - cpu0) / n * 1e6
                log(f"  round {rnd + 1} {mode}: {tps:.0f} tps, {pend} pending at the end")
                runs.append(run)
        med = {m: statistics.median(x["tps"] for x in runs if x["mode"] == m) for m, _, _ in self.PGBENCH_MODES}
        base = med["untracked"]
        res = {"clients": clients, "seconds": secs, "rounds": rounds, "protocol": self.args.pgbench_protocol,
               "runs": runs, "tps_median": med,
               "ratio_median": {m: v / base for m, v in med.items()},
               "max_inflight_per_identifier": self.endpoint.stats()["max_inflight_per_identifier"]}
        # the figures the issue names, kept under their old keys
        res.update(tps_untracked=base, tps_tracked_draining=med["draining"], tps_tracked_paused=med["paused"],
                   ratio_draining=med["draining"] / base, ratio_paused=med["paused"] / base,
                   ratio_floor=med["floor"] / base)
        untracked_of_round = {x["round"]: x["tps"] for x in runs if x["mode"] == "untracked"}
        rows = []
        for m, _, what in self.PGBENCH_MODES:
            xs = [x for x in runs if x["mode"] == m]
            ratios = [x["tps"] / untracked_of_round[x["round"]] for x in xs]
            lat = [x["latency_ms"] for x in xs if x.get("latency_ms")]
            cpu = [x["worker_cpu_us_per_row"] for x in xs if x.get("worker_cpu_us_per_row") is not None]
            rows.append([m, med[m], f"{med[m] / base * 100:.1f} %",
                         " ".join(f"{r * 100:.0f}" for r in ratios),
                         statistics.median(x["latency_avg_ms"] for x in xs if x["latency_avg_ms"] is not None),
                         statistics.median(l["p50"] for l in lat) if lat else None,
                         statistics.median(l["p99"] for l in lat) if lat else None,
                         statistics.median(cpu) if cpu else None, what])
        self.tables.append(table(
            f"pgbench -M {self.args.pgbench_protocol}: {clients} clients x {secs} s x {rounds} rounds (order rotated), "
            f"one INSERT per transaction, "
            f"synchronous_commit on, fsync on; medians (target: tracked >= 85 % of untracked)",
            ["mode", "TPS", "vs untracked", "each round %", "latency avg ms", "commit->arrival p50 ms", "p99 ms",
             "worker CPU us/row", "what"], rows))
        return res

    def _pgbench_latency(self, system: str) -> dict:
        commits = dict(self.sql("SELECT identifier_value, (extract(epoch FROM pg_xact_commit_timestamp(xmin))"
                                " * 1e6)::int8 FROM cap_tracked WHERE identifier_system = %s", (system,)))
        st = self.endpoint.stats(arrivals=True)
        first = {}
        for us, m, rt, ident in st["arrivals"]:
            s, _, v = ident.partition("|")
            if s == system and v not in first:
                first[v] = us
        missing = [v for v in commits if v not in first]
        if missing:
            raise Broken(f"pgbench: {len(missing)} rows never reached the endpoint")
        return lat_summary([(first[v] - c) / 1000.0 for v, c in commits.items()])

    # ---------------------------------------------------------------- claim1m
    def explain_claim(self, batch: int) -> tuple[list[str], str]:
        """EXPLAIN (ANALYZE, BUFFERS) of the worker's own claim statements (fhir_sync_explain_claim(), rolled
        back); the function applies the worker's session settings itself (src/worker/mod.rs)."""
        with psycopg.connect(self.cluster.dsn(DB), autocommit=True) as c:
            rows = c.execute("SELECT * FROM public.fhir_sync_explain_claim(%s)", (batch,)).fetchall()
        return [r[0] for r in rows], "fhir_sync_explain_claim(), worker session settings"

    def scenario_claim1m(self):
        big = 100000 if self.quick else 1000000
        small = 1000
        batch = 200
        self.reset_settings()
        self.begin_scenario()
        log("claim1m: pausing delivery (fhir_sync.server_url = '')")
        self.configure(server_url="")
        deadline = time.monotonic() + 30
        while "server_url" not in (self.worker_state() or "") and time.monotonic() < deadline:
            time.sleep(0.2)
        state = self.worker_state()
        self.sql("TRUNCATE fhir_outbox")
        gen = ("INSERT INTO fhir_outbox (table_name, record_id, operation, resource_type, resource_table, resource_key)"
               " SELECT 'public.patient', g::text, 'U', 'Patient', 'patient'::regclass, g::text"
               "   FROM generate_series(%s::int8, %s::int8) g")
        # Delivered changes are in the history since 0.6.0; they are there for the claim to ignore.
        gen_delivered = ("INSERT INTO fhir_outbox_delivered (id, txid, table_name, record_id, operation, resource_type,"
                         " resource_table, resource_key, created_at, processed_at, attempts)"
                         " SELECT g, 1, 'public.patient', g::text, 'U', 'Patient', 'patient'::regclass, g::text, now(),"
                         " now(), 1 FROM generate_series(%s::int8, %s::int8) g")
        cases = []
        out = {"worker_state_during": state, "batch": batch}
        try:
            def measure(label):
                self.sql("VACUUM ANALYZE fhir_outbox")
                runs = [self.explain_claim(batch) for _ in range(5)]
                plan, how = runs[-1]
                # per run, the sum over the claim's statements (one or several EXPLAINs)
                def total(p, what):
                    return sum(float(m.group(1)) for line in p
                               for m in [re.search(what + r" Time: ([0-9.]+) ms", line)] if m)
                exec_ms = [total(p, "Execution") for p, _ in runs]
                plan_ms = [total(p, "Planning") for p, _ in runs]
                statements = sum(1 for line in plan for _ in [0] if "Execution Time" in line)
                size = self.one("SELECT pg_size_pretty(pg_total_relation_size('fhir_outbox'))")
                counts = self.sql("SELECT (SELECT count(*) FROM fhir_outbox),"
                                  " (SELECT count(*) FROM fhir_outbox_delivered)")[0]
                out[label] = {"pending": counts[0], "processed": counts[1], "exec_ms": exec_ms,
                              "plan_ms": plan_ms, "plan": plan, "how": how, "outbox_size": size,
                              "statements": statements}
                cases.append([label, counts[0], counts[1], size, statistics.median(exec_ms) if exec_ms else None,
                              statistics.median(plan_ms) if plan_ms else None])
                print(f"\n-- claim plan, {label} ({how}):\n" + "\n".join(plan), flush=True)

            t0 = time.monotonic()
            self.sql(gen, (1, small))
            measure(f"{small:,} pending")
            self.sql(gen, (small + 1, big))
            out["insert_s"] = time.monotonic() - t0
            measure(f"{big:,} pending")
            self.sql("TRUNCATE fhir_outbox")
            self.sql(gen_delivered, (1, big))
            self.sql(gen, (big + 1, big + small))
            measure(f"{small:,} pending + {big:,} delivered")
        finally:
            self.sql("TRUNCATE fhir_outbox, fhir_outbox_delivered")
            self.configure(server_url=self.endpoint.url)
        self.results["scenarios"]["claim1m"] = out
        self.tables.append(table(f"claim1m: the worker's claim (batch {batch}), median of 5 EXPLAIN ANALYZE runs "
                                 f"(rolled back; times summed over the claim's statements)", ["outbox", "pending", "delivered", "outbox size", "exec ms",
                                                    "plan ms"], cases))

    # ---------------------------------------------------------------- soak
    def outbox_health(self) -> dict:
        r = self.sql("SELECT n_live_tup, n_dead_tup, autovacuum_count, vacuum_count,"
                     " pg_relation_size('fhir_outbox'), pg_indexes_size('fhir_outbox'),"
                     " pg_total_relation_size('fhir_outbox')"
                     " FROM pg_stat_user_tables WHERE relname = 'fhir_outbox'")[0]
        idx = dict(self.sql("SELECT indexrelname, pg_relation_size(indexrelid) FROM pg_stat_user_indexes"
                            " WHERE relname = 'fhir_outbox'"))
        # pgstattuple counts what is really there (pg_stat_user_tables only knows what was reported)
        t = self.sql("SELECT tuple_count, dead_tuple_count, free_percent FROM pgstattuple('fhir_outbox')")[0]
        return {"live": r[0], "dead": r[1], "autovacuums": r[2], "vacuums": r[3], "heap_bytes": r[4],
                "index_bytes": r[5], "total_bytes": r[6], "indexes": idx,
                "pgstattuple_live": t[0], "pgstattuple_dead": t[1], "free_percent": t[2]}

    def worker_table_stats(self) -> list[dict]:
        """What the cumulative statistics (which drive autovacuum/autoanalyze) know about the tables the worker
        writes, next to what is really in them."""
        out = []
        for t in ("fhir_outbox", "fhir_sync_state"):
            r = self.sql(
                "SELECT s.n_tup_ins, s.n_tup_upd, s.n_tup_del, s.n_live_tup, s.n_dead_tup,"
                "       s.autovacuum_count, s.autoanalyze_count, c.reltuples::int8,"
                "       (SELECT count(*) FROM " + t + "), p.tuple_count, p.dead_tuple_count"
                "  FROM pg_stat_user_tables s JOIN pg_class c ON c.oid = s.relid,"
                "       pgstattuple('" + t + "') p WHERE s.relname = %s", (t,))[0]
            out.append(dict(zip(["n_tup_ins", "n_tup_upd", "n_tup_del", "n_live_tup", "n_dead_tup",
                                 "autovacuum_count", "autoanalyze_count", "reltuples", "count",
                                 "pgstattuple_live", "pgstattuple_dead"], r), table=t))
        return out

    def scenario_soak10m(self):
        secs = 90 if self.quick else self.args.soak_seconds
        rate = self.args.soak_rate
        every = 20 if self.quick else 60
        self.reset_settings()
        self.begin_scenario()
        self.sql("SELECT fhir_cleanup_old(0)")
        self.sql("VACUUM fhir_outbox")
        start = self.outbox_health()
        pid = self.wait_worker()
        clear_hwm(pid)
        mem_start = proc_mem(pid)
        cleanups = []
        stop = threading.Event()

        def maintenance():
            c = psycopg.connect(self.cluster.dsn(DB), autocommit=True)
            try:
                while not stop.wait(every):
                    t0 = time.perf_counter()
                    deleted = c.execute("SELECT outbox_deleted FROM fhir_cleanup_old(0)").fetchone()[0]
                    cleanups.append({"at_s": time.monotonic() - t_start, "deleted": deleted,
                                     "ms": (time.perf_counter() - t0) * 1000})
            finally:
                c.close()

        log(f"soak10m: {rate:.0f} rows/s for {secs:.0f} s, fhir_cleanup_old(0) every {every} s")
        t_start = time.monotonic()
        th = threading.Thread(target=maintenance, daemon=True)
        th.start()
        sampler = MemSampler(self.worker_pid, interval=1.0)
        sampler.start()
        try:
            drv = PacedDriver(self, "soak", rate, secs, conns=self.args.driver_conns).run()
        finally:
            stop.set()
            th.join(120)
        self.wait_drained(drv.sent, 120, "soak")
        mem = sampler.stop()
        end = self.outbox_health()
        res = self.measure_endpoint_rows("soak", 0)
        # per-window figures by commit time
        commits = self.commit_times("soak")
        st = self.endpoint.stats(arrivals=True)
        first = {}
        for us, m, rt, ident in st["arrivals"]:
            if m == "PUT" and ident.startswith(f"{MRN}|{self.run_id}.soak."):
                first.setdefault(ident[len(MRN) + 1:], us)
        t0 = min(commits.values())
        windows = {}
        for v, c in commits.items():
            w = int((c - t0) / 1e6 // every)
            windows.setdefault(w, []).append((first[v] - c) / 1000.0)
        full = int(secs // every)  # windows wholly inside the run
        last_w = max(w for w in windows if w < full) if any(w < full for w in windows) else max(windows)
        rows = []
        for label, w in (("first window", 0), ("last window", last_w)):
            lat = lat_summary(windows[w])
            rows.append([label, len(windows[w]), len(windows[w]) / every, lat["p50"], lat["p95"], lat["p99"],
                         lat["max"]])
        res.update({"seconds": secs, "rate": rate, "achieved_rate": drv.achieved_rate, "cleanups": cleanups,
                    "outbox_start": start, "outbox_end": end, "memory": mem, "memory_start": mem_start,
                    "windows": {str(w): lat_summary(v) for w, v in windows.items()},
                    "statements": self.pgss_top()})
        self.results["scenarios"]["soak10m"] = res
        self.tables.append(table(f"soak10m: {rate:.0f} rows/s for {secs:.0f} s, fhir_cleanup_old(0) every {every} s",
                                 ["window", "rows", "rows/s", "p50 ms", "p95 ms", "p99 ms", "max ms"], rows))
        mb = lambda b: b / 1048576  # noqa: E731
        self.tables.append(table(
            "soak10m: fhir_outbox at start and end (pg_stat_user_tables; sizes in MB)",
            ["when", "live (stats)", "dead (stats)", "live (pgstattuple)", "dead (pgstattuple)", "autovacuums",
             "heap MB", "indexes MB", "total MB", "worker anon MB"],
            [["start", start["live"], start["dead"], start["pgstattuple_live"], start["pgstattuple_dead"],
              start["autovacuums"], mb(start["heap_bytes"]), mb(start["index_bytes"]), mb(start["total_bytes"]),
              (mem_start.get("RssAnon") or 0) / 1024],
             ["end", end["live"], end["dead"], end["pgstattuple_live"], end["pgstattuple_dead"], end["autovacuums"],
              mb(end["heap_bytes"]), mb(end["index_bytes"]), mb(end["total_bytes"]),
              (mem.get("rss_anon_kb_end") or 0) / 1024]]))
        self.tables.append(table("soak10m: cleanups", ["at s", "outbox rows deleted", "ms"],
                                 [[c["at_s"], c["deleted"], c["ms"]] for c in cleanups]))
        self.print_pgss("soak10m", res["statements"])
        self.check_clean("soak", res)

    # ---------------------------------------------------------------- helios
    def scenario_helios(self):
        if not HFS_BIN.exists():
            self.results["scenarios"]["helios"] = {"skipped": f"{HFS_BIN} not installed (tests/setup.sh)"}
            log(f"helios: skipped, {HFS_BIN} not installed (run tests/setup.sh)")
            return
        from harness.helios import Helios
        h = Helios(data_dir=BENCH_DIR / "helios")
        log("helios: starting Helios")
        h.start()
        n = 300 if self.quick else self.args.helios_rows
        steady_secs = 6 if self.quick else 20
        steady_rate = 50
        bundles = bool(self.has_guc.get("fhir_sync.bundle_size"))
        configs = [("steady", f"steady {steady_rate}/s, max_in_flight 1", {"max_in_flight": 1}),
                   ("burst", "burst, max_in_flight 1", {"max_in_flight": 1})]
        if bundles:
            configs += [("burst", "burst, bundle_size 100 batch, max_in_flight 1",
                         {"max_in_flight": 1, "bundle_size": 100, "bundle_type": "batch"}),
                        ("burst", "burst, bundle_size 100 transaction, max_in_flight 1",
                         {"max_in_flight": 1, "bundle_size": 100, "bundle_type": "transaction"})]
        configs += [("limited", f"burst of {min(n, 300)}, defaults (max_in_flight 4), first 90 s", {})]
        out, rows = {}, []
        try:
            self.begin_scenario()
            for i, (kind, label, conf) in enumerate(configs):
                self.reset_settings()
                self.configure(server_url=h.base_url, **conf)
                tag = f"h{i}"
                calls0 = self.status()
                log(f"helios: {label}")
                if kind == "steady":
                    drv = PacedDriver(self, tag, steady_rate, steady_secs, conns=1).run()
                    self.wait_drained(None, 600, tag)
                    r = self.helios_measure(tag, drv.sent, None, calls0)
                    r["rows_per_s"] = drv.achieved_rate
                elif kind == "burst":
                    commit_s = self.insert_burst(tag, n)
                    self.wait_drained(None, 900, tag)
                    r = self.helios_measure(tag, n, commit_s, calls0)
                else:
                    # The default max_in_flight against Helios: concurrent writes to its sqlite answer
                    # 503/500 "database table is locked"; see how far it gets in 90 s, then clean up.
                    m = min(n, 300)
                    commit_s = self.insert_burst(tag, m)
                    deadline = time.monotonic() + (30 if self.quick else 90)
                    while self.pending() and time.monotonic() < deadline:
                        time.sleep(0.5)
                    r = self.helios_measure(tag, m, commit_s, calls0, partial=True)
                    r["window_s"] = 30 if self.quick else 90
                    self.configure(max_in_flight=1)
                    # bench-only: make the backed-off retries due now, so the next scenario starts clean
                    self.sql("UPDATE fhir_outbox SET next_retry_at = NULL WHERE NOT processed")
                    self.wait_drained(None, 600, tag + " cleanup")
                r["config"] = conf
                out[label] = r
                rows.append([label, *self.helios_cells(r)])
            out["patients_on_server"] = h.count("Patient")
            out["helios_log_table_locked"] = h.log_text().count("table is locked")
        finally:
            self.reset_settings()
            h.stop()
        self.results["scenarios"]["helios"] = out
        self.tables.append(table(
            f"helios: Helios hfs 0.2.7 (debug build, sqlite :memory:), {n:,}-row bursts; latency = commit -> "
            f"settled; 'table is locked' in its log: {out.get('helios_log_table_locked')}",
            ["config", "rows", "settled", "calls", "call errors", "retried rows", "dlq", "rows/s", "p50 ms",
             "p95 ms", "p99 ms", "max ms"], rows))

    def helios_measure(self, tag: str, rows: int, commit_s: float | None, calls0: dict,
                       partial: bool = False) -> dict:
        st = self.settled_times(tag)
        lat = [(s - c) / 1000.0 for c, s, ok, n, att in st.values() if s is not None and ok]
        settled = sum(1 for c, s, ok, n, att in st.values() if ok)
        retried = sum(1 for c, s, ok, n, att in st.values() if att)
        status = self.status()
        dlq = self.sql("SELECT error_class, http_status, count(*) FROM fhir_dlq WHERE identifier_value LIKE %s"
                       " GROUP BY 1, 2", (f"{self.run_id}.{tag}.%",))
        r = {"rows": len(st), "settled": settled, "latency_ms": lat_summary(lat),
             "calls": (status.get("fhir_calls") or 0) - (calls0.get("fhir_calls") or 0),
             "call_errors": (status.get("fhir_call_errors") or 0) - (calls0.get("fhir_call_errors") or 0),
             "retried_rows": retried, "dlq": sum(d[2] for d in dlq), "dlq_classes": dlq}
        if commit_s is not None and settled:
            last = max(s for c, s, ok, n, att in st.values() if s is not None and ok) / 1e6
            r["drain_s"] = last - commit_s
            r["rows_per_s"] = settled / r["drain_s"]
        if len(st) != rows or (not partial and settled + r["dlq"] < rows):
            raise Broken(f"helios {tag}: {len(st)} of {rows} rows found, {settled} settled, {r['dlq']} dead letters")
        return r

    @staticmethod
    def helios_cells(r: dict) -> list:
        lat = r["latency_ms"]
        return [r["rows"], r["settled"], r["calls"], r["call_errors"], r["retried_rows"], r["dlq"],
                r.get("rows_per_s"), lat.get("p50"), lat.get("p95"), lat.get("p99"), lat.get("max")]

    # -------------------------------------------------------------------------------- driver
    def run(self, scenarios: list[str]) -> int:
        self.setup()
        try:
            for i, s in enumerate(scenarios):
                t0 = time.monotonic()
                log(f"=== {s}")
                try:
                    self.log_offset = self.cluster.logfile.stat().st_size
                except OSError:
                    self.log_offset = 0
                try:
                    getattr(self, f"scenario_{s}")()
                except ServerDied as e:
                    log(f"SERVER DIED in {s}: {e}")
                    self.broken.append(f"{s}: {e}")
                    self.results["scenarios"].setdefault(s, {})["broken"] = str(e)
                    for rest in scenarios[i + 1:]:
                        self.broken.append(f"{rest}: not run (the server died)")
                    break
                except Broken as e:
                    log(f"BROKEN in {s}: {e}")
                    self.broken.append(f"{s}: {e}")
                    self.results["scenarios"].setdefault(s, {})["broken"] = str(e)
                    try:
                        self.reset_settings()
                        self.endpoint.set_delay(0) if self.endpoint.alive() else None
                    except Exception:  # noqa: BLE001
                        pass
                except Exception as e:  # noqa: BLE001
                    traceback.print_exc()
                    self.broken.append(f"{s}: {e!r}")
                    self.results["scenarios"].setdefault(s, {})["error"] = repr(e)
                log(f"=== {s} took {time.monotonic() - t0:.0f} s")
                self.save()
            try:
                ws = self.worker_table_stats()
                self.results["worker_table_stats"] = ws
                self.tables.append(table(
                    "tables the worker writes: what pg_stat_user_tables (autovacuum's input) knows vs what is there",
                    ["table", "n_tup_ins", "n_tup_upd", "n_live_tup", "n_dead_tup", "autovacuums", "autoanalyzes",
                     "reltuples", "count(*)", "dead (pgstattuple)"],
                    [[w["table"], w["n_tup_ins"], w["n_tup_upd"], w["n_live_tup"], w["n_dead_tup"],
                      w["autovacuum_count"], w["autoanalyze_count"], w["reltuples"], w["count"],
                      w["pgstattuple_dead"]] for w in ws]))
            except Exception as e:  # noqa: BLE001
                log(f"worker table stats: {e!r}")
        finally:
            self.teardown()
            now = installed_build()
            if now.get("so_mtime") != self.results.get("extension", {}).get("so_mtime"):
                msg = (f"fhir_sync.so was reinstalled during the run ({now.get('so_mtime')}, {now.get('build_guess')});"
                       f" the cluster kept the library it loaded at start")
                log("WARNING: " + msg)
                self.results["warning"] = msg
            self.save()
        print("\n".join(["", "=" * 100, f"fhir_sync benchmark {self.run_id} ({self.args.build} build), "
                         f"results in {BENCH_DIR / 'results.json'}", *self.tables]), flush=True)
        if self.broken:
            print("\nBROKEN:\n  " + "\n  ".join(self.broken), flush=True)
            return 1
        return 0

    def save(self):
        self.results["finished"] = _dt.datetime.now().isoformat(timespec="seconds")
        self.results["broken"] = self.broken
        doc = json.dumps(self.results, indent=1, default=str)
        (BENCH_DIR / "results.json").write_text(doc)
        (BENCH_DIR / f"results-{self.run_id}.json").write_text(doc)
        (BENCH_DIR / "tables.txt").write_text("\n".join(self.tables) + "\n")


def installed_build() -> dict:
    """Which fhir_sync.so is installed: path, size, mtime, and a guess (debug builds carry .debug_info)."""
    so = Path(subprocess.run([str(PG_BIN / "pg_config"), "--pkglibdir"], capture_output=True, text=True)
              .stdout.strip() or "/usr/lib/postgresql/15/lib") / "fhir_sync.so"
    try:
        st = so.stat()
    except OSError:
        return {"so": str(so), "build_guess": "not installed"}
    sections = subprocess.run(["readelf", "-S", "-W", str(so)], capture_output=True, text=True).stdout
    return {"so": str(so), "so_bytes": st.st_size,
            "so_mtime": _dt.datetime.fromtimestamp(st.st_mtime).isoformat(timespec="seconds"),
            "build_guess": "debug" if ".debug_info" in sections else "release"}


def machine() -> dict:
    cpu = ""
    try:
        cpu = next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                    if l.startswith("model name")), "")
    except OSError:
        pass
    mem_kb = 0
    try:
        mem_kb = int(next(l.split()[1] for l in Path("/proc/meminfo").read_text().splitlines()
                          if l.startswith("MemTotal")))
    except (OSError, StopIteration):
        pass
    return {"nproc": os.cpu_count(), "cpu": cpu, "mem_gb": round(mem_kb / 1048576, 1),
            "kernel": platform.release(), "python": platform.python_version()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("scenarios", nargs="*", help=f"any of {', '.join(SCENARIOS)}, or all (default: all but soak10m)")
    ap.add_argument("--endpoint", default=os.environ.get("FHIR_SYNC_BENCH_ENDPOINT", str(DEFAULT_ENDPOINT)))
    ap.add_argument("--build", default=os.environ.get("FHIR_SYNC_BENCH_BUILD", "unknown"),
                    help="label of the installed extension build (release/debug), printed with the figures")
    ap.add_argument("--quick", action="store_true", help="tiny sizes: checks that every scenario works")
    ap.add_argument("--keep", action="store_true", help="leave the cluster running at the end")
    ap.add_argument("--conf", action="append", metavar="NAME=VALUE",
                    help="extra postgresql.conf setting for the bench cluster (repeatable), e.g. "
                         "--conf shared_preload_libraries=auto_explain --conf auto_explain.log_min_duration=5ms")
    ap.add_argument("--steady-rate", type=float, default=200)
    ap.add_argument("--steady-seconds", type=float, default=30)
    ap.add_argument("--driver-conns", type=int, default=2)
    ap.add_argument("--capture-rows", type=int, default=100000)
    ap.add_argument("--capture-reps", type=int, default=5)
    ap.add_argument("--pgbench-seconds", type=int, default=15)
    ap.add_argument("--pgbench-rounds", type=int, default=3)
    ap.add_argument("--pgbench-protocol", choices=["simple", "prepared"], default="simple",
                    help="pgbench -M: prepared takes parsing and planning out of every mode's transactions")
    ap.add_argument("--pgbench-clients", type=int, default=4)
    ap.add_argument("--soak-seconds", type=float, default=600)
    ap.add_argument("--soak-rate", type=float, default=300)
    ap.add_argument("--helios-rows", type=int, default=2000)
    a = ap.parse_args(argv)
    chosen = a.scenarios or DEFAULT_SCENARIOS
    if "all" in chosen:
        chosen = SCENARIOS
    bad = [s for s in chosen if s not in SCENARIOS]
    if bad:
        ap.error(f"unknown scenario(s) {bad}; choose from {SCENARIOS} or all")
    if os.geteuid() != 0:
        ap.error("run as root (the cluster runs as OS user postgres via runuser)")
    return Bench(a).run(chosen)


if __name__ == "__main__":
    sys.exit(main())
