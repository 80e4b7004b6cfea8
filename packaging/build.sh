#!/usr/bin/env bash
# Builds the .deb and the .rpm of keyturn into target/packaging/ and prints
# their paths (only they go to stdout; progress goes to stderr):
#   1. installs missing tools (packaging/tools.sh: cargo-deb,
#      cargo-generate-rpm, rpm, groff, ...);
#   2. builds the release binary once (`cargo build --release --locked`);
#   3. stages what is generated, under target/packaging/: the stripped
#      binary, the man pages (`keyturn manpages`, gzipped), the shell
#      completions (`keyturn completions bash|zsh|fish`), the Prometheus
#      rules and the Grafana dashboard (packaging/prometheus/,
#      packaging/grafana/);
#   4. packages: `cargo deb` and `cargo generate-rpm`, from the metadata in
#      Cargo.toml ([package.metadata.deb], [package.metadata.generate-rpm]).
# The version is Cargo.toml's. Usage: bash packaging/build.sh (as root the
# first time, for apt-get).
#
# KEYTURN_PKG_STANDINS=1 replaces the completions and the Prometheus/Grafana
# files, when they are missing, by stand-ins that say so: only to test this
# packaging before the branches that add them are merged. CI never sets it,
# so a package missing them fails to build there.
set -euo pipefail
cd "$(dirname "$0")/.."

started=$SECONDS
bash packaging/tools.sh

out=target/packaging
target_dir=${CARGO_TARGET_DIR:-target}
pkgid=$(cargo pkgid)
version=${pkgid##*[#@]}

echo "== cargo build --release (keyturn $version)" >&2
cargo build --release --locked --bin keyturn
built=$SECONDS

rm -rf "$out"
mkdir -p "$out/bin" "$out/man" "$out/completions" "$out/share/prometheus" "$out/share/grafana"
# Stripped as Debian and Fedora ship binaries (the release profile keeps
# line tables, for the benchmarks' profiles).
strip --strip-all -o "$out/bin/keyturn" "$target_dir/release/keyturn"
bin=$out/bin/keyturn

standin() { # FILE WHAT
	if [[ ${KEYTURN_PKG_STANDINS:-} != 1 ]]; then
		echo "packaging/build.sh: $2" >&2
		exit 1
	fi
	echo "packaging/build.sh: WARNING: $2; packaging a stand-in (KEYTURN_PKG_STANDINS=1)" >&2
	printf '# keyturn packaging stand-in: %s\n' "$2" >"$1"
}

echo "== man pages" >&2
"$bin" manpages "$out/man" >/dev/null
gzip -9n "$out/man"/*.1

echo "== completions" >&2
if "$bin" completions bash >/dev/null 2>&1; then
	"$bin" completions bash >"$out/completions/keyturn.bash"
	"$bin" completions zsh >"$out/completions/_keyturn"
	"$bin" completions fish >"$out/completions/keyturn.fish"
else
	for f in keyturn.bash _keyturn keyturn.fish; do
		standin "$out/completions/$f" \
			"\`keyturn completions SHELL\` is missing from this keyturn (issue 14's CLI polish adds it)"
	done
fi

echo "== Prometheus rules, Grafana dashboard" >&2
for f in prometheus/keyturn.rules.yml grafana/keyturn.json; do
	if [[ -f packaging/$f ]]; then
		cp "packaging/$f" "$out/share/$f"
	else
		standin "$out/share/$f" "packaging/$f is missing (issue 14's observability part adds it)"
	fi
done

echo "== cargo deb" >&2
cargo deb --no-build --no-strip --output "$out/" >/dev/null
echo "== cargo generate-rpm" >&2
cargo generate-rpm --output "$out/" >/dev/null

deb=$out/keyturn_${version}-1_$(dpkg --print-architecture).deb
rpm=$out/keyturn-${version}-1.$(uname -m).rpm
for p in "$deb" "$rpm"; do
	[[ -f $p ]] || {
		echo "packaging/build.sh: expected $p, not built" >&2
		exit 1
	}
done
echo "release build: $((built - started)) s, all: $((SECONDS - started)) s" >&2
echo "$deb"
echo "$rpm"
