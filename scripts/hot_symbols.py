#!/usr/bin/env python3
"""Regenerates scripts/hot-symbols.txt: the functions a running daemon
executes, which the release build links first (build.rs passes the file
to LLD's --symbol-ordering-file).

Why: the kernel maps a binary's code into a process 64 KiB at a time
around each page it touches (fault-around). The linker's default order
scatters the ~3 MB of code a daemon runs across all ~25 MB of .text, so
nearly every 64 KiB block gets mapped and counts in its RSS. Linked
first, the code it runs sits in a few MB (BENCHMARKS.md, issue 11).

How: the release binary runs under valgrind's callgrind in the two roles
`bench/agent.py` measures, against the test servers' OpenBao:
  * rotating: one credential on OpenBao KV with a file and a webhook sink,
    one on the local vault with a JSON file sink, the HTTP listener; three
    manual rotations of each, `status`, a metrics scrape;
  * following: the same OpenBao credential in follow mode with follow
    nudges, while a rotator (not profiled) rotates it three times and
    nudges it; a metrics scrape.
The symbols the profiles name are written in the order first seen.

The file goes stale as code changes (a renamed or moved function, and the
`.llvm.<hash>` names of internal functions, no longer match; they are
skipped, and the code they name goes back to the default place). Run this
again after large changes, and when BENCHMARKS.md's RSS figures drift:

    bash scripts/services.sh start
    cargo build --release --bin keyturn
    python3 scripts/hot_symbols.py      # needs valgrind (apt-get install valgrind)
    cargo build --release --bin keyturn  # relinks in the new order
"""
from __future__ import annotations

import argparse
import base64
import http.server
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def services_env() -> dict[str, str]:
    env_file = ROOT / "target/test-services/services.env"
    if not env_file.exists():
        sys.exit("the test services are not running: bash scripts/services.sh start")
    env = {}
    for line in env_file.read_text().splitlines():
        m = re.match(r"^(?:export )?([A-Z_0-9]+)=(.*)$", line.strip())
        if m:
            env[m.group(1)] = m.group(2).strip("'\"")
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Receiver:
    """A webhook receiver answering 204 to every POST."""

    def __init__(self) -> None:
        class H(http.server.BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *_):
                pass

        self.srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.srv.server_port}/hook"
        threading.Thread(target=self.srv.serve_forever, daemon=True).start()


def config(d: Path, env: dict[str, str], prefix: str, *, follow: bool, sinks: list[str],
           daemon_extra: list[str], local: bool) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    deliver = ", ".join([f'{{ type = "file", path = "{d}/files/a/c" }}', *sinks])
    token = d / "token"
    token.write_text(env["KEYTURN_TEST_BAO_TOKEN"])
    token.chmod(0o600)
    lines = [
        "[daemon]", f'state_dir = "{d}/state"', f'socket = "{d}/control.sock"',
        f'delivery_roots = ["{d}/files"]', *daemon_extra, "",
        "[vaults.bao]", 'type = "vault"', f'address = "{env["KEYTURN_TEST_BAO_ADDR"]}"',
        'mount = "secret"', f'token_file = "{token}"', f'change_index = "{prefix}/index"', "",
        "[agents.a]", 'owner = "o@example.com"', 'tenant = "t"', 'tier = "low"', "",
        "[agents.a.credentials.c]", 'vault = "bao"', f'path = "{prefix}/a/c"',
        'generate = { kind = "password", length = 32 }', 'grace = "1h"',
        *(['mode = "follow"', 'poll = "1s"'] if follow else ['every = "24h"']),
        f"deliver = [{deliver}]", "",
    ]
    if local:
        lines += [
            "[vaults.local]", 'type = "local"', "",
            "[agents.a.credentials.l]", 'vault = "local"', 'generate = { kind = "password", length = 32 }',
            'every = "24h"', 'grace = "1h"',
            f'deliver = [{{ type = "file", path = "{d}/files/a/l", format = "json" }}]', "",
        ]
    cfg = d / "keyturn.toml"
    cfg.write_text("\n".join(lines))
    return cfg


