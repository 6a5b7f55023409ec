#!/usr/bin/env bash
# build-guest.sh [OUTDIR] — build cloudlet's small Linux test guest from Debian packages.
#
# Output (in OUTDIR; default $CLOUDLET_GUEST_DIR, else
# $HOME/.cache/cloudlet-guests/r<RECIPE_VERSION>-<GUEST_DISK_MB>mb, printed as "guest dir:"):
#   vmlinuz     Debian's cloud kernel (linux-image-*-cloud-amd64), unmodified
#   initrd.img  busybox-static initramfs: loads the virtio/ext4 modules the kernel lacks,
#               mounts /dev/vda (ext4, -o discard) and switch_roots to it
#   disk.img    raw ext4 image (GUEST_DISK_MB, default 256) holding a busybox-static system that
#               serves HTTP on guest port 8080, runs an interactive shell on ttyS0 and the QEMU
#               guest agent on its virtio-serial port (when the VM has one)
#   guest.json  file names (relative to OUTDIR), kernel command line, markers, recipe version
#
# Serial console (ttyS0): a plain interactive busybox `sh` (login shell, echoing, with line
# editing), like a real guest's shell; cloudlet drives it as it drives any shell (synth's
# vm::shell frames each command). "CLOUDLET-GUEST-READY" is printed once, when the HTTP
# service answers and the console shell starts.
# Guest agent: the host's qemu-ga (Debian's qemu-guest-agent) with the libraries it links,
# started at boot on the port named org.qemu.guest_agent.0 if the VM has that port (the
# launch config's guest-agent device).
# HTTP (guest 10.0.2.15:8080, static address for QEMU user networking):
#   /index.html              static page
#   /cgi-bin/counter         "count=N uptime=S boot_id=ID": N lives in /run (tmpfs, i.e. guest
#                            RAM), so it continues across a save/restore of the same boot.
#
# The default folder names the recipe, so checkouts on different recipes (whose tools speak
# to the guest differently) do not rebuild one shared cache under each other.
# Cached: if OUTDIR holds a complete build of the same recipe version and disk size, the
# script prints the paths and exits. guest.json is written last, so it marks a complete build.
# Needs root (mknod of /dev/console for the initramfs), busybox-static, qemu-guest-agent, cpio,
# e2fsprogs, apt. Builds of the same OUTDIR are serialised with flock on OUTDIR.lock.
set -euo pipefail

# Bump whenever anything below changes what ends up in OUTDIR.
RECIPE_VERSION=2

GUEST_DISK_MB=${GUEST_DISK_MB:-256}
OUTDIR=${1:-${CLOUDLET_GUEST_DIR:-$HOME/.cache/cloudlet-guests/r$RECIPE_VERSION-${GUEST_DISK_MB}mb}}
KERNEL_META_PKG=linux-image-cloud-amd64
# quiet: keeps the serial log short; panic=-1: with QEMU's -no-reboot a guest panic ends QEMU
# instead of hanging, which is what automation wants.
CMDLINE="console=ttyS0 root=/dev/vda rw quiet panic=-1"
READY_MARKER=CLOUDLET-GUEST-READY
AGENT_CHANNEL=org.qemu.guest_agent.0
GUEST_IP=10.0.2.15
GUEST_GW=10.0.2.2
GUEST_HTTP_PORT=8080

# Modules to load, in order. Each one is skipped if built into the kernel, and its
# dependencies (read from the .ko's own modinfo) are loaded before it.
REQUIRED_MODULES=(virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci
                  virtio_blk virtio_net ext4)
OPTIONAL_MODULES=(virtio_balloon virtio_console)

