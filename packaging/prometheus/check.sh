#!/usr/bin/env bash
# Checks the Prometheus alert rules: `promtool check rules` (syntax, PromQL,
# labels) and `promtool test rules` (the unit tests in tests.yml: series in,
# alerts expected out at given times), then that every query of the Grafana
# dashboard (packaging/grafana/keyturn.json) parses as PromQL. CI runs it
# from scripts/test.sh. (That the rules and the dashboard name only metrics
# keyturn exports is tests/observability.rs.)
#
# promtool comes from the distribution's `prometheus` package. When it is not
# on PATH and we are root, the package is installed with apt, with a
# policy-rc.d that keeps apt from starting the Prometheus server it also
# ships (only for this install). Otherwise we stop and say what to install.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)

if ! command -v promtool >/dev/null; then
  if [[ $(id -u) != 0 ]]; then
    echo "promtool is not installed: apt-get install prometheus (Debian/Ubuntu), or put promtool on PATH" >&2
    exit 1
  fi
  echo "installing promtool: apt-get install prometheus" >&2
  made_policy=0
  if [[ ! -e /usr/sbin/policy-rc.d ]]; then
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
    chmod 755 /usr/sbin/policy-rc.d
    made_policy=1
  fi
  rc=0
  { apt-get update -q -o DPkg::Lock::Timeout=300 && DEBIAN_FRONTEND=noninteractive \
      apt-get install -y -q -o DPkg::Lock::Timeout=300 --no-install-recommends prometheus; } >&2 || rc=$?
  ((made_policy)) && rm -f /usr/sbin/policy-rc.d
  ((rc == 0)) || { echo "apt-get install prometheus failed" >&2; exit 1; }
fi

promtool --version 2>&1 | head -1
promtool check rules "$here/keyturn.rules.yml"
# Paths in tests.yml are relative to it.
(cd "$here" && promtool test rules tests.yml)

# The Grafana dashboard's queries parse as PromQL: each becomes a recording
# rule (Grafana's variables replaced by plain values) for promtool to check.
dashboard_rules=$(mktemp --suffix=.yml)
trap 'rm -f "$dashboard_rules"' EXIT
python3 - "$here/../grafana/keyturn.json" >"$dashboard_rules" <<'PY'
import json, sys

def exprs(v):
    if isinstance(v, dict):
        for k, x in v.items():
            if k == "expr" and isinstance(x, str):
                yield x
            else:
                yield from exprs(x)
    elif isinstance(v, list):
        for x in v:
            yield from exprs(x)

rules = []
for i, e in enumerate(exprs(json.load(open(sys.argv[1])))):
    for var, value in (("$__rate_interval", "5m"), ("$job", ".*"),
                       ("$instance", ".*"), ("$agent", ".*")):
        e = e.replace(var, value)
    rules.append({"record": f"keyturn_dashboard:query_{i}", "expr": e})
if len(rules) < 10:
    sys.exit(f"only {len(rules)} queries found in the dashboard")
json.dump({"groups": [{"name": "dashboard", "rules": rules}]}, sys.stdout)
PY
echo "the dashboard's queries:"
promtool check rules "$dashboard_rules"
