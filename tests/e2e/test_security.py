"""Security, against real clusters: who can read the FHIR server's credentials and fhir_sync's queues, what
the worker sends and to whom (credentials in the Authorization header, TLS verified, no redirect
followed, nowhere but the configured server), whose rights the worker runs other roles' code with, and
that the PostgreSQL log carries outbox ids and error classes but no patient data.
"""
from __future__ import annotations

import base64
import os
import shutil
import ssl
import subprocess
import uuid
from pathlib import Path

import psycopg
import pytest

from fhirsync import DB, MRN, eventually, make_app
from harness.cluster import PG_USER
from harness.faults import FaultServer, _Handler
from harness.util import REPO_ROOT, wait_until
from jepsen import worker_pids

# The fault server speaks plain http: these tests allow credentials over it (fhir_sync refuses by default,
# test_trust.py shows that).
HTTP_AUTH = {"fhir_sync.allow_http_credentials": True}

SECRETS = ("fhir_sync.auth_token", "fhir_sync.auth_password", "fhir_sync.oauth_client_secret")


def connect_as(cluster, role: str, db: str = DB) -> psycopg.Connection:
    conn = psycopg.connect(host="127.0.0.1", port=cluster.port, user=role, dbname=db, autocommit=True)
    cluster._conns.append(conn)
    return conn


def denied(conn, sql: str, params=None, code: str = "42501") -> str:
    """Runs sql, which must fail with SQLSTATE code (42501 insufficient_privilege by default)."""
    with pytest.raises(psycopg.Error) as e:
        conn.execute(sql, params)
    assert e.value.sqlstate == code, (sql, e.value.sqlstate, str(e.value))
    return str(e.value)


def reload_and_wait(app, settings: dict) -> None:
    """ALTER SYSTEM SET each setting, reload, and wait until a new session sees the values: new sessions
    inherit the postmaster's settings, and the postmaster signals every process (the worker too) as soon
    as it has read the file, so the worker takes them at its next wake-up."""
    for name, value in settings.items():
        app.sql(f"ALTER SYSTEM SET {name} = '{value}'")
    app.sql("SELECT pg_reload_conf()")
    for name, value in settings.items():
        wait_until(lambda: app.cluster.query(f"SHOW {name}")[0][0].lower() == str(value).lower(), timeout=10,
                   message=f"{name} reloaded")


def set_secrets(app) -> dict:
    values = {
        "fhir_sync.auth_token": f"tok-{uuid.uuid4().hex}",
        "fhir_sync.auth_password": f"pw-{uuid.uuid4().hex}",
        "fhir_sync.oauth_client_secret": f"cs-{uuid.uuid4().hex}",
    }
    for name, value in values.items():
        app.sql(f"ALTER SYSTEM SET {name} = '{value}'")
    app.sql("ALTER SYSTEM SET fhir_sync.auth = 'bearer'")
    app.sql("SELECT pg_reload_conf()")
    wait_until(lambda: app.one("SHOW fhir_sync.auth_token") == values["fhir_sync.auth_token"], timeout=10,
               message="settings reloaded")
    return values


def make_clerk(app, name: str = "clerk") -> None:
    """An ordinary login role that may use the tracked tables, and nothing of fhir_sync."""
    app.sql(f"CREATE ROLE {name} LOGIN")
    app.sql(f"GRANT SELECT, INSERT, UPDATE, DELETE ON patient TO {name}")
    app.sql(f"GRANT USAGE ON SEQUENCE patient_id_seq TO {name}")


