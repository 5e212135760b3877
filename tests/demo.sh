#!/usr/bin/env bash
# The fhir_sync demo: a throwaway PostgreSQL cluster (under target/demo) with fhir_sync
# preloaded, a local Helios FHIR server, the sample health tables tracked, and what fhir_sync
# made of them: preview JSON, outbox, status, and the resources as the FHIR server holds them.
# Everything is stopped at the end; run it again as often as you like.
set -euo pipefail
cd "$(dirname "$0")/.."
export USER=${USER:-root}
export FHIR_SYNC_CACHE=${FHIR_SYNC_CACHE:-$HOME/.cache/fhir_sync}
PG_BIN=/usr/lib/postgresql/15/bin
DEMO=$PWD/target/demo

bash tests/setup.sh
# The cluster runs as postgres, which must reach it (a checkout under /root is out of its reach).
runuser -u postgres -- test -x "$PWD" || DEMO=/tmp/fhir_sync-demo
echo "[demo] building and installing fhir_sync into PostgreSQL 15"
cargo pgrx install --pg-config "$PG_BIN/pg_config" >/dev/null

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
stop_all() {
    [ -f "$DEMO/data/postmaster.pid" ] && runuser -u postgres -- "$PG_BIN/pg_ctl" -D "$DEMO/data" -m fast -w stop >/dev/null 2>&1 || true
    [ -f "$DEMO/helios.pid" ] && kill "$(cat "$DEMO/helios.pid")" 2>/dev/null || true
    rm -f "$DEMO/helios.pid"
}
stop_all
trap stop_all EXIT
rm -rf "$DEMO" && mkdir -p "$DEMO/helios" && chown postgres "$DEMO"

PG_PORT=$(free_port)
FHIR_PORT=$(free_port)
FHIR=http://127.0.0.1:$FHIR_PORT

echo "[demo] starting Helios FHIR server on $FHIR"
cp "$FHIR_SYNC_CACHE/medplum-5.2.13/search-parameters-r4.json" "$DEMO/helios/search-parameters-r4.json"
(cd "$DEMO/helios" && HFS_SERVER_HOST=127.0.0.1 HFS_SERVER_PORT=$FHIR_PORT HFS_BASE_URL=$FHIR \
    HFS_DATABASE_URL=:memory: HFS_DATA_DIR="$DEMO/helios" HFS_UI_ENABLED=false HFS_VALIDATION_MODE=enforce \
    exec "$FHIR_SYNC_CACHE/helios-0.2.7/bin/hfs" --enable-versioning >"$DEMO/helios/log" 2>&1) &
echo $! >"$DEMO/helios.pid"

echo "[demo] starting PostgreSQL 15 on 127.0.0.1:$PG_PORT with shared_preload_libraries = 'fhir_sync'"
runuser -u postgres -- "$PG_BIN/initdb" -D "$DEMO/data" --auth=trust -E UTF8 --locale=C >/dev/null
cat >>"$DEMO/data/postgresql.conf" <<CONF
listen_addresses = '127.0.0.1'
port = $PG_PORT
unix_socket_directories = '$DEMO'
shared_preload_libraries = 'fhir_sync'
fhir_sync.database = 'demo'
fhir_sync.server_url = '$FHIR'
fhir_sync.username = 'fhir_sync_worker'
CONF
runuser -u postgres -- "$PG_BIN/pg_ctl" -D "$DEMO/data" -l "$DEMO/postgres.log" -w start >/dev/null
for _ in $(seq 1 120); do curl -sf -o /dev/null "$FHIR/metadata" && break; sleep 0.5; done

psql() { command psql -X -q -h 127.0.0.1 -p "$PG_PORT" -U postgres -v ON_ERROR_STOP=1 "$@"; }
psql -d postgres -c "CREATE DATABASE demo"
say() { printf '\n== %s\n' "$*"; }

say "the workers' role: an ordinary LOGIN role (fhir_sync.username); CREATE EXTENSION grants it what it needs"
psql -d postgres -c "CREATE ROLE fhir_sync_worker LOGIN"

