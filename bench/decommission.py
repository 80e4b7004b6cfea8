#!/usr/bin/env python3
"""keyturn decommission benchmark (issue 12, "Benchmark").

Part 1: decision-to-verified-revocation time. For an agent with N = 10 and
N = 100 credentials spread over the local vault, OpenBao and moto (AWS
Secrets Manager), round robin (roughly a third each), one of them (in the
local vault) with a PostgreSQL `postgres` target (`alternating_users`, on a
role this script creates through the admin DSN and drops at the end), every
credential with a file sink, each run:

  * writes a fresh config: fresh state dir, fresh vault paths (unique names:
    the OpenBao paths and the AWS `secret_prefix` carry a run id), a new
    PostgreSQL role, tier `bench` with `revocation_sla = "1h"`;
  * starts the daemon and waits until every credential has its first version
    (`keyturn status --json`: a version, nothing in flight);
  * times `keyturn decommission AGENT --reason bench --wait --json` and
    records
      - decision -> revoked and decision -> verified by the daemon's own
        clock (`to_revoked_ms`, `to_verified_ms` of the JSON),
      - the same interval from the audit log (`decommission.decided` ->
        `decommission.verified` record timestamps), as a cross-check,
      - the wall time of the CLI call (process start to exit: includes the
        CLI's start-up, the request, and `--wait`'s polling, every 200 ms);
      - per item kind (vault:local, vault:bao, vault:aws, target, file,
        acks), decision -> the last such item verified (audit log), which
        shows what bounds the total;
  * checks (reported, not asserted) that every item is verified, the files
    are gone and neither PostgreSQL role can log in any more.

p50/p99 (nearest rank; with 10 runs p99 is the maximum) over the runs: 10
runs for N = 10 and 5 for N = 100 (3 and 2 with --quick). The goal of the
issue: 100 credentials revoked and verified in <= 5 s (the SLA is an hour).
The aws vault keeps keyturn's default client-side `write_budget` (25
writes/s, what an operator runs with): one `DeleteSecret` per credential
there, so ~34 AWS credentials take ~1.4 s by the budget alone
(--aws-write-budget changes it).

Part 2 (--alerts): SLA deadline -> alert visible in Alertmanager's API. It
starts /usr/bin/prometheus-alertmanager (apt-get installs
prometheus-alertmanager when missing and we are root) on a free loopback
port with a minimal config and no clustering, and a keyturn daemon with an
`[alerts.am]` sink (`type = "alertmanager"`) pointing at it, and one agent of
tier `fast` (`revocation_sla = "2s"`) whose only credential has a `command`
target whose hook's `revoke` exits 75 (EX_TEMPFAIL) forever, so the
revocation cannot complete. It decommissions the agent (without --wait) and
polls `GET /api/v2/alerts` every ~20 ms until an alert with
`alertname=KeyturnRevocationSlaBreached` and `agent=<agent>` appears; the
figure is the appearance time minus the deadline (the JSON's `deadline`, i.e.
decided_at + 2 s, by the daemon's wall clock on this machine). Goal: <= 1 s.
If the binary does not accept the `[alerts.am]` table yet (`keyturn check`
exits 64), the part is skipped with a note.

Prints a table, writes bench/out/decommission-results.json; goals are
reported, never asserted. Everything it writes is under bench/out/
(git-ignored). Services: when KEYTURN_TEST_BAO_ADDR, KEYTURN_TEST_BAO_TOKEN,
KEYTURN_TEST_AWS_ENDPOINT and KEYTURN_TEST_PG_ADMIN_DSN are set (e.g. after
`. target/test-services/services.env`), those servers are used and never
started or stopped; otherwise scripts/services.sh starts them if they do not
run, and they are stopped at the end only if this script started them. Every
daemon (and the Alertmanager) it starts is stopped on exit, Ctrl-C included.

Python 3.11 standard library; `psql` for the PostgreSQL role (it comes with
the postgresql package that scripts/services.sh installs). Run from anywhere:

    python3 bench/decommission.py                    # N = 10 x 10 runs, 100 x 5
    python3 bench/decommission.py --quick            # N = 10 x 3, 100 x 2
    python3 bench/decommission.py --alerts           # and the Alertmanager part
    python3 bench/decommission.py --alerts-only --binary target/debug/keyturn
"""

from __future__ import annotations

import argparse
import datetime as dt
import glob
import json
import math
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.dont_write_bytecode = True  # no bench/__pycache__ in the work tree
import remote  # noqa: E402  (bench/remote.py: start_services, stop_services)
import run as base  # noqa: E402  (bench/run.py: daemon, CLI and /proc helpers)

