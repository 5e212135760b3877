"""The lint tier: checks that read the repository's files only - no PostgreSQL cluster, no FHIR server, no
Docker engine, none of tests/e2e's fixtures. It shares constants and parsers with tests/e2e through
tests/e2e/harness/monitoring.py and harness/util.py (both read files only).

Run:  $FHIR_SYNC_CACHE/venv/bin/pytest tests/lint        (FHIR_SYNC_CACHE defaults to ~/.cache/fhir_sync)
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2e"))
