"""Reliability: faults are injected while a writer commits random changes, and the outcome is COUNTED
(jepsen.py): every committed state must be on the server in the end (lost = 0), nothing uncommitted may
reach it (phantom = 0), no resource may be created twice, and re-sent writes must stay within the bound
of what was in flight at each fault.

Sizes are modest by default; FHIR_SYNC_SOAK=1 (tests/soak.sh) runs the full sizes.
"""
from __future__ import annotations

import time

import pytest

from fhirsync import DB, MRN, eventually, make_app
from harness.util import wait_until
from jepsen import (SOAK, Writer, bound_crash, bound_server_fault, bound_terminate, count, last_seq,
                    proc_status, server_requests_since, setup_ledger, size, wait_worker, worker_pids)

BATCH = 50
IN_FLIGHT = 4
# Every counting run uses these: a batch is small enough for a crash to cut one off mid-way.
COUNTING = {
    "fhir_sync.batch_size": BATCH,
    "fhir_sync.max_in_flight": IN_FLIGHT,
    # Broken connections spend attempts; a key unlucky enough to be hit by several faults must not be
    # dead-lettered ("exhausted") in these runs: that is tested in test_delivery.py.
    "fhir_sync.max_retries": 20,
    "fhir_sync.poll_interval": "200ms",
}


def counting_app(make_cluster, faults, conf: dict | None = None):
    app = make_app(make_cluster, faults.base_url, conf={**COUNTING, **(conf or {})})
    setup_ledger(app)
    return app


def run(app, faults, changes: int, strikes: int, strike, seed: int, pace: float = 0.0,
        drain_timeout: float = 300) -> "jepsen.Report":  # noqa: F821
    """Start a writer of `changes` changes; strike `strikes` times, spread over the run, each time while
    the worker is sending; wait for the writer and the drain; count."""
    w = Writer(app.cluster.dsn(DB), changes, seed=seed, pace=pace)
    started = time.monotonic()
    w.start()
    for i in range(strikes):
        threshold = changes * (i + 1) // (strikes + 1)
        wait_until(lambda: w.acked_changes >= threshold or not w.is_alive(), timeout=300,
                   message=f"writer past {threshold} changes")
        seq = last_seq(faults)
        wait_until(lambda: server_requests_since(faults, seq) >= 3, timeout=120,
                   message="the worker sending")
        strike(i)
    w.join_checked(600)
    wrote = time.monotonic() - started
    app.reconnect()
    app.wait_drained(timeout=drain_timeout)
    rep = count(app.conn, faults, w)
    print(f"\n{rep.summary()}\n  wrote in {wrote:.1f}s, drained {time.monotonic() - started - wrote:.1f}s later; "
          f"writer saw {len(w.errors)} cut-off transactions")
    return rep


def no_crash(cluster, allow_signal_9: bool = False):
    log = cluster.log_text()
    assert "PANIC" not in log
    if not allow_signal_9:
        assert "terminated by signal" not in log
    else:
        assert "terminated by signal 11" not in log and "terminated by signal 6" not in log


# ---------------------------------------------------------------------------------------------- crashes
def test_kill_9_of_the_worker_again_and_again_loses_nothing(make_cluster, faults):
    """kill -9 of the worker process, several times mid-run: the postmaster restarts the cluster, the
    launcher starts a new worker, which takes over the dead one's claims at once."""
    changes, kills = size(3000, 20000), size(5, 20)
    app = counting_app(make_cluster, faults)
    faults.delay(0.002, times=None)        # a slow-ish server keeps a batch in flight for a while
    victims = []

    def strike(i):
        pid = wait_worker(app.cluster)
        app.cluster.kill9_pid(pid)
        victims.append(pid)
        wait_worker(app.cluster, not_pid=pid, timeout=60)

    rep = run(app, faults, changes, kills, strike, seed=9)
    assert len(set(victims)) == kills
    print(f"  {kills} kills, duplicate bound {kills} x {bound_crash(BATCH)}")
    rep.check(max_duplicates=kills * bound_crash(BATCH))
    assert app.cluster.log_text().count("terminated by signal 9") == kills
    no_crash(app.cluster, allow_signal_9=True)