# ---------------------------------------------------------------------------------------------- secrets
@pytest.mark.e2e
def test_an_ordinary_role_cannot_read_the_secrets(make_cluster, faults):
    app = make_app(make_cluster, faults.base_url, conf=HTTP_AUTH)
    secrets = set_secrets(app)
    make_clerk(app)
    clerk = connect_as(app.cluster, "clerk")
    for name in SECRETS:
        denied(clerk, f"SHOW {name}")
        denied(clerk, "SELECT current_setting(%s)", (name,))
        denied(clerk, "SELECT current_setting(%s, true)", (name,))
        denied(clerk, f"SET {name} = 'mine'", code="55P02")
    visible = dict(clerk.execute("SELECT name, coalesce(setting, '') FROM pg_settings").fetchall())
    assert "fhir_sync.server_url" in visible, "the ordinary settings stay visible"
    assert not set(SECRETS) & set(visible)
    shown = clerk.execute("SHOW ALL").fetchall()
    assert not set(SECRETS) & {r[0] for r in shown}
    everything = " ".join(map(str, visible.values())) + " ".join(r[1] for r in shown)
    everything += " ".join(str(r) for r in clerk.execute("SELECT * FROM pg_show_all_settings()").fetchall())
    everything += " ".join(str(r) for r in clerk.execute("SELECT * FROM pg_db_role_setting").fetchall())
    for value in secrets.values():
        assert value not in everything
    denied(clerk, "SELECT * FROM pg_file_settings")
    denied(clerk, "SELECT pg_read_file('postgresql.auto.conf')")
    denied(clerk, "ALTER SYSTEM SET fhir_sync.auth_token = 'mine'")
    # The file that holds them belongs to the postgres OS user alone.
    auto = app.cluster.data / "postgresql.auto.conf"
    assert auto.stat().st_mode & 0o077 == 0 and auto.owner() == PG_USER

    # No table holds them: look through every table of every database, catalogs included (superuser).
    for db in ("postgres", DB):
        conn = app.cluster.connect(db)
        rels = conn.execute("SELECT c.oid::regclass::text FROM pg_class c WHERE c.relkind IN ('r', 'm', 'p')"
                            " AND c.relpersistence <> 't'").fetchall()
        for (rel,) in rels:
            for value in secrets.values():
                hits = conn.execute(f"SELECT count(*) FROM {rel} t WHERE t::text LIKE %s",
                                    (f"%{value}%",)).fetchone()[0]
                assert hits == 0, f"{value[:4]}… found in {db}.{rel}"
    # The worker uses it: the token reaches the server (and the log never shows it).
    app.add_patient("secret-check")
    req = faults.wait_for_requests(1, predicate=lambda r: "secret-check" in r.path)[0]
    assert req.headers["authorization"] == f"Bearer {secrets['fhir_sync.auth_token']}"
    for value in secrets.values():
        assert value not in worker_log(app.cluster)


def worker_log(cluster) -> str:
    """The lines fhir_sync's own processes wrote to the log."""
    return "\n".join(line for line in cluster.log_text().splitlines()
                     if "fhir_sync worker" in line or "fhir_sync launcher" in line)


def secret_file(app, name: str, value: str, mode: int = 0o600) -> Path:
    """A file holding one secret, owned by the server's OS user (cluster.dir belongs to it)."""
    path = app.cluster.dir / name
    path.write_text(value + "\n")
    shutil.chown(path, PG_USER, PG_USER)
    path.chmod(mode)
    return path


@pytest.mark.e2e
def test_setting_a_secret_the_documented_way_keeps_it_out_of_the_log(make_cluster, faults):
    """The README's way: the secret in a file only the server's OS user reads, named by the *_file
    setting, then a reload. The worker uses it; the log, which shows every changed setting's new value
    at reload, shows the file's path only. Rotating it is rewriting the file and reloading."""
    app = make_app(make_cluster, faults.base_url, conf=HTTP_AUTH)
    token = f"tok-{uuid.uuid4().hex}"
    path = secret_file(app, "fhir_token", token)
    reload_and_wait(app, {"fhir_sync.auth": "bearer", "fhir_sync.auth_token_file": str(path)})
    app.add_patient("file-secret")
    req = faults.wait_for_requests(1, predicate=lambda r: "file-secret" in r.path)[0]
    assert req.headers["authorization"] == f"Bearer {token}"

    rotated = f"tok-{uuid.uuid4().hex}"
    path.write_text(rotated + "\n")
    app.sql("SELECT pg_reload_conf()")
    app.wait_cycles(2)                  # the worker takes the reload (re-reads the file) at the top of a pass
    app.add_patient("file-rotated")
    req = faults.wait_for_requests(1, predicate=lambda r: "file-rotated" in r.path)[0]
    assert req.headers["authorization"] == f"Bearer {rotated}"
    log = app.cluster.log_text()
    assert str(path) in log, "the reload logs the setting: the path"
    for value in (token, rotated):
        assert value not in log, "a secret is in the PostgreSQL log"


