#!/usr/bin/env python3
"""keyturn scale benchmark (issue 2).

Builds the release binary, then for each N (default 1k, 10k, 100k
credentials on the local vault with file sinks) measures:

  * time to READY=1 (fresh state, and restart with state present);
  * idle RSS and idle CPU after the initial rotations, RSS per credential
    above an empty-daemon baseline;
  * end-to-end rotations/s of `keyturn rotate all --wait`;
  * the raw atomic-file-write rate of the same disk (the recipe of keyturn's
    file sink, in Python), and the ratio of the two.

Prints a table, writes bench/out/results.json, and checks the issue's goals
(reported, never asserted). Everything it writes is under bench/out/
(git-ignored); every daemon it starts is stopped on exit, Ctrl-C included.

Python 3.11, standard library only. Run from anywhere:

    python3 bench/run.py                   # 1k, 10k, 100k
    python3 bench/run.py --quick           # 1k only
    python3 bench/run.py --sizes 1000,10000 --idle-seconds 30
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "bench" / "out"
BIN = REPO / "target" / "release" / "keyturn"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")

CREDS_PER_AGENT = 100

# Goals from issue 2, checked at the largest N measured.
GOAL_READY_S = 2.0
GOAL_RSS_PER_CRED = 1024
GOAL_IDLE_CPU_PCT = 1.0
GOAL_RATIO = 0.2


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --------------------------------------------------------------------------
# Daemon processes: every one we start is tracked and stopped on exit.
# --------------------------------------------------------------------------

_DAEMONS: list[subprocess.Popen] = []


def stop_process(p: subprocess.Popen, timeout: float = 40.0) -> float | None:
    """SIGTERM, wait, SIGKILL if needed. Returns seconds to exit on SIGTERM."""
    if p.poll() is not None:
        return None
    t0 = time.monotonic()
    try:
        p.send_signal(signal.SIGTERM)
        p.wait(timeout=timeout)
        return time.monotonic() - t0
    except subprocess.TimeoutExpired:
        log(f"daemon {p.pid} did not stop within {timeout}s of SIGTERM: SIGKILL")
        p.kill()
        p.wait()
        return None
    finally:
        if p in _DAEMONS:
            _DAEMONS.remove(p)


def stop_all() -> None:
    for p in list(_DAEMONS):
        stop_process(p, timeout=15.0)


def _on_signal(signum, _frame):
    # Turn SIGTERM into an exception so `finally` blocks run; SIGINT already is.
    raise KeyboardInterrupt(f"signal {signum}")


# --------------------------------------------------------------------------
# /proc helpers
# --------------------------------------------------------------------------


def proc_cpu_ticks(pid: int) -> int:
    """utime + stime of a process (all its threads), in clock ticks."""
    with open(f"/proc/{pid}/stat") as f:
        rest = f.read().rsplit(")", 1)[1].split()
    # rest[0] is field 3 (state); utime and stime are fields 14 and 15.
    return int(rest[11]) + int(rest[12])


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM (bytes) and Threads from /proc/PID/status."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, val = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                out[key] = int(val.split()[0]) * 1024
            elif key == "Threads":
                out[key] = int(val)
    return out


def thread_ticks(pid: int) -> dict[str, int]:
    """CPU ticks per thread name (threads of the same name are summed)."""
    out: dict[str, int] = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                s = f.read()
        except FileNotFoundError:
            continue
        name = s[s.index("(") + 1 : s.rindex(")")]
        rest = s.rsplit(")", 1)[1].split()
        out[name] = out.get(name, 0) + int(rest[11]) + int(rest[12])
    return out


def proc_io(pid: int) -> dict[str, int]:
    out = {}
    try:
        with open(f"/proc/{pid}/io") as f:
            for line in f:
                k, _, v = line.partition(":")
                out[k] = int(v)
    except (FileNotFoundError, PermissionError):
        pass
    return out


def system_cpu() -> dict[str, int]:
    """Aggregate /proc/stat cpu line (ticks)."""
    with open("/proc/stat") as f:
        parts = f.readline().split()
    names = ["user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal"]
    return {n: int(v) for n, v in zip(names, parts[1:9])}


def block_device_of(path: Path) -> str | None:
    """The /proc/diskstats name of the block device holding `path`."""
    st = os.stat(path)
    maj, mnr = os.major(st.st_dev), os.minor(st.st_dev)
    try:
        with open(f"/sys/dev/block/{maj}:{mnr}/uevent") as f:
            for line in f:
                if line.startswith("DEVNAME="):
                    return line.strip().split("=", 1)[1]
    except FileNotFoundError:
        pass
    return None


def diskstats(dev: str | None) -> dict[str, int] | None:
    if not dev:
        return None
    with open("/proc/diskstats") as f:
        for line in f:
            p = line.split()
            if p[2] == dev:
                d = {"writes": int(p[7]), "sectors_written": int(p[9]), "ms_writing": int(p[10])}
                if len(p) >= 20:  # kernel >= 5.5: flush requests
                    d["flushes"] = int(p[18])
                return d
    return None


def delta(a: dict | None, b: dict | None) -> dict | None:
    if a is None or b is None:
        return None
    return {k: b[k] - a.get(k, 0) for k in b}


class CpuWindow:
    """Process, per-thread, system CPU and disk counters between start and end."""

    def __init__(self, pid: int, dev: str | None):
        self.pid, self.dev = pid, dev
        self.t0 = time.monotonic()
        self.p0 = proc_cpu_ticks(pid)
        self.th0 = thread_ticks(pid)
        self.s0 = system_cpu()
        self.d0 = diskstats(dev)
        self.io0 = proc_io(pid)
        # Context switches of every thread, exited ones included (perf, when
        # installed and permitted; None otherwise).
        self.perf = None
        if shutil.which("perf"):
            try:
                self.perf = subprocess.Popen(
                    ["perf", "stat", "-x,", "-e", "context-switches", "-p", str(pid)],
                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            except OSError:
                self.perf = None

    def _context_switches(self) -> int | None:
        if self.perf is None:
            return None
        self.perf.send_signal(signal.SIGINT)
        try:
            _, err = self.perf.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            self.perf.kill()
            return None
        for line in err.decode(errors="replace").splitlines():
            fields = line.split(",")
            if len(fields) > 2 and fields[2] == "context-switches" and fields[0].isdigit():
                return int(fields[0])
        return None

    def end(self) -> dict:
        wall = time.monotonic() - self.t0
        switches = self._context_switches()
        p1 = proc_cpu_ticks(self.pid)
        th1 = thread_ticks(self.pid)
        s1 = system_cpu()
        sys_d = delta(self.s0, s1)
        sys_total = sum(sys_d.values()) or 1
        threads = {}
        for name, t in th1.items():
            d = t - self.th0.get(name, 0)
            if d > 0:
                threads[name] = round(100.0 * d / CLK_TCK / wall, 1)
        # Blocking-pool threads that exited before the end are in the process
        # total but no longer listed per thread.
        gone = (p1 - self.p0) - sum(t - self.th0.get(name, 0) for name, t in th1.items())
        if gone > 0:
            threads["(exited threads)"] = round(100.0 * gone / CLK_TCK / wall, 1)
        io = delta(self.io0, proc_io(self.pid)) or {}
        return {
            "wall_s": round(wall, 3),
            "cpu_s": round((p1 - self.p0) / CLK_TCK, 2),
            "cpu_pct_of_one_core": round(100.0 * (p1 - self.p0) / CLK_TCK / wall, 2),
            "threads_pct_of_one_core": dict(sorted(threads.items(), key=lambda kv: -kv[1])),
            "system_pct": {k: round(100.0 * v / sys_total, 1) for k, v in sys_d.items()},
            "disk": delta(self.d0, diskstats(self.dev)),
            "proc_io": {k: io[k] for k in ("syscw", "write_bytes") if k in io},
            "context_switches": switches,
        }


# --------------------------------------------------------------------------
# Config generation
# --------------------------------------------------------------------------


def cred_spec(i: int) -> tuple[str, str, bool]:
    """(credential id, TOML `generate` + `deliver` lines, is_bundle) for index i.

    Of every 100: 45 password, 44 random_bytes, 10 api_key, 1 ed25519
    (a bundle). One file in three is json, the rest raw.
    """
    k = i % 100
    if k < 45:
        gen = '{ kind = "password", length = 32 }'
    elif k < 67:
        gen = '{ kind = "random_bytes", length = 32, encoding = "hex" }'
    elif k < 89:
        gen = '{ kind = "random_bytes", length = 48, encoding = "base64url" }'
    elif k < 99:
        gen = '{ kind = "api_key", prefix = "kt_", length = 32 }'
    else:
        return f"k{i:03d}", 'generate = { kind = "ed25519" }\n', True
    return f"c{i:03d}", f"generate = {gen}\n", False


def write_config(d: Path, n: int) -> tuple[Path, list[tuple[str, str]]]:
    """Writes the config directory for n credentials: d/keyturn.toml (daemon,
    vault) and one d/agents.d/<agent>.toml per agent, as config management
    would drop them. Returns keyturn.toml and the expected delivered entries
    as (agent dir, name)."""
    d.mkdir(parents=True, exist_ok=True)
    (d / "agents").mkdir(exist_ok=True)
    agents_d = d / "agents.d"
    agents_d.mkdir(exist_ok=True)
    main = [
        "[daemon]",
        f'state_dir = "{d}/state"',
        f'socket = "{d}/control.sock"',
        f'delivery_roots = ["{d}/agents"]',
        'drain_timeout = "30s"',
        'catch_up_spread = "5m"',
        "max_concurrent_rotations = 64",
        'retry = { initial_delay = "500ms", max_delay = "10s", max_attempts = 5 }',
        "",
        "[vaults.local]",
        'type = "local"',
        "max_concurrent = 64",
        "",
    ]
    expected: list[tuple[str, str]] = []
    agents = (n + CREDS_PER_AGENT - 1) // CREDS_PER_AGENT
    for a in range(agents):
        aid = f"a{a:05d}"
        lines = [f"[agents.{aid}]", 'owner = "bench@example.com"', 'tenant = "bench"', 'tier = "low"', ""]
        for i in range(min(CREDS_PER_AGENT, n - a * CREDS_PER_AGENT)):
            cid, gen, bundle = cred_spec(i)
            if bundle:
                name, fmt = cid, ""
            else:
                fmt = "json" if i % 3 == 0 else "raw"
                name = cid + (".json" if fmt == "json" else "")
            expected.append((aid, name if not bundle else name + "/..data"))
            fmt_kv = f', format = "{fmt}"' if fmt else ""
            lines += [
                f"[agents.{aid}.credentials.{cid}]",
                'vault = "local"',
                gen.rstrip("\n"),
                'every = "24h"',
                'jitter = "1h"',
                'grace = "1h"',
                f'deliver = [{{ type = "file", path = "{aid}/{name}"{fmt_kv} }}]',
                "",
            ]
        (agents_d / f"{aid}.toml").write_text("\n".join(lines))
    cfg = d / "keyturn.toml"
    cfg.write_text("\n".join(main))
    return cfg, expected


def write_empty_config(d: Path) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    cfg = d / "keyturn.toml"
    cfg.write_text(
        "\n".join(
            [
                "[daemon]",
                f'state_dir = "{d}/state"',
                f'socket = "{d}/control.sock"',
                "max_concurrent_rotations = 64",
                "",
                "[vaults.local]",
                'type = "local"',
                "max_concurrent = 64",
                "",
            ]
        )
    )
    return cfg


def count_delivered(root: Path, expected_by_dir: dict[str, set[str]]) -> int:
    """How many expected files/bundles exist (a scandir per agent directory)."""
    n = 0
    for aid, names in expected_by_dir.items():
        try:
            with os.scandir(root / aid) as it:
                present = {e.name for e in it}
        except FileNotFoundError:
            continue
        for name in names:
            if "/" in name:  # bundle: delivered once its ..data link exists
                if name.split("/")[0] in present and os.path.lexists(root / aid / name):
                    n += 1
            elif name in present:
                n += 1
    return n


# --------------------------------------------------------------------------
# Running the daemon and the CLI
# --------------------------------------------------------------------------


class Daemon:
    def __init__(self, cfg: Path, tag: str, extra_env: dict | None = None):
        self.cfg = cfg
        d = cfg.parent
        self.notify_path = d / f"notify-{tag}.sock"
        self.notify_path.unlink(missing_ok=True)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(self.notify_path))
        self.log_path = d / f"daemon-{tag}.log"
        env = dict(os.environ)
        env["NOTIFY_SOCKET"] = str(self.notify_path)
        for k in ("KEYTURN_LOG", "KEYTURN_CONFIG", "FAILPOINTS", "WATCHDOG_USEC", "WATCHDOG_PID"):
            env.pop(k, None)
        env.update(extra_env or {})
        logf = open(self.log_path, "wb")
        self.t_spawn = time.monotonic()
        self.proc = subprocess.Popen(
            [str(BIN), "daemon", "--config", str(cfg)],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=logf,
            stderr=subprocess.STDOUT,
            # Our own session: a Ctrl-C reaches only us; we stop it ourselves.
            start_new_session=True,
        )
        logf.close()
        _DAEMONS.append(self.proc)
        self.pid = self.proc.pid

    def wait_ready(self, timeout: float) -> float:
        """Seconds from spawn to READY=1."""
        deadline = self.t_spawn + timeout
        self.sock.settimeout(0.05)
        while True:
            try:
                msg = self.sock.recv(65536).decode(errors="replace")
                if "READY=1" in msg.split("\n"):
                    return time.monotonic() - self.t_spawn
                continue
            except socket.timeout:
                pass
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited with {self.proc.returncode} before READY; see {self.log_path}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"no READY=1 within {timeout}s; see {self.log_path}")

    def stop(self) -> float | None:
        t = stop_process(self.proc)
        self.sock.close()
        self.notify_path.unlink(missing_ok=True)
        return t


def cli(cfg: Path, *args: str, timeout: float = 3600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("KEYTURN_CONFIG", "NOTIFY_SOCKET")}
    return subprocess.run(
        [str(BIN), *args, "--config", str(cfg)],
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=timeout,
    )


def status_json(cfg: Path) -> list[dict]:
    """The credential rows of `status --json` ({"credentials": [...], "tasks": [...]}; a bare
    array from builds before task-scoped credentials, so that --bin can measure one)."""
    r = cli(cfg, "status", "--json", timeout=600)
    if r.returncode != 0:
        raise RuntimeError(f"status --json failed ({r.returncode}): {r.stderr.decode(errors='replace')[:500]}")
    rows = json.loads(r.stdout)
    return rows if isinstance(rows, list) else rows["credentials"]


# --------------------------------------------------------------------------
# Raw atomic-file-write rate (keyturn's file-sink recipe, in Python)
# --------------------------------------------------------------------------

PAYLOAD = b"x" * 63 + b"\n"


def atomic_write(dir_fd_path: str, name: str, seq: int) -> None:
    target = os.path.join(dir_fd_path, name)
    tmp = os.path.join(dir_fd_path, f".{name}.tmp.{seq}")
    fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_WRONLY | os.O_CLOEXEC, 0o400)
    try:
        os.fchmod(fd, 0o400)  # keyturn sets the exact mode before the first byte
        os.write(fd, PAYLOAD)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, target)
    dfd = os.open(dir_fd_path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def run_workers(worker, threads: int, seconds: float, stop_at: list) -> float:
    """Runs `worker(t)` on `threads` threads until `seconds` from now (put in
    `stop_at[0]`, which the workers watch) and waits for them: the wall time."""
    t0 = time.monotonic()
    stop_at[0] = t0 + seconds
    ths = [threading.Thread(target=worker, args=(t,), daemon=True) for t in range(threads)]
    for th in ths:
        th.start()
    for th in ths:
        th.join()
    return time.monotonic() - t0


def raw_write_rate(base: Path, threads: int, seconds: float, files: int, dirs: int, dev: str | None) -> dict:
    """Atomic writes/s over `files` files in `dirs` directories for ~`seconds`."""
    if base.exists():
        shutil.rmtree(base)
    dnames = []
    for i in range(dirs):
        p = base / f"d{i:02d}"
        p.mkdir(parents=True)
        dnames.append(str(p))
    targets = [(dnames[i % dirs], f"f{i:05d}") for i in range(files)]
    counts = [0] * threads
    stop_at = [0.0]
    errors: list[BaseException] = []

    def worker(t: int) -> None:
        mine = targets[t::threads]
        seq, i = 0, 0
        try:
            while time.monotonic() < stop_at[0]:
                d, name = mine[i]
                atomic_write(d, name, seq)
                seq += 1
                i = (i + 1) % len(mine)
            counts[t] = seq
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)
            counts[t] = seq

    s0, d0 = system_cpu(), diskstats(dev)
    wall = run_workers(worker, threads, seconds, stop_at)
    if errors:
        raise errors[0]
    total = sum(counts)
    sys_d = delta(s0, system_cpu())
    sys_total = sum(sys_d.values()) or 1
    shutil.rmtree(base)
    disk = delta(d0, diskstats(dev))
    return {
        "per_write": per_op({"disk": disk}, max(total, 1)),
        "threads": threads,
        "writes": total,
        "wall_s": round(wall, 2),
        "writes_per_s": round(total / wall, 1),
        "disk": disk,
        "system_pct": {k: round(100.0 * v / sys_total, 1) for k, v in sys_d.items()},
    }


# --------------------------------------------------------------------------
# The benchmark
# --------------------------------------------------------------------------


def per_op(w: dict, n: int) -> dict:
    """Costs per rotation (or per write) from a CpuWindow/raw result."""
    out = {}
    if "cpu_s" in w:
        out["cpu_ms"] = round(1000.0 * w["cpu_s"] / n, 3)
    if w.get("disk"):
        out.update({f"disk_{k}": round(v / n, 2) for k, v in w["disk"].items() if k in ("writes", "flushes")})
        out["disk_kib_written"] = round(w["disk"]["sectors_written"] * 512 / 1024 / n, 1)
    if w.get("proc_io"):
        out.update({k: round(v / n, 1) for k, v in w["proc_io"].items()})
    if w.get("context_switches") is not None:
        out["context_switches"] = round(w["context_switches"] / n, 1)
    return out


def measure_idle(pid: int, seconds: float, dev: str | None) -> dict:
    w = CpuWindow(pid, dev)
    time.sleep(seconds)
    r = w.end()
    r.update(proc_status(pid))
    return r


def bench_baseline(idle_seconds: float, dev: str | None) -> dict:
    d = OUT / "run-empty"
    if d.exists():
        shutil.rmtree(d)
    cfg = write_empty_config(d)
    log("baseline: empty daemon (0 credentials)")
    dm = Daemon(cfg, "fresh")
    try:
        ready = dm.wait_ready(60)
        time.sleep(3)
        idle = measure_idle(dm.pid, idle_seconds, dev)
    finally:
        dm.stop()
    dm = Daemon(cfg, "restart")
    try:
        ready_restart = dm.wait_ready(60)
        time.sleep(3)
        st = proc_status(dm.pid)
    finally:
        dm.stop()
    res = {
        "ready_fresh_s": round(ready, 4),
        "ready_restart_s": round(ready_restart, 4),
        "idle": idle,
        "rss_bytes": idle["VmRSS"],
        "rss_restart_bytes": st["VmRSS"],
    }
    log(f"baseline: READY {ready:.3f}s / {ready_restart:.3f}s, RSS {idle['VmRSS'] / 2**20:.1f} MiB, "
        f"idle CPU {idle['cpu_pct_of_one_core']:.2f}%")
    return res


def bench_size(n: int, idle_seconds: float, dev: str | None, keep: bool) -> dict:
    d = OUT / f"run-{n}"
    if d.exists():
        shutil.rmtree(d)
    t0 = time.monotonic()
    cfg, expected = write_config(d, n)
    config_files = [cfg, *sorted((d / "agents.d").glob("*.toml"))]
    res: dict = {
        "n": n,
        "config_bytes": sum(f.stat().st_size for f in config_files),
        "config_files": len(config_files),
        "config_gen_s": round(time.monotonic() - t0, 2),
    }
    log(f"N={n}: config {res['config_bytes'] / 2**20:.1f} MiB written in {len(config_files)} files")

    # Config parse + validation alone: the part of READY that is not state.
    t0 = time.monotonic()
    r = cli(cfg, "check")
    res["check_s"] = round(time.monotonic() - t0, 3)
    if r.returncode != 0:
        raise RuntimeError(f"keyturn check failed: {r.stdout.decode()[:2000]} {r.stderr.decode()[:2000]}")
    log(f"N={n}: `keyturn check` {res['check_s']:.2f}s")

    by_dir: dict[str, set[str]] = {}
    for aid, name in expected:
        by_dir.setdefault(aid, set()).add(name)
    root = d / "agents"

    # 1. Fresh start: READY, then the initial rotation of every credential.
    dm = Daemon(cfg, "fresh")
    try:
        res["ready_fresh_s"] = round(dm.wait_ready(120), 4)
        res["rss_at_ready_fresh"] = proc_status(dm.pid)["VmRSS"]
        log(f"N={n}: fresh READY in {res['ready_fresh_s']:.3f}s; waiting for {n} initial rotations")
        w = CpuWindow(dm.pid, dev)
        deadline = time.monotonic() + max(300, n / 20)
        last_log, done = 0.0, 0
        poll = 0.5 if n <= 10_000 else 3.0
        while True:
            done = count_delivered(root, by_dir)
            now = time.monotonic()
            if done >= n:
                break
            if dm.proc.poll() is not None:
                raise RuntimeError(f"daemon exited ({dm.proc.returncode}); see {dm.log_path}")
            if now > deadline:
                raise RuntimeError(f"only {done}/{n} initial deliveries after the deadline; see {dm.log_path}")
            if now - last_log > 15:
                el = now - w.t0
                log(f"N={n}:   {done}/{n} delivered after {el:.0f}s ({done / max(el, 1e-9):.0f}/s)")
                last_log = now
            time.sleep(poll)
        initial = w.end()
        # Every file is there; make sure every rotation is also recorded done.
        t0 = time.monotonic()
        while True:
            ts = time.monotonic()
            rows = status_json(cfg)
            status_s = time.monotonic() - ts
            states: dict[str, int] = {}
            for row in rows:
                states[row["state"]] = states.get(row["state"], 0) + 1
            rotated = sum(1 for row in rows if row.get("version"))
            # "retiring" = delivered, the previous version awaits its grace.
            settled = states.get("idle", 0) + states.get("retiring", 0)
            if len(rows) == n and settled == n and rotated == n:
                break
            if time.monotonic() - t0 > 120:
                raise RuntimeError(f"initial rotations not all settled: {states}, {rotated} with a version")
            time.sleep(2)
        initial["rotations_per_s"] = round(n / (time.monotonic() - w.t0), 1)
        initial["per_rotation"] = per_op(initial, n)
        res["initial_rotations"] = initial
        res["status_json_s"] = round(status_s, 3)
        log(f"N={n}: initial rotations done in {initial['wall_s']:.1f}s "
            f"(~{n / initial['wall_s']:.0f}/s, daemon CPU {initial['cpu_pct_of_one_core']:.0f}%, "
            f"{initial['per_rotation'].get('cpu_ms')} ms CPU and "
            f"{initial['per_rotation'].get('context_switches')} context switches per rotation); "
            f"status --json took {status_s:.2f}s")

        # 2. Idle: RSS and CPU.
        time.sleep(5)
        log(f"N={n}: idle for {idle_seconds:.0f}s")
        res["idle"] = measure_idle(dm.pid, idle_seconds, dev)
        log(f"N={n}: idle RSS {res['idle']['VmRSS'] / 2**20:.1f} MiB, CPU {res['idle']['cpu_pct_of_one_core']:.2f}%")

        # 3. rotate all --wait.
        log(f"N={n}: rotate all --wait")
        w = CpuWindow(dm.pid, dev)
        r = cli(cfg, "rotate", "all", "--wait", timeout=max(600, n / 10))
        rot = w.end()
        out_lines = r.stdout.decode(errors="replace").splitlines()
        rot["exit_code"] = r.returncode
        rot["failed"] = sum(1 for ln in out_lines if "FAILED" in ln)
        rot["rotations_per_s"] = round(n / rot["wall_s"], 1)
        rot["rss_after"] = proc_status(dm.pid)
        rot["per_rotation"] = per_op(rot, n)
        if r.returncode != 0:
            rot["stderr"] = r.stderr.decode(errors="replace")[:2000]
        res["rotate_all"] = rot
        log(f"N={n}: rotate all --wait: {rot['wall_s']:.1f}s = {rot['rotations_per_s']:.0f} rotations/s "
            f"(exit {r.returncode}, {rot['failed']} failed), daemon CPU {rot['cpu_pct_of_one_core']:.0f}% of a core, "
            f"{rot['per_rotation'].get('cpu_ms')} ms CPU and "
            f"{rot['per_rotation'].get('context_switches')} context switches per rotation")

        res["stop_s"] = dm.stop()
    finally:
        if dm.proc.poll() is None:
            dm.stop()

    # 4. Restart with state present.
    dm = Daemon(cfg, "restart")
    try:
        res["ready_restart_s"] = round(dm.wait_ready(120), 4)
        time.sleep(5)
        res["rss_restart_idle"] = proc_status(dm.pid)["VmRSS"]
        log(f"N={n}: restart READY in {res['ready_restart_s']:.3f}s, RSS {res['rss_restart_idle'] / 2**20:.1f} MiB")
    finally:
        dm.stop()

    res["state_dir_bytes"] = sum(f.stat().st_size for f in (d / "state").rglob("*") if f.is_file())
    if not keep:
        shutil.rmtree(d)
    return res


def machine_info() -> dict:
    df = subprocess.run(["df", "-h", str(OUT)], capture_output=True, text=True).stdout.strip()
    cpu_model = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu_model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    with open("/proc/meminfo") as f:
        mem = f.readline().split()[1]
    rustc = subprocess.run(["rustc", "--version"], capture_output=True, text=True).stdout.strip()
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    return {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "nproc": os.cpu_count(),
        "cpu": cpu_model,
        "mem_kib": int(mem),
        "kernel": platform.release(),
        "df": df,
        "rustc": rustc,
        "commit": commit,
        "loadavg_start": open("/proc/loadavg").read().split()[:3],
    }


def built(no_build: bool) -> bool:
    """`cargo build --release` unless `no_build`; then whether the binary to
    measure (BIN, which --bin may change) is there, saying so if not."""
    if not no_build:
        log("cargo build --release")
        subprocess.run(["cargo", "build", "--release"], cwd=REPO, check=True)
    if not BIN.exists():
        log(f"{BIN} is missing; build it first")
        return False
    return True


def finish(results: dict, check_goals, fmt_table, path: Path, secrets: list[tuple[str, str]] = ()) -> None:
    """Ends a run: the load average at the end, the goals checked, the results
    written to `path` as JSON, then the table, each goal (PASS, FAIL, or n/a
    when it could not be measured) and where the results are. Results that
    would contain one of `secrets` (this run's own passwords and tokens, as
    (what it is, value)) are not written: RuntimeError names which."""
    results["machine"]["loadavg_end"] = open("/proc/loadavg").read().split()[:3]
    results["goals"] = check_goals(results)
    text = json.dumps(results, indent=2, default=str) + "\n"
    table = fmt_table(results)
    for what, secret in secrets:
        if secret and (secret in text or secret in table):
            raise RuntimeError(f"the results would contain {what}")
    path.write_text(text)
    print()
    print(table)
    print()
    for g in results["goals"]:
        tag = {True: "PASS", False: "FAIL", None: "n/a "}[g["pass"]]
        print(f"{tag}  {g['goal']}: {g['measured']}")
    print(f"\nresults: {path}")


def fmt_table(results: dict) -> str:
    base = results["baseline"]
    raw_best = results["raw_write"]["best_writes_per_s"]
    head = ["N", "READY fresh", "READY restart", "idle RSS", "RSS/cred", "idle CPU",
            "rot/s (rotate all)", "rot/s (initial)", "ratio", "daemon CPU in rotate-all"]
    rows = [["0 (baseline)", f"{base['ready_fresh_s']:.3f} s", f"{base['ready_restart_s']:.3f} s",
             f"{base['rss_bytes'] / 2**20:.1f} MiB", "-", f"{base['idle']['cpu_pct_of_one_core']:.2f} %",
             "-", "-", "-", "-"]]
    for r in results["sizes"]:
        if "error" in r:
            rows.append([str(r["n"]), "error: " + r["error"][:60]] + [""] * (len(head) - 2))
            continue
        rows.append([
            f"{r['n']:,}",
            f"{r['ready_fresh_s']:.3f} s",
            f"{r['ready_restart_s']:.3f} s",
            f"{r['idle']['VmRSS'] / 2**20:.1f} MiB",
            f"{r['rss_per_cred_bytes']:,.0f} B",
            f"{r['idle']['cpu_pct_of_one_core']:.2f} %",
            f"{r['rotate_all']['rotations_per_s']:,.0f}",
            f"{r['initial_rotations']['rotations_per_s']:,.0f}",
            f"{r['ratio']:.2f}",
            f"{r['rotate_all']['cpu_pct_of_one_core']:.0f} %",
        ])
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]
    lines = ["| " + " | ".join(h.ljust(w) for h, w in zip(head, widths)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |")
    raw = results["raw_write"]
    lines.append("")
    lines.append("raw atomic-file-write rate (same disk): " + ", ".join(
        f"{m['threads']} thread{'s' if m['threads'] > 1 else ''} ({m['when']}): {m['writes_per_s']:,.0f}/s"
        for m in raw["modes"])
        + f"; denominator = best = {raw_best:,.0f}/s ({raw['best_threads']} threads, {raw['best_when']})")
    return "\n".join(lines)


def check_goals(results: dict) -> list[dict]:
    ok = [r for r in results["sizes"] if "error" not in r]
    if not ok:
        return []
    big = max(ok, key=lambda r: r["n"])
    n = big["n"]
    note = "" if n >= 100_000 else f" (measured at N={n}; the goal is stated for 100k)"
    goals = [
        ("READY <= 2 s at 100k (fresh and restart)", max(big["ready_fresh_s"], big["ready_restart_s"]) <= GOAL_READY_S,
         f"fresh {big['ready_fresh_s']:.3f} s, restart {big['ready_restart_s']:.3f} s{note}"),
        ("<= 1 KiB RSS per credential above baseline at 100k", big["rss_per_cred_bytes"] <= GOAL_RSS_PER_CRED,
         f"{big['rss_per_cred_bytes']:,.0f} B/credential{note}"),
        ("idle CPU ~ 0 (< 1 % of a core), every N", all(r["idle"]["cpu_pct_of_one_core"] < GOAL_IDLE_CPU_PCT for r in ok),
         ", ".join(f"{r['n']}: {r['idle']['cpu_pct_of_one_core']:.2f} %" for r in ok)),
        ("rotations/s / raw write rate >= 0.2, every N", all(r["ratio"] >= GOAL_RATIO for r in ok),
         ", ".join(f"{r['n']}: {r['ratio']:.2f}" for r in ok)),
    ]
    return [{"goal": g, "pass": bool(p), "measured": m} for g, p, m in goals]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1000,10000,100000", help="comma-separated credential counts")
    ap.add_argument("--quick", action="store_true", help="N = 1000 only")
    ap.add_argument("--idle-seconds", type=float, default=60.0, help="idle CPU window (default 60)")
    ap.add_argument("--raw-seconds", type=float, default=10.0, help="duration of each raw-write mode (default 10)")
    ap.add_argument("--raw-threads", default="1,8,64", help="thread counts of the raw-write test (default 1,8,64)")
    ap.add_argument("--no-build", action="store_true", help="use the existing target/release/keyturn")
    ap.add_argument("--keep", action="store_true", help="keep each run's directory under bench/out/")
    args = ap.parse_args()
    sizes = [1000] if args.quick else [int(s) for s in args.sizes.split(",") if s.strip()]

    signal.signal(signal.SIGTERM, _on_signal)
    OUT.mkdir(parents=True, exist_ok=True)
    results: dict = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "machine": machine_info()}
    try:
        if not args.no_build:
            log("cargo build --release")
            t0 = time.monotonic()
            subprocess.run(["cargo", "build", "--release"], cwd=REPO, check=True)
            results["build_s"] = round(time.monotonic() - t0, 1)
        if not BIN.exists():
            log(f"{BIN} is missing; build it first")
            return 1
        dev = block_device_of(OUT)
        results["machine"]["block_device"] = dev

        modes: list[dict] = []

        def raw(when: str) -> None:
            # The shared disk is noisy: measured before and after the daemon
            # runs; the best of all is the denominator (the conservative one).
            log(f"raw atomic-file-write rate on {dev or 'unknown device'} ({when})")
            for t in [int(x) for x in args.raw_threads.split(",")]:
                m = raw_write_rate(OUT / "rawwrite", t, args.raw_seconds, 2000, 20, dev)
                m["when"] = when
                log(f"  {t} thread(s): {m['writes_per_s']:,.0f} writes/s")
                modes.append(m)

        raw("before")

        results["baseline"] = bench_baseline(args.idle_seconds, dev)
        results["sizes"] = []
        for n in sizes:
            try:
                r = bench_size(n, args.idle_seconds, dev, args.keep)
                r["rss_per_cred_bytes"] = (r["idle"]["VmRSS"] - results["baseline"]["rss_bytes"]) / n
                r["rss_per_cred_restart_bytes"] = (r["rss_restart_idle"] - results["baseline"]["rss_restart_bytes"]) / n
            except (RuntimeError, subprocess.SubprocessError) as e:
                log(f"N={n}: FAILED: {e}")
                r = {"n": n, "error": str(e)}
            results["sizes"].append(r)
        raw("after")
        best = max(modes, key=lambda m: m["writes_per_s"])
        results["raw_write"] = {"files": 2000, "dirs": 20, "payload_bytes": len(PAYLOAD), "modes": modes,
                                "best_writes_per_s": best["writes_per_s"], "best_threads": best["threads"],
                                "best_when": best["when"]}
        for r in results["sizes"]:
            if "error" not in r:
                r["ratio"] = r["rotate_all"]["rotations_per_s"] / best["writes_per_s"]
        finish(results, check_goals, fmt_table, OUT / "results.json")
        return 0
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    finally:
        stop_all()


if __name__ == "__main__":
    sys.exit(main())
