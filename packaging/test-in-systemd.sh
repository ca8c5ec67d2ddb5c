#!/usr/bin/env bash
# Tests the .deb under a real systemd as PID 1: boots Debian bookworm in a container
# (debootstrap + systemd-nspawn -b --keep-unit, which works on a root machine where systemd
# is not PID 1), installs the package there and checks the unit end to end:
#   * dpkg -i starts stoa.service; Type=notify: `systemctl start` returns once /health answers
#   * a command runs as a user through stoa; systemctl status and the journal look right
#   * SIGHUP rereads the policy; a killed broker is restarted (Restart=on-failure)
#   * a restart ends every user's processes, even one that left its process group
#     (KillMode=mixed sweeps the cgroup)
#   * with the service user deleted, the broker recreates it with useradd under the
#     unit's CapabilityBoundingSet
#   * an upgrade (dpkg -i of newer revisions) upgrades the running broker in place, with a
#     user's terminal, viewer and agent task running, and a broken new binary changes
#     nothing (packaging/test-upgrade-in-place.sh, run in the container); edits and state stay
#   * stoa doctor passes; dpkg -r stops the service; dpkg -P removes the state
#
# Usage (root): packaging/test-in-systemd.sh [path/to/stoa.deb]
#   default .deb: target/packaging/debian/stoa_*.deb (built by packaging/build.sh deb)
#   STOA_NSPAWN_CACHE=/var/tmp/stoa-nspawn  keep the debootstrapped base there and reuse it
#                                            (otherwise it is built in a temp dir and removed)
# Needs debootstrap and systemd-container (installed with apt-get if missing) and the
# Debian mirror from the apt sources. Takes about 2.5 minutes (1.5 without debootstrap).
set -euo pipefail
cd "$(dirname "$0")/.."
T0=$(date +%s)
phase_start=$T0
phase() {
	local now
	now=$(date +%s)
	echo "== nspawn: $* (at +$((now - T0))s, previous step $((now - phase_start))s)"
	phase_start=$now
}
fail() {
	echo "== nspawn: FAIL: $*" >&2
	exit 1
}
check() {
	local what=$1
	shift
	if "$@"; then echo "   ok: $what"; else fail "$what"; fi
}

[ "$(id -u)" = 0 ] || fail "must run as root"
# shellcheck disable=SC2012 # our own file names
DEB=${1:-$(ls target/packaging/debian/stoa_*.deb 2>/dev/null | head -1)}
[ -f "$DEB" ] || fail "no .deb (build one with packaging/build.sh deb, or pass its path)"