@pytest.mark.e2e
def test_a_secret_file_others_can_read_is_refused_until_fixed(make_cluster, faults):
    """As PostgreSQL refuses an ssl_key_file with group or world access: the worker sends nothing (with
    a log line naming the file, not its content), loses nothing, and delivers once the mode is fixed."""
    app = make_app(make_cluster, faults.base_url, conf=HTTP_AUTH)
    token = f"tok-{uuid.uuid4().hex}"
    path = secret_file(app, "open_token", token, mode=0o644)
    reload_and_wait(app, {"fhir_sync.auth": "bearer", "fhir_sync.auth_token_file": str(path)})
    app.add_patient("open-file")
    eventually(lambda: "has group or world access" in app.cluster.log_text(), message="refusal logged")
    app.wait_cycles(2)                  # passes in which the worker could have sent it (each up to 5 s: no client)
    assert not [r for r in faults.requests if "open-file" in r.path], "nothing is sent with a readable secret"
    assert app.one("SELECT count(*) FROM fhir_outbox WHERE NOT processed") == 1
    path.chmod(0o600)
    app.sql("SELECT pg_reload_conf()")
    app.wait_drained(timeout=20)
    req = [r for r in faults.requests if "open-file" in r.path][0]
    assert req.headers["authorization"] == f"Bearer {token}"
    assert token not in app.cluster.log_text()
    assert app.one("SELECT count(*) FROM fhir_dlq") == 0


@pytest.mark.e2e
def test_an_ordinary_role_cannot_read_or_set_the_secret_file_settings(make_cluster, faults):
    app = make_app(make_cluster, faults.base_url)
    make_clerk(app)
    clerk = connect_as(app.cluster, "clerk")
    for name in ("fhir_sync.auth_token_file", "fhir_sync.auth_password_file", "fhir_sync.oauth_client_secret_file"):
        denied(clerk, f"SHOW {name}")
        denied(clerk, f"SET {name} = '/tmp/mine'", code="55P02")
        denied(clerk, f"ALTER SYSTEM SET {name} = '/tmp/mine'")


@pytest.mark.e2e
def test_the_exporter_role_cannot_read_the_secrets(make_cluster, faults):
    """The role docker/postgres_exporter/grants.sql sets up reads the metrics views, not the FHIR
    credentials (pg_monitor would: it includes pg_read_all_settings, which may read SUPERUSER_ONLY
    settings)."""
    app = make_app(make_cluster, faults.base_url, conf=HTTP_AUTH)
    secrets = set_secrets(app)
    app.cluster.psql((REPO_ROOT / "docker" / "postgres_exporter" / "grants.sql").read_text(), db=DB)
    exporter = connect_as(app.cluster, "fhir_sync_exporter")
    assert exporter.execute("SELECT count(*) FROM fhir_sync_metrics").fetchone()[0] > 0
    for name in SECRETS:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            value = exporter.execute(f"SHOW {name}").fetchone()[0]
            assert value != secrets[name], f"{name} is readable by the exporter role"


