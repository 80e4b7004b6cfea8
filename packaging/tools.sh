#!/usr/bin/env bash
# Installs what building and testing the packages needs, only what is
# missing (idempotent; a second run changes nothing):
# - Debian packages: groff-base + man-db (render man pages: the man page
#   test in `cargo test` and packaging/test.sh), rpm (`rpm -qlp`), dpkg-dev
#   (dpkg-shlibdeps for the .deb's Depends), binutils (strip).
# - cargo-deb and cargo-generate-rpm at pinned versions, `cargo install --locked`.
# Run as root (apt-get). Used by build.sh, test.sh and scripts/test.sh.
set -euo pipefail

CARGO_DEB_VERSION=3.8.0
CARGO_GENERATE_RPM_VERSION=0.21.1

# command -> Debian package that provides it
declare -A apt_for=(
	[groff]=groff-base
	[man]=man-db
	[rpm]=rpm
	[dpkg-shlibdeps]=dpkg-dev
	[strip]=binutils
)
missing=()
for cmd in "${!apt_for[@]}"; do
	command -v "$cmd" >/dev/null || missing+=("${apt_for[$cmd]}")
done
if ((${#missing[@]})); then
	echo "packaging/tools.sh: apt-get install ${missing[*]}" >&2
	apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
fi

# cargo install <crate> <version> <binary> unless that version is installed.
cargo_tool() {
	local crate=$1 version=$2 bin=$3
	if ! cargo install --list | grep -qx "$crate v$version:"; then
		echo "packaging/tools.sh: cargo install $crate $version" >&2
		cargo install --locked --quiet --version "$version" "$crate" >&2
	fi
	command -v "$bin" >/dev/null || {
		echo "packaging/tools.sh: $bin not on PATH after installing $crate (is ~/.cargo/bin on PATH?)" >&2
		exit 1
	}
}
if [[ ${1:-} != --apt-only ]]; then
	cargo_tool cargo-deb "$CARGO_DEB_VERSION" cargo-deb
	cargo_tool cargo-generate-rpm "$CARGO_GENERATE_RPM_VERSION" cargo-generate-rpm
fi
