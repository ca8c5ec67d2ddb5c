# Shared by the VM scripts (sourced). The cache lives outside the repository on purpose: it is
# a build product keyed by the scripts that make it, like cargo's target directory.
STOA_VM_CACHE=${STOA_VM_CACHE:-/var/cache/stoa-ci/vm}
VM_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

# The image key: a hash of everything that goes into the image.
vm_image_key() {
  (cd "$VM_DIR" && cat build-image.sh lib.sh guest/*) | sha256sum | cut -c1-16
}

vm_image_dir() {
  echo "$STOA_VM_CACHE/$(vm_image_key)"
}

# A private apt configuration: its own sources and lists, so /etc/apt stays as it is. dpkg's
# status is the machine's (installing qemu into the host needs it).
vm_apt_config() {
  local dir=$STOA_VM_CACHE/apt
  mkdir -p "$dir/lists/partial" "$dir/archives/partial"
  cat >"$dir/sources.list" <<SRC
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bookworm main
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bookworm-backports main
SRC
  cat >"$dir/apt.conf" <<CONF
Dir::Etc::SourceList "$dir/sources.list";
Dir::Etc::SourceParts "$dir/none";
Dir::State::Lists "$dir/lists";
Dir::Cache::Archives "$dir/archives";
CONF
  echo "$dir/apt.conf"
}

# qemu-system-x86 (bookworm-backports: bookworm's conflicts with the qemu-utils 10 found on
# these machines) and mmdebstrap, installed when missing.
vm_install_tools() {
  local want=() backports=()
  command -v qemu-system-x86_64 >/dev/null || backports+=(qemu-system-x86)
  command -v mmdebstrap >/dev/null || want+=(mmdebstrap)
  command -v mkfs.ext4 >/dev/null || want+=(e2fsprogs)
  [ ${#want[@]} -eq 0 ] && [ ${#backports[@]} -eq 0 ] && return 0
  local conf
  conf=$(vm_apt_config)
  export DEBIAN_FRONTEND=noninteractive
  APT_CONFIG=$conf apt-get update -q >&2 || return 1
  if [ ${#backports[@]} -gt 0 ]; then
    APT_CONFIG=$conf apt-get install -y -q --no-install-recommends -t bookworm-backports \
      "${backports[@]}" >&2 || return 1
  fi
  if [ ${#want[@]} -gt 0 ]; then
    APT_CONFIG=$conf apt-get install -y -q --no-install-recommends "${want[@]}" >&2 || return 1
  fi
}
