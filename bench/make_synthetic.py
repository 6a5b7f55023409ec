#!/usr/bin/env python3
"""Generate a synthetic base VM + custom VM pair with controlled chunk kinds.

Usage: make_synthetic.py OUTDIR [--disk-mb N] [--mem-mb N] [--seed S] [fraction flags]

Writes OUTDIR/{base-disk,base-mem,custom-disk,custom-mem}.img and
OUTDIR/synthetic-summary.txt.  Called by make-synthetic.sh; stdlib only.

Model (all in 4 KiB chunks; see make-synthetic.sh for the rationale):

  base disk   files taken from the host's /usr (binaries, libraries, text,
              already-compressed docs), each 4 KiB aligned and zero padded
              at its tail like a file system would, separated by zero
              "free space" holes; --disk-used of the chunks hold file data.
  base memory a "kernel" region (contiguous binary data), page-cache copies
              of base-disk file chunks (exact, aligned => dedup against the
              base disk), anonymous/heap pages (binary data sprinkled with
              pointer-like values), and zero (never touched) pages.
  custom      the base image with a *modified region* (--disk-mod /
              --mem-mod of the chunks, laid out as extents like real
              writes).  Every chunk of that region gets one kind:
                unchanged  left as in base (touched but rewritten identically)
                zero       all-zero chunk
                dup        copy of a non-zero chunk from anywhere in the base
                           disk or base memory (disk<->memory too)
                repeat     copy of a "new" chunk placed elsewhere in the custom
                           disk or memory (so it is a repeat within the overlay)
                new        fresh data: host /usr data not used for the base, at
                           unaligned offsets, with a few bytes perturbed, so it
                           is unique yet compresses like real data.

Determinism: output depends only on the flags and on the host's /usr content
(files are listed in sorted order and shuffled with the seeded RNG).
"""

import argparse
import mmap
import os
import random
import shutil
import stat
import sys
import time

CHUNK = 4096
ZERO = bytes(CHUNK)
KINDS = ("unchanged", "zero", "dup", "repeat", "new")
POOL_ROOTS = ("/usr/lib", "/usr/share", "/usr/bin", "/usr/sbin", "/usr/libexec")
MAX_FILE = 8 << 20  # take at most this much of one file, to keep variety


def list_pool_files():
    """Regular files under /usr, sorted (deterministic), hard links once."""
    seen = set()
    out = []
    for root in POOL_ROOTS:
        for d, dirs, files in os.walk(root):
            dirs.sort()
            for f in sorted(files):
                p = os.path.join(d, f)
                try:
                    st = os.lstat(p)
                except OSError:
                    continue
                if not stat.S_ISREG(st.st_mode) or st.st_size < 512:
                    continue
                key = (st.st_dev, st.st_ino)
                if key in seen:
                    continue
                seen.add(key)
                out.append(p)
    return out


class FileStream:
    """Endless stream of host file contents (a shuffled slice of the pool).

    If the slice runs out it starts over, but then XORs a per-lap byte
    pattern into the data so that later laps do not duplicate earlier ones.
    """

    def __init__(self, files, rng):
        self.files = files
        self.rng = rng
        self.idx = 0
        self.lap = 0
        self.buf = b""
        self.pos = 0

    def next_file(self):
        """Content of the next readable file (at most MAX_FILE bytes)."""
        for _ in range(len(self.files) + 1):
            if self.idx >= len(self.files):
                self.idx = 0
                self.lap += 1
            p = self.files[self.idx]
            self.idx += 1
            try:
                with open(p, "rb") as f:
                    data = f.read(MAX_FILE)
            except OSError:
                continue
            if not data:
                continue
            if self.lap:
                data = bytearray(data)
                for i in range(self.lap % 509, len(data), 509):
                    data[i] ^= 0x5A
                data = bytes(data)
            return data
        raise SystemExit("no readable files in " + ", ".join(POOL_ROOTS))

    def take(self, n):
        """Next n bytes of the concatenated stream."""
        parts = []
        while n > 0:
            if self.pos >= len(self.buf):
                self.buf = self.next_file()
                self.pos = 0
            piece = self.buf[self.pos:self.pos + n]
            self.pos += len(piece)
            n -= len(piece)
            parts.append(piece)
        return b"".join(parts)

    def skip(self, n):
        self.take(n)


def perturb(chunk, rng, nbytes):
    """Change nbytes random bytes: makes a chunk unique, keeps it compressible."""
    b = bytearray(chunk)
    for _ in range(nbytes):
        i = rng.randrange(CHUNK)
        b[i] = (b[i] + 1 + rng.randrange(255)) & 0xFF
    return bytes(b)


