#!/usr/bin/env bash
# .ci/run's cgroup v2 stage: stoa's cgroup tests (fork bomb, memory hog, nothing outlives a
# run, limits rewritten on reload, every run in its own cgroup), the clone3 test and the
# Landlock tests, as
# root in a pure cgroup-v2 VM (Debian trixie, systemd as PID 1: build-image.sh, cached).
# SKIPPED, with the reason, when qemu or the image cannot be had; any test that fails or
# says SKIPPED inside the VM fails the stage. Bounded: the VM by STOA_VM_TIMEOUT (600 s).
set -euo pipefail
cd "$(dirname "$0")/../.."
skip() {
  echo "cgroup v2 vm: SKIPPED: $*" >&2
  exit 0
}
[ "$(uname -m)" = x86_64 ] || skip "the test VM is x86_64 only"
[ "$(id -u)" = 0 ] || skip "building the image needs root"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
started=$(date +%s)
source scripts/vm/lib.sh
vm_install_tools 2>"$log" || { tail -n 20 "$log" >&2; skip "qemu-system-x86 or mmdebstrap cannot be installed (above)"; }
if ! img=$(scripts/vm/build-image.sh 2>"$log"); then
  tail -n 20 "$log" >&2
  skip "the VM image could not be built (above)"
fi
command -v qemu-system-x86_64 >/dev/null || skip "no qemu-system-x86_64"
echo "cgroup v2 vm: image $img ($(($(date +%s) - started)) s)" >&2

# The test binaries, built here (the VM has no cargo): their paths from cargo's own
# messages.
cargo build -p stoa-executor
executable() {
  cargo test "$@" --no-run --message-format=json |
    python3 -c 'import json,sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["profile"]["test"]:
        print(m["executable"])' | tail -n 1
}
integration=$(executable --test integration)
clone3=$(executable -p stoa-executor --test cgroup_v2)
landlock=$(executable -p stoa-executor --test landlock)
[ -x "$integration" ] && [ -x "$clone3" ] && [ -x "$landlock" ] || { echo "cgroup v2 vm: test binaries not found" >&2; exit 1; }
# The guest has no C compiler: the seccomp wrapper the Landlock `required` test runs stoa
# under is built here.
export STOA_TEST_WITHOUT_LANDLOCK=$PWD/target/without-landlock
cc -O2 -o "$STOA_TEST_WITHOUT_LANDLOCK" tests/tools/without-landlock.c

STOA_VM_TIMEOUT=${STOA_VM_TIMEOUT:-600} scripts/vm/run-in-vm.sh scripts/vm/guest-tests.sh "$integration" "$clone3" "$landlock"
echo "cgroup v2 vm: passed in $(($(date +%s) - started)) s" >&2
