#!/usr/bin/env bash
# smoke.sh [GUESTDIR] — prove that stock QEMU can boot the cloudlet test guest, capture it
# with guest RAM in a file (x-ignore-shared: RAM stays out of the migration stream) and
# resume it from a copy of that file, with the guest's own counters continuing.
#
#   1. build (or reuse) the guest with build-guest.sh
#   2. boot A: RAM = memory-backend-file share=on on RAMFILE; wait for CLOUDLET-GUEST-READY;
#      curl the counter; run commands at the shell on the serial console (incl. fstrim)
#   3. (SMOKE_BALLOON=1, default) virtio-balloon free-page-reporting: does QEMU punch holes
#      in RAMFILE when the guest frees memory?
#   4. save: QMP migrate-set-capabilities x-ignore-shared, stop, migrate file:DEVSTATE, quit
#   5. boot B: same args, RAM = COPY of RAMFILE with share=off,readonly=on,rom=off,
#      -incoming defer; QMP x-ignore-shared, migrate-incoming file:DEVSTATE, cont
#   6. curl again: count must be larger, boot_id unchanged
# Uses TCG (KVM is not usable on the build machines). Runs one QEMU at a time.
# Env: SMOKE_BALLOON=0|1, SMOKE_KEEP=1 keeps the work dir, QEMU=path, SMOKE_PORT=host port,
#      SMOKE_RESUME_MEM_OPTS (default share=off,readonly=on,rom=off).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
GUESTDIR=${1:-${CLOUDLET_GUEST_DIR:-}}   # empty: build-guest.sh's default folder
QEMU=${QEMU:-qemu-system-x86_64}
SMOKE_BALLOON=${SMOKE_BALLOON:-1}
RAM_MB=256
# Resume-side RAM backend options; only for experiments (see the balloon notes).
RESUME_MEM_OPTS=${SMOKE_RESUME_MEM_OPTS:-share=off,readonly=on,rom=off}

log() { printf '[smoke %6.2fs] %s\n' "$(elapsed "$T0")" "$*" >&2; }
fail() { log "FAIL: $*"; exit 1; }
now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.2f", b - a }'; }
T0=$(now)

GUESTDIR=$("$HERE/build-guest.sh" ${GUESTDIR:+"$GUESTDIR"} | sed -n 's/^guest dir: *//p')
[[ -n $GUESTDIR ]] || fail "build-guest.sh named no guest dir"
CMDLINE=$(sed -n 's/^  "cmdline": "\(.*\)",$/\1/p' "$GUESTDIR/guest.json")
[[ -n $CMDLINE ]] || fail "no cmdline in $GUESTDIR/guest.json"

