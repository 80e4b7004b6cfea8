#!/usr/bin/env bash
# Tests the packages on this machine, as root (CI runs it from
# scripts/test.sh): builds both with packaging/build.sh, then
#   - installs the .deb with apt-get: the keyturn user and group, the
#     directories' owners and modes, the conffile, the unit enabled (not
#     started), `keyturn check` of the installed config, the man pages
#     rendering with `man -l`, bash completion, the docs;
#   - reinstalls over it after `disable`: an operator's disable survives;
#   - `dpkg -r`: the binary is gone, the config and the state are kept;
#   - `dpkg -P`: the config is gone, the state (a canary file in
#     /var/lib/keyturn), the audit log directory and a key the operator put
#     in /etc/keyturn are kept;
#   - installs again with systemd-sysusers and systemd-tmpfiles hidden (a
#     private mount namespace): the adduser / install -d fallback makes the
#     same user, group, owners and modes; so does the .rpm's %post, run
#     here with and without those tools;
#   - `rpm -qlp` lists the same files with the same modes as `dpkg -c`.
# It refuses to run where keyturn is installed or its directories or user
# exist, and leaves the machine as it found it: on exit (pass or fail) it
# purges the package and removes the directories, the canary and the
# keyturn user and group it created (Debian keeps the user on purge).
set -euo pipefail
cd "$(dirname "$0")/.."

passed=0
fail() {
	echo "packaging/test.sh: FAIL: $*" >&2
	echo "packaging: $passed passed, 1 failed"
	exit 1
}
ok() {
	passed=$((passed + 1))
	echo "  ok: $*"
}

[[ $(id -u) == 0 ]] || fail "run as root (it installs and removes a package)"
owned=(/etc/keyturn /var/lib/keyturn /var/log/keyturn /run/keyturn /etc/systemd/system/keyturn.service
	/etc/systemd/system/multi-user.target.wants/keyturn.service)
if dpkg-query -W keyturn >/dev/null 2>&1; then
	fail "keyturn is installed here (dpkg); this test installs and purges it"
fi
for p in "${owned[@]}"; do
	[[ ! -e $p && ! -L $p ]] || fail "$p exists; this test creates and removes it"
done
if getent passwd keyturn >/dev/null || getent group keyturn >/dev/null; then
	fail "a keyturn user or group exists; this test creates and removes them"
fi

