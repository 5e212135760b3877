#!/usr/bin/env bash
# Runs once at initialisation, after 30-exporter-grants.sql (docker/postgres_exporter/grants.sql)
# created the role fhir_sync_exporter: give it the password postgres_exporter's DSN uses.
set -euo pipefail
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
     -v pw="${EXPORTER_PASSWORD:?set EXPORTER_PASSWORD}" <<'SQL'
ALTER ROLE fhir_sync_exporter PASSWORD :'pw';
SQL
