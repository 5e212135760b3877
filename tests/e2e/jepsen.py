"""Jepsen-style counting for the reliability and security tests.

A `Writer` thread commits random transactions against the tracked `patient` table while faults are
injected; every row carries a version marker (`name_given = 'v<n>'`, unique per key) and every
transaction also inserts its number into an untracked `jepsen_ledger` table, so that after the run the
outcome of every transaction is known exactly - including the in-doubt ones whose COMMIT was cut off by
a crash (the ledger row is there iff the transaction committed).

`count()` then compares three things:

  committed   the history: per key, the committed states in commit order (insert v1, updates v2.., delete)
  database    the rows as they stand (must equal the last committed state of each key: a self-check)
  server      the FaultServer's versioned store: every write it APPLIED (its history), per key and state

and reports

  lost        keys whose final committed state is not what the server holds (missing, stale, or a
              deleted row still live on the server)
  duplicates  writes applied beyond one per committed state: per key, max(0, applied - committed states),
              summed. Without faults this is 0: every committed change is one outbox row, every outbox
              row is settled by exactly one successful request, and a request may settle several rows.
  redundant   (informational) the same (key, state) applied more than once. This can also happen
              without faults: a write that commits between the worker's claim and its read of the row
              is sent with the claimed change and again for its own outbox row.
  phantom     states applied on the server that were never committed (a rolled-back or lost write)
  dup_resources  keys with more than one resource on the server (a conditional PUT that created a twin)

The duplicate bound the tests assert, per fault (why: see bound_* below):

  crash of the worker (kill -9, pg_ctl stop -m immediate)   2 x batch_size
  pg_terminate_backend                                       batch_size (seen: 0)
  FHIR server killed (connections cut) / request timed out   max_in_flight
"""
from __future__ import annotations

import os
import random
import re
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import psycopg

from fhirsync import MRN
from harness.util import wait_until

SOAK = os.environ.get("FHIR_SYNC_SOAK") == "1"


def size(default: int, soak: int) -> int:
    """The default size, or the soak size when FHIR_SYNC_SOAK=1."""
    return soak if SOAK else default


# ---------------------------------------------------------------------------------------------- bounds
def bound_crash(batch_size: int) -> int:
    """Duplicates one worker crash may cause.

    The worker settles a batch only after every request of it was answered (send.rs sends the whole
    tier, settle.rs then records it in one transaction), so a crash can cut off up to batch_size
    applied-but-unsettled requests, which the next worker sends again. The worker also commits its
    settlements with synchronous_commit = off: a settlement not yet written out of the WAL buffers when
    the cluster crash-restarts is lost too - at most one more batch (the WAL writer and every client
    commit write the WAL out within milliseconds, much less than one batch takes here).
    """
    return 2 * batch_size


def bound_terminate(batch_size: int) -> int:
    """pg_terminate_backend: the worker starts no new request, settles the answered ones, releases the
    ones still in flight (at most max_in_flight, or that many Bundles) and exits; those may have been
    applied and are sent again by its successor. Asserted: batch_size, the worst case of the settlement
    itself not committing before the exit (a whole batch unsettled), as after a crash."""
    return batch_size


def bound_server_fault(max_in_flight: int) -> int:
    """The FHIR server dies (or a request times out) with at most max_in_flight requests in flight; each
    may have been applied without its answer reaching the worker, which then sends it again."""
    return max_in_flight


# ---------------------------------------------------------------------------------------------- writer
LEDGER_SQL = "CREATE TABLE IF NOT EXISTS jepsen_ledger (txn bigint PRIMARY KEY, committed_at timestamptz DEFAULT clock_timestamp())"


@dataclass
class Op:
    txn: int
    key: int
    kind: str          # I, U, D
    version: int       # the version the row holds after the op (0 for D)


class Mismatch(Exception):
    pass


