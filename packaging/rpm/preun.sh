# keyturn %preun ($1: 0 on erase, 1 on upgrade). On erase, stop and disable
# the unit (SIGTERM drains in-flight rotation steps), as %systemd_preun does.
if [ "$1" -eq 0 ] && command -v systemctl >/dev/null; then
	systemctl --no-reload disable --now keyturn.service >/dev/null 2>&1 || :
fi
exit 0