REPO = base.REPO
OUT = base.OUT / "decommission"
RESULTS = base.OUT / "decommission-results.json"
log = base.log

AGENT = "bench-dec"
TIER_SLA = "1h"
ALERT_SLA_S = 2.0
ALERTMANAGER = Path("/usr/bin/prometheus-alertmanager")
BREACH_ALERT = "KeyturnRevocationSlaBreached"
VAULTS = ("local", "bao", "aws")
SERVICE_KEYS = ("KEYTURN_TEST_BAO_ADDR", "KEYTURN_TEST_BAO_TOKEN", "KEYTURN_TEST_AWS_ENDPOINT",
                "KEYTURN_TEST_PG_ADMIN_DSN")

# Goals (issue 12).
GOAL_VERIFIED_S = 5.0  # 100 credentials revoked and verified
GOAL_ALERT_S = 1.0  # breach alert visible after the deadline


def parse_ts(s: str) -> float:
    """RFC 3339 (`2026-12-03T19:04:05.123456Z`, `...+00:00`) to epoch seconds."""
    return dt.datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp()


def quantiles(xs: list[float]) -> dict:
    """Nearest-rank p50/p99, min, max, mean of the samples."""
    xs = sorted(x for x in xs if x is not None)
    if not xs:
        return {"samples": 0, "p50": None, "p99": None, "min": None, "max": None, "mean": None}

    def q(p: float) -> float:
        return xs[max(0, min(len(xs) - 1, math.ceil(p * len(xs)) - 1))]

    return {"samples": len(xs), "p50": q(0.50), "p99": q(0.99), "min": xs[0], "max": xs[-1],
            "mean": sum(xs) / len(xs)}


def write_private(p: Path, text: str) -> Path:
    p.unlink(missing_ok=True)
    fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)
    return p


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------
# Services
# --------------------------------------------------------------------------


def services() -> tuple[dict[str, str], bool]:
    """The test servers' variables, and whether we started them (and must
    stop them). Variables already in the environment win: those servers are
    someone else's, and are neither started nor stopped here."""
    if all(os.environ.get(k) for k in SERVICE_KEYS):
        log("test services from the environment (KEYTURN_TEST_*); not starting or stopping anything")
        return {k: v for k, v in os.environ.items() if k.startswith(("KEYTURN_TEST_", "AWS_"))}, False
    env, started = remote.start_services()
    missing = [k for k in SERVICE_KEYS if k not in env]
    if missing:
        if started:
            remote.stop_services()
        raise RuntimeError(f"the services' env file has no {', '.join(missing)}")
    return env, started


class Postgres:
    """Roles at the test server through its admin DSN, with psql (the
    password goes by PGPASSWORD, never on a command line)."""

    def __init__(self, dsn: str):
        self.dsn = dsn
        kv = dict(p.split("=", 1) for p in dsn.split() if "=" in p)
        names = {"host": "PGHOST", "port": "PGPORT", "user": "PGUSER", "password": "PGPASSWORD",
                 "dbname": "PGDATABASE", "sslmode": "PGSSLMODE", "sslrootcert": "PGSSLROOTCERT"}
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        self.env.update({names[k]: v for k, v in kv.items() if k in names})
        self.psql = shutil.which("psql") or next(iter(sorted(glob.glob("/usr/lib/postgresql/*/bin/psql"),
                                                             reverse=True)), None)
        if not self.psql:
            raise RuntimeError("no psql on PATH or under /usr/lib/postgresql (apt-get install postgresql-client)")
        self.roles: list[str] = []

    def sql(self, statement: str) -> str:
        r = subprocess.run([self.psql, "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c", statement],
                           env=self.env, capture_output=True, text=True, timeout=60)
        if r.returncode != 0:
            raise RuntimeError(f"psql failed ({r.returncode}): {r.stderr.strip()[:500]}")
        return r.stdout.strip()

    def new_role(self, prefix: str) -> str:
        role = f"{prefix}{secrets.token_hex(4)}"
        self.sql(f"CREATE ROLE {role} LOGIN PASSWORD '{secrets.token_hex(16)}'")
        self.roles.append(role)
        return role

    def can_login(self, role: str) -> dict[str, bool]:
        """rolcanlogin of `role` and `role_clone` (those that exist)."""
        out = self.sql(f"SELECT rolname, rolcanlogin FROM pg_roles WHERE rolname IN ('{role}', '{role}_clone')")
        return {ln.split("|")[0]: ln.split("|")[1] == "t" for ln in out.splitlines() if "|" in ln}

    def drop_all(self) -> None:
        for role in self.roles:
            try:
                self.sql(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                         f"WHERE usename IN ('{role}', '{role}_clone')")
                self.sql(f"DROP ROLE IF EXISTS {role}_clone, {role}")
            except (RuntimeError, subprocess.SubprocessError) as e:
                log(f"could not drop PostgreSQL role {role}: {e}")
        self.roles = []