class Writer(threading.Thread):
    """Commits `changes` row changes (inserts 35 %, updates 60 %, deletes 5 %) in transactions of
    1..max_ops changes, reconnecting through crashes. `pace` seconds between transactions.

    The patient rows it writes are keyed `id = key` with identifier `MRN|<prefix>-<key>`.
    """

    def __init__(self, dsn: str, changes: int, prefix: str = "J", max_ops: int = 6, pace: float = 0.0,
                 seed: int = 1, key_base: int = 1, deletes: bool = True, timeout: float = 600):
        super().__init__(name="jepsen-writer", daemon=True)
        self.dsn = dsn
        self.target = changes
        self.prefix = prefix
        self.max_ops = max_ops
        self.pace = pace
        self.rng = random.Random(seed)
        self.next_key = key_base
        self.key_base = key_base
        self.deletes = deletes
        self.timeout = timeout
        self.ops: list[Op] = []
        self.live: dict[int, int] = {}         # key -> version, as the writer believes
        self.max_version: dict[int, int] = {}  # key -> highest version ever attempted
        self.txn = 0
        self.acked_changes = 0                 # changes in transactions whose COMMIT returned
        self.errors: list[tuple[int, str]] = []  # (txn, error) for transactions cut off by a fault
        self.stop_event = threading.Event()
        self.failure: BaseException | None = None
        self._conn: psycopg.Connection | None = None

    # -------------------------------------------------------------- identity
    def ident(self, key: int) -> str:
        return f"{self.prefix}-{key}"

    # -------------------------------------------------------------- the loop
    def run(self):
        try:
            self._run()
        except BaseException as e:  # noqa: BLE001 - reported by join_checked
            self.failure = e
        finally:
            if self._conn is not None:
                try:
                    self._conn.close()
                except Exception:  # noqa: BLE001
                    pass

    def _run(self):
        deadline = time.monotonic() + self.timeout
        self._connect(deadline)
        while self.acked_changes < self.target and not self.stop_event.is_set():
            if time.monotonic() > deadline:
                raise TimeoutError(f"writer: only {self.acked_changes} of {self.target} changes after {self.timeout}s")
            ops = self._plan()
            try:
                self._commit(ops)
                self.acked_changes += len(ops)
            except (psycopg.OperationalError, psycopg.InterfaceError) as e:
                # The outcome of this transaction is unknown until the ledger says; resync the model.
                self.errors.append((self.txn, type(e).__name__))
                self._connect(deadline)
            except Mismatch:
                self._resync()
            if self.pace:
                time.sleep(self.pace)      # paces the writer (not a wait)

    def _plan(self) -> list[Op]:
        self.txn += 1
        n = self.rng.randint(1, self.max_ops)
        ops: list[Op] = []
        touched: set[int] = set()
        for _ in range(n):
            r = self.rng.random()
            candidates = [k for k in self.live if k not in touched]
            if r < 0.35 or len(candidates) < 5:
                k = self.next_key
                self.next_key += 1
                ops.append(Op(self.txn, k, "I", 1))
            elif r < 0.95 or not self.deletes:
                k = self.rng.choice(candidates)
                ops.append(Op(self.txn, k, "U", self.max_version.get(k, 1) + 1))
            else:
                k = self.rng.choice(candidates)
                ops.append(Op(self.txn, k, "D", 0))
            touched.add(k)
            if ops[-1].version:
                self.max_version[k] = max(self.max_version.get(k, 0), ops[-1].version)
        return ops

    def _commit(self, ops: list[Op]):
        self.ops.extend(ops)   # recorded before COMMIT: the ledger decides whether they happened
        conn = self._conn
        with conn.transaction():
            conn.execute("INSERT INTO jepsen_ledger (txn) VALUES (%s)", (ops[0].txn,))
            for op in ops:
                if op.kind == "I":
                    conn.execute(
                        "INSERT INTO patient (id, identifier_system, identifier_value, name_family, name_given,"
                        " gender, birth_date) VALUES (%s, %s, %s, %s, %s, 'female', '1970-01-01')",
                        (op.key, MRN, self.ident(op.key), f"F{op.key}", f"v{op.version}"))
                elif op.kind == "U":
                    cur = conn.execute("UPDATE patient SET name_given = %s WHERE id = %s",
                                       (f"v{op.version}", op.key))
                    if cur.rowcount != 1:
                        raise Mismatch(op)
                else:
                    cur = conn.execute("DELETE FROM patient WHERE id = %s", (op.key,))
                    if cur.rowcount != 1:
                        raise Mismatch(op)
        for op in ops:
            if op.kind == "D":
                self.live.pop(op.key, None)
            else:
                self.live[op.key] = op.version

    def _connect(self, deadline: float):
        if self._conn is not None:
            try:
                self._conn.close()
            except Exception:  # noqa: BLE001
                pass
            self._conn = None
        while True:
            try:
                self._conn = psycopg.connect(self.dsn, autocommit=True, connect_timeout=5)
                self._conn.execute("SET statement_timeout = '30s'")
                self._resync()
                return
            except psycopg.Error:
                if time.monotonic() > deadline or self.stop_event.is_set():
                    raise
                time.sleep(0.2)            # paces reconnection attempts while the cluster is down (not a wait)

    def _resync(self):
        rows = self._conn.execute(
            "SELECT id, name_given FROM patient WHERE id >= %s AND id < %s",
            (self.key_base, self.next_key)).fetchall()
        self.live = {k: int(g[1:]) for k, g in rows}

    def join_checked(self, timeout: float):
        self.join(timeout)
        if self.is_alive():
            self.stop_event.set()
            self.join(30)
            raise AssertionError(f"writer still running after {timeout}s ({self.acked_changes} changes)")
        if self.failure is not None:
            raise AssertionError(f"writer failed: {self.failure!r}") from self.failure


