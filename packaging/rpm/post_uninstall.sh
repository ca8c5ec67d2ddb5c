# %postun of stoa ($1: 0 = erase, 1 = upgrade). As %systemd_postun, without a restart.
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null 2>&1 || :
fi
# rpm has no purge: the state (/var/lib/stoa, /var/lib/stoa-broker), a changed config
# (kept as .rpmsave), the user 'stoa' and the group 'stoa-users' stay after an erase.