# --------------------------------------------------------------------------
# keyturn side
# --------------------------------------------------------------------------


def daemon_header(d: Path, tiers: dict[str, str]) -> list[str]:
    lines = [
        "[daemon]",
        f'state_dir = "{d}/state"',
        f'socket = "{d}/control.sock"',
        f'delivery_roots = ["{d}/agents"]',
        'drain_timeout = "30s"',
        'catch_up_spread = "1s"',
        "max_concurrent_rotations = 64",
        'retry = { initial_delay = "500ms", max_delay = "10s", max_attempts = 5 }',
        "",
        "[tiers]",
        *[f'{name} = {{ revocation_sla = "{sla}" }}' for name, sla in tiers.items()],
        "",
        "[vaults.local]",
        'type = "local"',
        "max_concurrent = 64",
        "",
    ]
    return lines


def write_config(d: Path, env: dict[str, str], n: int, run_id: str, role: str,
                 aws_budget: float | None = None) -> tuple[Path, list[Path]]:
    """d/keyturn.toml for one run: n credentials round robin over local, bao
    and aws, c000 (local) with the postgres target on `role`; a file sink
    each. Returns it and the files the sinks deliver."""
    (d / "agents").mkdir(parents=True, exist_ok=True)
    token = write_private(d / "bao-token", env["KEYTURN_TEST_BAO_TOKEN"])
    dsn = write_private(d / "pg-admin.dsn", env["KEYTURN_TEST_PG_ADMIN_DSN"])
    lines = daemon_header(d, {"bench": TIER_SLA})
    lines += [
        "[vaults.bao]", 'type = "vault"', f'address = "{env["KEYTURN_TEST_BAO_ADDR"]}"', 'mount = "secret"',
        f'token_file = "{token}"', "max_concurrent = 64", "",
        # The AWS write budget is keyturn's default (25 writes/s) unless
        # --aws-write-budget says otherwise.
        "[vaults.aws]", 'type = "aws_secrets_manager"', f'endpoint_url = "{env["KEYTURN_TEST_AWS_ENDPOINT"]}"',
        f'region = "{env.get("AWS_REGION", "us-east-1")}"', f'secret_prefix = "bench-dec-{run_id}/"',
        *([f"write_budget = {aws_budget:g}"] if aws_budget else []),
        "max_concurrent = 64", "",
        f"[agents.{AGENT}]", 'owner = "bench@example.com"', 'tenant = "bench"', 'tier = "bench"', "",
    ]
    files = []
    for i in range(n):
        cid = f"c{i:03d}"
        vault = VAULTS[i % len(VAULTS)]
        f = d / "agents" / AGENT / cid
        files.append(f)
        lines += [
            f"[agents.{AGENT}.credentials.{cid}]",
            f'vault = "{vault}"',
            f'path = "bench-dec/{run_id}/{cid}"',
            'generate = { kind = "password", length = 32 }',
            'every = "24h"',
            'grace = "1h"',
            f'deliver = [{{ type = "file", path = "{f}" }}]',
        ]
        if i == 0:
            lines.append(f'target = {{ type = "postgres", admin_dsn_file = "{dsn}", role = "{role}", '
                         f'strategy = "alternating_users", connect_timeout = "3s" }}')
        lines.append("")
    cfg = d / "keyturn.toml"
    cfg.write_text("\n".join(lines))
    return cfg, files


def check_config(cfg: Path) -> subprocess.CompletedProcess:
    return base.cli(cfg, "check", timeout=60)


def wait_first_versions(dm: base.Daemon, cfg: Path, agent: str, n: int, timeout: float) -> float:
    """Seconds until every credential of `agent` has a version and nothing
    is in flight."""
    t0 = time.monotonic()
    last = t0
    while True:
        rows = [r for r in base.status_json(cfg) if r.get("agent") == agent]
        have = sum(1 for r in rows if r.get("version"))
        settled = sum(1 for r in rows if r.get("state") in ("idle", "retiring"))
        if len(rows) == n and have == n and settled == n:
            return time.monotonic() - t0
        if dm.proc.poll() is not None:
            raise RuntimeError(f"daemon exited ({dm.proc.returncode}); see {dm.log_path}")
        now = time.monotonic()
        if now - t0 > timeout:
            states: dict[str, int] = {}
            for r in rows:
                states[r.get("state")] = states.get(r.get("state"), 0) + 1
            raise RuntimeError(f"after {timeout:.0f}s only {have}/{n} credentials have a version ({states}); "
                               f"see {dm.log_path}")
        if now - last > 15:
            log(f"    {have}/{n} credentials have a version")
            last = now
        time.sleep(0.3)


