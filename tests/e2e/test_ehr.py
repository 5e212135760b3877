"""The servers hospitals write to: SMART Backend Services (a JWT assertion signed with fhir_sync's key,
verified by a token endpoint against the JWKS fhir_sync prints), mutual TLS, a request-rate cap the
server can count, and Bundles the server refuses as too large or that time out.
"""
from __future__ import annotations

import os
import shutil
import ssl
import subprocess
from pathlib import Path

import psycopg
import pytest

from fhirsync import MRN, eventually, make_app
from harness.cluster import PG_USER
from harness.smart import SmartAuthServer, SmartFhirServer
from harness.util import unique
from test_security import (HTTP_AUTH, TlsFaultServer, _openssl, _point, connect_as, denied, make_certs,
                           needs_openssl, reload_and_wait, worker_log)

CLIENT_ID = "fhir-sync-backend"
SCOPE = "system/Patient.write system/Encounter.write system/Observation.write"


def private_key(app, name: str, kind: str, mode: int = 0o600) -> Path:
    """A private key made the way a DBA makes one (openssl genpkey), owned by the server's OS user."""
    path = app.cluster.dir / name
    args = {"rsa": ["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"],
            "ec": ["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-384"]}[kind]
    subprocess.run(["openssl", "genpkey", *args, "-out", str(path)], check=True, capture_output=True, timeout=60)
    shutil.chown(path, PG_USER, PG_USER)
    path.chmod(mode)
    return path


def add_patients(app, prefix: str, n: int) -> None:
    """n patients in one transaction (claimed together)."""
    app.sql("INSERT INTO patient (identifier_system, identifier_value, name_family, name_given, gender, birth_date)"
            " SELECT %s, %s || g, 'Doe', 'Jane', 'female', '1970-01-01' FROM generate_series(1, %s) g",
            (MRN, prefix, n))


class Smart:
    """A token endpoint, a FHIR server behind it, and an app pointed at both with auth = smart_backend."""

    def __init__(self, make_cluster, kind: str = "rsa", conf: dict | None = None, expires_in: int = 300):
        self.auth = SmartAuthServer(CLIENT_ID, expires_in=expires_in).start()
        self.fhir = SmartFhirServer(self.auth).start()
        self.app = make_app(make_cluster, self.fhir.base_url,
                            conf={**HTTP_AUTH, "fhir_sync.batch_size": 5, "fhir_sync.max_in_flight": 2, **(conf or {})})
        self.key = private_key(self.app, "smart-key.pem", kind)

    def configure(self, **extra) -> dict:
        """The README's settings (no token URL: it is read from .well-known/smart-configuration), then the
        JWKS fhir_sync prints registered with the EHR, as a DBA does. The JWKS is registered after the
        reload, so call this with nothing pending: a token asked for in between is refused (auth pause)."""
        reload_and_wait(self.app, {"fhir_sync.auth": "smart_backend", "fhir_sync.smart_key_file": str(self.key),
                                   "fhir_sync.oauth_client_id": CLIENT_ID, "fhir_sync.oauth_scope": SCOPE, **extra})
        jwks = self.app.one("SELECT fhir_sync_jwks()")
        self.auth.register(jwks)
        return jwks

    def puts(self):
        return [r for r in self.fhir.requests if r.method == "PUT"]

    def stop(self):
        self.fhir.stop()
        self.auth.stop()


@pytest.fixture
def smart(make_cluster):
    made = []

    def factory(**kw) -> Smart:
        s = Smart(make_cluster, **kw)
        made.append(s)
        return s

    yield factory
    for s in made:
        s.stop()


