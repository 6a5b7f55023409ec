//! Writes, discards and the concurrency stress test.

use crate::*;
use std::sync::atomic::{AtomicBool, Ordering};

const SLOT: u64 = 1536;
const WRITABLE: u64 = 1024;

/// One writer's writes, in order.
type Log = Vec<(u64, Vec<u8>)>;

fn stress_one(seed: u64) {
    let s = Setup::new(
        100 + seed,
        Shape {
            disk: 2 << 20,
            memory: 1 << 20,
            segment: 32 << 10,
            ..Shape::default()
        },
    );
    // Odd seeds keep the rebuilt chunks in a file on disk, even ones in memory.
    let g = mount_with(&s, slow(&s.overlay, Duration::from_millis(3)), |o| {
        o.fetch_threads = 1;
        o.cache_memory = (seed % 2 == 1).then_some(0);
    });
    let path = g.path("disk/image");
    let size = s.disk.len() as u64;
    let slots = size / SLOT;
    let writers = 3u64;
    let stop = AtomicBool::new(false);
    let logs: Vec<Log> = std::thread::scope(|sc| {
        let mut readers = Vec::new();
        for r in 0..2u64 {
            let (path, stop, want) = (&path, &stop, &s.disk);
            readers.push(sc.spawn(move || {
                let f = std::fs::File::open(path).expect("open");
                let mut rng = Rng::new(seed * 1000 + r);
                while !stop.load(Ordering::Relaxed) {
                    let off = rng.below(size);
                    let len = (1 + rng.below(64 << 10)).min(size - off) as usize;
                    let got = pread(&f, off, len).expect("reader pread");
                    for (i, b) in got.iter().enumerate() {
                        let pos = off + i as u64;
                        if pos < slots * SLOT && pos % SLOT >= WRITABLE {
                            assert_eq!(
                                *b, want[pos as usize],
                                "seed {seed}: byte {pos} never written changed"
                            );
                        }
                    }
                }
            }));
        }
        let handles: Vec<_> = (0..writers)
            .map(|w| {
                let path = &path;
                sc.spawn(move || {
                    let f = std::fs::OpenOptions::new()
                        .read(true)
                        .write(true)
                        .open(path)
                        .expect("open rw");
                    let mut rng = Rng::new(seed * 7919 + w);
                    let mut log = Log::new();
                    for _ in 0..300 {
                        let slot = rng.below(slots / writers) * writers + w;
                        let start = rng.below(WRITABLE);
                        let len = 1 + rng.below(WRITABLE - start);
                        let mut data = vec![0u8; len as usize];
                        rng.fill(&mut data);
                        let off = slot * SLOT + start;
                        f.write_all_at(&data, off).expect("writer pwrite");
                        log.push((off, data));
                    }
                    log
                })
            })
            .collect();
        let logs = handles
            .into_iter()
            .map(|h| h.join().expect("writer"))
            .collect();
        stop.store(true, Ordering::Relaxed);
        for r in readers {
            r.join().expect("reader");
        }
        logs
    });
    let mut model = s.disk.clone();
    for log in &logs {
        for (off, data) in log {
            model[*off as usize..*off as usize + data.len()].copy_from_slice(data);
        }
    }
    g.mounted().wait_filled(Some(Duration::from_secs(60)));
    let got = read_all(&path);
    assert_eq!(
        first_diff(&got, &model),
        None,
        "seed {seed}: disk differs from the model"
    );
    // The page cache could hide a lost write: read again without it.
    let direct = pread(&open_direct(&path, false), 0, got.len()).expect("direct read");
    assert_eq!(
        first_diff(&direct, &model),
        None,
        "seed {seed}: disk (O_DIRECT) differs from the model"
    );
    assert_eq!(read_all(&g.path("memory/image")), s.memory);
}

#[test]
fn stress_concurrent_writes_during_slow_fill_match_model() {
    if !fuse_ok() {
        return;
    }
    for seed in 0..stress_seeds() {
        stress_one(seed);
    }
}

