#!/usr/bin/env bash
# debian-overlay-bench.sh: overlay size of a real customization of the stock Debian bookworm
# guest (issue 18), every row from the same run:
#   - a Flask web service (app.py, a unit file) with 4 MiB of generated data files, copied in
#     through the guest agent and started by systemd, captured once the service answers;
#   - variants of its end: nothing, `fstrim -av` (TRIM; the disk is attached with
#     discard=unmap), `sync; echo 3 > /proc/sys/vm/drop_caches` (the paper's page-cache step),
#     both, and both on a base with a virtio-balloon doing free page reporting
#     (`cloudlet base --balloon`), which needs its own base (the device set is part of it),
#     and both on a base booted with `init_on_free=1` (direct kernel boot with the guest's
#     own kernel and command line plus that: the guest kernel zeroes every page it frees, so
#     dropped page cache becomes zero chunks; variant iof+trim+drop, not in the default list);
#   - the working set without a profile (the resume's, this branch) and with --profile-url;
#     the old behaviour (every overlay chunk in 256 KiB working-set segments, which is what a
#     working set of everything the customization touched gave on this guest) is rebuilt with
#     `cloudlet diff --segment-kib 256` from the same captured images;
#   - the MobiSys'13 baseline (xdelta3 -e -9 + xz -9, disk and memory against the base's) and
#     the dedup lower bound (xz -9 of the unique new chunks) on the captured images
#     (`cloudlet reconstruct` of each overlay), each against the variant's own base.
# WORKLOAD=packages makes it the paper's kind of customization instead (MobiSys'13 installed
# each application with its dependencies): the same service summarizes its data with pandas,
# which the base lacks, so the customization copies the four .deb files of pandas and its
# dependencies into apt's archive folder (downloaded on the host with `apt-get download`; the
# guest has no network), installs them with `dpkg -i`, deletes them with `apt-get clean` and
# starts the service. The installed files land on disk and, once read, in the page cache.
# Prints tab-separated rows on stdout (variant, what, bytes, extra); logs go to OUT/logs.
#
# usage: bench/debian-overlay-bench.sh GUEST_DIR OUT
#   GUEST_DIR: tools/guest/build-debian.sh's output (disk.img, guest.json); never written.
#   OUT: a scratch folder (needs ~10 GiB, sparse).
# Env: CLOUDLET_BIN (default target/release/cloudlet), MEMORY_MB (default 1024), NO_BASELINE=1
#      (skip the xdelta3 baseline, about a minute per variant),
#      VARIANTS (default "plain profile trim drop trim+drop fpr+trim+drop"),
#      WORKLOAD (default "data"; "packages", see above).
set -euo pipefail
case "${1:-}" in -h|--help|"") sed -n '2,/^set -euo/{/^set -euo/!p}' "$0"; exit 0 ;; esac
guest="$(realpath "$1")"; out="$(realpath -m "$2")"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
bin="${CLOUDLET_BIN:-$here/../target/release/cloudlet}"
[[ -x "$bin" ]] || { echo "build first: cargo build --release -p cloudlet-tools" >&2; exit 2; }
mem_mb="${MEMORY_MB:-1024}"
variants="${VARIANTS:-plain profile trim drop trim+drop fpr+trim+drop}"
workload="${WORKLOAD:-data}"
case "$workload" in data|packages) ;; *) echo "unknown WORKLOAD $workload" >&2; exit 2 ;; esac
mkdir -p "$out/logs" "$out/files"
prompt='root@cloudlet-debian:~#'
port=18000

row() { printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "${4:-}"; }
size() { stat -c %s "$1"; }
jget() { python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print(d$2)" "$1"; }

# The customization's files: a pip-free Flask app over generated CSV data.
f="$out/files"
python3 - "$f" <<'PY'
import random, sys, os
d = sys.argv[1]
rng = random.Random(18)
cities = ["Pittsburgh", "Lisbon", "Osaka", "Nairobi", "Quito", "Tromso", "Perth", "Graz"]
for n in range(4):
    with open(os.path.join(d, f"readings-{n}.csv"), "w") as out:
        out.write("station,city,t,temp_c,humidity,pressure_hpa\n")
        size = 0
        i = 0
        while size < 1 << 20:
            line = (f"st{rng.randrange(500):03d},{rng.choice(cities)},{1700000000 + i * 60},"
                    f"{rng.gauss(14, 9):.2f},{rng.uniform(5, 100):.1f},{rng.gauss(1013, 8):.1f}\n")
            out.write(line)
            size += len(line)
            i += 1
PY
if [[ "$workload" == packages ]]; then
cat >"$f/app.py" <<'PY'
import glob
import pandas as pd
from flask import Flask, jsonify
app = Flask(__name__)
df = pd.concat(pd.read_csv(p) for p in sorted(glob.glob("/srv/*.csv")))
mean = df.groupby("city")["temp_c"].mean().round(2).to_dict()
@app.get("/")
def summary():
    return jsonify(rows=len(df), mean_temp=mean)
app.run(host="0.0.0.0", port=8000)
PY
else
cat >"$f/app.py" <<'PY'
import csv, glob, statistics
from flask import Flask, jsonify
app = Flask(__name__)
rows = []
for path in sorted(glob.glob("/srv/*.csv")):
    with open(path) as fh:
        rows.extend(csv.DictReader(fh))
by_city = {}
for r in rows:
    by_city.setdefault(r["city"], []).append(float(r["temp_c"]))
@app.get("/")
def summary():
    return jsonify(rows=len(rows), mean_temp={c: round(statistics.fmean(v), 2) for c, v in sorted(by_city.items())})
app.run(host="0.0.0.0", port=8000)
PY
fi
printf '[Service]\nExecStart=/usr/bin/python3 /srv/app.py\n[Install]\nWantedBy=multi-user.target\n' \
  >"$f/web.service"
copies=(--copy "$f/app.py:/srv/app.py" --copy "$f/web.service:/etc/systemd/system/web.service")
for n in 0 1 2 3; do copies+=(--copy "$f/readings-$n.csv:/srv/readings-$n.csv"); done
install=()
if [[ "$workload" == packages ]]; then
  mkdir -p "$f/debs"
  (cd "$f/debs" && apt-get download python3-pandas python3-pandas-lib python3-dateutil python3-tz \
     >"$out/logs/apt-download.log" 2>&1)
  for d in "$f"/debs/*.deb; do copies+=(--copy "$d:/var/cache/apt/archives/$(basename "$d")"); done
  install=('dpkg -i /var/cache/apt/archives/*.deb' 'apt-get clean')
fi
wait_up='timeout 300 sh -c '\''until python3 -c "import urllib.request as u; u.urlopen(\"http://127.0.0.1:8000/\")" 2>/dev/null; do sleep 1; done'\'''
script() {  # script NAME TAIL...: the setup plus the variant's last commands
  local s="$f/$1.sh"; shift
  printf '%s\n' ${install[@]+"${install[@]}"} 'systemctl daemon-reload' 'systemctl enable --now web.service' "$wait_up" sync "$@" >"$s"
  echo "$s"
}

# make_base HOME [--balloon]: a base from a sparse copy of the guest's disk.
make_base() {
  local home="$1"; shift
  [[ -d "$home/bases" ]] && return 0
  cp --sparse=always "$guest/disk.img" "$out/disk-copy.img"
  CLOUDLET_HOME="$home" "$bin" base "$out/disk-copy.img" --memory-mb "$mem_mb" --guest-agent \
    --ready "$prompt" --ready-agent --name debian "$@" --json >"$out/logs/base-$(basename "$home").json" \
    2>"$out/logs/base-$(basename "$home").log"
  rm -f "$out/disk-copy.img"
}
base_dir() { echo "$1/bases/$(ls "$1/bases")"; }

for v in $variants; do
  case "$v" in
    plain|profile) tail=() ;;
    trim) tail=('fstrim -av') ;;
    drop) tail=(sync 'echo 3 > /proc/sys/vm/drop_caches') ;;
    trim+drop) tail=('fstrim -av' sync 'echo 3 > /proc/sys/vm/drop_caches') ;;
    # Free page reporting reports free blocks of 2 MiB and more after a 2 s delay: wait.
    iof+trim+drop) tail=('fstrim -av' sync 'echo 3 > /proc/sys/vm/drop_caches') ;;
    fpr+trim+drop) tail=('ls /sys/bus/virtio/drivers' 'fstrim -av' sync
                         'echo 3 > /proc/sys/vm/drop_caches' 'sleep 10') ;;
    *) echo "unknown variant $v" >&2; exit 2 ;;
  esac
  home="$out/home-plain"; extra=()
  if [[ "$v" == fpr* ]]; then home="$out/home-fpr"; make_base "$home" --balloon
  elif [[ "$v" == iof* ]]; then
    home="$out/home-iof"
    make_base "$home" --kernel "$guest/vmlinuz" --initrd "$guest/initrd.img" \
      --append "$(jget "$guest/guest.json" "['cmdline']") init_on_free=1"
  else make_base "$home"; fi
  [[ "$v" == profile ]] && extra=(--profile-url "http://127.0.0.1:$port/")
  s="$(script "$v" ${tail[@]+"${tail[@]}"})"
  ov="$out/$v.overlay"
  CLOUDLET_HOME="$home" "$bin" overlay debian -o "$ov" "${copies[@]}" --run "$s" \
    --channel agent --hostfwd "tcp:127.0.0.1:$port-:8000" --ready-http "http://127.0.0.1:$port/" \
    ${extra[@]+"${extra[@]}"} --json >"$out/logs/overlay-$v.json" 2>"$out/logs/overlay-$v.log"
  r="$out/logs/overlay-$v.json"
  row "$v" overlay "$(size "$ov")" "working_set_from=$(jget "$r" "['working_set_from']") working_set_chunks=$(jget "$r" "['working_set_chunks']") resume_accessed=$(jget "$r" "['resume_accessed_chunks']") customization_accessed=$(jget "$r" "['customization_accessed_chunks']") disk_candidates=$(jget "$r" "['disk_candidates']") disk_discarded=$(jget "$r" "['disk_discarded']") memory_candidates=$(jget "$r" "['memory_candidates']")"
  [[ "$v" == profile ]] && continue
  # The captured custom images, rebuilt from the overlay (sparse).
  cap="$out/capture-$v"; rm -rf "$cap"
  CLOUDLET_HOME="$home" "$bin" reconstruct debian "$ov" -o "$cap" >"$out/logs/reconstruct-$v.log" 2>&1
  bd="$(base_dir "$home")"
  python3 "$here/unique_new_chunks.py" "$bd/disk.img" "$bd/memory.img" "$cap/disk.img" \
    "$cap/memory.img" -o "$cap/unique.bin" 2>"$out/logs/unique-$v.log"
  xz -9 -T1 -c "$cap/unique.bin" >"$cap/unique.bin.xz"
  row "$v" lower-bound "$(size "$cap/unique.bin.xz")" "unique_new_bytes=$(size "$cap/unique.bin")"
  rm -f "$cap/unique.bin" "$cap/unique.bin.xz"
  if [[ "$v" == plain ]]; then
    # The old behaviour: every overlay chunk in 256 KiB segments.
    CLOUDLET_HOME="$home" "$bin" diff debian --disk "$cap/disk.img" --memory "$cap/memory.img" \
      --device-state "$cap/device-state" -o "$out/plain-all-small.overlay" --segment-kib 256 \
      --json >"$out/logs/diff-all-small.json" 2>&1
    row plain overlay-all-256k-segments "$(size "$out/plain-all-small.overlay")"
  fi
  # The MobiSys'13 baseline on this variant's images, against its own base.
  if [[ -z "${NO_BASELINE:-}" ]]; then
    xdelta3 -e -9 -D -R -f -s "$bd/disk.img" "$cap/disk.img" "$cap/disk.vcdiff"
    xdelta3 -e -9 -D -R -f -s "$bd/memory.img" "$cap/memory.img" "$cap/mem.vcdiff"
    a=$(( $(xz -9 -T1 -c "$cap/disk.vcdiff" | wc -c) + $(xz -9 -T1 -c "$cap/mem.vcdiff" | wc -c) ))
    row "$v" baseline-xdelta3-xz "$a"
    rm -f "$cap/disk.vcdiff" "$cap/mem.vcdiff"
  fi
  rm -rf "$cap"
done
