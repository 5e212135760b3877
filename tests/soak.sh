#!/usr/bin/env bash
# Reliability and security suite at full size: the same tests as in `bash tests/run.sh`
# (tests/e2e/test_reliability.py, tests/e2e/test_security.py), with FHIR_SYNC_SOAK=1:
#
#   kill -9 of the worker        20 times during 20,000 committed changes (one request per resource,
#                                and again with Bundles of 10)
#   pg_ctl stop -m immediate     10 times during 20,000 changes
#   pg_terminate_backend         20 times during 20,000 changes
#   FHIR server down and up      10 outages during 20,000 changes
#   flaky server                 20,000 changes through random resets, hangs, 503s, slow answers
#   backlog storm                100,000 rows queued while the server is down, then drained
#
# Each run counts, Jepsen-style (tests/e2e/jepsen.py): committed changes, what the server holds,
# lost (must be 0), duplicates (must stay within what was in flight at each fault), phantoms and
# twin resources (0). The counts are printed (pytest -s). About 10 minutes on two cores.
#
# Needs the extension installed and the test tools set up: run `bash tests/run.sh` once first.
# Extra arguments go to pytest (e.g. `bash tests/soak.sh -k kill_9`).
set -euo pipefail
cd "$(dirname "$0")/.."
export FHIR_SYNC_CACHE=${FHIR_SYNC_CACHE:-$HOME/.cache/fhir_sync}
PYTEST=$FHIR_SYNC_CACHE/venv/bin/pytest
if [ ! -x "$PYTEST" ] || [ ! -f "$(/usr/lib/postgresql/15/bin/pg_config --pkglibdir)/fhir_sync.so" ]; then
    echo "soak.sh: run 'bash tests/run.sh' first (it installs the extension and the test tools)" >&2
    exit 1
fi
export FHIR_SYNC_SOAK=1
exec "$PYTEST" tests/e2e/test_reliability.py tests/e2e/test_security.py -s "$@"