# ---------------------------------------------------------------------------------------------- SMART
@pytest.mark.e2e
@needs_openssl
@pytest.mark.parametrize("kind,alg", [("rsa", "RS384"), ("ec", "ES384")])
def test_smart_backend_services_signs_an_assertion_the_ehr_verifies_and_reuses_the_token(smart, kind, alg):
    """With an RSA key the assertion is RS384, with a P-384 key ES384; the token endpoint verifies it
    against the JWKS fhir_sync_jwks() printed (signature, alg, aud, iss = sub, exp ≤ 5 min, fresh jti).
    The token URL comes from the server's SMART configuration; one token serves every request."""
    s = smart(kind=kind)
    jwks = s.configure()
    assert [k["alg"] for k in jwks["keys"]] == [alg]
    assert not any(p in k for k in jwks["keys"] for p in ("d", "p", "q", "dp", "dq", "qi")), "public halves only"
    add_patients(s.app, "smart-", 12)
    s.app.wait_drained()

    assert s.auth.refused == []
    assert len(s.auth.accepted) == 1, "one token for twelve patients"
    header, claims = s.auth.accepted[0]
    assert (header["alg"], header["kid"]) == (alg, jwks["keys"][0]["kid"])
    assert claims["iss"] == claims["sub"] == CLIENT_ID and claims["aud"] == s.auth.token_url
    assert s.auth.scopes == [SCOPE]
    assert s.fhir.unauthorized == 0
    assert len(s.puts()) == 12
    assert all(s.auth.valid(r.headers["authorization"].removeprefix("Bearer ")) for r in s.puts())
    discovery = [r for r in s.fhir.requests if r.url_path == "/.well-known/smart-configuration"]
    assert len(discovery) == 1
    assert all(s.fhir.store.find("Patient", f"{MRN}|smart-{i}") for i in range(1, 13))
    assert s.app.one("SELECT count(*) FROM fhir_dlq") == 0


@pytest.mark.fault
@needs_openssl
def test_a_revoked_smart_token_is_replaced_at_once_and_a_refused_one_pauses(smart):
    """A 401 to a request made with a cached token fetches a new token (a new assertion, a new jti) and
    sends the request again at once, with no pause. A 401 to the fresh token too pauses delivery
    (credentials rejected) after exactly one more token request: no loop, nothing dead-lettered."""
    s = smart()
    s.configure()
    s.app.add_patient("revoked-1")
    s.app.wait_drained()
    s.auth.revoke_all()
    s.app.add_patient("revoked-2")
    s.app.wait_drained(timeout=15)          # the auth pause is 60 s: this is the immediate retry
    assert len(s.auth.accepted) == 2 and s.auth.refused == []
    assert s.fhir.unauthorized == 1
    jtis = [c["jti"] for _, c in s.auth.accepted]
    assert len(set(jtis)) == 2

    s.fhir.respond(401, times=None, match={"method": "PUT"})
    s.app.add_patient("revoked-3")
    eventually(lambda: (s.app.one("SELECT paused_reason FROM fhir_sync_status") or "").startswith("credentials rejected"),
               message="paused on a second 401")
    assert len(s.auth.accepted) == 3, "one refresh per refused request, not a loop"
    assert s.app.one("SELECT count(*) FROM fhir_dlq") == 0
    s.fhir.clear_rules()
    s.app.sql("SELECT pg_reload_conf()")    # ends the pause
    s.app.wait_drained(timeout=30)
    assert s.fhir.store.find("Patient", f"{MRN}|revoked-3")


@pytest.mark.e2e
@needs_openssl
def test_a_smart_token_is_fetched_again_shortly_before_it_expires(smart):
    """expires_in = 10 s: the token is reused for a while, then replaced before the EHR would refuse it
    (no request goes out with a lapsed token: the FHIR server never answers 401)."""
    s = smart(expires_in=10, conf={"fhir_sync.batch_size": 1})
    s.configure()
    s.app.add_patient("expiry-0")
    s.app.wait_drained()
    n = 0

    def second_token():
        nonlocal n
        n += 1
        s.app.add_patient(f"expiry-{n}")
        s.app.wait_drained()
        return len(s.auth.accepted) >= 2

    eventually(second_token, timeout=40, interval=0.5, message="a second token")
    assert n >= 3, "the first token served several requests"
    assert s.fhir.unauthorized == 0


