#!/bin/sh
# Runs in the test VM (run-in-vm.sh): stoa's cgroup and Landlock tests on cgroup v2.
# Arguments: the integration test binary, the executor's cgroup_v2 and landlock test
# binaries. A test that says SKIPPED fails here: on this machine every one of them must really run.
set -u
integration=$1
clone3=$2
landlock=$3
failed=0
export RUST_BACKTRACE=0
out=/tmp/stoa-vm-test.out
note() { echo "== $*"; }
check() { # name, exit code
  if [ "$2" != 0 ]; then
    note "FAILED: $1 (exit $2)"
    failed=1
  elif grep -q SKIPPED "$out"; then
    note "FAILED: $1 was SKIPPED on the cgroup v2 VM"
    failed=1
  fi
}
note "kernel $(uname -r), $(stat -fc %T /sys/fs/cgroup) at /sys/fs/cgroup: $(cat /sys/fs/cgroup/cgroup.controllers)"
note "clone3(CLONE_INTO_CGROUP): executor/tests/cgroup_v2.rs"
"$clone3" >"$out" 2>&1
rc=$?
cat "$out"
check cgroup_v2 $rc
note "Landlock on the kernel: executor/tests/landlock.rs"
"$landlock" >"$out" 2>&1
rc=$?
cat "$out"
check landlock $rc
for t in \
  fork_bomb_is_contained_by_the_users_cgroup \
  memory_hog_is_contained_by_the_users_cgroup \
  nothing_a_spawn_started_outlives_it \
  sighup_rewrites_every_users_cgroup_limits \
  each_run_starts_in_a_cgroup_of_its_own \
  exit_codes_signals_stdin_and_output_limit \
  health_reports_degradation_with_reasons \
  upgrade_in_place_keeps_every_users_work_and_a_broken_binary_changes_nothing \
  landlock_agents_write_only_where_allowed_and_exec_when_the_policy_says \
  landlock_a_confined_run_cannot_signal_its_users_other_processes \
  landlock_required_refuses_where_the_kernel_has_none \
  ${STOA_VM_EXTRA_TESTS:-}; do
  note "$t"
  "$integration" --exact "$t" --nocapture >"$out" 2>&1
  rc=$?
  grep -v '^$' "$out" | tail -n 25
  check "$t" $rc
done
[ $failed = 0 ] && note "cgroup v2 VM: all passed (cgroups, clone3, Landlock)"
exit $failed