@pytest.mark.e2e
def test_an_ordinary_role_cannot_touch_the_queues_or_call_admin_functions(make_cluster, faults):
    """Without grants an ordinary role can write the tracked tables (and is captured) but can read or
    write none of fhir_sync's tables and views and call none of its admin functions; with the README's
    grants it can do what they say."""
    app = make_app(make_cluster, faults.base_url)
    make_clerk(app)
    clerk = connect_as(app.cluster, "clerk")
    clerk.execute("INSERT INTO patient (identifier_system, identifier_value, gender) VALUES (%s, 'by-clerk', 'banana')",
                  (MRN,))
    app.wait_drained()
    assert app.one("SELECT count(*) FROM fhir_dlq") == 1        # captured, and dead-lettered (bad gender)
    dlq_id = app.one("SELECT id FROM fhir_dlq")
    for sql in ("SELECT * FROM fhir_outbox", "SELECT * FROM fhir_dlq", "SELECT * FROM fhir_sync_state",
                "SELECT * FROM fhir_outbox_delivered", "SELECT * FROM fhir_sync_version",
                "SELECT * FROM fhir_sync_resources", "SELECT * FROM fhir_sync_delivered_counts()",
                "SELECT * FROM fhir_tracked", "SELECT * FROM fhir_sync_status", "SELECT * FROM fhir_sync_workers",
                "SELECT * FROM fhir_sync_tables", "SELECT * FROM fhir_pending_transactions",
                "SELECT * FROM fhir_sync_metrics",
                "INSERT INTO fhir_outbox (table_name, record_id, operation, resource_type, resource_table, resource_key)"
                " VALUES ('public.patient', '1', 'U', 'Patient', 'patient', '1')",
                "UPDATE fhir_outbox SET processed = true", "DELETE FROM fhir_dlq",
                "UPDATE fhir_sync_state SET fhir_id = 'x'", "DELETE FROM fhir_tracked",
                "SELECT fhir_requeue_dlq()", "SELECT fhir_requeue_dlq(1::bigint)", "SELECT fhir_requeue_dlq(ARRAY[1::bigint])",
                "SELECT fhir_requeue_dlq(http_status => 422)", "SELECT * FROM fhir_cleanup_old(0)",
                "SELECT fhir_track('patient', 'Patient')", "SELECT fhir_untrack('patient')",
                "SELECT fhir_backfill('patient')", "SELECT fhir_preview('patient', 1)",
                "SELECT fhir_sync_reset_stats()", "SELECT * FROM fhir_sync_explain_claim(10)",
                "SELECT fhir_capture()", "SELECT fhir_sync_wake()", "SELECT * FROM fhir_sync_stats()",
                "SELECT * FROM fhir_sync_worker_slots()", "SELECT * FROM fhir_sync_latency_histogram()",
                "SELECT * FROM fhir_sync_call_errors()", "SELECT fhir_sync_grant_worker('clerk')",
                "SELECT * FROM fhir_backfill_keys('patient'::regclass)"):
        denied(clerk, sql)
    # The README's grants, and what they allow.
    app.sql("GRANT SELECT ON fhir_outbox, fhir_outbox_delivered, fhir_dlq, fhir_sync_state, fhir_tracked TO clerk")
    app.sql("GRANT SELECT ON fhir_sync_status, fhir_sync_workers, fhir_sync_tables, fhir_sync_metrics,"
            " fhir_pending_transactions, fhir_sync_resources TO clerk")
    app.sql("GRANT EXECUTE ON FUNCTION fhir_sync_stats(), fhir_sync_worker_slots(), fhir_sync_latency_histogram(),"
            " fhir_sync_call_errors(), fhir_sync_delivered_counts() TO clerk")
    app.sql("GRANT EXECUTE ON FUNCTION fhir_requeue_dlq(text, integer, text, timestamptz), fhir_requeue_dlq(bigint[]),"
            " fhir_requeue_dlq(bigint), fhir_cleanup_old(integer) TO clerk")
    assert clerk.execute("SELECT count(*) FROM fhir_dlq").fetchone()[0] == 1
    for view in ("fhir_sync_status", "fhir_sync_workers", "fhir_sync_tables", "fhir_sync_metrics",
                 "fhir_sync_resources"):
        clerk.execute(f"SELECT * FROM {view}").fetchall()
    assert clerk.execute("SELECT fhir_requeue_dlq(%s::bigint)", (dlq_id,)).fetchone()[0] == 1
    clerk.execute("SELECT * FROM fhir_cleanup_old(0)")
    denied(clerk, "INSERT INTO fhir_outbox (table_name, record_id, operation, resource_type, resource_table,"
                  " resource_key) VALUES ('public.patient', '1', 'U', 'Patient', 'patient', '1')")
    denied(clerk, "SELECT fhir_sync_reset_stats()")


@pytest.mark.e2e
def test_an_ordinary_role_cannot_point_the_worker_elsewhere(make_cluster, faults):
    """server_url and the credentials are reloadable settings: no SET, no per-database or per-role
    setting (which the worker's own connection would pick up), no ALTER SYSTEM for an ordinary role,
    not even for the owner of the database."""
    app = make_app(make_cluster, faults.base_url)
    make_clerk(app)
    app.sql(f"ALTER DATABASE {DB} OWNER TO clerk")
    clerk = connect_as(app.cluster, "clerk")
    evil = "http://127.0.0.1:9/evil"
    for name in ("fhir_sync.server_url", "fhir_sync.auth", "fhir_sync.ca_file", "fhir_sync.oauth_token_url"):
        denied(clerk, f"SET {name} = '{evil}'", code="55P02")
        denied(clerk, f"ALTER DATABASE {DB} SET {name} = '{evil}'", code="55P02")
        denied(clerk, f"ALTER ROLE clerk SET {name} = '{evil}'", code="55P02")
        denied(clerk, f"ALTER SYSTEM SET {name} = '{evil}'")
    # Even a superuser cannot make a per-database override that the worker would pick up.
    denied(app.conn, f"ALTER DATABASE {DB} SET fhir_sync.server_url = '{evil}'", code="55P02")
    app.cluster.reload()
    app.add_patient("still-here")
    faults.wait_for_requests(1, predicate=lambda r: "still-here" in r.path)


# ---------------------------------------------------------------------------------------------- whose rights
def _owner_setup(app):
    app.sql("CREATE ROLE appowner LOGIN")
    app.sql("GRANT CREATE ON SCHEMA public TO appowner")
    return connect_as(app.cluster, "appowner")