@pytest.mark.e2e
@needs_openssl
def test_a_rotated_key_is_published_beside_the_new_one_which_signs(smart):
    """Rotation: smart_key_file gets the new key, smart_previous_key_file the old one; fhir_sync_jwks()
    publishes both (new first, each with its kid), and the next assertion is signed with the new key."""
    s = smart(kind="ec")
    old = s.configure()["keys"][0]
    s.app.add_patient("rotate-1")
    s.app.wait_drained()
    new_key = private_key(s.app, "smart-key-2.pem", "rsa")
    reload_and_wait(s.app, {"fhir_sync.smart_key_file": str(new_key), "fhir_sync.smart_previous_key_file": str(s.key),
                            "fhir_sync.smart_key_id": "2026-12", "fhir_sync.smart_previous_key_id": old["kid"]})
    jwks = s.app.one("SELECT fhir_sync_jwks()")
    assert [(k["kid"], k["alg"]) for k in jwks["keys"]] == [("2026-12", "RS384"), (old["kid"], "ES384")]
    assert jwks["keys"][1] == old, "the old key is published unchanged"
    s.auth.register(jwks)
    s.app.add_patient("rotate-2")
    s.app.wait_drained()
    assert [h["kid"] for h, _ in s.auth.accepted] == [old["kid"], "2026-12"]
    assert s.auth.refused == []


@pytest.mark.fault
@needs_openssl
def test_an_unreadable_smart_key_sends_nothing_and_says_why(smart):
    """A key file others can read is refused: nothing is sent (no token request, no FHIR request), the log
    names the setting and the reason, fhir_sync_jwks() raises the same; chmod 600 and a reload deliver.
    An ordinary role may not call fhir_sync_jwks()."""
    s = smart()
    s.key.chmod(0o644)
    reload_and_wait(s.app, {"fhir_sync.auth": "smart_backend", "fhir_sync.smart_key_file": str(s.key),
                            "fhir_sync.oauth_client_id": CLIENT_ID, "fhir_sync.oauth_scope": SCOPE})
    s.app.add_patient("key-1")
    eventually(lambda: "fhir_sync.smart_key_file" in worker_log(s.app.cluster), message="the log line")
    s.app.wait_cycles(2)
    line = next(ln for ln in worker_log(s.app.cluster).splitlines() if "smart_key_file" in ln)
    assert "sending nothing" in line and "group or world access" in line, line
    assert s.fhir.requests == [] and s.auth.accepted == [] and s.app.pending() == 1
    with pytest.raises(psycopg.Error) as e:
        s.app.sql("SELECT fhir_sync_jwks()")
    assert "group or world access" in str(e.value)

    s.app.sql("CREATE ROLE clerk LOGIN")
    denied(connect_as(s.app.cluster, "clerk"), "SELECT fhir_sync_jwks()")

    # The settings stand; only the file's mode changed. The EHR learns the JWKS before the reload: a worker
    # that asked for a token first would be refused and pause for a minute (the auth pause).
    s.key.chmod(0o600)
    s.auth.register(s.app.one("SELECT fhir_sync_jwks()"))
    s.app.sql("SELECT pg_reload_conf()")
    s.app.wait_drained(timeout=30)
    assert s.fhir.store.find("Patient", f"{MRN}|key-1")
    assert s.auth.refused == []


# ---------------------------------------------------------------------------------------------- mutual TLS
class MutualTlsServer(TlsFaultServer):
    """HTTPS that requires a client certificate signed by the test CA (CERT_REQUIRED)."""

    def __init__(self, certs: Path, **kw):
        super().__init__(certs / "server.pem", certs / "server.key", **kw)
        self.ctx.verify_mode = ssl.CERT_REQUIRED
        self.ctx.load_verify_locations(str(certs / "ca.pem"))


