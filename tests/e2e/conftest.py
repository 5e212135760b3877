"""Fixtures for the fhir_sync end-to-end tests.

  repo_root     Path of the repository
  helios        session-wide Helios FHIR server (in-memory; use unique identifiers per test, see harness.util.unique)
  faults        a fresh FaultServer per test (stopped afterwards)
  make_cluster  factory: make_cluster(name=None, conf=None, preload="fhir_sync", start=True, pg=None) -> Cluster
                (pg: a harness.pg.Postgres, by default the one FHIR_SYNC_PG_MAJOR / FHIR_SYNC_PG_ROOT name);
                every cluster made is stopped in teardown, even when the test fails (then its log tail is printed)

The extension must be installed system-wide before pytest runs (cargo pgrx install) for clusters that preload it.
Run:  $FHIR_SYNC_CACHE/venv/bin/pytest tests/e2e        (FHIR_SYNC_CACHE defaults to ~/.cache/fhir_sync)

Tiers (pytest.ini): every test is marked with exactly one of db, e2e, fault, deploy; `-m db` etc. runs one.
Checks that read files only are in tests/lint (no cluster, none of these fixtures).
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness.cluster import Cluster  # noqa: E402
from harness.faults import FaultServer  # noqa: E402
from harness.helios import Helios  # noqa: E402
from harness.pg import Postgres  # noqa: E402
from harness.util import E2E_DIR, REPO_ROOT  # noqa: E402


TIERS = ("db", "e2e", "fault", "deploy")
# Fixtures that start a FHIR server: a `db` test may use neither.
SERVER_FIXTURES = {"helios", "faults"}
_HERE = Path(__file__).resolve().parent


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Before -m/-k deselect anything: each test of this directory has exactly one tier marker."""
    wrong = []
    for item in items:
        if _HERE not in Path(str(item.fspath)).resolve().parents:
            continue
        tiers = [t for t in TIERS if item.get_closest_marker(t)]
        if len(tiers) != 1:
            wrong.append(f"{item.nodeid}: {', '.join(tiers) or 'no tier marker'}")
        elif tiers == ["db"] and SERVER_FIXTURES & set(getattr(item, "fixturenames", ())):
            wrong.append(f"{item.nodeid}: marked db but uses {sorted(SERVER_FIXTURES & set(item.fixturenames))}")
    if wrong:
        raise pytest.UsageError(f"each test needs exactly one of the markers {', '.join(TIERS)} "
                                "(see tests/e2e/pytest.ini):\n  " + "\n  ".join(wrong))


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    rep = yield
    setattr(item, "rep_" + rep.when, rep)
    return rep


def _failed(request) -> bool:
    node = request.node
    return any(getattr(getattr(node, "rep_" + w, None), "failed", False) for w in ("setup", "call"))


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def helios():
    h = Helios(data_dir=E2E_DIR / "helios")
    try:
        h.start(timeout=60)
        yield h
    finally:
        h.stop()


@pytest.fixture
def faults():
    fs = FaultServer().start()
    try:
        yield fs
    finally:
        fs.stop()


@pytest.fixture
def make_cluster(request):
    made: list[Cluster] = []
    base = re.sub(r"[^A-Za-z0-9_]+", "_", request.node.name)[:40].strip("_") or "c"

    def factory(name: str | None = None, conf: dict | None = None, preload: str = "fhir_sync",
                start: bool = True, port: int | None = None, pg: Postgres | None = None) -> Cluster:
        n = name or (base if not made else f"{base}_{len(made)}")
        c = Cluster(n, port=port, conf=conf, preload=preload, pg=pg)
        made.append(c)
        c.init()
        if start:
            c.start()
        return c

    yield factory

    failed = _failed(request)
    for c in made:
        if failed:
            sys.stderr.write(f"\n--- {c!r}: last lines of {c.logfile} ---\n{c.log_tail(80)}\n")
        c.cleanup()
