#!/usr/bin/env bash
# Packaging CI (called by .ci/run as root, after the tests): builds the .deb and .rpm, lints
# them, installs the .deb with dpkg, checks users, files and modes, runs `stoa serve` from
# the installed files (no systemd as PID 1 here), runs a command as a test user through it,
# runs `stoa doctor`, upgrades the package (edits and state must survive) and the running
# broker in place (`stoa daemon upgrade`), stops the broker,
# removes and purges the package and checks that nothing is left but what policy keeps.
#
# It leaves the machine as it found it: the package purged, the test user removed, the
# service user `stoa` and the group `stoa-users` removed again if this run created them,
# the broker it started stopped. Tools it installs stay (cargo-deb and cargo-generate-rpm in
# ~/.cargo/bin; lintian, rpm, rpmlint from apt) so a later run finds them.
# Then it runs packaging/test-in-systemd.sh: the same story under a real systemd.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
export CARGO_TERM_COLOR=never
export PATH="$HOME/.cargo/bin:$PATH"

T0=$(date +%s)
phase_start=$T0
phase() {
	local now
	now=$(date +%s)
	echo "== packaging: $* (at +$((now - T0))s, previous step $((now - phase_start))s)"
	phase_start=$now
}
fail() {
	echo "== packaging: FAIL: $*" >&2
	exit 1
}
check() { # check DESCRIPTION COMMAND...: runs COMMAND, fails with DESCRIPTION if it fails
	local what=$1
	shift
	if "$@"; then echo "   ok: $what"; else fail "$what"; fi
}
mode_is() { # mode_is PATH OWNER:GROUP MODE
	local got
	got=$(stat -c '%U:%G %a' "$1" 2>/dev/null || echo missing)
	[ "$got" = "$2 $3" ] || {
		echo "   $1: $got, want $2 $3" >&2
		return 1
	}
}

TEST_USER=stoa-ci-user
WORK=$(mktemp -d /tmp/stoa-packaging-ci.XXXXXX)
BROKER_PID=
created_service_user=no
created_group=no
installed=no
created_test_user=no

cleanup() {
	local rc=$?
	set +e
	if [ -n "$BROKER_PID" ] && kill -0 "$BROKER_PID" 2>/dev/null; then
		kill -TERM "$BROKER_PID"
		for _ in $(seq 1 150); do kill -0 "$BROKER_PID" 2>/dev/null || break; sleep 0.2; done
		kill -KILL "$BROKER_PID" 2>/dev/null
	fi
	if [ "$created_test_user" = yes ]; then
		for pid in $(pgrep -u "$TEST_USER"); do kill -KILL "$pid" 2>/dev/null; done
		userdel --remove "$TEST_USER" >/dev/null 2>&1
	fi
	if [ "$installed" = yes ]; then
		dpkg --purge stoa >/dev/null 2>&1
	fi
	if [ "$created_service_user" = yes ] && getent passwd stoa >/dev/null; then
		for pid in $(pgrep -u stoa); do kill -KILL "$pid" 2>/dev/null; done
		userdel stoa >/dev/null 2>&1
		getent group stoa >/dev/null && groupdel stoa >/dev/null 2>&1
	fi
	if [ "$created_group" = yes ] && getent group stoa-users >/dev/null; then
		groupdel stoa-users >/dev/null 2>&1
	fi
	if [ $rc -eq 0 ]; then
		echo "== packaging: all passed in $(($(date +%s) - T0))s"
	else
		if [ -f "$WORK/broker.log" ]; then
			echo "== packaging: the broker's log:" >&2
			tail -n 50 "$WORK/broker.log" >&2
		fi
		echo "== packaging: FAILED (rc $rc) after $(($(date +%s) - T0))s; machine cleaned up" >&2
	fi
	rm -rf "$WORK"
	exit $rc
}
trap cleanup EXIT

# GET http://127.0.0.1:PORT/PATH with bash alone; prints the status code.
http_status() {
	local port=$1 path=$2 line
	exec 9<>"/dev/tcp/127.0.0.1/$port" || return 1
	printf 'GET %s HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n' "$path" >&9
	IFS= read -r -t 2 line <&9 || line=
	exec 9>&-
	echo "$line" | awk '{print $2}'
}

