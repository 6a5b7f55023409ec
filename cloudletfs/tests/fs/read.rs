//! Byte-identical reads against `cloudlet reconstruct`, through read() and mmap.

use crate::*;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use synth::codec::Codec;
use synth::ImageKind;

fn check_images(s: &Setup, g: &MountGuard) {
    let disk = read_all(&g.path("disk/image"));
    assert_eq!(first_diff(&disk, &s.disk), None, "disk differs");
    let memory = read_all(&g.path("memory/image"));
    assert_eq!(first_diff(&memory, &s.memory), None, "memory differs");
    assert_eq!(read_all(&g.path("device-state")), s.device_state);
}

#[test]
fn read_zstd_overlay_matches_reconstruct() {
    if !fuse_ok() {
        return;
    }
    let s = Setup::new(1, Shape::default());
    let g = mount_with(&s, OverlaySource::Path(s.overlay.clone()), |o| {
        o.background_fill = false
    });
    check_images(&s, &g);
    let st = g.mounted().stats();
    assert!(st.disk.chunks.fetched_on_demand > 0);
    assert_eq!(st.disk.chunks.filled_in_background, 0);
    // A small overlay's rebuilt chunks stay in memory by default.
    assert!(st.disk.cache_in_memory && st.memory.cache_in_memory);
}

/// Pairs of disk chunks in one segment, closest first.
fn close_pairs_in_one_segment(meta: &synth::format::Metadata) -> Vec<(u64, u64)> {
    let mut pairs: Vec<(u64, u64)> = Vec::new();
    for seg in &meta.segments {
        let mut disk: Vec<u64> = seg
            .chunks
            .iter()
            .filter(|(k, _)| *k == ImageKind::Disk)
            .map(|&(_, c)| c)
            .collect();
        disk.sort_unstable();
        pairs.extend(disk.windows(2).map(|w| (w[0], w[1])));
    }
    pairs.sort_by_key(|&(a, b)| (b - a, a));
    pairs
}

#[test]
fn read_and_write_spanning_chunks_of_one_segment_do_not_wait_on_themselves() {
    if !fuse_ok() {
        return;
    }
    // The thread that decodes a segment for a request rebuilds its rest after replying. A
    // request that also needs a chunk of that rest must not wait for it: with a short wait
    // timeout, such a wait would end in EIO.
    let s = Setup::new(4, Shape::default());
    let ov = s.overlay_meta();
    let pairs = close_pairs_in_one_segment(ov.metadata());
    let (a, b) = pairs[0];
    let (c, d) = *pairs
        .iter()
        .find(|&&(c, d)| d < a || b < c)
        .expect("a second pair");
    assert!(
        b - a <= 16 && d - c <= 16,
        "pairs too far apart: {a}-{b}, {c}-{d}"
    );
    let g = mount_with(&s, OverlaySource::Path(s.overlay.clone()), |o| {
        o.background_fill = false;
        o.wait_timeout = Duration::from_secs(3);
    });
    let f = open_direct(&g.path("disk/image"), true);
    let (lo, hi) = (a * 4096, (b + 1) * 4096);
    let got = pread(&f, lo, (hi - lo) as usize).expect("read spanning the pair");
    assert_eq!(got, s.disk[lo as usize..hi as usize]);
    // A write partial at both ends: both end chunks are brought in first.
    let (lo, hi) = (c * 4096 + 512, d * 4096 + 512);
    let data = vec![0xa5u8; (hi - lo) as usize];
    f.write_all_at(&data, lo).expect("write spanning the pair");
    let mut want = s.disk[(c * 4096) as usize..((d + 1) * 4096) as usize].to_vec();
    want[512..512 + data.len()].copy_from_slice(&data);
    assert_eq!(pread(&f, c * 4096, want.len()).expect("read back"), want);
    let st = g.mounted().stats();
    assert_eq!(
        (st.disk.fetch_errors, st.disk.verification_failures),
        (0, 0)
    );
}

