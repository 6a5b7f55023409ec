//! Creating an overlay from a custom VM's images (`cloudlet diff`).
//!
//! A pipeline over bounded crossbeam channels, so memory stays bounded whatever the image size:
//!
//! ```text
//! reader ──batches──► classify workers ──classified──► sequencer ──segments──► compressors
//!  (custom + base bytes,   (compare, SHA-256, zero,       (in order: self        │
//!   256 chunks a batch)     base lookup, XOR choice)       dedup, segments)      ▼
//!                                                                      writer (segment order)
//! ```
//!
//! Each examined chunk is classified: unchanged (equal to the base at the same offset, not
//! recorded), zero, a reference to any chunk of the base disk or memory, a reference to an
//! earlier payload chunk of this overlay, or a payload — XOR'd against the base chunk at the
//! same offset when that compresses smaller, raw otherwise. The sequencer sees batches in
//! order, so the same inputs always give the same overlay bytes.

use crate::chunk::{
    chunk_count, is_zero, read_padded, sha256, Digest, ImageKind, CHUNK_SIZE, CHUNK_SIZE_U64,
};
use crate::codec::{self, Codec, CodecError};
use crate::format::{ChunkEntry, ChunkSource, ImageMap, Metadata, OverlayWriter, WriteError};
use crate::index::ChunkIndex;
use crate::registry::Base;
use crate::resolve::BaseFiles;
use crossbeam_channel::{bounded, Receiver, Sender};
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

const BATCH_CHUNKS: usize = 256;
/// Default decoded size of the segments holding chunks outside the working set: large, since
/// independent segments cost compression (BENCHMARKS.md: +7% at 1 MiB vs 16 MiB with xz).
pub const DEFAULT_SEGMENT_SIZE: usize = 16 << 20;
/// Default decoded size of the segments holding the working set (`CreateOptions::order`):
/// small, since these are fetched on demand while the VM waits. Measured through cloudletfs
/// (BENCHMARKS.md), a first read of a pending chunk took p99 9.8 ms with 256 KiB xz segments
/// against 36 ms with 1 MiB ones.
pub const DEFAULT_FIRST_SEGMENT_SIZE: usize = 256 << 10;

/// Options of overlay creation.
#[derive(Debug, Clone)]
pub struct CreateOptions {
    /// Segment codec.
    pub codec: Codec,
    /// Codec level.
    pub level: u32,
    /// Decoded segment size in bytes (rounded down to whole chunks, at least one).
    pub segment_size: usize,
    /// Decoded size of the segments that hold the chunks listed in `order`.
    pub first_segment_size: usize,
    /// Worker threads for classification and for compression.
    pub threads: usize,
    /// Only these disk chunks may differ from the base (a cloudletfs trace); `None` = all.
    pub disk_chunks: Option<Vec<u64>>,
    /// Only these memory chunks may differ from the base; `None` = all.
    pub memory_chunks: Option<Vec<u64>>,
    /// Chunks to examine (and so store) first, e.g. the working set in first-touch order.
    pub order: Vec<(ImageKind, u64)>,
}

impl Default for CreateOptions {
    fn default() -> Self {
        CreateOptions {
            codec: Codec::Xz,
            level: 9,
            segment_size: DEFAULT_SEGMENT_SIZE,
            first_segment_size: DEFAULT_FIRST_SEGMENT_SIZE,
            threads: 2,
            disk_chunks: None,
            memory_chunks: None,
            order: Vec::new(),
        }
    }
}

/// The custom VM's files.
#[derive(Debug, Clone)]
pub struct CustomImages {
    /// Custom disk image.
    pub disk: PathBuf,
    /// Custom memory image.
    pub memory: PathBuf,
    /// Custom device state, if any.
    pub device_state: Option<PathBuf>,
}

