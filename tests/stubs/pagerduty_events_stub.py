#!/usr/bin/env python3
"""A PagerDuty Events API v2 contract stub for keyturn's tests.

Written from PagerDuty's public reference for the Events API v2
(https://developer.pagerduty.com/docs/events-api-v2/trigger-events/,
.../resolve-events/ and the "Send Event" API reference,
https://developer.pagerduty.com/api-reference/368ae3d938c9e-send-an-event-to-pager-duty),
not from PagerDuty's code. It checks each request field by field the way
that reference describes and answers as it documents:

  POST /v2/enqueue   (Content-Type: application/json)
    routing_key    string, required: the 32-character integration key
    event_action   "trigger" | "acknowledge" | "resolve", required
    dedup_key      string, at most 255 characters; required for
                   acknowledge and resolve; generated for a trigger without one
    payload        object, required for trigger:
      summary        string, required, at most 1024 characters
      source         string, required
      severity       "critical" | "error" | "warning" | "info", required
      timestamp      ISO 8601, optional
      component, group, class   strings, optional
      custom_details object, optional
    client, client_url, links, images   optional
  202 {"status": "success", "message": "Event processed", "dedup_key": ...}
  400 {"status": "invalid event", "message": "Event object is invalid", "errors": [...]}

For the tests (not part of PagerDuty's API):
  POST /control/fail   {"status": 429|500|..., "count": N, "retry_after": S}
                       the next N events are answered with that status
                       (and Retry-After: S when given), and not recorded
  GET  /control/events every event accepted, in order:
                       [{"received_at": ..., "event": {...}}, ...]
  GET  /control/rejected  the bodies answered 400, with their errors
  POST /control/reset  forgets everything

Usage: pagerduty_events_stub.py [--host 127.0.0.1] [--port 0]
Prints "listening on PORT" on stdout once it accepts connections.
"""

import argparse
import datetime
import json
import sys
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

ACTIONS = ("trigger", "acknowledge", "resolve")
SEVERITIES = ("critical", "error", "warning", "info")
TOP_LEVEL = {"routing_key", "event_action", "dedup_key", "payload", "client", "client_url", "links", "images"}
PAYLOAD = {"summary", "source", "severity", "timestamp", "component", "group", "class", "custom_details"}

lock = threading.Lock()
accepted = []
rejected = []
failures = {"status": None, "count": 0, "retry_after": None}


def check(event):
    """Every problem with an event, as PagerDuty's reference describes them."""
    errors = []
    if not isinstance(event, dict):
        return ["the event must be a JSON object"]
    for key in event:
        if key not in TOP_LEVEL:
            errors.append(f"unknown field '{key}'")
    key = event.get("routing_key")
    if not isinstance(key, str) or len(key) != 32:
        errors.append("'routing_key' must be the 32-character integration key")
    action = event.get("event_action")
    if action not in ACTIONS:
        errors.append("'event_action' must be one of trigger, acknowledge, resolve")
    dedup = event.get("dedup_key")
    if dedup is not None and (not isinstance(dedup, str) or not dedup or len(dedup) > 255):
        errors.append("'dedup_key' must be a string of 1 to 255 characters")
    if action in ("acknowledge", "resolve") and dedup is None:
        errors.append(f"'dedup_key' is required for {action}")
    if action == "trigger":
        payload = event.get("payload")
        if not isinstance(payload, dict):
            errors.append("'payload' is required for trigger")
        else:
            for k in payload:
                if k not in PAYLOAD:
                    errors.append(f"unknown field 'payload.{k}'")
            summary = payload.get("summary")
            if not isinstance(summary, str) or not summary:
                errors.append("'payload.summary' is required")
            elif len(summary) > 1024:
                errors.append("'payload.summary' must be at most 1024 characters")
            if not isinstance(payload.get("source"), str) or not payload.get("source"):
                errors.append("'payload.source' is required")
            if payload.get("severity") not in SEVERITIES:
                errors.append("'payload.severity' must be one of critical, error, warning, info")
            ts = payload.get("timestamp")
            if ts is not None:
                try:
                    datetime.datetime.fromisoformat(str(ts).replace("Z", "+00:00"))
                except ValueError:
                    errors.append("'payload.timestamp' must be ISO 8601")
            for k in ("component", "group", "class"):
                if k in payload and not isinstance(payload[k], str):
                    errors.append(f"'payload.{k}' must be a string")
            if "custom_details" in payload and not isinstance(payload["custom_details"], dict):
                errors.append("'payload.custom_details' must be an object")
    return errors


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):  # quiet: tests read /control/events
        pass

    def reply(self, status, body, headers=()):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in headers:
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def body(self):
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n)

    def do_GET(self):
        with lock:
            if self.path == "/control/events":
                return self.reply(200, accepted)
            if self.path == "/control/rejected":
                return self.reply(200, rejected)
        self.reply(404, {"message": "not found"})

    def do_POST(self):
        raw = self.body()
        if self.path == "/control/fail":
            spec = json.loads(raw or b"{}")
            with lock:
                failures.update(
                    status=int(spec["status"]),
                    count=int(spec.get("count", 1)),
                    retry_after=spec.get("retry_after"),
                )
            return self.reply(200, {"ok": True})
        if self.path == "/control/reset":
            with lock:
                accepted.clear()
                rejected.clear()
                failures.update(status=None, count=0, retry_after=None)
            return self.reply(200, {"ok": True})
        if self.path != "/v2/enqueue":
            return self.reply(404, {"message": "not found"})
        with lock:
            if failures["count"] > 0:
                failures["count"] -= 1
                status = failures["status"]
                headers = []
                if failures["retry_after"] is not None:
                    headers.append(("Retry-After", str(failures["retry_after"])))
                msg = "Rate limit reached" if status == 429 else "Internal error"
                return self.reply(status, {"status": "error", "message": msg}, headers)
        if "application/json" not in (self.headers.get("Content-Type") or ""):
            return self.reply(400, {"status": "invalid event", "message": "Event object is invalid",
                                    "errors": ["Content-Type must be application/json"]})
        try:
            event = json.loads(raw)
        except ValueError:
            event = None
            errors = ["the body is not JSON"]
        else:
            errors = check(event)
        if errors:
            with lock:
                rejected.append({"body": raw.decode(errors="replace"), "errors": errors})
            return self.reply(400, {"status": "invalid event", "message": "Event object is invalid",
                                    "errors": errors})
        dedup = event.get("dedup_key") or uuid.uuid4().hex
        with lock:
            accepted.append({
                "received_at": datetime.datetime.now(datetime.timezone.utc).isoformat(),
                "event": event,
            })
        self.reply(202, {"status": "success", "message": "Event processed", "dedup_key": dedup})


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    args = ap.parse_args()
    server = ThreadingHTTPServer((args.host, args.port), Handler)
    print(f"listening on {server.server_address[1]}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    sys.exit(main())
