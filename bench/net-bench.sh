#!/usr/bin/env bash
# net-bench.sh: synthesis over the network (`cloudlet server` + `cloudlet client`) on the real
# test guest (QEMU, TCG here), with the client's upload throttled to WAN/WiFi-like rates.
#
# Measures, for one guest (256 MiB RAM, or -m) and one overlay, the client-side time from starting
# `cloudlet client` to the first HTTP 200 of the page the customization created, fetched
# through the host port the client reports for guest port 8080:
#   * --rate-limit 10, 38 (the MobiSys'13 paper's WiFi) and 100 Mbit/s;
#   * early start (`--early-start`: VM resumes once the metadata is in, segments on demand)
#     vs full transfer first (no --early-start: the VM resumes after every segment is in);
#   * median of N runs, the two modes alternated per repetition so drift hits both.
# For early start it also reports the segments the server asked for on demand up to the first
# 200 (the client's `closed` event after we end the session there) and, cheaply, the server's
# RSS growth per session (VmRSS of `cloudlet server` at the first 200 minus idle; the VM's
# RAM lives in QEMU, so this is the server's own cost: buffers, cloudletfs caches, threads).
#
# The customization follows bench/vm-bench.sh but is kept moderate so that a 10 Mbit/s
# transfer stays under a minute: 4 MiB of random assets + a page on disk, and a 32 MiB tmpfs
# "heap" from /dev/urandom that stays resident (incompressible memory), overlay ~50 MiB.
#
# One QEMU at a time (one session at a time): the bench is meant for a shared 2-core box.
#
# With -S it measures server memory per session instead (a memory figure, not a timing):
# with 0, then N concurrent sessions (-S "1 4 16", unthrottled, full transfer, each one's
# page checked with an HTTP 200), the VmRSS / RssAnon / RssFile / threads of `cloudlet server`
# (cloudletfs runs inside it, one FUSE mount per session) and the summed VmRSS of the
# sessions' QEMU processes (pids from `cloudlet list-session --json`); then every session is
# ended and the server's RSS is read again, idle.
# shellcheck disable=SC2155,SC2016
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/.." && pwd)

usage() {
  cat <<EOF
usage: net-bench.sh [-g GUEST] [-n REPS] [-r RATES] [-m MEM_MB] [-p] [-S COUNTS] [-w WORKDIR] [-k]
  -g GUEST    busybox (default: cloudlet's small test guest, 256 MiB) or debian (the stock
              Debian bookworm guest of tools/guest/build-debian.sh, 1 GiB, systemd; customized
              through the guest agent with a Flask + numpy service)
  -n REPS     repetitions per rate and mode (default 3; median reported)
  -m MEM_MB   guest RAM in MiB (default 256, 1024 with -g debian)
  -p          profile the working set (cloudlet overlay --profile-url): the overlay stores
              first what a resumed VM touches until its first answer, not what the
              customization touched
  -r RATES    space-separated upload rates in Mbit/s (default "10 38 100"; 1 Mbit = 10^6 bit)
  -G          (with -g debian) guest-side benchmark instead, via cloudlet synthesis (eager):
              seconds from start to the first answer, then in the guest the app's /bench
              (numpy sums over its 32 MiB model, 64 MiB of fresh pages) and /io (32 MiB
              written + fsync, caches dropped, read back), REPS runs each, in three setups
              alternated: as shipped; without the huge-page filter
              (CLOUDLET_QEMU_HUGEPAGE=keep); unconfined (filter off, --qemu-as-root,
              --no-cgroup; seccomp and restrict=on cannot be turned off)
  -S COUNTS   measure server memory per session instead of time to first response, with
              these space-separated numbers of concurrent sessions (e.g. "1 4 16")
  -w WORKDIR  scratch dir (default: fresh mktemp -d under /var/tmp); holds CLOUDLET_HOME,
              base and overlay are reused when the same WORKDIR is given again
  -k          keep WORKDIR afterwards (default: removed)
env: CLOUDLET_BIN (default target/release/cloudlet), GUEST_DIR (busybox: 256 MiB-disk test
     guest, default ~/.cache/cloudlet-guest, built by tools/guest/build-guest.sh if missing;
     debian: default target/guest-cache/debian-bookworm, built by build-debian.sh if missing),
     HTTP_TIMEOUT (s per run, default 300), OVERLAY_ARGS (more options of cloudlet overlay for
     the Debian customization, e.g. "--segment-kib 1024"; give a new -w WORKDIR or remove its
     overlay when they change).
Build first: cargo build --release --workspace
EOF
}

