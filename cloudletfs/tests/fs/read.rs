//! Byte-identical reads against `cloudlet reconstruct`, through read() and mmap.

use crate::*;
use synth::codec::Codec;

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
    let g = mount_with(&s, OverlaySource::Path(s.overlay.clone()), |_| {});
    assert!(g.mounted().wait_filled(Some(Duration::from_secs(60))));
    check_images(&s, &g);
    let st = g.mounted().stats();
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
