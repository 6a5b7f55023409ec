#!/usr/bin/env python3
"""Helpers for make-debian.sh (stdlib only).

usage:
  debian_helpers.py debugfs-script BASE_TREE CUSTOM_TREE > CMDS
      debugfs commands that turn an ext4 image of BASE_TREE into one holding
      CUSTOM_TREE (rm / rmdir / mkdir / write / symlink / mknod / ln + sif
      for mode, owner and mtime).  Used when a loop mount is not possible.
  debian_helpers.py mem BASE_TREE CUSTOM_TREE OUTDIR [--mem-mb N] [--seed S]
      base-mem.img and custom-mem.img (guest RAM look-alikes), see mem_images.
  debian_helpers.py changed BASE_TREE CUSTOM_TREE
      list new/changed regular files (relative paths), one per line.
"""

import argparse
import os
import random
import stat
import sys

PAGE = 4096
ZERO = bytes(PAGE)


# ------------------------------------------------------------------ tree diff

def scan(root):
    """relpath -> lstat result for everything below root (not root itself)."""
    out = {}
    for d, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(dirs + files):
            p = os.path.join(d, name)
            out[os.path.relpath(p, root)] = os.lstat(p)
    return out


def same_content(a, b):
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x = fa.read(1 << 20)
            y = fb.read(1 << 20)
            if x != y:
                return False
            if not x:
                return True


def kind(st):
    return stat.S_IFMT(st.st_mode)


def changed_files(base, custom, bs=None, cs=None):
    """Regular files of custom that are new or differ in content from base."""
    bs = bs if bs is not None else scan(base)
    cs = cs if cs is not None else scan(custom)
    out = []
    for rel, st in cs.items():
        if not stat.S_ISREG(st.st_mode):
            continue
        old = bs.get(rel)
        if (old is None or not stat.S_ISREG(old.st_mode)
                or old.st_size != st.st_size
                or not same_content(os.path.join(base, rel),
                                    os.path.join(custom, rel))):
            out.append(rel)
    return out


def q(path):
    """Quote a path for debugfs' command parser."""
    if any(c in path for c in '"\n\\'):
        raise SystemExit(f"unsupported character in path: {path!r}")
    return '"' + path + '"'


def debugfs_script(base, custom):
    bs, cs = scan(base), scan(custom)
    changed = set(changed_files(base, custom, bs, cs))
    cmds = []

    def meta(rel, st, mode=True):
        p = q("/" + rel)
        if mode:
            cmds.append(f"sif {p} mode 0{st.st_mode:o}")
        cmds.append(f"sif {p} uid {st.st_uid}")
        cmds.append(f"sif {p} gid {st.st_gid}")
        cmds.append(f"sif {p} mtime @{int(st.st_mtime)}")

    # 1. Remove what is gone or changed type (deepest first), and regular
    #    files whose content changed (dpkg also writes a new inode + rename).
    gone = [r for r in bs if r not in cs or kind(bs[r]) != kind(cs[r])
            or (stat.S_ISLNK(cs[r].st_mode)
                and os.readlink(os.path.join(base, r))
                != os.readlink(os.path.join(custom, r)))
            or (stat.S_ISREG(cs[r].st_mode) and r in changed)]
    for rel in sorted(gone, key=lambda r: (-r.count("/"), r)):
        verb = "rmdir" if stat.S_ISDIR(bs[rel].st_mode) else "rm"
        cmds.append(f"{verb} {q('/' + rel)}")
    gone = set(gone)

    # 2. Create / update in top-down order (os.walk order is top-down).
    links = {}  # (dev, ino) of new multi-link files -> [first path, count]
    for rel, st in cs.items():
        p = q("/" + rel)
        src = os.path.join(custom, rel)
        new = rel not in bs or rel in gone
        if stat.S_ISDIR(st.st_mode):
            if new:
                cmds.append(f"mkdir {p}")
                meta(rel, st)
            elif (st.st_mode, st.st_uid, st.st_gid) != (
                    bs[rel].st_mode, bs[rel].st_uid, bs[rel].st_gid):
                meta(rel, st)
        elif stat.S_ISREG(st.st_mode):
            if new:
                key = (st.st_dev, st.st_ino)
                if st.st_nlink > 1 and key in links:
                    cmds.append(f"ln {q('/' + links[key][0])} {p}")
                    links[key][1] += 1
                    continue
                cmds.append(f"write {q(src)} {p}")
                meta(rel, st)
                if st.st_nlink > 1:
                    links[key] = [rel, 1]
            elif (st.st_mode, st.st_uid, st.st_gid) != (
                    bs[rel].st_mode, bs[rel].st_uid, bs[rel].st_gid):
                meta(rel, st)
        elif stat.S_ISLNK(st.st_mode):
            if new:
                cmds.append(f"symlink {p} {q(os.readlink(src))}")
                meta(rel, st, mode=False)
        elif new:  # device node, fifo, socket
            if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                t = "c" if stat.S_ISCHR(st.st_mode) else "b"
                cmds.append(f"mknod {p} {t} {os.major(st.st_rdev)} "
                            f"{os.minor(st.st_rdev)}")
            elif stat.S_ISFIFO(st.st_mode):
                cmds.append(f"mknod {p} p")
            else:
                continue  # sockets are not worth keeping
            meta(rel, st)
    # debugfs' ln does not count links: fix the count of hard-linked files.
    for first, n in links.values():
        if n > 1:
            cmds.append(f"sif {q('/' + first)} links_count {n}")
    return "".join(c + "\n" for c in cmds)