#[test]
fn read_xz_overlay_after_background_fill_matches_reconstruct() {
    if !fuse_ok() {
        return;
    }
    let s = Setup::new(
        2,
        Shape {
            codec: Codec::Xz,
            ..Shape::default()
        },
    );
    // Rebuilt chunks in files on disk (the default keeps them in memory).
    let g = mount_with(&s, OverlaySource::Path(s.overlay.clone()), |o| {
        o.cache_memory = Some(0)
    });
    assert!(g.mounted().wait_filled(Some(Duration::from_secs(60))));
    check_images(&s, &g);
    let st = g.mounted().stats();
    assert!(!st.disk.cache_in_memory && !st.memory.cache_in_memory);
    assert_eq!(st.disk.chunks.pending + st.memory.chunks.pending, 0);
    assert_eq!(st.fetch.segments_done, st.fetch.segments);
}

#[test]
fn read_mmap_private_and_shared_match_reconstruct() {
    if !fuse_ok() {
        return;
    }
    let s = Setup::new(3, Shape::default());
    let g = mount_with(&s, slow(&s.overlay, Duration::from_millis(2)), |_| {});
    for (name, want) in [("disk/image", &s.disk), ("memory/image", &s.memory)] {
        for shared in [false, true] {
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(shared)
                .open(g.path(name))
                .expect("open");
            let len = want.len();
            let flags = if shared {
                libc::MAP_SHARED
            } else {
                libc::MAP_PRIVATE
            };
            let prot = if shared {
                libc::PROT_READ | libc::PROT_WRITE
            } else {
                libc::PROT_READ
            };
            // SAFETY: mapping a file we opened, with its exact length; unmapped below.
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    prot,
                    flags,
                    std::os::fd::AsRawFd::as_raw_fd(&f),
                    0,
                )
            };
            assert_ne!(p, libc::MAP_FAILED, "mmap {name}");
            // SAFETY: `p` maps `len` readable bytes until munmap.
            let got = unsafe { std::slice::from_raw_parts(p.cast::<u8>(), len) }.to_vec();
            // SAFETY: unmapping exactly what was mapped.
            unsafe { libc::munmap(p, len) };
            assert_eq!(first_diff(&got, want), None, "{name} shared={shared}");
        }
    }
}

