"""Small helpers shared by the harness and the tests."""
from __future__ import annotations

import os
import socket
import time
import uuid
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[3]
FIXTURES = REPO_ROOT / "tests" / "fixtures"
FHIR_SYNC_CACHE = Path(os.environ.get("FHIR_SYNC_CACHE") or Path.home() / ".cache" / "fhir_sync")
HFS_BIN = FHIR_SYNC_CACHE / "helios-0.2.7" / "bin" / "hfs"
SEARCH_PARAMS = FHIR_SYNC_CACHE / "medplum-5.2.13" / "search-parameters-r4.json"


def _postgres_can_reach(path: Path) -> bool:
    """Whether the postgres OS user can traverse to path (a clone under /root cannot)."""
    import subprocess
    try:
        return subprocess.run(["runuser", "-u", "postgres", "--", "test", "-x", str(path)],
                              capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


# Clusters live under the build directory, unless the postgres user cannot reach it.
E2E_DIR = Path(os.environ.get("FHIR_SYNC_E2E_DIR") or (
    REPO_ROOT / "target" / "e2e" if _postgres_can_reach(REPO_ROOT) else Path("/tmp/fhir_sync-e2e")))


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (bind to :0, read it, close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_until(predicate, timeout: float = 30.0, interval: float = 0.1, message: str = "condition"):
    """Poll predicate() until it returns a truthy value; return that value. Raise TimeoutError otherwise.

    Exceptions raised by predicate count as "not yet" (the last one is chained into the TimeoutError).
    """
    deadline = time.monotonic() + timeout
    last_exc = None
    while True:
        try:
            value = predicate()
            if value:
                return value
        except Exception as exc:  # noqa: BLE001 - polling
            last_exc = exc
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {message}") from last_exc
        time.sleep(interval)


def unique(prefix: str = "t") -> str:
    """A short unique token for identifier values, names, etc."""
    return f"{prefix}-{uuid.uuid4().hex[:12]}"