# --------------------------------------------------------------- memory model

def file_pages(path, limit=None):
    """A file's content as 4 KiB pages, tail zero padded (like page cache)."""
    with open(path, "rb") as f:
        data = f.read() if limit is None else f.read(limit * PAGE)
    pages = [data[i:i + PAGE] for i in range(0, len(data), PAGE)]
    if pages and len(pages[-1]) < PAGE:
        pages[-1] = pages[-1] + bytes(PAGE - len(pages[-1]))
    return pages


def perturb(page, rng, n):
    b = bytearray(page)
    for _ in range(n):
        i = rng.randrange(PAGE)
        b[i] = (b[i] + 1 + rng.randrange(255)) & 0xFF
    return bytes(b)


def heapify(page, rng):
    """Anonymous-memory look: binary data with pointer-like 8-byte words."""
    b = bytearray(page)
    for _ in range(16):
        i = rng.randrange(PAGE // 8) * 8
        b[i:i + 8] = (0x00007F0000000000 | rng.getrandbits(40)).to_bytes(8, "little")
    return bytes(b)


def host_files(exclude_rel, rng):
    """Host binaries/libraries that are NOT in the guest tree (by path).

    The host is Debian too, so identical files (same package version) would
    dedup against the guest disk; data standing for a decompressed kernel or
    for heap contents must not exist on the guest disk.
    """
    out = []
    for root in ("/usr/lib", "/usr/bin", "/usr/libexec"):
        for d, dirs, files in os.walk(root):
            dirs.sort()
            for name in sorted(files):
                p = os.path.join(d, name)
                try:
                    st = os.lstat(p)
                except OSError:
                    continue
                if (stat.S_ISREG(st.st_mode) and st.st_size >= 64 * PAGE
                        and p.lstrip("/") not in exclude_rel):
                    out.append(p)
    rng.shuffle(out)
    return out


class PageSource:
    """Pages from a list of host files, one file after another."""

    def __init__(self, files):
        self.files = files
        self.i = 0
        self.pages = []

    def take(self, n):
        out = []
        while len(out) < n:
            if not self.pages:
                if self.i >= len(self.files):
                    raise SystemExit("ran out of host files for memory data")
                try:
                    self.pages = [p for p in file_pages(self.files[self.i], 2048)
                                  if p != ZERO]
                except OSError:
                    self.pages = []
                self.i += 1
            k = n - len(out)
            out += self.pages[:k]
            self.pages = self.pages[k:]
        return out


def file_runs(tree, rels, rng, budget, max_run):
    """Page-cache runs for files in rels order, up to budget pages in all.

    Each file's pages are cut into runs of 1..max_run pages, because the
    page cache of one file is scattered over physical memory.
    """
    runs = []
    used = 0
    for rel in rels:
        if used >= budget:
            break
        try:
            pages = file_pages(os.path.join(tree, rel), budget - used)
        except OSError:
            continue
        i = 0
        while i < len(pages):
            k = rng.randint(1, max_run)
            runs.append(("pagecache", pages[i:i + k]))
            i += k
        used += len(pages)
    return runs, used


def cache_order(tree, rels, rng):
    """Files in the order a page cache would likely hold them: libraries,
    binaries and dpkg/apt state first, then the rest; shuffled within."""
    hot = ("usr/lib", "usr/bin", "usr/sbin", "etc", "var/lib/dpkg")
    a = [r for r in rels if r.startswith(hot)]
    b = [r for r in rels if not r.startswith(hot)]
    rng.shuffle(a)
    rng.shuffle(b)
    return a + b


def mem_images(base, custom, outdir, mem_mb, seed):
    """Guest-RAM look-alikes (all placement 4 KiB aligned):

    base-mem.img: first 1 MiB zero (BIOS/low memory), a "kernel" region of
      ~5% (host binaries not on the guest disk, lightly perturbed, i.e.
      unique code/data), 25% page cache of base-rootfs files (exact page
      copies => dedup against base-disk blocks), 12% anonymous pages
      (heap-like, unique), the rest zero; page cache, anon and zero runs are
      shuffled over physical memory like a running system's.
    custom-mem.img: base-mem with runs overwritten: page cache of all
      new/changed files of the custom rootfs (up to 25% of RAM; these dedup
      against the new disk chunks of the overlay), 3% more base-file page
      cache, 10% fresh anonymous pages (the new app's heap), 3% zeroed pages.
      70% of those runs land in memory that was free (zero) in the base, 30%
      anywhere (reclaimed cache), never on top of each other.
    """
    rng = random.Random(seed)
    n = mem_mb * 256
    bs = scan(base)
    base_files = sorted(r for r, st in bs.items() if stat.S_ISREG(st.st_mode))
    new_files = sorted(changed_files(base, custom, bs))
    hosts = host_files(set(base_files) | set(scan(custom)), rng)
    half = len(hosts) // 2
    src_base, src_custom = PageSource(hosts[:half]), PageSource(hosts[half:])

    mem = bytearray(n * PAGE)
    low = 256  # first MiB stays zero
    nk = n * 5 // 100
    for i, pg in enumerate(src_base.take(nk)):
        o = (low + i) * PAGE
        mem[o:o + PAGE] = perturb(pg, rng, 2)
    runs, pc = file_runs(base, cache_order(base, base_files, rng), rng,
                         n * 25 // 100, 16)
    na = n * 12 // 100
    left = na
    while left:
        k = min(left, rng.randint(1, 32))
        runs.append(("anon", [heapify(p, rng) for p in src_base.take(k)]))
        left -= k
    free = n - low - nk - pc - na
    left = free
    while left > 0:
        k = min(left, rng.randint(1, 64))
        runs.append(("zero", k))
        left -= k
    rng.shuffle(runs)
    pos = low + nk
    for kind_, r in runs:
        if kind_ == "zero":
            pos += r
            continue
        mem[pos * PAGE:(pos + len(r)) * PAGE] = b"".join(r)
        pos += len(r)
    assert pos == n, (pos, n)
    base_counts = {"low-zero": low, "kernel": nk, "pagecache": pc,
                   "anon": na, "zero": free}
    with open(os.path.join(outdir, "base-mem.img"), "wb") as f:
        f.write(mem)

    # Custom: overwrite runs in a copy of base memory.
    was_zero = [mem[i * PAGE:(i + 1) * PAGE] == ZERO for i in range(n)]
    taken = bytearray(n)
    cruns, npc = file_runs(custom, cache_order(custom, new_files, rng), rng,
                           n * 25 // 100, 16)
    more, nmore = file_runs(base, cache_order(base, base_files, rng), rng,
                            n * 3 // 100, 16)
    cruns += [("pagecache-base", r) for _, r in more]
    na2 = n * 10 // 100
    left = na2
    while left:
        k = min(left, rng.randint(1, 32))
        cruns.append(("anon", [heapify(p, rng) for p in src_custom.take(k)]))
        left -= k
    nz = n * 3 // 100
    left = nz
    while left:
        k = min(left, rng.randint(1, 16))
        cruns.append(("zeroed", [ZERO] * k))
        left -= k
    rng.shuffle(cruns)
    for kind_, r in cruns:
        k = len(r)
        want_free = rng.random() < 0.7
        for attempt in range(10000):
            s = rng.randrange(low, n - k + 1)
            if any(taken[s:s + k]):
                continue
            if want_free and attempt < 5000 and not all(was_zero[s:s + k]):
                continue
            break
        else:
            raise SystemExit("memory too full to place custom runs")
        taken[s:s + k] = b"\1" * k
        mem[s * PAGE:(s + k) * PAGE] = b"".join(r)
    with open(os.path.join(outdir, "custom-mem.img"), "wb") as f:
        f.write(mem)
    new_bytes = sum(bs_.st_size for bs_ in
                    (os.lstat(os.path.join(custom, r)) for r in new_files))
    lines = [
        f"memory: {mem_mb} MiB = {n} pages, seed {seed}",
        "base-mem pages: " + ", ".join(f"{k} {v} ({v / n:.1%})"
                                       for k, v in base_counts.items()),
        f"new/changed files in custom rootfs: {len(new_files)} "
        f"({new_bytes / 2**20:.1f} MiB)",
        "custom-mem overwritten pages: "
        f"new-file page cache {npc} ({npc / n:.1%}), base-file page cache "
        f"{nmore} ({nmore / n:.1%}), fresh anon {na2} ({na2 / n:.1%}), "
        f"zeroed {nz} ({nz / n:.1%}); 70% of runs placed in base-free memory",
    ]
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description="helpers for make-debian.sh")
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("debugfs-script")
    s.add_argument("base_tree")
    s.add_argument("custom_tree")
    s = sub.add_parser("changed")
    s.add_argument("base_tree")
    s.add_argument("custom_tree")
    s = sub.add_parser("mem")
    s.add_argument("base_tree")
    s.add_argument("custom_tree")
    s.add_argument("outdir")
    s.add_argument("--mem-mb", type=int, default=512)
    s.add_argument("--seed", type=int, default=1)
    a = ap.parse_args()
    if a.cmd == "debugfs-script":
        sys.stdout.write(debugfs_script(a.base_tree, a.custom_tree))
    elif a.cmd == "changed":
        for r in changed_files(a.base_tree, a.custom_tree):
            print(r)
    else:
        sys.stdout.write(mem_images(a.base_tree, a.custom_tree, a.outdir,
                                    a.mem_mb, a.seed))


if __name__ == "__main__":
    main()