def make_client_cert(d: Path) -> None:
    """client.pem / client.key: a client certificate signed by the CA make_certs made."""
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "client.key", "-out", "client.csr",
             "-subj", "/CN=fhir_sync worker", cwd=d)
    (d / "client.ext").write_text("basicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=clientAuth\n")
    _openssl("x509", "-req", "-in", "client.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
             "-out", "client.pem", "-days", "2", "-extfile", "client.ext", cwd=d)
    for f in ("client.pem", "client.key"):
        shutil.chown(d / f, PG_USER, PG_USER)
    os.chmod(d / "client.pem", 0o644)
    os.chmod(d / "client.key", 0o600)


@pytest.mark.fault
@needs_openssl
def test_mutual_tls_is_refused_without_a_client_certificate_and_accepted_with_it(make_cluster):
    """A server that requires a client certificate refuses the handshake until tls_client_cert_file and
    tls_client_key_file are set (nothing reaches it, nothing is dead-lettered); a key file others can read
    sends nothing and says so; with the pair, the change is delivered."""
    app = make_app(make_cluster, "http://127.0.0.1:9", conf={"fhir_sync.max_retries": 100})
    certs = app.cluster.dir / "tls"
    make_certs(certs)
    make_client_cert(certs)
    server = MutualTlsServer(certs).start()
    try:
        _point(app, server.base_url, certs / "ca.pem")
        app.add_patient("mtls-1")
        eventually(lambda: server.handshake_failures >= 2, message="handshakes refused without a certificate")
        assert server.requests == [] and app.pending() == 1

        os.chmod(certs / "client.key", 0o644)
        reload_and_wait(app, {"fhir_sync.tls_client_cert_file": str(certs / "client.pem"),
                              "fhir_sync.tls_client_key_file": str(certs / "client.key")})
        eventually(lambda: "tls_client_key_file" in worker_log(app.cluster), message="the log line")
        assert "group or world access" in worker_log(app.cluster)
        assert server.requests == []

        os.chmod(certs / "client.key", 0o600)
        app.sql("SELECT pg_reload_conf()")
        app.wait_drained(timeout=60)
        assert server.store.find("Patient", f"{MRN}|mtls-1")
        assert app.one("SELECT count(*) FROM fhir_dlq") == 0
    finally:
        server.stop()


# ---------------------------------------------------------------------------------------------- limits
def most_in_one_second(times: list[float]) -> int:
    times = sorted(times)
    return max(sum(1 for u in times[i:] if u < t + 1.0) for i, t in enumerate(times))


@pytest.mark.fault
def test_the_request_rate_cap_holds_for_every_second_the_server_sees(make_cluster, faults):
    """max_requests_per_second = 5 with two workers and four requests in flight each: in no second does
    the server receive more than five requests, and every change is delivered once."""
    app = make_app(make_cluster, faults.base_url,
                   conf={"fhir_sync.max_requests_per_second": 5, "fhir_sync.workers": 2,
                         "fhir_sync.max_in_flight": 4, "fhir_sync.batch_size": 10})
    add_patients(app, "rate-", 30)
    app.wait_drained(timeout=60)
    times = [r.time for r in faults.requests]
    assert len(times) >= 30
    assert most_in_one_second(times) <= 5, most_in_one_second(times)
    assert all(len(faults.store.find("Patient", f"{MRN}|rate-{i}")) == 1 for i in range(1, 31))
    assert app.one("SELECT count(*) FROM fhir_dlq") == 0


def bundle_entries(r) -> int:
    if r.method != "POST" or r.url_path not in ("", "/"):
        return 0
    return len((r.json() or {}).get("entry") or [])


def delivered_once(faults, prefix: str, n: int) -> bool:
    return all(len(faults.store.find("Patient", f"{MRN}|{prefix}{i}")) == 1 for i in range(1, n + 1))


