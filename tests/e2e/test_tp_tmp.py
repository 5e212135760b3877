import time
from fhirsync import make_app, MRN
from test_reliability import COUNTING
def test_tp(make_cluster, faults):
    for conf in ({}, COUNTING):
        app = make_app(make_cluster, faults.base_url, conf=conf)
        t=time.monotonic()
        app.sql("INSERT INTO patient (identifier_system, identifier_value, name_family) SELECT %s, 'tp-' || g, 'K' FROM generate_series(1, 3000) g", (MRN,))
        app.wait_drained(timeout=300)
        print("\n", conf, time.monotonic()-t, len(faults.requests))
        faults.clear_requests()
        faults.store.items.clear()
