#!/usr/bin/env python3
"""A reference receiver for keyturn's `webhook` sink (Python standard library only).

keyturn POSTs a JSON notice of each new version with the header

    Keyturn-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(key, "<t>.<body>")>

`verify()` below is what every receiver must do before trusting a notice:
recompute the HMAC over the exact bytes received, compare in constant time,
and refuse a timestamp more than TOLERANCE (5 minutes) from now, so that a
captured request cannot be replayed later. Copy it into your agent.

Run it:

    python3 examples/webhook_receiver.py --key-file /etc/keyturn/hook.key --port 8080

It answers 204 to a notice that verifies (keyturn counts a 2xx as the
agent's acknowledgement) and 400 to one that does not, and prints one JSON
line per request on stdout. Notices carry `Idempotency-Key` (the rotation
id): a retried delivery repeats it, and a receiver acts on it once.
"""

import argparse
import hashlib
import hmac
import json
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

TOLERANCE = 300  # seconds
MAX_BODY = 1 << 20


class BadSignature(Exception):
    pass


def verify(key: bytes, header: str, body: bytes, now: float = None, tolerance: int = TOLERANCE) -> None:
    """Raises BadSignature unless `header` signs `body` with `key` within `tolerance`."""
    now = time.time() if now is None else now
    t = None
    sigs = []
    for part in header.split(","):
        name, _, value = part.strip().partition("=")
        if name == "t":
            t = value
        elif name == "v1":
            sigs.append(value)
    if t is None or not t.isdigit() or not sigs:
        raise BadSignature("malformed signature header")
    if abs(now - int(t)) > tolerance:
        raise BadSignature("timestamp outside the tolerance (replayed or clock skew)")
    expected = hmac.new(key, t.encode() + b"." + body, hashlib.sha256).hexdigest()
    if not any(hmac.compare_digest(expected, s) for s in sigs):
        raise BadSignature("signature mismatch")


def read_key(path: str) -> bytes:
    with open(path, "rb") as f:
        key = f.read()
    # keyturn ignores one trailing newline (`openssl rand -hex 32 > hook.key`).
    if key.endswith(b"\n"):
        key = key[:-1]
        if key.endswith(b"\r"):
            key = key[:-1]
    return key


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--key-file", required=True)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8080, help="0 picks a free port")
    args = ap.parse_args()
    seen = set()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            length = int(self.headers.get("Content-Length") or 0)
            if length > MAX_BODY:
                return self.answer(413, {"verified": False, "reason": "body too large"})
            body = self.rfile.read(length)
            try:
                # Read the key per request, so a replaced key file takes effect.
                key = read_key(args.key_file)
            except OSError as e:
                # Not there yet (keyturn is delivering it): keyturn retries a 503.
                return self.answer(503, {"verified": False, "reason": f"key unavailable: {e.strerror}"})
            try:
                verify(key, self.headers.get("Keyturn-Signature", ""), body)
            except BadSignature as e:
                return self.answer(400, {"verified": False, "reason": str(e)})
            notice = json.loads(body)
            key = self.headers.get("Idempotency-Key")
            repeat = key in seen
            seen.add(key)
            # A real agent would now re-read notice["file"] (or use
            # notice["value"] when keyturn sends it) and reconnect.
            self.answer(204, {
                "verified": True,
                "repeat": repeat,
                "idempotency_key": key,
                "agent": notice["agent"],
                "credential": notice["credential"],
                "version": notice["version"],
                "rotation": notice["rotation"],
                "file": notice.get("file"),
                "has_value": "value" in notice,
            })

        def answer(self, status, line):
            print(json.dumps(line), flush=True)
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *a):
            pass  # stdout carries one JSON line per request

    server = ThreadingHTTPServer((args.host, args.port), Handler)
    print(json.dumps({"listening": server.server_address[1]}), flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