missing=()
command -v debootstrap >/dev/null || missing+=(debootstrap)
command -v systemd-nspawn >/dev/null || missing+=(systemd-container)
if [ ${#missing[@]} -gt 0 ]; then
	apt-get update -q
	DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}"
fi

WORK=$(mktemp -d /var/tmp/stoa-nspawn-run.XXXXXX)
ROOT=$WORK/root
NSPAWN_PID=
cleanup() {
	local rc=$?
	set +e
	if [ $rc -ne 0 ] && [ -n "${INIT_PID:-}" ] && kill -0 "$NSPAWN_PID" 2>/dev/null; then
		echo "== nspawn: the unit's journal (last lines):" >&2
		nsenter -t "$INIT_PID" -a -- journalctl -u stoa.service --no-pager -o cat -n 25 >&2
	fi
	if [ -n "$NSPAWN_PID" ] && kill -0 "$NSPAWN_PID" 2>/dev/null; then
		[ -n "${INIT_PID:-}" ] && nsenter -t "$INIT_PID" -a -- systemctl poweroff >/dev/null 2>&1
		for _ in $(seq 1 100); do kill -0 "$NSPAWN_PID" 2>/dev/null || break; sleep 0.2; done
		kill -TERM "$NSPAWN_PID" 2>/dev/null
		for _ in $(seq 1 50); do kill -0 "$NSPAWN_PID" 2>/dev/null || break; sleep 0.2; done
		kill -KILL "$NSPAWN_PID" 2>/dev/null
	fi
	if [ $rc -ne 0 ] && [ -f "$WORK/console.log" ]; then
		echo "== nspawn: the container's console (last lines):" >&2
		tail -n 30 "$WORK/console.log" >&2
	fi
	rm -rf "$WORK"
	if [ $rc -eq 0 ]; then
		echo "== nspawn: all passed in $(($(date +%s) - T0))s"
	else
		echo "== nspawn: FAILED (rc $rc) after $(($(date +%s) - T0))s" >&2
	fi
	exit $rc
}
trap cleanup EXIT

# ---------------------------------------------------------------------------------------
phase "base system (debootstrap bookworm)"
mirror=$(sed -n 's/^URIs:[[:space:]]*\([^[:space:]]*\/debian\)\/\?$/\1/p' /etc/apt/sources.list.d/*.sources 2>/dev/null | head -1)
[ -n "$mirror" ] || mirror=$(sed -n 's/^deb[[:space:]]\+\(\[[^]]*\][[:space:]]\+\)\?\([^[:space:]]*\/debian\)\/\?[[:space:]].*/\2/p' \
	/etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null | head -1)
[ -n "$mirror" ] || fail "no Debian mirror found in /etc/apt/sources.list{,.d}"
echo "   mirror: $mirror"
# The package's dependencies (first alternative of each) go into the base system too: the
# container has no network once booted.
deps=$(dpkg-deb -f "$DEB" Depends | tr ',' '\n' | sed 's/|.*//; s/(.*)//; s/[[:space:]]//g' | grep . | sort -u)
echo "   the package depends on: $(echo "$deps" | tr '\n' ' ')"
# And what the tests in the container use: python3 (test-upgrade-in-place.sh reads JSON).
deps=$(printf '%s\npython3\n' "$deps" | sort -u)
bootstrap() {
	debootstrap --variant=minbase --include="systemd,systemd-sysv,dbus,procps,$(echo "$deps" | paste -sd,)" \
		bookworm "$1" "$mirror" \
		>"$WORK/debootstrap.log" 2>&1 || {
		tail -n 20 "$WORK/debootstrap.log" >&2
		fail "debootstrap failed"
	}
}
if [ -n "${STOA_NSPAWN_CACHE:-}" ]; then
	if [ ! -x "$STOA_NSPAWN_CACHE/usr/lib/systemd/systemd" ]; then
		rm -rf "$STOA_NSPAWN_CACHE"
		bootstrap "$STOA_NSPAWN_CACHE"
	fi
	cp -a "$STOA_NSPAWN_CACHE" "$ROOT"
else
	bootstrap "$ROOT"
fi
# A cached base may predate a new dependency: add what is missing (with the host's network).
absent=$(for d in $deps; do
	# shellcheck disable=SC2016 # a dpkg-query format
	chroot "$ROOT" dpkg-query -W -f='${db:Status-Status}\n' "$d" 2>/dev/null | grep -qx installed || echo "$d"
done | paste -sd' ')
if [ -n "$absent" ]; then
	echo "   adding to the base: $absent"
	systemd-nspawn -q -D "$ROOT" --register=no --keep-unit env DEBIAN_FRONTEND=noninteractive \
		sh -c "apt-get update -q >/dev/null && apt-get install -y -q $absent" >"$WORK/apt.log" 2>&1 || {
		tail -n 20 "$WORK/apt.log" >&2
		fail "could not install the package's dependencies in the container"
	}
fi
cp "$DEB" "$ROOT/var/tmp/stoa.deb" # (/tmp is a tmpfs in the booted container)

# ---------------------------------------------------------------------------------------
phase "boot systemd in the container"
systemd-nspawn -q -D "$ROOT" --private-network --register=no --keep-unit \
	--console=read-only -b >"$WORK/console.log" 2>&1 &
NSPAWN_PID=$!
INIT_PID=
for _ in $(seq 1 100); do
	INIT_PID=$(pgrep -P "$NSPAWN_PID" -x systemd | head -1 || true)
	[ -n "$INIT_PID" ] && break
	kill -0 "$NSPAWN_PID" 2>/dev/null || fail "systemd-nspawn exited"
	sleep 0.2
done
[ -n "$INIT_PID" ] || fail "no systemd in the container"
# Run a command in the container (all its namespaces, a clean environment).
ct() { nsenter -t "$INIT_PID" -a -- env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 "$@"; }
state=$(ct timeout 60 systemctl is-system-running --wait || true)
echo "   system state: $state"
case $state in running | degraded) ;; *) fail "the container did not boot ($state)" ;; esac
[ "$state" = degraded ] && ct systemctl --failed --no-legend --plain | sed 's/^/   failed unit: /'