# ---------------------------------------------------------------------------------------
phase "preconditions"
[ "$(id -u)" = 0 ] || fail "must run as root (it installs a package and creates users)"
if dpkg-query -W -f='${db:Status-Status}' stoa 2>/dev/null | grep -qv '^not-installed$'; then
	fail "the package stoa is already on this machine (dpkg -P stoa first)"
fi
for p in /etc/stoa /var/lib/stoa /var/lib/stoa-broker /usr/libexec/stoa; do
	# Purging would delete someone's state: refuse rather than guess.
	[ ! -e "$p" ] || fail "$p exists but the package is not installed (a manual install or a dev run?); move it away first"
done
getent passwd "$TEST_USER" >/dev/null && fail "test user $TEST_USER exists already"
getent passwd stoa >/dev/null || created_service_user=yes
getent group stoa-users >/dev/null || created_group=yes
echo "   service user stoa existed before: $([ $created_service_user = yes ] && echo no || echo yes);" \
	"group stoa-users existed before: $([ $created_group = yes ] && echo no || echo yes)"
leftover_scan() {
	find /etc /usr /var /run /opt -xdev \( -path /var/cache -o -path /var/tmp -o -path /var/log \
		-o -path "$REPO" -o -path /var/lib/apt -o -path '/run/stoa-?*' \) -prune -o -name '*stoa*' -print 2>/dev/null | sort
	# (/run/stoa-*: scratch dirs of tests and benchmarks that may run meanwhile; the
	# package's own is /run/stoa, which is still scanned.)
}
leftover_scan >"$WORK/before.txt"