# ---------------------------------------------------------------------------------------------- counting
@dataclass
class Report:
    transactions: int = 0          # committed (per the ledger)
    in_doubt: int = 0              # COMMIT cut off by a fault, outcome learnt from the ledger
    changes: int = 0               # committed row changes
    keys: int = 0                  # keys with at least one committed change
    live: int = 0                  # keys whose final state is a row
    deleted: int = 0               # keys whose final state is "deleted"
    requests: int = 0              # PUT/DELETE/POST (Bundle) requests received, faulted ones included
    applied: int = 0               # writes the server applied
    lost: list = field(default_factory=list)
    duplicates: int = 0
    redundant: int = 0
    phantom: list = field(default_factory=list)
    dup_resources: list = field(default_factory=list)
    dlq: int = 0
    pending: int = 0
    harness: list = field(default_factory=list)   # self-check failures (database vs history)

    def summary(self) -> str:
        return (f"committed txns={self.transactions} (in doubt {self.in_doubt}) changes={self.changes} "
                f"keys={self.keys} (live {self.live}, deleted {self.deleted}) | server: requests={self.requests} "
                f"applied={self.applied} | lost={len(self.lost)} duplicates={self.duplicates} "
                f"redundant={self.redundant} phantom={len(self.phantom)} dup_resources={len(self.dup_resources)} "
                f"dlq={self.dlq} pending={self.pending}")

    def check(self, max_duplicates: int, dlq: int = 0):
        """lost = 0, phantom = 0, no twin resources, nothing pending, `dlq` dead letters, duplicates bounded."""
        assert not self.harness, f"harness self-check failed (database != committed history): {self.harness[:5]}"
        assert self.pending == 0, self.summary()
        assert not self.lost, f"LOST {len(self.lost)}: {self.lost[:10]}\n{self.summary()}"
        assert not self.phantom, f"uncommitted states reached the server: {self.phantom[:10]}\n{self.summary()}"
        assert not self.dup_resources, f"twin resources: {self.dup_resources[:10]}\n{self.summary()}"
        assert self.dlq == dlq, self.summary()
        assert self.duplicates <= max_duplicates, \
            f"{self.duplicates} duplicates > bound {max_duplicates}\n{self.summary()}"


_GIVEN = re.compile(r"^v(\d+)$")


