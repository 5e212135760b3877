#!/usr/bin/env bash
# The whole fhir_sync test suite, from a fresh Debian 12 machine (as root):
#   1. tests/setup.sh installs what is missing (apt packages, cargo-pgrx, Helios, Python venv);
#   2. `cargo pgrx test pg15`: unit tests of the pure modules and in-database tests;
#   3. the extension is installed into PostgreSQL 15 and tests/e2e (pytest) runs real clusters,
#      a real FHIR server (Helios), a fault-injecting server and postgres_exporter.
# Extra arguments go to pytest (e.g. `bash tests/run.sh -k requeue`).
set -euo pipefail
cd "$(dirname "$0")/.."
export USER=${USER:-root}
export FHIR_SYNC_CACHE=${FHIR_SYNC_CACHE:-$HOME/.cache/fhir_sync}

bash tests/setup.sh

# In-database tests share one database; their DDL must not race.
export RUST_TEST_THREADS=1
# The test cluster runs as postgres: keep it in the build directory if postgres can reach it.
PGRX_DATA=$PWD/target/pgrx-test-data
runuser -u postgres -- test -x "$PWD" || PGRX_DATA=/tmp/fhir_sync-pgrx-test-data
mkdir -p "$PGRX_DATA"
chown postgres "$PGRX_DATA"
cargo pgrx test pg15 --runas postgres --pgdata "$PGRX_DATA"

# The pg_test build carries test functions; install the plain extension for the e2e tests.
cargo pgrx install --pg-config /usr/lib/postgresql/15/bin/pg_config >/dev/null
"$FHIR_SYNC_CACHE/venv/bin/pytest" tests/e2e "$@"
