#!/usr/bin/env bash
# demo.sh: the README's first quick-start command. Installs what cloudlet needs (Debian 12,
# root), builds it, and runs the overlay engine end to end on generated images in a scratch
# registry: add a base VM, make an overlay of a custom VM, inspect it, rebuild the custom VM and
# check it byte for byte.
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
