#!/usr/bin/env python3
"""Azure Key Vault secrets: a CONTRACT STUB for keyturn's tests. This is not Azure.

No Key Vault emulator can be installed here, so this file implements, from the
public Key Vault REST reference (the secrets operations at api-version 7.5 and
2025-07-01, the version `azure_security_keyvault_secrets` 1.0 sends), the subset
of the API that keyturn's `azure_key_vault` vault uses through the Rust SDK:

  PUT    /secrets/{name}                  set secret (creates a new version)
  GET    /secrets/{name}[/]               get the latest version
  GET    /secrets/{name}/{version}        get one version
  GET    /secrets/{name}/versions         list versions (paged, nextLink)
  PATCH  /secrets/{name}/{version}        update attributes / tags of a version
  DELETE /secrets/{name}                  delete (soft delete: it moves to deletedsecrets)
  GET    /deletedsecrets/{name}           get a deleted secret
  DELETE /deletedsecrets/{name}           purge a deleted secret (204)

Behaviour copied from the service because the SDK or keyturn depends on it:
- Challenge auth: a request without `Authorization: Bearer` gets 401 with
  `WWW-Authenticate: Bearer authorization="...", resource="https://vault.azure.net"`;
  the SDK then gets a token for that resource and retries with the body. A wrong
  token gets 401 too. The only accepted token is `--token`.
- TLS only (the SDK refuses bearer auth over http): a CA and a server
  certificate for 127.0.0.1 / localhost are generated into --cert-dir; clients
  trust DIR/ca.pem.
- Secret names are [0-9a-zA-Z-]{1,127} and case-insensitive. "Latest" is the most
  recently created version. Getting a disabled version (or a latest that is
  disabled) is 403 Forbidden, innererror SecretDisabled. Updating tags replaces
  the whole tag set. Setting a secret that is soft-deleted is 409 Conflict.
- Error bodies are `{"error": {"code": ..., "message": ...}}`; 429 and 503
  carry `Retry-After` (seconds).

Not modelled: nbf/exp enforcement (the service does not enforce them for secrets
either), RBAC, the protected-body auth scheme, backup/restore, recover,
certificates-backed secrets, the real rate limits, persistence (state is memory).

Fault injection for tests (no auth; loopback only):
  POST /_stub/faults        {"status": 429|503, "count": N, "retry_after": S, "secret": NAME?,
                             "method": M?}
      the next N authenticated secret requests fail with that status.
  POST /_stub/drop_response {"count": N, "secret": NAME?, "method": M?, "body": TEXT?}
      the next N writes (PUT/PATCH/DELETE) are committed, then the connection is
      closed without an answer ("committed but the response was lost").
  POST /_stub/reset         forget every pending fault.
  GET  /_stub/requests?secret=NAME
      the log of requests for that secret (every one if no secret), oldest
      first: {"requests": [{"method", "secret", "status", "start", "end"}]},
      start/end in Unix seconds (arrival, answer sent); status 0 for a dropped
      answer. Never bodies, values or tokens. The last 100000 are kept.
  With "secret", a fault applies only to requests for that secret name, so tests
  running in parallel against one stub do not take each other's faults. With
  "method", only to requests with that HTTP method; with "body", only to writes
  whose request body contains TEXT (e.g. a tag value), so that a test can pick
  one of several writes to the same secret.
  GET  /healthz             200, for readiness probes.

Entra ID token endpoint, so the daemon can log in with a client secret
(`authority_host` pointed at this stub):
  POST /{tenant}/oauth2/v2.0/token   form: grant_type=client_credentials,
      client_id, client_secret, scope. Answers {"token_type": "Bearer",
      "expires_in": 3600, "access_token": --token} when client_id and
      client_secret equal --client-id / --client-secret; otherwise 401 with
      an Entra-shaped JSON error (invalid_client). Not modelled: certificates,
      assertions, scope validation beyond "present", tenant validation.

Usage: azure_keyvault_stub.py --host 127.0.0.1 --port PORT --cert-dir DIR [--token T]
                              [--client-id ID] [--client-secret SECRET]
Needs Python 3.11 and `cryptography`. Never logs a secret value or a token.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import ipaddress
import json
import os
import re
import ssl
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

NAME_RE = re.compile(r"^[0-9a-zA-Z-]{1,127}$")
PAGE_SIZE = 25  # the service's maximum page size for list operations
RECOVERY_LEVEL = "Recoverable+Purgeable"
RECOVERABLE_DAYS = 90


# --------------------------------------------------------------------------
# Certificates
# --------------------------------------------------------------------------

def make_certs(cert_dir: str) -> tuple[str, str]:
    """Writes ca.pem, server.pem, server-key.pem into cert_dir; returns (cert, key)."""
    os.makedirs(cert_dir, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    start = now - datetime.timedelta(hours=1)
    end = now + datetime.timedelta(days=30)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "keyturn test Key Vault stub CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(
            x509.SubjectAlternativeName([
                x509.DNSName("localhost"),
                x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
            ]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )

    pem = serialization.Encoding.PEM
    ca_path = os.path.join(cert_dir, "ca.pem")
    cert_path = os.path.join(cert_dir, "server.pem")
    key_path = os.path.join(cert_dir, "server-key.pem")
    with open(cert_path, "wb") as f:
        f.write(cert.public_bytes(pem))
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    # ca.pem last: a reader waiting for it finds the server files complete.
    tmp = ca_path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(ca_cert.public_bytes(pem))
    os.replace(tmp, ca_path)
    return cert_path, key_path


# --------------------------------------------------------------------------
# State
# --------------------------------------------------------------------------

class Version:
    def __init__(self, value, content_type, tags, enabled, nbf, exp):
        self.id = uuid.uuid4().hex
        self.value = value
        self.content_type = content_type
        self.tags = dict(tags or {})
        self.enabled = True if enabled is None else bool(enabled)
        self.nbf = nbf
        self.exp = exp
        self.created = int(time.time())
        self.updated = self.created


class Secret:
    def __init__(self, name):
        self.name = name  # as first written (the service keeps the original casing)
        self.versions: list[Version] = []  # creation order; the last is "latest"
        self.deleted_date = None


class State:
    def __init__(self):
        self.lock = threading.Lock()
        self.secrets: dict[str, Secret] = {}  # key: lowercased name
        self.deleted: dict[str, Secret] = {}
        # Pending faults, oldest first: dicts with status, remaining,
        # retry_after, secret (lowercased name or None for any secret).
        self.faults: list[dict] = []
        self.drops: list[dict] = []  # remaining, secret, method, body
        # (method, secret, status, start, end) of secret requests; see /_stub/requests.
        self.requests = collections.deque(maxlen=100000)


STATE = State()


def take(entries, target, method, body=b""):
    """Consumes one use of the first entry that applies to this request."""
    with STATE.lock:
        for e in entries:
            if (e["secret"] is None or e["secret"] == target) \
                    and (e.get("method") is None or e["method"] == method) \
                    and (e.get("body") is None or e["body"] in body):
                e["remaining"] -= 1
                if e["remaining"] <= 0:
                    entries.remove(e)
                return e
    return None


class Reply(Exception):
    """An HTTP error answer in the service's error shape."""

    def __init__(self, status, code, message, inner=None, headers=None):
        super().__init__(message)
        self.status = status
        self.body = {"error": {"code": code, "message": message}}
        if inner:
            self.body["error"]["innererror"] = {"code": inner}
        self.headers = headers or {}


