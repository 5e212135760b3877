#!/usr/bin/env bash
# The whole fhir_sync test suite, from a fresh Debian 12 machine (as root), tier by tier:
#   0. tests/setup.sh installs what is missing (apt packages, cargo-pgrx, Helios, Python venv);
#   1. pure: `cargo test -p fhir_sync_core` (: mapping, HTTP, policy, verdicts; no PostgreSQL) and the
#      benchmark endpoint's own test;
#   2. lint: tests/lint (dashboards, alert rules, compose and Dockerfiles checked as files);
#   3. db: `cargo pgrx test pg15`, the in-database tests;
#   4. e2e: the extension is installed into PostgreSQL 15 and tests/e2e (pytest) runs real
#      clusters, a real FHIR server (Helios), a fault-injecting server and postgres_exporter
#      (markers db, e2e, fault, deploy: `bash tests/run.sh -m fault`);
#   5. versions: tests/versions.sh, PostgreSQL 13, 15, 17 and 18 from Debian chroots: the in-database
#      tests, the Debian package built and installed into a root with only that PostgreSQL, the
#      end-to-end core against it (FHIR_SYNC_VERSIONS="17 18" picks majors, "" skips the tier).
# Extra arguments go to the e2e pytest (e.g. `bash tests/run.sh -k requeue`). Each tier's time is
# printed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
export USER=${USER:-root}
export FHIR_SYNC_CACHE=${FHIR_SYNC_CACHE:-$HOME/.cache/fhir_sync}

TIMES=()
tier() {  # tier NAME COMMAND...: runs it and records how long it took
    local name=$1 start=$SECONDS
    shift
    echo "== tier $name"
    "$@"
    TIMES+=("$name $((SECONDS - start)) s")
}
report() { printf '== tier times: %s\n' "${TIMES[@]}"; }
trap report EXIT

tier setup bash tests/setup.sh

pure() {
    cargo test -p fhir_sync_core
    cargo test --release --locked --manifest-path benches/endpoint/Cargo.toml --target-dir target/bench-endpoint
}
tier pure pure
tier lint "$FHIR_SYNC_CACHE/venv/bin/pytest" tests/lint -q

# In-database tests share one database; their DDL must not race.
export RUST_TEST_THREADS=1
# The test cluster runs as postgres: keep it in the build directory if postgres can reach it.
PGRX_DATA=$PWD/target/pgrx-test-data
runuser -u postgres -- test -x "$PWD" || PGRX_DATA=/tmp/fhir_sync-pgrx-test-data
mkdir -p "$PGRX_DATA"
chown postgres "$PGRX_DATA"
tier db cargo pgrx test pg15 --runas postgres --pgdata "$PGRX_DATA"

# The pg_test build carries test functions; install the plain extension for the e2e tests.
cargo pgrx install --pg-config /usr/lib/postgresql/15/bin/pg_config >/dev/null
tier e2e "$FHIR_SYNC_CACHE/venv/bin/pytest" tests/e2e "$@"
# shellcheck disable=SC2086 # a list of majors
[ -z "${FHIR_SYNC_VERSIONS-13 15 17 18}" ] || tier versions bash tests/versions.sh ${FHIR_SYNC_VERSIONS-13 15 17 18}