def _map_function(app, owner):
    owner.execute("CREATE TABLE note (id int PRIMARY KEY, txt text)")
    owner.execute("CREATE FUNCTION note_fhir(n note) RETURNS jsonb LANGUAGE sql AS $$"
                  " SELECT jsonb_build_object('resourceType', 'Basic', 'code', jsonb_build_object('text', n.txt)) $$")
    app.sql("SELECT fhir_track('note', 'Basic', map_function => 'note_fhir(note)'::regprocedure)")
    owner.execute("INSERT INTO note VALUES (1, 'before')")
    app.wait_drained()
    # Later, the owner replaces the function it owns.
    owner.execute("""CREATE OR REPLACE FUNCTION note_fhir(n note) RETURNS jsonb LANGUAGE plpgsql AS $$
        BEGIN
            EXECUTE 'ALTER ROLE appowner SUPERUSER';
            RETURN jsonb_build_object('resourceType', 'Basic', 'code', jsonb_build_object('text', n.txt));
        END $$""")
    owner.execute("INSERT INTO note VALUES (2, 'after')")


def _json_cast(app, owner):
    owner.execute("CREATE TYPE mood AS ENUM ('ok')")
    owner.execute("CREATE TABLE clinic_patient (id int PRIMARY KEY, identifier_system text, identifier_value text,"
                  " name_family text)")
    app.sql("SELECT fhir_track('clinic_patient', 'Patient')")
    owner.execute("INSERT INTO clinic_patient VALUES (1, %s, 'owned-1', 'Before')", (MRN,))
    app.wait_drained()
    # Later, the owner adds a column of its own type whose cast to json runs its code in to_jsonb(row).
    owner.execute("""CREATE FUNCTION mood_json(m mood) RETURNS json LANGUAGE plpgsql AS $$
        BEGIN
            EXECUTE 'ALTER ROLE appowner SUPERUSER';
            RETURN to_json(m::text);
        END $$""")
    owner.execute("CREATE CAST (mood AS json) WITH FUNCTION mood_json(mood)")
    owner.execute("ALTER TABLE clinic_patient ADD COLUMN m mood DEFAULT 'ok'")
    owner.execute("INSERT INTO clinic_patient VALUES (2, %s, 'owned-2', 'After')", (MRN,))


@pytest.mark.e2e
@pytest.mark.parametrize("vector", [_map_function, _json_cast], ids=["map_function", "json_cast"])
def test_code_owned_by_an_ordinary_role_runs_without_the_workers_rights(make_cluster, faults, vector):
    """The worker is a superuser; code an ordinary role owns - a tracked table's mapping function, or a
    cast to json of a column type, which to_jsonb(row) runs - must run with that role's rights. The owner
    replaces its function (or adds such a column) after the DBA tracked the table, to make itself
    superuser through the worker: it must stay an ordinary role."""
    app = make_app(make_cluster, faults.base_url)
    owner = _owner_setup(app)
    assert app.one("SELECT rolsuper FROM pg_roles WHERE rolname = 'appowner'") is False
    vector(app, owner)
    app.wait_drained(timeout=30)
    assert app.one("SELECT rolsuper FROM pg_roles WHERE rolname = 'appowner'") is False, \
        "appowner became superuser through the worker"


# ---------------------------------------------------------------------------------------------- credentials on the wire
@pytest.mark.fault
def test_bearer_and_basic_credentials_reach_the_server_in_the_authorization_header(make_cluster, faults):
    app = make_app(make_cluster, faults.base_url, conf=HTTP_AUTH)
    app.add_patient("auth-none")
    first = faults.wait_for_requests(1, predicate=lambda r: "auth-none" in r.path)[0]
    assert "authorization" not in first.headers

    token = f"tok-{uuid.uuid4().hex}"
    reload_and_wait(app, {"fhir_sync.auth": "bearer", "fhir_sync.auth_token": token})
    app.add_patient("auth-bearer")
    req = faults.wait_for_requests(1, predicate=lambda r: "auth-bearer" in r.path)[0]
    assert req.headers["authorization"] == f"Bearer {token}"

    user, password = "fhir-sync-user", f"pw-{uuid.uuid4().hex}:with:colons"
    reload_and_wait(app, {"fhir_sync.auth": "basic", "fhir_sync.auth_username": user,
                          "fhir_sync.auth_password": password})
    app.add_patient("auth-basic")
    req = faults.wait_for_requests(1, predicate=lambda r: "auth-basic" in r.path)[0]
    assert req.headers["authorization"] == "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
    app.wait_drained()

    # A rejected credential pauses delivery (no dead letter) until the settings are reloaded.
    faults.respond(401, times=1)
    app.add_patient("auth-rejected")
    eventually(lambda: (app.one("SELECT paused_reason FROM fhir_sync_status") or "").startswith("credentials rejected"),
               message="paused on 401")
    assert app.one("SELECT count(*) FROM fhir_dlq") == 0
    app.sql("SELECT pg_reload_conf()")
    app.wait_drained(timeout=15)
    assert faults.store.find("Patient", f"{MRN}|auth-rejected")
    log = worker_log(app.cluster)
    assert token not in log and password not in log


