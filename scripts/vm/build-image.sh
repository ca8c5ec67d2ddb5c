#!/usr/bin/env bash
# Builds the pure cgroup-v2 test VM's image: Debian trixie with systemd as PID 1, the kernel
# and an initrd, and the unit that runs the host's command (guest/). Cached under
# $STOA_VM_CACHE/<hash of scripts/vm>; rebuilt only when these scripts change. Prints the
# image directory (vmlinuz, initrd.img, root.img).
set -euo pipefail
source "$(dirname "$0")/lib.sh"

out=$(vm_image_dir)
if [ -f "$out/ok" ]; then
  echo "$out"
  exit 0
fi
[ "$(id -u)" = 0 ] || { echo "build-image.sh: needs root (mmdebstrap --mode=root)" >&2; exit 1; }
vm_install_tools || { echo "build-image.sh: cannot install qemu/mmdebstrap" >&2; exit 1; }

mkdir -p "$STOA_VM_CACHE"
work=$(mktemp -d "$STOA_VM_CACHE/build.XXXXXX")
trap 'rm -rf "$work"' EXIT
root=$work/root

# What the integration tests call: useradd/userdel/groupadd (passwd), runuser and setpriv
# (util-linux), pkill (procps), getent (libc-bin), python3 for the runner, git (the Landlock
# test's worktree).
packages=(systemd systemd-sysv udev dbus kmod procps iproute2 util-linux passwd
  python3 linux-image-amd64 initramfs-tools ca-certificates git)
# initramfs: only what finds the root disk (virtio on PCI, ext4): 11 MB, not 36.
# machine-id: a fixed one, or every boot is a slow "first boot".
mmdebstrap --mode=root --variant=minbase --format=directory \
  --include="$(IFS=,; echo "${packages[*]}")" \
  --essential-hook='mkdir -p "$1/etc/initramfs-tools" && printf "virtio_pci\nvirtio_blk\next4\n" >"$1/etc/initramfs-tools/modules" && mkdir -p "$1/etc/initramfs-tools/conf.d" && echo MODULES=list >"$1/etc/initramfs-tools/conf.d/stoa-ci.conf"' \
  --customize-hook='echo 5eb0a1c1c1e84c6f9a2b0c0d0e0f1a2b >"$1/etc/machine-id"' \
  --customize-hook='echo stoa-ci-vm >"$1/etc/hostname"' \
  --customize-hook='echo "/dev/vda / ext4 rw,relatime 0 1" >"$1/etc/fstab"' \
  --customize-hook='install -m 0755 '"$VM_DIR"'/guest/stoa-ci-run "$1/usr/local/sbin/stoa-ci-run"' \
  --customize-hook='install -m 0644 '"$VM_DIR"'/guest/stoa-ci-run.service "$1/etc/systemd/system/stoa-ci-run.service"' \
  --customize-hook='chroot "$1" systemctl enable stoa-ci-run.service' \
  --customize-hook='chroot "$1" systemctl mask serial-getty@ttyS0.service serial-getty@ttyS1.service getty@tty1.service systemd-timesyncd.service apt-daily.timer apt-daily-upgrade.timer fstrim.timer e2scrub_all.timer e2scrub_reap.service systemd-networkd-wait-online.service' \
  --customize-hook='chroot "$1" passwd -d root' \
  trixie "$root" http://deb.debian.org/debian >&2

mkdir -p "$work/img"
cp -L "$root/vmlinuz" "$work/img/vmlinuz"
cp -L "$root/initrd.img" "$work/img/initrd.img"
rm -f "$root/vmlinuz" "$root/initrd.img" "$root/vmlinuz.old" "$root/initrd.img.old"
mkfs.ext4 -q -L stoa-ci -d "$root" "$work/img/root.img" 3G >&2
touch "$work/img/ok"
rm -rf "$out"
mv "$work/img" "$out"
# Older images (other hashes) go.
for d in "$STOA_VM_CACHE"/*/; do
  d=${d%/}
  case $d in "$out" | "$STOA_VM_CACHE/apt" | "$STOA_VM_CACHE"/build.*) ;; *) [ -f "$d/ok" ] && rm -rf "$d" ;; esac
done
echo "$out"