def start(bin_: str, cfg: Path, profile: Path | None) -> subprocess.Popen:
    cmd = [bin_, "daemon", "--config", str(cfg)]
    if profile is not None:
        cmd = ["valgrind", "--tool=callgrind", "--demangle=no", f"--callgrind-out-file={profile}", *cmd]
    proc = subprocess.Popen(cmd, stdout=open(cfg.parent / "log", "w"), stderr=subprocess.STDOUT)
    sock = cfg.parent / "control.sock"
    deadline = time.monotonic() + 120
    while not sock.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            sys.exit(f"the daemon did not start; see {cfg.parent / 'log'}")
        time.sleep(0.1)
    return proc


def cli(bin_: str, cfg: Path, *args: str) -> None:
    subprocess.run([bin_, *args, "--config", str(cfg)], check=True, capture_output=True, timeout=120)


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=120)


def scrape(port: int) -> None:
    urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30).read()


def symbols(bin_: str, profiles: list[Path]) -> list[str]:
    """The binary's function symbols the profiles name, in first-seen order."""
    nm = subprocess.run(["nm", "--defined-only", bin_], capture_output=True, text=True, check=True).stdout
    defined = {p[2] for p in (line.split() for line in nm.splitlines()) if len(p) == 3 and p[1] in "tTwW"}
    seen: dict[str, None] = {}
    for profile in profiles:
        for line in profile.read_text(errors="replace").splitlines():
            m = re.match(r"^c?fn=\(\d+\) (.*)$", line)
            if m and m.group(1) in defined:
                seen.setdefault(m.group(1))
    return list(seen)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bin", default=str(ROOT / "target/release/keyturn"))
    ap.add_argument("--out", default=str(ROOT / "scripts/hot-symbols.txt"))
    args = ap.parse_args()
    if shutil.which("valgrind") is None:
        sys.exit("valgrind is needed: apt-get install valgrind")
    env = services_env()
    with tempfile.TemporaryDirectory(prefix="keyturn-hot-") as tmp:
        t = Path(tmp)
        prefix = f"hot-{os.getpid()}"
        hook_key = t / "hook.key"
        hook_key.write_text(base64.b64encode(os.urandom(32)).decode())
        hook_key.chmod(0o600)
        receiver = Receiver()
        port, nudge_port = free_port(), free_port()
        profiles = [t / "rotating.cg", t / "following.cg"]

        # Rotating, profiled.
        hook = f'{{ type = "webhook", url = "{receiver.url}", secret_file = "{hook_key}" }}'
        rot_cfg = config(t / "rotating", env, prefix, follow=False, sinks=[hook],
                         daemon_extra=[f'listen = "127.0.0.1:{port}"'], local=True)
        rot = start(args.bin, rot_cfg, profiles[0])
        time.sleep(5)
        for _ in range(3):
            cli(args.bin, rot_cfg, "rotate", "a/c", "--wait")
            cli(args.bin, rot_cfg, "rotate", "a/l", "--wait")
        cli(args.bin, rot_cfg, "status")
        scrape(port)
        stop(rot)

        # Following with nudges, profiled; a rotator (not profiled) nudges it.
        fol_cfg = config(t / "following", env, prefix, follow=True, sinks=[],
                         daemon_extra=[f'listen = "127.0.0.1:{nudge_port}"',
                                       f'follow_nudge_key_file = "{hook_key}"'], local=False)
        fol = start(args.bin, fol_cfg, profiles[1])
        nudge = (f'{{ type = "webhook", url = "http://127.0.0.1:{nudge_port}/v1/follow/nudge", '
                 f'secret_file = "{hook_key}" }}')
        rot2_cfg = config(t / "rotator", env, prefix, follow=False, sinks=[nudge], daemon_extra=[], local=False)
        rot2 = start(args.bin, rot2_cfg, None)
        time.sleep(5)
        for _ in range(3):
            cli(args.bin, rot2_cfg, "rotate", "a/c", "--wait")
            time.sleep(2)
        scrape(nudge_port)
        stop(rot2)
        stop(fol)
        receiver.srv.shutdown()

        names = symbols(args.bin, profiles)
    Path(args.out).write_text("\n".join(names) + "\n")
    print(f"{args.out}: {len(names)} symbols")


if __name__ == "__main__":
    main()
