#!/usr/bin/env bash
# Runs in the test VM (run-in-vm.sh; systemd as PID 1, pure cgroup v2): the .deb under the
# real unit. Installs it (the postinst starts stoa.service), checks the unit and where the
# broker sits in the cgroup tree, runs packaging/test-upgrade-in-place.sh (a user's
# terminal, viewer and agent task across `dpkg -i` of newer revisions, broken binaries),
# checks every process of the unit is still in it, and purges the package.
# Argument: the .deb (packaging/build.sh deb, on the host). Nothing here may be SKIPPED.
set -euo pipefail
cd "$(dirname "$0")/../.."
deb=${1:?usage: guest-upgrade.sh path/to/stoa.deb}
T0=$(date +%s)
note() { echo "== deb: $* (at +$(($(date +%s) - T0))s)"; }
fail() {
  echo "== deb: FAIL: $*" >&2
  journalctl -u stoa.service --no-pager -o cat -n 30 >&2 || true
  exit 1
}
[ "$(stat -fc %T /sys/fs/cgroup)" = cgroup2fs ] || fail "not a pure cgroup v2 machine"

note "dpkg -i $(basename "$deb")"
dpkg -i "$deb"
[ "$(systemctl is-active stoa.service)" = active ] || fail "stoa.service did not start"
main=$(systemctl show -p MainPID --value stoa.service)
unit=$(systemctl show -p ControlGroup --value stoa.service)
cg=$(sed -n 's/^0:://p' "/proc/$main/cgroup")
echo "   broker $main in $cg (the unit's cgroup: $unit)"
case $cg in "$unit"/*) ;; *) fail "the broker is not in a cgroup below its unit's" ;; esac
echo "   ok: the broker sits in a leaf below the unit (Delegate=yes)"

note "packaging/test-upgrade-in-place.sh"
packaging/test-upgrade-in-place.sh "$deb"

note "after the upgrades"
# (The test restarted the unit once, before its upgrades, for its config: a new pid.)
main=$(systemctl show -p MainPID --value stoa.service)
cg=$(sed -n 's/^0:://p' "/proc/$main/cgroup")
case $cg in "$unit"/stoa.*.broker) ;; *) fail "the upgraded broker $main is in $cg" ;; esac
echo "   ok: the upgraded broker ($main) is in its leaf, $cg"
strays=$(cat "/sys/fs/cgroup$unit/cgroup.procs")
[ -z "$strays" ] || fail "processes in the unit's own cgroup, beside its leaves: $strays"
echo "   ok: no process in the unit's own cgroup (v2: leaves only)"

note "dpkg -P"
dpkg -P stoa
[ "$(systemctl is-active stoa.service || true)" != active ] || fail "stoa.service still runs after the purge"
note "the package under systemd on cgroup v2: all passed"
