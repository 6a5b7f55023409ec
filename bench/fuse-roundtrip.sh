#!/usr/bin/env bash
# fuse-roundtrip.sh: where the time of a random 4 KiB base-only read through cloudletfs goes.
#
# Prints a markdown table on stdout (progress on stderr): fio random 4 KiB `pread`s (queue
# depth 1) of a base disk image, read directly and through a fresh cloudletfs mount of
# base + a 16-chunk overlay, with the base cold (page cache dropped) and warm (base file in the
# page cache; the FUSE file is cold either way, being a fresh mount). Each placement isolates
# one cost of the FUSE round trip:
#   free       the scheduler places the reader and the FUSE threads (the normal case);
#   one CPU    daemon and reader pinned to CPU 0: no cross-CPU wake-up;
#   CPUs busy  one SCHED_IDLE spinner per CPU: wake-ups never have to bring a halted vCPU
#              back (any runnable thread preempts the spinners at once), as a guest with
#              cpuidle-haltpoll or bare metal with shallow C-states would.
# Figures are medians over the rounds; configurations alternate within each round.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/.." && pwd)

usage() {
  cat <<EOF
usage: fuse-roundtrip.sh [-g GIB] [-n READS] [-r ROUNDS] [-w WORKDIR]
  -g GIB     base disk size in GiB (random data; default 1)
  -n READS   random 4 KiB reads per measurement (default 20000)
  -r ROUNDS  rounds (default 3; medians reported)
  -w WORKDIR scratch dir (default: fresh mktemp -d under /var/tmp, removed afterwards)
env: CLOUDLET_BIN, CLOUDLETFS_BIN (default target/release/cloudlet, target/release/cloudletfs)
Needs root (drop_caches, mounts), fio, jq, fusermount3, taskset, chrt.
Build first: cargo build --release --workspace
EOF
}

GIB=1 READS=20000 ROUNDS=3 WORK='' KEEP=0
while getopts "g:n:r:w:h" opt; do
  case $opt in
    g) GIB=$OPTARG ;;
    n) READS=$OPTARG ;;
    r) ROUNDS=$OPTARG ;;
    w) WORK=$OPTARG KEEP=1 ;;
    h) usage; exit 0 ;;
    *) usage >&2; exit 2 ;;
  esac
done
for n in "$GIB" "$READS" "$ROUNDS"; do
  [[ $n =~ ^[1-9][0-9]*$ ]] || { echo "fuse-roundtrip: -g, -n, -r need positive integers" >&2; exit 2; }
done
CLOUDLET=${CLOUDLET_BIN:-$REPO/target/release/cloudlet}
CLOUDLETFS=${CLOUDLETFS_BIN:-$REPO/target/release/cloudletfs}
for b in "$CLOUDLET" "$CLOUDLETFS"; do
  [[ -x $b ]] || { echo "fuse-roundtrip: $b missing; cargo build --release --workspace" >&2; exit 1; }
done
for t in fio jq fusermount3 taskset chrt; do
  command -v $t >/dev/null || { echo "fuse-roundtrip: missing tool: $t (apt-get install fio jq util-linux fuse3)" >&2; exit 1; }
done
[[ $(id -u) == 0 ]] || { echo "fuse-roundtrip: run as root (drop_caches)" >&2; exit 1; }

