#!/usr/bin/env bash
# Upgrade in place under systemd, end to end (issue 14). Runs as root INSIDE a system whose
# PID 1 is systemd, with the stoa package installed and stoa.service active:
# packaging/test-in-systemd.sh runs it in an nspawn container, scripts/vm/guest-upgrade.sh
# in the cgroup-v2 VM. Argument: the .deb that is installed; the newer revisions are
# repacked from it here (dpkg-deb; a marker appended to /usr/bin/stoa makes each build a
# different file, as a real new version is).
#
# With a user's work running -- a terminal whose shell prints a numbered line every 0.2 s
# beside a `sleep 1000`, a viewer attached to it (`stoa terminal open`, no tty), and an
# agent task mid-run (a stand-in codex that answers only when the test says go) -- it checks:
#   1. dpkg -i of a newer revision: the postinst's reload upgrades the broker in place. The
#      unit's MainPID is the same and its /proc/PID/exe is the new /usr/bin/stoa (same
#      inode and bytes, not "(deleted)"); the shell, the sleep and the agent are the same
#      processes, in the same cgroups as the broker is; the front is a new process on the
#      new file; /health counts the upgrade;
#      the viewer reconnected and missed no line; then the task completes, recorded with
#      the agent's answer.
#   2. A broken new binary (its CLI works, so `systemctl reload` really asks the broker,
#      but it cannot start the broker's state check): the reload fails, the journal says
#      why, and the old broker (same pid, same file) serves and runs a new command.
#   3. A truncated ELF as the new binary: `stoa daemon upgrade` exits 1, says why; the same.
#   4. A package whose binary is that broken one: dpkg -i succeeds, the postinst says the
#      old broker keeps serving and how to retry. Then a good one: upgraded again.
#   5. A new viewer from offset 0 finds every line the shell printed, none lost or repeated.
# It leaves the newest good revision installed and the broker running with it; it ends the
# terminal and restores /etc/stoa/config.toml (the broker keeps the test's agent config
# until its next restart). On failure it prints the unit's journal.
set -euo pipefail
T0=$(date +%s)
phase_start=$T0
phase() {
	local now
	now=$(date +%s)
	echo "== upgrade: $* (at +$((now - T0))s, previous step $((now - phase_start))s)"
	phase_start=$now
}
fail() {
	echo "== upgrade: FAIL: $*" >&2
	exit 1
}
check() {
	local what=$1
	shift
	if "$@"; then echo "   ok: $what"; else fail "$what"; fi
}
# wait_for DESCRIPTION SECONDS COMMAND...: until COMMAND succeeds; fails after SECONDS.
wait_for() {
	local what=$1 secs=$2
	shift 2
	local deadline=$((SECONDS + secs))
	until "$@"; do
		[ $SECONDS -lt "$deadline" ] || fail "$what (not within ${secs}s)"
		sleep 0.2
	done
}

[ "$(id -u)" = 0 ] || fail "must run as root"
[ "$(ps -o comm= -p 1)" = systemd ] || fail "PID 1 is not systemd"
DEB=${1:?usage: test-upgrade-in-place.sh path/to/the-installed.deb}
[ -f "$DEB" ] || fail "no such .deb: $DEB"
command -v python3 >/dev/null || fail "python3 is needed (JSON)"
systemctl is-active --quiet stoa.service || fail "stoa.service is not active"
unset STOA_URL STOA_TOKEN STOA_CONFIG STOA_BROKER_CONFIG
export NO_COLOR=1

