#!/usr/bin/env bash
# demo.sh: the README's first quick-start command. Installs what cloudlet needs (Debian 12,
# root), builds it, and runs cloudlet end to end in a scratch registry:
#   1. the overlay engine on generated images: add a base, diff, inspect, rebuild byte for byte;
#   2. real VM synthesis on stock QEMU: build the small test guest, capture it as a base VM,
#      customize it into an overlay, then resume it from base + overlay with early start and
#      ask the customized web page over HTTP.
set -euo pipefail
cd "$(dirname "$0")/.."
work="${CLOUDLET_DEMO_DIR:-/tmp/cloudlet-demo}"

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

say "installing dependencies"
bash .ci/install-deps.sh
say "building (release)"
cargo build --release --workspace --quiet
cloudlet="$PWD/target/release/cloudlet"
export CLOUDLET_HOME="$work/home"
rm -rf "$work"; mkdir -p "$work"

say "generating a base VM and a customized copy (synthetic images)"
bash bench/make-synthetic.sh "$work/images" --disk-mb 256 --mem-mb 128 >/dev/null
ls -l "$work/images"/*.img

say "cloudlet add-base"
id=$("$cloudlet" add-base --disk "$work/images/base-disk.img" --memory "$work/images/base-mem.img" --name demo)
echo "base id: $id"
"$cloudlet" list-base

say "cloudlet diff (xz)"
"$cloudlet" diff demo --disk "$work/images/custom-disk.img" --memory "$work/images/custom-mem.img" \
  -o "$work/vm.overlay"
"$cloudlet" info-overlay "$work/vm.overlay"

say "cloudlet verify and reconstruct"
"$cloudlet" verify "$work/vm.overlay" --base demo
"$cloudlet" reconstruct demo "$work/vm.overlay" -o "$work/rebuilt"
cmp "$work/rebuilt/disk.img" "$work/images/custom-disk.img"
cmp "$work/rebuilt/memory.img" "$work/images/custom-mem.img"
echo "rebuilt images are byte-identical to the custom VM"
du -h "$work/vm.overlay" "$work/images/custom-disk.img" "$work/images/custom-mem.img"

say "building the test guest (Debian cloud kernel + busybox, cached)"
bash tools/guest/build-guest.sh "$work/guest" >/dev/null
g="$work/guest"

say "cloudlet base: boot the guest on QEMU and capture it"
"$cloudlet" base "$g/disk.img" --memory-mb 256 --kernel "$g/vmlinuz" --initrd "$g/initrd.img" \
  --append "$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["cmdline"])' "$g/guest.json")" \
  --ready CLOUDLET-GUEST-READY --name guest

say "cloudlet overlay: customize it (a script typed on its serial console)"
cat >"$work/customize.sh" <<'SCRIPT'
echo "hello from a synthesized VM" > /srv/www/hello.txt
wget -qO- http://127.0.0.1:8080/cgi-bin/counter
sync
SCRIPT
"$cloudlet" overlay guest -o "$work/guest.overlay" --run "$work/customize.sh"
"$cloudlet" info-overlay "$work/guest.overlay"

say "cloudlet synthesis --early-start: resume from base + overlay, then ask the VM"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
"$cloudlet" synthesis guest "$work/guest.overlay" --early-start --hostfwd "tcp:127.0.0.1:$port-:8080" &
syn=$!
trap 'kill -TERM $syn 2>/dev/null; wait $syn 2>/dev/null' EXIT
for _ in $(seq 1 300); do
  if body=$(curl -sf "http://127.0.0.1:$port/hello.txt"); then break; fi
  sleep 0.1
done
echo "GET /hello.txt -> ${body:-no answer}"
curl -sf "http://127.0.0.1:$port/cgi-bin/counter" && echo
kill -TERM $syn; wait $syn || true
trap - EXIT
[ "${body:-}" = "hello from a synthesized VM" ] || { echo "demo failed: no answer from the VM" >&2; exit 1; }
say "done"