@pytest.mark.fault
def test_a_bundle_refused_as_too_large_is_sent_in_halves_and_later_ones_are_smaller(make_cluster, faults):
    """The server answers 413 to any Bundle of more than 5 entries: a Bundle of 20 is sent again as halves
    down to what the server takes; nothing is dead-lettered or created twice; the next batch goes out in
    Bundles the server accepts at once."""
    faults.respond(413, times=None, match=lambda r: bundle_entries(r) > 5)
    app = make_app(make_cluster, faults.base_url, conf={"fhir_sync.bundle_size": 20, "fhir_sync.batch_size": 20})
    add_patients(app, "big-", 20)
    app.wait_drained(timeout=60)
    sizes = [bundle_entries(r) for r in faults.requests if bundle_entries(r)]
    assert sizes[0] == 20 and max(sizes[1:]) <= 10 and 5 in sizes, sizes
    assert app.one("SELECT count(*) FROM fhir_dlq") == 0
    assert delivered_once(faults, "big-", 20)

    faults.clear_requests()
    add_patients(app, "after-", 20)
    app.wait_drained(timeout=60)
    sizes = [bundle_entries(r) for r in faults.requests if bundle_entries(r)]
    assert sizes and max(sizes) <= 5, sizes
    assert delivered_once(faults, "after-", 20)


@pytest.mark.fault
def test_a_bundle_that_times_out_is_sent_in_halves(make_cluster, faults):
    """Bundles of more than 5 entries hang past fhir_sync.http_timeout: the 20 changes still arrive, each
    once, in smaller Bundles, and none is dead-lettered."""
    faults.hang(times=None, match=lambda r: bundle_entries(r) > 5)
    app = make_app(make_cluster, faults.base_url,
                   conf={"fhir_sync.bundle_size": 20, "fhir_sync.batch_size": 20, "fhir_sync.http_timeout": "2s"})
    try:
        add_patients(app, "slow-", 20)
        app.wait_drained(timeout=90)
        assert app.one("SELECT count(*) FROM fhir_dlq") == 0
        assert delivered_once(faults, "slow-", 20)
        sizes = [bundle_entries(r) for r in faults.requests if bundle_entries(r)]
        assert sizes[0] == 20 and min(sizes) <= 5, sizes
    finally:
        faults.release_hangs()


# ---------------------------------------------------------------------------------------------- write modes
def track_patients(app, mode: str | None) -> None:
    app.sql("SELECT fhir_track('patient', 'Patient', write_mode => %s)", (mode,))


@pytest.mark.fault
def test_write_mode_create_posts_with_if_none_exist_and_then_updates_by_id(make_cluster, faults):
    """On a server without update-as-create: the first write is POST [base]/Patient with If-None-Exist on
    the identifier, later ones PUT Patient/<id>. A Patient the server already holds for the identifier
    (made by someone else) is found, not duplicated, and gets the row's data by id."""
    faults.update_create = False
    app = make_app(make_cluster, faults.base_url)
    track_patients(app, "create")
    pid = app.add_patient("create-1", family="Created")
    app.wait_drained()
    post = [r for r in faults.requests if r.method == "POST"]
    assert [(r.url_path, r.headers.get("if-none-exist")) for r in post] == \
        [("/Patient", f"identifier={MRN.replace(':', '%3A').replace('/', '%2F')}%7Ccreate-1")]
    [rid] = faults.store.find("Patient", f"{MRN}|create-1")
    app.sql("UPDATE patient SET name_family = 'Updated' WHERE id = %s", (pid,))
    app.wait_drained()
    assert faults.requests[-1].method == "PUT" and faults.requests[-1].url_path == f"/Patient/{rid}"
    assert faults.store.items[("Patient", rid)]["resource"]["name"][0]["family"] == "Updated"

    other = faults.store.put("Patient", None, {"resourceType": "Patient", "identifier": [
        {"system": MRN, "value": "create-2"}], "name": [{"family": "Elsewhere"}]}, faults.base_url).body["id"]
    app.add_patient("create-2", family="Ours")
    app.wait_drained()
    assert faults.store.find("Patient", f"{MRN}|create-2") == [other]
    assert faults.store.items[("Patient", other)]["resource"]["name"][0]["family"] == "Ours"
    assert app.one("SELECT fhir_id FROM fhir_sync_state WHERE identifier_value = 'create-2'") == other
    assert app.one("SELECT count(*) FROM fhir_dlq") == 0