U=stoa-upgrader
W=$(mktemp -d /var/tmp/stoa-upgrade.XXXXXX)
GOOD=$W/stoa-good # the CLI, while /usr/bin/stoa is broken on purpose
LIVE=
TERM_ID=
cleanup() {
	local rc=$?
	set +e
	[ -n "$LIVE" ] && kill -KILL "$LIVE" 2>/dev/null
	[ -n "${VIEW:-}" ] && kill -KILL "$VIEW" 2>/dev/null
	# A failed step may have left a broken binary installed: the good one goes back.
	if [ -n "${GOOD_INSTALLED:-}" ] && [ -f "$GOOD_INSTALLED" ] && ! cmp -s "$GOOD_INSTALLED" /usr/bin/stoa; then
		install_binary "$GOOD_INSTALLED"
	fi
	if [ $rc -ne 0 ]; then
		echo "== upgrade: the unit's journal (last lines):" >&2
		journalctl -u stoa.service --no-pager -o cat -n 40 >&2
		for f in live.err view.err; do
			[ -s "$W/$f" ] && { echo "== upgrade: $f:" >&2; tail -n 10 "$W/$f" >&2; }
		done
	fi
	[ -n "$TERM_ID" ] && "$GOOD" terminal kill "$TERM_ID" >/dev/null 2>&1
	[ -f "$W/config.toml" ] && cp "$W/config.toml" /etc/stoa/config.toml
	rm -rf "$W"
	if [ $rc -eq 0 ]; then
		echo "== upgrade: all passed in $(($(date +%s) - T0))s"
	else
		echo "== upgrade: FAILED (rc $rc) after $(($(date +%s) - T0))s" >&2
	fi
	exit $rc
}
trap cleanup EXIT

# jget EXPR: EXPR (Python, on the JSON value v read from stdin), printed; None as null.
jget() {
	python3 -c 'import json, sys
v = json.load(sys.stdin)
r = eval(sys.argv[1])
print("null" if r is None else r)' "$1"
}
main_pid() { systemctl show -p MainPID --value stoa.service; }
health() { "$GOOD" daemon status --json || true; } # (its exit: whether the status is ok)
# The start time of a process (clock ticks since boot): a pid with the same start time is
# the same process, not a new one that got the number.
started() { sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f20; }
same_process() { [ -n "$2" ] && [ "$(started "$1")" = "$2" ]; }
ident() { stat -L -c %d:%i "$1"; }
# install_binary FILE: puts FILE at /usr/bin/stoa as a package manager does (a new file
# renamed over the old one).
install_binary() {
	cp "$1" /usr/bin/stoa.upgrade-test
	chmod 0755 /usr/bin/stoa.upgrade-test
	mv -f /usr/bin/stoa.upgrade-test /usr/bin/stoa
}
# repack VERSION BINARY OUT: the installed .deb as VERSION with BINARY as /usr/bin/stoa.
repack() {
	local dir=$W/repack
	rm -rf "$dir"
	dpkg-deb -R "$DEB" "$dir"
	sed -i "s/^Version: .*/Version: $1/" "$dir/DEBIAN/control"
	install -m 0755 "$2" "$dir/usr/bin/stoa"
	if [ -f "$dir/DEBIAN/md5sums" ]; then
		sed -i '/ usr\/bin\/stoa$/d' "$dir/DEBIAN/md5sums"
		(cd "$dir" && md5sum usr/bin/stoa) >>"$dir/DEBIAN/md5sums"
	fi
	dpkg-deb -Znone -b "$dir" "$3" >/dev/null # (uncompressed: xz takes half a minute in a TCG VM)
}
ticks_of() { tr -d '\r' <"$1" | grep -o '^tick [0-9]*$' || true; }
# Lines "tick 0" ... "tick N" with none missing or repeated, and N >= $2.
ticks_complete() {
	ticks_of "$1" | awk -v want="$2" '
		$2 != NR - 1 { print "   line " NR ": \"" $0 "\", expected tick " NR - 1; bad = 1; exit }
		END { if (!bad && NR - 1 < want) { print "   only up to tick " NR - 1 ", expected " want; bad = 1 } exit bad }'
}
has_tick() { ticks_of "$1" | grep -qx "tick $2"; }
# A viewer of ours, ended (bash says nothing of it).
stop_background() {
	kill -KILL "$1" 2>/dev/null || true
	wait "$1" 2>/dev/null || true
}

