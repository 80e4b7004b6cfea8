#!/usr/bin/env python3
"""keyturn remote-vault benchmark (issue 3).

Against the real test servers of scripts/services.sh (OpenBao `-dev` and moto),
measures for each server:

  * keyturn end to end: `keyturn rotate all --wait` over N credentials on one
    remote vault (`generate = password`, one file sink each), with 1, 8 and 64
    rotations in flight (`max_concurrent_rotations` = the vault's
    `max_concurrent` = the level), after the initial rotations;
  * the server's raw capacity for the same work: a plain client loop (bao:
    HTTP with http.client + the token; aws: boto3 from the services venv)
    doing, per "rotation", exactly the HTTP calls one keyturn rotation makes,
    with 1, 8 and 64 threads, before and after the keyturn runs;
  * the calls one keyturn rotation makes, counted by a pass-through proxy
    (calibration on a few credentials), and the raw loop's calls through the
    same proxy, to show the two sequences are the same;
  * a time breakdown of keyturn's rotations (a traced run through the proxy,
    64 and 1 in flight): time inside server calls vs between them;
  * the AWS write budget: a second aws run with the default budget (25/s) and
    64 in flight, every write call timestamped by the proxy; the largest
    number of writes in any 1-s window.

The throughput runs set the aws `write_budget` to 100000/s so that the budget
does not cap the capacity measurement; the budget run uses the default.

Prints a table, writes bench/out/remote-results.json; goals are reported,
never asserted. Everything it writes is under bench/out/ (git-ignored). It
starts the services only if they are not running, and then stops them at the
end; every daemon and proxy it starts is stopped on exit, Ctrl-C included.

Python 3.11 standard library (boto3 only inside the services venv, which runs
the AWS raw loop as a child process). Run from anywhere:

    python3 bench/remote.py              # N = 256, 10 s per raw mode
    python3 bench/remote.py --quick      # N = 64, 4 s per raw mode
    python3 bench/remote.py --servers bao --creds 512
"""

from __future__ import annotations

import argparse
import http.client
import http.server
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as base  # noqa: E402  (bench/run.py: daemon, CLI and /proc helpers)

REPO = base.REPO
OUT = base.OUT / "remote"
RESULTS = base.OUT / "remote-results.json"
SERVICES = REPO / "scripts" / "services.sh"
SVC_DIR = REPO / "target" / "test-services"
SVC_PY = SVC_DIR / "venv" / "bin" / "python"
log = base.log

LEVELS = [1, 8, 64]
CREDS_PER_AGENT = 64
THROUGHPUT_BUDGET = 100000.0  # aws write_budget for the throughput runs
DEFAULT_BUDGET = 25.0  # aws write_budget default (src/vaults/aws.rs)
AWS_WRITES = {"CreateSecret", "PutSecretValue", "UpdateSecretVersionStage", "DeleteSecret"}
GOAL_RATIO = 0.8


# --------------------------------------------------------------------------
# Services
# --------------------------------------------------------------------------


def start_services() -> tuple[dict[str, str], bool]:
    """Starts scripts/services.sh unless it already runs. Returns the
    variables of its env file and whether we started it (and must stop it)."""
    running = subprocess.run(["bash", str(SERVICES), "status"], capture_output=True).returncode == 0
    log("test services already running; will leave them running" if running
        else "starting the test services (scripts/services.sh start)")
    r = subprocess.run(["bash", str(SERVICES), "start"], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"services.sh start failed ({r.returncode}): {r.stderr[-2000:]}")
    env_file = Path(r.stdout.strip().splitlines()[-1])
    env = {}
    for line in env_file.read_text().splitlines():
        m = re.match(r"^export ([A-Z0-9_]+)='(.*)'$", line)
        if m:
            env[m.group(1)] = m.group(2)
    for k in ("KEYTURN_TEST_BAO_ADDR", "KEYTURN_TEST_BAO_TOKEN", "KEYTURN_TEST_AWS_ENDPOINT"):
        if k not in env:
            raise RuntimeError(f"{env_file} has no {k}")
    return env, not running


def stop_services() -> None:
    log("stopping the test services (we started them)")
    subprocess.run(["bash", str(SERVICES), "stop"], capture_output=True)


def server_pid(name: str) -> int | None:
    try:
        return int((SVC_DIR / f"{name}.pid").read_text().strip())
    except (OSError, ValueError):
        return None


class CpuOf:
    """CPU use (% of one core) of a few processes over a window."""

    def __init__(self, pids: dict[str, int | None]):
        self.pids = {k: p for k, p in pids.items() if p}
        self.t0 = time.monotonic()
        self.c0 = {k: self._ticks(p) for k, p in self.pids.items()}

    @staticmethod
    def _ticks(pid: int) -> int | None:
        try:
            return base.proc_cpu_ticks(pid)
        except (OSError, IndexError, ValueError):
            return None

    def end(self) -> dict[str, float]:
        wall = time.monotonic() - self.t0
        out = {}
        for k, p in self.pids.items():
            c1 = self._ticks(p)
            if c1 is not None and self.c0[k] is not None:
                out[k] = round(100.0 * (c1 - self.c0[k]) / base.CLK_TCK / wall, 1)
        return out


# --------------------------------------------------------------------------
# A counting pass-through proxy
# --------------------------------------------------------------------------

HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "te", "trailer", "upgrade",
       "content-length"}
BAO_PATH = re.compile(r"^/v1/([^/]+)/(data|metadata|destroy|delete|undelete)/(keyturn-pending/)?(.*)$")


