"""The scripts a user runs by hand, checked without running a cluster: each one starts."""
from __future__ import annotations

import subprocess
import sys

from harness.util import REPO_ROOT


def test_the_benchmark_script_starts():
    """benches/bench.py imports the e2e harness; a harness change that breaks it shows here, not at the
    next benchmark run (session 8 removed harness.util.PG_BIN, which bench.py imported)."""
    r = subprocess.run([sys.executable, str(REPO_ROOT / "benches" / "bench.py"), "--help"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "usage: bench.py" in r.stdout


def test_the_shell_scripts_parse():
    """bash -n on every script of tests/, benches/, packaging/ and .ci/."""
    scripts = sorted(p for d in ("tests", "benches", "packaging", ".ci") for p in (REPO_ROOT / d).rglob("*")
                     if p.is_file() and (p.suffix == ".sh" or p.name == "run"))
    assert len(scripts) >= 6, scripts
    for script in scripts:
        r = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, f"{script}: {r.stderr}"
