"""ALTER EXTENSION fhir_sync UPDATE from the previous release.

tests/fixtures/fhir_sync--0.1.0.sql is the install script of 0.1.0 exactly as it was released (generated
by `cargo pgrx schema` from that commit, and never edited since). The test installs it next to today's
scripts, creates the extension at 0.1.0 with tables tracked, changes pending and a dead letter, updates, and
checks that the SQL surface is that of a fresh install (a catalog diff) and that the pending changes are
delivered, once each, by a worker that runs as an ordinary role.
"""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from fhirsync import DB, FIXTURES, MRN, WORKER_ROLE, App, eventually
from harness.util import PG_BIN

OLD = "0.1.0"
OLD_SCRIPT = FIXTURES / f"fhir_sync--{OLD}.sql"

# Everything an extension's SQL defines, rendered so that two databases can be compared: its member
# objects, functions with body, settings, privileges and strictness, tables with columns, defaults,
# constraints, indexes and privileges, views, and which tables pg_dump keeps.
SURFACE_SQL = r"""
WITH ext AS (SELECT oid, extconfig FROM pg_extension WHERE extname = 'fhir_sync'),
members AS (SELECT d.classid, d.objid FROM pg_depend d, ext WHERE d.refobjid = ext.oid AND d.deptype = 'e')
SELECT 'member ' || pg_describe_object(m.classid, m.objid, 0) FROM members m
UNION ALL
SELECT format('function %s returns %s lang=%s secdef=%s strict=%s volatile=%s parallel=%s config=%s acl=%s body=%s',
              p.oid::regprocedure, p.prorettype::regtype, (SELECT l.lanname FROM pg_language l WHERE l.oid = p.prolang), p.prosecdef, p.proisstrict,
              p.provolatile, p.proparallel, p.proconfig, p.proacl, md5(p.prosrc))
  FROM pg_proc p JOIN members m ON m.classid = 'pg_proc'::regclass AND m.objid = p.oid
UNION ALL
SELECT format('column %s.%s %s %s notnull=%s default=%s identity=%s', c.relname, a.attnum, a.attname,
              format_type(a.atttypid, a.atttypmod), a.attnotnull, pg_get_expr(ad.adbin, ad.adrelid), a.attidentity)
  FROM pg_class c JOIN members m ON m.classid = 'pg_class'::regclass AND m.objid = c.oid
  JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
  LEFT JOIN pg_attrdef ad ON ad.adrelid = c.oid AND ad.adnum = a.attnum
 WHERE c.relkind IN ('r', 'v')
UNION ALL
SELECT format('relation %s kind=%s acl=%s options=%s', c.relname, c.relkind, c.relacl, c.reloptions)
  FROM pg_class c JOIN members m ON m.classid = 'pg_class'::regclass AND m.objid = c.oid
UNION ALL
SELECT format('constraint %s %s', co.conrelid::regclass, pg_get_constraintdef(co.oid))
  FROM pg_constraint co JOIN members m ON m.classid = 'pg_class'::regclass AND m.objid = co.conrelid
UNION ALL
SELECT 'index ' || pg_get_indexdef(i.indexrelid)
  FROM pg_index i JOIN members m ON m.classid = 'pg_class'::regclass AND m.objid = i.indrelid
UNION ALL
SELECT format('view %s %s', c.relname, md5(pg_get_viewdef(c.oid)))
  FROM pg_class c JOIN members m ON m.classid = 'pg_class'::regclass AND m.objid = c.oid WHERE c.relkind = 'v'
UNION ALL
SELECT 'dumped ' || x::regclass::text FROM ext, unnest(ext.extconfig) x
ORDER BY 1
"""


def sharedir() -> Path:
    out = subprocess.run([PG_BIN / "pg_config", "--sharedir"], capture_output=True, text=True, check=True)
    return Path(out.stdout.strip()) / "extension"


def surface(cluster, db: str) -> list[str]:
    return [r[0] for r in cluster.query(SURFACE_SQL, db=db)]


def test_alter_extension_update_from_the_previous_release(make_cluster, faults):
    target = sharedir() / OLD_SCRIPT.name
    shutil.copyfile(OLD_SCRIPT, target)
    try:
        _update_and_compare(make_cluster, faults)
    finally:
        target.unlink(missing_ok=True)