say "CREATE EXTENSION fhir_sync; the health tables; fhir_track() each of them"
psql -d demo -c "CREATE EXTENSION fhir_sync" -f tests/fixtures/health_tables.sql
psql -d demo -c "SELECT fhir_track('patient', 'Patient') UNION ALL SELECT fhir_track('patient_other_identifiers', 'Patient')
                 UNION ALL SELECT fhir_track('form', 'Encounter') UNION ALL SELECT fhir_track('blood_pressure', 'Observation')
                 UNION ALL SELECT fhir_track('pulse', 'Observation')"

say "INSERT the sample rows (2 patients, 1 extra identifier, 1 form, 1 blood pressure, 1 pulse)"
psql -d demo -f tests/fixtures/sample_rows.sql >/dev/null

say "SELECT jsonb_pretty(fhir_preview('patient', 1))  -- what would be sent for patient 1"
psql -d demo -At -c "SELECT jsonb_pretty(fhir_preview('patient', 1))"

say "SELECT ... FROM fhir_outbox  -- one row per captured change"
psql -d demo -c "SELECT id, table_name, record_id, operation, resource_type FROM fhir_outbox ORDER BY id"

say "waiting for the worker to deliver"
for _ in $(seq 1 100); do
    [ "$(psql -d demo -At -c "SELECT count(*) FROM fhir_outbox WHERE NOT processed")" = 0 ] && break
    sleep 0.2
done
say "SELECT ... FROM fhir_outbox_delivered  -- delivered changes leave the outbox for the history"
psql -d demo -c "SELECT id, table_name, operation, processed_at, fhir_resource_id, fhir_version FROM fhir_outbox_delivered ORDER BY id"

say "SELECT * FROM fhir_sync_status"
psql -d demo -x -c "SELECT * FROM fhir_sync_status"
psql -d demo -c "SELECT pid, usename, rolsuper FROM pg_stat_activity JOIN pg_roles ON rolname = usename WHERE backend_type = 'fhir_sync worker'"

say "the FHIR server now holds (GET $FHIR/<Type>?identifier=...)"
show() { curl -s "$FHIR/$1" | python3 -c '
import json, sys
for e in json.load(sys.stdin).get("entry", []):
    r = e["resource"]
    ref = r.get("subject", {}).get("reference")
    print("  %s/%s  version %s  identifier %s%s" % (r["resourceType"], r["id"], r["meta"]["versionId"],
          r["identifier"][0]["value"], "  subject " + ref if ref else ""))
'; }
show "Patient?identifier=http%3A%2F%2Fhospital.example.org%2Fmrn%7CMRN-0001"
show "Patient?identifier=http%3A%2F%2Fhospital.example.org%2Fmrn%7CMRN-0002"
show "Encounter?identifier=urn%3Afhir-sync%2Fpublic.form%7C1"
show "Observation?identifier=urn%3Afhir-sync%2Fpublic.blood_pressure%7C1"
show "Observation?identifier=urn%3Afhir-sync%2Fpublic.pulse%7C1"

say "UPDATE patient 1, DELETE patient 2: the same resource gets a new version; the other is deleted"
psql -d demo -c "UPDATE patient SET name_family = 'Okafor-Smith' WHERE id = 1" -c "DELETE FROM patient WHERE id = 2"
for _ in $(seq 1 100); do
    [ "$(psql -d demo -At -c "SELECT count(*) FROM fhir_outbox WHERE NOT processed")" = 0 ] && break
    sleep 0.2
done
show "Patient?identifier=http%3A%2F%2Fhospital.example.org%2Fmrn%7CMRN-0001"
printf '  Patient MRN-0002 on the server: %s match(es)\n' \
    "$(curl -s "$FHIR/Patient?identifier=http%3A%2F%2Fhospital.example.org%2Fmrn%7CMRN-0002" | python3 -c 'import json,sys; print(len(json.load(sys.stdin).get("entry", [])))')"

say "done: stopping PostgreSQL and Helios"
