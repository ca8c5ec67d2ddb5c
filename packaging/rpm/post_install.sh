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
# by default: systemctl enable --now stoa).
if [ "$1" -eq 1 ]; then
    systemctl --no-reload preset stoa.service >/dev/null 2>&1 || :
fi
# Upgrade in place (after the daemon-reload above, so with the new unit's ExecReload,
# `stoa daemon upgrade`): the running broker re-execs the new /usr/bin/stoa with the same
# pid and every user's shells, agents and terminals go on. Never a restart, which would end
# them; a reload that fails leaves the old broker serving and must not fail the upgrade.
if [ "$1" -ge 2 ] && [ -d /run/systemd/system ] && systemctl is-active --quiet stoa.service; then
    since=$(date +%s)
    reload_ok=yes
    systemctl reload stoa.service || reload_ok=no
    # Upgraded: the unit's main process runs the file now at /usr/bin/stoa.
    main=$(systemctl show -p MainPID --value stoa.service 2>/dev/null || echo 0)
    running=$(stat -L -c %d:%i "/proc/${main:-0}/exe" 2>/dev/null || :)
    if [ "$reload_ok" = yes ] && [ -n "$running" ] &&
        [ "$running" = "$(stat -L -c %d:%i /usr/bin/stoa 2>/dev/null)" ]; then
        echo "stoa: the running broker (pid $main) was upgraded in place to the new /usr/bin/stoa;"
        echo "stoa: every user's shells, agents and terminals go on (viewers reconnect)."
    elif ! systemctl is-active --quiet stoa.service; then
        echo "stoa: WARNING: the upgrade in place failed and stoa.service is not running:"
        echo "stoa: see journalctl -u stoa.service; start it: systemctl start stoa"
    else
        echo "stoa: WARNING: the running broker was NOT upgraded in place: stoa.service keeps"
        echo "stoa: serving with its old binary; every user's work goes on."
        why=$(journalctl -u stoa.service --since "@$since" -o cat --no-pager 2>/dev/null |
            grep 'stoa daemon upgrade:' | tail -n 1 || :)
        [ -z "$why" ] || echo "stoa: $why"
        echo "stoa: details: journalctl -u stoa.service; retry: systemctl reload stoa"
        echo "stoa: ('systemctl restart stoa' also starts the new version, but ends every"
        echo "stoa: user's processes started through stoa.)"
    fi
fi
:
