//! Trace streams list exactly what was accessed, written and discarded.

use crate::*;
use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::sync::mpsc::{channel, Receiver};

/// Follows a stream file in a thread; every line arrives on the channel.
fn follow(p: PathBuf) -> Receiver<u64> {
    let (tx, rx) = channel();
    std::thread::spawn(move || {
        let f = std::fs::File::open(&p).expect("open stream");
        for line in BufReader::new(f).lines() {
            let Ok(line) = line else { return };
            let n: u64 = line
                .trim()
                .parse()
                .unwrap_or_else(|_| panic!("bad stream line {line:?}"));
            if tx.send(n).is_err() {
                return;
            }
        }
    });
    rx
}

fn take(rx: &Receiver<u64>, n: usize) -> BTreeSet<u64> {
    (0..n)
        .map(|_| {
            rx.recv_timeout(Duration::from_secs(30))
                .expect("stream line")
        })
        .collect()
}

fn quiet(rx: &Receiver<u64>) {
    assert!(
        rx.recv_timeout(Duration::from_millis(300)).is_err(),
        "unexpected extra line"
    );
}

#[test]
fn streams_list_exactly_accessed_modified_discarded() {
    if !fuse_ok() {
        return;
    }
    let s = Setup::new(
        8,
        Shape {
            disk: 1 << 20,
            memory: 1 << 20,
            ..Shape::default()
        },
    );
    let g = mount_with(&s, OverlaySource::Path(s.overlay.clone()), |o| {
        o.background_fill = false
    });
    let img = g.path("disk/image");
    let f = open_direct(&img, true);
    // Before any reader: chunk 3 and 10 read, chunk 20 written.
    pread(&f, 3 * 4096, 4096).expect("read");
    pread(&f, 10 * 4096, 4096).expect("read");
    f.write_all_at(&[7u8; 4096], 20 * 4096).expect("write");
    let acc = follow(g.path("disk/streams/chunks_accessed"));
    let modi = follow(g.path("disk/streams/chunks_modified"));
    let disc = follow(g.path("disk/streams/chunks_discarded"));
    assert_eq!(take(&acc, 3), BTreeSet::from([3, 10, 20]));
    assert_eq!(take(&modi, 1), BTreeSet::from([20]));
    quiet(&acc);
    quiet(&disc);
    // New events while the readers wait; repeated accesses are not listed again.
    pread(&f, 3 * 4096, 4096).expect("read");
    pread(&f, 40 * 4096, 8192).expect("read");
    f.write_all_at(&[1u8; 10], 50 * 4096 + 4090)
        .expect("write across");
    // SAFETY: fallocate on an open file descriptor with integer arguments.
    let r = unsafe {
        libc::fallocate(
            std::os::fd::AsRawFd::as_raw_fd(&f),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            60 * 4096,
            2 * 4096,
        )
    };
    assert_eq!(r, 0);
    assert_eq!(take(&acc, 6), BTreeSet::from([40, 41, 50, 51, 60, 61]));
    assert_eq!(take(&modi, 2), BTreeSet::from([50, 51]));
    assert_eq!(take(&disc, 2), BTreeSet::from([60, 61]));
    quiet(&acc);
    quiet(&modi);
    quiet(&disc);
    // A reader opened now lists the whole set.
    let late = follow(g.path("disk/streams/chunks_accessed"));
    assert_eq!(
        take(&late, 9),
        BTreeSet::from([3, 10, 20, 40, 41, 50, 51, 60, 61])
    );
    quiet(&late);
    // The memory image was never touched.
    quiet(&follow(g.path("memory/streams/chunks_accessed")));
}