def item_kind(item: str) -> str:
    """`c012/vault:aws` -> `vault:aws`, `c000/sink:0` -> `file`, `c003/acks` -> `acks`."""
    kind = item.split("/", 1)[-1]
    return "file" if kind.startswith("sink:") else kind


def audit_times(state_dir: Path, agent: str) -> tuple[dict[str, float], dict[str, float]]:
    """From the audit log: epoch seconds of the agent's decommission.decided
    and .verified records, and per item kind the last `revocation.verified`
    record (epoch seconds)."""
    marks: dict[str, float] = {}
    last: dict[str, float] = {}
    try:
        text = (state_dir / "audit.log").read_text(errors="replace")
    except OSError:
        return marks, last
    for line in text.splitlines():
        try:
            r = json.loads(line)
        except ValueError:
            continue
        ev = r.get("event", "")
        if r.get("agent") != agent:
            continue
        if ev in ("decommission.decided", "decommission.verified") and ev not in marks:
            marks[ev] = parse_ts(r["ts"])
        elif ev == "revocation.verified" and (r.get("detail") or "").startswith("item="):
            kind = item_kind(r["detail"].split()[0][len("item="):])
            last[kind] = max(last.get(kind, 0.0), parse_ts(r["ts"]))
    return marks, last


def one_run(env: dict, pg: Postgres, n: int, i: int, run_id: str, keep: bool, aws_budget: float | None) -> dict:
    rid = f"{run_id}-n{n}-r{i}"
    d = OUT / f"n{n}-r{i}"
    if d.exists():
        shutil.rmtree(d)
    role = pg.new_role("kt_bench_dec_")
    cfg, files = write_config(d, env, n, rid, role, aws_budget)
    r = check_config(cfg)
    if r.returncode != 0:
        raise RuntimeError(f"keyturn check failed ({r.returncode}): {(r.stdout + r.stderr).decode()[-2000:]}")
    res: dict = {"n": n, "run": i, "items": None}
    dm = base.Daemon(cfg, "run")
    try:
        dm.wait_ready(120)
        res["initial_s"] = round(wait_first_versions(dm, cfg, AGENT, n, max(300, 3 * n)), 2)
        missing = [f for f in files if not f.exists()]
        if missing:
            raise RuntimeError(f"{len(missing)} files not delivered, e.g. {missing[0]}")
        time.sleep(0.5)  # let the initial rotations' bookkeeping settle
        t0 = time.monotonic()
        out = base.cli(cfg, "decommission", AGENT, "--reason", "bench", "--wait", "--json", timeout=600)
        wall = time.monotonic() - t0
        if out.returncode != 0:
            raise RuntimeError(f"decommission exited {out.returncode}: {out.stderr.decode(errors='replace')[-1000:]}")
        row = json.loads(out.stdout)["agent"]
        aud, last = audit_times(d / "state", AGENT)
        decided = aud.get("decommission.decided")
        logins = pg.can_login(role)
        res.update({
            "state": row.get("state"),
            "items": row.get("items"),
            "revoked": row.get("revoked"),
            "verified": row.get("verified"),
            "to_revoked_s": row["to_revoked_ms"] / 1000 if row.get("to_revoked_ms") is not None else None,
            "to_verified_s": row["to_verified_ms"] / 1000 if row.get("to_verified_ms") is not None else None,
            "audit_decided_to_verified_s": round(aud["decommission.verified"] - aud["decommission.decided"], 3)
            if len(aud) == 2 else None,
            # Decision -> the last item of each kind verified (audit, ms resolution).
            "last_verified_by_kind_s": {k: round(t - decided, 3) for k, t in sorted(last.items())}
            if decided else {},
            "cli_wall_s": round(wall, 3),
            "files_left": sum(1 for f in files if f.exists()),
            "pg_roles_can_login": logins,
        })
        res["complete"] = (res["state"] == "decommissioned" and res["items"] == res["verified"]
                           and res["files_left"] == 0 and not any(logins.values()))
    finally:
        dm.stop()
        if not keep:
            shutil.rmtree(d, ignore_errors=True)
    return res


