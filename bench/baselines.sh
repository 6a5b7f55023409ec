#!/usr/bin/env bash
# baselines.sh: overlay-size baselines for one base/custom VM pair, to compare
# cloudlet's overlay against.  Prints a tab-separated table on stdout:
#   method  bytes  seconds
# (seconds = wall time of that step; "total" rows add up their parts).
#
# (a) paper baseline (MobiSys'13 VM synthesis): xdelta3 -e -9 of the custom
#     disk against the base disk and of the custom memory against the base
#     memory, each delta then compressed with xz -9.
#     -D -R: xdelta3 otherwise sniffs compression magic at the start of an
#     input (e.g. gzip data at offset 0 of a memory image) and "helpfully"
#     decompresses it; images must be diffed as raw bytes.
# (a2) as (a) but with `xdelta3 -S none -B <whole source>`, see below.
# (b) qcow2 baseline: a qcow2 overlay on the raw base disk holding only the
#     clusters that differ, xz -9'd, plus xz -9 of the whole custom memory
#     (qcow2 has no notion of memory).  Note `qemu-img convert -B` does NOT
#     do this: with a raw source it writes every cluster (tested, qemu 10),
#     so we use the rebase trick: an empty overlay whose backing file is the
#     custom disk is safely rebased onto the base disk, which copies exactly
#     the clusters where custom and base differ.  Rows for the default 64 KiB
#     clusters and for 4 KiB clusters (same granularity as our chunks).
# (c) dedup lower bound: unique_new_chunks.py writes the unique new 4 KiB
#     chunks (not unchanged, not zero, not anywhere in base disk/memory, first
#     occurrence only), then xz -9.  No chunk-dedup overlay can store less
#     data than that stream (before its own metadata).
# xz always runs with -T1: single-threaded output is reproducible and does
# not depend on the core count (and leaves the other core to the build).
# The t_* timing variables are assigned by run() through printf -v,
# which ShellCheck cannot follow:
# shellcheck disable=SC2154
set -euo pipefail

