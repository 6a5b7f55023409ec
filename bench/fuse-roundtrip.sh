#!/usr/bin/env bash
# fuse-roundtrip.sh: where the time of a random 4 KiB base-only read through cloudletfs goes.
#
# Prints a markdown table on stdout (progress on stderr): fio random 4 KiB `pread`s (queue
# depth 1) of a base disk image, read directly and through a fresh cloudletfs mount of
# base + a 16-chunk overlay, with the base cold (page cache dropped) and warm (base file in the
# page cache; the FUSE file is cold either way, being a fresh mount). Each placement isolates
# one cost of the FUSE round trip:
#   free             the scheduler places the reader and the FUSE threads (the normal case);
#   reader on CPU 0  only the reader pinned (as a pinned QEMU I/O thread would be);
#   daemon on CPU 1  only the daemon pinned, the reader free (what a daemon could do alone);
#   one CPU          daemon and reader pinned to CPU 0: no cross-CPU wake-up;
#   CPUs busy        one SCHED_IDLE spinner per CPU: wake-ups never have to bring a halted
#                    vCPU back (any runnable thread preempts the spinners at once), as a guest
#                    with cpuidle-haltpoll or bare metal with shallow C-states would.
# With -u, the same reads also go through bench/uring-probe (one file served with pread over
# FUSE-over-io_uring, one ring and worker pinned per CPU) in the first two placements; the
# script turns /sys/module/fuse/parameters/enable_uring on for the run and restores it.
# Figures are medians over the rounds; configurations alternate within each round.
# The v_* medians are assigned through printf -v, which ShellCheck cannot follow:
# shellcheck disable=SC2154
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/.." && pwd)

usage() {
  cat <<EOF
usage: fuse-roundtrip.sh [-g GIB] [-n READS] [-r ROUNDS] [-j READERS] [-w WORKDIR] [-u]
  -g GIB     base disk size in GiB (random data; default 1)
  -n READS   random 4 KiB reads per measurement (default 20000)
  -r ROUNDS  rounds (default 3; medians reported)
  -j READERS concurrent readers, each doing READS reads (default 1: queue depth 1)
  -w WORKDIR scratch dir (default: fresh mktemp -d under /var/tmp, removed afterwards)
  -u         also measure FUSE over io_uring (bench/uring-probe; Linux 6.14+)
env: CLOUDLET_BIN, CLOUDLETFS_BIN (default target/release/cloudlet, target/release/cloudletfs),
     URING_PROBE_BIN (default bench/uring-probe/target/release/uring-probe; built if missing)
Needs root (drop_caches, mounts), fio, jq, fusermount3, taskset, chrt, mountpoint.
Build first: cargo build --release --workspace
EOF
}

GIB=1 READS=20000 ROUNDS=3 JOBS=1 WORK='' KEEP=0 URING=0
while getopts "g:n:r:j:w:uh" opt; do
  case $opt in
    g) GIB=$OPTARG ;;
    n) READS=$OPTARG ;;
    r) ROUNDS=$OPTARG ;;
    j) JOBS=$OPTARG ;;
    w) WORK=$OPTARG KEEP=1 ;;
    u) URING=1 ;;
    h) usage; exit 0 ;;
    *) usage >&2; exit 2 ;;
  esac
done
for n in "$GIB" "$READS" "$ROUNDS" "$JOBS"; do
  [[ $n =~ ^[1-9][0-9]*$ ]] || { echo "fuse-roundtrip: -g, -n, -r, -j need positive integers" >&2; exit 2; }
done
CLOUDLET=${CLOUDLET_BIN:-$REPO/target/release/cloudlet}
CLOUDLETFS=${CLOUDLETFS_BIN:-$REPO/target/release/cloudletfs}
for b in "$CLOUDLET" "$CLOUDLETFS"; do
  [[ -x $b ]] || { echo "fuse-roundtrip: $b missing; cargo build --release --workspace" >&2; exit 1; }
done
for t in fio jq fusermount3 taskset chrt mountpoint; do
  command -v $t >/dev/null || { echo "fuse-roundtrip: missing tool: $t (apt-get install fio jq util-linux fuse3)" >&2; exit 1; }
done
[[ $(id -u) == 0 ]] || { echo "fuse-roundtrip: run as root (drop_caches)" >&2; exit 1; }
URING_SWITCH=/sys/module/fuse/parameters/enable_uring
PROBE=${URING_PROBE_BIN:-$HERE/uring-probe/target/release/uring-probe}
if ((URING)); then
  [[ -w $URING_SWITCH ]] || {
    echo "fuse-roundtrip: this kernel has no FUSE over io_uring ($URING_SWITCH)" >&2
    exit 1
  }
  if [[ ! -x $PROBE ]]; then
    cargo build --release --manifest-path "$HERE/uring-probe/Cargo.toml" >&2
  fi
  URING_WAS=$(cat "$URING_SWITCH")
fi

