#!/usr/bin/env bash
# vm-bench.sh: end-to-end VM-synthesis benchmarks on the real test guest (QEMU, TCG here).
#
# Prints markdown tables on stdout (progress on stderr):
#   1. client-side time to the first HTTP 200 of a page the customization created,
#      `cloudlet synthesis --early-start` vs eager, same overlay, alternated in one run,
#      256 MiB and 1 GiB RAM guests, median of N repetitions, ratio eager/early;
#   2. fraction of overlay chunks rebuilt (fetched on demand + filled in background) when the
#      first response arrives, early start only (eager rebuilds 100% before the resume);
#   3. overlay size with/without TRIM and with/without balloon free-page reporting, plus the
#      baselines of bench/baselines.sh on the same captured images (256 MiB guest only);
#   4. capture time (`cloudlet overlay` report) for the same customization on 256 MiB,
#      1 GiB and 8 GiB guest disks (images are sparse; the trace should make this flat).
#
# The customization ("app", see write_scripts) is meant to give the overlay a realistic
# payload: 4 MiB of incompressible assets plus a page under /srv/www/app (disk + page cache),
# and a 64 MiB tmpfs "heap" filled from /dev/urandom that stays resident (memory that the
# overlay must carry and cannot compress).  It then writes and deletes 16 MiB of scratch on
# disk and 32 MiB in tmpfs (so TRIM and free-page reporting have something to drop), with or
# without TRIM (no-TRIM: `mount -o remount,nodiscard /` first, since the test guest mounts / with
# -o discard; TRIM: online discard plus `fstrim /`), and sleeps so the balloon's free page reporting (2 s delay in Linux)
# runs before the capture.
#
# One QEMU at a time, everything sequential: the bench is meant for a shared 2-core box.
# SC2155: local x=$(...) is fine here (set -e is not relied on for those); SC2016: guest
# scripts are single-quoted on purpose, $((6*7)) expands in the guest.
# shellcheck disable=SC2155,SC2016
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/.." && pwd)

usage() {
  cat <<EOF
usage: vm-bench.sh [-n REPS] [-s SECTIONS] [-w WORKDIR] [-B] [-k]
  -n REPS      synthesis repetitions per mode and guest size (default 3; median reported)
  -s SECTIONS  which sections to run, any of 1234 (default 1234; 1 and 2 share the runs)
  -w WORKDIR   scratch dir (default: fresh mktemp -d under /var/tmp); holds CLOUDLET_HOME
  -B           skip bench/baselines.sh in section 3 (xz -9 of 256 MiB memory: minutes)
  -k           keep WORKDIR afterwards (default: removed)
env: CLOUDLET_BIN (default target/release/cloudlet), GUEST_DIR (256 MiB-disk guest, default
     ~/.cache/cloudlet-guest), GUEST_DIR_1024 / GUEST_DIR_8192 (built on demand with
     tools/guest/build-guest.sh), HTTP_TIMEOUT (s, default 300).
Build first: cargo build --release --workspace
EOF
}

REPS=3 SECTIONS=1234 WORK='' BASELINES=1 KEEP=0
while getopts "n:s:w:Bkh" opt; do
  case $opt in
    n) REPS=$OPTARG ;;
    s) SECTIONS=$OPTARG ;;
    w) WORK=$OPTARG ;;
    B) BASELINES=0 ;;
    k) KEEP=1 ;;
    h) usage; exit 0 ;;
    *) usage >&2; exit 2 ;;
  esac
done
[[ $REPS =~ ^[1-9][0-9]*$ ]] || { echo "vm-bench: -n needs a positive integer" >&2; exit 2; }

CLOUDLET=${CLOUDLET_BIN:-$REPO/target/release/cloudlet}
GUEST_DIR=${GUEST_DIR:-$HOME/.cache/cloudlet-guest}
GUEST_DIR_1024=${GUEST_DIR_1024:-$HOME/.cache/cloudlet-guest-1024}
GUEST_DIR_8192=${GUEST_DIR_8192:-$HOME/.cache/cloudlet-guest-8192}
HTTP_TIMEOUT=${HTTP_TIMEOUT:-300}
[[ -x $CLOUDLET ]] || { echo "vm-bench: $CLOUDLET missing; cargo build --release --workspace" >&2; exit 1; }
for t in jq curl fusermount3 python3; do
  command -v $t >/dev/null || { echo "vm-bench: missing tool: $t" >&2; exit 1; }
done

