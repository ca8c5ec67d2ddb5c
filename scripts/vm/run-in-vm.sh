#!/usr/bin/env bash
# run-in-vm.sh CMD [ARGS...]: runs CMD as root in the pure cgroup-v2 test VM (Debian trixie,
# systemd as PID 1; build-image.sh) and exits with its exit code. Usable as a cargo runner:
#   CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUNNER=scripts/vm/run-in-vm.sh cargo test ...
# The repository (and CARGO_TARGET_DIR, the working directory and CMD's directory when they
# lie outside it) is shared at the same absolute path over 9p, writable. The disk is a
# snapshot: nothing the command does to the guest's own files survives. The environment is
# passed on, less what describes the host's session (PATH, HOME, TERM...). Output: the
# command's stdout and stderr, together, on this script's stdout.
#   STOA_VM_TIMEOUT  seconds for the whole VM (default 900)
#   STOA_VM_MEM      guest memory in MiB (default 2048)
#   STOA_VM_CONSOLE  where to keep the guest's console log (default: printed on failure)
set -euo pipefail
source "$(dirname "$0")/lib.sh"
[ $# -ge 1 ] || { echo "usage: run-in-vm.sh CMD [ARGS...]" >&2; exit 2; }

img=$(vm_image_dir)
if [ ! -f "$img/ok" ]; then
  img=$("$VM_DIR/build-image.sh") || { echo "run-in-vm.sh: no VM image" >&2; exit 125; }
fi
command -v qemu-system-x86_64 >/dev/null || { echo "run-in-vm.sh: no qemu-system-x86_64" >&2; exit 125; }

ctl=$(mktemp -d /tmp/stoa-vm.XXXXXX)
trap 'rm -rf "$ctl"' EXIT

# What to share: the repository, and what lies outside it.
repo=$(cd "$VM_DIR/../.." && pwd -P)
shares=("$repo")
add_share() {
  local p
  p=$(cd "$1" 2>/dev/null && pwd -P) || return 0
  for s in "${shares[@]}"; do
    case "$p/" in "$s"/*) return 0 ;; esac
  done
  shares+=("$p")
}
[ -n "${CARGO_TARGET_DIR:-}" ] && add_share "$CARGO_TARGET_DIR"
add_share "$PWD"
case $1 in /*) add_share "$(dirname "$1")" ;; esac
virtfs=()
: >"$ctl/mounts"
i=0
for s in "${shares[@]}"; do
  virtfs+=(-virtfs "local,path=$s,mount_tag=share$i,security_model=passthrough,multidevs=remap")
  echo "share$i $s" >>"$ctl/mounts"
  i=$((i + 1))
done
pwd -P >"$ctl/cwd"
printf '%s\0' "$@" >"$ctl/argv"
env -0 | grep -zv -E '^(PATH|HOME|PWD|OLDPWD|SHLVL|_|TERM|SHELL|USER|LOGNAME|MAIL|TMPDIR|DISPLAY|LS_COLORS|SSH_[A-Z_]*|XDG_[A-Z_]*|CARGO_TARGET_[A-Z0-9_]*_RUNNER)=' >"$ctl/env" || true

# TCG where KVM is nested without hardware support (kvm_pvm: stock kernels fail there).
if [ -w /dev/kvm ] && [ ! -d /sys/module/kvm_pvm ]; then
  accel=(-accel kvm -cpu host)
else
  accel=(-accel tcg,thread=multi,tb-size=256 -cpu max,-svm)
fi

set +e
timeout -k 10 "${STOA_VM_TIMEOUT:-900}" qemu-system-x86_64 \
  "${accel[@]}" -machine q35 -smp 2 -m "${STOA_VM_MEM:-2048}" \
  -kernel "$img/vmlinuz" -initrd "$img/initrd.img" \
  -append "root=/dev/vda rw console=ttyS0 panic=1 quiet systemd.unified_cgroup_hierarchy=1 systemd.show_status=0" \
  -drive "file=$img/root.img,format=raw,if=virtio,snapshot=on" \
  "${virtfs[@]}" -virtfs "local,path=$ctl,mount_tag=stoa-ctl,security_model=passthrough" \
  -nic none -display none -monitor none -no-reboot \
  -serial "file:$ctl/console.log" -serial stdio </dev/null | cat
qemu=${PIPESTATUS[0]}
set -e
if [ -f "$ctl/rc" ]; then
  rc=$(cat "$ctl/rc")
  [ -n "${STOA_VM_CONSOLE:-}" ] && cp "$ctl/console.log" "$STOA_VM_CONSOLE"
  exit "$rc"
fi
echo "run-in-vm.sh: the VM gave no exit code (qemu: $qemu$([ "$qemu" = 124 ] && echo ', timed out')); its console:" >&2
tail -n 40 "$ctl/console.log" >&2 || true
exit 125
