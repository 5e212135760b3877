"""Tests of the harness itself (no fhir_sync extension needed)."""
from __future__ import annotations

import http.client as httpc
import json
import socket
import time
import urllib.parse

import pytest

from harness.helios import http, identifier_query
from harness.util import unique, wait_until


# ---------------------------------------------------------------------------------------------- Cluster
@pytest.mark.db
def test_cluster_select_1(make_cluster):
    c = make_cluster(preload="", conf={"work_mem": "8MB"})
    assert c.psql("SELECT 1") == "1"
    conn = c.connect()
    assert conn.execute("SELECT 1").fetchone() == (1,)
    assert conn.execute("SHOW work_mem").fetchone() == ("8MB",)
    assert conn.execute("SHOW shared_preload_libraries").fetchone() == ("",)
    assert conn.execute("SHOW listen_addresses").fetchone() == ("127.0.0.1",)
    c.create_db("app")
    assert c.psql("SELECT current_database()", db="app") == "app"
    assert "database system is ready to accept connections" in c.log_text()

    c.set_conf({"work_mem": "16MB"})
    c.reload()
    wait_until(lambda: c.query("SHOW work_mem") == [("16MB",)], timeout=10, message="reload")

    # kill -9 a backend: the postmaster restarts the others and recovers
    victim = c.connect()
    pid = victim.execute("SELECT pg_backend_pid()").fetchone()[0]
    c.kill9_pid(pid)
    wait_until(lambda: c.query("SELECT 1") == [(1,)], timeout=30, message="recovery after kill -9")
    assert "terminated by signal 9" in c.log_text()

    c.restart(mode="immediate")
    assert c.psql("SELECT 2") == "2"
    c.stop()
    assert not c.is_running()


# ---------------------------------------------------------------------------------------------- Helios
@pytest.mark.e2e
def test_helios_conditional_put_twice(helios):
    system, value = "urn:fhir-sync-test", unique("p")
    url = f"Patient?{identifier_query(system, value)}"
    body = {"resourceType": "Patient", "identifier": [{"system": system, "value": value}],
            "name": [{"family": "One"}], "gender": "female"}
    r1 = helios.request("PUT", url, body)
    assert r1.status == 201, r1
    body["name"][0]["family"] = "Two"
    r2 = helios.request("PUT", url, body)
    assert r2.status == 200, r2
    p1, p2 = r1.json(), r2.json()
    assert p1["id"] == p2["id"]
    assert p1["meta"]["versionId"] == "1" and p2["meta"]["versionId"] == "2"
    found = helios.search("Patient", system, value)
    assert [p["id"] for p in found] == [p1["id"]]
    assert helios.read("Patient", p1["id"])["name"][0]["family"] == "Two"
    assert len(helios.history("Patient", p1["id"])) == 2


# ---------------------------------------------------------------------------------------------- FaultServer
@pytest.mark.fault
def test_faultserver_503_then_recovers(faults):
    faults.respond(503, times=1, retry_after=2)
    url = f"{faults.base_url}/Patient?{identifier_query('urn:s', 'v1')}"
    body = {"resourceType": "Patient", "identifier": [{"system": "urn:s", "value": "v1"}]}
    r = http("PUT", url, body)
    assert r.status == 503 and r.headers["Retry-After"] == "2"
    assert r.json()["resourceType"] == "OperationOutcome"
    r = http("PUT", url, body)
    assert r.status == 201
    assert r.headers["Location"] == f"{faults.base_url}/Patient/{r.json()['id']}/_history/1"
    assert r.headers["ETag"] == 'W/"1"'
    r = http("PUT", url, body)
    assert r.status == 200 and r.json()["meta"]["versionId"] == "2"
    reqs = faults.requests
    assert [q.method for q in reqs] == ["PUT"] * 3
    assert urllib.parse.unquote(reqs[0].path) == "/Patient?identifier=urn:s|v1"
    assert reqs[0].json()["resourceType"] == "Patient"
    assert reqs[0].time < reqs[1].time < reqs[2].time


@pytest.mark.fault
def test_faultserver_keepalive_reset_refuse(faults):
    conn = httpc.HTTPConnection("127.0.0.1", faults.port, timeout=5)
    for _ in range(2):
        conn.request("GET", "/metadata")
        assert conn.getresponse().read() and True
    assert len({q.client for q in faults.requests}) == 1          # same keep-alive connection

    faults.reset(times=1)
    conn.request("GET", "/metadata")
    with pytest.raises((ConnectionError, httpc.RemoteDisconnected, httpc.BadStatusLine)):
        conn.getresponse()
    conn.close()
    assert http("GET", faults.base_url + "/metadata").status == 200

    port = faults.port
    faults.refuse()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=2)
    faults.accept()
    assert faults.port == port
    assert http("GET", faults.base_url + "/metadata").status == 200


@pytest.mark.fault
def test_faultserver_hang_delay_garbage_redirect(faults):
    faults.hang()
    t0 = time.monotonic()
    with pytest.raises(OSError):            # socket.timeout / TimeoutError are OSErrors
        http("GET", faults.base_url + "/Patient/x", timeout=0.5)
    assert time.monotonic() - t0 < 3

    faults.delay(0.5)
    t0 = time.monotonic()
    assert http("GET", faults.base_url + "/Patient/x").status == 404
    assert time.monotonic() - t0 >= 0.5

    faults.garbage("text")
    r = http("GET", faults.base_url + "/Patient/x")
    assert r.status == 200 and r.headers["Content-Type"] == "text/plain" and r.body == b"this is not json"

    faults.redirect(301, "http://127.0.0.1:9/elsewhere", match={"method": "PUT"})
    c = httpc.HTTPConnection("127.0.0.1", faults.port, timeout=5)
    c.request("GET", "/metadata")                     # not matched: the rule waits for a PUT
    assert c.getresponse().read() and True
    c.request("PUT", "/Patient/a", body=json.dumps({"resourceType": "Patient"}))
    r = c.getresponse()
    r.read()
    assert r.status == 301 and r.getheader("Location") == "http://127.0.0.1:9/elsewhere"
    c.close()
    assert faults.pending_rules == []


@pytest.mark.fault
def test_faultserver_bundles(faults):
    def entry(v):
        return {"resource": {"resourceType": "Patient", "identifier": [{"system": "urn:s", "value": v}]},
                "request": {"method": "PUT", "url": "Patient?" + identifier_query("urn:s", v)}}

    batch = {"resourceType": "Bundle", "type": "batch", "entry": [entry("a"), entry("b")]}
    faults.respond(422, entry=True, match=lambda e: e.index == 1)
    r = http("POST", faults.base_url + "/", batch).json()
    assert r["type"] == "batch-response"
    assert [e["response"]["status"] for e in r["entry"]] == ["201 Created", "422 Unprocessable Entity"]
    assert r["entry"][1]["response"]["outcome"]["resourceType"] == "OperationOutcome"

    tx = {"resourceType": "Bundle", "type": "transaction", "entry": [entry("a"), entry("b")]}
    r = http("POST", faults.base_url + "/", tx)
    assert r.status == 200
    assert [e["response"]["status"] for e in r.json()["entry"]] == ["200 OK", "201 Created"]
    assert r.json()["entry"][0]["response"]["etag"] == 'W/"2"'
