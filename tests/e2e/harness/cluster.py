"""A throw-away PostgreSQL cluster, run as OS user postgres (initdb refuses root), of the install harness.pg
picked (this machine's 15 unless FHIR_SYNC_PG_MAJOR / FHIR_SYNC_PG_ROOT name another).

    c = Cluster("basic", conf={"fhir_sync.server_url": "http://127.0.0.1:8080"})
    c.init(); c.start()
    c.psql("CREATE EXTENSION fhir_sync")
    with c.connect() as conn: conn.execute("SELECT 1")
    c.stop()

Layout: <repo>/target/e2e/<name>/ (in a chroot: ROOT/build/e2e/<name>/){data/, postgres.log, .s.PGSQL.<port>}. The directory is wiped by init(), kept
after stop() for post-mortem. Extra settings live in data/fhir_sync_e2e.conf, included from postgresql.conf;
set_conf() rewrites it (then reload() or restart()).
"""
from __future__ import annotations

import atexit
import os
import shutil
import signal
import subprocess
from pathlib import Path

import psycopg

from .pg import CLIENT_BIN, PG, PG_USER, Postgres
from .util import E2E_DIR, free_port, wait_until

INCLUDE_FILE = "fhir_sync_e2e.conf"


def _conf_value(v) -> str:
    if isinstance(v, bool):
        return "on" if v else "off"
    if isinstance(v, (int, float)):
        return str(v)
    return "'" + str(v).replace("'", "''") + "'"