REPS=3 RATES="10 38 100" MEM_MB='' PROFILE=0 WORK='' KEEP=0 COUNTS='' GUEST=busybox GBENCH=0
while getopts "g:n:r:m:pGS:w:kh" opt; do
  case $opt in
    G) GBENCH=1 ;;
    g) GUEST=$OPTARG ;;
    n) REPS=$OPTARG ;;
    m) MEM_MB=$OPTARG ;;
    p) PROFILE=1 ;;
    r) RATES=$OPTARG ;;
    S) COUNTS=$OPTARG ;;
    w) WORK=$OPTARG ;;
    k) KEEP=1 ;;
    h) usage; exit 0 ;;
    *) usage >&2; exit 2 ;;
  esac
done
[[ $GUEST == busybox || $GUEST == debian ]] || { echo "net-bench: -g is busybox or debian" >&2; exit 2; }
[[ -n $MEM_MB ]] || { MEM_MB=256; [[ $GUEST == debian ]] && MEM_MB=1024; }
[[ $REPS =~ ^[1-9][0-9]*$ ]] || { echo "net-bench: -n needs a positive integer" >&2; exit 2; }
[[ $MEM_MB =~ ^[1-9][0-9]*$ ]] || { echo "net-bench: -m needs a positive integer" >&2; exit 2; }
[[ -z $COUNTS || $COUNTS =~ ^[1-9][0-9]*( [1-9][0-9]*)*$ ]] || { echo "net-bench: -S needs positive integers" >&2; exit 2; }

CLOUDLET=${CLOUDLET_BIN:-$REPO/target/release/cloudlet}
if [[ $GUEST == debian ]]; then
  GUEST_DIR=${GUEST_DIR:-$REPO/target/guest-cache/debian-bookworm}
else
  GUEST_DIR=${GUEST_DIR:-$HOME/.cache/cloudlet-guest}
fi
HTTP_TIMEOUT=${HTTP_TIMEOUT:-300}
OVERLAY_ARGS=${OVERLAY_ARGS:-}
[[ -x $CLOUDLET ]] || { echo "net-bench: $CLOUDLET missing; cargo build --release --workspace" >&2; exit 1; }
for t in jq curl python3 fusermount3; do
  command -v $t >/dev/null || { echo "net-bench: missing tool: $t" >&2; exit 1; }
done

if [[ -z $WORK ]]; then WORK=$(mktemp -d /var/tmp/cloudlet-net-bench.XXXXXX); fi
mkdir -p "$WORK"
WORK=$(cd "$WORK" && pwd)
# A private registry: the server only sees the base made here.
export CLOUDLET_HOME=$WORK/home
T0=$(date +%s)

