#!/usr/bin/env python3
"""How much disk the state directory needs (issue 8, defect 7).

Generates a config with N credentials (default 1,000) on the local vault with
file sinks (the same mix as bench/run.py), starts the release daemon, lets
every credential get its first version, then runs `keyturn rotate all --wait`
R times. After each round it records the size of every file in the state
directory: the state database, the local vault, their write-ahead logs and
the audit log. The databases stop growing once each credential's history is
full (8 finished rotations and 8 retired versions kept in the state database,
16 retired versions' metadata in the local vault); the audit log grows with
every rotation.

Prints a table, writes bench/out/state_space.json. Reported, never asserted.

    python3 bench/state_space.py                    # 1,000 credentials, 20 rounds
    python3 bench/state_space.py --n 1000 --rounds 30 --no-build
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as bench  # noqa: E402  (the scale benchmark's helpers)


def sizes(state: Path) -> dict[str, int]:
    out: dict[str, int] = {}
    for p in sorted(state.rglob("*")):
        if p.is_file():
            out[str(p.relative_to(state))] = p.stat().st_size
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--no-build", action="store_true")
    args = ap.parse_args()
    if not args.no_build:
        subprocess.run(["cargo", "build", "--release"], cwd=bench.REPO, check=True)
    d = bench.OUT / f"space-{args.n}"
    if d.exists():
        shutil.rmtree(d)
    cfg, expected = bench.write_config(d, args.n)
    by_dir: dict[str, set[str]] = {}
    for aid, name in expected:
        by_dir.setdefault(aid, set()).add(name)
    state = d / "state"
    rounds = []
    dm = bench.Daemon(cfg, "space")
    try:
        dm.wait_ready(120)
        while bench.count_delivered(d / "agents", by_dir) < args.n:
            time.sleep(0.5)
        audit_records = lambda: sum(1 for _ in open(state / "audit.log", "rb"))  # noqa: E731
        rounds.append({"round": 0, "audit_records": audit_records(), "files": sizes(state)})
        for r in range(1, args.rounds + 1):
            res = bench.cli(cfg, "rotate", "all", "--wait")
            if res.returncode != 0:
                raise RuntimeError(res.stderr.decode(errors="replace")[:500])
            rounds.append({"round": r, "audit_records": audit_records(), "files": sizes(state)})
            bench.log(f"round {r}: {sum(rounds[-1]['files'].values()) / 2**20:.2f} MiB in the state directory")
    finally:
        dm.stop()
    after_stop = sizes(state)

    first, last = rounds[0], rounds[-1]
    audit_growth = last["files"]["audit.log"] - first["files"]["audit.log"]
    rotations = args.n * args.rounds
    files = sorted(set().union(*(r["files"] for r in rounds)))
    print()
    print(f"State directory with {args.n} credentials, after the first versions and then {args.rounds} rounds of `rotate all`:")
    print()
    print(f"| file | after first versions | largest seen | after round {args.rounds} | after stop |")
    print("|---|---:|---:|---:|---:|")
    for f in files:
        if f.endswith(".lock") or f.endswith(".key"):
            continue
        largest = max(r["files"].get(f, 0) for r in rounds)
        print(
            f"| {f} | {first['files'].get(f, 0) / 1024:,.0f} KiB | {largest / 1024:,.0f} KiB "
            f"| {last['files'].get(f, 0) / 1024:,.0f} KiB | {after_stop.get(f, 0) / 1024:,.0f} KiB |"
        )
    dbs = {k: v for k, v in last["files"].items() if not k.startswith("audit")}
    print()
    print(f"Databases (with WALs and index files) at the end: {sum(dbs.values()) / 2**20:.2f} MiB "
          f"= {sum(dbs.values()) / args.n / 1024:.1f} KiB per credential")
    print(f"Audit log: {audit_growth / rotations:,.0f} bytes per rotation "
          f"({(last['audit_records'] - first['audit_records']) / rotations:.1f} records)")
    out = {"n": args.n, "rounds": rounds, "after_stop": after_stop,
           "audit_bytes_per_rotation": audit_growth / rotations,
           "machine": bench.machine_info()}
    (bench.OUT / "state_space.json").write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