log() { printf 'build-guest: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

print_paths() {
    echo "guest dir: $OUTDIR"
    echo "kernel:    $OUTDIR/vmlinuz"
    echo "initrd:    $OUTDIR/initrd.img"
    echo "disk:      $OUTDIR/disk.img"
    echo "cmdline:   $CMDLINE"
    echo "json:      $OUTDIR/guest.json"
}

if ! [[ $GUEST_DISK_MB =~ ^[0-9]+$ ]] || (( GUEST_DISK_MB < 16 )); then
    die "GUEST_DISK_MB must be an integer >= 16 (got '$GUEST_DISK_MB')"
fi

# ---------------------------------------------------------------- cache check
# One build per OUTDIR at a time (tests start several at once); the others wait, then find
# the finished build in the cache.
mkdir -p "$(dirname "$OUTDIR")"
exec 9>"$OUTDIR.lock"
flock 9
# guest.json is the commit marker: written only after every other file is in place.
if [[ -f $OUTDIR/guest.json && -f $OUTDIR/vmlinuz && -f $OUTDIR/initrd.img && -f $OUTDIR/disk.img ]] \
   && grep -q "\"recipe_version\": $RECIPE_VERSION," "$OUTDIR/guest.json" \
   && grep -q "\"disk_mb\": $GUEST_DISK_MB," "$OUTDIR/guest.json"; then
    log "cached build is up to date"
    print_paths
    exit 0
fi

[[ $(id -u) == 0 ]] || die "must run as root (the initramfs needs a /dev/console device node)"
for tool in busybox cpio gzip mkfs.ext4 apt-get apt-cache dpkg truncate ldd flock; do
    command -v "$tool" >/dev/null || die "missing tool: $tool"
done
BUSYBOX=$(command -v busybox)
# A dynamically linked busybox would need its libraries in both images.
if LC_ALL=C ldd "$BUSYBOX" >/dev/null 2>&1; then
    die "$BUSYBOX is dynamically linked; install busybox-static"
fi
QEMU_GA=$(PATH=$PATH:/usr/sbin:/sbin command -v qemu-ga) || die "missing qemu-ga; install qemu-guest-agent"

mkdir -p "$OUTDIR"
OUTDIR=$(cd "$OUTDIR" && pwd)
WORK=$(mktemp -d "$OUTDIR/.build.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
# Invalidate the old build first: a half-replaced OUTDIR must never look complete.
rm -f "$OUTDIR/guest.json"

# ---------------------------------------------------------------- kernel package
# The meta package depends on exactly one versioned image package; ask apt which.
resolve_kernel_pkg() {
    apt-cache depends "$KERNEL_META_PKG" 2>/dev/null \
        | sed -n 's/^ *Depends: \(linux-image-[^ ]*-cloud-amd64\)$/\1/p' | head -n1
}
download_kernel_pkg() { # $1 = package; downloads into the current directory
    # Sandbox user root: apt's _apt user cannot write into a root-owned work dir.
    apt-get download -q -o APT::Sandbox::User=root "$1" >&2
}

DEBDIR=$OUTDIR/debs   # kept so a rebuild (e.g. other disk size) needs no download
mkdir -p "$DEBDIR"
KPKG=$(resolve_kernel_pkg || true)
fetched=0
if [[ -n $KPKG ]] && compgen -G "$DEBDIR/${KPKG}_*.deb" >/dev/null; then
    fetched=1
elif [[ -n $KPKG ]] && (cd "$DEBDIR" && download_kernel_pkg "$KPKG"); then
    fetched=1
fi
if (( ! fetched )); then
    # Package lists missing or stale: only now is `apt-get update` worth its time.
    log "kernel package not found or download failed; running apt-get update"
    apt-get update -q >&2
    KPKG=$(resolve_kernel_pkg || true)
    [[ -n $KPKG ]] || die "apt-cache depends $KERNEL_META_PKG names no linux-image package"
    (cd "$DEBDIR" && download_kernel_pkg "$KPKG") || die "apt-get download $KPKG failed"
fi
# Keep only the current version's .deb.
# shellcheck disable=SC2012  # Debian package file names are plain
DEB=$(ls -t "$DEBDIR/${KPKG}"_*.deb | head -n1)
find "$DEBDIR" -name '*.deb' ! -path "$DEB" -delete
log "kernel package: $(basename "$DEB")"

dpkg -x "$DEB" "$WORK/kpkg"
KVER=$(ls "$WORK/kpkg/lib/modules")
[[ $(wc -w <<<"$KVER") == 1 ]] || die "expected one kernel version in $DEB, got: $KVER"
KMODDIR=$WORK/kpkg/lib/modules/$KVER
[[ -f $WORK/kpkg/boot/vmlinuz-$KVER ]] || die "no /boot/vmlinuz-$KVER in $DEB"

# ---------------------------------------------------------------- module closure
# modules.dep is produced by depmod at install time, so it is not in the .deb; read each
# .ko's "depends=" field from its .modinfo section instead (no kmod needed).
declare -A KO_PATH=()      # module name -> path of its .ko (or .ko.xz/.ko.zst/.ko.gz)
while IFS= read -r -d '' f; do
    name=$(basename "$f"); name=${name%%.ko*}; name=${name//-/_}
    KO_PATH[$name]=$f
done < <(find "$KMODDIR/kernel" -name '*.ko*' -print0)
declare -A BUILTIN=()
while IFS= read -r line; do
    name=$(basename "$line"); name=${name%%.ko*}; name=${name//-/_}
    BUILTIN[$name]=1
done < "$KMODDIR/modules.builtin"

ko_cat() { # print an uncompressed module, whatever compression Debian chose
    case $1 in
        *.ko) cat "$1" ;;
        *.ko.xz) xz -dc "$1" ;;
        *.ko.zst) zstd -dc "$1" ;;
        *.ko.gz) gzip -dc "$1" ;;
        *) die "unknown module format: $1" ;;
    esac
}
ko_depends() { ko_cat "$1" | tr '\0' '\n' | sed -n 's/^depends=//p' | tr ',' ' '; }

