"""The Helios FHIR server (hfs 0.2.7, R4, in-memory SQLite), started on loopback for the tests.

    h = Helios(port, data_dir).start()       # waits until GET /_readiness answers 200 (timeout 60 s)
    h.base_url                                # "http://127.0.0.1:<port>"
    h.search("Patient", "urn:sys", "123")     # -> [resource, ...]
    h.read("Patient", id)                     # -> resource, or None when 404/410
    h.history("Patient", id)                  # -> history Bundle entries, newest first
    h.stop()

The database is ':memory:': a restart() loses every resource.
"""
from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import quote

from .util import HFS_BIN, SEARCH_PARAMS, free_port

FHIR_JSON = "application/fhir+json"


class HttpResult:
    def __init__(self, status: int, headers, body: bytes):
        self.status = status
        self.headers = headers          # http.client.HTTPMessage (case-insensitive .get)
        self.body = body

    def json(self):
        return json.loads(self.body) if self.body else None

    def __repr__(self):
        return f"HttpResult({self.status}, {self.body[:200]!r})"


def http(method: str, url: str, body=None, headers: dict | None = None, timeout: float = 30) -> HttpResult:
    """One HTTP request with urllib; never raises for HTTP error statuses."""
    h = {"Accept": FHIR_JSON}
    data = None
    if body is not None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        h["Content-Type"] = FHIR_JSON
    h.update(headers or {})
    req = urllib.request.Request(url, data=data, method=method, headers=h)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return HttpResult(r.status, r.headers, r.read())
    except urllib.error.HTTPError as e:
        return HttpResult(e.code, e.headers, e.read())


