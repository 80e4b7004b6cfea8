# keyturn %postun ($1: 0 on erase, 1 on upgrade). RPM has no purge: erase
# removes the package's files but keeps a changed /etc/keyturn/keyturn.toml
# (as .rpmsave), the rest of /etc/keyturn, and always the state
# (/var/lib/keyturn: the local vault and its key, the audit chain's head)
# and the audit log (/var/log/keyturn). The keyturn user and group stay.
if [ -d /run/systemd/system ]; then
	systemctl daemon-reload >/dev/null 2>&1 || :
fi
exit 0
