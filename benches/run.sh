#!/usr/bin/env bash
# fhir_sync benchmarks, the one command (as root, from a fresh Debian 12 machine with a Rust toolchain):
#
#   bash benches/run.sh                      # every scenario but soak10m (~15 min on 2 cores)
#   bash benches/run.sh all                  # ... and the 10-minute soak
#   bash benches/run.sh steady burst20k      # some scenarios (see benches/README.md)
#   bash benches/run.sh --quick              # tiny sizes: does every scenario work?
#
# 1. tests/setup.sh installs what is missing (PostgreSQL 15, cargo-pgrx, Helios, the Python venv);
# 2. builds the local FHIR endpoint (benches/endpoint) with cargo in release mode;
# 3. installs fhir_sync in release mode (cargo pgrx install --release), unless
#    FHIR_SYNC_BENCH_SKIP_INSTALL=1 (then whatever is installed is measured, and labelled as such);
# 4. runs benches/bench.py, which starts its own cluster under target/bench and prints the figures
#    (also in target/bench/results.json and target/bench/tables.txt).
# Extra arguments go to bench.py (`bash benches/run.sh --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
export USER=${USER:-root}
export FHIR_SYNC_CACHE=${FHIR_SYNC_CACHE:-$HOME/.cache/fhir_sync}
PG_CONFIG=/usr/lib/postgresql/15/bin/pg_config

if [ "${FHIR_SYNC_BENCH_SKIP_SETUP:-0}" != 1 ]; then
    bash tests/setup.sh
fi

echo "[bench] building the endpoint (release)"
cargo build --release --locked --quiet --manifest-path benches/endpoint/Cargo.toml \
    --target-dir target/bench-endpoint
export FHIR_SYNC_BENCH_ENDPOINT=$PWD/target/bench-endpoint/release/fhir-bench-endpoint

if [ "${FHIR_SYNC_BENCH_SKIP_INSTALL:-0}" = 1 ]; then
    echo "[bench] FHIR_SYNC_BENCH_SKIP_INSTALL=1: measuring the fhir_sync already installed"
    export FHIR_SYNC_BENCH_BUILD=${FHIR_SYNC_BENCH_BUILD:-unknown}
else
    echo "[bench] installing fhir_sync (release build)"
    cargo pgrx install --release --pg-config "$PG_CONFIG" >/dev/null
    export FHIR_SYNC_BENCH_BUILD=release
fi

exec "$FHIR_SYNC_CACHE/venv/bin/python" benches/bench.py "$@"