def bench_size(env: dict, pg: Postgres, n: int, runs: int, run_id: str, keep: bool,
               aws_budget: float | None) -> dict:
    rows = []
    for i in range(runs):
        try:
            r = one_run(env, pg, n, i, run_id, keep, aws_budget)
            log(f"N={n} run {i + 1}/{runs}: {r['items']} items, decision->revoked {r['to_revoked_s']} s, "
                f"->verified {r['to_verified_s']} s (audit {r['audit_decided_to_verified_s']} s), "
                f"CLI wall {r['cli_wall_s']} s{'' if r['complete'] else ' INCOMPLETE: ' + json.dumps(r)}")
        except (RuntimeError, subprocess.SubprocessError, OSError, ValueError, KeyError) as e:
            log(f"N={n} run {i + 1}/{runs}: FAILED: {e}")
            r = {"n": n, "run": i, "error": str(e)}
        rows.append(r)
    ok = [r for r in rows if "error" not in r]
    return {
        "n": n,
        "runs": runs,
        "failed_runs": len(rows) - len(ok),
        "incomplete_runs": sum(1 for r in ok if not r["complete"]),
        "items": sorted({r["items"] for r in ok}),
        "to_revoked_s": quantiles([r["to_revoked_s"] for r in ok]),
        "to_verified_s": quantiles([r["to_verified_s"] for r in ok]),
        "audit_decided_to_verified_s": quantiles([r["audit_decided_to_verified_s"] for r in ok]),
        "cli_wall_s": quantiles([r["cli_wall_s"] for r in ok]),
        "initial_s": quantiles([r["initial_s"] for r in ok]),
        "last_verified_by_kind_s": {k: quantiles([r["last_verified_by_kind_s"].get(k) for r in ok])
                                    for k in sorted({k for r in ok for k in r["last_verified_by_kind_s"]})},
        "per_run": rows,
    }


# --------------------------------------------------------------------------
# Part 2: SLA deadline -> alert visible in Alertmanager
# --------------------------------------------------------------------------


def ensure_alertmanager() -> Path:
    """The distribution's Alertmanager, installed with apt-get when missing
    (as scripts/services.sh does for PostgreSQL)."""
    if ALERTMANAGER.exists():
        return ALERTMANAGER
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise RuntimeError(f"{ALERTMANAGER} is missing: apt-get install prometheus-alertmanager")
    log("apt-get install prometheus-alertmanager")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", "prometheus-alertmanager"]):
        r = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}): {r.stderr[-1000:]}")
    if not ALERTMANAGER.exists():
        raise RuntimeError(f"prometheus-alertmanager installed but {ALERTMANAGER} is missing")
    return ALERTMANAGER


class Alertmanager:
    """Our own Alertmanager on a free loopback port: a receiver that drops
    everything (we read its API, nothing is notified), no clustering."""

    def __init__(self, d: Path):
        binary = ensure_alertmanager()
        d.mkdir(parents=True, exist_ok=True)
        cfg = d / "alertmanager.yml"
        cfg.write_text("route:\n  receiver: blackhole\nreceivers:\n  - name: blackhole\n")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = d / "alertmanager.log"
        logf = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [str(binary), f"--config.file={cfg}", f"--storage.path={d / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--cluster.listen-address=", "--log.level=warn"],
            stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True)
        logf.close()
        base._DAEMONS.append(self.proc)  # stopped by base.stop_all on any exit
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except (OSError, urllib.error.URLError):
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"Alertmanager did not become ready; see {self.log_path}")
            time.sleep(0.1)
        self.version = subprocess.run([str(binary), "--version"], capture_output=True,
                                      text=True).stdout.splitlines()[:1]

    def alerts(self, agent: str) -> list[dict]:
        """Every alert Alertmanager holds with the label agent=<agent>."""
        q = urllib.parse.urlencode([("filter", f'agent="{agent}"')])
        with urllib.request.urlopen(f"{self.url}/api/v2/alerts?{q}", timeout=5) as resp:
            got = json.loads(resp.read())
        return [a for a in got if a.get("labels", {}).get("agent") == agent]

    def stop(self) -> None:
        base.stop_process(self.proc, timeout=10)


def write_hook(d: Path) -> Path:
    """A `command` target whose `revoke` fails (EX_TEMPFAIL) forever."""
    p = d / "hook.sh"
    p.write_text('#!/bin/sh\ncase "$KEYTURN_STEP" in\n  revoke) exit 75 ;;\nesac\ncat >/dev/null\nexit 0\n')
    p.chmod(0o755)
    return p


