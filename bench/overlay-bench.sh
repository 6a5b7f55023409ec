#!/usr/bin/env bash
# overlay-bench.sh: measures cloudlet's overlay engine on one image set and prints markdown
# tables: overlay size against the baselines (baselines.sh) and the dedup lower bound, index /
# diff / reconstruct throughput with xz and zstd on 1 and 2 threads, and the segment-size
# trade-off (size vs on-demand decode latency). Everything is measured in the same run.
#
# usage: bench/overlay-bench.sh SETDIR [NAME]
#   SETDIR holds base-disk.img base-mem.img custom-disk.img custom-mem.img
#   (made by bench/make-synthetic.sh or bench/make-debian.sh).
# Needs a release build: cargo build --release -p cloudlet-tools
set -euo pipefail
case "${1:-}" in -h|--help|"") echo "usage: overlay-bench.sh SETDIR [NAME]"; exit 0 ;; esac
set_dir="$(realpath "$1")"; name="${2:-$(basename "$set_dir")}"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
bin="${CLOUDLET_BIN:-$here/../target/release/cloudlet}"
[[ -x "$bin" ]] || { echo "build first: cargo build --release -p cloudlet-tools" >&2; exit 2; }
bd="$set_dir/base-disk.img"; bm="$set_dir/base-mem.img"
cd_="$set_dir/custom-disk.img"; cm="$set_dir/custom-mem.img"
tmp="$(mktemp -d "${TMPDIR:-/tmp}/cloudlet-bench.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT

j() { python3 -c "import json,sys; d=json.load(sys.stdin); print(d$1)"; }
now() { date +%s.%N; }
el() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.3f", b - a }'; }
gbs() { awk -v b="$1" -v s="$2" 'BEGIN { printf "%.2f", (s > 0 ? b / s / 1e9 : 0) }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.3f", (b > 0 ? a / b : 0) }'; }
mib() { awk -v b="$1" 'BEGIN { printf "%.2f", b / 1048576 }'; }
examined=$(( $(stat -c %s "$cd_") + $(stat -c %s "$cm") ))
base_bytes=$(( $(stat -c %s "$bd") + $(stat -c %s "$bm") ))
cat "$bd" "$bm" "$cd_" "$cm" >/dev/null  # warm the page cache: measure CPU, not the device

echo "### Image set: $name"
echo
echo "base disk $(mib "$(stat -c %s "$bd")") MiB, base memory $(mib "$(stat -c %s "$bm")") MiB;" \
  "custom disk $(mib "$(stat -c %s "$cd_")") MiB, custom memory $(mib "$(stat -c %s "$cm")") MiB"
echo

# --- index build -------------------------------------------------------------------------------
echo "| step | threads | seconds | GB/s |"
echo "|---|---|---|---|"
for t in 1 2; do
  home="$tmp/home-idx-$t"
  t0=$(now); "$bin" --home "$home" --threads "$t" add-base --disk "$bd" --memory "$bm" --link >/dev/null
  s=$(el "$t0"); echo "| index build (add-base --link) | $t | $s | $(gbs "$base_bytes" "$s") |"
done
home="$tmp/home-idx-2"
id=$("$bin" --home "$home" list-base --json | j '[0]["id"]')
export CLOUDLET_HOME="$home"

# --- diff and reconstruct, codec x threads -----------------------------------------------------
declare -A size
for codec in xz zstd; do
  for t in 1 2; do
    ov="$tmp/ov-$codec-$t"
    out=$("$bin" --threads "$t" diff "$id" --disk "$cd_" --memory "$cm" -o "$ov" --codec "$codec" --json)
    s=$(echo "$out" | j '["seconds"]'); load=$(echo "$out" | j '["index_load_seconds"]')
    size[$codec]=$(stat -c %s "$ov")
    echo "| diff $codec (index load ${load}s) | $t | $s | $(gbs "$examined" "$s") |"
  done
