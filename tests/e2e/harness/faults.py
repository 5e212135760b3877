"""FaultServer: a tiny in-memory FHIR server with queued fault injection, for testing the sync worker.

    fs = FaultServer().start()          # 127.0.0.1:<ephemeral>, HTTP/1.1 keep-alive
    fs.base_url                         # "http://127.0.0.1:43123"
    fs.respond(503, times=2, retry_after=1)   # next 2 requests get 503 + Retry-After: 1
    fs.delay(3.0)                       # next request answered normally after 3 s
    fs.hang()                           # next request never answered (until stop()/release_hangs())
    fs.reset(times=3)                   # next 3 requests: read, then close the socket (RST) without answering
    fs.garbage("text")                  # 200 text/plain "this is not json"; see GARBAGE_KINDS
    fs.redirect(302, "http://127.0.0.1:1/elsewhere")
    fs.requests                         # list[Request] (a copy), fs.wait_for_requests(n)
    fs.refuse(); fs.accept()            # close the listening socket (and open connections) / reopen SAME port
    fs.stop()

Rules are consumed in FIFO order; each rule applies to the next `times` requests that match it (times=None: all
of them, until clear_rules()). `match` narrows a rule: a dict with any of method, path (prefix of the path without
query), contains (substring of path+query), type (resource type), or a callable(Request) -> bool.
Rules with entry=True apply to the entries of a batch/transaction Bundle instead of whole HTTP requests
(match sees an EntryRequest with method, url, resource).

Default behaviour (no rule applies): conditional PUT /<Type>?identifier=sys|val -> 201 first time, 200 after, with
Location <base>/<Type>/<id>/_history/<n>, ETag W/"<n>", Last-Modified and the stored resource (id, meta.versionId,
meta.lastUpdated) as body; PUT /<Type>/<id>; DELETE by id or ?identifier= -> 204; GET /<Type>/<id> (404 unknown,
410 deleted); GET /<Type>?identifier=... -> searchset Bundle; GET /<Type>/<id>/_history; GET /metadata;
POST / with a batch or transaction Bundle -> batch-response / transaction-response. Conditional PUT/DELETE with
more than one match -> 412. A PUT with If-Match that does not match the current version -> 412.
"""
from __future__ import annotations

import copy
import itertools
import json
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qsl, unquote, urlsplit

FHIR_JSON = "application/fhir+json"
GARBAGE_KINDS = ("text", "html", "invalid_json", "json_wrong_type", "not_fhir", "huge", "truncated", "empty")


# ---------------------------------------------------------------------------------------------- records
@dataclass
class Request:
    time: float            # time.monotonic() at arrival (after the body was read)
    method: str
    path: str              # path + query, as sent (not decoded)
    headers: dict          # header names lower-cased
    body: bytes
    client: tuple = ()     # (host, port) of the client socket: same port = same keep-alive connection
    seq: int = 0           # arrival order on this FaultServer, from 1

    @property
    def url_path(self) -> str:
        return urlsplit(self.path).path

    @property
    def query(self) -> dict:
        return dict(parse_qsl(urlsplit(self.path).query, keep_blank_values=True))

    def json(self):
        return json.loads(self.body) if self.body else None


@dataclass
class EntryRequest:
    method: str
    url: str
    resource: dict | None
    index: int


@dataclass
class Rule:
    action: str                    # status | delay | hang | reset | garbage | redirect
    times: int | None = 1          # None = forever
    match: object = None           # dict | callable | None
    entry: bool = False
    status: int = 200
    body: object = None            # dict/list -> JSON, str/bytes -> as is, None -> default
    headers: dict = field(default_factory=dict)
    content_type: str | None = None
    delay: float = 0.0
    kind: str = ""
    location: str = ""
    hits: int = 0

    def matches(self, req) -> bool:
        m = self.match
        if m is None:
            return True
        if callable(m):
            return bool(m(req))
        method = req.method
        full = req.path if isinstance(req, Request) else req.url
        path = urlsplit(full).path
        if "method" in m and m["method"].upper() != method.upper():
            return False
        if "path" in m and not path.startswith(m["path"]):
            return False
        if "contains" in m and m["contains"] not in full and m["contains"] not in unquote(full):
            return False
        if "type" in m and path.strip("/").split("/")[0] != m["type"]:
            return False
        return True


