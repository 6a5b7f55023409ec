#!/usr/bin/env bash
# build-debian.sh OUTDIR — build a stock Debian bookworm guest for cloudlet's tests and
# benchmarks with debootstrap from Debian's mirror. Run as root.
#
# Output (in OUTDIR; tests use <workspace>/target/guest-cache/debian-bookworm):
#   disk.img      raw disk, 2 GiB sparse: MBR partition table, partition 1 (from 1 MiB, type
#                 83, bootable) is the ext4 root (label cloudlet-root); GRUB (BIOS) in the MBR
#                 and the gap before partition 1, so the disk boots by itself as well
#   vmlinuz       the guest's own kernel (linux-image-cloud-amd64), from its /boot
#   initrd.img    the guest's own initramfs (initramfs-tools), from its /boot
#   packages.txt  every installed package and version (dpkg-query)
#   guest.json    manifest: what is inside and how to boot it (written last: it marks a
#                 complete build; its content_key says which recipe built it)
#   debs/         downloaded .debs, kept so a rebuild downloads only what changed
#   build.log     the last build's detailed output
#
# The guest: systemd as init (journal in RAM), root autologin on the serial console ttyS0 with
# bash (prompt "root@cloudlet-debian:~# "), static address 10.0.2.15/24 via 10.0.2.2 for QEMU
# user networking (systemd-networkd), qemu-guest-agent (started by udev only when the
# virtio-serial port org.qemu.guest_agent.0 exists, so it never delays a boot without it),
# cloud-init for local seeds (NoCloud, ConfigDrive; ds-identify disables it at boot when no seed
# is attached), python3 with Flask and numpy, ca-certificates, fstrim (util-linux). Root is
# mounted without `discard`: TRIM reaches the disk when fstrim runs. No recommends, no docs,
# no apt caches or lists. Timers that would change the disk at random times (apt-daily,
# fstrim, e2scrub) are disabled so customizations and overlays stay repeatable.
#
# Boot either way:
#   direct kernel boot: -kernel vmlinuz -initrd initrd.img -append "<cmdline from guest.json>"
#   own bootloader:     just the disk (SeaBIOS -> GRUB -> /vmlinuz, /initrd.img of the guest)
# Both use root=LABEL=cloudlet-root.
#
# Cached: if OUTDIR/guest.json records the content key of this recipe (a SHA-256 of this
# script, which holds the package list and every setting) and the files are there, nothing is
# rebuilt. Concurrent runs are serialized with flock on OUTDIR/.lock.
# Needs: debootstrap, e2fsprogs, fdisk (sfdisk), grub-pc-bin, grub-common, util-linux.
# Env: CLOUDLET_DEBIAN_MIRROR (default: the host's apt mirror, else deb.debian.org),
#      CLOUDLET_DEBIAN_SECURITY_MIRROR (default: the host's, else deb.debian.org).
set -euo pipefail

SUITE=bookworm
GUEST_HOSTNAME=cloudlet-debian
ROOT_LABEL=cloudlet-root
# Fixed identifiers: rebuilding gives the same UUIDs, and the manifest can name them.
ROOT_UUID=6c6f7564-6c65-7444-6562-69616e000001
ROOT_HASH_SEED=6c6f7564-6c65-7444-6562-69616e000002
DISK_ID=0x636c6431
DISK_MB=2048
PART_START_MIB=1
GUEST_IP=10.0.2.15
GUEST_PREFIX=24
GUEST_GW=10.0.2.2
GUEST_DNS=10.0.2.3
READY_PROMPT="root@$GUEST_HOSTNAME:~#"
MEMORY_MB=512
# quiet: a short serial log; panic=-1 with QEMU's -no-reboot ends QEMU on a guest panic.
CMDLINE="root=LABEL=$ROOT_LABEL ro console=ttyS0 quiet panic=-1"
AGENT_PORT=org.qemu.guest_agent.0
# Modules the initramfs must hold (unless built in) so the root disk mounts.
ROOT_MODULES=(virtio_pci virtio_blk ext4)