def write_alert_config(d: Path, am_url: str, agent: str) -> Path:
    (d / "agents").mkdir(parents=True, exist_ok=True)
    hook = write_hook(d)
    lines = daemon_header(d, {"bench": TIER_SLA, "fast": f"{ALERT_SLA_S:g}s"})
    lines += [
        # The shape the alert sinks are being built with (issue 12): the
        # Alertmanager v2 endpoint.
        "[alerts.am]",
        'type = "alertmanager"',
        f'url = "{am_url}/api/v2/alerts"',
        "",
        f"[agents.{agent}]", 'owner = "bench@example.com"', 'tenant = "bench"', 'tier = "fast"', "",
        f"[agents.{agent}.credentials.api]",
        'vault = "local"',
        'generate = { kind = "password", length = 32 }',
        'every = "24h"',
        f'target = {{ type = "command", program = "{hook}" }}',
        f'deliver = [{{ type = "file", path = "{d}/agents/{agent}/api" }}]',
        "",
    ]
    cfg = d / "keyturn.toml"
    cfg.write_text("\n".join(lines))
    return cfg


def alert_run(am: Alertmanager, i: int, keep: bool, poll_s: float) -> dict:
    agent = f"bench-sla-{secrets.token_hex(3)}-{i}"
    d = OUT / f"alerts-r{i}"
    if d.exists():
        shutil.rmtree(d)
    cfg = write_alert_config(d, am.url, agent)
    dm = base.Daemon(cfg, "alerts")
    try:
        dm.wait_ready(120)
        wait_first_versions(dm, cfg, agent, 1, 120)
        out = base.cli(cfg, "decommission", agent, "--reason", "bench", "--json", timeout=60)
        if out.returncode != 0:
            raise RuntimeError(f"decommission exited {out.returncode}: {out.stderr.decode(errors='replace')[-1000:]}")
        row = json.loads(out.stdout)["agent"]
        decided = parse_ts(row["decided_at"])
        deadline = parse_ts(row["deadline"]) if row.get("deadline") else decided + ALERT_SLA_S
        give_up = deadline + 30
        seen = None
        polls = 0
        first: dict[str, float] = {}  # alertname -> first seen (epoch s), e.g. the 80 % warning too
        while time.time() < give_up:
            t = time.time()
            polls += 1
            try:
                found = am.alerts(agent)
            except (OSError, urllib.error.URLError, ValueError):
                found = []
            at = (t + time.time()) / 2  # the middle of the request that saw it
            for a in found:
                first.setdefault(a["labels"].get("alertname", "?"), at)
            breach = [a for a in found if a["labels"].get("alertname") == BREACH_ALERT]
            if breach:
                seen = at
                alert = breach[0]
                break
            if dm.proc.poll() is not None:
                raise RuntimeError(f"daemon exited ({dm.proc.returncode}); see {dm.log_path}")
            time.sleep(max(0.0, poll_s - (time.time() - t)))
        res = {"run": i, "agent": agent, "decided_at": row["decided_at"], "deadline": row.get("deadline"),
               "sla_s": ALERT_SLA_S, "polls": polls,
               "first_seen_after_decision_s": {k: round(v - decided, 3) for k, v in sorted(first.items())}}
        if seen is None:
            res["error"] = f"no {BREACH_ALERT} alert for {agent} within 30 s of the deadline"
            return res
        res.update({
            "deadline_to_visible_s": round(seen - deadline, 3),
            "decision_to_visible_s": round(seen - decided, 3),
            "labels": alert.get("labels"),
            "startsAt": alert.get("startsAt"),
            "state": alert.get("status", {}).get("state"),
        })
        return res
    finally:
        dm.stop()
        if not keep:
            shutil.rmtree(d, ignore_errors=True)


def bench_alerts(runs: int, keep: bool, poll_s: float) -> dict:
    """Deadline -> visible in Alertmanager, `runs` times; {"skipped": why}
    when the binary has no alertmanager sink yet."""
    probe_dir = OUT / "alerts-probe"
    if probe_dir.exists():
        shutil.rmtree(probe_dir)
    cfg = write_alert_config(probe_dir, "http://127.0.0.1:9", "bench-sla-probe")
    r = check_config(cfg)
    shutil.rmtree(probe_dir, ignore_errors=True)
    if r.returncode == 64:
        why = ("this keyturn does not accept [alerts.am] type = \"alertmanager\" yet (`keyturn check` exit 64): "
               + (r.stdout + r.stderr).decode(errors="replace").strip().splitlines()[0][-300:])
        return {"skipped": why}
    if r.returncode != 0:
        raise RuntimeError(f"keyturn check of the alert config failed ({r.returncode}): "
                           f"{(r.stdout + r.stderr).decode(errors='replace')[-1000:]}")
    am = Alertmanager(OUT / "alertmanager")
    log(f"Alertmanager {' '.join(am.version)} at {am.url}")
    try:
        rows = []
        for i in range(runs):
            try:
                r = alert_run(am, i, keep, poll_s)
            except (RuntimeError, subprocess.SubprocessError, OSError, ValueError, KeyError) as e:
                r = {"run": i, "error": str(e)}
            if "error" in r:
                log(f"alerts run {i + 1}/{runs}: FAILED: {r['error']}")
            else:
                log(f"alerts run {i + 1}/{runs}: {BREACH_ALERT} visible {r['deadline_to_visible_s']:+.3f} s "
                    f"after the deadline ({r['decision_to_visible_s']:.3f} s after the decision)")
            rows.append(r)
        ok = [r for r in rows if "error" not in r]
        return {"alertmanager": " ".join(am.version), "sla_s": ALERT_SLA_S, "poll_s": poll_s, "runs": runs,
                "failed_runs": len(rows) - len(ok),
                "deadline_to_visible_s": quantiles([r["deadline_to_visible_s"] for r in ok]),
                "first_seen_after_decision_s": {
                    k: quantiles([r["first_seen_after_decision_s"].get(k) for r in ok])
                    for k in sorted({k for r in ok for k in r["first_seen_after_decision_s"]})},
                "per_run": rows}
    finally:
        am.stop()
        if not keep:
            shutil.rmtree(OUT / "alertmanager", ignore_errors=True)


