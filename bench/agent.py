#!/usr/bin/env python3
"""keyturn side by side with OpenBao Agent (issue 11, "Benchmark").

One run, for 1 and 1,000 credentials stored in OpenBao (KV v2), with rounds
interleaved (every round runs each consumer in turn, one at a time):

  * latency from "version current" to the consumer's file, p50/p99, for
    - keyturn *rotating* the credential (its own file sink),
    - keyturn *following* it (`mode = "follow"`, `poll = "1s"`), when this
      branch has follow mode,
    - keyturn following it at `poll = "1s"` *and nudged*: the rotating
      keyturn has a second `webhook` sink to the follower's
      `POST /v1/follow/nudge` (`[daemon] listen` and `follow_nudge_key_file`
      on the follower), when this branch has follow nudges; while another
      consumer is measured, a stub on the follower's port answers the
      rotator's nudges with 204 (so that its deliveries do not fail and
      retry in the background),
    - `bao agent` with `static_secret_render_interval = "1s"`,
    - `bao agent` at its default interval (5 min; it runs in the background
      for the whole phase of one N, see below; skipped by --quick);
  * latency from "version current" to a webhook receiver's 2xx on loopback
    (rotating keyturn, a `webhook` sink next to its file sink), when this
    branch has the webhook sink;
  * every process's RSS and CPU, and OpenBao's requests/s and CPU, idle and
    under change.

The marker "version current" is the same for every row: the time at which
OpenBao logged its response to the KV v2 write of `<mount>/data/<path>` that
made the version current (keyturn's `promote`; the version is readable from
then on). It comes from an audit device of our own OpenBao, a `socket` device
that this script receives on loopback; the same stream attributes every
request to a client by the display name of the token each process uses.
Consumers' files are watched with inotify (IN_MOVED_TO, IN_CLOSE_WRITE); a
version counts as delivered to a consumer once its file holds that version
or a newer one (the file's content is compared by hash with what the rotating
keyturn delivered; no value is kept or printed). A webhook notice counts for
the k-th version of its credential when it is the k-th distinct rotation
notified for it.

Every change is a `keyturn rotate AGENT/CREDENTIAL` on the rotating daemon,
spread over the change window; one credential is rotated at most once every
`--min-spacing` seconds.

This script starts its own `bao server -dev` on a free loopback port (from the
services venv), so that OpenBao's CPU and requests are this benchmark's alone,
and stops everything it started on exit, Ctrl-C included. Results go to
bench/out/agent-results.json; goals are reported, never asserted.

    python3 bench/agent.py              # N = 1 and 1000, ~12 min
    python3 bench/agent.py --quick      # N = 1 and 20, ~1.5 min, no default-interval agent
    python3 bench/agent.py --sizes 1000 --rounds 3
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import hashlib
import http.client
import http.server
import json
import math
import os
import random
import secrets
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.dont_write_bytecode = True  # no bench/__pycache__ in the work tree
import remote  # noqa: E402  (bench/remote.py: CpuOf, wait_settled)
import run as base  # noqa: E402  (bench/run.py: daemon, CLI, /proc helpers)

REPO = base.REPO
OUT = base.OUT / "agent"
RESULTS = base.OUT / "agent-results.json"
log = base.log

CREDS_PER_AGENT = 100
MOUNT = "secret"
AGENT_DEFAULT_INTERVAL_S = 300.0  # consul-template's default for secrets without a lease

# Goals (issue 11).
GOAL_ROTATING_P99_S = 0.050
GOAL_FOLLOW_P99_RATIO = 0.5
GOAL_FOLLOW_LOAD_RATIO = 0.05
GOAL_FOLLOW_CPU_RATIO = 0.05
GOAL_RSS_RATIO = 0.25

# Token display names (OpenBao prefixes them with "token-").
CLIENTS = {
    "rotating": "kt-rotating",
    "follow": "kt-follow",
    "follow-nudge": "kt-follow-nudge",
    "agent-1s": "agent-1s",
    "agent-default": "agent-default",
}

NOT_ON_BRANCH = "not measured (feature not on this branch)"


def bao_bin() -> Path:
    p = REPO / "target" / "test-services" / "venv" / "bin" / "bao"
    if p.exists():
        return p
    found = shutil.which("bao")
    if found:
        return Path(found)
    raise RuntimeError("no bao binary: run scripts/services.sh start once (it installs the venv)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def parse_ts(s: str) -> float:
    """RFC 3339 UTC (`2026-12-03T15:45:33.14392925Z`) to epoch seconds."""
    import calendar

    main, _, frac = s.rstrip("Z").partition(".")
    t = calendar.timegm(time.strptime(main, "%Y-%m-%dT%H:%M:%S"))
    return t + (float("0." + frac) if frac else 0.0)


def fhash(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()[:20]


# --------------------------------------------------------------------------
# Audit stream: request counts per client, promote times
# --------------------------------------------------------------------------


def request_kind(path: str) -> str:
    """`secret/data/<path>` -> `data`, `secret/metadata/keyturn-pending/<p>`
    -> `metadata[pending]`, the change index -> `...[index]`, others as is."""
    if path.startswith("sys/internal/ui/mounts/"):
        return "sys/internal/ui/mounts/*"
    parts = path.split("/", 2)
    if len(parts) < 3 or parts[0] != MOUNT:
        return path
    tag = "[pending]" if parts[2].startswith("keyturn-pending/") else "[index]" if "keyturn-index" in parts[2] else ""
    return parts[1] + tag


class AuditSink:
    """A TCP listener for OpenBao's `socket` audit device. Counts requests per
    token display name in 1-s buckets (by arrival time here) and records every
    response to a KV v2 data write by the rotating keyturn (outside its pending
    slot) as a promote: (path, time, KV version)."""

    def __init__(self, rotator_display: str):
        self.rotator = f'"display_name":"token-{rotator_display}"'
        self.lock = threading.Lock()
        self.counts: dict[str, dict[int, int]] = {}
        # (client, "operation kind") -> requests, for the whole run.
        self.kinds: dict[tuple[str, str], int] = {}
        # When the tracked client (the default-interval agent) read each path.
        self.track = f"token-{CLIENTS['agent-default']}"
        self.reads: dict[str, list[float]] = {}
        self.promotes: dict[str, list[tuple[float, int]]] = {}
        self.lines = 0
        self.bad = 0
        self.srv = socket.socket()
        self.srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.srv.bind(("127.0.0.1", 0))
        self.srv.listen(8)
        self.port = self.srv.getsockname()[1]
        self.stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.stop:
            try:
                c, _ = self.srv.accept()
            except OSError:
                return
            threading.Thread(target=self._read, args=(c,), daemon=True).start()

    def _read(self, c: socket.socket) -> None:
        buf = b""
        with c:
            while True:
                try:
                    data = c.recv(1 << 20)
                except OSError:
                    return
                if not data:
                    return
                now = int(time.time())
                buf += data
                *lines, buf = buf.split(b"\n")
                for raw in lines:
                    if raw.strip():
                        self._line(raw.decode("utf-8", "replace"), now)

    def _line(self, line: str, now: int) -> None:
        self.lines += 1
        if line.startswith('{"time":"') and '"type":"request"' in line[:60]:
            i = line.find('"display_name":"')
            name = line[i + 16: line.index('"', i + 16)] if i >= 0 else "?"
            i = line.find('"operation":"')
            op = line[i + 13: line.index('"', i + 13)] if i >= 0 else "?"
            i = line.find('"path":"')
            path = line[i + 8: line.index('"', i + 8)] if i >= 0 else "?"
            with self.lock:
                b = self.counts.setdefault(name, {})
                b[now] = b.get(now, 0) + 1
                k = (name, f"{op} {request_kind(path)}")
                self.kinds[k] = self.kinds.get(k, 0) + 1
                if name == self.track and path.startswith(f"{MOUNT}/data/"):
                    self.reads.setdefault(path[len(MOUNT) + 6:], []).append(time.time())
            return
        if ('"type":"response"' not in line[:60] or self.rotator not in line
                or f'"path":"{MOUNT}/data/' not in line):
            return
        try:
            e = json.loads(line)
        except ValueError:
            self.bad += 1
            return
        req = e.get("request", {})
        path = req.get("path", "")
        if req.get("operation") not in ("create", "update") or "keyturn-pending/" in path:
            return
        if e.get("error"):
            return
        data = (e.get("response") or {}).get("data") or {}
        version = data.get("version")
        if not isinstance(version, int):
            return
        with self.lock:
            self.promotes.setdefault(path[len(MOUNT) + 6:], []).append((parse_ts(e["time"]), version))

    def requests(self, t0: float, t1: float) -> dict[str, int]:
        """Requests per client display name whose audit line arrived in whole
        seconds [t0, t1)."""
        out = {}
        with self.lock:
            for name, b in self.counts.items():
                n = sum(v for s, v in b.items() if int(t0) <= s < int(t1))
                if n:
                    out[name] = n
        return out

    def close(self) -> None:
        self.stop = True
        self.srv.close()


# --------------------------------------------------------------------------
# OpenBao (our own -dev server)
# --------------------------------------------------------------------------


class Bao:
    def __init__(self, d: Path, audit_port: int):
        self.port = free_port()
        self.addr = f"http://127.0.0.1:{self.port}"
        self.root = secrets.token_hex(16)
        hcl = d / "bao.hcl"
        hcl.write_text(
            'audit "socket" "bench" {\n  options {\n'
            f'    address = "127.0.0.1:{audit_port}"\n    socket_type = "tcp"\n'
            '    write_timeout = "10s"\n  }\n}\n')
        env = {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "BAO_"))}
        self.log_path = d / "bao.log"
        with open(self.log_path, "wb") as logf:
            self.proc = subprocess.Popen(
                [str(bao_bin()), "server", "-dev", f"-dev-root-token-id={self.root}",
                 f"-dev-listen-address=127.0.0.1:{self.port}", f"-config={hcl}"],
                env=env, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                start_new_session=True)
        base._DAEMONS.append(self.proc)
        self.pid = self.proc.pid
        self.wait_health()

    def wait_health(self, ok: tuple[int, ...] = (200,), timeout: float = 60.0) -> int:
        """Poll `GET /v1/sys/health` until its status is in `ok` (200 =
        initialised, unsealed, active; 501 = not initialised; 503 = sealed).
        Returns the status; raises if the server exits or `timeout` passes."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                st, _ = self.call("GET", "/v1/sys/health")
                if st in ok:
                    return st
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"bao server did not come up; see {self.log_path}")
            time.sleep(0.2)

    def call(self, method: str, path: str, body: dict | None = None, token: str | None = None):
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            headers = {"X-Vault-Token": token or self.root}
            data = None
            if body is not None:
                data = json.dumps(body).encode()
                headers["Content-Type"] = "application/json"
            c.request(method, path, body=data, headers=headers)
            r = c.getresponse()
            raw = r.read()
            return r.status, (json.loads(raw) if raw else None)
        finally:
            c.close()

    def token(self, display: str, path: Path) -> Path:
        """A root-policy child token with this display name, in a 0600 file."""
        st, j = self.call("POST", "/v1/auth/token/create",
                          {"display_name": display, "policies": ["root"], "ttl": "24h"})
        if st != 200:
            raise RuntimeError(f"token create: {st}")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.write(fd, j["auth"]["client_token"].encode())
        os.close(fd)
        return path

    def stop(self) -> None:
        base.stop_process(self.proc, timeout=15)