/// Creation errors.
#[derive(Debug, thiserror::Error)]
pub enum CreateError {
    /// Reading an input failed.
    #[error("Reading {path} failed")]
    Io {
        /// File.
        path: PathBuf,
        /// What failed.
        #[source]
        source: std::io::Error,
    },
    /// A candidate chunk list names a chunk outside its image.
    #[error("Candidate {image} chunk {chunk} lies outside the image ({count} chunks)")]
    CandidateOutOfRange {
        /// Image.
        image: ImageKind,
        /// Chunk.
        chunk: u64,
        /// Chunks in the image.
        count: u64,
    },
    /// Bad options.
    #[error("Invalid option: {0}")]
    Options(String),
    /// Compression failed.
    #[error(transparent)]
    Codec(#[from] CodecError),
    /// Writing the overlay failed.
    #[error(transparent)]
    Write(#[from] WriteError),
    /// A pipeline stage stopped unexpectedly.
    #[error("Overlay pipeline stopped: {0}")]
    Pipeline(&'static str),
}

/// What creation found and wrote.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct CreateStats {
    /// Chunks examined.
    pub examined_chunks: u64,
    /// Bytes examined (chunks × 4 KiB).
    pub examined_bytes: u64,
    /// Chunks found unchanged.
    pub unchanged: u64,
    /// Payload bytes before compression.
    pub payload_bytes: u64,
    /// Size of the overlay file.
    pub overlay_bytes: u64,
    /// Segments written.
    pub segments: u64,
}

struct Batch {
    seq: u64,
    items: Vec<(ImageKind, u64)>,
    custom: Vec<u8>,
    base: Vec<u8>,
}

enum Class {
    Unchanged,
    Zero(Digest),
    Base(ImageKind, u64, Digest),
    Payload {
        digest: Digest,
        xor: bool,
        bytes: Vec<u8>,
    },
}

struct Classified {
    seq: u64,
    items: Vec<(ImageKind, u64, Class)>,
}

struct SegmentJob {
    seq: u64,
    raw: Vec<u8>,
    chunks: Vec<(ImageKind, u64)>,
}

struct Compressed {
    seq: u64,
    data: Vec<u8>,
    raw_length: u64,
    chunks: Vec<(ImageKind, u64)>,
}

struct Custom {
    disk: File,
    memory: File,
    disk_size: u64,
    memory_size: u64,
    disk_path: PathBuf,
    memory_path: PathBuf,
}

impl Custom {
    fn read(&self, image: ImageKind, chunk: u64, buf: &mut [u8]) -> Result<(), CreateError> {
        let (f, size, path) = match image {
            ImageKind::Disk => (&self.disk, self.disk_size, &self.disk_path),
            ImageKind::Memory => (&self.memory, self.memory_size, &self.memory_path),
        };
        read_padded(f, size, chunk * CHUNK_SIZE_U64, buf).map_err(|source| CreateError::Io {
            path: path.clone(),
            source,
        })
    }
}

/// The chunks to examine, in processing order: `order` first, then the rest ascending; and how
/// many of them came from `order`.
fn plan(
    opts: &CreateOptions,
    counts: [u64; 2],
) -> Result<(Vec<(ImageKind, u64)>, usize), CreateError> {
    let mut lists: Vec<Vec<u64>> = Vec::new();
    for (i, image) in ImageKind::ALL.into_iter().enumerate() {
        let given = match image {
            ImageKind::Disk => &opts.disk_chunks,
            ImageKind::Memory => &opts.memory_chunks,
        };
        let list = match given {
            Some(l) => {
                let mut l = l.clone();
                l.sort_unstable();
                l.dedup();
                if let Some(&bad) = l.iter().find(|&&c| c >= counts[i]) {
                    return Err(CreateError::CandidateOutOfRange {
                        image,
                        chunk: bad,
                        count: counts[i],
                    });
                }
                l
            }
            None => (0..counts[i]).collect(),
        };
        lists.push(list);
    }
    let mut first = Vec::new();
    let mut taken: [std::collections::HashSet<u64>; 2] = Default::default();
    for &(image, chunk) in &opts.order {
        let i = image as usize;
        if lists[i].binary_search(&chunk).is_ok() && taken[i].insert(chunk) {
            first.push((image, chunk));
        }
    }
    let ordered = first.len();
    for (i, image) in ImageKind::ALL.into_iter().enumerate() {
        first.extend(
            lists[i]
                .iter()
                .filter(|c| !taken[i].contains(c))
                .map(|&c| (image, c)),
        );
    }
    Ok((first, ordered))
}

fn reader(
    plan: &[(ImageKind, u64)],
    custom: &Custom,
    base: &BaseFiles,
    tx: Sender<Batch>,
) -> Result<(), CreateError> {
    for (seq, items) in plan.chunks(BATCH_CHUNKS).enumerate() {
        let n = items.len() * CHUNK_SIZE;
        let mut c = vec![0u8; n];
        let mut b = vec![0u8; n];
        // Coalesce runs of consecutive chunks into single reads.
        let mut i = 0;
        while i < items.len() {
            let (image, start) = items[i];
            let mut j = i + 1;
            while j < items.len() && items[j] == (image, start + (j - i) as u64) {
                j += 1;
            }
            let range = i * CHUNK_SIZE..j * CHUNK_SIZE;
            custom.read(image, start, &mut c[range.clone()])?;
            base.read_at(image, start * CHUNK_SIZE_U64, &mut b[range])
                .map_err(|source| CreateError::Io {
                    path: PathBuf::from(format!("base {image} image")),
                    source,
                })?;
            i = j;
        }
        let batch = Batch {
            seq: seq as u64,
            items: items.to_vec(),
            custom: c,
            base: b,
        };
        if tx.send(batch).is_err() {
            return Ok(()); // downstream stopped; its error is reported there
        }
    }
    Ok(())
}

fn classify(index: &ChunkIndex, rx: Receiver<Batch>, tx: Sender<Classified>) {
    for batch in rx {
        let mut items = Vec::with_capacity(batch.items.len());
        for (k, &(image, chunk)) in batch.items.iter().enumerate() {
            let c = &batch.custom[k * CHUNK_SIZE..(k + 1) * CHUNK_SIZE];
            let b = &batch.base[k * CHUNK_SIZE..(k + 1) * CHUNK_SIZE];
            let class = if c == b {
                Class::Unchanged
            } else if is_zero(c) {
                Class::Zero(sha256(c))
            } else {
                let digest = sha256(c);
                match index.lookup(&digest) {
                    Some((bi, bc)) => Class::Base(bi, bc, digest),
                    None => payload(c, b, digest),
                }
            };
            items.push((image, chunk, class));
        }
        if tx
            .send(Classified {
                seq: batch.seq,
                items,
            })
            .is_err()
        {
            return;
        }
    }
}

/// Chooses raw or XOR'd-against-base by which compresses smaller (zstd level 1 as the judge).
fn payload(c: &[u8], b: &[u8], digest: Digest) -> Class {
    if is_zero(b) {
        return Class::Payload {
            digest,
            xor: false,
            bytes: c.to_vec(),
        };
    }
    let x: Vec<u8> = c.iter().zip(b).map(|(a, b)| a ^ b).collect();
    let size = |d: &[u8]| {
        zstd::bulk::compress(d, 1)
            .map(|v| v.len())
            .unwrap_or(usize::MAX)
    };
    if size(&x) < size(c) {
        Class::Payload {
            digest,
            xor: true,
            bytes: x,
        }
    } else {
        Class::Payload {
            digest,
            xor: false,
            bytes: c.to_vec(),
        }
    }
}

fn compressor(
    codec: Codec,
    level: u32,
    rx: Receiver<SegmentJob>,
    tx: Sender<Result<Compressed, CreateError>>,
) {
    for job in rx {
        let out = codec::compress(codec, level, &job.raw).map(|data| Compressed {
            seq: job.seq,
            data,
            raw_length: job.raw.len() as u64,
            chunks: job.chunks,
        });
        if tx.send(out.map_err(CreateError::from)).is_err() {
            return;
        }
    }
}

fn writer_stage(
    mut writer: OverlayWriter,
    rx: Receiver<Result<Compressed, CreateError>>,
) -> Result<OverlayWriter, CreateError> {
    let mut pending = BTreeMap::new();
    let mut next = 0u64;
    for item in rx {
        let c = item?;
        pending.insert(c.seq, c);
        while let Some(c) = pending.remove(&next) {
            writer.append_segment(&c.data, c.raw_length, c.chunks)?;
            next += 1;
        }
    }
    if !pending.is_empty() {
        return Err(CreateError::Pipeline("segments missing before the end"));
    }
    Ok(writer)
}

/// Builds the sequencer's output: per-image maps, and segment jobs sent to the compressors.
struct Sequencer {
    /// Chunks a segment holds outside the working set.
    segment_chunks: usize,
    /// Chunks the current segment may hold.
    limit: usize,
    /// Chunks of the plan still in the ordered (working-set) part.
    ordered_left: usize,
    maps: [Vec<ChunkEntry>; 2],
    self_map: HashMap<Digest, (ImageKind, u64)>,
    /// Payloads of the current segment.
    raw: Vec<u8>,
    /// Digests of the current segment's payload chunks, in the same order.
    digests: Vec<u8>,
    chunks: Vec<(ImageKind, u64)>,
    seq: u64,
    unchanged: u64,
    payload_bytes: u64,
    tx: Sender<SegmentJob>,
}

impl Sequencer {
    fn take(&mut self, image: ImageKind, chunk: u64, class: Class) -> Result<(), CreateError> {
        let in_working_set = self.ordered_left > 0;
        if in_working_set {
            self.ordered_left -= 1;
        } else if self.limit != self.segment_chunks {
            // The working set ends: close its small segment so the rest starts a large one.
            self.limit = self.segment_chunks;
            self.flush()?;
        }
        let (source, digest) = match class {
            Class::Unchanged => {
                self.unchanged += 1;
                return Ok(());
            }
            Class::Zero(d) => (ChunkSource::Zero, Some(d)),
            Class::Base(ImageKind::Disk, c, d) => (ChunkSource::BaseDisk(c), Some(d)),
            Class::Base(ImageKind::Memory, c, d) => (ChunkSource::BaseMemory(c), Some(d)),
            Class::Payload { digest, xor, bytes } => {
                // A self reference's and a payload's digest go with the payload, in its segment.
                if let Some(&(ti, tc)) = self.self_map.get(&digest) {
                    (
                        ChunkSource::SelfRef {
                            image: ti,
                            chunk: tc,
                        },
                        None,
                    )
                } else {
                    self.self_map.insert(digest, (image, chunk));
                    let segment = u32::try_from(self.seq)
                        .map_err(|_| CreateError::Options("too many segments".into()))?;
                    let offset = u32::try_from(self.raw.len())
                        .map_err(|_| CreateError::Options("segment too large".into()))?;
                    self.raw.extend_from_slice(&bytes);
                    self.digests.extend_from_slice(&digest);
                    self.payload_bytes += CHUNK_SIZE_U64;
                    self.chunks.push((image, chunk));
                    if self.chunks.len() >= self.limit {
                        self.flush()?;
                    }
                    (
                        ChunkSource::Payload {
                            segment,
                            offset,
                            xor,
                        },
                        None,
                    )
                }
            }
        };
        self.maps[image as usize].push(ChunkEntry {
            chunk,
            source,
            digest,
        });
        Ok(())
    }

    fn flush(&mut self) -> Result<(), CreateError> {
        if self.chunks.is_empty() {
            return Ok(());
        }
        // The decoded segment: payloads, then their digests (see `format`'s layout).
        self.raw.append(&mut self.digests);
        let job = SegmentJob {
            seq: self.seq,
            raw: std::mem::take(&mut self.raw),
            chunks: std::mem::take(&mut self.chunks),
        };
        self.seq += 1;
        self.tx
            .send(job)
            .map_err(|_| CreateError::Pipeline("compressors stopped"))
    }
}

/// Creates an overlay of `custom` against `base` at `out`. `progress` counts examined bytes.
pub fn create_overlay(
    base: &Base,
    index: &ChunkIndex,
    custom: &CustomImages,
    out: &Path,
    opts: &CreateOptions,
    progress: &AtomicU64,
) -> Result<CreateStats, CreateError> {
    if opts.segment_size < CHUNK_SIZE
        || opts.segment_size as u64 > crate::format::MAX_SEGMENT_PAYLOAD_LEN
    {
        return Err(CreateError::Options(format!(
            "segment size must be between 4 KiB and {} MiB",
            crate::format::MAX_SEGMENT_PAYLOAD_LEN >> 20
        )));
    }
    if opts.level > opts.codec.max_level() {
        return Err(CreateError::Options(format!(
            "level {} is above {}'s maximum {}",
            opts.level,
            opts.codec.name(),
            opts.codec.max_level()
        )));
    }
    let open = |p: &Path| -> Result<(File, u64), CreateError> {
        let io = |source| CreateError::Io {
            path: p.to_path_buf(),
            source,
        };
        let f = File::open(p).map_err(io)?;
        let size = f.metadata().map_err(io)?.len();
        Ok((f, size))
    };
    let (disk, disk_size) = open(&custom.disk)?;
    let (memory, memory_size) = open(&custom.memory)?;
    for (image, size) in [
        (ImageKind::Disk, disk_size),
        (ImageKind::Memory, memory_size),
    ] {
        if size > crate::format::MAX_IMAGE_SIZE {
            return Err(CreateError::Options(format!(
                "the {image} image is larger than 16 TiB"
            )));
        }
    }
    let custom_files = Custom {
        disk,
        memory,
        disk_size,
        memory_size,
        disk_path: custom.disk.clone(),
        memory_path: custom.memory.clone(),
    };
    let device_state = match &custom.device_state {
        Some(p) => std::fs::read(p).map_err(|source| CreateError::Io {
            path: p.clone(),
            source,
        })?,
        None => Vec::new(),
    };
    if device_state.len() as u64 > crate::format::MAX_DEVICE_STATE_LEN {
        return Err(CreateError::Options(
            "device state is larger than 256 MiB".into(),
        ));
    }
    let base_files = BaseFiles::open(&base.disk_path(), &base.memory_path()).map_err(|source| {
        CreateError::Io {
            path: base.dir.clone(),
            source,
        }
    })?;
    let (plan, ordered) = plan(opts, [chunk_count(disk_size), chunk_count(memory_size)])?;
    let threads = opts.threads.max(1);
    let writer = OverlayWriter::create(out)?;

    let (batch_tx, batch_rx) = bounded::<Batch>(threads * 2);
    let (class_tx, class_rx) = bounded::<Classified>(threads * 2);
    let (seg_tx, seg_rx) = bounded::<SegmentJob>(threads);
    let (comp_tx, comp_rx) = bounded::<Result<Compressed, CreateError>>(threads);

    let mut seq = Sequencer {
        segment_chunks: (opts.segment_size / CHUNK_SIZE).max(1),
        limit: if ordered > 0 {
            (opts.first_segment_size / CHUNK_SIZE).max(1)
        } else {
            (opts.segment_size / CHUNK_SIZE).max(1)
        },
        ordered_left: ordered,
        maps: [Vec::new(), Vec::new()],
        self_map: HashMap::new(),
        raw: Vec::new(),
        digests: Vec::new(),
        chunks: Vec::new(),
        seq: 0,
        unchanged: 0,
        payload_bytes: 0,
        tx: seg_tx,
    };
    let (read_result, seq_result, writer_result) = std::thread::scope(|s| {
        let plan = &plan;
        let custom_files = &custom_files;
        let base_files = &base_files;
        let read = s.spawn(move || reader(plan, custom_files, base_files, batch_tx));
        for _ in 0..threads {
            let (rx, tx) = (batch_rx.clone(), class_tx.clone());
            s.spawn(move || classify(index, rx, tx));
        }
        drop(batch_rx);
        drop(class_tx);
        for _ in 0..threads {
            let (rx, tx) = (seg_rx.clone(), comp_tx.clone());
            let (codec, level) = (opts.codec, opts.level);
            s.spawn(move || compressor(codec, level, rx, tx));
        }
        drop(seg_rx);
        drop(comp_tx);
        let write = s.spawn(move || writer_stage(writer, comp_rx));

        // Sequencer, on this thread: batches in order.
        let mut pending = BTreeMap::new();
        let mut next = 0u64;
        let mut result = Ok(());
        for c in class_rx {
            pending.insert(c.seq, c);
            while let Some(c) = pending.remove(&next) {
                next += 1;
                progress.fetch_add((c.items.len() * CHUNK_SIZE) as u64, Ordering::Relaxed);
                for (image, chunk, class) in c.items {
                    if let Err(e) = seq.take(image, chunk, class) {
                        result = Err(e);
                        break;
                    }
                }
                if result.is_err() {
                    break;
                }
            }
            if result.is_err() {
                break;
            }
        }
        if result.is_ok() {
            result = seq.flush();
        }
        // Closing the segment channel lets compressors and the writer finish.
        let (dummy_tx, _) = bounded(0);
        drop(std::mem::replace(&mut seq.tx, dummy_tx));
        let read_result = read
            .join()
            .unwrap_or(Err(CreateError::Pipeline("reader panicked")));
        let writer_result = write
            .join()
            .unwrap_or(Err(CreateError::Pipeline("writer panicked")));
        (read_result, result, writer_result)
    });
    // The writer's error is the cause when the sequencer only saw the pipeline stop.
    let writer = writer_result?;
    read_result?;
    seq_result?;
    let [mut disk_map, mut memory_map] = std::mem::take(&mut seq.maps);
    disk_map.sort_unstable_by_key(|e| e.chunk);
    memory_map.sort_unstable_by_key(|e| e.chunk);
    let meta = Metadata {
        base_id: base.id(),
        chunk_size: crate::chunk::CHUNK_SIZE_U32,
        codec: opts.codec,
        device_state,
        disk: ImageMap {
            size: disk_size,
            chunks: disk_map,
        },
        memory: ImageMap {
            size: memory_size,
            chunks: memory_map,
        },
        segments: Vec::new(),
    };
    let overlay_bytes = writer.finish(meta)?;
    Ok(CreateStats {
        examined_chunks: plan.len() as u64,
        examined_bytes: plan.len() as u64 * CHUNK_SIZE_U64,
        unchanged: seq.unchanged,
        payload_bytes: seq.payload_bytes,
        overlay_bytes,
        segments: seq.seq,
    })
}

/// Writes an overlay that changes nothing: the base VM itself, with the base's device state.
/// cloudletfs mounts it to run a base VM copy-on-write (how `cloudlet overlay` customizes).
pub fn empty_overlay(base: &Base, out: &Path) -> Result<u64, CreateError> {
    let ds_path = base.device_state_path();
    let device_state = std::fs::read(&ds_path).map_err(|source| CreateError::Io {
        path: ds_path,
        source,
    })?;
    let meta = Metadata {
        base_id: base.id(),
        chunk_size: crate::chunk::CHUNK_SIZE_U32,
        codec: Codec::Zstd,
        device_state,
        disk: ImageMap {
            size: base.record.disk_size,
            chunks: Vec::new(),
        },
        memory: ImageMap {
            size: base.record.memory_size,
            chunks: Vec::new(),
        },
        segments: Vec::new(),
    };
    Ok(OverlayWriter::create(out)?.finish(meta)?)
}