# ---------------------------------------------------------------------------------------
phase "setup: a user, a stand-in agent, the test's config"
cp /usr/bin/stoa "$GOOD"
GOOD_INSTALLED=$W/stoa-installed
cp /usr/bin/stoa "$GOOD_INSTALLED"
getent passwd "$U" >/dev/null || useradd --create-home --shell /bin/sh --groups stoa-users "$U"
WT=/home/$U/wt
rm -rf "$WT"
install -d -o "$U" -g "$U" -m 0755 "$WT"
mkdir -p /usr/local/lib/stoa-upgrade-test
# A stand-in for codex (one-shot: the prompt on stdin, then end-of-file): it starts its
# answer, then waits for the test's go (at most 10 minutes) and finishes it.
cat >/usr/local/lib/stoa-upgrade-test/fake-codex <<'AGENT'
#!/bin/sh
cat >/dev/null
echo $$ >.agent-pid
echo '{"type":"thread.started","thread_id":"01a20b5b-c785-73a2-853d-24af3a821581"}'
echo '{"type":"turn.started"}'
i=0
while [ ! -e go ]; do
	i=$((i + 1))
	if [ $i -gt 3000 ]; then echo "no go within 10 minutes" >&2; exit 3; fi
	sleep 0.2
done
echo '{"type":"item.completed","item":{"id":"item_1","type":"agent_message","text":"Answered across the upgrade."}}'
echo '{"type":"turn.completed","usage":{"input_tokens":12,"cached_input_tokens":0,"output_tokens":7}}'
AGENT
chmod 0755 /usr/local/lib/stoa-upgrade-test /usr/local/lib/stoa-upgrade-test/fake-codex
cp /etc/stoa/config.toml "$W/config.toml"
cat >>/etc/stoa/config.toml <<'CONF'
# (packaging/test-upgrade-in-place.sh: a stand-in agent, and time to upgrade mid-run)
[execution]
timeout_secs = 900
[agents.codex]
command = ["/usr/local/lib/stoa-upgrade-test/fake-codex"]
CONF
# The config is read at start: nothing of anyone's runs yet, so a restart loses nothing.
# (reset-failed: the start rate limit counts the restarts of whatever ran before us.)
systemctl reset-failed stoa.service
systemctl restart stoa.service
check "stoa.service is active after the restart" systemctl is-active --quiet stoa.service

phase "a terminal with a viewer, a sleep beside its shell, an agent task mid-run"
# The shell writes the number it printed last to tick.now in the home, the truth the
# viewers' lines are checked against.
# shellcheck disable=SC2016 # expanded by the user's sh
"$GOOD" terminal open --user "$U" -- sh -c \
	'sleep 1000 & i=0; while :; do echo "tick $i"; echo $i >'"/home/$U/tick.now"'; i=$((i+1)); sleep 0.2; done' \
	</dev/null >"$W/live.out" 2>"$W/live.err" &
LIVE=$!
wait_for "the live viewer shows tick 5" 30 has_tick "$W/live.out" 5
TERM_ID=$("$GOOD" terminal list --json | jget "[t['terminal_id'] for t in v if t['unix_user'] == '$U' and t['running']][0]")
SHELL_PID=$("$GOOD" terminal list --json | jget "[t['pid'] for t in v if t['terminal_id'] == '$TERM_ID'][0]")
SLEEP_PID=$(pgrep -u "$U" -f '^sleep 1000$')
echo "   terminal $TERM_ID: shell $SHELL_PID, sleep $SLEEP_PID"
SHELL_START=$(started "$SHELL_PID")
SLEEP_START=$(started "$SLEEP_PID")
SESSION=$("$GOOD" session create --user "$U" --tool codex --worktree "$WT" --json | jget "v['session_id']")
TASK=$("$GOOD" session prompt "$SESSION" "answer once stoa is upgraded" --json | jget "v['task_id']")
wait_for "the agent runs" 30 test -s "$WT/.agent-pid"
AGENT_PID=$(cat "$WT/.agent-pid")
AGENT_START=$(started "$AGENT_PID")
check "the agent ($AGENT_PID) is the stand-in, as $U" \
	sh -c "tr '\0' ' ' </proc/$AGENT_PID/cmdline | grep -q fake-codex && [ \"\$(stat -c %U /proc/$AGENT_PID)\" = $U ]"