# --------------------------------------------------------------------------
# inotify: when does each consumer's file change, to what
# --------------------------------------------------------------------------

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
IN_CLOSE_WRITE, IN_MOVED_TO = 0x08, 0x80
IN_NONBLOCK, IN_CLOEXEC = 0o4000, 0o2000000
_EV = struct.Struct("iIII")


class Watcher:
    """Records, per (consumer, credential), each new content of the
    credential's file: [(epoch seconds, content hash)]."""

    def __init__(self):
        self.fd = _libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        self.wds: dict[int, tuple[str, Path, dict[str, str]]] = {}
        self.events: dict[tuple[str, str], list[tuple[float, str]]] = {}
        self.last: dict[tuple[str, str], str] = {}
        self.lock = threading.Lock()
        self.rp, self.wp = os.pipe()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def watch(self, label: str, d: Path, names: dict[str, str]) -> None:
        """Watch directory d; `names` maps file name -> credential."""
        d.mkdir(parents=True, exist_ok=True)
        wd = _libc.inotify_add_watch(self.fd, str(d).encode(), IN_CLOSE_WRITE | IN_MOVED_TO)
        if wd < 0:
            raise OSError(ctypes.get_errno(), f"inotify_add_watch {d}")
        with self.lock:
            self.wds[wd] = (label, d, names)
        for name, cred in names.items():  # what is there already
            self._record(label, cred, d / name, time.time())

    def _record(self, label: str, cred: str, p: Path, t: float) -> None:
        try:
            h = fhash(p.read_bytes())
        except OSError:
            return
        key = (label, cred)
        with self.lock:
            if self.last.get(key) != h:
                self.last[key] = h
                self.events.setdefault(key, []).append((t, h))

    def _loop(self) -> None:
        while True:
            r, _, _ = select.select([self.fd, self.rp], [], [])
            if self.rp in r:
                return
            try:
                buf = os.read(self.fd, 1 << 20)
            except BlockingIOError:
                continue
            t = time.time()
            off = 0
            while off < len(buf):
                wd, _mask, _cookie, ln = _EV.unpack_from(buf, off)
                name = buf[off + 16: off + 16 + ln].split(b"\0", 1)[0].decode(errors="replace")
                off += 16 + ln
                w = self.wds.get(wd)
                if w and name in w[2]:
                    self._record(w[0], w[2][name], w[1] / name, t)

    def current(self, label: str, cred: str) -> str | None:
        with self.lock:
            return self.last.get((label, cred))

    def close(self) -> None:
        os.write(self.wp, b"x")
        self.thread.join(5)
        os.close(self.fd)