# ---------------------------------------------------------------------------------------
phase "tools"
command -v cargo-deb >/dev/null || cargo install --locked cargo-deb
command -v cargo-generate-rpm >/dev/null || cargo install --locked cargo-generate-rpm
apt_missing=()
command -v lintian >/dev/null || apt_missing+=(lintian)
command -v rpm >/dev/null || apt_missing+=(rpm)
command -v rpmlint >/dev/null || apt_missing+=(rpmlint)
command -v systemd-analyze >/dev/null || apt_missing+=(systemd)
command -v npm >/dev/null || apt_missing+=(npm)
if [ ${#apt_missing[@]} -gt 0 ]; then
	apt-get update -q
	DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${apt_missing[@]}"
fi
cargo deb --version
cargo generate-rpm --version

# ---------------------------------------------------------------------------------------
phase "build (packaging/build.sh)"
packaging/build.sh
cp target/packaging/debian/stoa_*.deb target/packaging/generate-rpm/stoa-*.rpm "$WORK/"
DEB=$(ls "$WORK"/stoa_*.deb)
RPM=$(ls "$WORK"/stoa-*.rpm)
phase "built $DEB and $RPM"

# ---------------------------------------------------------------------------------------
phase "lintian"
# Kept warnings (packaging/README.md says why); anything else fails.
lintian_allowed='initial-upload-closes-no-bugs'
lintian --fail-on error "$DEB" | tee "$WORK/lintian.txt"
if grep -E '^[EW]: ' "$WORK/lintian.txt" | grep -vE ": ($lintian_allowed)( |$)"; then
	fail "lintian reported something new (above)"
fi
echo "   ok: lintian: no errors, no warnings but the kept ones"
# (The override of maintainer-script-calls-systemctl covers queries only.)
ctl_calls=$(dpkg-deb -I "$DEB" postinst | grep -vE '^[[:space:]]*(#|echo )' | grep -o 'systemctl [A-Za-z -]*' |
	grep -vE '^systemctl (is-active --quiet|show -p MainPID --value|--system daemon-reload|reload stoa)' || true)
ctl_calls+=$(dpkg-deb -I "$DEB" postinst | grep -vE '^[[:space:]]*(#|echo )' | grep -E 'restart' || true)
check "the postinst calls systemctl only to query, daemon-reload or reload (no restart)" test -z "$ctl_calls"

phase "rpmlint"
rpmlint_allowed='no-url-tag|only-non-binary-in-usr-lib|no-manual-page-for-binary'
rpmlint -c packaging/rpmlint.toml "$RPM" 2>&1 | grep -v '^running with root' | tee "$WORK/rpmlint.txt"
grep -q ' 0 errors' "$WORK/rpmlint.txt" || fail "rpmlint reported errors"
if grep -E ': [EW]: ' "$WORK/rpmlint.txt" | grep -vE ": W: ($rpmlint_allowed)( |$)"; then
	fail "rpmlint reported something new (above)"
fi
echo "   ok: rpmlint: no errors, no warnings but the kept ones"

phase "rpm payload (installed into a scratch root without scripts)"
RPMROOT=$WORK/rpmroot
# (Debian's rpm warns that it is not Debian's package manager: filtered.)
rpm --root "$RPMROOT" --initdb
rpm -i --root "$RPMROOT" --nodeps --noscripts "$RPM" 2>&1 | grep -v '^rpm: \(RPM should not\|However assuming\)' || true
check "rpm: executor root:root 0755" mode_is "$RPMROOT/usr/libexec/stoa/stoa-executor" root:root 755
check "rpm: stoa root:root 0755" mode_is "$RPMROOT/usr/bin/stoa" root:root 755
check "rpm: unit, sysusers, tmpfiles, man page, completions" test -f "$RPMROOT/usr/lib/systemd/system/stoa.service" \
	-a -f "$RPMROOT/usr/lib/sysusers.d/stoa.conf" -a -f "$RPMROOT/usr/lib/tmpfiles.d/stoa.conf" \
	-a -f "$RPMROOT/usr/share/man/man1/stoa.1.gz" -a -f "$RPMROOT/usr/share/bash-completion/completions/stoa"
check "rpm: both configs are %config(noreplace)" test "$(rpm -qp --qf '[%{FILEFLAGS:fflags} %{FILENAMES}\n]' "$RPM" | grep -c '^cn /etc/stoa/')" = 2
check "rpm: scriptlets run sysusers, tmpfiles and disable --now on erase" \
	sh -c "rpm -qp --scripts '$RPM' | grep -q 'systemd-sysusers stoa.conf' && rpm -qp --scripts '$RPM' | grep -q 'disable --now stoa.service'"
check "rpm: %post reloads (upgrades in place) a running unit on upgrade, never restarts it" \
	sh -c "rpm -qp --scripts '$RPM' | grep -q 'systemctl reload stoa.service' && ! rpm -qp --scripts '$RPM' | grep -q 'restart stoa.service'"
rpm -e --root "$RPMROOT" --nodeps --noscripts stoa 2>&1 | grep -v '^rpm: \(RPM should not\|However assuming\)' || true
check "rpm: erase leaves no files" test -z "$(find "$RPMROOT" -type f ! -path '*/.rpmdb/*' ! -path '*/var/lib/rpm/*')"

# ---------------------------------------------------------------------------------------
phase "dpkg -i"
dpkg -i "$DEB"
installed=yes
service_user_ok() {
	local u
	u=$(getent passwd stoa) || return 1
	[ "$(cut -d: -f3 <<<"$u")" -lt 1000 ] && [ "$(cut -d: -f7 <<<"$u")" = /usr/sbin/nologin ]
}
check "service user stoa: system uid, no login shell" service_user_ok
check "group stoa-users exists" sh -c "getent group stoa-users >/dev/null"
check "/usr/bin/stoa root:root 0755" mode_is /usr/bin/stoa root:root 755
check "/usr/libexec/stoa root:root 0755" mode_is /usr/libexec/stoa root:root 755
check "executor root:root 0755" mode_is /usr/libexec/stoa/stoa-executor root:root 755
check "/etc/stoa root:root 0755" mode_is /etc/stoa root:root 755
check "broker.toml root:root 0644" mode_is /etc/stoa/broker.toml root:root 644
check "config.toml root:root 0644" mode_is /etc/stoa/config.toml root:root 644
check "both configs are conffiles" test "$(dpkg-query -W -f='${Conffiles}' stoa | grep -c '/etc/stoa/.*\.toml')" = 2
check "/var/lib/stoa stoa:stoa 0700 (tmpfiles, run by postinst)" mode_is /var/lib/stoa stoa:stoa 700
check "/var/lib/stoa-broker root:root 0700" mode_is /var/lib/stoa-broker root:root 700
check "unit, sysusers.d, tmpfiles.d installed" test -f /usr/lib/systemd/system/stoa.service \
	-a -f /usr/lib/sysusers.d/stoa.conf -a -f /usr/lib/tmpfiles.d/stoa.conf
check "man pages and completions installed" test -f /usr/share/man/man1/stoa.1.gz \
	-a -f /usr/share/man/man1/stoa-doctor.1.gz -a -f /usr/share/bash-completion/completions/stoa \
	-a -f /usr/share/zsh/vendor-completions/_stoa -a -f /usr/share/fish/vendor_completions.d/stoa.fish
check "xterm.js's licences installed" test -f /usr/share/doc/stoa/xterm.LICENSE \
	-a -f /usr/share/doc/stoa/xterm-addon-fit.LICENSE
check "man page renders" sh -c 'man -l /usr/share/man/man1/stoa.1.gz 2>/dev/null | grep -q doctor'
# shellcheck disable=SC2016 # expanded by that sh
check "stoa.service is enabled" sh -c '[ "$(systemctl is-enabled stoa.service 2>/dev/null)" = enabled ]'
check "systemd-analyze verify stoa.service" systemd-analyze verify /usr/lib/systemd/system/stoa.service
check "stoa --help" sh -c '/usr/bin/stoa --help | grep -q doctor'

# ---------------------------------------------------------------------------------------
phase "start stoa serve from the installed files"
PORT=7433
while ss -Hltn "sport = :$PORT" | grep -q .; do PORT=$((PORT + 1)); done
# An admin's edit of a conffile, which the upgrade below must keep.
echo "listen = \"127.0.0.1:$PORT\"  # edited by packaging/ci.sh" >>/etc/stoa/config.toml
export STOA_URL="http://127.0.0.1:$PORT"
setsid /usr/bin/stoa serve >"$WORK/broker.log" 2>&1 </dev/null &
BROKER_PID=$!
ready=no
deadline=$((SECONDS + 30))
while [ $SECONDS -lt $deadline ]; do
	if [ "$(http_status "$PORT" /health 2>/dev/null)" = 200 ]; then ready=yes; break; fi
	kill -0 "$BROKER_PID" 2>/dev/null || break
	sleep 0.2
done
[ $ready = yes ] || fail "the broker did not answer /health on port $PORT within 30 s"
echo "   ok: /health answers on 127.0.0.1:$PORT (broker pid $BROKER_PID)"
check "GET / serves the web page" test "$(http_status "$PORT" /)" = 200
check "GET /static/ serves the built-in xterm.js" test "$(http_status "$PORT" /static/vendor/xterm/xterm.js)" = 200
check "admin token root:root 0600" mode_is /var/lib/stoa-broker/admin.token root:root 600
check "the daemon runs as stoa" sh -c "ps -o user=,args= --ppid $BROKER_PID | grep -q '^stoa .*__daemon'"

phase "stoa exec as a test user"
useradd --create-home --shell /bin/sh --groups stoa-users "$TEST_USER"
created_test_user=yes
[ "$(id -u "$TEST_USER")" -ge 1000 ] || fail "test user got a uid below 1000"
out=$(/usr/bin/stoa exec --user "$TEST_USER" -- id -un)
check "stoa exec --user $TEST_USER -- id -un prints $TEST_USER" test "$out" = "$TEST_USER"
check "stoa exec --user root is refused" sh -c '! /usr/bin/stoa exec --user root -- id -un 2>/dev/null'
check "stoa exec --user nobody is refused" sh -c '! /usr/bin/stoa exec --user nobody -- id -un 2>/dev/null'
kill -HUP "$BROKER_PID"
sleep 0.5
# shellcheck disable=SC2016 # expanded by the user's sh
out=$(/usr/bin/stoa exec --user "$TEST_USER" -- sh -c 'echo $HOME')
check "after SIGHUP (policy reload) it still runs commands" test "$out" = "/home/$TEST_USER"

phase "stoa doctor"
doctor_rc=0
/usr/bin/stoa doctor >"$WORK/doctor.txt" 2>&1 || doctor_rc=$?
sed 's/^/   | /' "$WORK/doctor.txt"
check "stoa doctor exits 0" test $doctor_rc = 0
check "stoa doctor: no FAIL lines" sh -c "! grep -q '^FAIL' '$WORK/doctor.txt'"

# ---------------------------------------------------------------------------------------
phase "upgrade (dpkg -i of a newer revision while the broker runs)"
token_before=$(sha256sum /var/lib/stoa-broker/admin.token)
touch /var/lib/stoa/ci-marker
chown stoa:stoa /var/lib/stoa/ci-marker
version=$(dpkg-deb -f "$DEB" Version)
CARGO_TARGET_DIR=$REPO/target/packaging cargo deb --no-build --strip --locked \
	--deb-version "${version%-*}-99" --output "$WORK/upgrade.deb" >/dev/null
dpkg -i "$WORK/upgrade.deb"
check "upgraded to ${version%-*}-99" test "$(dpkg-query -W -f='${Version}' stoa)" = "${version%-*}-99"
check "upgrade kept the edit of /etc/stoa/config.toml" grep -q 'edited by packaging/ci.sh' /etc/stoa/config.toml
check "upgrade kept the admin token" test "$(sha256sum /var/lib/stoa-broker/admin.token)" = "$token_before"
check "upgrade kept the daemon's state" test -f /var/lib/stoa/ci-marker
check "upgrade did not stop the broker" kill -0 "$BROKER_PID"
out=$(/usr/bin/stoa exec --user "$TEST_USER" -- id -un)
check "stoa exec still works after the upgrade" test "$out" = "$TEST_USER"
# Without systemd the postinst leaves the broker alone; by hand, it upgrades in place (the
# same under systemd, with users' work running: test-in-systemd.sh).
check "the broker still runs the old file" test "$(readlink /proc/"$BROKER_PID"/exe)" = "/usr/bin/stoa (deleted)"
/usr/bin/stoa daemon upgrade
check "stoa daemon upgrade: the same broker process runs the new /usr/bin/stoa" \
	sh -c "kill -0 $BROKER_PID && [ \"\$(readlink /proc/$BROKER_PID/exe)\" = /usr/bin/stoa ] && [ \"\$(stat -L -c %i /proc/$BROKER_PID/exe)\" = \"\$(stat -c %i /usr/bin/stoa)\" ]"
out=$(/usr/bin/stoa exec --user "$TEST_USER" -- id -un)
check "stoa exec works after the upgrade in place" test "$out" = "$TEST_USER"
check "stoa doctor passes after the upgrade" sh -c '/usr/bin/stoa doctor >/dev/null'

# ---------------------------------------------------------------------------------------
phase "stop the broker (SIGTERM)"
# A command of the test user's that is still running must be ended by the stop (the
# broker's own SIGHUP/SIGTERM/SIGKILL of every executor's process group).
/usr/bin/stoa exec --user "$TEST_USER" -- sleep 300 >/dev/null 2>&1 &
EXEC_PID=$!
for _ in $(seq 1 50); do pgrep -u "$TEST_USER" -x sleep >/dev/null && break; sleep 0.1; done
check "a long command of the test user runs" pgrep -u "$TEST_USER" -x sleep
kill -TERM "$BROKER_PID"
rc=0
for _ in $(seq 1 150); do kill -0 "$BROKER_PID" 2>/dev/null || break; sleep 0.2; done
kill -0 "$BROKER_PID" 2>/dev/null && fail "the broker did not exit within 30 s of SIGTERM"
wait "$BROKER_PID" || rc=$?
BROKER_PID=
check "the broker exited 0 on SIGTERM" test $rc = 0
wait "$EXEC_PID" 2>/dev/null || true
sleep 0.5
check "no process of the stoa user is left" sh -c '! pgrep -u stoa >/dev/null'
check "no process of the test user is left" sh -c "! pgrep -u $TEST_USER >/dev/null"

phase "stoa doctor finds problems (broker stopped, a writable policy)"
chmod g+w /etc/stoa/broker.toml
doctor_rc=0
/usr/bin/stoa doctor >"$WORK/doctor-bad.txt" 2>&1 || doctor_rc=$?
chmod g-w /etc/stoa/broker.toml
grep -A1 '^FAIL' "$WORK/doctor-bad.txt" | sed 's/^/   | /'
check "stoa doctor exits non-zero" test $doctor_rc != 0
check "it names the writable policy, with a fix" sh -c "grep -q '^FAIL.*broker.toml.*writable by group' '$WORK/doctor-bad.txt' && grep -q 'fix: chown root:root /etc/stoa/broker.toml' '$WORK/doctor-bad.txt'"
check "it says nothing answers /health" grep -q '^FAIL  broker: nothing answers' "$WORK/doctor-bad.txt"

# ---------------------------------------------------------------------------------------
phase "dpkg -r (remove)"
dpkg -r stoa
check "binaries removed" test ! -e /usr/bin/stoa -a ! -e /usr/libexec/stoa/stoa-executor
check "conffiles kept on remove" test -f /etc/stoa/config.toml -a -f /etc/stoa/broker.toml
check "state kept on remove" test -d /var/lib/stoa -a -d /var/lib/stoa-broker

phase "dpkg -P (purge)"
dpkg -P stoa
installed=no
check "package gone" sh -c "! dpkg-query -W -f='\${db:Status-Status}' stoa 2>/dev/null | grep -q installed"
check "/etc/stoa gone" test ! -e /etc/stoa
check "state gone" test ! -e /var/lib/stoa -a ! -e /var/lib/stoa-broker -a ! -e /run/stoa
check "the test user's home is untouched" test -d "/home/$TEST_USER"
check "enable/mask symlinks gone" test ! -e /etc/systemd/system/multi-user.target.wants/stoa.service \
	-a ! -L /etc/systemd/system/stoa.service
check "policy keeps the service user stoa" sh -c "getent passwd stoa >/dev/null"
check "policy keeps the group stoa-users" sh -c "getent group stoa-users >/dev/null"
leftover_scan >"$WORK/after.txt"
if comm -13 "$WORK/before.txt" "$WORK/after.txt" | grep .; then
	fail "files named *stoa* were left behind (above)"
fi
echo "   ok: no file left behind"

phase "clean up what this run created"
for pid in $(pgrep -u "$TEST_USER"); do kill -KILL "$pid"; done
userdel --remove "$TEST_USER" 2>/dev/null # (it has no mail spool to remove)
created_test_user=no
if [ "$created_service_user" = yes ]; then
	userdel stoa
	# userdel removes the user's group with it where USERGROUPS_ENAB is on; else do it here.
	if getent group stoa >/dev/null; then groupdel stoa; fi
	created_service_user=no
fi
if [ "$created_group" = yes ]; then groupdel stoa-users; created_group=no; fi
check "test user gone" sh -c "! getent passwd $TEST_USER >/dev/null && ! test -e /home/$TEST_USER"

# ---------------------------------------------------------------------------------------
# The same package under a real systemd, in a container (about 50 s, most of it debootstrap
# from the Debian mirror). STOA_CI_SKIP_NSPAWN=1 skips it.
if [ "${STOA_CI_SKIP_NSPAWN:-0}" = 1 ]; then
	phase "test-in-systemd.sh skipped (STOA_CI_SKIP_NSPAWN=1)"
else
	phase "packaging/test-in-systemd.sh"
	packaging/test-in-systemd.sh "$DEB"
fi
