//! A corrupted segment gives EIO on exactly its chunks.

use crate::*;
use std::collections::BTreeSet;
use synth::format::ChunkSource;
use synth::ImageKind;

#[test]
fn corrupt_segment_fails_exactly_its_chunks() {
    if !fuse_ok() {
        return;
    }
    let s = Setup::new(7, Shape::default());
    let ov = s.overlay_meta();
    let meta = ov.metadata();
    let bad = meta.segments.len() / 2;
    let seg = &meta.segments[bad];
    let mut bytes = std::fs::read(&s.overlay).expect("read overlay");
    let at = (ov.data_start() + seg.offset + seg.length / 2) as usize;
    bytes[at] ^= 0x55;
    // Expected failures: the segment's chunks and every self reference to them.
    let mut failing: BTreeSet<(ImageKind, u64)> = seg.chunks.iter().copied().collect();
    for kind in ImageKind::ALL {
        for e in &meta.image(kind).chunks {
            if let ChunkSource::SelfRef { image, chunk } = e.source {
                if failing.contains(&(image, chunk)) {
                    failing.insert((kind, e.chunk));
                }
            }
        }
    }
    let src = OverlaySource::Source(Arc::new(bytes));
    let g = mount_with(&s, src, |_| {});
    g.mounted().wait_filled(Some(Duration::from_secs(60)));
    for (kind, want) in [(ImageKind::Disk, &s.disk), (ImageKind::Memory, &s.memory)] {
        let f = open_direct(&g.path(&format!("{}/image", kind.name())), false);
        for c in 0..(want.len() as u64).div_ceil(4096) {
            let len = (want.len() as u64 - c * 4096).min(4096) as usize;
            let r = pread(&f, c * 4096, len);
            if failing.contains(&(kind, c)) {
                let e = r.expect_err("corrupt chunk served");
                assert_eq!(e.raw_os_error(), Some(libc::EIO), "{kind} chunk {c}");
            } else {
                let got = r.unwrap_or_else(|e| panic!("{kind} chunk {c}: {e}"));
                assert_eq!(got, want[(c * 4096) as usize..][..len], "{kind} chunk {c}");
            }
        }
    }
    let st = g.mounted().stats();
    assert_eq!(st.fetch.segments_corrupt, 1);
    assert_eq!(
        st.disk.verification_failures + st.memory.verification_failures,
        failing.len() as u64
    );
}

/// The overlay of `s` with its metadata changed by `f` (digest kept right).
fn with_meta(s: &Setup, f: impl FnOnce(&mut synth::format::Metadata)) -> Vec<u8> {
    let bytes = std::fs::read(&s.overlay).expect("read overlay");
    let ov = s.overlay_meta();
    let mut meta = ov.metadata().clone();
    f(&mut meta);
    let segments = &bytes[ov.data_start() as usize..];
    let mut out = synth::format::encode_head(&meta, segments.len() as u64).expect("encode");
    out.extend_from_slice(segments);
    out
}

#[test]
fn mount_overlay_of_other_memory_size_is_refused() {
    if !fuse_ok() {
        return;
    }
    let s = Setup::new(15, Shape::default());
    let bytes = with_meta(&s, |m| m.memory.size += 4096);
    let dir = tempfile::tempdir().expect("mnt");
    let o = s.options(OverlaySource::Source(Arc::new(bytes)), dir.path());
    let err = mount(o).expect_err("mounted");
    assert!(
        matches!(
            err,
            cloudletfs::MountError::Overlay(synth::format::FormatError::MemorySizeMismatch { .. })
        ),
        "{err}"
    );
    assert!(cloudletfs::mounted_at(dir.path()).is_none());
}

#[test]
fn mount_disk_growth_past_the_option_is_refused_and_within_it_served() {
    if !fuse_ok() {
        return;
    }
    // The Setup's custom disk is 3 chunks and 512 bytes larger than the base's.
    let s = Setup::new(16, Shape::default());
    let base = s.fx.base.record.disk_size;
    let grown = s.disk.len() as u64 - base;
    let dir = tempfile::tempdir().expect("mnt");
    let mut o = s.options(OverlaySource::Path(s.overlay.clone()), dir.path());
    o.max_disk_growth = Some(grown - 1);
    assert!(matches!(
        mount(o),
        Err(cloudletfs::MountError::Overlay(
            synth::format::FormatError::DiskTooLarge { .. }
        ))
    ));
    let g = mount_with(&s, OverlaySource::Path(s.overlay.clone()), |o| {
        o.max_disk_growth = Some(grown)
    });
    assert_eq!(first_diff(&read_all(&g.path("disk/image")), &s.disk), None);
}