def _port_in_use(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def escape_token(s: str) -> str:
    """FHIR search escaping as Helios 0.2.7 honours it: '\\' -> '\\\\' and ',' -> '\\,' (an unescaped comma means OR).

    Do not escape '|' or '$': Helios does not unescape '\\|' / '\\$', and splits system|value at the first '|'.
    """
    return s.replace("\\", "\\\\").replace(",", "\\,")


def identifier_query(system: str | None, value: str) -> str:
    """'identifier=<percent-encoded system|value>' for a search / conditional URL."""
    token = f"{escape_token(system)}|{escape_token(value)}" if system is not None else escape_token(value)
    return "identifier=" + quote(token, safe="")


_LIVE: set = set()


@atexit.register
def _kill_leftovers() -> None:
    for h in list(_LIVE):
        h.kill()


class Helios:
    def __init__(self, port: int | None = None, data_dir: Path | str | None = None,
                 binary: Path | str = HFS_BIN, search_params: Path | str = SEARCH_PARAMS,
                 args: tuple = ("--enable-versioning",), env: dict | None = None):
        self.port = port or free_port()
        self.data_dir = Path(data_dir) if data_dir else Path(f"/tmp/hfs-{self.port}")
        self.binary = Path(binary)
        self.search_params = Path(search_params)
        self.args = tuple(args)
        self.extra_env = dict(env or {})
        self.proc: subprocess.Popen | None = None
        self.logfile = self.data_dir / "hfs.log"
        self.startup_seconds: float | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict:
        e = dict(os.environ)
        e.update({
            "HFS_SERVER_HOST": "127.0.0.1",
            "HFS_SERVER_PORT": str(self.port),
            "HFS_BASE_URL": self.base_url,
            "HFS_DATABASE_URL": ":memory:",
            "HFS_DATA_DIR": str(self.data_dir),
            "HFS_UI_ENABLED": "false",
            "HFS_VALIDATION_MODE": "enforce",
        })
        e.update(self.extra_env)
        return e

    # ------------------------------------------------------------------ lifecycle
    def start(self, timeout: float = 60) -> "Helios":
        if not self.binary.exists():
            raise FileNotFoundError(f"{self.binary} not found: run tests/setup.sh")
        if _port_in_use(self.port):
            # hfs logs "Server listening" and only then fails to bind; /_readiness would be answered by the other
            # process, so refuse up front.
            raise RuntimeError(f"port {self.port} is already in use")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        target = self.data_dir / "search-parameters-r4.json"
        if not target.exists():
            shutil.copyfile(self.search_params, target)
        log = open(self.logfile, "ab")
        t0 = time.monotonic()
        self.proc = subprocess.Popen([str(self.binary), *self.args], env=self.env(), cwd=self.data_dir,
                                     stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True)
        log.close()
        _LIVE.add(self)
        self.wait_ready(timeout)
        if self.proc.poll() is not None:
            raise RuntimeError(f"hfs exited with {self.proc.returncode}:\n{self.log_tail()}")
        self.startup_seconds = time.monotonic() - t0
        return self

    def is_ready(self) -> bool:
        try:
            return http("GET", self.base_url + "/_readiness", timeout=2).status == 200
        except OSError:
            return False

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"hfs exited with {self.proc.returncode}:\n{self.log_tail()}")
            if self.is_ready():
                return
            time.sleep(0.2)
        raise TimeoutError(f"hfs not ready after {timeout}s:\n{self.log_tail()}")

    def stop(self, timeout: float = 10) -> None:
        _LIVE.discard(self)
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def kill(self) -> None:
        """SIGKILL (the in-memory data is lost)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        self.proc = None

    def restart(self, timeout: float = 60) -> None:
        """Stop and start on the same port. The in-memory database starts empty."""
        self.stop()
        self.start(timeout)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_text(self) -> str:
        try:
            return self.logfile.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, n: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-n:])

    # ------------------------------------------------------------------ FHIR helpers
    def request(self, method: str, path: str, body=None, headers: dict | None = None,
                timeout: float = 30) -> HttpResult:
        url = self.base_url + "/" + path.lstrip("/")
        return _read(url, headers, timeout) if method == "GET" else http(method, url, body, headers, timeout)

    def read(self, rtype: str, rid: str) -> dict | None:
        r = self.request("GET", f"{rtype}/{rid}")
        if r.status in (404, 410):
            return None
        if r.status != 200:
            raise RuntimeError(f"GET {rtype}/{rid}: {r.status} {r.body[:500]!r}")
        return r.json()

    def search(self, rtype: str, identifier_system: str | None, value: str, **params) -> list[dict]:
        """Resources of rtype with identifier system|value (system None: any system). Follows paging."""
        q = identifier_query(identifier_system, value)
        for k, v in params.items():
            q += f"&{k}={quote(str(v), safe='')}"
        return self._collect(f"{rtype}?{q}")

    def search_all(self, rtype: str, **params) -> list[dict]:
        q = "&".join(f"{k}={quote(str(v), safe='')}" for k, v in params.items())
        return self._collect(f"{rtype}?{q}" if q else rtype)

    def history(self, rtype: str, rid: str) -> list[dict]:
        """Entries of GET <type>/<id>/_history (each has request/response and, unless a delete, resource)."""
        r = self.request("GET", f"{rtype}/{rid}/_history")
        if r.status == 404:
            return []
        if r.status != 200:
            raise RuntimeError(f"GET {rtype}/{rid}/_history: {r.status} {r.body[:500]!r}")
        return r.json().get("entry") or []

    def count(self, rtype: str) -> int:
        r = self.request("GET", f"{rtype}?_summary=count")
        return int(r.json().get("total", 0))

    def _collect(self, path: str) -> list[dict]:
        out = []
        url = self.base_url + "/" + path
        while url:
            r = _read(url)
            if r.status != 200:
                raise RuntimeError(f"GET {url}: {r.status} {r.body[:500]!r}")
            b = r.json()
            out += [e["resource"] for e in b.get("entry") or []
                    if "resource" in e and (e.get("search") or {}).get("mode", "match") == "match"]
            url = next((l["url"] for l in b.get("link") or [] if l.get("relation") == "next"), None)
        return out

    def __repr__(self):
        return f"Helios({self.base_url}, data_dir={str(self.data_dir)!r})"


def _read(url: str, headers: dict | None = None, timeout: float = 30) -> HttpResult:
    """A test's GET. Helios (sqlite) answers a read that meets the worker's write with 503/500 "database
    table is locked"; a test that checks what the server holds reads again, as any client would."""
    for _ in range(40):
        r = http("GET", url, None, headers, timeout)
        if r.status not in (500, 503) or b"locked" not in r.body:
            return r
        time.sleep(0.05)
    return r