check "the task is running" test "$("$GOOD" task show "$TASK" --json | jget "v['status']")" = running

BROKER=$(main_pid)
OLD_SUM=$(sha256sum </proc/"$BROKER"/exe)
# Where each process is in the cgroup tree (v2: one line; v1: one per hierarchy).
cgroups_of() { for p in "$@"; do echo "$p: $(tr '\n' ' ' </proc/"$p"/cgroup)"; done; }
CGROUPS=$(cgroups_of "$BROKER" "$SHELL_PID" "$SLEEP_PID" "$AGENT_PID")
while IFS= read -r line; do echo "   cgroup of $line"; done <<<"$CGROUPS"
FRONT=$(pgrep -u stoa -f '__daemon' | head -1)
H=$(health)
UPGRADES=$(jget "v['broker']['upgrades']" <<<"$H")
check "/health names the broker's pid ($BROKER)" test "$(jget "v['broker']['pid']" <<<"$H")" = "$BROKER"
STARTED_AT=$(jget "v['broker']['started_at']" <<<"$H")
echo "   broker $BROKER ($(readlink /proc/"$BROKER"/exe)), front $FRONT, upgrades so far $UPGRADES"

# ---------------------------------------------------------------------------------------
VERSION=$(dpkg-query -W -f='${Version}' stoa)
phase "1. dpkg -i of a newer revision ($VERSION+up1) while all that runs"
printf '\0stoa upgrade test build 1' | cat "$GOOD" - >"$W/stoa-1"
repack "$VERSION+up1" "$W/stoa-1" "$W/up1.deb"
dpkg -i "$W/up1.deb" 2>&1 | tee "$W/dpkg-1.txt"
GOOD_INSTALLED=$W/stoa-1
check "the package is $VERSION+up1" test "$(dpkg-query -W -f='${Version}' stoa)" = "$VERSION+up1"
check "the postinst says the broker was upgraded in place" grep -q 'was upgraded in place' "$W/dpkg-1.txt"
check "stoa.service is active" systemctl is-active --quiet stoa.service
check "the unit's MainPID is the same ($BROKER)" test "$(main_pid)" = "$BROKER"
check "/proc/$BROKER/exe is /usr/bin/stoa, not deleted" test "$(readlink /proc/"$BROKER"/exe)" = /usr/bin/stoa
check "... the very file installed (device and inode)" test "$(ident /proc/"$BROKER"/exe)" = "$(ident /usr/bin/stoa)"
NEW_SUM=$(sha256sum </usr/bin/stoa)
check "... with the new bytes" sh -c "[ '$(sha256sum </proc/"$BROKER"/exe)' = '$NEW_SUM' ] && [ '$NEW_SUM' != '$OLD_SUM' ]"
check "the shell is the same process" same_process "$SHELL_PID" "$SHELL_START"
check "the sleep is the same process" same_process "$SLEEP_PID" "$SLEEP_START"
check "the agent is the same process" same_process "$AGENT_PID" "$AGENT_START"
check "the broker, the shell, the sleep and the agent are in the same cgroups" \
	test "$(cgroups_of "$BROKER" "$SHELL_PID" "$SLEEP_PID" "$AGENT_PID")" = "$CGROUPS"
new_front() {
	local f
	f=$(pgrep -u stoa -f '__daemon' | head -1) || return 1
	[ "$f" != "$FRONT" ] && [ "$(ident /proc/"$f"/exe)" = "$(ident /usr/bin/stoa)" ]
}
wait_for "a new front on the new file" 30 new_front
echo "   ok: a new front ($(pgrep -u stoa -f '__daemon' | head -1)) runs the new file"
H=$(health)
check "/health: broker.upgrades is $((UPGRADES + 1))" test "$(jget "v['broker']['upgrades']" <<<"$H")" = $((UPGRADES + 1))
check "/health: broker.pid is still $BROKER" test "$(jget "v['broker']['pid']" <<<"$H")" = "$BROKER"
check "/health: broker.upgraded_at is set" test "$(jget "v['broker']['upgraded_at']" <<<"$H")" != null
check "/health: broker.started_at is unchanged" test "$(jget "v['broker']['started_at']" <<<"$H")" = "$STARTED_AT"
echo "   broker: $(jget "v['broker']" <<<"$H")"
# The viewer was cut when the user's worker was replaced; it reconnects from the last
# offset it had. Every line up to one printed after the upgrade, none lost or repeated.
NOW=$(cat "/home/$U/tick.now")
wait_for "the live viewer reconnected and shows tick $NOW" 60 has_tick "$W/live.out" "$NOW"
check "the live viewer has every line from tick 0 to $NOW once" ticks_complete "$W/live.out" "$NOW"
check "the live viewer is still attached" kill -0 "$LIVE"