LOAD_ORDER=()     # modules to insmod, dependencies first
BUILTIN_USED=()   # wanted modules the kernel already has
declare -A SEEN=()
add_module() { # $1 = name, $2 = required|optional
    local m=${1//-/_} dep
    [[ -n ${SEEN[$m]:-} ]] && return 0
    SEEN[$m]=1
    if [[ -n ${BUILTIN[$m]:-} ]]; then
        BUILTIN_USED+=("$m"); return 0
    fi
    if [[ -z ${KO_PATH[$m]:-} ]]; then
        [[ $2 == required ]] && die "module $m is neither built in nor shipped in $KVER"
        log "optional module $m not available; skipped"; return 0
    fi
    for dep in $(ko_depends "${KO_PATH[$m]}"); do add_module "$dep" required; done
    LOAD_ORDER+=("$m")
}
for m in "${REQUIRED_MODULES[@]}"; do add_module "$m" required; done
for m in "${OPTIONAL_MODULES[@]}"; do add_module "$m" optional; done
log "built in: ${BUILTIN_USED[*]:-none}"
log "modules:  ${LOAD_ORDER[*]:-none}"

# ---------------------------------------------------------------- initramfs
# Loads the modules, mounts root with discard (so guest TRIM reaches the host file) and
# hands over. Every module is loaded here, so the root disk needs no /lib/modules.
IR=$WORK/initramfs
mkdir -p "$IR"/{bin,dev,proc,sys,newroot,lib/modules}
cp "$BUSYBOX" "$IR/bin/busybox"
for applet in sh mount umount insmod switch_root sleep cat echo mkdir; do
    ln -s busybox "$IR/bin/$applet"
done
# The kernel opens /dev/console before running /init; without it init has no stdio.
mknod -m 600 "$IR/dev/console" c 5 1
: > "$IR/lib/modules/load-order"
for m in "${LOAD_ORDER[@]}"; do
    ko_cat "${KO_PATH[$m]}" > "$IR/lib/modules/$m.ko"
    echo "$m" >> "$IR/lib/modules/load-order"
done
cat > "$IR/init" <<'EOF'
#!/bin/sh
# cloudlet initramfs: load drivers, mount root (ext4, discard), switch_root.
export PATH=/bin
mount -t devtmpfs devtmpfs /dev
mount -t proc proc /proc
mount -t sysfs sysfs /sys
for m in $(cat /lib/modules/load-order); do
    insmod /lib/modules/$m.ko || echo "initramfs: insmod $m failed"
done
root=/dev/vda
for arg in $(cat /proc/cmdline); do
    case $arg in root=*) root=${arg#root=} ;; esac
done
# Drivers probe asynchronously: wait up to 10 s for the disk node.
i=0
while [ ! -b "$root" ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
if ! mount -t ext4 -o rw,discard "$root" /newroot; then
    echo "initramfs: cannot mount $root; dropping to a shell"
    exec sh
fi
umount /proc /sys
mount --move /dev /newroot/dev
exec switch_root /newroot /sbin/init
EOF
chmod 755 "$IR/init"
# Fixed mtimes and sorted names: the same inputs give a byte-identical initramfs.
find "$IR" -exec touch -h -d @0 {} +
(cd "$IR" && find . -mindepth 1 | LC_ALL=C sort | cpio --quiet -o -H newc -R 0:0 --reproducible) \
    | gzip -9 -n > "$WORK/initrd.img"

# ---------------------------------------------------------------- root filesystem
RD=$WORK/rootfs
mkdir -p "$RD"/{bin,sbin,etc/init.d,dev,proc,sys,run,tmp,root,srv/www/cgi-bin,usr/bin,usr/sbin,var/log}
chmod 1777 "$RD/tmp"
ln -s /run "$RD/var/run"
# The guest agent and every library it links, at the same paths as on the host.
cp -L "$QEMU_GA" "$RD/usr/sbin/qemu-ga"
LC_ALL=C ldd "$QEMU_GA" | grep -o '/[^ ]*' | sort -u | while IFS= read -r lib; do
    mkdir -p "$RD/$(dirname "$lib")"
    cp -L "$lib" "$RD/$lib"
done
cp "$BUSYBOX" "$RD/bin/busybox"
# One symlink per applet, placed where busybox itself would install it.
"$BUSYBOX" --list-full | while IFS= read -r path; do
    [[ -e $RD/$path || -L $RD/$path ]] && continue
    mkdir -p "$RD/$(dirname "$path")"
    ln -s /bin/busybox "$RD/$path"
done

cat > "$RD/etc/passwd" <<'EOF'
root:x:0:0:root:/root:/bin/sh
nobody:x:65534:65534:nobody:/nonexistent:/bin/false
EOF
cat > "$RD/etc/group" <<'EOF'
root:x:0:
nogroup:x:65534:
EOF
echo cloudlet-guest > "$RD/etc/hostname"
printf '127.0.0.1 localhost\n%s cloudlet-guest\n' "$GUEST_IP" > "$RD/etc/hosts"
echo "nameserver 10.0.2.3" > "$RD/etc/resolv.conf"

# busybox init (not a shell script) is PID 1: it reaps orphans and respawns the console shell
# ("-": a login shell, which reads /etc/profile), with ttyS0 as its controlling terminal.
cat > "$RD/etc/inittab" <<'EOF'
::sysinit:/etc/init.d/rcS
ttyS0::respawn:-/bin/sh
::ctrlaltdel:/sbin/poweroff -f
::shutdown:/bin/sync
EOF

cat > "$RD/etc/init.d/rcS" <<EOF
#!/bin/sh
# System start: file systems, network, HTTP service. Output goes to the console.
export PATH=/sbin:/bin:/usr/sbin:/usr/bin
# The initramfs unmounted proc and sys and moved its devtmpfs to /dev.
mount -t proc proc /proc
mount -t sysfs sysfs /sys
grep -q ' /dev ' /proc/mounts || mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts && mount -t devpts devpts /dev/pts
# /run and /tmp are tmpfs: their contents live in guest RAM, which is what a RAM
# snapshot captures (the HTTP counter is kept in /run).
mount -t tmpfs -o mode=755 tmpfs /run
mount -t tmpfs -o mode=1777 tmpfs /tmp
hostname -F /etc/hostname
# The initramfs mounted root with discard; make sure it stays so (fstrim works either way).
mount -o remount,rw,discard /
# Static address for QEMU user networking (instant, unlike DHCP).
ip link set lo up
ip link set eth0 up
ip addr add $GUEST_IP/24 dev eth0
ip route add default via $GUEST_GW
echo 0 > /run/counter
# The guest agent, on its virtio-serial port if the VM has one (no udev here: find the port
# by name).
for port in /sys/class/virtio-ports/*; do
    [ "\$(cat "\$port/name" 2>/dev/null)" = $AGENT_CHANNEL ] || continue
    mkdir -p /run/qemu-ga
    qemu-ga -d -m virtio-serial -p "/dev/\${port##*/}" -t /run/qemu-ga -f /run/qemu-ga.pid \
        || echo "rcS: qemu-ga did not start"
done
httpd -p $GUEST_HTTP_PORT -h /srv/www
# Ready means the service answers, not just that it was started.
i=0
until wget -q -O /dev/null http://127.0.0.1:$GUEST_HTTP_PORT/index.html; do
    i=\$((i+1)); [ \$i -ge 100 ] && { echo "rcS: httpd did not come up"; break; }
    sleep 0.1
done
EOF
chmod 755 "$RD/etc/init.d/rcS"

cat > "$RD/etc/profile" <<EOF
# Login shell on the console: environment, then the ready marker once per boot.
export PATH=/sbin:/bin:/usr/sbin:/usr/bin HOME=/root
cd /root
if [ ! -e /run/ready-printed ]; then
    : > /run/ready-printed
    echo "$READY_MARKER"
fi
EOF

cat > "$RD/srv/www/index.html" <<'EOF'
<!doctype html>
<html><head><title>cloudlet guest</title></head>
<body><p>cloudlet test guest is up. Counter: <a href="/cgi-bin/counter">/cgi-bin/counter</a></p></body>
</html>
EOF
cat > "$RD/srv/www/cgi-bin/counter" <<'EOF'
#!/bin/sh
# Request counter kept in /run (tmpfs = guest RAM), plus uptime and boot id: after a
# save/restore of this boot, count and uptime continue and boot_id stays the same.
lock=/run/counter.lock
i=0
until mkdir "$lock" 2>/dev/null; do
    i=$((i+1)); [ $i -ge 50 ] && break; sleep 0.1
done
n=$(( $(cat /run/counter 2>/dev/null || echo 0) + 1 ))
echo "$n" > /run/counter
rmdir "$lock" 2>/dev/null
read up _ < /proc/uptime
printf 'Content-Type: text/plain\r\n\r\n'
echo "count=$n uptime=$up boot_id=$(cat /proc/sys/kernel/random/boot_id)"
EOF
chmod 755 "$RD/srv/www/cgi-bin/counter"

# Filled from the folder, no loop mount. Fixed UUID and hash seed: stable across rebuilds.
truncate -s "${GUEST_DISK_MB}M" "$WORK/disk.img"
mkfs.ext4 -q -F -L cloudlet-root -U 6c6f7564-6c65-7400-0000-000000000001 \
    -E root_owner=0:0,hash_seed=6c6f7564-6c65-7400-0000-000000000002 \
    -d "$RD" "$WORK/disk.img"

# ---------------------------------------------------------------- publish
cp "$WORK/kpkg/boot/vmlinuz-$KVER" "$WORK/vmlinuz"
json_list() { local s="" x; for x in "$@"; do s+="${s:+, }\"$x\""; done; printf '[%s]' "$s"; }
cat > "$WORK/guest.json" <<EOF
{
  "recipe_version": $RECIPE_VERSION,
  "disk_mb": $GUEST_DISK_MB,
  "kernel": "vmlinuz",
  "initrd": "initrd.img",
  "disk": "disk.img",
  "disk_format": "raw",
  "paths_relative_to": "directory of guest.json",
  "cmdline": "$CMDLINE",
  "kernel_package": "$(basename "$DEB" .deb)",
  "kernel_version": "$KVER",
  "modules_loaded": $(json_list "${LOAD_ORDER[@]}"),
  "modules_builtin": $(json_list "${BUILTIN_USED[@]}"),
  "serial": "ttyS0",
  "ready_marker": "$READY_MARKER",
  "console": "busybox sh, interactive",
  "agent_channel": "$AGENT_CHANNEL",
  "guest_ip": "$GUEST_IP",
  "guest_http_port": $GUEST_HTTP_PORT,
  "http_paths": ["/index.html", "/cgi-bin/counter"]
}
EOF
for f in vmlinuz initrd.img disk.img; do mv -f "$WORK/$f" "$OUTDIR/$f"; done
mv -f "$WORK/guest.json" "$OUTDIR/guest.json"   # last: marks the build complete
log "built recipe $RECIPE_VERSION for $KVER"
print_paths
