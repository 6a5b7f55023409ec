#!/usr/bin/env bash
# libvirt-bench.sh: what the libvirt backend adds to a resume, against direct QEMU.
#
# One base (the test guest, 256 MiB RAM), one overlay (a page written under /srv/www), then
# `cloudlet synthesis --early-start` N times per backend, alternating which backend goes
# first. Prints one markdown table (progress on stderr), medians of N:
#   - VM start → running: QEMU spawn (or virDomainCreateXML) to the guest running, as
#     `cloudlet synthesis --json` reports it in the "VM resumed" event;
#   - device state: x-ignore-shared + migrate-incoming + cont (libvirt: through its QMP
#     passthrough, then virDomainResume);
#   - first HTTP 200: client side, from launching `cloudlet synthesis` to the first 200 of
#     the customized page through the host port forward.
#
# Needs a cloudlet built with the libvirt feature and a libvirtd (started here as
# `virtlogd -d; libvirtd -d` when it does not answer). Runs as root, one VM at a time.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/.." && pwd)

usage() {
  cat <<EOF
usage: libvirt-bench.sh [-n REPS] [-w WORKDIR] [-k]
  -n REPS      synthesis runs per backend (default 5; median reported)
  -w WORKDIR   scratch dir (default: fresh mktemp -d under /var/tmp); holds CLOUDLET_HOME
  -k           keep WORKDIR afterwards
env: CLOUDLET_BIN (default target/release/cloudlet), GUEST_DIR (default ~/.cache/cloudlet-guest),
     LIBVIRT_URI (default qemu:///system), HTTP_TIMEOUT (s, default 300).
Build first: cargo build --release --workspace --all-features
EOF
}

REPS=5 WORK='' KEEP=0
while getopts "n:w:kh" opt; do
  case $opt in
    n) REPS=$OPTARG ;;
    w) WORK=$OPTARG ;;
    k) KEEP=1 ;;
    h) usage; exit 0 ;;
    *) usage >&2; exit 2 ;;
  esac
done
[[ $REPS =~ ^[1-9][0-9]*$ ]] || { echo "libvirt-bench: -n needs a positive integer" >&2; exit 2; }

