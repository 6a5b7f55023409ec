#!/usr/bin/env bash
# make-debian.sh: realistic base/custom VM image set for overlay benchmarks.
#
# Output (OUTDIR): base-disk.img, custom-disk.img (raw ext4), base-mem.img,
# custom-mem.img (flat guest-RAM look-alikes), debian-summary.txt.
# Needs root (debootstrap, chroot, mount).  Feed the four images to
# baselines.sh or to cloudlet.
#
# Choices, and why:
# * Base rootfs: `debootstrap --variant=minbase bookworm`, cached in
#   $CLOUDLET_BENCH_CACHE (default ~/.cache/cloudlet-bench) as
#   rootfs-bookworm-minbase/ (+ .ok marker once complete), with the .debs in
#   debs/, so reruns skip the download and the unpacking.  The .debs that
#   debootstrap leaves in /var/cache/apt/archives are deleted, as a cloud
#   image would be cleaned.
# * base-disk.img: `mkfs.ext4 -d ROOTFS` into a raw image (no mount needed),
#   4 KiB blocks, fixed UUID, hash seed and time, so it is reproducible.
# * custom-disk.img must look like a disk a VM modified in place: rebuilding
#   it with mkfs would relocate every block and make everything "changed".
#   So it is a copy of base-disk.img changed by a file system driver:
#   - method "loop" (used when `mount -o loop` works; it does on the dev
#     machine): mount the copy and run `apt-get install` in a chroot *on the
#     image itself*, exactly what a user would do in the VM: kernel ext4
#     allocation, journal writes, dpkg's write-new-then-rename, and the
#     downloaded .debs written then deleted by `apt-get clean` (their blocks
#     stay non-zero, as in a real VM).
#   - method "debugfs" (fallback, no privileges for mounts needed): install
#     into a copy of the rootfs tree, then replay the tree difference into
#     the image copy with `debugfs -w` (rm/mkdir/write/symlink/ln + owner,
#     mode, mtime).  No deleted-.deb garbage, and e2fsprogs' allocator
#     instead of the kernel's.
#   Daemons are kept from starting on the host by a policy-rc.d, removed
#   afterwards.  apt uses the package lists debootstrap fetched (no
#   `apt-get update` unless --apt-update) and .debs are cached in
#   apt-archives/, so reruns are offline and reproducible.
# * Memory images (debian_helpers.py mem; 4 KiB aligned everywhere):
#   base-mem: first MiB zero, ~5% "kernel" (host binaries that are not in
#   the guest, lightly perturbed: unique code/data), 25% page cache of base
#   rootfs files (exact page copies => dedup against base-disk blocks), 12%
#   anonymous heap-like pages, the rest zero (a freshly booted guest), page
#   cache / anon / zero runs shuffled over physical memory.
#   custom-mem: base-mem with runs overwritten: page cache of every
#   new/changed file of the custom rootfs (up to 25% of RAM; they dedup
#   against the new disk chunks of the overlay, not against the base), 3%
#   more base-file page cache, 10% fresh anonymous pages, 3% zeroed pages;
#   70% of the runs land in base-free memory, 30% anywhere.
set -euo pipefail

usage() {
  cat <<'USAGE'
usage: make-debian.sh OUTDIR [--disk-mb N] [--mem-mb N] [--packages "P1 P2"]
                      [--method auto|loop|debugfs] [--seed S] [--apt-update]
Defaults: 2048 MiB disk, 512 MiB memory, packages "python3 nginx-light",
method auto (loop mount if it works, else debugfs), seed 1.
Cache: ${CLOUDLET_BENCH_CACHE:-$HOME/.cache/cloudlet-bench}; mirror:
${CLOUDLET_BENCH_MIRROR:-http://deb.debian.org/debian}.  Run as root.
USAGE
}

out="" disk_mb=2048 mem_mb=512 packages="python3 nginx-light" method=auto
seed=1 apt_update=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --disk-mb) disk_mb="$2"; shift 2 ;;
    --mem-mb) mem_mb="$2"; shift 2 ;;
    --packages) packages="$2"; shift 2 ;;
    --method) method="$2"; shift 2 ;;
    --seed) seed="$2"; shift 2 ;;
    --apt-update) apt_update=1; shift ;;
    -*) echo "make-debian.sh: unknown option $1" >&2; usage >&2; exit 2 ;;
    *) [[ -z "$out" ]] || { usage >&2; exit 2; }; out="$1"; shift ;;
  esac
