"""The monitoring files under docker/ and what they must agree on, shared by the exporter and Prometheus
tests (tests/e2e/test_observability.py) and the file checks (tests/lint/test_docker_files.py).

Reads files only: importing this starts nothing.
"""
from __future__ import annotations

import re

import yaml

from .util import REPO_ROOT

DOCKER = REPO_ROOT / "docker"
QUERIES = DOCKER / "postgres_exporter" / "queries.yaml"
GRANTS = DOCKER / "postgres_exporter" / "grants.sql"
PROMETHEUS_YML = DOCKER / "prometheus" / "prometheus.yml"
ALERTS_YML = DOCKER / "prometheus" / "alerts.yml"
ALERTS_TEST_YML = DOCKER / "prometheus" / "alerts_test.yml"
GRAFANA = DOCKER / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "fhir_sync.json"
COMPOSE = DOCKER / "compose.yaml"

# The postgres_exporter version queries.yaml is tested with (Debian 12's); compose runs the same one.
EXPORTER_VERSION = "0.11.1"

# ------------------------------------------------------------------------------------------------
# THE list: every metric family queries.yaml produces, with its Prometheus type. The exporter test
# asserts it sees exactly these fhir_* families (and their values); the dashboard and the alert
# rules may use no other metric name (plus EXPORTER_METRICS, which postgres_exporter itself adds).
FHIR_METRICS = {
    "fhir_outbox_unprocessed_count": "gauge",
    "fhir_outbox_lag_seconds": "gauge",
    "fhir_outbox_pending_transactions": "gauge",
    "fhir_connector_processed_total": "counter",
    "fhir_connector_failed_total": "counter",
    "fhir_connector_dead_lettered_total": "counter",
    "fhir_dlq_total": "gauge",
    "fhir_call_latency_seconds": "histogram",
    "fhir_call_errors_total": "counter",
    "fhir_outbox_table_pending": "gauge",
    "fhir_outbox_table_dead_lettered": "gauge",
    "fhir_outbox_table_lag_seconds": "gauge",
    "fhir_sync_workers": "gauge",
}
EXPORTER_METRICS = {"pg_up": "gauge"}
# Prometheus makes these itself for every scrape target (alerts may use them).
PROMETHEUS_SYNTHETIC = {"up"}


def series_names() -> set[str]:
    """Sample names the families above expose (a histogram as _bucket, _sum, _count)."""
    out = set()
    for name, kind in {**FHIR_METRICS, **EXPORTER_METRICS}.items():
        out |= {name + s for s in ("_bucket", "_sum", "_count")} if kind == "histogram" else {name}
    return out


# ------------------------------------------------------------------------------------------------
# PromQL: which metric names an expression uses
_PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless",
                 "offset", "atan2", "inf", "nan"}


def promql_metric_names(expr: str) -> set[str]:
    """Metric names referenced by a PromQL expression (Grafana variables allowed)."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'', '""', expr)            # strings
    e = re.sub(r"\{[^}]*\}", " ", e)                                              # label matchers
    e = re.sub(r"\[[^\]]*\]", " ", e)                                             # ranges
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", e)   # label lists
    e = re.sub(r"\$\{?[A-Za-z_][A-Za-z0-9_]*\}?", " ", e)                         # Grafana variables
    names = set()
    for m in re.finditer(r"(?<![\w.])([A-Za-z_:][A-Za-z0-9_:]*)(\s*\()?", e):
        word, call = m.group(1), m.group(2)
        if call or word.lower() in _PROMQL_WORDS:
            continue
        names.add(word)
    return names


def dashboard_exprs(dash: dict) -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target (rows' nested panels included) and template query."""
    out = []

    def walk(panels):
        for p in panels:
            for t in p.get("targets") or []:
                if t.get("expr"):
                    out.append((f"panel {p.get('title')!r} {t.get('refId')}", t["expr"]))
            walk(p.get("panels") or [])
    walk(dash.get("panels") or [])
    for v in (dash.get("templating") or {}).get("list") or []:
        q = v.get("query")
        q = q.get("query") if isinstance(q, dict) else q
        if v.get("type") == "query" and q:
            m = re.fullmatch(r"\s*label_values\(\s*(.+?)\s*,\s*\w+\s*\)\s*", q)
            out.append((f"variable {v['name']}", m.group(1) if m else q))
    return out


def alert_rules() -> list[dict]:
    doc = yaml.safe_load(ALERTS_YML.read_text())
    return [r for g in doc["groups"] for r in g["rules"]]