# What is installed on top of `debootstrap --variant=minbase`, without recommends.
PACKAGES=(
    systemd systemd-sysv       # init
    udev                       # device units: the serial getty waits for dev-ttyS0.device
    linux-image-cloud-amd64    # kernel; virtio is modular in it (see ROOT_MODULES)
    qemu-guest-agent
    cloud-init
    python3 python3-flask python3-numpy
    ca-certificates
    iproute2                   # `ip`, for customization scripts and debugging
)
# Units disabled in the image: timers that would change the disk at random times (see above),
# e2scrub_reap (LVM snapshots: none here) and networkd-wait-online (the address is static).
DISABLED_UNITS=(apt-daily.timer apt-daily-upgrade.timer fstrim.timer e2scrub_all.timer
                e2scrub_reap.service systemd-networkd-wait-online.service)
# Masked: getty-static starts gettys on tty2-tty6 when there is no logind (no dbus here); the
# guest's console is the serial port.
MASKED_UNITS=(getty-static.service)

SCRIPT=$(realpath "${BASH_SOURCE[0]}")
log() { printf '[build-debian %5ss] %s\n' "$SECONDS" "$*" >&2; }
die() { printf 'build-debian: error: %s\n' "$*" >&2; exit 1; }
# Exit status 3: this machine cannot build the guest (callers such as tests skip on it).
unable() { printf 'build-debian: cannot build here: %s\n' "$*" >&2; exit 3; }