phase "the task goes on and completes"
touch "$WT/go"
task_done() {
	local s
	s=$("$GOOD" task show "$TASK" --json | jget "v['status']")
	[ "$s" != running ] && [ "$s" != queued ]
}
wait_for "the task ends" 60 task_done
"$GOOD" task show "$TASK" --json >"$W/task.json"
check "the task completed" test "$(jget "v['status']" <"$W/task.json")" = completed
check "... with exit code 0" test "$(jget "v['exit_code']" <"$W/task.json")" = 0
"$GOOD" session log "$SESSION" --json >"$W/log.jsonl"
check "the agent's answer is recorded" grep -q 'Answered across the upgrade.' "$W/log.jsonl"
check "... once" test "$(grep -c 'Answered across the upgrade.' "$W/log.jsonl")" = 1

# ---------------------------------------------------------------------------------------
# still_serving WHAT: the old broker serves on: the same process on the same file, /health
# with no new upgrade, a new command, the user's processes.
still_serving() {
	check "$1: the unit is active, MainPID $BROKER" sh -c "systemctl is-active --quiet stoa.service && [ \"\$(systemctl show -p MainPID --value stoa.service)\" = $BROKER ]"
	check "$1: the broker still runs its file" test "$(ident /proc/"$BROKER"/exe)" = "$SERVING"
	check "$1: /health answers, upgrades still $((UPGRADES + 1))" \
		test "$(health | jget "v['broker']['upgrades']")" = $((UPGRADES + 1))
	check "$1: a new command runs" test "$("$GOOD" exec --user "$U" -- id -un)" = "$U"
	check "$1: the shell and the sleep are the same processes" \
		sh -c "[ \"\$(sed 's/.*) //' /proc/$SHELL_PID/stat | cut -d' ' -f20)\" = $SHELL_START ] && [ \"\$(sed 's/.*) //' /proc/$SLEEP_PID/stat | cut -d' ' -f20)\" = $SLEEP_START ]"
}
SERVING=$(ident /proc/"$BROKER"/exe)
# A new stoa whose CLI works (the good one), so ExecReload really asks the broker, and
# which cannot run the broker's state check.
cat >"$W/stoa-broken" <<BROKEN
#!/bin/sh
# packaging/test-upgrade-in-place.sh: a new stoa whose broker cannot start.
if [ "\$1" = daemon ]; then exec $GOOD "\$@"; fi
echo "stoa (broken test build): \$*" >&2
exit 1
BROKEN
chmod 0755 "$W/stoa-broken"

phase "2. a broken new binary: systemctl reload stoa"
install_binary "$W/stoa-broken"
cursor=$(journalctl -n 0 --show-cursor -q | sed -n 's/^-- cursor: //p')
reload_rc=0
systemctl reload stoa.service 2>"$W/reload.err" || reload_rc=$?
sed 's/^/   | /' "$W/reload.err"
check "systemctl reload stoa fails" test $reload_rc != 0
said_why() {
	journalctl -u stoa.service --after-cursor "$cursor" -o cat --no-pager >"$W/journal.txt"
	grep -q 'stoa daemon upgrade: .*not upgraded and keeps serving' "$W/journal.txt"
}
wait_for "the journal says the broker keeps serving, and why" 10 said_why
grep 'stoa daemon upgrade:' "$W/journal.txt" | sed 's/^/   journal: /'
still_serving "after the broken binary"