def count(conn: psycopg.Connection, fs, writer: Writer, resource_type: str = "Patient") -> Report:
    """Compare the writer's committed history, the database and the FaultServer's store (see module doc)."""
    rep = Report()
    committed = {r[0] for r in conn.execute("SELECT txn FROM jepsen_ledger").fetchall()}
    rep.in_doubt = sum(1 for txn, _ in writer.errors if txn in committed)
    rep.transactions = len(committed)
    rep.dlq = conn.execute("SELECT count(*) FROM fhir_dlq").fetchone()[0]
    rep.pending = conn.execute("SELECT count(*) FROM fhir_outbox WHERE NOT processed").fetchone()[0]

    states: dict[int, list[Op]] = defaultdict(list)
    txn_of: dict[tuple[int, int], int] = {}
    for op in writer.ops:
        if op.version:
            txn_of[(op.key, op.version)] = op.txn
        if op.txn in committed:
            states[op.key].append(op)
    rep.changes = sum(len(v) for v in states.values())
    rep.keys = len(states)

    # The database must hold the last committed state of every key (checks the harness, not fhir_sync).
    rows = dict(conn.execute("SELECT id, name_given FROM patient WHERE id >= %s AND id < %s",
                             (writer.key_base, writer.next_key)).fetchall())
    for k in set(rows) | set(states):
        last = states[k][-1] if states.get(k) else None
        want = None if last is None or last.kind == "D" else f"v{last.version}"
        if rows.get(k) != want:
            rep.harness.append((k, want, rows.get(k)))

    # The server: live resources per key, and every write it applied (from the store's history).
    prefix = writer.prefix + "-"
    live: dict[int, list[str]] = defaultdict(list)
    resources: dict[int, list[str]] = defaultdict(list)
    applied_put: Counter = Counter()
    applied_del: Counter = Counter()
    with fs._lock:
        items = [(rid, it["deleted"], it["resource"], list(it["history"]))
                 for (t, rid), it in fs.store.items.items() if t == resource_type]
        requests = fs.requests
    for rid, deleted, res, hist in items:
        value = next((i.get("value") for i in res.get("identifier") or [] if i.get("system") == MRN), "")
        if not value.startswith(prefix):
            continue
        k = int(value[len(prefix):])
        resources[k].append(rid)
        if not deleted:
            live[k].append((rid, res))
        for h in hist:
            if h["method"] == "DELETE":
                applied_del[k] += 1
            else:
                given = ((h["resource"].get("name") or [{}])[0].get("given") or [""])[0]
                m = _GIVEN.match(given)
                applied_put[(k, int(m.group(1)) if m else -1)] += 1
    rep.applied = sum(applied_put.values()) + sum(applied_del.values())
    rep.requests = sum(1 for r in requests if r.method in ("PUT", "DELETE", "POST"))

    for k, st in states.items():
        last = st[-1]
        here = live.get(k, [])
        if len(resources.get(k, [])) > 1:
            rep.dup_resources.append((k, resources[k]))
        if last.kind == "D":
            rep.deleted += 1
            if here:
                rep.lost.append((k, "deleted row still on the server"))
            continue
        rep.live += 1
        if not here:
            rep.lost.append((k, f"v{last.version} missing"))
            continue
        given = ((here[0][1].get("name") or [{}])[0].get("given") or [""])[0]
        if given != f"v{last.version}":
            rep.lost.append((k, f"server has {given}, last commit v{last.version}"))
    for (k, v), n in applied_put.items():
        if txn_of.get((k, v)) not in committed:
            rep.phantom.append((k, v, n))
    per_key_applied: Counter = Counter()
    for (k, v), n in applied_put.items():
        per_key_applied[k] += n
        rep.redundant += n - 1
    for k, n in applied_del.items():
        per_key_applied[k] += n
        rep.redundant += n - 1
    for k, n in per_key_applied.items():
        rep.duplicates += max(0, n - len(states.get(k, [])))
    return rep


# ---------------------------------------------------------------------------------------------- processes
WORKER_PIDS_SQL = "SELECT pid FROM pg_stat_activity WHERE backend_type = 'fhir_sync worker' ORDER BY pid"


def worker_pids(cluster, db: str = "postgres") -> list[int]:
    try:
        return [r[0] for r in cluster.query(WORKER_PIDS_SQL, db=db)]
    except psycopg.Error:
        return []


def wait_worker(cluster, not_pid: int | None = None, timeout: float = 60) -> int:
    """The pid of a running fhir_sync worker (other than not_pid), once there is one."""
    return wait_until(lambda: next((p for p in worker_pids(cluster) if p != not_pid), None),
                      timeout=timeout, message="a fhir_sync worker")


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon, RssFile, RssShmem of a process, in KiB."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            name, _, rest = line.partition(":")
            if name in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
                out[name] = int(rest.split()[0])
    return out


def server_requests_since(fs, seq: int) -> int:
    return sum(1 for r in fs.requests if r.seq > seq)


def last_seq(fs) -> int:
    reqs = fs.requests
    return reqs[-1].seq if reqs else 0


def setup_ledger(app) -> None:
    app.sql(LEDGER_SQL)
