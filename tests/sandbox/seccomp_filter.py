#!/usr/bin/python3
"""Writes a seccomp BPF program approximating what systemd installs for a
unit's SystemCallFilter=, SystemCallArchitectures=native,
MemoryDenyWriteExecute=yes, RestrictAddressFamilies= and LockPersonality=yes,
for tests/sandbox_e2e.rs (bubblewrap loads it with --seccomp FD).

Usage: seccomp_filter.py OUT --filter '@system-service' --filter '~@resources @mount'
           --families 'AF_UNIX AF_INET AF_INET6'

The groups are expanded by `systemd-analyze syscall-filter`, so they are the
installed systemd's own. Like systemd: the first SystemCallFilter= line is
an allow list, `~` lines take groups out of it, and anything else fails
with EPERM (SystemCallErrorNumber=EPERM). Differences: a socket() of another
family fails with EPERM where systemd says EAFNOSUPPORT; MDWE is the
classic rule set (no write+exec mmap, no mprotect/pkey_mprotect/shmat to
exec). Needs python3-seccomp (scripts/deps.sh).
"""
import argparse
import errno
import socket
import subprocess

import seccomp

PROT_WRITE, PROT_EXEC = 0x2, 0x4
SHM_EXEC = 0o100000


def expand(name, seen=None):
    """The system calls of @group (recursively) or the call itself."""
    seen = set() if seen is None else seen
    if not name.startswith("@"):
        return {name}
    if name in seen:
        return set()
    seen.add(name)
    out = subprocess.run(
        ["systemd-analyze", "syscall-filter", name],
        check=True, capture_output=True, text=True,
    ).stdout
    calls = set()
    for line in out.splitlines()[1:]:
        word = line.strip()
        if not word or word.startswith("#"):
            continue
        calls |= expand(word, seen)
    return calls


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--filter", action="append", required=True)
    ap.add_argument("--families", required=True)
    args = ap.parse_args()

    allowed = None
    for value in args.filter:
        deny = value.startswith("~")
        names = set()
        for word in value.lstrip("~").split():
            names |= expand(word)
        if allowed is None:
            assert not deny, "the first SystemCallFilter= must be an allow list"
            allowed = names
        elif deny:
            allowed -= names
        else:
            allowed |= names

    # Calls that get argument rules instead of a plain allow.
    special = {"mmap", "mprotect", "pkey_mprotect", "shmat", "socket", "personality"}
    f = seccomp.SyscallFilter(defaction=seccomp.ERRNO(errno.EPERM))
    for name in sorted(allowed - special):
        try:
            f.add_rule(seccomp.ALLOW, name)
        except (RuntimeError, ValueError):
            pass  # not a system call of this architecture
    A, MEQ, EQ = seccomp.Arg, seccomp.MASKED_EQ, seccomp.EQ
    if "mmap" in allowed:
        f.add_rule(seccomp.ALLOW, "mmap", A(2, MEQ, PROT_EXEC, 0))
        f.add_rule(seccomp.ALLOW, "mmap", A(2, MEQ, PROT_WRITE, 0))
    for name in ("mprotect", "pkey_mprotect"):
        if name in allowed:
            f.add_rule(seccomp.ALLOW, name, A(2, MEQ, PROT_EXEC, 0))
    if "shmat" in allowed:
        f.add_rule(seccomp.ALLOW, "shmat", A(2, MEQ, SHM_EXEC, 0))
    if "socket" in allowed:
        for family in args.families.split():
            f.add_rule(seccomp.ALLOW, "socket", A(0, EQ, int(getattr(socket, family))))
    if "personality" in allowed:
        # LockPersonality=yes: only PER_LINUX and the query.
        for persona in (0x0, 0xFFFFFFFF):
            f.add_rule(seccomp.ALLOW, "personality", A(0, EQ, persona))
    with open(args.out, "wb") as out:
        f.export_bpf(out)


if __name__ == "__main__":
    main()