if [[ -z $WORK ]]; then WORK=$(mktemp -d /var/tmp/cloudlet-fuse-roundtrip.XXXXXX); fi
mkdir -p "$WORK/mnt"
WORK=$(cd "$WORK" && pwd)
MNT=$WORK/mnt
export CLOUDLET_HOME=$WORK/home
SPINNERS=()
cleanup() {
  if ((${#SPINNERS[@]})); then kill "${SPINNERS[@]}" 2>/dev/null || true; fi
  fusermount3 -u "$MNT" 2>/dev/null || true
  if ((URING)); then echo "$URING_WAS" >"$URING_SWITCH"; fi
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
    --allow_file_create=0 --numjobs="$JOBS" --group_reporting \
    --output-format=json 2>/dev/null |
    jq -r '.jobs[0].read | "\(.bw_bytes / 1e6) \(.clat_ns.percentile["50.000000"] / 1e3) \(.clat_ns.percentile["99.000000"] / 1e3)"'
}

# mount_side SIDE [CPU]: a fresh mount of SIDE (cloudletfs or uring; the cloudletfs daemon
# pinned to CPU if given); sets FILE to the file to read.
PROBE_PID=''
mount_side() {
  local pin=() i
  if [[ -n ${2:-} ]]; then pin=(taskset -c "$2"); fi
  case $1 in
    cloudletfs)
      "${pin[@]}" "$CLOUDLETFS" rt "$WORK/ov.cl" "$MNT" >/dev/null
      FILE=$MNT/disk/image ;;
    uring)
      "$PROBE" "$WORK/disk.img" "$MNT" >/dev/null 2>&1 &
      PROBE_PID=$!
      for ((i = 0; i < 100; i++)); do mountpoint -q "$MNT" && break; sleep 0.05; done
      FILE=$MNT/image ;;
  esac
  mountpoint -q "$MNT" || { echo "fuse-roundtrip: $MNT is not mounted" >&2; exit 1; }
}
unmount_side() {
  fusermount3 -u "$MNT"
  if [[ -n $PROBE_PID ]]; then
    wait "$PROBE_PID" || true
    PROBE_PID=''
  fi
}

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
  local state=$1 placement=$2 side=$3 reader='' daemon='' file=$WORK/disk.img got
  case $placement in
    "reader on CPU 0") reader=0 ;;
    "daemon on CPU 1") daemon=1 ;;
    "one CPU") reader=0 daemon=0 ;;
  esac
  if [[ $side != direct ]]; then
    mount_side "$side" "$daemon"
    file=$FILE
  fi
  if [[ $state == cold ]]; then drop; else warm; fi
  got=$(fio_read "$file" "$reader")
  [[ -n $got ]] || { echo "fuse-roundtrip: fio failed on $file" >&2; exit 1; }
  printf '%s|%s|%s|%s\n' "$state" "$placement" "$side" "$got" >>"$WORK/results"
  if [[ $side != direct ]]; then unmount_side; fi
}

PLACEMENTS=(free "reader on CPU 0" "daemon on CPU 1" "one CPU" "CPUs busy")
if ((URING)); then echo Y >"$URING_SWITCH"; fi
: >"$WORK/results"
for ((r = 1; r <= ROUNDS; r++)); do
  log "round $r of $ROUNDS"
  for state in cold warm; do
    for placement in "${PLACEMENTS[@]}"; do
      [[ $placement == "CPUs busy" ]] && spin_on
      measure "$state" "$placement" direct
      measure "$state" "$placement" cloudletfs
      if ((URING)) && [[ $placement == free || $placement == "reader on CPU 0" ]]; then
        measure "$state" "$placement" uring
      fi
      [[ $placement == "CPUs busy" ]] && spin_off
    done
  done
done

# median FIELD STATE PLACEMENT SIDE
median() {
  awk -F'|' -v s="$2" -v p="$3" -v d="$4" -v f="$1" '$1 == s && $2 == p && $3 == d {
    split($4, v, " "); print v[f] }' "$WORK/results" | sort -g |
    awk '{ a[NR] = $1 } END { if (NR == 0) exit; if (NR % 2) print a[(NR + 1) / 2]; else print (a[NR / 2] + a[NR / 2 + 1]) / 2 }'
}

echo "### Random 4 KiB base-only reads: direct vs cloudletfs by CPU placement ($GIB GiB base, $JOBS reader(s) × $READS reads, median of $ROUNDS rounds)"
echo
header="| base | placement | direct MB/s | cloudletfs MB/s | **ratio** | direct p50 / p99 | cloudletfs p50 / p99 | FUSE cost per read (p50) |"
rule="|---|---|---|---|---|---|---|---|"
if ((URING)); then
  header+=" io_uring probe MB/s | io_uring p50 / p99 | its FUSE cost (p50) |"
  rule+="---|---|---|"
fi
echo "$header"
echo "$rule"
for state in cold warm; do
  for placement in "${PLACEMENTS[@]}"; do
    for side in direct cloudletfs uring; do
      for f in 1 2 3; do
        printf -v "v_${side}_$f" '%s' "$(median "$f" "$state" "$placement" "$side")"
      done
    done
    line=$(awk -v s="$state" -v p="$placement" -v dm="$v_direct_1" -v fm="$v_cloudletfs_1" \
      -v d50="$v_direct_2" -v f50="$v_cloudletfs_2" -v d99="$v_direct_3" -v f99="$v_cloudletfs_3" 'BEGIN {
        printf "| %s | %s | %.1f | %.1f | **%.2f** | %.1f / %.1f µs | %.1f / %.1f µs | %.1f µs |",
          s, p, dm, fm, fm / dm, d50, d99, f50, f99, f50 - d50 }')
    if ((URING)); then
      if [[ -n $v_uring_1 ]]; then
        line+=$(awk -v um="$v_uring_1" -v u50="$v_uring_2" -v u99="$v_uring_3" -v d50="$v_direct_2" 'BEGIN {
          printf " %.1f | %.1f / %.1f µs | %.1f µs |", um, u50, u99, u50 - d50 }')
      else
        line+=" — | — | — |"
      fi
    fi
    echo "$line"
  done
done