usage() {
  echo "usage: baselines.sh BASE_DISK BASE_MEM CUSTOM_DISK CUSTOM_MEM" \
       "  (table on stdout, chunk statistics on stderr)"
}
case "${1:-}" in -h|--help) usage; exit 0 ;; esac
if [[ $# -ne 4 ]]; then usage >&2; exit 2; fi
for f in "$@"; do
  [[ -f "$f" ]] || { echo "baselines.sh: no such file: $f" >&2; exit 2; }
done
for tool in xdelta3 xz qemu-img python3; do
  command -v "$tool" >/dev/null || { echo "baselines.sh: $tool missing" >&2; exit 2; }
done

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# Absolute paths: qemu-img resolves backing files relative to the overlay.
base_disk="$(realpath "$1")"; base_mem="$(realpath "$2")"
custom_disk="$(realpath "$3")"; custom_mem="$(realpath "$4")"

tmp="$(mktemp -d "${TMPDIR:-/tmp}/cloudlet-baselines.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT

now() { date +%s.%N; }
secs() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", b - a }'; }
add() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a + b }'; }
size() { stat -c %s "$1"; }
row() { printf '%s\t%s\t%s\n' "$1" "$2" "$3"; }

# run NAME CMD...: run CMD, remember its wall time in t_NAME.
run() {
  local name="$1"; shift
  local t0; t0="$(now)"
  "$@"
  printf -v "t_$name" '%s' "$(secs "$t0" "$(now)")"
}

xz9() { xz -9 -T1 -k -c "$1" >"$2"; }

printf 'method\tbytes\tseconds\n'

# (a) xdelta3 + xz, disk and memory separately.
run xd_disk xdelta3 -e -9 -D -R -f -s "$base_disk" "$custom_disk" "$tmp/disk.vcdiff"
run xd_mem  xdelta3 -e -9 -D -R -f -s "$base_mem" "$custom_mem" "$tmp/mem.vcdiff"
run xz_xd_disk xz9 "$tmp/disk.vcdiff" "$tmp/disk.vcdiff.xz"
run xz_xd_mem  xz9 "$tmp/mem.vcdiff" "$tmp/mem.vcdiff.xz"
row xdelta3-disk "$(size "$tmp/disk.vcdiff")" "$t_xd_disk"
row xdelta3-mem "$(size "$tmp/mem.vcdiff")" "$t_xd_mem"
a_disk="$(size "$tmp/disk.vcdiff.xz")"; a_mem="$(size "$tmp/mem.vcdiff.xz")"
a_disk_t="$(add "$t_xd_disk" "$t_xz_xd_disk")"; a_mem_t="$(add "$t_xd_mem" "$t_xz_xd_mem")"
row xdelta3+xz-disk "$a_disk" "$a_disk_t"
row xdelta3+xz-mem "$a_mem" "$a_mem_t"
row "(a) paper xdelta3+xz total" "$((a_disk + a_mem))" "$(add "$a_disk_t" "$a_mem_t")"

# (a2) the same, tuned: xdelta3's default lzma secondary compression works
# per window, and its 64 MiB source window cannot see base memory pages that
# moved further than that; -S none leaves compression to xz -9 over the
# whole delta, -B covers the whole source (xdelta3 caps it at 2 GiB).
xd_tuned() {  # BASE CUSTOM OUT
  local b; b="$(size "$1")"; (( b > 2147483648 )) && b=2147483648
  (( b < 16777216 )) && b=16777216
  xdelta3 -e -9 -D -R -f -S none -B "$b" -s "$1" "$2" "$3"
}
run xt_disk xd_tuned "$base_disk" "$custom_disk" "$tmp/disk-t.vcdiff"
run xt_mem xd_tuned "$base_mem" "$custom_mem" "$tmp/mem-t.vcdiff"
run xz_xt_disk xz9 "$tmp/disk-t.vcdiff" "$tmp/disk-t.vcdiff.xz"
run xz_xt_mem xz9 "$tmp/mem-t.vcdiff" "$tmp/mem-t.vcdiff.xz"
rm -f "$tmp"/*.vcdiff
t_disk="$(size "$tmp/disk-t.vcdiff.xz")"; t_mem="$(size "$tmp/mem-t.vcdiff.xz")"
t_disk_t="$(add "$t_xt_disk" "$t_xz_xt_disk")"; t_mem_t="$(add "$t_xt_mem" "$t_xz_xt_mem")"
row "xdelta3(-S none -B all)+xz-disk" "$t_disk" "$t_disk_t"
row "xdelta3(-S none -B all)+xz-mem" "$t_mem" "$t_mem_t"
row "(a2) tuned xdelta3+xz total" "$((t_disk + t_mem))" "$(add "$t_disk_t" "$t_mem_t")"

# (b) qcow2 overlay (only differing clusters) + xz; plus xz of whole memory.
qcow2_overlay() {  # CLUSTER_SIZE OUT
  qemu-img create -q -f qcow2 -o cluster_size="$1" -b "$base_disk" -F raw "$2"
  qemu-img rebase -u -b "$custom_disk" -F raw "$2"   # now reads as custom
  qemu-img rebase -b "$base_disk" -F raw "$2"        # copies differing clusters
}
run xz_mem xz9 "$custom_mem" "$tmp/mem.xz"
mem_xz="$(size "$tmp/mem.xz")"
row xz-custom-mem "$mem_xz" "$t_xz_mem"
for cs in 65536 4096; do
  label="qcow2-$((cs / 1024))k"
  run qc qcow2_overlay "$cs" "$tmp/ov-$cs.qcow2"
  run xz_qc xz9 "$tmp/ov-$cs.qcow2" "$tmp/ov-$cs.qcow2.xz"
  b_disk="$(size "$tmp/ov-$cs.qcow2.xz")"; b_disk_t="$(add "$t_qc" "$t_xz_qc")"
  row "$label-disk" "$(size "$tmp/ov-$cs.qcow2")" "$t_qc"
  row "$label+xz-disk" "$b_disk" "$b_disk_t"
  row "(b) $label+xz disk + xz mem total" "$((b_disk + mem_xz))" "$(add "$b_disk_t" "$t_xz_mem")"
done

# (c) unique new chunks (lower bound for chunk-level dedup) + xz.
run uniq python3 "$here/unique_new_chunks.py" "$base_disk" "$base_mem" \
  "$custom_disk" "$custom_mem" -o "$tmp/unique.bin" 2>"$tmp/unique.stats"
run xz_uniq xz9 "$tmp/unique.bin" "$tmp/unique.bin.xz"
row unique-new-chunks-raw "$(size "$tmp/unique.bin")" "$t_uniq"
row "(c) unique-new-chunks+xz" "$(size "$tmp/unique.bin.xz")" "$(add "$t_uniq" "$t_xz_uniq")"
cat "$tmp/unique.stats" >&2
