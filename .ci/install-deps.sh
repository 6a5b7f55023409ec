#!/usr/bin/env bash
# Installs everything the tests, benchmarks and demo need on a fresh Debian 12 machine.
# Idempotent: a second run only checks. Run as root.
set -euo pipefail

need_apt=()
# socat and dash: the console tests run real shells on a pty behind a Unix socket; qemu-ga: the
# guest agent tests run it on the host, and the test guest carries it. sfdisk, grub-mkimage:
# the Debian test guest's partitioned, bootable disk. passt: a guest's opt-in outbound network.
for bin in fusermount3 xdelta3 xz zstd nginx debootstrap mkfs.ext4 cpio busybox curl ip virsh libvirtd \
  socat dash qemu-ga sfdisk grub-mkimage unshare flock passt; do
  command -v "$bin" >/dev/null 2>&1 || need_apt+=("$bin")
done
# The Debian test guest (tools/guest/build-debian.sh) installs GRUB into its disk image file.
[ -x /usr/lib/grub/i386-pc/grub-bios-setup ] || need_apt+=(grub-pc-bin)
# libvirt-dev: headers and pkg-config file the `libvirt` cargo feature builds against.
[ -e /usr/include/libvirt/libvirt.h ] || need_apt+=(libvirt-dev)
qemu_ok=false
if command -v qemu-system-x86_64 >/dev/null 2>&1 &&
  qemu-system-x86_64 --version | grep -Eq 'version (9|1[0-9])\.'; then
  qemu_ok=true
fi

if [ ${#need_apt[@]} -gt 0 ] || [ "$qemu_ok" = false ]; then
  export DEBIAN_FRONTEND=noninteractive
  # QEMU 10 comes from bookworm-backports (same mirror as the existing entries).
  if ! grep -rqs bookworm-backports /etc/apt/sources.list /etc/apt/sources.list.d/; then
    uri=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
    uri=${uri:-http://deb.debian.org/debian}
    cat >/etc/apt/sources.list.d/backports.sources <<SRC
Types: deb
URIs: $uri
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
  fi
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends \
    fuse3 xdelta3 xz-utils zstd nginx-light debootstrap e2fsprogs cpio busybox-static curl \
    iproute2 socat dash qemu-guest-agent fdisk grub-pc-bin util-linux passt >/dev/null
  apt-get install -y -qq --no-install-recommends -t bookworm-backports \
    qemu-system-x86 qemu-utils >/dev/null
  # The optional libvirt backend (tests run it). Without recommends it pulls in no QEMU of
  # its own; the check below makes sure QEMU is still the backports one.
  apt-get install -y -qq --no-install-recommends \
    libvirt-daemon-system libvirt-dev libvirt-clients >/dev/null
fi
# Debian's udev rule gives /dev/kvm to group kvm, mode 0660. Without udev (containers) it stays
# root-only; libvirt 9 then sees KVM usable when probing QEMU but not for its libvirt-qemu
# user, and re-probes QEMU on every domain start (about 45 s each). Apply the udev default.
if [ -c /dev/kvm ] && getent group kvm >/dev/null && [ "$(stat -c %a /dev/kvm)" = 600 ]; then
  chgrp kvm /dev/kvm && chmod 0660 /dev/kvm
fi
qemu-system-x86_64 --version | head -1
if ! qemu-system-x86_64 --version | grep -Eq 'version (9|1[0-9])\.'; then
  echo "error: qemu-system-x86_64 is older than 9 (installing libvirt replaced it?)" >&2
  exit 1
fi