def operation_outcome(code: str, diagnostics: str, severity: str = "error") -> dict:
    return {"resourceType": "OperationOutcome",
            "issue": [{"severity": severity, "code": code, "diagnostics": diagnostics}]}


def _now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class _Resp:
    def __init__(self, status: int, body=None, headers: dict | None = None, content_type: str = FHIR_JSON):
        self.status = status
        self.body = body
        self.headers = dict(headers or {})
        self.content_type = content_type


# ---------------------------------------------------------------------------------------- FHIR store
class FhirStore:
    """Versioned in-memory resources, keyed by (type, id). Not thread-safe by itself (FaultServer locks)."""

    def __init__(self, location_style: str = "history"):
        self.items: dict[tuple[str, str], dict] = {}   # (type,id) -> {version, deleted, resource, history}
        self._ids = itertools.count(1)
        self.location_style = location_style
        # (type, system, value) -> ids that ever carried it (in creation order). Never shrinks: find()
        # checks each candidate against items, so a replaced or cleared `items` cannot mislead it.
        # Keeps conditional PUTs O(1) for stores of 100,000 resources.
        self._index: dict[tuple[str, str, str], dict[str, None]] = {}
        # Opaque version ids (as some EHRs give): meta.versionId, ETag and Location carry a hash, not
        # the number; If-Match is compared against it.
        self.opaque_versions = False
        # A server that ignores If-Match (applies the update whatever version it names).
        self.ignore_if_match = False
        # What a stale If-Match gets: 412 (FHIR R4), or 409 (STU3 servers, HAPI).
        self.stale_if_match_status = 412

    def label(self, rid: str, version: int) -> str:
        if not self.opaque_versions:
            return str(version)
        import hashlib
        return hashlib.sha1(f"{rid}/{version}".encode()).hexdigest()[:16]

    def _new_id(self) -> str:
        return f"fs{next(self._ids)}"

    def find(self, rtype: str, identifier: str) -> list[str]:
        """ids of live resources of rtype with identifier 'system|value' (or just 'value', or 'system|')."""
        system, sep, value = identifier.partition("|")
        if not sep:
            system, value = None, identifier
        system = _unescape_token(system) if system is not None else None
        value = _unescape_token(value)
        out = []
        if system is not None and value:
            for rid in self._index.get((rtype, system, value), ()):
                it = self.items.get((rtype, rid))
                if it is not None and not it["deleted"] and any(
                        isinstance(i, dict) and (i.get("system") or "") == system and i.get("value") == value
                        for i in it["resource"].get("identifier") or []):
                    out.append(rid)
            return out
        for (t, rid), it in self.items.items():
            if t != rtype or it["deleted"]:
                continue
            for ident in it["resource"].get("identifier") or []:
                if system is not None and (ident.get("system") or "") != system:
                    continue
                if value and ident.get("value") != value:
                    continue
                out.append(rid)
                break
        return out

    def put(self, rtype: str, rid: str | None, resource: dict, base: str, if_match: str | None = None) -> _Resp:
        created = rid is None or (rtype, rid) not in self.items or self.items[(rtype, rid)]["deleted"]
        if rid is None:
            rid = self._new_id()
        it = self.items.get((rtype, rid))
        if if_match is not None and not self.ignore_if_match:
            cur = f'W/"{self.label(rid, it["version"])}"' if it and not it["deleted"] else None
            if cur is None or if_match.strip() not in (cur, cur[2:]):
                return _Resp(self.stale_if_match_status,
                             operation_outcome("conflict", f"If-Match {if_match} != {cur}"))
        version = (it["version"] + 1) if it else 1
        res = copy.deepcopy(resource)
        res["id"] = rid
        res.setdefault("meta", {})
        res["meta"]["versionId"] = self.label(rid, version)
        res["meta"]["lastUpdated"] = _now_iso()
        if it is None:
            it = self.items[(rtype, rid)] = {"history": []}
        it.update(version=version, deleted=False, resource=res)
        for ident in res.get("identifier") or []:
            if isinstance(ident, dict) and isinstance(ident.get("value"), str):
                self._index.setdefault((rtype, ident.get("system") or "", ident["value"]), {})[rid] = None
        it["history"].append({"version": version, "method": "PUT", "resource": copy.deepcopy(res)})
        headers = self._headers(base, rtype, rid, version)
        if self.location_style == "helios":     # as Helios 0.2.7: Location only on create, without _history
            headers.pop("Location")
            if created:
                headers["Location"] = f"{base}/{rtype}/{rid}"
        return _Resp(201 if created else 200, res, headers)

    def delete(self, rtype: str, rid: str) -> _Resp:
        it = self.items.get((rtype, rid))
        if it and not it["deleted"]:
            it["version"] += 1
            it["deleted"] = True
            it["history"].append({"version": it["version"], "method": "DELETE", "resource": None})
            return _Resp(204, None, {"ETag": f'W/"{self.label(rid, it["version"])}"'})
        return _Resp(204)

    def read(self, rtype: str, rid: str) -> _Resp:
        it = self.items.get((rtype, rid))
        if it is None:
            return _Resp(404, operation_outcome("not-found", f"{rtype}/{rid} not found"))
        if it["deleted"]:
            return _Resp(410, operation_outcome("deleted", f"{rtype}/{rid} was deleted"))
        return _Resp(200, it["resource"], {"ETag": f'W/"{self.label(rid, it["version"])}"'})

    def _headers(self, base: str, rtype: str, rid: str, version: int) -> dict:
        v = self.label(rid, version)
        return {"Location": f"{base}/{rtype}/{rid}/_history/{v}", "ETag": f'W/"{v}"',
                "Last-Modified": formatdate(usegmt=True)}