@pytest.mark.fault
def test_the_default_write_mode_applies_to_bundles_too(make_cluster, faults):
    """fhir_sync.write_mode = create for tables tracked without one: Bundle entries are POSTs with
    ifNoneExist, and nothing is created twice when the same rows are sent again (backfill)."""
    faults.update_create = False
    app = make_app(make_cluster, faults.base_url, conf={"fhir_sync.write_mode": "create", "fhir_sync.bundle_size": 10})
    add_patients(app, "bundle-create-", 10)
    app.wait_drained()
    [bundle] = [r for r in faults.requests if bundle_entries(r)]
    assert {(e["request"]["method"], e["request"]["url"], "ifNoneExist" in e["request"])
            for e in bundle.json()["entry"]} == {("POST", "Patient", True)}
    assert delivered_once(faults, "bundle-create-", 10)
    app.sql("DELETE FROM fhir_sync_state")      # the worker forgets what it made: the next writes are creates
    app.sql("SELECT fhir_backfill('patient')")
    app.wait_drained()
    assert delivered_once(faults, "bundle-create-", 10)
    assert app.one("SELECT count(*) FROM fhir_dlq") == 0


@pytest.mark.fault
def test_write_mode_create_only_records_later_changes_as_not_sendable(make_cluster, faults):
    """A server that takes no update of Patient: the row is created once; a later change is dead-lettered as
    not_sendable with no request made (not retried); a DELETE the server answers 405 is not_sendable too,
    sent once."""
    faults.update_create = False
    faults.no_update = {"Patient"}
    faults.no_delete = {"Patient"}
    app = make_app(make_cluster, faults.base_url)
    track_patients(app, "create_only")
    pid = app.add_patient("once-1", family="Once")
    app.wait_drained()
    [rid] = faults.store.find("Patient", f"{MRN}|once-1")
    sent = len(faults.requests)
    app.sql("UPDATE patient SET name_family = 'Twice' WHERE id = %s", (pid,))
    app.wait_drained()
    assert len(faults.requests) == sent, "no request for a change the server would refuse"
    assert app.sql("SELECT error_class, http_status, attempts FROM fhir_dlq") == [("not_sendable", None, 0)]
    assert "create_only" in app.one("SELECT error FROM fhir_dlq")
    assert faults.store.items[("Patient", rid)]["resource"]["name"][0]["family"] == "Once"

    app.sql("DELETE FROM patient WHERE id = %s", (pid,))
    app.wait_drained()
    deletes = [r for r in faults.requests if r.method == "DELETE"]
    assert len(deletes) == 1
    assert app.sql("SELECT error_class, http_status FROM fhir_dlq ORDER BY id DESC LIMIT 1") == [("not_sendable", 405)]


@pytest.mark.e2e
def test_write_mode_create_against_helios(make_cluster, helios):
    """create, update and delete with write_mode => 'create' on a real server."""
    app = make_app(make_cluster, helios.base_url)
    track_patients(app, "create")
    mrn = unique("helios-create")
    pid = app.add_patient(mrn, family="Posted")
    app.wait_drained()
    [p] = helios.search("Patient", MRN, mrn)
    assert p["name"][0]["family"] == "Posted"
    app.sql("UPDATE patient SET name_family = 'Put' WHERE id = %s", (pid,))
    app.wait_drained()
    [q] = helios.search("Patient", MRN, mrn)
    assert (q["id"], q["name"][0]["family"]) == (p["id"], "Put")
    app.sql("DELETE FROM patient WHERE id = %s", (pid,))
    app.wait_drained()
    assert helios.search("Patient", MRN, mrn) == []
    assert app.one("SELECT count(*) FROM fhir_dlq") == 0


