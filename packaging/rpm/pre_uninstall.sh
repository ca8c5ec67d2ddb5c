# %preun of stoa ($1: 0 = erase, 1 = upgrade). As %systemd_preun: stop and disable on erase.
if [ "$1" -eq 0 ]; then
    systemctl --no-reload disable --now stoa.service >/dev/null 2>&1 || :
fi