phase "3. a truncated ELF as the new binary: stoa daemon upgrade"
head -c 4096 "$GOOD" >"$W/stoa-truncated"
install_binary "$W/stoa-truncated"
up_rc=0
"$GOOD" daemon upgrade 2>"$W/upgrade.err" || up_rc=$?
sed 's/^/   | /' "$W/upgrade.err"
check "stoa daemon upgrade exits 1" test $up_rc = 1
check "it says the broker keeps serving" grep -q 'not upgraded and keeps serving' "$W/upgrade.err"
still_serving "after the truncated ELF"

phase "4. a package with the broken binary ($VERSION+up2), then a good one ($VERSION+up3)"
install_binary "$GOOD_INSTALLED"
repack "$VERSION+up2" "$W/stoa-broken" "$W/up2.deb"
dpkg_rc=0
dpkg -i "$W/up2.deb" >"$W/dpkg-2.txt" 2>&1 || dpkg_rc=$?
sed 's/^/   | /' "$W/dpkg-2.txt"
check "dpkg -i succeeds all the same" test $dpkg_rc = 0
check "the package is $VERSION+up2 (configured)" \
	test "$(dpkg-query -W -f='${Version} ${db:Status-Status}' stoa)" = "$VERSION+up2 installed"
check "the postinst says the old broker keeps serving" grep -q 'NOT upgraded in place' "$W/dpkg-2.txt"
check "... why" grep -q 'stoa daemon upgrade: .*keeps serving' "$W/dpkg-2.txt"
check "... and how to retry" grep -q 'retry: systemctl reload stoa' "$W/dpkg-2.txt"
still_serving "after the broken package"
printf '\0stoa upgrade test build 3' | cat "$GOOD" - >"$W/stoa-3"
repack "$VERSION+up3" "$W/stoa-3" "$W/up3.deb"
dpkg -i "$W/up3.deb" 2>&1 | tee "$W/dpkg-3.txt"
GOOD_INSTALLED=$W/stoa-3
check "the postinst says the broker was upgraded in place" grep -q 'was upgraded in place' "$W/dpkg-3.txt"
check "the unit's MainPID is the same ($BROKER)" test "$(main_pid)" = "$BROKER"
check "the broker runs the new /usr/bin/stoa" sh -c "[ \"\$(readlink /proc/$BROKER/exe)\" = /usr/bin/stoa ] && [ \"\$(stat -L -c %d:%i /proc/$BROKER/exe)\" = \"\$(stat -c %d:%i /usr/bin/stoa)\" ]"
check "/health: broker.upgrades is $((UPGRADES + 2))" test "$(health | jget "v['broker']['upgrades']")" = $((UPGRADES + 2))
check "the shell is the same process" same_process "$SHELL_PID" "$SHELL_START"
check "the sleep is the same process" same_process "$SLEEP_PID" "$SLEEP_START"

phase "5. every line the shell printed, for a new viewer and the live one"
"$GOOD" terminal attach --view "$TERM_ID" </dev/null >"$W/view.out" 2>"$W/view.err" &
VIEW=$!
NOW=$(cat "/home/$U/tick.now")
wait_for "a new viewer shows tick $NOW" 60 has_tick "$W/view.out" "$NOW"
stop_background "$VIEW"
VIEW=
check "a new viewer from offset 0 gets tick 0 to $NOW, none lost or repeated" ticks_complete "$W/view.out" "$NOW"
wait_for "the live viewer shows tick $NOW" 60 has_tick "$W/live.out" "$NOW"
check "the live viewer, attached through three upgrade attempts, has every line once" ticks_complete "$W/live.out" "$NOW"
stop_background "$LIVE"
LIVE=

phase "end the terminal"
"$GOOD" terminal kill "$TERM_ID"
TERM_ID=
gone() { ! kill -0 "$SHELL_PID" 2>/dev/null && ! kill -0 "$SLEEP_PID" 2>/dev/null; }
wait_for "the shell and the sleep end" 30 gone
echo "   ok: the shell and the sleep ended"