# --------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------


def sec(x) -> str:
    return "-" if x is None else f"{x:.3f} s"


def fmt_table(results: dict) -> str:
    lines = []
    sizes = results.get("sizes", [])
    if sizes:
        head = ["credentials", "items", "runs ok", "decision->revoked p50 / p99",
                "decision->verified p50 / p99 (daemon)", "audit decided->verified p99", "CLI wall p50 / p99"]
        rows = []
        for s in sizes:
            rows.append([
                str(s["n"]), ",".join(str(x) for x in s["items"]) or "-",
                f"{s['runs'] - s['failed_runs']}/{s['runs']}"
                + (f" ({s['incomplete_runs']} incomplete)" if s["incomplete_runs"] else ""),
                f"{sec(s['to_revoked_s']['p50'])} / {sec(s['to_revoked_s']['p99'])}",
                f"{sec(s['to_verified_s']['p50'])} / {sec(s['to_verified_s']['p99'])}",
                sec(s["audit_decided_to_verified_s"]["p99"]),
                f"{sec(s['cli_wall_s']['p50'])} / {sec(s['cli_wall_s']['p99'])}",
            ])
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
        lines.append("| " + " | ".join(h.ljust(w) for h, w in zip(head, widths)) + " |")
        lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
        for r in rows:
            lines.append("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |")
        lines.append("")
        lines.append("(p50/p99 nearest rank over the runs; with <= 100 runs p99 is the slowest run. Items: per "
                     "credential its vault versions, its file, pending acks, and the PostgreSQL target for one.)")
        for s in sizes:
            by = s.get("last_verified_by_kind_s") or {}
            if by:
                lines.append(f"N={s['n']}: decision -> last item of each kind verified (audit, p50 / p99): "
                             + ", ".join(f"{k} {sec(q['p50'])} / {sec(q['p99'])}" for k, q in by.items()))
    a = results.get("alerts")
    if a:
        lines.append("")
        if "skipped" in a:
            lines.append(f"SLA deadline -> alert in Alertmanager: skipped: {a['skipped']}")
        else:
            q = a["deadline_to_visible_s"]
            lines.append(f"SLA deadline -> {BREACH_ALERT} visible in Alertmanager's API ({a['alertmanager']}, "
                         f"SLA {a['sla_s']:g} s, polled every {a['poll_s'] * 1000:.0f} ms): "
                         f"p50 {sec(q['p50'])}, p99 {sec(q['p99'])}, max {sec(q['max'])} over "
                         f"{q['samples']}/{a['runs']} runs")
            seen = a.get("first_seen_after_decision_s") or {}
            if seen:
                lines.append("  first seen after the decision (p50), by alertname: " + ", ".join(
                    f"{k} {sec(v['p50'])}" for k, v in seen.items()))
    return "\n".join(lines)