def heapify(chunk, rng):
    """Anonymous-memory look: binary data with pointer-like 8-byte words."""
    b = bytearray(chunk)
    for _ in range(16):
        i = rng.randrange(CHUNK // 8) * 8
        b[i:i + 8] = (0x00007F0000000000 | rng.getrandbits(40)).to_bytes(8, "little")
    return bytes(b)


def split_counts(total, fracs):
    """Integer counts per kind summing to total (largest remainder)."""
    s = sum(fracs.values())
    raw = {k: total * v / s for k, v in fracs.items()}
    cnt = {k: int(v) for k, v in raw.items()}
    rest = total - sum(cnt.values())
    for k in sorted(raw, key=lambda k: raw[k] - cnt[k], reverse=True)[:rest]:
        cnt[k] += 1
    return cnt


# ---------------------------------------------------------------- base images

def make_base_disk(path, nchunks, used_frac, stream, rng):
    """File data interleaved with zero holes; returns file extents."""
    target = int(nchunks * used_frac)
    files = []  # padded file contents
    used = 0
    while used < target:
        data = stream.next_file()
        n = -(-len(data) // CHUNK)
        if used + n > target:
            n = target - used
            data = data[:n * CHUNK]
        files.append(data)
        used += n
    free = nchunks - used
    # Random cut points spread the free space as holes between files.
    cuts = sorted(rng.randrange(free + 1) for _ in range(len(files)))
    holes = [b - a for a, b in zip([0] + cuts, cuts + [free])]
    extents = []
    with open(path, "wb") as f:
        pos = 0
        for hole, data in zip(holes, files):
            pos += hole
            f.seek(pos * CHUNK)
            f.write(data)
            n = -(-len(data) // CHUNK)
            pad = n * CHUNK - len(data)
            if pad:
                f.write(bytes(pad))
            extents.append((pos, n))
            pos += n
        f.truncate(nchunks * CHUNK)
    return extents


def make_base_mem(path, nchunks, fr, stream, rng, disk_map, extents):
    """Kernel region, page cache of disk files, heap pages, zero pages."""
    counts = {"kernel": 0, "pagecache": 0, "anon": 0, "zero": 0}
    with open(path, "wb") as f:
        nk = int(nchunks * fr["kernel"])
        # Kernel text/data: one contiguous, lightly perturbed binary region.
        for i in range(nk):
            f.write(perturb(stream.take(CHUNK), rng, 2))
        counts["kernel"] = nk
        pos = nk
        kinds = ["pagecache", "anon", "zero"]
        weights = [fr["pagecache"], fr["anon"], fr["zero"]]
        while pos < nchunks:
            kind = rng.choices(kinds, weights)[0]
            run = min(rng.randint(1, 64), nchunks - pos)
            if kind == "zero":
                f.seek((pos + run) * CHUNK)
            elif kind == "pagecache":
                # Consecutive pages of a few files, read from the base disk.
                left = run
                while left:
                    start, n = extents[rng.randrange(len(extents))]
                    off = rng.randrange(n)
                    k = min(left, n - off)
                    s = (start + off) * CHUNK
                    f.write(disk_map[s:s + k * CHUNK])
                    left -= k
            else:
                for _ in range(run):
                    f.write(heapify(stream.take(CHUNK), rng))
            counts[kind] += run
            pos += run
        f.truncate(nchunks * CHUNK)
    return counts


# ------------------------------------------------------------- custom images

def pick_modified(nchunks, frac, mean_extent, rng):
    """Sorted chunk indexes of the modified region, laid out as extents."""
    target = int(round(nchunks * frac))
    mark = bytearray(nchunks)
    count = 0
    while count < target:
        start = rng.randrange(nchunks)
        length = int(rng.expovariate(1.0 / mean_extent)) + 1
        for i in range(start, min(nchunks, start + length)):
            if not mark[i]:
                mark[i] = 1
                count += 1
                if count == target:
                    break
    return [i for i in range(nchunks) if mark[i]]


def assign_kinds(n, fracs, rng):
    """Kind for each of n modified chunks, in runs of 1..32, exact counts."""
    rem = split_counts(n, fracs)
    out = []
    while len(out) < n:
        ks = [k for k in KINDS if rem[k] > 0]
        k = rng.choices(ks, [rem[k] for k in ks])[0]
        run = min(rem[k], rng.randint(1, 32))
        out.extend([k] * run)
        rem[k] -= run
    return out


def runs_of(kinds):
    """(start, end, kind) for maximal runs of equal kind."""
    i = 0
    while i < len(kinds):
        j = i
        while j < len(kinds) and kinds[j] == kinds[i]:
            j += 1
        yield i, j, kinds[i]
        i = j


class Custom:
    """Plan for one custom image: positions and kinds of modified chunks."""

    def __init__(self, name, nchunks, frac, mean_extent, fracs, rng):
        self.name = name
        self.pos = pick_modified(nchunks, frac, mean_extent, rng)
        self.kinds = assign_kinds(len(self.pos), fracs, rng)
        self.content = [None] * len(self.pos)  # None = leave base content


def fill_new(plan, stream, rng, pool):
    """Fresh data; consecutive chunks of a run come from one stretch of data."""
    for a, b, k in runs_of(plan.kinds):
        if k != "new":
            continue
        stream.skip(rng.randrange(1, CHUNK))  # unaligned vs. any base copy
        data = stream.take((b - a) * CHUNK)
        for i in range(a, b):
            o = (i - a) * CHUNK
            c = perturb(data[o:o + CHUNK], rng, 4)
            plan.content[i] = c
            pool.append(c)


def nonzero_base_chunk(maps, rng, avoid):
    """A random non-zero chunk from base disk or memory, != avoid."""
    for _ in range(1000):
        m = maps[rng.randrange(len(maps))]
        j = rng.randrange(len(m) // CHUNK) * CHUNK
        c = m[j:j + CHUNK]
        if c != ZERO and c != avoid:
            return c
    raise SystemExit("base images are (almost) all zero")


def fill_rest(plan, base_map, maps, rng, pool):
    """zero / dup / repeat chunks (after all new chunks exist)."""
    for a, b, k in runs_of(plan.kinds):
        if k == "zero":
            for i in range(a, b):
                plan.content[i] = ZERO
        elif k == "dup":
            # A contiguous run copied from one random base location (like a
            # copied file); re-pick single chunks that are zero or would
            # equal the base chunk at the destination.
            m = maps[rng.randrange(len(maps))]
            src = rng.randrange(len(m) // CHUNK) * CHUNK
            for i in range(a, b):
                p = plan.pos[i] * CHUNK
                here = base_map[p:p + CHUNK]
                s = src + (i - a) * CHUNK
                c = m[s:s + CHUNK] if s + CHUNK <= len(m) else ZERO
                if c == ZERO or c == here:
                    c = nonzero_base_chunk(maps, rng, here)
                plan.content[i] = c
        elif k == "repeat":
            if not pool:
                raise SystemExit("--repeat needs --new > 0")
            src = rng.randrange(len(pool))
            for i in range(a, b):
                plan.content[i] = pool[(src + i - a) % len(pool)]


def write_custom(base_path, path, plan):
    """Copy base, then overwrite modified chunks (coalesced into runs)."""
    shutil.copyfile(base_path, path)
    with open(path, "r+b") as f:
        i = 0
        n = len(plan.pos)
        while i < n:
            if plan.content[i] is None:
                i += 1
                continue
            j = i
            while (j + 1 < n and plan.content[j + 1] is not None
                   and plan.pos[j + 1] == plan.pos[j] + 1):
                j += 1
            os.pwrite(f.fileno(), b"".join(plan.content[i:j + 1]),
                      plan.pos[i] * CHUNK)
            i = j + 1


def effective_changed(plan, base_map):
    """Modified-region chunks whose content really differs from base."""
    n = 0
    for p, c in zip(plan.pos, plan.content):
        if c is not None and c != base_map[p * CHUNK:(p + 1) * CHUNK]:
            n += 1
    return n


# ----------------------------------------------------------------------- main

def main():
    ap = argparse.ArgumentParser(
        description="Synthetic base/custom VM images with controlled chunk kinds.")
    ap.add_argument("outdir")
    ap.add_argument("--disk-mb", type=int, default=1024)
    ap.add_argument("--mem-mb", type=int, default=512)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--disk-used", type=float, default=0.55,
                    help="fraction of base-disk chunks holding file data")
    ap.add_argument("--mem-kernel", type=float, default=0.05)
    ap.add_argument("--mem-pagecache", type=float, default=0.30)
    ap.add_argument("--mem-anon", type=float, default=0.20)
    ap.add_argument("--mem-zero", type=float, default=0.45)
    ap.add_argument("--disk-mod", type=float, default=0.10,
                    help="fraction of custom-disk chunks in the modified region")
    ap.add_argument("--mem-mod", type=float, default=0.40,
                    help="fraction of custom-memory chunks in the modified region")
    for k, v in zip(KINDS, (0.30, 0.10, 0.20, 0.10, 0.30)):
        ap.add_argument("--" + k, type=float, default=v,
                        help=f"fraction of the modified region (default {v})")
    a = ap.parse_args()
    fracs = {k: getattr(a, k) for k in KINDS}
    if any(v < 0 for v in fracs.values()) or sum(fracs.values()) <= 0:
        ap.error("kind fractions must be >= 0 and not all 0")
    if not (0 < a.disk_used <= 1 and 0 <= a.disk_mod <= 1 and 0 <= a.mem_mod <= 1):
        ap.error("fractions out of range")

    t0 = time.time()
    os.makedirs(a.outdir, exist_ok=True)
    out = lambda n: os.path.join(a.outdir, n)
    rng = random.Random(a.seed)
    disk_n = a.disk_mb * 256
    mem_n = a.mem_mb * 256

    # Base data comes from the front of the shuffled pool, "new" data from
    # the back, so new chunks are not simply base chunks at another offset.
    files = list_pool_files()
    rng.shuffle(files)
    half = len(files) // 2
    base_stream = FileStream(files[:half], rng)
    new_stream = FileStream(files[half:][::-1], rng)

    extents = make_base_disk(out("base-disk.img"), disk_n, a.disk_used,
                             base_stream, rng)
    fd = open(out("base-disk.img"), "rb")
    disk_map = mmap.mmap(fd.fileno(), 0, access=mmap.ACCESS_READ)
    mfr = {"kernel": a.mem_kernel, "pagecache": a.mem_pagecache,
           "anon": a.mem_anon, "zero": a.mem_zero}
    s = sum(mfr.values())
    mfr = {k: v / s for k, v in mfr.items()}
    mem_counts = make_base_mem(out("base-mem.img"), mem_n, mfr, base_stream,
                               rng, disk_map, extents)
    fm = open(out("base-mem.img"), "rb")
    mem_map = mmap.mmap(fm.fileno(), 0, access=mmap.ACCESS_READ)
    t_base = time.time() - t0

    disk = Custom("disk", disk_n, a.disk_mod, 64, fracs, rng)
    mem = Custom("mem", mem_n, a.mem_mod, 16, fracs, rng)
    pool = []
    fill_new(disk, new_stream, rng, pool)
    fill_new(mem, new_stream, rng, pool)
    maps = [disk_map, mem_map]
    fill_rest(disk, disk_map, maps, rng, pool)
    fill_rest(mem, mem_map, maps, rng, pool)
    write_custom(out("base-disk.img"), out("custom-disk.img"), disk)
    write_custom(out("base-mem.img"), out("custom-mem.img"), mem)

    lines = [
        f"synthetic set: seed={a.seed} disk={a.disk_mb} MiB ({disk_n} chunks) "
        f"mem={a.mem_mb} MiB ({mem_n} chunks), chunk={CHUNK} B",
        f"base disk: {a.disk_used:.0%} file data from host /usr, rest zero holes "
        f"({len(extents)} files)",
        "base mem: " + ", ".join(f"{k} {mem_counts[k] / mem_n:.1%}"
                                 for k in mem_counts),
        "modified-region kind fractions: " + ", ".join(
            f"{k} {fracs[k] / sum(fracs.values()):.0%}" for k in KINDS),
    ]
    total_new = 0
    for plan, n, frac, bm in ((disk, disk_n, a.disk_mod, disk_map),
                              (mem, mem_n, a.mem_mod, mem_map)):
        cnt = {k: plan.kinds.count(k) for k in KINDS}
        total_new += cnt["new"]
        eff = effective_changed(plan, bm)
        lines.append(
            f"custom {plan.name}: modified region {len(plan.pos)} chunks "
            f"({frac:.0%}); " + ", ".join(
                f"{k} {cnt[k]} ({cnt[k] / n:.2%} of image)" for k in KINDS)
            + f"; really differ from base: {eff} ({eff / n:.2%})")
    lines.append(f"expected unique new chunks: {total_new} "
                 f"({total_new * CHUNK / 2**20:.1f} MiB before compression)")
    lines.append(f"time: base {t_base:.1f}s, total {time.time() - t0:.1f}s")
    text = "\n".join(lines) + "\n"
    with open(out("synthetic-summary.txt"), "w") as f:
        f.write(text)
    sys.stdout.write(text)


if __name__ == "__main__":
    main()
