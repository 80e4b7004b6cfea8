# keyturn %post ($1: 1 on install, 2 on upgrade). The user, group and
# directories, then the unit enabled per the system's preset policy and not
# started; on upgrade, a running daemon is restarted. As the %sysusers,
# %tmpfiles_create, %systemd_post and %systemd_postun_with_restart macros
# do (the restart is here, not in %postun, so it runs once the new files
# are in place).
set -e
if [ -x /usr/bin/systemd-sysusers ]; then
	systemd-sysusers keyturn.conf
else
	getent group keyturn >/dev/null || groupadd --system keyturn
	getent passwd keyturn >/dev/null ||
		useradd --system --gid keyturn --no-create-home --home-dir /var/lib/keyturn \
			--shell /sbin/nologin --comment "keyturn credential rotation daemon" keyturn
fi
if [ -x /usr/bin/systemd-tmpfiles ]; then
	systemd-tmpfiles --create keyturn.conf || :
else
	install -d -m 0750 -o root -g keyturn /etc/keyturn /etc/keyturn/agents.d
	if [ -e /etc/keyturn/keyturn.toml ]; then
		chown root:keyturn /etc/keyturn/keyturn.toml
		chmod 0640 /etc/keyturn/keyturn.toml
	fi
	# As the tmpfiles snippet: made if missing; an existing one keeps its owner.
	for d in /var/lib/keyturn /var/log/keyturn; do
		[ -d "$d" ] || install -d -m 0700 "$d"
		chmod 0700 "$d"
	done
	for d in /run/keyturn /run/keyturn/agents; do
		[ -d "$d" ] || install -d -m 0755 "$d"
	done
fi
if [ "$1" -eq 1 ] && command -v systemctl >/dev/null; then
	systemctl --no-reload preset keyturn.service >/dev/null 2>&1 || :
fi
if [ -d /run/systemd/system ]; then
	systemctl daemon-reload >/dev/null 2>&1 || :
	if [ "$1" -ge 2 ]; then
		systemctl try-restart keyturn.service >/dev/null 2>&1 || :
	fi
fi
exit 0
