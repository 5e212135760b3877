"""File checks of docker/: the compose stack, the Dockerfiles, the Prometheus rules and config, the
Grafana dashboard and its provisioning. They read files only (promtool, if installed, checks the rules
offline): no cluster, no server, no Docker engine. Moved from tests/e2e/test_observability.py, whose
exporter and Prometheus tests run the real processes; both take the metric list and the PromQL helpers
from tests/e2e/harness/monitoring.py.

Run:  $FHIR_SYNC_CACHE/venv/bin/pytest tests/lint
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from harness.monitoring import (ALERTS_TEST_YML, ALERTS_YML, COMPOSE, DASHBOARD, DOCKER, EXPORTER_VERSION,
                                GRAFANA, GRANTS, PROMETHEUS_SYNTHETIC, PROMETHEUS_YML, QUERIES, alert_rules,
                                dashboard_exprs, promql_metric_names, series_names)
from harness.util import FIXTURES, REPO_ROOT

PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"


# ------------------------------------------------------------------------------------------------
# PromQL
def test_promql_metric_name_extraction():
    assert promql_metric_names('histogram_quantile(0.9, sum by (le) (rate(a_bucket{instance=~"$instance"}'
                               '[$__rate_interval])))') == {"a_bucket"}
    assert promql_metric_names('sum by (job, server) (rate(x_total[5m])) / on (job) group_left '
                               'sum without (le) (y) > 0.05') == {"x_total", "y"}
    assert promql_metric_names('up{job="fhir_sync"} == 0 and bool pg_up offset 5m') == {"up", "pg_up"}
    assert promql_metric_names('delta(fhir_dlq_total{a="b{c}"}[15m]) > 1e3') == {"fhir_dlq_total"}


# ------------------------------------------------------------------------------------------------
# Grafana
def test_grafana_dashboard_uses_only_exported_metrics():
    dash = json.loads(DASHBOARD.read_text())
    allowed = series_names()
    exprs = dashboard_exprs(dash)
    assert len(exprs) >= 10, exprs
    for where, expr in exprs:
        names = promql_metric_names(expr)
        assert names, f"{where}: no metric in {expr!r}"
        assert names <= allowed, f"{where}: {sorted(names - allowed)} not exported (FHIR_METRICS): {expr!r}"

    # The panels the issue asks for, on the metrics that carry them.
    text = {p["title"]: " ".join(t["expr"] for t in p.get("targets", [])) for p in dash["panels"]}
    joined = "\n".join(text.values())
    assert re.search(r"rate\(fhir_connector_processed_total\{", text["Throughput"])
    assert "fhir_outbox_lag_seconds" in text["Lag"]
    assert "fhir_dlq_total" in text["Dead-letter queue"]
    for q in ("0.5", "0.9", "0.99"):
        assert re.search(rf"histogram_quantile\({re.escape(q)}, sum by \(le\) \(rate\(fhir_call_latency_seconds_bucket\{{",
                         text["FHIR call latency"]), q
    assert "sum by (error_class) (rate(fhir_call_errors_total{" in text["FHIR call errors by class"]
    assert "fhir_outbox_table_pending" in joined and "fhir_sync_workers" in joined

    # Datasource: every reference is the provisioned one; ids unique.
    ds = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yaml").read_text())["datasources"]
    uids = {d["uid"] for d in ds if d["type"] == "prometheus"}
    refs = [p["datasource"]["uid"] for p in dash["panels"]] + \
           [t["datasource"]["uid"] for p in dash["panels"] for t in p.get("targets", [])]
    assert set(refs) <= uids, (set(refs), uids)
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))


def test_grafana_provisioning_matches_compose():
    compose = yaml.safe_load(COMPOSE.read_text())
    g = compose["services"]["grafana"]
    mounts = dict(_bind_mounts(g))                       # host path -> container path
    prov = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "fhir_sync.yaml").read_text())
    (provider,) = prov["providers"]
    assert provider["type"] == "file"
    assert mounts[DOCKER / "grafana" / "dashboards"] == provider["options"]["path"]
    assert mounts[DOCKER / "grafana" / "provisioning"] == "/etc/grafana/provisioning"
    home = g["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == provider["options"]["path"] + "/" + DASHBOARD.name
    (ds,) = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yaml").read_text())["datasources"]
    host, port = re.fullmatch(r"http://([^:/]+):(\d+)/?", ds["url"]).groups()
    assert host in compose["services"] and host == "prometheus"
    assert int(port) in _container_ports(compose["services"]["prometheus"])


# ------------------------------------------------------------------------------------------------
# Prometheus
@pytest.mark.skipif(not Path(PROMTOOL).exists(), reason="promtool not installed")
def test_promtool_checks_rules_and_config():
    for args in (["check", "rules", ALERTS_YML], ["check", "config", PROMETHEUS_YML],
                 ["test", "rules", ALERTS_TEST_YML]):
        r = subprocess.run([PROMTOOL, *map(str, args)], capture_output=True, text=True, timeout=60,
                           cwd=REPO_ROOT)
        assert r.returncode == 0, f"promtool {' '.join(map(str, args))}:\n{r.stdout}{r.stderr}"
    cfg = yaml.safe_load(PROMETHEUS_YML.read_text())
    assert [(PROMETHEUS_YML.parent / f).resolve() for f in cfg["rule_files"]] == [ALERTS_YML.resolve()]


def test_alerts_cover_the_issue_and_use_only_exported_metrics():
    rules = alert_rules()
    allowed = series_names() | PROMETHEUS_SYNTHETIC
    used = {}
    for r in rules:
        names = promql_metric_names(r["expr"])
        assert names and names <= allowed, f"{r['alert']}: {sorted(names - allowed)} not exported"
        assert r["labels"]["severity"] in ("warning", "critical")
        assert r["annotations"]["summary"]
        used[r["alert"]] = (names, r["expr"])
    # lag above a threshold, DLQ growing, worker down, worker paused, error rate
    assert "fhir_outbox_lag_seconds" in used["FhirSyncLagHigh"][0]
    assert "fhir_dlq_total" in used["FhirSyncDlqGrowing"][0]
    assert "fhir_sync_workers" in used["FhirSyncWorkerDown"][0]
    assert 'state="paused"' in used["FhirSyncWorkerPaused"][1]
    assert {"fhir_call_errors_total", "fhir_call_latency_seconds_count"} <= used["FhirSyncCallErrorRate"][0]
    # every alert has a unit test
    tests = yaml.safe_load(ALERTS_TEST_YML.read_text())["tests"]
    tested = {a["alertname"] for t in tests for a in t["alert_rule_test"] if a["exp_alerts"]}
    assert tested == set(used), set(used) - tested


# ------------------------------------------------------------------------------------------------
# docker/: what can be checked without a Docker engine
def _bind_mounts(service: dict):
    """(host path resolved against docker/, container path) of a service's bind mounts."""
    for v in service.get("volumes") or []:
        if isinstance(v, dict):
            src, dst = v.get("source"), v.get("target")
            if v.get("type") != "bind":
                continue
        else:
            src, dst = v.split(":")[:2]
        if src.startswith((".", "/")):
            yield (DOCKER / src).resolve(), dst