class Cluster:
    def __init__(self, name: str, port: int | None = None, conf: dict | None = None,
                 preload: str = "fhir_sync", base_dir: Path | None = None, pg: Postgres | None = None):
        self.name = name
        self.pg = pg or PG
        self.port = port or free_port()
        self.dir = Path(base_dir or self.pg.e2e_dir(E2E_DIR)) / name
        self.data = self.dir / "data"
        self.logfile = self.dir / "postgres.log"
        self.preload = preload
        self.conf: dict = {}
        self._extra = dict(conf or {})
        self._conns: list[psycopg.Connection] = []

    # ------------------------------------------------------------------ lifecycle
    def init(self) -> "Cluster":
        """initdb into a fresh directory (an old one of the same name is wiped)."""
        if self.data.exists() and (self.data / "postmaster.pid").exists():
            self._pg_ctl("stop", "-m", "immediate", check=False)
        shutil.rmtree(self.dir, ignore_errors=True)
        self.dir.mkdir(parents=True)
        self.pg.chown(self.dir)
        # every ancestor must be traversable by postgres
        for p in self.dir.parents:
            if p == Path("/"):
                break
            mode = p.stat().st_mode
            if not mode & 0o001:
                os.chmod(p, mode | 0o001)
        self.pg.run("initdb", "-D", self.pg.inner(self.data), "--auth=trust", "-E", "UTF8", "--locale=C",
                    "-U", PG_USER, "--no-sync", check=True)
        with open(self.data / "postgresql.conf", "a") as f:
            f.write(f"\ninclude_if_exists = '{INCLUDE_FILE}'\n")
        self.set_conf(self._extra)
        return self

    def base_conf(self) -> dict:
        return {
            "listen_addresses": "127.0.0.1",
            "port": self.port,
            "unix_socket_directories": self.pg.inner(self.dir),
            "shared_preload_libraries": self.preload,
            "logging_collector": False,
            "log_line_prefix": "%m [%p] %b ",
            "fsync": False,
        }

    def set_conf(self, extra: dict | None = None, replace: bool = False) -> None:
        """Merge extra into the e2e settings (or replace them) and rewrite the include file.

        A value of None removes the setting. Takes effect on reload() / restart().
        """
        if replace:
            self.conf = {}
        for k, v in (extra or {}).items():
            if v is None:
                self.conf.pop(k, None)
            else:
                self.conf[k] = v
        settings = {**self.base_conf(), **self.conf}
        text = "".join(f"{k} = {_conf_value(v)}\n" for k, v in settings.items())
        path = self.data / INCLUDE_FILE
        path.write_text(text)
        self.pg.chown(path)

    def _pg_ctl(self, *args, check=True, timeout=120):
        r = self.pg.run("pg_ctl", "-D", self.pg.inner(self.data), *args, timeout=timeout)
        if check and r.returncode != 0:
            raise RuntimeError(f"pg_ctl {' '.join(args)} failed ({r.returncode}): {r.stdout}{r.stderr}\n"
                               f"--- log tail ---\n{self.log_tail()}")
        return r

    def start(self, timeout: int = 60) -> "Cluster":
        if not self.data.exists():
            self.init()
        _LIVE.add(self)
        self._pg_ctl("start", "-w", "-t", str(timeout), "-l", self.pg.inner(self.logfile))
        return self

    def stop(self, mode: str = "fast", timeout: int = 60) -> None:
        """pg_ctl stop -m smart|fast|immediate (no-op if not running)."""
        self.close_connections()
        if self.is_running():
            self._pg_ctl("stop", "-w", "-t", str(timeout), "-m", mode)

    def restart(self, mode: str = "fast", timeout: int = 60) -> None:
        self.stop(mode, timeout)
        self.start(timeout)

    def reload(self) -> None:
        self._pg_ctl("reload")

    def promote(self) -> None:
        self._pg_ctl("promote", "-w")

    def is_running(self) -> bool:
        if not self.data.exists():
            return False
        return self._pg_ctl("status", check=False).returncode == 0

    def postmaster_pid(self) -> int | None:
        try:
            return int((self.data / "postmaster.pid").read_text().splitlines()[0])
        except (FileNotFoundError, IndexError, ValueError):
            return None

    def kill9_pid(self, pid: int) -> None:
        """SIGKILL one process (a backend, a background worker or the postmaster)."""
        os.kill(int(pid), signal.SIGKILL)

    def kill9_postmaster(self) -> None:
        pid = self.postmaster_pid()
        if pid:
            self.kill9_pid(pid)
            wait_until(lambda: not _pid_alive(pid), timeout=10, message=f"postmaster {pid} to die")

    def cleanup(self) -> None:
        """Stop whatever is running, never raising (fixture teardown)."""
        _LIVE.discard(self)
        self.close_connections()
        try:
            if self.is_running():
                r = self._pg_ctl("stop", "-w", "-t", "30", "-m", "fast", check=False)
                if r.returncode != 0:
                    self._pg_ctl("stop", "-w", "-t", "30", "-m", "immediate", check=False)
        except Exception:  # noqa: BLE001
            pid = self.postmaster_pid()
            if pid and _pid_alive(pid):
                os.kill(pid, signal.SIGKILL)

    # ------------------------------------------------------------------ SQL
    def dsn(self, db: str = "postgres") -> str:
        return f"host=127.0.0.1 port={self.port} user={PG_USER} dbname={db}"

    def psql(self, sql: str, db: str = "postgres", check: bool = True, timeout: float = 120) -> str:
        """Run sql (one statement or a script) with psql -X -At, ON_ERROR_STOP. Returns stdout stripped."""
        r = subprocess.run([str(CLIENT_BIN / "psql"), "-X", "-At", "-q", "-v", "ON_ERROR_STOP=1",
                            "-h", "127.0.0.1", "-p", str(self.port), "-U", PG_USER, "-d", db, "-f", "-"],
                           input=sql, capture_output=True, text=True, timeout=timeout)
        if check and r.returncode != 0:
            raise RuntimeError(f"psql failed ({r.returncode}): {r.stderr.strip()}")
        return r.stdout.strip()

    def connect(self, db: str = "postgres", autocommit: bool = True, **kw) -> psycopg.Connection:
        conn = psycopg.connect(host="127.0.0.1", port=self.port, user=PG_USER, dbname=db,
                               autocommit=autocommit, **kw)
        self._conns.append(conn)
        return conn

    def close_connections(self) -> None:
        for c in self._conns:
            try:
                c.close()
            except Exception:  # noqa: BLE001
                pass
        self._conns.clear()

    def create_db(self, name: str) -> None:
        self.psql(f'CREATE DATABASE "{name}"')

    def query(self, sql: str, params=None, db: str = "postgres") -> list[tuple]:
        """One-shot query on a fresh connection; returns all rows ([] for statements without a result)."""
        with psycopg.connect(self.dsn(db), autocommit=True) as conn:
            cur = conn.execute(sql, params)
            return cur.fetchall() if cur.description else []

    def pids(self, backend_type_like: str = "%", db: str = "postgres") -> list[int]:
        """PIDs from pg_stat_activity whose backend_type matches (e.g. 'fhir_sync%')."""
        rows = self.query("SELECT pid FROM pg_stat_activity WHERE backend_type LIKE %s ORDER BY pid",
                          (backend_type_like,), db=db)
        return [r[0] for r in rows]

    # ------------------------------------------------------------------ logs
    def log_text(self) -> str:
        try:
            return self.logfile.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, n: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-n:])

    def wait_for_log(self, needle: str, timeout: float = 30, start: int = 0) -> str:
        """Wait until needle appears in the log (after character offset start); returns the log text."""
        return wait_until(lambda: needle in self.log_text()[start:] and self.log_text(),
                          timeout=timeout, message=f"{needle!r} in {self.logfile}")

    def __repr__(self) -> str:
        return f"Cluster({self.name!r}, port={self.port}, dir={str(self.dir)!r})"


_LIVE: set = set()


@atexit.register
def _stop_leftovers() -> None:
    """Last resort (e.g. pytest interrupted during teardown): stop every cluster this process started."""
    for c in list(_LIVE):
        c.cleanup()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie is not alive for our purposes
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except (FileNotFoundError, IndexError):
        return False