if [[ -z $WORK ]]; then WORK=$(mktemp -d /var/tmp/cloudlet-fuse-roundtrip.XXXXXX); fi
mkdir -p "$WORK/mnt"
WORK=$(cd "$WORK" && pwd)
MNT=$WORK/mnt
export CLOUDLET_HOME=$WORK/home
SPINNERS=()
cleanup() {
  if ((${#SPINNERS[@]})); then kill "${SPINNERS[@]}" 2>/dev/null || true; fi
  fusermount3 -u "$MNT" 2>/dev/null || true
  if ((KEEP == 0)); then rm -rf "$WORK"; fi
}
trap cleanup EXIT

log() { printf '[fuse-roundtrip %s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }

if [[ ! -f $WORK/ov.cl ]]; then
  log "making a ${GIB} GiB random base and a 16-chunk overlay in $WORK"
  head -c "${GIB}G" /dev/urandom >"$WORK/disk.img"
  head -c 64M /dev/urandom >"$WORK/mem.img"
  cp "$WORK/disk.img" "$WORK/cdisk.img"
  for i in $(seq 1 16); do
    dd if=/dev/urandom of="$WORK/cdisk.img" bs=4096 seek=$((i * 997)) count=1 conv=notrunc status=none
  done
  "$CLOUDLET" add-base --disk "$WORK/disk.img" --memory "$WORK/mem.img" --name rt --link >/dev/null
  "$CLOUDLET" diff rt --disk "$WORK/cdisk.img" --memory "$WORK/mem.img" --codec zstd \
    -o "$WORK/ov.cl" >/dev/null
fi

drop() { sync; echo 3 >/proc/sys/vm/drop_caches; }
warm() { cat "$WORK/disk.img" >/dev/null; }

# fio_read FILE [CPU]: one measurement; prints "MB/s p50_us p99_us".
fio_read() {
  local pin=()
  if [[ -n ${2:-} ]]; then pin=(taskset -c "$2"); fi
  "${pin[@]}" fio --name=rt --filename="$1" --rw=randread --bs=4k --ioengine=psync \
    --number_ios="$READS" --size="${GIB}g" --norandommap --randrepeat=1 --invalidate=0 \
    --output-format=json 2>/dev/null |
    jq -r '.jobs[0].read | "\(.bw_bytes / 1e6) \(.clat_ns.percentile["50.000000"] / 1e3) \(.clat_ns.percentile["99.000000"] / 1e3)"'
}

# mount_fs [CPU]: a fresh mount (the daemon pinned to CPU if given).
mount_fs() {
  local pin=()
  if [[ -n ${1:-} ]]; then pin=(taskset -c "$1"); fi
  "${pin[@]}" "$CLOUDLETFS" rt "$WORK/ov.cl" "$MNT" >/dev/null
}
unmount_fs() { fusermount3 -u "$MNT"; }

spin_on() {
  local cpus i
  cpus=$(nproc)
  for ((i = 0; i < cpus; i++)); do
    chrt -i 0 bash -c 'while :; do :; done' &
    SPINNERS+=($!)
  done
  sleep 0.5
}
spin_off() {
  kill "${SPINNERS[@]}"
  wait "${SPINNERS[@]}" 2>/dev/null || true
  SPINNERS=()
}

# measure STATE PLACEMENT SIDE: one measurement appended to $WORK/results.
measure() {
  local state=$1 placement=$2 side=$3 cpu='' file=$WORK/disk.img
  [[ $placement == "one CPU" ]] && cpu=0
  if [[ $side == cloudletfs ]]; then
    mount_fs "$cpu"
    file=$MNT/disk/image
  fi
  if [[ $state == cold ]]; then drop; else warm; fi
  printf '%s|%s|%s|%s\n' "$state" "$placement" "$side" "$(fio_read "$file" "$cpu")" >>"$WORK/results"
  if [[ $side == cloudletfs ]]; then unmount_fs; fi
}

: >"$WORK/results"
for ((r = 1; r <= ROUNDS; r++)); do
  log "round $r of $ROUNDS"
  for state in cold warm; do
    for placement in free "one CPU"; do
      measure "$state" "$placement" direct
      measure "$state" "$placement" cloudletfs
    done
    spin_on
    measure "$state" "CPUs busy" direct
    measure "$state" "CPUs busy" cloudletfs
    spin_off
  done
done

# median FIELD STATE PLACEMENT SIDE
median() {
  awk -F'|' -v s="$2" -v p="$3" -v d="$4" -v f="$1" '$1 == s && $2 == p && $3 == d {
    split($4, v, " "); print v[f] }' "$WORK/results" | sort -g |
    awk '{ a[NR] = $1 } END { if (NR % 2) print a[(NR + 1) / 2]; else print (a[NR / 2] + a[NR / 2 + 1]) / 2 }'
}

echo "### Random 4 KiB base-only reads: direct vs cloudletfs by CPU placement ($GIB GiB base, $READS reads, median of $ROUNDS rounds)"
echo
echo "| base | placement | direct MB/s | cloudletfs MB/s | **ratio** | direct p50 / p99 | cloudletfs p50 / p99 | FUSE cost per read (p50) |"
echo "|---|---|---|---|---|---|---|---|"
for state in cold warm; do
  for placement in free "one CPU" "CPUs busy"; do
    dm=$(median 1 "$state" "$placement" direct) fm=$(median 1 "$state" "$placement" cloudletfs)
    d50=$(median 2 "$state" "$placement" direct) f50=$(median 2 "$state" "$placement" cloudletfs)
    d99=$(median 3 "$state" "$placement" direct) f99=$(median 3 "$state" "$placement" cloudletfs)
    awk -v s="$state" -v p="$placement" -v dm="$dm" -v fm="$fm" -v d50="$d50" -v f50="$f50" \
      -v d99="$d99" -v f99="$f99" 'BEGIN {
        printf "| %s | %s | %.1f | %.1f | **%.2f** | %.1f / %.1f µs | %.1f / %.1f µs | %.1f µs |\n",
          s, p, dm, fm, fm / dm, d50, d99, f50, f99, f50 - d50 }'
  done
done