def _container_ports(service: dict) -> set[int]:
    return {int(str(p).split(":")[-1].split("/")[0]) for p in service.get("ports") or []}


def _host_ports(service: dict) -> list[int]:
    out = []
    for p in service.get("ports") or []:
        parts = str(p).split("/")[0].split(":")
        assert len(parts) >= 2, f"port {p!r}: publish as host:container"
        out.append(int(parts[-2]))
    return out


def _dockerfile(path: Path) -> list[str]:
    """Instructions of a Dockerfile, continuation lines joined, comments dropped."""
    lines, cur = [], ""
    for raw in path.read_text().splitlines():
        s = raw.strip()
        if not cur and (not s or s.startswith("#")):
            continue
        cur += " " + s.rstrip("\\").strip()
        if not s.endswith("\\"):
            lines.append(cur.strip())
            cur = ""
    return lines


def _arg_default(lines: list[str], name: str) -> str:
    for ln in lines:
        m = re.fullmatch(rf"ARG {name}=(\S+)", ln)
        if m:
            return m.group(1)
    raise AssertionError(f"no ARG {name}=...")


def _ignored(ignore_file: Path, rel: str) -> bool:
    """Whether .dockerignore rules exclude rel (last matching pattern wins; enough for our simple file)."""
    import fnmatch
    ignored = False
    for ln in ignore_file.read_text().splitlines():
        ln = ln.strip()
        if not ln or ln.startswith("#"):
            continue
        neg = ln.startswith("!")
        pat = ln.lstrip("!").strip("/")
        parts = rel.strip("/").split("/")
        if any(fnmatch.fnmatch("/".join(parts[:i]), pat) for i in range(1, len(parts) + 1)):
            ignored = not neg
    return ignored