done
# The pipeline without the codec's cost: zstd level 1 compresses at several hundred MB/s, so
# this row shows what reading, hashing and classifying sustain.
for t in 1 2; do
  out=$("$bin" --threads "$t" diff "$id" --disk "$cd_" --memory "$cm" -o "$tmp/ov-fast" --codec zstd --level 1 --json)
  s=$(echo "$out" | j '["seconds"]')
  echo "| diff zstd -1 (pipeline bound) | $t | $s | $(gbs "$examined" "$s") |"
done
for codec in xz zstd; do
  dec=$("$bin" verify "$tmp/ov-$codec-2" --json)
  dec_ms=$(echo "$dec" | j '["decode_ms_total"]')
  for t in 1 2; do
    rm -rf "$tmp/out"
    out=$("$bin" --threads "$t" reconstruct "$id" "$tmp/ov-$codec-2" -o "$tmp/out" --json)
    s=$(echo "$out" | j '["seconds"]')
    # Decode-bound time: single-thread decode time of all segments, divided over the threads.
    bound=$(awk -v d="$dec_ms" -v t="$t" 'BEGIN { printf "%.3f", d / 1000 / t }')
    echo "| reconstruct $codec (decode-bound ${bound}s = $(ratio "$bound" "$s")× of time) | $t | $s | $(gbs "$examined" "$s") |"
  done
done
cmp "$tmp/out/disk.img" "$cd_" && cmp "$tmp/out/memory.img" "$cm" || { echo "RECONSTRUCTION DIFFERS" >&2; exit 1; }
echo

# --- baselines and lower bound -----------------------------------------------------------------
# baselines.sh is slow (xz -9 of whole memory images): reuse SETDIR/baselines.tsv when it is
# newer than the images, else make it and keep it there.
if [[ -s "$set_dir/baselines.tsv" && "$set_dir/baselines.tsv" -nt "$cd_" && "$set_dir/baselines.tsv" -nt "$cm" ]]; then
  cp "$set_dir/baselines.tsv" "$tmp/baselines.tsv"
else
  bash "$here/baselines.sh" "$bd" "$bm" "$cd_" "$cm" >"$tmp/baselines.tsv" 2>"$tmp/baselines.err"
  cp "$tmp/baselines.tsv" "$set_dir/baselines.tsv"
fi
lower=$(awk -F'\t' '$1 == "(c) unique-new-chunks+xz" { print $2 }' "$tmp/baselines.tsv")

# --- segment sizes -----------------------------------------------------------------------------
echo "| overlay (xz -9, 2 threads) | segment | bytes | × lower bound | decode p50 ms | decode p99 ms |"
echo "|---|---|---|---|---|---|"
for kib in 1024 4096 16384; do
  ov="$tmp/ov-seg-$kib"
  if [[ "$kib" == 16384 ]]; then
    ov="$tmp/ov-xz-2"  # the default, made above
  else
    "$bin" diff "$id" --disk "$cd_" --memory "$cm" -o "$ov" --segment-kib "$kib" >/dev/null
  fi
  v=$("$bin" verify "$ov" --json)
  b=$(stat -c %s "$ov")
  echo "| cloudlet | $((kib / 1024)) MiB | $b | $(ratio "$b" "$lower") | $(echo "$v" | j '["decode_ms_p50"]' | xargs printf '%.1f') | $(echo "$v" | j '["decode_ms_p99"]' | xargs printf '%.1f') |"
done
echo
echo "| method | bytes | × cloudlet default (xz) | seconds |"
echo "|---|---|---|---|"
echo "| **cloudlet overlay, default (xz -9, 16 MiB segments)** | ${size[xz]} | 1.000 | |"
echo "| cloudlet overlay, zstd -19, 16 MiB segments | ${size[zstd]} | $(ratio "${size[zstd]}" "${size[xz]}") | |"
awk -F'\t' -v ours="${size[xz]}" '/total|\(c\)/ { printf "| %s | %s | %.3f | %s |\n", $1, $2, $2 / ours, $3 }' "$tmp/baselines.tsv"
echo
echo "Overlay (default) / dedup lower bound: **$(ratio "${size[xz]}" "$lower")**"