# ---------------------------------------------------------------------------------------------- server
class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True

    def __init__(self, addr, handler, owner: "FaultServer"):
        self.owner = owner
        super().__init__(addr, handler)

    def handle_error(self, request, client_address):  # quiet: resets/hangs are expected here
        pass


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "FaultServer/1.0"
    timeout = None

    def log_message(self, fmt, *args):  # quiet
        pass

    def setup(self):
        super().setup()
        # Headers and body go out in separate writes: without TCP_NODELAY, Nagle holds the body until
        # the client's delayed ACK (~40 ms), which would cap a keep-alive connection at ~25 requests/s.
        try:
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
        self.server.owner._track(self.connection, add=True)

    def finish(self):
        try:
            super().finish()
        finally:
            self.server.owner._track(self.connection, add=False)

    def _handle(self):
        owner: FaultServer = self.server.owner
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        if self.command == "GET" and self.path == "/metadata?mode=full":
            # The worker reading the CapabilityStatement: counted apart, never matched by a rule, so
            # that the requests and rules of a test are about delivery.
            owner.capability_reads += 1
            resp = owner._fhir("GET", "/metadata", b"", {})
            self.send(resp.status, resp.body, resp.headers, resp.content_type)
            return
        req = owner._record(self.command, self.path, self.headers, body, self.client_address)
        owner._dispatch(self, req)

    do_GET = do_PUT = do_POST = do_DELETE = do_PATCH = do_HEAD = _handle

    # helpers used by FaultServer
    def send(self, status: int, body=None, headers: dict | None = None, content_type: str | None = FHIR_JSON):
        if isinstance(body, (dict, list)):
            data = json.dumps(body).encode()
        elif isinstance(body, str):
            data = body.encode()
        else:
            data = body or b""
        self.send_response(status)
        if data and content_type:
            self.send_header("Content-Type", content_type)
        for k, v in (headers or {}).items():
            self.send_header(k, str(v))
        if status not in (204, 304) and not (100 <= status < 200):
            self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if data and self.command != "HEAD" and status not in (204, 304):
            self.wfile.write(data)


