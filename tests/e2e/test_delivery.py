"""The worker delivers committed changes to a real FHIR server (Helios) and to a
fault-injecting one; each test reads the server's state back over HTTP."""
from __future__ import annotations

import time

import psycopg
import pytest

from fhirsync import DB, MRN, eventually, make_app
from harness.util import unique


def patient_on(helios, mrn):
    found = helios.search("Patient", MRN, mrn)
    return found[0] if len(found) == 1 else None


@pytest.mark.every_version
@pytest.mark.e2e
def test_insert_update_delete_reach_the_server(make_cluster, helios):
    app = make_app(make_cluster, helios.base_url)
    mrn = unique("mrn")
    pid = app.add_patient(mrn, family="Okafor")
    created = eventually(lambda: patient_on(helios, mrn), message="patient created")
    assert created["name"][0]["family"] == "Okafor"
    assert created["gender"] == "female"

    app.sql("UPDATE patient SET name_family = 'Okafor-Smith' WHERE id = %s", (pid,))
    updated = eventually(lambda: (p := patient_on(helios, mrn)) and p["name"][0]["family"] == "Okafor-Smith" and p,
                         message="patient updated")
    assert updated["id"] == created["id"], "an update must hit the same resource"
    assert int(updated["meta"]["versionId"]) == int(created["meta"]["versionId"]) + 1

    state = app.sql("SELECT fhir_id, deleted FROM fhir_sync_state WHERE resource_key = %s", (str(pid),))
    assert state == [(created["id"], False)]

    app.sql("DELETE FROM patient WHERE id = %s", (pid,))
    eventually(lambda: helios.search("Patient", MRN, mrn) == [], message="patient deleted")
    assert helios.read("Patient", created["id"]) is None
    app.wait_drained()
    assert app.one("SELECT count(*) FROM fhir_dlq") == 0


@pytest.mark.every_version
@pytest.mark.e2e
def test_child_row_change_sends_the_whole_patient(make_cluster, helios):
    app = make_app(make_cluster, helios.base_url)
    mrn = unique("mrn")
    pid = app.add_patient(mrn, family="Lindqvist", given="Erik")
    eventually(lambda: patient_on(helios, mrn), message="patient created")
    app.sql("INSERT INTO patient_other_identifiers (patient_id, identifier_system, identifier_value)"
            " VALUES (%s, 'http://hl7.org/fhir/sid/us-ssn', %s)", (pid, unique("ssn")))

    def both_identifiers():
        p = patient_on(helios, mrn)
        return p if p and len(p.get("identifier", [])) == 2 else None

    p = eventually(both_identifiers, message="second identifier")
    # PUT replaces the resource: a partial Patient would have lost these.
    assert p["name"][0]["family"] == "Lindqvist"
    assert p["gender"] == "female"
    assert p["birthDate"] == "1970-01-01"
    assert {i["system"] for i in p["identifier"]} == {MRN, "http://hl7.org/fhir/sid/us-ssn"}


@pytest.mark.e2e
def test_encounter_and_observations_reference_their_patient(make_cluster, helios):
    app = make_app(make_cluster, helios.base_url)
    mrn = unique("mrn")
    # One transaction: the worker must send the Patient first and point the others at it.
    with app.conn.transaction():
        pid = app.add_patient(mrn)
        fid = app.one("INSERT INTO form (patient_id, name, encounter_date) VALUES (%s, 'Check-up', now()) RETURNING id", (pid,))
        bp = app.one("INSERT INTO blood_pressure (form_id, patient_id, systolic_pressure, diastolic_pressure, measurement_time)"
                     " VALUES (%s, %s, 121, 79, now()) RETURNING id", (fid, pid))
        pulse = app.one("INSERT INTO pulse (form_id, patient_id, rate, measurement_time) VALUES (%s, %s, 64, now()) RETURNING id",
                        (fid, pid))
    app.wait_drained()
    patient = patient_on(helios, mrn)
    enc = helios.search("Encounter", "urn:fhir-sync/public.form", str(fid))
    bps = helios.search("Observation", "urn:fhir-sync/public.blood_pressure", str(bp))
    pulses = helios.search("Observation", "urn:fhir-sync/public.pulse", str(pulse))
    assert patient and len(enc) == 1 and len(bps) == 1 and len(pulses) == 1
    assert enc[0]["subject"]["reference"] == f"Patient/{patient['id']}"
    for obs in (bps[0], pulses[0]):
        assert obs["subject"]["reference"] == f"Patient/{patient['id']}"
        assert obs["encounter"]["reference"] == f"Encounter/{enc[0]['id']}"
    assert [c["valueQuantity"]["value"] for c in bps[0]["component"]] == [121, 79]
    assert pulses[0]["valueQuantity"]["value"] == 64
    assert app.one("SELECT count(*) FROM fhir_dlq") == 0