WORK=$(mktemp -d /tmp/cloudlet-smoke.XXXXXX)
QEMU_PID=
cleanup() {
    if [[ -n $QEMU_PID ]] && kill -0 "$QEMU_PID" 2>/dev/null; then kill "$QEMU_PID"; wait "$QEMU_PID" || true; fi
    if [[ ${SMOKE_KEEP:-0} == 1 ]]; then log "kept $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT

# ---------------------------------------------------------------- helper (QMP, serial)
# A few lines of JSON over unix sockets; the product speaks QMP from Rust instead.
cat > "$WORK/helper.py" <<'PY'
import json, os, re, socket, sys, time

def wait_path(path, timeout=30):
    end = time.time() + timeout
    while not os.path.exists(path):
        if time.time() > end: sys.exit(f"timeout waiting for {path}")
        time.sleep(0.02)

class QMP:
    def __init__(self, path):
        wait_path(path)
        self.s = socket.socket(socket.AF_UNIX)
        self.s.connect(path)
        self.f = self.s.makefile("rw")
        json.loads(self.f.readline())            # greeting
        self.cmd("qmp_capabilities")
    def cmd(self, name, **args):
        msg = {"execute": name}
        if args: msg["arguments"] = args
        self.f.write(json.dumps(msg) + "\n"); self.f.flush()
        while True:
            line = self.f.readline()
            if not line: return None              # QEMU closed (e.g. after quit)
            r = json.loads(line)
            if "event" in r: continue
            if "error" in r: sys.exit(f"qmp {name}: {r['error']}")
            return r["return"]
    def wait_migration(self, timeout=120):
        end = time.time() + timeout
        while time.time() < end:
            st = self.cmd("query-migrate").get("status")
            if st == "completed": return
            if st in ("failed", "cancelled"): sys.exit(f"migration {st}")
            time.sleep(0.01)
        sys.exit("migration timeout")

def save(sock, devstate):
    q = QMP(sock); t = time.time()
    q.cmd("migrate-set-capabilities",
          capabilities=[{"capability": "x-ignore-shared", "state": True}])
    q.cmd("stop")
    q.cmd("migrate", uri=f"file:{devstate}")
    q.wait_migration()
    t_saved = time.time() - t
    q.cmd("quit")
    print(f"{t_saved:.3f}")

def restore(sock, devstate):
    q = QMP(sock); t = time.time()
    q.cmd("migrate-set-capabilities",
          capabilities=[{"capability": "x-ignore-shared", "state": True}])
    q.cmd("migrate-incoming", uri=f"file:{devstate}")
    q.wait_migration()
    # The source was stopped when captured, so the destination comes up paused.
    if q.cmd("query-status")["status"] != "running": q.cmd("cont")
    print(f"{time.time() - t:.3f}")

def wait_log(log, marker, timeout):
    end = time.time() + float(timeout)
    while time.time() < end:
        try:
            if marker in open(log, errors="replace").read(): return
        except FileNotFoundError: pass
        time.sleep(0.05)
    sys.exit(f"timeout waiting for {marker!r} in {log}")

def serial(sock, log, line, timeout="60"):
    """Run one command at the console shell; print its output; exit with its rc.

    The same framing as synth's vm::shell: markers assembled by printf in the guest (the
    0x1e byte is never typed, so the shell's echo cannot hold one), a per-run nonce."""
    s = socket.socket(socket.AF_UNIX); s.connect(sock); s.settimeout(0.2)
    nonce = os.urandom(8).hex()
    buf = b""
    def framed(seq, code, wait):
        nonlocal buf
        tag = f"{nonce}:{seq}"
        s.sendall(f" printf '\\036CLT%s:B\\036\\n' {tag};{code}</dev/null;"
                  f"printf '\\036CLT%s:E%s\\036\\n' {tag} \"$?\"\n".encode())
        end = time.time() + wait
        pat = re.compile(rb"\x1eCLT" + tag.encode() + rb":B\x1e\r?\n(.*?)\x1eCLT"
                         + tag.encode() + rb":E(\d+)\x1e", re.S)
        while time.time() < end:
            m = pat.search(buf)
            if m:
                buf = buf[m.end():]
                return int(m.group(2)), m.group(1)
            try: buf += s.recv(65536)
            except socket.timeout: pass
        return None
    seq = 0
    first = b"\x15"  # Ctrl-U clears a half-typed line; Ctrl-C before each retry
    for _ in range(15):  # sync: a framed ':' until the shell answers
        s.sendall(first); first = b"\x03"; seq += 1
        if framed(seq, ":", 4): break
    else:
        sys.exit("no shell answered on the console")
    quoted = "'" + line.replace("'", "'\\''") + "'"
    r = framed(seq + 1, f"(eval {quoted})", float(timeout))
    if r is None: sys.exit(f"timeout running {line!r}")
    rc, out = r
    out = re.sub(rb"\x1b\[[0-?]*[ -/]*[@-~]", b"", out).replace(b"\r", b"")
    sys.stdout.write(out.decode(errors="replace")); s.close()
    sys.exit(rc)

def qmp_quit(sock):
    QMP(sock).cmd("quit")

def free_port():
    s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()

if __name__ == "__main__":
    globals()[sys.argv[1].replace("-", "_")](*sys.argv[2:])
PY
H() { python3 "$WORK/helper.py" "$@"; }

PORT=${SMOKE_PORT:-$(H free-port)}
DISK=$WORK/disk.img; RAMFILE=$WORK/ram.bin; RAMCOPY=$WORK/ram-copy.bin
DEVSTATE=$WORK/devstate.bin
cp --sparse=always "$GUESTDIR/disk.img" "$DISK"   # the guest writes to its disk

# Everything but the RAM backend and -incoming must be identical on both sides:
# the device state only loads into the same machine.
common_args() { # $1 = run name (a|b)
    # Commas below belong to QEMU's option syntax (shellcheck SC2054).
    local balloon=()
    [[ $SMOKE_BALLOON == 1 ]] && balloon=(-device "virtio-balloon-pci,id=balloon0,free-page-reporting=on")
    # shellcheck disable=SC2054
    ARGS=(
        -accel tcg -machine q35,memory-backend=mem -cpu max -smp 1 -m "${RAM_MB}M"
        -nodefaults -no-user-config -display none -no-reboot
        -kernel "$GUESTDIR/vmlinuz" -initrd "$GUESTDIR/initrd.img" -append "$CMDLINE"
        -drive file="$DISK",format=raw,if=none,id=disk0,discard=unmap,cache=writeback
        -device virtio-blk-pci,drive=disk0
        -netdev "user,id=net0,hostfwd=tcp:127.0.0.1:$PORT-:8080"
        -device virtio-net-pci,netdev=net0
        "${balloon[@]}"
        -chardev "socket,id=ser0,path=$WORK/serial-$1.sock,server=on,wait=off,logfile=$WORK/serial-$1.log"
        -serial chardev:ser0
        -qmp "unix:$WORK/qmp-$1.sock,server=on,wait=off"
    )
}
counter() { curl -fsS --max-time 10 "http://127.0.0.1:$PORT/cgi-bin/counter"; }
field() { sed -n "s/.*$1=\([^ ]*\).*/\1/p" <<<"$2"; }
blocks() { stat -c %b "$1"; }   # 512-byte blocks actually allocated

# ---------------------------------------------------------------- A: boot and capture
common_args a
T_BOOT=$(now)
"$QEMU" "${ARGS[@]}" \
    -object memory-backend-file,id=mem,size=${RAM_MB}M,mem-path="$RAMFILE",share=on \
    2>"$WORK/qemu-a.err" &
QEMU_PID=$!
H wait-log "$WORK/serial-a.log" CLOUDLET-GUEST-READY 120 || { cat "$WORK/serial-a.log" "$WORK/qemu-a.err" >&2; fail "no READY"; }
BOOT_S=$(elapsed "$T_BOOT")
log "A ready after ${BOOT_S}s"
curl -fsS --max-time 10 "http://127.0.0.1:$PORT/index.html" | grep -q 'cloudlet test guest' || fail "index.html"
counter >/dev/null
BEFORE=$(counter); log "A counter: $BEFORE"
H serial "$WORK/serial-a.sock" "$WORK/serial-a.log" 'uname -r; grep " / " /proc/mounts' >&2
H serial "$WORK/serial-a.sock" "$WORK/serial-a.log" 'fstrim -v /' >&2 || fail "fstrim"
rc=0; H serial "$WORK/serial-a.sock" "$WORK/serial-a.log" 'exit 3' || rc=$?
[[ $rc == 3 ]] || fail "console shell rc: expected 3, got $rc"

BALLOON_RESULT=skipped
if [[ $SMOKE_BALLOON == 1 ]]; then
    b0=$(blocks "$RAMFILE")
    H serial "$WORK/serial-a.sock" "$WORK/serial-a.log" 'dd if=/dev/zero of=/tmp/big bs=1M count=100 2>/dev/null; sync' >&2
    b1=$(blocks "$RAMFILE")
    H serial "$WORK/serial-a.sock" "$WORK/serial-a.log" 'rm /tmp/big' >&2
    sleep 6   # the guest reports free pages after ~2 s, in >= 2 MiB (pageblock) chunks
    b2=$(blocks "$RAMFILE")
    BALLOON_RESULT="RAMFILE allocated: boot $((b0/2048)) MiB, after 100 MiB tmpfs file $((b1/2048)) MiB, 6 s after rm $((b2/2048)) MiB"
    log "balloon: $BALLOON_RESULT"
    BEFORE=$(counter); log "A counter: $BEFORE"
fi

SAVE_S=$(H save "$WORK/qmp-a.sock" "$DEVSTATE")
wait "$QEMU_PID" || true; QEMU_PID=
DEVSTATE_BYTES=$(stat -c %s "$DEVSTATE")
log "saved in ${SAVE_S}s, device state $DEVSTATE_BYTES bytes, RAMFILE $(( $(blocks "$RAMFILE") / 2048 )) MiB allocated"
[[ $(stat -c %s "$RAMFILE") == $((RAM_MB * 1048576)) ]] || fail "RAMFILE size is not the RAM size"

# ---------------------------------------------------------------- B: resume from a copy
cp --sparse=always "$RAMFILE" "$RAMCOPY"
# readonly=on opens the copy O_RDONLY: a read-only file must be enough.
[[ $RESUME_MEM_OPTS == *readonly=on* ]] && chmod 444 "$RAMCOPY"
common_args b
T_RESTORE=$(now)
"$QEMU" "${ARGS[@]}" \
    -object memory-backend-file,id=mem,size=${RAM_MB}M,mem-path="$RAMCOPY","$RESUME_MEM_OPTS" \
    -incoming defer 2>"$WORK/qemu-b.err" &
QEMU_PID=$!
QMP_RESTORE_S=$(H restore "$WORK/qmp-b.sock" "$DEVSTATE") || { cat "$WORK/qemu-b.err" >&2; fail "restore"; }
RESTORE_S=$(elapsed "$T_RESTORE")
AFTER=$(counter) || { cat "$WORK/qemu-b.err" >&2; fail "no HTTP after restore"; }
FIRST_HTTP_S=$(elapsed "$T_RESTORE")
log "B counter: $AFTER"
H serial "$WORK/serial-b.sock" "$WORK/serial-b.log" 'cat /run/counter; echo still-alive' >&2 || fail "serial after restore"

n0=$(field count "$BEFORE"); n1=$(field count "$AFTER")
(( n1 > n0 )) || fail "counter did not continue ($n0 -> $n1)"
[[ $(field boot_id "$BEFORE") == $(field boot_id "$AFTER") ]] || fail "boot_id changed: guest rebooted"

BALLOON_B=skipped
if [[ $SMOKE_BALLOON == 1 ]]; then
    # Resume side: RAM is a private mapping of a read-only file. Freed pages can only be
    # dropped from QEMU's anonymous (copy-on-write) memory; the file must stay untouched.
    rss() { awk '/^RssAnon/ { printf "%d", $2 / 1024 }' "/proc/$QEMU_PID/status"; }
    r0=$(rss)
    H serial "$WORK/serial-b.sock" "$WORK/serial-b.log" 'dd if=/dev/zero of=/tmp/big bs=1M count=100 2>/dev/null; sync' >&2
    r1=$(rss)
    H serial "$WORK/serial-b.sock" "$WORK/serial-b.log" 'rm /tmp/big' >&2
    sleep 6
    r2=$(rss)
    H serial "$WORK/serial-b.sock" "$WORK/serial-b.log" 'cat /srv/www/index.html >/dev/null' >&2 || fail "guest dead after balloon on B"
    BALLOON_B="QEMU B RssAnon: after resume $r0 MiB, after 100 MiB tmpfs file $r1 MiB, 6 s after rm $r2 MiB"
    log "balloon B: $BALLOON_B"
    [[ -s $WORK/qemu-b.err ]] && log "qemu B stderr: $(cat "$WORK/qemu-b.err")"
    counter >/dev/null || fail "no HTTP after balloon on B"
fi
H qmp-quit "$WORK/qmp-b.sock" 2>/dev/null || kill "$QEMU_PID"
wait "$QEMU_PID" || true; QEMU_PID=
[[ $(sha256sum <"$RAMFILE") == $(sha256sum <"$RAMCOPY") ]] && RAMCOPY_STATE=unchanged || RAMCOPY_STATE=MODIFIED

cat <<EOF
PASS: counter $n0 -> $n1, same boot_id
boot to READY:            ${BOOT_S}s
save (stop..completed):   ${SAVE_S}s
device state:             $DEVSTATE_BYTES bytes
restore (QMP, to cont):   ${QMP_RESTORE_S}s; QEMU start to cont ${RESTORE_S}s; to first HTTP ${FIRST_HTTP_S}s
RAM copy after resume:    $RAMCOPY_STATE
balloon (capture side):   $BALLOON_RESULT
balloon (resume side):    $BALLOON_B
EOF
