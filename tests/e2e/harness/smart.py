"""A SMART Backend Services authorization server and a FHIR server that accepts only its tokens.

The token endpoint checks a client assertion as an EHR does (SMART App Launch, Backend Services
§4.1; RFC 7523), with PyJWT on `cryptography`: the grant and assertion type, the signature against
the registered JWKS (the key chosen by `kid`, its `alg` RS384 or ES384), `aud` = the token URL,
`iss` = `sub` = the client id, `exp` at most five minutes ahead, and a `jti` it has not seen (a
replayed assertion is refused). What it accepted and what it refused, with the reason, is recorded.
"""
from __future__ import annotations

import json
import secrets
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs

import jwt

from .faults import FaultServer, _Resp

ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
ALGORITHMS = ("RS384", "ES384")


class SmartAuthServer:
    def __init__(self, client_id: str, expires_in: int = 300):
        self.client_id = client_id
        self.expires_in = expires_in
        self.jwks: dict = {"keys": []}
        self.accepted: list[tuple[dict, dict]] = []     # (header, claims) of each accepted assertion
        self.refused: list[str] = []
        self.scopes: list[str] = []
        self._issued: set[str] = set()
        self._seen_jti: set[str] = set()
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    # ------------------------------------------------------------------ what the EHR registered
    def register(self, jwks: dict) -> None:
        """The JWK Set the EHR knows for the client (what a DBA registered from fhir_sync_jwks())."""
        with self._lock:
            self.jwks = jwks

    def revoke_all(self) -> None:
        with self._lock:
            self._issued.clear()

    def valid(self, token: str) -> bool:
        with self._lock:
            return token in self._issued

    @property
    def token_url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}/auth/token"

    # ------------------------------------------------------------------ the endpoint
    def verify(self, form: dict) -> tuple[int, dict]:
        one = {k: v[0] for k, v in form.items()}
        if one.get("grant_type") != "client_credentials":
            return self._refuse("unsupported_grant_type", "grant_type is not client_credentials")
        if one.get("client_assertion_type") != ASSERTION_TYPE:
            return self._refuse("invalid_client", "client_assertion_type is not jwt-bearer")
        assertion = one.get("client_assertion", "")
        try:
            header = jwt.get_unverified_header(assertion)
        except jwt.PyJWTError as e:
            return self._refuse("invalid_client", f"unreadable assertion: {e}")
        alg, kid = header.get("alg"), header.get("kid")
        if alg not in ALGORITHMS:
            return self._refuse("invalid_client", f"alg {alg} is not RS384 or ES384")
        with self._lock:
            jwk = next((k for k in self.jwks.get("keys", []) if k.get("kid") == kid), None)
        if jwk is None:
            return self._refuse("invalid_client", f"kid {kid} is not in the registered JWKS")
        if jwk.get("alg") not in (None, alg):
            return self._refuse("invalid_client", f"kid {kid} is registered for {jwk.get('alg')}, not {alg}")
        try:
            key = jwt.PyJWK(jwk, algorithm=alg).key
            claims = jwt.decode(assertion, key=key, algorithms=[alg], audience=self.token_url,
                                issuer=self.client_id,
                                options={"require": ["exp", "iss", "sub", "aud", "jti"]})
        except jwt.PyJWTError as e:
            return self._refuse("invalid_client", f"assertion rejected: {type(e).__name__}: {e}")
        if claims["sub"] != self.client_id:
            return self._refuse("invalid_client", "sub is not the client id")
        if claims["exp"] > time.time() + 300 + 5:
            return self._refuse("invalid_client", "exp is more than five minutes ahead")
        with self._lock:
            if claims["jti"] in self._seen_jti:
                return self._refuse("invalid_client", "jti replayed")
            self._seen_jti.add(claims["jti"])
            token = "smart-" + secrets.token_hex(12)
            self._issued.add(token)
            self.accepted.append((header, claims))
            self.scopes.append(one.get("scope", ""))
        return 200, {"access_token": token, "token_type": "bearer", "expires_in": self.expires_in,
                     "scope": one.get("scope", "")}

    def _refuse(self, error: str, why: str) -> tuple[int, dict]:
        with self._lock:
            self.refused.append(why)
        return 400 if error != "invalid_client" else 401, {"error": error, "error_description": why}

    def start(self) -> "SmartAuthServer":
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if self.path != "/auth/token":
                    status, reply = 404, {"error": "not_found"}
                else:
                    status, reply = owner.verify(parse_qs(body.decode()))
                data = json.dumps(reply).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server:
            self._server.shutdown()
            self._server.server_close()


class SmartFhirServer(FaultServer):
    """The fault server's FHIR store behind SMART: `.well-known/smart-configuration` names the token
    endpoint; any other request needs a Bearer token the authorization server issued (401 otherwise)."""

    def __init__(self, auth: SmartAuthServer, **kw):
        super().__init__(**kw)
        self.auth = auth
        self.unauthorized = 0

    def handle_fhir(self, req) -> _Resp:
        if req.url_path == "/.well-known/smart-configuration":
            return _Resp(200, {"token_endpoint": self.auth.token_url,
                               "grant_types_supported": ["client_credentials"],
                               "token_endpoint_auth_methods_supported": ["private_key_jwt"],
                               "token_endpoint_auth_signing_alg_values_supported": list(ALGORITHMS)},
                         content_type="application/json")
        token = req.headers.get("authorization", "").removeprefix("Bearer ")
        if not self.auth.valid(token):
            self.unauthorized += 1
            return _Resp(401, {"resourceType": "OperationOutcome",
                               "issue": [{"severity": "error", "code": "login", "diagnostics": "invalid token"}]})
        return super().handle_fhir(req)