@pytest.mark.fault
@pytest.mark.parametrize("bundle", [0, 10])
def test_a_write_answered_with_no_body_location_or_etag_learns_the_id_with_a_search(make_cluster, faults, bundle):
    """A server that answers writes with a bare 200/201 (no body, Location or ETag): the worker reads the
    id with a search, so the next update goes to Patient/<id>, not by identifier again."""
    faults.bare = True
    app = make_app(make_cluster, faults.base_url, conf={"fhir_sync.bundle_size": bundle})
    add_patients(app, "bare-", 3)
    app.wait_drained()
    [rid] = faults.store.find("Patient", f"{MRN}|bare-1")
    assert app.one("SELECT fhir_id FROM fhir_sync_state WHERE identifier_value = 'bare-1'") == rid
    app.sql("UPDATE patient SET name_family = 'Again' WHERE identifier_value = 'bare-1'")
    app.wait_drained()
    last = faults.requests[-1]
    urls = [e["request"]["url"] for e in last.json()["entry"]] if bundle_entries(last) else [last.url_path.lstrip("/")]
    assert urls == [f"Patient/{rid}"]
    assert app.one("SELECT count(*) FROM fhir_dlq") == 0


# ---------------------------------------------------------------------------------------------- capabilities
@pytest.mark.fault
def test_what_the_capability_statement_declares_is_used_and_shown(make_cluster, faults):
    """A server that declares no update-as-create for Patient, no versions (so no If-Match), and transaction but
    no batch Bundles: with the default settings (upsert, batch Bundles of 10) the worker sends conditional
    creates, one request each, and updates without If-Match; fhir_sync_server and the log say why."""
    faults.update_create = False
    faults.rest = {"interaction": [{"code": "transaction"}],
                   "resource": [{"type": "Patient", "interaction": [{"code": c} for c in ("create", "update", "delete")],
                                 "updateCreate": False, "conditionalCreate": True, "versioning": "no-version"}]}
    app = make_app(make_cluster, faults.base_url, conf={"fhir_sync.bundle_size": 10})
    add_patients(app, "caps-", 3)
    app.wait_drained()
    writes = [r for r in faults.requests if r.method in ("POST", "PUT")]
    assert [(r.method, r.url_path, "if-none-exist" in r.headers) for r in writes] == [("POST", "/Patient", True)] * 3
    app.sql("UPDATE patient SET name_family = 'Unconditional' WHERE identifier_value = 'caps-1'")
    app.wait_drained()
    last = faults.requests[-1]
    assert last.method == "PUT" and "if-match" not in last.headers
    assert app.one("SELECT count(*) FROM fhir_dlq") == 0

    server, batch, transaction, patient, notes = app.sql(
        "SELECT server_url, batch, transaction, resources->'Patient', notes FROM fhir_sync_server")[0]
    assert (server, batch, transaction) == (faults.base_url, False, True)
    assert (patient["write_mode"], patient["if_match"], patient["update_create"]) == ("create", False, False)
    assert any("no update-as-create of Patient" in n for n in notes), notes
    assert any("no batch Bundle" in n for n in notes), notes
    assert "the server's CapabilityStatement: the server takes no update-as-create of Patient" in worker_log(app.cluster)


