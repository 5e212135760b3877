"""One source row, one resource, against Helios: two patient rows with the same MRN never share a FHIR
Patient. The second row's change is dead-lettered (identifier_conflict) naming both rows by table and
key, and the first patient's resource stays as its row made it; fixing the data delivers it; a delete
only deletes a resource no other row maps to.
"""
from __future__ import annotations

import pytest

from fhirsync import MRN, eventually, make_app
from harness.util import unique
from test_security import worker_log

pytestmark = pytest.mark.e2e


def on_server(helios, mrn):
    return helios.search("Patient", MRN, mrn)


def conflict(app):
    rows = app.sql("SELECT id, resource_key, error_class, error, http_status FROM fhir_dlq WHERE NOT requeued")
    assert len(rows) == 1, rows
    return rows[0]


@pytest.mark.every_version
def test_a_second_row_with_a_taken_mrn_is_dead_lettered_and_the_first_patient_is_untouched(make_cluster, helios):
    # The default log level (the harness's "log" ranks above WARNING in the server log).
    app = make_app(make_cluster, helios.base_url, conf={"log_min_messages": "warning"})
    mrn = unique("dup")
    first = app.add_patient(mrn, family="First", given="Anna", gender="female")
    app.wait_drained()
    [resource] = on_server(helios, mrn)

    second = app.add_patient(mrn, family="Second", given="Bob", gender="male")
    app.wait_drained()
    _, key, cls, error, status = conflict(app)
    assert (key, cls, status) == (str(second), "identifier_conflict", None)
    assert f"public.patient key {second}" in error and f"public.patient key {first}" in error, error
    assert mrn not in error, "rows are named by table and key, never by the identifier"
    now = helios.read("Patient", resource["id"])
    assert (now["name"][0]["family"], now["gender"], now["meta"]["versionId"]) == \
        ("First", "female", resource["meta"]["versionId"]), "the first patient's resource was not written"
    assert len(on_server(helios, mrn)) == 1
    log = worker_log(app.cluster)
    assert "identifier_conflict" in log and mrn not in log and "Second" not in log


def test_two_new_rows_with_one_mrn_in_one_transaction_make_one_patient_of_the_older(make_cluster, helios):
    app = make_app(make_cluster, helios.base_url)
    mrn = unique("dup")
    with app.conn.transaction():
        older = app.add_patient(mrn, family="Older")
        younger = app.add_patient(mrn, family="Younger")
    app.wait_drained()
    [p] = on_server(helios, mrn)
    assert p["name"][0]["family"] == "Older"
    _, key, cls, error, _ = conflict(app)
    assert (key, cls) == (str(younger), "identifier_conflict")
    assert f"public.patient key {older}" in error


def test_changing_the_duplicate_mrn_delivers_the_row_as_its_own_patient(make_cluster, helios):
    app = make_app(make_cluster, helios.base_url)
    mrn, fixed = unique("dup"), unique("fixed")
    app.add_patient(mrn, family="First")
    app.wait_drained()
    second = app.add_patient(mrn, family="Second")
    app.wait_drained()
    dlq_id = conflict(app)[0]

    app.sql("UPDATE patient SET identifier_value = %s WHERE id = %s", (fixed, second))
    app.wait_drained()
    assert [p["name"][0]["family"] for p in on_server(helios, fixed)] == ["Second"]
    assert [p["name"][0]["family"] for p in on_server(helios, mrn)] == ["First"]
    # The dead letter may now be requeued (or discarded): it sends the row as it stands, to its own resource.
    app.sql("SELECT fhir_requeue_dlq(%s::bigint)", (dlq_id,))
    app.wait_drained()
    assert app.one("SELECT count(*) FROM fhir_dlq WHERE NOT requeued") == 0
    assert len(on_server(helios, fixed)) == 1 and len(on_server(helios, mrn)) == 1


def test_deleting_the_first_row_then_requeueing_gives_the_second_its_own_patient(make_cluster, helios):
    app = make_app(make_cluster, helios.base_url)
    mrn = unique("dup")
    first = app.add_patient(mrn, family="First")
    app.wait_drained()
    [old] = on_server(helios, mrn)
    app.add_patient(mrn, family="Second")
    app.wait_drained()
    dlq_id = conflict(app)[0]

    app.sql("DELETE FROM patient WHERE id = %s", (first,))
    app.wait_drained()
    assert helios.read("Patient", old["id"]) is None, "the first row's resource is deleted: no other row maps to it"
    app.sql("SELECT fhir_requeue_dlq(%s::bigint)", (dlq_id,))
    app.wait_drained()
    [new] = on_server(helios, mrn)
    assert new["name"][0]["family"] == "Second" and new["id"] != old["id"]
    assert app.one("SELECT count(*) FROM fhir_dlq WHERE NOT requeued") == 0


