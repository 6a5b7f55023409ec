#!/usr/bin/env bash
# debian-boot-time.sh [GUESTDIR] [RUNS] — time the Debian guest of build-debian.sh from QEMU's
# start to root's autologin prompt on the serial console, under TCG with 1 vCPU:
#   direct   -kernel/-initrd/-append (the guest's own kernel, initrd and command line)
#   grub     the disk alone (SeaBIOS, then GRUB from the disk)
#   no-ci    direct, with cloud-init=disabled on the command line (cloud-init's own cost)
# each at 512 MiB and 1 GiB of RAM, RUNS times (default 3), configurations interleaved so that
# the host's load hits them alike. The disk is opened with -snapshot (never written).
# Prints one line per boot and the median per configuration, with the host's load average.
# GUESTDIR defaults to target/guest-cache/debian-bookworm of this workspace.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
GUESTDIR=${1:-$HERE/../../target/guest-cache/debian-bookworm}
RUNS=${2:-3}
QEMU=${QEMU:-qemu-system-x86_64}
TIMEOUT=${BOOT_TIMEOUT:-900}

[[ -f $GUESTDIR/guest.json ]] || { echo "no guest.json in $GUESTDIR (run build-debian.sh)" >&2; exit 2; }
json() { sed -n "s/^  \"$1\": \"\\(.*\\)\",\$/\\1/p" "$GUESTDIR/guest.json"; }
CMDLINE=$(json cmdline)
PROMPT=$(json ready_prompt)
[[ -n $CMDLINE && -n $PROMPT ]] || { echo "cmdline or ready_prompt missing in guest.json" >&2; exit 2; }

WORK=$(mktemp -d /tmp/debian-boot-time.XXXXXX)
QEMU_PID=
cleanup() {
    if [[ -n $QEMU_PID ]] && kill -0 "$QEMU_PID" 2>/dev/null; then
        kill "$QEMU_PID"; wait "$QEMU_PID" 2>/dev/null || true
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT

# boot MODE MEM_MB: prints seconds from spawn to the prompt (or "timeout").
boot() {
    local mode=$1 mem=$2 log=$WORK/serial.log start
    # shellcheck disable=SC2054  # commas inside QEMU option values
    local args=(-accel tcg -machine q35 -cpu qemu64 -smp 1 -m "$mem" -nodefaults -no-user-config
                -display none -no-reboot -snapshot
                -drive "file=$GUESTDIR/disk.img,format=raw,if=none,id=d0,discard=unmap"
                -device virtio-blk-pci,drive=d0 -netdev user,id=n0 -device virtio-net-pci,netdev=n0
                -serial "file:$log")
    case $mode in
        direct) args+=(-kernel "$GUESTDIR/vmlinuz" -initrd "$GUESTDIR/initrd.img" -append "$CMDLINE") ;;
        no-ci) args+=(-kernel "$GUESTDIR/vmlinuz" -initrd "$GUESTDIR/initrd.img"
                      -append "$CMDLINE cloud-init=disabled") ;;
        grub) ;;
    esac
    : >"$log"
    start=$(date +%s.%N)
    "$QEMU" "${args[@]}" >"$WORK/qemu.log" 2>&1 &
    QEMU_PID=$!
    local result=timeout
    while kill -0 "$QEMU_PID" 2>/dev/null; do
        if grep -qF "$PROMPT" "$log"; then
            result=$(awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
            break
        fi
        if awk -v a="$start" -v b="$(date +%s.%N)" -v t="$TIMEOUT" 'BEGIN { exit !(b - a > t) }'; then
            break
        fi
        sleep 0.1
    done
    kill "$QEMU_PID" 2>/dev/null || true
    wait "$QEMU_PID" 2>/dev/null || true
    QEMU_PID=
    echo "$result"
}

declare -A TIMES=()
CONFIGS=("direct 512" "grub 512" "no-ci 512" "direct 1024" "grub 1024" "no-ci 1024")
echo "guest: $GUESTDIR ($(json kernel_version)); $("$QEMU" --version | head -n1)"
for ((run = 1; run <= RUNS; run++)); do
    for c in "${CONFIGS[@]}"; do
        read -r mode mem <<<"$c"
        t=$(boot "$mode" "$mem")
        load=$(cut -d' ' -f1-3 /proc/loadavg)
        printf 'run %d  %-7s %5s MiB  %7s s  (load %s)\n' "$run" "$mode" "$mem" "$t" "$load"
        TIMES[$c]+="$t "
    done
done
echo "median seconds from spawn to '$PROMPT':"
for c in "${CONFIGS[@]}"; do
    # shellcheck disable=SC2086  # a list of numbers
    median=$(printf '%s\n' ${TIMES[$c]} | sort -g | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }')
    printf '  %-14s %s  (runs: %s)\n' "$c" "$median" "${TIMES[$c]% }"
done