cleanup() {
	if dpkg-query -W keyturn >/dev/null 2>&1; then
		dpkg -P keyturn >/dev/null 2>&1 || echo "packaging/test.sh: cleanup: dpkg -P keyturn failed" >&2
	fi
	rm -rf "${owned[@]}" "${rpm_post:-}"
	if getent passwd keyturn >/dev/null; then userdel keyturn; fi
	if getent group keyturn >/dev/null; then groupdel keyturn; fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

echo "== build (packaging/build.sh)"
start=$SECONDS
mapfile -t packages < <(bash packaging/build.sh)
echo "packaging/build.sh took $((SECONDS - start)) s"
deb=${packages[0]:-}
rpm=${packages[1]:-}
[[ $deb == *.deb && -f $deb && $rpm == *.rpm && -f $rpm ]] ||
	fail "build.sh printed ${packages[*]:-nothing}, expected a .deb and an .rpm"
ok "built $deb and $rpm"

# expect_stat PATH "MODE OWNER GROUP"
expect_stat() {
	local got
	got=$(stat -c '%a %U %G' "$1") || fail "$1 is missing"
	[[ $got == "$2" ]] || fail "$1: mode/owner/group $got, expected $2"
	ok "$1 $2"
}

# The owners and modes both paths (systemd tools, fallback) must make.
check_users_and_dirs() {
	local pw
	pw=$(getent passwd keyturn) || fail "no keyturn user"
	getent group keyturn >/dev/null || fail "no keyturn group"
	[[ $(id -gn keyturn) == keyturn ]] || fail "keyturn's primary group is $(id -gn keyturn)"
	[[ ${pw##*:} == */nologin ]] || fail "keyturn's shell is ${pw##*:}, expected nologin"
	ok "user and group keyturn ($pw)"
	expect_stat /etc/keyturn "750 root keyturn"
	expect_stat /etc/keyturn/agents.d "750 root keyturn"
	expect_stat /etc/keyturn/keyturn.toml "640 root keyturn"
	expect_stat /var/lib/keyturn "700 root root"
	expect_stat /var/log/keyturn "700 root root"
	expect_stat /run/keyturn "755 root root"
	expect_stat /run/keyturn/agents "755 root root"
}

wants=/etc/systemd/system/multi-user.target.wants/keyturn.service

echo "== apt-get install $deb"
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$PWD/$deb" >/dev/null ||
	fail "apt-get install $deb"
[[ $(dpkg-query -W -f '${Status}' keyturn) == "install ok installed" ]] || fail "not installed"
ok "installed"
check_users_and_dirs
# The directories the unit makes itself (StateDirectory=, LogsDirectory=)
# get the same modes from tmpfiles, whichever comes first. (The runtime
# directory's mode and every owner are the unit's to set when it starts.)
for pair in StateDirectoryMode:/var/lib/keyturn LogsDirectoryMode:/var/log/keyturn; do
	mode=$(sed -n "s/^${pair%%:*}=//p" /usr/lib/systemd/system/keyturn.service | tail -n 1)
	mode=$((8#${mode:-0755}))
	[[ $(printf %o "$mode") == $(stat -c %a "${pair#*:}") ]] ||
		fail "the unit's ${pair%%:*}=$(printf %04o "$mode") but ${pair#*:} is $(stat -c %a "${pair#*:}")"
done
ok "the unit's state and logs directory modes match the tmpfiles snippet's"
expect_stat /usr/bin/keyturn "755 root root"
expect_stat /usr/lib/systemd/system/keyturn.service "644 root root"
dpkg-query -W -f '${Conffiles}\n' keyturn | grep -q '^ /etc/keyturn/keyturn.toml ' ||
	fail "/etc/keyturn/keyturn.toml is not a conffile"
ok "/etc/keyturn/keyturn.toml is a conffile"
# deb-systemd-helper links /lib/systemd/system/... (the same file, merged /usr).
[[ -L $wants && $(readlink -f "$wants") == $(readlink -f /usr/lib/systemd/system/keyturn.service) ]] ||
	fail "the unit is not enabled ($wants)"
ok "unit enabled ($wants)"

out=$(keyturn check) || fail "keyturn check (default config): $out"
[[ $out == *"ok: 0 agents"* ]] || fail "keyturn check said: $out"
out=$(keyturn check --config /etc/keyturn/keyturn.toml) || fail "keyturn check --config: $out"
[[ $out == *"ok: 0 agents"* ]] || fail "keyturn check said: $out"
ok "keyturn check --config /etc/keyturn/keyturn.toml: ${out%%$'\n'*}"

# Every page keyturn has, installed; each renders.
pages=$(cd target/packaging/man && ls)
for page in $pages; do
	installed=/usr/share/man/man1/$page
	text=$(MANPAGER=cat MANWIDTH=80 man -l "$installed" 2>&1) || fail "man -l $installed: $text"
	name=${page%.1.gz}
	[[ $text == *"$name"* && $text == *NAME* && $text == *SYNOPSIS* ]] ||
		fail "man -l $installed does not render $name: $text"
done
[[ $pages == *keyturn.1.gz* && $pages == *keyturn-check.1.gz* && $pages == *keyturn-audit-verify.1.gz* ]] ||
	fail "pages missing from: $pages"
ok "man -l renders $(wc -w <<<"$pages") pages"
text=$(MANPAGER=cat man keyturn-check 2>&1) || fail "man keyturn-check: $text"
[[ $text == *"Validate the config"* ]] || fail "man keyturn-check: $text"
ok "man keyturn-check finds the installed page"

bash_completion=/usr/share/bash-completion/completions/keyturn
expect_stat "$bash_completion" "644 root root"
for f in "$bash_completion" /usr/share/zsh/vendor-completions/_keyturn /usr/share/fish/vendor_completions.d/keyturn.fish; do
	[[ -s $f ]] || fail "$f missing or empty"
	! grep -q "target/packaging\|$PWD" "$f" || fail "$f names a path of the build: $(grep -n "target/packaging\|$PWD" "$f")"
done
	# Completes the subcommands, through the function the file registers.
# What readline does on TAB; the installed /usr/bin/keyturn answers.
got=$(PATH=/usr/bin:/bin bash --norc --noprofile -c '
	source '"$bash_completion"'
	fn=$(complete -p keyturn | sed -n "s/.*-F \([^ ]*\).*/\1/p")
	COMP_WORDS=(keyturn ch); COMP_CWORD=1; COMP_LINE="keyturn ch"
	COMP_POINT=${#COMP_LINE}; COMP_TYPE=9
	"$fn" keyturn ch keyturn
	printf "%s\n" "${COMPREPLY[@]}"') || fail "bash completion: $got"
sed 's/[[:space:]]*$//' <<<"$got" | grep -qx check || fail "bash completion of 'keyturn ch' gave: $got"
ok "bash completion completes 'keyturn ch' to check"
for f in README.md copyright examples/minimal.toml examples/production.toml examples/systemd/signal-sink.conf; do
	[[ -s /usr/share/doc/keyturn/$f ]] || fail "/usr/share/doc/keyturn/$f missing"
done
ok "docs in /usr/share/doc/keyturn"
for f in prometheus/keyturn.rules.yml prometheus/tests.yml grafana/keyturn.json; do
	cmp -s "packaging/$f" "/usr/share/keyturn/$f" || fail "/usr/share/keyturn/$f is not packaging/$f"
done
ok "Prometheus rules and Grafana dashboard in /usr/share/keyturn"

echo "== reinstall (an upgrade's scripts) after disable"
systemctl disable keyturn.service 2>/dev/null
[[ ! -e $wants ]] || fail "systemctl disable left $wants"
# As the unit does when it starts with a User=: the state is that user's.
chown nobody:nogroup /var/lib/keyturn /var/log/keyturn
dpkg -i "$deb" >/dev/null || fail "dpkg -i over the installed package"
[[ ! -e $wants && ! -L $wants ]] || fail "an upgrade re-enabled a unit the operator disabled"
ok "an upgrade keeps the unit disabled"
expect_stat /var/lib/keyturn "700 nobody nogroup"
expect_stat /var/log/keyturn "700 nobody nogroup"
chown root:root /var/lib/keyturn /var/log/keyturn
systemctl enable keyturn.service 2>/dev/null
[[ -L $wants ]] || fail "systemctl enable made no $wants"

echo "== dpkg -r keyturn"
canary=/var/lib/keyturn/packaging-test-canary-$RANDOM
echo "the local vault lives here" >"$canary"
echo "# an operator's edit" >>/etc/keyturn/keyturn.toml
echo "# an agent" >/etc/keyturn/agents.d/app.toml
dpkg -r keyturn >/dev/null || fail "dpkg -r keyturn"
[[ ! -e /usr/bin/keyturn ]] || fail "/usr/bin/keyturn left after dpkg -r"
[[ ! -e /usr/lib/systemd/system/keyturn.service ]] || fail "the unit left after dpkg -r"
[[ $(dpkg-query -W -f '${Status}' keyturn) == "deinstall ok config-files" ]] || fail "not in config-files state"
ok "dpkg -r removes the binary and the unit"
grep -q "an operator's edit" /etc/keyturn/keyturn.toml || fail "dpkg -r lost the config's edit"
[[ -f /etc/keyturn/agents.d/app.toml ]] || fail "dpkg -r removed agents.d"
[[ -f $canary ]] || fail "dpkg -r removed the state ($canary)"
ok "dpkg -r keeps /etc/keyturn/keyturn.toml (edited), agents.d and /var/lib/keyturn"

echo "== dpkg -P keyturn"
# A key the docs tell operators to put in /etc/keyturn: the kept vault
# needs it.
echo "not a real key" >/etc/keyturn/local-vault-key.cred
out=$(dpkg -P keyturn 2>&1) || fail "dpkg -P keyturn: $out"
[[ $out == *"kept /etc/keyturn"* ]] || fail "dpkg -P did not say why /etc/keyturn stays: $out"
! dpkg-query -W keyturn >/dev/null 2>&1 || fail "dpkg still knows keyturn after purge"
[[ ! -e /etc/keyturn/keyturn.toml && ! -e /etc/keyturn/agents.d ]] ||
	fail "dpkg -P left the config (keyturn.toml or agents.d) in /etc/keyturn"
[[ -f /etc/keyturn/local-vault-key.cred ]] || fail "dpkg -P removed the local vault's key"
ok "dpkg -P removes the config and keeps a key the operator put in /etc/keyturn"
rm /etc/keyturn/local-vault-key.cred
rmdir /etc/keyturn
[[ -f $canary ]] || fail "dpkg -P removed the state ($canary): the local vault would be lost"
[[ -d /var/log/keyturn ]] || fail "dpkg -P removed /var/log/keyturn (the audit log)"
ok "dpkg -P keeps /var/lib/keyturn (the canary) and /var/log/keyturn"
[[ ! -e $wants && ! -L $wants && ! -L /etc/systemd/system/keyturn.service ]] ||
	fail "dpkg -P left the unit's enablement or mask"
ok "dpkg -P removes the unit's enablement"

echo "== without systemd-sysusers and systemd-tmpfiles (the fallback)"
rm -rf "${owned[@]}"
userdel keyturn
getent group keyturn >/dev/null && groupdel keyturn
# A private mount namespace hides the tools (not executable: /dev/null)
# for this install only.
unshare --mount --propagation private sh -ec '
	mount --bind /dev/null /usr/bin/systemd-sysusers
	mount --bind /dev/null /usr/bin/systemd-tmpfiles
	[ ! -x /usr/bin/systemd-sysusers ] && [ ! -x /usr/bin/systemd-tmpfiles ]
	dpkg -i "$1" >/dev/null' sh "$deb" || fail "dpkg -i without systemd's tools"
check_users_and_dirs
ok "the fallback install makes the same user, group and directories"

# The .rpm's %post on this Debian machine, against the same files (the
# sysusers and tmpfiles snippets and the config, installed by the .deb):
# with systemd's tools, then with them hidden (groupadd/useradd, install -d).
rpm_post=$(mktemp)
rpm -qp --qf '%{POSTIN}' "$rpm" >"$rpm_post"
for how in systemd fallback; do
	echo "== the .rpm's %post ($how)"
	userdel keyturn
	if getent group keyturn >/dev/null; then groupdel keyturn; fi
	rm -rf /var/lib/keyturn /var/log/keyturn /run/keyturn /etc/keyturn/agents.d
	chown root:root /etc/keyturn /etc/keyturn/keyturn.toml
	chmod 0755 /etc/keyturn
	if [[ $how == systemd ]]; then
		sh "$rpm_post" 1 || fail "the .rpm's %post"
	else
		unshare --mount --propagation private sh -ec '
			mount --bind /dev/null /usr/bin/systemd-sysusers
			mount --bind /dev/null /usr/bin/systemd-tmpfiles
			sh "$1" 1' sh "$rpm_post" || fail "the .rpm's %post without systemd's tools"
	fi
	check_users_and_dirs
	ok "the .rpm's %post ($how) makes the same user, group and directories"
done
rm -f "$rpm_post"

dpkg -P keyturn >/dev/null || fail "dpkg -P keyturn (fallback install)"
[[ ! -e /etc/keyturn ]] || fail "/etc/keyturn left after dpkg -P"

echo "== rpm -qlp vs dpkg -c"
# "mode path" of every non-directory entry (rpm lists only the directories
# a package owns; dpkg-deb every parent): the two must be equal.
deb_list=$(dpkg-deb -c "$deb" | awk '$1 !~ /^d/ { sub(/^\./, "", $6); print $1, $6 }' | sort)
rpm_list=$(rpm -qlvp "$rpm" | awk '$1 !~ /^d/ { print $1, $9 }' | sort)
[[ -n $deb_list ]] || fail "dpkg-deb -c listed nothing"
if [[ $deb_list != "$rpm_list" ]]; then
	diff <(echo "$deb_list") <(echo "$rpm_list") >&2 || true
	fail "the .deb (<) and the .rpm (>) hold different files"
fi
ok "rpm -qlp == dpkg -c: $(wc -l <<<"$deb_list") files, same modes"
[[ $(rpm -qcp "$rpm") == /etc/keyturn/keyturn.toml ]] || fail "rpm config files: $(rpm -qcp "$rpm")"
ok "the .rpm marks /etc/keyturn/keyturn.toml as config"
scripts=$(rpm -qp --scripts "$rpm")
for want in "postinstall scriptlet" "preuninstall scriptlet" "postuninstall scriptlet" systemd-sysusers; do
	[[ $scripts == *"$want"* ]] || fail "the .rpm's scripts lack $want"
done
ok "the .rpm has its %post, %preun and %postun"

echo "packaging: $passed passed, 0 failed"