@pytest.mark.e2e
def test_a_rolled_back_transaction_sends_nothing(make_cluster, faults):
    app = make_app(make_cluster, faults.base_url)
    with pytest.raises(psycopg.errors.RaiseException):
        with app.conn.transaction():
            app.add_patient("rolled-back")
            app.sql("DO $$ BEGIN RAISE EXCEPTION 'abort'; END $$")
    app.add_patient("committed")
    faults.wait_for_requests(1, predicate=lambda r: "committed" in r.path)
    app.wait_drained()
    assert not any("rolled-back" in r.path for r in faults.requests)
    assert app.one("SELECT count(*) FROM fhir_outbox") == 0
    assert app.one("SELECT count(*) FROM fhir_outbox_delivered") == 1     # the committed change only


@pytest.mark.e2e
def test_a_change_committed_long_after_later_ones_is_still_delivered(make_cluster, faults):
    """The claim starts its scan past the changes it has delivered (claim::Floor). A transaction
    that captured a change early and commits late, after many later changes were delivered and
    the floor moved past its change's id, must still be delivered."""
    app = make_app(make_cluster, faults.base_url)
    late = app.cluster.connect(DB)
    with late.transaction():
        late.execute(
            "INSERT INTO patient (identifier_system, identifier_value, name_family, birth_date)"
            " VALUES (%s, 'mrn-late', 'Late', '1970-01-01')", (MRN,))
        # Later changes commit and are delivered for a few seconds: the worker claims again and
        # again, and its floor trails the ids handed out by a second.
        for i in range(30):
            app.add_patient(f"mrn-early-{i}")
            time.sleep(0.1)     # paces the writer (not a wait): 30 commits spread over 3 s, past FLOOR_LAG (1 s)
        faults.wait_for_requests(30, predicate=lambda r: "mrn-early-" in r.path)
        assert not any("mrn-late" in r.path for r in faults.requests)
    faults.wait_for_requests(1, predicate=lambda r: "mrn-late" in r.path)
    app.wait_drained()
    assert len(faults.store.find("Patient", f"{MRN}|mrn-late")) == 1
    assert app.one("SELECT count(*) FROM fhir_dlq") == 0


@pytest.mark.e2e
def test_twenty_quick_updates_collapse_to_the_last_commit(make_cluster, faults):
    app = make_app(make_cluster, faults.base_url)
    pid = app.add_patient("mrn-busy")
    for i in range(20):
        app.sql("UPDATE patient SET name_given = %s WHERE id = %s", (f"v{i}", pid))
    app.wait_drained()
    puts = [r for r in faults.requests if r.method == "PUT" and "mrn-busy" in r.path]
    assert 1 <= len(puts) <= 21, len(puts)
    ids = faults.store.find("Patient", f"{MRN}|mrn-busy")
    assert len(ids) == 1
    assert faults.store.items[("Patient", ids[0])]["resource"]["name"][0]["given"] == ["v19"]


