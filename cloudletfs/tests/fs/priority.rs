//! The priority each segment read carries to the byte source: demand for a read through the
//! mount, background for the filler.

use crate::*;
use std::collections::BTreeMap;
use std::sync::Mutex;

/// A file source that records the offset and priority of every read (`None`: a read without
/// a priority, `read_range`), and holds the reads of segments (from `segments_at` on) at a
/// gate.
struct Recording {
    inner: FileSource,
    segments_at: u64,
    gate: Arc<Gate>,
    reads: Mutex<Vec<(u64, Option<Priority>)>>,
}

impl Recording {
    fn read(
        &self,
        offset: u64,
        len: u64,
        priority: Option<Priority>,
    ) -> Result<Vec<u8>, SourceError> {
        self.reads.lock().expect("reads").push((offset, priority));
        if offset >= self.segments_at {
            self.gate.pass();
        }
        self.inner
            .read_range_with(offset, len, priority.unwrap_or_default())
    }
}

impl ByteSource for Recording {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_range(&self, offset: u64, len: u64) -> Result<Vec<u8>, SourceError> {
        self.read(offset, len, None)
    }
    fn read_range_with(
        &self,
        offset: u64,
        len: u64,
        priority: Priority,
    ) -> Result<Vec<u8>, SourceError> {
        self.read(offset, len, Some(priority))
    }
}

#[test]
fn segment_reads_pending_read_is_demand_and_filler_is_background() {
    if !fuse_ok() {
        return;
    }
    // Arrange: segment reads wait at a closed gate, so the filler stops at its first segment
    // while a read through the mount asks for the last one.
    let s = Setup::new(
        41,
        Shape {
            segment: 16 << 10,
            ..Shape::default()
        },
    );
    let ov = s.overlay_meta();
    let meta = ov.metadata();
    let last = meta.segments.len() - 1;
    assert!(last >= 2, "too few segments: {}", last + 1);
    let (kind, chunk) = meta.segments[last].chunks[0];
    let segment_at: BTreeMap<u64, usize> = (0..=last)
        .map(|i| (ov.data_start() + meta.segments[i].offset, i))
        .collect();
    let gate = Arc::new(Gate::default());
    let _open = OpenOnDrop(Arc::clone(&gate));
    gate.close();
    let source = Arc::new(Recording {
        inner: FileSource::open(&s.overlay).expect("open overlay"),
        segments_at: ov.data_start(),
        gate: Arc::clone(&gate),
        reads: Mutex::new(Vec::new()),
    });
    let g = mount_with(
        &s,
        OverlaySource::Source(Arc::clone(&source) as Arc<dyn ByteSource>),
        |_| {},
    );
    let filler_waits = gate.wait_arrived(1, Duration::from_secs(20));
    // Act: read the chunk through the mount; let every segment read go once it has arrived.
    let image = g.path(&format!("{}/image", kind.name()));
    let got = std::thread::scope(|sc| {
        let reader = sc.spawn(|| pread(&open_direct(&image, false), chunk * 4096, 4096));
        let arrived = gate.wait_arrived(2, Duration::from_secs(20));
        gate.open();
        (arrived, reader.join().expect("reader"))
    });
    let filled = g.mounted().wait_filled(Some(Duration::from_secs(60)));
    // Assert: the read's segment was read once, on demand; every other by the filler.
    let mut by_segment: BTreeMap<usize, Vec<Option<Priority>>> = BTreeMap::new();
    for (offset, priority) in source.reads.lock().expect("reads").iter() {
        if let Some(&i) = segment_at.get(offset) {
            by_segment.entry(i).or_default().push(*priority);
        }
    }
    let expected: BTreeMap<usize, Vec<Option<Priority>>> = (0..=last)
        .map(|i| {
            let p = if i == last {
                Priority::Demand
            } else {
                Priority::Background
            };
            (i, vec![Some(p)])
        })
        .collect();
    let image_bytes = match kind {
        synth::ImageKind::Disk => &s.disk,
        synth::ImageKind::Memory => &s.memory,
    };
    let at = (chunk * 4096) as usize;
    assert_eq!((filler_waits, got.0, filled), (1, 2, true));
    assert_eq!(
        got.1.expect("read of a pending chunk"),
        image_bytes[at..at + 4096]
    );
    assert_eq!(by_segment, expected);
}
