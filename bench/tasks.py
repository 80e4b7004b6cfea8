#!/usr/bin/env python3
"""keyturn task-scoped credentials benchmark (issue 15).

One keyturn daemon (the release binary) with three issuers, each against a
server this script starts for itself:

  pg   `postgres`     its OWN PostgreSQL cluster (pg_peer.OwnPostgres: initdb
                      in a temp dir, loopback, fsync off like the test
                      cluster, log_connections on);
  bao  `vault_token`  its OWN OpenBao (pg_peer.PlainBao: raft storage, fsync
                      on every commit, as in production; `--bao-storage
                      inmem` for `bao server -dev`), through an orphan token
                      role, as the README recommends;
  aws  `aws_sts`      its OWN moto server (`moto_server` of the services
                      venv; IAM not enforced), AssumeRole with a session
                      policy and the task's tags.

100 agents are configured (uids 20001..20100, tenant `bench`); one policy
serves them all with one sensitivity level per issuer (`pg`, `bao`, `aws`),
so that a task start issues at exactly one issuer. Task credentials are
written to the per-task directories (`task_root`), as in production: the
agent reads its file. keyturn is driven over its control socket as root
with `as` (one connection per client thread; a `task_start` / `task_end`
JSON line each, src/api/protocol.rs).

Measured, per issuer, one task at a time (--samples each):

  * task start -> credential usable: from writing the `task_start` line
    until a use of the delivered credential succeeds, polled: pg = a LOGIN
    with it (pg8000, a new connection; `SELECT current_user`), bao =
    `GET auth/token/lookup-self` with the token answers 200 (the token has
    exactly its grant's policies, no `default`, so the bench policy allows
    lookup-self), aws = STS
    `GetCallerIdentity` with the session answers the assumed role (boto3).
    The start call alone (until its answer) is reported too, and so is the
    pg probe alone (logins of a standing role): a new PostgreSQL session
    costs tens of ms on a loaded 2-core machine, whoever asks for it.
  * task end -> revoked: from writing the `task_end` line until a use is
    refused (pg: the login fails; bao: lookup-self answers 403). STS
    sessions cannot be revoked (keyturn's default leaves them to expire at
    the TTL, README "The aws_sts issuer") and this moto does not enforce
    IAM, so for aws only the end call's latency is measured, and said so.

Then the throughput: 100 client threads, one per agent, each looping
`task_start` + `task_end` on the `pg` level for --seconds; a pair counts
when both answered ok. Reported: pairs/s (= task starts/s), the latency of
each call, and CPU per task of keyturn and of PostgreSQL (from /proc), and
PostgreSQL connections opened per task (log_connections). After the window
every task of the run is checked ended and its role gone from pg_roles.

Python 3.11; PostgreSQL logins and STS calls use pg8000 and boto3 from the
services venv (target/test-services/venv, made by scripts/services.sh): the
script re-runs itself with that venv's python when they are missing.
Everything it starts is stopped on exit, Ctrl-C included; the shared test
servers are not used. Results: a table, and bench/out/tasks-results.json
(git-ignored); the goals of issue 15 are reported, never asserted.

    python3 bench/tasks.py                 # 200 samples per issuer, 20 s of throughput
    python3 bench/tasks.py --quick         # 50 samples, 8 s
    python3 bench/tasks.py --no-build --samples 300 --seconds 30
    python3 bench/tasks.py --bao-storage inmem
    python3 bench/tasks.py --bin /tmp/keyturn-old --issuers pg   # A/B with another build
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.dont_write_bytecode = True  # no bench/__pycache__ in the work tree


def _venv_python() -> Path | None:
    for cand in (os.environ.get("KEYTURN_TEST_PYTHON"),
                 HERE.parent / "target" / "test-services" / "venv" / "bin" / "python"):
        if cand and Path(cand).exists():
            return Path(cand)
    return None


try:
    import boto3  # noqa: F401
    import pg8000.native  # noqa: F401
except ImportError:
    vpy = _venv_python()
    if vpy is None or os.environ.get("KEYTURN_BENCH_REEXEC"):
        sys.exit("bench/tasks.py needs pg8000 and boto3: run scripts/services.sh start once (it makes the "
                 "venv at target/test-services/venv), or pip install pg8000 boto3")
    os.environ["KEYTURN_BENCH_REEXEC"] = "1"
    os.execv(str(vpy), [str(vpy), str(Path(__file__).resolve()), *sys.argv[1:]])

import boto3  # noqa: E402
import pg8000.native  # noqa: E402
import http.client  # noqa: E402

import decommission  # noqa: E402  (bench/decommission.py: quantiles, write_private)
import pg_peer  # noqa: E402  (bench/pg_peer.py: OwnPostgres, PlainBao, SocketConn)
import run as base  # noqa: E402  (bench/run.py: Daemon, /proc helpers, machine_info)
import agent  # noqa: E402  (bench/agent.py: free_port)

REPO = base.REPO
OUT = base.OUT / "tasks"
RESULTS = base.OUT / "tasks-results.json"
log = base.log

AGENTS = 100
UID0 = 20000
TENANT = "bench"
AWS_ACCOUNT = "123456789012"
AWS_ROLE = f"arn:aws:iam::{AWS_ACCOUNT}:role/keyturn-bench-tasks"
SESSION_POLICY = ('{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Action":"s3:GetObject",'
                  '"Resource":"arn:aws:s3:::bench/*"}]}')
USABLE_TIMEOUT = 10.0

# Goals (issue 15).
GOAL_START_P99_S = 0.100  # postgres and vault_token
GOAL_STARTS_PER_S = 200.0  # postgres, 100 concurrent agents


def agent_name(i: int) -> str:
    return f"a{i:03d}"


# --------------------------------------------------------------------------
# moto: our own server
# --------------------------------------------------------------------------


class OwnMoto:
    """`moto_server` of the services venv on a free loopback port (IAM not
    enforced: the shared moto's mode). Stopped by stop()."""

    def __init__(self, d: Path):
        vpy = _venv_python()
        exe = vpy.parent / "moto_server" if vpy else None
        if exe is None or not exe.exists():
            raise RuntimeError("no moto_server: run scripts/services.sh start once (it installs the venv)")
        self.port = agent.free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = d / "moto.log"
        with open(self.log_path, "wb") as logf:
            self.proc = subprocess.Popen([str(exe), "-H", "127.0.0.1", "-p", str(self.port)],
                                         stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        base._DAEMONS.append(self.proc)
        self.pid = self.proc.pid
        deadline = time.monotonic() + 60
        while True:
            try:
                c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
                c.request("GET", "/moto-api/")
                c.getresponse().read()
                c.close()
                break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto_server did not come up; see {self.log_path}")
                time.sleep(0.2)
        iam = self.client("iam")
        iam.create_role(RoleName="keyturn-bench-tasks", MaxSessionDuration=3600,
                        AssumeRolePolicyDocument=json.dumps({
                            "Version": "2012-10-17",
                            "Statement": [{"Effect": "Allow", "Principal": {"AWS": AWS_ACCOUNT},
                                           "Action": ["sts:AssumeRole", "sts:TagSession",
                                                      "sts:SetSourceIdentity"]}]}))

    def client(self, service: str, **creds):
        kw = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing"}
        kw.update(creds)
        return boto3.client(service, endpoint_url=self.url, region_name="us-east-1", **kw)

    def stop(self) -> None:
        base.stop_process(self.proc, timeout=15)


# --------------------------------------------------------------------------
# keyturn: config and client
# --------------------------------------------------------------------------


def keyturn_config(d: Path, pg: pg_peer.OwnPostgres, bao: pg_peer.PlainBao, moto: OwnMoto,
                   pg_role: str) -> Path:
    dsn = decommission.write_private(d / "pg-admin.dsn", pg.dsn)
    token = decommission.write_private(d / "bao-token", bao.root)
    (d / "agents").mkdir(parents=True, exist_ok=True)
    names = [agent_name(i) for i in range(AGENTS)]
    lines = [
        "[daemon]",
        f'state_dir = "{d}/state"',
        f'socket = "{d}/control.sock"',
        f'delivery_roots = ["{d}/agents"]',
        f'task_root = "{d}/agents/tasks"',
        'drain_timeout = "30s"',
        "",
        "[vaults.local]",
        'type = "local"',
        "",
        "[issuers.pg]",
        'type = "postgres"',
        f'admin_dsn_file = "{dsn}"',
        "",
        "[issuers.bao]",
        'type = "vault_token"',
        f'address = "{bao.addr}"',
        f'token_file = "{token}"',
        'token_role = "keyturn-bench-tasks"',
        "",
        "[issuers.aws]",
        'type = "aws_sts"',
        'region = "us-east-1"',
        f'endpoint_url = "{moto.url}"',
        "",
        "[policies.bench]",
        f"agents = [{', '.join(json.dumps(n) for n in names)}]",
        f'tenants = ["{TENANT}"]',
        'max_ttl = "1h"',
        'default_ttl = "15m"',
        f'levels.pg.grants.pg = {{ roles = ["{pg_role}"] }}',
        'levels.bao.grants.bao = { policies = ["bench-read"] }',
        f"levels.aws.grants.aws = {{ role_arn = \"{AWS_ROLE}\", session_policy = '{SESSION_POLICY}' }}",
        "",
    ]
    for i, n in enumerate(names):
        lines += [f"[agents.{n}]", 'owner = "bench@example.com"', f'tenant = "{TENANT}"', 'tier = "low"',
                  f"uid = {UID0 + i + 1}", f"gid = {UID0 + i + 1}", ""]
    cfg = d / "keyturn.toml"
    cfg.write_text("\n".join(lines))
    return cfg


class Refused(RuntimeError):
    pass


def body_of(resp: dict, what: str):
    """The answer's body (`{"ok":true,"result":{"<kind>":...}}`), or raise."""
    if not resp.get("ok"):
        err = resp.get("error") or {}
        raise Refused(f"{what}: {err.get('kind')}: {err.get('message')}")
    result = resp["result"]
    if isinstance(result, dict) and len(result) == 1:
        return next(iter(result.values()))
    return result


def start_req(agent_id: str, level: str, run_id: str) -> dict:
    return {"cmd": "task_start", "as": agent_id, "tenant": TENANT, "use_case": "bench", "run_id": run_id,
            "initiator": "bench@example.com", "sensitivity": level}


def read_cred(started: dict, issuer: str) -> dict:
    c = started["credentials"][issuer]
    if c.get("file"):
        with open(c["file"]) as f:
            return json.load(f)
    return {**c.get("public", {}), **c.get("secret", {})}


# --------------------------------------------------------------------------
# Using a credential: ok / refused
# --------------------------------------------------------------------------


def pg_login(cred: dict) -> bool:
    try:
        conn = pg8000.native.Connection(user=cred["user"], password=cred["password"], host=cred["host"],
                                        port=int(cred["port"]), database=cred.get("dbname") or "postgres",
                                        timeout=5, application_name="bench",
                                        ssl_context=False if cred.get("sslmode", "disable") == "disable" else None)
    except (pg8000.native.DatabaseError, pg8000.native.InterfaceError):
        return False
    try:
        return conn.run("SELECT current_user")[0][0] == cred["user"]
    finally:
        conn.close()


class BaoUse:
    """lookup-self with a task token, on one kept-alive connection."""

    def __init__(self, port: int):
        self.port = port
        self.c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)

    def status(self, token: str) -> int:
        for attempt in (0, 1):
            try:
                self.c.request("GET", "/v1/auth/token/lookup-self", headers={"X-Vault-Token": token})
                r = self.c.getresponse()
                r.read()
                return r.status
            except (OSError, http.client.HTTPException):
                self.c.close()
                self.c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
                if attempt:
                    raise
        return 0


def poll(check, timeout: float = USABLE_TIMEOUT, interval: float = 0.002) -> float | None:
    """Monotonic time at which `check()` first returned true, or None."""
    deadline = time.monotonic() + timeout
    while True:
        if check():
            return time.monotonic()
        if time.monotonic() > deadline:
            return None
        time.sleep(interval)


def login_floor(pg: pg_peer.OwnPostgres, n: int) -> dict:
    """The probe alone: `n` logins of a standing role (the admin), to tell
    PostgreSQL's cost of a new session from keyturn's part of start→usable."""
    cred = {"user": "postgres", "password": pg.password, "host": "127.0.0.1", "port": pg.port,
            "dbname": "postgres", "sslmode": "disable"}
    xs = []
    for _ in range(n):
        t0 = time.monotonic()
        if not pg_login(cred):
            raise RuntimeError("the admin cannot log in to our own PostgreSQL")
        xs.append(time.monotonic() - t0)
    return decommission.quantiles(xs)


# --------------------------------------------------------------------------
# Latency, one issuer, one task at a time
# --------------------------------------------------------------------------


def latency(sock: Path, level: str, samples: int, bao: pg_peer.PlainBao, moto: OwnMoto) -> dict:
    conn = pg_peer.SocketConn(sock)
    bao_use = BaoUse(bao.port)
    start_call, usable, end_call, revoked, failures = [], [], [], [], []
    try:
        for i in range(samples):
            who = agent_name(i % AGENTS)
            t0 = time.monotonic()
            try:
                started = body_of(conn.call(start_req(who, level, f"lat-{level}-{i}")), "task_start")
            except Refused as e:
                failures.append(str(e))
                continue
            t_answer = time.monotonic()
            start_call.append(t_answer - t0)
            cred = read_cred(started, level)
            if level == "pg":
                ok = poll(lambda: pg_login(cred))
            elif level == "bao":
                ok = poll(lambda: bao_use.status(cred["token"]) == 200)
            else:
                sts = moto.client("sts", aws_access_key_id=cred["access_key_id"],
                                  aws_secret_access_key=cred["secret_access_key"],
                                  aws_session_token=cred["session_token"])
                ok = poll(lambda: sts.get_caller_identity()["Arn"].startswith(
                    f"arn:aws:sts::{AWS_ACCOUNT}:assumed-role/keyturn-bench-tasks/"))
            if ok is None:
                failures.append(f"{level}: credential not usable within {USABLE_TIMEOUT}s")
            else:
                usable.append(ok - t0)
            t1 = time.monotonic()
            try:
                body_of(conn.call({"cmd": "task_end", "as": who, "task": started["task"]}), "task_end")
            except Refused as e:
                failures.append(str(e))
                continue
            end_call.append(time.monotonic() - t1)
            if level == "pg":
                gone = poll(lambda: not pg_login(cred))
            elif level == "bao":
                gone = poll(lambda: bao_use.status(cred["token"]) == 403)
            else:
                gone = None  # STS sessions cannot be revoked; moto enforces nothing
            if level != "aws":
                if gone is None:
                    failures.append(f"{level}: credential still usable {USABLE_TIMEOUT}s after task end")
                else:
                    revoked.append(gone - t1)
    finally:
        conn.close()
        bao_use.c.close()
    out = {"level": level, "start_call": decommission.quantiles(start_call),
           "start_to_usable": decommission.quantiles(usable), "end_call": decommission.quantiles(end_call),
           "end_to_revoked": decommission.quantiles(revoked), "failures": failures[:20],
           "failure_count": len(failures)}
    if level == "aws":
        out["note"] = ("usable = STS GetCallerIdentity with the session answers the assumed role (moto); "
                       "revoked: not measured (STS sessions cannot be revoked; keyturn leaves them to "
                       "expire at the TTL by default, and this moto does not enforce IAM): end call only")
    return out


# --------------------------------------------------------------------------
# Throughput: 100 agents at once, start + end pairs on postgres
# --------------------------------------------------------------------------


def throughput(sock: Path, seconds: float, dpid: int, pg: pg_peer.OwnPostgres) -> dict:
    stop = threading.Event()
    go = threading.Barrier(AGENTS + 1)
    lock = threading.Lock()
    starts: list[float] = []
    ends: list[float] = []
    errors: list[str] = []
    pairs = [0] * AGENTS
    task_ids: list[str] = []

    def worker(i: int) -> None:
        who = agent_name(i)
        conn = pg_peer.SocketConn(sock)
        mine_s, mine_e, mine_ids = [], [], []
        try:
            go.wait()
            n = 0
            while not stop.is_set():
                n += 1
                t0 = time.monotonic()
                try:
                    started = body_of(conn.call(start_req(who, "pg", f"tp-{i}-{n}")), "task_start")
                    t1 = time.monotonic()
                    mine_ids.append(started["task"])
                    body_of(conn.call({"cmd": "task_end", "as": who, "task": started["task"]}), "task_end")
                    t2 = time.monotonic()
                except (Refused, OSError, ValueError) as e:
                    with lock:
                        errors.append(str(e)[:300])
                    continue
                mine_s.append(t1 - t0)
                mine_e.append(t2 - t1)
                pairs[i] += 1
        finally:
            conn.close()
            with lock:
                starts.extend(mine_s)
                ends.extend(mine_e)
                task_ids.extend(mine_ids)

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(AGENTS)]
    for t in threads:
        t.start()
    cpu0, pg_cpu0, log0 = base.proc_cpu_ticks(dpid), pg.cpu_ticks(), pg.log_offset()
    go.wait()
    t0 = time.monotonic()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join(timeout=120)
    wall = time.monotonic() - t0
    cpu1, pg_cpu1, log1 = base.proc_cpu_ticks(dpid), pg.cpu_ticks(), pg.log_offset()
    total = sum(pairs)
    conns = pg.connections(log0, log1)
    per_task = (lambda x: x / total) if total else (lambda _x: None)
    return {
        "agents": AGENTS, "seconds": round(wall, 2), "pairs": total,
        "starts_per_s": total / wall,
        "start_call": decommission.quantiles(starts), "end_call": decommission.quantiles(ends),
        "keyturn_cpu_ms_per_task": per_task((cpu1 - cpu0) / base.CLK_TCK * 1000),
        "postgres_cpu_ms_per_task": per_task((pg_cpu1 - pg_cpu0) / base.CLK_TCK * 1000),
        "pg_connections_per_task": {u: per_task(n) for u, n in conns.items()},
        "per_agent_pairs": {"min": min(pairs), "max": max(pairs)},
        "errors": errors[:20], "error_count": len(errors), "task_ids": task_ids,
    }