CLOUDLET=${CLOUDLET_BIN:-$REPO/target/release/cloudlet}
GUEST_DIR=${GUEST_DIR:-$HOME/.cache/cloudlet-guest}
URI=${LIBVIRT_URI:-qemu:///system}
HTTP_TIMEOUT=${HTTP_TIMEOUT:-300}
[[ -x $CLOUDLET ]] || { echo "libvirt-bench: $CLOUDLET missing; see -h" >&2; exit 1; }
for t in jq curl virsh python3; do
  command -v $t >/dev/null || { echo "libvirt-bench: missing tool: $t" >&2; exit 1; }
done
[[ -s $GUEST_DIR/guest.json ]] || bash "$REPO/tools/guest/build-guest.sh" "$GUEST_DIR" >&2

log() { printf '[libvirt-bench %s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }

if ! virsh -c "$URI" version >/dev/null 2>&1; then
  log "libvirtd does not answer at $URI: starting virtlogd and libvirtd"
  mkdir -p /run/libvirt
  virtlogd -d || true
  libvirtd -d || true
  for _ in $(seq 150); do virsh -c "$URI" version >/dev/null 2>&1 && break; sleep 0.2; done
fi
virsh -c "$URI" version >/dev/null

if [[ -z $WORK ]]; then WORK=$(mktemp -d /var/tmp/cloudlet-libvirt-bench.XXXXXX); fi
mkdir -p "$WORK"
WORK=$(cd "$WORK" && pwd)
export CLOUDLET_HOME=$WORK/home

# Synthesis processes are tracked by pid, never killed by name.
SYN_PIDS=()
cleanup() {
  local rc=$? p
  for p in "${SYN_PIDS[@]}"; do
    if kill -0 "$p" 2>/dev/null; then
      kill -TERM "$p" 2>/dev/null || true
      for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.2; done
      kill -KILL "$p" 2>/dev/null || true
    fi
  done
  if (( KEEP )); then log "work dir kept: $WORK"; else rm -rf "$WORK" 2>/dev/null || log "could not remove $WORK"; fi
  exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

median() { sort -g | awk '{a[NR]=$1} END {if (NR==0) {print "nan"} else if (NR%2) {print a[(NR+1)/2]} else {print (a[NR/2]+a[NR/2+1])/2}}'; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
since() { awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN {printf "%.3f", b - a}'; }

log "base: 256 MiB RAM"
BASE=$("$CLOUDLET" base "$GUEST_DIR/disk.img" --memory-mb 256 --kernel "$GUEST_DIR/vmlinuz" \
  --initrd "$GUEST_DIR/initrd.img" --append "$(jq -r .cmdline "$GUEST_DIR/guest.json")" \
  --ready CLOUDLET-GUEST-READY | tail -n1)
# shellcheck disable=SC2016 # $((6*7)) expands in the guest
printf '%s\n' 'echo libvirt-bench-$((6*7)) > /srv/www/bench.txt' 'sync' >"$WORK/custom.sh"
"$CLOUDLET" overlay "$BASE" -o "$WORK/vm.overlay" --run "$WORK/custom.sh" --json >"$WORK/overlay.json"
log "overlay: $(jq .overlay_bytes "$WORK/overlay.json") bytes"

# synth_once BACKEND OUT: prints "start_to_running device_state first_http" (seconds)
synth_once() {
  local backend=$1 out=$2 port t0 pid ok=0 http=nan
  port=$(free_port)
  t0=$(date +%s.%N)
  "$CLOUDLET" synthesis "$BASE" "$WORK/vm.overlay" --early-start --backend "$backend" \
    --libvirt-uri "$URI" --hostfwd "tcp:127.0.0.1:$port-:8080" --json >"$out.out" 2>"$out.err" &
  pid=$!
  SYN_PIDS+=("$pid")
  # Poll only after "VM resumed": a forwarded port of a paused guest accepts and stalls.
  while ! grep -q '"VM resumed"' "$out.out" 2>/dev/null; do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.02
  done
  while kill -0 "$pid" 2>/dev/null; do
    if curl -s -o /dev/null -m 2 -w '%{http_code}' "http://127.0.0.1:$port/bench.txt" | grep -q '^200$'; then
      http=$(since "$t0"); ok=1; break
    fi
    awk -v s="$(since "$t0")" -v l="$HTTP_TIMEOUT" 'BEGIN {exit !(s > l)}' && break
    sleep 0.05
  done
  kill -TERM "$pid" 2>/dev/null || true
  wait "$pid" || log "synthesis ($backend) exited with $? (see $out.err)"
  (( ok )) || log "no HTTP 200 from synthesis ($backend), see $out.err"
  jq -r --arg http "$http" 'select(.event == "VM resumed") | .detail
    | "\(.start_to_running_seconds) \(.device_state_seconds) \($http)"' "$out.out"
}

: >"$WORK/runs.tsv"
# One uncounted warm-up each (cold binaries and page cache).
synth_once qemu "$WORK/warm-qemu" >/dev/null
synth_once libvirt "$WORK/warm-libvirt" >/dev/null
for r in $(seq "$REPS"); do
  if (( r % 2 )); then order="qemu libvirt"; else order="libvirt qemu"; fi
  for b in $order; do
    res=$(synth_once "$b" "$WORK/syn-$b-$r")
    log "$b rep $r: $res (start->running, device state, first HTTP 200; s)"
    echo "$b $res" >>"$WORK/runs.tsv"
  done
done

col() { awk -v b="$1" -v c="$2" '$1 == b && $c != "nan" {print $c}' "$WORK/runs.tsv" | median; }
echo "## libvirt backend vs direct QEMU ($(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc) vCPU," \
  "$(qemu-system-x86_64 --version | head -n1 | sed 's/ (.*//'), $(virsh -c "$URI" version | awk '/Running against daemon|Using library/ {print "libvirt " $NF; exit}'), median of $REPS)"
echo
echo "| backend | VM start → running (s) | of which device state (s) | launch → first HTTP 200 (s) |"
echo "| --- | ---: | ---: | ---: |"
for b in qemu libvirt; do
  printf '| %s | %.2f | %.2f | %.2f |\n' "$b" "$(col "$b" 2)" "$(col "$b" 3)" "$(col "$b" 4)"
done
awk -v a="$(col qemu 2)" -v b="$(col libvirt 2)" -v c="$(col qemu 4)" -v d="$(col libvirt 4)" \
  'BEGIN {printf "| libvirt adds | %+.2f | | %+.2f |\n", b - a, d - c}'