done
[[ -n "$out" ]] || { usage >&2; exit 2; }
case "$method" in auto|loop|debugfs) ;; *) usage >&2; exit 2 ;; esac
[[ "$(id -u)" -eq 0 ]] || { echo "make-debian.sh: must run as root" >&2; exit 2; }
for tool in debootstrap mkfs.ext4 debugfs e2fsck chroot python3; do
  command -v "$tool" >/dev/null || { echo "make-debian.sh: $tool missing" >&2; exit 2; }
done

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cache="${CLOUDLET_BENCH_CACHE:-$HOME/.cache/cloudlet-bench}"
mirror="${CLOUDLET_BENCH_MIRROR:-http://deb.debian.org/debian}"
rootfs="$cache/rootfs-bookworm-minbase"
mkdir -p "$cache" "$out"
out="$(realpath "$out")"
work="$(mktemp -d "${TMPDIR:-/tmp}/cloudlet-debian.XXXXXX")"

# Cleanup must never rm -rf through a live mount (that would delete files
# in the mounted image or, for /proc, worse), so unmount first, newest first,
# and leave the work dir alone if anything is still mounted below it.
mounts=()
cleanup() {
  local i m
  for ((i = ${#mounts[@]} - 1; i >= 0; i--)); do
    m="${mounts[i]}"
    if mountpoint -q "$m"; then umount "$m" 2>/dev/null || umount -l "$m" || true; fi
  done
  if findmnt -rn -o TARGET | grep -q "^$work"; then
    echo "make-debian.sh: $work still has mounts, not removed" >&2
  else
    rm -rf --one-file-system "$work"
  fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

log() { echo "[$(date +%T)] $*" >&2; }
times=()
t_start=$SECONDS
step_done() { times+=("$1: $((SECONDS - t_step))s"); log "$1 done in $((SECONDS - t_step))s"; }

# safe_rm DIR: remove a directory tree that may have had mounts (debootstrap).
safe_rm() {
  local m
  for m in $(findmnt -rn -o TARGET | grep "^$1/" | sort -r); do umount -l "$m"; done
  rm -rf --one-file-system "$1"
}

# ---- 1. base rootfs (cached) -------------------------------------------
t_step=$SECONDS
if [[ ! -f "$rootfs.ok" ]]; then
  log "debootstrap bookworm minbase into $rootfs (cached for next time)"
  safe_rm "$rootfs.tmp"; safe_rm "$rootfs"
  mkdir -p "$cache/debs"
  debootstrap --variant=minbase --cache-dir="$cache/debs" bookworm \
    "$rootfs.tmp" "$mirror" >"$cache/debootstrap.log" 2>&1 \
    || { echo "debootstrap failed, see $cache/debootstrap.log" >&2; exit 1; }
  rm -f "$rootfs.tmp"/var/cache/apt/archives/*.deb
  mv "$rootfs.tmp" "$rootfs"
  touch "$rootfs.ok"
fi
step_done rootfs

# ---- 2. base disk ----------------------------------------------------------
t_step=$SECONDS
log "base-disk.img: mkfs.ext4 -d ($disk_mb MiB)"
rm -f "$out/base-disk.img"
E2FSPROGS_FAKE_TIME=1700000000 mkfs.ext4 -q -F -b 4096 -L cloudlet-base \
  -U 6c6f7564-6c65-7462-6173-650000000001 \
  -E hash_seed=6c6f7564-6c65-7462-6173-650000000002,root_owner=0:0 \
  -d "$rootfs" "$out/base-disk.img" "${disk_mb}M" >/dev/null
step_done base-disk

# ---- 3. custom disk ----------------------------------------------------------
# install_into DIR: apt-get install $packages in a chroot at DIR.
install_into() {
  local dir="$1" debs
  printf '#!/bin/sh\n# no daemons in a build chroot\nexit 101\n' >"$dir/usr/sbin/policy-rc.d"
  chmod 755 "$dir/usr/sbin/policy-rc.d"
  mount -t proc proc "$dir/proc"
  mounts+=("$dir/proc")
  shopt -s nullglob
  debs=("$cache/apt-archives"/*.deb)
  if [[ ${#debs[@]} -gt 0 ]]; then cp "${debs[@]}" "$dir/var/cache/apt/archives/"; fi
  local env=(env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8
             DEBIAN_FRONTEND=noninteractive)
  if [[ $apt_update -eq 1 ]]; then chroot "$dir" "${env[@]}" apt-get -q update; fi
  # shellcheck disable=SC2086  # $packages is a word list on purpose
  chroot "$dir" "${env[@]}" apt-get -q -y --no-install-recommends install $packages \
    >"$work/apt.log" 2>&1 || { cat "$work/apt.log" >&2; exit 1; }
  mkdir -p "$cache/apt-archives"
  debs=("$dir/var/cache/apt/archives"/*.deb)
  if [[ ${#debs[@]} -gt 0 ]]; then cp -n "${debs[@]}" "$cache/apt-archives/"; fi
  shopt -u nullglob
  chroot "$dir" "${env[@]}" apt-get clean
  rm -f "$dir/usr/sbin/policy-rc.d"
  umount "$dir/proc"
}

t_step=$SECONDS
cp --sparse=always "$out/base-disk.img" "$out/custom-disk.img"
mkdir -p "$work/mnt" "$work/custom-tree"
if [[ "$method" != debugfs ]]; then
  if mount -o loop "$out/custom-disk.img" "$work/mnt" 2>"$work/mount.err"; then
    mounts+=("$work/mnt")
    method=loop
  elif [[ "$method" == loop ]]; then
    cat "$work/mount.err" >&2; exit 1
  else
    log "loop mount failed ($(head -1 "$work/mount.err")); using debugfs"
    method=debugfs
  fi
fi
log "custom-disk.img: installing '$packages' (method $method)"
if [[ "$method" == loop ]]; then
  install_into "$work/mnt"
  # Snapshot of the result for the memory model, then unmount cleanly.
  cp -a "$work/mnt/." "$work/custom-tree/"
  umount "$work/mnt"
else
  cp -a "$rootfs/." "$work/custom-tree/"
  install_into "$work/custom-tree"
  python3 "$here/debian_helpers.py" debugfs-script "$rootfs" "$work/custom-tree" \
    >"$work/debugfs.cmds"
  log "debugfs: $(wc -l <"$work/debugfs.cmds") commands"
  debugfs -w -f "$work/debugfs.cmds" "$out/custom-disk.img" >"$work/debugfs.log" 2>&1
  # debugfs echoes each command as "debugfs: CMD" and keeps going on errors;
  # anything else in its output is an error message.
  if grep -v '^debugfs' "$work/debugfs.log" | grep -q .; then
    grep -v '^debugfs' "$work/debugfs.log" | head -20 >&2
    echo "make-debian.sh: debugfs reported errors" >&2; exit 1
  fi
fi
# The image must be a consistent file system, whatever the method.
e2fsck -fn "$out/custom-disk.img" >"$work/fsck.log" 2>&1 \
  || { cat "$work/fsck.log" >&2; echo "make-debian.sh: custom-disk.img fails e2fsck" >&2; exit 1; }
# Spot check: a few new files read back from the image equal the tree's.
python3 "$here/debian_helpers.py" changed "$rootfs" "$work/custom-tree" >"$work/changed"
n_changed=$(wc -l <"$work/changed")
while read -r rel; do
  debugfs -R "cat \"/$rel\"" "$out/custom-disk.img" 2>/dev/null \
    | cmp -s - "$work/custom-tree/$rel" \
    || { echo "make-debian.sh: /$rel differs in custom-disk.img" >&2; exit 1; }
done < <(awk 'NR % 97 == 1' "$work/changed" | head -20)
step_done "custom-disk ($method)"

# ---- 4. memory images ------------------------------------------------------
t_step=$SECONDS
log "memory images ($mem_mb MiB)"
mem_summary="$(python3 "$here/debian_helpers.py" mem "$rootfs" "$work/custom-tree" \
  "$out" --mem-mb "$mem_mb" --seed "$seed")"
step_done memory

{
  echo "debian set: bookworm minbase + '$packages'"
  echo "disk: $disk_mb MiB ext4, custom-disk method: $method"
  echo "rootfs: base $(du -sm "$rootfs" | cut -f1) MiB, custom $(du -sm "$work/custom-tree" | cut -f1) MiB, new/changed files $n_changed"
  echo "$mem_summary"
  echo "times: ${times[*]}; total $((SECONDS - t_start))s"
} | tee "$out/debian-summary.txt"
