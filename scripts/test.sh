#!/usr/bin/env bash
# The whole test suite, as README.md documents it and CI runs it:
# formatting, lints (with and without failpoints), promtool checks of the alert
# rules and the dashboard's queries (packaging/prometheus/check.sh), then every unit and
# integration test, including the crash-safety tests that need the
# `failpoints` feature, then the .deb and .rpm (packaging/test.sh: built,
# installed, removed and purged here, as root). Needs nothing running
# beforehand and leaves nothing running: every test starts its own daemon
# in a temp directory, and the real servers the vault and target tests use
# (OpenBao, moto, PostgreSQL, the Azure stub) are started by
# scripts/services.sh before the tests and stopped on exit, whether the
# tests pass, fail or are interrupted.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== cargo fmt --check"
cargo fmt --check
echo "== cargo clippy"
cargo clippy --all-targets -- -D warnings
cargo clippy --all-targets --all-features -- -D warnings
echo "== test dependencies (scripts/deps.sh: systemd-analyze, bwrap, setpriv)"
bash scripts/deps.sh
echo "== systemd unit"
# systemd-analyze verify is clean and the security exposure is at most 2.0
# (needs systemd-analyze, not a running systemd).
bash systemd/check.sh
echo "== alert rules and dashboard queries (promtool)"
bash packaging/prometheus/check.sh
echo "== test services"
if bash scripts/services.sh status >/dev/null; then
  # Started by hand beforehand: use them and leave them to their owner.
  echo "using the test services already running (bash scripts/services.sh stop stops them)"
else
  trap 'bash scripts/services.sh stop' EXIT
  # Without these, an interrupted run could end before the EXIT trap.
  trap 'exit 130' INT
  trap 'exit 143' TERM
fi
# An assignment, so that a failed start stops the script (set -e).
env_file=$(bash scripts/services.sh start)
# shellcheck source=/dev/null
. "$env_file"
# groff and man-db for the man page test; cargo-deb, cargo-generate-rpm and
# rpm for the packages below (installs only what is missing).
bash packaging/tools.sh
echo "== tests"
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --all-features --no-fail-fast
else
  cargo test --all-features --no-fail-fast
fi
# Builds the .deb and .rpm (a release build), installs, removes and purges
# the .deb here, and compares the two packages' files; leaves nothing
# installed.
echo "== packages (packaging/test.sh)"
bash packaging/test.sh
