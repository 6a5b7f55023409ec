//! Many reads waiting for the network at once: everything else is still served.

use crate::*;
use std::sync::mpsc;
use std::time::Instant;
use synth::ImageKind;

#[test]
fn base_reads_served_while_many_reads_wait_for_the_network() {
    if !fuse_ok() {
        return;
    }
    // More readers of pending chunks than the daemon has FUSE threads (8) and than the
    // kernel's default limit of FUSE readahead requests in flight (12), as a guest's I/O
    // can be right after an early resume; and writers of parts of pending chunks. Through
    // the page cache, as QEMU reads and writes.
    const READERS: usize = 32;
    const WRITERS: usize = 8;
    const PATCH: &[u8] = b"written while the network stood still";
    let s = Setup::new(
        21,
        Shape {
            segment: 4096,
            ..Shape::default()
        },
    );
    let ov = s.overlay_meta();
    let meta = ov.metadata();
    // One disk chunk from each of READERS + WRITERS segments: each needs its own fetch.
    let wanted: Vec<u64> = meta
        .segments
        .iter()
        .filter_map(|seg| {
            seg.chunks
                .iter()
                .find(|(k, _)| *k == ImageKind::Disk)
                .map(|&(_, c)| c)
        })
        .take(READERS + WRITERS)
        .collect();
    assert_eq!(wanted.len(), READERS + WRITERS, "too few segments");
    let (read, written) = wanted.split_at(READERS);
    let disk = meta.image(ImageKind::Disk);
    let base_chunks = s.fx.base_disk.len() as u64 / 4096;
    let base_only = (0..base_chunks)
        .rev()
        .find(|&c| disk.find(c).is_none())
        .expect("a base-only chunk");
    let gate = Arc::new(Gate::default());
    let _open = OpenOnDrop(Arc::clone(&gate));
    let source = OverlaySource::Source(Arc::new(GatedSource {
        inner: FileSource::open(&s.overlay).expect("open overlay"),
        gate: Arc::clone(&gate),
    }));
    let g = mount_with(&s, source, |o| {
        o.background_fill = false;
        o.fetch_threads = 2;
    });
    gate.close();
    let image = g.path("disk/image");
    std::thread::scope(|sc| {
        let writers: Vec<_> = written
            .iter()
            .map(|&c| {
                let image = &image;
                sc.spawn(move || {
                    let f = std::fs::OpenOptions::new()
                        .write(true)
                        .open(image)
                        .expect("open disk image");
                    (c, f.write_all_at(PATCH, c * 4096 + 7))
                })
            })
            .collect();
        let readers: Vec<_> = read
            .iter()
            .map(|&c| {
                let image = &image;
                sc.spawn(move || {
                    let f = File::open(image).expect("open disk image");
                    (c, pread(&f, c * 4096, 4096))
                })
            })
            .collect();
        // The kernel lets one write to a file at a time into a FUSE file system (the inode
        // lock): the other writers wait there, not in the daemon.
        let expected = READERS + 1;
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut waiting = 0;
        while Instant::now() < deadline {
            waiting = g.mounted().stats().disk.waiting_now;
            if waiting >= expected as u64 {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        // With the network stopped: a base-only chunk, and the stats, are served.
        let (tx, rx) = mpsc::channel();
        let (image, stats) = (&image, g.path("disk/stats"));
        sc.spawn(move || {
            let f = File::open(image).expect("open disk image");
            let base = pread(&f, base_only * 4096, 4096);
            let stats = std::fs::read(&stats);
            let _ = tx.send((base, stats));
        });
        let served = rx.recv_timeout(Duration::from_secs(20));
        // Segments fetched at once: the readers' own, and the demand workers' (2).
        let fetching = gate.wait_arrived(usize::MAX, Duration::from_millis(200));
        gate.open();
        let (base, stats) = served.unwrap_or_else(|_| {
            panic!("base chunk and stats not served while {waiting} requests wait for the network")
        });
        let at = (base_only * 4096) as usize;
        assert_eq!(base.expect("base read"), s.disk[at..at + 4096]);
        let stats: serde_json::Value =
            serde_json::from_slice(&stats.expect("stats read")).expect("stats JSON");
        let waiting = stats["image"]["waiting_now"].as_u64().expect("waiting_now");
        assert!(
            waiting >= expected as u64,
            "only {waiting} of {expected} reads and writes reached the daemon at once"
        );
        let most = cloudletfs::fetch::MAX_CLAIMED + 2;
        assert!(
            (1..=most).contains(&fetching),
            "{fetching} segments fetched at once (at most {most})"
        );
        for r in readers {
            let (c, got) = r.join().expect("reader");
            let at = (c * 4096) as usize;
            assert_eq!(
                got.expect("pending read"),
                s.disk[at..at + 4096],
                "chunk {c}"
            );
        }
        for w in writers {
            let (c, r) = w.join().expect("writer");
            r.unwrap_or_else(|e| panic!("write to pending chunk {c}: {e}"));
        }
    });
    // Each written chunk: the overlay's bytes around the patch.
    let f = open_direct(&image, false);
    for &c in written {
        let at = (c * 4096) as usize;
        let mut want = s.disk[at..at + 4096].to_vec();
        want[7..7 + PATCH.len()].copy_from_slice(PATCH);
        assert_eq!(
            pread(&f, c * 4096, 4096).expect("read back"),
            want,
            "chunk {c}"
        );
    }
    let st = g.mounted().stats();
    assert_eq!(
        (
            st.disk.fetch_errors,
            st.disk.verification_failures,
            st.disk.waiting_now
        ),
        (0, 0, 0)
    );
}