class FaultServer:
    def __init__(self, host: str = "127.0.0.1", port: int = 0, location_style: str = "history"):
        """location_style: "history" (Location <base>/<T>/<id>/_history/<n> on every PUT) or "helios"
        (like Helios 0.2.7: Location <base>/<T>/<id> on 201 only, none on 200)."""
        self.host = host
        self.port = port
        self.store = FhirStore(location_style)
        self._lock = threading.RLock()
        self._requests: list[Request] = []
        self._answers: dict[int, int] = {}     # Request.seq -> status it was answered with (default handling)
        self._rules: list[Rule] = []
        self._conns: set = set()
        self._release = threading.Event()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._seq = itertools.count(1)
        self._new_request = threading.Condition(self._lock)
        # What the server allows, like an EHR's CapabilityStatement says: update-as-create (a PUT that
        # would make a resource), and the types it takes no update (PUT) or DELETE of at all (405).
        self.update_create = True
        # Answers to writes that name nothing: no body, Location or ETag (a bare 200/201).
        self.bare = False
        # The CapabilityStatement's rest entry (interaction, resource), as an EHR declares it; None: none.
        self.rest: dict | None = None
        self.capability_reads = 0
        self.no_update: set[str] = set()
        self.no_delete: set[str] = set()

    # ------------------------------------------------------------------ lifecycle
    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def handler(self) -> type:
        """The request handler class (TLS servers wrap the socket first)."""
        return _Handler

    def start(self) -> "FaultServer":
        self._release.clear()
        self._server = _Server((self.host, self.port), self.handler(), self)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name=f"FaultServer:{self.port}", daemon=True)
        self._thread.start()
        return self

    def refuse(self) -> None:
        """Simulate the server going down: close the listening socket and every open connection."""
        srv, self._server = self._server, None
        if srv is not None:
            srv.shutdown()
            srv.server_close()
        with self._lock:
            conns = list(self._conns)
        for c in conns:
            _hard_close(c, wake=True)
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def accept(self) -> None:
        """Reopen the listening socket on the same port."""
        if self._server is not None:
            return
        deadline = time.monotonic() + 10
        while True:
            try:
                self.start()
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    @property
    def running(self) -> bool:
        return self._server is not None

    def stop(self) -> None:
        self._release.set()
        self.refuse()

    def __enter__(self):
        return self.start() if self._server is None else self

    def __exit__(self, *exc):
        self.stop()

    # ------------------------------------------------------------------ rules
    def add_rule(self, rule: Rule) -> Rule:
        with self._lock:
            self._rules.append(rule)
        return rule

    def respond(self, status: int, times: int | None = 1, body=None, headers: dict | None = None,
                retry_after=None, content_type: str | None = FHIR_JSON, delay: float = 0.0,
                match=None, entry: bool = False) -> Rule:
        """Answer with status (default body: an OperationOutcome for >= 400). retry_after: seconds or HTTP date."""
        h = dict(headers or {})
        if retry_after is not None:
            h["Retry-After"] = str(retry_after)
        return self.add_rule(Rule("status", times, match, entry, status=status, body=body, headers=h,
                                  content_type=content_type, delay=delay))

    def delay(self, seconds: float, times: int | None = 1, match=None) -> Rule:
        """Wait, then answer with the default behaviour."""
        return self.add_rule(Rule("delay", times, match, delay=seconds))

    def hang(self, times: int | None = 1, match=None) -> Rule:
        """Read the request, never answer (until stop() or release_hangs(); then the socket is closed)."""
        return self.add_rule(Rule("hang", times, match))

    def reset(self, times: int | None = 1, match=None, rst: bool = True) -> Rule:
        """Read the request, then close the connection without answering (RST if rst, else FIN)."""
        return self.add_rule(Rule("reset", times, match, kind="rst" if rst else "fin"))

    def garbage(self, kind: str = "text", times: int | None = 1, status: int = 200, match=None,
                size: int = 20 * 1024 * 1024) -> Rule:
        """kind: text | html | invalid_json | json_wrong_type | not_fhir | huge | truncated | empty."""
        if kind not in GARBAGE_KINDS:
            raise ValueError(f"kind must be one of {GARBAGE_KINDS}")
        return self.add_rule(Rule("garbage", times, match, status=status, kind=kind, delay=0.0,
                                  body=size))

    def redirect(self, status: int = 302, location: str = "http://127.0.0.1:9/elsewhere",
                 times: int | None = 1, match=None) -> Rule:
        return self.add_rule(Rule("redirect", times, match, status=status, location=location))

    def clear_rules(self) -> None:
        with self._lock:
            self._rules.clear()

    def release_hangs(self) -> None:
        self._release.set()
        # re-arm for future hang rules once the current hangers have woken up
        threading.Timer(0.5, self._release.clear).start()

    @property
    def pending_rules(self) -> list[Rule]:
        with self._lock:
            return [r for r in self._rules if r.times is None or r.hits < r.times]

    def _take_rule(self, req, entry: bool) -> Rule | None:
        with self._lock:
            for r in self._rules:
                if r.entry != entry or (r.times is not None and r.hits >= r.times):
                    continue
                if r.matches(req):
                    r.hits += 1
                    return r
        return None

    # ------------------------------------------------------------------ requests
    def _record(self, method, path, headers, body, client) -> Request:
        req = Request(time.monotonic(), method, path, {k.lower(): v for k, v in headers.items()}, body,
                      tuple(client), next(self._seq))
        with self._new_request:
            self._requests.append(req)
            self._new_request.notify_all()
        return req

    @property
    def requests(self) -> list[Request]:
        with self._lock:
            return list(self._requests)

    def answer_to(self, req: Request) -> int | None:
        """The status the store answered req with (None while it is still being held or when a rule answered)."""
        with self._lock:
            return self._answers.get(req.seq)

    def clear_requests(self) -> None:
        with self._lock:
            self._requests.clear()

    def wait_for_requests(self, n: int, timeout: float = 30.0, predicate=None) -> list[Request]:
        """Wait until at least n recorded requests (satisfying predicate, if given) exist; return them."""
        deadline = time.monotonic() + timeout
        with self._new_request:
            while True:
                got = [r for r in self._requests if predicate is None or predicate(r)]
                if len(got) >= n:
                    return got
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"only {len(got)} of {n} requests after {timeout}s")
                self._new_request.wait(left)

    # ------------------------------------------------------------------ dispatch
    def _track(self, conn, add: bool):
        with self._lock:
            (self._conns.add if add else self._conns.discard)(conn)

    def _dispatch(self, h: _Handler, req: Request) -> None:
        rule = self._take_rule(req, entry=False)
        if rule is not None and rule.action == "delay":   # wait, then the default behaviour
            time.sleep(rule.delay)
            rule = None
        if rule is None:
            resp = self.handle_fhir(req)
            with self._lock:
                self._answers[req.seq] = resp.status
            h.send(resp.status, resp.body, resp.headers, resp.content_type)
            return
        if rule.delay:
            time.sleep(rule.delay)
        a = rule.action
        if a == "status":
            body = rule.body
            if body is None and rule.status >= 400:
                body = operation_outcome("transient" if rule.status >= 500 else "processing",
                                         f"injected HTTP {rule.status}")
            h.send(rule.status, body, rule.headers, rule.content_type)
        elif a == "hang":
            h.close_connection = True
            while not self._release.wait(0.2) and h.connection.fileno() != -1:
                pass
            _hard_close(h.connection)
        elif a == "reset":
            h.close_connection = True
            if rule.kind == "rst":
                _hard_close(h.connection)
            else:
                try:
                    h.connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        elif a == "redirect":
            h.send(rule.status, "", {"Location": rule.location}, None)
        elif a == "garbage":
            self._send_garbage(h, rule)
        else:
            raise AssertionError(a)

    def _send_garbage(self, h: _Handler, rule: Rule) -> None:
        k, st = rule.kind, rule.status
        if k == "text":
            h.send(st, "this is not json", content_type="text/plain")
        elif k == "html":
            h.send(st, "<html><body><h1>502 Bad Gateway</h1></body></html>", content_type="text/html")
        elif k == "invalid_json":
            h.send(st, '{"resourceType": "Patient", "id": ', content_type=FHIR_JSON)
        elif k == "json_wrong_type":
            h.send(st, {"resourceType": "Patient", "id": "x"}, content_type="text/plain")
        elif k == "not_fhir":
            h.send(st, {"hello": "world"}, content_type="application/json")
        elif k == "empty":
            h.send(st, b"", content_type=FHIR_JSON)
        elif k == "huge":
            size = int(rule.body or 20 * 1024 * 1024)
            h.send_response(st)
            h.send_header("Content-Type", FHIR_JSON)
            h.send_header("Content-Length", str(size))
            h.end_headers()
            chunk = b" " * 65536
            sent = 0
            try:
                while sent < size:
                    n = min(len(chunk), size - sent)
                    h.wfile.write(chunk[:n])
                    sent += n
            except OSError:
                h.close_connection = True
        elif k == "truncated":
            data = json.dumps({"resourceType": "Patient", "id": "x", "name": [{"family": "X" * 100}]}).encode()
            h.send_response(st)
            h.send_header("Content-Type", FHIR_JSON)
            h.send_header("Content-Length", str(len(data) + 1000))
            h.end_headers()
            h.wfile.write(data[: len(data) // 2])
            h.close_connection = True
            _hard_close(h.connection)

    # ------------------------------------------------------------------ default FHIR behaviour
    def handle_fhir(self, req: Request) -> _Resp:
        with self._lock:
            return self._fhir(req.method, req.path, req.body, req.headers)

    def _fhir(self, method: str, full_path: str, body: bytes, headers: dict) -> _Resp:
        parts = urlsplit(full_path)
        segs = [unquote(s) for s in parts.path.strip("/").split("/") if s]
        query = dict(parse_qsl(parts.query, keep_blank_values=True))
        base = self.base_url
        prefer_minimal = "return=minimal" in (headers.get("prefer") or "")

        def finish(resp: _Resp) -> _Resp:
            if prefer_minimal and resp.status in (200, 201) and method in ("PUT", "POST"):
                resp.body = None
            if self.bare and resp.status in (200, 201) and method in ("PUT", "POST"):
                resp.body, resp.headers = None, {}
            return resp

        if method == "GET" and segs in (["metadata"],):
            statement = {"resourceType": "CapabilityStatement", "status": "active", "kind": "instance",
                         "fhirVersion": "4.0.1", "format": ["json"]}
            if self.rest is not None:
                statement["rest"] = [{"mode": "server", **self.rest}]
            return _Resp(200, statement)
        if method == "GET" and segs in (["health"], []):
            return _Resp(200, {"status": "ok"}, content_type="application/json")
        if method == "POST" and not segs:
            return self._bundle(body)
        if method == "POST" and len(segs) == 1:
            return finish(self._create(segs[0], body, headers.get("if-none-exist"), base))

        if not segs:
            return _Resp(400, operation_outcome("invalid", "no resource type"))
        rtype = segs[0]
        rid = segs[1] if len(segs) > 1 else None

        if method == "PUT" and rtype in self.no_update:
            return _Resp(405, operation_outcome("not-supported", f"{rtype} cannot be updated here"))
        if method == "DELETE" and rtype in self.no_delete:
            return _Resp(405, operation_outcome("not-supported", f"{rtype} cannot be deleted here"))
        if method == "PUT":
            resource = _resource_of(body, rtype)
            if isinstance(resource, _Resp):
                return resource
            if rid is not None:
                if resource.get("id") not in (None, rid):
                    return _Resp(400, operation_outcome("invalid", "id in body does not match URL"))
                if not self.update_create and (rtype, rid) not in self.store.items:
                    return _Resp(422, operation_outcome("not-supported", "update-as-create is not allowed; POST it"))
                return finish(self.store.put(rtype, rid, resource, base, headers.get("if-match")))
            ident = query.get("identifier")
            if ident is None:
                return _Resp(400, operation_outcome("invalid", "PUT without id needs search criteria"))
            ids = self.store.find(rtype, ident)
            if len(ids) > 1:
                return _Resp(412, operation_outcome("duplicate", f"{len(ids)} matches for identifier={ident}"))
            resource.pop("id", None)
            if not ids and not self.update_create:
                return _Resp(422, operation_outcome("not-supported", "update-as-create is not allowed; POST it"))
            return finish(self.store.put(rtype, ids[0] if ids else None, resource, base,
                                         headers.get("if-match")))
        if method == "DELETE":
            if rid is not None:
                return self.store.delete(rtype, rid)
            ident = query.get("identifier")
            if ident is None:
                return _Resp(412, operation_outcome("invalid", "conditional DELETE needs criteria"))
            ids = self.store.find(rtype, ident)
            if len(ids) > 1:
                return _Resp(412, operation_outcome("duplicate", f"{len(ids)} matches for identifier={ident}"))
            for i in ids:
                self.store.delete(rtype, i)
            return _Resp(204)
        if method in ("GET", "HEAD"):
            if rid is not None and len(segs) == 2:
                return self.store.read(rtype, rid)
            if rid is not None and len(segs) >= 3 and segs[2] == "_history":
                it = self.store.items.get((rtype, rid))
                if it is None:
                    return _Resp(404, operation_outcome("not-found", f"{rtype}/{rid} not found"))
                hist = [h for h in it["history"] if len(segs) == 3 or str(h["version"]) == segs[3]]
                if len(segs) == 4:
                    if not hist or hist[0]["resource"] is None:
                        return _Resp(404 if not hist else 410, operation_outcome("not-found", "no such version"))
                    return _Resp(200, hist[0]["resource"], {"ETag": f'W/"{hist[0]["version"]}"'})
                entries = []
                for hh in reversed(hist):
                    e = {"fullUrl": f"{base}/{rtype}/{rid}",
                         "request": {"method": hh["method"], "url": f"{rtype}/{rid}"},
                         "response": {"status": "200" if hh["resource"] else "204",
                                      "etag": f'W/"{hh["version"]}"'}}
                    if hh["resource"]:
                        e["resource"] = hh["resource"]
                    entries.append(e)
                return _Resp(200, {"resourceType": "Bundle", "type": "history", "total": len(entries),
                                   "entry": entries})
            if rid is None:
                ident = query.get("identifier")
                if ident is not None:
                    ids = self.store.find(rtype, ident)
                else:
                    ids = [i for (t, i), it in self.store.items.items() if t == rtype and not it["deleted"]]
                entries = [{"fullUrl": f"{base}/{rtype}/{i}", "resource": self.store.items[(rtype, i)]["resource"],
                            "search": {"mode": "match"}} for i in ids]
                return _Resp(200, {"resourceType": "Bundle", "type": "searchset", "total": len(entries),
                                   "entry": entries})
        return _Resp(405, operation_outcome("not-supported", f"{method} {full_path}"))

    def _create(self, rtype: str, body: bytes, if_none_exist: str | None, base: str) -> _Resp:
        """POST [base]/Type: a create, conditional on If-None-Exist (identifier=system|value) when given: one
        match answers 200 with the resource and writes nothing, several 412."""
        resource = _resource_of(body, rtype)
        if isinstance(resource, _Resp):
            return resource
        if if_none_exist:
            search = dict(parse_qsl(if_none_exist, keep_blank_values=True))
            ids = self.store.find(rtype, search.get("identifier", ""))
            if len(ids) > 1:
                return _Resp(412, operation_outcome("duplicate", f"{len(ids)} matches for If-None-Exist"))
            if ids:
                it = self.store.items[(rtype, ids[0])]
                return _Resp(200, it["resource"], {"ETag": f'W/"{self.store.label(ids[0], it["version"])}"'})
        resource.pop("id", None)
        return self.store.put(rtype, None, resource, base)

    def _bundle(self, body: bytes) -> _Resp:
        try:
            bundle = json.loads(body or b"null")
        except ValueError as e:
            return _Resp(400, operation_outcome("structure", f"invalid JSON: {e}"))
        if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle" \
                or bundle.get("type") not in ("batch", "transaction"):
            return _Resp(400, operation_outcome("invalid", "expected a batch or transaction Bundle"))
        tx = bundle["type"] == "transaction"
        snapshot = copy.deepcopy(self.store.items) if tx else None
        out = []
        for i, e in enumerate(bundle.get("entry") or []):
            r = e.get("request") or {}
            ereq = EntryRequest(r.get("method", ""), r.get("url", ""), e.get("resource"), i)
            rule = self._take_rule(ereq, entry=True)
            if rule is not None:
                body_ = rule.body if rule.body is not None else (
                    operation_outcome("processing", f"injected HTTP {rule.status}") if rule.status >= 400 else None)
                resp = _Resp(rule.status, body_, rule.headers)
            else:
                data = json.dumps(ereq.resource).encode() if ereq.resource is not None else b""
                hdrs = {"if-none-exist": r["ifNoneExist"]} if r.get("ifNoneExist") else {}
                resp = self._fhir(ereq.method.upper(), "/" + ereq.url.lstrip("/"), data, hdrs)
            if tx and resp.status >= 400:
                self.store.items = snapshot
                return _Resp(resp.status, resp.body if isinstance(resp.body, dict) and
                             resp.body.get("resourceType") == "OperationOutcome" else
                             operation_outcome("processing", f"transaction failed at entry {i}: {resp.status}"))
            ent = {"response": {"status": f"{resp.status} {_reason(resp.status)}"}}
            if "Location" in resp.headers:
                ent["response"]["location"] = resp.headers["Location"]
            if "ETag" in resp.headers:
                ent["response"]["etag"] = resp.headers["ETag"]
            if "Last-Modified" in resp.headers:
                ent["response"]["lastModified"] = _now_iso()
            if isinstance(resp.body, dict):
                if resp.body.get("resourceType") == "OperationOutcome" and resp.status >= 400:
                    ent["response"]["outcome"] = resp.body
                elif resp.body.get("resourceType") not in (None, "Bundle") or ereq.method.upper() == "GET":
                    ent["resource"] = resp.body
            out.append(ent)
        return _Resp(200, {"resourceType": "Bundle", "type": "transaction-response" if tx else "batch-response",
                           "entry": out})


def _resource_of(body: bytes, rtype: str):
    """The resource a PUT or POST carries, or the 400 a server answers to a body that is not one of rtype."""
    try:
        resource = json.loads(body or b"null")
    except ValueError as e:
        return _Resp(400, operation_outcome("structure", f"invalid JSON: {e}"))
    if not isinstance(resource, dict) or resource.get("resourceType") != rtype:
        return _Resp(400, operation_outcome("invalid", f"body is not a {rtype}"))
    return resource


def _unescape_token(t: str) -> str:
    """Undo FHIR search escaping of '\\,' and '\\\\' (what Helios honours)."""
    out, i = [], 0
    while i < len(t):
        if t[i] == "\\" and i + 1 < len(t) and t[i + 1] in ",\\":
            out.append(t[i + 1])
            i += 2
        else:
            out.append(t[i])
            i += 1
    return "".join(out)


def _reason(status: int) -> str:
    from http import HTTPStatus
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return ""


def _hard_close(sock, wake: bool = False) -> None:
    """Close a socket with RST (SO_LINGER 0), ignoring errors.

    wake: shutdown() first, so that another thread blocked reading this socket returns (sends a FIN first).
    """
    if wake:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    try:
        sock.close()
    except OSError:
        pass
