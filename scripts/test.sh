#!/usr/bin/env bash
# The whole test suite, as README.md documents it and CI runs it:
# formatting, lints (with and without failpoints), then every unit and
# integration test, including the crash-safety tests that need the
# `failpoints` feature. Needs nothing running beforehand and leaves nothing
# running: every test starts its own daemon in a temp directory.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== cargo fmt --check"
cargo fmt --check
echo "== cargo clippy"
cargo clippy --all-targets -- -D warnings
cargo clippy --all-targets --all-features -- -D warnings
echo "== tests"
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --all-features --no-fail-fast
else
  cargo test --all-features --no-fail-fast
fi