# --------------------------------------------------------------------------
# Webhook receiver
# --------------------------------------------------------------------------


class Receiver:
    """Loopback HTTP receiver: answers 200 to every POST and records, per
    credential, the time of each 2xx and the notice's version."""

    def __init__(self):
        self.notices: dict[str, list[tuple[float, str]]] = {}
        self.raw_fields: set[str] = set()
        self.lock = threading.Lock()
        rec = self

        class H(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True

            def log_message(self, *a):
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                try:
                    j = json.loads(body)
                except ValueError:
                    j = {}
                self.send_response_only(200)
                self.send_header("Content-Length", "0")
                self.end_headers()
                t = time.time()
                if isinstance(j, dict):
                    cred = f"{j.get('agent')}/{j.get('credential')}"
                    with rec.lock:
                        rec.raw_fields.update(k for k in j if k != "value")
                        rec.notices.setdefault(cred, []).append((t, str(j.get("rotation") or j.get("version"))))

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def versions(self, cred: str) -> list[tuple[float, str]]:
        """First 2xx per distinct version (a retry repeats the version)."""
        seen, out = set(), []
        with self.lock:
            for t, v in self.notices.get(cred, []):
                if v not in seen:
                    seen.add(v)
                    out.append((t, v))
        return out

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class NudgeStub:
    """Stands in for the nudged follower on its port while another consumer
    is measured: answers 204 to every POST (the rotator's nudges), so that
    they neither fail nor retry in the rotator's background."""

    def __init__(self, port: int):
        class H(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def do_POST(self):
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                self.send_response_only(204)
                # No keep-alive: a kept connection would outlive close() and
                # go on answering the rotator's nudges for the follower.
                self.send_header("Connection", "close")
                self.end_headers()
                self.close_connection = True

        http.server.ThreadingHTTPServer.allow_reuse_address = True
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", port), H)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# --------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------


def cred_ids(n: int) -> list[tuple[str, str]]:
    """(agent, credential) for n credentials, 100 per agent."""
    return [(f"a{i // CREDS_PER_AGENT:03d}", f"c{i % CREDS_PER_AGENT:03d}") for i in range(n)]


def kv_path(prefix: str, aid: str, cid: str) -> str:
    return f"{prefix}/{aid}/{cid}"


def keyturn_config(d: Path, bao: Bao, token_file: Path, creds: list[tuple[str, str]], prefix: str,
                   follow: bool, webhook: dict | list[dict] | None, out_label: str, change_index: str | None = None,
                   daemon_extra: list[str] | None = None) -> Path:
    """`webhook`: one webhook sink's keys, or several; `daemon_extra`: more
    `[daemon]` lines."""
    d.mkdir(parents=True, exist_ok=True)
    webhooks = [webhook] if isinstance(webhook, dict) else (webhook or [])
    lines = [
        "[daemon]",
        f'state_dir = "{d}/state"',
        f'socket = "{d}/control.sock"',
        f'delivery_roots = ["{d.parent}/files"]',
        'drain_timeout = "10s"',
        "max_concurrent_rotations = 64",
        'retry = { initial_delay = "500ms", max_delay = "10s", max_attempts = 5 }',
        *(daemon_extra or []),
        "",
        "[vaults.bao]",
        'type = "vault"',
        f'address = "{bao.addr}"',
        f'mount = "{MOUNT}"',
        f'token_file = "{token_file}"',
        "max_concurrent = 64",
    ]
    if change_index:
        lines.append(f'change_index = "{change_index}"')
    lines.append("")
    agents = sorted({a for a, _ in creds})
    for aid in agents:
        lines += [f"[agents.{aid}]", 'owner = "bench@example.com"', 'tenant = "bench"', 'tier = "low"', ""]
        for a, cid in creds:
            if a != aid:
                continue
            sinks = [f'{{ type = "file", path = "{out_label}/{aid}/{cid}" }}']
            for hook in webhooks:
                sinks.append("{ " + ", ".join(f"{k} = {json.dumps(v)}" for k, v in hook.items()) + " }")
            lines += [f"[agents.{aid}.credentials.{cid}]", 'vault = "bao"', f'path = "{kv_path(prefix, aid, cid)}"']
            lines.append('generate = { kind = "password", length = 32 }')
            if follow:
                lines += ['mode = "follow"', 'poll = "1s"']
            else:
                lines += ['every = "24h"', 'jitter = "1h"']
            lines += ['grace = "1h"', f"deliver = [{', '.join(sinks)}]", ""]
    cfg = d / "keyturn.toml"
    cfg.write_text("\n".join(lines))
    return cfg


def agent_config(d: Path, bao: Bao, token_file: Path, creds: list[tuple[str, str]], prefix: str,
                 interval: str | None, out_dir: Path) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    lines = [
        f'vault {{ address = "{bao.addr}" }}',
        f'pid_file = "{d}/agent.pid"',
        'auto_auth {\n  method "token_file" {\n'
        f'    config = {{ token_file_path = "{token_file}" }}\n  }}\n}}',
    ]
    if interval:
        lines.append(f'template_config {{ static_secret_render_interval = "{interval}" }}')
    for aid, cid in creds:
        src = f"{MOUNT}/data/{kv_path(prefix, aid, cid)}"
        lines.append("template {\n"
                     f'  destination = "{out_dir}/{aid}/{cid}"\n'
                     f'  contents = "{{{{ with secret \\"{src}\\" }}}}{{{{ .Data.data.value }}}}{{{{ end }}}}"\n'
                     '  perms = "0600"\n}')
    cfg = d / "agent.hcl"
    cfg.write_text("\n".join(lines) + "\n")
    return cfg


def nudge_daemon_lines(port: int, key: Path) -> list[str]:
    """The follower's `[daemon]` lines that enable follow nudges."""
    return [f'listen = "127.0.0.1:{port}"', f'follow_nudge_key_file = "{key}"']


def feature_supported(d: Path, bao: Bao, token_file: Path, hook_key: Path, kind: str) -> tuple[bool, str]:
    """Does this keyturn accept a config with follow mode / a webhook sink /
    follow nudges? (`keyturn check` on a one-credential config.)"""
    probe = d / f"probe-{kind}"
    webhook = {"type": "webhook", "url": "http://127.0.0.1:9/hook", "secret_file": str(hook_key)} \
        if kind == "webhook" else None
    extra = nudge_daemon_lines(9, hook_key) if kind == "nudge" else None
    cfg = keyturn_config(probe, bao, token_file, [("a000", "c000")], "probe", kind in ("follow", "nudge"), webhook,
                         "probe", daemon_extra=extra)
    r = base.cli(cfg, "check", timeout=60)
    msg = (r.stdout + r.stderr).decode(errors="replace").strip()
    shutil.rmtree(probe, ignore_errors=True)
    return r.returncode == 0, msg[-600:]


# --------------------------------------------------------------------------
# Processes
# --------------------------------------------------------------------------


class AgentProc:
    def __init__(self, cfg: Path, tag: str):
        self.log_path = cfg.parent / f"agent-{tag}.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "BAO_"))}
        with open(self.log_path, "wb") as logf:
            self.proc = subprocess.Popen([str(bao_bin()), "agent", f"-config={cfg}"], env=env,
                                         stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        base._DAEMONS.append(self.proc)
        self.pid = self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        base.stop_process(self.proc, timeout=15)


class KeyturnProc:
    def __init__(self, cfg: Path, tag: str):
        self.cfg = cfg
        self.d = base.Daemon(cfg, tag)
        self.d.wait_ready(120)
        self.pid = self.d.pid
        self.log_path = self.d.log_path

    def alive(self) -> bool:
        return self.d.proc.poll() is None

    def stop(self) -> None:
        self.d.stop()


def rss(pid: int) -> int | None:
    try:
        return base.proc_status(pid)["VmRSS"]
    except (OSError, KeyError):
        return None


# --------------------------------------------------------------------------
# One phase (one N)
# --------------------------------------------------------------------------


class Phase:
    def __init__(self, n: int, args, bao: Bao, audit: AuditSink, watcher: Watcher, receiver: Receiver,
                 features: dict[str, bool], run_id: str, tokens: dict[str, Path]):
        self.n, self.args, self.bao, self.audit, self.watcher, self.receiver = n, args, bao, audit, watcher, receiver
        self.features, self.tokens = features, tokens
        self.prefix = f"bench-{run_id}-n{n}"
        # One change index per phase, written by the rotator, read by the
        # follower (when this keyturn has follow mode and it is not disabled).
        self.index = f"{self.prefix}/keyturn-index" if features["follow"] and args.change_index else None
        self.d = OUT / f"n{n}"
        if self.d.exists():
            shutil.rmtree(self.d)
        self.creds = cred_ids(n)
        self.sels = [f"{a}/{c}" for a, c in self.creds]
        self.files = self.d / "files"
        self.windows: dict[str, list[dict]] = {}
        self.last_rotated: dict[str, float] = {}
        # Versions asked of the rotator per credential (the initial rotation is one).
        self.requested: dict[str, int] = {s: 1 for s in self.sels}
        self.bg: dict = {}
        self.default_s = (float(args.default_interval.rstrip("s")) if args.default_interval
                          else AGENT_DEFAULT_INTERVAL_S)
        # The nudged follower's port (a stub holds it between its rounds).
        self.nudge_port = free_port() if features.get("nudge") else None
        self.stub: NudgeStub | None = None

    def names(self, label: str) -> None:
        by_dir: dict[str, dict[str, str]] = {}
        for a, c in self.creds:
            by_dir.setdefault(a, {})[c] = f"{a}/{c}"
        for a, names in by_dir.items():
            self.watcher.watch(f"{self.n}:{label}", self.files / label / a, names)

    def synced(self, label: str) -> int:
        """How many of the consumer's files hold what the rotator delivered."""
        k = 0
        for s in self.sels:
            cur = self.watcher.current(f"{self.n}:rot", s)
            if cur is not None and self.watcher.current(f"{self.n}:{label}", s) == cur:
                k += 1
        return k

    def wait_synced(self, label: str, proc, timeout: float, creds: list[str] | None = None) -> bool:
        want = creds if creds is not None else self.sels
        deadline = time.monotonic() + timeout
        while True:
            ok = sum(1 for s in want if self.watcher.current(f"{self.n}:{label}", s) is not None
                     and self.watcher.current(f"{self.n}:{label}", s) == self.watcher.current(f"{self.n}:rot", s))
            if ok == len(want):
                return True
            if proc is not None and not proc.alive():
                raise RuntimeError(f"{label} exited; see {proc.log_path}")
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)

    def wait_rotator(self, creds: list[str], timeout: float) -> bool:
        """Until every rotation asked for is promoted (audit) and delivered to
        the rotator's own file."""
        deadline = time.monotonic() + timeout
        while True:
            late = [s for s in creds
                    if len(self.audit.promotes.get(kv_path(self.prefix, *s.split("/")), [])) < self.requested[s]
                    or len(self.watcher.events.get((f"{self.n}:rot", s), [])) < self.requested[s]]
            if not late:
                return True
            if not self.rot.alive():
                raise RuntimeError(f"rotating keyturn exited; see {self.rot.log_path}")
            if time.monotonic() > deadline:
                log(f"N={self.n}: {len(late)} rotation(s) not promoted and delivered after {timeout:.0f}s")
                return False
            time.sleep(0.05)

    def start_rotator(self) -> None:
        webhook = []
        if self.features["webhook"]:
            webhook.append({"type": "webhook", "url": self.receiver.url,
                            "secret_file": str(self.tokens["hook-key"]), "timeout": "5s"})
        if self.nudge_port:
            # The same webhook sink, pointed at the nudged follower.
            webhook.append({"type": "webhook", "url": f"http://127.0.0.1:{self.nudge_port}/v1/follow/nudge",
                            "secret_file": str(self.tokens["nudge-key"]), "timeout": "5s"})
            self.stub = NudgeStub(self.nudge_port)
        cfg = keyturn_config(self.d / "rotating", self.bao, self.tokens["rotating"], self.creds, self.prefix,
                             False, webhook, "rot", self.index)
        self.names("rot")
        log(f"N={self.n}: rotating keyturn: initial rotations")
        t0 = time.monotonic()
        self.rot = KeyturnProc(cfg, "rotating")
        remote.wait_settled(cfg, self.n, max(300, self.n))
        if not self.wait_rotator(self.sels, 60):
            raise RuntimeError("rotator's files incomplete after its initial rotations")
        log(f"N={self.n}: rotating keyturn ready, {self.n} credentials delivered in {time.monotonic() - t0:.1f}s")

    def start_consumer(self, label: str):
        if label == "follow":
            cfg = keyturn_config(self.d / "follow", self.bao, self.tokens["follow"], self.creds, self.prefix,
                                 True, None, "follow", self.index)
            return KeyturnProc(cfg, f"follow-{len(self.windows.get(label, []))}")
        if label == "follow-nudge":
            cfg = keyturn_config(self.d / "follow-nudge", self.bao, self.tokens["follow-nudge"], self.creds,
                                 self.prefix, True, None, "follow-nudge", self.index,
                                 daemon_extra=nudge_daemon_lines(self.nudge_port, self.tokens["nudge-key"]))
            # The follower takes the port over from the stub.
            if self.stub is not None:
                self.stub.close()
                self.stub = None
            try:
                return KeyturnProc(cfg, f"follow-nudge-{len(self.windows.get(label, []))}")
            except BaseException:
                self.stub = NudgeStub(self.nudge_port)
                raise
        interval = "1s" if label == "agent-1s" else self.args.default_interval
        cfg = agent_config(self.d / label, self.bao, self.tokens[label], self.creds, self.prefix, interval,
                           self.files / label)
        return AgentProc(cfg, str(len(self.windows.get(label, []))))

    def rotate_spread(self, seconds: float) -> list[str]:
        """Rotations spread over `seconds`: credentials in a shuffled cycle,
        each at most once per --min-spacing, at random gaps."""
        a = self.args
        t_end = time.monotonic() + seconds
        order = self.sels[:]
        random.shuffle(order)
        gap = max(a.min_spacing / max(self.n, 1), a.min_gap)
        done: list[str] = []
        i = 0
        while time.monotonic() < t_end:
            s = order[i % len(order)]
            i += 1
            wait = self.last_rotated.get(s, 0) + a.min_spacing - time.time()
            if wait > 0:
                if time.monotonic() + wait >= t_end:
                    break
                time.sleep(wait)
            r = base.cli(self.rot.cfg, "rotate", s, timeout=60)
            if r.returncode != 0:
                raise RuntimeError(f"rotate {s}: {r.stderr.decode(errors='replace')[:300]}")
            self.last_rotated[s] = time.time()
            self.requested[s] += 1
            done.append(s)
            time.sleep(gap * random.uniform(0.5, 1.5))
        return done

    def measure(self, label: str, rnd: int) -> None:
        proc = None
        w: dict = {"round": rnd}
        try:
            if label != "rotating":
                t0 = time.monotonic()
                proc = self.start_consumer(label)
                if not self.wait_synced(label, proc, max(60, self.n / 10)):
                    raise RuntimeError(f"{label}: files not in sync after start; see {proc.log_path}")
                w["start_to_synced_s"] = round(time.monotonic() - t0, 2)
            pid = proc.pid if proc else self.rot.pid
            time.sleep(1)
            pids = {"consumer": pid, "bao": self.bao.pid, "rotator": self.rot.pid}
            # Idle.
            cpu = remote.CpuOf(pids)
            t0 = time.time()
            time.sleep(self.args.idle)
            t1 = time.time()
            w["idle"] = {"cpu_pct": cpu.end(), "rss": rss(pid), "wall_s": round(t1 - t0, 2),
                         "requests": self.audit.requests(t0, t1)}
            # Under change.
            cpu = remote.CpuOf(pids)
            t0 = time.time()
            rotated = self.rotate_spread(self.args.change)
            t1 = time.time()
            w["change"] = {"cpu_pct": cpu.end(), "rss": rss(pid), "wall_s": round(t1 - t0, 2),
                           "requests": self.audit.requests(t0, t1), "rotations": len(rotated)}
            w["t0"], w["t1"] = t0, t1
            # Drain: until the rotator has promoted and delivered every rotation
            # asked for, then until the consumer holds every rotated version.
            w["rotator_done"] = self.wait_rotator(sorted(set(rotated)), 90)
            if label != "rotating":
                ok = self.wait_synced(label, proc, self.args.drain, sorted(set(rotated)))
                w["drained"] = ok
            w["t_end"] = time.time()
            self.windows.setdefault(label, []).append(w)
            ch = w["change"]
            log(f"N={self.n} round {rnd} {label}: {len(rotated)} rotations; CPU idle {w['idle']['cpu_pct']} "
                f"change {ch['cpu_pct']}; requests idle {w['idle']['requests']} change {ch['requests']}")
        finally:
            if proc is not None:
                proc.stop()
            if label == "follow-nudge" and self.stub is None:
                self.stub = NudgeStub(self.nudge_port)

    def start_background_default(self) -> None:
        self.names("agent-default")
        proc = self.start_consumer("agent-default")
        t0 = time.monotonic()
        if not self.wait_synced("agent-default", proc, max(60, self.n / 10)):
            proc.stop()
            raise RuntimeError(f"agent-default: files not in sync after start; see {proc.log_path}")
        self.bg = {"proc": proc, "t_start": time.time(), "start_to_synced_s": round(time.monotonic() - t0, 2),
                   "cpu": remote.CpuOf({"consumer": proc.pid})}
        log(f"N={self.n}: agent at its default interval runs in the background "
            f"(synced in {self.bg['start_to_synced_s']}s)")

    def finish_background_default(self) -> None:
        proc = self.bg["proc"]
        rotated = sorted(self.last_rotated)
        limit = self.bg["t_start"] + self.default_s * 1.25 - time.time()
        log(f"N={self.n}: waiting up to {max(limit, 0):.0f}s for the default-interval agent to render "
            f"{len(rotated)} rotated credentials")
        ok = self.wait_synced("agent-default", proc, max(limit, 1), rotated)
        t_end = time.time()
        self.bg.update({"t_end": t_end, "drained": ok, "rss": rss(proc.pid), "cpu_pct": self.bg["cpu"].end(),
                        "requests": self.audit.requests(self.bg["t_start"], t_end)})
        proc.stop()

    def run(self) -> dict:
        if self.features["follow"]:
            self.names("follow")
        if self.features.get("nudge"):
            self.names("follow-nudge")
        self.names("agent-1s")
        self.start_rotator()
        try:
            if self.args.default_agent:
                self.start_background_default()
            labels = (["rotating"] + (["follow"] if self.features["follow"] else [])
                      + (["follow-nudge"] if self.features.get("nudge") else []) + ["agent-1s"])
            rnd = 0
            while True:
                t_round = time.time()
                order = labels[:] if rnd % 2 == 0 else labels[::-1]
                for label in order:
                    self.measure(label, rnd)
                rnd += 1
                if rnd >= self.args.max_rounds:
                    break
                if rnd >= self.args.rounds:
                    # More rounds only while the default-interval agent waits
                    # for its first refresh anyway (no rotation after 80 % of
                    # its interval, so that its refresh sees every one).
                    if not self.bg:
                        break
                    took = time.time() - t_round
                    if time.time() + took > self.bg["t_start"] + 0.8 * self.default_s:
                        break
            if self.args.default_agent:
                self.finish_background_default()
        finally:
            if self.bg and self.bg["proc"].alive():
                self.bg["proc"].stop()
            self.rot.stop()
            if self.stub is not None:
                self.stub.close()
                self.stub = None
        return self.results()

    # ------------------------------------------------------------------
    def versions(self, s: str) -> list[tuple[float, str]]:
        """(time current, content hash) of each version of credential s: the
        k-th promote paired with the rotator's first new file content after it."""
        a, c = s.split("/")
        proms = self.audit.promotes.get(kv_path(self.prefix, a, c), [])
        files = self.watcher.events.get((f"{self.n}:rot", s), [])
        out = []
        j = 0
        for t, _v in sorted(proms):
            while j < len(files) and files[j][0] < t:
                j += 1
            if j >= len(files):
                break
            out.append((t, files[j][1]))
            j += 1
        return out

    def latencies(self, label: str, spans: list[tuple[float, float]],
                  until: dict[str, float] | None = None) -> dict:
        """For every version made current inside one of `spans` (and, with
        `until`, before until[credential]): the time until the consumer's file
        held it or a newer one."""
        lat, missed = [], 0
        for s in self.sels:
            vers = self.versions(s)
            ev = self.watcher.events.get((f"{self.n}:{label}", s), [])
            for k, (t, _h) in enumerate(vers):
                if not any(a <= t < b for a, b in spans):
                    continue
                if until is not None and t >= until[s]:
                    continue
                newer = {h for _, h in vers[k:]}
                got = next((te for te, he in ev if te >= t - 0.001 and he in newer), None)
                if got is None:
                    missed += 1
                else:
                    lat.append(max(got - t, 0.0))
        return summarize(lat, missed)

    def webhook_latencies(self, spans: list[tuple[float, float]]) -> dict:
        lat, missed = [], 0
        for s in self.sels:
            vers = self.versions(s)
            notes = self.receiver.versions(s)
            # Notices in order of arrival; the first one (initial rotation) pairs
            # with the first version.
            for k, (t, _h) in enumerate(vers):
                if not any(a <= t < b for a, b in spans):
                    continue
                if k < len(notes):
                    lat.append(max(notes[k][0] - t, 0.0))
                else:
                    missed += 1
        return summarize(lat, missed)

    def results(self) -> dict:
        res: dict = {"n": self.n, "rows": {}, "diagnostics": {
            "promotes_seen": sum(len(self.audit.promotes.get(kv_path(self.prefix, *s.split("/")), []))
                                 for s in self.sels),
            "rotator_file_versions": sum(len(self.watcher.events.get((f"{self.n}:rot", s), [])) for s in self.sels),
            "rotations_requested": sum(w["change"]["rotations"] for ws in self.windows.values() for w in ws),
            "audit_lines_unparsed": self.audit.bad}}
        if os.environ.get("AGENT_BENCH_DEBUG"):
            dump = {s: {"promotes": self.audit.promotes.get(kv_path(self.prefix, *s.split("/")), []),
                        "files": {lab: self.watcher.events.get((f"{self.n}:{lab}", s), [])
                                  for lab in ("rot", "follow", "follow-nudge", "agent-1s", "agent-default")}}
                    for s in self.sels}
            (base.OUT / f"agent-debug-{self.n}.json").write_text(json.dumps(dump))
        for label, ws in self.windows.items():
            spans = [(w["t0"], w["t_end"]) for w in ws]
            row = {"latency": self.latencies("rot" if label == "rotating" else label, spans),
                   "windows": [{k: v for k, v in w.items() if k not in ("t0", "t1", "t_end")} for w in ws]}
            row.update(aggregate(ws, CLIENTS[label]))
            res["rows"][label] = row
            if label == "rotating" and self.features["webhook"]:
                wrow = {"latency": self.webhook_latencies(spans)}
                res["rows"]["webhook"] = wrow
        if self.bg:
            t0, t1 = self.bg["t_start"], self.bg["t_end"]
            wall = t1 - t0
            req = self.bg["requests"].get(f"token-{CLIENTS['agent-default']}", 0)
            # A version made current after the agent's last read of its secret
            # (audit) is censored: its next refresh is after the end of the
            # phase. Not counted in the percentiles; reported.
            last_read = {s: max(self.audit.reads.get(kv_path(self.prefix, *s.split("/")), [t1]))
                         for s in self.sels}
            lat = self.latencies("agent-default", [(t0, t1)], until=last_read)
            lat["censored_after_last_render"] = sum(
                1 for s in self.sels for t, _ in self.versions(s) if t0 <= t < t1 and t >= last_read[s])
            res["rows"]["agent-default"] = {
                "latency": lat,
                "drained": self.bg["drained"], "start_to_synced_s": self.bg["start_to_synced_s"],
                "whole_phase": {"wall_s": round(wall, 1), "cpu_pct": self.bg["cpu_pct"].get("consumer"),
                                "rss": self.bg["rss"], "own_requests_per_s": round(req / wall, 2)},
            }
        return res


def summarize(lat: list[float], missed: int) -> dict:
    lat = sorted(lat)
    total = len(lat) + missed

    def q(p: float):
        # Nearest-rank percentile over every version, a missed one counting as
        # infinitely late.
        if not total:
            return None
        k = max(0, min(total - 1, math.ceil(p * total) - 1))
        return lat[k] if k < len(lat) else None

    return {"samples": len(lat), "missed": missed, "p50_s": q(0.50), "p99_s": q(0.99),
            "max_s": lat[-1] if lat else None, "mean_s": sum(lat) / len(lat) if lat else None}


def aggregate(ws: list[dict], client: str) -> dict:
    """Mean over the rounds of CPU (% of a core), RSS (max) and OpenBao
    requests/s, idle and under change."""
    out = {}
    for kind in ("idle", "change"):
        xs = [w[kind] for w in ws if kind in w]
        if not xs:
            continue
        wall = sum(x["wall_s"] for x in xs)

        def mean_cpu(key: str) -> float | None:
            v = [x["cpu_pct"].get(key) for x in xs if x["cpu_pct"].get(key) is not None]
            return round(sum(v) / len(v), 2) if v else None

        own = sum(x["requests"].get(f"token-{client}", 0) for x in xs)
        total = sum(sum(x["requests"].values()) for x in xs)
        out[kind] = {
            "consumer_cpu_pct": mean_cpu("consumer"),
            "bao_cpu_pct": mean_cpu("bao"),
            "rotator_cpu_pct": mean_cpu("rotator"),
            "rss_max": max((x["rss"] or 0) for x in xs),
            "own_requests_per_s": round(own / wall, 2),
            "bao_requests_per_s": round(total / wall, 2),
            "rotations": sum(x.get("rotations", 0) for x in xs),
            "wall_s": round(wall, 1),
        }
    return out


# --------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------

ROWS = [
    ("rotating", "keyturn rotating -> file"),
    ("webhook", "keyturn rotating -> webhook 2xx"),
    ("follow", "keyturn following, poll 1s -> file"),
    ("follow-nudge", "keyturn following, poll 1s + nudge -> file"),
    ("agent-1s", "bao agent, 1s interval -> file"),
    ("agent-default", "bao agent, default interval -> file"),
]


def ms(x) -> str:
    return "-" if x is None else (f"{x * 1000:.1f} ms" if x < 1 else f"{x:.2f} s")


def mib(x) -> str:
    return "-" if not x else f"{x / 2**20:.1f} MiB"


def pct(x) -> str:
    return "-" if x is None else f"{x:.1f} %"


def lat_cell(lat: dict, which: str) -> str:
    v = lat.get(which)
    if v is None and lat.get("missed"):
        return "never (missed)"
    return ms(v)


def fmt_table(results: dict) -> str:
    head = ["N", "consumer", "p50", "p99", "versions (missed)", "RSS", "CPU idle", "CPU change",
            "own OpenBao req/s idle", "own req/s change", "OpenBao CPU idle", "OpenBao CPU change"]
    rows = []
    for ph in results["phases"]:
        n = ph["n"]
        if "error" in ph:
            rows.append([str(n), "error: " + ph["error"][:80]] + [""] * (len(head) - 2))
            continue
        for key, title in ROWS:
            r = ph["rows"].get(key)
            if r is None:
                reason = ph.get("not_measured", {}).get(key, NOT_ON_BRANCH)
                rows.append([f"{n:,}", title, reason] + [""] * (len(head) - 3))
                continue
            lat = r["latency"]
            count = f"{lat['samples'] + lat['missed']} ({lat['missed']})"
            if lat.get("censored_after_last_render"):
                count += f" +{lat['censored_after_last_render']} after its last refresh"
            cells = [f"{n:,}", title, lat_cell(lat, "p50_s"), lat_cell(lat, "p99_s"), count]
            if key == "webhook":
                cells += ["(same process as rotating)"] + [""] * 6
            elif key == "agent-default":
                wp = r["whole_phase"]
                cells += [mib(wp["rss"]), f"{pct(wp['cpu_pct'])} (whole phase)", "",
                          f"{wp['own_requests_per_s']:.2f} (whole phase)", "", "", ""]
            else:
                i, c = r.get("idle", {}), r.get("change", {})
                cells += [mib(max(i.get("rss_max") or 0, c.get("rss_max") or 0)), pct(i.get("consumer_cpu_pct")),
                          pct(c.get("consumer_cpu_pct")), f"{i.get('own_requests_per_s', 0):.2f}",
                          f"{c.get('own_requests_per_s', 0):.2f}", pct(i.get("bao_cpu_pct")),
                          pct(c.get("bao_cpu_pct"))]
            rows.append(cells)
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]
    lines = ["| " + " | ".join(h.ljust(w) for h, w in zip(head, widths)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |")
    return "\n".join(lines)


def check_goals(results: dict) -> list[dict]:
    goals = []

    def add(goal: str, ok: bool | None, measured: str) -> None:
        goals.append({"goal": goal, "pass": ok, "measured": measured})

    for ph in results["phases"]:
        if "error" in ph:
            continue
        n, rows = ph["n"], ph["rows"]
        for key, what in (("rotating", "file"), ("webhook", "webhook")):
            g = f"N={n}: rotating keyturn p99 <= 50 ms to {what}"
            r = rows.get(key)
            if r is None or r["latency"]["p99_s"] is None:
                add(g, None, "not measured" if r is None else "no p99 (missed versions)")
            else:
                p = r["latency"]["p99_s"]
                add(g, p <= GOAL_ROTATING_P99_S, f"p99 {ms(p)} ({p / GOAL_ROTATING_P99_S:.2f} x the goal)")
        f, a = rows.get("follow"), rows.get("agent-1s")
        # (row, who, the feature the row needs, its name in a message)
        for key, who, feature, label in (("follow", "following keyturn", "follow mode", "follow"),
                                         ("follow-nudge", "following keyturn (nudged)", "follow nudges",
                                          "nudged follow")):
            r = rows.get(key)
            g = f"N={n}: {who} p99 <= 0.5 x bao agent's at 1 s"
            if r is None or a is None:
                add(g, None, f"not measured ({feature} not on this branch)" if r is None else "agent not measured")
            else:
                fp, ap = r["latency"]["p99_s"], a["latency"]["p99_s"]
                if fp is None or ap is None:
                    add(g, None, f"{label} p99 {ms(fp)}, agent p99 {ms(ap)}")
                else:
                    add(g, fp <= GOAL_FOLLOW_P99_RATIO * ap, f"{ms(fp)} / {ms(ap)} = {fp / ap:.2f}")
        if f is not None and a is not None and n >= 1000:
            def load(r):
                xs = [r.get(k) for k in ("idle", "change") if r.get(k)]
                w = sum(x["wall_s"] for x in xs)
                return sum(x["own_requests_per_s"] * x["wall_s"] for x in xs) / w if w else 0

            def cpu(r):
                xs = [r.get(k) for k in ("idle", "change") if r.get(k)]
                w = sum(x["wall_s"] for x in xs)
                return sum((x["consumer_cpu_pct"] or 0) * x["wall_s"] for x in xs) / w if w else 0

            fl, al = load(f), load(a)
            add(f"N={n}: follower's OpenBao requests <= 0.05 x the agent's (1 s)", fl <= GOAL_FOLLOW_LOAD_RATIO * al,
                f"{fl:.2f} / {al:.2f} req/s = {fl / al if al else float('nan'):.3f}")
            fc, ac = cpu(f), cpu(a)
            add(f"N={n}: follower's CPU <= 0.05 x the agent's (1 s)", fc <= GOAL_FOLLOW_CPU_RATIO * ac,
                f"{fc:.2f} / {ac:.2f} % = {fc / ac if ac else float('nan'):.3f}")
        if a is not None:
            ar = max(a.get("idle", {}).get("rss_max") or 0, a.get("change", {}).get("rss_max") or 0)
            for key, who in (("follow", "following"), ("rotating", "rotating")):
                r = rows.get(key)
                g = f"N={n}: {who} keyturn RSS <= 0.25 x bao agent's (1 s)"
                if r is None:
                    add(g, None, "not measured")
                    continue
                kr = max(r.get("idle", {}).get("rss_max") or 0, r.get("change", {}).get("rss_max") or 0)
                add(g, kr <= GOAL_RSS_RATIO * ar, f"{mib(kr)} / {mib(ar)} = {kr / ar if ar else float('nan'):.2f}")
    return goals


# --------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1,1000", help="comma-separated credential counts (default 1,1000)")
    ap.add_argument("--rounds", type=int, default=2,
                    help="rounds per N at least (default 2); more while the default-interval agent waits anyway")
    ap.add_argument("--max-rounds", type=int, default=6, help="rounds per N at most (default 6)")
    ap.add_argument("--idle", type=float, default=10.0, help="idle window per consumer and round, s (default 10)")
    ap.add_argument("--change", type=float, default=20.0, help="change window per consumer and round, s (default 20)")
    ap.add_argument("--drain", type=float, default=15.0, help="max wait for a consumer to catch up, s (default 15)")
    ap.add_argument("--min-spacing", type=float, default=2.5,
                    help="seconds between two rotations of one credential (default 2.5)")
    ap.add_argument("--min-gap", type=float, default=0.2, help="min seconds between two rotations (default 0.2)")
    ap.add_argument("--no-change-index", dest="change_index", action="store_false",
                    help="no change index: the follower polls every credential's metadata")
    ap.add_argument("--no-default-agent", dest="default_agent", action="store_false",
                    help="skip the agent at its default (5 min) interval")
    ap.add_argument("--default-interval", help=argparse.SUPPRESS)  # harness test only, e.g. "20s"
    ap.add_argument("--quick", action="store_true", help="N = 1 and 20, one round of short windows, "
                                                         "no default-interval agent (~1.5 min)")
    ap.add_argument("--no-build", action="store_true", help="use the existing target/release/keyturn")
    ap.add_argument("--bin", type=Path, help="the keyturn binary to measure (implies --no-build; "
                                             "default target/release/keyturn)")
    ap.add_argument("--keep", action="store_true", help="keep bench/out/agent/ (configs, logs, files)")
    args = ap.parse_args()
    if args.quick:
        args.sizes, args.rounds, args.max_rounds, args.idle, args.change, args.drain = "1,20", 1, 1, 4.0, 8.0, 8.0
        args.default_agent = False
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    if args.bin:
        base.BIN = args.bin.resolve()
        args.no_build = True

    signal.signal(signal.SIGTERM, base._on_signal)
    sys.setswitchinterval(0.001)  # the inotify thread stamps events; keep its wake-up short
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)
    results: dict = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "machine": base.machine_info(),
                     "args": {k: v for k, v in vars(args).items()}, "phases": []}
    audit = watcher = receiver = bao = None
    try:
        if not base.built(args.no_build):
            return 1
        results["bao_version"] = subprocess.run([str(bao_bin()), "version"], capture_output=True,
                                                text=True).stdout.strip()
        audit = AuditSink(CLIENTS["rotating"])
        bao = Bao(OUT, audit.port)
        log(f"own OpenBao (-dev) at {bao.addr}, pid {bao.pid}; audit stream on 127.0.0.1:{audit.port}")
        watcher = Watcher()
        receiver = Receiver()
        tokens = {label: bao.token(disp, OUT / f"token-{label}") for label, disp in CLIENTS.items()}
        key = OUT / "webhook-key"
        fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.write(fd, secrets.token_hex(32).encode())
        os.close(fd)
        tokens["hook-key"] = key
        # The follow nudges' own key (the rotator's nudge webhook sink and the
        # follower's follow_nudge_key_file).
        nkey = OUT / "nudge-key"
        fd = os.open(nkey, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.write(fd, secrets.token_hex(32).encode())
        os.close(fd)
        tokens["nudge-key"] = nkey
        features: dict = {}
        for kind in ("follow", "webhook", "nudge"):
            ok, msg = feature_supported(OUT, bao, tokens["rotating"], key, kind)
            features[kind] = ok
            log(f"{kind}: {'supported' if ok else 'NOT on this branch'}" + ("" if ok else f" ({msg[-200:]})"))
        # The rotator nudges through a webhook sink.
        features["nudge"] = features["nudge"] and features["webhook"]
        results["features"] = features
        run_id = time.strftime("%H%M%S")
        for n in sizes:
            try:
                ph = Phase(n, args, bao, audit, watcher, receiver, features, run_id, tokens)
                r = ph.run()
            except (RuntimeError, subprocess.SubprocessError, OSError) as e:
                log(f"N={n}: FAILED: {e}")
                r = {"n": n, "error": str(e)}
            r["not_measured"] = {}
            if not features["follow"]:
                r["not_measured"]["follow"] = NOT_ON_BRANCH
            if not features["webhook"]:
                r["not_measured"]["webhook"] = NOT_ON_BRANCH
            if not features["nudge"]:
                r["not_measured"]["follow-nudge"] = NOT_ON_BRANCH
            if not args.default_agent:
                r["not_measured"]["agent-default"] = "not measured (--quick / --no-default-agent)"
            results["phases"].append(r)
        results["audit_lines"] = audit.lines
        by_kind: dict[str, dict[str, int]] = {}
        for (name, kind), v in sorted(audit.kinds.items()):
            by_kind.setdefault(name, {})[kind] = v
        results["requests_by_client_and_kind"] = by_kind
        base.finish(results, check_goals, fmt_table, RESULTS)
        return 0
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    finally:
        # Consumers and daemons first, OpenBao (started first) last.
        for p in reversed(list(base._DAEMONS)):
            base.stop_process(p, timeout=15)
        for x in (receiver, watcher, audit):
            if x is not None:
                try:
                    x.close()
                except OSError:
                    pass
        if not args.keep:
            shutil.rmtree(OUT, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
