# %post of stoa ($1: 1 = install, 2 = upgrade). Written out: no rpm macros here.
if command -v systemd-sysusers >/dev/null 2>&1; then
    systemd-sysusers stoa.conf >/dev/null 2>&1 || :
fi
if command -v systemd-tmpfiles >/dev/null 2>&1; then
    systemd-tmpfiles --create stoa.conf >/dev/null 2>&1 || :
fi
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null 2>&1 || :
fi
# As %systemd_post: on first install apply the preset (distributions disable new services
# by default: systemctl enable --now stoa). Upgrades don't restart a running broker (a
# restart ends every user's processes); restart it when convenient.
if [ "$1" -eq 1 ]; then
    systemctl --no-reload preset stoa.service >/dev/null 2>&1 || :
fi