@pytest.mark.every_version
@pytest.mark.e2e
def test_a_rejected_row_is_dead_lettered_and_requeued_once_fixed(make_cluster, helios):
    app = make_app(make_cluster, helios.base_url)
    # A table with its own mapping function; the server rejects what it makes of a bad row.
    app.sql("""
        CREATE TABLE device_note (id serial PRIMARY KEY, patient_mrn text, note text, status text);
        CREATE FUNCTION device_note_fhir(n device_note) RETURNS jsonb LANGUAGE sql AS $$
            SELECT jsonb_build_object('resourceType', 'Basic',
                                      'code', jsonb_build_object('text', n.note),
                                      'subjectNote', n.status)  -- an element Basic does not have
                   - CASE WHEN n.status = 'ok' THEN 'subjectNote' ELSE '' END
        $$;
        SELECT fhir_track('device_note', 'Basic', map_function => 'device_note_fhir(device_note)'::regprocedure);
    """)
    bad = app.one("INSERT INTO device_note (note, status) VALUES ('battery low', 'bogus') RETURNING id")
    good = app.one("INSERT INTO device_note (note, status) VALUES ('battery ok', 'ok') RETURNING id")
    unmappable_mrn = unique("mrn")
    app.add_patient(unmappable_mrn, gender="banana")   # our mapper refuses this one: no request
    fine_mrn = unique("mrn")
    app.add_patient(fine_mrn)
    app.wait_drained()

    assert len(helios.search("Basic", "urn:fhir-sync/public.device_note", str(good))) == 1
    assert patient_on(helios, fine_mrn)
    dlq = {(r[0], r[1]): r[2:] for r in app.sql(
        "SELECT table_name, record_id, error_class, http_status, operation_outcome->>'resourceType', error FROM fhir_dlq")}
    assert len(dlq) == 2, dlq
    rejected = dlq[("public.device_note", str(bad))]
    assert rejected[0] == "rejected"
    assert rejected[1] in (400, 422)
    assert rejected[2] == "OperationOutcome"
    unmappable = [v for k, v in dlq.items() if k[0] == "public.patient"]
    assert len(unmappable) == 1 and unmappable[0][0] == "unmappable" and unmappable[0][1] is None
    assert '"gender"' in unmappable[0][3]

    app.sql("UPDATE device_note SET status = 'ok' WHERE id = %s", (bad,))
    app.wait_drained()   # the fix itself is a change, delivered like any other
    assert app.one("SELECT fhir_requeue_dlq(http_status => 422) + fhir_requeue_dlq(http_status => 400)") == 1
    app.wait_drained()
    assert len(helios.search("Basic", "urn:fhir-sync/public.device_note", str(bad))) == 1
    assert app.one("SELECT count(*) FROM fhir_dlq WHERE requeued") == 1


@pytest.mark.fault
def test_server_down_then_up_delivers_everything_without_spending_attempts(make_cluster, faults):
    app = make_app(make_cluster, faults.base_url)
    faults.refuse()
    for i in range(30):
        app.add_patient(f"outage-{i}")
    eventually(lambda: app.one("SELECT paused_reason FROM fhir_sync_status"), message="worker paused")
    assert app.one("SELECT count(*) FROM fhir_outbox WHERE NOT processed") == 30
    faults.accept()
    app.wait_drained(timeout=90)
    assert app.one("SELECT count(*) FROM fhir_dlq") == 0
    assert app.one("SELECT max(attempts) FROM fhir_outbox_delivered") == 0
    assert len({rid for (t, rid), it in faults.store.items.items() if t == "Patient" and not it["deleted"]}) == 30


@pytest.mark.fault
def test_retry_after_is_honoured(make_cluster, faults):
    app = make_app(make_cluster, faults.base_url)
    faults.respond(429, times=1, retry_after=3)
    app.add_patient("throttled")
    first = faults.wait_for_requests(1)[0]
    second = faults.wait_for_requests(2, timeout=60)[1]
    assert second.time - first.time >= 3.0 - 0.05, second.time - first.time
    app.wait_drained()
    assert faults.store.find("Patient", f"{MRN}|throttled")


@pytest.mark.fault
def test_transient_errors_are_retried_then_dead_lettered(make_cluster, faults):
    app = make_app(make_cluster, faults.base_url, conf={"fhir_sync.max_retries": 2})
    faults.respond(503, times=None, match={"contains": "flaky"})
    app.add_patient("flaky")
    app.add_patient("steady")
    app.wait_drained(timeout=60)
    assert faults.store.find("Patient", f"{MRN}|steady")
    row = app.sql("SELECT error_class, http_status, attempts FROM fhir_dlq")
    assert row == [("exhausted", 503, 2)]