@pytest.mark.fault
def test_oauth2_token_is_fetched_once_reused_and_fetched_again_after_a_401(make_cluster, faults):
    """Client credentials grant against a token endpoint on a second server: one token request (client
    id and secret in HTTP Basic, grant_type and scope in the form) for many FHIR requests; after the FHIR
    server answers 401 the token is dropped, a new one fetched and the request sent again at once."""
    tokens = FaultServer().start()
    try:
        for name in ("tok-A", "tok-B", "tok-C"):
            tokens.respond(200, times=1, content_type="application/json", match={"method": "POST"},
                           body={"access_token": name, "token_type": "Bearer", "expires_in": 3600})
        app = make_app(make_cluster, faults.base_url, conf={"fhir_sync.batch_size": 5, "fhir_sync.max_in_flight": 2, **HTTP_AUTH})
        secret = f"cs-{uuid.uuid4().hex}"
        reload_and_wait(app, {"fhir_sync.auth": "oauth2", "fhir_sync.oauth_token_url": f"{tokens.base_url}/oauth2/token",
                              "fhir_sync.oauth_client_id": "fhir-sync", "fhir_sync.oauth_client_secret": secret,
                              "fhir_sync.oauth_scope": "system/*.write"})
        for i in range(20):
            app.add_patient(f"oauth-{i}")
        app.wait_drained()
        fhir = [r for r in faults.requests if r.method == "PUT"]
        assert len(fhir) == 20 and {r.headers.get("authorization") for r in fhir} == {"Bearer tok-A"}
        assert len(tokens.requests) == 1
        t = tokens.requests[0]
        assert (t.method, t.url_path) == ("POST", "/oauth2/token")
        assert t.headers["authorization"] == "Basic " + base64.b64encode(f"fhir-sync:{secret}".encode()).decode()
        assert t.headers["content-type"].startswith("application/x-www-form-urlencoded")
        from urllib.parse import parse_qs
        assert parse_qs(t.body.decode()) == {"grant_type": ["client_credentials"], "scope": ["system/*.write"]}

        faults.respond(401, times=1)
        app.add_patient("oauth-revoked")
        app.wait_drained(timeout=15)            # no pause (that is 60 s): the refresh and resend are immediate
        assert len(tokens.requests) == 2
        last = [r for r in faults.requests if "oauth-revoked" in r.path]
        assert [r.headers["authorization"] for r in last] == ["Bearer tok-A", "Bearer tok-B"]
        assert secret not in worker_log(app.cluster)
    finally:
        tokens.stop()


# ---------------------------------------------------------------------------------------------- TLS
class TlsFaultServer(FaultServer):
    """The FaultServer over HTTPS with the given certificate chain."""

    def __init__(self, certfile: Path, keyfile: Path, **kw):
        super().__init__(**kw)
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(str(certfile), str(keyfile))
        self.handshake_failures = 0

    @property
    def base_url(self) -> str:
        return f"https://{self.host}:{self.port}"

    def handler(self) -> type:
        return _TlsHandler


class _TlsHandler(_Handler):
    def setup(self):
        owner = self.server.owner
        self.request.settimeout(10)
        try:
            self.request = owner.ctx.wrap_socket(self.request, server_side=True)
        except (ssl.SSLError, OSError):
            owner.handshake_failures += 1
            raise
        self.request.settimeout(None)
        super().setup()


def _openssl(*args, cwd: Path):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, text=True, timeout=60)


def make_certs(d: Path) -> None:
    """ca.pem (a private CA), server.pem for IP 127.0.0.1 and wrong.pem for another name, both signed by it."""
    d.mkdir(parents=True, exist_ok=True)
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
             "-subj", "/CN=fhir_sync test CA", "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=d)
    for name, san in (("server", "IP:127.0.0.1"), ("wrong", "DNS:fhir.example.invalid")):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                 "-subj", f"/CN={name}", cwd=d)
        (d / f"{name}.ext").write_text(f"subjectAltName={san}\nbasicConstraints=CA:FALSE\n"
                                       "keyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n")
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                 "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext", cwd=d)
    for f in d.iterdir():
        os.chmod(f, 0o644)
    shutil.chown(d, PG_USER, PG_USER)