def test_a_row_taking_an_mrn_another_row_gives_up_in_the_same_batch_waits_then_gets_its_own(make_cluster, helios):
    """In one transaction row A moves to a new MRN and row C takes A's old one: C waits for A's change to
    settle (no dead letter), then gets a Patient of its own; A's Patient keeps A's data."""
    app = make_app(make_cluster, helios.base_url)
    old_mrn, new_mrn = unique("old"), unique("new")
    a = app.add_patient(old_mrn, family="Moved")
    app.wait_drained()
    [pa] = on_server(helios, old_mrn)
    with app.conn.transaction():
        app.sql("UPDATE patient SET identifier_value = %s WHERE id = %s", (new_mrn, a))
        app.add_patient(old_mrn, family="Taker")
    app.wait_drained()
    assert app.one("SELECT count(*) FROM fhir_dlq") == 0
    [moved] = on_server(helios, new_mrn)
    [taker] = on_server(helios, old_mrn)
    assert moved["id"] == pa["id"] and moved["name"][0]["family"] == "Moved"
    assert taker["id"] != pa["id"] and taker["name"][0]["family"] == "Taker"


def test_a_delete_leaves_a_resource_another_row_still_maps_to(make_cluster, helios):
    """Two rows that an earlier release let share one Patient (the state 0.4.0 left after a duplicate MRN):
    deleting one sends no DELETE, since the other still maps to the resource; deleting the last deletes it."""
    app = make_app(make_cluster, helios.base_url)
    mrn = unique("shared")
    first = app.add_patient(mrn, family="Shared")
    app.wait_drained()
    [p] = on_server(helios, mrn)
    # The second row as 0.4.0 would have left it: written without capture, and synced to the same resource.
    with app.conn.transaction():
        app.sql("SET LOCAL session_replication_role = replica")
        second = app.add_patient(mrn, family="Shared")
    app.sql("INSERT INTO fhir_sync_state (resource_table, resource_key, resource_type, fhir_id, fhir_version,"
            " identifier_system, identifier_value) SELECT resource_table, %s, resource_type, fhir_id, fhir_version,"
            " identifier_system, identifier_value FROM fhir_sync_state WHERE resource_key = %s",
            (str(second), str(first)))

    app.sql("DELETE FROM patient WHERE id = %s", (first,))
    app.wait_drained()
    assert helios.read("Patient", p["id"]) is not None, "still mapped to by the second row"
    assert app.one("SELECT deleted FROM fhir_sync_state WHERE resource_key = %s", (str(first),)) is True

    app.sql("DELETE FROM patient WHERE id = %s", (second,))
    eventually(lambda: helios.read("Patient", p["id"]) is None, message="the last row's delete")
    app.wait_drained()
    assert app.one("SELECT count(*) FROM fhir_dlq") == 0


# ---------------------------------------------------------------------------------------------- in flight, retries, workers

def families(faults, mrn):
    return [faults.store.items[("Patient", i)]["resource"]["name"][0]["family"]
            for i in faults.store.find("Patient", f"{MRN}|{mrn}")]


def test_a_duplicate_claimed_while_the_first_row_is_in_flight_is_held_back(make_cluster, faults):
    """batch_size = 1 and a slow server: the second row is claimed and mapped while the first row's write
    is still on the wire (the worker pipelines batches). It must not go out as a second conditional write
    that lands on the first row's new resource."""
    faults.delay(1.0, times=1, match={"method": "PUT"})
    app = make_app(make_cluster, faults.base_url, conf={"fhir_sync.batch_size": 1})
    with app.conn.transaction():
        app.add_patient("inflight", family="First")
        second = app.add_patient("inflight", family="Second")
    app.wait_drained()
    assert families(faults, "inflight") == ["First"]
    assert app.sql("SELECT resource_key, error_class FROM fhir_dlq") == [(str(second), "identifier_conflict")]


