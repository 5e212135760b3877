"""SQL regression tests: tests/sql/*.sql run through psql, output compared with
tests/sql/expected/*.out (where the result is best read as SQL). Set FHIR_SYNC_REGEN=1 to
write the expected files after a deliberate change, then review the diff."""
from __future__ import annotations

import difflib
import os
import re
import subprocess

import pytest

from harness.util import REPO_ROOT

pytestmark = pytest.mark.db

SQL_DIR = REPO_ROOT / "tests" / "sql"
CASES = sorted(p.stem for p in SQL_DIR.glob("*.sql"))


def normalise(text: str) -> str:
    # Timestamps, txids and generated FHIR ids vary from run to run; nothing else may.
    text = re.sub(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(\.\d+)?\+00", "<timestamp>", text)
    return text


@pytest.mark.parametrize("case", CASES)
def test_sql_regression(make_cluster, case):
    cluster = make_cluster(conf={"fhir_sync.database": "regress"})
    cluster.create_db("regress")
    out = subprocess.run(
        ["psql", "-X", "-a", "-q", "-h", "127.0.0.1", "-p", str(cluster.port), "-U", "postgres", "-d", "regress",
         "-v", "ON_ERROR_STOP=0", "-f", f"tests/sql/{case}.sql"],
        cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=120,
        env={**os.environ, "PGTZ": "UTC", "PGOPTIONS": "-c client_min_messages=warning"},
    )
    actual = normalise(out.stdout)
    expected_path = SQL_DIR / "expected" / f"{case}.out"
    if os.environ.get("FHIR_SYNC_REGEN"):
        expected_path.write_text(actual)
    expected = expected_path.read_text()
    if actual != expected:
        diff = "".join(difflib.unified_diff(expected.splitlines(True), actual.splitlines(True),
                                            "expected", "actual"))
        pytest.fail(f"{case}.sql output differs:\n{diff}")