# In the container: GET http://127.0.0.1:7433/health with bash alone; prints the status.
health() {
	# shellcheck disable=SC2016 # expanded by the container's bash
	ct bash -c 'exec 9<>/dev/tcp/127.0.0.1/7433 || exit 1
		printf "GET /health HTTP/1.1\r\nHost: 127.0.0.1:7433\r\nConnection: close\r\n\r\n" >&9
		IFS= read -r -t 2 line <&9; echo "$line" | cut -d" " -f2'
}

# ---------------------------------------------------------------------------------------
phase "dpkg -i (starts the service)"
ct dpkg -i /var/tmp/stoa.deb
check "stoa.service is enabled" test "$(ct systemctl is-enabled stoa.service)" = enabled
check "stoa.service is active" test "$(ct systemctl is-active stoa.service)" = active
check "/health answered as soon as the start returned (Type=notify)" test "$(health)" = 200
ct systemctl show stoa.service -p Type -p NotifyAccess -p KillMode -p Restart -p OOMPolicy -p TasksMax \
	-p CapabilityBoundingSet | sed 's/^/   /'
check "sysusers made the service user" ct getent passwd stoa
check "/var/lib/stoa stoa:stoa 0700" test "$(ct stat -c '%U:%G %a' /var/lib/stoa)" = "stoa:stoa 700"
check "/var/lib/stoa-broker root:root 0700" test "$(ct stat -c '%U:%G %a' /var/lib/stoa-broker)" = "root:root 700"
check "/run/stoa root:root 0755" test "$(ct stat -c '%U:%G %a' /run/stoa)" = "root:root 755"

phase "restart: systemctl start waits for readiness"
ct systemctl restart stoa.service
check "/health answers right after restart returned" test "$(health)" = 200

# ---------------------------------------------------------------------------------------
phase "run a command as a user through stoa"
ct useradd --create-home --shell /bin/bash --groups stoa-users alice
out=$(ct stoa exec --user alice -- id -un)
check "stoa exec --user alice -- id -un prints alice" test "$out" = alice
out=$(ct stoa exec --user alice -- grep -E '^(NoNewPrivs|CapBnd)' /proc/self/status)
printf '%s\n' "$out" | sed 's/^/   alice: /'
check "alice's process has no_new_privs" grep -qE '^NoNewPrivs:[[:space:]]+1$' <<<"$out"
check "alice's process has an empty bounding set" grep -qE '^CapBnd:[[:space:]]+0+$' <<<"$out"
check "alice's process sees her home and the real /tmp (no unit sandbox inherited)" \
	test "$(ct stoa exec --user alice -- sh -c 'touch ~/x /tmp/alice-x && ls /tmp/alice-x ~/x | wc -l')" = 2
check "root outside stoa sees alice's /tmp file (no PrivateTmp)" ct test -f /tmp/alice-x

phase "systemctl status and the journal"
ct systemctl status stoa.service --no-pager --lines=0 | tee "$WORK/status.txt" | sed 's/^/   | /'
check "status: active (running)" grep -q 'Active: active (running)' "$WORK/status.txt"
check "status: the daemon runs in the unit's cgroup" grep -q '__daemon' "$WORK/status.txt"
ct journalctl -u stoa.service --no-pager -o cat >"$WORK/journal.txt"
sed -n '1,12p' "$WORK/journal.txt" | sed 's/^/   journal: /'
check "journal: the broker started the daemon" grep -q 'daemon started' "$WORK/journal.txt"
check "journal: no ERROR" sh -c "! grep -q 'ERROR' '$WORK/journal.txt'"

phase "SIGHUP, crash restart, restart ends users' processes"
# (systemctl reload is an upgrade in place: see the upgrade below.)
# shellcheck disable=SC2016 # expanded by the container's sh
ct sh -c 'kill -HUP "$(systemctl show -p MainPID --value stoa.service)"'
policy_reloaded() { ct journalctl -u stoa.service --no-pager -o cat | grep -q 'policy reloaded'; }
for _ in $(seq 1 50); do policy_reloaded && break; sleep 0.2; done
check "SIGHUP to the broker reread the policy" policy_reloaded
main=$(ct systemctl show -p MainPID --value stoa.service)
ct kill -KILL "$main"
deadline=$((SECONDS + 20))
while [ $SECONDS -lt $deadline ]; do
	new=$(ct systemctl show -p MainPID --value stoa.service)
	[ "$new" != "$main" ] && [ "$new" != 0 ] && [ "$(health 2>/dev/null)" = 200 ] && break
	sleep 0.2
