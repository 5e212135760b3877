"""Which PostgreSQL the e2e clusters run: this machine's own (15), or another major installed in a Debian
chroot by tests/versions.sh.

    FHIR_SYNC_PG_MAJOR=17 FHIR_SYNC_PG_ROOT=/var/cache/fhir_sync-chroots/trixie pytest tests/e2e -m every_version

A chroot shares this machine's processes and network (its servers listen on 127.0.0.1 like the host's, so
the FHIR servers of the harness are reachable from its workers), not its files: the server binaries run
inside it (`chroot ROOT runuser -u postgres -- ...`), its clusters live under ROOT/build/e2e, and paths
handed to its programs are the paths seen from inside. psql and psycopg run on the host and connect over
TCP, as a client of another version would.
"""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

PG_USER = "postgres"
# The host's client programs (psql): they talk to a server of any of these versions over TCP.
CLIENT_BIN = Path("/usr/lib/postgresql/15/bin")


class Postgres:
    def __init__(self, major: int, root: Path | None = None):
        self.major = int(major)
        self.root = Path(root) if root else None
        self.bindir = f"/usr/lib/postgresql/{self.major}/bin"
        self.uid, self.gid = self._postgres_ids()

    def _postgres_ids(self) -> tuple[int, int]:
        # The postgres user of a chroot has the uid its own postgresql-common gave it.
        passwd = (self.root or Path("/")) / "etc" / "passwd"
        for line in passwd.read_text().splitlines():
            f = line.split(":")
            if f[0] == PG_USER:
                return int(f[2]), int(f[3])
        raise RuntimeError(f"no {PG_USER} user in {passwd}")

    # ---------------------------------------------------------------- paths
    def host(self, inner: str | Path) -> Path:
        """The host's path of a path seen from inside the install's root."""
        return self.root / str(inner).lstrip("/") if self.root else Path(inner)

    def inner(self, host: str | Path) -> str:
        """The path a program of this install sees for a host path (which must lie under its root)."""
        if not self.root:
            return str(host)
        return "/" + str(Path(host).resolve().relative_to(self.root.resolve()))

    def e2e_dir(self, default: Path) -> Path:
        return self.root / "build" / "e2e" if self.root else default

    def sharedir(self) -> Path:
        """Where CREATE EXTENSION reads control files and scripts, as a host path."""
        return self.host(f"/usr/share/postgresql/{self.major}/extension")

    # ---------------------------------------------------------------- programs
    def argv(self, program: str, *args) -> list[str]:
        """A server program of this install, run as postgres (inside the root if there is one)."""
        cmd = ["runuser", "-u", PG_USER, "--", f"{self.bindir}/{program}", *map(str, args)]
        return ["chroot", str(self.root), *cmd] if self.root else cmd

    def run(self, program: str, *args, **kw) -> subprocess.CompletedProcess:
        kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        return subprocess.run(self.argv(program, *args), **kw)

    def chown(self, path: Path) -> None:
        os.chown(path, self.uid, self.gid)

    def __repr__(self) -> str:
        return f"Postgres({self.major}{', ' + str(self.root) if self.root else ''})"


def from_env() -> Postgres:
    """FHIR_SYNC_PG_MAJOR / FHIR_SYNC_PG_ROOT, or this machine's PostgreSQL 15."""
    root = os.environ.get("FHIR_SYNC_PG_ROOT") or None
    return Postgres(int(os.environ.get("FHIR_SYNC_PG_MAJOR", "15")), root)


PG = from_env()