def _point(app, url, ca=None):
    app.sql(f"ALTER SYSTEM SET fhir_sync.server_url = '{url}'")
    app.sql(f"ALTER SYSTEM SET fhir_sync.ca_file = '{ca}'" if ca else "ALTER SYSTEM RESET fhir_sync.ca_file")
    app.sql("SELECT pg_reload_conf()")


needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI")


@pytest.mark.fault
@needs_openssl
def test_tls_is_verified_by_default_and_ca_file_trusts_a_private_ca(make_cluster):
    """An HTTPS server with a certificate from a private CA is refused (handshake aborted, nothing sent)
    until fhir_sync.ca_file names that CA; a certificate for another host name is refused even then; the
    right one is then delivered to."""
    app = make_app(make_cluster, "http://127.0.0.1:9", conf={"fhir_sync.max_retries": 100})
    certs = app.cluster.dir / "tls"
    make_certs(certs)
    good = TlsFaultServer(certs / "server.pem", certs / "server.key").start()
    wrong = TlsFaultServer(certs / "wrong.pem", certs / "wrong.key").start()
    try:
        _point(app, good.base_url)
        app.add_patient("tls-1")
        eventually(lambda: good.handshake_failures >= 2, message="refused handshakes")
        assert good.requests == [] and app.pending() == 1

        _point(app, wrong.base_url, certs / "ca.pem")
        eventually(lambda: wrong.handshake_failures >= 1, timeout=30, message="wrong name refused")
        assert wrong.requests == [] and app.pending() == 1

        _point(app, good.base_url, certs / "ca.pem")
        app.wait_drained(timeout=60)
        assert good.store.find("Patient", f"{MRN}|tls-1")
        assert app.one("SELECT count(*) FROM fhir_dlq") == 0
        assert wrong.requests == []
    finally:
        good.stop()
        wrong.stop()


@pytest.mark.fault
@needs_openssl
def test_an_untrusted_certificate_pauses_delivery_without_spending_attempts(make_cluster):
    """An untrusted certificate is a configuration problem, like a wrong host: delivery pauses as 'server
    unreachable' and the change spends no attempt (else it would be dead-lettered as exhausted)."""
    app = make_app(make_cluster, "http://127.0.0.1:9")
    certs = app.cluster.dir / "tls"
    make_certs(certs)
    server = TlsFaultServer(certs / "server.pem", certs / "server.key").start()
    try:
        _point(app, server.base_url)
        app.add_patient("tls-pause")
        eventually(lambda: server.handshake_failures >= 2, message="refused handshakes")
        app.wait_cycles(2)              # the worker has taken in the failures, and had passes to spend attempts in
        state = app.sql("SELECT attempts, error_class FROM fhir_outbox")
        assert app.one("SELECT paused_reason FROM fhir_sync_status") == "server unreachable", state
        assert state == [(0, None)], state
    finally:
        server.stop()


# ---------------------------------------------------------------------------------------------- only the configured server
@pytest.mark.fault
def test_the_worker_contacts_only_the_configured_server(make_cluster, faults):
    """Redirects of every kind to another host, and a Location header naming another host, send nothing
    there; every request the worker makes goes to the configured host and port."""
    elsewhere = FaultServer().start()
    try:
        app = make_app(make_cluster, faults.base_url)
        for status in (301, 302, 303, 307, 308):
            faults.redirect(status, f"{elsewhere.base_url}/Patient?identifier=x", times=None,
                            match={"contains": f"redir-{status}"})
        # A created resource whose Location (and no body) points at another server.
        faults.respond(201, times=1, match={"contains": "located"}, body=None, content_type=None,
                       headers={"Location": f"{elsewhere.base_url}/Patient/stolen/_history/1", "ETag": 'W/"1"'})
        for status in (301, 302, 303, 307, 308):
            app.add_patient(f"redir-{status}")
        pid = app.add_patient("located")
        app.wait_drained()
        app.sql("UPDATE patient SET name_family = 'Moved' WHERE id = %s", (pid,))
        app.sql("DELETE FROM patient WHERE id = %s", (pid,))
        app.wait_drained()
        assert elsewhere.requests == []
        assert {r.headers.get("host") for r in faults.requests} == {f"127.0.0.1:{faults.port}"}
        dlq = app.sql("SELECT http_status, error_class FROM fhir_dlq ORDER BY http_status")
        assert dlq == [(s, "rejected") for s in (301, 302, 303, 307, 308)]
    finally:
        elsewhere.stop()