@pytest.mark.every_version
@pytest.mark.fault
def test_kill_9_of_the_worker_loses_nothing(make_cluster, faults):
    app = make_app(make_cluster, faults.base_url)
    faults.delay(0.02, times=None)   # a slow server keeps the worker mid-run
    app.sql("INSERT INTO patient (identifier_system, identifier_value, name_family)"
            " SELECT %s, 'k9-' || g, 'K' FROM generate_series(1, 400) g", (MRN,))
    faults.wait_for_requests(20)
    pid = app.worker_pid()
    log_at = len(app.cluster.log_text())
    app.cluster.kill9_pid(pid)
    # The postmaster restarts the cluster after a child is killed; the worker comes back.
    app.cluster.wait_for_log("all server processes terminated; reinitializing", timeout=30, start=log_at)
    eventually(lambda: _try(lambda: (app.reconnect(), app.worker_pid())[1] not in (None, pid)), timeout=60,
               message="a new worker")
    faults.clear_rules()
    app.wait_drained(timeout=120)
    live = {it["resource"]["identifier"][0]["value"] for (t, _), it in faults.store.items.items() if t == "Patient"}
    assert live == {f"k9-{g}" for g in range(1, 401)}
    assert app.one("SELECT count(*) FROM fhir_dlq") == 0


def _try(fn):
    try:
        return fn()
    except Exception:
        return None


@pytest.mark.fault
def test_batch_bundles_settle_each_entry_on_its_own(make_cluster, faults):
    app = make_app(make_cluster, faults.base_url, conf={"fhir_sync.bundle_size": 10, "fhir_sync.workers": 1})
    faults.respond(422, entry=True, match={"contains": "bundle-bad"})
    with app.conn.transaction():
        for i in range(29):
            app.add_patient(f"bundle-{i}")
        app.add_patient("bundle-bad")
    app.wait_drained()
    posts = [r for r in faults.requests if r.method == "POST"]
    assert 3 <= len(posts) <= 6, len(posts)             # 30 resources, 10 per Bundle
    assert not [r for r in faults.requests if r.method == "PUT"]
    assert all(r.json()["type"] == "batch" for r in posts)
    delivered = {it["resource"]["identifier"][0]["value"] for (t, _), it in faults.store.items.items() if t == "Patient"}
    assert delivered == {f"bundle-{i}" for i in range(29)}
    assert app.sql("SELECT identifier_value, error_class, http_status FROM fhir_dlq") == [("bundle-bad", "rejected", 422)]


@pytest.mark.fault
def test_a_failed_transaction_bundle_is_retried_entry_by_entry(make_cluster, faults):
    app = make_app(make_cluster, faults.base_url,
                   conf={"fhir_sync.bundle_size": 10, "fhir_sync.bundle_type": "transaction"})
    faults.respond(422, entry=True, times=None, match={"contains": "tx-bad"})   # inside a Bundle
    faults.respond(422, times=None, match={"contains": "tx-bad"})               # sent on its own
    with app.conn.transaction():
        for i in range(5):
            app.add_patient(f"tx-{i}")
        app.add_patient("tx-bad")
    app.wait_drained()
    delivered = {it["resource"]["identifier"][0]["value"] for (t, _), it in faults.store.items.items() if t == "Patient"}
    assert delivered == {f"tx-{i}" for i in range(5)}
    assert app.sql("SELECT identifier_value, error_class FROM fhir_dlq") == [("tx-bad", "rejected")]
    tx = [r for r in faults.requests if r.method == "POST"]
    assert tx and all(r.json()["type"] == "transaction" for r in tx)


@pytest.mark.e2e
def test_bundles_against_helios(make_cluster, helios):
    app = make_app(make_cluster, helios.base_url, conf={"fhir_sync.bundle_size": 25})
    tag = unique("hb")
    with app.conn.transaction():
        pids = [app.add_patient(f"{tag}-{i}") for i in range(60)]
        for pid in pids[:10]:
            app.sql("INSERT INTO pulse (patient_id, rate, measurement_time) VALUES (%s, 70, now())", (pid,))
    app.wait_drained(timeout=90)
    assert app.one("SELECT count(*) FROM fhir_dlq") == 0
    for i in (0, 30, 59):
        assert patient_on(helios, f"{tag}-{i}")
    first = patient_on(helios, f"{tag}-0")
    pulses = helios.search_all("Observation", subject=f"Patient/{first['id']}")
    assert len(pulses) == 1 and pulses[0]["valueQuantity"]["value"] == 70
