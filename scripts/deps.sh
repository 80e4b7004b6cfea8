#!/usr/bin/env bash
# Installs the Debian packages the tests need beyond the Rust toolchain, at
# pinned versions (Debian 12), and only those missing; scripts/test.sh runs
# it before the tests. Idempotent: with everything present it does nothing
# and needs no network.
#  - systemd: `systemd-analyze verify` / `security` (systemd/check.sh,
#    tests/systemd_unit.rs); no running systemd is needed.
#  - bubblewrap: the mount sandbox of tests/sandbox_e2e.rs (the daemon under
#    the unit's ProtectSystem=/PrivateTmp=/PrivateDevices=/... settings).
#  - util-linux: setpriv (the unit's User=, capabilities, NoNewPrivileges=).
#  - python3-seccomp: builds that test's seccomp filter from the unit's
#    SystemCallFilter= (tests/sandbox/seccomp_filter.py).
# Not root: says what is missing and fails.
set -euo pipefail

# package=version|a command that succeeds when it is installed.
wanted=(
  "systemd=252.38-1~deb12u1|command -v systemd-analyze"
  "bubblewrap=0.8.0-2+deb12u1|command -v bwrap"
  "util-linux=2.38.1-5+deb12u3|command -v setpriv"
  "python3-seccomp=2.5.4-1+deb12u1|/usr/bin/python3 -c 'import seccomp'"
)

missing=()
for entry in "${wanted[@]}"; do
  pin=${entry%%|*}
  bash -c "${entry#*|}" >/dev/null 2>&1 || missing+=("$pin")
done
((${#missing[@]} == 0)) && exit 0

if [[ $(id -u) != 0 ]]; then
  echo "missing test dependencies: ${missing[*]} (run scripts/deps.sh as root, or apt-get install them)" >&2
  exit 1
fi
echo "installing ${missing[*]}" >&2
apt-get update -q -o DPkg::Lock::Timeout=300 >&2
DEBIAN_FRONTEND=noninteractive apt-get install -y -q -o DPkg::Lock::Timeout=300 \
  --no-install-recommends "${missing[@]}" >&2