def test_a_first_write_that_timed_out_still_holds_its_identifier(make_cluster, faults):
    """The server applies the first row's write after the worker gave up on it (timeout): the row retries,
    and meanwhile a second row with the same MRN arrives. The second row is dead-lettered (the first holds
    the identifier from the moment its write was sent), not written onto the first row's resource."""
    faults.delay(2.5, times=1, match={"method": "PUT"})
    app = make_app(make_cluster, faults.base_url, conf={"fhir_sync.http_timeout": "1s"})
    app.add_patient("late", family="First")
    eventually(lambda: app.one("SELECT attempts FROM fhir_outbox WHERE NOT processed") == 1, message="a timeout")
    second = app.add_patient("late", family="Second")
    app.wait_drained(timeout=60)
    assert families(faults, "late") == ["First"]
    assert app.sql("SELECT resource_key, error_class FROM fhir_dlq") == [(str(second), "identifier_conflict")]


def test_two_workers_never_merge_duplicates(make_cluster, faults):
    """Two workers, one-resource batches, 15 pairs of rows that share an MRN committed one after the other:
    each MRN ends as one Patient carrying the data of the row fhir_sync_state maps it to, and the other
    row of each pair is dead-lettered."""
    faults.delay(0.05, times=None, match={"method": "PUT"})
    app = make_app(make_cluster, faults.base_url, conf={"fhir_sync.workers": 2, "fhir_sync.batch_size": 1})
    for i in range(15):
        app.add_patient(f"pair-{i}", family=f"A{i}")
        app.add_patient(f"pair-{i}", family=f"B{i}")
    app.wait_drained(timeout=90)
    mapped = dict(app.sql("SELECT identifier_value, fhir_id FROM fhir_sync_state WHERE fhir_id IS NOT NULL"))
    owner = dict(app.sql("SELECT s.identifier_value, p.name_family FROM fhir_sync_state s"
                         " JOIN patient p ON p.id::text = s.resource_key WHERE s.fhir_id IS NOT NULL"))
    state = app.sql("SELECT identifier_value, resource_key, fhir_id, deleted, last_outbox_id FROM fhir_sync_state"
                    " ORDER BY identifier_value, resource_key")
    dlq = app.sql("SELECT resource_key, error_class, outbox_ids FROM fhir_dlq ORDER BY id")
    for i in range(15):
        [rid] = faults.store.find("Patient", f"{MRN}|pair-{i}")
        assert mapped[f"pair-{i}"] == rid
        assert faults.store.items[("Patient", rid)]["resource"]["name"][0]["family"] == owner[f"pair-{i}"], \
            (i, state, dlq, [(r.seq, r.method, r.path, r.headers.get("if-none-exist"), r.body[:120]) for r in faults.requests])
    assert app.one("SELECT count(*) FROM fhir_dlq WHERE error_class = 'identifier_conflict'") == 15, (state, dlq)


def test_a_server_that_matches_another_identifier_of_a_patient_is_caught_and_stopped(make_cluster, faults):
    """Row A's Patient also carries identifier Z (patient_other_identifiers); row B's MRN is Z. The server
    resolves B's conditional write to A's resource (any identifier matches). fhir_sync cannot see that
    coming; it sees the answer: B's change is dead-lettered (identifier_conflict) with the reason, and B's
    later changes and its delete are not sent to the resource it now shares with A."""
    app = make_app(make_cluster, faults.base_url, conf={"log_min_messages": "warning"})
    a = app.add_patient("primary-a", family="A")
    app.sql("INSERT INTO patient_other_identifiers (patient_id, identifier_system, identifier_value)"
            " VALUES (%s, %s, 'also-a')", (a, MRN))
    app.wait_drained()
    b = app.add_patient("also-a", family="B")
    app.wait_drained()
    _, key, cls, error, _ = conflict(app)
    assert (key, cls) == (str(b), "identifier_conflict")
    assert "matched" in error and f"public.patient key {a}" in error and "also-a" not in error
    assert "identifier_conflict" in worker_log(app.cluster)
    sent = len(faults.requests)
    app.sql("UPDATE patient SET name_family = 'B2' WHERE id = %s", (b,))
    app.sql("DELETE FROM patient WHERE id = %s", (b,))
    app.wait_drained()
    assert len(faults.requests) == sent, "nothing more is written to (or deleted from) A's resource"
    rid = app.one("SELECT fhir_id FROM fhir_sync_state WHERE resource_key = %s", (str(a),))
    assert faults.store.items[("Patient", rid)]["deleted"] is False