@pytest.mark.e2e
def test_helios_capability_statement_is_read_and_shown(make_cluster, helios):
    app = make_app(make_cluster, helios.base_url)
    app.add_patient(unique("caps-helios"))
    app.wait_drained()
    fhir_version, resources = eventually(lambda: app.sql("SELECT fhir_version, resources FROM fhir_sync_server"),
                                         message="fhir_sync_server")[0]
    assert fhir_version.startswith("4.")
    # Helios 0.2.7 states update-as-create and conditional update for Patient: nothing changes.
    patient = resources["Patient"]
    assert (patient["listed"], patient["update_create"], patient["conditional_update"]) == (True, True, True)
    assert (patient["write_mode"], patient["if_match"], patient["delete"]) == ("upsert", True, True)
    assert app.one("SELECT count(*) FROM fhir_dlq") == 0


@pytest.mark.fault
def test_opaque_version_ids_are_sent_back_as_the_server_gave_them(make_cluster, faults):
    """A server whose versionIds are opaque strings: the worker records it and the next update carries it in
    If-Match unchanged (the server checks it and accepts)."""
    faults.store.opaque_versions = True
    app = make_app(make_cluster, faults.base_url)
    pid = app.add_patient("opaque-1")
    app.wait_drained()
    [rid] = faults.store.find("Patient", f"{MRN}|opaque-1")
    version = faults.store.items[("Patient", rid)]["resource"]["meta"]["versionId"]
    assert not version.isdigit()
    assert app.one("SELECT fhir_version FROM fhir_sync_resources WHERE resource_key = %s", (str(pid),)) == version
    app.sql("UPDATE patient SET name_family = 'Opaque' WHERE id = %s", (pid,))
    app.wait_drained()
    last = faults.requests[-1]
    assert (last.method, last.url_path, last.headers.get("if-match")) == ("PUT", f"/Patient/{rid}", f'W/"{version}"')
    assert faults.answer_to(last) == 200
    assert app.one("SELECT count(*) FROM fhir_dlq") == 0


@pytest.mark.fault
def test_a_server_that_ignores_if_match_still_gets_the_current_row(make_cluster, faults):
    """Another client changed the resource; a server that ignores If-Match applies our update anyway (no 412,
    no re-read): the row's current state is what the server holds, and nothing is dead-lettered."""
    faults.store.ignore_if_match = True
    app = make_app(make_cluster, faults.base_url)
    pid = app.add_patient("ignored-1")
    app.wait_drained()
    [rid] = faults.store.find("Patient", f"{MRN}|ignored-1")
    other = dict(faults.store.items[("Patient", rid)]["resource"], name=[{"family": "Someone else"}])
    faults.store.put("Patient", rid, other, faults.base_url)
    app.sql("UPDATE patient SET name_family = 'Ours' WHERE id = %s", (pid,))
    app.wait_drained()
    assert [r.method for r in faults.requests if r.url_path == f"/Patient/{rid}"] == ["PUT"]
    assert faults.store.items[("Patient", rid)]["resource"]["name"][0]["family"] == "Ours"
    assert app.one("SELECT count(*) FROM fhir_dlq") == 0


@pytest.mark.e2e
def test_write_mode_create_only_against_helios(make_cluster, helios):
    """create_only on a real server: created once; a later change is not sent (not_sendable) and the Patient
    on the server stays as created; the row's delete is still sent."""
    app = make_app(make_cluster, helios.base_url)
    track_patients(app, "create_only")
    mrn = unique("helios-once")
    pid = app.add_patient(mrn, family="Once")
    app.wait_drained()
    [p] = helios.search("Patient", MRN, mrn)
    app.sql("UPDATE patient SET name_family = 'Twice' WHERE id = %s", (pid,))
    app.wait_drained()
    assert app.one("SELECT error_class FROM fhir_dlq") == "not_sendable"
    [q] = helios.search("Patient", MRN, mrn)
    assert (q["name"][0]["family"], q["meta"]["versionId"]) == ("Once", p["meta"]["versionId"])
    app.sql("DELETE FROM patient WHERE id = %s", (pid,))
    app.wait_drained()
    assert helios.search("Patient", MRN, mrn) == []
