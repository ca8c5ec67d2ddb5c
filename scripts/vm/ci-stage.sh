#!/usr/bin/env bash
# .ci/run's cgroup v2 stage: stoa's cgroup tests (fork bomb, memory hog, nothing outlives a
# run, limits rewritten on reload, every run in its own cgroup), the clone3 test and the
# Landlock tests, as
# root in a pure cgroup-v2 VM (Debian trixie, systemd as PID 1: build-image.sh, cached).
# Then, in a second boot, the .deb under the real unit there: installed, upgraded in place
# with a user's work running, a broken binary refused, purged (guest-upgrade.sh). The .deb
# is STOA_VM_DEB (.ci/run builds it before this stage), else built here (packaging/build.sh).
# SKIPPED, with the reason, when qemu or the image (or cargo-deb, for the .deb part) cannot
# be had; any test that fails or says SKIPPED inside the VM fails the stage. Bounded: the
# VMs by STOA_VM_TIMEOUT (600 s) and STOA_VM_DEB_TIMEOUT (300 s).
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
part_started=$started
part() { # part WHAT: the time of the part that just ended
  local now
  now=$(date +%s)
  echo "cgroup v2 vm: $* ($((now - part_started)) s)" >&2
  part_started=$now
}
source scripts/vm/lib.sh
vm_install_tools 2>"$log" || { tail -n 20 "$log" >&2; skip "qemu-system-x86 or mmdebstrap cannot be installed (above)"; }
if ! img=$(scripts/vm/build-image.sh 2>"$log"); then
  tail -n 20 "$log" >&2
  skip "the VM image could not be built (above)"
fi
command -v qemu-system-x86_64 >/dev/null || skip "no qemu-system-x86_64"
part "image $img"

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
part "test binaries built"

STOA_VM_TIMEOUT=${STOA_VM_TIMEOUT:-600} scripts/vm/run-in-vm.sh scripts/vm/guest-tests.sh "$integration" "$clone3" "$landlock"
part "the cgroup, clone3 and Landlock tests passed"

# The package under systemd in the VM.
deb=${STOA_VM_DEB:-}
if [ -z "$deb" ]; then
  export PATH="$HOME/.cargo/bin:$PATH"
  if ! command -v cargo-deb >/dev/null && ! cargo install --locked cargo-deb >"$log" 2>&1; then
    tail -n 20 "$log" >&2
    echo "cgroup v2 vm: the .deb part SKIPPED: cargo-deb cannot be installed (above)" >&2
    echo "cgroup v2 vm: passed in $(($(date +%s) - started)) s (without the .deb part)" >&2
    exit 0
  fi
  packaging/build.sh deb >&2
  # shellcheck disable=SC2012 # our own file names
  deb=$PWD/$(ls -t target/packaging/debian/stoa_*.deb | head -1)
  part "built $deb"
fi
[ -f "$deb" ] || { echo "cgroup v2 vm: no .deb at $deb" >&2; exit 1; }
deb=$(realpath "$deb")
case $deb in
  "$PWD"/*) ;;
  *) # The VM sees the repository (shared): a .deb from elsewhere is copied in.
    mkdir -p target/vm-deb
    cp "$deb" target/vm-deb/
    deb=$PWD/target/vm-deb/$(basename "$deb") ;;
esac
STOA_VM_TIMEOUT=${STOA_VM_DEB_TIMEOUT:-300} scripts/vm/run-in-vm.sh scripts/vm/guest-upgrade.sh "$deb"
part "the .deb under systemd passed (upgrade in place)"
echo "cgroup v2 vm: passed in $(($(date +%s) - started)) s" >&2