def _cargo_pgrx_version() -> str:
    m = re.search(r'^pgrx\s*=\s*"=?([\d.]+)"', (REPO_ROOT / "Cargo.toml").read_text(), re.M)
    return m.group(1)


def test_compose_files_exist_names_agree_and_ports_do_not_clash():
    compose = yaml.safe_load(COMPOSE.read_text())
    svcs = compose["services"]
    assert set(svcs) == {"postgres", "helios", "postgres-exporter", "prometheus", "grafana"}

    # every path it builds or mounts exists; named volumes are declared; depends_on names services
    for name, s in svcs.items():
        if "build" in s:
            b = s["build"] if isinstance(s["build"], dict) else {"context": s["build"]}
            ctx = (DOCKER / b["context"]).resolve()
            assert ctx.is_dir(), f"{name}: build context {ctx}"
            df = ctx / b.get("dockerfile", "Dockerfile")
            assert df.is_file(), f"{name}: {df}"
            assert s.get("image"), f"{name}: a built service names its image"
        for src, dst in _bind_mounts(s):
            assert src.exists(), f"{name}: mount source {src} does not exist"
            assert REPO_ROOT in src.parents, f"{name}: {src} is outside the repository"
        for v in s.get("volumes") or []:
            src = v.split(":")[0] if isinstance(v, str) else v.get("source")
            if not src.startswith((".", "/")):
                assert src in (compose.get("volumes") or {}), f"{name}: volume {src} not declared"
        deps = s.get("depends_on") or []
        for d in deps if isinstance(deps, list) else deps.keys():
            assert d in svcs, f"{name} depends on unknown service {d}"

    # host ports: unique
    hp = [p for s in svcs.values() for p in _host_ports(s)]
    assert len(hp) == len(set(hp)), f"host ports clash: {hp}"

    # postgres -> helios: fhir_sync.server_url names the helios service and its port
    pg = svcs["postgres"]
    settings = dict(a.split("=", 1) for a in pg["command"] if "=" in a)
    host, port = re.fullmatch(r"http://([^:/]+):(\d+)/?", settings["fhir_sync.server_url"]).groups()
    assert host == "helios" and int(port) in _container_ports(svcs["helios"])
    helios_df = _dockerfile(DOCKER / "helios" / "Dockerfile")
    assert any(f"HFS_SERVER_PORT={port}" in ln for ln in helios_df)
    assert settings["fhir_sync.database"] == pg["environment"]["POSTGRES_DB"]

    # initdb: demo tables, then the extension, then the exporter's role, then its password
    initdb = sorted((dst, src) for src, dst in _bind_mounts(pg) if dst.startswith("/docker-entrypoint-initdb.d/"))
    assert [src for _, src in initdb] == [
        FIXTURES / "health_tables.sql", DOCKER / "initdb" / "20-fhir_sync.sql", GRANTS,
        DOCKER / "initdb" / "31-exporter-password.sh"]
    assert os.access(DOCKER / "initdb" / "31-exporter-password.sh", os.X_OK)
    assert pg["environment"]["EXPORTER_PASSWORD"]

    # exporter: the tested version, our queries.yaml where --extend.query-path says, a DSN naming the
    # postgres service, its database and the role of grants.sql
    ex = svcs["postgres-exporter"]
    assert ex["image"] == f"quay.io/prometheuscommunity/postgres-exporter:v{EXPORTER_VERSION}", ex["image"]
    qpath = next(a.split("=", 1)[1] for a in ex["command"] if a.startswith("--extend.query-path="))
    assert dict(_bind_mounts(ex))[QUERIES.resolve()] == qpath
    dsn = ex["environment"]["DATA_SOURCE_NAME"]
    m = re.fullmatch(r"postgresql://(\w+):[^@]+@([\w-]+):(\d+)/(\w+)\?sslmode=disable", dsn)
    assert m, dsn
    assert m.group(1) == "fhir_sync_exporter" and "fhir_sync_exporter" in GRANTS.read_text()
    assert m.group(2) == "postgres" and m.group(3) == "5432" and m.group(4) == pg["environment"]["POSTGRES_DB"]
    ex_port = int(next(a for a in ex["command"] if a.startswith("--web.listen-address=")).rsplit(":", 1)[1])
    assert ex_port in _container_ports(ex)

    # prometheus: its config is in the mounted directory and scrapes the exporter service
    pr = svcs["prometheus"]
    conf = next(a.split("=", 1)[1] for a in pr["command"] if a.startswith("--config.file="))
    mounts = {dst: src for src, dst in _bind_mounts(pr)}
    conf_dir = Path(conf).parent.as_posix()
    assert mounts[conf_dir] == PROMETHEUS_YML.parent.resolve()
    assert (mounts[conf_dir] / Path(conf).name).is_file()
    targets = [t for sc in yaml.safe_load(PROMETHEUS_YML.read_text())["scrape_configs"]
               if sc["job_name"] == "fhir_sync" for st in sc["static_configs"] for t in st["targets"]]
    assert targets == [f"postgres-exporter:{ex_port}"]