log() { printf '[net-bench %s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }
now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN{printf "%.2f", b-a}'; }
median() { sort -g | awk '{a[NR]=$1} END {if (NR==0) {print "nan"} else if (NR%2) {print a[(NR+1)/2]} else {print (a[NR/2]+a[NR/2+1])/2}}'; }
mib() { awk -v b="$1" 'BEGIN {printf "%.1f", b/1048576}'; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
rss_kib() { status_kib "$1" VmRSS; }
# status_kib PID FIELD: a kB field of /proc/PID/status (0 if the process is gone)
status_kib() { awk -v f="$2:" '$1==f {print $2; found=1} END {if (!found) print 0}' "/proc/$1/status" 2>/dev/null || echo 0; }

# ------------------------------------------------------------------ cleanup
# Only the processes started here, by pid (other people's VMs may run on this box).  The
# server ends its sessions (VMs stopped, mounts removed) on SIGTERM; clients on SIGINT.
SERVER_PID='' CLIENT_PIDS=()
stop_pid() { # $1 pid, $2 signal; waits up to 30 s, then SIGKILL
  local p=$1
  kill -0 "$p" 2>/dev/null || return 0
  kill "-$2" "$p" 2>/dev/null || true
  for _ in $(seq 150); do kill -0 "$p" 2>/dev/null || break; sleep 0.2; done
  kill -KILL "$p" 2>/dev/null || true
  wait "$p" 2>/dev/null || true
}
cleanup() {
  local rc=$? p m
  for p in "${CLIENT_PIDS[@]}"; do stop_pid "$p" INT; done
  [[ -n $SERVER_PID ]] && stop_pid "$SERVER_PID" TERM
  # A server killed hard can leave a stale FUSE mount, which would make rm -rf fail.
  for m in "$CLOUDLET_HOME"/tmp/*/mnt; do
    [[ -d $m ]] && mountpoint -q "$m" 2>/dev/null && { fusermount3 -u "$m" 2>/dev/null || fusermount3 -uz "$m" 2>/dev/null || true; }
  done
  if (( KEEP )); then log "work dir kept: $WORK"; else rm -rf "$WORK" 2>/dev/null || log "could not remove $WORK"; fi
  log "total wall time: $(( $(date +%s) - T0 )) s"
  exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ------------------------------------------------------------------ base + overlay
if [[ $GUEST == debian ]]; then
  [[ -s $GUEST_DIR/guest.json ]] || bash "$REPO/tools/guest/build-debian.sh" "$GUEST_DIR" >&2
else
  [[ -s $GUEST_DIR/disk.img ]] || bash "$REPO/tools/guest/build-guest.sh" "$GUEST_DIR" >&2
fi
if [[ ! -s $WORK/base.id || ! -d $CLOUDLET_HOME/bases/$(cat "$WORK/base.id") ]]; then
  log "base: $GUEST guest, $MEM_MB MiB RAM"
  t=$(now)
  if [[ $GUEST == debian ]]; then
    # The image's own bootloader; captured at root's prompt once the guest agent answers.
    "$CLOUDLET" base "$GUEST_DIR/disk.img" --memory-mb "$MEM_MB" --guest-agent \
      --ready "$(jq -r .ready_prompt "$GUEST_DIR/guest.json")" --ready-agent \
      | tail -n1 >"$WORK/base.id"
  else
    "$CLOUDLET" base "$GUEST_DIR/disk.img" --memory-mb "$MEM_MB" --kernel "$GUEST_DIR/vmlinuz" \
      --initrd "$GUEST_DIR/initrd.img" --append "$(jq -r .cmdline "$GUEST_DIR/guest.json")" \
      --ready CLOUDLET-GUEST-READY | tail -n1 >"$WORK/base.id"
  fi
  log "base took $(elapsed "$t") s"
fi
BASE=$(cat "$WORK/base.id")
APP=app; (( PROFILE )) && APP=app-profiled
OV=$WORK/$APP.overlay
if [[ $GUEST == debian && ( ! -s $WORK/$APP.report.json || ! -s $OV ) ]]; then
  # A Python web service as a user would install it: Flask + numpy, a systemd unit, 4 MiB of
  # assets on disk, a 32 MiB numpy "model" made at start (incompressible, stays resident).
  cat >"$WORK/app.py" <<'EOF'
import os
import time
import numpy as np
from flask import Flask

app = Flask(__name__)
model = np.frombuffer(os.urandom(32 << 20), dtype=np.uint8)
assets = "/srv/assets.bin"


@app.get("/app/index.html")
def index():
    with open(assets, "rb") as f:
        head = f.read(4096)
    score = int(model[: 1 << 20].sum() % 1000) + len(head)
    return f"<html><body>app-ready-{6 * 7} {score}</body></html>"


@app.get("/io")
def io():
    t = time.perf_counter()
    block = os.urandom(1 << 20)
    with open("/var/tmp/io.bin", "wb") as f:
        for _ in range(32):
            f.write(block)
        f.flush()
        os.fsync(f.fileno())
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3")
    with open("/var/tmp/io.bin", "rb") as f:
        while f.read(1 << 20):
            pass
    return f"{time.perf_counter() - t:.4f}"


@app.get("/bench")
def bench():
    t = time.perf_counter()
    total = 0
    for _ in range(5):
        total += int(model.sum())
    fresh = bytearray(64 << 20)
    fresh[::4096] = b"\x01" * (len(fresh) // 4096)
    return f"{time.perf_counter() - t:.4f} {total % 7}"


app.run(host="0.0.0.0", port=8080)
EOF
  cat >"$WORK/cloudlet-app.service" <<'EOF'
[Unit]
Description=cloudlet bench app
After=network.target

[Service]
ExecStart=/usr/bin/python3 /srv/cloudlet-app.py

[Install]
WantedBy=multi-user.target
EOF
  cat >"$WORK/custom.sh" <<'EOF'
dd if=/dev/urandom of=/srv/assets.bin bs=1M count=4
systemctl daemon-reload
systemctl enable --now cloudlet-app.service
sync
fstrim /
EOF
  fwd=$(free_port)
  prof=()
  (( PROFILE )) && prof=(--profile-url "http://127.0.0.1:$fwd/app/index.html")
  log "overlay: customizing the Debian guest through the agent"
  t=$(now)
  "$CLOUDLET" overlay "$BASE" -o "$OV" --channel agent --run "$WORK/custom.sh" \
    --copy "$WORK/app.py:/srv/cloudlet-app.py" \
    --copy "$WORK/cloudlet-app.service:/etc/systemd/system/cloudlet-app.service" \
    --hostfwd "tcp:127.0.0.1:$fwd-:8080" --ready-http "http://127.0.0.1:$fwd/app/index.html" \
    "${prof[@]}" $OVERLAY_ARGS --json >"$WORK/$APP.report.json"
  log "overlay: working set $(jq .working_set_chunks "$WORK/$APP.report.json") chunks from the $(jq -r .working_set_from "$WORK/$APP.report.json")"
  log "overlay: $(mib "$(stat -c %s "$OV")") MiB, $(elapsed "$t") s"
fi
if [[ ! -s $WORK/$APP.report.json || ! -s $OV ]]; then
  # Each line runs on the guest's serial console.  fstrim + the deleted scratch mirror
  # vm-bench's TRIM variant; the sleep lets the writes settle before the capture.
  cat >"$WORK/custom.sh" <<'EOF'
mkdir -p /srv/www/app
dd if=/dev/urandom of=/srv/www/app/assets.bin bs=1M count=4
echo "<html><body>app-ready-$((6*7))</body></html>" > /srv/www/app/index.html
mkdir -p /app-heap
mount -t tmpfs -o size=64m tmpfs /app-heap
dd if=/dev/urandom of=/app-heap/heap bs=1M count=32
wget -qO- http://127.0.0.1:8080/app/index.html
sync
fstrim /
sleep 4
EOF
  log "overlay: customizing"
  t=$(now)
  prof=()
  if (( PROFILE )); then
    fwd=$(free_port)
    prof=(--hostfwd "tcp:127.0.0.1:$fwd-:8080" --profile-url "http://127.0.0.1:$fwd/app/index.html")
  fi
  "$CLOUDLET" overlay "$BASE" -o "$OV" --run "$WORK/custom.sh" "${prof[@]}" --json \
    >"$WORK/$APP.report.json"
  log "overlay: working set $(jq .working_set_chunks "$WORK/$APP.report.json") chunks from the $(jq -r .working_set_from "$WORK/$APP.report.json")"
  log "overlay: $(mib "$(stat -c %s "$OV")") MiB, $(elapsed "$t") s"
fi
OV_MIB=$(mib "$(stat -c %s "$OV")")
"$CLOUDLET" info-overlay "$OV" --json >"$WORK/$APP.info.json"

# ------------------------------------------------------------------ server
TOKEN=$WORK/token
head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$TOKEN"
SPORT=$(free_port)
MAXS=1
for n in $COUNTS; do (( n > MAXS )) && MAXS=$n; done
"$CLOUDLET" server --listen "127.0.0.1:$SPORT" --token-file "$TOKEN" --max-sessions "$MAXS" \
  >"$WORK/server.out" 2>"$WORK/server.err" &
SERVER_PID=$!
for _ in $(seq 100); do
  (exec 3<>"/dev/tcp/127.0.0.1/$SPORT") 2>/dev/null && break
  kill -0 "$SERVER_PID" 2>/dev/null || { log "server died: $(tail -n3 "$WORK/server.err")"; exit 1; }
  sleep 0.1
done

# run_once MBIT MODE(early|full) PREFIX: writes "seconds demand_requests rss_delta_MiB
# bytes_sent segments_sent" to
# PREFIX.res (not stdout: called in the main shell so the trap knows the client's pid).
run_once() {
  local mbit=$1 mode=$2 pre=$3
  local rate=$(( mbit * 1000000 / 8 ))
  local flag=(); [[ $mode == early ]] && flag=(--early-start)
  # Idle RSS right before the session (the server's steady state between sessions).
  local idle=$(rss_kib "$SERVER_PID")
  local t0=$(now)
  "$CLOUDLET" client --server "127.0.0.1:$SPORT" --overlay "$OV" "${flag[@]}" --port 8080 \
    --token-file "$TOKEN" --rate-limit "$rate" --json >"$pre.out" 2>"$pre.err" &
  local pid=$! port='' ok=0 t1='' peak=0 r
  CLIENT_PIDS+=("$pid")
  # The reported host port comes with the `resumed` event; polling before it would only
  # measure slirp's SYN retransmit against a paused guest (see vm-bench.sh).
  while [[ -z $port ]]; do
    # A half-written last line makes jq fail; just try again.
    port=$(jq -r 'select(.event=="resumed") | .ports[0].port' "$pre.out" 2>/dev/null | head -n1) || port=''
    r=$(rss_kib "$SERVER_PID"); (( r > peak )) && peak=$r
    kill -0 "$pid" 2>/dev/null || break
    awk -v a="$t0" -v b="$(now)" -v l="$HTTP_TIMEOUT" 'BEGIN{exit !(b-a>l)}' && break
    sleep 0.02
  done
  while [[ -n $port ]]; do
    r=$(rss_kib "$SERVER_PID"); (( r > peak )) && peak=$r
    if curl -s -o "$pre.body" -m 2 -w '%{http_code}' "http://127.0.0.1:$port/app/index.html" 2>/dev/null | grep -q '^200$'; then
      t1=$(now); ok=1; break
    fi
    kill -0 "$pid" 2>/dev/null || break
    awk -v a="$t0" -v b="$(now)" -v l="$HTTP_TIMEOUT" 'BEGIN{exit !(b-a>l)}' && break
    sleep 0.05
  done
  r=$(rss_kib "$SERVER_PID"); (( r > peak )) && peak=$r
  # End the session at the first 200: the `closed` event then counts the segments asked on
  # demand up to that moment (early start); full-first asks for none by construction.
  stop_pid "$pid" INT
  if (( ! ok )) || ! grep -q 'app-ready-42' "$pre.body"; then
    log "no HTTP 200 ($mbit Mbit/s, $mode), see $pre.err"; echo "nan nan nan nan nan" >"$pre.res"; return
  fi
  # What the client had sent when the session ended at the first 200 (head included).
  local dem=$(jq -r 'select(.event=="closed") | .demand_requests' "$pre.out" 2>/dev/null | tail -n1)
  local sent=$(jq -r 'select(.event=="closed") | .bytes_sent' "$pre.out" 2>/dev/null | tail -n1)
  local segs=$(jq -r 'select(.event=="closed") | .segments_sent' "$pre.out" 2>/dev/null | tail -n1)
  awk -v a="$t0" -v b="$t1" -v d="${dem:-nan}" -v p="$peak" -v i="$idle" -v s="${sent:-nan}" -v g="${segs:-nan}" \
    'BEGIN {printf "%.2f %s %.1f %s %s\n", b-a, d, (p-i)/1024, s, g}' >"$pre.res"
}

echo "# cloudlet net bench ($(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc) vCPU $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//'), $(qemu-system-x86_64 --version 2>/dev/null | head -n1), reps=$REPS)"
echo

# ------------------------------------------------------------------ -m: memory per session
live_sessions() { "$CLOUDLET" list-session --json | jq length; }
qemu_rss_kib() { # summed VmRSS of the live sessions' QEMU processes
  local sum=0 p
  for p in $("$CLOUDLET" list-session --json | jq -r '.[].qemu_pid | select(. != null)'); do
    sum=$(( sum + $(rss_kib "$p") ))
  done
  echo "$sum"
}
# mem_row SESSIONS LABEL: one table row from the server's /proc status and its QEMUs
mem_row() {
  local n=$1 rss anon file thr q per qper
  rss=$(rss_kib "$SERVER_PID") anon=$(status_kib "$SERVER_PID" RssAnon)
  file=$(status_kib "$SERVER_PID" RssFile) thr=$(awk '/^Threads:/ {print $2}' "/proc/$SERVER_PID/status")
  q=$(qemu_rss_kib)
  per=$(awk -v r="$rss" -v i="$IDLE_RSS" -v n="$n" 'BEGIN { if (n>0) printf "%.1f", (r-i)/1024/n; else print "-" }')
  qper=$(awk -v q="$q" -v n="$n" 'BEGIN { if (n>0) printf "%.1f", q/1024/n; else print "-" }')
  echo "| $2 | $(mib $((rss*1024))) | $(mib $((anon*1024))) | $(mib $((file*1024))) | $per | $thr | $(mib $((q*1024))) | $qper |"
}
mem_bench() {
  local n i pid port pre deadline
  sleep 2
  IDLE_RSS=$(rss_kib "$SERVER_PID")
  echo "## Server memory per session (overlay $OV_MIB MiB, $MEM_MB MiB guest)"
  echo
  echo "Sessions unthrottled over loopback, full transfer first, each page answered (HTTP 200),"
  echo "then measured after ${SETTLE:-5} s. Server = cloudlet server with its in-process cloudletfs"
  echo "mounts; per session = (server VmRSS - idle VmRSS) / sessions. QEMU = summed VmRSS of the"
  echo "sessions' QEMU processes (guest RAM pages they touched, private copies and page cache)."
  echo
  echo "| sessions | server RSS MiB | anon MiB | file MiB | server MiB per session | threads | QEMU RSS MiB (all) | QEMU MiB per VM |"
  echo "|---|---|---|---|---|---|---|---|"
  mem_row 0 0
  for n in $COUNTS; do
    CLIENT_PIDS=()
    for i in $(seq "$n"); do
      pre=$WORK/mem-$n-$i
      "$CLOUDLET" client --server "127.0.0.1:$SPORT" --overlay "$OV" --port 8080 \
        --token-file "$TOKEN" --json >"$pre.out" 2>"$pre.err" &
      CLIENT_PIDS+=("$!")
    done
    i=0
    for pid in "${CLIENT_PIDS[@]}"; do
      i=$(( i + 1 )) pre=$WORK/mem-$n-$i port='' deadline=$(( $(date +%s) + HTTP_TIMEOUT ))
      until [[ -n $port ]] && jq -e 'select(.event=="fill_done")' "$pre.out" >/dev/null 2>&1; do
        port=$(jq -r 'select(.event=="resumed") | .ports[0].port' "$pre.out" 2>/dev/null | head -n1) || port=''
        kill -0 "$pid" 2>/dev/null || { log "client $i of $n ended early: $(tail -n2 "$pre.err")"; exit 1; }
        (( $(date +%s) < deadline )) || { log "client $i of $n: no fill_done"; exit 1; }
        sleep 0.2
      done
      until curl -s -m 2 "http://127.0.0.1:$port/app/index.html" 2>/dev/null | grep -q app-ready-42; do
        (( $(date +%s) < deadline )) || { log "client $i of $n: no HTTP 200"; exit 1; }
        sleep 0.2
      done
    done
    [[ $(live_sessions) == "$n" ]] || { log "expected $n live sessions"; exit 1; }
    sleep "${SETTLE:-5}"
    mem_row "$n" "$n"
    log "$n sessions measured; ending them"
    for pid in "${CLIENT_PIDS[@]}"; do stop_pid "$pid" INT; done
    CLIENT_PIDS=()
    deadline=$(( $(date +%s) + 120 ))
    until [[ $(live_sessions) == 0 ]]; do
      (( $(date +%s) < deadline )) || { log "sessions did not end"; exit 1; }
      sleep 0.2
    done
    sleep 2
    mem_row 0 "0 (after $n)"
  done
  echo
  echo "_script wall time: $(( $(date +%s) - T0 )) s_"
}
if [[ -n $COUNTS ]]; then mem_bench; exit 0; fi

# ------------------------------------------------------------------ -G: guest-side benchmark
# guest_bench MODE(filter|keep|unconfined) PREFIX: appends to PREFIX.first the seconds from
# the start of `cloudlet synthesis` (eager: every chunk in first) to its first answer, and REPS
# lines each of the app's /bench and /io seconds (measured in the guest) to PREFIX.res and
# PREFIX.io.
guest_bench() {
  local mode=$1 pre=$2 port i env=() extra=()
  port=$(free_port)
  [[ $mode != filter ]] && env=(CLOUDLET_QEMU_HUGEPAGE=keep)
  [[ $mode == unconfined ]] && extra=(--qemu-as-root --no-cgroup)
  # The job's own redirection truncates the file only once it runs: the last round's
  # "first answer" must not be seen first.
  rm -f "$pre.out"
  env "${env[@]}" "$CLOUDLET" synthesis "$BASE" "$OV" --hostfwd "tcp:127.0.0.1:$port-:8080" \
    --ready-http "http://127.0.0.1:$port/app/index.html" "${extra[@]}" --json >"$pre.out" 2>"$pre.err" &
  local pid=$!
  CLIENT_PIDS+=("$pid")
  until grep -q '"first answer"' "$pre.out" 2>/dev/null; do
    (( $(date +%s) - T0 < 3600 )) || { log "synthesis ($mode): no first answer"; exit 1; }
    kill -0 "$pid" 2>/dev/null || { log "synthesis ($mode) died: $(tail -n2 "$pre.err")"; exit 1; }
    sleep 0.2
  done
  jq -r 'select(.event=="first answer") | .seconds' "$pre.out" >>"$pre.first"
  for i in $(seq "$REPS"); do
    curl -sf -m 600 "http://127.0.0.1:$port/bench" | awk '{print $1}' >>"$pre.res" \
      || log "guest bench $mode: /bench failed"
    curl -sf -m 600 "http://127.0.0.1:$port/io" | awk '{print $1}' >>"$pre.io" \
      || log "guest bench $mode: /io failed"
  done
  stop_pid "$pid" TERM
}
if (( GBENCH )); then
  [[ $GUEST == debian ]] || { log "-G needs -g debian"; exit 2; }
  rm -f "$WORK"/gbench-*.res "$WORK"/gbench-*.io "$WORK"/gbench-*.first
  for r in 1 2; do
    if (( r % 2 )); then modes="filter keep unconfined"; else modes="unconfined keep filter"; fi
    for mode in $modes; do
      guest_bench "$mode" "$WORK/gbench-$mode"
      log "guest bench $mode round $r: first $(tr '\n' ' ' <"$WORK/gbench-$mode.first")/ bench $(tr '\n' ' ' <"$WORK/gbench-$mode.res")/ io $(tr '\n' ' ' <"$WORK/gbench-$mode.io")"
    done
  done
  echo "## Guest-side benchmark after the fill (seconds; first answer: median of 2, /bench and /io measured in the guest: median of $(( 2 * REPS )))"
  echo
  echo "| setup | first answer (eager) | /bench (CPU + memory) | /io (disk) | /bench runs | /io runs |"
  echo "|---|---|---|---|---|---|"
  for mode in filter keep unconfined; do
    case $mode in
      filter) label="as shipped: uid, cgroup, huge-page filter, seccomp" ;;
      keep) label="huge-page advice kept (CLOUDLET_QEMU_HUGEPAGE=keep)" ;;
      unconfined) label="unconfined: advice kept, --qemu-as-root, --no-cgroup" ;;
    esac
    echo "| $label | $(median <"$WORK/gbench-$mode.first") | $(median <"$WORK/gbench-$mode.res") | $(median <"$WORK/gbench-$mode.io") | $(tr '\n' ' ' <"$WORK/gbench-$mode.res")| $(tr '\n' ' ' <"$WORK/gbench-$mode.io")|"
  done
  echo
  echo "_script wall time: $(( $(date +%s) - T0 )) s_"
  exit 0
fi
: >"$WORK/net.tsv"
# One uncounted warm-up (cold QEMU binary / overlay pages made the first run slower in vm-bench).
run_once 100 full "$WORK/warmup"
for mbit in $RATES; do
  for r in $(seq "$REPS"); do
    if (( r % 2 )); then modes="early full"; else modes="full early"; fi
    for mode in $modes; do
      run_once "$mbit" "$mode" "$WORK/run-$mbit-$mode-$r"
      res=$(cat "$WORK/run-$mbit-$mode-$r.res")
      log "$mbit Mbit/s $mode rep $r: $res (s, demand requests, server RSS delta MiB, bytes sent, segments sent)"
      echo "$mbit $mode $r $res" >>"$WORK/net.tsv"
    done
  done
done

col() { awk -v r="$1" -v m="$2" -v c="$3" '$1==r && $2==m && $4!="nan" {print $c}' "$WORK/net.tsv" | median; }
runs() { awk -v r="$1" -v m="$2" '$1==r && $2==m {printf "%s%s", s, $4; s=" "}' "$WORK/net.tsv"; }
echo "## Time to first HTTP 200 of /app/index.html via \`cloudlet client\` (median of $REPS)"
echo
echo "Clock starts at the launch of \`cloudlet client\`; server on loopback, upload throttled by --rate-limit."
echo "Demand = segments the server asked for on demand before the first 200 (early start; median)."
echo "Server RSS = peak VmRSS of \`cloudlet server\` during the session minus idle before it (median, MiB)."
echo "Sent = bytes the client had sent (head + segments) when the session ended at the first 200,"
echo "as a share of the overlay file; segs = segments sent completely by then (of $(jq .segments "$WORK/$APP.info.json") in all)."
echo "Head = the overlay's header + metadata, sent before anything else: $(mib "$(jq '.file_size - .segment_bytes' "$WORK/$APP.info.json")") MiB."
echo
echo "| rate Mbit/s | overlay MiB | early s | full-first s | full / early | sent early | segs early | demand segs | server RSS MiB early | server RSS MiB full | runs early | runs full |"
echo "|---|---|---|---|---|---|---|---|---|---|---|---|"
for mbit in $RATES; do
  e=$(col "$mbit" early 4) f=$(col "$mbit" full 4)
  echo "| $mbit | $OV_MIB | $e | $f | $(awk -v e="$e" -v f="$f" 'BEGIN{ if (e>0) printf "%.2f", f/e; else print "nan"}')" \
    "| $(awk -v b="$(col "$mbit" early 7)" -v t="$(stat -c %s "$OV")" 'BEGIN{printf "%.1f%%", 100*b/t}')" \
    "| $(col "$mbit" early 8) | $(col "$mbit" early 5) | $(col "$mbit" early 6) | $(col "$mbit" full 6) | $(runs "$mbit" early) | $(runs "$mbit" full) |"
done
echo
echo "_script wall time: $(( $(date +%s) - T0 )) s_"