class CountingProxy:
    """HTTP/1.1 keep-alive pass-through to one upstream that records every
    request: (arrival time, operation, secret key, status). The operation is
    the AWS action (X-Amz-Target) or, for bao, `METHOD kind` (`GET data`,
    `POST data[pending]`, `GET data?version`, `DELETE metadata[pending]`...)."""

    def __init__(self, upstream: str):
        u = urllib.parse.urlsplit(upstream)
        self.up_host, self.up_port = u.hostname, u.port
        self.events: list[tuple[float, str, str, int]] = []
        # (arrival, response sent, op, key), for the time breakdown of a rotation
        self.spans: list[tuple[float, float, str, str]] = []
        self.lock = threading.Lock()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            # TCP_NODELAY: without it, Nagle on our side and the client's
            # delayed ACK add ~40 ms to every call that we answer in two writes.
            disable_nagle_algorithm = True

            def log_message(self, *a):  # noqa: D401 - quiet
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    out = b""
                    while True:
                        size = int(self.rfile.readline().split(b";")[0], 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            return out
                        out += self.rfile.read(size)
                        self.rfile.readline()
                n = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(n) if n else b""

            def _forward(self):
                t = time.monotonic()
                body = self._body()
                op, key = proxy.classify(self.command, self.path, self.headers, body)
                for attempt in (0, 1):
                    up = getattr(self, "_up", None)
                    if up is None:
                        up = self._up = http.client.HTTPConnection(proxy.up_host, proxy.up_port, timeout=120)
                        up.connect()
                        up.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    try:
                        up.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
                        for k, v in self.headers.items():
                            if k.lower() not in HOP:
                                up.putheader(k, v)
                        if body or self.command in ("POST", "PUT", "PATCH"):
                            up.putheader("Content-Length", str(len(body)))
                        up.endheaders(body or None)
                        resp = up.getresponse()
                        data = resp.read()
                        break
                    except (OSError, http.client.HTTPException):
                        # A kept-alive upstream connection may have been closed.
                        up.close()
                        self._up = None
                        if attempt:
                            self.send_error(502)
                            return
                with proxy.lock:
                    proxy.events.append((t, op, key, resp.status))
                    proxy.spans.append((t, time.monotonic(), op, key))
                self.send_response_only(resp.status, resp.reason)
                for k, v in resp.getheaders():
                    if k.lower() not in HOP:
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                # Headers and body in one write (end_headers would flush alone).
                self._headers_buffer.append(b"\r\n")
                if self.command != "HEAD":
                    self._headers_buffer.append(data)
                self.wfile.write(b"".join(self._headers_buffer))
                self._headers_buffer = []

            do_GET = do_PUT = do_POST = do_DELETE = do_PATCH = do_HEAD = do_LIST = _forward

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    @staticmethod
    def classify(method: str, path: str, headers, body: bytes) -> tuple[str, str]:
        target = headers.get("X-Amz-Target")
        if target:
            op = target.rsplit(".", 1)[-1]
            try:
                j = json.loads(body or b"{}")
                key = j.get("SecretId") or j.get("Name") or ""
            except ValueError:
                key = ""
            return op, key
        p, _, q = path.partition("?")
        m = BAO_PATH.match(p)
        if not m:
            return f"{method} {p}", ""
        kind = m.group(2) + ("[pending]" if m.group(3) else "") + ("?version" if "version=" in q else "")
        return f"{method} {kind}", m.group(4)

    def take(self) -> list[tuple[float, str, str, int]]:
        with self.lock:
            ev, self.events, self.spans = self.events, [], []
        return ev

    def take_spans(self) -> list[tuple[float, float, str, str]]:
        with self.lock:
            sp, self.events, self.spans = self.spans, [], []
        return sp

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def sequences(events: list[tuple[float, str, str, int]]) -> dict[str, list[str]]:
    """The operations per secret key, in arrival order."""
    out: dict[str, list[str]] = {}
    for _, op, key, status in sorted(events):
        out.setdefault(key, []).append(f"{op} -> {status}")
    return out


def summarize_calls(events, rotations: int) -> dict:
    by_op: dict[str, int] = {}
    for _, op, _, _ in events:
        by_op[op] = by_op.get(op, 0) + 1
    seqs = sequences(events)
    distinct: dict[str, int] = {}
    for s in seqs.values():
        distinct[" | ".join(s)] = distinct.get(" | ".join(s), 0) + 1
    common = max(distinct.items(), key=lambda kv: kv[1])[0] if distinct else ""
    return {
        "rotations": rotations,
        "calls": len(events),
        "calls_per_rotation": round(len(events) / max(rotations, 1), 2),
        "by_op_per_rotation": {k: round(v / max(rotations, 1), 2) for k, v in sorted(by_op.items())},
        "sequence": common.split(" | ") if common else [],
        "distinct_sequences": len(distinct),
    }


def max_in_window(times: list[float], window: float = 1.0) -> tuple[int, float]:
    """Largest number of events in any half-open window [t, t + window), and
    the window's start (relative to the first event)."""
    times = sorted(times)
    best, at, j = 0, 0.0, 0
    for i, t in enumerate(times):
        while times[j] <= t - window:
            j += 1
        if i - j + 1 > best:
            best, at = i - j + 1, times[j] - times[0]
    return best, at


# --------------------------------------------------------------------------
# keyturn side
# --------------------------------------------------------------------------


def write_config(d: Path, server: str, env: dict[str, str], n: int, level: int, prefix: str,
                 address: str, budget: float | None) -> tuple[Path, list[tuple[str, str]]]:
    """d/keyturn.toml: n password credentials on one remote vault, one raw
    file sink each. Returns it and the expected delivered (agent, file)."""
    (d / "agents").mkdir(parents=True, exist_ok=True)
    lines = [
        "[daemon]",
        f'state_dir = "{d}/state"',
        f'socket = "{d}/control.sock"',
        f'delivery_roots = ["{d}/agents"]',
        'drain_timeout = "30s"',
        f"max_concurrent_rotations = {level}",
        'retry = { initial_delay = "500ms", max_delay = "10s", max_attempts = 5 }',
        "",
    ]
    if server == "bao":
        token_file = d / "bao-token"
        if not token_file.exists():
            fd = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            os.write(fd, env["KEYTURN_TEST_BAO_TOKEN"].encode())
            os.close(fd)
        lines += ["[vaults.remote]", 'type = "vault"', f'address = "{address}"', 'mount = "secret"',
                  f'token_file = "{token_file}"', f"max_concurrent = {level}", ""]
    else:
        lines += ["[vaults.remote]", 'type = "aws_secrets_manager"', f'endpoint_url = "{address}"',
                  f'region = "{env.get("AWS_REGION", "us-east-1")}"', f'secret_prefix = "{prefix}/"']
        if budget is not None:
            lines.append(f"write_budget = {budget:g}")
        lines += [f"max_concurrent = {level}", ""]
    expected = []
    for a in range((n + CREDS_PER_AGENT - 1) // CREDS_PER_AGENT):
        aid = f"a{a:03d}"
        lines += [f"[agents.{aid}]", 'owner = "bench@example.com"', 'tenant = "bench"', 'tier = "low"', ""]
        for i in range(min(CREDS_PER_AGENT, n - a * CREDS_PER_AGENT)):
            cid = f"c{i:03d}"
            expected.append((aid, cid))
            path = f"{prefix}/{aid}/{cid}" if server == "bao" else f"{aid}/{cid}"
            lines += [
                f"[agents.{aid}.credentials.{cid}]",
                'vault = "remote"',
                f'path = "{path}"',
                'generate = { kind = "password", length = 32 }',
                'every = "24h"',
                'jitter = "1h"',
                'grace = "1h"',
                f'deliver = [{{ type = "file", path = "{aid}/{cid}" }}]',
                "",
            ]
    cfg = d / "keyturn.toml"
    cfg.write_text("\n".join(lines))
    return cfg, expected


def wait_initial(dm: base.Daemon, cfg: Path, expected: list[tuple[str, str]], timeout: float) -> float:
    """Waits until every credential is delivered and settled; returns seconds."""
    n = len(expected)
    by_dir: dict[str, set[str]] = {}
    for aid, name in expected:
        by_dir.setdefault(aid, set()).add(name)
    t0 = time.monotonic()
    deadline = t0 + timeout
    last = t0
    while True:
        done = base.count_delivered(cfg.parent / "agents", by_dir)
        if done >= n:
            break
        if dm.proc.poll() is not None:
            raise RuntimeError(f"daemon exited ({dm.proc.returncode}); see {dm.log_path}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {done}/{n} initial deliveries after {timeout:.0f}s; see {dm.log_path}")
        if time.monotonic() - last > 15:
            log(f"    {done}/{n} delivered")
            last = time.monotonic()
        time.sleep(0.2)
    wait_settled(cfg, n, 120)
    return time.monotonic() - t0


def wait_settled(cfg: Path, n: int, timeout: float) -> None:
    t0 = time.monotonic()
    while True:
        rows = base.status_json(cfg)
        states: dict[str, int] = {}
        for row in rows:
            states[row["state"]] = states.get(row["state"], 0) + 1
        rotated = sum(1 for row in rows if row.get("version"))
        if len(rows) == n and states.get("idle", 0) + states.get("retiring", 0) == n and rotated == n:
            return
        if time.monotonic() - t0 > timeout:
            raise RuntimeError(f"rotations not all settled: {states}, {rotated} with a version")
        time.sleep(0.5)


def rotate_all(cfg: Path, dm: base.Daemon, n: int, pids: dict[str, int | None]) -> dict:
    cpu = CpuOf({"keyturn": dm.pid, **pids})
    t0 = time.monotonic()
    r = base.cli(cfg, "rotate", "all", "--wait", timeout=max(600, n))
    wall = time.monotonic() - t0
    out_lines = r.stdout.decode(errors="replace").splitlines()
    res = {
        "wall_s": round(wall, 3),
        "rotations": n,
        "rotations_per_s": round(n / wall, 1),
        "exit_code": r.returncode,
        "failed": sum(1 for ln in out_lines if "FAILED" in ln),
        "cpu_pct_of_one_core": cpu.end(),
    }
    if r.returncode != 0:
        res["stderr"] = r.stderr.decode(errors="replace")[:2000]
    return res


def keyturn_levels(server: str, env: dict, address: str, n: int, prefix: str, pids: dict) -> dict:
    """The initial rotations and a second one (64 in flight), then `rotate
    all --wait` at each level, the daemon restarted with the level's config
    (state kept): every measured rotation is the third or later."""
    d = OUT / f"{server}-keyturn"
    if d.exists():
        shutil.rmtree(d)
    budget = THROUGHPUT_BUDGET if server == "aws" else None
    res: dict = {"n": n, "levels": {}}
    cfg, expected = write_config(d, server, env, n, max(LEVELS), prefix, address, budget)
    dm = base.Daemon(cfg, "initial")
    try:
        dm.wait_ready(120)
        log(f"  {server}: waiting for {n} initial rotations ({max(LEVELS)} in flight)")
        s = wait_initial(dm, cfg, expected, max(600, n))
        res["initial_s"] = round(s, 2)
        log(f"  {server}: initial rotations in {s:.1f}s; one more `rotate all` so that every measured "
            f"rotation is a steady-state one (retires the version before the current)")
        res["warmup_rotate_all"] = rotate_all(cfg, dm, n, {})
    finally:
        dm.stop()
    for level in LEVELS:
        cfg, _ = write_config(d, server, env, n, level, prefix, address, budget)
        dm = base.Daemon(cfg, f"l{level}")
        try:
            dm.wait_ready(120)
            wait_settled(cfg, n, 120)
            time.sleep(1)
            # Twice, the best counts (the raw side is also the best of two passes).
            tries = []
            for _ in range(2):
                tries.append(rotate_all(cfg, dm, n, pids))
                wait_settled(cfg, n, 120)
            r = dict(max(tries, key=lambda x: x["rotations_per_s"]))
            r["tries_rot_per_s"] = [x["rotations_per_s"] for x in tries]
            res["levels"][str(level)] = r
            log(f"  {server}: keyturn, {level:>2} in flight: {r['rotations_per_s']:8.1f} rot/s {r['tries_rot_per_s']} "
                f"({r['wall_s']:.1f}s, exit {r['exit_code']}, {r['failed']} failed) CPU {r['cpu_pct_of_one_core']}")
        finally:
            dm.stop()
    return res


def calibrate(server: str, env: dict, upstream: str, n: int, prefix: str) -> dict:
    """Counts the calls of keyturn's rotations through the proxy: the initial
    rotation, the second, and the third (steady state: every rotation from
    the third on first retires the version before the current one)."""
    d = OUT / f"{server}-calibrate"
    if d.exists():
        shutil.rmtree(d)
    proxy = CountingProxy(upstream)
    try:
        cfg, expected = write_config(d, server, env, n, 1, prefix, proxy.url,
                                     THROUGHPUT_BUDGET if server == "aws" else None)
        dm = base.Daemon(cfg, "cal")
        try:
            dm.wait_ready(120)
            proxy.take()  # start-up calls (if any) are not a rotation's
            wait_initial(dm, cfg, expected, 300)
            initial = summarize_calls(proxy.take(), n)
            # The second rotation has no previous version to retire yet; the
            # third and every later one do: that is the steady state.
            second = third = None
            for k in (2, 3):
                r = base.cli(cfg, "rotate", "all", "--wait", timeout=600)
                if r.returncode != 0:
                    raise RuntimeError(f"calibration rotate all failed: {r.stderr.decode(errors='replace')[:500]}")
                if k == 2:
                    second = summarize_calls(proxy.take(), n)
                else:
                    third = summarize_calls(proxy.take(), n)
            steady = third
        finally:
            dm.stop()
    finally:
        proxy.close()
    shutil.rmtree(d, ignore_errors=True)
    return {"initial": initial, "second": second, "steady": steady}


def breakdown(spans: list[tuple[float, float, str, str]]) -> dict:
    """Where a rotation's time goes, from the proxy's view of its calls: time
    inside server calls (arrival to response, proxy included) and the gaps
    between them, which are keyturn's own work (state DB commits, audit,
    generation, the file sink) and its queueing. Gaps are labelled by the
    calls around them, averaged over the rotations of the common sequence."""
    per_key: dict[str, list] = {}
    for sp in sorted(spans):
        per_key.setdefault(sp[3], []).append(sp)
    seqs: dict[tuple, list] = {}
    for calls in per_key.values():
        seqs.setdefault(tuple(c[2] for c in calls), []).append(calls)
    if not seqs:
        return {}
    seq, rots = max(seqs.items(), key=lambda kv: len(kv[1]))
    n = len(rots)
    call_ms = [sum(r[i][1] - r[i][0] for r in rots) * 1000 / n for i in range(len(seq))]
    gap_ms = [sum(r[i + 1][0] - r[i][1] for r in rots) * 1000 / n for i in range(len(seq) - 1)]
    total = sum((r[-1][1] - r[0][0]) for r in rots) * 1000 / n
    gaps = sorted(((f"{seq[i]} .. {seq[i + 1]}", round(g, 2)) for i, g in enumerate(gap_ms)), key=lambda kv: -kv[1])
    return {
        "rotations": n,
        "first_call_to_last_response_ms": round(total, 2),
        "in_server_calls_ms": round(sum(call_ms), 2),
        "between_calls_ms": round(sum(gap_ms), 2),
        "calls_ms": [(seq[i], round(c, 2)) for i, c in enumerate(call_ms)],
        "largest_gaps_ms": gaps[:6],
    }


def profile(server: str, env: dict, upstream: str, n: int, prefix: str) -> dict:
    """A traced keyturn run through the proxy: the time breakdown of a
    steady-state rotation with 64 and with 1 in flight."""
    d = OUT / f"{server}-profile"
    if d.exists():
        shutil.rmtree(d)
    proxy = CountingProxy(upstream)
    out: dict = {}
    budget = THROUGHPUT_BUDGET if server == "aws" else None
    try:
        for level in (64, 1):
            cfg, expected = write_config(d, server, env, n, level, prefix, proxy.url, budget)
            dm = base.Daemon(cfg, f"prof{level}")
            try:
                dm.wait_ready(120)
                if level == 64:
                    wait_initial(dm, cfg, expected, max(600, n))
                    rotate_all(cfg, dm, n, {})  # the second rotation: not steady state yet
                wait_settled(cfg, n, 120)
                proxy.take()
                t0 = time.monotonic()
                r = rotate_all(cfg, dm, n, {})
                spans = proxy.take_spans()
                b = breakdown(spans)
                b["rotations_per_s_through_proxy"] = r["rotations_per_s"]
                b["wall_s"] = round(time.monotonic() - t0, 2)
                # From the first call of the run to the last response: how much
                # of the rotate-all wall time the calls cover.
                if spans:
                    b["calls_span_s"] = round(max(x[1] for x in spans) - min(x[0] for x in spans), 2)
                out[str(level)] = b
                log(f"  {server} profile, {level:>2} in flight: {r['rotations_per_s']} rot/s via proxy; per rotation "
                    f"{b.get('first_call_to_last_response_ms')} ms = {b.get('in_server_calls_ms')} ms in calls + "
                    f"{b.get('between_calls_ms')} ms between; largest gaps {b.get('largest_gaps_ms', [])[:3]}")
            finally:
                dm.stop()
    finally:
        proxy.close()
    shutil.rmtree(d, ignore_errors=True)
    return out


# --------------------------------------------------------------------------
# Raw side
# --------------------------------------------------------------------------


class BaoRaw:
    """One keyturn rotation's KV v2 calls, over a kept-alive http.client
    connection per thread (as keyturn's reqwest pool keeps its connections).

    Per steady-state rotation of path p (latest version L, pending slot absent),
    in keyturn's order (docs/vault-calls.md, src/vaults/hashicorp/):
      retire L-1:  GET data/p; GET data/p?version=L-1; POST destroy/p [L-1]
      stage:       POST data/pending/p (cas 0: a fresh stage into the empty slot)
      promote:     GET data/pending/p; GET data/p; POST data/p (cas L);
                   DELETE metadata/pending/p
    (the engine keeps the staged value for set, test and deliver; promote's
    read of data/p answers its check; L-1 was destroyed by retire already).
    The calibration compares this with what keyturn sent.
    """

    def __init__(self, address: str, token: str, mount: str = "secret"):
        u = urllib.parse.urlsplit(address)
        self.host, self.port, self.token, self.mount = u.hostname, u.port, token, mount
        self.local = threading.local()
        self.calls = 0
        self.lock = threading.Lock()

    def _conn(self) -> http.client.HTTPConnection:
        c = getattr(self.local, "c", None)
        if c is None:
            c = self.local.c = http.client.HTTPConnection(self.host, self.port, timeout=60)
        return c

    def req(self, method: str, path: str, body: dict | None = None, ok=(200, 204, 404)) -> dict | None:
        data = json.dumps(body).encode() if body is not None else None
        hdr = {"X-Vault-Token": self.token}
        if data is not None:
            hdr["Content-Type"] = "application/json"
        for attempt in (0, 1):
            c = self._conn()
            try:
                c.request(method, f"/v1/{self.mount}/{path}", body=data, headers=hdr)
                r = c.getresponse()
                raw = r.read()
                break
            except (OSError, http.client.HTTPException):
                c.close()
                self.local.c = None
                if attempt:
                    raise
        self.local.calls = getattr(self.local, "calls", 0) + 1
        if r.status not in ok:
            raise RuntimeError(f"bao {method} {path}: HTTP {r.status}")
        if r.status == 404 or not raw:
            return None
        return json.loads(raw)

    def rotate(self, p: str, seq: int) -> None:
        rid = f"{os.getpid():08x}{threading.get_ident() & 0xffffffff:08x}{seq:016x}"[-32:]
        value = os.urandom(16).hex()
        pend = f"keyturn-pending/{p}"
        # retire the version before the current
        cur = self.req("GET", f"data/{p}")
        latest = cur["data"]["metadata"]["version"] if cur else 0
        if latest >= 2:
            self.req("GET", f"data/{p}?version={latest - 1}")
            self.req("POST", f"destroy/{p}", {"versions": [latest - 1]})
        # stage (fresh: one write, cas 0)
        self.req("POST", f"data/{pend}", {"options": {"cas": 0},
                                          "data": {"value": value, "keyturn_rotation": rid}})
        # promote
        slot = self.req("GET", f"data/{pend}")
        cur = self.req("GET", f"data/{p}")
        latest = cur["data"]["metadata"]["version"] if cur else 0
        self.req("POST", f"data/{p}", {"options": {"cas": latest}, "data": slot["data"]["data"]})
        self.req("DELETE", f"metadata/{pend}")

    def calls_done(self) -> int:
        return getattr(self.local, "calls", 0)


def raw_bao_measure(raw: BaoRaw, paths: list[str], threads: int, seconds: float, pids: dict) -> dict:
    counts, calls, errors = [0] * threads, [0] * threads, []
    stop_at = [0.0]

    def worker(t: int) -> None:
        mine = paths[t::threads]
        i = 0
        try:
            while time.monotonic() < stop_at[0]:
                raw.rotate(mine[i % len(mine)], i)
                i += 1
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)
        counts[t], calls[t] = i, raw.calls_done()

    cpu = CpuOf({"bench (client)": os.getpid(), **pids})
    wall = base.run_workers(worker, threads, seconds, stop_at)
    if errors:
        raise RuntimeError(f"raw bao loop: {errors[0]}")
    return {"threads": threads, "wall_s": round(wall, 2), "rotations": sum(counts),
            "rotations_per_s": round(sum(counts) / wall, 1), "calls": sum(calls),
            "calls_per_s": round(sum(calls) / wall, 1), "cpu_pct_of_one_core": cpu.end()}


# The AWS raw loop runs in the services venv (boto3 is there, moto needs it):
# a small program fed its parameters as JSON on stdin, answering JSON on stdout.
AWS_RAW = r'''
import json, os, sys, threading, time, uuid
import boto3
from botocore.config import Config
p = json.loads(sys.stdin.readline())
cfg = Config(retries={"total_max_attempts": 1}, max_pool_connections=max(10, p["threads"] + 4),
             connect_timeout=10, read_timeout=60)
sm = boto3.client("secretsmanager", endpoint_url=p["endpoint"], region_name=p["region"], config=cfg)
n = p["threads"]
calls = [0] * n

def labels(t, s):
    calls[t] += 1
    try:
        return sm.describe_secret(SecretId=s).get("VersionIdsToStages", {})
    except sm.exceptions.ResourceNotFoundException:
        return None

def update(t, s, stage, move=None, remove=None):
    kw = {"SecretId": s, "VersionStage": stage}
    if move: kw["MoveToVersionId"] = move
    if remove: kw["RemoveFromVersionId"] = remove
    calls[t] += 1
    sm.update_secret_version_stage(**kw)

def rotate(t, s):
    # One steady-state keyturn rotation (docs/vault-calls.md, src/vaults/aws/):
    # retire the previous, stage, promote (its DescribeSecret answers the
    # engine's check; the engine keeps the staged value for delivery).
    v = labels(t, s)
    prev = next((i for i, l in (v or {}).items() if "AWSPREVIOUS" in l), None)
    if prev:
        update(t, s, "AWSPREVIOUS", remove=prev)
    rid = uuid.uuid4().hex
    if labels(t, s) is None:
        calls[t] += 1
        sm.create_secret(Name=s, Description="keyturn raw benchmark")
    calls[t] += 1
    sm.put_secret_value(SecretId=s, ClientRequestToken=rid, SecretString=os.urandom(16).hex(),
                        VersionStages=["AWSPENDING"])
    v = labels(t, s)
    cur = next((i for i, l in v.items() if "AWSCURRENT" in l), None)
    if cur != rid:
        update(t, s, "AWSCURRENT", move=rid, remove=cur)
    update(t, s, "AWSPENDING", remove=rid)

def worker(t, mine, stop_at, counts, errors):
    i = 0
    try:
        while (i < len(mine)) if p["once"] else (time.monotonic() < stop_at):
            rotate(t, mine[i % len(mine)])
            i += 1
    except BaseException as e:
        errors.append(repr(e))
    counts[t] = i

counts, errors = [0] * n, []
print("GO", flush=True)
c0 = time.process_time()
t0 = time.monotonic()
stop_at = t0 + p["seconds"]
ths = [threading.Thread(target=worker, args=(t, p["secrets"][t::n], stop_at, counts, errors)) for t in range(n)]
for th in ths: th.start()
for th in ths: th.join()
wall = time.monotonic() - t0
print(json.dumps({"rotations": sum(counts), "calls": sum(calls), "wall_s": wall,
                  "client_cpu_pct": 100.0 * (time.process_time() - c0) / wall, "errors": errors[:3]}))
'''


def raw_aws(endpoint: str, region: str, secrets: list[str], threads: int, seconds: float, once: bool,
            pids: dict) -> dict:
    params = {"endpoint": endpoint, "region": region, "secrets": secrets, "threads": threads,
              "seconds": seconds, "once": once}
    proc = subprocess.Popen([str(SVC_PY), "-c", AWS_RAW], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=dict(os.environ), text=True, start_new_session=True)
    base._DAEMONS.append(proc)  # stopped on exit like the daemons
    try:
        proc.stdin.write(json.dumps(params) + "\n")
        proc.stdin.close()
        go = proc.stdout.readline()  # after boto3's import: the loop starts now
        cpu = CpuOf(pids)
        out = proc.stdout.read()
        proc.wait(timeout=60)
        cpu_pct = cpu.end()
        err = proc.stderr.read()
    finally:
        if proc in base._DAEMONS:
            base._DAEMONS.remove(proc)
    if proc.returncode != 0 or go.strip() != "GO":
        raise RuntimeError(f"raw aws loop exited {proc.returncode}: {err[-1500:]}")
    r = json.loads(out.strip().splitlines()[-1])
    if r["errors"]:
        raise RuntimeError(f"raw aws loop: {r['errors']}")
    wall = r["wall_s"]
    cpu_pct["bench (client)"] = round(r["client_cpu_pct"], 1)
    return {"threads": threads, "wall_s": round(wall, 2), "rotations": r["rotations"],
            "rotations_per_s": round(r["rotations"] / wall, 1), "calls": r["calls"],
            "calls_per_s": round(r["calls"] / wall, 1), "cpu_pct_of_one_core": cpu_pct}


class RawSide:
    """Prepares raw secrets in keyturn's steady state (two versions, no
    pending) and measures the raw loop at a number of threads."""

    def __init__(self, server: str, env: dict, address: str, prefix: str, n: int, pids: dict):
        self.server, self.env, self.address, self.n, self.pids = server, env, address, n, pids
        if server == "bao":
            self.paths = [f"{prefix}-raw/s{i:04d}" for i in range(n)]
            self.bao = BaoRaw(address, env["KEYTURN_TEST_BAO_TOKEN"])
        else:
            self.paths = [f"{prefix}-raw/s{i:04d}" for i in range(n)]
        self.region = env.get("AWS_REGION", "us-east-1")

    def prepare(self) -> None:
        # Two rotations each: the first creates, the second leaves a previous.
        for _ in range(2):
            if self.server == "bao":
                ths = [threading.Thread(target=lambda ps=self.paths[t::8]: [self.bao.rotate(p, 0) for p in ps])
                       for t in range(8)]
                for th in ths:
                    th.start()
                for th in ths:
                    th.join()
            else:
                raw_aws(self.address, self.region, self.paths, 8, 0, True, {})

    def measure(self, threads: int, seconds: float) -> dict:
        if self.server == "bao":
            return raw_bao_measure(self.bao, self.paths, threads, seconds, self.pids)
        return raw_aws(self.address, self.region, self.paths, threads, seconds, False, self.pids)

    def calls_through_proxy(self, count: int) -> dict:
        """One raw rotation of `count` secrets through a counting proxy."""
        proxy = CountingProxy(self.address)
        try:
            some = self.paths[:count]
            if self.server == "bao":
                raw = BaoRaw(proxy.url, self.env["KEYTURN_TEST_BAO_TOKEN"])
                for p in some:
                    raw.rotate(p, 99)
            else:
                raw_aws(proxy.url, self.region, some, 1, 0, True, {})
            return summarize_calls(proxy.take(), count)
        finally:
            proxy.close()


# --------------------------------------------------------------------------
# Budget check
# --------------------------------------------------------------------------


def daemon_write_times(log_path: Path) -> list[float]:
    """Seconds (epoch) of each `write slot taken` line of a daemon log: when
    keyturn sent each budgeted write, by its own clock."""
    import datetime
    out = []
    for line in log_path.read_text(errors="replace").splitlines():
        if "write slot taken" not in line:
            continue
        stamp = line.split()[0]
        try:
            t = datetime.datetime.fromisoformat(stamp.replace("Z", "+00:00"))
        except ValueError:
            continue
        out.append(t.timestamp())
    return sorted(out)


def budget_run(env: dict, upstream: str, n: int, prefix: str) -> dict:
    """aws, default write budget, 64 in flight, every call through the proxy:
    the initial rotations and one `rotate all --wait`."""
    d = OUT / "aws-budget"
    if d.exists():
        shutil.rmtree(d)
    proxy = CountingProxy(upstream)
    try:
        cfg, expected = write_config(d, "aws", env, n, 64, prefix, proxy.url, None)
        # Each budgeted write is logged (debug, with a timestamp) by the
        # daemon, so the budget is also counted from keyturn's own side.
        dm = base.Daemon(cfg, "budget", {"KEYTURN_LOG": "info,keyturn::vaults::budget=debug"})
        try:
            dm.wait_ready(120)
            t0 = time.monotonic()
            wait_initial(dm, cfg, expected, max(600, n))
            t_init = time.monotonic() - t0
            t1 = time.monotonic()
            r = base.cli(cfg, "rotate", "all", "--wait", timeout=max(600, n))
            t_rot = time.monotonic() - t1
        finally:
            dm.stop()
    finally:
        proxy.close()
    events = proxy.take()
    sent = daemon_write_times(dm.log_path)
    most_sent, _ = max_in_window(sent)
    writes = [t for t, op, _, _ in events if op in AWS_WRITES]
    rot_writes = [t for t in writes if t >= t1]
    most, at = max_in_window(writes)
    most_rot, _ = max_in_window(rot_writes)
    # Writes per whole second since the first write, for the JSON.
    per_sec: dict[int, int] = {}
    for t in writes:
        per_sec[int(t - writes[0])] = per_sec.get(int(t - writes[0]), 0) + 1
    shutil.rmtree(d, ignore_errors=True)
    return {
        "n": n, "level": 64, "write_budget": DEFAULT_BUDGET, "write_budget_set_in_config": False,
        "initial_s": round(t_init, 2), "rotate_all_s": round(t_rot, 2), "rotate_all_exit": r.returncode,
        "rotations_per_s": round(n / t_rot, 2),
        "writes": len(writes), "calls": len(events),
        "throttled_responses": sum(1 for e in events if e[3] in (400, 429) and e[1] in AWS_WRITES),
        "writes_per_s_avg_rotate_all": round(len(rot_writes) / max(t_rot, 1e-9), 2),
        "max_writes_any_1s_window": most, "max_window_start_s": round(at, 3),
        "writes_sent_by_keyturn": len(sent), "max_writes_sent_any_1s_window": most_sent,
        "max_writes_any_1s_window_rotate_all": most_rot,
        "writes_per_whole_second": [per_sec.get(i, 0) for i in range(max(per_sec) + 1)] if per_sec else [],
    }


# --------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------


def bench_server(server: str, env: dict, n: int, raw_seconds: float, cal_n: int, run_id: str,
                 profile_on: bool = True) -> dict:
    address = env["KEYTURN_TEST_BAO_ADDR"] if server == "bao" else env["KEYTURN_TEST_AWS_ENDPOINT"]
    pids = {server: server_pid("bao" if server == "bao" else "moto")}
    res: dict = {"address": address}
    log(f"{server}: calibration: {cal_n} credentials through a counting proxy")
    res["keyturn_calls"] = calibrate(server, env, address, cal_n, f"bench-{run_id}-cal")
    st = res["keyturn_calls"]["steady"]
    log(f"{server}: keyturn: {st['calls_per_rotation']} calls per steady-state rotation "
        f"({st['distinct_sequences']} distinct sequence(s)): {st['by_op_per_rotation']}")

    raw = RawSide(server, env, address, f"bench-{run_id}", n, pids)
    log(f"{server}: raw: preparing {n} secrets")
    raw.prepare()
    rc = raw.calls_through_proxy(cal_n)
    res["raw_calls"] = rc
    same = rc["sequence"] == st["sequence"] and rc["by_op_per_rotation"] == st["by_op_per_rotation"]
    res["raw_calls_match_keyturn"] = same
    log(f"{server}: raw loop: {rc['calls_per_rotation']} calls per rotation; "
        f"{'same sequence as keyturn' if same else 'DIFFERS from keyturn: ' + json.dumps(rc['sequence'])}")

    modes = []

    def raw_pass(when: str) -> None:
        for t in LEVELS:
            m = raw.measure(t, raw_seconds)
            m["when"] = when
            modes.append(m)
            log(f"  {server}: raw, {t:>2} threads ({when}): {m['rotations_per_s']:8.1f} rot/s, "
                f"{m['calls_per_s']:8.1f} calls/s, CPU {m['cpu_pct_of_one_core']}")

    raw_pass("before")
    res["keyturn"] = keyturn_levels(server, env, address, n, f"bench-{run_id}", pids)
    raw_pass("after")
    res["raw"] = modes
    if profile_on:
        log(f"{server}: profile: a traced run through the proxy ({n} credentials)")
        res["profile"] = profile(server, env, address, n, f"bench-{run_id}-prof")
    best = max(modes, key=lambda m: m["rotations_per_s"])
    res["raw_capacity_rot_per_s"] = best["rotations_per_s"]
    res["raw_capacity_at"] = f"{best['threads']} threads, {best['when']}"
    cpr = st["calls_per_rotation"]
    for level in LEVELS:
        k = res["keyturn"]["levels"][str(level)]
        same_level = max((m for m in modes if m["threads"] == level), key=lambda m: m["rotations_per_s"])
        k["raw_same_level_rot_per_s"] = same_level["rotations_per_s"]
        k["ratio_same_level"] = round(k["rotations_per_s"] / same_level["rotations_per_s"], 3)
        k["ratio_to_capacity"] = round(k["rotations_per_s"] / best["rotations_per_s"], 3)
        k["server_calls_per_s"] = round(k["rotations_per_s"] * cpr, 1)
        k["raw_server_calls_per_s"] = same_level["calls_per_s"]
    return res


def fmt_table(results: dict) -> str:
    head = ["server", "in flight", "keyturn rot/s", "raw rot/s (same threads, best of 2)", "ratio",
            "keyturn server calls/s", "raw server calls/s", "keyturn CPU", "server CPU"]
    rows = []
    for server, r in results["servers"].items():
        for level in LEVELS:
            k = r["keyturn"]["levels"][str(level)]
            cpu = k["cpu_pct_of_one_core"]
            rows.append([server, str(level), f"{k['rotations_per_s']:,.1f}", f"{k['raw_same_level_rot_per_s']:,.1f}",
                         f"{k['ratio_same_level']:.2f}", f"{k['server_calls_per_s']:,.0f}",
                         f"{k['raw_server_calls_per_s']:,.0f}", f"{cpu.get('keyturn', 0):.0f} %",
                         f"{cpu.get(server, 0):.0f} %"])
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]
    lines = ["| " + " | ".join(h.ljust(w) for h, w in zip(head, widths)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |")
    lines.append("")
    for server, r in results["servers"].items():
        lines.append(f"{server}: raw capacity = best raw figure = {r['raw_capacity_rot_per_s']:,.1f} rot/s "
                     f"({r['raw_capacity_at']}); calls per rotation: keyturn "
                     f"{r['keyturn_calls']['steady']['calls_per_rotation']}, raw {r['raw_calls']['calls_per_rotation']}"
                     f" ({'same sequence' if r['raw_calls_match_keyturn'] else 'different sequence'})")
        for m in r["raw"]:
            lines.append(f"    raw {m['threads']:>2} threads ({m['when']}): {m['rotations_per_s']:,.1f} rot/s, "
                         f"CPU {m['cpu_pct_of_one_core']}")
    b = results.get("budget")
    if b:
        lines.append(f"aws budget run (default write_budget {b['write_budget']:g}/s, 64 in flight, N={b['n']}): "
                     f"max writes in any 1-s window {b['max_writes_any_1s_window']} "
                     f"(rotate-all phase {b['max_writes_any_1s_window_rotate_all']}), "
                     f"avg {b['writes_per_s_avg_rotate_all']}/s in rotate all, {b['rotations_per_s']} rot/s")
    return "\n".join(lines)


def check_goals(results: dict) -> list[dict]:
    goals = []
    for server, r in results["servers"].items():
        k = r["keyturn"]["levels"]["64"]
        goals.append({"goal": f"{server}: keyturn rot/s at 64 in flight >= {GOAL_RATIO} x raw capacity",
                      "pass": k["ratio_to_capacity"] >= GOAL_RATIO,
                      "measured": f"{k['rotations_per_s']:,.1f} / {r['raw_capacity_rot_per_s']:,.1f} = "
                                  f"{k['ratio_to_capacity']:.2f} (same-level raw: {k['ratio_same_level']:.2f})"})
    b = results.get("budget")
    if b:
        goals.append({"goal": f"aws: never above the write budget (<= {b['write_budget']:g} writes sent in any "
                              f"1-s window, by keyturn's own timestamps)",
                      "pass": 0 < b["max_writes_sent_any_1s_window"] <= b["write_budget"]
                      and b["writes_sent_by_keyturn"] == b["writes"],
                      "measured": f"max {b['max_writes_sent_any_1s_window']} writes sent in a 1-s window "
                                  f"({b['writes_sent_by_keyturn']} sent, {b['writes']} seen by the proxy; "
                                  f"by arrival at the proxy: max {b['max_writes_any_1s_window']})"})
    return goals


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--creds", type=int, default=256, help="credentials per keyturn run (default 256 = 4 x 64)")
    ap.add_argument("--raw-seconds", type=float, default=10.0, help="duration of each raw mode (default 10)")
    ap.add_argument("--calibrate", type=int, default=8, help="credentials of the calibration run (default 8)")
    ap.add_argument("--budget-creds", type=int, default=128, help="credentials of the budget run (default 128)")
    ap.add_argument("--servers", default="bao,aws", help="comma-separated: bao, aws")
    ap.add_argument("--no-budget", action="store_true", help="skip the aws write-budget run")
    ap.add_argument("--no-profile", action="store_true", help="skip the traced (time breakdown) runs")
    ap.add_argument("--quick", action="store_true", help="N = 64, 4 s per raw mode, 64 in the budget run")
    ap.add_argument("--no-build", action="store_true", help="use the existing target/release/keyturn")
    args = ap.parse_args()
    if args.quick:
        args.creds, args.raw_seconds, args.budget_creds = 64, 4.0, 64
    servers = [s.strip() for s in args.servers.split(",") if s.strip()]

    signal.signal(signal.SIGTERM, base._on_signal)
    OUT.mkdir(parents=True, exist_ok=True)
    results: dict = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "machine": base.machine_info(),
                     "n": args.creds, "levels": LEVELS, "raw_seconds": args.raw_seconds,
                     "throughput_write_budget": THROUGHPUT_BUDGET, "servers": {}}
    started = False
    proxies_note = "counting proxy: Python ThreadingHTTPServer, used for calibration and the budget run only"
    results["notes"] = [proxies_note]
    try:
        if not base.built(args.no_build):
            return 1
        env, started = start_services()
        os.environ.update(env)  # the daemon and the AWS raw loop need AWS_* too
        run_id = time.strftime("%H%M%S")
        for server in servers:
            results["servers"][server] = bench_server(server, env, args.creds, args.raw_seconds, args.calibrate,
                                                      run_id, not args.no_profile)
        if "aws" in servers and not args.no_budget:
            log(f"aws budget run: default write_budget, 64 in flight, {args.budget_creds} credentials, via the proxy")
            results["budget"] = budget_run(env, env["KEYTURN_TEST_AWS_ENDPOINT"], args.budget_creds,
                                           f"bench-{run_id}-budget")
            b = results["budget"]
            log(f"aws budget run: max {b['max_writes_any_1s_window']} writes in any 1-s window; "
                f"{b['rotations_per_s']} rot/s")
        base.finish(results, check_goals, fmt_table, RESULTS)
        return 0
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    finally:
        base.stop_all()
        if started:
            stop_services()


if __name__ == "__main__":
    sys.exit(main())