# --------------------------------------------------------------------------
# HTTP
# --------------------------------------------------------------------------

class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "keyturn-keyvault-stub"
    sys_version = ""
    timeout = 30  # a stuck client must not hold a thread forever

    def setup(self):
        super().setup()
        # The listening socket does not handshake on accept (that would run in
        # the accept loop); do it here, in this connection's own thread.
        self.request.do_handshake()

    # ---- plumbing ---------------------------------------------------------

    def log_message(self, fmt, *args):  # paths only; never bodies or headers
        sys.stderr.write("keyvault-stub: %s\n" % (fmt % args))

    def _read_body(self):
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def _send(self, status, body=None, headers=None):
        data = b"" if body is None else json.dumps(body).encode()
        self.send_response(status)
        if body is not None:
            self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("x-ms-keyvault-service-version", "stub")
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if data:
            self.wfile.write(data)

    def _base(self):
        host = self.headers.get("Host") or "%s:%d" % self.server.server_address[:2]
        return "https://" + host

    def do_GET(self):
        self._dispatch("GET")

    def do_PUT(self):
        self._dispatch("PUT")

    def do_PATCH(self):
        self._dispatch("PATCH")

    def do_DELETE(self):
        self._dispatch("DELETE")

    def do_POST(self):
        self._dispatch("POST")

    def _dispatch(self, method):
        start = time.time()
        raw = self._read_body()  # always drain it, or keep-alive desyncs
        url = urlsplit(self.path)
        query = parse_qs(url.query)
        logged = None
        parts = [p for p in url.path.split("/")]
        # "/secrets/x/" (the SDK's "latest") splits into ['', 'secrets', 'x', '']
        if parts and parts[0] == "":
            parts = parts[1:]
        if parts and parts[-1] == "":
            parts = parts[:-1]
        try:
            if method == "GET" and parts == ["healthz"]:
                return self._send(200, {"status": "ok"})
            if method == "GET" and parts == ["_stub", "requests"]:
                return self._requests(query)
            if len(parts) == 2 and parts[0] == "_stub" and method == "POST":
                return self._control(parts[1], raw)
            if method == "POST" and len(parts) == 4 and parts[1:] == ["oauth2", "v2.0", "token"]:
                return self._token(raw)
            if not parts or parts[0] not in ("secrets", "deletedsecrets"):
                raise Reply(404, "NotFound", "no such route in the Key Vault stub")
            target = parts[1].lower() if len(parts) > 1 else None
            # Logged from here on (401 challenges included): a test measures
            # the gaps between a client's requests for one secret.
            logged = (method, target, start)
            self._authorize()
            if "api-version" not in query:
                raise Reply(400, "BadParameter", "The api-version parameter is missing")
            self._maybe_fault(target, method)
            is_write = method in ("PUT", "PATCH", "DELETE")
            status, body = self._route(method, parts, query, raw)
            drop = is_write and take(STATE.drops, target, method, raw) is not None
            if drop:
                # Committed above; now lose the answer like a dead load balancer.
                self.close_connection = True
                self.log_message("%s %s committed; response dropped", method, url.path)
                self._record(logged, 0)
                return
            self._send(status, body)
            self._record(logged, status)
        except Reply as r:
            self._send(r.status, r.body, r.headers)
            self._record(logged, r.status)
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            self._send(400, {"error": {"code": "BadParameter", "message": "bad request: %s" % type(e).__name__}})
            self._record(logged, 400)

    def _record(self, logged, status):
        if logged is not None:
            method, target, start = logged
            with STATE.lock:  # /_stub/requests iterates under the lock
                STATE.requests.append((method, target, status, start, time.time()))

    def _requests(self, query):
        secret = (query.get("secret") or [None])[0]
        secret = secret.lower() if secret else None
        with STATE.lock:
            rows = [r for r in STATE.requests if secret is None or r[1] == secret]
        self._send(200, {"requests": [
            {"method": m, "secret": t, "status": st, "start": a, "end": b} for m, t, st, a, b in rows
        ]})

    def _control(self, what, raw):
        req = json.loads(raw or b"{}")
        with STATE.lock:
            secret = req.get("secret")
            secret = secret.lower() if isinstance(secret, str) else None
            method = req.get("method")
            method = method.upper() if isinstance(method, str) else None
            body = req.get("body")
            body = body.encode() if isinstance(body, str) else None
            if what == "faults":
                status = int(req["status"])
                if status not in (429, 500, 502, 503, 504):
                    raise Reply(400, "BadParameter", "status must be 429 or 5xx")
                STATE.faults.append({"status": status, "remaining": int(req.get("count", 1)),
                                     "retry_after": int(req.get("retry_after", 1)), "secret": secret,
                                     "method": method})
            elif what == "drop_response":
                STATE.drops.append({"remaining": int(req.get("count", 1)), "secret": secret,
                                    "method": method, "body": body})
            elif what == "reset":
                STATE.faults.clear()
                STATE.drops.clear()
            else:
                raise Reply(404, "NotFound", "unknown control endpoint")
        self._send(200, {"ok": True})

    def _token(self, raw):
        """Entra ID's client-credentials grant (form-encoded, like the service)."""
        form = parse_qs(raw.decode("utf-8", "replace"))
        one = lambda k: (form.get(k) or [""])[0]
        if one("grant_type") != "client_credentials" or not one("scope"):
            return self._send(400, {"error": "invalid_request",
                                    "error_description": "AADSTS900144: grant_type=client_credentials and scope are required."})
        if one("client_id") != self.server.client_id or one("client_secret") != self.server.client_secret:
            # Never echo what was sent: the client secret is a secret.
            return self._send(401, {"error": "invalid_client",
                                    "error_description": "AADSTS7000215: Invalid client secret provided.",
                                    "error_codes": [7000215]})
        self._send(200, {"token_type": "Bearer", "expires_in": 3600, "ext_expires_in": 3600,
                         "access_token": self.server.token})

    def _authorize(self):
        auth = self.headers.get("Authorization")
        challenge = {
            "WWW-Authenticate": 'Bearer authorization="https://login.microsoftonline.com/'
            '00000000-0000-0000-0000-000000000000", resource="https://vault.azure.net"'
        }
        if auth is None:
            raise Reply(401, "Unauthorized", "AKV10000: Request is missing a Bearer or PoP token.",
                        headers=challenge)
        if auth != "Bearer " + self.server.token:
            raise Reply(401, "Unauthorized", "AKV10032: Invalid issuer or token.", headers=challenge)

    def _maybe_fault(self, target, method):
        fault = take(STATE.faults, target, method)
        if fault is None:
            return
        status, retry_after = fault["status"], fault["retry_after"]
        if status == 429:
            raise Reply(429, "Throttled",
                        "Request was not processed because too many requests were received.",
                        headers={"Retry-After": str(retry_after)})
        raise Reply(status, "ServiceUnavailable", "The service is temporarily unavailable.",
                    headers={"Retry-After": str(retry_after)})

    # ---- the secrets API ----------------------------------------------------

    def _route(self, method, parts, query, raw):
        kind, name, rest = parts[0], parts[1] if len(parts) > 1 else None, parts[2:]
        if name is None or not NAME_RE.match(name):
            raise Reply(400, "BadParameter", "Secret name is invalid: it must match ^[0-9a-zA-Z-]+$ (1-127)")
        key = name.lower()
        with STATE.lock:
            if kind == "deletedsecrets":
                if rest:
                    raise Reply(404, "NotFound", "no such route in the Key Vault stub")
                return self._deleted(method, key, name)
            if method == "PUT" and not rest:
                return self._set(key, name, json.loads(raw or b"{}"))
            if method == "DELETE" and not rest:
                return self._delete(key, name)
            if method == "GET" and rest == ["versions"]:
                return self._list_versions(key, name, query)
            if method in ("GET", "PATCH") and len(rest) <= 1:
                secret = self._secret(key, name)
                version = self._version(secret, rest[0] if rest else None)
                if method == "GET":
                    if not version.enabled:
                        raise Reply(403, "Forbidden", "Operation get is not allowed on a disabled secret.",
                                    inner="SecretDisabled")
                    return 200, self._bundle(secret, version, with_value=True)
                return 200, self._update(secret, version, json.loads(raw or b"{}"))
        raise Reply(405, "MethodNotAllowed", "method not allowed on this route")

    def _secret(self, key, name):
        secret = STATE.secrets.get(key)
        if secret is None:
            raise Reply(404, "SecretNotFound", "A secret with (name/id) %s was not found in this key vault." % name)
        return secret

    def _version(self, secret, version_id):
        if version_id is None:
            if not secret.versions:
                raise Reply(404, "SecretNotFound", "secret %s has no versions" % secret.name)
            return secret.versions[-1]
        for v in secret.versions:
            if v.id == version_id.lower():
                return v
        raise Reply(404, "SecretNotFound",
                    "A secret with (name/id) %s/%s was not found in this key vault." % (secret.name, version_id))

    def _attrs(self, v):
        a = {
            "enabled": v.enabled,
            "created": v.created,
            "updated": v.updated,
            "recoveryLevel": RECOVERY_LEVEL,
            "recoverableDays": RECOVERABLE_DAYS,
        }
        if v.nbf is not None:
            a["nbf"] = v.nbf
        if v.exp is not None:
            a["exp"] = v.exp
        return a

    def _bundle(self, secret, v, with_value):
        b = {
            "id": "%s/secrets/%s/%s" % (self._base(), secret.name, v.id),
            "attributes": self._attrs(v),
            "tags": dict(v.tags),
        }
        if v.content_type is not None:
            b["contentType"] = v.content_type
        if with_value:
            b["value"] = v.value
        return b

    def _set(self, key, name, req):
        if key in STATE.deleted:
            raise Reply(409, "Conflict",
                        "Secret %s is currently in a deleted but recoverable state, and its name cannot "
                        "be reused; in this state, the secret can only be recovered or purged." % name)
        value = req.get("value")
        if not isinstance(value, str):
            raise Reply(400, "BadParameter", "Property value is required")
        tags = req.get("tags") or {}
        if len(tags) > 15:
            raise Reply(400, "BadParameter", "too many tags (at most 15)")
        attrs = req.get("attributes") or {}
        secret = STATE.secrets.setdefault(key, Secret(name))
        v = Version(value, req.get("contentType"), tags, attrs.get("enabled"), attrs.get("nbf"), attrs.get("exp"))
        secret.versions.append(v)
        return 200, self._bundle(secret, v, with_value=True)

    def _update(self, secret, v, req):
        attrs = req.get("attributes") or {}
        if "enabled" in attrs and attrs["enabled"] is not None:
            v.enabled = bool(attrs["enabled"])
        if "nbf" in attrs:
            v.nbf = attrs["nbf"]
        if "exp" in attrs:
            v.exp = attrs["exp"]
        if req.get("tags") is not None:
            if len(req["tags"]) > 15:
                raise Reply(400, "BadParameter", "too many tags (at most 15)")
            v.tags = dict(req["tags"])
        if req.get("contentType") is not None:
            v.content_type = req["contentType"]
        v.updated = int(time.time())
        return self._bundle(secret, v, with_value=False)

    def _list_versions(self, key, name, query):
        secret = STATE.secrets.get(key)
        versions = secret.versions if secret else []
        try:
            size = min(int(query.get("maxresults", [PAGE_SIZE])[0]), PAGE_SIZE)
            start = int(query.get("$skiptoken", ["0"])[0])
        except ValueError:
            raise Reply(400, "BadParameter", "maxresults and $skiptoken must be integers")
        size = max(size, 1)
        page = versions[start:start + size]
        body = {"value": [self._bundle(secret, v, with_value=False) for v in page], "nextLink": None}
        if start + size < len(versions):
            body["nextLink"] = "%s/secrets/%s/versions?api-version=7.5&maxresults=%d&$skiptoken=%d" % (
                self._base(), name, size, start + size)
        return 200, body

    def _deleted_bundle(self, secret):
        latest = secret.versions[-1]
        b = self._bundle(secret, latest, with_value=False)
        b["recoveryId"] = "%s/deletedsecrets/%s" % (self._base(), secret.name)
        b["deletedDate"] = secret.deleted_date
        b["scheduledPurgeDate"] = secret.deleted_date + RECOVERABLE_DAYS * 86400
        return b

    def _delete(self, key, name):
        secret = self._secret(key, name)
        del STATE.secrets[key]
        secret.deleted_date = int(time.time())
        STATE.deleted[key] = secret
        return 200, self._deleted_bundle(secret)

    def _deleted(self, method, key, name):
        secret = STATE.deleted.get(key)
        if secret is None:
            raise Reply(404, "SecretNotFound", "Deleted Secret not found: %s" % name)
        if method == "GET":
            return 200, self._deleted_bundle(secret)
        if method == "DELETE":
            del STATE.deleted[key]
            return 204, None
        raise Reply(405, "MethodNotAllowed", "method not allowed on this route")


class Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--cert-dir", required=True)
    ap.add_argument("--token", default="keyturn-test-token")
    ap.add_argument("--client-id", default="keyturn-test-client")
    ap.add_argument("--client-secret", default="keyturn-test-secret")
    args = ap.parse_args()

    cert, key = make_certs(args.cert_dir)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    httpd = Server((args.host, args.port), Handler)
    httpd.token = args.token
    httpd.client_id = args.client_id
    httpd.client_secret = args.client_secret
    httpd.socket = ctx.wrap_socket(httpd.socket, server_side=True, do_handshake_on_connect=False)
    sys.stderr.write("keyvault-stub: listening on https://%s:%d (CA %s)\n"
                     % (args.host, args.port, os.path.join(args.cert_dir, "ca.pem")))
    sys.stderr.flush()
    try:
        httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        httpd.server_close()


if __name__ == "__main__":
    main()
