#!/usr/bin/env bash
# Checks a keyturn unit file the way CI does (scripts/test.sh runs it on
# systemd/keyturn.service; tests/systemd_unit.rs runs it on worse copies
# and expects it to fail):
#  1. `systemd-analyze verify` prints nothing;
#  2. `systemd-analyze security --offline=true` rates it at most 2.0
#     (MAX_EXPOSURE, in tenths: 20);
#  3. the unit with each drop-in of systemd/examples/ appended still
#     verifies cleanly (its exposure is printed, not enforced).
# verify checks that ExecStart='s program exists and is executable, and
# /usr/bin/keyturn is not installed on a build machine, so it checks a copy
# whose /usr/bin/keyturn is $KEYTURN_BIN (default: a stub executable in a
# temp directory; the unit, not the binary, is under test). Needs
# systemd-analyze (Debian: the systemd package), not a running systemd.
# Usage: systemd/check.sh [UNIT]   (exit 0: passes; 1: fails, says why)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
unit=${1:-$here/keyturn.service}
max=${MAX_EXPOSURE:-20}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
if [[ -z ${KEYTURN_BIN:-} ]]; then
  KEYTURN_BIN=$tmp/keyturn
  printf '#!/bin/sh\nexit 0\n' >"$KEYTURN_BIN"
  chmod 0755 "$KEYTURN_BIN"
fi
failed=0

# verify: the unit's name must stay keyturn.service (it names itself in
# messages, and drop-ins attach by name), so each copy gets its own dir.
verify() { # NAME FILE...: verify the concatenation of FILEs as keyturn.service;
  # returns 1 (and sets failed) when it is not clean
  local name=$1 dir=$tmp/$1 out
  shift
  mkdir -p "$dir"
  cat "$@" | sed "s|/usr/bin/keyturn|$KEYTURN_BIN|g" >"$dir/keyturn.service"
  if ! out=$(systemd-analyze verify "$dir/keyturn.service" 2>&1) || [[ -n $out ]]; then
    echo "FAIL: systemd-analyze verify ($name):" >&2
    printf '%s\n' "$out" >&2
    failed=1
    return 1
  fi
}

exposure() { # FILE: prints "N.N" (systemd-analyze's overall exposure)
  systemd-analyze security --offline=true --no-pager "$1" 2>&1 |
    sed -n 's/.*Overall exposure level for .*: \([0-9.]*\).*/\1/p'
}

verify unit "$unit" || true
value=$(exposure "$tmp/unit/keyturn.service")
if [[ -z $value ]]; then
  echo "FAIL: systemd-analyze security printed no exposure for $unit" >&2
  failed=1
elif ! systemd-analyze security --offline=true --threshold="$max" \
  "$tmp/unit/keyturn.service" >/dev/null 2>&1; then
  echo "FAIL: exposure $value is above $((max / 10)).$((max % 10)) ($unit); what is exposed:" >&2
  systemd-analyze security --offline=true --no-pager "$tmp/unit/keyturn.service" 2>&1 | grep '✗' >&2 || true
  failed=1
else
  echo "ok: $unit verifies cleanly, exposure $value (at most $((max / 10)).$((max % 10)))"
fi

if [[ $# -eq 0 ]]; then
  for dropin in "$here"/examples/*.conf; do
    name=$(basename "$dropin" .conf)
    verify "$name" "$unit" "$dropin" || continue
    echo "ok: with examples/$name.conf it verifies cleanly, exposure $(exposure "$tmp/$name/keyturn.service")"
  done
fi
exit "$failed"