def _update_and_compare(make_cluster, faults):
    cluster = make_cluster(conf={"fhir_sync.database": DB, "fhir_sync.server_url": faults.base_url,
                                 "fhir_sync.username": WORKER_ROLE, "fhir_sync.poll_interval": "500ms"})
    cluster.psql(f"CREATE ROLE {WORKER_ROLE} LOGIN")
    cluster.create_db(DB)
    cluster.create_db("fresh")
    app = App(cluster)
    app.sql(f"CREATE EXTENSION fhir_sync VERSION '{OLD}'")
    assert app.one("SELECT extversion FROM pg_extension WHERE extname = 'fhir_sync'") == OLD
    app.sql((FIXTURES / "health_tables.sql").read_text())
    app.sql("SELECT fhir_track('patient', 'Patient'), fhir_track('patient_other_identifiers', 'Patient')")
    # Changes captured by 0.1.0's triggers and not yet delivered: the new library cannot work with the old
    # schema (its worker says so in the log and retries), so they wait for the update.
    for i in range(3):
        app.add_patient(f"upgrade-{i}")
    # A dead letter as 0.1.0 recorded one.
    app.sql("""INSERT INTO fhir_dlq (outbox_ids, txid, table_name, record_id, operation, resource_type,
                                     resource_table, resource_key, identifier_system, identifier_value,
                                     error_class, error, attempts, first_failed_at, last_failed_at)
               SELECT ARRAY[-1::bigint], 1, 'public.patient', p.id::text, 'U', 'Patient', 'patient'::regclass,
                      p.id::text, p.identifier_system, p.identifier_value, 'exhausted', 'HTTP 503', 5, now(), now()
                 FROM patient p WHERE p.identifier_value = 'upgrade-0'""")
    assert not faults.requests
    # A DBA's grants on functions the update replaces carry over.
    cluster.psql("CREATE ROLE ops")
    app.sql("GRANT EXECUTE ON FUNCTION fhir_track(regclass, text, regprocedure, name, text, text),"
            " fhir_backfill(regclass) TO ops")

    app.sql("ALTER EXTENSION fhir_sync UPDATE")
    assert app.one("SELECT extversion FROM pg_extension WHERE extname = 'fhir_sync'") != OLD
    assert app.one("SELECT has_function_privilege('ops', 'fhir_track(regclass, text, regprocedure, name, text, text,"
                   " boolean)', 'EXECUTE') AND has_function_privilege('ops', 'fhir_backfill_keys(oid)', 'EXECUTE')")
    cluster.query("CREATE EXTENSION fhir_sync", db="fresh")
    # ... what a DBA gives the same role on a fresh install.
    cluster.query("GRANT EXECUTE ON FUNCTION fhir_track(regclass, text, regprocedure, name, text, text, boolean),"
                  " fhir_backfill(regclass), fhir_backfill_keys(oid) TO ops", db="fresh")
    old, new = surface(cluster, DB), surface(cluster, "fresh")
    assert old == new, "\n".join(["upgraded vs fresh:"] + [f"- {x}" for x in old if x not in new]
                                  + [f"+ {x}" for x in new if x not in old])

    # The pending changes go out once each, and capture goes on through the triggers 0.1.0 installed.
    app.wait_drained(timeout=30)
    app.add_patient("after-upgrade")
    app.wait_drained(timeout=30)
    assert app.one("SELECT fhir_requeue_dlq()") == 1
    app.wait_drained(timeout=30)
    puts = [r for r in faults.requests if r.method == "PUT"]
    for i in range(3):
        assert faults.store.find("Patient", f"{MRN}|upgrade-{i}")
    assert faults.store.find("Patient", f"{MRN}|after-upgrade")
    # upgrade-0: once pending, once requeued; each other change exactly once.
    counts = {f"upgrade-{i}": sum(f"upgrade-{i}" in r.path or f"upgrade-{i}" in r.body.decode(errors="replace")
                                  for r in puts) for i in range(3)}
    assert counts == {"upgrade-0": 2, "upgrade-1": 1, "upgrade-2": 1}, counts
    assert app.one("SELECT count(*) FROM fhir_dlq WHERE NOT requeued") == 0
    assert eventually(lambda: app.one("SELECT usename FROM pg_stat_activity WHERE backend_type = 'fhir_sync worker'"),
                      message="the worker") == WORKER_ROLE