def verify_all_ended(cfg: Path, task_ids: list[str], pg: pg_peer.OwnPostgres, timeout: float = 60) -> dict:
    """Every throughput task (sensitivity `pg`) ended, and no task role left
    at PostgreSQL. (aws tasks of the latency pass stay `ending` until their
    TTL: STS sessions cannot be ended early.)"""
    pgc = decommission.Postgres(pg.dsn)
    deadline = time.monotonic() + timeout
    while True:
        left = int(pgc.sql("SELECT count(*) FROM pg_roles WHERE rolname LIKE 'kt\\_task\\_%'"))
        if left == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    conn = pg_peer.SocketConn(cfg.parent / "control.sock")
    try:
        live = 0
        for i in range(AGENTS):
            for t in body_of(conn.call({"cmd": "task_list", "as": agent_name(i)}), "task_list"):
                if t["sensitivity"] == "pg" and t["state"] != "ended":
                    live += 1
    finally:
        conn.close()
    return {"tasks": len(task_ids), "roles_left": left, "tasks_not_ended": live}


# --------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------


def ms(q: dict, key: str) -> str:
    v = q.get(key)
    return "-" if v is None else f"{v * 1000:.1f}"


def fmt_table(results: dict) -> str:
    head = ["issuer", "n", "start call p50/p99 ms", "start→usable p50/p99 ms", "end call p50/p99 ms",
            "end→revoked p50/p99 ms", "failures"]
    rows = []
    for r in results["latency"]:
        rows.append([r["issuer"], str(r["start_call"]["samples"]),
                     f"{ms(r['start_call'], 'p50')} / {ms(r['start_call'], 'p99')}",
                     f"{ms(r['start_to_usable'], 'p50')} / {ms(r['start_to_usable'], 'p99')}",
                     f"{ms(r['end_call'], 'p50')} / {ms(r['end_call'], 'p99')}",
                     f"{ms(r['end_to_revoked'], 'p50')} / {ms(r['end_to_revoked'], 'p99')}"
                     if r["end_to_revoked"]["samples"] else "not measurable (see note)",
                     str(r["failure_count"])])
    lines = []
    if rows:
        widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]
        lines += ["| " + " | ".join(h.ljust(w) for h, w in zip(head, widths)) + " |",
                  "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
        lines += ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in rows]
    tp = results.get("throughput")
    if tp:
        conns = ", ".join(f"{u}: {v:.2f}" for u, v in sorted(tp["pg_connections_per_task"].items())
                          if v is not None) or "none"
        lines += ["",
                  f"throughput (postgres, {tp['agents']} agents, {tp['seconds']} s): "
                  f"{tp['starts_per_s']:.1f} task starts/s ({tp['pairs']} start+end pairs, "
                  f"{tp['error_count']} errors); start call p50/p99 {ms(tp['start_call'], 'p50')} / "
                  f"{ms(tp['start_call'], 'p99')} ms, end call p50/p99 {ms(tp['end_call'], 'p50')} / "
                  f"{ms(tp['end_call'], 'p99')} ms",
                  f"CPU per task: keyturn {tp['keyturn_cpu_ms_per_task']:.2f} ms, PostgreSQL "
                  f"{tp['postgres_cpu_ms_per_task']:.2f} ms; new PostgreSQL connections per task: {conns}",
                  f"after the window: {tp['check']['tasks_not_ended']} tasks not ended, "
                  f"{tp['check']['roles_left']} task roles left"]
    probe = results.get("pg_login_probe")
    if probe:
        lines.append(f"postgres: the login probe alone (a standing role, new session each time) takes "
                     f"p50 {ms(probe, 'p50')} / p99 {ms(probe, 'p99')} ms of start→usable and end→revoked")
    for r in results["latency"]:
        if r.get("note"):
            lines.append(f"{r['issuer']}: {r['note']}")
    return "\n".join(lines)