#[test]
fn tree_lists_original_cloudletfs_layout() {
    if !fuse_ok() {
        return;
    }
    let s = Setup::new(
        4,
        Shape {
            disk: 1 << 20,
            memory: 1 << 20,
            ..Shape::default()
        },
    );
    let g = mount_with(&s, OverlaySource::Path(s.overlay.clone()), |_| {});
    let names = |p: &str| {
        let mut v: Vec<String> = std::fs::read_dir(g.path(p))
            .expect("readdir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    };
    assert_eq!(names(""), ["device-state", "disk", "memory"]);
    assert_eq!(names("disk"), ["image", "stats", "streams"]);
    assert_eq!(
        names("memory/streams"),
        ["chunks_accessed", "chunks_discarded", "chunks_modified"]
    );
    assert_eq!(
        std::fs::metadata(g.path("disk/image")).expect("stat").len(),
        s.disk.len() as u64
    );
    // The mount's readahead window is raised through sysfs (the kernel offers 128 KiB at
    // init); as root, as here, that must have happened.
    let dev = std::fs::metadata(g.path("")).expect("stat root").dev();
    let ra = format!(
        "/sys/class/bdi/{}:{}/read_ahead_kb",
        libc::major(dev),
        libc::minor(dev)
    );
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        let kb = std::fs::read_to_string(&ra).expect("read_ahead_kb");
        assert_eq!(
            kb.trim(),
            (cloudletfs::fs::MAX_READAHEAD / 1024).to_string()
        );
    }
    assert_eq!(
        std::fs::metadata(g.path("memory/image"))
            .expect("stat")
            .len(),
        s.memory.len() as u64
    );
    let stats: serde_json::Value =
        serde_json::from_slice(&read_all(&g.path("disk/stats"))).expect("json");
    assert_eq!(
        stats["image"]["chunks"]["total"],
        (s.disk.len() as u64).div_ceil(4096)
    );
    assert!(std::fs::OpenOptions::new()
        .write(true)
        .open(g.path("device-state"))
        .is_err());
}

/// Base chunks reach a reply two ways: a small read copies them into the FUSE thread's buffer,
/// a large read of base chunks only is replied straight from the base mapping. With few changes,
/// 1 MiB reads find long runs of base chunks; `O_DIRECT` makes each read one FUSE read of that
/// size. Both sizes, over the whole of both images, give the reconstruction's bytes.
#[test]
fn small_and_large_reads_of_base_runs_match_reconstruct() {
    if !fuse_ok() {
        return;
    }
    let shape = Shape {
        disk: 8 << 20,
        memory: 4 << 20,
        changes: 4,
        ..Shape::default()
    };
    let s = Setup::new(5, shape);
    let g = mount_with(&s, OverlaySource::Path(s.overlay.clone()), |o| {
        o.background_fill = false
    });
    for (name, want) in [("disk/image", &s.disk), ("memory/image", &s.memory)] {
        let f = open_direct(&g.path(name), false);
        for size in [4096, 1 << 20] {
            for off in (0..want.len()).step_by(size) {
                let len = size.min(want.len() - off);
                let got = pread(&f, off as u64, len).expect("pread");
                assert!(
                    got == want[off..off + len],
                    "{name}: {size}-byte read at {off} differs"
                );
            }
        }
    }
    // The reads past the base's end (the custom disk is longer) were zeros, and the base runs
    // were long enough for the mapping: most of the image was base.
    let st = g.mounted().stats();
    assert!(st.disk.chunks.from_base * 2 > st.disk.chunks.total);
}

/// Pages of `path` in `range` that the page cache holds (`mincore` of a fresh mapping).
fn cached_pages(path: &std::path::Path, range: std::ops::Range<usize>) -> usize {
    let f = File::open(path).expect("open base");
    // SAFETY: the test's base file is not written or truncated while the mapping lives.
    let m = unsafe { memmap2::Mmap::map(&f) }.expect("map base");
    let pages = range.len().div_ceil(4096);
    let mut v = vec![0u8; pages];
    // SAFETY: `range` lies inside the mapping and starts on a page; `v` has a byte per page.
    let r = unsafe {
        libc::mincore(
            m[range].as_ptr() as *mut libc::c_void,
            pages * 4096,
            v.as_mut_ptr(),
        )
    };
    assert_eq!(r, 0, "mincore: {}", std::io::Error::last_os_error());
    v.iter().filter(|p| *p & 1 == 1).count()
}

/// A large read of base chunks that the page cache does not hold is read from the disk with
/// `O_DIRECT`: the reply has the reconstruction's bytes and the base's page cache stays empty.
/// Once the page cache holds the base, the same reads are served from the mapping, with the
/// same bytes.
#[test]
fn large_reads_of_an_uncached_base_bypass_its_page_cache() {
    if !fuse_ok() {
        return;
    }
    let shape = Shape {
        disk: 8 << 20,
        memory: 2 << 20,
        changes: 4,
        ..Shape::default()
    };
    let s = Setup::new(7, shape);
    let g = mount_with(&s, OverlaySource::Path(s.overlay.clone()), |o| {
        o.background_fill = false
    });
    let base_path = s.fx.base.disk_path();
    let base = File::open(&base_path).expect("open base");
    base.sync_all().expect("sync base");
    // SAFETY: plain advice on an open descriptor; no memory is involved.
    let r = unsafe { libc::posix_fadvise(base.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    assert_eq!(r, 0, "posix_fadvise");
    let base_len = s.fx.base_disk.len();
    if cached_pages(&base_path, 0..base_len) != 0 {
        // tmpfs, for one, keeps its pages whatever the advice.
        cloudlet_e2e::skip("the base's page cache cannot be emptied here");
        return;
    }
    // The 1 MiB regions that are all base: chunks equal to the base at the same place.
    let mib = 1usize << 20;
    let regions: Vec<usize> = (0..base_len.min(s.disk.len()) / mib)
        .map(|i| i * mib)
        .filter(|&off| s.disk[off..off + mib] == s.fx.base_disk[off..off + mib])
        .collect();
    assert!(regions.len() >= 4, "too few all-base regions: {regions:?}");
    let img = open_direct(&g.path("disk/image"), false);
    // One FUSE read of 1 MiB each: the kernel splits an O_DIRECT read at the pages of the
    // reader's buffer, so it is aligned (as QEMU's are).
    let mut buf = vec![0u8; mib + 4096];
    let at = buf.as_ptr().align_offset(4096);
    for &off in &regions {
        img.read_exact_at(&mut buf[at..at + mib], off as u64)
            .expect("read through the mount");
        assert!(
            buf[at..at + mib] == s.disk[off..off + mib],
            "uncached read at {off} differs"
        );
        assert_eq!(
            cached_pages(&base_path, off..off + mib),
            0,
            "the read at {off} went through the base's page cache"
        );
    }
    // Now cached: served from the mapping.
    assert_eq!(read_all(&base_path), s.fx.base_disk);
    for &off in &regions {
        let got = pread(&img, off as u64, mib).expect("read through the mount");
        assert!(
            got == s.disk[off..off + mib],
            "cached read at {off} differs"
        );
    }
}

/// A base image that shrinks under a mount (an operator's mistake: the registry's files are
/// immutable by contract) gives EIO for the chunks it lost, small reads (`pread`) and large
/// ones (the mapping) alike, never zeros or a crash; what it still has is served.
#[test]
fn base_truncated_under_the_mount_gives_eio() {
    if !fuse_ok() {
        return;
    }
    let shape = Shape {
        disk: 8 << 20,
        changes: 4,
        ..Shape::default()
    };
    let s = Setup::new(6, shape);
    let g = mount_with(&s, OverlaySource::Path(s.overlay.clone()), |o| {
        o.background_fill = false
    });
    let kept = 4usize << 20;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(s.fx.base.disk_path())
        .expect("open base");
    f.set_len(kept as u64).expect("truncate base");
    let img = open_direct(&g.path("disk/image"), false);
    let mut lost_reads = 0;
    for size in [4096, 1 << 20] {
        for off in (kept..shape.disk).step_by(size) {
            let want = &s.disk[off..off + size];
            // Chunks the overlay leaves to the base: equal to the base at the same place.
            let lost = (off..off + size)
                .step_by(4096)
                .any(|c| s.disk[c..c + 4096] == s.fx.base_disk[c..c + 4096]);
            match pread(&img, off as u64, size) {
                Err(e) => assert_eq!(e.raw_os_error(), Some(libc::EIO), "{size} at {off}: {e}"),
                Ok(got) => {
                    assert!(
                        !lost,
                        "{size}-byte read at {off} served a base chunk that is gone"
                    );
                    assert!(got == want, "{size}-byte read at {off} differs");
                }
            }
            lost_reads += usize::from(lost);
        }
    }
    // Both sizes met lost base chunks (the 1 MiB reads always do).
    assert!(lost_reads > (shape.disk - kept) / (1 << 20));
    let got = pread(&img, 0, kept).expect("read what the base still has");
    assert!(got == s.disk[..kept]);
}

#[test]
fn read_by_another_user_is_refused_even_with_allow_other() {
    if !fuse_ok() {
        return;
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipping: switching to another user needs root");
        return;
    }
    let s = Setup::new(6, Shape::default());
    let g = mount_with(&s, OverlaySource::Path(s.overlay.clone()), |o| {
        o.allow_other = true;
        o.background_fill = false;
    });
    let as_nobody = |rel: &str| {
        use std::os::unix::process::CommandExt;
        std::process::Command::new("cat")
            .arg(g.path(rel))
            .uid(65534)
            .gid(65534)
            .output()
            .expect("run cat as nobody")
    };

    let memory = as_nobody("memory/image");
    let disk = as_nobody("disk/image");

    for out in [&memory, &disk] {
        assert!(!out.status.success(), "another user read a guest image");
        assert!(out.stdout.is_empty());
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("Permission denied"),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let mode = std::fs::metadata(g.path("memory/image")).unwrap().mode() & 0o777;
    assert_eq!(mode, 0o600);
    assert_eq!(
        read_all(&g.path("memory/image")),
        s.memory,
        "the owner still reads"
    );
}