done
check "a SIGKILLed broker is restarted (Restart=on-failure)" sh -c "[ '$new' != '$main' ] && [ '$new' != 0 ]"
# A process that leaves its process group and session: the broker cannot reach it, the
# cgroup sweep (KillMode=mixed) must.
ct stoa exec --user alice -- sh -c 'setsid sleep 1000 </dev/null >/dev/null 2>&1 &'
sleep 0.5
check "alice's detached sleep runs" ct pgrep -u alice -x sleep
ct systemctl restart stoa.service
check "after a restart no process of alice is left" sh -c "! nsenter -t $INIT_PID -a -- pgrep -u alice"
check "and the service is back" test "$(health)" = 200

phase "the broker recreates a deleted service user (useradd under the bounding set)"
# (The daemon's old state goes too: the broker refuses a state dir of another uid.)
ct systemctl stop stoa.service
ct userdel stoa
ct rm -rf /var/lib/stoa
ct systemctl start stoa.service
check "service active again" test "$(ct systemctl is-active stoa.service)" = active
check "the broker created user stoa with useradd" ct getent passwd stoa
ct journalctl -u stoa.service --no-pager -o cat | grep -i 'created the service user' | tail -1 | sed 's/^/   journal: /'
check "/var/lib/stoa belongs to the new stoa" test "$(ct stat -c '%U %a' /var/lib/stoa)" = "stoa 700"
check "commands still run" test "$(ct stoa exec --user alice -- id -un)" = alice

phase "upgrade in place (packaging/test-upgrade-in-place.sh in the container)"
echo '#min_uid = 1000  # an admin edit' | ct tee -a /etc/stoa/broker.toml >/dev/null
token=$(ct sha256sum /var/lib/stoa-broker/admin.token)
cp packaging/test-upgrade-in-place.sh "$ROOT/var/tmp/test-upgrade-in-place.sh"
ct bash /var/tmp/test-upgrade-in-place.sh /var/tmp/stoa.deb 2>&1 | sed 's/^/   /'
phase "after the upgrades"
check "upgraded" sh -c "nsenter -t $INIT_PID -a -- dpkg-query -W -f='\${Version}' stoa | grep -q -- '+up3\$'"
check "the upgrades kept the policy edit" ct grep -q 'an admin edit' /etc/stoa/broker.toml
check "the upgrades kept the admin token" test "$(ct sha256sum /var/lib/stoa-broker/admin.token)" = "$token"
check "commands still run" test "$(ct stoa exec --user alice -- id -un)" = alice

phase "stoa doctor and systemd-analyze"
doctor_rc=0
ct stoa doctor >"$WORK/doctor.txt" 2>&1 || doctor_rc=$?
sed 's/^/   | /' "$WORK/doctor.txt"
check "stoa doctor passes under systemd" test $doctor_rc = 0
# (--man=no: the minimal container has no man-db; ci.sh checks the man: link on the host.)
check "systemd-analyze verify" ct systemd-analyze verify --man=no /usr/lib/systemd/system/stoa.service
ct systemd-analyze security stoa.service --no-pager 2>/dev/null | tail -1 | sed 's/^/   security: /' || true

# ---------------------------------------------------------------------------------------
phase "dpkg -r stops the service; dpkg -P removes the state"
ct stoa exec --user alice -- sh -c 'setsid sleep 1000 </dev/null >/dev/null 2>&1 &'
ct dpkg -r stoa
check "stopped on remove" test "$(ct systemctl is-active stoa.service || true)" != active
check "no process of stoa or alice left" sh -c "! nsenter -t $INIT_PID -a -- pgrep -u stoa && ! nsenter -t $INIT_PID -a -- pgrep -u alice"
check "config and state kept on remove" ct test -f /etc/stoa/broker.toml -a -d /var/lib/stoa-broker
ct dpkg -P stoa
check "state and config gone on purge" ct test ! -e /etc/stoa -a ! -e /var/lib/stoa -a ! -e /var/lib/stoa-broker
check "alice's home stays" ct test -d /home/alice

phase "power off"
ct systemctl poweroff || true
for _ in $(seq 1 150); do kill -0 "$NSPAWN_PID" 2>/dev/null || break; sleep 0.2; done
if kill -0 "$NSPAWN_PID" 2>/dev/null; then fail "the container did not power off"; fi
wait "$NSPAWN_PID" || true
NSPAWN_PID=