[[ $# -eq 1 && $1 != -* ]] || { echo "usage: build-debian.sh OUTDIR" >&2; exit 2; }
OUTDIR=$1
KEY=$(sha256sum "$SCRIPT" | cut -d' ' -f1)

# A build is complete when guest.json (written last) carries this recipe's key and the files
# it names are there.
complete() {
    [[ -f $OUTDIR/guest.json ]] && grep -q "\"content_key\": \"$KEY\"" "$OUTDIR/guest.json" \
        && [[ -f $OUTDIR/disk.img && -f $OUTDIR/vmlinuz && -f $OUTDIR/initrd.img ]]
}
print_paths() {
    echo "guest dir: $OUTDIR"
    echo "disk:      $OUTDIR/disk.img"
    echo "kernel:    $OUTDIR/vmlinuz"
    echo "initrd:    $OUTDIR/initrd.img"
    echo "cmdline:   $CMDLINE"
    echo "manifest:  $OUTDIR/guest.json"
}

if complete; then
    log "cached build is up to date (key ${KEY:0:12})"
    print_paths
    exit 0
fi

[[ $(id -u) == 0 ]] || unable "must run as root (debootstrap, chroot)"
for tool in debootstrap chroot mount umount unshare mkfs.ext4 e2fsck sfdisk grub-mkimage \
            flock sha256sum dd truncate; do
    command -v "$tool" >/dev/null || unable "missing tool: $tool (see .ci/install-deps.sh)"
done
GRUB_DIR=/usr/lib/grub/i386-pc
[[ -x $GRUB_DIR/grub-bios-setup && -f $GRUB_DIR/boot.img ]] \
    || unable "missing $GRUB_DIR/grub-bios-setup: install grub-pc-bin"

# Build in a private mount namespace: the chroot's mounts are invisible to the rest of the
# machine and vanish with this process, even when it is killed.
if [[ -z ${CLOUDLET_BUILD_DEBIAN_NS:-} ]]; then
    unshare --mount true 2>/dev/null || unable "cannot make a mount namespace (unshare --mount)"
    CLOUDLET_BUILD_DEBIAN_NS=1 exec unshare --mount --propagation private "$SCRIPT" "$OUTDIR"
fi

mkdir -p "$OUTDIR"
OUTDIR=$(realpath "$OUTDIR")
exec 9>"$OUTDIR/.lock"
flock 9
# Another run may have finished the build while this one waited for the lock.
if complete; then
    log "built by a concurrent run"
    print_paths
    exit 0
fi

# The mirror apt on this host uses (CI machines point at the one they can reach).
host_uri() { # $1 = suite to look for
    awk -v suite="$1" '
        /^URIs:/ { uri = $2 }
        /^Suites:/ { for (i = 2; i <= NF; i++) if ($i == suite) { print uri; exit } }
        /^deb / { for (i = 3; i <= NF; i++) if ($i == suite) { print $2; exit } }
    ' /etc/apt/sources.list.d/*.sources /etc/apt/sources.list 2>/dev/null | head -n1
}
MIRROR=${CLOUDLET_DEBIAN_MIRROR:-$(host_uri "$SUITE")}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
SECURITY_MIRROR=${CLOUDLET_DEBIAN_SECURITY_MIRROR:-$(host_uri "$SUITE-security")}
SECURITY_MIRROR=${SECURITY_MIRROR:-http://deb.debian.org/debian-security}

# Invalidate the old build first: a half-replaced OUTDIR must never look complete.
rm -f "$OUTDIR/guest.json"
# Leftovers of an interrupted build (their mounts died with its namespace; the lock is ours).
for old in "$OUTDIR"/.build.*; do
    [[ -e $old ]] || continue
    if findmnt -rn -o TARGET | grep -qF "$old/"; then
        die "$old still has mounts from an interrupted build; unmount them first"
    fi
    rm -rf --one-file-system "$old"
done
WORK=$(mktemp -d "$OUTDIR/.build.XXXXXX")
ROOT=$WORK/rootfs
BUILD_LOG=$OUTDIR/build.log
: >"$BUILD_LOG"

# Cleanup never removes files through a live mount (the chroot has the host's /dev bound in).
MOUNTS=()
cleanup() {
    local i m
    for ((i = ${#MOUNTS[@]} - 1; i >= 0; i--)); do
        m=${MOUNTS[i]}
        if mountpoint -q "$m"; then umount "$m" 2>/dev/null || umount -l "$m" || true; fi
    done
    if findmnt -rn -o TARGET | grep -qF "$WORK/"; then
        echo "build-debian: $WORK still has mounts, not removed" >&2
    else
        rm -rf --one-file-system "$WORK"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Runs a command quietly; on failure shows the end of the log.
run() {
    printf '+ %s\n' "$*" >>"$BUILD_LOG"
    if ! "$@" >>"$BUILD_LOG" 2>&1; then
        tail -n 40 "$BUILD_LOG" >&2
        die "failed: $* (full output in $BUILD_LOG)"
    fi
}
in_root() {
    run chroot "$ROOT" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root \
        LANG=C.UTF-8 DEBIAN_FRONTEND=noninteractive "$@"
}
apt_in_root() {
    in_root apt-get -q -y -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
        --no-install-recommends "$@"
}
mount_chroot() {
    mount -t proc proc "$ROOT/proc"
    MOUNTS+=("$ROOT/proc")
    mount -t sysfs sysfs "$ROOT/sys"
    MOUNTS+=("$ROOT/sys")
    mount --bind /dev "$ROOT/dev"
    MOUNTS+=("$ROOT/dev")
    mount -t devpts -o newinstance,ptmxmode=0666 devpts "$ROOT/dev/pts"
    MOUNTS+=("$ROOT/dev/pts")
}
umount_chroot() {
    local m
    for m in dev/pts dev sys proc; do umount "$ROOT/$m"; done
    MOUNTS=()
}

DEBS=$OUTDIR/debs
mkdir -p "$DEBS"
t_build=$SECONDS

# ---------------------------------------------------------------- 1. debootstrap
log "debootstrap --variant=minbase $SUITE from $MIRROR"
run debootstrap --variant=minbase --cache-dir="$DEBS" "$SUITE" "$ROOT" "$MIRROR"
mount_chroot

# ---------------------------------------------------------------- 2. packages
log "apt: ${PACKAGES[*]}"
# The guest's own apt sources: the release, its point updates and security updates.
rm -f "$ROOT/etc/apt/sources.list"
cat >"$ROOT/etc/apt/sources.list.d/debian.sources" <<EOF
Types: deb
URIs: $MIRROR
Suites: $SUITE $SUITE-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: $SECURITY_MIRROR
Suites: $SUITE-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
# No daemons start in the build chroot.
printf '#!/bin/sh\n# build chroot: no daemons\nexit 101\n' >"$ROOT/usr/sbin/policy-rc.d"
chmod 755 "$ROOT/usr/sbin/policy-rc.d"
# No documentation, manuals or translations, now or when a customization installs more
# (copyright files stay).
cat >"$ROOT/etc/dpkg/dpkg.cfg.d/01-cloudlet-nodoc" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/groff/*
path-exclude /usr/share/lintian/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
EOF
shopt -s nullglob
cached=("$DEBS"/*.deb)
if ((${#cached[@]})); then cp "${cached[@]}" "$ROOT/var/cache/apt/archives/"; fi
in_root apt-get -q update
apt_in_root dist-upgrade
# initramfs-tools first, so the module list is in place before the kernel's initramfs is made.
apt_in_root install initramfs-tools
printf '%s\n' "# cloudlet: the root disk's drivers (virtio is modular in the cloud kernel)" \
    "${ROOT_MODULES[@]}" >>"$ROOT/etc/initramfs-tools/modules"
apt_in_root install "${PACKAGES[@]}"
new=("$ROOT"/var/cache/apt/archives/*.deb)
if ((${#new[@]})); then cp -n "${new[@]}" "$DEBS/"; fi
shopt -u nullglob
in_root apt-get clean

# ---------------------------------------------------------------- 3. configuration
log "configuring the guest"
echo "$GUEST_HOSTNAME" >"$ROOT/etc/hostname"
cat >"$ROOT/etc/hosts" <<EOF
127.0.0.1	localhost
127.0.1.1	$GUEST_HOSTNAME
::1		localhost ip6-localhost ip6-loopback
EOF
# No discard: the guest trims with fstrim, so TRIM reaches the disk at known times.
cat >"$ROOT/etc/fstab" <<EOF
# <file system>	<mount point>	<type>	<options>	<dump>	<pass>
LABEL=$ROOT_LABEL	/	ext4	defaults,errors=remount-ro	0	1
EOF
# Static network for QEMU user networking on whatever the NIC is called.
cat >"$ROOT/etc/systemd/network/10-qemu-user.network" <<EOF
[Match]
Type=ether

[Network]
Address=$GUEST_IP/$GUEST_PREFIX
Gateway=$GUEST_GW
DNS=$GUEST_DNS
LinkLocalAddressing=no
IPv6AcceptRA=no
EOF
echo "nameserver $GUEST_DNS" >"$ROOT/etc/resolv.conf"
# glibc's built-in locale. Without a system locale cloud-init, when a seed runs it, sets
# en_US.UTF-8, which is not generated here, and reports an error.
echo "LANG=C.UTF-8" >"$ROOT/etc/default/locale"
# Root autologin on the serial console.
mkdir -p "$ROOT/etc/systemd/system/serial-getty@ttyS0.service.d"
cat >"$ROOT/etc/systemd/system/serial-getty@ttyS0.service.d/autologin.conf" <<'EOF'
[Service]
ExecStart=
ExecStart=-/sbin/agetty --autologin root --keep-baud 115200,57600,38400,9600 - $TERM
EOF
mkdir -p "$ROOT/etc/systemd/journald.conf.d"
printf '[Journal]\nStorage=volatile\n' >"$ROOT/etc/systemd/journald.conf.d/cloudlet.conf"
# cloud-init: local seeds only (NoCloud: a file system labelled CIDATA, or ds=nocloud[-net];s=…
# on the kernel command line or in the SMBIOS serial number; ConfigDrive: a file system
# labelled config-2), and it leaves the static network above alone. Two entries on purpose: with a single one, ds-identify enables it without
# looking for a seed; with two it looks, finds none and disables cloud-init for that boot.
cat >"$ROOT/etc/cloud/cloud.cfg.d/90-cloudlet.cfg" <<'EOF'
datasource_list: [ NoCloud, ConfigDrive ]
network: {config: disabled}
EOF
in_root systemctl enable systemd-networkd.service serial-getty@ttyS0.service
for unit in "${DISABLED_UNITS[@]}"; do
    [[ -e $ROOT/lib/systemd/system/$unit ]] || die "no unit $unit to disable (package list changed?)"
done
in_root systemctl disable "${DISABLED_UNITS[@]}"
in_root systemctl mask "${MASKED_UNITS[@]}"

# GRUB reads this when the disk boots by itself; /vmlinuz and /initrd.img are the links the
# kernel package maintains in /.
mkdir -p "$ROOT/boot/grub"
cat >"$ROOT/boot/grub/grub.cfg" <<EOF
serial --unit=0 --speed=115200
terminal_input serial console
terminal_output serial console
set timeout=0
menuentry "Debian $SUITE (cloudlet)" {
    linux /vmlinuz $CMDLINE
    initrd /initrd.img
}
EOF

# ---------------------------------------------------------------- 4. checks, clean-up
KVER=$(basename "$(realpath "$ROOT/vmlinuz")"); KVER=${KVER#vmlinuz-}
[[ -f $ROOT/boot/vmlinuz-$KVER && -f $ROOT/boot/initrd.img-$KVER ]] \
    || die "no kernel/initrd for $KVER in the guest's /boot"
[[ -e $ROOT/initrd.img ]] || die "no /initrd.img link in the guest"
# Every root module must be built in or be in the initramfs.
initrd_list=$(chroot "$ROOT" lsinitramfs "/boot/initrd.img-$KVER")
for m in "${ROOT_MODULES[@]}"; do
    if grep -q "/$m.ko" "$ROOT/lib/modules/$KVER/modules.builtin"; then continue; fi
    grep -q "/$m\.ko" <<<"$initrd_list" || die "initramfs lacks $m.ko"
done
[[ -x $ROOT/usr/sbin/fstrim && -x $ROOT/usr/sbin/qemu-ga ]] || die "fstrim or qemu-ga missing"
# Recorded after the chroot's last change.
# shellcheck disable=SC2016  # dpkg-query's format, not shell
chroot "$ROOT" dpkg-query -W -f '${Package}\t${Version}\n' >"$WORK/packages.txt"
umount_chroot
rm -f "$ROOT/usr/sbin/policy-rc.d"
# A fresh machine id on every first boot of a copy (empty file, as Debian's cloud images do:
# not "first boot", so no preset-all).
: >"$ROOT/etc/machine-id"
rm -f "$ROOT/var/lib/dbus/machine-id" "$ROOT/var/lib/systemd/random-seed"
rm -rf "$ROOT"/var/lib/apt/lists/* "$ROOT"/var/cache/apt/*.bin "$ROOT"/var/cache/debconf/*-old \
    "$ROOT"/var/log/apt/* "$ROOT"/tmp/* "$ROOT"/var/tmp/* "$ROOT"/root/.bash_history
: >"$ROOT/var/log/dpkg.log"
find "$ROOT/usr/share/doc" -mindepth 1 ! -type d ! -name copyright -delete
find "$ROOT/usr/share/doc" -mindepth 1 -type d -empty -delete
rm -rf "$ROOT"/usr/share/man/* "$ROOT"/usr/share/info/* "$ROOT"/usr/share/groff/* \
    "$ROOT"/usr/share/lintian/*
find "$ROOT/usr/share/locale" -mindepth 1 -maxdepth 1 ! -name locale.alias -exec rm -rf {} +
cp "$ROOT/boot/vmlinuz-$KVER" "$WORK/vmlinuz"
cp "$ROOT/boot/initrd.img-$KVER" "$WORK/initrd.img"
log "rootfs: $(du -sm "$ROOT" | cut -f1) MiB, kernel $KVER"

# ---------------------------------------------------------------- 5. disk image
log "disk image: ${DISK_MB} MiB, ext4 root from ${PART_START_MIB} MiB, GRUB (BIOS)"
# Our own mke2fs.conf: the same ext4 features whatever the host's defaults (GRUB 2.06 cannot
# read file systems with newer features such as orphan_file or metadata_csum_seed).
cat >"$WORK/mke2fs.conf" <<'EOF'
[defaults]
	base_features = sparse_super,large_file,filetype,resize_inode,dir_index,ext_attr
	default_mntopts = acl,user_xattr
	blocksize = 4096
	inode_size = 256
	inode_ratio = 16384
[fs_types]
	ext4 = {
		features = has_journal,extent,huge_file,flex_bg,metadata_csum,64bit,dir_nlink,extra_isize
	}
EOF
PART_MB=$((DISK_MB - PART_START_MIB))
truncate -s "${PART_MB}M" "$WORK/root.img"
MKE2FS_CONFIG=$WORK/mke2fs.conf E2FSPROGS_FAKE_TIME=1700000000 run mkfs.ext4 -q -F -t ext4 \
    -L "$ROOT_LABEL" -U "$ROOT_UUID" -E "hash_seed=$ROOT_HASH_SEED,root_owner=0:0" \
    -d "$ROOT" "$WORK/root.img"
run e2fsck -fn "$WORK/root.img"
truncate -s "${DISK_MB}M" "$WORK/disk.img"
run sfdisk --no-reread --no-tell-kernel "$WORK/disk.img" <<EOF
label: dos
label-id: $DISK_ID
start=$((PART_START_MIB * 2048)), type=83, bootable
EOF
run dd if="$WORK/root.img" of="$WORK/disk.img" bs=1M seek="$PART_START_MIB" conv=sparse,notrunc
rm -f "$WORK/root.img"
# GRUB without a loop device: a core image holding every module it needs (the disk has no
# /boot/grub/i386-pc), written into the MBR and the gap before partition 1 by grub-bios-setup,
# which takes an image file as the disk through a device map. grub-bios-setup also insists on
# finding the disk that holds its --directory (from /proc/self/mountinfo); a small tmpfs whose
# mount source is the image's own path makes that the image itself.
GRUB_MODULES=(biosdisk part_msdos ext2 normal linux configfile serial terminal echo test)
mkdir -p "$WORK/grub"
mount -t tmpfs -o size=4m,mode=0700 "$WORK/disk.img" "$WORK/grub"
MOUNTS+=("$WORK/grub")
run grub-mkimage -O i386-pc -d "$GRUB_DIR" -o "$WORK/grub/core.img" \
    -p "(hd0,msdos1)/boot/grub" "${GRUB_MODULES[@]}"
cp "$GRUB_DIR/boot.img" "$WORK/grub/boot.img"
echo "(hd0) $WORK/disk.img" >"$WORK/grub/device.map"
run "$GRUB_DIR/grub-bios-setup" --directory="$WORK/grub" --device-map="$WORK/grub/device.map" \
    --skip-fs-probe "$WORK/disk.img"
# GRUB's core image starts at sector 1, and the partition table survived.
cmp -s -n 500 "$WORK/grub/core.img" <(dd if="$WORK/disk.img" bs=512 skip=1 count=1 status=none) \
    || die "grub-bios-setup did not embed core.img after the MBR"
umount "$WORK/grub"
MOUNTS=()
sfdisk --dump "$WORK/disk.img" | grep -q "start= *$((PART_START_MIB * 2048)),.*type=83, bootable" \
    || die "partition table lost while installing GRUB"

# ---------------------------------------------------------------- 6. publish
json_list() { local s="" x; for x in "$@"; do s+="${s:+, }\"$x\""; done; printf '[%s]' "$s"; }
cat >"$WORK/guest.json" <<EOF
{
  "content_key": "$KEY",
  "distribution": "debian",
  "suite": "$SUITE",
  "built": "$(date -u +%Y-%m-%dT%H:%M:%SZ)",
  "build_seconds": $((SECONDS - t_build)),
  "mirror": "$MIRROR",
  "paths_relative_to": "directory of guest.json",
  "disk": "disk.img",
  "disk_format": "raw",
  "disk_bytes": $((DISK_MB * 1024 * 1024)),
  "partition_table": "dos",
  "root_partition": 1,
  "root_offset_bytes": $((PART_START_MIB * 1024 * 1024)),
  "root_fs": "ext4",
  "root_label": "$ROOT_LABEL",
  "root_uuid": "$ROOT_UUID",
  "kernel": "vmlinuz",
  "initrd": "initrd.img",
  "kernel_version": "$KVER",
  "cmdline": "$CMDLINE",
  "bootloader": "grub-pc (BIOS): boots the disk alone with the same command line",
  "memory_mb": $MEMORY_MB,
  "serial": "ttyS0",
  "ready_prompt": "$READY_PROMPT",
  "hostname": "$GUEST_HOSTNAME",
  "guest_ip": "$GUEST_IP/$GUEST_PREFIX",
  "gateway": "$GUEST_GW",
  "dns": "$GUEST_DNS",
  "guest_agent_port": "$AGENT_PORT",
  "cloud_init": "NoCloud or ConfigDrive seed; disabled at boot when none is attached",
  "packages": $(json_list "${PACKAGES[@]}"),
  "disabled_units": $(json_list "${DISABLED_UNITS[@]}"),
  "masked_units": $(json_list "${MASKED_UNITS[@]}"),
  "packages_file": "packages.txt"
}
EOF
for f in vmlinuz initrd.img disk.img packages.txt; do mv -f "$WORK/$f" "$OUTDIR/$f"; done
mv -f "$WORK/guest.json" "$OUTDIR/guest.json"   # last: marks the build complete
log "built in $((SECONDS - t_build)) s: $(du -m "$OUTDIR/disk.img" | cut -f1) MiB allocated of $DISK_MB"
print_paths