def test_dockerfiles_build_what_the_repo_pins():
    df = _dockerfile(DOCKER / "Dockerfile")
    froms = [ln.split()[1] for ln in df if ln.startswith("FROM ")]
    pg_major = _arg_default(df, "PG_MAJOR")
    assert froms == ["rust:1.95-bookworm", "postgres:${PG_MAJOR}-bookworm"], froms
    cargo = (REPO_ROOT / "Cargo.toml").read_text()
    assert re.search(r'rust-version\s*=\s*"1\.95"', cargo)
    assert re.search(rf'default\s*=\s*\["pg{pg_major}"\]', cargo)           # the extension's default PG
    assert _arg_default(df, "PGRX_VERSION") == _cargo_pgrx_version() == "0.18.1"
    run = " ".join(ln for ln in df if ln.startswith("RUN "))
    assert "postgresql-server-dev-${PG_MAJOR}" in run
    assert "cargo install cargo-pgrx --version ${PGRX_VERSION} --locked" in run
    assert "cargo pgrx package" in run
    assert "shared_preload_libraries" in run and "'fhir_sync'" in run
    # every COPY from the context exists and is not dropped by Dockerfile.dockerignore
    ignore = DOCKER / "Dockerfile.dockerignore"
    for ln in df:
        if ln.startswith("COPY ") and "--from=" not in ln:
            for src in ln.split()[1:-1]:
                assert (REPO_ROOT / src).exists(), src
                assert not _ignored(ignore, src), f"{src} is excluded by {ignore.name}"
    assert _ignored(ignore, "target/release/x") and _ignored(ignore, "tests/e2e")
    # the package layout the runtime stage copies is what cargo pgrx package writes
    copy = next(ln for ln in df if ln.startswith("COPY --from=build"))
    assert "/build/target/release/fhir_sync-pg${PG_MAJOR}/usr/" in copy

    h = _dockerfile(DOCKER / "helios" / "Dockerfile")
    from harness.util import HFS_BIN, SEARCH_PARAMS
    hv = _arg_default(h, "HELIOS_VERSION")
    assert HFS_BIN.parent.parent.name == f"helios-{hv}"                     # what the tests run
    assert SEARCH_PARAMS.parent.name == f"medplum-{_arg_default(h, 'MEDPLUM_VERSION')}"
    assert "--no-default-features --features R4,sqlite" in " ".join(h)
    compose = yaml.safe_load(COMPOSE.read_text())
    assert compose["services"]["helios"]["image"] == f"fhir_sync/helios:{hv}"
    assert compose["services"]["postgres"]["image"] == f"fhir_sync/postgres:{pg_major}"