#[test]
fn punch_hole_whole_chunks_discarded_partial_zeroed() {
    if !fuse_ok() {
        return;
    }
    let s = Setup::new(
        5,
        Shape {
            disk: 1 << 20,
            memory: 1 << 20,
            ..Shape::default()
        },
    );
    let g = mount_with(&s, OverlaySource::Path(s.overlay.clone()), |_| {});
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(g.path("disk/image"))
        .expect("open");
    let (off, len) = (4096 * 3 + 100, 4096 * 4);
    // SAFETY: fallocate on an open file descriptor with integer arguments.
    let r = unsafe {
        libc::fallocate(
            std::os::fd::AsRawFd::as_raw_fd(&f),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            off,
            len,
        )
    };
    assert_eq!(r, 0, "fallocate: {}", std::io::Error::last_os_error());
    let mut want = s.disk.clone();
    want[off as usize..(off + len) as usize].fill(0);
    assert_eq!(first_diff(&read_all(&g.path("disk/image")), &want), None);
    let st = g.mounted().stats();
    assert_eq!(st.disk.chunks.discarded, 3);
    assert_eq!(st.disk.chunks.modified, 2);
}

#[test]
fn write_then_remount_with_state_keeps_writes() {
    if !fuse_ok() {
        return;
    }
    let s = Setup::new(
        6,
        Shape {
            disk: 1 << 20,
            memory: 1 << 20,
            ..Shape::default()
        },
    );
    let state = s.fx.path("state");
    let mut want = s.memory.clone();
    {
        let g = mount_with(&s, OverlaySource::Path(s.overlay.clone()), |o| {
            o.state_dir = Some(state.clone())
        });
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(g.path("memory/image"))
            .expect("open");
        f.write_all_at(b"persist me", 5000).expect("write");
        f.sync_all().expect("fsync");
        want[5000..5010].copy_from_slice(b"persist me");
    }
    let g = mount_with(&s, OverlaySource::Path(s.overlay.clone()), |o| {
        o.state_dir = Some(state.clone())
    });
    assert_eq!(first_diff(&read_all(&g.path("memory/image")), &want), None);
    assert_eq!(g.mounted().stats().memory.chunks.modified, 1);
}

#[test]
fn cow_quota_write_past_it_fails_and_everything_else_keeps_working() {
    if !fuse_ok() {
        return;
    }
    let s = Setup::new(
        14,
        Shape {
            disk: 1 << 20,
            memory: 1 << 20,
            ..Shape::default()
        },
    );
    let g = mount_with(&s, OverlaySource::Path(s.overlay.clone()), |o| {
        o.cow_quota = Some(3 * 4096)
    });
    let path = g.path("disk/image");
    // O_DIRECT: each write reaches the daemon now and fails or succeeds there.
    let f = open_direct(&path, true);
    let mut want = s.disk.clone();
    for c in 0..3u64 {
        let data = vec![c as u8 + 1; 4096];
        f.write_all_at(&data, c * 4096)
            .expect("write within the quota");
        want[(c * 4096) as usize..][..4096].copy_from_slice(&data);
    }
    let err = f
        .write_all_at(&[0xee; 4096], 10 * 4096)
        .expect_err("write past the quota");
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    // A chunk already modified can be written again, partly or whole.
    f.write_all_at(&[0x77; 100], 4096 + 50)
        .expect("rewrite of a modified chunk");
    want[4096 + 50..4096 + 150].fill(0x77);
    // Reads of the whole disk (the refused chunk unchanged) and of the memory still work.
    assert_eq!(
        first_diff(&pread(&f, 0, want.len()).expect("read"), &want),
        None
    );
    assert_eq!(read_all(&g.path("memory/image")), s.memory);
    let cow = g.mounted().stats().disk.cow;
    assert_eq!(cow.quota_bytes, Some(3 * 4096));
    assert_eq!(cow.used_bytes, 3 * 4096);
    let json: serde_json::Value =
        serde_json::from_slice(&read_all(&g.path("disk/stats"))).expect("stats JSON");
    assert_eq!(json["image"]["cow"]["quota_bytes"], 3 * 4096);
    assert_eq!(json["image"]["cow"]["used_bytes"], 3 * 4096);
    // A discard gives its chunk back: the refused write now fits.
    f.write_all_at(&[0; 4096], 0).expect("zero");
    // SAFETY: fallocate on an open file descriptor with integer arguments.
    let r = unsafe {
        libc::fallocate(
            std::os::fd::AsRawFd::as_raw_fd(&f),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            0,
            4096,
        )
    };
    assert_eq!(r, 0, "fallocate: {}", std::io::Error::last_os_error());
    f.write_all_at(&[0xee; 4096], 10 * 4096)
        .expect("write after a discard gave a chunk back");
    // Another mount of the same overlay has a quota of its own (none).
    let other = mount_with(&s, OverlaySource::Path(s.overlay.clone()), |_| {});
    let o = open_direct(&other.path("disk/image"), true);
    for c in 0..5u64 {
        o.write_all_at(&[1; 4096], c * 4096)
            .expect("write on a mount without quota");
    }
}