if [[ -z $WORK ]]; then WORK=$(mktemp -d /var/tmp/cloudlet-vm-bench.XXXXXX); fi
mkdir -p "$WORK"
WORK=$(cd "$WORK" && pwd)
# A private registry: bases from other runs/users never mix into the numbers.
export CLOUDLET_HOME=$WORK/home
T0=$(date +%s)

log() { printf '[vm-bench %s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }
has() { [[ $SECTIONS == *"$1"* ]]; }

# ------------------------------------------------------------------ cleanup
# Synthesis processes are tracked by pid (never killed by name: other people's VMs may run
# on this box).  Their cloudletfs mounts live under $CLOUDLET_HOME/tmp; a killed synthesis
# can leave a stale FUSE mount, which would also make `rm -rf` of WORK fail.
SYN_PIDS=()
cleanup() {
  local rc=$? p m
  for p in "${SYN_PIDS[@]}"; do
    if kill -0 "$p" 2>/dev/null; then
      kill -TERM "$p" 2>/dev/null || true
      for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.2; done
      kill -KILL "$p" 2>/dev/null || true
    fi
  done
  for m in "$CLOUDLET_HOME"/tmp/*/mnt; do
    [[ -d $m ]] && mountpoint -q "$m" 2>/dev/null && { fusermount3 -u "$m" 2>/dev/null || fusermount3 -uz "$m" 2>/dev/null || true; }
  done
  if (( KEEP )); then log "work dir kept: $WORK"; else rm -rf "$WORK" 2>/dev/null || log "could not remove $WORK"; fi
  log "total wall time: $(( $(date +%s) - T0 )) s"
  exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ------------------------------------------------------------------ helpers
median() { sort -g | awk '{a[NR]=$1} END {if (NR==0) {print "nan"} else if (NR%2) {print a[(NR+1)/2]} else {print (a[NR/2]+a[NR/2+1])/2}}'; }
mib() { awk -v b="$1" 'BEGIN {printf "%.1f", b/1048576}'; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

guest_dir() { # $1 = disk MiB; builds (cached) guests other than the default one
  case $1 in
    256) echo "$GUEST_DIR" ;;
    1024) GUEST_DISK_MB=1024 bash "$REPO/tools/guest/build-guest.sh" "$GUEST_DIR_1024" >&2; echo "$GUEST_DIR_1024" ;;
    8192) GUEST_DISK_MB=8192 bash "$REPO/tools/guest/build-guest.sh" "$GUEST_DIR_8192" >&2; echo "$GUEST_DIR_8192" ;;
  esac
}

make_base() { # $1 = disk MiB, $2 = RAM MiB, $3 = extra flag (--balloon or ""); prints base id
  # Cached per WORKDIR (-w): rerunning some sections reuses the bases and overlays made before.
  local key=$WORK/base-$1-$2${3:-}.id
  if [[ -s $key && -d $CLOUDLET_HOME/bases/$(cat "$key") ]]; then cat "$key"; return; fi
  local g; g=$(guest_dir "$1")
  local cmdline; cmdline=$(jq -r .cmdline "$g/guest.json")
  local t=$(date +%s.%N)
  # shellcheck disable=SC2086
  "$CLOUDLET" base "$g/disk.img" --memory-mb "$2" --kernel "$g/vmlinuz" --initrd "$g/initrd.img" \
    --append "$cmdline" --ready CLOUDLET-GUEST-READY ${3:-} | tail -n1 | tee "$key"
  log "base disk=$1 MiB ram=$2 MiB ${3:-} took $(awk -v a="$t" -v b="$(date +%s.%N)" 'BEGIN{printf "%.0f", b-a}') s"
}

# The customization scripts.  Each line runs on the guest's serial console (sh -c LINE).
write_scripts() {
  local app scratch
  app='mkdir -p /srv/www/app
dd if=/dev/urandom of=/srv/www/app/assets.bin bs=1M count=4
echo "<html><body>app-ready-$((6*7))</body></html>" > /srv/www/app/index.html
mkdir -p /app-heap
mount -t tmpfs -o size=160m tmpfs /app-heap
dd if=/dev/urandom of=/app-heap/heap bs=1M count=64
wget -qO- http://127.0.0.1:8080/app/index.html
wget -qO- http://127.0.0.1:8080/cgi-bin/counter
sync'
  # Scratch that is created and thrown away: TRIM / free page reporting should drop it.
  scratch='dd if=/dev/urandom of=/scratch.bin bs=1M count=16
sync
rm /scratch.bin
sync'
  # The guest's initramfs mounts / with -o discard (online TRIM on every delete), so the
  # no-TRIM variant first remounts without it; otherwise rm alone already trims.
  printf 'mount -o remount,nodiscard /\n%s\n%s\n%s\n' "$app" "$scratch" 'dd if=/dev/urandom of=/app-heap/tmp bs=1M count=32
rm /app-heap/tmp
sleep 8' >"$WORK/custom-notrim.sh"
  printf '%s\n%s\nfstrim /\n%s\n' "$app" "$scratch" 'dd if=/dev/urandom of=/app-heap/tmp bs=1M count=32
rm /app-heap/tmp
sleep 8' >"$WORK/custom-trim.sh"
}

# make_overlay NAME BASE SCRIPT [extra args]: runs `cloudlet overlay`, keeps report + info.
make_overlay() {
  local name=$1 base=$2 script=$3; shift 3
  # Cached per WORKDIR like the bases (the base id is part of the key).
  if [[ -s $WORK/$name.info.json && $(cat "$WORK/$name.base" 2>/dev/null) == "$base" ]]; then
    log "overlay $name: cached"; return
  fi
  local t=$(date +%s.%N)
  "$CLOUDLET" overlay "$base" -o "$WORK/$name.overlay" --run "$script" --json "$@" >"$WORK/$name.report.json"
  "$CLOUDLET" info-overlay "$WORK/$name.overlay" --json >"$WORK/$name.info.json"
  echo "$base" >"$WORK/$name.base"
  log "overlay $name: $(mib "$(jq .overlay_bytes "$WORK/$name.report.json")") MiB," \
      "$(awk -v a="$t" -v b="$(date +%s.%N)" 'BEGIN{printf "%.0f", b-a}') s wall"
}

# synth_once BASE OVERLAY MODE(early|eager) OUTPREFIX: prints seconds and 6 percentages (below)
synth_once() {
  local base=$1 ov=$2 mode=$3 pre=$4 port; port=$(free_port)
  local flag=(); [[ $mode == early ]] && flag=(--early-start)
  local t0=$(date +%s.%N)
  "$CLOUDLET" synthesis "$base" "$ov" "${flag[@]}" --hostfwd "tcp:127.0.0.1:$port-:8080" --json \
    >"$pre.out" 2>"$pre.err" &
  local pid=$!
  SYN_PIDS+=("$pid")
  local mnt=$CLOUDLET_HOME/tmp/synthesis-$pid-0/mnt ok=0 t1
  # Don't poll before the "VM resumed" event: QEMU's hostfwd port accepts connections while
  # the guest is still paused, and slirp's SYN to the guest is then only retransmitted after
  # ~1-3 s (first try showed a fixed ~5 s artifact = curl's -m).  A real client would just
  # retry; waiting for the event (polled every 20 ms) keeps that artifact out of the number.
  # The clock still starts at the launch of `cloudlet synthesis`.
  while ! grep -q '"VM resumed"' "$pre.out" 2>/dev/null; do
    kill -0 "$pid" 2>/dev/null || break
    awk -v a="$t0" -v b="$(date +%s.%N)" -v l="$HTTP_TIMEOUT" 'BEGIN{exit !(b-a>l)}' && break
    sleep 0.02
  done
  # Then poll the page the customization created until the first HTTP 200.  -m 2 bounds a
  # request that still hits a not-yet-listening guest; a slow on-demand fetch just retries.
  while :; do
    if curl -s -o /dev/null -m 2 -w '%{http_code}' "http://127.0.0.1:$port/app/index.html" 2>/dev/null | grep -q '^200$'; then
      t1=$(date +%s.%N); ok=1; break
    fi
    kill -0 "$pid" 2>/dev/null || break
    awk -v a="$t0" -v b="$(date +%s.%N)" -v l="$HTTP_TIMEOUT" 'BEGIN{exit !(b-a>l)}' && break
    sleep 0.05
  done
  # Read the stats right away: the background filler keeps going while we look.
  cp "$mnt/disk/stats" "$pre.disk-stats.json" 2>/dev/null || echo '{}' >"$pre.disk-stats.json"
  cp "$mnt/memory/stats" "$pre.memory-stats.json" 2>/dev/null || echo '{}' >"$pre.memory-stats.json"
  kill -TERM "$pid" 2>/dev/null || true
  wait "$pid" || log "synthesis $pid exited with $? (see $pre.err)"
  if (( ! ok )); then log "no HTTP 200 from synthesis ($mode), see $pre.err"; echo "nan nan nan nan nan nan nan"; return; fi
  local d=$pre.disk-stats.json m=$pre.memory-stats.json
  # Rebuilt = fetched_on_demand + filled_in_background, over chunks.in_overlay.
  local dr di mr mi dd md
  dr=$(jq '((.image // .).chunks.fetched_on_demand // 0) + ((.image // .).chunks.filled_in_background // 0)' "$d")
  dd=$(jq '(.image // .).chunks.fetched_on_demand // 0' "$d")
  di=$(jq '(.image // .).chunks.in_overlay // 0' "$d")
  mr=$(jq '((.image // .).chunks.fetched_on_demand // 0) + ((.image // .).chunks.filled_in_background // 0)' "$m")
  md=$(jq '(.image // .).chunks.fetched_on_demand // 0' "$m")
  mi=$(jq '(.image // .).chunks.in_overlay // 0' "$m")
  # seconds, % rebuilt (demand + background): total disk memory, % on demand only: total disk memory
  awk -v a="$t0" -v b="$t1" -v dr="$dr" -v di="$di" -v mr="$mr" -v mi="$mi" -v dd="$dd" -v md="$md" '
    function pct(x, y) { return y ? 100 * x / y : 0 }
    BEGIN { printf "%.2f %.1f %.1f %.1f %.1f %.1f %.1f\n", b - a, pct(dr + mr, di + mi), pct(dr, di),
            pct(mr, mi), pct(dd + md, di + mi), pct(dd, di), pct(md, mi) }'
}

write_scripts
echo "# cloudlet VM bench ($(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc) vCPU $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//'), $(qemu-system-x86_64 --version 2>/dev/null | head -n1), reps=$REPS)"
echo

BASE_256=
if has 1 || has 2 || has 3 || has 4; then
  log "base: 256 MiB RAM, 256 MiB disk"
  BASE_256=$(make_base 256 256 "")
  make_overlay app256 "$BASE_256" "$WORK/custom-trim.sh" --keep-capture "$WORK/capture256"
fi

# ------------------------------------------------------------------ sections 1 + 2
if has 1 || has 2; then
  log "base: 1 GiB RAM, 256 MiB disk"
  BASE_1G=$(make_base 256 1024 "")
  make_overlay app1g "$BASE_1G" "$WORK/custom-trim.sh"
  : >"$WORK/synth.tsv"
  for ram in 256 1024; do
    if [[ $ram == 256 ]]; then b=$BASE_256 ov=$WORK/app256.overlay; else b=$BASE_1G ov=$WORK/app1g.overlay; fi
    # One uncounted warm-up: the first synthesis of a run was consistently 2-5 s slower
    # (cold QEMU binary / overlay pages), whichever mode went first.
    synth_once "$b" "$ov" eager "$WORK/syn-$ram-warmup" >/dev/null
    for r in $(seq "$REPS"); do
      # Alternate which mode goes first, so drift (page cache, other load) hits both.
      if (( r % 2 )); then modes="early eager"; else modes="eager early"; fi
      for mode in $modes; do
        res=$(synth_once "$b" "$ov" "$mode" "$WORK/syn-$ram-$mode-$r")
        log "ram=$ram $mode rep $r: $res (s, %rebuilt total/disk/mem, %on-demand total/disk/mem)"
        echo "$ram $mode $r $res" >>"$WORK/synth.tsv"
      done
    done
  done
  col() { awk -v r="$1" -v m="$2" -v c="$3" '$1==r && $2==m && $4!="nan" {print $c}' "$WORK/synth.tsv" | median; }
  if has 1; then
    echo "## 1. Time to first HTTP 200 of /app/index.html (client side, from launching \`cloudlet synthesis\`; median of $REPS)"
    echo
    echo "| guest RAM | overlay MiB | early start s | eager s | eager / early | all runs early | all runs eager |"
    echo "|---|---|---|---|---|---|---|"
    for ram in 256 1024; do
      name=app256; [[ $ram == 1024 ]] && name=app1g
      e=$(col $ram early 4) g=$(col $ram eager 4)
      runs() { awk -v r="$1" -v m="$2" '$1==r && $2==m {printf "%s%s", s, $4; s=" "}' "$WORK/synth.tsv"; }
      echo "| $ram MiB | $(mib "$(jq .overlay_bytes "$WORK/$name.report.json")") | $e | $g |" \
        "$(awk -v e="$e" -v g="$g" 'BEGIN{ if (e>0) printf "%.2f", g/e; else print "nan"}') | $(runs $ram early) | $(runs $ram eager) |"
    done
    echo
  fi
  if has 2; then
    echo "## 2. Overlay chunks rebuilt when the first response arrives (early start; median of $REPS)"
    echo
    echo "rebuilt = fetched_on_demand + filled_in_background; on demand = fetched_on_demand only"
    echo "(the chunks the guest actually needed), both over chunks.in_overlay of disk/stats and memory/stats."
    echo
    echo "| guest RAM | disk chunks in overlay | memory chunks in overlay | rebuilt total % | rebuilt disk % | rebuilt mem % | on demand total % | on demand disk % | on demand mem % |"
    echo "|---|---|---|---|---|---|---|---|---|"
    for ram in 256 1024; do
      di=$(jq '(.image // .).chunks.in_overlay // "?"' "$WORK/syn-$ram-early-1.disk-stats.json")
      mi=$(jq '(.image // .).chunks.in_overlay // "?"' "$WORK/syn-$ram-early-1.memory-stats.json")
      echo "| $ram MiB | $di | $mi | $(col $ram early 5) | $(col $ram early 6) | $(col $ram early 7)" \
        "| $(col $ram early 8) | $(col $ram early 9) | $(col $ram early 10) |"
    done
    echo
  fi
fi

# ------------------------------------------------------------------ section 3
if has 3; then
  log "base: 256 MiB RAM with --balloon"
  BASE_BAL=$(make_base 256 256 --balloon)
  make_overlay notrim256 "$BASE_256" "$WORK/custom-notrim.sh"
  make_overlay balloon256 "$BASE_BAL" "$WORK/custom-trim.sh"
  echo "## 3. Overlay size, 256 MiB RAM / 256 MiB disk guest, same customization"
  echo
  echo "| variant | overlay MiB | disk changed chunks | memory changed chunks | disk_discarded |"
  echo "|---|---|---|---|---|"
  for v in "notrim256|no TRIM (nodiscard, no fstrim), no balloon" "app256|TRIM (discard + fstrim), no balloon" "balloon256|TRIM + balloon free page reporting"; do
    n=${v%%|*} label=${v#*|}
    echo "| $label | $(mib "$(jq .overlay_bytes "$WORK/$n.report.json")") | $(jq '.disk.changed_chunks' "$WORK/$n.info.json")" \
      "| $(jq '.memory.changed_chunks' "$WORK/$n.info.json") | $(jq .disk_discarded "$WORK/$n.report.json") |"
  done
  echo
fi

# ------------------------------------------------------------------ section 4
if has 4; then
  for dmb in 1024 8192; do
    log "base: 256 MiB RAM, $dmb MiB disk"
    bid=$(make_base $dmb 256 "")
    make_overlay disk$dmb "$bid" "$WORK/custom-trim.sh"
  done
  cp "$WORK/app256.report.json" "$WORK/disk256.report.json"
  echo "## 4. Capture cost vs guest disk size (256 MiB RAM, same customization)"
  echo
  echo "| disk | resume s | capture s | diff s | disk_candidates | memory_candidates | overlay MiB |"
  echo "|---|---|---|---|---|---|---|"
  for dmb in 256 1024 8192; do
    f=$WORK/disk$dmb.report.json
    echo "| $dmb MiB | $(jq '.resume_seconds*100|round/100' "$f") | $(jq '.capture_seconds*100|round/100' "$f")" \
      "| $(jq '.diff_seconds*100|round/100' "$f") | $(jq .disk_candidates "$f") | $(jq .memory_candidates "$f") | $(mib "$(jq .overlay_bytes "$f")") |"
  done
  echo
fi
# Baselines last: they take minutes (xz -9 of whole images) and need no VM.
if has 3 && (( BASELINES )); then
  bd=$CLOUDLET_HOME/bases/$BASE_256
  log "baselines.sh on base vs captured images of the 'fstrim, no balloon' overlay (slow)"
  if bash "$REPO/bench/baselines.sh" "$bd/disk.img" "$bd/memory.img" \
       "$WORK/capture256/disk.img" "$WORK/capture256/memory.img" >"$WORK/baselines.tsv" 2>"$WORK/baselines.err"; then
    echo "Baselines on the same captured images (fstrim, no balloon); cloudlet overlay: $(mib "$(jq .overlay_bytes "$WORK/app256.report.json")") MiB"
    echo
    echo "| method | MiB | seconds |"
    echo "|---|---|---|"
    awk -F'\t' 'NR==1 && $2 !~ /^[0-9]+$/ {next} {printf "| %s | %.1f | %s |\n", $1, $2/1048576, $3}' "$WORK/baselines.tsv"
    echo
  else
    log "baselines.sh failed: $(tail -n3 "$WORK/baselines.err")"
  fi
fi
echo "_script wall time: $(( $(date +%s) - T0 )) s_"