def check_goals(results: dict) -> list[dict]:
    goals = []
    big = [s for s in results.get("sizes", []) if s["n"] == 100]
    if big:
        s = big[0]
        q = s["to_verified_s"]
        ok = q["p99"] is not None and q["p99"] <= GOAL_VERIFIED_S and not s["failed_runs"] and not s["incomplete_runs"]
        goals.append({"goal": f"100 credentials revoked and verified <= {GOAL_VERIFIED_S:g} s (decision -> verified, "
                              "daemon's figure, p99)",
                      "pass": ok,
                      "measured": f"p50 {sec(q['p50'])}, p99 {sec(q['p99'])} over {q['samples']} runs; CLI wall p99 "
                                  f"{sec(s['cli_wall_s']['p99'])}"
                                  + (f"; {s['failed_runs']} failed" if s["failed_runs"] else "")
                                  + (f"; {s['incomplete_runs']} incomplete" if s["incomplete_runs"] else "")})
    a = results.get("alerts")
    if a and "skipped" not in a:
        q = a["deadline_to_visible_s"]
        goals.append({"goal": f"breach alert visible in Alertmanager <= {GOAL_ALERT_S:g} s after the SLA deadline (p99)",
                      "pass": q["p99"] is not None and q["p99"] <= GOAL_ALERT_S and not a["failed_runs"],
                      "measured": f"p50 {sec(q['p50'])}, p99 {sec(q['p99'])} over {q['samples']}/{a['runs']} runs"})
    elif a:
        goals.append({"goal": f"breach alert visible in Alertmanager <= {GOAL_ALERT_S:g} s after the SLA deadline",
                      "pass": None, "measured": "not measured (the Alertmanager part was skipped; see above)"})
    return goals


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="10,100", help="comma-separated credential counts (default 10,100)")
    ap.add_argument("--runs", default="10:10,100:5",
                    help="runs per size as N:RUNS pairs (default 10:10,100:5; other sizes: 5)")
    ap.add_argument("--quick", action="store_true", help="3 runs for N = 10, 2 for N = 100, 2 alert runs")
    ap.add_argument("--alerts", action="store_true", help="also measure SLA deadline -> alert in Alertmanager")
    ap.add_argument("--alerts-only", action="store_true", help="only the Alertmanager part (no test services)")
    ap.add_argument("--alert-runs", type=int, default=5, help="runs of the Alertmanager part (default 5)")
    ap.add_argument("--alert-poll-ms", type=float, default=20.0,
                    help="Alertmanager API poll interval, ms (default 20)")
    ap.add_argument("--aws-write-budget", type=float,
                    help="write_budget of the aws vault, writes/s (default: keyturn's own, 25)")
    ap.add_argument("--no-build", action="store_true", help="use the existing target/release/keyturn")
    ap.add_argument("--binary", "--bin", dest="binary", type=Path,
                    help="the keyturn binary to measure (implies --no-build; default target/release/keyturn)")
    ap.add_argument("--keep", action="store_true", help="keep each run's directory under bench/out/decommission/")
    args = ap.parse_args()
    sizes = [] if args.alerts_only else [int(s) for s in args.sizes.split(",") if s.strip()]
    runs = {int(k): int(v) for k, v in (p.split(":") for p in args.runs.split(",") if p.strip())}
    if args.quick:
        runs = {10: 3, 100: 2}
        args.alert_runs = min(args.alert_runs, 2)
    if args.alerts_only:
        args.alerts = True
    if args.binary:
        base.BIN = args.binary.resolve()
        args.no_build = True

    signal.signal(signal.SIGTERM, base._on_signal)
    OUT.mkdir(parents=True, exist_ok=True)
    results: dict = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "machine": base.machine_info(),
                     "binary": str(base.BIN), "agent_tier_sla": TIER_SLA,
                     "aws_write_budget": args.aws_write_budget or "keyturn's default (25/s)"}
    started = False
    pg = None
    try:
        if not base.built(args.no_build):
            return 1
        run_id = time.strftime("%H%M%S") + "-" + secrets.token_hex(2)
        if sizes:
            env, started = services()
            os.environ.update(env)  # the daemon needs AWS_* for moto
            pg = Postgres(env["KEYTURN_TEST_PG_ADMIN_DSN"])
            results["sizes"] = []
            for n in sizes:
                k = runs.get(n, 5)
                log(f"N={n}: {k} runs (local/bao/aws round robin, one PostgreSQL role, a file sink each)")
                results["sizes"].append(bench_size(env, pg, n, k, run_id, args.keep, args.aws_write_budget))
        if args.alerts:
            log(f"SLA deadline -> alert in Alertmanager: {args.alert_runs} runs")
            try:
                results["alerts"] = bench_alerts(args.alert_runs, args.keep, args.alert_poll_ms / 1000)
            except (RuntimeError, subprocess.SubprocessError, OSError) as e:
                log(f"alerts: FAILED: {e}")
                results["alerts"] = {"skipped": f"failed: {e}"}
            if "skipped" in results["alerts"]:
                log(f"alerts: skipped: {results['alerts']['skipped']}")
        base.finish(results, check_goals, fmt_table, RESULTS)
        return 0
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    finally:
        base.stop_all()
        if pg is not None:
            pg.drop_all()
        if started:
            remote.stop_services()
        if not args.keep:
            shutil.rmtree(OUT, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