def check_goals(results: dict) -> list[dict]:
    by = {r["issuer"]: r for r in results["latency"]}
    goals = []
    for issuer in ("postgres", "vault_token"):
        r = by.get(issuer)
        if r is None:
            continue
        p99 = r["start_to_usable"]["p99"]
        goals.append({"goal": f"task start p99 <= 100 ms ({issuer}, start -> usable)",
                      "pass": p99 is not None and p99 <= GOAL_START_P99_S and r["failure_count"] == 0,
                      "measured": f"p99 {ms(r['start_to_usable'], 'p99')} ms (start call alone "
                                  f"{ms(r['start_call'], 'p99')} ms), {r['failure_count']} failures"})
    tp = results.get("throughput")
    if tp:
        goals.append({"goal": ">= 200 task starts/s, 100 concurrent agents, PostgreSQL",
                      "pass": tp["starts_per_s"] >= GOAL_STARTS_PER_S and tp["error_count"] == 0,
                      "measured": f"{tp['starts_per_s']:.1f}/s, {tp['error_count']} errors"})
    return goals


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=200, help="tasks per issuer for the latencies (default 200)")
    ap.add_argument("--seconds", type=float, default=20.0, help="throughput window (default 20)")
    ap.add_argument("--quick", action="store_true", help="50 samples, 8 s of throughput")
    ap.add_argument("--issuers", default="pg,bao,aws", help="latency passes to run (default pg,bao,aws)")
    ap.add_argument("--no-throughput", action="store_true", help="skip the 100-agent throughput pass")
    ap.add_argument("--bao-storage", choices=sorted(pg_peer.BAO_STORAGES), default="raft",
                    help="OpenBao storage (default raft: fsync on every commit)")
    ap.add_argument("--no-build", action="store_true", help="use the existing target/release/keyturn")
    ap.add_argument("--keep", action="store_true", help="keep the run directory under bench/out/tasks/")
    ap.add_argument("--bin", type=Path, help="another keyturn binary (an A/B run; implies --no-build)")
    args = ap.parse_args()
    if args.quick:
        args.samples, args.seconds = 50, 8.0
    if args.bin:
        base.BIN = args.bin.resolve()
        args.no_build = True

    signal.signal(signal.SIGTERM, base._on_signal)
    OUT.mkdir(parents=True, exist_ok=True)
    results: dict = {"command": " ".join(["python3", "bench/tasks.py", *sys.argv[1:]]),
                     "machine": base.machine_info(), "bao_storage": args.bao_storage,
                     "settings": {"samples": args.samples, "seconds": args.seconds, "agents": AGENTS}}
    d = Path(tempfile.mkdtemp(prefix="run-", dir=OUT))
    pg = bao = moto = dm = None
    try:
        if not base.built(args.no_build):
            return 1
        results["binary"] = str(base.BIN)
        log("starting PostgreSQL, OpenBao and moto of our own")
        pg = pg_peer.OwnPostgres()
        pg.start()
        bao = pg_peer.PlainBao(d, args.bao_storage)
        moto = OwnMoto(d)
        pgc = decommission.Postgres(pg.dsn)
        pg_role = f"bench_read_{secrets.token_hex(3)}"
        pgc.sql(f"CREATE ROLE {pg_role} NOLOGIN; CREATE TABLE bench_t (v int); "
                f"GRANT SELECT ON bench_t TO {pg_role}")
        bao.must("PUT", "/v1/sys/policies/acl/bench-read",
                 {"policy": 'path "secret/data/bench/*" { capabilities = ["read"] }\n'
                            # What the `default` policy would give; the task token has exactly its
                            # grant's policies, so this one must allow the usability probe.
                            'path "auth/token/lookup-self" { capabilities = ["read"] }'})
        bao.must("POST", "/v1/auth/token/roles/keyturn-bench-tasks",
                 {"orphan": True, "renewable": False, "allowed_policies": "bench-read",
                  "token_explicit_max_ttl": "1h"})
        cfg = keyturn_config(d, pg, bao, moto, pg_role)
        r = base.cli(cfg, "check", timeout=120)
        if r.returncode != 0:
            raise RuntimeError(f"keyturn check: {r.stdout.decode()[-1500:]} {r.stderr.decode()[-1500:]}")
        # AWS credentials for keyturn's own identity (moto accepts any).
        os.environ.update({"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                           "AWS_EC2_METADATA_DISABLED": "true"})
        dm = base.Daemon(cfg, "tasks")
        results["ready_s"] = dm.wait_ready(60)
        sock = d / "control.sock"
        # One warm-up task per issuer (first connections, first SDK calls).
        latency(sock, "pg", 2, bao, moto), latency(sock, "bao", 2, bao, moto), latency(sock, "aws", 2, bao, moto)
        results["pg_login_probe"] = login_floor(pg, min(args.samples, 100))
        log(f"PostgreSQL login probe alone (a standing role): p50 {ms(results['pg_login_probe'], 'p50')} ms, "
            f"p99 {ms(results['pg_login_probe'], 'p99')} ms")
        names = {"pg": "postgres", "bao": "vault_token", "aws": "aws_sts"}
        results["latency"] = []
        for level in [s.strip() for s in args.issuers.split(",") if s.strip()]:
            log(f"latency: {names[level]}, {args.samples} tasks one at a time")
            lr = latency(sock, level, args.samples, bao, moto)
            lr["issuer"] = names[level]
            results["latency"].append(lr)
            log(f"  start→usable p50 {ms(lr['start_to_usable'], 'p50')} ms p99 "
                f"{ms(lr['start_to_usable'], 'p99')} ms; end→revoked p50 {ms(lr['end_to_revoked'], 'p50')} ms "
                f"p99 {ms(lr['end_to_revoked'], 'p99')} ms; {lr['failure_count']} failures")
        if not args.no_throughput:
            log(f"throughput: {AGENTS} agents, start+end pairs on postgres for {args.seconds} s")
            tp = throughput(sock, args.seconds, dm.pid, pg)
            tp["check"] = verify_all_ended(cfg, tp.pop("task_ids"), pg)
            results["throughput"] = tp
            log(f"  {tp['starts_per_s']:.1f} starts/s, {tp['error_count']} errors")
        base.finish(results, check_goals, fmt_table, RESULTS)
        return 0
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    finally:
        if dm is not None:
            dm.stop()
        for s in (moto, bao, pg):
            if s is not None:
                try:
                    s.stop()
                except Exception as e:  # noqa: BLE001 - keep stopping the rest
                    log(f"stopping {type(s).__name__}: {e}")
        base.stop_all()
        if args.keep:
            log(f"kept {d}")
        else:
            shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