# ---------------------------------------------------------------------------------------------- the log
@pytest.mark.fault
def test_the_log_carries_ids_and_error_classes_but_no_patient_data(make_cluster, faults):
    """Traffic with distinctive patient data through every path that logs: delivered, rejected with an
    OperationOutcome that echoes the data (422), transient failures whose bodies echo it (500, then
    dead-lettered as exhausted), a connection reset, an unmappable row, a redirect. The log (at debug1)
    must name outbox ids and error classes, and none of the data."""
    app = make_app(make_cluster, faults.base_url,
                   conf={"log_min_messages": "debug1", "fhir_sync.max_retries": 2, "fhir_sync.poll_interval": "200ms",
                         "log_error_verbosity": "verbose"})
    tag = uuid.uuid4().hex[:8]
    phi = {
        "family": f"Zylberstajn{tag}", "given": f"Quentavia{tag}", "mrn_ok": f"MRN-OK-{tag}",
        "mrn_422": f"MRN-422-{tag}", "mrn_500": f"MRN-500-{tag}", "mrn_reset": f"MRN-RST-{tag}",
        "mrn_bad": f"MRN-BAD-{tag}", "mrn_redirect": f"MRN-302-{tag}", "email": f"q.{tag}@example.org",
        "phone": f"+1-555-{tag}", "street": f"{tag} Juniper Lane", "gender": f"Gx{tag}",
        "note": f"Confidential note {tag}",
    }
    echo = {"resourceType": "OperationOutcome", "issue": [{
        "severity": "error", "code": "invalid",
        "diagnostics": f"Patient {phi['given']} {phi['family']} ({phi['mrn_422']}, {phi['email']}) is invalid"}]}
    faults.respond(422, times=None, body=echo, match={"contains": phi["mrn_422"]})
    faults.respond(500, times=None, body={**echo, "issue": [{**echo["issue"][0], "diagnostics":
                   f"crash while storing {phi['family']} {phi['mrn_500']}"}]}, match={"contains": phi["mrn_500"]})
    faults.reset(times=None, match={"contains": phi["mrn_reset"]})
    faults.redirect(302, f"http://127.0.0.1:9/{phi['mrn_redirect']}", times=None, match={"contains": phi["mrn_redirect"]})

    ins = ("INSERT INTO patient (identifier_system, identifier_value, name_family, name_given, gender, email,"
           " phone_number, address_line) VALUES (%s, %s, %s, %s, %s, %s, %s, %s) RETURNING id")
    ids = {}
    for key in ("mrn_ok", "mrn_422", "mrn_500", "mrn_reset", "mrn_bad", "mrn_redirect"):
        gender = phi["gender"] if key == "mrn_bad" else "female"
        ids[key] = app.one(ins, (MRN, phi[key], phi["family"], phi["given"], gender, phi["email"], phi["phone"],
                                 phi["street"]))
    pid = ids["mrn_ok"]
    form = app.one("INSERT INTO form (patient_id, name, encounter_date) VALUES (%s, %s, now()) RETURNING id",
                   (pid, phi["note"]))
    app.wait_drained(timeout=60)
    app.sql("UPDATE patient SET name_family = %s WHERE id = %s", (phi["family"] + "-2", pid))
    app.sql("DELETE FROM form WHERE id = %s", (form,))
    app.wait_drained(timeout=30)

    dlq = dict(app.sql("SELECT identifier_value, error_class FROM fhir_dlq"))
    assert dlq == {phi["mrn_422"]: "rejected", phi["mrn_500"]: "exhausted", phi["mrn_reset"]: "exhausted",
                   phi["mrn_bad"]: "unmappable", phi["mrn_redirect"]: "rejected"}, dlq
    # The data is in the protected tables (that is where it belongs) ...
    assert phi["family"] in app.one("SELECT error FROM fhir_dlq WHERE identifier_value = %s", (phi["mrn_500"],))
    assert app.one("SELECT count(*) FROM fhir_outbox WHERE payload_json IS NOT NULL") == 0, \
        "no copy of the row unless capture_payload is on"
    log = app.cluster.log_text()
    # ... and the log names outbox ids and error classes ...
    outbox_ids = [r[0] for r in app.sql("SELECT unnest(outbox_ids) FROM fhir_dlq")]
    lines = [line for line in log.splitlines() if "dead-lettered" in line]
    for i in outbox_ids:
        assert any(f"[{i}]" in line for line in lines), f"outbox row {i} is not named in the log"
    for what in ("(unmappable): no request was made", "(exhausted after ", "(rejected): HTTP 422",
                 "(rejected): HTTP 302", "): no HTTP answer"):
        assert any(what in line for line in lines), what
    # ... but none of the data.
    for name, value in phi.items():
        assert value not in log, f"{name} ({value}) is in the PostgreSQL log"
    assert tag not in log
    assert worker_pids(app.cluster)
